//! `poolgate simulate`: replays a session trace (with detached jobs and batch jobs, when given)
//! through the autoscale policy and two baselines (router-core's [`sim`](router_core::sim)) and
//! renders the comparison as a table or JSON.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use poolgate_config::{ConfigError, SimulationConfig};
use router_core::sim::{self, Comparison, Report, SimParams, Workload};
use serde::Serialize;

use crate::autoscale::schedule::Schedule;
use crate::cli::{OutputFormat, SimulateArgs};

/// Why a simulation could not run.
#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    /// The trace file could not be read.
    #[error("cannot read the trace {path}: {source}")]
    ReadTrace {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The trace is malformed.
    #[error("{path}: {source}")]
    Trace {
        /// The file.
        path: String,
        /// Line and problem.
        source: sim::TraceError,
    },
    /// The configuration file is unusable (every problem, one a line).
    #[error("{0}")]
    Config(String),
    /// `--trace-start` is not a time.
    #[error(
        "--trace-start \"{0}\": {1} (write it like 2026-12-07T00:00, in the schedule's time zone, or 2026-12-07T00:00:00+01:00)"
    )]
    TraceStart(String, String),
    /// A batch job asks for more nodes than the pool can ever have.
    #[error(
        "{path}: batch job {job:?} (submitted at {submit_s} s) asks for {nodes} nodes, more than autoscale.max_vms = {max_vms}: Slurm would reject it; lower its nodes or raise autoscale.max_vms"
    )]
    BatchTooLarge {
        /// The batch trace.
        path: String,
        /// The job's label.
        job: String,
        /// When it is submitted.
        submit_s: u64,
        /// Nodes asked for.
        nodes: u32,
        /// The pool's limit.
        max_vms: u32,
    },
    /// `--boot-seconds` is out of range.
    #[error("--boot-seconds {0} is more than a day ({max}); give a realistic boot time", max = sim::MAX_BOOT_SECONDS)]
    Boot(u64),
}

/// Runs `poolgate simulate` and returns what to print.
pub fn run(args: &SimulateArgs) -> Result<String, SimulateError> {
    let config = match &args.config {
        Some(path) => load_config(path)?,
        None => SimulationConfig::default(),
    };
    if args.boot_seconds > sim::MAX_BOOT_SECONDS {
        return Err(SimulateError::Boot(args.boot_seconds));
    }
    let path = args.trace.display().to_string();
    let text = std::fs::read_to_string(&args.trace).map_err(|source| SimulateError::ReadTrace {
        path: path.clone(),
        source,
    })?;
    let trace = sim::parse_trace(&text).map_err(|source| SimulateError::Trace {
        path: path.clone(),
        source,
    })?;
    let jobs = match &args.jobs {
        Some(file) => {
            let jobs_path = file.display().to_string();
            let text =
                std::fs::read_to_string(file).map_err(|source| SimulateError::ReadTrace {
                    path: jobs_path.clone(),
                    source,
                })?;
            sim::parse_jobs(&text).map_err(|source| SimulateError::Trace {
                path: jobs_path,
                source,
            })?
        }
        None => Vec::new(),
    };
    let params = params(&config, args.boot_seconds);
    let batch = match &args.batch {
        Some(file) => read_batch(file, params.autoscale.max_vms)?,
        None => Vec::new(),
    };
    let workload = Workload {
        sessions: &trace,
        jobs: &jobs,
        batch: &batch,
    };
    let schedule = Schedule::new(&config.autoscale.schedule)
        .map_err(|e| SimulateError::Config(e.to_string()))?;
    let start = trace_start(args.trace_start.as_deref(), &schedule)?;
    // The schedule's floor `t` seconds into the trace, looked at a boot ahead like the driver.
    let min_warm = |t: u64| {
        let at = i64::try_from(t)
            .ok()
            .and_then(|t| start.checked_add(jiff::SignedDuration::from_secs(t)).ok());
        at.map_or(0, |at| schedule.floor_ahead(at, params.boot).min_vms)
    };
    let comparison = sim::compare_workload(&workload, &params, &min_warm);
    Ok(match args.format {
        OutputFormat::Json => json_with(&comparison, args.batch.is_some()),
        OutputFormat::Text => {
            let mut out = text_table(&path, &params, &comparison);
            if !schedule.is_empty() {
                // The same policy without the windows: what the schedule buys and costs.
                let plain = sim::compare_workload(&workload, &params, &|_| 0).policy;
                let r = &comparison.policy;
                out.push_str(&format!(
                    "\nschedule (policy only): {schedule}; trace second 0 is {}\n\
                     without it the policy would use {:.1} VM-hours ({:+.1} %), wait p95 {} s, max {} s, {} session(s) waiting\n",
                    start.to_zoned_datetime(schedule.first_zone()),
                    plain.vm_hours,
                    100.0 * (r.vm_hours - plain.vm_hours) / plain.vm_hours.max(f64::MIN_POSITIVE),
                    plain.wait_p95_s,
                    plain.wait_max_s,
                    plain.waited_sessions,
                ));
            }
            if !jobs.is_empty() {
                out.push_str(&jobs_summary(jobs.len(), &params, &comparison));
            }
            if args.batch.is_some() {
                out.push_str(&batch_table(&comparison));
            }
            out
        }
    })
}

