//! Bad input on the HTTP listener, against the real gateway binary in front of recording
//! upstream VMs (a small HTTP/1.1 server in this file that keeps every request it receives, so
//! the tests can check what reached a VM): slowloris and silent connections are cut by the
//! header-read / idle timeout; oversized headers and targets get 431 / 414; malformed, forged,
//! tampered and expired sticky cookies are ignored and the browser re-picked with a fresh valid
//! cookie; request-smuggling attempts never reach a VM as two requests; path tricks are refused
//! or stay on the pool VM; and the gateway keeps answering with nothing panicked.

// Test code: a failed step should abort the test at once (as in tests/src/lib.rs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use poolgate_tests::jupyter::cookie_vm;
use poolgate_tests::*;

/// Health path of the recording upstreams (its requests are not recorded).
const HEALTH: &str = "/pg-health";
/// `http.idle_timeout` of these tests: also hyper's header-read timeout.
const IDLE: Duration = Duration::from_secs(2);
/// Scheduling slack on a loaded 2-core machine.
const SLACK: Duration = Duration::from_millis(1500);

/// One request as an upstream VM received it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A pool VM's web side that records every request (keep-alive, Content-Length and chunked
/// bodies) and answers `200` with `vm=<name> saw <method> <target>`.
struct Upstream {
    name: String,
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    fn start(name: &str) -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (record, vm) = (seen.clone(), name.to_string());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (record, vm) = (record.clone(), vm.clone());
                std::thread::spawn(move || serve_upstream(conn, &vm, &record));
            }
        });
        Upstream {
            name: name.into(),
            port,
            seen,
        }
    }

    /// Requests received so far (health probes left out), and forget them.
    fn take(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

fn serve_upstream(conn: TcpStream, vm: &str, record: &Mutex<Vec<Seen>>) {
    let mut out = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, target) = (
            parts.next().unwrap_or("").to_string(),
            parts.next().unwrap_or("").to_string(),
        );
        let mut headers = Vec::new();
        loop {
            // Header values may hold any byte (obs-text): read bytes, not UTF-8 lines.
            let mut h = Vec::new();
            if r.read_until(b'\n', &mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = String::from_utf8_lossy(&h);
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (n, v) = h.split_once(':').unwrap_or((h, ""));
            headers.push((n.trim().to_string(), v.trim().to_string()));
        }
        let get = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let mut body = Vec::new();
        if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            loop {
                let mut size = String::new();
                r.read_line(&mut size).unwrap();
                let n = usize::from_str_radix(size.trim().split(';').next().unwrap(), 16).unwrap();
                let mut chunk = vec![0u8; n + 2];
                r.read_exact(&mut chunk).unwrap();
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        } else if let Some(n) = get("content-length") {
            body = vec![0u8; n.parse().unwrap()];
            r.read_exact(&mut body).unwrap();
        }
        let reply = format!("vm={vm} saw {method} {target}");
        let http10 = target.starts_with("/http10");
        if target != HEALTH {
            record.lock().unwrap().push(Seen {
                method,
                target,
                headers,
                body,
            });
        }
        // `/http10…`: answered as an HTTP/1.0 server does (Python's http.server, old appliances).
        let version = if http10 {
            "HTTP/1.0 200 OK\r\nConnection: keep-alive"
        } else {
            "HTTP/1.1 200 OK"
        };
        let _ = write!(
            out,
            "{version}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{reply}",
            reply.len()
        );
    }
}

/// The gateway's plain HTTP listener in front of `upstreams`, with short limits.
fn gateway(upstreams: &[&Upstream]) -> GatewayPool {
    gateway_with(upstreams, &[])
}

/// [`gateway`] with more `[http]` lines.
fn gateway_with(upstreams: &[&Upstream], http_options: &[&str]) -> GatewayPool {
    let mut b = GatewayPool::builder()
        .web_pool(HEALTH)
        .http_option(&format!("idle_timeout = \"{}s\"", IDLE.as_secs()))
        .http_option("max_header_bytes = 8192")
        .http_option("max_uri_bytes = 1024");
    for option in http_options {
        b = b.http_option(option);
    }
    for u in upstreams {
        b = b.web_vm(&u.name, u.port);
    }
    b.start()
}

