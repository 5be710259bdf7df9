//! Unit tests of [`Pool`]: exact, deterministic sequences.

use super::*;
use crate::clock::ManualClock;
use crate::vm::{Protocol, VmState};

const TTL: Duration = Duration::from_secs(3600);

fn policy() -> RoutingPolicy {
    RoutingPolicy {
        user_affinity: true,
        affinity_ttl: TTL,
        http_session_idle: Duration::from_secs(1800),
        http_tentative_for: Duration::from_secs(10),
    }
}

fn spec(name: &str, weight: u32, max: u32) -> VmSpec {
    VmSpec {
        weight,
        max_sessions: max,
        ..VmSpec::new(name, "127.0.0.1")
    }
}

/// A pool of healthy VMs `(name, weight, max_sessions)`.
fn pool(vms: &[(&str, u32, u32)]) -> (Pool, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new());
    let pool = Pool::new(policy(), clock.clone());
    pool.set_vms(vms.iter().map(|(n, w, m)| spec(n, *w, *m)).collect());
    for (n, _, _) in vms {
        assert!(pool.set_health(n, Health::Up));
    }
    (pool, clock)
}

fn ssh() -> PickRequest<'static> {
    PickRequest::new(Protocol::Ssh)
}

/// Whether the snapshot shows `vm` leaving.
fn leaving(pool: &Pool, vm: &str) -> bool {
    pool.snapshot().get(vm).is_some_and(|v| v.status().leaving)
}

fn name(r: Result<SessionGuard, NoVm>) -> String {
    match r {
        Ok(g) => {
            let n = g.vm_name().to_owned();
            std::mem::forget(g); // keep it counted
            n
        }
        Err(e) => format!("error: {e}"),
    }
}

#[test]
fn new_vms_wait_for_their_first_probe() {
    let clock = Arc::new(ManualClock::new());
    let pool = Pool::new(policy(), clock);
    let err = pool.acquire(&ssh()).map(|_| ()).unwrap_err();
    assert_eq!(err.to_string(), "the pool has no VMs");
    pool.set_vms(vec![spec("a", 1, 5)]);
    let snap = pool.snapshot();
    assert_eq!(snap.get("a").map(|v| v.state()), Some(VmState::Starting));
    let err = pool.acquire(&ssh()).map(|_| ()).unwrap_err();
    assert_eq!(err.starting, 1);
    assert!(pool.set_health("a", Health::Up));
    assert_eq!(name(pool.acquire(&ssh())), "a");
}

#[test]
fn least_loaded_by_weight_with_name_tie_break() {
    let (pool, _) = pool(&[("c", 1, 100), ("a", 1, 100), ("b", 2, 100)]);
    let got: Vec<String> = (0..8).map(|_| name(pool.acquire(&ssh()))).collect();
    assert_eq!(got, ["a", "b", "c", "b", "a", "b", "c", "b"]);
}

#[test]
fn load_hint_breaks_ties_before_name() {
    let (pool, _) = pool(&[("a", 1, 9), ("b", 1, 9), ("c", 1, 9)]);
    assert!(pool.set_load_hint("b", Some(0.1)));
    assert!(pool.set_load_hint("c", Some(0.5)));
    assert!(!pool.set_load_hint("zz", Some(0.5)));
    // a has no hint: ranks last among equals.
    assert_eq!(name(pool.acquire(&ssh())), "b");
    assert_eq!(name(pool.acquire(&ssh())), "c");
    assert_eq!(name(pool.acquire(&ssh())), "a");
    // Load still comes first: everyone at 1, hints decide again.
    assert_eq!(name(pool.acquire(&ssh())), "b");
    pool.set_load_hint("b", None);
    pool.set_load_hint("c", Some(f64::NAN)); // cleared
    assert_eq!(name(pool.acquire(&ssh())), "a");
}

