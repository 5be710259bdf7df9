//! Every mapping from the configuration file to the settings of a part, in one place. The parts
//! themselves (`ssh`, `http`, `health`, `autoscale`) never read [`Config`]: they take the plain
//! settings made here, so a reload, a test or an embedder can hand them values of its own.

use std::time::Duration;

use poolgate_config::{
    AccessLog, Affinity, BackendScheme, Config, PasswordAuth, Provider as ProviderKind,
};
use router_core::autoscale::AutoscaleConfig;
use router_core::{HealthPolicy, RoutingPolicy, VmSpec};

use crate::autoscale::DriverSettings;
use crate::autoscale::providers::exec::ExecSettings;
use crate::health::HealthSettings;
use crate::http::acme::AcmeSettings;
use crate::http::{AccessLogTo, FrontendSettings, HttpSettings, TlsFiles, TlsSource};
use crate::ssh::SshSettings;

/// `[routing]` and `[http]` as router-core's policy.
pub fn routing_policy(config: &Config) -> RoutingPolicy {
    RoutingPolicy {
        user_affinity: config.routing.affinity == Affinity::User,
        affinity_ttl: config.routing.affinity_ttl,
        http_session_idle: config.http.session_idle,
        http_tentative_for: config.http.tentative_for,
    }
}

/// The VMs of a static pool (`[[pool.backends]]`).
pub fn static_vms(config: &Config) -> Vec<VmSpec> {
    config
        .pool
        .backends
        .iter()
        .map(|b| VmSpec {
            name: b.name.clone(),
            host: b.host.clone(),
            ssh_port: b.ssh_port,
            http_port: b.http_port,
            weight: b.weight,
            max_sessions: b.max_sessions,
        })
        .collect()
}

/// `[pool.exec]` as the exec provider's settings.
pub fn exec_settings(exec: &poolgate_config::Exec) -> ExecSettings {
    ExecSettings {
        list: exec.list.clone(),
        start: exec.start.clone(),
        stop: exec.stop.clone(),
        create: exec.create.clone(),
        delete: exec.delete.clone(),
        timeout: exec.timeout,
        defaults: VmSpec {
            name: String::new(),
            host: String::new(),
            ssh_port: exec.ssh_port,
            http_port: exec.http_port,
            weight: exec.weight,
            max_sessions: exec.max_sessions,
        },
    }
}

/// `[ssh]` (and the busy-check account, which front-door logins may not use) as the SSH
/// frontend's settings.
pub fn ssh_settings(config: &Config) -> SshSettings {
    SshSettings {
        port_forwarding: config.ssh.port_forwarding,
        agent_forwarding: config.ssh.agent_forwarding,
        password_passthrough: config.ssh.password_auth == PasswordAuth::Passthrough,
        connect_timeout: config.ssh.connect_timeout,
        login_grace: config.ssh.login_grace,
        client_alive: (
            config.ssh.client_alive_interval,
            config.ssh.client_alive_count_max as usize,
        ),
        max_unauthenticated: config.ssh.max_unauthenticated as usize,
        proxy_protocol: config.listen.proxy_protocol,
        banner: config.ssh.banner.clone(),
        idle_timeout: config.ssh.idle_timeout,
        refused_users: if config.autoscale.busy_command.is_empty() {
            Vec::new()
        } else {
            vec![config.autoscale.busy_user.clone()]
        },
        pool_verbs: config
            .batch
            .as_ref()
            .filter(|b| b.verbs)
            .map(|b| b.partition.clone()),
    }
}

/// `[health]` as the checker's settings.
pub fn health_settings(config: &Config) -> HealthSettings {
    HealthSettings {
        interval: config.health.interval,
        timeout: config.health.timeout,
        policy: HealthPolicy {
            rise: config.health.rise,
            fall: config.health.fall,
        },
        ssh: config.health.ssh,
        http: config.health.http,
        // Each side is checked only when its users are served.
        serve_ssh: config.listen.serves_ssh(),
        serve_http: config.listen.serves_http(),
        http_path: config.health.http_path.clone(),
        load_metrics: config
            .health
            .load_metrics_port
            .map(|port| (port, config.health.load_metrics_path.clone())),
    }
}

