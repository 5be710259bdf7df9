//! The gateway's signals end to end, with real OpenSSH and jupyter_server VMs.
//!
//! - SIGTERM: new connections are refused at once; open sessions run to their end (with their
//!   exit status), or are closed with a message when `gateway.shutdown_grace` passes; exit 0.
//!   Browsers' downloads under way arrive whole, over HTTP/2 and HTTP/1.1.
//! - SIGHUP: the configuration is re-read without dropping anything open — the pool (a VM added,
//!   one removed), `[routing]`, `[health]`, the TLS certificate (served to new connections at
//!   once); authorized keys are read at every login; an invalid file is refused with its errors
//!   in the log and the running configuration keeps serving.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use poolgate_tests::jupyter::{JupyterServerVm, TestCa, cookie_vm, require_jupyter, run_code};
use poolgate_tests::*;

const RTT: Duration = Duration::from_secs(2);

fn ssh_addr(pool: &GatewayPool) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, pool.ssh_port))
}

fn log(pool: &GatewayPool) -> String {
    strip_ansi(&pool.gateway.log_text())
}

/// Sends `signal` to the gateway.
fn signal_gateway(gateway: &GatewayProcess, signal: Signal) {
    send_signal(gateway.pid().expect("the gateway runs"), signal);
}

#[test]
fn sigterm_refuses_new_connections_at_once_and_lets_open_sessions_finish_then_exits_0() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let mut pool = GatewayPool::builder()
        .vm("vm-a")
        .users(2)
        .config_toml("[gateway]\nshutdown_grace = \"30s\"\n")
        .start();
    let mut interactive = SshSession::hold(&pool.client(1));
    interactive.roundtrip("before SIGTERM", RTT);
    // A command that is still running when the signal comes, and ends with its own status.
    let running = RunningCommand::start(&pool.client(2), 2);
    wait_until(Duration::from_secs(10), "both sessions routed", || {
        log(&pool).matches("session routed").count() >= 2
    });

    let sent = Instant::now();
    signal_gateway(&pool.gateway, Signal::SIGTERM);
    pool.gateway
        .wait_for_log("shutting down: no new connections", Duration::from_secs(5));
    wait_until(
        Duration::from_secs(2),
        "the SSH port to refuse connections",
        || refused(ssh_addr(&pool)),
    );
    let refused_after = sent.elapsed();
    let out = pool.client(1).run("true");
    assert_eq!(out.status.code(), Some(255));
    assert!(
        stderr(&out).contains("Connection refused"),
        "{}",
        stderr(&out)
    );

    // Open sessions go on.
    for k in 0..3 {
        interactive.roundtrip(&format!("after SIGTERM {k}"), RTT);
    }
    running.assert_ran_to_its_end();
    assert!(
        pool.gateway.try_wait().is_none(),
        "the gateway waits for the last session"
    );
    let status = interactive.close(Duration::from_secs(10));
    assert!(
        status.success(),
        "the interactive session ended with {status}"
    );
    let last_ended = Instant::now();

    let status = pool
        .gateway
        .wait_for_exit(Duration::from_secs(10), "the gateway to exit");
    assert!(
        status.success(),
        "poolgate exited with {status}\n{}",
        log(&pool)
    );
    eprintln!(
        "SIGTERM: listener refused after {refused_after:?}; exit {:?} after the last session ended",
        last_ended.elapsed()
    );
    assert!(!log(&pool).contains("closing the remaining sessions"));
}

