//! A VM lost without a word under an SSH session: its host is cut off from the network (no FIN,
//! no RST ever arrives) while a user's session on it waits for output. The probes mark the VM
//! down, the gateway pings the VM over the session's connection, gets no answer within 30 s and
//! ends the session with a message that says so: the user waits about 45 s, not the two and a
//! half minutes the connection's SSH keepalives (every 30 s without traffic, given up after 4
//! unanswered) would take. The user's next login goes to the VM that is left.
//!
//! The other way round, at the same time: a client that stops answering (its ssh process
//! stopped, as a laptop put to sleep) is dropped by the gateway's keepalives to clients
//! (`ssh.client_alive_count_max`, 4 here), with a line in the log that says why.
//!
//! And a VM whose probes fail while its open connections are fine (sshd's listener gone, the
//! sessions' own sshd processes still there) answers the ping, as does a VM paused for longer
//! than the probes take to mark it down (host maintenance freezes a VM for seconds): their
//! sessions go on.
//!
//! As in `http_lost_vm`, only a real loss of packets shows the first case, so the lost VM's
//! sshd runs in a network namespace of the test's own ([`VmNetwork`]), joined to the host's by
//! a veth pair whose VM end goes down. The other VM is an ordinary one on 127.0.0.1.

// Test code: a failed step should abort the test at once (as in tests/src/lib.rs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use poolgate_tests::*;

/// Five keepalive intervals of 30 s, and room for a loaded machine.
const NOTICED_WITHIN: Duration = Duration::from_secs(210);

/// The team logged in when the VM is lost: half of them land on it. (Two VMs of the default
/// `max_sessions = 10`: one place is left on the VM that stays for a login after the loss.)
const USERS: usize = 18;

/// The soonest the connection's own keepalives could end a session: four unanswered, 30 s
/// apart. A session on a lost VM must end before that.
const KEEPALIVES_GIVE_UP: Duration = Duration::from_secs(120);

#[test]
fn the_sessions_on_a_vm_lost_without_a_word_end_soon_after_the_probes_mark_it_down() {
    require_tools!("sshd", "ssh", "ssh-keygen", "ip");
    require_root!();
    let net = VmNetwork::create();
    let dir = tempfile::Builder::new()
        .prefix("poolgate-ssh-lost-")
        .tempdir()
        .unwrap();

    // The VM to lose: the harness's sshd (config, host key, trust in the gateway's user CA),
    // moved into the namespace and listening only on the VM's address there.
    let ca = UserCa::generate();
    let mut vm = SshdVm::builder("lost")
        .trusted_user_ca_keys(ca.public_key_path())
        .start();
    vm.stop();
    let sshd = vm.command_listening_on(&net.vm_addr.to_string(), dir.path());
    let _sshd = Background::spawn(&mut net.exec(&sshd), "sshd", dir.path());
    wait_for_ssh_banner(
        SocketAddr::from((net.vm_addr, vm.port())),
        Duration::from_secs(10),
    );

    // The gateway at its defaults, over the lost VM and an ordinary one.
    let pool = GatewayPool::builder()
        .without_health_section()
        .user_ca(ca)
        .users(USERS)
        .ssh_vm_at("lost", &vm, &net.vm_addr.to_string())
        .vm("stays")
        // A sleeping client is dropped after 4 unanswered keepalives 30 s apart here (the
        // default, 20, keeps a session through a 10-minute sleep).
        .ssh_option("client_alive_count_max = 4")
        .start();
    pool.gateway.wait_for_vm_up("lost", Duration::from_secs(30));
    pool.gateway
        .wait_for_vm_up("stays", Duration::from_secs(30));
    // A team logs in: each login goes to the VM with fewer sessions, so half of them are on the
    // VM to lose. Those are under test; of the others, one client will stop answering and the
    // rest must not notice anything.
    let (mut on_lost, mut on_stays): (Vec<_>, Vec<_>) = (1..=USERS)
        .map(|i| SshSession::hold(&pool.client(i)))
        .partition(|session| session.vm == "lost");
    assert_eq!((on_lost.len(), on_stays.len()), (USERS / 2, USERS / 2));
    let asleep = on_stays.pop().expect("a session on the VM that stays");
    for session in on_lost.iter_mut().chain(on_stays.iter_mut()) {
        session.roundtrip("before", Duration::from_secs(10));
    }

    // The host is lost; its users wait for output and type nothing. Another user's laptop
    // goes to sleep.
    net.cut();
    send_signal(asleep.pid(), Signal::SIGSTOP);
    let lost = Instant::now();
    // The probes mark the VM's SSH side down first (3 failed probes, 5 s apart, at the
    // defaults); its connections are checked then.
    wait_for_ssh_side_down(&pool, "lost");
    let down = lost.elapsed();
    for session in &mut on_lost {
        session.wait_exit(NOTICED_WITHIN);
        let ended = lost.elapsed();
        assert!(
            ended < KEEPALIVES_GIVE_UP,
            "a session ended {ended:?} after the loss: by keepalives, not by the check"
        );
        assert!(
            session.stderr().contains("VM lost stopped answering"),
            "ssh was not told why: {}",
            session.stderr()
        );
    }
    let ended = lost.elapsed();
    eprintln!(
        "the VM's SSH side was marked down {down:?} after the loss, and its {} sessions had \
         ended {ended:?} after it; ssh said: {}",
        on_lost.len(),
        on_lost[0].stderr().trim()
    );
    let ended_lines = pool
        .log()
        .lines()
        .filter(|l| l.contains("did not answer this connection in time"))
        .count();
    assert_eq!(ended_lines, on_lost.len(), "one line per session ended");
    // The sessions on the VM that stays did not notice.
    for session in &mut on_stays {
        session.roundtrip("after", Duration::from_secs(10));
    }

    // A user logs in again: the VM that is left takes it.
    assert_eq!(landed(&pool.client(1)), "stays");

    // The sleeping client is dropped by the gateway's keepalives to clients, and the log says
    // why (the SSH connection's end had no reason in it before).
    pool.gateway
        .wait_for_log("the client stopped answering keepalives", NOTICED_WITHIN);
    eprintln!(
        "the sleeping client was dropped {:?} after it stopped",
        lost.elapsed()
    );
    send_signal(asleep.pid(), Signal::SIGCONT);
    drop((on_lost, on_stays, asleep));
}

