//! User affinity state behind a small trait.
//!
//! The [`Pool`](crate::Pool) tells the store when a user's session starts and
//! ends, and asks it where a user should go back to. [`InMemoryStore`] keeps
//! this in a [`DashMap`]; a shared store could back several gateway replicas
//! later without touching selection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;

/// Where users go back to.
///
/// A user's affinity VM is the VM of their most recent session. It holds
/// while the user has live sessions, and for `ttl` after they were last seen
/// (a session started or ended).
pub trait SessionStore: Send + Sync {
    /// The VM `user` should go back to, if their affinity is still valid at
    /// `now`. Returned as a shared string so the hot path does not allocate.
    fn affinity(&self, user: &str, now: Instant, ttl: Duration) -> Option<Arc<str>>;
    /// A session of `user` started on `vm`.
    fn session_started(&self, user: &str, vm: &str, now: Instant);
    /// A session of `user` on `vm` ended.
    fn session_ended(&self, user: &str, vm: &str, now: Instant);
    /// Forgets users without live sessions last seen more than `ttl` before
    /// `now`; returns how many were forgotten.
    fn expire(&self, now: Instant, ttl: Duration) -> usize;
    /// Every user whose affinity is valid at `now`: their VM and how long ago
    /// they were last seen (zero while they have live sessions). What a
    /// gateway taking over from this process needs to send users back; a
    /// store shared between processes need not list anything.
    fn remembered(&self, now: Instant, ttl: Duration) -> Vec<(String, Arc<str>, Duration)> {
        let _ = (now, ttl);
        Vec::new()
    }
}

#[derive(Debug)]
struct UserEntry {
    vm: Arc<str>,
    live: u32,
    last_seen: Instant,
}

impl UserEntry {
    fn valid(&self, now: Instant, ttl: Duration) -> bool {
        self.live > 0 || now.saturating_duration_since(self.last_seen) <= ttl
    }
}

/// The default [`SessionStore`]: a concurrent map `user -> (vm, live sessions,
/// last seen)` in this process.
#[derive(Debug)]
pub struct InMemoryStore {
    users: DashMap<String, UserEntry>,
}

impl Default for InMemoryStore {
    fn default() -> Self {
        Self {
            users: DashMap::with_shard_amount(crate::session::SHARDS),
        }
    }
}

impl InMemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many users the store remembers.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether the store remembers no user.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Live sessions of `user` as the store counts them.
    pub fn live_sessions(&self, user: &str) -> u32 {
        self.users.get(user).map_or(0, |e| e.live)
    }
}

impl SessionStore for InMemoryStore {
    fn affinity(&self, user: &str, now: Instant, ttl: Duration) -> Option<Arc<str>> {
        let entry = self.users.get(user)?;
        entry.valid(now, ttl).then(|| entry.vm.clone())
    }

    fn session_started(&self, user: &str, vm: &str, now: Instant) {
        // Fast path without allocating the key.
        if let Some(mut e) = self.users.get_mut(user) {
            if &*e.vm != vm {
                e.vm = Arc::from(vm);
            }
            e.live += 1;
            e.last_seen = now;
            return;
        }
        self.users
            .entry(user.to_owned())
            .and_modify(|e| {
                if &*e.vm != vm {
                    e.vm = Arc::from(vm);
                }
                e.live += 1;
                e.last_seen = now;
            })
            .or_insert_with(|| UserEntry {
                vm: Arc::from(vm),
                live: 1,
                last_seen: now,
            });
    }

    fn session_ended(&self, user: &str, _vm: &str, now: Instant) {
        if let Some(mut e) = self.users.get_mut(user) {
            e.live = e.live.saturating_sub(1);
            e.last_seen = now;
        }
    }

    fn expire(&self, now: Instant, ttl: Duration) -> usize {
        let before = self.users.len();
        self.users.retain(|_, e| e.valid(now, ttl));
        before.saturating_sub(self.users.len())
    }

    fn remembered(&self, now: Instant, ttl: Duration) -> Vec<(String, Arc<str>, Duration)> {
        self.users
            .iter()
            .filter(|e| e.valid(now, ttl))
            .map(|e| {
                let ago = if e.live > 0 {
                    Duration::ZERO
                } else {
                    now.saturating_duration_since(e.last_seen)
                };
                (e.key().clone(), e.vm.clone(), ago)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(60);

    #[test]
    fn affinity_follows_latest_session_and_expires() {
        let s = InMemoryStore::new();
        let t = Instant::now();
        assert_eq!(s.affinity("ann", t, TTL), None);
        s.session_started("ann", "vm1", t);
        s.session_started("ann", "vm2", t);
        assert_eq!(s.affinity("ann", t, TTL).as_deref(), Some("vm2"));
        assert_eq!(s.live_sessions("ann"), 2);
        // Live sessions keep the affinity regardless of time.
        assert_eq!(s.affinity("ann", t + TTL * 10, TTL).as_deref(), Some("vm2"));
        s.session_ended("ann", "vm1", t);
        s.session_ended("ann", "vm2", t + TTL);
        assert_eq!(s.live_sessions("ann"), 0);
        assert_eq!(s.affinity("ann", t + TTL * 2, TTL).as_deref(), Some("vm2"));
        let later = t + TTL * 2 + Duration::from_secs(1);
        assert_eq!(s.affinity("ann", later, TTL), None);
        assert_eq!(s.expire(t + TTL * 2, TTL), 0);
        assert_eq!(s.expire(later, TTL), 1);
        assert!(s.is_empty());
    }

    #[test]
    fn expire_keeps_users_with_live_sessions() {
        let s = InMemoryStore::new();
        let t = Instant::now();
        s.session_started("bob", "vm1", t);
        assert_eq!(s.expire(t + TTL * 100, TTL), 0);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn remembered_lists_valid_users_with_their_age() {
        let s = InMemoryStore::new();
        let t0 = Instant::now();
        s.session_started("live", "a", t0);
        s.session_started("left", "b", t0);
        s.session_ended("left", "b", t0 + Duration::from_secs(10));
        s.session_started("gone", "c", t0);
        s.session_ended("gone", "c", t0);
        let now = t0 + Duration::from_secs(70);
        let mut seen = s.remembered(now, TTL);
        seen.sort();
        assert_eq!(
            seen,
            vec![
                ("left".to_owned(), Arc::from("b"), Duration::from_secs(60)),
                ("live".to_owned(), Arc::from("a"), Duration::ZERO),
            ]
        );
    }

    #[test]
    fn unmatched_end_is_harmless() {
        let s = InMemoryStore::new();
        let t = Instant::now();
        s.session_ended("nobody", "vm1", t);
        assert!(s.is_empty());
    }
}
