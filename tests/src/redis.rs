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
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts one on a free port, without a password.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// Starts one on a free port that requires `password` (`requirepass`).
    pub fn start_with(password: Option<&str>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("poolgate-redis-")
            .tempdir()
            .expect("create redis temp dir");
        let mut server = Self {
            child: None,
            port: free_port(),
            password: password.map(str::to_owned),
            dir,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(tool("redis-server"));
        cmd.args(["--bind", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
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

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
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
