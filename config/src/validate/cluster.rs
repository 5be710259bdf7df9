//! `[cluster]` rules.

use std::time::Duration;

use super::Report;
use crate::enums::StoreKind;
use crate::model::Config;
use crate::serde_util::format_duration;

/// Shortest lease: a replica must heartbeat a few times within it.
const MIN_LEASE: Duration = Duration::from_secs(2);

pub(crate) fn cluster(c: &Config, r: &mut Report) {
    let Some(cl) = &c.cluster else {
        return;
    };
    match (cl.store, &cl.redis_url) {
        (StoreKind::Redis, None) => r.err(
            "cluster.redis_url",
            "must be set with store = \"redis\" (e.g. \"redis://10.0.0.5:6379/0\", or rediss:// for TLS)",
        ),
        (StoreKind::Memory, Some(_)) => r.err(
            "cluster.redis_url",
            "is set but store = \"memory\" keeps state in this process (set store = \"redis\", or remove redis_url)",
        ),
        (_, Some(url)) => redis_url(url, r),
        (StoreKind::Memory, None) => {}
    }
    if cl.store == StoreKind::Memory && cl.redis_password_file.is_some() {
        r.err(
            "cluster.redis_password_file",
            "is set but store = \"memory\" uses no Redis (set store = \"redis\", or remove it)",
        );
    }
    if let Some(p) = &cl.redis_password_file {
        r.path("cluster.redis_password_file", p);
    }
    if let Some(p) = &cl.redis_ca_file {
        r.path("cluster.redis_ca_file", p);
        if !cl
            .redis_url
            .as_deref()
            .is_some_and(|u| u.starts_with("rediss://"))
        {
            r.err(
                "cluster.redis_ca_file",
                "is only used with a rediss:// (TLS) cluster.redis_url",
            );
        }
    }
    if let Some(id) = &cl.replica_id
        && !name_ok(id)
    {
        r.err(
            "cluster.replica_id",
            format!(
                "\"{id}\" must be 1-64 letters, digits, '-', '_' or '.' (e.g. \"gw-1\"; leave it unset to use the host name)"
            ),
        );
    }
    if !name_ok(&cl.key_prefix) {
        r.err(
            "cluster.key_prefix",
            format!(
                "\"{}\" must be 1-64 letters, digits, '-', '_' or '.' (it names every key poolgate writes)",
                cl.key_prefix
            ),
        );
    }
    if cl.lease < MIN_LEASE {
        r.err(
            "cluster.lease",
            format!(
                "{} is shorter than {} (a replica heartbeats several times per lease)",
                format_duration(cl.lease),
                format_duration(MIN_LEASE)
            ),
        );
    }
    r.positive("cluster.sync_interval", cl.sync_interval);
    if cl.sync_interval.saturating_mul(2) > cl.lease {
        r.err(
            "cluster.sync_interval",
            format!(
                "{} must be at most half of cluster.lease ({}), or replicas' counts would expire between refreshes",
                format_duration(cl.sync_interval),
                format_duration(cl.lease)
            ),
        );
    }
    r.positive("cluster.op_timeout", cl.op_timeout);
    r.positive("cluster.remote_stale_after", cl.remote_stale_after);
}

/// A Redis URL: `redis://` or `rediss://`, a host, no password in it.
fn redis_url(url: &str, r: &mut Report) {
    let Some((scheme, rest)) = url.split_once("://") else {
        r.err(
            "cluster.redis_url",
            format!("\"{url}\" is not a URL (write redis://HOST:PORT/DB or rediss://HOST:PORT/DB)"),
        );
        return;
    };
    if scheme != "redis" && scheme != "rediss" {
        r.err(
            "cluster.redis_url",
            format!("scheme \"{scheme}\" is not redis or rediss (rediss:// for TLS)"),
        );
        return;
    }
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    if let Some((userinfo, _)) = authority.rsplit_once('@')
        && userinfo.contains(':')
    {
        // Not echoed: the value is a secret.
        r.err(
            "cluster.redis_url",
            "holds a password; put the password in cluster.redis_password_file (mode 0600) instead",
        );
        return;
    }
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host.is_empty() || host.starts_with(':') {
        r.err(
            "cluster.redis_url",
            format!("\"{url}\" names no host (e.g. redis://10.0.0.5:6379/0)"),
        );
    }
}

fn name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}
