//! The user-facing side: one russh server [`Handler`](server::Handler) per user connection.
//!
//! The handler stays thin: it authenticates, picks and connects the VM, and hands every channel to
//! a relay task. Nothing in it waits on the VM connection once channels flow (see
//! [`super::relay`]), except global `tcpip-forward` requests, which SSH answers synchronously.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use router_core::{PickRequest, Protocol, SessionGuard};
use russh::keys::ssh_key::PublicKey;
use russh::server::ChannelOpenHandle;
use russh::server::{self, Auth, Msg, Session};
use russh::{Channel, ChannelId, ChannelOpenFailure, MethodKind, MethodSet, Sig};
use tokio::sync::{OwnedSemaphorePermit, watch};

use super::authorized_keys::KeyPermissions;
use super::backend::{self, BackendError, BackendHandler, Credential, Target, VmChannel};
use super::keys::CertRequest;
use super::relay::{self, FlowControl, UserSide};
use super::{SshGateway, UserAuth};
use crate::metrics::outcome;

/// Per-connection handler.
pub struct Front {
    gw: Arc<SshGateway>,
    peer: SocketAddr,
    user: Option<String>,
    perms: KeyPermissions,
    /// A VM connection made during password authentication, finished in `auth_succeeded`.
    pending: Option<Connected>,
    /// The VM side of this connection as channel tasks see it.
    conn: watch::Sender<Conn>,
    flow: Arc<FlowControl>,
    unauthenticated: Option<OwnedSemaphorePermit>,
    authenticated: watch::Sender<bool>,
    accepted: Instant,
    /// The client tried at least one login method.
    tried: bool,
}

impl Front {
    /// A handler for a connection from `peer`, holding one of the `max_unauthenticated` permits
    /// until it authenticates.
    pub fn new(
        gw: Arc<SshGateway>,
        peer: SocketAddr,
        permit: OwnedSemaphorePermit,
        authenticated: watch::Sender<bool>,
    ) -> Self {
        Self {
            gw,
            peer,
            user: None,
            perms: KeyPermissions::ALL,
            pending: None,
            conn: watch::Sender::new(Conn::None),
            flow: Arc::new(FlowControl::default()),
            unauthenticated: Some(permit),
            authenticated,
            accepted: Instant::now(),
            tried: false,
        }
    }

    fn port_forwarding(&self) -> bool {
        self.gw.settings.port_forwarding && self.perms.port_forwarding
    }

    fn agent_forwarding(&self) -> bool {
        self.gw.settings.agent_forwarding && self.perms.agent_forwarding
    }

    fn check_key(&self, user: &str, key: &PublicKey) -> Option<KeyPermissions> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        match &self.gw.user_auth {
            UserAuth::AuthorizedKeys(template) => {
                match super::authorized_keys::check(template, user, key, self.peer.ip(), now) {
                    Ok(perms) => Some(perms),
                    Err(refusal) => {
                        tracing::debug!(%user, ?refusal, "public key refused");
                        None
                    }
                }
            }
            UserAuth::AnyKey => Some(KeyPermissions::ALL),
        }
    }

    fn current_backend(&self) -> Option<Arc<russh::client::Handle<BackendHandler>>> {
        match &*self.conn.borrow() {
            Conn::Ready(ready) => Some(ready.backend.clone()),
            _ => None,
        }
    }

    fn who<'a>(&'a self, user: &'a str) -> Who<'a> {
        Who {
            gw: &self.gw,
            user,
            peer: self.peer,
            port_forwarding: self.port_forwarding(),
            agent_forwarding: self.agent_forwarding(),
            accepted: self.accepted,
        }
    }

    fn authenticated(&mut self, user: &str) {
        self.gw.penalties.success(self.peer.ip());
        self.user = Some(user.to_string());
        self.unauthenticated = None;
        let _ = self.authenticated.send(true);
    }
}

enum OpenError {
    NoVm(String),
    PasswordRefused,
}

/// An authenticated VM connection with the session's load guard.
struct Connected {
    backend: Arc<russh::client::Handle<BackendHandler>>,
    incoming: tokio::sync::mpsc::UnboundedReceiver<VmChannel>,
    guard: Arc<SessionGuard>,
}

