//! JupyterHub and jupyter_server processes playing pool VMs.

use std::fs::OpenOptions;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::gateway::workspace_dir;
use crate::http::try_http_request;
use crate::ports::free_port;
use crate::process::{Backoff, kill_tree};
use crate::tools::require_tool;

/// The password every user has on a [`JupyterHubVm`] (DummyAuthenticator).
pub const HUB_PASSWORD: &str = "pw";

/// How long a hub may take to answer `/hub/health`.
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// The Python venv with jupyterhub, jupyter_server, jupyterlab and ipykernel.
pub fn venv_dir() -> PathBuf {
    std::env::var_os("POOLGATE_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_dir().join(".venv"))
}

/// A program of the venv.
pub fn venv_bin(name: &str) -> PathBuf {
    venv_dir().join("bin").join(name)
}

/// The folder with the tests' npm packages (`tests/js`).
pub fn js_dir() -> PathBuf {
    std::env::var_os("POOLGATE_JS")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_dir().join("tests").join("js"))
}

/// A program installed by npm in [`js_dir`].
pub fn js_bin(name: &str) -> PathBuf {
    js_dir().join("node_modules").join(".bin").join(name)
}

/// True when the venv and npm tools the Jupyter tests need are there. Otherwise: under CI
/// panics (a failure), elsewhere prints SKIPPED and returns false.
pub fn require_jupyter() -> bool {
    let mut ok = true;
    for tool in [
        venv_bin("jupyterhub"),
        venv_bin("jupyterhub-singleuser"),
        venv_bin("jupyter-server"),
        js_bin("configurable-http-proxy"),
    ] {
        ok &= require_tool(&tool.to_string_lossy()).is_some();
    }
    ok
}

