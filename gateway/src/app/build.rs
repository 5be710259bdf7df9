//! Building every part of the gateway from a configuration before any port is bound or task
//! spawned: keys, VM trust, pool, health checker, autoscaler, SSH and HTTP frontends, admin
//! token. A setting or file that cannot work fails here, naming its key, and `poolgate run`
//! stops with nothing listening.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use poolgate_config::{Config, Provider as ProviderKind};
use router_core::{Pool, Protocol, SystemClock};

use super::settings;
use crate::autoscale::Driver;
use crate::autoscale::providers::exec::ExecProvider;
use crate::autoscale::providers::{Provider, StaticProvider};
use crate::cluster::{Cluster, ClusterStatus, Standalone};
use crate::health::HealthChecker;
use crate::http::{HttpParts, HttpService};
use crate::metrics::Metrics;
use crate::ssh::keys::{self, UserCa};
use crate::ssh::known_hosts::HostKeyPolicy;
use crate::ssh::{SshGateway, SshGatewayParts, UserAuth};
use crate::wake::Waker;

/// The running gateway's shared parts.
#[derive(Clone)]
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
    /// Wake-on-connect as the frontends use it (the driver behind it).
    pub waker: Waker,
    /// Asks the HTTPS listener to re-read its certificate (configuration reload).
    pub tls_reload: Arc<tokio::sync::Notify>,
    /// This replica's membership of a cluster (`[cluster] store = "redis"`); `None` for one
    /// replica with its state in memory.
    pub cluster: Option<Arc<Cluster>>,
    /// The cluster as the admin API shows it (a cluster of one without `[cluster]`).
    pub cluster_status: Arc<dyn ClusterStatus>,
}

/// Everything `serve` needs, built and checked, nothing bound yet.
pub(super) struct Built {
    pub config: Config,
    pub gateway: Gateway,
    /// The HTTP frontend; `None` when no HTTP or HTTPS listener is configured.
    pub http: Option<HttpService>,
    /// The admin API's token (`admin.token_file`).
    pub admin_token: Option<String>,
}

/// Builds and runs a gateway from a configuration, with the parts an embedder may supply in
/// code instead (`poolgate demo` is one: its in-process provider, any-key user auth, a fast
/// provider poll and a message once the listeners are up).
///
/// ```no_run
/// # async fn example(config: poolgate_config::Config) -> anyhow::Result<()> {
/// gateway::app::GatewayBuilder::new(config).run().await
/// # }
/// ```
#[must_use = "a builder does nothing until `run`"]
pub struct GatewayBuilder {
    config: Config,
    config_path: Option<PathBuf>,
    provider: Option<Arc<dyn Provider>>,
    user_auth: Option<UserAuth>,
    poll_interval: Option<Duration>,
    on_ready: Option<Box<dyn FnOnce() + Send>>,
    inherited: super::handover::Inherited,
}

impl std::fmt::Debug for GatewayBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayBuilder")
            .field("config_path", &self.config_path)
            .field("provider", &self.provider.as_ref().map(|p| p.name()))
            .field("user_auth", &self.user_auth)
            .field("poll_interval", &self.poll_interval)
            .finish_non_exhaustive()
    }
}

impl GatewayBuilder {
    /// A gateway exactly as `config` describes it.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            config_path: None,
            provider: None,
            user_auth: None,
            poll_interval: None,
            on_ready: None,
            inherited: super::handover::Inherited::default(),
        }
    }

    /// Re-reads `path` on SIGHUP and applies what can change while running
    /// ([`reload`](super::reload)).
    pub fn reload_from(mut self, path: PathBuf) -> Self {
        self.config_path = Some(path);
        self
    }

    /// The provider, instead of the one `pool.provider` names.
    pub fn provider(mut self, provider: Arc<dyn Provider>) -> Self {
        self.provider = Some(provider);
        self
    }

    /// User authentication, instead of `ssh.authorized_keys`.
    pub fn user_auth(mut self, user_auth: UserAuth) -> Self {
        self.user_auth = Some(user_auth);
        self
    }

    /// Time between provider listings, instead of the provider section's `poll_interval`.
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.poll_interval = Some(every);
        self
    }

    /// Called once every listener is bound, before connections are served.
    pub fn on_ready(mut self, ready: impl FnOnce() + Send + 'static) -> Self {
        self.on_ready = Some(Box::new(ready));
        self
    }

    /// Sockets passed at start ([`Inherited::from_env`](super::Inherited::from_env)): listeners
    /// taken instead of bound, and the link to the gateway this one takes over from.
    pub fn inherit(mut self, inherited: super::handover::Inherited) -> Self {
        self.inherited = inherited;
        self
    }

    /// Builds every part, binds the listeners and serves until SIGTERM or Ctrl-C (or until a
    /// long-running task fails, which is an error).
    pub async fn run(mut self) -> anyhow::Result<()> {
        let on_ready = self.on_ready.take();
        let config_path = self.config_path.take();
        let inherited = std::mem::take(&mut self.inherited);
        let built = self.build()?;
        super::serve::serve(built, config_path, on_ready, inherited).await
    }

    fn build(self) -> anyhow::Result<Built> {
        let config = self.config;
        let gateway = build_gateway(&config, self.provider, self.user_auth, self.poll_interval)?;
        // With `listen.http = "off"` and no `listen.https`, the gateway serves SSH only.
        let http = if config.listen.serves_http() {
            Some(build_http(&config, &gateway)?)
        } else {
            None
        };
        let admin_token = match &config.admin.token_file {
            Some(path) => Some(
                crate::admin::client::read_token(path)
                    .map_err(|e| anyhow::anyhow!("admin.token_file: {e}"))?,
            ),
            None => None,
        };
        Ok(Built {
            config,
            gateway,
            http,
            admin_token,
        })
    }
}

