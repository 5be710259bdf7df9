//! Where sessions go: user affinity, least-loaded spread (load = live sessions), and what happens
//! with a wrong user key, a VM whose host key is unknown, a VM that is down, and no VM at all.

// Test code: a failed step should abort the test at once (as in tests/src/lib.rs).
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use poolgate_tests::*;

const OPEN: Duration = Duration::from_secs(20);

#[test]
fn a_users_connections_stay_on_their_vm() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let pool = GatewayPool::builder()
        .vm("vm-a")
        .vm("vm-b")
        .vm("vm-c")
        .users(2)
        .start();
    // User 2 takes vm-a (all idle: the name breaks the tie), so user 1 starts on vm-b.
    let other = SshSession::hold_within(&pool.client(2), OPEN);
    assert_eq!(other.vm, "vm-a");
    let first = SshSession::hold_within(&pool.client(1), OPEN);
    assert_eq!(first.vm, "vm-b");
    // Least-loaded would now pick vm-c (no sessions); affinity keeps user 1 on vm-b.
    let second = SshSession::hold_within(&pool.client(1), OPEN);
    assert_eq!(second.vm, "vm-b", "second connection of the same user");
    assert_eq!(landed(&pool.client(1)), "vm-b", "third connection");
    // And it still does after all of them ended (routing.affinity_ttl).
    first.end();
    second.end();
    pool.wait_for_sessions_ended(2, OPEN);
    assert_eq!(
        landed(&pool.client(1)),
        "vm-b",
        "after the user's sessions ended"
    );
    other.end();
}

#[test]
fn six_users_spread_two_per_vm_over_three_vms() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let pool = GatewayPool::builder()
        .vm("vm-a")
        .vm("vm-b")
        .vm("vm-c")
        .users(6)
        .start();
    // Opened one after another and held open: each pick sees the earlier sessions as load.
    let sessions: Vec<SshSession> = (1..=6)
        .map(|i| SshSession::hold_within(&pool.client(i), OPEN))
        .collect();
    let landed: Vec<&str> = sessions.iter().map(|s| s.vm.as_str()).collect();
    for vm in ["vm-a", "vm-b", "vm-c"] {
        assert_eq!(
            landed.iter().filter(|v| **v == vm).count(),
            2,
            "sessions per VM: {landed:?}"
        );
    }
    // The gateway's routing log agrees with where the shells actually ran.
    let log = pool.log();
    for (i, session) in sessions.iter().enumerate() {
        let user = pool.user(i + 1);
        assert!(
            log.lines().any(|l| l.contains("session routed")
                && has_field(l, "user", &user)
                && has_field(l, "vm", &session.vm)),
            "no \"session routed\" line for {user} on {}:\n{log}",
            session.vm
        );
    }
    for s in sessions {
        s.end();
    }
}

#[test]
fn a_key_not_in_authorized_keys_is_refused() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let pool = GatewayPool::builder().vm("vm-a").users(2).start();
    let stranger = UserKey::generate("stranger");
    let refused = |client: SshClient, what: &str| {
        let out = client.run("echo $POOLGATE_VM");
        assert_eq!(out.status.code(), Some(255), "{what}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("Permission denied (publickey)"),
            "{what}: {}",
            stderr(&out)
        );
        assert_eq!(stdout(&out), "", "{what}");
    };
    refused(
        pool.client_as(&pool.user(1)).user_key(&stranger),
        "unknown key",
    );
    // User 1's key is listed for user 1 only.
    refused(
        pool.client_as(&pool.user(2)).user_key(pool.key(1)),
        "another user's key",
    );
    refused(
        pool.client_as("pgtest-nobody").user_key(pool.key(1)),
        "no such user",
    );

    let log = pool.log();
    assert!(!log.contains("session routed"), "{log}");
    assert!(
        !pool.vm("vm-a").log_text().contains("Accepted"),
        "the VM saw a login"
    );
    // The right key still works.
    assert_eq!(landed(&pool.client(1)), "vm-a");
}

