//! [`SshAgent`]: a real `ssh-agent` for agent-forwarding tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::keys::UserKey;
use crate::process::{kill_tree, run_with_timeout, wait_until};
use crate::tools::tool;

const START_TIMEOUT: Duration = Duration::from_secs(10);

/// An `ssh-agent -D` listening on a socket in its own temp dir; killed and reaped on drop.
/// Give its socket to [`SshClient::agent`](crate::SshClient::agent).
pub struct SshAgent {
    child: Child,
    socket: PathBuf,
    _dir: TempDir,
}

impl SshAgent {
    /// Starts the agent and waits until its socket accepts connections.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("poolgate-agent-")
            .tempdir()
            .expect("create temp dir for ssh-agent");
        let socket = dir.path().join("agent.sock");
        let child = Command::new(tool("ssh-agent"))
            .arg("-D")
            .arg("-a")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn ssh-agent");
        // Built before waiting, so a timeout panic still kills the agent through Drop.
        let agent = SshAgent {
            child,
            socket,
            _dir: dir,
        };
        // Connected to, not only present: the agent binds the socket (the file appears) before
        // it listens, and an `ssh-add` in between is refused.
        wait_until(START_TIMEOUT, "the ssh-agent socket", || {
            std::os::unix::net::UnixStream::connect(&agent.socket).is_ok()
        });
        agent
    }

    /// The agent's socket (`SSH_AUTH_SOCK`).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `ssh-add <key>`: adds the key, and its certificate when one was signed.
    pub fn add(&self, key: &UserKey) {
        let out = run_with_timeout(
            Command::new(tool("ssh-add"))
                .env("SSH_AUTH_SOCK", &self.socket)
                .arg(key.private_key_path()),
            Duration::from_secs(10),
        );
        assert!(
            out.status.success(),
            "ssh-add {} failed ({}): {}",
            key.private_key_path().display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `ssh-add -L`: the public keys the agent holds, one per line (empty when none).
    pub fn list(&self) -> String {
        let out = run_with_timeout(
            Command::new(tool("ssh-add"))
                .env("SSH_AUTH_SOCK", &self.socket)
                .arg("-L"),
            Duration::from_secs(10),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for SshAgent {
    fn drop(&mut self) {
        kill_tree(self.child.id());
        let _ = self.child.wait();
    }
}
