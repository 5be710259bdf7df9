//! Health probes end to end: a VM whose sshd dies is marked down within `fall × interval` plus
//! one probe timeout, gets no new session while down, and comes back after `rise` good probes
//! once sshd runs again — as the admin API and `/metrics` show it.

use std::time::{Duration, Instant};

use poolgate_tests::*;
use serde_json::Value;

const RISE: u32 = 2;
const FALL: u32 = 3;
/// Timer and scheduling slack for the hung-VM case, whose worst case is the bound itself. The
/// measurement itself (two clocks: ours, and the probe ages the API reports) and tokio timers on
/// a loaded 2-CPU CI machine (tests run in parallel) can add a few hundred milliseconds.
const HUNG_SLACK: Duration = Duration::from_millis(400);

#[test]
fn admin_shows_a_vm_whose_sshd_dies_down_in_time_and_back_after_rise_probes() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let started = Instant::now();
    let mut pool = GatewayPool::builder()
        .vm("vm-a")
        .vm("vm-b")
        .users(3)
        .rise(RISE)
        .fall(FALL)
        .start();
    let metrics = pool.metrics();
    assert_eq!(
        sample(&metrics, "poolgate_vm_up{vm=\"vm-a\"}"),
        Some(1.0),
        "{metrics}"
    );

    // Down: from the kill of sshd (and every session under it) to "unhealthy" in the API.
    let down_bound = PROBE_INTERVAL * FALL + PROBE_TIMEOUT;
    let killed = Instant::now();
    pool.vm_mut("vm-a").stop();
    let mut states = Vec::new();
    let down = poll(down_bound + Duration::from_secs(10), || {
        let state = pool.vm_state("vm-a");
        if states.last() != Some(&state) {
            states.push(state.clone());
        }
        state == "unhealthy"
    });
    let time_to_down = killed.elapsed();
    assert!(down, "vm-a never marked unhealthy; states seen: {states:?}");
    eprintln!("time to down: {time_to_down:?} (bound {down_bound:?}; states {states:?})");
    assert!(
        time_to_down <= down_bound,
        "vm-a marked down after {time_to_down:?}, more than fall × interval + timeout = {down_bound:?}"
    );
    let vm_a = pool.vm_json("vm-a");
    assert_eq!(vm_a["health"].as_str(), Some("down"), "{vm_a}");
    let history = vm_a["health_history"].items();
    let failed_tail = history
        .iter()
        .rev()
        .take_while(|p| p["ok"].as_bool() == Some(false))
        .count();
    assert_eq!(
        failed_tail, FALL as usize,
        "exactly `fall` failed probes mark a VM down: {vm_a}"
    );
    let metrics = pool.metrics();
    assert_eq!(
        sample(&metrics, "poolgate_vm_up{vm=\"vm-a\"}"),
        Some(0.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "poolgate_vm_up{vm=\"vm-b\"}"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "poolgate_vm_state{state=\"unhealthy\",vm=\"vm-a\"}"
        ),
        Some(1.0),
        "{metrics}"
    );

    // While vm-a is down, every new session goes to vm-b (held open: vm-b becomes the busier
    // VM, which matters below).
    let mut held = Vec::new();
    for i in [1, 2, 1] {
        let s = SshSession::hold(&pool.client(i));
        assert_eq!(s.vm, "vm-b", "a new session of user {i} went to a down VM");
        held.push(s);
    }
    assert_eq!(pool.vm_state("vm-a"), "unhealthy");

    // Up: sshd runs again; `rise` good probes later the VM is healthy again.
    pool.vm_mut("vm-a").restart();
    let back = Instant::now();
    let up_bound = PROBE_INTERVAL * RISE + PROBE_TIMEOUT;
    let mut seen = Vec::new();
    let mut at_transition = Value::Null;
    let up = poll(up_bound + Duration::from_secs(10), || {
        let vm = pool.vm_json("vm-a");
        let state = vm["state"].as_str().unwrap_or_default().to_string();
        if seen.last() != Some(&state) {
            seen.push(state.clone());
        }
        at_transition = vm;
        state == "healthy"
    });
    let time_to_up = back.elapsed();
    assert!(up, "vm-a never healthy again; states seen: {seen:?}");
    eprintln!("time to up: {time_to_up:?} (bound {up_bound:?}; states {seen:?})");
    assert!(
        time_to_up <= up_bound,
        "vm-a healthy after {time_to_up:?}, more than rise × interval + timeout = {up_bound:?}"
    );
    assert_eq!(seen, ["unhealthy", "healthy"], "states while coming back");
    // Exactly `rise` good probes after the failed ones: one good probe is not enough.
    let history = at_transition["health_history"].items();
    let ok_tail = history
        .iter()
        .rev()
        .take_while(|p| p["ok"].as_bool() == Some(true))
        .count();
    assert_eq!(ok_tail, RISE as usize, "{at_transition}");
    assert_eq!(at_transition["health"].as_str(), Some("up"));
    let metrics = pool.metrics();
    assert_eq!(
        sample(&metrics, "poolgate_vm_up{vm=\"vm-a\"}"),
        Some(1.0),
        "{metrics}"
    );

    // And it takes sessions again: it is the least-loaded VM now (vm-b holds three).
    assert_eq!(landed(&pool.client(3)), "vm-a");
    for s in held {
        s.end();
    }
    eprintln!("health test: {:?}", started.elapsed());
}

