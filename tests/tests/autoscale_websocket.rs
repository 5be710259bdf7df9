//! An open kernel websocket is a session (issue 14, item 3), end to end: a real `poolgate run`
//! with autoscaling on and the `exec` provider, whose scripts really start and stop a real
//! `jupyter_server` "VM" (the stop script kills it, and its kernels die with it); a
//! browser-like client that runs cells in a real ipykernel over the kernel-channels websocket.
//!
//! - The pool starts at zero; the browser's first request wakes it (503, the start script runs).
//! - The browser starts a kernel, opens its websocket, runs a cell, then sends no other HTTP
//!   request. With `http.session_idle` and `autoscale.scale_in_after` at 2 s, the websocket alone
//!   keeps the VM serving through several scale-in windows — counted from when the wake-up
//!   request stopped weighing on the pool — and the kernel still answers on the same websocket.
//! - Once the websocket closes, the VM is drained within one scale-in window and the stop script
//!   stops it; the kernel process is gone.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use poolgate_tests::jupyter::{Browser, JupyterServerVm, WebSocket, require_jupyter, run_code};
use poolgate_tests::*;
use serde_json::Value;

const VM: &str = "js-a";
/// `http.session_idle`.
const SESSION_IDLE: Duration = Duration::from_secs(2);
/// `autoscale.scale_in_after`.
const SCALE_IN_AFTER: Duration = Duration::from_secs(2);
/// One scale-in window: a browser's session lapses, then its VM may be drained.
const WINDOW: Duration = SESSION_IDLE.saturating_add(SCALE_IN_AFTER);
/// How many windows the websocket alone must keep the VM serving.
const WINDOWS_HELD: u32 = 3;

/// Kills the kernel if it outlived its server (the test then fails; nothing is left behind).
struct KillPid(u32);

impl Drop for KillPid {
    fn drop(&mut self) {
        if is_alive(self.0) {
            kill_tree(self.0);
        }
    }
}

/// The one VM as `/api/v1/vms` shows it.
fn vm_view(admin: SocketAddr) -> Value {
    let r = http_get(admin, "/api/v1/vms");
    assert_eq!(r.status, 200, "GET /api/v1/vms: {}", r.body);
    let vms = r.json();
    assert_eq!(vms.items().len(), 1, "one VM in the pool: {}", r.body);
    vms.items()[0].clone()
}

/// The parts of a VM's view this test is about.
fn brief(vm: &Value) -> String {
    format!(
        "state={:?} lifecycle={:?} draining={:?} sessions.http={:?}",
        vm["state"].as_str(),
        vm["lifecycle"].as_str(),
        vm["draining"].as_bool(),
        vm["sessions"]["http"].as_u64()
    )
}

/// Open HTTP sessions on the VM as `/api/v1/sessions` lists them.
fn http_sessions(admin: SocketAddr) -> usize {
    let r = http_get(admin, "/api/v1/sessions");
    assert_eq!(r.status, 200, "GET /api/v1/sessions: {}", r.body);
    r.json()
        .items()
        .iter()
        .filter(|s| s["protocol"].as_str() == Some("http") && s["vm"].as_str() == Some(VM))
        .count()
}

/// `poolgate_sessions_waiting{protocol="http"}`: requests that found no VM and still weigh on
/// the pool as someone waiting for it.
fn http_waiting(admin: SocketAddr) -> f64 {
    let r = http_get(admin, "/metrics");
    assert_eq!(r.status, 200, "GET /metrics: {}", r.body);
    r.body
        .lines()
        .find(|l| l.starts_with("poolgate_sessions_waiting{") && l.contains("protocol=\"http\""))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0.0)
}

