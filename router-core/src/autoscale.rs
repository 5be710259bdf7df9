//! Session-aware autoscale policy: pure, fed an observation of the pool and `now`, returning
//! actions with reasons. The gateway's driver applies them through a provider.
//!
//! Rules:
//! * While anyone uses the pool, aim for `ceil((sessions + waiting) / sessions_per_vm) +
//!   spare_vms` running VMs, kept within `min_vms..=max_vms`. With nobody on it, keep
//!   `spare_vms` until the whole pool has been idle for `scale_to_zero_after`, then `min_vms`.
//! * Scale out at once when the aim exceeds the VMs running or starting: first undrain VMs the
//!   autoscaler itself was draining, then start more. A waiting session with no VM on its way
//!   (starting, or running but not probed yet) and no VM taking sessions always undrains or
//!   starts one (below `max_vms`), even when the aim is met: it waits because the VMs serving
//!   are full or unhealthy. (A VM that just passed its probes takes the waiting session a moment
//!   later: starting another for it would be one too many.)
//! * Scale in one step per tick, only VMs with **zero sessions** idle for `scale_in_after`, and not
//!   within `cooldown` of a scale-out: drain first, remove on a later tick once the drained VM is
//!   still empty. Never remove a VM with sessions; never touch VMs an operator drained.
//! * A VM on which work runs that does not flow through the gateway (`busy`, from the driver's
//!   busy check) is never drained nor removed; one the policy drained is taken back into service.
//! * Pending batch jobs add a VM per node they wait for, besides the VMs running jobs. A running
//!   VM whose batch node has not registered (`batch_unregistered_nodes`) runs no job: while such
//!   VMs are fewer than the registered ones (`batch_registered_nodes`) — a VM gone wrong, not
//!   the image — pending jobs get a VM in its place; once they are as many or more, pending jobs
//!   start nothing and only keep the VMs serving now, up to what they would ask for.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::vm::Lifecycle;

/// The `[autoscale]` numbers the policy needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoscaleConfig {
    /// Fewest VMs kept running.
    pub min_vms: u32,
    /// Most VMs ever running or starting.
    pub max_vms: u32,
    /// Sessions one VM is meant to carry.
    pub sessions_per_vm: u32,
    /// Extra running VMs kept while the pool is in use.
    pub spare_vms: u32,
    /// A VM with no session for this long may be scaled in.
    pub scale_in_after: Duration,
    /// With the whole pool idle this long, go down to `min_vms`.
    pub scale_to_zero_after: Duration,
    /// No scale-in this soon after a scale-out (hysteresis).
    pub cooldown: Duration,
}

/// One VM as the policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmObservation {
    /// Name.
    pub name: String,
    /// Provider lifecycle.
    pub lifecycle: Lifecycle,
    /// Draining (by anyone).
    pub draining: bool,
    /// Live sessions (all protocols).
    pub sessions: u32,
    /// Since when it has had no session (`None` while it has sessions).
    pub idle_since: Option<Instant>,
    /// Work that does not pass through the gateway runs on it (or the check could not tell):
    /// never a scale-in candidate, never removed.
    pub busy: bool,
    /// Still on its way although the provider says it runs: it has not
    /// passed its health probes since it came up (not probed yet, or its
    /// services are still starting, within its boot time). A waiting session
    /// is no reason to start another VM while one is on its way.
    pub booting: bool,
    /// It takes new sessions now (running, a side probed up, not draining,
    /// below its session limit): a session still waiting is about to land
    /// there, so it is no reason to start another VM.
    pub accepts_new: bool,
}

/// Input of one decision.
#[derive(Debug, Clone)]
pub struct Observation<'a> {
    /// Every VM the provider knows.
    pub vms: &'a [VmObservation],
    /// Connections waiting for a VM (wake-on-connect).
    pub waiting: u32,
    /// Now.
    pub now: Instant,
    /// Running VMs a schedule window keeps warm now (`[[autoscale.schedule]]`; 0 outside every
    /// window): a floor on the aim, within `max_vms`, whatever the load.
    pub min_warm: u32,
    /// Nodes that pending batch jobs wait for (Slurm, `[batch]`; 0 without): added to the aim,
    /// one VM each, and the pool counts as in use while any wait. VMs running jobs come as
    /// `busy` (never drained or removed).
    pub batch_pending_nodes: u32,
    /// VMs whose batch node runs a job now (0 without `[batch]`). While jobs are pending these
    /// count as taken: the pending ones need VMs besides them, not instead of them.
    pub batch_running_nodes: u32,
    /// Running VMs whose batch node has not registered with the scheduler (or stopped
    /// answering) for longer than it should take (`batch.register_within`; 0 without
    /// `[batch]`). While they are as many as the registered ones or more, pending batch jobs
    /// start no VM: see [`Autoscaler::decide`].
    pub batch_unregistered_nodes: u32,
    /// Running VMs whose batch node has registered with the scheduler and answers (0 without
    /// `[batch]`): the evidence that VMs started for jobs can run them.
    pub batch_registered_nodes: u32,
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start (or create) this many VMs.
    Start(u32),
    /// Stop sending new sessions to this VM.
    Drain(String),
    /// Take it back into service.
    Undrain(String),
    /// Stop or delete this exact VM (it has no sessions).
    Remove(String),
}

