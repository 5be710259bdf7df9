//! Autoscale simulator: replays a session trace through the real policy
//! ([`Autoscaler`](crate::autoscale::Autoscaler)) on a simulated clock with a VM boot delay, side
//! by side with two baselines, and reports what each costs and what users feel.
//!
//! The model (the same for every strategy):
//! * Time advances from event to event (arrivals, departures, boots, ticks) in whole seconds;
//!   nothing sleeps.
//! * A new VM is `Starting` for `boot` and bills from the moment it is asked for; it stops
//!   billing when removed. VM-hours integrate the VMs alive (starting or running, draining or
//!   not) over the replay, which lasts until the last trace session has ended.
//! * A session lands on a running, non-draining VM below the cap [`SimParams::max_sessions`]:
//!   the VM where the same user already has a live session (the gateway's user affinity), else
//!   the least loaded (ties: oldest VM). `sessions_per_vm` stays the *target* the policy sizes
//!   for; the cap is the hard limit (by default twice the target). A session that finds no room
//!   waits, first come first served, until a VM has room; its wait counts, and it then lasts as
//!   long as the trace says (it is shifted, not shortened).
//! * A session killed by a scale-in is counted; its user reconnects at once for the rest of the
//!   session (the work still needs capacity), and that reconnection's wait is not counted again.
//! * Detached jobs (an optional job trace: tmux, nohup, cron work the gateway does not see) start
//!   on a VM where their user has a session, else on the running, non-draining VM with the fewest
//!   sessions (oldest first); with no running VM they wait for one. They are no load for the
//!   policy (it cannot see them) but CPU for the cpu-threshold rule (one session's worth each).
//!   A job whose VM is removed is killed, counted in `killed_sessions` (and `killed_jobs`), and
//!   lost. The policy asks the VMs first ([`SimParams::busy_check`], `autoscale.busy_command`):
//!   a VM running a job is never drained nor removed.
//! * Batch jobs (an optional batch trace: work submitted to Slurm on the pool VMs, see the
//!   `batch` module for the queue model) are a queue the gateway reads: nodes wanted by pending
//!   jobs go to the policy as [`Observation::batch_pending_nodes`] (at each tick: the gateway
//!   reads the queue on its tick, there is no wake-on-submit poke), and a VM running a job comes
//!   as `busy` whatever `busy_check` says. A running job is full load for the cpu-threshold rule
//!   (one VM's worth, `sessions_per_vm` sessions, per node); pending jobs are invisible to it
//!   (a CPU metric does not see a queue). Killed batch jobs are requeued, counted apart from
//!   `killed_sessions`.
//!
//! Strategies:
//! * [`Strategy::Policy`]: the session-aware policy, decided every `tick` and at once when a
//!   new session has to wait (the gateway's wake-on-connect poke). Starts `min_vms` running.
//! * [`Strategy::AlwaysOn`]: `max_vms` running all the time (never kills anything).
//! * [`Strategy::CpuThreshold`]: an Azure-autoscale-style rule on utilization, modelled as
//!   sessions (placed and waiting) / (running VMs × `sessions_per_vm`), averaged over the last
//!   5 minutes and evaluated every minute: above 70 % add a VM, below 30 % remove one, with 5
//!   minutes of cooldown after any action; between `max(min_vms, 1)` (a CPU metric needs a VM to
//!   measure) and `max_vms`. The victim is chosen as Azure's default scale-in policy does — the
//!   highest instance id — without regard to sessions or batch jobs, which are killed.

mod batch;
mod trace;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

pub use batch::BatchReport;
pub use trace::{
    BATCH_HEADER, HEADER, JOBS_HEADER, MAX_BATCH_NODES, MAX_TRACE_SECONDS, TraceBatchJob,
    TraceError, TraceJob, TraceSession, parse_batch, parse_jobs, parse_trace,
};

use batch::{Batch, Node};

use crate::autoscale::{Action, AutoscaleConfig, Autoscaler, Observation, VmObservation};
use crate::vm::Lifecycle;