/// Refused keys are visible to operators: a log line and `poolgate_auth_failures_total`.
#[test]
fn a_refused_key_counts_as_an_authentication_failure() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let pool = GatewayPool::builder().vm("vm-a").users(1).start();
    let stranger = UserKey::generate("stranger");
    for _ in 0..3 {
        let out = pool
            .client_as(&pool.user(1))
            .user_key(&stranger)
            .run("true");
        assert_eq!(out.status.code(), Some(255), "{}", stderr(&out));
    }
    // ssh has exited: the gateway has finished with each attempt.
    let metrics = pool.metrics();
    let failures: u64 = metrics
        .lines()
        .find(|l| l.starts_with("poolgate_auth_failures_total{method=\"publickey\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let logged = pool
        .log()
        .lines()
        .filter(|l| l.contains("authentication failed") && l.contains("method=publickey"))
        .count();
    assert!(
        failures >= 3 && logged >= 3,
        "3 refused keys: poolgate_auth_failures_total{{method=\"publickey\"}} = {failures}, \
         \"authentication failed\" lines = {logged}\n{}",
        pool.log()
    );
}

/// `SHA256:…` fingerprint of a public key file.
fn fingerprint(pub_path: &std::path::Path) -> String {
    let out = run_with_timeout(
        Command::new("ssh-keygen").arg("-lf").arg(pub_path),
        Duration::from_secs(10),
    );
    assert_ok(&out, "ssh-keygen -lf");
    stdout(&out)
        .split_whitespace()
        .nth(1)
        .expect("a fingerprint")
        .to_string()
}

#[test]
fn a_vm_with_an_unknown_host_key_is_refused_and_the_user_lands_elsewhere() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    // vm-a is not in the gateway's backend_known_hosts. Being idle and first by name, it is the
    // first choice of every pick below.
    let pool = GatewayPool::builder()
        .untrusted_vm("vm-a")
        .vm("vm-b")
        .users(3)
        .start();
    // Its SSH port answers, so the health probe marks it up: it really is eligible.
    pool.gateway.wait_for_vm_up("vm-a", OPEN);
    for i in 1..=3 {
        assert_eq!(landed(&pool.client(i)), "vm-b", "user {i}");
    }
    let fp = fingerprint(&pool.vm("vm-a").host_public_key_path());
    let log = pool.log();
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("VM host key not trusted"))
        .collect();
    assert!(!refusals.is_empty(), "no host-key refusal logged:\n{log}");
    assert!(
        refusals
            .iter()
            .all(|l| has_field(l, "vm", "vm-a") && l.contains(&fp)),
        "the refusal must name vm-a and its fingerprint {fp}: {refusals:#?}"
    );
    // The gateway never authenticated to the untrusted VM.
    assert!(
        !pool.vm("vm-a").log_text().contains("Accepted"),
        "{}",
        pool.vm("vm-a").log_text()
    );
}

/// Number of "VM is up" lines naming `vm`.
fn up_lines(pool: &GatewayPool, vm: &str) -> usize {
    pool.log()
        .lines()
        .filter(|l| l.contains("VM is up") && has_field(l, "vm", vm))
        .count()
}

#[test]
fn a_vm_that_is_down_gets_no_sessions_until_it_is_back() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let mut pool = GatewayPool::builder()
        .vm("vm-a")
        .vm("vm-b")
        .users(5)
        .fall(1)
        .start();
    pool.vm_mut("vm-a").stop();
    // Before or after the health probe notices, a new session must not end up on vm-a: if the
    // gateway still picks it, the failed connect sends the user to the next VM.
    assert_eq!(landed(&pool.client(1)), "vm-b");
    pool.gateway.wait_for_vm_down("vm-a", OPEN);
    let sessions: Vec<SshSession> = (1..=4)
        .map(|i| SshSession::hold_within(&pool.client(i), OPEN))
        .collect();
    assert!(
        sessions.iter().all(|s| s.vm == "vm-b"),
        "{:?}",
        sessions.iter().map(|s| &s.vm).collect::<Vec<_>>()
    );

    // Back up: the least-loaded VM again.
    let ups = up_lines(&pool, "vm-a");
    pool.vm_mut("vm-a").restart();
    wait_until(OPEN, "vm-a up again", || up_lines(&pool, "vm-a") > ups);
    assert_eq!(landed(&pool.client(5)), "vm-a");
    for s in sessions {
        s.end();
    }
}

