//! A real single-host Slurm cluster for the batch tests: `munged` with its own key and socket,
//! `slurmctld` on a free loopback port, and one `slurmd` per pool "VM" (`slurmd -N NAME`, each on
//! its own port), which the exec provider's scripts start and stop with the VM. Debian's
//! `slurmctld`, `slurmd`, `slurm-client` and `munge` (22.05). Everything lives in a temporary
//! directory; dropping the cluster stops every daemon it started.
//!
//! [`SlurmCluster::start_with_rest`] adds JWT authentication (`AuthAltTypes=auth/jwt`, a key
//! file 0600 owned by root, the `SlurmUser` here) and `slurmrestd` on a free loopback port
//! (Debian's `slurmrestd` and `slurm-wlm-jwt-plugin`). slurmrestd refuses to run as root or as
//! `SlurmUser`, so it drops to `nobody:nogroup` (`-u`, `-g`) after opening its socket;
//! `SLURM_JWT=daemon` makes it pass each request's token on to slurmctld (without it, 22.05's
//! slurmrestd uses munge and rejects every token).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::ports::free_port;
use crate::process::kill_tree;
use crate::tools::tool;

/// How long slurmctld may take to answer after it starts. It answers in about 0.1 s (110 ms on
/// the 2-core test machine); the bound is for a CI machine busy with the other tests.
const SLURMCTLD_START: Duration = Duration::from_secs(60);

/// The controller, munge, and the nodes' configuration.
pub struct SlurmCluster {
    dir: tempfile::TempDir,
    conf: PathBuf,
    munged: Option<Child>,
    slurmctld: Option<Child>,
    slurmrestd: Option<Child>,
    rest_port: Option<u16>,
    nodes: Vec<String>,
}

/// Where Debian's `slurm-wlm-jwt-plugin` puts the `auth/jwt` plugin, if installed.
pub fn jwt_plugin() -> Option<PathBuf> {
    std::fs::read_dir("/usr/lib")
        .ok()?
        .flatten()
        .map(|dir| dir.path().join("slurm-wlm/auth_jwt.so"))
        .chain(std::iter::once(PathBuf::from(
            "/usr/lib/slurm-wlm/auth_jwt.so",
        )))
        .find(|p| p.is_file())
}

impl SlurmCluster {
    /// A cluster whose partition `pool` holds `nodes` (one CPU each, one job per node). Nodes
    /// start `DOWN` (no `slurmd` runs yet); Slurm takes one back into service as soon as its
    /// `slurmd` registers (`ReturnToService=2`).
    pub fn start(nodes: &[&str]) -> Self {
        Self::start_inner(nodes, false)
    }

    /// [`SlurmCluster::start`], plus JWT authentication and `slurmrestd` on loopback
    /// ([`SlurmCluster::rest_url`]; tokens from [`SlurmCluster::token`]).
    pub fn start_with_rest(nodes: &[&str]) -> Self {
        Self::start_inner(nodes, true)
    }

    /// A cluster configured by `body` — slurm.conf lines without the node list, paths, ports,
    /// accounts and authentication, which the fixture sets for loopback — whose nodes register
    /// themselves ([`SlurmCluster::start_dynamic_node`], `slurmd -Z`), as the deploy's do.
    pub fn start_dynamic(body: &str) -> Self {
        Self::start_with_body(&[], false, Some(body))
    }

    fn start_inner(nodes: &[&str], rest: bool) -> Self {
        Self::start_with_body(nodes, rest, None)
    }