/// What the admin API showed during the hold.
#[derive(Debug)]
struct Sample {
    at: Duration,
    state: String,
    lifecycle: String,
    draining: bool,
    sessions_http: u64,
    listed_http: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_kernel_websocket_keeps_its_vm_through_scale_in_windows_and_it_stops_after_close() {
    if !require_jupyter() {
        return;
    }
    let began = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("poolgate-ws-autoscale-")
        .tempdir()
        .expect("temp dir");
    let d = dir.path();

    // The VM: a jupyter_server the exec scripts start (in the background, its output in its own
    // log) and stop (SIGTERM, then wait until it is gone; it shuts its kernels down).
    let root = d.join("vm-root");
    std::fs::create_dir_all(&root).expect("VM root");
    let vm_port = free_port();
    let pid_file = d.join("jupyter.pid");
    let stops_file = d.join("stops");
    let server = JupyterServerVm::command(vm_port, &root);
    let mut launch = String::new();
    for (k, v) in server.get_envs() {
        if let Some(v) = v {
            launch += &format!(
                "export {}={}\n",
                k.to_string_lossy(),
                sh_quote(&v.to_string_lossy())
            );
        }
    }
    launch += &format!("cd {}\n", sh_quote(&root.display().to_string()));
    launch += &shell_line(&server);
    let (pid, log, stops) = (
        sh_quote(&pid_file.display().to_string()),
        sh_quote(&root.join("server.log").display().to_string()),
        sh_quote(&stops_file.display().to_string()),
    );
    let _cleanup = KillPidFile(pid_file.clone());
    let scripts = ExecScripts::write(
        d,
        VM,
        &pid_file,
        &[("ssh_port", 1), ("http_port", vm_port)],
        &format!(
            "if [ -f {pid} ] && alive \"$(cat {pid})\"; then exit 0; fi\n\
             {launch} </dev/null >>{log} 2>&1 &\n\
             echo $! > {pid}"
        ),
        &format!(
            "p=\"$(cat {pid})\"\n\
             kill -TERM \"$p\" 2>/dev/null || true\n\
             n=0\n\
             while alive \"$p\"; do\n\
               n=$((n + 1))\n\
               if [ \"$n\" -gt 80 ]; then kill -KILL \"$p\" 2>/dev/null || true; fi\n\
               sleep 0.1\n\
             done\n\
             rm -f {pid}\n\
             date +%s.%N >> {stops}"
        ),
    );

    // The gateway: plain HTTP on 127.0.0.1, the web side probed on /api, autoscaling with short
    // idle times. The SSH side is unused (not probed); the pool names a placeholder VM host key.
    // The VM is a web side only (no sshd for the busy check to log in to): the check is off
    // here; tests/tests/autoscale_busy.rs covers it.
    let pool = GatewayPool::builder()
        .web_pool("/api")
        .http_option("cookie_secret_file = \"keys/cookie_secret\"")
        .http_option(&format!("session_idle = \"{}s\"", SESSION_IDLE.as_secs()))
        .http_option("tentative_for = \"1s\"")
        .config_toml(&scripts.pool_toml(Duration::from_secs(15)))
        .config_toml(&format!(
            "[autoscale]\nenabled = true\nmin_vms = 0\nmax_vms = 1\nspare_vms = 0\n\
             scale_in_after = \"{scale_in}s\"\nscale_to_zero_after = \"{scale_in}s\"\n\
             tick = \"500ms\"\ncooldown = \"1s\"\nboot_estimate = \"5s\"\nhold_connect_for = \"60s\"\n\
             busy_command = []\n",
            scale_in = SCALE_IN_AFTER.as_secs(),
        ))
        .start();
    let (http, admin) = (pool.http, pool.admin);
    let stopped = |a: SocketAddr| vm_view(a)["state"].as_str() == Some("stopped");
    assert!(
        blocking(move || poll(Duration::from_secs(15), || stopped(admin))).await,
        "the pool should start at zero: {}\n{}",
        brief(&vm_view(admin)),
        pool.log()
    );

    // The browser's first request finds no VM and wakes the pool. Its "starting" page reloads
    // after Retry-After, which renews the wake-up; here the reload comes as soon as the admin API
    // shows the VM healthy, or at Retry-After, whichever is first.
    let browser = Browser::http(http);
    let woke = Instant::now();
    let healthy = |a: SocketAddr| vm_view(a)["state"].as_str() == Some("healthy");
    let mut reloads = 0;
    let r = loop {
        let (r, _) = browser.follow("/lab").await;
        if r.status != 503 {
            break r;
        }
        assert!(
            woke.elapsed() < Duration::from_secs(60),
            "the VM did not start within 60 s: {}\n{}\n--- jupyter_server log ---\n{}",
            brief(&vm_view(admin)),
            pool.log(),
            std::fs::read_to_string(root.join("server.log")).unwrap_or_default()
        );
        let retry_after: u64 = r
            .header("retry-after")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("503 without Retry-After: {:?}", r.headers));
        reloads += 1;
        let wait = Duration::from_secs(retry_after);
        blocking(move || poll(wait, || healthy(admin))).await;
    };
    assert!(reloads >= 1, "an empty pool answers 503 first");
    eprintln!(
        "pool woke: {:?} from the first request to a page from the VM ({reloads} 503 page(s))",
        woke.elapsed()
    );

