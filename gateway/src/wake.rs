//! Wake-on-connect, as the frontends see it. When no VM can take a new session, the SSH side
//! holds the connection and the HTTP side answers with a page that refreshes; both tell the
//! pool's owner (the autoscaler, wired in by the composition root) that someone is waiting, and
//! the SSH side waits for a VM. The frontends know only this module, never the autoscaler.
//!
//! Waiting is event-driven: the pool tells a watch channel about every snapshot it publishes,
//! so a held connection goes on the moment a VM takes sessions of its protocol, with no polling.

use std::sync::Arc;
use std::time::Duration;

use router_core::{Pool, Protocol};
use tokio::sync::watch;

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
        }
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

    /// Registers someone waiting for `protocol` (see [`Wake::register`]).
    pub fn register(&self, protocol: Protocol) -> Waiting {
        self.owner.register(protocol)
    }

    /// Registers a waiting connection and waits until some VM takes new sessions of
    /// `protocol`, up to [`hold_for`](Self::hold_for). True when one does.
    pub async fn wait_for_vm(&self, protocol: Protocol) -> bool {
        let _waiting = self.register(protocol);
        let deadline = tokio::time::sleep(self.hold_for());
        tokio::pin!(deadline);
        let mut changes = self.changes.clone();
        loop {
            // Marks the current generation seen before looking, so a change published after
            // the look wakes the `changed()` below.
            changes.borrow_and_update();
            if self.takes_new(protocol) {
                return true;
            }
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        // The pool is gone; nothing will change any more.
                        return self.takes_new(protocol);
                    }
                }
                () = &mut deadline => return self.takes_new(protocol),
            }
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
    use router_core::{Health, RoutingPolicy, SystemClock, VmSpec};
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
        pool.set_vms(vec![VmSpec::new("vm-a", "127.0.0.1")]);
        pool
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_connection_goes_on_when_the_pool_changes_not_on_a_timer() {
        let pool = pool();
        let owner = Owner::default();
        let registered = owner.registered.clone();
        let waker = Waker::new(Arc::new(owner), pool.clone());
        let waiting = tokio::spawn({
            let waker = waker.clone();
            async move { waker.wait_for_vm(Protocol::Ssh).await }
        });
        // With the clock paused, time only moves when every task is idle: a minute passes with
        // the waiter parked and still registered.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!waiting.is_finished());
        assert_eq!(registered.load(Ordering::Acquire), 1);
        // The web side coming up is a change, but not one that helps an SSH user.
        pool.set_protocol_health("vm-a", Protocol::Http, Health::Up);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        let before = tokio::time::Instant::now();
        pool.set_protocol_health("vm-a", Protocol::Ssh, Health::Up);
        assert!(waiting.await.unwrap(), "a VM takes SSH sessions");
        assert_eq!(
            tokio::time::Instant::now(),
            before,
            "no timer was waited on"
        );
        assert_eq!(registered.load(Ordering::Acquire), 0, "registration ended");
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_connection_gives_up_after_hold_for() {
        let waker = Waker::new(Arc::new(Owner::default()), pool());
        let started = tokio::time::Instant::now();
        assert!(!waker.wait_for_vm(Protocol::Http).await);
        assert_eq!(started.elapsed(), Duration::from_secs(120));
    }

    #[tokio::test]
    async fn a_vm_already_taking_sessions_needs_no_wait() {
        let pool = pool();
        pool.set_health("vm-a", Health::Up);
        let waker = Waker::new(Arc::new(Owner::default()), pool);
        assert!(waker.wait_for_vm(Protocol::Ssh).await);
    }
}
