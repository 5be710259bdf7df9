//! The in-place upgrade (SIGUSR2) end to end, with real OpenSSH VMs and clients: the gateway
//! starts the program installed at its path again with its listeners; logins arriving all the
//! while are all served (by one process or the other), open sessions and running commands go on
//! in the old process until they end, the new process counts them and sends their users back to
//! their VM, systemd is told the new main process; a new process that cannot start leaves the old
//! one serving.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use poolgate_tests::jupyter::{
    JupyterServerVm, cookie_vm, require_jupyter, run_code, ws_next_text,
};
use poolgate_tests::*;

const RTT: Duration = Duration::from_secs(5);

/// A `NOTIFY_SOCKET` as systemd gives a `Type=notify` service: what the gateways tell it.
struct Systemd {
    socket: UnixDatagram,
    path: PathBuf,
}

impl Systemd {
    fn new(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("read timeout");
        Self { socket, path }
    }

    /// The next message within `timeout`, if any.
    fn next(&self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.socket.recv(&mut buf) {
                return Some(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        None
    }

    /// Waits for a message naming a new main process; its pid.
    fn main_pid(&self, timeout: Duration) -> u32 {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let said = self
                .next(left)
                .unwrap_or_else(|| panic!("no MAINPID= within {timeout:?}"));
            if let Some(pid) = said
                .lines()
                .find_map(|l| l.strip_prefix("MAINPID="))
                .and_then(|p| p.parse().ok())
            {
                assert!(
                    said.lines().any(|l| l == "READY=1"),
                    "MAINPID= comes with READY=1: {said:?}"
                );
                return pid;
            }
        }
    }
}

/// A copy of the gateway program in `dir`, to start from and install over.
fn installed_copy(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("mkdir bin");
    let path = bin.join("poolgate");
    install(&path);
    path
}

/// What `install -m 0755 poolgate /usr/local/bin/poolgate` does: a new file renamed over the
/// old path (a running process keeps its own, now deleted, file).
fn install(path: &Path) {
    let fresh = path.with_extension("new");
    std::fs::copy(poolgate_bin(), &fresh).expect("copy the gateway program");
    std::fs::rename(&fresh, path).expect("install the gateway program");
}

fn exe(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

fn vm_ssh_sessions(pool: &GatewayPool) -> Vec<(String, u64)> {
    pool.vms_json()
        .as_array()
        .expect("VM list")
        .iter()
        .map(|vm| {
            (
                vm["name"].as_str().unwrap_or_default().to_owned(),
                vm["sessions"]["ssh"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

/// One login attempt of the burst.
struct Attempt {
    started: Instant,
    took: Duration,
    ok: bool,
    said: String,
}

/// The median and the longest of `took`, for the log.
fn median_and_max(mut took: Vec<Duration>) -> (Duration, Duration) {
    took.sort();
    (
        took.get(took.len() / 2).copied().unwrap_or_default(),
        took.last().copied().unwrap_or_default(),
    )
}

#[test]
fn an_upgrade_refuses_no_login_of_a_team_and_cuts_no_session() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    const TEAM: usize = 20;
    let scratch = tempfile::tempdir().expect("temp dir");
    let systemd = Systemd::new(scratch.path());
    let program = installed_copy(scratch.path());
    // The smallest configuration: three VMs (room for the team at the default 10 sessions per
    // VM), everything else at its default (shutdown_grace 10 min).
    let mut pool = GatewayPool::builder()
        .vm("vm-a")
        .vm("vm-b")
        .vm("vm-c")
        .users(TEAM + 3)
        .gateway_binary(&program)
        .gateway_env("NOTIFY_SOCKET", &systemd.path.display().to_string())
        .start();
    let old = pool.gateway.pid().expect("the gateway runs");
    assert_eq!(
        systemd.next(Duration::from_secs(5)).as_deref(),
        Some("READY=1\n"),
        "a gateway started by systemd says when it serves"
    );

    // User 1 holds a shell open; user 2 runs a command that is still running at the handover.
    let mut interactive = SshSession::hold(&pool.client(1));
    interactive.roundtrip("before the upgrade", RTT);
    let held_on = interactive.vm.clone();
    let running = RunningCommand::start(&pool.client(2), 4);
    wait_until(Duration::from_secs(10), "both sessions routed", || {
        pool.log().matches("session routed").count() >= 2
    });
    // A user who was on the held session's VM this morning and logged off: the gateway
    // remembers where they were (affinity) for hours.
    let returning = TEAM + 3;
    let earlier = pool
        .client_as(&format!("{}+{held_on}", pool.user(returning)))
        .user_key(pool.key(returning))
        .run("echo $POOLGATE_VM");
    assert_eq!(String::from_utf8_lossy(&earlier.stdout).trim(), held_on);

    // Twenty users log in over and over, before, during and after the handover.
    let stop = AtomicBool::new(false);
    let handed_over: Mutex<Option<Instant>> = Mutex::new(None);
    let signalled_at: Mutex<Option<Instant>> = Mutex::new(None);
    let served_after: Vec<AtomicUsize> = (0..TEAM).map(|_| AtomicUsize::new(0)).collect();
    let successor: Mutex<Option<KillTreeOnDrop>> = Mutex::new(None);
    let attempts: Vec<Vec<Attempt>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..TEAM)
            .map(|i| {
                let client = pool.client(i + 3);
                let (stop, handed_over, served) = (&stop, &handed_over, &served_after[i]);
                s.spawn(move || {
                    let mut mine = Vec::new();
                    while !stop.load(Ordering::Acquire) {
                        let started = Instant::now();
                        let out = client.run("echo $POOLGATE_VM");
                        let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                        let ok = out.status.success() && said.starts_with("vm-");
                        let after = handed_over
                            .lock()
                            .expect("lock")
                            .is_some_and(|at| started > at);
                        if ok && after {
                            served.fetch_add(1, Ordering::AcqRel);
                        }
                        mine.push(Attempt {
                            started,
                            took: started.elapsed(),
                            ok,
                            said: format!("{said} {}", String::from_utf8_lossy(&out.stderr)),
                        });
                    }
                    mine
                })
            })
            .collect();
        wait_until(Duration::from_secs(60), "logins before the upgrade", || {
            pool.log().matches("session routed").count() >= 3 + TEAM
        });
        install(&program);
        assert!(
            exe(old).ends_with("(deleted)"),
            "the running gateway's program was replaced: {}",
            exe(old)
        );
        let signalled = Instant::now();
        *signalled_at.lock().expect("lock") = Some(signalled);
        send_signal(old, Signal::SIGUSR2);
        let new = systemd.main_pid(Duration::from_secs(60));
        eprintln!(
            "the new process served {:?} after SIGUSR2",
            signalled.elapsed()
        );
        *successor.lock().expect("lock") = Some(KillTreeOnDrop(new));
        pool.gateway.wait_for_log(
            "upgrade: the new process serves; this one takes no new connections",
            Duration::from_secs(10),
        );
        *handed_over.lock().expect("lock") = Some(Instant::now());
        assert_eq!(
            exe(new),
            program.display().to_string(),
            "the new process runs the program installed at the gateway's path"
        );
        // Logins go on until every user has been served twice by the new process alone.
        wait_until(
            Duration::from_secs(90),
            "two logins of every user after the handover",
            || served_after.iter().all(|n| n.load(Ordering::Acquire) >= 2),
        );
        stop.store(true, Ordering::Release);
        workers
            .into_iter()
            .map(|w| w.join().expect("login thread"))
            .collect()
    });
    let handed_over = handed_over.lock().expect("lock").expect("handed over");
    let signalled_at = signalled_at.lock().expect("lock").expect("signalled");
    let all: Vec<&Attempt> = attempts.iter().flatten().collect();
    let failed: Vec<&str> = all
        .iter()
        .filter(|a| !a.ok)
        .map(|a| a.said.as_str())
        .collect();
    let after = all.iter().filter(|a| a.started > handed_over).count();
    eprintln!(
        "{} logins of {TEAM} users around the upgrade, {} before the handover, {after} after, {} failed",
        all.len(),
        all.len() - after,
        failed.len()
    );
    // How long a login took (ssh started to ended), by when it started: before the signal, while
    // the new process started (it was under way at the handover), after.
    let phase = |a: &&Attempt| {
        if a.started + a.took < signalled_at {
            0
        } else if a.started < handed_over {
            1
        } else {
            2
        }
    };
    for (i, name) in ["before", "across", "after"].iter().enumerate() {
        let (median, max) = median_and_max(
            all.iter()
                .filter(|a| phase(a) == i)
                .map(|a| a.took)
                .collect(),
        );
        eprintln!("logins {name} the handover: median {median:?}, longest {max:?}");
    }
    assert!(
        failed.is_empty(),
        "logins failed during the upgrade: {failed:#?}"
    );

    // The old process still serves what was open.
    interactive.roundtrip("after the upgrade", RTT);
    running.assert_ran_to_its_end();
    assert!(
        pool.gateway.try_wait().is_none(),
        "the old gateway waits for its last session"
    );

    // The new process (the admin port is its own now) counts the old one's open session, and
    // sends its user back to that VM although the others are emptier.
    wait_until(
        Duration::from_secs(20),
        "the new gateway to count only the session still open in the old one",
        || {
            vm_ssh_sessions(&pool)
                .iter()
                .all(|(vm, n)| *n == u64::from(*vm == held_on))
        },
    );
    let again = pool.client(1).run("echo $POOLGATE_VM");
    assert_eq!(
        String::from_utf8_lossy(&again.stdout).trim(),
        held_on,
        "user 1 lands on the VM of their session in the old gateway"
    );
    let back = pool.client(returning).run("echo $POOLGATE_VM");
    assert_eq!(
        String::from_utf8_lossy(&back.stdout).trim(),
        held_on,
        "a user the old gateway remembered lands where they were"
    );

    // Its last session ended, the old process exits 0 and the new one counts nothing of it.
    let status = interactive.close(Duration::from_secs(10));
    assert!(
        status.success(),
        "the interactive session ended with {status}"
    );
    let exited = pool
        .gateway
        .wait_for_exit(Duration::from_secs(10), "the old gateway to exit");
    assert!(exited.success(), "the old gateway exited with {exited}");
    pool.gateway.wait_for_log(
        "the previous gateway has exited; the handover is complete",
        RTT,
    );
    wait_until(
        Duration::from_secs(5),
        "no session counted on any VM",
        || vm_ssh_sessions(&pool).iter().all(|(_, n)| *n == 0),
    );
    let out = pool.client(1).run("echo $POOLGATE_VM");
    assert!(out.status.success(), "a login after the old gateway exited");
    assert!(!pool.log().contains("closing the remaining sessions"));
    pool.assert_no_panic();
}

#[test]
fn a_new_process_that_cannot_start_leaves_the_gateway_serving_and_a_fixed_one_takes_over() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let scratch = tempfile::tempdir().expect("temp dir");
    let systemd = Systemd::new(scratch.path());
    let mut pool = GatewayPool::builder()
        .vm("vm-a")
        .users(1)
        .gateway_env("NOTIFY_SOCKET", &systemd.path.display().to_string())
        .start();
    let pid = pool.gateway.pid().expect("the gateway runs");
    assert_eq!(systemd.next(RTT).as_deref(), Some("READY=1\n"));
    let mut held = SshSession::hold(&pool.client(1));
    let config = std::fs::read_to_string(pool.gateway.config_path()).expect("read config");
    std::fs::write(
        pool.gateway.config_path(),
        format!("{config}\n[routing]\naffinity = \"fastest\"\n"),
    )
    .expect("write a broken config");

    send_signal(pid, Signal::SIGUSR2);
    pool.gateway
        .wait_for_log("upgrade failed: the new process", Duration::from_secs(30));
    let log = pool.log();
    assert!(
        log.contains("this gateway keeps serving"),
        "the failure says the gateway goes on:\n{log}"
    );
    assert!(
        log.contains("routing.affinity"),
        "the new process named the bad key:\n{log}"
    );
    assert!(pool.gateway.try_wait().is_none(), "the gateway still runs");
    assert_eq!(
        systemd.next(Duration::from_millis(500)),
        None,
        "systemd was told nothing"
    );
    held.roundtrip("after the failed upgrade", RTT);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, pool.ssh_port));
    assert!(accepts(addr));
    let out = pool.client(1).run("echo $POOLGATE_VM");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "vm-a");

    // Fixed, with a setting SIGHUP cannot change (`[ssh] banner`), the next SIGUSR2 hands over
    // and applies it to new logins.
    assert!(config.contains("\n[ssh]\n"), "{config}");
    let fixed = config.replacen(
        "\n[ssh]\n",
        "\n[ssh]\nbanner = \"this gateway was upgraded in place\"\n",
        1,
    );
    std::fs::write(pool.gateway.config_path(), fixed).expect("fix the config");
    send_signal(pid, Signal::SIGUSR2);
    let _successor = KillTreeOnDrop(systemd.main_pid(Duration::from_secs(60)));
    held.roundtrip("during the drain", RTT);
    let status = held.close(RTT);
    assert!(status.success());
    let exited = pool
        .gateway
        .wait_for_exit(Duration::from_secs(10), "the old gateway to exit");
    assert!(exited.success(), "{exited}");
    let out = pool
        .client(1)
        .option("LogLevel=INFO")
        .run("echo $POOLGATE_VM");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "vm-a");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("this gateway was upgraded in place"),
        "the new process's banner: {said}"
    );
}

