//! The floor under any hyper 1.x HTTP/1.1 reverse proxy, for the HTTP benchmarks
//! (`benches/e2e/http-ab`, `benches/e2e/http-instructions`).
//!
//! ```text
//! h1_floor --listen 127.0.0.1:PORT --upstream 127.0.0.1:PORT
//! ```
//!
//! hyper's HTTP/1.1 server connection in front, hyper's HTTP/1.1 client connection behind, and
//! nothing else: each client connection gets its own upstream connection on its first request,
//! every request is sent on unchanged (headers, body) and every response comes back unchanged.
//! No routing, no cookie, no forwarding headers, no hop-by-hop stripping, no log, no metrics,
//! no timeouts. It is not a proxy to run for anyone; it measures what hyper's two h1 legs cost
//! on this machine, so a benchmark can split a gateway's cost per request into hyper's share
//! and the gateway's own. Prints `listening ADDR` once bound. Runs on the gateway's runtime
//! (multi-threaded, a worker per CPU: one when pinned, as in the benchmarks).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};

use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

fn main() -> ExitCode {
    let mut listen = String::from("127.0.0.1:0");
    let mut upstream = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--listen", Some(v)) => listen = v,
            ("--upstream", Some(v)) => upstream = Some(v),
            _ => upstream = None,
        }
    }
    let Some(upstream) = upstream.and_then(|u| u.parse::<SocketAddr>().ok()) else {
        eprintln!("usage: h1_floor --listen 127.0.0.1:PORT --upstream IP:PORT");
        return ExitCode::from(2);
    };
    poolgate_benches::run_main_multi_thread("h1_floor", serve(listen, upstream))
}

async fn serve(listen: String, upstream: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(&listen).await?;
    println!("listening {}", listener.local_addr()?);
    poolgate_benches::serve_connections("h1_floor", listener, move |stream| async move {
        Ok(client_connection(stream, upstream).await?)
    })
    .await
}

/// The upstream connection of one client connection: opened for its first request, then
/// taken for each request and put back once the response head has arrived (hyper's h1 server
/// serves one request of a connection at a time).
type Link = Arc<Mutex<Option<SendRequest<Incoming>>>>;

async fn client_connection(stream: TcpStream, upstream: SocketAddr) -> hyper::Result<()> {
    let link: Link = Arc::new(Mutex::new(None));
    let svc = service_fn(move |req: Request<Incoming>| forward(link.clone(), upstream, req));
    hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), svc)
        .await
}

async fn forward(
    link: Link,
    upstream: SocketAddr,
    req: Request<Incoming>,
) -> anyhow::Result<Response<Incoming>> {
    let held = link.lock().unwrap_or_else(PoisonError::into_inner).take();
    let mut sender = match held {
        Some(s) if !s.is_closed() => s,
        _ => {
            let stream = TcpStream::connect(upstream).await?;
            let _ = stream.set_nodelay(true);
            let (sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    eprintln!("h1_floor: upstream connection: {e}");
                }
            });
            sender
        }
    };
    sender.ready().await?;
    let resp = sender.send_request(req).await?;
    *link.lock().unwrap_or_else(PoisonError::into_inner) = Some(sender);
    Ok(resp)
}
