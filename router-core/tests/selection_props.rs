//! Property tests of selection against a model: never an ineligible VM,
//! pinned then affinity then least loaded, affinity honoured while eligible,
//! weights respected in the long run.

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use router_core::{
    Clock, Health, InMemoryStore, Lifecycle, ManualClock, PickRequest, Pool, Protocol,
    RoutingPolicy, SessionGuard, SessionStore, Vm, VmSpec, VmStatus,
};

const TTL: Duration = Duration::from_secs(600);

#[derive(Debug, Clone)]
struct VmCase {
    lifecycle: Lifecycle,
    /// The SSH side's health.
    health: Health,
    /// The web side's health.
    http_health: Health,
    draining: bool,
    weight: u32,
    max_sessions: u32,
    preload: u32,
    hint: Option<f64>,
}

fn lifecycle() -> impl Strategy<Value = Lifecycle> {
    prop_oneof![
        1 => Just(Lifecycle::Starting),
        4 => Just(Lifecycle::Running),
        1 => Just(Lifecycle::Stopping),
        1 => Just(Lifecycle::Stopped),
    ]
}

fn health() -> impl Strategy<Value = Health> {
    prop_oneof![1 => Just(Health::Unknown), 4 => Just(Health::Up), 1 => Just(Health::Down)]
}

fn vm_case() -> impl Strategy<Value = VmCase> {
    (
        lifecycle(),
        (health(), health()),
        prop::bool::weighted(0.2),
        0u32..4,
        0u32..6,
        0u32..7,
        prop_oneof![Just(None), Just(Some(0.1)), Just(Some(0.5))],
    )
        .prop_map(
            |(lifecycle, (health, http_health), draining, weight, max_sessions, preload, hint)| {
                VmCase {
                    lifecycle,
                    health,
                    http_health,
                    draining,
                    weight,
                    max_sessions,
                    preload,
                    hint,
                }
            },
        )
}

fn name(i: usize) -> String {
    format!("vm-{i:02}")
}

struct Built {
    pool: Pool,
    store: Arc<InMemoryStore>,
    clock: Arc<ManualClock>,
}

fn build(cases: &[VmCase]) -> Built {
    let clock = Arc::new(ManualClock::new());
    let store = Arc::new(InMemoryStore::new());
    let policy = RoutingPolicy {
        user_affinity: true,
        affinity_ttl: TTL,
        http_session_idle: Duration::from_secs(60),
        http_tentative_for: Duration::from_secs(10),
    };
    let pool = Pool::with_store(policy, clock.clone(), store.clone());
    pool.set_vms(
        cases
            .iter()
            .enumerate()
            .map(|(i, c)| VmSpec {
                weight: c.weight,
                max_sessions: c.max_sessions,
                ..VmSpec::new(name(i), "127.0.0.1")
            })
            .collect(),
    );
    for (i, c) in cases.iter().enumerate() {
        // Preload through held HTTP sessions (they ignore health).
        for k in 0..c.preload {
            pool.http_touch(&format!("{i}-{k}"), &name(i), None);
        }
        pool.set_status(
            &name(i),
            VmStatus {
                lifecycle: c.lifecycle,
                ssh: c.health,
                http: c.http_health,
                draining: c.draining,
                leaving: false,
            },
        );
        pool.set_load_hint(&name(i), c.hint);
    }
    Built { pool, store, clock }
}

/// The model of "may take this new session".
fn admits(vm: &Vm, req: &PickRequest<'_>, pinned: bool) -> bool {
    let s = vm.status();
    let health = match req.protocol {
        Protocol::Ssh => s.ssh,
        Protocol::Http => s.http,
    };
    let serving = s.lifecycle == Lifecycle::Running && health == Health::Up;
    let state_ok = (serving && !s.draining) || (pinned && req.keep_draining && serving);
    let cap = if vm.spec().weight == 0 {
        0
    } else {
        vm.spec().max_sessions
    };
    state_ok && vm.total_sessions() < cap && !req.exclude.iter().any(|e| e == vm.name())
}

