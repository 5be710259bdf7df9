//! `[batch]` rules.

use super::Report;
use crate::model::{Batch, Config};

pub(crate) fn batch(c: &Config, r: &mut Report) {
    let Some(b) = &c.batch else {
        return;
    };
    if !valid_name(&b.partition) {
        r.err(
            "batch.partition",
            format!(
                "\"{}\" is not a Slurm partition name (letters, digits, '-', '_', '.')",
                b.partition
            ),
        );
    }
    if !b.node_name.contains("{vm}") {
        r.err(
            "batch.node_name",
            format!(
                "\"{}\" must contain {{vm}} (the VM's name), e.g. \"{{vm}}\" or \"{{vm}}-batch\"",
                b.node_name
            ),
        );
    } else if !valid_name(&b.node_name.replace("{vm}", "vm")) {
        r.err(
            "batch.node_name",
            format!(
                "\"{}\" would not give Slurm node names (letters, digits, '-', '_', '.')",
                b.node_name
            ),
        );
    }
    for (key, argv) in [
        ("batch.squeue", &b.squeue),
        ("batch.sinfo", &b.sinfo),
        ("batch.scontrol", &b.scontrol),
    ] {
        if argv.first().is_none_or(|p| p.trim().is_empty()) {
            r.err(
                key,
                "must name the program to run (e.g. [\"squeue\"], or a wrapper such as [\"ssh\", \"slurm-head\", \"squeue\"])",
            );
        } else if argv.iter().any(|a| a.contains('\0')) {
            r.err(
                key,
                "contains a NUL character, which cannot be passed to a command",
            );
        }
    }
    r.positive("batch.timeout", b.timeout);
    rest(b, r);
}

/// `rest_url`, `rest_token_file`, `rest_user`, `rest_version`.
fn rest(b: &Batch, r: &mut Report) {
    match (&b.rest_url, &b.rest_token_file) {
        (Some(url), token) => {
            rest_url(url, r);
            match token {
                Some(p) => r.path("batch.rest_token_file", p),
                None => r.err(
                    "batch.rest_token_file",
                    "must be set with batch.rest_url: the file holding slurmrestd's JWT, mode 0600 (e.g. (umask 077; scontrol token username=poolgate lifespan=2592000 > /etc/poolgate/keys/slurm_jwt))",
                ),
            }
        }
        (None, Some(_)) => r.err(
            "batch.rest_token_file",
            "is only used with batch.rest_url (set it to slurmrestd's URL, or remove rest_token_file to read the queue with squeue and sinfo)",
        ),
        (None, None) => {}
    }
    if let Some(user) = &b.rest_user {
        if b.rest_url.is_none() {
            r.err(
                "batch.rest_user",
                "is only used with batch.rest_url (set it to slurmrestd's URL, or remove rest_user)",
            );
        } else if user.is_empty()
            || user.len() > 64
            || !user
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'))
        {
            r.err(
                "batch.rest_user",
                format!(
                    "\"{user}\" is not a user name (letters, digits, '-', '_', '.', '@'; the user the token was made for, or leave it unset to take it from the token)"
                ),
            );
        }
    }
    if !rest_version_ok(&b.rest_version) {
        r.err(
            "batch.rest_version",
            format!(
                "\"{}\" is not a slurmrestd OpenAPI version like \"v0.0.38\" (Slurm 22.05 serves v0.0.36 to v0.0.38; slurmrestd lists its own at /openapi/v3)",
                b.rest_version
            ),
        );
    }
}

/// `http://HOST[:PORT][/PATH]` or `https://…`, nothing after the path.
fn rest_url(url: &str, r: &mut Report) {
    const KEY: &str = "batch.rest_url";
    let Some((scheme, rest)) = url.split_once("://") else {
        r.err(
            KEY,
            format!(
                "\"{url}\" is not a URL (write http://HOST:PORT, e.g. \"http://slurm-head:6820\")"
            ),
        );
        return;
    };
    if scheme != "http" && scheme != "https" {
        r.err(
            KEY,
            format!("scheme \"{scheme}\" is not http or https (e.g. \"http://slurm-head:6820\")"),
        );
        return;
    }
    if rest.contains(['?', '#']) {
        r.err(
            KEY,
            format!("\"{url}\" has a query or fragment; give slurmrestd's base URL only (poolgate appends /slurm/VERSION/jobs)"),
        );
        return;
    }
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.contains('@') {
        r.err(
            KEY,
            "holds user information; slurmrestd is given the user in batch.rest_user and the token in batch.rest_token_file",
        );
        return;
    }
    // `host`, `host:port`, `[v6]` or `[v6]:port`.
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.starts_with('[') || h.ends_with(']') => (h, Some(p)),
        _ => (authority, None),
    };
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '[' | ']' | ':'));
    if !host_ok {
        r.err(
            KEY,
            format!("\"{url}\" names no usable host (e.g. \"http://slurm-head:6820\")"),
        );
    } else if port.is_some_and(|p| p.parse::<u16>().map_or(true, |p| p == 0)) {
        r.err(
            KEY,
            format!("\"{url}\" has no valid port (1-65535; slurmrestd often listens on 6820)"),
        );
    }
}

/// `vMAJOR.MINOR.PATCH`, digits only.
fn rest_version_ok(v: &str) -> bool {
    v.strip_prefix('v').is_some_and(|rest| {
        let parts: Vec<&str> = rest.split('.').collect();
        parts.len() == 3
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.len() <= 4 && p.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// A Slurm name: non-empty, ASCII letters, digits, `-`, `_`, `.`.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}
