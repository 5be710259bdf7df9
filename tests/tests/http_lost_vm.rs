//! A VM lost without a word under open websockets: its host is cut off from the network (no
//! FIN, no RST ever arrives) while a browser has two kernels' channels websockets open to it.
//! On one the browser sends nothing; on the other it runs a cell just as the VM goes, so the
//! gateway's message to the VM waits for an acknowledgement that never comes.
//!
//! - The idle one: the gateway's TCP keepalive on its VM connections notices within about a
//!   minute (probes after 30 s without traffic, every 10 s, 3 unanswered).
//! - The one sending: keepalive sends no probe while data waits to be acknowledged, and TCP
//!   alone would retransmit for about 15 minutes (`tcp_retries2`). The VM connections' TCP user
//!   timeout (60 s, keepalive's own bound) ends it in about a minute too.
//!
//! Both websockets are closed, for JupyterLab to reconnect. Meanwhile the probes have marked
//! the VM down: the browser's session there ends once no websocket holds it, and its next
//! request is answered at once. Without keepalive the idle websocket waited to read forever,
//! holding a session on the lost VM until the gateway restarted.
//!
//! Only a real loss of packets shows this: a process that is stopped or killed still has its
//! kernel answer TCP. So the VM's jupyter_server runs in a network namespace of the test's own
//! ([`VmNetwork`]), joined to the host's by a veth pair, and the loss is its end of the pair
//! going down:
//!
//! ```text
//!   host namespace                                   VM namespace (pgl<pid>v)
//!   ──────────────                                   ────────────────────────
//!   test browser ─► poolgate 127.0.0.1:<https>       jupyter-server <vm addr>:8888
//!              <host addr> ═══════ veth ═══════ <vm addr>
//! ```
//!
//! The veth pair and the namespace are deleted on drop, also when the test fails.

// Test code: a failed step should abort the test at once (as in tests/src/lib.rs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use poolgate_tests::jupyter::*;
use poolgate_tests::*;

const VM_PORT: u16 = 8888;
/// Keepalive's 30 s + 3 × 10 s (and the TCP user timeout's 60 s), and room for a loaded
/// machine.
const NOTICED_WITHIN: Duration = Duration::from_secs(90);

/// jupyter_server (as [`JupyterServerVm::command`] runs it) listening on `VM_ADDR:VM_PORT`
/// inside the VM's namespace; killed with its kernels on drop.
struct NamespacedServer {
    child: Child,
    root: tempfile::TempDir,
}

impl NamespacedServer {
    /// Starts the server in `net`'s namespace, listening on the VM's address.
    fn start(net: &VmNetwork) -> Self {
        let addr = net.vm_addr;
        let root = tempfile::Builder::new()
            .prefix("poolgate-lost-vm-")
            .tempdir()
            .expect("temp dir");
        let base = JupyterServerVm::command(VM_PORT, root.path());
        let mut server = Command::new(base.get_program());
        for arg in base.get_args() {
            if arg == "--ServerApp.ip=127.0.0.1" {
                server.arg(format!("--ServerApp.ip={addr}"));
            } else {
                server.arg(arg);
            }
        }
        server.envs(base.get_envs().filter_map(|(k, v)| Some((k, v?))));
        let mut cmd = net.exec(&server);
        let log = std::fs::File::create(root.path().join("server.log")).expect("server log");
        cmd.current_dir(root.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let mut server = NamespacedServer {
            child: cmd.spawn().expect("ip netns exec jupyter-server"),
            root,
        };
        let addr = SocketAddr::from((addr, VM_PORT));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if try_http_request(addr, "GET", "/api", &[]).is_ok_and(|r| r.status == 200) {
                return server;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("jupyter-server exited ({status}):\n{}", server.log());
            }
            assert!(
                Instant::now() < deadline,
                "jupyter-server in {} did not answer within 60 s:\n{}",
                net.ns,
                server.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.root.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for NamespacedServer {
    fn drop(&mut self) {
        kill_tree(self.child.id());
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_to_a_vm_lost_without_a_word_idle_or_sending_are_closed_within_a_minute_and_a_half()
 {
    require_tools!("ip");
    require_root!();
    if !require_jupyter() {
        return;
    }
    let net = VmNetwork::create();
    let vm_addr = net.vm_addr;
    let server = tokio::task::block_in_place(|| NamespacedServer::start(&net));
    // The defaults, probes included.
    let gw = GatewayPool::builder()
        .web_probe_defaults("/api")
        .tls()
        .web_vm_at("lost", &vm_addr.to_string(), VM_PORT)
        .start_async()
        .await;

    let b = gw.browser();
    let (r, _) = b.follow("/lab").await;
    assert_eq!(r.status, 200, "the page: {}", r.text());
    let mut idle = b.open_kernel("", "lost-vm-idle").await;
    assert_eq!(run_code(&mut idle, "6*7", "cell-1").await, "42");
    let mut sending = b.open_kernel("", "lost-vm-sending").await;
    assert_eq!(run_code(&mut sending, "6*8", "cell-1").await, "48");
    assert_eq!(gw.vm_json("lost")["sessions"]["http"].as_u64(), Some(1));

    // The host is lost; the browser waits on one kernel and runs a cell on the other.
    net.cut();
    let lost = Instant::now();
    ws_send(
        &mut sending,
        execute_request("6*9", "cell-2", "lost-vm-sending").to_string(),
    )
    .await;
    let ends = |ws| async move {
        let mut ws = ws;
        let closed = tokio::time::timeout(NOTICED_WITHIN, async {
            while ws_next_text(&mut ws).await.is_some() {}
        })
        .await;
        closed.is_ok().then(|| lost.elapsed())
    };
    let (idle_closed, sending_closed) = tokio::join!(ends(idle), ends(sending));
    for (what, closed) in [("idle", idle_closed), ("sending", sending_closed)] {
        let noticed = closed.unwrap_or_else(|| {
            panic!(
                "the {what} websocket to the lost VM is still open {NOTICED_WITHIN:?} later\n{}",
                gw.gateway.log_text()
            )
        });
        eprintln!("the {what} websocket to the lost VM closed {noticed:?} after the loss");
        // Keepalive and the TCP user timeout, not anything sooner: nothing is given up on
        // before 30 s without an answer.
        assert!(noticed >= Duration::from_secs(30), "{what}: {noticed:?}");
    }

    // The probes marked the VM down long before. With the websocket gone, the browser's
    // session there ends too, although the browser sends nothing (a closed laptop would not):
    // a down VM keeps no session for `session_idle`.
    gw.gateway.wait_for_vm_down("lost", Duration::from_secs(5));
    tokio::task::block_in_place(|| {
        gw.wait_for_vm(
            "lost",
            "without the browser's session, 20 s after its websocket closed",
            Duration::from_secs(20),
            |v| v["sessions"]["http"].as_u64().unwrap_or(0) == 0,
        )
    });
    eprintln!(
        "the browser's session on the lost VM ended {:?} after the loss",
        lost.elapsed()
    );
    // Its next request is told at once that no VM is available.
    let r = b.get("/api/status").await;
    assert_eq!(r.status, 503, "{}", r.text());
    drop(server);
    drop(net);
}
