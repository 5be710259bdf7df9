//! Active and passive health checks of pool VMs.
//!
//! Each VM is probed at once when the gateway starts or the VM appears, then every
//! `health.interval` (with a random phase so many VMs are not probed at once): SSH by reading the
//! server's `SSH-2.0-` banner, HTTP by a `GET health.http_path` that must answer 2xx. Health is
//! kept per protocol: each side's results feed its own rise/fall state machine (router-core), SSH
//! sessions go to VMs whose SSH side is up and browsers to VMs whose web side is up, so a crashed
//! JupyterHub never turns SSH users away (and the reverse). A protocol the gateway does not serve
//! is not probed; a served protocol whose probe is switched off (`health.ssh`/`health.http =
//! false`) goes by the probes that do run (up while they pass, and while the VM runs when none
//! does). A failed connection from a real session counts as a failed probe of its protocol at once
//! ([`HealthChecker::report_failure`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use router_core::{Health, HealthPolicy, HealthTracker, Lifecycle, Pool, Protocol, Transition};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, watch};

/// Called by a frontend with a VM's name when a real session could not connect to it (passive
/// health check; see [`HealthChecker::failure_hook`]).
pub type FailureHook = Arc<dyn Fn(&str) + Send + Sync>;

/// Probe settings (from `[health]`).
#[derive(Debug, Clone)]
pub struct HealthSettings {
    /// Time between probes of one VM.
    pub interval: Duration,
    /// Deadline of one probe.
    pub timeout: Duration,
    /// Rise/fall thresholds.
    pub policy: HealthPolicy,
    /// Probe sshd.
    pub ssh: bool,
    /// Probe the web side.
    pub http: bool,
    /// The gateway serves SSH (its SSH side is checked at all).
    pub serve_ssh: bool,
    /// The gateway serves browsers (its web side is checked at all).
    pub serve_http: bool,
    /// Path of the HTTP probe.
    pub http_path: String,
    /// node_exporter port and path to scrape `node_load1` from, when configured.
    pub load_metrics: Option<(u16, String)>,
}

/// Result of one probe of one side of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeResult {
    /// The probe passed (or is switched off).
    Ok,
    /// A probe failed (why).
    Failed(String),
}

/// Health state of every VM, fed by probes and by real sessions.
pub struct HealthChecker {
    pool: Arc<Pool>,
    settings: std::sync::RwLock<HealthSettings>,
    trackers: Mutex<HashMap<(String, Protocol), HealthTracker>>,
    /// The names of VMs whose SSH side just went down (see [`Self::ssh_down_events`]).
    ssh_down: broadcast::Sender<Arc<str>>,
}

/// VMs whose SSH side the health checks have just marked down, one name per change: the SSH
/// frontend asks its open connections to such a VM whether the VM still answers, rather than
/// wait for its keepalives (see `ssh::connect`). A receiver that falls behind by more than
/// [`SSH_DOWN_QUEUE`] names skips the oldest.
pub type SshDownEvents = broadcast::Receiver<Arc<str>>;

/// Names kept for an [`SshDownEvents`] receiver that has not looked yet.
pub const SSH_DOWN_QUEUE: usize = 64;

impl std::fmt::Debug for HealthChecker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthChecker")
            .field("settings", &self.settings())
            .finish_non_exhaustive()
    }
}

impl HealthChecker {
    /// A checker for `pool`.
    pub fn new(pool: Arc<Pool>, settings: HealthSettings) -> Arc<Self> {
        Arc::new(Self {
            pool,
            settings: std::sync::RwLock::new(settings),
            trackers: Mutex::new(HashMap::new()),
            ssh_down: broadcast::channel(SSH_DOWN_QUEUE).0,
        })
    }

    /// A receiver of the names of VMs whose SSH side goes down from now on, by a probe or by
    /// a session that could not connect ([`Self::report_failure`]).
    pub fn ssh_down_events(&self) -> SshDownEvents {
        self.ssh_down.subscribe()
    }

