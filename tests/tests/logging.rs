//! The gateway's log when its output stops taking lines (a stalled journal, a full pipe nobody
//! reads; under systemd standard output and error are one journal stream): logins and requests
//! go on. The log's lines wait in a queue of their own, written by a thread of its own; lines
//! beyond the queue are dropped and counted in `poolgate_log_dropped_total` instead of holding
//! up the tasks that log them; and a shutdown gives up the lines the stalled output did not
//! take instead of waiting for it.

// Test code: a failed step should abort the test at once (as in tests/src/lib.rs).
#![allow(clippy::unwrap_used)]

use std::io::PipeReader;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use poolgate_tests::*;

/// A pipe of one page that nobody reads, for the gateway's standard output and error: once its
/// first lines fill it, a write to either blocks for good. Keep the reader until the end.
fn stalled_output() -> (PipeReader, std::fs::File) {
    let (unread, writer) = std::io::pipe().unwrap();
    nix::fcntl::fcntl(&writer, nix::fcntl::FcntlArg::F_SETPIPE_SZ(4096)).unwrap();
    (unread, std::fs::File::from(OwnedFd::from(writer)))
}

/// A pool of three VMs (ten sessions each at most, the default) and one user, its output
/// stalled; `log` is `POOLGATE_LOG` (`None`: the default, `info`).
fn stalled_pool(output: std::fs::File, log: Option<&str>) -> GatewayPool {
    let mut builder = GatewayPool::builder()
        .vm("vm-a")
        .vm("vm-b")
        .vm("vm-c")
        .users(1)
        .gateway_output(output);
    if let Some(filter) = log {
        builder = builder.gateway_env("POOLGATE_LOG", filter);
    }
    builder.start()
}

/// Waits until the gateway's thread `name` is blocked writing to the full pipe: its wait
/// channel is `pipe_write` (or `anon_pipe_write`) from Linux 5.6 on, `pipe_wait` before.
fn wait_until_blocked(pid: u32, name: &str) {
    assert!(
        poll(Duration::from_secs(20), || {
            thread_wchans(pid, name)
                .iter()
                .any(|w| w.contains("pipe_write") || w == "pipe_wait")
        }),
        "thread {name} never waited on the full pipe: {:?}",
        thread_wchans(pid, name)
    );
}

/// Twenty logins at once, each running a command; every one must succeed.
fn twenty_logins(pool: &GatewayPool, wave: usize) {
    std::thread::scope(|s| {
        let logins: Vec<_> = (0..20)
            .map(|_| {
                s.spawn(|| {
                    pool.client(1)
                        .timeout(Duration::from_secs(60))
                        .run("echo ok")
                })
            })
            .collect();
        for login in logins {
            let out = login.join().unwrap();
            assert!(
                out.status.success() && out.stdout == b"ok\n",
                "wave {wave}: {}",
                stderr(&out)
            );
        }
    });
}

/// SIGTERM ends the gateway promptly (no session is open): the lines still waiting are given
/// up after a moment (5 s for the access log's, 1.5 s for the log's).
fn stops_promptly(pool: &mut GatewayPool) {
    let stopping = Instant::now();
    let status = pool.gateway.terminate(Duration::from_secs(15));
    assert!(status.success(), "{status:?}");
    eprintln!("exited {:?} after SIGTERM", stopping.elapsed());
}

#[test]
fn a_stalled_output_holds_up_no_login_request_or_shutdown() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let (unread, output) = stalled_output();
    let mut pool = stalled_pool(output, None);
    let pid = pool.gateway.pid().unwrap();
    // Two waves of twenty logins, each of which logs at `info` (the default). The first fills
    // the pipe; the second starts once the log's writer is stuck in a write to it.
    twenty_logins(&pool, 1);
    wait_until_blocked(pid, "log");
    twenty_logins(&pool, 2);
    // Requests are answered too, their access-log lines (on standard error, the default) given
    // to the access log's own writer, which the full pipe holds up as well.
    for i in 0..50 {
        let resp = http_get(pool.http, &format!("/r/{i}"));
        assert!(resp.status > 0, "{resp:?}");
    }
    wait_until_blocked(pid, "access-log");
    // Lines wait in the log's queue (16 Ki lines) before any is dropped; the count is exported.
    let metrics = pool.metrics();
    assert_eq!(
        sample(&metrics, "poolgate_log_dropped_total"),
        Some(0.0),
        "{metrics}"
    );
    stops_promptly(&mut pool);
    drop(unread);
}

#[test]
fn lines_past_the_queue_are_dropped_and_counted_and_shutdown_stays_prompt() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let (unread, output) = stalled_output();
    // `trace`: thousands of lines a login, so a few waves fill the queue of 16 384 lines.
    let mut pool = stalled_pool(output, Some("trace"));
    let pid = pool.gateway.pid().unwrap();
    let mut dropped = 0.0;
    for wave in 1..=20 {
        twenty_logins(&pool, wave);
        dropped = sample(&pool.metrics(), "poolgate_log_dropped_total").unwrap_or(0.0);
        if dropped > 0.0 {
            eprintln!("{dropped} lines dropped after {wave} waves");
            break;
        }
    }
    assert!(dropped > 0.0, "no line dropped after 20 waves of logins");
    wait_until_blocked(pid, "log");
    // With the queue full, the logging library reports the failed shutdown of its writer on
    // standard output, which blocks: the gateway must not wait for that either.
    stops_promptly(&mut pool);
    drop(unread);
}

#[test]
fn the_text_log_has_no_colour_codes_unless_it_goes_to_a_terminal() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    // The fixture sends standard error to a file, as `2>>file`, nohup or docker logs do.
    let pool = GatewayPool::builder().vm("vm-a").users(1).start();
    assert_ok(&pool.client(1).run("true"), "a login");
    pool.gateway
        .wait_for_log("ssh session ended", Duration::from_secs(10));
    let log = pool.gateway.log_text();
    assert!(log.contains(" INFO "), "{log}");
    assert!(!log.contains('\u{1b}'), "colour codes in a file:\n{log:?}");
}
