//! The request handler: check the request, read the sticky cookie, pick the VM, forward with
//! streamed bodies (or relay an upgrade), retry another VM when one cannot be reached, set or
//! rewrite the cookie, count and log.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod attempt;
mod head_wait;
mod response;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::Either;
use http_body_util::BodyExt;
use hyper::HeaderMap;
use hyper::body::Body as HttpBody;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::http::uri::PathAndQuery;
use hyper::upgrade::OnUpgrade;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use router_core::{HttpRouted, NoVm, PickRequest, Pool, Protocol, SessionBytes, Vm};
use subtle::ConstantTimeEq;

use super::access_log::{AccessLog, Record};
use super::body::{Active, ConnTracker, Handoff, Observed};
use super::cookie::{CookieFinder, CookieSigner, Pin, set_cookie_header};
use super::errors::{GatewayError, NoVmCause, accepts_json};
use super::headers::{
    ConnForwarding, ForwardedFor, Forwarding, strip_hop_by_hop, strip_request, wants_upgrade,
};
use super::upgrade::{self, UpgradeError};
use super::upstream::{Driven, Kept, SendError, Upstreams};
use super::{Body, BoxError, empty};
use crate::health::FailureHook;
use crate::metrics::{Metrics, outcome};
use crate::wake::Waker;

use self::attempt::{ClientBodyError, Tries};
use self::head_wait::{HeadWait, TimedOut};
use self::response::bad_target;

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
    /// Largest request header block accepted (`http.max_header_bytes`), measured here for both
    /// versions (see [`Frontend::check`]); hyper's own limits are above it.
    pub max_header_bytes: usize,
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

/// What one client connection keeps between its requests. A browser's requests on one
/// connection usually carry the same cookie and go to the same VM, so the cookie verified for
/// the last request, the VM address it went to and the VM connection it came back on are
/// reused rather than checked, formatted and looked up again (a request that differs is simply
/// handled in full). Made by [`Frontend::client`], one per client
/// connection; dropped with it, it gives its VM connection back to the shared list.
pub struct ClientConn {
    info: ConnInfo,
    /// Its address as the access log writes it (made when there is an access log).
    client_text: Option<Box<str>>,
    /// Its forwarding headers' values.
    forwarding: ConnForwarding,
    tracker: ConnTracker,
    kept: Arc<Kept>,
    last: Mutex<Last>,
    /// Its request waiting for a response head, for the watchdog to time out.
    head_wait: HeadWait,
    /// Its log context (`http{client.addr=...}`), named as the parent of each line logged
    /// about it, not entered: entering it on every poll of the connection's task cost about
    /// 770 instructions and 49 first-level cache misses per request (callgrind, 64
    /// connections), for lines that are rarely logged.
    span: tracing::Span,
}

/// A VM a client connection's requests go to, with what each request to it needs.
struct LastVm {
    vm: Arc<Vm>,
    /// Its `host:port`.
    authority: Arc<str>,
    /// Its `bytes_total{protocol="http",direction="down"}`.
    down: prometheus::IntCounter,
}

/// The last request's cookie, host, VM and counter.
#[derive(Default)]
struct Last {
    /// The cookie value as the client sent it, and what it verified to. A value equal to it
    /// byte for byte verifies to the same pin (only its age is checked again). Compared in
    /// constant time: behind a proxy that puts several browsers' requests on one connection,
    /// the value remembered may be another browser's.
    cookie: Option<(Box<str>, Arc<Pin>)>,
    /// The last VM requests went to.
    vm: Option<LastVm>,
    /// The request counter of the last answer: its VM and status.
    requests: Option<(Arc<Vm>, StatusCode, prometheus::IntCounter)>,
    /// The `Forwarded` value of the last host.
    forwarded: ForwardedFor,
}

impl ClientConn {
    /// Its log context: `tracing::warn!(parent: client.span(), ...)`.
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    /// Its requests in flight, and since when it has had none.
    pub fn tracker(&self) -> &ConnTracker {
        &self.tracker
    }

    /// Called every few seconds: its VM connection goes back to the shared list when it has
    /// not been used since the last call (there the VM's closing it is noticed and an idle
    /// timeout applies).
    pub fn age_upstream(&self) {
        self.kept.age();
    }

    /// From now on [`Self::poke_waiting_request`] is called at least every quarter of
    /// `http.response_header_timeout`, and keeps that timeout for the request waiting on a
    /// response head (see `head_wait`).
    pub fn watch_response_heads(&self) {
        self.head_wait.set_watched();
    }

    /// Has the request waiting on a response head, if any, see whether its time is up.
    pub fn poke_waiting_request(&self) {
        self.head_wait.poke();
    }

    fn last(&self) -> MutexGuard<'_, Last> {
        // Only ever replaced whole: a panic cannot leave it half written.
        self.last.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets the forwarding headers for a request to `host`, once [`strip_request`] has removed
    /// any the client sent.
    fn set_forwarding(&self, headers: &mut HeaderMap, host: Option<&HeaderValue>) {
        let mut last = self.last();
        self.forwarding.insert(headers, host, &mut last.forwarded);
    }

