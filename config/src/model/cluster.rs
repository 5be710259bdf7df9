//! `[cluster]`: several gateway replicas behind one address, sharing state in Redis.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::enums::StoreKind;
use crate::serde_util::duration;

/// `[cluster]`: present when several replicas share state. Absent: one process with its state in
/// memory, exactly like `store = "memory"`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Cluster {
    /// `"memory"` (one replica) or `"redis"`. Default `"memory"`.
    pub store: StoreKind,
    /// `redis://HOST:PORT/DB` or `rediss://…` (TLS). Required with `store = "redis"`; must not
    /// hold a password (use `redis_password_file`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,
    /// File holding the Redis password (mode 0600). Unset: no AUTH.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_password_file: Option<PathBuf>,
    /// PEM file of the CA(s) to trust for a `rediss://` server instead of the system's roots
    /// (a private CA). Unset: the system's trusted roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_ca_file: Option<PathBuf>,
    /// This replica's name, unique among the replicas. Default: the host name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica_id: Option<String>,
    /// How long a replica's published counts, and the autoscaler leader's lease, live without a
    /// heartbeat. Default `10s`.
    #[serde(with = "duration")]
    pub lease: Duration,
    /// Prefix of every key (the Redis hash tag): pools sharing one Redis use different
    /// prefixes. Default `"poolgate"`.
    pub key_prefix: String,
    /// How often a replica publishes its counts and reads the others'. Default `1s`.
    #[serde(with = "duration")]
    pub sync_interval: Duration,
    /// Longest wait for one store call on a login before going on without it. Default `250ms`.
    #[serde(with = "duration")]
    pub op_timeout: Duration,
    /// Other replicas' counts are forgotten when the store has been unreachable this long.
    /// Default `30s`.
    #[serde(with = "duration")]
    pub remote_stale_after: Duration,
}

impl Default for Cluster {
    fn default() -> Self {
        Self {
            store: StoreKind::Memory,
            redis_url: None,
            redis_password_file: None,
            redis_ca_file: None,
            replica_id: None,
            lease: Duration::from_secs(10),
            key_prefix: "poolgate".into(),
            sync_interval: Duration::from_secs(1),
            op_timeout: Duration::from_millis(250),
            remote_stale_after: Duration::from_secs(30),
        }
    }
}

impl Cluster {
    /// Whether state is shared with other replicas (a store outside this process).
    pub fn is_shared(&self) -> bool {
        self.store != StoreKind::Memory
    }
}
