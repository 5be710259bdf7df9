//! poolgate benchmark support: the pool fixtures shared by the criterion
//! benchmarks, the naive baseline they are compared against, and [`run_main`]
//! for the measurement clients of the end-to-end harness (`src/bin`).
//!
//! The baseline, [`NaivePool`], is what one would write first: the whole
//! pool — VM counters, the live-session registry and user affinity — in
//! `HashMap`s behind one `Mutex`, with the same selection rules as
//! router-core (eligible, least loaded by `sessions / weight`, ties by
//! name, user affinity) so both do the same work.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use router_core::{
    Health, PickRequest, Pool, Protocol, RoutingPolicy, SessionGuard, SystemClock, VmSpec,
};

/// Serves every connection `listener` accepts (`TCP_NODELAY` set) with `handle`, each on a
/// task of its own, for the upstreams and proxies of the end-to-end harness; errors go to
/// stderr prefixed with the tool's name. An accept error (out of file descriptors, typically)
/// does not stop it: the connections it has are kept, and it tries again after 50 ms.
pub async fn serve_connections<F, Fut>(
    tool: &'static str,
    listener: tokio::net::TcpListener,
    handle: F,
) -> !
where
    F: Fn(tokio::net::TcpStream) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                eprintln!("{tool}: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let connection = handle(stream);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                eprintln!("{tool}: connection: {e:#}");
            }
        });
    }
}

/// Runs `work` on a current-thread tokio runtime as the body of `main` of the
/// measurement client `tool`: errors go to stderr prefixed with the tool's
/// name, and the exit code is 0 or 1.
pub fn run_main(
    tool: &str,
    work: impl std::future::Future<Output = anyhow::Result<()>>,
) -> std::process::ExitCode {
    run_on(tool, tokio::runtime::Builder::new_current_thread(), work)
}

/// [`run_main`] on the gateway's runtime: multi-threaded, a worker per CPU the
/// process may run on (one when pinned, as in the benchmarks).
pub fn run_main_multi_thread(
    tool: &str,
    work: impl std::future::Future<Output = anyhow::Result<()>>,
) -> std::process::ExitCode {
    run_on(tool, tokio::runtime::Builder::new_multi_thread(), work)
}

fn run_on(
    tool: &str,
    mut builder: tokio::runtime::Builder,
    work: impl std::future::Future<Output = anyhow::Result<()>>,
) -> std::process::ExitCode {
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{tool}: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{tool}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// One VM of a benchmark fixture.
#[derive(Debug, Clone)]
pub struct FixtureVm {
    /// Name, host, ports, weight, cap.
    pub spec: VmSpec,
    /// Probed up (else down).
    pub healthy: bool,
    /// Draining.
    pub draining: bool,
    /// Sessions held on it before measuring.
    pub preload: u32,
}

/// `n` VMs in a realistic mix: weights 1–2, caps 40, one in ten unhealthy,
/// one in twenty draining, 0–4 sessions each already placed. Deterministic.
pub fn fixture(n: usize) -> Vec<FixtureVm> {
    (0..n)
        .map(|i| FixtureVm {
            spec: VmSpec {
                weight: 1 + (i % 2) as u32,
                max_sessions: 40,
                ..VmSpec::new(
                    format!("dsvm-{i:05}"),
                    format!("10.0.{}.{}", i / 250, i % 250),
                )
            },
            healthy: i % 10 != 3,
            draining: i % 20 == 7,
            preload: ((i * 7) % 5) as u32,
        })
        .collect()
}

/// A router-core pool holding the fixture's state, and the guards that hold
/// the preloaded sessions (keep them alive while measuring).
pub fn poolgate_pool(vms: &[FixtureVm]) -> (Arc<Pool>, Vec<SessionGuard>) {
    let pool = Arc::new(Pool::new(RoutingPolicy::default(), Arc::new(SystemClock)));
    pool.set_vms(vms.iter().map(|v| v.spec.clone()).collect());
    let mut held = Vec::new();
    for v in vms {
        pool.set_health(&v.spec.name, Health::Up);
        for _ in 0..v.preload {
            let req = PickRequest::new(Protocol::Ssh).pinned(&v.spec.name, false);
            if let Ok(g) = pool.acquire(&req) {
                held.push(g);
            }
        }
        if !v.healthy {
            pool.set_health(&v.spec.name, Health::Down);
        }
        if v.draining {
            pool.drain(&v.spec.name);
        }
    }
    (pool, held)
}

#[derive(Debug)]
struct NaiveVm {
    weight: u32,
    max_sessions: u32,
    healthy: bool,
    draining: bool,
    ssh: u32,
    http: u32,
}

impl NaiveVm {
    fn total(&self) -> u32 {
        self.ssh + self.http
    }

    fn eligible(&self) -> bool {
        self.healthy && !self.draining && self.weight > 0 && self.total() < self.max_sessions
    }
}

#[derive(Debug)]
struct NaiveSession {
    vm: String,
    protocol: Protocol,
    user: Option<String>,
}

#[derive(Debug, Default)]
struct NaiveInner {
    vms: HashMap<String, NaiveVm>,
    sessions: HashMap<u64, NaiveSession>,
    /// user -> (latest vm, live sessions)
    users: HashMap<String, (String, u32)>,
    next_id: u64,
}

impl NaiveInner {
    fn choose(&self, user: Option<&str>, pinned: Option<&str>) -> Option<String> {
        if let Some(p) = pinned
            && self.vms.get(p).is_some_and(NaiveVm::eligible)
        {
            return Some(p.to_owned());
        }
        if let Some((vm, _)) = user.and_then(|u| self.users.get(u))
            && self.vms.get(vm).is_some_and(NaiveVm::eligible)
        {
            return Some(vm.clone());
        }
        let mut best: Option<(&String, &NaiveVm)> = None;
        for (name, vm) in &self.vms {
            if !vm.eligible() {
                continue;
            }
            best = match best {
                None => Some((name, vm)),
                Some((b_name, b)) => {
                    let lhs = u64::from(vm.total()) * u64::from(b.weight);
                    let rhs = u64::from(b.total()) * u64::from(vm.weight);
                    if lhs < rhs || (lhs == rhs && name < b_name) {
                        Some((name, vm))
                    } else {
                        Some((b_name, b))
                    }
                }
            };
        }
        best.map(|(name, _)| name.clone())
    }
}

/// The naive baseline: everything behind one `Mutex<HashMap<..>>`.
#[derive(Debug, Default)]
pub struct NaivePool {
    inner: Mutex<NaiveInner>,
}

/// A session on a [`NaivePool`]; dropping it locks the pool to uncount it.
#[derive(Debug)]
pub struct NaiveGuard<'a> {
    pool: &'a NaivePool,
    id: u64,
}

