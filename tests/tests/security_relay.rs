//! The gateway is not an open relay: the TCP connection of an `ssh -L` forward is opened by the
//! VM's sshd, never by the gateway process.
//!
//! The test builds two network namespaces of its own, joined by one veth pair:
//!
//! ```text
//!   gateway namespace (pgr<pid>g)                  VM namespace (pgr<pid>v)
//!   ─────────────────────────────                  ────────────────────────
//!   poolgate   127.0.0.1:<ssh>                     sshd       10.213.0.2:<port>
//!   ssh -L client, its local port                  target     127.0.0.1:P  ("vm-side-target")
//!   decoy      127.0.0.1:P  ("gateway-side-decoy")
//!   gw-only    127.0.0.1:Q
//!           10.213.0.1 ═══════════ veth ═══════════ 10.213.0.2
//! ```
//!
//! `ssh -L L:127.0.0.1:P` through the gateway reaches the VM-side target (the decoy at the
//! same address in the gateway's namespace sees nothing, so the gateway did not connect
//! itself), `ss -tnp` in the VM namespace shows the target's peer socket owned by `sshd`, and
//! a forward to `127.0.0.1:Q` — which exists only next to the gateway — fails without the
//! gateway-side listener ever seeing a connection. Nothing touches the host's own namespace
//! except the processes' files; the namespaces (and the veth with them) are deleted on drop,
//! also when the test fails.

// Test code: a failed step should abort the test at once (as in tests/src/lib.rs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use poolgate_tests::*;

const GW_ADDR: &str = "10.213.0.1";
const VM_ADDR: &str = "10.213.0.2";

/// Two network namespaces joined by a veth pair; both deleted on drop.
struct Namespaces {
    gw: String,
    vm: String,
}

impl Namespaces {
    fn create() -> Self {
        let id = std::process::id();
        let ns = Namespaces {
            gw: format!("pgr{id}g"),
            vm: format!("pgr{id}v"),
        };
        // Leftovers of a killed earlier run with the same pid would make `add` fail.
        ns.delete();
        let (veth_gw, veth_vm) = (format!("pgr{id}a"), format!("pgr{id}b"));
        ip(&["netns", "add", &ns.gw]);
        ip(&["netns", "add", &ns.vm]);
        // Created inside the gateway's namespace, its peer moved to the VM's: the veth never
        // exists in the host's namespace.
        ip(&[
            "-n", &ns.gw, "link", "add", &veth_gw, "type", "veth", "peer", "name", &veth_vm,
            "netns", &ns.vm,
        ]);
        for (name, dev, addr) in [(&ns.gw, &veth_gw, GW_ADDR), (&ns.vm, &veth_vm, VM_ADDR)] {
            ip(&["-n", name, "link", "set", "lo", "up"]);
            ip(&["-n", name, "addr", "add", &format!("{addr}/30"), "dev", dev]);
            ip(&["-n", name, "link", "set", dev, "up"]);
        }
        ns
    }

    fn delete(&self) {
        for name in [&self.gw, &self.vm] {
            let _ = Command::new("ip")
                .args(["netns", "del", name])
                .stderr(Stdio::null())
                .status();
        }
    }

    /// `cmd` run inside namespace `ns` (`ip netns exec`, which execs: same pid).
    fn exec(ns: &str, cmd: &Command) -> Command {
        let mut wrapped = Command::new("ip");
        wrapped
            .args(["netns", "exec", ns])
            .arg(cmd.get_program())
            .args(cmd.get_args());
        wrapped
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        self.delete();
    }
}

/// A tiny TCP listener run with python3 inside a namespace: prints `listening <port>`, then for
/// each connection `conn <peer>`; greets it with `<name> peer=<peer>` and holds it until the
/// client closes.
const LISTENER_PY: &str = r#"
import socket, sys, threading
name, port = sys.argv[1], int(sys.argv[2])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port))
s.listen(16)
print("listening", s.getsockname()[1], flush=True)
def serve(c, peer):
    c.sendall(("%s peer=%s:%d\n" % (name, peer[0], peer[1])).encode())
    while c.recv(4096):
        pass
    c.close()
while True:
    c, peer = s.accept()
    print("conn %s:%d" % peer, flush=True)
    threading.Thread(target=serve, args=(c, peer), daemon=True).start()
"#;

/// A [`LISTENER_PY`] process and the lines it prints.
struct Listener {
    child: Child,
    lines: mpsc::Receiver<String>,
    port: u16,
}

impl Listener {
    fn start(ns: &str, name: &str, port: u16) -> Self {
        let mut py = Command::new("python3");
        py.args(["-u", "-c", LISTENER_PY, name, &port.to_string()]);
        let mut child = Namespaces::exec(ns, &py)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the python3 listener");
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let first = lines
            .recv_timeout(Duration::from_secs(10))
            .expect("the listener starts");
        let port = first
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{name}: {first:?}"));
        Listener { child, lines, port }
    }