/// Longest simulated boot: a day.
pub const MAX_BOOT_SECONDS: u64 = 24 * 3600;

/// The cpu-threshold baseline's rule (Azure autoscale defaults as usually configured).
const CPU_HIGH: f64 = 0.70;
const CPU_LOW: f64 = 0.30;
const CPU_WINDOW_S: u64 = 5 * 60;
const CPU_EVALUATE_EVERY_S: u64 = 60;
const CPU_COOLDOWN_S: u64 = 5 * 60;

/// Sessions still waiting this long after the trace ended are given up on (a pool that cannot
/// grow, e.g. `max_vms` VMs all full); they count as unserved.
const GIVE_UP_AFTER_S: u64 = 24 * 3600;

/// What is simulated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimParams {
    /// The policy's numbers (`[autoscale]`); `min_vms`, `max_vms` and `sessions_per_vm` bound
    /// the baselines too.
    pub autoscale: AutoscaleConfig,
    /// Time between policy decisions (`autoscale.tick`).
    pub tick: Duration,
    /// Time from asking for a VM to it taking sessions (at most [`MAX_BOOT_SECONDS`]).
    pub boot: Duration,
    /// Sessions a VM takes at most (at least 1).
    pub max_sessions: u32,
    /// The policy asks VMs whether detached jobs run before scaling them in
    /// (`autoscale.busy_command` not `[]`).
    pub busy_check: bool,
}

impl SimParams {
    /// Defaults for everything but the policy and the boot time: a 10 s tick and a cap of
    /// twice `sessions_per_vm`.
    pub fn new(autoscale: AutoscaleConfig, boot: Duration) -> Self {
        Self {
            autoscale,
            tick: Duration::from_secs(10),
            boot,
            max_sessions: autoscale.sessions_per_vm.max(1).saturating_mul(2),
            busy_check: true,
        }
    }
}

/// The strategies compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// poolgate's session-aware policy.
    Policy,
    /// `max_vms` VMs all the time.
    AlwaysOn,
    /// Utilization thresholds, victims by highest instance id.
    CpuThreshold,
}

/// What one strategy cost and what users felt.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Report {
    /// VM-hours billed (VMs starting or running).
    pub vm_hours: f64,
    /// Sessions killed by a scale-in, detached jobs included.
    pub killed_sessions: u64,
    /// Of those, detached jobs (from the job trace).
    pub killed_jobs: u64,
    /// Median wait from connecting to landing on a VM, in seconds.
    pub wait_p50_s: f64,
    /// 95th percentile of that wait (nearest rank), in seconds.
    pub wait_p95_s: f64,
    /// Longest wait, in seconds.
    pub wait_max_s: f64,
    /// Sessions that waited at all before landing.
    pub waited_sessions: u64,
    /// Most VMs alive at once.
    pub peak_vms: u32,
    /// Sessions that never landed (the pool could not grow); their wait counts up to the end.
    pub unserved_sessions: u64,
    /// The batch jobs (all zero without a batch trace).
    pub batch: BatchReport,
}

/// The three strategies on one trace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Comparison {
    /// The session-aware policy.
    pub policy: Report,
    /// `max_vms` all the time.
    pub always_on: Report,
    /// Utilization thresholds.
    pub cpu_threshold: Report,
    /// Sessions in the trace.
    pub sessions: usize,
    /// Batch jobs in the batch trace.
    pub batch_jobs: usize,
    /// When the last trace session (or job, or batch job started at its submit time) ends, in
    /// seconds.
    pub horizon_s: u64,
}

/// What is replayed: sessions, detached jobs and batch jobs (each in any order; sorted here).
#[derive(Debug, Clone, Copy, Default)]
pub struct Workload<'a> {
    /// Sessions through the gateway.
    pub sessions: &'a [TraceSession],
    /// Detached jobs the gateway does not see.
    pub jobs: &'a [TraceJob],
    /// Jobs submitted to the batch queue.
    pub batch: &'a [TraceBatchJob],
}

