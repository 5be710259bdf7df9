//! `poolgate run`: builds the gateway from a validated configuration and runs it until SIGTERM or
//! Ctrl-C.

use std::sync::Arc;

use anyhow::Context;
use std::time::Duration;

use poolgate_config::{Affinity, Config, PasswordAuth, Provider as ProviderKind};
use router_core::autoscale::AutoscaleConfig;
use router_core::{HealthPolicy, Pool, Protocol, RoutingPolicy, SystemClock, VmSpec};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::admin::AdminState;
use crate::autoscale::providers::exec::{ExecProvider, ExecSettings};
use crate::autoscale::providers::{Provider, StaticProvider};
use crate::autoscale::{Driver, DriverSettings};
use crate::health::{HealthChecker, HealthSettings};
use crate::http::{HttpParts, HttpService};
use crate::metrics::Metrics;
use crate::ssh::keys::{self, UserCa};
use crate::ssh::known_hosts::HostKeyPolicy;
use crate::ssh::{SshGateway, SshGatewayParts, SshSettings, UserAuth};

/// The running gateway's shared parts.
pub struct Gateway {
    /// The pool.
    pub pool: Arc<Pool>,
    /// Health state.
    pub health: Arc<HealthChecker>,
    /// SSH frontend.
    pub ssh: Arc<SshGateway>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Autoscaler driver (also keeps dynamic pools in sync with their provider).
    pub driver: Arc<Driver>,
    /// Asks the HTTPS listener to re-read its certificate (configuration reload).
    pub tls_reload: Arc<tokio::sync::Notify>,
}

impl Gateway {
    /// A second handle on the same parts.
    pub fn clone_parts(&self) -> Gateway {
        Gateway {
            pool: self.pool.clone(),
            health: self.health.clone(),
            ssh: self.ssh.clone(),
            metrics: self.metrics.clone(),
            driver: self.driver.clone(),
            tls_reload: self.tls_reload.clone(),
        }
    }
}

/// Maps `[routing]` and `[http]` to router-core's policy.
pub fn routing_policy(config: &Config) -> RoutingPolicy {
    RoutingPolicy {
        user_affinity: config.routing.affinity == Affinity::User,
        affinity_ttl: config.routing.affinity_ttl,
        http_session_idle: config.http.session_idle,
        http_tentative_for: config.http.tentative_for,
    }
}

/// VMs of a static pool.
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

/// The user CA's public line, for operators (`check-config`, start-up log).
pub fn user_ca(config: &Config) -> anyhow::Result<UserCa> {
    let (key, generated) = keys::load_or_generate(&config.ssh.user_ca_key, "poolgate user CA")
        .context("ssh.user_ca_key")?;
    let ca = UserCa::new(key, config.ssh.cert_validity);
    if generated {
        tracing::info!(path = %config.ssh.user_ca_key.display(), "generated a new user CA key");
    }
    Ok(ca)
}

/// What `check-config` checks beyond the file and the files it names, the way `poolgate run`
/// loads them but without writing a file or binding a port: the TLS certificate and key of
/// the HTTPS listener (a PEM chain, a supported key, the key belonging to the certificate) and
/// the VM host-key trust (`ssh.backend_known_hosts` / `ssh.backend_host_ca`). One problem a
/// line, each naming its key.
pub fn check_startup(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    if let Err(e) = crate::http::TlsParts::load(config) {
        problems.push(format!("{e:#}"));
    }
    if let Err(e) = host_policy(config) {
        problems.push(format!("{e:#}"));
    }
    problems
}

/// What a caller can supply in code instead of from the configuration (`poolgate demo`: its
/// in-process provider, any-key user auth, a fast provider poll).
#[derive(Default)]
pub struct Overrides {
    /// The provider, instead of the one `pool.provider` names.
    pub provider: Option<Arc<dyn Provider>>,
    /// User authentication, instead of `ssh.authorized_keys`.
    pub user_auth: Option<UserAuth>,
    /// Time between provider listings, instead of the provider section's `poll_interval`.
    pub poll_interval: Option<Duration>,
    /// Called once every listener is bound, before connections are served.
    pub on_ready: Option<Box<dyn FnOnce() + Send>>,
}

