//! [`GatewayProcess`]: the real `poolgate` binary run as a child process.

use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tempfile::TempDir;

use crate::log::{has_field, strip_ansi};
use crate::ports::accepts;
use crate::process::{Backoff, kill_tree, signal, wait_child};

/// The workspace root: the parent of this crate's directory.
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent directory")
        .to_path_buf()
}

/// The `poolgate` binary to test: `$POOLGATE_BIN` when set, else
/// `$CARGO_TARGET_DIR/debug/poolgate` or `<workspace>/target/debug/poolgate`. Panics, saying to
/// run `cargo build -p gateway`, when it does not exist.
pub fn poolgate_bin() -> PathBuf {
    let path = match std::env::var_os("POOLGATE_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .map(|t| {
                if t.is_relative() {
                    workspace_dir().join(t)
                } else {
                    t
                }
            })
            .unwrap_or_else(|| workspace_dir().join("target"))
            .join("debug")
            .join("poolgate"),
    };
    assert!(
        path.is_file(),
        "poolgate binary not found at {}: run `cargo build -p gateway` first \
         (or set POOLGATE_BIN to the binary to test)",
        path.display()
    );
    path
}

/// Builds a [`GatewayProcess`]; see [`GatewayProcess::builder`].
#[derive(Clone, Debug)]
pub struct GatewayProcessBuilder {
    config_toml: String,
    dir: Option<PathBuf>,
    wait_for: Vec<SocketAddr>,
    env: Vec<(String, String)>,
    args: Vec<String>,
    timeout: Duration,
    binary: Option<PathBuf>,
    output: Option<std::sync::Arc<std::fs::File>>,
}

impl GatewayProcessBuilder {
    /// The program to run instead of [`poolgate_bin`] (it gets the same arguments).
    pub fn binary(mut self, program: &Path) -> Self {
        self.binary = Some(program.to_path_buf());
        self
    }

    /// The directory for `poolgate.toml` and `poolgate.log`; relative paths in the config
    /// resolve against it. Default: a fresh temp dir owned by the process fixture.
    pub fn dir(mut self, dir: &Path) -> Self {
        self.dir = Some(dir.to_path_buf());
        self
    }

    /// An address that must accept TCP connections before [`start`](Self::start) returns
    /// (e.g. the SSH or admin listener). Several may be given.
    pub fn wait_for(mut self, addr: SocketAddr) -> Self {
        self.wait_for.push(addr);
        self
    }

    /// An environment variable for the gateway (e.g. `POOLGATE_LOG=debug`).
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_string(), value.to_string()));
        self
    }

    /// An extra argument after `run --config FILE`.
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_string());
        self
    }

    /// Where the gateway's standard output and error go instead of `poolgate.log` (a pipe,
    /// say; under systemd both go to the journal).
    pub fn output(mut self, to: std::fs::File) -> Self {
        self.output = Some(std::sync::Arc::new(to));
        self
    }

    /// How long the listeners may take to open (default 30 s).
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Writes the config, spawns `poolgate run --config <dir>/poolgate.toml` with stdout and
    /// stderr appended to `<dir>/poolgate.log` (both elsewhere if [`output`](Self::output)
    /// says so), and waits until every `wait_for` address accepts.
    /// Panics with the log if the gateway exits first or the deadline passes.
    pub fn start(self) -> GatewayProcess {
        let (dir, temp) = match self.dir {
            Some(dir) => {
                std::fs::create_dir_all(&dir).expect("create gateway dir");
                (dir, None)
            }
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("poolgate-gateway-")
                    .tempdir()
                    .expect("create temp dir for the gateway");
                (temp.path().to_path_buf(), Some(temp))
            }
        };
        let config_path = dir.join("poolgate.toml");
        let log_path = dir.join("poolgate.log");
        std::fs::write(&config_path, &self.config_toml).expect("write poolgate.toml");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("open poolgate.log");
        let out = match &self.output {
            Some(to) => to.try_clone().expect("dup the gateway's output"),
            None => log,
        };
        let program = self.binary.unwrap_or_else(poolgate_bin);
        let child = Command::new(&program)
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup the gateway's output"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
        // Built before waiting, so a failed start still kills the process through Drop.
        let mut gateway = GatewayProcess {
            child: Some(child),
            exited: None,
            dir,
            config_path,
            log_path,
            _temp: temp,
        };
        let deadline = Instant::now() + self.timeout;
        for addr in self.wait_for {
            gateway.wait_until_accepting(addr, deadline, self.timeout);
        }
        gateway
    }
}

/// A running `poolgate run --config …`. Dropping it kills the gateway (SIGKILL: its graceful
/// shutdown may last `shutdown_grace`) and its children and waits for them; when the test is
/// panicking the gateway log is printed first.
pub struct GatewayProcess {
    child: Option<Child>,
    exited: Option<ExitStatus>,
    dir: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    _temp: Option<TempDir>,
}

/// Waits until the gateway log at `log` has a line with `what` ("VM is up", "VM is down")
/// naming `vm`; panics with the log after `timeout`. For a thread that watches the log beside
/// the test (the [`GatewayProcess`] methods call it with their own log).
pub fn wait_for_health_line(log: &Path, vm: &str, what: &str, timeout: Duration) {
    let read = || std::fs::read_to_string(log).unwrap_or_default();
    let deadline = Instant::now() + timeout;
    let mut backoff = Backoff::new();
    loop {
        let seen = strip_ansi(&read())
            .lines()
            .any(|l| l.contains(what) && has_field(l, "vm", vm));
        if seen {
            return;
        }
        if Instant::now() >= deadline {
            panic!(
                "no {what:?} line for {vm} in the gateway log after {timeout:?}:\n{}",
                read()
            );
        }
        backoff.sleep_until(deadline);
    }
}

