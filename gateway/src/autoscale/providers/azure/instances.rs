//! Actions on exact instances (start, deallocate, delete), each backed off per instance after a
//! failure, and the instances that failed to come up: exported, and deleted by their instance
//! ids when the pool grows.

use std::collections::HashMap;

use hyper::Method;
use poolgate_config::Orchestration;
use serde_json::json;
use tokio::time::Instant;

use super::arm::error;
use super::backoff::Backoff;
use super::model::VmProperties;
use super::{AzureProvider, ProviderError};

/// Why an instance counts as failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FailReason {
    /// `provisioningState` `Failed`.
    ProvisioningFailed,
    /// No power state for longer than `pool.azure.start_timeout`.
    StartTimeout,
}

impl FailReason {
    /// The `reason` label of `poolgate_azure_instance_failed`.
    pub(super) fn label(self) -> &'static str {
        match self {
            Self::ProvisioningFailed => "provisioning_failed",
            Self::StartTimeout => "start_timeout",
        }
    }
}

/// An instance that failed to come up, as last listed.
#[derive(Debug, Clone)]
pub(super) struct Failed {
    reason: FailReason,
    /// Its power state says it runs (or is starting): it might have served sessions.
    running: bool,
    /// `protectionPolicy.protectFromScaleIn` as listed (`None`: not in the listing).
    protected: Option<bool>,
}

impl Failed {
    pub(super) fn new(
        reason: FailReason,
        properties: &VmProperties,
        protected: Option<bool>,
    ) -> Self {
        Self {
            reason,
            running: matches!(properties.power().as_deref(), Some("running" | "starting")),
            protected,
        }
    }
}

impl AzureProvider {
    /// Keeps the failed instances of a listing and exports them
    /// (`poolgate_azure_instance_failed{vm,reason}`).
    pub(super) fn publish_failed(&self, failed: HashMap<String, Failed>) {
        if let Some(metrics) = &self.metrics {
            let gauge = &metrics.azure_instance_failed;
            gauge.reset();
            for (name, f) in &failed {
                gauge.with_label_values(&[name, f.reason.label()]).set(1);
            }
        }
        if let Ok(mut map) = self.failed.lock() {
            *map = failed;
        }
    }

    /// Forgets what it remembers per VM (backoffs, requested protection, first listing without
    /// a power state, failures reported) for VMs no longer listed: a Uniform instance id may be
    /// reused by a new instance, which starts with a clean slate.
    pub(super) fn forget_gone(&self, listed: &HashMap<String, super::Known>) {
        if let Ok(mut wanted) = self.protect_wanted.lock() {
            wanted.retain(|name, _| listed.contains_key(name));
        }
        if let Ok(mut seen) = self.without_power.lock() {
            seen.retain(|name, _| listed.contains_key(name));
        }
        if let Ok(mut reported) = self.reported_failed.lock() {
            reported.retain(|name| listed.contains_key(name));
        }
        if let Ok(mut reported) = self.reported_last_operation.lock() {
            reported.retain(|name| listed.contains_key(name));
        }
        self.instance_backoff
            .retain(|(_, name)| listed.contains_key(name));
        self.protect_backoff
            .retain(|name| listed.contains_key(name));
    }

    /// Whether a failed instance may be deleted without ending anyone's session: never one
    /// the driver asked to protect (it had sessions or work) or that is listed as protected;
    /// a running one only when the listing says it is unprotected (Uniform), since a Flexible
    /// listing does not show protection.
    fn deletable(&self, name: &str, failed: &Failed) -> bool {
        let wanted = self
            .protect_wanted
            .lock()
            .ok()
            .and_then(|w| w.get(name).copied())
            .unwrap_or(false);
        if wanted || failed.protected == Some(true) {
            return false;
        }
        !failed.running || failed.protected == Some(false)
    }

    /// Deletes the instances of the last listing that failed to come up, by their instance ids,
    /// where that cannot end a session ([`AzureProvider::deletable`]); each is backed off like
    /// any delete after a failure. The delete is sent, not waited for: the next listing shows
    /// the instances deleting or gone. Counted in
    /// `poolgate_autoscale_actions_total{action="delete_failed"}` per instance (failures as
    /// `error`).
    pub(super) async fn delete_failed(&self) {
        let failed: Vec<(String, Failed)> = match self.failed.lock() {
            Ok(map) => map.iter().map(|(n, f)| (n.clone(), f.clone())).collect(),
            Err(_) => return,
        };
        let now = Instant::now();
        let mut chosen = Vec::new();
        for (name, f) in failed {
            if !self.deletable(&name, &f) {
                tracing::debug!(vm = %name, "failed instance kept: it may have sessions");
                continue;
            }
            if let Ok(previous) = self.instance_backoff.check(&("delete", name.clone()), now) {
                chosen.push((name, f.reason, previous));
            }
        }
        if chosen.is_empty() {
            return;
        }
        chosen.sort_by(|a, b| a.0.cmp(&b.0));
        let names: Vec<String> = chosen.iter().map(|(n, _, _)| n.clone()).collect();
        let results = self.send("delete", &names, false).await;
        for ((name, reason, previous), (_, result)) in chosen.into_iter().zip(results) {
            let backoff = self.instance_backoff.record(
                ("delete", name.clone()),
                result.as_ref().err(),
                previous,
                now,
            );
            let label = match &result {
                Ok(()) => {
                    tracing::warn!(vm = %name, reason = reason.label(), "deleting an instance that failed to come up");
                    "delete_failed"
                }
                Err(e) => {
                    let retry_in = backoff.map_or(Backoff::FIRST, |b| b.delay);
                    tracing::warn!(vm = %name, ?retry_in, error = %e, "deleting an instance that failed to come up failed");
                    "error"
                }
            };
            if let Some(metrics) = &self.metrics {
                metrics
                    .autoscale_actions_total
                    .with_label_values(&[label])
                    .inc();
            }
        }
    }

