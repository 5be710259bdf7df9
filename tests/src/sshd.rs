//! [`SshdVm`]: a real OpenSSH `sshd` on 127.0.0.1 playing one pool VM.

use std::fs::OpenOptions;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::client::known_hosts_line;
use crate::keys::{generate_ed25519, read_trimmed};
use crate::ports::{free_port, read_banner, wait_for_port_closed};
use crate::process::{Backoff, kill_tree, run_with_timeout, tree};
use crate::tools::tool;

/// How long sshd may take to answer with its banner.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts with a new port when another process grabbed the free port first.
const PORT_ATTEMPTS: usize = 3;

/// Builds an [`SshdVm`]; see [`SshdVm::builder`].
#[derive(Clone, Debug)]
pub struct SshdVmBuilder {
    name: String,
    ca_keys: Option<PathBuf>,
    password_auth: bool,
    authorized_keys_file: Option<String>,
    env: Vec<(String, String)>,
    lines: Vec<String>,
    trailer: Vec<String>,
    port: Option<u16>,
}

impl SshdVmBuilder {
    /// `TrustedUserCAKeys`: the CA public key file whose certificates sshd accepts (principal =
    /// login name). Without it no certificate is trusted.
    pub fn trusted_user_ca_keys(mut self, ca_public_key: impl AsRef<Path>) -> Self {
        self.ca_keys = Some(ca_public_key.as_ref().to_path_buf());
        self
    }

    /// `PasswordAuthentication yes` (default no). With `UsePAM no` sshd checks `/etc/shadow`.
    pub fn password_authentication(mut self, enabled: bool) -> Self {
        self.password_auth = enabled;
        self
    }

    /// `AuthorizedKeysFile` (default `none`), e.g. `"/tmp/x/%u/authorized_keys"`.
    pub fn authorized_keys_file(mut self, pattern: &str) -> Self {
        self.authorized_keys_file = Some(pattern.to_string());
        self
    }

    /// A variable sshd sets in every session (`SetEnv`).
    pub fn set_env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_string(), value.to_string()));
        self
    }

    /// An sshd_config line placed BEFORE the defaults. sshd keeps the first value of most
    /// keywords, so this overrides a default (e.g. `"MaxSessions 2"`).
    pub fn config_line(mut self, line: &str) -> Self {
        self.lines.push(line.to_string());
        self
    }

    /// An sshd_config line placed AFTER everything else: for `Match` blocks.
    pub fn config_trailer(mut self, line: &str) -> Self {
        self.trailer.push(line.to_string());
        self
    }

    /// A fixed port instead of a free one (no retry if it is taken).
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Generates the host key, writes sshd_config, starts `sshd -D -e` and waits (10 s at most)
    /// until the port answers with an `SSH-2.0-` banner. Panics with the sshd log if it fails.
    pub fn start(self) -> SshdVm {
        std::fs::create_dir_all("/run/sshd").expect("mkdir /run/sshd (sshd's privsep dir)");
        let dir = tempfile::Builder::new()
            .prefix(&format!("poolgate-{}-", self.name))
            .tempdir()
            .expect("create temp dir for an sshd VM");
        let host_key = dir.path().join("ssh_host_ed25519_key");
        generate_ed25519(&host_key, &format!("{} host key", self.name));
        let mut vm = SshdVm {
            name: self.name.clone(),
            port: 0,
            config_path: dir.path().join("sshd_config"),
            log_path: dir.path().join("sshd.log"),
            host_key,
            child: None,
            dir,
        };
        let mut last_error = String::new();
        for attempt in 1..=PORT_ATTEMPTS {
            vm.port = self.port.unwrap_or_else(free_port);
            let config = self.config_text(&vm);
            std::fs::write(&vm.config_path, config).expect("write sshd_config");
            match vm.spawn_and_wait() {
                Ok(()) => return vm,
                Err(e) if e.port_taken && self.port.is_none() => {
                    eprintln!(
                        "{}: port {} taken by another process (attempt {attempt}), retrying",
                        vm.name, vm.port
                    );
                    last_error = e.message;
                }
                Err(e) => panic!("{}", e.message),
            }
        }
        panic!("{last_error}\n(no free port after {PORT_ATTEMPTS} attempts)");
    }

    fn config_text(&self, vm: &SshdVm) -> String {
        let mut c = format!("# poolgate-tests VM {}\n", self.name);
        for line in &self.lines {
            c += &format!("{line}\n");
        }
        // `$POOLGATE_VM` comes from the gateway, which sends it on every session channel (a
        // VM's sshd accepts it as deploy/cloud-init configures it): not set here, so the tests
        // see what a real VM shows.
        // One line: sshd takes the first `SetEnv` line only.
        let env = if self.env.is_empty() {
            String::new()
        } else {
            let pairs: Vec<String> = self.env.iter().map(|(n, v)| format!("{n}={v}")).collect();
            format!("SetEnv {}\n", pairs.join(" "))
        };
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        c += &format!(
            "Port {port}\n\
             ListenAddress 127.0.0.1\n\
             HostKey {host_key}\n\
             PidFile {pid}\n\
             UsePAM no\n\
             PasswordAuthentication {password}\n\
             KbdInteractiveAuthentication no\n\
             PubkeyAuthentication yes\n\
             TrustedUserCAKeys {ca}\n\
             AuthorizedKeysFile {authorized}\n\
             PermitRootLogin prohibit-password\n\
             AllowTcpForwarding yes\n\
             AllowAgentForwarding yes\n\
             StrictModes no\n\
             Subsystem sftp internal-sftp\n\
             {env}\
             AcceptEnv LANG LC_* PGTEST_* POOLGATE_VM\n\
             LogLevel VERBOSE\n\
             MaxSessions 64\n\
             MaxStartups 200\n\
             PrintMotd no\n\
             PrintLastLog no\n\
             UseDNS no\n",
            port = vm.port,
            host_key = vm.host_key.display(),
            pid = vm.pid_file().display(),
            password = yes_no(self.password_auth),
            ca = self
                .ca_keys
                .as_ref()
                .map_or("none".into(), |p| p.display().to_string()),
            authorized = self.authorized_keys_file.as_deref().unwrap_or("none"),
        );
        if per_source_penalties_supported() {
            // OpenSSH >= 9.8 would block 127.0.0.1 after a few refused logins: tests do that.
            c += "PerSourcePenalties no\n";
        }
        for line in &self.trailer {
            c += &format!("{line}\n");
        }
        c
    }
}

