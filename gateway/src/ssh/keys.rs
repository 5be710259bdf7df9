//! Key material: the gateway's SSH host keys, the user CA that signs short-lived backend
//! certificates (their files are secret files, see `crate::secrets`).

use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use russh::keys::ssh_key::certificate::{Builder, CertType};
use russh::keys::ssh_key::{Algorithm, Certificate, LineEnding, PrivateKey, PublicKey};

use crate::secrets::{self, SecretFileError};

/// Errors while loading or creating key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file could not be read, written, or has open permissions.
    #[error(transparent)]
    File(#[from] SecretFileError),
    /// A key file exists but is not an OpenSSH private key.
    #[error(
        "{path}: not an OpenSSH private key ({message}); restore the key from a backup (without \
         the file poolgate generates a new one, which users' ssh or the VMs must then be told to \
         trust)"
    )]
    Parse {
        /// The file.
        path: String,
        /// The parser's message.
        message: String,
    },
    /// A key file is protected by a passphrase, which a service cannot type.
    #[error(
        "{path}: the key is encrypted with a passphrase, which poolgate cannot ask for; remove \
         the passphrase (the key stays the same): ssh-keygen -p -N '' -f {path}"
    )]
    Encrypted {
        /// The file.
        path: String,
    },
    /// Signing a certificate failed.
    #[error("signing a certificate for {user}: {message}")]
    Sign {
        /// The user the certificate was for.
        user: String,
        /// What failed.
        message: String,
    },
}

