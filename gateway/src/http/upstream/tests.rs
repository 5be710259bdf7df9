//! Unit tests of the upstream connection pool.

use std::sync::atomic::{AtomicUsize, Ordering};

use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, StatusCode};
use tokio::net::TcpListener;

use super::*;

/// A VM that counts the connections it accepted. `/close` answers with
/// `Connection: close`; `/big` sends 1 MiB; `/empty` a 204; anything else "ok".
struct Vm {
    authority: String,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn vm() -> Vm {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let authority = listener.local_addr().expect("addr").to_string();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            conns.spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    if req.uri().path() == "/trailers" {
                        // hyper sends only the trailer fields the head announces.
                        let mut resp = Response::new(
                            http_body_util::combinators::UnsyncBoxBody::new(WithTrailers(2)),
                        );
                        resp.headers_mut()
                            .insert(header::TRAILER, HeaderValue::from_static("x-checksum"));
                        return Ok::<_, hyper::Error>(resp);
                    }
                    let mut resp = match req.uri().path() {
                        "/big" => Response::new(Full::new(Bytes::from(vec![b'x'; 1 << 20]))),
                        "/empty" => {
                            let mut r = Response::new(Full::new(Bytes::new()));
                            *r.status_mut() = StatusCode::NO_CONTENT;
                            r
                        }
                        _ => Response::new(Full::new(Bytes::from_static(b"ok"))),
                    };
                    if req.uri().path() == "/close" {
                        resp.headers_mut()
                            .insert(header::CONNECTION, HeaderValue::from_static("close"));
                    }
                    Ok::<_, hyper::Error>(resp.map(|b| {
                        http_body_util::combinators::UnsyncBoxBody::new(
                            b.map_err(|never| match never {}),
                        )
                    }))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Vm {
        authority,
        accepted,
        task,
    }
}

/// A chunked body: "ok", then a trailer (sent when the request says `TE: trailers`).
struct WithTrailers(u8);

impl HttpBody for WithTrailers {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let left = self.0;
        self.0 = left.saturating_sub(1);
        Poll::Ready(match left {
            2 => Some(Ok(Frame::data(Bytes::from_static(b"ok")))),
            1 => {
                let mut trailers = hyper::HeaderMap::new();
                trailers.insert("x-checksum", HeaderValue::from_static("abc"));
                Some(Ok(Frame::trailers(trailers)))
            }
            _ => None,
        })
    }
}

fn request(method: Method, path: &'static str, host: &str) -> Request<Handoff> {
    let (_, body) = Handoff::new(super::super::empty());
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = hyper::Uri::from_static(path);
    req.headers_mut()
        .insert(header::HOST, HeaderValue::from_str(host).expect("host"));
    req
}

fn upstreams(idle_timeout: Duration) -> Arc<Upstreams> {
    Arc::new(Upstreams::new(Duration::from_secs(2), idle_timeout, 8))
}

/// Sends `req` to `vm`; panics naming the error when no response head comes back.
async fn open(up: &Arc<Upstreams>, vm: &Vm, req: Request<Handoff>) -> Response<Driven> {
    open_for(up, None, vm, req).await
}

/// [`open`] for the client connection that `kept` belongs to, if any.
async fn open_for(
    up: &Arc<Upstreams>,
    kept: Option<&Arc<Kept>>,
    vm: &Vm,
    req: Request<Handoff>,
) -> Response<Driven> {
    match up.send(vm.authority.as_str().into(), kept, req).await {
        Ok(r) => r,
        Err(SendError::Connect(e)) => panic!("connect: {e}"),
        Err(SendError::Http(e)) => panic!("http: {e}"),
    }
}

async fn fetch(up: &Arc<Upstreams>, vm: &Vm, path: &'static str) -> (StatusCode, usize) {
    fetch_for(up, None, vm, path).await
}

/// A GET of `path` to `vm` (for the client connection that `kept` belongs to, if any), read
/// whole.
async fn fetch_for(
    up: &Arc<Upstreams>,
    kept: Option<&Arc<Kept>>,
    vm: &Vm,
    path: &'static str,
) -> (StatusCode, usize) {
    let resp = open_for(up, kept, vm, request(Method::GET, path, &vm.authority)).await;
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, body.len())
}

