//! `poolgate run` builds every part before it binds a port: a setting or file the HTTP side
//! cannot use (a TLS key that is not the certificate's, `http.backend_scheme = "https"`, a cookie
//! secret that is too short) stops it with exit status 1 and a message naming the key, and
//! nothing is left listening — not an SSH-only gateway that logs nothing. `check-config`
//! reports the same problems before a restart does; and a SIGTERM the moment the ports answer
//! is a graceful stop. The real binary, on 127.0.0.1.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use poolgate_tests::jupyter::TestCa;
use poolgate_tests::*;

/// `poolgate run` must give up within this (it generates two Ed25519 keys, then fails).
const FAILS_WITHIN: Duration = Duration::from_secs(10);

/// A gateway directory: config listeners on free ports, one static VM (nothing listens there;
/// it is never reached) and its known_hosts line.
struct Setup {
    dir: tempfile::TempDir,
    ssh: SocketAddr,
    http: SocketAddr,
    https: SocketAddr,
    admin: SocketAddr,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("poolgate-startup-")
            .tempdir()
            .expect("temp dir");
        std::fs::create_dir_all(dir.path().join("keys")).expect("keys dir");
        std::fs::write(
            dir.path().join("keys/backend_known_hosts"),
            "[127.0.0.1]:2 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n",
        )
        .expect("write known_hosts");
        let addr = || SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        Self {
            dir,
            ssh: addr(),
            http: addr(),
            https: addr(),
            admin: addr(),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The configuration with `extra` appended (sections of their own); `https` adds
    /// `listen.https` for a `[tls]` section in `extra`.
    fn write_config(&self, https: bool, extra: &str) -> std::path::PathBuf {
        let https_line = if https {
            format!("https = \"{}\"\n", self.https)
        } else {
            String::new()
        };
        let text = format!(
            "[listen]\nssh = \"{}\"\nhttp = \"{}\"\nadmin = \"{}\"\n{https_line}\n\
             [[pool.backends]]\nname = \"vm-1\"\nhost = \"127.0.0.1\"\nssh_port = 2\nhttp_port = 3\n\n{extra}",
            self.ssh, self.http, self.admin
        );
        let path = self.path().join("poolgate.toml");
        std::fs::write(&path, text).expect("write poolgate.toml");
        path
    }
}

fn check_config(config: &Path) -> (ExitStatus, String) {
    status_and_output(run_with_timeout(
        Command::new(poolgate_bin()).arg("check-config").arg(config),
        Duration::from_secs(30),
    ))
}

/// A finished command's status, and its stdout followed by its stderr.
fn status_and_output(out: std::process::Output) -> (ExitStatus, String) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status, text)
}

/// A `poolgate run` child: killed (with its children) and its stderr printed if the test
/// panics while it runs.
struct Running {
    child: std::process::Child,
    stderr_path: std::path::PathBuf,
}

impl Running {
    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            kill_tree(self.child.id());
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- poolgate stderr ---\n{}--- end ---", self.stderr());
        }
    }
}

/// Runs `poolgate run --config`, which must exit by itself within [`FAILS_WITHIN`]; while it
/// runs and after it exits, the SSH, HTTP and admin ports must not accept a connection.
/// Returns the exit status and stderr.
fn run_expecting_failure(setup: &Setup, config: &Path) -> (ExitStatus, String) {
    let stderr_path = setup.path().join("stderr.log");
    let stderr_file = std::fs::File::create(&stderr_path).expect("create stderr.log");
    let child = Command::new(poolgate_bin())
        .arg("run")
        .arg("--config")
        .arg(config)
        .current_dir(setup.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr_file)
        .spawn()
        .expect("spawn poolgate run");
    let mut running = Running { child, stderr_path };
    let started = Instant::now();
    let accepting =
        |addr: SocketAddr| TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok();
    let listeners = [
        ("SSH", setup.ssh),
        ("HTTP", setup.http),
        ("admin", setup.admin),
    ];
    let mut status = None;
    wait_until(
        FAILS_WITHIN,
        "poolgate run to give up on a configuration it cannot serve (not run half-alive)",
        || {
            for (name, addr) in listeners {
                assert!(
                    !accepting(addr),
                    "the {name} port {addr} accepted a connection while poolgate was starting \
                     with a configuration it cannot serve"
                );
            }
            status = running.child.try_wait().expect("try_wait poolgate");
            status.is_some()
        },
    );
    for (name, addr) in listeners {
        assert!(
            !accepting(addr),
            "the {name} port {addr} accepts after poolgate exited"
        );
    }
    let status = status.expect("exited");
    eprintln!(
        "poolgate run exited with {status} after {:?}",
        started.elapsed()
    );
    (status, running.stderr())
}

