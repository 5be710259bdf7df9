//! The autoscaler's busy check over SSH: the gateway logs in to the VM as
//! `autoscale.busy_user` with a fresh key and a certificate from its user CA whose
//! `force-command` pins it to `autoscale.busy_command`, and reads the exit status. The VM's host
//! key is verified exactly as for user sessions.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use router_core::VmSpec;
use russh::ChannelMsg;

use super::SshGateway;
use super::backend::{self, Credential, Target};
use crate::autoscale::busy::{BusyCheck, Verdict, verdict};

/// Most stdout kept from a check (only its first line is used).
const MAX_OUTPUT: usize = 4096;

/// Lifetime of a check certificate: enough to log in, short enough to be useless later.
const CERT_VALIDITY: Duration = Duration::from_secs(60);

/// Runs `autoscale.busy_command` on VMs over SSH.
pub struct SshBusyCheck {
    gw: Arc<SshGateway>,
    user: String,
    command: String,
    timeout: Duration,
    /// `command` is the built-in check, which says `idle: …` when it exits 1.
    builtin: bool,
}

impl std::fmt::Debug for SshBusyCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshBusyCheck")
            .field("user", &self.user)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl SshBusyCheck {
    /// A check that logs in as `user` and runs `argv` (shell-quoted into the certificate's
    /// force-command); the whole check (connect, login, command) is bounded by `timeout`.
    pub fn new(gw: Arc<SshGateway>, user: &str, argv: &[String], timeout: Duration) -> Self {
        Self {
            gw,
            user: user.to_string(),
            command: shell_quote(argv),
            timeout,
            builtin: argv == poolgate_config::default_busy_command().as_slice(),
        }
    }

    async fn run(&self, vm: &VmSpec) -> Result<Verdict, String> {
        let target = Target {
            vm: &vm.name,
            host: &vm.host,
            port: vm.ssh_port,
            user: &self.user,
        };
        let credential = Credential::Check {
            ca: &self.gw.ca,
            command: &self.command,
            validity: CERT_VALIDITY,
        };
        let backend = backend::connect(
            &target,
            credential,
            self.gw.host_policy(),
            self.gw.client_config.clone(),
            self.timeout,
        )
        .await
        .map_err(|e| match e {
            backend::BackendError::AuthRefused { vm, user } => format!(
                "{vm} refused the login of {user} (does the account exist, and does sshd accept the gateway CA's principal {user} for it? see deploy/cloud-init/pool-vm.yaml)"
            ),
            other => other.to_string(),
        })?;
        let handle = backend.handle;
        let mut channel = handle
            .channel_open_session()
            .await
            .map_err(|e| format!("{}: opening a session failed: {e}", vm.name))?;
        // sshd runs the certificate's force-command whatever is asked; ask for nothing else.
        channel
            .exec(true, "poolgate-busy-check")
            .await
            .map_err(|e| format!("{}: starting the check failed: {e}", vm.name))?;
        let mut output = Vec::new();
        let mut status = None;
        let mut signal = None;
        while let Some(msg) = channel.wait().await {
            match msg {
                ChannelMsg::Data { data } => {
                    let room = MAX_OUTPUT.saturating_sub(output.len());
                    output.extend_from_slice(&data[..data.len().min(room)]);
                }
                ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                ChannelMsg::ExitSignal { signal_name, .. } => {
                    signal = Some(format!("{signal_name:?}"));
                }
                ChannelMsg::Close => break,
                _ => {}
            }
        }
        let _ = handle
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
        Ok(interpret(
            self.builtin,
            &self.user,
            status,
            signal.as_deref(),
            &String::from_utf8_lossy(&output),
        ))
    }
}

impl BusyCheck for SshBusyCheck {
    fn check<'a>(&'a self, vm: &'a VmSpec) -> BoxFuture<'a, Verdict> {
        Box::pin(async move {
            match tokio::time::timeout(self.timeout, self.run(vm)).await {
                Ok(Ok(verdict)) => verdict,
                Ok(Err(reason)) => Verdict::Unknown(reason),
                Err(_) => Verdict::Unknown(format!(
                    "no answer within autoscale.busy_timeout ({})",
                    humantime::format_duration(self.timeout)
                )),
            }
        })
    }
}

/// The verdict of one run. The built-in check must also say `idle: …` for an exit status of 1:
/// a login shell that runs no command (`nologin`, `false`) exits 1 too, and must not pass for
/// "idle" — that would scale in VMs whatever runs there.
fn interpret(
    builtin: bool,
    user: &str,
    status: Option<u32>,
    signal: Option<&str>,
    output: &str,
) -> Verdict {
    match verdict(status, signal, output) {
        Verdict::Idle if builtin && !output.trim_start().starts_with("idle:") => {
            Verdict::Unknown(format!(
                "the check exited with status 1 without saying \"idle:\" (the login shell of {user} on the VM must be /bin/sh, not nologin or false): {}",
                output
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .chars()
                    .take(120)
                    .collect::<String>()
            ))
        }
        other => other,
    }
}

/// `argv` as one POSIX shell command line: every word in single quotes (a `'` inside becomes
/// `'\''`), so sshd's `sh -c` runs exactly these words.
pub fn shell_quote(argv: &[String]) -> String {
    argv.iter()
        .map(|arg| format!("'{}'", arg.replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_check_must_say_idle() {
        let user = "poolgate-probe";
        assert_eq!(
            interpret(
                true,
                user,
                Some(1),
                None,
                "idle: no work of login users is running\n"
            ),
            Verdict::Idle
        );
        let Verdict::Unknown(why) = interpret(
            true,
            user,
            Some(1),
            None,
            "This account is currently not available.\n",
        ) else {
            panic!("nologin's exit 1 must not count as idle")
        };
        assert!(
            why.contains("/bin/sh") && why.contains("not available"),
            "{why}"
        );
        // A custom command: exit 1 is idle, whatever it prints.
        assert_eq!(interpret(false, user, Some(1), None, ""), Verdict::Idle);
        assert!(matches!(
            interpret(
                true,
                user,
                Some(0),
                None,
                "busy: sleep (pid 2) of ann is running"
            ),
            Verdict::Busy(_)
        ));
    }

    #[test]
    fn shell_quoting_keeps_every_word_whole() {
        let argv: Vec<String> = ["/bin/sh", "-c", "echo 'a b' $HOME; exit 1", "name"]
            .map(String::from)
            .to_vec();
        let line = shell_quote(&argv);
        assert_eq!(
            line,
            r#"'/bin/sh' '-c' 'echo '\''a b'\'' $HOME; exit 1' 'name'"#
        );
        // A real shell splits it back into the same words.
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("for w in {line}; do printf '<%s>' \"$w\"; done"))
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "</bin/sh><-c><echo 'a b' $HOME; exit 1><name>"
        );
    }
}