/// The model's choice: pinned, affinity, then min by (ratio, hint, name).
fn expected(pool: &Pool, req: &PickRequest<'_>, affinity: Option<&str>) -> Option<String> {
    let snap = pool.snapshot();
    if let Some(vm) = req.pinned_vm.and_then(|p| snap.get(p))
        && admits(vm, req, true)
    {
        return Some(vm.name().to_owned());
    }
    if let Some(vm) = affinity.and_then(|a| snap.get(a))
        && admits(vm, req, false)
    {
        return Some(vm.name().to_owned());
    }
    let key = |vm: &Vm| {
        (
            // Exact rational compare via a common scale (weights < 4).
            u64::from(vm.total_sessions()) * 12 / u64::from(vm.spec().weight),
            vm.load_hint().map_or(u64::MAX, |h| (h * 1000.0) as u64),
            vm.name().to_owned(),
        )
    };
    snap.vms()
        .iter()
        .filter(|vm| admits(vm, req, false))
        .min_by_key(|vm| key(vm))
        .map(|vm| vm.name().to_owned())
}

#[derive(Debug, Clone)]
struct Req {
    http: bool,
    user: Option<usize>,
    affinity_vm: Option<usize>,
    pinned: Option<usize>,
    keep_draining: bool,
    exclude: Vec<usize>,
}

fn req_case(n: usize) -> impl Strategy<Value = Req> {
    (
        any::<bool>(),
        prop::option::of(0usize..3),
        prop::option::of(0..n + 1),
        prop::option::of(0..n + 1),
        any::<bool>(),
        prop::collection::vec(0..n + 1, 0..3),
    )
        .prop_map(
            |(http, user, affinity_vm, pinned, keep_draining, exclude)| Req {
                http,
                user,
                affinity_vm,
                pinned,
                keep_draining,
                exclude,
            },
        )
}

fn pool_and_requests() -> impl Strategy<Value = (Vec<VmCase>, Vec<Req>)> {
    prop::collection::vec(vm_case(), 0..10).prop_flat_map(|vms| {
        let n = vms.len();
        (Just(vms), prop::collection::vec(req_case(n), 1..20))
    })
}

