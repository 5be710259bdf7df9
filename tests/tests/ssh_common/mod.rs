//! Shared fixture of the SSH end-to-end tests (`tests/tests/ssh_*.rs`): a real `poolgate`
//! gateway in front of real OpenSSH `sshd` VMs, reached by real OpenSSH clients.
//!
//! [`Pool::builder`] makes, in one temp dir: the gateway's user CA (generated *before* the VMs
//! start, because they trust it), its host key (pre-generated, so clients can check it strictly),
//! one `authorized_keys/<user>` file per test user, the `known_hosts` of the VMs, and the config;
//! then it starts the gateway and waits until every trusted VM has passed its first health probe
//! (the "VM is up" log line) — no sleeping.
//!
//! Each test binary uses part of this module.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use poolgate_tests::*;
use tempfile::TempDir;

/// Certificates for direct connections (the "without gateway" half of transparency checks).
pub const DIRECT_CERT_VALIDITY: Duration = Duration::from_secs(600);

/// How long a gateway may take to see its VMs up.
const VM_UP_TIMEOUT: Duration = Duration::from_secs(15);

/// One VM of the pool being built.
struct VmPlan {
    name: String,
    trusted: bool,
}

/// Builds a [`Pool`].
pub struct PoolBuilder {
    vms: Vec<VmPlan>,
    users: usize,
    ssh_lines: Vec<String>,
    health_lines: Vec<String>,
    vm_config: Option<fn(SshdVmBuilder) -> SshdVmBuilder>,
    gateway_env: Vec<(String, String)>,
    extra_toml: String,
}

impl PoolBuilder {
    /// A VM whose host key the gateway knows.
    pub fn vm(mut self, name: &str) -> Self {
        self.vms.push(VmPlan {
            name: name.into(),
            trusted: true,
        });
        self
    }

    /// A VM left out of the gateway's `backend_known_hosts`.
    pub fn untrusted_vm(mut self, name: &str) -> Self {
        self.vms.push(VmPlan {
            name: name.into(),
            trusted: false,
        });
        self
    }

    /// Test accounts `pgtest1..=pgtest{n}`, each with a key in the gateway's authorized_keys.
    pub fn users(mut self, n: usize) -> Self {
        self.users = n;
        self
    }

    /// A line for the gateway's `[ssh]` section, e.g. `port_forwarding = false`.
    pub fn ssh_option(mut self, line: &str) -> Self {
        self.ssh_lines.push(line.into());
        self
    }

    /// A line for the gateway's `[health]` section, e.g. `fall = 1`.
    pub fn health_option(mut self, line: &str) -> Self {
        self.health_lines.push(line.into());
        self
    }

    /// Applied to every VM's builder (e.g. to turn on password authentication).
    pub fn vm_config(mut self, f: fn(SshdVmBuilder) -> SshdVmBuilder) -> Self {
        self.vm_config = Some(f);
        self
    }

    /// An environment variable for the gateway (e.g. `POOLGATE_LOG=debug`).
    pub fn gateway_env(mut self, name: &str, value: &str) -> Self {
        self.gateway_env.push((name.into(), value.into()));
        self
    }

    /// Whole TOML sections for the config, placed before the pool (e.g.
    /// `"[gateway]\nshutdown_grace = \"2s\"\n"`).
    pub fn config_toml(mut self, text: &str) -> Self {
        self.extra_toml.push_str(text);
        self.extra_toml.push('\n');
        self
    }