/// The policy's answer for one tick.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Decision {
    /// Running VMs aimed for.
    pub desired: u32,
    /// Actions with the reason for each.
    pub actions: Vec<(Action, String)>,
}

/// The policy with its memory (cooldowns, what it drained, pool idle time).
#[derive(Debug, Clone)]
pub struct Autoscaler {
    config: AutoscaleConfig,
    last_scale_out: Option<Instant>,
    pool_idle_since: Option<Instant>,
    /// Idle since before this policy's first decision with no VM alive: at zero already.
    asleep: bool,
    drained_by_us: BTreeSet<String>,
}

impl Autoscaler {
    /// A policy with no history.
    pub fn new(config: AutoscaleConfig) -> Self {
        Self {
            config,
            last_scale_out: None,
            pool_idle_since: None,
            asleep: false,
            drained_by_us: BTreeSet::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> AutoscaleConfig {
        self.config
    }

    /// VMs this policy drained and has not removed or undrained yet.
    pub fn draining(&self) -> impl Iterator<Item = &str> {
        self.drained_by_us.iter().map(String::as_str)
    }

    /// Takes over a scale-in drain another instance of the policy made (a new leader inherits
    /// the old one's): the VM is then removed once empty, or undrained when needed again, as if
    /// this policy had drained it. Forgotten at the next decision unless the VM is draining and
    /// alive. True when the drain was not this policy's already.
    pub fn adopt_drain(&mut self, vm: &str) -> bool {
        self.drained_by_us.insert(vm.to_owned())
    }

    /// The running-VM aim for a given demand, within bounds.
    pub fn aim(&self, demand: u32) -> u32 {
        let c = &self.config;
        let per_vm = c.sessions_per_vm.max(1);
        let aim = if demand > 0 {
            demand.div_ceil(per_vm).saturating_add(c.spare_vms)
        } else {
            c.spare_vms
        };
        aim.clamp(c.min_vms, c.max_vms.max(c.min_vms))
    }

    /// Decides what to do now.
    pub fn decide(&mut self, obs: &Observation<'_>) -> Decision {
        let c = self.config;
        let now = obs.now;
        // Forget VMs that vanished or stopped.
        self.drained_by_us.retain(|name| {
            obs.vms
                .iter()
                .any(|v| &v.name == name && v.draining && is_alive(v.lifecycle))
        });

        let sessions: u32 = obs.vms.iter().map(|v| v.sessions).sum();
        let demand = sessions.saturating_add(obs.waiting);
        let pending_nodes = obs.batch_pending_nodes;
        if demand > 0 || pending_nodes > 0 {
            self.pool_idle_since = None;
            self.asleep = false;
        } else if self.pool_idle_since.is_none() {
            self.pool_idle_since = Some(now);
            // A pool found with no VM alive and nobody on it (a gateway starting, or a new
            // leader, over a pool scaled to zero) is asleep already: no spare VM for nobody.
            self.asleep = !obs.vms.iter().any(|v| is_alive(v.lifecycle));
        }
        let pool_idle_for = if self.asleep {
            Duration::MAX
        } else {
            self.pool_idle_since
                .map(|since| now.saturating_duration_since(since))
                .unwrap_or_default()
        };

        let floor = obs.min_warm.min(c.max_vms);
        let mut desired = self.aim(demand).max(floor);
        if demand == 0 && pending_nodes == 0 && pool_idle_for >= c.scale_to_zero_after {
            desired = c.min_vms.max(floor);
        }
        let alive: Vec<&VmObservation> = obs.vms.iter().filter(|v| is_alive(v.lifecycle)).collect();
        let serving = alive.iter().filter(|v| !v.draining).count() as u32;

        // Pending batch jobs need VMs of their own on top of the interactive aim and of the VMs
        // already running jobs (those serve no one else meanwhile).
        if pending_nodes > 0 {
            let cap = c.max_vms.max(c.min_vms);
            let with_batch = desired
                .saturating_add(pending_nodes)
                .saturating_add(obs.batch_running_nodes)
                .min(cap);
            // A VM whose batch node never registered runs no job. A few among many registered
            // ones are VMs gone wrong (a slurmd that failed, a munge restart that did not
            // happen): the jobs get other VMs in their place (each unregistered VM adds one).
            // As many as the registered ones or more (all of them, on a pool woken for jobs)
            // point at the image, the munge key or the node names: VMs started for the jobs
            // would not run them, and more would not help. Then pending jobs start no VM: they
            // keep the VMs serving now (up to what they would ask for), so those are not scaled
            // in and started again while the jobs wait, and the pool does not grow to max_vms
            // chasing jobs that cannot run. Sessions and schedule windows still start VMs (the
            // interactive aim, `desired` so far).
            let unregistered = obs.batch_unregistered_nodes;
            desired = if unregistered == 0 || unregistered < obs.batch_registered_nodes {
                with_batch.saturating_add(unregistered).min(cap)
            } else {
                desired.max(with_batch.min(serving))
            };
        }
        // On its way: starting, or running but not through its probes yet.
        let starting = alive
            .iter()
            .filter(|v| v.lifecycle == Lifecycle::Starting || v.booting)
            .count() as u32;
        let mut decision = Decision {
            desired,
            actions: Vec::new(),
        };

        // Scale out.
        let mut missing = desired.saturating_sub(serving);
        // A session waits only when no serving VM takes it (all full, unhealthy or none at
        // all): whatever the aim says, capacity must grow unless a VM is already on its way.
        let one_takes_sessions = alive.iter().any(|v| v.accepts_new);
        if obs.waiting > 0 && starting == 0 && !one_takes_sessions {
            missing = missing.max(1);
        }
        if missing > 0 {
            let ours: Vec<String> = self
                .drained_by_us
                .iter()
                .take(missing as usize)
                .cloned()
                .collect();
            for name in ours {
                self.drained_by_us.remove(&name);
                decision.actions.push((
                    Action::Undrain(name),
                    format!("needed again: aim is {desired} serving VMs, {serving} serving"),
                ));
                missing -= 1;
            }
            let room = c.max_vms.saturating_sub(alive.len() as u32);
            let start = missing.min(room);
            if start > 0 {
                let why = if pending_nodes > 0 && obs.waiting == 0 {
                    format!(
                        "{pending_nodes} node(s) wanted by pending batch jobs; aim is {desired} serving VMs, {serving} serving"
                    )
                } else if obs.waiting > 0 {
                    format!(
                        "{} session(s) waiting; aim is {desired} serving VMs, {serving} serving",
                        obs.waiting
                    )
                } else if floor >= desired && floor > self.aim(demand) {
                    format!(
                        "a schedule window keeps {floor} VMs warm; {serving} serving, {sessions} sessions"
                    )
                } else {
                    format!("{sessions} sessions need {desired} serving VMs, {serving} serving")
                };
                decision.actions.push((Action::Start(start), why));
            }
            if !decision.actions.is_empty() {
                self.last_scale_out = Some(now);
            }
            return decision;
        }

        // Remove drained VMs that stayed empty; keep those where work turned out to run.
        for vm in alive
            .iter()
            .filter(|v| self.drained_by_us.contains(&v.name))
        {
            if vm.busy {
                decision.actions.push((
                    Action::Undrain(vm.name.clone()),
                    "work is running on it (busy check); kept".to_string(),
                ));
            } else if vm.sessions == 0 {
                decision.actions.push((
                    Action::Remove(vm.name.clone()),
                    "drained and still without sessions".to_string(),
                ));
            }
        }
        for (action, _) in &decision.actions {
            if let Action::Remove(name) | Action::Undrain(name) = action {
                self.drained_by_us.remove(name);
            }
        }

        // Scale in, one VM per tick.
        let in_cooldown = self
            .last_scale_out
            .is_some_and(|at| now.saturating_duration_since(at) < c.cooldown);
        if serving > desired && !in_cooldown {
            let candidate = alive
                .iter()
                .filter(|v| {
                    !v.draining && !v.busy && v.lifecycle == Lifecycle::Running && v.sessions == 0
                })
                .filter_map(|v| {
                    let idle = now.saturating_duration_since(v.idle_since?);
                    (idle >= c.scale_in_after
                        || (desired < serving && pool_idle_for >= c.scale_to_zero_after))
                        .then_some((idle, v))
                })
                // Longest idle first, then by name for determinism.
                .max_by(|(ia, a), (ib, b)| ia.cmp(ib).then_with(|| b.name.cmp(&a.name)));
            if let Some((idle, vm)) = candidate {
                self.drained_by_us.insert(vm.name.clone());
                decision.actions.push((
                    Action::Drain(vm.name.clone()),
                    format!(
                        "no session for {}s; {serving} serving VMs, aim is {desired}",
                        idle.as_secs()
                    ),
                ));
            }
        }
        decision
    }
}

fn is_alive(lifecycle: Lifecycle) -> bool {
    matches!(lifecycle, Lifecycle::Starting | Lifecycle::Running)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AutoscaleConfig {
        AutoscaleConfig {
            min_vms: 0,
            max_vms: 5,
            sessions_per_vm: 4,
            spare_vms: 1,
            scale_in_after: Duration::from_secs(900),
            scale_to_zero_after: Duration::from_secs(1800),
            cooldown: Duration::from_secs(120),
        }
    }

    /// An observation of `vms` with `waiting` sessions at `now`: no schedule window, no batch
    /// jobs (tests set those with `..at(…)`).
    fn at(vms: &[VmObservation], waiting: u32, now: Instant) -> Observation<'_> {
        Observation {
            vms,
            waiting,
            now,
            min_warm: 0,
            batch_pending_nodes: 0,
            batch_running_nodes: 0,
            batch_unregistered_nodes: 0,
            batch_registered_nodes: 0,
        }
    }

    fn vm(name: &str, sessions: u32, idle_since: Option<Instant>) -> VmObservation {
        VmObservation {
            name: name.into(),
            lifecycle: Lifecycle::Running,
            draining: false,
            sessions,
            idle_since,
            busy: false,
            booting: false,
            accepts_new: false,
        }
    }

    #[test]
    fn waiting_session_on_empty_pool_starts_a_vm() {
        let mut a = Autoscaler::new(config());
        let now = Instant::now();
        let d = a.decide(&at(&[], 1, now));
        assert_eq!(d.desired, 2);
        assert_eq!(d.actions[0].0, Action::Start(2));
    }

    #[test]
    fn waiting_session_with_full_vms_starts_one_even_when_the_aim_is_met() {
        let mut a = Autoscaler::new(AutoscaleConfig {
            spare_vms: 0,
            ..config()
        });
        // One VM, full at a cap below sessions_per_vm: the aim (1) is met, yet a user waits.
        let vms = [vm("a", 2, None)];
        let d = a.decide(&at(&vms, 1, Instant::now()));
        assert_eq!(d.desired, 1);
        assert_eq!(d.actions[0].0, Action::Start(1), "{d:?}");
    }

    #[test]
    fn aims_for_sessions_plus_spare() {
        let mut a = Autoscaler::new(config());
        let now = Instant::now();
        let vms = [vm("a", 4, None), vm("b", 3, None)];
        let d = a.decide(&at(&vms, 0, now));
        assert_eq!(d.desired, 3);
        assert_eq!(d.actions, vec![(Action::Start(1), d.actions[0].1.clone())]);
    }

    #[test]
    fn drains_then_removes_only_idle_vms_and_undrains_when_needed() {
        let mut a = Autoscaler::new(config());
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(1000);
        let mut vms = vec![vm("a", 1, None), vm("b", 0, Some(t0)), vm("c", 0, Some(t0))];
        // aim = ceil(1/4)+1 = 2; 3 serving; b and c idle 1000 s > 900 s: drain one (c? longest idle tie → by name, "b").
        let d = a.decide(&at(&vms, 0, later));
        assert_eq!(d.actions.len(), 1);
        assert_eq!(d.actions[0].0, Action::Drain("b".into()));
        vms[1].draining = true;
        // Next tick: b is still empty: remove it.
        let d = a.decide(&at(&vms, 0, later + Duration::from_secs(10)));
        assert_eq!(d.actions[0].0, Action::Remove("b".into()));

        // Demand comes back while c is draining: undrain instead of starting.
        let mut a = Autoscaler::new(config());
        let mut vms = vec![vm("a", 1, None), vm("c", 0, Some(t0))];
        vms.push(vm("d", 0, Some(t0)));
        let d = a.decide(&at(&vms, 0, later));
        let Action::Drain(name) = &d.actions[0].0 else {
            panic!("{d:?}")
        };
        let drained = name.clone();
        for v in &mut vms {
            if v.name == drained {
                v.draining = true;
            }
        }
        vms[0].sessions = 5; // aim = ceil(5/4)+1 = 3 > 2 serving
        let d = a.decide(&at(&vms, 0, later + Duration::from_secs(5)));
        assert_eq!(d.actions[0].0, Action::Undrain(drained));
    }

    #[test]
    fn never_drains_a_vm_with_sessions_or_within_cooldown() {
        let mut a = Autoscaler::new(config());
        let t0 = Instant::now();
        let vms = [vm("a", 0, None), vm("b", 0, None)];
        // Scale out happened just now (waiting).
        let _ = a.decide(&at(&[], 1, t0));
        let busy = [vm("a", 2, None), vm("b", 1, None), vm("c", 1, None)];
        let d = a.decide(&at(&busy, 0, t0 + Duration::from_secs(5000)));
        assert!(
            d.actions
                .iter()
                .all(|(a, _)| !matches!(a, Action::Drain(_) | Action::Remove(_)))
        );
        let _ = vms;
    }

    #[test]
    fn scales_to_zero_after_the_pool_is_idle() {
        let mut a = Autoscaler::new(config());
        let t0 = Instant::now();
        let vms = [vm("a", 0, Some(t0))];
        let d = a.decide(&at(&vms, 0, t0));
        assert_eq!(
            d.desired, 1,
            "spare VM kept while the pool is recently idle"
        );
        let d = a.decide(&at(&vms, 0, t0 + Duration::from_secs(1801)));
        assert_eq!(d.desired, 0);
        assert_eq!(d.actions[0].0, Action::Drain("a".into()));
    }

    #[test]
    fn never_exceeds_max_vms() {
        let mut a = Autoscaler::new(config());
        let vms: Vec<_> = (0..5).map(|i| vm(&format!("v{i}"), 4, None)).collect();
        let d = a.decide(&at(&vms, 10, Instant::now()));
        assert!(
            d.actions
                .iter()
                .all(|(a, _)| !matches!(a, Action::Start(_))),
            "{d:?}"
        );
    }

    #[test]
    fn never_drains_or_removes_a_busy_vm_and_takes_back_one_it_drained() {
        let mut a = Autoscaler::new(config());
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(5000);
        // Whole pool idle for long: everything could go, but "b" runs detached work.
        let mut vms = vec![vm("a", 0, Some(t0)), vm("b", 0, Some(t0))];
        vms[1].busy = true;
        let d = a.decide(&at(&vms, 0, later));
        assert_eq!(
            d.actions,
            vec![(Action::Drain("a".into()), d.actions[0].1.clone())]
        );
        vms[0].draining = true;
        // Only "b" is left serving, busy: never drained however long it idles.
        for step in 1..20 {
            let d = a.decide(&at(&vms, 0, later + Duration::from_secs(step * 1000)));
            assert!(
                d.actions
                    .iter()
                    .all(|(act, _)| *act != Action::Drain("b".into())
                        && *act != Action::Remove("b".into())),
                "{d:?}"
            );
            if step == 1 {
                assert_eq!(d.actions[0].0, Action::Remove("a".into()));
                vms.remove(0);
            }
        }
        // Work starts on a VM the policy drained, before it was removed: undrained, not removed.
        let mut a = Autoscaler::new(config());
        let mut vms = vec![vm("c", 0, Some(t0))];
        let _ = a.decide(&at(&vms, 0, t0));
        let d = a.decide(&at(&vms, 0, later));
        assert_eq!(d.actions[0].0, Action::Drain("c".into()));
        vms[0].draining = true;
        vms[0].busy = true;
        let d = a.decide(&at(&vms, 0, later + Duration::from_secs(1)));
        assert_eq!(d.actions.len(), 1, "{d:?}");
        assert_eq!(d.actions[0].0, Action::Undrain("c".into()));
        assert_eq!(a.draining().count(), 0);
        // The work ends: scale-in goes ahead again.
        vms[0].draining = false;
        vms[0].busy = false;
        let d = a.decide(&at(&vms, 0, later + Duration::from_secs(2)));
        assert_eq!(d.actions[0].0, Action::Drain("c".into()));
    }

    #[test]
    fn a_schedule_floor_starts_warm_vms_on_an_empty_pool_and_holds_them_idle() {
        let t0 = Instant::now();
        let mut a = Autoscaler::new(config());
        // Nobody there, pool at zero, a window keeps 3 warm: three start, and say why.
        let d = a.decide(&Observation {
            min_warm: 3,
            ..at(&[], 0, t0)
        });
        assert_eq!(d.desired, 3);
        assert_eq!(d.actions.len(), 1, "{d:?}");
        assert_eq!(d.actions[0].0, Action::Start(3));
        assert!(d.actions[0].1.contains("schedule window keeps 3"), "{d:?}");
        // Long idle, well past scale_to_zero_after: nothing is drained below the floor...
        let vms = vec![
            vm("a", 0, Some(t0)),
            vm("b", 0, Some(t0)),
            vm("c", 0, Some(t0)),
            vm("d", 0, Some(t0)),
        ];
        let later = t0 + Duration::from_secs(3 * 3600);
        let d = a.decide(&Observation {
            min_warm: 3,
            ..at(&vms, 0, later)
        });
        assert_eq!(d.desired, 3);
        assert_eq!(
            d.actions
                .iter()
                .filter(|(x, _)| matches!(x, Action::Drain(_)))
                .count(),
            1,
            "only the fourth VM goes: {d:?}"
        );
        // ...and when the window closes the usual rules take the pool to zero, one VM a tick.
        let mut b = Autoscaler::new(config());
        let _ = b.decide(&at(&vms[..3], 0, t0));
        let d = b.decide(&at(&vms[..3], 0, later));
        assert_eq!(d.desired, 0);
        assert!(matches!(d.actions[0].0, Action::Drain(_)), "{d:?}");
    }

    #[test]
    fn a_schedule_floor_adds_to_nothing_under_load_and_stays_within_max_vms() {
        let t0 = Instant::now();
        let mut a = Autoscaler::new(config());
        // 12 sessions on 4 VMs need 12/4 + 1 spare = 4: a floor of 2 changes nothing.
        let vms: Vec<_> = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|n| vm(n, 3, None))
            .collect();
        let d = a.decide(&Observation {
            min_warm: 2,
            ..at(&vms[..4], 0, t0)
        });
        assert_eq!(d.desired, 4);
        // A floor above max_vms (5) is held at max_vms.
        let d = a.decide(&Observation {
            min_warm: 9,
            ..at(&[], 0, t0)
        });
        assert_eq!((d.desired, d.actions[0].0.clone()), (5, Action::Start(5)));
    }

