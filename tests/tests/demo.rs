//! `poolgate demo` end to end: the binary runs as a process with no config, and real OpenSSH
//! clients and HTTP clients use it as README's quickstart says. A first login to the empty pool
//! is held while a demo VM boots; exec returns its exit status; `ssh -tt` gets a pty; password
//! `demo` works; sftp works; the admin listener answers; a browser's first request wakes the
//! pool too, then the web page and websocket echo come through the gateway's HTTP listener; once
//! everyone leaves the VM drains and stops; Ctrl-C stops everything.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use poolgate_tests::*;
use tempfile::TempDir;

/// A running `poolgate demo` with its own ports and state dir; killed on drop.
struct Demo {
    child: Option<Child>,
    dir: TempDir,
    ssh: u16,
    http: u16,
    admin: u16,
}

impl Demo {
    fn start(extra: &[&str]) -> Demo {
        let dir = tempfile::Builder::new()
            .prefix("poolgate-demo-")
            .tempdir()
            .expect("temp dir");
        let (ssh, http, admin) = (free_port(), free_port(), free_port());
        let log = std::fs::File::create(dir.path().join("demo.log")).expect("log file");
        let child = Command::new(poolgate_bin())
            .arg("demo")
            .args(["--ssh-port", &ssh.to_string()])
            .args(["--http-port", &http.to_string()])
            .args(["--admin-port", &admin.to_string()])
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(extra)
            .env_remove("POOLGATE_LOG")
            // The log is read by the tests: no colour codes between a field and its value.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn poolgate demo");
        let demo = Demo {
            child: Some(child),
            dir,
            ssh,
            http,
            admin,
        };
        for port in [ssh, http, admin] {
            wait_for_port(
                SocketAddr::from(([127, 0, 0, 1], port)),
                Duration::from_secs(20),
            );
        }
        demo
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("demo.log")).unwrap_or_default()
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Trusts the gateway's host key (from the state dir) for its SSH port.
    fn known_hosts(&self) -> KnownHosts {
        let line = std::fs::read_to_string(self.state_dir().join("ssh_host_ed25519_key.pub"))
            .expect("gateway host key .pub");
        let hosts = KnownHosts::new();
        hosts.add_host_key(self.ssh, line.trim());
        hosts
    }

    fn vms(&self) -> serde_json::Value {
        let body = http_get(self.admin, "/api/v1/vms").1;
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/api/v1/vms: {e}: {body}"))
    }

