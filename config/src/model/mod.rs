//! The configuration types. Every section and key has a default, so an empty file is a valid
//! starting point (except that the default `static` provider needs at least one backend).

mod autoscale;
mod batch;
mod cluster;
mod frontend;
mod pool;

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use autoscale::{
    Autoscale, DEFAULT_BUSY_SCRIPT, ScheduleWindow, TimeOfDay, default_busy_command,
};
pub use batch::Batch;
pub use cluster::Cluster;
pub use frontend::{
    AccessLog, Admin, GatewaySection, Health, Http, LETS_ENCRYPT_DIRECTORY, Listen, Routing, Ssh,
    StateFile, Tls,
};
pub use pool::{Azure, Backend, Exec, Pool};

/// The whole poolgate configuration, one field per TOML section.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Config {
    /// `[listen]`
    pub listen: Listen,
    /// `[gateway]`
    #[serde(default = "GatewaySection::as_read")]
    pub gateway: GatewaySection,
    /// `[admin]`
    pub admin: Admin,
    /// `[tls]`: present when HTTPS is served.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
    /// `[ssh]`
    pub ssh: Ssh,
    /// `[http]`
    pub http: Http,
    /// `[routing]`
    pub routing: Routing,
    /// `[health]`
    pub health: Health,
    /// `[pool]`
    pub pool: Pool,
    /// `[autoscale]`
    pub autoscale: Autoscale,
    /// `[cluster]`: present when several replicas share state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<Cluster>,
    /// `[batch]`: present when the pool VMs run Slurm jobs too.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<Batch>,
}

impl Config {
    /// Whether the gateway logs in to VMs over SSH, so that it needs their host keys
    /// (`ssh.backend_known_hosts` / `ssh.backend_host_ca`): for its SSH front door and its
    /// probes, or for the autoscaler's busy check.
    pub fn logs_in_to_vms(&self) -> bool {
        self.listen.serves_ssh()
            || (self.autoscale.enabled && !self.autoscale.busy_command.is_empty())
    }

    /// Makes every relative path in the configuration relative to `base_dir` (the directory of
    /// the config file). Paths that are empty or start with `~` are left alone for validation
    /// to report. For `pool.exec` commands only a program written with a slash (`./list-vms`)
    /// is resolved; a bare name (`az`) is still looked up on `PATH`.
    pub fn resolve_paths(&mut self, base_dir: &Path) {
        self.resolve_paths_in(base_dir, None);
    }

    /// [`resolve_paths`](Self::resolve_paths), and a `gateway.state_file` the file does not set
    /// is placed in `state_directory` (systemd's `StateDirectory=`) when there is one, else in
    /// `base_dir`.
    pub fn resolve_paths_in(&mut self, base_dir: &Path, state_directory: Option<&Path>) {
        if let StateFile::File(p) = &mut self.gateway.state_file
            && p.as_os_str().is_empty()
        {
            *p = state_directory
                .unwrap_or(base_dir)
                .join(StateFile::DEFAULT_NAME);
        }
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() && !p.as_os_str().is_empty() && !starts_with_tilde(p) {
                *p = join(base_dir, p);
            }
        };
        if let Some(token) = &mut self.admin.token_file {
            resolve(token);
        }
        if let Some(tls) = &mut self.tls {
            resolve(&mut tls.cert);
            resolve(&mut tls.key);
            resolve(&mut tls.acme_cache);
            if let Some(ca) = &mut tls.acme_directory_ca {
                resolve(ca);
            }
        }
        self.ssh.host_keys.iter_mut().for_each(resolve);
        resolve(&mut self.ssh.user_ca_key);
        if let Some(p) = &mut self.ssh.backend_known_hosts {
            resolve(p);
        }
        if let Some(p) = &mut self.ssh.backend_host_ca {
            resolve(p);
        }
        let template = Path::new(&self.ssh.authorized_keys);
        if template.is_relative()
            && !self.ssh.authorized_keys.is_empty()
            && !starts_with_tilde(template)
            && let Some(joined) = join(base_dir, template).to_str()
        {
            self.ssh.authorized_keys = joined.to_owned();
        }
        resolve(&mut self.http.cookie_secret_file);
        if let StateFile::File(p) = &mut self.gateway.state_file {
            resolve(p);
        }
        if let AccessLog::File(p) = &mut self.http.access_log {
            resolve(p);
        }
        if let Some(c) = self.cluster.as_mut() {
            if let Some(p) = c.redis_password_file.as_mut() {
                resolve(p);
            }
            if let Some(p) = c.redis_ca_file.as_mut() {
                resolve(p);
            }
        }
        if let Some(a) = self.pool.azure.as_mut() {
            for p in [
                &mut a.client_secret_file,
                &mut a.client_certificate_file,
                &mut a.federated_token_file,
            ]
            .into_iter()
            .flatten()
            {
                resolve(p);
            }
        }
        if let Some(p) = self.batch.as_mut().and_then(|b| b.rest_token_file.as_mut()) {
            resolve(p);
        }
        if let Some(exec) = &mut self.pool.exec {
            let commands = std::iter::once(&mut exec.list).chain(
                [
                    &mut exec.start,
                    &mut exec.stop,
                    &mut exec.create,
                    &mut exec.delete,
                ]
                .into_iter()
                .flatten(),
            );
            for argv in commands {
                if let Some(program) = argv.first_mut() {
                    let path = Path::new(program.as_str());
                    if program.contains('/')
                        && path.is_relative()
                        && let Some(joined) = join(base_dir, path).to_str()
                    {
                        *program = joined.to_owned();
                    }
                }
            }
        }
    }
}

