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
//! - A VM dies under the twenty users (its server, kernels and terminals killed). Its users'
//!   websockets close at once; they reload and start again on the two others, which take
//!   exactly their limit, while everyone else runs a cell in the kernel they had and keeps
//!   their VM. The sessions the dead VM's websockets held end within seconds, although these
//!   clients keep the closed websockets' sockets open.
//! - A background tab: a browser with a kernel websocket open and no request for longer than
//!   `session_idle`, on a VM that nine other browsers then fill to its limit. Coming back, it is
//!   still served by that VM, finds its kernel and runs a cell on the same websocket, while a
//!   new browser is refused with a page that says every VM is at its session limit.

// Test code: a failed step should abort the test at once (as in tests/src/lib.rs).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use poolgate_tests::jupyter::*;
use poolgate_tests::{GatewayPool, JsonItems, blocking};
use serde_json::{Value, json};

const COOKIE: &str = "poolgate_vm";
/// Users arriving together.
const TEAM: usize = 20;
/// `max_sessions`' default.
const MAX_SESSIONS: u64 = 10;

/// Each VM's HTTP sessions, as the admin API counts them.
fn http_sessions(gw: &GatewayPool) -> Vec<(String, u64)> {
    gw.vms_json()
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

/// Three jupyter_server VMs behind a gateway at its defaults, probes included (every 5 s, 2 s
/// timeout: twenty kernels starting at once slow jupyter_server's answers, which the tests'
/// quick probes would take for a VM down).
async fn team_pool() -> (Vec<JupyterServerVm>, GatewayPool) {
    let names = ["js-a", "js-b", "js-c"];
    let vms = blocking(move || JupyterServerVm::start_all(&names)).await;
    let gw = GatewayPool::builder()
        .web_probe_defaults("/api")
        .tls()
        .web_vms(&vms)
        .start_async()
        .await;
    let config = std::fs::read_to_string(gw.gateway.config_path()).unwrap();
    assert!(!config.contains("max_sessions") && !config.contains("session_idle"));
    assert!(!config.contains("interval") && !config.contains("timeout"));
    (vms, gw)
}

/// The users `who` (indexes into `browsers`) open their notebooks at once; each must stay on
/// one VM throughout. Panics, with the VMs' and the gateway's warnings, when one fails.
async fn team_arrives(
    browsers: &[Arc<Browser>],
    who: &[usize],
    vms: &[JupyterServerVm],
    gw: &GatewayPool,
) -> Vec<NotebookUser> {
    let arrived = Instant::now();
    let tasks: Vec<_> = who
        .iter()
        .map(|&i| tokio::spawn(notebook_user(browsers[i].clone(), i)))
        .collect();
    let mut users = Vec::new();
    for (&i, task) in who.iter().zip(tasks) {
        let user = task.await.unwrap_or_else(|e| {
            panic!("user {i}: {e}\n{}\n{}", vm_logs(vms), gateway_warnings(gw))
        });
        let seen = &user.seen;
        assert!(
            seen.iter().all(|vm| *vm == seen[0]),
            "user {i} moved between VMs while opening its notebook: {seen:?}"
        );
        users.push(user);
    }
    let slowest_kernel = users
        .iter()
        .map(|u| u.kernel_ready)
        .max()
        .unwrap_or_default();
    let slowest_user = users.iter().map(|u| u.total).max().unwrap_or_default();
    eprintln!(
        "{} users with a kernel, a terminal and the events websocket each in {:?}: {:?}; \
         slowest kernel ready in {slowest_kernel:?}, slowest user done in {slowest_user:?}",
        who.len(),
        arrived.elapsed(),
        users_per_vm(&users)
    );
    users
}

/// How many of `users` each VM holds (by the VM their cookie named).
fn users_per_vm(users: &[NotebookUser]) -> BTreeMap<String, usize> {
    let mut per_vm = BTreeMap::new();
    for u in users {
        *per_vm.entry(u.seen[0].clone()).or_default() += 1;
    }
    per_vm
}

/// The admin API counts one session per user on the VM its cookie names, within the limit.
fn assert_one_session_per_user(gw: &GatewayPool, per_vm: &BTreeMap<String, usize>) {
    let sessions = http_sessions(gw);
    let total: u64 = sessions.iter().map(|(_, n)| n).sum();
    let users: usize = per_vm.values().sum();
    assert_eq!(total, users as u64, "{users} users: {sessions:?}");
    for (vm, n) in &sessions {
        assert!(*n <= MAX_SESSIONS, "{vm} holds {n} sessions: {sessions:?}");
        assert_eq!(
            *n as usize,
            per_vm.get(vm).copied().unwrap_or(0),
            "{vm}: {sessions:?} against the users' cookies {per_vm:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_notebook_users_at_once_fit_three_vms_at_the_default_session_limit() {
    if !require_jupyter() {
        return;
    }
    let started = Instant::now();
    let (vms, gw) = team_pool().await;
    let browsers: Vec<Arc<Browser>> = (0..TEAM).map(|_| Arc::new(gw.browser())).collect();
    let all: Vec<usize> = (0..TEAM).collect();
    let users = team_arrives(&browsers, &all, &vms, &gw).await;

    // One session per user, each VM within its limit, with 60 websockets open.
    assert_one_session_per_user(&gw, &users_per_vm(&users));
    drop(users);
    drop(vms);
    eprintln!("team test: {:?}", started.elapsed());
}

/// Reads `ws` until it closes; panics if it is still open after `within`.
async fn closes_within(ws: &mut WebSocket, within: Duration, what: &str) {
    tokio::time::timeout(within, async { while ws_next_text(ws).await.is_some() {} })
        .await
        .unwrap_or_else(|_| panic!("{what} still open {within:?} after its VM died"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_a_vm_dies_under_the_team_its_users_start_again_on_the_others_and_nobody_else_notices()
{
    if !require_jupyter() {
        return;
    }
    let (mut vms, gw) = team_pool().await;
    let browsers: Vec<Arc<Browser>> = (0..TEAM).map(|_| Arc::new(gw.browser())).collect();
    let all: Vec<usize> = (0..TEAM).collect();
    let mut users = team_arrives(&browsers, &all, &vms, &gw).await;

    // The VM with the most users dies, its kernels and terminals with it. The two others have
    // room for everyone: 20 sessions, exactly their limit.
    let per_vm = users_per_vm(&users);
    let (victim, on_victim) = per_vm
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(vm, n)| (vm.clone(), *n))
        .unwrap();
    let died = Instant::now();
    let at = vms.iter().position(|vm| vm.name() == victim).unwrap();
    vms[at].stop();
    let (moving, staying): (Vec<usize>, Vec<usize>) =
        all.iter().partition(|&&i| users[i].seen[0] == victim);
    assert_eq!(moving.len(), on_victim);

    // Its users' websockets close (the gateway passes the VM's end on).
    for &i in &moving {
        for (ws, what) in users[i]
            .sockets
            .iter_mut()
            .zip(["events", "kernel", "terminal"])
        {
            closes_within(
                ws,
                Duration::from_secs(10),
                &format!("user {i}'s {what} websocket"),
            )
            .await;
        }
    }
    eprintln!(
        "{on_victim} users' websockets on {victim} closed {:?} after it died",
        died.elapsed()
    );

    // They reload at once and start again on the two others, while everyone else runs a cell
    // in the kernel they had and keeps their VM.
    let others = async {
        for &i in &staying {
            let kernel = &mut users[i].sockets[1];
            assert_eq!(
                run_code(kernel, "6*7+1", &format!("again-{i}")).await,
                "43",
                "user {i}, who stayed"
            );
            assert_eq!(pinned_to(&browsers[i]), users[i].seen[0], "user {i} stayed");
        }
    };
    let (again, ()) = tokio::join!(team_arrives(&browsers, &moving, &vms, &gw), others);
    for (u, i) in again.iter().zip(&moving) {
        assert_ne!(
            u.seen[0], victim,
            "user {i} is still sent to the VM that died"
        );
    }
    eprintln!(
        "{on_victim} users back at work on the other VMs {:?} after {victim} died",
        died.elapsed()
    );

    // The sessions the dead VM's websockets held end, although these clients keep their
    // closed websockets' sockets open (a browser closes them): the gateway lets go of an
    // upgraded connection a few seconds after one side has closed it.
    let within = (died + Duration::from_secs(30)).saturating_duration_since(Instant::now());
    tokio::task::block_in_place(|| {
        gw.wait_for_vm(
            &victim,
            "without HTTP sessions, 30 s after it died",
            within,
            |v| v["sessions"]["http"].as_u64().unwrap_or(0) == 0,
        )
    });
    eprintln!(
        "the dead VM's sessions ended {:?} after it died",
        died.elapsed()
    );

    // One session per user on the two VMs left, each within its limit.
    let mut now: BTreeMap<String, usize> = BTreeMap::new();
    for (i, u) in users.iter().enumerate() {
        if !moving.contains(&i) {
            *now.entry(u.seen[0].clone()).or_default() += 1;
        }
    }
    for u in &again {
        *now.entry(u.seen[0].clone()).or_default() += 1;
    }
    assert!(!now.contains_key(&victim));
    assert_one_session_per_user(&gw, &now);
    drop((users, again));
    drop(vms);
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
    assert_eq!(http_sessions(&gw), vec![("js-a".into(), MAX_SESSIONS)]);
    // Each colleague asks every 500 ms on its own, so none of them goes quiet for
    // `session_idle` even when a loaded machine slows some answers down.
    let working: Vec<_> = colleagues
        .into_iter()
        .map(|c| {
            tokio::spawn(async move {
                loop {
                    let r = c.get("/api/status").await;
                    assert_eq!(r.status, 200, "a colleague at work: {}", r.text());
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            })
        })
        .collect();
    // The tab's silence is what is under test: time has to pass.
    tokio::time::sleep((idle * 2 + Duration::from_secs(2)).saturating_sub(went_quiet.elapsed()))
        .await;
    // The VM is full: a newcomer is refused.
    let r = gw.browser().get("/api/status").await;
    for w in working {
        assert!(!w.is_finished(), "{:?}", w.await);
        w.abort();
    }
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
        http_sessions(&gw)
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
