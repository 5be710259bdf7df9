//! The batch queue of the simulation: Slurm on the pool VMs, reduced to what sizes a pool.
//!
//! * Jobs are queued in submit order and started strictly first in, first out (Slurm's
//!   `sched/builtin`: no backfill, so a job waits behind an earlier one that does not fit yet;
//!   the deployed `sched/backfill` may also start a later, smaller job early when that delays
//!   no earlier one).
//! * A node runs one job at a time (exclusive nodes, `OverSubscribe=EXCLUSIVE`): a job starts
//!   when `nodes` VMs that are running, not draining and without a job are there; it takes the
//!   least loaded of them (fewest sessions, then the oldest: the partition's `LLN=YES`) and
//!   holds them for its whole `duration_s`. Interactive sessions keep landing on those VMs as
//!   the gateway places them (it does not look at jobs).
//! * A VM removed under a running job kills the job: every node of it is freed, the job is
//!   counted as killed, its run so far is lost (node-seconds), and it is requeued at its old
//!   place in the queue (Slurm's requeue keeps the submit time) to run again from the start.
//! * A job's wait is all the time it spent pending: submit to start, plus requeue to restart
//!   after each kill. A job still pending when the replay ends counts its wait until then.

use super::percentile;
use super::trace::TraceBatchJob;

/// What happened to the batch jobs under one strategy.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct BatchReport {
    /// Jobs in the batch trace.
    pub jobs: u64,
    /// Median time a job spent pending (submit to start, plus any requeue to restart), seconds.
    pub wait_p50_s: f64,
    /// 95th percentile of that wait (nearest rank), seconds.
    pub wait_p95_s: f64,
    /// Longest, seconds.
    pub wait_max_s: f64,
    /// Runs killed by a scale-in (each requeued; one job may be killed several times).
    pub killed: u64,
    /// Node-hours of the killed runs, thrown away.
    pub lost_node_hours: f64,
    /// Jobs that had not finished when the replay ended (the pool could not run them).
    pub unfinished: u64,
}

/// A job waiting in the queue.
#[derive(Debug, Clone, Copy)]
struct Queued {
    /// Index into the (submit-sorted) trace: the queue order.
    index: usize,
    /// Pending since.
    since: u64,
    /// Time pending before, in earlier waits (a requeued job).
    waited: u64,
}

/// A job holding nodes.
#[derive(Debug, Clone)]
struct Running {
    index: usize,
    vms: Vec<u32>,
    start: u64,
    end: u64,
    waited: u64,
}

/// A VM as the queue needs to see it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Node {
    pub id: u32,
    pub sessions: u32,
    /// Running and not draining.
    pub open: bool,
}

/// The batch queue and the jobs running on the pool.
#[derive(Debug)]
pub(super) struct Batch<'a> {
    jobs: &'a [TraceBatchJob],
    next: usize,
    queue: Vec<Queued>,
    running: Vec<Running>,
    /// Total wait of each job that has finished.
    waits: Vec<u64>,
    killed: u64,
    lost_node_seconds: u128,
}

impl<'a> Batch<'a> {
    /// A queue for `jobs`, sorted by submit time.
    pub fn new(jobs: &'a [TraceBatchJob]) -> Self {
        Self {
            jobs,
            next: 0,
            queue: Vec::new(),
            running: Vec::new(),
            waits: Vec::with_capacity(jobs.len()),
            killed: 0,
            lost_node_seconds: 0,
        }
    }

    /// When the last job would end if it started at once.
    pub fn horizon(jobs: &[TraceBatchJob]) -> u64 {
        jobs.iter()
            .map(|j| j.submit_s.saturating_add(j.duration_s))
            .max()
            .unwrap_or(0)
    }

    /// Ends the jobs due by `t` and queues those submitted by then.
    pub fn advance(&mut self, t: u64) {
        let waits = &mut self.waits;
        self.running.retain(|r| {
            if r.end > t {
                return true;
            }
            waits.push(r.waited);
            false
        });
        while let Some(job) = self.jobs.get(self.next) {
            if job.submit_s > t {
                break;
            }
            self.queue.push(Queued {
                index: self.next,
                since: job.submit_s,
                waited: 0,
            });
            self.next += 1;
        }
    }

    /// Starts queued jobs, first in first out, on free nodes (least loaded first).
    pub fn schedule(&mut self, t: u64, nodes: &[Node]) {
        let mut free: Vec<Node> = nodes
            .iter()
            .filter(|n| n.open && !self.busy(n.id))
            .copied()
            .collect();
        free.sort_by_key(|n| (n.sessions, n.id));
        let mut started = 0;
        for q in &self.queue {
            let job = &self.jobs[q.index];
            let want = job.nodes as usize;
            if want > free.len() {
                break;
            }
            let vms = free.drain(..want).map(|n| n.id).collect();
            self.running.push(Running {
                index: q.index,
                vms,
                start: t,
                end: t.saturating_add(job.duration_s),
                waited: q.waited + (t - q.since),
            });
            started += 1;
        }
        self.queue.drain(..started);
    }

    /// A VM is gone: the job on it (if any) is killed and requeued at its place.
    pub fn vm_removed(&mut self, id: u32, t: u64) {
        let Some(at) = self.running.iter().position(|r| r.vms.contains(&id)) else {
            return;
        };
        let run = self.running.remove(at);
        self.killed += 1;
        self.lost_node_seconds += u128::from(t - run.start) * run.vms.len() as u128;
        let place = self.queue.partition_point(|q| q.index < run.index);
        self.queue.insert(
            place,
            Queued {
                index: run.index,
                since: t,
                waited: run.waited,
            },
        );
    }

    /// A job runs on this VM.
    pub fn busy(&self, id: u32) -> bool {
        self.running.iter().any(|r| r.vms.contains(&id))
    }

    /// Nodes the queued jobs wait for.
    pub fn pending_nodes(&self) -> u32 {
        self.queue
            .iter()
            .map(|q| self.jobs[q.index].nodes)
            .fold(0u32, u32::saturating_add)
    }

    /// Nodes running jobs.
    pub fn running_nodes(&self) -> usize {
        self.running.iter().map(|r| r.vms.len()).sum()
    }

    /// Every job has been submitted and has finished.
    pub fn done(&self) -> bool {
        self.next >= self.jobs.len() && self.queue.is_empty() && self.running.is_empty()
    }

    /// The next submit or job end after `t`, if any.
    pub fn next_event(&self, t: u64) -> Option<u64> {
        let submit = self.jobs.get(self.next).map(|j| j.submit_s.max(t + 1));
        let end = self.running.iter().map(|r| r.end.max(t + 1)).min();
        match (submit, end) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The figures at the end of a replay at `t`; unfinished jobs count their wait so far.
    pub fn report(mut self, t: u64) -> BatchReport {
        let unfinished = (self.jobs.len() - self.waits.len()) as u64;
        for q in &self.queue {
            self.waits.push(q.waited + (t - q.since));
        }
        for r in &self.running {
            self.waits.push(r.waited);
        }
        // Never submitted (cannot happen once the replay passed the horizon): no wait yet.
        self.waits.sort_unstable();
        BatchReport {
            jobs: self.jobs.len() as u64,
            wait_p50_s: percentile(&self.waits, 50),
            wait_p95_s: percentile(&self.waits, 95),
            wait_max_s: self.waits.last().copied().unwrap_or(0) as f64,
            killed: self.killed,
            lost_node_hours: self.lost_node_seconds as f64 / 3600.0,
            unfinished,
        }
    }
}
