//! Listener, SSH, HTTP, routing and health sections.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::enums::{Affinity, BackendScheme, PasswordAuth};
use crate::serde_util::{
    duration, listener_or_off, opt_duration, opt_port, opt_socket_addr, serialize_listener_or_off,
    socket_addr,
};

/// `[listen]`: the addresses poolgate accepts connections on.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Listen {
    /// SSH front door. Default `0.0.0.0:2222`. `"off"`: no SSH listener (the gateway serves
    /// browsers only, does not probe the VMs' SSH side, and needs no VM host keys unless the
    /// autoscaler's busy check logs in to VMs).
    #[serde(
        deserialize_with = "listener_or_off",
        serialize_with = "serialize_listener_or_off"
    )]
    pub ssh: Option<SocketAddr>,
    /// Plain HTTP; redirects to HTTPS when `[tls]` is set. Default `0.0.0.0:8080`. `"off"`: no
    /// plain HTTP listener (with no `listen.https` either, the gateway serves SSH only and does
    /// not probe the VMs' web side).
    #[serde(
        deserialize_with = "listener_or_off",
        serialize_with = "serialize_listener_or_off"
    )]
    pub http: Option<SocketAddr>,
    /// HTTPS; needs `[tls]`. Default unset.
    #[serde(
        deserialize_with = "opt_socket_addr",
        skip_serializing_if = "Option::is_none"
    )]
    pub https: Option<SocketAddr>,
    /// Admin API, `/metrics`, `/status`. Default `127.0.0.1:9090`.
    #[serde(deserialize_with = "socket_addr")]
    pub admin: SocketAddr,
    /// The load balancer in front (HAProxy `send-proxy-v2`, an AWS NLB, an Azure Private Link
    /// service) opens each connection with a PROXY protocol header (v1 or v2) that names the
    /// client, which the SSH, HTTP and HTTPS listeners then require: logs, the login penalty
    /// box, per-address limits and `X-Forwarded-For` see the client, not the balancer. A
    /// connection without the header is closed. Default false; the admin listener never
    /// expects it.
    pub proxy_protocol: bool,
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            ssh: Some(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 2222))),
            http: Some(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 8080))),
            https: None,
            admin: SocketAddr::from((Ipv4Addr::LOCALHOST, 9090)),
            proxy_protocol: false,
        }
    }
}

impl Listen {
    /// Whether the gateway serves browsers at all (a plain HTTP or an HTTPS listener).
    pub fn serves_http(&self) -> bool {
        self.http.is_some() || self.https.is_some()
    }

    /// Whether the gateway serves SSH (`listen.ssh` is not `"off"`).
    pub fn serves_ssh(&self) -> bool {
        self.ssh.is_some()
    }
}

/// `[gateway]`: process-wide behaviour.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct GatewaySection {
    /// On SIGTERM, open sessions may run this long before they are closed. Default `10m`.
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    /// Where the gateway keeps what it must not forget across a restart: operator drains, the
    /// autoscaler's scale-in drains, and each user's affinity VM. `"off"`: nowhere (a restart
    /// forgets them). Not used with `[cluster] store = "redis"`, which keeps them in Redis.
    /// Default `"state.json"` in systemd's state directory when the service has one
    /// (`StateDirectory=`, so `/var/lib/poolgate` under the shipped unit), else beside the
    /// configuration file.
    #[serde(default = "StateFile::unplaced")]
    pub state_file: StateFile,
}

impl GatewaySection {
    /// The section as read from a file that does not have it: the default state file is not
    /// placed yet.
    pub(crate) fn as_read() -> Self {
        Self {
            state_file: StateFile::unplaced(),
            ..Self::default()
        }
    }
}

impl Default for GatewaySection {
    fn default() -> Self {
        Self {
            shutdown_grace: Duration::from_secs(10 * 60),
            state_file: StateFile::File(PathBuf::from(StateFile::DEFAULT_NAME)),
        }
    }
}

/// `gateway.state_file`: `"off"` or a file path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateFile {
    /// Nothing is kept across a restart.
    Off,
    /// Written (mode 0600, replaced atomically) while the gateway runs, read when it starts.
    File(PathBuf),
}

impl StateFile {
    /// The file name of the default, placed in a directory when the configuration is loaded.
    pub const DEFAULT_NAME: &str = "state.json";

    /// The default as read from a file that does not set the key: an empty path, which no file
    /// can give (`""` is refused), placed by
    /// [`Config::resolve_paths_in`](crate::Config::resolve_paths_in).
    fn unplaced() -> Self {
        StateFile::File(PathBuf::new())
    }

    /// The file, unless `"off"`.
    pub fn path(&self) -> Option<&Path> {
        match self {
            StateFile::Off => None,
            StateFile::File(path) => Some(path),
        }
    }
}

impl Serialize for StateFile {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            StateFile::Off => s.serialize_str("off"),
            StateFile::File(path) => path.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for StateFile {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = StateFile;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("\"off\" or a file path")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<StateFile, E> {
                match v {
                    "off" => Ok(StateFile::Off),
                    "" => Err(E::custom(
                        "must not be empty (write \"off\" or a file path)",
                    )),
                    path => Ok(StateFile::File(PathBuf::from(path))),
                }
            }
        }
        d.deserialize_str(V)
    }
}