/// A GET of `path` by curl, with `headers`, over `version`: `"2"` is HTTP/2 with prior
/// knowledge (h2c: the plain listener serves it as browsers' TLS connections get it by ALPN),
/// `"1.1"` HTTP/1.1 (what a TLS-terminating load balancer in front speaks). Returns the status,
/// the HTTP version and the body, or curl's error.
fn curl_over(
    version: &str,
    addr: SocketAddr,
    path: &str,
    headers: &[String],
) -> Result<(u16, String, String), String> {
    let flag = match version {
        "2" => "--http2-prior-knowledge",
        _ => "--http1.1",
    };
    let mut cmd = std::process::Command::new("curl");
    cmd.args([flag, "--silent", "--show-error"])
        .args(["--write-out", "\n%{http_code} %{http_version}"])
        .args(["--header", "Accept: text/html"]);
    for h in headers {
        cmd.arg("--header").arg(h);
    }
    let out = cmd
        .arg(format!("http://{addr}{path}"))
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, last) = text.rsplit_once('\n').unwrap_or(("", &text));
    let (code, version) = last.split_once(' ').unwrap_or((last, ""));
    match code.parse() {
        Ok(code) if out.status.success() => Ok((code, version.to_owned(), body.to_owned())),
        _ => Err(format!(
            "curl: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        )),
    }
}

/// A raw HTTP exchange: sends `bytes`, reads until the gateway closes or 5 s pass.
/// Returns (status of the first response, number of responses seen, whole text).
fn raw(addr: SocketAddr, bytes: &[u8]) -> (u16, usize, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(bytes);
    let mut text = Vec::new();
    let _ = s.read_to_end(&mut text);
    let text = String::from_utf8_lossy(&text).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let responses = text.matches("HTTP/1.1 ").count();
    (status, responses, text)
}

/// `Connection: close` request for `target` with extra header lines.
fn request(method: &str, target: &str, extra: &str) -> Vec<u8> {
    format!("{method} {target} HTTP/1.1\r\nHost: pool.example\r\n{extra}Connection: close\r\n\r\n")
        .into_bytes()
}

/// A plain request is answered by the upstream.
fn still_serves(gw: &GatewayPool) {
    let (status, _, text) = raw(gw.http, &request("GET", "/still-ok", ""));
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("saw GET /still-ok"), "{text}");
}

#[test]
fn slowloris_and_silent_connections_are_cut_by_the_header_read_timeout() {
    let started = Instant::now();
    let up = Upstream::start("up-a");
    let gw = gateway(&[&up]);
    let pid = gw.gateway.pid().unwrap();
    still_serves(&gw);
    let fds0 = fd_count(pid);

    // Dribblers (one header byte every 100 ms, never finishing), silent connections, and
    // keep-alive connections that dribble their second request after a complete first one
    // (the cut is timed from the first response). 14 of each.
    let dribblers: Vec<_> = (0..42)
        .map(|i| {
            let addr = gw.http;
            std::thread::spawn(move || {
                let kind = ["dribbling", "silent", "dribbling after a request"][i % 3];
                let mut t0 = Instant::now();
                let mut s = TcpStream::connect(addr).unwrap();
                if i % 3 == 2 {
                    s.write_all(b"GET /first HTTP/1.1\r\nHost: pool.example\r\n\r\n")
                        .unwrap();
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !String::from_utf8_lossy(&seen).contains("saw GET /first") {
                        let n = s.read(&mut buf).unwrap();
                        assert!(n > 0, "closed before the first response");
                        seen.extend_from_slice(&buf[..n]);
                    }
                    t0 = Instant::now();
                }
                let mut head = b"GET /slow HTTP/1.1\r\nHost: pool.example\r\nX-Slow: ".to_vec();
                head.extend(std::iter::repeat_n(b'a', 1000));
                let mut cut = None;
                if i % 3 != 1 {
                    for b in head {
                        if s.write_all(&[b]).is_err() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                        if t0.elapsed() > IDLE + SLACK * 2 {
                            break;
                        }
                    }
                }
                // Whatever it sent, wait for the close (a 408, or just the FIN).
                s.set_read_timeout(Some(Duration::from_millis(200)))
                    .unwrap();
                let mut buf = [0u8; 1024];
                let mut answer = Vec::new();
                while t0.elapsed() < IDLE + SLACK * 3 {
                    match s.read(&mut buf) {
                        Ok(0) => {
                            cut = Some(t0.elapsed());
                            break;
                        }
                        Ok(n) => answer.extend_from_slice(&buf[..n]),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => {
                            cut = Some(t0.elapsed());
                            break;
                        }
                    }
                }
                (kind, cut, String::from_utf8_lossy(&answer).into_owned())
            })
        })
        .collect();
    // Meanwhile normal requests go through.
    still_serves(&gw);
    let peak = fd_count(pid);
    let mut worst = Duration::ZERO;
    for d in dribblers {
        let (kind, cut, answer) = d.join().unwrap();
        let cut = cut.unwrap_or_else(|| panic!("{kind}: still open {:?} in", IDLE + SLACK * 3));
        assert!(
            cut <= IDLE + SLACK,
            "{kind}: cut after {cut:?}; answer {answer:?}"
        );
        worst = worst.max(cut);
    }
    eprintln!(
        "slowloris/silent connections cut after at most {worst:?} (http.idle_timeout {IDLE:?})"
    );
    assert!(
        up.take().iter().all(|s| s.target != "/slow"),
        "a dribbled request reached the VM"
    );
    wait_until(
        Duration::from_secs(5),
        "the gateway's FDs back to the baseline",
        // The 14 first requests may leave as many idle VM connections in the gateway's pool.
        || fd_count(pid) <= fds0 + 2 + 14,
    );
    eprintln!(
        "gateway FDs: before {fds0}, during {peak}, after {}",
        fd_count(pid)
    );
    still_serves(&gw);
    gw.assert_no_panic();
    eprintln!("slowloris test: {:?}", started.elapsed());
}

