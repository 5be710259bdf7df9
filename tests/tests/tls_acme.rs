//! ACME certificates for the HTTPS front door (`[tls] acme_domains`), end to end against a real
//! Pebble (Let's Encrypt's test CA, Debian `pebble`) on loopback. Pebble's DNS server
//! (`pebble-challtestsrv`) resolves `pool.poolgate.test` to 127.0.0.1, so its HTTP-01
//! validation really fetches `/.well-known/acme-challenge/TOKEN` from the gateway's
//! `listen.http`. The gateway's one VM is never reached (nothing listens there): HTTPS requests
//! get the gateway's own 503 page, which is all these tests need from the web side.
//!
//! - the smallest config gets a certificate whose chain verifies against Pebble's root, the
//!   cache holds 0600 files in 0700 directories, the expiry metric counts down;
//! - a restart serves the cached certificate at once and orders nothing;
//! - 20 HTTPS clients at once right after the certificate arrives all succeed;
//! - a short-lived certificate is renewed and swapped while an open connection keeps working;
//! - an unreachable directory is one clear error per attempt, and SSH and HTTP still serve;
//! - `check-config` refuses certificate files and ACME together, naming the keys.

// Test code: a failed step should abort the test at once (as in tests/src/lib.rs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use poolgate_tests::*;

const DOMAIN: &str = "pool.poolgate.test";
/// Pebble validates and issues within a second or two here; generous for a loaded CI machine.
const ISSUED_WITHIN: Duration = Duration::from_secs(30);

/// A gateway directory with listeners on free ports and one static VM nobody listens on.
struct Setup {
    dir: tempfile::TempDir,
    ssh: SocketAddr,
    http: SocketAddr,
    https: SocketAddr,
    admin: SocketAddr,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("poolgate-acme-")
            .tempdir()
            .expect("temp dir");
        std::fs::create_dir_all(dir.path().join("keys")).unwrap();
        std::fs::write(
            dir.path().join("keys/backend_known_hosts"),
            "[127.0.0.1]:2 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n",
        )
        .unwrap();
        let addr = || SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        Self {
            dir,
            ssh: addr(),
            http: addr(),
            https: addr(),
            admin: addr(),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The listeners, the VM and `tls` as the `[tls]` section.
    fn config(&self, tls: &str) -> String {
        format!(
            "[listen]\nssh = \"{}\"\nhttp = \"{}\"\nhttps = \"{}\"\nadmin = \"{}\"\n\n\
             [[pool.backends]]\nname = \"vm-1\"\nhost = \"127.0.0.1\"\nssh_port = 2\nhttp_port = 3\n\n\
             [tls]\n{tls}",
            self.ssh, self.http, self.https, self.admin
        )
    }

    /// The smallest ACME `[tls]` a user writes for Pebble: the name, the directory and the
    /// CA of Pebble's HTTPS (everything else at its default).
    fn acme_config(&self, pebble: &Pebble) -> String {
        self.config(&format!(
            "acme_domains = [\"{DOMAIN}\"]\nacme_directory = \"{}\"\nacme_directory_ca = \"{}\"\n",
            pebble.directory_url(),
            pebble.https_ca_path().display()
        ))
    }

    fn start(&self, config: &str) -> GatewayProcess {
        GatewayProcess::builder(config)
            .dir(self.path())
            .env("NO_COLOR", "1")
            .wait_for(self.ssh)
            .wait_for(self.admin)
            .start()
    }

    fn metrics(&self) -> String {
        http_get(self.admin, "/metrics").body
    }
}

/// A TLS client trusting only `root_pem`, speaking HTTP/1.1, never resuming a session.
fn client_config(root_pem: &str) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(root_pem.as_bytes()).expect("root PEM"))
        .expect("add root");
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Full handshakes only: a resumed session would not show the certificate served now.
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// A keep-alive HTTPS connection to the gateway for `DOMAIN`, its chain verified by rustls.
struct Https {
    stream: BufReader<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>,
}

