//! Test harness for poolgate end-to-end tests.
//!
//! Real parts only: OpenSSH `sshd` processes play the pool VMs ([`SshdVm`]), OpenSSH
//! `ssh`/`scp`/`sftp`/`rsync` play the users ([`SshClient`]), and the gateway runs as its own
//! binary ([`GatewayProcess`]). Every fixture binds only `127.0.0.1` on a free port, lives in
//! its own temp dir, kills and reaps its processes on drop, and waits for real conditions (a
//! banner, an open port, a log line) with a deadline that fails with a clear message.
//!
//! Missing tools follow one rule ([`require_tool`], [`require_tools!`]): under CI (`CI=true`)
//! they fail the test with what to install; elsewhere the test is skipped with a loud message.
//!
//! ```no_run
//! use poolgate_tests::*;
//! use std::time::Duration;
//!
//! require_tools!("sshd", "ssh", "ssh-keygen");
//! require_root!();
//! let users = TestUsers::ensure(1);
//! let ca = UserCa::generate();
//! let vm = SshdVm::builder("vm-a").trusted_user_ca_keys(ca.public_key_path()).start();
//! let key = UserKey::generate("pgtest1");
//! ca.sign(&key, &users.user(1).name, Duration::from_secs(600));
//! let known_hosts = KnownHosts::new();
//! known_hosts.add_vm(&vm);
//! let out = SshClient::new(&users.user(1).name, vm.port(), known_hosts.path())
//!     .user_key(&key)
//!     .run("echo $POOLGATE_VM");
//! assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "vm-a");
//! ```

// This crate exists only to serve tests: a failed setup step should abort the test at once with
// the `expect` message, which is exactly what a panic does. The workspace-wide ban on
// `unwrap`/`expect` protects the gateway's request paths, not a test harness.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod agent;
mod client;
mod gateway;
mod haproxy;
pub mod jupyter;
mod keys;
mod ports;
mod process;
mod redis;
mod sshd;
mod tools;
mod users;

pub use agent::SshAgent;
pub use client::{KnownHosts, SshClient, known_hosts_line};
pub use gateway::{GatewayProcess, GatewayProcessBuilder, poolgate_bin, workspace_dir};
pub use haproxy::Haproxy;
pub use keys::{UserCa, UserKey, generate_ed25519};
pub use ports::{free_port, wait_for_port, wait_for_port_closed, wait_for_ssh_banner};
pub use process::{
    TimedOut, kill_tree, run_with_input, run_with_timeout, try_run_with_timeout, wait_for_exit,
    wait_until,
};
pub use redis::{RedisServer, Tls as RedisTls};
pub use sshd::{SshdVm, SshdVmBuilder};
pub use tools::{find_tool, in_ci, install_hint, require_root, require_tool, tool};
pub use users::{TestUser, TestUsers, ensure_system_account, test_user_name};
