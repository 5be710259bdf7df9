//! `azure-vmss`: the instances of an Azure VM Scale Set, through ARM REST.
//!
//! Calls (Microsoft.Compute `api-version` = `pool.azure.api_version`, default `2024-07-01`):
//!
//! | what | Uniform | Flexible |
//! |---|---|---|
//! | list | `GET {vmss}/virtualMachines?$expand=instanceView` | `GET {rg}/providers/Microsoft.Compute/virtualMachines?$filter='virtualMachineScaleSet/id' eq '{vmss id}'&$expand=instanceView` |
//! | private IPs | `GET {vmss}/networkInterfaces?api-version=2018-10-01` | `GET {rg}/providers/Microsoft.Network/networkInterfaces?api-version=2024-05-01` |
//! | add capacity | `GET {vmss}` then `PATCH {vmss} {"sku":{"capacity":N}}` | same |
//! | start / deallocate | `POST {vmss}/start`, `…/deallocate` `{"instanceIds":[…]}` | `POST {vm}/start`, `{vm}/deallocate` per VM |
//! | delete exact VMs | `POST {vmss}/delete {"instanceIds":[…]}` | `DELETE {vm}` per VM |
//! | protect from scale-in | `PUT {vmss}/virtualMachines/{id} {"properties":{"protectionPolicy":{…}}}` | the same with the VM name as id (api-version ≥ 2023-09-01) |
//! | delete failed instances (on `create`) | `POST {vmss}/delete {"instanceIds":[…]}` | `DELETE {vm}` per VM |
//!
//! Capacity is only ever raised: VMs leave by being deallocated (`pool.azure.deallocate_idle`,
//! the default) or deleted by their exact instance ids, never by lowering `sku.capacity` (Azure
//! would pick the victims). A VM's pool name is the instance
//! name (`dsvm_3` in Uniform, the VM name in Flexible); calls map names back to instance ids.
//!
//! A write that fails backs off (30 s doubling to 30 min) per action and instance
//! (`backoff.rs`); every ARM request is counted by operation, method and status code; instances
//! that never come up are exported and, when the pool grows, deleted (`instances.rs`).

pub mod arm;
mod backoff;
mod instances;
mod model;
mod protect;
pub mod token;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_credentials;
#[cfg(test)]
mod tests_failures;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use hyper::Method;
use poolgate_config::{Azure, Orchestration};
use router_core::{Lifecycle, VmSpec};
use serde_json::json;

use self::arm::{Arm, HyperClient, Tuning, encode_query, error};
use self::backoff::Backoffs;
use self::instances::{FailReason, Failed};
use self::model::{Instance, Nic, ScaleSet, VirtualMachine};
use self::token::TokenSource;
use super::{Capabilities, Provider, ProviderError, ProviderVm};
use crate::metrics::Metrics;

/// `api-version` of the scale-set NIC listing (Microsoft.Compute's virtual-machine-scale-set
/// network interface API only exists in this Microsoft.Network version family).
pub const VMSS_NIC_API_VERSION: &str = "2018-10-01";
/// `api-version` of Microsoft.Network NIC listings (Flexible).
pub const NETWORK_API_VERSION: &str = "2024-05-01";
/// The first Microsoft.Compute `api-version` that sets instance protection on Flexible members.
pub const FLEXIBLE_PROTECTION_API_VERSION: &str = "2023-09-01";

/// The `$filter` that lists the members of a Flexible scale set (before query encoding).
fn flexible_filter(scale_set_id: &str) -> String {
    format!("'virtualMachineScaleSet/id' eq '{scale_set_id}'")
}

/// What the provider remembers about a VM from the last listing.
#[derive(Debug, Clone)]
struct Known {
    instance_id: String,
    protected: Option<bool>,
}

