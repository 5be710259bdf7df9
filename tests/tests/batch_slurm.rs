//! `[batch]` end to end with a real Slurm (Debian `slurmctld`, `slurmd`, `slurm-client`,
//! `munge`) on loopback: each pool "VM" is a real sshd plus a `slurmd` for its node, started and
//! stopped together by the exec provider's scripts; a real gateway reads the queue, starts VMs
//! for pending jobs, keeps VMs that run jobs, drains and resumes nodes with the VMs, and rewrites
//! `ssh … pool submit|jobs|logs|cancel` into Slurm commands run as the user. The last tests read
//! the queue through a real `slurmrestd` with a JWT (`batch.rest_url`) instead of `squeue`; the
//! last one is a broken pool image (no slurmd), whose VM is reported and not chased.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use poolgate_tests::*;

/// VMs with sshd + slurmd behind a gateway with `[batch]`.
struct BatchPool {
    pool: GatewayPool,
    slurm: SlurmCluster,
    /// World-readable scratch for files the jobs wait on.
    shared: tempfile::TempDir,
    /// `batch.rest_token_file` when the queue is read through slurmrestd.
    token_file: Option<std::path::PathBuf>,
    // Fields drop in order: the processes the scripts started are killed (through their pid
    // files) before the VMs' directories holding those files go away.
    _cleanup: Vec<KillPidFile>,
    _vms: Vec<SshdVm>,
    _dir: tempfile::TempDir,
}

fn start(names: &[&str], users: usize) -> BatchPool {
    start_with(names, users, false)
}

/// With `rest`: the queue is read through slurmrestd, from the smallest such `[batch]` (URL and
/// token file; the token is `nobody`'s, as `scontrol token` printed it).
fn start_with(names: &[&str], users: usize, rest: bool) -> BatchPool {
    start_inner(names, users, rest, true, "")
}

