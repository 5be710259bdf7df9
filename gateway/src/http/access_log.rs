//! The access log (`http.access_log`): one line per proxied request, written off the request
//! path.
//!
//! A request formats its line straight into a shared byte buffer (a short lock, no allocation
//! once the buffer has grown) and goes on. A dedicated thread takes the whole buffer when
//! [`WRITE_AT`] bytes are waiting or [`FLUSH_AFTER`] after the first waiting line, whichever
//! comes first, and writes it with one system call while requests fill the other buffer. A
//! destination that cannot keep up (a slow disk, a stuck pipe) never holds up a request: past
//! [`QUEUE_LIMIT`] waiting bytes lines are dropped and counted
//! (`poolgate_access_log_dropped_total`).

use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use hyper::{Method, Version};
use prometheus::IntCounter;

/// The `tracing` target whose filter governs the access log on standard error.
pub const TARGET: &str = "poolgate::http::access";
/// Bytes waiting beyond which lines are dropped.
const QUEUE_LIMIT: usize = 1 << 20;
/// The writer wakes once this many bytes wait.
const WRITE_AT: usize = 32 << 10;
/// ... or this long after the first waiting line.
const FLUSH_AFTER: Duration = Duration::from_millis(250);
/// Writes to a pipe or socket are at most this long, so that they stay atomic (`PIPE_BUF`) and
/// never cut a line of the log written by other threads to the same standard error.
const PIPE_WRITE: usize = 4096;

/// Lines as JSON objects (`--log-format json`) rather than text.
static JSON: AtomicBool = AtomicBool::new(false);

/// Formats lines as JSON, like the log (`--log-format json`). Called once at start.
pub fn use_json(json: bool) {
    JSON.store(json, Ordering::Relaxed);
}

/// One proxied request, as logged.
pub struct Record<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub status: u16,
    pub vm: &'a str,
    pub elapsed: Duration,
    pub client: SocketAddr,
    pub version: Version,
}

/// An open access log. Dropping it writes what is still waiting.
pub struct AccessLog {
    shared: Arc<Shared>,
    json: bool,
    writer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("json", &self.json)
            .finish_non_exhaustive()
    }
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    dropped: IntCounter,
}

