//! SSH frontend: terminates users' SSH on one stable host key and relays each connection to a
//! pool VM (see `front` for the handler, `backend` for the VM leg, `relay` for channels).

pub mod authorized_keys;
pub mod backend;
mod connect;
pub mod forced_command;
pub mod front;
pub mod keys;
pub mod known_hosts;
pub mod penalty;
pub mod pool_verbs;
pub mod relay;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use router_core::Pool;
use russh::keys::ssh_key::PrivateKey;
use russh::{MethodKind, MethodSet, cipher, kex, server};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::Instrument;

use self::front::Front;
use self::keys::UserCa;
use self::known_hosts::HostKeyPolicy;
use crate::health::{FailureHook, SshDownEvents};
use crate::placement::SharedAffinity;
use crate::wake::Waker;

/// How users authenticate to the gateway.
#[derive(Debug, Clone)]
pub enum UserAuth {
    /// OpenSSH authorized_keys files from a path template (`{user}` substituted).
    AuthorizedKeys(String),
    /// Any public key (the demo only).
    AnyKey,
}

/// SSH settings taken from `[ssh]`.
#[derive(Debug, Clone)]
pub struct SshSettings {
    /// `ssh.port_forwarding`.
    pub port_forwarding: bool,
    /// `ssh.agent_forwarding`.
    pub agent_forwarding: bool,
    /// `ssh.password_auth = "passthrough"`.
    pub password_passthrough: bool,
    /// `ssh.connect_timeout`: TCP connect, handshake and login towards a VM.
    pub connect_timeout: Duration,
    /// `ssh.login_grace`: time a user has to authenticate.
    pub login_grace: Duration,
    /// `ssh.client_alive_interval` and `ssh.client_alive_count_max`: keepalives to clients.
    pub client_alive: (Duration, usize),
    /// `ssh.max_unauthenticated`.
    pub max_unauthenticated: usize,
    /// `listen.proxy_protocol`: each connection starts with a PROXY protocol header naming
    /// the client.
    pub proxy_protocol: bool,
    /// `ssh.banner`.
    pub banner: Option<String>,
    /// `ssh.idle_timeout`.
    pub idle_timeout: Option<Duration>,
    /// Login names refused at the front door whatever the key (`autoscale.busy_user`: a user
    /// must never get a shell under the busy check's name).
    pub refused_users: Vec<String>,
    /// The batch partition when `ssh HOST pool …` verbs are on (`[batch]`, `batch.verbs`).
    pub pool_verbs: Option<String>,
}

/// Called with the auth method and client address on every failed authentication.
pub type AuthFailureHook = Arc<dyn Fn(&str, SocketAddr) + Send + Sync>;

/// Everything the SSH frontend shares between connections.
pub struct SshGateway {
    server_config: Arc<server::Config>,
    pub(crate) settings: SshSettings,
    pub(crate) user_auth: UserAuth,
    pub(crate) ca: UserCa,
    host_policy: std::sync::RwLock<Arc<HostKeyPolicy>>,
    pub(crate) client_config: Arc<russh::client::Config>,
    pub(crate) pool: Arc<Pool>,
    pub(crate) on_vm_failure: FailureHook,
    on_auth_failure: AuthFailureHook,
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    pub(crate) wake: Option<Waker>,
    /// Affinity shared by the gateway replicas (`[cluster]`), asked before placing a session.
    pub(crate) affinity: Option<Arc<dyn SharedAffinity>>,
    /// Names of VMs whose SSH side went down; each VM connection takes its own receiver.
    pub(crate) vm_down: Option<SshDownEvents>,
    pub(crate) window_size: u32,
    unauthenticated: penalty::UnauthSlots,
    /// Open user connections, for graceful shutdown.
    connections: dashmap::DashMap<u64, server::Handle>,
    next_connection: std::sync::atomic::AtomicU64,
    /// Back-off for addresses that keep failing to log in.
    pub(crate) penalties: penalty::Penalties,
    /// Addresses with a password login waiting for the pool to wake: one each, as the password
    /// is not known to be right while it waits (`Front::auth_password`).
    pub(crate) password_waits: dashmap::DashSet<std::net::IpAddr>,
}

