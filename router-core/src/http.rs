//! HTTP browser sessions as load.
//!
//! A browser session (one affinity cookie) counts as one session on its VM
//! while it has made a request within
//! [`RoutingPolicy::http_session_idle`](crate::RoutingPolicy::http_session_idle).
//! The pool holds a [`SessionGuard`] per session key; requests refresh it,
//! [`Pool::expire_idle`] drops the idle ones.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::pool::Pool;
use crate::select::{NoVm, PickRequest};
use crate::session::SessionGuard;
use crate::vm::{Protocol, Vm};

struct HttpEntry {
    guard: SessionGuard,
    last_seen: Instant,
}

/// Held guards by session key.
#[derive(Default)]
pub(crate) struct HttpSessions {
    map: DashMap<String, HttpEntry>,
}

impl HttpSessions {
    /// Drops entries idle longer than `idle` at `now`; returns how many.
    pub(crate) fn expire(&self, now: Instant, idle: Duration) -> usize {
        let mut expired = 0;
        self.map.retain(|_, e| {
            let keep = now.saturating_duration_since(e.last_seen) <= idle;
            if !keep {
                expired += 1;
            }
            keep
        });
        expired
    }

    fn insert(&self, key: &str, guard: SessionGuard, now: Instant) {
        let old = self.map.insert(
            key.to_owned(),
            HttpEntry {
                guard,
                last_seen: now,
            },
        );
        // The previous guard (another VM) is released here, outside the
        // shard lock.
        drop(old);
    }
}

impl Pool {
    /// Records a request of browser session `session_key` on `vm`.
    ///
    /// If the session already holds a slot on `vm`, refreshes it. Otherwise
    /// counts a new HTTP session there (moving from another VM releases the
    /// old slot) and returns false, changing nothing, if `vm` is unknown or
    /// at its session limit. Health and draining are not checked here: that
    /// is [`Pool::pick`]'s job (or use [`Pool::http_route`], which does both).
    /// The user of a session is fixed when its slot is first taken.
    pub fn http_touch(&self, session_key: &str, vm: &str, user: Option<&str>) -> bool {
        let now = self.shared.clock.now();
        if let Some(mut e) = self.http.map.get_mut(session_key)
            && e.guard.vm_name() == vm
        {
            e.last_seen = now;
            return true;
        }
        let snap = self.snapshot();
        let Some(target) = snap.get(vm) else {
            return false;
        };
        if !target
            .shared()
            .try_reserve(target.spec().capacity(), Protocol::Http)
        {
            return false;
        }
        let guard = self.shared.guard(target.clone(), Protocol::Http, user, now);
        self.http.insert(session_key, guard, now);
        true
    }

    /// Routes one HTTP request of browser session `session_key` and counts
    /// the session as load: the one call the HTTP proxy needs per request.
    ///
    /// If the session already holds a slot on `req.pinned_vm` and that VM
    /// still serves it (running, probed up, not draining unless
    /// `keep_draining`, not excluded), the slot is refreshed and that VM is
    /// returned even when it is at its limit (this session is part of the
    /// count). Otherwise a VM is chosen as by [`Pool::acquire`] (protocol
    /// forced to HTTP) and the session's slot moves there. Compare the
    /// returned VM's name with the cookie to know whether to rewrite it.
    pub fn http_route(&self, session_key: &str, req: &PickRequest<'_>) -> Result<Arc<Vm>, NoVm> {
        let req = PickRequest {
            protocol: Protocol::Http,
            ..*req
        };
        let now = self.shared.clock.now();
        if let Some(pinned) = req.pinned_vm
            && let Some(mut e) = self.http.map.get_mut(session_key)
            && e.guard.vm_name() == pinned
        {
            let snap = self.snapshot();
            if let Some(vm) = snap.get(pinned) {
                let status = vm.status();
                let serves = status.serving() && (!status.draining || req.keep_draining);
                if serves && !req.exclude.iter().any(|x| x == pinned) {
                    e.last_seen = now;
                    return Ok(vm.clone());
                }
            }
        }
        let guard = self.acquire(&req)?;
        let vm = guard.vm().clone();
        self.http.insert(session_key, guard, now);
        Ok(vm)
    }

    /// Ends browser session `session_key` now (for example on logout).
    /// Returns false if it held no slot.
    pub fn http_forget(&self, session_key: &str) -> bool {
        self.http.map.remove(session_key).is_some()
    }

    /// Adds traffic to browser session `session_key` (shown by
    /// [`Pool::sessions`]). Returns false if it holds no slot.
    pub fn http_add_bytes(&self, session_key: &str, up: u64, down: u64) -> bool {
        match self.http.map.get(session_key) {
            Some(e) => {
                e.guard.add_bytes_up(up);
                e.guard.add_bytes_down(down);
                true
            }
            None => false,
        }
    }

    /// The VM browser session `session_key` holds a slot on, if any.
    pub fn http_session_vm(&self, session_key: &str) -> Option<String> {
        self.http
            .map
            .get(session_key)
            .map(|e| e.guard.vm_name().to_owned())
    }

