//! [`GatewayPool`]: the real `poolgate` binary in front of a pool of VMs, with test users who log
//! in through it, observed through its admin listener.
//!
//! [`GatewayPool::builder`] makes, in one temp dir: the user CA (generated *before* the VMs
//! start, because they trust it), the gateway's host key (pre-generated, so clients check it
//! strictly), one `authorized_keys/<user>` per test user, the VMs' `known_hosts`, an optional
//! admin token file (0600) and the config; then it starts the gateway and waits until every VM
//! it trusts has passed its probes — its "VM is up" log line, and `healthy` in the admin API —
//! never by sleeping.
//!
//! VMs are real OpenSSH `sshd` processes the builder starts ([`vm`](GatewayPoolBuilder::vm)),
//! optionally with a web side the test runs ([`vm_with_http_port`](GatewayPoolBuilder::vm_with_http_port)),
//! or web sides alone ([`web_vm`](GatewayPoolBuilder::web_vm): a Jupyter server, a recording
//! upstream). A pool without test users — a web pool — still needs an `[ssh]` section for the
//! config to be valid: the gateway then makes its own keys, and the VMs' known_hosts holds one
//! placeholder key.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use crate::client::{KnownHosts, SshClient};
use crate::gateway::{GatewayProcess, poolgate_bin};
use crate::http::{HttpResponse, JsonItems, http_get, http_request};
use crate::jupyter::{Browser, TestCa, WebVm};
use crate::keys::{UserCa, UserKey, generate_ed25519};
use crate::log::strip_ansi;
use crate::ports::free_port;
use crate::process::{blocking, poll, run_with_timeout, wait_until};
use crate::procfs::rss_kib;
use crate::sshd::{SshdVm, SshdVmBuilder};
use crate::users::TestUsers;

/// How often the pool's probes run unless a test says otherwise (`health.interval`).
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// How long one probe may take unless a test says otherwise (`health.timeout`).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often, and how long, [`GatewayPoolBuilder::web_pool`] probes: fault tests on web VMs
/// measure failover against it.
pub const WEB_PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// How long the gateway may take to see every VM up. Generous: the documented `[health]`
/// defaults need two good probes 5 s apart, and CI machines are loaded.
const VM_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// Certificates for direct connections (the "without gateway" half of transparency checks).
const DIRECT_CERT_VALIDITY: Duration = Duration::from_secs(600);

/// One VM of the pool being built.
struct VmPlan {
    name: String,
    kind: VmKind,
}

enum VmKind {
    /// An sshd the builder starts; `trusted`: its host key is in `backend_known_hosts`.
    Sshd {
        trusted: bool,
        http_port: Option<u16>,
    },
    /// A web side only, run by the test on `host:http_port` (`ssh_port = 1`: nothing listens
    /// there).
    Web { host: String, http_port: u16 },
    /// An sshd the test runs itself at `host:ssh_port` (in a network namespace of its own).
    SshAt { host: String, ssh_port: u16 },
}

/// The `[health]` section a builder writes.
#[derive(Clone, Debug)]
struct Health {
    /// `false`: no `[health]` section at all, every documented default applies.
    written: bool,
    interval: Duration,
    timeout: Duration,
    /// `health.ssh`: written only when `false` (the default is on).
    ssh: bool,
    /// `health.http = true` with this `http_path`; `None`: `health.http = false`.
    web_path: Option<String>,
    rise: u32,
    /// `health.fall`, written only when a test sets it.
    fall: Option<u32>,
}

/// Builds a [`GatewayPool`]; see [`GatewayPool::builder`].
pub struct GatewayPoolBuilder {
    vms: Vec<VmPlan>,
    users: Option<usize>,
    health: Health,
    ssh_lines: Vec<String>,
    listen_lines: Vec<String>,
    http_lines: Vec<String>,
    extra_toml: String,
    http_off: bool,
    tls: bool,
    token: Option<String>,
    vm_config: Option<fn(SshdVmBuilder) -> SshdVmBuilder>,
    gateway_env: Vec<(String, String)>,
    gateway_output: Option<std::fs::File>,
    gateway_binary: Option<PathBuf>,
    user_ca: Option<UserCa>,
    known_vms: Vec<String>,
}

impl GatewayPoolBuilder {
    /// A VM (an sshd) the gateway knows and routes to.
    pub fn vm(self, name: &str) -> Self {
        self.sshd_vm(name, true, None)
    }

    /// A VM (an sshd) left out of the gateway's `backend_known_hosts`; not waited for.
    pub fn untrusted_vm(self, name: &str) -> Self {
        self.sshd_vm(name, false, None)
    }

