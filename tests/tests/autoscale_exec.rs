//! The `exec` provider end to end: operator scripts that start and stop a real OpenSSH `sshd`
//! "VM", a real gateway with autoscaling on, real `ssh` clients.
//!
//! - The pool starts at zero (the VM is stopped); an `ssh` connects, is held while the autoscaler
//!   runs the start script, sees "starting a VM for you", and then its command runs on the VM.
//! - While a session is open, the VM is never drained or stopped, however long the idle timers.
//! - When everyone has left, the VM is drained and the stop script stops it.

use std::process::Stdio;
use std::time::{Duration, Instant};

use poolgate_tests::*;

fn vm_state(pool: &GatewayPool) -> String {
    pool.vms_json()[0]["state"]
        .as_str()
        .unwrap_or("none")
        .to_string()
}

#[test]
fn exec_provider_wakes_a_stopped_vm_for_ssh_and_stops_it_only_when_idle() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
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
    vm.stop();
    let pid_file = vm.pid_file();
    let _cleanup = KillPidFile(pid_file.clone());
    let (pid, cfg) = (pid_file.display(), vm.config_path().display());
    let scripts = ExecScripts::write(
        dir.path(),
        "vm-a",
        &pid_file,
        &[("ssh_port", vm.port())],
        &format!("{} -f {cfg}", tool("sshd").display()),
        &format!("kill \"$(cat {pid})\"\nrm -f {pid}"),
    );

    // This VM's sshd shares the machine's process table, so the busy check would see every
    // other test's processes: off here (tests/tests/autoscale_busy.rs runs it on VMs with a PID
    // namespace each).
    let pool = GatewayPool::builder()
        .users(1)
        .user_ca(ca)
        .known_vm(&vm)
        .config_toml(&scripts.pool_toml(Duration::from_secs(10)))
        .config_toml(
            "[autoscale]\nenabled = true\nmin_vms = 0\nmax_vms = 1\nspare_vms = 0\n\
             scale_in_after = \"2s\"\nscale_to_zero_after = \"3s\"\ntick = \"1s\"\ncooldown = \"1s\"\n\
             boot_estimate = \"2s\"\nhold_connect_for = \"30s\"\n\
             busy_command = []\n",
        )
        .start();
    assert!(
        poll(Duration::from_secs(10), || vm_state(&pool) == "stopped"),
        "the pool should start at zero; state {}\n{}",
        vm_state(&pool),
        pool.log()
    );

    // An ssh to the empty pool is held while the VM starts, then runs.
    let client = pool.client(1).timeout(Duration::from_secs(40));
    let woke = Instant::now();
    let out = client.run("echo on $POOLGATE_VM");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}\n{}", pool.log());
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
        seen.push(vm_state(&pool));
        std::thread::sleep(Duration::from_millis(300)); // sampling the state, not waiting for it
    }
    let held = wait_for_exit(&mut held, Duration::from_secs(20), "held session");
    assert!(held.success(), "the held session must end normally");
    assert!(
        seen.iter().all(|s| s == "healthy"),
        "a VM with an open session was drained or stopped: {seen:?}\n{}",
        pool.log()
    );

    // Everyone left: drained, then stopped by the stop script.
    let left = Instant::now();
    assert!(
        poll(Duration::from_secs(30), || vm_state(&pool) == "stopped"),
        "idle VM not stopped; state {}\n{}",
        vm_state(&pool),
        pool.log()
    );
    eprintln!(
        "idle VM stopped {:?} after the last session",
        left.elapsed()
    );
    // The decision lines are logged once each action has been applied.
    pool.gateway
        .wait_for_log("action=Drain(\"vm-a\")", Duration::from_secs(5));
    pool.gateway
        .wait_for_log("result=\"stop\"", Duration::from_secs(5));
    assert!(!pid_file.exists(), "the stop script removes the pid file");
}
