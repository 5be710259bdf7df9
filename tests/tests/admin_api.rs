//! The admin API on a live gateway: the bearer token from `admin.token_file` guards `/api/v1`
//! (raw HTTP and the `poolgate` CLI), and `/api/v1/sessions` lists the real SSH sessions with
//! their user, VM and growing byte counts.

use std::time::{Duration, Instant};

use poolgate_tests::*;
use serde_json::Value;

const TOKEN: &str = "pg-admin-7f3c9b2e41d8";

#[test]
fn admin_api_and_cli_need_the_bearer_token_from_admin_token_file() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let started = Instant::now();
    let pool = GatewayPool::builder()
        .vm("vm-a")
        .users(1)
        .admin_token(TOKEN)
        .start();
    let token_file = pool.token_file().expect("token file").to_path_buf();

    // Raw HTTP/1.1.
    let bare = http_get(pool.admin, "/api/v1/vms");
    assert_eq!(bare.status, 401, "no token: {}", bare.body);
    assert!(
        bare.header("www-authenticate")
            .is_some_and(|v| v.starts_with("Bearer")),
        "{:?}",
        bare.headers
    );
    assert!(bare.json()["error"].as_str().is_some(), "{}", bare.body);
    for wrong in ["Bearer not-the-token", "Basic cGd0ZXN0OnB3", TOKEN] {
        let r = http_request(
            pool.admin,
            "GET",
            "/api/v1/vms",
            &[("Authorization", wrong)],
        );
        assert_eq!(r.status, 401, "Authorization: {wrong}: {}", r.body);
    }
    let r = http_request(pool.admin, "POST", "/api/v1/vms/vm-a/drain", &[]);
    assert_eq!(r.status, 401, "drain without a token: {}", r.body);
    let bearer = format!("Bearer {TOKEN}");
    let ok = http_request(
        pool.admin,
        "GET",
        "/api/v1/vms",
        &[("Authorization", &bearer)],
    );
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert!(
        ok.header("content-type")
            .is_some_and(|v| v.starts_with("application/json"))
    );
    let list = ok.json();
    assert_eq!(list.items().len(), 1, "{list}");
    assert_eq!(list[0]["name"].as_str(), Some("vm-a"));
    assert_eq!(
        list[0]["state"].as_str(),
        Some("healthy"),
        "the drain without a token did nothing"
    );
    let r = http_request(
        pool.admin,
        "GET",
        "/api/v1/sessions",
        &[("Authorization", &bearer)],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    // The probes and the metrics stay open (loopback listener), as documented.
    assert_eq!(http_get(pool.admin, "/healthz").status, 200);
    assert_eq!(http_get(pool.admin, "/metrics").status, 200);

    // The status page names users and VMs: it needs the token too. A browser is asked for
    // Basic credentials (the token as the password); Bearer works for scripts.
    let user = pool.user(1);
    let held = SshSession::hold(&pool.client(1));
    for path in ["/status", "/"] {
        let r = http_get(pool.admin, path);
        assert_eq!(r.status, 401, "{path} without a token: {}", r.body);
        assert!(
            r.header("www-authenticate")
                .is_some_and(|v| v.starts_with("Basic")),
            "{:?}",
            r.headers
        );
        assert!(
            !r.body.contains(&user),
            "{path} leaked the user: {}",
            r.body
        );
    }
    let wrong = format!("Basic {}", data_encoding::BASE64.encode(b"ops:not-it"));
    let r = http_request(pool.admin, "GET", "/status", &[("Authorization", &wrong)]);
    assert_eq!(r.status, 401, "{}", r.body);
    let basic = format!(
        "Basic {}",
        data_encoding::BASE64.encode(format!("ops:{TOKEN}").as_bytes())
    );
    for auth in [&basic, &bearer] {
        let page = http_request(pool.admin, "GET", "/status", &[("Authorization", auth)]);
        assert_eq!(page.status, 200, "{}", page.body);
        assert!(
            page.body.contains("vm-a") && page.body.contains(&user),
            "{}",
            page.body
        );
    }
    held.end();

    // The CLI: without --token-file it fails and says what to pass; with it, it works.
    let out = pool.cli(&["status"]);
    assert!(
        !out.status.success(),
        "status without a token succeeded: {}",
        stdout(&out)
    );
    assert!(
        stderr(&out).contains("--token-file"),
        "the error should name --token-file: {}",
        stderr(&out)
    );
    let out = pool.cli(&["drain", "vm-a"]);
    assert!(!out.status.success(), "drain without a token succeeded");
    assert!(stderr(&out).contains("--token-file"), "{}", stderr(&out));
    assert_eq!(pool.vm_state("vm-a"), "healthy");

    let file = token_file.to_str().expect("UTF-8 path");
    let out = pool.cli(&["status", "--token-file", file]);
    assert_ok(&out, "poolgate status --token-file");
    let table = stdout(&out);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("vm-a") && l.contains("healthy")),
        "{table}"
    );
    let out = pool.cli(&["drain", "vm-a", "--token-file", file]);
    assert_ok(&out, "poolgate drain --token-file");
    assert_eq!(pool.vm_state("vm-a"), "draining");
    let out = pool.cli(&["undrain", "vm-a", "--token-file", file]);
    assert_ok(&out, "poolgate undrain --token-file");
    assert_eq!(pool.vm_state("vm-a"), "healthy");

    // Mistakes get clear answers, not a 200 or a hang.
    let auth = [("Authorization", bearer.as_str())];
    let r = http_request(pool.admin, "POST", "/api/v1/vms/no-such-vm/drain", &auth);
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(r.body.contains("no-such-vm"), "{}", r.body);
    let r = http_request(pool.admin, "GET", "/api/v1/vms/vm-a/drain", &auth);
    assert_eq!(r.status, 405, "{}", r.body);
    let out = pool.cli(&["drain", "no-such-vm", "--token-file", file]);
    assert!(!out.status.success(), "drain of an unknown VM succeeded");
    assert!(stderr(&out).contains("no-such-vm"), "{}", stderr(&out));
    eprintln!("token test: {:?}", started.elapsed());
}

