//! HTTP faults with real jupyter_server VMs behind the gateway (HTTPS, test CA).
//!
//! - A VM killed under its browsers: a POST in flight on it gets a 502 page naming the VM, a
//!   GET in flight is sent again and answered by the healthy VM, its websocket closes, the
//!   browser is re-pinned to the healthy VM (a new signed cookie) and stays there; browsers on
//!   the other VM never notice (requests and a kernel websocket keep working).
//! - A VM that accepts TCP and never answers (SIGSTOP): its browser gets a 504 after
//!   `http.response_header_timeout`, while other browsers' requests keep their usual latency;
//!   once the probes mark it down the browser is re-pinned.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use poolgate_tests::jupyter::*;
use poolgate_tests::{
    GatewayPool, WEB_PROBE_INTERVAL, blocking, send_signal, unread_bytes_on_port,
};

const COOKIE: &str = "poolgate_vm";
/// `http.response_header_timeout` of the hung-VM test.
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// The fixture's `[health]`: `interval = 500ms`, `timeout = 500ms`, `fall = 2`.
const INTERVAL: Duration = WEB_PROBE_INTERVAL;
const PROBE_TIMEOUT: Duration = WEB_PROBE_INTERVAL;
const FALL: u32 = 2;

/// The pid of the jupyter-server listening on `port` (from its command line).
fn server_pid(port: u16) -> u32 {
    let flag = format!("--ServerApp.port={port}");
    std::fs::read_dir("/proc")
        .expect("read /proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| c.split(|b| *b == 0).any(|arg| arg == flag.as_bytes()))
                .unwrap_or(false)
        })
        .unwrap_or_else(|| panic!("no jupyter-server process with {flag}"))
}

/// A browser whose session is counted on a VM; returns it with the VM its cookie names.
async fn pinned_browser(gw: &GatewayPool) -> (Arc<Browser>, String) {
    let b = gw.browser();
    let r = b.get("/api").await;
    assert_eq!(r.status, 200, "{}", r.text());
    // The cookie comes back: from now on the browser is a session on its VM.
    let r = b.get("/api/status").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let vm = cookie_vm(&b.cookie(COOKIE, "/").expect("pinned"));
    (Arc::new(b), vm)
}

