//! The `exec` provider end to end: operator scripts that start and stop a real OpenSSH `sshd`
//! "VM", a real gateway with autoscaling on, real `ssh` clients.
//!
//! - The pool starts at zero (the VM is stopped); an `ssh` connects, is held while the autoscaler
//!   runs the start script, sees "starting a VM for you", and then its command runs on the VM.
//! - While a session is open, the VM is never drained or stopped, however long the idle timers.
//! - When everyone has left, the VM is drained and the stop script stops it.

use std::os::unix::fs::PermissionsExt;
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
    let ca = UserCa::generate();
    // A VM whose sshd the scripts control: the fixture writes its config and host key, then
    // steps aside.
    let exec = ExecSshdVm::stopped("poolgate-exec-e2e-", &ca);
    let (vm, scripts) = (&exec.vm, &exec.scripts);
    let pid_file = vm.pid_file();

    // This VM's sshd shares the machine's process table, so the busy check would see every
    // other test's processes: off here (tests/tests/autoscale_busy.rs runs it on VMs with a PID
    // namespace each).
    let pool = GatewayPool::builder()
        .users(1)
        .user_ca(ca)
        .known_vm(vm)
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

#[test]
fn a_start_that_takes_long_does_not_hold_up_the_next_decision() {
    // A platform where starting vm-a takes as long as the test says (an Azure start or create
    // takes minutes): while it runs, a second user arrives, and the autoscaler decides and
    // starts vm-b at once instead of waiting for vm-a's start to finish.
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let dir = tempfile::Builder::new()
        .prefix("poolgate-exec-inflight-")
        .tempdir()
        .expect("temp dir");
    let ca = UserCa::generate();
    let (vms, _cleanup) = two_stopped_vms(&ca);
    let release = dir.path().join("release-vm-a");
    let started_a = dir.path().join("vm-a-start-began");
    let listed: Vec<(&str, u16, std::path::PathBuf)> = vms
        .iter()
        .map(|vm| (vm.name(), vm.port(), vm.pid_file()))
        .collect();
    let list = write_list_script(dir.path(), &listed);
    let sshd = tool("sshd").display().to_string();
    // vm-a's start waits for the test's go (bounded: 60 s); vm-b's is immediate.
    let start = write_script(
        dir.path(),
        "start.sh",
        &format!(
            "for vm in \"$@\"; do\n\
               case \"$vm\" in\n\
                 vm-a) touch {began}; i=0; while [ ! -f {release} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\n\
                       {sshd} -f {cfg_a} ;;\n\
                 vm-b) {sshd} -f {cfg_b} ;;\n\
                 *) exit 1 ;;\n\
               esac\n\
             done",
            began = started_a.display(),
            release = release.display(),
            cfg_a = vms[0].config_path().display(),
            cfg_b = vms[1].config_path().display(),
        ),
    );
    let stop = stop_script(dir.path(), &vms, |_| None);
    // One user per VM (sessions_per_vm = 1, max_sessions = 1, no spare): each arrival needs a
    // VM of its own, decided on its own.
    let mut builder = GatewayPool::builder().users(2).user_ca(ca);
    for vm in &vms {
        builder = builder.known_vm(vm);
    }
    let pool = builder
        .config_toml(&format!(
            "[pool]\nprovider = \"exec\"\n[pool.exec]\nlist = [\"{list}\"]\nstart = [\"{start}\"]\n\
             stop = [\"{stop}\"]\npoll_interval = \"1s\"\ntimeout = \"90s\"\nmax_sessions = 1\n\
             [autoscale]\nenabled = true\nmax_vms = 2\nspare_vms = 0\nsessions_per_vm = 1\n\
             scale_in_after = \"10m\"\ntick = \"1s\"\ncooldown = \"1s\"\nboot_estimate = \"2s\"\n\
             hold_connect_for = \"60s\"\nbusy_command = []\n"
        ))
        .start();
    pool.wait_for_state("vm-a", "stopped", Duration::from_secs(15));
    pool.wait_for_state("vm-b", "stopped", Duration::from_secs(15));

    // Each user's session lasts until the test says (a file the users can see), so that the
    // two hold a VM each.
    let shared = tempfile::Builder::new()
        .prefix("poolgate-inflight-")
        .tempdir()
        .expect("temp dir");
    std::fs::set_permissions(shared.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let done = shared.path().join("done");
    let command = format!(
        "echo on $POOLGATE_VM; i=0; while [ ! -f {} ] && [ $i -lt 900 ]; do sleep 0.1; i=$((i+1)); done",
        done.display()
    );
    let user = |i: usize| {
        let client = pool.client(i).timeout(Duration::from_secs(120));
        let command = command.clone();
        std::thread::spawn(move || client.run(&command))
    };

    // The first user: vm-a is asked for, and its start hangs.
    let first = user(1);
    assert!(
        poll(Duration::from_secs(20), || started_a.exists()),
        "vm-a's start never began\n{}",
        pool.log()
    );
    let in_flight = sample(&pool.metrics(), "poolgate_autoscale_actions_in_flight");
    assert_eq!(in_flight, Some(1.0), "{}", pool.metrics());

    // The second user, while vm-a's start still runs: vm-b is started at once, and one of the
    // two waiting users lands there (whichever the gateway wakes first).
    let second = user(2);
    assert!(
        poll(Duration::from_secs(30), || ssh_active(
            &pool.metrics(),
            "vm-b"
        ) == Some(1.0)),
        "nobody got vm-b while vm-a's start ran\n{}",
        pool.log()
    );
    assert!(!release.exists(), "vm-a's start was still running");
    assert_eq!(pool.vm_state("vm-a"), "starting", "{}", pool.log());

    // vm-a's start finishes: the other user lands there.
    std::fs::write(&release, "").expect("release vm-a");
    assert!(
        poll(Duration::from_secs(30), || ssh_active(
            &pool.metrics(),
            "vm-a"
        ) == Some(1.0)),
        "the other user never got vm-a\n{}",
        pool.log()
    );
    std::fs::write(&done, "").expect("end the sessions");
    let mut landed: Vec<String> = [first, second]
        .into_iter()
        .map(|h| {
            let out = h.join().expect("client");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(0), "{stderr}\n{}", pool.log());
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        })
        .collect();
    landed.sort();
    assert_eq!(landed, ["on vm-a", "on vm-b"]);
    // Nothing was started twice.
    let log = pool.log();
    assert_eq!(
        log.matches("result=\"start\"").count(),
        2,
        "one start per VM:\n{log}"
    );
    pool.assert_no_panic();
}

