//! Browsers that arrive together spread (issue 14, item 2), over real jupyter_server VMs behind
//! the gateway (HTTPS, test CA): 20 fresh clients — no cookie jar carried over, one request each,
//! all sent at once — are spread within ±2 of even by the VM their `poolgate_vm` cookie names,
//! over two VMs and over three. Their first requests weigh on their VMs only as *tentative*
//! load: it lapses `http.tentative_for` after they were routed (they never return the cookie),
//! and none of them ever counts as an HTTP session.
//!
//! Tentative load is not shown by the admin API, so its lapse is observed by where new browsers
//! go: 20 cookie-dropping clients are sent to one VM (the others drained for that moment), then
//! a few new clients, spaced out, go to the other VMs until the 20 stop weighing, and the first
//! one routed back to that VM marks the lapse (the new clients are too few to even out the load
//! by themselves before the deadline: a gateway whose tentative load never lapsed fails).

// Test code: a failed step should abort the test at once (as in tests/src/lib.rs).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use poolgate_tests::jupyter::*;
use poolgate_tests::{GatewayPool, JsonItems, blocking, http_get, http_request};
use serde_json::Value;

const COOKIE: &str = "poolgate_vm";
/// Fresh clients per burst.
const BURST: usize = 20;
/// How far from an even share each VM may be.
const SPREAD_TOLERANCE: f64 = 2.0;
/// Slack for a loaded 2-CPU machine on the lapse deadline.
const SLACK: Duration = Duration::from_secs(2);

/// `BURST` fresh clients, each with its own empty cookie jar, send one `GET /api` each, all at
/// once; returns the VM each client's cookie names (in the order they were sent) and how long
/// the whole burst took.
async fn burst(gw: &GatewayPool) -> (Vec<String>, Duration) {
    let clients: Vec<Browser> = (0..BURST).map(|_| gw.browser()).collect();
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|b| {
            tokio::spawn(async move {
                let r = b.get("/api").await;
                assert_eq!(r.status, 200, "{}", r.text());
                cookie_vm(&b.cookie(COOKIE, "/").expect("a poolgate_vm cookie"))
            })
        })
        .collect();
    let mut vms = Vec::new();
    for t in tasks {
        vms.push(t.await.expect("client task"));
    }
    (vms, started.elapsed())
}

/// How many clients each of `names` got (every VM listed, 0 included).
fn per_vm(vms: &[String], names: &[&str]) -> BTreeMap<String, usize> {
    let mut counts: BTreeMap<String, usize> = names.iter().map(|n| (n.to_string(), 0)).collect();
    for vm in vms {
        *counts
            .get_mut(vm)
            .unwrap_or_else(|| panic!("cookie names unknown VM {vm}")) += 1;
    }
    counts
}