    /// `vm`'s `host:port` and its downloaded-bytes counter, formatted and looked up once per
    /// VM a connection's requests go to.
    fn vm(&self, vm: &Arc<Vm>, metrics: &Metrics) -> (Arc<str>, prometheus::IntCounter) {
        let mut last = self.last();
        if let Some(known) = &last.vm
            && Arc::ptr_eq(&known.vm, vm)
        {
            return (known.authority.clone(), known.down.clone());
        }
        let spec = vm.spec();
        let known = LastVm {
            vm: vm.clone(),
            authority: authority(&spec.host, spec.http_port).into(),
            down: metrics.bytes_down(Protocol::Http, vm.name()),
        };
        let found = (known.authority.clone(), known.down.clone());
        last.vm = Some(known);
        found
    }

    /// Counts a request `vm` answered with `status` (`http_requests_total`), looking the
    /// counter up only when the VM or status differs from the last request's.
    fn count_request(&self, vm: &Arc<Vm>, status: StatusCode, metrics: &Metrics) {
        let mut last = self.last();
        match &last.requests {
            Some((known, code, counter)) if Arc::ptr_eq(known, vm) && *code == status => {
                counter.inc();
            }
            _ => {
                let counter = metrics
                    .http_requests_total
                    .with_label_values(&[vm.name(), status.as_str()]);
                counter.inc();
                last.requests = Some((vm.clone(), status, counter));
            }
        }
    }

    /// The pin of cookie `value` at `now`: that of the connection's last cookie when it is the
    /// same value, else `verify`'s (which becomes the last cookie).
    pub(in crate::http) fn pin(
        &self,
        value: &[u8],
        now: u64,
        signer: &CookieSigner,
    ) -> Option<Arc<Pin>> {
        let mut last = self.last();
        if let Some((known, pin)) = &last.cookie
            && same_in_constant_time(known.as_bytes(), value)
        {
            return signer.still_valid(pin, now).then(|| pin.clone());
        }
        let value = std::str::from_utf8(value).ok()?;
        let pin = Arc::new(signer.verify(value, now)?);
        last.cookie = Some((value.into(), pin.clone()));
        Some(pin)
    }
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
    /// Finds `cookie_name` in a request's cookies.
    cookie: CookieFinder,
    /// Keep-alive connections to VMs, per VM address.
    upstreams: Arc<Upstreams>,
    /// Autoscaler woken when no VM can take a request.
    wake: Option<Waker>,
    /// Where the line per request goes (`http.access_log`); `None` when off.
    access_log: Option<AccessLog>,
    /// The log's word on requests no VM could take, at most every [`NO_VM_LOG_EVERY`].
    no_vm_log: NoVmLog,
    /// Finds the wait cookie (see [`Frontend::wake_pool`]).
    wait_cookie: CookieFinder,
    /// Browsers waiting for the pool to wake, by session or wait cookie, with when their wait
    /// lapses unless renewed.
    waiters: Mutex<HashMap<Box<str>, tokio::time::Instant>>,
}

/// Browsers waiting for the pool to wake that one gateway keeps count of (see
/// `Frontend::wake_pool`).
const MAX_WAITING_BROWSERS: usize = 10_000;

/// A waiting API client's key: its `Authorization` value, hashed with this process's own
/// random key (the credentials themselves are never kept).
fn credentials_key(credentials: &[u8]) -> Box<str> {
    use std::hash::BuildHasher;
    static KEYED: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    let hash = KEYED
        .get_or_init(std::collections::hash_map::RandomState::new)
        .hash_one(credentials);
    format!("authorization-{hash:016x}").into_boxed_str()
}

/// What [`Frontend::wake_pool`] did for a request no VM could take.
pub(super) enum Wake {
    /// Nothing: no autoscaler wakes the pool on connect.
    No,
    /// The browser waits now (its first request to find no VM).
    New,
    /// The browser was waiting already: its wait is renewed.
    Renewed,
    /// A client without a cookie or credentials: given this wait cookie, it wakes the pool
    /// when it comes back with it.
    AfterCookie(String),
}

/// The cookie that names a browser waiting for the pool to wake, while it has no session
/// cookie yet: the session cookie's name with this suffix.
pub(super) const WAIT_COOKIE_SUFFIX: &str = "_wait";

/// How long a browser keeps its wait cookie: the time a pool at zero takes to start, with room.
pub(super) const WAIT_COOKIE_MAX_AGE: Duration = Duration::from_secs(15 * 60);

/// At most one log line per this long on requests that found no VM (each one is in the access
/// log); the line counts those since the last.
const NO_VM_LOG_EVERY: Duration = Duration::from_secs(10);

/// Requests that found no VM since the last line about them, and when that line was written.
#[derive(Default)]
struct NoVmLog {
    state: Mutex<(u64, Option<Instant>)>,
}