fn assert_contains(text: &str, needles: &[&str]) {
    for needle in needles {
        assert!(text.contains(needle), "{needle:?} not in:\n{text}");
    }
}

#[test]
fn a_tls_key_that_is_not_the_certificates_stops_run_before_any_port_is_bound() {
    let setup = Setup::new();
    let (site, other) = (TestCa::generate(), TestCa::generate());
    // Both files are PEM, exist and have safe permissions: only loading them as a pair fails.
    let mismatched = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        site.cert_path().display(),
        other.key_path().display()
    );
    let config = setup.write_config(true, &mismatched);

    let (status, out) = check_config(&config);
    assert_eq!(status.code(), Some(1), "check-config:\n{out}");
    assert_contains(
        &out,
        &["tls: the key in", "does not belong to the certificate"],
    );

    let (status, stderr) = run_expecting_failure(&setup, &config);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_contains(
        &stderr,
        &[
            "cannot set up the HTTP frontend, so poolgate did not start",
            "does not belong to the certificate",
            "point tls.key at the private key",
        ],
    );
    assert!(!stderr.contains("listener ready"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Said once, as the log's last line: not again as a second copy on the same terminal.
    assert_eq!(
        stderr.matches("does not belong to the certificate").count(),
        1,
        "{stderr}"
    );

    // The same configuration with the certificate's own key starts and serves SSH and HTTPS.
    let matching = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        site.cert_path().display(),
        site.key_path().display()
    );
    let config = setup.write_config(true, &matching);
    let (status, out) = check_config(&config);
    assert!(status.success(), "check-config:\n{out}");
    let toml = std::fs::read_to_string(&config).expect("read config");
    let mut gateway = GatewayProcess::builder(&toml)
        .dir(setup.path())
        .wait_for(setup.ssh)
        .wait_for(setup.https)
        .start();
    assert_eq!(gateway.terminate(Duration::from_secs(20)).code(), Some(0));
}

#[test]
fn backend_scheme_https_is_refused_by_check_config_and_run() {
    let setup = Setup::new();
    let config = setup.write_config(false, "[http]\nbackend_scheme = \"https\"\n");
    let expected = "http.backend_scheme: \"https\" is not supported yet";

    let (status, out) = check_config(&config);
    assert_eq!(status.code(), Some(1), "check-config:\n{out}");
    assert_contains(&out, &[expected, "set backend_scheme = \"http\""]);

    let (status, stderr) = run_expecting_failure(&setup, &config);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_contains(&stderr, &[expected, "not starting"]);
}

#[test]
fn a_cookie_secret_too_short_is_refused_by_check_config_and_run() {
    let setup = Setup::new();
    let secret = setup.path().join("keys/cookie_secret");
    std::fs::write(&secret, "short").expect("write the secret");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))
            .expect("chmod 600");
    }
    let config = setup.write_config(false, "");
    let expected = "http.cookie_secret_file: ";

    let (status, out) = check_config(&config);
    assert_eq!(status.code(), Some(1), "check-config:\n{out}");
    assert_contains(
        &out,
        &[expected, "holds 5 bytes, a cookie secret needs at least 16"],
    );

    let (status, stderr) = run_expecting_failure(&setup, &config);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_contains(&stderr, &[expected, "needs at least 16"]);
}