/// The `azure-vmss` provider.
pub struct AzureProvider {
    arm: Arm,
    api_version: String,
    /// The scale set's orchestration mode: Flexible (else Uniform). Configured, then read from
    /// the scale set itself before the first listing ([`AzureProvider::check_scale_set`]).
    flexible: AtomicBool,
    /// The scale set was read once (its orchestration mode and overprovisioning checked).
    scale_set_checked: tokio::sync::OnceCell<()>,
    /// Held from reading `sku.capacity` until the raised capacity is accepted, so that two
    /// creates never write `capacity + n` from the same reading (or a late write an older one).
    capacity_write: tokio::sync::Mutex<()>,
    deallocate_idle: bool,
    subscription: String,
    resource_group: String,
    scale_set: String,
    defaults: VmSpec,
    known: Mutex<HashMap<String, Known>>,
    /// Scale-set writes (`create`) that failed: not sent again before the deadline.
    action_backoff: Backoffs<&'static str>,
    /// When each instance without a power state was first listed.
    without_power: Mutex<HashMap<String, tokio::time::Instant>>,
    start_timeout: std::time::Duration,
    /// Instances already reported as provisioning `Failed` (reported once, not every listing).
    reported_failed: Mutex<std::collections::HashSet<String>>,
    /// Instances whose last operation failed although they have a power state, already
    /// reported (once; again after an operation that succeeded).
    reported_last_operation: Mutex<std::collections::HashSet<String>>,
    /// Protection writes that failed, per VM: not tried again before the deadline.
    protect_backoff: Backoffs<String>,
    /// Start, deallocate and delete of one instance that failed, per (operation, VM): not sent
    /// again before the deadline.
    instance_backoff: Backoffs<(&'static str, String)>,
    /// Instances that failed to come up, as of the last listing.
    failed: Mutex<HashMap<String, Failed>>,
    /// The scale-in protection last asked for, per VM (whether the write went through or not):
    /// a VM the driver wanted protected may have sessions and is never deleted as failed.
    protect_wanted: Mutex<HashMap<String, bool>>,
    /// ARM request counts, failed-instance gauges and failed-instance deletions, when attached.
    metrics: Option<Arc<Metrics>>,
}

impl std::fmt::Debug for AzureProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureProvider")
            .field("scale_set", &self.scale_set_path())
            .field("orchestration", &self.orchestration())
            .finish_non_exhaustive()
    }
}

/// Records `name` in `reported`; whether it is new there (what is reported once per instance).
fn first_time(reported: &Mutex<std::collections::HashSet<String>>, name: &str) -> bool {
    reported
        .lock()
        .map(|mut set| set.insert(name.to_owned()))
        .unwrap_or(false)
}