impl NoVmLog {
    /// Counts one refused request; logs `reason` with the count when the last line is older
    /// than [`NO_VM_LOG_EVERY`].
    fn refused(&self, reason: &dyn std::fmt::Display) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let (count, last) = &mut *state;
        *count += 1;
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < NO_VM_LOG_EVERY) {
            return;
        }
        let refused = std::mem::take(count);
        *last = Some(now);
        drop(state);
        tracing::warn!(%reason, refused, "HTTP requests got 503: no VM can take them");
    }
}

/// The path under which a browser names its VM (see `Frontend::named_vm`).
pub(crate) const NAMED_VM_PATH: &str = "/poolgate/vm/";

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

/// The VM that answered a request, or the last one that failed it: the `vm` label of its
/// metrics and access-log line.
enum VmLabel {
    /// Shared with the pool, not copied: most requests end here.
    Served(Arc<Vm>),
    Failed(String),
}

impl VmLabel {
    fn as_str(&self) -> &str {
        match self {
            Self::Served(vm) => vm.name(),
            Self::Failed(name) => name,
        }
    }
}

/// A request on its way to a VM: what every attempt reuses.
struct Outbound {
    method: Method,
    /// Path and query, as the VM sees them.
    target: PathAndQuery,
    /// The headers every VM sees (see [`Frontend::prepare`]), until the first attempt takes
    /// them.
    headers: Option<HeaderMap>,
    /// The same headers as a list, once the first attempt has taken the map: for another
    /// attempt, and for the error page.
    spare: Vec<(HeaderName, HeaderValue)>,
    /// The client's body, counted; `None` when the request has none, while an attempt holds
    /// it, and after it was used.
    body: Option<Body>,
    /// An HTTP/1.1 upgrade (websocket) request.
    is_upgrade: bool,
    /// The client's side of the upgrade, while no VM has taken it.
    client_upgrade: Option<OnUpgrade>,
    upgrade_proto: Option<HeaderValue>,
    /// The headers carry a `Host` (the request's, or for HTTP/2 its target's authority).
    has_host: bool,
    /// The request's valid cookie, if any.
    pin: Option<Arc<Pin>>,
    /// The session id a new cookie gets when the request had none.
    new_session: String,
    /// Routing this request started the cookie's session on a VM (it moved there, its
    /// tentative slot became a session, or it had expired).
    session_started: bool,
    /// Unix time the cookie was checked at.
    now: u64,
    /// Request body bytes sent so far (`None`: the request has no body).
    up_bytes: Option<Arc<AtomicU64>>,
    /// The byte counters of the session the last attempt was routed to (a valid cookie).
    session_bytes: Option<SessionBytes>,
    /// The request in flight on its client connection: ends with the response body (or with
    /// the request when no VM answers).
    active: Active,
}

impl Outbound {
    /// Error pages as JSON (asked for only when there is an error page to send).
    fn json(&self) -> bool {
        let accept = match &self.headers {
            Some(headers) => headers.get(header::ACCEPT),
            None => self
                .spare
                .iter()
                .find(|(name, _)| name == header::ACCEPT)
                .map(|(_, value)| value),
        };
        accepts_json(accept)
    }