#[test]
fn never_picks_unavailable_vms() {
    let (pool, _) = pool(&[
        ("a", 1, 9),
        ("b", 1, 9),
        ("c", 1, 9),
        ("d", 1, 9),
        ("e", 1, 1),
    ]);
    pool.set_health("a", Health::Down);
    pool.drain("b");
    pool.set_lifecycle("c", Lifecycle::Stopping);
    assert_eq!(name(pool.acquire(&ssh())), "d");
    assert_eq!(name(pool.acquire(&ssh())), "e");
    assert_eq!(name(pool.acquire(&ssh())), "d");
    pool.set_lifecycle("d", Lifecycle::Starting);
    let err = pool.acquire(&ssh()).map(|_| ()).unwrap_err();
    assert_eq!(
        err,
        NoVm {
            total: 5,
            unhealthy: 1,
            draining: 1,
            full: 1,
            starting: 1,
            stopped: 1,
            excluded: 0,
            protocol: Some(Protocol::Ssh),
        }
    );
    assert!(pool.undrain("b"));
    assert_eq!(name(pool.acquire(&ssh())), "b");
    assert!(!pool.drain("nope"));
}

#[test]
fn max_sessions_and_weight_zero() {
    let (pool, _) = pool(&[("a", 1, 2), ("z", 0, 9)]);
    let g1 = pool.acquire(&ssh());
    let g2 = pool.acquire(&ssh());
    assert!(g1.is_ok() && g2.is_ok());
    let err = pool.acquire(&ssh()).map(|_| ()).unwrap_err();
    assert_eq!((err.full, err.total), (2, 2));
    drop(g1);
    assert_eq!(name(pool.acquire(&ssh())), "a");
}

#[test]
fn pinned_vm_first_while_eligible() {
    let (pool, _) = pool(&[("a", 1, 2), ("b", 1, 9)]);
    let req = PickRequest::new(Protocol::Http).pinned("b", false);
    assert_eq!(name(pool.acquire(&ssh())), "a");
    assert_eq!(name(pool.acquire(&req)), "b");
    assert_eq!(name(pool.acquire(&req)), "b"); // b is more loaded, still pinned
    pool.drain("b");
    assert_eq!(name(pool.acquire(&req)), "a"); // draining: re-pick
    let keep = PickRequest::new(Protocol::Http).pinned("b", true);
    assert_eq!(name(pool.acquire(&keep)), "b"); // unless already pinned there
    pool.set_health("b", Health::Down);
    // a is full now, b down: not even pinned browsers (b counts as
    // draining, which takes precedence over unhealthy).
    let err = pool.acquire(&keep).map(|_| ()).unwrap_err();
    assert_eq!((err.full, err.draining, err.unhealthy), (1, 1, 0));
    let unknown = PickRequest::new(Protocol::Http).pinned("gone", true);
    assert!(pool.acquire(&unknown).is_err());
}

#[test]
fn user_affinity_while_eligible_then_ttl() {
    let (pool, _) = pool(&[("a", 1, 2), ("b", 1, 9), ("c", 1, 9)]);
    let ann = ssh().user("ann");
    let g = pool.acquire(&ann).ok();
    assert_eq!(g.as_ref().map(|g| g.vm_name()), Some("a"));
    assert_eq!(name(pool.acquire(&ssh())), "b");
    assert_eq!(name(pool.acquire(&ssh())), "c");
    // ann goes back to a although others are as loaded.
    assert_eq!(name(pool.acquire(&ann)), "a");
    // a is full now: least loaded elsewhere, and affinity follows.
    assert_eq!(name(pool.acquire(&ann)), "b");
    assert_eq!(name(pool.acquire(&ann)), "b");
    drop(g);
}

#[test]
fn affinity_holds_within_ttl_after_last_session() {
    let (pool, clock) = pool(&[("a", 1, 9), ("b", 1, 9)]);
    let ann = ssh().user("ann");
    drop(pool.acquire(&ann)); // ann on a, then gone
    clock.advance(TTL);
    assert_eq!(name(pool.acquire(&ssh())), "a"); // a: 1, b: 0
    assert_eq!(name(pool.acquire(&ann)), "a");
}

#[test]
fn affinity_expires_after_ttl() {
    let (pool, clock) = pool(&[("a", 1, 9), ("b", 1, 9)]);
    let bob = ssh().user("bob");
    drop(pool.acquire(&bob)); // bob on a, then gone
    let _x = pool.acquire(&ssh()); // a: 1
    clock.advance(TTL + Duration::from_secs(1));
    assert_eq!(name(pool.acquire(&bob)), "b");
    // expire_idle forgets users past the TTL (none now: bob is live).
    assert_eq!(pool.expire_idle(), 0);
}

