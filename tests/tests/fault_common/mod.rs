//! Shared helpers of the fault and signal tests (`tests/tests/fault_*.rs`,
//! `tests/tests/lifecycle_signals.rs`): an interactive SSH session that echoes lines (to prove a
//! session still exchanges data, and to time each exchange), signals, Prometheus samples, the
//! admin listener's plain HTTP client (reused from `admin_common/http.rs`), and the server-side
//! view of TCP connections in `/proc/net/tcp`.
//!
//! Each test binary uses part of this module.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use poolgate_tests::*;

/// An SSH session through the gateway running `echo $POOLGATE_VM; exec cat`: every line sent
/// comes back, so [`roundtrip`](Self::roundtrip) proves (and times) that it still exchanges
/// data. stderr is collected as it arrives. Dropping it kills ssh.
pub struct LiveSession {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<Vec<u8>>>,
    /// Where it landed.
    pub vm: String,
    exited: Option<ExitStatus>,
}

impl LiveSession {
    /// Opens the session and waits (30 s at most) for the VM name.
    pub fn open(client: &SshClient) -> Self {
        let mut child = client
            .command("echo $POOLGATE_VM; exec cat")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ssh");
        let stdin = child.stdin.take();
        let out = child.stdout.take().expect("piped stdout");
        let mut err = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let sink = stderr.clone();
        thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = err.read(&mut chunk) {
                sink.lock()
                    .expect("stderr buffer")
                    .extend_from_slice(&chunk[..n]);
            }
        });
        let mut session = LiveSession {
            child,
            stdin,
            lines,
            stderr,
            vm: String::new(),
            exited: None,
        };
        match session.lines.recv_timeout(Duration::from_secs(30)) {
            Ok(vm) if !vm.trim().is_empty() => session.vm = vm.trim().to_string(),
            other => {
                kill_tree(session.child.id());
                let _ = session.child.wait();
                panic!(
                    "session printed no VM name within 30 s ({other:?}); ssh stderr: {}",
                    session.stderr()
                );
            }
        }
        session
    }

    /// Sends `text` and waits (within `timeout`) for it to come back; the round-trip time.
    pub fn try_roundtrip(&mut self, text: &str, timeout: Duration) -> Result<Duration, String> {
        let started = Instant::now();
        let stdin = self.stdin.as_mut().ok_or("stdin closed")?;
        stdin
            .write_all(format!("{text}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .map_err(|e| format!("write to ssh: {e}"))?;
        loop {
            let left = timeout.saturating_sub(started.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(line) if line == text => return Ok(started.elapsed()),
                Ok(_) => continue,
                Err(e) => {
                    return Err(format!(
                        "{text:?} did not come back within {timeout:?}: {e}"
                    ));
                }
            }
        }
    }

    /// [`try_roundtrip`](Self::try_roundtrip) that panics (with ssh's stderr) on failure.
    #[track_caller]
    pub fn roundtrip(&mut self, text: &str, timeout: Duration) -> Duration {
        match self.try_roundtrip(text, timeout) {
            Ok(rtt) => rtt,
            Err(e) => panic!("session on {}: {e}; ssh stderr: {}", self.vm, self.stderr()),
        }
    }

    /// What ssh wrote to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().expect("stderr buffer")).into_owned()
    }

    /// Waits (within `timeout`) for ssh to exit on its own; panics if it does not.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(status) = self.exited {
            return status;
        }
        let status = wait_for_exit(&mut self.child, timeout, "ssh session");
        self.exited = Some(status);
        // stderr may still be in the pipe: give its reader a moment to reach the end.
        let deadline = Instant::now() + Duration::from_secs(2);
        while Arc::strong_count(&self.stderr) > 1 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        status
    }

    /// True while ssh runs.
    pub fn is_running(&mut self) -> bool {
        self.exited.is_none() && matches!(self.child.try_wait(), Ok(None))
    }

    /// Closes stdin (EOF to `cat`) and waits for ssh to exit; returns its status.
    pub fn end(mut self, timeout: Duration) -> ExitStatus {
        self.stdin = None;
        self.wait_exit(timeout)
    }
}

impl Drop for LiveSession {
    fn drop(&mut self) {
        if self.exited.is_none()
            && let Ok(None) = self.child.try_wait()
        {
            kill_tree(self.child.id());
            let _ = self.child.wait();
        }
    }
}