impl std::fmt::Debug for SshGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshGateway")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Inputs of [`SshGateway::new`].
pub struct SshGatewayParts {
    /// Host keys shown to users.
    pub host_keys: Vec<PrivateKey>,
    /// Settings.
    pub settings: SshSettings,
    /// User authentication.
    pub user_auth: UserAuth,
    /// Certificate authority for the VM leg.
    pub ca: UserCa,
    /// VM host-key trust.
    pub host_policy: HostKeyPolicy,
    /// The pool.
    pub pool: Arc<Pool>,
    /// Passive health feedback.
    pub on_vm_failure: FailureHook,
    /// Failed-authentication feedback (metrics).
    pub on_auth_failure: AuthFailureHook,
    /// Metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Autoscaler to wake when no VM can take a session (wake-on-connect).
    pub wake: Option<Waker>,
    /// Affinity shared by the gateway replicas, when there are several.
    pub affinity: Option<Arc<dyn SharedAffinity>>,
    /// VMs the health checks mark down on their SSH side: connections to such a VM are asked
    /// at once whether it still answers. `None`: only SSH keepalives notice a lost VM.
    pub vm_down: Option<SshDownEvents>,
}

/// Server-side russh configuration (see FIELD-NOTES: nodelay, immediate first rejection,
/// AES-GCM offered, ML-KEM hybrid first).
fn server_config(host_keys: Vec<PrivateKey>, settings: &SshSettings) -> server::Config {
    let preferred = russh::Preferred {
        kex: std::borrow::Cow::Owned(vec![
            kex::MLKEM768X25519_SHA256,
            kex::CURVE25519,
            kex::CURVE25519_PRE_RFC_8731,
            kex::DH_GEX_SHA256,
            kex::DH_G16_SHA512,
            kex::DH_G14_SHA256,
            kex::EXTENSION_SUPPORT_AS_SERVER,
            kex::EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER,
        ]),
        cipher: std::borrow::Cow::Owned(vec![
            cipher::CHACHA20_POLY1305,
            cipher::AES_128_GCM,
            cipher::AES_256_GCM,
            cipher::AES_128_CTR,
            cipher::AES_192_CTR,
            cipher::AES_256_CTR,
        ]),
        ..Default::default()
    };
    let mut methods = MethodSet::empty();
    methods.push(MethodKind::PublicKey);
    if settings.password_passthrough {
        methods.push(MethodKind::Password);
    }
    server::Config {
        server_id: russh::SshId::Standard(
            format!("SSH-2.0-poolgate_{}", env!("CARGO_PKG_VERSION")).into(),
        ),
        methods,
        // russh would wait this long before every refusal, a refused key offer included:
        // OpenSSH offers each key it has in turn, so a user whose authorized key came third
        // waited 2 s per login. Offers are answered at once, as OpenSSH's sshd does (a key
        // cannot be guessed); the refusals that can be guessed at, passwords, wait
        // `front::REFUSED_LOGIN_DELAY` in the handler instead.
        auth_rejection_time: Duration::ZERO,
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: host_keys,
        // Small per-channel queue: user data beyond it waits in the buffers of `relay`, counted.
        channel_buffer_size: 8,
        preferred,
        max_auth_attempts: 6,
        inactivity_timeout: settings.idle_timeout,
        keepalive_interval: Some(settings.client_alive.0),
        keepalive_max: settings.client_alive.1,
        nodelay: true,
        ..Default::default()
    }
}