    fn lifecycles(&self) -> Vec<(String, String)> {
        self.vms()
            .as_array()
            .expect("array of VMs")
            .iter()
            .map(|v| {
                (
                    v["name"].as_str().unwrap_or("").to_string(),
                    v["lifecycle"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- poolgate demo log ---\n{}--- end ---", self.log());
        }
        if let Some(mut child) = self.child.take() {
            kill_tree(child.id());
            let _ = child.wait();
        }
    }
}

/// A plain HTTP/1.1 GET on 127.0.0.1:port; returns status and body.
fn http_get(port: u16, path: &str) -> (u16, String) {
    let (status, _, body) = http_get_with(port, path, "");
    (status, body)
}

/// A GET with `extra` header lines (each ending in CRLF): status, head and body.
fn http_get_with(port: u16, path: &str, extra: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}Connection: close\r\n\r\n"
    )
    .expect("write request");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (status, head.to_string(), body.to_string())
}

/// The `name=value` of the first `Set-Cookie` in response `head`.
fn set_cookie(head: &str) -> Option<String> {
    head.lines()
        .find_map(|l| {
            l.strip_prefix("set-cookie: ")
                .or(l.strip_prefix("Set-Cookie: "))
        })
        .and_then(|c| c.split(';').next())
        .map(str::to_owned)
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `ssh bob@demo REMOTE` by password only (one prompt), answered by the program `askpass`.
fn password_login(demo: &Demo, hosts: &KnownHosts, askpass: &Path, remote: &str) -> Command {
    let mut cmd = SshClient::new("bob", demo.ssh, hosts.path())
        .option("BatchMode=no")
        .option("PubkeyAuthentication=no")
        .option("PreferredAuthentications=password")
        .option("NumberOfPasswordPrompts=1")
        .command(remote);
    cmd.env("SSH_ASKPASS", askpass)
        .env("SSH_ASKPASS_REQUIRE", "force")
        .env("DISPLAY", "none");
    cmd
}

/// An SSH_ASKPASS program that answers `demo`.
fn askpass(dir: &Path) -> PathBuf {
    let path = dir.join("askpass");
    std::fs::write(&path, "#!/bin/sh\necho demo\n").expect("write askpass");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

#[test]
fn demo_wakes_a_vm_for_the_first_login_serves_ssh_and_stops_when_everyone_leaves() {
    require_tools!("ssh", "ssh-keygen", "sftp");
    let started = Instant::now();
    let demo = Demo::start(&[
        "--min-vms",
        "0",
        "--max-vms",
        "2",
        "--boot-delay",
        "2s",
        "--scale-in-after",
        "3s",
        "--scale-to-zero-after",
        "4s",
    ]);
    let try_line = format!("ssh -p {} ", demo.ssh);
    wait_until(Duration::from_secs(10), "what to try printed", || {
        demo.log().contains(&try_line)
    });
    assert!(
        demo.lifecycles().iter().all(|(_, l)| l == "stopped"),
        "{:?}",
        demo.lifecycles()
    );

    // Any key: a fresh one. The first login waits for a VM to boot.
    let key = UserKey::generate("demo-user");
    let hosts = demo.known_hosts();
    let user = "alice";
    let ssh = SshClient::new(user, demo.ssh, hosts.path())
        .identity(key.private_key_path())
        .option("LogLevel=INFO")
        .timeout(Duration::from_secs(40));
    let out = ssh.run("echo vm=$POOLGATE_VM; exit 3");
    assert_eq!(
        out.status.code(),
        Some(3),
        "exit status comes back: {out:?}"
    );
    assert!(stdout(&out).contains("vm=demo-1"), "{out:?}");
    assert!(stderr(&out).contains("starting a VM"), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("poolgate demo"),
        "banner: {}",
        stderr(&out)
    );
    eprintln!("first login (VM boot included): {:?}", started.elapsed());
    // Woken for one user with spare_vms = 0: one VM, not two. The woken VM runs a moment before
    // its first probe passes; the autoscaler counts it as on its way, not as a reason to start
    // another for the user still waiting.
    let log = demo.log();
    let starts: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("autoscaler") && l.contains("action=Start("))
        .collect();
    assert_eq!(
        starts.len(),
        1,
        "one start for one waiting user: {starts:#?}"
    );
    assert!(starts[0].contains("action=Start(1)"), "{starts:#?}");
    let lifecycles = demo.lifecycles();
    assert!(
        lifecycles
            .iter()
            .all(|(vm, l)| vm == "demo-1" || l == "stopped"),
        "only demo-1 was started: {lifecycles:?}"
    );

    // A pty with `ssh -tt`.
    let out = run_with_timeout(
        &mut ssh.ssh_command(&["-tt"], Some("tty; echo term=$TERM")),
        Duration::from_secs(20),
    );
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("/dev/pts/"), "{}", stdout(&out));

    // Password `demo` through passthrough, with SSH_ASKPASS.
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cmd = password_login(&demo, &hosts, &askpass(dir.path()), "echo pw=$POOLGATE_VM");
    let out = run_with_timeout(&mut cmd, Duration::from_secs(20));
    assert!(out.status.success(), "password login: {out:?}");
    assert!(stdout(&out).contains("pw=demo-"), "{out:?}");

    // A wrong password is refused.
    std::fs::write(dir.path().join("askpass"), "#!/bin/sh\necho wrong\n").expect("write");
    let mut cmd = password_login(&demo, &hosts, &dir.path().join("askpass"), "true");
    let out = run_with_timeout(&mut cmd, Duration::from_secs(20));
    assert_eq!(
        out.status.code(),
        Some(255),
        "wrong password refused: {out:?}"
    );

    // sftp (served by OpenSSH's sftp-server on the demo VM, when installed).
    let sftp_server = [
        "/usr/lib/openssh/sftp-server",
        "/usr/libexec/openssh/sftp-server",
        "/usr/libexec/sftp-server",
    ]
    .iter()
    .any(|p| Path::new(p).is_file());
    if !sftp_server {
        eprintln!(
            "SKIPPED sftp: OpenSSH's sftp-server is not installed (apt-get install openssh-sftp-server)"
        );
    }
    let batch = dir.path().join("batch");
    let local = dir.path().join("up.txt");
    std::fs::write(&local, "sftp through poolgate demo\n").expect("write");
    let remote = dir.path().join("down.txt");
    std::fs::write(
        &batch,
        format!("put {} {}\n", local.display(), remote.display()),
    )
    .expect("write batch");
    if sftp_server {
        let out = run_with_timeout(&mut ssh.sftp_batch(&batch), Duration::from_secs(20));
        assert!(out.status.success(), "sftp: {out:?}");
        assert_eq!(
            std::fs::read_to_string(&remote).unwrap_or_default(),
            "sftp through poolgate demo\n"
        );
    }

    // The admin listener: status page, metrics, API.
    let (code, page) = http_get(demo.admin, "/status");
    assert_eq!(code, 200);
    assert!(page.contains("demo-1"), "{page}");
    let (code, metrics) = http_get(demo.admin, "/metrics");
    assert_eq!(code, 200);
    assert!(metrics.contains("poolgate_sessions_total"), "{metrics}");
    assert!(
        demo.lifecycles()
            .contains(&("demo-1".to_string(), "running".to_string()))
    );

    // Work left running the usual ways (`nohup`, `setsid`): it ends with its VM, as on a real
    // VM, not with the demo.
    let jobs = detach_jobs(&ssh, demo.ssh);

    // Everyone has left: the VM drains and stops.
    let left = Instant::now();
    wait_until(Duration::from_secs(30), "every demo VM stopped", || {
        demo.lifecycles().iter().all(|(_, l)| l == "stopped")
    });
    eprintln!("scale-in after everyone left: {:?}", left.elapsed());
    let log = demo.log();
    assert!(log.contains("Drain(\"demo-1\")"), "{log}");
    // Logged once what ran on the VM has ended (SIGTERM, SIGKILL after 2 s).
    wait_until(Duration::from_secs(10), "the demo VM's stop logged", || {
        demo.log().contains("demo VM stopped")
    });
    jobs.assert_ended("the demo VM's scale-in", &demo);

    // A password login to the empty pool: only a VM can check the password, so the login waits
    // while the pool wakes (within ssh.login_grace) rather than being refused as if the
    // password were wrong.
    let asked = Instant::now();
    let mut cmd = password_login(&demo, &hosts, &askpass(dir.path()), "echo pw=$POOLGATE_VM");
    let out = run_with_timeout(&mut cmd, Duration::from_secs(40));
    assert!(
        out.status.success() && stdout(&out).contains("pw=demo-"),
        "a password login to the empty pool: {out:?}\n{}",
        demo.log()
    );
    eprintln!("password login woke the pool in {:?}", asked.elapsed());
    eprintln!("whole journey: {:?}", started.elapsed());
}

/// Processes a demo user left running on a VM, found by their command lines.
struct DetachedJobs(Vec<String>);

/// Leaves `nohup sleep …` and `setsid sleep …` running on the VM `ssh` lands on (their
/// durations made unique by `tag`), and waits until both run.
fn detach_jobs(ssh: &SshClient, tag: u16) -> DetachedJobs {
    let (nohup, setsid) = (format!("3{tag}"), format!("4{tag}"));
    let out = ssh.run(&format!(
        "nohup sleep {nohup} >/dev/null 2>&1 </dev/null & \
         setsid sleep {setsid} >/dev/null 2>&1 </dev/null &"
    ));
    assert!(out.status.success(), "{out:?}");
    let jobs = DetachedJobs(vec![
        format!("sleep\0{nohup}\0"),
        format!("sleep\0{setsid}\0"),
    ]);
    wait_until(
        Duration::from_secs(10),
        "both detached jobs running",
        || jobs.running() == 2,
    );
    jobs
}

impl DetachedJobs {
    fn running(&self) -> usize {
        self.0
            .iter()
            .filter(|c| !pids_with_cmdline_prefix(c).is_empty())
            .count()
    }

