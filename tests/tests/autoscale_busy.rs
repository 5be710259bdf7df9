//! The busy check end to end (issue 14, item 4): work that does not flow through the gateway
//! keeps its VM. Real OpenSSH `sshd` "VMs" managed by exec-provider scripts, a real gateway with
//! autoscaling on and short idle times, real `ssh` clients, `nohup` and `tmux`.
//!
//! Every VM's sshd runs in a PID namespace of its own (`unshare --pid --fork --mount-proc`), like
//! a VM with its own process table, so the gateway's DEFAULT, unmodified `busy_command` sees
//! only that VM's processes (tests running in parallel do not see each other's jobs). Stopping
//! the VM ends the namespace and every process in it, as stopping a VM would.
//!
//! - A user starts `nohup sleep 600 &` (or a detached `tmux new -d` session) and logs off: the
//!   VM stays in service through several scale-in windows, `/api/v1/vms` shows it `busy`; once
//!   the job is killed, the VM is stopped within one scale-in window.
//! - The front door refuses logins as the probe account.
//! - The certificate the gateway signs for the check runs the check and nothing else: no shell,
//!   no other command, no pty, not for another user.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use poolgate_tests::jupyter::{require_jupyter, venv_bin};
use poolgate_tests::*;

/// The probe account the default configuration logs in as.
const PROBE: &str = "poolgate-probe";
/// Scale-in window of these tests.
const SCALE_IN_AFTER: Duration = Duration::from_secs(6);
/// What "within one scale-in window" may add: a tick, a check and the stop script.
const SLACK: Duration = Duration::from_secs(3);

/// Creates the probe account the way deploy/cloud-init/pool-vm.yaml does (system account, no
/// password, shell /bin/sh).
fn ensure_probe_account() {
    ensure_system_account(PROBE);
}

/// A VM whose sshd runs in its own PID namespace, started and stopped by exec-provider scripts.
struct NsVm {
    /// Keeps the config, host key and log.
    fixture: SshdVm,
    /// The `unshare` process (its child is the namespace's init, sshd).
    ns_pid: PathBuf,
    scripts: ExecScripts,
    /// Ends the namespace (sshd and every process in it), whatever happens to the test.
    _cleanup: KillPidFile,
}

impl NsVm {
    fn new(dir: &Path, ca: &UserCa) -> Self {
        // The probe account may log in only with the principal `poolgate-probe`, only by
        // certificate, and without pty or forwarding (as deploy/cloud-init/pool-vm.yaml sets up).
        let principals = dir.join("probe_principals");
        std::fs::write(&principals, format!("restrict {PROBE}\n")).expect("principals file");
        let mut fixture = SshdVm::builder("vm-a")
            .trusted_user_ca_keys(ca.public_key_path())
            .config_trailer(&format!("Match User {PROBE}"))
            .config_trailer(&format!(
                "  AuthorizedPrincipalsFile {}",
                principals.display()
            ))
            .config_trailer("  AuthorizedKeysFile none")
            .start();
        fixture.stop();
        let ns_pid = dir.join("vm-a.ns.pid");
        let (pid, cfg, log, port) = (
            ns_pid.display(),
            fixture.config_path().display(),
            fixture.log_path().display(),
            fixture.port(),
        );
        let start = format!(
            "setsid {unshare} --pid --fork --mount-proc --kill-child {sshd} -D -e -f {cfg} </dev/null >>{log} 2>&1 &\n\
             echo $! >{pid}",
            unshare = tool("unshare").display(),
            sshd = tool("sshd").display(),
        );
        // Stopping the VM: the namespace's init (sshd) ends, and with it every process inside.
        let stop = format!(
            "outer=$(cat {pid})\n\
             for init in $(cat /proc/\"$outer\"/task/*/children 2>/dev/null); do kill -KILL \"$init\"; done\n\
             i=0\n\
             while kill -0 \"$outer\" 2>/dev/null && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done\n\
             rm -f {pid}"
        );
        let scripts =
            ExecScripts::write(dir, "vm-a", &ns_pid, &[("ssh_port", port)], &start, &stop);
        Self {
            fixture,
            _cleanup: KillPidFile(ns_pid.clone()),
            ns_pid,
            scripts,
        }
    }

