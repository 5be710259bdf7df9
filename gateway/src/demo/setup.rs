//! `poolgate demo` without a file: the state dir with its keys, the gateway configuration built
//! in code, the demo provider, and the "what to try" text.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use poolgate_config::{Config, PasswordAuth, Provider as ProviderKind};

use super::provider::DemoProvider;
use super::{DemoVmSettings, ShellSettings};
use crate::ssh::keys;

/// The banner every SSH user sees first.
pub const BANNER: &str =
    "poolgate demo — any user, password demo, or any key. Not for production.\n";

/// What `poolgate demo` was asked for (the CLI flags).
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// SSH listener port on 127.0.0.1.
    pub ssh_port: u16,
    /// HTTP listener port on 127.0.0.1.
    pub http_port: u16,
    /// Admin listener port on 127.0.0.1.
    pub admin_port: u16,
    /// Fewest VMs kept running.
    pub min_vms: u32,
    /// Number of demo VMs (most the autoscaler may start).
    pub max_vms: u32,
    /// Time a started demo VM takes to "boot".
    pub boot_delay: Duration,
    /// A VM idle this long is drained and stopped.
    pub scale_in_after: Duration,
    /// The whole pool idle this long: down to `min_vms`.
    pub scale_to_zero_after: Duration,
    /// Where keys live (default: `$XDG_STATE_HOME/poolgate-demo`).
    pub state_dir: Option<PathBuf>,
}

/// Everything `poolgate demo` runs.
pub struct Demo {
    /// The gateway configuration.
    pub config: Config,
    /// The demo pool.
    pub provider: Arc<DemoProvider>,
    /// Where the keys are.
    pub state_dir: PathBuf,
    /// The OS account shells run as.
    pub user: String,
}

impl std::fmt::Debug for Demo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Demo")
            .field("state_dir", &self.state_dir)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// `$XDG_STATE_HOME/poolgate-demo`, else `~/.local/state/poolgate-demo`.
pub fn default_state_dir() -> anyhow::Result<PathBuf> {
    if let Some(state) = std::env::var_os("XDG_STATE_HOME").filter(|s| !s.is_empty()) {
        let state = PathBuf::from(state);
        if state.is_absolute() {
            return Ok(state.join("poolgate-demo"));
        }
    }
    let home = account().home;
    if home.as_os_str().is_empty() {
        anyhow::bail!("cannot find a home directory for the demo's keys: set XDG_STATE_HOME");
    }
    Ok(home.join(".local/state/poolgate-demo"))
}

/// Creates `dir` (and parents) with mode 0700, or checks that an existing one is private (it is
/// never chmod-ed: `--state-dir /tmp` must not lock others out of /tmp).
fn private_dir(dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod 700 {}", dir.display()))?;
        return Ok(());
    }
    let mode = fs::metadata(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        anyhow::bail!(
            "{} holds the demo's private keys but others can read it (mode {:04o}): \
             run `chmod 700 {}` or pick another --state-dir",
            dir.display(),
            mode & 0o7777,
            dir.display()
        );
    }
    Ok(())
}

/// The account running poolgate.
#[derive(Debug, Clone)]
struct Account {
    user: String,
    home: PathBuf,
    shell: PathBuf,
}

/// Looks the running account up in `/etc/passwd` by uid, falling back to `$USER`, `$HOME` and
/// `$SHELL`.
fn account() -> Account {
    let uid = fs::metadata("/proc/self").map(|m| m.uid()).ok();
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    let entry = uid.and_then(|uid| parse_passwd(&passwd, uid));
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let user = entry
        .as_ref()
        .map(|e| e.user.clone())
        .or_else(|| env("USER"))
        .unwrap_or_else(|| "demo".to_string());
    let home = env("HOME")
        .map(PathBuf::from)
        .or_else(|| entry.as_ref().map(|e| e.home.clone()))
        .unwrap_or_default();
    let shell = entry
        .as_ref()
        .map(|e| e.shell.clone())
        .filter(|s| s.is_absolute() && s.exists() && !is_nologin(s))
        .or_else(|| env("SHELL").map(PathBuf::from).filter(|s| s.exists()))
        .unwrap_or_else(|| PathBuf::from("/bin/sh"));
    Account { user, home, shell }
}

fn is_nologin(shell: &Path) -> bool {
    shell
        .file_name()
        .is_some_and(|n| n == "nologin" || n == "false")
}