    /// Connections it accepted so far (peer addresses).
    fn accepted(&self) -> Vec<String> {
        self.lines
            .try_iter()
            .filter_map(|l| l.strip_prefix("conn ").map(str::to_owned))
            .collect()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        kill_tree(self.child.id());
        let _ = self.child.wait();
    }
}

/// A client inside the gateway's namespace: connects to `port`, prints the greeting line, and
/// keeps the connection open until its stdin closes.
const CLIENT_PY: &str = r#"
import socket, sys, time
deadline = time.time() + 15
while True:
    try:
        c = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
        break
    except OSError:
        if time.time() > deadline:
            raise
        time.sleep(0.05)
f = c.makefile("rb")
print(f.readline().decode().strip() or "EOF", flush=True)
sys.stdin.read()
"#;

struct HeldClient {
    child: Child,
    stdin: Option<ChildStdin>,
    greeting: String,
}

impl HeldClient {
    fn connect(ns: &str, port: u16) -> Self {
        let mut py = Command::new("python3");
        py.args(["-u", "-c", CLIENT_PY, &port.to_string()]);
        let mut child = Namespaces::exec(ns, &py)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the python3 client");
        let stdin = child.stdin.take();
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line.trim().to_string());
        });
        let greeting = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the forwarded connection greets within 20 s");
        HeldClient {
            child,
            stdin,
            greeting,
        }
    }

    fn close(mut self) {
        self.stdin = None;
        wait_for_exit(
            &mut self.child,
            Duration::from_secs(10),
            "the python3 client",
        );
    }
}

impl Drop for HeldClient {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            kill_tree(self.child.id());
            let _ = self.child.wait();
        }
    }
}