/// Reads and parses a batch trace; a job wider than `max_vms` is an error (Slurm refuses a job
/// asking for more nodes than its partition has).
fn read_batch(file: &Path, max_vms: u32) -> Result<Vec<sim::TraceBatchJob>, SimulateError> {
    let path = file.display().to_string();
    let text = std::fs::read_to_string(file).map_err(|source| SimulateError::ReadTrace {
        path: path.clone(),
        source,
    })?;
    let batch = sim::parse_batch(&text).map_err(|source| SimulateError::Trace {
        path: path.clone(),
        source,
    })?;
    if let Some(j) = batch.iter().find(|j| j.nodes > max_vms) {
        return Err(SimulateError::BatchTooLarge {
            path,
            job: j.job.clone(),
            submit_s: j.submit_s,
            nodes: j.nodes,
            max_vms,
        });
    }
    Ok(batch)
}

/// The batch jobs per strategy: waits, killed runs and the node-hours they threw away.
fn batch_table(c: &Comparison) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "
{} batch job(s) (FIFO queue, one job per VM; a job killed by scale-in is requeued and runs again)",
        c.batch_jobs
    );
    let _ = writeln!(
        out,
        "{:<15} {:>12} {:>12} {:>12} {:>7} {:>11} {:>10}",
        "strategy",
        "job wait p50",
        "job wait p95",
        "job wait max",
        "killed",
        "lost node-h",
        "unfinished"
    );
    for (name, r) in [
        ("policy", &c.policy),
        ("always-on", &c.always_on),
        ("cpu-threshold", &c.cpu_threshold),
    ] {
        let b = &r.batch;
        let _ = writeln!(
            out,
            "{:<15} {:>10} s {:>10} s {:>10} s {:>7} {:>11.1} {:>10}",
            name,
            b.wait_p50_s,
            b.wait_p95_s,
            b.wait_max_s,
            b.killed,
            b.lost_node_hours,
            b.unfinished
        );
    }
    out
}

/// The wall-clock instant of the trace's second 0: `--trace-start` as a timestamp with an offset,
/// or a civil time in the schedule's (first window's) time zone; by default Monday 2024-01-01
/// 00:00 there.
fn trace_start(text: Option<&str>, schedule: &Schedule) -> Result<jiff::Timestamp, SimulateError> {
    let zone = schedule.first_zone();
    let fail =
        |text: &str, e: jiff::Error| SimulateError::TraceStart(text.to_owned(), e.to_string());
    let Some(text) = text else {
        return jiff::civil::date(2024, 1, 1)
            .to_datetime(jiff::civil::Time::midnight())
            .to_zoned_datetime(zone)
            .map(|z| z.timestamp())
            .map_err(|e| fail("2024-01-01T00:00", e));
    };
    if let Ok(at) = text.parse::<jiff::Timestamp>() {
        return Ok(at);
    }
    let civil: jiff::civil::DateTime = text.parse().map_err(|e| fail(text, e))?;
    civil
        .to_zoned_datetime(zone)
        .map(|z| z.timestamp())
        .map_err(|e| fail(text, e))
}

