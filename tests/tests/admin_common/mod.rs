//! Shared fixture of the admin end-to-end tests (`tests/tests/admin_*.rs`): a real `poolgate`
//! gateway with its admin listener, in front of real OpenSSH `sshd` VMs, used by real OpenSSH
//! clients, and observed through the admin API, `/metrics`, `/status` and the `poolgate` CLI.
//!
//! [`Pool::builder`] makes, in one temp dir: the user CA (generated *before* the VMs start,
//! because they trust it), the gateway host key (pre-generated, so clients check it strictly),
//! one `authorized_keys/<user>` per test user, the VMs' `known_hosts`, an optional admin token
//! file (0600) and the config; then it starts the gateway and polls `GET /api/v1/vms` until
//! every VM is `healthy` — no sleeping.
//!
//! Each test binary uses part of this module.
#![allow(dead_code)]

mod http;

pub use http::{HttpResponse, Json, http_get, http_request};

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use poolgate_tests::*;
use tempfile::TempDir;

/// How long a gateway may take to see its VMs healthy.
const VM_UP_TIMEOUT: Duration = Duration::from_secs(20);
/// The same with the default `[health]` (5 s interval, rise 2).
const VM_UP_TIMEOUT_DEFAULT_HEALTH: Duration = Duration::from_secs(40);
/// The probe settings every admin test uses.
pub const INTERVAL: Duration = Duration::from_secs(1);
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Builds a [`Pool`].
pub struct PoolBuilder {
    vms: Vec<String>,
    /// `http_port` of VMs that set one (else the default, 8000).
    http_ports: BTreeMap<String, u16>,
    users: usize,
    rise: u32,
    fall: u32,
    token: Option<String>,
    health: HealthSection,
    /// `listen.http = "off"`: no HTTP listener (and no `listen.https`), an SSH-only gateway.
    http_off: bool,
}

/// The `[health]` section a [`PoolBuilder`] writes.
#[derive(Clone, Debug)]
enum HealthSection {
    /// SSH probe only (`http = false`), 1 s interval and timeout, the builder's rise and fall.
    SshProbe,
    /// Both probes, the web probe on `http_path`; 1 s interval and timeout, rise and fall.
    BothProbes { http_path: String },
    /// No `[health]` section at all: every default applies.
    Omitted,
}

impl PoolBuilder {
    /// A VM (an sshd) the gateway knows and routes to.
    pub fn vm(mut self, name: &str) -> Self {
        self.vms.push(name.into());
        self
    }

    /// A VM (an sshd) whose web side is `127.0.0.1:http_port` (`pool.backends[].http_port`):
    /// a jupyter_server's port, or a free port with nothing listening.
    pub fn vm_with_http_port(mut self, name: &str, http_port: u16) -> Self {
        self.vms.push(name.into());
        self.http_ports.insert(name.into(), http_port);
        self
    }

    /// Test accounts `pgtest1..=pgtest{n}`, each with a key in the gateway's authorized_keys.
    pub fn users(mut self, n: usize) -> Self {
        self.users = n;
        self
    }

    /// Probes both sides (`health.http = true`), the web side on `http_path`, instead of the
    /// SSH probe only.
    pub fn web_probe(mut self, http_path: &str) -> Self {
        self.health = HealthSection::BothProbes {
            http_path: http_path.into(),
        };
        self
    }

    /// Writes no `[health]` section at all, so every documented default applies (both probes
    /// on, web probe `GET /hub/health`, 5 s interval, rise 2, fall 3); `rise`/`fall` are then
    /// ignored. Starting waits longer accordingly.
    pub fn without_health_section(mut self) -> Self {
        self.health = HealthSection::Omitted;
        self
    }

    /// Writes `listen.http = "off"`: the gateway serves SSH only ([`Pool::http`] is then a free
    /// port nothing listens on).
    pub fn listen_http_off(mut self) -> Self {
        self.http_off = true;
        self
    }

    /// `health.rise` (default 1: eligible after the first good probe).
    pub fn rise(mut self, rise: u32) -> Self {
        self.rise = rise;
        self
    }