    /// Starts everything and waits until the gateway has seen every trusted VM up.
    pub fn start(self) -> Pool {
        let started = Instant::now();
        let users = TestUsers::ensure(self.users.max(1));
        let dir = tempfile::Builder::new()
            .prefix("poolgate-e2e-")
            .tempdir()
            .expect("create the gateway's temp dir");
        // The gateway's user CA is the harness's UserCa: the same key signs the gateway's
        // per-session certificates and the test's direct-connection certificates.
        let ca = UserCa::generate();
        let host_key = dir.path().join("host_key");
        generate_ed25519(&host_key, "poolgate-e2e gateway host key");

        let vms: Vec<SshdVm> = self
            .vms
            .iter()
            .map(|plan| {
                let mut b = SshdVm::builder(&plan.name).trusted_user_ca_keys(ca.public_key_path());
                if let Some(f) = self.vm_config {
                    b = f(b);
                }
                b.start()
            })
            .collect();
        let backend_known_hosts = KnownHosts::at(&dir.path().join("known_hosts"));
        for (plan, vm) in self.vms.iter().zip(&vms) {
            if plan.trusted {
                backend_known_hosts.add_vm(vm);
            }
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

        let ssh_port = free_port();
        let admin_port = free_port();
        let mut config = format!(
            "[listen]\n\
             ssh = \"127.0.0.1:{ssh_port}\"\n\
             http = \"127.0.0.1:{http}\"\n\
             admin = \"127.0.0.1:{admin}\"\n\
             \n[ssh]\n\
             host_keys = [\"{host_key}\"]\n\
             user_ca_key = \"{ca_key}\"\n\
             authorized_keys = \"{keys_dir}/{{user}}\"\n\
             backend_known_hosts = \"{known}\"\n",
            http = free_port(),
            admin = admin_port,
            host_key = host_key.display(),
            ca_key = ca.private_key_path().display(),
            keys_dir = keys_dir.display(),
            known = backend_known_hosts.path().display(),
        );
        for line in &self.ssh_lines {
            config += &format!("{line}\n");
        }
        // rise = 1: a VM is eligible after its first successful probe.
        config += "\n[health]\ninterval = \"1s\"\ntimeout = \"1s\"\nhttp = false\nrise = 1\n";
        for line in &self.health_lines {
            config += &format!("{line}\n");
        }
        if !self.extra_toml.is_empty() {
            config += &format!("\n{}", self.extra_toml);
        }
        for vm in &vms {
            config += &format!(
                "\n[[pool.backends]]\nname = \"{}\"\nhost = \"127.0.0.1\"\nssh_port = {}\n",
                vm.name(),
                vm.port()
            );
        }

        // The gateway colours its log even into a file; NO_COLOR keeps it greppable.
        let mut builder = GatewayProcess::builder(&config)
            .dir(dir.path())
            .env("NO_COLOR", "1")
            .wait_for(SocketAddr::from((Ipv4Addr::LOCALHOST, ssh_port)));
        for (name, value) in &self.gateway_env {
            builder = builder.env(name, value);
        }
        let gateway = builder.start();
        for (plan, vm) in self.vms.iter().zip(&vms) {
            if plan.trusted {
                wait_for_vm_up(&gateway, vm.name(), VM_UP_TIMEOUT);
            }
        }

        let known_hosts = KnownHosts::new();
        known_hosts.add_host_key(
            ssh_port,
            &std::fs::read_to_string(dir.path().join("host_key.pub")).expect("read host_key.pub"),
        );
        eprintln!(
            "pool of {} VM(s) and {} user(s) ready in {:?}",
            vms.len(),
            self.users,
            started.elapsed()
        );
        Pool {
            gateway,
            vms,
            users,
            keys,
            ca,
            known_hosts,
            ssh_port,
            admin_port,
            dir,
        }
    }
}

/// A gateway in front of `sshd` VMs, with test users who can log in through it.
/// Field order is drop order: the gateway goes first, its files last.
pub struct Pool {
    pub gateway: GatewayProcess,
    pub vms: Vec<SshdVm>,
    pub users: TestUsers,
    keys: BTreeMap<String, UserKey>,
    pub ca: UserCa,
    known_hosts: KnownHosts,
    pub ssh_port: u16,
    pub admin_port: u16,
    dir: TempDir,
}

impl Pool {
    /// A builder with no VMs and one user.
    pub fn builder() -> PoolBuilder {
        PoolBuilder {
            vms: Vec::new(),
            users: 1,
            ssh_lines: Vec::new(),
            health_lines: Vec::new(),
            vm_config: None,
            gateway_env: Vec::new(),
            extra_toml: String::new(),
        }
    }

    /// Login name of test user `i` (1-based).
    pub fn user(&self, i: usize) -> String {
        self.users.user(i).name.clone()
    }

    /// User `i`'s key (listed in the gateway's authorized_keys, not CA-signed).
    pub fn key(&self, i: usize) -> &UserKey {
        &self.keys[&self.user(i)]
    }

    /// An OpenSSH client for user `i` through the gateway, checking the gateway's host key
    /// strictly.
    pub fn client(&self, i: usize) -> SshClient {
        SshClient::new(&self.user(i), self.ssh_port, self.known_hosts.path()).user_key(self.key(i))
    }

    /// A client of user `name` through the gateway with no identity set.
    pub fn client_as(&self, name: &str) -> SshClient {
        SshClient::new(name, self.ssh_port, self.known_hosts.path())
    }