/// A name or id we put into an ARM path: letters, digits, `.`, `_`, `-`.
fn path_safe(value: &str) -> bool {
    !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl AzureProvider {
    /// A provider for `[pool.azure]`.
    pub fn from_config(config: &Azure) -> Result<Self, ProviderError> {
        Self::with_tuning(config, Tuning::default())
    }

    /// A provider with explicit retry and polling timing.
    pub fn with_tuning(config: &Azure, tuning: Tuning) -> Result<Self, ProviderError> {
        Self::with_client(config, tuning, arm::http_client()?)
    }

    /// A provider sending its requests (ARM and tokens) through `http`.
    pub fn with_client(
        config: &Azure,
        tuning: Tuning,
        http: HyperClient,
    ) -> Result<Self, ProviderError> {
        for (key, value) in [
            ("subscription_id", &config.subscription_id),
            ("resource_group", &config.resource_group),
            ("scale_set", &config.scale_set),
        ] {
            if !path_safe(value) {
                return Err(error(
                    "setup",
                    format!("pool.azure.{key} {value:?} is not a valid Azure name"),
                ));
            }
        }
        let tokens = TokenSource::from_config(config, http.clone(), tuning.request_timeout)?;
        let target = format!(
            "scale set {} in resource group {} (subscription {})",
            config.scale_set, config.resource_group, config.subscription_id
        );
        let provider = Self {
            arm: Arm::new(http, &tokens, config.resource_manager(), target, tuning),
            api_version: config.api_version.clone(),
            flexible: AtomicBool::new(config.orchestration == Orchestration::Flexible),
            scale_set_checked: tokio::sync::OnceCell::new(),
            capacity_write: tokio::sync::Mutex::new(()),
            deallocate_idle: config.deallocate_idle,
            subscription: config.subscription_id.clone(),
            resource_group: config.resource_group.clone(),
            scale_set: config.scale_set.clone(),
            defaults: VmSpec {
                name: String::new(),
                host: String::new(),
                ssh_port: config.ssh_port,
                http_port: config.http_port,
                weight: config.weight,
                max_sessions: config.max_sessions,
            },
            known: Mutex::new(HashMap::new()),
            protect_backoff: Backoffs::new(),
            reported_failed: Mutex::new(std::collections::HashSet::new()),
            reported_last_operation: Mutex::new(std::collections::HashSet::new()),
            without_power: Mutex::new(HashMap::new()),
            action_backoff: Backoffs::new(),
            start_timeout: config.start_timeout,
            instance_backoff: Backoffs::new(),
            failed: Mutex::new(HashMap::new()),
            protect_wanted: Mutex::new(HashMap::new()),
            metrics: None,
        };
        if !provider.can_protect() {
            tracing::warn!(
                api_version = %provider.api_version,
                "pool.azure.api_version is older than {FLEXIBLE_PROTECTION_API_VERSION}: VMs with sessions are not protected from the scale set's own scale-in (Flexible scale sets need {FLEXIBLE_PROTECTION_API_VERSION} or later for that)"
            );
        }
        Ok(provider)
    }

    /// Exports what the provider sees and does into `metrics`: ARM requests by status code
    /// (`poolgate_azure_requests_total`), the calls left in ARM's throttling policies
    /// (`poolgate_azure_ratelimit_remaining`), instances that failed to come up
    /// (`poolgate_azure_instance_failed`) and their deletion
    /// (`poolgate_autoscale_actions_total{action="delete_failed"}`).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.arm
            .count_requests_in(metrics.azure_requests_total.clone());
        self.arm
            .export_ratelimits_in(metrics.azure_ratelimit_remaining.clone());
        self.metrics = Some(metrics);
        self
    }

    fn group_path(&self) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}",
            self.subscription, self.resource_group
        )
    }

    fn scale_set_path(&self) -> String {
        format!(
            "{}/providers/Microsoft.Compute/virtualMachineScaleSets/{}",
            self.group_path(),
            self.scale_set
        )
    }

    fn vm_path(&self, name: &str) -> String {
        format!(
            "{}/providers/Microsoft.Compute/virtualMachines/{name}",
            self.group_path()
        )
    }

    fn spec(&self, name: String, host: String) -> VmSpec {
        VmSpec {
            name,
            host,
            ..self.defaults.clone()
        }
    }

    async fn list_uniform(&self) -> Result<Vec<ProviderVm>, ProviderError> {
        let base = self.scale_set_path();
        let instances: Vec<Instance> = self
            .arm
            .get_pages(
                "list",
                &format!(
                    "{base}/virtualMachines?$expand=instanceView&api-version={}",
                    self.api_version
                ),
            )
            .await?;
        let nics: Vec<Nic> = self
            .arm
            .get_pages(
                "list",
                &format!("{base}/networkInterfaces?api-version={VMSS_NIC_API_VERSION}"),
            )
            .await?;
        let ips = model::private_ips(&nics);
        let mut known = HashMap::new();
        let mut failed = HashMap::new();
        let mut vms = Vec::with_capacity(instances.len());
        for instance in instances {
            let Some(name) = instance.name.clone().filter(|n| path_safe(n)) else {
                tracing::warn!(id = ?instance.id, "scale set instance without a usable name; skipped");
                continue;
            };
            let Some(instance_id) = instance.instance_id.clone().filter(|i| path_safe(i)) else {
                tracing::warn!(vm = %name, "scale set instance without an instanceId; skipped");
                continue;
            };
            let host = instance
                .id
                .as_deref()
                .and_then(|id| ips.get(&id.to_ascii_lowercase()))
                .cloned()
                .unwrap_or_default();
            let (lifecycle, why) = self.settle(&name, &instance.properties, !host.is_empty());
            let protected = instance.properties.protected_from_scale_in();
            if let Some(reason) = why {
                failed.insert(
                    name.clone(),
                    Failed::new(reason, &instance.properties, protected),
                );
            }
            known.insert(
                name.clone(),
                Known {
                    instance_id,
                    protected,
                },
            );
            vms.push(ProviderVm {
                spec: self.spec(name, host),
                lifecycle,
            });
        }
        self.forget_gone(&known);
        if let Ok(mut map) = self.known.lock() {
            *map = known;
        }
        self.publish_failed(failed);
        Ok(vms)
    }

    async fn list_flexible(&self) -> Result<Vec<ProviderVm>, ProviderError> {
        let scale_set_id = self.scale_set_path();
        // The property path is quoted as in the REST reference of `VirtualMachines_List`
        // ("Allowed value is 'virtualMachineScaleSet/id' eq /subscriptions/…'", azure-rest-api-specs
        // `virtualMachine.json`) and as public clients send it: Azure/azure-sdk-for-java
        // `VirtualMachinesImpl.listByVirtualMachineScaleSetId`
        // (`String.format("'virtualMachineScaleSet/id' eq '%s'", vmssId)`), Kubernetes'
        // cluster-api-provider-azure (`flexibleScaleSetClient`, the same format with the full
        // scale set id), and Microsoft's
        // "List VMSS VM (Flex) with InstanceView" request in the Resource Graph GET/LIST article
        // (https://learn.microsoft.com/azure/governance/resource-graph/concepts/azure-resource-graph-get-list-api).
        let filter = encode_query(&flexible_filter(&scale_set_id));
        let machines: Vec<VirtualMachine> = self
            .arm
            .get_pages(
                "list",
                &format!(
                    "{}/providers/Microsoft.Compute/virtualMachines?$filter={filter}&$expand=instanceView&api-version={}",
                    self.group_path(),
                    self.api_version
                ),
            )
            .await?;
        let nics: Vec<Nic> = self
            .arm
            .get_pages(
                "list",
                &format!(
                    "{}/providers/Microsoft.Network/networkInterfaces?api-version={NETWORK_API_VERSION}",
                    self.group_path()
                ),
            )
            .await?;
        let ips = model::private_ips(&nics);
        let mut known = HashMap::new();
        let mut failed = HashMap::new();
        let mut vms = Vec::new();
        for vm in machines {
            if !vm.belongs_to(&scale_set_id) {
                continue;
            }
            let Some(name) = vm.name.clone().filter(|n| path_safe(n)) else {
                continue;
            };
            let host = vm
                .id
                .as_deref()
                .and_then(|id| ips.get(&id.to_ascii_lowercase()))
                .cloned()
                .unwrap_or_default();
            let (lifecycle, why) = self.settle(&name, &vm.properties, !host.is_empty());
            if let Some(reason) = why {
                // The VM model carries no protectionPolicy (that lives on the scale-set view).
                failed.insert(name.clone(), Failed::new(reason, &vm.properties, None));
            }
            // Flexible instance ids are the VM names ("For Virtual Machine Scale Sets in
            // Flexible Orchestration mode, the instance ID is simply the name of the virtual
            // machine": MicrosoftDocs/azure-compute-docs, virtual-machine-scale-sets-instance-ids.md).
            known.insert(
                name.clone(),
                Known {
                    instance_id: name.clone(),
                    protected: None,
                },
            );
            vms.push(ProviderVm {
                spec: self.spec(name, host),
                lifecycle,
            });
        }
        self.forget_gone(&known);
        if let Ok(mut map) = self.known.lock() {
            *map = known;
        }
        self.publish_failed(failed);
        Ok(vms)
    }

    /// Instance ids for pool names, listing again once when a name is not known yet.
    async fn resolve(
        &self,
        operation: &str,
        names: &[String],
    ) -> Result<Vec<String>, ProviderError> {
        let lookup = |names: &[String]| -> (Vec<String>, Vec<String>) {
            let map = match self.known.lock() {
                Ok(map) => map.clone(),
                Err(_) => HashMap::new(),
            };
            let mut ids = Vec::new();
            let mut missing = Vec::new();
            for name in names {
                match map.get(name) {
                    Some(k) => ids.push(k.instance_id.clone()),
                    None => missing.push(name.clone()),
                }
            }
            (ids, missing)
        };
        let (ids, missing) = lookup(names);
        if missing.is_empty() {
            return Ok(ids);
        }
        self.list_any().await?;
        let (ids, missing) = lookup(names);
        if missing.is_empty() {
            Ok(ids)
        } else {
            Err(error(
                operation,
                format!(
                    "no instance named {} in {}",
                    missing.join(", "),
                    self.scale_set_path()
                ),
            ))
        }
    }

    /// The scale set's orchestration mode.
    pub(super) fn orchestration(&self) -> Orchestration {
        if self.flexible.load(Ordering::Relaxed) {
            Orchestration::Flexible
        } else {
            Orchestration::Uniform
        }
    }

    /// Reads the scale set once: its `orchestrationMode` decides how instances are listed and
    /// acted on, whatever `pool.azure.orchestration` says (a Flexible scale set — the default
    /// for new scale sets since late 2023 — listed as Uniform fails every listing, and a Uniform
    /// one listed as Flexible shows no VMs), and overprovisioning is reported.
    async fn check_scale_set(&self) -> Result<(), ProviderError> {
        let path = format!("{}?api-version={}", self.scale_set_path(), self.api_version);
        let scale_set: ScaleSet = self.arm.get_json("list", &path).await?;
        let configured = self.orchestration();
        let actual = match scale_set.properties.orchestration_mode.as_deref() {
            Some(mode) if mode.eq_ignore_ascii_case("flexible") => Orchestration::Flexible,
            Some(mode) if mode.eq_ignore_ascii_case("uniform") => Orchestration::Uniform,
            _ => configured,
        };
        if actual != configured {
            tracing::warn!(
                scale_set = %self.scale_set,
                configured = %configured,
                actual = %actual,
                "pool.azure.orchestration does not match the scale set's orchestrationMode; following the scale set (set pool.azure.orchestration = \"{actual}\" to silence this)"
            );
            self.flexible
                .store(actual == Orchestration::Flexible, Ordering::Relaxed);
            if !self.can_protect() {
                tracing::warn!(
                    api_version = %self.api_version,
                    "pool.azure.api_version is older than {FLEXIBLE_PROTECTION_API_VERSION}: VMs with sessions are not protected from the scale set's own scale-in (Flexible scale sets need {FLEXIBLE_PROTECTION_API_VERSION} or later for that)"
                );
            }
        }
        if scale_set.properties.overprovision == Some(true) && actual == Orchestration::Uniform {
            tracing::warn!(
                scale_set = %self.scale_set,
                "the scale set has overprovision on: Azure creates extra VMs for each capacity raise and deletes some again, which come and go in the pool; set overprovision to false (az vmss update --set overprovision=false)"
            );
        }
        Ok(())
    }

    async fn list_any(&self) -> Result<Vec<ProviderVm>, ProviderError> {
        self.scale_set_checked
            .get_or_try_init(|| self.check_scale_set())
            .await?;
        match self.orchestration() {
            Orchestration::Uniform => self.list_uniform().await,
            Orchestration::Flexible => self.list_flexible().await,
        }
    }

    async fn add_capacity(&self, count: u32) -> Result<(), ProviderError> {
        if count == 0 {
            return Ok(());
        }
        let path = format!("{}?api-version={}", self.scale_set_path(), self.api_version);
        // Read and raise under one lock; the operation is then followed without it.
        let write = self.capacity_write.lock().await;
        let scale_set: ScaleSet = self.arm.get_json("create", &path).await?;
        let current = scale_set.sku.and_then(|s| s.capacity).ok_or_else(|| {
            error(
                "create",
                "the scale set has no sku.capacity; cannot add capacity",
            )
        })?;
        let target = current.saturating_add(u64::from(count));
        let body = json!({ "sku": { "capacity": target } });
        tracing::info!(scale_set = %self.scale_set, from = current, to = target, "raising scale set capacity");
        let accepted = self
            .arm
            .call("create", Method::PATCH, &path, Some(&body))
            .await?;
        drop(write);
        self.arm.wait("create", &accepted).await
    }

    /// The lifecycle of a listed instance, with two corrections to its own state: an instance
    /// whose creation failed (`VmProperties::creation_failed`), or with no power state for longer
    /// than `pool.azure.start_timeout`, is stopping (not usable, not to be started), reported
    /// once, and returned with the reason. Provisioning `Failed` with a power state is only
    /// warned about (once): the instance is what its power state says.
    fn settle(
        &self,
        name: &str,
        properties: &model::VmProperties,
        has_ip: bool,
    ) -> (Lifecycle, Option<FailReason>) {
        let lifecycle = properties.lifecycle(has_ip);
        if properties.provisioning() == "deleting" {
            // On its way out (perhaps deleted by us as failed): neither starting nor failed.
            if let Ok(mut seen) = self.without_power.lock() {
                seen.remove(name);
            }
            return (lifecycle, None);
        }
        if properties.creation_failed() {
            self.report_failed(name, "provisioning Failed");
            return (lifecycle, Some(FailReason::ProvisioningFailed));
        }
        if properties.failed() {
            self.report_last_operation_failed(name, properties, lifecycle);
        } else if let Ok(mut reported) = self.reported_last_operation.lock() {
            // Reported again should a later operation fail too.
            reported.remove(name);
        }
        let now = tokio::time::Instant::now();
        let Ok(mut seen) = self.without_power.lock() else {
            return (lifecycle, None);
        };
        if properties.has_power_state() {
            seen.remove(name);
            return (lifecycle, None);
        }
        let since = *seen.entry(name.to_owned()).or_insert(now);
        if now.duration_since(since) >= self.start_timeout {
            drop(seen);
            self.report_failed(
                name,
                &format!(
                    "no power state {} after it was first listed (pool.azure.start_timeout)",
                    humantime::format_duration(self.start_timeout)
                ),
            );
            return (Lifecycle::Stopping, Some(FailReason::StartTimeout));
        }
        (lifecycle, None)
    }

    /// Runs a scale-set write unless an earlier failure of the same action is still backing
    /// off (30 s doubling to 30 min). A quota 409, `AllocationFailed` or a missing role would
    /// otherwise be retried with a fresh write every tick and use up the scale set's write
    /// budget; while backing off the call fails at once, without a request, saying when the
    /// next try is.
    async fn backing_off(
        &self,
        action: &'static str,
        write: impl std::future::Future<Output = Result<(), ProviderError>>,
    ) -> Result<(), ProviderError> {
        let now = tokio::time::Instant::now();
        let previous = self.action_backoff.check(&action, now).map_err(|b| {
            error(
                action,
                format!(
                    "not sent: the last {action} failed; trying again in {}",
                    b.left(now)
                ),
            )
        })?;
        let result = write.await;
        self.action_backoff
            .record(action, result.as_ref().err(), previous, now);
        result
    }

    /// Logs, once per instance, that its last operation failed although it has a power state:
    /// it is used as that state says (see `VmProperties::lifecycle`).
    fn report_last_operation_failed(
        &self,
        name: &str,
        properties: &model::VmProperties,
        lifecycle: Lifecycle,
    ) {
        let first = first_time(&self.reported_last_operation, name);
        if !first {
            return;
        }
        let code = properties
            .failure_code()
            .unwrap_or_else(|| "no code".to_owned());
        let power = properties.power().unwrap_or_default();
        let what = if lifecycle == Lifecycle::Stopped {
            "it may be started again (a start that fails backs off)"
        } else {
            "it serves while its health probes pass"
        };
        tracing::warn!(
            vm = %name,
            scale_set = %self.scale_set_path(),
            %code,
            %power,
            "the last operation on this instance failed (provisioningState Failed), but it is {power}: {what}. Read the instance view's statuses for the cause"
        );
    }

    /// Logs, once per instance, that it failed to come up and what to do.
    fn report_failed(&self, name: &str, why: &str) {
        let first = first_time(&self.reported_failed, name);
        if first {
            tracing::error!(
                vm = %name,
                scale_set = %self.scale_set_path(),
                "instance failed to come up ({why}): no sessions go there and it is not started; \
                 new capacity is added instead, and the instance is deleted the next time the \
                 autoscaler adds capacity, unless it may have sessions (protected from scale-in, \
                 or running in a Flexible scale set). Read the instance view's statuses for the \
                 cause"
            );
        }
    }
}

