//! The VM model: what a pool member is ([`VmSpec`]), what the provider and the
//! probes say about it ([`VmStatus`]), and its live load (shared atomics).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::health::Health;
use crate::session::PoolShared;

/// The protocol a session arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// An SSH connection (shell, exec, sftp, forwarding, ...).
    Ssh,
    /// A browser session on the VM's web side (JupyterHub).
    Http,
}

impl Protocol {
    /// Both protocols, in a fixed order.
    pub const ALL: [Protocol; 2] = [Protocol::Ssh, Protocol::Http];

    /// The protocol's position in [`Protocol::ALL`] (for per-protocol arrays).
    #[inline]
    pub fn index(self) -> usize {
        match self {
            Protocol::Ssh => 0,
            Protocol::Http => 1,
        }
    }

    /// `"ssh"` or `"http"` (the `protocol` metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Ssh => "ssh",
            Protocol::Http => "http",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the provider says about a VM's machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Lifecycle {
    /// Booting or being created.
    Starting,
    /// Up as far as the provider knows.
    #[default]
    Running,
    /// Being stopped, deallocated or deleted.
    Stopping,
    /// Not running.
    Stopped,
}

impl Lifecycle {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Lifecycle::Starting => "starting",
            Lifecycle::Running => "running",
            Lifecycle::Stopping => "stopping",
            Lifecycle::Stopped => "stopped",
        }
    }
}

/// The public state of a VM (the `state` label of `poolgate_vm_state` and
/// `poolgate_pool_vms`), derived from [`VmStatus`] by precedence:
/// stopped > draining > unhealthy > starting > healthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum VmState {
    /// Lifecycle `Starting`, or health not known yet.
    Starting,
    /// Running, probes pass, not draining.
    Healthy,
    /// Probes fail.
    Unhealthy,
    /// Keeps its sessions, takes no new ones.
    Draining,
    /// Lifecycle `Stopping` or `Stopped`.
    Stopped,
}

impl VmState {
    /// Every state, in a fixed order (for exporting one gauge per state).
    pub const ALL: [VmState; 5] = [
        VmState::Starting,
        VmState::Healthy,
        VmState::Unhealthy,
        VmState::Draining,
        VmState::Stopped,
    ];

    /// Lowercase name: `"starting"`, `"healthy"`, `"unhealthy"`, `"draining"`
    /// or `"stopped"`.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Starting => "starting",
            VmState::Healthy => "healthy",
            VmState::Unhealthy => "unhealthy",
            VmState::Draining => "draining",
            VmState::Stopped => "stopped",
        }
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A pool member as configured or discovered.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VmSpec {
    /// Unique name within the pool (the `vm` metric label).
    pub name: String,
    /// Address the gateway connects to (IP or DNS name).
    pub host: String,
    /// Port of the VM's sshd.
    pub ssh_port: u16,
    /// Port of the VM's web side (JupyterHub).
    pub http_port: u16,
    /// Relative capacity: load is `sessions / weight`. A weight of 0 means the
    /// VM takes no new sessions (it counts as "at its session limit").
    pub weight: u32,
    /// Cap on live sessions (SSH + active HTTP). 0 means no new sessions.
    /// Lowering it ends no session: the VM just takes no new ones until it
    /// is below the new cap.
    pub max_sessions: u32,
}

impl VmSpec {
    /// A spec with weight 1 and a cap of 10 sessions, ports 22 and 8000.
    pub fn new(name: impl Into<String>, host: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            host: host.into(),
            ssh_port: 22,
            http_port: 8000,
            weight: 1,
            max_sessions: 10,
        }
    }

    /// How many sessions the VM may hold: `max_sessions`, or 0 when the
    /// weight is 0.
    pub fn capacity(&self) -> u32 {
        if self.weight == 0 {
            0
        } else {
            self.max_sessions
        }
    }
}

