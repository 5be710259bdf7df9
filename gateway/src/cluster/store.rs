//! Affinity written to the shared store as sessions start and end.
//!
//! router-core asks its [`SessionStore`] where a user should go back to and tells it when
//! sessions start and end. [`SharedStore`] answers from this process's [`InMemoryStore`] as
//! always, and queues every start and end for a writer task that records the user's VM in Redis
//! (valid for `routing.affinity_ttl` from then), so other replicas can send the user's next
//! connection to the same VM. The queue is bounded and never blocks a session: when Redis is
//! slow, placements beyond it are not shared (the user may then land on another VM through
//! another replica, as with no cluster at all).

use std::sync::Arc;
use std::time::{Duration, Instant};

use router_core::{InMemoryStore, SessionStore};
use tokio::sync::mpsc;

use super::Cluster;

/// Placements waiting to be written; beyond this they are dropped.
const QUEUE: usize = 4096;

/// A [`SessionStore`] that also shares placements through the cluster store.
#[derive(Debug)]
pub struct SharedStore {
    local: InMemoryStore,
    queue: mpsc::Sender<(String, String)>,
}

/// The receiving end of a [`SharedStore`]'s queue, for [`SharedStore::write`].
#[derive(Debug)]
pub struct Placements(mpsc::Receiver<(String, String)>);

impl SharedStore {
    /// A store and the queue its writer drains.
    pub fn new() -> (Arc<Self>, Placements) {
        let (queue, rx) = mpsc::channel(QUEUE);
        (
            Arc::new(Self {
                local: InMemoryStore::new(),
                queue,
            }),
            Placements(rx),
        )
    }

    fn share(&self, user: &str, vm: &str) {
        let _ = self.queue.try_send((user.to_owned(), vm.to_owned()));
    }

    /// Writes queued placements to `cluster`'s store, a batch per round trip, until the queue
    /// closes (every store dropped).
    pub async fn write(mut placements: Placements, cluster: Arc<Cluster>) {
        let mut batch = Vec::new();
        while placements.0.recv_many(&mut batch, 256).await > 0 {
            // The latest placement of a user wins within a batch.
            batch.reverse();
            let mut seen = std::collections::HashSet::new();
            batch.retain(|(user, _)| seen.insert(user.clone()));
            cluster.write_affinity(&batch).await;
            batch.clear();
        }
    }
}

impl SessionStore for SharedStore {
    fn affinity(&self, user: &str, now: Instant, ttl: Duration) -> Option<Arc<str>> {
        self.local.affinity(user, now, ttl)
    }

    fn session_started(&self, user: &str, vm: &str, now: Instant) {
        self.local.session_started(user, vm, now);
        self.share(user, vm);
    }

    fn session_ended(&self, user: &str, vm: &str, now: Instant) {
        self.local.session_ended(user, vm, now);
        // The affinity lasts `affinity_ttl` from the user's last activity.
        self.share(user, vm);
    }

    fn expire(&self, now: Instant, ttl: Duration) -> usize {
        self.local.expire(now, ttl)
    }
}