    // A notebook: the page (cookie, _xsrf), a kernel, its channels websocket, one cell.
    assert_eq!(
        r.status,
        200,
        "JupyterLab through the gateway: {}",
        r.text()
    );
    assert!(
        browser.cookie("poolgate_vm", "/").is_some(),
        "no affinity cookie"
    );
    let mut ws = browser.open_kernel("", "bg-tab").await;
    let opened = Instant::now();
    let kernel_pid: u32 = run_code(
        &mut ws,
        "import os, time\ntime.sleep(1)\nprint('working')\nx = 41\nos.getpid()",
        "cell-1",
    )
    .await
    .parse()
    .expect("the kernel's pid");
    assert!(
        is_alive(kernel_pid),
        "kernel {kernel_pid} runs on this host"
    );
    let _kernel = KillPid(kernel_pid);

    // From here on: no HTTP request from the browser, only the open websocket (read, as a
    // browser does, so the server's pings are answered). The hold lasts WINDOWS_HELD windows
    // after the wake-up request stopped counting as someone waiting for the pool.
    let mut samples: Vec<Sample> = Vec::new();
    let mut unwaited: Option<Instant> = None;
    let mut next_sample = tokio::time::Instant::now();
    let held_for = WINDOW * WINDOWS_HELD;
    loop {
        let since_open = opened.elapsed();
        if since_open >= held_for && unwaited.is_some_and(|t| t.elapsed() >= held_for) {
            break;
        }
        assert!(
            since_open < Duration::from_secs(60),
            "the wake-up request still counts as waiting {since_open:?} after the websocket opened"
        );
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(_)) => {}
                other => panic!("the kernel websocket ended during the hold: {other:?}\n{}",
                                pool.log()),
            },
            _ = tokio::time::sleep_until(next_sample) => {
                next_sample += Duration::from_millis(250);
                let (vm, listed, waiting) = blocking(move || {
                    (vm_view(admin), http_sessions(admin), http_waiting(admin))
                })
                .await;
                if waiting == 0.0 {
                    unwaited.get_or_insert_with(Instant::now);
                } else {
                    unwaited = None;
                }
                samples.push(Sample {
                    at: opened.elapsed(),
                    state: vm["state"].as_str().unwrap_or("?").to_string(),
                    lifecycle: vm["lifecycle"].as_str().unwrap_or("?").to_string(),
                    draining: vm["draining"].as_bool().unwrap_or(true),
                    sessions_http: vm["sessions"]["http"].as_u64().unwrap_or(0),
                    listed_http: listed,
                });
            }
        }
    }
    let held = opened.elapsed();
    let unwaited_for = unwaited.map(|t| t.elapsed()).unwrap_or_default();
    let bad: Vec<&Sample> = samples
        .iter()
        .filter(|s| {
            s.state != "healthy"
                || s.lifecycle != "running"
                || s.draining
                || s.sessions_http < 1
                || s.listed_http < 1
        })
        .collect();
    assert!(
        bad.is_empty(),
        "with only the kernel websocket open, the VM must stay healthy with an HTTP session; \
         bad samples: {bad:?}\n{}",
        pool.log()
    );
    assert!(
        samples.len() >= 20,
        "too few samples of the admin API: {}",
        samples.len()
    );
    // Once the browser's cookie session has lapsed (no request for `session_idle`), the
    // websocket is the one session left.
    let lapsed = SESSION_IDLE + Duration::from_secs(1);
    let not_alone: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at > lapsed && (s.sessions_http != 1 || s.listed_http != 1))
        .collect();
    assert!(
        not_alone.is_empty(),
        "after {lapsed:?} only the websocket should count as a session: {not_alone:?}"
    );
    // The samples cover the whole hold; the log covers what happened between them.
    let longest_gap = samples
        .windows(2)
        .map(|w| w[1].at.saturating_sub(w[0].at))
        .max()
        .unwrap_or_default();
    assert!(
        longest_gap < Duration::from_secs(2),
        "the admin API went unsampled for {longest_gap:?}"
    );
    let log = pool.log();
    assert!(
        !log.contains("action=Drain"),
        "drained while the websocket was open:\n{log}"
    );
    assert!(!stops_file.exists(), "the stop script ran during the hold");
    eprintln!(
        "websocket held {held:?} ({:?} of it with nothing else weighing on the pool; one \
         window is {WINDOW:?}); {} samples (longest gap {longest_gap:?}), all healthy with \
         an HTTP session",
        unwaited_for,
        samples.len()
    );

    // The same kernel, with its state, still answers on the same websocket.
    let pid_again = run_code(&mut ws, "x + 1, os.getpid()", "cell-2").await;
    assert_eq!(
        pid_again,
        format!("(42, {kernel_pid})"),
        "the kernel lost its state or was restarted"
    );

    // The tab closes: the websocket's session ends, the VM is drained, then stopped.
    close(ws).await;
    let closed = Instant::now();
    assert!(
        blocking(move || poll(Duration::from_secs(5), || http_sessions(admin) == 0)).await,
        "the closed websocket still counts as a session: {}",
        brief(&vm_view(admin))
    );
    let drained = |a: SocketAddr| {
        let vm = vm_view(a);
        vm["draining"].as_bool() == Some(true)
            || matches!(vm["state"].as_str(), Some("draining" | "stopped"))
    };
    let slack = Duration::from_secs(3);
    assert!(
        blocking(move || poll(WINDOW + slack, || drained(admin))).await,
        "the VM was not drained within {:?} of the websocket closing: {}\n{}",
        WINDOW + slack,
        brief(&vm_view(admin)),
        pool.log()
    );
    let drained_after = closed.elapsed();
    assert!(
        blocking(move || poll(Duration::from_secs(20), || stopped(admin))).await,
        "the VM was not stopped after the websocket closed: {}\n{}",
        brief(&vm_view(admin)),
        pool.log()
    );
    let stopped_after = closed.elapsed();
    pool.gateway
        .wait_for_log(&format!("action=Drain(\"{VM}\")"), Duration::from_secs(5));
    pool.gateway
        .wait_for_log("result=\"stop\"", Duration::from_secs(5));
    let stops = std::fs::read_to_string(&stops_file).unwrap_or_default();
    assert_eq!(
        stops.lines().count(),
        1,
        "the stop script ran once: {stops:?}"
    );
    assert!(!pid_file.exists(), "the stop script removes the pid file");
    assert!(
        blocking(move || poll(Duration::from_secs(10), || !is_alive(kernel_pid))).await,
        "kernel {kernel_pid} survived its VM"
    );
    assert!(
        !accepts(SocketAddr::from((Ipv4Addr::LOCALHOST, vm_port))),
        "the VM's jupyter_server still listens"
    );
    eprintln!(
        "after the websocket closed: drained within {drained_after:?}, stopped after \
         {stopped_after:?}; whole test {:?}",
        began.elapsed()
    );
}

/// Closes a websocket as a browser closing its tab does: the closing handshake, then the
/// connection itself.
async fn close(mut ws: WebSocket) {
    ws.close(None).await.expect("send close");
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    drop(ws);
}
