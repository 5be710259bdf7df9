//! Ed25519 keys and an OpenSSH user CA, made with the real `ssh-keygen`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use crate::process::run_with_timeout;
use crate::tools::tool;

const KEYGEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Makes an ed25519 keypair at `path` (private, mode 0600) and `path.pub`, with no passphrase,
/// by running `ssh-keygen -t ed25519 -N '' -C comment -f path`. Overwrites nothing: panics if
/// `path` exists.
pub fn generate_ed25519(path: &Path, comment: &str) {
    assert!(
        !path.exists(),
        "refusing to overwrite key {}",
        path.display()
    );
    keygen(
        Command::new(tool("ssh-keygen"))
            .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
            .arg(path),
        "generate an ed25519 key",
    );
    // ssh-keygen already writes 0600; make it explicit because ssh refuses looser keys.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .expect("chmod 0600 private key");
}

/// An OpenSSH user certificate authority: an ed25519 keypair in its own temp dir (removed on
/// drop). Point an [`SshdVm`](crate::SshdVm)'s `TrustedUserCAKeys` at
/// [`public_key_path`](Self::public_key_path) and sign user keys with [`sign`](Self::sign).
pub struct UserCa {
    _dir: TempDir,
    key: PathBuf,
}

impl UserCa {
    /// A fresh CA keypair (`ssh-keygen -t ed25519 -N '' -f …/user_ca`).
    pub fn generate() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("poolgate-user-ca-")
            .tempdir()
            .expect("create temp dir for the user CA");
        let key = dir.path().join("user_ca");
        generate_ed25519(&key, "poolgate-tests user CA");
        UserCa { _dir: dir, key }
    }

    /// The CA's private key file.
    pub fn private_key_path(&self) -> &Path {
        &self.key
    }

    /// The CA's public key file: what `TrustedUserCAKeys` names.
    pub fn public_key_path(&self) -> PathBuf {
        pub_path(&self.key)
    }

    /// The CA's public key line (`ssh-ed25519 AAAA… comment`), trimmed.
    pub fn public_key_line(&self) -> String {
        read_trimmed(&self.public_key_path())
    }

    /// Signs `key` for one `principal` (the login name), valid from one minute ago (clock skew)
    /// for `validity`, and returns the certificate path (`<key>-cert.pub`, next to the key, so
    /// `ssh -i <key>` also finds it).
    pub fn sign(&self, key: &UserKey, principal: &str, validity: Duration) -> PathBuf {
        let validity = format!("-1m:+{}s", validity.as_secs().max(1));
        self.sign_with(key, &[principal], &validity)
    }

    /// Signs `key` for `principals` with an `ssh-keygen -V` validity spec (e.g. `"+5m"`,
    /// `"-2h:-1h"` for an expired certificate, `"always:forever"`); returns the certificate path.
    pub fn sign_with(&self, key: &UserKey, principals: &[&str], validity: &str) -> PathBuf {
        let key_id = format!("poolgate-tests:{}", principals.join(","));
        keygen(
            Command::new(tool("ssh-keygen"))
                .arg("-q")
                .arg("-s")
                .arg(&self.key)
                .args(["-I", &key_id, "-n", &principals.join(","), "-V", validity])
                .arg(key.public_key_path()),
            "sign a user certificate",
        );
        let cert = key.certificate_path();
        assert!(
            cert.exists(),
            "ssh-keygen -s did not write {}",
            cert.display()
        );
        cert
    }
}

/// A user's ed25519 keypair (private key 0600) in its own temp dir, removed on drop.
pub struct UserKey {
    _dir: TempDir,
    key: PathBuf,
}

impl UserKey {
    /// A fresh keypair; `name` becomes the file name and the key comment.
    pub fn generate(name: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("poolgate-user-key-")
            .tempdir()
            .expect("create temp dir for a user key");
        let file: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let key = dir.path().join(format!("id_{file}"));
        generate_ed25519(&key, name);
        UserKey { _dir: dir, key }
    }

    /// The private key file (what `ssh -i` takes).
    pub fn private_key_path(&self) -> &Path {
        &self.key
    }

    /// The public key file (`<key>.pub`).
    pub fn public_key_path(&self) -> PathBuf {
        pub_path(&self.key)
    }

    /// The public key line (`ssh-ed25519 AAAA… name`), trimmed: an `authorized_keys` line.
    pub fn public_key_line(&self) -> String {
        read_trimmed(&self.public_key_path())
    }

    /// Where a certificate for this key is (`<key>-cert.pub`); it exists once a CA signed it.
    pub fn certificate_path(&self) -> PathBuf {
        let mut name = self.key.file_name().expect("key file name").to_owned();
        name.push("-cert.pub");
        self.key.with_file_name(name)
    }
}

fn pub_path(key: &Path) -> PathBuf {
    let mut name = key.file_name().expect("key file name").to_owned();
    name.push(".pub");
    key.with_file_name(name)
}

pub(crate) fn read_trimmed(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .trim()
        .to_string()
}

fn keygen(cmd: &mut Command, what: &str) {
    let out = run_with_timeout(cmd, KEYGEN_TIMEOUT);
    assert!(
        out.status.success(),
        "ssh-keygen failed to {what} ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
