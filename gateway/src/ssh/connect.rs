//! Connecting a user's session to a VM — picking the VM (each eligible one at most once) and
//! logging in to it — and the per-connection state that channel tasks wait on, including while
//! the pool wakes up. Also the [`Link`] relays use to reach the user, which writes the session's
//! audit line when it goes.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use router_core::{NoVm, PickRequest, Protocol, SessionGuard};
use russh::server;
use russh::{ChannelId, ChannelOpenFailure, Sig};
use tokio::sync::{broadcast, watch};
use tracing::field::display;
use tracing::{Instrument, Span};

use super::SshGateway;
use super::backend::{self, BackendError, BackendHandler, Credential, Target, VmChannel};
use super::keys::CertRequest;
use super::relay::{self, FlowControl, UserSide};
use crate::health::SshDownEvents;
use crate::metrics::outcome;

pub(crate) enum OpenError {
    /// No VM could take the session (none serving, all full, or all tried failed).
    NoVm(String),
    /// A password the VM refused.
    PasswordRefused,
    /// No VM, and waiting for the pool to change would not help, so the connection is not held
    /// (the message says why, for the user): every VM tried refused the gateway's certificate
    /// login for this user and none failed otherwise (the VMs have no such account, or do not
    /// trust the user CA; the pool's VMs are alike), or the VM the user named cannot take the
    /// session.
    Final(String),
}

/// An authenticated VM connection with the session's load guard.
pub(crate) struct Connected {
    backend: Arc<russh::client::Handle<BackendHandler>>,
    incoming: tokio::sync::mpsc::UnboundedReceiver<Box<VmChannel>>,
    closed: tokio::sync::oneshot::Receiver<()>,
    guard: Arc<SessionGuard>,
}

/// The VM side of a user connection.
#[derive(Clone)]
pub(crate) enum Conn {
    /// Not authenticated yet.
    None,
    /// Waiting for the pool to wake up.
    Waking,
    /// Connected.
    Ready(Arc<Ready>),
    /// No VM could be had (message for the user).
    Failed(Arc<str>),
}

/// What channels need once connected.
pub(crate) struct Ready {
    pub(crate) backend: Arc<russh::client::Handle<BackendHandler>>,
    pub(crate) link: Arc<Link>,
}

/// Who is connecting, for [`connect_vm`].
pub(crate) struct Who<'a> {
    pub(crate) gw: &'a SshGateway,
    pub(crate) user: &'a str,
    /// The VM the user named in the login (`alice+vm-3`): that one or none.
    pub(crate) vm: Option<&'a str>,
    pub(crate) peer: SocketAddr,
    pub(crate) port_forwarding: bool,
    pub(crate) agent_forwarding: bool,
    /// A terminal may be allocated (the key has no `no-pty` / `restrict`).
    pub(crate) pty: bool,
    pub(crate) accepted: Instant,
    /// The connection's span (see `connection_span`).
    pub(crate) span: &'a Span,
    /// Held while the pool wakes, since then: it spreads over the VMs started for the held
    /// connections (`Waker::spread_below`).
    pub(crate) held_since: Option<Instant>,
}

impl Who<'_> {
    /// Names the logged-in user on the connection's span. A key login is one before any VM is
    /// picked; a password login is one only once a VM has accepted the password.
    pub(crate) fn logged_in(&self) {
        self.span.record("user", display(self.user));
    }

    /// Names the VM and the session on the connection's span once the session is routed.
    fn routed(&self, vm: &str, session: u64) {
        self.span.record("vm", display(vm));
        self.span.record("session", session);
    }
}

