//! Session accounting under real threads: counts return to zero when every
//! guard drops, and `max_sessions` is never exceeded, whatever the
//! interleaving of acquires, drops, HTTP sessions and pool changes.

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use proptest::prelude::*;
use router_core::{
    Health, InMemoryStore, ManualClock, PickRequest, Pool, Protocol, RoutingPolicy, SessionGuard,
    VmSpec,
};

const IDLE: Duration = Duration::from_secs(60);

fn specs(caps: &[u32]) -> Vec<VmSpec> {
    caps.iter()
        .enumerate()
        .map(|(i, &cap)| VmSpec {
            weight: 1 + (i as u32 % 3),
            max_sessions: cap,
            ..VmSpec::new(format!("vm-{i}"), "127.0.0.1")
        })
        .collect()
}

fn pool(caps: &[u32]) -> (Arc<Pool>, Arc<ManualClock>, Arc<InMemoryStore>) {
    let clock = Arc::new(ManualClock::new());
    let store = Arc::new(InMemoryStore::new());
    let policy = RoutingPolicy {
        user_affinity: true,
        affinity_ttl: Duration::from_secs(600),
        http_session_idle: IDLE,
        http_tentative_for: Duration::from_secs(10),
    };
    let pool = Arc::new(Pool::with_store(policy, clock.clone(), store.clone()));
    pool.set_vms(specs(caps));
    for i in 0..caps.len() {
        pool.set_health(&format!("vm-{i}"), Health::Up);
    }
    (pool, clock, store)
}

/// Checks that no VM in the current snapshot holds more than its cap.
fn within_caps(pool: &Pool) -> bool {
    pool.snapshot()
        .vms()
        .iter()
        .all(|vm| vm.total_sessions() <= vm.spec().max_sessions)
}

