//! TLS for the HTTPS listener: rustls (aws-lc-rs provider), TLS 1.2 and 1.3 only, ALPN `h2` and
//! `http/1.1`. The certificate sits behind a resolver that swaps in a renewed cert/key pair when
//! the files change (checked by [`CertReloader::reload_if_changed`]), so certificate renewal
//! needs no restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use anyhow::Context;
use arc_swap::ArcSwap;
use rustls::crypto::aws_lc_rs;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// The certificate in use, replaceable at run time.
#[derive(Debug)]
pub struct CertReloader {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: ArcSwap<CertifiedKey>,
    stamp: Mutex<Option<(SystemTime, SystemTime)>>,
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Reads a PEM certificate chain and private key into a signing key.
pub fn load_certified_key(cert: &Path, key: &Path) -> anyhow::Result<CertifiedKey> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("tls.cert: cannot read {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| {
            format!(
                "tls.cert: {} is not a PEM certificate chain",
                cert.display()
            )
        })?;
    if chain.is_empty() {
        anyhow::bail!(
            "tls.cert: {} holds no CERTIFICATE block (expected a PEM certificate chain)",
            cert.display()
        );
    }
    let key_der = PrivateKeyDer::from_pem_file(key).with_context(|| {
        format!(
            "tls.key: {} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
            key.display()
        )
    })?;
    let provider = aws_lc_rs::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key_der)
        .with_context(|| format!("tls.key: unsupported private key in {}", key.display()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().with_context(|| {
        format!(
            "tls: the key in {} does not belong to the certificate in {} (point tls.key at \
             the private key the certificate was issued for, or tls.cert at its certificate)",
            key.display(),
            cert.display()
        )
    })?;
    Ok(certified)
}

impl CertReloader {
    /// Loads the pair once; fails with a message naming the file at fault.
    pub fn load(cert: &Path, key: &Path) -> anyhow::Result<Arc<Self>> {
        let stamp = mtime(cert).zip(mtime(key));
        let ck = load_certified_key(cert, key)?;
        Ok(Arc::new(Self {
            cert_path: cert.to_path_buf(),
            key_path: key.to_path_buf(),
            current: ArcSwap::from_pointee(ck),
            stamp: Mutex::new(stamp),
        }))
    }

    /// Reloads the pair when either file's modification time changed. Returns `Ok(true)` when a
    /// new certificate is in use; on error the previous one stays.
    pub fn reload_if_changed(&self) -> anyhow::Result<bool> {
        let stamp = mtime(&self.cert_path).zip(mtime(&self.key_path));
        {
            let Ok(old) = self.stamp.lock() else {
                return Ok(false);
            };
            if *old == stamp {
                return Ok(false);
            }
        }
        let ck = load_certified_key(&self.cert_path, &self.key_path)?;
        self.current.store(Arc::new(ck));
        if let Ok(mut old) = self.stamp.lock() {
            *old = stamp;
        }
        Ok(true)
    }
}

impl CertReloader {
    /// Reloads the pair now, whatever the files' modification times (configuration reload). On
    /// error the previous certificate stays.
    pub fn reload_now(&self) -> anyhow::Result<()> {
        let stamp = mtime(&self.cert_path).zip(mtime(&self.key_path));
        let ck = load_certified_key(&self.cert_path, &self.key_path)?;
        self.current.store(Arc::new(ck));
        if let Ok(mut old) = self.stamp.lock() {
            *old = stamp;
        }
        Ok(())
    }
}

impl ResolvesServerCert for CertReloader {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The server configuration: TLS 1.2 + 1.3, ALPN h2 then http/1.1, certificate from `certs`.
pub fn server_config(certs: Arc<CertReloader>) -> anyhow::Result<rustls::ServerConfig> {
    let mut config =
        rustls::ServerConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .context("TLS protocol versions")?
            .with_no_client_auth()
            .with_cert_resolver(certs);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let ck = rcgen::generate_simple_self_signed(vec![name.to_owned()]).expect("rcgen");
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, ck.cert.pem()).expect("write cert");
        std::fs::write(&key, ck.signing_key.serialize_pem()).expect("write key");
        (cert, key)
    }

    #[test]
    fn loads_reloads_and_reports_bad_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = write_pair(dir.path(), "a.test");
        let r = CertReloader::load(&cert, &key).expect("load");
        let first = r.current.load_full();
        assert!(!r.reload_if_changed().expect("unchanged"));
        let config = server_config(r.clone()).expect("config");
        assert_eq!(
            config.alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec()]
        );

        // A renewed pair replaces the old one.
        let (cert2, key2) = write_pair(dir.path(), "b.test");
        std::fs::rename(&cert2, &cert).expect("mv");
        std::fs::rename(&key2, &key).expect("mv");
        // Some filesystems have coarse mtimes: force a different stamp.
        if let Ok(mut s) = r.stamp.lock() {
            *s = None;
        }
        assert!(r.reload_if_changed().expect("reload"));
        assert_ne!(first.cert[0], r.current.load_full().cert[0]);

        // Asked to (SIGHUP): reloads whatever the modification times say.
        let second = r.current.load_full();
        let (cert4, key4) = write_pair(dir.path(), "e.test");
        std::fs::rename(&cert4, &cert).expect("mv");
        std::fs::rename(&key4, &key).expect("mv");
        if let Ok(mut s) = r.stamp.lock() {
            *s = mtime(&cert).zip(mtime(&key));
        }
        assert!(!r.reload_if_changed().expect("same stamp"));
        r.reload_now().expect("reload now");
        assert_ne!(second.cert[0], r.current.load_full().cert[0]);

        // A broken file keeps the old certificate and says which file is wrong.
        std::fs::write(&key, "not a key").expect("write");
        if let Ok(mut s) = r.stamp.lock() {
            *s = None;
        }
        let err = format!("{:#}", r.reload_if_changed().expect_err("bad key"));
        assert!(err.contains("tls.key"), "{err}");

        // Mismatched key and certificate.
        let (_, other_key) = write_pair(dir.path(), "c.test");
        let (cert3, _) = write_pair(dir.path(), "d.test");
        let err = format!(
            "{:#}",
            load_certified_key(&cert3, &other_key).expect_err("mismatch")
        );
        assert!(err.contains("does not belong"), "{err}");
    }
}
