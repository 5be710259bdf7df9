//! Keep-alive HTTP/1.1 connections to VMs, driven by the task of the request that uses them.
//!
//! hyper-util's pooled client runs every upstream connection in a task of its own: a request
//! travels to that task through a channel, and the response head and every body chunk travel
//! back through others, so each proxied request costs two task switches (often across worker
//! threads) on top of the socket work. Here the request's own task polls the connection while
//! it waits for the response head, and the response body polls it while the client's
//! connection reads the body.
//!
//! When the body ends the connection is kept by the client connection it served ([`Kept`]):
//! a browser's sticky cookie sends its next request to the same VM, which then goes out on the
//! same connection without touching the shared list (no lock, no lookup by address). The
//! client connection gives it back to the shared idle list per VM address when it has gone
//! unused for a while (at most twice the client connection's check interval, 30 s by
//! default), when it closes, or when its next request goes to another VM.
//! Nothing polls a connection while it is idle, so a connection is checked when it is taken (a
//! VM that closed it is noticed then), and those in the shared list are closed by
//! [`Upstreams::close_idle`] when the VM closed them or they outlived the idle timeout.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::BoxError;
use super::body::Handoff;

type Conn = http1::Connection<TokioIo<TcpStream>, Handoff>;

/// One connection to a VM: the request side and the connection future that does its I/O.
struct Link {
    sender: http1::SendRequest<Handoff>,
    /// `None` once the connection future has completed (closed or failed). It is dropped then,
    /// as hyper expects: that hands a request still queued on it back to its sender (a VM that
    /// closed an idle connection just as a request was put on it) instead of leaving it
    /// waiting on a connection nobody polls.
    conn: Option<Conn>,
}

impl Link {
    /// Polls the connection's I/O once; drops it when it has ended.
    fn drive(&mut self, cx: &mut Context<'_>) {
        if let Some(conn) = &mut self.conn
            && let Poll::Ready(r) = Pin::new(conn).poll(cx)
        {
            self.conn = None;
            if let Err(e) = r {
                tracing::debug!("upstream connection ended: {e}");
            }
        }
    }

    fn done(&self) -> bool {
        self.conn.is_none()
    }
}

struct Idle {
    link: Box<Link>,
    since: Instant,
}

/// An idle connection kept by one client connection, and the VM address it goes to. No clock
/// is read for it: the client connection ages it every few seconds ([`Kept::age`]), and one
/// not used again between two of those goes back to the shared list, which times it from
/// then.
struct Parked {
    authority: Arc<str>,
    link: Box<Link>,
    /// Kept since the last [`Kept::age`].
    fresh: bool,
}

/// The VM connection one client connection keeps between its requests (see the module
/// documentation). Dropped with the client connection, it gives the connection back to the
/// shared list.
pub(super) struct Kept {
    upstreams: Arc<Upstreams>,
    slot: Mutex<Option<Parked>>,
}

impl Kept {
    pub(super) fn new(upstreams: Arc<Upstreams>) -> Self {
        Self {
            upstreams,
            slot: Mutex::new(None),
        }
    }

    /// The kept connection, if it goes to `authority`; a kept connection to another VM goes
    /// back to the shared list.
    fn take(&self, authority: &str) -> Option<Box<Link>> {
        let Parked {
            authority: to,
            link,
            ..
        } = self.slot().take()?;
        if *to != *authority {
            self.upstreams.park_shared(to, link);
            return None;
        }
        Some(link)
    }

    /// Keeps `link` unless a connection is kept already; gives it back otherwise.
    fn keep(&self, authority: Arc<str>, link: Box<Link>) -> Option<(Arc<str>, Box<Link>)> {
        let mut slot = self.slot();
        if slot.is_some() {
            return Some((authority, link));
        }
        *slot = Some(Parked {
            authority,
            link,
            fresh: true,
        });
        None
    }

    /// Called every few seconds by the client connection: the kept connection goes back to
    /// the shared list when it has not been used since the last call, where the list's sweep
    /// ([`Upstreams::close_idle`]) notices the VM closing it and times it out. So a connection
    /// is kept unused for at most two calls' interval, also while the client connection has
    /// other requests in flight (HTTP/2 streams, a long download).
    pub(super) fn age(&self) {
        let stale = {
            let mut slot = self.slot();
            match slot.as_mut() {
                Some(parked) if parked.fresh => {
                    parked.fresh = false;
                    None
                }
                _ => slot.take(),
            }
        };
        self.give_back(stale);
    }

    /// Gives the kept connection, if any, back to the shared list.
    pub(super) fn release(&self) {
        let parked = self.slot().take();
        self.give_back(parked);
    }

    /// Puts a connection taken out of the slot (outside its lock) on the shared list.
    fn give_back(&self, parked: Option<Parked>) {
        if let Some(Parked {
            authority, link, ..
        }) = parked
        {
            self.upstreams.park_shared(authority, link);
        }
    }

    /// Whether a connection is kept.
    #[cfg(test)]
    pub(super) fn holds(&self) -> bool {
        self.slot().is_some()
    }