    /// The current settings.
    pub fn settings(&self) -> HealthSettings {
        match self.settings.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the settings (config reload); thresholds apply to the next results.
    pub fn set_settings(&self, settings: HealthSettings) {
        if let Ok(mut trackers) = self.trackers.lock() {
            for tracker in trackers.values_mut() {
                tracker.set_policy(settings.policy);
            }
        }
        if let Ok(mut current) = self.settings.write() {
            *current = settings;
        }
    }

    /// Feeds one result for `protocol` on `vm`; applies and logs a state change.
    pub fn observe(
        &self,
        vm: &str,
        protocol: Protocol,
        result: &ProbeResult,
    ) -> Option<Transition> {
        let now = self.pool.clock().now();
        let ok = *result == ProbeResult::Ok;
        let transition = {
            // Decided and applied under the lock, so that two results of one side (a probe, a
            // session that failed to connect) are applied in the order they were decided.
            let mut trackers = self.trackers.lock().ok()?;
            // A VM gone from the pool gets no tracker (a late session failure): if it comes
            // back, its first probe decides, as for a new VM.
            let recorded = self.pool.snapshot().get(vm)?.status().health_of(protocol);
            let tracker = trackers
                .entry((vm.to_string(), protocol))
                .or_insert_with(|| HealthTracker::new(self.settings().policy));
            let transition = tracker.observe(ok, now);
            let verdict = tracker.health();
            // The pool may not hold the tracker's verdict: a VM removed and added again between
            // two looks of the probe loop (a reload, a provider's listing) comes back unknown
            // while its tracker stays where it was, and "up" again would be no change.
            let transition = transition.or_else(|| {
                (verdict != Health::Unknown && recorded != verdict).then_some(Transition {
                    from: recorded,
                    to: verdict,
                    at: now,
                })
            });
            if let Some(t) = &transition {
                self.pool.set_protocol_health(vm, protocol, t.to);
            }
            transition
        };
        if let Some(t) = transition {
            if protocol == Protocol::Ssh && t.to == Health::Down {
                // No receiver (no SSH connection open) is no error.
                let _ = self.ssh_down.send(Arc::from(vm));
            }
            let side = side_name(protocol);
            if !self.probes(protocol) {
                // This side follows the probes that do run: their own lines tell the story.
                tracing::debug!(%vm, %protocol, from = %t.from, to = %t.to, "VM's {side} follows the probed sides");
            } else {
                match (t.to, result) {
                    (Health::Up, _) => {
                        tracing::info!(%vm, %protocol, from = %t.from, "VM is up on its {side}")
                    }
                    (_, ProbeResult::Failed(reason)) => tracing::warn!(
                        %vm, %protocol, from = %t.from, %reason,
                        "VM is down on its {side}; no new {protocol} sessions go there"
                    ),
                    (_, ProbeResult::Ok) => {}
                }
            }
        }
        transition
    }

    /// Forgets `vm`'s probe history and marks its health unknown (it was stopped).
    pub fn forget(&self, vm: &str) {
        self.forget_probes(vm);
        self.pool.set_health(vm, Health::Unknown);
    }

    /// Forgets `vm`'s probe history.
    fn forget_probes(&self, vm: &str) {
        if let Ok(mut trackers) = self.trackers.lock() {
            trackers.retain(|(name, _), _| name != vm);
        }
    }

    /// The hook a frontend calls when a real session of `protocol` could not connect to a VM
    /// (passive health check): each call is [`report_failure`](Self::report_failure) with
    /// `reason`.
    pub fn failure_hook(self: &Arc<Self>, protocol: Protocol, reason: &'static str) -> FailureHook {
        let health = self.clone();
        Arc::new(move |vm| health.report_failure(vm, protocol, reason))
    }

    /// A real session of `protocol` failed to connect to `vm`: counts as a failed probe of that
    /// side now.
    pub fn report_failure(&self, vm: &str, protocol: Protocol, reason: &str) {
        self.observe(
            vm,
            protocol,
            &ProbeResult::Failed(format!("session connect failed: {reason}")),
        );
    }

    /// Recent results of `vm`'s `protocol` side, oldest first, with their age.
    pub fn history(&self, vm: &str, protocol: Protocol) -> Vec<(Duration, bool)> {
        let now = self.pool.clock().now();
        self.trackers
            .lock()
            .ok()
            .and_then(|t| {
                t.get(&(vm.to_owned(), protocol)).map(|tr| {
                    tr.history()
                        .map(|(at, ok)| (now.saturating_duration_since(at), ok))
                        .collect()
                })
            })
            .unwrap_or_default()
    }

    /// Whether the gateway serves `protocol` (has a listener for it).
    pub fn serves(&self, protocol: Protocol) -> bool {
        let settings = self.settings();
        match protocol {
            Protocol::Ssh => settings.serve_ssh,
            Protocol::Http => settings.serve_http,
        }
    }

    /// Whether `protocol`'s side of the VMs has a probe of its own (the gateway serves the
    /// protocol and its probe is on).
    pub fn probes(&self, protocol: Protocol) -> bool {
        let settings = self.settings();
        match protocol {
            Protocol::Ssh => settings.serve_ssh && settings.ssh,
            Protocol::Http => settings.serve_http && settings.http,
        }
    }

    /// Probes one VM once: a result for each side the gateway serves. The probes run at once, so
    /// a round takes at most one timeout. A served side whose probe is switched off takes the
    /// result of the sides that are probed (it passes when they all pass, or when none is).
    pub async fn probe(
        &self,
        host: &str,
        ssh_port: u16,
        http_port: u16,
    ) -> Vec<(Protocol, ProbeResult)> {
        let settings = self.settings();
        let probe_ssh_side = settings.serve_ssh && settings.ssh;
        let probe_http_side = settings.serve_http && settings.http;
        let ssh = async {
            if probe_ssh_side {
                Some(probe_ssh(host, ssh_port, settings.timeout).await)
            } else {
                None
            }
        };
        let http = async {
            if probe_http_side {
                Some(probe_http(host, http_port, &settings.http_path, settings.timeout).await)
            } else {
                None
            }
        };
        let (ssh, http) = tokio::join!(ssh, http);
        // What a side without a probe of its own goes by.
        let mirrored = match (&ssh, &http) {
            (Some(Err(reason)), _) | (_, Some(Err(reason))) => ProbeResult::Failed(reason.clone()),
            _ => ProbeResult::Ok,
        };
        let as_result = |r: Option<Result<(), String>>| match r {
            Some(Ok(())) => ProbeResult::Ok,
            Some(Err(reason)) => ProbeResult::Failed(reason),
            None => mirrored.clone(),
        };
        let mut out = Vec::with_capacity(2);
        if settings.serve_ssh {
            out.push((Protocol::Ssh, as_result(ssh)));
        }
        if settings.serve_http {
            out.push((Protocol::Http, as_result(http)));
        }
        out
    }

    /// Probes every running VM every interval until `shutdown` turns true.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut probing: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
        // VMs gone from the pool's VM set whose sessions carry on (see `Pool::set_vms`).
        let mut leaving = HashSet::new();
        let mut tick =
            tokio::time::interval(Duration::from_millis(250).min(self.settings().interval));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => if *shutdown.borrow() { break },
            }
            self.follow_leaving(&mut leaving);
            // One probe loop per VM; started for new VMs, stopped for removed ones.
            let snapshot = self.pool.snapshot();
            probing.retain(|name, task| {
                let listed = snapshot.get(name).is_some();
                let keep = listed && !task.is_finished();
                if !keep {
                    task.abort();
                }
                if !listed {
                    // Gone from the pool: if it comes back (a reload, a provider's listing), it
                    // is probed from scratch, as a new VM.
                    self.forget_probes(name);
                }
                keep
            });
            for vm in snapshot.vms() {
                let name = vm.spec().name.clone();
                if probing.contains_key(&name) {
                    continue;
                }
                let checker = self.clone();
                probing.insert(name.clone(), tokio::spawn(checker.probe_loop(name)));
            }
        }
        for (_, task) in probing {
            task.abort();
        }
    }

    /// Logs VMs that left the pool's VM set while sessions run on them, and removes those whose
    /// last session has ended; returns the VMs that have left since the last call.
    fn follow_leaving(&self, announced: &mut HashSet<String>) -> Vec<String> {
        let mut left = self.pool.drop_departed();
        for vm in &left {
            announced.remove(vm);
        }
        let snapshot = self.pool.snapshot();
        announced.retain(|vm| match snapshot.get(vm) {
            Some(v) => v.status().leaving,
            // Gone without `drop_departed`: the VM set changed again after its last session
            // had ended, and `set_vms` let it go itself.
            None => {
                left.push(vm.clone());
                false
            }
        });
        for vm in &left {
            tracing::info!(%vm, "the removed VM's last session ended, or it went down or stopped: it has left the pool");
        }
        for vm in snapshot.vms().iter().filter(|v| v.status().leaving) {
            if announced.insert(vm.name().to_owned()) {
                let (vm, sessions) = (vm.name(), vm.total_sessions());
                tracing::info!(
                    %vm,
                    sessions,
                    "VM removed from the pool: it takes no new sessions, and those open there carry on until they end"
                );
            }
        }
        left
    }

    async fn probe_loop(self: Arc<Self>, name: String) {
        // The first probe goes out at once: a gateway that just started (or a VM just added)
        // routes nothing there until it is known, and a load balancer may already send users.
        // The second comes after a random part of the interval, so that many VMs' probes spread
        // over it; then a fixed period. Probes start on that cadence whatever each one takes (a
        // hung VM costs one timeout, not interval + timeout per probe).
        let mut next = tokio::time::Instant::now();
        let mut first = true;
        loop {
            tokio::time::sleep_until(next).await;
            let now = tokio::time::Instant::now();
            let interval = self.settings().interval;
            next = if first {
                first = false;
                now + interval.mul_f64(0.5 + rand::random::<f64>() * 0.5)
            } else {
                next + interval
            };
            if next <= now {
                next = now + interval;
            }
            let snapshot = self.pool.snapshot();
            let Some(vm) = snapshot.get(&name) else {
                return;
            };
            if matches!(
                vm.status().lifecycle,
                Lifecycle::Starting | Lifecycle::Stopped | Lifecycle::Stopping
            ) {
                // A stopped or booting VM's health is unknown: once it runs, its first probe
                // decides (a booting machine's refused connections are no news).
                if vm.status().health() != Health::Unknown {
                    self.forget(&name);
                }
                continue;
            }
            let spec = vm.spec().clone();
            drop(snapshot);
            for (protocol, result) in self.probe(&spec.host, spec.ssh_port, spec.http_port).await {
                self.observe(&name, protocol, &result);
            }
            let settings = self.settings();
            if let Some((port, path)) = settings.load_metrics {
                let (pool, name, host, timeout) = (
                    self.pool.clone(),
                    name.clone(),
                    spec.host.clone(),
                    settings.timeout,
                );
                tokio::spawn(async move {
                    let hint = scrape_load(&host, port, &path, timeout).await;
                    if let Err(e) = &hint {
                        tracing::debug!(vm = %name, error = %e, "load metrics scrape failed");
                    }
                    pool.set_load_hint(&name, hint.ok());
                });
            }
        }
    }
}

