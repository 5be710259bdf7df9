//! Flow control through the gateway (see the comment at the top of gateway/src/ssh/relay/mod.rs):
//!
//! * `ssh host cat` echoing 1 GiB in both directions at once completes intact (the two relay
//!   directions must not deadlock when both are full);
//! * a client that stops reading (SIGSTOP) while the VM streams 1 GiB does not make the gateway
//!   buffer the stream: its RSS stays within baseline + 64 MiB, and the transfer completes intact
//!   after SIGCONT;
//! * an interactive command on a second channel of the same connection (OpenSSH multiplexing)
//!   stays responsive while a bulk transfer runs on the first.
//!
//! These tests move gigabytes: a machine-wide lock keeps them from running at the same time as
//! each other (each one alone saturates a small machine, and two would distort the timings).

// Test code: a failed step should abort the test at once (as in tests/src/lib.rs).
#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use poolgate_tests::*;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
/// Whole-test bound for moving 1 GiB (debug gateway: ~30 MiB/s per direction here).
const BULK_LIMIT: Duration = Duration::from_secs(110);

/// Serialises the bulk tests across test processes (nextest runs each test in its own process).
fn bulk_lock() -> File {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("poolgate-e2e-bulk.lock"))
        .expect("open the bulk-test lock file");
    let asked = Instant::now();
    let deadline = asked + Duration::from_secs(600);
    loop {
        match file.try_lock() {
            Ok(()) => {
                eprintln!("waited {:?} for the bulk-test lock", asked.elapsed());
                return file;
            }
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("bulk-test lock: {e}"),
        }
    }
}

/// Reads `from` to its end into a sha256, counting bytes; returns the digest.
fn hash_reader(mut from: impl Read + Send + 'static, count: Arc<AtomicU64>) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut sha = Sha256Stream::start();
        let mut buf = vec![0u8; 256 << 10];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    sha.write(&buf[..n]);
                    count.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        }
        sha.finish()
    })
}

/// Kills (and reaps) a child still running when dropped, after resuming it if it was stopped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = kill(Pid::from_raw(self.0.id() as i32), Signal::SIGCONT);
            kill_tree(self.0.id());
            let _ = self.0.wait();
        }
    }
}

