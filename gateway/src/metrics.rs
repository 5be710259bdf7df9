//! Prometheus metrics (prefix `poolgate_`), names and labels as DESIGN.md lists them.
//!
//! Counters and histograms are updated where things happen. Gauges that describe the pool
//! (`sessions_active`, `vm_up`, `vm_state`, `pool_vms`) are recomputed from the pool snapshot at
//! every scrape, so they always match reality.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use router_core::{Pool, Protocol, VmState};

/// Reads the log's count of dropped lines (the log is set up before any `Metrics`).
type LogDrops = Box<dyn Fn() -> u64 + Send + Sync>;
static LOG_DROPS: std::sync::OnceLock<LogDrops> = std::sync::OnceLock::new();

/// Gives `poolgate_log_dropped_total` its source: the log's own count of lines it dropped
/// (`logging::Guard::drops`). Set once, by the CLI that set up the log; later calls are ignored.
pub fn count_log_drops(read: impl Fn() -> u64 + Send + Sync + 'static) {
    let _ = LOG_DROPS.set(Box::new(read));
}

/// Every metric the gateway exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// `poolgate_sessions_active{protocol,vm}`.
    pub sessions_active: IntGaugeVec,
    /// `poolgate_sessions_total{protocol,vm,outcome}`.
    pub sessions_total: IntCounterVec,
    /// `poolgate_vm_up{vm}`.
    pub vm_up: IntGaugeVec,
    /// `poolgate_vm_protocol_up{vm,protocol}`.
    pub vm_protocol_up: IntGaugeVec,
    /// `poolgate_vm_state{vm,state}`.
    pub vm_state: IntGaugeVec,
    /// `poolgate_bytes_total{protocol,vm,direction}`.
    pub bytes_total: IntCounterVec,
    /// `poolgate_connect_seconds{protocol}`.
    pub connect_seconds: HistogramVec,
    /// `poolgate_auth_failures_total{method}`.
    pub auth_failures_total: IntCounterVec,
    /// `poolgate_http_requests_total{vm,code}`.
    pub http_requests_total: IntCounterVec,
    /// `poolgate_access_log_dropped_total`: access-log lines dropped because the destination
    /// could not keep up (or failed).
    pub access_log_dropped_total: IntCounter,
    /// `poolgate_log_dropped_total`: log lines dropped because standard error did not take them
    /// (brought up to date at every scrape from what [`count_log_drops`] was given).
    pub log_dropped_total: IntCounter,
    /// `poolgate_autoscale_desired_vms`.
    pub autoscale_desired_vms: IntGauge,
    /// `poolgate_autoscale_max_vms`: the configured `autoscale.max_vms` (for "pool at max" alerts).
    pub autoscale_max_vms: IntGauge,
    /// `poolgate_autoscale_provider_up`: 1 while the provider's last listing of the VMs worked,
    /// 0 while listings fail (the autoscaler then starts, creates, stops and deletes nothing).
    pub autoscale_provider_up: IntGauge,
    /// `poolgate_autoscale_actions_in_flight`: provider actions (start, stop, delete, create)
    /// still running.
    pub autoscale_actions_in_flight: IntGauge,
    /// `poolgate_batch_jobs{state}`: jobs of the batch partition, `pending` and `running`.
    pub batch_jobs: IntGaugeVec,
    /// `poolgate_batch_nodes_busy`: pool VMs whose Slurm node runs a job.
    pub batch_nodes_busy: IntGauge,
    /// `poolgate_batch_nodes_unregistered`: running pool VMs whose Slurm node has not
    /// registered within `batch.register_within`.
    pub batch_nodes_unregistered: IntGauge,
    /// `poolgate_batch_up`: 1 while reading the batch queue works (0: deciding on its last view).
    pub batch_up: IntGauge,
    /// `poolgate_autoscale_schedule_min_vms`: VMs a `[[autoscale.schedule]]` window keeps warm
    /// now (0 outside every window).
    pub autoscale_schedule_min_vms: IntGauge,
    /// `poolgate_autoscale_actions_total{action}`.
    pub autoscale_actions_total: IntCounterVec,
    /// `poolgate_autoscale_leader`: 1 while this replica runs the autoscaler (always 1 for a
    /// single replica).
    pub autoscale_leader: IntGauge,
    /// `poolgate_cluster_store_up`: 1 while the shared store answers (always 1 in memory).
    pub cluster_store_up: IntGauge,
    /// `poolgate_state_file_failing`: 1 while `gateway.state_file` cannot be written (a restart
    /// would forget drains and users' VMs).
    pub state_file_failing: IntGauge,
    /// `poolgate_cluster_replicas`: live replicas this replica sees, itself included.
    pub cluster_replicas: IntGauge,
    /// `poolgate_pool_vms{state}`.
    pub pool_vms: IntGaugeVec,
    /// `poolgate_sessions_waiting{protocol}`: connections held while the pool wakes.
    pub sessions_waiting: IntGaugeVec,
    /// `poolgate_sessions_tentative{vm}`: browsers just sent to a VM, cookie not back yet.
    pub sessions_tentative: IntGaugeVec,
    /// `poolgate_vm_load_hint{vm}`: node_load1 per CPU scraped from the VM, when configured.
    pub vm_load_hint: GaugeVec,
    /// `poolgate_vm_busy{vm}`: 1 while the last busy check kept the VM (work running, or the
    /// check could not tell), 0 when it found the VM idle; absent when not checked.
    pub vm_busy: IntGaugeVec,
    /// `poolgate_autoscale_busy_checks_total{result}`: busy checks by result (busy, idle, unknown).
    pub autoscale_busy_checks_total: IntCounterVec,
    /// `poolgate_azure_requests_total{operation,method,code}`: ARM requests of the `azure-vmss`
    /// provider (every attempt and every poll of a long-running operation), by HTTP status code
    /// (`unanswered`: no response).
    pub azure_requests_total: IntCounterVec,
    /// `poolgate_azure_instance_failed{vm,reason}`: 1 for each scale-set instance that failed to
    /// come up (`provisioning_failed`, `start_timeout`) as of the last listing.
    pub azure_instance_failed: IntGaugeVec,
    /// `poolgate_azure_ratelimit_remaining{policy}`: calls left in each ARM throttling policy, as
    /// the last answer naming it said (`x-ms-ratelimit-remaining-resource`).
    pub azure_ratelimit_remaining: IntGaugeVec,
    /// `poolgate_tls_cert_expiry_seconds{source}`: seconds until the HTTPS certificate expires,
    /// computed at each scrape from [`Metrics::tls_not_after`].
    pub tls_cert_expiry_seconds: GaugeVec,
    /// When the certificate the HTTPS listener serves expires; set by whatever holds it.
    pub tls_not_after: TlsNotAfter,
}

