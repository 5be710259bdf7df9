//! Sessions through the gateway behave like direct ones: exec shows where it ran, exit codes and
//! signals come back exactly, stdout/stderr/stdin are kept apart, a pty is real and its size
//! (initial and changed mid-session) reaches the VM.

// Test code: a failed step should abort the test at once (as in tests/src/lib.rs).
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use poolgate_tests::*;

/// `(exit code, stdout, stderr)` of `remote`.
fn outcome(client: &SshClient, remote: &str) -> (Option<i32>, String, String) {
    let out = client.run(remote);
    (out.status.code(), stdout(&out), stderr(&out))
}

#[test]
fn exec_shows_the_vm_and_exit_codes_match_a_direct_connection() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let started = Instant::now();
    let pool = GatewayPool::builder().vm("vm-a").users(1).start();
    let via_gateway = pool.client(1);
    let (direct, _key, _known) = pool.direct_client(1, "vm-a");

    let out = via_gateway.run("echo $POOLGATE_VM; whoami");
    assert_ok(&out, "ssh echo through the gateway");
    assert_eq!(stdout(&out), format!("vm-a\n{}", pool.user(1)));
    // The VM's name is the gateway's to say (the VM's sshd accepts it, `AcceptEnv POOLGATE_VM`,
    // as deploy/cloud-init sets it): a client's own value for it is not passed on.
    let out = via_gateway
        .clone()
        .option("SetEnv=POOLGATE_VM=elsewhere PGTEST_SENT=kept")
        .run("echo $POOLGATE_VM $PGTEST_SENT");
    assert_ok(&out, "ssh -o SetEnv=POOLGATE_VM=elsewhere");
    assert_eq!(stdout(&out), "vm-a kept");
    // Connected straight to the VM (no gateway), nobody names it.
    assert_eq!(stdout(&direct.run("echo \"[$POOLGATE_VM]\"")), "[]");

    // Same command, direct and through the gateway: same exit code, same output streams.
    let cases = [
        ("true", Some(0)),
        ("echo out; echo err >&2; exit 3", Some(3)),
        // Killed by a signal: sshd sends exit-signal, and ssh exits 255.
        ("kill -KILL $$", Some(255)),
        ("kill -TERM $$", Some(255)),
    ];
    for (remote, expected) in cases {
        let direct_outcome = outcome(&direct, remote);
        let gateway_outcome = outcome(&via_gateway, remote);
        assert_eq!(
            direct_outcome.0, expected,
            "direct {remote:?}: {direct_outcome:?}"
        );
        assert_eq!(
            gateway_outcome, direct_outcome,
            "{remote:?}: through the gateway (left) vs direct (right)"
        );
    }

    // stdin reaches the command and EOF ends it.
    let out = via_gateway.run_with_input("wc -c; exit 0", &[b'x'; 100_000]);
    assert_ok(&out, "wc -c");
    assert_eq!(stdout(&out), "100000");

    // The audit line of each session names the user, the VM and how it ended.
    pool.wait_for_sessions_ended(6, Duration::from_secs(10));
    let log = pool.log();
    let ended: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ssh session ended"))
        .collect();
    assert!(
        ended
            .iter()
            .any(|l| has_field(l, "exit", "3") && has_field(l, "vm", "vm-a")),
        "{ended:#?}"
    );
    assert!(
        ended
            .iter()
            .any(|l| l.contains("exit=signal") && l.contains("KILL")),
        "{ended:#?}"
    );
    assert!(
        ended.iter().all(|l| has_field(l, "user", &pool.user(1))),
        "{ended:#?}"
    );
    eprintln!("exec and exit codes: {:?}", started.elapsed());
}

#[test]
fn environment_sent_by_the_client_reaches_the_vm() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let pool = GatewayPool::builder().vm("vm-a").users(1).start();
    // The VMs accept PGTEST_* (AcceptEnv).
    let mut cmd = pool
        .client(1)
        .option("SendEnv=PGTEST_COLOUR")
        .command("echo \"$PGTEST_COLOUR\"");
    cmd.env("PGTEST_COLOUR", "teal");
    let out = run_with_timeout(&mut cmd, Duration::from_secs(30));
    assert_ok(&out, "ssh with SendEnv");
    assert_eq!(stdout(&out), "teal");
}

