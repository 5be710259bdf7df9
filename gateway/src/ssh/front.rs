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
    backend: Option<Arc<russh::client::Handle<BackendHandler>>>,
    incoming: Option<tokio::sync::mpsc::UnboundedReceiver<VmChannel>>,
    guard: Option<Arc<SessionGuard>>,
    link: Option<Arc<Link>>,
    flow: Arc<FlowControl>,
    unauthenticated: Option<OwnedSemaphorePermit>,
    authenticated: watch::Sender<bool>,
    accepted: Instant,
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
            backend: None,
            incoming: None,
            guard: None,
            link: None,
            flow: Arc::new(FlowControl::default()),
            unauthenticated: Some(permit),
            authenticated,
            accepted: Instant::now(),
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

    /// Picks a VM and connects to it, trying each eligible VM at most once.
    async fn open_backend(&mut self, user: &str, password: Option<&str>) -> Result<(), OpenError> {
        let mut tried: Vec<String> = Vec::new();
        let mut last: Option<BackendError> = None;
        let started = Instant::now();
        loop {
            let request = PickRequest::new(Protocol::Ssh).user(user).excluding(&tried);
            let guard = match self.gw.pool.acquire(&request) {
                Ok(guard) => guard,
                Err(no_vm) => {
                    self.gw.metrics.session_started(
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
            let client = self.peer.to_string();
            let credential = match password {
                Some(p) => Credential::Password(p),
                None => Credential::Certificate {
                    ca: &self.gw.ca,
                    request: CertRequest {
                        user,
                        session: guard.id(),
                        client: &client,
                        port_forwarding: self.port_forwarding(),
                        agent_forwarding: self.agent_forwarding(),
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
                self.gw.host_policy.clone(),
                self.gw.client_config.clone(),
                self.gw.settings.connect_timeout,
            )
            .await
            {
                Ok(backend) => {
                    self.gw.metrics.session_started(
                        Protocol::Ssh,
                        &spec.name,
                        outcome::OK,
                        self.accepted.elapsed(),
                    );
                    tracing::info!(
                        %user, vm = %spec.name, session = guard.id(),
                        connect_ms = started.elapsed().as_millis() as u64,
                        "session routed"
                    );
                    self.backend = Some(Arc::new(backend.handle));
                    self.incoming = Some(backend.incoming);
                    self.guard = Some(Arc::new(guard));
                    return Ok(());
                }
                Err(BackendError::AuthRefused { .. }) if password.is_some() => {
                    return Err(OpenError::PasswordRefused);
                }
                Err(e) => {
                    self.gw.metrics.session_started(
                        Protocol::Ssh,
                        &spec.name,
                        outcome::VM_FAILED,
                        started.elapsed(),
                    );
                    tracing::warn!(%user, vm = %spec.name, error = %e, "VM connection failed; trying the next VM");
                    if e.is_outage() {
                        (self.gw.on_vm_failure)(&spec.name);
                    }
                    tried.push(spec.name.clone());
                    last = Some(e);
                }
            }
        }
    }

    fn authenticated(&mut self, user: &str) {
        self.user = Some(user.to_string());
        self.unauthenticated = None;
        let _ = self.authenticated.send(true);
    }
}

enum OpenError {
    NoVm(String),
    PasswordRefused,
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
        Ok(match self.check_key(user, offer.public_key) {
            Some(_) => Auth::Accept,
            None => reject(&self.gw),
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
        if !self.gw.settings.password_passthrough || !super::authorized_keys::valid_user_name(user)
        {
            self.gw.auth_failed("password", self.peer);
            return Ok(reject(&self.gw));
        }
        match self.open_backend(user, Some(password)).await {
            Ok(()) => {
                self.authenticated(user);
                Ok(Auth::Accept)
            }
            Err(OpenError::PasswordRefused) => {
                self.gw.auth_failed("password", self.peer);
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
        if self.backend.is_none()
            && let Err(OpenError::NoVm(message)) = self.open_backend(&user, None).await
        {
            tracing::warn!(%user, client = %self.peer, %message, "no VM for session");
            session.disconnect(
                russh::Disconnect::ServiceNotAvailable,
                &format!("poolgate: {message}. Please try again in a minute."),
                "en",
            )?;
            return Ok(());
        }
        let (Some(guard), Some(backend)) = (self.guard.clone(), self.backend.clone()) else {
            return Ok(());
        };
        let link = Arc::new(Link {
            handle: session.handle(),
            guard: guard.clone(),
            user: user.clone(),
            client: self.peer,
            started: Instant::now(),
            exit: Mutex::new(None),
            bytes_up: self.gw.metrics.bytes_total.with_label_values(&[
                "ssh",
                guard.vm_name(),
                "up",
            ]),
            bytes_down: self.gw.metrics.bytes_total.with_label_values(&[
                "ssh",
                guard.vm_name(),
                "down",
            ]),
        });
        self.link = Some(link.clone());
        if let Some(incoming) = self.incoming.take() {
            tokio::spawn(accept_vm_channels(
                incoming,
                session.handle(),
                link,
                self.flow.clone(),
                self.agent_forwarding(),
                self.port_forwarding(),
            ));
        }
        let _ = backend;
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let (Some(backend), Some(link)) = (self.backend.clone(), self.link.clone()) else {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        let flow = self.flow.clone();
        let agent = self.agent_forwarding();
        tokio::spawn(async move {
            match backend.channel_open_session().await {
                Ok(vm) => {
                    reply.accept().await;
                    relay::relay(channel, vm, flow, link, true, agent).await;
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
        let (Some(backend), Some(link), true) = (
            self.backend.clone(),
            self.link.clone(),
            self.port_forwarding(),
        ) else {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        let flow = self.flow.clone();
        let (host, origin) = (host_to_connect.to_string(), originator_address.to_string());
        tokio::spawn(async move {
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
        let (Some(backend), true) = (self.backend.clone(), self.port_forwarding()) else {
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
        let Some(backend) = self.backend.clone() else {
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
        if let Some(backend) = self.backend.take() {
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
