//! The batch half of the pool (`[batch]`): Slurm's queue as demand for the autoscaler, its nodes
//! as busy VMs, and drains kept in step with the VMs'.
//!
//! Slurm is read with its own client commands on the gateway (argv prefixes from the
//! configuration, so a wrapper can run them elsewhere): `squeue` for the partition's pending and
//! running jobs, `sinfo -N` for each node's state and drain reason, `scontrol update` to drain
//! and resume nodes. Or, with `batch.rest_url`, the queue and the nodes through slurmrestd with a
//! JWT ([`SlurmRest`]), drains and resumes still through `scontrol`. Nothing of Slurm's is stored
//! here; every tick reads it again.

use std::collections::HashMap;

use futures::future::BoxFuture;
use poolgate_config::Batch;

mod rest;

pub use rest::{SlurmRest, parse_rest_view};

/// Drain reason of a node poolgate drained for scale-in.
pub const SCALE_IN_REASON: &str = "poolgate-scale-in";
/// Drain reason of a node an operator drained through poolgate.
pub const OPERATOR_REASON: &str = "poolgate-drain";

/// Pending jobs waiting on these reasons would not start on more VMs: they are not demand.
const NOT_DEMAND: &[&str] = &[
    "Dependency",
    "DependencyNeverSatisfied",
    "BeginTime",
    "JobHeldUser",
    "JobHeldAdmin",
    "PartitionDown",
    "PartitionInactive",
    "PartitionTimeLimit",
    "PartitionNodeLimit",
    "InvalidAccount",
    "InvalidQOS",
];

/// What Slurm says about the pool at one instant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchView {
    /// Pending jobs of the partition (all reasons).
    pub pending_jobs: u32,
    /// Nodes the pending jobs that more VMs would help wait for.
    pub pending_nodes: u32,
    /// Running (or completing) jobs of the partition.
    pub running_jobs: u32,
    /// Each node of the partition, by Slurm node name.
    pub nodes: HashMap<String, NodeState>,
}

/// One Slurm node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeState {
    /// A job runs (or is completing) there.
    pub busy: bool,
    /// Drained or draining.
    pub drain: bool,
    /// The drain reason (`none` when there is none).
    pub reason: String,
    /// Why the node cannot take jobs for want of a registered, answering slurmd: Slurm's names
    /// for the states that say so ([`UNREGISTERED`], in that order, `+`-joined: `DOWN`,
    /// `DOWN+NOT_RESPONDING`, `UNKNOWN`, `IDLE`'s `POWERED_DOWN`, …), the same from `sinfo` and
    /// from slurmrestd. `None`: its slurmd has registered and answers.
    pub unregistered: Option<String>,
}

/// Node states and flags (slurmrestd's names) of a node whose slurmd has not registered or no
/// longer answers: never registered since slurmctld started or since it was set DOWN (`DOWN`,
/// `UNKNOWN`), only configured (`FUTURE`), registered with a configuration that does not match
/// slurm.conf (`INVALID_REG`, sinfo's `inval`), not answering pings (`NOT_RESPONDING`, sinfo's
/// `*`), or taken down or being brought up by Slurm's power saving (`POWERED_DOWN` `~`,
/// `POWERING_UP` `#`, `POWERING_DOWN` `%`).
pub const UNREGISTERED: &[&str] = &[
    "DOWN",
    "UNKNOWN",
    "FUTURE",
    "INVALID_REG",
    "NOT_RESPONDING",
    "POWERED_DOWN",
    "POWERING_UP",
    "POWERING_DOWN",
];

/// The [`UNREGISTERED`] names among `words` (upper case), in that order, `+`-joined; `None`
/// when there is none.
fn unregistered(words: &[&str]) -> Option<String> {
    let found: Vec<&str> = UNREGISTERED
        .iter()
        .copied()
        .filter(|u| words.contains(u))
        .collect();
    (!found.is_empty()).then(|| found.join("+"))
}

impl NodeState {
    /// Drained by poolgate (scale-in or an operator through poolgate).
    pub fn drained_by_poolgate(&self) -> bool {
        self.drain && self.reason.starts_with("poolgate")
    }
}

/// Reads a batch scheduler and drains or resumes its nodes.
pub trait BatchEngine: Send + Sync {
    /// The queue and the nodes now.
    fn observe(&self) -> BoxFuture<'_, Result<BatchView, String>>;
    /// Drains `node` with `reason` (no new job lands there; running ones go on).
    fn drain<'a>(&'a self, node: &'a str, reason: &'a str) -> BoxFuture<'a, Result<(), String>>;
    /// Takes a drained `node` back into service.
    fn resume<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<(), String>>;
    /// Deletes `node` from the scheduler (its VM is gone for good). Only a dynamic node (one its
    /// slurmd registered, `slurmd -Z`) can be deleted; Slurm refuses others.
    fn forget<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<(), String>>;
    /// The Slurm node name of VM `vm`.
    fn node_of(&self, vm: &str) -> String;
}