/// Runs `inner` (a shell line) in a fresh pseudo-terminal with util-linux `script`, returning
/// everything written to the terminal.
fn in_a_pty(inner: &str, timeout: Duration) -> std::process::Output {
    let mut cmd = Command::new("script");
    cmd.args(["-qfec", inner, "/dev/null"])
        .env("SHELL", "/bin/bash")
        .env_remove("SSH_AUTH_SOCK");
    run_with_timeout(&mut cmd, timeout)
}

#[test]
fn tty_session_has_a_real_pty_and_its_size() {
    require_tools!("sshd", "ssh", "ssh-keygen", "script", "stty");
    require_root!();
    let pool = GatewayPool::builder().vm("vm-a").users(1).start();
    let ssh = pool.client(1).ssh_command(
        &["-tt"],
        Some("tty; stty size; echo \"vm=$POOLGATE_VM\"; exit 5"),
    );
    let out = in_a_pty(
        &format!("stty cols 100 rows 40; {}", shell_line(&ssh)),
        Duration::from_secs(30),
    );
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    // `script -e` returns the exit code of the child: ssh's, which is the remote one.
    assert_eq!(out.status.code(), Some(5), "{text}\n{}", stderr(&out));
    // `script` shows a NUL typed into the new terminal as "^@" (direct connections too).
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.trim().trim_start_matches("^@"))
        .collect();
    assert!(
        lines.iter().any(|l| l.starts_with("/dev/pts/")),
        "no /dev/pts/N from `tty`: {lines:?}"
    );
    assert!(lines.contains(&"40 100"), "stty size: {lines:?}");
    assert!(lines.contains(&"vm=vm-a"), "{lines:?}");
}

#[test]
fn a_window_size_change_mid_session_reaches_the_vm() {
    require_tools!("sshd", "ssh", "ssh-keygen", "script", "stty");
    require_root!();
    let pool = GatewayPool::builder().vm("vm-a").users(1).start();
    // The remote side prints its size, then waits for SIGWINCH and prints the new size. The local
    // side resizes its terminal (the kernel sends SIGWINCH to ssh, which sends window-change)
    // only after it has read the first size: the "ready" signal.
    let remote = "trap 'stty size; exit 0' WINCH; stty size; \
                  while :; do sleep 0.05; done";
    let ssh = pool.client(1).ssh_command(&["-tt"], Some(remote));
    let inner = format!(
        "stty cols 100 rows 40; {} | {{ read -r first; echo \"first=$first\"; \
         stty cols 132 rows 50 </dev/tty; read -r second; echo \"second=$second\"; }}",
        shell_line(&ssh)
    );
    let out = in_a_pty(&inner, Duration::from_secs(30));
    let text = String::from_utf8_lossy(&out.stdout)
        .replace('\r', "")
        .replace("^@", "");
    assert!(text.contains("first=40 100"), "{text}\n{}", stderr(&out));
    assert!(
        text.contains("second=50 132"),
        "the resize did not reach the VM:\n{text}\n{}",
        stderr(&out)
    );
}

#[test]
fn interactive_shell_without_a_command() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let pool = GatewayPool::builder().vm("vm-a").users(1).start();
    // -tt forces a pty although stdin is a pipe: the login shell reads the lines as typed.
    let out = run_with_input(
        &mut pool.client(1).ssh_command(&["-tt"], None),
        b"echo \"shell on $POOLGATE_VM\"; tty\nexit 7\n",
        Duration::from_secs(30),
    );
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    assert_eq!(out.status.code(), Some(7), "{text}\n{}", stderr(&out));
    assert!(text.contains("shell on vm-a"), "{text}");
    assert!(text.contains("/dev/pts/"), "{text}");
}