/// PATH for Jupyter processes: the venv first (kernels, single-user servers), then node tools.
fn jupyter_path() -> String {
    let mut dirs = vec![venv_dir().join("bin"), js_dir().join("node_modules/.bin")];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(dirs)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Runs `start` for every name on a thread of its own (a Jupyter process takes seconds to come
/// up); the results in the order of `names`.
fn start_all<T: Send>(names: &[&str], start: fn(&str) -> T) -> Vec<T> {
    std::thread::scope(|s| {
        let handles: Vec<_> = names
            .iter()
            .map(|&name| (name, s.spawn(move || start(name))))
            .collect();
        handles
            .into_iter()
            .map(|(name, h)| {
                h.join()
                    .unwrap_or_else(|_| panic!("starting {name} panicked"))
            })
            .collect()
    })
}

/// A process we started, with its log, killed with its descendants on drop.
struct Proc {
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(cmd: &mut Command, log: &Path) -> Self {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup log"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        Self {
            child: Some(child),
            log: log.to_path_buf(),
        }
    }

    fn exited(&mut self) -> bool {
        match &mut self.child {
            Some(c) => c.try_wait().ok().flatten().is_some(),
            None => true,
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_tree(child.id());
            let _ = child.wait();
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `GET path` answers 200; panics with the log when it exits or times out.
    fn wait_healthy(&mut self, addr: SocketAddr, path: &str, what: &str) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut backoff = Backoff::new();
        loop {
            if try_http_request(addr, "GET", path, &[]).is_ok_and(|r| r.status == 200) {
                return Ok(());
            }
            if self.exited() {
                return Err(format!("{what} exited before {path} answered"));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{what}: {path} did not answer 200 within {START_TIMEOUT:?}"
                ));
            }
            backoff.sleep_until(deadline);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A JupyterHub playing one pool VM's web side.
pub struct JupyterHubVm {
    name: String,
    dir: tempfile::TempDir,
    port: u16,
    proc: Proc,
}

impl JupyterHubVm {
    /// Starts a hub called `name` (the VM name) and waits for `/hub/health` (90 s at most).
    /// Retries with new ports if one was taken meanwhile.
    pub fn start(name: &str) -> Self {
        let mut last = String::new();
        for _ in 0..3 {
            match Self::try_start(name) {
                Ok(vm) => return vm,
                Err(e) => last = e,
            }
        }
        panic!("JupyterHub {name} did not start: {last}");
    }

    /// Starts one hub per name, side by side; in the order of `names`.
    pub fn start_all(names: &[&str]) -> Vec<Self> {
        start_all(names, Self::start)
    }

    fn try_start(name: &str) -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("poolgate-hub-{name}-"))
            .tempdir()
            .expect("temp dir for the hub");
        let d = dir.path();
        let (port, hub_port, api_port) = (free_port(), free_port(), free_port());
        std::fs::create_dir_all(d.join("home")).expect("home dir");
        let py = |p: &Path| format!("{:?}", p.to_string_lossy());
        let config = format!(
            r#"c = get_config()
c.JupyterHub.bind_url = "http://127.0.0.1:{port}"
c.JupyterHub.hub_bind_url = "http://127.0.0.1:{hub_port}"
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{api_port}"
c.ConfigurableHTTPProxy.command = [{chp}]
c.ConfigurableHTTPProxy.pid_file = {pid}
c.JupyterHub.authenticator_class = "dummy"
c.DummyAuthenticator.password = "{HUB_PASSWORD}"
c.Authenticator.allow_all = True
c.JupyterHub.spawner_class = "simple"
c.SimpleLocalProcessSpawner.home_dir_template = {home}
c.Spawner.cmd = [{singleuser}]
c.Spawner.args = ["--allow-root", "--ServerApp.allow_remote_access=True"]
c.Spawner.default_url = "/lab"
c.Spawner.ip = "127.0.0.1"
c.Spawner.start_timeout = 120
c.Spawner.http_timeout = 90
c.Spawner.env_keep = ["PATH", "LANG", "LC_ALL"]
c.JupyterHub.db_url = "sqlite:///" + {db}
c.JupyterHub.cookie_secret_file = {secret}
c.JupyterHub.cleanup_servers = True
"#,
            chp = py(&js_bin("configurable-http-proxy")),
            pid = py(&d.join("proxy.pid")),
            home = py(&d.join("home/{username}")),
            singleuser = py(&venv_bin("jupyterhub-singleuser")),
            db = py(&d.join("jupyterhub.sqlite")),
            secret = py(&d.join("cookie_secret")),
        );
        std::fs::write(d.join("jupyterhub_config.py"), config).expect("write hub config");
        let mut proc = Proc::spawn(
            Command::new(venv_bin("jupyterhub"))
                .arg("-f")
                .arg(d.join("jupyterhub_config.py"))
                .current_dir(d)
                .env("PATH", jupyter_path())
                .env("JUPYTER_PLATFORM_DIRS", "1")
                .env("PYTHONUNBUFFERED", "1"),
            &d.join("hub.log"),
        );
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        if let Err(e) = proc.wait_healthy(addr, "/hub/health", &format!("jupyterhub {name}")) {
            let log = proc.log_text();
            proc.kill();
            return Err(format!("{e}\n--- hub log ---\n{log}"));
        }
        Ok(Self {
            name: name.to_string(),
            dir,
            port,
            proc,
        })
    }

    /// The VM name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The hub's public port (configurable-http-proxy), what the gateway forwards to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// A user's home (the single-user server's root dir).
    pub fn home(&self, user: &str) -> PathBuf {
        self.dir.path().join("home").join(user)
    }

    /// The hub's log (hub, proxy and single-user servers).
    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }

    /// Kills the hub with its proxy, servers and kernels (a VM that went down).
    pub fn stop(&mut self) {
        self.proc.kill();
    }
}

impl Drop for JupyterHubVm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: String = log
                .lines()
                .rev()
                .take(60)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            // The whole log is kept as a test artifact (the temp dir goes away).
            let kept = workspace_dir().join("tests/artifacts/logs");
            let path = kept.join(format!(
                "jupyterhub-{}-{}.log",
                self.name,
                std::process::id()
            ));
            let saved = std::fs::create_dir_all(&kept).and_then(|_| std::fs::write(&path, &log));
            eprintln!(
                "--- jupyterhub {} log (tail; whole log: {}) ---\n{tail}\n---",
                self.name,
                if saved.is_ok() {
                    path.display().to_string()
                } else {
                    "not saved".into()
                }
            );
        }
    }
}

/// A plain `jupyter_server` (no token, no password) playing a VM's web side. Health path:
/// `/api`.
pub struct JupyterServerVm {
    name: String,
    dir: tempfile::TempDir,
    port: u16,
    proc: Proc,
}