#[test]
fn a_sigterm_as_soon_as_the_ports_answer_is_a_graceful_stop() {
    // The signal handlers are in place before any port is bound: a SIGTERM sent the moment the
    // listeners answer (a service manager stopping a gateway it just started, a test) stops it
    // with status 0, never by the signal's default action. Several starts, since the window was
    // a few hundred microseconds.
    let setup = Setup::new();
    let config = setup.write_config(false, "");
    let toml = std::fs::read_to_string(&config).expect("read config");
    for round in 0..8 {
        let mut gateway = GatewayProcess::builder(&toml)
            .dir(setup.path())
            .wait_for(setup.ssh)
            .wait_for(setup.http)
            .start();
        let status = gateway.terminate(Duration::from_secs(20));
        assert_eq!(status.code(), Some(0), "round {round}: {status:?}");
    }
}

/// The smallest configuration names no host key, so the first start generates one, mode 0600:
/// `check-config` says so beforehand, and `run` warns as it does it (a mistyped path must not
/// give users a new gateway identity unseen). The next start shows the same key, which OpenSSH's
/// `ssh-keyscan` reads off the SSH port, and says nothing more about it.
#[test]
fn a_missing_host_key_is_named_beforehand_generated_with_a_warning_and_kept() {
    require_tools!("ssh-keyscan");
    let setup = Setup::new();
    let config = setup.write_config(false, "");
    let key = setup.path().join("keys/ssh_host_ed25519_key");
    let (status, text) = check_config(&config);
    assert!(status.success(), "{text}");
    assert_contains(
        &text,
        &[&format!(
            "host key: {} does not exist yet; `poolgate run` generates a new one there",
            key.display()
        )],
    );
    let toml = std::fs::read_to_string(&config).expect("read config");
    let shown_key = |gateway: &GatewayProcess| {
        let out = run_with_timeout(
            Command::new(tool("ssh-keyscan")).args([
                "-t",
                "ed25519",
                "-p",
                &setup.ssh.port().to_string(),
                "127.0.0.1",
            ]),
            Duration::from_secs(20),
        );
        let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(
            line.contains("ssh-ed25519 "),
            "ssh-keyscan: {out:?}\n{}",
            gateway.log_text()
        );
        line.split_whitespace()
            .nth(2)
            .unwrap_or_default()
            .to_owned()
    };
    let start = || {
        GatewayProcess::builder(&toml)
            .dir(setup.path())
            .wait_for(setup.ssh)
            .start()
    };

    let mut first = start();
    let warned = first.log_line("generated a new SSH host key", Duration::from_secs(5));
    assert!(
        warned.contains("WARN") && warned.contains("ssh.host_keys points at the wrong file"),
        "{warned}"
    );
    let mode = std::fs::metadata(&key)
        .expect("the generated key")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "{}", key.display());
    let public = std::fs::read_to_string(key.with_extension("pub")).expect("the .pub beside it");
    let first_key = shown_key(&first);
    assert!(public.contains(&first_key), "{public} vs {first_key}");
    assert_eq!(first.terminate(Duration::from_secs(20)).code(), Some(0));

    let (status, text) = check_config(&config);
    assert!(status.success(), "{text}");
    assert!(!text.contains("host key: "), "{text}");
    let mut second = start();
    assert_eq!(
        shown_key(&second),
        first_key,
        "the host key changed at a restart"
    );
    // One log file for both starts (appended): the line is the first start's alone.
    assert_eq!(
        second
            .log_text()
            .matches("generated a new SSH host key")
            .count(),
        1,
        "{}",
        second.log_text()
    );
    assert_eq!(second.terminate(Duration::from_secs(20)).code(), Some(0));
}