/// OpenSSH's ControlMaster closes a session channel as soon as both directions have seen EOF,
/// without waiting for the exit status (a plain `ssh` waits for the server's close instead); a
/// server must still send `exit-status` before its own CHANNEL_CLOSE (RFC 4254 §5.3 and §6.10).
#[test]
fn exit_status_reaches_a_multiplexing_client_that_closes_after_eof() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let pool = GatewayPool::builder().vm("vm-a").users(1).start();
    let (direct, _key, _known) = pool.direct_client(1, "vm-a");
    let direct = Multiplexed::start(&direct);
    let via_gateway = Multiplexed::start(&pool.client(1));
    // The command's output ends (EOF to the client) a while before its exit status exists.
    for remote in [
        "exec >&- 2>&-; sleep 1; exit 7",
        "echo partial; exec >&- 2>&-; sleep 0.5; exit 0",
    ] {
        let direct_outcome = outcome(&direct.client(), remote);
        let gateway_outcome = outcome(&via_gateway.client(), remote);
        assert_ne!(
            direct_outcome.0,
            Some(255),
            "direct {remote:?}: {direct_outcome:?}"
        );
        assert_eq!(
            gateway_outcome, direct_outcome,
            "{remote:?}: through the gateway (left) vs direct (right), both multiplexed"
        );
    }
}

#[test]
fn a_key_with_no_pty_or_restrict_gets_no_terminal_as_on_the_vm_itself() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let pool = GatewayPool::builder().vm("vm-a").users(1).start();
    let (user, key) = (pool.user(1), pool.key(1));
    let keys_file = pool.dir().join("authorized_keys").join(&user);
    let tty = |what: &str| {
        let out = run_with_timeout(
            &mut pool.client(1).ssh_command(&["-tt"], Some("tty; echo ran")),
            Duration::from_secs(30),
        );
        let text = stdout(&out);
        eprintln!(
            "{what}: exit {:?}, {text:?}, {:?}",
            out.status.code(),
            stderr(&out)
        );
        (out, text)
    };
    // Without options: a terminal.
    let (_, text) = tty("no option");
    assert!(text.contains("/dev/pts/"), "{text}");
    // `no-pty` and `restrict`: the VM's sshd refuses the terminal, in OpenSSH's own words, and
    // `ssh -tt` (a terminal forced) gives up as it does against that sshd directly.
    for option in ["no-pty", "restrict", "no-port-forwarding,no-pty"] {
        std::fs::write(&keys_file, format!("{option} {}\n", key.public_key_line()))
            .expect("write authorized_keys");
        let (out, text) = tty(option);
        assert!(!text.contains("/dev/pts/"), "{option}: a terminal: {text}");
        assert!(
            stderr(&out).contains("PTY allocation request failed"),
            "{option}: {}",
            stderr(&out)
        );
        // Without a terminal asked for, the command runs.
        let out = pool.client(1).run("tty; echo ran");
        assert_eq!(stdout(&out), "not a tty\nran", "{option}: {}", stderr(&out));
    }
    // `restrict,pty` gives the terminal back.
    std::fs::write(
        &keys_file,
        format!("restrict,pty {}\n", key.public_key_line()),
    )
    .expect("write authorized_keys");
    let (_, text) = tty("restrict,pty");
    assert!(text.contains("/dev/pts/"), "{text}");

    // A forced command the gateway cannot enforce refuses the key, and the log says which
    // option of the user's line did it (at the default level), so the line can be fixed.
    std::fs::write(
        &keys_file,
        format!("command=\"echo hi\" {}\n", key.public_key_line()),
    )
    .expect("write authorized_keys");
    let out = pool.client(1).run("true");
    assert_eq!(out.status.code(), Some(255), "{}", stderr(&out));
    let line = pool
        .gateway
        .log_line("an option the gateway cannot", Duration::from_secs(5));
    assert!(
        line.contains("WARN") && has_field(&line, "option", "command") && line.contains(&user),
        "{line}"
    );
}