/// Why sshd did not start: the full story (config and log), and whether the port was taken.
struct StartError {
    port_taken: bool,
    message: String,
}

/// A real OpenSSH `sshd` on `127.0.0.1:<free port>` with its own temp dir, host key, config and
/// log. It sets `POOLGATE_VM=<name>` in every session, so `ssh … 'echo $POOLGATE_VM'` tells
/// where a session landed. Dropping it kills sshd and every session process and waits for them;
/// when the test is panicking the sshd log is printed first.
pub struct SshdVm {
    name: String,
    port: u16,
    config_path: PathBuf,
    log_path: PathBuf,
    host_key: PathBuf,
    child: Option<Child>,
    dir: TempDir,
}

impl SshdVm {
    /// A builder for a VM called `name` (e.g. `"vm-a"`).
    pub fn builder(name: &str) -> SshdVmBuilder {
        SshdVmBuilder {
            name: name.to_string(),
            ca_keys: None,
            password_auth: false,
            authorized_keys_file: None,
            env: Vec::new(),
            lines: Vec::new(),
            trailer: Vec::new(),
            port: None,
        }
    }

    /// The VM's name (its `POOLGATE_VM`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The port sshd listens on (the same across [`restart`](Self::restart)).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The host public key line (`ssh-ed25519 AAAA… comment`), trimmed.
    pub fn host_public_key_line(&self) -> String {
        read_trimmed(&self.host_public_key_path())
    }

    /// The host public key file.
    pub fn host_public_key_path(&self) -> PathBuf {
        self.host_key.with_file_name("ssh_host_ed25519_key.pub")
    }

    /// This VM's known_hosts line: `[127.0.0.1]:PORT ssh-ed25519 AAAA…`.
    pub fn known_hosts_line(&self) -> String {
        known_hosts_line(self.port, &self.host_public_key_line())
    }

    /// The VM's temp dir (config, host key, log, pid file).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The file sshd writes its pid to (`PidFile`): where operator scripts that start the VM
    /// themselves (`sshd -f <config>`) find it.
    pub fn pid_file(&self) -> PathBuf {
        self.dir.path().join("sshd.pid")
    }

    /// The sshd_config file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// `sshd -D -e` with this VM's config (host key, users, CA trust) but listening on `addr`
    /// instead of 127.0.0.1, the config written into `dir`: to run the same VM elsewhere, as
    /// inside a network namespace of the test's. Stop this VM's own sshd first.
    pub fn command_listening_on(&self, addr: &str, dir: &Path) -> Command {
        let config = std::fs::read_to_string(&self.config_path)
            .expect("read sshd_config")
            .replace("ListenAddress 127.0.0.1", &format!("ListenAddress {addr}"));
        let path = dir.join("sshd_config");
        std::fs::write(&path, config).expect("write sshd_config");
        let mut sshd = Command::new(tool("sshd"));
        sshd.arg("-D").arg("-e").arg("-f").arg(&path);
        sshd
    }