impl GatewayProcess {
    /// A builder for a gateway running `config_toml`.
    pub fn builder(config_toml: &str) -> GatewayProcessBuilder {
        GatewayProcessBuilder {
            config_toml: config_toml.to_string(),
            dir: None,
            wait_for: Vec::new(),
            env: Vec::new(),
            args: Vec::new(),
            timeout: Duration::from_secs(30),
            binary: None,
            output: None,
        }
    }

    /// Writes `config_toml` to `<dir>/poolgate.toml`, starts the gateway and waits until
    /// `ready` accepts TCP connections (30 s at most).
    pub fn start(config_toml: &str, dir: &Path, ready: SocketAddr) -> Self {
        Self::builder(config_toml).dir(dir).wait_for(ready).start()
    }

    /// The directory holding the config and log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The config file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The log file (stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The gateway's output so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until the log contains `needle`; panics with the log after `timeout`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        crate::log::wait_for_text(&self.log_path, "the gateway log", needle, timeout);
    }

    /// Waits until the log contains `needle` and returns the first line holding it; panics
    /// with the log after `timeout`.
    pub fn log_line(&self, needle: &str, timeout: Duration) -> String {
        self.wait_for_log(needle, timeout);
        self.log_text()
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_default()
            .to_owned()
    }

    /// Waits for the gateway's "VM is up" line naming `vm` (one of its sides passed its probes);
    /// panics with the log after `timeout`.
    pub fn wait_for_vm_up(&self, vm: &str, timeout: Duration) {
        self.wait_for_health_line(vm, "VM is up", timeout);
    }

    /// Waits for the gateway's "VM is down" line naming `vm`; panics with the log after
    /// `timeout`.
    pub fn wait_for_vm_down(&self, vm: &str, timeout: Duration) {
        self.wait_for_health_line(vm, "VM is down", timeout);
    }

    fn wait_for_health_line(&self, vm: &str, what: &str, timeout: Duration) {
        wait_for_health_line(&self.log_path, vm, what, timeout);
    }

    /// The gateway's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its exit status if it has exited (reaping it), `None` while it runs.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            let child = self.child.as_mut()?;
            self.exited = child.try_wait().expect("try_wait poolgate");
            if self.exited.is_some() {
                // Reaped: forget the pid so kill()/drop never signal a reused one.
                self.child = None;
            }
        }
        self.exited
    }

    /// Waits up to `timeout` for the gateway to exit on its own (after a signal sent elsewhere,
    /// or once its last session ended); its status. Panics naming `what` if it still runs then.
    pub fn wait_for_exit(&mut self, timeout: Duration, what: &str) -> ExitStatus {
        let mut status = None;
        crate::wait_until(timeout, what, || {
            status = self.try_wait();
            status.is_some()
        });
        status.expect("wait_until returns once the gateway has exited")
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit (graceful-shutdown tests); returns
    /// the status at once if it has already exited. Panics
    /// with the log if it is still running then (it is then killed by Drop).
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(status) = self.try_wait() {
            return status;
        }
        let child = self.child.as_mut().expect("gateway already killed");
        signal(child.id(), Signal::SIGTERM);
        match wait_child(child, Instant::now() + timeout) {
            Some(status) => {
                self.child = None;
                self.exited = Some(status);
                status
            }
            None => panic!(
                "poolgate still running {timeout:?} after SIGTERM\n--- log ---\n{}",
                self.log_text()
            ),
        }
    }

    /// Kills the gateway and its children now and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_tree(child.id());
            self.exited = child.wait().ok();
        }
    }

    fn wait_until_accepting(&mut self, addr: SocketAddr, deadline: Instant, timeout: Duration) {
        let mut backoff = Backoff::new();
        loop {
            if let Some(status) = self.try_wait() {
                panic!(
                    "poolgate exited with {status} before {addr} accepted\n--- {} ---\n{}",
                    self.log_path.display(),
                    self.log_text()
                );
            }
            if accepts(addr) {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "poolgate did not accept on {addr} within {timeout:?}\n--- {} ---\n{}",
                    self.log_path.display(),
                    self.log_text()
                );
            }
            backoff.sleep_until(deadline);
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- poolgate log ({}) ---\n{}--- end of poolgate log ---",
                self.log_path.display(),
                self.log_text()
            );
        }
        self.kill();
    }
}

/// The config with the `[[pool.backends]]` block of `vm` removed.
pub fn without_backend(config: &str, vm: &str) -> String {
    config
        .split("\n[[pool.backends]]")
        .enumerate()
        .filter(|(i, block)| *i == 0 || !block.contains(&format!("name = \"{vm}\"")))
        .map(|(i, block)| {
            if i == 0 {
                block.to_string()
            } else {
                format!("\n[[pool.backends]]{block}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn workspace_dir_is_the_workspace_root() {
        let manifest = std::fs::read_to_string(workspace_dir().join("Cargo.toml")).unwrap();
        assert!(manifest.contains("[workspace]"));
    }

    #[test]
    fn a_gateway_that_exits_while_starting_fails_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("fake-poolgate");
        std::fs::write(&script, "#!/bin/sh\necho \"fake: $*\" >&2\nexit 2\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], crate::free_port()));
        let err = std::panic::catch_unwind(|| {
            GatewayProcess::builder("[listen]\n")
                .binary(&script)
                .dir(dir.path())
                .wait_for(addr)
                .start_timeout(Duration::from_secs(10))
                .start()
        })
        .err()
        .expect("the fake gateway exits");
        let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("exited with exit status: 2"), "{msg}");
        assert!(msg.contains("fake: run --config"), "{msg}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("poolgate.toml")).unwrap(),
            "[listen]\n"
        );
    }
}