#[derive(Default)]
struct State {
    /// Lines waiting for the writer.
    pending: Vec<u8>,
    /// When the oldest waiting line was added.
    since: Option<Instant>,
    closed: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl AccessLog {
    /// The access log on standard error, if the log filter lets [`TARGET`] through at `info`.
    pub fn stderr(dropped: IntCounter) -> std::io::Result<Option<Self>> {
        if !tracing::enabled!(target: TARGET, tracing::Level::INFO) {
            return Ok(None);
        }
        use std::os::fd::AsFd;
        let fd = std::io::stderr().as_fd().try_clone_to_owned()?;
        Self::start(File::from(fd), dropped).map(Some)
    }

    /// The access log appended to `path` (created mode 640 if missing).
    pub fn file(path: &Path, dropped: IntCounter) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o640)
            .open(path)?;
        Self::start(file, dropped)
    }

    fn start(out: File, dropped: IntCounter) -> std::io::Result<Self> {
        use std::os::unix::fs::FileTypeExt;
        let kind = out.metadata()?.file_type();
        let chunk = if kind.is_fifo() || kind.is_socket() {
            PIPE_WRITE
        } else {
            usize::MAX
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            dropped,
        });
        let writer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("access-log".into())
                .spawn(move || write_loop(&shared, out, chunk))?
        };
        Ok(Self {
            shared,
            json: JSON.load(Ordering::Relaxed),
            writer: Some(writer),
        })
    }

    /// Adds one line; never waits for the destination.
    pub fn log(&self, record: &Record<'_>) {
        let now = SystemTime::now();
        let mut state = self.shared.lock();
        let start = state.pending.len();
        if self.json {
            json_line(&mut state.pending, now, record);
        } else {
            text_line(&mut state.pending, now, record);
        }
        let len = state.pending.len();
        if len > QUEUE_LIMIT {
            state.pending.truncate(start);
            drop(state);
            self.shared.dropped.inc();
            return;
        }
        let first = start == 0;
        if first {
            state.since = Some(Instant::now());
        }
        drop(state);
        // The writer sleeps without a deadline while nothing waits, and until the deadline
        // after that: wake it for the first line and once a write's worth has gathered.
        if first || (start < WRITE_AT && len >= WRITE_AT) {
            self.shared.wake.notify_one();
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// The writer thread: waits for a batch, swaps it out, writes it.
fn write_loop(shared: &Shared, mut out: File, chunk: usize) {
    let mut batch = Vec::with_capacity(WRITE_AT * 2);
    let mut failing = false;
    loop {
        let closed = {
            let mut state = shared.lock();
            loop {
                if state.closed {
                    break;
                }
                let Some(since) = state.since else {
                    state = shared.wake.wait(state).unwrap_or_else(|p| p.into_inner());
                    continue;
                };
                let waited = since.elapsed();
                if state.pending.len() >= WRITE_AT || waited >= FLUSH_AFTER {
                    break;
                }
                state = shared
                    .wake
                    .wait_timeout(state, FLUSH_AFTER - waited)
                    .map_or_else(|p| p.into_inner().0, |(s, _)| s);
            }
            std::mem::swap(&mut state.pending, &mut batch);
            state.since = None;
            state.closed
        };
        if !batch.is_empty() {
            let result = batch.chunks(chunk).try_for_each(|part| out.write_all(part));
            match result {
                Ok(()) => failing = false,
                Err(e) => {
                    let lines = batch.iter().filter(|&&b| b == b'\n').count();
                    shared.dropped.inc_by(lines as u64);
                    if !failing {
                        tracing::warn!("http.access_log: cannot write access-log lines: {e}");
                    }
                    failing = true;
                }
            }
            batch.clear();
            // A burst can grow the buffers; do not keep more than a few batches' worth.
            batch.shrink_to(WRITE_AT * 4);
        }
        if closed {
            return;
        }
    }
}

/// `2026-12-04T06:59:31.123456Z  INFO poolgate::http::access: request method=GET path=/
/// status=200 vm=vm-1 ms=0.532 client=10.0.0.9:51234 proto=HTTP/1.1`, as the log's text lines.
fn text_line(out: &mut Vec<u8>, now: SystemTime, r: &Record<'_>) {
    let _ = write!(
        out,
        "{}  INFO {TARGET}: request method={} path={} status={} vm={} ms=",
        humantime::format_rfc3339_micros(now),
        r.method,
        r.path,
        r.status,
        r.vm,
    );
    millis(out, r.elapsed);
    let _ = writeln!(out, " client={} proto={:?}", r.client, r.version);
}

/// The same as one JSON object, as the log's `--log-format json` lines.
fn json_line(out: &mut Vec<u8>, now: SystemTime, r: &Record<'_>) {
    let _ = write!(
        out,
        "{{\"timestamp\":\"{}\",\"level\":\"INFO\",\"message\":\"request\",\"method\":",
        humantime::format_rfc3339_micros(now)
    );
    json_str(out, r.method.as_str());
    out.extend_from_slice(b",\"path\":");
    json_str(out, r.path);
    let _ = write!(out, ",\"status\":{},\"vm\":", r.status);
    json_str(out, r.vm);
    out.extend_from_slice(b",\"ms\":");
    millis(out, r.elapsed);
    let _ = writeln!(
        out,
        ",\"client\":\"{}\",\"proto\":\"{:?}\",\"target\":\"{TARGET}\"}}",
        r.client, r.version
    );
}

/// Milliseconds with three decimals, without float formatting.
fn millis(out: &mut Vec<u8>, elapsed: Duration) {
    let micros = elapsed.as_micros();
    let mut digits = itoa::Buffer::new();
    out.extend_from_slice(digits.format(micros / 1000).as_bytes());
    out.push(b'.');
    let frac = digits.format(micros % 1000 + 1000);
    out.extend_from_slice(&frac.as_bytes()[1..]);
}

/// A JSON string literal.
fn json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => {
                let mut buf = [0; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(path: &str) -> Record<'_> {
        Record {
            method: &Method::GET,
            path,
            status: 200,
            vm: "vm-1",
            elapsed: Duration::from_micros(1_532),
            client: ([10, 0, 0, 9], 51234).into(),
            version: Version::HTTP_11,
        }
    }

    fn counter() -> IntCounter {
        IntCounter::new("dropped", "test").unwrap()
    }

    #[test]
    fn text_lines_read_like_the_log() {
        let mut out = Vec::new();
        let at = SystemTime::UNIX_EPOCH + Duration::from_micros(1_764_831_571_123_456);
        text_line(&mut out, at, &record("/user/bea/lab"));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "2025-12-04T06:59:31.123456Z  INFO poolgate::http::access: request method=GET \
             path=/user/bea/lab status=200 vm=vm-1 ms=1.532 client=10.0.0.9:51234 \
             proto=HTTP/1.1\n"
        );
    }

    #[test]
    fn json_lines_are_json_with_the_same_fields() {
        let mut out = Vec::new();
        json_line(&mut out, SystemTime::now(), &record("/a\"b\\c"));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["path"], "/a\"b\\c");
        assert_eq!(v["status"], 200);
        assert_eq!(v["ms"], 1.532);
        assert_eq!(v["client"], "10.0.0.9:51234");
        assert_eq!(v["proto"], "HTTP/1.1");
        assert_eq!(v["target"], TARGET);
        assert!(out.ends_with(b"}\n"));
    }

    #[test]
    fn millis_keep_leading_zeros() {
        for (micros, text) in [
            (0, "0.000"),
            (7, "0.007"),
            (1_050, "1.050"),
            (12_345_678, "12345.678"),
        ] {
            let mut out = Vec::new();
            millis(&mut out, Duration::from_micros(micros));
            assert_eq!(String::from_utf8(out).unwrap(), text);
        }
    }

    #[test]
    fn lines_reach_the_file_and_the_rest_at_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let log = AccessLog::file(&path, counter()).unwrap();
        log.log(&record("/first"));
        // Written within the flush delay, without more lines coming.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&path).unwrap().contains("/first") {
            assert!(
                Instant::now() < deadline,
                "the first line was never written"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        for i in 0..1000 {
            log.log(&record(&format!("/n/{i}")));
        }
        drop(log);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 1001);
        assert!(text.lines().all(|l| l.ends_with("proto=HTTP/1.1")));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640);
    }

    #[test]
    fn a_stuck_destination_drops_and_counts_instead_of_waiting() {
        // A pipe nobody reads: the writer blocks once the pipe is full, the queue fills, and
        // requests go on, their lines counted as dropped.
        let (reader, writer) = std::io::pipe().unwrap();
        let dropped = counter();
        let log = AccessLog::start(
            File::from(std::os::fd::OwnedFd::from(writer)),
            dropped.clone(),
        )
        .unwrap();
        let started = Instant::now();
        let n = 40_000;
        for i in 0..n {
            log.log(&record(&format!("/n/{i}")));
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "logging waited for the destination"
        );
        assert!(dropped.get() > 0, "nothing dropped");
        // Everything not dropped arrives once the pipe is read.
        let reading = std::thread::spawn(move || std::io::read_to_string(reader).unwrap());
        drop(log);
        let text = reading.join().unwrap();
        assert_eq!(text.lines().count() as u64 + dropped.get(), n);
        assert!(text.lines().all(|l| l.ends_with("proto=HTTP/1.1")));
    }
}