    /// The headers for one attempt on `authority` (the connection takes them, and a failed
    /// attempt does not give them back), with a Host header: an HTTP/1.0 client may send none,
    /// and HTTP/1.1 to the VM needs one. `None` when the authority is no header value.
    ///
    /// The first attempt gets the map itself, and a list of the same headers stays behind: one
    /// allocation and no hash index to copy, and values shared, not copied. A later attempt
    /// (rare) builds a map from the list. (A map sent must be the request's own, or one built
    /// with room: hyper parses the VM's response into the map of the request it sent, and a
    /// cloned map has no spare room, so it would grow on every response.)
    fn headers_for(&mut self, authority: &str) -> Option<HeaderMap> {
        let mut headers = match self.headers.take() {
            Some(headers) => {
                // Sized up front: the map's iterator cannot tell its length, and a growing
                // list would be copied as it grows.
                self.spare = Vec::with_capacity(headers.len());
                self.spare.extend(
                    headers
                        .iter()
                        .map(|(name, value)| (name.clone(), value.clone())),
                );
                headers
            }
            None => {
                let mut headers = HeaderMap::with_capacity(self.spare.len() + 1);
                for (name, value) in &self.spare {
                    headers.append(name.clone(), value.clone());
                }
                headers
            }
        };
        if !self.has_host {
            headers.insert(header::HOST, HeaderValue::from_str(authority).ok()?);
        }
        Some(headers)
    }
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
        let cookie = CookieFinder::new(&settings.cookie_name);
        let wait_cookie =
            CookieFinder::new(&format!("{}{WAIT_COOKIE_SUFFIX}", settings.cookie_name));
        Self {
            inner: Arc::new(Inner {
                cookie,
                settings,
                pool,
                metrics,
                connect_seconds,
                on_vm_failure,
                signer,
                upstreams,
                wake: None,
                access_log: None,
                no_vm_log: NoVmLog::default(),
                wait_cookie,
                waiters: Mutex::new(HashMap::new()),
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

    /// Writes a line per request to `log` (`http.access_log`). Call before the frontend is
    /// cloned.
    pub fn with_access_log(mut self, log: Option<AccessLog>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.access_log = log;
        }
        self
    }

    /// No VM for a request: tell the autoscaler that the browser behind `out` waits — once per
    /// browser, however many requests it sends (a page, its favicon, the 503 page's refreshes):
    /// a browser is known by its session cookie, or by the short-lived wait cookie the first 503
    /// gives it. A client that keeps no cookie (a scanner, an uptime check, `curl` without a
    /// jar) is told the pool is starting but wakes nothing: before, every such request woke
    /// another VM, and any monitor polling the URL kept the pool from ever reaching zero.
    /// The registration is held a little longer than the page's refresh; each refresh renews
    /// it, and it lapses once the browser stops asking.
    fn wake_pool(&self, out: &Outbound) -> Wake {
        let Some(waker) = self.inner.wake.as_ref().filter(|w| w.holds_connections()) else {
            return Wake::No;
        };
        let unpinned;
        let key = match &out.pin {
            Some(pin) => pin.session.as_str(),
            None => match self.unpinned_key(out) {
                Some(key) => {
                    unpinned = key;
                    &*unpinned
                }
                None => return Wake::AfterCookie(CookieSigner::new_session_id()),
            },
        };
        let hold = self.inner.settings.retry_after * 2;
        let deadline = tokio::time::Instant::now() + hold;
        let Ok(mut waiters) = self.inner.waiters.lock() else {
            return Wake::No;
        };
        if let Some(until) = waiters.get_mut(key) {
            *until = deadline;
            return Wake::Renewed;
        }
        if waiters.len() >= MAX_WAITING_BROWSERS {
            // Enough to wake every VM many times over; a flood of fresh cookies adds nothing.
            return Wake::Renewed;
        }
        waiters.insert(Box::from(key), deadline);
        drop(waiters);
        let waiting = waker.register(Protocol::Http);
        let inner = self.inner.clone();
        let key: Box<str> = Box::from(key);
        tokio::spawn(async move {
            let mut until = deadline;
            loop {
                tokio::time::sleep_until(until).await;
                let Ok(mut waiters) = inner.waiters.lock() else {
                    break;
                };
                match waiters.get(&key) {
                    Some(&renewed) if renewed > tokio::time::Instant::now() => until = renewed,
                    _ => {
                        waiters.remove(&key);
                        break;
                    }
                }
            }
            drop(waiting);
        });
        Wake::New
    }

    /// What a client without a session cookie waits under: its wait cookie's value, if well
    /// formed, else, for an API client sending a token (JupyterHub's REST API, a script), its
    /// credentials' key. Looked up only for a request no VM took (never on the request path):
    /// no attempt has taken its headers then.
    fn unpinned_key(&self, out: &Outbound) -> Option<Box<str>> {
        let headers = out.headers.as_ref()?;
        self.inner
            .wait_cookie
            .find(headers)
            .filter(|v| (16..=64).contains(&v.len()))
            .filter(|v| {
                v.iter()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
            })
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(Box::from)
            .or_else(|| {
                headers
                    .get(header::AUTHORIZATION)
                    .map(|credentials| credentials_key(credentials.as_bytes()))
            })
    }

    /// Closes upstream keep-alive connections idle for longer than `upstream_idle` and those
    /// the VM has closed. Called periodically.
    pub fn close_idle_upstreams(&self) {
        self.inner.upstreams.close_idle();
    }

    /// What a new client connection keeps between its requests.
    pub fn client(&self, info: ConnInfo) -> Arc<ClientConn> {
        Arc::new(ClientConn {
            info,
            client_text: (self.inner.access_log.as_ref())
                .map(|_| info.client.to_string().into_boxed_str()),
            forwarding: ConnForwarding::new(&Forwarding {
                client: info.client,
                https: info.https,
                port: info.port,
            }),
            tracker: ConnTracker::new(),
            kept: Arc::new(Kept::new(self.inner.upstreams.clone())),
            last: Mutex::default(),
            head_wait: HeadWait::default(),
            span: tracing::info_span!("http", client.addr = %info.client),
        })
    }

    /// `http.response_header_timeout`.
    pub fn response_header_timeout(&self) -> Duration {
        self.inner.settings.response_header_timeout
    }

    /// Handles one request as if it came alone on a client connection; never fails (errors
    /// become pages).
    pub async fn handle<B>(&self, req: Request<B>, conn: ConnInfo) -> Response<Body>
    where
        B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        self.handle_on(req, &self.client(conn)).await
    }

    /// Handles one request from client connection `client`; never fails (errors become pages).
    /// The request counts as in flight on `client` until its response body has been sent.
    ///
    /// The request is checked and prepared before the returned future starts: it holds what
    /// the attempts need, not the request, and nests one future (the attempts') rather than
    /// one per step. Every request's future is allocated, and copied whole at each level it
    /// is nested in, so its size is paid per request.
    pub fn handle_on<B>(
        &self,
        req: Request<B>,
        client: &Arc<ClientConn>,
    ) -> impl Future<Output = Response<Body>> + Send + use<B>
    where
        B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let active = client.tracker.begin();
        let started = Instant::now();
        // What the access log needs, kept only when it is written. The URI is shared, not
        // copied.
        let access = self
            .inner
            .access_log
            .is_some()
            .then(|| (req.method().clone(), req.uri().clone(), req.version()));
        let prepared = match self.check(&req) {
            Ok(()) if req.uri().path().starts_with(NAMED_VM_PATH) => {
                Err(active.attach(self.named_vm(&req, client.info.https)))
            }
            Ok(()) => Ok(self.prepare(req, client, active)),
            Err(e) => Err(active.attach(e.response(req.headers()))),
        };
        // The proxying future is made now and mapped, not awaited inside an async block of
        // this function's: such a block would keep room for the prepared request twice (as
        // its capture and inside the future it awaits), in a future allocated per request.
        let answered = match prepared {
            Ok(out) => Either::Left(self.proxy(out, client)),
            Err(resp) => Either::Right(std::future::ready((resp, None))),
        };
        let (this, client) = (self.clone(), client.clone());
        answered.map(move |(resp, vm)| {
            this.done(&client, &resp, vm.as_ref(), started, access);
            resp
        })
    }

