//! Property tests of the autoscale policy, driven over random workloads on a simulated clock.
//!
//! A model pool applies every decision the way the gateway's driver does: `Start(n)` adds `n`
//! VMs that are `Starting` until a boot delay has passed, `Drain`/`Undrain` flip the flag, and
//! `Remove` deletes the VM. Users arrive and leave at random, land on running, non-draining VMs
//! below their session cap, and wait otherwise; an operator drains and undrains VMs now and then.
//! For every decision:
//! * it never drains or removes a VM that has sessions, or one the busy check says runs work;
//! * after it is applied, VMs alive (starting or running) never exceed `max_vms`;
//! * when a session waits, fewer than `max_vms` VMs are alive and none is starting, it starts or
//!   undrains a VM in that same decision.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use router_core::Lifecycle;
use router_core::autoscale::{
    Action, AutoscaleConfig, Autoscaler, Decision, Observation, VmObservation,
};

/// One VM of the model pool.
#[derive(Debug, Clone)]
struct ModelVm {
    name: String,
    ready_at: Instant,
    draining: bool,
    sessions: u32,
    idle_since: Option<Instant>,
    /// Detached work runs on it (the driver's busy check says so).
    busy: bool,
}

impl ModelVm {
    fn lifecycle(&self, now: Instant) -> Lifecycle {
        if now >= self.ready_at {
            Lifecycle::Running
        } else {
            Lifecycle::Starting
        }
    }

    fn observe(&self, now: Instant) -> VmObservation {
        VmObservation {
            name: self.name.clone(),
            lifecycle: self.lifecycle(now),
            draining: self.draining,
            sessions: self.sessions,
            idle_since: self.idle_since,
            busy: self.busy,
            booting: false,
            accepts_new: false,
        }
    }
}

/// What happens between two decisions.
#[derive(Debug, Clone)]
struct Step {
    /// Seconds since the previous decision.
    dt: u64,
    /// New connections.
    arrivals: u32,
    /// Sessions ending (as a share of those live, in percent).
    leave_pct: u32,
    /// Operator drains (`Some(true)`) or undrains (`Some(false)`) the VM at this index.
    operator: Option<(usize, bool)>,
    /// Detached work starts (`true`) or ends on the VM at this index.
    work: Option<(usize, bool)>,
}

fn step() -> impl Strategy<Value = Step> {
    (
        prop_oneof![1u64..=15, 15u64..=120, 600u64..=3600],
        prop_oneof![Just(0u32), 0u32..4, 0u32..20],
        prop_oneof![Just(0u32), 0u32..=30, Just(100)],
        prop::option::weighted(0.1, (0usize..8, any::<bool>())),
        prop::option::weighted(0.2, (0usize..8, any::<bool>())),
    )
        .prop_map(|(dt, arrivals, leave_pct, operator, work)| Step {
            dt,
            arrivals,
            leave_pct,
            operator,
            work,
        })
}

fn config() -> impl Strategy<Value = AutoscaleConfig> {
    (
        0u32..3,
        1u32..8,
        1u32..6,
        0u32..3,
        0u64..1200,
        0u64..2400,
        0u64..300,
    )
        .prop_map(
            |(min_vms, extra, sessions_per_vm, spare_vms, scale_in, to_zero, cooldown)| {
                AutoscaleConfig {
                    min_vms,
                    max_vms: min_vms + extra,
                    sessions_per_vm,
                    spare_vms,
                    scale_in_after: Duration::from_secs(scale_in),
                    scale_to_zero_after: Duration::from_secs(to_zero),
                    cooldown: Duration::from_secs(cooldown),
                }
            },
        )
}

/// The model pool and the users waiting for it.
struct Model {
    vms: Vec<ModelVm>,
    waiting: u32,
    cap: u32,
    boot: Duration,
    next_id: u32,
    operator_drained: HashSet<String>,
}

impl Model {
    fn alive(&self) -> u32 {
        self.vms.len() as u32
    }

    /// Places waiting users on running, non-draining VMs below the cap, least loaded first.
    fn place(&mut self, now: Instant) {
        while self.waiting > 0 {
            let Some(vm) = self
                .vms
                .iter_mut()
                .filter(|v| {
                    v.lifecycle(now) == Lifecycle::Running && !v.draining && v.sessions < self.cap
                })
                .min_by_key(|v| v.sessions)
            else {
                return;
            };
            vm.sessions += 1;
            vm.idle_since = None;
            self.waiting -= 1;
        }
    }