#[test]
fn with_every_vm_down_the_client_is_told_no_vm_is_available() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let mut pool = GatewayPool::builder()
        .vm("vm-a")
        .vm("vm-b")
        .users(1)
        .fall(1)
        .start();
    pool.vm_mut("vm-a").stop();
    pool.vm_mut("vm-b").stop();
    let expect_refusal = |when: &str| {
        let out = pool.client(1).run("echo $POOLGATE_VM");
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(255), "{when}: {err}");
        assert_eq!(stdout(&out), "", "{when}");
        // The gateway's SSH disconnect message, as OpenSSH prints it.
        assert!(
            err.contains("no VM is available right now"),
            "{when}: ssh's stderr does not carry the gateway's message: {err:?}"
        );
        eprintln!("{when}: ssh printed {err:?}");
    };
    // At once (the gateway may still think the VMs are up: its connect attempts fail) …
    expect_refusal("right after the VMs went down");
    // … and once the health checks have marked both down.
    pool.gateway.wait_for_vm_down("vm-a", OPEN);
    pool.gateway.wait_for_vm_down("vm-b", OPEN);
    expect_refusal("after both were marked down");
    // The log's own thread writes the lines; ssh may have printed the refusal first.
    let refusals = || {
        pool.log()
            .lines()
            .filter(|l| l.contains("no VM is available right now"))
            .count()
    };
    assert!(
        poll(Duration::from_secs(10), || refusals() >= 2),
        "{}",
        pool.log()
    );
}

#[test]
fn the_no_vm_message_reads_cleanly_in_openssh() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let mut pool = GatewayPool::builder().vm("vm-a").users(1).fall(1).start();
    pool.vm_mut("vm-a").stop();
    pool.gateway.wait_for_vm_down("vm-a", OPEN);
    let out = pool.client(1).run("true");
    let err = stderr(&out);
    assert!(err.contains("no VM is available right now"), "{err:?}");
    // OpenSSH shows any byte outside printable ASCII as a backslash and three octal digits.
    let escaped = err
        .as_bytes()
        .windows(4)
        .any(|w| w[0] == b'\\' && w[1..].iter().all(u8::is_ascii_digit));
    assert!(!escaped, "the client shows escape codes: {err:?}");
}

#[test]
fn a_user_who_names_a_vm_in_the_login_lands_there_or_is_told_why_not() {
    // Work left on a VM (a tmux session, a job's GPU) is reached again by naming the VM:
    // `ssh alice+vm-b@gateway`. Eighteen users at once, each naming a VM: every one lands where
    // they asked, whatever the load or their affinity says.
    require_tools!("sshd", "ssh", "ssh-keygen", "scp");
    require_root!();
    let vms = ["vm-a", "vm-b", "vm-c"];
    let pool = GatewayPool::builder()
        .vm(vms[0])
        .vm(vms[1])
        .vm(vms[2])
        .users(18)
        .start();
    let named = |i: usize, vm: &str| {
        pool.client_as(&format!("{}+{vm}", pool.user(i)))
            .user_key(pool.key(i))
    };
    let landings: Vec<(usize, &str, std::process::Output)> = std::thread::scope(|s| {
        let handles: Vec<_> = (1..=18)
            .map(|i| {
                let vm = vms[i % 3];
                let client = named(i, vm);
                s.spawn(move || (i, vm, client.run("echo $POOLGATE_VM $(id -un)")))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, vm, out) in &landings {
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("{vm} {}", pool.user(*i)),
            "user {i} named {vm}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // With a name only, the same user goes where routing puts them; scp takes the form too.
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), b"named").unwrap();
    let out = run_with_timeout(
        &mut named(2, "vm-c").scp_to(file.path(), "/tmp/poolgate-named-vm-scp"),
        OPEN,
    );
    assert!(
        out.status.success(),
        "scp to a named VM: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        pool.log().lines().any(|l| l.contains("session routed")
            && has_field(l, "user", &pool.user(2))
            && has_field(l, "vm", "vm-c")
            && l.contains("named by the user")),
        "no routing line for the scp to vm-c:\n{}",
        pool.log()
    );

    // A VM that is not in the pool: refused at once, with the pool's VMs named.
    let out = named(1, "vm-z").run("true");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(255), "{stderr}");
    assert!(
        stderr.contains("no VM vm-z in the pool") && stderr.contains("vm-a, vm-b, vm-c"),
        "{stderr}"
    );
    // A VM drained by an operator takes no new session, even named; the user is told so, and
    // without the name they land elsewhere.
    let entry = pool.api_post("vm-b", "drain");
    assert_eq!(entry["draining"].as_bool(), Some(true), "{entry}");
    let out = named(1, "vm-b").run("true");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(255), "{stderr}");
    assert!(
        stderr.contains("vm-b takes no new sessions: draining"),
        "{stderr}"
    );
    assert_ne!(landed(&pool.client(1)), "vm-b");
}