/// The probes fail while the VM's open connections are fine: sshd's listener is gone, the
/// sshd process of the user's session is not. The VM is marked down and no new login goes
/// there, but it answers the session's ping, so the session goes on.
#[test]
fn a_vm_marked_down_that_still_answers_keeps_its_ssh_sessions() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    let mut pool = start_logging_checks(
        GatewayPool::builder()
            .vm("listener-gone")
            .vm("stays")
            .users(2),
    );
    pool.gateway
        .wait_for_vm_up("listener-gone", Duration::from_secs(30));
    pool.gateway
        .wait_for_vm_up("stays", Duration::from_secs(30));
    let first = SshSession::hold(&pool.client(1));
    let mut session = if first.vm == "listener-gone" {
        first
    } else {
        // The next login goes to the VM the first left empty.
        let second = SshSession::hold(&pool.client(2));
        drop(first);
        second
    };
    assert_eq!(session.vm, "listener-gone");
    session.roundtrip("before", Duration::from_secs(10));

    // Only the listening sshd ends (SIGTERM to it alone): the session's own sshd processes
    // stay, as after `systemctl stop ssh` or while sshd restarts.
    let listener = pool.vm("listener-gone").pid().expect("the VM's sshd runs");
    send_signal(listener, Signal::SIGTERM);
    wait_for_ssh_side_down(&pool, "listener-gone");
    kept_after_the_check(&pool, &mut session);
    // New logins go to the VM that is left.
    assert_eq!(landed(&pool.client(1)), "stays");
    drop(session);
    pool.vm_mut("listener-gone").stop();
}

