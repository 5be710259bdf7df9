//! The access log (`http.access_log`) against the real gateway binary: with a file as its
//! destination, every proxied request gets its line there (method, path without the query,
//! status, VM, client, HTTP version) — written by the gateway's log thread within a moment,
//! not on the log — and nothing is counted as dropped.

// Test code: a failed step should abort the test at once (as in tests/src/lib.rs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::time::{Duration, Instant};

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

#[test]
fn every_request_gets_a_line_in_the_access_log_file() {
    let port = upstream();
    let gw = GatewayPool::builder()
        .web_pool("/health")
        .http_option("access_log = \"access.log\"")
        .web_vm("web-1", port)
        .start();
    let n = 40;
    for i in 0..n {
        let resp = http_get(gw.http, &format!("/files/{i}?token=secret"));
        assert_eq!(resp.status, 200, "{resp:?}");
    }
    let path = gw.dir().join("access.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<String> = text
            .lines()
            .filter(|l| l.contains("path=/files/"))
            .map(str::to_owned)
            .collect();
        if lines.len() >= n || Instant::now() > deadline {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
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
    let metrics = http_get(gw.admin, "/metrics").body;
    assert_eq!(
        sample(&metrics, "poolgate_access_log_dropped_total"),
        Some(0.0),
        "{metrics}"
    );
}