/// Picks a VM and connects to it, trying each eligible VM at most once.
pub(crate) async fn connect_vm(
    who: &Who<'_>,
    password: Option<&str>,
) -> Result<Connected, OpenError> {
    let gw = who.gw;
    let user = who.user;
    let mut tried: Vec<String> = Vec::new();
    let mut last: Option<BackendError> = None;
    // Whether every VM tried so far refused this user's login or showed a host key the gateway
    // does not trust (and none failed otherwise): waiting for the pool changes neither.
    let mut only_refused = true;
    let started = Instant::now();
    // Sessions of this user through other gateway replicas (one bounded store lookup).
    let shared = match &gw.affinity {
        Some(shared) => shared.affinity(user).await,
        None => None,
    };
    loop {
        let mut request = PickRequest::new(Protocol::Ssh).user(user).excluding(&tried);
        if let Some(vm) = who.vm {
            request = request.only(vm);
        } else if let Some(vm) = shared.as_deref() {
            request = request.affinity_hint(vm);
        }
        if let Some(below) = spread_below(who) {
            request = request.room_below(below);
        }
        let guard = match gw.pool.acquire(&request) {
            Ok(guard) => guard,
            Err(no_vm) => {
                // A held connection's attempts are one session's, counted when it was first
                // refused (before it was held).
                if who.held_since.is_none() {
                    gw.metrics.session_started(
                        Protocol::Ssh,
                        "none",
                        outcome::NO_VM,
                        started.elapsed(),
                    );
                }
                return Err(no_vm_error(who, &no_vm, last.as_ref(), only_refused));
            }
        };
        let spec = guard.spec().clone();
        let client = who.peer.to_string();
        let credential = match password {
            Some(p) => Credential::Password(p),
            None => Credential::Certificate {
                ca: &gw.ca,
                request: CertRequest {
                    user,
                    session: guard.id(),
                    client: &client,
                    port_forwarding: who.port_forwarding,
                    agent_forwarding: who.agent_forwarding,
                    pty: who.pty,
                },
            },
        };
        let target = Target {
            vm: &spec.name,
            host: &spec.host,
            port: spec.ssh_port,
            user,
        };
        match backend::connect(
            &target,
            credential,
            gw.host_policy(),
            gw.client_config.clone(),
            gw.settings.connect_timeout,
        )
        .await
        {
            Ok(backend) => {
                gw.metrics.session_started(
                    Protocol::Ssh,
                    &spec.name,
                    outcome::OK,
                    who.accepted.elapsed(),
                );
                if password.is_some() {
                    who.logged_in();
                }
                who.routed(&spec.name, guard.id());
                let connect_ms = started.elapsed().as_millis() as u64;
                if who.vm.is_some() {
                    tracing::info!(connect_ms, "session routed to the VM named by the user");
                } else {
                    tracing::info!(connect_ms, "session routed");
                }
                return Ok(Connected {
                    backend: Arc::new(backend.handle),
                    incoming: backend.incoming,
                    closed: backend.closed,
                    guard: Arc::new(guard),
                });
            }
            Err(BackendError::AuthRefused { .. }) if password.is_some() => {
                return Err(OpenError::PasswordRefused);
            }
            Err(e) => {
                gw.metrics.session_started(
                    Protocol::Ssh,
                    &spec.name,
                    outcome::VM_FAILED,
                    started.elapsed(),
                );
                // The VM tried, not the session's; and a password attempt is no login yet, so
                // the span names no user then: this line does.
                let attempt_by = password.is_some().then(|| display(user));
                tracing::warn!(user = attempt_by, vm = %spec.name, error = %e, "VM connection failed; trying the next VM");
                if e.is_outage() {
                    (gw.on_vm_failure)(&spec.name);
                }
                only_refused &= matches!(
                    e,
                    BackendError::AuthRefused { .. } | BackendError::HostKey { .. }
                );
                tried.push(spec.name.clone());
                last = Some(e);
            }
        }
    }
}

/// For a connection held while the pool wakes: the sessions a VM may have for it to go there,
/// while some other VM is still on its way (see `Waker::spread_below`).
fn spread_below(who: &Who<'_>) -> Option<u32> {
    who.gw.wake.as_ref()?.spread_below(who.held_since?)
}

/// What the user is told when no VM took the session, and whether the connection may wait for
/// the pool to change ([`OpenError::NoVm`]) or not ([`OpenError::Final`]).
fn no_vm_error(
    who: &Who<'_>,
    no_vm: &NoVm,
    last: Option<&BackendError>,
    only_refused: bool,
) -> OpenError {
    let user = who.user;
    let refused = match last {
        Some(e @ BackendError::AuthRefused { .. }) => Some(format!(
            "{e}: the VMs have no account {user} (or it is locked there), or do not trust the \
             gateway's user CA (ask the pool's administrators)"
        )),
        // A VM that is full or still starting may yet take the session with a key the gateway
        // trusts; otherwise the pool's VMs are not in ssh.backend_known_hosts (or not signed by
        // its host CA), which no wait mends: one clear answer, not a held connection that
        // retries a refused handshake every second until the wake gives up.
        Some(e @ BackendError::HostKey { .. }) if no_vm.full == 0 && no_vm.starting == 0 => {
            Some(format!(
                "{e}: the gateway does not trust the key this VM showed, so it did not log in there \
                 (ask the pool's administrators)"
            ))
        }
        _ => None,
    };
    if let Some(named) = who.vm {
        let message = match (refused, last) {
            (Some(refused), _) => refused,
            (None, Some(e)) => e.to_string(),
            (None, None) => {
                let why = who
                    .gw
                    .pool
                    .snapshot()
                    .why_not(named, Protocol::Ssh)
                    .unwrap_or_else(|| no_vm.to_string());
                format!("{why}; log in as {user} (without +{named}) to land on any VM")
            }
        };
        tracing::warn!(reason = %message, "the VM the user named cannot take the session");
        return OpenError::Final(message);
    }
    if let Some(message) = refused.filter(|_| only_refused) {
        tracing::warn!(reason = %message, "every VM tried refused the login or was not trusted; not holding the connection");
        return OpenError::Final(message);
    }
    OpenError::NoVm(match last {
        Some(e) => format!("{no_vm} (last attempt: {e})"),
        None => no_vm.to_string(),
    })
}

