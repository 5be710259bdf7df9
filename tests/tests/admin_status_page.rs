//! The `/status` page of a live gateway with a healthy, a draining and an unhealthy VM and open
//! SSH sessions: its HTML names each VM with its state, and headless Chromium renders it; the
//! screenshot is kept as `tests/artifacts/admin_status_page.png`.

use std::process::Command;
use std::time::{Duration, Instant};

use poolgate_tests::*;

/// The `<tr>` of the VM table naming `vm`.
fn vm_row<'a>(html: &'a str, vm: &str) -> &'a str {
    let cell = format!("<td><b>{vm}</b></td>");
    html.split("<tr>")
        .find(|row| row.contains(&cell))
        .unwrap_or_else(|| panic!("no row for {vm} in /status:\n{html}"))
}

/// Width and height from a PNG's IHDR chunk, checking the signature.
fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n") && &bytes[12..16] == b"IHDR",
        "not a PNG"
    );
    let be = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    (be(16), be(20))
}

#[test]
fn admin_status_page_shows_every_vm_and_state_and_renders_in_chromium() {
    require_tools!("sshd", "ssh", "ssh-keygen", "chromium");
    require_root!();
    let started = Instant::now();
    let mut pool = GatewayPool::builder()
        .vm("vm-a")
        .vm("vm-b")
        .vm("vm-c")
        .users(3)
        .start();

    // Sessions: two of user 1 (affinity: one VM) and one of user 2 (another VM).
    let held = [
        SshSession::hold(&pool.client(1)),
        SshSession::hold(&pool.client(1)),
        SshSession::hold(&pool.client(2)),
    ];
    let vm_of_1 = held[0].vm.clone();
    let vm_of_2 = held[2].vm.clone();
    assert_ne!(vm_of_1, vm_of_2);
    // Drain user 2's VM (it keeps the session), take the third VM down.
    let down = ["vm-a", "vm-b", "vm-c"]
        .into_iter()
        .find(|v| *v != vm_of_1 && *v != vm_of_2)
        .expect("a VM without sessions");
    pool.api_post(&vm_of_2, "drain");
    pool.vm_mut(down).stop();
    pool.wait_for_state(down, "unhealthy", Duration::from_secs(15));
    let expected = [
        (vm_of_1.as_str(), "healthy", 2),
        (vm_of_2.as_str(), "draining", 1),
        (down, "unhealthy", 0),
    ];

    let page = http_get(pool.admin, "/status");
    assert_eq!(page.status, 200);
    assert!(
        page.header("content-type")
            .is_some_and(|v| v.starts_with("text/html")),
        "{:?}",
        page.headers
    );
    let html = &page.body;
    for (vm, state, ssh) in expected {
        let row = vm_row(html, vm);
        assert!(
            row.contains(&format!("<span class=\"state {state}\">{state}</span>")),
            "{vm} should show {state}: {row}"
        );
        assert!(
            row.contains(&format!("{ssh} ssh")),
            "{vm}: {ssh} ssh sessions: {row}"
        );
    }
    for user in [pool.user(1), pool.user(2)] {
        assert!(
            html.contains(&format!("<td>{user}</td>")),
            "{user} in the sessions table"
        );
    }
    assert!(html.contains("Sessions (3)"), "{html}");

    // Headless Chromium renders the live page.
    let artifacts = workspace_dir().join("tests").join("artifacts");
    std::fs::create_dir_all(&artifacts).expect("mkdir tests/artifacts");
    let png = artifacts.join("admin_status_page.png");
    let _ = std::fs::remove_file(&png);
    let profile = tempfile::Builder::new()
        .prefix("poolgate-chromium-")
        .tempdir()
        .expect("chromium profile dir");
    let shot_started = Instant::now();
    let out = run_with_timeout(
        Command::new(tool("chromium"))
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(format!("--screenshot={}", png.display()))
            .arg("--window-size=1200,800")
            .arg(format!("http://{}/status", pool.admin))
            .env("HOME", profile.path()),
        Duration::from_secs(120),
    );
    assert_ok(&out, "chromium --headless --screenshot");
    let bytes = std::fs::read(&png)
        .unwrap_or_else(|e| panic!("no screenshot at {}: {e}\n{}", png.display(), stderr(&out)));
    assert!(
        bytes.len() > 10 * 1024,
        "screenshot is only {} bytes: {}",
        bytes.len(),
        png.display()
    );
    assert_eq!(png_size(&bytes), (1200, 800));
    eprintln!(
        "screenshot {} ({} bytes) in {:?}",
        png.display(),
        bytes.len(),
        shot_started.elapsed()
    );

    for s in held {
        s.end();
    }
    eprintln!("status page test: {:?}", started.elapsed());
}