/// The `[autoscale]` section (and the per-VM session cap) of `path`; nothing else in the file
/// is validated and no file it names is opened (see [`poolgate_config::load_simulation`]).
fn load_config(path: &Path) -> Result<SimulationConfig, SimulateError> {
    poolgate_config::load_simulation(path).map_err(|e| match e {
        ConfigError::Invalid(errors) => SimulateError::Config(
            errors
                .iter()
                .map(ToString::to_string)
                .chain([format!("{}: {} error(s)", path.display(), errors.len())])
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        other => SimulateError::Config(other.to_string()),
    })
}

/// The simulation parameters for a configuration: its `[autoscale]` numbers and tick, and the
/// per-VM session cap its provider section sets (`max_sessions`); twice `sessions_per_vm` when
/// it sets none (no `[pool.azure]`/`[pool.exec]`, no static backends, or the demo pool).
pub fn params(config: &SimulationConfig, boot_seconds: u64) -> SimParams {
    let a = &config.autoscale;
    let mut params = SimParams::new(
        crate::app::autoscale_policy(a),
        Duration::from_secs(boot_seconds),
    );
    params.tick = a.tick;
    if let Some(cap) = config.max_sessions {
        params.max_sessions = cap.max(1);
    }
    params.busy_check = !a.busy_command.is_empty();
    params
}

/// What happened to the detached jobs (they are counted in "killed" too).
fn jobs_summary(count: usize, p: &SimParams, c: &Comparison) -> String {
    format!(
        "\n{count} detached job(s); killed by scale-in: policy {} (busy check {}), always-on {}, cpu-threshold {}\n",
        c.policy.killed_jobs,
        if p.busy_check {
            "on"
        } else {
            "off: autoscale.busy_command = []"
        },
        c.always_on.killed_jobs,
        c.cpu_threshold.killed_jobs,
    )
}

#[derive(Serialize)]
struct JsonReport {
    vm_hours: f64,
    killed_sessions: u64,
    wait_p50_s: f64,
    wait_p95_s: f64,
    wait_max_s: f64,
    peak_vms: u32,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    batch: Option<JsonBatch>,
}

/// The batch keys, present when a batch trace was replayed.
#[derive(Serialize)]
struct JsonBatch {
    job_wait_p50_s: f64,
    job_wait_p95_s: f64,
    job_wait_max_s: f64,
    killed_batch_jobs: u64,
    lost_batch_node_hours: f64,
}

impl JsonReport {
    fn new(r: &Report, with_batch: bool) -> Self {
        let b = &r.batch;
        Self {
            vm_hours: (r.vm_hours * 100.0).round() / 100.0,
            killed_sessions: r.killed_sessions,
            wait_p50_s: r.wait_p50_s,
            wait_p95_s: r.wait_p95_s,
            wait_max_s: r.wait_max_s,
            peak_vms: r.peak_vms,
            batch: with_batch.then(|| JsonBatch {
                job_wait_p50_s: b.wait_p50_s,
                job_wait_p95_s: b.wait_p95_s,
                job_wait_max_s: b.wait_max_s,
                killed_batch_jobs: b.killed,
                lost_batch_node_hours: (b.lost_node_hours * 100.0).round() / 100.0,
            }),
        }
    }
}

#[derive(Serialize)]
struct JsonComparison {
    policy: JsonReport,
    always_on: JsonReport,
    cpu_threshold: JsonReport,
}

/// One JSON object keyed `policy`, `always_on`, `cpu_threshold`, with a newline.
pub fn json(c: &Comparison) -> String {
    json_with(c, false)
}

/// [`json`], with the batch keys in each strategy's object when `with_batch`.
pub fn json_with(c: &Comparison, with_batch: bool) -> String {
    let out = JsonComparison {
        policy: JsonReport::new(&c.policy, with_batch),
        always_on: JsonReport::new(&c.always_on, with_batch),
        cpu_threshold: JsonReport::new(&c.cpu_threshold, with_batch),
    };
    // Plain numbers and strings: serializing cannot fail.
    let mut text = serde_json::to_string_pretty(&out).unwrap_or_default();
    text.push('\n');
    text
}

/// A table of the three strategies, with the parameters used.
pub fn text_table(trace: &str, p: &SimParams, c: &Comparison) -> String {
    let a = &p.autoscale;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "trace {trace}: {} sessions over {:.1} h",
        c.sessions,
        c.horizon_s as f64 / 3600.0
    );
    let _ = writeln!(
        out,
        "VMs boot in {} s; {}-{} VMs, {} sessions per VM (cap {}), {} spare, scale in after {}, to zero after {}, cooldown {}, tick {}",
        p.boot.as_secs(),
        a.min_vms,
        a.max_vms,
        a.sessions_per_vm,
        p.max_sessions,
        a.spare_vms,
        humantime::format_duration(a.scale_in_after),
        humantime::format_duration(a.scale_to_zero_after),
        humantime::format_duration(a.cooldown),
        humantime::format_duration(p.tick),
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<15} {:>9} {:>7} {:>9} {:>9} {:>9} {:>7} {:>8}",
        "strategy", "VM-hours", "killed", "wait p50", "wait p95", "wait max", "waited", "peak VMs"
    );
    for (name, r) in [
        ("policy", &c.policy),
        ("always-on", &c.always_on),
        ("cpu-threshold", &c.cpu_threshold),
    ] {
        let _ = writeln!(
            out,
            "{:<15} {:>9.1} {:>7} {:>7} s {:>7} s {:>7} s {:>7} {:>8}",
            name,
            r.vm_hours,
            r.killed_sessions,
            r.wait_p50_s,
            r.wait_p95_s,
            r.wait_max_s,
            r.waited_sessions,
            r.peak_vms
        );
    }
    for (name, r) in [
        ("policy", &c.policy),
        ("always-on", &c.always_on),
        ("cpu-threshold", &c.cpu_threshold),
    ] {
        if r.unserved_sessions > 0 {
            let _ = writeln!(
                out,
                "{name}: {} session(s) never found a VM (the pool could not grow)",
                r.unserved_sessions
            );
        }
    }
    if c.always_on.vm_hours > 0.0 {
        let _ = writeln!(
            out,
            "\npolicy uses {:.0} % of always-on's VM-hours and {:.0} % of cpu-threshold's",
            100.0 * c.policy.vm_hours / c.always_on.vm_hours,
            100.0 * c.policy.vm_hours / c.cpu_threshold.vm_hours.max(f64::MIN_POSITIVE),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_comes_from_the_provider_section_or_defaults_to_twice_the_target() {
        let mut full = poolgate_config::Config::default();
        assert_eq!(
            params(&SimulationConfig::from_config(&full), 90).max_sessions,
            8
        );
        full.pool.provider = poolgate_config::Provider::Exec;
        full.pool.exec = Some(poolgate_config::Exec {
            max_sessions: 6,
            ..Default::default()
        });
        let config = SimulationConfig::from_config(&full);
        let p = params(&config, 30);
        assert_eq!((p.max_sessions, p.boot.as_secs()), (6, 30));
        assert_eq!(p.tick, config.autoscale.tick);
    }

    #[test]
    fn json_has_exactly_the_documented_keys() {
        let c = sim::compare(&[], &params(&SimulationConfig::default(), 90));
        let v: serde_json::Value = serde_json::from_str(&json(&c)).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys.len(), 3);
        for k in ["policy", "always_on", "cpu_threshold"] {
            let r = v[k].as_object().unwrap();
            let mut fields: Vec<&str> = r.keys().map(String::as_str).collect();
            fields.sort_unstable();
            assert_eq!(
                fields,
                [
                    "killed_sessions",
                    "peak_vms",
                    "vm_hours",
                    "wait_max_s",
                    "wait_p50_s",
                    "wait_p95_s"
                ]
            );
        }
    }

    #[test]
    fn json_with_a_batch_trace_adds_the_batch_keys_only() {
        let c = sim::compare(&[], &params(&SimulationConfig::default(), 90));
        let v: serde_json::Value = serde_json::from_str(&json_with(&c, true)).unwrap();
        for k in ["policy", "always_on", "cpu_threshold"] {
            let mut fields: Vec<&str> = v[k]
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            fields.sort_unstable();
            assert_eq!(
                fields,
                [
                    "job_wait_max_s",
                    "job_wait_p50_s",
                    "job_wait_p95_s",
                    "killed_batch_jobs",
                    "killed_sessions",
                    "lost_batch_node_hours",
                    "peak_vms",
                    "vm_hours",
                    "wait_max_s",
                    "wait_p50_s",
                    "wait_p95_s"
                ]
            );
        }
        assert_eq!(json(&c), json_with(&c, false));
    }
}
