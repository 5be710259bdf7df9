//! Client connections: the two listeners, the accept loop with its connection limit, the TLS
//! handshake, telling the HTTP version (ALPN, or a peek at a plain connection's first bytes),
//! and serving one connection's requests (or redirecting them to HTTPS).

use std::pin::Pin;

use tokio::time::Instant;

use hyper::service::HttpService as HyperService;

use super::*;

/// Time allowed for a TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// A new connection must send the complete headers of its first request within this (or
/// `http.idle_timeout` when shorter), as nginx's `client_header_timeout`: a slowloris client
/// holds a connection for a minute, not for the 5-minute keep-alive idle time. Later requests
/// on the connection have `http.idle_timeout` from the end of the one before (the watchdog).
pub(super) const FIRST_REQUEST_WITHIN: Duration = Duration::from_secs(60);

/// How long a new connection has for its first request's headers: [`FIRST_REQUEST_WITHIN`],
/// or `http.idle_timeout` when shorter.
fn first_request_within(idle_timeout: Duration) -> Duration {
    FIRST_REQUEST_WITHIN.min(idle_timeout)
}
/// While `http.max_connections` stays reached, the warning is repeated this often.
const FULL_WARN_EVERY: Duration = Duration::from_secs(60);
/// What an HTTP/2 client sends first (RFC 9113, section 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// While a plain connection has sent only the start of the HTTP/2 preface, its bytes are
/// looked at again this often (see [`sniff`]).
const PREFACE_RECHECK: Duration = Duration::from_millis(10);

/// The plain and the TLS listener as they serve: the plain one redirects to HTTPS while TLS is
/// configured, else it proxies.
pub(super) fn listeners(
    http: Option<TcpListener>,
    https: Option<TcpListener>,
    tls: Option<TlsParts>,
) -> anyhow::Result<(Option<Listener>, Option<Listener>)> {
    let https_port = https
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map(|a| a.port());
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
    let challenges = tls.as_ref().and_then(TlsParts::challenges);
    let plain = http.map(|listener| Listener {
        listener,
        tls: None,
        plain: Plain {
            redirect_to,
            challenges,
        },
    });
    let secure = match (https, tls) {
        (Some(listener), Some(TlsParts { acceptor, .. })) => Some(Listener {
            listener,
            tls: Some(acceptor),
            plain: Plain::default(),
        }),
        _ => None,
    };
    Ok((plain, secure))
}

/// What every client connection is served with.
#[derive(Clone)]
pub(super) struct Served {
    pub(super) frontend: Frontend,
    pub(super) builders: Arc<Builders>,
    pub(super) idle_timeout: Duration,
    /// Each connection starts with a PROXY protocol header naming the client
    /// (`listen.proxy_protocol`).
    pub(super) proxy_protocol: bool,
}

/// Accepts client connections on both listeners until `shutdown`, each served in a task of the
/// returned set, at most `max_connections` at once: at the limit new clients wait in the
/// listen backlog (and their own connect timeout) until a connection closes, as nginx's
/// worker_connections.
pub(super) async fn accept(
    plain: Option<Listener>,
    secure: Option<Listener>,
    served: Served,
    max_connections: usize,
    mut shutdown: watch::Receiver<bool>,
) -> JoinSet<()> {
    let mut conns = JoinSet::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let mut full_warned: Option<Instant> = None;
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if full_warned.is_none_or(|at| at.elapsed() >= FULL_WARN_EVERY) {
                    full_warned = Some(Instant::now());
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
        super::tcp_keepalive(&stream);
        let info = ConnInfo {
            client: peer,
            https: listener.tls.is_some(),
            port: stream.local_addr().map(|a| a.port()).unwrap_or(0),
        };
        let (served, shutdown) = (served.clone(), shutdown.clone());
        // The connection's future is made inside the task's: made outside and moved in, it
        // would be held twice in the task (as the block's capture and as what it awaits).
        // And a plain connection's task is not sized for TLS's state.
        match listener.tls.clone() {
            Some(acceptor) => conns.spawn(async move {
                let _slot = slot;
                tls_connection(stream, info, acceptor, served, shutdown).await;
            }),
            None => {
                let plain = listener.plain.clone();
                conns.spawn(async move {
                    let _slot = slot;
                    plain_connection(stream, info, plain, served, shutdown).await;
                })
            }
        };
    }
    conns
}