    /// `start`, `deallocate` or `delete` of exact VMs. An instance whose last try of the same
    /// operation failed is not sent again before its backoff (30 s doubling to 30 min) ends: a
    /// quota 409, `AllocationFailed` or a missing role would otherwise cost a write every tick.
    /// Those are refused without a request, in an error that says when the next try is and
    /// whether the last failure was a lack of capacity (so a start falls back to create).
    pub(super) async fn instance_action(
        &self,
        operation: &'static str,
        names: &[String],
    ) -> Result<(), ProviderError> {
        if names.is_empty() {
            return Ok(());
        }
        // Unknown names fail before any write and start no backoff.
        self.resolve(operation, names).await?;
        let now = Instant::now();
        let mut ready = Vec::new();
        let mut refused = Vec::new();
        for name in names {
            match self.instance_backoff.check(&(operation, name.clone()), now) {
                Ok(previous) => ready.push((name.clone(), previous)),
                Err(backoff) => refused.push((name.clone(), backoff)),
            }
        }
        let mut first_error: Option<ProviderError> = None;
        if !ready.is_empty() {
            let ready_names: Vec<String> = ready.iter().map(|(n, _)| n.clone()).collect();
            let results = self.send(operation, &ready_names, true).await;
            for ((name, previous), (_, result)) in ready.into_iter().zip(results) {
                let backoff = self.instance_backoff.record(
                    (operation, name.clone()),
                    result.as_ref().err(),
                    previous,
                    now,
                );
                if let Err(e) = result {
                    let retry_in = backoff.map_or(Backoff::FIRST, |b| b.delay);
                    tracing::warn!(vm = %name, %operation, ?retry_in, error = %e, "instance action failed; not sent again for this VM before the backoff ends");
                    if first_error.is_none() {
                        first_error = Some(e);
                    }
                }
            }
        }
        if refused.is_empty() {
            return first_error.map_or(Ok(()), Err);
        }
        let held = refused
            .iter()
            .map(|(name, b)| format!("{name} (in {})", b.left(now)))
            .collect::<Vec<_>>()
            .join(", ");
        let no_capacity = refused.iter().any(|(_, b)| b.no_capacity);
        let note = format!(
            "not sent for {held}: the last {operation} of it failed and is tried again after its backoff{}",
            if no_capacity {
                " (Azure had no capacity for it)"
            } else {
                ""
            }
        );
        Err(match first_error {
            Some(mut e) => {
                e.message = format!("{}; {note}", e.message);
                e.no_capacity |= no_capacity;
                e
            }
            None => ProviderError {
                no_capacity,
                ..error(operation, note)
            },
        })
    }

    /// Sends `operation` for `names` (known instances) and returns the outcome per name:
    /// Uniform sends one `POST {vmss}/{operation}` with every instance id (its outcome is each
    /// instance's), Flexible one call per VM. `wait`: follow the long-running operation to its
    /// end, else stop once ARM accepted it.
    async fn send(
        &self,
        operation: &'static str,
        names: &[String],
        wait: bool,
    ) -> Vec<(String, Result<(), ProviderError>)> {
        let ids = match self.resolve(operation, names).await {
            Ok(ids) => ids,
            Err(e) => return names.iter().map(|n| (n.clone(), Err(e.clone()))).collect(),
        };
        match self.orchestration() {
            Orchestration::Uniform => {
                let body = json!({ "instanceIds": ids });
                let path = format!(
                    "{}/{operation}?api-version={}",
                    self.scale_set_path(),
                    self.api_version
                );
                let result = self
                    .write(operation, Method::POST, &path, Some(&body), wait)
                    .await;
                names.iter().map(|n| (n.clone(), result.clone())).collect()
            }
            Orchestration::Flexible => {
                let calls = ids.iter().map(|name| {
                    let (method, path) = if operation == "delete" {
                        (
                            Method::DELETE,
                            format!("{}?api-version={}", self.vm_path(name), self.api_version),
                        )
                    } else {
                        (
                            Method::POST,
                            format!(
                                "{}/{operation}?api-version={}",
                                self.vm_path(name),
                                self.api_version
                            ),
                        )
                    };
                    async move {
                        let result = self
                            .write(operation, method, &path, None, wait)
                            .await
                            .map_err(|mut e| {
                                e.message = format!("{name}: {}", e.message);
                                e
                            });
                        (name.clone(), result)
                    }
                });
                futures::future::join_all(calls).await
            }
        }
    }

    async fn write(
        &self,
        operation: &str,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
        wait: bool,
    ) -> Result<(), ProviderError> {
        if wait {
            self.arm.long_running(operation, method, path, body).await
        } else {
            self.arm.call(operation, method, path, body).await.map(drop)
        }
    }
}