/// The expiry of the certificate the HTTPS listener serves and where it comes from (`file` or
/// `acme`); `None` while there is none (no HTTPS, or ACME has not delivered yet).
#[derive(Debug, Clone, Default)]
pub struct TlsNotAfter(Arc<Mutex<Option<(&'static str, SystemTime)>>>);

impl TlsNotAfter {
    /// Records the served certificate's source and expiry (`None`: no certificate).
    pub fn set(&self, value: Option<(&'static str, SystemTime)>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = value;
    }

    /// The recorded source and expiry.
    pub fn get(&self) -> Option<(&'static str, SystemTime)> {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Outcome label values of `sessions_total`.
pub mod outcome {
    /// Session ran and ended.
    pub const OK: &str = "ok";
    /// The VM could not be reached or refused the session.
    pub const VM_FAILED: &str = "vm_failed";
    /// No VM could take the session.
    pub const NO_VM: &str = "no_vm";
}

/// Latency buckets of `connect_seconds`: 5 ms … 5 min (a VM boot while the pool wakes).
const CONNECT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

impl Metrics {
    /// Creates and registers every metric (and process metrics on Linux).
    pub fn new() -> Self {
        let registry =
            Registry::new_custom(Some("poolgate".into()), None).unwrap_or_else(|_| Registry::new());
        macro_rules! reg {
            ($metric:expr) => {{
                let m = $metric.expect("static metric definition is valid");
                registry
                    .register(Box::new(m.clone()))
                    .expect("metric names are unique");
                m
            }};
        }
        let metrics = Self {
            sessions_active: reg!(IntGaugeVec::new(
                Opts::new("sessions_active", "Sessions open now, by protocol and VM."),
                &["protocol", "vm"]
            )),
            sessions_total: reg!(IntCounterVec::new(
                Opts::new(
                    "sessions_total",
                    "Sessions started, by protocol, VM and outcome (ok, vm_failed, no_vm)."
                ),
                &["protocol", "vm", "outcome"]
            )),
            vm_up: reg!(IntGaugeVec::new(
                Opts::new(
                    "vm_up",
                    "1 when the VM runs and the health checks of at least one protocol pass (it takes new sessions of that protocol unless draining), else 0."
                ),
                &["vm"]
            )),
            vm_protocol_up: reg!(IntGaugeVec::new(
                Opts::new(
                    "vm_protocol_up",
                    "1 when the VM runs and the health checks of this protocol pass (ssh: sshd's banner, http: the web side's health URL), else 0."
                ),
                &["vm", "protocol"]
            )),
            vm_state: reg!(IntGaugeVec::new(
                Opts::new(
                    "vm_state",
                    "1 for the VM's current state (starting, healthy, unhealthy, draining, stopped), 0 for the others."
                ),
                &["vm", "state"]
            )),
            bytes_total: reg!(IntCounterVec::new(
                Opts::new(
                    "bytes_total",
                    "Bytes relayed, by protocol, VM and direction (up = user to VM, down = VM to user)."
                ),
                &["protocol", "vm", "direction"]
            )),
            connect_seconds: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "connect_seconds",
                    "Time from accepting a connection to the VM being ready for it."
                )
                .buckets(CONNECT_BUCKETS.to_vec()),
                &["protocol"]
            )),
            auth_failures_total: reg!(IntCounterVec::new(
                Opts::new(
                    "auth_failures_total",
                    "Failed user authentications, by method."
                ),
                &["method"]
            )),
            http_requests_total: reg!(IntCounterVec::new(
                Opts::new(
                    "http_requests_total",
                    "HTTP requests proxied, by VM and status code."
                ),
                &["vm", "code"]
            )),
            access_log_dropped_total: reg!(IntCounter::new(
                "access_log_dropped_total",
                "HTTP access-log lines dropped because the destination could not keep up or failed to write."
            )),
            log_dropped_total: reg!(IntCounter::new(
                "log_dropped_total",
                "Log lines dropped because standard error did not take them fast enough."
            )),
            state_file_failing: reg!(IntGauge::new(
                "state_file_failing",
                "1 while gateway.state_file cannot be written: a restart would forget drains and users' VMs."
            )),
            autoscale_desired_vms: reg!(IntGauge::new(
                "autoscale_desired_vms",
                "Running VMs the autoscaler aims for."
            )),
            autoscale_max_vms: reg!(IntGauge::new(
                "autoscale_max_vms",
                "The configured autoscale.max_vms (0 when autoscaling is off)."
            )),
            autoscale_provider_up: reg!(IntGauge::new(
                "autoscale_provider_up",
                "1 while the VM provider's last listing worked; 0 while listings fail, and the autoscaler starts, creates, stops and deletes nothing."
            )),
            autoscale_actions_in_flight: reg!(IntGauge::new(
                "autoscale_actions_in_flight",
                "Provider actions (start, stop, delete, create) the autoscaler started that are still running."
            )),
            batch_jobs: reg!(IntGaugeVec::new(
                Opts::new(
                    "batch_jobs",
                    "Jobs of the batch partition, by state (pending, running)."
                ),
                &["state"]
            )),
            batch_nodes_busy: reg!(IntGauge::new(
                "batch_nodes_busy",
                "Pool VMs whose Slurm node runs a job (never drained or removed)."
            )),
            batch_nodes_unregistered: reg!(IntGauge::new(
                "batch_nodes_unregistered",
                "Running pool VMs whose Slurm node has not registered within batch.register_within (absent, down, not responding); once they are as many as those whose node registered, pending jobs start no VM."
            )),
            batch_up: reg!(IntGauge::new(
                "batch_up",
                "1 while reading the batch queue works; 0 while the autoscaler decides on its last view."
            )),
            autoscale_schedule_min_vms: reg!(IntGauge::new(
                "autoscale_schedule_min_vms",
                "Running VMs an autoscale.schedule window keeps warm now (0 outside every window)."
            )),
            autoscale_leader: reg!(IntGauge::new(
                "autoscale_leader",
                "1 while this replica runs the autoscaler (holds the cluster's leader lease)."
            )),
            cluster_store_up: reg!(IntGauge::new(
                "cluster_store_up",
                "1 while the cluster's shared store (Redis) answers; 1 for state in memory."
            )),
            cluster_replicas: reg!(IntGauge::new(
                "cluster_replicas",
                "Live gateway replicas this replica sees in the cluster, itself included."
            )),
            autoscale_actions_total: reg!(IntCounterVec::new(
                Opts::new(
                    "autoscale_actions_total",
                    "Autoscaler actions applied, by action (start, create, drain, undrain, stop, delete, delete_failed, kept_busy, error)."
                ),
                &["action"]
            )),
            pool_vms: reg!(IntGaugeVec::new(
                Opts::new("pool_vms", "VMs in the pool, by state."),
                &["state"]
            )),
            sessions_waiting: reg!(IntGaugeVec::new(
                Opts::new(
                    "sessions_waiting",
                    "Connections held while the pool wakes up, by protocol."
                ),
                &["protocol"]
            )),
            sessions_tentative: reg!(IntGaugeVec::new(
                Opts::new(
                    "sessions_tentative",
                    "Browsers sent to the VM by their first request whose cookie has not come back yet (http.tentative_for): they weigh in the choice of VM but are not sessions."
                ),
                &["vm"]
            )),
            vm_load_hint: reg!(GaugeVec::new(
                Opts::new(
                    "vm_load_hint",
                    "node_load1 per CPU scraped from the VM (tie-breaker between equally loaded VMs)."
                ),
                &["vm"]
            )),
            vm_busy: reg!(IntGaugeVec::new(
                Opts::new(
                    "vm_busy",
                    "1 while the autoscaler keeps the VM because work runs on it outside the gateway (or the busy check could not tell), 0 when the check found it idle."
                ),
                &["vm"]
            )),
            autoscale_busy_checks_total: reg!(IntCounterVec::new(
                Opts::new(
                    "autoscale_busy_checks_total",
                    "Busy checks run on VMs before scale-in, by result (busy, idle, unknown)."
                ),
                &["result"]
            )),
            azure_requests_total: reg!(IntCounterVec::new(
                Opts::new(
                    "azure_requests_total",
                    "ARM requests of the azure-vmss provider (retries and operation polls included), by operation, HTTP method and status code (unanswered: no response)."
                ),
                &["operation", "method", "code"]
            )),
            azure_instance_failed: reg!(IntGaugeVec::new(
                Opts::new(
                    "azure_instance_failed",
                    "1 for each scale-set instance that failed to come up as of the last listing, by reason (provisioning_failed, start_timeout)."
                ),
                &["vm", "reason"]
            )),
            azure_ratelimit_remaining: reg!(IntGaugeVec::new(
                Opts::new(
                    "azure_ratelimit_remaining",
                    "Calls left in each ARM throttling policy (e.g. Microsoft.Compute/HighCostGetVMScaleSet3Min) as the last answer naming it said; 0 means the next call of that kind is throttled."
                ),
                &["policy"]
            )),
            tls_cert_expiry_seconds: reg!(GaugeVec::new(
                Opts::new(
                    "tls_cert_expiry_seconds",
                    "Seconds until the certificate the HTTPS listener serves expires (negative once expired), by source (file: tls.cert, acme: tls.acme_domains). Absent without HTTPS and while ACME has not delivered the first certificate."
                ),
                &["source"]
            )),
            tls_not_after: TlsNotAfter::default(),
            registry: registry.clone(),
        };
        // One replica with its state in memory: the store is up, it is the only replica and it
        // leads; a cluster member overwrites these as it syncs.
        metrics.cluster_store_up.set(1);
        metrics.cluster_replicas.set(1);
        metrics.autoscale_leader.set(1);
        #[cfg(target_os = "linux")]
        {
            let process = prometheus::process_collector::ProcessCollector::for_self();
            let _ = registry.register(Box::new(process));
        }
        for method in ["publickey", "password"] {
            metrics.auth_failures_total.with_label_values(&[method]);
        }
        for action in [
            "start",
            "create",
            "drain",
            "undrain",
            "stop",
            "delete",
            "delete_failed",
            "kept_busy",
            "error",
        ] {
            metrics.autoscale_actions_total.with_label_values(&[action]);
        }
        for state in ["pending", "running"] {
            metrics.batch_jobs.with_label_values(&[state]);
        }
        for result in ["busy", "idle", "unknown"] {
            metrics
                .autoscale_busy_checks_total
                .with_label_values(&[result]);
        }
        for protocol in [Protocol::Ssh, Protocol::Http] {
            metrics
                .connect_seconds
                .with_label_values(&[protocol.as_str()]);
            metrics
                .sessions_waiting
                .with_label_values(&[protocol.as_str()]);
        }
        metrics
    }

    /// Records a session start decision.
    pub fn session_started(&self, protocol: Protocol, vm: &str, outcome: &str, connect: Duration) {
        self.sessions_total
            .with_label_values(&[protocol.as_str(), vm, outcome])
            .inc();
        if outcome == outcome::OK {
            self.connect_seconds
                .with_label_values(&[protocol.as_str()])
                .observe(connect.as_secs_f64());
        }
    }

    /// Adds relayed bytes.
    pub fn bytes(&self, protocol: Protocol, vm: &str, up: u64, down: u64) {
        if up > 0 {
            self.bytes_total
                .with_label_values(&[protocol.as_str(), vm, "up"])
                .inc_by(up);
        }
        if down > 0 {
            self.bytes_total
                .with_label_values(&[protocol.as_str(), vm, "down"])
                .inc_by(down);
        }
    }

    /// The `bytes_total{direction="down"}` counter of `vm` for `protocol`, to keep and add to
    /// without a label lookup each time.
    pub fn bytes_down(&self, protocol: Protocol, vm: &str) -> prometheus::IntCounter {
        self.bytes_total
            .with_label_values(&[protocol.as_str(), vm, "down"])
    }

    /// Counts a failed authentication.
    pub fn auth_failed(&self, method: &str) {
        self.auth_failures_total.with_label_values(&[method]).inc();
    }

    /// Refreshes the pool gauges from `pool` and renders the text exposition format. Metrics
    /// with no sample yet (a labelled counter before its first event) still get their HELP and
    /// TYPE lines, so every documented name is always visible.
    pub fn render(&self, pool: &Pool) -> String {
        self.refresh_pool(pool);
        self.refresh_tls(SystemTime::now());
        self.refresh_log();
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        let mut text = String::from_utf8(out).unwrap_or_default();
        for collector in self.descriptors() {
            for desc in collector {
                // The registry adds the prefix when gathering.
                let name = format!("poolgate_{}", desc.fq_name);
                if !text.contains(&format!("# TYPE {name} ")) {
                    let kind = if name.ends_with("_total") {
                        "counter"
                    } else if name == "poolgate_connect_seconds" {
                        "histogram"
                    } else {
                        "gauge"
                    };
                    text.push_str(&format!(
                        "# HELP {name} {}\n# TYPE {name} {kind}\n",
                        desc.help.replace('\\', "\\\\").replace('\n', "\\n")
                    ));
                }
            }
        }
        text
    }

    /// `log_dropped_total` catches up with the log writer's own count.
    fn refresh_log(&self) {
        // Two scrapes at once must not both add the same difference.
        static CATCHING_UP: Mutex<()> = Mutex::new(());
        let _one = CATCHING_UP.lock().unwrap_or_else(PoisonError::into_inner);
        let dropped = LOG_DROPS.get().map_or(0, |read| read());
        let counted = self.log_dropped_total.get();
        if dropped > counted {
            self.log_dropped_total.inc_by(dropped - counted);
        }
    }

    fn descriptors(&self) -> Vec<Vec<&prometheus::core::Desc>> {
        use prometheus::core::Collector;
        vec![
            self.sessions_active.desc(),
            self.sessions_total.desc(),
            self.vm_up.desc(),
            self.vm_protocol_up.desc(),
            self.vm_state.desc(),
            self.bytes_total.desc(),
            self.connect_seconds.desc(),
            self.auth_failures_total.desc(),
            self.http_requests_total.desc(),
            self.access_log_dropped_total.desc(),
            self.log_dropped_total.desc(),
            self.autoscale_desired_vms.desc(),
            self.autoscale_max_vms.desc(),
            self.autoscale_schedule_min_vms.desc(),
            self.batch_jobs.desc(),
            self.batch_nodes_busy.desc(),
            self.batch_nodes_unregistered.desc(),
            self.batch_up.desc(),
            self.autoscale_actions_in_flight.desc(),
            self.autoscale_provider_up.desc(),
            self.autoscale_actions_total.desc(),
            self.autoscale_leader.desc(),
            self.cluster_store_up.desc(),
            self.cluster_replicas.desc(),
            self.pool_vms.desc(),
            self.sessions_waiting.desc(),
            self.sessions_tentative.desc(),
            self.vm_load_hint.desc(),
            self.azure_requests_total.desc(),
            self.azure_instance_failed.desc(),
            self.azure_ratelimit_remaining.desc(),
            self.tls_cert_expiry_seconds.desc(),
            self.vm_busy.desc(),
            self.autoscale_busy_checks_total.desc(),
        ]
    }

    fn refresh_tls(&self, now: SystemTime) {
        self.tls_cert_expiry_seconds.reset();
        if let Some((source, not_after)) = self.tls_not_after.get() {
            let left = match not_after.duration_since(now) {
                Ok(d) => d.as_secs_f64(),
                Err(e) => -e.duration().as_secs_f64(),
            };
            self.tls_cert_expiry_seconds
                .with_label_values(&[source])
                .set(left.round());
        }
    }

    fn refresh_pool(&self, pool: &Pool) {
        let snapshot = pool.snapshot();
        self.sessions_active.reset();
        self.vm_up.reset();
        self.vm_protocol_up.reset();
        self.sessions_tentative.reset();
        self.vm_state.reset();
        self.vm_load_hint.reset();
        for vm in snapshot.vms() {
            let name = vm.spec().name.as_str();
            if let Some(hint) = vm.load_hint() {
                self.vm_load_hint.with_label_values(&[name]).set(hint);
            }
            // This replica's own sessions: with several replicas, Prometheus sums them.
            for protocol in [Protocol::Ssh, Protocol::Http] {
                self.sessions_active
                    .with_label_values(&[protocol.as_str(), name])
                    .set(i64::from(vm.local_sessions(protocol)));
            }
            self.sessions_tentative
                .with_label_values(&[name])
                .set(i64::from(vm.local_tentative_sessions()));
            let state = vm.state();
            let status = vm.status();
            for protocol in Protocol::ALL {
                self.vm_protocol_up
                    .with_label_values(&[name, protocol.as_str()])
                    .set(i64::from(status.serving(protocol)));
            }
            let up = Protocol::ALL.iter().any(|&p| status.serving(p));
            self.vm_up.with_label_values(&[name]).set(i64::from(up));
            for s in ALL_STATES {
                self.vm_state
                    .with_label_values(&[name, s.as_str()])
                    .set(i64::from(s == state));
            }
        }
        for s in ALL_STATES {
            self.pool_vms
                .with_label_values(&[s.as_str()])
                .set(i64::try_from(snapshot.count_in(s)).unwrap_or(i64::MAX));
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

const ALL_STATES: [VmState; 5] = [
    VmState::Starting,
    VmState::Healthy,
    VmState::Unhealthy,
    VmState::Draining,
    VmState::Stopped,
];

#[cfg(test)]
mod tests {
    use super::*;
    use router_core::{Health, PickRequest, RoutingPolicy, SystemClock, VmSpec};
    use std::sync::Arc;

    #[test]
    fn metrics_without_samples_still_have_help_and_type() {
        let metrics = Metrics::new();
        let pool = Pool::new(RoutingPolicy::default(), Arc::new(SystemClock));
        let text = metrics.render(&pool);
        for name in [
            "poolgate_http_requests_total",
            "poolgate_bytes_total",
            "poolgate_sessions_total",
            "poolgate_auth_failures_total",
            "poolgate_autoscale_actions_total",
        ] {
            assert!(text.contains(&format!("# HELP {name} ")), "{name}:\n{text}");
            assert!(
                text.contains(&format!("# TYPE {name} counter")),
                "{name}:\n{text}"
            );
        }
        assert!(text.contains("poolgate_auth_failures_total{method=\"publickey\"} 0"));
    }

    #[test]
    fn every_design_metric_is_exported_with_help() {
        let metrics = Metrics::new();
        let pool = Pool::new(RoutingPolicy::default(), Arc::new(SystemClock));
        pool.set_vms(vec![VmSpec::new("vm-a", "127.0.0.1")]);
        pool.set_health("vm-a", Health::Up);
        let guard = pool.acquire(&PickRequest::new(Protocol::Ssh)).unwrap();
        metrics.session_started(
            Protocol::Ssh,
            "vm-a",
            outcome::OK,
            Duration::from_millis(20),
        );
        metrics.bytes(Protocol::Ssh, "vm-a", 10, 20);
        metrics.auth_failed("publickey");
        metrics
            .http_requests_total
            .with_label_values(&["vm-a", "200"])
            .inc();
        metrics
            .autoscale_actions_total
            .with_label_values(&["start"])
            .inc();
        let text = metrics.render(&pool);
        for name in [
            "poolgate_sessions_active",
            "poolgate_sessions_total",
            "poolgate_vm_up",
            "poolgate_vm_protocol_up",
            "poolgate_sessions_tentative",
            "poolgate_vm_state",
            "poolgate_bytes_total",
            "poolgate_connect_seconds",
            "poolgate_auth_failures_total",
            "poolgate_http_requests_total",
            "poolgate_access_log_dropped_total",
            "poolgate_log_dropped_total",
            "poolgate_autoscale_desired_vms",
            "poolgate_autoscale_actions_total",
            "poolgate_pool_vms",
            "poolgate_tls_cert_expiry_seconds",
            "poolgate_vm_busy",
            "poolgate_autoscale_busy_checks_total",
            "poolgate_cluster_store_up",
            "poolgate_cluster_replicas",
            "poolgate_autoscale_leader",
            "poolgate_batch_jobs",
            "poolgate_batch_nodes_busy",
            "poolgate_state_file_failing",
            "poolgate_autoscale_provider_up",
        ] {
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} missing:\n{text}"
            );
        }
        assert!(
            text.contains("poolgate_sessions_active{protocol=\"ssh\",vm=\"vm-a\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("poolgate_vm_state{state=\"healthy\",vm=\"vm-a\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("poolgate_vm_protocol_up{protocol=\"http\",vm=\"vm-a\"} 1"),
            "{text}"
        );
        // The web side down: SSH still up, so the VM is up.
        pool.set_protocol_health("vm-a", Protocol::Http, Health::Down);
        let text = metrics.render(&pool);
        assert!(text.contains("poolgate_vm_up{vm=\"vm-a\"} 1"), "{text}");
        assert!(
            text.contains("poolgate_vm_protocol_up{protocol=\"http\",vm=\"vm-a\"} 0"),
            "{text}"
        );
        // The certificate's expiry, counted down from now at each scrape.
        metrics.tls_not_after.set(Some((
            "acme",
            SystemTime::now() + Duration::from_secs(3600),
        )));
        let text = metrics.render(&pool);
        let left = text
            .lines()
            .find_map(|l| l.strip_prefix("poolgate_tls_cert_expiry_seconds{source=\"acme\"} "))
            .and_then(|v| v.parse::<f64>().ok());
        assert!(
            left.is_some_and(|s| (3590.0..=3600.0).contains(&s)),
            "{text}"
        );
        drop(guard);
        let text = metrics.render(&pool);
        assert!(
            text.contains("poolgate_sessions_active{protocol=\"ssh\",vm=\"vm-a\"} 0"),
            "{text}"
        );
    }
}
