//! The `exec` provider end to end: operator scripts that start and stop a real OpenSSH `sshd`
//! "VM", a real gateway with autoscaling on, real `ssh` clients.
//!
//! - The pool starts at zero (the VM is stopped); an `ssh` connects, is held while the autoscaler
//!   runs the start script, sees "starting a VM for you", and then its command runs on the VM.
//! - While a session is open, the VM is never drained or stopped, however long the idle timers.
//! - When everyone has left, the VM is drained and the stop script stops it.

mod admin_common;

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use admin_common::{http_get, poll};
use poolgate_tests::*;

/// Kills the sshd the scripts started, whatever happens to the test.
struct KillPidFile(PathBuf);

impl Drop for KillPidFile {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.0)
            && let Ok(pid) = pid.trim().parse::<u32>()
        {
            kill_tree(pid);
        }
    }
}

fn script(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\nset -eu\n{body}\n")).expect("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod script");
    path.display().to_string()
}

fn vm_state(admin: SocketAddr) -> String {
    let vms = http_get(admin, "/api/v1/vms").json();
    vms[0]["state"].as_str().unwrap_or("none").to_string()
}

#[test]
fn exec_provider_wakes_a_stopped_vm_for_ssh_and_stops_it_only_when_idle() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let users = TestUsers::ensure(1);
    let user = users.user(1).name.clone();
    let dir = tempfile::Builder::new()
        .prefix("poolgate-exec-e2e-")
        .tempdir()
        .expect("temp dir");
    let ca = UserCa::generate();

    // A VM whose sshd the scripts control: the fixture writes its config and host key, then
    // steps aside.
    let mut vm = SshdVm::builder("vm-a")
        .trusted_user_ca_keys(ca.public_key_path())
        .start();
    let known = KnownHosts::at(&dir.path().join("known_hosts"));
    known.add_vm(&vm);
    vm.stop();
    let config_text = std::fs::read_to_string(vm.config_path()).expect("read sshd config");
    let pid_file = config_text
        .lines()
        .find_map(|l| l.strip_prefix("PidFile "))
        .map(PathBuf::from)
        .expect("the fixture's sshd config names a PidFile");
    let _cleanup = KillPidFile(pid_file.clone());
    let sshd = tool("sshd");
    let (pid, cfg, port) = (pid_file.display(), vm.config_path().display(), vm.port());
    let list = script(
        dir.path(),
        "list.sh",
        &format!(
            "if [ -f {pid} ] && kill -0 \"$(cat {pid})\" 2>/dev/null; then s=running; else s=stopped; fi\n\
             echo \"{{\\\"vms\\\":[{{\\\"name\\\":\\\"vm-a\\\",\\\"host\\\":\\\"127.0.0.1\\\",\\\"ssh_port\\\":{port},\\\"state\\\":\\\"$s\\\"}}]}}\""
        ),
    );
    let start = script(
        dir.path(),
        "start.sh",
        &format!("[ \"$1\" = vm-a ]\n{} -f {cfg}", sshd.display()),
    );
    let stop = script(
        dir.path(),
        "stop.sh",
        &format!("[ \"$1\" = vm-a ]\nkill \"$(cat {pid})\"\nrm -f {pid}"),
    );

    let keys_dir = dir.path().join("authorized_keys");
    std::fs::create_dir_all(&keys_dir).expect("mkdir");
    let key = UserKey::generate(&user);
    std::fs::write(keys_dir.join(&user), format!("{}\n", key.public_key_line())).expect("key");
    let host_key = dir.path().join("host_key");
    generate_ed25519(&host_key, "exec e2e gateway");
    let ssh_port = free_port();
    let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    // This VM's sshd shares the machine's process table, so the busy check would see every
    // other test's processes: off here (tests/tests/autoscale_busy.rs runs it on VMs with a PID
    // namespace each).
    let config = format!(
        "[listen]\nssh = \"127.0.0.1:{ssh_port}\"\nhttp = \"127.0.0.1:{http}\"\nadmin = \"{admin}\"\n\
         [ssh]\nhost_keys = [\"{host_key}\"]\nuser_ca_key = \"{ca_key}\"\n\
         authorized_keys = \"{keys}/{{user}}\"\nbackend_known_hosts = \"{known}\"\n\
         [health]\ninterval = \"1s\"\ntimeout = \"1s\"\nhttp = false\nrise = 1\n\
         [pool]\nprovider = \"exec\"\n\
         [pool.exec]\nlist = [\"{list}\"]\nstart = [\"{start}\"]\nstop = [\"{stop}\"]\n\
         poll_interval = \"1s\"\ntimeout = \"10s\"\n\
         [autoscale]\nenabled = true\nmin_vms = 0\nmax_vms = 1\nspare_vms = 0\n\
         scale_in_after = \"2s\"\nscale_to_zero_after = \"3s\"\ntick = \"1s\"\ncooldown = \"1s\"\n\
         boot_estimate = \"2s\"\nhold_connect_for = \"30s\"\n\
         busy_command = []\n",
        http = free_port(),
        host_key = host_key.display(),
        ca_key = ca.private_key_path().display(),
        keys = keys_dir.display(),
        known = known.path().display(),
    );
    let gateway = GatewayProcess::builder(&config)
        .dir(dir.path())
        .env("NO_COLOR", "1")
        .wait_for(SocketAddr::from((Ipv4Addr::LOCALHOST, ssh_port)))
        .wait_for(admin)
        .start();
    assert!(
        poll(Duration::from_secs(10), || vm_state(admin) == "stopped"),
        "the pool should start at zero; state {}\n{}",
        vm_state(admin),
        gateway.log_text()
    );

    // An ssh to the empty pool is held while the VM starts, then runs.
    let client_known = KnownHosts::new();
    client_known.add_host_key(
        ssh_port,
        &std::fs::read_to_string(dir.path().join("host_key.pub")).expect("host_key.pub"),
    );
    let client = SshClient::new(&user, ssh_port, client_known.path())
        .user_key(&key)
        .timeout(Duration::from_secs(40));
    let woke = Instant::now();
    let out = client.run("echo on $POOLGATE_VM");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stderr}\n{}",
        gateway.log_text()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "on vm-a");
    assert!(stderr.contains("starting a VM for you"), "{stderr}");
    eprintln!("woke the pool and ran the command in {:?}", woke.elapsed());

    // A session held open across several idle windows keeps its VM serving.
    let mut held = client
        .command("echo ready; sleep 7; echo done")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn held session");
    let began = Instant::now();
    let mut seen = Vec::new();
    while began.elapsed() < Duration::from_secs(6) {
        seen.push(vm_state(admin));
        std::thread::sleep(Duration::from_millis(300)); // sampling the state, not waiting for it
    }
    let held = wait_for_exit(&mut held, Duration::from_secs(20), "held session");
    assert!(held.success(), "the held session must end normally");
    assert!(
        seen.iter().all(|s| s == "healthy"),
        "a VM with an open session was drained or stopped: {seen:?}\n{}",
        gateway.log_text()
    );

    // Everyone left: drained, then stopped by the stop script.
    let left = Instant::now();
    assert!(
        poll(Duration::from_secs(30), || vm_state(admin) == "stopped"),
        "idle VM not stopped; state {}\n{}",
        vm_state(admin),
        gateway.log_text()
    );
    eprintln!(
        "idle VM stopped {:?} after the last session",
        left.elapsed()
    );
    // The decision lines are logged once each action has been applied.
    gateway.wait_for_log("action=Drain(\"vm-a\")", Duration::from_secs(5));
    gateway.wait_for_log("result=\"stop\"", Duration::from_secs(5));
    assert!(!pid_file.exists(), "the stop script removes the pid file");
}