    /// `health.fall` (default 3).
    pub fn fall(mut self, fall: u32) -> Self {
        self.fall = fall;
        self
    }

    /// `admin.token_file` holding `token` (mode 0600).
    pub fn admin_token(mut self, token: &str) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Starts everything and waits until the admin API shows every VM healthy.
    pub fn start(self) -> Pool {
        let started = Instant::now();
        let users = TestUsers::ensure(self.users.max(1));
        let dir = tempfile::Builder::new()
            .prefix("poolgate-admin-e2e-")
            .tempdir()
            .expect("create the gateway's temp dir");
        let ca = UserCa::generate();
        let host_key = dir.path().join("host_key");
        generate_ed25519(&host_key, "poolgate-admin-e2e gateway host key");

        let vms: Vec<SshdVm> = self
            .vms
            .iter()
            .map(|name| {
                SshdVm::builder(name)
                    .trusted_user_ca_keys(ca.public_key_path())
                    .start()
            })
            .collect();
        let backend_known_hosts = KnownHosts::at(&dir.path().join("known_hosts"));
        for vm in &vms {
            backend_known_hosts.add_vm(vm);
        }

        let keys_dir = dir.path().join("authorized_keys");
        std::fs::create_dir_all(&keys_dir).expect("mkdir authorized_keys");
        let mut keys = BTreeMap::new();
        for user in users.all().iter().take(self.users) {
            let key = UserKey::generate(&user.name);
            std::fs::write(
                keys_dir.join(&user.name),
                format!("{}\n", key.public_key_line()),
            )
            .expect("write authorized_keys");
            keys.insert(user.name.clone(), key);
        }

        let token_file = self.token.as_ref().map(|token| {
            let path = dir.path().join("admin_token");
            std::fs::write(&path, format!("{token}\n")).expect("write admin_token");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .expect("chmod 600 admin_token");
            path
        });

        let ssh_port = free_port();
        let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let http = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let mut config = format!(
            "[listen]\n\
             ssh = \"127.0.0.1:{ssh_port}\"\n\
             http = \"{http_listen}\"\n\
             admin = \"{admin}\"\n\
             \n[ssh]\n\
             host_keys = [\"{host_key}\"]\n\
             user_ca_key = \"{ca_key}\"\n\
             authorized_keys = \"{keys_dir}/{{user}}\"\n\
             backend_known_hosts = \"{known}\"\n",
            http_listen = if self.http_off {
                "off".to_string()
            } else {
                http.to_string()
            },
            host_key = host_key.display(),
            ca_key = ca.private_key_path().display(),
            keys_dir = keys_dir.display(),
            known = backend_known_hosts.path().display(),
        );
        let probes = match &self.health {
            HealthSection::SshProbe => Some("http = false\n".to_string()),
            HealthSection::BothProbes { http_path } => {
                Some(format!("http = true\nhttp_path = \"{http_path}\"\n"))
            }
            HealthSection::Omitted => None,
        };
        if let Some(probes) = probes {
            config += &format!(
                "\n[health]\n\
                 interval = \"{interval}s\"\n\
                 timeout = \"{timeout}s\"\n\
                 {probes}\
                 rise = {rise}\n\
                 fall = {fall}\n",
                interval = INTERVAL.as_secs(),
                timeout = PROBE_TIMEOUT.as_secs(),
                rise = self.rise,
                fall = self.fall,
            );
        }
        if let Some(path) = &token_file {
            config += &format!("\n[admin]\ntoken_file = \"{}\"\n", path.display());
        }
        for vm in &vms {
            config += &format!(
                "\n[[pool.backends]]\nname = \"{}\"\nhost = \"127.0.0.1\"\nssh_port = {}\n",
                vm.name(),
                vm.port()
            );
            if let Some(port) = self.http_ports.get(vm.name()) {
                config += &format!("http_port = {port}\n");
            }
        }

        // The gateway colours its log even into a file; NO_COLOR keeps it greppable.
        let gateway = GatewayProcess::builder(&config)
            .dir(dir.path())
            .env("NO_COLOR", "1")
            .wait_for(SocketAddr::from((Ipv4Addr::LOCALHOST, ssh_port)))
            .wait_for(admin)
            .start();

        let known_hosts = KnownHosts::new();
        known_hosts.add_host_key(
            ssh_port,
            &std::fs::read_to_string(dir.path().join("host_key.pub")).expect("read host_key.pub"),
        );
        let pool = Pool {
            gateway,
            vms,
            users,
            keys,
            ca,
            known_hosts,
            ssh_port,
            admin,
            http,
            token: self.token,
            token_file,
            dir,
        };
        // The documented defaults probe every 5 s and need 2 good probes.
        let up_timeout = match self.health {
            HealthSection::Omitted => VM_UP_TIMEOUT_DEFAULT_HEALTH,
            _ => VM_UP_TIMEOUT,
        };
        for name in &self.vms {
            pool.wait_for_state(name, "healthy", up_timeout);
        }
        eprintln!(
            "pool of {} VM(s) and {} user(s) ready in {:?}",
            pool.vms.len(),
            self.users,
            started.elapsed()
        );
        pool
    }
}