    /// Both ended (killed) within 5 s of `when`.
    fn assert_ended(&self, when: &str, demo: &Demo) {
        let gone = poll(Duration::from_secs(5), || self.running() == 0);
        for c in &self.0 {
            for pid in pids_with_cmdline_prefix(c) {
                kill_tree(pid);
            }
        }
        assert!(
            gone,
            "detached jobs outlived {when}: {:?}\n{}",
            self.0,
            demo.log()
        );
    }
}

#[test]
fn demo_wakes_a_vm_for_a_browser_then_serves_its_page_and_websocket_echo() {
    // An empty pool: the browser's first request wakes it (503 "starting" page, then the VM).
    let demo = Demo::start(&[
        "--min-vms",
        "0",
        "--max-vms",
        "1",
        "--boot-delay",
        "1s",
        "--scale-in-after",
        "8s",
        "--scale-to-zero-after",
        "10s",
    ]);
    // Like a browser, it keeps the cookie the "starting" page gives it: that wakes the pool.
    let first = http_get_with(demo.http, "/", "");
    assert_eq!(first.0, 503, "{first:?}");
    let wait = set_cookie(&first.1).unwrap_or_else(|| panic!("no wait cookie: {}", first.1));
    assert!(wait.starts_with("poolgate_vm_wait="), "{wait}");
    let mut last = (0, String::new(), String::new());
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        last = http_get_with(demo.http, "/", &format!("Cookie: {wait}\r\n"));
        if last.0 == 200 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(last.0, 200, "GET / through the gateway: {last:?}");
    assert!(last.2.contains("demo VM"), "{}", last.2);
    assert!(last.2.contains("demo-1"), "{}", last.2);
    // The browser comes back with its cookie, which makes it a session on demo-1.
    let cookie = set_cookie(&last.1).unwrap_or_else(|| panic!("no cookie set: {}", last.1));
    let again = http_get_with(demo.http, "/", &format!("Cookie: {cookie}\r\n"));
    assert_eq!(again.0, 200, "{again:?}");
    wait_until(
        Duration::from_secs(5),
        "the browser counted as a session",
        || {
            demo.vms()
                .as_array()
                .into_iter()
                .flatten()
                .any(|vm| vm["sessions"]["http"].as_u64().unwrap_or(0) >= 1)
        },
    );

    // Websocket echo through the gateway's HTTP listener.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let echoed = runtime.block_on(async {
        use futures_util::{SinkExt, StreamExt};
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", demo.http))
            .await
            .expect("connect");
        let url = format!("ws://127.0.0.1:{}/ws", demo.http);
        let (mut ws, _) = tokio_tungstenite::client_async(url, tcp)
            .await
            .expect("websocket handshake through the gateway");
        ws.send(tokio_tungstenite::tungstenite::Message::text("ping demo"))
            .await
            .expect("send");
        let reply = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("echo within 10 s")
            .expect("a message")
            .expect("no error");
        reply.into_text().map(|t| t.to_string()).unwrap_or_default()
    });
    assert_eq!(echoed, "ping demo");

    // The browser has gone quiet: its session lapses with the demo's short idle times (not the
    // production default of 30 minutes), and the pool goes back to zero.
    let quiet = Instant::now();
    wait_until(
        Duration::from_secs(40),
        "the demo VM stopped after the browser left",
        || demo.lifecycles().iter().all(|(_, l)| l == "stopped"),
    );
    eprintln!(
        "pool back to zero {:?} after the browser left",
        quiet.elapsed()
    );
}