/// Browsers through an upgrade: twenty keep asking their Jupyter server for its files all the
/// while and are always answered by the VM their cookie pins (the new process reads the same
/// cookie secret); a notebook's kernel websocket, closed by the old process, reconnects through
/// the new one to the same kernel, which kept its state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_keeps_browsers_on_their_vms_and_their_kernels_running() {
    if !require_jupyter() {
        return;
    }
    const BROWSERS: usize = 20;
    const COOKIE: &str = "poolgate_vm";
    // Three VMs: room for the twenty-one browsers at the default 10 sessions per VM.
    const NAMES: [&str; 3] = ["js-a", "js-b", "js-c"];
    let names = NAMES;
    let scratch = tempfile::tempdir().expect("temp dir");
    let systemd = Systemd::new(scratch.path());
    let vms = blocking(move || JupyterServerVm::start_all(&names)).await;
    // A file in each VM's root tells which VM answered a listing.
    for vm in &vms {
        std::fs::write(vm.root().join(format!("served-by-{}.txt", vm.name())), "")
            .expect("marker file");
    }
    let mut gw = GatewayPool::builder()
        .web_pool("/api")
        .tls()
        .web_vms(&vms)
        .gateway_env("NOTIFY_SOCKET", &systemd.path.display().to_string())
        .start_async()
        .await;
    let old = gw.gateway.pid().expect("the gateway runs");
    let served_by = move |listing: &str| -> String {
        names
            .iter()
            .find(|n| listing.contains(&format!("served-by-{n}.txt")))
            .map(|n| n.to_string())
            .unwrap_or_else(|| format!("no VM's marker in {listing}"))
    };

    // A notebook: the page, a kernel, a variable in it.
    let notebook = gw.browser();
    let (r, _) = notebook.follow("/lab").await;
    assert_eq!(r.status, 200, "the page that sets _xsrf: {}", r.text());
    let r = notebook
        .api(
            "POST",
            "/api/kernels",
            Some(&serde_json::json!({"name": "python3"})),
        )
        .await;
    assert_eq!(r.status, 201, "start a kernel: {}", r.text());
    let channels = format!(
        "/api/kernels/{}/channels?session_id=upgrade-tab",
        r.json()["id"].as_str().expect("kernel id")
    );
    let mut ws = notebook.websocket(&channels).await;
    assert_eq!(run_code(&mut ws, "x = 41; x", "cell-1").await, "41");
    let notebook_vm = cookie_vm(&notebook.cookie(COOKIE, "/").expect("pinned"));

    // Twenty browsers, each pinned by its first request, list their files over and over.
    let stop = Arc::new(AtomicBool::new(false));
    let handed_over: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let answered = Arc::new(AtomicUsize::new(0));
    let browsers: Vec<_> = (0..BROWSERS)
        .map(|_| {
            let b = gw.browser();
            let (stop, handed_over, answered) =
                (stop.clone(), handed_over.clone(), answered.clone());
            tokio::spawn(async move {
                let mut answers = Vec::new();
                let mut after = 0;
                while !stop.load(Ordering::Acquire) || after < 2 {
                    let started = Instant::now();
                    let r = b.get("/api/contents").await;
                    assert_eq!(r.status, 200, "{}", r.text());
                    answers.push(served_by(&r.text()));
                    if answers.len() == 1 {
                        answered.fetch_add(1, Ordering::AcqRel);
                    }
                    if handed_over
                        .lock()
                        .expect("lock")
                        .is_some_and(|at| started > at)
                    {
                        after += 1;
                    }
                }
                let pinned = cookie_vm(&b.cookie(COOKIE, "/").expect("pinned"));
                (pinned, answers, after)
            })
        })
        .collect();
    tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(30), "every browser answered", || {
            answered.load(Ordering::Acquire) == BROWSERS
        })
    });

    send_signal(old, Signal::SIGUSR2);
    let _successor = KillTreeOnDrop(tokio::task::block_in_place(|| {
        systemd.main_pid(Duration::from_secs(60))
    }));
    tokio::task::block_in_place(|| {
        gw.gateway.wait_for_log(
            "upgrade: the new process serves; this one takes no new connections",
            Duration::from_secs(10),
        )
    });
    *handed_over.lock().expect("lock") = Some(Instant::now());

    // The old process closes the kernel's websocket; the tab reconnects, through the new one, to
    // the same kernel on the same VM, which still has its variable.
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        while ws_next_text(&mut ws).await.is_some() {}
    })
    .await;
    assert!(closed.is_ok(), "the old gateway closes its websockets");
    let mut ws = notebook.websocket(&channels).await;
    assert_eq!(run_code(&mut ws, "x + 1", "cell-2").await, "42");
    assert_eq!(
        cookie_vm(&notebook.cookie(COOKIE, "/").expect("pinned")),
        notebook_vm
    );

    stop.store(true, Ordering::Release);
    let mut total = 0;
    for task in browsers {
        let (pinned, answers, after) = task.await.expect("a browser's requests all answered");
        assert!(after >= 2, "served after the handover");
        assert!(
            answers.iter().all(|vm| *vm == pinned),
            "a browser pinned to {pinned} was answered by {answers:?}"
        );
        total += answers.len();
    }
    eprintln!("{total} listings by {BROWSERS} browsers around the upgrade, each by its VM");

    // Nothing held the old process: it has exited, 0.
    let exited = tokio::task::block_in_place(|| {
        gw.gateway
            .wait_for_exit(Duration::from_secs(20), "the old gateway to exit")
    });
    assert!(exited.success(), "{exited}");
    drop(ws);
}

