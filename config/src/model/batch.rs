//! `[batch]`: the batch half of the pool — Slurm on the same VMs, its queue read by the
//! autoscaler and its nodes drained and resumed with the VMs.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::enums::BatchEngine;
use crate::serde_util::duration;

/// `batch.rest_version` by default: the newest OpenAPI version of Slurm 22.05's slurmrestd.
pub const DEFAULT_REST_VERSION: &str = "v0.0.38";

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
    /// Also used with `rest_url`: slurmrestd's `v0.0.38` API (Slurm 22.05) has no node update.
    pub scontrol: Vec<String>,
    /// slurmrestd's base URL (`http://slurm-head:6820`): the queue and the nodes are read from
    /// `GET /slurm/{rest_version}/jobs` and `/nodes` with a JWT instead of `squeue` and `sinfo`.
    /// Drains and resumes still run `scontrol`. Unset: the client commands.
    pub rest_url: Option<String>,
    /// File holding the JWT for slurmrestd (`scontrol token username=… lifespan=…`, the bare
    /// token or its `SLURM_JWT=…` line), mode 0600. Read on every use, so a rotated token is
    /// picked up without a restart. Required with `rest_url`.
    pub rest_token_file: Option<PathBuf>,
    /// `X-SLURM-USER-NAME` sent to slurmrestd. Unset: the user the token was made for (its
    /// `sun` claim).
    pub rest_user: Option<String>,
    /// slurmrestd's OpenAPI plugin version in the URL: `"v0.0.38"`, the newest that Slurm 22.05
    /// (Debian bookworm) serves; slurmrestd lists its versions at `/openapi/v3`.
    pub rest_version: String,
    /// Longest one of those commands (or slurmrestd requests) may take; longer is a failed read
    /// (the last view is kept).
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// A pool VM running this long (as the provider lists it) whose Slurm node is still absent
    /// from the partition, or DOWN, UNKNOWN, FUTURE, not responding or powered down, counts as
    /// one whose slurmd never registered: logged once, exported, replaced for pending jobs while
    /// such VMs are fewer than the registered ones, and once they are as many, pending jobs
    /// start no more VMs. Covers a first boot (cloud-init installs and sets up slurmd);
    /// slurmd registers within seconds of its start. `0s`: no such check.
    #[serde(with = "duration")]
    pub register_within: Duration,
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
            rest_url: None,
            rest_token_file: None,
            rest_user: None,
            rest_version: DEFAULT_REST_VERSION.to_owned(),
            timeout: Duration::from_secs(20),
            register_within: Duration::from_secs(600),
            verbs: true,
        }
    }
}

impl Batch {
    /// The Slurm node name of VM `vm`.
    pub fn node_of(&self, vm: &str) -> String {
        self.node_name.replace("{vm}", vm)
    }

    /// True when the queue is read from slurmrestd (`rest_url` set).
    pub fn uses_rest(&self) -> bool {
        self.rest_url.is_some()
    }
}
