//! Test data for transfers: pseudo-random files and streams, and their sha256.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::output::{assert_ok, stdout};
use crate::process::{run_with_timeout, wait_for_exit};
use crate::tools::find_tool;

/// The sha256 command: `openssl dgst -sha256 -r` (uses the CPU's SHA extensions: several times
/// faster than coreutils here, which matters for gigabytes), else `sha256sum`. Both print the
/// hex digest first.
pub fn sha256_command() -> Command {
    if find_tool("openssl").is_some() {
        let mut cmd = Command::new("openssl");
        cmd.args(["dgst", "-sha256", "-r"]);
        cmd
    } else {
        Command::new("sha256sum")
    }
}

fn first_word(text: &str) -> String {
    text.split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("no digest in {text:?}"))
        .to_string()
}

/// sha256 of a file, as hex.
pub fn sha256_file(path: &Path) -> String {
    let out = run_with_timeout(sha256_command().arg(path), Duration::from_secs(120));
    assert_ok(&out, "sha256 of a file");
    first_word(&stdout(&out))
}

/// A sha256 process fed through [`write`](Self::write); [`finish`](Self::finish) returns the
/// digest.
pub struct Sha256Stream {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Sha256Stream {
    /// Starts the sha256 process.
    pub fn start() -> Self {
        let mut child = sha256_command()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sha256");
        let stdin = child.stdin.take();
        Sha256Stream { child, stdin }
    }

    /// Feeds `data`.
    pub fn write(&mut self, data: &[u8]) {
        self.stdin
            .as_mut()
            .expect("still open")
            .write_all(data)
            .expect("write to sha256");
    }

    /// Ends the input and returns the hex digest.
    pub fn finish(mut self) -> String {
        self.stdin = None;
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .expect("piped stdout")
            .read_to_string(&mut out)
            .expect("read sha256");
        let _ = self.child.wait();
        first_word(&out)
    }
}

/// A command printing `size` pseudo-random bytes on stdout: an AES-CTR keystream from
/// `openssl enc` (fast), else `/dev/urandom`. `seed` varies the stream.
pub fn random_bytes_command(size: u64, seed: &str) -> Command {
    let mut cmd = Command::new("sh");
    if find_tool("openssl").is_some() {
        cmd.arg("-c").arg(
            "openssl enc -aes-128-ctr -pbkdf2 -nosalt -pass \"pass:$2\" -in /dev/zero 2>/dev/null \
             | head -c \"$1\"",
        );
    } else {
        cmd.arg("-c").arg("head -c \"$1\" /dev/urandom");
    }
    cmd.arg("sh").arg(size.to_string()).arg(seed);
    cmd
}

/// Writes `size` pseudo-random bytes to `path` (world-readable, so the pool's test users can
/// read it from the VM side: the VMs run on this machine) and returns its sha256.
pub fn random_file(path: &Path, size: u64) -> String {
    let mut child = random_bytes_command(size, &path.display().to_string())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(path).expect("create the data file"))
        .spawn()
        .expect("spawn the data generator");
    let status = wait_for_exit(&mut child, Duration::from_secs(120), "the data generator");
    assert!(
        status.success(),
        "generating {} failed: {status}",
        path.display()
    );
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).expect("chmod 644");
    assert_eq!(std::fs::metadata(path).expect("stat").len(), size);
    sha256_file(path)
}

/// A temp dir the test users can enter (for files the VM side reads).
pub fn shared_temp_dir() -> TempDir {
    let dir = tempfile::Builder::new()
        .prefix("poolgate-e2e-data-")
        .tempdir()
        .expect("create data dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod 755");
    dir
}
