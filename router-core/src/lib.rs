//! poolgate routing core: pure logic, no I/O.
//!
//! - [`vm`]: the VM model ([`VmSpec`], [`VmStatus`], public [`VmState`]).
//! - [`health`]: the rise/fall health state machine ([`HealthTracker`]).
//! - [`Pool`]: the current [`Snapshot`] of VMs, swapped atomically on every
//!   change; session placement ([`Pool::acquire`], [`Pool::pick`]) reads it
//!   without locks.
//! - [`SessionGuard`]: counts one live session on a VM until dropped;
//!   `max_sessions` holds under any concurrency.
//! - [`SessionStore`]: user affinity behind a trait ([`InMemoryStore`]).
//! - HTTP browser sessions as load: [`Pool::http_route`], [`Pool::http_touch`].
//! - [`Clock`]: time is a parameter ([`SystemClock`], [`ManualClock`]).
//!
//! ```
//! use std::sync::Arc;
//! use router_core::{Health, Pool, PickRequest, Protocol, RoutingPolicy, SystemClock, VmSpec};
//!
//! # fn main() -> Result<(), router_core::NoVm> {
//! let pool = Pool::new(RoutingPolicy::default(), Arc::new(SystemClock));
//! pool.set_vms(vec![VmSpec::new("dsvm-1", "10.0.0.4"), VmSpec::new("dsvm-2", "10.0.0.5")]);
//! // New VMs are `starting` until their first probe.
//! assert!(pool.acquire(&PickRequest::new(Protocol::Ssh)).is_err());
//! pool.set_health("dsvm-1", Health::Up);
//! pool.set_health("dsvm-2", Health::Up);
//!
//! let guard = pool.acquire(&PickRequest::new(Protocol::Ssh).user("ann"))?;
//! assert_eq!(guard.vm_name(), "dsvm-1"); // equal load: by name
//! let other = pool.acquire(&PickRequest::new(Protocol::Ssh).user("bob"))?;
//! assert_eq!(other.vm_name(), "dsvm-2"); // least loaded
//! let again = pool.acquire(&PickRequest::new(Protocol::Ssh).user("ann"))?;
//! assert_eq!(again.vm_name(), "dsvm-1"); // user affinity
//! drop((guard, other, again));
//! assert_eq!(pool.snapshot().total_sessions(), 0);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod autoscale;
pub mod clock;
mod hash;
pub mod health;
mod http;
mod pool;
mod select;
mod session;
pub mod sim;
mod snapshot;
pub mod store;
pub mod vm;

pub use clock::{Clock, ManualClock, SystemClock};
pub use health::{Health, HealthPolicy, HealthTracker, Transition};
pub use http::HttpRouted;
pub use pool::{Pool, RoutingPolicy};
pub use select::{NoVm, PickRequest};
pub use session::{SessionBytes, SessionGuard, SessionInfo};
pub use snapshot::Snapshot;
pub use store::{InMemoryStore, SessionStore};
pub use vm::{Lifecycle, LoadCounts, Protocol, Vm, VmSpec, VmState, VmStatus};

#[cfg(test)]
mod tests {
    use super::*;

    fn shareable<T: Send + Sync>() {}

    #[test]
    fn core_types_are_send_and_sync() {
        shareable::<Pool>();
        shareable::<Snapshot>();
        shareable::<SessionGuard>();
        shareable::<NoVm>();
        shareable::<InMemoryStore>();
        shareable::<ManualClock>();
    }
}
