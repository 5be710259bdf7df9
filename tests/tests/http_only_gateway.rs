//! A gateway for browsers only: `listen.ssh = "off"`, the smallest config a team that uses
//! poolgate for JupyterHub alone writes. No `[ssh]` section, no `keys/` directory and no VM host
//! keys: nothing logs in to a VM over SSH, so nothing needs them. Real jupyter_server VMs, the
//! real gateway, observed through `check-config`, its log, twenty browsers arriving at once, the
//! admin API, `/metrics` (checked by promtool) and the sockets it listens on.
//!
//! - `check-config` accepts the file as it is and says the user CA is not needed; `run` starts
//!   without a known_hosts file and says it serves browsers only.
//! - The SSH side is never probed: the API shows it `unknown` and not probed, the VMs healthy by
//!   their web side alone.
//! - Twenty browsers at once spread over both VMs; the gateway listens on its HTTP and admin
//!   ports only and writes no SSH key.

// Test code: a failed step should abort the test at once (as in tests/src/lib.rs).
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use poolgate_tests::jupyter::{Browser, JupyterServerVm, cookie_vm, require_jupyter};
use poolgate_tests::*;

const BROWSERS: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_only_gateway_with_ssh_off_needs_no_ssh_keys_and_never_probes_the_ssh_side() {
    if !require_jupyter() {
        return;
    }
    require_tools!("promtool");
    let started = Instant::now();
    let vms = blocking(|| JupyterServerVm::start_all(&["js-a", "js-b"])).await;
    let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    // jupyter_server's health URL is `/api` (JupyterHub's, `/hub/health`, is the default).
    let mut config = format!(
        "[listen]\nssh = \"off\"\nhttp = \"{http}\"\nadmin = \"{admin}\"\n\n\
         [health]\nhttp_path = \"/api\"\n"
    );
    for vm in &vms {
        config.push_str(&format!(
            "\n[[pool.backends]]\nname = \"{}\"\nhost = \"127.0.0.1\"\nhttp_port = {}\n",
            vm.name(),
            vm.port()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("poolgate.toml"), &config).unwrap();

    // check-config: accepted as it is, with no warning.
    let out = run_with_timeout(
        Command::new(poolgate_bin())
            .arg("check-config")
            .arg(dir.path().join("poolgate.toml"))
            .env("NO_COLOR", "1"),
        Duration::from_secs(30),
    );
    assert_ok(&out, "poolgate check-config");
    let text = stdout(&out);
    assert!(text.contains("listen: ssh off, http "), "{text}");
    assert!(text.contains("user CA: not needed"), "{text}");
    assert!(!text.contains("warning"), "{text}");

    let gateway = GatewayProcess::builder(&config)
        .dir(dir.path())
        .wait_for(http)
        .wait_for(admin)
        .start();
    for vm in &vms {
        gateway.wait_for_vm_up(vm.name(), Duration::from_secs(30));
    }
    let log = strip_ansi(&gateway.log_text());
    assert!(
        log.contains("no SSH listener (listen.ssh = \"off\"): serving browsers only"),
        "{log}"
    );
    assert!(
        !log.contains("user CA") && !log.contains("known_hosts"),
        "nothing about SSH keys:\n{log}"
    );

    // The web side is probed and up; the SSH side is not probed and stays unknown.
    let vms_json = http_get(admin, "/api/v1/vms").json();
    for entry in vms_json.items() {
        assert_eq!(entry["state"].as_str(), Some("healthy"), "{entry}");
        let ssh = &entry["protocols"]["ssh"];
        assert_eq!(ssh["health"].as_str(), Some("unknown"), "{entry}");
        assert_eq!(ssh["probed"].as_bool(), Some(false), "{entry}");
        assert_eq!(ssh["accepts_new"].as_bool(), Some(false), "{entry}");
        assert_eq!(ssh["served"].as_bool(), Some(false), "{entry}");
        assert!(ssh["history"].items().is_empty(), "no SSH probe: {entry}");
        let web = &entry["protocols"]["http"];
        assert_eq!(web["health"].as_str(), Some("up"), "{entry}");
        assert_eq!(web["accepts_new"].as_bool(), Some(true), "{entry}");
        assert_eq!(web["served"].as_bool(), Some(true), "{entry}");
    }
    // `poolgate status` shows the web side alone: its health and the address browsers reach.
    let out = run_with_timeout(
        Command::new(poolgate_bin())
            .args(["status", "--admin", &admin.to_string()])
            .env("NO_COLOR", "1"),
        Duration::from_secs(30),
    );
    assert_ok(&out, "poolgate status");
    let table = stdout(&out);
    for vm in &vms {
        let row = table
            .lines()
            .find(|l| l.starts_with(&format!("{} ", vm.name())))
            .unwrap_or_else(|| panic!("no row for {}:\n{table}", vm.name()));
        assert!(row.contains("web up"), "{table}");
        assert!(!row.contains("ssh "), "no SSH side: {table}");
        assert!(
            row.ends_with(&format!("127.0.0.1:{}", vm.port())),
            "{table}"
        );
    }

    // Twenty browsers at once (the team at 9:00): each pinned, spread over both VMs.
    let pinned: Vec<String> = futures_util::future::join_all((0..BROWSERS).map(|_| async move {
        let b = Browser::http(http);
        let r = b.get("/api/status").await;
        assert_eq!(r.status, 200, "{}", r.text());
        cookie_vm(&b.cookie("poolgate_vm", "/").expect("the sticky cookie"))
    }))
    .await;
    let mut per_vm: BTreeMap<&str, usize> = BTreeMap::new();
    for vm in &pinned {
        *per_vm.entry(vm.as_str()).or_default() += 1;
    }
    assert_eq!(per_vm.len(), 2, "browsers on both VMs: {per_vm:?}");
    assert!(
        per_vm.values().all(|&n| n >= BROWSERS / 4),
        "spread: {per_vm:?}"
    );

    let metrics = http_get(admin, "/metrics").body;
    for vm in &vms {
        assert_eq!(vm_up(&metrics, vm.name()), Some(1.0), "{metrics}");
        assert_eq!(
            vm_protocol_up(&metrics, vm.name(), "ssh"),
            Some(0.0),
            "{metrics}"
        );
        assert_eq!(
            vm_protocol_up(&metrics, vm.name(), "http"),
            Some(1.0),
            "{metrics}"
        );
    }
    promtool_check(&metrics, "http_only_gateway.prom");

    // Nothing of the SSH side exists: no key written, no SSH listener.
    let written: BTreeSet<String> = std::fs::read_dir(dir.path().join("keys"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        written,
        BTreeSet::from(["cookie_secret".to_owned()]),
        "only the cookie secret is generated"
    );
    let pid = gateway.pid().expect("the gateway runs");
    assert_eq!(
        listening_ports(pid),
        BTreeSet::from([http.port(), admin.port()]),
        "the gateway listens on its HTTP and admin ports only"
    );
    drop(gateway);
    drop(vms);
    eprintln!("http-only gateway test: {:?}", started.elapsed());
}
