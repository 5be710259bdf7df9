//! The request handler: check the request, read the sticky cookie, pick the VM, forward with
//! streamed bodies (or relay an upgrade), retry another VM when one cannot be reached, set or
//! rewrite the cookie, count and log.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Body as HttpBody;
use hyper::header::{self, HeaderValue};
use hyper::http::uri::PathAndQuery;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use router_core::{NoVm, PickRequest, Pool, Protocol, Vm};

use super::body::{Handoff, Observed};
use super::cookie::{CookieSigner, Pin, find_cookie, set_cookie_header};
use super::errors::{GatewayError, wants_json};
use super::headers::{Forwarding, set_forwarding, strip_hop_by_hop, wants_upgrade};
use super::upgrade::{self, UpgradeError};
use super::upstream::{SendError, Upstreams};
use super::{Body, BoxError, empty};
use crate::health::FailureHook;
use crate::metrics::{Metrics, outcome};
use crate::wake::Waker;

/// Frontend settings (from `[http]`; the composition root maps them).
#[derive(Debug, Clone)]
pub struct FrontendSettings {
    /// Name of the sticky cookie.
    pub cookie_name: String,
    /// Time allowed to connect to a VM.
    pub connect_timeout: Duration,
    /// Time a VM may take to send response headers.
    pub response_header_timeout: Duration,
    /// Longest request target accepted.
    pub max_uri_bytes: usize,
    /// `Retry-After` (and page refresh) of the 503 page.
    pub retry_after: Duration,
    /// VMs tried for one request when they cannot be reached.
    pub max_attempts: usize,
    /// Idle upstream keep-alive connections are closed after this long.
    pub upstream_idle: Duration,
}

/// The client connection a request came in on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    /// The client's address.
    pub client: SocketAddr,
    /// Arrived over TLS.
    pub https: bool,
    /// The gateway port the client connected to.
    pub port: u16,
}

/// The HTTP frontend: routes and forwards requests to pool VMs. Cheap to clone.
#[derive(Clone)]
pub struct Frontend {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frontend")
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

struct Inner {
    settings: FrontendSettings,
    pool: Arc<Pool>,
    metrics: Arc<Metrics>,
    /// `connect_seconds{protocol="http"}`, looked up once rather than per request.
    connect_seconds: prometheus::Histogram,
    on_vm_failure: FailureHook,
    signer: CookieSigner,
    /// Keep-alive connections to VMs, per VM address.
    upstreams: Arc<Upstreams>,
    /// Autoscaler woken when no VM can take a request.
    wake: Option<Waker>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `host:port` for a URI authority (IPv6 literals bracketed).
fn authority(host: &str, port: u16) -> String {
    let bracket = host.contains(':') && !host.starts_with('[');
    let mut out = String::with_capacity(host.len() + 8);
    if bracket {
        out.push('[');
    }
    out.push_str(host);
    if bracket {
        out.push(']');
    }
    out.push(':');
    out.push_str(itoa::Buffer::new().format(port));
    out
}

/// Idle keep-alive connections kept per VM (they close after `upstream_idle` unused). Enough
/// for every client connection in flight: at 64, a benchmark with 256 client connections
/// reconnected on about 30 % of requests (10 302 sockets in TIME_WAIT after 34 k requests,
/// benches/e2e/notes.md).
const UPSTREAM_IDLE_PER_VM: usize = 1024;

/// Methods a proxy may send again after the connection broke without an answer (idempotent,
/// RFC 9110 §9.2.2), as nginx's `proxy_next_upstream` does; POST and PATCH never are.
fn resend_safe(method: &hyper::Method) -> bool {
    use hyper::Method;
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::PUT,
        Method::DELETE,
    ]
    .contains(method)
}

/// How one attempt on one VM ended, when it did not produce a response.
enum Attempt {
    /// Could not connect: try another VM (the body is back when it was never read).
    Unreachable(String, Option<Body>),
    /// The connection broke before any answer, on a request that is safe to send again (an
    /// idempotent method whose body was never read): typically a pooled keep-alive connection
    /// the VM closed (or died under) just as the request went out. Sent once more; a second
    /// break counts as [`Attempt::Unreachable`].
    Broken(String, Option<Body>),
    /// Gave up with this error.
    Fail(GatewayError),
    /// The client's request was at fault (its body could not be read): no VM is blamed.
    Client(GatewayError),
}

/// An error reading the client's request body (bad chunked framing, the client went away): the
/// client's fault, not the VM's. Wrapped around body errors so it can be told apart from the
/// VM's errors in the client error chain.
#[derive(Debug)]
struct ClientBodyError(BoxError);

impl std::fmt::Display for ClientBodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "reading the request body from the client: {}", self.0)
    }
}