#[test]
fn affinity_off_means_least_loaded() {
    let clock = Arc::new(ManualClock::new());
    let pool = Pool::new(
        RoutingPolicy {
            user_affinity: false,
            ..policy()
        },
        clock,
    );
    pool.set_vms(vec![spec("a", 1, 9), spec("b", 1, 9)]);
    pool.set_health("a", Health::Up);
    pool.set_health("b", Health::Up);
    let ann = ssh().user("ann");
    assert_eq!(name(pool.acquire(&ann)), "a");
    assert_eq!(name(pool.acquire(&ann)), "b");
}

#[test]
fn a_new_policy_applies_to_the_next_pick() {
    let (pool, _) = pool(&[("a", 1, 9), ("b", 1, 9)]);
    let ann = ssh().user("ann");
    assert_eq!(name(pool.acquire(&ann)), "a");
    assert_eq!(name(pool.acquire(&ann)), "a"); // affinity
    pool.set_policy(RoutingPolicy {
        user_affinity: false,
        ..policy()
    });
    assert!(!pool.policy().user_affinity);
    assert_eq!(name(pool.acquire(&ann)), "b"); // least loaded now
}

#[test]
fn exclude_skips_tried_vms() {
    let (pool, _) = pool(&[("a", 1, 9), ("b", 1, 9)]);
    let tried = vec!["a".to_owned()];
    assert_eq!(name(pool.acquire(&ssh().excluding(&tried))), "b");
    let both = vec!["a".to_owned(), "b".to_owned()];
    let err = pool
        .acquire(&ssh().excluding(&both))
        .map(|_| ())
        .unwrap_err();
    assert_eq!(err.excluded, 2);
    assert!(err.to_string().ends_with("2 already tried"));
    // Excluded beats pinned and affinity too.
    let req = ssh().user("ann").pinned("a", true).excluding(&tried);
    assert_eq!(name(pool.acquire(&req)), "b");
}

#[test]
fn guards_count_per_protocol_and_record_idle_since() {
    let (pool, clock) = pool(&[("a", 1, 9)]);
    let t0 = clock.now();
    let w0 = clock.wall();
    let s = pool.acquire(&ssh().user("ann")).ok();
    let h = pool.acquire(&PickRequest::new(Protocol::Http)).ok();
    let snap = pool.snapshot();
    let a = snap.get("a").cloned();
    let Some(a) = a else { panic!("a missing") };
    assert_eq!(
        (a.sessions(Protocol::Ssh), a.sessions(Protocol::Http)),
        (1, 1)
    );
    assert_eq!(a.total_sessions(), 2);
    assert_eq!(a.idle_since(), None);
    let sessions = pool.sessions();
    assert_eq!(sessions.len(), 2);
    assert_eq!(sessions[0].user.as_deref(), Some("ann"));
    assert_eq!(sessions[0].vm, "a");
    if let Some(s) = &s {
        s.add_bytes_up(5);
        s.add_bytes_down(7);
    }
    assert_eq!(pool.sessions()[0].bytes_down, 7);
    clock.advance(Duration::from_secs(10));
    assert_eq!(pool.sessions()[0].started, w0);
    assert_eq!(
        s.as_ref().map(|s| (s.started(), s.started_at())),
        Some((w0, t0))
    );
    drop(s);
    assert_eq!(a.idle_since(), None);
    clock.advance(Duration::from_secs(10));
    drop(h);
    assert_eq!(a.idle_since(), Some(t0 + Duration::from_secs(20)));
    assert_eq!(a.total_sessions(), 0);
    assert_eq!(pool.session_count(), 0);
}

