//! Checks of `[pool]` and `[autoscale]`.

use std::net::SocketAddr;

use super::Report;
use crate::enums::{Credential, Provider};
use crate::model::{Autoscale, Backend, Config};

/// Per-VM settings shared by backends, `[pool.azure]` and `[pool.exec]`.
fn vm_settings(r: &mut Report, prefix: &str, ssh_port: u16, http_port: u16, weight: u32, max: u32) {
    r.port(&format!("{prefix}.ssh_port"), ssh_port);
    r.port(&format!("{prefix}.http_port"), http_port);
    r.at_least_one(
        &format!("{prefix}.weight"),
        weight.into(),
        "load is divided by the weight",
    );
    max_sessions(r, prefix, max);
}

/// `{prefix}.max_sessions` must be at least 1 (also checked by `poolgate simulate`).
pub(crate) fn max_sessions(r: &mut Report, prefix: &str, max: u32) {
    r.at_least_one(
        &format!("{prefix}.max_sessions"),
        max.into(),
        "a VM that takes no sessions is useless; drain it instead",
    );
}

fn valid_vm_name(name: &str) -> bool {
    name.chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn backend(r: &mut Report, i: usize, b: &Backend, all: &[Backend]) {
    let prefix = format!("pool.backends[{i}]");
    if b.name.is_empty() {
        r.err(
            format!("{prefix}.name"),
            "missing (every backend needs a unique name, e.g. \"dsvm-1\")",
        );
    } else if !valid_vm_name(&b.name) {
        r.err(
            format!("{prefix}.name"),
            format!(
                "\"{}\" may only contain letters, digits, '.', '_' and '-'",
                b.name
            ),
        );
    } else if let Some(first) = all[..i].iter().position(|o| o.name == b.name) {
        r.err(
            format!("{prefix}.name"),
            format!(
                "duplicate VM name \"{}\" (also pool.backends[{first}])",
                b.name
            ),
        );
    }
    let host = b.host.trim();
    if host.is_empty() {
        r.err(
            format!("{prefix}.host"),
            "missing (the VM's host name or IP address)",
        );
    } else if host.contains("://") || host.contains('/') || host.contains(char::is_whitespace) {
        r.err(
            format!("{prefix}.host"),
            format!(
                "\"{}\" must be a bare host name or IP address (no scheme, path or spaces)",
                b.host
            ),
        );
    } else if host.parse::<SocketAddr>().is_ok()
        || host.rsplit_once(':').is_some_and(|(h, p)| {
            !h.contains(':') && !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit())
        })
    {
        r.err(
            format!("{prefix}.host"),
            format!(
                "\"{}\" includes a port (put it in ssh_port / http_port instead)",
                b.host
            ),
        );
    } else if let Some(first) = all[..i].iter().position(|o| {
        o.host.trim() == host && o.ssh_port == b.ssh_port && o.http_port == b.http_port
    }) {
        r.err(
            format!("{prefix}.host"),
            format!(
                "{host} with the same ports is already pool.backends[{first}] (\"{}\") (one entry per VM)",
                all[first].name
            ),
        );
    }
    vm_settings(
        r,
        &prefix,
        b.ssh_port,
        b.http_port,
        b.weight,
        b.max_sessions,
    );
}

fn argv(r: &mut Report, key: &str, command: &[String], example: &str) {
    match command.first() {
        None => r.err(
            key,
            format!("must not be empty (an argv array, e.g. {example})"),
        ),
        Some(program) if program.trim().is_empty() => r.err(
            format!("{key}[0]"),
            format!("the program to run must not be empty (e.g. {example})"),
        ),
        Some(_) => {}
    }
}