/// Keys, VM trust, pool, health checker, autoscaler and SSH frontend.
fn build_gateway(
    config: &Config,
    provider: Option<Arc<dyn Provider>>,
    user_auth: Option<UserAuth>,
    poll_interval: Option<Duration>,
) -> anyhow::Result<Gateway> {
    let mut host_keys = Vec::new();
    // No SSH listener (`listen.ssh = "off"`): no host key to show.
    let front_door_keys = if config.listen.serves_ssh() {
        config.ssh.host_keys.as_slice()
    } else {
        &[]
    };
    for path in front_door_keys {
        let (key, generated) =
            keys::load_or_generate(path, "poolgate host key").context("ssh.host_keys")?;
        if generated {
            // Right on a first install; on a gateway users already know, a mistyped path or a
            // lost file, which users' ssh reports as "REMOTE HOST IDENTIFICATION HAS CHANGED".
            tracing::warn!(
                path = %path.display(),
                "generated a new SSH host key: users' ssh asks them to trust it on their next \
                 login. On a first start that is expected; if this gateway had a host key \
                 before, ssh.host_keys points at the wrong file (restore the old key there)"
            );
        }
        host_keys.push(key);
    }
    let ca = if config.logs_in_to_vms() {
        let ca = user_ca(config)?;
        // The demo's VMs are in this process and trust it already.
        if config.pool.provider != poolgate_config::Provider::Demo {
            tracing::info!(
                ca = %ca.public_line(),
                "VMs must trust this user CA: put the line in /etc/ssh/poolgate_user_ca.pub and add \
                 `TrustedUserCAKeys /etc/ssh/poolgate_user_ca.pub` to sshd_config"
            );
        }
        ca
    } else {
        UserCa::ephemeral(config.ssh.cert_validity).context("the in-memory user CA")?
    };
    let host_policy = host_policy(config)?;
    let record = super::cluster::record(config, &host_keys)?;
    let shared = super::cluster::store(config)?;

    let (pool, placements) = match &shared {
        Some(_) => {
            let (store, placements) = super::cluster::shared_store();
            let pool = Pool::with_store(
                settings::routing_policy(config),
                Arc::new(SystemClock),
                store,
            );
            (Arc::new(pool), Some(placements))
        }
        None => (
            Arc::new(Pool::new(
                settings::routing_policy(config),
                Arc::new(SystemClock),
            )),
            None,
        ),
    };
    let health = HealthChecker::new(pool.clone(), settings::health_settings(config));
    let metrics = Arc::new(Metrics::new());
    let provider = match provider {
        Some(provider) => provider,
        None => self::provider(config, &metrics)?,
    };
    let mut driver_settings = settings::driver_settings(config);
    if let Some(every) = poll_interval {
        driver_settings.poll_interval = every;
    }
    let driver = Driver::new(pool.clone(), provider, driver_settings, metrics.clone());
    // The frontends wake the pool through the driver without knowing it.
    let waker = Waker::new(Arc::new(driver.clone()), pool.clone());
    let cluster = shared.map(|store| {
        super::cluster::join(
            config,
            store,
            placements,
            record.clone(),
            pool.clone(),
            metrics.clone(),
            &driver,
        )
    });
    let cluster_status: Arc<dyn ClusterStatus> = match &cluster {
        Some(cluster) => cluster.clone(),
        None => Arc::new(Standalone {
            record,
            pool: pool.clone(),
        }),
    };
    let metrics_for_ssh = metrics.clone();
    let ssh = SshGateway::new(SshGatewayParts {
        host_keys,
        settings: settings::ssh_settings(config),
        user_auth: user_auth
            .unwrap_or_else(|| UserAuth::AuthorizedKeys(config.ssh.authorized_keys.clone())),
        ca,
        host_policy,
        pool: pool.clone(),
        on_vm_failure: health.failure_hook(Protocol::Ssh, "connection failed"),
        on_auth_failure: Arc::new(move |method, peer| {
            metrics_for_ssh.auth_failed(method);
            tracing::info!(%method, client = %peer, "authentication failed");
        }),
        metrics: metrics.clone(),
        wake: Some(waker.clone()),
        affinity: cluster
            .clone()
            .map(|c| c as Arc<dyn crate::placement::SharedAffinity>),
        vm_down: Some(health.ssh_down_events()),
    });
    let a = &config.autoscale;
    if a.enabled && !a.busy_command.is_empty() {
        driver.set_busy_check(Arc::new(super::busy::SshBusyCheck::new(
            ssh.clone(),
            &a.busy_user,
            &a.busy_command,
            a.busy_timeout,
        )));
    }
    // Validated with the configuration: a window that cannot be used stops the start here.
    if let Some(batch) = &config.batch
        && a.enabled
    {
        driver.set_batch(
            crate::autoscale::batch::engine(batch).map_err(|e| anyhow::anyhow!("[batch]: {e}"))?,
            batch.register_within,
        );
    }
    driver.set_schedule(
        crate::autoscale::schedule::Schedule::new(&a.schedule).context("autoscale.schedule")?,
    );
    Ok(Gateway {
        pool,
        health,
        ssh,
        metrics,
        driver,
        waker,
        tls_reload: Arc::new(tokio::sync::Notify::new()),
        cluster,
        cluster_status,
    })
}

