//! Long-lived `ssh` processes: a session held open through the gateway ([`SshSession`]), a
//! background `ssh` such as `ssh -N -L …` ([`Background`]), and one connection shared by several
//! commands ([`Multiplexed`]). Each is killed with its descendants on drop.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::client::SshClient;
use crate::output::{assert_ok, stdout};
use crate::process::{kill_tree, poll, wait_for_exit};

/// How long a session may take to print where it landed.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a held session may take to end once its stdin is closed.
const END_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `echo $POOLGATE_VM` through `client` and returns where it landed (asserting success).
pub fn landed(client: &SshClient) -> String {
    let out = client.run("echo $POOLGATE_VM");
    assert_ok(&out, "ssh echo $POOLGATE_VM");
    stdout(&out)
}

/// An SSH session through the gateway running `echo $POOLGATE_VM; <then>`. Opening returns once
/// the VM name arrived, so the gateway counts the session by then. Everything after that line
/// is read as it comes (the remote side never blocks on a full pipe): counted
/// ([`received`](Self::received)), kept ([`finish`](Self::finish)) and, line by line, matched by
/// [`roundtrip`](Self::roundtrip). stderr is kept as it arrives. Its stdin stays open until the
/// session is ended; dropping it kills ssh.
pub struct SshSession {
    child: Child,
    stdin: Option<ChildStdin>,
    output: Arc<Captured>,
    errors: Arc<Captured>,
    /// Where [`roundtrip`](Self::roundtrip) goes on reading the output.
    cursor: usize,
    exited: Option<ExitStatus>,
    started: Instant,
    /// Where it landed.
    pub vm: String,
}

impl SshSession {
    /// `echo $POOLGATE_VM; exec cat`: held open and echoing what it is sent until it is ended;
    /// waits (30 s at most) for the VM name.
    pub fn hold(client: &SshClient) -> Self {
        Self::hold_within(client, OPEN_TIMEOUT)
    }

    /// [`hold`](Self::hold), waiting at most `timeout` for the VM name.
    pub fn hold_within(client: &SshClient, timeout: Duration) -> Self {
        Self::open_within(client, "exec cat", timeout)
    }

    /// Opens `echo $POOLGATE_VM; <then>` and waits (30 s at most) for the VM name.
    pub fn open(client: &SshClient, then: &str) -> Self {
        Self::open_within(client, then, OPEN_TIMEOUT)
    }

    fn open_within(client: &SshClient, then: &str, timeout: Duration) -> Self {
        let mut child = client
            .command(&format!("echo $POOLGATE_VM; {then}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ssh");
        let started = Instant::now();
        let stdin = child.stdin.take();
        let mut out = BufReader::new(child.stdout.take().expect("piped stdout"));
        let errors = Captured::start(child.stderr.take().expect("piped stderr"));
        let output = Arc::new(Captured::default());
        let (first_tx, first_rx) = mpsc::channel();
        let sink = Arc::clone(&output);
        thread::spawn(move || {
            let mut line = String::new();
            let _ = out.read_line(&mut line);
            let _ = first_tx.send(line);
            sink.read_to_end(out);
        });
        let mut session = SshSession {
            child,
            stdin,
            output,
            errors,
            cursor: 0,
            exited: None,
            started,
            vm: String::new(),
        };
        let line = first_rx.recv_timeout(timeout).unwrap_or_default();
        if line.trim().is_empty() {
            kill_tree(session.child.id());
            let _ = session.child.wait();
            session.errors.wait_closed(Duration::from_secs(2));
            panic!(
                "session printed no VM name within {timeout:?}; ssh stderr: {}",
                session.stderr()
            );
        }
        session.vm = line.trim().to_string();
        session
    }

    /// Writes `data` to the remote command's stdin.
    pub fn send(&mut self, data: &[u8]) {
        self.stdin
            .as_mut()
            .expect("stdin still open")
            .write_all(data)
            .expect("write to ssh stdin");
    }

    /// Bytes received on stdout after the VM name line.
    pub fn received(&self) -> usize {
        self.output.lock().bytes.len()
    }

    /// Sends the line `text` and waits (within `timeout`) for it to come back from `cat`; the
    /// round-trip time. Lines that came back before it are skipped.
    pub fn try_roundtrip(&mut self, text: &str, timeout: Duration) -> Result<Duration, String> {
        let started = Instant::now();
        let stdin = self.stdin.as_mut().ok_or("stdin closed")?;
        stdin
            .write_all(format!("{text}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .map_err(|e| format!("write to ssh: {e}"))?;
        let deadline = started + timeout;
        let mut captured = self.output.lock();
        loop {
            while let Some(line) = captured.line_at(&mut self.cursor) {
                if line == text {
                    return Ok(started.elapsed());
                }
            }
            if captured.closed {
                return Err(format!(
                    "{text:?} did not come back within {timeout:?}: the output ended"
                ));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "{text:?} did not come back within {timeout:?}: timed out"
                ));
            }
            captured = self.output.wait(captured, left);
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
        String::from_utf8_lossy(&self.errors.lock().bytes).into_owned()
    }

    /// Waits (within `timeout`) for ssh to exit on its own; panics if it does not.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(status) = self.exited {
            return status;
        }
        let status = wait_for_exit(&mut self.child, timeout, "ssh session");
        self.exited = Some(status);
        // stderr may still be in the pipe: give its reader a moment to reach the end.
        self.errors.wait_closed(Duration::from_secs(2));
        status
    }