/// Turns a VM connection into the state channels use, and starts accepting the VM's own
/// channel opens (`-R`, `-A`).
pub(crate) fn make_ready(
    who: &Who<'_>,
    connected: Connected,
    handle: server::Handle,
    flow: Arc<FlowControl>,
) -> Arc<Ready> {
    let gw = who.gw;
    let guard = connected.guard;
    let link = Arc::new(Link {
        handle: handle.clone(),
        guard: guard.clone(),
        user: who.user.to_string(),
        client: who.peer,
        started: Instant::now(),
        exit: Mutex::new(None),
        bytes_up: gw
            .metrics
            .bytes_total
            .with_label_values(&["ssh", guard.vm_name(), "up"]),
        bytes_down: gw
            .metrics
            .bytes_total
            .with_label_values(&["ssh", guard.vm_name(), "down"]),
        pool_verbs: gw.settings.pool_verbs.clone(),
    });
    let check = gw.vm_down.as_ref().map(|down| DownCheck {
        down: down.resubscribe(),
        backend: Arc::downgrade(&connected.backend),
    });
    tokio::spawn(
        tell_user_when_vm_lost(
            connected.closed,
            check,
            handle.clone(),
            guard.vm_name().to_string(),
        )
        .instrument(who.span.clone()),
    );
    tokio::spawn(
        accept_vm_channels(
            connected.incoming,
            handle,
            link.clone(),
            flow,
            who.agent_forwarding,
            who.port_forwarding,
        )
        .instrument(who.span.clone()),
    );
    Arc::new(Ready {
        backend: connected.backend,
        link,
    })
}

/// What a user sees when the VM under their session goes away (channel stderr and disconnect).
pub(crate) fn vm_lost_message(vm: &str) -> String {
    super::front::ascii(&format!(
        "poolgate: lost the connection to VM {vm} (it went down or closed the connection); \
         your session there has ended. Reconnect to land on a working VM."
    ))
}

/// What a user sees when the VM under their session stopped answering after the health checks
/// marked it down.
fn vm_unanswering_message(vm: &str) -> String {
    super::front::ascii(&format!(
        "poolgate: VM {vm} stopped answering (the health checks found it down); your session \
         there has ended. Reconnect to land on a working VM."
    ))
}

/// How long a VM whose SSH side the health checks marked down has to answer a connection's
/// ping before that connection is taken for lost. sshd answers a keepalive request at once,
/// from the session's own process; the time is for a VM that is paused, not lost: Azure's
/// memory-preserving host maintenance freezes a VM for seconds (up to about 30), long enough
/// for the probes to mark it down, and its sessions must outlast that, as they outlast it
/// under the keepalives alone.
const VM_PING_DEADLINE: Duration = Duration::from_secs(30);

/// What lets a VM connection be checked when the health checks mark its VM down.
pub(crate) struct DownCheck {
    /// Names of VMs whose SSH side went down.
    down: SshDownEvents,
    /// The VM connection (not kept alive by this).
    backend: Weak<russh::client::Handle<BackendHandler>>,
}

/// How a VM connection was lost.
enum Lost {
    /// It ended: the VM closed it, or its keepalives went unanswered.
    Ended,
    /// The health checks marked the VM down and it did not answer a ping in time.
    Unanswered,
}