/// The entry of session `id` in `/api/v1/sessions`.
fn session_entry(pool: &GatewayPool, id: u64) -> Value {
    let list = pool.sessions_json();
    list.items()
        .iter()
        .find(|s| s["id"].as_u64() == Some(id))
        .cloned()
        .unwrap_or_else(|| panic!("session {id} not in /api/v1/sessions: {list}"))
}

#[test]
fn admin_sessions_api_lists_open_ssh_sessions_with_growing_byte_counts() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let started = Instant::now();
    let pool = GatewayPool::builder()
        .vm("vm-a")
        .vm("vm-b")
        .users(2)
        .start();
    assert_eq!(pool.sessions_json().items().len(), 0);

    let mut one = SshSession::hold(&pool.client(1));
    let two = SshSession::hold(&pool.client(2));
    assert_ne!(
        one.vm, two.vm,
        "two users, two idle VMs: least-loaded spreads them"
    );
    let list = pool.sessions_json();
    assert_eq!(list.items().len(), 2, "{list}");
    let now_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let mut id_one = None;
    for (i, s) in [(1, &one), (2, &two)] {
        let user = pool.user(i);
        let entry = list
            .items()
            .iter()
            .find(|e| e["user"].as_str() == Some(user.as_str()))
            .unwrap_or_else(|| panic!("no session of {user}: {list}"));
        assert_eq!(entry["vm"].as_str(), Some(s.vm.as_str()), "{entry}");
        assert_eq!(entry["protocol"].as_str(), Some("ssh"), "{entry}");
        let started_unix = entry["started_unix"].as_u64().expect("started_unix");
        assert!(
            started_unix <= now_unix && now_unix - started_unix < 120,
            "{entry}"
        );
        if i == 1 {
            id_one = entry["id"].as_u64();
        }
    }
    let id_one = id_one.expect("session id");

    // Data flows through session one: its counters grow by at least what went each way.
    let before = session_entry(&pool, id_one);
    let (up0, down0) = (
        before["bytes_up"].as_u64().expect("bytes_up"),
        before["bytes_down"].as_u64().expect("bytes_down"),
    );
    let payload = vec![b'z'; 100_000];
    one.send(&payload);
    let echoed = poll(Duration::from_secs(20), || one.received() >= payload.len());
    assert!(echoed, "only {} bytes echoed", one.received());
    let mut after = Value::Null;
    let grown = poll(Duration::from_secs(10), || {
        after = session_entry(&pool, id_one);
        after["bytes_up"].as_u64().unwrap_or(0) >= up0 + payload.len() as u64
            && after["bytes_down"].as_u64().unwrap_or(0) >= down0 + payload.len() as u64
    });
    assert!(
        grown,
        "bytes did not grow by {}: before {before}, after {after}",
        payload.len()
    );
    eprintln!("session bytes: before {before}\nafter {after}");
    let other = pool
        .sessions_json()
        .items()
        .iter()
        .find(|s| s["id"].as_u64() != Some(id_one))
        .cloned()
        .expect("the other session");
    assert!(
        other["bytes_up"].as_u64().unwrap_or(u64::MAX) < 1000,
        "the idle session did not carry the data: {other}"
    );

    // Ended sessions leave the list.
    one.end();
    two.end();
    let mut last = Value::Null;
    let empty = poll(Duration::from_secs(10), || {
        last = pool.sessions_json();
        last.items().is_empty()
    });
    assert!(empty, "sessions still listed after they ended: {last}");
    eprintln!("sessions test: {:?}", started.elapsed());
}
