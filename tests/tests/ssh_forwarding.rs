//! Forwarding through the gateway: `ssh -L` to a TCP service on the VM side, `ssh -R` back to a
//! listener in the test, `ssh -A` agent forwarding — and each refused when the gateway's config
//! turns it off (`ssh.port_forwarding`, `ssh.agent_forwarding`), independently of the other.
//!
//! The VMs run on this machine, so "a service on the VM side" is a listener on 127.0.0.1 here,
//! and a "VM-side connection" to an `-R` port is a connection to 127.0.0.1:<port>, which the
//! VM's sshd accepts.

// Test code: a failed step should abort the test at once (as in tests/src/lib.rs).
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use poolgate_tests::*;

const WAIT: Duration = Duration::from_secs(15);

/// A TCP echo service on 127.0.0.1:<free port>, one thread per connection. Counts connections.
struct EchoServer {
    port: u16,
    accepted: Arc<AtomicUsize>,
}

impl EchoServer {
    fn start() -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind echo server");
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                thread::spawn(move || {
                    let mut reader = stream.try_clone().expect("clone echo stream");
                    let _ = std::io::copy(&mut reader, &mut stream);
                    let _ = stream.shutdown(Shutdown::Write);
                });
            }
        });
        EchoServer { port, accepted }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// Sends `size` bytes through `port` and expects them echoed back unchanged.
fn echo_round_trip(port: u16, size: usize) {
    let payload: Vec<u8> = (0..size).map(|i| (i * 7 + i / 251) as u8).collect();
    let mut stream = TcpStream::connect(addr(port)).expect("connect to the forwarded port");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let sent = payload.clone();
    let write = thread::spawn(move || {
        writer
            .write_all(&sent)
            .expect("write to the forwarded port");
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    stream
        .read_to_end(&mut back)
        .expect("read the echo through the forward");
    write.join().unwrap();
    assert_eq!(back.len(), payload.len(), "echoed length");
    assert!(back == payload, "echoed bytes differ");
}

/// Waits until `log_dir/<what>.stderr` contains `needle`.
fn wait_for_stderr(bg: &Background, log_dir: &std::path::Path, needle: &str) {
    wait_until(WAIT, &format!("{needle:?} on ssh's stderr"), || {
        bg.stderr(log_dir).contains(needle)
    });
}

#[test]
fn local_forward_reaches_an_echo_service_on_the_vm_side() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let pool = GatewayPool::builder().vm("vm-a").users(1).start();
    let echo = EchoServer::start();
    let logs = tempfile::tempdir().unwrap();
    let lport = free_port();
    let forward = format!("127.0.0.1:{lport}:127.0.0.1:{}", echo.port);
    let _ssh = Background::spawn(
        &mut pool.client(1).ssh_command(
            &["-N", "-o", "ExitOnForwardFailure=yes", "-L", &forward],
            None,
        ),
        "ssh-L",
        logs.path(),
    );
    // ssh opens its local listener once the session is up.
    wait_for_port(addr(lport), WAIT);
    echo_round_trip(lport, 16);
    echo_round_trip(lport, 4 << 20);
    // Two forwarded connections at once.
    let a = thread::spawn(move || echo_round_trip(lport, 1 << 20));
    let b = thread::spawn(move || echo_round_trip(lport, 1 << 20));
    a.join().unwrap();
    b.join().unwrap();
    // (+1: wait_for_port's probe was forwarded too.)
    assert!(echo.accepted() >= 4, "{} connections", echo.accepted());
}

#[test]
fn remote_forward_reaches_a_listener_in_the_test() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let pool = GatewayPool::builder().vm("vm-a").users(1).start();
    let echo = EchoServer::start();
    let logs = tempfile::tempdir().unwrap();

    // A fixed port on the VM side.
    let rport = free_port();
    let forward = format!("127.0.0.1:{rport}:127.0.0.1:{}", echo.port);
    let ssh = Background::spawn(
        &mut pool.client(1).ssh_command(
            &["-N", "-o", "ExitOnForwardFailure=yes", "-R", &forward],
            None,
        ),
        "ssh-R",
        logs.path(),
    );
    // The VM's sshd listens once the gateway relayed the tcpip-forward request.
    wait_for_port(addr(rport), WAIT);
    echo_round_trip(rport, 16);
    echo_round_trip(rport, 4 << 20);
    // (+1: wait_for_port's probe was forwarded too.)
    assert!(echo.accepted() >= 2, "{} connections", echo.accepted());
    let before = echo.accepted();
    drop(ssh);
    // The user left: the VM's listener goes away with the session.
    wait_for_port_closed(addr(rport), WAIT);

    // Port 0: the VM's sshd picks the port, and the gateway must relay it back to the client.
    let ssh = Background::spawn(
        &mut pool.client(1).option("LogLevel=INFO").ssh_command(
            &[
                "-N",
                "-o",
                "ExitOnForwardFailure=yes",
                "-R",
                &format!("127.0.0.1:0:127.0.0.1:{}", echo.port),
            ],
            None,
        ),
        "ssh-R0",
        logs.path(),
    );
    wait_for_stderr(&ssh, logs.path(), "Allocated port ");
    let text = ssh.stderr(logs.path());
    let port: u16 = text
        .split("Allocated port ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no allocated port in {text:?}"));
    assert_ne!(port, 0);
    echo_round_trip(port, 64 << 10);
    assert_eq!(echo.accepted(), before + 1);
}

