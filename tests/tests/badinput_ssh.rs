//! Bad input on the SSH listener, against the real gateway binary: garbage, truncated and stalled
//! handshakes are closed within `ssh.login_grace`; a flood of 1 000 unauthenticated connections
//! is bounded by `ssh.max_unauthenticated` (and by its per-address share) while a real `ssh`
//! from another address gets in; repeated failed logins put the address in the penalty box
//! (counted in `poolgate_auth_failures_total`) without touching other addresses; and the
//! gateway's open file descriptors and RSS come back to their baseline afterwards.

// Test code: a failed step should abort the test at once (as in tests/src/lib.rs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use poolgate_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `ssh.login_grace` of the handshake test: short, so the bound is measurable.
const GRACE: Duration = Duration::from_secs(2);
/// Time allowed on top of a bound for scheduling on a loaded 2-core machine.
const SLACK: Duration = Duration::from_millis(1500);

/// What the gateway did with one raw connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Closed (EOF or reset) after this long.
    Closed(Duration),
    /// Still open when we stopped waiting.
    Open,
}

/// Reads (discarding) until the gateway closes the connection or `limit` passes.
fn wait_closed(stream: &mut TcpStream, started: Instant, limit: Duration) -> Fate {
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Fate::Open;
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return Fate::Closed(started.elapsed()),
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Fate::Open;
            }
            Err(_) => return Fate::Closed(started.elapsed()),
        }
    }
}

/// The gateway's identification line and its first binary packet (its KEXINIT), read from a
/// fresh connection: material for a truncated handshake that is a real SSH packet.
fn server_kexinit(addr: SocketAddr) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"SSH-2.0-poolgate-badinput-probe\r\n").unwrap();
    let mut byte = [0u8; 1];
    let mut line = Vec::new();
    while !line.ends_with(b"\n") {
        s.read_exact(&mut byte).unwrap();
        line.push(byte[0]);
    }
    assert!(line.starts_with(b"SSH-2.0-poolgate"), "{line:?}");
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let n = u32::from_be_bytes(len) as usize;
    assert!(n < 64 * 1024, "packet length {n}");
    let mut packet = vec![0u8; n];
    s.read_exact(&mut packet).unwrap();
    assert_eq!(packet[1], 20, "SSH_MSG_KEXINIT is the first packet");
    let mut whole = len.to_vec();
    whole.extend_from_slice(&packet);
    whole
}

/// A real `ssh` through the gateway, optionally from another loopback source address.
fn real_ssh_works(pool: &GatewayPool, bind: Option<&str>) {
    let mut client = pool.client(1);
    if let Some(addr) = bind {
        client = client.option(&format!("BindAddress={addr}"));
    }
    let out = client.run("echo $POOLGATE_VM");
    assert_ok(&out, "a real ssh through the gateway");
    assert_eq!(stdout(&out), "vm-a");
}

