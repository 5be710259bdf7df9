//! `listen.proxy_protocol`: poolgate behind a real HAProxy in TCP mode that opens each
//! connection with a PROXY protocol header: the example configuration shipped in
//! `deploy/haproxy/haproxy.cfg` (`send-proxy-v2`, health from the admin listener's `/healthz`)
//! in front of SSH and HTTP, and the text version 1 (`send-proxy`) in front of HTTP. Without it every client arrives from the balancer's
//! address: one user's failed logins put the balancer, so every user, in the login penalty box,
//! and logs name the balancer. Clients here connect from their own loopback addresses
//! (127.0.0.2, 127.0.0.3) so that the balancer's (127.0.0.1) is told apart from theirs.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use poolgate_tests::*;

/// Users logging in at once through the balancer (the team at 9:00).
const BURST: usize = 20;

/// A child process killed and reaped when dropped.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A client of `user` through the balancer `lb` (its SSH frontend), trusting the gateway's
/// host key there.
fn through(lb: &Haproxy, known_hosts: &KnownHosts, user: &str) -> SshClient {
    SshClient::new(user, lb.port(), known_hosts.path()).timeout(Duration::from_secs(40))
}

#[test]
fn behind_haproxy_each_client_is_seen_and_one_clients_failed_logins_lock_out_only_that_client() {
    require_tools!("sshd", "ssh", "ssh-keygen", "haproxy", "curl", "python3");
    require_root!();
    // The VM's web side: a plain web server that lists its directory at `/`.
    let web_dir = tempfile::tempdir().expect("temp dir");
    let web_port = free_port();
    let _web = Reaped(
        Command::new(tool("python3"))
            .args([
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                &web_port.to_string(),
            ])
            .current_dir(web_dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn python3 -m http.server"),
    );
    wait_for_port(
        SocketAddr::from(([127, 0, 0, 1], web_port)),
        Duration::from_secs(20),
    );

    let pool = GatewayPool::builder()
        .vm_with_http_port("vm-a", web_port)
        .vm("vm-b")
        .vm("vm-c")
        .web_probe("/")
        .users(BURST)
        .tls()
        .listen_option("proxy_protocol = true")
        .start();
    // The example the project ships (deploy/haproxy/haproxy.cfg), as written but for its
    // addresses.
    let (ssh_lb_port, http_lb_port, https_lb_port) = (free_port(), free_port(), free_port());
    let shipped = std::fs::read_to_string(workspace_dir().join("deploy/haproxy/haproxy.cfg"))
        .expect("read deploy/haproxy/haproxy.cfg");
    let config = shipped
        .replace("bind :22", &format!("bind 127.0.0.1:{ssh_lb_port}"))
        .replace("bind :80", &format!("bind 127.0.0.1:{http_lb_port}"))
        .replace("bind :443", &format!("bind 127.0.0.1:{https_lb_port}"))
        .replace("port 9090", &format!("port {}", pool.admin.port()))
        .replace("10.0.0.10:2222", &format!("127.0.0.1:{}", pool.ssh_port))
        .replace("10.0.0.10:8080", &pool.http.to_string())
        .replace("10.0.0.10:8443", &pool.https.to_string())
        .lines()
        .filter(|l| !l.contains("10.0.0.11"))
        .map(|l| format!("{l}\n"))
        .collect::<String>();
    assert_ne!(
        config, shipped,
        "the example's addresses moved: update this test"
    );
    let ssh_lb = Haproxy::with_config(&config, ssh_lb_port, &[http_lb_port, https_lb_port]);
    // The text version of the header, in front of HTTPS.
    let https_lb_v1 = Haproxy::tcp_with(&[pool.https], "send-proxy");
    // The gateway's host key, as users reach it: at the balancer's port.
    let known = std::fs::read_to_string(pool.known_hosts()).expect("read known_hosts");
    let key_line = known
        .lines()
        .next()
        .and_then(|l| l.split_once(' '))
        .map(|(_, key)| key.to_owned())
        .expect("the gateway's host key line");
    let known_hosts = KnownHosts::new();
    known_hosts.add_line(&format!("[127.0.0.1]:{} {key_line}", ssh_lb.port()));

    // A login through the balancer is logged with the client's own address.
    let alice = pool.user(1);
    let out = through(&ssh_lb, &known_hosts, &alice)
        .user_key(pool.key(1))
        .ssh_command(&["-b", "127.0.0.2"], Some("echo on $POOLGATE_VM"))
        .output()
        .expect("ssh");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("on vm-"),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        pool.log()
    );
    let routed = pool
        .gateway
        .log_line("session routed", Duration::from_secs(5));
    assert!(
        routed.contains("client=127.0.0.2:"),
        "the session is logged with the balancer's address, not the client's: {routed}"
    );

    // Someone at 127.0.0.3 tries keys the gateway does not know until the penalty box takes
    // their address (more than 10 failures within a minute).
    let stranger = UserKey::generate("not anyone's key");
    let mut refused = 0;
    for _ in 0..12 {
        let out = through(&ssh_lb, &known_hosts, &alice)
            .user_key(&stranger)
            .ssh_command(&["-b", "127.0.0.3"], Some("true"))
            .output()
            .expect("ssh");
        assert_eq!(out.status.code(), Some(255), "a key nobody listed got in");
        refused += 1;
    }
    let boxed = pool.gateway.log_line(
        "too many failed logins from this address",
        Duration::from_secs(5),
    );
    assert!(
        boxed.contains("client=127.0.0.3"),
        "the penalty box took the wrong address: {boxed}"
    );
    eprintln!("{refused} refused logins put 127.0.0.3 in the penalty box");

    // The boxed address does not get in now, even with a good key (checked at once, well
    // within its 30 s in the box).
    let out = through(&ssh_lb, &known_hosts, &alice)
        .user_key(pool.key(1))
        .ssh_command(&["-b", "127.0.0.3"], Some("true"))
        .output()
        .expect("ssh");
    assert_eq!(out.status.code(), Some(255), "the boxed address got in");

    // Everyone else still gets in, twenty at once, through the same balancer.
    let logins: Vec<_> = (1..=BURST)
        .map(|i| {
            through(&ssh_lb, &known_hosts, &pool.user(i))
                .user_key(pool.key(i))
                .ssh_command(&["-b", "127.0.0.2"], Some("echo on $POOLGATE_VM"))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn ssh")
        })
        .collect();
    for (i, child) in logins.into_iter().enumerate() {
        let out = child.wait_with_output().expect("ssh");
        assert!(
            String::from_utf8_lossy(&out.stdout).starts_with("on vm-"),
            "user {}: {}\n{}",
            i + 1,
            String::from_utf8_lossy(&out.stderr),
            pool.log()
        );
    }
    // HTTPS through the balancer, with either version of the header: the access log names the
    // client, and the VM answers (its 404 for a file it does not have).
    let curl = |args: &[&str]| {
        run_with_timeout(
            Command::new(tool("curl"))
                .args(["-sS", "--max-time", "20", "--interface", "127.0.0.2"])
                .args(args),
            Duration::from_secs(30),
        )
    };
    let ca = pool.tls_ca().ca_path();
    for (lb_port, path) in [
        (https_lb_port, "/pg-proxied-v2"),
        (https_lb_v1.port(), "/pg-proxied-v1"),
    ] {
        let out = curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--cacert",
            &ca.display().to_string(),
            "--resolve",
            &format!("localhost:{lb_port}:127.0.0.1"),
            &format!("https://localhost:{lb_port}{path}"),
        ]);
        assert_eq!(
            stdout(&out).trim(),
            "404",
            "{path}: {out:?}\n{}",
            pool.log()
        );
        let line = pool.gateway.log_line(path, Duration::from_secs(5));
        assert!(
            line.contains("client=127.0.0.2:"),
            "the access log names the balancer, not the client: {line}"
        );
    }
    // Plain HTTP through the balancer is sent to HTTPS.
    let out = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{redirect_url}",
        &format!("http://localhost:{http_lb_port}/pg-plain"),
    ]);
    assert!(
        stdout(&out).starts_with("308 https://localhost:"),
        "{out:?}\n{}",
        pool.log()
    );

    // A connection that sends nothing (a balancer's TCP health check, as the second HAProxy's
    // on the HTTPS listener; here also one made by hand) is no complaint; a client that
    // bypasses the balancer is closed with one line that says what is wrong: the warning
    // names the client's own first bytes, so the silent connection before it did not take
    // the warning's once-a-minute turn.
    drop(std::net::TcpStream::connect(("127.0.0.1", pool.ssh_port)).expect("connect"));
    let log = pool.log();
    assert!(!log.contains("no PROXY protocol header"), "{log}");
    let direct = SshClient::new(&alice, pool.ssh_port, pool.known_hosts())
        .user_key(pool.key(1))
        .run("true");
    assert_eq!(
        direct.status.code(),
        Some(255),
        "a connection without the header got in"
    );
    let warned = pool
        .gateway
        .log_line("no PROXY protocol header", Duration::from_secs(5));
    assert!(
        warned.contains("WARN")
            && warned.contains("send-proxy-v2")
            && warned.contains("starts with \"SSH-2\""),
        "{warned}"
    );
    pool.assert_no_panic();
}
