//! Linux test accounts `pgtest1`…`pgtestN`, created once and shared by every test process.

use std::fs::File;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::process::{Backoff, run_with_timeout};
use crate::tools::tool;

/// Machine-wide lock serialising account changes between parallel test processes.
const LOCK_FILE: &str = "poolgate-tests-users.lock";
const LOCK_TIMEOUT: Duration = Duration::from_secs(60);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// The name of test account `i` (1-based): `pgtest{i}`.
pub fn test_user_name(i: usize) -> String {
    format!("pgtest{i}")
}

/// One test account as `/etc/passwd` has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestUser {
    /// Login name, `pgtest{i}`.
    pub name: String,
    /// Numeric user id.
    pub uid: u32,
    /// Numeric primary group id.
    pub gid: u32,
    /// Home directory; exists, owned by the user, not group- or world-writable.
    pub home: PathBuf,
}

/// Test accounts `pgtest1`..`pgtestN`, ensured to exist and be able to log in with a key or
/// certificate over sshd with `UsePAM no` (password field `*`, not the locked `!`).
#[derive(Clone, Debug)]
pub struct TestUsers {
    users: Vec<TestUser>,
}

impl TestUsers {
    /// Makes sure `pgtest1`..`pgtest{n}` exist (`useradd -m -s /bin/bash`), are not locked
    /// (`usermod -p '*'`) and have a home sshd accepts. Idempotent and safe when many test
    /// processes call it at once: changes are made under a file lock, and nothing is changed
    /// when everything is already in place. Needs root (see [`require_root!`](crate::require_root!)).
    pub fn ensure(n: usize) -> Self {
        assert!(n >= 1, "TestUsers::ensure needs at least one user");
        let names: Vec<String> = (1..=n).map(test_user_name).collect();
        if let Some(users) = ready(&names) {
            return TestUsers { users };
        }
        let _lock = lock();
        for name in &names {
            ensure_one(name);
        }
        let users = ready(&names).unwrap_or_else(|| {
            panic!("test accounts {names:?} still incomplete after useradd/usermod")
        });
        TestUsers { users }
    }

    /// Account `i`, 1-based like the names: `user(1)` is `pgtest1`.
    pub fn user(&self, i: usize) -> &TestUser {
        assert!(
            (1..=self.users.len()).contains(&i),
            "test user {i} out of 1..={}",
            self.users.len()
        );
        &self.users[i - 1]
    }

    /// All accounts, `pgtest1` first.
    pub fn all(&self) -> &[TestUser] {
        &self.users
    }

    /// The login names, `pgtest1` first.
    pub fn names(&self) -> Vec<&str> {
        self.users.iter().map(|u| u.name.as_str()).collect()
    }
}