    /// Counts and logs an answered request.
    fn done(
        &self,
        client: &ClientConn,
        resp: &Response<Body>,
        vm: Option<&VmLabel>,
        started: Instant,
        access: Option<(Method, Uri, Version)>,
    ) {
        let status = resp.status();
        let vm_label = vm.map_or("none", VmLabel::as_str);
        match vm {
            Some(VmLabel::Served(served)) => {
                client.count_request(served, status, &self.inner.metrics);
            }
            _ => self
                .inner
                .metrics
                .http_requests_total
                .with_label_values(&[vm_label, status.as_str()])
                .inc(),
        }
        if let (Some(log), Some((method, uri, version))) = (&self.inner.access_log, access) {
            log.log(&Record {
                method: &method,
                path: uri.path(),
                status: status.as_u16(),
                vm: vm_label,
                elapsed: started.elapsed(),
                client: client.client_text.as_deref().unwrap_or_default(),
                version,
            });
        }
    }

    /// `GET /poolgate/vm/NAME`: pins the browser to VM `NAME` (a new sticky cookie naming it)
    /// and sends it to `/`, or says why that VM cannot take it (404: not in the pool, its VMs
    /// named; 503: draining, stopped, starting, full or its web probe failing). Nothing is
    /// forwarded: the browser's next request goes to that VM like any pinned one.
    fn named_vm<B>(&self, req: &Request<B>, https: bool) -> Response<Body> {
        let json = accepts_json(req.headers().get(header::ACCEPT));
        if !matches!(*req.method(), Method::GET | Method::HEAD) {
            return GatewayError::Refused {
                status: StatusCode::METHOD_NOT_ALLOWED,
                detail: format!("{NAMED_VM_PATH}NAME takes GET only"),
            }
            .response_as(json);
        }
        let name = req.uri().path()[NAMED_VM_PATH.len()..].trim_end_matches('/');
        let snapshot = self.inner.pool.snapshot();
        if let Some(why) = snapshot.why_not(name, Protocol::Http) {
            let status = if snapshot.get(name).is_some() {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::NOT_FOUND
            };
            tracing::info!(vm = %name, %why, "a browser named a VM that cannot take it");
            return GatewayError::Refused {
                status,
                detail: format!("{why}; go to / to land on any VM"),
            }
            .response_as(json);
        }
        let mut resp = Response::new(empty());
        *resp.status_mut() = StatusCode::SEE_OTHER;
        let headers = resp.headers_mut();
        headers.insert(header::LOCATION, HeaderValue::from_static("/"));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        let session = CookieSigner::new_session_id();
        if let Some(v) = self.sticky_cookie(name, &session, unix_now(), https) {
            headers.insert(header::SET_COOKIE, v);
        }
        tracing::info!(vm = %name, "a browser named its VM");
        resp
    }

