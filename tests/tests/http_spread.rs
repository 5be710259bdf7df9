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

/// A browser can be sent to a VM by name (`/poolgate/vm/NAME`): back to a kernel left running
/// on it, or to what a colleague sees. Twenty browsers at once, each naming a VM, land and stay
/// where they asked; a VM that cannot take them is refused with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_sent_to_a_named_vm_stay_there_or_are_told_why_not() {
    if !require_jupyter() {
        return;
    }
    let names = ["js-a", "js-b", "js-c"];
    let vms = JupyterServerVm::start_all(&names);
    // A file in each VM's root tells which VM answered a listing.
    for vm in &vms {
        std::fs::write(vm.root().join(format!("served-by-{}.txt", vm.name())), "")
            .expect("marker file");
    }
    let gw = GatewayPool::builder()
        .web_pool("/api")
        .tls()
        .web_vms(&vms)
        .start();

    let browsers: Vec<(Browser, &str)> = (0..20).map(|i| (gw.browser(), names[i % 3])).collect();
    let landed = futures_util::future::join_all(browsers.iter().map(|(b, vm)| async move {
        let r = b.get(&format!("/poolgate/vm/{vm}")).await;
        assert_eq!(r.status, 303, "{}", r.text());
        assert_eq!(r.header("location"), Some("/"));
        let pin = b
            .cookie(COOKIE, "/")
            .expect("pinned by the named VM's page");
        assert_eq!(cookie_vm(&pin), *vm);
        let mut served = Vec::new();
        for _ in 0..3 {
            let r = b.get("/api/contents").await;
            assert_eq!(r.status, 200, "{}", r.text());
            let listing = r.text();
            served.extend(
                names
                    .iter()
                    .filter(|n| listing.contains(&format!("served-by-{n}.txt")))
                    .map(|n| n.to_string()),
            );
        }
        (vm.to_string(), served)
    }))
    .await;
    for (vm, served) in &landed {
        assert_eq!(served, &vec![vm.clone(); 3], "a browser that named {vm}");
    }

    // A browser pinned elsewhere moves when it names another VM.
    let (b, _) = &browsers[0];
    let r = b.get("/poolgate/vm/js-c").await;
    assert_eq!(r.status, 303);
    assert!(
        b.get("/api/contents")
            .await
            .text()
            .contains("served-by-js-c.txt")
    );

    // Not in the pool: 404, naming the pool's VMs. Drained: 503, saying so.
    let stranger = gw.browser();
    let r = stranger.get("/poolgate/vm/js-z").await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(
        r.text()
            .contains("no VM js-z in the pool (its VMs: js-a, js-b, js-c)"),
        "{}",
        r.text()
    );
    assert!(
        stranger.cookie(COOKIE, "/").is_none(),
        "no pin for a refused name"
    );
    let entry = gw.api_post("js-b", "drain");
    assert_eq!(entry["draining"].as_bool(), Some(true), "{entry}");
    let r = stranger.get("/poolgate/vm/js-b").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        r.text().contains("js-b takes no new sessions: draining"),
        "{}",
        r.text()
    );
}