#[test]
fn garbage_truncated_and_stalled_handshakes_are_closed_within_login_grace() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let started = Instant::now();
    let pool = GatewayPool::builder()
        .vm("vm-a")
        .ssh_option(&format!("login_grace = \"{}s\"", GRACE.as_secs()))
        .start();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, pool.ssh_port));
    let kexinit = server_kexinit(addr);
    let garbage: Vec<u8> = (0..8192u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();

    // (name, bytes sent, then: close our write half?)
    let mut banner_then_half_kexinit = b"SSH-2.0-OpenSSH_9.9\r\n".to_vec();
    banner_then_half_kexinit.extend_from_slice(&kexinit[..kexinit.len() / 2]);
    let mut banner_then_garbage = b"SSH-2.0-OpenSSH_9.9\r\n".to_vec();
    banner_then_garbage.extend_from_slice(&garbage[..1024]);
    let mut huge_length = b"SSH-2.0-OpenSSH_9.9\r\n".to_vec();
    huge_length.extend_from_slice(&[0xff, 0xff, 0xff, 0xf0, 10, 20]);
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("nothing at all", Vec::new(), false),
        ("garbage instead of a banner", garbage.clone(), false),
        (
            "garbage lines instead of a banner",
            b"hello\r\n".repeat(2000),
            false,
        ),
        (
            "a banner without its line end",
            b"SSH-2.0-OpenSSH_9.9".to_vec(),
            false,
        ),
        (
            "a valid banner, then nothing",
            b"SSH-2.0-OpenSSH_9.9\r\n".to_vec(),
            false,
        ),
        ("a valid banner, then garbage", banner_then_garbage, false),
        (
            "a valid banner, then a 4 GiB packet length",
            huge_length,
            false,
        ),
        (
            "half a KEXINIT, then stalled",
            banner_then_half_kexinit.clone(),
            false,
        ),
        ("half a KEXINIT, then EOF", banner_then_half_kexinit, true),
        ("SSH-1.5 banner", b"SSH-1.5-old\r\n".to_vec(), false),
    ];
    // All at once: the bound holds for each whatever the others do.
    let handles: Vec<_> = cases
        .into_iter()
        .map(|(name, bytes, eof)| {
            std::thread::spawn(move || {
                let t0 = Instant::now();
                let mut s = TcpStream::connect(addr).unwrap();
                // A reset while writing means the gateway already closed: that is a close.
                let _ = s.write_all(&bytes);
                if eof {
                    let _ = s.shutdown(std::net::Shutdown::Write);
                }
                (name, wait_closed(&mut s, t0, GRACE + SLACK + SLACK))
            })
        })
        .collect();
    let mut worst = Duration::ZERO;
    for h in handles {
        let (name, fate) = h.join().unwrap();
        eprintln!("{name}: {fate:?}");
        match fate {
            Fate::Closed(after) => {
                assert!(
                    after <= GRACE + SLACK,
                    "{name}: closed after {after:?}, bound {:?}",
                    GRACE + SLACK
                );
                worst = worst.max(after);
            }
            Fate::Open => panic!("{name}: still open {:?} after connecting", GRACE + SLACK),
        }
    }
    eprintln!("slowest close: {worst:?} (login_grace {GRACE:?})");

    // Still serving, and nothing panicked.
    real_ssh_works(&pool, None);
    pool.assert_no_panic();
    eprintln!("handshake cases: {:?}", started.elapsed());
}

/// One raw connection of a flood: what the gateway did with it within `wait`.
#[derive(Debug)]
enum Flooded {
    /// Got the gateway's banner and is still open: it holds an unauthenticated slot.
    Held(tokio::net::TcpStream, Instant),
    /// Closed without a banner after this long.
    Dropped(Duration),
    /// Neither within the wait.
    Undecided,
}

/// `n` connections from `source` to `addr`, each sending a client banner and then nothing.
async fn flood(addr: SocketAddr, source: Ipv4Addr, n: usize, wait: Duration) -> Vec<Flooded> {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        set.spawn(async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(SocketAddr::from((source, 0))).unwrap();
            let t0 = Instant::now();
            let mut s = socket.connect(addr).await.expect("connect to the gateway");
            // A reset while writing is the gateway dropping us: read tells.
            let _ = s.write_all(b"SSH-2.0-OpenSSH_9.9 flood\r\n").await;
            let mut buf = [0u8; 64];
            match tokio::time::timeout(wait, s.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => {
                    assert!(buf[..n].starts_with(b"SSH-2.0-poolgate"), "{:?}", &buf[..n]);
                    Flooded::Held(s, t0)
                }
                Ok(_) => Flooded::Dropped(t0.elapsed()),
                Err(_) => Flooded::Undecided,
            }
        });
    }
    let mut out = Vec::with_capacity(n);
    while let Some(r) = set.join_next().await {
        out.push(r.unwrap());
    }
    out
}