/// A gateway in front of `sshd` VMs, with test users who can log in through it and an admin
/// listener. Field order is drop order: the gateway goes first, its files last.
pub struct Pool {
    pub gateway: GatewayProcess,
    pub vms: Vec<SshdVm>,
    pub users: TestUsers,
    keys: BTreeMap<String, UserKey>,
    pub ca: UserCa,
    known_hosts: KnownHosts,
    pub ssh_port: u16,
    pub admin: SocketAddr,
    /// The plain HTTP listener (`listen.http`; no `[tls]`, so it proxies to the VMs). With
    /// [`PoolBuilder::listen_http_off`], a free port nothing listens on.
    pub http: SocketAddr,
    token: Option<String>,
    token_file: Option<PathBuf>,
    dir: TempDir,
}

impl Pool {
    /// A builder with no VMs and one user.
    pub fn builder() -> PoolBuilder {
        PoolBuilder {
            vms: Vec::new(),
            http_ports: BTreeMap::new(),
            users: 1,
            rise: 1,
            fall: 3,
            token: None,
            health: HealthSection::SshProbe,
            http_off: false,
        }
    }

    /// Login name of test user `i` (1-based).
    pub fn user(&self, i: usize) -> String {
        self.users.user(i).name.clone()
    }

    /// An OpenSSH client for user `i` through the gateway, checking its host key strictly.
    pub fn client(&self, i: usize) -> SshClient {
        let user = self.user(i);
        SshClient::new(&user, self.ssh_port, self.known_hosts.path()).user_key(&self.keys[&user])
    }

    /// The VM called `name`, mutably (to stop or restart it).
    pub fn vm_mut(&mut self, name: &str) -> &mut SshdVm {
        self.vms
            .iter_mut()
            .find(|v| v.name() == name)
            .unwrap_or_else(|| panic!("no VM {name}"))
    }

    /// The VM called `name`.
    pub fn vm(&self, name: &str) -> &SshdVm {
        self.vms
            .iter()
            .find(|v| v.name() == name)
            .unwrap_or_else(|| panic!("no VM {name}"))
    }

    /// The admin token file, when configured.
    pub fn token_file(&self) -> Option<&Path> {
        self.token_file.as_deref()
    }