    fn leave(&mut self, pct: u32, now: Instant, salt: u64) {
        for (i, vm) in self.vms.iter_mut().enumerate() {
            let gone = (vm.sessions * pct).div_ceil(100).min(vm.sessions);
            // Vary which VMs lose sessions so that some become idle and others do not.
            let gone = if (salt + i as u64).is_multiple_of(3) {
                gone
            } else {
                gone / 2
            };
            vm.sessions -= gone;
            if vm.sessions == 0 && vm.idle_since.is_none() {
                vm.idle_since = Some(now);
            }
        }
    }

    fn apply(&mut self, decision: &Decision, now: Instant) {
        for (action, _) in &decision.actions {
            match action {
                Action::Start(n) => {
                    for _ in 0..*n {
                        self.next_id += 1;
                        self.vms.push(ModelVm {
                            name: format!("vm-{}", self.next_id),
                            ready_at: now + self.boot,
                            draining: false,
                            sessions: 0,
                            idle_since: Some(now),
                            busy: false,
                        });
                    }
                }
                Action::Drain(name) => self.set_draining(name, true),
                Action::Undrain(name) => self.set_draining(name, false),
                Action::Remove(name) => self.vms.retain(|v| &v.name != name),
            }
        }
    }

    fn set_draining(&mut self, name: &str, draining: bool) {
        if let Some(vm) = self.vms.iter_mut().find(|v| v.name == name) {
            vm.draining = draining;
        }
    }
}