/// Held connections, and the slowest drop.
fn tally(fates: &mut Vec<Flooded>) -> (Vec<(tokio::net::TcpStream, Instant)>, Duration) {
    let mut held = Vec::new();
    let mut slowest = Duration::ZERO;
    for f in fates.drain(..) {
        match f {
            Flooded::Held(s, t0) => held.push((s, t0)),
            Flooded::Dropped(d) => slowest = slowest.max(d),
            Flooded::Undecided => panic!("a flood connection got neither a banner nor a close"),
        }
    }
    (held, slowest)
}

/// Samples the gateway's open FDs and RSS every 20 ms in the background, keeping the maxima.
struct Sampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<(usize, u64)>>,
}

impl Sampler {
    fn start(pid: u32) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut fds, mut rss) = (0, 0);
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                fds = fds.max(fd_count(pid));
                rss = rss.max(rss_kib(pid).unwrap_or(0));
                std::thread::sleep(Duration::from_millis(20));
            }
            (fds, rss)
        });
        Sampler {
            stop,
            thread: Some(thread),
        }
    }

    /// (peak FDs, peak RSS KiB).
    fn finish(mut self) -> (usize, u64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

#[test]
fn a_thousand_stalled_connections_are_bounded_and_a_real_user_still_gets_in() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let started = Instant::now();
    const MAX: usize = 40;
    const SHARE: usize = MAX / 4;
    const FLOOD_GRACE: Duration = Duration::from_secs(8);
    let pool = GatewayPool::builder()
        .vm("vm-a")
        .ssh_option(&format!("login_grace = \"{}s\"", FLOOD_GRACE.as_secs()))
        .ssh_option(&format!("max_unauthenticated = {MAX}"))
        .start();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, pool.ssh_port));
    let pid = pool.gateway.pid().unwrap();
    // Baseline after one real session, so lazily made state (backend client, key caches) is in.
    real_ssh_works(&pool, None);
    pool.wait_for_sessions_ended(1, Duration::from_secs(10));
    let (fds0, rss0) = (fd_count(pid), pool.gateway_rss_kib());
    let sampler = Sampler::start(pid);
    let rt = tokio::runtime::Runtime::new().unwrap();

    // 1 000 stalled connections from one address: it gets its share of the slots, every other
    // connection is closed at once without a banner.
    let t = Instant::now();
    let mut fates = rt.block_on(flood(
        addr,
        Ipv4Addr::LOCALHOST,
        1000,
        Duration::from_secs(3),
    ));
    let (mut held, slowest_drop) = tally(&mut fates);
    eprintln!(
        "flood of 1000 from 127.0.0.1: {} held, slowest drop {slowest_drop:?}, in {:?}",
        held.len(),
        t.elapsed()
    );
    assert_eq!(
        held.len(),
        SHARE,
        "one address holds its share (max_unauthenticated / 4)"
    );
    assert!(slowest_drop < Duration::from_secs(2), "{slowest_drop:?}");

    // Meanwhile a real user from another address logs in and runs a command.
    let t = Instant::now();
    real_ssh_works(&pool, Some("127.0.0.2"));
    eprintln!(
        "real ssh from 127.0.0.2 during the flood: {:?}",
        t.elapsed()
    );

    // Many addresses together: never more than max_unauthenticated held in all.
    let t = Instant::now();
    let more = rt.block_on(async {
        let mut all = Vec::new();
        for i in 0..8u8 {
            let source = Ipv4Addr::new(127, 0, 1, 10 + i);
            all.extend(flood(addr, source, 20, Duration::from_secs(3)).await);
        }
        all
    });
    let mut more = more;
    let (held_more, slowest_more) = tally(&mut more);
    eprintln!(
        "8 addresses x 20: {} more held (total {}), slowest drop {slowest_more:?}, in {:?}",
        held_more.len(),
        held.len() + held_more.len(),
        t.elapsed()
    );
    assert_eq!(
        held.len() + held_more.len(),
        MAX,
        "ssh.max_unauthenticated in all"
    );
    held.extend(held_more);
    let (fds_peak, rss_peak) = sampler.finish();

    // Every held connection is closed by the gateway within login_grace of connecting.
    let mut slowest_close = Duration::ZERO;
    rt.block_on(async {
        for (mut s, t0) in held.drain(..) {
            let left = (FLOOD_GRACE + SLACK).saturating_sub(t0.elapsed());
            let mut buf = [0u8; 4096];
            let closed = tokio::time::timeout(left, async {
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            })
            .await;
            assert!(
                closed.is_ok(),
                "a held connection outlived login_grace + slack"
            );
            slowest_close = slowest_close.max(t0.elapsed());
        }
    });
    eprintln!(
        "held connections closed at most {slowest_close:?} after connecting (login_grace {FLOOD_GRACE:?})"
    );

    // The slots are free again: a real ssh from the flooding address itself gets in.
    real_ssh_works(&pool, None);
    pool.wait_for_sessions_ended(3, Duration::from_secs(10));

    // FDs come back to the baseline (a few for timers/log rotation at most); RSS does not grow
    // per connection: 1 160 connections at even 16 KiB each would be 18 MiB.
    wait_until(
        Duration::from_secs(10),
        "the gateway's FDs back near the baseline",
        || fd_count(pid) <= fds0 + 4,
    );
    let (fds1, rss1) = (fd_count(pid), pool.gateway_rss_kib());
    eprintln!(
        "gateway FDs: before {fds0}, peak {fds_peak}, after {fds1}; RSS KiB: before {rss0}, peak {rss_peak}, after {rss1}"
    );
    assert!(
        fds_peak <= fds0 + MAX + 64,
        "peak FDs {fds_peak}: excess connections must be closed at accept, not held"
    );
    assert!(
        rss1 <= rss0 + 16 * 1024,
        "RSS after the flood {rss1} KiB vs {rss0} KiB before"
    );
    let log = pool.log();
    assert!(
        log.contains("too many connections still authenticating"),
        "the drop is logged"
    );
    // Logged once per burst, not once per dropped connection.
    let drop_lines = log
        .matches("too many connections still authenticating")
        .count();
    assert!(
        drop_lines < 20,
        "{drop_lines} drop lines: the log is flooded too"
    );
    pool.assert_no_panic();
    eprintln!("flood test: {:?}", started.elapsed());
}