/// One client connection of the TLS listener: the handshake (bounded by
/// [`TLS_HANDSHAKE_TIMEOUT`]), then its requests until it closes, in the HTTP version ALPN
/// chose.
pub(super) async fn tls_connection(
    mut stream: tokio::net::TcpStream,
    info: ConnInfo,
    acceptor: TlsAcceptor,
    served: Served,
    shutdown: watch::Receiver<bool>,
) {
    let Some(info) = client_of(&mut stream, info, &served).await else {
        return;
    };
    let stream = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        // Boxed: the TLS state is 1.2 KiB, and each layer of the serving futures would
        // otherwise reserve room for it (an async call keeps its arguments' slots).
        Ok(Ok(s)) => Box::new(s),
        Ok(Err(e)) => {
            tracing::debug!(client.addr = %info.client, "TLS handshake failed: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!(client.addr = %info.client, "TLS handshake timed out");
            return;
        }
    };
    // Over TLS a client speaks HTTP/2 only when ALPN chose it (RFC 9113, section 3.3).
    let protocol = match stream.get_ref().1.alpn_protocol() {
        Some(b"h2") => Protocol::Http2,
        _ => Protocol::Http1,
    };
    // Over TLS the first request's time counts from the end of the handshake.
    let first_request_by = Instant::now() + first_request_within(served.idle_timeout);
    serve_connection(
        stream,
        protocol,
        info,
        Plain::default(),
        served,
        first_request_by,
        shutdown,
    )
    .await;
}

/// One client connection of the plain listener: its requests until it closes, in the HTTP
/// version its first bytes tell ([`sniff`]).
pub(super) async fn plain_connection(
    mut stream: tokio::net::TcpStream,
    info: ConnInfo,
    mut plain: Plain,
    served: Served,
    mut shutdown: watch::Receiver<bool>,
) {
    let listener_port = info.port;
    let Some(info) = client_of(&mut stream, info, &served).await else {
        return;
    };
    // Behind a balancer users reach on port 80, the redirect goes to its HTTPS port, 443, not
    // to the gateway's own HTTPS listener port behind it.
    if info.port != listener_port && info.port == 80 {
        plain.redirect_to = plain.redirect_to.map(|_| 443);
    }
    // The first request's time counts from connecting: telling the version spends it too, so
    // a client that waits before it starts its headers gets no longer than one that does not.
    let within = first_request_within(served.idle_timeout);
    let first_request_by = Instant::now() + within;
    let protocol = tokio::select! {
        sniffed = tokio::time::timeout_at(first_request_by, sniff(&stream)) => match sniffed {
            Ok(Ok(protocol)) => protocol,
            Ok(Err(e)) => {
                tracing::debug!(client.addr = %info.client, "connection ended before its first request: {e}");
                return;
            }
            Err(_) => {
                tracing::debug!(
                    client.addr = %info.client,
                    "no complete request headers within {within:?} of connecting; closed"
                );
                return;
            }
        },
        // Accepted before the gateway stopped taking connections: its client may be sending
        // its first request right now (it connected while we still listened), so that request
        // is still answered if it comes soon; dropping the connection would lose it.
        () = async {
            // The watch's guard ends here, before the wait below.
            let _ = shutdown.wait_for(|stop| *stop).await;
        } => {
            match tokio::time::timeout(FIRST_REQUEST_AT_SHUTDOWN, sniff(&stream)).await {
                Ok(Ok(protocol)) => protocol,
                _ => return,
            }
        }
    };
    serve_connection(
        stream,
        protocol,
        info,
        plain,
        served,
        first_request_by,
        shutdown,
    )
    .await;
}

/// The connection's client and the port it reached: the socket's, or with
/// `listen.proxy_protocol` those the balancer's header names (the balancer's port, which users
/// see, goes into `X-Forwarded-Port`). `None` (the connection is closed) when the header is
/// missing or bad.
async fn client_of(
    stream: &mut tokio::net::TcpStream,
    info: ConnInfo,
    served: &Served,
) -> Option<ConnInfo> {
    if !served.proxy_protocol {
        return Some(info);
    }
    match crate::proxy_header::read(stream).await {
        Ok(proxied) => Some(match proxied {
            Some(p) => ConnInfo {
                client: p.client,
                port: p.destination.port(),
                ..info
            },
            None => info,
        }),
        Err(e) => {
            crate::proxy_header::refused("http", info.client, &e);
            None
        }
    }
}