impl std::error::Error for ClientBodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// The client body error behind `e`, if that is what made it fail.
fn client_body_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a ClientBodyError> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(found) = err.downcast_ref::<ClientBodyError>() {
            return Some(found);
        }
        cur = err.source();
    }
    None
}

impl Frontend {
    /// A frontend over `pool`.
    pub fn new(
        settings: FrontendSettings,
        pool: Arc<Pool>,
        metrics: Arc<Metrics>,
        on_vm_failure: FailureHook,
        signer: CookieSigner,
    ) -> Self {
        let upstreams = Arc::new(Upstreams::new(
            settings.connect_timeout,
            settings.upstream_idle,
            UPSTREAM_IDLE_PER_VM,
        ));
        let connect_seconds = metrics
            .connect_seconds
            .with_label_values(&[Protocol::Http.as_str()]);
        Self {
            inner: Arc::new(Inner {
                settings,
                pool,
                metrics,
                connect_seconds,
                on_vm_failure,
                signer,
                upstreams,
                wake: None,
            }),
        }
    }

    /// Wakes the pool through `waker` when no VM can take a request (if it wakes on connect). Call
    /// before the frontend is cloned.
    pub fn with_wake(mut self, waker: Option<Waker>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.wake = waker;
        }
        self
    }

    /// No VM for a request: tell the autoscaler someone is waiting. The 503 page refreshes every
    /// `retry_after`, so the registration is held a little longer than that; every refresh
    /// renews it, and it lapses once browsers stop asking.
    fn wake_pool(&self) {
        let Some(waker) = self.inner.wake.as_ref().filter(|w| w.holds_connections()) else {
            return;
        };
        let waiting = waker.register(Protocol::Http);
        let hold = self.inner.settings.retry_after * 2;
        tokio::spawn(async move {
            tokio::time::sleep(hold).await;
            drop(waiting);
        });
    }

    /// Closes upstream keep-alive connections idle for longer than `upstream_idle` and those
    /// the VM has closed. Called periodically.
    pub fn close_idle_upstreams(&self) {
        self.inner.upstreams.close_idle();
    }

    /// Handles one request from a client connection; never fails (errors become pages).
    pub async fn handle<B>(&self, req: Request<B>, conn: ConnInfo) -> Response<Body>
    where
        B: HttpBody<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let started = Instant::now();
        // What the access log needs, kept only when it is written (`--log warn` skips it).
        let access = tracing::enabled!(target: "poolgate::http::access", tracing::Level::INFO)
            .then(|| {
                (
                    req.method().clone(),
                    req.uri().path().to_owned(),
                    req.version(),
                )
            });
        let (resp, vm) = self.proxy(req, conn).await;
        let status = resp.status();
        let vm_label = vm.as_deref().unwrap_or("none");
        self.inner
            .metrics
            .http_requests_total
            .with_label_values(&[vm_label, status.as_str()])
            .inc();
        if let Some((method, path, version)) = access {
            tracing::info!(
                target: "poolgate::http::access",
                %method,
                path = %path,
                status = status.as_u16(),
                vm = vm_label,
                ms = started.elapsed().as_secs_f64() * 1000.0,
                client = %conn.client,
                proto = ?version,
                "request"
            );
        }
        resp
    }

    /// Refuses what must never be forwarded.
    fn check<B>(&self, req: &Request<B>) -> Result<(), GatewayError> {
        if req.method() == Method::CONNECT {
            return Err(GatewayError::Refused {
                status: StatusCode::METHOD_NOT_ALLOWED,
                detail: "CONNECT is not supported: poolgate only forwards to pool VMs".into(),
            });
        }
        let h1 = req.version() < Version::HTTP_2;
        if h1 && (req.uri().scheme().is_some() || req.uri().authority().is_some()) {
            return Err(GatewayError::Refused {
                status: StatusCode::BAD_REQUEST,
                detail: "absolute-form request targets are refused: poolgate is not a \
                         forward proxy and only forwards to pool VMs"
                    .into(),
            });
        }
        // Only origin-form targets (a path from `/`): `OPTIONS *` and anything else would not
        // name a resource on the VM, and glued to the VM's address it made a target that
        // failed to connect — counted as a VM failure, so any client could mark VMs down.
        if !req.uri().path().starts_with('/') {
            return Err(GatewayError::Refused {
                status: StatusCode::BAD_REQUEST,
                detail: "the request target must be a path starting with /".into(),
            });
        }
        let target = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
        if target > self.inner.settings.max_uri_bytes {
            return Err(GatewayError::Refused {
                status: StatusCode::URI_TOO_LONG,
                detail: format!(
                    "the request target is {target} bytes; at most {} are accepted",
                    self.inner.settings.max_uri_bytes
                ),
            });
        }
        Ok(())
    }

    /// The VM for one attempt. `new_session` is the session id the cookie of a browser without
    /// a (valid) cookie will carry.
    fn route(
        &self,
        pin: Option<&Pin>,
        new_session: &str,
        tried: &[String],
    ) -> Result<Arc<Vm>, NoVm> {
        let req = PickRequest::new(Protocol::Http).excluding(tried);
        match pin {
            // A browser already pinned: keep it there (even while that VM drains), and count
            // its session as load.
            Some(p) => self
                .inner
                .pool
                .http_route(&p.session, &req.pinned(&p.vm, true)),
            // No (valid) cookie yet: the browser weighs on the VM as tentative load until its
            // cookie comes back (then it is a session) or `http.tentative_for` passes, so
            // browsers arriving together spread.
            None => self.inner.pool.http_route_new(new_session, &req),
        }
    }

    /// A new browser's request failed without a cookie being issued: it is no tentative load.
    fn forget_new(&self, pin: Option<&Pin>, new_session: &str) {
        if pin.is_none() {
            self.inner.pool.http_forget(new_session);
        }
    }

    async fn proxy<B>(
        &self,
        mut req: Request<B>,
        conn: ConnInfo,
    ) -> (Response<Body>, Option<String>)
    where
        B: HttpBody<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        if let Err(e) = self.check(&req) {
            return (e.response(req.headers()), None);
        }
        let inner = &self.inner;
        let is_upgrade = req.version() == Version::HTTP_11 && wants_upgrade(req.headers());
        let mut client_upgrade = is_upgrade.then(|| hyper::upgrade::on(&mut req));
        let now = unix_now();
        let pin = find_cookie(req.headers(), &inner.settings.cookie_name)
            .and_then(|v| inner.signer.verify(v, now));
        let previous_vm = pin
            .as_ref()
            .and_then(|p| inner.pool.http_session_vm(&p.session));
        let (mut parts, body) = req.into_parts();
        let json = wants_json(&parts.headers);
        let up_bytes = Arc::new(AtomicU64::new(0));
        let mut body = Some(
            Observed::counting(
                body.map_err(|e| -> BoxError { Box::new(ClientBodyError(e.into())) })
                    .boxed_unsync(),
                up_bytes.clone(),
            )
            .boxed(),
        );
        let upgrade_proto = parts.headers.get(header::UPGRADE).cloned();
        // The request's host: its Host header, or (HTTP/2) the target's authority.
        let host = match parts.headers.get(header::HOST) {
            Some(h) => Some(h.clone()),
            None => parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
        };
        let host_text = host.as_ref().and_then(|h| h.to_str().ok());
        let pq = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));

        // The request's headers as every VM sees them: hop-by-hop headers out, forwarding
        // headers set, Host kept, cookie crumbs joined. The same for every attempt.
        let mut headers = std::mem::take(&mut parts.headers);
        strip_hop_by_hop(&mut headers);
        let fwd = Forwarding {
            client: conn.client,
            https: conn.https,
            port: conn.port,
        };
        set_forwarding(&mut headers, &fwd, host_text);
        if !headers.contains_key(header::HOST)
            && let Some(h) = host
        {
            headers.insert(header::HOST, h);
        }
        join_cookie_crumbs(&mut headers);

        // The session id a browser without a (valid) cookie gets in its new cookie.
        let new_session = if pin.is_none() {
            CookieSigner::new_session_id()
        } else {
            String::new()
        };
        let mut tried: Vec<String> = Vec::new();
        let mut last_failure: Option<GatewayError> = None;
        let mut resent = false;
        loop {
            let vm = match self.route(pin.as_ref(), &new_session, &tried) {
                Ok(vm) => vm,
                Err(no_vm) => {
                    self.forget_new(pin.as_ref(), &new_session);
                    if last_failure.is_none() {
                        self.wake_pool();
                    }
                    let err = last_failure.unwrap_or_else(|| {
                        inner.metrics.session_started(
                            Protocol::Http,
                            "none",
                            outcome::NO_VM,
                            Duration::ZERO,
                        );
                        GatewayError::NoVm {
                            reason: no_vm.to_string(),
                            retry_after: inner.settings.retry_after,
                        }
                    });
                    return (err.response_as(json), None);
                }
            };
            let name = vm.name().to_owned();
            let spec = vm.spec();
            let authority = authority(&spec.host, spec.http_port);
            // A copy: the connection takes the request's headers, and a failed attempt does
            // not give them back.
            let mut headers = headers.clone();
            if !headers.contains_key(header::HOST) {
                // An HTTP/1.0 client may send none; HTTP/1.1 to the VM needs one.
                match HeaderValue::from_str(&authority) {
                    Ok(h) => {
                        headers.insert(header::HOST, h);
                    }
                    Err(_) => {
                        self.forget_new(pin.as_ref(), &new_session);
                        return (bad_target(json), None);
                    }
                }
            }

            let attempt = if let (Some(on_client), Some(proto)) =
                (client_upgrade.take(), upgrade_proto.clone())
            {
                headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                headers.insert(header::UPGRADE, proto.clone());
                let mut up = Request::new(empty());
                *up.method_mut() = parts.method.clone();
                *up.headers_mut() = headers;
                *up.version_mut() = Version::HTTP_11;
                *up.uri_mut() = Uri::from(pq.clone());
                let metrics = inner.metrics.clone();
                let pool = inner.pool.clone();
                let sid = pin.as_ref().map(|p| p.session.clone());
                let vm_name = name.clone();
                // An open websocket (kernel, terminal) is a session of its VM for as long as it
                // is open, whatever `http.session_idle` says: a notebook in a background tab
                // holds nothing else. The guard lives in `on_done`: dropped with it when the VM
                // does not switch protocols, else held by the relay until the stream ends.
                let open_session = inner.pool.http_open(&name, None);
                let on_done = move |up: u64, down: u64| {
                    let _open_session = open_session;
                    metrics.bytes(Protocol::Http, &vm_name, up, down);
                    if let Some(sid) = sid {
                        pool.http_add_bytes(&sid, up, down);
                    }
                };
                let started = Instant::now();
                // Boxed: the upgrade's future is large and rare; inline it would grow every
                // request's future (and the copies hyper makes of it).
                match Box::pin(upgrade::forward(
                    &authority,
                    up,
                    on_client,
                    inner.settings.connect_timeout,
                    inner.settings.response_header_timeout,
                    on_done,
                ))
                .await
                {
                    Ok(resp) => Ok((resp.map(|b| b.map_err(Into::into).boxed_unsync()), started)),
                    Err(UpgradeError::Connect(detail, on_client)) => {
                        client_upgrade = Some(on_client);
                        Err(Attempt::Unreachable(detail, None))
                    }
                    Err(UpgradeError::Timeout) => Err(Attempt::Fail(GatewayError::Timeout {
                        vm: name.clone(),
                        after: inner.settings.response_header_timeout,
                    })),
                    Err(UpgradeError::Failed(detail)) => {
                        Err(Attempt::Fail(GatewayError::VmFailed {
                            vm: name.clone(),
                            detail,
                        }))
                    }
                }
            } else {
                let (slot, handoff) = Handoff::new(body.take().unwrap_or_else(empty));
                let mut up = Request::new(handoff);
                *up.method_mut() = parts.method.clone();
                *up.uri_mut() = Uri::from(pq.clone());
                *up.headers_mut() = headers;
                *up.version_mut() = Version::HTTP_11;
                let started = Instant::now();
                match tokio::time::timeout(
                    inner.settings.response_header_timeout,
                    inner.upstreams.send(authority, up),
                )
                .await
                {
                    Ok(Ok(resp)) => Ok((resp.map(BodyExt::boxed_unsync), started)),
                    Ok(Err(SendError::Connect(detail))) => {
                        Err(Attempt::Unreachable(detail, Handoff::take_back(&slot)))
                    }
                    Ok(Err(SendError::Http(e))) if client_body_error(&e).is_some() => {
                        Err(Attempt::Client(GatewayError::Refused {
                            status: StatusCode::BAD_REQUEST,
                            detail: client_body_error(&e)
                                .map(ToString::to_string)
                                .unwrap_or_default(),
                        }))
                    }
                    Ok(Err(SendError::Http(e))) => match Handoff::take_back(&slot) {
                        Some(back) if resend_safe(&parts.method) => {
                            Err(Attempt::Broken(error_chain(&e), Some(back)))
                        }
                        _ => Err(Attempt::Fail(GatewayError::VmFailed {
                            vm: name.clone(),
                            detail: error_chain(&e),
                        })),
                    },
                    Err(_) => Err(Attempt::Fail(GatewayError::Timeout {
                        vm: name.clone(),
                        after: inner.settings.response_header_timeout,
                    })),
                }
            };

            let (resp, started) = match attempt {
                Ok(r) => r,
                Err(Attempt::Broken(detail, back)) if !resent => {
                    // Once, without blaming the VM: a closed keep-alive connection is normal.
                    // If the VM is gone, the next attempt cannot connect and fails over.
                    tracing::info!(vm = %name, "connection to the VM broke before an answer ({detail}); sending the request again");
                    resent = true;
                    body = back;
                    continue;
                }
                Err(Attempt::Client(e)) => {
                    tracing::info!(vm = %name, ?e, "request refused: the client's request body could not be read");
                    self.forget_new(pin.as_ref(), &new_session);
                    return (e.response_as(json), Some(name));
                }
                Err(Attempt::Fail(e)) => {
                    tracing::warn!(vm = %name, "HTTP request failed: {}", e.status());
                    inner.metrics.session_started(
                        Protocol::Http,
                        &name,
                        outcome::VM_FAILED,
                        Duration::ZERO,
                    );
                    self.forget_new(pin.as_ref(), &new_session);
                    return (e.response_as(json), Some(name));
                }
                Err(Attempt::Unreachable(detail, returned) | Attempt::Broken(detail, returned)) => {
                    tracing::warn!(vm = %name, "cannot reach VM: {detail}; trying another");
                    (inner.on_vm_failure)(&name);
                    inner.metrics.session_started(
                        Protocol::Http,
                        &name,
                        outcome::VM_FAILED,
                        Duration::ZERO,
                    );
                    let failure = GatewayError::VmFailed {
                        vm: name.clone(),
                        detail,
                    };
                    tried.push(name);
                    // A body already partly sent cannot be replayed.
                    let replayable = returned.is_some() || is_upgrade;
                    if !replayable || tried.len() >= inner.settings.max_attempts {
                        self.forget_new(pin.as_ref(), &new_session);
                        return (failure.response_as(json), tried.pop());
                    }
                    body = returned;
                    last_failure = Some(failure);
                    continue;
                }
            };
            inner
                .connect_seconds
                .observe(started.elapsed().as_secs_f64());
            if pin.is_some() && previous_vm.as_deref() != Some(name.as_str()) {
                inner.metrics.session_started(
                    Protocol::Http,
                    &name,
                    outcome::OK,
                    started.elapsed(),
                );
            }
            return (
                self.finish(
                    resp,
                    &name,
                    Sticky {
                        pin: pin.as_ref(),
                        new_session: &new_session,
                        now,
                    },
                    conn,
                    &up_bytes,
                ),
                Some(name),
            );
        }
    }

    /// Response headers as the client sees them, the sticky cookie, and byte accounting.
    fn finish(
        &self,
        resp: Response<Body>,
        vm: &str,
        sticky: Sticky<'_>,
        conn: ConnInfo,
        up_bytes: &Arc<AtomicU64>,
    ) -> Response<Body> {
        let inner = &self.inner;
        let Sticky {
            pin,
            new_session,
            now,
        } = sticky;
        let (mut parts, body) = resp.into_parts();
        if parts.status != StatusCode::SWITCHING_PROTOCOLS {
            strip_hop_by_hop(&mut parts.headers);
        }
        let rewrite = match pin {
            None => true,
            Some(p) => p.vm != vm || inner.signer.wants_refresh(p, now),
        };
        if rewrite {
            let sid = pin.map_or_else(|| new_session.to_owned(), |p| p.session.clone());
            let value = inner.signer.sign(vm, &sid, now);
            let cookie = set_cookie_header(
                &inner.settings.cookie_name,
                &value,
                inner.signer.max_age(),
                conn.https,
            );
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                parts.headers.append(header::SET_COOKIE, v);
            }
        }
        if parts.status == StatusCode::SWITCHING_PROTOCOLS {
            // Bytes of the upgraded stream are counted by the relay.
            return Response::from_parts(parts, body);
        }
        let metrics = inner.metrics.clone();
        let pool = inner.pool.clone();
        let vm = vm.to_owned();
        let sid = pin.map(|p| p.session.clone());
        let up_bytes = up_bytes.clone();
        let body = Observed::new(
            body,
            Box::new(move |down| {
                let up = up_bytes.load(Ordering::Relaxed);
                metrics.bytes(Protocol::Http, &vm, up, down);
                if let Some(sid) = sid {
                    pool.http_add_bytes(&sid, up, down);
                }
            }),
        )
        .boxed();
        Response::from_parts(parts, body)
    }
}

