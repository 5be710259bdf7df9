//! A team's notebooks against `max_sessions`, over real jupyter_server VMs behind the gateway
//! (HTTPS, test CA). A JupyterLab user holds websockets beside the page: the events
//! subscription, one per kernel, one per terminal. They belong to the browser's session on its
//! VM: one user is one session against `max_sessions`, however many websockets it opens, and
//! an open websocket keeps that session (and so the browser's place on its VM) past
//! `http.session_idle`.
//!
//! - Twenty users at once, at the defaults (`max_sessions` 10 on each of three VMs): each loads
//!   the page, runs a cell in a kernel over its websocket, echoes a line in a terminal and
//!   keeps the events websocket open. All twenty work, each stays on the VM its first request
//!   chose, and the pool counts twenty sessions. (When each websocket counted as a session of
//!   its own, twenty users were eighty sessions against thirty: the later ones got 503s.)
//! - A background tab: a browser with a kernel websocket open and no request for longer than
//!   `session_idle`, on a VM that nine other browsers then fill to its limit. Coming back, it is
//!   still served by that VM, finds its kernel and runs a cell on the same websocket, while a
//!   new browser is refused with a page that says every VM is at its session limit.

// Test code: a failed step should abort the test at once (as in tests/src/lib.rs).
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use poolgate_tests::jupyter::*;
use poolgate_tests::{GatewayPool, JsonItems, blocking, http_get};
use serde_json::{Value, json};

const COOKIE: &str = "poolgate_vm";
/// Users arriving together.
const TEAM: usize = 20;
/// `max_sessions`' default.
const MAX_SESSIONS: u64 = 10;