/// `[admin]`: the admin API.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Admin {
    /// File holding the bearer token required by `/api/v1` (unset: no token, loopback only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}

/// Let's Encrypt's production ACME directory, the default `tls.acme_directory`.
pub const LETS_ENCRYPT_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// `[tls]`: certificate for the HTTPS listener, from files (`cert` + `key`) or from an ACME
/// certificate authority (`acme_domains`), not both.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Tls {
    /// PEM certificate chain (empty: not set).
    #[serde(skip_serializing_if = "is_empty_path")]
    pub cert: PathBuf,
    /// PEM private key (empty: not set).
    #[serde(skip_serializing_if = "is_empty_path")]
    pub key: PathBuf,
    /// Names to get a certificate for by ACME (HTTP-01 on `listen.http`); empty: no ACME.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub acme_domains: Vec<String>,
    /// The ACME directory URL. Default: Let's Encrypt production.
    pub acme_directory: String,
    /// Contact address given to the ACME CA (expiry and policy mail).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acme_email: Option<String>,
    /// Directory holding the ACME account key and the certificates (created 0700, files 0600).
    /// Default `acme`, next to the config file.
    pub acme_cache: PathBuf,
    /// PEM CA certificate(s) to trust for the ACME directory's HTTPS, besides the system's
    /// (a private or test ACME server).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acme_directory_ca: Option<PathBuf>,
}

impl Default for Tls {
    fn default() -> Self {
        Self {
            cert: PathBuf::new(),
            key: PathBuf::new(),
            acme_domains: Vec::new(),
            acme_directory: LETS_ENCRYPT_DIRECTORY.to_owned(),
            acme_email: None,
            acme_cache: PathBuf::from("acme"),
            acme_directory_ca: None,
        }
    }
}

impl Tls {
    /// Whether the certificate comes from ACME (`acme_domains` set).
    pub fn uses_acme(&self) -> bool {
        !self.acme_domains.is_empty()
    }

    /// Whether the certificate comes from files (`cert` or `key` set).
    pub fn uses_files(&self) -> bool {
        !self.cert.as_os_str().is_empty() || !self.key.as_os_str().is_empty()
    }
}

fn is_empty_path(p: &std::path::Path) -> bool {
    p.as_os_str().is_empty()
}

/// `[ssh]`: the SSH front door and how the gateway logs in to VMs.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Ssh {
    /// Host keys the gateway shows; generated on first start when missing.
    pub host_keys: Vec<PathBuf>,
    /// Path template of each user's `authorized_keys`; must contain `{user}`.
    pub authorized_keys: String,
    /// CA key that signs the short-lived certificates used to log in to VMs; generated when missing.
    pub user_ca_key: PathBuf,
    /// known_hosts file with the VMs' host keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_known_hosts: Option<PathBuf>,
    /// Public key of a CA that signs the VMs' host keys (alternative to `backend_known_hosts`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_host_ca: Option<PathBuf>,
    /// Password logins: `off` or `passthrough` (relayed to the VM).
    pub password_auth: PasswordAuth,
    /// Allow `ssh -L` / `ssh -R` (opened by the VM's sshd, never by the gateway).
    pub port_forwarding: bool,
    /// Allow `ssh -A`.
    pub agent_forwarding: bool,
    /// Connections still authenticating, at most.
    pub max_unauthenticated: u32,
    /// Time allowed to authenticate.
    #[serde(with = "duration")]
    pub login_grace: Duration,
    /// Validity of the certificates the gateway signs for VM logins (at most 24h).
    #[serde(with = "duration")]
    pub cert_validity: Duration,
    /// Time allowed to connect to a VM's sshd.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// Text shown to clients before authentication.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub banner: Option<String>,
    /// Close connections with no channel traffic for this long (unset: never).
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub idle_timeout: Option<Duration>,
    /// A client connection silent this long is asked whether it is still there (sshd's
    /// `ClientAliveInterval`).
    #[serde(with = "duration")]
    pub client_alive_interval: Duration,
    /// Unanswered asks after which a silent client (a laptop asleep, a cut network) is dropped
    /// (sshd's `ClientAliveCountMax`): with the interval, how long a session survives its
    /// client's sleep. Default 20 × 30 s, about 10 minutes.
    pub client_alive_count_max: u32,
}

impl Default for Ssh {
    fn default() -> Self {
        Self {
            host_keys: vec![PathBuf::from("keys/ssh_host_ed25519_key")],
            authorized_keys: "/home/{user}/.ssh/authorized_keys".to_owned(),
            user_ca_key: PathBuf::from("keys/user_ca"),
            backend_known_hosts: Some(PathBuf::from("keys/backend_known_hosts")),
            backend_host_ca: None,
            password_auth: PasswordAuth::Off,
            port_forwarding: true,
            agent_forwarding: true,
            max_unauthenticated: 256,
            login_grace: Duration::from_secs(30),
            cert_validity: Duration::from_secs(5 * 60),
            connect_timeout: Duration::from_secs(10),
            banner: None,
            idle_timeout: None,
            client_alive_interval: Duration::from_secs(30),
            client_alive_count_max: 20,
        }
    }
}

