//! The list of keys poolgate knows, and "did you mean" hints for the ones it doesn't.
//!
//! Keys are dotted paths (`ssh.password_auth`). Keys inside the items of an array of tables are
//! written with `[]` after the array (`pool.backends[].name`); arrays of plain values (such as
//! `ssh.host_keys` or `pool.exec.list`) are one key. The list is derived from the types by
//! serializing a configuration in which every optional setting is present, so it cannot drift
//! from the code.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use crate::model::{Azure, Backend, Cluster, Config, Exec, Tls};

/// Every key poolgate knows, sorted. See the module docs for the path convention.
pub fn known_keys() -> Vec<String> {
    let Ok(table) = toml::Table::try_from(fully_populated()) else {
        return Vec::new();
    };
    let mut keys = Vec::new();
    walk(&table, "", &mut keys);
    keys.sort();
    keys.dedup();
    keys
}

fn walk(table: &toml::Table, prefix: &str, out: &mut Vec<String>) {
    for (key, value) in table {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match value {
            toml::Value::Table(inner) => walk(inner, &path, out),
            toml::Value::Array(items) if items.iter().any(toml::Value::is_table) => {
                for item in items {
                    if let toml::Value::Table(inner) = item {
                        walk(inner, &format!("{path}[]"), out);
                    }
                }
            }
            _ => out.push(path),
        }
    }
}

/// A configuration with every optional section and key set, so that it serializes every key.
fn fully_populated() -> Config {
    let mut c = Config::default();
    c.listen.https = Some(([0, 0, 0, 0], 8443).into());
    c.admin.token_file = Some(PathBuf::from("keys/admin_token"));
    c.tls = Some(Tls {
        cert: "tls/cert.pem".into(),
        key: "tls/key.pem".into(),
        acme_domains: vec!["pool.example.org".into()],
        acme_email: Some("ops@example.org".into()),
        acme_directory_ca: Some(PathBuf::from("tls/acme-ca.pem")),
        ..Tls::default()
    });
    c.ssh.backend_host_ca = Some(PathBuf::from("keys/host_ca.pub"));
    c.ssh.banner = Some("welcome".into());
    c.ssh.idle_timeout = Some(Duration::from_secs(3600));
    c.health.load_metrics_port = Some(9100);
    c.batch = Some(crate::model::Batch {
        rest_url: Some("http://slurm-head:6820".into()),
        rest_token_file: Some(PathBuf::from("keys/slurm_jwt")),
        rest_user: Some("poolgate".into()),
        ..crate::model::Batch::default()
    });
    c.autoscale.schedule = vec![crate::model::ScheduleWindow {
        from: "07:30".parse().ok(),
        to: "18:00".parse().ok(),
        ..Default::default()
    }];
    c.cluster = Some(Cluster {
        redis_url: Some("redis://127.0.0.1:6379/0".into()),
        redis_password_file: Some(PathBuf::from("keys/redis_password")),
        redis_ca_file: Some(PathBuf::from("tls/redis-ca.pem")),
        replica_id: Some("gw-1".into()),
        ..Cluster::default()
    });
    c.pool.backends = vec![Backend {
        name: "dsvm-1".into(),
        host: "10.0.0.4".into(),
        ..Backend::default()
    }];
    c.pool.azure = Some(Azure {
        tenant_id: Some("t".into()),
        client_id: Some("c".into()),
        client_secret_file: Some("keys/azure_secret".into()),
        client_certificate_file: Some("keys/azure_sp.pem".into()),
        federated_token_file: Some("/var/run/secrets/azure/tokens/azure-identity-token".into()),
        authority_host: Some("https://login.example.cloud".into()),
        arm_endpoint: Some("https://management.example.cloud".into()),
        identity_endpoint: Some("http://127.0.0.1:50342/metadata/identity/oauth2/token".into()),
        ..Azure::default()
    });
    let argv = || Some(vec!["true".to_owned()]);
    c.pool.exec = Some(Exec {
        list: vec!["true".into()],
        start: argv(),
        stop: argv(),
        create: argv(),
        delete: argv(),
        ..Exec::default()
    });
    c
}