proptest! {
    /// Every acquire matches the model: an eligible VM in the documented
    /// order, or an error exactly when the model finds none; the error's
    /// tally covers every VM once; `max_sessions` is never exceeded.
    #[test]
    fn acquire_matches_model((cases, reqs) in pool_and_requests()) {
        let b = build(&cases);
        let users = ["ann", "bob", "cy"];
        let mut held: Vec<SessionGuard> = Vec::new();
        for r in &reqs {
            let user = r.user.map(|u| users[u]);
            if let (Some(u), Some(v)) = (user, r.affinity_vm) {
                // Point the user's affinity somewhere (maybe a VM that does
                // not exist).
                b.store.session_started(u, &name(v), b.clock.now());
                b.store.session_ended(u, &name(v), b.clock.now());
            }
            let pinned = r.pinned.map(name);
            let exclude: Vec<String> = r.exclude.iter().copied().map(name).collect();
            let req = PickRequest {
                protocol: if r.http { Protocol::Http } else { Protocol::Ssh },
                user,
                pinned_vm: pinned.as_deref(),
                exclude: &exclude,
                keep_draining: r.keep_draining,
                affinity_hint: None,
                only: None,
                room_below: None,
                stay_pinned: false,
            };
            let affinity = user.and_then(|u| b.store.affinity(u, b.clock.now(), TTL));
            let want = expected(&b.pool, &req, affinity.as_deref());
            match b.pool.acquire(&req) {
                Ok(g) => {
                    prop_assert_eq!(Some(g.vm_name().to_owned()), want);
                    prop_assert!(g.vm().total_sessions() <= g.spec().max_sessions);
                    prop_assert!(g.spec().weight > 0);
                    held.push(g);
                }
                Err(e) => {
                    prop_assert_eq!(want, None);
                    let tally = e.unhealthy + e.draining + e.full + e.starting
                        + e.stopped + e.excluded;
                    prop_assert_eq!(tally, e.total);
                    prop_assert_eq!(e.total, cases.len());
                    prop_assert!(!e.to_string().is_empty());
                }
            }
        }
        // pick() agrees with acquire() on the very next choice.
        let req = PickRequest::new(Protocol::Ssh);
        let picked = b.pool.pick(&req).map(|v| v.name().to_owned()).ok();
        let acquired = b.pool.acquire(&req).map(|g| g.vm_name().to_owned()).ok();
        prop_assert_eq!(picked, acquired);
    }

    /// Acquire-only load converges to the weights: the last session placed
    /// on any VM went to a least-loaded one, so
    /// `(c_i - 1) / w_i <= c_j / w_j` for every pair.
    #[test]
    fn weights_respected_in_the_long_run(
        weights in prop::collection::vec(1u32..6, 1..8),
        k in 0usize..200,
    ) {
        let cases: Vec<VmCase> = weights.iter().map(|&w| VmCase {
            lifecycle: Lifecycle::Running,
            health: Health::Up,
            http_health: Health::Up,
            draining: false,
            weight: w,
            max_sessions: 1000,
            preload: 0,
            hint: None,
        }).collect();
        let b = build(&cases);
        let guards: Vec<SessionGuard> = (0..k)
            .filter_map(|_| b.pool.acquire(&PickRequest::new(Protocol::Ssh)).ok())
            .collect();
        prop_assert_eq!(guards.len(), k);
        let snap = b.pool.snapshot();
        let c: Vec<u64> = snap.vms().iter().map(|v| u64::from(v.total_sessions())).collect();
        let w: Vec<u64> = weights.iter().map(|&w| u64::from(w)).collect();
        for i in 0..c.len() {
            for j in 0..c.len() {
                if c[i] > 0 {
                    prop_assert!((c[i] - 1) * w[j] <= c[j] * w[i], "c={:?} w={:?}", c, w);
                }
            }
        }
        let total_w: u64 = w.iter().sum();
        for i in 0..c.len() {
            // Within one session per VM of the exact share.
            let share = (k as u64 * w[i]) as f64 / total_w as f64;
            prop_assert!((c[i] as f64 - share).abs() <= c.len() as f64, "c={:?} w={:?}", c, w);
        }
    }

    /// A user goes back to the VM of their latest session while it is
    /// eligible and the affinity is valid (live sessions, or seen within the
    /// TTL), whatever happens to other VMs in between.
    #[test]
    fn affinity_honoured_while_eligible(ops in prop::collection::vec((0u8..6, 0usize..4), 1..60)) {
        let cases: Vec<VmCase> = (0..4).map(|i| VmCase {
            lifecycle: Lifecycle::Running,
            health: Health::Up,
            http_health: Health::Up,
            draining: false,
            weight: 1 + i as u32 % 2,
            max_sessions: 3,
            preload: 0,
            hint: None,
        }).collect();
        let b = build(&cases);
        let ann = PickRequest::new(Protocol::Ssh).user("ann");
        let mut mine: Vec<SessionGuard> = Vec::new();
        let mut others: Vec<SessionGuard> = Vec::new();
        // Model: ann's latest VM, live count and last seen.
        let mut last: Option<(String, usize, std::time::Instant)> = None;
        for (op, vm) in ops {
            match op {
                0 => {
                    let now = b.clock.now();
                    let valid = last.as_ref().filter(|(_, live, seen)| {
                        *live > 0 || now.duration_since(*seen) <= TTL
                    });
                    let target = valid.and_then(|(v, _, _)| b.pool.snapshot().get(v).cloned());
                    let expect_same = target.filter(|t| t.accepts_new_sessions(Protocol::Ssh));
                    if let Ok(g) = b.pool.acquire(&ann) {
                        if let Some(t) = expect_same {
                            prop_assert_eq!(g.vm_name(), t.name());
                        }
                        let live = last.as_ref().map_or(0, |l| l.1) + 1;
                        last = Some((g.vm_name().to_owned(), live, now));
                        mine.push(g);
                    } else {
                        prop_assert!(expect_same.is_none());
                    }
                }
                1 => {
                    if !mine.is_empty() {
                        mine.remove(vm % mine.len());
                        if let Some(l) = last.as_mut() {
                            l.1 -= 1;
                            l.2 = b.clock.now();
                        }
                    }
                }
                2 => {
                    if let Ok(g) = b.pool.acquire(&PickRequest::new(Protocol::Ssh)) {
                        others.push(g);
                    }
                }
                3 => { others.pop(); }
                4 => {
                    let s = b.pool.snapshot();
                    let healthy = s.get(&name(vm)).is_some_and(|v| v.status().ssh == Health::Up);
                    b.pool.set_health(&name(vm), if healthy { Health::Down } else { Health::Up });
                }
                _ => b.clock.advance(TTL / 3),
            }
        }
    }
}
