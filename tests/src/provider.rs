//! The operator scripts of the `exec` provider for one VM the test runs on this machine: `list`
//! says whether it runs, `start` and `stop` run what the test gives them.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::process::kill_tree;
use crate::sshd::SshdVm;
use crate::tools::tool;

/// A shell function the scripts share: `alive PID` holds while the process runs (a zombie left
/// to an init that does not reap has ended).
const ALIVE_FN: &str =
    "alive() { [ -r /proc/$1/status ] && ! grep -q '^State:.*Z' /proc/$1/status; }";

/// `list.sh`, `start.sh` and `stop.sh` of the `exec` provider, managing one VM.
#[derive(Clone, Debug)]
pub struct ExecScripts {
    /// `list.sh`: the VM, `running` while the process in its pid file is alive, else `stopped`.
    pub list: String,
    /// `start.sh VM`.
    pub start: String,
    /// `stop.sh VM`.
    pub stop: String,
}

impl ExecScripts {
    /// Writes the scripts into `dir` for VM `vm` on 127.0.0.1 with `ports` (e.g.
    /// `[("ssh_port", 2222)]`), which runs while the process whose pid is in `pid_file` is
    /// alive. `start` and `stop` are shell lines run after checking that `$1` is `vm`; the
    /// shell function `alive PID` is defined for them.
    pub fn write(
        dir: &Path,
        vm: &str,
        pid_file: &Path,
        ports: &[(&str, u16)],
        start: &str,
        stop: &str,
    ) -> Self {
        let pid = pid_file.display();
        let ports: String = ports
            .iter()
            .map(|(key, port)| format!("\\\"{key}\\\":{port},"))
            .collect();
        let list = format!(
            "{ALIVE_FN}\n\
             if [ -f {pid} ] && alive \"$(cat {pid})\"; then s=running; else s=stopped; fi\n\
             echo \"{{\\\"vms\\\":[{{\\\"name\\\":\\\"{vm}\\\",\\\"host\\\":\\\"127.0.0.1\\\",\
             {ports}\\\"state\\\":\\\"$s\\\"}}]}}\""
        );
        let own_vm = |body: &str| format!("[ \"$1\" = {vm} ]\n{ALIVE_FN}\n{body}");
        ExecScripts {
            list: write_script(dir, "list.sh", &list),
            start: write_script(dir, "start.sh", &own_vm(start)),
            stop: write_script(dir, "stop.sh", &own_vm(stop)),
        }
    }

    /// The scripts for `vm`, an sshd the test stopped: `start` runs that sshd again with its
    /// config (it writes its pid file), `stop` kills it.
    pub fn for_sshd(dir: &Path, vm: &SshdVm) -> Self {
        let pid_file = vm.pid_file();
        let (pid, cfg) = (pid_file.display(), vm.config_path().display());
        Self::write(
            dir,
            vm.name(),
            &pid_file,
            &[("ssh_port", vm.port())],
            &format!("{} -f {cfg}", tool("sshd").display()),
            &format!("kill \"$(cat {pid})\"\nrm -f {pid}"),
        )
    }

    /// The `[pool]` and `[pool.exec]` sections naming these scripts: polled every second, each
    /// run bounded by `timeout`.
    pub fn pool_toml(&self, timeout: Duration) -> String {
        format!(
            "[pool]\nprovider = \"exec\"\n\
             [pool.exec]\nlist = [\"{}\"]\nstart = [\"{}\"]\nstop = [\"{}\"]\n\
             poll_interval = \"1s\"\ntimeout = \"{}s\"\n",
            self.list,
            self.start,
            self.stop,
            timeout.as_secs()
        )
    }
}

/// Writes the exec provider's `list.sh` for several VMs on 127.0.0.1, each `(name, ssh port,
/// pid file)`: `running` while the process in its pid file is alive, else `stopped`. Returns its
/// path.
pub fn write_list_script(dir: &Path, vms: &[(&str, u16, PathBuf)]) -> String {
    let entries: Vec<String> = vms
        .iter()
        .map(|(name, port, pid)| {
            format!(
                "if [ -f {pid} ] && alive \"$(cat {pid})\"; then s=running; else s=stopped; fi\n\
                 printf '{{\"name\":\"%s\",\"host\":\"127.0.0.1\",\"ssh_port\":{port},\"state\":\"%s\"}}' {name} \"$s\"",
                pid = pid.display(),
            )
        })
        .collect();
    write_script(
        dir,
        "list.sh",
        &format!(
            "{ALIVE_FN}\nprintf '{{\"vms\":['\n{}\nprintf ']}}\\n'",
            entries.join("\nprintf ','\n")
        ),
    )
}

/// Writes an executable `sh` script `dir/name` (`set -eu`, then `body`); returns its path.
pub fn write_script(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\nset -eu\n{body}\n")).expect("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod script");
    path.display().to_string()
}

/// Kills the process tree whose pid is in a file (a VM the provider's scripts started), whatever
/// happens to the test.
pub struct KillPidFile(pub PathBuf);

impl Drop for KillPidFile {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.0)
            && let Ok(pid) = pid.trim().parse::<u32>()
        {
            kill_tree(pid);
        }
    }
}

/// One sshd VM trusting `ca`, stopped, with the `exec` provider's scripts that start and stop
/// it: the pool such a gateway serves starts at zero unless its `min_vms` says otherwise.
/// Fields drop in order: the sshd the start script ran is killed (through its pid file) before
/// the directory holding the scripts goes away.
pub struct ExecSshdVm {
    _cleanup: KillPidFile,
    /// The VM (its sshd config, host key, port and pid file).
    pub vm: SshdVm,
    /// Its `list.sh`, `start.sh` and `stop.sh`.
    pub scripts: ExecScripts,
    /// The scripts' directory.
    pub dir: tempfile::TempDir,
}

impl ExecSshdVm {
    /// VM `vm-a`, its scripts in a temp dir named after `prefix`.
    pub fn stopped(prefix: &str, ca: &crate::UserCa) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .expect("temp dir");
        let mut vm = SshdVm::builder("vm-a")
            .trusted_user_ca_keys(ca.public_key_path())
            .start();
        vm.stop();
        let scripts = ExecScripts::for_sshd(dir.path(), &vm);
        Self {
            _cleanup: KillPidFile(vm.pid_file()),
            vm,
            scripts,
            dir,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn list_reports_the_vm_stopped_then_running() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("vm.pid");
        let scripts = ExecScripts::write(
            dir.path(),
            "vm-a",
            &pid_file,
            &[("ssh_port", 2222), ("http_port", 8888)],
            "echo $$ > /dev/null",
            "true",
        );
        let list = || {
            let out = Command::new(&scripts.list).output().unwrap();
            serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
        };
        let vms = list();
        assert_eq!(vms["vms"][0]["state"], "stopped");
        assert_eq!(vms["vms"][0]["ssh_port"], 2222);
        assert_eq!(vms["vms"][0]["http_port"], 8888);
        std::fs::write(&pid_file, std::process::id().to_string()).unwrap();
        assert_eq!(list()["vms"][0]["state"], "running");
        let refused = Command::new(&scripts.start).arg("vm-b").status().unwrap();
        assert!(!refused.success(), "start.sh is for vm-a only");
    }
}
