//! Joins the cluster (`[cluster]`) to the rest: the pool's affinity store, the autoscaler's
//! leadership and waiting connections, the SSH side's affinity lookup.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use poolgate_config::Config;
use russh::keys::{HashAlg, PrivateKey};
use sha2::{Digest, Sha256};

use crate::autoscale::{Driver, Leadership};
use crate::cluster::store::Placements;
use crate::cluster::{
    AutoscalerLink, Cluster, ClusterSettings, RedisStore, ReplicaRecord, SharedStore,
};

/// The shared store a configuration names, or `None` for one replica with state in memory.
pub(super) fn store(config: &Config) -> anyhow::Result<Option<RedisStore>> {
    let Some(cluster) = config.cluster.as_ref().filter(|c| c.is_shared()) else {
        return Ok(None);
    };
    let url = cluster
        .redis_url
        .as_deref()
        .context("cluster.redis_url: must be set with store = \"redis\"")?;
    let password = match &cluster.redis_password_file {
        Some(path) => {
            let bytes = crate::secrets::read(path).context("cluster.redis_password_file")?;
            let text = String::from_utf8(bytes)
                .map_err(|_| anyhow::anyhow!("cluster.redis_password_file: not UTF-8 text"))?;
            Some(text.trim_end_matches(['\r', '\n']).to_owned())
        }
        None => None,
    };
    let ca =
        match &cluster.redis_ca_file {
            Some(path) => Some(std::fs::read(path).with_context(|| {
                format!("cluster.redis_ca_file: cannot read {}", path.display())
            })?),
            None => None,
        };
    let store = RedisStore::new(
        url,
        password.as_deref(),
        ca,
        &cluster.key_prefix,
        cluster.op_timeout,
    )
    .map_err(|e| anyhow::anyhow!("cluster.redis_url: {e}"))?;
    Ok(Some(store))
}