    #[test]
    fn pending_batch_jobs_wake_an_empty_pool_and_add_a_vm_per_node_up_to_max() {
        let t0 = Instant::now();
        let mut a = Autoscaler::new(config());
        // Pool at zero, long idle, a job pending for one node: one VM (+ the spare).
        let _ = a.decide(&at(&[], 0, t0));
        let d = a.decide(&Observation {
            batch_pending_nodes: 1,
            ..at(&[], 0, t0 + Duration::from_secs(3 * 3600))
        });
        assert_eq!(d.desired, 2, "{d:?}");
        assert_eq!(d.actions[0].0, Action::Start(2));
        assert!(d.actions[0].1.contains("pending batch jobs"), "{d:?}");
        // Twenty jobs queued: capped at max_vms (5).
        let d = a.decide(&Observation {
            batch_pending_nodes: 20,
            ..at(&[], 0, t0 + Duration::from_secs(3 * 3600))
        });
        assert_eq!(d.desired, 5);
        // VMs running jobs are busy: never drained, however long without sessions.
        let mut vms = vec![vm("a", 0, Some(t0)), vm("b", 0, Some(t0))];
        vms[0].busy = true;
        vms[1].busy = true;
        let d = a.decide(&at(&vms, 0, t0 + Duration::from_secs(5 * 3600)));
        assert!(
            !d.actions.iter().any(|(x, _)| matches!(x, Action::Drain(_))),
            "{d:?}"
        );
    }

