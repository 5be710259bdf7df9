//! Configuration reload (SIGHUP): what can change while sessions run is applied, the rest is
//! named as waiting for the next restart.

use std::path::Path;

use poolgate_config::Config;

use super::build::{self, Gateway};
use super::settings;

/// Re-reads the configuration file and applies what can change without dropping sessions: the
/// pool (static backends), VM host keys (known_hosts / host CA), `[health]`, `[routing]`, and the
/// TLS certificate and key (re-read now from their files). Authorized keys are read at every
/// login. Open sessions keep their VM. An invalid file changes nothing. Returns the
/// configuration it applied (the next reload compares against it).
pub async fn reload(path: &Path, running: &Config, gateway: &Gateway) -> anyhow::Result<Config> {
    let config = match poolgate_config::load(path) {
        Ok(config) => config,
        Err(poolgate_config::ConfigError::Invalid(errors)) => {
            for error in &errors {
                tracing::error!(%error, "reload: invalid configuration");
            }
            anyhow::bail!(
                "{}: {} error(s); keeping the running configuration",
                path.display(),
                errors.len()
            );
        }
        Err(other) => anyhow::bail!("{other}; keeping the running configuration"),
    };
    let policy = build::host_policy(&config)?;
    let provider = build::provider(&config, &gateway.metrics)?;
    gateway.ssh.set_host_policy(policy);
    gateway
        .health
        .set_settings(settings::health_settings(&config));
    gateway.pool.set_policy(settings::routing_policy(&config));
    if config.tls.is_some() {
        gateway.tls_reload.notify_one();
    }
    if config.pool != running.pool {
        gateway.driver.set_provider(provider);
        if let Err(e) = gateway.driver.sync().await {
            tracing::warn!(error = %e, "reload: listing the new pool failed");
        }
    }
    for section in needs_restart(running, &config) {
        tracing::warn!(
            section,
            "reload: this change takes effect at the next restart, or at once for new connections with an upgrade in place (SIGUSR2)"
        );
    }
    tracing::info!(path = %path.display(), vms = gateway.pool.snapshot().len(), "configuration reloaded");
    Ok(config)
}

/// The sections that differ between `running` and `new` but apply only at a restart.
fn needs_restart(running: &Config, new: &Config) -> Vec<&'static str> {
    [
        ("listen", new.listen != running.listen),
        (
            "ssh host keys / user CA",
            new.ssh.host_keys != running.ssh.host_keys
                || new.ssh.user_ca_key != running.ssh.user_ca_key,
        ),
        (
            "tls (file paths and ACME settings; the certificate files themselves were re-read)",
            new.tls != running.tls,
        ),
        (
            "ssh.authorized_keys (path template; the files are read at every login)",
            new.ssh.authorized_keys != running.ssh.authorized_keys,
        ),
        (
            "ssh (password_auth, port and agent forwarding, limits, timeouts, banner; the VMs' \
             host keys were re-read)",
            ssh_read_at_start(&new.ssh) != ssh_read_at_start(&running.ssh),
        ),
        (
            "http (sticky cookie, timeouts, limits) and routing.affinity_ttl as the cookie's Max-Age",
            new.http != running.http || new.routing.affinity_ttl != running.routing.affinity_ttl,
        ),
        ("gateway", new.gateway != running.gateway),
        ("admin", new.admin != running.admin),
        ("autoscale", new.autoscale != running.autoscale),
    ]
    .into_iter()
    .filter_map(|(section, changed)| changed.then_some(section))
    .collect()
}

/// The `[ssh]` keys read only when the gateway starts, apart from those named on their own
/// (host keys, user CA, the authorized_keys template) and those a reload applies (the VMs'
/// host keys: `backend_known_hosts`, `backend_host_ca`).
fn ssh_read_at_start(ssh: &poolgate_config::Ssh) -> poolgate_config::Ssh {
    poolgate_config::Ssh {
        host_keys: Vec::new(),
        authorized_keys: String::new(),
        user_ca_key: std::path::PathBuf::new(),
        backend_known_hosts: None,
        backend_host_ca: None,
        ..ssh.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_changed_sections_that_apply_at_restart_are_named() {
        let running = Config::default();
        let mut new = running.clone();
        assert!(needs_restart(&running, &new).is_empty());
        // `[health]` and `[routing]` apply at once.
        new.health.rise += 1;
        new.routing.affinity = poolgate_config::Affinity::None;
        assert!(needs_restart(&running, &new).is_empty());
        new.admin.token_file = Some("token".into());
        new.routing.affinity_ttl *= 2;
        assert_eq!(
            needs_restart(&running, &new),
            vec![
                "http (sticky cookie, timeouts, limits) and routing.affinity_ttl as the cookie's Max-Age",
                "admin"
            ]
        );
    }

    #[test]
    fn ssh_keys_read_at_start_are_named_and_the_vms_host_keys_are_not() {
        let running = Config::default();
        let mut new = running.clone();
        new.ssh.backend_known_hosts = Some("other_known_hosts".into());
        assert!(
            needs_restart(&running, &new).is_empty(),
            "applied by the reload"
        );
        for change in [
            |s: &mut poolgate_config::Ssh| s.port_forwarding = !s.port_forwarding,
            |s: &mut poolgate_config::Ssh| s.agent_forwarding = !s.agent_forwarding,
            |s: &mut poolgate_config::Ssh| s.banner = Some("maintenance at 18:00".into()),
            |s: &mut poolgate_config::Ssh| s.login_grace *= 2,
        ] {
            let mut new = running.clone();
            change(&mut new.ssh);
            let named = needs_restart(&running, &new);
            assert!(
                named.len() == 1 && named[0].starts_with("ssh (password_auth, port and agent"),
                "{named:?}"
            );
        }
    }
}
