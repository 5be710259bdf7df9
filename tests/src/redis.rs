//! A real `redis-server` on a free loopback port, for the tests of several gateway replicas
//! sharing state. No persistence: a restart comes back empty, as an unpersisted Redis would.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::ports::{free_port, wait_for_port, wait_for_port_closed};
use crate::tools::tool;

/// A `redis-server` child bound to 127.0.0.1; killed when dropped.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    password: Option<String>,
    /// TLS only (`rediss://`): certificate, key and CA of the server.
    tls: Option<Tls>,
    dir: tempfile::TempDir,
}

/// The PEM files of a TLS-only server.
#[derive(Debug, Clone)]
pub struct Tls {
    /// Server certificate (for 127.0.0.1).
    pub cert: std::path::PathBuf,
    /// Its key.
    pub key: std::path::PathBuf,
    /// The CA that signed it.
    pub ca: std::path::PathBuf,
}

impl RedisServer {
    /// Starts one on a free port, without a password.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// Starts one on a free port that requires `password` (`requirepass`).
    pub fn start_with(password: Option<&str>) -> Self {
        Self::start_full(password, None)
    }

    /// Starts one that speaks TLS only (no plain port), with `tls`'s certificate.
    pub fn start_tls(tls: Tls) -> Self {
        Self::start_full(None, Some(tls))
    }

    fn start_full(password: Option<&str>, tls: Option<Tls>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("poolgate-redis-")
            .tempdir()
            .expect("create redis temp dir");
        let mut server = Self {
            child: None,
            port: free_port(),
            password: password.map(str::to_owned),
            tls,
            dir,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(tool("redis-server"));
        cmd.args(["--bind", "127.0.0.1"]);
        match &self.tls {
            Some(tls) => {
                cmd.args(["--port", "0", "--tls-port"])
                    .arg(self.port.to_string())
                    .arg("--tls-cert-file")
                    .arg(&tls.cert)
                    .arg("--tls-key-file")
                    .arg(&tls.key)
                    .arg("--tls-ca-cert-file")
                    .arg(&tls.ca)
                    .args(["--tls-auth-clients", "no"]);
            }
            None => {
                cmd.arg("--port").arg(self.port.to_string());
            }
        }
        cmd.args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.dir.path().join("redis.log"));
        if let Some(password) = &self.password {
            cmd.args(["--requirepass", password]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        wait_for_port(self.addr(), Duration::from_secs(10));
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// `redis://127.0.0.1:PORT/0` (`rediss://` for a TLS server).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}/0", self.port)
    }

    /// Its log file.
    pub fn log_path(&self) -> std::path::PathBuf {
        self.dir.path().join("redis.log")
    }

    /// Kills it (SIGKILL, as a crash would) and waits until the port is closed.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        wait_for_port_closed(self.addr(), Duration::from_secs(10));
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Runs `redis-cli` against it and returns its stdout, trimmed.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut cmd = Command::new(tool("redis-cli"));
        cmd.args(["-h", "127.0.0.1", "-p"])
            .arg(self.port.to_string());
        if let Some(password) = &self.password {
            cmd.env("REDISCLI_AUTH", password);
        }
        if let Some(tls) = &self.tls {
            cmd.arg("--tls").arg("--cacert").arg(&tls.ca);
        }
        let out = crate::process::run_with_timeout(cmd.args(args), Duration::from_secs(10));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The directory it runs in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