    fn start_with_body(nodes: &[&str], rest: bool, body: Option<&str>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("poolgate-slurm-")
            .tempdir()
            .expect("slurm temp dir");
        // Test users read the configuration and reach munge's socket.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod slurm dir");
        let d = dir.path();
        for sub in ["munge", "state", "log"] {
            std::fs::create_dir_all(d.join(sub)).expect("mkdir");
        }
        std::fs::set_permissions(d.join("munge"), std::fs::Permissions::from_mode(0o755))
            .expect("chmod munge dir");
        let key = d.join("munge.key");
        let mut random = vec![0u8; 128];
        std::io::Read::read_exact(
            &mut std::fs::File::open("/dev/urandom").expect("open /dev/urandom"),
            &mut random,
        )
        .expect("read /dev/urandom");
        std::fs::write(&key, random).expect("munge key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod key");
        let socket = d.join("munge/munge.socket");
        let munged = Command::new(tool("munged"))
            .arg("-F")
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--key-file={}", key.display()))
            .arg(format!("--log-file={}", d.join("log/munged.log").display()))
            .arg(format!("--pid-file={}", d.join("munged.pid").display()))
            .arg(format!("--seed-file={}", d.join("munged.seed").display()))
            .arg("--force")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start munged");
        wait_until(
            Duration::from_secs(10),
            "munged's socket",
            &d.join("log"),
            || socket.exists(),
        );

        let ctld_port = free_port();
        // One slurmd port for the cluster: dynamic nodes take slurm.conf's (one node at a time).
        let slurmd_port = free_port();
        let mut conf = format!(
            "ClusterName=pgtest\n\
             SlurmctldHost=localhost(127.0.0.1)\n\
             SlurmctldPort={ctld_port}\nSlurmdPort={slurmd_port}\n\
             AuthType=auth/munge\nCredType=cred/munge\nAuthInfo=socket={socket}\n\
             SlurmUser=root\nSlurmdUser=root\n\
             StateSaveLocation={d}/state\nSlurmdSpoolDir={d}/spool/%n\n\
             SlurmctldPidFile={d}/slurmctld.pid\nSlurmdPidFile={d}/slurmd-%n.pid\n\
             SlurmctldLogFile={d}/log/slurmctld.log\nSlurmdLogFile={d}/log/slurmd-%n.log\n\
             JobAcctGatherType=jobacct_gather/none\nAccountingStorageType=accounting_storage/none\n\
             MinJobAge=600\nFirstJobId={first_job}\n",
            first_job = u32::from(free_port()) * 1000,
            socket = socket.display(),
            d = d.display(),
        );
        if rest {
            // slurmctld (root, the SlurmUser here) signs and checks tokens with this key.
            let jwt_key = d.join("jwt.key");
            let mut key = vec![0u8; 32];
            std::io::Read::read_exact(
                &mut std::fs::File::open("/dev/urandom").expect("open /dev/urandom"),
                &mut key,
            )
            .expect("read /dev/urandom");
            std::fs::write(&jwt_key, key).expect("jwt key");
            std::fs::set_permissions(&jwt_key, std::fs::Permissions::from_mode(0o600))
                .expect("chmod jwt key");
            conf.push_str(&format!(
                "AuthAltTypes=auth/jwt\nAuthAltParameters=jwt_key={}\n",
                jwt_key.display()
            ));
        }
        if let Some(body) = body {
            conf.push_str(body);
        } else {
            conf.push_str(
                "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n\
                 SchedulerType=sched/backfill\nSelectType=select/cons_tres\nSelectTypeParameters=CR_Core\n\
                 ReturnToService=2\nMpiDefault=none\n",
            );
        }
        for name in nodes {
            std::fs::create_dir_all(d.join("spool").join(name)).expect("spool dir");
            conf.push_str(&format!(
                "NodeName={name} NodeAddr=127.0.0.1 Port={} CPUs=1 State=DOWN\n",
                free_port()
            ));
        }
        if body.is_none() {
            conf.push_str(&format!(
                "PartitionName=pool Nodes={} Default=YES MaxTime=INFINITE State=UP LLN=YES OverSubscribe=EXCLUSIVE\n",
                nodes.join(",")
            ));
        }
        let conf_path = d.join("slurm.conf");
        std::fs::write(&conf_path, conf).expect("slurm.conf");
        std::fs::set_permissions(&conf_path, std::fs::Permissions::from_mode(0o644))
            .expect("chmod slurm.conf");
        let slurmctld = Command::new(tool("slurmctld"))
            .args(["-D", "-i", "-f"])
            .arg(&conf_path)
            .env("SLURM_CONF", &conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start slurmctld");
        let mut cluster = Self {
            dir,
            conf: conf_path,
            munged: Some(munged),
            slurmctld: Some(slurmctld),
            slurmrestd: None,
            rest_port: None,
            nodes: nodes.iter().map(|n| (*n).to_owned()).collect(),
        };
        let started = Instant::now();
        cluster.wait_for_slurmctld();
        if rest {
            cluster.start_slurmrestd();
        }
        eprintln!("slurm cluster up in {:?}", started.elapsed());
        cluster.nodes.shrink_to_fit();
        cluster
    }

    /// slurmrestd on a free loopback port, as `nobody:nogroup`, JWT only, `openapi/v0.0.38`.
    fn start_slurmrestd(&mut self) {
        let port = free_port();
        let log = std::fs::File::create(self.dir.path().join("log/slurmrestd.log"))
            .expect("slurmrestd log");
        let child = Command::new(tool("slurmrestd"))
            .arg("-f")
            .arg(&self.conf)
            .args(["-u", "nobody", "-g", "nogroup"])
            .args(["-a", "rest_auth/jwt", "-s", "openapi/v0.0.38"])
            .arg(format!("127.0.0.1:{port}"))
            .env("SLURM_CONF", &self.conf)
            .env("SLURM_JWT", "daemon")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start slurmrestd");
        self.slurmrestd = Some(child);
        self.rest_port = Some(port);
        wait_until(
            Duration::from_secs(10),
            "slurmrestd to listen",
            &self.log_dir(),
            || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        );
    }

    /// slurmrestd's base URL (`http://127.0.0.1:PORT`); only with
    /// [`SlurmCluster::start_with_rest`].
    pub fn rest_url(&self) -> String {
        let port = self
            .rest_port
            .expect("slurmrestd runs only with SlurmCluster::start_with_rest");
        format!("http://127.0.0.1:{port}")
    }

    /// A JWT for `user` valid `lifespan` seconds, as `scontrol token` prints it
    /// (`SLURM_JWT=…`).
    pub fn token(&self, user: &str, lifespan: u32) -> String {
        let out = self.client(
            "scontrol",
            &[
                "token",
                &format!("username={user}"),
                &format!("lifespan={lifespan}"),
            ],
        );
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(
            out.status.success() && text.starts_with("SLURM_JWT="),
            "scontrol token failed: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
        text
    }

    /// Starts `slurmd -Z -N node --conf conf_line` (a VM registering itself as a dynamic node);
    /// it daemonizes, and the cluster stops it when dropped. Returns once the command has run.
    pub fn start_dynamic_node(&mut self, node: &str, conf_line: &str) {
        std::fs::create_dir_all(self.dir.path().join("spool").join(node)).expect("spool dir");
        let out = Command::new(tool("slurmd"))
            .arg("-f")
            .arg(&self.conf)
            .args(["-Z", "-N", node, "--conf", conf_line])
            .env("SLURM_CONF", &self.conf)
            .stdin(Stdio::null())
            .output()
            .expect("start slurmd");
        assert!(
            out.status.success(),
            "slurmd -Z failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        if !self.nodes.iter().any(|n| n == node) {
            self.nodes.push(node.to_owned());
        }
    }

    /// Stops `node`'s slurmd (a VM going away) and waits until it has exited.
    pub fn stop_node(&self, node: &str) {
        if let Some(pid) = self.slurmd_pid(node) {
            kill_tree(pid);
            let stat = PathBuf::from(format!("/proc/{pid}/stat"));
            wait_until(
                Duration::from_secs(10),
                "slurmd to exit",
                &self.log_dir(),
                || std::fs::read_to_string(&stat).map_or(true, |s| s.contains(") Z ")),
            );
        }
    }

    /// `slurm.conf` (what `SLURM_CONF` must point at for clients).
    pub fn conf(&self) -> &Path {
        &self.conf
    }

    /// The shell line that starts `node`'s slurmd (it daemonizes; its pid file is
    /// [`SlurmCluster::slurmd_pid_file`]).
    pub fn slurmd_command(&self, node: &str) -> String {
        format!(
            "SLURM_CONF={conf} {slurmd} -f {conf} -N {node}",
            conf = self.conf.display(),
            slurmd = tool("slurmd").display()
        )
    }

    /// Where `node`'s running slurmd writes its pid.
    pub fn slurmd_pid_file(&self, node: &str) -> PathBuf {
        self.dir.path().join(format!("slurmd-{node}.pid"))
    }

    /// The pid `node`'s slurmd wrote, if it runs (or ran).
    fn slurmd_pid(&self, node: &str) -> Option<u32> {
        std::fs::read_to_string(self.slurmd_pid_file(node))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// argv prefix running Slurm client `program` against this cluster (for `[batch]`).
    pub fn client_argv(&self, program: &str) -> Vec<String> {
        vec![
            "env".to_owned(),
            format!("SLURM_CONF={}", self.conf.display()),
            tool(program).display().to_string(),
        ]
    }

    /// Runs a Slurm client command as root.
    pub fn client(&self, program: &str, args: &[&str]) -> Output {
        Command::new(tool(program))
            .args(args)
            .env("SLURM_CONF", &self.conf)
            .stdin(Stdio::null())
            .output()
            .expect("run slurm client")
    }

    /// `state|reason` of `node` as `sinfo` shows it (e.g. `idle|none`, `drained|poolgate-scale-in`).
    pub fn node_state(&self, node: &str) -> String {
        let out = self.client("sinfo", &["-h", "-N", "-n", node, "-o", "%T|%E"]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// `scontrol -o show job ID`.
    pub fn job(&self, id: &str) -> String {
        let out = self.client("scontrol", &["-o", "show", "job", id]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Waits until slurmctld answers `scontrol ping`, within [`SLURMCTLD_START`]; fails at once,
    /// with the daemons' logs, when it has exited. (A CI run once timed out here after 20 s,
    /// with no word of why.)
    fn wait_for_slurmctld(&mut self) {
        let log_dir = self.log_dir();
        wait_until(SLURMCTLD_START, "slurmctld to answer", &log_dir, || {
            if self.client("scontrol", &["ping"]).status.success() {
                return true;
            }
            let exited = self
                .slurmctld
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                panic!(
                    "slurmctld exited ({status}) before it answered\n{}",
                    logs_in(&log_dir)
                );
            }
            false
        });
    }

    /// Where the daemons write their logs.
    fn log_dir(&self) -> PathBuf {
        self.dir.path().join("log")
    }

    /// The controller's and the nodes' logs, for failure messages.
    pub fn logs(&self) -> String {
        logs_in(&self.log_dir())
    }
}

/// The last 30 lines of each log in `dir`, for failure messages.
fn logs_in(dir: &Path) -> String {
    let mut out = String::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            out.push_str(&format!("--- {} ---\n", entry.path().display()));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

impl Drop for SlurmCluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            if let Some(pid) = self.slurmd_pid(node) {
                kill_tree(pid);
            }
        }
        for child in [
            self.slurmrestd.take(),
            self.slurmctld.take(),
            self.munged.take(),
        ]
        .into_iter()
        .flatten()
        {
            let mut child = child;
            kill_tree(child.id());
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `done` until it holds; past `timeout`, fails with the daemons' logs in `log_dir`.
fn wait_until(timeout: Duration, what: &str, log_dir: &Path, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}\n{}",
            logs_in(log_dir)
        );
        std::thread::sleep(Duration::from_millis(50)); // polling a daemon that gives no signal
    }
}
