//! A demo VM's SSH server: authentication (gateway user certificates, password `demo`), session
//! channels handed to `process`, and `ssh -L` to 127.0.0.1.
//!
//! The handler stays thin: it answers each request at once (russh tracks only the latest
//! request's want-reply, so answers must not be deferred) and turns channel traffic into
//! [`Input`] events for the session's process task.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use russh::keys::ssh_key::certificate::CertType;
use russh::keys::ssh_key::{Certificate, HashAlg, PrivateKey};
use russh::server::{self, Auth, Msg, Session};
use russh::{Channel, ChannelId, MethodKind, MethodSet, Pty, Sig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::DemoVmSettings;
use super::process::{self, Input, Launch, PtySize};

/// The password every demo account accepts.
pub(super) const PASSWORD: &str = "demo";

/// What a VM's connections share.
#[derive(Debug, Clone)]
pub(super) struct VmContext {
    pub name: Arc<str>,
    /// This start of the VM: every session's program carries it (`super::INSTANCE_VAR`).
    pub instance: Arc<str>,
    pub settings: Arc<DemoVmSettings>,
}

/// Accepts SSH connections until aborted; aborting ends every connection (and so every session's
/// processes).
pub(super) async fn serve(
    listener: TcpListener,
    ctx: VmContext,
    (host_key, host_cert): (PrivateKey, Certificate),
) {
    let mut methods = MethodSet::empty();
    methods.push(MethodKind::PublicKey);
    methods.push(MethodKind::Password);
    let config = Arc::new(server::Config {
        server_id: russh::SshId::Standard("SSH-2.0-poolgate_demo_vm".into()),
        methods,
        auth_rejection_time: Duration::from_millis(300),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![host_key],
        certificates: vec![host_cert],
        nodelay: true,
        keepalive_interval: Some(Duration::from_secs(30)),
        ..Default::default()
    });
    let mut connections = JoinSet::new();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(vm = %ctx.name, error = %e, "demo VM: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Forget finished connections.
        while connections.try_join_next().is_some() {}
        let handler = Connection {
            ctx: ctx.clone(),
            peer,
            user: String::new(),
            channels: HashMap::new(),
        };
        let config = config.clone();
        let vm = ctx.name.clone();
        connections.spawn(async move {
            let _ = stream.set_nodelay(true);
            match server::run_stream(config, stream, handler).await {
                Ok(session) => {
                    if let Err(e) = session.await {
                        tracing::debug!(%vm, error = %e, "demo VM: SSH connection ended");
                    }
                }
                Err(e) => tracing::debug!(%vm, error = %e, "demo VM: SSH handshake failed"),
            }
        });
    }
}

/// One session channel: what the client asked for before starting a program, then the program.
#[derive(Default)]
struct SessionChannel {
    pty: Option<PtySize>,
    env: Vec<(String, String)>,
    input: Option<mpsc::Sender<Input>>,
}

/// One SSH connection to a demo VM.
struct Connection {
    ctx: VmContext,
    peer: SocketAddr,
    user: String,
    channels: HashMap<ChannelId, SessionChannel>,
}

impl Connection {
    async fn send(&mut self, channel: ChannelId, input: Input) {
        let sender = self.channels.get(&channel).and_then(|c| c.input.clone());
        if let Some(sender) = sender {
            let _ = sender.send(input).await;
        }
    }

    /// Starts `launch` on `channel` and answers the request.
    fn launch(&mut self, channel: ChannelId, launch: Launch, session: &mut Session) -> bool {
        let Some(state) = self.channels.get_mut(&channel) else {
            return false;
        };
        if state.input.is_some() {
            // One program per channel.
            return false;
        }
        let request = process::Request {
            vm: self.ctx.name.clone(),
            instance: self.ctx.instance.clone(),
            login: self.user.clone(),
            client: self.peer,
            pty: state.pty.clone(),
            env: state.env.clone(),
            launch,
        };
        match process::spawn(request, &self.ctx.settings.shell, channel, session.handle()) {
            Ok(input) => {
                state.input = Some(input);
                true
            }
            Err(e) => {
                tracing::warn!(vm = %self.ctx.name, error = %e, "demo VM: cannot start the program");
                false
            }
        }
    }
}

fn reply(session: &mut Session, channel: ChannelId, ok: bool) -> Result<(), russh::Error> {
    if ok {
        session.channel_success(channel)
    } else {
        session.channel_failure(channel)
    }
}

/// Environment variable names a client may set (as sshd's `AcceptEnv`, but wider): no loader or
/// shell start-up variables.
fn env_allowed(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with("LD_")
        && !matches!(
            name,
            "BASH_ENV" | "ENV" | "PATH" | "HOME" | "SHELL" | "USER" | "LOGNAME" | "POOLGATE_VM"
        )
}

impl server::Handler for Connection {
    type Error = russh::Error;

    async fn auth_password(&mut self, user: &str, password: &str) -> Result<Auth, Self::Error> {
        if password == PASSWORD {
            self.user = user.to_string();
            Ok(Auth::Accept)
        } else {
            Ok(Auth::reject())
        }
    }

    async fn auth_publickey(
        &mut self,
        _user: &str,
        _key: server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        // Plain keys are for the gateway; a VM takes the gateway's certificates.
        Ok(Auth::reject())
    }

    async fn auth_openssh_certificate(
        &mut self,
        user: &str,
        certificate: &Certificate,
    ) -> Result<Auth, Self::Error> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let ca = self.ctx.settings.user_ca.fingerprint(HashAlg::Sha256);
        let valid = certificate.cert_type() == CertType::User
            && certificate.validate_at(now, [&ca]).is_ok()
            && certificate.valid_principals().iter().any(|p| p == user);
        if valid {
            self.user = user.to_string();
            Ok(Auth::Accept)
        } else {
            tracing::info!(vm = %self.ctx.name, %user, key_id = certificate.key_id(), "demo VM: certificate refused");
            Ok(Auth::reject())
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Channel traffic arrives through the handler callbacks below; the channel object is not
        // read (nothing is queued in it: russh drops messages for a channel nobody holds).
        let id = channel.id();
        drop(channel);
        self.channels.insert(id, SessionChannel::default());
        reply.accept().await;
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let vm = self.ctx.name.clone();
        let host = host_to_connect.to_string();
        let loopback = matches!(host.as_str(), "127.0.0.1" | "localhost" | "::1");
        let Ok(port) = u16::try_from(port_to_connect) else {
            return Ok(());
        };
        if !loopback {
            tracing::info!(%vm, %host, port, "demo VM: forwarding refused (127.0.0.1 only)");
            return Ok(()); // dropping `reply` rejects the channel
        }
        tokio::spawn(async move {
            let target = if host == "::1" { "::1" } else { "127.0.0.1" };
            match TcpStream::connect((target, port)).await {
                Ok(mut tcp) => {
                    reply.accept().await;
                    let mut stream = channel.into_stream();
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut tcp).await;
                }
                Err(e) => {
                    tracing::info!(%vm, %host, port, error = %e, "demo VM: forward target unreachable");
                }
            }
        });
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        col_width: u32,
        row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let ok = match self.channels.get_mut(&channel) {
            Some(state) if state.input.is_none() => {
                state.pty = Some(PtySize {
                    term: term.to_string(),
                    cols: clamp_dim(col_width),
                    rows: clamp_dim(row_height),
                });
                true
            }
            _ => false,
        };
        reply(session, channel, ok)
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        variable_name: &str,
        variable_value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let ok = env_allowed(variable_name)
            && match self.channels.get_mut(&channel) {
                Some(state) if state.input.is_none() && state.env.len() < 64 => {
                    state
                        .env
                        .push((variable_name.to_string(), variable_value.to_string()));
                    true
                }
                _ => false,
            };
        reply(session, channel, ok)
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let ok = self.launch(channel, Launch::Shell, session);
        reply(session, channel, ok)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let command = String::from_utf8_lossy(data).into_owned();
        let ok = self.launch(channel, Launch::Command(command), session);
        reply(session, channel, ok)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let ok = match (name, &self.ctx.settings.shell.sftp_server) {
            ("sftp", Some(program)) => {
                let program = program.clone();
                self.launch(channel, Launch::Program(program), session)
            }
            _ => {
                tracing::info!(vm = %self.ctx.name, subsystem = name, "demo VM: subsystem not available");
                false
            }
        };
        reply(session, channel, ok)
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        col_width: u32,
        row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let (cols, rows) = (clamp_dim(col_width), clamp_dim(row_height));
        if let Some(pty) = self.channels.get_mut(&channel).and_then(|c| c.pty.as_mut()) {
            pty.cols = cols;
            pty.rows = rows;
        }
        self.send(channel, Input::Resize { cols, rows }).await;
        Ok(())
    }

    async fn signal(
        &mut self,
        channel: ChannelId,
        signal: Sig,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.send(channel, Input::Signal(signal)).await;
        Ok(())
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.send(channel, Input::Data(bytes::Bytes::copy_from_slice(data)))
            .await;
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.send(channel, Input::Eof).await;
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Dropping the sender tells the process task the client is gone.
        self.channels.remove(&channel);
        Ok(())
    }
}

/// Terminal dimensions as the pty wants them (0 = unknown → a sane default).
fn clamp_dim(value: u32) -> u16 {
    match u16::try_from(value) {
        Ok(0) => 0,
        Ok(v) => v,
        Err(_) => u16::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names_exclude_loader_and_identity_variables() {
        assert!(env_allowed("LANG"));
        assert!(env_allowed("LC_ALL"));
        assert!(env_allowed("PGTEST_X"));
        assert!(!env_allowed("LD_PRELOAD"));
        assert!(!env_allowed("BASH_ENV"));
        assert!(!env_allowed("POOLGATE_VM"));
        assert!(!env_allowed("A-B"));
        assert!(!env_allowed(""));
    }

    #[test]
    fn terminal_dimensions_are_clamped() {
        assert_eq!(clamp_dim(80), 80);
        assert_eq!(clamp_dim(0), 0);
        assert_eq!(clamp_dim(1 << 20), u16::MAX);
    }
}
