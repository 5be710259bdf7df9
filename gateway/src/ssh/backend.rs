//! The gateway's SSH connection to a pool VM (russh client): host-key verification, certificate or
//! password authentication, and channels the VM opens towards the user (`-R`, `-A`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client::ChannelOpenHandle;
use russh::client::{self, AuthResult, Handle};
use russh::keys::PublicKeyOrCertificate;
use russh::keys::ssh_key::{Algorithm, PrivateKey};
use russh::{Channel, cipher, kex};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::keys::{CertRequest, UserCa};
use super::known_hosts::{HostKeyPolicy, Verdict};

/// Where the VM is and who the session is for.
#[derive(Debug, Clone)]
pub struct Target<'a> {
    /// VM name (for logs and errors).
    pub vm: &'a str,
    /// Address to connect to.
    pub host: &'a str,
    /// sshd port.
    pub port: u16,
    /// Login name.
    pub user: &'a str,
}

/// How the gateway authenticates to the VM.
#[derive(Debug)]
pub enum Credential<'a> {
    /// A fresh key with a certificate signed by the gateway's user CA.
    Certificate {
        /// The CA.
        ca: &'a UserCa,
        /// What the certificate is for.
        request: CertRequest<'a>,
    },
    /// The user's password, relayed (`ssh.password_auth = "passthrough"`).
    Password(&'a str),
    /// A fresh key with a certificate pinned to one command (`force-command`), for the
    /// autoscaler's busy check.
    Check {
        /// The CA.
        ca: &'a UserCa,
        /// The command sshd runs.
        command: &'a str,
        /// Certificate lifetime.
        validity: Duration,
    },
}

/// A channel the VM opened towards the user.
pub enum VmChannel {
    /// `forwarded-tcpip` for an `ssh -R` listener on the VM.
    Forwarded {
        /// The VM's channel.
        channel: Channel<client::Msg>,
        /// Listener address on the VM.
        connected_address: String,
        /// Listener port on the VM.
        connected_port: u32,
        /// Who connected.
        originator_address: String,
        /// Their port.
        originator_port: u32,
        /// Accept or reject towards the VM.
        reply: ChannelOpenHandle,
    },
    /// `auth-agent@openssh.com` (the VM's sshd relaying the user's agent).
    Agent {
        /// The VM's channel.
        channel: Channel<client::Msg>,
        /// Accept or reject towards the VM.
        reply: ChannelOpenHandle,
    },
}

/// Why a VM connection failed, in words for logs and users.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// TCP connect failed or timed out.
    #[error("cannot reach {vm} at {addr}: {reason}")]
    Connect {
        /// VM.
        vm: String,
        /// host:port.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The VM's host key is not trusted.
    #[error("{vm} presented an untrusted host key ({verdict}, {fingerprint}); refusing to connect")]
    HostKey {
        /// VM.
        vm: String,
        /// What the check said.
        verdict: String,
        /// SHA256 fingerprint of the offered key.
        fingerprint: String,
    },
    /// SSH handshake failed.
    #[error("SSH handshake with {vm} failed: {reason}")]
    Handshake {
        /// VM.
        vm: String,
        /// Why.
        reason: String,
    },
    /// The VM refused the gateway's credentials.
    #[error("{vm} refused the login for {user}")]
    AuthRefused {
        /// VM.
        vm: String,
        /// User.
        user: String,
    },
}

impl BackendError {
    /// Whether the failure says something about the VM's health (for passive health checks);
    /// a refused password or host-key mismatch is not an outage.
    pub fn is_outage(&self) -> bool {
        matches!(self, Self::Connect { .. } | Self::Handshake { .. })
    }
}

/// Tuning of the VM leg (see FIELD-NOTES: nodelay and AES-GCM matter).
pub fn client_config(wants_host_certs: bool) -> client::Config {
    let mut preferred = russh::Preferred {
        kex: std::borrow::Cow::Owned(vec![
            kex::MLKEM768X25519_SHA256,
            kex::CURVE25519,
            kex::CURVE25519_PRE_RFC_8731,
            kex::EXTENSION_SUPPORT_AS_CLIENT,
            kex::EXTENSION_OPENSSH_STRICT_KEX_AS_CLIENT,
        ]),
        cipher: std::borrow::Cow::Owned(vec![
            cipher::AES_128_GCM,
            cipher::AES_256_GCM,
            cipher::CHACHA20_POLY1305,
            cipher::AES_128_CTR,
            cipher::AES_256_CTR,
        ]),
        ..Default::default()
    };
    if wants_host_certs {
        preferred.host_key_certificates = std::borrow::Cow::Owned(vec![
            Algorithm::Ed25519,
            Algorithm::Ecdsa {
                curve: russh::keys::EcdsaCurve::NistP256,
            },
            Algorithm::Rsa {
                hash: Some(russh::keys::HashAlg::Sha512),
            },
        ]);
    }
    client::Config {
        nodelay: true,
        preferred,
        // Small per-channel queues: VM→user data waits in the VM's TCP buffers, not in ours.
        channel_buffer_size: 8,
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 4,
        ..Default::default()
    }
}

/// russh client handler for one VM connection.
pub struct BackendHandler {
    vm: String,
    host: String,
    port: u16,
    policy: Arc<HostKeyPolicy>,
    rejection: Arc<Mutex<Option<(Verdict, String)>>>,
    /// Boxed: a queue allocates room for 32 items up front, and these are rare.
    to_user: mpsc::UnboundedSender<Box<VmChannel>>,
    /// Dropped with the handler, i.e. when the connection to the VM ends however it ends.
    _closed: tokio::sync::oneshot::Sender<()>,
}