/// The HTTP frontend: cookie signer, TLS acceptor, proxy.
fn build_http(config: &Config, gateway: &Gateway) -> anyhow::Result<HttpService> {
    HttpService::build(HttpParts {
        settings: settings::http_settings(config)?,
        pool: gateway.pool.clone(),
        metrics: gateway.metrics.clone(),
        on_vm_failure: gateway
            .health
            .failure_hook(Protocol::Http, "HTTP request failed"),
        wake: Some(gateway.waker.clone()),
        tls_reload: Some(gateway.tls_reload.clone()),
    })
    .context("cannot set up the HTTP frontend, so poolgate did not start")
}

/// The user CA (`ssh.user_ca_key`), created when missing; for operators too (`check-config`,
/// the start-up log).
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
    if let Err(e) = crate::http::TlsParts::load(
        settings::tls_source(config).as_ref(),
        crate::metrics::TlsNotAfter::default(),
    ) {
        problems.push(format!("{e:#}"));
    }
    if let Err(e) = host_policy(config) {
        problems.push(format!("{e:#}"));
    }
    // The key files that exist, loaded as `run` loads them (a missing one is generated then).
    let mut files: Vec<(&str, &std::path::Path)> = Vec::new();
    if config.listen.serves_ssh() {
        files.extend(
            config
                .ssh
                .host_keys
                .iter()
                .map(|p| ("ssh.host_keys", p.as_path())),
        );
    }
    if config.logs_in_to_vms() {
        files.push(("ssh.user_ca_key", config.ssh.user_ca_key.as_path()));
    }
    for (setting, path) in files.into_iter().filter(|(_, p)| p.exists()) {
        match keys::load(path) {
            // Not readable by whoever runs check-config (the keys are the service user's,
            // mode 0600): `run`, as that user, checks it.
            Err(keys::KeyError::File(crate::secrets::SecretFileError::Io { source, .. }))
                if source.kind() == std::io::ErrorKind::PermissionDenied => {}
            Err(e) => problems.push(format!("{setting}: {e}")),
            Ok(_) => {}
        }
    }
    problems
}

/// The provider named by `pool.provider`, exporting what it sees into `metrics`.
pub fn provider(config: &Config, metrics: &Arc<Metrics>) -> anyhow::Result<Arc<dyn Provider>> {
    Ok(match config.pool.provider {
        ProviderKind::Static => Arc::new(StaticProvider::new(settings::static_vms(config))),
        ProviderKind::Exec => {
            let exec = config
                .pool
                .exec
                .as_ref()
                .context("pool.exec: required by provider = \"exec\"")?;
            Arc::new(ExecProvider::new(settings::exec_settings(exec)))
        }
        ProviderKind::AzureVmss => {
            let azure = config
                .pool
                .azure
                .as_ref()
                .context("pool.azure: required by provider = \"azure-vmss\"")?;
            Arc::new(
                crate::autoscale::providers::azure::AzureProvider::from_config(azure)
                    .map_err(|e| anyhow::anyhow!("pool.azure: {e}"))?
                    .with_metrics(metrics.clone()),
            )
        }
        ProviderKind::Demo => {
            anyhow::bail!("pool.provider = \"demo\" is only available through `poolgate demo`")
        }
    })
}

/// The VM host-key trust from `[ssh]`; none (every VM key refused) when nothing logs in to a
/// VM over SSH (`listen.ssh = "off"` and no busy check), which then needs no file.
pub fn host_policy(config: &Config) -> anyhow::Result<HostKeyPolicy> {
    if !config.logs_in_to_vms() {
        return Ok(HostKeyPolicy::parse(""));
    }
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