/// `base/p`, without the `.` components (`./list-vms` becomes `base/list-vms`).
fn join(base: &Path, p: &Path) -> PathBuf {
    base.join(p).components().collect()
}

/// True for `~/x` and `~user/x`, which poolgate does not expand.
pub(crate) fn starts_with_tilde(p: &Path) -> bool {
    matches!(p.components().next(), Some(Component::Normal(first)) if first.to_string_lossy().starts_with('~'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enums::{Affinity, BackendScheme, Credential, PasswordAuth, Provider};
    use std::net::SocketAddr;
    use std::time::Duration;

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::default();
        assert_eq!(
            c.listen.ssh,
            Some("0.0.0.0:2222".parse::<SocketAddr>().unwrap())
        );
        assert_eq!(
            c.listen.http,
            Some("0.0.0.0:8080".parse::<SocketAddr>().unwrap())
        );
        assert_eq!(c.listen.https, None);
        assert_eq!(
            c.listen.admin,
            "127.0.0.1:9090".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(c.gateway.shutdown_grace, Duration::from_secs(600));
        assert_eq!(c.admin.token_file, None);
        assert_eq!(c.tls, None);
        assert_eq!(
            c.ssh.host_keys,
            vec![PathBuf::from("keys/ssh_host_ed25519_key")]
        );
        assert_eq!(c.ssh.authorized_keys, "/home/{user}/.ssh/authorized_keys");
        assert_eq!(c.ssh.user_ca_key, PathBuf::from("keys/user_ca"));
        assert_eq!(
            c.ssh.backend_known_hosts,
            Some(PathBuf::from("keys/backend_known_hosts"))
        );
        assert_eq!(c.ssh.backend_host_ca, None);
        assert_eq!(c.ssh.password_auth, PasswordAuth::Off);
        assert!(c.ssh.port_forwarding && c.ssh.agent_forwarding);
        assert_eq!(c.ssh.max_unauthenticated, 256);
        assert_eq!(c.ssh.login_grace, Duration::from_secs(30));
        assert_eq!(c.ssh.cert_validity, Duration::from_secs(300));
        assert_eq!(c.ssh.connect_timeout, Duration::from_secs(10));
        assert_eq!((c.ssh.banner.as_deref(), c.ssh.idle_timeout), (None, None));
        assert_eq!(c.http.cookie_name, "poolgate_vm");
        assert_eq!(
            c.http.cookie_secret_file,
            PathBuf::from("keys/cookie_secret")
        );
        assert_eq!(c.http.session_idle, Duration::from_secs(1800));
        assert_eq!(c.http.backend_scheme, BackendScheme::Http);
        assert_eq!(c.http.connect_timeout, Duration::from_secs(10));
        assert_eq!(c.http.response_header_timeout, Duration::from_secs(60));
        assert_eq!(c.http.idle_timeout, Duration::from_secs(300));
        assert_eq!(
            (c.http.max_header_bytes, c.http.max_uri_bytes),
            (65536, 8192)
        );
        assert_eq!(c.http.max_connections, 16384);
        assert_eq!(c.routing.affinity, Affinity::User);
        assert_eq!(c.routing.affinity_ttl, Duration::from_secs(12 * 3600));
        assert_eq!(c.health.interval, Duration::from_secs(5));
        assert_eq!(c.health.timeout, Duration::from_secs(2));
        assert_eq!((c.health.rise, c.health.fall), (2, 3));
        assert_eq!(c.health.http_path, "/hub/health");
        assert!(c.health.ssh && c.health.http);
        assert_eq!(c.health.load_metrics_port, None);
        assert_eq!(c.health.load_metrics_path, "/metrics");
        assert_eq!(c.pool.provider, Provider::Static);
        assert!(c.pool.backends.is_empty() && c.pool.azure.is_none() && c.pool.exec.is_none());
        let a = &c.autoscale;
        assert!(!a.enabled);
        assert_eq!(
            (a.min_vms, a.max_vms, a.sessions_per_vm, a.spare_vms),
            (0, 10, 4, 1)
        );
        assert_eq!(a.scale_in_after, Duration::from_secs(900));
        assert_eq!(a.scale_to_zero_after, Duration::from_secs(1800));
        assert!(a.wake_on_connect);
        assert_eq!(a.hold_connect_for, Duration::from_secs(300));
        assert_eq!(a.tick, Duration::from_secs(10));
        assert_eq!(a.cooldown, Duration::from_secs(120));
        assert_eq!(a.boot_estimate, Duration::from_secs(90));
        assert_eq!(a.busy_command, default_busy_command());
        assert_eq!(a.busy_command[..2], ["/bin/sh", "-c"]);
        assert_eq!(a.busy_user, "poolgate-probe");
        assert_eq!(a.busy_timeout, Duration::from_secs(20));

        let b = Backend::default();
        assert_eq!(
            (b.ssh_port, b.http_port, b.weight, b.max_sessions),
            (22, 8000, 1, 10)
        );
        let az = Azure::default();
        assert_eq!(az.credential, Credential::ManagedIdentity);
        assert_eq!(az.resource_manager(), "https://management.azure.com");
        let gov = Azure {
            cloud: crate::AzureCloud::UsGovernment,
            ..Azure::default()
        };
        assert_eq!(
            gov.resource_manager(),
            "https://management.usgovcloudapi.net"
        );
        assert_eq!(az.api_version, "2024-07-01");
        assert_eq!(az.poll_interval, Duration::from_secs(15));
        assert_eq!(
            (az.ssh_port, az.http_port, az.weight, az.max_sessions),
            (22, 8000, 1, 10)
        );
        let ex = Exec::default();
        assert_eq!(ex.timeout, Duration::from_secs(60));
        assert_eq!(ex.poll_interval, Duration::from_secs(15));
        assert_eq!(
            (ex.ssh_port, ex.http_port, ex.weight, ex.max_sessions),
            (22, 8000, 1, 10)
        );
    }

    #[test]
    fn empty_toml_is_the_default_config() {
        // Once placed: the default state file read from a file is placed when its paths are.
        let mut c: Config = toml::from_str("").unwrap();
        c.resolve_paths(Path::new("/srv/pg"));
        let mut default = Config::default();
        default.resolve_paths(Path::new("/srv/pg"));
        assert_eq!(c, default);
    }

    #[test]
    fn serializes_durations_as_human_strings_and_roundtrips() {
        let mut c = Config::default();
        c.ssh.idle_timeout = Some(Duration::from_secs(90));
        c.tls = Some(Tls {
            cert: "tls/cert.pem".into(),
            key: "tls/key.pem".into(),
            ..Tls::default()
        });
        let text = toml::to_string(&c).unwrap();
        assert!(text.contains("shutdown_grace = \"10m\""), "{text}");
        assert!(text.contains("idle_timeout = \"1m 30s\""), "{text}");
        assert!(text.contains("affinity_ttl = \"12h\""), "{text}");
        let back: Config = toml::from_str(&text).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn resolves_relative_paths_against_the_config_dir() {
        let mut c = Config::default();
        c.admin.token_file = Some("/etc/poolgate/token".into());
        c.ssh.authorized_keys = "users/{user}.keys".into();
        c.pool.exec = Some(Exec {
            list: vec!["./list-vms".into(), "--json".into()],
            start: Some(vec!["az".into(), "vm".into(), "start".into()]),
            ..Exec::default()
        });
        c.resolve_paths(Path::new("/srv/pg"));
        assert_eq!(
            c.ssh.host_keys,
            vec![PathBuf::from("/srv/pg/keys/ssh_host_ed25519_key")]
        );
        assert_eq!(c.ssh.user_ca_key, PathBuf::from("/srv/pg/keys/user_ca"));
        assert_eq!(
            c.admin.token_file,
            Some(PathBuf::from("/etc/poolgate/token"))
        );
        assert_eq!(c.ssh.authorized_keys, "/srv/pg/users/{user}.keys");
        let exec = c.pool.exec.unwrap();
        assert_eq!(exec.list, vec!["/srv/pg/list-vms", "--json"]);
        assert_eq!(exec.start.unwrap()[0], "az");
    }

    #[test]
    fn tilde_paths_are_left_for_validation() {
        assert!(starts_with_tilde(Path::new("~/keys/x")));
        assert!(!starts_with_tilde(Path::new("keys/~x")));
        let mut c = Config::default();
        c.ssh.user_ca_key = "~/ca".into();
        c.resolve_paths(Path::new("/srv"));
        assert_eq!(c.ssh.user_ca_key, PathBuf::from("~/ca"));
    }
}
