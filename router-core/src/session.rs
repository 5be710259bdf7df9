//! Session accounting: a [`SessionGuard`] counts one live session on a VM
//! for as long as it exists.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use dashmap::DashMap;

use crate::clock::Clock;
use crate::hash::FastBuild;
use crate::store::SessionStore;
use crate::vm::{Protocol, Vm, VmSpec};

/// Session ids are handed out to each thread in blocks of this many, so
/// threads placing sessions at the same time do not contend on one counter.
const ID_BLOCK: u64 = 32;

/// The next unhanded block of ids (process-wide, so ids are unique across
/// pools too).
static NEXT_ID_BLOCK: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's current block: next id and end (exclusive).
    static ID_RANGE: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
}

/// A new session id: unique in the process, increasing per thread.
fn next_session_id() -> u64 {
    ID_RANGE.with(|range| {
        let (mut next, mut end) = range.get();
        if next == end {
            next = NEXT_ID_BLOCK.fetch_add(ID_BLOCK, Ordering::Relaxed);
            end = next + ID_BLOCK;
        }
        range.set((next + 1, end));
        next
    })
}

/// Shards of the concurrent maps on the session path: enough that threads
/// placing sessions at the same time rarely meet on one shard lock.
pub(crate) const SHARDS: usize = 64;

/// Live sessions by id.
pub(crate) type Registry = DashMap<u64, Arc<SessionShared>, FastBuild>;

/// What guards need from their pool, kept alive by the guards themselves.
pub(crate) struct PoolShared {
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) store: Arc<dyn SessionStore>,
    pub(crate) registry: Registry,
}

impl PoolShared {
    pub(crate) fn new(clock: Arc<dyn Clock>, store: Arc<dyn SessionStore>) -> Self {
        Self {
            clock,
            store,
            registry: Registry::with_hasher_and_shard_amount(FastBuild::default(), SHARDS),
        }
    }

    /// Wraps a slot already reserved on `vm` (see `VmShared::try_reserve`)
    /// into a guard and registers the session.
    pub(crate) fn guard(
        &self,
        vm: Arc<Vm>,
        protocol: Protocol,
        user: Option<&str>,
        now: Instant,
    ) -> SessionGuard {
        let id = next_session_id();
        if let Some(user) = user {
            self.store.session_started(user, vm.name(), now);
        }
        let session = Arc::new(SessionShared {
            id,
            vm,
            protocol,
            user: user.map(Box::from),
            started: now,
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
        });
        self.registry.insert(id, session.clone());
        SessionGuard { session }
    }
}

/// One live session, shared by its guard and the registry.
#[derive(Debug)]
pub(crate) struct SessionShared {
    id: u64,
    vm: Arc<Vm>,
    protocol: Protocol,
    user: Option<Box<str>>,
    /// Monotonic start; shown as wall time by subtracting the session's age
    /// from the wall clock (one clock read per session, not two).
    started: Instant,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
}

impl SessionShared {
    /// Wall-clock start, given the clock's current `now` and `wall`.
    fn started_wall(&self, now: Instant, wall: SystemTime) -> SystemTime {
        let age = now.saturating_duration_since(self.started);
        wall.checked_sub(age).unwrap_or(SystemTime::UNIX_EPOCH)
    }

    pub(crate) fn info(&self, now: Instant, wall: SystemTime) -> SessionInfo {
        SessionInfo {
            id: self.id,
            user: self.user.as_deref().map(str::to_owned),
            vm: self.vm.name().to_owned(),
            protocol: self.protocol,
            started: self.started_wall(now, wall),
            bytes_up: self.bytes_up.load(Ordering::Relaxed),
            bytes_down: self.bytes_down.load(Ordering::Relaxed),
        }
    }
}

/// A live session as listed by [`Pool::sessions`](crate::Pool::sessions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// Session id, unique in the process. Ids increase per thread (they are
    /// handed out in small per-thread blocks), not strictly in start order.
    pub id: u64,
    /// The user, when known.
    pub user: Option<String>,
    /// The VM the session is on.
    pub vm: String,
    /// SSH or HTTP.
    pub protocol: Protocol,
    /// When the session started (wall clock).
    pub started: SystemTime,
    /// Bytes from client to VM so far.
    pub bytes_up: u64,
    /// Bytes from VM to client so far.
    pub bytes_down: u64,
}

