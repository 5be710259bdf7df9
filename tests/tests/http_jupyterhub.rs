//! JupyterHub behind the gateway, for real: two hubs (jupyterhub + configurable-http-proxy +
//! SimpleLocalProcessSpawner single-user servers) as pool VMs on 127.0.0.1, the gateway with TLS
//! from a test CA in front, and a browser-like client.
//!
//! One browser logs in, spawns its server (following the spawn progress event stream), opens
//! JupyterLab (the OAuth dance between hub and single-user server), runs `1+1` over the kernel
//! websocket, echoes through a terminal websocket, makes XSRF-protected calls, uploads and
//! downloads 50 MiB through the contents API — all pinned to one hub. Then that hub is stopped
//! and the next request lands on the other one with a rewritten cookie.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use poolgate_tests::GatewayPool;
use poolgate_tests::jupyter::*;
use serde_json::json;

const USER: &str = "ann";
const COOKIE: &str = "poolgate_vm";

/// Logs in through the hub's login form, starts the user's server through the hub API and
/// follows the spawn progress stream until the server is ready, then opens JupyterLab.
async fn log_in_and_spawn(b: &Browser, user: &str) {
    let r = b.get("/hub/login").await;
    assert_eq!(r.status, 200, "login page: {}", r.text());
    let xsrf = b.cookie("_xsrf", "/hub/login").expect("the hub sets _xsrf");
    let r = b
        .post_form(
            "/hub/login?next=",
            &[
                ("username", user),
                ("password", HUB_PASSWORD),
                ("_xsrf", &xsrf),
            ],
        )
        .await;
    assert_eq!(r.status, 302, "login: {}", r.text());
    assert!(
        b.cookie("jupyterhub-hub-login", "/hub/").is_some(),
        "logged in"
    );

    let r = b
        .api("POST", &format!("/hub/api/users/{user}/server"), None)
        .await;
    assert!(
        r.status == 201 || r.status == 202,
        "spawn: {} {}",
        r.status,
        r.text()
    );

    // Spawn progress: server-sent events, streamed through the gateway as they come.
    let resp = b
        .send_streaming(
            "GET",
            &format!("/hub/api/users/{user}/server/progress"),
            &[("accept", "text/event-stream")],
            Bytes::new(),
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap_or("")
            .starts_with("text/event-stream")
    );
    let mut body = resp.into_body();
    let mut events = String::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !events.contains("\"ready\": true") && !events.contains("\"ready\":true") {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = tokio::time::timeout(left, body.frame())
            .await
            .unwrap_or_else(|_| panic!("server not ready within 120 s; events:\n{events}"));
        match frame {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    events.push_str(&String::from_utf8_lossy(d));
                }
            }
            _ => panic!("progress stream ended before ready:\n{events}"),
        }
    }
    assert!(events.contains("data: "), "{events}");

    let (r, path) = b.follow(&format!("/user/{user}/lab")).await;
    assert_eq!(r.status, 200, "JupyterLab at {path}: {}", r.text());
    assert!(path.starts_with(&format!("/user/{user}/lab")), "{path}");
    assert!(r.text().contains("JupyterLab"), "not JupyterLab: {path}");
}

