//! `poolgate simulate` as users run it: the real binary on the committed sample week
//! (benches/traces/sample-week.csv, made by `gen_trace`), JSON shape and the issue's targets —
//! the policy kills no session, uses at most half the VM-hours of always-on, and its p95 wait
//! is within one boot time. Also: bad input fails with the line and no panic. `--batch`: batch
//! jobs wait at most a tick and a boot under the policy and are never killed by it, the CPU rule
//! kills (requeues) a running one, and the JSON gains the batch keys.

use std::process::Command;
use std::time::Duration;

use poolgate_tests::*;

const BOOT_SECONDS: f64 = 90.0;

fn simulate(args: &[&str]) -> std::process::Output {
    run_with_timeout(
        Command::new(poolgate_bin())
            .arg("simulate")
            .args(args)
            .current_dir(workspace_dir()),
        Duration::from_secs(120),
    )
}

#[test]
fn sample_week_json_has_the_documented_shape_and_meets_the_targets() {
    let out = simulate(&[
        "--trace",
        "benches/traces/sample-week.csv",
        "--format",
        "json",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "simulate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON object");
    let top = v.as_object().expect("an object");
    let mut keys: Vec<&str> = top.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["always_on", "cpu_threshold", "policy"], "{stdout}");
    for (name, report) in top {
        let fields = report.as_object().expect("each strategy is an object");
        let mut names: Vec<&str> = fields.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "killed_sessions",
                "peak_vms",
                "vm_hours",
                "wait_max_s",
                "wait_p50_s",
                "wait_p95_s"
            ],
            "{name}"
        );
        assert!(
            report["vm_hours"].as_f64().is_some_and(|h| h > 0.0),
            "{name}"
        );
        assert!(report["killed_sessions"].is_u64(), "{name}");
        assert!(
            report["peak_vms"].as_u64().is_some_and(|p| p >= 1),
            "{name}"
        );
        let p50 = report["wait_p50_s"].as_f64().expect("p50 is a number");
        let p95 = report["wait_p95_s"].as_f64().expect("p95 is a number");
        assert!(0.0 <= p50 && p50 <= p95, "{name}: {p50} {p95}");
    }
    let policy = &v["policy"];
    let always_on = &v["always_on"];
    assert_eq!(policy["killed_sessions"], 0, "{stdout}");
    let (hours, always_hours) = (
        policy["vm_hours"].as_f64().unwrap(),
        always_on["vm_hours"].as_f64().unwrap(),
    );
    assert!(
        hours <= always_hours / 2.0,
        "policy {hours} VM-hours vs always-on {always_hours}"
    );
    assert!(
        policy["wait_p95_s"].as_f64().unwrap() <= BOOT_SECONDS,
        "{stdout}"
    );
    // Defaults: max_vms = 10, never exceeded; always-on runs all of them.
    assert!(policy["peak_vms"].as_u64().unwrap() <= 10);
    assert_eq!(always_on["peak_vms"], 10);
    assert_eq!(always_on["killed_sessions"], 0);
}

