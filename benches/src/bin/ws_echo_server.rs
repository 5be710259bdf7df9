//! Websocket echo upstream for the end-to-end harness (`benches/e2e/run`).
//!
//! ```text
//! ws_echo_server --listen 127.0.0.1:PORT
//! ```
//!
//! Every websocket message is sent back unchanged. A request that is not a websocket upgrade
//! (a proxy's health check) gets `200 ok` and the connection is closed. Prints `listening ADDR`
//! once bound. Single-threaded: the harness pins it to one CPU.

use std::process::ExitCode;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// How much of a request is inspected to tell an upgrade from a plain GET.
const PEEK_LIMIT: usize = 4096;

fn main() -> ExitCode {
    let mut listen = String::from("127.0.0.1:0");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--listen", Some(v)) => listen = v,
            _ => {
                eprintln!("usage: ws_echo_server --listen 127.0.0.1:PORT");
                return ExitCode::from(2);
            }
        }
    }
    poolgate_benches::run_main("ws_echo_server", serve(&listen))
}

async fn serve(listen: &str) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("listening {}", listener.local_addr()?);
    poolgate_benches::serve_connections("ws_echo_server", listener, handle).await
}

async fn handle(mut stream: TcpStream) -> anyhow::Result<()> {
    if !is_upgrade(&stream).await? {
        let mut buf = vec![0u8; PEEK_LIMIT];
        let _ = stream.read(&mut buf).await?;
        stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
            .await?;
        return Ok(());
    }
    let mut ws = tokio_tungstenite::accept_async(stream).await?;
    while let Some(msg) = ws.next().await {
        match msg? {
            m @ (Message::Text(_) | Message::Binary(_)) => ws.send(m).await?,
            Message::Close(_) => break,
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    }
    Ok(())
}

/// Whether the request head (peeked, not consumed) asks for a websocket upgrade.
async fn is_upgrade(stream: &TcpStream) -> anyhow::Result<bool> {
    let mut buf = vec![0u8; PEEK_LIMIT];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            anyhow::bail!("closed before a request");
        }
        let head = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
        if head.contains("\r\n\r\n") || n == buf.len() {
            return Ok(head.contains("upgrade: websocket"));
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}