/// Runs all three strategies on `trace` (any order; sorted here).
pub fn compare(trace: &[TraceSession], params: &SimParams) -> Comparison {
    compare_with_jobs(trace, &[], params)
}

/// Runs all three strategies on `trace` with the detached `jobs` (any order; sorted here).
pub fn compare_with_jobs(
    trace: &[TraceSession],
    jobs: &[TraceJob],
    params: &SimParams,
) -> Comparison {
    compare_scheduled(trace, jobs, params, &|_| 0)
}

/// [`compare_with_jobs`] with a schedule: `min_warm(t)` is the number of running VMs the
/// schedule's windows keep warm `t` seconds into the trace (the policy's
/// [`Observation::min_warm`]). Only the policy follows it; the baselines have no schedule.
pub fn compare_scheduled(
    trace: &[TraceSession],
    jobs: &[TraceJob],
    params: &SimParams,
    min_warm: &dyn Fn(u64) -> u32,
) -> Comparison {
    compare_workload(
        &Workload {
            sessions: trace,
            jobs,
            batch: &[],
        },
        params,
        min_warm,
    )
}

/// All three strategies on a whole workload, the policy with a schedule (`min_warm`, see
/// [`compare_scheduled`]).
pub fn compare_workload(
    workload: &Workload<'_>,
    params: &SimParams,
    min_warm: &dyn Fn(u64) -> u32,
) -> Comparison {
    let sorted = sorted(workload);
    let w = sorted.workload();
    Comparison {
        policy: run_sorted(Strategy::Policy, &w, params, min_warm),
        always_on: run_sorted(Strategy::AlwaysOn, &w, params, &|_| 0),
        cpu_threshold: run_sorted(Strategy::CpuThreshold, &w, params, &|_| 0),
        sessions: w.sessions.len(),
        batch_jobs: w.batch.len(),
        horizon_s: horizon(&w),
    }
}

/// Runs one strategy on `trace` (any order).
pub fn run(strategy: Strategy, trace: &[TraceSession], params: &SimParams) -> Report {
    run_workload(
        strategy,
        &Workload {
            sessions: trace,
            ..Workload::default()
        },
        params,
    )
}

/// Runs one strategy on a whole workload (no schedule).
pub fn run_workload(strategy: Strategy, workload: &Workload<'_>, params: &SimParams) -> Report {
    let sorted = sorted(workload);
    run_sorted(strategy, &sorted.workload(), params, &|_| 0)
}

/// A workload's parts, each sorted by start (stable).
struct Sorted {
    sessions: Vec<TraceSession>,
    jobs: Vec<TraceJob>,
    batch: Vec<TraceBatchJob>,
}

impl Sorted {
    fn workload(&self) -> Workload<'_> {
        Workload {
            sessions: &self.sessions,
            jobs: &self.jobs,
            batch: &self.batch,
        }
    }
}

fn sorted(w: &Workload<'_>) -> Sorted {
    let mut sessions = w.sessions.to_vec();
    sessions.sort_by_key(|s| s.start_s);
    let mut jobs = w.jobs.to_vec();
    jobs.sort_by_key(|j| j.start_s);
    let mut batch = w.batch.to_vec();
    batch.sort_by_key(|j| j.submit_s);
    Sorted {
        sessions,
        jobs,
        batch,
    }
}

fn horizon(w: &Workload<'_>) -> u64 {
    let sessions = w.sessions.iter().map(|s| s.end_s).max().unwrap_or(0);
    sessions
        .max(w.jobs.iter().map(|j| j.end_s).max().unwrap_or(0))
        .max(Batch::horizon(w.batch))
}

/// A VM of the simulated pool.
#[derive(Debug, Clone)]
struct SimVm {
    id: u32,
    name: String,
    ready_at: u64,
    draining: bool,
    sessions: u32,
    idle_since: u64,
}

impl SimVm {
    fn running(&self, t: u64) -> bool {
        t >= self.ready_at
    }
}

/// A session waiting for room.
#[derive(Debug, Clone, Copy)]
struct Pending {
    /// Index of the trace session.
    index: usize,
    /// When it connected.
    since: u64,
    /// How long it lasts once placed.
    duration: u64,
    /// Its first connection (its wait is reported), not a reconnection after a kill.
    first: bool,
}

