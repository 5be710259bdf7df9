//! `poolgate demo`: an in-process pool of demo VMs behind the real gateway.
//!
//! A demo VM is what a pool VM looks like from the gateway, served from inside this process on
//! 127.0.0.1: an SSH server (`ssh`, russh) with its own host key and a host certificate from the
//! demo host CA, which accepts the gateway's user certificates (principal = login) and the
//! password `demo`, runs a real shell in a pty as the current OS user, exec, sftp (through
//! OpenSSH's `sftp-server` when installed) and `ssh -L` to 127.0.0.1; and a web server (`web`)
//! with a page naming the VM, `/hub/health` and a websocket echo at `/ws`.
//!
//! `setup` builds the gateway configuration for `poolgate demo` (no file) and its state dir;
//! the `demo` provider (`provider`) starts and stops these VMs like a cloud provider would.

mod process;
pub mod provider;
pub mod setup;
mod ssh;
#[cfg(test)]
mod tests;
mod web;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use russh::keys::ssh_key::certificate::{Builder, CertType};
use russh::keys::ssh_key::{Algorithm, PrivateKey, PublicKey};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// What every demo VM shares: whom to trust, how to sign its host key, how to run shells.
#[derive(Debug)]
pub struct DemoVmSettings {
    /// The gateway's user CA: certificates it signs log users in (principal = login name).
    pub user_ca: PublicKey,
    /// Signs each VM's host key (the gateway trusts its public half as `backend_host_ca`).
    pub host_ca: PrivateKey,
    /// How shells are started.
    pub shell: ShellSettings,
}

/// The OS account shells run as (always the account running poolgate) and its shell.
#[derive(Debug, Clone)]
pub struct ShellSettings {
    /// Login shell (`/etc/passwd`, else `$SHELL`, else `/bin/sh`).
    pub program: PathBuf,
    /// Home directory (working directory of sessions).
    pub home: PathBuf,
    /// OS user name.
    pub user: String,
    /// A bash rc file that loads the user's usual rc files and then names the VM in `PS1`;
    /// used when the shell is bash.
    pub bash_rc: Option<PathBuf>,
    /// OpenSSH's `sftp-server`, when installed.
    pub sftp_server: Option<PathBuf>,
    /// util-linux's `setsid`, when installed: commands without a pty run through it, in a
    /// session of their own.
    pub setsid: Option<PathBuf>,
}

/// Why a demo VM could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoVmError {
    /// A listener could not be opened.
    #[error("demo VM {vm}: cannot listen on 127.0.0.1: {source}")]
    Listen {
        /// VM name.
        vm: String,
        /// What failed.
        source: std::io::Error,
    },
    /// The host key or its certificate could not be made.
    #[error("demo VM {vm}: host key: {message}")]
    HostKey {
        /// VM name.
        vm: String,
        /// What failed.
        message: String,
    },
}

/// A running demo VM. Dropping it stops it: its listeners close, its SSH connections end and the
/// processes of their sessions are killed.
#[derive(Debug)]
pub struct DemoVm {
    name: String,
    ssh_addr: SocketAddr,
    http_addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
    /// The tag every process of this VM carries in its environment ([`INSTANCE_VAR`]).
    instance: Arc<str>,
}

/// The environment variable naming the demo VM a process was started on (one value per VM start):
/// a demo VM has no process table of its own, so stopping it finds what its users left running
/// (`nohup`, `setsid`, `disown`) by this tag, as stopping a real VM ends every process on it.
pub(crate) const INSTANCE_VAR: &str = "POOLGATE_DEMO_INSTANCE";

/// Ends every process of this user whose environment carries `instance` in [`INSTANCE_VAR`], as
/// stopping a VM ends what runs on it: SIGTERM, and SIGKILL for what is left after
/// [`TERM_GRACE`]. Returns how many got SIGTERM. Only processes of this user are looked at (the
/// owner of `/proc/PID`, read without touching the process's memory); gone or unreadable ones
/// are skipped. Blocking: run it off the async workers.
fn end_processes_of(instance: &str) -> usize {
    let tag = format!("{INSTANCE_VAR}={instance}");
    // This process's user: the owner of its own /proc entry.
    let Ok(me) = std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m))
    else {
        return 0;
    };
    let tagged = || -> Vec<nix::unistd::Pid> {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| {
                e.path()
                    .metadata()
                    .is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == me)
            })
            .filter_map(|e| {
                let pid = e.file_name().to_str()?.parse::<i32>().ok()?;
                let environ = std::fs::read(e.path().join("environ")).ok()?;
                environ
                    .split(|b| *b == 0)
                    .any(|var| var == tag.as_bytes())
                    .then(|| nix::unistd::Pid::from_raw(pid))
            })
            .collect()
    };
    use nix::sys::signal::{Signal, kill};
    let first = tagged();
    for pid in &first {
        let _ = kill(*pid, Signal::SIGTERM);
    }
    // Look again only once they have had a moment to exit.
    let deadline = std::time::Instant::now() + TERM_GRACE;
    let mut left = first.len();
    while left > 0 {
        std::thread::sleep(Duration::from_millis(100));
        let still = tagged();
        left = still.len();
        if left > 0 && std::time::Instant::now() >= deadline {
            for pid in still {
                let _ = kill(pid, Signal::SIGKILL);
            }
            break;
        }
    }
    first.len()
}

