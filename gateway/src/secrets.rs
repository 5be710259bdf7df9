//! Secret files (SSH host and CA keys, the cookie secret): created with mode 0600 in a 0700
//! directory, atomically, and refused when group or others may read them.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// A secret file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        source: std::io::Error,
    },
    /// The file is readable by group or others.
    #[error(
        "{path}: permissions {mode:04o} are too open for a private key (run: chmod 600 {path})"
    )]
    TooOpen {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// The file's contents are not a usable secret.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong, and what to do.
        message: String,
    },
}

/// Maps an I/O error on `path` to [`SecretFileError::Io`].
pub fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> SecretFileError + '_ {
    move |source| SecretFileError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Refuses a secret file that group or others may read.
pub fn check_permissions(path: &Path) -> Result<(), SecretFileError> {
    let mode = fs::metadata(path)
        .map_err(io_error(path))?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecretFileError::TooOpen {
            path: path.display().to_string(),
            mode,
        });
    }
    Ok(())
}

/// Reads a secret file after checking its permissions.
pub fn read(path: &Path) -> Result<Vec<u8>, SecretFileError> {
    check_permissions(path)?;
    fs::read(path).map_err(io_error(path))
}

/// Writes `contents` to a new file created with mode 0600 (parent directories 0700), atomically:
/// the data goes to a temporary file in the same directory that is then renamed into place.
pub fn write(path: &Path, contents: &[u8]) -> Result<(), SecretFileError> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir.filter(|d| !d.exists()) {
        fs::create_dir_all(dir).map_err(io_error(dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_error(dir))?;
    }
    // A fresh name each time (`.<name>.<random>.tmp`): one left by a process that crashed
    // mid-write cannot stand in the way; it is removed again if anything fails.
    let dir = dir.unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map_or_else(|| "secret".into(), |n| n.to_string_lossy().into_owned());
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .permissions(fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)
        .map_err(io_error(dir))?;
    tmp.write_all(contents)
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(io_error(tmp.path()))?;
    tmp.persist(path)
        .map(drop)
        .map_err(|e| io_error(path)(e.error))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_written_0600_in_a_0700_dir_and_refused_when_opened_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/secret");
        write(&path, b"s3cret").unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        assert_eq!(read(&path).unwrap(), b"s3cret");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = read(&path).unwrap_err().to_string();
        assert!(
            err.ends_with(&format!(
                "permissions 0644 are too open for a private key (run: chmod 600 {})",
                path.display()
            )),
            "{err}"
        );
        assert!(matches!(
            read(&dir.path().join("missing")),
            Err(SecretFileError::Io { .. })
        ));
    }
}