    /// A VM (an sshd) whose web side is `127.0.0.1:http_port` (`pool.backends[].http_port`):
    /// a jupyter_server's port, or a free port with nothing listening.
    pub fn vm_with_http_port(self, name: &str, http_port: u16) -> Self {
        self.sshd_vm(name, true, Some(http_port))
    }

    fn sshd_vm(mut self, name: &str, trusted: bool, http_port: Option<u16>) -> Self {
        self.vms.push(VmPlan {
            name: name.into(),
            kind: VmKind::Sshd { trusted, http_port },
        });
        self
    }

    /// A VM with a web side only, which the test runs on `127.0.0.1:http_port` (a Jupyter
    /// server, a recording upstream). Its `ssh_port` is 1: nothing listens there.
    pub fn web_vm(self, name: &str, http_port: u16) -> Self {
        self.web_vm_at(name, "127.0.0.1", http_port)
    }

    /// [`web_vm`](Self::web_vm) at `host` (an address in a network namespace of the test's).
    pub fn web_vm_at(mut self, name: &str, host: &str, http_port: u16) -> Self {
        self.vms.push(VmPlan {
            name: name.into(),
            kind: VmKind::Web {
                host: host.into(),
                http_port,
            },
        });
        self
    }

    /// [`web_vm`](Self::web_vm) for each of `vms`, in order, under its own name.
    pub fn web_vms(mut self, vms: &[impl WebVm]) -> Self {
        for vm in vms {
            self = self.web_vm(vm.vm_name(), vm.http_port());
        }
        self
    }

    /// Test accounts `pgtest1..=pgtest{n}`, each with a key in the gateway's authorized_keys
    /// (default: one when the pool has sshd VMs, none otherwise).
    pub fn users(mut self, n: usize) -> Self {
        self.users = Some(n);
        self
    }

    /// The user CA the gateway signs with and the VMs trust (default: a fresh one), for VMs the
    /// test starts itself, which must trust it before the pool exists.
    pub fn user_ca(mut self, ca: UserCa) -> Self {
        self.user_ca = Some(ca);
        self
    }

    /// A VM whose sshd the test runs itself at `host` (an address in a network namespace of
    /// the test's), on `vm`'s port and with `vm`'s host key, which goes into
    /// `backend_known_hosts`.
    pub fn ssh_vm_at(mut self, name: &str, vm: &SshdVm, host: &str) -> Self {
        self.known_vms.push(
            vm.known_hosts_line()
                .replacen("[127.0.0.1]", &format!("[{host}]"), 1),
        );
        self.vms.push(VmPlan {
            name: name.into(),
            kind: VmKind::SshAt {
                host: host.into(),
                ssh_port: vm.port(),
            },
        });
        self
    }

    /// A line of `backend_known_hosts` as it is (e.g. a VM's address with a key it no longer
    /// has: a VM rebuilt with a new host key).
    pub fn known_hosts_entry(mut self, line: String) -> Self {
        self.known_vms.push(line);
        self
    }

    /// Trusts the host key of `vm`, a VM the test runs itself (e.g. one a provider's scripts
    /// start): its line goes into `backend_known_hosts`.
    pub fn known_vm(mut self, vm: &SshdVm) -> Self {
        self.known_vms.push(vm.known_hosts_line());
        self
    }

    /// Probes the web side too (`health.http = true`), on `http_path`.
    pub fn web_probe(mut self, http_path: &str) -> Self {
        self.health.web_path = Some(http_path.into());
        self
    }

    /// The settings of a pool of web VMs (Jupyter): only the web side is probed, on
    /// `health_path`, every 500 ms with a 500 ms timeout, rise 1 and fall 2, and a VM that
    /// does not accept a connection within 2 s is given up (`http.connect_timeout`) — so
    /// failover is quick enough to measure.
    pub fn web_pool(mut self, health_path: &str) -> Self {
        self.health.interval = WEB_PROBE_INTERVAL;
        self.health.timeout = WEB_PROBE_INTERVAL;
        self.health.ssh = false;
        self.health.fall = Some(2);
        self.http_lines.push("connect_timeout = \"2s\"".into());
        self.web_probe(health_path)
    }

    /// Writes no `[health]` section at all, so every documented default applies (both probes
    /// on, web probe `GET /hub/health`, 5 s interval, rise 2, fall 3); the builder's probe
    /// settings are then ignored.
    pub fn without_health_section(mut self) -> Self {
        self.health.written = false;
        self
    }