    /// True while ssh runs.
    pub fn is_running(&mut self) -> bool {
        self.exited.is_none() && matches!(self.child.try_wait(), Ok(None))
    }

    /// Closes stdin (EOF to `cat`) and waits (within `timeout`) for ssh to exit; returns its
    /// status.
    pub fn close(mut self, timeout: Duration) -> ExitStatus {
        self.stdin = None;
        self.wait_exit(timeout)
    }

    /// Closes stdin and waits (within `timeout`) for ssh to exit; returns its status and the
    /// stdout after the VM line.
    pub fn finish(mut self, timeout: Duration) -> (ExitStatus, String) {
        self.stdin = None;
        let status = self.wait_exit(timeout);
        self.output.wait_closed(Duration::from_secs(5));
        let rest = String::from_utf8_lossy(&self.output.lock().bytes).into_owned();
        (status, rest)
    }

    /// Ends a held session cleanly (EOF to `cat`) and asserts ssh exited 0.
    pub fn end(self) {
        let (status, _) = self.finish(END_TIMEOUT);
        assert!(status.success(), "held session ended with {status}");
    }

    /// The ssh client's pid (to stop it, as a laptop put to sleep stops answering).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How long since ssh was spawned.
    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }
}

impl Drop for SshSession {
    fn drop(&mut self) {
        if self.exited.is_none()
            && let Ok(None) = self.child.try_wait()
        {
            kill_tree(self.child.id());
            let _ = self.child.wait();
        }
    }
}

/// What a pipe delivered so far, and whether it has ended; readers wait on it for more.
#[derive(Default)]
struct Captured {
    state: Mutex<Capture>,
    more: Condvar,
}

#[derive(Default)]
struct Capture {
    bytes: Vec<u8>,
    closed: bool,
}

impl Capture {
    /// The next complete line at `*cursor` (without its line end), moving the cursor past it.
    fn line_at(&self, cursor: &mut usize) -> Option<String> {
        let rest = self.bytes.get(*cursor..)?;
        let end = rest.iter().position(|b| *b == b'\n')?;
        *cursor += end + 1;
        let line = String::from_utf8_lossy(&rest[..end]);
        Some(line.strip_suffix('\r').unwrap_or(&line).to_string())
    }
}

impl Captured {
    /// Reads `pipe` to its end on a thread.
    fn start(pipe: impl Read + Send + 'static) -> Arc<Self> {
        let captured = Arc::new(Captured::default());
        let sink = Arc::clone(&captured);
        thread::spawn(move || sink.read_to_end(pipe));
        captured
    }

    fn read_to_end(&self, mut pipe: impl Read) {
        let mut chunk = [0u8; 64 * 1024];
        while let Ok(n @ 1..) = pipe.read(&mut chunk) {
            self.lock().bytes.extend_from_slice(&chunk[..n]);
            self.more.notify_all();
        }
        self.lock().closed = true;
        self.more.notify_all();
    }

