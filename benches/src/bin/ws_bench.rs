//! Websocket measurement client of the end-to-end harness (`benches/e2e/run`).
//!
//! ```text
//! ws_bench echo --url ws://127.0.0.1:PORT/ws [--connections 1] [--seconds 5] [--size 32]
//! ws_bench idle --url ws://127.0.0.1:PORT/ws --count 10000 [--concurrency 64]
//! ```
//!
//! `echo`: each connection sends a message, waits for its echo, and sends the next, for the
//! given time; prints one line `p50_us=… p99_us=… msgs_per_s=… messages=…` (round trips from
//! send to echo received, over every connection).
//!
//! `idle`: opens `count` websocket connections (`concurrency` handshakes at a time), prints
//! `ready N`, and holds them (answering pings) until killed.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{WebSocketStream, client_async};

#[derive(Debug)]
struct Options {
    mode: String,
    url: String,
    connections: usize,
    seconds: f64,
    size: usize,
    count: usize,
    concurrency: usize,
}

fn parse() -> anyhow::Result<Options> {
    let mut args = std::env::args().skip(1);
    let mode = args.next().context("missing mode: echo or idle")?;
    let mut o = Options {
        mode,
        url: String::new(),
        connections: 1,
        seconds: 5.0,
        size: 32,
        count: 1000,
        concurrency: 64,
    };
    while let Some(arg) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--url" => o.url = value,
            "--connections" => o.connections = value.parse()?,
            "--seconds" => o.seconds = value.parse()?,
            "--size" => o.size = value.parse()?,
            "--count" => o.count = value.parse()?,
            "--concurrency" => o.concurrency = value.parse()?,
            _ => bail!("unknown option {arg}"),
        }
    }
    if !o.url.starts_with("ws://") {
        bail!("--url ws://HOST:PORT/PATH is required");
    }
    if o.connections == 0 || o.concurrency == 0 {
        bail!("--connections and --concurrency must be at least 1");
    }
    Ok(o)
}

fn main() -> ExitCode {
    let options = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("ws_bench: {e:#}\nusage: ws_bench echo|idle --url ws://HOST:PORT/PATH …");
            return ExitCode::from(2);
        }
    };
    poolgate_benches::run_main("ws_bench", async {
        match options.mode.as_str() {
            "echo" => echo(&options).await,
            "idle" => idle(&options).await,
            other => Err(anyhow::anyhow!("unknown mode {other}: echo or idle")),
        }
    })
}

type Ws = WebSocketStream<TcpStream>;

async fn open(url: &str) -> anyhow::Result<Ws> {
    let authority = url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap_or_default();
    let tcp = TcpStream::connect(authority)
        .await
        .with_context(|| format!("connect to {authority}"))?;
    tcp.set_nodelay(true)?;
    let (ws, _) = client_async(url, tcp)
        .await
        .with_context(|| format!("websocket handshake with {url}"))?;
    Ok(ws)
}

async fn echo(o: &Options) -> anyhow::Result<()> {
    let payload = "x".repeat(o.size);
    let mut streams = Vec::with_capacity(o.connections);
    for _ in 0..o.connections {
        streams.push(open(&o.url).await?);
    }
    // The clock starts once every connection is open: handshakes are not round trips.
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(o.seconds);
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|ws| tokio::spawn(round_trips(ws, payload.clone(), deadline)))
        .collect();
    let mut samples = Vec::new();
    for task in tasks {
        samples.extend(task.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    if samples.is_empty() {
        bail!("no round trip completed");
    }
    samples.sort_unstable();
    let pct = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    println!(
        "p50_us={} p99_us={} msgs_per_s={:.0} messages={}",
        pct(0.50),
        pct(0.99),
        samples.len() as f64 / elapsed,
        samples.len()
    );
    Ok(())
}

/// Round trips on one connection until `deadline`; each sample in microseconds.
async fn round_trips(mut ws: Ws, payload: String, deadline: Instant) -> anyhow::Result<Vec<u64>> {
    let mut samples = Vec::new();
    while Instant::now() < deadline {
        let sent = Instant::now();
        ws.send(Message::text(payload.clone())).await?;
        loop {
            match ws.next().await.context("connection closed")?? {
                Message::Text(t) if t.len() == payload.len() => break,
                Message::Text(_) | Message::Binary(_) => bail!("unexpected echo"),
                _ => {}
            }
        }
        samples.push(sent.elapsed().as_micros() as u64);
    }
    let _ = ws.close(None).await;
    Ok(samples)
}

async fn idle(o: &Options) -> anyhow::Result<()> {
    let mut open_streams = Vec::with_capacity(o.count);
    let mut pending = futures_util::stream::iter((0..o.count).map(|_| open(&o.url)))
        .buffer_unordered(o.concurrency);
    while let Some(ws) = pending.next().await {
        open_streams.push(ws?);
    }
    let n = open_streams.len();
    for mut ws in open_streams {
        // Keep reading so pings are answered and a closed connection is noticed.
        tokio::spawn(async move { while let Some(Ok(_)) = ws.next().await {} });
    }
    println!("ready {n}");
    std::future::pending::<()>().await;
    Ok(())
}