#[test]
fn sigterm_closes_sessions_still_open_when_shutdown_grace_passes_with_a_message() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let grace = Duration::from_secs(2);
    let mut pool = GatewayPool::builder()
        .vm("vm-a")
        .users(1)
        .config_toml(&format!(
            "[gateway]\nshutdown_grace = \"{}s\"\n",
            grace.as_secs()
        ))
        .start();
    let mut session = SshSession::hold(&pool.client(1));
    session.roundtrip("before SIGTERM", RTT);
    let sent = Instant::now();
    signal_gateway(&pool.gateway, Signal::SIGTERM);
    pool.gateway
        .wait_for_log("shutting down: no new connections", Duration::from_secs(5));
    // Still served during the grace time.
    session.roundtrip("during the grace time", RTT);
    let status = session.wait_exit(grace + Duration::from_secs(10));
    let closed_after = sent.elapsed();
    let err = session.stderr();
    eprintln!("session closed {closed_after:?} after SIGTERM ({status}); stderr {err:?}");
    assert_eq!(status.code(), Some(255), "{err}");
    assert!(
        err.contains("poolgate is shutting down; please reconnect in a moment"),
        "{err:?}"
    );
    assert!(
        closed_after >= grace && closed_after <= grace + Duration::from_secs(2),
        "closed {closed_after:?} after SIGTERM; grace {grace:?}"
    );
    let status = pool
        .gateway
        .wait_for_exit(Duration::from_secs(10), "the gateway to exit");
    assert!(
        status.success(),
        "poolgate exited with {status}\n{}",
        log(&pool)
    );
    assert!(log(&pool).contains("closing the remaining sessions"));
}

/// `each` for every one of `users`, all at once, with the user's client.
fn at_once<T: Send>(
    pool: &GatewayPool,
    users: &[usize],
    each: impl Fn(&SshClient) -> T + Sync,
) -> Vec<(usize, T)> {
    std::thread::scope(|s| {
        let logins: Vec<_> = users
            .iter()
            .map(|&i| {
                let (client, each) = (pool.client(i), &each);
                s.spawn(move || (i, each(&client)))
            })
            .collect();
        logins
            .into_iter()
            .map(|l| l.join().expect("login thread"))
            .collect()
    })
}

/// Holds a session of user `i` on `vm`, named in the login: load there that least-loaded
/// placement would avoid.
fn hold_on(pool: &GatewayPool, i: usize, vm: &str) -> SshSession {
    let client = pool
        .client_as(&format!("{}+{vm}", pool.user(i)))
        .user_key(pool.key(i));
    SshSession::hold(&client)
}

/// Those of the team who were on `vm` log in again at once while `vm` is the busiest
/// (least-loaded would send them elsewhere); each lands on `vm`.
fn group_lands_on_its_vm(pool: &GatewayPool, holder: usize, before: &[(usize, String)], vm: &str) {
    let group: Vec<usize> = before
        .iter()
        .filter(|(_, on)| on == vm)
        .map(|(i, _)| *i)
        .collect();
    let busy = hold_on(pool, holder, vm);
    let now = at_once(pool, &group, landed);
    let strays: Vec<_> = now.iter().filter(|(_, on)| on != vm).collect();
    assert!(
        strays.is_empty(),
        "users who were on {vm} went elsewhere (the others were emptier): {strays:?}\n{}",
        pool.log()
    );
    busy.close(Duration::from_secs(10));
}

/// The VMs a team is spread over in the restart test (each takes the default 10 sessions; a
/// group of the team and the session holding it busiest fit).
const TEAM_VMS: [&str; 3] = ["vm-a", "vm-b", "vm-c"];

/// The state file at its default place (beside the configuration), once it holds `want`.
fn state_file_with(
    path: &Path,
    what: &str,
    want: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut state = serde_json::Value::Null;
    wait_until(Duration::from_secs(10), what, || {
        state = std::fs::read(path)
            .ok()
            .and_then(|text| serde_json::from_slice(&text).ok())
            .unwrap_or_default();
        want(&state)
    });
    state
}

fn drained(state: &serde_json::Value) -> Vec<&str> {
    state["drained"]
        .as_array()
        .map(|vms| vms.iter().filter_map(serde_json::Value::as_str).collect())
        .unwrap_or_default()
}