/// Waits until the VM connection ends, or until the health checks mark its VM down and it does
/// not answer a ping within [`VM_PING_DEADLINE`]. A VM lost without a word (its host down, the
/// network cut) closes nothing, and the connection's own keepalives take up to 150 s to give
/// up (every 30 s without traffic, 4 unanswered); the probes mark such a VM down within about
/// 15 s at their defaults. A VM that answers keeps its connections: a probe can fail while
/// open connections are fine (sshd's listener restarting, `MaxStartups` full).
async fn vm_lost(
    closed: &mut tokio::sync::oneshot::Receiver<()>,
    check: Option<DownCheck>,
    vm: &str,
) -> Lost {
    if let Some(DownCheck { mut down, backend }) = check {
        loop {
            let event = tokio::select! {
                _ = &mut *closed => return Lost::Ended,
                event = down.recv() => event,
            };
            match event {
                Ok(name) if *name == *vm => {}
                // Names fell out of the queue unread: one of them may have been this VM's.
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Ok(_) => continue,
                // The health checks stopped (the gateway is stopping): the keepalives go on.
                Err(broadcast::error::RecvError::Closed) => break,
            }
            let Some(backend) = backend.upgrade() else {
                break;
            };
            // A ping also completes when the connection ends; `closed` tells that apart next.
            // Boxed: rare, and inline its state (a timer among it) would size the wait for it.
            let ping = Box::pin(tokio::time::timeout(VM_PING_DEADLINE, backend.send_ping()));
            let answered = tokio::select! {
                _ = &mut *closed => return Lost::Ended,
                pinged = ping => pinged.is_ok(),
            };
            if answered {
                tracing::debug!(
                    "the health checks marked the VM down, but it answered this connection: the session goes on"
                );
                continue;
            }
            // Ended from here, however the VM's socket fares: a write to a host that is gone
            // can wait for TCP to give up (minutes), so the VM connection is told to close
            // without waiting for it, and the user is disconnected now.
            tokio::spawn(async move {
                let bye = backend.disconnect(russh::Disconnect::ConnectionLost, "", "en");
                let _ = tokio::time::timeout(Duration::from_secs(1), bye).await;
            });
            return Lost::Unanswered;
        }
    }
    let _ = closed.await;
    Lost::Ended
}

/// When the VM connection ends while the user is still connected (the VM died, rebooted or
/// dropped the connection), or the VM stops answering once the health checks mark it down,
/// disconnects the user with a message saying so, instead of leaving a connection without a VM
/// behind it. A user who left first makes the disconnect fail: quiet.
async fn tell_user_when_vm_lost(
    mut closed: tokio::sync::oneshot::Receiver<()>,
    check: Option<DownCheck>,
    user_handle: server::Handle,
    vm: String,
) {
    let lost = vm_lost(&mut closed, check, &vm).await;
    let message = match lost {
        Lost::Ended => vm_lost_message(&vm),
        Lost::Unanswered => vm_unanswering_message(&vm),
    };
    // Boxed: this task waits for the whole session, and the disconnect's state (a russh
    // message on its way to the session's queue) would otherwise be room it holds all along.
    let sent =
        Box::pin(user_handle.disconnect(russh::Disconnect::ConnectionLost, message, "en".into()))
            .await;
    if sent.is_ok() {
        match lost {
            Lost::Ended => tracing::warn!(
                "lost the connection to the VM; the user was disconnected with a message"
            ),
            Lost::Unanswered => tracing::warn!(
                deadline_s = VM_PING_DEADLINE.as_secs(),
                "the health checks marked the VM down and it did not answer this connection in time; the user was disconnected with a message"
            ),
        }
    }
}

/// Waits until the connection is ready (or failed). Tells the user on `notice` while waiting.
pub(crate) async fn ready_or_failed(
    mut conn: watch::Receiver<Conn>,
) -> Result<Arc<Ready>, Arc<str>> {
    loop {
        match &*conn.borrow_and_update() {
            Conn::Ready(ready) => return Ok(ready.clone()),
            Conn::Failed(message) => return Err(message.clone()),
            Conn::None | Conn::Waking => {}
        }
        if conn.changed().await.is_err() {
            return Err("the connection closed".into());
        }
    }
}

/// Accepts channels the VM opens towards the user: `-R` forwards and agent requests.
async fn accept_vm_channels(
    mut incoming: tokio::sync::mpsc::UnboundedReceiver<Box<VmChannel>>,
    handle: server::Handle,
    link: Arc<Link>,
    flow: Arc<FlowControl>,
    agent_allowed: bool,
    forwarding_allowed: bool,
) {
    while let Some(request) = incoming.recv().await {
        let (handle, link, flow) = (handle.clone(), link.clone(), flow.clone());
        let channel = async move {
            match *request {
                VmChannel::Forwarded {
                    channel,
                    connected_address,
                    connected_port,
                    originator_address,
                    originator_port,
                    reply,
                } if forwarding_allowed => {
                    match handle
                        .channel_open_forwarded_tcpip(
                            connected_address,
                            connected_port,
                            originator_address,
                            originator_port,
                        )
                        .await
                    {
                        Ok(user) => {
                            reply.accept().await;
                            relay::relay(user, channel, flow, link, false, false).await;
                        }
                        Err(_) => reply.reject(ChannelOpenFailure::ConnectFailed).await,
                    }
                }
                VmChannel::Agent { channel, reply } if agent_allowed => {
                    match handle.channel_open_agent().await {
                        Ok(user) => {
                            reply.accept().await;
                            relay::relay(user, channel, flow, link, false, false).await;
                        }
                        Err(_) => reply.reject(ChannelOpenFailure::ConnectFailed).await,
                    }
                }
                VmChannel::Forwarded { reply, .. } | VmChannel::Agent { reply, .. } => {
                    reply
                        .reject(ChannelOpenFailure::AdministrativelyProhibited)
                        .await;
                }
            }
        };
        tokio::spawn(channel.in_current_span());
    }
}