/// The sticky cookie as the request brought it, for the response.
#[derive(Clone, Copy)]
struct Sticky<'a> {
    /// The request's valid cookie, if any.
    pin: Option<&'a Pin>,
    /// The session id a new cookie gets when the request had none.
    new_session: &'a str,
    /// Unix time the request's cookie was checked at.
    now: u64,
}

fn bad_target(json: bool) -> Response<Body> {
    GatewayError::Refused {
        status: StatusCode::BAD_REQUEST,
        detail: "the request target is not a valid path".into(),
    }
    .response_as(json)
}

/// HTTP/2 clients may split `Cookie` into several fields; HTTP/1.1 wants one (RFC 9113 §8.2.3).
fn join_cookie_crumbs(headers: &mut hyper::HeaderMap) {
    let crumbs: Vec<&str> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if crumbs.len() > 1
        && let Ok(v) = HeaderValue::from_str(&crumbs.join("; "))
    {
        headers.insert(header::COOKIE, v);
    }
}

/// An error and its sources on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn authorities() {
        assert_eq!(authority("10.0.0.4", 8000), "10.0.0.4:8000");
        assert_eq!(authority("vm-1.internal", 80), "vm-1.internal:80");
        assert_eq!(authority("fd00::4", 8000), "[fd00::4]:8000");
        assert_eq!(authority("[fd00::4]", 65535), "[fd00::4]:65535");
    }
}