    /// Web VMs with nothing but a web side, probed at the documented defaults (5 s interval,
    /// 2 s timeout, rise 2, fall 3): the `[health]` section sets only `http_path` (jupyter_server
    /// has no JupyterHub `/hub/health`) and turns the SSH probe off (these VMs have no SSH side).
    /// For tests of the defaults; [`web_pool`](Self::web_pool) probes fast to measure failover.
    pub fn web_probe_defaults(self, health_path: &str) -> Self {
        self.without_health_section().config_toml(&format!(
            "[health]\nssh = false\nhttp_path = \"{health_path}\""
        ))
    }

    /// `health.rise` (default 1: eligible after the first good probe).
    pub fn rise(mut self, rise: u32) -> Self {
        self.health.rise = rise;
        self
    }

    /// `health.fall` (default: not written, so the gateway's default, 3).
    pub fn fall(mut self, fall: u32) -> Self {
        self.health.fall = Some(fall);
        self
    }

    /// Writes `listen.http = "off"`: the gateway serves no HTTP ([`GatewayPool::http`] is then a
    /// free port nothing listens on).
    pub fn listen_http_off(mut self) -> Self {
        self.http_off = true;
        self
    }

    /// An HTTPS listener with a certificate from a test CA ([`GatewayPool::tls_ca`]); plain
    /// HTTP then redirects to it.
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// `admin.token_file` holding `token` (mode 0600); the pool's admin calls send it.
    pub fn admin_token(mut self, token: &str) -> Self {
        self.token = Some(token.into());
        self
    }

    /// A line for the gateway's `[listen]` section, e.g. `proxy_protocol = true`.
    pub fn listen_option(mut self, line: &str) -> Self {
        self.listen_lines.push(line.into());
        self
    }

    /// A line for the gateway's `[ssh]` section, e.g. `port_forwarding = false`.
    pub fn ssh_option(mut self, line: &str) -> Self {
        self.ssh_lines.push(line.into());
        self
    }

    /// A line for the gateway's `[http]` section, e.g. `tentative_for = "2s"`.
    pub fn http_option(mut self, line: &str) -> Self {
        self.http_lines.push(line.into());
        self
    }

    /// Whole TOML sections for the config, placed before the pool's backends (e.g.
    /// `"[gateway]\nshutdown_grace = \"2s\"\n"`, or a `[pool]` provider and `[autoscale]`).
    pub fn config_toml(mut self, text: &str) -> Self {
        self.extra_toml.push_str(text);
        self.extra_toml.push('\n');
        self
    }

    /// Applied to every sshd VM's builder (e.g. to turn on password authentication).
    pub fn vm_config(mut self, f: fn(SshdVmBuilder) -> SshdVmBuilder) -> Self {
        self.vm_config = Some(f);
        self
    }

    /// An environment variable for the gateway (e.g. `POOLGATE_LOG=debug`).
    pub fn gateway_env(mut self, name: &str, value: &str) -> Self {
        self.gateway_env.push((name.into(), value.into()));
        self
    }

    /// Where the gateway's standard output and error go instead of its log file (a pipe, say;
    /// under systemd both go to the journal); the log helpers then see nothing.
    pub fn gateway_output(mut self, to: std::fs::File) -> Self {
        self.gateway_output = Some(to);
        self
    }

    /// The gateway program to start instead of the one under test (a copy of it at another
    /// path, say, to install another over).
    pub fn gateway_binary(mut self, program: &Path) -> Self {
        self.gateway_binary = Some(program.to_path_buf());
        self
    }