/// A request whose headers are past `max_header_bytes` gets the gateway's 431 page, which says
/// what to do (the usual cause is a site's cookies piling up), rather than the bare 431 of the
/// HTTP library, which a browser shows as an empty error. Over HTTP/2, which browsers speak
/// over TLS, the limit counts as HTTP/2 does (each field's name and value plus 32 bytes); over
/// HTTP/1.1, which a TLS-terminating load balancer in front speaks, it is the head's size.
#[test]
fn oversized_headers_get_a_431_page_that_names_the_cookies_over_http2_and_http1() {
    require_tools!("curl");
    let up = Upstream::start("up-a");
    let gw = gateway(&[&up]);
    let cookies = |n: usize| {
        let jar: Vec<String> = (0..n)
            .map(|i| format!("c{i}={}", "v".repeat(400)))
            .collect();
        vec![format!("Cookie: {}", jar.join("; "))]
    };
    for version in ["2", "1.1"] {
        // Twenty-five cookies of 400 bytes, 10 KB: past max_header_bytes = 8192.
        let (status, got, body) =
            curl_over(version, gw.http, "/many-cookies", &cookies(25)).unwrap();
        assert_eq!((status, got.as_str()), (431, version), "{body}");
        assert!(
            body.contains("cookies in the browser usually fixes it"),
            "HTTP/{version}: {body}"
        );
        assert!(body.contains("at most 8192"), "HTTP/{version}: {body}");
        // Ten of them, 4 KB, and a 6 KB header: forwarded.
        for (what, headers) in [
            ("ten cookies", cookies(10)),
            (
                "a 6 KB header",
                vec![format!("X-Big: {}", "a".repeat(6000))],
            ),
        ] {
            let (status, got, body) = curl_over(version, gw.http, "/ok", &headers).unwrap();
            assert_eq!(
                (status, got.as_str()),
                (200, version),
                "HTTP/{version}, {what}: {body}"
            );
        }
    }
    let targets: Vec<String> = up.take().into_iter().map(|r| r.target).collect();
    assert_eq!(targets, ["/ok"; 4], "what reached the VM");
    gw.assert_no_panic();
}

#[test]
fn oversized_headers_and_targets_get_431_and_414() {
    let up = Upstream::start("up-a");
    let gw = gateway(&[&up]);
    let long = |n: usize| "a".repeat(n);
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        // One 20 KB header, past max_header_bytes = 8192.
        (
            "a 20 KB header",
            request(
                "GET",
                "/big-header",
                &format!("X-Big: {}\r\n", long(20_000)),
            ),
            431,
        ),
        // Many small headers adding up past the limit.
        (
            "300 headers",
            request(
                "GET",
                "/many-headers",
                &(0..300)
                    .map(|i| format!("X-H{i}: {i}\r\n"))
                    .collect::<String>(),
            ),
            431,
        ),
        // A target past max_uri_bytes = 1024, within the header block.
        (
            "a 2 KB target",
            request("GET", &format!("/{}", long(2000)), ""),
            414,
        ),
        // A target past the whole header block: the block limit answers first.
        (
            "a 20 KB target",
            request("GET", &format!("/{}", long(20_000)), ""),
            431,
        ),
        // Just under the limits: forwarded.
        (
            "a 1000-byte target",
            request("GET", &format!("/{}", long(999)), ""),
            200,
        ),
        (
            "a 6 KB header",
            request("GET", "/ok-header", &format!("X-Big: {}\r\n", long(6000))),
            200,
        ),
    ];
    for (what, bytes, want) in cases {
        let (status, _, text) = raw(gw.http, &bytes);
        eprintln!("{what}: {status}");
        assert_eq!(
            status,
            want,
            "{what}: {}",
            text.lines().next().unwrap_or("")
        );
    }
    let seen = up.take();
    assert_eq!(
        seen.len(),
        2,
        "only the two requests within the limits reached the VM"
    );
    still_serves(&gw);
    gw.assert_no_panic();
}