/// Slurm through its client commands.
#[derive(Debug, Clone)]
pub struct Slurm {
    config: Batch,
}

impl Slurm {
    /// Slurm as `[batch]` describes it.
    pub fn new(config: &Batch) -> Self {
        Self {
            config: config.clone(),
        }
    }

    async fn run(&self, argv: &[String], args: &[&str]) -> Result<String, String> {
        let extra: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        super::command::run(argv, &extra, self.config.timeout, "batch.timeout").await
    }
}

impl BatchEngine for Slurm {
    fn observe(&self) -> BoxFuture<'_, Result<BatchView, String>> {
        Box::pin(async move {
            let partition = self.config.partition.as_str();
            // Job id, compact state, nodes asked for, reason.
            let jobs = self
                .run(
                    &self.config.squeue,
                    &["-h", "-p", partition, "-t", "PD,R,CG", "-o", "%i|%t|%D|%r"],
                )
                .await?;
            // One line per node: name, state (with flags), drain reason.
            let nodes = self
                .run(
                    &self.config.sinfo,
                    &["-h", "-N", "-p", partition, "-o", "%N|%T|%E"],
                )
                .await?;
            Ok(parse_view(&jobs, &nodes))
        })
    }

    fn drain<'a>(&'a self, node: &'a str, reason: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let node_arg = format!("nodename={node}");
            let reason_arg = format!("reason={reason}");
            self.run(
                &self.config.scontrol,
                &["update", &node_arg, "state=drain", &reason_arg],
            )
            .await
            .map(drop)
        })
    }

    fn resume<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let node_arg = format!("nodename={node}");
            self.run(
                &self.config.scontrol,
                &["update", &node_arg, "state=resume"],
            )
            .await
            .map(drop)
        })
    }

    fn forget<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let node_arg = format!("nodename={node}");
            self.run(&self.config.scontrol, &["delete", &node_arg])
                .await
                .map(drop)
        })
    }

    fn node_of(&self, vm: &str) -> String {
        self.config.node_of(vm)
    }
}

/// True when a job pending for `reason` would start on more VMs (not held, not waiting on a
/// dependency, a begin time, a partition's or an association's limit).
fn is_demand(reason: &str) -> bool {
    let reason = reason.trim();
    !NOT_DEMAND
        .iter()
        .any(|r| reason == *r || reason.starts_with(&format!("{r},")))
        && !reason.starts_with("Assoc")
        && !reason.starts_with("QOS")
}

/// Builds the engine `[batch]` describes: slurmrestd with `rest_url`, else the client commands.
pub fn engine(config: &Batch) -> Result<std::sync::Arc<dyn BatchEngine>, String> {
    if config.uses_rest() {
        Ok(std::sync::Arc::new(SlurmRest::new(config)?))
    } else {
        Ok(std::sync::Arc::new(Slurm::new(config)))
    }
}