impl std::fmt::Debug for Overrides {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overrides")
            .field("provider", &self.provider.as_ref().map(|p| p.name()))
            .field("user_auth", &self.user_auth)
            .field("poll_interval", &self.poll_interval)
            .finish_non_exhaustive()
    }
}

/// Builds the gateway's parts (keys, pool, health, SSH frontend) from a configuration.
pub fn build(config: &Config) -> anyhow::Result<Gateway> {
    build_with(config, &Overrides::default())
}

/// [`build`], with parts supplied in code.
pub fn build_with(config: &Config, overrides: &Overrides) -> anyhow::Result<Gateway> {
    let mut host_keys = Vec::new();
    for path in &config.ssh.host_keys {
        let (key, generated) =
            keys::load_or_generate(path, "poolgate host key").context("ssh.host_keys")?;
        if generated {
            tracing::info!(path = %path.display(), "generated a new SSH host key");
        }
        host_keys.push(key);
    }
    let ca = user_ca(config)?;
    tracing::info!(
        ca = %ca.public_line(),
        "VMs must trust this user CA: put the line in /etc/ssh/poolgate_user_ca.pub and add \
         `TrustedUserCAKeys /etc/ssh/poolgate_user_ca.pub` to sshd_config"
    );
    let host_policy = host_policy(config)?;

    let pool = Arc::new(Pool::new(routing_policy(config), Arc::new(SystemClock)));

    let health = HealthChecker::new(pool.clone(), health_settings(config));
    let metrics = Arc::new(Metrics::new());
    let provider = match &overrides.provider {
        Some(provider) => provider.clone(),
        None => provider(config)?,
    };
    let mut driver_settings = driver_settings(config);
    if let Some(poll) = overrides.poll_interval {
        driver_settings.poll_interval = poll;
    }
    let driver = Driver::new(pool.clone(), provider, driver_settings, metrics.clone());
    let health_for_ssh = health.clone();
    let metrics_for_ssh = metrics.clone();
    let ssh = SshGateway::new(SshGatewayParts {
        host_keys,
        settings: SshSettings {
            port_forwarding: config.ssh.port_forwarding,
            agent_forwarding: config.ssh.agent_forwarding,
            password_passthrough: config.ssh.password_auth == PasswordAuth::Passthrough,
            connect_timeout: config.ssh.connect_timeout,
            login_grace: config.ssh.login_grace,
            max_unauthenticated: config.ssh.max_unauthenticated as usize,
            banner: config.ssh.banner.clone(),
            idle_timeout: config.ssh.idle_timeout,
            refused_users: if config.autoscale.busy_command.is_empty() {
                Vec::new()
            } else {
                vec![config.autoscale.busy_user.clone()]
            },
        },
        user_auth: overrides
            .user_auth
            .clone()
            .unwrap_or_else(|| UserAuth::AuthorizedKeys(config.ssh.authorized_keys.clone())),
        ca,
        host_policy,
        pool: pool.clone(),
        on_vm_failure: Arc::new(move |vm| {
            health_for_ssh.report_failure(vm, Protocol::Ssh, "connection failed")
        }),
        on_auth_failure: Arc::new(move |method, peer| {
            metrics_for_ssh.auth_failed(method);
            tracing::info!(%method, client = %peer, "authentication failed");
        }),
        metrics: metrics.clone(),
        wake: Some(driver.clone()),
    });
    let a = &config.autoscale;
    if a.enabled && !a.busy_command.is_empty() {
        driver.set_busy_check(Arc::new(crate::ssh::busy_check::SshBusyCheck::new(
            ssh.clone(),
            &a.busy_user,
            &a.busy_command,
            a.busy_timeout,
        )));
    }
    Ok(Gateway {
        pool,
        health,
        ssh,
        metrics,
        driver,
        tls_reload: Arc::new(tokio::sync::Notify::new()),
    })
}

