//! The gateway in front of real Jupyter VMs, with TLS from a test CA.

#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use poolgate_tests::jupyter::{Browser, TestCa};
use poolgate_tests::*;

/// A running gateway with HTTPS (test CA) and plain HTTP listeners.
pub struct HttpGateway {
    pub gateway: GatewayProcess,
    pub https: SocketAddr,
    pub http: SocketAddr,
    /// The admin listener (`/api/v1/...`, `/metrics`; no token).
    pub admin: SocketAddr,
    pub ca: TestCa,
}

/// Builds the gateway config for `vms` (name, HTTP port) and starts it.
pub struct HttpGatewayBuilder {
    vms: Vec<(String, u16)>,
    health_path: String,
    tls: bool,
    extra: String,
}

impl HttpGatewayBuilder {
    pub fn new(health_path: &str) -> Self {
        Self {
            vms: Vec::new(),
            health_path: health_path.into(),
            tls: true,
            extra: String::new(),
        }
    }

    pub fn vm(mut self, name: &str, http_port: u16) -> Self {
        self.vms.push((name.into(), http_port));
        self
    }

    /// Plain HTTP only (no `[tls]`).
    pub fn without_tls(mut self) -> Self {
        self.tls = false;
        self
    }

    /// Extra `[http]` lines.
    pub fn http_option(mut self, line: &str) -> Self {
        self.extra.push_str(line);
        self.extra.push('\n');
        self
    }

    pub fn start(self) -> HttpGateway {
        let ca = TestCa::generate();
        let https = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let http = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let dir = tempfile::Builder::new()
            .prefix("poolgate-http-")
            .tempdir()
            .expect("temp dir")
            .keep();
        // The SSH side is unused here, but the config must name a VM host key to be valid.
        let mut blob = Vec::new();
        for part in [&b"ssh-ed25519"[..], &[7u8; 32][..]] {
            blob.extend_from_slice(&(part.len() as u32).to_be_bytes());
            blob.extend_from_slice(part);
        }
        std::fs::write(
            dir.join("known_hosts"),
            format!(
                "[127.0.0.1]:1 ssh-ed25519 {}\n",
                data_encoding::BASE64.encode(&blob)
            ),
        )
        .expect("known_hosts");
        let mut config = format!(
            "[listen]\nssh = \"127.0.0.1:{ssh}\"\nhttp = \"{http}\"\nadmin = \"{admin}\"\n",
            ssh = free_port(),
        );
        if self.tls {
            config += &format!(
                "https = \"{https}\"\n\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
                ca.cert_path().display(),
                ca.key_path().display()
            );
        }
        config += "\n[ssh]\nhost_keys = [\"keys/host_key\"]\nuser_ca_key = \"keys/user_ca\"\n\
                   backend_known_hosts = \"known_hosts\"\n";
        config += &format!(
            "\n[http]\ncookie_secret_file = \"keys/cookie_secret\"\nconnect_timeout = \"2s\"\n{}",
            self.extra
        );
        config += &format!(
            "\n[health]\ninterval = \"500ms\"\ntimeout = \"500ms\"\nssh = false\nhttp = true\n\
             http_path = \"{}\"\nrise = 1\nfall = 2\n",
            self.health_path
        );
        for (name, port) in &self.vms {
            config += &format!(
                "\n[[pool.backends]]\nname = \"{name}\"\nhost = \"127.0.0.1\"\nssh_port = 1\nhttp_port = {port}\n"
            );
        }
        let listen = if self.tls { https } else { http };
        let gateway = GatewayProcess::builder(&config)
            .dir(&dir)
            .env("NO_COLOR", "1")
            .wait_for(listen)
            .wait_for(admin)
            .start();
        for (name, _) in &self.vms {
            wait_for_vm_up(&gateway, name);
        }
        HttpGateway {
            gateway,
            https,
            http,
            admin,
            ca,
        }
    }
}

/// Waits until the gateway log says `vm` is up (health probe passed).
pub fn wait_for_vm_up(gateway: &GatewayProcess, vm: &str) {
    let needle = format!("vm={vm}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = gateway.log_text();
        if log
            .lines()
            .any(|l| l.contains("VM is up") && l.contains(&needle))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "VM {vm} not up in the gateway within 60 s:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl HttpGateway {
    /// A new browser (empty cookie jar) on the HTTPS listener.
    pub fn browser(&self) -> Browser {
        Browser::https(self.https, self.ca.client_config())
    }
}