impl SshGateway {
    /// Builds the frontend.
    pub fn new(parts: SshGatewayParts) -> Arc<Self> {
        let server_config = server_config(parts.host_keys, &parts.settings);
        let window_size = server_config.window_size;
        let client_config = backend::client_config(parts.host_policy.wants_certificates());
        Arc::new(Self {
            unauthenticated: penalty::UnauthSlots::new(parts.settings.max_unauthenticated),
            server_config: Arc::new(server_config),
            settings: parts.settings,
            user_auth: parts.user_auth,
            ca: parts.ca,
            host_policy: std::sync::RwLock::new(Arc::new(parts.host_policy)),
            client_config: Arc::new(client_config),
            pool: parts.pool,
            on_vm_failure: parts.on_vm_failure,
            on_auth_failure: parts.on_auth_failure,
            metrics: parts.metrics,
            wake: parts.wake,
            affinity: parts.affinity,
            vm_down: parts.vm_down,
            window_size,
            connections: dashmap::DashMap::new(),
            next_connection: std::sync::atomic::AtomicU64::new(1),
            penalties: penalty::Penalties::default(),
            password_waits: dashmap::DashSet::new(),
        })
    }

    /// The VM host-key trust in force.
    pub fn host_policy(&self) -> Arc<HostKeyPolicy> {
        match self.host_policy.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the VM host-key trust (config reload: new VMs in known_hosts).
    pub fn set_host_policy(&self, policy: HostKeyPolicy) {
        if let Ok(mut current) = self.host_policy.write() {
            *current = Arc::new(policy);
        }
    }

    /// User connections currently open.
    pub fn live_connections(&self) -> usize {
        self.connections.len()
    }

    /// Disconnects every open user connection with `message` (end of a graceful shutdown).
    pub async fn disconnect_all(&self, message: &str) {
        let handles: Vec<server::Handle> =
            self.connections.iter().map(|e| e.value().clone()).collect();
        for handle in handles {
            let _ = handle
                .disconnect(
                    russh::Disconnect::ByApplication,
                    message.into(),
                    "en".into(),
                )
                .await;
        }
    }

    pub(crate) fn auth_failed(&self, method: &str, peer: SocketAddr) {
        (self.on_auth_failure)(method, peer);
    }

    /// A connection ended without logging in after trying: counts towards the address's penalty.
    pub(crate) fn login_failed(&self, peer: SocketAddr) {
        if let Some(penalty) = self.penalties.failure(peer.ip(), std::time::Instant::now()) {
            tracing::warn!(
                client = %peer.ip(),
                penalty_s = penalty.as_secs(),
                "too many failed logins from this address; refusing its connections for a while"
            );
        }
    }

    /// Accepts connections until `shutdown` turns true.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut count: u32 = 0;
        let drops = Arc::new(DropReport::default());
        let mut report = tokio::time::interval(DROP_REPORT_EVERY);
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "SSH accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = shutdown.changed() => {
                    if *shutdown.borrow() {
                        return;
                    }
                    continue;
                }
                _ = report.tick() => {
                    drops.flush(self.settings.max_unauthenticated, self.unauthenticated.share());
                    continue;
                }
            };
            count = count.wrapping_add(1);
            if count.is_multiple_of(256) {
                self.penalties.expire(std::time::Instant::now());
            }
            let _ = stream.set_nodelay(true);
            if !self.settings.proxy_protocol {
                let Some(permit) = self.admit(peer, None, &drops) else {
                    continue;
                };
                let span = connection_span(peer);
                let connection = self
                    .clone()
                    .handle_connection(stream, peer, permit, span.clone());
                tokio::spawn(connection.instrument(span));
                continue;
            }
            // The client is known once the balancer's header is read, in the connection's own
            // task; until then it holds a slot of the global limit, so connections stalled
            // before their header are bounded like those stalled in the handshake.
            let global = match self.unauthenticated.acquire_unnamed() {
                Ok(global) => global,
                Err(why) => {
                    self.dropped(peer, why, &drops);
                    continue;
                }
            };
            let (gateway, drops, stopping) = (self.clone(), drops.clone(), shutdown.clone());
            tokio::spawn(async move {
                let mut stream = stream;
                let client = match crate::proxy_header::read(&mut stream).await {
                    Ok(proxied) => proxied.map_or(peer, |p| p.client),
                    Err(e) => {
                        crate::proxy_header::refused("ssh", peer, &e);
                        return;
                    }
                };
                // The gateway began to stop while the header came: as for a connection
                // accepted after the listener closed, there is no session to start.
                if *stopping.borrow() {
                    return;
                }
                let Some(permit) = gateway.admit(client, Some(global), &drops) else {
                    return;
                };
                let span = connection_span(client);
                let connection = gateway.handle_connection(stream, client, permit, span.clone());
                connection.instrument(span).await;
            });
        }
    }

    /// Lets a connection from `client` in, or says why not: an address in the penalty box, the
    /// limit of connections still authenticating, or the address's share of it (`global`: the
    /// slot of the limit it holds already).
    fn admit(
        &self,
        client: SocketAddr,
        global: Option<tokio::sync::OwnedSemaphorePermit>,
        drops: &DropReport,
    ) -> Option<penalty::UnauthPermit> {
        if let Some(left) = self
            .penalties
            .blocked_for(client.ip(), std::time::Instant::now())
        {
            tracing::debug!(client = %client, left_s = left.as_secs(), "address in the login penalty box; dropped");
            drops.penalty.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let permit = match global {
            Some(global) => self.unauthenticated.name(global, client.ip()),
            None => self.unauthenticated.acquire(client.ip()),
        };
        permit.map_err(|why| self.dropped(client, why, drops)).ok()
    }

    /// A connection closed at once (no banner) for the limit of connections still
    /// authenticating. Logged once a burst, then summed up every [`DROP_REPORT_EVERY`], so a
    /// flood cannot flood the log too.
    fn dropped(&self, client: SocketAddr, why: penalty::NoSlot, drops: &DropReport) {
        if drops.is_quiet() {
            tracing::warn!(client = %client, limit = self.settings.max_unauthenticated,
                per_address = self.unauthenticated.share(), reason = ?why,
                "too many connections still authenticating (ssh.max_unauthenticated); dropping");
        }
        match why {
            penalty::NoSlot::Full => drops.full.fetch_add(1, Ordering::Relaxed),
            penalty::NoSlot::AddressShare => drops.per_address.fetch_add(1, Ordering::Relaxed),
        };
    }

    async fn handle_connection(
        self: Arc<Self>,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
        permit: penalty::UnauthPermit,
        span: tracing::Span,
    ) {
        let (authed_tx, mut authed_rx) = watch::channel(false);
        let handler = Front::new(self.clone(), peer, permit, authed_tx, span);
        let grace = self.settings.login_grace;
        let deadline = tokio::time::Instant::now() + grace;
        // russh runs the session in a task of its own that outlives this function: `cut` is how
        // this function closes the socket under it (dropped with this function, so always).
        let (cut, stream) = Cuttable::new(stream);
        // The handshake's state is boxed, and freed once it is done: inline, this task (alive
        // as long as the session, mostly idle) would keep room for it (about 1 KiB).
        let handshake = Box::pin(server::run_stream(
            self.server_config.clone(),
            stream,
            handler,
        ));
        let session = match tokio::time::timeout(grace, handshake).await {
            Ok(Ok(session)) => session,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "SSH handshake failed");
                return;
            }
            Err(_) => {
                tracing::info!("no SSH handshake within ssh.login_grace; closed");
                return;
            }
        };
        let handle = session.handle();
        let id = self
            .next_connection
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.connections.insert(id, handle.clone());
        // Unregisters however this function ends.
        let _registered = scopeguard(|| {
            self.connections.remove(&id);
        });
        tokio::pin!(session);
        let grace_timer = tokio::time::sleep_until(deadline);
        tokio::pin!(grace_timer);
        let result = loop {
            tokio::select! {
                r = &mut session => break r,
                _ = &mut grace_timer, if !*authed_rx.borrow() => {
                    tracing::info!("not authenticated within ssh.login_grace; disconnecting");
                    // Say why when the session can still send it; a client stalled in the key
                    // exchange gets no message, and the socket is closed under the session.
                    let polite = async {
                        let _ = handle
                            .disconnect(russh::Disconnect::ByApplication, "login grace time exceeded".into(), "en".into())
                            .await;
                        let _ = (&mut session).await;
                    };
                    // Boxed: rare, and inline it would size the task for it.
                    let _ = tokio::time::timeout(DISCONNECT_GRACE, Box::pin(polite)).await;
                    drop(cut);
                    break Ok(());
                }
                changed = authed_rx.changed(), if !*authed_rx.borrow() => {
                    if changed.is_err() {
                        // The handler is gone; the session future finishes next.
                        break (&mut session).await;
                    }
                }
            }
        };
        match result {
            // The client's machine went away without closing (a laptop put to sleep, a network
            // cut): say so, or the session's end has no reason in the log.
            Err(russh::Error::KeepaliveTimeout) => tracing::info!(
                "the client stopped answering keepalives (its machine asleep or cut off); connection closed"
            ),
            Err(e) => tracing::debug!(error = %e, "SSH connection ended with an error"),
            Ok(()) => {}
        }
    }
}

