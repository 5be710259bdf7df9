//! HTTP(S) frontend for JupyterHub pools: TLS termination, signed sticky sessions, websockets.
//!
//! - [`Frontend`]: the request handler, built by a constructor so tests drive it without a
//!   socket ([`Frontend::handle`]); `proxy.rs` holds the routing and forwarding.
//! - [`HttpService::build`]: every part (settings, cookie secret, TLS) built and checked before
//!   any port is bound; [`serve`]: the listeners (`listen.http`, `listen.https`), connection
//!   limits and timeouts.
//! - `cookie.rs` (HMAC sticky cookie), `headers.rs` (forwarding and hop-by-hop headers),
//!   `tls.rs` (rustls config with a swappable certificate), `acme/` (certificates from an ACME
//!   CA, HTTP-01 answered on the plain listener), `errors.rs` (error pages),
//!   `upgrade.rs` (websocket relay).

pub mod access_log;
pub mod acme;
mod body;
mod conn;
pub mod cookie;
pub mod errors;
pub mod headers;
mod proxy;
mod relay;
pub mod tls;
mod upgrade;
mod upstream;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use router_core::Pool;
use std::path::PathBuf;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::health::FailureHook;
use crate::metrics::Metrics;

pub use body::ConnTracker;
pub use conn::{Builders, connection_builders};
#[cfg(test)]
use conn::{FIRST_REQUEST_WITHIN, Plain, plain_connection, redirect_to_https, strip_port};
use conn::{Served, accept, listeners};
pub use cookie::CookieSigner;
pub use proxy::{ClientConn, ConnInfo, Frontend, FrontendSettings};

/// Errors carried by response and request bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every response the frontend produces (streamed from the VM, or a page).
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A complete body.
pub fn full(data: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(data.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty() -> Body {
    full(Bytes::new())
}

/// The HTTP side's settings, mapped from the configuration by the composition root.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Routing, cookie and upstream settings of the proxy.
    pub frontend: FrontendSettings,
    /// Where the HTTPS listener's certificate comes from; `None` when there is no HTTPS.
    pub tls: Option<TlsSource>,
    /// Where the cookie secret is read from, or created when missing (`http.cookie_secret_file`).
    pub cookie_secret_file: PathBuf,
    /// How long a sticky cookie stays valid (`routing.affinity_ttl`).
    pub cookie_max_age: Duration,
    /// Idle time after which a client connection is closed (`http.idle_timeout`).
    pub idle_timeout: Duration,
    /// Largest request header block (`http.max_header_bytes`).
    pub max_header_bytes: usize,
    /// A browser without requests for this long stops counting as a session
    /// (`http.session_idle`).
    pub session_idle: Duration,
    /// How long a new browser's first cookie weighs as tentative load (`http.tentative_for`).
    pub tentative_for: Duration,
    /// Most client connections at once (`http.max_connections`).
    pub max_connections: usize,
    /// `listen.proxy_protocol`: each connection starts with a PROXY protocol header naming
    /// the client.
    pub proxy_protocol: bool,
    /// How long open connections may finish at shutdown (`gateway.shutdown_grace`).
    pub shutdown_grace: Duration,
    /// Where the line per request goes (`http.access_log`).
    pub access_log: AccessLogTo,
}

/// Destination of the access log (`http.access_log`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTo {
    /// Standard error, while the log filter lets the access log's target through.
    Stderr,
    /// No access log.
    Off,
    /// Appended to this file.
    File(PathBuf),
}

/// The files of the HTTPS listener's certificate (`[tls]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain (`tls.cert`).
    pub cert: PathBuf,
    /// PEM private key (`tls.key`).
    pub key: PathBuf,
}

/// Where the HTTPS listener's certificate comes from (`[tls]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSource {
    /// `tls.cert` and `tls.key`, re-read when they change.
    Files(TlsFiles),
    /// `tls.acme_domains`: ordered and renewed from an ACME CA.
    Acme(acme::AcmeSettings),
}