/// The HTTP version a connection speaks, known before hyper reads from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

/// The HTTP version of a plain connection, told from its first bytes without taking them from
/// the socket: HTTP/2 with prior knowledge (h2c) starts with the preface, anything else is
/// HTTP/1.x, which the first byte or two tell.
///
/// hyper's own detection (hyper-util's `auto` server) reads the first 24 bytes itself and
/// hands them back in front of the socket. That costs a read per connection, and hyper's
/// first real read, finding its 8 KiB buffer partly filled, doubles it: 16 KiB held for the
/// connection's whole life. Peeking leaves the bytes where they are, so hyper reads them into
/// the 8 KiB buffer it keeps.
async fn sniff(stream: &tokio::net::TcpStream) -> std::io::Result<Protocol> {
    let mut first = [0u8; H2_PREFACE.len()];
    loop {
        let n = stream.peek(&mut first).await?;
        // An end of stream is HTTP/1's to see (and close on).
        if n == 0 || first[..n] != H2_PREFACE[..n] {
            return Ok(Protocol::Http1);
        }
        if n == H2_PREFACE.len() {
            return Ok(Protocol::Http2);
        }
        // Only the start of the preface so far. A peek returns at once while bytes wait in
        // the socket, so look again a little later. Rare: clients send the preface in one
        // write.
        tokio::time::sleep(PREFACE_RECHECK).await;
    }
}

pub(super) struct Listener {
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    /// What the plain listener answers itself.
    plain: Plain,
}

/// What a plain HTTP listener answers itself instead of proxying.
#[derive(Clone, Default)]
pub(super) struct Plain {
    /// TLS is configured: redirect to this HTTPS port.
    pub(super) redirect_to: Option<u16>,
    /// ACME: HTTP-01 answers, served before any redirect.
    pub(super) challenges: Option<Arc<acme::Challenges>>,
}

async fn accept_opt(
    l: Option<&Listener>,
) -> std::io::Result<((tokio::net::TcpStream, SocketAddr), &Listener)> {
    match l {
        Some(l) => l.listener.accept().await.map(|a| (a, l)),
        None => std::future::pending().await,
    }
}

/// hyper's HTTP/1 and HTTP/2 server connection builders with the `[http]` limits.
pub struct Builders {
    h1: hyper::server::conn::http1::Builder,
    h2: hyper::server::conn::http2::Builder<TokioExecutor>,
}