/// The policy numbers of an `[autoscale]` section (the driver and the simulator use the same
/// mapping).
pub fn autoscale_policy(a: &poolgate_config::Autoscale) -> AutoscaleConfig {
    AutoscaleConfig {
        min_vms: a.min_vms,
        max_vms: a.max_vms,
        sessions_per_vm: a.sessions_per_vm,
        spare_vms: a.spare_vms,
        scale_in_after: a.scale_in_after,
        scale_to_zero_after: a.scale_to_zero_after,
        cooldown: a.cooldown,
    }
}

/// `[autoscale]` and the provider's `poll_interval` as the driver's settings.
pub fn driver_settings(config: &Config) -> DriverSettings {
    let a = &config.autoscale;
    let poll_interval = match (&config.pool.exec, &config.pool.azure) {
        (Some(exec), _) if config.pool.provider == ProviderKind::Exec => exec.poll_interval,
        (_, Some(azure)) if config.pool.provider == ProviderKind::AzureVmss => azure.poll_interval,
        _ => Duration::from_secs(30),
    };
    DriverSettings {
        enabled: a.enabled,
        policy: autoscale_policy(a),
        tick: a.tick,
        poll_interval,
        wake_on_connect: a.wake_on_connect,
        hold_connect_for: a.hold_connect_for,
        boot_estimate: a.boot_estimate,
        probe_margin: config
            .health
            .interval
            .saturating_mul(config.health.rise)
            .saturating_add(config.health.timeout),
    }
}

/// `[http]`, `[tls]` and the listeners as the HTTP side's settings. Refuses `[http]` settings
/// this gateway cannot honour (`check-config` refuses them too).
pub fn http_settings(config: &Config) -> anyhow::Result<HttpSettings> {
    let http = &config.http;
    if http.backend_scheme == BackendScheme::Https {
        // Refuse rather than silently speak plain HTTP to VMs that expect TLS.
        anyhow::bail!(
            "http.backend_scheme = \"https\" is not supported yet: the gateway reaches VMs over \
             plain HTTP on their private network; set backend_scheme = \"http\""
        );
    }
    Ok(HttpSettings {
        frontend: FrontendSettings {
            cookie_name: http.cookie_name.clone(),
            connect_timeout: http.connect_timeout,
            response_header_timeout: http.response_header_timeout,
            max_uri_bytes: http.max_uri_bytes,
            max_header_bytes: http.max_header_bytes,
            retry_after: Duration::from_secs(10),
            max_attempts: 3,
            upstream_idle: Duration::from_secs(90),
        },
        tls: tls_source(config),
        cookie_secret_file: http.cookie_secret_file.clone(),
        cookie_max_age: config.routing.affinity_ttl,
        idle_timeout: http.idle_timeout,
        max_header_bytes: http.max_header_bytes,
        session_idle: http.session_idle,
        tentative_for: http.tentative_for,
        max_connections: http.max_connections,
        proxy_protocol: config.listen.proxy_protocol,
        shutdown_grace: config.gateway.shutdown_grace,
        access_log: match &http.access_log {
            AccessLog::Stderr => AccessLogTo::Stderr,
            AccessLog::Off => AccessLogTo::Off,
            AccessLog::File(path) => AccessLogTo::File(path.clone()),
        },
    })
}

/// Where the HTTPS listener's certificate comes from: `[tls]` when `listen.https` is set (a
/// `[tls]` section without an HTTPS listener is not loaded): certificate files, or ACME.
pub fn tls_source(config: &Config) -> Option<TlsSource> {
    match (&config.tls, config.listen.https) {
        (Some(tls), Some(_)) if tls.uses_acme() => Some(TlsSource::Acme(AcmeSettings {
            domains: tls.acme_domains.clone(),
            directory: tls.acme_directory.clone(),
            email: tls.acme_email.clone(),
            cache: tls.acme_cache.clone(),
            directory_ca: tls.acme_directory_ca.clone(),
            owner: super::cluster::replica_id(config),
        })),
        (Some(tls), Some(_)) => Some(TlsSource::Files(TlsFiles {
            cert: tls.cert.clone(),
            key: tls.key.clone(),
        })),
        _ => None,
    }
}