/// Opens a terminal and echoes through its websocket.
async fn terminal_echo(b: &Browser, user: &str) {
    let r = b
        .api("POST", &format!("/user/{user}/api/terminals"), None)
        .await;
    assert_eq!(r.status, 200, "new terminal: {}", r.text());
    let name = r.json()["name"]
        .as_str()
        .expect("terminal name")
        .to_string();
    let mut ws = b
        .websocket(&format!("/user/{user}/terminals/websocket/{name}"))
        .await;
    ws_send(
        &mut ws,
        json!(["stdin", "echo pool$((6*7))gate\r"]).to_string(),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut screen = String::new();
    while !screen.contains("pool42gate") {
        let left = deadline.saturating_duration_since(Instant::now());
        let text = tokio::time::timeout(left, ws_next_text(&mut ws))
            .await
            .unwrap_or_else(|_| panic!("no echo within 30 s; terminal showed:\n{screen}"))
            .expect("terminal websocket open");
        if let Ok(serde_json::Value::Array(m)) = serde_json::from_str(&text)
            && m.first().and_then(|v| v.as_str()) == Some("stdout")
        {
            screen.push_str(m.get(1).and_then(|v| v.as_str()).unwrap_or(""));
        }
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jupyterhub_pool_through_the_gateway() {
    if !require_jupyter() {
        return;
    }
    let started = Instant::now();
    let mut hubs = JupyterHubVm::start_all(&["hub-a", "hub-b"]);
    let gw = GatewayPool::builder()
        .web_pool("/hub/health")
        .tls()
        .web_vms(&hubs)
        .start();
    eprintln!("two hubs and the gateway ready in {:?}", started.elapsed());

    let b = gw.browser();
    log_in_and_spawn(&b, USER).await;
    let pin = b
        .cookie(COOKIE, "/")
        .expect("the gateway pinned the browser");
    let pinned = cookie_vm(&pin);
    let (on, other) = if pinned == hubs[0].name() {
        (0, 1)
    } else {
        (1, 0)
    };
    eprintln!(
        "logged in and spawned on {pinned} at {:?}",
        started.elapsed()
    );

    assert_eq!(execute(&b, &format!("/user/{USER}"), "1+1").await, "2");
    terminal_echo(&b, USER).await;

    // XSRF: the same POST without the token is refused by the single-user server, with it
    // (cookie + X-XSRFToken header passed unchanged by the gateway) it succeeds.
    let no_token = b
        .send(
            "POST",
            &format!("/user/{USER}/api/contents"),
            &[("content-type", "application/json")],
            json!({"type": "notebook"}).to_string(),
        )
        .await;
    assert_eq!(no_token.status, 403, "{}", no_token.text());
    let r = b
        .api(
            "POST",
            &format!("/user/{USER}/api/contents"),
            Some(&json!({"type": "notebook"})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());

    // 50 MiB through the contents API (base64 in JSON, one request), then back as a download.
    let data = pattern(50 << 20);
    let t = Instant::now();
    let body = json!({
        "type": "file", "format": "base64", "name": "big.bin", "path": "big.bin",
        "content": data_encoding::BASE64.encode(&data),
    });
    let r = b
        .api(
            "PUT",
            &format!("/user/{USER}/api/contents/big.bin"),
            Some(&body),
        )
        .await;
    assert!(
        r.status == 201 || r.status == 200,
        "upload: {} {}",
        r.status,
        r.text()
    );
    let on_disk = std::fs::read(hubs[on].home(USER).join("big.bin")).expect("uploaded file");
    assert!(on_disk == data, "the uploaded file differs");
    eprintln!("50 MiB upload in {:?}", t.elapsed());
    let t = Instant::now();
    let r = b.get(&format!("/user/{USER}/files/big.bin")).await;
    assert_eq!(r.status, 200);
    assert!(r.body[..] == data[..], "the downloaded file differs");
    eprintln!("50 MiB download in {:?}", t.elapsed());

    // Every request of this browser stayed on one hub.
    assert_eq!(b.cookie(COOKIE, "/"), Some(pin.clone()), "cookie unchanged");
    let other_log = hubs[other].log_text();
    assert!(
        !other_log.contains(&format!("/user/{USER}")) && !other_log.contains("logged in"),
        "requests of the browser reached {}:\n{other_log}",
        hubs[other].name()
    );

    // The pinned hub goes down: the next request lands on the other hub, with a new cookie.
    hubs[on].stop();
    let r = b.get("/hub/login").await;
    assert_eq!(r.status, 200, "after failover: {}", r.text());
    let new_pin = b.cookie(COOKIE, "/").expect("cookie");
    assert_ne!(new_pin, pin, "cookie rewritten");
    assert_eq!(cookie_vm(&new_pin), hubs[other].name());
    // And it stays there.
    let r = b.get("/hub/login").await;
    assert_eq!(r.status, 200);
    assert_eq!(b.cookie(COOKIE, "/"), Some(new_pin));
    eprintln!("jupyterhub pool test: {:?}", started.elapsed());
}