    /// Starts everything and waits until the gateway has seen every VM it trusts up.
    pub fn start(mut self) -> GatewayPool {
        let started = Instant::now();
        let has_sshd = self
            .vms
            .iter()
            .any(|v| matches!(v.kind, VmKind::Sshd { .. }));
        let user_count = self.users.unwrap_or(usize::from(has_sshd));
        let ssh_side = user_count > 0 || has_sshd || self.user_ca.is_some();
        let users = (user_count > 0).then(|| TestUsers::ensure(user_count));
        let dir = tempfile::Builder::new()
            .prefix("poolgate-e2e-")
            .tempdir()
            .expect("create the gateway's temp dir");
        // The gateway's user CA is the harness's UserCa: the same key signs the gateway's
        // per-session certificates and the test's direct-connection certificates.
        let user_ca = ssh_side.then(|| self.user_ca.take().unwrap_or_else(UserCa::generate));
        let vms = self.start_vms(user_ca.as_ref());
        let backend_known_hosts = KnownHosts::at(&dir.path().join("known_hosts"));
        if ssh_side {
            for (plan, vm) in self.sshd_plans().zip(&vms) {
                if matches!(plan.kind, VmKind::Sshd { trusted: true, .. }) {
                    backend_known_hosts.add_vm(vm);
                }
            }
            for line in &self.known_vms {
                backend_known_hosts.add_line(line);
            }
        } else {
            backend_known_hosts.add_line(&placeholder_known_host());
        }
        let keys = users
            .as_ref()
            .map(|users| write_authorized_keys(dir.path(), users, user_count))
            .unwrap_or_default();
        let token_file = self
            .token
            .as_deref()
            .map(|token| write_token_file(dir.path(), token));
        let tls_ca = self.tls.then(TestCa::generate);
        let ssh_port = free_port();
        let addrs = Listeners {
            ssh: SocketAddr::from((Ipv4Addr::LOCALHOST, ssh_port)),
            admin: SocketAddr::from((Ipv4Addr::LOCALHOST, free_port())),
            http: SocketAddr::from((Ipv4Addr::LOCALHOST, free_port())),
            https: SocketAddr::from((Ipv4Addr::LOCALHOST, free_port())),
        };
        let ssh_keys = user_ca.as_ref().map(|ca| {
            let host_key = dir.path().join("host_key");
            generate_ed25519(&host_key, "poolgate-e2e gateway host key");
            SshKeys {
                host_key,
                ca_key: ca.private_key_path().to_path_buf(),
                authorized_keys: dir.path().join("authorized_keys"),
            }
        });
        let config = Config {
            plan: &self,
            listeners: &addrs,
            ssh_keys: ssh_keys.as_ref(),
            backend_known_hosts: backend_known_hosts.path(),
            tls: tls_ca.as_ref(),
            token_file: token_file.as_deref(),
            vms: &vms,
        }
        .text();
        let gateway = self.start_gateway(&config, dir.path(), &addrs);
        let known_hosts = KnownHosts::new();
        if ssh_keys.is_some() {
            known_hosts.add_host_key(
                ssh_port,
                &std::fs::read_to_string(dir.path().join("host_key.pub"))
                    .expect("read host_key.pub"),
            );
        }
        let pool = GatewayPool {
            gateway,
            vms,
            users,
            keys,
            user_ca,
            tls_ca,
            known_hosts,
            ssh_port,
            admin: addrs.admin,
            http: addrs.http,
            https: addrs.https,
            token: self.token.clone(),
            token_file,
            gateway_env: self.gateway_env.clone(),
            dir,
        };
        pool.wait_for_vms_up(&self.vms, self.gateway_output.is_none());
        eprintln!(
            "pool of {} VM(s) and {user_count} user(s) ready in {:?}",
            self.vms.len(),
            started.elapsed()
        );
        pool
    }

    /// [`start`](Self::start) for async tests: runs it off the async workers.
    pub async fn start_async(self) -> GatewayPool {
        blocking(move || self.start()).await
    }

    fn sshd_plans(&self) -> impl Iterator<Item = &VmPlan> {
        self.vms
            .iter()
            .filter(|v| matches!(v.kind, VmKind::Sshd { .. }))
    }

    /// Starts the sshd VMs, trusting `ca`.
    fn start_vms(&self, ca: Option<&UserCa>) -> Vec<SshdVm> {
        self.sshd_plans()
            .map(|plan| {
                let mut b = SshdVm::builder(&plan.name);
                if let Some(ca) = ca {
                    b = b.trusted_user_ca_keys(ca.public_key_path());
                }
                if let Some(f) = self.vm_config {
                    b = f(b);
                }
                b.start()
            })
            .collect()
    }

    /// Starts the gateway and waits until every listener it has accepts connections.
    fn start_gateway(&self, config: &str, dir: &Path, addrs: &Listeners) -> GatewayProcess {
        // No NO_COLOR: the gateway writes plain text to a file (its log here) by itself.
        let mut builder = GatewayProcess::builder(config)
            .dir(dir)
            .wait_for(addrs.ssh)
            .wait_for(addrs.admin);
        if !self.http_off {
            builder = builder.wait_for(addrs.http);
        }
        if self.tls {
            builder = builder.wait_for(addrs.https);
        }
        for (name, value) in &self.gateway_env {
            builder = builder.env(name, value);
        }
        if let Some(to) = &self.gateway_output {
            builder = builder.output(to.try_clone().expect("dup the gateway's output"));
        }
        if let Some(program) = &self.gateway_binary {
            builder = builder.binary(program);
        }
        builder.start()
    }
}

/// Where the gateway listens.
struct Listeners {
    ssh: SocketAddr,
    admin: SocketAddr,
    http: SocketAddr,
    https: SocketAddr,
}

/// The files of a pool whose SSH side the tests use.
struct SshKeys {
    host_key: PathBuf,
    ca_key: PathBuf,
    authorized_keys: PathBuf,
}

