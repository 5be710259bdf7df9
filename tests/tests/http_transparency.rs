//! Transparency: the same Jupyter cases run directly against a real jupyter_server and through
//! the gateway (HTTPS) give the same answers — statuses, the headers Jupyter's clients rely on,
//! bodies, kernel results.

use std::time::Instant;

use poolgate_tests::GatewayPool;
use poolgate_tests::jupyter::*;
use serde_json::json;

/// What one case observed, compared between the direct and the gateway runs.
type Observed = Vec<(String, String)>;

/// `tag` names the files this run creates (both runs use the same server).
async fn cases(b: &Browser, tag: &str) -> Observed {
    let mut seen: Observed = Vec::new();
    let mut note = |what: &str, value: String| seen.push((what.to_string(), value));

    let r = b.get("/api").await;
    note("GET /api", format!("{} {}", r.status, r.json()["version"]));
    let r = b.get("/api/nope").await;
    note("GET /api/nope", r.status.to_string());
    let r = b.send("HEAD", "/api/contents", &[], "").await;
    note(
        "HEAD /api/contents",
        format!("{} {:?}", r.status, r.body.len()),
    );

    // The page that sets `_xsrf`, then XSRF-protected writes with and without the token.
    let (r, path) = b.follow("/lab").await;
    note("GET /lab", format!("{} {path}", r.status));
    note("_xsrf set", b.cookie("_xsrf", "/api").is_some().to_string());
    let r = b
        .send(
            "POST",
            "/api/contents",
            &[("content-type", "application/json")],
            json!({"type": "directory"}).to_string(),
        )
        .await;
    note("POST /api/contents without token", r.status.to_string());
    let r = b
        .api("POST", "/api/contents", Some(&json!({"type": "directory"})))
        .await;
    note("POST /api/contents with token", r.status.to_string());

    // A 1 MiB file up and down; gzip negotiation of a static asset.
    let data: Vec<u8> = (0..1 << 20).map(|i| (i % 253) as u8).collect();
    let body = json!({"type": "file", "format": "base64",
                      "content": data_encoding::BASE64.encode(&data)});
    let r = b
        .api("PUT", &format!("/api/contents/one-{tag}.bin"), Some(&body))
        .await;
    note("PUT one.bin", r.status.to_string());
    let r = b
        .get(&format!(
            "/api/contents/one-{tag}.bin?content=1&format=base64&type=file"
        ))
        .await;
    let back = data_encoding::BASE64
        .decode(
            r.json()["content"]
                .as_str()
                .unwrap_or("")
                .replace('\n', "")
                .as_bytes(),
        )
        .unwrap_or_default();
    note("GET one.bin", format!("{} {}", r.status, back == data));
    let r = b
        .send(
            "GET",
            "/api/contents?type=directory",
            &[("accept-encoding", "gzip")],
            "",
        )
        .await;
    note(
        "gzip",
        format!("{} {:?}", r.status, r.header("content-encoding")),
    );

    // A kernel round trip over its websocket.
    note("kernel 6*7", execute(b, "", "6*7").await);
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jupyter_answers_the_same_directly_and_through_the_gateway() {
    if !require_jupyter() {
        return;
    }
    let started = Instant::now();
    let vm = JupyterServerVm::start("js-t");
    let gw = GatewayPool::builder()
        .web_pool("/api")
        .tls()
        .web_vm(vm.name(), vm.port())
        .start();

    let direct = cases(&Browser::http(vm.addr()), "direct").await;
    let through = cases(&gw.browser(), "gateway").await;
    for ((what, d), (_, t)) in direct.iter().zip(&through) {
        assert_eq!(d, t, "{what}: direct {d:?}, through the gateway {t:?}");
    }
    assert_eq!(direct.len(), through.len());
    eprintln!("observed (both ways): {direct:?}");
    // And the cases did what they should.
    let get = |what: &str| {
        direct
            .iter()
            .find(|(w, _)| w == what)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    };
    assert_eq!(get("kernel 6*7"), "42");
    assert_eq!(get("POST /api/contents with token"), "201");
    assert_eq!(get("GET one.bin"), "200 true");
    eprintln!("transparency: {:?} — {direct:?}", started.elapsed());
}