#[test]
fn admin_shows_a_hung_vm_down_within_fall_intervals_plus_one_timeout() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let mut pool = GatewayPool::builder()
        .vm("vm-a")
        .vm("vm-b")
        .users(1)
        .rise(RISE)
        .fall(FALL)
        .start();
    // SIGSTOP the sshd listener: the kernel still completes TCP handshakes (backlog), but no
    // banner ever comes, so every probe runs into its timeout — a hung VM or a black hole.
    let pid = pool.vm("vm-a").pid().expect("vm-a runs");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid fits i32"));
    let down_bound = PROBE_INTERVAL * FALL + PROBE_TIMEOUT;
    let frozen = Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP sshd");
    let mut at_transition = Value::Null;
    let down = poll(down_bound + Duration::from_secs(10), || {
        at_transition = pool.vm_json("vm-a");
        at_transition["state"].as_str() == Some("unhealthy")
    });
    let observed = frozen.elapsed();
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
    assert!(down, "a hung vm-a never marked unhealthy: {at_transition}");
    // When the gateway marked it: the last probe (the `fall`-th failure) ended `age` before
    // our look at the API.
    let history = at_transition["health_history"].items();
    let last_age = history
        .last()
        .and_then(|p| p["age_seconds"].as_f64())
        .expect("a probe history");
    let time_to_down = observed.saturating_sub(Duration::from_secs_f64(last_age));
    eprintln!(
        "hung VM: time to down {time_to_down:?} (bound {down_bound:?}, seen after {observed:?}); \
         history {}",
        at_transition["health_history"]
    );
    // If the freeze comes right after a good probe (the pool is ready right after vm-a's second
    // one), the VM is marked down exactly at the bound: allow timer/scheduler slack only.
    assert!(
        time_to_down <= down_bound + HUNG_SLACK,
        "hung vm-a marked down after {time_to_down:?}, more than fall × interval + timeout = \
         {down_bound:?} (+{HUNG_SLACK:?} slack); probe history: {}",
        at_transition["health_history"]
    );
    assert_eq!(landed(&pool.client(1)), "vm-b");
    pool.vm_mut("vm-a").stop();
}

#[test]
fn admin_counts_a_session_that_hits_a_dead_vm_as_a_failed_probe_and_lands_elsewhere() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let mut pool = GatewayPool::builder()
        .vm("vm-a")
        .vm("vm-b")
        .users(3)
        .rise(RISE)
        .fall(FALL)
        .start();
    let down_bound = PROBE_INTERVAL * FALL + PROBE_TIMEOUT;
    let killed = Instant::now();
    pool.vm_mut("vm-a").stop();
    // Right after the kill vm-a still looks healthy and is the first pick (lower name on a
    // tie): the gateway's connection to it fails, and the user lands on vm-b instead.
    for i in 1..=3 {
        assert_eq!(landed(&pool.client(i)), "vm-b", "user {i}");
    }
    let metrics = pool.metrics();
    let failed = sample(
        &metrics,
        "poolgate_sessions_total{outcome=\"vm_failed\",protocol=\"ssh\",vm=\"vm-a\"}",
    )
    .unwrap_or(0.0);
    assert!(
        failed >= 1.0,
        "no vm_failed session counted for vm-a:\n{metrics}"
    );
    pool.wait_for_state("vm-a", "unhealthy", down_bound + Duration::from_secs(10));
    let time_to_down = killed.elapsed();
    eprintln!("time to down with passive failures: {time_to_down:?} ({failed} failed sessions)");
    assert!(time_to_down <= down_bound, "{time_to_down:?}");
}