    /// The `Set-Cookie` value pinning browser session `session` to `vm`, issued at `now` (Unix
    /// seconds); `Secure` over HTTPS.
    fn sticky_cookie(&self, vm: &str, session: &str, now: u64, https: bool) -> Option<HeaderValue> {
        let inner = &self.inner;
        let value = inner.signer.sign(vm, session, now);
        let cookie = set_cookie_header(
            &inner.settings.cookie_name,
            &value,
            inner.signer.max_age(),
            https,
        );
        HeaderValue::from_str(&cookie).ok()
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
        let max = self.inner.settings.max_header_bytes;
        let size = if h1 {
            h1_head_size(req)
        } else {
            h2_header_list_size(req)
        };
        if size > max {
            return Err(GatewayError::Refused {
                status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                detail: format!(
                    "the request's headers are {size} bytes; at most {max} are accepted. \
                     Deleting this site's cookies in the browser usually fixes it"
                ),
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

    /// The VM for one attempt, and whether the cookie's session was on it already.
    /// `new_session` is the session id the cookie of a browser without a (valid) cookie will
    /// carry.
    fn route(
        &self,
        pin: Option<&Pin>,
        new_session: &str,
        tried: &[String],
        method: &Method,
    ) -> Result<HttpRouted, NoVm> {
        let req = PickRequest::new(Protocol::Http).excluding(tried);
        match pin {
            // A browser already pinned: keep it there (even while that VM drains), and count
            // its session as load. One whose first pinned request posts something (its login
            // form) is not moved to another VM because its own filled up meanwhile: another
            // VM's JupyterHub would refuse the form ("XSRF cookie does not match POST
            // argument"); it is told the VM is full, and its next page load goes elsewhere.
            Some(p) => {
                let routed = self.inner.pool.http_route_session(
                    &p.session,
                    &req.pinned(&p.vm, true)
                        .staying_pinned(!matches!(*method, Method::GET | Method::HEAD)),
                );
                if let Ok(r) = &routed
                    && r.vm.name() != p.vm
                    && tried.is_empty()
                {
                    let snapshot = self.inner.pool.snapshot();
                    let why = snapshot
                        .why_not(&p.vm, Protocol::Http)
                        .unwrap_or_else(|| format!("{} has no room for it", p.vm));
                    tracing::info!(from = %p.vm, to = r.vm.name(), %why, "a browser moved to another VM");
                }
                routed
            }
            // No (valid) cookie yet: the browser weighs on the VM as tentative load until its
            // cookie comes back (then it is a session) or `http.tentative_for` passes, so
            // browsers arriving together spread.
            None => self
                .inner
                .pool
                .http_route_new(new_session, &req)
                .map(|vm| HttpRouted {
                    vm,
                    continued: false,
                    bytes: None,
                }),
        }
    }

    /// A new browser's request failed without a cookie being issued: it is no tentative load.
    fn forget_new(&self, pin: Option<&Pin>, new_session: &str) {
        if pin.is_none() {
            self.inner.pool.http_forget(new_session);
        }
    }

    /// Forwards a prepared request: attempt VMs until one answers, the failure is final, or
    /// `max_attempts` VMs could not be reached. Returns the response and the VM that answered
    /// (or last failed).
    fn proxy(
        &self,
        mut out: Outbound,
        client: &Arc<ClientConn>,
    ) -> impl Future<Output = (Response<Body>, Option<VmLabel>)> + Send + use<> {
        let (this, client) = (self.clone(), client.clone());
        async move {
            let conn = client.info;
            let mut tries = Tries::default();
            loop {
                let HttpRouted {
                    vm,
                    continued,
                    bytes,
                } = match this.route(
                    out.pin.as_deref(),
                    &out.new_session,
                    &tries.tried,
                    &out.method,
                ) {
                    Ok(routed) => routed,
                    Err(no_vm) => {
                        let resp = this.no_vm(&out, no_vm, tries.last_failure, conn.https);
                        return (out.active.attach(resp), None);
                    }
                };
                out.session_started |= !continued;
                out.session_bytes = bytes;
                let name = vm.name();
                let (authority, down) = client.vm(&vm, &this.inner.metrics);
                let Some(headers) = out.headers_for(&authority) else {
                    this.forget_new(out.pin.as_deref(), &out.new_session);
                    let resp = bad_target(out.json());
                    return (out.active.attach(resp), None);
                };
                let failed = if out.is_upgrade && out.client_upgrade.is_some() {
                    // Boxed: an upgrade's attempt is larger than a plain one's and rare; inline
                    // it would size every request's future (allocated and copied per request)
                    // for it.
                    match Box::pin(
                        this.attempt_upgrade(&mut out, &client, name, &authority, headers),
                    )
                    .await
                    {
                        Ok((resp, started)) => {
                            let resp = this.answered(out, resp, started, &vm, conn, down);
                            return (resp, Some(VmLabel::Served(vm)));
                        }
                        Err(failed) => failed,
                    }
                } else {
                    // `attempt_plain`'s steps, here rather than nested in a future of its own.
                    // The VM's body as it is (not boxed): `answered` wraps it once.
                    let (slot, up) = this.plain_request(&mut out, headers);
                    let started = tokio::time::Instant::now();
                    let timeout = this.inner.settings.response_header_timeout;
                    let sending = std::pin::pin!(this.inner.upstreams.send(
                        authority,
                        Some(&client.kept),
                        up
                    ));
                    let sent = client.head_wait.wait(sending, started, timeout).await;
                    match this.plain_outcome(&out, name, &slot, sent) {
                        Ok(resp) => {
                            let started = started.into_std();
                            let resp = this.answered(out, resp, started, &vm, conn, down);
                            return (resp, Some(VmLabel::Served(vm)));
                        }
                        Err(failed) => failed,
                    }
                };
                if let Some((resp, label)) =
                    this.failed(&mut out, &client, &mut tries, name.to_owned(), failed)
                {
                    return (out.active.attach(resp), label.map(VmLabel::Failed));
                }
            }
        }
    }

    /// Makes what every attempt of a checked request reuses: the headers as every VM sees them
    /// (hop-by-hop headers out, forwarding headers set, Host kept, cookie crumbs joined), the
    /// counted body, the cookie's pin.
    fn prepare<B>(&self, mut req: Request<B>, client: &ClientConn, active: Active) -> Outbound
    where
        B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let inner = &self.inner;
        let is_upgrade = req.version() == Version::HTTP_11 && wants_upgrade(req.headers());
        let client_upgrade = is_upgrade.then(|| hyper::upgrade::on(&mut req));
        let now = unix_now();
        let pin = inner
            .cookie
            .find(req.headers())
            .and_then(|v| client.pin(v, now, &inner.signer));
        let (mut parts, body) = req.into_parts();
        // Most requests (GETs) have no body: then nothing is wrapped, counted or handed off.
        let (body, up_bytes) = if body.is_end_stream() {
            (None, None)
        } else {
            let up_bytes = Arc::new(AtomicU64::new(0));
            let body = Observed::counting(
                body.map_err(|e| -> BoxError { Box::new(ClientBodyError(e.into())) }),
                up_bytes.clone(),
            );
            (Some(body.boxed()), Some(up_bytes))
        };
        let upgrade_proto = is_upgrade
            .then(|| parts.headers.get(header::UPGRADE).cloned())
            .flatten();
        // The request's host: its Host header, or (HTTP/2) the target's authority.
        let host = match parts.headers.get(header::HOST) {
            Some(h) => Some(h.clone()),
            None => parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
        };
        let target = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mut headers = std::mem::take(&mut parts.headers);
        strip_request(&mut headers);
        client.set_forwarding(&mut headers, host.as_ref());
        // Looked up after the hop-by-hop headers are out: `Connection: host` removes it.
        let has_host = match host {
            _ if headers.contains_key(header::HOST) => true,
            Some(h) => {
                headers.insert(header::HOST, h);
                true
            }
            None => false,
        };
        join_cookie_crumbs(&mut headers);
        // The session id a browser without a (valid) cookie gets in its new cookie.
        let new_session = if pin.is_none() {
            CookieSigner::new_session_id()
        } else {
            String::new()
        };
        Outbound {
            method: parts.method,
            target,
            headers: Some(headers),
            spare: Vec::new(),
            body,
            is_upgrade,
            client_upgrade,
            upgrade_proto,
            has_host,
            pin,
            new_session,
            session_started: false,
            now,
            up_bytes,
            session_bytes: None,
            active,
        }
    }
}

/// Whether `a` and `b` are equal, in time that depends on their length only. Eight bytes at a
/// time: `subtle`'s byte slices cost about ten instructions a byte, and a cookie is compared
/// on every request.
fn same_in_constant_time(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let mut same = a8.remainder().ct_eq(b8.remainder());
    for (x, y) in a8.zip(b8) {
        let word = |c: &[u8]| u64::from_ne_bytes(c.try_into().unwrap_or_default());
        same &= word(x).ct_eq(&word(y));
    }
    bool::from(same)
}

/// HTTP/2 clients may split `Cookie` into several fields; HTTP/1.1 wants one (RFC 9113 §8.2.3).
/// A proxy in front that turns HTTP/2 into HTTP/1.1 may pass them on split, and Tornado
/// (Jupyter) would join repeated fields with commas, losing cookies.
fn join_cookie_crumbs(headers: &mut hyper::HeaderMap) {
    let crumbs = headers.get_all(header::COOKIE);
    // The usual case, one field or none, costs a lookup and no allocation.
    if crumbs.iter().nth(1).is_none() {
        return;
    }
    // Joined as bytes: a crumb with bytes beyond ASCII (a cookie a script set) is passed on as
    // it came, not dropped.
    let mut joined = Vec::with_capacity(crumbs.iter().map(|v| v.len() + 2).sum());
    for crumb in crumbs {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(crumb.as_bytes());
    }
    // Header values joined by "; " make a valid header value.
    if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(joined)) {
        headers.insert(header::COOKIE, v);
    }
}

/// An HTTP/1.1 request head's size as it came on the wire, written the usual way: the request
/// line, each field as `name: value` and its line end, and the empty line that ends the head.
fn h1_head_size<B>(req: &Request<B>) -> usize {
    const REQUEST_LINE: usize = " HTTP/1.1\r\n".len() + 1;
    let target = req.uri().path_and_query().map_or(1, |p| p.as_str().len());
    let fields = fields_size(req.headers(), ": \r\n".len());
    req.method().as_str().len() + target + REQUEST_LINE + fields + "\r\n".len()
}

/// Every header field's name and value, plus `per_field` bytes each.
fn fields_size(headers: &hyper::HeaderMap, per_field: usize) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + per_field)
        .sum()
}

