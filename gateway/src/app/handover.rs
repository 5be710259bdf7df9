//! Upgrading a running gateway in place (SIGUSR2), without refusing a connection or cutting a
//! session.
//!
//! The running gateway starts its own program again (the path it was started with, so a binary
//! installed over it since is the one that runs), passing it its listening sockets: the new
//! process takes a listener whose address is still configured instead of binding it, so the
//! kernel's accept queue is never closed and a client connecting meanwhile is taken by one
//! process or the other. The two talk over a socket pair passed with the listeners:
//!
//! 1. the new process reads the configuration and builds every part exactly as a start does; one
//!    that cannot start exits with its errors logged, and the running gateway keeps serving;
//! 2. once it serves, it sends `ready` (and, under systemd, `MAINPID` and `READY=1`, so the unit
//!    follows it);
//! 3. the old process then shuts down as on SIGTERM (no new connections; open SSH sessions run
//!    until they end or `gateway.shutdown_grace` passes; browsers carry on with the new process
//!    at their next request) and, meanwhile, sends the new one its SSH sessions per VM, its
//!    drained VMs and the users of its SSH sessions five times a second (and, the first time,
//!    every user's affinity it remembers): the new gateway counts those sessions when it places
//!    logins and when its autoscaler looks for idle VMs (it never stops a VM that still has the
//!    old process's sessions), keeps the drains, and sends users back to their VM as the old
//!    process would have;
//! 4. when the old process exits the socket closes and the new one stops counting its sessions.
//!
//! Inheriting the listeners follows systemd's socket-passing convention (`LISTEN_FDS`, the file
//! descriptors from 3 up) through the `listenfd` crate; the new process is told it is a
//! successor by `POOLGATE_HANDOVER_FROM` (the old process id), and then fd 3 is the socket pair.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use command_fds::{CommandFdExt, FdMapping};
use router_core::{LoadCounts, Pool, Protocol};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixStream};

use super::state::{Remembered, log_inherited, pool_listed};
use crate::autoscale::Driver;

/// Names the old process in a successor's environment.
const FROM_ENV: &str = "POOLGATE_HANDOVER_FROM";

/// The first passed file descriptor (systemd's convention).
const FIRST_FD: i32 = 3;

/// What the successor sends once it serves.
const READY: &[u8] = b"ready\n";

/// How long a successor may take to serve before the old process gives up on it.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// How often the old process tells its successor about the sessions it still has (often, so
/// that sessions ended there stop counting against the VMs' session limits here at once).
const REPORT_EVERY: Duration = Duration::from_millis(200);

/// The longest report line a successor reads (a pool of thousands of VMs and users fits).
const MAX_REPORT: u64 = 16 << 20;
/// How long the old process waits for its first report to be taken.
const FIRST_REPORT_WITHIN: Duration = Duration::from_secs(5);

/// Sockets passed to this process at its start: listeners, and the link to the gateway it takes
/// over from when it is a successor.
#[derive(Default)]
pub struct Inherited {
    listeners: Vec<std::net::TcpListener>,
    link: Option<(u32, StdUnixStream)>,
    problems: Vec<String>,
}

impl std::fmt::Debug for Inherited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inherited")
            .field("listeners", &self.listeners.len())
            .field("predecessor", &self.link.as_ref().map(|(pid, _)| pid))
            .finish_non_exhaustive()
    }
}