impl Https {
    fn connect(addr: SocketAddr, config: &Arc<rustls::ClientConfig>) -> Result<Self, String> {
        let name = rustls::pki_types::ServerName::try_from(DOMAIN).unwrap();
        let conn =
            rustls::ClientConnection::new(config.clone(), name).map_err(|e| e.to_string())?;
        let tcp = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
        tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        while tls.conn.is_handshaking() {
            tls.conn
                .complete_io(&mut tls.sock)
                .map_err(|e| format!("TLS handshake: {e}"))?;
        }
        Ok(Self {
            stream: BufReader::new(tls),
        })
    }

    /// The DER of the certificate the gateway presented.
    fn leaf(&self) -> Vec<u8> {
        self.stream.get_ref().conn.peer_certificates().unwrap()[0].to_vec()
    }

    /// One `GET /` on this connection; the status line.
    fn get(&mut self) -> Result<String, String> {
        let req = format!("GET / HTTP/1.1\r\nHost: {DOMAIN}\r\nUser-Agent: poolgate-test\r\n\r\n");
        let tls = self.stream.get_mut();
        tls.write_all(req.as_bytes())
            .and_then(|()| tls.flush())
            .map_err(|e| format!("send: {e}"))?;
        let mut status = String::new();
        self.stream
            .read_line(&mut status)
            .map_err(|e| format!("read: {e}"))?;
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            self.stream
                .read_line(&mut line)
                .map_err(|e| format!("read: {e}"))?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        self.stream
            .read_exact(&mut body)
            .map_err(|e| format!("read body: {e}"))?;
        if !status.starts_with("HTTP/1.1 ") {
            return Err(format!("not an HTTP response: {status:?}"));
        }
        Ok(status.trim_end().to_owned())
    }
}

/// Every file under `dir` is 0600 and every directory 0700.
fn assert_private(dir: &Path) {
    let mode = std::fs::metadata(dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "{} is {mode:o}", dir.display());
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            assert_private(&path);
        } else {
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{} is {mode:o}", path.display());
        }
    }
}

fn expiry_seconds(metrics: &str) -> Option<f64> {
    sample(metrics, "poolgate_tls_cert_expiry_seconds{source=\"acme\"}")
}

fn acme_lines(log: &str, needle: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("ACME:") && l.contains(needle))
        .count()
}

#[test]
fn the_smallest_acme_config_gets_a_certificate_that_verifies_against_pebbles_root() {
    require_tools!("pebble", "pebble-challtestsrv");
    let setup = Setup::new();
    let pebble = Pebble::start(setup.http.port(), None);
    let config = setup.acme_config(&pebble);
    assert!(!config.contains("acme_cache") && !config.contains("acme_email"));
    let started = Instant::now();
    let gateway = setup.start(&config);
    gateway.wait_for_log("ACME: new certificate installed", ISSUED_WITHIN);
    eprintln!("certificate installed {:?} after start", started.elapsed());

    // The chain verifies against Pebble's root for the name (rustls checks both).
    let roots = client_config(pebble.root_pem());
    let mut conn = Https::connect(setup.https, &roots).expect("HTTPS with Pebble's root");
    assert_eq!(conn.get().unwrap(), "HTTP/1.1 503 Service Unavailable");
    // A client that trusts something else refuses it.
    let other = jupyter::TestCa::generate();
    let err = Https::connect(setup.https, &other.client_config()).err();
    assert!(
        err.as_deref().is_some_and(|e| e.contains("UnknownIssuer")),
        "{err:?}"
    );

    // Pebble validated for real: its log shows the HTTP-01 fetch from the gateway's port.
    let log = pebble.log();
    assert!(
        log.contains(&format!(
            "Attempting to validate w/ HTTP: http://{DOMAIN}:{}/.well-known/acme-challenge/",
            setup.http.port()
        )),
        "{log}"
    );
    assert_eq!((pebble.orders(), pebble.issued()), (1, 1), "{log}");

    // The plain listener still redirects, and unknown challenge tokens are 404.
    let resp = http_get(setup.http, "/hub/");
    assert_eq!(resp.status, 308, "{resp:?}");
    let resp = http_get(setup.http, "/.well-known/acme-challenge/unknown-token");
    assert_eq!(resp.status, 404, "{resp:?}");

    // Default cache: `acme` next to the config; 0700 directories, 0600 files.
    let cache = setup.path().join("acme");
    let sub: Vec<_> = std::fs::read_dir(&cache).unwrap().collect();
    assert_eq!(sub.len(), 1, "one directory per ACME server");
    let sub = sub.into_iter().next().unwrap().unwrap().path();
    for file in ["account.json", "cert.pem", "key.pem"] {
        assert!(sub.join(file).is_file(), "{file} in {}", sub.display());
    }
    assert_private(&cache);
    // The account key is not in the log.
    let account: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sub.join("account.json")).unwrap()).unwrap();
    let key = account["key_pkcs8"]
        .as_str()
        .expect("account key in account.json");
    assert!(!gateway.log_text().contains(key));

    // The expiry gauge: Pebble's default validity is years.
    let left = expiry_seconds(&setup.metrics()).expect("expiry metric");
    assert!(left > 300.0 * 86400.0, "{left}");
}