#[tokio::test]
async fn a_connection_is_reused_once_its_response_was_read() {
    let vm = vm().await;
    let up = upstreams(Duration::from_secs(30));
    for _ in 0..5 {
        assert_eq!(fetch(&up, &vm, "/").await, (StatusCode::OK, 2));
        assert_eq!(up.idle_count(), 1);
    }
    assert_eq!(fetch(&up, &vm, "/big").await, (StatusCode::OK, 1 << 20));
    assert_eq!(fetch(&up, &vm, "/empty").await, (StatusCode::NO_CONTENT, 0));
    assert_eq!(vm.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_body_without_bytes_gives_the_connection_back_unread() {
    let vm = vm().await;
    let up = upstreams(Duration::from_secs(30));
    let resp = open(&up, &vm, request(Method::HEAD, "/", &vm.authority)).await;
    assert_eq!(up.idle_count(), 1, "checked in before the body is polled");
    drop(resp);
    assert_eq!(fetch(&up, &vm, "/").await, (StatusCode::OK, 2));
    assert_eq!(vm.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn the_last_data_frame_gives_the_connection_back_without_a_further_poll() {
    // hyper's server stops polling a body once `is_end_stream` says it has ended.
    let vm = vm().await;
    let up = upstreams(Duration::from_secs(30));
    let resp = open(&up, &vm, request(Method::GET, "/", &vm.authority)).await;
    let mut body = resp.into_body();
    let frame = body.frame().await.expect("a frame").expect("data");
    assert_eq!(frame.into_data().ok().as_deref(), Some(&b"ok"[..]));
    assert!(body.is_end_stream());
    assert_eq!(up.idle_count(), 1);
}

#[tokio::test]
async fn trailers_end_a_response_and_give_the_connection_back() {
    // hyper's server stops polling a body after its trailers.
    let vm = vm().await;
    let up = upstreams(Duration::from_secs(30));
    let mut req = request(Method::GET, "/trailers", &vm.authority);
    req.headers_mut()
        .insert(header::TE, HeaderValue::from_static("trailers"));
    let resp = open(&up, &vm, req).await;
    let mut body = resp.into_body();
    let data = body.frame().await.expect("a frame").expect("data");
    assert_eq!(data.into_data().ok().as_deref(), Some(&b"ok"[..]));
    let trailers = body.frame().await.expect("a frame").expect("trailers");
    assert!(trailers.is_trailers());
    assert_eq!(up.idle_count(), 1);
    assert_eq!(fetch(&up, &vm, "/").await, (StatusCode::OK, 2));
    assert_eq!(vm.accepted.load(Ordering::SeqCst), 1);
}

/// A VM that answers one request per connection, keeps the connection open (no
/// `Connection: close`) until told to close it, closes it and reports that.
struct ClosingVm {
    vm: Vm,
    close: tokio::sync::mpsc::UnboundedSender<()>,
    closed: tokio::sync::mpsc::UnboundedReceiver<()>,
}

async fn closing_vm() -> ClosingVm {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let authority = listener.local_addr().expect("addr").to_string();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let (closed_tx, closed) = tokio::sync::mpsc::unbounded_channel();
    let (close, mut close_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(n @ 1..) => head.extend_from_slice(&buf[..n]),
                    _ => break,
                }
            }
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
            if close_rx.recv().await.is_none() {
                return;
            }
            drop(stream);
            let _ = closed_tx.send(());
        }
    });
    ClosingVm {
        vm: Vm {
            authority,
            accepted,
            task,
        },
        close,
        closed,
    }
}

#[tokio::test]
async fn a_post_after_the_vm_closed_the_idle_connection_goes_out_on_a_new_one() {
    let ClosingVm {
        vm,
        close,
        mut closed,
    } = closing_vm().await;
    let authority = vm.authority.clone();
    let up = upstreams(Duration::from_secs(30));
    for round in 0..20 {
        // Whether the close is seen when the connection is taken or only once the request
        // is on it, the POST must not be lost, fail or hang.
        let sent = tokio::time::timeout(
            Duration::from_secs(10),
            up.send(
                authority.as_str().into(),
                None,
                request(Method::POST, "/", &authority),
            ),
        )
        .await
        .unwrap_or_else(|_| panic!("round {round}: the POST hung"));
        let resp = sent.unwrap_or_else(|_| panic!("round {round}: the POST failed"));
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], b"ok");
        assert_eq!(up.idle_count(), 1, "round {round}: kept alive");
        close.send(()).expect("the VM runs");
        closed.recv().await.expect("the VM reports its close");
    }
    assert_eq!(vm.accepted.load(Ordering::SeqCst), 20);
}

