//! `azure-vmss`: the instances of an Azure VM Scale Set, through ARM REST.
//!
//! Calls (Microsoft.Compute `api-version` = `pool.azure.api_version`, default `2024-07-01`):
//!
//! | what | Uniform | Flexible |
//! |---|---|---|
//! | list | `GET {vmss}/virtualMachines?$expand=instanceView` | `GET {rg}/providers/Microsoft.Compute/virtualMachines?$filter=virtualMachineScaleSet/id eq '{vmss id}'&$expand=instanceView` |
//! | private IPs | `GET {vmss}/networkInterfaces?api-version=2018-10-01` | `GET {rg}/providers/Microsoft.Network/networkInterfaces?api-version=2024-05-01` |
//! | add capacity | `GET {vmss}` then `PATCH {vmss} {"sku":{"capacity":N}}` | same |
//! | start / deallocate | `POST {vmss}/start`, `…/deallocate` `{"instanceIds":[…]}` | `POST {vm}/start`, `{vm}/deallocate` per VM |
//! | delete exact VMs | `POST {vmss}/delete {"instanceIds":[…]}` | `DELETE {vm}` per VM |
//! | protect from scale-in | `PUT {vmss}/virtualMachines/{id} {"properties":{"protectionPolicy":{…}}}` | not supported (logged) |
//!
//! Capacity is only ever raised: VMs leave by being deallocated (`pool.azure.deallocate_idle`,
//! the default) or deleted by their exact instance ids, never by lowering `sku.capacity` (Azure
//! would pick the victims). A VM's pool name is the instance
//! name (`dsvm_3` in Uniform, the VM name in Flexible); calls map names back to instance ids.

pub mod arm;
mod model;
pub mod token;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Mutex;

use futures::future::BoxFuture;
use hyper::Method;
use poolgate_config::{Azure, Orchestration};
use router_core::{Lifecycle, VmSpec};
use serde_json::json;

use self::arm::{Arm, HyperClient, Tuning, encode_query, error};
use self::model::{Instance, Nic, ScaleSet, VirtualMachine};
use self::token::TokenSource;
use super::{Capabilities, Provider, ProviderError, ProviderVm};

/// `api-version` of the scale-set NIC listing (Microsoft.Compute's virtual-machine-scale-set
/// network interface API only exists in this Microsoft.Network version family).
pub const VMSS_NIC_API_VERSION: &str = "2018-10-01";
/// `api-version` of Microsoft.Network NIC listings (Flexible).
pub const NETWORK_API_VERSION: &str = "2024-05-01";

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
    orchestration: Orchestration,
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
    /// Protection writes that failed, per VM: not tried again before the deadline.
    protect_backoff: Backoffs<String>,
}

/// Writes that failed, per key (an action, a VM), each backing off until its deadline.
#[derive(Debug)]
struct Backoffs<K>(Mutex<HashMap<K, Backoff>>);

impl<K: std::hash::Hash + Eq> Backoffs<K> {
    fn new() -> Self {
        Self(Mutex::new(HashMap::new()))
    }

    /// At `now`: `Err` with the backoff still running for `key`, else `Ok` with the last
    /// (expired) one, which the next failure doubles.
    fn check(&self, key: &K, now: tokio::time::Instant) -> Result<Option<Backoff>, Backoff> {
        let previous = self.0.lock().ok().and_then(|m| m.get(key).copied());
        match previous {
            Some(b) if now < b.until => Err(b),
            _ => Ok(previous),
        }
    }

    /// Records how the write after [`Backoffs::check`] went: a success clears `key`, a failure
    /// starts its next backoff, which is returned.
    fn record(
        &self,
        key: K,
        failed: bool,
        previous: Option<Backoff>,
        now: tokio::time::Instant,
    ) -> Option<Backoff> {
        let mut map = self.0.lock().ok()?;
        if failed {
            let next = Backoff::after_failure(previous, now);
            map.insert(key, next);
            Some(next)
        } else {
            map.remove(&key);
            None
        }
    }
}

/// Exponential backoff of one action on one VM: 30 s, doubling to 30 min.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    until: tokio::time::Instant,
    delay: std::time::Duration,
}

impl Backoff {
    const FIRST: std::time::Duration = std::time::Duration::from_secs(30);
    const MAX: std::time::Duration = std::time::Duration::from_secs(30 * 60);