    /// The namespace's init (sshd), from the `unshare` process's children.
    fn init_pid(&self) -> Option<u32> {
        let outer = std::fs::read_to_string(&self.ns_pid).ok()?;
        let outer = outer.trim();
        std::fs::read_dir(format!("/proc/{outer}/task"))
            .ok()?
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
            .flat_map(|c| {
                c.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect::<Vec<u32>>()
            })
            .next()
    }

    /// Processes inside the VM's namespace whose name (`comm`) is `name` and whose command line
    /// starts with `cmdline` (words joined by spaces): host pids.
    fn processes(&self, name: &str, cmdline: &str) -> Vec<u32> {
        let Some(init) = self.init_pid() else {
            return Vec::new();
        };
        let Ok(ns) = std::fs::read_link(format!("/proc/{init}/ns/pid")) else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let dir = entry.path();
            if std::fs::read_link(dir.join("ns/pid")).ok().as_ref() != Some(&ns) {
                continue;
            }
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            let args = std::fs::read(dir.join("cmdline")).unwrap_or_default();
            let args = String::from_utf8_lossy(&args).replace('\0', " ");
            if comm.trim() == name && args.starts_with(cmdline) {
                found.push(pid);
            }
        }
        found
    }

    fn run_start_script(&self) {
        let out = run_with_timeout(
            Command::new(&self.scripts.start).arg("vm-a"),
            Duration::from_secs(10),
        );
        assert!(out.status.success(), "start.sh failed");
        self.fixture
            .wait_for_log("Server listening on 127.0.0.1", Duration::from_secs(10));
    }
}

/// A gateway with autoscaling over one [`NsVm`] and the default busy check; it derefs to its
/// [`GatewayPool`]. Field order is drop order: the VM's namespace ends first, the scripts go last.
struct BusyPool {
    vm: NsVm,
    pool: GatewayPool,
    /// User 1 through the gateway, patient enough to wait for the VM to start.
    client: SshClient,
    /// The exec provider's scripts.
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for BusyPool {
    type Target = GatewayPool;
    fn deref(&self) -> &GatewayPool {
        &self.pool
    }
}

impl BusyPool {
    /// Needs root, sshd, ssh, ssh-keygen, unshare, useradd and usermod.
    fn start() -> Self {
        ensure_probe_account();
        let dir = tempfile::Builder::new()
            .prefix("poolgate-busy-e2e-")
            .tempdir()
            .expect("temp dir");
        let ca = UserCa::generate();
        let vm = NsVm::new(dir.path(), &ca);
        vm.run_start_script();
        // No busy_command / busy_user: the defaults are under test.
        let pool = GatewayPool::builder()
            .users(1)
            .user_ca(ca)
            .known_vm(&vm.fixture)
            .config_toml(&vm.scripts.pool_toml(Duration::from_secs(10)))
            .config_toml(&format!(
                "[autoscale]\nenabled = true\nmin_vms = 0\nmax_vms = 1\nspare_vms = 0\n\
                 scale_in_after = \"{window}s\"\nscale_to_zero_after = \"{window}s\"\ntick = \"1s\"\n\
                 cooldown = \"1s\"\nboot_estimate = \"2s\"\nhold_connect_for = \"30s\"\nbusy_timeout = \"10s\"\n",
                window = SCALE_IN_AFTER.as_secs(),
            ))
            // Every check with its duration (the first of a kind is logged at info anyway).
            .gateway_env("POOLGATE_LOG", "info,gateway::autoscale::busy=debug")
            .start();
        // The same key for the probe's name too: the front door must still refuse it.
        pool.authorize(PROBE, pool.key(1));
        let client = pool.client(1).timeout(Duration::from_secs(40));
        BusyPool {
            vm,
            pool,
            client,
            _dir: dir,
        }
    }

    fn vm_json(&self) -> serde_json::Value {
        self.vms_json()[0].clone()
    }

    fn state(&self) -> String {
        self.vm_json()["state"]
            .as_str()
            .unwrap_or("none")
            .to_string()
    }

