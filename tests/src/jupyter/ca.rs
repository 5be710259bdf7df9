//! A throw-away certificate authority and the gateway's server certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use sha2::{Digest, Sha256};

/// A test CA with one server certificate for `localhost` and `127.0.0.1`, written as PEM files.
pub struct TestCa {
    dir: tempfile::TempDir,
    ca_pem: String,
    spki_sha256_b64: String,
}

impl TestCa {
    /// Generates the CA and the server certificate.
    pub fn generate() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("poolgate-ca-")
            .tempdir()
            .expect("temp dir for the test CA");
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "poolgate test CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("self-sign the CA");
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf_key = KeyPair::generate().expect("server key");
        let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        leaf.subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        leaf.distinguished_name
            .push(DnType::CommonName, "poolgate test gateway");
        let leaf_cert = leaf
            .signed_by(&leaf_key, &issuer)
            .expect("sign the server cert");

        let chain = format!("{}{}", leaf_cert.pem(), ca_cert.pem());
        std::fs::write(dir.path().join("cert.pem"), chain).expect("write cert.pem");
        let key_path = dir.path().join("key.pem");
        std::fs::write(&key_path, leaf_key.serialize_pem()).expect("write key");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))
                .expect("chmod 600 key.pem");
        }
        std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).expect("write ca.pem");
        let spki = Sha256::digest(rcgen::PublicKeyData::subject_public_key_info(&leaf_key));
        Self {
            dir,
            ca_pem: ca_cert.pem(),
            spki_sha256_b64: data_encoding::BASE64.encode(&spki),
        }
    }

    /// The server certificate chain (PEM), for `[tls] cert`.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    /// The server key (PEM), for `[tls] key`.
    pub fn key_path(&self) -> PathBuf {
        self.dir.path().join("key.pem")
    }

    /// The CA certificate (PEM).
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Base64 SHA-256 of the server key's SubjectPublicKeyInfo, for Chromium's
    /// `--ignore-certificate-errors-spki-list` (trust exactly this key, nothing else).
    pub fn server_spki_sha256(&self) -> &str {
        &self.spki_sha256_b64
    }

    /// A rustls client configuration that trusts only this CA.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        let der = CertificateDer::from_pem_slice(self.ca_pem.as_bytes()).expect("CA PEM");
        roots.add(der).expect("add the CA to the root store");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// The directory holding the PEM files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