    #[test]
    fn a_pending_job_gets_a_vm_besides_the_ones_running_jobs() {
        let t0 = Instant::now();
        let mut a = Autoscaler::new(config());
        // Three VMs each run a job (busy, no sessions); one more job is pending: a fourth VM
        // (and the spare, the pool being in use), not a wait for one of the three.
        let mut vms = vec![vm("a", 0, None), vm("b", 0, None), vm("c", 0, None)];
        for v in &mut vms {
            v.busy = true;
        }
        let d = a.decide(&Observation {
            batch_pending_nodes: 1,
            batch_running_nodes: 3,
            ..at(&vms, 0, t0)
        });
        assert_eq!(d.actions[0].0, Action::Start(2), "{d:?}");
        // Nothing pending: the running jobs' VMs are kept (busy) but add no VM.
        let d = a.decide(&Observation {
            batch_running_nodes: 3,
            ..at(&vms, 0, t0)
        });
        assert!(
            !d.actions.iter().any(|(x, _)| matches!(x, Action::Start(_))),
            "{d:?}"
        );
    }

    #[test]
    fn pending_jobs_start_no_vm_while_a_vm_started_for_them_has_not_registered() {
        fn obs(
            vms: &[VmObservation],
            pending: u32,
            running: u32,
            unregistered: u32,
            now: Instant,
        ) -> Observation<'_> {
            Observation {
                batch_pending_nodes: pending,
                batch_running_nodes: running,
                batch_unregistered_nodes: unregistered,
                ..at(vms, 0, now)
            }
        }
        let t0 = Instant::now();
        let mut c = config();
        c.spare_vms = 0;
        c.scale_in_after = Duration::from_secs(60);
        let mut a = Autoscaler::new(c);
        // One job pending on a pool at zero: one VM, as usual (nothing is known yet).
        let d = a.decide(&obs(&[], 1, 0, 0, t0));
        assert_eq!(d.actions, vec![(Action::Start(1), d.actions[0].1.clone())]);
        // It runs, idle, past register_within and scale_in_after; its node never registered.
        // Three more jobs queue: no VM is started for them, and the one up is kept (not
        // scaled in only to be started again).
        let vms = [vm("a", 0, Some(t0))];
        for minutes in [10, 20, 60] {
            let at = t0 + Duration::from_secs(60 * minutes);
            let d = a.decide(&obs(&vms, 4, 0, 1, at));
            assert_eq!(d.desired, 1, "{d:?}");
            assert!(d.actions.is_empty(), "{d:?}");
        }
        // Without the unregistered VM the same queue asks for four.
        let d = a.decide(&obs(&vms, 4, 0, 0, t0 + Duration::from_secs(3600)));
        assert_eq!(d.desired, 4);
        assert_eq!(d.actions[0].0, Action::Start(3));
        // More VMs serving than the jobs ask for: the extra ones are scaled in as usual.
        let three = [
            vm("a", 0, Some(t0)),
            vm("b", 0, Some(t0)),
            vm("c", 0, Some(t0)),
        ];
        let mut a = Autoscaler::new(c);
        let at = t0 + Duration::from_secs(3600);
        let d = a.decide(&obs(&three, 1, 0, 3, at));
        assert_eq!(d.desired, 1);
        assert!(matches!(d.actions[..], [(Action::Drain(_), _)]), "{d:?}");
        // A VM running a job is counted as usual besides: one running, one pending, both VMs
        // kept, none started.
        let mut two = [vm("a", 0, Some(t0)), vm("b", 0, None)];
        two[1].busy = true;
        let d = a.decide(&obs(&two, 3, 1, 1, at));
        assert_eq!(d.desired, 2, "{d:?}");
        assert!(
            !d.actions
                .iter()
                .any(|(x, _)| matches!(x, Action::Start(_) | Action::Drain(_))),
            "{d:?}"
        );
        // Sessions still start VMs: the interactive aim is not capped.
        let busy_vm = [vm("a", 8, None)];
        let d = a.decide(&Observation {
            waiting: 1,
            ..obs(&busy_vm, 2, 0, 1, at)
        });
        assert!(matches!(d.actions[..], [(Action::Start(_), _)]), "{d:?}");
    }

    #[test]
    fn a_few_broken_batch_vms_among_working_ones_are_replaced_not_a_brake() {
        let t0 = Instant::now();
        let mut c = config();
        c.spare_vms = 0;
        c.max_vms = 10;
        let mut a = Autoscaler::new(c);
        let at_ = t0 + Duration::from_secs(3600);
        // Four VMs run jobs (registered), one VM's slurmd never registered; two jobs wait.
        let mut five: Vec<VmObservation> = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|n| vm(n, 0, None))
            .collect();
        for v in &mut five[..4] {
            v.busy = true;
        }
        let obs = |unregistered: u32, registered: u32| Observation {
            batch_pending_nodes: 2,
            batch_running_nodes: 4,
            batch_unregistered_nodes: unregistered,
            batch_registered_nodes: registered,
            ..at(&five, 0, at_)
        };
        // The broken VM is no VM for the jobs: 4 running + 2 pending + 1 in its place.
        let d = a.decide(&obs(1, 4));
        assert_eq!(d.desired, 7, "{d:?}");
        assert_eq!(d.actions[0].0, Action::Start(2), "{d:?}");
        // As many broken as working (a new image gone wrong on half the pool): the brake.
        let d = a.decide(&obs(4, 4));
        assert_eq!(d.desired, 5, "{d:?}");
        assert!(
            !d.actions.iter().any(|(x, _)| matches!(x, Action::Start(_))),
            "{d:?}"
        );
        // Never past max_vms.
        let mut small = config();
        small.spare_vms = 0;
        small.max_vms = 6;
        let d = Autoscaler::new(small).decide(&obs(1, 4));
        assert_eq!(d.desired, 6, "{d:?}");
    }

    #[test]
    fn a_pool_found_at_zero_with_nobody_on_it_stays_at_zero() {
        // A gateway (or a new leader) starting over a pool scaled to zero starts no spare VM.
        let t0 = Instant::now();
        let mut a = Autoscaler::new(config());
        let mut stopped = vm("a", 0, None);
        stopped.lifecycle = Lifecycle::Stopped;
        let d = a.decide(&at(std::slice::from_ref(&stopped), 0, t0));
        assert_eq!((d.desired, d.actions.len()), (0, 0), "{d:?}");
        // A pool found with a VM running keeps it as the spare for scale_to_zero_after.
        let mut b = Autoscaler::new(config());
        let d = b.decide(&at(&[vm("a", 0, Some(t0))], 0, t0));
        assert_eq!((d.desired, d.actions.len()), (1, 0), "{d:?}");
        // Someone arrives at the sleeping pool: woken as before.
        let d = a.decide(&at(
            std::slice::from_ref(&stopped),
            1,
            t0 + Duration::from_secs(5),
        ));
        assert!(matches!(d.actions[0].0, Action::Start(_)), "{d:?}");
    }

    #[test]
    fn an_adopted_drain_is_finished_like_ones_own_and_an_operators_is_left_alone() {
        let t0 = Instant::now();
        // "c" serves (the aim of one spare VM is met); "a" and "b" are drained.
        let mut vms = vec![
            vm("a", 0, Some(t0)),
            vm("b", 0, Some(t0)),
            vm("c", 0, Some(t0)),
        ];
        vms[0].draining = true;
        vms[1].draining = true;
        // A policy with no history (a new leader) takes both drains for an operator's.
        let mut a = Autoscaler::new(config());
        let d = a.decide(&at(&vms, 0, t0));
        assert!(d.actions.is_empty(), "{d:?}");
        // "a" was drained for scale-in by the old leader: adopted, then removed while empty.
        assert!(a.adopt_drain("a"));
        assert!(!a.adopt_drain("a"), "adopting twice changes nothing");
        let d = a.decide(&at(&vms, 0, t0 + Duration::from_secs(1)));
        assert_eq!(
            d.actions.iter().map(|(x, _)| x.clone()).collect::<Vec<_>>(),
            vec![Action::Remove("a".into())]
        );
        // Adopted again, and demand comes back: undrained rather than a VM started; "b" (the
        // operator's) stays drained.
        assert!(a.adopt_drain("a"));
        let d = a.decide(&at(&vms, 1, t0 + Duration::from_secs(2)));
        assert_eq!(d.actions[0].0, Action::Undrain("a".into()), "{d:?}");
        assert!(
            d.actions
                .iter()
                .all(|(x, _)| *x != Action::Undrain("b".into())),
            "{d:?}"
        );
        // A name adopted for a VM that is not draining is forgotten at the next decision.
        vms[0].draining = false;
        let _ = a.adopt_drain("a");
        let _ = a.decide(&at(&vms, 0, t0 + Duration::from_secs(3)));
        assert_eq!(a.draining().count(), 0);
    }

    #[test]
    fn a_running_vm_not_probed_yet_or_taking_sessions_is_no_reason_to_start_another() {
        let mut a = Autoscaler::new(AutoscaleConfig {
            spare_vms: 0,
            ..config()
        });
        // One user waits; the one VM was woken for them and runs.
        let mut one_waiting = |v: VmObservation| a.decide(&at(&[v], 1, Instant::now()));
        let woken = vm("a", 0, Some(Instant::now()));
        // Its probes have not passed yet: it is on its way.
        let d = one_waiting(VmObservation {
            booting: true,
            ..woken.clone()
        });
        assert!(d.actions.is_empty(), "{d:?}");
        // It just passed them and takes sessions: the user is about to land there.
        let d = one_waiting(VmObservation {
            accepts_new: true,
            ..woken.clone()
        });
        assert!(d.actions.is_empty(), "{d:?}");
        // Probed, and unhealthy or full: the waiting user needs one more.
        let d = one_waiting(woken);
        assert_eq!(d.actions[0].0, Action::Start(1), "{d:?}");
    }
}