/// Counts one session on one VM while it lives.
///
/// Created by [`Pool::acquire`](crate::Pool::acquire) (and held internally for
/// HTTP browser sessions). Dropping it uncounts the session, records when
/// the VM became idle if it was the last one, and tells the
/// [`SessionStore`] when the user was last seen. A guard keeps working after
/// its VM leaves the pool.
pub struct SessionGuard {
    // The pool is reached through the VM (see `VmShared::pool`).
    session: Arc<SessionShared>,
}

impl std::fmt::Debug for SessionGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionGuard")
            .field("id", &self.session.id)
            .field("vm", &self.session.vm.name())
            .field("protocol", &self.session.protocol)
            .field("user", &self.session.user)
            .finish()
    }
}

impl SessionGuard {
    /// The session id (as in [`SessionInfo::id`]).
    pub fn id(&self) -> u64 {
        self.session.id
    }

    /// The VM, as of the snapshot the session was placed from (its counters
    /// are live).
    pub fn vm(&self) -> &Arc<Vm> {
        &self.session.vm
    }

    /// The VM's name.
    pub fn vm_name(&self) -> &str {
        self.session.vm.name()
    }

    /// The VM's spec when the session was placed (host and ports to dial).
    pub fn spec(&self) -> &VmSpec {
        self.session.vm.spec()
    }

    /// SSH or HTTP.
    pub fn protocol(&self) -> Protocol {
        self.session.protocol
    }

    /// The user, when known.
    pub fn user(&self) -> Option<&str> {
        self.session.user.as_deref()
    }

    /// When the session started (monotonic clock of the pool).
    pub fn started_at(&self) -> Instant {
        self.session.started
    }

    /// When the session started (wall clock).
    pub fn started(&self) -> SystemTime {
        let clock = &self.session.vm.shared().pool().clock;
        self.session.started_wall(clock.now(), clock.wall())
    }

    /// Adds `n` bytes sent from the client to the VM.
    pub fn add_bytes_up(&self, n: u64) {
        self.session.bytes_up.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds `n` bytes sent from the VM to the client.
    pub fn add_bytes_down(&self, n: u64) {
        self.session.bytes_down.fetch_add(n, Ordering::Relaxed);
    }

    /// Bytes from client to VM so far.
    pub fn bytes_up(&self) -> u64 {
        self.session.bytes_up.load(Ordering::Relaxed)
    }

    /// Bytes from VM to client so far.
    pub fn bytes_down(&self) -> u64 {
        self.session.bytes_down.load(Ordering::Relaxed)
    }

    /// A handle on this session's byte counters, for traffic counted after the request that
    /// routed it (a response body's bytes) without looking the session up again.
    pub fn bytes_handle(&self) -> SessionBytes {
        SessionBytes(Arc::clone(&self.session))
    }

    /// A snapshot of this session as listed by the pool.
    pub fn info(&self) -> SessionInfo {
        let clock = &self.session.vm.shared().pool().clock;
        self.session.info(clock.now(), clock.wall())
    }
}

/// A session's byte counters ([`SessionGuard::bytes_handle`]). It does not hold the session:
/// bytes added after the session ended are counted nowhere.
#[derive(Clone)]
pub struct SessionBytes(Arc<SessionShared>);

impl std::fmt::Debug for SessionBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SessionBytes").field(&self.0.id).finish()
    }
}

impl SessionBytes {
    /// Adds `up` bytes sent from the client to the VM and `down` from the VM to the client.
    pub fn add(&self, up: u64, down: u64) {
        if up > 0 {
            self.0.bytes_up.fetch_add(up, Ordering::Relaxed);
        }
        if down > 0 {
            self.0.bytes_down.fetch_add(down, Ordering::Relaxed);
        }
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let s = &self.session;
        let vm = s.vm.shared();
        let pool = vm.pool();
        let last = vm.release(s.protocol);
        pool.registry.remove(&s.id);
        if last || s.user.is_some() {
            let now = pool.clock.now();
            if last {
                vm.mark_idle(now);
            }
            if let Some(user) = &s.user {
                pool.store.session_ended(user, s.vm.name(), now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ids_are_unique_across_threads() {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| (0..1000).map(|_| next_session_id()).collect::<Vec<_>>())
            })
            .collect();
        let mut all = HashSet::new();
        for h in handles {
            let ids = h.join().unwrap_or_default();
            assert!(ids.windows(2).all(|w| w[0] < w[1]));
            for id in ids {
                assert!(id > 0 && all.insert(id), "duplicate id {id}");
            }
        }
        assert_eq!(all.len(), 4000);
    }
}