impl Inherited {
    /// Takes the sockets passed in `LISTEN_FDS` (none when it is unset). It clears `LISTEN_FDS`
    /// and `LISTEN_PID` from the environment, so it must run before any other thread starts:
    /// first thing in `main`.
    pub fn from_env() -> Self {
        let predecessor = std::env::var(FROM_ENV)
            .ok()
            .and_then(|pid| pid.parse::<u32>().ok());
        let mut fds = listenfd::ListenFd::from_env();
        let mut inherited = Self::default();
        let mut first = 0;
        if let Some(pid) = predecessor {
            first = 1;
            // listenfd hands a Unix stream socket out as a listener; this one is one end of a
            // connected pair, so it is turned back into the stream it is.
            match fds.take_unix_listener(0) {
                Ok(Some(link)) => {
                    inherited.link = Some((pid, StdUnixStream::from(OwnedFd::from(link))));
                }
                Ok(None) => inherited
                    .problems
                    .push(format!("{FROM_ENV} is set but no socket was passed")),
                Err(e) => inherited
                    .problems
                    .push(format!("the link to the previous gateway: {e}")),
            }
        }
        for index in first..fds.len() {
            match fds.take_tcp_listener(index) {
                Ok(Some(listener)) => inherited.listeners.push(listener),
                Ok(None) => {}
                Err(e) => inherited.problems.push(format!(
                    "passed file descriptor {}: {e}",
                    index + FIRST_FD as usize
                )),
            }
        }
        inherited
    }

    /// The process this one takes over from, if it is a successor.
    pub(super) fn predecessor(&self) -> Option<u32> {
        self.link.as_ref().map(|(pid, _)| *pid)
    }

    /// Logs what could not be used (once, when the log is up).
    pub(super) fn log_problems(&self) {
        for problem in &self.problems {
            tracing::warn!("ignored at start: {problem}");
        }
    }

    /// The passed listener bound to `addr`, ready for tokio, if there is one.
    pub(super) fn take(&mut self, addr: SocketAddr) -> anyhow::Result<Option<TcpListener>> {
        let Some(at) = self
            .listeners
            .iter()
            .position(|l| l.local_addr().is_ok_and(|a| a == addr))
        else {
            return Ok(None);
        };
        let listener = self.listeners.swap_remove(at);
        listener
            .set_nonblocking(true)
            .context("a passed listener")?;
        Ok(Some(TcpListener::from_std(listener)?))
    }

    /// Closes the passed listeners no configured address took (the new configuration moved or
    /// turned them off), saying which.
    pub(super) fn close_unused(&mut self) {
        for listener in self.listeners.drain(..) {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "a listener of the previous gateway is no longer configured; closed");
            }
        }
    }

    /// The link to the predecessor, for [`follow_predecessor`].
    pub(super) fn take_link(&mut self) -> Option<(u32, StdUnixStream)> {
        self.link.take()
    }
}

/// Copies of the listening sockets, kept to pass to a successor. They must be dropped when the
/// gateway stops accepting, or the kernel would keep queueing connections nobody accepts.
pub(super) struct Listeners(Vec<OwnedFd>);

impl Listeners {
    pub(super) fn new<'a>(
        listeners: impl IntoIterator<Item = &'a TcpListener>,
    ) -> std::io::Result<Self> {
        listeners
            .into_iter()
            .map(|l| l.as_fd().try_clone_to_owned())
            .collect::<std::io::Result<Vec<_>>>()
            .map(Self)
    }
}

/// A successor started and not yet serving.
pub(super) struct Successor {
    child: tokio::process::Child,
    link: UnixStream,
    pid: u32,
    /// When the old process gives up on it ([`START_TIMEOUT`] after it started).
    deadline: tokio::time::Instant,
    /// What it has said so far (a read may be cut short by another event and resumed).
    said: Vec<u8>,
}

impl Successor {
    /// Starts this program again with the same arguments and the listeners.
    pub(super) fn spawn(listeners: &Listeners) -> anyhow::Result<Self> {
        let mut args = std::env::args_os();
        let program = args.next().context("no program name in argv")?;
        let (mine, theirs) = StdUnixStream::pair().context("socket pair")?;
        let mut mappings = vec![FdMapping {
            parent_fd: OwnedFd::from(theirs),
            child_fd: FIRST_FD,
        }];
        for (fd, child_fd) in listeners.0.iter().zip(FIRST_FD + 1..) {
            mappings.push(FdMapping {
                parent_fd: fd.try_clone().context("a listener")?,
                child_fd,
            });
        }
        let passed = mappings.len();
        let mut command = tokio::process::Command::new(&program);
        command
            .args(args)
            .env(FROM_ENV, std::process::id().to_string())
            .env("LISTEN_FDS", passed.to_string())
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .stdin(Stdio::null());
        command
            .fd_mappings(mappings)
            .context("passing the listeners")?;
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {}", program.to_string_lossy()))?;
        // The command holds this process's copies of the passed sockets until it is dropped.
        drop(command);
        let pid = child.id().context("the new process has no id")?;
        mine.set_nonblocking(true)?;
        Ok(Self {
            child,
            link: UnixStream::from_std(mine)?,
            pid,
            deadline: tokio::time::Instant::now() + START_TIMEOUT,
            said: Vec::new(),
        })
    }