/// What the HTTP frontend needs from the rest of the gateway.
pub struct HttpParts {
    /// Its settings.
    pub settings: HttpSettings,
    /// The pool.
    pub pool: Arc<Pool>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Passive health feedback: a request could not reach the VM.
    pub on_vm_failure: FailureHook,
    /// Autoscaler to wake when no VM can take a request (wake-on-connect): the 503 page then
    /// keeps the browser retrying while the pool starts.
    pub wake: Option<crate::wake::Waker>,
    /// Notified on SIGHUP: re-read the TLS certificate and key now (not only when the periodic
    /// check sees the files change).
    pub tls_reload: Option<Arc<tokio::sync::Notify>>,
}

/// How often the TLS certificate files are checked for renewal.
const CERT_RELOAD_EVERY: Duration = Duration::from_secs(30);
/// How often idle upstream keep-alive connections are checked for a close by the VM and for
/// `upstream_idle`.
const UPSTREAM_SWEEP_EVERY: Duration = Duration::from_secs(5);

/// TCP keepalive on every client and VM connection: first probe after this long without
/// traffic, then every [`KEEPALIVE_INTERVAL`], given up after [`KEEPALIVE_PROBES`] unanswered.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_PROBES: u32 = 3;

/// Turns TCP keepalive on for `stream`, so that a peer gone without closing (a VM whose host
/// was lost or cut off, a laptop that went to sleep) is noticed after about a minute without
/// traffic. An idle websocket only ever waits to read: without keepalive it, and the session
/// it holds on its VM, would stay until the gateway restarts. The kernel sends the probes, and
/// only while the connection is idle. The SSH side has the same from its own keepalives.
fn tcp_keepalive(stream: &tokio::net::TcpStream) {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        tracing::debug!("TCP keepalive: {e}");
    }
}

/// On VM connections: how long data the gateway sent may stay unacknowledged before the
/// connection ends (`TCP_USER_TIMEOUT`). Keepalive's own bound, 30 s + 3 × 10 s, for the case
/// keepalive cannot cover: it probes only an idle connection, and a message sent to a VM lost
/// without a word (a browser running a cell, typing in a terminal, uploading a file) would be
/// retransmitted for about 15 minutes (`tcp_retries2`) before the websocket or request failed.
/// With the option set, Linux also ends an idle connection whose probes go unanswered once
/// this long has passed since the VM was last heard, which is what keepalive does anyway.
///
/// A VM paused for host maintenance (up to about 30 s on Azure) keeps its connections. One
/// that reads nothing the gateway sends for this long (a zero window: its web server stuck for
/// a minute) loses that connection. Client connections do not get it: a browser that pauses a
/// download stops reading, and that is no reason to cut it.
const VM_USER_TIMEOUT: Duration = Duration::from_secs(60);
const _: () = assert!(
    VM_USER_TIMEOUT.as_secs()
        == KEEPALIVE_IDLE.as_secs() + KEEPALIVE_INTERVAL.as_secs() * KEEPALIVE_PROBES as u64
);

/// Sets [`VM_USER_TIMEOUT`] on a VM connection.
fn vm_user_timeout(stream: &tokio::net::TcpStream) {
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_user_timeout(Some(VM_USER_TIMEOUT)) {
        tracing::debug!("TCP user timeout: {e}");
    }
}

/// The TLS side of `listen.https`: the acceptor and the swappable certificate behind it.
pub struct TlsParts {
    acceptor: TlsAcceptor,
    renewal: Renewal,
}

/// What keeps the served certificate current.
enum Renewal {
    /// Re-reads `tls.cert`/`tls.key` when they change.
    Files(Arc<tls::CertReloader>),
    /// Orders and renews from the ACME CA; answers HTTP-01 on the plain listener.
    Acme(Arc<acme::Acme>),
}