/// `[http]`: the HTTP(S) proxy to JupyterHub on the VMs.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Http {
    /// Name of the cookie that pins a browser to a VM.
    pub cookie_name: String,
    /// Secret that signs the cookie (HMAC); generated when missing.
    pub cookie_secret_file: PathBuf,
    /// A browser session counts as active while its cookie was seen within this time.
    #[serde(with = "duration")]
    pub session_idle: Duration,
    /// A browser sent to a VM by its first request weighs on that VM's load for this long, or
    /// until it comes back with its cookie (then it is a session), so browsers arriving together
    /// spread over the pool. Never counts against `max_sessions`.
    #[serde(with = "duration")]
    pub tentative_for: Duration,
    /// Scheme used to reach the VMs: `http` or `https`.
    pub backend_scheme: BackendScheme,
    /// Time allowed to connect to a VM.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// Time a VM may take to send response headers.
    #[serde(with = "duration")]
    pub response_header_timeout: Duration,
    /// Close idle client keep-alive connections after this long.
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// Largest request header block accepted, in bytes (at least 8192).
    pub max_header_bytes: usize,
    /// Longest request URI accepted, in bytes.
    pub max_uri_bytes: usize,
    /// Client connections (HTTP and HTTPS, websockets included) served at once; more wait in
    /// the listen backlog until one closes.
    pub max_connections: usize,
    /// Where the line per proxied request goes: standard error (with the log), nowhere, or a
    /// file.
    pub access_log: AccessLog,
}

/// `http.access_log`: `"stderr"`, `"off"` or a file path.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AccessLog {
    /// On standard error next to the log, in its format; the log filter applies (target
    /// `poolgate::http::access`, level info).
    #[default]
    Stderr,
    /// No access log.
    Off,
    /// Appended to this file, whatever the log filter.
    File(PathBuf),
}

impl Serialize for AccessLog {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            AccessLog::Stderr => s.serialize_str("stderr"),
            AccessLog::Off => s.serialize_str("off"),
            AccessLog::File(path) => path.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for AccessLog {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = AccessLog;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("\"stderr\", \"off\" or a file path")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<AccessLog, E> {
                match v {
                    "stderr" => Ok(AccessLog::Stderr),
                    "off" => Ok(AccessLog::Off),
                    "" => Err(E::custom(
                        "must not be empty (write \"stderr\", \"off\" or a file path)",
                    )),
                    path => Ok(AccessLog::File(PathBuf::from(path))),
                }
            }
        }
        d.deserialize_str(V)
    }
}

impl Default for Http {
    fn default() -> Self {
        Self {
            cookie_name: "poolgate_vm".to_owned(),
            cookie_secret_file: PathBuf::from("keys/cookie_secret"),
            session_idle: Duration::from_secs(30 * 60),
            tentative_for: Duration::from_secs(10),
            backend_scheme: BackendScheme::Http,
            connect_timeout: Duration::from_secs(10),
            response_header_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(5 * 60),
            max_header_bytes: 65536,
            max_uri_bytes: 8192,
            max_connections: 16384,
            access_log: AccessLog::Stderr,
        }
    }
}

/// `[routing]`: how a VM is chosen for a new session.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Routing {
    /// `user`: follow the user's existing sessions; `none`: always least-loaded.
    pub affinity: Affinity,
    /// How long a user stays tied to a VM after their last session ends.
    #[serde(with = "duration")]
    pub affinity_ttl: Duration,
}

impl Default for Routing {
    fn default() -> Self {
        Self {
            affinity: Affinity::User,
            affinity_ttl: Duration::from_secs(12 * 3600),
        }
    }
}

/// `[health]`: active probes of each VM.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Health {
    /// Time between probes of one VM.
    #[serde(with = "duration")]
    pub interval: Duration,
    /// Time one probe may take (at most `interval`).
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// Consecutive successes before a VM is marked up.
    pub rise: u32,
    /// Consecutive failures before a VM is marked down.
    pub fall: u32,
    /// Path probed on the VM's HTTP port.
    pub http_path: String,
    /// Probe the SSH port (banner exchange).
    pub ssh: bool,
    /// Probe `http_path`.
    pub http: bool,
    /// Port of a Prometheus exporter on the VMs to read load from (unset: don't).
    #[serde(
        default,
        deserialize_with = "opt_port",
        skip_serializing_if = "Option::is_none"
    )]
    pub load_metrics_port: Option<u16>,
    /// Path of that exporter.
    pub load_metrics_path: String,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            rise: 2,
            fall: 3,
            http_path: "/hub/health".to_owned(),
            ssh: true,
            http: true,
            load_metrics_port: None,
            load_metrics_path: "/metrics".to_owned(),
        }
    }
}