/// A session on a VM.
#[derive(Debug, Clone, Copy)]
struct Live {
    index: usize,
    vm: u32,
    end: u64,
}

/// A detached job running on a VM.
#[derive(Debug, Clone, Copy)]
struct Job {
    vm: u32,
    end: u64,
}

/// The per-strategy part of the simulation.
enum Driver {
    Policy {
        autoscaler: Box<Autoscaler>,
    },
    AlwaysOn,
    Cpu {
        min: u32,
        samples: VecDeque<(u64, f64)>,
        last_action: Option<u64>,
    },
}

struct Sim<'a> {
    trace: &'a [TraceSession],
    jobs: &'a [TraceJob],
    next_job: usize,
    /// Jobs that found no running VM yet: (index, duration).
    pending_jobs: Vec<(usize, u64)>,
    running_jobs: Vec<Job>,
    killed_jobs: u64,
    /// The batch queue and its running jobs.
    batch: Batch<'a>,
    params: SimParams,
    /// Running VMs a schedule keeps warm at a trace second (the policy only).
    min_warm: &'a dyn Fn(u64) -> u32,
    epoch: Instant,
    boot_s: u64,
    tick_s: u64,
    vms: Vec<SimVm>,
    next_id: u32,
    waiting: VecDeque<Pending>,
    live: Vec<Live>,
    next_arrival: usize,
    waits: Vec<u64>,
    killed: u64,
    vm_seconds: u128,
    peak: u32,
}

fn run_sorted(
    strategy: Strategy,
    workload: &Workload<'_>,
    params: &SimParams,
    min_warm: &dyn Fn(u64) -> u32,
) -> Report {
    let c = params.autoscale;
    let (trace, jobs) = (workload.sessions, workload.jobs);
    let mut sim = Sim {
        min_warm,
        trace,
        jobs,
        next_job: 0,
        pending_jobs: Vec::new(),
        running_jobs: Vec::new(),
        killed_jobs: 0,
        batch: Batch::new(workload.batch),
        params: *params,
        // Only an origin for the policy's `Instant`s; results do not depend on it.
        epoch: Instant::now(),
        boot_s: params.boot.as_secs().min(MAX_BOOT_SECONDS),
        tick_s: params.tick.as_secs().clamp(1, 3600),
        vms: Vec::new(),
        next_id: 0,
        waiting: VecDeque::new(),
        live: Vec::new(),
        next_arrival: 0,
        waits: Vec::with_capacity(trace.len()),
        killed: 0,
        vm_seconds: 0,
        peak: 0,
    };
    let (initial, mut driver) = match strategy {
        Strategy::Policy => (
            c.min_vms,
            Driver::Policy {
                autoscaler: Box::new(Autoscaler::new(c)),
            },
        ),
        Strategy::AlwaysOn => (c.max_vms, Driver::AlwaysOn),
        Strategy::CpuThreshold => {
            let min = c.min_vms.max(1).min(c.max_vms.max(1));
            (
                min,
                Driver::Cpu {
                    min,
                    samples: VecDeque::new(),
                    last_action: None,
                },
            )
        }
    };
    for _ in 0..initial {
        sim.add_vm(0, 0);
    }
    let horizon = horizon(workload);
    let mut t = 0u64;
    loop {
        sim.finish_sessions(t);
        sim.batch.advance(t);
        sim.arrive(t);
        // A connection that starts waiting now pokes the policy, as the gateway's does.
        let poked = sim.place(t) && sim.waiting.iter().any(|p| p.since == t);
        sim.run_jobs(t);
        sim.schedule_batch(t);
        let tick = t.is_multiple_of(sim.tick_s);
        sim.step(&mut driver, t, tick, poked);
        sim.peak = sim.peak.max(sim.vms.len() as u32);

        let done = sim.next_arrival >= trace.len()
            && sim.live.is_empty()
            && sim.next_job >= jobs.len()
            && sim.running_jobs.is_empty()
            && t >= horizon;
        let nothing_waits = sim.waiting.is_empty() && sim.pending_jobs.is_empty();
        // Batch jobs still queued or running at the give-up point count as unfinished.
        if done
            && ((nothing_waits && sim.batch.done()) || t >= horizon.saturating_add(GIVE_UP_AFTER_S))
        {
            break;
        }
        let next = sim.next_event(t);
        sim.vm_seconds += u128::from(next - t) * sim.vms.len() as u128;
        t = next;
    }
    let unserved = sim.waiting.iter().filter(|p| p.first).count() as u64;
    for p in &sim.waiting {
        if p.first {
            sim.waits.push(t - p.since);
        }
    }
    sim.waits.sort_unstable();
    let batch = std::mem::replace(&mut sim.batch, Batch::new(&[])).report(t);
    Report {
        vm_hours: sim.vm_seconds as f64 / 3600.0,
        killed_sessions: sim.killed,
        killed_jobs: sim.killed_jobs,
        wait_p50_s: percentile(&sim.waits, 50),
        wait_p95_s: percentile(&sim.waits, 95),
        wait_max_s: sim.waits.last().copied().unwrap_or(0) as f64,
        waited_sessions: sim.waits.iter().filter(|&&w| w > 0).count() as u64,
        peak_vms: sim.peak,
        unserved_sessions: unserved,
        batch,
    }
}

