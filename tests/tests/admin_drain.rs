//! Draining end to end, once through the admin API (plain HTTP/1.1 over a `TcpStream`) and once
//! through the `poolgate drain/undrain/status` CLI: a drained VM keeps the session that was
//! running on it — which finishes normally — and gets no new one, even from the user tied to it
//! by affinity; undrained, it takes sessions again.

use std::time::{Duration, Instant};

use poolgate_tests::*;

/// How the test drains and undrains.
#[derive(Clone, Copy, Debug)]
enum Control {
    Api,
    Cli,
}

/// The row of `vm` in `poolgate status` output, split into columns.
fn status_row(table: &str, vm: &str) -> Vec<String> {
    table
        .lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .find(|cols| cols.first().map(String::as_str) == Some(vm))
        .unwrap_or_else(|| panic!("no row for {vm} in `poolgate status`:\n{table}"))
}

fn drain(pool: &GatewayPool, control: Control, vm: &str, on: bool) {
    let action = if on { "drain" } else { "undrain" };
    match control {
        Control::Api => {
            let entry = pool.api_post(vm, action);
            assert_eq!(entry["name"].as_str(), Some(vm), "{entry}");
            assert_eq!(entry["draining"].as_bool(), Some(on), "{entry}");
            let state = if on { "draining" } else { "healthy" };
            assert_eq!(entry["state"].as_str(), Some(state), "{entry}");
        }
        Control::Cli => {
            let out = pool.cli(&[action, vm]);
            assert_ok(&out, &format!("poolgate {action} {vm}"));
            let said = stdout(&out);
            assert!(said.starts_with(&format!("{vm}: ")), "{said}");
            if on {
                assert!(said.contains("draining"), "{said}");
            } else {
                assert!(said.contains("healthy"), "{said}");
            }
            let out = pool.cli(&["status"]);
            assert_ok(&out, "poolgate status");
            let table = stdout(&out);
            let row = status_row(&table, vm);
            let state = if on { "draining" } else { "healthy" };
            assert_eq!(row.get(1).map(String::as_str), Some(state), "{table}");
            eprintln!("poolgate status after {action} {vm}:\n{table}");
        }
    }
}

fn drained_vm_keeps_its_session_and_gets_no_new_ones(control: Control) {
    let started = Instant::now();
    let pool = GatewayPool::builder()
        .vm("vm-a")
        .vm("vm-b")
        .users(5)
        .start();

    // A session running before the drain: it must run to its end, undisturbed.
    let long = SshSession::open(&pool.client(1), "sleep 20; echo finished");
    let drained = long.vm.clone();
    let other = if drained == "vm-a" { "vm-b" } else { "vm-a" };
    drain(&pool, control, &drained, true);
    assert_eq!(pool.vm_state(&drained), "draining");
    let entry = pool.vm_json(&drained);
    assert_eq!(entry["sessions"]["ssh"].as_u64(), Some(1), "{entry}");

    // New sessions all land on the other VM: from new users, and from user 1, whom affinity
    // ties to the drained VM while the long session lives. Held open so `other` gets busier.
    let mut held = Vec::new();
    for i in [2, 1, 3, 1, 2] {
        let s = SshSession::hold(&pool.client(i));
        assert_eq!(
            s.vm, other,
            "new session of user {i} landed on drained VM {drained}"
        );
        held.push(s);
    }
    let entry = pool.vm_json(&drained);
    assert_eq!(entry["state"].as_str(), Some("draining"), "{entry}");
    assert_eq!(entry["sessions"]["ssh"].as_u64(), Some(1), "{entry}");

    // The drained VM still serves its session: it finishes normally.
    let (status, rest) = long.finish(Duration::from_secs(40));
    assert!(
        status.success(),
        "the session on the drained VM ended with {status}"
    );
    assert_eq!(rest.trim(), "finished");
    let gone = poll(Duration::from_secs(10), || {
        pool.vm_json(&drained)["sessions"]["ssh"].as_u64() == Some(0)
    });
    assert!(gone, "{}", pool.vm_json(&drained));
    assert_eq!(
        pool.vm_state(&drained),
        "draining",
        "draining outlives the last session"
    );
    assert_eq!(
        landed(&pool.client(4)),
        other,
        "still drained after it emptied"
    );

    // Undrained: it takes sessions again — it is the least-loaded VM now. (User 5 is new:
    // affinity ties users 1 to 4 to the other VM.)
    drain(&pool, control, &drained, false);
    assert_eq!(landed(&pool.client(5)), drained);
    for s in held {
        s.end();
    }
    eprintln!("drain via {control:?}: {:?}", started.elapsed());
}

#[test]
fn admin_api_drain_keeps_open_sessions_and_routes_new_ones_elsewhere() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    drained_vm_keeps_its_session_and_gets_no_new_ones(Control::Api);
}

#[test]
fn admin_cli_drain_keeps_open_sessions_and_routes_new_ones_elsewhere() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    drained_vm_keeps_its_session_and_gets_no_new_ones(Control::Cli);
}
