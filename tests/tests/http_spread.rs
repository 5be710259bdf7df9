//! Load spreading over real jupyter_server VMs: new browsers go to the least-loaded VM, a
//! browser session counts as load only once its cookie comes back (API clients and monitors
//! that drop cookies do not inflate it), and plain HTTP redirects to HTTPS.

use std::collections::BTreeMap;
use std::time::Instant;

use poolgate_tests::GatewayPool;
use poolgate_tests::jupyter::*;

const COOKIE: &str = "poolgate_vm";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_new_browsers_spread_over_the_vms_by_load() {
    if !require_jupyter() {
        return;
    }
    let started = Instant::now();
    let vms = JupyterServerVm::start_all(&["js-a", "js-b", "js-c"]);
    let gw = GatewayPool::builder()
        .web_pool("/api")
        .tls()
        .web_vms(&vms)
        .start();
    eprintln!(
        "three jupyter servers and the gateway ready in {:?}",
        started.elapsed()
    );

    // Monitors and API clients that never send the cookie back: they all land on the
    // least-loaded VM, and none of them counts as a browser session.
    let monitor = gw.browser();
    for _ in 0..10 {
        monitor.clear_cookies();
        let r = monitor.get("/api/status").await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(monitor.cookie(COOKIE, "/").is_some(), "cookie offered");
    }

    // Twenty new browsers, one after the other, each making a few requests.
    let mut per_vm: BTreeMap<String, usize> = BTreeMap::new();
    let mut browsers = Vec::new();
    for _ in 0..20 {
        let b = gw.browser();
        let r = b.get("/api").await;
        assert_eq!(r.status, 200, "{}", r.text());
        let pin = b.cookie(COOKIE, "/").expect("pinned");
        for path in ["/api/status", "/api/contents", "/api/kernelspecs"] {
            let r = b.get(path).await;
            assert_eq!(r.status, 200, "{path}: {}", r.text());
            assert_eq!(b.cookie(COOKIE, "/"), Some(pin.clone()), "stays pinned");
        }
        *per_vm.entry(cookie_vm(&pin)).or_default() += 1;
        browsers.push(b);
    }
    let counts: Vec<usize> = per_vm.values().copied().collect();
    assert_eq!(per_vm.len(), 3, "every VM got browsers: {per_vm:?}");
    assert!(
        counts.iter().all(|&n| n == 6 || n == 7),
        "spread by load (7/7/6): {per_vm:?}"
    );

    // Plain HTTP redirects to the HTTPS listener, path and query kept.
    let plain = Browser::http(gw.http);
    let r = plain.get("/hub/login?next=%2Fhub%2F").await;
    assert_eq!(r.status, 308);
    assert_eq!(
        r.header("location"),
        Some(
            format!(
                "https://127.0.0.1:{}/hub/login?next=%2Fhub%2F",
                gw.https.port()
            )
            .as_str()
        )
    );
    eprintln!("spread test: {:?} ({per_vm:?})", started.elapsed());
}
