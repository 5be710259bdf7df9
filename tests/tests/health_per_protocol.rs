//! Health per protocol, end to end (issue 14, item 1): real OpenSSH `sshd` VMs, real
//! `jupyter_server` web sides, the real gateway, observed through logins, browsers, the admin
//! API and `/metrics`.
//!
//! - An SSH-only pool (VMs without a web side) started with *no* `[health]` section at all —
//!   the documented defaults, where the web probe is on — takes SSH logins on every VM; the API
//!   and metrics show each VM's SSH side up, its web side down and the VM healthy.
//! - A VM is its sshd and its jupyter_server on one host address: SSH sessions go only to VMs
//!   whose sshd is up, browsers only to VMs whose jupyter_server is up; a VM with one side down
//!   stays healthy. When sides stop and start, routing follows (waits are on the admin API).

// Test code: a failed step should abort the test at once (as in tests/src/lib.rs).
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use poolgate_tests::jupyter::{Browser, JupyterServerVm, cookie_vm, require_jupyter};
use poolgate_tests::*;
use serde_json::Value;

const COOKIE: &str = "poolgate_vm";

/// `side`'s health (`"ssh"` or `"http"`) in a `/api/v1/vms` entry.
fn side_health(vm: &Value, side: &str) -> String {
    vm["protocols"][side]["health"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Asserts a VM entry's state and each side's health and whether it takes new sessions.
#[track_caller]
fn assert_sides(vm: &Value, state: &str, ssh: &str, http: &str) {
    let name = vm["name"].as_str().unwrap_or_default();
    assert_eq!(vm["state"].as_str(), Some(state), "{name} state: {vm}");
    for (side, health) in [("ssh", ssh), ("http", http)] {
        let p = &vm["protocols"][side];
        assert_eq!(p["health"].as_str(), Some(health), "{name} {side}: {vm}");
        assert_eq!(p["probed"].as_bool(), Some(true), "{name} {side}: {vm}");
        assert_eq!(
            p["accepts_new"].as_bool(),
            Some(health == "up"),
            "{name} {side} accepts new sessions only while up: {vm}"
        );
    }
}

/// `poolgate_vm_protocol_up{protocol,vm}`.
fn protocol_up(metrics: &str, vm: &str, protocol: &str) -> Option<f64> {
    sample(
        metrics,
        &format!("poolgate_vm_protocol_up{{protocol=\"{protocol}\",vm=\"{vm}\"}}"),
    )
}

/// `poolgate_sessions_total{outcome="vm_failed",protocol,vm}`: attempts that hit a VM that
/// could not take them (0 when absent).
fn vm_failed(metrics: &str, vm: &str, protocol: &str) -> f64 {
    sample(
        metrics,
        &format!(
            "poolgate_sessions_total{{outcome=\"vm_failed\",protocol=\"{protocol}\",vm=\"{vm}\"}}"
        ),
    )
    .unwrap_or(0.0)
}

#[test]
fn an_ssh_only_pool_with_no_health_section_takes_logins_on_every_vm_and_shows_the_web_side_down() {
    require_tools!("sshd", "ssh", "ssh-keygen", "promtool");
    require_root!();
    let started = Instant::now();
    let vms = ["vm-a", "vm-b", "vm-c"];
    // The VMs have no web side. Each VM's `http_port` is a free port nothing listens on: the
    // default 8000 would be 127.0.0.1:8000 here, which anything on this machine might answer.
    let mut builder = GatewayPool::builder().users(3).without_health_section();
    let mut web_ports = BTreeMap::new();
    for vm in vms {
        let port = free_port();
        web_ports.insert(vm, port);
        builder = builder.vm_with_http_port(vm, port);
    }
    let pool = builder.start();
    let config = std::fs::read_to_string(pool.gateway.config_path()).unwrap();
    assert!(
        !config.contains("[health") && !config.contains("health."),
        "the config must leave every health setting at its default:\n{config}"
    );
    for (vm, port) in &web_ports {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, *port));
        assert!(
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err(),
            "something listens on {vm}'s web port {port}"
        );
    }
    eprintln!("pool healthy (SSH side up) after {:?}", started.elapsed());

    // The web probe (default: on, GET /hub/health every 5 s) marks every web side down (a side
    // not probed yet takes its first result); the VMs stay healthy and keep taking SSH sessions.
    for vm in vms {
        let entry = pool.wait_for_vm(vm, "with its web side down", Duration::from_secs(40), |v| {
            side_health(v, "http") == "down"
        });
        assert_sides(&entry, "healthy", "up", "down");
        assert_eq!(entry["health"].as_str(), Some("up"), "{entry}");
        let web_probes = entry["protocols"]["http"]["history"].items();
        assert!(
            !web_probes.is_empty() && web_probes.iter().all(|p| p["ok"].as_bool() == Some(false)),
            "every web probe failed: {entry}"
        );
    }
    eprintln!("every web side down after {:?}", started.elapsed());

    // Three users log in through the gateway: each session lands on a different VM.
    let held: Vec<SshSession> = (1..=3).map(|i| SshSession::hold(&pool.client(i))).collect();
    let landed_on: BTreeSet<&str> = held.iter().map(|s| s.vm.as_str()).collect();
    assert_eq!(
        landed_on,
        vms.into_iter().collect(),
        "sessions spread over every VM: {:?}",
        held.iter().map(|s| &s.vm).collect::<Vec<_>>()
    );
    // And a plain command through the gateway works too (user 1 goes back to their VM).
    assert_eq!(landed(&pool.client(1)), held[0].vm);

    // The held session each. The command's own session may still be counted for a moment after
    // ssh exits: the client leaves on the channel's close, the gateway ends the session after.
    for vm in vms {
        let entry = pool.wait_for_vm(
            vm,
            "holding one SSH session",
            Duration::from_secs(10),
            |v| v["sessions"]["ssh"].as_u64() == Some(1),
        );
        assert_sides(&entry, "healthy", "up", "down");
    }
    let metrics = pool.metrics();
    for vm in vms {
        let up = sample(&metrics, &format!("poolgate_vm_up{{vm=\"{vm}\"}}"));
        assert_eq!(up, Some(1.0), "poolgate_vm_up of {vm}:\n{metrics}");
        assert_eq!(protocol_up(&metrics, vm, "ssh"), Some(1.0), "{metrics}");
        assert_eq!(protocol_up(&metrics, vm, "http"), Some(0.0), "{metrics}");
        assert_eq!(ssh_active(&metrics, vm), Some(1.0), "{metrics}");
        assert_eq!(vm_failed(&metrics, vm, "ssh"), 0.0, "{metrics}");
    }
    promtool_check(&metrics, "health_per_protocol_ssh_only.prom");

    // A browser finds no VM, and the page says which side is at fault.
    let r = http_get(pool.http, "/hub/");
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(
        r.body.contains("unhealthy (web probe fails)"),
        "the no-VM page names the web side: {}",
        r.body
    );

    for s in held {
        s.end();
    }
    eprintln!("ssh-only pool test: {:?}", started.elapsed());
}