/// With `slurmd` false the VMs are a broken pool image: their start scripts start sshd but no
/// slurmd, so their Slurm nodes never register. `batch_extra`: more `[batch]` lines.
fn start_inner(
    names: &[&str],
    users: usize,
    rest: bool,
    slurmd: bool,
    batch_extra: &str,
) -> BatchPool {
    let slurm = if rest {
        SlurmCluster::start_with_rest(names)
    } else {
        SlurmCluster::start(names)
    };
    let dir = tempfile::Builder::new()
        .prefix("poolgate-batch-e2e-")
        .tempdir()
        .expect("temp dir");
    let token_file = rest.then(|| {
        let path = dir.path().join("slurm_jwt");
        write_token(&path, &slurm.token("nobody", 3600));
        path
    });
    let batch = match &token_file {
        Some(token) => format!(
            "[batch]\nrest_url = \"{}\"\nrest_token_file = \"{}\"\n",
            slurm.rest_url(),
            token.display()
        ),
        None => {
            "[batch]\nengine = \"slurm\"\npartition = \"pool\"\nnode_name = \"{vm}\"\n".to_owned()
        }
    } + batch_extra;
    let ca = UserCa::generate();
    let conf = slurm.conf().display().to_string();
    let mut vms: Vec<SshdVm> = names
        .iter()
        .map(|name| {
            SshdVm::builder(name)
                .trusted_user_ca_keys(ca.public_key_path())
                .set_env("SLURM_CONF", &conf)
                .start()
        })
        .collect();
    for vm in &mut vms {
        vm.stop();
    }
    let mut cleanup: Vec<KillPidFile> = vms.iter().map(|vm| KillPidFile(vm.pid_file())).collect();
    cleanup.extend(names.iter().map(|n| KillPidFile(slurm.slurmd_pid_file(n))));
    let listed: Vec<(&str, u16, std::path::PathBuf)> = vms
        .iter()
        .map(|vm| (vm.name(), vm.port(), vm.pid_file()))
        .collect();
    let list = write_list_script(dir.path(), &listed);
    let sshd = tool("sshd").display().to_string();
    let starts: String = vms
        .iter()
        .map(|vm| {
            format!(
                "    {name}) {sshd} -f {cfg}; {slurmd} ;;\n",
                name = vm.name(),
                cfg = vm.config_path().display(),
                slurmd = if slurmd {
                    slurm.slurmd_command(vm.name())
                } else {
                    ":".to_owned()
                },
            )
        })
        .collect();
    let stops: String = vms
        .iter()
        .map(|vm| {
            format!(
                "    {name}) kill \"$(cat {pid})\"; rm -f {pid}; kill \"$(cat {spid})\" 2>/dev/null; rm -f {spid} ;;\n",
                name = vm.name(),
                pid = vm.pid_file().display(),
                spid = slurm.slurmd_pid_file(vm.name()).display(),
            )
        })
        .collect();
    let start = write_script(
        dir.path(),
        "start.sh",
        &format!("for vm in \"$@\"; do\n  case \"$vm\" in\n{starts}    *) exit 1 ;;\n  esac\ndone"),
    );
    let stop = write_script(
        dir.path(),
        "stop.sh",
        &format!("for vm in \"$@\"; do\n  case \"$vm\" in\n{stops}    *) exit 1 ;;\n  esac\ndone"),
    );
    let mut builder = GatewayPool::builder().users(users).user_ca(ca);
    for vm in &vms {
        builder = builder.known_vm(vm);
    }
    // The smallest [batch] a user writes; the gateway finds squeue, sinfo and scontrol on its
    // PATH and the cluster through SLURM_CONF, as on a gateway host with slurm-client (with
    // slurmrestd, scontrol still drains and resumes nodes).
    let pool = builder
        .gateway_env("SLURM_CONF", &conf)
        .config_toml(&format!(
            "[pool]\nprovider = \"exec\"\n[pool.exec]\nlist = [\"{list}\"]\nstart = [\"{start}\"]\n\
             stop = [\"{stop}\"]\npoll_interval = \"1s\"\ntimeout = \"30s\"\n\
             [autoscale]\nenabled = true\nmax_vms = {max}\nspare_vms = 0\n\
             scale_in_after = \"2s\"\nscale_to_zero_after = \"3s\"\ntick = \"1s\"\ncooldown = \"1s\"\n\
             boot_estimate = \"2s\"\nhold_connect_for = \"60s\"\nbusy_command = []\n{batch}",
            max = names.len(),
        ))
        .start();
    for name in names {
        pool.wait_for_state(name, "stopped", Duration::from_secs(20));
    }
    let shared = tempfile::Builder::new()
        .prefix("poolgate-batch-shared-")
        .tempdir()
        .expect("temp dir");
    std::fs::set_permissions(shared.path(), std::fs::Permissions::from_mode(0o777))
        .expect("chmod shared");
    BatchPool {
        pool,
        slurm,
        shared,
        token_file,
        _vms: vms,
        _cleanup: cleanup,
        _dir: dir,
    }
}

impl BatchPool {
    /// `ssh user_i HOST COMMAND`, bounded.
    fn ssh(&self, i: usize, command: &str) -> Output {
        self.pool
            .client(i)
            .timeout(Duration::from_secs(90))
            .run(command)
    }

