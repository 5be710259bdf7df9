//! Running commands with a deadline, polling for conditions, and killing process trees.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::{Read, Write};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A command that did not finish within its timeout. It has been killed (with its descendants);
/// `stdout`/`stderr` hold what it wrote until then.
#[derive(Debug)]
pub struct TimedOut {
    /// The command line, as `Debug` prints it.
    pub command: String,
    /// The timeout that expired.
    pub timeout: Duration,
    /// Standard output written before the kill.
    pub stdout: Vec<u8>,
    /// Standard error written before the kill.
    pub stderr: Vec<u8>,
}

impl fmt::Display for TimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} did not finish within {:?} and was killed\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command,
            self.timeout,
            String::from_utf8_lossy(&self.stdout),
            String::from_utf8_lossy(&self.stderr)
        )
    }
}

impl std::error::Error for TimedOut {}

/// Runs `cmd` with stdin from `/dev/null`, capturing stdout and stderr; panics (with the command
/// and its partial output) if it does not finish within `timeout`.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    try_run_with_timeout(cmd, None, timeout).unwrap_or_else(|e| panic!("{e}"))
}

/// Like [`run_with_timeout`] but feeds `input` to the command's stdin, then closes it.
pub fn run_with_input(cmd: &mut Command, input: &[u8], timeout: Duration) -> Output {
    try_run_with_timeout(cmd, Some(input), timeout).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `cmd` to completion or until `timeout`, capturing stdout and stderr. `input`, when given,
/// is written to stdin (then closed); otherwise stdin is `/dev/null`. On timeout the command and
/// all its descendants are killed and reaped, and the partial output is returned in the error.
/// Panics only if the command cannot be spawned (with a message naming it).
pub fn try_run_with_timeout(
    cmd: &mut Command,
    input: Option<&[u8]>,
    timeout: Duration,
) -> Result<Output, TimedOut> {
    let started = Instant::now();
    let deadline = started + timeout;
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        let input = input.to_vec();
        // A command that never reads its stdin must not block us: write from a thread. An error
        // (the command exited before reading everything) is the command's business.
        thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
    }
    let stdout = Capture::start(child.stdout.take().expect("piped stdout"));
    let stderr = Capture::start(child.stderr.take().expect("piped stderr"));

    let status = wait_child(&mut child, deadline);
    let Some(status) = status else {
        kill_tree(child.id());
        let _ = child.wait();
        return Err(TimedOut {
            command: format!("{cmd:?}"),
            timeout,
            stdout: stdout.finish(Instant::now() + Duration::from_secs(1)),
            stderr: stderr.finish(Instant::now() + Duration::from_secs(1)),
        });
    };
    // A descendant that inherited the pipes could keep them open past the exit: bound the wait.
    let tail = deadline.max(Instant::now()) + Duration::from_secs(2);
    Ok(Output {
        status,
        stdout: stdout.finish(tail),
        stderr: stderr.finish(tail),
    })
}

/// Waits up to `timeout` for `child` to exit and returns its status. On timeout it kills the
/// child and its descendants, reaps it and panics naming `what`.
pub fn wait_for_exit(child: &mut Child, timeout: Duration, what: &str) -> ExitStatus {
    if let Some(status) = wait_child(child, Instant::now() + timeout) {
        return status;
    }
    kill_tree(child.id());
    let _ = child.wait();
    panic!(
        "{what} (pid {}) did not exit within {timeout:?}; killed it",
        child.id()
    );
}

/// [`wait_for_exit`], then [`piped_output`] (for commands whose output fits the pipes'
/// buffers).
pub fn wait_for_output(
    child: &mut Child,
    timeout: Duration,
    what: &str,
) -> (ExitStatus, String, String) {
    let status = wait_for_exit(child, timeout, what);
    let (out, err) = piped_output(child);
    (status, out, err)
}

/// What `child` wrote to its stdout and stderr, each read to its end if it is still piped here
/// (empty if not, or taken already).
pub fn piped_output(child: &mut Child) -> (String, String) {
    fn read_all(pipe: Option<impl std::io::Read>) -> String {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    }
    (read_all(child.stdout.take()), read_all(child.stderr.take()))
}

/// Reaps `child` if it exits before `deadline`; `None` if it is still running then.
pub(crate) fn wait_child(child: &mut Child, deadline: Instant) -> Option<ExitStatus> {
    let mut backoff = Backoff::new();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait on a child process") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        backoff.sleep_until(deadline);
    }
}

/// Polls `condition` until it returns true; panics after `timeout` with "timed out after …
/// waiting for {what}". Use it for real conditions (a file appears, a log line is written).
pub fn wait_until(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    let mut backoff = Backoff::new();
    loop {
        if condition() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        backoff.sleep_until(deadline);
    }
}

/// Runs `f`, a blocking fixture call (starting processes, polling the admin API), on tokio's
/// blocking pool, so an async test's workers keep serving its connections meanwhile. Panics
/// when `f` does.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(value) => value,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("blocking task: {e}"),
        },
    }
}

/// Polls `condition` (1 ms doubling to 50 ms) until it is true or `timeout` passes; returns
/// whether it became true. For waits whose failure message needs state from the closure.
pub fn poll(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut backoff = Backoff::new();
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        backoff.sleep_until(deadline);
    }
}