    fn slot(&self) -> MutexGuard<'_, Option<Parked>> {
        // Only ever replaced whole: a panic cannot leave it half written.
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        self.release();
    }
}

/// Why a request got no response head from the VM.
pub(super) enum SendError {
    /// No connection could be made (refused, unreachable, timed out); the request was not
    /// sent anywhere.
    Connect(String),
    /// The connection failed after the request was handed to it.
    Http(hyper::Error),
}

/// Idle keep-alive connections per VM address, and how new ones are made.
pub(super) struct Upstreams {
    /// One lock for all VMs: it is held only to push or pop (a connection in the list is not
    /// `Sync`, so a concurrent map could not hold it anyway).
    idle: Mutex<HashMap<Arc<str>, Vec<Idle>>>,
    builder: http1::Builder,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle_per_vm: usize,
}

impl Upstreams {
    pub(super) fn new(
        connect_timeout: Duration,
        idle_timeout: Duration,
        max_idle_per_vm: usize,
    ) -> Self {
        Self {
            idle: Mutex::new(HashMap::new()),
            builder: http1::Builder::new(),
            connect_timeout,
            idle_timeout,
            max_idle_per_vm,
        }
    }

    /// Sends `req` (origin-form target, `Host` set) to `authority` on an idle connection if one
    /// is usable (the one `kept` by the client connection first), else on a new one, and
    /// returns the response once its head has arrived. The response body keeps the
    /// connection, and where to hand it back when it ends: to `kept`, else to the shared list.
    pub(super) fn send(
        self: &Arc<Self>,
        authority: Arc<str>,
        kept: Option<&Arc<Kept>>,
        mut req: Request<Handoff>,
    ) -> impl Future<Output = Result<Response<Driven>, SendError>> + Send + use<> {
        // The connection state is boxed: it moves from the idle list to the request and to the
        // response body, and inline it would make every request's future larger (hyper moves
        // that future around whole). It is taken here, before the future starts, and the
        // future holds the request once: every request's future is allocated and copied
        // whole, so its size is paid per request.
        let held = kept
            .and_then(|k| k.take(&authority))
            .and_then(usable)
            .or_else(|| self.checkout(&authority));
        let (this, kept) = (Arc::clone(self), kept.cloned());
        async move {
            let (mut link, mut reused) = match held {
                Some(link) => (link, true),
                None => (this.connect_boxed(&authority).await?, false),
            };
            let head = loop {
                let sent = {
                    let mut response = std::pin::pin!(link.sender.try_send_request(req));
                    std::future::poll_fn(|cx| {
                        link.drive(cx);
                        response.as_mut().poll(cx)
                    })
                    .await
                };
                // The error is dropped before the reconnect's await: held across it, it (and
                // the result it came in) would be room in every request's future.
                req = match sent {
                    Ok(head) => break head,
                    // A kept-alive connection failed before the request was written (the VM
                    // closed it while it sat idle): nothing reached the VM, so any request,
                    // POST included, goes out again on a new connection, once.
                    Err(mut e) if reused => match e.take_message() {
                        Some(unsent) => {
                            tracing::debug!(
                                "kept-alive connection to {authority} closed before the request was written ({}); reconnecting",
                                e.error()
                            );
                            unsent
                        }
                        None => return Err(SendError::Http(e.into_error())),
                    },
                    Err(e) => return Err(SendError::Http(e.into_error())),
                };
                link = this.connect_boxed(&authority).await?;
                reused = false;
            };
            let (parts, incoming) = head.into_parts();
            let mut body = Driven {
                incoming,
                link: Some(link),
                home: Some(Home {
                    upstreams: this,
                    authority,
                    kept,
                }),
            };
            if body.incoming.is_end_stream() {
                // No body to read (HEAD, 204, 304, `Content-Length: 0`): the server side may
                // never poll it, so the connection goes back now.
                body.check_in();
            }
            Ok(Response::from_parts(parts, body))
        }
    }

    /// The most recently used idle connection to `authority` in the shared list that is still
    /// open and ready.
    fn checkout(&self, authority: &str) -> Option<Box<Link>> {
        loop {
            let Idle { link, since } = self.idle().get_mut(authority)?.pop()?;
            if since.elapsed() >= self.idle_timeout {
                // The rest of the list is older still: left to `close_idle`.
                return None;
            }
            if let Some(link) = usable(link) {
                return Some(link);
            }
        }
    }

    /// [`Self::connect`], boxed: its future is large and only new connections need it.
    async fn connect_boxed(&self, authority: &str) -> Result<Box<Link>, SendError> {
        Box::pin(self.connect(authority))
            .await
            .map_err(SendError::Connect)
    }

    async fn connect(&self, authority: &str) -> Result<Box<Link>, String> {
        let stream = connect_tcp(authority, self.connect_timeout).await?;
        let (sender, conn) = self
            .builder
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP/1.1 handshake with {authority}: {e}"))?;
        Ok(Box::new(Link {
            sender,
            conn: Some(conn),
        }))
    }

