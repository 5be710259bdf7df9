//! The browser journey: headless Debian Chromium, driven by playwright-core, logs into
//! JupyterHub through the gateway (HTTPS, test CA), opens JupyterLab, runs `1+1` in a notebook
//! and sees `2`. The screenshot is kept in `tests/artifacts/`.

use std::process::Command;
use std::time::{Duration, Instant};

use poolgate_tests::jupyter::*;
use poolgate_tests::*;

#[test]
fn chromium_logs_in_opens_jupyterlab_and_runs_a_cell() {
    if !require_jupyter() {
        return;
    }
    require_tools!("node", "/usr/bin/chromium");
    let playwright = js_dir().join("node_modules/playwright-core");
    if !playwright.is_dir() {
        if in_ci() {
            panic!(
                "playwright-core is not installed in {} (npm ci there)",
                js_dir().display()
            );
        }
        eprintln!(
            "SKIPPED: playwright-core not installed in {}",
            js_dir().display()
        );
        return;
    }
    let started = Instant::now();
    let hubs = JupyterHubVm::start_all(&["hub-a", "hub-b"]);
    let gw = GatewayPool::builder()
        .web_pool("/hub/health")
        .tls()
        .web_vms(&hubs)
        .start();
    let artifacts = workspace_dir().join("tests/artifacts");
    std::fs::create_dir_all(&artifacts).expect("tests/artifacts");
    let screenshot = artifacts.join("jupyterlab-through-poolgate.png");
    let _ = std::fs::remove_file(&screenshot);
    let profile = tempfile::tempdir().expect("chromium profile dir");
    let out = run_with_timeout(
        Command::new("node")
            .arg(js_dir().join("journey.mjs"))
            .args(["--url", &format!("https://localhost:{}", gw.https.port())])
            .args(["--user", "bea", "--password", HUB_PASSWORD])
            .args(["--spki", gw.tls_ca().server_spki_sha256()])
            .arg("--screenshot")
            .arg(&screenshot)
            .arg("--profile")
            .arg(profile.path())
            .current_dir(js_dir()),
        Duration::from_secs(300),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("RESULT 2"),
        "browser journey failed ({})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}\n--- gateway log ---\n{}",
        out.status,
        gw.gateway.log_text()
    );
    assert!(screenshot.is_file(), "screenshot kept");
    // Every request of the browser went to one hub.
    let log = gw.gateway.log_text();
    let vms: std::collections::BTreeSet<&str> = log
        .lines()
        .filter(|l| l.contains("poolgate::http::access") && l.contains("/user/bea"))
        .filter_map(|l| l.split("vm=").nth(1))
        .filter_map(|v| v.split_whitespace().next())
        .collect();
    assert_eq!(vms.len(), 1, "the browser's requests went to {vms:?}");
    // Chromium chose HTTP/2 (ALPN) for pages and API calls, and HTTP/1.1 for websockets.
    let access = |needle: &str| {
        log.lines()
            .any(|l| l.contains("poolgate::http::access") && l.contains(needle))
    };
    assert!(access("proto=HTTP/2.0"), "no HTTP/2 request in:\n{log}");
    assert!(access("status=101"), "no websocket upgrade in:\n{log}");
    eprintln!(
        "browser journey in {:?}; screenshot {}",
        started.elapsed(),
        screenshot.display()
    );
}
