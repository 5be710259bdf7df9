//! router-core micro-benchmarks, each beside the naive `Mutex<HashMap>`
//! baseline ([`poolgate_benches::NaivePool`]) in the same run.
//!
//! - `pick/{impl}/{n}`: choose a VM among `n` (no counting).
//! - `acquire_drop/{impl}/{n}`: place a session (guard) and drop it.
//! - `churn_2_threads/{impl}/{case}`: two threads acquiring and dropping
//!   guards as fast as they can, over 100 VMs: `least_loaded` (full pick,
//!   64 users per thread with affinity) and `pinned` (each thread's browser
//!   pinned to its own VM: guard accounting alone). Time is per iteration,
//!   in which each thread does one acquire + drop (so two sessions placed
//!   and released per iteration).
//!
//! Run: `cargo bench -p poolgate-benches --bench router` (short measurement
//! times are set below; criterion's `--measurement-time` etc. override them).

use std::hint::black_box;
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use poolgate_benches::{NaivePool, fixture, poolgate_pool};
use router_core::{PickRequest, Protocol};

const SIZES: [usize; 4] = [10, 100, 1_000, 10_000];

fn pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    for n in SIZES {
        let vms = fixture(n);
        let (pool, _held) = poolgate_pool(&vms);
        let naive = NaivePool::new(&vms);
        let req = PickRequest::new(Protocol::Ssh);
        group.bench_function(BenchmarkId::new("poolgate", n), |b| {
            b.iter(|| black_box(pool.pick(black_box(&req)).is_ok()))
        });
        group.bench_function(BenchmarkId::new("naive", n), |b| {
            b.iter(|| black_box(naive.pick(black_box(None)).is_some()))
        });
    }
    group.finish();
}

fn acquire_drop(c: &mut Criterion) {
    let mut group = c.benchmark_group("acquire_drop");
    for n in SIZES {
        let vms = fixture(n);
        let (pool, _held) = poolgate_pool(&vms);
        let naive = NaivePool::new(&vms);
        let req = PickRequest::new(Protocol::Ssh);
        group.bench_function(BenchmarkId::new("poolgate", n), |b| {
            b.iter(|| drop(black_box(pool.acquire(black_box(&req)))))
        });
        group.bench_function(BenchmarkId::new("naive", n), |b| {
            b.iter(|| drop(black_box(naive.acquire(Protocol::Ssh, None, None))))
        });
    }
    group.finish();
}

/// Runs `op(thread, i)` `iters` times on each of two threads started
/// together; returns the wall time of the slower one.
fn two_threads(iters: u64, op: &(dyn Fn(usize, u64) + Sync)) -> Duration {
    let barrier = Barrier::new(3);
    thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|t| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    for i in 0..iters {
                        op(t, i);
                    }
                    barrier.wait();
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        barrier.wait();
        let elapsed = start.elapsed();
        for h in handles {
            let _ = h.join();
        }
        elapsed
    })
}

fn churn_2_threads(c: &mut Criterion) {
    let mut group = c.benchmark_group("churn_2_threads");
    group.throughput(Throughput::Elements(2));
    // Waking two threads costs up to milliseconds on a busy machine: make
    // every sample long enough (flat sampling, >= 100 ms each) that this
    // never dominates.
    group
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(10);
    let vms = fixture(100);
    let (pool, _held) = poolgate_pool(&vms);
    let naive = NaivePool::new(&vms);
    let users: Vec<Vec<String>> = (0..2)
        .map(|t| (0..64).map(|u| format!("user-{t}-{u}")).collect())
        .collect();
    let user = |t: usize, i: u64| users[t][(i % 64) as usize].as_str();
    // dsvm-00000 and dsvm-00002: healthy, not draining in the fixture.
    let pins = ["dsvm-00000", "dsvm-00002"];

    group.bench_function(BenchmarkId::new("poolgate", "least_loaded"), |b| {
        b.iter_custom(|iters| {
            two_threads(iters, &|t, i| {
                let req = PickRequest::new(Protocol::Ssh).user(user(t, i));
                drop(black_box(pool.acquire(&req)));
            })
        })
    });
    group.bench_function(BenchmarkId::new("naive", "least_loaded"), |b| {
        b.iter_custom(|iters| {
            two_threads(iters, &|t, i| {
                drop(black_box(naive.acquire(
                    Protocol::Ssh,
                    Some(user(t, i)),
                    None,
                )));
            })
        })
    });
    group.bench_function(BenchmarkId::new("poolgate", "pinned"), |b| {
        b.iter_custom(|iters| {
            two_threads(iters, &|t, i| {
                let req = PickRequest::new(Protocol::Http)
                    .user(user(t, i))
                    .pinned(pins[t], true);
                drop(black_box(pool.acquire(&req)));
            })
        })
    });
    group.bench_function(BenchmarkId::new("naive", "pinned"), |b| {
        b.iter_custom(|iters| {
            two_threads(iters, &|t, i| {
                drop(black_box(naive.acquire(
                    Protocol::Http,
                    Some(user(t, i)),
                    Some(pins[t]),
                )));
            })
        })
    });
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20)
}

criterion_group! {
    name = benches;
    config = config();
    targets = pick, acquire_drop, churn_2_threads
}
criterion_main!(benches);
