//! Verification of pool VMs' SSH host keys: an OpenSSH `known_hosts` file (plain, wildcard,
//! negated, `[host]:port` and hashed `|1|` entries, `@revoked` and `@cert-authority` markers) or a
//! host CA whose certificates name the VM.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{KeyInit, Mac};
use russh::keys::ssh_key::certificate::CertType;
use russh::keys::ssh_key::known_hosts::{Entry, HostPatterns, KnownHosts, Marker};
use russh::keys::ssh_key::{Certificate, HashAlg, PublicKey};

/// Outcome of checking a VM's host key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The key (or its certificate) is trusted for this host.
    Trusted,
    /// No entry names this host with a key of this type.
    Unknown,
    /// Entries name this host, but with a different key: possible man-in-the-middle.
    Changed,
    /// The key is listed as `@revoked`.
    Revoked,
    /// A host certificate was offered but is not acceptable (reason).
    BadCertificate(String),
}

/// The trust anchors for VM host keys, loaded from the configured files.
#[derive(Debug, Clone)]
pub struct HostKeyPolicy {
    entries: Vec<Entry>,
    cas: Vec<PublicKey>,
    source: PathBuf,
}

/// Loading failed.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct LoadError {
    path: String,
    message: String,
}

impl HostKeyPolicy {
    /// Loads a known_hosts file; lines that do not parse are skipped with a warning.
    pub fn from_known_hosts(path: &Path) -> Result<Self, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|e| LoadError {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let mut policy = Self::parse(&text);
        policy.source = path.to_path_buf();
        Ok(policy)
    }

    /// Loads a host CA public key file (one or more keys, OpenSSH format).
    pub fn from_host_ca(path: &Path) -> Result<Self, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|e| LoadError {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let mut cas = Vec::new();
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let key = PublicKey::from_openssh(line).map_err(|e| LoadError {
                path: path.display().to_string(),
                message: format!("not an OpenSSH public key: {e}"),
            })?;
            cas.push(key);
        }
        if cas.is_empty() {
            return Err(LoadError {
                path: path.display().to_string(),
                message: "holds no public key".into(),
            });
        }
        Ok(Self {
            entries: Vec::new(),
            cas,
            source: path.to_path_buf(),
        })
    }

    /// Parses known_hosts text (line by line; malformed lines are skipped).
    pub fn parse(text: &str) -> Self {
        let mut entries = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let one = KnownHosts::new(line).next();
            match one {
                Some(Ok(entry)) => entries.push(entry),
                Some(Err(e)) => {
                    tracing::warn!(line = number + 1, error = %e, "skipping malformed known_hosts line")
                }
                None => {}
            }
        }
        Self {
            entries,
            cas: Vec::new(),
            source: PathBuf::new(),
        }
    }

    /// Where the policy was loaded from (for log messages).
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Whether host certificates should be requested from VMs.
    pub fn wants_certificates(&self) -> bool {
        !self.cas.is_empty()
            || self
                .entries
                .iter()
                .any(|e| e.marker() == Some(&Marker::CertAuthority))
    }

    /// Checks a plain host key offered by `host:port`.
    pub fn check_key(&self, host: &str, port: u16, key: &PublicKey) -> Verdict {
        let names = host_names(host, port);
        let revoked = self.entries.iter().any(|e| {
            e.marker() == Some(&Marker::Revoked)
                && e.public_key().key_data() == key.key_data()
                && matches_host(e.host_patterns(), &names)
        });
        if revoked {
            return Verdict::Revoked;
        }
        let mut saw_other_key = false;
        for entry in &self.entries {
            if !matches_host(entry.host_patterns(), &names) {
                continue;
            }
            let same = entry.public_key().key_data() == key.key_data();
            match entry.marker() {
                Some(Marker::Revoked) | Some(Marker::CertAuthority) => {}
                None if same => return Verdict::Trusted,
                None => {
                    if entry.public_key().algorithm() == key.algorithm() {
                        saw_other_key = true;
                    }
                }
            }
        }
        if saw_other_key {
            Verdict::Changed
        } else {
            Verdict::Unknown
        }
    }

    /// Checks a host certificate offered by `host:port`: signed by a trusted CA (the configured host
    /// CA or an `@cert-authority` entry for this host), of host type, valid now, naming the host.
    pub fn check_certificate(&self, host: &str, port: u16, cert: &Certificate) -> Verdict {
        if cert.cert_type() != CertType::Host {
            return Verdict::BadCertificate("a user certificate was offered as host key".into());
        }
        let names = host_names(host, port);
        let mut anchors: Vec<&PublicKey> = self.cas.iter().collect();
        anchors.extend(
            self.entries
                .iter()
                .filter(|e| e.marker() == Some(&Marker::CertAuthority))
                .filter(|e| matches_host(e.host_patterns(), &names))
                .map(Entry::public_key),
        );
        if anchors.is_empty() {
            return Verdict::Unknown;
        }
        let fingerprints: Vec<_> = anchors
            .iter()
            .map(|k| k.fingerprint(HashAlg::Sha256))
            .collect();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        if let Err(e) = cert.validate_at(now, &fingerprints) {
            return Verdict::BadCertificate(format!(
                "not signed by a trusted host CA or expired: {e}"
            ));
        }
        let principals = cert.valid_principals();
        if !principals.is_empty() && !principals.iter().any(|p| p == host) {
            return Verdict::BadCertificate(format!(
                "certificate names {principals:?}, not {host}"
            ));
        }
        Verdict::Trusted
    }
}

