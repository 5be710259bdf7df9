//! Enumerated settings, written in TOML as lower-case strings.
//!
//! Each enum reads and writes exactly its listed spellings; anything else is an error that names
//! the setting and lists the accepted values, e.g.
//! `unknown provider "x" (expected one of: static, azure-vmss, exec, demo)`.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

macro_rules! string_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident ($what:literal) {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every value, in documentation order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The TOML spelling.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $text, )+
                }
            }

            /// The accepted spellings, comma separated.
            pub fn expected() -> String {
                [$($text),+].join(", ")
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $( $text => Ok($name::$variant), )+
                    other => Err(format!(
                        "unknown {} \"{}\" (expected one of: {})",
                        $what,
                        other,
                        $name::expected()
                    )),
                }
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl Visitor<'_> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        write!(f, "one of: {}", $name::expected())
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$name, E> {
                        v.parse().map_err(E::custom)
                    }
                }
                d.deserialize_any(V)
            }
        }
    };
}

string_enum! {
    /// `ssh.password_auth`: whether users may log in with a password.
    pub enum PasswordAuth ("password_auth mode") {
        /// Public keys only.
        #[default]
        Off = "off",
        /// The password is relayed to the chosen VM's sshd, which decides.
        Passthrough = "passthrough",
    }
}

string_enum! {
    /// `http.backend_scheme`: how the gateway talks to JupyterHub on the VMs.
    pub enum BackendScheme ("backend scheme") {
        /// Plain HTTP (the VM network is private).
        #[default]
        Http = "http",
        /// HTTPS to the VM.
        Https = "https",
    }
}

string_enum! {
    /// `routing.affinity`: whether a user's new sessions follow their existing ones.
    pub enum Affinity ("affinity") {
        /// New sessions go to the VM where the user already has sessions.
        #[default]
        User = "user",
        /// Always least-loaded.
        None = "none",
    }
}

string_enum! {
    /// `pool.provider`: where the pool's VMs come from.
    pub enum Provider ("provider") {
        /// A fixed list in `[[pool.backends]]`.
        #[default]
        Static = "static",
        /// An Azure VM Scale Set, via ARM (`[pool.azure]`).
        AzureVmss = "azure-vmss",
        /// Operator-supplied commands (`[pool.exec]`).
        Exec = "exec",
        /// An in-process demo pool for trying poolgate out.
        Demo = "demo",
    }
}

string_enum! {
    /// `pool.azure.credential`: how the gateway gets Azure tokens.
    pub enum Credential ("credential") {
        /// The VM's managed identity (production).
        #[default]
        ManagedIdentity = "managed-identity",
        /// A service principal: `tenant_id`, `client_id` and `client_secret_file`.
        ClientSecret = "client-secret",
        /// The logged-in Azure CLI (`az login`), for development.
        AzureCli = "azure-cli",
        /// Workload identity federation: a token file another platform writes (Kubernetes'
        /// service account token, `federated_token_file`), exchanged for an Entra token.
        WorkloadIdentity = "workload-identity",
        /// A service principal with a certificate: `tenant_id`, `client_id` and
        /// `client_certificate_file` (PEM: private key and certificate).
        ClientCertificate = "client-certificate",
    }
}

string_enum! {
    /// `pool.azure.cloud`: which Azure cloud the scale set lives in.
    pub enum AzureCloud ("Azure cloud") {
        /// Azure (global): `login.microsoftonline.com`, `management.azure.com`.
        #[default]
        Public = "public",
        /// Azure Government: `login.microsoftonline.us`, `management.usgovcloudapi.net`.
        UsGovernment = "us-government",
        /// Azure operated by 21Vianet: `login.chinacloudapi.cn`, `management.chinacloudapi.cn`.
        China = "china",
    }
}

impl AzureCloud {
    /// The cloud's Resource Manager endpoint.
    pub fn resource_manager(self) -> &'static str {
        match self {
            Self::Public => "https://management.azure.com",
            Self::UsGovernment => "https://management.usgovcloudapi.net",
            Self::China => "https://management.chinacloudapi.cn",
        }
    }
}

string_enum! {
    /// `pool.azure.orchestration`: the scale set's orchestration mode.
    pub enum Orchestration ("orchestration mode") {
        /// Uniform orchestration (instances under `virtualMachines`).
        #[default]
        Uniform = "uniform",
        /// Flexible orchestration (standalone VMs in the scale set).
        Flexible = "flexible",
    }
}

string_enum! {
    /// A day of `autoscale.schedule[].days`.
    pub enum Weekday ("day") {
        /// Monday.
        #[default]
        Mon = "mon",
        /// Tuesday.
        Tue = "tue",
        /// Wednesday.
        Wed = "wed",
        /// Thursday.
        Thu = "thu",
        /// Friday.
        Fri = "fri",
        /// Saturday.
        Sat = "sat",
        /// Sunday.
        Sun = "sun",
    }
}

impl Weekday {
    /// Days since Monday (Monday = 0, Sunday = 6).
    pub fn index(self) -> u8 {
        match self {
            Self::Mon => 0,
            Self::Tue => 1,
            Self::Wed => 2,
            Self::Thu => 3,
            Self::Fri => 4,
            Self::Sat => 5,
            Self::Sun => 6,
        }
    }
}

string_enum! {
    /// `batch.engine`: the batch scheduler on the pool VMs.
    pub enum BatchEngine ("batch engine") {
        /// Slurm (slurmctld, slurmd on the VMs; squeue, sinfo, scontrol on the gateway).
        #[default]
        Slurm = "slurm",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_roundtrip() {
        for p in Provider::ALL {
            assert_eq!(p.as_str().parse::<Provider>(), Ok(*p));
        }
        assert_eq!("azure-vmss".parse(), Ok(Provider::AzureVmss));
        assert_eq!("client-secret".parse(), Ok(Credential::ClientSecret));
        assert_eq!(PasswordAuth::default(), PasswordAuth::Off);
        assert_eq!(Affinity::None.to_string(), "none");
    }

    #[test]
    fn unknown_value_lists_choices() {
        assert_eq!(
            "x".parse::<Provider>().unwrap_err(),
            r#"unknown provider "x" (expected one of: static, azure-vmss, exec, demo)"#
        );
    }
}

string_enum! {
    /// `cluster.store`: where replicas share their state.
    pub enum StoreKind ("cluster store") {
        /// In this process only: one replica (what no `[cluster]` section means too).
        #[default]
        Memory = "memory",
        /// A Redis server (Redis 7, Valkey, Azure Managed Redis) that every replica reaches.
        Redis = "redis",
    }
}
