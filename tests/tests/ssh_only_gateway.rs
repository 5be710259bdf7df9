//! An SSH-only gateway (issue 14, item 1): `listen.http = "off"` and no `[health]` section,
//! the smallest config a team without JupyterHub writes. Real OpenSSH `sshd` VMs, the real
//! gateway, observed through `check-config`, its log, logins, the admin API, `/metrics`
//! (checked by promtool) and the sockets it listens on.
//!
//! - `check-config` accepts the file and warns that the web probe (on by default) never runs;
//!   `run` logs the same warning.
//! - The web side is never probed: the API shows it `unknown` and not probed, the VMs healthy
//!   by their SSH side alone; `poolgate_vm_up` is 1 and `poolgate_vm_protocol_up` says which
//!   side takes new sessions.
//! - Logins spread over every VM; no cookie secret is created; the gateway listens on its SSH
//!   and admin ports only.

// Test code: a failed step should abort the test at once (as in tests/src/lib.rs).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use poolgate_tests::*;

#[test]
fn an_ssh_only_gateway_with_http_off_and_default_health_serves_ssh_and_never_probes_the_web_side() {
    require_tools!("sshd", "ssh", "ssh-keygen", "promtool");
    require_root!();
    let started = Instant::now();
    let vms = ["vm-a", "vm-b", "vm-c"];
    let mut builder = GatewayPool::builder()
        .users(3)
        .without_health_section()
        .listen_http_off();
    for vm in vms {
        builder = builder.vm(vm);
    }
    let pool = builder.start();
    let config_path = pool.gateway.config_path().to_path_buf();
    let config = std::fs::read_to_string(&config_path).unwrap();
    assert!(
        config.contains("http = \"off\"")
            && !config.contains("[health")
            && !config.contains("[http"),
        "listen.http off, every health and http setting at its default:\n{config}"
    );
    eprintln!("pool healthy after {:?}", started.elapsed());

    // check-config: accepted, with one warning naming the key.
    let out = run_with_timeout(
        Command::new(poolgate_bin())
            .arg("check-config")
            .arg(&config_path)
            .env("NO_COLOR", "1"),
        Duration::from_secs(30),
    );
    assert_ok(&out, "poolgate check-config");
    let text = stdout(&out);
    let warnings: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("warning: "))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning:\n{text}");
    assert!(
        warnings[0].starts_with("warning: health.http: ")
            && warnings[0].contains("listen.http = \"off\"")
            && warnings[0].contains("health.http = false"),
        "the warning names the key, the cause and the fix: {}",
        warnings[0]
    );
    // `run` logs the same warning at start.
    let log = pool.log();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("health.http: the web side's probe is on")),
        "run logs the warning:\n{log}"
    );

    // The SSH side is probed and up; the web side is not probed and stays unknown.
    for vm in vms {
        let entry = pool.vm_json(vm);
        assert_eq!(entry["state"].as_str(), Some("healthy"), "{entry}");
        assert_eq!(entry["health"].as_str(), Some("up"), "{entry}");
        let ssh = &entry["protocols"]["ssh"];
        assert_eq!(ssh["health"].as_str(), Some("up"), "{entry}");
        assert_eq!(ssh["probed"].as_bool(), Some(true), "{entry}");
        assert_eq!(ssh["accepts_new"].as_bool(), Some(true), "{entry}");
        assert!(
            !ssh["history"].items().is_empty(),
            "SSH probes ran: {entry}"
        );
        let web = &entry["protocols"]["http"];
        assert_eq!(web["health"].as_str(), Some("unknown"), "{entry}");
        assert_eq!(web["probed"].as_bool(), Some(false), "{entry}");
        assert_eq!(web["served"].as_bool(), Some(false), "{entry}");
        assert_eq!(ssh["served"].as_bool(), Some(true), "{entry}");
        assert_eq!(web["accepts_new"].as_bool(), Some(false), "{entry}");
        assert!(
            web["history"].items().is_empty(),
            "no web probe ran: {entry}"
        );
    }

    // Three users log in at once: one session on each VM.
    let held: Vec<SshSession> = std::thread::scope(|s| {
        let handles: Vec<_> = (1..=3)
            .map(|i| {
                let client = pool.client(i);
                s.spawn(move || SshSession::hold(&client))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let landed_on: BTreeSet<&str> = held.iter().map(|s| s.vm.as_str()).collect();
    assert_eq!(
        landed_on,
        vms.into_iter().collect(),
        "sessions spread over every VM: {:?}",
        held.iter().map(|s| &s.vm).collect::<Vec<_>>()
    );

    let metrics = pool.metrics();
    for vm in vms {
        assert_eq!(vm_up(&metrics, vm), Some(1.0), "{metrics}");
        assert_eq!(vm_protocol_up(&metrics, vm, "ssh"), Some(1.0), "{metrics}");
        assert_eq!(vm_protocol_up(&metrics, vm, "http"), Some(0.0), "{metrics}");
        assert_eq!(ssh_active(&metrics, vm), Some(1.0), "{metrics}");
    }
    promtool_check(&metrics, "ssh_only_gateway.prom");

    // Nothing of the web side exists: no cookie secret, no HTTP listener.
    let secret = pool.dir().join("keys/cookie_secret");
    assert!(
        !secret.exists(),
        "an SSH-only gateway creates no {}",
        secret.display()
    );
    let pid = pool.gateway.pid().expect("the gateway runs");
    let ports = listening_ports(pid);
    assert_eq!(
        ports,
        BTreeSet::from([pool.ssh_port, pool.admin.port()]),
        "the gateway listens on its SSH and admin ports only (HTTP port {} is off)",
        pool.http.port()
    );

    for s in held {
        s.end();
    }
    eprintln!("ssh-only gateway test: {:?}", started.elapsed());
}