/// A crash (SIGKILL, then started again as systemd's `Restart=` does) and a restart (SIGTERM)
/// forget nothing an operator or a user relies on: a drained VM stays drained, and a team that
/// logged in this morning lands on the same VMs, although least-loaded would send them
/// elsewhere. The smallest configuration: four VMs, defaults (`gateway.state_file` is
/// `state.json` beside the configuration).
#[test]
fn a_crash_or_a_restart_keeps_the_drains_and_sends_each_user_back_to_their_vm() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    const TEAM: usize = 20;
    let holder = TEAM + 1;
    let mut pool = GatewayPool::builder()
        .vm("vm-a")
        .vm("vm-b")
        .vm("vm-c")
        .vm("vm-d")
        .users(holder)
        .start();
    let drain = pool.cli(&["drain", "vm-d"]);
    assert!(drain.status.success(), "{drain:?}");

    // Twenty people at 9:00, all at once, each with a shell open: least-loaded spreads them
    // over the three VMs taking sessions. Then they log off.
    let team: Vec<usize> = (1..=TEAM).collect();
    let shells = at_once(&pool, &team, SshSession::hold);
    let before: Vec<(usize, String)> = shells.iter().map(|(i, s)| (*i, s.vm.clone())).collect();
    for vm in TEAM_VMS {
        let n = before.iter().filter(|(_, on)| on == vm).count();
        assert!((6..=7).contains(&n), "{n} on {vm}: {before:?}");
    }
    for (_, shell) in shells {
        assert!(shell.close(Duration::from_secs(10)).success());
    }

    // Written within seconds, mode 0600.
    let users: Vec<String> = team.iter().map(|&i| pool.user(i)).collect();
    let path = pool.gateway.dir().join("state.json");
    state_file_with(
        &path,
        "the state file to name the drain and every user",
        |state| {
            drained(state) == ["vm-d"]
                && users
                    .iter()
                    .all(|user| state["affinity"][user.as_str()].is_array())
        },
    );
    let mode = std::fs::metadata(&path)
        .expect("state file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");

    // The gateway crashes; systemd starts it again.
    pool.gateway.kill();
    pool.restart_gateway();
    pool.gateway
        .wait_for_log("restored from the state file", Duration::from_secs(10));
    assert_eq!(pool.vm_state("vm-d"), "draining", "{}", pool.log());
    assert!(pool.metrics().contains("\npoolgate_state_file_failing 0\n"));
    for vm in TEAM_VMS {
        group_lands_on_its_vm(&pool, holder, &before, vm);
    }

    // The operator moves the drain and at once restarts the gateway (SIGTERM): its last write
    // at exit keeps that too.
    for (verb, vm) in [("undrain", "vm-d"), ("drain", "vm-b")] {
        let out = pool.cli(&[verb, vm]);
        assert!(out.status.success(), "{out:?}");
    }
    let status = pool.gateway.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status}");
    pool.restart_gateway();
    wait_until(Duration::from_secs(10), "the second restore", || {
        pool.log().matches("restored from the state file").count() == 2
    });
    assert_eq!(pool.vm_state("vm-b"), "draining");
    pool.wait_for_state("vm-d", "healthy", Duration::from_secs(10));
    group_lands_on_its_vm(&pool, holder, &before, "vm-a");
    pool.assert_no_panic();
}