/// `poolgate_auth_failures_total{method="<method>"}` from a /metrics text (0 when absent).
fn auth_failures(metrics: &str, method: &str) -> u64 {
    let prefix = format!("poolgate_auth_failures_total{{method=\"{method}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
}

#[test]
fn repeated_failed_logins_put_the_address_in_the_penalty_box_and_no_other() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let started = Instant::now();
    let pool = GatewayPool::builder().vm("vm-a").start();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, pool.ssh_port));
    let before = auth_failures(&pool.metrics(), "publickey");
    // Documented (docs/security.md): more than 10 failed logins within a minute put the address
    // in the penalty box for 30 s. Eleven attackers with a key nobody authorized, at once.
    const FAILURES: usize = 11;
    let wrong = UserKey::generate("pgtest-attacker");
    let attackers: Vec<_> = (0..FAILURES)
        .map(|_| {
            let mut cmd = pool
                .client_as(&pool.user(1))
                .user_key(&wrong)
                .command("true");
            std::thread::spawn(move || run_with_timeout(&mut cmd, Duration::from_secs(30)))
        })
        .collect();
    for a in attackers {
        let out = a.join().unwrap();
        assert_eq!(out.status.code(), Some(255), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("Permission denied"),
            "{}",
            stderr(&out)
        );
    }
    pool.gateway.wait_for_log(
        "too many failed logins from this address",
        Duration::from_secs(10),
    );
    let t_boxed = Instant::now();

    // From 127.0.0.1 even the right key is now refused: the connection is closed at accept,
    // without a banner, at once (no delay to hold the attacker's sockets).
    let t = Instant::now();
    let mut raw = TcpStream::connect(addr).unwrap();
    let fate = wait_closed(&mut raw, t, Duration::from_secs(3));
    assert!(
        matches!(fate, Fate::Closed(d) if d < Duration::from_secs(1)),
        "a raw connection from the boxed address: {fate:?}"
    );
    let t = Instant::now();
    let out = pool.client(1).run("true");
    let refused_after = t.elapsed();
    assert_eq!(out.status.code(), Some(255), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("Connection closed") || stderr(&out).contains("reset"),
        "{}",
        stderr(&out)
    );
    eprintln!("right key from the boxed 127.0.0.1: refused in {refused_after:?}");

    // Another address is not affected.
    real_ssh_works(&pool, Some("127.0.0.2"));

    // Counted: one publickey failure per attacker.
    let after = auth_failures(&pool.metrics(), "publickey");
    assert!(
        after - before >= FAILURES as u64,
        "poolgate_auth_failures_total{{method=\"publickey\"}} went {before} -> {after}"
    );
    let log = pool.log();
    let boxed_line = log
        .lines()
        .find(|l| l.contains("too many failed logins from this address"))
        .unwrap();
    assert!(has_field(boxed_line, "client", "127.0.0.1"), "{boxed_line}");
    assert!(has_field(boxed_line, "penalty_s", "30"), "{boxed_line}");
    // Everything above happened well inside the 30 s penalty.
    assert!(t_boxed.elapsed() < Duration::from_secs(25));
    pool.assert_no_panic();
    eprintln!(
        "brute force: {} failures counted, test {:?}",
        after - before,
        started.elapsed()
    );
}