    /// The gateway's temp dir.
    pub fn dir(&self) -> &Path {
        self.dir.path()
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
    pub fn api_get(&self, path: &str) -> Json {
        let r = self.admin_request("GET", path);
        assert_eq!(r.status, 200, "GET {path}: {}", r.body);
        r.json()
    }

    /// `GET /api/v1/vms`.
    pub fn vms_json(&self) -> Json {
        self.api_get("/api/v1/vms")
    }

    /// The entry of `vm` in `GET /api/v1/vms`.
    pub fn vm_json(&self, vm: &str) -> Json {
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
        let mut last = Json::Null;
        let seen = poll(timeout, || {
            last = self.vm_json(vm);
            last["state"].as_str() == Some(state)
        });
        assert!(
            seen,
            "VM {vm} not {state:?} after {timeout:?}; last /api/v1/vms entry: {last}"
        );
        started.elapsed()
    }

    /// Polls the API until `vm`'s entry satisfies `condition` (e.g. one side's health); returns
    /// that entry. Panics, naming `what` and showing the last entry, after `timeout`.
    pub fn wait_for_vm(
        &self,
        vm: &str,
        what: &str,
        timeout: Duration,
        mut condition: impl FnMut(&Json) -> bool,
    ) -> Json {
        let mut last = Json::Null;
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

    /// `POST /api/v1/vms/{vm}/{action}` (drain | undrain), expecting 200; returns the VM entry.
    pub fn api_post(&self, vm: &str, action: &str) -> Json {
        let path = format!("/api/v1/vms/{vm}/{action}");
        let r = self.admin_request("POST", &path);
        assert_eq!(r.status, 200, "POST {path}: {}", r.body);
        r.json()
    }

    /// `GET /api/v1/sessions`.
    pub fn sessions_json(&self) -> Json {
        self.api_get("/api/v1/sessions")
    }

    /// The `/metrics` text (no token needed).
    pub fn metrics(&self) -> String {
        let r = http_get(self.admin, "/metrics");
        assert_eq!(r.status, 200, "GET /metrics: {}", r.body);
        r.body
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

    /// The gateway's log so far.
    pub fn log(&self) -> String {
        self.gateway.log_text()
    }
}

/// Polls `condition` (1 ms doubling to 50 ms) until it is true or `timeout` passes; returns
/// whether it became true. For waits whose failure message needs state from the closure.
pub fn poll(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if condition() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Runs `promtool check metrics` on `text` and asserts it passes (exit 0, no lint problem);
/// the text is kept in `tests/artifacts/<artifact>`.
pub fn promtool_check(text: &str, artifact: &str) {
    let out = run_with_input(
        Command::new(tool("promtool")).args(["check", "metrics"]),
        text.as_bytes(),
        Duration::from_secs(30),
    );
    let artifacts = workspace_dir().join("tests").join("artifacts");
    let _ = std::fs::create_dir_all(&artifacts);
    let _ = std::fs::write(artifacts.join(artifact), text);
    assert!(
        out.status.success(),
        "promtool check metrics failed ({}):\n{}{}\n--- metrics ---\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
}

/// One sample line of the Prometheus text format: `name{labels}` → value.
pub fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let value = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().ok()?,
            };
            Some((series.to_string(), value))
        })
        .collect()
}

/// `# TYPE name kind` lines: metric family → kind.
pub fn metric_types(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.to_string(), f.next()?.to_string()))
        })
        .collect()
}

/// The value of series `series` (exactly as exposed, labels in the exposed order), if present.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    samples(text).get(series).copied()
}

/// `poolgate_sessions_active{protocol="ssh",vm="<vm>"}`.
pub fn ssh_active(metrics: &str, vm: &str) -> Option<f64> {
    sample(
        metrics,
        &format!("poolgate_sessions_active{{protocol=\"ssh\",vm=\"{vm}\"}}"),
    )
}

/// Trimmed stdout.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// stderr as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts success, showing both streams otherwise.
#[track_caller]
pub fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        stderr(out)
    );
}

/// An SSH session through the gateway running `echo $POOLGATE_VM; <then>`: [`open`](Self::open)
/// returns once the VM name arrived, so the session is counted by then. Its stdout is drained
/// to the end on a thread (so the remote side never blocks), its stdin stays open until
/// [`end`](Self::end) closes it; drop kills it.
pub struct Session {
    child: Child,
    stdin: Option<ChildStdin>,
    received: Arc<AtomicUsize>,
    output: mpsc::Receiver<Vec<u8>>,
    /// Where it landed.
    pub vm: String,
    started: Instant,
}

impl Session {
    /// `echo $POOLGATE_VM; exec cat`: held open and echoing until [`end`](Self::end).
    pub fn hold(client: &SshClient) -> Self {
        Self::open(client, "exec cat")
    }