/// A VM paused for longer than the probes take to mark it down, and shorter than the ping's
/// 30 s: every sshd process of it stopped, as host maintenance freezes a whole VM. The ping
/// waits, is answered once the VM is back, and its session goes on.
#[test]
fn a_vm_paused_for_seconds_keeps_its_ssh_sessions() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    let mut pool = start_logging_checks(GatewayPool::builder().vm("paused"));
    pool.gateway
        .wait_for_vm_up("paused", Duration::from_secs(30));
    let mut session = SshSession::hold(&pool.client(1));
    assert_eq!(session.vm, "paused");
    session.roundtrip("before", Duration::from_secs(10));

    let sshd = pool.vm("paused").pid().expect("the VM's sshd runs");
    signal_tree(sshd, Signal::SIGSTOP);
    let paused = Instant::now();
    wait_for_ssh_side_down(&pool, "paused");
    // The pause itself, not a wait for anything: the VM stays frozen 10 s past being marked
    // down (about 25 s in all, as a long maintenance freeze), while its ping waits.
    std::thread::sleep(Duration::from_secs(10));
    assert!(
        !pool
            .log()
            .contains("did not answer this connection in time"),
        "the session was ended while its VM was paused"
    );
    signal_tree(sshd, Signal::SIGCONT);
    eprintln!("the VM was paused for {:?}", paused.elapsed());
    kept_after_the_check(&pool, &mut session);
    drop(session);
    pool.vm_mut("paused").stop();
}

/// Starts `pool` with the health checks at their defaults, logging each answered check: that
/// line is at debug only (one per connection).
fn start_logging_checks(pool: GatewayPoolBuilder) -> GatewayPool {
    pool.without_health_section()
        .gateway_env("POOLGATE_LOG", "info,gateway::ssh=debug")
        .start()
}

/// Waits for the line that marks `vm`'s SSH side down (the probes' third failure in a row, at
/// the defaults).
fn wait_for_ssh_side_down(pool: &GatewayPool, vm: &str) {
    wait_for_health_line(
        pool.gateway.log_path(),
        vm,
        "VM is down on its SSH side",
        Duration::from_secs(60),
    );
}

/// The VM under `session` answered the gateway's ping after being marked down: the session
/// still works, and no session was ended for not answering.
fn kept_after_the_check(pool: &GatewayPool, session: &mut SshSession) {
    pool.gateway.wait_for_log(
        "the health checks marked the VM down, but it answered this connection",
        Duration::from_secs(30),
    );
    session.roundtrip("after the check", Duration::from_secs(10));
    assert!(
        !pool
            .log()
            .contains("did not answer this connection in time"),
        "a session on a VM that answered was ended"
    );
}

/// `ssh.client_alive_interval` and `ssh.client_alive_count_max`: a client that sleeps for
/// less than their product (a laptop closed for a coffee) carries on with its session; one that
/// sleeps longer is dropped with the log line that says why. Scaled down here to 1 s × 4; the
/// default is 30 s × 20, about ten minutes.
#[test]
fn a_client_asleep_for_less_than_the_keepalives_allow_keeps_its_session() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let pool = GatewayPool::builder()
        .vm("vm-a")
        .users(2)
        .ssh_option("client_alive_interval = \"1s\"")
        .ssh_option("client_alive_count_max = 4")
        .start();
    let mut napping = SshSession::hold(&pool.client(1));
    let mut sleeping = SshSession::hold(&pool.client(2));
    send_signal(napping.pid(), Signal::SIGSTOP);
    send_signal(sleeping.pid(), Signal::SIGSTOP);
    let asleep = Instant::now();
    // The nap itself: two keepalives go unanswered, fewer than the four allowed.
    std::thread::sleep(Duration::from_secs(2));
    send_signal(napping.pid(), Signal::SIGCONT);
    napping.roundtrip("after a two-second nap", Duration::from_secs(10));
    pool.gateway.wait_for_log(
        "the client stopped answering keepalives",
        Duration::from_secs(30),
    );
    let dropped = asleep.elapsed();
    assert!(
        dropped >= Duration::from_secs(3),
        "dropped {dropped:?} after it fell asleep, before four keepalives went unanswered"
    );
    send_signal(sleeping.pid(), Signal::SIGCONT);
    sleeping.wait_exit(Duration::from_secs(20));
    // Still there after the other was dropped.
    napping.roundtrip("after the other was dropped", Duration::from_secs(10));
    eprintln!("the sleeping client was dropped {dropped:?} after it fell asleep");
}