/// VMs `vm-a` and `vm-b`, sshd trusting `ca`, stopped (the test's start script runs them), and
/// what kills their sshd when the test ends.
fn two_stopped_vms(ca: &UserCa) -> (Vec<SshdVm>, Vec<KillPidFile>) {
    let mut vms: Vec<SshdVm> = ["vm-a", "vm-b"]
        .iter()
        .map(|name| {
            SshdVm::builder(name)
                .trusted_user_ca_keys(ca.public_key_path())
                .start()
        })
        .collect();
    for vm in &mut vms {
        vm.stop();
    }
    let cleanup = vms.iter().map(|vm| KillPidFile(vm.pid_file())).collect();
    (vms, cleanup)
}

/// `stop.sh VM…` for `vms`: kills each one's sshd and removes its pid file, and the file
/// `also(vm)` names.
fn stop_script(
    dir: &std::path::Path,
    vms: &[SshdVm],
    also: impl Fn(&SshdVm) -> Option<std::path::PathBuf>,
) -> String {
    let cases: String = vms
        .iter()
        .map(|vm| {
            let pid = vm.pid_file().display().to_string();
            let extra = also(vm)
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            format!(
                "    {name}) kill \"$(cat {pid})\" || true; rm -f {pid} {extra} ;;\n",
                name = vm.name()
            )
        })
        .collect();
    write_script(
        dir,
        "stop.sh",
        &format!("for vm in \"$@\"; do\n  case \"$vm\" in\n{cases}  esac\ndone"),
    )
}

/// `exec`'s VM as the pool's one VM, kept running (`min_vms = 1`, `hold_connect_for` at its
/// default), healthy.
fn one_vm_kept_running(builder: GatewayPoolBuilder, exec: &ExecSshdVm) -> GatewayPool {
    let pool = builder
        .users(1)
        .config_toml(&exec.scripts.pool_toml(Duration::from_secs(10)))
        .config_toml(
            "[autoscale]\nenabled = true\nmin_vms = 1\nmax_vms = 1\nspare_vms = 0\n\
             tick = \"1s\"\ncooldown = \"1s\"\nboot_estimate = \"2s\"\nbusy_command = []\n",
        )
        .start();
    pool.wait_for_state("vm-a", "healthy", Duration::from_secs(20));
    pool
}

/// No connection is left held.
fn assert_nobody_waits(pool: &GatewayPool) {
    let metrics = pool.metrics();
    assert_eq!(
        sample(&metrics, "poolgate_sessions_waiting{protocol=\"ssh\"}"),
        Some(0.0),
        "{metrics}"
    );
}