/// An HTTP/2 request's header list size as HTTP/2 counts it (RFC 9113, section 6.5.2): every
/// field's name and value plus 32 bytes, the pseudo-header fields included.
fn h2_header_list_size<B>(req: &Request<B>) -> usize {
    const FIELD: usize = 32;
    let uri = req.uri();
    let pseudo = [
        ":method".len() + req.method().as_str().len(),
        ":scheme".len() + uri.scheme_str().map_or(0, str::len),
        ":authority".len() + uri.authority().map_or(0, |a| a.as_str().len()),
        ":path".len() + uri.path_and_query().map_or(0, |p| p.as_str().len()),
    ];
    let pseudo: usize = pseudo.iter().map(|n| n + FIELD).sum();
    pseudo + fields_size(req.headers(), FIELD)
}

#[cfg(test)]
mod unit {
    use super::*;

    /// The size HTTP/2 gives a header list: `:method GET`, `:scheme https`,
    /// `:authority hub.example`, `:path /lab?x=1` and two cookie crumbs, each field's name and
    /// value plus 32.
    #[test]
    fn an_http2_header_list_is_measured_as_http2_counts_it() {
        let mut req = Request::new(());
        *req.uri_mut() = Uri::from_static("https://hub.example/lab?x=1");
        *req.version_mut() = Version::HTTP_2;
        req.headers_mut()
            .append(header::COOKIE, HeaderValue::from_static("a=1"));
        req.headers_mut()
            .append(header::COOKIE, HeaderValue::from_static("b=22"));
        let want = (7 + 3) + (7 + 5) + (10 + 11) + (5 + 8) + (6 + 3) + (6 + 4) + 6 * 32;
        assert_eq!(h2_header_list_size(&req), want);
    }