impl client::Handler for BackendHandler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let (verdict, fingerprint) = match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => (
                self.policy.check_key(&self.host, self.port, key),
                key.fingerprint(Default::default()).to_string(),
            ),
            PublicKeyOrCertificate::Certificate(cert) => (
                self.policy.check_certificate(&self.host, self.port, cert),
                cert.public_key()
                    .fingerprint(Default::default())
                    .to_string(),
            ),
        };
        if verdict == Verdict::Trusted {
            return Ok(true);
        }
        tracing::error!(
            vm = %self.vm,
            addr = %format!("{}:{}", self.host, self.port),
            ?verdict,
            %fingerprint,
            source = %self.policy.source().display(),
            "VM host key not trusted; refusing the VM (add it to ssh.backend_known_hosts, e.g. with ssh-keyscan, or sign it with the host CA)"
        );
        if let Ok(mut slot) = self.rejection.lock() {
            *slot = Some((verdict, fingerprint));
        }
        Ok(false)
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<client::Msg>,
        connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let _ = self.to_user.send(Box::new(VmChannel::Forwarded {
            channel,
            connected_address: connected_address.to_string(),
            connected_port,
            originator_address: originator_address.to_string(),
            originator_port,
            reply,
        }));
        Ok(())
    }

    async fn server_channel_open_agent_forward(
        &mut self,
        channel: Channel<client::Msg>,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let _ = self
            .to_user
            .send(Box::new(VmChannel::Agent { channel, reply }));
        Ok(())
    }
}

/// An authenticated connection to a VM.
pub struct Backend {
    /// The russh client handle.
    pub handle: Handle<BackendHandler>,
    /// Channels the VM opens towards the user.
    pub incoming: mpsc::UnboundedReceiver<Box<VmChannel>>,
    /// Completes (with an error) when the connection to the VM has ended: the VM closed it, it
    /// broke, or the gateway disconnected it.
    pub closed: tokio::sync::oneshot::Receiver<()>,
}

/// Connects to the VM, verifies its host key and authenticates.
pub async fn connect(
    target: &Target<'_>,
    credential: Credential<'_>,
    policy: Arc<HostKeyPolicy>,
    config: Arc<client::Config>,
    timeout: Duration,
) -> Result<Backend, BackendError> {
    let addr = format!("{}:{}", target.host, target.port);
    let connect_err = |reason: String| BackendError::Connect {
        vm: target.vm.to_string(),
        addr: addr.clone(),
        reason,
    };
    let stream = tokio::time::timeout(timeout, TcpStream::connect((target.host, target.port)))
        .await
        .map_err(|_| {
            connect_err(format!(
                "no answer within {}",
                humantime::format_duration(timeout)
            ))
        })?
        .map_err(|e| connect_err(e.to_string()))?;
    let _ = stream.set_nodelay(true);

    let rejection = Arc::new(Mutex::new(None));
    let (to_user, incoming) = mpsc::unbounded_channel();
    let (closed_tx, closed) = tokio::sync::oneshot::channel();
    let handler = BackendHandler {
        vm: target.vm.to_string(),
        host: target.host.to_string(),
        port: target.port,
        policy,
        rejection: rejection.clone(),
        to_user,
        _closed: closed_tx,
    };
    let handshake = client::connect_stream(config, stream, handler);
    let mut handle = match tokio::time::timeout(timeout, handshake).await {
        Err(_) => {
            return Err(BackendError::Handshake {
                vm: target.vm.to_string(),
                reason: format!(
                    "no SSH handshake within {}",
                    humantime::format_duration(timeout)
                ),
            });
        }
        Ok(Err(e)) => {
            if let Some((verdict, fingerprint)) = rejection.lock().ok().and_then(|mut r| r.take()) {
                return Err(BackendError::HostKey {
                    vm: target.vm.to_string(),
                    verdict: format!("{verdict:?}").to_lowercase(),
                    fingerprint,
                });
            }
            return Err(BackendError::Handshake {
                vm: target.vm.to_string(),
                reason: e.to_string(),
            });
        }
        Ok(Ok(handle)) => handle,
    };

    let auth = async {
        match credential {
            Credential::Certificate { ca, request } => {
                let key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)
                    .map_err(|e| russh::Error::from(russh::keys::Error::from(e)))?;
                let cert = ca
                    .sign(key.public_key(), &request)
                    .map_err(|_| russh::Error::NotAuthenticated)?;
                handle
                    .authenticate_openssh_cert(target.user, Arc::new(key), cert)
                    .await
            }
            Credential::Password(password) => {
                handle.authenticate_password(target.user, password).await
            }
            Credential::Check {
                ca,
                command,
                validity,
            } => {
                let key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)
                    .map_err(|e| russh::Error::from(russh::keys::Error::from(e)))?;
                let cert = ca
                    .sign_check(key.public_key(), target.user, command, validity)
                    .map_err(|_| russh::Error::NotAuthenticated)?;
                handle
                    .authenticate_openssh_cert(target.user, Arc::new(key), cert)
                    .await
            }
        }
    };
    let result = tokio::time::timeout(timeout, auth).await;
    match result {
        Ok(Ok(AuthResult::Success)) => Ok(Backend {
            handle,
            incoming,
            closed,
        }),
        Ok(Ok(AuthResult::Failure { .. })) => Err(BackendError::AuthRefused {
            vm: target.vm.to_string(),
            user: target.user.to_string(),
        }),
        Ok(Err(e)) => Err(BackendError::Handshake {
            vm: target.vm.to_string(),
            reason: e.to_string(),
        }),
        Err(_) => Err(BackendError::Handshake {
            vm: target.vm.to_string(),
            reason: "authentication timed out".into(),
        }),
    }
}