#[test]
fn a_restart_serves_the_cached_certificate_without_a_new_order() {
    require_tools!("pebble", "pebble-challtestsrv");
    let setup = Setup::new();
    let pebble = Pebble::start(setup.http.port(), None);
    let config = setup.acme_config(&pebble);
    let mut gateway = setup.start(&config);
    gateway.wait_for_log("ACME: new certificate installed", ISSUED_WITHIN);
    let roots = client_config(pebble.root_pem());
    let first = Https::connect(setup.https, &roots).unwrap().leaf();
    gateway.terminate(Duration::from_secs(20));
    assert_eq!((pebble.orders(), pebble.issued()), (1, 1));

    std::fs::rename(
        setup.path().join("poolgate.log"),
        setup.path().join("first.log"),
    )
    .unwrap();
    let gateway = setup.start(&config);
    // Served from the first handshake: the cache is loaded before the listeners open.
    let mut conn = Https::connect(setup.https, &roots).expect("HTTPS right after restart");
    assert_eq!(conn.leaf(), first, "the cached certificate");
    conn.get().unwrap();
    let log = gateway.log_text();
    assert!(
        log.contains("ACME: serving the cached certificate"),
        "{log}"
    );
    // No order: the renewal is years away. Give an order the time it took the first time.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        (pebble.orders(), pebble.issued()),
        (1, 1),
        "{}",
        pebble.log()
    );
    let log = gateway.log_text();
    assert_eq!(acme_lines(&log, "certificate installed"), 0, "{log}");
    assert_eq!(acme_lines(&log, "registered"), 0, "{log}");
    assert!(expiry_seconds(&setup.metrics()).is_some());
}

#[test]
fn twenty_https_clients_at_once_right_after_the_certificate_arrives_all_succeed() {
    require_tools!("pebble", "pebble-challtestsrv");
    let setup = Setup::new();
    let pebble = Pebble::start(setup.http.port(), None);
    let gateway = setup.start(&setup.acme_config(&pebble));
    gateway.wait_for_log("ACME: new certificate installed", ISSUED_WITHIN);
    let roots = client_config(pebble.root_pem());
    let https = setup.https;
    let barrier = Arc::new(std::sync::Barrier::new(20));
    let started = Instant::now();
    let clients: Vec<_> = (0..20)
        .map(|_| {
            let (roots, barrier) = (roots.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let mut conn = Https::connect(https, &roots)?;
                conn.get()
            })
        })
        .collect();
    let results: Vec<Result<String, String>> =
        clients.into_iter().map(|c| c.join().unwrap()).collect();
    eprintln!("20 HTTPS clients done in {:?}", started.elapsed());
    let failed: Vec<_> = results.iter().filter(|r| r.is_err()).collect();
    assert!(failed.is_empty(), "{failed:#?}");
    assert!(
        results
            .iter()
            .all(|r| r.as_deref() == Ok("HTTP/1.1 503 Service Unavailable"))
    );
}