/// Everything known about a VM besides its spec and load.
///
/// Health is kept per protocol: the SSH probe decides whether SSH sessions
/// may go to the VM, the web probe whether browsers may, and one side's
/// failure never blocks the other. A protocol the gateway does not serve is
/// never probed and stays [`Health::Unknown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VmStatus {
    /// What the provider says.
    pub lifecycle: Lifecycle,
    /// What the SSH probe says (sshd's banner).
    pub ssh: Health,
    /// What the web probe says (JupyterHub's health URL).
    pub http: Health,
    /// Set by an operator (or the autoscaler) to stop new sessions.
    pub draining: bool,
    /// Gone from the VM set, kept (draining) while sessions live on it
    /// ([`Pool::set_vms`](crate::Pool::set_vms)): a pinned browser goes on
    /// there only while its session lives, and nothing starts there.
    pub leaving: bool,
}

impl VmStatus {
    /// What the probes of `protocol` say.
    #[inline]
    pub fn health_of(&self, protocol: Protocol) -> Health {
        match protocol {
            Protocol::Ssh => self.ssh,
            Protocol::Http => self.http,
        }
    }

    /// Sets what the probes of `protocol` say.
    pub fn set_health_of(&mut self, protocol: Protocol, health: Health) {
        match protocol {
            Protocol::Ssh => self.ssh = health,
            Protocol::Http => self.http = health,
        }
    }

    /// The VM's health over both protocols: up when either side is up (the
    /// VM takes sessions of that protocol), down when a side is down and
    /// none is up, unknown while nothing has been probed.
    pub fn health(&self) -> Health {
        match (self.ssh, self.http) {
            (Health::Up, _) | (_, Health::Up) => Health::Up,
            (Health::Down, _) | (_, Health::Down) => Health::Down,
            (Health::Unknown, Health::Unknown) => Health::Unknown,
        }
    }

    /// The public state, by precedence stopped > draining > unhealthy >
    /// starting > healthy, from the health over both protocols
    /// ([`VmStatus::health`]): a VM whose SSH side is up but whose web side is
    /// down is `healthy` (it takes SSH sessions).
    pub fn state(&self) -> VmState {
        match (self.lifecycle, self.draining, self.health()) {
            (Lifecycle::Stopping | Lifecycle::Stopped, _, _) => VmState::Stopped,
            (_, true, _) => VmState::Draining,
            (_, false, Health::Down) => VmState::Unhealthy,
            (Lifecycle::Starting, false, _) | (_, false, Health::Unknown) => VmState::Starting,
            (Lifecycle::Running, false, Health::Up) => VmState::Healthy,
        }
    }

    /// The state as a session of `protocol` sees it: that protocol's health
    /// only (the other side's does not matter).
    pub fn state_of(&self, protocol: Protocol) -> VmState {
        let health = self.health_of(protocol);
        VmStatus {
            ssh: health,
            http: health,
            ..*self
        }
        .state()
    }

    /// Whether the machine serves `protocol`: running and that protocol's
    /// probes pass. Existing sessions (and browsers pinned to a draining VM)
    /// only need this.
    #[inline]
    pub fn serving(&self, protocol: Protocol) -> bool {
        self.lifecycle == Lifecycle::Running && self.health_of(protocol) == Health::Up
    }

    /// Whether the VM takes new sessions of `protocol`, capacity aside:
    /// serving it and not draining.
    #[inline]
    pub fn accepts_new(&self, protocol: Protocol) -> bool {
        self.serving(protocol) && !self.draining
    }

    /// Whether the VM takes new sessions of at least one protocol (state
    /// `healthy`).
    pub fn accepts_any(&self) -> bool {
        Protocol::ALL.iter().any(|&p| self.accepts_new(p))
    }
}

/// Marker for "no load hint" in the atomic (a NaN bit pattern).
const NO_HINT: u64 = u64::MAX;

/// Live per-VM counters, shared by every snapshot's copy of the VM and by
/// every session guard on it. Cache-line aligned so that sessions on
/// different VMs never contend on one line.
#[repr(align(64))]
/// What one gateway replica holds on a VM: sessions per protocol and
/// tentative browsers (first request answered, cookie not back yet). Other
/// replicas' sum goes to [`Pool::set_remote_load`](crate::Pool::set_remote_load).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadCounts {
    /// SSH sessions.
    pub ssh: u32,
    /// Browser sessions.
    pub http: u32,
    /// Tentative browsers: they order the choice, never count against the cap.
    pub tentative: u32,
}