/// What relays need of the user connection, and the session's audit record.
pub struct Link {
    handle: server::Handle,
    guard: Arc<SessionGuard>,
    user: String,
    client: SocketAddr,
    started: Instant,
    exit: Mutex<Option<String>>,
    bytes_up: prometheus::IntCounter,
    bytes_down: prometheus::IntCounter,
    /// The batch partition when `pool` verbs are on.
    pool_verbs: Option<String>,
}

impl Link {
    /// Opens a session channel on the VM, with the VM's name in the session's environment
    /// ([`VM_ENV`](super::relay::VM_ENV)), so that a user can come back with `user+VM`. The VM's sshd takes it when
    /// it accepts the variable (`AcceptEnv POOLGATE_VM`, which deploy/cloud-init sets); one that
    /// does not drops it silently (no reply is asked for).
    pub(crate) async fn open_session(
        &self,
        backend: &russh::client::Handle<BackendHandler>,
    ) -> Result<russh::Channel<russh::client::Msg>, russh::Error> {
        let channel = backend.channel_open_session().await?;
        channel
            .set_env(false, super::relay::VM_ENV, self.guard.vm_name())
            .await?;
        Ok(channel)
    }
}

impl UserSide for Link {
    async fn reply(&self, channel: ChannelId, success: bool) {
        let _ = if success {
            self.handle.channel_success(channel).await
        } else {
            self.handle.channel_failure(channel).await
        };
    }

    async fn exit_status(&self, channel: ChannelId, status: u32) {
        let _ = self.handle.exit_status_request(channel, status).await;
    }

    async fn exit_signal(
        &self,
        channel: ChannelId,
        signal: Sig,
        core_dumped: bool,
        message: String,
    ) {
        let _ = self
            .handle
            .exit_signal_request(channel, signal, core_dumped, message, "en".into())
            .await;
    }

    fn bytes(&self, up: u64, down: u64) {
        if up > 0 {
            self.guard.add_bytes_up(up);
            self.bytes_up.inc_by(up);
        }
        if down > 0 {
            self.guard.add_bytes_down(down);
            self.bytes_down.inc_by(down);
        }
    }

    fn vm_lost_message(&self) -> String {
        vm_lost_message(self.guard.vm_name())
    }

    fn exec_command(&self, command: Vec<u8>) -> Vec<u8> {
        let Some(partition) = &self.pool_verbs else {
            return command;
        };
        match super::pool_verbs::rewrite(&command, partition) {
            super::pool_verbs::Verb::NotOurs => command,
            super::pool_verbs::Verb::Run { name, command } => {
                tracing::info!(user = %self.user, vm = self.guard.vm_name(), verb = name, "pool verb");
                command.into_bytes()
            }
        }
    }

    fn exited(&self, status: Option<u32>, signal: Option<String>) {
        let text = match (status, signal) {
            (_, Some(sig)) => format!("signal {sig}"),
            (Some(code), None) => code.to_string(),
            (None, None) => return,
        };
        if let Ok(mut exit) = self.exit.lock() {
            *exit = Some(text);
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let exit = self
            .exit
            .lock()
            .ok()
            .and_then(|e| e.clone())
            .unwrap_or_else(|| "-".into());
        // A record complete by itself, printed the same wherever the last relay drops the link:
        // no span context (the connection's span would repeat its fields).
        tracing::info!(
            target: "poolgate::audit",
            parent: None,
            user = %self.user,
            client = %self.client,
            vm = %self.guard.vm_name(),
            session = self.guard.id(),
            duration_s = self.started.elapsed().as_secs_f64(),
            bytes_up = self.guard.bytes_up(),
            bytes_down = self.guard.bytes_down(),
            exit = %exit,
            "ssh session ended"
        );
    }
}