/// Every known key and every table above one, split into segments
/// (`["pool", "backends[]", "name"]`, `["pool", "backends[]"]`, `["pool"]`).
fn known_paths() -> BTreeSet<Vec<String>> {
    let mut paths = BTreeSet::new();
    for key in known_keys() {
        let segments: Vec<String> = key.split('.').map(str::to_owned).collect();
        for n in 1..=segments.len() {
            paths.insert(segments[..n].to_vec());
        }
    }
    paths
}

/// A hint for an unknown key given as segments with array indexes already written as `[]`
/// (`["pool", "backends[]", "nmae"]`): `did you mean "name"?`, or the full path when the key
/// exists in another section (`did you mean "health.interval"?`).
pub(crate) fn did_you_mean(segments: &[String]) -> Option<String> {
    let (name, parent) = segments.split_last()?;
    let name_lc = name.to_lowercase();
    let known = known_paths();
    let best = known
        .iter()
        .filter(|p| p.len() == segments.len() && p[..parent.len()] == *parent)
        .filter_map(|p| p.last())
        .map(|candidate| {
            let bare = candidate.trim_end_matches("[]");
            (strsim::jaro_winkler(&name_lc, bare), bare)
        })
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0));
    if let Some((_, candidate)) = best {
        return Some(format!("did you mean \"{candidate}\"?"));
    }
    known
        .iter()
        .filter(|p| p.last().map(|l| l.trim_end_matches("[]")) == Some(name_lc.as_str()))
        .min_by_key(|p| p.len())
        .map(|p| format!("did you mean \"{}\"?", p.join(".")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(path: &str) -> Vec<String> {
        path.split('.').map(str::to_owned).collect()
    }

    #[test]
    fn known_keys_cover_every_section() {
        let keys = known_keys();
        for key in [
            "listen.ssh",
            "listen.https",
            "gateway.shutdown_grace",
            "gateway.state_file",
            "admin.token_file",
            "tls.cert",
            "tls.acme_domains",
            "tls.acme_directory",
            "tls.acme_email",
            "tls.acme_cache",
            "tls.acme_directory_ca",
            "ssh.host_keys",
            "ssh.password_auth",
            "ssh.idle_timeout",
            "http.max_uri_bytes",
            "routing.affinity_ttl",
            "health.load_metrics_port",
            "pool.provider",
            "pool.backends[].name",
            "pool.backends[].max_sessions",
            "pool.azure.client_secret_file",
            "pool.exec.delete",
            "autoscale.boot_estimate",
            "cluster.store",
            "cluster.redis_url",
            "cluster.redis_password_file",
            "cluster.replica_id",
            "cluster.lease",
            "cluster.key_prefix",
            "batch.rest_url",
            "batch.rest_token_file",
            "batch.rest_user",
            "batch.rest_version",
        ] {
            assert!(keys.iter().any(|k| k == key), "{key} missing from {keys:?}");
        }
        assert!(!keys.iter().any(|k| k == "pool.backends"));
        let unique: BTreeSet<_> = keys.iter().collect();
        assert_eq!(unique.len(), keys.len());
    }

    #[test]
    fn hints() {
        assert_eq!(
            did_you_mean(&segs("ssh.pasword_auth")).as_deref(),
            Some("did you mean \"password_auth\"?")
        );
        assert_eq!(
            did_you_mean(&segs("pool.backends[].nmae")).as_deref(),
            Some("did you mean \"name\"?")
        );
        assert_eq!(
            did_you_mean(&segs("pool.backend")).as_deref(),
            Some("did you mean \"backends\"?")
        );
        assert_eq!(
            did_you_mean(&segs("autoscal")).as_deref(),
            Some("did you mean \"autoscale\"?")
        );
        assert_eq!(
            did_you_mean(&segs("ssh.rise")).as_deref(),
            Some("did you mean \"health.rise\"?")
        );
        assert_eq!(did_you_mean(&segs("ssh.zzzzzz")), None);
    }
}