#[tokio::test]
async fn a_request_queued_on_a_connection_that_ends_comes_back_unsent() {
    // What `send` relies on when a VM closes a kept-alive connection just as a request is
    // put on it: the ended connection is dropped, which hands the request back (it used
    // to stay queued on a finished connection until the header timeout).
    let ClosingVm {
        vm,
        close,
        mut closed,
    } = closing_vm().await;
    let up = upstreams(Duration::from_secs(30));
    let mut link = up.connect(&vm.authority).await.expect("connect");
    let mut first = std::pin::pin!(link.sender.send_request(request(
        Method::GET,
        "/",
        &vm.authority
    )));
    let resp = std::future::poll_fn(|cx| {
        link.drive(cx);
        first.as_mut().poll(cx)
    })
    .await
    .expect("first response");
    let mut body = resp.into_body();
    std::future::poll_fn(|cx| {
        link.drive(cx);
        Pin::new(&mut body).poll_frame(cx)
    })
    .await;
    close.send(()).expect("the VM runs");
    closed.recv().await.expect("the VM reports its close");
    // The close is there to be read; the request is queued before the connection sees it.
    let mut second = std::pin::pin!(link.sender.try_send_request(request(
        Method::POST,
        "/",
        &vm.authority
    )));
    let outcome = tokio::time::timeout(
        Duration::from_secs(10),
        std::future::poll_fn(|cx| {
            link.drive(cx);
            second.as_mut().poll(cx)
        }),
    )
    .await
    .expect("the queued request hung on the ended connection");
    let mut err = outcome.expect_err("no answer from a closed connection");
    assert!(link.done());
    assert!(
        err.take_message().is_some(),
        "the unsent request comes back"
    );
}