/// This replica's id: `cluster.replica_id`, else the host name (made safe for a key).
pub fn replica_id(config: &Config) -> String {
    if let Some(id) = config.cluster.as_ref().and_then(|c| c.replica_id.clone()) {
        return id;
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    let id: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if id.is_empty() { "poolgate".into() } else { id }
}

/// What this replica tells the others: who it is and fingerprints of the secrets every replica
/// must share (never the secrets).
pub(super) fn record(config: &Config, host_keys: &[PrivateKey]) -> anyhow::Result<ReplicaRecord> {
    let host_keys = host_keys
        .iter()
        .map(|k| k.public_key().fingerprint(HashAlg::Sha256).to_string())
        .collect::<Vec<_>>()
        .join(",");
    let cookie_secret = match crate::secrets::read(&config.http.cookie_secret_file) {
        Ok(secret) => fingerprint(&secret),
        // The HTTP side reports a missing or unreadable secret itself.
        Err(_) => String::new(),
    };
    Ok(ReplicaRecord {
        id: replica_id(config),
        version: env!("CARGO_PKG_VERSION").into(),
        started_unix: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        host_keys,
        cookie_secret,
    })
}

/// `poolgate keys init DIR`: a new SSH host key, user CA key and cookie secret in `dir`, each
/// created 0600; refuses when any of them exists (it would change what clients and VMs trust).
/// Returns the paths written, in that order.
pub fn write_key_bundle(dir: &std::path::Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let host = dir.join("ssh_host_ed25519_key");
    let ca = dir.join("user_ca");
    let cookie = dir.join("cookie_secret");
    for path in [&host, &ca, &cookie] {
        if path.exists() {
            anyhow::bail!(
                "{} exists; keys init writes a new set only (move the old files away first, or keep using them)",
                path.display()
            );
        }
    }
    let (_, generated) = crate::ssh::keys::load_or_generate(&host, "poolgate host key")
        .with_context(|| format!("cannot write {}", host.display()))?;
    debug_assert!(generated);
    crate::ssh::keys::load_or_generate(&ca, "poolgate user CA")
        .with_context(|| format!("cannot write {}", ca.display()))?;
    let secret: [u8; 32] = rand::random();
    crate::secrets::write(&cookie, &secret)
        .with_context(|| format!("cannot write {}", cookie.display()))?;
    Ok(vec![host, ca, cookie])
}

/// `check-config` with a shared store: asks the store which replicas are live and whether they
/// were given the same host keys and cookie secret as this configuration. `Ok(line)` says what
/// was found (or that the store did not answer, which `run` survives); `Err` names a mismatch.
pub async fn check_peers(config: &Config) -> anyhow::Result<Option<String>> {
    let Some(store) = store(config)? else {
        return Ok(None);
    };
    let mut host_keys = Vec::new();
    for path in &config.ssh.host_keys {
        let (key, _) = crate::ssh::keys::load_or_generate(path, "poolgate host key")
            .context("ssh.host_keys")?;
        host_keys.push(key);
    }
    let me = record(config, &host_keys)?;
    let peers = match store.peers().await {
        Ok(peers) => peers,
        Err(e) => {
            return Ok(Some(format!(
                "warning: cluster: the store does not answer ({e}); `run` starts anyway and joins when it does"
            )));
        }
    };
    let others: Vec<&ReplicaRecord> = peers.iter().filter(|p| p.id != me.id).collect();
    for peer in &others {
        crate::cluster::check_same_secrets(&me, peer)?;
    }
    let names: Vec<&str> = others.iter().map(|p| p.id.as_str()).collect();
    Ok(Some(if names.is_empty() {
        format!(
            "cluster: the store answers; no other live replica (this one: {})",
            me.id
        )
    } else {
        format!(
            "cluster: the store answers; {} other live replica(s) ({}) share this replica's host keys and cookie secret (this one: {})",
            names.len(),
            names.join(", "),
            me.id
        )
    }))
}

/// A short digest that tells whether two replicas hold the same secret and nothing about it.
fn fingerprint(secret: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(b"poolgate cookie secret fingerprint v1\0");
    h.update(secret);
    data_encoding::HEXLOWER.encode(&h.finalize()[..8])
}

/// The cluster membership of this replica, joined to its autoscaler.
pub(super) fn join(
    config: &Config,
    store: RedisStore,
    placements: Option<Placements>,
    record: ReplicaRecord,
    pool: Arc<router_core::Pool>,
    metrics: Arc<crate::metrics::Metrics>,
    driver: &Arc<Driver>,
) -> Arc<Cluster> {
    let c = config.cluster.clone().unwrap_or_default();
    let cluster = Cluster::new(
        ClusterSettings {
            record,
            lease: c.lease,
            sync_interval: c.sync_interval,
            remote_stale_after: c.remote_stale_after,
            affinity_ttl: config.routing.affinity_ttl.max(Duration::from_secs(1)),
            wants_lead: config.autoscale.enabled,
        },
        store,
        placements,
        pool,
        metrics,
    );
    driver.set_leadership(Arc::new(Leads(cluster.clone())));
    cluster.set_autoscaler(Arc::new(Autoscaling(driver.clone())));
    cluster
}

/// A pool affinity store that shares placements, and the queue its writer drains.
pub(super) fn shared_store() -> (Arc<SharedStore>, Placements) {
    SharedStore::new()
}

struct Leads(Arc<Cluster>);

impl Leadership for Leads {
    fn leads(&self) -> bool {
        self.0.leads()
    }
}

struct Autoscaling(Arc<Driver>);

impl AutoscalerLink for Autoscaling {
    fn local_waiting(&self) -> (u32, u32) {
        self.0.local_waiting()
    }

    fn set_remote_waiting(&self, waiting: (u32, u32)) {
        self.0.set_remote_waiting(waiting);
    }

    fn scale_in_drains(&self) -> Vec<String> {
        self.0.scale_in_drains()
    }

    fn inherit_scale_in_drains(&self, vms: &[String]) {
        self.0.inherit_scale_in_drains(vms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_bundle_is_written_once_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        let written = write_key_bundle(&keys).unwrap();
        assert_eq!(written.len(), 3);
        for path in &written {
            let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", path.display());
        }
        assert_eq!(std::fs::read(&written[2]).unwrap().len(), 32);
        let before = std::fs::read(&written[0]).unwrap();
        let e = write_key_bundle(&keys).unwrap_err();
        assert!(e.to_string().contains("exists"), "{e}");
        assert_eq!(
            std::fs::read(&written[0]).unwrap(),
            before,
            "nothing overwritten"
        );
    }

    #[test]
    fn fingerprints_tell_secrets_apart_without_showing_them() {
        let a = fingerprint(b"0123456789abcdef0123456789abcdef");
        assert_eq!(a.len(), 16);
        assert_eq!(a, fingerprint(b"0123456789abcdef0123456789abcdef"));
        assert_ne!(a, fingerprint(b"0123456789abcdef0123456789abcdeF"));
        assert!(!a.contains("0123"));
    }
}