    /// An HTTP/1.1 head is measured as the bytes a client writes for it.
    #[test]
    fn an_http1_head_is_measured_as_it_came_on_the_wire() {
        let wire = "POST /lab/api?x=1 HTTP/1.1\r\nhost: hub.example\r\ncookie: a=1; b=22\r\n\
                    x-empty: \r\n\r\n";
        let mut req = Request::new(());
        *req.method_mut() = Method::POST;
        *req.uri_mut() = Uri::from_static("/lab/api?x=1");
        for (name, value) in [
            ("host", "hub.example"),
            ("cookie", "a=1; b=22"),
            ("x-empty", ""),
        ] {
            req.headers_mut().append(
                header::HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        assert_eq!(h1_head_size(&req), wire.len());
    }

    #[test]
    fn cookie_crumbs_are_joined_and_a_single_field_is_left_alone() {
        let mut one = HeaderMap::new();
        one.append(header::COOKIE, HeaderValue::from_static("a=1; b=2"));
        join_cookie_crumbs(&mut one);
        assert_eq!(one.get_all(header::COOKIE).iter().count(), 1);
        assert_eq!(one[header::COOKIE], "a=1; b=2");

        let mut split = HeaderMap::new();
        split.append(header::COOKIE, HeaderValue::from_static("a=1"));
        split.append(header::COOKIE, HeaderValue::from_static("b=2"));
        split.append(header::COOKIE, HeaderValue::from_static("c=3"));
        join_cookie_crumbs(&mut split);
        assert_eq!(split.get_all(header::COOKIE).iter().count(), 1);
        assert_eq!(split[header::COOKIE], "a=1; b=2; c=3");

        let mut none = HeaderMap::new();
        join_cookie_crumbs(&mut none);
        assert!(none.is_empty());

        // A crumb that is not ASCII is passed on, not dropped.
        let mut other = HeaderMap::new();
        other.append(header::COOKIE, HeaderValue::from_static("a=1"));
        other.append(
            header::COOKIE,
            HeaderValue::from_bytes("theme=gr\u{fc}n".as_bytes()).expect("value"),
        );
        join_cookie_crumbs(&mut other);
        assert_eq!(other.get_all(header::COOKIE).iter().count(), 1);
        assert_eq!(
            other[header::COOKIE].as_bytes(),
            "a=1; theme=gr\u{fc}n".as_bytes()
        );
    }

    #[test]
    fn constant_time_comparison_tells_every_difference() {
        let base: Vec<u8> = (0u8..37).collect();
        assert!(same_in_constant_time(&base, &base.clone()));
        assert!(same_in_constant_time(b"", b""));
        for i in 0..base.len() {
            let mut other = base.clone();
            other[i] ^= 0x40;
            assert!(!same_in_constant_time(&base, &other), "byte {i}");
        }
        assert!(!same_in_constant_time(&base, &base[..36]));
        assert!(!same_in_constant_time(&base[..8], &base[..16]));
    }

    #[test]
    fn authorities() {
        assert_eq!(authority("10.0.0.4", 8000), "10.0.0.4:8000");
        assert_eq!(authority("vm-1.internal", 80), "vm-1.internal:80");
        assert_eq!(authority("fd00::4", 8000), "[fd00::4]:8000");
        assert_eq!(authority("[fd00::4]", 65535), "[fd00::4]:65535");
    }
}
