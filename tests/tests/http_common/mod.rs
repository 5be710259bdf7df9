//! The gateway in front of real Jupyter VMs, with TLS from a test CA.

#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use poolgate_tests::jupyter::{Browser, TestCa, ws_next_text, ws_send};
use poolgate_tests::*;
use serde_json::json;

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

/// The VM a `poolgate_vm` cookie value names (its first field is base64url of the name).
pub fn cookie_vm(value: &str) -> String {
    let first = value.split('.').next().unwrap_or("");
    let bytes = data_encoding::BASE64URL_NOPAD
        .decode(first.as_bytes())
        .unwrap_or_else(|e| panic!("cookie {value:?}: {e}"));
    String::from_utf8(bytes).expect("UTF-8 VM name")
}

/// Runs `code` in a new kernel of the Jupyter server at `prefix` (`""` or `/user/<name>`)
/// over the kernel websocket; returns the `text/plain` result.
pub async fn execute(b: &Browser, prefix: &str, code: &str) -> String {
    let r = b
        .api(
            "POST",
            &format!("{prefix}/api/kernels"),
            Some(&json!({"name": "python3"})),
        )
        .await;
    assert_eq!(r.status, 201, "start kernel: {}", r.text());
    let kernel = r.json()["id"].as_str().expect("kernel id").to_string();
    let session = "poolgate-test-session";
    let mut ws = b
        .websocket(&format!(
            "{prefix}/api/kernels/{kernel}/channels?session_id={session}"
        ))
        .await;
    let msg_id = "poolgate-exec-1";
    let request = json!({
        "header": {"msg_id": msg_id, "username": "poolgate-test", "session": session,
                   "msg_type": "execute_request", "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {}, "buffers": [], "channel": "shell",
        "content": {"code": code, "silent": false, "store_history": true,
                    "user_expressions": {}, "allow_stdin": false, "stop_on_error": true},
    });
    ws_send(&mut ws, request.to_string()).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut result = None;
    let mut replied = false;
    while result.is_none() || !replied {
        let left = deadline.saturating_duration_since(Instant::now());
        let text = tokio::time::timeout(left, ws_next_text(&mut ws))
            .await
            .expect("kernel answered within 60 s")
            .expect("kernel websocket open");
        let msg: serde_json::Value = serde_json::from_str(&text).expect("kernel message JSON");
        if msg["parent_header"]["msg_id"] != msg_id {
            continue;
        }
        match msg["header"]["msg_type"].as_str() {
            Some("execute_result") => {
                result = msg["content"]["data"]["text/plain"]
                    .as_str()
                    .map(str::to_owned)
            }
            Some("execute_reply") => {
                assert_eq!(msg["content"]["status"], "ok", "{msg}");
                replied = true;
            }
            Some("error") => panic!("kernel error: {msg}"),
            _ => {}
        }
    }
    result.unwrap_or_default()
}