#[test]
fn a_login_the_vms_refuse_is_told_at_once_not_held_while_the_pool_wakes() {
    // A user the gateway lets in whom the VMs refuse: no account there yet, or VMs that do not
    // trust the gateway's user CA. The pool's VMs are alike, so holding the connection for
    // `hold_connect_for` (5 minutes at the default) and asking the VM again and again helps
    // nobody: the user is told at once why, after one attempt.
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let ca = UserCa::generate();
    let exec = ExecSshdVm::stopped("poolgate-exec-refused-", &ca);
    let pool = one_vm_kept_running(GatewayPool::builder().user_ca(ca).known_vm(&exec.vm), &exec);

    // Allowed in by the gateway (a key listed for the name), unknown on the VM.
    let stranger = "pgnoaccount";
    pool.authorize(stranger, pool.key(1));
    let asked = Instant::now();
    let out = pool
        .client_as(stranger)
        .user_key(pool.key(1))
        .timeout(Duration::from_secs(40))
        .run("true");
    let took = asked.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(255), "{stderr}\n{}", pool.log());
    assert!(
        stderr.contains(&format!("vm-a refused the login for {stranger}"))
            && stderr.contains("user CA"),
        "the user is not told why: {stderr}"
    );
    assert!(
        took < Duration::from_secs(10),
        "the refused login was held {took:?}\n{}",
        pool.log()
    );
    eprintln!(
        "a login the VMs refuse ended in {took:?}: {}",
        stderr.trim()
    );
    pool.gateway
        .wait_for_log("every VM tried refused the login", Duration::from_secs(1));
    let attempts = pool
        .gateway
        .log_text()
        .lines()
        .filter(|l| l.contains("VM connection failed") && l.contains(&format!("user={stranger}")))
        .count();
    assert_eq!(
        attempts,
        1,
        "the VM was asked {attempts} times\n{}",
        pool.log()
    );
    assert_nobody_waits(&pool);

    // The users the VM knows still get in.
    let out = pool.client(1).run("echo on $POOLGATE_VM");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "on vm-a");
}

#[test]
fn a_vm_whose_host_key_changed_is_told_at_once_not_held_while_the_pool_wakes() {
    // The pool's VM was rebuilt with a new host key, and backend_known_hosts still has the old
    // one (or the VMs were never added there). The gateway rightly refuses to log in; holding
    // the user's connection for `hold_connect_for` (5 minutes) would only repeat the refused
    // handshake every second. The user is told at once, after one attempt.
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let ca = UserCa::generate();
    let exec = ExecSshdVm::stopped("poolgate-exec-rekeyed-", &ca);
    let old_key = UserKey::generate("the VM's key before it was rebuilt");
    // Its sshd answers, so the probe passes: the VM is eligible and picked.
    let pool = one_vm_kept_running(
        GatewayPool::builder()
            .user_ca(ca)
            .known_hosts_entry(known_hosts_line(exec.vm.port(), &old_key.public_key_line())),
        &exec,
    );

    let asked = Instant::now();
    let out = pool.client(1).timeout(Duration::from_secs(40)).run("true");
    let took = asked.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(255), "{stderr}\n{}", pool.log());
    assert!(
        stderr.contains("vm-a presented an untrusted host key (changed")
            && stderr.contains("ask the pool's administrators"),
        "the user is not told why: {stderr}"
    );
    assert!(
        took < Duration::from_secs(10),
        "the connection was held {took:?}\n{}",
        pool.log()
    );
    eprintln!(
        "an untrusted VM ended the login in {took:?}: {}",
        stderr.trim()
    );
    pool.gateway.wait_for_log(
        "every VM tried refused the login or was not trusted",
        Duration::from_secs(1),
    );
    let log = pool.gateway.log_text();
    let refusals = log
        .lines()
        .filter(|l| l.contains("VM host key not trusted"))
        .count();
    assert_eq!(
        refusals,
        1,
        "the VM was asked {refusals} times\n{}",
        pool.log()
    );
    // The gateway never logged in there.
    assert!(
        !exec.vm.log_text().contains("Accepted"),
        "{}",
        exec.vm.log_text()
    );
    assert_nobody_waits(&pool);
}