#[test]
fn request_smuggling_attempts_never_reach_a_vm_as_two_requests() {
    let up = Upstream::start("up-a");
    let gw = gateway(&[&up]);
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: pool.example\r\n\r\n";
    let h = |s: &str| s.to_string();
    // (case, request head lines after Host, body, expected status)
    let cases: Vec<(&str, String, String, u16)> = vec![
        (
            // RFC 9112 §6.3: Transfer-Encoding overrides Content-Length; the Content-Length is
            // dropped and the connection closed after the response (hyper, like HAProxy), so
            // the bytes after the chunked body are never read as a request.
            "CL.TE: Content-Length and Transfer-Encoding",
            h("Content-Length: 6\r\nTransfer-Encoding: chunked\r\n"),
            format!("0\r\n\r\n{smuggled}"),
            200,
        ),
        (
            "TE.CL: Transfer-Encoding then Content-Length",
            h("Transfer-Encoding: chunked\r\nContent-Length: 3\r\n"),
            format!("8\r\nSMUGGLED\r\n0\r\n\r\n{smuggled}"),
            200,
        ),
        (
            "two different Content-Lengths",
            h("Content-Length: 5\r\nContent-Length: 40\r\n"),
            format!("hello{smuggled}"),
            400,
        ),
        (
            "Content-Length list with different values",
            h("Content-Length: 5, 40\r\n"),
            format!("hello{smuggled}"),
            400,
        ),
        (
            "obfuscated: Transfer-Encoding: xchunked",
            h("Transfer-Encoding: xchunked\r\nContent-Length: 5\r\n"),
            format!("hello{smuggled}"),
            400,
        ),
        (
            "obfuscated: chunked not last",
            h("Transfer-Encoding: chunked, identity\r\n"),
            format!("0\r\n\r\n{smuggled}"),
            400,
        ),
        (
            "obfuscated: space before the colon",
            h("Transfer-Encoding : chunked\r\nContent-Length: 5\r\n"),
            format!("hello{smuggled}"),
            400,
        ),
        (
            "obfuscated: Transfer-Encoding split over two lines",
            h("Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n"),
            format!("0\r\n\r\n{smuggled}"),
            400,
        ),
        (
            "obfuscated: obs-fold continuation line",
            h("X-A: b\r\n Transfer-Encoding: chunked\r\nContent-Length: 5\r\n"),
            format!("hello{smuggled}"),
            400,
        ),
        (
            "bad chunk size",
            h("Transfer-Encoding: chunked\r\n"),
            format!("zz\r\nhello\r\n0\r\n\r\n{smuggled}"),
            400,
        ),
        (
            "negative Content-Length",
            h("Content-Length: -1\r\n"),
            smuggled.to_string(),
            400,
        ),
    ];
    for (what, head, body, want) in &cases {
        let bytes = format!("POST /front HTTP/1.1\r\nHost: pool.example\r\n{head}\r\n{body}");
        let (status, responses, text) = raw(gw.http, bytes.as_bytes());
        let seen = up.take();
        eprintln!(
            "{what}: {status}, {responses} response(s), VM saw {:?}",
            seen.iter()
                .map(|s| (&s.method, &s.target, s.body.len()))
                .collect::<Vec<_>>()
        );
        assert_eq!(status, *want, "{what}: {text}");
        assert_eq!(
            responses, 1,
            "{what}: one response on the connection: {text}"
        );
        assert!(
            seen.iter().all(|s| s.target != "/smuggled"),
            "{what}: the smuggled request reached the VM: {seen:?}"
        );
        assert!(
            seen.len() <= 1,
            "{what}: the VM saw {} requests",
            seen.len()
        );
        if *want == 200 {
            // The VM got one well-framed request, and no trace of the conflicting framing.
            let s = &seen[0];
            assert_eq!((s.method.as_str(), s.target.as_str()), ("POST", "/front"));
            let framing = (s.header("content-length"), s.header("transfer-encoding"));
            assert!(
                framing.0.is_none() || framing.1.is_none(),
                "{what}: the VM got both framings: {framing:?}"
            );
        } else {
            assert!(
                seen.is_empty(),
                "{what}: a refused request reached the VM: {seen:?}"
            );
        }
    }
    // HTTP/1.0 with Transfer-Encoding (not defined there) is refused.
    let (status, _, _) = raw(
        gw.http,
        format!(
            "POST /front HTTP/1.0\r\nHost: pool.example\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
        )
        .as_bytes(),
    );
    assert_eq!(status, 400, "HTTP/1.0 with Transfer-Encoding");
    assert!(up.take().is_empty());
    still_serves(&gw);
    gw.assert_no_panic();
}