    /// The new process's id.
    pub(super) fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits until the successor serves (`Ok`), exits, or passes [`START_TIMEOUT`] (it is then
    /// stopped). Cancel-safe: the loop of `serve` polls it beside the signals.
    pub(super) async fn ready(&mut self) -> anyhow::Result<()> {
        while self.said.len() < READY.len() {
            let mut byte = [0u8; 1];
            tokio::select! {
                read = self.link.read(&mut byte) => match read {
                    Ok(1) => self.said.push(byte[0]),
                    _ => {
                        let status = self.child.wait().await;
                        anyhow::bail!("{}", self.exited_early(status))
                    }
                },
                status = self.child.wait() => anyhow::bail!("{}", self.exited_early(status)),
                () = tokio::time::sleep_until(self.deadline) => {
                    self.stop();
                    anyhow::bail!(
                        "the new process (pid {}) did not serve within {}; stopped it",
                        self.pid,
                        humantime::format_duration(START_TIMEOUT)
                    )
                }
            }
        }
        if self.said != READY {
            self.stop();
            anyhow::bail!(
                "the new process (pid {}) answered {:?}; stopped it",
                self.pid,
                String::from_utf8_lossy(&self.said)
            );
        }
        Ok(())
    }

    fn exited_early(&self, status: std::io::Result<std::process::ExitStatus>) -> String {
        let how = match status {
            Ok(status) => match status.code() {
                Some(code) => format!("exited with status {code}"),
                None => format!("ended ({status})"),
            },
            Err(e) => format!("could not be waited for ({e})"),
        };
        format!(
            "the new process (pid {}) {how} before it served (its errors are in the log above)",
            self.pid
        )
    }

    /// Stops a successor that will not take over (the old gateway stops, or gave up on it):
    /// SIGTERM, which it handles as a gateway does (it may just have started serving).
    pub(super) fn stop(&mut self) {
        if let Ok(pid) = i32::try_from(self.pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }

    /// Tells the successor what this gateway remembers (drains, with `pending`: drains read
    /// from the state file that wait for the provider's first listing; affinity) and its
    /// sessions, then its sessions every [`REPORT_EVERY`] until this process exits (or the
    /// successor does). Waits until the first report is written, for at most
    /// [`FIRST_REPORT_WITHIN`]: a gateway with no session left exits at once, and what it
    /// remembers must not go with it. A first report slower than that still goes on in the
    /// background, followed by the others.
    pub(super) async fn report(
        self,
        pool: Arc<Pool>,
        driver: Arc<Driver>,
        pending: Option<Remembered>,
    ) {
        let Self {
            child, mut link, ..
        } = self;
        // Not waited for: the successor outlives this process.
        drop(child);
        let mut first = Report::first(&pool, &driver);
        if let Some(pending) = &pending {
            first.remembered.add_drains(pending);
        }
        let (sent, first_sent) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            if let Err(e) = send(&mut link, &first).await {
                tracing::warn!(error = %e, "could not tell the new process this gateway's drains and users' VMs");
                return;
            }
            let _ = sent.send(());
            let mut every = tokio::time::interval(REPORT_EVERY);
            // The first tick is at once: the first report has just gone.
            every.tick().await;
            loop {
                every.tick().await;
                if send(&mut link, &Report::of(&pool, &driver)).await.is_err() {
                    return;
                }
            }
        });
        if tokio::time::timeout(FIRST_REPORT_WITHIN, first_sent)
            .await
            .is_err()
        {
            tracing::warn!(
                "the new process has not taken this gateway's drains and users' VMs within 5 s; still trying while this gateway drains"
            );
        }
    }
}

