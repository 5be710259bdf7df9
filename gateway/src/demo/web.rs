//! A demo VM's web side: `GET /` (a page naming the VM), `GET /hub/health` (what the gateway
//! probes, as on JupyterHub) and a websocket echo at `/ws`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::html::escape;

type Body = Full<Bytes>;

/// Serves HTTP/1.1 (with upgrades) and HTTP/2 until aborted; aborting ends every connection.
pub(super) async fn serve(listener: TcpListener, vm: Arc<str>) {
    let mut connections = JoinSet::new();
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(%vm, error = %e, "demo VM: HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        let vm = vm.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let vm = vm.clone();
                async move { Ok::<_, Infallible>(respond(&vm, req)) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn respond(vm: &Arc<str>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, "/ws") => websocket(vm, req),
        (&Method::GET | &Method::HEAD, "/hub/health") => text(StatusCode::OK, "ok\n"),
        (&Method::GET | &Method::HEAD, "/") => {
            let host = req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("")
                .to_string();
            let mut response = Response::new(Full::new(Bytes::from(page(vm, &host))));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            if let Ok(value) = HeaderValue::from_str(vm) {
                response.headers_mut().insert("x-poolgate-demo-vm", value);
            }
            response
        }
        _ => text(StatusCode::NOT_FOUND, "not found on this demo VM\n"),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Answers a websocket handshake and echoes every text and binary message back.
fn websocket(vm: &Arc<str>, mut req: Request<Incoming>) -> Response<Body> {
    let headers = req.headers();
    let is_upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return text(
            StatusCode::BAD_REQUEST,
            "this is a websocket echo: connect with a websocket client\n",
        );
    };
    if !is_upgrade {
        return text(StatusCode::BAD_REQUEST, "expected Upgrade: websocket\n");
    }
    let upgrade = hyper::upgrade::on(&mut req);
    let vm = vm.clone();
    tokio::spawn(async move {
        let upgraded = match upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!(%vm, error = %e, "demo VM: websocket upgrade failed");
                return;
            }
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(message)) = ws.next().await {
            let echo = match message {
                Message::Text(_) | Message::Binary(_) => message,
                Message::Close(_) => break,
                // Pings are answered by tungstenite itself.
                _ => continue,
            };
            if ws.send(echo).await.is_err() {
                break;
            }
        }
        let _ = ws.close(None).await;
    });
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    response
}

/// The page a browser sees through the gateway.
fn page(vm: &str, host: &str) -> String {
    let vm = escape(vm);
    let host = escape(host);
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>poolgate demo VM {vm}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:42rem;margin:3rem auto;line-height:1.5}}
code{{background:#f3f3f3;padding:0 .3em}} #log{{background:#f7f7f7;padding:.5em;min-height:3em;white-space:pre-wrap}}</style>
</head><body>
<h1>You are on demo VM <code id="vm">{vm}</code></h1>
<p>This page is served by demo VM <strong>{vm}</strong> of a <code>poolgate demo</code> pool, reached
through the gateway at <code>{host}</code>. The gateway pinned this browser to {vm} with a cookie:
reload and you stay here; open a private window and you may land elsewhere.</p>
<p>Websocket echo through the gateway (<code>/ws</code>):</p>
<form id="f"><input id="msg" value="hello from the browser" size="40"> <button>send</button></form>
<div id="log"></div>
<script>
const log = (t) => document.getElementById('log').textContent += t + "\n";
const ws = new WebSocket((location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws');
ws.onopen = () => log('connected');
ws.onmessage = (e) => log('echo: ' + e.data);
ws.onclose = () => log('closed');
document.getElementById('f').onsubmit = (e) => {{ e.preventDefault(); ws.send(document.getElementById('msg').value); }};
</script>
</body></html>
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_names_the_vm_and_escapes() {
        let html = page("demo-1", "127.0.0.1:8080");
        assert!(html.contains("demo VM <code id=\"vm\">demo-1</code>"));
        assert!(page("<x>", "h").contains("&lt;x&gt;"));
    }
}
