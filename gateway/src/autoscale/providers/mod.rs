//! Where VMs come from and how they are started and removed: `static`, `exec`, `azure-vmss`
//! (the demo pool's provider lives beside its VMs in `demo/` and implements [`Provider`] like
//! any embedder's provider would).

pub mod azure;
pub mod exec;

use futures::future::BoxFuture;
use router_core::{Lifecycle, VmSpec};

/// A VM as a provider reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderVm {
    /// Where to reach it and its limits.
    pub spec: VmSpec,
    /// Its power state.
    pub lifecycle: Lifecycle,
}

/// A provider call failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{provider} {operation}: {message}")]
pub struct ProviderError {
    /// Provider name.
    pub provider: &'static str,
    /// What was attempted.
    pub operation: String,
    /// What went wrong and what to do.
    pub message: String,
    /// The platform had no capacity for this instance (Azure `AllocationFailed`,
    /// `SkuNotAvailable`, …): a stopped instance that cannot start may still be replaced by a
    /// new one, which the platform may place elsewhere.
    pub no_capacity: bool,
}

/// What a provider can do besides listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// Start stopped VMs and stop running ones (keeping them).
    pub start_stop: bool,
    /// Create new VMs and delete exact ones.
    pub create_delete: bool,
}

impl Capabilities {
    /// Whether the pool can be scaled at all.
    pub fn can_scale(&self) -> bool {
        self.start_stop || self.create_delete
    }
}

/// A source of VMs. Futures are boxed so providers can be chosen at run time.
pub trait Provider: Send + Sync {
    /// Name for logs (`static`, `exec`, …).
    fn name(&self) -> &'static str;
    /// What it can do.
    fn capabilities(&self) -> Capabilities;
    /// Every VM of the pool with its power state.
    fn list(&self) -> BoxFuture<'_, Result<Vec<ProviderVm>, ProviderError>>;
    /// Starts these stopped VMs.
    fn start<'a>(&'a self, vms: &'a [String]) -> BoxFuture<'a, Result<(), ProviderError>>;
    /// Stops (deallocates) these VMs; they can be started again.
    fn stop<'a>(&'a self, vms: &'a [String]) -> BoxFuture<'a, Result<(), ProviderError>>;
    /// Creates `count` new VMs.
    fn create(&self, count: u32) -> BoxFuture<'_, Result<(), ProviderError>>;
    /// Deletes these exact VMs.
    fn delete<'a>(&'a self, vms: &'a [String]) -> BoxFuture<'a, Result<(), ProviderError>>;
    /// Whether a start of this stopped VM would be sent now: false while an earlier failure of
    /// it is backing off (Azure), so that the driver starts another stopped VM first instead of
    /// asking again for one that would be refused.
    fn can_start_now(&self, _vm: &str) -> bool {
        true
    }
    /// Marks VMs that have sessions so the platform's own scale-in spares them (Azure
    /// `protectFromScaleIn`); a no-op elsewhere.
    fn protect<'a>(
        &'a self,
        _vms: &'a [(String, bool)],
    ) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async { Ok(()) })
    }
}

/// `static`: the VMs of `[[pool.backends]]`, always running; no scaling.
#[derive(Debug, Clone)]
pub struct StaticProvider {
    vms: Vec<VmSpec>,
}

impl StaticProvider {
    /// A static pool.
    pub fn new(vms: Vec<VmSpec>) -> Self {
        Self { vms }
    }

    fn unsupported(operation: &str) -> ProviderError {
        ProviderError {
            provider: "static",
            operation: operation.to_string(),
            message: "a static pool cannot scale (use the exec, azure-vmss or demo provider)"
                .into(),
            no_capacity: false,
        }
    }
}

impl Provider for StaticProvider {
    fn name(&self) -> &'static str {
        "static"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<ProviderVm>, ProviderError>> {
        let vms = self
            .vms
            .iter()
            .map(|spec| ProviderVm {
                spec: spec.clone(),
                lifecycle: Lifecycle::Running,
            })
            .collect();
        Box::pin(async move { Ok(vms) })
    }

    fn start<'a>(&'a self, _vms: &'a [String]) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async { Err(Self::unsupported("start")) })
    }

    fn stop<'a>(&'a self, _vms: &'a [String]) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async { Err(Self::unsupported("stop")) })
    }

    fn create(&self, _count: u32) -> BoxFuture<'_, Result<(), ProviderError>> {
        Box::pin(async { Err(Self::unsupported("create")) })
    }

    fn delete<'a>(&'a self, _vms: &'a [String]) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async { Err(Self::unsupported("delete")) })
    }
}
