//! `/metrics` on a live gateway: `promtool check metrics` accepts it while sessions are open,
//! `poolgate_sessions_active` matches the sessions sshd really has on each VM and returns to 0,
//! every metric DESIGN.md names is exported with a HELP line, and counters never go backwards.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use poolgate_tests::*;

/// The metric names DESIGN.md lists ("Metrics (prometheus crate, prefix `poolgate_`)").
const DESIGN_METRICS: &[&str] = &[
    "poolgate_sessions_active",
    "poolgate_sessions_total",
    "poolgate_vm_up",
    "poolgate_vm_state",
    "poolgate_bytes_total",
    "poolgate_connect_seconds",
    "poolgate_auth_failures_total",
    "poolgate_http_requests_total",
    "poolgate_autoscale_desired_vms",
    "poolgate_autoscale_actions_total",
    "poolgate_pool_vms",
];

/// The DESIGN.md metrics without a `# HELP` line in `text`.
fn missing_help(text: &str) -> Vec<&'static str> {
    DESIGN_METRICS
        .iter()
        .copied()
        .filter(|name| !text.contains(&format!("# HELP {name} ")))
        .collect()
}

/// Counter-like series (counters, and histogram buckets, sums and counts) of a scrape.
fn counter_series(text: &str) -> BTreeMap<String, f64> {
    let types = metric_types(text);
    samples(text)
        .into_iter()
        .filter(|(series, _)| {
            let name = series.split('{').next().unwrap_or_default();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    name.strip_suffix(suffix)
                        .filter(|base| types.get(*base).map(String::as_str) == Some("histogram"))
                })
                .unwrap_or(name);
            matches!(
                types.get(family).map(String::as_str),
                Some("counter" | "histogram")
            )
        })
        .collect()
}

/// Asserts every counter series of `before` is still there in `after` and not smaller.
fn assert_counters_monotonic(before: &str, after: &str, what: &str) {
    let (a, b) = (counter_series(before), counter_series(after));
    assert!(!a.is_empty(), "no counter in the first scrape:\n{before}");
    for (series, old) in &a {
        let new = b
            .get(series)
            .unwrap_or_else(|| panic!("{what}: counter {series} disappeared"));
        assert!(new >= old, "{what}: {series} went backwards: {old} → {new}");
    }
}

#[test]
fn admin_metrics_pass_promtool_and_match_the_sessions_open_on_each_vm() {
    require_tools!("sshd", "ssh", "ssh-keygen", "promtool");
    require_root!();
    let started = Instant::now();
    let pool = GatewayPool::builder()
        .vm("vm-a")
        .vm("vm-b")
        .users(3)
        .start();
    // Traffic first, so the first scrape already has ssh counters to compare (user 3: the
    // affinity it gets does not matter below).
    assert_ok(&pool.client(3).run("true"), "ssh true");
    let first = pool.metrics();

    // Three sessions of user 1 (affinity keeps them on one VM), one of user 2 (on the other,
    // least-loaded, VM).
    let mut held: Vec<SshSession> = (0..3).map(|_| SshSession::hold(&pool.client(1))).collect();
    held.push(SshSession::hold(&pool.client(2)));
    let busy = held[0].vm.clone();
    assert!(held[..3].iter().all(|s| s.vm == busy), "affinity");
    let quiet = held[3].vm.clone();
    assert_ne!(busy, quiet);
    let expected = [(busy.as_str(), 3usize), (quiet.as_str(), 1usize)];
    // What sshd itself has: one `sshd: user@notty` process per logged-in connection.
    let sshd_agrees = poll(Duration::from_secs(10), || {
        expected
            .iter()
            .all(|(vm, n)| pool.vm(vm).user_sessions() == *n)
    });
    assert!(
        sshd_agrees,
        "sshd shows {} on {busy} and {} on {quiet}, expected 3 and 1",
        pool.vm(&busy).user_sessions(),
        pool.vm(&quiet).user_sessions()
    );

    // Data through one session, so byte counters move between scrapes.
    let payload = vec![b'x'; 256 * 1024];
    held[0].send(&payload);
    let echoed = poll(Duration::from_secs(20), || {
        held[0].received() >= payload.len()
    });
    assert!(echoed, "only {} bytes echoed", held[0].received());

    let live = pool.metrics();
    promtool_check(&live, "admin_metrics_live.prom");
    for (vm, n) in expected {
        assert_eq!(
            ssh_active(&live, vm),
            Some(n as f64),
            "poolgate_sessions_active for {vm} with {n} open sessions:\n{live}"
        );
    }
    // Every family exported has HELP (the DESIGN.md list itself is checked in
    // `admin_metrics_export_every_design_md_metric_with_a_help_line`).
    for family in metric_types(&live).keys() {
        assert!(
            live.contains(&format!("# HELP {family} ")),
            "{family} has no HELP line:\n{live}"
        );
    }
    let up = sample(
        &live,
        &format!("poolgate_bytes_total{{direction=\"up\",protocol=\"ssh\",vm=\"{busy}\"}}"),
    )
    .unwrap_or(0.0);
    assert!(up >= payload.len() as f64, "bytes up {up}:\n{live}");
    assert_counters_monotonic(&first, &live, "first → live scrape");

    // Three end cleanly; the client of the fourth is killed (SIGKILL, no SSH disconnect).
    let killed = held.pop().expect("four sessions");
    for s in held {
        s.end();
    }
    drop(killed);
    let ended = Instant::now();
    let mut last = String::new();
    let zero = poll(Duration::from_secs(10), || {
        last = pool.metrics();
        [busy.as_str(), quiet.as_str()]
            .iter()
            .all(|vm| ssh_active(&last, vm) == Some(0.0))
    });
    assert!(zero, "sessions_active did not return to 0:\n{last}");
    eprintln!("sessions_active back to 0 in {:?}", ended.elapsed());
    promtool_check(&last, "admin_metrics_idle.prom");
    assert_counters_monotonic(&live, &last, "live → idle scrape");
    let total = sample(
        &last,
        &format!("poolgate_sessions_total{{outcome=\"ok\",protocol=\"ssh\",vm=\"{busy}\"}}"),
    );
    assert!(total.is_some_and(|t| t >= 3.0), "{last}");
    eprintln!("metrics test: {:?}", started.elapsed());
}

#[test]
fn admin_metrics_export_every_design_md_metric_with_a_help_line() {
    require_tools!("sshd", "ssh", "ssh-keygen", "promtool");
    require_root!();
    let pool = GatewayPool::builder().vm("vm-a").users(1).start();
    let session = SshSession::hold(&pool.client(1));
    let live = pool.metrics();
    promtool_check(&live, "admin_metrics_design.prom");
    let missing = missing_help(&live);
    assert!(
        missing.is_empty(),
        "metrics listed in DESIGN.md without a HELP line in a live /metrics (one SSH session \
         open): {missing:?}\n{live}"
    );
    session.end();
}