/// Everything the config file names.
struct Config<'a> {
    plan: &'a GatewayPoolBuilder,
    listeners: &'a Listeners,
    ssh_keys: Option<&'a SshKeys>,
    backend_known_hosts: &'a Path,
    tls: Option<&'a TestCa>,
    token_file: Option<&'a Path>,
    vms: &'a [SshdVm],
}

impl Config<'_> {
    fn text(&self) -> String {
        let mut config = self.listen();
        config += &self.ssh();
        let plan = self.plan;
        if !plan.http_lines.is_empty() {
            config += &format!("\n[http]\n{}", lines(&plan.http_lines));
        }
        config += &health_section(&plan.health);
        if let Some(path) = self.token_file {
            config += &format!("\n[admin]\ntoken_file = \"{}\"\n", path.display());
        }
        if !plan.extra_toml.is_empty() {
            config += &format!("\n{}", plan.extra_toml);
        }
        config += &self.backends();
        config
    }

    fn listen(&self) -> String {
        let Listeners {
            ssh,
            admin,
            http,
            https,
        } = self.listeners;
        let http = if self.plan.http_off {
            "off".to_string()
        } else {
            http.to_string()
        };
        let mut text =
            format!("[listen]\nssh = \"{ssh}\"\nhttp = \"{http}\"\nadmin = \"{admin}\"\n");
        text += &lines(&self.plan.listen_lines);
        if let Some(ca) = self.tls {
            text += &format!(
                "https = \"{https}\"\n\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
                ca.cert_path().display(),
                ca.key_path().display()
            );
        }
        text
    }

    fn ssh(&self) -> String {
        let section = match self.ssh_keys {
            Some(keys) => format!(
                "\n[ssh]\n\
                 host_keys = [\"{host_key}\"]\n\
                 user_ca_key = \"{ca_key}\"\n\
                 authorized_keys = \"{keys_dir}/{{user}}\"\n\
                 backend_known_hosts = \"{known}\"\n",
                host_key = keys.host_key.display(),
                ca_key = keys.ca_key.display(),
                keys_dir = keys.authorized_keys.display(),
                known = self.backend_known_hosts.display(),
            ),
            // Nobody logs in over SSH: the gateway makes its own keys.
            None => "\n[ssh]\nhost_keys = [\"keys/host_key\"]\nuser_ca_key = \"keys/user_ca\"\n\
                     backend_known_hosts = \"known_hosts\"\n"
                .to_string(),
        };
        section + &lines(&self.plan.ssh_lines)
    }

    fn backends(&self) -> String {
        let mut sshd = self.vms.iter();
        let mut text = String::new();
        for plan in &self.plan.vms {
            let (host, ssh_port, http_port) = match &plan.kind {
                VmKind::Sshd { http_port, .. } => (
                    "127.0.0.1",
                    sshd.next().expect("a started VM").port(),
                    *http_port,
                ),
                VmKind::Web { host, http_port } => (host.as_str(), 1, Some(*http_port)),
                VmKind::SshAt { host, ssh_port } => (host.as_str(), *ssh_port, None),
            };
            text += &format!(
                "\n[[pool.backends]]\nname = \"{}\"\nhost = \"{host}\"\nssh_port = {ssh_port}\n",
                plan.name
            );
            if let Some(port) = http_port {
                text += &format!("http_port = {port}\n");
            }
        }
        text
    }
}

/// The `[health]` section, or nothing when the defaults apply.
fn health_section(health: &Health) -> String {
    if !health.written {
        return String::new();
    }
    let mut text = format!(
        "\n[health]\ninterval = \"{}\"\ntimeout = \"{}\"\n",
        toml_duration(health.interval),
        toml_duration(health.timeout)
    );
    if !health.ssh {
        text += "ssh = false\n";
    }
    match &health.web_path {
        Some(path) => text += &format!("http = true\nhttp_path = \"{path}\"\n"),
        None => text += "http = false\n",
    }
    text += &format!("rise = {}\n", health.rise);
    if let Some(fall) = health.fall {
        text += &format!("fall = {fall}\n");
    }
    text
}

/// `"1s"` or `"500ms"`.
fn toml_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// Each line followed by a line end.
fn lines(lines: &[String]) -> String {
    lines.iter().map(|l| format!("{l}\n")).collect()
}

/// A known_hosts line for `[127.0.0.1]:1`, where no VM listens: a pool without SSH users must
/// still name a VM host key for its config to be valid.
fn placeholder_known_host() -> String {
    let mut blob = Vec::new();
    for part in [&b"ssh-ed25519"[..], &[7u8; 32][..]] {
        blob.extend_from_slice(&(part.len() as u32).to_be_bytes());
        blob.extend_from_slice(part);
    }
    format!(
        "[127.0.0.1]:1 ssh-ed25519 {}",
        data_encoding::BASE64.encode(&blob)
    )
}