/// Writes one report, a line of JSON.
async fn send(link: &mut UnixStream, report: &Report) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(report).map_err(std::io::Error::other)?;
    line.push(b'\n');
    link.write_all(&line).await
}

/// What a draining gateway tells its successor.
///
/// Only SSH sessions: a browser's session is its cookie, not its connection, and it carries on
/// in the successor with its next request (the old process takes none); counting it in both
/// would fill the VMs' session limits twice over.
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
struct Report {
    /// Its open SSH sessions per VM, VMs without any left out.
    ssh: BTreeMap<String, u32>,
    /// Users with open SSH sessions, and the VM of one of them.
    users: BTreeMap<String, String>,
    /// Its drains, which of them are scale-in drains, and (the first report only) every user's
    /// affinity it remembers.
    #[serde(flatten)]
    remembered: Remembered,
}

impl Report {
    /// Its sessions and its drains.
    fn of(pool: &Pool, driver: &Driver) -> Self {
        Self::with(pool, Remembered::drains(pool, driver))
    }

    /// Its sessions, its drains and what the affinity store remembers.
    fn first(pool: &Pool, driver: &Driver) -> Self {
        Self::with(pool, Remembered::all(pool, driver))
    }

    fn with(pool: &Pool, remembered: Remembered) -> Self {
        let mut report = Self {
            remembered,
            ..Self::default()
        };
        for vm in pool.snapshot().vms() {
            let ssh = vm.local_sessions(Protocol::Ssh);
            if ssh > 0 {
                report.ssh.insert(vm.name().to_owned(), ssh);
            }
        }
        for session in pool.sessions() {
            if let (Protocol::Ssh, Some(user)) = (session.protocol, session.user) {
                report.users.insert(user, session.vm);
            }
        }
        report
    }
}

/// Tells the predecessor this gateway serves, then follows its reports until it exits: its
/// drains and affinity, and its sessions when `count_sessions` (without `[cluster]`; with it
/// they come through the store). `applied` is sent once the first report is applied (dropped
/// if none comes), with the drains that wait for the provider's first listing here, if any:
/// restored here once listed when no one takes them.
pub(super) async fn follow_predecessor(
    pool: Arc<Pool>,
    driver: Arc<Driver>,
    pid: u32,
    link: StdUnixStream,
    count_sessions: bool,
    applied: tokio::sync::oneshot::Sender<Option<Remembered>>,
) {
    let link = match link
        .set_nonblocking(true)
        .and_then(|()| UnixStream::from_std(link))
    {
        Ok(link) => link,
        Err(e) => {
            tracing::warn!(pid, error = %e, "the link to the previous gateway is unusable; its sessions are not counted here");
            return;
        }
    };
    let (read, mut write) = link.into_split();
    if let Err(e) = write.write_all(READY).await {
        tracing::warn!(pid, error = %e, "could not tell the previous gateway this one serves");
        return;
    }
    tracing::info!(
        pid,
        "serving; the previous gateway stops taking connections and drains its sessions"
    );
    let mut lines = BufReader::new(read);
    let mut line = Vec::new();
    let mut counted = BTreeSet::new();
    let mut applied = Some(applied);
    loop {
        line.clear();
        match (&mut lines)
            .take(MAX_REPORT)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(0) | Err(_) => break,
            Ok(_) if line.last() != Some(&b'\n') => break,
            Ok(_) => {}
        }
        let Ok(mut report) = serde_json::from_slice::<Report>(&line) else {
            tracing::debug!("an unreadable report from the previous gateway; skipped");
            continue;
        };
        if !count_sessions {
            report.ssh.clear();
        }
        let first = applied.is_some();
        let deferred = apply(&pool, &driver, &report, &mut counted, first);
        // With [cluster] (sessions not counted here) the store holds the drains for every
        // replica: one restored late from the report could undo an undrain made there since.
        if let Some(applied) = applied.take()
            && let Err(Some(deferred)) = applied.send(deferred)
            && count_sessions
        {
            tokio::spawn(super::state::restore_drains_once_listed(
                pool.clone(),
                driver.clone(),
                deferred,
            ));
        }
    }
    drop(applied);
    for vm in &counted {
        pool.set_remote_load(vm, LoadCounts::default());
    }
    tracing::info!(
        pid,
        "the previous gateway has exited; the handover is complete"
    );
}

