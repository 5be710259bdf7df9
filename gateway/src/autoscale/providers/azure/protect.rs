//! Scale-in protection of VMs with sessions (`protectionPolicy.protectFromScaleIn`), so the
//! scale set's own scale-in (an Azure autoscale setting, a capacity lowered by hand) spares them.

use hyper::Method;
use poolgate_config::Orchestration;
use serde_json::json;

use super::backoff::Backoff;
use super::{AzureProvider, FLEXIBLE_PROTECTION_API_VERSION, ProviderError};

impl AzureProvider {
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
    ///
    /// Flexible scale sets take the same write on the scale-set view of a member VM, addressed
    /// by the VM's name, from api-version 2023-09-01 on ("With Flexible orchestration mode,
    /// instance protection is only supported with API version 2023-09-01 and above": the same
    /// article; the closing of that gap is MicrosoftDocs/azure-docs pull request 118946). With an
    /// older `pool.azure.api_version` nothing is sent (said once at startup).
    pub(super) async fn set_protection(&self, vms: &[(String, bool)]) -> Result<(), ProviderError> {
        if let Ok(mut wanted) = self.protect_wanted.lock() {
            wanted.extend(vms.iter().cloned());
        }
        if !self.can_protect() {
            tracing::debug!(api_version = %self.api_version, "protectFromScaleIn needs api-version 2023-09-01 or later on a Flexible scale set; not set");
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
            let backoff =
                self.protect_backoff
                    .record(name.clone(), result.as_ref().err(), previous, now);
            if let Err(e) = result {
                let retry_in = backoff.map_or(Backoff::FIRST, |b| b.delay);
                tracing::warn!(vm = %name, ?retry_in, error = %e, "setting scale-in protection failed");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Whether instance protection can be written: always on Uniform, from api-version
    /// 2023-09-01 on Flexible.
    pub(super) fn can_protect(&self) -> bool {
        self.orchestration() == Orchestration::Uniform
            || self.api_version.get(..10).unwrap_or_default() >= FLEXIBLE_PROTECTION_API_VERSION
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
