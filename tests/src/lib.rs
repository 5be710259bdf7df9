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

// This crate exists only to serve tests: a failed setup step should abort the test at once with
// the `expect` message, which is exactly what a panic does. The workspace-wide ban on
// `unwrap`/`expect` protects the gateway's request paths, not a test harness.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod ports;
mod process;
mod tools;

pub use ports::{free_port, wait_for_port, wait_for_port_closed, wait_for_ssh_banner};
pub use process::{
    TimedOut, kill_tree, run_with_input, run_with_timeout, try_run_with_timeout, wait_for_exit,
    wait_until,
};
pub use tools::{find_tool, in_ci, install_hint, require_root, require_tool, tool};