/// Counts the predecessor's sessions as another replica's, keeps its drains (the first report
/// only: an operator may undrain here meanwhile; scale-in drains stay the autoscaler's), the
/// affinity it remembers and its users' VMs. Returns the drains that must wait for the
/// provider's first listing here (before it, every VM would look unknown).
fn apply(
    pool: &Pool,
    driver: &Driver,
    report: &Report,
    counted: &mut BTreeSet<String>,
    first: bool,
) -> Option<Remembered> {
    for vm in counted.iter() {
        if !report.ssh.contains_key(vm) {
            pool.set_remote_load(vm, LoadCounts::default());
        }
    }
    counted.clear();
    for (vm, &ssh) in &report.ssh {
        let load = LoadCounts {
            ssh,
            http: 0,
            tentative: 0,
        };
        if pool.set_remote_load(vm, load) {
            counted.insert(vm.clone());
        }
    }
    let mut deferred = None;
    if first {
        if report.remembered.drained.is_empty() || pool_listed(pool, driver) {
            log_inherited(&report.remembered.restore_drains(pool, driver));
        } else {
            tracing::info!(
                drained = ?report.remembered.drained,
                "the previous gateway's drains wait for the provider's first listing here"
            );
            deferred = Some(report.remembered.only_drains());
        }
        // Users who logged in here since are where they are now.
        report.remembered.restore_affinity(pool, Duration::ZERO);
    }
    let now = pool.clock().now();
    for (user, vm) in &report.users {
        // A session that started and ended now: the user's affinity points at that VM for
        // `routing.affinity_ttl` from the last report.
        pool.store().session_started(user, vm, now);
        pool.store().session_ended(user, vm, now);
    }
    deferred
}

/// Tells systemd (when it started the gateway with `Type=notify`) that the gateway serves; a
/// successor also says it is the unit's main process now.
pub(super) fn notify_ready(successor: bool) {
    let mut states = Vec::with_capacity(2);
    if successor {
        states.push(sd_notify::NotifyState::MainPid(std::process::id()));
    }
    states.push(sd_notify::NotifyState::Ready);
    if let Err(e) = sd_notify::notify(&states) {
        tracing::warn!(error = %e, "could not tell systemd the gateway is ready (NOTIFY_SOCKET)");
    }
}