    fn lock(&self) -> MutexGuard<'_, Capture> {
        self.state.lock().expect("captured output")
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, Capture>, left: Duration) -> MutexGuard<'a, Capture> {
        self.more
            .wait_timeout(guard, left)
            .expect("captured output")
            .0
    }

    /// Waits at most `timeout` for the pipe to end.
    fn wait_closed(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut captured = self.lock();
        while !captured.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            captured = self.wait(captured, left);
        }
    }
}

/// A child process killed (with its descendants) on drop: background `ssh -N`, masters.
pub struct Background {
    /// The process.
    pub child: Child,
    what: String,
}

impl Background {
    /// Spawns `cmd` with stdin from /dev/null, stdout discarded and stderr to
    /// `log_dir/<what>.stderr`, so the process never blocks on a full pipe; read it with
    /// [`stderr`](Self::stderr).
    pub fn spawn(cmd: &mut Command, what: &str, log_dir: &Path) -> Self {
        let err = std::fs::File::create(log_dir.join(format!("{what}.stderr")))
            .expect("create stderr file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        Background {
            child,
            what: what.into(),
        }
    }

    /// What it wrote to stderr so far.
    pub fn stderr(&self, log_dir: &Path) -> String {
        std::fs::read_to_string(log_dir.join(format!("{}.stderr", self.what))).unwrap_or_default()
    }

    /// Its exit status if it exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            kill_tree(self.child.id());
        }
        let _ = self.child.wait();
    }
}

/// One SSH connection shared by several `ssh` invocations (OpenSSH `ControlMaster`): each
/// [`client`](Self::client) command is a new channel on the master's connection.
pub struct Multiplexed {
    master: Background,
    control: PathBuf,
    client: SshClient,
    dir: TempDir,
}

impl Multiplexed {
    /// Starts `ssh -N` as the master for `client` and waits (20 s at most) for its control
    /// socket.
    pub fn start(client: &SshClient) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("poolgate-mux-")
            .tempdir()
            .expect("create the control dir");
        let control = dir.path().join("ctl");
        let master = Background::spawn(
            &mut client
                .clone()
                .option("ControlMaster=yes")
                .option(&format!("ControlPath={}", control.display()))
                .ssh_command(&["-N"], None),
            "master",
            dir.path(),
        );
        let mut mux = Multiplexed {
            master,
            client: client
                .clone()
                .option("ControlMaster=no")
                .option(&format!("ControlPath={}", control.display())),
            control,
            dir,
        };
        let ready = poll(Duration::from_secs(20), || {
            if let Some(status) = mux.master.try_wait() {
                panic!(
                    "the ControlMaster exited with {status}: {}",
                    mux.master.stderr(mux.dir.path())
                );
            }
            mux.control.exists()
        });
        assert!(
            ready,
            "no control socket after 20 s: {}",
            mux.master.stderr(mux.dir.path())
        );
        mux
    }

    /// A client whose commands run as new channels on the master's connection.
    pub fn client(&self) -> SshClient {
        self.client.clone()
    }
}

/// A command still running when the gateway is signalled: `echo started; sleep SECONDS; echo
/// finished; exit 7`. Its own exit status and whole output must come through.
pub struct RunningCommand(Child);

impl RunningCommand {
    /// Starts it through `client`, for `seconds`.
    pub fn start(client: &SshClient, seconds: u32) -> Self {
        Self(client.spawn(&format!(
            "echo started; sleep {seconds}; echo finished; exit 7"
        )))
    }

    /// Waits (20 s at most) for it to end and asserts it ran to its end: status 7, both lines.
    pub fn assert_ran_to_its_end(mut self) {
        let (status, out, err) =
            crate::wait_for_output(&mut self.0, Duration::from_secs(20), "the running command");
        assert_eq!(
            status.code(),
            Some(7),
            "its own exit status comes through: {err}"
        );
        assert_eq!(out, "started\nfinished\n");
    }
}

impl Drop for RunningCommand {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