    /// Opens `echo $POOLGATE_VM; <then>` and waits (30 s at most) for the VM name.
    pub fn open(client: &SshClient, then: &str) -> Self {
        let timeout = Duration::from_secs(30);
        let mut child = client
            .command(&format!("echo $POOLGATE_VM; {then}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ssh");
        let started = Instant::now();
        let stdin = child.stdin.take();
        let out = child.stdout.take().expect("piped stdout");
        let received = Arc::new(AtomicUsize::new(0));
        let (first_tx, first_rx) = mpsc::channel();
        let (all_tx, all_rx) = mpsc::channel();
        let counter = received.clone();
        thread::spawn(move || {
            let mut reader = BufReader::new(out);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = first_tx.send(line);
            let mut rest = Vec::new();
            let mut chunk = [0u8; 64 * 1024];
            while let Ok(n @ 1..) = reader.read(&mut chunk) {
                counter.fetch_add(n, Ordering::SeqCst);
                rest.extend_from_slice(&chunk[..n]);
            }
            let _ = all_tx.send(rest);
        });
        let mut session = Session {
            child,
            stdin,
            received,
            output: all_rx,
            vm: String::new(),
            started,
        };
        let line = first_rx.recv_timeout(timeout).unwrap_or_default();
        if line.trim().is_empty() {
            kill_tree(session.child.id());
            let _ = session.child.wait();
            let mut err = String::new();
            if let Some(mut e) = session.child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("session printed no VM name within {timeout:?}; ssh stderr: {err}");
        }
        session.vm = line.trim().to_string();
        session
    }

    /// Writes `data` to the remote command's stdin.
    pub fn send(&mut self, data: &[u8]) {
        self.stdin
            .as_mut()
            .expect("stdin still open")
            .write_all(data)
            .expect("write to ssh stdin");
    }

    /// Bytes received on stdout after the VM name line.
    pub fn received(&self) -> usize {
        self.received.load(Ordering::SeqCst)
    }

    /// True while ssh runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Closes stdin and waits (within `timeout`) for ssh to exit; returns its status and the
    /// stdout after the VM line.
    pub fn finish(mut self, timeout: Duration) -> (ExitStatus, String) {
        self.stdin = None;
        let status = wait_for_exit(&mut self.child, timeout, "ssh session");
        let rest = self
            .output
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_default();
        (status, String::from_utf8_lossy(&rest).into_owned())
    }

    /// Ends a held session cleanly (EOF to `cat`) and asserts ssh exited 0.
    pub fn end(self) {
        let (status, _) = self.finish(Duration::from_secs(10));
        assert!(status.success(), "held session ended with {status}");
    }

    /// How long since ssh was spawned.
    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            kill_tree(self.child.id());
            let _ = self.child.wait();
        }
    }
}

/// Runs `echo $POOLGATE_VM` through the gateway and returns where it landed.
pub fn landed(client: &SshClient) -> String {
    let out = client.run("echo $POOLGATE_VM");
    assert_ok(&out, "ssh echo $POOLGATE_VM");
    stdout(&out)
}

/// Sessions of a user logged in on `vm` as sshd shows them: processes under its listener named
/// `sshd: <user>@…` (the unprivileged post-authentication child of each connection). Probes
/// and unauthenticated connections never get one.
pub fn sshd_sessions(vm: &SshdVm) -> usize {
    let Some(root) = vm.pid() else {
        return 0;
    };
    let mut parent: HashMap<u32, u32> = HashMap::new();
    let mut names: HashMap<u32, String> = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(ppid) = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
            .and_then(|p| p.parse().ok())
        else {
            continue;
        };
        parent.insert(pid, ppid);
        if let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            names.insert(pid, String::from_utf8_lossy(&cmdline).into_owned());
        }
    }
    let under_root = |mut pid: u32| {
        for _ in 0..64 {
            match parent.get(&pid) {
                Some(&p) if p == root => return true,
                Some(&p) if p > 1 => pid = p,
                _ => return false,
            }
        }
        false
    };
    names
        .iter()
        .filter(|(pid, name)| name.starts_with("sshd: ") && name.contains('@') && under_root(**pid))
        .count()
}