#[test]
fn keys_offered_before_the_right_one_are_no_failed_login() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let pool = GatewayPool::builder().vm("vm-a").users(1).start();
    let before = auth_failures(&pool.metrics(), "publickey");
    // A user with other keys (GitHub's, an old laptop's): OpenSSH offers each in turn, and the
    // gateway refuses the offers of those not in authorized_keys before the right one logs in.
    let others: Vec<UserKey> = (0..3)
        .map(|i| UserKey::generate(&format!("pgtest-other-{i}")))
        .collect();
    let started = Instant::now();
    assert_ok(
        &pool.client(1).run("echo in"),
        "login with the right key alone",
    );
    let alone = started.elapsed();
    let mut client = pool.client(1);
    for key in &others {
        client = client.option(&format!(
            "IdentityFile={}",
            key.private_key_path().display()
        ));
    }
    let started = Instant::now();
    let out = client.option("LogLevel=DEBUG1").run("echo in");
    let after_others = started.elapsed();
    assert_ok(&out, "login with three other keys offered first");
    eprintln!("login: {alone:?} with the right key alone, {after_others:?} after three others");
    // Each refused offer is answered at once, as OpenSSH's sshd does: no 1 s delay per key
    // (3 s here), which russh applies to every refusal unless told otherwise.
    assert!(
        after_others < alone + Duration::from_millis(1500),
        "three refused key offers cost {:?}",
        after_others.saturating_sub(alone)
    );
    assert_eq!(stdout(&out), "in");
    let offered = stderr(&out).matches("Offering public key").count();
    assert_eq!(
        offered,
        4,
        "the other keys were offered first:\n{}",
        stderr(&out)
    );
    wait_until(Duration::from_secs(10), "both sessions to end", || {
        pool.log().matches("ssh session ended").count() >= 2
    });
    assert_eq!(
        auth_failures(&pool.metrics(), "publickey"),
        before,
        "a login counted as failed authentications"
    );
    let log = pool.log();
    assert!(!log.contains("authentication failed"), "{log}");

    // A connection that offers only keys nobody authorized is one failed authentication.
    let out = pool
        .client_as(&pool.user(1))
        .user_key(&others[0])
        .run("true");
    assert_eq!(out.status.code(), Some(255), "{}", stderr(&out));
    assert!(
        poll(Duration::from_secs(10), || auth_failures(
            &pool.metrics(),
            "publickey"
        ) == before + 1),
        "{}",
        pool.metrics()
    );
    pool.gateway.wait_for_log(
        "login failed: no key the client offered is authorized",
        Duration::from_secs(10),
    );
}