fn parse_passwd(text: &str, uid: u32) -> Option<Account> {
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        match fields.as_slice() {
            [user, _, id, _, _, home, shell, ..] if id.parse::<u32>().ok() == Some(uid) => {
                Some(Account {
                    user: (*user).to_string(),
                    home: PathBuf::from(home),
                    shell: PathBuf::from(shell),
                })
            }
            _ => None,
        }
    })
}

/// util-linux's `setsid`, if installed.
fn find_setsid() -> Option<PathBuf> {
    ["/usr/bin/setsid", "/bin/setsid"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// OpenSSH's sftp server, if installed.
fn find_sftp_server() -> Option<PathBuf> {
    [
        "/usr/lib/openssh/sftp-server",
        "/usr/libexec/openssh/sftp-server",
        "/usr/libexec/sftp-server",
        "/usr/lib/ssh/sftp-server",
        "/usr/lib/sftp-server",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
}

/// A bash rc file that behaves like a login's usual one and names the VM in the prompt.
const BASH_RC: &str = r#"# Written by `poolgate demo`: the shell of a demo VM session.
[ -f /etc/bash.bashrc ] && . /etc/bash.bashrc
[ -f "$HOME/.bashrc" ] && . "$HOME/.bashrc"
PS1='\u@${POOLGATE_VM}:\w\$ '
echo "Welcome to poolgate demo VM ${POOLGATE_VM} (a shell as $USER on this machine; exit to leave)."
"#;

/// Prepares the state dir and keys and builds the configuration and the provider.
pub fn prepare(options: &DemoOptions) -> anyhow::Result<Demo> {
    let state_dir = match &options.state_dir {
        Some(dir) => dir.clone(),
        None => default_state_dir()?,
    };
    private_dir(&state_dir)?;
    let account = account();

    // The gateway loads the same user CA file when it is built (`app::GatewayBuilder`).
    let user_ca_path = state_dir.join("user_ca");
    let (user_ca, _) =
        keys::load_or_generate(&user_ca_path, "poolgate demo user CA").context("demo user CA")?;
    let host_ca_path = state_dir.join("host_ca");
    let (host_ca, _) = keys::load_or_generate(&host_ca_path, "poolgate demo VM host CA")
        .context("demo VM host CA")?;
    let host_ca_pub = state_dir.join("host_ca.pub");
    let host_ca_line = host_ca
        .public_key()
        .to_openssh()
        .context("demo VM host CA")?;
    fs::write(&host_ca_pub, format!("{host_ca_line}\n"))
        .with_context(|| format!("writing {}", host_ca_pub.display()))?;
    let bash_rc = state_dir.join("vm-bashrc");
    let bash_rc = fs::write(&bash_rc, BASH_RC).ok().map(|()| bash_rc);

    let settings = Arc::new(DemoVmSettings {
        user_ca: user_ca.public_key().clone(),
        host_ca,
        shell: ShellSettings {
            program: account.shell.clone(),
            home: if account.home.is_dir() {
                account.home.clone()
            } else {
                PathBuf::from("/")
            },
            user: account.user.clone(),
            bash_rc,
            sftp_server: find_sftp_server(),
            setsid: find_setsid(),
        },
    });
    if settings.shell.sftp_server.is_none() {
        tracing::warn!(
            "OpenSSH's sftp-server is not installed: demo VMs refuse sftp (and scp in its default sftp mode)"
        );
    }
    let provider = Arc::new(DemoProvider::new(
        options.max_vms,
        settings,
        options.boot_delay,
    ));
    Ok(Demo {
        config: config(options, &state_dir),
        provider,
        state_dir,
        user: account.user,
    })
}

/// The gateway configuration of the demo: loopback listeners, demo VMs' host keys verified
/// through the demo host CA, password passthrough (the VMs accept `demo`), fast health checks and
/// autoscaling with short idle times.
pub fn config(options: &DemoOptions, state_dir: &Path) -> Config {
    let mut config = Config::default();
    let loopback = |port: u16| std::net::SocketAddr::from(([127, 0, 0, 1], port));
    config.listen.ssh = Some(loopback(options.ssh_port));
    config.listen.http = Some(loopback(options.http_port));
    config.listen.https = None;
    config.listen.admin = loopback(options.admin_port);
    config.gateway.shutdown_grace = Duration::from_secs(3);
    // The demo's pool lives in this process: nothing to remember across runs.
    config.gateway.state_file = poolgate_config::StateFile::Off;

    let ssh = &mut config.ssh;
    ssh.host_keys = vec![state_dir.join("ssh_host_ed25519_key")];
    ssh.user_ca_key = state_dir.join("user_ca");
    ssh.backend_known_hosts = None;
    ssh.backend_host_ca = Some(state_dir.join("host_ca.pub"));
    ssh.password_auth = PasswordAuth::Passthrough;
    ssh.banner = Some(BANNER.to_string());
    ssh.connect_timeout = Duration::from_secs(5);
    // `authorized_keys` is not read: the demo accepts any key.

    config.http.cookie_secret_file = state_dir.join("cookie_secret");
    // A page view counts as a session until the browser has been quiet this long (an open
    // websocket for as long as it is open): at the default 30 minutes one look at the page kept
    // the demo's pool up long after "scale in after 60 s" said it would go.
    config.http.session_idle = options.scale_in_after.min(Duration::from_secs(30));

    let health = &mut config.health;
    health.interval = Duration::from_secs(1);
    health.timeout = Duration::from_secs(1);
    health.rise = 1;
    health.fall = 2;
    health.http_path = "/hub/health".into();

    config.pool.provider = ProviderKind::Demo;

    let a = &mut config.autoscale;
    a.enabled = true;
    a.min_vms = options.min_vms.min(options.max_vms);
    a.max_vms = options.max_vms;
    a.sessions_per_vm = 2;
    a.spare_vms = 0;
    a.scale_in_after = options.scale_in_after;
    a.scale_to_zero_after = options.scale_to_zero_after;
    a.wake_on_connect = true;
    a.hold_connect_for = Duration::from_secs(60);
    a.tick = Duration::from_secs(1);
    a.cooldown = options.scale_in_after.min(Duration::from_secs(30));
    a.boot_estimate = options.boot_delay + Duration::from_secs(1);
    // The demo's VMs are local sshd processes sharing one process table, without a probe
    // account: no busy check (every VM would look busy with the others' sessions).
    a.busy_command = Vec::new();
    config
}

/// What to try, printed once the listeners are up.
pub fn instructions(options: &DemoOptions, user: &str, state_dir: &Path) -> String {
    let vms = if options.min_vms == 0 {
        "none running yet: the first login starts one".to_string()
    } else {
        format!("{} VM(s) kept running", options.min_vms)
    };
    format!(
        "\n\
         poolgate demo is running on 127.0.0.1 — a pool of up to {max} demo VMs, {vms}.\n\
         \n\
         Try:\n\
         \x20 ssh -p {ssh} {user}@127.0.0.1            any key works, or password: demo\n\
         \x20 ssh -p {ssh} {user}@127.0.0.1 'echo $POOLGATE_VM'\n\
         \x20 http://127.0.0.1:{http}/                 a page from the VM you are pinned to\n\
         \x20 http://127.0.0.1:{admin}/status           the pool at a glance\n\
         \x20 http://127.0.0.1:{admin}/metrics          Prometheus metrics\n\
         \x20 {program} status --admin 127.0.0.1:{admin}\n\
         \n\
         VMs idle for {idle} are drained and stopped. Keys: {dir}. Ctrl-C stops everything.\n\
         (The first ssh asks to trust the gateway's host key; it stays the same across runs.)\n",
        max = options.max_vms,
        ssh = options.ssh_port,
        http = options.http_port,
        admin = options.admin_port,
        idle = humantime::format_duration(options.scale_in_after),
        dir = state_dir.display(),
        program = program_to_run(),
    )
}

/// How to run this binary again from the demo's terminal: `poolgate` when that is the first
/// `poolgate` on `PATH`, else the binary's path (`cargo run` leaves it in `target/`, not on
/// `PATH`): relative to the working directory when under it, with `./` when it is right there.
fn program_to_run() -> String {
    let Ok(me) = std::env::current_exe() else {
        return "poolgate".to_owned();
    };
    let path = std::env::var_os("PATH").unwrap_or_default();
    let first_on_path = std::env::split_paths(&path)
        .map(|dir| dir.join("poolgate"))
        .find(|p| p.is_file());
    if first_on_path.is_some_and(|p| std::fs::canonicalize(p).is_ok_and(|p| p == me)) {
        return "poolgate".to_owned();
    }
    match std::env::current_dir()
        .ok()
        .and_then(|cwd| me.strip_prefix(cwd).ok().map(Path::to_path_buf))
    {
        Some(under) if under.components().count() == 1 => format!("./{}", under.display()),
        Some(under) => under.display().to_string(),
        None => me.display().to_string(),
    }
}

/// Runs `poolgate demo` until Ctrl-C: prepares keys, prints what to try once the listeners are
/// up, and says which flag to change when a port is taken.
pub async fn run(options: DemoOptions) -> anyhow::Result<()> {
    let demo = prepare(&options)?;
    let text = instructions(&options, &demo.user, &demo.state_dir);
    let result = crate::app::GatewayBuilder::new(demo.config)
        .provider(demo.provider.clone())
        .user_auth(crate::ssh::UserAuth::AnyKey)
        .poll_interval(Duration::from_secs(1))
        .on_ready(move || {
            use std::io::Write;
            let _ = std::io::stdout().write_all(text.as_bytes());
            let _ = std::io::stdout().flush();
        })
        .run()
        .await;
    // Stop the demo VMs (and their sessions' processes) before returning.
    drop(demo.provider);
    result.map_err(|e| {
        // A port the demo could not bind: named by the demo's flag, not the config key the
        // gateway's own hint names.
        let bound = e.downcast_ref::<crate::app::BindError>().and_then(|b| {
            let flag = port_flag(b.key.strip_prefix("listen.")?)?;
            Some((b, flag))
        });
        match bound {
            Some((b, flag)) => anyhow::anyhow!(
                "{}: cannot listen on {}: {}\nIs that port taken? Pick another one with {flag} PORT.",
                b.key,
                b.addr,
                b.error
            ),
            None => e,
        }
    })
}

/// The demo flag that sets the port of `listen.<which>` (for "port taken" errors).
pub fn port_flag(listener: &str) -> Option<&'static str> {
    match listener {
        "ssh" => Some("--ssh-port"),
        "http" => Some("--http-port"),
        "admin" => Some("--admin-port"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> DemoOptions {
        DemoOptions {
            ssh_port: 2222,
            http_port: 8080,
            admin_port: 9090,
            min_vms: 0,
            max_vms: 3,
            boot_delay: Duration::from_secs(3),
            scale_in_after: Duration::from_secs(60),
            scale_to_zero_after: Duration::from_secs(90),
            state_dir: None,
        }
    }

    #[test]
    fn config_is_loopback_only_and_verifies_vm_host_keys() {
        let config = config(&options(), Path::new("/state"));
        let http = config.listen.http.expect("the demo serves HTTP");
        let ssh = config.listen.ssh.expect("the demo serves SSH");
        for addr in [ssh, http, config.listen.admin] {
            assert!(addr.ip().is_loopback(), "{addr}");
        }
        assert!(config.listen.https.is_none());
        assert_eq!(
            config.ssh.backend_host_ca.as_deref(),
            Some(Path::new("/state/host_ca.pub"))
        );
        assert_eq!(config.pool.provider, ProviderKind::Demo);
        assert!(config.autoscale.enabled);
        assert_eq!(config.autoscale.sessions_per_vm, 2);
        assert_eq!(config.autoscale.spare_vms, 0);
        assert_eq!(config.health.http_path, "/hub/health");
        assert!(
            config
                .ssh
                .banner
                .as_deref()
                .is_some_and(|b| b.contains("Not for production"))
        );
    }

    #[test]
    fn state_dir_is_created_private_and_an_open_one_is_refused() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("a/b");
        private_dir(&dir).unwrap();
        let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        private_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let err = private_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("chmod 700"), "{err}");
        let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755, "an existing directory is left alone");
    }

    #[test]
    fn passwd_lookup_by_uid() {
        let text = "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/zsh\n";
        let alice = parse_passwd(text, 1000).unwrap();
        assert_eq!(alice.user, "alice");
        assert_eq!(alice.home, PathBuf::from("/home/alice"));
        assert_eq!(alice.shell, PathBuf::from("/bin/zsh"));
        assert!(parse_passwd(text, 7).is_none());
    }

    #[test]
    fn instructions_name_the_real_ports_and_user() {
        let text = instructions(&options(), "alice", Path::new("/s"));
        assert!(text.contains("ssh -p 2222 alice@127.0.0.1"));
        assert!(text.contains("http://127.0.0.1:8080/"));
        assert!(text.contains("http://127.0.0.1:9090/status"));
        assert!(text.contains("http://127.0.0.1:9090/metrics"));
        // The test binary is not on PATH (and not named poolgate): its path is printed, which
        // a shell runs as it is (it has a slash).
        let program = program_to_run();
        assert!(program.contains('/'), "{program}");
        assert!(
            text.contains(&format!("{program} status --admin 127.0.0.1:9090")),
            "{text}"
        );
    }
}