impl TlsParts {
    /// Loads the HTTPS listener's certificate: `tls.cert` and `tls.key`, or with ACME a valid
    /// cached certificate (none yet is fine) and `tls.acme_directory_ca`. `None` when no HTTPS
    /// listener is configured. Reads files, writes nothing, so `check-config` runs it too.
    /// Errors name the key and file at fault. `not_after` is told the served certificate's
    /// expiry (`poolgate_tls_cert_expiry_seconds`).
    pub fn load(
        source: Option<&TlsSource>,
        not_after: crate::metrics::TlsNotAfter,
    ) -> anyhow::Result<Option<Self>> {
        let Some(source) = source else {
            return Ok(None);
        };
        let (served, renewal) = match source {
            TlsSource::Files(files) => {
                let served = tls::ServedCert::new("file", not_after);
                let certs = tls::CertReloader::load(&files.cert, &files.key, served.clone())?;
                (served, Renewal::Files(certs))
            }
            TlsSource::Acme(settings) => {
                let served = tls::ServedCert::new("acme", not_after);
                let acme = acme::Acme::new(settings.clone(), served.clone())?;
                (served, Renewal::Acme(acme))
            }
        };
        let acceptor = TlsAcceptor::from(Arc::new(tls::server_config(served)?));
        Ok(Some(Self { acceptor, renewal }))
    }

    /// The HTTP-01 answers the plain listener serves (ACME only).
    fn challenges(&self) -> Option<Arc<acme::Challenges>> {
        match &self.renewal {
            Renewal::Acme(acme) => Some(acme.challenges()),
            Renewal::Files(_) => None,
        }
    }
}

/// The HTTP frontend with every part built and checked ([`HttpService::build`]), before any
/// port is bound; [`serve`] runs it on the listeners.
pub struct HttpService {
    pool: Arc<Pool>,
    frontend: Frontend,
    tls: Option<TlsParts>,
    tls_reload: Option<Arc<tokio::sync::Notify>>,
    builders: Arc<Builders>,
    idle_timeout: Duration,
    /// How often idle browser sessions and lapsed tentative browsers are dropped.
    expire_every: Duration,
    max_connections: usize,
    proxy_protocol: bool,
    shutdown_grace: Duration,
}

impl HttpService {
    /// Loads (or creates) the cookie secret and loads the TLS certificate and key. Fails with
    /// the key and file at fault and what to do.
    pub fn build(parts: HttpParts) -> anyhow::Result<Self> {
        let settings = &parts.settings;
        // Read-only checks first: a failed start creates no cookie secret.
        let tls = TlsParts::load(settings.tls.as_ref(), parts.metrics.tls_not_after.clone())?;
        let secret = &settings.cookie_secret_file;
        let (signer, generated) = CookieSigner::load_or_generate(secret, settings.cookie_max_age)
            .map_err(|e| match e {
            crate::secrets::SecretFileError::Io { .. } => anyhow::anyhow!(
                "http.cookie_secret_file: {e} (poolgate reads the cookie secret from this \
                         file, or creates it when it is missing: fix the path, or let the user \
                         poolgate runs as read and write it)"
            ),
            other => anyhow::anyhow!("http.cookie_secret_file: {other}"),
        })?;
        if generated {
            tracing::info!(path = %secret.display(), "generated a new cookie secret");
        }
        let dropped = parts.metrics.access_log_dropped_total.clone();
        let access_log = match &settings.access_log {
            AccessLogTo::Off => None,
            // Standard error closed or unusable: no access log there, as before (the log's own
            // lines are lost the same way); not a reason to refuse to start.
            AccessLogTo::Stderr => access_log::AccessLog::stderr(dropped).unwrap_or_else(|e| {
                tracing::warn!("http.access_log: cannot write to stderr ({e}); no access log");
                None
            }),
            AccessLogTo::File(path) => {
                Some(access_log::AccessLog::file(path, dropped).map_err(|e| {
                    anyhow::anyhow!(
                        "http.access_log: cannot open {} for appending: {e} (fix the path, let \
                         the user poolgate runs as write there, or set access_log = \"off\")",
                        path.display()
                    )
                })?)
            }
        };
        let frontend = Frontend::new(
            settings.frontend.clone(),
            parts.pool.clone(),
            parts.metrics.clone(),
            parts.on_vm_failure.clone(),
            signer,
        )
        .with_wake(parts.wake.clone())
        .with_access_log(access_log);
        Ok(Self {
            pool: parts.pool,
            frontend,
            tls,
            tls_reload: parts.tls_reload,
            builders: Arc::new(connection_builders(settings.max_header_bytes)),
            idle_timeout: settings.idle_timeout,
            // Often enough that tentative browsers stop counting soon after `tentative_for`.
            expire_every: (settings.session_idle / 10)
                .min(settings.tentative_for / 2)
                .clamp(Duration::from_secs(1), Duration::from_secs(30)),
            max_connections: settings.max_connections,
            proxy_protocol: settings.proxy_protocol,
            shutdown_grace: settings.shutdown_grace,
        })
    }
}

