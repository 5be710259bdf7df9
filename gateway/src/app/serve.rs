//! Binding the listeners (or taking them over from the gateway this one replaces), running every
//! long task under one supervisor, the in-place upgrade (SIGUSR2, [`super::handover`]), and the
//! graceful shutdown: no new connections, open SSH sessions get `gateway.shutdown_grace`, a
//! second signal closes them at once.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::watch;
use tokio::task::{Id, JoinSet};

use super::build::{Built, Gateway};
use super::handover::{self, Inherited, Listeners, Successor};
use super::state::StateKeeper;
use crate::admin::AdminState;
use router_core::{Health, Lifecycle, Protocol};

/// The SSH frontend's task name (its listener stops first at shutdown).
const SSH_FRONTEND: &str = "SSH frontend";

/// How long the end of a graceful shutdown waits for the sessions it disconnected to close.
const DISCONNECT_FLUSH: Duration = Duration::from_secs(2);

/// Binds every listener and serves until a shutdown signal (`Ok`) or until a long-running task
/// ends on its own (an error naming it).
pub(super) async fn serve(
    built: Built,
    config_path: Option<PathBuf>,
    on_ready: Option<Box<dyn FnOnce() + Send>>,
    mut inherited: Inherited,
) -> anyhow::Result<()> {
    let Built {
        config,
        gateway,
        http,
        admin_token,
    } = built;
    // Signal handlers are set up before anything is bound, like every other part: a SIGTERM
    // that arrives as soon as the ports answer must start a graceful shutdown, not meet the
    // default action (killed by the signal, no exit status).
    let mut stop = StopSignals {
        terminate: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
        interrupt: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
    };
    let hangup = match config_path {
        Some(path) => Some((
            path,
            signal(SignalKind::hangup()).context("cannot handle SIGHUP")?,
        )),
        None => None,
    };
    // The in-place upgrade starts the same command line again, so only `poolgate run` has it.
    let mut upgrade_signal = match &hangup {
        Some(_) => Some(signal(SignalKind::user_defined2()).context("cannot handle SIGUSR2")?),
        None => None,
    };
    let version = env!("CARGO_PKG_VERSION");
    match inherited.predecessor() {
        Some(from) => tracing::info!(
            version,
            pid = std::process::id(),
            from,
            "poolgate starting: an upgrade in place, taking over from the running gateway"
        ),
        None => tracing::info!(version, pid = std::process::id(), "poolgate starting"),
    }
    inherited.log_problems();
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    // Know the pool before taking connections.
    if let Err(e) = gateway.driver.sync().await {
        tracing::warn!(error = %e, "initial provider listing failed; retrying in the background");
    }
    // Replicas must have been given the same secrets; then know the others' counts and drains.
    if let Some(cluster) = &gateway.cluster {
        cluster
            .check_peers(inherited.predecessor().is_some())
            .await?;
        cluster.sync_once().await;
        tracing::info!(replica = cluster.replica_id(), "joined the cluster");
    }
    // What a restart must not forget: drains and users' VMs (with [cluster] the store keeps
    // them; an upgrade's successor is told them by the old process instead of reading the file).
    let state = match (config.gateway.state_file.path(), &gateway.cluster) {
        (Some(path), None) => Some(StateKeeper::new(
            path.to_owned(),
            gateway.pool.clone(),
            gateway.driver.clone(),
            gateway.metrics.state_file_failing.clone(),
        )),
        _ => None,
    };
    if let Some(state) = &state
        && inherited.predecessor().is_none()
    {
        state.restore();
    }

    let ssh_listener = bind_unless_off(&mut inherited, "listen.ssh", config.listen.ssh).await?;
    let http_listener = bind_unless_off(&mut inherited, "listen.http", config.listen.http).await?;
    let https_listener =
        bind_unless_off(&mut inherited, "listen.https", config.listen.https).await?;
    let admin_listener = bind(&mut inherited, "listen.admin", config.listen.admin).await?;
    inherited.close_unused();
    // Copies to pass to a successor; dropped as soon as this gateway stops accepting.
    let mut passable = match upgrade_signal {
        Some(_) => Some(
            Listeners::new(
                [&ssh_listener, &http_listener, &https_listener]
                    .into_iter()
                    .flatten()
                    .chain([&admin_listener]),
            )
            .context("cannot keep the listeners for an in-place upgrade")?,
        ),
        None => None,
    };
    match &ssh_listener {
        Some(listener) => tracing::info!(addr = %listener.local_addr()?, "SSH listener ready"),
        None => tracing::info!(
            "no SSH listener (listen.ssh = \"off\"): serving browsers only, the VMs' SSH side is not probed"
        ),
    }
    tracing::info!(addr = %admin_listener.local_addr()?, token = admin_token.is_some(), "admin listener ready (/status, /metrics, /api/v1)");
    let admin_state = Arc::new(AdminState {
        pool: gateway.pool.clone(),
        health: gateway.health.clone(),
        metrics: gateway.metrics.clone(),
        token: admin_token,
        autoscale: Some(gateway.driver.clone()),
        cluster: gateway.cluster_status.clone(),
    });

    let mut tasks = Supervisor::default();
    tasks.spawn(
        "admin listener",
        crate::admin::server::serve(admin_state, admin_listener, shutdown_rx.clone()),
    );
    tasks.spawn(
        "health checker",
        gateway.health.clone().run(shutdown_rx.clone()),
    );
    tasks.spawn(
        "autoscaler",
        gateway.driver.clone().run(shutdown_rx.clone()),
    );
    if let Some(cluster) = &gateway.cluster {
        tasks.spawn("cluster sync", cluster.clone().run(shutdown_rx.clone()));
    }
    // Connections wait in the listeners' queues (or, in an upgrade, go to the old process) until
    // the running VMs' first probes have answered: served before, a browser would be told "the
    // pool is starting" and a login "no VM is available" by a gateway that simply has not looked.
    first_verdicts(&gateway).await;
    match http {
        Some(service) => tasks.spawn(
            "HTTP frontend",
            crate::http::serve(service, http_listener, https_listener, shutdown_rx.clone()),
        ),
        None => {
            tracing::info!("no HTTP or HTTPS listener (listen.http = \"off\"): serving SSH only");
        }
    }
    if let Some(listener) = ssh_listener {
        tasks.spawn(
            SSH_FRONTEND,
            gateway.ssh.clone().serve(listener, shutdown_rx.clone()),
        );
    }
    if let Some((path, hangup)) = hangup {
        tasks.spawn(
            "configuration reloader",
            reload_on_hangup(path, hangup, config.clone(), gateway.clone(), shutdown_rx),
        );
    }
    if let Some(on_ready) = on_ready {
        on_ready();
    }
    let predecessor = inherited.take_link();
    handover::notify_ready(predecessor.is_some());
    match (predecessor, &state) {
        (Some((pid, link)), state) => {
            // With [cluster] the previous process's sessions come through the store, as another
            // replica's.
            let count_sessions = gateway.cluster.is_none();
            let (applied, predecessor_applied) = tokio::sync::oneshot::channel();
            tokio::spawn(handover::follow_predecessor(
                gateway.pool.clone(),
                gateway.driver.clone(),
                pid,
                link,
                count_sessions,
                applied,
            ));
            if let Some(state) = state.clone() {
                // The state file is written once the old process's drains and affinity are
                // applied here; if it never reported them, the file it kept until the
                // handover has them.
                tokio::spawn(async move {
                    match predecessor_applied.await {
                        Ok(deferred) => state.adopted(deferred),
                        Err(_) => {
                            // Reading up to 32 MiB: off the async workers.
                            let reading = state.clone();
                            let _ = tokio::task::spawn_blocking(move || reading.restore()).await;
                        }
                    }
                    state.keep().await;
                });
            }
        }
        (None, Some(state)) => {
            tokio::spawn(state.clone().keep());
        }
        (None, None) => {}
    }

    let mut starting: Option<Successor> = None;
    let mut handed_over = None;
    let failed = loop {
        tokio::select! {
            () = stop.next() => break None,
            ended = tasks.next_ended() => break ended,
            Some(()) = next_signal(&mut upgrade_signal) => {
                starting = start_upgrade(passable.as_ref(), starting);
            }
            ready = successor_ready(&mut starting) => {
                let Some(successor) = starting.take() else { continue };
                match ready {
                    Ok(()) => {
                        handed_over = Some(successor);
                        break None;
                    }
                    Err(e) => tracing::error!(
                        "upgrade failed: {e:#}; this gateway keeps serving (send SIGUSR2 again \
                         once the cause is fixed)"
                    ),
                }
            }
        }
    };
    // Stop accepting: the kernel keeps queueing connections while any copy of a listener is open
    // (after a handover the successor has its own).
    drop(passable.take());
    if let Some(mut successor) = starting.take() {
        tracing::info!(
            pid = successor.pid(),
            "stopping the new process of the upgrade under way"
        );
        successor.stop();
    }
    if let Some(ended) = &failed {
        tracing::error!(
            task = ended.task,
            "{} stopped unexpectedly: {}; stopping poolgate (open SSH sessions get \
             gateway.shutdown_grace as on SIGTERM, then it exits with status 1)",
            ended.task,
            ended.why()
        );
    }
    let grace = config.gateway.shutdown_grace;
    // Logins held while the pool wakes cannot be placed here any more (the autoscaler and the
    // provider's listing stop with this process's tasks): tell them now rather than at the end
    // of `autoscale.hold_connect_for`. They have no session to lose.
    gateway.waker.release(if handed_over.is_some() {
        "the gateway was upgraded while you waited for a VM; connect again now: the new one goes on starting it."
    } else {
        "the gateway is shutting down; connect again in a moment (the pool may still be waking)."
    });
    match &handed_over {
        Some(successor) => {
            if let Some(cluster) = &gateway.cluster {
                cluster.hand_over();
            }
            tracing::info!(
                pid = successor.pid(),
                open_ssh = gateway.ssh.live_connections(),
                grace = %humantime::format_duration(grace),
                "upgrade: the new process serves; this one takes no new connections and exits once its open sessions end or the grace time passes (SIGTERM to stop them now)"
            );
            if let Some(state) = state.clone() {
                // It waits for a write under way (an fsync): off the async workers.
                let _ = tokio::task::spawn_blocking(move || state.hand_over()).await;
            }
        }
        None => {
            handover::notify_stopping();
            tracing::info!(
                open_ssh = gateway.ssh.live_connections(),
                grace = %humantime::format_duration(grace),
                "shutting down: no new connections; open sessions may run until they end or the grace time passes (signal again to stop now)"
            );
        }
    }
    let _ = shutdown_tx.send(true);
    if let Some(successor) = handed_over {
        // After the frontends were told to stop (they take no more connections), before this
        // process can exit (at once when no session is left).
        successor
            .report(
                gateway.pool.clone(),
                gateway.driver.clone(),
                state.as_ref().and_then(|s| s.pending_drains()),
            )
            .await;
    }
    let mut ended_in_shutdown = tasks.wait_for(SSH_FRONTEND).await;
    close_ssh_sessions(&gateway, grace, &mut stop).await;
    ended_in_shutdown.extend(tasks.wait_all().await);
    if let Some(state) = state {
        // Open sessions have ended: their users were last seen now.
        let _ = tokio::task::spawn_blocking(move || state.finish()).await;
    }
    for ended in ended_in_shutdown {
        if let Err(e) = &ended.outcome {
            tracing::error!(task = ended.task, "{}: {e:#}", ended.task);
        }
    }
    match failed {
        None => Ok(()),
        Some(ended) => Err(anyhow::anyhow!(
            "the {} stopped unexpectedly ({}), so poolgate stopped; fix the cause named above \
             and start it again",
            ended.task,
            ended.why()
        )),
    }
}