/// A key for each of the first `n` users, listed in `<dir>/authorized_keys/<user>`.
fn write_authorized_keys(dir: &Path, users: &TestUsers, n: usize) -> BTreeMap<String, UserKey> {
    let keys_dir = dir.join("authorized_keys");
    std::fs::create_dir_all(&keys_dir).expect("mkdir authorized_keys");
    let mut keys = BTreeMap::new();
    for user in users.all().iter().take(n) {
        let key = UserKey::generate(&user.name);
        authorize(&keys_dir, &user.name, &key);
        keys.insert(user.name.clone(), key);
    }
    keys
}

/// Lists `key` as the only key of `user` in `keys_dir/<user>`.
fn authorize(keys_dir: &Path, user: &str, key: &UserKey) {
    std::fs::write(keys_dir.join(user), format!("{}\n", key.public_key_line()))
        .expect("write authorized_keys");
}

/// `<dir>/admin_token` holding `token`, mode 0600.
fn write_token_file(dir: &Path, token: &str) -> PathBuf {
    let path = dir.join("admin_token");
    std::fs::write(&path, format!("{token}\n")).expect("write admin_token");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .expect("chmod 600 admin_token");
    path
}

/// A gateway in front of a pool of VMs, with test users who can log in through it and an admin
/// listener. Field order is drop order: the gateway goes first, its files last.
pub struct GatewayPool {
    /// The running gateway.
    pub gateway: GatewayProcess,
    /// The sshd VMs, in the order they were added.
    pub vms: Vec<SshdVm>,
    users: Option<TestUsers>,
    keys: BTreeMap<String, UserKey>,
    user_ca: Option<UserCa>,
    tls_ca: Option<TestCa>,
    known_hosts: KnownHosts,
    /// The SSH listener's port on 127.0.0.1.
    pub ssh_port: u16,
    /// The admin listener (API, `/metrics`, `/status`).
    pub admin: SocketAddr,
    /// The plain HTTP listener (`listen.http`). With
    /// [`listen_http_off`](GatewayPoolBuilder::listen_http_off), a free port nothing listens on.
    pub http: SocketAddr,
    /// The HTTPS listener; without [`tls`](GatewayPoolBuilder::tls), a free port nothing
    /// listens on.
    pub https: SocketAddr,
    token: Option<String>,
    token_file: Option<PathBuf>,
    /// The gateway's extra environment, given again by [`restart_gateway`](Self::restart_gateway).
    gateway_env: Vec<(String, String)>,
    dir: TempDir,
}

impl GatewayPool {
    /// A builder with no VMs, probes of the SSH side every second (timeout 1 s, rise 1), an
    /// HTTP and an admin listener, no TLS and no admin token.
    pub fn builder() -> GatewayPoolBuilder {
        GatewayPoolBuilder {
            vms: Vec::new(),
            users: None,
            health: Health {
                written: true,
                interval: PROBE_INTERVAL,
                timeout: PROBE_TIMEOUT,
                ssh: true,
                web_path: None,
                rise: 1,
                fall: None,
            },
            ssh_lines: Vec::new(),
            listen_lines: Vec::new(),
            http_lines: Vec::new(),
            extra_toml: String::new(),
            http_off: false,
            tls: false,
            token: None,
            vm_config: None,
            gateway_env: Vec::new(),
            gateway_output: None,
            gateway_binary: None,
            user_ca: None,
            known_vms: Vec::new(),
        }
    }