#[tokio::test]
async fn a_response_dropped_half_read_closes_its_connection() {
    let vm = vm().await;
    let up = upstreams(Duration::from_secs(30));
    let resp = open(&up, &vm, request(Method::GET, "/big", &vm.authority)).await;
    let mut body = resp.into_body();
    let first = body.frame().await.expect("a frame").expect("data");
    assert!(first.is_data());
    drop(body);
    assert_eq!(up.idle_count(), 0);
    assert_eq!(fetch(&up, &vm, "/").await, (StatusCode::OK, 2));
    assert_eq!(vm.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_connection_the_vm_closed_is_not_used_again() {
    let vm = vm().await;
    let up = upstreams(Duration::from_secs(30));
    assert_eq!(fetch(&up, &vm, "/close").await, (StatusCode::OK, 2));
    assert_eq!(fetch(&up, &vm, "/").await, (StatusCode::OK, 2));
    assert_eq!(vm.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_refused_connection_is_a_connect_error() {
    let vm = vm().await;
    let authority = vm.authority.clone();
    drop(vm);
    // The listener is gone once its task is aborted; wait for that, not for a time.
    let up = upstreams(Duration::from_secs(30));
    let mut tries = 0;
    loop {
        match up
            .send(
                authority.as_str().into(),
                None,
                request(Method::GET, "/", &authority),
            )
            .await
        {
            Err(SendError::Connect(detail)) => {
                assert!(detail.contains(&authority), "{detail}");
                break;
            }
            _ if tries < 100 => tokio::task::yield_now().await,
            _ => panic!("the aborted VM still accepted connections"),
        }
        tries += 1;
    }
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    let vm = vm().await;
    let up = upstreams(Duration::from_millis(50));
    assert_eq!(fetch(&up, &vm, "/").await, (StatusCode::OK, 2));
    up.close_idle();
    assert_eq!(up.idle_count(), 1, "not idle long enough yet");
    tokio::time::sleep(Duration::from_millis(60)).await;
    up.close_idle();
    assert_eq!(up.idle_count(), 0);
    assert_eq!(fetch(&up, &vm, "/").await, (StatusCode::OK, 2));
    assert_eq!(vm.accepted.load(Ordering::SeqCst), 2);
}

/// [`fetch_for`] the client connection that `kept` belongs to.
async fn fetch_kept(
    up: &Arc<Upstreams>,
    kept: &Arc<Kept>,
    vm: &Vm,
    path: &'static str,
) -> (StatusCode, usize) {
    fetch_for(up, Some(kept), vm, path).await
}

#[tokio::test]
async fn a_client_connection_keeps_its_vm_connection_and_gives_it_back_when_it_closes() {
    let vm = vm().await;
    let up = upstreams(Duration::from_secs(30));
    let kept = Arc::new(Kept::new(up.clone()));
    for round in 0..5 {
        assert_eq!(fetch_kept(&up, &kept, &vm, "/").await, (StatusCode::OK, 2));
        assert!(kept.holds(), "round {round}: kept by the client connection");
        assert_eq!(up.idle_count(), 0, "round {round}: not in the shared list");
    }
    assert_eq!(
        vm.accepted.load(Ordering::SeqCst),
        1,
        "one connection for all"
    );
    drop(kept);
    assert_eq!(up.idle_count(), 1, "back in the shared list");
    // Another client connection takes it from there.
    let other = Arc::new(Kept::new(up.clone()));
    assert_eq!(fetch_kept(&up, &other, &vm, "/").await, (StatusCode::OK, 2));
    assert_eq!(vm.accepted.load(Ordering::SeqCst), 1);
    assert!(other.holds());
}

#[tokio::test]
async fn a_kept_connection_goes_back_when_the_next_request_goes_to_another_vm_or_on_release() {
    let (a, b) = (vm().await, vm().await);
    let up = upstreams(Duration::from_secs(30));
    let kept = Arc::new(Kept::new(up.clone()));
    assert_eq!(fetch_kept(&up, &kept, &a, "/").await, (StatusCode::OK, 2));
    assert_eq!(fetch_kept(&up, &kept, &b, "/").await, (StatusCode::OK, 2));
    assert_eq!(
        up.idle_count(),
        1,
        "the connection to A went to the shared list"
    );
    assert!(kept.holds(), "the one to B is kept");
    assert_eq!(fetch_kept(&up, &kept, &a, "/").await, (StatusCode::OK, 2));
    assert_eq!(
        a.accepted.load(Ordering::SeqCst),
        1,
        "A's connection reused"
    );
    assert_eq!(b.accepted.load(Ordering::SeqCst), 1);
    kept.release();
    assert!(!kept.holds());
    assert_eq!(up.idle_count(), 2, "both in the shared list");
}

#[tokio::test]
async fn a_kept_connection_the_vm_closed_is_not_used_again() {
    let ClosingVm {
        vm,
        close,
        mut closed,
    } = closing_vm().await;
    let up = upstreams(Duration::from_secs(30));
    let kept = Arc::new(Kept::new(up.clone()));
    for round in 0..3 {
        assert_eq!(fetch_kept(&up, &kept, &vm, "/").await, (StatusCode::OK, 2));
        assert!(kept.holds(), "round {round}");
        close.send(()).expect("the VM runs");
        closed.recv().await.expect("the VM reports its close");
    }
    assert_eq!(vm.accepted.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_kept_connection_unused_between_two_ages_goes_back_to_the_shared_list() {
    let vm = vm().await;
    let up = upstreams(Duration::from_secs(30));
    let kept = Arc::new(Kept::new(up.clone()));
    assert_eq!(fetch_kept(&up, &kept, &vm, "/").await, (StatusCode::OK, 2));
    kept.age();
    assert!(kept.holds(), "used since the last age: kept");
    assert_eq!(fetch_kept(&up, &kept, &vm, "/").await, (StatusCode::OK, 2));
    kept.age();
    assert!(kept.holds(), "used again: kept");
    kept.age();
    assert!(!kept.holds(), "unused for a whole interval: given back");
    assert_eq!(up.idle_count(), 1);
    assert_eq!(fetch_kept(&up, &kept, &vm, "/").await, (StatusCode::OK, 2));
    assert!(kept.holds(), "taken from the shared list and kept again");
    assert_eq!(
        vm.accepted.load(Ordering::SeqCst),
        1,
        "one connection throughout"
    );
}

/// A VM connection gives up on data the VM has not acknowledged after a minute (and probes an
/// idle one): without the user timeout, a message to a lost VM was retransmitted for about 15
/// minutes.
#[tokio::test]
async fn a_vm_connection_has_keepalive_and_a_user_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let stream = connect_tcp(&addr, Duration::from_secs(2))
        .await
        .expect("connect");
    let sock = socket2::SockRef::from(&stream);
    assert_eq!(
        sock.tcp_user_timeout().expect("TCP_USER_TIMEOUT"),
        Some(Duration::from_secs(60))
    );
    assert!(sock.keepalive().expect("SO_KEEPALIVE"));
}