    /// Writes an executable job script into user `i`'s home; returns its file name there
    /// (unique to this test: tests running at once share the test users' homes).
    fn job_script(&self, i: usize, name: &str, body: &str) -> String {
        let user = TestUsers::ensure(i).user(i).clone();
        let file = format!("{}-{name}", self.tag());
        let path = user.home.join(&file);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write job script");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod job");
        chown(&path, user.uid, user.gid);
        file
    }

    /// This test's tag (its shared directory's unique name).
    fn tag(&self) -> String {
        self.shared
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// A job body that runs until [`BatchPool::release`] (at most 90 s).
    fn wait_body(&self) -> String {
        format!(
            "i=0; while [ ! -f {}/release ] && [ $i -lt 900 ]; do sleep 0.1; i=$((i+1)); done",
            self.shared.path().display()
        )
    }

    /// `pool submit ARGS` as user `i`; asserts it succeeded and returns the job id.
    fn submit(&self, i: usize, args: &str) -> String {
        let out = self.ssh(i, &format!("pool submit {args}"));
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}\n{}",
            text(&out.stderr),
            self.context()
        );
        text(&out.stdout)
    }

    /// Waits (30 s at most) until Slurm runs job `id`.
    fn wait_running(&self, id: &str) {
        assert!(
            poll(Duration::from_secs(30), || self
                .slurm
                .job(id)
                .contains("JobState=RUNNING")),
            "job never ran: {}\n{}",
            self.slurm.job(id),
            self.context()
        );
    }

    fn release(&self) {
        std::fs::write(self.shared.path().join("release"), "").expect("release jobs");
    }

    fn context(&self) -> String {
        format!("{}\n--- slurm ---\n{}", self.pool.log(), self.slurm.logs())
    }
}

/// Writes a token file as an operator's cron job would: a new file, mode 0600, renamed over the
/// old one.
fn write_token(path: &Path, token: &str) {
    let new = path.with_extension("new");
    std::fs::write(&new, format!("{token}\n")).expect("write token");
    std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o600)).expect("chmod token");
    std::fs::rename(&new, path).expect("rename token");
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown");
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_owned()
}

/// Returns from the test unless the real parts of the batch tests are there (under CI: fails):
/// OpenSSH, Slurm's daemons and client, munge, root.
macro_rules! require_slurm {
    () => {
        require_tools!(
            "sshd",
            "ssh",
            "ssh-keygen",
            "slurmctld",
            "slurmd",
            "sbatch",
            "munged"
        );
        require_root!();
    };
}

/// [`require_slurm!`], and slurmrestd with its JWT plugin.
macro_rules! require_slurmrestd {
    () => {
        require_slurm!();
        require_tools!("slurmrestd");
        if !require_slurm_jwt_plugin() {
            return;
        }
    };
}

#[test]
fn a_job_submitted_to_a_pool_at_zero_wakes_a_vm_runs_there_and_reports_exit_code_3() {
    require_slurm!();
    let b = start(&["vm-a"], 1);
    let job = b.job_script(
        1,
        "job.sh",
        "echo \"hello from $SLURMD_NODENAME as $(id -un)\"\necho ran > \"$HOME/job-ran-$SLURM_JOB_ID\"\nexit 3",
    );
    // Submitting through the one hostname: the session wakes the VM, sbatch runs there as the
    // user, the job id comes back on stdout.
    let out = b.ssh(1, &format!("pool submit {job}"));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        text(&out.stderr),
        b.context()
    );
    let id = text(&out.stdout);
    assert!(
        id.chars().all(|c| c.is_ascii_digit()) && !id.is_empty(),
        "{id:?}"
    );
    assert!(text(&out.stderr).contains(&format!("pool logs {id}")));

    // `pool logs` follows the output to the end and exits with the job's code.
    let out = b.ssh(1, &format!("pool logs {id}"));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}\n{}", b.context());
    let user = b.pool.user(1);
    assert!(
        text(&out.stdout).contains(&format!("hello from vm-a as {user}")),
        "{}",
        text(&out.stdout)
    );
    assert!(
        stderr.contains(&format!("job {id} FAILED, exit code 3")),
        "{stderr}"
    );
    // The job's files are in the user's (shared) home.
    let home = TestUsers::ensure(1).user(1).home.clone();
    assert!(home.join(format!("job-ran-{id}")).exists());
    assert!(home.join(format!("slurm-{id}.out")).exists());
    // `pool jobs` lists it among the ended jobs, with its exit code.
    let out = b.ssh(1, "pool jobs");
    let listing = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        listing
            .lines()
            .any(|l| l.contains(&id) && l.contains("FAILED") && l.ends_with(" 3")),
        "{listing}"
    );
    b.pool
        .gateway
        .wait_for_log("verb=\"submit\"", Duration::from_secs(5));
    b.pool.assert_no_panic();
}