#[test]
fn while_the_listing_fails_after_a_create_no_more_vms_are_created_and_the_status_says_why() {
    // Writes go through, the listing fails (a cloud role that may create but not read, reads
    // throttled by other tools): the VM a create made is never listed. Before, each decision
    // found the pool short and created again (on Azure: sku.capacity raised past max_vms). Now
    // the autoscaler acts on nothing until a listing works, and says so.
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let ca = UserCa::generate();
    let exec = ExecSshdVm::stopped("poolgate-exec-blind-", &ca);
    let dir = exec.dir.path();
    let (created, refused, creates) = (
        dir.join("created"),
        dir.join("listing-refused"),
        dir.join("creates.log"),
    );
    let (cfg, pid) = (
        exec.vm.config_path().display().to_string(),
        exec.vm.pid_file().display().to_string(),
    );
    let list = write_script(
        dir,
        "list-vms.sh",
        &format!(
            "if [ -f {refused} ]; then echo 'listing refused: 403 AuthorizationFailed' >&2; exit 1; fi\n\
             if [ -f {created} ]; then\n\
               printf '{{\"vms\":[{{\"name\":\"vm-a\",\"host\":\"127.0.0.1\",\"ssh_port\":{port},\"state\":\"running\"}}]}}\\n'\n\
             else echo '{{\"vms\":[]}}'; fi",
            refused = refused.display(),
            created = created.display(),
            port = exec.vm.port(),
        ),
    );
    // The create makes the VM; from then on the listing is refused (until the test lifts it).
    let create = write_script(
        dir,
        "create-vm.sh",
        &format!(
            "echo \"$1\" >> {creates}\n{sshd} -f {cfg}\ntouch {created} {refused}",
            creates = creates.display(),
            sshd = tool("sshd").display(),
            created = created.display(),
            refused = refused.display(),
        ),
    );
    let delete = write_script(
        dir,
        "delete-vm.sh",
        &format!(
            "[ \"$1\" = vm-a ]\nkill \"$(cat {pid})\" || true\nrm -f {pid} {created}",
            created = created.display()
        ),
    );
    let pool = GatewayPool::builder()
        .users(1)
        .user_ca(ca)
        .known_vm(&exec.vm)
        .config_toml(&format!(
            "[pool]\nprovider = \"exec\"\n[pool.exec]\nlist = [\"{list}\"]\ncreate = [\"{create}\"]\n\
             delete = [\"{delete}\"]\npoll_interval = \"1s\"\ntimeout = \"20s\"\n\
             [autoscale]\nenabled = true\nmax_vms = 3\nspare_vms = 0\ntick = \"1s\"\n\
             cooldown = \"1s\"\nboot_estimate = \"2s\"\nhold_connect_for = \"90s\"\nbusy_command = []\n"
        ))
        .start();
    let client = pool.client(1).timeout(Duration::from_secs(120));
    let user = std::thread::spawn(move || client.run("echo on $POOLGATE_VM"));
    assert!(
        poll(Duration::from_secs(30), || creates.exists()),
        "no create for the waiting user\n{}",
        pool.log()
    );
    // Listings fail from here on; several decisions pass (one a second), each of which would
    // have created again.
    let failed_listings = || {
        pool.log()
            .matches("provider listing failed; keeping the last known pool, and starting, creating, stopping or deleting no VM")
            .count()
    };
    assert!(
        poll(Duration::from_secs(20), || failed_listings() >= 4),
        "{}",
        pool.log()
    );
    let log = pool.log();
    let status = pool.api_get("/api/v1/autoscale");
    let why = status["provider_error"].as_str().unwrap_or_default();
    assert!(why.contains("listing refused"), "{status}");
    assert_eq!(
        sample(&pool.metrics(), "poolgate_autoscale_provider_up"),
        Some(0.0)
    );
    assert_eq!(
        std::fs::read_to_string(&creates)
            .expect("creates")
            .lines()
            .count(),
        1,
        "created again while the listing failed\n{log}"
    );

    // The listing works again: the VM is listed, the user lands there, nothing more is created.
    std::fs::remove_file(&refused).expect("lift the refusal");
    let out = user.join().expect("client");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        pool.log()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "on vm-a");
    assert_eq!(
        std::fs::read_to_string(&creates)
            .expect("creates")
            .lines()
            .count(),
        1,
        "{}",
        pool.log()
    );
    assert!(pool.log().contains("provider listing works again"));
    assert_eq!(
        pool.api_get("/api/v1/autoscale")["provider_error"],
        serde_json::Value::Null
    );
    assert_eq!(
        sample(&pool.metrics(), "poolgate_autoscale_provider_up"),
        Some(1.0)
    );
    pool.assert_no_panic();
}