    /// The client's known_hosts (holds the gateway's host key).
    pub fn known_hosts(&self) -> &Path {
        self.known_hosts.path()
    }

    /// The VM called `name`.
    pub fn vm(&self, name: &str) -> &SshdVm {
        self.vms
            .iter()
            .find(|v| v.name() == name)
            .unwrap_or_else(|| panic!("no VM {name}"))
    }

    /// The VM called `name`, mutably (to stop it).
    pub fn vm_mut(&mut self, name: &str) -> &mut SshdVm {
        self.vms
            .iter_mut()
            .find(|v| v.name() == name)
            .unwrap_or_else(|| panic!("no VM {name}"))
    }

    /// The gateway's temp dir (config, keys, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The gateway's log so far, without ANSI colour codes.
    pub fn log(&self) -> String {
        strip_ansi(&self.gateway.log_text())
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
        self.ca.sign(&key, &user, DIRECT_CERT_VALIDITY);
        let known = KnownHosts::new();
        known.add_vm(self.vm(vm));
        let client = SshClient::new(&user, self.vm(vm).port(), known.path()).user_key(&key);
        (client, key, known)
    }

    /// The gateway's `/metrics` text (admin listener).
    pub fn metrics(&self) -> String {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.admin_port));
        let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .expect("connect to the admin listener");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("set a read timeout");
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .expect("send GET /metrics");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read /metrics");
        assert!(response.starts_with("HTTP/1."), "{response}");
        assert!(
            response.lines().next().unwrap_or_default().contains(" 200"),
            "{response}"
        );
        response
    }

    /// The gateway's resident set size in KiB (`VmRSS` of `/proc/<pid>/status`).
    pub fn gateway_rss_kib(&self) -> u64 {
        let pid = self.gateway.pid().expect("the gateway runs");
        rss_kib(pid).expect("read the gateway's VmRSS")
    }
}

/// Waits for the gateway's "VM is up" line naming `vm`.
pub fn wait_for_vm_up(gateway: &GatewayProcess, vm: &str, timeout: Duration) {
    wait_for_health_line(gateway, vm, "VM is up", timeout);
}

/// Waits for the gateway's "VM is down" line naming `vm`.
pub fn wait_for_vm_down(gateway: &GatewayProcess, vm: &str, timeout: Duration) {
    wait_for_health_line(gateway, vm, "VM is down", timeout);
}

fn wait_for_health_line(gateway: &GatewayProcess, vm: &str, what: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let seen = strip_ansi(&gateway.log_text())
            .lines()
            .any(|l| l.contains(what) && has_field(l, "vm", vm));
        if seen {
            return;
        }
        if Instant::now() >= deadline {
            panic!(
                "no {what:?} line for {vm} in the gateway log after {timeout:?}:\n{}",
                gateway.log_text()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A session held open through the gateway: `echo $POOLGATE_VM; exec cat`, so it counts as load
/// until [`end`](Self::end) closes its stdin (or drop kills it).
pub struct HeldSession {
    child: Child,
    stdin: Option<ChildStdin>,
    /// Where it landed.
    pub vm: String,
}

impl HeldSession {
    /// Opens the session and waits (at most `timeout`) for the VM name it prints.
    pub fn open(client: &SshClient, timeout: Duration) -> Self {
        let mut child = client
            .command("echo $POOLGATE_VM; exec cat")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ssh");
        let stdin = child.stdin.take();
        let out = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        let mut session = HeldSession {
            child,
            stdin,
            vm: String::new(),
        };
        let line = rx.recv_timeout(timeout).unwrap_or_default();
        if line.trim().is_empty() {
            let mut err = String::new();
            kill_tree(session.child.id());
            let _ = session.child.wait();
            if let Some(mut e) = session.child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("held session printed no VM name within {timeout:?}; ssh stderr: {err}");
        }
        session.vm = line.trim().to_string();
        session
    }

    /// Ends the session cleanly (EOF to `cat`) and waits for ssh to exit.
    pub fn end(mut self) {
        self.stdin = None;
        let status = wait_for_exit(
            &mut self.child,
            Duration::from_secs(10),
            "ssh of a held session",
        );
        assert!(status.success(), "held session ended with {status}");
    }
}

impl Drop for HeldSession {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            kill_tree(self.child.id());
            let _ = self.child.wait();
        }
    }
}

/// Path of a unique scratch directory name in a test user's home, for remote files.
pub fn remote_scratch(tag: &str, pool: &Pool) -> String {
    format!("poolgate-e2e-{tag}-{}", pool.ssh_port)
}