/// One worker: a deterministic mix of operations from `seed`.
fn worker(pool: &Pool, seed: u64, ops: usize, n_vms: usize, user: &str) -> Result<(), String> {
    let mut held: Vec<SessionGuard> = Vec::new();
    let mut x = seed | 1;
    let mut next = move || {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..ops {
        let r = next();
        let vm = format!("vm-{}", (r >> 8) as usize % n_vms.max(1));
        match r % 8 {
            0..=2 => {
                let req = PickRequest::new(if r & 1 << 20 == 0 {
                    Protocol::Ssh
                } else {
                    Protocol::Http
                })
                .user(user);
                if let Ok(g) = pool.acquire(&req) {
                    if g.vm().total_sessions() > g.spec().max_sessions {
                        return Err(format!("{} over its cap", g.vm_name()));
                    }
                    held.push(g);
                }
            }
            3 => {
                let req = PickRequest::new(Protocol::Http).pinned(&vm, true);
                if let Ok(g) = pool.acquire(&req) {
                    held.push(g);
                }
            }
            4 => {
                if !held.is_empty() {
                    let i = (r >> 16) as usize % held.len();
                    held.swap_remove(i);
                }
            }
            5 => {
                let key = format!("{user}-{}", (r >> 24) % 4);
                pool.http_touch(&key, &vm, Some(user));
            }
            6 => {
                let key = format!("{user}-{}", (r >> 24) % 4);
                let req = PickRequest::new(Protocol::Http)
                    .user(user)
                    .pinned(&vm, true);
                let _ = pool.http_route(&key, &req);
            }
            _ => {
                // Flip health or draining of a VM.
                if r & 1 << 30 == 0 {
                    pool.drain(&vm);
                    pool.undrain(&vm);
                } else {
                    pool.set_health(&vm, Health::Down);
                    pool.set_health(&vm, Health::Up);
                }
            }
        }
        if !within_caps(pool) {
            return Err("a VM is over its cap".to_owned());
        }
    }
    Ok(())
}

fn run_threads(caps: &[u32], threads: usize, ops: usize, seed: u64, reshuffle: bool) {
    let (pool, clock, store) = pool(caps);
    let barrier = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let pool = pool.clone();
            let barrier = barrier.clone();
            let n = caps.len();
            thread::spawn(move || {
                barrier.wait();
                worker(
                    &pool,
                    seed.wrapping_add(t as u64 * 7919),
                    ops,
                    n,
                    &format!("u{t}"),
                )
            })
        })
        .collect();
    barrier.wait();
    // Meanwhile, the pool itself changes: a VM leaves and comes back.
    if reshuffle && !caps.is_empty() {
        for _ in 0..20 {
            pool.set_vms(specs(caps).into_iter().skip(1).collect());
            pool.set_vms(specs(caps));
            pool.set_health("vm-0", Health::Up);
        }
    }
    for h in handles {
        let res = h.join().map_err(|_| "worker panicked".to_owned());
        assert_eq!(res.and_then(|r| r), Ok(()));
    }
    // Every guard of every worker has dropped; only held HTTP sessions
    // remain, and they expire.
    clock.advance(IDLE + Duration::from_secs(1));
    pool.expire_idle();
    let snap = pool.snapshot();
    for vm in snap.vms() {
        assert_eq!(vm.total_sessions(), 0, "{}", vm.name());
        assert_eq!(vm.sessions(Protocol::Ssh), 0, "{}", vm.name());
        assert_eq!(vm.sessions(Protocol::Http), 0, "{}", vm.name());
        assert!(vm.idle_since().is_some());
    }
    assert_eq!(pool.sessions(), vec![]);
    assert_eq!(pool.http_session_count(), 0);
    for t in 0..threads {
        assert_eq!(store.live_sessions(&format!("u{t}")), 0);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Counts return to zero (per VM, per protocol, per user) when all
    /// guards drop, after many threads raced acquires, drops, HTTP
    /// sessions and status changes; no VM ever exceeded its cap.
    #[test]
    fn counts_return_to_zero_from_many_threads(
        caps in prop::collection::vec(0u32..6, 1..6),
        threads in 2usize..6,
        ops in 50usize..400,
        seed in any::<u64>(),
        reshuffle in any::<bool>(),
    ) {
        run_threads(&caps, threads, ops, seed, reshuffle);
    }

    /// Many threads racing for a few slots: every VM's live count stays at or
    /// below its cap, and exactly `sum(caps)` guards can be held at once.
    #[test]
    fn never_exceed_max_sessions(
        caps in prop::collection::vec(0u32..4, 1..5),
        threads in 2usize..8,
    ) {
        let (pool, _, _) = pool(&caps);
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads).map(|t| {
            let pool = pool.clone();
            let barrier = barrier.clone();
            thread::spawn(move || {
                barrier.wait();
                let mut held = Vec::new();
                for i in 0..50 {
                    let req = if i % 2 == 0 {
                        PickRequest::new(Protocol::Ssh)
                    } else {
                        PickRequest::new(Protocol::Http).pinned("vm-0", true)
                    };
                    if let Ok(g) = pool.acquire(&req) {
                        held.push(g);
                    }
                    if i % 7 == t % 7 && !held.is_empty() {
                        held.remove(0);
                    }
                }
                held
            })
        }).collect();
        let mut all: Vec<SessionGuard> = Vec::new();
        for h in handles {
            match h.join() {
                Ok(held) => all.extend(held),
                Err(_) => prop_assert!(false, "worker panicked"),
            }
        }
        prop_assert!(within_caps(&pool));
        for (i, cap) in caps.iter().enumerate() {
            let on = all.iter().filter(|g| g.vm_name() == format!("vm-{i}")).count();
            prop_assert!(on <= *cap as usize);
        }
        // Top up: the pool then holds exactly its capacity, no more.
        while let Ok(g) = pool.acquire(&PickRequest::new(Protocol::Ssh)) {
            all.push(g);
        }
        let weighted_caps: u32 = caps.iter().sum();
        prop_assert_eq!(all.len(), weighted_caps as usize);
        drop(all);
        prop_assert_eq!(pool.snapshot().total_sessions(), 0);
    }
}

/// A heavier fixed run (8 threads × 5 000 ops) beside the property cases.
#[test]
fn heavy_churn_returns_to_zero() {
    run_threads(&[3, 5, 1, 8, 2], 8, 5_000, 0x5eed, true);
}
