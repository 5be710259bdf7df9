//! HTTP(S) frontend for JupyterHub pools: TLS termination, signed sticky sessions, websockets.
//!
//! - [`Frontend`]: the request handler, built by a constructor so tests drive it without a
//!   socket ([`Frontend::handle`]); `proxy.rs` holds the routing and forwarding.
//! - [`HttpService::build`]: every part (settings, cookie secret, TLS) built and checked before
//!   any port is bound; [`serve`]: the listeners (`listen.http`, `listen.https`), connection
//!   limits and timeouts.
//! - `cookie.rs` (HMAC sticky cookie), `headers.rs` (forwarding and hop-by-hop headers),
//!   `tls.rs` (rustls config with a reloadable certificate), `errors.rs` (error pages),
//!   `upgrade.rs` (websocket relay).

mod body;
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
use hyper_util::server::conn::auto;
use router_core::Pool;
use std::path::PathBuf;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use crate::health::FailureHook;
use crate::metrics::Metrics;

pub use body::ConnTracker;
pub use cookie::CookieSigner;
pub use proxy::{ConnInfo, Frontend, FrontendSettings};

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
    /// The certificate and key of the HTTPS listener; `None` when there is none.
    pub tls: Option<TlsFiles>,
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
    /// How long open connections may finish at shutdown (`gateway.shutdown_grace`).
    pub shutdown_grace: Duration,
}

/// The files of the HTTPS listener's certificate (`[tls]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain (`tls.cert`).
    pub cert: PathBuf,
    /// PEM private key (`tls.key`).
    pub key: PathBuf,
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
/// Time allowed for a TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// A new connection must send the complete headers of its first request within this (or
/// `http.idle_timeout` when shorter), as nginx's `client_header_timeout`: a slowloris client
/// holds a connection for a minute, not for the 5-minute keep-alive idle time. Later requests
/// on the connection have `http.idle_timeout` (hyper's header-read timeout).
const FIRST_REQUEST_WITHIN: Duration = Duration::from_secs(60);
/// While `http.max_connections` stays reached, the warning is repeated this often.
const FULL_WARN_EVERY: Duration = Duration::from_secs(60);
/// How often idle upstream keep-alive connections are checked for a close by the VM and for
/// `upstream_idle`.
const UPSTREAM_SWEEP_EVERY: Duration = Duration::from_secs(5);

/// The TLS side of `listen.https`: the acceptor and the reloadable certificate behind it.
pub struct TlsParts {
    acceptor: TlsAcceptor,
    certs: Arc<tls::CertReloader>,
}

impl TlsParts {
    /// Loads `tls.cert` and `tls.key` as the HTTPS listener serves them; `None` when no HTTPS
    /// listener is configured. Reads the files, writes nothing, so `check-config` runs it too.
    /// Errors name the key and file at fault.
    pub fn load(files: Option<&TlsFiles>) -> anyhow::Result<Option<Self>> {
        let Some(files) = files else {
            return Ok(None);
        };
        let certs = tls::CertReloader::load(&files.cert, &files.key)?;
        let acceptor = TlsAcceptor::from(Arc::new(tls::server_config(certs.clone())?));
        Ok(Some(Self { acceptor, certs }))
    }
}

/// The HTTP frontend with every part built and checked ([`HttpService::build`]), before any
/// port is bound; [`serve`] runs it on the listeners.
pub struct HttpService {
    pool: Arc<Pool>,
    frontend: Frontend,
    tls: Option<TlsParts>,
    tls_reload: Option<Arc<tokio::sync::Notify>>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    idle_timeout: Duration,
    /// How often idle browser sessions and lapsed tentative browsers are dropped.
    expire_every: Duration,
    max_connections: usize,
    shutdown_grace: Duration,
}

impl HttpService {
    /// Loads (or creates) the cookie secret and loads the TLS certificate and key. Fails with
    /// the key and file at fault and what to do.
    pub fn build(parts: HttpParts) -> anyhow::Result<Self> {
        let settings = &parts.settings;
        // Read-only checks first: a failed start creates no cookie secret.
        let tls = TlsParts::load(settings.tls.as_ref())?;
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
        let frontend = Frontend::new(
            settings.frontend.clone(),
            parts.pool.clone(),
            parts.metrics.clone(),
            parts.on_vm_failure.clone(),
            signer,
        )
        .with_wake(parts.wake.clone());
        Ok(Self {
            pool: parts.pool,
            frontend,
            tls,
            tls_reload: parts.tls_reload,
            builder: Arc::new(connection_builder(
                settings.max_header_bytes,
                settings.idle_timeout,
            )),
            idle_timeout: settings.idle_timeout,
            // Often enough that tentative browsers stop counting soon after `tentative_for`.
            expire_every: (settings.session_idle / 10)
                .min(settings.tentative_for / 2)
                .clamp(Duration::from_secs(1), Duration::from_secs(30)),
            max_connections: settings.max_connections,
            shutdown_grace: settings.shutdown_grace,
        })
    }
}