/// How long a demo VM's processes have after SIGTERM.
const TERM_GRACE: Duration = Duration::from_secs(2);

impl DemoVm {
    /// Starts VM `name` on 127.0.0.1, on the preferred ports when free (else on any free port).
    pub async fn start(
        name: &str,
        preferred: (u16, u16),
        settings: Arc<DemoVmSettings>,
    ) -> Result<Self, DemoVmError> {
        let ssh_listener = bind(name, preferred.0).await?;
        let http_listener = bind(name, preferred.1).await?;
        let local = |l: &TcpListener| {
            l.local_addr().map_err(|source| DemoVmError::Listen {
                vm: name.to_string(),
                source,
            })
        };
        let ssh_addr = local(&ssh_listener)?;
        let http_addr = local(&http_listener)?;
        let host_key = host_key(name, &settings.host_ca)?;
        let vm: Arc<str> = Arc::from(name);
        static STARTS: AtomicU64 = AtomicU64::new(0);
        let instance: Arc<str> = Arc::from(format!(
            "{}-{name}-{}",
            std::process::id(),
            STARTS.fetch_add(1, Ordering::Relaxed)
        ));
        let ssh_task = tokio::spawn(ssh::serve(
            ssh_listener,
            ssh::VmContext {
                name: vm.clone(),
                instance: instance.clone(),
                settings: settings.clone(),
            },
            host_key,
        ));
        let web_task = tokio::spawn(web::serve(http_listener, vm));
        tracing::info!(vm = name, ssh = %ssh_addr, http = %http_addr, "demo VM started");
        Ok(Self {
            name: name.to_string(),
            ssh_addr,
            http_addr,
            tasks: vec![ssh_task, web_task],
            instance,
        })
    }

    /// Name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// SSH address.
    pub fn ssh_addr(&self) -> SocketAddr {
        self.ssh_addr
    }

    /// HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }
}

impl Drop for DemoVm {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        // Off the async workers (it reads /proc and waits for SIGTERM to be heeded); the
        // runtime waits for it at exit.
        let (vm, instance) = (self.name.clone(), self.instance.clone());
        let end = move || {
            let ended = end_processes_of(&instance);
            tracing::info!(%vm, processes_ended = ended, "demo VM stopped");
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(end)),
            Err(_) => end(),
        }
    }
}

async fn bind(vm: &str, preferred: u16) -> Result<TcpListener, DemoVmError> {
    if preferred != 0
        && let Ok(listener) = TcpListener::bind((Ipv4Addr::LOCALHOST, preferred)).await
    {
        return Ok(listener);
    }
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .map_err(|source| DemoVmError::Listen {
            vm: vm.to_string(),
            source,
        })
}

/// A fresh Ed25519 host key and its host certificate for `127.0.0.1`, signed by the demo host CA
/// (valid from a minute ago for 30 days).
fn host_key(
    vm: &str,
    ca: &PrivateKey,
) -> Result<(PrivateKey, russh::keys::ssh_key::Certificate), DemoVmError> {
    let err = |e: russh::keys::ssh_key::Error| DemoVmError::HostKey {
        vm: vm.to_string(),
        message: e.to_string(),
    };
    let key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).map_err(err)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let mut nonce = [0u8; 32];
    rand::fill(&mut nonce);
    let mut builder = Builder::new(
        nonce.to_vec(),
        key.public_key().key_data().clone(),
        now.saturating_sub(60),
        now + Duration::from_secs(30 * 24 * 3600).as_secs(),
    )
    .map_err(err)?;
    builder
        .cert_type(CertType::Host)
        .map_err(err)?
        .key_id(format!("poolgate demo VM {vm}"))
        .map_err(err)?
        .valid_principal("127.0.0.1")
        .map_err(err)?;
    let cert = builder.sign(ca).map_err(err)?;
    Ok((key, cert))
}