/// Loads an OpenSSH private key file that exists: readable by its owner only, not encrypted.
pub fn load(path: &Path) -> Result<PrivateKey, KeyError> {
    let text = secrets::read(path)?;
    let key = PrivateKey::from_openssh(&text).map_err(|e| KeyError::Parse {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    if key.is_encrypted() {
        return Err(KeyError::Encrypted {
            path: path.display().to_string(),
        });
    }
    Ok(key)
}

/// Loads an OpenSSH private key, or generates an Ed25519 one (mode 0600) when the file is missing.
/// Returns the key and whether it was generated.
pub fn load_or_generate(path: &Path, comment: &str) -> Result<(PrivateKey, bool), KeyError> {
    if path.exists() {
        return Ok((load(path)?, false));
    }
    let mut key =
        PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).map_err(|e| KeyError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
    key.set_comment(comment);
    let pem = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| KeyError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
    secrets::write(path, pem.as_bytes())?;
    // The public half next to it, as ssh-keygen does (not secret).
    let public = key.public_key().to_openssh().unwrap_or_default();
    let pub_path = path.with_extension(match path.extension() {
        Some(ext) => format!("{}.pub", ext.to_string_lossy()),
        None => "pub".to_string(),
    });
    let _ = fs::write(&pub_path, format!("{public}\n"));
    Ok((key, true))
}

/// The certificate authority whose certificates pool VMs accept (`TrustedUserCAKeys`).
#[derive(Debug)]
pub struct UserCa {
    key: PrivateKey,
    validity: Duration,
}

/// What a signed certificate is for: written to the VM's auth log through the key id.
#[derive(Debug, Clone)]
pub struct CertRequest<'a> {
    /// Login name on the VM; the certificate's only principal.
    pub user: &'a str,
    /// Session identifier, shown in the VM's auth log.
    pub session: u64,
    /// Client address, shown in the VM's auth log.
    pub client: &'a str,
    /// Allow `-L`/`-R` forwarding on the VM.
    pub port_forwarding: bool,
    /// Allow `-A` agent forwarding on the VM.
    pub agent_forwarding: bool,
    /// Allow a terminal (`permit-pty`) on the VM.
    pub pty: bool,
}

impl UserCa {
    /// Wraps a CA private key; certificates are valid for `validity`.
    pub fn new(key: PrivateKey, validity: Duration) -> Self {
        Self { key, validity }
    }

    /// A CA made for this process only and never written: for a gateway that logs in to no VM
    /// over SSH (`listen.ssh = "off"`, no busy check), so that no VM ever trusts it.
    pub fn ephemeral(validity: Duration) -> Result<Self, KeyError> {
        let key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).map_err(|e| {
            KeyError::Parse {
                path: "(in memory)".to_owned(),
                message: e.to_string(),
            }
        })?;
        Ok(Self::new(key, validity))
    }

    /// The CA public key in OpenSSH format, for the VMs' `TrustedUserCAKeys` file.
    pub fn public_line(&self) -> String {
        self.key.public_key().to_openssh().unwrap_or_default()
    }

    /// Signs a user certificate for `session_key` with the request's user as only principal.
    /// Valid from one minute ago (clock skew) for the configured validity.
    pub fn sign(
        &self,
        session_key: &PublicKey,
        req: &CertRequest<'_>,
    ) -> Result<Certificate, KeyError> {
        let sign_err = |e: russh::keys::ssh_key::Error| KeyError::Sign {
            user: req.user.to_string(),
            message: e.to_string(),
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let valid_after = now.saturating_sub(60);
        let valid_before = now + self.validity.as_secs().max(60);
        let mut nonce = [0u8; 32];
        rand::fill(&mut nonce);
        let mut builder = Builder::new(
            nonce.to_vec(),
            session_key.key_data().clone(),
            valid_after,
            valid_before,
        )
        .map_err(sign_err)?;
        builder
            .cert_type(CertType::User)
            .map_err(sign_err)?
            .serial(req.session)
            .map_err(sign_err)?
            .key_id(format!(
                "poolgate session={} user={} client={}",
                req.session, req.user, req.client
            ))
            .map_err(sign_err)?
            .valid_principal(req.user)
            .map_err(sign_err)?;
        if req.pty {
            builder.extension("permit-pty", "").map_err(sign_err)?;
        }
        if req.port_forwarding {
            builder
                .extension("permit-port-forwarding", "")
                .map_err(sign_err)?;
        }
        if req.agent_forwarding {
            builder
                .extension("permit-agent-forwarding", "")
                .map_err(sign_err)?;
        }
        builder.sign(&self.key).map_err(sign_err)
    }

    /// Signs the certificate of the autoscaler's busy check: `user` as only principal, the
    /// `force-command` critical option set to `command` (sshd runs it whatever the client asks
    /// for), no extensions (no pty, no forwarding of any kind, no user rc), valid from one minute
    /// ago (clock skew) for `validity`.
    pub fn sign_check(
        &self,
        key: &PublicKey,
        user: &str,
        command: &str,
        validity: Duration,
    ) -> Result<Certificate, KeyError> {
        let sign_err = |e: russh::keys::ssh_key::Error| KeyError::Sign {
            user: user.to_string(),
            message: e.to_string(),
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut nonce = [0u8; 32];
        rand::fill(&mut nonce);
        let mut builder = Builder::new(
            nonce.to_vec(),
            key.key_data().clone(),
            now.saturating_sub(60),
            now + validity.as_secs().max(1),
        )
        .map_err(sign_err)?;
        builder
            .cert_type(CertType::User)
            .map_err(sign_err)?
            .serial(0)
            .map_err(sign_err)?
            .key_id(format!("poolgate busy-check user={user}"))
            .map_err(sign_err)?
            .valid_principal(user)
            .map_err(sign_err)?
            .critical_option("force-command", command)
            .map_err(sign_err)?;
        builder.sign(&self.key).map_err(sign_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generated_key_is_0600_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/host_key");
        let (key, generated) = load_or_generate(&path, "test").unwrap();
        assert!(generated);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (again, generated) = load_or_generate(&path, "test").unwrap();
        assert!(!generated);
        assert_eq!(key.public_key(), again.public_key());
        assert!(path.with_extension("pub").exists());
    }

    #[test]
    fn open_permissions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        load_or_generate(&path, "t").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_or_generate(&path, "t").unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn certificate_names_user_and_session() {
        let ca = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap();
        let ca = UserCa::new(ca, Duration::from_secs(300));
        let session_key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap();
        let cert = ca
            .sign(
                session_key.public_key(),
                &CertRequest {
                    user: "alice",
                    session: 42,
                    client: "127.0.0.1:5555",
                    port_forwarding: false,
                    agent_forwarding: true,
                    pty: true,
                },
            )
            .unwrap();
        assert_eq!(cert.valid_principals(), ["alice".to_string()]);
        assert!(cert.key_id().contains("session=42"));
        assert!(cert.extensions().contains_key("permit-agent-forwarding"));
        assert!(!cert.extensions().contains_key("permit-port-forwarding"));
        assert!(cert.extensions().contains_key("permit-pty"));
        let no_pty = ca
            .sign(
                session_key.public_key(),
                &CertRequest {
                    user: "alice",
                    session: 43,
                    client: "127.0.0.1:5555",
                    port_forwarding: true,
                    agent_forwarding: true,
                    pty: false,
                },
            )
            .unwrap();
        assert!(!no_pty.extensions().contains_key("permit-pty"));
        assert!(no_pty.extensions().contains_key("permit-port-forwarding"));
        let ca_fp = ca.key.public_key().fingerprint(Default::default());
        cert.validate_at(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs(),
            [&ca_fp],
        )
        .unwrap();
    }

    #[test]
    fn check_certificate_is_pinned_to_its_command() {
        let ca = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap();
        let ca = UserCa::new(ca, Duration::from_secs(300));
        let key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap();
        let cert = ca
            .sign_check(
                key.public_key(),
                "poolgate-probe",
                "'/bin/sh' '-c' 'exit 1'",
                Duration::from_secs(60),
            )
            .unwrap();
        assert_eq!(cert.valid_principals(), ["poolgate-probe".to_string()]);
        assert_eq!(
            cert.critical_options()
                .get("force-command")
                .map(String::as_str),
            Some("'/bin/sh' '-c' 'exit 1'")
        );
        assert!(
            cert.extensions().is_empty(),
            "no permit-* extensions: {:?}",
            cert.extensions()
        );
        assert!(cert.valid_before() - cert.valid_after() <= 120);
        let ca_fp = ca.key.public_key().fingerprint(Default::default());
        cert.validate_at(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs(),
            [&ca_fp],
        )
        .unwrap();
    }
}
