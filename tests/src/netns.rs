//! Network namespaces of a test's own, for faults only a real network shows.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::run_with_timeout;

/// Runs `ip args…` (iproute2); panics with its error output when it fails.
pub fn ip(args: &[&str]) {
    let out = run_with_timeout(Command::new("ip").args(args), Duration::from_secs(10));
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace for a VM, joined to the host's by a veth pair on a /30 in
/// 198.18.0.0/15 (reserved for network tests, RFC 2544) chosen by the test process's pid, so
/// that a test can cut the VM off without a word ([`cut`](Self::cut)): no FIN, no RST, its
/// packets simply stop, as when a VM's host is lost. Only a real loss of packets shows that: a
/// process that is stopped or killed still has its kernel answer TCP.
///
/// The veth pair and the namespace are deleted on drop, also when the test fails. The pair is
/// deleted by its host end: after `ip netns del` the namespace itself lingers while sockets of
/// a killed process in it still wait on a cut link, and its end of the pair with it.
pub struct VmNetwork {
    /// The namespace's name, `pgl<pid>v`.
    pub ns: String,
    /// The pair's end in the host's namespace.
    host_end: String,
    /// The pair's end in the VM's namespace.
    vm_end: String,
    /// The host end's address.
    pub host_addr: Ipv4Addr,
    /// The VM's address, in its namespace.
    pub vm_addr: Ipv4Addr,
}

impl VmNetwork {
    /// Creates the namespace and the pair, both ends up.
    pub fn create() -> Self {
        let id = std::process::id();
        // The /30 number `id` modulo 32 768 in 198.18.0.0/15.
        let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + (id % 32_768) * 4;
        let net = VmNetwork {
            ns: format!("pgl{id}v"),
            host_end: format!("pgl{id}a"),
            vm_end: format!("pgl{id}b"),
            host_addr: Ipv4Addr::from(base + 1),
            vm_addr: Ipv4Addr::from(base + 2),
        };
        // Leftovers of a killed earlier run with the same pid would make `add` fail.
        net.delete();
        ip(&["netns", "add", &net.ns]);
        ip(&[
            "link",
            "add",
            &net.host_end,
            "type",
            "veth",
            "peer",
            "name",
            &net.vm_end,
            "netns",
            &net.ns,
        ]);
        let (host_cidr, vm_cidr) = (
            format!("{}/30", net.host_addr),
            format!("{}/30", net.vm_addr),
        );
        ip(&["addr", "add", &host_cidr, "dev", &net.host_end]);
        ip(&["link", "set", &net.host_end, "up"]);
        ip(&["-n", &net.ns, "link", "set", "lo", "up"]);
        ip(&["-n", &net.ns, "addr", "add", &vm_cidr, "dev", &net.vm_end]);
        ip(&["-n", &net.ns, "link", "set", &net.vm_end, "up"]);
        net
    }

    /// The host is lost: its end of the pair goes down and nothing it sent or would send
    /// arrives any more.
    pub fn cut(&self) {
        ip(&["-n", &self.ns, "link", "set", &self.vm_end, "down"]);
    }

    /// `cmd` run inside the namespace (`ip netns exec`, which execs: same pid), with `cmd`'s
    /// environment and working directory.
    pub fn exec(&self, cmd: &Command) -> Command {
        let mut wrapped = Command::new("ip");
        wrapped
            .args(["netns", "exec", &self.ns])
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => wrapped.env(k, v),
                None => wrapped.env_remove(k),
            };
        }
        if let Some(dir) = cmd.get_current_dir() {
            wrapped.current_dir(dir);
        }
        wrapped
    }

    fn delete(&self) {
        for args in [["link", "del", &self.host_end], ["netns", "del", &self.ns]] {
            let _ = Command::new("ip").args(args).stderr(Stdio::null()).status();
        }
    }
}

impl Drop for VmNetwork {
    fn drop(&mut self) {
        self.delete();
    }
}