#[test]
fn a_vm_running_a_job_is_kept_through_scale_in_windows_then_drained_in_slurm_and_stopped() {
    require_slurm!();
    let b = start(&["vm-a"], 1);
    let job = b.job_script(1, "long.sh", &b.wait_body());
    let id = b.submit(1, &job);
    b.wait_running(&id);
    // Nobody is logged in now; scale-in would drain after 2 s and stop after 3 s. The job keeps
    // the VM, and its node stays in service, through several such windows.
    let mut seen = Vec::new();
    for _ in 0..25 {
        seen.push((b.pool.vm_state("vm-a"), b.slurm.node_state("vm-a")));
        std::thread::sleep(Duration::from_millis(300)); // sampling the state, not waiting for it
    }
    assert!(
        seen.iter()
            .all(|(vm, node)| vm == "healthy" && node.starts_with("allocated")),
        "the VM running a job was drained or stopped: {seen:?}\n{}",
        b.context()
    );
    let metrics = b.pool.metrics();
    assert_eq!(
        sample(&metrics, "poolgate_batch_nodes_busy"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "poolgate_batch_jobs{state=\"running\"}"),
        Some(1.0),
        "{metrics}"
    );

    // The job ends: the VM is drained in poolgate and in Slurm, then stopped.
    b.release();
    b.pool
        .wait_for_state("vm-a", "stopped", Duration::from_secs(40));
    let node = b.slurm.node_state("vm-a");
    assert!(
        node.starts_with("drained") && node.ends_with("|poolgate-scale-in"),
        "{node}\n{}",
        b.context()
    );

    // A new job wakes the VM again, and its node is resumed for it.
    std::fs::remove_file(b.shared.path().join("release")).expect("reset release");
    let id2 = text(
        &b.slurm
            .client(
                "sbatch",
                &[
                    "--parsable",
                    "-p",
                    "pool",
                    "-o",
                    "/dev/null",
                    "--wrap",
                    "true",
                ],
            )
            .stdout,
    );
    assert!(
        poll(Duration::from_secs(40), || b
            .slurm
            .job(&id2)
            .contains("JobState=COMPLETED")),
        "the second job never ran: {}\n{}",
        b.slurm.job(&id2),
        b.context()
    );
    b.pool
        .gateway
        .wait_for_log("resumed the VM's Slurm node", Duration::from_secs(5));
    b.pool.assert_no_panic();
}

#[test]
fn pool_cancel_cancels_nobody_touches_another_users_job_and_an_operators_drain_reaches_slurm() {
    require_slurm!();
    let b = start(&["vm-a"], 2);
    let job = b.job_script(1, "long.sh", &b.wait_body());
    let id = b.submit(1, &format!("{job} --name ones-job --time 10m"));
    assert!(
        b.slurm.job(&id).contains("JobName=ones-job"),
        "{}",
        b.slurm.job(&id)
    );
    assert!(
        b.slurm.job(&id).contains("TimeLimit=00:10:00"),
        "{}",
        b.slurm.job(&id)
    );

    b.wait_running(&id);
    // An operator's drain through poolgate drains the node in Slurm too (the running job goes
    // on), and the undrain resumes it.
    b.pool.api_post("vm-a", "drain");
    assert!(
        poll(Duration::from_secs(15), || b.slurm.node_state("vm-a")
            == "draining|poolgate-drain"),
        "{}\n{}",
        b.slurm.node_state("vm-a"),
        b.context()
    );
    b.pool.api_post("vm-a", "undrain");
    assert!(
        poll(Duration::from_secs(15), || b
            .slurm
            .node_state("vm-a")
            .starts_with("allocated")),
        "{}\n{}",
        b.slurm.node_state("vm-a"),
        b.context()
    );
    assert!(b.slurm.job(&id).contains("JobState=RUNNING"));

    // The other user: not in their list, not theirs to read or cancel.
    let out = b.ssh(2, "pool jobs");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(!text(&out.stdout).contains(&id), "{}", text(&out.stdout));
    for verb in ["cancel", "logs"] {
        let out = b.ssh(2, &format!("pool {verb} {id}"));
        assert_eq!(out.status.code(), Some(2), "{verb}: {}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains("is not yours"),
            "{}",
            text(&out.stderr)
        );
    }
    // Slurm's own rule says the same to a plain scancel in an ordinary session.
    let out = b.ssh(2, &format!("scancel {id}"));
    assert_ne!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(!b.slurm.job(&id).contains("JobState=CANCELLED"));

    // Its owner cancels it.
    let out = b.ssh(1, &format!("pool cancel {id}"));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        poll(Duration::from_secs(20), || b
            .slurm
            .job(&id)
            .contains("JobState=CANCELLED")),
        "{}",
        b.slurm.job(&id)
    );
    // Bad arguments: a clear message, exit 2, nothing run.
    let out = b.ssh(1, &format!("pool submit --gpus none {job}"));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--gpus takes a number"),
        "{}",
        text(&out.stderr)
    );
    b.release();
    b.pool.assert_no_panic();
}