#[test]
fn path_tricks_are_refused_or_stay_on_the_pool_vm() {
    let up = Upstream::start("up-a");
    let gw = gateway(&[&up]);
    // (request line target, method, expected status, what the VM must see: None = nothing)
    // Dot segments and doubled slashes are forwarded verbatim: routing never depends on the
    // path, so they cannot leave the VM; normalising would change what the VM's own
    // (JupyterHub) checks see. Absolute-form targets and CONNECT would make the gateway a
    // forward proxy: refused before any VM is contacted.
    let cases: Vec<(&str, &str, u16, Option<&str>)> = vec![
        ("/../../etc/passwd", "GET", 200, Some("/../../etc/passwd")),
        (
            "/hub/%2e%2e/%2e%2e/etc/passwd",
            "GET",
            200,
            Some("/hub/%2e%2e/%2e%2e/etc/passwd"),
        ),
        ("/a/..%2f..%2fb", "GET", 200, Some("/a/..%2f..%2fb")),
        ("//evil.example/x", "GET", 200, Some("//evil.example/x")),
        (
            "/%0d%0aSet-Cookie:%20x=y",
            "GET",
            200,
            Some("/%0d%0aSet-Cookie:%20x=y"),
        ),
        ("http://evil.example/", "GET", 400, None),
        ("http://127.0.0.1:22/", "GET", 400, None),
        ("https://pool.example/hub/", "GET", 400, None),
        ("evil.example:443", "CONNECT", 405, None),
        ("127.0.0.1:22", "CONNECT", 405, None),
        ("*", "OPTIONS", 400, None),
        ("@evil.example/x", "GET", 400, None),
        ("evil.example/x", "GET", 400, None),
    ];
    for (target, method, want, vm_sees) in cases {
        let (status, _, text) = raw(gw.http, &request(method, target, ""));
        let seen = up.take();
        eprintln!(
            "{method} {target}: {status}; VM saw {:?}",
            seen.iter().map(|s| &s.target).collect::<Vec<_>>()
        );
        assert_eq!(
            status,
            want,
            "{method} {target}: {}",
            text.lines().next().unwrap_or("")
        );
        match vm_sees {
            Some(path) => {
                assert_eq!(seen.len(), 1, "{method} {target}");
                assert_eq!(
                    seen[0].target, path,
                    "{method} {target}: forwarded verbatim"
                );
                assert_eq!(seen[0].header("host"), Some("pool.example"));
            }
            None => assert!(
                seen.is_empty(),
                "{method} {target} reached the VM: {seen:?}"
            ),
        }
    }
    // A raw CR/LF in the request line is a parse error, not a second request.
    let (status, responses, _) = raw(
        gw.http,
        b"GET /a\rSet-Cookie: x HTTP/1.1\r\nHost: pool.example\r\nConnection: close\r\n\r\n",
    );
    assert_eq!((status, responses), (400, 1));
    // A Host naming another site still reaches only the pool VM.
    let (status, _, text) = raw(
        gw.http,
        b"GET /host HTTP/1.1\r\nHost: evil.example:22\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("vm=up-a saw GET /host"), "{text}");
    assert_eq!(up.take()[0].header("host"), Some("evil.example:22"));
    still_serves(&gw);
    gw.assert_no_panic();
}

/// HMAC-SHA256 (RFC 2104), to sign cookies with the gateway's own secret.
fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |x: u8| k.iter().map(|b| b ^ x).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .to_vec()
}

/// A sticky cookie value as the gateway makes it: `b64(vm).issued.b64(sid).b64(hmac)`.
fn sign_cookie(key: &[u8], vm: &str, issued: u64, sid: &[u8]) -> String {
    let b64 = |b: &[u8]| data_encoding::BASE64URL_NOPAD.encode(b);
    let signed = format!("{}.{issued}.{}", b64(vm.as_bytes()), b64(sid));
    format!("{signed}.{}", b64(&hmac_sha256(key, signed.as_bytes())))
}

/// Whether `value` carries a valid signature under `key`.
fn cookie_signed_by(key: &[u8], value: &str) -> bool {
    let Some((signed, tag)) = value.rsplit_once('.') else {
        return false;
    };
    data_encoding::BASE64URL_NOPAD.encode(&hmac_sha256(key, signed.as_bytes())) == tag
}

/// (VM that answered, `poolgate_vm` value set by the response if any) for a GET with `cookie`.
fn with_cookie(gw: &GatewayPool, cookie: &[u8]) -> (String, Option<String>) {
    let mut req = b"GET /cookie HTTP/1.1\r\nHost: pool.example\r\nCookie: ".to_vec();
    req.extend_from_slice(cookie);
    req.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
    let (status, _, text) = raw(gw.http, &req);
    assert_eq!(status, 200, "{text}");
    let vm = text
        .rsplit_once("vm=")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or_default()
        .to_string();
    let set = text.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        if !name.eq_ignore_ascii_case("set-cookie") {
            return None;
        }
        let v = value.trim().strip_prefix("poolgate_vm=")?;
        Some(v.split(';').next()?.to_string())
    });
    (vm, set)
}