/// What the logs call a protocol's side of a VM.
fn side_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Ssh => "SSH side (sshd)",
        Protocol::Http => "web side (JupyterHub)",
    }
}

/// TCP connect and read an `SSH-2.0-` identification line within `timeout`.
pub async fn probe_ssh(host: &str, port: u16, timeout: Duration) -> Result<(), String> {
    let attempt = async {
        let mut stream = TcpStream::connect((host, port))
            .await
            .map_err(|e| format!("ssh {host}:{port}: {e}"))?;
        let mut buf = [0u8; 256];
        let mut len = 0;
        // Servers may send other lines before the identification (RFC 4253 §4.2).
        loop {
            let n = stream
                .read(&mut buf[len..])
                .await
                .map_err(|e| format!("ssh {host}:{port}: {e}"))?;
            if n == 0 {
                return Err(format!("ssh {host}:{port}: closed before the SSH banner"));
            }
            len += n;
            let text = String::from_utf8_lossy(&buf[..len]);
            if text
                .lines()
                .any(|l| l.starts_with("SSH-2.0-") || l.starts_with("SSH-1.99-"))
            {
                let _ = stream.write_all(b"SSH-2.0-poolgate_probe\r\n").await;
                return Ok(());
            }
            if len == buf.len() {
                return Err(format!("ssh {host}:{port}: no SSH banner"));
            }
        }
    };
    tokio::time::timeout(timeout, attempt).await.map_err(|_| {
        format!(
            "ssh {host}:{port}: no banner within {}",
            humantime::format_duration(timeout)
        )
    })?
}

