//! The access log (`http.access_log`) against the real gateway binary: with a file as its
//! destination, every proxied request gets its line there (method, path without the query,
//! status, VM, client, HTTP version) — written by the gateway's log thread within a moment,
//! not on the log — and nothing is counted as dropped. Rotated by the real `logrotate` while
//! twenty clients send requests, it loses no line and cuts none.

// Test code: a failed step should abort the test at once (as in tests/src/lib.rs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use poolgate_tests::*;

/// A web VM that answers 200 to every request and closes.
fn upstream() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut out = conn.try_clone().unwrap();
                let mut reader = BufReader::new(conn);
                let mut line = String::new();
                // The request head; these requests have no body.
                while reader.read_line(&mut line).unwrap_or(0) > 0 {
                    if line == "\r\n" {
                        let _ = out.write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                        );
                        return;
                    }
                    line.clear();
                }
            });
        }
    });
    port
}

/// The smallest config with an access log in a file: one web VM, `access_log = "access.log"`
/// (relative to the config, so in the gateway's directory).
fn logging_to_a_file() -> GatewayPool {
    GatewayPool::builder()
        .web_pool("/health")
        .http_option("access_log = \"access.log\"")
        .web_vm("web-1", upstream())
        .start()
}

#[test]
fn every_request_gets_a_line_in_the_access_log_file() {
    let gw = logging_to_a_file();
    let n = 40;
    for i in 0..n {
        let resp = http_get(gw.http, &format!("/files/{i}?token=secret"));
        assert_eq!(resp.status, 200, "{resp:?}");
    }
    let path = gw.dir().join("access.log");
    let files_lines = || -> Vec<String> {
        std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("path=/files/"))
            .map(str::to_owned)
            .collect()
    };
    poll(Duration::from_secs(10), || files_lines().len() >= n);
    let lines = files_lines();
    assert_eq!(lines.len(), n, "lines in {}:\n{lines:#?}", path.display());
    for (i, line) in lines.iter().enumerate() {
        for field in [
            "poolgate::http::access: request method=GET",
            &format!("path=/files/{i} "),
            "status=200",
            "vm=web-1",
            "client=127.0.0.1:",
            "proto=HTTP/1.1",
        ] {
            assert!(line.contains(field), "{field:?} missing from {line}");
        }
        assert!(!line.contains("secret"), "the query was logged: {line}");
    }
    // The file is the destination: the log itself has no access lines.
    assert!(
        !gw.gateway.log_text().contains("poolgate::http::access"),
        "{}",
        gw.gateway.log_text()
    );
    assert_nothing_dropped(&gw);
}

/// The gateway counted no access-log line as dropped.
fn assert_nothing_dropped(gw: &GatewayPool) {
    let metrics = http_get(gw.admin, "/metrics").body;
    assert_eq!(
        sample(&metrics, "poolgate_access_log_dropped_total"),
        Some(0.0),
        "{metrics}"
    );
}

/// The lines of `path` that are access lines (empty when it does not exist).
fn access_lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("poolgate::http::access"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn logrotate_during_a_burst_loses_no_line_and_the_next_lines_go_to_the_new_file() {
    require_tools!("logrotate");
    let gw = logging_to_a_file();
    let path = gw.dir().join("access.log");
    let rotated = gw.dir().join("access.log.1");

    // Twenty clients at once, each sending requests one after another until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..20)
        .map(|c| {
            let (stop, sent, addr) = (stop.clone(), sent.clone(), gw.http);
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Acquire) {
                    let resp = http_get(addr, &format!("/c/{c}/{i}"));
                    assert_eq!(resp.status, 200, "{resp:?}");
                    sent.fetch_add(1, Ordering::AcqRel);
                    i += 1;
                }
            })
        })
        .collect();

    // Rotate once lines are arriving, the way a distribution's daily job does (`create`).
    wait_until(Duration::from_secs(20), "50 access lines", || {
        access_lines(&path).len() >= 50
    });
    let conf = gw.dir().join("logrotate.conf");
    std::fs::write(
        &conf,
        format!(
            "{} {{\n  rotate 2\n  create 0600\n  nocompress\n  missingok\n}}\n",
            path.display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(tool("logrotate"))
        .arg("--force")
        .arg("--state")
        .arg(gw.dir().join("logrotate.state"))
        .arg(&conf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "logrotate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before = access_lines(&rotated).len();
    assert!(before >= 50, "the rotated file has {before} lines");

    // The requests go on; their lines appear in the new file without a signal or restart.
    assert!(
        poll(Duration::from_secs(20), || access_lines(&path).len() >= 50),
        "no lines in the new {} after rotation\n{}",
        path.display(),
        gw.gateway.log_text()
    );
    stop.store(true, Ordering::Release);
    for client in clients {
        client.join().unwrap();
    }
    let total = sent.load(Ordering::Acquire);

    // Every request has exactly one whole line, in one file or the other.
    poll(Duration::from_secs(10), || {
        access_lines(&rotated).len() + access_lines(&path).len() >= total
    });
    let (old, new) = (access_lines(&rotated), access_lines(&path));
    assert_eq!(old.len() + new.len(), total, "lines for {total} requests");
    let mut paths: Vec<&str> = Vec::new();
    for line in old.iter().chain(&new) {
        assert!(
            line.starts_with("20") && line.ends_with("proto=HTTP/1.1"),
            "a cut line: {line}"
        );
        let path = line
            .split(" path=")
            .nth(1)
            .and_then(|r| r.split(' ').next());
        paths.push(path.unwrap_or_else(|| panic!("no path in {line}")));
    }
    paths.sort_unstable();
    paths.dedup();
    assert_eq!(paths.len(), total, "a request logged twice");
    // The new file is the one logrotate made (its mode), not one the gateway made (0640).
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(
        gw.gateway
            .log_text()
            .contains("http.access_log: the file was rotated or removed; writing to a new one"),
        "{}",
        gw.gateway.log_text()
    );
    assert_nothing_dropped(&gw);
}