/// The VM side of a user connection.
#[derive(Clone)]
enum Conn {
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
struct Ready {
    backend: Arc<russh::client::Handle<BackendHandler>>,
    link: Arc<Link>,
}

/// Who is connecting, for [`connect_vm`].
struct Who<'a> {
    gw: &'a SshGateway,
    user: &'a str,
    peer: SocketAddr,
    port_forwarding: bool,
    agent_forwarding: bool,
    accepted: Instant,
}

/// Picks a VM and connects to it, trying each eligible VM at most once.
async fn connect_vm(who: &Who<'_>, password: Option<&str>) -> Result<Connected, OpenError> {
    let gw = who.gw;
    let user = who.user;
    let mut tried: Vec<String> = Vec::new();
    let mut last: Option<BackendError> = None;
    let started = Instant::now();
    loop {
        let request = PickRequest::new(Protocol::Ssh).user(user).excluding(&tried);
        let guard = match gw.pool.acquire(&request) {
            Ok(guard) => guard,
            Err(no_vm) => {
                gw.metrics.session_started(
                    Protocol::Ssh,
                    "none",
                    outcome::NO_VM,
                    started.elapsed(),
                );
                let mut message = no_vm.to_string();
                if let Some(e) = &last {
                    message = format!("{message} (last attempt: {e})");
                }
                return Err(OpenError::NoVm(message));
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
                tracing::info!(
                    %user, vm = %spec.name, session = guard.id(),
                    connect_ms = started.elapsed().as_millis() as u64,
                    "session routed"
                );
                return Ok(Connected {
                    backend: Arc::new(backend.handle),
                    incoming: backend.incoming,
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
                tracing::warn!(%user, vm = %spec.name, error = %e, "VM connection failed; trying the next VM");
                if e.is_outage() {
                    (gw.on_vm_failure)(&spec.name);
                }
                tried.push(spec.name.clone());
                last = Some(e);
            }
        }
    }
}

/// Turns a VM connection into the state channels use, and starts accepting the VM's own
/// channel opens (`-R`, `-A`).
fn make_ready(
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
    });
    tokio::spawn(accept_vm_channels(
        connected.incoming,
        handle,
        link.clone(),
        flow,
        who.agent_forwarding,
        who.port_forwarding,
    ));
    Arc::new(Ready {
        backend: connected.backend,
        link,
    })
}