/// Waits until every running VM has a health verdict for each side the gateway probes, or a
/// probe's timeout (and a second) has passed: the first probes go out at once.
async fn first_verdicts(gateway: &Gateway) {
    let sides: Vec<Protocol> = Protocol::ALL
        .into_iter()
        .filter(|&p| gateway.health.probes(p))
        .collect();
    let deadline =
        tokio::time::Instant::now() + gateway.health.settings().timeout + Duration::from_secs(1);
    let started = tokio::time::Instant::now();
    loop {
        let snapshot = gateway.pool.snapshot();
        let unknown = snapshot
            .vms()
            .iter()
            .filter(|vm| {
                let status = vm.status();
                status.lifecycle == Lifecycle::Running
                    && !status.leaving
                    && sides
                        .iter()
                        .any(|&p| status.health_of(p) == Health::Unknown)
            })
            .count();
        if unknown == 0 {
            tracing::debug!(waited = ?started.elapsed(), "every running VM probed");
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::info!(
                unknown,
                "serving before every VM answered its first probe; those take sessions once they do"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The listener for `addr`: the one the previous gateway passed, or a new one.
async fn bind(
    inherited: &mut Inherited,
    key: &str,
    addr: std::net::SocketAddr,
) -> anyhow::Result<TcpListener> {
    if let Some(listener) = inherited
        .take(addr)
        .with_context(|| format!("{key}: the listener on {addr} passed by the previous gateway"))?
    {
        tracing::info!(%addr, "{key}: listening on the socket of the previous gateway");
        return Ok(listener);
    }
    TcpListener::bind(addr).await.map_err(|error| {
        BindError {
            key: key.to_owned(),
            addr,
            error,
        }
        .into()
    })
}

/// A listener that could not be bound: its setting, its address and the system's error, shown
/// with what to do about the usual causes. The demo reads the parts to name its own flags.
#[derive(Debug, thiserror::Error)]
#[error("{key}: cannot listen on {addr}: {error}{}", self.hint())]
pub struct BindError {
    /// The setting (`listen.http`).
    pub key: String,
    /// The address it names.
    pub addr: std::net::SocketAddr,
    /// Why the system refused.
    pub error: std::io::Error,
}

impl BindError {
    fn hint(&self) -> String {
        let key = &self.key;
        match self.error.kind() {
            std::io::ErrorKind::AddrInUse => format!(
                " (another program, or another poolgate, listens there: stop it or set {key} to a \
                 free port)"
            ),
            std::io::ErrorKind::PermissionDenied if self.addr.port() < 1024 => format!(
                " (ports below 1024 need root or CAP_NET_BIND_SERVICE, which the shipped systemd \
                 unit grants; or set {key} to a port from 1024 up)"
            ),
            std::io::ErrorKind::AddrNotAvailable => format!(
                " (no interface of this machine has that address: set {key} to one it has, or \
                 0.0.0.0)"
            ),
            _ => String::new(),
        }
    }
}

/// [`bind`] for a listener that may be off (`None`).
async fn bind_unless_off(
    inherited: &mut Inherited,
    key: &str,
    addr: Option<std::net::SocketAddr>,
) -> anyhow::Result<Option<TcpListener>> {
    match addr {
        Some(addr) => bind(inherited, key, addr).await.map(Some),
        None => Ok(None),
    }
}

/// The next SIGUSR2, if this gateway handles it (never otherwise).
async fn next_signal(signal: &mut Option<Signal>) -> Option<()> {
    match signal {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}

/// Whether the upgrade under way has a successor serving (never ends while none is starting).
async fn successor_ready(starting: &mut Option<Successor>) -> anyhow::Result<()> {
    match starting {
        Some(successor) => successor.ready().await,
        None => std::future::pending().await,
    }
}

/// SIGUSR2: starts the program again to take over (unless an upgrade is already under way);
/// what is starting afterwards.
fn start_upgrade(listeners: Option<&Listeners>, starting: Option<Successor>) -> Option<Successor> {
    if let Some(successor) = starting {
        tracing::warn!(
            pid = successor.pid(),
            "SIGUSR2: an upgrade is already under way; waiting for its new process"
        );
        return Some(successor);
    }
    let listeners = listeners?;
    match Successor::spawn(listeners) {
        Ok(successor) => {
            tracing::info!(
                pid = successor.pid(),
                "SIGUSR2: upgrade: started the program again with this gateway's listeners; it takes over once it serves"
            );
            Some(successor)
        }
        Err(e) => {
            tracing::error!("upgrade failed: {e:#}; this gateway keeps serving");
            None
        }
    }
}

/// Lets open SSH sessions run for up to `grace` (a second signal cuts it short), then
/// disconnects the rest with a message and gives the messages a moment to leave.
async fn close_ssh_sessions(gateway: &Gateway, grace: Duration, stop: &mut StopSignals) {
    let deadline = tokio::time::Instant::now() + grace;
    let forced = stop.next();
    tokio::pin!(forced);
    while gateway.ssh.live_connections() > 0 && tokio::time::Instant::now() < deadline {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = &mut forced => {
                tracing::info!("second signal: closing open sessions now");
                break;
            }
        }
    }
    let left = gateway.ssh.live_connections();
    if left > 0 {
        tracing::info!(open_ssh = left, "closing the remaining sessions");
        gateway
            .ssh
            .disconnect_all("poolgate is shutting down; please reconnect in a moment")
            .await;
        // The disconnect messages are only queued: let the sessions send them and close before
        // the runtime (and every session task with it) goes away.
        let flushed = tokio::time::Instant::now() + DISCONNECT_FLUSH;
        while gateway.ssh.live_connections() > 0 && tokio::time::Instant::now() < flushed {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Re-reads the configuration on every SIGHUP until shutdown.
async fn reload_on_hangup(
    path: PathBuf,
    mut hangup: Signal,
    mut running: poolgate_config::Config,
    gateway: Gateway,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            Some(()) = hangup.recv() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        tracing::info!(path = %path.display(), "SIGHUP: reloading the configuration");
        match super::reload(&path, &running, &gateway).await {
            Ok(applied) => running = applied,
            Err(e) => tracing::error!("reload failed: {e:#}"),
        }
    }
}

/// A long-running task of `poolgate run` that ended: which, and how.
#[derive(Debug)]
struct Ended {
    task: &'static str,
    outcome: anyhow::Result<()>,
}

impl Ended {
    fn why(&self) -> String {
        match &self.outcome {
            Ok(()) => "it returned before the shutdown".to_owned(),
            Err(e) => format!("{e:#}"),
        }
    }
}

/// What a long-running task returns: `()` or a `Result`.
trait TaskOutcome: Send + 'static {
    fn into_result(self) -> anyhow::Result<()>;
}

impl TaskOutcome for () {
    fn into_result(self) -> anyhow::Result<()> {
        Ok(())
    }
}

impl TaskOutcome for anyhow::Result<()> {
    fn into_result(self) -> anyhow::Result<()> {
        self
    }
}

/// Owns every long-running task and says which ended and how, however it ended (returned,
/// failed, panicked).
#[derive(Default)]
struct Supervisor {
    tasks: JoinSet<anyhow::Result<()>>,
    names: HashMap<Id, &'static str>,
}

impl Supervisor {
    fn spawn<F>(&mut self, name: &'static str, task: F)
    where
        F: Future + Send + 'static,
        F::Output: TaskOutcome,
    {
        let handle = self.tasks.spawn(async move { task.await.into_result() });
        self.names.insert(handle.id(), name);
    }

    /// The next task to end; `None` once there are none left (never while any runs).
    async fn next_ended(&mut self) -> Option<Ended> {
        let (id, outcome) = match self.tasks.join_next_with_id().await? {
            Ok((id, outcome)) => (id, outcome),
            Err(e) => {
                let id = e.id();
                let outcome = if e.is_panic() {
                    let payload = e.into_panic();
                    let message = payload
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic".to_owned());
                    Err(anyhow::anyhow!("panicked: {message}"))
                } else {
                    Err(anyhow::anyhow!("{e}"))
                };
                (id, outcome)
            }
        };
        let task = self.names.remove(&id).unwrap_or("task");
        Some(Ended { task, outcome })
    }

    /// Waits until the task named `name` has ended (or none is left); returns every task that
    /// ended meanwhile, that one included.
    async fn wait_for(&mut self, name: &str) -> Vec<Ended> {
        let mut ended = Vec::new();
        while self.names.values().any(|n| *n == name) {
            match self.next_ended().await {
                Some(e) => ended.push(e),
                None => break,
            }
        }
        ended
    }

    /// Waits for every task left.
    async fn wait_all(mut self) -> Vec<Ended> {
        let mut ended = Vec::new();
        while let Some(e) = self.next_ended().await {
            ended.push(e);
        }
        ended
    }
}

/// SIGTERM and SIGINT (Ctrl-C), their handlers set up at start.
struct StopSignals {
    terminate: Signal,
    interrupt: Signal,
}

impl StopSignals {
    /// The next of either.
    async fn next(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_way_a_task_ends_is_reported_with_its_name() {
        let mut tasks = Supervisor::default();
        tasks.spawn("HTTP frontend", async {
            Err::<(), _>(anyhow::anyhow!("accept: too many open files"))
        });
        let ended = tasks.next_ended().await.unwrap();
        assert_eq!(ended.task, "HTTP frontend");
        assert_eq!(ended.why(), "accept: too many open files");

        tasks.spawn("SSH frontend", async {
            if true {
                panic!("listener state broke");
            }
        });
        let ended = tasks.next_ended().await.unwrap();
        assert_eq!(ended.task, "SSH frontend");
        assert_eq!(ended.why(), "panicked: listener state broke");

        tasks.spawn("health checker", async {});
        let ended = tasks.next_ended().await.unwrap();
        assert_eq!(
            (ended.task, ended.why().as_str()),
            ("health checker", "it returned before the shutdown")
        );
        assert!(ended.outcome.is_ok());
        assert!(tasks.next_ended().await.is_none(), "no task left");
    }

    #[tokio::test]
    async fn waiting_for_one_task_collects_those_that_end_before_it() {
        let mut tasks = Supervisor::default();
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        tasks.spawn("admin listener", async {});
        tasks.spawn(SSH_FRONTEND, async move {
            let _ = released.await;
        });
        tasks.spawn("autoscaler", std::future::pending::<()>());
        let first = tasks.next_ended().await.unwrap();
        assert_eq!(first.task, "admin listener");
        release.send(()).unwrap();
        let ended = tasks.wait_for(SSH_FRONTEND).await;
        assert_eq!(
            ended.iter().map(|e| e.task).collect::<Vec<_>>(),
            [SSH_FRONTEND]
        );
        // The pending task is still owned (and aborted when the supervisor is dropped).
        assert_eq!(tasks.names.len(), 1);
    }
}
