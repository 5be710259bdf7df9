//! Test harness for poolgate end-to-end tests: one fixture library for every topic.
//!
//! Real parts only: OpenSSH `sshd` processes play the pool VMs ([`SshdVm`]), OpenSSH
//! `ssh`/`scp`/`sftp`/`rsync` play the users ([`SshClient`], [`SshSession`]), Jupyter servers
//! play the VMs' web sides ([`jupyter`]), and the gateway runs as its own binary
//! ([`GatewayProcess`]). [`GatewayPool`] puts them together: the gateway in front of a pool,
//! with test users and its admin listener. Every fixture binds only `127.0.0.1` on a free port,
//! lives in its own temp dir, kills and reaps its processes on drop, and waits for real
//! conditions (a banner, an open port, a log line, the admin API) with a deadline that fails
//! with a clear message.
//!
//! Missing tools follow one rule ([`require_tool`], [`require_tools!`]): under CI (`CI=true`)
//! they fail the test with what to install; elsewhere the test is skipped with a loud message.
//!
//! ```no_run
//! use poolgate_tests::*;
//!
//! require_tools!("sshd", "ssh", "ssh-keygen");
//! require_root!();
//! let pool = GatewayPool::builder().vm("vm-a").vm("vm-b").users(2).start();
//! let session = SshSession::hold(&pool.client(1));
//! assert_eq!(pool.vm_json(&session.vm)["sessions"]["ssh"].as_u64(), Some(1));
//! assert_ne!(landed(&pool.client(2)), session.vm);
//! session.end();
//! ```

// This crate exists only to serve tests: a failed setup step should abort the test at once with
// the `expect` message, which is exactly what a panic does. The workspace-wide ban on
// `unwrap`/`expect` protects the gateway's request paths, not a test harness.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod agent;
mod client;
mod cloud_init;
mod data;
mod gateway;
mod haproxy;
mod http;
pub mod jupyter;
mod keys;
mod log;
mod metrics;
mod netns;
mod output;
mod pebble;
mod pool;
mod ports;
mod process;
mod procfs;
mod provider;
mod redis;
mod session;
mod shell;
mod slurm;
mod sshd;
mod tools;
mod users;

pub use agent::SshAgent;
pub use client::{KnownHosts, SshClient, known_hosts_line};
pub use cloud_init::{written_content, written_file};
pub use data::{
    Sha256Stream, random_bytes_command, random_file, sha256_command, sha256_file, shared_temp_dir,
};
pub use gateway::{
    GatewayProcess, GatewayProcessBuilder, poolgate_bin, wait_for_health_line, without_backend,
    workspace_dir,
};
pub use haproxy::Haproxy;
pub use http::{HttpResponse, JsonItems, http_get, http_request, try_http_request};
pub use keys::{UserCa, UserKey, generate_ed25519};
pub use log::{has_field, has_span_field, log_lines, strip_ansi};
pub use metrics::{
    metric_types, promtool_check, sample, samples, ssh_active, vm_protocol_up, vm_up,
};
pub use netns::{VmNetwork, ip};
pub use output::{assert_ok, stderr, stdout};
pub use pebble::Pebble;
pub use pool::{
    GatewayPool, GatewayPoolBuilder, PROBE_INTERVAL, PROBE_TIMEOUT, WEB_PROBE_INTERVAL,
};
pub use ports::{
    accepts, free_port, refused, wait_for_port, wait_for_port_closed, wait_for_ssh_banner,
};
pub use process::{
    KillTreeOnDrop, TimedOut, blocking, is_alive, kill_tree, piped_output, poll, run_with_input,
    run_with_timeout, send_signal, signal_tree, try_run_with_timeout, wait_for_exit,
    wait_for_output, wait_until,
};
pub use procfs::{
    fd_count, listening_ports, pids_with_cmdline_prefix, rss_kib, thread_wchans,
    unread_bytes_on_port,
};
pub use provider::{ExecScripts, ExecSshdVm, KillPidFile, write_list_script, write_script};
pub use redis::{RedisServer, Tls as RedisTls};
pub use session::{Background, Multiplexed, RunningCommand, SshSession, landed};
pub use shell::{sh_quote, shell_line};
pub use slurm::SlurmCluster;
pub use sshd::{SshdVm, SshdVmBuilder};
pub use tools::{
    find_tool, in_ci, install_hint, require_root, require_slurm_jwt_plugin, require_tool, tool,
};
pub use users::{TestUser, TestUsers, ensure_system_account, test_user_name};