/// A login held while the pool wakes when the upgrade comes cannot be placed by the old process
/// (its autoscaler stops with it): it is told at once to connect again, not held until
/// `autoscale.hold_connect_for`; connecting again, it waits in the new process, whose autoscaler
/// starts the VM for it.
#[test]
fn a_login_waiting_for_the_pool_to_wake_is_sent_to_the_new_process() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let ca = UserCa::generate();
    let exec = ExecSshdVm::stopped("poolgate-upgrade-wake-", &ca);
    // The VM boots only once the test says so: until then a start leaves it stopped.
    let real_start = exec.dir.path().join("start-real.sh");
    std::fs::rename(&exec.scripts.start, &real_start).expect("move start.sh");
    let go = exec.dir.path().join("go");
    write_script(
        exec.dir.path(),
        "start.sh",
        &format!(
            "if [ -f {go} ]; then exec {real} \"$@\"; fi",
            go = go.display(),
            real = real_start.display()
        ),
    );
    let scratch = tempfile::tempdir().expect("temp dir");
    let systemd = Systemd::new(scratch.path());
    // Scale to zero at the defaults but for the busy check (this VM's sshd shares the
    // machine's process table).
    let mut pool = GatewayPool::builder()
        .users(1)
        .user_ca(ca)
        .known_vm(&exec.vm)
        .config_toml(&exec.scripts.pool_toml(Duration::from_secs(10)))
        .config_toml("[autoscale]\nenabled = true\nmin_vms = 0\nbusy_command = []\n")
        .gateway_env("NOTIFY_SOCKET", &systemd.path.display().to_string())
        .start();
    let old = pool.gateway.pid().expect("the gateway runs");
    let mut waiting = pool
        .client(1)
        .timeout(Duration::from_secs(60))
        .spawn("echo $POOLGATE_VM");
    pool.gateway.wait_for_log(
        "no VM yet; holding the connection while the pool wakes",
        Duration::from_secs(20),
    );

    send_signal(old, Signal::SIGUSR2);
    let _successor = KillTreeOnDrop(systemd.main_pid(Duration::from_secs(60)));
    let told = Instant::now();
    let (status, _, stderr) =
        wait_for_output(&mut waiting, Duration::from_secs(10), "the held login");
    eprintln!(
        "the held login was let go {:?} after the handover",
        told.elapsed()
    );
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "poolgate: the gateway was upgraded while you waited for a VM; connect again now: \
             the new one goes on starting it.\r\n"
        ),
        "the user is told what to do: {stderr}"
    );
    let exited = pool
        .gateway
        .wait_for_exit(Duration::from_secs(10), "the old gateway to exit");
    assert!(exited.success(), "{exited}");

    // Connecting again, the user waits in the new process, which starts the VM.
    std::fs::write(&go, "").expect("let the VM boot");
    let out = pool
        .client(1)
        .timeout(Duration::from_secs(60))
        .run("echo $POOLGATE_VM");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "vm-a",
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        pool.log()
    );
}