/// `GET path` over HTTP/1.1, expecting a 2xx status line within `timeout`.
pub async fn probe_http(
    host: &str,
    port: u16,
    path: &str,
    timeout: Duration,
) -> Result<(), String> {
    let attempt = async {
        let mut stream = TcpStream::connect((host, port))
            .await
            .map_err(|e| format!("http {host}:{port}: {e}"))?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: poolgate-health\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("http {host}:{port}: {e}"))?;
        let mut buf = [0u8; 64];
        let mut len = 0;
        while len < 12 {
            let n = stream
                .read(&mut buf[len..])
                .await
                .map_err(|e| format!("http {host}:{port}: {e}"))?;
            if n == 0 {
                break;
            }
            len += n;
        }
        let head = String::from_utf8_lossy(&buf[..len]);
        let status = head.split_whitespace().nth(1).unwrap_or("");
        if head.starts_with("HTTP/1.") && status.starts_with('2') && status.len() == 3 {
            Ok(())
        } else {
            Err(format!("http {host}:{port}{path}: status {status:?}"))
        }
    };
    tokio::time::timeout(timeout, attempt).await.map_err(|_| {
        format!(
            "http {host}:{port}{path}: no answer within {}",
            humantime::format_duration(timeout)
        )
    })?
}

/// Scrapes node_exporter text metrics and returns `node_load1` divided by the number of CPUs
/// (counted from `node_cpu_seconds_total{cpu="N",mode="idle"}`).
pub async fn scrape_load(
    host: &str,
    port: u16,
    path: &str,
    timeout: Duration,
) -> Result<f64, String> {
    let fetch = async {
        let mut stream = TcpStream::connect((host, port))
            .await
            .map_err(|e| format!("{host}:{port}: {e}"))?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: poolgate-load\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("{host}:{port}: {e}"))?;
        let mut body = Vec::new();
        // node_exporter pages are ~100 KiB; cap what we read.
        (&mut stream)
            .take(4 << 20)
            .read_to_end(&mut body)
            .await
            .map_err(|e| format!("{host}:{port}: {e}"))?;
        Ok::<_, String>(String::from_utf8_lossy(&body).into_owned())
    };
    let text = tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| format!("{host}:{port}{path}: no answer in time"))??;
    parse_load(&text).ok_or_else(|| format!("{host}:{port}{path}: no node_load1 in the answer"))
}

