//! The user-facing side: one russh server [`Handler`](server::Handler) per user connection.
//!
//! The handler stays thin: it authenticates, picks and connects the VM, and hands every channel to
//! a relay task. Nothing in it waits on the VM connection once channels flow (see
//! [`super::relay`]), except global `tcpip-forward` requests, which SSH answers synchronously.

use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use router_core::Protocol;
use russh::keys::ssh_key::PublicKey;
use russh::server::ChannelOpenHandle;
use russh::server::{self, Auth, Msg, Session};
use russh::{Channel, ChannelId, ChannelOpenFailure, MethodKind, MethodSet};
use tokio::sync::watch;
use tracing::Instrument;

use super::authorized_keys::KeyPermissions;
use super::backend::BackendHandler;
use super::connect::{Conn, Connected, OpenError, Who, connect_vm, make_ready, ready_or_failed};
use super::penalty::UnauthPermit;
use super::relay::{self, FlowControl};
use super::{SshGateway, UserAuth};

/// Per-connection handler.
pub struct Front {
    gw: Arc<SshGateway>,
    peer: SocketAddr,
    user: Option<String>,
    /// The VM named in the login name (`alice+vm-3`), if any.
    vm_choice: Option<String>,
    perms: KeyPermissions,
    /// A VM connection made during password authentication, finished in `auth_succeeded`.
    pending: Option<Connected>,
    /// The VM side of this connection as channel tasks see it.
    conn: watch::Sender<Conn>,
    flow: Arc<FlowControl>,
    unauthenticated: Option<UnauthPermit>,
    authenticated: watch::Sender<bool>,
    accepted: Instant,
    /// The client tried at least one login method.
    tried: bool,
    /// Keys the client offered that are not authorized (OpenSSH offers each key it has in
    /// turn): one failed authentication if the connection ends without a login, none if a
    /// later key logs in. The login name of the last such offer.
    keys_refused: Option<String>,
    /// A VM refused a password this connection sent: that counted as a failure for the
    /// address already, so the connection ending without a login adds none.
    password_refused: bool,
    /// The connection's span. russh calls the handler from a task of its own, outside it, so
    /// the methods that log, and the tasks they start, run in it explicitly.
    span: tracing::Span,
}

impl Front {
    /// A handler for a connection from `peer`, holding one of the `max_unauthenticated` slots
    /// until it authenticates.
    pub fn new(
        gw: Arc<SshGateway>,
        peer: SocketAddr,
        permit: UnauthPermit,
        authenticated: watch::Sender<bool>,
        span: tracing::Span,
    ) -> Self {
        Self {
            gw,
            peer,
            user: None,
            vm_choice: None,
            perms: KeyPermissions::ALL,
            pending: None,
            conn: watch::Sender::new(Conn::None),
            flow: Arc::new(FlowControl::default()),
            unauthenticated: Some(permit),
            authenticated,
            accepted: Instant::now(),
            tried: false,
            keys_refused: None,
            password_refused: false,
            span,
        }
    }

    fn port_forwarding(&self) -> bool {
        self.gw.settings.port_forwarding && self.perms.port_forwarding
    }

    fn agent_forwarding(&self) -> bool {
        self.gw.settings.agent_forwarding && self.perms.agent_forwarding
    }

    /// The key's `no-pty` / `restrict`: the VM's sshd refuses a terminal, as it would itself.
    fn pty(&self) -> bool {
        self.perms.pty
    }

    /// A reserved login name (`autoscale.busy_user`): refused whatever the credentials.
    fn refused(&self, user: &str) -> bool {
        let refused = self.gw.settings.refused_users.iter().any(|u| u == user);
        if refused {
            tracing::warn!(
                %user,
                "login refused: this name is reserved for the autoscaler's busy check (autoscale.busy_user)"
            );
        }
        refused
    }