#[test]
fn demo_stops_cleanly_on_ctrl_c() {
    let mut demo = Demo::start(&["--min-vms", "1", "--max-vms", "1", "--boot-delay", "0s"]);
    wait_until(Duration::from_secs(20), "demo-1 running", || {
        demo.lifecycles()
            .contains(&("demo-1".to_string(), "running".to_string()))
    });
    let vm_ssh = demo.vms()[0]["ssh_port"].as_u64().expect("ssh_port") as u16;
    let key = UserKey::generate("demo-user");
    let hosts = demo.known_hosts();
    let ssh = SshClient::new("alice", demo.ssh, hosts.path())
        .identity(key.private_key_path())
        .timeout(Duration::from_secs(30));
    let jobs = detach_jobs(&ssh, demo.ssh);
    let mut child = demo.child.take().expect("running");
    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).expect("SIGINT");
    let status = wait_for_exit(
        &mut child,
        Duration::from_secs(15),
        "poolgate demo after Ctrl-C",
    );
    assert!(status.success(), "{status}\n{}", demo.log());
    for port in [demo.ssh, demo.http, demo.admin, vm_ssh] {
        assert!(
            TcpStream::connect(("127.0.0.1", port)).is_err(),
            "port {port} still open after Ctrl-C"
        );
    }
    jobs.assert_ended("Ctrl-C", &demo);
}