/// A fresh browser makes its first request and comes back with the cookie (so it is a session
/// on its VM); returns it with the VM its cookie names.
async fn new_browser_session(http: SocketAddr) -> (Browser, String) {
    let b = Browser::http(http);
    let r = b.get("/api").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let pin = b.cookie(COOKIE, "/").expect("a poolgate_vm cookie");
    let r = b.get("/api/status").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(b.cookie(COOKIE, "/"), Some(pin.clone()), "stays pinned");
    (b, cookie_vm(&pin))
}

#[test]
fn ssh_goes_where_sshd_is_up_and_browsers_where_jupyter_is_up_and_routing_follows_each_side() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    if !require_jupyter() {
        return;
    }
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime for the browsers");
    // Each VM: an sshd and a jupyter_server on 127.0.0.1, each on its own port.
    let names = ["vm-a", "vm-b", "vm-c"];
    let mut web: BTreeMap<&str, JupyterServerVm> = names
        .into_iter()
        .zip(JupyterServerVm::start_all(&names))
        .collect();
    let mut builder = GatewayPool::builder().users(4).web_probe("/api").fall(2);
    for (name, js) in &web {
        builder = builder.vm_with_http_port(name, js.port());
    }
    let mut pool = builder.start();
    for vm in ["vm-a", "vm-b", "vm-c"] {
        assert_sides(&pool.vm_json(vm), "healthy", "up", "up");
    }
    eprintln!("three VMs with both sides up in {:?}", started.elapsed());
    // One down side is marked within fall × interval + timeout; allow for a loaded machine.
    let side_bound = Duration::from_secs(15);

    // vm-b's jupyter_server stops (sshd still up); vm-c's sshd stops (jupyter still up).
    web.get_mut("vm-b").unwrap().stop();
    pool.vm_mut("vm-c").stop();
    let b = pool.wait_for_vm("vm-b", "with its web side down", side_bound, |v| {
        side_health(v, "http") == "down"
    });
    let c = pool.wait_for_vm("vm-c", "with its SSH side down", side_bound, |v| {
        side_health(v, "ssh") == "down"
    });
    assert_sides(&pool.vm_json("vm-a"), "healthy", "up", "up");
    assert_sides(&b, "healthy", "up", "down");
    assert_sides(&c, "healthy", "down", "up");
    let metrics = pool.metrics();
    for (vm, ssh, http) in [("vm-a", 1.0, 1.0), ("vm-b", 1.0, 0.0), ("vm-c", 0.0, 1.0)] {
        assert_eq!(
            protocol_up(&metrics, vm, "ssh"),
            Some(ssh),
            "{vm}:\n{metrics}"
        );
        assert_eq!(
            protocol_up(&metrics, vm, "http"),
            Some(http),
            "{vm}:\n{metrics}"
        );
        let up = sample(&metrics, &format!("poolgate_vm_up{{vm=\"{vm}\"}}"));
        assert_eq!(up, Some(1.0), "{vm}:\n{metrics}");
    }

    // SSH sessions land on vm-a and vm-b only; browsers on vm-a and vm-c only. No attempt hit
    // a side that is down (a failed attempt would be retried elsewhere, hiding a wrong choice).
    let ssh_held: Vec<SshSession> = (1..=2).map(|i| SshSession::hold(&pool.client(i))).collect();
    let ssh_vms: BTreeSet<String> = ssh_held.iter().map(|s| s.vm.clone()).collect();
    assert_eq!(
        ssh_vms,
        BTreeSet::from(["vm-a".to_string(), "vm-b".to_string()]),
        "SSH sessions go to the VMs whose sshd is up, spread"
    );
    let browsers: Vec<(Browser, String)> = rt.block_on(async {
        let mut out = Vec::new();
        for _ in 0..2 {
            out.push(new_browser_session(pool.http).await);
        }
        out
    });
    let web_vms: BTreeSet<String> = browsers.iter().map(|(_, vm)| vm.clone()).collect();
    assert_eq!(
        web_vms,
        BTreeSet::from(["vm-a".to_string(), "vm-c".to_string()]),
        "browsers go to the VMs whose jupyter_server is up, spread"
    );
    let metrics = pool.metrics();
    assert_eq!(vm_failed(&metrics, "vm-c", "ssh"), 0.0, "{metrics}");
    assert_eq!(vm_failed(&metrics, "vm-b", "http"), 0.0, "{metrics}");
    for (vm, ssh, http) in [("vm-a", 1, 1), ("vm-b", 1, 0), ("vm-c", 0, 1)] {
        let entry = pool.vm_json(vm);
        assert_eq!(entry["state"].as_str(), Some("healthy"), "{entry}");
        assert_eq!(entry["sessions"]["ssh"].as_u64(), Some(ssh), "{entry}");
        assert_eq!(entry["sessions"]["http"].as_u64(), Some(http), "{entry}");
    }
    eprintln!("one side down: SSH on {ssh_vms:?}, browsers on {web_vms:?}");
    for s in ssh_held {
        s.end();
    }

    // Every side turns over: vm-a loses both sides (unhealthy), vm-b's sshd stops and its
    // jupyter_server starts again, vm-c's jupyter_server stops and its sshd starts again.
    web.get_mut("vm-a").unwrap().stop();
    pool.vm_mut("vm-a").stop();
    pool.vm_mut("vm-b").stop();
    web.get_mut("vm-b").unwrap().restart();
    web.get_mut("vm-c").unwrap().stop();
    pool.vm_mut("vm-c").restart();
    let changed = Instant::now();
    pool.wait_for_state("vm-a", "unhealthy", side_bound);
    let b = pool.wait_for_vm("vm-b", "with sshd down and jupyter up", side_bound, |v| {
        side_health(v, "ssh") == "down" && side_health(v, "http") == "up"
    });
    let c = pool.wait_for_vm("vm-c", "with sshd up and jupyter down", side_bound, |v| {
        side_health(v, "ssh") == "up" && side_health(v, "http") == "down"
    });
    eprintln!(
        "every side turned over: the API showed it {:?} after the last change",
        changed.elapsed()
    );
    assert_sides(&pool.vm_json("vm-a"), "unhealthy", "down", "down");
    assert_sides(&b, "healthy", "down", "up");
    assert_sides(&c, "healthy", "up", "down");
    let metrics = pool.metrics();
    let up = |vm: &str| sample(&metrics, &format!("poolgate_vm_up{{vm=\"{vm}\"}}"));
    assert_eq!(
        (up("vm-a"), up("vm-b"), up("vm-c")),
        (Some(0.0), Some(1.0), Some(1.0)),
        "{metrics}"
    );
    for (vm, ssh, http) in [("vm-a", 0.0, 0.0), ("vm-b", 0.0, 1.0), ("vm-c", 1.0, 0.0)] {
        assert_eq!(
            protocol_up(&metrics, vm, "ssh"),
            Some(ssh),
            "{vm}:\n{metrics}"
        );
        assert_eq!(
            protocol_up(&metrics, vm, "http"),
            Some(http),
            "{vm}:\n{metrics}"
        );
    }

    // Routing follows: SSH only to vm-c now (users 1 and 2 too, whose earlier VMs lost sshd),
    // browsers only to vm-b — new ones, and the ones pinned to VMs whose web side went away
    // (re-pinned with a new cookie).
    for i in 1..=4 {
        assert_eq!(landed(&pool.client(i)), "vm-c", "user {i}'s SSH session");
    }
    rt.block_on(async {
        for (b, old_vm) in &browsers {
            let r = b.get("/api/status").await;
            assert_eq!(r.status, 200, "{}", r.text());
            let vm = cookie_vm(&b.cookie(COOKIE, "/").expect("cookie"));
            assert_eq!(vm, "vm-b", "the browser pinned to {old_vm} is re-pinned");
        }
        for _ in 0..2 {
            let (_, vm) = new_browser_session(pool.http).await;
            assert_eq!(vm, "vm-b", "a new browser");
        }
    });
    let after = pool.metrics();
    for (vm, protocol) in [
        ("vm-a", "ssh"),
        ("vm-b", "ssh"),
        ("vm-a", "http"),
        ("vm-c", "http"),
    ] {
        assert_eq!(
            vm_failed(&after, vm, protocol),
            vm_failed(&metrics, vm, protocol),
            "no {protocol} attempt went to {vm} while that side was down:\n{after}"
        );
    }
    eprintln!("per-protocol routing test: {:?}", started.elapsed());
}
