//! A VM lost without a word under an SSH session: its host is cut off from the network (no FIN,
//! no RST ever arrives) while a user's session on it waits for output. The gateway's SSH
//! keepalives to the VM (every 30 s without traffic, given up after 4 unanswered) end the
//! connection to the VM, and with it the user's session, which does not hang. Meanwhile the
//! probes mark the VM down, and the user's next login goes to the VM that is left.
//!
//! The other way round, at the same time: a client that stops answering (its ssh process
//! stopped, as a laptop put to sleep) is dropped by the gateway's keepalives to clients, with
//! a line in the log that says why.
//!
//! As in `http_lost_vm`, only a real loss of packets shows this, so the lost VM's sshd runs in
//! a network namespace of the test's own ([`VmNetwork`]), joined to the host's by a veth pair
//! whose VM end goes down. The other VM is an ordinary one on 127.0.0.1.

// Test code: a failed step should abort the test at once (as in tests/src/lib.rs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use poolgate_tests::*;

/// Five keepalive intervals of 30 s, and room for a loaded machine.
const NOTICED_WITHIN: Duration = Duration::from_secs(210);

#[test]
fn an_ssh_session_on_a_vm_lost_without_a_word_ends_and_the_next_login_goes_elsewhere() {
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
        .users(2)
        .ssh_vm_at("lost", &vm, &net.vm_addr.to_string())
        .vm("stays")
        .start();
    pool.gateway.wait_for_vm_up("lost", Duration::from_secs(30));
    pool.gateway
        .wait_for_vm_up("stays", Duration::from_secs(30));
    // Two users log in: the second goes to the VM the first left empty (least loaded), so
    // there is one session on each. The one on the VM to lose is under test; the other one's
    // client will stop answering.
    let first = SshSession::hold(&pool.client(1));
    let second = SshSession::hold(&pool.client(2));
    assert_ne!(first.vm, second.vm);
    let (mut session, asleep) = if first.vm == "lost" {
        (first, second)
    } else {
        (second, first)
    };
    assert_eq!((session.vm.as_str(), asleep.vm.as_str()), ("lost", "stays"));
    session.roundtrip("before", Duration::from_secs(10));

    // The host is lost; the user waits for output and types nothing. The other user's laptop
    // goes to sleep.
    net.cut();
    send_signal(asleep.pid(), Signal::SIGSTOP);
    let lost = Instant::now();
    session.wait_exit(NOTICED_WITHIN);
    let ended = lost.elapsed();
    eprintln!(
        "the session on the lost VM ended {ended:?} after the loss; ssh said: {}",
        session.stderr().trim()
    );
    // The gateway's keepalives, not anything sooner: the first goes out after 30 s of silence.
    assert!(ended >= Duration::from_secs(30), "{ended:?}");
    pool.gateway
        .wait_for_vm_down("lost", Duration::from_secs(5));

    // The user logs in again: the VM that is left takes it.
    assert_eq!(landed(&pool.client(1)), "stays");

    // The sleeping client is dropped by the same keepalives, the other way, and the log says
    // why (the SSH connection's end had no reason in it before).
    pool.gateway.wait_for_log(
        "the client stopped answering keepalives",
        Duration::from_secs(60),
    );
    eprintln!(
        "the sleeping client was dropped {:?} after it stopped",
        lost.elapsed()
    );
    send_signal(asleep.pid(), Signal::SIGCONT);
    drop((session, asleep));
}