/// The names a host is known by in known_hosts: `host` on port 22, `[host]:port` otherwise.
fn host_names(host: &str, port: u16) -> Vec<String> {
    if port == 22 {
        vec![host.to_string(), format!("[{host}]:22")]
    } else {
        vec![format!("[{host}]:{port}")]
    }
}

fn matches_host(patterns: &HostPatterns, names: &[String]) -> bool {
    match patterns {
        HostPatterns::HashedName { salt, hash } => names.iter().any(|name| {
            hmac::Hmac::<sha1::Sha1>::new_from_slice(salt)
                .map(|mac| mac.chain_update(name.as_bytes()).verify_slice(hash).is_ok())
                .unwrap_or(false)
        }),
        // A negated pattern matching any of the host's names rejects the entry, so `*,!vm`
        // does not match `vm` on port 22 through its other name `[vm]:22`.
        HostPatterns::Patterns(list) => {
            let mut positive = false;
            for pattern in list {
                if let Some(negated) = pattern.strip_prefix('!') {
                    if names.iter().any(|name| glob_match(negated, name)) {
                        return false;
                    }
                } else if names.iter().any(|name| glob_match(pattern, name)) {
                    positive = true;
                }
            }
            positive
        }
    }
}

/// OpenSSH-style glob: `*` matches any run, `?` one character; case-insensitive like hostnames.
pub(crate) fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.to_ascii_lowercase().chars().collect();
    let t: Vec<char> = text.to_ascii_lowercase().chars().collect();
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use russh::keys::ssh_key::{Algorithm, PrivateKey};

    fn key() -> PublicKey {
        PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)
            .unwrap()
            .public_key()
            .clone()
    }

    fn line(patterns: &str, key: &PublicKey) -> String {
        format!("{patterns} {}\n", key.to_openssh().unwrap())
    }

    #[test]
    fn plain_and_bracketed_entries() {
        let (a, b) = (key(), key());
        let policy = HostKeyPolicy::parse(&(line("10.0.0.4", &a) + &line("[127.0.0.1]:2201", &b)));
        assert_eq!(policy.check_key("10.0.0.4", 22, &a), Verdict::Trusted);
        assert_eq!(policy.check_key("127.0.0.1", 2201, &b), Verdict::Trusted);
        assert_eq!(policy.check_key("127.0.0.1", 2202, &b), Verdict::Unknown);
        assert_eq!(policy.check_key("10.0.0.4", 22, &b), Verdict::Changed);
        assert_eq!(policy.check_key("10.0.0.5", 22, &a), Verdict::Unknown);
    }

    #[test]
    fn wildcards_and_negation() {
        let a = key();
        let policy = HostKeyPolicy::parse(&line("10.0.0.*,!10.0.0.9", &a));
        assert_eq!(policy.check_key("10.0.0.4", 22, &a), Verdict::Trusted);
        assert_eq!(policy.check_key("10.0.0.9", 22, &a), Verdict::Unknown);
        // Found by the known_hosts fuzz target: `[10.0.0.9]:22` is excluded too.
        let policy = HostKeyPolicy::parse(&line("*,!10.0.0.9", &a));
        assert_eq!(policy.check_key("10.0.0.9", 22, &a), Verdict::Unknown);
        assert_eq!(policy.check_key("10.0.0.8", 22, &a), Verdict::Trusted);
        assert!(glob_match("dsvm-?", "DSVM-1"));
        assert!(!glob_match("dsvm-?", "dsvm-10"));
        assert!(glob_match("*", ""));
    }

    #[test]
    fn hashed_entries() {
        use data_encoding::BASE64;
        let a = key();
        let salt = [7u8; 20];
        let mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(&salt)
            .unwrap()
            .chain_update(b"[127.0.0.1]:2201")
            .finalize()
            .into_bytes();
        let hashed = format!("|1|{}|{}", BASE64.encode(&salt), BASE64.encode(&mac));
        let policy = HostKeyPolicy::parse(&line(&hashed, &a));
        assert_eq!(policy.check_key("127.0.0.1", 2201, &a), Verdict::Trusted);
        assert_eq!(policy.check_key("127.0.0.1", 2202, &a), Verdict::Unknown);
    }

    #[test]
    fn revoked_wins() {
        let a = key();
        let text = line("10.0.0.4", &a) + &line("@revoked *", &a);
        let policy = HostKeyPolicy::parse(&text);
        assert_eq!(policy.check_key("10.0.0.4", 22, &a), Verdict::Revoked);
    }

    #[test]
    fn garbage_lines_are_skipped() {
        let a = key();
        let text = format!("garbage\n\u{0}\u{1}\n{}", line("h", &a));
        let policy = HostKeyPolicy::parse(&text);
        assert_eq!(policy.check_key("h", 22, &a), Verdict::Trusted);
    }
}