    /// Waits until the gateway has seen each VM it trusts up: its "VM is up" line (when the log
    /// file has its standard error), then `healthy` in the admin API.
    fn wait_for_vms_up(&self, plans: &[VmPlan], logged: bool) {
        let deadline = Instant::now() + VM_UP_TIMEOUT;
        let waited = plans
            .iter()
            .filter(|p| !matches!(p.kind, VmKind::Sshd { trusted: false, .. }));
        for plan in waited {
            let left = deadline.saturating_duration_since(Instant::now());
            if logged {
                self.gateway.wait_for_vm_up(&plan.name, left);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            self.wait_for_state(&plan.name, "healthy", left);
        }
    }

    fn users(&self) -> &TestUsers {
        self.users.as_ref().expect("this pool has no test users")
    }

    /// Login name of test user `i` (1-based).
    pub fn user(&self, i: usize) -> String {
        self.users().user(i).name.clone()
    }

    /// User `i`'s key (listed in the gateway's authorized_keys, not CA-signed).
    pub fn key(&self, i: usize) -> &UserKey {
        &self.keys[&self.user(i)]
    }

    /// An OpenSSH client for user `i` through the gateway, checking the gateway's host key
    /// strictly.
    pub fn client(&self, i: usize) -> SshClient {
        self.client_as(&self.user(i)).user_key(self.key(i))
    }

    /// A client of user `name` through the gateway with no identity set.
    pub fn client_as(&self, name: &str) -> SshClient {
        SshClient::new(name, self.ssh_port, self.known_hosts.path())
    }

    /// The clients' known_hosts (holds the gateway's host key).
    pub fn known_hosts(&self) -> &Path {
        self.known_hosts.path()
    }

    /// Lists `key` as the only key of `user` in the gateway's authorized_keys, which it reads at
    /// every login.
    pub fn authorize(&self, user: &str, key: &UserKey) {
        authorize(&self.dir().join("authorized_keys"), user, key);
    }

    /// The VM called `name`.
    pub fn vm(&self, name: &str) -> &SshdVm {
        self.vms
            .iter()
            .find(|v| v.name() == name)
            .unwrap_or_else(|| panic!("no VM {name}"))
    }

    /// The VM called `name`, mutably (to stop or restart it).
    pub fn vm_mut(&mut self, name: &str) -> &mut SshdVm {
        self.vms
            .iter_mut()
            .find(|v| v.name() == name)
            .unwrap_or_else(|| panic!("no VM {name}"))
    }

    /// The user CA the gateway signs with and the VMs trust.
    pub fn user_ca(&self) -> &UserCa {
        self.user_ca.as_ref().expect("this pool has no SSH side")
    }

    /// The test CA of the HTTPS listener ([`tls`](GatewayPoolBuilder::tls)).
    pub fn tls_ca(&self) -> &TestCa {
        self.tls_ca.as_ref().expect("this pool has no TLS")
    }

    /// A new browser (empty cookie jar) on the HTTPS listener, trusting the test CA.
    pub fn browser(&self) -> Browser {
        Browser::https(self.https, self.tls_ca().client_config())
    }

    /// The gateway's temp dir (config, keys, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The admin token file, when configured.
    pub fn token_file(&self) -> Option<&Path> {
        self.token_file.as_deref()
    }

    /// The gateway's log so far, without ANSI colour codes.
    pub fn log(&self) -> String {
        strip_ansi(&self.gateway.log_text())
    }

    /// Asserts that the gateway's log shows no panic, quoting every line that does.
    pub fn assert_no_panic(&self) {
        let log = self.log();
        assert!(
            !log.contains("panicked"),
            "the gateway panicked:\n{}",
            log.lines()
                .filter(|l| l.contains("panicked"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    /// Waits for the audit line of `n` ended sessions in total.
    pub fn wait_for_sessions_ended(&self, n: usize, timeout: Duration) {
        wait_until(timeout, &format!("{n} \"ssh session ended\" lines"), || {
            self.log().matches("ssh session ended").count() >= n
        });
    }

    /// A direct connection (no gateway) of user `i` to `vm`, with a key the gateway's CA signed,
    /// exactly as the gateway itself logs in.
    pub fn direct_client(&self, i: usize, vm: &str) -> (SshClient, UserKey, KnownHosts) {
        let user = self.user(i);
        let key = UserKey::generate(&format!("{user}-direct"));
        self.user_ca().sign(&key, &user, DIRECT_CERT_VALIDITY);
        let known = KnownHosts::new();
        known.add_vm(self.vm(vm));
        let client = SshClient::new(&user, self.vm(vm).port(), known.path()).user_key(&key);
        (client, key, known)
    }

    /// A scratch directory name in a test user's home for remote files, unique to this pool.
    pub fn remote_scratch(&self, tag: &str) -> String {
        format!("poolgate-e2e-{tag}-{}", self.ssh_port)
    }

    /// The gateway's resident set size in KiB (`VmRSS` of `/proc/<pid>/status`).
    pub fn gateway_rss_kib(&self) -> u64 {
        let pid = self.gateway.pid().expect("the gateway runs");
        rss_kib(pid).expect("read the gateway's VmRSS")
    }

    /// The `/metrics` text (no token needed).
    pub fn metrics(&self) -> String {
        let r = http_get(self.admin, "/metrics");
        assert_eq!(r.status, 200, "GET /metrics: {}", r.body);
        r.body
    }

    /// An admin request with the bearer token when one is configured.
    pub fn admin_request(&self, method: &str, path: &str) -> HttpResponse {
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("Authorization", a)])
            .unwrap_or_default();
        http_request(self.admin, method, path, &headers)
    }

    /// `GET path` on the admin API, expecting 200 and JSON.
    pub fn api_get(&self, path: &str) -> Value {
        let r = self.admin_request("GET", path);
        assert_eq!(r.status, 200, "GET {path}: {}", r.body);
        r.json()
    }

    /// `POST /api/v1/vms/{vm}/{action}` (drain | undrain), expecting 200; returns the VM entry.
    pub fn api_post(&self, vm: &str, action: &str) -> Value {
        let path = format!("/api/v1/vms/{vm}/{action}");
        let r = self.admin_request("POST", &path);
        assert_eq!(r.status, 200, "POST {path}: {}", r.body);
        r.json()
    }

    /// `GET /api/v1/vms`.
    pub fn vms_json(&self) -> Value {
        self.api_get("/api/v1/vms")
    }

    /// `GET /api/v1/sessions`.
    pub fn sessions_json(&self) -> Value {
        self.api_get("/api/v1/sessions")
    }

    /// The entry of `vm` in `GET /api/v1/vms`.
    pub fn vm_json(&self, vm: &str) -> Value {
        let list = self.vms_json();
        list.items()
            .iter()
            .find(|v| v["name"].as_str() == Some(vm))
            .cloned()
            .unwrap_or_else(|| panic!("no VM {vm} in /api/v1/vms: {list}"))
    }

    /// `state` of `vm` in `GET /api/v1/vms`.
    pub fn vm_state(&self, vm: &str) -> String {
        self.vm_json(vm)["state"]
            .as_str()
            .expect("state is a string")
            .to_string()
    }

    /// Polls the API until `vm` is in `state`; returns how long that took. Panics (with the
    /// last answer) after `timeout`.
    pub fn wait_for_state(&self, vm: &str, state: &str, timeout: Duration) -> Duration {
        let started = Instant::now();
        self.wait_for_vm(vm, &format!("{state:?}"), timeout, |v| {
            v["state"].as_str() == Some(state)
        });
        started.elapsed()
    }

    /// Polls the API until `vm`'s entry satisfies `condition` (e.g. one side's health); returns
    /// that entry. Panics, naming `what` and showing the last entry, after `timeout`.
    pub fn wait_for_vm(
        &self,
        vm: &str,
        what: &str,
        timeout: Duration,
        mut condition: impl FnMut(&Value) -> bool,
    ) -> Value {
        let mut last = Value::Null;
        let seen = poll(timeout, || {
            last = self.vm_json(vm);
            condition(&last)
        });
        assert!(
            seen,
            "VM {vm}: not {what} after {timeout:?}; last /api/v1/vms entry: {last}"
        );
        last
    }

    /// Starts the gateway again, as systemd's `Restart=` would, once the previous process has
    /// exited or been killed: the same program, configuration file, directory (so the same keys
    /// and state file) and extra environment; waits until its SSH and admin listeners accept.
    pub fn restart_gateway(&mut self) {
        assert!(
            self.gateway.try_wait().is_some(),
            "the previous gateway still runs"
        );
        let config =
            std::fs::read_to_string(self.gateway.config_path()).expect("read poolgate.toml");
        let dir = self.gateway.dir().to_path_buf();
        let mut builder = GatewayProcess::builder(&config)
            .dir(&dir)
            .wait_for(SocketAddr::from((Ipv4Addr::LOCALHOST, self.ssh_port)))
            .wait_for(self.admin);
        for (name, value) in &self.gateway_env {
            builder = builder.env(name, value);
        }
        self.gateway = builder.start();
    }

    /// `poolgate <args…> --admin ADDR` with a clean environment for its admin options.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(poolgate_bin());
        cmd.args(args)
            .arg("--admin")
            .arg(self.admin.to_string())
            .env_remove("POOLGATE_ADMIN")
            .env_remove("POOLGATE_ADMIN_TOKEN_FILE")
            .env("NO_COLOR", "1");
        run_with_timeout(&mut cmd, Duration::from_secs(30))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_sections_say_what_differs_from_the_defaults() {
        let pool = GatewayPool::builder();
        assert_eq!(
            health_section(&pool.health),
            "\n[health]\ninterval = \"1s\"\ntimeout = \"1s\"\nhttp = false\nrise = 1\n"
        );
        let web = GatewayPool::builder().web_pool("/api");
        assert_eq!(
            health_section(&web.health),
            "\n[health]\ninterval = \"500ms\"\ntimeout = \"500ms\"\nssh = false\nhttp = true\n\
             http_path = \"/api\"\nrise = 1\nfall = 2\n"
        );
        assert_eq!(
            health_section(&GatewayPool::builder().without_health_section().health),
            ""
        );
    }
}
