//! The pool: the current [`Snapshot`] behind an [`ArcSwap`], the writers
//! that publish new snapshots, and session placement.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::clock::Clock;
use crate::health::Health;
use crate::http::HttpSessions;
use crate::select::{self, NoVm, PickRequest};
use crate::session::{PoolShared, SessionGuard, SessionInfo};
use crate::snapshot::{NameIndex, Snapshot};
use crate::store::{InMemoryStore, SessionStore};
use crate::vm::{Lifecycle, Protocol, Vm, VmShared, VmSpec, VmStatus};

/// Routing parameters (the gateway maps `[routing]` and `[http]` to these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoutingPolicy {
    /// Send a user back to the VM of their latest session (`affinity = "user"`).
    pub user_affinity: bool,
    /// How long affinity outlives a user's last session.
    pub affinity_ttl: Duration,
    /// How long an HTTP browser session counts as load after its last request.
    pub http_session_idle: Duration,
    /// How long a browser sent to a VM by its first request (cookie just
    /// issued) weighs in the least-loaded choice while its cookie has not come
    /// back.
    pub http_tentative_for: Duration,
}

impl Default for RoutingPolicy {
    /// User affinity on, 12 h affinity TTL, 30 min HTTP idle, 10 s tentative
    /// load (the config defaults).
    fn default() -> Self {
        Self {
            user_affinity: true,
            affinity_ttl: Duration::from_secs(12 * 3600),
            http_session_idle: Duration::from_secs(30 * 60),
            http_tentative_for: Duration::from_secs(10),
        }
    }
}

/// State only writers touch, behind the writer mutex.
#[derive(Default)]
struct Writer {
    generation: u64,
    /// Counters of removed VMs that may still be in use, reused if a VM of
    /// the same name comes back.
    retired: HashMap<String, Arc<VmShared>>,
    /// Told the generation of every snapshot published (see [`Pool::on_change`]).
    listeners: Vec<ChangeListener>,
    /// VMs gone from the VM set that are kept, draining, while sessions of this replica live on
    /// them (see [`Pool::set_vms`]), with whether they were draining before they left.
    leaving: HashMap<String, bool>,
}

/// A callback of [`Pool::on_change`].
type ChangeListener = Box<dyn Fn(u64) + Send + Sync>;

/// A pool of VMs and the sessions placed on them. `Send + Sync`; share it
/// with an `Arc`.
///
/// Readers ([`Pool::pick`], [`Pool::acquire`], [`Pool::snapshot`]) load the
/// current snapshot without locking. Writers (VM set and status changes)
/// serialise on a mutex, build a new snapshot and swap it in atomically;
/// they never wait for readers.
pub struct Pool {
    /// Replaceable at run time (configuration reload); read without locking.
    policy: ArcSwap<RoutingPolicy>,
    epoch: Instant,
    current: ArcSwap<Snapshot>,
    writer: Mutex<Writer>,
    /// Held while [`Pool::acquire`] chooses a VM and counts the session there: the
    /// least-loaded choice reads the live counts, and two sessions placed at once would both
    /// see the same VM as the emptiest.
    placing: Mutex<()>,
    pub(crate) shared: Arc<PoolShared>,
    pub(crate) http: HttpSessions,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let snap = self.current.load();
        f.debug_struct("Pool")
            .field("policy", &self.policy())
            .field("generation", &snap.generation())
            .field("vms", &snap.len())
            .field("sessions", &self.session_count())
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// An empty pool using an [`InMemoryStore`] for affinity.
    pub fn new(policy: RoutingPolicy, clock: Arc<dyn Clock>) -> Self {
        Self::with_store(policy, clock, Arc::new(InMemoryStore::new()))
    }

    /// An empty pool using `store` for affinity.
    pub fn with_store(
        policy: RoutingPolicy,
        clock: Arc<dyn Clock>,
        store: Arc<dyn SessionStore>,
    ) -> Self {
        Self {
            policy: ArcSwap::from_pointee(policy),
            epoch: clock.now(),
            current: ArcSwap::from_pointee(Snapshot::default()),
            writer: Mutex::new(Writer::default()),
            placing: Mutex::new(()),
            shared: Arc::new(PoolShared::new(clock, store)),
            http: HttpSessions::default(),
        }
    }