#[test]
fn text_output_compares_the_three_strategies() {
    let out = simulate(&["--trace", "benches/traces/sample-week.csv"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "policy",
        "always-on",
        "cpu-threshold",
        "VM-hours",
        "wait p95",
    ] {
        assert!(text.contains(needle), "{needle} missing:\n{text}");
    }
}

#[test]
fn a_bad_trace_fails_with_its_line_and_a_missing_one_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.csv");
    std::fs::write(
        &bad,
        "user,protocol,start_s,end_s\nann,ssh,10,20\nbob,ssh,30\n",
    )
    .unwrap();
    let out = simulate(&["--trace", bad.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("line 3"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let out = simulate(&["--trace", "no/such/trace.csv"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no/such/trace.csv"), "{stderr}");
}

/// `--jobs`: detached jobs (nohup/tmux runs the gateway does not see). The policy asks the VMs
/// before scaling in and kills none; the CPU rule removes a VM with a run on it. The JSON keys
/// stay exactly the documented ones.
#[test]
fn detached_jobs_are_killed_by_the_cpu_rule_but_not_by_the_policy() {
    let dir = tempfile::tempdir().expect("temp dir");
    let trace = dir.path().join("class.csv");
    let mut text = String::from("user,protocol,start_s,end_s\n");
    for i in 0..12 {
        text += &format!("u{i},ssh,{},1800\n", i * 30);
    }
    std::fs::write(&trace, text).expect("write trace");
    let jobs = dir.path().join("jobs.csv");
    std::fs::write(
        &jobs,
        "user,start_s,end_s\n# three training runs under nohup\nu9,900,21600\nu10,900,21600\nu11,900,25200\n",
    )
    .expect("write jobs");
    let (trace, jobs) = (trace.display().to_string(), jobs.display().to_string());

    let out = simulate(&["--trace", &trace, "--jobs", &jobs, "--format", "json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON object");
    for name in ["policy", "always_on", "cpu_threshold"] {
        let mut keys: Vec<&str> = v[name]
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "killed_sessions",
                "peak_vms",
                "vm_hours",
                "wait_max_s",
                "wait_p50_s",
                "wait_p95_s"
            ],
            "{name}"
        );
    }
    assert_eq!(v["policy"]["killed_sessions"], 0, "{stdout}");
    assert_eq!(v["always_on"]["killed_sessions"], 0, "{stdout}");
    assert!(
        v["cpu_threshold"]["killed_sessions"]
            .as_u64()
            .is_some_and(|k| k >= 1),
        "{stdout}"
    );

    let out = simulate(&["--trace", &trace, "--jobs", &jobs]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("3 detached job(s); killed by scale-in: policy 0 (busy check on)"),
        "{stdout}"
    );

    // A what-if file turning the busy check off: the policy then kills the runs too.
    let blind = dir.path().join("no-busy-check.toml");
    std::fs::write(&blind, "[autoscale]\nbusy_command = []\n").expect("write what-if");
    let out = simulate(&[
        "--trace",
        &trace,
        "--jobs",
        &jobs,
        "--config",
        &blind.display().to_string(),
        "--format",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(&String::from_utf8_lossy(&out.stdout)).expect("one JSON object");
    assert!(
        v["policy"]["killed_sessions"]
            .as_u64()
            .is_some_and(|k| k >= 1),
        "without the busy check the policy kills detached jobs: {v}"
    );

    // The committed sample week with its detached jobs: the policy kills none of them.
    let out = simulate(&[
        "--trace",
        "benches/traces/sample-week.csv",
        "--jobs",
        "benches/traces/sample-week-jobs.csv",
        "--format",
        "json",
    ]);
    let v: serde_json::Value =
        serde_json::from_str(&String::from_utf8_lossy(&out.stdout)).expect("one JSON object");
    assert_eq!(v["policy"]["killed_sessions"], 0, "{v}");
    assert!(
        v["cpu_threshold"]["killed_sessions"]
            .as_u64()
            .is_some_and(|k| k > 0),
        "{v}"
    );

    // A bad job trace fails with its path and line.
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "user,start_s,end_s\nann,10\n").expect("write");
    let out = simulate(&["--trace", &trace, "--jobs", &bad.display().to_string()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("bad.csv") && stderr.contains("line 2"),
        "{stderr}"
    );
}

/// `simulate --config FILE --format json` on the sample week; the parsed report.
fn simulate_with(config: &std::path::Path) -> serde_json::Value {
    let out = simulate(&[
        "--config",
        config.to_str().expect("a UTF-8 temp path"),
        "--trace",
        "benches/traces/sample-week.csv",
        "--format",
        "json",
    ]);
    assert!(
        out.status.success(),
        "simulate --config {} failed: {}",
        config.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

#[test]
fn a_what_if_file_with_only_autoscale_is_replayed_with_its_values() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, max_vms: u32| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "# what if the pool were capped?\n[autoscale]\nenabled = true\nmax_vms = {max_vms}\nsessions_per_vm = 4\nscale_in_after = \"10m\"\n"
            ),
        )
        .unwrap();
        path
    };
    let small = simulate_with(&write("only-autoscale-2.toml", 2));
    let large = simulate_with(&write("only-autoscale-6.toml", 6));
    // Always-on runs max_vms VMs all week: the file's value, not the default 10.
    assert_eq!(small["always_on"]["peak_vms"], 2, "{small}");
    assert_eq!(large["always_on"]["peak_vms"], 6, "{large}");
    let (small_peak, large_peak) = (
        small["policy"]["peak_vms"].as_u64().unwrap(),
        large["policy"]["peak_vms"].as_u64().unwrap(),
    );
    assert!(small_peak <= 2, "{small}");
    assert!(
        large_peak > small_peak,
        "a larger max_vms lets the policy grow further on the sample week: {small_peak} vs {large_peak}"
    );
    // Nothing was generated next to the file (no keys, no cookie secret).
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["only-autoscale-2.toml", "only-autoscale-6.toml"]);
}

#[test]
fn a_full_gateway_config_works_without_the_files_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("poolgate.toml");
    // known_hosts, TLS and keys are on the gateway host, not here; the exec provider's
    // programs do not exist either. Only [autoscale] and pool.exec.max_sessions are used.
    std::fs::write(
        &path,
        r#"
[listen]
https = "0.0.0.0:8443"
[tls]
cert = "/nonexistent/poolgate/cert.pem"
key = "/nonexistent/poolgate/key.pem"
[ssh]
host_keys = ["/nonexistent/poolgate/ssh_host_ed25519_key"]
backend_known_hosts = "/nonexistent/poolgate/known_hosts"
[pool]
provider = "exec"
[pool.exec]
list = ["/nonexistent/pool-vms", "list"]
start = ["/nonexistent/pool-vms", "start"]
stop = ["/nonexistent/pool-vms", "stop"]
max_sessions = 6
[autoscale]
enabled = true
max_vms = 3
"#,
    )
    .unwrap();
    let v = simulate_with(&path);
    assert_eq!(v["always_on"]["peak_vms"], 3, "{v}");
    assert!(v["policy"]["peak_vms"].as_u64().unwrap() <= 3, "{v}");
}

#[test]
fn a_bad_autoscale_value_fails_with_its_key_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("what-if.toml");
    std::fs::write(
        &path,
        "[autoscale]\nmax_vms = 0\ntick = \"5 parsecs\"\ncooldwn = \"1m\"\n",
    )
    .unwrap();
    let out = simulate(&[
        "--config",
        path.to_str().unwrap(),
        "--trace",
        "benches/traces/sample-week.csv",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(out.stdout.is_empty(), "no report on a bad file");
    for needle in [
        "autoscale.max_vms: must be at least 1",
        "autoscale.tick: ",
        "autoscale.cooldwn: unknown key (did you mean \"cooldown\"?)",
        "what-if.toml: 3 error(s)",
    ] {
        assert!(stderr.contains(needle), "{needle:?} not in:\n{stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A morning trace for the schedule tests: ann at 09:00 and bob at 09:05 local time on the
/// trace's day 0, and ann again at 09:00 on day 1.
fn two_mornings(dir: &std::path::Path) -> String {
    let trace = dir.join("mornings.csv");
    let h = 3600;
    let text = format!(
        "user,protocol,start_s,end_s\nann,ssh,{},{}\nbob,http,{},{}\nann,ssh,{},{}\n",
        9 * h,
        11 * h,
        9 * h + 300,
        12 * h,
        33 * h,
        35 * h
    );
    std::fs::write(&trace, text).expect("write trace");
    trace.display().to_string()
}

#[test]
fn a_schedule_window_prewarms_the_morning_in_its_own_time_zone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let trace = two_mornings(dir.path());
    // Weekdays 08:00-10:00 in Berlin keep one VM warm; VMs boot in 300 s.
    let config = dir.path().join("what-if.toml");
    std::fs::write(
        &config,
        "[autoscale]\n[[autoscale.schedule]]\ndays = [\"mon\", \"tue\", \"wed\", \"thu\", \"fri\"]\nfrom = \"08:00\"\nto = \"10:00\"\ntime_zone = \"Europe/Berlin\"\nmin_vms = 1\n",
    )
    .expect("write config");
    let config = config.display().to_string();
    let run = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "--trace",
            trace.as_str(),
            "--boot-seconds",
            "300",
            "--format",
            "json",
        ];
        args.extend_from_slice(extra);
        let out = simulate(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("json")
    };
    // Without a schedule the first arrival of each morning waits a boot.
    let plain = run(&[]);
    assert_eq!(plain["policy"]["wait_max_s"], 300.0, "{plain}");
    // With it (default start: a Monday 00:00 in Berlin), nobody waits, and it costs VM-hours.
    let warm = run(&["--config", &config]);
    assert_eq!(warm["policy"]["wait_max_s"], 0.0, "{warm}");
    assert!(
        warm["policy"]["vm_hours"].as_f64() > plain["policy"]["vm_hours"].as_f64(),
        "{warm} vs {plain}"
    );
    // The baselines have no schedule.
    assert_eq!(warm["always_on"], plain["always_on"]);
    // A trace that starts on a Saturday: day 0 has no window, day 1 (Sunday) neither.
    let weekend = run(&["--config", &config, "--trace-start", "2026-12-05T00:00"]);
    assert_eq!(weekend["policy"], plain["policy"], "{weekend}");
    // A start with an offset is taken as is: Monday 03:00 UTC is 04:00 in Berlin, so the
    // mornings land at 13:00 there, long after the window; they wait a boot again.
    let late = run(&["--config", &config, "--trace-start", "2026-12-07T03:00:00Z"]);
    assert_eq!(late["policy"]["wait_max_s"], 300.0, "{late}");
    // The text output names the window and what the policy would do without it.
    let out = simulate(&[
        "--trace",
        &trace,
        "--boot-seconds",
        "300",
        "--config",
        &config,
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("schedule (policy only): mon-fri 08:00-10:00 Europe/Berlin (1 VMs)")
            && text.contains("without it the policy would use"),
        "{text}"
    );
}

#[test]
fn a_bad_schedule_or_trace_start_fails_with_the_key_or_the_option() {
    let dir = tempfile::tempdir().expect("tempdir");
    let trace = two_mornings(dir.path());
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        "[autoscale]\n[[autoscale.schedule]]\nfrom = \"25:00\"\nto = \"10:00\"\ntime_zone = \"Europe/Nowhere\"\n",
    )
    .expect("write config");
    let out = simulate(&["--trace", &trace, "--config", &config.display().to_string()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("autoscale.schedule[0].from")
            && stderr.contains("autoscale.schedule[0].time_zone"),
        "{stderr}"
    );
    let out = simulate(&["--trace", &trace, "--trace-start", "next monday"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--trace-start \"next monday\""), "{stderr}");
}

/// The batch keys `--batch` adds to each strategy's object, next to the documented six.
const BATCH_KEYS: [&str; 11] = [
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
    "wait_p95_s",
];

fn json_ok(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "simulate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

/// `--batch`: 24 people for an hour make the CPU rule grow the pool; a 6-hour job submitted at
/// 50 min lands on a newer VM, which the rule removes once they leave: the job is killed and
/// requeued. The policy never removes a VM running a job.
#[test]
fn batch_jobs_are_killed_by_the_cpu_rule_but_never_by_the_policy() {
    let dir = tempfile::tempdir().expect("temp dir");
    let trace = dir.path().join("crowd.csv");
    let mut text = String::from("user,protocol,start_s,end_s\n");
    for i in 0..24 {
        text += &format!("u{i},ssh,0,3600\n");
    }
    std::fs::write(&trace, text).expect("write trace");
    let batch = dir.path().join("batch.csv");
    std::fs::write(
        &batch,
        "job,submit_s,duration_s,nodes\n# a training run submitted with sbatch\ntrain,3000,21600,1\n",
    )
    .expect("write batch");
    let (trace, batch) = (trace.display().to_string(), batch.display().to_string());

    let v = json_ok(&simulate(&[
        "--trace", &trace, "--batch", &batch, "--format", "json",
    ]));
    for name in ["policy", "always_on", "cpu_threshold"] {
        let mut keys: Vec<&str> = v[name]
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(keys, BATCH_KEYS, "{name}");
    }
    assert_eq!(v["policy"]["killed_batch_jobs"], 0, "{v}");
    assert_eq!(v["policy"]["lost_batch_node_hours"], 0.0, "{v}");
    assert_eq!(v["always_on"]["killed_batch_jobs"], 0, "{v}");
    let cpu = &v["cpu_threshold"];
    assert!(
        cpu["killed_batch_jobs"].as_u64().is_some_and(|k| k >= 1),
        "{v}"
    );
    assert!(
        cpu["lost_batch_node_hours"]
            .as_f64()
            .is_some_and(|h| h > 0.0),
        "{v}"
    );
    // The requeued run waits again: its wait is the time since it was killed.
    assert!(cpu["job_wait_max_s"].as_f64().is_some(), "{v}");

    let out = simulate(&["--trace", &trace, "--batch", &batch]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for needle in ["1 batch job(s)", "job wait p95", "lost node-h"] {
        assert!(text.contains(needle), "{needle} missing:\n{text}");
    }
}

/// The committed sample week with its batch jobs (`gen_trace --seed 6 --batch`): a job submitted
/// to a pool at zero waits at most a tick and a boot at p95 under the policy, none is killed, and
/// always-on never makes one wait.
#[test]
fn sample_week_with_batch_jobs_meets_the_targets() {
    let v = json_ok(&simulate(&[
        "--trace",
        "benches/traces/sample-week.csv",
        "--batch",
        "benches/traces/sample-week-batch.csv",
        "--format",
        "json",
    ]));
    let policy = &v["policy"];
    assert_eq!(policy["killed_batch_jobs"], 0, "{v}");
    assert_eq!(policy["killed_sessions"], 0, "{v}");
    assert!(
        policy["job_wait_p95_s"]
            .as_f64()
            .is_some_and(|w| w <= BOOT_SECONDS + 10.0),
        "{v}"
    );
    assert_eq!(v["always_on"]["job_wait_max_s"], 0.0, "{v}");
    assert!(
        policy["vm_hours"].as_f64() < v["cpu_threshold"]["vm_hours"].as_f64(),
        "{v}"
    );
}

#[test]
fn a_bad_batch_trace_fails_with_its_path_and_line_or_the_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let trace = dir.path().join("empty.csv");
    std::fs::write(&trace, "user,protocol,start_s,end_s\n").expect("write");
    let trace = trace.display().to_string();
    let bad = dir.path().join("bad-batch.csv");
    std::fs::write(
        &bad,
        "job,submit_s,duration_s,nodes\nok,0,60,1\nwide,10,60,0\n",
    )
    .expect("write");
    let out = simulate(&["--trace", &trace, "--batch", &bad.display().to_string()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("bad-batch.csv") && stderr.contains("line 3") && stderr.contains("nodes"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    // Wider than the pool can grow: Slurm would refuse it; the message names the key.
    let wide = dir.path().join("wide.csv");
    std::fs::write(&wide, "job,submit_s,duration_s,nodes\nmpi,0,60,11\n").expect("write");
    let out = simulate(&["--trace", &trace, "--batch", &wide.display().to_string()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("\"mpi\"") && stderr.contains("autoscale.max_vms = 10"),
        "{stderr}"
    );
}