#[test]
fn a_short_lived_certificate_is_renewed_and_swapped_without_dropping_connections() {
    require_tools!("pebble", "pebble-challtestsrv");
    let setup = Setup::new();
    // 30 s certificates: renewal is due when 10 s remain, 20 s after issue.
    let pebble = Pebble::start(setup.http.port(), Some(Duration::from_secs(30)));
    let gateway = setup.start(&setup.acme_config(&pebble));
    gateway.wait_for_log("ACME: new certificate installed", ISSUED_WITHIN);
    let roots = client_config(pebble.root_pem());
    let mut old = Https::connect(setup.https, &roots).unwrap();
    old.get().unwrap();
    let first = old.leaf();
    let left = expiry_seconds(&setup.metrics()).unwrap();
    assert!((0.0..=31.0).contains(&left), "{left}");

    gateway.wait_for_log(
        "ACME: renewed certificate installed",
        Duration::from_secs(40),
    );
    let new =
        Https::connect(setup.https, &roots).expect("a handshake with the renewed certificate");
    assert_ne!(
        new.leaf(),
        first,
        "new handshakes get the renewed certificate"
    );
    // The connection opened before the swap still works, with the certificate it started with.
    assert_eq!(old.get().unwrap(), "HTTP/1.1 503 Service Unavailable");
    assert_eq!(old.leaf(), first);
    assert_eq!(pebble.issued(), 2, "{}", pebble.log());
    assert!(
        pebble
            .log()
            .matches("Attempting to validate w/ HTTP")
            .count()
            >= 2
    );
    let left = expiry_seconds(&setup.metrics()).unwrap();
    assert!(
        left > 10.0,
        "the gauge follows the renewed certificate: {left}"
    );
    // The cache holds the renewed certificate.
    let cache = std::fs::read_dir(setup.path().join("acme"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let cached = std::fs::read_to_string(cache.join("cert.pem")).unwrap();
    let cached_leaf = {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        CertificateDer::pem_slice_iter(cached.as_bytes())
            .next()
            .unwrap()
            .unwrap()
            .to_vec()
    };
    assert_eq!(cached_leaf, new.leaf());
}

#[test]
fn an_unreachable_directory_is_one_clear_error_and_ssh_and_http_keep_serving() {
    let setup = Setup::new();
    // Nothing listens on this port.
    let directory = format!("https://127.0.0.1:{}/dir", free_port());
    let mut gateway = setup.start(&setup.config(&format!(
        "acme_domains = [\"{DOMAIN}\"]\nacme_directory = \"{directory}\"\n"
    )));
    let line = gateway.log_line(
        "ACME: could not get the certificate",
        Duration::from_secs(30),
    );
    assert!(
        line.contains("ERROR")
            && line.contains(&directory)
            && line.contains("Connection refused")
            && line.contains("retry_in=1m"),
        "says what failed, where, why and when it retries: {line}"
    );
    // SSH and the plain HTTP listener serve; HTTPS handshakes fail cleanly (no certificate).
    let banner = wait_for_ssh_banner(setup.ssh, Duration::from_secs(10));
    assert!(banner.starts_with("SSH-2.0-"), "{banner}");
    assert_eq!(http_get(setup.http, "/").status, 308);
    let any_ca = std::fs::read_to_string(jupyter::TestCa::generate().ca_path()).unwrap();
    let err = Https::connect(setup.https, &client_config(&any_ca))
        .err()
        .expect("no certificate yet");
    assert!(err.contains("TLS handshake"), "{err}");
    assert!(expiry_seconds(&setup.metrics()).is_none());
    // No tight loop: still one attempt a few seconds later, and the gateway runs.
    std::thread::sleep(Duration::from_secs(3));
    let log = gateway.log_text();
    assert_eq!(acme_lines(&log, "could not get"), 1, "{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert!(gateway.try_wait().is_none(), "the gateway still runs");
}

#[test]
fn check_config_refuses_certificate_files_and_acme_together() {
    let setup = Setup::new();
    let path = setup.path().join("poolgate.toml");
    std::fs::write(
        &path,
        setup.config(&format!(
            "cert = \"tls/cert.pem\"\nkey = \"tls/key.pem\"\nacme_domains = [\"{DOMAIN}\"]\n"
        )),
    )
    .unwrap();
    let out = run_with_timeout(
        Command::new(poolgate_bin()).arg("check-config").arg(&path),
        Duration::from_secs(30),
    );
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("tls.acme_domains: set either tls.cert and tls.key")
            && text.contains("not both"),
        "{text}"
    );
}