/// The provider named by `pool.provider`.
pub fn provider(config: &Config) -> anyhow::Result<Arc<dyn Provider>> {
    Ok(match config.pool.provider {
        ProviderKind::Static => Arc::new(StaticProvider::new(static_vms(config))),
        ProviderKind::Exec => {
            let exec = config
                .pool
                .exec
                .as_ref()
                .context("pool.exec: required by provider = \"exec\"")?;
            Arc::new(ExecProvider::new(ExecSettings {
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
            }))
        }
        ProviderKind::AzureVmss => {
            let azure = config
                .pool
                .azure
                .as_ref()
                .context("pool.azure: required by provider = \"azure-vmss\"")?;
            Arc::new(
                crate::autoscale::providers::azure::AzureProvider::from_config(azure)
                    .map_err(|e| anyhow::anyhow!("pool.azure: {e}"))?,
            )
        }
        ProviderKind::Demo => {
            anyhow::bail!("pool.provider = \"demo\" is only available through `poolgate demo`")
        }
    })
}

/// Maps `[health]` to the checker's settings.
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
        // SSH always listens; the web side is checked only when browsers are served.
        serve_ssh: true,
        serve_http: config.listen.serves_http(),
        http_path: config.health.http_path.clone(),
        load_metrics: config
            .health
            .load_metrics_port
            .map(|port| (port, config.health.load_metrics_path.clone())),
    }
}

/// The VM host-key trust from `[ssh]`.
pub fn host_policy(config: &Config) -> anyhow::Result<HostKeyPolicy> {
    Ok(
        match (&config.ssh.backend_host_ca, &config.ssh.backend_known_hosts) {
            (Some(ca), _) => HostKeyPolicy::from_host_ca(ca).context("ssh.backend_host_ca")?,
            (None, Some(known)) => {
                HostKeyPolicy::from_known_hosts(known).context("ssh.backend_known_hosts")?
            }
            (None, None) => anyhow::bail!("ssh: set backend_known_hosts or backend_host_ca"),
        },
    )
}

/// Re-reads the configuration file and applies what can change without dropping sessions: the
/// pool (static backends), VM host keys (known_hosts / host CA), `[health]`, `[routing]`, and the
/// TLS certificate and key (re-read now from their files). Authorized keys are read at every
/// login. Open sessions keep their VM. An invalid file changes nothing.
pub async fn reload(
    path: &std::path::Path,
    running: &Config,
    gateway: &Gateway,
) -> anyhow::Result<()> {
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
    let policy = host_policy(&config)?;
    let provider = provider(&config)?;
    gateway.ssh.set_host_policy(policy);
    gateway.health.set_settings(health_settings(&config));
    gateway.pool.set_policy(routing_policy(&config));
    if config.tls.is_some() {
        gateway.tls_reload.notify_one();
    }
    if config.pool != running.pool {
        gateway.driver.set_provider(provider);
        if let Err(e) = gateway.driver.sync().await {
            tracing::warn!(error = %e, "reload: listing the new pool failed");
        }
    }
    for (what, changed) in [
        ("listen", config.listen != running.listen),
        (
            "ssh host keys / user CA",
            config.ssh.host_keys != running.ssh.host_keys
                || config.ssh.user_ca_key != running.ssh.user_ca_key,
        ),
        (
            "tls (file paths; the files themselves were re-read)",
            config.tls != running.tls,
        ),
        (
            "ssh.authorized_keys (path template; the files are read at every login)",
            config.ssh.authorized_keys != running.ssh.authorized_keys,
        ),
        (
            "http (sticky cookie, timeouts, limits) and routing.affinity_ttl as the cookie's Max-Age",
            config.http != running.http
                || config.routing.affinity_ttl != running.routing.affinity_ttl,
        ),
        ("gateway", config.gateway != running.gateway),
        ("admin", config.admin != running.admin),
        ("autoscale", config.autoscale != running.autoscale),
    ] {
        if changed {
            tracing::warn!(
                section = what,
                "reload: this change takes effect at the next restart"
            );
        }
    }
    tracing::info!(path = %path.display(), vms = gateway.pool.snapshot().len(), "configuration reloaded");
    Ok(())
}

/// The policy numbers of `[autoscale]` (the driver and the simulator use the same mapping).
pub fn autoscale_config(config: &Config) -> AutoscaleConfig {
    autoscale_policy(&config.autoscale)
}