/// Parses `squeue -o '%i|%t|%D|%r'` and `sinfo -N -o '%N|%T|%E'` output. Lines that do not
/// parse are skipped.
pub fn parse_view(jobs: &str, nodes: &str) -> BatchView {
    let mut view = BatchView::default();
    for line in jobs.lines() {
        let fields: Vec<&str> = line.trim().split('|').collect();
        let [_id, state, count, reason] = fields.as_slice() else {
            continue;
        };
        let count: u32 = count.trim().parse().unwrap_or(1);
        match *state {
            "PD" => {
                view.pending_jobs += 1;
                if is_demand(reason) {
                    view.pending_nodes = view.pending_nodes.saturating_add(count);
                }
            }
            "R" | "CG" => view.running_jobs += 1,
            _ => {}
        }
    }
    for line in nodes.lines() {
        let fields: Vec<&str> = line.trim().splitn(3, '|').collect();
        let [name, state, reason] = fields.as_slice() else {
            continue;
        };
        // `%T` is the long state, with `*` (not responding), `~` (powered off), `#`, `!`, `%`,
        // `$`, `@`, `^`, `-` suffixes: "allocated", "mixed", "drained*", "draining", "idle~",
        // "down*", "unknown", "inval".
        let state = state.trim();
        let base: String = state
            .chars()
            .take_while(|c| c.is_ascii_alphabetic() || *c == '+' || *c == '_')
            .collect();
        let base = base.to_ascii_lowercase();
        let suffix = &state[base.len()..];
        let mut words: Vec<&str> = match base.trim_end_matches('+') {
            "down" => vec!["DOWN"],
            "unknown" => vec!["UNKNOWN"],
            "future" => vec!["FUTURE"],
            "inval" | "invalid" | "invalid_reg" => vec!["INVALID_REG"],
            "powered_down" => vec!["POWERED_DOWN"],
            "powering_up" => vec!["POWERING_UP"],
            "powering_down" => vec!["POWERING_DOWN"],
            _ => Vec::new(),
        };
        for (mark, word) in [
            ('*', "NOT_RESPONDING"),
            ('~', "POWERED_DOWN"),
            ('#', "POWERING_UP"),
            ('%', "POWERING_DOWN"),
        ] {
            if suffix.contains(mark) {
                words.push(word);
            }
        }
        let busy = base.starts_with("allocated")
            || base.starts_with("mixed")
            || base.starts_with("completing")
            || base == "draining";
        let drain = base.starts_with("drain");
        view.nodes.insert(
            name.trim().to_owned(),
            NodeState {
                busy,
                drain,
                reason: reason.trim().to_owned(),
                unregistered: unregistered(&words),
            },
        );
    }
    view
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_and_nodes_are_read_from_squeue_and_sinfo() {
        let jobs = "12|R|1|None\n13|PD|2|Resources\n14|PD|1|Priority\n15|PD|4|Dependency\n\
                    16|PD|1|JobHeldUser\n17|CG|1|None\n18|PD|1|ReqNodeNotAvail, UnavailableNodes:vm-[a-c]\n\
                    garbage\n";
        let nodes = "vm-a|allocated|none\nvm-b|drained*|poolgate-scale-in\nvm-c|idle~|none\n\
                     vm-d|draining|poolgate-drain\nvm-e|mixed|none\nvm-f|drained|maintenance by bob\n";
        let v = parse_view(jobs, nodes);
        assert_eq!(v.pending_jobs, 5);
        // 2 (Resources) + 1 (Priority) + 1 (nodes down or powered off): the rest would not
        // start on more VMs.
        assert_eq!(v.pending_nodes, 4);
        assert_eq!(v.running_jobs, 2);
        assert!(v.nodes["vm-a"].busy && !v.nodes["vm-a"].drain);
        assert!(!v.nodes["vm-b"].busy && v.nodes["vm-b"].drained_by_poolgate());
        assert!(!v.nodes["vm-c"].busy && !v.nodes["vm-c"].drain);
        // Draining: a job still runs there.
        assert!(v.nodes["vm-d"].busy && v.nodes["vm-d"].drained_by_poolgate());
        assert!(v.nodes["vm-e"].busy);
        // An admin's own drain is not poolgate's.
        assert!(v.nodes["vm-f"].drain && !v.nodes["vm-f"].drained_by_poolgate());
        // All of them registered, but vm-b (not responding) and vm-c (powered down).
        let unregistered: Vec<(&str, Option<&str>)> = ["vm-a", "vm-b", "vm-c", "vm-d", "vm-e"]
            .into_iter()
            .map(|n| (n, v.nodes[n].unregistered.as_deref()))
            .collect();
        assert_eq!(
            unregistered,
            vec![
                ("vm-a", None),
                ("vm-b", Some("NOT_RESPONDING")),
                ("vm-c", Some("POWERED_DOWN")),
                ("vm-d", None),
                ("vm-e", None),
            ]
        );
    }

    #[test]
    fn nodes_whose_slurmd_has_not_registered_are_told_apart() {
        // What sinfo -N -o '%N|%T|%E' shows for nodes whose slurmd never registered or stopped
        // answering, and for registered ones.
        let nodes = "a|down*|Not responding\nb|unknown|none\nc|future|none\nd|inval|bad config\n\
                     e|idle*|none\nf|idle#|none\ng|idle%|none\nh|powered_down|none\ni|down|x\n\
                     j|idle|none\nk|allocated+|none\nl|mixed-|none\nm|idle!|none\nn|drained|none\n\
                     o|unknown*|none\np|powering_up|none\n";
        let v = parse_view("", nodes);
        let got = |n: &str| v.nodes[n].unregistered.clone();
        assert_eq!(got("a").as_deref(), Some("DOWN+NOT_RESPONDING"));
        assert_eq!(got("b").as_deref(), Some("UNKNOWN"));
        assert_eq!(got("c").as_deref(), Some("FUTURE"));
        assert_eq!(got("d").as_deref(), Some("INVALID_REG"));
        assert_eq!(got("e").as_deref(), Some("NOT_RESPONDING"));
        assert_eq!(got("f").as_deref(), Some("POWERING_UP"));
        assert_eq!(got("g").as_deref(), Some("POWERING_DOWN"));
        assert_eq!(got("h").as_deref(), Some("POWERED_DOWN"));
        assert_eq!(got("i").as_deref(), Some("DOWN"));
        assert_eq!(got("o").as_deref(), Some("UNKNOWN+NOT_RESPONDING"));
        assert_eq!(got("p").as_deref(), Some("POWERING_UP"));
        // Registered and answering: idle, allocated, mixed, about to power down (still up),
        // drained.
        for n in ["j", "k", "l", "m", "n"] {
            assert_eq!(got(n), None, "{n}");
        }
        assert!(v.nodes["k"].busy && v.nodes["l"].busy);
    }
}
