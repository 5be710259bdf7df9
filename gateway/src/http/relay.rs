//! Relays an upgraded connection (websocket) both ways without holding buffers while idle.
//!
//! `tokio::io::copy_bidirectional` keeps two 8 KiB buffers for the life of the connection:
//! with thousands of idle kernel and terminal websockets that is most of the gateway's memory
//! (19 KiB per idle websocket, 16 of them buffers). Here each read goes into a buffer on the
//! stack of the poll call and is written on at once; only bytes the writer cannot take yet are
//! copied to the heap, and that copy is freed as soon as it is written. An idle connection
//! holds no buffer, a busy one reads in 16 KiB chunks. Semantics match `copy_bidirectional`:
//! end of input on one side shuts down writing on the other, the relay ends when both
//! directions have, and the first error ends it; with one difference: once one direction has
//! ended, the other gets `half_closed` to end too, and then the relay ends anyway.
//!
//! That grace is what frees a websocket whose VM has gone. A websocket does not use TCP's
//! half-close: the side that closes first is done. When a VM's Jupyter server dies, the VM
//! closes its end, the gateway passes the end on, and a browser then closes its own. A client
//! that does not (a script's websocket library, a laptop that went to sleep) would otherwise
//! keep the relay, and the browser session it holds on the dead VM, for as long as it keeps
//! its socket. nginx ends an upgraded connection as soon as either side has closed and what
//! it read is written; the grace also lets a last message in flight through.

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes read per poll; lives on the stack, never in the connection's state.
const CHUNK: usize = 16 * 1024;

/// One direction's state: a few words while idle.
#[derive(Default)]
struct Direction {
    /// Bytes read but not yet accepted by the writer.
    pending: Vec<u8>,
    /// How much of `pending` has been written.
    written: usize,
    /// Data written since the last flush.
    need_flush: bool,
    /// The reader reached end of input.
    read_done: bool,
    /// The writer has been shut down: this direction is finished.
    done: bool,
    /// Bytes relayed.
    bytes: u64,
}