    /// Number of browser sessions currently counted as load.
    pub fn http_session_count(&self) -> usize {
        self.http.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::health::Health;
    use crate::pool::RoutingPolicy;
    use crate::vm::VmSpec;

    const IDLE: Duration = Duration::from_secs(30 * 60);

    fn pool(caps: &[(&str, u32)]) -> (Pool, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new());
        let policy = RoutingPolicy {
            user_affinity: false,
            affinity_ttl: Duration::from_secs(3600),
            http_session_idle: IDLE,
        };
        let pool = Pool::new(policy, clock.clone());
        pool.set_vms(
            caps.iter()
                .map(|(n, cap)| VmSpec {
                    max_sessions: *cap,
                    ..VmSpec::new(*n, "127.0.0.1")
                })
                .collect(),
        );
        for (n, _) in caps {
            pool.set_health(n, Health::Up);
        }
        (pool, clock)
    }

    fn http_load(pool: &Pool, vm: &str) -> u32 {
        pool.snapshot()
            .get(vm)
            .map_or(0, |v| v.sessions(Protocol::Http))
    }

    #[test]
    fn touch_counts_once_refreshes_and_moves() {
        let (pool, _) = pool(&[("a", 5), ("b", 5)]);
        assert!(pool.http_touch("k1", "a", Some("ann")));
        assert!(pool.http_touch("k1", "a", Some("ann")));
        assert_eq!(http_load(&pool, "a"), 1);
        assert!(pool.http_touch("k1", "b", None));
        assert_eq!((http_load(&pool, "a"), http_load(&pool, "b")), (0, 1));
        assert_eq!(pool.http_session_vm("k1").as_deref(), Some("b"));
        assert!(!pool.http_touch("k1", "nope", None));
        assert_eq!(pool.http_session_count(), 1);
    }

    #[test]
    fn touch_refuses_full_vm_and_keeps_old_slot() {
        let (pool, _) = pool(&[("a", 1), ("b", 5)]);
        assert!(pool.http_touch("k1", "a", None));
        assert!(pool.http_touch("k2", "b", None));
        assert!(!pool.http_touch("k2", "a", None));
        assert_eq!(pool.http_session_vm("k2").as_deref(), Some("b"));
        // The holder of the only slot can still refresh it.
        assert!(pool.http_touch("k1", "a", None));
    }

    #[test]
    fn idle_sessions_expire() {
        let (pool, clock) = pool(&[("a", 5)]);
        pool.http_touch("k1", "a", None);
        pool.http_touch("k2", "a", None);
        clock.advance(IDLE / 2);
        pool.http_touch("k2", "a", None);
        clock.advance(IDLE / 2 + Duration::from_secs(1));
        assert_eq!(pool.expire_idle(), 1);
        assert_eq!(http_load(&pool, "a"), 1);
        assert_eq!(pool.http_session_vm("k2").as_deref(), Some("a"));
        assert!(pool.http_forget("k2"));
        assert!(!pool.http_forget("k2"));
        assert_eq!(http_load(&pool, "a"), 0);
    }

    #[test]
    fn route_keeps_pinned_full_vm_for_its_own_session() {
        let (pool, _) = pool(&[("a", 1), ("b", 5)]);
        let req = PickRequest::new(Protocol::Http);
        let vm = pool.http_route("k1", &req).map(|v| v.name().to_owned());
        assert_eq!(vm.as_deref(), Ok("a"));
        // "a" is now full, but k1 holds its only slot.
        let pinned = req.pinned("a", true);
        let vm = pool.http_route("k1", &pinned).map(|v| v.name().to_owned());
        assert_eq!(vm.as_deref(), Ok("a"));
        // Another browser pinned to "a" (its session expired) moves to "b".
        let vm = pool.http_route("k2", &pinned).map(|v| v.name().to_owned());
        assert_eq!(vm.as_deref(), Ok("b"));
        assert_eq!((http_load(&pool, "a"), http_load(&pool, "b")), (1, 1));
    }

    #[test]
    fn route_keeps_draining_pin_only_with_keep_draining() {
        let (pool, _) = pool(&[("a", 5), ("b", 5)]);
        let req = PickRequest::new(Protocol::Http);
        assert!(pool.http_route("k1", &req).is_ok());
        assert_eq!(pool.http_session_vm("k1").as_deref(), Some("a"));
        pool.drain("a");
        let kept = pool.http_route("k1", &req.pinned("a", true));
        assert_eq!(kept.map(|v| v.name().to_owned()).as_deref(), Ok("a"));
        // A new browser whose (stale) cookie names "a" also stays while it
        // is serving.
        let new = pool.http_route("k2", &req.pinned("a", true));
        assert_eq!(new.map(|v| v.name().to_owned()).as_deref(), Ok("a"));
        // Without keep_draining the session moves and the old slot is freed.
        let moved = pool.http_route("k1", &req.pinned("a", false));
        assert_eq!(moved.map(|v| v.name().to_owned()).as_deref(), Ok("b"));
        assert_eq!((http_load(&pool, "a"), http_load(&pool, "b")), (1, 1));
        // Down: re-pinned even with keep_draining.
        pool.set_health("a", Health::Down);
        let moved = pool.http_route("k2", &req.pinned("a", true));
        assert_eq!(moved.map(|v| v.name().to_owned()).as_deref(), Ok("b"));
        assert_eq!(http_load(&pool, "a"), 0);
    }

    #[test]
    fn bytes_are_visible_in_sessions() {
        let (pool, _) = pool(&[("a", 5)]);
        assert!(!pool.http_add_bytes("k1", 1, 1));
        pool.http_touch("k1", "a", Some("ann"));
        assert!(pool.http_add_bytes("k1", 10, 20));
        let s = pool.sessions();
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].bytes_up, s[0].bytes_down), (10, 20));
        assert_eq!(s[0].protocol, Protocol::Http);
        assert_eq!(s[0].user.as_deref(), Some("ann"));
    }
}