/// A key file protected by a passphrase (as `ssh-keygen` makes one by default when asked for
/// one) cannot be used by a service that nobody types into. Before, `check-config` said ok and
/// `run` served an SSH port on which every handshake failed (the host key) or every VM login
/// did (the user CA), with nothing in the log at its default level. Both now name the file and
/// the command that removes the passphrase, and `run` binds nothing.
#[test]
fn a_key_encrypted_with_a_passphrase_is_refused_by_check_config_and_run() {
    require_tools!("ssh-keygen");
    for (setting, file) in [
        ("ssh.host_keys", "keys/ssh_host_ed25519_key"),
        ("ssh.user_ca_key", "keys/user_ca"),
    ] {
        let setup = Setup::new();
        let key = setup.path().join(file);
        let out = run_with_timeout(
            Command::new(tool("ssh-keygen"))
                .args(["-q", "-t", "ed25519", "-N", "a passphrase", "-f"])
                .arg(&key),
            Duration::from_secs(20),
        );
        assert_ok(&out, "ssh-keygen");
        let config = setup.write_config(false, "");
        let expected = format!(
            "{setting}: {}: the key is encrypted with a passphrase",
            key.display()
        );
        let fix = format!("ssh-keygen -p -N '' -f {}", key.display());

        let (status, out) = check_config(&config);
        assert_eq!(status.code(), Some(1), "check-config:\n{out}");
        assert_contains(&out, &[&expected, &fix]);

        let (status, stderr) = run_expecting_failure(&setup, &config);
        assert_eq!(status.code(), Some(1), "{stderr}");
        assert_contains(&stderr, &[&expected, &fix]);
        assert!(!stderr.contains("listener ready"), "{stderr}");

        // With the passphrase removed as the message says, the same key serves.
        let out = run_with_timeout(
            Command::new(tool("ssh-keygen"))
                .args(["-q", "-p", "-P", "a passphrase", "-N", "", "-f"])
                .arg(&key),
            Duration::from_secs(20),
        );
        assert_ok(&out, "ssh-keygen -p");
        let (status, out) = check_config(&config);
        assert!(status.success(), "{setting}: check-config:\n{out}");
    }

    // A file that is no key at all: named by check-config too, with advice that keeps the key.
    let setup = Setup::new();
    let key = setup.path().join("keys/ssh_host_ed25519_key");
    std::fs::write(&key, "not a key\n").expect("write");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let (status, out) = check_config(&setup.write_config(false, ""));
    assert_eq!(status.code(), Some(1), "check-config:\n{out}");
    assert_contains(
        &out,
        &[
            &format!(
                "ssh.host_keys: {}: not an OpenSSH private key",
                key.display()
            ),
            "restore the key from a backup",
        ],
    );
}

#[test]
fn keys_to_generate_in_a_read_only_config_directory_are_refused_by_check_config_and_run() {
    // The shipped systemd unit (ProtectSystem=strict) leaves /etc/poolgate read-only to the
    // gateway. A key path beside the file (`keys/cookie_secret`, the defaults) passed
    // check-config, and run then failed writing the key. The configuration directory is
    // mounted read-only here, in a mount namespace of the test's own.
    require_tools!("unshare", "mount");
    require_root!();
    let setup = Setup::new();
    let config = setup.write_config(false, "");
    let dir = setup.path().display().to_string();
    let in_read_only = |command: &str| {
        let script = format!(
            "mount --bind -o ro {dir} {dir} && STATE_DIRECTORY=/var/lib/poolgate-test exec {} {command} {}",
            poolgate_bin().display(),
            config.display()
        );
        status_and_output(run_with_timeout(
            Command::new("unshare").args(["-m", "sh", "-c", &script]),
            Duration::from_secs(30),
        ))
    };
    let (status, text) = in_read_only("check-config");
    assert_eq!(status.code(), Some(1), "{text}");
    assert_contains(
        &text,
        &[
            "ssh.host_keys[0]",
            "ssh.user_ca_key",
            "http.cookie_secret_file",
            "cannot be generated",
            "read-only filesystem",
            "/var/lib/poolgate-test/keys/cookie_secret",
        ],
    );
    let (status, text) = in_read_only("run --config");
    assert_eq!(status.code(), Some(1), "{text}");
    assert_contains(&text, &["http.cookie_secret_file", "cannot be generated"]);
    // Writable, the same file is fine: the keys are generated where it says.
    let (status, text) = check_config(&config);
    assert!(status.success(), "{text}");
}