    fn check_key(&self, user: &str, key: &PublicKey) -> Option<KeyPermissions> {
        if self.refused(user) {
            return None;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        match &self.gw.user_auth {
            UserAuth::AuthorizedKeys(template) => {
                match super::authorized_keys::check(template, user, key, self.peer.ip(), now) {
                    Ok(perms) => Some(perms),
                    Err(refusal) => {
                        log_refusal(user, &refusal);
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
            vm: self.vm_choice.as_deref(),
            peer: self.peer,
            port_forwarding: self.port_forwarding(),
            agent_forwarding: self.agent_forwarding(),
            pty: self.pty(),
            accepted: self.accepted,
            span: &self.span,
            held_since: None,
        }
    }

    fn authenticated(&mut self, user: &str) {
        self.gw.penalties.success(self.peer.ip());
        self.user = Some(user.to_string());
        self.unauthenticated = None;
        let _ = self.authenticated.send(true);
    }
}

impl server::Handler for Front {
    type Error = russh::Error;

    async fn authentication_banner(&mut self) -> Result<Option<String>, Self::Error> {
        Ok(self.gw.settings.banner.clone())
    }

    async fn auth_publickey_offered(
        &mut self,
        login: &str,
        offer: server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        let (user, _) = split_login(login);
        self.tried = true;
        let span = self.span.clone();
        Ok(
            span.in_scope(|| match self.check_key(user, offer.public_key) {
                Some(_) => Auth::Accept,
                None => {
                    tracing::debug!(%user, "offered public key not authorized");
                    self.keys_refused = Some(user.to_owned());
                    reject(&self.gw)
                }
            }),
        )
    }

    async fn auth_publickey(
        &mut self,
        login: &str,
        key: server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let (user, vm) = split_login(login);
        self.vm_choice = vm.map(str::to_owned);
        let answer_by = tokio::time::Instant::now() + REFUSED_LOGIN_DELAY;
        let span = self.span.clone();
        let accepted = span.in_scope(|| match self.check_key(user, key.public_key) {
            Some(perms) => {
                self.perms = perms;
                self.who(user).logged_in();
                self.authenticated(user);
                true
            }
            None => {
                self.gw.auth_failed("publickey", self.peer);
                // Counted here: not again when the connection ends.
                self.keys_refused = None;
                false
            }
        });
        if accepted {
            return Ok(Auth::Accept);
        }
        // A signature by a key not authorized: a failed login, not an offer.
        Ok(refuse_at(answer_by, &self.gw).await)
    }

    async fn auth_password(&mut self, login: &str, password: &str) -> Result<Auth, Self::Error> {
        let (user, vm) = split_login(login);
        self.vm_choice = vm.map(str::to_owned);
        // Every refusal is answered this long after the password came, however long the VM
        // took or whether it was asked at all: the time tells nothing about the user.
        let answer_by = tokio::time::Instant::now() + REFUSED_LOGIN_DELAY;
        let span = self.span.clone();
        async move {
            self.tried = true;
            if !self.gw.settings.password_passthrough
                || !super::authorized_keys::valid_user_name(user)
                || self.refused(user)
            {
                self.gw.auth_failed("password", self.peer);
                return Ok(refuse_at(answer_by, &self.gw).await);
            }
            // Boxed: the handler's futures live inline in russh's session task for the whole
            // connection, and connecting to a VM is by far the largest of them.
            let mut result = Box::pin(connect_vm(&self.who(user), Some(password))).await;
            let ip = self.peer.ip();
            if let Err(OpenError::NoVm(message)) = &result
                && let Some(waker) = self.gw.wake.clone().filter(|w| w.holds_connections())
                // One waiting password login per address: an unauthenticated client must not
                // make the autoscaler size the pool for the many it could open.
                && self.gw.password_waits.insert(ip)
            {
                let _one_per_address = super::scopeguard(|| {
                    self.gw.password_waits.remove(&ip);
                });
                // Only a VM can check the password, and none can take the login yet (an empty
                // pool at night): the login waits while the pool wakes, as a key login's
                // connection does, for as long as ssh.login_grace leaves it. A pool slower to
                // boot than that still wakes for the user's next try.
                tracing::info!(%user, %message, "no VM yet for a password login; waiting while the pool wakes (within ssh.login_grace)");
                let deadline = self.accepted + self.gw.settings.login_grace;
                let deadline = tokio::time::Instant::from_std(deadline)
                    .checked_sub(PASSWORD_WAKE_MARGIN)
                    .unwrap_or_else(tokio::time::Instant::now);
                let who = Who {
                    held_since: Some(std::time::Instant::now()),
                    ..self.who(user)
                };
                let held = waker.hold(Protocol::Ssh, || held_attempt(&who, Some(password)));
                result = match tokio::time::timeout_at(deadline, Box::pin(held)).await {
                    Ok(Ok(done)) => done,
                    Ok(Err(why)) => Err(OpenError::NoVm(why)),
                    Err(_) => Err(OpenError::NoVm(format!(
                        "the pool is still starting a VM after ssh.login_grace ({}); it goes on, \
                         and the user's next try will find it",
                        humantime::format_duration(self.gw.settings.login_grace)
                    ))),
                };
            }
            match result {
                Ok(connected) => {
                    self.pending = Some(connected);
                    self.authenticated(user);
                    Ok(Auth::Accept)
                }
                Err(OpenError::PasswordRefused) => {
                    self.gw.auth_failed("password", self.peer);
                    self.gw.login_failed(self.peer);
                    self.password_refused = true;
                    Ok(refuse_at(answer_by, &self.gw).await)
                }
                Err(OpenError::NoVm(message) | OpenError::Final(message)) => {
                    tracing::warn!(%user, %message, "no VM for password login");
                    Ok(refuse_at(answer_by, &self.gw).await)
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn auth_succeeded(&mut self, session: &mut Session) -> Result<(), Self::Error> {
        let span = self.span.clone();
        async move {
            let Some(user) = self.user.clone() else {
                return Ok(());
            };
            let (agent, forwarding, pty) =
                (self.agent_forwarding(), self.port_forwarding(), self.pty());
            let connected = match self.pending.take() {
                Some(connected) => Ok(connected),
                // Boxed, as in `auth_password`.
                None => Box::pin(connect_vm(&self.who(&user), None)).await,
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
                    .filter(|w| w.holds_connections())
                {
                    Some(waker) => {
                        tracing::info!(reason = %message, "no VM yet; holding the connection while the pool wakes");
                        self.conn.send_replace(Conn::Waking);
                        let conn = self.conn.clone();
                        let gw = self.gw.clone();
                        let (peer, accepted, flow, handle) = (
                            self.peer,
                            self.accepted,
                            self.flow.clone(),
                            session.handle(),
                        );
                        let span = self.span.clone();
                        let woken = async move {
                            let who = &Who {
                                gw: &gw,
                                user: &user,
                                // A named VM is never waited for (`OpenError::Final`).
                                vm: None,
                                peer,
                                port_forwarding: forwarding,
                                agent_forwarding: agent,
                                pty,
                                accepted,
                                span: &span,
                                held_since: Some(Instant::now()),
                            };
                            // Another held connection may take the place this one woke for;
                            // then it waits on (see `Waker::hold`).
                            let held = waker
                                .hold(Protocol::Ssh, move || held_attempt(who, None))
                                .await;
                            let state = match held {
                                Ok(Ok(connected)) => {
                                    Conn::Ready(make_ready(who, connected, handle, flow))
                                }
                                Ok(Err(OpenError::PasswordRefused)) => {
                                    Conn::Failed("login refused".into())
                                }
                                Ok(Err(OpenError::Final(why))) => Conn::Failed(why.into()),
                                // `hold` turns every NoVm into a retry.
                                Ok(Err(OpenError::NoVm(why))) | Err(why) => {
                                    tracing::warn!(reason = %why, "no VM for the held connection; giving up");
                                    Conn::Failed(why.into())
                                }
                            };
                            conn.send_replace(state);
                        };
                        tokio::spawn(woken.instrument(self.span.clone()));
                    }
                    None => {
                        tracing::warn!(reason = %message, "no VM for session");
                        session.disconnect(
                            russh::Disconnect::ServiceNotAvailable,
                            &ascii(&format!(
                                "poolgate: {message}. Please try again in a minute."
                            )),
                            "en",
                        )?;
                    }
                },
                Err(OpenError::Final(message)) => {
                    session.disconnect(
                        russh::Disconnect::NoMoreAuthMethodsAvailable,
                        &ascii(&format!("poolgate: {message}.")),
                        "en",
                    )?;
                }
                Err(OpenError::PasswordRefused) => {
                    session.disconnect(russh::Disconnect::ByApplication, "login refused", "en")?;
                }
            }
            Ok(())
        }
        .instrument(span)
        .await
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
            .map(|w| w.boot_estimate())
            .unwrap_or_default();
        let channel_task = async move {
            let waking = matches!(&*conn.borrow(), Conn::Waking);
            if waking {
                // Boxed: only sessions opened while the pool wakes need this state.
                Box::pin(held_session(channel, reply, conn, flow, agent, notice)).await;
                return;
            }
            let Ok(ready) = ready_or_failed(conn).await else {
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
                return;
            };
            // Boxed: opening the VM's channel takes a russh client message on its way and the
            // wait for the answer (about 1.3 KiB), room this task would otherwise keep for the
            // life of the channel.
            match Box::pin(ready.link.open_session(&ready.backend)).await {
                Ok(vm) => {
                    reply.accept().await;
                    relay::relay(channel, vm, flow, ready.link.clone(), true, agent).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "VM refused a session channel");
                    reply.reject(ChannelOpenFailure::ConnectFailed).await;
                }
            }
        };
        tokio::spawn(channel_task.instrument(self.span.clone()));
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
        let channel_task = async move {
            let Ok(ready) = ready_or_failed(conn).await else {
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
                return;
            };
            let (backend, link) = (ready.backend.clone(), ready.link.clone());
            // The VM's sshd opens the TCP connection, never the gateway.
            // Boxed, as the session channel's open.
            match Box::pin(backend.channel_open_direct_tcpip(
                host.clone(),
                port_to_connect,
                origin,
                originator_port,
            ))
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
        };
        tokio::spawn(channel_task.instrument(self.span.clone()));
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let span = self.span.clone();
        async move {
            let (Some(backend), true) = (self.current_backend(), self.port_forwarding()) else {
                return Ok(false);
            };
            let request = backend.tcpip_forward(address.to_string(), *port);
            // Boxed, as in `auth_password`: a russh client request and its timer (about
            // 0.8 KiB) that only `-R` needs.
            match Box::pin(tokio::time::timeout(
                self.gw.settings.connect_timeout,
                request,
            ))
            .await
            {
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
        .instrument(span)
        .await
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
        // Boxed, as in `tcpip_forward`.
        Ok(matches!(
            Box::pin(tokio::time::timeout(
                self.gw.settings.connect_timeout,
                request
            ))
            .await,
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
            self.span.in_scope(|| {
                if let Some(user) = &self.keys_refused {
                    tracing::info!(%user, "login failed: no key the client offered is authorized");
                    self.gw.auth_failed("publickey", self.peer);
                }
                if !self.password_refused {
                    self.gw.login_failed(self.peer);
                }
            });
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

/// How long after a password (or a signature by a key not authorized) its refusal is sent: the
/// delay that makes guessing slow, and the same whatever the refusal's reason. A refused key
/// offer is answered at once (see the server config in `ssh/mod.rs`).
pub(super) const REFUSED_LOGIN_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

/// The refusal of a login attempt, sent at `answer_by` ([`REFUSED_LOGIN_DELAY`] after the
/// attempt came).
async fn refuse_at(answer_by: tokio::time::Instant, gw: &SshGateway) -> Auth {
    // Boxed: the handler's futures live inline in russh's session task for the whole
    // connection, and a timer is larger than a pointer to one.
    Box::pin(tokio::time::sleep_until(answer_by)).await;
    reject(gw)
}

/// Separates the VM a user names in the login name from the user name: `alice+vm-3` is user
/// `alice` on VM `vm-3`. A `+` is never part of a user name the gateway accepts
/// ([`super::authorized_keys::valid_user_name`]), so no name is taken for another.
pub(crate) const VM_SEPARATOR: char = '+';

/// The user name and the VM named in `login`, if any (see [`VM_SEPARATOR`]).
pub(crate) fn split_login(login: &str) -> (&str, Option<&str>) {
    match login.split_once(VM_SEPARATOR) {
        Some((user, vm)) if !user.is_empty() && !vm.is_empty() => (user, Some(vm)),
        _ => (login, None),
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

/// One attempt of a connection held while the pool wakes ([`crate::wake::Waker::hold`]): no VM
/// yet waits on; anything else (a session, or a VM that refused this user too) ends the wait.
async fn held_attempt(
    who: &Who<'_>,
    password: Option<&str>,
) -> ControlFlow<Result<Connected, OpenError>, String> {
    match connect_vm(who, password).await {
        Err(OpenError::NoVm(why)) => ControlFlow::Continue(why),
        done => ControlFlow::Break(done),
    }
}

/// How long before `ssh.login_grace` ends a password login that waits for the pool gives up
/// (refused, so that the client gets an answer before the gateway closes the connection).
const PASSWORD_WAKE_MARGIN: std::time::Duration = std::time::Duration::from_secs(2);

/// Says why a key that the user's file lists was refused: an administrator moving existing
/// keys behind the gateway must see which line needs changing. A key the file does not list
/// (clients offer every key they have) is not news.
fn log_refusal(user: &str, refusal: &super::authorized_keys::Refusal) {
    use super::authorized_keys::Refusal;
    match refusal {
        Refusal::Unenforceable(option) => tracing::warn!(
            %user,
            option = %option,
            "public key refused: its authorized_keys line has an option the gateway cannot \
             enforce, so it refuses the key rather than drop the restriction (remove the option, \
             or see docs/security.md)"
        ),
        Refusal::FromMismatch => tracing::info!(
            %user,
            "public key refused: its authorized_keys line has a from= that excludes this client's \
             address"
        ),
        Refusal::Expired => tracing::info!(
            %user,
            "public key refused: its authorized_keys line's expiry-time has passed"
        ),
        other => tracing::debug!(%user, refusal = ?other, "public key refused"),
    }
}

/// A session channel opened while the pool wakes up: accepted at once so the user sees why
/// nothing happens yet, then relayed once a VM is connected (or failed with the reason).
async fn held_session(
    channel: Channel<Msg>,
    reply: ChannelOpenHandle,
    conn: watch::Receiver<Conn>,
    flow: Arc<FlowControl>,
    agent: bool,
    notice: std::time::Duration,
) {
    reply.accept().await;
    let _ = channel
        .extended_data(
            1,
            format!(
                "poolgate: starting a VM for you (about {} s)...\r\n",
                notice.as_secs()
            )
            .as_bytes(),
        )
        .await;
    match ready_or_failed(conn).await {
        Ok(ready) => match ready.link.open_session(&ready.backend).await {
            Ok(vm) => {
                let _ = channel
                    .extended_data(1, &b"poolgate: your VM is ready.\r\n"[..])
                    .await;
                relay::relay(channel, vm, flow, ready.link.clone(), true, agent).await;
            }
            Err(e) => fail_channel(channel, &format!("the VM refused the session: {e}")).await,
        },
        Err(message) => fail_channel(channel, &message).await,
    }
}

/// Tells the user why a held session cannot go on, and ends it. A message that is a whole
/// sentence (it ends with a full stop, and says what to do) is shown as it is; to any other the
/// advice to try again later is added.
async fn fail_channel(channel: Channel<Msg>, message: &str) {
    let line = if message.ends_with('.') {
        format!("poolgate: {message}\r\n")
    } else {
        format!("poolgate: {message}. Please try again later.\r\n")
    };
    let _ = channel.extended_data(1, ascii(&line).as_bytes()).await;
    let _ = channel.exit_status(1).await;
    let _ = channel.eof().await;
    let _ = channel.close().await;
}

/// Text for SSH clients, which print anything but printable ASCII as octal escapes (OpenSSH runs
/// disconnect reasons through strnvis): typographic dashes and ellipses become ASCII, anything
/// else outside ASCII becomes `?`.
pub(crate) fn ascii(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\u{2013}' | '\u{2014}' => out.push('-'),
            '\u{2026}' => out.push_str("..."),
            '\u{2018}' | '\u{2019}' => out.push('\''),
            '\u{201c}' | '\u{201d}' => out.push('"'),
            c if c.is_ascii() => out.push(c),
            _ => out.push('?'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn messages_for_ssh_clients_are_ascii() {
        let text = super::ascii(
            "no VM is available right now: 2 VMs \u{2014} 2 unhealthy\u{2026} caf\u{e9}",
        );
        assert_eq!(
            text,
            "no VM is available right now: 2 VMs - 2 unhealthy... caf?"
        );
    }

    #[test]
    fn a_login_name_may_name_the_vm_after_a_plus() {
        use super::split_login;
        assert_eq!(split_login("alice"), ("alice", None));
        assert_eq!(split_login("alice+vm-3"), ("alice", Some("vm-3")));
        assert_eq!(
            split_login("a.b@contoso.com+dsvm_7"),
            ("a.b@contoso.com", Some("dsvm_7"))
        );
        // Nothing on one side: no VM named; the name as a whole is then refused as invalid.
        assert_eq!(split_login("alice+"), ("alice+", None));
        assert_eq!(split_login("+vm-3"), ("+vm-3", None));
        assert!(!crate::ssh::authorized_keys::valid_user_name("alice+"));
    }
}