pub(super) fn pool(c: &Config, provider_known: bool, r: &mut Report) {
    let p = &c.pool;
    for (i, b) in p.backends.iter().enumerate() {
        backend(r, i, b, &p.backends);
    }
    if let Some(az) = &p.azure {
        for (key, value, what) in [
            (
                "subscription_id",
                &az.subscription_id,
                "the subscription that holds the scale set",
            ),
            (
                "resource_group",
                &az.resource_group,
                "the resource group of the scale set",
            ),
            ("scale_set", &az.scale_set, "the scale set's name"),
        ] {
            if value.trim().is_empty() {
                r.err(format!("pool.azure.{key}"), format!("must be set ({what})"));
            }
        }
        let required: &[&str] = match az.credential {
            Credential::ClientSecret => &["tenant_id", "client_id", "client_secret_file"],
            Credential::ClientCertificate => &["tenant_id", "client_id", "client_certificate_file"],
            _ => &[],
        };
        for &key in required {
            let missing = match key {
                "tenant_id" => az.tenant_id.as_deref().is_none_or(|s| s.trim().is_empty()),
                "client_id" => az.client_id.as_deref().is_none_or(|s| s.trim().is_empty()),
                "client_secret_file" => az.client_secret_file.is_none(),
                _ => az.client_certificate_file.is_none(),
            };
            if missing {
                r.err(
                    format!("pool.azure.{key}"),
                    format!(
                        "required when credential = \"{}\" (set it, or use credential = \"managed-identity\")",
                        az.credential
                    ),
                );
            }
        }
        if let Some(secret) = &az.client_secret_file {
            r.path("pool.azure.client_secret_file", secret);
        }
        if let Some(certificate) = &az.client_certificate_file {
            r.path("pool.azure.client_certificate_file", certificate);
        }
        if let Some(token) = &az.federated_token_file {
            r.path("pool.azure.federated_token_file", token);
        }
        if let Some(endpoint) = &az.arm_endpoint
            && !endpoint.starts_with("https://")
        {
            r.err(
                "pool.azure.arm_endpoint",
                format!(
                    "\"{endpoint}\" must be an https URL: ARM tokens are never sent over plain http \
                     (unset, it is the cloud's endpoint, \"{}\")",
                    az.cloud.resource_manager()
                ),
            );
        }
        if let Some(authority) = &az.authority_host
            && !authority.starts_with("https://")
        {
            r.err(
                "pool.azure.authority_host",
                format!(
                    "\"{authority}\" must be an https URL (leave it unset to use pool.azure.cloud's Entra ID authority)"
                ),
            );
        }
        if let Some(endpoint) = &az.identity_endpoint
            && !(endpoint.starts_with("https://") || endpoint.starts_with("http://"))
        {
            r.err(
                "pool.azure.identity_endpoint",
                format!(
                    "\"{endpoint}\" must be an http(s) URL (leave it unset to use the VM's instance metadata service)"
                ),
            );
        }
        if az.api_version.trim().is_empty() {
            r.err(
                "pool.azure.api_version",
                "must not be empty (the default is \"2024-07-01\")",
            );
        }
        r.positive("pool.azure.poll_interval", az.poll_interval);
        r.positive("pool.azure.start_timeout", az.start_timeout);
        vm_settings(
            r,
            "pool.azure",
            az.ssh_port,
            az.http_port,
            az.weight,
            az.max_sessions,
        );
    }
    if let Some(ex) = &p.exec {
        argv(
            r,
            "pool.exec.list",
            &ex.list,
            r#"["/usr/local/bin/pool-vms", "list"]"#,
        );
        for (name, command) in ex.optional_commands() {
            if let Some(command) = command {
                argv(
                    r,
                    &format!("pool.exec.{name}"),
                    command,
                    r#"["/usr/local/bin/pool-vms", "start"]"#,
                );
            }
        }
        for (a, b) in [("create", "delete"), ("start", "stop")] {
            let commands = ex.optional_commands();
            let has = |n: &str| commands.iter().any(|(k, v)| *k == n && v.is_some());
            if has(a) != has(b) {
                let (set, unset) = if has(a) { (a, b) } else { (b, a) };
                r.err(
                    format!("pool.exec.{unset}"),
                    format!("must be set together with pool.exec.{set} (set both, or neither)"),
                );
            }
        }
        r.positive("pool.exec.timeout", ex.timeout);
        r.positive("pool.exec.poll_interval", ex.poll_interval);
        vm_settings(
            r,
            "pool.exec",
            ex.ssh_port,
            ex.http_port,
            ex.weight,
            ex.max_sessions,
        );
    }
    if !provider_known {
        return;
    }
    let provider = p.provider;
    match provider {
        Provider::Static if p.backends.is_empty() => r.err(
            "pool.backends",
            "the static provider needs at least one [[pool.backends]] entry (add one per VM, or choose another pool.provider)",
        ),
        Provider::AzureVmss if p.azure.is_none() => r.err(
            "pool.azure",
            "provider \"azure-vmss\" needs a [pool.azure] section (with subscription_id, resource_group and scale_set)",
        ),
        Provider::Exec if p.exec.is_none() => r.err(
            "pool.exec",
            "provider \"exec\" needs a [pool.exec] section (with at least the list command)",
        ),
        _ => {}
    }
    if provider != Provider::Static && !p.backends.is_empty() {
        r.err(
            "pool.backends",
            format!(
                "[[pool.backends]] is only used by the static provider, but pool.provider is \"{provider}\" (remove the backends, or set pool.provider = \"static\")"
            ),
        );
    }
    if provider != Provider::AzureVmss && p.azure.is_some() {
        r.err(
            "pool.azure",
            format!(
                "[pool.azure] is only used by the azure-vmss provider, but pool.provider is \"{provider}\" (remove [pool.azure], or set pool.provider = \"azure-vmss\")"
            ),
        );
    }
    if provider != Provider::Exec && p.exec.is_some() {
        r.err(
            "pool.exec",
            format!(
                "[pool.exec] is only used by the exec provider, but pool.provider is \"{provider}\" (remove [pool.exec], or set pool.provider = \"exec\")"
            ),
        );
    }
}