#[test]
fn set_vms_keeps_status_and_counters_of_staying_vms() {
    let (pool, _) = pool(&[("a", 1, 9), ("b", 1, 9)]);
    pool.drain("b");
    let g = pool.acquire(&ssh()).ok();
    let gen1 = pool.snapshot().generation();
    // Same set: no new snapshot.
    pool.set_vms(vec![spec("b", 1, 9), spec("a", 1, 9)]);
    assert_eq!(pool.snapshot().generation(), gen1);
    // a changes spec, b stays, c joins.
    pool.set_vms(vec![spec("a", 3, 9), spec("b", 1, 9), spec("c", 1, 9)]);
    let snap = pool.snapshot();
    assert_eq!(snap.generation(), gen1 + 1);
    let names: Vec<&str> = snap.vms().iter().map(|v| v.name()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    let a = snap
        .get("a")
        .map(|v| (v.spec().weight, v.total_sessions(), v.state()));
    assert_eq!(a, Some((3, 1, VmState::Healthy)));
    assert_eq!(snap.get("b").map(|v| v.state()), Some(VmState::Draining));
    assert_eq!(snap.get("c").map(|v| v.state()), Some(VmState::Starting));
    drop(g);
    assert_eq!(snap.get("a").map(|v| v.total_sessions()), Some(0));
}

#[test]
fn removed_vm_guards_keep_counting_and_come_back() {
    let (pool, _) = pool(&[("a", 1, 1), ("b", 1, 9), ("c", 1, 9)]);
    let g = pool.acquire(&ssh()).ok();
    assert_eq!(g.as_ref().map(|g| g.vm_name()), Some("a"));
    pool.drain("c");
    pool.set_vms(vec![spec("b", 1, 9)]);
    // c had no session: gone at once. a leaves: still seen, with its session, draining.
    let snap = pool.snapshot();
    assert!(snap.get("c").is_none());
    let a = snap.get("a").map(|v| (v.total_sessions(), v.state()));
    assert_eq!(a, Some((1, VmState::Draining)));
    assert!(leaving(&pool, "a") && !leaving(&pool, "c"));
    assert_eq!(pool.sessions().len(), 1);
    assert_eq!(
        g.as_ref().map(|g| g.spec().host.as_str()),
        Some("127.0.0.1")
    );
    // a returns while the guard lives: same counters, so it is full, and no longer draining
    // (it was not before it left); c, gone at once, returns as a new VM.
    pool.set_vms(vec![spec("a", 1, 1), spec("b", 1, 9), spec("c", 1, 9)]);
    pool.set_health("a", Health::Up);
    pool.set_health("c", Health::Up);
    assert!(!leaving(&pool, "a"));
    let snap = pool.snapshot();
    let a = snap.get("a").map(|v| (v.total_sessions(), v.state()));
    assert_eq!(a, Some((1, VmState::Healthy)));
    assert_eq!(snap.get("c").map(|v| v.state()), Some(VmState::Healthy));
    assert_eq!(name(pool.acquire(&ssh())), "b");
    drop(g);
    assert_eq!(
        pool.snapshot().get("a").map(|v| v.total_sessions()),
        Some(0)
    );
}

#[test]
fn a_removed_vm_with_sessions_takes_none_new_and_goes_when_they_end() {
    let (pool, _) = pool(&[("a", 1, 9), ("b", 1, 9)]);
    let g = pool.acquire(&ssh()).ok();
    assert_eq!(g.as_ref().map(|g| g.vm_name()), Some("a"));
    pool.set_vms(vec![spec("b", 1, 9)]);
    let generation = pool.snapshot().generation();
    // The same set again publishes nothing; the next session goes elsewhere.
    pool.set_vms(vec![spec("b", 1, 9)]);
    assert_eq!(pool.snapshot().generation(), generation);
    assert_eq!(name(pool.acquire(&ssh())), "b");
    // An operator's undrain does not open it while it leaves (it applies if it comes back).
    assert!(pool.undrain("a"));
    assert_eq!(
        pool.snapshot().get("a").map(|v| v.state()),
        Some(VmState::Draining)
    );
    assert!(pool.drop_departed().is_empty());
    drop(g);
    assert_eq!(pool.drop_departed(), ["a"]);
    assert!(pool.snapshot().get("a").is_none());
    assert!(!leaving(&pool, "a"));
    assert!(pool.drop_departed().is_empty());
}

#[test]
fn drains_while_leaving_apply_if_the_vm_comes_back() {
    let (pool, _) = pool(&[("a", 1, 9), ("b", 1, 9)]);
    let g = pool.acquire(&ssh()).ok();
    pool.set_vms(vec![spec("b", 1, 9)]);
    // Undrain then drain while leaving: the last word holds on return.
    assert!(pool.undrain("a"));
    assert!(pool.drain("a"));
    let st = pool.snapshot().get("a").map(|v| v.status());
    assert_eq!(st.map(|s| (s.draining, s.leaving)), Some((true, true)));
    pool.set_vms(vec![spec("a", 1, 9), spec("b", 1, 9)]);
    let st = pool.snapshot().get("a").map(|v| v.status());
    assert_eq!(st.map(|s| (s.draining, s.leaving)), Some((true, false)));
    drop(g);
}

#[test]
fn a_leaving_vm_takes_no_expired_browser_back_and_goes_when_down() {
    let (pool, clock) = pool(&[("a", 1, 9), ("b", 1, 9)]);
    let pinned_a = PickRequest::new(Protocol::Http).pinned("a", true);
    assert_eq!(
        pool.http_route("k1", &pinned_a)
            .map(|v| v.name().to_owned()),
        Ok("a".to_owned())
    );
    assert!(pool.http_touch("k2", "a", None));
    pool.set_vms(vec![spec("b", 1, 9)]);
    // k1 comes back within session_idle: it goes on where it is.
    let back = pool.http_route_session("k1", &pinned_a).expect("served");
    assert_eq!((back.vm.name(), back.continued), ("a", true));
    // k2's session lapsed: it starts elsewhere, not again on the leaving VM.
    clock.advance(policy().http_session_idle + Duration::from_secs(1));
    assert!(pool.http_touch("k1", "a", None));
    pool.expire_idle();
    let moved = pool.http_route_session("k2", &pinned_a).expect("served");
    assert_eq!((moved.vm.name(), moved.continued), ("b", false));
    // The leaving VM goes down: it goes, although k1 still holds its session there.
    assert!(pool.drop_departed().is_empty());
    pool.set_health("a", Health::Down);
    assert_eq!(pool.drop_departed(), ["a"]);
    assert_eq!(pool.http_session_vm("k1").as_deref(), Some("a"));
}

#[test]
fn a_tentative_browser_starts_no_session_on_a_leaving_vm() {
    let (pool, _) = pool(&[("a", 1, 9), ("b", 1, 9)]);
    let g = pool.acquire(&ssh()).ok();
    assert_eq!(g.as_ref().map(|g| g.vm_name()), Some("a"));
    let new = PickRequest::new(Protocol::Http).excluding(&[]);
    let pinned_a = PickRequest::new(Protocol::Http).pinned("a", true);
    // A new browser's first request goes to a (b made busier first).
    assert!(pool.http_touch("k0", "b", None));
    assert!(pool.http_touch("k1", "b", None));
    assert_eq!(
        pool.http_route_new("k", &new).map(|v| v.name().to_owned()),
        Ok("a".to_owned())
    );
    pool.set_vms(vec![spec("b", 1, 9)]);
    // Its cookie comes back while a leaves: its session starts on b.
    let routed = pool.http_route_session("k", &pinned_a).expect("served");
    assert_eq!((routed.vm.name(), routed.continued), ("b", false));
    drop(g);
}

#[test]
fn a_status_set_whole_neither_makes_nor_ends_leaving() {
    let (pool, _) = pool(&[("a", 1, 9)]);
    let mut st = pool.snapshot().get("a").map(|v| v.status()).expect("a");
    st.leaving = true;
    assert!(pool.set_status("a", st));
    assert!(!pool.snapshot().get("a").is_some_and(|v| v.status().leaving));
    // Removed without sessions: gone at once, not kept as leaving.
    pool.set_vms(Vec::new());
    assert!(pool.snapshot().get("a").is_none());
}

#[test]
fn duplicate_names_first_wins() {
    let (pool, _) = pool(&[]);
    pool.set_vms(vec![spec("a", 1, 9), spec("a", 5, 9)]);
    let snap = pool.snapshot();
    assert_eq!(snap.len(), 1);
    assert_eq!(snap.get("a").map(|v| v.spec().weight), Some(1));
}

#[test]
fn status_changes_publish_only_on_change() {
    let (pool, clock) = pool(&[("a", 1, 9)]);
    let g0 = pool.snapshot().generation();
    let since0 = pool.snapshot().get("a").map(|v| v.state_since());
    assert!(pool.set_health("a", Health::Up));
    assert_eq!(pool.snapshot().generation(), g0);
    clock.advance(Duration::from_secs(3));
    assert!(pool.drain("a"));
    let snap = pool.snapshot();
    assert_eq!(snap.generation(), g0 + 1);
    assert_ne!(snap.get("a").map(|v| v.state_since()), since0);
    assert_eq!(snap.count_in(VmState::Draining), 1);
    assert!(!pool.set_lifecycle("zz", Lifecycle::Stopped));
    let st = VmStatus {
        lifecycle: Lifecycle::Running,
        ssh: Health::Up,
        http: Health::Up,
        draining: false,
        leaving: false,
    };
    assert!(pool.set_status("a", st));
    assert_eq!(
        pool.snapshot().get("a").map(|v| v.state()),
        Some(VmState::Healthy)
    );
}

#[test]
fn pick_does_not_count() {
    let (pool, _) = pool(&[("a", 1, 9), ("b", 1, 9)]);
    let vm = pool.pick(&ssh()).map(|v| v.name().to_owned());
    assert_eq!(vm.as_deref(), Ok("a"));
    assert_eq!(pool.snapshot().total_sessions(), 0);
    assert_eq!(name(pool.acquire(&ssh())), "a");
    let vm = pool.pick(&ssh()).map(|v| v.name().to_owned());
    assert_eq!(vm.as_deref(), Ok("b"));
}

#[test]
fn each_protocol_goes_where_its_side_is_up() {
    let pool = Pool::new(policy(), Arc::new(ManualClock::new()));
    pool.set_vms(vec![spec("a", 1, 10), spec("b", 1, 10)]);
    // a: sshd up, web side down; b: the reverse.
    pool.set_protocol_health("a", Protocol::Ssh, Health::Up);
    pool.set_protocol_health("a", Protocol::Http, Health::Down);
    pool.set_protocol_health("b", Protocol::Ssh, Health::Down);
    pool.set_protocol_health("b", Protocol::Http, Health::Up);
    let snap = pool.snapshot();
    assert_eq!(snap.count_in(VmState::Healthy), 2);
    for _ in 0..3 {
        assert_eq!(name(pool.acquire(&ssh())), "a");
        assert_eq!(name(pool.acquire(&PickRequest::new(Protocol::Http))), "b");
    }
    // An SSH-only pool: the web side is never probed (unknown); SSH works.
    let only_ssh = Pool::new(policy(), Arc::new(ManualClock::new()));
    only_ssh.set_vms(vec![spec("a", 1, 10)]);
    only_ssh.set_protocol_health("a", Protocol::Ssh, Health::Up);
    assert_eq!(name(only_ssh.acquire(&ssh())), "a");
    let err = only_ssh
        .acquire(&PickRequest::new(Protocol::Http))
        .map(|_| ())
        .unwrap_err();
    assert_eq!(err.starting, 1, "{err}");
    // Down on the SSH side: the message names the side.
    only_ssh.set_protocol_health("a", Protocol::Ssh, Health::Down);
    let err = only_ssh.acquire(&ssh()).map(|_| ()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "no VM is available right now: 1 VM \u{2014} 1 unhealthy (SSH probe fails)"
    );
}

#[test]
fn a_vm_that_comes_up_is_idle_only_since_then() {
    let clock = Arc::new(ManualClock::new());
    let pool = Pool::new(policy(), clock.clone());
    pool.set_vms(vec![spec("a", 1, 10)]);
    pool.set_lifecycle("a", Lifecycle::Stopped);
    let listed = pool.snapshot().get("a").and_then(|v| v.idle_since());
    clock.advance(Duration::from_secs(3600));
    // Still stopped: nothing changes.
    pool.set_lifecycle("a", Lifecycle::Stopped);
    assert_eq!(
        pool.snapshot().get("a").and_then(|v| v.idle_since()),
        listed
    );
    pool.set_lifecycle("a", Lifecycle::Starting);
    clock.advance(Duration::from_secs(90));
    pool.set_lifecycle("a", Lifecycle::Running);
    let now = clock.now();
    assert_eq!(
        pool.snapshot().get("a").and_then(|v| v.idle_since()),
        Some(now)
    );
    // Running again (a repeated listing): the idle clock keeps running.
    clock.advance(Duration::from_secs(5));
    pool.set_lifecycle("a", Lifecycle::Running);
    assert_eq!(
        pool.snapshot().get("a").and_then(|v| v.idle_since()),
        Some(now)
    );
}

#[test]
fn change_listeners_hear_every_published_generation_after_it_is_visible() {
    let (pool, _clock) = pool(&[("a", 1, 5), ("b", 1, 5)]);
    let pool = Arc::new(pool);
    let heard = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (seen, reader) = (heard.clone(), Arc::downgrade(&pool));
    pool.on_change(move |generation| {
        // The snapshot of this generation is already what readers load.
        let visible = reader.upgrade().map(|p| p.snapshot().generation());
        assert_eq!(visible, Some(generation));
        seen.lock().unwrap().push(generation);
    });
    let g0 = pool.snapshot().generation();
    assert!(pool.drain("a"));
    assert!(pool.drain("a")); // no change: nothing published
    pool.set_vms(vec![spec("a", 1, 5)]);
    assert!(!pool.undrain("gone"));
    assert_eq!(*heard.lock().unwrap(), vec![g0 + 1, g0 + 2]);
}

fn remote(ssh: u32, http: u32) -> crate::LoadCounts {
    crate::LoadCounts {
        ssh,
        http,
        tentative: 0,
    }
}

#[test]
fn other_replicas_sessions_weigh_in_choice_cap_and_idleness() {
    let (pool, clock) = pool(&[("a", 1, 2), ("b", 1, 2)]);
    // Another replica holds one session on "a": the next one goes to "b".
    assert!(pool.set_remote_load("a", remote(1, 0)));
    assert!(!pool.set_remote_load("nope", remote(1, 0)));
    assert_eq!(name(pool.acquire(&ssh())), "b");
    let snap = pool.snapshot();
    let a = snap.get("a").expect("a");
    assert_eq!(a.sessions(Protocol::Ssh), 1);
    assert_eq!(a.local_sessions(Protocol::Ssh), 0);
    assert_eq!(a.remote_sessions(Protocol::Ssh), 1);
    assert_eq!(a.idle_since(), None, "remote sessions keep a VM busy");
    // Remote sessions count towards max_sessions: "a" has room for one more, "b" too.
    assert!(pool.set_remote_load("a", remote(1, 1)));
    let err = {
        let _b = pool.acquire(&ssh()).expect("b has room");
        pool.acquire(&ssh()).map(|_| ()).unwrap_err()
    };
    assert_eq!(err.full, 2, "{err}");
    // The other replica's sessions end: "a" becomes idle from then on.
    clock.advance(Duration::from_secs(5));
    let at = clock.now();
    assert!(pool.set_remote_load("a", remote(0, 0)));
    assert_eq!(
        pool.snapshot().get("a").and_then(|v| v.idle_since()),
        Some(at)
    );
}

#[test]
fn the_shared_affinity_hint_comes_before_the_local_store() {
    let (pool, _clock) = pool(&[("a", 1, 9), ("b", 1, 9)]);
    let first = pool.acquire(&ssh().user("ann")).expect("placed");
    assert_eq!(first.vm_name(), "a");
    // Another replica placed ann on "b" later: its answer wins.
    let again = pool
        .acquire(&ssh().user("ann").affinity_hint("b"))
        .expect("placed");
    assert_eq!(again.vm_name(), "b");
    // A hint naming a VM that cannot take the session falls back to least-loaded.
    assert!(pool.drain("b"));
    let third = pool
        .acquire(&ssh().user("ann").affinity_hint("b"))
        .expect("placed");
    assert_eq!(third.vm_name(), "a");
}

#[test]
fn a_named_vm_is_the_only_choice_and_says_why_it_cannot_take_a_session() {
    let (pool, _) = pool(&[("a", 1, 10), ("b", 1, 1), ("c", 1, 10)]);
    // Named: taken whatever the load or the user's affinity says.
    let first = pool.acquire(&ssh().user("alice")).expect("a place");
    assert_eq!(first.vm_name(), "a");
    assert_eq!(name(pool.acquire(&ssh().user("alice").only("c"))), "c");
    // b takes one session; named again, nothing else is chosen instead.
    assert_eq!(name(pool.acquire(&ssh().only("b"))), "b");
    assert!(pool.acquire(&ssh().only("b")).is_err());
    let snap = pool.snapshot();
    assert_eq!(
        snap.why_not("b", Protocol::Ssh).as_deref(),
        Some("b takes no new sessions: at its session limit")
    );
    assert_eq!(
        snap.why_not("z", Protocol::Ssh).as_deref(),
        Some("no VM z in the pool (its VMs: a, b, c)")
    );
    assert_eq!(snap.why_not("a", Protocol::Ssh), None);
    assert!(pool.acquire(&ssh().only("z")).is_err());
    assert!(pool.drain("c"));
    assert!(pool.acquire(&ssh().only("c")).is_err());
    assert_eq!(
        pool.snapshot().why_not("c", Protocol::Ssh).as_deref(),
        Some("c takes no new sessions: draining")
    );
    assert!(pool.set_health("a", Health::Down));
    assert_eq!(
        pool.snapshot().why_not("a", Protocol::Ssh).as_deref(),
        Some("a takes no new sessions: its SSH probe fails")
    );
}

/// `per_thread` sessions placed by each of `threads` threads released together by a barrier,
/// as `req` asks.
fn placed_at_once(
    pool: &Pool,
    threads: usize,
    per_thread: usize,
    req: &PickRequest<'_>,
) -> Vec<SessionGuard> {
    let barrier = std::sync::Barrier::new(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    (0..per_thread)
                        .map(|_| pool.acquire(req).expect("a place"))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("thread"))
            .collect()
    })
}