/// `GET /api/v1/vms` on the admin listener: each VM's HTTP sessions.
fn http_sessions(admin: SocketAddr) -> Vec<(String, u64)> {
    let r = http_get(admin, "/api/v1/vms");
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
        .items()
        .iter()
        .map(|vm| {
            (
                vm["name"].as_str().unwrap_or("?").to_string(),
                vm["sessions"]["http"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// The VM the browser's cookie names.
fn pinned_to(b: &Browser) -> String {
    cookie_vm(&b.cookie(COOKIE, "/").expect("a poolgate_vm cookie"))
}

/// Opens a terminal and echoes a line through its websocket; returns the open websocket.
async fn terminal(b: &Browser) -> WebSocket {
    let r = b.api("POST", "/api/terminals", None).await;
    assert_eq!(r.status, 200, "new terminal: {}", r.text());
    let name = r.json()["name"]
        .as_str()
        .expect("terminal name")
        .to_string();
    let mut ws = b.websocket(&format!("/terminals/websocket/{name}")).await;
    ws_send(&mut ws, json!(["stdin", "echo team$((6*7))\r"]).to_string()).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut screen = String::new();
    while !screen.contains("team42") {
        let left = deadline.saturating_duration_since(Instant::now());
        let text = tokio::time::timeout(left, ws_next_text(&mut ws))
            .await
            .unwrap_or_else(|_| panic!("no echo within 60 s; the terminal showed:\n{screen}"))
            .expect("terminal websocket open");
        if let Ok(Value::Array(m)) = serde_json::from_str(&text)
            && m.first().and_then(Value::as_str) == Some("stdout")
        {
            screen.push_str(m.get(1).and_then(Value::as_str).unwrap_or(""));
        }
    }
    ws
}

/// What one user opened, and how long each step took.
struct NotebookUser {
    /// The open websockets: events, kernel, terminal.
    sockets: Vec<WebSocket>,
    /// The VM the cookie named after each step.
    seen: Vec<String>,
    /// Time to the kernel's channels websocket (start and handshake, which jupyter_server holds
    /// until the kernel answers `kernel_info`).
    kernel_ready: Duration,
    /// Time for the whole user.
    total: Duration,
}

/// What one JupyterLab user opens: the page, the events websocket, a kernel (one cell run) and
/// a terminal (one line echoed).
async fn notebook_user(b: Arc<Browser>, user: usize) -> NotebookUser {
    let started = Instant::now();
    let (r, _) = b.follow("/lab").await;
    assert_eq!(r.status, 200, "user {user}: the page: {}", r.text());
    let mut seen = vec![pinned_to(&b)];
    let events = b.websocket("/api/events/subscribe").await;
    seen.push(pinned_to(&b));
    let kernel_asked = Instant::now();
    let mut kernel = b.open_kernel("", &format!("user-{user}")).await;
    let kernel_ready = kernel_asked.elapsed();
    assert_eq!(
        run_code(&mut kernel, "6*7", &format!("u{user}")).await,
        "42",
        "user {user}: the cell"
    );
    seen.push(pinned_to(&b));
    let term = terminal(&b).await;
    let r = b.get("/api/sessions").await;
    assert_eq!(r.status, 200, "user {user}: /api/sessions: {}", r.text());
    seen.push(pinned_to(&b));
    NotebookUser {
        sockets: vec![events, kernel, term],
        seen,
        kernel_ready,
        total: started.elapsed(),
    }
}

/// The gateway's warning and error lines.
fn gateway_warnings(gw: &GatewayPool) -> String {
    let log = gw.gateway.log_text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    format!("--- the gateway's warnings ---\n{}", lines.join("\n"))
}

/// The warnings and errors in each VM's jupyter_server log, and its last lines: what a failed
/// user's panic should come with.
fn vm_logs(vms: &[JupyterServerVm]) -> String {
    let mut out = String::new();
    for vm in vms {
        let log = vm.log_text();
        let lines: Vec<&str> = log.lines().collect();
        let notable: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.starts_with("[W ") || l.starts_with("[E "))
            .collect();
        let tail = &lines[lines.len().saturating_sub(15)..];
        out.push_str(&format!(
            "--- {}: {} warning/error lines ---\n{}\n--- {}: last lines ---\n{}\n",
            vm.name(),
            notable.len(),
            notable.join("\n"),
            vm.name(),
            tail.join("\n")
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_notebook_users_at_once_fit_three_vms_at_the_default_session_limit() {
    if !require_jupyter() {
        return;
    }
    let started = Instant::now();
    let names = ["js-a", "js-b", "js-c"];
    let vms = blocking(move || JupyterServerVm::start_all(&names)).await;
    // The defaults, probes included (every 5 s, 2 s timeout: twenty kernels starting at once
    // slow jupyter_server's answers, which the tests' quick probes would take for a VM down).
    // Only the web probe's path is set (jupyter_server has no JupyterHub /hub/health) and the
    // SSH probe is off (these VMs have no SSH side).
    let gw = GatewayPool::builder()
        .without_health_section()
        .config_toml("[health]\nssh = false\nhttp_path = \"/api\"")
        .tls()
        .web_vms(&vms)
        .start_async()
        .await;
    let config = std::fs::read_to_string(gw.gateway.config_path()).unwrap();
    assert!(!config.contains("max_sessions") && !config.contains("session_idle"));
    assert!(!config.contains("interval") && !config.contains("timeout"));

    let browsers: Vec<Arc<Browser>> = (0..TEAM).map(|_| Arc::new(gw.browser())).collect();
    let arrived = Instant::now();
    let users: Vec<_> = browsers
        .iter()
        .enumerate()
        .map(|(i, b)| tokio::spawn(notebook_user(b.clone(), i)))
        .collect();
    let mut open = Vec::new();
    let mut per_vm = std::collections::BTreeMap::<String, usize>::new();
    let (mut slowest_kernel, mut slowest_user) = (Duration::ZERO, Duration::ZERO);
    for (i, user) in users.into_iter().enumerate() {
        let user = user.await.unwrap_or_else(|e| {
            panic!(
                "user {i}: {e}\n{}\n{}",
                vm_logs(&vms),
                gateway_warnings(&gw)
            )
        });
        let seen = &user.seen;
        assert!(
            seen.iter().all(|vm| *vm == seen[0]),
            "user {i} moved between VMs while opening its notebook: {seen:?}"
        );
        *per_vm.entry(seen[0].clone()).or_default() += 1;
        slowest_kernel = slowest_kernel.max(user.kernel_ready);
        slowest_user = slowest_user.max(user.total);
        open.extend(user.sockets);
    }
    eprintln!(
        "{TEAM} users with a kernel, a terminal and the events websocket each in {:?}: {per_vm:?}; \
         slowest kernel ready in {slowest_kernel:?}, slowest user done in {slowest_user:?}",
        arrived.elapsed()
    );

    // One session per user, each VM within its limit, with 60 websockets open.
    let sessions = http_sessions(gw.admin);
    let total: u64 = sessions.iter().map(|(_, n)| n).sum();
    assert_eq!(
        total,
        TEAM as u64,
        "{TEAM} users with {} open websockets: {sessions:?}",
        open.len()
    );
    for (vm, n) in &sessions {
        assert!(*n <= MAX_SESSIONS, "{vm} holds {n} sessions: {sessions:?}");
        assert_eq!(
            *n as usize,
            per_vm.get(vm).copied().unwrap_or(0),
            "{vm}: {sessions:?} against the users' cookies {per_vm:?}"
        );
    }
    drop(open);
    drop(vms);
    eprintln!("team test: {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_background_tab_keeps_its_place_on_a_full_vm_past_session_idle() {
    if !require_jupyter() {
        return;
    }
    let idle = Duration::from_secs(3);
    let vms = blocking(|| JupyterServerVm::start_all(&["js-a"])).await;
    let gw = GatewayPool::builder()
        .web_pool("/api")
        .tls()
        .web_vms(&vms)
        .http_option(&format!("session_idle = \"{}s\"", idle.as_secs()))
        .start_async()
        .await;

    // The tab: the page, a kernel over its websocket, one cell.
    let tab = gw.browser();
    let (r, _) = tab.follow("/lab").await;
    assert_eq!(r.status, 200, "the page: {}", r.text());
    let mut kernel = tab.open_kernel("", "bg-tab").await;
    assert_eq!(run_code(&mut kernel, "x = 41; x + 1", "cell-1").await, "42");
    let r = tab.get("/api/kernels").await;
    let kernel_id = r.json()[0]["id"].as_str().expect("kernel id").to_string();

    // Nine colleagues fill the VM to its limit and keep working; the tab sends nothing.
    let went_quiet = Instant::now();
    let colleagues: Vec<Browser> = (0..MAX_SESSIONS - 1).map(|_| gw.browser()).collect();
    for c in &colleagues {
        for path in ["/api", "/api/status"] {
            let r = c.get(path).await;
            assert_eq!(r.status, 200, "a colleague's {path}: {}", r.text());
        }
    }
    assert_eq!(http_sessions(gw.admin), vec![("js-a".into(), MAX_SESSIONS)]);
    while went_quiet.elapsed() < idle * 2 + Duration::from_secs(2) {
        for c in &colleagues {
            assert_eq!(c.get("/api/status").await.status, 200);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The VM is full: a newcomer is refused.
    let r = gw.browser().get("/api/status").await;
    assert_eq!(r.status, 503, "the VM is full: {}", r.text());
    // The page says why (not "the pool is starting": it is full), and so does the log.
    assert!(
        r.text().contains("every VM is at its session limit") && !r.text().contains("starting"),
        "{}",
        r.text()
    );
    gw.gateway.wait_for_log(
        "HTTP requests got 503: no VM can take them",
        Duration::from_secs(10),
    );

    // The tab comes back after twice session_idle: its VM serves it, its kernel is there and
    // answers on the same websocket.
    let r = tab.get("/api/kernels").await;
    assert_eq!(
        r.status,
        200,
        "the background tab, back after {:?} (session_idle {idle:?}): {}\n{:?}",
        went_quiet.elapsed(),
        r.text(),
        http_sessions(gw.admin)
    );
    assert_eq!(pinned_to(&tab), "js-a");
    let kernels = r.json();
    let ids: Vec<&str> = kernels
        .as_array()
        .map(|a| a.iter().filter_map(|k| k["id"].as_str()).collect())
        .unwrap_or_default();
    assert!(ids.contains(&kernel_id.as_str()), "{ids:?}");
    assert_eq!(run_code(&mut kernel, "x + 1", "cell-2").await, "42");
    drop(vms);
}
