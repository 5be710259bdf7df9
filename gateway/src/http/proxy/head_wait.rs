//! `http.response_header_timeout` for the request a client connection has waiting on its VM,
//! kept by the connection's watchdog instead of a timer per request.
//!
//! An HTTP/1.1 connection has at most one request waiting for a response head at a time. The
//! watchdog, which ticks anyway, pokes that request every quarter of the timeout; the request
//! then reads its clock and gives up once the timeout has passed, so it ends at most a quarter
//! late. A request that finds the slot taken (HTTP/2 streams wait side by side), or a
//! connection no watchdog looks at (`Frontend::handle`), uses a timer of its own.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::Duration;

use futures::task::AtomicWaker;
use tokio::time::Instant;

/// The response head did not come within the timeout.
#[derive(Debug)]
pub(super) struct TimedOut;

/// A client connection's slot for its one request waiting on a response head.
#[derive(Default)]
pub(super) struct HeadWait {
    /// A watchdog pokes this connection's waiting request.
    watched: AtomicBool,
    /// A request holds the slot.
    waiting: AtomicBool,
    /// The watchdog asked the waiting request to read its clock.
    poked: AtomicBool,
    waker: AtomicWaker,
}

impl HeadWait {
    /// From now on a watchdog calls [`Self::poke`] at least every quarter of the timeout.
    pub(super) fn set_watched(&self) {
        self.watched.store(true, Ordering::Release);
    }

    /// Asks the waiting request, if any, to see whether its time is up.
    pub(super) fn poke(&self) {
        if self.waiting.load(Ordering::Acquire) {
            self.poked.store(true, Ordering::Release);
            self.waker.wake();
        }
    }

    /// `head`'s output, or [`TimedOut`] once `timeout` has passed since `started`. `head` is
    /// pinned by the caller: the request's future holds it once, not moved again.
    pub(super) async fn wait<F: Future>(
        &self,
        mut head: Pin<&mut F>,
        started: Instant,
        timeout: Duration,
    ) -> Result<F::Output, TimedOut> {
        let Some(_slot) = self.take_slot() else {
            // Rare (HTTP/2, or no watchdog): boxed, so the common case's future stays small.
            return Box::pin(tokio::time::timeout_at(started + timeout, head))
                .await
                .map_err(|_| TimedOut);
        };
        std::future::poll_fn(|cx| {
            // Registered before the flag is read: a poke after the read wakes this task.
            self.waker.register(cx.waker());
            if self.poked.swap(false, Ordering::AcqRel) && started.elapsed() >= timeout {
                return Poll::Ready(Err(TimedOut));
            }
            head.as_mut().poll(cx).map(Ok)
        })
        .await
    }

    /// The slot, when a watchdog looks at this connection and no other request holds it.
    fn take_slot(&self) -> Option<Slot<'_>> {
        if !self.watched.load(Ordering::Acquire) {
            return None;
        }
        self.waiting
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()?;
        self.poked.store(false, Ordering::Release);
        Some(Slot(self))
    }
}

/// Holds [`HeadWait`]'s slot; frees it when dropped (the head came, the request gave up, or
/// the client went away).
struct Slot<'a>(&'a HeadWait);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.waiting.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::pin;

    #[tokio::test(start_paused = true)]
    async fn the_waiting_request_times_out_at_the_first_poke_after_its_timeout() {
        let wait = std::sync::Arc::new(HeadWait::default());
        wait.set_watched();
        let started = Instant::now();
        let waiting = tokio::spawn({
            let wait = wait.clone();
            async move {
                wait.wait(
                    pin!(std::future::pending::<()>()),
                    started,
                    Duration::from_secs(60),
                )
                .await
            }
        });
        // Pokes before the timeout change nothing.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(15)).await;
            wait.poke();
            tokio::task::yield_now().await;
        }
        assert!(!waiting.is_finished(), "45 s: in time");
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert!(
            !waiting.is_finished(),
            "65 s, but without a poke the request waits on"
        );
        wait.poke();
        assert!(matches!(waiting.await.unwrap(), Err(TimedOut)));
        assert!(
            !wait.waiting.load(Ordering::Acquire),
            "the slot is free again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_in_time_is_the_answer_and_frees_the_slot() {
        let wait = HeadWait::default();
        wait.set_watched();
        let started = Instant::now();
        let head = async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            "head"
        };
        let answer = wait
            .wait(pin!(head), started, Duration::from_secs(60))
            .await;
        assert_eq!(answer.unwrap(), "head");
        assert!(!wait.waiting.load(Ordering::Acquire));
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_waiting_request_or_an_unwatched_connection_uses_a_timer() {
        let unwatched = HeadWait::default();
        let started = Instant::now();
        let answer = unwatched
            .wait(
                pin!(std::future::pending::<()>()),
                started,
                Duration::from_secs(60),
            )
            .await;
        assert!(answer.is_err());
        assert_eq!(started.elapsed(), Duration::from_secs(60));

        let wait = std::sync::Arc::new(HeadWait::default());
        wait.set_watched();
        let first = tokio::spawn({
            let wait = wait.clone();
            async move {
                wait.wait(
                    pin!(std::future::pending::<()>()),
                    Instant::now(),
                    Duration::from_secs(60),
                )
                .await
            }
        });
        tokio::task::yield_now().await;
        assert!(
            wait.waiting.load(Ordering::Acquire),
            "the first holds the slot"
        );
        let started = Instant::now();
        let second = wait
            .wait(
                pin!(std::future::pending::<()>()),
                started,
                Duration::from_secs(30),
            )
            .await;
        assert!(second.is_err());
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(30),
            "its own timer, on time"
        );
        first.abort();
    }
}
