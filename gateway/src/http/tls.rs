//! TLS for the HTTPS listener: rustls (aws-lc-rs provider), TLS 1.2 and 1.3 only, ALPN `h2` and
//! `http/1.1`. The certificate sits behind a resolver ([`ServedCert`]) whose certificate is
//! swapped atomically: by [`CertReloader`] when the `tls.cert`/`tls.key` files change (checked by
//! [`CertReloader::reload_if_changed`]), or by ACME (`super::acme`) when a certificate is issued
//! or renewed. Open connections keep the certificate they were set up with; new handshakes get
//! the new one, so renewal needs no restart and drops nothing.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use arc_swap::ArcSwapOption;
use rustls::crypto::aws_lc_rs;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::metrics::TlsNotAfter;

/// The certificate the HTTPS listener presents, replaceable at run time. Empty until the first
/// certificate is stored (ACME's first start): handshakes then fail with a TLS alert.
#[derive(Debug)]
pub struct ServedCert {
    current: ArcSwapOption<CertifiedKey>,
    /// `file` or `acme`, the label of `poolgate_tls_cert_expiry_seconds`.
    source: &'static str,
    not_after: TlsNotAfter,
}

impl ServedCert {
    /// An empty holder; `not_after` is told the expiry of every certificate stored.
    pub fn new(source: &'static str, not_after: TlsNotAfter) -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwapOption::empty(),
            source,
            not_after,
        })
    }

    /// Serves `ck` from the next handshake on.
    pub fn store(&self, ck: CertifiedKey) {
        self.not_after
            .set(validity(&ck).map(|v| (self.source, v.not_after)));
        self.current.store(Some(Arc::new(ck)));
    }

    /// The certificate served now, if any.
    pub fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }
}

impl ResolvesServerCert for ServedCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }
}

/// The validity period of a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

fn unix(ts: i64) -> SystemTime {
    match u64::try_from(ts) {
        Ok(secs) => SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
        Err(_) => SystemTime::UNIX_EPOCH,
    }
}

/// The validity period of the leaf (first) certificate of `ck`; `None` when it cannot be parsed.
pub fn validity(ck: &CertifiedKey) -> Option<Validity> {
    let leaf = ck.cert.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let v = cert.validity();
    Some(Validity {
        not_before: unix(v.not_before.timestamp()),
        not_after: unix(v.not_after.timestamp()),
    })
}

/// The DNS names (subject alternative names) of the leaf certificate of `ck`, lower-cased.
pub fn dns_names(ck: &CertifiedKey) -> Vec<String> {
    let Some(leaf) = ck.cert.first() else {
        return Vec::new();
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

/// The certificate files in use (`tls.cert`, `tls.key`), re-read when they change.
#[derive(Debug)]
pub struct CertReloader {
    cert_path: PathBuf,
    key_path: PathBuf,
    served: Arc<ServedCert>,
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
    /// Loads the pair once into `served`; fails with a message naming the file at fault.
    pub fn load(cert: &Path, key: &Path, served: Arc<ServedCert>) -> anyhow::Result<Arc<Self>> {
        let stamp = mtime(cert).zip(mtime(key));
        let ck = load_certified_key(cert, key)?;
        served.store(ck);
        Ok(Arc::new(Self {
            cert_path: cert.to_path_buf(),
            key_path: key.to_path_buf(),
            served,
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
        self.served.store(ck);
        if let Ok(mut old) = self.stamp.lock() {
            *old = stamp;
        }
        Ok(true)
    }

    /// Reloads the pair now, whatever the files' modification times (configuration reload). On
    /// error the previous certificate stays.
    pub fn reload_now(&self) -> anyhow::Result<()> {
        let stamp = mtime(&self.cert_path).zip(mtime(&self.key_path));
        let ck = load_certified_key(&self.cert_path, &self.key_path)?;
        self.served.store(ck);
        if let Ok(mut old) = self.stamp.lock() {
            *old = stamp;
        }
        Ok(())
    }
}

/// The server configuration: TLS 1.2 + 1.3, ALPN h2 then http/1.1, certificate from `certs`.
pub fn server_config(certs: Arc<ServedCert>) -> anyhow::Result<rustls::ServerConfig> {
    let mut config =
        rustls::ServerConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .context("TLS protocol versions")?
            .with_no_client_auth()
            .with_cert_resolver(certs);
    // In the server's order of preference. `http/1.0` too (served by the HTTP/1 server, as
    // nginx does): rustls refuses a handshake whose client offers only protocols it does not
    // list, and `curl --http1.0` and old monitoring probes offer only that one.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), b"http/1.0".to_vec()];
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
        let not_after = TlsNotAfter::default();
        let served = ServedCert::new("file", not_after.clone());
        let r = CertReloader::load(&cert, &key, served.clone()).expect("load");
        let first = served.current().expect("served");
        let (source, expiry) = not_after.get().expect("expiry recorded");
        assert_eq!(source, "file");
        assert!(expiry > SystemTime::now() + Duration::from_secs(365 * 86400));
        assert_eq!(dns_names(&first), ["a.test"]);
        assert!(!r.reload_if_changed().expect("unchanged"));
        let config = server_config(served.clone()).expect("config");
        assert_eq!(
            config.alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec(), b"http/1.0".to_vec()]
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
        assert_ne!(first.cert[0], served.current().expect("served").cert[0]);

        // Asked to (SIGHUP): reloads whatever the modification times say.
        let second = served.current().expect("served");
        let (cert4, key4) = write_pair(dir.path(), "e.test");
        std::fs::rename(&cert4, &cert).expect("mv");
        std::fs::rename(&key4, &key).expect("mv");
        if let Ok(mut s) = r.stamp.lock() {
            *s = mtime(&cert).zip(mtime(&key));
        }
        assert!(!r.reload_if_changed().expect("same stamp"));
        r.reload_now().expect("reload now");
        assert_ne!(second.cert[0], served.current().expect("served").cert[0]);

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