    /// Runs `command` as the user through the gateway (waking the VM if needed) and logs off.
    fn run_and_log_off(&self, command: &str) {
        let out = self.client.run(command);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{command}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    /// The job keeps the VM through several scale-in windows; once `find_job` finds it no more
    /// (after `end_job`), the VM is stopped within one window. Returns that time.
    fn kept_while_running_then_stopped(&self, what: &str, job: impl Fn() -> Vec<u32>) -> Duration {
        assert!(
            poll(Duration::from_secs(5), || !job().is_empty()),
            "{what} is not running on the VM"
        );
        // The check has run and said busy.
        assert!(
            poll(Duration::from_secs(30), || self.vm_json()["busy"].as_bool()
                == Some(true)),
            "{what}: the VM never showed busy: {}\n{}",
            self.vm_json(),
            self.log()
        );
        // Several scale-in windows with nobody logged in: still serving.
        let began = Instant::now();
        let mut seen = Vec::new();
        while began.elapsed() < SCALE_IN_AFTER * 3 {
            seen.push(self.state());
            std::thread::sleep(Duration::from_millis(300)); // sampling the state, not waiting for it
        }
        assert!(
            seen.iter().all(|s| s == "healthy"),
            "{what}: a VM running detached work was drained or stopped: {seen:?}\n{}",
            self.log()
        );
        assert!(!job().is_empty(), "{what} died on its own");
        self.gateway.wait_for_log(
            "work is running on the VM outside the gateway",
            Duration::from_secs(1),
        );
        let status = http_get(self.admin, "/status").body;
        assert!(
            status.contains("kept: work running"),
            "{what}: the status page does not say why the VM is kept"
        );
        let metrics = self.metrics();
        assert!(
            metrics.contains("poolgate_vm_busy{vm=\"vm-a\"} 1"),
            "{what}: poolgate_vm_busy"
        );

        // The work ends: stopped within one scale-in window.
        for pid in job() {
            kill_tree(pid);
        }
        assert!(
            poll(Duration::from_secs(10), || job().is_empty()),
            "{what} survived SIGKILL"
        );
        let ended = Instant::now();
        assert!(
            poll(SCALE_IN_AFTER + SLACK + Duration::from_secs(20), || self
                .state()
                == "stopped"),
            "{what}: VM not stopped after the work ended; state {}\n{}",
            self.state(),
            self.log()
        );
        let took = ended.elapsed();
        eprintln!("{what}: VM stopped {took:?} after the work ended");
        let mut check_ms: Vec<u64> = self
            .gateway
            .log_text()
            .lines()
            .filter_map(|l| l.split("check_ms=").nth(1))
            .filter_map(|v| v.split_whitespace().next()?.parse().ok())
            .collect();
        check_ms.sort_unstable();
        assert!(!check_ms.is_empty(), "no busy check logged its duration");
        eprintln!(
            "{what}: {} busy checks over SSH, median {} ms, max {} ms",
            check_ms.len(),
            check_ms[check_ms.len() / 2],
            check_ms[check_ms.len() - 1]
        );
        assert!(
            took <= SCALE_IN_AFTER + SLACK,
            "{what}: stopped {took:?} after the work ended; more than one scale-in window ({SCALE_IN_AFTER:?} + {SLACK:?})\n{}",
            self.log()
        );
        took
    }
}

#[test]
fn a_nohup_job_keeps_its_vm_until_it_ends() {
    require_tools!("sshd", "ssh", "ssh-keygen", "unshare", "useradd", "usermod");
    require_root!();
    let pool = BusyPool::start();
    // The front door refuses the probe's name, even with a key listed for it.
    let probe = pool.client_as(PROBE).user_key(pool.key(1)).run("true");
    assert_eq!(probe.status.code(), Some(255), "a login as {PROBE} got in");
    pool.gateway.wait_for_log(
        "reserved for the autoscaler's busy check",
        Duration::from_secs(5),
    );

    pool.run_and_log_off("nohup sleep 600 >/dev/null 2>&1 </dev/null &");
    let took = pool.kept_while_running_then_stopped("nohup sleep 600", || {
        pool.vm.processes("sleep", "sleep 600")
    });
    pool.gateway
        .wait_for_log("action=Drain(\"vm-a\")", Duration::from_secs(5));
    pool.gateway
        .wait_for_log("result=\"stop\"", Duration::from_secs(5));
    let metrics = pool.metrics();
    for result in ["busy", "idle"] {
        let series = format!("poolgate_autoscale_busy_checks_total{{result=\"{result}\"}}");
        let count = sample(&metrics, &series).unwrap_or(0.0);
        assert!(count >= 1.0, "no {result} check counted:\n{metrics}");
    }
    eprintln!("nohup: stopped {took:?} after the job ended");
}

#[test]
fn a_detached_tmux_session_keeps_its_vm_until_it_ends() {
    require_tools!(
        "sshd",
        "ssh",
        "ssh-keygen",
        "unshare",
        "useradd",
        "usermod",
        "tmux"
    );
    require_root!();
    let pool = BusyPool::start();
    // A tmux server of the test user left by an aborted earlier run would make the VM look
    // busy (and refuse the session name): gone first.
    pool.run_and_log_off("tmux kill-server 2>/dev/null; tmux new-session -d -s training");
    let took = pool.kept_while_running_then_stopped("tmux session", || {
        pool.vm.processes("tmux: server", "tmux new-session")
    });
    eprintln!("tmux: stopped {took:?} after the session ended");
}

/// VS Code Remote-SSH keeps its server up to 3 hours after a lost connection, for a reconnect:
/// that server, its terminal host and an idle terminal are no reason to keep the VM, a job
/// started in one of its terminals is. The editor cannot be downloaded here, so the test starts
/// its process tree (the paths and names the default check reads) over a real login, detached,
/// as the editor starts its server.
#[test]
fn a_vs_code_server_left_behind_does_not_keep_its_vm_but_a_job_in_its_terminal_does() {
    require_tools!("sshd", "ssh", "ssh-keygen", "unshare", "useradd", "usermod");
    require_root!();
    let pool = BusyPool::start();
    let home = TestUsers::ensure(1).user(1).home.clone();
    let editor = home.join(".vscode-server");
    let _ = std::fs::remove_dir_all(&editor);
    // The server's node (a copy of /bin/sh under that name) runs two terminals: one at its
    // prompt (reading a FIFO nobody writes to), one running a job.
    let server = "$HOME/.vscode-server/cli/servers/Stable-4fe60c8b/server";
    let integration = format!(
        "{server}/out/vs/workbench/contrib/terminal/common/scripts/shellIntegration-bash.sh"
    );
    pool.run_and_log_off(&format!(
        "set -e; mkdir -p {server}; cp /bin/sh {server}/node; mkfifo -m 600 {server}/terminal-in; \
         nohup {server}/node -c '/bin/bash --init-file {integration} -c \"read -r l <> {server}/terminal-in\" & \
         /bin/bash --init-file {integration} -c \"sleep 700; true\" & wait' >/dev/null 2>&1 </dev/null &"
    ));
    let editor_server = || pool.vm.processes("node", &format!("{}/", editor.display()));
    assert!(
        poll(Duration::from_secs(5), || editor_server().len() == 1),
        "the editor's server did not start"
    );
    let took = pool.kept_while_running_then_stopped("a job in a VS Code terminal", || {
        pool.vm.processes("sleep", "sleep 700")
    });
    pool.gateway
        .wait_for_log("action=Drain(\"vm-a\")", Duration::from_secs(5));
    // The admin API says `stopped` from the moment the stop begins; the autoscaler logs the
    // stop's result once the stop script has ended and the provider lists the VM stopped.
    pool.gateway
        .wait_for_log("result=\"stop\"", Duration::from_secs(15));
    // The server and its idle terminal were still there when the VM was judged idle; they
    // went with it.
    assert!(
        editor_server().is_empty(),
        "the editor's server outlived the stopped VM"
    );
    eprintln!("VS Code server left behind: VM stopped {took:?} after the job ended");
    let _ = std::fs::remove_dir_all(&editor);
}

/// The certificate the gateway signs for the check, used with the real OpenSSH client: sshd runs
/// the busy check whatever is asked, gives no pty, and the certificate is good for no one else.
#[test]
fn the_probe_certificate_runs_only_the_busy_check() {
    require_tools!("sshd", "ssh", "ssh-keygen", "unshare", "useradd", "usermod");
    require_root!();
    ensure_probe_account();
    let users = TestUsers::ensure(1);
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = UserCa::generate();
    let vm = NsVm::new(dir.path(), &ca);
    vm.run_start_script();
    let known = KnownHosts::new();
    known.add_vm(&vm.fixture);

    // What the gateway does: a fresh key, a certificate pinned to the default busy command.
    let (ca_key, _) =
        gateway::ssh::keys::load_or_generate(ca.private_key_path(), "").expect("CA key");
    let ca_signer = gateway::ssh::keys::UserCa::new(ca_key, Duration::from_secs(300));
    let key_path = dir.path().join("probe_key");
    generate_ed25519(&key_path, "probe");
    let (key, _) = gateway::ssh::keys::load_or_generate(&key_path, "").expect("probe key");
    let command =
        gateway::ssh::forced_command::shell_quote(&poolgate_config::default_busy_command());
    let cert = ca_signer
        .sign_check(key.public_key(), PROBE, &command, Duration::from_secs(60))
        .expect("sign");
    let cert_path = dir.path().join("probe_key-cert.pub");
    std::fs::write(&cert_path, cert.to_openssh().expect("encode cert")).expect("write cert");
    let probe = SshClient::new(PROBE, vm.fixture.port(), known.path())
        .identity(&key_path)
        .certificate(&cert_path);

    let is_check_output = |out: &std::process::Output| {
        let stdout = String::from_utf8_lossy(&out.stdout);
        (out.status.code() == Some(0) && stdout.starts_with("busy: "))
            || (out.status.code() == Some(1) && stdout.starts_with("idle: "))
    };
    // Another command: the check runs instead.
    let out = probe.run("echo INJECTED; id");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        is_check_output(&out) && !stdout.contains("INJECTED") && !stdout.contains("uid="),
        "a command other than the check ran: {:?} {stdout} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // A shell, fed commands on stdin: the check runs instead.
    let out = run_with_input(
        &mut probe.ssh_command(&["-T"], None),
        b"echo INJECTED\nid\n",
        Duration::from_secs(30),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        is_check_output(&out) && !stdout.contains("INJECTED") && !stdout.contains("uid="),
        "the probe certificate opened a shell: {:?} {stdout} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // A shell with a pty: refused a pty (no permit-pty), and never a shell.
    let out = run_with_input(
        &mut probe.ssh_command(&["-tt"], None),
        b"echo INJECTED\nexit\n",
        Duration::from_secs(30),
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        !stdout.contains("INJECTED") && stderr.contains("PTY allocation request failed"),
        "the probe got a pty or a shell: {:?} {stdout:?} {stderr}",
        out.status
    );
    // The certificate names the probe only: no login as a real user with it.
    let user = users.user(1).name.clone();
    let out = SshClient::new(&user, vm.fixture.port(), known.path())
        .identity(&key_path)
        .certificate(&cert_path)
        .run("echo INJECTED");
    assert_eq!(
        out.status.code(),
        Some(255),
        "the probe certificate logged in as {user}"
    );
    // In its own namespace with nobody logged in, the VM is idle.
    let out = probe.run("");
    assert!(
        out.status.code() == Some(1),
        "an empty VM should be idle: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The default check itself, run as the probe account in a fresh PID namespace (one VM's process
/// table) next to processes of a login user: real work counts, idle per-user daemons, Jupyter
/// servers, idle kernels, terminals left open at their prompt (a real jupyter_server's, an
/// editor's) and the editor's server do not; a kernel computing and a job in a terminal do.
#[test]
fn the_default_check_tells_work_from_idle_daemons_kernels_terminals_and_editor_servers() {
    require_tools!(
        "unshare", "setpriv", "sleep", "pgrep", "useradd", "usermod", "curl"
    );
    require_root!();
    if !require_jupyter() {
        return;
    }
    ensure_probe_account();
    let users = TestUsers::ensure(1);
    let user = users.user(1);
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let check = dir.path().join("busy-check");
    std::fs::write(&check, poolgate_config::DEFAULT_BUSY_SCRIPT).expect("write check");
    // A per-user daemon: `sleep` under the name ssh-agent.
    let agent = dir.path().join("ssh-agent");
    std::fs::copy(tool("sleep"), &agent).expect("copy sleep");
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let as_user = format!(
        "{} --reuid={} --regid={} --clear-groups",
        tool("setpriv").display(),
        user.uid,
        user.gid
    );
    let as_probe = format!(
        "{} --reuid={PROBE} --regid={PROBE} --clear-groups",
        tool("setpriv").display()
    );
    // The system Python (a user cannot run root's pyenv shims).
    let python = "/usr/bin/python3";
    assert!(
        Path::new(python).exists(),
        "{python} is missing (apt-get install python3)"
    );
    let sleep = tool("sleep").display().to_string();
    // Python programs that sleep a minute, under the names that matter: a Jupyter server as its
    // console script runs (`PYTHON .../bin/jupyterhub-singleuser`), and a user's job in a folder
    // whose name mentions Jupyter.
    let sleeper = "import time\ntime.sleep(60)\n";
    let singleuser = dir.path().join("bin/jupyterhub-singleuser");
    let job = dir.path().join("jupyter-notebooks/train-jupyter-lab.py");
    for script in [&singleuser, &job] {
        std::fs::create_dir_all(script.parent().expect("script dir")).expect("script dir");
        std::fs::write(script, sleeper).expect("write script");
    }
    // What VS Code Remote-SSH leaves in a user's home after a lost connection (the editor's own
    // server cannot be downloaded here; the process tree is rebuilt with its paths and names):
    // the server's `node` runs the server, extension hosts and the terminal host, whose children
    // are the terminals' shells; the Python tool extensions run `PYTHON .../lsp_server.py`.
    let server = dir
        .path()
        .join("home/.vscode-server/cli/servers/Stable-4fe60c8b/server");
    let extensions = dir.path().join("home/.vscode-server/extensions");
    let lsp = extensions.join("ms-python.black-formatter-2025.2.0/bundled/tool/lsp_server.py");
    for d in [server.clone(), lsp.parent().expect("lsp dir").to_path_buf()] {
        std::fs::create_dir_all(d).expect("editor dirs");
    }
    // The server's node, standing in: a copy of /bin/sh under the name `node`, which starts its
    // children the way the terminal host does (they are its children, it waits).
    let node = server.join("node");
    std::fs::copy("/bin/sh", &node).expect("copy sh");
    std::fs::set_permissions(&node, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::write(&lsp, "import time\ntime.sleep(60)\n").expect("lsp server");
    let integration =
        server.join("out/vs/workbench/contrib/terminal/common/scripts/shellIntegration-bash.sh");
    // A shell at its prompt: reads a FIFO nobody writes to (opened read-write, so the open
    // itself does not block), no child process.
    let fifo = dir.path().join("terminal-input");
    let node = node.display();
    let editor = |terminal: &str| {
        format!(
            "mkfifo -m 666 {fifo} 2>/dev/null\n{as_user} {node} -c '/bin/bash --init-file {integration} -c \"{terminal}\" & {python} {lsp} & wait' &",
            fifo = fifo.display(),
            integration = integration.display(),
            lsp = lsp.display(),
        )
    };
    let prompt = format!("read -r line <> {}", fifo.display());
    // A real jupyter_server of the user with a terminal open (JupyterLab's Terminal), as a browser
    // tab closed on it leaves it. The venv may sit under root's home, which the user cannot
    // enter: the server gets the right to read through directories, and nothing else.
    let jupyter_port = free_port();
    let token = "busy-check-test";
    let terminals = format!("http://127.0.0.1:{jupyter_port}/api/terminals");
    let jupyter = |then: &str| {
        format!(
            "{as_user} --inh-caps=+dac_read_search --ambient-caps=+dac_read_search env HOME={home} SHELL=/bin/bash \
             {server} --port={jupyter_port} --ip=127.0.0.1 --IdentityProvider.token={token} \
             --ServerApp.root_dir={root} --no-browser >{log} 2>&1 &\n\
             i=0; until {curl} -sf -X POST -H 'Authorization: token {token}' {terminals} >/dev/null; do \
             i=$((i + 1)); [ $i -lt 300 ] || {{ cat {log}; exit 1; }}; sleep 0.1; done\n{then}",
            home = user.home.display(),
            server = venv_bin("jupyter-server").display(),
            root = dir.path().display(),
            log = dir.path().join("jupyter.log").display(),
            curl = tool("curl").display(),
        )
    };
    // Types a command into the terminal over its websocket, as the browser does, and waits for
    // the process to appear.
    let type_in_terminal = |command: &str, process: &str| {
        format!(
            "{python} -c 'import asyncio, json, tornado.websocket as w\n\
             async def main():\n  ws = await w.websocket_connect(\"ws://127.0.0.1:{jupyter_port}/terminals/websocket/1?token={token}\")\n  \
             await ws.write_message(json.dumps([\"stdin\", \"{command}\\r\"]))\n  ws.close()\n\
             asyncio.run(main())'\n\
             i=0; until {pgrep} -x -u {uid} {process} >/dev/null; do i=$((i + 1)); [ $i -lt 100 ] || exit 1; sleep 0.1; done",
            python = venv_bin("python").display(),
            pgrep = tool("pgrep").display(),
            uid = user.uid,
        )
    };
    // Starts `setup` (processes of the user) in a new PID namespace, then runs the check there.
    let run = |setup: &str| -> (Option<i32>, String) {
        let script = format!(
            "{setup}\nsleep 0.5\necho \"user processes: $({pgrep} -c -u {uid})\"\n{as_probe} /bin/sh {check}\n",
            pgrep = tool("pgrep").display(),
            uid = user.uid,
            check = check.display()
        );
        let out = run_with_timeout(
            Command::new(tool("unshare"))
                .args([
                    "--pid",
                    "--fork",
                    "--mount-proc",
                    "--kill-child",
                    "/bin/sh",
                    "-c",
                ])
                .arg(script),
            Duration::from_secs(60),
        );
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    // What runs, how many processes the user has, the check's exit status and a word of its line.
    let cases = [
        ("nobody there", String::new(), 0, 1, "idle: "),
        (
            "a nohup job",
            format!("{as_user} nohup {sleep} 60 >/dev/null 2>&1 &"),
            1,
            0,
            "busy: sleep",
        ),
        (
            "an idle per-user daemon",
            format!("{as_user} {} 60 &", agent.display()),
            1,
            1,
            "idle: ",
        ),
        (
            "an idle Jupyter server",
            format!("{as_user} {python} {} --port=8888 &", singleuser.display()),
            1,
            1,
            "idle: ",
        ),
        (
            "a job whose path names Jupyter",
            format!(
                "{as_user} nohup {python} {} >/dev/null 2>&1 &",
                job.display()
            ),
            1,
            0,
            "busy: python3",
        ),
        (
            "an idle kernel",
            format!(
                "{as_user} {python} -c 'import time; time.sleep(60)' -m ipykernel_launcher -f k.json &"
            ),
            1,
            1,
            "idle: ",
        ),
        (
            "a kernel running a cell",
            format!("{as_user} {python} -c 'while True: pass' -m ipykernel_launcher -f k.json &"),
            1,
            0,
            "busy: a Jupyter kernel",
        ),
        (
            "a kernel whose cell computes a fifth of the time",
            format!(
                "{as_user} {python} -c 'import time\nwhile True:\n  t = time.time()\n  while time.time() - t < 0.02: pass\n  time.sleep(0.08)' -m ipykernel_launcher -f k.json &"
            ),
            1,
            0,
            "busy: a Jupyter kernel",
        ),
        (
            "the editor server left after a lost connection: idle terminal, language server",
            editor(&prompt),
            3,
            1,
            "idle: ",
        ),
        (
            "a JupyterLab terminal left open, at its prompt",
            jupyter(""),
            2,
            1,
            "idle: ",
        ),
        (
            "a job started in a JupyterLab terminal",
            jupyter(&type_in_terminal(&format!("{sleep} 60"), "sleep")),
            3,
            0,
            "busy: sleep",
        ),
        (
            "a job started in the editor's terminal",
            editor(&format!("{sleep} 60; true")),
            4,
            0,
            "busy: sleep",
        ),
        (
            "a terminal whose shell computes itself",
            editor("while :; do :; done"),
            3,
            0,
            "busy: a shell in a VS Code terminal",
        ),
        (
            "an idle shell outside the editor",
            format!(
                "mkfifo -m 666 {fifo} 2>/dev/null\n{as_user} /bin/bash -c '{prompt}' &",
                fifo = fifo.display()
            ),
            1,
            0,
            "busy: bash",
        ),
        (
            "a job hidden by /proc mounted hidepid=2",
            format!(
                "mount -o remount,hidepid=2 /proc\n{as_user} nohup {sleep} 60 >/dev/null 2>&1 &"
            ),
            1,
            2,
            "cannot read other users' processes",
        ),
    ];
    for (what, setup, processes, status, needle) in cases {
        let started = Instant::now();
        let (code, output) = run(&setup);
        assert_eq!(code, Some(status), "{what}: {output}");
        // The count is taken as root, who sees through hidepid.
        assert!(
            output.contains(&format!("user processes: {processes}\n")),
            "{what}: the user's processes did not all start: {output}"
        );
        assert!(output.contains(needle), "{what}: {output}");
        if status == 0 {
            assert!(
                output.contains(&user.name),
                "{what}: names the user: {output}"
            );
        }
        eprintln!(
            "{what}: exit {status} in {:?}: {}",
            started.elapsed(),
            output.trim().replace('\n', " | ")
        );
    }
}
