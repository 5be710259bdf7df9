//! Holds many idle SSH sessions open, for the end-to-end harness's memory scenario
//! (`benches/e2e/run`).
//!
//! ```text
//! ssh_idle --addr 127.0.0.1:PORT --user NAME --key PRIVATE_KEY --host-key HOST_KEY.pub
//!          --count 1000 [--concurrency 32] [--command cat]
//! ```
//!
//! Each session is its own SSH connection (its own TCP connection, key exchange and
//! authentication — not channels multiplexed on one connection) with one session channel
//! running `command` (default `cat`, which waits on its stdin). Prints `ready N` once all are
//! open and holds them until killed. The server's host key must equal `--host-key`.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use futures_util::StreamExt;
use russh::client::{self, AuthResult, Handle};
use russh::keys::{PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{Channel, ChannelMsg};
use tokio::net::TcpStream;

#[derive(Debug)]
struct Options {
    addr: String,
    user: String,
    key: String,
    host_key: String,
    count: usize,
    concurrency: usize,
    command: String,
}

fn parse() -> anyhow::Result<Options> {
    let mut o = Options {
        addr: String::new(),
        user: String::new(),
        key: String::new(),
        host_key: String::new(),
        count: 1000,
        concurrency: 32,
        command: "cat".into(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--addr" => o.addr = value,
            "--user" => o.user = value,
            "--key" => o.key = value,
            "--host-key" => o.host_key = value,
            "--count" => o.count = value.parse()?,
            "--concurrency" => o.concurrency = value.parse()?,
            "--command" => o.command = value,
            _ => bail!("unknown option {arg}"),
        }
    }
    if o.addr.is_empty() || o.user.is_empty() || o.key.is_empty() || o.host_key.is_empty() {
        bail!("--addr, --user, --key and --host-key are required");
    }
    if o.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    Ok(o)
}

fn main() -> ExitCode {
    let options = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("ssh_idle: {e:#}");
            return ExitCode::from(2);
        }
    };
    poolgate_benches::run_main("ssh_idle", run(options))
}

/// Accepts exactly the expected host key.
struct Client {
    host_key: Arc<PublicKey>,
}

impl client::Handler for Client {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => {
                key.key_data() == self.host_key.key_data()
            }
            PublicKeyOrCertificate::Certificate(_) => false,
        })
    }
}

struct Session {
    _handle: Handle<Client>,
    _channel: Channel<client::Msg>,
}

async fn run(o: Options) -> anyhow::Result<()> {
    let key = Arc::new(
        russh::keys::load_secret_key(&o.key, None)
            .with_context(|| format!("load the private key {}", o.key))?,
    );
    let host_key_text = std::fs::read_to_string(&o.host_key)
        .with_context(|| format!("read the host key {}", o.host_key))?;
    let host_key = Arc::new(
        PublicKey::from_openssh(host_key_text.trim())
            .with_context(|| format!("parse the host key {}", o.host_key))?,
    );
    let config = Arc::new(client::Config {
        nodelay: true,
        inactivity_timeout: None,
        ..Default::default()
    });
    let o = Arc::new(o);
    let mut sessions = Vec::with_capacity(o.count);
    let mut pending = futures_util::stream::iter((0..o.count).map(|i| {
        let (o, key, host_key, config) = (o.clone(), key.clone(), host_key.clone(), config.clone());
        async move {
            open(&o, key, host_key, config)
                .await
                .with_context(|| format!("session {}", i + 1))
        }
    }))
    .buffer_unordered(o.concurrency);
    while let Some(session) = pending.next().await {
        sessions.push(session?);
    }
    println!("ready {}", sessions.len());
    std::future::pending::<()>().await;
    Ok(())
}

async fn open(
    o: &Options,
    key: Arc<russh::keys::PrivateKey>,
    host_key: Arc<PublicKey>,
    config: Arc<client::Config>,
) -> anyhow::Result<Session> {
    let tcp = TcpStream::connect(&o.addr)
        .await
        .with_context(|| format!("connect to {}", o.addr))?;
    tcp.set_nodelay(true)?;
    let mut handle = client::connect_stream(config, tcp, Client { host_key }).await?;
    let auth = handle
        .authenticate_publickey(&o.user, PrivateKeyWithHashAlg::new(key, None))
        .await?;
    if !matches!(auth, AuthResult::Success) {
        bail!("{} refused the key for {}", o.addr, o.user);
    }
    let mut channel = handle.channel_open_session().await?;
    channel.exec(true, o.command.as_str()).await?;
    loop {
        match channel.wait().await.context("channel closed before exec")? {
            ChannelMsg::Success => break,
            ChannelMsg::Failure => bail!("exec {:?} refused", o.command),
            _ => {}
        }
    }
    Ok(Session {
        _handle: handle,
        _channel: channel,
    })
}