/// Nearest-rank percentile of sorted values; 0 for none.
fn percentile(sorted: &[u64], p: u64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (sorted.len() as u64 * p).div_ceil(100).max(1) as usize;
    sorted[rank.min(sorted.len()) - 1] as f64
}

impl Sim<'_> {
    fn add_vm(&mut self, t: u64, boot: u64) {
        self.next_id += 1;
        self.vms.push(SimVm {
            id: self.next_id,
            name: format!("vm-{}", self.next_id),
            ready_at: t.saturating_add(boot),
            draining: false,
            sessions: 0,
            idle_since: t,
        });
    }

    fn finish_sessions(&mut self, t: u64) {
        let vms = &mut self.vms;
        self.live.retain(|s| {
            if s.end > t {
                return true;
            }
            if let Some(vm) = vms.iter_mut().find(|v| v.id == s.vm) {
                vm.sessions = vm.sessions.saturating_sub(1);
                if vm.sessions == 0 {
                    vm.idle_since = s.end;
                }
            }
            false
        });
    }

    fn arrive(&mut self, t: u64) {
        while let Some(s) = self.trace.get(self.next_arrival) {
            if s.start_s > t {
                break;
            }
            self.waiting.push_back(Pending {
                index: self.next_arrival,
                since: s.start_s,
                duration: s.duration_s(),
                first: true,
            });
            self.next_arrival += 1;
        }
    }

    /// Places waiting sessions where there is room; true when some remain waiting.
    fn place(&mut self, t: u64) -> bool {
        let cap = self.params.max_sessions.max(1);
        let mut still = VecDeque::new();
        while let Some(p) = self.waiting.pop_front() {
            match self.pick(p.index, t, cap) {
                Some(slot) => {
                    let vm = &mut self.vms[slot];
                    vm.sessions += 1;
                    self.live.push(Live {
                        index: p.index,
                        vm: vm.id,
                        end: t.saturating_add(p.duration),
                    });
                    if p.first {
                        self.waits.push(t - p.since);
                    }
                }
                None => still.push_back(p),
            }
        }
        self.waiting = still;
        !self.waiting.is_empty()
    }

    fn pick(&self, index: usize, t: u64, cap: u32) -> Option<usize> {
        let user = &self.trace[index].user;
        let open = |v: &SimVm| v.running(t) && !v.draining && v.sessions < cap;
        let affine = self.live.iter().find_map(|s| {
            if &self.trace[s.index].user != user {
                return None;
            }
            self.vms.iter().position(|v| v.id == s.vm && open(v))
        });
        affine.or_else(|| {
            self.vms
                .iter()
                .enumerate()
                .filter(|(_, v)| open(v))
                .min_by_key(|(_, v)| (v.sessions, v.id))
                .map(|(i, _)| i)
        })
    }

    /// Starts queued batch jobs on free nodes.
    fn schedule_batch(&mut self, t: u64) {
        let nodes: Vec<Node> = self
            .vms
            .iter()
            .map(|v| Node {
                id: v.id,
                sessions: v.sessions,
                open: v.running(t) && !v.draining,
            })
            .collect();
        self.batch.schedule(t, &nodes);
    }

    /// Ends finished jobs, starts those due (and those that waited for a VM).
    fn run_jobs(&mut self, t: u64) {
        self.running_jobs.retain(|j| j.end > t);
        while let Some(job) = self.jobs.get(self.next_job) {
            if job.start_s > t {
                break;
            }
            self.pending_jobs
                .push((self.next_job, job.end_s - job.start_s));
            self.next_job += 1;
        }
        let pending = std::mem::take(&mut self.pending_jobs);
        for (index, duration) in pending {
            match self.job_vm(index, t) {
                Some(vm) => self.running_jobs.push(Job {
                    vm,
                    end: t.saturating_add(duration),
                }),
                None => self.pending_jobs.push((index, duration)),
            }
        }
    }

    /// Where a job starts: a running VM where its user has a session, else the running,
    /// non-draining VM with the fewest sessions (oldest first).
    fn job_vm(&self, index: usize, t: u64) -> Option<u32> {
        let user = &self.jobs[index].user;
        let running = |id: u32| self.vms.iter().any(|v| v.id == id && v.running(t));
        self.live
            .iter()
            .find(|s| &self.trace[s.index].user == user && running(s.vm))
            .map(|s| s.vm)
            .or_else(|| {
                self.vms
                    .iter()
                    .filter(|v| v.running(t) && !v.draining)
                    .min_by_key(|v| (v.sessions, v.id))
                    .map(|v| v.id)
            })
    }

    /// Deletes a VM, killing its sessions (their users reconnect at once), its detached jobs
    /// (lost) and its batch job (requeued).
    fn remove_vm(&mut self, id: u32, t: u64) {
        self.vms.retain(|v| v.id != id);
        self.batch.vm_removed(id, t);
        let before = self.running_jobs.len();
        self.running_jobs.retain(|j| j.vm != id);
        let jobs_killed = (before - self.running_jobs.len()) as u64;
        self.killed_jobs += jobs_killed;
        self.killed += jobs_killed;
        let mut killed = Vec::new();
        self.live.retain(|s| {
            if s.vm == id {
                killed.push(*s);
                false
            } else {
                true
            }
        });
        for s in killed {
            self.killed += 1;
            if s.end > t {
                self.waiting.push_back(Pending {
                    index: s.index,
                    since: t,
                    duration: s.end - t,
                    first: false,
                });
            }
        }
    }

    fn step(&mut self, driver: &mut Driver, t: u64, tick: bool, poked: bool) {
        match driver {
            Driver::AlwaysOn => {}
            Driver::Policy { autoscaler } => {
                if tick || poked {
                    self.decide(autoscaler, t);
                }
            }
            Driver::Cpu {
                min,
                samples,
                last_action,
            } => {
                if tick {
                    samples.push_back((t, self.utilization(t)));
                    while samples
                        .front()
                        .is_some_and(|(at, _)| at + CPU_WINDOW_S <= t)
                    {
                        samples.pop_front();
                    }
                }
                let cooling = last_action.is_some_and(|at| t < at + CPU_COOLDOWN_S);
                if !tick || !t.is_multiple_of(CPU_EVALUATE_EVERY_S) || cooling {
                    return;
                }
                let average =
                    samples.iter().map(|(_, u)| u).sum::<f64>() / samples.len().max(1) as f64;
                let alive = self.vms.len() as u32;
                if average > CPU_HIGH && alive < self.params.autoscale.max_vms {
                    self.add_vm(t, self.boot_s);
                    *last_action = Some(t);
                } else if average < CPU_LOW
                    && alive > *min
                    && let Some(victim) = self.vms.iter().map(|v| v.id).max()
                {
                    self.remove_vm(victim, t);
                    *last_action = Some(t);
                }
                self.place(t);
                self.schedule_batch(t);
            }
        }
    }

    /// Sessions (placed and waiting), running detached jobs (one session's worth each) and
    /// nodes running batch jobs (a whole VM's worth each): the CPU a CPU rule sees, over the
    /// running VMs' target capacity.
    fn utilization(&self, t: u64) -> f64 {
        let per_vm = f64::from(self.params.autoscale.sessions_per_vm.max(1));
        let demand = (self.live.len() + self.waiting.len() + self.running_jobs.len()) as f64
            + self.batch.running_nodes() as f64 * per_vm;
        let running = self.vms.iter().filter(|v| v.running(t)).count() as f64;
        if running == 0.0 {
            return if demand > 0.0 { 10.0 } else { 0.0 };
        }
        demand / (running * per_vm)
    }

    fn decide(&mut self, autoscaler: &mut Autoscaler, t: u64) {
        let now = self.epoch + Duration::from_secs(t);
        let cap = self.params.max_sessions.max(1);
        let observed: Vec<VmObservation> = self
            .vms
            .iter()
            .map(|v| VmObservation {
                name: v.name.clone(),
                lifecycle: if v.running(t) {
                    Lifecycle::Running
                } else {
                    Lifecycle::Starting
                },
                draining: v.draining,
                sessions: v.sessions,
                idle_since: (v.sessions == 0)
                    .then(|| self.epoch + Duration::from_secs(v.idle_since)),
                // Detached jobs through the busy check; batch jobs from the queue, always.
                busy: (self.params.busy_check && self.running_jobs.iter().any(|j| j.vm == v.id))
                    || self.batch.busy(v.id),
                // The simulation has no probes: a VM serves once booted.
                booting: false,
                accepts_new: v.running(t) && !v.draining && v.sessions < cap,
            })
            .collect();
        let decision = autoscaler.decide(&Observation {
            vms: &observed,
            waiting: self.waiting.len() as u32,
            now,
            min_warm: (self.min_warm)(t),
            batch_pending_nodes: self.batch.pending_nodes(),
            batch_running_nodes: u32::try_from(self.batch.running_nodes()).unwrap_or(u32::MAX),
            batch_unregistered_nodes: 0,
            batch_registered_nodes: 0,
        });
        for (action, _reason) in decision.actions {
            match action {
                Action::Start(n) => {
                    for _ in 0..n {
                        self.add_vm(t, self.boot_s);
                    }
                }
                Action::Drain(name) => self.set_draining(&name, true),
                Action::Undrain(name) => self.set_draining(&name, false),
                Action::Remove(name) => {
                    if let Some(id) = self.vms.iter().find(|v| v.name == name).map(|v| v.id) {
                        self.remove_vm(id, t);
                    }
                }
            }
        }
        self.place(t);
        self.schedule_batch(t);
    }

    fn set_draining(&mut self, name: &str, draining: bool) {
        if let Some(vm) = self.vms.iter_mut().find(|v| v.name == name) {
            vm.draining = draining;
        }
    }

    /// The next time something happens after `t`.
    fn next_event(&self, t: u64) -> u64 {
        let mut next = (t / self.tick_s + 1) * self.tick_s;
        if let Some(s) = self.trace.get(self.next_arrival) {
            next = next.min(s.start_s.max(t + 1));
        }
        for s in &self.live {
            next = next.min(s.end.max(t + 1));
        }
        if let Some(j) = self.jobs.get(self.next_job) {
            next = next.min(j.start_s.max(t + 1));
        }
        for j in &self.running_jobs {
            next = next.min(j.end.max(t + 1));
        }
        for v in &self.vms {
            if v.ready_at > t {
                next = next.min(v.ready_at);
            }
        }
        if let Some(at) = self.batch.next_event(t) {
            next = next.min(at);
        }
        next
    }
}

#[cfg(test)]
mod tests;