#[test]
fn malformed_forged_tampered_and_expired_cookies_are_ignored_and_the_browser_re_picked() {
    let (a, b) = (Upstream::start("up-a"), Upstream::start("up-b"));
    // Tentative load lasts an hour here, so none of it lapses while the test runs and the model
    // below stays exact.
    let gw = gateway_with(&[&a, &b], &["tentative_for = \"1h\""]);
    // The gateway's own cookie secret: valid signatures on bad contents are tested too.
    let secret = std::fs::read(gw.gateway.dir().join("keys/cookie_secret")).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let sid = [7u8; 16];

    // A request without a (valid) cookie goes to the least-loaded VM and weighs on it as
    // tentative load (`http.tentative_for`), so the next such request goes to the other VM when
    // their loads differ, else to the first by name. The model of that says where a re-picked
    // request must land; each bad cookie below names the *other* VM, so a gateway that trusted
    // it would answer from the wrong one.
    let mut tentative = std::collections::BTreeMap::from([("up-a", 0u32), ("up-b", 0u32)]);
    let mut next_pick = move || {
        let pick = if tentative["up-a"] <= tentative["up-b"] {
            "up-a"
        } else {
            "up-b"
        };
        *tentative.entry(pick).or_default() += 1;
        pick
    };
    let other_than = |vm: &str| if vm == "up-a" { "up-b" } else { "up-a" };

    let expected = next_pick();
    let (picked, set) = with_cookie(&gw, b"other=1");
    assert_eq!(
        picked, expected,
        "a first request goes to the least-loaded VM"
    );
    let first = set.expect("a first response sets the sticky cookie");
    assert_eq!(cookie_vm(&first), picked);
    assert!(cookie_signed_by(&secret, &first));

    let b64 = |s: &str| data_encoding::BASE64URL_NOPAD.encode(s.as_bytes());
    // Each case: its name and the cookie, given the VM it must name (the one it must NOT land
    // on) and the VM it must land on.
    type Case<'a> = (&'a str, Box<dyn Fn(&str, &str) -> Vec<u8> + 'a>);
    let valid = |vm: &str| sign_cookie(&secret, vm, now, &sid);
    let cases: Vec<Case> = vec![
        ("garbage", Box::new(|_, _| b"poolgate_vm=garbage".to_vec())),
        ("empty", Box::new(|_, _| b"poolgate_vm=".to_vec())),
        (
            "5000 bytes",
            Box::new(|_, _| format!("poolgate_vm={}", "A".repeat(5000)).into_bytes()),
        ),
        (
            "too many fields",
            Box::new(|_, _| b"poolgate_vm=a.b.c.d.e.f".to_vec()),
        ),
        (
            "not base64",
            Box::new(|_, _| b"poolgate_vm=!!.1.!!.!!".to_vec()),
        ),
        (
            "non-ASCII bytes",
            Box::new(|_, _| b"poolgate_vm=\xff\xfe.1.2.3".to_vec()),
        ),
        (
            "forged: signed with another key",
            Box::new(|named, _| {
                format!(
                    "poolgate_vm={}",
                    sign_cookie(b"not the gateway's secret", named, now, &sid)
                )
                .into_bytes()
            }),
        ),
        (
            "tampered: VM name swapped under a valid tag",
            Box::new(|named, lands| {
                let v = valid(lands);
                let (head, tag) = v.rsplit_once('.').unwrap();
                let fields: Vec<&str> = head.split('.').collect();
                format!(
                    "poolgate_vm={}.{}.{}.{tag}",
                    b64(named),
                    fields[1],
                    fields[2]
                )
                .into_bytes()
            }),
        ),
        (
            "tampered: issue time changed",
            Box::new(|named, _| {
                let v = valid(named);
                let (head, tag) = v.rsplit_once('.').unwrap();
                let fields: Vec<&str> = head.split('.').collect();
                format!("poolgate_vm={}.{}.{}.{tag}", fields[0], now + 1, fields[2]).into_bytes()
            }),
        ),
        (
            "tampered: tag truncated",
            Box::new(|named, _| {
                let v = valid(named);
                format!("poolgate_vm={}", &v[..v.len() - 4]).into_bytes()
            }),
        ),
        (
            "expired (13 h old, affinity_ttl 12 h), valid signature",
            Box::new(|named, _| {
                format!(
                    "poolgate_vm={}",
                    sign_cookie(&secret, named, now - 13 * 3600, &sid)
                )
                .into_bytes()
            }),
        ),
        (
            "issued an hour in the future, valid signature",
            Box::new(|named, _| {
                format!(
                    "poolgate_vm={}",
                    sign_cookie(&secret, named, now + 3600, &sid)
                )
                .into_bytes()
            }),
        ),
        (
            "short session id, valid signature",
            Box::new(|named, _| {
                format!(
                    "poolgate_vm={}",
                    sign_cookie(&secret, named, now, &[1u8; 4])
                )
                .into_bytes()
            }),
        ),
        (
            "forged first, valid second: the first counts",
            Box::new(|named, _| {
                format!(
                    "poolgate_vm={}; poolgate_vm={}",
                    sign_cookie(b"not the gateway's secret", named, now, &sid),
                    valid(named)
                )
                .into_bytes()
            }),
        ),
    ];
    let mut fresh = None;
    for (what, cookie) in &cases {
        let lands = next_pick();
        let named = other_than(lands);
        let (vm, set) = with_cookie(&gw, &cookie(named, lands));
        eprintln!("{what}: answered by {vm}, new cookie: {}", set.is_some());
        assert_eq!(
            vm, lands,
            "{what}: re-picked like a browser without a cookie (the cookie named {named})"
        );
        let set = set.unwrap_or_else(|| panic!("{what}: no new cookie set"));
        assert_eq!(cookie_vm(&set), lands, "{what}");
        assert!(
            cookie_signed_by(&secret, &set),
            "{what}: the new cookie is signed"
        );
        fresh = Some(set);
    }
    // The new cookie is honoured: same VM, nothing re-issued.
    let fresh = fresh.unwrap();
    let fresh_vm = cookie_vm(&fresh);
    let (vm, set) = with_cookie(&gw, format!("poolgate_vm={fresh}").as_bytes());
    assert_eq!((vm.as_str(), set), (fresh_vm.as_str(), None));
    // Control: a valid cookie for either VM is obeyed, so the cases above were refused for what
    // they were, not because cookies are ignored.
    for vm_named in ["up-a", "up-b"] {
        let (vm, set) = with_cookie(&gw, format!("poolgate_vm={}", valid(vm_named)).as_bytes());
        assert_eq!((vm.as_str(), set), (vm_named, None));
    }
    // A validly signed cookie naming a VM that is not in the pool (deleted, or a name never
    // issued): routed to a pool VM and re-pinned there. Its session now counts as load, so it
    // comes last.
    let evil = sign_cookie(&secret, "evil-vm", now, &[9u8; 16]);
    let (vm, set) = with_cookie(&gw, format!("poolgate_vm={evil}").as_bytes());
    let set = set.expect("re-pinned");
    assert!(vm == "up-a" || vm == "up-b", "{vm}");
    assert_eq!(cookie_vm(&set), vm);
    assert!(cookie_signed_by(&secret, &set));
    still_serves(&gw);
    gw.assert_no_panic();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_https_listener_is_closed_at_once() {
    let up = Upstream::start("up-a");
    let gw = GatewayPool::builder()
        .web_pool(HEALTH)
        .tls()
        .http_option(&format!("idle_timeout = \"{}s\"", IDLE.as_secs()))
        .web_vm(&up.name, up.port)
        .start();
    let mut half_hello = vec![
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    half_hello.extend_from_slice(&[0x42; 100]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "plain HTTP to the TLS port",
            b"GET / HTTP/1.1\r\nHost: pool.example\r\n\r\n".to_vec(),
        ),
        (
            "random bytes",
            (0..4096u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
                .collect(),
        ),
        (
            "a TLS record header with a 64 KiB length",
            vec![0x16, 0x03, 0x01, 0xff, 0xff, 0x01],
        ),
        ("SSH banner", b"SSH-2.0-OpenSSH_9.9\r\n".to_vec()),
    ];
    let addr = gw.https;
    let fates = tokio::task::spawn_blocking(move || {
        cases
            .into_iter()
            .map(|(what, bytes)| {
                let t0 = Instant::now();
                let mut s = TcpStream::connect(addr).unwrap();
                let _ = s.write_all(&bytes);
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink);
                (what, t0.elapsed(), sink.len())
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for (what, after, answer_bytes) in fates {
        eprintln!("{what}: closed after {after:?} ({answer_bytes} bytes answered)");
        assert!(after < Duration::from_secs(2), "{what}: {after:?}");
    }
    // The listener still serves real browsers.
    let b = gw.browser();
    let r = b.get("/after-garbage").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("saw GET /after-garbage"), "{}", r.text());
    assert!(up.take().iter().all(|s| s.target == "/after-garbage"));
    gw.assert_no_panic();
}

/// A VM whose web server answers in HTTP/1.0: an HTTP/1.1 client gets HTTP/1.1 from the
/// gateway (which speaks its own version, RFC 9110 section 6.2) and keeps its connection.
#[test]
fn an_http_1_0_upstream_is_answered_to_clients_in_the_gateways_own_version() {
    let up = Upstream::start("vm-a");
    let gw = gateway(&[&up]);
    let mut s = TcpStream::connect(gw.http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    for i in 0..2 {
        s.write_all(format!("GET /http10-{i} HTTP/1.1\r\nHost: pool.example\r\n\r\n").as_bytes())
            .unwrap();
        let text = read_one_response(&mut s);
        assert!(
            text.starts_with("HTTP/1.1 200 OK\r\n"),
            "request {i}: {text}"
        );
        assert!(text.contains(&format!("saw GET /http10-{i}")), "{text}");
    }
    gw.assert_no_panic();
}

/// Reads one `Content-Length` response from a keep-alive connection; returns its text.
fn read_one_response(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            s.read(&mut byte).unwrap(),
            1,
            "connection closed mid-response"
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .expect("Content-Length");
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    head + &String::from_utf8_lossy(&body)
}

#[test]
fn past_max_connections_new_clients_wait_until_a_connection_closes() {
    const MAX: usize = 3;
    let up = Upstream::start("up-a");
    let gw = GatewayPool::builder()
        .web_pool(HEALTH)
        .http_option("idle_timeout = \"60s\"")
        .http_option(&format!("max_connections = {MAX}"))
        .web_vm(&up.name, up.port)
        .start();
    // MAX keep-alive connections, each served once and then held open.
    let mut held: Vec<TcpStream> = (0..MAX)
        .map(|i| {
            let mut s = TcpStream::connect(gw.http).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(format!("GET /held-{i} HTTP/1.1\r\nHost: pool.example\r\n\r\n").as_bytes())
                .unwrap();
            let text = read_one_response(&mut s);
            assert!(text.contains(&format!("saw GET /held-{i}")), "{text}");
            s
        })
        .collect();
    gw.gateway
        .wait_for_log("HTTP connection limit reached", Duration::from_secs(10));

    // One more: the kernel completes the TCP handshake (listen backlog), but the gateway does
    // not serve it while MAX connections are open.
    let mut waiting = TcpStream::connect(gw.http).unwrap();
    waiting.write_all(&request("GET", "/waiting", "")).unwrap();
    waiting
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let mut byte = [0u8; 1];
    match waiting.read(&mut byte) {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        other => panic!("a connection past max_connections was served or closed: {other:?}"),
    }
    assert!(
        up.take().iter().all(|s| s.target != "/waiting"),
        "the waiting request reached the VM"
    );

    // One held connection closes: the waiting client is served at once.
    let closed_at = Instant::now();
    drop(held.pop());
    waiting
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut text = Vec::new();
    waiting.read_to_end(&mut text).unwrap();
    let text = String::from_utf8_lossy(&text);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("saw GET /waiting"), "{text}");
    println!(
        "waiting client served {:?} after a held connection closed",
        closed_at.elapsed()
    );
    // The connections still held keep working.
    for (i, s) in held.iter_mut().enumerate() {
        s.write_all(format!("GET /again-{i} HTTP/1.1\r\nHost: pool.example\r\n\r\n").as_bytes())
            .unwrap();
        let text = read_one_response(s);
        assert!(text.contains(&format!("saw GET /again-{i}")), "{text}");
    }
    gw.assert_no_panic();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_1_0_client_over_tls_is_served() {
    require_tools!("curl");
    let (_up, gw) = one_tls_upstream();
    // curl --http1.0 offers only `http/1.0` in ALPN, as old probes do; a server that does not
    // list it fails the handshake ("no application protocol").
    let port = gw.https.port();
    let mut cmd = std::process::Command::new(tool("curl"));
    cmd.args(["-sS", "-i", "--http1.0", "--max-time", "10", "--cacert"])
        .arg(gw.tls_ca().ca_path())
        .arg("--resolve")
        .arg(format!("localhost:{port}:127.0.0.1"))
        .arg(format!("https://localhost:{port}/old-probe"));
    let out =
        tokio::task::spawn_blocking(move || run_with_timeout(&mut cmd, Duration::from_secs(20)))
            .await
            .unwrap();
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    assert!(text.starts_with("HTTP/1.0 200"), "{text}");
    assert!(text.contains("saw GET /old-probe"), "{text}");
    gw.assert_no_panic();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_naming_an_ip_address_in_sni_leave_no_warning_per_handshake() {
    require_tools!("openssl");
    let (_up, gw) = one_tls_upstream();
    // An IP address as the TLS server name (RFC 6066 forbids it; load balancers' probes and
    // clients that connect by address send it): rustls ignores it and says so at `warn`.
    let addr = gw.https;
    tokio::task::spawn_blocking(move || {
        for _ in 0..5 {
            let mut cmd = std::process::Command::new(tool("openssl"));
            cmd.args(["s_client", "-brief", "-connect"])
                .arg(addr.to_string())
                .args(["-servername", "127.0.0.1"])
                .stdin(std::process::Stdio::null());
            let out = run_with_timeout(&mut cmd, Duration::from_secs(10));
            assert!(
                stderr(&out).contains("CONNECTION ESTABLISHED"),
                "{}",
                stderr(&out)
            );
        }
    })
    .await
    .unwrap();
    // The default log (info): nothing per handshake.
    let b = gw.browser();
    assert_eq!(b.get("/after").await.status, 200);
    let log = gw.log();
    assert!(!log.contains("SNI"), "{log}");
    gw.assert_no_panic();
}

/// A gateway with HTTPS and its defaults in front of one recording upstream (kept running by
/// the returned handle).
fn one_tls_upstream() -> (Upstream, GatewayPool) {
    let up = Upstream::start("up-a");
    let gw = GatewayPool::builder()
        .web_pool(HEALTH)
        .tls()
        .web_vm(&up.name, up.port)
        .start();
    (up, gw)
}