impl JupyterServerVm {
    /// Starts a server called `name` and waits until `/api` answers.
    pub fn start(name: &str) -> Self {
        let mut last = String::new();
        for _ in 0..3 {
            let dir = tempfile::Builder::new()
                .prefix(&format!("poolgate-jserver-{name}-"))
                .tempdir()
                .expect("temp dir");
            let port = free_port();
            let mut proc = Proc::spawn(
                &mut Self::command(port, dir.path()),
                &dir.path().join("server.log"),
            );
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            match proc.wait_healthy(addr, "/api", &format!("jupyter-server {name}")) {
                Ok(()) => {
                    return Self {
                        name: name.to_string(),
                        dir,
                        port,
                        proc,
                    };
                }
                Err(e) => {
                    last = format!("{e}\n--- log ---\n{}", proc.log_text());
                    proc.kill();
                }
            }
        }
        panic!("jupyter-server {name} did not start: {last}");
    }

    /// Starts one server per name, side by side; in the order of `names`.
    pub fn start_all(names: &[&str]) -> Vec<Self> {
        start_all(names, Self::start)
    }

    /// The command [`start`](Self::start) runs: a server on 127.0.0.1:`port` (no token, no
    /// password) serving `root`, which is also its working directory and `HOME`. Tests whose
    /// own scripts start and stop the server (a VM managed by a provider) run exactly this.
    ///
    /// Its kernels talk to it over Unix sockets (`KernelManager.transport = ipc`, under
    /// `root/rt`), not the default TCP ports on 127.0.0.1. jupyter_client picks a kernel's five
    /// ports by binding port 0 and letting go, and the kernel binds them a moment later. Here
    /// every "VM" shares one loopback with the gateway and the test's clients, whose outgoing
    /// connections take ports from the same ephemeral range. When one took a picked port
    /// first, the kernel failed with "Address already in use" five times over and died, and
    /// its websocket waited 60 s for it (in 3 of 6 runs of twenty users at once). On a real VM
    /// the server has that range nearly to itself.
    pub fn command(port: u16, root: &Path) -> Command {
        let mut cmd = Command::new(venv_bin("jupyter-server"));
        cmd.args([
            "--no-browser",
            "--allow-root",
            "--ServerApp.ip=127.0.0.1",
            &format!("--ServerApp.port={port}"),
            "--ServerApp.port_retries=0",
            "--ServerApp.allow_remote_access=True",
            "--IdentityProvider.token=",
            "--ServerApp.password=",
            "--KernelManager.transport=ipc",
        ])
        .arg(format!("--ServerApp.root_dir={}", root.display()))
        .current_dir(root)
        // Short enough for a Unix socket's path (108 bytes): `<root>/rt/kernel-<uuid>-ipc-N`.
        .env("JUPYTER_RUNTIME_DIR", root.join("rt"))
        .env("PATH", jupyter_path())
        .env("HOME", root)
        .env("JUPYTER_PLATFORM_DIRS", "1");
        cmd
    }

    /// The VM name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The server's root dir.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// The server's log.
    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }

    /// Kills the server and its kernels.
    pub fn stop(&mut self) {
        self.proc.kill();
    }

    /// Stops the server if it runs, then starts it again on the same port with the same root
    /// dir (a web side coming back) and waits until `/api` answers; panics with its log when it
    /// does not.
    pub fn restart(&mut self) {
        self.proc.kill();
        let log = self.dir.path().join("server.log");
        self.proc = Proc::spawn(&mut Self::command(self.port, self.dir.path()), &log);
        let what = format!("jupyter-server {}", self.name);
        if let Err(e) = self.proc.wait_healthy(self.addr(), "/api", &what) {
            let log = self.proc.log_text();
            self.proc.kill();
            panic!("{e}\n--- log ---\n{log}");
        }
    }
}

/// A web VM a test runs itself (a Jupyter server, a hub): what a pool needs to route to it
/// ([`GatewayPoolBuilder::web_vms`](crate::GatewayPoolBuilder::web_vms)).
pub trait WebVm {
    /// The VM's name in the pool.
    fn vm_name(&self) -> &str;
    /// The port on 127.0.0.1 the gateway forwards to.
    fn http_port(&self) -> u16;
}

impl WebVm for JupyterServerVm {
    fn vm_name(&self) -> &str {
        self.name()
    }
    fn http_port(&self) -> u16 {
        self.port()
    }
}

impl WebVm for JupyterHubVm {
    fn vm_name(&self) -> &str {
        self.name()
    }
    fn http_port(&self) -> u16 {
        self.port()
    }
}