fn check_decision(
    obs: &[VmObservation],
    waiting: u32,
    config: &AutoscaleConfig,
    operator_drained: &HashSet<String>,
    decision: &Decision,
) -> Result<(), TestCaseError> {
    let alive = obs.len() as u32;
    let mut started = 0u32;
    let mut undrained = 0u32;
    for (action, reason) in &decision.actions {
        match action {
            Action::Drain(name) | Action::Remove(name) => {
                let Some(vm) = obs.iter().find(|v| &v.name == name) else {
                    return Err(TestCaseError::fail(format!("{action:?} of an unknown VM")));
                };
                prop_assert_eq!(
                    vm.sessions,
                    0,
                    "{:?} ({}) of a VM with sessions: {:?}",
                    action,
                    reason,
                    vm
                );
                prop_assert!(
                    !operator_drained.contains(name),
                    "{action:?} touches a VM the operator drained"
                );
                prop_assert!(!vm.busy, "{:?} ({}) of a busy VM: {:?}", action, reason, vm);
            }
            Action::Undrain(name) => {
                prop_assert!(
                    !operator_drained.contains(name),
                    "undrains {name}, which the operator drained"
                );
                undrained += 1;
            }
            Action::Start(n) => {
                prop_assert!(*n > 0, "Start(0)");
                started += n;
            }
        }
    }
    prop_assert!(
        alive + started <= config.max_vms.max(alive),
        "{alive} alive + {started} started > max_vms {}",
        config.max_vms
    );
    let starting = obs.iter().any(|v| v.lifecycle == Lifecycle::Starting);
    if waiting > 0 && alive < config.max_vms && !starting {
        prop_assert!(
            started + undrained > 0,
            "{waiting} waiting, {alive} alive < max_vms {}, none starting, yet {:?}",
            config.max_vms,
            decision
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Random workloads: the three safety and liveness properties hold for every decision.
    #[test]
    fn policy_is_safe_and_live(
        config in config(),
        cap in 1u32..12,
        boot in 0u64..300,
        initial in 0u32..6,
        steps in prop::collection::vec(step(), 1..120),
    ) {
        let t0 = Instant::now();
        let mut now = t0;
        let mut policy = Autoscaler::new(config);
        let mut model = Model {
            vms: Vec::new(),
            waiting: 0,
            cap,
            boot: Duration::from_secs(boot),
            next_id: 0,
            operator_drained: HashSet::new(),
        };
        // Start from an arbitrary pool, possibly above max_vms (a lowered max after a reload).
        for i in 0..initial {
            model.next_id += 1;
            model.vms.push(ModelVm {
                name: format!("vm-{}", model.next_id),
                ready_at: t0,
                draining: false,
                sessions: i % 3,
                idle_since: (i % 3 == 0).then_some(t0),
                busy: i % 4 == 1,
            });
        }
        for (n, step) in steps.iter().enumerate() {
            now += Duration::from_secs(step.dt);
            model.leave(step.leave_pct, now, n as u64);
            if let Some((index, drain)) = step.operator
                && let Some(vm) = model.vms.get_mut(index)
            {
                let name = vm.name.clone();
                if drain && !vm.draining {
                    vm.draining = true;
                    model.operator_drained.insert(name);
                } else if model.operator_drained.remove(&name) {
                    vm.draining = false;
                }
            }
            if let Some((index, busy)) = step.work
                && let Some(vm) = model.vms.get_mut(index)
            {
                vm.busy = busy;
            }
            model.waiting += step.arrivals;
            model.place(now);

            let before_alive = model.alive();
            let obs: Vec<VmObservation> = model.vms.iter().map(|v| v.observe(now)).collect();
            let decision = policy.decide(&Observation { vms: &obs, waiting: model.waiting, now, min_warm: 0, batch_pending_nodes: 0, batch_running_nodes: 0, batch_unregistered_nodes: 0, batch_registered_nodes: 0 });
            check_decision(&obs, model.waiting, &config, &model.operator_drained, &decision)?;
            model.apply(&decision, now);
            prop_assert!(
                model.alive() <= config.max_vms.max(before_alive),
                "{} alive after the decision, max_vms {}",
                model.alive(),
                config.max_vms
            );
            model.place(now);
        }
    }

    /// A steady workload settles: once demand stays constant, the policy stops acting within
    /// a bounded number of ticks and does not flap between draining and undraining.
    #[test]
    fn steady_demand_settles(
        config in config(),
        sessions in 0u32..40,
        boot in 0u64..200,
    ) {
        let t0 = Instant::now();
        let mut policy = Autoscaler::new(config);
        let cap = u32::MAX;
        let mut model = Model {
            vms: Vec::new(),
            waiting: sessions,
            cap,
            boot: Duration::from_secs(boot),
            next_id: 0,
            operator_drained: HashSet::new(),
        };
        let tick = Duration::from_secs(10);
        let horizon = 600 + (config.scale_in_after + config.scale_to_zero_after + config.cooldown).as_secs() / 10
            + u64::from(config.max_vms) * 4;
        let mut last_action = 0u64;
        for i in 0..horizon {
            let now = t0 + tick * i as u32;
            model.place(now);
            let obs: Vec<VmObservation> = model.vms.iter().map(|v| v.observe(now)).collect();
            let decision = policy.decide(&Observation { vms: &obs, waiting: model.waiting, now, min_warm: 0, batch_pending_nodes: 0, batch_running_nodes: 0, batch_unregistered_nodes: 0, batch_registered_nodes: 0 });
            if !decision.actions.is_empty() {
                last_action = i;
            }
            model.apply(&decision, now);
        }
        prop_assert!(
            last_action + 100 < horizon,
            "still acting at tick {last_action} of {horizon} with constant demand {sessions}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The simulator with the real policy on random traces (with and without detached jobs): no
    /// session or job is ever killed, the pool
    /// never exceeds `max_vms`, every session lands, and while the pool has room to grow no
    /// session waits longer than a boot plus a tick.
    #[test]
    fn simulated_policy_never_kills_and_stays_within_max_vms(
        config in config(),
        boot in 0u64..300,
        sessions in prop::collection::vec((0u64..20_000, 0u64..8_000, 0usize..6), 0..60),
        jobs in prop::collection::vec((0u64..20_000, 0u64..20_000, 0usize..8), 0..8),
    ) {
        use router_core::sim::{self, SimParams, Strategy, TraceSession};
        let trace: Vec<TraceSession> = sessions
            .iter()
            .map(|&(start, length, user)| TraceSession {
                user: format!("u{user}"),
                protocol: router_core::Protocol::Ssh,
                start_s: start,
                end_s: start + length,
            })
            .collect();
        // A cap big enough that max_vms VMs always hold everyone: then waits come from boots only.
        let mut params = SimParams::new(config, Duration::from_secs(boot));
        params.max_sessions = 60;
        let jobs: Vec<sim::TraceJob> = jobs
            .iter()
            .map(|&(start, length, user)| sim::TraceJob {
                user: format!("u{user}"),
                start_s: start,
                end_s: start + length,
            })
            .collect();
        let r = sim::run(Strategy::Policy, &trace, &params);
        prop_assert_eq!(r.killed_sessions, 0, "{:?}", r);
        // Detached jobs too: the policy asks the VMs (busy check) and kills none of them.
        let with_jobs = sim::compare_with_jobs(&trace, &jobs, &params).policy;
        prop_assert_eq!(with_jobs.killed_sessions, 0, "{:?}", with_jobs);
        prop_assert!(r.peak_vms <= config.max_vms, "{:?}", r);
        prop_assert_eq!(r.unserved_sessions, 0, "{:?}", r);
        prop_assert!(r.wait_max_s <= (boot + 10) as f64, "{:?}", r);
    }
}