/// A VM the autoscaler had drained for scale-in when the upgrade came stays the autoscaler's in
/// the new process, which stops it once it may. (Taken for an operator's drain, it would stay
/// drained and running, unused and paid for, until someone undrained it by hand.)
#[test]
fn a_scale_in_under_way_at_an_upgrade_is_finished_by_the_new_process() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let ca = UserCa::generate();
    let exec = ExecSshdVm::stopped("poolgate-upgrade-scale-in-", &ca);
    let scratch = tempfile::tempdir().expect("temp dir");
    let systemd = Systemd::new(scratch.path());
    // Scale to zero at the defaults but for the busy check (this VM's sshd shares the machine's
    // process table) and times short enough for a test: the autoscaler decides every 8 s (the
    // provider is listed as often), so a drain is followed by the VM's stop 8 s later, time for
    // the upgrade to come in between; a VM idle for 3 s is scaled in.
    let provider = exec
        .scripts
        .pool_toml(Duration::from_secs(10))
        .replace("poll_interval = \"1s\"", "poll_interval = \"8s\"");
    let mut pool = GatewayPool::builder()
        .users(1)
        .user_ca(ca)
        .known_vm(&exec.vm)
        .config_toml(&provider)
        .config_toml(
            "[autoscale]\nenabled = true\nmin_vms = 0\nbusy_command = []\ntick = \"8s\"\n\
             cooldown = \"1s\"\nscale_in_after = \"3s\"\nscale_to_zero_after = \"3s\"\n",
        )
        .gateway_env("NOTIFY_SOCKET", &systemd.path.display().to_string())
        .start();
    let old = pool.gateway.pid().expect("the gateway runs");
    let woke = pool
        .client(1)
        .timeout(Duration::from_secs(60))
        .run("echo $POOLGATE_VM");
    assert!(woke.status.success(), "{woke:?}\n{}", pool.log());

    // Idle again: drained for scale-in; the upgrade comes before the stop.
    pool.gateway
        .wait_for_log("action=Drain(\"vm-a\")", Duration::from_secs(30));
    send_signal(old, Signal::SIGUSR2);
    let _successor = KillTreeOnDrop(systemd.main_pid(Duration::from_secs(60)));
    let exited = pool
        .gateway
        .wait_for_exit(Duration::from_secs(10), "the old gateway to exit");
    assert!(exited.success(), "{exited}");
    assert!(
        !pool.log().contains("result=\"stop\""),
        "the old process did not stop the VM itself:\n{}",
        pool.log()
    );

    // The new process finishes the scale-in. Its log line comes after the provider's listing
    // that shows the VM stopped, so the line is waited for and the state read after it.
    pool.gateway.wait_for_log(
        "action=Remove(\"vm-a\") reason=drained and still without sessions result=\"stop\"",
        Duration::from_secs(30),
    );
    assert_eq!(
        pool.vms_json()[0]["state"].as_str(),
        Some("stopped"),
        "{}",
        pool.log()
    );
    assert!(
        pool.log()
            .contains("drained, as it was in the previous gateway vm=\"vm-a\" scale_in=true"),
        "{}",
        pool.log()
    );
    wait_until(Duration::from_secs(5), "the stop script to finish", || {
        !exec.vm.pid_file().exists()
    });
}