#[test]
fn held_logins_spread_over_vms_the_platform_calls_running_before_their_sshd_is_up() {
    // On a real cloud the platform says "running" as soon as the machine runs, seconds before
    // sshd listens: such a VM is down in the pool, not starting. Eight users arrive at once at
    // a pool at zero sized for four per VM: both VMs are started; vm-a's sshd comes up first.
    // Before, every held login took vm-a (8/0) while vm-b stood empty and was scaled in again.
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let dir = tempfile::Builder::new()
        .prefix("poolgate-exec-running-early-")
        .tempdir()
        .expect("temp dir");
    let ca = UserCa::generate();
    let (vms, _cleanup) = two_stopped_vms(&ca);
    let marker = |vm: &SshdVm| dir.path().join(format!("{}.running", vm.name()));
    // `list`: running from the moment start ran (the platform's word), whatever sshd does.
    let entries: Vec<String> = vms
        .iter()
        .map(|vm| {
            format!(
                "if [ -f {m} ]; then s=running; else s=stopped; fi\n\
                 printf '{{\"name\":\"{n}\",\"host\":\"127.0.0.1\",\"ssh_port\":{p},\"state\":\"%s\"}}' \"$s\"",
                m = marker(vm).display(),
                n = vm.name(),
                p = vm.port(),
            )
        })
        .collect();
    let list = write_script(
        dir.path(),
        "list.sh",
        &format!(
            "printf '{{\"vms\":['\n{}\nprintf ']}}\\n'",
            entries.join("\nprintf ','\n")
        ),
    );
    // `start` returns at once; sshd follows 1 s (vm-a) or 4 s (vm-b) later.
    let sshd = tool("sshd").display().to_string();
    let start = write_script(
        dir.path(),
        "start.sh",
        &format!(
            "for vm in \"$@\"; do\n\
               case \"$vm\" in\n\
                 vm-a) touch {ma}; (sleep 1; {sshd} -f {ca}) >/dev/null 2>&1 & ;;\n\
                 vm-b) touch {mb}; (sleep 4; {sshd} -f {cb}) >/dev/null 2>&1 & ;;\n\
               esac\n\
             done",
            ma = marker(&vms[0]).display(),
            mb = marker(&vms[1]).display(),
            ca = vms[0].config_path().display(),
            cb = vms[1].config_path().display(),
        ),
    );
    let stop = stop_script(dir.path(), &vms, |vm| Some(marker(vm)));
    let mut builder = GatewayPool::builder().users(8).user_ca(ca);
    for vm in &vms {
        builder = builder.known_vm(vm);
    }
    let pool = builder
        .config_toml(&format!(
            "[pool]\nprovider = \"exec\"\n[pool.exec]\nlist = [\"{list}\"]\nstart = [\"{start}\"]\n\
             stop = [\"{stop}\"]\npoll_interval = \"1s\"\ntimeout = \"20s\"\n\
             [autoscale]\nenabled = true\nmax_vms = 2\nspare_vms = 0\nsessions_per_vm = 4\n\
             scale_in_after = \"10m\"\ntick = \"1s\"\ncooldown = \"1s\"\nboot_estimate = \"8s\"\n\
             hold_connect_for = \"60s\"\nbusy_command = []\n"
        ))
        .start();
    pool.wait_for_state("vm-a", "stopped", Duration::from_secs(15));
    // Each session lasts until all eight have landed (a file the users can see): the first
    // VM's users are still there when the second VM comes up, however slow the machine.
    let shared = tempfile::Builder::new()
        .prefix("poolgate-running-early-")
        .tempdir()
        .expect("temp dir");
    std::fs::set_permissions(shared.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let done = shared.path().join("done");
    let command = format!(
        "echo on $POOLGATE_VM; i=0; while [ ! -f {} ] && [ $i -lt 900 ]; do sleep 0.1; i=$((i+1)); done",
        done.display()
    );
    let users: Vec<_> = (1..=8)
        .map(|i| {
            let client = pool.client(i).timeout(Duration::from_secs(120));
            let command = command.clone();
            std::thread::spawn(move || client.run(&command))
        })
        .collect();
    let landed_count = || {
        ["vm-a", "vm-b"]
            .iter()
            .filter_map(|vm| ssh_active(&pool.metrics(), vm))
            .sum::<f64>()
    };
    assert!(
        poll(Duration::from_secs(60), || landed_count() >= 8.0),
        "not all eight landed\n{}",
        pool.log()
    );
    std::fs::write(&done, "").expect("end the sessions");
    let mut landed: std::collections::BTreeMap<String, usize> = Default::default();
    for user in users {
        let out = user.join().expect("client");
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            pool.log()
        );
        *landed
            .entry(String::from_utf8_lossy(&out.stdout).trim().to_owned())
            .or_default() += 1;
    }
    let split: Vec<usize> = landed.values().copied().collect();
    assert_eq!(split, [4, 4], "{landed:?}\n{}", pool.log());
    pool.assert_no_panic();
}