/// Makes sure the system account `name` exists as a service account would on a pool VM
/// (`useradd --system --shell /bin/sh --home-dir /nonexistent --no-create-home`) and is not
/// locked (`*`, so sshd with `UsePAM no` lets it log in by certificate); e.g. the busy check's
/// `poolgate-probe`. Same lock and idempotence as [`TestUsers::ensure`]; needs root.
pub fn ensure_system_account(name: &str) -> TestUser {
    let present = || {
        let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
        let shadow = std::fs::read_to_string("/etc/shadow").unwrap_or_default();
        let user = passwd_entry(&passwd, name)?;
        field(&shadow, name, 1)
            .is_some_and(|hash| !hash.starts_with('!'))
            .then_some(user)
    };
    if let Some(user) = present() {
        return user;
    }
    let _lock = lock();
    let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    if passwd_entry(&passwd, name).is_none() {
        let out = run_with_timeout(
            Command::new(tool("useradd")).args([
                "--system",
                "--shell",
                "/bin/sh",
                "--home-dir",
                "/nonexistent",
                "--no-create-home",
                name,
            ]),
            COMMAND_TIMEOUT,
        );
        assert!(
            out.status.success() || out.status.code() == Some(9),
            "useradd --system {name} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = run_with_timeout(
        Command::new(tool("usermod")).args(["-p", "*", name]),
        COMMAND_TIMEOUT,
    );
    assert!(
        out.status.success(),
        "usermod -p '*' {name} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    present().unwrap_or_else(|| panic!("{name} still missing or locked after useradd/usermod"))
}

/// The accounts if every one exists, is unlocked and has a proper home; else `None`.
fn ready(names: &[String]) -> Option<Vec<TestUser>> {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    let shadow = std::fs::read_to_string("/etc/shadow").unwrap_or_default();
    names
        .iter()
        .map(|name| {
            let user = passwd_entry(&passwd, name)?;
            let hash = field(&shadow, name, 1)?;
            let home_ok = std::fs::metadata(&user.home).is_ok_and(|m| {
                m.is_dir() && m.uid() == user.uid && m.permissions().mode() & 0o022 == 0
            });
            (!hash.starts_with('!') && home_ok).then_some(user)
        })
        .collect()
}

fn ensure_one(name: &str) {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    if passwd_entry(&passwd, name).is_none() {
        let out = run_with_timeout(
            Command::new(tool("useradd")).args(["-m", "-s", "/bin/bash", name]),
            COMMAND_TIMEOUT,
        );
        // Exit 9: the name is taken (someone not using our lock was faster) — fine.
        assert!(
            out.status.success() || out.status.code() == Some(9),
            "useradd -m -s /bin/bash {name} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let shadow = std::fs::read_to_string("/etc/shadow").unwrap_or_default();
    if field(&shadow, name, 1).is_none_or(|hash| hash.starts_with('!')) {
        let out = run_with_timeout(
            Command::new(tool("usermod")).args(["-p", "*", name]),
            COMMAND_TIMEOUT,
        );
        assert!(
            out.status.success(),
            "usermod -p '*' {name} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    let user = passwd_entry(&passwd, name)
        .unwrap_or_else(|| panic!("{name} missing from /etc/passwd after useradd"));
    fix_home(&user);
}

/// Home exists, belongs to the user, and is not group/world-writable (sshd StrictModes).
fn fix_home(user: &TestUser) {
    let home = &user.home;
    if !home.is_dir() {
        std::fs::create_dir_all(home).unwrap_or_else(|e| panic!("mkdir {}: {e}", home.display()));
    }
    let meta = std::fs::metadata(home).expect("stat home");
    if meta.uid() != user.uid || meta.gid() != user.gid {
        std::os::unix::fs::chown(home, Some(user.uid), Some(user.gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", home.display()));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        std::fs::set_permissions(home, std::fs::Permissions::from_mode(mode & !0o022))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", home.display()));
    }
}

fn passwd_entry(passwd: &str, name: &str) -> Option<TestUser> {
    let line = passwd.lines().find(|l| l.split(':').next() == Some(name))?;
    let f: Vec<&str> = line.split(':').collect();
    Some(TestUser {
        name: name.to_string(),
        uid: f.get(2)?.parse().ok()?,
        gid: f.get(3)?.parse().ok()?,
        home: PathBuf::from(f.get(5)?),
    })
}

/// Field `index` of `name`'s line in a colon-separated database (`/etc/shadow`).
fn field(db: &str, name: &str, index: usize) -> Option<String> {
    db.lines()
        .find(|l| l.split(':').next() == Some(name))
        .and_then(|l| l.split(':').nth(index))
        .map(str::to_string)
}

/// Takes the machine-wide account lock, waiting at most [`LOCK_TIMEOUT`].
fn lock() -> File {
    let dir = if Path::new("/run/lock").is_dir() {
        PathBuf::from("/run/lock")
    } else {
        std::env::temp_dir()
    };
    let path = dir.join(LOCK_FILE);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("open lock file {}: {e}", path.display()));
    let deadline = Instant::now() + LOCK_TIMEOUT;
    let mut backoff = Backoff::new();
    loop {
        match file.try_lock() {
            Ok(()) => return file,
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                backoff.sleep_until(deadline)
            }
            Err(e) => panic!(
                "cannot lock {} within {LOCK_TIMEOUT:?} to create test users: {e}",
                path.display()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_passwd_and_shadow_lines() {
        let passwd =
            "root:x:0:0:root:/root:/bin/bash\npgtest1:x:1001:1002::/home/pgtest1:/bin/bash\n";
        let user = passwd_entry(passwd, "pgtest1").expect("pgtest1");
        assert_eq!((user.uid, user.gid), (1001, 1002));
        assert_eq!(user.home, PathBuf::from("/home/pgtest1"));
        assert!(passwd_entry(passwd, "pgtest").is_none());
        let shadow = "pgtest1:!:19000:0:99999:7:::\n";
        assert_eq!(field(shadow, "pgtest1", 1).as_deref(), Some("!"));
    }
}