/// Waits until the connection is ready (or failed). Tells the user on `notice` while waiting.
async fn ready_or_failed(mut conn: watch::Receiver<Conn>) -> Result<Arc<Ready>, Arc<str>> {
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

impl server::Handler for Front {
    type Error = russh::Error;

    async fn authentication_banner(&mut self) -> Result<Option<String>, Self::Error> {
        Ok(self.gw.settings.banner.clone())
    }

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        self.tried = true;
        Ok(match self.check_key(user, offer.public_key) {
            Some(_) => Auth::Accept,
            None => {
                tracing::info!(%user, client = %self.peer, "public key not accepted");
                self.gw.auth_failed("publickey", self.peer);
                reject(&self.gw)
            }
        })
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        match self.check_key(user, key.public_key) {
            Some(perms) => {
                self.perms = perms;
                self.authenticated(user);
                Ok(Auth::Accept)
            }
            None => {
                self.gw.auth_failed("publickey", self.peer);
                Ok(reject(&self.gw))
            }
        }
    }

    async fn auth_password(&mut self, user: &str, password: &str) -> Result<Auth, Self::Error> {
        self.tried = true;
        if !self.gw.settings.password_passthrough || !super::authorized_keys::valid_user_name(user)
        {
            self.gw.auth_failed("password", self.peer);
            return Ok(reject(&self.gw));
        }
        match connect_vm(&self.who(user), Some(password)).await {
            Ok(connected) => {
                self.pending = Some(connected);
                self.authenticated(user);
                Ok(Auth::Accept)
            }
            Err(OpenError::PasswordRefused) => {
                self.gw.auth_failed("password", self.peer);
                self.gw.login_failed(self.peer);
                Ok(reject(&self.gw))
            }
            Err(OpenError::NoVm(message)) => {
                tracing::warn!(%user, client = %self.peer, %message, "no VM for password login");
                Ok(reject(&self.gw))
            }
        }
    }

    async fn auth_succeeded(&mut self, session: &mut Session) -> Result<(), Self::Error> {
        let Some(user) = self.user.clone() else {
            return Ok(());
        };
        let (agent, forwarding) = (self.agent_forwarding(), self.port_forwarding());
        let connected = match self.pending.take() {
            Some(connected) => Ok(connected),
            None => connect_vm(&self.who(&user), None).await,
        };
        match connected {
            Ok(connected) => {
                let ready = make_ready(
                    &self.who(&user),
                    connected,
                    session.handle(),
                    self.flow.clone(),
                );
                self.conn.send_replace(Conn::Ready(ready));
            }
            Err(OpenError::NoVm(message)) => match self
                .gw
                .wake
                .clone()
                .filter(|d| d.wakes_on_connect())
            {
                Some(driver) => {
                    tracing::info!(%user, client = %self.peer, %message, "no VM yet; holding the connection while the pool wakes");
                    self.conn.send_replace(Conn::Waking);
                    let conn = self.conn.clone();
                    let gw = self.gw.clone();
                    let (peer, accepted, flow, handle) = (
                        self.peer,
                        self.accepted,
                        self.flow.clone(),
                        session.handle(),
                    );
                    tokio::spawn(async move {
                        let woke = driver.wait_for_vm(Protocol::Ssh).await;
                        let who = Who {
                            gw: &gw,
                            user: &user,
                            peer,
                            port_forwarding: forwarding,
                            agent_forwarding: agent,
                            accepted,
                        };
                        let outcome = if woke {
                            connect_vm(&who, None).await
                        } else {
                            Err(OpenError::NoVm(format!(
                                "no VM came up within {}",
                                humantime::format_duration(driver.hold_for())
                            )))
                        };
                        let state = match outcome {
                            Ok(connected) => Conn::Ready(make_ready(&who, connected, handle, flow)),
                            Err(OpenError::NoVm(m)) => Conn::Failed(m.into()),
                            Err(OpenError::PasswordRefused) => Conn::Failed("login refused".into()),
                        };
                        conn.send_replace(state);
                    });
                }
                None => {
                    tracing::warn!(%user, client = %self.peer, %message, "no VM for session");
                    session.disconnect(
                        russh::Disconnect::ServiceNotAvailable,
                        &format!("poolgate: {message}. Please try again in a minute."),
                        "en",
                    )?;
                }
            },
            Err(OpenError::PasswordRefused) => {
                session.disconnect(russh::Disconnect::ByApplication, "login refused", "en")?;
            }
        }
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let conn = self.conn.subscribe();
        if matches!(&*conn.borrow(), Conn::None | Conn::Failed(_)) {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        let flow = self.flow.clone();
        let agent = self.agent_forwarding();
        let notice = self
            .gw
            .wake
            .as_ref()
            .map(|d| d.boot_estimate())
            .unwrap_or_default();
        tokio::spawn(async move {
            let waking = matches!(&*conn.borrow(), Conn::Waking);
            if waking {
                // Accept now so the user sees why nothing happens yet.
                reply.accept().await;
                let _ = channel
                    .extended_data(
                        1,
                        format!(
                            "poolgate: starting a VM for you (about {} s)…\r\n",
                            notice.as_secs()
                        )
                        .as_bytes(),
                    )
                    .await;
                match ready_or_failed(conn).await {
                    Ok(ready) => match ready.backend.channel_open_session().await {
                        Ok(vm) => {
                            let _ = channel
                                .extended_data(1, &b"poolgate: your VM is ready.\r\n"[..])
                                .await;
                            relay::relay(channel, vm, flow, ready.link.clone(), true, agent).await;
                        }
                        Err(e) => {
                            fail_channel(channel, &format!("the VM refused the session: {e}")).await
                        }
                    },
                    Err(message) => fail_channel(channel, &message).await,
                }
                return;
            }
            let Ok(ready) = ready_or_failed(conn).await else {
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
                return;
            };
            match ready.backend.channel_open_session().await {
                Ok(vm) => {
                    reply.accept().await;
                    relay::relay(channel, vm, flow, ready.link.clone(), true, agent).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "VM refused a session channel");
                    reply.reject(ChannelOpenFailure::ConnectFailed).await;
                }
            }
        });
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        originator_address: &str,
        originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let conn = self.conn.subscribe();
        if !self.port_forwarding() || matches!(&*conn.borrow(), Conn::None | Conn::Failed(_)) {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        let flow = self.flow.clone();
        let (host, origin) = (host_to_connect.to_string(), originator_address.to_string());
        tokio::spawn(async move {
            let Ok(ready) = ready_or_failed(conn).await else {
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
                return;
            };
            let (backend, link) = (ready.backend.clone(), ready.link.clone());
            // The VM's sshd opens the TCP connection, never the gateway.
            match backend
                .channel_open_direct_tcpip(host.clone(), port_to_connect, origin, originator_port)
                .await
            {
                Ok(vm) => {
                    reply.accept().await;
                    relay::relay(channel, vm, flow, link, false, false).await;
                }
                Err(e) => {
                    tracing::debug!(%host, port = port_to_connect, error = %e, "direct-tcpip refused by VM");
                    reply.reject(ChannelOpenFailure::ConnectFailed).await;
                }
            }
        });
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let (Some(backend), true) = (self.current_backend(), self.port_forwarding()) else {
            return Ok(false);
        };
        let request = backend.tcpip_forward(address.to_string(), *port);
        match tokio::time::timeout(self.gw.settings.connect_timeout, request).await {
            Ok(Ok(bound)) => {
                if *port == 0 {
                    *port = bound;
                }
                Ok(true)
            }
            Ok(Err(e)) => {
                tracing::debug!(%address, port = *port, error = %e, "VM refused tcpip-forward");
                Ok(false)
            }
            Err(_) => Ok(false),
        }
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Some(backend) = self.current_backend() else {
            return Ok(false);
        };
        let request = backend.cancel_tcpip_forward(address.to_string(), port);
        Ok(matches!(
            tokio::time::timeout(self.gw.settings.connect_timeout, request).await,
            Ok(Ok(()))
        ))
    }

    async fn agent_request(
        &mut self,
        _channel: ChannelId,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(self.agent_forwarding())
    }

    fn adjust_window(&mut self, _channel: ChannelId, current: u32) -> u32 {
        self.flow.target_window(current.max(self.gw.window_size))
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        if self.tried && self.user.is_none() {
            self.gw.login_failed(self.peer);
        }
        if let Some(backend) = self.current_backend() {
            tokio::spawn(async move {
                let _ = backend
                    .disconnect(russh::Disconnect::ByApplication, "user disconnected", "en")
                    .await;
            });
        }
    }
}

fn reject(gw: &SshGateway) -> Auth {
    let mut methods = MethodSet::empty();
    methods.push(MethodKind::PublicKey);
    if gw.settings.password_passthrough {
        methods.push(MethodKind::Password);
    }
    Auth::Reject {
        proceed_with_methods: Some(methods),
        partial_success: false,
    }
}

/// Accepts channels the VM opens towards the user: `-R` forwards and agent requests.
async fn accept_vm_channels(
    mut incoming: tokio::sync::mpsc::UnboundedReceiver<VmChannel>,
    handle: server::Handle,
    link: Arc<Link>,
    flow: Arc<FlowControl>,
    agent_allowed: bool,
    forwarding_allowed: bool,
) {
    while let Some(request) = incoming.recv().await {
        let (handle, link, flow) = (handle.clone(), link.clone(), flow.clone());
        tokio::spawn(async move {
            match request {
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
        });
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
        tracing::info!(
            target: "poolgate::audit",
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

/// Tells the user why a held session cannot go on, and ends it.
async fn fail_channel(channel: Channel<Msg>, message: &str) {
    let _ = channel
        .extended_data(
            1,
            format!("poolgate: {message}. Please try again later.\r\n").as_bytes(),
        )
        .await;
    let _ = channel.exit_status(1).await;
    let _ = channel.eof().await;
    let _ = channel.close().await;
}
