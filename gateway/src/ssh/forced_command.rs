//! A forced-command login: the gateway logs in to a VM's sshd with a fresh key and a
//! certificate from its user CA whose `force-command` critical option pins it to one command,
//! runs it and reads how it ended. The VM's host key is verified exactly as for user sessions.
//! The autoscaler's busy check is built on it (in the composition root); nothing here knows
//! what the command means.

use std::time::Duration;

use router_core::VmSpec;
use russh::ChannelMsg;

use super::SshGateway;
use super::backend::{self, Credential, Target};

/// Most stdout kept from a command (callers read its first line).
const MAX_OUTPUT: usize = 4096;

/// Lifetime of a forced-command certificate: enough to log in, short enough to be useless later.
const CERT_VALIDITY: Duration = Duration::from_secs(60);

/// How a forced command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutcome {
    /// Its exit status, when it exited.
    pub status: Option<u32>,
    /// The signal that killed it, when one did.
    pub signal: Option<String>,
    /// The start of its stdout (at most 4 KiB), lossily decoded.
    pub output: String,
}

impl SshGateway {
    /// Logs in to `vm` as `user` with a certificate whose force-command is `command` (one shell
    /// command line, see [`shell_quote`]) and runs it. Connecting and logging in are bounded by
    /// `connect_timeout`; the caller bounds the whole run. Errors say what failed, in words.
    pub async fn run_forced_command(
        &self,
        vm: &VmSpec,
        user: &str,
        command: &str,
        connect_timeout: Duration,
    ) -> Result<CommandOutcome, String> {
        let target = Target {
            vm: &vm.name,
            host: &vm.host,
            port: vm.ssh_port,
            user,
        };
        let credential = Credential::Check {
            ca: &self.ca,
            command,
            validity: CERT_VALIDITY,
        };
        let backend = backend::connect(
            &target,
            credential,
            self.host_policy(),
            self.client_config.clone(),
            connect_timeout,
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
        Ok(CommandOutcome {
            status,
            signal,
            output: String::from_utf8_lossy(&output).into_owned(),
        })
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
