//! Body wrappers: byte counting with an end hook, the retry hand-off for request bodies, and
//! per-connection in-flight tracking (for the idle timeout).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::Response;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use super::{Body, BoxError, empty};

/// Passes a body `B` through, counting data bytes; runs its hook `F` when dropped (body
/// finished, client gone, or response discarded) with the data bytes that passed. Both are type
/// parameters, not boxes: every proxied request and response gets one or two of these, and
/// each is boxed once, whole ([`Observed::boxed`]).
pub struct Observed<B = Body, F: FnOnce(u64) + Send + 'static = fn(u64)> {
    inner: B,
    bytes: u64,
    counter: Option<Arc<AtomicU64>>,
    on_end: Option<F>,
}

impl<B, F: FnOnce(u64) + Send + 'static> Observed<B, F> {
    /// Wraps `inner`; `on_end` gets the byte count.
    pub fn new(inner: B, on_end: F) -> Self {
        Self {
            inner,
            bytes: 0,
            counter: None,
            on_end: Some(on_end),
        }
    }

    /// Boxes it.
    pub fn boxed(self) -> Body
    where
        B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        BodyExt::boxed_unsync(self)
    }
}

impl<B> Observed<B> {
    /// Wraps `inner`, adding its bytes to `counter` as they pass.
    pub fn counting(inner: B, counter: Arc<AtomicU64>) -> Self {
        Self {
            inner,
            bytes: 0,
            counter: Some(counter),
            on_end: None,
        }
    }
}

// The hook is never pinned (it is only taken out and called on drop), so the wrapper may move
// whenever the body may.
impl<B: Unpin, F: FnOnce(u64) + Send + 'static> Unpin for Observed<B, F> {}

impl<B, F: FnOnce(u64) + Send + 'static> Drop for Observed<B, F> {
    fn drop(&mut self) {
        if let Some(hook) = self.on_end.take() {
            hook(self.bytes);
        }
    }
}

impl<B, F> HttpBody for Observed<B, F>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    F: FnOnce(u64) + Send + 'static,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            let n = data.len() as u64;
            this.bytes += n;
            if let Some(c) = &this.counter {
                c.fetch_add(n, Ordering::Relaxed);
            }
        }
        polled.map(|frame| frame.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Where a request body waits until the upstream connection polls it. If connecting to the VM
/// fails, the body was never polled and [`Handoff::take_back`] returns it for the next VM. A
/// request without a body has no slot (nothing to hand back but an empty body).
pub struct Slot(Option<Arc<Mutex<Option<Body>>>>);

/// A request body sent to a VM through a [`Slot`].
pub struct Handoff {
    slot: Slot,
    body: Option<Body>,
    hint: SizeHint,
    end: bool,
}

impl Handoff {
    /// Puts `body` in a fresh slot; returns the slot and the body to send.
    pub fn new(body: Body) -> (Slot, Self) {
        let hint = body.size_hint();
        let end = body.is_end_stream();
        let slot = Arc::new(Mutex::new(Some(body)));
        (
            Slot(Some(slot.clone())),
            Self {
                slot: Slot(Some(slot)),
                body: None,
                hint,
                end,
            },
        )
    }

    /// For a request without a body: no slot, nothing allocated.
    pub fn bodiless() -> (Slot, Self) {
        (
            Slot(None),
            Self {
                slot: Slot(None),
                body: None,
                hint: SizeHint::with_exact(0),
                end: true,
            },
        )
    }

    /// The body, if the upstream connection never started reading it (an empty body when the
    /// request had none: that is always there to send again).
    pub fn take_back(slot: &Slot) -> Option<Body> {
        match &slot.0 {
            Some(slot) => slot.lock().ok().and_then(|mut s| s.take()),
            None => Some(empty()),
        }
    }
}

impl HttpBody for Handoff {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.body.is_none()
            && let Some(slot) = &this.slot.0
        {
            this.body = slot.lock().ok().and_then(|mut s| s.take());
        }
        match &mut this.body {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.body {
            Some(b) => b.is_end_stream(),
            None => self.end,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.body {
            Some(b) => b.size_hint(),
            None => self.hint,
        }
    }
}

/// Requests in flight on one client connection, and since when it has had none.
#[derive(Debug, Clone)]
pub struct ConnTracker {
    inner: Arc<TrackerInner>,
}

#[derive(Debug)]
struct TrackerInner {
    active: AtomicUsize,
    /// A request has started on this connection.
    started: AtomicBool,
    /// Milliseconds after `epoch` when the last request finished.
    idle_since: AtomicU64,
    epoch: Instant,
}

impl Default for ConnTracker {
    fn default() -> Self {
        Self::new()
    }
}

impl ConnTracker {
    /// A connection with no request yet (idle from now).
    pub fn new() -> Self {
        Self {
            inner: Arc::new(TrackerInner {
                active: AtomicUsize::new(0),
                started: AtomicBool::new(false),
                idle_since: AtomicU64::new(0),
                epoch: Instant::now(),
            }),
        }
    }

    /// A request starts; it ends when the returned guard (or the response it is attached to)
    /// is dropped.
    pub fn begin(&self) -> Active {
        self.inner.started.store(true, Ordering::Release);
        self.inner.active.fetch_add(1, Ordering::AcqRel);
        Active {
            inner: self.inner.clone(),
        }
    }

    /// Whether a request (its headers complete) has started on this connection.
    pub fn has_started(&self) -> bool {
        self.inner.started.load(Ordering::Acquire)
    }

    /// How long the connection has had no request in flight; `None` while one is.
    pub fn idle_for(&self) -> Option<Duration> {
        if self.inner.active.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.inner.idle_since.load(Ordering::Acquire));
        Some(self.inner.epoch.elapsed().saturating_sub(since))
    }
}

/// One request in flight.
#[derive(Debug)]
pub struct Active {
    inner: Arc<TrackerInner>,
}

impl Active {
    /// Keeps the request in flight until `resp`'s body is finished or dropped.
    pub fn attach(self, resp: Response<Body>) -> Response<Body> {
        resp.map(|b| Observed::new(b, move |_| drop(self)).boxed())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        let ms = u64::try_from(self.inner.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.inner.idle_since.store(ms, Ordering::Release);
        self.inner.active.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::full;

    #[tokio::test]
    async fn observed_counts_and_reports_once() {
        let seen = Arc::new(AtomicU64::new(u64::MAX));
        let s = seen.clone();
        let body = Observed::new(full("hello"), move |n| s.store(n, Ordering::SeqCst));
        let bytes = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        assert_eq!(&bytes[..], b"hello");
        assert_eq!(seen.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn handoff_returns_an_unread_body() {
        let (slot, sent) = Handoff::new(full("abc"));
        assert_eq!(sent.size_hint().exact(), Some(3));
        drop(sent); // the connection failed before reading it
        let back = Handoff::take_back(&slot).expect("still there");
        let (slot, sent) = Handoff::new(back);
        let bytes = sent
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        assert_eq!(&bytes[..], b"abc");
        assert!(Handoff::take_back(&slot).is_none());
    }

    #[test]
    fn tracker_is_idle_only_without_requests() {
        let t = ConnTracker::new();
        assert!(t.idle_for().is_some());
        let a = t.begin();
        assert!(t.idle_for().is_none());
        let resp = a.attach(Response::new(full("x")));
        assert!(t.idle_for().is_none());
        drop(resp);
        assert!(t.idle_for().is_some_and(|d| d < Duration::from_secs(5)));
    }
}