/// The connection builders with `[http]` limits: header block size (`max_header_bytes`, at
/// least 8 KiB; hyper's own ceilings are above it, so the gateway answers with its page),
/// HTTP/2 header list size, keep-alive pings. (The header read timeout is the watchdog's.)
pub fn connection_builders(max_header_bytes: usize) -> Builders {
    let max_header = max_header_bytes.max(8192);
    let mut h1 = hyper::server::conn::http1::Builder::new();
    h1.timer(TokioTimer::new())
        .keep_alive(true)
        // No timer of hyper's per request head: the connection's watchdog (below) closes a
        // connection whose next request's headers have not come `idle_timeout` after the last
        // request ended (or `FIRST_REQUEST_WITHIN` after connecting), checked every quarter of
        // it. That is the same protection against slow header senders, coarser by at most a
        // quarter, and it saves arming and clearing a timer (and allocating it) per request.
        .header_read_timeout(None)
        // Past this hyper answers a bare 431 itself (no body), which a browser shows as an empty
        // error page. So, as for HTTP/2 below, hyper's ceiling is above `max_header_bytes`
        // (twice it), and a request head between the two gets the gateway's 431 page
        // (`Frontend::check`), which says what to do. A browser's cookies grow a few KB at a
        // time, so the first request past the limit lands in that band. The ceiling bounds
        // what one connection may make the gateway buffer while its head is read; hyper also
        // caps a connection's queued response bytes with it (128 KiB at the default limit,
        // below hyper's own default of about 400 KiB).
        .max_buf_size(max_header.saturating_mul(2))
        // A request's end of stream is not taken for a client gone away while the request is
        // in flight: a client that closes its sending side once its request is out still gets
        // the answer, as from HAProxy (without `option abortonclose`). A client that leaves
        // is noticed when its answer is written; until then the request runs on the VM, for
        // at most `response_header_timeout` while it waits for the head. It also saves a read
        // buffer per request: to look for that end, hyper reads while the request's own bytes
        // still share its buffer, so it reads into a new one (8 KiB allocated and freed per
        // request; the reservation alone cost about 420 instructions and 6 first-level cache
        // misses, callgrind at 64 connections).
        .half_close(true);
    let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        // Past this, h2 answers a bare 431 itself (no body, then the stream reset), and a
        // browser shows an empty error. So the ceiling is four times `max_header_bytes`, and
        // a request between the two gets the gateway's 431 page (`Frontend::check`), which
        // tells the user what to do: the usual cause is a site's cookies piling up. The block
        // is held while it is decoded, one per connection at a time.
        .max_header_list_size(u32::try_from(max_header.saturating_mul(4)).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .max_concurrent_streams(Some(256));
    Builders { h1, h2 }
}

/// A hyper server connection being served: a future that ends with the connection, which can
/// be told to finish (close once the request in flight, if any, is answered).
trait ServerConn: Future<Output = hyper::Result<()>> {
    fn finish(self: Pin<&mut Self>);
}

impl<I, S> ServerConn for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    S: HyperService<Incoming, ResBody = Body>,
    S::Error: Into<BoxError>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    fn finish(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S> ServerConn for hyper::server::conn::http2::Connection<I, S, TokioExecutor>
where
    S: HyperService<Incoming, ResBody = Body>,
    S::Error: Into<BoxError>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    TokioExecutor: hyper::rt::bounds::Http2ServerConnExec<S::Future, Body>,
{
    fn finish(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Serves one client connection (plain or TLS) in `protocol` until it closes, it has not sent
/// its first request's headers by `first_request_by`, it is idle for `http.idle_timeout` or
/// the gateway shuts down.
async fn serve_connection<I>(
    io: I,
    protocol: Protocol,
    info: ConnInfo,
    plain: Plain,
    served: Served,
    first_request_by: Instant,
    shutdown: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Served {
        frontend,
        builders,
        idle_timeout,
        proxy_protocol: _,
    } = served;
    let client = frontend.client(info);
    let tick = check_every(idle_timeout).min(check_every(frontend.response_header_timeout()));
    let svc_client = client.clone();
    let svc = service_fn(move |req: Request<Incoming>| {
        let answer = match plain
            .challenges
            .as_deref()
            .and_then(|c| acme_challenge_answer(c, &req, svc_client.span()))
        {
            Some(resp) => Some(resp),
            None => plain.redirect_to.map(|port| redirect_to_https(&req, port)),
        };
        // Checked and prepared now: the future holds what the attempts need, not the request.
        // Boxed: hyper keeps the service's future (the block below) in a slot per connection
        // sized for it, and a pointer is cheaper to hold (and to move there) than the state.
        // It counts the request as in flight itself, until the body is sent.
        let handled = match answer {
            Some(resp) => Err(svc_client.tracker().begin().attach(resp)),
            None => Ok(Box::pin(frontend.handle_on(req, &svc_client))),
        };
        async move {
            Ok::<_, Infallible>(match handled {
                Ok(handling) => handling.await,
                Err(resp) => resp,
            })
        }
    });
    let io = TokioIo::new(io);
    // The connection is made inside `drive`, so that the task holds it once (a value moved
    // into an async call is often held twice: by the caller and by the callee).
    match protocol {
        Protocol::Http1 => {
            let conn = || builders.h1.serve_connection(io, svc).with_upgrades();
            drive(conn, client, idle_timeout, tick, first_request_by, shutdown).await;
        }
        Protocol::Http2 => {
            let conn = || builders.h2.serve_connection(io, svc);
            // Boxed: HTTP/2's connection state is the larger, and only TLS browsers' page
            // loads use it; unboxed it would size every HTTP/1 connection's task too.
            Box::pin(drive(
                conn,
                client,
                idle_timeout,
                tick,
                first_request_by,
                shutdown,
            ))
            .await;
        }
    }
}

/// Drives the connection `make` makes until it ends, with its watchdog (see [`watchdog`]) in a
/// task of its own.
async fn drive<C: ServerConn>(
    make: impl FnOnce() -> C,
    client: Arc<ClientConn>,
    idle_timeout: Duration,
    tick: Duration,
    first_request_by: Instant,
    shutdown: watch::Receiver<bool>,
) {
    let conn = make();
    tokio::pin!(conn);
    // The timers and the shutdown watch live in a task of their own, which tells this one when
    // to stop: polled here, they would be polled on every wake-up of the connection (every
    // request and every body chunk), the shutdown watch under a lock shared by all
    // connections.
    let (stop_tx, mut stop) = tokio::sync::oneshot::channel();
    client.watch_response_heads();
    let watched = client.clone();
    let watching = tokio::spawn(watchdog(
        client,
        idle_timeout,
        tick,
        first_request_by,
        shutdown,
        stop_tx,
    ));
    let mut closing = false;
    // Once finishing, hyper closes the connection itself when it has nothing left to send: an
    // idle one at once (HTTP/1.1 also with the next request's headers partly read), one with
    // requests in flight once their responses are written out. What hyper does not end is a
    // connection whose first request's headers are only partly there (a slow header sender
    // waits for the rest): with no request started a check later, it is cut.
    //
    // A response whose body has ended is not the end of its bytes: hyper may still hold the
    // last of them (up to its send buffer, about 400 KiB per HTTP/2 stream) for a client that
    // reads slowly. So a connection that has had requests is cut only when it has been idle
    // for `idle_timeout`, as before the shutdown; cut at the first check, a download running
    // at the signal lost its last bytes whenever the check came before the client read them.
    let mut recheck = tokio::time::interval(tick);
    // At a shutdown, a connection whose first request has not started is given
    // FIRST_REQUEST_AT_SHUTDOWN for it (hyper would close it at once as idle); then it is
    // finished like the others.
    // Its timer is made only then: a connection's task carries no second timer for it.
    let mut first_by: Option<(tokio::time::Instant, tokio::time::Interval)> = None;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(parent: watched.span(), "connection ended: {e}");
                }
                break;
            }
            () = first_request_check(&mut first_by) => {
                if watched.tracker().has_started() {
                    first_by = None;
                    conn.as_mut().finish();
                    recheck.reset();
                } else if first_by
                    .as_ref()
                    .is_some_and(|(by, _)| tokio::time::Instant::now() >= *by)
                {
                    tracing::debug!(
                        parent: watched.span(),
                        "no request within {FIRST_REQUEST_AT_SHUTDOWN:?} of the shutdown; closed"
                    );
                    break;
                }
            }
            _ = recheck.tick(), if closing && first_by.is_none() => {
                // The watchdog may be gone (it failed): a request waiting on its VM still
                // times out.
                watched.poke_waiting_request();
                let tracker = watched.tracker();
                match tracker.idle_for() {
                    Some(_) if !tracker.has_started() => {
                        tracing::debug!(
                            parent: watched.span(),
                            "the first request's headers did not come before the shutdown; closed"
                        );
                        break;
                    }
                    Some(idle) if idle >= idle_timeout => {
                        tracing::debug!(
                            parent: watched.span(),
                            "no request in flight for {idle_timeout:?} while the connection finished; closed"
                        );
                        break;
                    }
                    _ => {}
                }
            }
            why = &mut stop, if !closing => {
                closing = true;
                match why {
                    Ok(Stop::NoRequest) => {
                        // Dropping the connection closes it: no request has started.
                        tracing::debug!(
                            parent: watched.span(),
                            "no complete request headers within {:?} of connecting; closed",
                            first_request_within(idle_timeout)
                        );
                        break;
                    }
                    Ok(Stop::Finish) if !watched.tracker().has_started() => {
                        first_by = Some((
                            tokio::time::Instant::now() + FIRST_REQUEST_AT_SHUTDOWN,
                            tokio::time::interval(FIRST_REQUEST_RECHECK),
                        ));
                    }
                    Ok(Stop::Finish) => {
                        conn.as_mut().finish();
                        recheck.reset();
                    }
                    // The watchdog failed: finish the request in flight, as when idle, and
                    // keep its response header timeout here.
                    Err(_) => {
                        tracing::warn!(parent: watched.span(), "HTTP connection watchdog ended unexpectedly; finishing the connection");
                        conn.as_mut().finish();
                        recheck.reset();
                    }
                }
            }
        }
    }
    watching.abort();
}