impl NaiveGuard<'_> {
    /// The session id.
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl NaivePool {
    /// A naive pool in the fixture's state (preloaded sessions are counted
    /// directly, without guards).
    pub fn new(vms: &[FixtureVm]) -> Self {
        let mut inner = NaiveInner::default();
        for v in vms {
            inner.vms.insert(
                v.spec.name.clone(),
                NaiveVm {
                    weight: v.spec.weight,
                    max_sessions: v.spec.max_sessions,
                    healthy: v.healthy,
                    draining: v.draining,
                    ssh: v.preload,
                    http: 0,
                },
            );
        }
        Self {
            inner: Mutex::new(inner),
        }
    }

    fn lock(&self) -> MutexGuard<'_, NaiveInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The VM a new session would go to (no counting).
    pub fn pick(&self, user: Option<&str>) -> Option<String> {
        self.lock().choose(user, None)
    }

    /// Places and counts a session.
    pub fn acquire(
        &self,
        protocol: Protocol,
        user: Option<&str>,
        pinned: Option<&str>,
    ) -> Option<NaiveGuard<'_>> {
        let mut inner = self.lock();
        let vm_name = inner.choose(user, pinned)?;
        let vm = inner.vms.get_mut(&vm_name)?;
        match protocol {
            Protocol::Ssh => vm.ssh += 1,
            Protocol::Http => vm.http += 1,
        }
        if let Some(u) = user {
            let e = inner
                .users
                .entry(u.to_owned())
                .or_insert_with(|| (vm_name.clone(), 0));
            e.0.clone_from(&vm_name);
            e.1 += 1;
        }
        inner.next_id += 1;
        let id = inner.next_id;
        inner.sessions.insert(
            id,
            NaiveSession {
                vm: vm_name,
                protocol,
                user: user.map(str::to_owned),
            },
        );
        Some(NaiveGuard { pool: self, id })
    }

    /// Live sessions of all VMs.
    pub fn total_sessions(&self) -> u64 {
        self.lock().vms.values().map(|v| u64::from(v.total())).sum()
    }
}

impl Drop for NaiveGuard<'_> {
    fn drop(&mut self) {
        let mut inner = self.pool.lock();
        let Some(s) = inner.sessions.remove(&self.id) else {
            return;
        };
        if let Some(vm) = inner.vms.get_mut(&s.vm) {
            match s.protocol {
                Protocol::Ssh => vm.ssh -= 1,
                Protocol::Http => vm.http -= 1,
            }
        }
        if let Some(u) = s.user
            && let Some(e) = inner.users.get_mut(&u)
        {
            e.1 = e.1.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both implementations make the same choices on the same fixture, so
    /// the benchmarks compare equal work.
    #[test]
    fn naive_and_poolgate_agree() {
        for n in [10, 100, 1000] {
            let vms = fixture(n);
            let (pool, _held) = poolgate_pool(&vms);
            let naive = NaivePool::new(&vms);
            assert_eq!(pool.snapshot().total_sessions(), naive.total_sessions());
            let mut a = Vec::new();
            let mut b = Vec::new();
            for _ in 0..3 * n {
                let g = pool.acquire(&PickRequest::new(Protocol::Ssh)).ok();
                let h = naive.acquire(Protocol::Ssh, None, None);
                assert_eq!(
                    g.as_ref().map(|g| g.vm_name().to_owned()),
                    h.as_ref()
                        .and_then(|h| { naive.lock().sessions.get(&h.id()).map(|s| s.vm.clone()) })
                );
                a.push(g);
                b.push(h);
            }
            drop((a, b));
            assert_eq!(pool.snapshot().total_sessions(), naive.total_sessions());
        }
    }

    #[test]
    fn naive_affinity_and_release() {
        let vms = fixture(10);
        let naive = NaivePool::new(&vms);
        let before = naive.total_sessions();
        let first = naive.pick(Some("ann"));
        let g = naive.acquire(Protocol::Http, Some("ann"), None);
        assert!(g.is_some());
        assert_eq!(naive.pick(Some("ann")), first);
        drop(g);
        assert_eq!(naive.total_sessions(), before);
    }
}