impl LoadCounts {
    /// Both counts added, saturating.
    #[must_use]
    pub fn saturating_add(self, other: Self) -> Self {
        Self {
            ssh: self.ssh.saturating_add(other.ssh),
            http: self.http.saturating_add(other.http),
            tentative: self.tentative.saturating_add(other.tentative),
        }
    }
}

pub(crate) struct VmShared {
    /// Live sessions per protocol, packed in one word (SSH in the low half,
    /// HTTP in the high half) so that a placement or a release is a single
    /// atomic operation and the total is always consistent.
    counts: AtomicU64,
    /// Browsers sent here on their first request whose cookie has not come
    /// back yet: weighed by the least-loaded choice, never against
    /// `max_sessions` (see [`Pool::http_route_new`](crate::Pool::http_route_new)).
    tentative: AtomicU32,
    /// Sessions other gateway replicas hold on this VM, packed like `counts`
    /// (see [`Pool::set_remote_load`](crate::Pool::set_remote_load)): they
    /// count towards the load, the cap and idleness, never towards this
    /// replica's own counts.
    remote: AtomicU64,
    /// Tentative browsers other gateway replicas sent here (see
    /// [`Pool::set_remote_load`](crate::Pool::set_remote_load)).
    remote_tentative: AtomicU32,
    load_hint: AtomicU64,
    /// Nanoseconds after `epoch` when the total last dropped to zero.
    idle_since: AtomicU64,
    epoch: Instant,
    /// What this VM's guards report to when they drop. Reached through the
    /// VM so that guards do not each touch one shared reference count.
    pool: Arc<PoolShared>,
}

impl fmt::Debug for VmShared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VmShared")
            .field("ssh", &self.sessions(Protocol::Ssh))
            .field("http", &self.sessions(Protocol::Http))
            .field("load_hint", &self.load_hint())
            .finish_non_exhaustive()
    }
}

impl VmShared {
    /// Fresh counters for a VM of `pool` that appears at `now`; `epoch` is
    /// the pool's time origin.
    pub(crate) fn new(pool: Arc<PoolShared>, epoch: Instant, now: Instant) -> Self {
        Self {
            counts: AtomicU64::new(0),
            tentative: AtomicU32::new(0),
            remote: AtomicU64::new(0),
            remote_tentative: AtomicU32::new(0),
            load_hint: AtomicU64::new(NO_HINT),
            idle_since: AtomicU64::new(nanos_since(epoch, now)),
            epoch,
            pool,
        }
    }

    /// The pool this VM belongs to.
    pub(crate) fn pool(&self) -> &Arc<PoolShared> {
        &self.pool
    }

    /// Live sessions (all protocols, this replica's and the others').
    #[inline]
    pub(crate) fn total(&self) -> u32 {
        self.local_total().saturating_add(self.remote_total())
    }

    /// Live sessions this replica holds (all protocols).
    #[inline]
    pub(crate) fn local_total(&self) -> u32 {
        total_of(self.counts.load(Ordering::Acquire))
    }

    /// Sessions other replicas hold (all protocols).
    #[inline]
    pub(crate) fn remote_total(&self) -> u32 {
        total_of(self.remote.load(Ordering::Acquire))
    }

    /// Live sessions of one protocol that this replica holds.
    #[inline]
    pub(crate) fn sessions(&self, protocol: Protocol) -> u32 {
        let counts = self.counts.load(Ordering::Acquire);
        (counts >> shift(protocol)) as u32
    }

    /// Sessions of one protocol that other replicas hold.
    #[inline]
    pub(crate) fn remote_sessions(&self, protocol: Protocol) -> u32 {
        let counts = self.remote.load(Ordering::Acquire);
        (counts >> shift(protocol)) as u32
    }

    /// Replaces what the other replicas hold here; returns true when the VM's
    /// total dropped to zero with it (the caller then calls
    /// [`VmShared::mark_idle`]).
    pub(crate) fn set_remote(&self, load: LoadCounts) -> bool {
        self.remote_tentative
            .store(load.tentative, Ordering::Release);
        let packed = u64::from(load.ssh) | (u64::from(load.http) << 32);
        let before = self.remote.swap(packed, Ordering::AcqRel);
        total_of(before) > 0 && packed == 0 && self.local_total() == 0
    }

