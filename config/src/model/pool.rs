//! `[pool]`: where VMs come from.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::enums::{AzureCloud, Credential, Orchestration, Provider};
use crate::serde_util::{duration, port};

/// `[pool]`: the provider and its settings.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Pool {
    /// `static`, `azure-vmss`, `exec` or `demo`.
    pub provider: Provider,
    /// `[[pool.backends]]`: the VMs of the `static` provider.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<Backend>,
    /// `[pool.azure]`: settings of the `azure-vmss` provider.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub azure: Option<Azure>,
    /// `[pool.exec]`: settings of the `exec` provider.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exec: Option<Exec>,
}

/// One `[[pool.backends]]` entry: a VM of the static pool.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Backend {
    /// Unique VM name (letters, digits, `.`, `_`, `-`); shown in metrics and the admin API.
    pub name: String,
    /// Host name or IP address, without port.
    pub host: String,
    /// The VM's sshd port.
    #[serde(deserialize_with = "port")]
    pub ssh_port: u16,
    /// The VM's JupyterHub port.
    #[serde(deserialize_with = "port")]
    pub http_port: u16,
    /// Relative capacity: load is divided by this.
    pub weight: u32,
    /// Sessions this VM accepts at most.
    pub max_sessions: u32,
}

impl Default for Backend {
    fn default() -> Self {
        Self {
            name: String::new(),
            host: String::new(),
            ssh_port: 22,
            http_port: 8000,
            weight: 1,
            max_sessions: 10,
        }
    }
}

/// `[pool.azure]`: an Azure VM Scale Set reached through ARM.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Azure {
    /// Subscription id of the scale set.
    pub subscription_id: String,
    /// Resource group of the scale set.
    pub resource_group: String,
    /// Scale set name.
    pub scale_set: String,
    /// `managed-identity`, `client-secret`, `client-certificate`, `workload-identity` or
    /// `azure-cli`.
    pub credential: Credential,
    /// The Azure cloud: where tokens come from (Entra ID's authority) and, unless
    /// `arm_endpoint` says otherwise, which Resource Manager endpoint is called.
    pub cloud: AzureCloud,
    /// Entra ID authority for a cloud poolgate does not know by name (Azure Stack Hub, an
    /// air-gapped cloud), e.g. `https://login.example.cloud`; https only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authority_host: Option<String>,
    /// Entra tenant (required for `client-secret`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    /// Application (client) id: the service principal for `client-secret`, or a user-assigned
    /// managed identity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// File holding the client secret (required for `client-secret`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret_file: Option<PathBuf>,
    /// PEM file with the service principal's private key and its certificate (required for
    /// `client-certificate`; what `az ad sp create-for-rbac --create-cert` writes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_certificate_file: Option<PathBuf>,
    /// File another platform keeps a federated token in (`workload-identity`); unset: the
    /// `AZURE_FEDERATED_TOKEN_FILE` environment variable, as Kubernetes' workload identity
    /// webhook sets it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub federated_token_file: Option<PathBuf>,
    /// ARM base URL; unset: the cloud's Resource Manager endpoint (see [`Azure::resource_manager`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arm_endpoint: Option<String>,
    /// Managed-identity token endpoint to call instead of the VM's IMDS
    /// (`http://169.254.169.254/metadata/identity/oauth2/token`): proxies, tests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_endpoint: Option<String>,
    /// ARM `api-version` for Microsoft.Compute.
    pub api_version: String,
    /// The scale set's orchestration mode: `uniform` or `flexible`.
    pub orchestration: Orchestration,
    /// Scale in by deallocating idle instances (kept, started again on demand); `false` deletes
    /// them by exact instance id (ephemeral OS disks cannot be deallocated).
    pub deallocate_idle: bool,
    /// Time between instance listings.
    #[serde(with = "duration")]
    pub poll_interval: Duration,
    /// An instance still without a power state this long after it was first listed has failed
    /// to come up: it stops counting as starting.
    #[serde(with = "duration")]
    pub start_timeout: Duration,
    /// sshd port on every instance.
    #[serde(deserialize_with = "port")]
    pub ssh_port: u16,
    /// JupyterHub port on every instance.
    #[serde(deserialize_with = "port")]
    pub http_port: u16,
    /// Weight of every instance.
    pub weight: u32,
    /// Session cap of every instance.
    pub max_sessions: u32,
}

impl Default for Azure {
    fn default() -> Self {
        Self {
            subscription_id: String::new(),
            resource_group: String::new(),
            scale_set: String::new(),
            credential: Credential::ManagedIdentity,
            cloud: AzureCloud::Public,
            authority_host: None,
            tenant_id: None,
            client_id: None,
            client_secret_file: None,
            client_certificate_file: None,
            federated_token_file: None,
            arm_endpoint: None,
            identity_endpoint: None,
            api_version: "2024-07-01".to_owned(),
            orchestration: Orchestration::Uniform,
            deallocate_idle: true,
            poll_interval: Duration::from_secs(15),
            start_timeout: Duration::from_secs(20 * 60),
            ssh_port: 22,
            http_port: 8000,
            weight: 1,
            max_sessions: 10,
        }
    }
}

impl Azure {
    /// The Resource Manager endpoint poolgate calls: `arm_endpoint`, else the cloud's.
    pub fn resource_manager(&self) -> &str {
        self.arm_endpoint
            .as_deref()
            .unwrap_or_else(|| self.cloud.resource_manager())
    }
}

/// `[pool.exec]`: VMs listed and managed by operator commands (argv arrays, no shell).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Exec {
    /// Prints the pool's VMs.
    pub list: Vec<String>,
    /// Starts a stopped VM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start: Option<Vec<String>>,
    /// Stops (deallocates) a VM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop: Option<Vec<String>>,
    /// Creates a VM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub create: Option<Vec<String>>,
    /// Deletes a VM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delete: Option<Vec<String>>,
    /// Time one command may run before it is killed.
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// Time between runs of `list`.
    #[serde(with = "duration")]
    pub poll_interval: Duration,
    /// sshd port on every VM.
    #[serde(deserialize_with = "port")]
    pub ssh_port: u16,
    /// JupyterHub port on every VM.
    #[serde(deserialize_with = "port")]
    pub http_port: u16,
    /// Weight of every VM.
    pub weight: u32,
    /// Session cap of every VM.
    pub max_sessions: u32,
}

impl Default for Exec {
    fn default() -> Self {
        Self {
            list: Vec::new(),
            start: None,
            stop: None,
            create: None,
            delete: None,
            timeout: Duration::from_secs(60),
            poll_interval: Duration::from_secs(15),
            ssh_port: 22,
            http_port: 8000,
            weight: 1,
            max_sessions: 10,
        }
    }
}

impl Exec {
    /// The optional commands with their key names, in documentation order.
    pub fn optional_commands(&self) -> [(&'static str, Option<&Vec<String>>); 4] {
        [
            ("start", self.start.as_ref()),
            ("stop", self.stop.as_ref()),
            ("create", self.create.as_ref()),
            ("delete", self.delete.as_ref()),
        ]
    }
}
