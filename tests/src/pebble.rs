//! [`Pebble`]: Let's Encrypt's test ACME server (Debian `pebble`) on loopback, with
//! `pebble-challtestsrv` (same package) as its DNS server answering every A query with
//! 127.0.0.1, so any name (`pool.poolgate.test`) resolves to the gateway under test and the
//! HTTP-01 validation really connects to the gateway's `listen.http` port. Nothing leaves
//! loopback. `PEBBLE_VA_NOSLEEP=1` skips Pebble's random validation delays and
//! `PEBBLE_AUTHZREUSE=0` makes every order validate again; validation itself is never skipped.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::jupyter::TestCa;
use crate::ports::{free_port, wait_for_port};
use crate::process::kill_tree;
use crate::tools::tool;

/// A running Pebble and its DNS server; both are killed on drop.
pub struct Pebble {
    dir: tempfile::TempDir,
    https_ca: TestCa,
    acme: SocketAddr,
    pebble: Child,
    dns: Child,
    root_pem: String,
}

impl Pebble {
    /// Starts Pebble validating HTTP-01 on `http_port` of 127.0.0.1 (the gateway's
    /// `listen.http`), issuing certificates valid for `validity` (Pebble's default, about five
    /// years, when `None`). Waits until its ACME and management ports answer and reads its
    /// root certificate.
    pub fn start(http_port: u16, validity: Option<Duration>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("poolgate-pebble-")
            .tempdir()
            .expect("temp dir for Pebble");
        // Pebble's own HTTPS (directory and management API) presents a certificate from a
        // throw-away CA; the gateway trusts it through tls.acme_directory_ca.
        let https_ca = TestCa::generate();
        let addr = || SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let (acme, management, dns, dns_management) = (addr(), addr(), addr(), addr());
        let mut pebble_config = serde_json::json!({
            "pebble": {
                "listenAddress": acme.to_string(),
                "managementListenAddress": management.to_string(),
                "certificate": https_ca.cert_path(),
                "privateKey": https_ca.key_path(),
                "httpPort": http_port,
                // TLS-ALPN-01 is not used by poolgate; a port nothing listens on.
                "tlsPort": free_port(),
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
            }
        });
        if let Some(v) = validity {
            pebble_config["pebble"]["certificateValidityPeriod"] = v.as_secs().into();
        }
        let config_path = dir.path().join("pebble.json");
        std::fs::write(&config_path, pebble_config.to_string()).expect("write pebble.json");

        let log = |name: &str| {
            std::fs::File::create(dir.path().join(name)).expect("create a Pebble log file")
        };
        let dns_child = Command::new(tool("pebble-challtestsrv"))
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .args(["-dns01", &dns.to_string()])
            .args(["-management", &dns_management.to_string()])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .stdin(Stdio::null())
            .stdout(log("dns.log"))
            .stderr(log("dns.log"))
            .spawn()
            .expect("spawn pebble-challtestsrv");
        let pebble_child = Command::new(tool("pebble"))
            .arg("-config")
            .arg(&config_path)
            .args(["-dnsserver", &dns.to_string()])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_AUTHZREUSE", "0")
            .env_remove("PEBBLE_VA_ALWAYS_VALID")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log("pebble.log"))
            .stderr(log("pebble.log"))
            .spawn()
            .expect("spawn pebble");
        let mut pebble = Self {
            dir,
            https_ca,
            acme,
            pebble: pebble_child,
            dns: dns_child,
            root_pem: String::new(),
        };
        wait_for_port(dns, Duration::from_secs(10));
        wait_for_port(acme, Duration::from_secs(10));
        wait_for_port(management, Duration::from_secs(10));
        let roots = pebble.https_get(management, "/roots/0");
        assert!(
            roots.contains("-----BEGIN CERTIFICATE-----"),
            "Pebble's /roots/0 is not a PEM certificate: {roots}"
        );
        pebble.root_pem = roots;
        pebble
    }

    /// The ACME directory URL, for `tls.acme_directory`.
    pub fn directory_url(&self) -> String {
        format!("https://{}/dir", self.acme)
    }

    /// The CA of Pebble's own HTTPS, for `tls.acme_directory_ca`.
    pub fn https_ca_path(&self) -> PathBuf {
        self.https_ca.ca_path()
    }

    /// Pebble's root certificate (PEM), generated at its start: issued chains verify to it.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// Pebble's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pebble.log")).unwrap_or_default()
    }

    /// Orders Pebble created so far.
    pub fn orders(&self) -> usize {
        // Orders created, not order requests: Pebble rejects 5 % of good nonces on purpose, and
        // the client's retry of a rejected request is another `POST /order-plz` for one order.
        self.log().matches("Added order").count()
    }

    /// Certificates issued so far.
    pub fn issued(&self) -> usize {
        self.log().matches("Issued certificate serial").count()
    }

    /// A GET over HTTPS (HTTP/1.0, trusting Pebble's HTTPS CA); the body.
    fn https_get(&self, addr: SocketAddr, path: &str) -> String {
        let config = Arc::unwrap_or_clone(self.https_ca.client_config());
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1")
            .expect("server name")
            .to_owned();
        let conn = rustls::ClientConnection::new(Arc::new(config), name).expect("TLS client");
        let tcp = TcpStream::connect(addr).expect("connect to Pebble");
        tcp.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        write!(tls, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("send");
        let mut response = Vec::new();
        // Pebble closes without close_notify now and then: keep what arrived.
        let _ = tls.read_to_end(&mut response);
        let text = String::from_utf8_lossy(&response).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        assert!(
            head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
            "GET {path} from Pebble: {head}"
        );
        body.to_owned()
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for child in [&mut self.pebble, &mut self.dns] {
            kill_tree(child.id());
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- Pebble log ----\n{}", self.log());
        }
    }
}