impl Provider for AzureProvider {
    fn name(&self) -> &'static str {
        "azure-vmss"
    }

    fn capabilities(&self) -> Capabilities {
        // The driver removes idle VMs by stopping them when it can, else by deleting them.
        Capabilities {
            start_stop: self.deallocate_idle,
            create_delete: true,
        }
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<ProviderVm>, ProviderError>> {
        Box::pin(self.list_any())
    }

    fn start<'a>(&'a self, vms: &'a [String]) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(self.instance_action("start", vms))
    }

    fn can_start_now(&self, vm: &str) -> bool {
        self.instance_backoff
            .check(&("start", vm.to_owned()), tokio::time::Instant::now())
            .is_ok()
    }

    fn stop<'a>(&'a self, vms: &'a [String]) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(self.instance_action("deallocate", vms))
    }

    fn create(&self, count: u32) -> BoxFuture<'_, Result<(), ProviderError>> {
        Box::pin(async move {
            let result = self.backing_off("create", self.add_capacity(count)).await;
            // The pool may grow now: instances that failed to come up make room (they count
            // toward sku.capacity and may hold cores quota). After the capacity write, so the two
            // operations do not race on the scale set; whatever the write's outcome.
            self.delete_failed().await;
            result
        })
    }

    fn delete<'a>(&'a self, vms: &'a [String]) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(self.instance_action("delete", vms))
    }

    fn protect<'a>(
        &'a self,
        vms: &'a [(String, bool)],
    ) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(self.set_protection(vms))
    }
}