/// The span of one user connection, entered by its handler, its VM leg and its relays, so their
/// log lines need not repeat who they are about. It names the client from the start; the user
/// (once logged in), the VM and the pool's session id (once routed) are recorded into it, each
/// once, as the text log appends every record. At ERROR level, so that it is on whenever any
/// line of the SSH frontend is: a `--log warn` keeps the fields on the lines it keeps.
fn connection_span(peer: SocketAddr) -> tracing::Span {
    use tracing::field::Empty;
    tracing::error_span!("ssh", client = %peer, user = Empty, vm = Empty, session = Empty)
}

/// How often connections dropped at accept are summed up in the log.
const DROP_REPORT_EVERY: Duration = Duration::from_secs(10);

/// Connections dropped at accept since the last report (counted by the accept loop, and by
/// the tasks that read a PROXY protocol header first).
#[derive(Debug, Default)]
struct DropReport {
    full: AtomicU64,
    per_address: AtomicU64,
    penalty: AtomicU64,
}

impl DropReport {
    /// Nothing dropped since the last report (the next drop is logged on its own).
    fn is_quiet(&self) -> bool {
        self.full.load(Ordering::Relaxed) + self.per_address.load(Ordering::Relaxed) == 0
    }

    fn flush(&self, limit: usize, share: usize) {
        let full = self.full.swap(0, Ordering::Relaxed);
        let per_address = self.per_address.swap(0, Ordering::Relaxed);
        let penalty = self.penalty.swap(0, Ordering::Relaxed);
        if full + per_address + penalty > 0 {
            tracing::warn!(
                over_limit = full,
                over_address_share = per_address,
                penalty_box = penalty,
                limit,
                per_address = share,
                "SSH connections dropped at accept in the last {} s",
                DROP_REPORT_EVERY.as_secs()
            );
        }
    }
}