/// `ss -tnpH` of established connections to port `port`, inside `ns`.
fn sockets_to(ns: &str, port: u16) -> String {
    let mut ss = Command::new("ss");
    ss.args([
        "-tnpH",
        "state",
        "established",
        &format!("( dport = :{port} )"),
    ]);
    let out = run_with_timeout(&mut Namespaces::exec(ns, &ss), Duration::from_secs(10));
    assert_ok(&out, "ss -tnp");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn forwarded_connections_are_opened_by_the_vm_sshd_never_by_the_gateway() {
    require_tools!("sshd", "ssh", "ssh-keygen", "ip", "ss", "python3");
    require_root!();
    let started = Instant::now();
    // Declared first: dropped last, after every process inside the namespaces is gone.
    let ns = Namespaces::create();
    let users = TestUsers::ensure(1);
    let user = users.user(1).name.clone();
    let dir = tempfile::Builder::new()
        .prefix("poolgate-relay-")
        .tempdir()
        .unwrap();

    // The VM: the harness's sshd (config, host key, CA trust), moved into the VM namespace
    // and listening only on the veth address there.
    let ca = UserCa::generate();
    let mut vm = SshdVm::builder("vm-ns")
        .trusted_user_ca_keys(ca.public_key_path())
        .start();
    vm.stop();
    let sshd = vm.command_listening_on(VM_ADDR, dir.path());
    let _sshd = Background::spawn(&mut Namespaces::exec(&ns.vm, &sshd), "sshd", dir.path());

    // The target, only in the VM namespace; a decoy at the same address next to the gateway;
    // and a listener that exists only next to the gateway.
    let target = Listener::start(&ns.vm, "vm-side-target", 0);
    let decoy = Listener::start(&ns.gw, "gateway-side-decoy", target.port);
    let gw_only = Listener::start(&ns.gw, "gateway-side-only", 0);

    // The gateway, in its namespace, with the VM at its veth address.
    let host_key = dir.path().join("host_key");
    generate_ed25519(&host_key, "poolgate relay test host key");
    let keys_dir = dir.path().join("authorized_keys");
    std::fs::create_dir_all(&keys_dir).unwrap();
    let key = UserKey::generate(&user);
    std::fs::write(keys_dir.join(&user), format!("{}\n", key.public_key_line())).unwrap();
    let backend_known = dir.path().join("backend_known_hosts");
    std::fs::write(
        &backend_known,
        known_hosts_line(vm.port(), &vm.host_public_key_line())
            .replace("[127.0.0.1]", &format!("[{VM_ADDR}]"))
            + "\n",
    )
    .unwrap();
    let (ssh_port, http_port, admin_port) = (free_port(), free_port(), free_port());
    let config = format!(
        "[listen]\nssh = \"127.0.0.1:{ssh_port}\"\nhttp = \"127.0.0.1:{http_port}\"\n\
         admin = \"127.0.0.1:{admin_port}\"\n\n[ssh]\nhost_keys = [\"{host_key}\"]\n\
         user_ca_key = \"{ca_key}\"\nauthorized_keys = \"{keys}/{{user}}\"\n\
         backend_known_hosts = \"{known}\"\n\n[health]\ninterval = \"1s\"\ntimeout = \"1s\"\n\
         http = false\nrise = 1\n\n[[pool.backends]]\nname = \"vm-ns\"\nhost = \"{VM_ADDR}\"\n\
         ssh_port = {port}\n",
        host_key = host_key.display(),
        ca_key = ca.private_key_path().display(),
        keys = keys_dir.display(),
        known = backend_known.display(),
        port = vm.port(),
    );
    let wrapper = dir.path().join("poolgate-in-netns");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec ip netns exec {} {} \"$@\"\n",
            ns.gw,
            poolgate_bin().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    // No `wait_for`: the listener is in the other namespace; the VM-up line says it is ready.
    let gateway = GatewayProcess::builder(&config)
        .binary(&wrapper)
        .dir(&dir.path().join("gateway"))
        .env("NO_COLOR", "1")
        .start();
    gateway.wait_for_vm_up("vm-ns", Duration::from_secs(20));
    let gateway_pid = gateway.pid().unwrap();

    let known_hosts = KnownHosts::new();
    known_hosts.add_host_key(
        ssh_port,
        &std::fs::read_to_string(dir.path().join("host_key.pub")).unwrap(),
    );
    let client = SshClient::new(&user, ssh_port, known_hosts.path()).user_key(&key);

    // ssh -L through the gateway to 127.0.0.1:P — as the VM sees that address.
    let local = free_port();
    let forward = client
        .clone()
        .option("ExitOnForwardFailure=yes")
        .ssh_command(
            &[
                "-N",
                "-L",
                &format!("127.0.0.1:{local}:127.0.0.1:{}", target.port),
            ],
            None,
        );
    let _ssh = Background::spawn(&mut Namespaces::exec(&ns.gw, &forward), "ssh-L", dir.path());
    let held = HeldClient::connect(&ns.gw, local);
    assert!(
        held.greeting.starts_with("vm-side-target peer=127.0.0.1:"),
        "the forward must reach the target in the VM's namespace: {:?}",
        held.greeting
    );
    // Who holds the other end of the target's connection, in the VM namespace: sshd.
    let vm_side = sockets_to(&ns.vm, target.port);
    eprintln!("VM namespace, connections to the target:\n{vm_side}");
    // The socket whose address the target saw as its peer belongs to sshd.
    let peer = held.greeting.rsplit_once("peer=").unwrap().1.to_string();
    let line = vm_side
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some(peer.as_str()))
        .unwrap_or_else(|| panic!("no socket at the target's peer {peer}:\n{vm_side}"));
    assert!(line.contains("users:((\"sshd\""), "{line}");
    assert!(!vm_side.contains("poolgate"), "{vm_side}");
    // Next to the gateway nothing connected to P: neither the decoy nor any gateway socket.
    let gw_side = sockets_to(&ns.gw, target.port);
    assert!(gw_side.trim().is_empty(), "{gw_side}");
    assert!(
        decoy.accepted().is_empty(),
        "the gateway connected to the decoy"
    );
    let gateway_sockets = std::fs::read_to_string(format!("/proc/{gateway_pid}/net/tcp")).unwrap();
    let port_hex = format!(":{:04X} ", target.port);
    assert!(
        gateway_sockets.lines().skip(1).all(|l| l
            .split_whitespace()
            .nth(2)
            .is_none_or(|rem| !rem.contains(&port_hex))),
        "a socket in the gateway's namespace points at the target port:\n{gateway_sockets}"
    );
    held.close();

    // A target that exists only next to the gateway cannot be reached through it: the VM's
    // sshd finds nothing at 127.0.0.1:Q in its namespace, and the gateway does not try itself.
    let mut stdio = Namespaces::exec(
        &ns.gw,
        &client.ssh_command(&["-W", &format!("127.0.0.1:{}", gw_only.port)], None),
    );
    let out = run_with_timeout(&mut stdio, Duration::from_secs(30));
    assert!(
        !out.status.success(),
        "ssh -W to a gateway-only port succeeded"
    );
    assert!(
        stderr(&out).contains("stdio forwarding failed"),
        "{}",
        stderr(&out)
    );
    assert!(
        gw_only.accepted().is_empty(),
        "the gateway-only listener was reached"
    );
    assert!(decoy.accepted().is_empty());

    let log = strip_ansi(&gateway.log_text());
    assert!(!log.contains("panicked"), "{log}");
    eprintln!(
        "not an open relay: checked in {:?} (target peer {})",
        started.elapsed(),
        target.accepted().join(", ")
    );
}