    /// The backoff after one more failure at `now`.
    fn after_failure(previous: Option<Self>, now: tokio::time::Instant) -> Self {
        let delay = previous.map_or(Self::FIRST, |b| (b.delay * 2).min(Self::MAX));
        Self {
            until: now + delay,
            delay,
        }
    }
}

impl std::fmt::Debug for AzureProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureProvider")
            .field("scale_set", &self.scale_set_path())
            .field("orchestration", &self.orchestration)
            .finish_non_exhaustive()
    }
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
        let tokens = TokenSource::from_config(config, http.clone())?;
        let target = format!(
            "scale set {} in resource group {} (subscription {})",
            config.scale_set, config.resource_group, config.subscription_id
        );
        Ok(Self {
            arm: Arm::new(http, tokens, &config.arm_endpoint, target, tuning),
            api_version: config.api_version.clone(),
            orchestration: config.orchestration,
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
            without_power: Mutex::new(HashMap::new()),
            action_backoff: Backoffs::new(),
            start_timeout: config.start_timeout,
        })
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
            let lifecycle = self.settle(&name, &instance.properties, !host.is_empty());
            known.insert(
                name.clone(),
                Known {
                    instance_id,
                    protected: instance.properties.protected_from_scale_in(),
                },
            );
            vms.push(ProviderVm {
                spec: self.spec(name, host),
                lifecycle,
            });
        }
        if let Ok(mut map) = self.known.lock() {
            *map = known;
        }
        Ok(vms)
    }

    async fn list_flexible(&self) -> Result<Vec<ProviderVm>, ProviderError> {
        let scale_set_id = self.scale_set_path();
        let filter = encode_query(&format!("virtualMachineScaleSet/id eq '{scale_set_id}'"));
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
            let lifecycle = self.settle(&name, &vm.properties, !host.is_empty());
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
        if let Ok(mut map) = self.known.lock() {
            *map = known;
        }
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

    async fn list_any(&self) -> Result<Vec<ProviderVm>, ProviderError> {
        match self.orchestration {
            Orchestration::Uniform => self.list_uniform().await,
            Orchestration::Flexible => self.list_flexible().await,
        }
    }

    /// `start`, `deallocate` or `delete` of exact VMs.
    async fn instance_action(
        &self,
        operation: &str,
        names: &[String],
    ) -> Result<(), ProviderError> {
        if names.is_empty() {
            return Ok(());
        }
        let ids = self.resolve(operation, names).await?;
        match self.orchestration {
            Orchestration::Uniform => {
                let body = json!({ "instanceIds": ids });
                self.arm
                    .long_running(
                        operation,
                        Method::POST,
                        &format!(
                            "{}/{operation}?api-version={}",
                            self.scale_set_path(),
                            self.api_version
                        ),
                        Some(&body),
                    )
                    .await
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
                        self.arm
                            .long_running(operation, method, &path, None)
                            .await
                            .map_err(|mut e| {
                                e.message = format!("{name}: {}", e.message);
                                e
                            })
                    }
                });
                let results = futures::future::join_all(calls).await;
                results
                    .into_iter()
                    .collect::<Result<Vec<()>, _>>()
                    .map(drop)
            }
        }
    }

    async fn add_capacity(&self, count: u32) -> Result<(), ProviderError> {
        if count == 0 {
            return Ok(());
        }
        let path = format!("{}?api-version={}", self.scale_set_path(), self.api_version);
        let scale_set: ScaleSet = self.arm.get_json("create", &path).await?;
        if scale_set.properties.overprovision == Some(true) {
            tracing::warn!(
                scale_set = %self.scale_set,
                "the scale set has overprovision on: Azure creates extra VMs and deletes some; set overprovision to false"
            );
        }
        let current = scale_set.sku.and_then(|s| s.capacity).ok_or_else(|| {
            error(
                "create",
                "the scale set has no sku.capacity; cannot add capacity",
            )
        })?;
        let target = current.saturating_add(u64::from(count));
        let body = json!({ "sku": { "capacity": target } });
        tracing::info!(scale_set = %self.scale_set, from = current, to = target, "raising scale set capacity");
        self.arm
            .long_running("create", Method::PATCH, &path, Some(&body))
            .await
    }

    /// The lifecycle of a listed instance, with two corrections to its own state: provisioning
    /// `Failed`, or no power state for longer than `pool.azure.start_timeout`, is stopping (not
    /// usable, not to be started) and reported once.
    fn settle(&self, name: &str, properties: &model::VmProperties, has_ip: bool) -> Lifecycle {
        let lifecycle = properties.lifecycle(has_ip);
        if properties.failed() {
            self.report_failed(name, "provisioning Failed");
            return lifecycle;
        }
        let now = tokio::time::Instant::now();
        let Ok(mut seen) = self.without_power.lock() else {
            return lifecycle;
        };
        if properties.has_power_state() {
            seen.remove(name);
            return lifecycle;
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
            return Lifecycle::Stopping;
        }
        lifecycle
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
                    humantime::format_duration(std::time::Duration::from_secs(
                        (b.until - now).as_secs()
                    ))
                ),
            )
        })?;
        let result = write.await;
        self.action_backoff
            .record(action, result.is_err(), previous, now);
        result
    }

    /// Logs, once per instance, that it failed to come up and what to do.
    fn report_failed(&self, name: &str, why: &str) {
        let first = self
            .reported_failed
            .lock()
            .map(|mut set| set.insert(name.to_owned()))
            .unwrap_or(false);
        if first {
            tracing::error!(
                vm = %name,
                scale_set = %self.scale_set_path(),
                "instance failed to come up ({why}): no sessions go there and it is not started; \
                 new capacity is added instead. Read the instance view's statuses for the cause, \
                 then delete or reimage the instance"
            );
        }
    }

    /// Sets `protectFromScaleIn` with the minimal body the instance-protection article documents
    /// (MicrosoftDocs/azure-docs `articles/virtual-machine-scale-sets/
    /// virtual-machine-scale-sets-instance-protection.md`, "REST API":
    /// `PUT …/virtualMachines/{instance-id}` with `{"properties":{"protectionPolicy":{…}}}`).
    /// Writing back the whole instance model instead would carry the NIC's subnet id, and ARM's
    /// linked-access check would then demand `Microsoft.Network/virtualNetworks/subnets/join/action`
    /// (403 `LinkedAuthorizationFailed`).
    ///
    /// A VM whose write failed is skipped until its backoff (30 s doubling to 30 min) ends, so a
    /// missing role or a throttled scale set costs one write per backoff, not one per tick; the
    /// failure is still returned so the caller sees it.
    async fn set_protection(&self, vms: &[(String, bool)]) -> Result<(), ProviderError> {
        if self.orchestration == Orchestration::Flexible {
            tracing::debug!("protectFromScaleIn is not set for Flexible scale sets");
            return Ok(());
        }
        let mut first_error = None;
        for (name, on) in vms {
            let current = self
                .known
                .lock()
                .ok()
                .and_then(|m| m.get(name).and_then(|k| k.protected));
            if current == Some(*on) {
                continue;
            }
            let now = tokio::time::Instant::now();
            let Ok(previous) = self.protect_backoff.check(name, now) else {
                tracing::debug!(vm = %name, "scale-in protection write backing off");
                continue;
            };
            let result = self.protect_one(name, *on).await;
            let backoff = self
                .protect_backoff
                .record(name.clone(), result.is_err(), previous, now);
            if let Err(e) = result {
                let retry_in = backoff.map_or(Backoff::FIRST, |b| b.delay);
                tracing::warn!(vm = %name, ?retry_in, error = %e, "setting scale-in protection failed");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn protect_one(&self, name: &str, on: bool) -> Result<(), ProviderError> {
        let names = [name.to_owned()];
        let ids = self.resolve("protect", &names).await?;
        let Some(id) = ids.first() else {
            return Ok(());
        };
        let path = format!(
            "{}/virtualMachines/{id}?api-version={}",
            self.scale_set_path(),
            self.api_version
        );
        let body = json!({"properties": {"protectionPolicy": {"protectFromScaleIn": on}}});
        self.arm
            .long_running("protect", Method::PUT, &path, Some(&body))
            .await?;
        if let Ok(mut map) = self.known.lock()
            && let Some(known) = map.get_mut(name)
        {
            known.protected = Some(on);
        }
        Ok(())
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

    fn stop<'a>(&'a self, vms: &'a [String]) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(self.instance_action("deallocate", vms))
    }

    fn create(&self, count: u32) -> BoxFuture<'_, Result<(), ProviderError>> {
        Box::pin(self.backing_off("create", self.add_capacity(count)))
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