/// The policy numbers of an `[autoscale]` section.
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

/// Maps `[autoscale]` to the driver's settings.
pub fn driver_settings(config: &Config) -> DriverSettings {
    let a = &config.autoscale;
    let poll_interval = match (&config.pool.exec, &config.pool.azure) {
        (Some(exec), _) if config.pool.provider == ProviderKind::Exec => exec.poll_interval,
        (_, Some(azure)) if config.pool.provider == ProviderKind::AzureVmss => azure.poll_interval,
        _ => Duration::from_secs(30),
    };
    DriverSettings {
        enabled: a.enabled,
        policy: autoscale_config(config),
        tick: a.tick,
        poll_interval,
        wake_on_connect: a.wake_on_connect,
        hold_connect_for: a.hold_connect_for,
        boot_estimate: a.boot_estimate,
    }
}

/// Runs the gateway until a shutdown signal.
pub async fn run(config: Config) -> anyhow::Result<()> {
    run_reloadable(config, None).await
}

/// Runs the gateway until a shutdown signal; SIGHUP re-reads `config_path` when given.
pub async fn run_reloadable(
    config: Config,
    config_path: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    serve(config, config_path, Overrides::default()).await
}

/// Runs the gateway with parts supplied in code (`poolgate demo`) until a shutdown signal.
pub async fn run_with(config: Config, overrides: Overrides) -> anyhow::Result<()> {
    serve(config, None, overrides).await
}

