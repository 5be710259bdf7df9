//! Running an operator's command (the exec provider's scripts, Slurm's client commands): argv
//! without a shell, stdin closed, bounded in time and killed past it, stdout returned, and a
//! failure described with the end of its stderr.

use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

/// Runs `argv` followed by `extra`; `timeout_key` names the setting that bounds it in the
/// message when it runs too long. Errors are one line for the log.
pub async fn run(
    argv: &[String],
    extra: &[String],
    timeout: Duration,
    timeout_key: &str,
) -> Result<String, String> {
    let Some((program, args)) = argv.split_first() else {
        return Err("no command is configured".to_owned());
    };
    let child = Command::new(program)
        .args(args)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let output = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| {
            format!(
                "{program} did not finish within {} ({timeout_key}); killed",
                humantime::format_duration(timeout)
            )
        })?
        .map_err(|e| format!("{program}: {e}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let mut tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        tail.reverse();
        return Err(format!(
            "{program} exited with {}: {}",
            output.status,
            tail.join(" | ")
        ));
    }
    String::from_utf8(output.stdout).map_err(|_| format!("{program}: output is not UTF-8"))
}
