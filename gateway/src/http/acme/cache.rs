//! The ACME cache directory (`tls.acme_cache`): one subdirectory per ACME directory URL
//! holding the account (`account.json`: its key and URL), the certificate (`cert.pem`, the
//! chain) and its key (`key.pem`), the HTTP-01 answers while an order runs (`http-01/TOKEN`)
//! and the lock of the replica that orders (`order.lock`). Directories are 0700, files 0600,
//! written to a temporary name and renamed, so a reader never sees half a file.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// An order lock older than this is left over from a replica that died while ordering.
const STALE_LOCK: Duration = Duration::from_secs(10 * 60);

/// The files of one ACME directory's account and certificate.
#[derive(Debug, Clone)]
pub struct CacheDir {
    root: PathBuf,
    dir: PathBuf,
}

impl CacheDir {
    /// The subdirectory of `root` for the ACME directory at `directory_url`: its host (and
    /// port) with characters other than letters, digits, `.` and `-` replaced by `_`, e.g.
    /// `acme-v02.api.letsencrypt.org`.
    pub fn new(root: &Path, directory_url: &str) -> Self {
        let host = directory_url
            .split_once("://")
            .map_or(directory_url, |(_, rest)| rest)
            .split(['/', '?', '#'])
            .next()
            .unwrap_or_default();
        let name: String = host
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let name = if name.is_empty() || name.starts_with('.') {
            format!("_{name}")
        } else {
            name
        };
        Self {
            root: root.to_path_buf(),
            dir: root.join(name),
        }
    }

    /// The subdirectory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `account.json`.
    pub fn account(&self) -> PathBuf {
        self.dir.join("account.json")
    }

    /// `cert.pem`.
    pub fn cert(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }

    /// `key.pem`.
    pub fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }

    fn challenges(&self) -> PathBuf {
        self.dir.join("http-01")
    }

    /// Creates the cache directories (0700) when missing.
    pub fn create(&self) -> io::Result<()> {
        for dir in [&self.root, &self.dir, &self.challenges()] {
            if !dir.is_dir() {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode_0700()
                    .create(dir)?;
                set_mode(dir, 0o700)?;
            }
        }
        Ok(())
    }

    /// Writes `data` to `path` with mode 0600 (temporary file, then rename).
    pub fn write_private(path: &Path, data: &[u8]) -> io::Result<()> {
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let mut options = fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let result = (|| {
            let mut file = options.open(&tmp)?;
            set_mode(&tmp, 0o600)?;
            file.write_all(data)?;
            file.sync_all()?;
            fs::rename(&tmp, path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// The HTTP-01 answer file of `token`, when the token is a plain base64url string (so it
    /// can never name a path outside the directory).
    fn challenge_path(&self, token: &str) -> Option<PathBuf> {
        let plain = !token.is_empty()
            && token.len() <= 256
            && token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        plain.then(|| self.challenges().join(token))
    }

    /// Publishes an HTTP-01 answer for replicas sharing this directory.
    pub fn put_challenge(&self, token: &str, key_authorization: &str) -> io::Result<()> {
        match self.challenge_path(token) {
            Some(path) => Self::write_private(&path, key_authorization.as_bytes()),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "challenge token is not base64url",
            )),
        }
    }

    /// The HTTP-01 answer another replica published, if any.
    pub fn get_challenge(&self, token: &str) -> Option<String> {
        let path = self.challenge_path(token)?;
        fs::read_to_string(path).ok()
    }

    /// Removes an HTTP-01 answer.
    pub fn remove_challenge(&self, token: &str) {
        if let Some(path) = self.challenge_path(token) {
            let _ = fs::remove_file(path);
        }
    }

    /// Takes the order lock (`order.lock`, created exclusively, holding `owner`); `Ok(None)`
    /// while another replica holds it. A lock older than ten minutes, or one left by this
    /// replica (`owner`: a previous run killed while ordering), is taken over.
    pub fn lock(&self, owner: &str) -> io::Result<Option<OrderLock>> {
        let path = self.dir.join("order.lock");
        for _ in 0..2 {
            let mut options = fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                options.mode(0o600);
            }
            match options.open(&path) {
                Ok(mut file) => {
                    let _ = writeln!(file, "{owner}");
                    return Ok(Some(OrderLock { path }));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let age = fs::metadata(&path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| SystemTime::now().duration_since(t).ok());
                    let ours = fs::read_to_string(&path).is_ok_and(|held| held.trim() == owner);
                    if ours || age.is_some_and(|a| a > STALE_LOCK) {
                        tracing::warn!(path = %path.display(), "taking over a stale ACME order lock");
                        let _ = fs::remove_file(&path);
                        continue;
                    }
                    return Ok(None);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }
}

/// Held while this process orders; removes `order.lock` when dropped.
#[derive(Debug)]
pub struct OrderLock {
    path: PathBuf,
}

impl Drop for OrderLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

trait Mode0700 {
    fn mode_0700(&mut self) -> &mut Self;
}

impl Mode0700 for fs::DirBuilder {
    fn mode_0700(&mut self) -> &mut Self {
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            self.mode(0o700);
        }
        self
    }
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_mode(_: &Path, _: u32) -> io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn layout_modes_challenges_and_lock() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("acme");
        let c = CacheDir::new(&root, "https://127.0.0.1:14000/dir");
        assert_eq!(c.dir(), root.join("127.0.0.1_14000"));
        assert_eq!(
            CacheDir::new(&root, "https://acme-v02.api.letsencrypt.org/directory").dir(),
            root.join("acme-v02.api.letsencrypt.org")
        );
        c.create().unwrap();
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(c.dir()), 0o700);
        CacheDir::write_private(&c.key(), b"secret").unwrap();
        assert_eq!(mode(&c.key()), 0o600);
        CacheDir::write_private(&c.key(), b"secret2").unwrap();
        assert_eq!(fs::read(c.key()).unwrap(), b"secret2");

        c.put_challenge("abc-DEF_1", "abc-DEF_1.thumb").unwrap();
        assert_eq!(
            c.get_challenge("abc-DEF_1").as_deref(),
            Some("abc-DEF_1.thumb")
        );
        assert_eq!(c.get_challenge("../account.json"), None);
        assert!(c.put_challenge("../x", "y").is_err());
        c.remove_challenge("abc-DEF_1");
        assert_eq!(c.get_challenge("abc-DEF_1"), None);

        let held = c.lock("gw-1").unwrap().expect("first lock");
        assert!(c.lock("gw-2").unwrap().is_none(), "held by gw-1");
        drop(held);
        let held = c.lock("gw-2").unwrap().expect("released");
        // A lock left by this replica's previous run is its own to take.
        std::mem::forget(held);
        assert!(c.lock("gw-1").unwrap().is_none());
        assert!(c.lock("gw-2").unwrap().is_some());
    }
}
