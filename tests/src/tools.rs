//! Finding external tools, and the CI rule for missing ones.
//!
//! Under CI (`CI` set to anything but empty, `0` or `false`) a missing tool FAILS the test with
//! what to install: a suite that silently skips proves nothing. Outside CI the test is skipped
//! with a loud message on stderr, so a laptop without `sshd` can still run the rest.

use std::path::PathBuf;

/// True when running under CI: `CI` is set and not empty, `0` or `false`.
pub fn in_ci() -> bool {
    match std::env::var("CI") {
        Ok(v) => !matches!(v.trim().to_ascii_lowercase().as_str(), "" | "0" | "false"),
        Err(_) => false,
    }
}

/// Where `name` is: an absolute path is taken as is, otherwise `PATH` is searched, then the
/// sbin directories (`sshd` lives in `/usr/sbin`, often not on a user's `PATH`).
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let given = PathBuf::from(name);
    if given.is_absolute() {
        return is_executable(&given).then_some(given);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

/// What to install to get `name` (Debian package or other installer), for error messages.
pub fn install_hint(name: &str) -> String {
    let base = name.rsplit('/').next().unwrap_or(name);
    let how = match base {
        "sshd" => "apt-get install openssh-server",
        "ssh" | "scp" | "sftp" | "ssh-keygen" | "ssh-agent" | "ssh-add" | "ssh-keyscan" => {
            "apt-get install openssh-client"
        }
        "rsync" => "apt-get install rsync",
        "redis-server" => "apt-get install redis-server",
        "redis-cli" => "apt-get install redis-tools",
        "haproxy" => "apt-get install haproxy",
        "slurmctld" => "apt-get install slurmctld",
        "slurmd" => "apt-get install slurmd",
        "sbatch" | "squeue" | "sinfo" | "scontrol" | "scancel" => "apt-get install slurm-client",
        "munged" => "apt-get install munge",
        "slurmrestd" => "apt-get install slurmrestd",
        "auth_jwt.so" => "apt-get install slurm-wlm-jwt-plugin",
        "pebble" | "pebble-challtestsrv" => "apt-get install pebble",
        "promtool" => "apt-get install prometheus",
        "logrotate" => "apt-get install logrotate",
        "useradd" | "usermod" | "chpasswd" => "apt-get install passwd",
        "chromium" => "apt-get install chromium",
        "jupyterhub" | "jupyter-server" | "jupyter" => {
            "pip install jupyter_server jupyterhub jupyterlab ipykernel"
        }
        "configurable-http-proxy" => "npm install -g configurable-http-proxy",
        _ => return format!("install `{base}` and put it on PATH"),
    };
    how.to_string()
}

/// The path of tool `name`, or `None` when the calling test should be skipped.
///
/// Missing tool: under CI this PANICS with what to install (a missing tool is a failure there);
/// outside CI it prints a loud `SKIPPED` line to stderr and returns `None`. Prefer the
/// [`require_tools!`](crate::require_tools!) macro, which returns from the test for you.
pub fn require_tool(name: &str) -> Option<PathBuf> {
    if let Some(path) = find_tool(name) {
        return Some(path);
    }
    missing(&format!(
        "`{name}` is not installed ({})",
        install_hint(name)
    ));
    None
}

/// True when running as root; the end-to-end tests need it (test accounts, sshd as a real
/// login service). Not root: under CI this PANICS; elsewhere it prints `SKIPPED` and returns
/// false. See [`require_root!`](crate::require_root!).
pub fn require_root() -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    missing("this test must run as root (it creates pgtest accounts and runs sshd)");
    false
}

/// True when Slurm's `auth/jwt` plugin is installed (Debian `slurm-wlm-jwt-plugin`); missing:
/// under CI this PANICS, elsewhere it prints `SKIPPED` and returns false.
pub fn require_slurm_jwt_plugin() -> bool {
    if crate::slurm::jwt_plugin().is_some() {
        return true;
    }
    missing(&format!(
        "Slurm's auth/jwt plugin (auth_jwt.so) is not installed ({})",
        install_hint("auth_jwt.so")
    ));
    false
}

/// The path of tool `name` for a fixture that cannot work without it; panics with what to
/// install. Tests should have called [`require_tool`] first, so this only fires on a bug.
pub fn tool(name: &str) -> PathBuf {
    find_tool(name).unwrap_or_else(|| {
        panic!(
            "`{name}` is not installed ({}); call require_tools!(\"{name}\") at the top of the test",
            install_hint(name)
        )
    })
}

/// Panics under CI, else prints a loud SKIPPED line.
fn missing(msg: &str) {
    missing_with(in_ci(), msg);
}

fn missing_with(ci: bool, msg: &str) {
    if ci {
        panic!("{msg}. CI=true, so this is a failure, not a skip.");
    }
    eprintln!();
    eprintln!("******** SKIPPED: {msg}. (Under CI=true this fails the test.) ********");
    eprintln!();
}

fn is_executable(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Returns from the calling test (which must return `()`) unless every named tool is installed.
/// Under CI a missing tool panics instead (see [`require_tool`]).
///
/// ```no_run
/// # fn test() {
/// poolgate_tests::require_tools!("sshd", "ssh", "ssh-keygen");
/// # }
/// ```
#[macro_export]
macro_rules! require_tools {
    ($($tool:expr),+ $(,)?) => {
        let mut __poolgate_all_present = true;
        $( __poolgate_all_present &= $crate::require_tool($tool).is_some(); )+
        if !__poolgate_all_present {
            return;
        }
    };
}

/// Returns from the calling test unless it runs as root (under CI: panics instead).
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::require_root() {
            return;
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_sh_and_not_nonsense() {
        assert!(find_tool("sh").is_some());
        assert!(find_tool("poolgate-no-such-tool").is_none());
        assert!(install_hint("/usr/sbin/sshd").contains("openssh-server"));
    }

    #[test]
    fn outside_ci_a_missing_tool_is_a_loud_skip() {
        missing_with(false, "`x` is not installed");
    }

    #[test]
    #[should_panic(expected = "CI=true, so this is a failure, not a skip")]
    fn under_ci_a_missing_tool_fails() {
        missing_with(true, "`x` is not installed");
    }
}