    /// The routing parameters.
    pub fn policy(&self) -> RoutingPolicy {
        **self.policy.load()
    }

    /// Replaces the routing parameters (configuration reload). Sessions already placed stay
    /// where they are; later picks and expiries use the new values.
    pub fn set_policy(&self, policy: RoutingPolicy) {
        self.policy.store(Arc::new(policy));
    }

    /// The pool's clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.shared.clock
    }

    /// The affinity store.
    pub fn store(&self) -> &Arc<dyn SessionStore> {
        &self.shared.store
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    fn lock_writer(&self) -> MutexGuard<'_, Writer> {
        // Writers leave no broken invariant behind if they panic: the
        // snapshot is only ever replaced whole.
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces the set of VMs.
    ///
    /// VMs that stay (by name) keep their status and live counters, with the
    /// new spec. New VMs start `Lifecycle::Running` + `Health::Unknown` (state
    /// `starting`) until probed. A removed VM on which this replica still
    /// holds sessions (SSH sessions, browser sessions, websockets) *leaves*:
    /// it stays in the snapshot, draining, so it takes no new session while
    /// its sessions carry on where they are (a pinned browser included) and
    /// are still seen in its counts, until they have ended or it went down
    /// ([`Pool::drop_departed`] then removes it). Removed VMs without
    /// sessions disappear at once. Either way, if a VM of the same name
    /// returns while any of its guards lives it gets the same counters back
    /// (so its `max_sessions` still covers them); one that returns while still
    /// leaving also keeps its health and gets the draining it had before it
    /// left (or was given meanwhile).
    /// With duplicate names the first spec wins. Publishes a new snapshot only
    /// if something changed.
    pub fn set_vms(&self, specs: Vec<VmSpec>) {
        let mut w = self.lock_writer();
        let old = self.current.load_full();
        let now = self.shared.clock.now();

        let mut specs = specs;
        specs.sort_by(|a, b| a.name.cmp(&b.name)); // stable: first duplicate stays first
        specs.dedup_by(|later, first| later.name == first.name);

        let unchanged = w.leaving.is_empty()
            && specs.len() == old.len()
            && specs.iter().zip(old.vms()).all(|(s, vm)| s == vm.spec());
        if unchanged {
            return;
        }

        let mut vms = Vec::with_capacity(specs.len());
        for spec in specs {
            let came_back = w.leaving.remove(&spec.name);
            let vm = match old.get(&spec.name) {
                Some(vm) if *vm.spec() == spec && came_back.is_none() => vm.clone(),
                Some(vm) => {
                    let mut status = vm.status();
                    if let Some(draining) = came_back {
                        status.draining = draining;
                        status.leaving = false;
                    }
                    Arc::new(Vm::new(
                        Arc::new(spec),
                        status,
                        vm.state_since(),
                        vm.shared().clone(),
                    ))
                }
                None => {
                    let shared = w.retired.remove(&spec.name).unwrap_or_else(|| {
                        Arc::new(VmShared::new(self.shared.clone(), self.epoch, now))
                    });
                    Arc::new(Vm::new(Arc::new(spec), VmStatus::default(), now, shared))
                }
            };
            vms.push(vm);
        }
        let mut departing = Vec::new();
        for vm in old.vms() {
            if vms.binary_search_by(|v| v.name().cmp(vm.name())).is_ok() {
                continue;
            }
            if vm.shared().local_total() > 0 {
                let status = vm.status();
                let was_leaving = w.leaving.contains_key(vm.name());
                w.leaving
                    .entry(vm.name().to_owned())
                    .or_insert(status.draining);
                departing.push(if was_leaving {
                    vm.clone()
                } else {
                    Arc::new(Vm::new(
                        vm.spec_arc().clone(),
                        VmStatus {
                            draining: true,
                            leaving: true,
                            ..status
                        },
                        now,
                        vm.shared().clone(),
                    ))
                });
            } else {
                w.leaving.remove(vm.name());
                w.retired.insert(vm.name().to_owned(), vm.shared().clone());
            }
        }
        if !departing.is_empty() {
            vms.extend(departing);
            vms.sort_by(|a, b| a.name().cmp(b.name()));
        }
        let same =
            vms.len() == old.len() && vms.iter().zip(old.vms()).all(|(a, b)| Arc::ptr_eq(a, b));
        if same {
            return;
        }
        self.publish(&mut w, vms, None);
        drop(old);
        // Counters still reachable (from a guard, or from an older snapshot a
        // reader may be placing a session from) are kept, so a returning VM
        // can never be counted twice; unreachable ones are forgotten.
        w.retired.retain(|_, shared| Arc::strong_count(shared) > 1);
    }

    /// Removes the VMs that left the VM set ([`Pool::set_vms`]) and on which this replica
    /// holds no session any more, or which went down or stopped (their sessions are gone with
    /// them; guards still alive keep counting on the retired counters, as for any removed VM);
    /// returns their names. Cheap when no VM is leaving; called every few hundred milliseconds.
    pub fn drop_departed(&self) -> Vec<String> {
        let mut w = self.lock_writer();
        if w.leaving.is_empty() {
            return Vec::new();
        }
        let old = self.current.load_full();
        let gone: Vec<String> = w
            .leaving
            .keys()
            .filter(|name| {
                old.get(name).is_none_or(|vm| {
                    let status = vm.status();
                    vm.shared().local_total() == 0
                        || status.lifecycle != Lifecycle::Running
                        || status.health() == Health::Down
                })
            })
            .cloned()
            .collect();
        if gone.is_empty() {
            return gone;
        }
        for name in &gone {
            w.leaving.remove(name);
            if let Some(vm) = old.get(name) {
                w.retired.insert(name.clone(), vm.shared().clone());
            }
        }
        let vms = old
            .vms()
            .iter()
            .filter(|vm| !gone.iter().any(|g| g == vm.name()))
            .cloned()
            .collect();
        self.publish(&mut w, vms, None);
        drop(old);
        w.retired.retain(|_, shared| Arc::strong_count(shared) > 1);
        gone
    }

    fn publish(&self, w: &mut Writer, vms: Vec<Arc<Vm>>, index: Option<Arc<NameIndex>>) {
        w.generation += 1;
        self.current
            .store(Arc::new(Snapshot::build(vms, w.generation, index)));
        for listener in &w.listeners {
            listener(w.generation);
        }
    }

    /// Calls `listener` with the generation of every snapshot published from now on (a VM
    /// added or removed, a status change), after it is visible to readers. It runs on the
    /// writer's thread with the writer lock held, so it must be quick and must not touch the
    /// pool: set a flag or send on a channel (the gateway wakes connections waiting for a VM
    /// this way instead of polling).
    pub fn on_change(&self, listener: impl Fn(u64) + Send + Sync + 'static) {
        self.lock_writer().listeners.push(Box::new(listener));
    }

    /// Applies `change` to one VM's status; publishes a new snapshot if the
    /// status changed. Returns false if the VM is unknown.
    fn update_status(&self, name: &str, change: impl FnOnce(&mut VmStatus)) -> bool {
        let mut w = self.lock_writer();
        let old = self.current.load_full();
        let Some(index) = old.position(name) else {
            return false;
        };
        let vm = &old.vms()[index];
        let mut status = vm.status();
        // A leaving VM stays draining; drains and undrains meanwhile apply if it comes back.
        // Leaving is the writer's to say (a status set whole cannot make or end it).
        let drain_on_return = w.leaving.get_mut(name);
        if let Some(draining) = &drain_on_return {
            status.draining = **draining;
        }
        change(&mut status);
        status.leaving = drain_on_return.is_some();
        if let Some(draining) = drain_on_return {
            *draining = status.draining;
            status.draining = true;
        }
        if status == vm.status() {
            return true;
        }
        let since = if status.state() == vm.state() {
            vm.state_since()
        } else {
            self.shared.clock.now()
        };
        let replacement = Arc::new(Vm::new(
            vm.spec_arc().clone(),
            status,
            since,
            vm.shared().clone(),
        ));
        let mut vms = old.vms().to_vec();
        vms[index] = replacement;
        self.publish(&mut w, vms, Some(old.index().clone()));
        true
    }

    /// Sets a VM's whole status. Returns false if the VM is unknown.
    pub fn set_status(&self, vm: &str, status: VmStatus) -> bool {
        self.update_status(vm, |s| *s = status)
    }

    /// Sets what the provider says about a VM. Returns false if unknown.
    ///
    /// A VM that comes up (to `Running` from any other lifecycle) has been idle only since now:
    /// the time it spent stopped or booting does not count towards `scale_in_after`, or a VM
    /// woken for a user whose request has lapsed would be drained the moment it came up.
    pub fn set_lifecycle(&self, vm: &str, lifecycle: Lifecycle) -> bool {
        let mut came_up = false;
        let known = self.update_status(vm, |s| {
            came_up = lifecycle == Lifecycle::Running && s.lifecycle != Lifecycle::Running;
            s.lifecycle = lifecycle;
        });
        if came_up && let Some(v) = self.current.load().get(vm) {
            v.shared().mark_idle(self.shared.clock.now());
        }
        known
    }

    /// Sets what the probes of both protocols say about a VM. Returns false
    /// if unknown.
    pub fn set_health(&self, vm: &str, health: Health) -> bool {
        self.update_status(vm, |s| {
            s.ssh = health;
            s.http = health;
        })
    }

    /// Sets what the probes of one protocol say about a VM (feed it
    /// [`Transition::to`](crate::health::Transition::to)); the other side is
    /// left as it is. Returns false if unknown.
    pub fn set_protocol_health(&self, vm: &str, protocol: Protocol, health: Health) -> bool {
        self.update_status(vm, |s| s.set_health_of(protocol, health))
    }

    /// Stops new sessions on a VM; existing ones (and browsers pinned to it,
    /// see [`PickRequest::keep_draining`]) carry on. Returns false if unknown.
    pub fn drain(&self, vm: &str) -> bool {
        self.update_status(vm, |s| s.draining = true)
    }

    /// Lets a drained VM take new sessions again. Returns false if unknown.
    pub fn undrain(&self, vm: &str) -> bool {
        self.update_status(vm, |s| s.draining = false)
    }

    /// Sets a VM's load hint (`node_load1 / cpus`), used only to break ties
    /// between equally loaded VMs (lower first; VMs without a hint last).
    /// Non-finite values clear it. Lock-free; publishes no snapshot. Returns
    /// false if the VM is unknown.
    pub fn set_load_hint(&self, vm: &str, hint: Option<f64>) -> bool {
        match self.current.load().get(vm) {
            Some(vm) => {
                vm.shared().set_load_hint(hint);
                true
            }
            None => false,
        }
    }

    /// Sets what other gateway replicas hold on a VM (their published counts,
    /// summed). Their sessions weigh in the least-loaded choice, in
    /// `max_sessions` and in idleness like this replica's own, their tentative
    /// browsers in the order only; never in this replica's own counts or
    /// metrics. Lock-free; publishes no snapshot. Returns false if the VM is
    /// unknown.
    ///
    /// The cap stays soft across replicas: two replicas reserving the last
    /// slot between two syncs both succeed, so a VM can exceed `max_sessions`
    /// by at most the replicas' count minus one for one sync interval.
    pub fn set_remote_load(&self, vm: &str, load: crate::LoadCounts) -> bool {
        match self.current.load().get(vm) {
            Some(vm) => {
                if vm.shared().set_remote(load) {
                    vm.shared().mark_idle(self.shared.clock.now());
                }
                true
            }
            None => false,
        }
    }

    /// The user's affinity VM, looked up only when it could matter (user
    /// affinity on, a user, and no eligible pinned VM).
    /// One choice from `snap` (see [`Pool::acquire`] for the order).
    /// `pinned` is `req.pinned_vm` already looked up; the affinity store is
    /// consulted only when the pinned VM does not take the session.
    fn choose<'s>(
        &self,
        snap: &'s Snapshot,
        req: &PickRequest<'_>,
        pinned: Option<&'s Arc<Vm>>,
        now: Option<Instant>,
        check_capacity: bool,
    ) -> Option<&'s Arc<Vm>> {
        let affinity = || {
            let policy = self.policy();
            let user = req.user.filter(|_| policy.user_affinity)?;
            // The shared store's answer (looked up by the caller) knows sessions placed through
            // other replicas too, so it comes first.
            if let Some(hint) = req.affinity_hint {
                return Some(Arc::from(hint));
            }
            let now = now.unwrap_or_else(|| self.shared.clock.now());
            self.shared.store.affinity(user, now, policy.affinity_ttl)
        };
        select::choose(snap, req, pinned, affinity, check_capacity)
    }

    /// The VM a new session would go to now, without counting a session
    /// (see [`Pool::acquire`] for the order).
    pub fn pick(&self, req: &PickRequest<'_>) -> Result<Arc<Vm>, NoVm> {
        let snap = self.current.load();
        let pinned = req.pinned_vm.and_then(|p| snap.get(p));
        // The clock is read only if the affinity store is consulted.
        match self.choose(&snap, req, pinned, None, true) {
            Some(vm) => Ok(vm.clone()),
            None => Err(NoVm::tally(&snap, req)),
        }
    }

    /// Places a new session and counts it until the guard drops.
    ///
    /// Order: `pinned_vm` if eligible; else, with user affinity on, the
    /// user's affinity VM if eligible; else the least-loaded eligible VM by
    /// `sessions / weight`, ties broken by load hint, then name. Eligible
    /// means healthy (running, probed up, not draining; a draining pinned VM
    /// is accepted with [`PickRequest::keep_draining`]), below its session
    /// limit and not in [`PickRequest::exclude`]. Placements are made one at a
    /// time, so sessions placed together from several threads see each other:
    /// they spread exactly, and one user's land on one VM. The session is counted with a compare-exchange
    /// against `max_sessions`, so the limit holds whatever else changes the
    /// counts (sessions ending, other replicas); if the chosen VM fills up
    /// meanwhile, the next best is tried. Status changes are seen from the next call on (a call already
    /// running when a VM starts draining may still place one session there,
    /// as with any snapshot design).
    pub fn acquire(&self, req: &PickRequest<'_>) -> Result<SessionGuard, NoVm> {
        let snap = self.current.load();
        let pinned = req.pinned_vm.and_then(|p| snap.get(p));
        let now = self.shared.clock.now();
        // One placement at a time (SSH logins: a few per second at most; the lock is held for
        // a choice, a compare-exchange and the session's record), so logins arriving together
        // spread exactly and one user's connections opened together share a VM.
        let placing = self.placing.lock().unwrap_or_else(PoisonError::into_inner);
        // Each failed attempt means a VM filled up under us; bounded anyway.
        // The first attempt leaves the capacity check to the reservation.
        for attempt in 0..=snap.len() + 1 {
            let Some(vm) = self.choose(&snap, req, pinned, Some(now), attempt > 0) else {
                break;
            };
            if vm.shared().try_reserve(vm.spec().capacity(), req.protocol) {
                // Made under the lock: the guard records the user's affinity, which the next
                // placement of the same user must see.
                let guard = self.shared.guard(vm.clone(), req.protocol, req.user, now);
                drop(placing);
                return Ok(guard);
            }
        }
        Err(NoVm::tally(&snap, req))
    }

    /// Live sessions (SSH and HTTP, including those on VMs that left the
    /// pool), oldest first.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        let clock = &self.shared.clock;
        let (now, wall) = (clock.now(), clock.wall());
        let mut out: Vec<SessionInfo> = self
            .shared
            .registry
            .iter()
            .map(|e| e.value().info(now, wall))
            .collect();
        out.sort_by_key(|s| (s.started, s.id));
        out
    }

    /// Number of live sessions (SSH and HTTP).
    pub fn session_count(&self) -> usize {
        self.shared.registry.len()
    }

    /// Drops HTTP browser sessions idle longer than
    /// [`RoutingPolicy::http_session_idle`] or, unless an open websocket holds
    /// them, on a VM whose web side the probes found down; tentative browsers
    /// older than [`RoutingPolicy::http_tentative_for`]; and affinity entries
    /// older than [`RoutingPolicy::affinity_ttl`]. Returns how many expired.
    /// Call it periodically.
    pub fn expire_idle(&self) -> usize {
        let now = self.shared.clock.now();
        let policy = self.policy();
        let snap = self.snapshot();
        let down = |vm: &str| {
            snap.get(vm)
                .is_some_and(|v| v.status().health_of(Protocol::Http) == Health::Down)
        };
        let http = self.http.expire(
            now,
            policy.http_session_idle,
            policy.http_tentative_for,
            down,
        );
        http + self.shared.store.expire(now, policy.affinity_ttl)
    }
}

#[cfg(test)]
#[path = "pool_tests.rs"]
mod tests;