/// Tells systemd the gateway is stopping (not after a handover: the unit lives on in the
/// successor).
pub(super) fn notify_stopping() {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::state::tests::{draining, driver, scaling_driver};
    use router_core::{RoutingPolicy, SystemClock, VmSpec};

    fn pool(names: &[&str]) -> Arc<Pool> {
        let pool = Arc::new(Pool::new(RoutingPolicy::default(), Arc::new(SystemClock)));
        pool.set_vms(names.iter().map(|n| VmSpec::new(*n, "127.0.0.1")).collect());
        pool
    }

    #[test]
    fn a_report_round_trips_and_its_sessions_count_until_the_next_says_otherwise() {
        let report = Report {
            ssh: BTreeMap::from([("vm-a".to_owned(), 2)]),
            users: BTreeMap::from([("alice".to_owned(), "vm-a".to_owned())]),
            remembered: Remembered {
                drained: BTreeSet::from(["vm-b".to_owned()]),
                ..Remembered::default()
            },
        };
        let line = serde_json::to_vec(&report).unwrap();
        assert_eq!(serde_json::from_slice::<Report>(&line).unwrap(), report);

        let pool = pool(&["vm-a", "vm-b"]);
        let driver = driver(&pool);
        let mut counted = BTreeSet::new();
        apply(&pool, &driver, &report, &mut counted, true);
        let snap = pool.snapshot();
        let a = snap.vms().iter().find(|v| v.name() == "vm-a").unwrap();
        assert_eq!(
            (a.sessions(Protocol::Ssh), a.sessions(Protocol::Http)),
            (2, 0)
        );
        assert_eq!(a.local_sessions(Protocol::Ssh), 0, "not this gateway's own");
        assert!(
            snap.vms()
                .iter()
                .any(|v| v.name() == "vm-b" && v.status().draining)
        );
        let now = pool.clock().now();
        assert_eq!(
            pool.store()
                .affinity("alice", now, pool.policy().affinity_ttl)
                .as_deref(),
            Some("vm-a")
        );

        // The sessions ended there: counted no more.
        apply(&pool, &driver, &Report::default(), &mut counted, false);
        let snap = pool.snapshot();
        let a = snap.vms().iter().find(|v| v.name() == "vm-a").unwrap();
        assert_eq!(a.total_sessions(), 0);
        assert!(counted.is_empty());
    }

    #[test]
    fn the_affinity_the_old_process_remembers_carries_over_with_its_age() {
        let old = pool(&["vm-a", "vm-b"]);
        let t = old.clock().now();
        old.store().session_started("bob", "vm-b", t);
        old.store().session_ended("bob", "vm-b", t);
        old.store().session_started("carol", "vm-a", t);
        old.store().session_ended("carol", "vm-a", t);
        let report = Report::first(&old, &driver(&old));
        assert_eq!(report.remembered.affinity["bob"].0, "vm-b");

        let new = pool(&["vm-a", "vm-b"]);
        let new_driver = driver(&new);
        // Carol logged in to the new process before the report came.
        let now = new.clock().now();
        new.store().session_started("carol", "vm-b", now);
        apply(&new, &new_driver, &report, &mut BTreeSet::new(), true);
        let ttl = new.policy().affinity_ttl;
        let affinity = |user: &str| {
            new.store()
                .affinity(user, now, ttl)
                .map(|vm| vm.to_string())
        };
        assert_eq!(affinity("bob").as_deref(), Some("vm-b"));
        assert_eq!(
            affinity("carol").as_deref(),
            Some("vm-b"),
            "where she is now"
        );
        // An entry seen an affinity_ttl ago is not brought back to life.
        let stale = Report {
            remembered: Remembered {
                affinity: BTreeMap::from([(
                    "dave".to_owned(),
                    ("vm-a".to_owned(), ttl.as_secs() + 60),
                )]),
                ..Remembered::default()
            },
            ..Report::default()
        };
        apply(&new, &new_driver, &stale, &mut BTreeSet::new(), true);
        assert_eq!(affinity("dave"), None);
    }

    #[test]
    fn a_drain_lifted_here_is_not_put_back_by_a_later_report() {
        let pool = pool(&["vm-a"]);
        let driver = driver(&pool);
        let report = Report {
            remembered: Remembered {
                drained: BTreeSet::from(["vm-a".to_owned()]),
                ..Remembered::default()
            },
            ..Report::default()
        };
        let mut counted = BTreeSet::new();
        apply(&pool, &driver, &report, &mut counted, true);
        assert!(pool.undrain("vm-a"));
        apply(&pool, &driver, &report, &mut counted, false);
        assert!(!pool.snapshot().vms()[0].status().draining);
    }

    #[test]
    fn a_report_names_only_vms_with_sessions_and_the_drained() {
        let pool = pool(&["vm-a", "vm-b", "vm-c"]);
        pool.drain("vm-c");
        let report = Report::of(&pool, &driver(&pool));
        assert!(report.ssh.is_empty());
        assert_eq!(
            report.remembered.drained,
            BTreeSet::from(["vm-c".to_owned()])
        );
    }

    /// The first report of a gateway whose vm-a an operator drained, and whose vm-b the
    /// autoscaler drained for scale-in.
    fn operator_and_scale_in_drains() -> Report {
        let old = pool(&["vm-a", "vm-b"]);
        let old_driver = driver(&old);
        old.drain("vm-a");
        old.drain("vm-b");
        old_driver.inherit_scale_in_drains(&["vm-b".to_owned()]);
        Report::first(&old, &old_driver)
    }

    #[test]
    fn a_scale_in_drain_stays_the_autoscalers_in_the_successor() {
        let report = operator_and_scale_in_drains();
        assert_eq!(
            report.remembered.scale_in,
            BTreeSet::from(["vm-b".to_owned()])
        );

        let new = pool(&["vm-a", "vm-b"]);
        let new_driver = scaling_driver(&new);
        apply(&new, &new_driver, &report, &mut BTreeSet::new(), true);
        let snap = new.snapshot();
        assert!(snap.vms().iter().all(|vm| vm.status().draining));
        assert_eq!(
            new_driver.scale_in_drains(),
            vec!["vm-b".to_owned()],
            "the operator's drain of vm-a stays the operator's"
        );
    }

    /// A successor that does not scale (autoscaling turned off meanwhile) lets a scale-in
    /// drain go: nothing would finish it, and the VM would stay drained, running and unused.
    /// An operator's drain stays.
    #[test]
    fn a_successor_that_does_not_scale_lets_a_scale_in_drain_go() {
        let report = operator_and_scale_in_drains();
        let new = pool(&["vm-a", "vm-b"]);
        let new_driver = driver(&new);
        assert!(apply(&new, &new_driver, &report, &mut BTreeSet::new(), true).is_none());
        assert_eq!(draining(&new), ["vm-a"]);
        assert!(new_driver.scale_in_drains().is_empty());
    }

    /// The successor's provider has not listed its pool yet (its first listing failed): the
    /// predecessor's drains wait for it instead of being dropped as drains of unknown VMs.
    #[tokio::test(start_paused = true)]
    async fn drains_reported_before_the_pool_is_listed_wait_for_the_listing() {
        let report = operator_and_scale_in_drains();

        let new = pool(&[]);
        let new_driver = scaling_driver(&new);
        let deferred =
            apply(&new, &new_driver, &report, &mut BTreeSet::new(), true).expect("the drains wait");
        assert_eq!(deferred.drained.len(), 2);
        let waiting = tokio::spawn(crate::app::state::restore_drains_once_listed(
            new.clone(),
            new_driver.clone(),
            deferred,
        ));
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!waiting.is_finished(), "still waiting");
        new.set_vms(vec![
            VmSpec::new("vm-a", "127.0.0.1"),
            VmSpec::new("vm-b", "127.0.0.1"),
        ]);
        waiting.await.unwrap();
        assert!(new.snapshot().vms().iter().all(|vm| vm.status().draining));
        assert_eq!(new_driver.scale_in_drains(), vec!["vm-b".to_owned()]);

        // Listed already: applied at once, nothing deferred.
        let listed = pool(&["vm-a", "vm-b"]);
        assert!(
            apply(
                &listed,
                &scaling_driver(&listed),
                &report,
                &mut BTreeSet::new(),
                true
            )
            .is_none()
        );
        assert!(
            listed
                .snapshot()
                .vms()
                .iter()
                .all(|vm| vm.status().draining)
        );
    }

    #[test]
    fn a_report_of_an_older_gateway_without_scale_in_drains_is_read() {
        let line = br#"{"ssh":{},"drained":["vm-a"],"users":{},"affinity":{"bob":["vm-a",5]}}"#;
        let report: Report = serde_json::from_slice(line).unwrap();
        assert_eq!(report.remembered.drained.len(), 1);
        assert!(report.remembered.scale_in.is_empty());
        assert_eq!(report.remembered.affinity["bob"], ("vm-a".to_owned(), 5));
    }
}
