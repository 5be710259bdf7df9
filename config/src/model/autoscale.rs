//! `[autoscale]`: the session-aware autoscaler.

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::enums::Weekday;
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
    /// Time-of-day floors (`[[autoscale.schedule]]`): while a window is on, at least its
    /// `min_vms` VMs are kept running, started ahead by `boot_estimate` so that they are warm
    /// when the window opens. Outside every window the usual rules apply.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub schedule: Vec<ScheduleWindow>,
}

/// One `[[autoscale.schedule]]` window (as Azure Virtual Desktop's scaling plans have them: a
/// ramp-up or peak period keeps a minimum of warm VMs).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct ScheduleWindow {
    /// Days on which the window opens (every day when unset). A window that ends after
    /// midnight (`to` earlier than `from`) runs into the next day.
    pub days: Vec<Weekday>,
    /// Local time the window opens, `"HH:MM"`; required.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<TimeOfDay>,
    /// Local time it closes, `"HH:MM"` (`"24:00"` = midnight at the end of the day); required.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<TimeOfDay>,
    /// IANA time zone of `from` and `to` (`"Europe/Berlin"`); daylight saving is followed.
    pub time_zone: String,
    /// Running VMs kept while the window is on (at least 1, at most `autoscale.max_vms`).
    pub min_vms: u32,
}

impl Default for ScheduleWindow {
    fn default() -> Self {
        Self {
            days: Weekday::ALL.to_vec(),
            from: None,
            to: None,
            time_zone: "UTC".to_owned(),
            min_vms: 1,
        }
    }
}

/// A local time of day, `"HH:MM"` from `"00:00"` to `"24:00"`, in minutes after midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TimeOfDay(u16);

impl TimeOfDay {
    /// Minutes after midnight (0..=1440).
    pub fn minutes(self) -> u16 {
        self.0
    }
}

impl std::fmt::Display for TimeOfDay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:02}:{:02}", self.0 / 60, self.0 % 60)
    }
}

impl std::str::FromStr for TimeOfDay {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "invalid time of day \"{s}\" (write it \"HH:MM\", 24-hour, e.g. \"07:30\"; \"24:00\" is the end of the day)"
            )
        };
        let (h, m) = s.trim().split_once(':').ok_or_else(bad)?;
        if h.is_empty() || h.len() > 2 || m.len() != 2 {
            return Err(bad());
        }
        let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        if m >= 60 || h > 24 || (h == 24 && m > 0) {
            return Err(bad());
        }
        Ok(Self(h * 60 + m))
    }
}

impl Serialize for TimeOfDay {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TimeOfDay {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
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
            schedule: Vec::new(),
        }
    }
}