/// How long a connection accepted before a shutdown (or the handover of an upgrade) may take to
/// start its first request, which is then answered: its client connected while the gateway
/// listened and has every reason to expect an answer.
const FIRST_REQUEST_AT_SHUTDOWN: Duration = Duration::from_secs(2);

/// How often a connection waiting for its first request at a shutdown looks whether it has
/// started.
const FIRST_REQUEST_RECHECK: Duration = Duration::from_millis(10);

/// The next look whether a connection waiting for its first request at a shutdown has started
/// one; never while it is not waiting.
async fn first_request_check(waiting: &mut Option<(tokio::time::Instant, tokio::time::Interval)>) {
    match waiting {
        Some((_, every)) => {
            every.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// How often a timeout kept by the watchdog is checked: a quarter of it (so it ends at most a
/// quarter late), from 100 ms to 15 s.
fn check_every(timeout: Duration) -> Duration {
    (timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(15))
}

/// Why a client connection is to stop.
enum Stop {
    /// No request's headers came within [`FIRST_REQUEST_WITHIN`] of connecting: close it.
    NoRequest,
    /// Idle for `http.idle_timeout`, or the gateway shuts down: finish the request in flight
    /// (if any), then close.
    Finish,
}

/// Watches one client connection: closes it when its first request's headers have not come
/// by `first_request_by` ([`first_request_within`] of its start), finishes it when it has
/// been idle for `idle_timeout` or the gateway shuts down, gives its VM connection back to
/// the shared list when it has gone unused for a tick, and has the request waiting on a
/// response head check `response_header_timeout` every `tick`. Tells the connection's task
/// through `stop`, and ends when that task does.
async fn watchdog(
    client: Arc<ClientConn>,
    idle_timeout: Duration,
    tick: Duration,
    first_request_by: Instant,
    mut shutdown: watch::Receiver<bool>,
    mut stop: tokio::sync::oneshot::Sender<Stop>,
) {
    let tracker = client.tracker();
    let mut tick = tokio::time::interval(tick);
    let first_request = tokio::time::sleep_until(first_request_by);
    tokio::pin!(first_request);
    let mut started = false;
    let why = loop {
        tokio::select! {
            () = &mut first_request, if !started => {
                // Checked now: a request may have started since the branch was armed.
                if !tracker.has_started() {
                    break Stop::NoRequest;
                }
                started = true;
            }
            _ = tick.tick() => {
                if tracker.idle_for().is_some_and(|d| d >= idle_timeout) {
                    // Before any request (an idle timeout shorter than the first-request
                    // minute), there is nothing to finish.
                    break if tracker.has_started() { Stop::Finish } else { Stop::NoRequest };
                }
                // A VM connection unused since the last tick goes back to the shared list,
                // which notices the VM closing it and closes it when unused too long.
                client.age_upstream();
                client.poke_waiting_request();
            }
            // Looks at the current value first: the connection may have been accepted before
            // the shutdown and handed over after it (its first request came within
            // FIRST_REQUEST_AT_SHUTDOWN).
            _ = shutdown.wait_for(|stop| *stop) => break Stop::Finish,
            () = stop.closed() => return,
        }
    };
    let _ = stop.send(why);
}

/// The answer to an ACME HTTP-01 request (`/.well-known/acme-challenge/TOKEN`): the key
/// authorization of a token being validated, else 404. `None` for every other path.
pub(super) fn acme_challenge_answer<B>(
    challenges: &acme::Challenges,
    req: &Request<B>,
    span: &tracing::Span,
) -> Option<Response<Body>> {
    let token = req.uri().path().strip_prefix(acme::CHALLENGE_PREFIX)?;
    let mut resp = match challenges.answer(token) {
        Some(key_authorization) => {
            tracing::info!(parent: span, token, "ACME: answered an HTTP-01 challenge");
            Response::new(full(key_authorization))
        }
        None => {
            let mut resp = Response::new(full("no such ACME challenge\n"));
            *resp.status_mut() = StatusCode::NOT_FOUND;
            resp
        }
    };
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    Some(resp)
}

/// `listen.http` while TLS is configured: a 308 to the same path on the HTTPS port.
pub(super) fn redirect_to_https<B>(req: &Request<B>, https_port: u16) -> Response<Body> {
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
pub(super) fn strip_port(host: &str) -> &str {
    if let Some(end) = host.strip_prefix('[').and_then(|h| h.find(']')) {
        return &host[..end + 2];
    }
    match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}