pub(super) fn autoscale(c: &Config, provider_known: bool, r: &mut Report) {
    autoscale_policy(&c.autoscale, r);
    let a = &c.autoscale;
    if !provider_known || !a.enabled {
        return;
    }
    match c.pool.provider {
        Provider::Static => r.err(
            "autoscale.enabled",
            "the static provider cannot scale (set pool.provider to \"azure-vmss\", \"exec\" or \"demo\", or enabled = false)",
        ),
        Provider::Exec => {
            if let Some(ex) = &c.pool.exec {
                let can_create = ex.create.is_some() && ex.delete.is_some();
                let can_start = ex.start.is_some() && ex.stop.is_some();
                if !can_create && !can_start {
                    r.err(
                        "autoscale.enabled",
                        "the exec provider can only scale with pool.exec.create and pool.exec.delete, or pool.exec.start and pool.exec.stop (set them, or enabled = false)",
                    );
                }
            }
        }
        Provider::AzureVmss | Provider::Demo => {}
    }
}

/// The checks of `[autoscale]` that do not depend on the pool (also what `poolgate simulate`
/// validates).
pub(crate) fn autoscale_policy(a: &Autoscale, r: &mut Report) {
    if a.min_vms > a.max_vms {
        r.err(
            "autoscale.min_vms",
            format!(
                "{} is more than autoscale.max_vms ({}) (lower min_vms or raise max_vms)",
                a.min_vms, a.max_vms
            ),
        );
    }
    r.at_least_one(
        "autoscale.max_vms",
        a.max_vms.into(),
        "the largest pool the autoscaler may build",
    );
    r.at_least_one(
        "autoscale.sessions_per_vm",
        a.sessions_per_vm.into(),
        "the target load per VM",
    );
    r.positive("autoscale.tick", a.tick);
    r.positive("autoscale.scale_in_after", a.scale_in_after);
    if a.min_vms == 0 {
        r.positive("autoscale.scale_to_zero_after", a.scale_to_zero_after);
    }
    if a.wake_on_connect {
        r.positive("autoscale.hold_connect_for", a.hold_connect_for);
    }
    busy_check(a, r);
    schedule(a, r);
}

/// `[[autoscale.schedule]]`: each window complete, non-empty, in a known time zone, and keeping
/// a number of VMs the pool can have.
fn schedule(a: &Autoscale, r: &mut Report) {
    for (i, w) in a.schedule.iter().enumerate() {
        let key = |k: &str| format!("autoscale.schedule[{i}].{k}");
        for (k, v) in [("from", w.from), ("to", w.to)] {
            if v.is_none() {
                r.err(
                    key(k),
                    "is required: the local time the window opens (from) and closes (to), \"HH:MM\"",
                );
            }
        }
        if let (Some(from), Some(to)) = (w.from, w.to)
            && from == to
        {
            r.err(
                key("to"),
                format!(
                    "equals from ({from}): the window would be empty (for a whole day write from = \"00:00\", to = \"24:00\")"
                ),
            );
        }
        if w.days.is_empty() {
            r.err(
                key("days"),
                "lists no day (leave it out for every day, or list e.g. [\"mon\", \"fri\"])",
            );
        }
        if let Err(e) = jiff::tz::TimeZone::get(&w.time_zone) {
            r.err(
                key("time_zone"),
                format!(
                    "unknown time zone \"{}\" ({e}); use an IANA name such as \"Europe/Berlin\", \"America/New_York\" or \"UTC\"",
                    w.time_zone
                ),
            );
        }
        if w.min_vms == 0 {
            r.err(
                key("min_vms"),
                "must be at least 1 (a window that keeps no VM warm does nothing; remove it)",
            );
        } else if w.min_vms > a.max_vms {
            r.err(
                key("min_vms"),
                format!(
                    "{} is more than autoscale.max_vms ({}) (lower it or raise max_vms)",
                    w.min_vms, a.max_vms
                ),
            );
        }
    }
}

/// `autoscale.busy_*`: the command run on a VM before scale-in, and who runs it.
fn busy_check(a: &Autoscale, r: &mut Report) {
    if a.busy_command.is_empty() {
        // `[]` turns the check off: nothing else to check.
        return;
    }
    if a.busy_command[0].trim().is_empty() {
        r.err(
            "autoscale.busy_command[0]",
            "the program to run must not be empty (e.g. [\"/usr/local/lib/poolgate/busy-check\"], or [] to turn the check off)",
        );
    }
    if let Some(i) = a.busy_command.iter().position(|arg| arg.contains('\0')) {
        r.err(
            format!("autoscale.busy_command[{i}]"),
            "contains a NUL character, which cannot be passed to a command (remove it)",
        );
    }
    let user = &a.busy_user;
    let valid = !user.is_empty()
        && user.len() <= 32
        && user
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && user
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if !valid {
        r.err(
            "autoscale.busy_user",
            format!(
                "{user:?} is not a valid login name (lower-case letters, digits, '_' and '-', starting with a letter or '_', at most 32; the default is \"poolgate-probe\")"
            ),
        );
    } else if user == "root" {
        r.err(
            "autoscale.busy_user",
            "must not be root: the check runs as an unprivileged account of its own (the default is \"poolgate-probe\")",
        );
    }
    r.positive("autoscale.busy_timeout", a.busy_timeout);
}