#[test]
fn demo_says_which_flag_to_change_when_a_port_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let dir = tempfile::tempdir().expect("temp dir");
    let out = run_with_timeout(
        Command::new(poolgate_bin())
            .args(["demo", "--ssh-port", &free_port().to_string()])
            .args(["--http-port", &port.to_string()])
            .args(["--admin-port", &free_port().to_string()])
            .arg("--state-dir")
            .arg(dir.path().join("state")),
        Duration::from_secs(20),
    );
    assert!(!out.status.success(), "{out:?}");
    let err = stderr(&out);
    // Another test may have grabbed the free SSH or admin port meanwhile: then that flag is named.
    let named = if err.contains("listen.http:") {
        "--http-port"
    } else if err.contains("listen.ssh:") {
        "--ssh-port"
    } else {
        "--admin-port"
    };
    assert!(
        err.contains(&format!("Pick another one with {named} PORT")),
        "{err}"
    );
}

/// The team at 9:00: twenty people log in at once to a pool at zero. The autoscaler starts the
/// VMs it sizes the pool for (two sessions each in the demo, three VMs at most), and the held
/// logins spread over them, rather than all taking the first VM up while the VMs started for
/// them stand empty (and are scaled in again).
#[test]
fn twenty_logins_to_an_empty_pool_spread_over_the_vms_started_for_them() {
    require_tools!("ssh", "ssh-keygen");
    const TEAM: usize = 20;
    let demo = Demo::start(&["--min-vms", "0", "--max-vms", "3"]);
    let try_line = format!("ssh -p {} ", demo.ssh);
    wait_until(Duration::from_secs(10), "what to try printed", || {
        demo.log().contains(&try_line)
    });
    let key = UserKey::generate("team");
    let hosts = demo.known_hosts();
    let started = Instant::now();
    let logins: Vec<_> = (0..TEAM)
        .map(|i| {
            SshClient::new(&format!("user{i}"), demo.ssh, hosts.path())
                .identity(key.private_key_path())
                .timeout(Duration::from_secs(60))
                // Everyone stays a while: the places are taken at the same time.
                .command("echo $POOLGATE_VM; sleep 4")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn ssh")
        })
        .collect();
    let mut per_vm: std::collections::BTreeMap<String, usize> = Default::default();
    for child in logins {
        let out = child.wait_with_output().expect("ssh");
        assert!(out.status.success(), "{out:?}\n{}", demo.log());
        *per_vm.entry(stdout(&out).trim().to_owned()).or_default() += 1;
    }
    eprintln!(
        "{TEAM} logins to an empty pool in {:?}: {per_vm:?}",
        started.elapsed()
    );
    assert_eq!(per_vm.values().sum::<usize>(), TEAM);
    assert_eq!(per_vm.len(), 3, "every VM started took some: {per_vm:?}");
    assert!(
        per_vm.values().all(|&n| n <= TEAM / 2),
        "one VM took most of the team while the others stood by: {per_vm:?}"
    );
}