    /// Tentative browser sessions (first request answered, cookie not back).
    #[inline]
    pub(crate) fn tentative(&self) -> u32 {
        self.tentative.load(Ordering::Acquire)
    }

    /// Tentative browsers this replica and the others sent here: what the
    /// least-loaded order weighs.
    #[inline]
    pub(crate) fn tentative_total(&self) -> u32 {
        self.tentative()
            .saturating_add(self.remote_tentative.load(Ordering::Acquire))
    }

    pub(crate) fn add_tentative(&self) {
        self.tentative.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn remove_tentative(&self) {
        self.tentative.fetch_sub(1, Ordering::AcqRel);
    }

    /// Counts one session of `protocol` unless the total is already at `cap`.
    /// The check and the increment are one compare-exchange, so concurrent
    /// callers can never push the total past `cap`.
    #[inline]
    pub(crate) fn try_reserve(&self, cap: u32, protocol: Protocol) -> bool {
        let unit = 1u64 << shift(protocol);
        let remote = self.remote_total();
        let mut cur = self.counts.load(Ordering::Acquire);
        loop {
            if total_of(cur).saturating_add(remote) >= cap {
                return false;
            }
            match self.counts.compare_exchange_weak(
                cur,
                cur + unit,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Uncounts one session of `protocol`; returns true when that was the
    /// last session on the VM, counting other replicas' (the caller then calls
    /// [`VmShared::mark_idle`]).
    #[inline]
    pub(crate) fn release(&self, protocol: Protocol) -> bool {
        let prev = self
            .counts
            .fetch_sub(1u64 << shift(protocol), Ordering::AcqRel);
        total_of(prev) == 1 && self.remote_total() == 0
    }

    /// Records that the VM became idle at `now`. Keeps the latest such time,
    /// so racing releases can only make the VM look idle for less long.
    pub(crate) fn mark_idle(&self, now: Instant) {
        self.idle_since
            .fetch_max(nanos_since(self.epoch, now), Ordering::AcqRel);
    }

    #[inline]
    pub(crate) fn load_hint(&self) -> Option<f64> {
        match self.load_hint.load(Ordering::Relaxed) {
            NO_HINT => None,
            bits => Some(f64::from_bits(bits)),
        }
    }

    pub(crate) fn set_load_hint(&self, hint: Option<f64>) {
        let bits = match hint {
            Some(h) if h.is_finite() => h.to_bits(),
            _ => NO_HINT,
        };
        self.load_hint.store(bits, Ordering::Relaxed);
    }
}

/// Bit offset of `protocol`'s count in the packed counts word.
#[inline]
fn shift(protocol: Protocol) -> u32 {
    match protocol {
        Protocol::Ssh => 0,
        Protocol::Http => 32,
    }
}

/// Total sessions in a packed counts word (each half is below `u32::MAX`
/// because the total is capped by a `u32`).
#[inline]
fn total_of(counts: u64) -> u32 {
    (counts as u32).saturating_add((counts >> 32) as u32)
}

fn nanos_since(epoch: Instant, t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX)
}

/// One VM as seen in a [`Snapshot`](crate::Snapshot).
///
/// The spec and status are frozen in this snapshot; the session counters,
/// the load hint and `idle_since` are live atomics shared with every other
/// snapshot's copy of the same VM.
#[derive(Debug)]
#[repr(align(64))] // each guard touches its VM's reference count
pub struct Vm {
    spec: Arc<VmSpec>,
    status: VmStatus,
    state_since: Instant,
    shared: Arc<VmShared>,
}

impl Vm {
    pub(crate) fn new(
        spec: Arc<VmSpec>,
        status: VmStatus,
        state_since: Instant,
        shared: Arc<VmShared>,
    ) -> Self {
        Self {
            spec,
            status,
            state_since,
            shared,
        }
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The VM's spec as of this snapshot.
    pub fn spec(&self) -> &VmSpec {
        &self.spec
    }

    pub(crate) fn spec_arc(&self) -> &Arc<VmSpec> {
        &self.spec
    }

    /// Lifecycle, health and draining flag as of this snapshot.
    pub fn status(&self) -> VmStatus {
        self.status
    }

    /// The public state as of this snapshot.
    pub fn state(&self) -> VmState {
        self.status.state()
    }

    /// When [`Vm::state`] last changed (or the VM joined the pool).
    pub fn state_since(&self) -> Instant {
        self.state_since
    }

    /// Live sessions of one protocol on this VM, through every replica.
    pub fn sessions(&self, protocol: Protocol) -> u32 {
        self.shared
            .sessions(protocol)
            .saturating_add(self.shared.remote_sessions(protocol))
    }

    /// Live sessions of one protocol that this replica holds (what its own
    /// metrics count).
    pub fn local_sessions(&self, protocol: Protocol) -> u32 {
        self.shared.sessions(protocol)
    }

    /// Sessions of one protocol that other replicas hold (zero for a single
    /// replica).
    pub fn remote_sessions(&self, protocol: Protocol) -> u32 {
        self.shared.remote_sessions(protocol)
    }

    /// Live sessions of all protocols through every replica (what
    /// `max_sessions` caps).
    pub fn total_sessions(&self) -> u32 {
        self.shared.total()
    }

    /// Browsers sent here by their first request whose cookie has not come
    /// back yet, through every replica (they weigh in the least-loaded choice
    /// for a short time, but are not sessions).
    pub fn tentative_sessions(&self) -> u32 {
        self.shared.tentative_total()
    }

    /// The same, sent by this replica only (what its own metrics count and
    /// what it tells the others).
    pub fn local_tentative_sessions(&self) -> u32 {
        self.shared.tentative()
    }

    /// Whether the VM holds as many sessions as it may
    /// ([`VmSpec::capacity`]).
    pub fn is_full(&self) -> bool {
        self.shared.total() >= self.spec.capacity()
    }

    /// Whether a new session of `protocol` may be placed here now: that
    /// protocol's probes pass, not draining, and not full.
    pub fn accepts_new_sessions(&self, protocol: Protocol) -> bool {
        self.status.accepts_new(protocol) && !self.is_full()
    }

    /// Weighted load `total_sessions / weight`, for display (selection
    /// compares exact integers instead). Infinite when the weight is 0.
    pub fn load(&self) -> f64 {
        if self.spec.weight == 0 {
            return f64::INFINITY;
        }
        f64::from(self.total_sessions()) / f64::from(self.spec.weight)
    }

    /// The last load hint given by [`Pool::set_load_hint`](crate::Pool::set_load_hint).
    pub fn load_hint(&self) -> Option<f64> {
        self.shared.load_hint()
    }

    /// When the VM last became idle (its session count dropped to zero, or it
    /// joined the pool), or `None` while it has sessions. For the autoscaler.
    pub fn idle_since(&self) -> Option<Instant> {
        if self.shared.total() > 0 {
            return None;
        }
        let nanos = self.shared.idle_since.load(Ordering::Acquire);
        Some(self.shared.epoch + Duration::from_nanos(nanos))
    }

    pub(crate) fn shared(&self) -> &Arc<VmShared> {
        &self.shared
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::store::InMemoryStore;

    fn shared(t0: Instant) -> VmShared {
        let pool = PoolShared::new(Arc::new(ManualClock::new()), Arc::new(InMemoryStore::new()));
        VmShared::new(Arc::new(pool), t0, t0)
    }

    fn status(lifecycle: Lifecycle, health: Health, draining: bool) -> VmStatus {
        VmStatus {
            lifecycle,
            ssh: health,
            http: health,
            draining,
            leaving: false,
        }
    }

    #[test]
    fn state_precedence() {
        use Health::*;
        use Lifecycle::*;
        assert_eq!(status(Stopped, Up, true).state(), VmState::Stopped);
        assert_eq!(status(Stopping, Down, false).state(), VmState::Stopped);
        assert_eq!(status(Running, Down, true).state(), VmState::Draining);
        assert_eq!(status(Starting, Down, false).state(), VmState::Unhealthy);
        assert_eq!(status(Starting, Up, false).state(), VmState::Starting);
        assert_eq!(status(Running, Unknown, false).state(), VmState::Starting);
        assert_eq!(status(Running, Up, false).state(), VmState::Healthy);
    }

    #[test]
    fn accepts_new_only_when_healthy() {
        for lifecycle in [
            Lifecycle::Starting,
            Lifecycle::Running,
            Lifecycle::Stopping,
            Lifecycle::Stopped,
        ] {
            for health in [Health::Unknown, Health::Up, Health::Down] {
                for draining in [false, true] {
                    let s = status(lifecycle, health, draining);
                    assert_eq!(s.accepts_any(), s.state() == VmState::Healthy, "{s:?}");
                }
            }
        }
    }

    #[test]
    fn health_is_per_protocol() {
        use Health::*;
        let mut s = status(Lifecycle::Running, Unknown, false);
        s.ssh = Up;
        s.http = Down;
        assert_eq!(s.health(), Up);
        assert_eq!(s.state(), VmState::Healthy);
        assert!(s.accepts_new(Protocol::Ssh));
        assert!(!s.accepts_new(Protocol::Http));
        // Only the web side up: browsers yes, SSH no.
        s.ssh = Down;
        s.http = Up;
        assert!(!s.accepts_new(Protocol::Ssh));
        assert!(s.accepts_new(Protocol::Http));
        // A side never probed (no listener) blocks nothing.
        s.ssh = Up;
        s.http = Unknown;
        assert_eq!(s.state(), VmState::Healthy);
        assert!(s.accepts_new(Protocol::Ssh));
        s.ssh = Down;
        assert_eq!(s.state(), VmState::Unhealthy);
        assert!(!s.accepts_any());
    }

    #[test]
    fn reserve_respects_cap_and_counts_per_protocol() {
        let now = Instant::now();
        let s = shared(now);
        assert!(s.try_reserve(2, Protocol::Ssh));
        assert!(s.try_reserve(2, Protocol::Http));
        assert!(!s.try_reserve(2, Protocol::Ssh));
        assert_eq!(s.total(), 2);
        assert_eq!(s.sessions(Protocol::Ssh), 1);
        assert_eq!(s.sessions(Protocol::Http), 1);
        assert!(!s.release(Protocol::Ssh));
        assert!(s.release(Protocol::Http));
        assert_eq!(s.total(), 0);
    }

    #[test]
    fn idle_since_keeps_latest() {
        let t0 = Instant::now();
        let s = Arc::new(shared(t0));
        let vm = Vm::new(
            Arc::new(VmSpec::new("a", "h")),
            VmStatus::default(),
            t0,
            s.clone(),
        );
        assert_eq!(vm.idle_since(), Some(t0));
        s.try_reserve(1, Protocol::Ssh);
        assert_eq!(vm.idle_since(), None);
        s.release(Protocol::Ssh);
        s.mark_idle(t0 + Duration::from_secs(9));
        s.mark_idle(t0 + Duration::from_secs(5));
        assert_eq!(vm.idle_since(), Some(t0 + Duration::from_secs(9)));
    }

    #[test]
    fn load_hint_roundtrip() {
        let t0 = Instant::now();
        let s = shared(t0);
        assert_eq!(s.load_hint(), None);
        s.set_load_hint(Some(0.25));
        assert_eq!(s.load_hint(), Some(0.25));
        s.set_load_hint(Some(f64::NAN));
        assert_eq!(s.load_hint(), None);
    }

    #[test]
    fn weight_zero_has_no_capacity() {
        let mut spec = VmSpec::new("a", "h");
        assert_eq!(spec.capacity(), 10);
        spec.weight = 0;
        assert_eq!(spec.capacity(), 0);
        let t0 = Instant::now();
        let vm = Vm::new(
            Arc::new(spec),
            VmStatus::default(),
            t0,
            Arc::new(shared(t0)),
        );
        assert_eq!(vm.load(), f64::INFINITY);
        assert!(vm.is_full());
    }
}