/// Under systemd with `StateDirectory=`, as the shipped unit runs it (its configuration directory
/// is read-only to the service), the default state file is kept in the state directory, which
/// `check-config` names too, and a crash followed by a start reads it back from there.
#[test]
fn under_systemd_the_default_state_file_is_kept_in_the_state_directory() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let scratch = tempfile::tempdir().expect("temp dir");
    // systemd creates the unit's state directories and passes them, colon-separated.
    let state_dir = scratch.path().join("poolgate");
    std::fs::create_dir_all(state_dir.join("keys")).expect("the state directories");
    let dirs = format!(
        "{}:{}",
        state_dir.display(),
        state_dir.join("keys").display()
    );
    let mut pool = GatewayPool::builder()
        .vm("vm-a")
        .vm("vm-b")
        .users(1)
        .gateway_env("STATE_DIRECTORY", &dirs)
        .start();
    let drain = pool.cli(&["drain", "vm-b"]);
    assert!(drain.status.success(), "{drain:?}");

    let path = state_dir.join("state.json");
    state_file_with(&path, "the state file to name the drain", |state| {
        drained(state) == ["vm-b"]
    });
    assert!(
        !pool.gateway.dir().join("state.json").exists(),
        "nothing beside the configuration"
    );
    let check = run_with_timeout(
        Command::new(poolgate_bin())
            .arg("check-config")
            .arg(pool.gateway.config_path())
            .env("STATE_DIRECTORY", &dirs)
            .env("NO_COLOR", "1"),
        Duration::from_secs(30),
    );
    let summary = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{check:?}");
    assert!(
        summary.contains(&format!(
            "drains and users' VMs: kept across restarts in {}\n",
            path.display()
        )),
        "{summary}"
    );

    pool.gateway.kill();
    pool.restart_gateway();
    pool.gateway
        .wait_for_log("restored from the state file", Duration::from_secs(10));
    assert_eq!(pool.vm_state("vm-b"), "draining", "{}", pool.log());
    assert_eq!(landed(&pool.client(1)), "vm-a");
    pool.assert_no_panic();
}

/// A state file that cannot be written costs no login: it is named in the log with the error,
/// `poolgate_state_file_failing` is 1 until it can be written again, and then it is.
#[test]
fn a_state_file_that_cannot_be_written_is_reported_and_written_once_it_can() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let scratch = tempfile::tempdir().expect("temp dir");
    // Its directory is a regular file: no write succeeds, whoever the gateway runs as.
    let blocker = scratch.path().join("state");
    std::fs::write(&blocker, "").expect("write the blocker");
    let path = blocker.join("state.json");
    let pool = GatewayPool::builder()
        .vm("vm-a")
        .users(1)
        .config_toml(&format!("[gateway]\nstate_file = \"{}\"\n", path.display()))
        .start();
    pool.gateway
        .wait_for_log("cannot write the state file", Duration::from_secs(10));
    assert!(
        pool.metrics().contains("\npoolgate_state_file_failing 1\n"),
        "{}",
        pool.metrics()
    );
    assert_eq!(landed(&pool.client(1)), "vm-a");

    std::fs::remove_file(&blocker).expect("remove the blocker");
    pool.gateway
        .wait_for_log("the state file is written again", Duration::from_secs(10));
    assert!(pool.metrics().contains("\npoolgate_state_file_failing 0\n"));
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("state file")).expect("JSON");
    assert!(
        state["affinity"][pool.user(1).as_str()].is_array(),
        "{state}"
    );
    pool.assert_no_panic();
}

/// Writes `config` as the gateway's file, sends SIGHUP and waits for the reload's log line.
fn reload_with(pool: &GatewayPool, config: &str) {
    std::fs::write(pool.gateway.config_path(), config).expect("write config");
    let before = reloads(pool);
    signal_gateway(&pool.gateway, Signal::SIGHUP);
    wait_until(Duration::from_secs(10), "configuration reloaded", || {
        reloads(pool) > before
    });
}

fn reloads(pool: &GatewayPool) -> usize {
    log(pool).matches("configuration reloaded").count()
}

