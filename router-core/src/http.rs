//! HTTP browser sessions as load.
//!
//! A browser session (one affinity cookie) counts as one session on its VM
//! while it has made a request within
//! [`RoutingPolicy::http_session_idle`](crate::RoutingPolicy::http_session_idle).
//! The pool holds a [`SessionGuard`] per session key; requests refresh it,
//! [`Pool::expire_idle`] drops the idle ones.
//!
//! Two more things weigh on a VM's HTTP load:
//! - A browser sent to a VM by its first request, whose cookie has not come
//!   back yet, is *tentative* ([`Pool::http_route_new`]): it counts in the
//!   least-loaded order for
//!   [`RoutingPolicy::http_tentative_for`](crate::RoutingPolicy::http_tentative_for),
//!   so browsers that arrive together spread instead of all landing on the
//!   VM that looked emptiest. It becomes a session when the cookie comes
//!   back, and it never counts against `max_sessions`, so clients that drop
//!   cookies cannot fill a VM.
//! - Every open upgraded connection (websocket: kernels, terminals) holds a
//!   session for as long as it is open ([`Pool::http_open`]), whatever
//!   `session_idle` says: a notebook running in a background tab holds only
//!   its kernel websocket. A websocket of a browser whose session is on the
//!   same VM holds *that* session (one user with a notebook, its kernel and a
//!   terminal is one session, not four, against `max_sessions`), and keeps it
//!   from expiring, so the browser coming back to the tab is still pinned
//!   there and served, however full the VM is. Any other websocket (no
//!   cookie, or a session on another VM) is a session of its own.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::hash::FastBuild;
use crate::pool::Pool;
use crate::select::{NoVm, PickRequest};
use crate::session::{SessionBytes, SessionGuard};
use crate::vm::{Protocol, Vm};

/// A browser sent to a VM whose cookie has not come back yet. Counted in the
/// VM's tentative load until dropped.
struct Tentative {
    vm: Arc<Vm>,
    /// The pool's count of tentative browsers.
    count: Arc<AtomicUsize>,
}

impl Tentative {
    fn new(vm: Arc<Vm>, count: &Arc<AtomicUsize>) -> Self {
        vm.shared().add_tentative();
        count.fetch_add(1, Ordering::Relaxed);
        Self {
            vm,
            count: count.clone(),
        }
    }
}

