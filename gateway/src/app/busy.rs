//! The autoscaler's busy check, wired from its two halves: the SSH side's forced-command login
//! (`ssh::forced_command`) runs `autoscale.busy_command` on the VM as `autoscale.busy_user`,
//! and the autoscaler's exit-status rules (`autoscale::busy`) read the result. Neither half
//! knows the other.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use router_core::VmSpec;

use crate::autoscale::busy::{BusyCheck, Verdict, interpret};
use crate::ssh::SshGateway;
use crate::ssh::forced_command::shell_quote;

/// Runs `autoscale.busy_command` on VMs over SSH.
pub(super) struct SshBusyCheck {
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
    pub(super) fn new(gw: Arc<SshGateway>, user: &str, argv: &[String], timeout: Duration) -> Self {
        Self {
            gw,
            user: user.to_string(),
            command: shell_quote(argv),
            timeout,
            builtin: argv == poolgate_config::default_busy_command().as_slice(),
        }
    }
}

impl BusyCheck for SshBusyCheck {
    fn check<'a>(&'a self, vm: &'a VmSpec) -> BoxFuture<'a, Verdict> {
        Box::pin(async move {
            let run = self
                .gw
                .run_forced_command(vm, &self.user, &self.command, self.timeout);
            match tokio::time::timeout(self.timeout, run).await {
                Ok(Ok(ran)) => interpret(
                    self.builtin,
                    &self.user,
                    ran.status,
                    ran.signal.as_deref(),
                    &ran.output,
                ),
                Ok(Err(reason)) => Verdict::Unknown(reason),
                Err(_) => Verdict::Unknown(format!(
                    "no answer within autoscale.busy_timeout ({})",
                    humantime::format_duration(self.timeout)
                )),
            }
        })
    }
}