/// Serves `listen.http` (unless it is `"off"`) and `listen.https` (when `[tls]` is set) until
/// `shutdown` turns true, then gives open connections `shutdown_grace` to finish.
pub async fn serve(
    service: HttpService,
    http: Option<TcpListener>,
    https: Option<TcpListener>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let HttpService {
        pool,
        frontend,
        tls,
        tls_reload,
        builders,
        idle_timeout,
        expire_every,
        max_connections,
        proxy_protocol,
        shutdown_grace,
    } = service;
    let tls = tls.filter(|_| https.is_some());
    let mut housekeeping = JoinSet::new();
    housekeeping.spawn(sweep(
        pool,
        frontend.clone(),
        expire_every,
        shutdown.clone(),
    ));
    match tls.as_ref().map(|t| &t.renewal) {
        Some(Renewal::Files(certs)) => {
            housekeeping.spawn(reload_certificates(
                certs.clone(),
                tls_reload.unwrap_or_default(),
                shutdown.clone(),
            ));
        }
        Some(Renewal::Acme(acme)) => {
            housekeeping.spawn(
                acme.clone()
                    .run(tls_reload.unwrap_or_default(), shutdown.clone()),
            );
        }
        None => {}
    }
    let (plain, secure) = listeners(http, https, tls)?;
    let served = Served {
        frontend,
        builders,
        idle_timeout,
        proxy_protocol,
    };
    let mut conns = accept(plain, secure, served, max_connections, shutdown).await;
    // Open connections were told to finish (see serve_connection); give them the grace time.
    let _ = tokio::time::timeout(shutdown_grace, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    conns.abort_all();
    housekeeping.abort_all();
    Ok(())
}

/// Browser sessions stop counting as load after `session_idle` without a request, or once
/// their VM is down and no websocket holds them (tentative browsers after `tentative_for`);
/// idle upstream keep-alive connections are checked
/// every few seconds: the VM may have closed them (they would sit in CLOSE_WAIT until then) or
/// they outlived `upstream_idle`.
async fn sweep(
    pool: Arc<Pool>,
    frontend: Frontend,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    let mut upstream_tick = tokio::time::interval(UPSTREAM_SWEEP_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => { pool.expire_idle(); }
            _ = upstream_tick.tick() => frontend.close_idle_upstreams(),
            r = shutdown.changed() => if r.is_err() || *shutdown.borrow() { break },
        }
    }
}

/// Re-reads the TLS certificate when its files change (checked every
/// [`CERT_RELOAD_EVERY`]) and at once when `asked` (SIGHUP); a bad new pair keeps the old one.
async fn reload_certificates(
    certs: Arc<tls::CertReloader>,
    asked: Arc<tokio::sync::Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(CERT_RELOAD_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => match certs.reload_if_changed() {
                Ok(true) => tracing::info!("TLS certificate reloaded"),
                Ok(false) => {}
                Err(e) => tracing::warn!("TLS certificate not reloaded, keeping the old one: {e:#}"),
            },
            () = asked.notified() => match certs.reload_now() {
                Ok(()) => tracing::info!("TLS certificate reloaded"),
                Err(e) => tracing::error!("TLS certificate not reloaded, keeping the old one: {e:#}"),
            },
            r = shutdown.changed() => if r.is_err() || *shutdown.borrow() { break },
        }
    }
}

#[cfg(test)]
mod tests;
