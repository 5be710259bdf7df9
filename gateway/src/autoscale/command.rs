//! Running an operator's command (the exec provider's scripts, Slurm's client commands): argv
//! without a shell, stdin closed, bounded in time and killed past it, stdout returned, and a
//! failure described with the end of its stderr.

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

/// How long output is still read after the command exited: a script that started a daemon in
/// the background (`sshd &`, `nohup agent &`) without redirecting its output leaves that daemon
/// holding the pipe, and waiting for the pipe to close would wait for the daemon.
const OUTPUT_AFTER_EXIT: Duration = Duration::from_secs(1);

/// Most output kept from one command (a listing of thousands of VMs fits many times over).
const MAX_OUTPUT: u64 = 16 << 20;

/// Runs `argv` followed by `extra`; `timeout_key` names the setting that bounds it in the
/// message when it runs too long. Errors are one line for the log.
///
/// The command runs in a process group of its own: past the timeout the whole group is killed,
/// not only the command (a hung `sh` script's `az vm start` would otherwise go on, and might
/// start a VM after the gateway logged the start as failed). It is done when it exits, whatever
/// it left running in the background.
pub async fn run(
    argv: &[String],
    extra: &[String],
    timeout: Duration,
    timeout_key: &str,
) -> Result<String, String> {
    let Some((program, args)) = argv.split_first() else {
        return Err("no command is configured".to_owned());
    };
    let mut child = Command::new(program)
        .args(args)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let group = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw);
    // Kills the group if this future is dropped (an action cancelled, the gateway stopping)
    // or the command runs past its time; disarmed once the command has exited and been reaped,
    // when its pid may belong to another process.
    let mut guard = KillGroupOnDrop(group);
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(format!("{program}: no output pipes"));
    };
    let mut out = Vec::new();
    let mut err = Vec::new();
    let status = {
        let outputs = async {
            let _ = tokio::join!(read_all(stdout, &mut out), read_all(stderr, &mut err));
        };
        tokio::pin!(outputs);
        let mut read = false;
        let exited = tokio::time::timeout(timeout, async {
            tokio::select! {
                status = child.wait() => status,
                () = &mut outputs => {
                    read = true;
                    child.wait().await
                }
            }
        })
        .await;
        let Ok(status) = exited else {
            // Still running, so not reaped: the group is its own.
            drop(guard);
            return Err(format!(
                "{program} did not finish within {} ({timeout_key}); killed with what it started",
                humantime::format_duration(timeout)
            ));
        };
        guard.0 = None;
        // Output written before the exit, and what arrives shortly after; not what a daemon
        // left behind holding the pipe writes later. Never an error: the command is done.
        if !read {
            let _ = tokio::time::timeout(OUTPUT_AFTER_EXIT, &mut outputs).await;
        }
        status.map_err(|e| format!("{program}: {e}"))?
    };
    if !status.success() {
        let stderr = String::from_utf8_lossy(&err);
        let mut tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        tail.reverse();
        return Err(format!(
            "{program} exited with {status}: {}",
            tail.join(" | ")
        ));
    }
    String::from_utf8(out).map_err(|_| format!("{program}: output is not UTF-8"))
}

/// Reads `from` to its end into `into`, keeping at most [`MAX_OUTPUT`] bytes and discarding
/// the rest (a command is never left blocked on a full pipe).
async fn read_all(from: impl AsyncRead + Unpin, into: &mut Vec<u8>) {
    let mut limited = from.take(MAX_OUTPUT);
    let _ = limited.read_to_end(into).await;
    let _ = tokio::io::copy(&mut limited.into_inner(), &mut tokio::io::sink()).await;
}

/// Kills a process group when dropped, unless disarmed (`None`).
struct KillGroupOnDrop(Option<Pid>);

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        if let Some(group) = self.0 {
            let _ = killpg(group, Signal::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::run;

    fn argv(script: &str) -> Vec<String> {
        ["sh", "-c", script].map(str::to_owned).to_vec()
    }

    #[tokio::test]
    async fn a_script_that_leaves_a_daemon_on_its_output_is_done_when_it_exits() {
        let started = Instant::now();
        let out = run(
            &argv("echo started; sleep 4 & echo listed"),
            &[],
            Duration::from_secs(20),
            "pool.exec.timeout",
        )
        .await
        .expect("the script exited 0");
        assert_eq!(out, "started\nlisted\n");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn past_the_timeout_the_command_and_what_it_started_are_killed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let pid_file = dir.path().join("child.pid");
        let err = run(
            &argv(&format!(
                "sleep 300 & echo $! > {}; wait",
                pid_file.display()
            )),
            &[],
            Duration::from_millis(500),
            "pool.exec.timeout",
        )
        .await
        .expect_err("timed out");
        assert!(err.contains("pool.exec.timeout"), "{err}");
        let pid = std::fs::read_to_string(&pid_file).expect("pid file");
        let alive = || {
            std::fs::read_to_string(format!("/proc/{}/status", pid.trim())).is_ok_and(|s| {
                !s.lines()
                    .any(|l| l.starts_with("State:") && l.contains('Z'))
            })
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!alive(), "the script's child outlived the timeout");
    }

    #[tokio::test]
    async fn a_failure_names_the_end_of_stderr() {
        let err = run(
            &argv("echo one >&2; echo QuotaExceeded >&2; exit 3"),
            &[],
            Duration::from_secs(5),
            "pool.exec.timeout",
        )
        .await
        .expect_err("exit 3");
        assert!(
            err.contains("exit status: 3") && err.contains("one | QuotaExceeded"),
            "{err}"
        );
    }
}