/// How long a session past `ssh.login_grace` may take to send its disconnect message before its
/// socket is closed under it.
const DISCONNECT_GRACE: Duration = Duration::from_millis(250);

/// A client stream that [`handle_connection`](SshGateway::handle_connection) can close while
/// russh's detached session task still holds it: once the [`Cut`] is dropped, reads see EOF and
/// writes fail, so the session task ends and the socket is closed.
struct Cuttable<S> {
    inner: S,
    cut: Option<tokio::sync::oneshot::Receiver<()>>,
}

/// Dropping it cuts the paired [`Cuttable`].
struct Cut(#[allow(dead_code)] tokio::sync::oneshot::Sender<()>);

impl<S> Cuttable<S> {
    fn new(inner: S) -> (Cut, Self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (
            Cut(tx),
            Self {
                inner,
                cut: Some(rx),
            },
        )
    }

    /// True once cut; registers the waker otherwise.
    fn is_cut(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        let Some(rx) = self.cut.as_mut() else {
            return true;
        };
        // The sender is never used to send: completion means it was dropped.
        if std::pin::Pin::new(rx).poll(cx).is_ready() {
            self.cut = None;
            return true;
        }
        false
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Cuttable<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.is_cut(cx) {
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Cuttable<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.is_cut(cx) {
            return std::task::Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
        }
        std::pin::Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Runs `f` when dropped.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