impl Direction {
    fn poll_relay<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if self.written < self.pending.len() {
                let n = write_now(writer.as_mut(), cx, &self.pending[self.written..])?;
                self.count(n);
                self.written += n;
                if self.written < self.pending.len() {
                    return Poll::Pending;
                }
                // Written: give the memory back rather than keeping it for the next burst.
                self.pending = Vec::new();
                self.written = 0;
            }
            if self.read_done {
                ready!(writer.as_mut().poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [MaybeUninit::<u8>::uninit(); CHUNK];
            let mut buf = ReadBuf::uninit(&mut chunk);
            match reader.as_mut().poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Nothing more to read for now: push out what was written (a TLS writer
                    // may hold a record back until flushed).
                    if self.need_flush {
                        ready!(writer.as_mut().poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
            }
            let data = buf.filled();
            if data.is_empty() {
                self.read_done = true;
                continue;
            }
            let n = write_now(writer.as_mut(), cx, data)?;
            self.count(n);
            if n < data.len() {
                // The writer is full and will wake us: keep the rest until then.
                self.pending = data[n..].to_vec();
                self.written = 0;
                return Poll::Pending;
            }
        }
    }

    fn count(&mut self, written: usize) {
        self.bytes += written as u64;
        self.need_flush |= written > 0;
    }
}

/// Writes as much of `data` as `writer` takes now. `Ok(n)` with `n < data.len()` means the
/// writer is full and will wake the task when it has room.
fn write_now<W: AsyncWrite + ?Sized>(
    mut writer: Pin<&mut W>,
    cx: &mut Context<'_>,
    data: &[u8],
) -> io::Result<usize> {
    let mut sent = 0;
    while sent < data.len() {
        match writer.as_mut().poll_write(cx, &data[sent..]) {
            Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => sent += n,
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => break,
        }
    }
    Ok(sent)
}

/// Copies `a` to `b` and `b` to `a` until both directions have ended, or until one has and
/// the other has not within `half_closed`; returns the bytes copied `(a to b, b to a)`.
pub(super) async fn relay<A, B>(
    a: &mut A,
    b: &mut B,
    half_closed: Duration,
) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut a_to_b = Direction::default();
    let mut b_to_a = Direction::default();
    // Armed when the first direction ends; allocated only then.
    let mut grace: Option<Pin<Box<tokio::time::Sleep>>> = None;
    poll_fn(|cx| {
        let forward = a_to_b.poll_relay(cx, Pin::new(&mut *a), Pin::new(&mut *b))?;
        let backward = b_to_a.poll_relay(cx, Pin::new(&mut *b), Pin::new(&mut *a))?;
        if forward.is_ready() && backward.is_ready() {
            return Poll::Ready(Ok((a_to_b.bytes, b_to_a.bytes)));
        }
        if forward.is_ready() || backward.is_ready() {
            let timer = grace.get_or_insert_with(|| Box::pin(tokio::time::sleep(half_closed)));
            ready!(timer.as_mut().poll(cx));
            return Poll::Ready(Ok((a_to_b.bytes, b_to_a.bytes)));
        }
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    /// Long enough that no test here reaches it unless it waits for it.
    const GRACE: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn relays_both_ways_and_counts_bytes() {
        let (mut client, mut a) = duplex(64);
        let (mut b, mut server) = duplex(64);
        let relay = tokio::spawn(async move { relay(&mut a, &mut b, GRACE).await });

        // More than the duplex capacity and more than one chunk, so the writer pushes back
        // and the pending copy is exercised.
        let up: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..70_000u32).map(|i| (i % 241) as u8).collect();
        let (up_c, down_c) = (up.clone(), down.clone());
        let writer = tokio::spawn(async move {
            client.write_all(&up_c).await?;
            client.shutdown().await?;
            let mut got = Vec::new();
            client.read_to_end(&mut got).await?;
            io::Result::Ok(got)
        });
        let mut got_up = vec![0; up.len()];
        server.read_exact(&mut got_up).await.expect("read up");
        server.write_all(&down_c).await.expect("write down");
        server.shutdown().await.expect("shutdown");
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.expect("eof up");

        assert_eq!(got_up, up);
        assert!(rest.is_empty());
        assert_eq!(writer.await.expect("join").expect("client"), down);
        let (ab, ba) = relay.await.expect("join").expect("relay");
        assert_eq!((ab, ba), (up.len() as u64, down.len() as u64));
    }

    #[tokio::test]
    async fn end_of_input_shuts_down_the_other_side_only() {
        let (mut client, mut a) = duplex(1024);
        let (mut b, mut server) = duplex(1024);
        let relay = tokio::spawn(async move { relay(&mut a, &mut b, GRACE).await });

        client.shutdown().await.expect("shutdown");
        let mut buf = Vec::new();
        server
            .read_to_end(&mut buf)
            .await
            .expect("eof reaches the server");
        // The other direction still works after the half-close.
        server.write_all(b"still here").await.expect("write");
        let mut got = [0u8; 10];
        client.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"still here");
        assert!(!relay.is_finished());
        drop(server);
        let mut tail = Vec::new();
        client
            .read_to_end(&mut tail)
            .await
            .expect("eof reaches the client");
        assert_eq!(relay.await.expect("join").expect("relay"), (0, 10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_side_left_half_open_is_closed_after_the_grace() {
        let (mut client, mut a) = duplex(1024);
        let (mut b, mut server) = duplex(1024);
        let relay = tokio::spawn(async move { relay(&mut a, &mut b, GRACE).await });

        // The server says its last word and goes; the client keeps its socket and says nothing.
        server.write_all(b"bye").await.expect("write");
        server.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        client
            .read_to_end(&mut got)
            .await
            .expect("eof reaches the client");
        assert_eq!(got, b"bye");
        let started = tokio::time::Instant::now();
        let counts = relay.await.expect("join").expect("relay");
        assert_eq!(counts, (0, 3));
        assert_eq!(started.elapsed(), GRACE);
        // The relay let go of the client's side: writing to it now fails.
        assert!(client.write_all(b"anyone?").await.is_err());
    }

    #[tokio::test]
    async fn an_idle_relay_holds_no_buffer() {
        let (mut client, mut a) = duplex(16);
        let (mut b, mut server) = duplex(16);
        let mut a_to_b = Direction::default();
        client.write_all(b"hello").await.expect("write");
        let mut cx = Context::from_waker(std::task::Waker::noop());
        // Reads "hello", writes it on, then finds nothing more to read.
        assert!(
            a_to_b
                .poll_relay(&mut cx, Pin::new(&mut a), Pin::new(&mut b))
                .is_pending()
        );
        assert_eq!(a_to_b.pending.capacity(), 0);
        assert_eq!(a_to_b.bytes, 5);
        let mut got = [0u8; 5];
        server.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"hello");
    }
}