async fn serve(
    config: Config,
    config_path: Option<std::path::PathBuf>,
    mut overrides: Overrides,
) -> anyhow::Result<()> {
    // Every part is built before any port is bound or any task started: a setting or file that
    // cannot work stops `run` here, with nothing listening (not an SSH-only gateway).
    let gateway = build_with(&config, &overrides)?;
    let health_for_http = gateway.health.clone();
    // With `listen.http = "off"` and no `listen.https`, the gateway serves SSH only.
    let http_service = if config.listen.serves_http() {
        Some(
            HttpService::build(HttpParts {
                config: config.clone(),
                pool: gateway.pool.clone(),
                metrics: gateway.metrics.clone(),
                on_vm_failure: Arc::new(move |vm| {
                    health_for_http.report_failure(vm, Protocol::Http, "HTTP request failed")
                }),
                wake: Some(gateway.driver.clone()),
                tls_reload: Some(gateway.tls_reload.clone()),
            })
            .context("cannot set up the HTTP frontend, so poolgate did not start")?,
        )
    } else {
        None
    };
    let token = match &config.admin.token_file {
        Some(path) => Some(
            crate::admin::client::read_token(path)
                .map_err(|e| anyhow::anyhow!("admin.token_file: {e}"))?,
        ),
        None => None,
    };
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    // Know the pool before taking connections.
    if let Err(e) = gateway.driver.sync().await {
        tracing::warn!(error = %e, "initial provider listing failed; retrying in the background");
    }

    let ssh_listener = TcpListener::bind(config.listen.ssh)
        .await
        .with_context(|| format!("listen.ssh: cannot listen on {}", config.listen.ssh))?;
    let http_listener = match config.listen.http {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("listen.http: cannot listen on {addr}"))?,
        ),
        None => None,
    };
    let https_listener = match config.listen.https {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("listen.https: cannot listen on {addr}"))?,
        ),
        None => None,
    };
    let admin_listener = TcpListener::bind(config.listen.admin)
        .await
        .with_context(|| format!("listen.admin: cannot listen on {}", config.listen.admin))?;
    tracing::info!(addr = %ssh_listener.local_addr()?, "SSH listener ready");
    tracing::info!(addr = %admin_listener.local_addr()?, token = token.is_some(), "admin listener ready (/status, /metrics, /api/v1)");
    let admin_state = Arc::new(AdminState {
        pool: gateway.pool.clone(),
        health: gateway.health.clone(),
        metrics: gateway.metrics.clone(),
        token,
        autoscale: Some(gateway.driver.clone()),
    });

    // The long-running tasks: any of them ending before shutdown stops the gateway (below).
    let (ended_tx, mut ended_rx) = mpsc::unbounded_channel();
    let admin = supervised(
        "admin listener",
        &ended_tx,
        crate::admin::server::serve(admin_state, admin_listener, shutdown_rx.clone()),
    );
    let health = supervised(
        "health checker",
        &ended_tx,
        gateway.health.clone().run(shutdown_rx.clone()),
    );
    let driver = supervised(
        "autoscaler",
        &ended_tx,
        gateway.driver.clone().run(shutdown_rx.clone()),
    );
    let http = http_service.map(|service| {
        supervised(
            "HTTP frontend",
            &ended_tx,
            crate::http::serve(service, http_listener, https_listener, shutdown_rx.clone()),
        )
    });
    if http.is_none() {
        tracing::info!("no HTTP or HTTPS listener (listen.http = \"off\"): serving SSH only");
    }
    let ssh = supervised(
        "SSH frontend",
        &ended_tx,
        gateway.ssh.clone().serve(ssh_listener, shutdown_rx.clone()),
    );
    drop(ended_tx);
    if let Some(on_ready) = overrides.on_ready.take() {
        on_ready();
    }

    let reloader = config_path.map(|path| {
        let gateway = gateway.clone_parts();
        let running = config.clone();
        tokio::spawn(async move {
            let Ok(mut hup) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            else {
                return;
            };
            let mut running = running;
            while hup.recv().await.is_some() {
                tracing::info!(path = %path.display(), "SIGHUP: reloading the configuration");
                match reload(&path, &running, &gateway).await {
                    Ok(()) => {
                        if let Ok(config) = poolgate_config::load(&path) {
                            running = config;
                        }
                    }
                    Err(e) => tracing::error!("reload failed: {e:#}"),
                }
            }
        })
    });
    let failed = tokio::select! {
        () = shutdown_signal() => None,
        Some(ended) = ended_rx.recv() => Some(ended),
    };
    if let Some(ended) = &failed {
        tracing::error!(
            task = ended.task,
            "{} stopped unexpectedly: {}; stopping poolgate (open SSH sessions get \
             gateway.shutdown_grace as on SIGTERM, then it exits with status 1)",
            ended.task,
            ended.why()
        );
    }
    if let Some(task) = reloader {
        task.abort();
    }
    let grace = config.gateway.shutdown_grace;
    tracing::info!(
        open_ssh = gateway.ssh.live_connections(),
        grace = %humantime::format_duration(grace),
        "shutting down: no new connections; open sessions may run until they end or the grace time passes (signal again to stop now)"
    );
    let _ = shutdown_tx.send(true);
    let _ = ssh.await;
    let deadline = tokio::time::Instant::now() + grace;
    let forced = shutdown_signal();
    tokio::pin!(forced);
    while gateway.ssh.live_connections() > 0 && tokio::time::Instant::now() < deadline {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = &mut forced => {
                tracing::info!("second signal: closing open sessions now");
                break;
            }
        }
    }
    let left = gateway.ssh.live_connections();
    if left > 0 {
        tracing::info!(open_ssh = left, "closing the remaining sessions");
        gateway
            .ssh
            .disconnect_all("poolgate is shutting down; please reconnect in a moment")
            .await;
        // The disconnect messages are only queued: let the sessions send them and close before
        // the runtime (and every session task with it) goes away.
        let flushed = tokio::time::Instant::now() + DISCONNECT_FLUSH;
        while gateway.ssh.live_connections() > 0 && tokio::time::Instant::now() < flushed {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    if let Some(http) = http {
        let _ = http.await;
    }
    let _ = health.await;
    let _ = admin.await;
    let _ = driver.await;
    // Errors of tasks that ended during the shutdown.
    while let Ok(ended) = ended_rx.try_recv() {
        if let Err(e) = &ended.outcome {
            tracing::error!(task = ended.task, "{}: {e:#}", ended.task);
        }
    }
    match failed {
        None => Ok(()),
        Some(ended) => Err(anyhow::anyhow!(
            "the {} stopped unexpectedly ({}), so poolgate stopped; fix the cause named above \
             and start it again",
            ended.task,
            ended.why()
        )),
    }
}

/// A long-running task of `poolgate run` that ended: which, and how.
#[derive(Debug)]
struct Ended {
    task: &'static str,
    outcome: anyhow::Result<()>,
}

impl Ended {
    fn why(&self) -> String {
        match &self.outcome {
            Ok(()) => "it returned before the shutdown".to_owned(),
            Err(e) => format!("{e:#}"),
        }
    }
}

/// What a long-running task returns: `()` or a `Result`.
trait TaskOutcome: Send + 'static {
    fn into_result(self) -> anyhow::Result<()>;
}