impl Drop for Tentative {
    fn drop(&mut self) {
        self.vm.shared().remove_tentative();
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

enum Slot {
    Tentative(Tentative),
    /// Shared with the browser's open websockets on the same VM ([`Pool::http_open`]): the
    /// session lasts while any of them does.
    Session(Arc<SessionGuard>),
}

impl Slot {
    fn vm_name(&self) -> &str {
        match self {
            Slot::Tentative(t) => t.vm.name(),
            Slot::Session(g) => g.vm_name(),
        }
    }
}

/// Where [`Pool::http_route_session`] sent a request.
#[derive(Debug, Clone)]
pub struct HttpRouted {
    /// The VM.
    pub vm: Arc<Vm>,
    /// The browser's session was already on this VM (else a session started there).
    pub continued: bool,
    /// The session's byte counters, for the response's bytes (`None` for a browser without a
    /// session yet).
    pub bytes: Option<SessionBytes>,
}

struct HttpEntry {
    slot: Slot,
    last_seen: Instant,
}

/// At most this many tentative browsers are remembered at once; past it, first requests are
/// routed without weighing on the VM (a flood of cookie-less requests costs bounded memory).
pub(crate) const MAX_TENTATIVE: usize = 65_536;

/// Held guards by session key.
#[derive(Default)]
pub(crate) struct HttpSessions {
    /// By the session id of a signed cookie: random ids the gateway made (a cookie is verified
    /// before its id is looked up), which no client can choose, so hashed with the fast hasher
    /// rather than the standard library's DoS-resistant one (looked up on every request).
    map: DashMap<String, HttpEntry, FastBuild>,
    /// Tentative entries in `map` (each [`Tentative`] holds a clone).
    tentative: Arc<AtomicUsize>,
}

impl HttpSessions {
    /// Drops sessions idle longer than `idle`, tentative browsers older than `tentative_for` at
    /// `now`, and sessions without an open websocket on a VM for which `down` is true; returns
    /// how many.
    pub(crate) fn expire(
        &self,
        now: Instant,
        idle: Duration,
        tentative_for: Duration,
        down: impl Fn(&str) -> bool,
    ) -> usize {
        let mut expired = 0;
        self.map.retain(|_, e| {
            let limit = match &e.slot {
                Slot::Tentative(_) => tentative_for,
                // An open websocket holds the session: it has not been idle, and once the last
                // one closes, `idle` counts from about then.
                Slot::Session(guard) if Arc::strong_count(guard) > 1 => {
                    e.last_seen = now;
                    return true;
                }
                // Its VM is down: the browser's next request goes elsewhere anyway, and one
                // that never comes back (a closed laptop) should not count on a dead VM for
                // `idle` (30 minutes by default).
                Slot::Session(guard) if down(guard.vm_name()) => {
                    expired += 1;
                    return false;
                }
                Slot::Session(_) => idle,
            };
            let keep = now.saturating_duration_since(e.last_seen) <= limit;
            if !keep {
                expired += 1;
            }
            keep
        });
        expired
    }

    /// Sets `key`'s slot; returns the one it replaces, to be dropped (released) by the caller
    /// outside the shard lock.
    fn insert(&self, key: &str, slot: Slot, now: Instant) -> Option<HttpEntry> {
        self.map.insert(
            key.to_owned(),
            HttpEntry {
                slot,
                last_seen: now,
            },
        )
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
            && matches!(e.slot, Slot::Session(_))
            && e.slot.vm_name() == vm
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
        self.http
            .insert(session_key, Slot::Session(Arc::new(guard)), now);
        true
    }

    /// Routes one HTTP request of browser session `session_key` and counts
    /// the session as load: the one call the HTTP proxy needs per request
    /// that carries a valid cookie.
    ///
    /// If the session already holds a slot on `req.pinned_vm` and that VM
    /// still serves it (running, web side probed up, not draining unless
    /// `keep_draining`, not excluded), the slot is refreshed and that VM is
    /// returned even when it is at its limit (this session is part of the
    /// count). A tentative slot (the cookie's first return) becomes a session
    /// if the VM has room. Otherwise a VM is chosen as by [`Pool::acquire`]
    /// (protocol forced to HTTP) and the session's slot moves there. Compare
    /// the returned VM's name with the cookie to know whether to rewrite it.
    pub fn http_route(&self, session_key: &str, req: &PickRequest<'_>) -> Result<Arc<Vm>, NoVm> {
        self.http_route_session(session_key, req)
            .map(|routed| routed.vm)
    }

    /// [`Pool::http_route`], telling also whether the session went on where it was: it held a
    /// session slot on the returned VM before this request. When it did not (a tentative
    /// browser's cookie came back, the session moved, or it had expired), a session started
    /// on that VM.
    pub fn http_route_session(
        &self,
        session_key: &str,
        req: &PickRequest<'_>,
    ) -> Result<HttpRouted, NoVm> {
        let req = PickRequest {
            protocol: Protocol::Http,
            ..*req
        };
        let now = self.shared.clock.now();
        if let Some(pinned) = req.pinned_vm
            && let Some(mut e) = self.http.map.get_mut(session_key)
            && e.slot.vm_name() == pinned
        {
            let snap = self.snapshot();
            if let Some(vm) = snap.get(pinned) {
                let status = vm.status();
                let serves =
                    status.serving(Protocol::Http) && (!status.draining || req.keep_draining);
                if serves && !req.exclude.iter().any(|x| x == pinned) {
                    match &e.slot {
                        Slot::Session(guard) => {
                            let bytes = Some(guard.bytes_handle());
                            e.last_seen = now;
                            return Ok(HttpRouted {
                                vm: vm.clone(),
                                continued: true,
                                bytes,
                            });
                        }
                        // A leaving VM starts no session: the browser goes elsewhere.
                        Slot::Tentative(_) if status.leaving => {}
                        Slot::Tentative(_) => {
                            let reserved = vm
                                .shared()
                                .try_reserve(vm.spec().capacity(), Protocol::Http);
                            if !reserved && req.stay_pinned {
                                return Err(NoVm {
                                    total: snap.len(),
                                    full: 1,
                                    protocol: Some(Protocol::Http),
                                    ..NoVm::default()
                                });
                            }
                            if reserved {
                                let guard =
                                    self.shared.guard(vm.clone(), Protocol::Http, None, now);
                                let bytes = Some(guard.bytes_handle());
                                // Drops the tentative count as the session is counted.
                                e.slot = Slot::Session(Arc::new(guard));
                                e.last_seen = now;
                                return Ok(HttpRouted {
                                    vm: vm.clone(),
                                    continued: false,
                                    bytes,
                                });
                            }
                        }
                    }
                }
            }
        }
        let guard = self.acquire(&req)?;
        let vm = guard.vm().clone();
        let bytes = Some(guard.bytes_handle());
        let old = self
            .http
            .insert(session_key, Slot::Session(Arc::new(guard)), now);
        let continued = old.is_some_and(|old| {
            matches!(old.slot, Slot::Session(_)) && old.slot.vm_name() == vm.name()
        });
        Ok(HttpRouted {
            vm,
            continued,
            bytes,
        })
    }

    /// Routes the first request of a new browser (no valid cookie yet), to
    /// whom the caller is about to issue a cookie for `session_key`.
    ///
    /// The VM is chosen as by [`Pool::pick`] (protocol forced to HTTP) and
    /// the browser counts there as *tentative* load until it comes back with
    /// the cookie ([`Pool::http_route`] then turns it into a session) or
    /// [`RoutingPolicy::http_tentative_for`](crate::RoutingPolicy::http_tentative_for)
    /// passes ([`Pool::expire_idle`] drops it). Tentative load orders the
    /// least-loaded choice but never counts against `max_sessions`. Calling
    /// it again with the same key (the VM could not be reached, another is
    /// tried) moves the tentative slot. At most `MAX_TENTATIVE` (65 536)
    /// browsers are tentative at once; past that, first requests are routed
    /// without weighing on the VM.
    pub fn http_route_new(
        &self,
        session_key: &str,
        req: &PickRequest<'_>,
    ) -> Result<Arc<Vm>, NoVm> {
        let req = PickRequest {
            protocol: Protocol::Http,
            ..*req
        };
        let vm = self.pick(&req)?;
        if self.http.tentative.load(Ordering::Relaxed) >= MAX_TENTATIVE {
            // A flood of cookie-less requests: route them, remember none.
            self.http.map.remove(session_key);
            return Ok(vm);
        }
        let now = self.shared.clock.now();
        let slot = Slot::Tentative(Tentative::new(vm.clone(), &self.http.tentative));
        self.http.insert(session_key, slot, now);
        Ok(vm)
    }

    /// Holds an HTTP session on `vm` for as long as the returned guard lives,
    /// for an open upgraded connection (a websocket), whatever the VM's limit:
    /// the connection is already there.
    ///
    /// When browser session `session_key` holds a session on `vm`, the guard
    /// is that session: the websocket adds no load of its own, and the session
    /// does not expire while the guard lives (it then idles from about when
    /// the last such guard is dropped). Otherwise (no cookie, a tentative
    /// browser, a session on another VM) the websocket is a session of its own.
    /// `None` if `vm` is unknown.
    pub fn http_open(
        &self,
        vm: &str,
        session_key: Option<&str>,
        user: Option<&str>,
    ) -> Option<Arc<SessionGuard>> {
        if let Some(key) = session_key
            && let Some(e) = self.http.map.get(key)
            && let Slot::Session(guard) = &e.slot
            && guard.vm_name() == vm
        {
            return Some(guard.clone());
        }
        let snap = self.snapshot();
        let target = snap.get(vm)?;
        if !target.shared().try_reserve(u32::MAX, Protocol::Http) {
            return None;
        }
        let now = self.shared.clock.now();
        Some(Arc::new(self.shared.guard(
            target.clone(),
            Protocol::Http,
            user,
            now,
        )))
    }

    /// Ends browser session `session_key` now (for example on logout).
    /// Returns false if it held no slot.
    pub fn http_forget(&self, session_key: &str) -> bool {
        self.http.map.remove(session_key).is_some()
    }

    /// Adds traffic to browser session `session_key` (shown by
    /// [`Pool::sessions`]). Returns false if it holds no session slot.
    pub fn http_add_bytes(&self, session_key: &str, up: u64, down: u64) -> bool {
        match self.http.map.get(session_key).as_deref() {
            Some(HttpEntry {
                slot: Slot::Session(guard),
                ..
            }) => {
                guard.add_bytes_up(up);
                guard.add_bytes_down(down);
                true
            }
            _ => false,
        }
    }

    /// The VM browser session `session_key` holds a session slot on, if any
    /// (a tentative browser holds none yet).
    pub fn http_session_vm(&self, session_key: &str) -> Option<String> {
        self.http
            .map
            .get(session_key)
            .filter(|e| matches!(e.slot, Slot::Session(_)))
            .map(|e| e.slot.vm_name().to_owned())
    }

    /// Number of browser sessions currently counted as load (tentative
    /// browsers not included).
    pub fn http_session_count(&self) -> usize {
        self.http
            .map
            .iter()
            .filter(|e| matches!(e.slot, Slot::Session(_)))
            .count()
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
    const TENTATIVE: Duration = Duration::from_secs(10);

    fn pool(caps: &[(&str, u32)]) -> (Pool, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new());
        let policy = RoutingPolicy {
            user_affinity: false,
            affinity_ttl: Duration::from_secs(3600),
            http_session_idle: IDLE,
            http_tentative_for: TENTATIVE,
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
    fn sessions_on_a_vm_whose_web_side_is_down_expire_unless_a_websocket_holds_them() {
        let (pool, _) = pool(&[("a", 5), ("b", 5)]);
        pool.http_touch("k1", "a", None);
        pool.http_touch("k2", "a", None);
        pool.http_touch("k3", "b", None);
        let websocket = pool.http_open("a", Some("k2"), None);
        assert!(websocket.is_some());
        // Its SSH side still answers: only the web side counts for browsers.
        pool.set_protocol_health("a", Protocol::Http, Health::Down);
        assert_eq!(pool.expire_idle(), 1);
        assert_eq!(pool.http_session_vm("k1"), None);
        assert_eq!(pool.http_session_vm("k2").as_deref(), Some("a"));
        assert_eq!((http_load(&pool, "a"), http_load(&pool, "b")), (1, 1));
        // The websocket closes: the session goes at the next look.
        drop(websocket);
        assert_eq!(pool.expire_idle(), 1);
        assert_eq!(http_load(&pool, "a"), 0);
        assert_eq!(pool.http_session_vm("k3").as_deref(), Some("b"));
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
    fn route_session_tells_whether_the_session_went_on_where_it_was() {
        let (pool, _) = pool(&[("a", 5), ("b", 5)]);
        let req = PickRequest::new(Protocol::Http);
        let route = |key: &str, req: &PickRequest<'_>| {
            pool.http_route_session(key, req)
                .map(|r| (r.vm.name().to_owned(), r.continued))
                .ok()
        };
        // A new browser's tentative slot becomes a session when its cookie comes back.
        let first = pool.http_route_new("k1", &req).map(|v| v.name().to_owned());
        assert_eq!(first.as_deref(), Ok("a"));
        assert_eq!(
            route("k1", &req.pinned("a", true)),
            Some(("a".into(), false))
        );
        assert_eq!(
            route("k1", &req.pinned("a", true)),
            Some(("a".into(), true))
        );
        // Moved off a VM that stopped serving: a session starts on the other.
        pool.set_health("a", Health::Down);
        assert_eq!(
            route("k1", &req.pinned("a", true)),
            Some(("b".into(), false))
        );
        assert_eq!(
            route("k1", &req.pinned("b", true)),
            Some(("b".into(), true))
        );
        // A stale cookie naming "a" while the session is on "b": routed again, and it went
        // on on "b".
        pool.set_health("a", Health::Up);
        let excluding_a = ["a".to_owned()];
        let stale = req.pinned("a", true).excluding(&excluding_a);
        assert_eq!(route("k1", &stale), Some(("b".into(), true)));
        // An expired session starts again.
        assert!(pool.http_forget("k1"));
        assert_eq!(
            route("k1", &req.pinned("b", true)).map(|r| r.1),
            Some(false)
        );
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

    #[test]
    fn a_routed_session_counts_bytes_through_its_handle() {
        let (pool, _) = pool(&[("a", 5)]);
        let req = PickRequest::new(Protocol::Http);
        let first = pool.http_route_session("k1", &req).expect("routed");
        let again = pool
            .http_route_session("k1", &req.pinned("a", true))
            .expect("routed");
        assert!(again.continued);
        first.bytes.expect("a session").add(10, 20);
        again.bytes.expect("the same session").add(0, 5);
        let s = pool.sessions();
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].bytes_up, s[0].bytes_down), (10, 25));
    }

    fn tentative_load(pool: &Pool, vm: &str) -> u32 {
        pool.snapshot()
            .get(vm)
            .map_or(0, |v| v.tentative_sessions())
    }

    #[test]
    fn first_requests_arriving_together_spread() {
        let (pool, _) = pool(&[("a", 10), ("b", 10), ("c", 10)]);
        let req = PickRequest::new(Protocol::Http);
        let mut per_vm = std::collections::BTreeMap::new();
        for i in 0..21 {
            let vm = pool.http_route_new(&format!("new-{i}"), &req).unwrap();
            *per_vm.entry(vm.name().to_owned()).or_insert(0) += 1;
        }
        assert_eq!(per_vm.values().copied().collect::<Vec<_>>(), [7, 7, 7]);
        // Tentative browsers are not sessions and take no slot of the cap.
        assert_eq!(pool.snapshot().total_sessions(), 0);
        assert_eq!(pool.http_session_count(), 0);
        assert_eq!(tentative_load(&pool, "a"), 7);
    }

    #[test]
    fn other_replicas_tentative_browsers_weigh_in_the_order() {
        let (pool, _) = pool(&[("a", 10), ("b", 10)]);
        let req = PickRequest::new(Protocol::Http);
        // Another replica just sent two browsers to "a": new ones here go to "b" first.
        let tentative = |n| crate::LoadCounts {
            tentative: n,
            ..crate::LoadCounts::default()
        };
        assert!(pool.set_remote_load("a", tentative(2)));
        assert!(!pool.set_remote_load("nope", tentative(1)));
        let names: Vec<String> = (0..4)
            .map(|i| pool.http_route_new(&format!("new-{i}"), &req).unwrap())
            .map(|vm| vm.name().to_owned())
            .collect();
        assert_eq!(names, ["b", "b", "a", "b"]);
        // The whole pool's tentative load shows; this replica's own is apart.
        let snap = pool.snapshot();
        let a = snap.get("a").unwrap();
        assert_eq!(
            (a.tentative_sessions(), a.local_tentative_sessions()),
            (3, 1)
        );
        pool.set_remote_load("a", tentative(0));
        assert_eq!(tentative_load(&pool, "a"), 1);
    }

    #[test]
    fn tentative_becomes_a_session_when_the_cookie_returns() {
        let (pool, _) = pool(&[("a", 5), ("b", 5)]);
        let req = PickRequest::new(Protocol::Http);
        let vm = pool.http_route_new("k1", &req).unwrap();
        assert_eq!(vm.name(), "a");
        assert_eq!(pool.http_session_vm("k1"), None);
        let back = pool.http_route("k1", &req.pinned("a", true)).unwrap();
        assert_eq!(back.name(), "a");
        assert_eq!((tentative_load(&pool, "a"), http_load(&pool, "a")), (0, 1));
        assert_eq!(pool.http_session_vm("k1").as_deref(), Some("a"));
    }

    #[test]
    fn a_tentative_browser_that_must_stay_is_refused_not_moved_when_its_vm_filled() {
        let (pool, _) = pool(&[("a", 1), ("b", 5)]);
        let req = PickRequest::new(Protocol::Http);
        assert_eq!(pool.http_route_new("k1", &req).unwrap().name(), "a");
        // Another browser takes a's only place before k1's cookie comes back.
        assert!(pool.http_touch("k2", "a", None));
        // k1 posts its login form: not to b, whose JupyterHub never served it the form.
        let err = pool
            .http_route("k1", &req.pinned("a", true).staying_pinned(true))
            .unwrap_err();
        assert_eq!(err.full, 1);
        assert_eq!(pool.http_session_vm("k1"), None);
        // Its next page load may go elsewhere.
        let moved = pool.http_route("k1", &req.pinned("a", true)).unwrap();
        assert_eq!(moved.name(), "b");
        assert_eq!(pool.http_session_vm("k1").as_deref(), Some("b"));
    }

    #[test]
    fn tentative_load_lapses_and_never_fills_a_vm() {
        let (pool, clock) = pool(&[("a", 1)]);
        let req = PickRequest::new(Protocol::Http);
        // Cookie-dropping clients: many first requests, none comes back.
        for i in 0..50 {
            assert!(pool.http_route_new(&format!("drop-{i}"), &req).is_ok());
        }
        assert_eq!(tentative_load(&pool, "a"), 50);
        // A real browser still gets the one slot.
        assert!(pool.http_route("real", &req).is_ok());
        assert_eq!(http_load(&pool, "a"), 1);
        clock.advance(TENTATIVE + Duration::from_secs(1));
        assert_eq!(pool.expire_idle(), 50);
        assert_eq!(tentative_load(&pool, "a"), 0);
        assert_eq!(http_load(&pool, "a"), 1);
    }

    #[test]
    fn a_failed_first_attempt_moves_the_tentative_slot() {
        let (pool, _) = pool(&[("a", 5), ("b", 5)]);
        let req = PickRequest::new(Protocol::Http);
        assert_eq!(pool.http_route_new("k1", &req).unwrap().name(), "a");
        let tried = ["a".to_owned()];
        let next = pool.http_route_new("k1", &req.excluding(&tried)).unwrap();
        assert_eq!(next.name(), "b");
        assert_eq!(
            (tentative_load(&pool, "a"), tentative_load(&pool, "b")),
            (0, 1)
        );
        assert!(pool.http_forget("k1"));
        assert_eq!(tentative_load(&pool, "b"), 0);
    }

    #[test]
    fn open_websockets_are_sessions_past_idle_and_over_the_cap() {
        let (pool, clock) = pool(&[("a", 1)]);
        assert!(pool.http_touch("k1", "a", None));
        // No cookie: the websocket is a session of its own, over the cap.
        let ws = pool.http_open("a", None, None).expect("known VM");
        assert_eq!(http_load(&pool, "a"), 2);
        clock.advance(IDLE * 3);
        assert_eq!(pool.expire_idle(), 1);
        assert_eq!(http_load(&pool, "a"), 1);
        assert_eq!(pool.snapshot().get("a").unwrap().idle_since(), None);
        drop(ws);
        assert_eq!(http_load(&pool, "a"), 0);
        assert!(pool.http_open("nope", None, None).is_none());
    }

    #[test]
    fn a_browsers_websockets_hold_its_session_once_and_keep_it_past_idle() {
        let (pool, clock) = pool(&[("a", 2), ("b", 2)]);
        let pinned = PickRequest::new(Protocol::Http).pinned("a", true);
        assert!(pool.http_touch("k1", "a", None));
        // A notebook's events, kernel and terminal websockets: still one session.
        let sockets: Vec<_> = (0..3)
            .map(|_| pool.http_open("a", Some("k1"), None).expect("known VM"))
            .collect();
        assert_eq!(http_load(&pool, "a"), 1);
        // Another browser still finds the room the websockets would have taken.
        assert!(pool.http_touch("k2", "a", None));
        assert_eq!(http_load(&pool, "a"), 2);
        // A background tab: nothing but the websockets for three idle periods. The session
        // stays, and the browser coming back is served by its VM although the VM is full.
        clock.advance(IDLE * 3);
        assert_eq!(pool.expire_idle(), 1, "k2 expires, k1 is held");
        assert!(pool.http_touch("k3", "a", None));
        let back = pool.http_route_session("k1", &pinned).expect("served");
        assert_eq!((back.vm.name(), back.continued), ("a", true));
        assert_eq!(http_load(&pool, "a"), 2);
        // The websockets stay open a while longer with no request; then the tab closes. The
        // session idles from the close, not from its last request.
        clock.advance(IDLE / 2);
        assert_eq!(pool.expire_idle(), 0);
        drop(sockets);
        clock.advance(IDLE * 3 / 4);
        assert_eq!(pool.expire_idle(), 1, "k3 expires; k1 idles from the close");
        assert_eq!(pool.http_session_vm("k1").as_deref(), Some("a"));
        clock.advance(IDLE / 2);
        assert_eq!(pool.expire_idle(), 1);
        assert_eq!(http_load(&pool, "a"), 0);
    }

    #[test]
    fn a_websocket_on_another_vm_than_its_session_is_a_session_of_its_own() {
        let (pool, _) = pool(&[("a", 5), ("b", 5)]);
        assert!(pool.http_touch("k1", "a", None));
        let ws = pool.http_open("b", Some("k1"), None).expect("known VM");
        assert_eq!((http_load(&pool, "a"), http_load(&pool, "b")), (1, 1));
        // The session moves away while a websocket of its own is open on a: a keeps it until
        // the websocket closes.
        let on_a = pool.http_open("a", Some("k1"), None).expect("known VM");
        assert!(pool.http_touch("k1", "b", None));
        assert_eq!((http_load(&pool, "a"), http_load(&pool, "b")), (1, 2));
        drop(on_a);
        drop(ws);
        assert_eq!((http_load(&pool, "a"), http_load(&pool, "b")), (0, 1));
    }
}