/// Waits for `child` until `deadline`, printing progress; panics with the byte counts on timeout.
fn wait_bulk(child: &mut Child, deadline: Instant, what: &str, progress: impl Fn() -> String) {
    let mut last_report = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            assert!(
                status.success(),
                "{what} ended with {status}: {err}\n{}",
                progress()
            );
            return;
        }
        if Instant::now() >= deadline {
            panic!("{what} did not finish in time (stalled?): {}", progress());
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            eprintln!("{what}: {}", progress());
            last_report = Instant::now();
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

#[test]
fn cat_echoes_1_gib_both_ways_at_once_intact() {
    require_tools!("sshd", "ssh", "ssh-keygen", "sha256sum", "head");
    require_root!();
    let _lock = bulk_lock();
    let pool = GatewayPool::builder().vm("vm-a").users(1).start();
    let started = Instant::now();
    let deadline = started + BULK_LIMIT;

    let mut ssh = pool
        .client(1)
        .command("cat")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ssh cat");
    let mut ssh_in = ssh.stdin.take().unwrap();
    let ssh_out = ssh.stdout.take().unwrap();
    let mut ssh = Guard(ssh);
    let mut source = Guard(
        random_bytes_command(GIB, &format!("echo-{}", pool.ssh_port))
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the data generator"),
    );
    let mut random = source.0.stdout.take().unwrap();

    let sent = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    let reader = hash_reader(ssh_out, received.clone());
    let writer = {
        let sent = sent.clone();
        thread::spawn(move || {
            let mut sha = Sha256Stream::start();
            let mut buf = vec![0u8; 256 << 10];
            loop {
                let n = random.read(&mut buf).expect("read the generated data");
                if n == 0 {
                    break;
                }
                sha.write(&buf[..n]);
                if ssh_in.write_all(&buf[..n]).is_err() {
                    break;
                }
                sent.fetch_add(n as u64, Ordering::Relaxed);
            }
            drop(ssh_in); // EOF: the remote cat ends after echoing everything.
            sha.finish()
        })
    };
    let progress = || {
        format!(
            "{:.0} MiB sent, {:.0} MiB echoed back after {:?}",
            mib(sent.load(Ordering::Relaxed)),
            mib(received.load(Ordering::Relaxed)),
            started.elapsed()
        )
    };
    wait_bulk(&mut ssh.0, deadline, "ssh cat (1 GiB echo)", progress);
    let sent_digest = writer.join().unwrap();
    let echoed_digest = reader.join().unwrap();
    let _ = source.0.wait();
    assert_eq!(sent.load(Ordering::Relaxed), GIB);
    assert_eq!(received.load(Ordering::Relaxed), GIB, "{}", progress());
    assert_eq!(echoed_digest, sent_digest, "echoed data differs");
    eprintln!(
        "1 GiB echoed both ways in {:?} ({:.0} MiB/s each way)",
        started.elapsed(),
        1024.0 / started.elapsed().as_secs_f64()
    );
}

/// Samples the gateway's RSS every 50 ms in the background.
struct RssSampler {
    samples: Arc<Mutex<Vec<(Instant, u64)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (samples, stop) = (samples.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(kib) = rss_kib(pid) {
                        samples.lock().unwrap().push((Instant::now(), kib));
                    }
                    thread::sleep(Duration::from_millis(50));
                }
            })
        };
        RssSampler {
            samples,
            stop,
            thread: Some(thread),
        }
    }

    /// Largest RSS (KiB) sampled at or after `since`.
    fn max_since(&self, since: Instant) -> u64 {
        self.samples
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| *t >= since)
            .map(|(_, kib)| *kib)
            .max()
            .unwrap_or(0)
    }

    fn latest(&self) -> u64 {
        self.samples.lock().unwrap().last().map_or(0, |s| s.1)
    }

    /// Waits for the RSS to plateau after `since`: at least 3 s, and no new maximum (by more than
    /// 1 MiB) during the last 2 s; gives up waiting after 20 s (callers still assert on the
    /// numbers). Returns (peak since `since`, latest sample, time waited since `since`).
    fn plateau_after(&self, since: Instant) -> (u64, u64, Duration) {
        let mut peak = 0u64;
        let mut peak_at = Instant::now();
        while since.elapsed() < Duration::from_secs(20) {
            thread::sleep(Duration::from_millis(100));
            let now = self.max_since(since);
            if now > peak + 1024 {
                peak = now;
                peak_at = Instant::now();
            }
            if since.elapsed() >= Duration::from_secs(3)
                && peak_at.elapsed() >= Duration::from_secs(2)
            {
                break;
            }
        }
        (self.max_since(since), self.latest(), since.elapsed())
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn a_stopped_reader_keeps_gateway_memory_bounded_and_the_stream_intact() {
    require_tools!("sshd", "ssh", "ssh-keygen", "sha256sum", "head");
    require_root!();
    let _lock = bulk_lock();
    // The VM side reads the file from this machine's disk (the VMs run here).
    let data = shared_temp_dir();
    let file = data.path().join("1g.bin");
    let digest = random_file(&file, GIB);
    let pool = GatewayPool::builder().vm("vm-a").users(1).start();
    let started = Instant::now();
    let deadline = started + BULK_LIMIT;

    // Baseline: after one session, so lazily allocated per-session structures exist.
    assert_ok(&pool.client(1).run("true"), "warm-up session");
    let pid = pool.gateway.pid().unwrap();
    let baseline = rss_kib(pid).unwrap();
    let sampler = RssSampler::start(pid);

    let mut ssh = pool
        .client(1)
        .command(&format!("cat {}", file.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ssh");
    let received = Arc::new(AtomicU64::new(0));
    let reader = hash_reader(ssh.stdout.take().unwrap(), received.clone());
    let mut ssh = Guard(ssh);
    let ssh_pid = Pid::from_raw(ssh.0.id() as i32);

    wait_until(Duration::from_secs(30), "64 MiB to arrive", || {
        received.load(Ordering::Relaxed) >= 64 * MIB
    });
    kill(ssh_pid, Signal::SIGSTOP).expect("SIGSTOP ssh");
    let stopped_at = Instant::now();
    let at_stop = received.load(Ordering::Relaxed);

    let (peak_stopped, plateau, stopped_for) = sampler.plateau_after(stopped_at);
    // The client really stopped reading: only what sat in the pipe arrived meanwhile.
    let drained_while_stopped = received.load(Ordering::Relaxed) - at_stop;
    assert!(
        drained_while_stopped < 16 * MIB,
        "the stopped client kept reading: {drained_while_stopped} bytes"
    );
    kill(ssh_pid, Signal::SIGCONT).expect("SIGCONT ssh");

    wait_bulk(&mut ssh.0, deadline, "ssh cat 1 GiB", || {
        format!(
            "{:.0} MiB received after {:?}",
            mib(received.load(Ordering::Relaxed)),
            started.elapsed()
        )
    });
    let got = reader.join().unwrap();
    let peak_total = sampler.max_since(started);
    drop(sampler);
    assert_eq!(received.load(Ordering::Relaxed), GIB);
    assert_eq!(got, digest, "the stream was corrupted");

    let report = format!(
        "gateway RSS: baseline {:.1} MiB; while the client was stopped for {stopped_for:?} \
         (after {:.0} MiB): peak {:.1} MiB, plateau {:.1} MiB (+{:.1} MiB over baseline); \
         peak over the whole 1 GiB transfer {:.1} MiB; transfer took {:?}",
        baseline as f64 / 1024.0,
        mib(at_stop),
        peak_stopped as f64 / 1024.0,
        plateau as f64 / 1024.0,
        (peak_stopped.saturating_sub(baseline)) as f64 / 1024.0,
        peak_total as f64 / 1024.0,
        started.elapsed()
    );
    eprintln!("{report}");
    assert!(
        peak_stopped < baseline + 64 * 1024,
        "the gateway buffered a stalled stream: {report}"
    );
}

/// Exit status of a multiplexed `ssh` whose data was verified separately: it must be the
/// command's (the gateway holds the VM's EOF until the exit status, see
/// `ssh_session::exit_status_reaches_a_multiplexing_client_that_closes_after_eof`).
fn check_multiplexed_exit(status: std::process::ExitStatus, stderr_text: &str, what: &str) {
    assert!(status.success(), "{what}: {status}: {stderr_text}");
}

fn child_stderr(child: &mut Child) -> String {
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    err
}

#[test]
fn a_second_channel_stays_responsive_during_a_bulk_transfer_on_the_first() {
    require_tools!("sshd", "ssh", "ssh-keygen", "sha256sum", "head");
    require_root!();
    let _lock = bulk_lock();
    let data = shared_temp_dir();
    // Half a GiB each way is plenty of bulk for ~40 round trips at the debug build's speed.
    let size = 512 * MIB;
    let file = data.path().join("bulk.bin");
    let digest = random_file(&file, size);
    let pool = GatewayPool::builder().vm("vm-a").users(1).start();
    let started = Instant::now();
    let deadline = started + BULK_LIMIT;

    // One connection (the ControlMaster); every `mux` command is a new channel on it.
    let master = Multiplexed::start(&pool.client(1));
    let mux = master.client();

    // Bulk on two channels, both directions: the file goes down while it also goes up (the VM
    // side hashes what it receives).
    let mut down = mux
        .command(&format!("cat {}", file.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn bulk download");
    let down_bytes = Arc::new(AtomicU64::new(0));
    let down_hash = hash_reader(down.stdout.take().unwrap(), down_bytes.clone());
    let mut down = Guard(down);
    let mut up = mux
        .command("sha256sum")
        .stdin(File::open(&file).unwrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn bulk upload");
    let up_out = up.stdout.take().unwrap();
    let up_digest = thread::spawn(move || {
        let mut text = String::new();
        let _ = BufReader::new(up_out).read_to_string(&mut text);
        text
    });
    let mut up = Guard(up);
    let up_started = Instant::now();

    // Another channel: an interactive `cat`: a line typed comes back.
    let mut interactive = mux
        .command("cat")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn interactive cat");
    let mut typed = interactive.stdin.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    let echoed = interactive.stdout.take().unwrap();
    thread::spawn(move || {
        for line in BufReader::new(echoed).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut interactive = Guard(interactive);

    wait_until(
        Duration::from_secs(30),
        "the bulk transfer to be under way",
        || down_bytes.load(Ordering::Relaxed) >= 32 * MIB,
    );
    let mut round_trips = Vec::new();
    let mut new_channels = Vec::new();
    while matches!(down.0.try_wait(), Ok(None)) && round_trips.len() < 40 {
        let line = format!("ping {}", round_trips.len());
        let t = Instant::now();
        typed
            .write_all(format!("{line}\n").as_bytes())
            .expect("type a line");
        typed.flush().unwrap();
        let back = lines_rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no echo of {line:?} within 30 s"));
        let rtt = t.elapsed();
        assert_eq!(back, line);
        round_trips.push(rtt);
        // Every few lines, also open a brand-new channel on the busy connection.
        if round_trips.len() % 8 == 0 {
            let t = Instant::now();
            let out = run_with_timeout(
                &mut mux.command("echo $POOLGATE_VM"),
                Duration::from_secs(30),
            );
            assert_eq!(
                stdout(&out),
                "vm-a",
                "a new channel during the bulk transfer"
            );
            check_multiplexed_exit(out.status, &stderr(&out), "a new channel");
            new_channels.push(t.elapsed());
        }
        // Pace the typing (a person types; this is not a synchronisation).
        thread::sleep(Duration::from_millis(250));
    }
    let during = down_bytes.load(Ordering::Relaxed);
    drop(typed);
    let status = wait_for_exit(
        &mut interactive.0,
        Duration::from_secs(10),
        "interactive cat",
    );
    check_multiplexed_exit(status, "", "interactive cat");

    let status = wait_for_exit(
        &mut down.0,
        deadline.saturating_duration_since(Instant::now()),
        "bulk download",
    );
    let down_err = child_stderr(&mut down.0);
    assert_eq!(down_hash.join().unwrap(), digest, "bulk download corrupted");
    assert_eq!(down_bytes.load(Ordering::Relaxed), size);
    check_multiplexed_exit(status, &down_err, "bulk download");
    let status = wait_for_exit(
        &mut up.0,
        deadline.saturating_duration_since(Instant::now()),
        "bulk upload",
    );
    let up_took = up_started.elapsed();
    let up_err = child_stderr(&mut up.0);
    let remote = up_digest.join().unwrap();
    assert_eq!(
        remote.split_whitespace().next().unwrap_or_default(),
        digest,
        "bulk upload corrupted ({status}, {up_err})"
    );
    check_multiplexed_exit(status, &up_err, "bulk upload");
    drop(master);

    round_trips.sort();
    let max = *round_trips.last().expect("at least one round trip");
    let median = round_trips[round_trips.len() / 2];
    eprintln!(
        "interactive round trips during bulk ({} samples while {:.0} MiB moved down): \
         median {median:?}, max {max:?}; new channels: {new_channels:?}; \
         bulk: {:.0} MiB down + the same up, upload took {up_took:?}, all done in {:?}",
        round_trips.len(),
        mib(during),
        mib(size),
        started.elapsed()
    );
    assert!(
        round_trips.len() >= 5,
        "the bulk transfer ended before 5 round trips could be measured"
    );
    assert!(
        max < Duration::from_secs(2),
        "interactive round trip {max:?} during bulk"
    );
    assert!(
        new_channels.iter().all(|d| *d < Duration::from_secs(5)),
        "opening a channel during bulk: {new_channels:?}"
    );
}

#[test]
fn a_stopped_vm_side_reader_keeps_gateway_memory_bounded_and_the_upload_intact() {
    require_tools!("sshd", "ssh", "ssh-keygen", "sha256sum", "head");
    require_root!();
    let _lock = bulk_lock();
    let pool = GatewayPool::builder().vm("vm-a").users(1).start();
    let size = 512 * MIB;
    let started = Instant::now();
    let deadline = started + BULK_LIMIT;
    assert_ok(&pool.client(1).run("true"), "warm-up session");
    let pid = pool.gateway.pid().unwrap();
    let baseline = rss_kib(pid).unwrap();
    let sampler = RssSampler::start(pid);

    // The VM-side reader hashes what it receives; its argv[0] is a marker to find its pid (the
    // VM runs on this machine).
    let marker = format!("pgsink{}", pool.ssh_port);
    let mut ssh = pool
        .client(1)
        .command(&format!("exec -a {marker} sha256sum"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ssh");
    let mut ssh_in = ssh.stdin.take().unwrap();
    let mut ssh_out = ssh.stdout.take().unwrap();
    let mut ssh = Guard(ssh);
    let mut source = Guard(
        random_bytes_command(size, &format!("sink-{}", pool.ssh_port))
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the data generator"),
    );
    let mut random = source.0.stdout.take().unwrap();
    let sent = Arc::new(AtomicU64::new(0));
    let writer = {
        let sent = sent.clone();
        thread::spawn(move || {
            let mut sha = Sha256Stream::start();
            let mut buf = vec![0u8; 256 << 10];
            loop {
                let n = random.read(&mut buf).expect("read the generated data");
                if n == 0 {
                    break;
                }
                sha.write(&buf[..n]);
                if ssh_in.write_all(&buf[..n]).is_err() {
                    break;
                }
                sent.fetch_add(n as u64, Ordering::Relaxed);
            }
            drop(ssh_in);
            sha.finish()
        })
    };

    wait_until(Duration::from_secs(30), "64 MiB to be sent", || {
        sent.load(Ordering::Relaxed) >= 64 * MIB
    });
    let sinks = pids_with_cmdline_prefix(&marker);
    assert_eq!(sinks.len(), 1, "the VM-side reader {marker}: {sinks:?}");
    let sink = Pid::from_raw(sinks[0] as i32);
    kill(sink, Signal::SIGSTOP).expect("SIGSTOP the VM-side reader");
    let stopped_at = Instant::now();
    let at_stop = sent.load(Ordering::Relaxed);
    let (peak_stopped, plateau, stopped_for) = sampler.plateau_after(stopped_at);
    let sent_while_stopped = sent.load(Ordering::Relaxed) - at_stop;
    kill(sink, Signal::SIGCONT).expect("SIGCONT the VM-side reader");
    // What the client could still push while the reader was stopped: pipe and socket buffers and
    // SSH windows along the way, not the rest of the stream.
    assert!(
        sent_while_stopped < 32 * MIB,
        "{sent_while_stopped} bytes accepted while the VM-side reader was stopped"
    );

    wait_bulk(
        &mut ssh.0,
        deadline,
        "ssh upload to a stopped reader",
        || {
            format!(
                "{:.0} MiB sent after {:?}",
                mib(sent.load(Ordering::Relaxed)),
                started.elapsed()
            )
        },
    );
    let local = writer.join().unwrap();
    let _ = source.0.wait();
    let mut remote = String::new();
    ssh_out.read_to_string(&mut remote).unwrap();
    let peak_total = sampler.max_since(started);
    drop(sampler);
    assert_eq!(sent.load(Ordering::Relaxed), size);
    assert_eq!(
        remote.split_whitespace().next().unwrap_or_default(),
        local,
        "the VM received different data"
    );
    let report = format!(
        "gateway RSS (upload): baseline {:.1} MiB; while the VM-side reader was stopped for \
         {stopped_for:?} (after {:.0} MiB; the client pushed {:.1} MiB more meanwhile): peak \
         {:.1} MiB, plateau {:.1} MiB (+{:.1} MiB over baseline); peak over the whole transfer \
         {:.1} MiB; took {:?}",
        baseline as f64 / 1024.0,
        mib(at_stop),
        mib(sent_while_stopped),
        peak_stopped as f64 / 1024.0,
        plateau as f64 / 1024.0,
        (peak_stopped.saturating_sub(baseline)) as f64 / 1024.0,
        peak_total as f64 / 1024.0,
        started.elapsed()
    );
    eprintln!("{report}");
    assert!(
        peak_stopped < baseline + 64 * 1024,
        "the gateway buffered an upload nobody read: {report}"
    );
}

/// A command that never reads its stdin, given a big one on a multiplexed connection
/// (`ssh -S ctl host 'sleep 2' < big.file`), ends with the gateway's buffer for it full. The
/// connection must be whole again after it: an upload on another channel of the same
/// ControlMaster then runs at full speed. Before, that channel's share of the connection's
/// congestion count was left behind when the VM closed it, and every later upload on the
/// connection crawled at two bytes per round trip (16 MiB would have taken half an hour).
#[test]
fn a_channel_that_ended_with_its_stdin_unread_leaves_the_connection_whole() {
    require_tools!("sshd", "ssh", "ssh-keygen", "head");
    require_root!();
    let data = shared_temp_dir();
    let file = data.path().join("unread.bin");
    random_file(&file, 16 * MIB);
    let pool = GatewayPool::builder().vm("vm-a").users(1).start();
    let master = Multiplexed::start(&pool.client(1));
    let mux = master.client().timeout(Duration::from_secs(120));

    // More than the VM's window, the gateway's buffer and russh's queue take together.
    let out = run_with_input(
        &mut mux.command("sleep 2"),
        &std::fs::read(&file).unwrap(),
        Duration::from_secs(60),
    );
    // ssh may or may not manage to write all of stdin before the command ends; either way the
    // command itself ran to its end.
    assert!(
        matches!(out.status.code(), Some(0 | 255)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The same connection, a new channel: 16 MiB up, counted on the VM.
    let started = Instant::now();
    let out = run_with_input(
        &mut mux.command("wc -c"),
        &std::fs::read(&file).unwrap(),
        Duration::from_secs(120),
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        (16 * MIB).to_string(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        pool.log()
    );
    eprintln!(
        "16 MiB up after the unread channel: {:?}",
        started.elapsed()
    );
}
