//! HAProxy in TCP mode: the L4 balancer several gateway replicas sit behind in the tests (as an
//! Azure Standard Load Balancer does in production).

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::ports::{free_port, wait_for_port};
use crate::tools::tool;

/// HAProxy in TCP mode in front of several listeners (the L4 balancer replicas sit behind):
/// round robin, health-checked every 300 ms, a server marked down after 2 failed checks.
pub struct Haproxy {
    child: Option<Child>,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    /// Balances a new free port over `backends`.
    pub fn tcp(backends: &[SocketAddr]) -> Self {
        Self::tcp_with(backends, "")
    }

    /// As [`tcp`](Self::tcp), with `server_options` on each server line (e.g. `send-proxy-v2`:
    /// each connection to a backend starts with a PROXY protocol header naming the client).
    pub fn tcp_with(backends: &[SocketAddr], server_options: &str) -> Self {
        let port = free_port();
        let mut config = format!(
            "global\n  maxconn 4096\n\
             defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 5m\n  timeout server 5m\n  retries 3\n  option redispatch\n\
             frontend front\n  bind 127.0.0.1:{port}\n  default_backend replicas\n\
             backend replicas\n  balance roundrobin\n"
        );
        for (i, addr) in backends.iter().enumerate() {
            config +=
                &format!("  server r{i} {addr} check inter 300ms fall 2 rise 2 {server_options}\n");
        }
        Self::with_config(&config, port, &[])
    }

    /// HAProxy with the configuration `config` (one whose frontends bind 127.0.0.1 ports),
    /// once `port` and every one of `also` accept connections; [`port`](Self::port) is `port`.
    pub fn with_config(config: &str, port: u16, also: &[u16]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("poolgate-haproxy-")
            .tempdir()
            .expect("create haproxy temp dir");
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config).expect("write haproxy.cfg");
        let child = Command::new(tool("haproxy"))
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn haproxy");
        let proxy = Self {
            child: Some(child),
            port,
            _dir: dir,
        };
        for port in std::iter::once(port).chain(also.iter().copied()) {
            wait_for_port(
                SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                Duration::from_secs(10),
            );
        }
        proxy
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
