//! Where a user's sessions already are, as several gateway replicas know it together.
//!
//! With one replica, router-core's own store answers (the VM of the user's latest session). With
//! several, a user's earlier sessions may have gone through another replica, so the SSH side asks
//! a shared store before it places a session and passes the answer to router-core as
//! `PickRequest::affinity_hint`. This trait is that question; the cluster module answers it, and
//! neither frontend knows which store is behind it.

use async_trait::async_trait;

/// Looks up a user's affinity VM in a store shared by the replicas.
#[async_trait]
pub trait SharedAffinity: Send + Sync {
    /// The VM `user` should go back to, or `None` when unknown or when the store cannot answer in
    /// time (the login then goes on with this replica's own knowledge; it never waits long).
    async fn affinity(&self, user: &str) -> Option<String>;
}