/// `GET /api/v1/vms` on the admin listener.
fn vms_json(admin: SocketAddr) -> Value {
    let r = http_get(admin, "/api/v1/vms");
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

/// Asserts the pool counts no HTTP session on any VM: the cookie-dropping clients never were
/// sessions.
fn assert_no_http_sessions(admin: SocketAddr) {
    let vms = vms_json(admin);
    for vm in vms.items() {
        assert_eq!(
            vm["sessions"]["http"].as_u64(),
            Some(0),
            "clients that never returned their cookie count as HTTP sessions: {vms}"
        );
    }
}

/// `POST /api/v1/vms/{vm}/{action}` (drain | undrain).
fn admin_post(admin: SocketAddr, vm: &str, action: &str) {
    let path = format!("/api/v1/vms/{vm}/{action}");
    let r = http_request(admin, "POST", &path, &[]);
    assert_eq!(r.status, 200, "POST {path}: {}", r.body);
}

/// One fresh client's `GET /api`; the VM its cookie names.
async fn one_new_client(gw: &GatewayPool) -> String {
    let b = gw.browser();
    let r = b.get("/api").await;
    assert_eq!(r.status, 200, "{}", r.text());
    cookie_vm(&b.cookie(COOKIE, "/").expect("a poolgate_vm cookie"))
}

/// The burst over every VM spreads within ±2 of even.
async fn assert_burst_spreads(gw: &GatewayPool, names: &[&str]) {
    let (vms, took) = burst(gw).await;
    let counts = per_vm(&vms, names);
    let even = BURST as f64 / names.len() as f64;
    eprintln!(
        "{BURST} fresh clients at once over {} VMs in {took:?}: {counts:?} (in order: {vms:?})",
        names.len()
    );
    for (vm, n) in &counts {
        assert!(
            (*n as f64 - even).abs() <= SPREAD_TOLERANCE,
            "{vm} got {n} of {BURST} new clients, more than ±{SPREAD_TOLERANCE} from {even:.1}: \
             {counts:?}"
        );
    }
    assert_no_http_sessions(gw.admin);
}

/// Sends `BURST` cookie-dropping clients to `names[0]` (the others drained meanwhile), then
/// a new client every tenth of the time allowed until one is routed to `names[0]` again: the
/// burst's tentative load has lapsed. Asserts that happens no sooner than `tentative_for` after
/// the burst began and no later than `tentative_for` + one expiry period (+ a poll and slack)
/// after it ended. Returns when it was seen, from the end of the burst.
async fn assert_tentative_load_lapses(
    gw: &GatewayPool,
    names: &[&str],
    tentative_for: Duration,
    expire_every: Duration,
) -> Duration {
    let target = names[0];
    for vm in &names[1..] {
        admin_post(gw.admin, vm, "drain");
    }
    let burst_began = Instant::now();
    let (vms, _) = burst(gw).await;
    let burst_ended = Instant::now();
    for vm in &names[1..] {
        admin_post(gw.admin, vm, "undrain");
    }
    assert!(
        vms.iter().all(|v| v == target),
        "with the others drained every client goes to {target}: {vms:?}"
    );
    // While the burst weighs on `target`, new clients go elsewhere. They weigh there too, so
    // they must stay too few to even out the burst's load before the deadline (else one would
    // go to `target` with nothing lapsed): at most ten are sent, fewer than BURST.
    let window = tentative_for + expire_every + SLACK;
    let every = window / 9;
    let bound = window + every;
    let mut elsewhere = Vec::new();
    let lapsed_after = loop {
        let asked = Instant::now();
        let vm = one_new_client(gw).await;
        if vm == target {
            break asked.saturating_duration_since(burst_ended);
        }
        elsewhere.push(vm);
        assert!(
            burst_ended.elapsed() <= bound,
            "{BURST} cookie-dropping clients still weigh on {target} {:?} after they were \
             routed (tentative_for {tentative_for:?}, expired every {expire_every:?}); new \
             clients went to {elsewhere:?}",
            burst_ended.elapsed()
        );
        tokio::time::sleep_until((asked + every).into()).await;
    };
    let since_began = burst_began.elapsed();
    eprintln!(
        "tentative load of {BURST} clients on {target} lapsed {lapsed_after:?} after the burst \
         (tentative_for {tentative_for:?}, expiry every {expire_every:?}); {} new clients went \
         elsewhere meanwhile",
        elsewhere.len()
    );
    assert!(
        elsewhere.len() >= 2,
        "the burst weighed on {target} (new clients went elsewhere): {elsewhere:?}"
    );
    assert!(
        lapsed_after <= bound,
        "tentative load on {target} lapsed {lapsed_after:?} after the burst (bound {bound:?})"
    );
    assert!(
        since_began >= tentative_for,
        "tentative load lapsed {since_began:?} after the burst began, before tentative_for \
         ({tentative_for:?})"
    );
    assert_no_http_sessions(gw.admin);
    lapsed_after
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_cookie_dropping_clients_at_once_spread_over_two_vms_and_their_load_lapses() {
    if !require_jupyter() {
        return;
    }
    let started = Instant::now();
    let names = ["js-a", "js-b"];
    let tentative_for = Duration::from_secs(2);
    let vms = blocking(move || JupyterServerVm::start_all(&names)).await;
    let gw = GatewayPool::builder()
        .web_pool("/api")
        .tls()
        .web_vms(&vms)
        .http_option(&format!("tentative_for = \"{}s\"", tentative_for.as_secs()))
        .start_async()
        .await;
    eprintln!(
        "two jupyter servers and the gateway ready in {:?}",
        started.elapsed()
    );

    assert_burst_spreads(&gw, &names).await;
    // Expired every min(session_idle / 10, tentative_for / 2), at least 1 s.
    let expire_every = Duration::from_secs(1);
    assert_tentative_load_lapses(&gw, &names, tentative_for, expire_every).await;
    drop(vms);
    eprintln!("two-VM burst test: {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_cookie_dropping_clients_at_once_spread_over_three_vms_with_the_default_settings() {
    if !require_jupyter() {
        return;
    }
    let started = Instant::now();
    let names = ["js-a", "js-b", "js-c"];
    let vms = blocking(move || JupyterServerVm::start_all(&names)).await;
    // No `tentative_for` (nor `session_idle`) in the config: the documented defaults.
    let gw = GatewayPool::builder()
        .web_pool("/api")
        .tls()
        .web_vms(&vms)
        .start_async()
        .await;
    let config = std::fs::read_to_string(gw.gateway.config_path()).unwrap();
    assert!(!config.contains("tentative_for") && !config.contains("session_idle"));
    eprintln!(
        "three jupyter servers and the gateway ready in {:?}",
        started.elapsed()
    );

    assert_burst_spreads(&gw, &names).await;
    // Defaults: tentative_for 10 s, session_idle 30 min, so expiry every min(3 min, 5 s).
    assert_tentative_load_lapses(&gw, &names, Duration::from_secs(10), Duration::from_secs(5))
        .await;
    drop(vms);
    eprintln!("three-VM burst test: {:?}", started.elapsed());
}
