//! `[batch]`: the batch half of the pool — Slurm on the same VMs, its queue read by the
//! autoscaler and its nodes drained and resumed with the VMs.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::enums::BatchEngine;
use crate::serde_util::duration;

/// `[batch]`: present when the pool VMs also run Slurm jobs. Absent: no batch, and `pool` is an
/// ordinary command on the VMs.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Batch {
    /// The scheduler: `"slurm"` (the only one).
    pub engine: BatchEngine,
    /// Slurm partition of the pool VMs: the queue the autoscaler reads, where `pool submit`
    /// sends jobs.
    pub partition: String,
    /// Slurm node name of a pool VM; `{vm}` is replaced by the VM's name.
    pub node_name: String,
    /// argv that runs `squeue` on the gateway (prefix: poolgate appends its options). Point it
    /// at a wrapper to read the queue elsewhere (e.g. `["ssh", "slurm-head", "squeue"]`).
    pub squeue: Vec<String>,
    /// argv that runs `sinfo` on the gateway (node states; prefix like `squeue`).
    pub sinfo: Vec<String>,
    /// argv that runs `scontrol` on the gateway (drains and resumes nodes; prefix like `squeue`).
    pub scontrol: Vec<String>,
    /// Longest one of those commands may take; longer is a failed read (the last view is kept).
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// `ssh HOST pool submit|jobs|logs|cancel …`: exec requests whose first word is `pool` run
    /// the matching Slurm command as the user on a VM. `false`: `pool` is relayed like any
    /// command.
    pub verbs: bool,
}

impl Default for Batch {
    fn default() -> Self {
        Self {
            engine: BatchEngine::Slurm,
            partition: "pool".to_owned(),
            node_name: "{vm}".to_owned(),
            squeue: vec!["squeue".to_owned()],
            sinfo: vec!["sinfo".to_owned()],
            scontrol: vec!["scontrol".to_owned()],
            timeout: Duration::from_secs(20),
            verbs: true,
        }
    }
}

impl Batch {
    /// The Slurm node name of VM `vm`.
    pub fn node_of(&self, vm: &str) -> String {
        self.node_name.replace("{vm}", vm)
    }
}
