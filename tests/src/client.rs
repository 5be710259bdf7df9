//! OpenSSH clients (`ssh`, `scp`, `sftp -b`, `rsync -e ssh`) with hermetic options, and
//! known_hosts files.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use tempfile::TempDir;

use crate::keys::UserKey;
use crate::process::{run_with_input, run_with_timeout};
use crate::shell::sh_quote;
use crate::sshd::SshdVm;
use crate::tools::tool;

/// Default bound for one client command.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// An OpenSSH known_hosts line for a host on 127.0.0.1: `[127.0.0.1]:PORT <type> <base64>`.
/// `public_key_line` is a `.pub` line; its comment is dropped.
pub fn known_hosts_line(port: u16, public_key_line: &str) -> String {
    let mut fields = public_key_line.split_whitespace();
    let (Some(kind), Some(blob)) = (fields.next(), fields.next()) else {
        panic!("not an OpenSSH public key line: {public_key_line:?}");
    };
    format!("[127.0.0.1]:{port} {kind} {blob}")
}

/// A known_hosts file. [`new`](Self::new) makes an empty one in its own temp dir (removed on
/// drop); [`at`](Self::at) creates or truncates one at a given path (e.g. the gateway's
/// `backend_known_hosts`).
pub struct KnownHosts {
    path: PathBuf,
    _dir: Option<TempDir>,
}

