//! Wake-on-connect, as the frontends see it. When no VM can take a new session, the SSH side
//! holds the connection and the HTTP side answers with a page that refreshes; both tell the
//! pool's owner (the autoscaler, wired in by the composition root) that someone is waiting, and
//! the SSH side waits for a VM. The frontends know only this module, never the autoscaler.
//!
//! Waiting is event-driven: the pool tells a watch channel about every snapshot it publishes,
//! so a held connection goes on the moment a VM takes sessions of its protocol. A session
//! ending frees a place on a full VM without publishing a snapshot, so a held connection also
//! looks again every [`RECHECK`] (a read of the current snapshot, nothing more).

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use router_core::{Pool, Protocol};
use tokio::sync::watch;

/// How often a held connection looks again for a place no snapshot announced.
pub const RECHECK: Duration = Duration::from_secs(1);

/// The pool's owner, which can start VMs for people who wait.
pub trait Wake: Send + Sync {
    /// Whether connections are held while the pool wakes (autoscaling and wake-on-connect on).
    fn holds_connections(&self) -> bool;
    /// How long a connection is held at most.
    fn hold_for(&self) -> Duration;
    /// Typical time a VM takes to boot (what a waiting user is told).
    fn boot_estimate(&self) -> Duration;
    /// Registers someone waiting for a VM that takes `protocol`, for as long as the returned
    /// value lives.
    fn register(&self, protocol: Protocol) -> Waiting;
    /// While other VMs started for held connections are still on their way (starting, or up
    /// but not yet through their health probes): the sessions per VM the pool is sized for,
    /// the most places held connections that wake together take on one VM (see
    /// [`Waker::spread_below`]). `None`: no VM is on its way, or no such spreading.
    fn spread_below(&self) -> Option<u32> {
        None
    }
}

/// A registration of [`Wake::register`]; dropping it ends the registration.
#[must_use = "the registration ends when this is dropped"]
pub struct Waiting {
    _guard: Box<dyn Send + Sync>,
}

impl Waiting {
    /// Wraps what keeps a registration alive (a guard of the implementation).
    pub fn new(guard: impl Send + Sync + 'static) -> Self {
        Self {
            _guard: Box::new(guard),
        }
    }
}

impl std::fmt::Debug for Waiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Waiting")
    }
}

/// What a frontend holds: the owner to tell, and the pool to watch.
#[derive(Clone)]
pub struct Waker {
    owner: Arc<dyn Wake>,
    pool: Arc<Pool>,
    changes: watch::Receiver<u64>,
    /// Set when the gateway stops taking connections: held ones are told why and let go (the
    /// process that could place them is going away). Shared by clones.
    released: Arc<watch::Sender<Option<Arc<str>>>>,
}

impl std::fmt::Debug for Waker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waker")
            .field("holds_connections", &self.owner.holds_connections())
            .field("generation", &*self.changes.borrow())
            .finish_non_exhaustive()
    }
}

impl Waker {
    /// A waker for `pool`, whose VMs `owner` starts. Subscribes to the pool's changes (once per
    /// waker; clones share the subscription).
    pub fn new(owner: Arc<dyn Wake>, pool: Arc<Pool>) -> Self {
        let (tx, changes) = watch::channel(pool.snapshot().generation());
        pool.on_change(move |generation| {
            tx.send_replace(generation);
        });
        Self {
            owner,
            pool,
            changes,
            released: Arc::new(watch::Sender::new(None)),
        }
    }

    /// Lets every held connection go now and from now on, with `why` as its error: the gateway
    /// stops taking connections (a shutdown, or an upgrade whose new process holds logins now)
    /// and this process will not see a VM come up any more (its autoscaler has stopped).
    pub fn release(&self, why: &str) {
        self.released.send_replace(Some(Arc::from(why)));
    }

    /// Whether connections are held while the pool wakes.
    pub fn holds_connections(&self) -> bool {
        self.owner.holds_connections()
    }

    /// How long a connection is held at most.
    pub fn hold_for(&self) -> Duration {
        self.owner.hold_for()
    }

    /// Typical time a VM takes to boot.
    pub fn boot_estimate(&self) -> Duration {
        self.owner.boot_estimate()
    }

    /// For a connection held since `held_since`: the sessions a VM may have for it to take a
    /// place there while other VMs are still starting, or `None` once that no longer applies.
    /// The autoscaler starts VMs for the waiting connections; were they all to take the first
    /// VM that comes up, the VMs started for them would stand empty (and be scaled in again)
    /// while one VM carries everyone. So for a while they spread: a held connection takes a
    /// place only on a VM below `autoscale.sessions_per_vm`, unless no other VM is starting.
    /// The while is two boot estimates from the start of the hold (about one after the first
    /// VM is up), so a VM that never finishes booting costs the others that long at most.
    pub fn spread_below(&self, held_since: std::time::Instant) -> Option<u32> {
        let window = self.boot_estimate().saturating_mul(2);
        (held_since.elapsed() < window)
            .then(|| self.owner.spread_below())
            .flatten()
    }