/// `node_load1 / cpus` from node_exporter's text format (headers before the body are ignored).
pub fn parse_load(text: &str) -> Option<f64> {
    let mut load = None;
    let mut cpus = std::collections::BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("node_load1 ") {
            load = rest
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0);
        } else if line.starts_with("node_cpu_seconds_total{")
            && line.contains("mode=\"idle\"")
            && let Some(cpu) = line
                .split("cpu=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
        {
            cpus.insert(cpu.to_string());
        }
    }
    let cpus = cpus.len().max(1) as f64;
    load.map(|l| l / cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    impl HealthSettings {
        /// The defaults' timing, SSH probes only, both sides served.
        pub(crate) fn for_tests() -> Self {
            HealthSettings {
                interval: Duration::from_secs(5),
                timeout: Duration::from_secs(2),
                policy: HealthPolicy::default(),
                ssh: true,
                http: false,
                serve_ssh: true,
                serve_http: true,
                http_path: "/".into(),
                load_metrics: None,
            }
        }
    }

    #[test]
    fn a_leaving_vm_is_reported_gone_also_when_a_new_vm_set_lets_it_go() {
        use router_core::{RoutingPolicy, SystemClock, VmSpec};
        let pool = Arc::new(Pool::new(RoutingPolicy::default(), Arc::new(SystemClock)));
        pool.set_vms(vec![VmSpec::new("vm-a", "127.0.0.1")]);
        let checker = HealthChecker::new(pool.clone(), HealthSettings::for_tests());
        let mut announced = HashSet::new();
        let session = pool.http_open("vm-a", None, None);
        assert!(session.is_some());
        // Removed with a session on it: it leaves, announced once.
        pool.set_vms(Vec::new());
        assert!(checker.follow_leaving(&mut announced).is_empty());
        assert!(announced.contains("vm-a"));
        // Its session ends and, before the health loop looks, the VM set changes again: the
        // pool lets it go there and then, and the next look reports it gone.
        drop(session);
        pool.set_vms(vec![VmSpec::new("vm-b", "127.0.0.1")]);
        assert!(pool.snapshot().get("vm-a").is_none());
        assert_eq!(checker.follow_leaving(&mut announced), vec!["vm-a"]);
        assert!(announced.is_empty());
        assert!(checker.follow_leaving(&mut announced).is_empty());
    }

    #[test]
    fn a_vm_whose_ssh_side_goes_down_is_announced_once_and_its_web_side_not_at_all() {
        use router_core::{RoutingPolicy, SystemClock, VmSpec};
        let pool = Arc::new(Pool::new(RoutingPolicy::default(), Arc::new(SystemClock)));
        pool.set_vms(vec![VmSpec::new("vm-a", "127.0.0.1")]);
        let checker = HealthChecker::new(pool.clone(), HealthSettings::for_tests());
        let mut down = checker.ssh_down_events();
        let failed = ProbeResult::Failed("connection refused".into());
        checker.observe("vm-a", Protocol::Ssh, &ProbeResult::Ok);
        checker.observe("vm-a", Protocol::Http, &failed);
        assert!(
            down.try_recv().is_err(),
            "nothing went down on the SSH side"
        );
        // Down after `fall` failures in a row (3 by default), announced once.
        for _ in 0..HealthPolicy::default().fall {
            checker.observe("vm-a", Protocol::Ssh, &failed);
        }
        assert_eq!(down.try_recv().as_deref().ok(), Some("vm-a"));
        checker.observe("vm-a", Protocol::Ssh, &failed);
        assert!(
            down.try_recv().is_err(),
            "a side already down is not announced again"
        );
    }

    #[test]
    fn parses_node_exporter_load() {
        let text = "HTTP/1.1 200 OK\r\n\r\n# HELP node_load1 1m load average.\n# TYPE node_load1 gauge\nnode_load1 3\n\
                    node_cpu_seconds_total{cpu=\"0\",mode=\"idle\"} 1\nnode_cpu_seconds_total{cpu=\"0\",mode=\"user\"} 1\n\
                    node_cpu_seconds_total{cpu=\"1\",mode=\"idle\"} 1\n";
        assert_eq!(parse_load(text), Some(1.5));
        assert_eq!(parse_load("node_load1 NaN\n"), None);
        assert_eq!(parse_load("garbage"), None);
    }

    #[test]
    fn a_vm_removed_and_added_again_is_up_again_after_its_next_good_probe() {
        use router_core::{RoutingPolicy, SystemClock, VmSpec};
        let pool = Arc::new(Pool::new(RoutingPolicy::default(), Arc::new(SystemClock)));
        let vm = || vec![VmSpec::new("vm-a", "127.0.0.1")];
        pool.set_vms(vm());
        let checker = HealthChecker::new(
            pool.clone(),
            HealthSettings {
                serve_http: false,
                ..HealthSettings::for_tests()
            },
        );
        let ssh_health = || pool.snapshot().get("vm-a").map(|v| v.status().ssh);
        assert!(
            checker
                .observe("vm-a", Protocol::Ssh, &ProbeResult::Ok)
                .is_some()
        );
        assert_eq!(ssh_health(), Some(Health::Up));
        // A reload drops it and brings it back before the probe loop looks: the pool knows it
        // as new (unknown), its tracker still says up.
        pool.set_vms(Vec::new());
        pool.set_vms(vm());
        assert_eq!(ssh_health(), Some(Health::Unknown));
        let t = checker.observe("vm-a", Protocol::Ssh, &ProbeResult::Ok);
        assert_eq!(
            t.map(|t| (t.from, t.to)),
            Some((Health::Unknown, Health::Up))
        );
        assert_eq!(ssh_health(), Some(Health::Up));
        // Nothing to report while the pool and the tracker agree.
        assert!(
            checker
                .observe("vm-a", Protocol::Ssh, &ProbeResult::Ok)
                .is_none()
        );
    }

    #[tokio::test]
    async fn ssh_probe_reads_a_banner_and_fails_on_silence() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut a, _) = listener.accept().await.unwrap();
            a.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await.unwrap();
            let (_b, _) = listener.accept().await.unwrap();
            // Second connection: never answers.
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        assert_eq!(
            probe_ssh("127.0.0.1", addr.port(), Duration::from_secs(2)).await,
            Ok(())
        );
        let silent = probe_ssh("127.0.0.1", addr.port(), Duration::from_millis(200)).await;
        assert!(silent.unwrap_err().contains("no banner"));
        server.abort();
    }
}