/// Serves `listen.http` (unless it is `"off"`) and `listen.https` (when `[tls]` is set) until
/// `shutdown` turns true.
pub async fn serve(
    service: HttpService,
    http: Option<TcpListener>,
    https: Option<TcpListener>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let HttpService {
        pool,
        frontend,
        tls,
        tls_reload,
        builder,
        idle_timeout,
        expire_every,
        max_connections,
        shutdown_grace,
    } = service;
    let tls = match (tls, &https) {
        (Some(tls), Some(_)) => Some(tls),
        _ => None,
    };
    let https_port = https
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map(|a| a.port());

    let mut tasks = JoinSet::new();
    // Browser sessions stop counting as load after `session_idle` without a request.
    // Idle upstream keep-alive connections are checked every few seconds: the VM may have
    // closed them (they would sit in CLOSE_WAIT until then) or they outlived `upstream_idle`.
    {
        let pool = pool.clone();
        let frontend = frontend.clone();
        let every = expire_every;
        let mut shutdown = shutdown.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(every);
            let mut upstream_tick = tokio::time::interval(UPSTREAM_SWEEP_EVERY);
            loop {
                tokio::select! {
                    _ = tick.tick() => { pool.expire_idle(); }
                    _ = upstream_tick.tick() => frontend.close_idle_upstreams(),
                    r = shutdown.changed() => if r.is_err() || *shutdown.borrow() { break },
                }
            }
        });
    }
    if let Some(TlsParts { certs, .. }) = &tls {
        let certs = certs.clone();
        let mut shutdown = shutdown.clone();
        let asked = tls_reload.unwrap_or_default();
        tasks.spawn(async move {
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
        });
    }

    let redirect_to = if tls.is_some() { https_port } else { None };
    if let Some(http) = &http {
        tracing::info!(
            addr = %http.local_addr()?,
            mode = if redirect_to.is_some() { "redirect to https" } else { "proxy" },
            "HTTP listener ready"
        );
    }
    if let Some(l) = &https {
        tracing::info!(addr = %l.local_addr()?, "HTTPS listener ready");
    }
    let plain = http.map(|listener| Listener {
        listener,
        tls: None,
        redirect_to,
    });
    let secure = match (https, tls) {
        (Some(listener), Some(TlsParts { acceptor, .. })) => Some(Listener {
            listener,
            tls: Some(acceptor),
            redirect_to: None,
        }),
        _ => None,
    };
    let mut conns = JoinSet::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let mut full_warned: Option<tokio::time::Instant> = None;
    loop {
        // At http.max_connections, stop accepting: new clients wait in the listen backlog (and
        // their own connect timeout) until a connection closes, as nginx's worker_connections.
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if full_warned.is_none_or(|at| at.elapsed() >= FULL_WARN_EVERY) {
                    full_warned = Some(tokio::time::Instant::now());
                    tracing::warn!(
                        max_connections,
                        "HTTP connection limit reached (http.max_connections); new connections \
                         wait until one closes"
                    );
                }
                tokio::select! {
                    slot = slots.clone().acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => break,
                    },
                    r = shutdown.changed() => {
                        if r.is_err() || *shutdown.borrow() { break }
                        continue;
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => continue,
                }
            }
        };
        let accepted = tokio::select! {
            a = accept_opt(plain.as_ref()) => a,
            a = accept_opt(secure.as_ref()) => a,
            r = shutdown.changed() => {
                if r.is_err() || *shutdown.borrow() { break }
                continue;
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let ((stream, peer), listener) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("HTTP accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let local_port = stream.local_addr().map(|a| a.port()).unwrap_or(0);
        let info = ConnInfo {
            client: peer,
            https: listener.tls.is_some(),
            port: local_port,
        };
        let frontend = frontend.clone();
        let builder = builder.clone();
        let shutdown = shutdown.clone();
        let tls = listener.tls.clone();
        let redirect_to = listener.redirect_to;
        let span = tracing::info_span!("http", client.addr = %peer);
        conns.spawn(
            async move {
                let _slot = slot;
                match tls {
                    Some(acceptor) => {
                        let stream = match tokio::time::timeout(
                            TLS_HANDSHAKE_TIMEOUT,
                            acceptor.accept(stream),
                        )
                        .await
                        {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!("TLS handshake failed: {e}");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!("TLS handshake timed out");
                                return;
                            }
                        };
                        serve_connection(
                            stream,
                            frontend,
                            info,
                            None,
                            &builder,
                            idle_timeout,
                            shutdown,
                        )
                        .await;
                    }
                    None => {
                        serve_connection(
                            stream,
                            frontend,
                            info,
                            redirect_to,
                            &builder,
                            idle_timeout,
                            shutdown,
                        )
                        .await
                    }
                }
            }
            .instrument(span),
        );
    }
    drop(plain);
    drop(secure);
    // Open connections were told to finish (see serve_connection); give them the grace time.
    let _ = tokio::time::timeout(shutdown_grace, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    conns.abort_all();
    tasks.abort_all();
    Ok(())
}

struct Listener {
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    /// Plain listener while TLS is configured: redirect to this HTTPS port.
    redirect_to: Option<u16>,
}

async fn accept_opt(
    l: Option<&Listener>,
) -> std::io::Result<((tokio::net::TcpStream, SocketAddr), &Listener)> {
    match l {
        Some(l) => l.listener.accept().await.map(|a| (a, l)),
        None => std::future::pending().await,
    }
}

/// The hyper connection builder with `[http]` limits: header block size (`max_header_bytes`,
/// at least 8 KiB), header read timeout (`idle_timeout`), HTTP/2 header list size, keep-alive
/// pings.
pub fn connection_builder(
    max_header_bytes: usize,
    idle_timeout: Duration,
) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    let max_header = max_header_bytes.max(8192);
    b.http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        // Also closes keep-alive connections that send no new request within this time.
        .header_read_timeout(idle_timeout)
        .max_buf_size(max_header);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(max_header).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .max_concurrent_streams(Some(256));
    b
}