#[test]
fn a_waiting_browser_wakes_one_vm_however_often_it_asks_and_a_cookieless_monitor_wakes_none() {
    // Every request that found no VM used to wake another VM: a browser's page, its favicon and
    // each refresh of the "starting" page counted as people (one browser started all three
    // demo VMs), and an uptime check polling the URL kept the pool from ever reaching zero.
    let demo = Demo::start(&[
        "--min-vms",
        "0",
        "--max-vms",
        "3",
        "--boot-delay",
        "3s",
        "--scale-in-after",
        "60s",
        "--scale-to-zero-after",
        "60s",
    ]);
    // A monitor without cookies: told the pool is starting, wakes nothing.
    for _ in 0..8 {
        let (status, head, _) = http_get_with(demo.http, "/", "");
        assert_eq!(status, 503, "{head}");
        std::thread::sleep(Duration::from_millis(250));
    }
    std::thread::sleep(Duration::from_secs(2));
    let log = demo.log();
    assert!(!log.contains("action=Start"), "{log}");
    assert!(
        demo.lifecycles().iter().all(|(_, l)| l == "stopped"),
        "{:?}",
        demo.lifecycles()
    );

    // A browser: the page, its favicon, and the page again every half second until it is
    // served (each with the cookie the first answer gave it).
    let first = http_get_with(demo.http, "/", "");
    assert_eq!(first.0, 503);
    let wait = set_cookie(&first.1).unwrap_or_else(|| panic!("no wait cookie: {}", first.1));
    let cookie = format!("Cookie: {wait}\r\n");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut served = false;
    let mut asked = 0;
    while Instant::now() < deadline && !served {
        for path in ["/", "/favicon.ico"] {
            asked += 1;
            served |= path == "/" && http_get_with(demo.http, path, &cookie).0 == 200;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(served, "{}", demo.log());
    assert!(asked >= 8, "the browser asked {asked} times");
    let log = demo.log();
    assert_eq!(
        log.matches("action=Start(").count(),
        1,
        "one VM started for one browser:\n{log}"
    );
    let up = demo
        .lifecycles()
        .into_iter()
        .filter(|(_, l)| l != "stopped")
        .count();
    assert_eq!(up, 1, "{:?}", demo.lifecycles());
}

#[test]
fn an_api_client_with_a_token_and_no_cookies_wakes_the_pool() {
    // JupyterHub's REST API clients and scripts send a token and keep no cookie: they wait
    // under their credentials (hashed, never kept), and wake the pool like a browser.
    let demo = Demo::start(&["--min-vms", "0", "--max-vms", "1", "--boot-delay", "1s"]);
    let token = "Authorization: token 0123456789abcdef\r\nAccept: application/json\r\n";
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = (0, String::new(), String::new());
    while Instant::now() < deadline {
        last = http_get_with(demo.http, "/hub/api/users", token);
        if last.0 != 503 {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_ne!(last.0, 503, "still waiting: {last:?}\n{}", demo.log());
    assert_eq!(
        demo.log().matches("action=Start(").count(),
        1,
        "{}",
        demo.log()
    );
}