/// Kills process `root` and every descendant it has right now, without racing new forks: each
/// process found is stopped (SIGSTOP) until the tree stops growing, then all get SIGKILL. Waits
/// (up to 5 s) until the descendants are gone; the caller reaps `root` if it is its child.
/// sshd's per-connection processes call `setsid()`, so killing a process group would miss them.
pub fn kill_tree(root: u32) {
    let root = root as i32;
    let mut frozen: Vec<i32> = Vec::new();
    let mut seen = HashSet::new();
    for _ in 0..50 {
        let fresh: Vec<i32> = tree(root).into_iter().filter(|p| seen.insert(*p)).collect();
        if fresh.is_empty() {
            break;
        }
        for pid in fresh {
            let _ = kill(Pid::from_raw(pid), Signal::SIGSTOP);
            frozen.push(pid);
        }
    }
    for pid in &frozen {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
    let descendants: Vec<i32> = frozen.into_iter().filter(|p| *p != root).collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut backoff = Backoff::new();
    while descendants.iter().any(|p| alive(*p)) {
        if Instant::now() >= deadline {
            eprintln!("poolgate-tests: processes {descendants:?} under {root} survived SIGKILL");
            return;
        }
        backoff.sleep_until(deadline);
    }
}

/// Kills the process whose id it holds, and its descendants, when dropped: a process the test did
/// not start itself (a gateway's successor after an upgrade in place, say), so no `Child` reaps
/// it.
#[derive(Debug)]
pub struct KillTreeOnDrop(pub u32);

impl Drop for KillTreeOnDrop {
    fn drop(&mut self) {
        kill_tree(self.0);
    }
}

/// Sends `signal` to `pid`, ignoring "no such process".
pub(crate) fn signal(pid: u32, signal: Signal) {
    let _ = kill(Pid::from_raw(pid as i32), signal);
}

/// Sends `signal` to `root` and each of its descendants (a VM's sshd and the processes of its
/// sessions, say), ignoring those that are gone.
pub fn signal_tree(root: u32, signal: Signal) {
    let root = i32::try_from(root).expect("pid fits i32");
    for pid in tree(root) {
        let _ = kill(Pid::from_raw(pid), signal);
    }
}

/// Sends `signal` to process `pid`; panics when that fails (the process must exist).
pub fn send_signal(pid: u32, signal: Signal) {
    let pid = Pid::from_raw(i32::try_from(pid).expect("pid fits i32"));
    kill(pid, signal).unwrap_or_else(|e| panic!("kill -{signal} {pid}: {e}"));
}

/// `root` and its descendants, from the parent links in `/proc/*/stat`.
pub(crate) fn tree(root: i32) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            if let Some((ppid, _)) = stat(pid) {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        out.extend(children.get(&out[i]).into_iter().flatten().copied());
        i += 1;
    }
    out
}

/// (parent pid, state letter) of `pid`, or `None` if it does not exist.
fn stat(pid: i32) -> Option<(i32, char)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain anything: parse after the last ')'.
    let mut fields = text.get(text.rfind(')')? + 1..)?.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((ppid, state))
}

/// True if `pid` exists and is not a zombie (a killed orphan may stay a zombie when PID 1 of a
/// container does not reap; it no longer runs).
fn alive(pid: i32) -> bool {
    matches!(stat(pid), Some((_, state)) if state != 'Z' && state != 'X')
}

/// True while process `pid` runs: it exists and is not a zombie (one left to an init that does
/// not reap has ended).
pub fn is_alive(pid: u32) -> bool {
    i32::try_from(pid).is_ok_and(alive)
}

/// Sleeps between polls: 1 ms at first, doubling up to 50 ms, never past the deadline.
pub(crate) struct Backoff(Duration);

impl Backoff {
    pub(crate) fn new() -> Self {
        Backoff(Duration::from_millis(1))
    }

    pub(crate) fn sleep_until(&mut self, deadline: Instant) {
        let left = deadline.saturating_duration_since(Instant::now());
        thread::sleep(self.0.min(left));
        self.0 = (self.0 * 2).min(Duration::from_millis(50));
    }
}

/// Reads a pipe to its end on a thread, keeping what was read available even if it never ends.
struct Capture {
    buf: Arc<Mutex<Vec<u8>>>,
    done: std::sync::mpsc::Receiver<()>,
}

impl Capture {
    fn start(mut pipe: impl Read + Send + 'static) -> Self {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let (tx, done) = std::sync::mpsc::channel();
        let shared = Arc::clone(&buf);
        thread::spawn(move || {
            let mut chunk = [0u8; 64 * 1024];
            while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                shared.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
            let _ = tx.send(());
        });
        Capture { buf, done }
    }

    /// Everything read, once the pipe closes or `deadline` passes (whatever came until then).
    fn finish(self, deadline: Instant) -> Vec<u8> {
        let _ = self
            .done
            .recv_timeout(deadline.saturating_duration_since(Instant::now()));
        std::mem::take(&mut *self.buf.lock().unwrap())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_output_and_status() {
        let out = run_with_timeout(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(10),
        );
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
    }

    #[test]
    fn feeds_stdin() {
        let out = run_with_input(&mut Command::new("cat"), b"hello", Duration::from_secs(10));
        assert_eq!(out.stdout, b"hello");
    }

    #[test]
    fn kills_a_command_that_overruns_with_its_children() {
        let started = Instant::now();
        let err = try_run_with_timeout(
            Command::new("sh").args(["-c", "echo partial; sleep 30 & sleep 30; wait"]),
            None,
            Duration::from_millis(300),
        )
        .expect_err("sleep 30 overruns 300 ms");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(err.stdout, b"partial\n");
        assert!(err.to_string().contains("did not finish within"), "{err}");
    }
}