    /// Registers someone waiting for `protocol` (see [`Wake::register`]).
    pub fn register(&self, protocol: Protocol) -> Waiting {
        self.owner.register(protocol)
    }

    /// Holds a waiting connection: registered all along, it waits until some VM takes new
    /// sessions of `protocol`, then runs `attempt`. An attempt that finds no VM after all
    /// (`Continue`, with why) is tried again after the next change or [`RECHECK`], until
    /// [`hold_for`](Self::hold_for) runs out: several held connections wake at the same
    /// change, and the first to reserve the VM's last place leaves the others waiting, not
    /// refused. The error says why the connection gives up.
    pub async fn hold<T, F, Fut>(&self, protocol: Protocol, mut attempt: F) -> Result<T, String>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = ControlFlow<T, String>>,
    {
        let _waiting = self.register(protocol);
        let deadline = tokio::time::sleep(self.hold_for());
        tokio::pin!(deadline);
        let mut changes = self.changes.clone();
        let mut released = self.released.subscribe();
        let mut last: Option<String> = None;
        loop {
            if let Some(why) = released.borrow_and_update().as_deref() {
                return Err(why.to_owned());
            }
            // Marks the current generation seen before looking, so a change published after
            // the look (or during the attempt) wakes the `changed()` below.
            changes.borrow_and_update();
            if self.takes_new(protocol) {
                match attempt().await {
                    ControlFlow::Break(done) => return Ok(done),
                    // The next attempt waits for a change or a recheck below, so a VM that is
                    // up but refuses is not hammered.
                    ControlFlow::Continue(why) => {
                        // Once per reason: a connection that waits for its place (spreading
                        // over VMs still booting) asks again every second.
                        if last.as_deref() == Some(why.as_str()) {
                            tracing::debug!(reason = %why, "still holding the connection");
                        } else {
                            tracing::info!(reason = %why, "the VM was taken or failed; still holding the connection");
                        }
                        last = Some(why);
                    }
                }
            }
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        // The pool is gone; nothing will change any more.
                        return Err(self.gave_up(last));
                    }
                }
                // A session ending frees a place without publishing a snapshot.
                () = tokio::time::sleep(RECHECK) => {}
                () = &mut deadline => return Err(self.gave_up(last)),
                // Looked at the top of the loop.
                _ = released.changed() => {}
            }
        }
    }

    /// Why a held connection gives up: the last attempt's reason, or that nothing came up.
    fn gave_up(&self, last: Option<String>) -> String {
        let waited = humantime::format_duration(self.hold_for());
        match last {
            Some(why) => format!("{why} (held for {waited})"),
            None => format!("no VM came up within {waited}"),
        }
    }

    fn takes_new(&self, protocol: Protocol) -> bool {
        self.pool
            .snapshot()
            .vms()
            .iter()
            .any(|vm| vm.accepts_new_sessions(protocol))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use router_core::{Health, PickRequest, RoutingPolicy, SessionGuard, SystemClock, VmSpec};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An owner that counts registrations.
    #[derive(Default)]
    struct Owner {
        registered: Arc<AtomicUsize>,
    }

    struct Registered(Arc<AtomicUsize>);

    impl Drop for Registered {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::AcqRel);
        }
    }

    impl Wake for Owner {
        fn holds_connections(&self) -> bool {
            true
        }
        fn hold_for(&self) -> Duration {
            Duration::from_secs(120)
        }
        fn boot_estimate(&self) -> Duration {
            Duration::from_secs(60)
        }
        fn register(&self, _: Protocol) -> Waiting {
            self.registered.fetch_add(1, Ordering::AcqRel);
            Waiting::new(Registered(self.registered.clone()))
        }
    }

    fn pool() -> Arc<Pool> {
        let pool = Arc::new(Pool::new(RoutingPolicy::default(), Arc::new(SystemClock)));
        let mut spec = VmSpec::new("vm-a", "127.0.0.1");
        spec.max_sessions = 1;
        pool.set_vms(vec![spec]);
        pool
    }

    /// What the SSH side does once woken: reserve a place, or say why there is none.
    async fn reserve(pool: &Pool) -> ControlFlow<SessionGuard, String> {
        match pool.acquire(&PickRequest::new(Protocol::Ssh)) {
            Ok(guard) => ControlFlow::Break(guard),
            Err(no_vm) => ControlFlow::Continue(no_vm.to_string()),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_connection_goes_on_when_the_pool_changes_not_on_a_timer() {
        let pool = pool();
        let owner = Owner::default();
        let registered = owner.registered.clone();
        let waker = Waker::new(Arc::new(owner), pool.clone());
        let waiting = tokio::spawn({
            let (waker, pool) = (waker.clone(), pool.clone());
            async move { waker.hold(Protocol::Ssh, || reserve(&pool)).await }
        });
        // With the clock paused, time only moves when every task is idle: a minute passes with
        // the waiter parked (looking again each second) and still registered.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!waiting.is_finished());
        assert_eq!(registered.load(Ordering::Acquire), 1);
        // The web side coming up is a change, but not one that helps an SSH user.
        pool.set_protocol_health("vm-a", Protocol::Http, Health::Up);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        let before = tokio::time::Instant::now();
        pool.set_protocol_health("vm-a", Protocol::Ssh, Health::Up);
        let guard = waiting.await.unwrap().expect("a VM takes SSH sessions");
        assert_eq!(guard.spec().name, "vm-a");
        assert_eq!(
            tokio::time::Instant::now(),
            before,
            "no timer was waited on"
        );
        assert_eq!(registered.load(Ordering::Acquire), 0, "registration ended");
    }

    #[tokio::test(start_paused = true)]
    async fn two_held_connections_and_one_place_the_second_waits_on_instead_of_failing() {
        let pool = pool();
        let owner = Owner::default();
        let registered = owner.registered.clone();
        let waker = Waker::new(Arc::new(owner), pool.clone());
        let held = |pool: Arc<Pool>| {
            let waker = waker.clone();
            tokio::spawn(async move { waker.hold(Protocol::Ssh, || reserve(&pool)).await })
        };
        let (first, second) = (held(pool.clone()), held(pool.clone()));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(registered.load(Ordering::Acquire), 2);
        // One VM with one place comes up: both wake at the same change, one gets it.
        pool.set_protocol_health("vm-a", Protocol::Ssh, Health::Up);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(
            first.is_finished() != second.is_finished(),
            "exactly one held connection goes on"
        );
        let (winner, loser) = if first.is_finished() {
            (first.await, second)
        } else {
            (second.await, first)
        };
        let session = winner.unwrap().expect("one held connection gets the place");
        // The other is still held, and still counted as waiting.
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(
            !loser.is_finished(),
            "the second connection is held, not refused"
        );
        assert_eq!(registered.load(Ordering::Acquire), 1);
        // The first session ends: that publishes no snapshot, and the held connection still
        // finds the place within a recheck.
        let ended = tokio::time::Instant::now();
        drop(session);
        let guard = loser.await.unwrap().expect("the freed place is found");
        assert_eq!(guard.spec().name, "vm-a");
        assert!(ended.elapsed() <= RECHECK);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_attempt_is_retried_once_per_recheck_and_its_reason_is_the_error() {
        let pool = pool();
        pool.set_health("vm-a", Health::Up);
        let waker = Waker::new(Arc::new(Owner::default()), pool);
        let attempts = AtomicUsize::new(0);
        let started = tokio::time::Instant::now();
        let outcome: Result<(), String> = waker
            .hold(Protocol::Ssh, || {
                attempts.fetch_add(1, Ordering::AcqRel);
                std::future::ready(ControlFlow::Continue("vm-a refused the connection".into()))
            })
            .await;
        assert_eq!(started.elapsed(), Duration::from_secs(120));
        let error = outcome.expect_err("never connects");
        assert!(error.starts_with("vm-a refused the connection"), "{error}");
        assert!(error.contains("2m"), "{error}");
        // One attempt at once, then at most one per recheck.
        let attempts = attempts.load(Ordering::Acquire);
        assert!((100..=121).contains(&attempts), "{attempts} attempts");
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_connection_gives_up_after_hold_for() {
        let pool = pool();
        let waker = Waker::new(Arc::new(Owner::default()), pool.clone());
        let started = tokio::time::Instant::now();
        let error = waker
            .hold(Protocol::Http, || reserve(&pool))
            .await
            .expect_err("no VM ever comes up");
        assert_eq!(started.elapsed(), Duration::from_secs(120));
        assert_eq!(error, "no VM came up within 2m");
    }

    #[tokio::test(start_paused = true)]
    async fn released_connections_are_let_go_at_once_with_the_reason() {
        let pool = pool();
        let waker = Waker::new(Arc::new(Owner::default()), pool.clone());
        let held = {
            let (waker, pool) = (waker.clone(), pool.clone());
            tokio::spawn(async move { waker.hold(Protocol::Ssh, || reserve(&pool)).await })
        };
        tokio::time::sleep(Duration::from_secs(30)).await;
        let released = tokio::time::Instant::now();
        waker.release("poolgate is shutting down");
        let error = held.await.unwrap().expect_err("let go");
        assert_eq!(error, "poolgate is shutting down");
        assert_eq!(released.elapsed(), Duration::ZERO);
        // One that comes after is not held either.
        let error = waker
            .hold(Protocol::Ssh, || reserve(&pool))
            .await
            .expect_err("not held");
        assert_eq!(error, "poolgate is shutting down");
    }

    #[tokio::test]
    async fn a_vm_already_taking_sessions_needs_no_wait() {
        let pool = pool();
        pool.set_health("vm-a", Health::Up);
        let waker = Waker::new(Arc::new(Owner::default()), pool.clone());
        assert!(waker.hold(Protocol::Ssh, || reserve(&pool)).await.is_ok());
    }
}