#[test]
fn twenty_queued_jobs_grow_the_pool_to_its_max_and_it_goes_back_to_zero() {
    require_slurm!();
    twenty_queued_jobs(false);
}

/// The same burst with the queue read through slurmrestd (`batch.rest_url`): its larger answers
/// (a JSON document per read, twenty jobs in it) drive the pool the same way.
#[test]
fn through_slurmrestd_twenty_queued_jobs_grow_the_pool_to_its_max_and_it_goes_back_to_zero() {
    require_slurmrestd!();
    twenty_queued_jobs(true);
}

fn twenty_queued_jobs(rest: bool) {
    let names = ["vm-a", "vm-b", "vm-c"];
    let b = start_with(&names, 1, rest);
    // Twenty jobs from a login node (here the gateway host), to a pool at zero.
    let submitted = Instant::now();
    for i in 0..20 {
        let out = b.slurm.client(
            "sbatch",
            &[
                "--parsable",
                "-p",
                "pool",
                "-o",
                "/dev/null",
                "-J",
                &format!("burst-{i}"),
                "--wrap",
                "sleep 1",
            ],
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let mut most = 0;
    let mut pending_seen = 0.0f64;
    let done = poll(Duration::from_secs(120), || {
        let running = names
            .iter()
            .filter(|n| b.pool.vm_state(n) == "healthy")
            .count();
        most = most.max(running);
        if let Some(p) = sample(&b.pool.metrics(), "poolgate_batch_jobs{state=\"pending\"}") {
            pending_seen = pending_seen.max(p);
        }
        let queue = b.slurm.client("squeue", &["-h", "-p", "pool"]);
        text(&queue.stdout).is_empty()
    });
    assert!(done, "the queue never emptied\n{}", b.context());
    eprintln!(
        "20 jobs ran in {:?} on at most {most} VMs (queue read through {})",
        submitted.elapsed(),
        if rest { "slurmrestd" } else { "squeue" }
    );
    assert_eq!(most, 3, "the pool should grow to max_vms\n{}", b.context());
    assert!(pending_seen >= 3.0, "pending jobs seen: {pending_seen}");
    for name in names {
        b.pool
            .wait_for_state(name, "stopped", Duration::from_secs(40));
    }
    b.pool.assert_no_panic();
}

/// `sbatch` from a login node (here the gateway host) to partition `pool`; the job id.
fn sbatch(b: &BatchPool, args: &[&str]) -> String {
    let mut argv = vec!["--parsable", "-p", "pool", "-o", "/dev/null"];
    argv.extend_from_slice(args);
    let out = b.slurm.client("sbatch", &argv);
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

#[test]
fn through_slurmrestd_a_job_queued_on_a_pool_at_zero_wakes_a_vm_runs_and_the_vm_is_drained_after() {
    require_slurmrestd!();
    let b = start_with(&["vm-a"], 1, true);
    // Queued from a login node, not through the gateway: only the queue read through
    // slurmrestd can wake the VM.
    let queued = Instant::now();
    let id = sbatch(&b, &["--wrap", "sleep 1"]);
    assert!(
        poll(Duration::from_secs(40), || b
            .slurm
            .job(&id)
            .contains("JobState=COMPLETED")),
        "the job never ran: {}\n{}",
        b.slurm.job(&id),
        b.context()
    );
    eprintln!(
        "queued to completed through slurmrestd: {:?}",
        queued.elapsed()
    );
    let metrics = b.pool.metrics();
    assert_eq!(
        sample(&metrics, "poolgate_batch_up"),
        Some(1.0),
        "{metrics}"
    );
    // Scaled in afterwards: drained in Slurm (scontrol; slurmrestd 22.05 cannot), then stopped.
    b.pool
        .wait_for_state("vm-a", "stopped", Duration::from_secs(40));
    let node = b.slurm.node_state("vm-a");
    assert!(
        node.starts_with("drained") && node.ends_with("|poolgate-scale-in"),
        "{node}\n{}",
        b.context()
    );
    let log = b.pool.log();
    let token =
        std::fs::read_to_string(b.token_file.as_ref().expect("token file")).expect("read token");
    let token = token.trim().trim_start_matches("SLURM_JWT=");
    assert!(!log.contains(token), "the token is in the log");
    assert!(!log.contains("reading the batch queue failed"), "{log}");
    b.pool.assert_no_panic();
}

#[test]
fn through_slurmrestd_an_expired_token_is_a_failed_read_that_drains_and_stops_nothing_until_a_new_one_is_written()
 {
    require_slurmrestd!();
    let b = start_with(&["vm-a"], 1, true);
    let token_file = b.token_file.clone().expect("rest token file");
    let job = b.job_script(1, "long.sh", &b.wait_body());
    let id = b.submit(1, &job);
    b.wait_running(&id);
    // The token expires (here: replaced by one that lived one second).
    let expired = b.slurm.token("nobody", 1);
    std::thread::sleep(Duration::from_millis(2100)); // the token's lifetime, in whole seconds
    write_token(&token_file, &expired);
    assert!(
        poll(Duration::from_secs(15), || sample(
            &b.pool.metrics(),
            "poolgate_batch_up"
        ) == Some(0.0)),
        "poolgate_batch_up never went to 0\n{}",
        b.context()
    );
    // The log's own thread writes the line; the metric may be seen first.
    b.pool
        .gateway
        .wait_for_log("reading the batch queue failed", Duration::from_secs(10));
    let log = b.pool.log();
    let warning = log
        .lines()
        .find(|l| l.contains("reading the batch queue failed"))
        .unwrap_or_else(|| panic!("no warning in\n{log}"));
    assert!(
        warning.contains("when the token has expired or is not valid")
            && warning.contains("batch.rest_token_file"),
        "{warning}"
    );
    eprintln!("{warning}");
    let secret = expired.trim_start_matches("SLURM_JWT=");
    assert!(!log.contains(secret), "the token is in the log");
    // Nobody is logged in: scale-in would drain after 2 s and stop after 3 s. Reading fails, so
    // the last view (the node runs a job) holds: nothing is drained, in poolgate or in Slurm,
    // nor stopped.
    let mut seen = Vec::new();
    for _ in 0..20 {
        seen.push((b.pool.vm_state("vm-a"), b.slurm.node_state("vm-a")));
        std::thread::sleep(Duration::from_millis(300)); // sampling the state, not waiting for it
    }
    assert!(
        seen.iter()
            .all(|(vm, node)| vm == "healthy" && node.starts_with("allocated")),
        "drained or stopped while the queue could not be read: {seen:?}\n{}",
        b.context()
    );
    // A new token (as a cron job rotating it would write) is read at the next tick, no restart.
    write_token(&token_file, &b.slurm.token("nobody", 3600));
    b.pool.gateway.wait_for_log(
        "reading the batch queue works again",
        Duration::from_secs(10),
    );
    assert_eq!(sample(&b.pool.metrics(), "poolgate_batch_up"), Some(1.0));
    // And the job's end is seen: the VM is scaled in as usual.
    b.release();
    b.pool
        .wait_for_state("vm-a", "stopped", Duration::from_secs(40));
    b.pool.assert_no_panic();
}

#[test]
fn a_vm_whose_slurm_node_never_registers_is_reported_once_and_the_queue_starts_no_more_vms() {
    require_slurm!();
    // A broken pool image: the VMs boot (sshd) but run no slurmd. Nodes found unregistered after
    // 4 s are reported.
    let b = start_inner(
        &["vm-a", "vm-b"],
        1,
        false,
        false,
        "register_within = \"4s\"\n",
    );
    let began = Instant::now();
    let first = sbatch(&b, &["--wrap", "true"]);
    // The job wakes one VM, as usual.
    b.pool
        .wait_for_state("vm-a", "healthy", Duration::from_secs(30));
    assert!(
        poll(Duration::from_secs(20), || sample(
            &b.pool.metrics(),
            "poolgate_batch_nodes_unregistered"
        ) == Some(1.0)),
        "the unregistered node was never counted\n{}",
        b.context()
    );
    eprintln!("reported {:?} after the job was queued", began.elapsed());
    b.pool.gateway.wait_for_log(
        "the VM's Slurm node has not registered",
        Duration::from_secs(5),
    );
    let log = b.pool.log();
    let warning = log
        .lines()
        .find(|l| l.contains("the VM's Slurm node has not registered"))
        .unwrap_or_default();
    eprintln!("{warning}");
    for needle in [
        "vm-a",
        "slurm_state",
        "journalctl -u slurmd",
        "22.05",
        "munge",
        "batch.node_name",
    ] {
        assert!(warning.contains(needle), "{needle} not in {warning}");
    }
    // A second job queues. Through many ticks (1 s each; scale-in would drain an idle VM after
    // 2 s and stop it after 3 s), no VM is started for it and vm-a is neither drained nor stopped.
    let second = sbatch(&b, &["--wrap", "true"]);
    let mut seen = Vec::new();
    for _ in 0..25 {
        seen.push((b.pool.vm_state("vm-a"), b.pool.vm_state("vm-b")));
        std::thread::sleep(Duration::from_millis(300)); // sampling the state, not waiting for it
    }
    assert!(
        seen.iter().all(|(a, b)| a == "healthy" && b == "stopped"),
        "the queue started, stopped or drained VMs: {seen:?}\n{}",
        b.context()
    );
    let metrics = b.pool.metrics();
    assert_eq!(
        sample(&metrics, "poolgate_batch_nodes_unregistered"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "poolgate_autoscale_desired_vms"),
        Some(1.0),
        "{metrics}"
    );
    let log = b.pool.log();
    assert_eq!(
        log.matches("the VM's Slurm node has not registered")
            .count(),
        1,
        "one warning for the VM, not one per tick\n{log}"
    );
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("VM lifecycle") && l.contains("running"))
            .count(),
        1,
        "started once\n{log}"
    );
    // The jobs are cancelled: the VM is scaled in as usual and no longer counted.
    let out = b.slurm.client("scancel", &[&first, &second]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    b.pool
        .wait_for_state("vm-a", "stopped", Duration::from_secs(40));
    assert!(
        poll(Duration::from_secs(10), || sample(
            &b.pool.metrics(),
            "poolgate_batch_nodes_unregistered"
        ) == Some(0.0)),
        "{}",
        b.context()
    );
    assert_eq!(b.pool.vm_state("vm-b"), "stopped");
    b.pool.assert_no_panic();
}

/// slurm.conf as the deploy writes it on the gateways and the pool VMs (deploy/cloud-init), less
/// what the test cluster sets for loopback: names, ports, accounts, paths and authentication.
fn deploy_slurm_conf_body() -> String {
    let yaml = std::fs::read_to_string(workspace_dir().join("deploy/cloud-init/pool-vm.yaml"))
        .expect("read pool-vm.yaml");
    const LOCAL: [&str; 13] = [
        "ClusterName",
        "SlurmctldHost",
        "SlurmctldPort",
        "SlurmdPort",
        "AuthType",
        "CredType",
        "SlurmUser",
        "StateSaveLocation",
        "SlurmdSpoolDir",
        "SlurmctldPidFile",
        "SlurmdPidFile",
        "SlurmctldLogFile",
        "SlurmdLogFile",
    ];
    let mut body = String::new();
    for line in written_content(&yaml, "/etc/slurm/slurm.conf").lines() {
        let key = line.split('=').next().unwrap_or_default();
        if line.is_empty() || line.starts_with('#') || LOCAL.contains(&key) {
            continue;
        }
        body.push_str(line);
        body.push('\n');
    }
    body
}

/// The deploy's slurm.conf on a real controller: no node list, a VM's slurmd registers itself
/// under the VM's name (`slurmd -Z --conf Feature=pool`, as poolgate-slurm-setup starts it) into
/// the partition `pool`, runs a job there, and — once its VM is gone for good — is deleted with
/// the `scontrol delete` poolgate runs; started again, it registers anew.
#[test]
fn the_deploys_slurm_conf_takes_vms_that_register_themselves_and_lets_poolgate_delete_them() {
    require_slurm!();
    let body = deploy_slurm_conf_body();
    for line in [
        "NodeSet=pool Feature=pool",
        "MaxNodeCount=1000",
        "ReturnToService=2",
    ] {
        assert!(body.lines().any(|l| l == line), "{line} in {body}");
    }
    let mut slurm = SlurmCluster::start_dynamic(&body);
    let node = "poolgate-vmss_3";
    let nodes = |slurm: &SlurmCluster| {
        text(
            &slurm
                .client("sinfo", &["-h", "-N", "-p", "pool", "-o", "%N|%T|%f"])
                .stdout,
        )
    };
    assert_eq!(nodes(&slurm), "", "no node before a VM registers");
    // A job queued while no VM is up waits.
    let out_dir = tempfile::tempdir().expect("tmp");
    let output = out_dir.path().join("job.out");
    let out = slurm.client(
        "sbatch",
        &[
            "--parsable",
            "-p",
            "pool",
            "-o",
            output.to_str().expect("utf-8"),
            "--wrap",
            "echo ran on $SLURMD_NODENAME",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let job = text(&out.stdout);
    assert!(
        slurm.job(&job).contains("JobState=PENDING"),
        "{}",
        slurm.job(&job)
    );

    slurm.start_dynamic_node(node, "Feature=pool");
    wait_until(Duration::from_secs(30), "the job to complete", || {
        slurm.job(&job).contains("JobState=COMPLETED")
    });
    assert_eq!(
        std::fs::read_to_string(&output).expect("job output"),
        format!("ran on {node}\n")
    );
    let listed = nodes(&slurm);
    assert!(listed.starts_with(&format!("{node}|idle|pool")), "{listed}");

    // Scale-in: drained with poolgate's reason, the VM deleted, its node deleted.
    let drain = slurm.client(
        "scontrol",
        &[
            "update",
            &format!("nodename={node}"),
            "state=drain",
            "reason=poolgate-scale-in",
        ],
    );
    assert!(drain.status.success(), "{}", text(&drain.stderr));
    slurm.stop_node(node);
    let delete = slurm.client("scontrol", &["delete", &format!("nodename={node}")]);
    assert!(
        delete.status.success(),
        "scontrol delete: {}{}",
        text(&delete.stderr),
        slurm.logs()
    );
    assert_eq!(nodes(&slurm), "", "the deleted node is gone from sinfo");

    // A VM of that name again (Azure reuses no instance id, but a stopped VM's node that was
    // deleted comes back the same way): it registers anew and takes jobs.
    slurm.start_dynamic_node(node, "Feature=pool");
    wait_until(
        Duration::from_secs(30),
        "the node to register again",
        || nodes(&slurm).starts_with(&format!("{node}|idle")),
    );
}