/// Serves one client connection (plain or TLS) until it closes, it is idle for `idle_timeout`
/// or the gateway shuts down.
async fn serve_connection<I>(
    io: I,
    frontend: Frontend,
    info: ConnInfo,
    redirect_to: Option<u16>,
    builder: &auto::Builder<TokioExecutor>,
    idle_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let tracker = ConnTracker::new();
    let svc_tracker = tracker.clone();
    let svc = service_fn(move |req: Request<Incoming>| {
        let frontend = frontend.clone();
        let active = svc_tracker.begin();
        async move {
            let resp = match redirect_to {
                Some(port) => redirect_to_https(&req, port),
                // Boxed: the handler's future is a few KiB, and hyper moves the service's
                // future (this block) by value; a pointer is cheaper to move than the state.
                None => Box::pin(frontend.handle(req, info)).await,
            };
            Ok::<_, Infallible>(active.attach(resp))
        }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let check_every = (idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(15));
    let mut tick = tokio::time::interval(check_every);
    let first_request = tokio::time::sleep(FIRST_REQUEST_WITHIN.min(idle_timeout));
    tokio::pin!(first_request);
    let mut closing = false;
    loop {
        tokio::select! {
            _ = &mut first_request, if !tracker.has_started() => {
                // Dropping the connection closes it: nothing of a request has been answered.
                tracing::debug!("no complete request headers within {:?} of connecting; closed",
                    FIRST_REQUEST_WITHIN.min(idle_timeout));
                return;
            }
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!("connection ended: {e}");
                }
                return;
            }
            _ = tick.tick(), if !closing => {
                if tracker.idle_for().is_some_and(|d| d >= idle_timeout) {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
            r = shutdown.changed(), if !closing => {
                if r.is_err() || *shutdown.borrow() {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// `listen.http` while TLS is configured: a 308 to the same path on the HTTPS port.
fn redirect_to_https<B>(req: &Request<B>, https_port: u16) -> Response<Body> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host())
        .map(strip_port);
    let Some(host) = host.filter(|h| !h.is_empty()) else {
        return errors::GatewayError::Refused {
            status: StatusCode::BAD_REQUEST,
            detail: "a Host header is required".into(),
        }
        .response(req.headers());
    };
    let port = if https_port == 443 {
        String::new()
    } else {
        format!(":{https_port}")
    };
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = format!("https://{host}{port}{path}");
    let mut resp = Response::new(full(format!("Moved to {location}\n")));
    *resp.status_mut() = StatusCode::PERMANENT_REDIRECT;
    match HeaderValue::from_str(&location) {
        Ok(v) => {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        Err(_) => *resp.status_mut() = StatusCode::BAD_REQUEST,
    }
    resp
}

/// `host` without a `:port` suffix (keeps IPv6 brackets).
fn strip_port(host: &str) -> &str {
    if let Some(end) = host.strip_prefix('[').and_then(|h| h.find(']')) {
        return &host[..end + 2];
    }
    match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

#[cfg(test)]
mod tests;