impl TaskOutcome for () {
    fn into_result(self) -> anyhow::Result<()> {
        Ok(())
    }
}

impl TaskOutcome for anyhow::Result<()> {
    fn into_result(self) -> anyhow::Result<()> {
        self
    }
}

/// Spawns `task` and reports on `ended` when it ends, however it ends (returned, failed,
/// panicked). The returned handle completes after the report.
fn supervised<F>(
    name: &'static str,
    ended: &mpsc::UnboundedSender<Ended>,
    task: F,
) -> tokio::task::JoinHandle<()>
where
    F: std::future::Future + Send + 'static,
    F::Output: TaskOutcome,
{
    let ended = ended.clone();
    let inner = tokio::spawn(task);
    tokio::spawn(async move {
        let outcome = match inner.await {
            Ok(output) => output.into_result(),
            Err(e) if e.is_panic() => {
                let payload = e.into_panic();
                let message = payload
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".to_owned());
                Err(anyhow::anyhow!("panicked: {message}"))
            }
            Err(e) => Err(anyhow::anyhow!("{e}")),
        };
        let _ = ended.send(Ended {
            task: name,
            outcome,
        });
    })
}

/// How long the end of a graceful shutdown waits for the sessions it disconnected to close.
const DISCONNECT_FLUSH: Duration = Duration::from_secs(2);

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_way_a_task_ends_is_reported_with_its_name() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let failed = supervised("HTTP frontend", &tx, async {
            Err::<(), _>(anyhow::anyhow!("accept: too many open files"))
        });
        failed.await.unwrap();
        let ended = rx.recv().await.unwrap();
        assert_eq!(ended.task, "HTTP frontend");
        assert_eq!(ended.why(), "accept: too many open files");

        let panicked = supervised("SSH frontend", &tx, async {
            if true {
                panic!("listener state broke");
            }
        });
        panicked.await.unwrap();
        let ended = rx.recv().await.unwrap();
        assert_eq!(ended.task, "SSH frontend");
        assert_eq!(ended.why(), "panicked: listener state broke");

        let returned = supervised("health checker", &tx, async {});
        returned.await.unwrap();
        let ended = rx.recv().await.unwrap();
        assert_eq!(
            (ended.task, ended.why().as_str()),
            ("health checker", "it returned before the shutdown")
        );
        assert!(ended.outcome.is_ok());
    }

    #[test]
    fn check_startup_finds_a_tls_pair_that_does_not_match() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.ssh.backend_known_hosts = Some(dir.path().join("known_hosts"));
        std::fs::write(dir.path().join("known_hosts"), "").unwrap();
        assert_eq!(check_startup(&config), Vec::<String>::new());
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        std::fs::write(dir.path().join("cert.pem"), cert.cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), other.serialize_pem()).unwrap();
        config.tls = Some(poolgate_config::Tls {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
        });
        // [tls] without listen.https is not loaded by `run`, so not checked either.
        assert_eq!(check_startup(&config), Vec::<String>::new());
        config.listen.https = Some(([127, 0, 0, 1], 0).into());
        let problems = check_startup(&config);
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert!(
            problems[0].starts_with("tls: the key in ") && problems[0].contains("does not belong"),
            "{problems:#?}"
        );
        config.ssh.backend_known_hosts = Some(dir.path().join("missing"));
        let problems = check_startup(&config);
        assert_eq!(problems.len(), 2, "{problems:#?}");
        assert!(
            problems[1].starts_with("ssh.backend_known_hosts: "),
            "{problems:#?}"
        );
    }
}