#[test]
fn sessions_placed_at_once_from_many_threads_spread_exactly() {
    // Twenty people at 9:00, many times over: logins placed at the same moment from several
    // threads see each other's sessions, so the least-loaded choice stays exact, not only the
    // limit.
    for round in 0..50 {
        let (pool, _) = pool(&[("a", 1, 100), ("b", 1, 100), ("c", 1, 100)]);
        let guards = placed_at_once(&pool, 6, 10, &ssh());
        let per_vm: Vec<u32> = ["a", "b", "c"]
            .iter()
            .map(|vm| pool.snapshot().get(vm).map_or(0, |v| v.total_sessions()))
            .collect();
        assert_eq!(per_vm, vec![20, 20, 20], "round {round}: {per_vm:?}");
        drop(guards);
    }
}

#[test]
fn one_users_sessions_placed_at_once_share_one_vm() {
    // VS Code opens several connections at once: placed together from several threads, they
    // land on one VM, the first one's, by affinity.
    for round in 0..50 {
        let (pool, _) = pool(&[("a", 1, 100), ("b", 1, 100), ("c", 1, 100)]);
        let guards = placed_at_once(&pool, 4, 1, &ssh().user("alice"));
        let vms: std::collections::BTreeSet<&str> = guards.iter().map(|g| g.vm_name()).collect();
        assert_eq!(vms.len(), 1, "round {round}: {vms:?}");
    }
}

#[test]
fn room_below_counts_a_vm_with_that_many_sessions_as_full_for_that_request() {
    let (pool, _) = pool(&[("a", 1, 10)]);
    let held = ssh().room_below(2);
    assert_eq!(name(pool.acquire(&held)), "a");
    assert_eq!(name(pool.acquire(&held)), "a");
    let err = pool.acquire(&held).map(|_| ()).unwrap_err();
    assert_eq!((err.full, err.starting), (1, 0), "{err}");
    // Without it the VM's own limit stands.
    assert_eq!(name(pool.acquire(&ssh())), "a");
}