/// GET `path` and check it came from `vm` (200, cookie unchanged and naming `vm`); latency.
async fn get_on(b: &Browser, path: &str, vm: &str) -> Duration {
    let started = Instant::now();
    let r = b.get(path).await;
    let took = started.elapsed();
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    assert_eq!(cookie_vm(&b.cookie(COOKIE, "/").expect("cookie")), vm);
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_vm_fails_its_post_in_flight_with_502_resends_its_get_and_repins_the_browser() {
    if !require_jupyter() {
        return;
    }
    let started = Instant::now();
    let mut vms = blocking(|| JupyterServerVm::start_all(&["js-a", "js-b"])).await;
    let gw = GatewayPool::builder()
        .web_pool("/api")
        .tls()
        .web_vms(&vms)
        .start_async()
        .await;
    let (a, vm) = pinned_browser(&gw).await;
    assert_eq!(vm, "js-a");
    let (b, vm) = pinned_browser(&gw).await;
    assert_eq!(vm, "js-b", "the second browser goes to the less-loaded VM");

    // Browser B works with a kernel over a websocket on js-b; browser A has an events
    // websocket open on js-a.
    let (r, _) = b.follow("/lab").await;
    assert_eq!(r.status, 200, "the page that sets _xsrf");
    let mut kernel_ws = b.open_kernel("", "s1").await;
    assert_eq!(run_code(&mut kernel_ws, "1+1", "before").await, "2");
    let mut events_a = a.websocket("/api/events/subscribe").await;

    // Two requests of browser A reach js-a and wait there (the server is frozen, their bytes
    // sit unread in two sockets: a big header tells them from the health probes'), then js-a is
    // killed with everything under it. The POST is not safe to send again: it fails with the
    // 502 page. The GET is (idempotent, no body): the gateway sends it again, cannot connect to
    // js-a, and answers it from js-b.
    let js_a = vms[0].port();
    send_signal(server_pid(js_a), Signal::SIGSTOP);
    let pad = "x".repeat(4000);
    let post_in_flight = tokio::spawn({
        let (a, pad) = (a.clone(), pad.clone());
        async move {
            a.send(
                "POST",
                "/api/contents",
                &[("x-pad", &pad), ("content-type", "application/json")],
                "{\"type\": \"notebook\"}",
            )
            .await
        }
    });
    let get_in_flight = tokio::spawn({
        let a = a.clone();
        async move { a.send("GET", "/api/status", &[("x-pad", &pad)], "").await }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while unread_bytes_on_port(js_a)
        .iter()
        .filter(|&&n| n >= 4000)
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "the requests never reached js-a");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let old_cookie = a.cookie(COOKIE, "/").expect("cookie");
    let killed = Instant::now();
    tokio::task::block_in_place(|| vms[0].stop());

    let r = post_in_flight.await.expect("request task");
    let failed_after = killed.elapsed();
    let page = r.text();
    assert_eq!(r.status, 502, "{page}");
    assert!(
        page.contains("The VM did not answer")
            && page.contains("poolgate could not get an answer from VM js-a"),
        "a clear page naming the VM: {page}"
    );
    let r = get_in_flight.await.expect("request task");
    let resent_after = killed.elapsed();
    assert_eq!(
        r.status,
        200,
        "the GET in flight is answered by js-b: {}",
        r.text()
    );
    // The log's own thread writes the line; the answer may arrive first.
    gw.gateway.wait_for_log(
        "connection to the VM broke before an answer",
        Duration::from_secs(10),
    );
    let log = gw.gateway.log_text();
    let resend = log
        .lines()
        .find(|l| l.contains("connection to the VM broke before an answer"))
        .unwrap_or_else(|| panic!("the resend is logged:\n{log}"));
    // The line names the client connection, as every line logged about one does.
    assert!(
        resend.contains("http{client.addr=127.0.0.1:") && resend.contains("vm=js-a"),
        "the resend's line names the client and the VM: {resend}"
    );
    let closed = tokio::time::timeout(Duration::from_secs(10), ws_next_text(&mut events_a))
        .await
        .expect("the websocket on js-a ends");
    assert_eq!(closed, None, "the websocket on the killed VM is closed");

    // Browser B never noticed: HTTP and its kernel websocket go on.
    get_on(&b, "/api/status", "js-b").await;
    assert_eq!(run_code(&mut kernel_ws, "6*7", "after").await, "42");

    // Browser A is re-pinned to js-b with a new signed cookie, and stays there.
    let repinned = Instant::now();
    let r = a.get("/api/status").await;
    let repin_took = repinned.elapsed();
    assert_eq!(r.status, 200, "{}", r.text());
    let new_cookie = a.cookie(COOKIE, "/").expect("cookie");
    assert_ne!(new_cookie, old_cookie, "the cookie is rewritten");
    assert_eq!(cookie_vm(&new_cookie), "js-b");
    for _ in 0..3 {
        get_on(&a, "/api/contents", "js-b").await;
        assert_eq!(
            a.cookie(COOKIE, "/"),
            Some(new_cookie.clone()),
            "stays pinned"
        );
    }
    eprintln!(
        "killed VM: in-flight POST failed (502) {failed_after:?} after the kill, in-flight GET \
         answered by js-b {resent_after:?} after it; next request in {repin_took:?}; test {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_that_never_answers_costs_its_browser_one_504_and_stalls_nobody_else() {
    if !require_jupyter() {
        return;
    }
    let started = Instant::now();
    let vms = blocking(|| JupyterServerVm::start_all(&["js-a", "js-b"])).await;
    let gw = GatewayPool::builder()
        .web_pool("/api")
        .tls()
        .web_vms(&vms)
        .http_option(&format!(
            "response_header_timeout = \"{}s\"",
            HEADER_TIMEOUT.as_secs()
        ))
        .start_async()
        .await;
    let (a, vm) = pinned_browser(&gw).await;
    assert_eq!(vm, "js-a");
    let (b, vm) = pinned_browser(&gw).await;
    assert_eq!(vm, "js-b");
    let mut usual = Duration::ZERO;
    for _ in 0..5 {
        usual = usual.max(get_on(&b, "/api/status", "js-b").await);
    }

    // js-a freezes: TCP connections are still accepted (kernel backlog), nothing answers.
    let pid = server_pid(vms[0].port());
    send_signal(pid, Signal::SIGSTOP);
    let frozen = Instant::now();
    let stuck = tokio::spawn({
        let a = a.clone();
        async move {
            let r = a.get("/api/status").await;
            (r, frozen.elapsed())
        }
    });
    let log_has_down = || {
        gw.gateway
            .log_text()
            .lines()
            .any(|l| l.contains("VM is down") && l.contains("vm=js-a"))
    };
    // Browser B meanwhile (and when the gateway marks js-a down).
    let mut worst = Duration::ZERO;
    let mut during = 0;
    let mut down_after = None;
    while !stuck.is_finished() {
        worst = worst.max(get_on(&b, "/api/status", "js-b").await);
        during += 1;
        if down_after.is_none() && log_has_down() {
            down_after = Some(frozen.elapsed());
        }
    }
    let (r, took) = stuck.await.expect("request task");
    eprintln!(
        "hung VM: browser A got {} after {took:?} (response_header_timeout {HEADER_TIMEOUT:?}); \
         browser B: {during} requests meanwhile, worst {worst:?} (usual worst {usual:?})",
        r.status
    );
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(
        r.text().contains("The VM took too long to answer"),
        "{}",
        r.text()
    );
    assert!(
        took >= HEADER_TIMEOUT && took <= HEADER_TIMEOUT + Duration::from_secs(1),
        "504 after {took:?}, response_header_timeout {HEADER_TIMEOUT:?}"
    );
    assert!(during >= 3, "browser B made only {during} requests");
    assert!(
        worst < Duration::from_secs(1),
        "browser B stalled while js-a hung: {worst:?}"
    );

    // The probes mark js-a down within fall × interval + timeout; A is then re-pinned.
    let down_bound = INTERVAL * FALL + PROBE_TIMEOUT + Duration::from_millis(500);
    let deadline = Instant::now() + Duration::from_secs(10);
    while down_after.is_none() {
        if log_has_down() {
            down_after = Some(frozen.elapsed());
        }
        assert!(Instant::now() < deadline, "js-a never marked down");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let down_after = down_after.unwrap_or_default();
    assert!(
        down_after <= down_bound,
        "js-a down after {down_after:?} (bound fall x interval + timeout + 0.5 s = {down_bound:?})"
    );
    let old = a.cookie(COOKIE, "/").expect("cookie");
    let repin = get_on(&a, "/api/status", "js-b").await;
    assert_ne!(a.cookie(COOKIE, "/"), Some(old), "a new signed cookie");
    assert!(repin < Duration::from_secs(1), "re-pin took {repin:?}");
    let c = gw.browser();
    let r = c.get("/api").await;
    assert_eq!(r.status, 200);
    assert_eq!(cookie_vm(&c.cookie(COOKIE, "/").expect("cookie")), "js-b");
    send_signal(pid, Signal::SIGCONT);
    eprintln!(
        "hung VM: js-a down {down_after:?} after the freeze; A re-pinned in {repin:?}; test {:?}",
        started.elapsed()
    );
}