#[test]
fn sighup_reloads_pool_routing_health_and_keys_without_dropping_a_session() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let started = Instant::now();
    let pool = GatewayPool::builder()
        .vm("vm-a")
        .vm("vm-b")
        .users(3)
        .start();
    let mut kept = SshSession::hold(&pool.client(1));
    assert_eq!(kept.vm, "vm-a");
    kept.roundtrip("before the reload", RTT);

    // The new configuration: vm-c added (its host key in backend_known_hosts), vm-a removed,
    // user affinity off, a VM down after one failed probe.
    let vm_c = SshdVm::builder("vm-c")
        .trusted_user_ca_keys(pool.user_ca().public_key_path())
        .start();
    let known = pool.dir().join("known_hosts");
    let mut text = std::fs::read_to_string(&known).expect("read known_hosts");
    text += &format!("{}\n", vm_c.known_hosts_line());
    std::fs::write(&known, text).expect("write known_hosts");
    let old = std::fs::read_to_string(pool.gateway.config_path()).expect("read config");
    let mut new = without_backend(&old, "vm-a").replace("rise = 1\n", "rise = 1\nfall = 1\n");
    new += &format!(
        "\n[[pool.backends]]\nname = \"vm-c\"\nhost = \"127.0.0.1\"\nssh_port = {}\n\n[routing]\naffinity = \"none\"\n",
        vm_c.port()
    );
    std::fs::write(pool.gateway.config_path(), &new).expect("write config");
    let before = reloads(&pool);
    let sent = Instant::now();
    signal_gateway(&pool.gateway, Signal::SIGHUP);
    wait_until(Duration::from_secs(10), "configuration reloaded", || {
        reloads(&pool) > before
    });
    pool.gateway.wait_for_vm_up("vm-c", Duration::from_secs(10));
    eprintln!(
        "reload applied and vm-c up {:?} after SIGHUP",
        sent.elapsed()
    );

    // The session on the removed VM is untouched.
    for k in 0..3 {
        kept.roundtrip(&format!("after the reload {k}"), RTT);
    }
    // New sessions: never vm-a; without affinity, user 2's second connection goes to the
    // least-loaded VM, not back to its first.
    let second = SshSession::hold(&pool.client(2));
    assert_eq!(second.vm, "vm-b");
    let out = pool.client(2).run("echo $POOLGATE_VM");
    assert_ok(&out, "user 2's second login");
    assert_eq!(
        stdout(&out),
        "vm-c",
        "affinity = \"none\" applied by the reload"
    );

    // Authorized keys are read at every login: a newly listed key logs in, the removed one not.
    let user3 = pool.user(3);
    let new_key = UserKey::generate(&format!("{user3}-new"));
    pool.authorize(&user3, &new_key);
    let out = pool
        .client_as(&user3)
        .user_key(&new_key)
        .run("echo $POOLGATE_VM");
    assert_ok(&out, "login with the newly authorized key");
    let out = pool.client(3).run("true");
    assert_eq!(
        out.status.code(),
        Some(255),
        "the removed key still logs in"
    );
    assert!(stderr(&out).contains("Permission denied"));

    // An invalid file: refused with its error (and key path) in the log; the running
    // configuration keeps serving.
    let broken = new.replace("affinity = \"none\"", "affinity = \"sometimes\"");
    std::fs::write(pool.gateway.config_path(), broken).expect("write broken config");
    let failures = log(&pool).matches("reload failed").count();
    signal_gateway(&pool.gateway, Signal::SIGHUP);
    wait_until(Duration::from_secs(10), "the reload to fail", || {
        log(&pool).matches("reload failed").count() > failures
    });
    let text = log(&pool);
    let errors = log_lines(&text, &["reload: invalid configuration"]);
    assert!(
        errors.iter().any(|l| l.contains("routing.affinity")),
        "the error names its key: {errors:#?}"
    );
    assert!(text.contains("keeping the running configuration"), "{text}");
    kept.roundtrip("after the failed reload", RTT);
    let out = pool.client(2).run("echo $POOLGATE_VM");
    assert_ok(&out, "a login after the failed reload");
    assert_eq!(
        stdout(&out),
        "vm-c",
        "still affinity none, vm-c still in the pool"
    );

    // [health] was applied too: with fall = 1 one failed probe marks a VM down.
    let mut vm_c = vm_c;
    vm_c.stop();
    pool.gateway
        .wait_for_vm_down("vm-c", Duration::from_secs(10));
    let vms = http_get(pool.admin, "/api/v1/vms");
    let c = vms
        .json()
        .items()
        .iter()
        .find(|v| v["name"].as_str() == Some("vm-c"))
        .cloned()
        .expect("vm-c listed");
    let failed_tail = c["health_history"]
        .items()
        .iter()
        .rev()
        .take_while(|p| p["ok"].as_bool() == Some(false))
        .count();
    assert_eq!(failed_tail, 1, "down after exactly one failed probe: {c:?}");
    // vm-a, removed while a session runs there, is still seen with it, draining (it takes no
    // new session, asserted above), until that session ends; then it leaves the pool.
    let vm_a = || {
        http_get(pool.admin, "/api/v1/vms")
            .json()
            .items()
            .iter()
            .find(|v| v["name"].as_str() == Some("vm-a"))
            .cloned()
    };
    let leaving = vm_a().expect("vm-a listed while its session runs");
    assert_eq!(
        (
            leaving["state"].as_str(),
            leaving["leaving"].as_bool(),
            leaving["sessions"]["ssh"].as_u64()
        ),
        (Some("draining"), Some(true), Some(1)),
        "{leaving}"
    );
    // An undrain cannot open it: the operator is told to add it back instead.
    let out = pool.cli(&["undrain", "vm-a"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stderr(&out).contains("add it back"), "{}", stderr(&out));
    let table = stdout(&pool.cli(&["status"]));
    assert!(table.contains("leaving: removed from the pool"), "{table}");
    assert!(
        pool.metrics()
            .lines()
            .any(|l| l.starts_with("poolgate_sessions_active{")
                && l.contains("vm=\"vm-a\"")
                && l.ends_with(" 1")),
        "{}",
        pool.metrics()
    );
    kept.roundtrip("on the removed VM", RTT);
    assert!(
        kept.close(Duration::from_secs(10)).success(),
        "the session on the removed VM"
    );
    assert!(
        poll(Duration::from_secs(10), || vm_a().is_none()),
        "vm-a still listed after its last session ended: {:?}",
        vm_a()
    );
    pool.gateway
        .wait_for_log("it has left the pool", Duration::from_secs(10));

    // vm-a comes back with the next reload: probed from scratch, it takes sessions after its
    // next good probe as a new VM does (it once stayed "starting" until a restart: its probe
    // history from before the removal said "up" already, so "up" again was no change).
    let block = old
        .split("\n[[pool.backends]]")
        .find(|b| b.contains("name = \"vm-a\""))
        .expect("vm-a's block");
    reload_with(&pool, &format!("{new}\n[[pool.backends]]{block}"));
    let vm_a_state = || vm_a().and_then(|v| v["state"].as_str().map(str::to_owned));
    assert!(
        poll(Duration::from_secs(10), || vm_a_state().as_deref()
            == Some("healthy")),
        "vm-a added again is {:?}\n{}",
        vm_a_state(),
        log(&pool)
    );

    assert!(second.close(Duration::from_secs(10)).success());
    assert!(
        log(&pool)
            .lines()
            .filter(|l| l.contains("ssh session ended"))
            .all(|l| !has_field(l, "exit", "-")),
        "every session ended with its exit status"
    );
    eprintln!("SIGHUP test: {:?}", started.elapsed());
}