/// `ssh-add -L` on the VM through `client` with `-A`, and its exit code.
fn agent_keys_on_the_vm(client: SshClient) -> (Option<i32>, String) {
    let out = client
        .option("ForwardAgent=yes")
        .run("echo \"sock=${SSH_AUTH_SOCK:-none}\"; ssh-add -L");
    (out.status.code(), stdout(&out) + &stderr(&out))
}

#[test]
fn agent_forwarding_lists_the_users_key_on_the_vm() {
    require_tools!("sshd", "ssh", "ssh-keygen", "ssh-agent", "ssh-add");
    require_root!();
    let pool = GatewayPool::builder().vm("vm-a").users(1).start();
    let agent = SshAgent::start();
    agent.add(pool.key(1));
    let (code, text) = agent_keys_on_the_vm(pool.client(1).agent(agent.socket()));
    assert_eq!(code, Some(0), "{text}");
    let blob = pool
        .key(1)
        .public_key_line()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
    assert!(
        text.contains(&blob),
        "the forwarded agent does not list the key: {text}"
    );
    assert!(!text.contains("sock=none"), "{text}");
}

#[test]
fn port_forwarding_off_refuses_local_and_remote_forwards() {
    require_tools!("sshd", "ssh", "ssh-keygen", "ssh-agent", "ssh-add");
    require_root!();
    let pool = GatewayPool::builder()
        .vm("vm-a")
        .users(1)
        .ssh_option("port_forwarding = false")
        .start();
    let echo = EchoServer::start();
    let logs = tempfile::tempdir().unwrap();

    // -L: ssh listens locally, but the gateway refuses the direct-tcpip channel.
    let lport = free_port();
    // ssh reports a failed channel open at INFO level.
    let local = Background::spawn(
        &mut pool.client(1).option("LogLevel=INFO").ssh_command(
            &[
                "-N",
                "-L",
                &format!("127.0.0.1:{lport}:127.0.0.1:{}", echo.port),
            ],
            None,
        ),
        "ssh-L",
        logs.path(),
    );
    wait_for_port(addr(lport), WAIT);
    let mut stream = TcpStream::connect(addr(lport)).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let _ = stream.write_all(b"hello?");
    let mut buf = Vec::new();
    // ssh closes the local connection when the channel open fails (EOF or reset).
    let _ = stream.read_to_end(&mut buf);
    assert!(
        buf.is_empty(),
        "data came back through a refused forward: {buf:?}"
    );
    wait_for_stderr(&local, logs.path(), "open failed");
    assert!(
        local
            .stderr(logs.path())
            .contains("administratively prohibited"),
        "{}",
        local.stderr(logs.path())
    );
    drop(local);

    // -R: the gateway refuses tcpip-forward; with ExitOnForwardFailure ssh exits 255.
    let rport = free_port();
    let out = run_with_timeout(
        &mut pool.client(1).ssh_command(
            &[
                "-N",
                "-o",
                "ExitOnForwardFailure=yes",
                "-R",
                &format!("127.0.0.1:{rport}:127.0.0.1:{}", echo.port),
            ],
            None,
        ),
        WAIT,
    );
    assert_eq!(out.status.code(), Some(255), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("remote port forwarding failed"),
        "{}",
        stderr(&out)
    );
    assert!(
        TcpStream::connect(addr(rport)).is_err(),
        "something listens on the refused -R port {rport}"
    );
    assert_eq!(echo.accepted(), 0, "the echo service was reached");

    // Agent forwarding is a separate switch and still works.
    let agent = SshAgent::start();
    agent.add(pool.key(1));
    let (code, text) = agent_keys_on_the_vm(pool.client(1).agent(agent.socket()));
    assert_eq!(
        code,
        Some(0),
        "agent forwarding with port_forwarding = false: {text}"
    );
}

#[test]
fn agent_forwarding_off_leaves_the_vm_without_an_agent() {
    require_tools!("sshd", "ssh", "ssh-keygen", "ssh-agent", "ssh-add");
    require_root!();
    let pool = GatewayPool::builder()
        .vm("vm-a")
        .users(1)
        .ssh_option("agent_forwarding = false")
        .start();
    let agent = SshAgent::start();
    agent.add(pool.key(1));
    let (code, text) = agent_keys_on_the_vm(pool.client(1).agent(agent.socket()));
    // ssh-add: exit 2 = no agent to talk to.
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("sock=none"), "{text}");
    assert!(
        text.contains("Could not open a connection to your authentication agent"),
        "{text}"
    );

    // Port forwarding is a separate switch and still works.
    let echo = EchoServer::start();
    let logs = tempfile::tempdir().unwrap();
    let lport = free_port();
    let _ssh = Background::spawn(
        &mut pool.client(1).ssh_command(
            &[
                "-N",
                "-o",
                "ExitOnForwardFailure=yes",
                "-L",
                &format!("127.0.0.1:{lport}:127.0.0.1:{}", echo.port),
            ],
            None,
        ),
        "ssh-L",
        logs.path(),
    );
    wait_for_port(addr(lport), WAIT);
    echo_round_trip(lport, 1024);
}
