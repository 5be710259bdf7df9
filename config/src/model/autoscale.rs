//! `[autoscale]`: the session-aware autoscaler.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::serde_util::duration;

/// `[autoscale]`: grow the pool under load, drain idle VMs, scale to zero, wake on connect.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Autoscale {
    /// Run the autoscaler (needs the `azure-vmss`, `exec` or `demo` provider).
    pub enabled: bool,
    /// Never fewer VMs than this (0 allows scaling to zero).
    pub min_vms: u32,
    /// Never more VMs than this.
    pub max_vms: u32,
    /// Target sessions per VM when sizing the pool.
    pub sessions_per_vm: u32,
    /// Idle VMs kept ready on top of the target.
    pub spare_vms: u32,
    /// A VM idle this long is drained and removed.
    #[serde(with = "duration")]
    pub scale_in_after: Duration,
    /// With `min_vms = 0`, the whole pool idle this long goes to zero.
    #[serde(with = "duration")]
    pub scale_to_zero_after: Duration,
    /// A connection to an empty pool starts a VM.
    pub wake_on_connect: bool,
    /// How long such a connection is held waiting for the VM.
    #[serde(with = "duration")]
    pub hold_connect_for: Duration,
    /// Time between autoscaler decisions.
    #[serde(with = "duration")]
    pub tick: Duration,
    /// Minimum time between two scaling actions.
    #[serde(with = "duration")]
    pub cooldown: Duration,
    /// Expected time for a new VM to become healthy (used to scale out early enough).
    #[serde(with = "duration")]
    pub boot_estimate: Duration,
    /// Command run on a VM over SSH before it is drained for scale-in and again before it is
    /// stopped: exit 0 = work is running (keep the VM), 1 = idle; `[]` turns the check off.
    pub busy_command: Vec<String>,
    /// Login name (certificate principal) the check runs as on the VM.
    pub busy_user: String,
    /// Time one check may take (connect, login, command); longer counts as "unknown" (kept).
    #[serde(with = "duration")]
    pub busy_timeout: Duration,
}

/// The default busy check, a POSIX shell script (a copy ships as deploy/vm/poolgate-busy-check;
/// a test keeps the two identical). Exit 0 when processes of login users (uid >= 1000) other
/// than idle per-user daemons, Jupyter servers and idle kernels run, 1 when none do.
pub const DEFAULT_BUSY_SCRIPT: &str = include_str!("poolgate-busy-check");

/// The default `autoscale.busy_command`: [`DEFAULT_BUSY_SCRIPT`] run by `/bin/sh -c`, so a VM
/// needs nothing installed for it.
pub fn default_busy_command() -> Vec<String> {
    vec![
        "/bin/sh".to_owned(),
        "-c".to_owned(),
        DEFAULT_BUSY_SCRIPT.to_owned(),
        "poolgate-busy-check".to_owned(),
    ]
}

impl Default for Autoscale {
    fn default() -> Self {
        Self {
            enabled: false,
            min_vms: 0,
            max_vms: 10,
            sessions_per_vm: 4,
            spare_vms: 1,
            scale_in_after: Duration::from_secs(15 * 60),
            scale_to_zero_after: Duration::from_secs(30 * 60),
            wake_on_connect: true,
            hold_connect_for: Duration::from_secs(5 * 60),
            tick: Duration::from_secs(10),
            cooldown: Duration::from_secs(2 * 60),
            boot_estimate: Duration::from_secs(90),
            busy_command: default_busy_command(),
            busy_user: "poolgate-probe".to_owned(),
            busy_timeout: Duration::from_secs(20),
        }
    }
}