    /// The sshd log file (`-e` output, appended to across restarts).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The sshd log so far (`LogLevel VERBOSE`: logins, key fingerprints, disconnects).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until the log contains `needle` (sshd logs asynchronously); panics with the log
    /// after `timeout`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let what = format!("the sshd log of VM {}", self.name);
        crate::log::wait_for_text(&self.log_path, &what, needle, timeout);
    }

    /// The listener's pid while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sessions of users logged in here, as sshd shows them: processes under its listener named
    /// `sshd: <user>@…` (the unprivileged post-authentication child of each connection). Probes
    /// and unauthenticated connections never get one.
    pub fn user_sessions(&self) -> usize {
        let Some(root) = self.pid() else {
            return 0;
        };
        let root = i32::try_from(root).expect("pid fits i32");
        tree(root)
            .into_iter()
            .filter(|pid| *pid != root)
            .filter_map(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).ok())
            .map(|cmdline| String::from_utf8_lossy(&cmdline).into_owned())
            .filter(|name| name.starts_with("sshd: ") && name.contains('@'))
            .count()
    }

    /// True while the sshd listener runs.
    pub fn is_running(&mut self) -> bool {
        let Some(child) = &mut self.child else {
            return false;
        };
        if child.try_wait().expect("try_wait sshd").is_none() {
            return true;
        }
        // Reaped: forget the pid so stop()/drop never signal a reused one.
        self.child = None;
        false
    }

    /// Kills sshd and every session under it, like a VM going down; waits until the port
    /// refuses connections. A no-op when already stopped.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_tree(child.id());
            let _ = child.wait();
            wait_for_port_closed(self.addr(), Duration::from_secs(5));
        }
    }

    /// Stops sshd if it runs, then starts it again on the same port with the same host key and
    /// config, and waits for its banner.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(e) = self.spawn_and_wait() {
            panic!("{}", e.message);
        }
    }

    /// Starts sshd and waits until it is ready: its log (from this start on) says it listens on
    /// our port, and the port answers with a banner. Checking the log too makes sure the banner
    /// is ours, not another process's that took the port.
    fn spawn_and_wait(&mut self) -> Result<(), StartError> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open sshd log");
        let log_start = log.metadata().expect("stat sshd log").len() as usize;
        let mut child = Command::new(tool("sshd"))
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn sshd for {}: {e}", self.name));
        let listening = format!("Server listening on 127.0.0.1 port {}.", self.port);
        let this_start = || {
            self.log_text()
                .get(log_start..)
                .unwrap_or_default()
                .to_string()
        };
        let deadline = Instant::now() + START_TIMEOUT;
        let mut backoff = Backoff::new();
        loop {
            if let Some(status) = child.try_wait().expect("try_wait sshd") {
                return Err(StartError {
                    port_taken: this_start().contains("Address already in use"),
                    message: self.failure(&format!("sshd exited with {status} while starting")),
                });
            }
            let attempt = deadline.min(Instant::now() + Duration::from_secs(1));
            if this_start().contains(&listening) && read_banner(self.addr(), attempt).is_ok() {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                kill_tree(child.id());
                let _ = child.wait();
                return Err(StartError {
                    port_taken: false,
                    message: self.failure(&format!("not ready within {START_TIMEOUT:?}")),
                });
            }
            backoff.sleep_until(deadline);
        }
    }

    fn failure(&self, what: &str) -> String {
        format!(
            "sshd VM {} on {}: {what}\n--- {} ---\n{}\n--- {} ---\n{}",
            self.name,
            self.addr(),
            self.config_path.display(),
            std::fs::read_to_string(&self.config_path).unwrap_or_default(),
            self.log_path.display(),
            self.log_text()
        )
    }
}

impl Drop for SshdVm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- sshd log of VM {} ({}) ---\n{}--- end of sshd log of {} ---",
                self.name,
                self.log_path.display(),
                self.log_text(),
                self.name
            );
        }
        if let Some(mut child) = self.child.take() {
            kill_tree(child.id());
            let _ = child.wait();
        }
    }
}

/// Whether this sshd knows `PerSourcePenalties` (OpenSSH >= 9.8), from `sshd -V`, once.
fn per_source_penalties_supported() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        let out = run_with_timeout(
            Command::new(tool("sshd")).arg("-V"),
            Duration::from_secs(10),
        );
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        openssh_version(&text).is_some_and(|v| v >= (9, 8))
    })
}

/// `(major, minor)` from text containing `OpenSSH_9.2p1`.
fn openssh_version(text: &str) -> Option<(u32, u32)> {
    let rest = &text[text.find("OpenSSH_")? + "OpenSSH_".len()..];
    let mut parts = rest.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_openssh_versions() {
        assert_eq!(
            openssh_version("OpenSSH_9.2p1 Debian-2+deb12u10, OpenSSL"),
            Some((9, 2))
        );
        assert_eq!(openssh_version("OpenSSH_10.0p2"), Some((10, 0)));
        assert_eq!(openssh_version("unknown"), None);
    }
}
