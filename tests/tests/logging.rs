//! The gateway's log when standard error stops taking lines (a stalled journal, a full pipe
//! nobody reads): logins go on. The log's lines wait in a queue of their own, written by a
//! thread of its own; lines beyond the queue are dropped and counted in
//! `poolgate_log_dropped_total` instead of holding up the tasks that log them; and a shutdown
//! gives up the lines a stuck standard error did not take instead of waiting for it.

// Test code: a failed step should abort the test at once (as in tests/src/lib.rs).
#![allow(clippy::unwrap_used)]

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use poolgate_tests::*;

#[test]
fn a_stalled_stderr_holds_up_no_login_request_or_shutdown() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    // A pipe of one page that nobody reads: once the gateway's first lines fill it, a write to
    // its standard error blocks for good.
    let (unread, writer) = std::io::pipe().unwrap();
    nix::fcntl::fcntl(&writer, nix::fcntl::FcntlArg::F_SETPIPE_SZ(4096)).unwrap();
    let pool = GatewayPool::builder()
        .vm("vm-a")
        .vm("vm-b")
        .vm("vm-c")
        .users(1)
        .gateway_stderr(std::fs::File::from(OwnedFd::from(writer)))
        .start();
    // Two waves of twenty logins at once over three VMs (ten sessions each at most, the
    // default), each of which logs at `info` (the default). The first fills the pipe; the
    // second starts once the gateway's log writer is stuck in a write to it.
    let pid = pool.gateway.pid().unwrap();
    for wave in 1..=2 {
        if wave == 2 {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !thread_wchans(pid, "log")
                .iter()
                .any(|w| w.contains("pipe_write"))
            {
                assert!(
                    Instant::now() < deadline,
                    "the log writer never waited on the full pipe: {:?}",
                    thread_wchans(pid, "log")
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
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
                    "wave {wave}: {}\n{}",
                    stderr(&out),
                    pool.log()
                );
            }
        });
    }
    // Lines wait in the log's queue (16 Ki lines) before any is dropped; the count is exported.
    let metrics = pool.metrics();
    assert_eq!(
        sample(&metrics, "poolgate_log_dropped_total"),
        Some(0.0),
        "{metrics}"
    );
    // Requests are answered too, their access-log lines (on standard error, the default) given
    // to the access log's own writer, which the full pipe holds up as well.
    for i in 0..50 {
        let resp = http_get(pool.http, &format!("/r/{i}"));
        assert!(resp.status > 0, "{resp:?}");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while !thread_wchans(pid, "access-log")
        .iter()
        .any(|w| w.contains("pipe_write"))
    {
        assert!(
            Instant::now() < deadline,
            "the access-log writer never waited on the full pipe: {:?}",
            thread_wchans(pid, "access-log")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Nor does it hold up a clean shutdown (no session is open, so it is prompt): the lines
    // still waiting are given up after a moment (5 s for the access log's, 1 s for the log's).
    let mut pool = pool;
    let stopping = Instant::now();
    let status = pool.gateway.terminate(Duration::from_secs(15));
    assert!(status.success(), "{status:?}\n{}", pool.log());
    eprintln!("exited {:?} after SIGTERM", stopping.elapsed());
    drop(unread);
}