/// Whether a TLS handshake with `addr` succeeds trusting only `ca`.
async fn trusts(addr: SocketAddr, ca: &TestCa) -> bool {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    tokio_rustls::TlsConnector::from(ca.client_config())
        .connect(name, tcp)
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_serves_a_new_tls_certificate_at_once_and_keeps_an_open_websocket() {
    if !require_jupyter() {
        return;
    }
    let vm = blocking(|| JupyterServerVm::start("js-a")).await;
    let gw = GatewayPool::builder()
        .web_pool("/api")
        .tls()
        .web_vm("js-a", vm.port())
        .start_async()
        .await;
    let browser = gw.browser();
    // The page that sets `_xsrf`, needed for the kernel API.
    let (r, _) = browser.follow("/lab").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let mut ws = browser.open_kernel("", "s1").await;
    assert_eq!(run_code(&mut ws, "1+1", "before").await, "2");

    // A renewed certificate (another CA here, so a client can tell which one it got) replaces
    // the files in place.
    let renewed = TestCa::generate();
    std::fs::copy(renewed.cert_path(), gw.tls_ca().cert_path()).expect("copy cert");
    std::fs::copy(renewed.key_path(), gw.tls_ca().key_path()).expect("copy key");
    assert!(
        trusts(gw.https, gw.tls_ca()).await,
        "the old certificate is still served"
    );
    let sent = Instant::now();
    signal_gateway(&gw.gateway, Signal::SIGHUP);
    let mut served = false;
    while sent.elapsed() < Duration::from_secs(5) {
        if trusts(gw.https, &renewed).await {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = sent.elapsed();
    assert!(
        served,
        "the renewed certificate is not served 5 s after SIGHUP\n{}",
        gw.gateway.log_text()
    );
    eprintln!("renewed certificate served {took:?} after SIGHUP");
    assert!(
        !trusts(gw.https, gw.tls_ca()).await,
        "the old certificate is gone"
    );
    // Logged once the new certificate is in place, by the log's own thread: waited for.
    gw.gateway
        .wait_for_log("TLS certificate reloaded", Duration::from_secs(10));

    // The websocket opened before the reload still works; new requests use the new cert.
    assert_eq!(run_code(&mut ws, "2+3", "after").await, "5");
    let b2 = poolgate_tests::jupyter::Browser::https(gw.https, renewed.client_config());
    let r = b2.get("/api/status").await;
    assert_eq!(r.status, 200, "{}", r.text());
    drop(ws);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_on_a_vm_removed_by_reload_stays_there_with_its_kernel() {
    if !require_jupyter() {
        return;
    }
    let vms = blocking(|| JupyterServerVm::start_all(&["js-a", "js-b"])).await;
    let gw = GatewayPool::builder()
        .web_pool("/api")
        .tls()
        .web_vms(&vms)
        .start_async()
        .await;
    // A notebook: the page, a kernel over its websocket, a cell.
    let browser = gw.browser();
    let (r, _) = browser.follow("/lab").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let vm = cookie_vm(&browser.cookie("poolgate_vm", "/").expect("pinned"));
    let mut ws = browser.open_kernel("", "s1").await;
    assert_eq!(run_code(&mut ws, "x = 20; x * 2 + 2", "before").await, "42");

    // Its VM leaves the configuration (docs/operations.md: a removed VM gets no new sessions,
    // and those open there carry on until they end).
    let old = std::fs::read_to_string(gw.gateway.config_path()).expect("read config");
    reload_with(&gw, &without_backend(&old, &vm));
    gw.gateway
        .wait_for_log("VM removed from the pool", Duration::from_secs(10));

    // The browser's requests still go there: its kernel is listed, its cell state is there.
    let r = browser.get("/api/kernels").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        cookie_vm(&browser.cookie("poolgate_vm", "/").expect("pinned")),
        vm,
        "the browser was moved off its removed VM"
    );
    assert_eq!(r.json().as_array().map(Vec::len), Some(1), "{}", r.text());
    assert_eq!(run_code(&mut ws, "x + 1", "after").await, "21");
    // A new browser goes to the other VM; the removed one is listed as draining meanwhile.
    let other = gw.browser();
    assert_eq!(other.get("/api/status").await.status, 200);
    assert_ne!(
        cookie_vm(&other.cookie("poolgate_vm", "/").expect("pinned")),
        vm
    );
    let vms_now = http_get(gw.admin, "/api/v1/vms").json();
    let removed = vms_now
        .items()
        .iter()
        .find(|v| v["name"].as_str() == Some(vm.as_str()))
        .cloned()
        .unwrap_or_else(|| panic!("{vm} not listed while its browser works there: {vms_now}"));
    assert_eq!(removed["state"].as_str(), Some("draining"), "{removed}");
    assert_eq!(removed["sessions"]["http"].as_u64(), Some(1), "{removed}");
    drop(ws);
    drop(vms);
}

/// Browsers' large downloads still running when SIGTERM comes arrive whole, over HTTP/2 (TLS
/// with ALPN h2, what browsers speak to the gateway) and over HTTP/1.1. Six at once, by curl
/// reading at 1 MiB/s: the gateway has read each file from the VM before its client has it,
/// and the last of it waits in the connection's buffers, which a close at that moment would
/// throw away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_under_way_at_sigterm_arrive_whole_over_http2_and_http1() {
    require_tools!("curl");
    if !require_jupyter() {
        return;
    }
    const SIZE: u64 = 8 << 20;
    let vm = blocking(|| JupyterServerVm::start("js-a")).await;
    let sha = random_file(&vm.root().join("big.bin"), SIZE);
    let mut pool = GatewayPool::builder()
        .web_pool("/api")
        .tls()
        .web_vm("js-a", vm.port())
        // The connection's watchdog looks every quarter of this (every 15 s by default) for a
        // connection with nothing left to answer; every 500 ms here, so looks fall in the last
        // second of each download, when the gateway has read all of the file from the VM.
        .http_option("response_header_timeout = \"2s\"")
        .start_async()
        .await;
    let origin = format!("https://localhost:{}", pool.https.port());
    let mut downloads: Vec<_> = ["--http2", "--http1.1"]
        .iter()
        .cycle()
        .take(6)
        .enumerate()
        .map(|(i, version)| {
            let out = pool.dir().join(format!("download-{i}.bin"));
            let curl = std::process::Command::new("curl")
                .args([version, "--silent", "--show-error", "--fail"])
                .arg("--cacert")
                .arg(pool.tls_ca().ca_path())
                .args([
                    "--limit-rate",
                    "1M",
                    "--write-out",
                    "%{http_version} %{size_download}",
                ])
                .arg("--output")
                .arg(&out)
                // A browser's download link: jupyter_server checks the Referer of a GET on /files.
                .arg("--referer")
                .arg(format!("{origin}/lab"))
                .arg(format!("{origin}/files/big.bin"))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn curl");
            (*version, out, curl)
        })
        .collect();
    wait_until(Duration::from_secs(20), "every download to start", || {
        downloads.iter_mut().all(|(_, out, curl)| {
            if let Some(status) = curl.try_wait().expect("curl's status") {
                panic!(
                    "curl ended before the signal: {status}: {}",
                    piped_output(curl).1
                );
            }
            std::fs::metadata(out).is_ok_and(|m| m.len() >= 256 << 10)
        })
    });

    let sent = Instant::now();
    signal_gateway(&pool.gateway, Signal::SIGTERM);
    pool.gateway
        .wait_for_log("shutting down: no new connections", Duration::from_secs(5));
    let downloads = blocking(move || {
        for (_, _, curl) in &mut downloads {
            wait_for_exit(curl, Duration::from_secs(60), "curl");
        }
        downloads
    })
    .await;
    eprintln!(
        "{} downloads under way at SIGTERM ended {:?} after it",
        downloads.len(),
        sent.elapsed()
    );
    // Every download's outcome first, then the verdict: a failure names them all.
    let outcomes: Vec<String> = downloads
        .into_iter()
        .map(|(version, out, mut curl)| {
            let status = curl.wait().expect("curl's status");
            let mut written = String::new();
            std::io::Read::read_to_string(&mut curl.stdout.take().expect("stdout"), &mut written)
                .expect("read curl's stdout");
            let got = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
            let http = if version == "--http2" { "2" } else { "1.1" };
            if status.success() && written == format!("{http} {SIZE}") && sha256_file(&out) == sha {
                format!("curl {version}: whole")
            } else {
                format!(
                    "curl {version}: {status}, {got} of {SIZE} bytes, wrote {written:?}: {}",
                    piped_output(&mut curl).1.trim_end()
                )
            }
        })
        .collect();
    let failed: Vec<&String> = outcomes
        .iter()
        .filter(|o| !o.ends_with(": whole"))
        .collect();
    assert!(failed.is_empty(), "{outcomes:#?}\n{}", log(&pool));
    let status = pool
        .gateway
        .wait_for_exit(Duration::from_secs(10), "the gateway to exit");
    assert!(status.success(), "poolgate exited with {status}");
}
