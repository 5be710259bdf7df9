//! `ssh.password_auth = "passthrough"`: the gateway relays a password to the VM's sshd, which
//! decides; the right password logs in, a wrong one is refused, and the password is never
//! written to the gateway's log (even at debug level). Ten wrong passwords from one address
//! within a minute are ten failures, not enough for the penalty box.

// Test code: a failed step should abort the test at once (as in tests/src/lib.rs).
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use poolgate_tests::*;

/// The account used here: nobody else's tests give it a key or a password.
const USER_INDEX: usize = 9;
const PASSWORD: &str = "Pg-e2e-pass-7f3a9c";
const WRONG: &str = "Pg-e2e-wrong-41d2b8";

/// Sets `user`'s password with `chpasswd` (idempotent; every run sets the same one).
fn set_password(user: &str, password: &str) {
    let out = run_with_input(
        &mut Command::new("chpasswd"),
        format!("{user}:{password}\n").as_bytes(),
        Duration::from_secs(30),
    );
    assert_ok(&out, "chpasswd");
}

/// An `SSH_ASKPASS` program that prints `password`.
fn askpass(dir: &std::path::Path, name: &str, password: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\necho '{password}'\n")).expect("write askpass");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod askpass");
    path
}

/// `ssh` as `user` through the gateway, password only, the password coming from `askpass`.
fn password_login(
    pool: &GatewayPool,
    user: &str,
    askpass: &std::path::Path,
) -> std::process::Output {
    let mut cmd = pool
        .client_as(user)
        .option("BatchMode=no")
        .option("PreferredAuthentications=password")
        .option("PubkeyAuthentication=no")
        .option("NumberOfPasswordPrompts=1")
        .command("echo \"$POOLGATE_VM $(whoami)\"");
    cmd.env("SSH_ASKPASS", askpass)
        .env("SSH_ASKPASS_REQUIRE", "force")
        .env("DISPLAY", ":0");
    run_with_timeout(&mut cmd, Duration::from_secs(30))
}

/// `out` is ssh's exit after the gateway refused its login.
fn assert_refused(out: &std::process::Output) {
    assert_eq!(out.status.code(), Some(255), "{}", stderr(out));
    assert!(stderr(out).contains("Permission denied"), "{}", stderr(out));
}

/// The test account, its password set, and a gateway over one VM (`vm-a`) whose sshd takes
/// passwords, with the gateway set up by `gateway`. Keep the `TestUsers` for the test's length.
fn password_pool(
    gateway: impl FnOnce(GatewayPoolBuilder) -> GatewayPoolBuilder,
) -> (TestUsers, String, GatewayPool) {
    let users = TestUsers::ensure(USER_INDEX);
    let user = users.user(USER_INDEX).name.clone();
    set_password(&user, PASSWORD);
    let pool = gateway(
        GatewayPool::builder()
            .vm("vm-a")
            .users(1)
            .vm_config(|b| b.password_authentication(true)),
    )
    .start();
    (users, user, pool)
}

#[test]
fn password_passthrough_logs_in_refuses_a_wrong_password_and_never_logs_it() {
    require_tools!("sshd", "ssh", "ssh-keygen", "chpasswd");
    require_root!();
    let (_users, user, pool) = password_pool(|b| {
        b.ssh_option("password_auth = \"passthrough\"")
            .gateway_env("POOLGATE_LOG", "debug")
    });
    let dir = tempfile::tempdir().unwrap();
    let right = askpass(dir.path(), "right", PASSWORD);
    let wrong = askpass(dir.path(), "wrong", WRONG);

    let out = password_login(&pool, &user, &right);
    assert_ok(&out, "password login with the right password");
    assert_eq!(stdout(&out), format!("vm-a {user}"));
    pool.vm("vm-a").wait_for_log(
        &format!("Accepted password for {user}"),
        Duration::from_secs(5),
    );

    let out = password_login(&pool, &user, &wrong);
    assert_refused(&out);
    assert_eq!(stdout(&out), "");
    pool.vm("vm-a").wait_for_log(
        &format!("Failed password for {user}"),
        Duration::from_secs(5),
    );

    // A password for a user name the gateway refuses without asking a VM is refused as late
    // as one a VM refused: 1 s after it came, so guessing is slow and the time tells nothing.
    let started = std::time::Instant::now();
    let out = password_login(&pool, "no+such+user", &wrong);
    let refused_after = started.elapsed();
    assert_refused(&out);
    assert!(
        refused_after >= Duration::from_secs(1),
        "refused after {refused_after:?}"
    );

    // The right one still works after a failure (no lock-out of the VM, no stale state).
    assert_ok(&password_login(&pool, &user, &right), "second login");

    pool.wait_for_sessions_ended(2, Duration::from_secs(10));
    let log = pool.gateway.log_text();
    for secret in [PASSWORD, WRONG] {
        assert!(
            !log.contains(secret),
            "a password appears in the gateway log:\n{log}"
        );
    }
    assert!(
        log.lines().any(|l| l.contains("DEBUG")),
        "the gateway did not log at debug level; the check above proves less than it claims"
    );
}

#[test]
fn ten_mistyped_passwords_in_a_minute_leave_the_address_free_to_log_in() {
    require_tools!("sshd", "ssh", "ssh-keygen", "chpasswd");
    require_root!();
    let (_users, user, pool) = password_pool(|b| b.ssh_option("password_auth = \"passthrough\""));
    let dir = tempfile::tempdir().unwrap();
    let right = askpass(dir.path(), "right", PASSWORD);
    let wrong = askpass(dir.path(), "wrong", WRONG);

    // Ten people behind one office address each mistype their password once, at once: ten
    // failures, the most the penalty box lets pass within a minute. (When a connection that
    // ended after a refused password counted once more, these were twenty, and the office was
    // locked out for 30 s.)
    let attempts: Vec<_> = (0..10)
        .map(|_| {
            let (pool, user, wrong) = (&pool, &user, &wrong);
            move || password_login(pool, user, wrong)
        })
        .collect();
    std::thread::scope(|s| {
        let running: Vec<_> = attempts.into_iter().map(|a| s.spawn(a)).collect();
        for attempt in running {
            let out = attempt.join().unwrap();
            assert_refused(&out);
        }
    });
    assert_eq!(
        pool.vm("vm-a")
            .log_text()
            .matches(&format!("Failed password for {user}"))
            .count(),
        10
    );

    // The right password still logs in from that address.
    let out = password_login(&pool, &user, &right);
    assert_ok(&out, "the right password after ten wrong ones");
    assert_eq!(stdout(&out), format!("vm-a {user}"));
    assert!(
        !pool
            .gateway
            .log_text()
            .contains("too many failed logins from this address"),
        "{}",
        pool.gateway.log_text()
    );
}

#[test]
fn password_auth_off_refuses_passwords_without_asking_the_vm() {
    require_tools!("sshd", "ssh", "ssh-keygen", "chpasswd");
    require_root!();
    // The VM would accept the password, but the gateway's default is password_auth = "off".
    let (_users, user, pool) = password_pool(|b| b);
    let dir = tempfile::tempdir().unwrap();
    let right = askpass(dir.path(), "right", PASSWORD);
    let out = password_login(&pool, &user, &right);
    assert_refused(&out);
    assert!(
        !pool
            .vm("vm-a")
            .log_text()
            .contains(&format!("password for {user}")),
        "the VM was asked: {}",
        pool.vm("vm-a").log_text()
    );
}
