//! The autoscaler as the admin API and status page show it: a read-only view, and the trait
//! through which the admin side asks for it (so `admin` depends on `autoscale`, never the
//! reverse).

use serde::Serialize;

/// The autoscaler as the admin API and status page show it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AutoscaleView {
    /// Whether autoscaling is on.
    pub enabled: bool,
    /// Running VMs aimed for.
    pub desired_vms: u32,
    /// `min_vms`..`max_vms`.
    pub min_vms: u32,
    /// Upper bound.
    pub max_vms: u32,
    /// Connections waiting for a VM.
    pub waiting: u32,
    /// VMs a schedule window keeps warm now (0 outside every window).
    pub schedule_min_vms: u32,
    /// The last decision, in words.
    pub last_decision: Option<String>,
    /// Why the autoscaler does not act now: the provider's listing fails (since how long, and
    /// its error). Absent while listings work.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider_error: Option<String>,
    /// Last busy-check verdict per VM (true = kept: work running or unknown); shown per VM.
    #[serde(skip)]
    pub busy: std::collections::BTreeMap<String, bool>,
}

/// Source of [`AutoscaleView`] (the autoscaler driver implements it).
pub trait AutoscaleStatus: Send + Sync {
    /// The current view.
    fn view(&self) -> AutoscaleView;
}