impl KnownHosts {
    /// An empty known_hosts file in a fresh temp dir.
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("poolgate-known-hosts-")
            .tempdir()
            .expect("create temp dir for known_hosts");
        let mut hosts = Self::at(&dir.path().join("known_hosts"));
        hosts._dir = Some(dir);
        hosts
    }

    /// An empty known_hosts file at `path` (created or truncated; parent dirs created).
    pub fn at(path: &Path) -> Self {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create known_hosts parent dir");
        }
        std::fs::write(path, "").unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        KnownHosts {
            path: path.to_path_buf(),
            _dir: None,
        }
    }

    /// Appends a line (e.g. from [`known_hosts_line`]).
    pub fn add_line(&self, line: &str) -> &Self {
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .unwrap_or_else(|e| panic!("open {}: {e}", self.path.display()));
        writeln!(file, "{}", line.trim()).expect("append to known_hosts");
        self
    }

    /// Appends `vm`'s host key for `[127.0.0.1]:<its port>`.
    pub fn add_vm(&self, vm: &SshdVm) -> &Self {
        self.add_line(&vm.known_hosts_line())
    }

    /// Appends `public_key_line` for `[127.0.0.1]:<port>` (e.g. the gateway's host key).
    pub fn add_host_key(&self, port: u16, public_key_line: &str) -> &Self {
        self.add_line(&known_hosts_line(port, public_key_line))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Default for KnownHosts {
    fn default() -> Self {
        Self::new()
    }
}

/// A hermetic OpenSSH client for `user@127.0.0.1:port`: `-F /dev/null`, `BatchMode=yes`,
/// `StrictHostKeyChecking=yes` against its own known_hosts file, `IdentitiesOnly=yes`, no agent
/// unless [`agent`](Self::agent) is given, `ConnectTimeout=10`, `LogLevel=ERROR`. Builds `ssh`,
/// `scp`, `sftp -b` and `rsync -e "ssh …"` commands that share these options; the `run*`
/// helpers bound each command by [`timeout`](Self::timeout) (default 30 s).
#[derive(Clone, Debug)]
pub struct SshClient {
    user: String,
    port: u16,
    known_hosts: PathBuf,
    identity: Option<PathBuf>,
    certificate: Option<PathBuf>,
    agent: Option<PathBuf>,
    options: Vec<String>,
    timeout: Duration,
}

impl SshClient {
    /// A client for `user@127.0.0.1:port` that trusts only the host keys in `known_hosts`.
    pub fn new(user: &str, port: u16, known_hosts: &Path) -> Self {
        SshClient {
            user: user.to_string(),
            port,
            known_hosts: known_hosts.to_path_buf(),
            identity: None,
            certificate: None,
            agent: None,
            options: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Authenticates with `key`, and with its certificate when a CA has signed it.
    pub fn user_key(mut self, key: &UserKey) -> Self {
        self.identity = Some(key.private_key_path().to_path_buf());
        let cert = key.certificate_path();
        if cert.exists() {
            self.certificate = Some(cert);
        }
        self
    }

    /// `-i <private key>`.
    pub fn identity(mut self, private_key: &Path) -> Self {
        self.identity = Some(private_key.to_path_buf());
        self
    }

    /// `-o CertificateFile=<cert>`.
    pub fn certificate(mut self, cert: &Path) -> Self {
        self.certificate = Some(cert.to_path_buf());
        self
    }

    /// Uses the ssh-agent at `socket` (`SSH_AUTH_SOCK`); otherwise no agent is used.
    pub fn agent(mut self, socket: &Path) -> Self {
        self.agent = Some(socket.to_path_buf());
        self
    }

    /// An extra `-o` option, e.g. `"ForwardAgent=yes"` or `"SendEnv=PGTEST_X"`. These come
    /// before the defaults, so they override them (e.g. `"LogLevel=DEBUG1"`).
    pub fn option(mut self, option: &str) -> Self {
        self.options.push(option.to_string());
        self
    }

    /// The bound for each `run*` call (default 30 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The port this client connects to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `user@127.0.0.1`.
    pub fn destination(&self) -> String {
        format!("{}@127.0.0.1", self.user)
    }

    /// The options shared by `ssh`, `scp` and `sftp` (everything but the port and destination).
    pub fn common_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["-F".into(), "/dev/null".into()];
        let mut opt = |o: String| {
            args.push("-o".into());
            args.push(o.into());
        };
        // ssh keeps the first value it sees for an option: caller's options go first.
        for o in &self.options {
            opt(o.clone());
        }
        opt("BatchMode=yes".into());
        opt("StrictHostKeyChecking=yes".into());
        opt(format!("UserKnownHostsFile={}", self.known_hosts.display()));
        opt("GlobalKnownHostsFile=/dev/null".into());
        opt("UpdateHostKeys=no".into());
        opt("IdentitiesOnly=yes".into());
        opt("ConnectTimeout=10".into());
        opt("LogLevel=ERROR".into());
        if let Some(cert) = &self.certificate {
            opt(format!("CertificateFile={}", cert.display()));
        }
        if self.agent.is_none() {
            opt("IdentityAgent=none".into());
        }
        if let Some(key) = &self.identity {
            args.push("-i".into());
            args.push(key.into());
        }
        args
    }

    /// `ssh <options> -p PORT [extra_args…] -- user@127.0.0.1 [remote]`. `extra_args` are ssh
    /// flags such as `-N`, `-T`, `-tt` or `-L 8000:127.0.0.1:80`; `remote` is run by the login
    /// shell on the far side.
    pub fn ssh_command(&self, extra_args: &[&str], remote: Option<&str>) -> Command {
        let mut cmd = self.base(tool("ssh"));
        cmd.args(self.common_args())
            .arg("-p")
            .arg(self.port.to_string())
            .args(extra_args)
            .arg("--")
            .arg(self.destination());
        if let Some(remote) = remote {
            cmd.arg(remote);
        }
        cmd
    }

    /// `ssh … -- user@127.0.0.1 <remote>`.
    pub fn command(&self, remote: &str) -> Command {
        self.ssh_command(&[], Some(remote))
    }

    /// Starts `remote` over ssh in the background: stdin `/dev/null`, stdout and stderr piped
    /// (read them with [`wait_for_output`](crate::wait_for_output) once it has ended).
    pub fn spawn(&self, remote: &str) -> std::process::Child {
        self.command(remote)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn ssh {remote:?}: {e}"))
    }

    /// Runs `remote` over ssh (stdin `/dev/null`) and returns its status and output; panics if
    /// it overruns the timeout. Exit status 255 means ssh itself failed (see stderr).
    pub fn run(&self, remote: &str) -> Output {
        run_with_timeout(&mut self.command(remote), self.timeout)
    }

    /// Like [`run`](Self::run) with `input` on the remote command's stdin.
    pub fn run_with_input(&self, remote: &str, input: &[u8]) -> Output {
        run_with_input(&mut self.command(remote), input, self.timeout)
    }

    /// `scp <options> -P PORT <local> user@127.0.0.1:<remote>` (upload).
    pub fn scp_to(&self, local: &Path, remote: &str) -> Command {
        let mut cmd = self.scp_base();
        cmd.arg(local)
            .arg(format!("{}:{remote}", self.destination()));
        cmd
    }

    /// `scp <options> -P PORT user@127.0.0.1:<remote> <local>` (download).
    pub fn scp_from(&self, remote: &str, local: &Path) -> Command {
        let mut cmd = self.scp_base();
        cmd.arg(format!("{}:{remote}", self.destination()))
            .arg(local);
        cmd
    }

    /// `sftp <options> -P PORT -b <batch_file> user@127.0.0.1`: runs the batch commands (one
    /// per line); a failing command fails the whole run unless prefixed with `-`.
    pub fn sftp_batch(&self, batch_file: &Path) -> Command {
        let mut cmd = self.base(tool("sftp"));
        cmd.args(self.common_args())
            .arg("-P")
            .arg(self.port.to_string())
            .arg("-b")
            .arg(batch_file)
            .arg(self.destination());
        cmd
    }

    /// The `rsync -e` value: this ssh with its options and port, quoted for rsync.
    pub fn rsync_shell(&self) -> String {
        let mut parts = vec![sh_quote(&tool("ssh").to_string_lossy())];
        for arg in self.common_args() {
            parts.push(sh_quote(&arg.to_string_lossy()));
        }
        parts.push("-p".into());
        parts.push(self.port.to_string());
        parts.join(" ")
    }

    /// `rsync -e "<ssh …>" <args…>`; name remote paths with [`remote_path`](Self::remote_path).
    pub fn rsync(&self, args: &[&str]) -> Command {
        let mut cmd = self.base(tool("rsync"));
        cmd.arg("-e").arg(self.rsync_shell()).args(args);
        cmd
    }

    /// `user@127.0.0.1:<path>`, for scp/rsync arguments.
    pub fn remote_path(&self, path: &str) -> String {
        format!("{}:{path}", self.destination())
    }

    fn scp_base(&self) -> Command {
        let mut cmd = self.base(tool("scp"));
        cmd.args(self.common_args())
            .arg("-q")
            .arg("-P")
            .arg(self.port.to_string());
        cmd
    }

    fn base(&self, program: PathBuf) -> Command {
        let mut cmd = Command::new(program);
        match &self.agent {
            Some(socket) => cmd.env("SSH_AUTH_SOCK", socket),
            None => cmd.env_remove("SSH_AUTH_SOCK"),
        };
        cmd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_hosts_line_drops_the_comment() {
        assert_eq!(
            known_hosts_line(2222, "ssh-ed25519 AAAAC3Nz vm-a host key"),
            "[127.0.0.1]:2222 ssh-ed25519 AAAAC3Nz"
        );
    }

    #[test]
    fn common_args_are_hermetic() {
        let client = SshClient::new("pgtest1", 2200, Path::new("/kh"));
        let args: Vec<String> = client
            .common_args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(args.contains(&"UserKnownHostsFile=/kh".to_string()));
        assert!(args.contains(&"IdentityAgent=none".to_string()));
    }
}
