//! The parts of ARM's JSON the provider reads. Every field is optional: a response that lacks
//! one yields a VM we skip or a state we guess conservatively, never a panic.

use std::collections::HashMap;

use router_core::Lifecycle;
use serde::Deserialize;

/// `GET {vmss}`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ScaleSet {
    pub sku: Option<Sku>,
    pub properties: ScaleSetProperties,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Sku {
    pub capacity: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ScaleSetProperties {
    pub overprovision: Option<bool>,
    #[serde(rename = "orchestrationMode")]
    pub orchestration_mode: Option<String>,
}

/// One element of `GET {vmss}/virtualMachines?$expand=instanceView` (Uniform).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Instance {
    #[serde(rename = "instanceId")]
    pub instance_id: Option<String>,
    pub name: Option<String>,
    pub id: Option<String>,
    pub properties: VmProperties,
}

/// One element of `GET …/Microsoft.Compute/virtualMachines?$filter=…&$expand=instanceView`
/// (Flexible).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct VirtualMachine {
    pub name: Option<String>,
    pub id: Option<String>,
    pub properties: VmProperties,
}

impl VirtualMachine {
    /// Whether the VM is a member of the scale set with this resource id.
    pub fn belongs_to(&self, scale_set_id: &str) -> bool {
        self.properties
            .virtual_machine_scale_set
            .as_ref()
            .and_then(|r| r.id.as_deref())
            .is_some_and(|id| id.eq_ignore_ascii_case(scale_set_id))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct VmProperties {
    #[serde(rename = "provisioningState")]
    pub provisioning_state: Option<String>,
    #[serde(rename = "instanceView")]
    pub instance_view: Option<InstanceView>,
    #[serde(rename = "protectionPolicy")]
    pub protection_policy: Option<ProtectionPolicy>,
    #[serde(rename = "virtualMachineScaleSet")]
    pub virtual_machine_scale_set: Option<SubResource>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct InstanceView {
    pub statuses: Vec<Status>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Status {
    pub code: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ProtectionPolicy {
    #[serde(rename = "protectFromScaleIn")]
    pub protect_from_scale_in: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct SubResource {
    pub id: Option<String>,
}

impl VmProperties {
    fn status(&self, prefix: &str) -> Option<String> {
        self.instance_view
            .as_ref()?
            .statuses
            .iter()
            .filter_map(|s| s.code.as_deref())
            .find_map(|code| code.strip_prefix(prefix))
            .map(str::to_ascii_lowercase)
    }

    /// The lower-case `provisioningState` (or its `ProvisioningState/*` status, without the
    /// sub-status or error code the instance view appends: `ProvisioningState/failed/
    /// InternalOperationError`, `ProvisioningState/creating/osProvisioningInProgress`, as
    /// Microsoft's "Virtual machine state information" REST article shows).
    pub fn provisioning(&self) -> String {
        self.provisioning_state
            .as_deref()
            .map(str::to_ascii_lowercase)
            .or_else(|| {
                self.status("ProvisioningState/")
                    .map(|s| s.split('/').next().unwrap_or_default().to_owned())
            })
            .unwrap_or_default()
    }

    /// The lower-case `PowerState/*` of the instance view (`running`, `deallocated`, …).
    pub fn power(&self) -> Option<String> {
        self.status("PowerState/")
    }

    /// Whether the instance view reports a `PowerState/*` at all.
    pub fn has_power_state(&self) -> bool {
        self.status("PowerState/").is_some()
    }

    /// Whether the last operation on the VM failed (`provisioningState` `Failed`).
    pub fn failed(&self) -> bool {
        self.provisioning() == "failed"
    }

    /// Whether the VM's creation failed, so that it will never serve: provisioning `Failed`
    /// with no power state, or with an OS provisioning error (`OSProvisioningTimedOut`,
    /// `OSProvisioningClientError`: the guest never finished its first boot, though Azure may
    /// call it running).
    pub fn creation_failed(&self) -> bool {
        self.failed()
            && (!self.has_power_state()
                || self
                    .failure_code()
                    .is_some_and(|code| code.starts_with("osprovisioning")))
    }

    /// The instance view's error code of a failed provisioning (`ProvisioningState/failed/
    /// AllocationFailed` gives `allocationfailed`), if it names one.
    pub fn failure_code(&self) -> Option<String> {
        self.status("ProvisioningState/failed/")
    }

    /// The VM's lifecycle from `PowerState/*` (else `provisioningState`). A running VM without
    /// a private IP yet counts as starting.
    ///
    /// `provisioningState` `Failed` says only that the last operation on the VM failed, which
    /// is routine: a start refused for want of capacity (`AllocationFailed`) leaves the VM
    /// deallocated, a failed VM extension (one Azure Policy pushes, say) leaves it running and
    /// serving. So the power state decides: a failed VM that runs serves while its health
    /// probes pass, one that is deallocated may be started again. Only a VM whose creation
    /// failed ([`VmProperties::creation_failed`]) is on its way out: no session goes there, it is
    /// not started, and the autoscaler adds capacity instead.
    pub fn lifecycle(&self, has_ip: bool) -> Lifecycle {
        let provisioning = self.provisioning();
        if provisioning == "deleting" || self.creation_failed() {
            return Lifecycle::Stopping;
        }
        match self.status("PowerState/").as_deref() {
            Some("running") if has_ip => Lifecycle::Running,
            Some("running" | "starting") => Lifecycle::Starting,
            Some("stopping" | "deallocating") => Lifecycle::Stopping,
            Some("stopped" | "deallocated") => Lifecycle::Stopped,
            // No power state yet: being created (or an unknown state): not ready for sessions.
            _ => Lifecycle::Starting,
        }
    }

    /// `protectionPolicy.protectFromScaleIn` (absent = not protected).
    pub fn protected_from_scale_in(&self) -> Option<bool> {
        Some(
            self.protection_policy
                .as_ref()
                .and_then(|p| p.protect_from_scale_in)
                .unwrap_or(false),
        )
    }
}

/// One NIC of a listing.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Nic {
    pub properties: NicProperties,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct NicProperties {
    pub primary: Option<bool>,
    #[serde(rename = "virtualMachine")]
    pub virtual_machine: Option<SubResource>,
    #[serde(rename = "ipConfigurations")]
    pub ip_configurations: Vec<IpConfiguration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct IpConfiguration {
    pub properties: IpConfigurationProperties,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct IpConfigurationProperties {
    pub primary: Option<bool>,
    #[serde(rename = "privateIPAddress")]
    pub private_ip_address: Option<String>,
}

/// Lower-cased VM resource id → private IP of its primary NIC's primary IP configuration (or
/// the first one there is).
pub fn private_ips(nics: &[Nic]) -> HashMap<String, String> {
    let mut out: HashMap<String, (bool, String)> = HashMap::new();
    for nic in nics {
        let Some(vm) = nic
            .properties
            .virtual_machine
            .as_ref()
            .and_then(|r| r.id.as_deref())
        else {
            continue;
        };
        let configs = &nic.properties.ip_configurations;
        let chosen = configs
            .iter()
            .find(|c| c.properties.primary == Some(true))
            .or_else(|| configs.first())
            .and_then(|c| c.properties.private_ip_address.clone())
            .filter(|ip| !ip.is_empty());
        let Some(ip) = chosen else { continue };
        let primary = nic.properties.primary.unwrap_or(false);
        let key = vm.to_ascii_lowercase();
        match out.get(&key) {
            Some((true, _)) => {}
            _ => {
                out.insert(key, (primary, ip));
            }
        }
    }
    out.into_iter().map(|(k, (_, ip))| (k, ip)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(provisioning: &str, power: Option<&str>) -> VmProperties {
        let mut statuses = vec![Status {
            code: Some(format!("ProvisioningState/{provisioning}")),
        }];
        if let Some(p) = power {
            statuses.push(Status {
                code: Some(format!("PowerState/{p}")),
            });
        }
        VmProperties {
            provisioning_state: Some(provisioning.to_owned()),
            instance_view: Some(InstanceView { statuses }),
            ..Default::default()
        }
    }

    #[test]
    fn power_states_map_to_lifecycles() {
        assert_eq!(
            props("Succeeded", Some("running")).lifecycle(true),
            Lifecycle::Running
        );
        assert_eq!(
            props("Succeeded", Some("running")).lifecycle(false),
            Lifecycle::Starting
        );
        assert_eq!(
            props("Updating", Some("starting")).lifecycle(true),
            Lifecycle::Starting
        );
        assert_eq!(
            props("Succeeded", Some("deallocated")).lifecycle(true),
            Lifecycle::Stopped
        );
        assert_eq!(
            props("Succeeded", Some("stopped")).lifecycle(true),
            Lifecycle::Stopped
        );
        assert_eq!(
            props("Updating", Some("deallocating")).lifecycle(true),
            Lifecycle::Stopping
        );
        assert_eq!(
            props("Deleting", Some("running")).lifecycle(true),
            Lifecycle::Stopping
        );
        assert_eq!(
            props("Creating", None).lifecycle(false),
            Lifecycle::Starting
        );
        // Provisioning failed: the last operation failed; the power state says what the VM is.
        // Only one that never got a power state (its creation failed) is on its way out.
        for (power, lifecycle) in [
            (Some("running"), Lifecycle::Running),
            (Some("deallocated"), Lifecycle::Stopped),
            (Some("stopped"), Lifecycle::Stopped),
            (Some("starting"), Lifecycle::Starting),
            (None, Lifecycle::Stopping),
        ] {
            let failed = props("Failed", power);
            assert!(failed.failed());
            assert_eq!(failed.lifecycle(true), lifecycle, "{power:?}");
        }
        assert_eq!(
            props("Failed", Some("running")).lifecycle(false),
            Lifecycle::Starting,
            "no address yet"
        );
        assert_eq!(
            VmProperties::default().lifecycle(false),
            Lifecycle::Starting
        );
    }

    #[test]
    fn a_failed_status_with_an_error_code_is_failed() {
        // The instance-view snippet of a VM whose provisioning failed, from Microsoft's REST
        // article "Virtual machine state information" (no model-view provisioningState here).
        let properties: VmProperties = serde_json::from_str(
            r#"{"instanceView": {"statuses": [
                {"code": "ProvisioningState/failed/StorageAccountSubscriptionMismatch",
                 "level": "Error", "displayStatus": "Provisioning failed",
                 "message": "Storage account contoso doesn't belong to subscription <id>",
                 "time": "2017-02-17T15:55:47.5291308+00:00"},
                {"code": "PowerState/running", "level": "Info", "displayStatus": "VM running"}
            ]}}"#,
        )
        .unwrap_or_default();
        assert_eq!(properties.provisioning(), "failed");
        assert!(properties.failed());
        assert_eq!(properties.power().as_deref(), Some("running"));
        assert_eq!(
            properties.failure_code().as_deref(),
            Some("storageaccountsubscriptionmismatch")
        );
        // It runs: it serves while its health probes pass.
        assert_eq!(properties.lifecycle(true), Lifecycle::Running);
        assert!(!properties.creation_failed());
        // The guest never finished its first boot: Azure may call it running, it never serves.
        let never_booted: VmProperties = serde_json::from_str(
            r#"{"instanceView": {"statuses": [
                {"code": "ProvisioningState/failed/OSProvisioningTimedOut", "level": "Error"},
                {"code": "PowerState/running"}]}}"#,
        )
        .unwrap_or_default();
        assert!(never_booted.creation_failed());
        assert_eq!(never_booted.lifecycle(true), Lifecycle::Stopping);
        let creating: VmProperties = serde_json::from_str(
            r#"{"instanceView": {"statuses": [
                {"code": "ProvisioningState/creating/osProvisioningInProgress"},
                {"code": "PowerState/running"}]}}"#,
        )
        .unwrap_or_default();
        assert_eq!(creating.provisioning(), "creating");
        assert!(!creating.failed());
    }

    #[test]
    fn nics_give_private_ips_by_vm_id() {
        let nics: Vec<Nic> = serde_json::from_str(
            r#"[
              {"properties":{"primary":true,"virtualMachine":{"id":"/S/VM/3"},
                "ipConfigurations":[{"properties":{"primary":false,"privateIPAddress":"10.0.1.9"}},
                                    {"properties":{"primary":true,"privateIPAddress":"10.0.0.7"}}]}},
              {"properties":{"primary":false,"virtualMachine":{"id":"/s/vm/3"},
                "ipConfigurations":[{"properties":{"privateIPAddress":"10.9.9.9"}}]}},
              {"properties":{"ipConfigurations":[{"properties":{"privateIPAddress":"10.0.0.8"}}]}},
              {"unexpected": 1}
            ]"#,
        )
        .unwrap_or_default();
        let ips = private_ips(&nics);
        assert_eq!(ips.get("/s/vm/3").map(String::as_str), Some("10.0.0.7"));
        assert_eq!(ips.len(), 1);
    }
}