    /// A response has been read to its end: its connection is kept by the client connection
    /// when it has none, else it goes to the shared list.
    fn check_in(&self, authority: Arc<str>, link: Box<Link>, kept: Option<&Kept>) {
        // Not polled here: whoever takes the connection next polls it first ([`usable`]),
        // which finishes the exchange (hyper marks the connection ready for a request) and
        // notices a VM that closed it, and so does the idle sweep. Polled here as well, it cost
        // a second pass through hyper's dispatcher per request (about 750 instructions,
        // callgrind at 64 connections).
        if link.done() {
            return;
        }
        let (authority, link) = match kept {
            Some(kept) => match kept.keep(authority, link) {
                Some(back) => back,
                None => return,
            },
            None => (authority, link),
        };
        self.park_shared(authority, link);
    }

    /// Puts an idle connection on the shared list of its VM, unless the list is full.
    fn park_shared(&self, authority: Arc<str>, link: Box<Link>) {
        let since = Instant::now();
        let mut lists = self.idle();
        let list = lists.entry(authority).or_default();
        if list.len() < self.max_idle_per_vm {
            list.push(Idle { link, since });
        }
    }

    /// Closes connections idle for longer than the idle timeout, and those the VM closed. The
    /// lists are checked outside the lock (requests keep checking connections out and in
    /// meanwhile) and what survives is put back ahead of the connections checked in since.
    pub(super) fn close_idle(&self) {
        let taken = std::mem::take(&mut *self.idle());
        let mut cx = Context::from_waker(Waker::noop());
        let mut kept = Vec::with_capacity(taken.len());
        for (authority, mut list) in taken {
            list.retain_mut(|idle| {
                idle.link.drive(&mut cx);
                !idle.link.done() && idle.since.elapsed() < self.idle_timeout
            });
            if !list.is_empty() {
                kept.push((authority, list));
            }
        }
        let mut idle = self.idle();
        for (authority, mut list) in kept {
            let newer = idle.entry(authority).or_default();
            list.append(newer);
            // Over the cap (connections checked in while the lock was free): the oldest go.
            let over = list.len().saturating_sub(self.max_idle_per_vm);
            list.drain(..over);
            *newer = list;
        }
    }

    /// Idle connections held, over all VMs.
    #[cfg(test)]
    pub(super) fn idle_count(&self) -> usize {
        self.idle().values().map(Vec::len).sum()
    }

    fn idle(&self) -> MutexGuard<'_, HashMap<Arc<str>, Vec<Idle>>> {
        // A panic while holding the lock leaves a consistent map (plain pushes and pops).
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// `link` if it is still open and ready for a request. One poll (without a waker: the request
/// polls the connection again at once, with its own) reads what the VM sent while the
/// connection sat idle: an end of stream (the VM closed it) completes the connection future.
fn usable(mut link: Box<Link>) -> Option<Box<Link>> {
    link.drive(&mut Context::from_waker(Waker::noop()));
    (!link.done() && link.sender.is_ready()).then_some(link)
}

/// A TCP connection to a VM's HTTP port (`NODELAY` set), for requests and for upgrades alike;
/// the error says what failed, naming the address.
pub(super) async fn connect_tcp(authority: &str, timeout: Duration) -> Result<TcpStream, String> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(authority)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(format!("connect {authority}: {e}")),
        Err(_) => {
            return Err(format!(
                "connect {authority}: no answer within {}",
                humantime::format_duration(timeout)
            ));
        }
    };
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!("TCP_NODELAY on the connection to {authority}: {e}");
    }
    super::tcp_keepalive(&stream);
    super::vm_user_timeout(&stream);
    Ok(stream)
}

/// A response body from a VM. Reading it drives the connection it arrives on; once it has
/// been read to the end the connection goes back to the idle list. Dropped before the end
/// (the client went away), it closes the connection: HTTP/1.1 cannot abandon a response and
/// keep the connection.
pub struct Driven {
    incoming: Incoming,
    link: Option<Box<Link>>,
    home: Option<Home>,
}

/// Where a connection goes back to when its response has been read.
struct Home {
    upstreams: Arc<Upstreams>,
    authority: Arc<str>,
    /// The client connection that keeps it, if any.
    kept: Option<Arc<Kept>>,
}

impl Driven {
    fn check_in(&mut self) {
        if let (Some(link), Some(home)) = (self.link.take(), self.home.take()) {
            home.upstreams
                .check_in(home.authority, link, home.kept.as_deref());
        }
    }
}

impl HttpBody for Driven {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(link) = &mut this.link {
            link.drive(cx);
        }
        let polled = Pin::new(&mut this.incoming).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.check_in(),
            // hyper's server stops polling after the last data frame (`is_end_stream`) or
            // after trailers, which always come last.
            Poll::Ready(Some(Ok(frame)))
                if frame.is_trailers() || this.incoming.is_end_stream() =>
            {
                this.check_in();
            }
            Poll::Ready(Some(Err(_))) => this.link = None,
            _ => {}
        }
        polled.map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}

/// Keeps the compiler honest about the bounds the server needs of a response body.
const _: fn() = || {
    fn bounds<T: Send + 'static>() {}
    bounds::<Driven>();
};

#[cfg(test)]
mod tests;
