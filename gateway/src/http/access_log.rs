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
//!
//! A log written to a file follows rotation: before each write the thread checks that the path
//! still names the file it has open, and when it does not (logrotate's default renames the file
//! and makes a new one; an operator may remove it) it opens the path again, so the next lines
//! go to the new file with no signal or restart. `copytruncate` needs nothing: the file is
//! opened for appending, so writes go on at the new end.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
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
/// How long the path may name no file before the writer makes a new one itself: a rotation
/// that renames the file and then creates the next keeps the file it made (its owner and mode).
const MISSING_GRACE: Duration = Duration::from_secs(1);
/// How long closing the log (at shutdown) waits for the lines still waiting to be written: a
/// destination that takes none (a pipe nobody reads) must not keep the gateway from exiting.
const DRAIN_AT_CLOSE: Duration = Duration::from_secs(5);

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
    /// The client's address as `SocketAddr` displays it, made once per connection rather than
    /// formatted for each line.
    pub client: &'a str,
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
    /// Wakes the writer.
    wake: Condvar,
    /// Wakes a close waiting for the writer to finish.
    finished: Condvar,
    dropped: IntCounter,
}

#[derive(Default)]
struct State {
    /// Lines waiting for the writer.
    pending: Vec<u8>,
    /// When the oldest waiting line was added.
    since: Option<Instant>,
    closed: bool,
    /// The writer has written everything after `closed` and ended.
    done: bool,
    /// The timestamp's text down to the second, formatted once a second.
    clock: Clock,
}

/// `YYYY-MM-DDTHH:MM:SS` of the last second a line was logged in: lines are written many
/// times a second, the date's formatting is needed once.
#[derive(Default)]
struct Clock {
    second: u64,
    text: [u8; 19],
}

impl Clock {
    /// Appends `now` as the log writes it: RFC 3339 with microseconds, in UTC.
    fn push(&mut self, out: &mut Vec<u8>, now: SystemTime) {
        let since = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let second = since.as_secs();
        if second != self.second || self.text[0] == 0 {
            let whole = SystemTime::UNIX_EPOCH + Duration::from_secs(second);
            let text = humantime::format_rfc3339_seconds(whole).to_string();
            if let Some(date) = text.as_bytes().get(..19) {
                self.text.copy_from_slice(date);
                self.second = second;
            }
        }
        out.extend_from_slice(&self.text);
        out.push(b'.');
        let mut digits = itoa::Buffer::new();
        // Six digits with leading zeros: formatted with a leading 1, which is dropped.
        let micros = digits.format(since.subsec_micros() + 1_000_000);
        out.extend_from_slice(&micros.as_bytes()[1..]);
        out.push(b'Z');
    }
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
        Self::start(Destination::new(File::from(fd), None)?, dropped).map(Some)
    }

    /// The access log appended to `path` (created mode 640 if missing), and to the file found
    /// there after a rotation.
    pub fn file(path: &Path, dropped: IntCounter) -> std::io::Result<Self> {
        let (out, followed) = Followed::open(path)?;
        Self::start(Destination::new(out, Some(followed))?, dropped)
    }

    fn start(out: Destination, dropped: IntCounter) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            finished: Condvar::new(),
            dropped,
        });
        let writer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("access-log".into())
                .spawn(move || {
                    // Set on the way out however the loop ends (a panic included), so that a
                    // close never waits in vain.
                    struct Done(Arc<Shared>);
                    impl Drop for Done {
                        fn drop(&mut self) {
                            self.0.lock().done = true;
                            self.0.finished.notify_all();
                        }
                    }
                    let done = Done(shared);
                    write_loop(&done.0, out);
                })?
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
        let State { pending, clock, .. } = &mut *state;
        if self.json {
            json_line(pending, clock, now, record);
        } else {
            text_line(pending, clock, now, record);
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
    /// Writes what is still waiting, for at most [`DRAIN_AT_CLOSE`].
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.closed = true;
        self.shared.wake.notify_one();
        let deadline = Instant::now() + DRAIN_AT_CLOSE;
        while !state.done {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = self
                .shared
                .finished
                .wait_timeout(state, left)
                .map_or_else(|p| p.into_inner().0, |(s, _)| s);
        }
        let done = state.done;
        drop(state);
        if done {
            if let Some(writer) = self.writer.take() {
                let _ = writer.join();
            }
        } else {
            // Stuck in a write: left to end with the process.
            tracing::warn!(
                "http.access_log: the lines still waiting could not be written within {}s; \
                 they are given up",
                DRAIN_AT_CLOSE.as_secs()
            );
        }
    }
}

/// Where the writer thread writes.
struct Destination {
    out: File,
    /// Bytes per write: [`PIPE_WRITE`] to a pipe or socket, else the whole batch.
    chunk: usize,
    /// The path the file was opened from, when it was.
    followed: Option<Followed>,
}

impl Destination {
    fn new(out: File, followed: Option<Followed>) -> std::io::Result<Self> {
        Ok(Self {
            chunk: chunk_for(&out)?,
            out,
            followed,
        })
    }

    /// Writes one batch, after changing to the file now at the followed path if there is one.
    fn write(&mut self, batch: &[u8]) -> std::io::Result<()> {
        if let Some(followed) = &mut self.followed
            && let Some(out) = followed.moved(&self.out)
        {
            // A FIFO made at the path writes in pieces like standard error; a file at once.
            self.chunk = chunk_for(&out).unwrap_or(PIPE_WRITE);
            self.out = out;
        }
        batch
            .chunks(self.chunk)
            .try_for_each(|part| self.out.write_all(part))
    }
}

fn chunk_for(out: &File) -> std::io::Result<usize> {
    use std::os::unix::fs::FileTypeExt;
    let kind = out.metadata()?.file_type();
    Ok(if kind.is_fifo() || kind.is_socket() {
        PIPE_WRITE
    } else {
        usize::MAX
    })
}

/// The file behind `http.access_log = PATH`, followed across rotations.
struct Followed {
    path: PathBuf,
    /// Device and inode of the open file: the path names it as long as they match.
    id: (u64, u64),
    /// Since when the path has named no file.
    missing_since: Option<Instant>,
    /// Reopening has failed (and was reported) since it last worked.
    failing: bool,
}

impl Followed {
    /// The open file has no name left (it was removed, not renamed).
    fn removed(open: &File) -> bool {
        use std::os::unix::fs::MetadataExt;
        open.metadata().is_ok_and(|meta| meta.nlink() == 0)
    }

    fn open(path: &Path) -> std::io::Result<(File, Self)> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o640)
            .open(path)?;
        let meta = file.metadata()?;
        let followed = Self {
            path: path.to_owned(),
            id: (meta.dev(), meta.ino()),
            missing_since: None,
            failing: false,
        };
        Ok((file, followed))
    }

    /// The file to write to from now on, when the path no longer names the open one: a file
    /// made there after a rotation, a new one at once when the open file was removed, or a new
    /// one once the path has named no file for [`MISSING_GRACE`] after a rename. `None`: keep
    /// writing to the open file.
    fn moved(&mut self, open: &File) -> Option<File> {
        use std::os::unix::fs::MetadataExt;
        match std::fs::metadata(&self.path) {
            Ok(meta) if (meta.dev(), meta.ino()) == self.id => {
                self.missing_since = None;
                return None;
            }
            Ok(_) => {}
            // Removed (no name left): nothing else will make the next file, and lines written to
            // the open one are lost. Renamed away: wait a moment for the rotation's new file.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !Self::removed(open) => {
                let since = *self.missing_since.get_or_insert_with(Instant::now);
                if since.elapsed() < MISSING_GRACE {
                    return None;
                }
            }
            // Opening says what is wrong better than a failed look (below).
            Err(_) => {}
        }
        match Self::open(&self.path) {
            Ok((file, next)) => {
                tracing::info!(
                    path = %self.path.display(),
                    "http.access_log: the file was rotated or removed; writing to a new one"
                );
                *self = next;
                Some(file)
            }
            Err(e) => {
                if !self.failing {
                    tracing::warn!(
                        path = %self.path.display(),
                        "http.access_log: the file was rotated or removed and cannot be opened \
                         again ({e}); still writing to the old one"
                    );
                }
                self.failing = true;
                None
            }
        }
    }
}

/// The writer thread: waits for a batch, swaps it out, writes it.
fn write_loop(shared: &Shared, mut out: Destination) {
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
            match out.write(&batch) {
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
fn text_line(out: &mut Vec<u8>, clock: &mut Clock, now: SystemTime, r: &Record<'_>) {
    // Appended piece by piece rather than through `write!`: this runs for every request.
    clock.push(out, now);
    out.extend_from_slice(b"  INFO ");
    out.extend_from_slice(TARGET.as_bytes());
    out.extend_from_slice(b": request method=");
    out.extend_from_slice(r.method.as_str().as_bytes());
    out.extend_from_slice(b" path=");
    out.extend_from_slice(r.path.as_bytes());
    out.extend_from_slice(b" status=");
    out.extend_from_slice(itoa::Buffer::new().format(r.status).as_bytes());
    out.extend_from_slice(b" vm=");
    out.extend_from_slice(r.vm.as_bytes());
    out.extend_from_slice(b" ms=");
    millis(out, r.elapsed);
    out.extend_from_slice(b" client=");
    out.extend_from_slice(r.client.as_bytes());
    out.extend_from_slice(b" proto=");
    push_version(out, r.version);
    out.push(b'\n');
}

/// The same as one JSON object, as the log's `--log-format json` lines.
fn json_line(out: &mut Vec<u8>, clock: &mut Clock, now: SystemTime, r: &Record<'_>) {
    out.extend_from_slice(b"{\"timestamp\":\"");
    clock.push(out, now);
    out.extend_from_slice(b"\",\"level\":\"INFO\",\"message\":\"request\",\"method\":");
    json_str(out, r.method.as_str());
    out.extend_from_slice(b",\"path\":");
    json_str(out, r.path);
    out.extend_from_slice(b",\"status\":");
    out.extend_from_slice(itoa::Buffer::new().format(r.status).as_bytes());
    out.extend_from_slice(b",\"vm\":");
    json_str(out, r.vm);
    out.extend_from_slice(b",\"ms\":");
    millis(out, r.elapsed);
    out.extend_from_slice(b",\"client\":\"");
    // An address's text (digits, dots, colons, brackets) needs no escaping.
    out.extend_from_slice(r.client.as_bytes());
    out.extend_from_slice(b"\",\"proto\":\"");
    push_version(out, r.version);
    out.extend_from_slice(b"\",\"target\":\"");
    out.extend_from_slice(TARGET.as_bytes());
    out.extend_from_slice(b"\"}\n");
}

/// The protocol as `Version` debug-prints it (`HTTP/1.1`, `HTTP/2.0`).
fn push_version(out: &mut Vec<u8>, version: Version) {
    let text = match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        other => {
            let _ = write!(out, "{other:?}");
            return;
        }
    };
    out.extend_from_slice(text.as_bytes());
}

/// Milliseconds with three decimals, without float formatting.
fn millis(out: &mut Vec<u8>, elapsed: Duration) {
    // In `u64` (half a million years): `as_micros`'s `u128` divides by a library call.
    let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
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
            client: "10.0.0.9:51234",
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
        text_line(
            &mut out,
            &mut Clock::default(),
            at,
            &record("/user/bea/lab"),
        );
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
        json_line(
            &mut out,
            &mut Clock::default(),
            SystemTime::now(),
            &record("/a\"b\\c"),
        );
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
    fn the_clock_formats_as_humantime_does_across_seconds() {
        let mut clock = Clock::default();
        let base = 1_764_831_571_000_000u64;
        // Same second twice (the cached date), the next second, a later day, micros with
        // leading zeros and the last micro of a second.
        for micros in [
            42,
            123_456,
            1_000_007,
            1_999_999,
            86_400_000_000,
            86_400_000_001,
        ] {
            let at = SystemTime::UNIX_EPOCH + Duration::from_micros(base + micros);
            let mut out = Vec::new();
            clock.push(&mut out, at);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                humantime::format_rfc3339_micros(at).to_string()
            );
        }
    }

    #[test]
    fn versions_print_as_their_debug() {
        for v in [
            Version::HTTP_09,
            Version::HTTP_10,
            Version::HTTP_11,
            Version::HTTP_2,
            Version::HTTP_3,
        ] {
            let mut out = Vec::new();
            push_version(&mut out, v);
            assert_eq!(String::from_utf8(out).unwrap(), format!("{v:?}"));
        }
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
        wait_for_line(&path, "/first");
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
        let out = File::from(std::os::fd::OwnedFd::from(writer));
        let log = AccessLog::start(Destination::new(out, None).unwrap(), dropped.clone()).unwrap();
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

    /// Waits until `path` holds a line containing `needle`.
    fn wait_for_line(path: &Path, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(path)
            .unwrap_or_default()
            .contains(needle)
        {
            assert!(
                Instant::now() < deadline,
                "{needle} never reached {}",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_renamed_file_is_followed_by_a_new_one_at_the_path() {
        // logrotate's default (`create`): the file is renamed and a new one made at the path.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let rotated = dir.path().join("access.log.1");
        let log = AccessLog::file(&path, counter()).unwrap();
        log.log(&record("/before"));
        wait_for_line(&path, "/before");
        std::fs::rename(&path, &rotated).unwrap();
        std::fs::write(&path, "").unwrap();
        log.log(&record("/after"));
        wait_for_line(&path, "/after");
        drop(log);
        let old = std::fs::read_to_string(&rotated).unwrap();
        let new = std::fs::read_to_string(&path).unwrap();
        assert_eq!(old.lines().count(), 1, "{old}");
        assert!(old.contains("path=/before "), "{old}");
        assert_eq!(new.lines().count(), 1, "{new}");
        assert!(new.contains("path=/after "), "{new}");
    }

    #[test]
    fn a_removed_file_is_made_again_at_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let log = AccessLog::file(&path, counter()).unwrap();
        log.log(&record("/before"));
        wait_for_line(&path, "/before");
        std::fs::remove_file(&path).unwrap();
        // The next line goes to a new file at the path, made by the writer with the log's
        // mode; none is written to the removed one.
        log.log(&record("/after/0"));
        wait_for_line(&path, "/after/0");
        drop(log);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.lines().all(|l| l.contains("path=/after/")), "{text}");
    }

    #[test]
    fn a_truncated_file_is_written_from_its_new_end() {
        // logrotate's `copytruncate`: the same file, emptied.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let log = AccessLog::file(&path, counter()).unwrap();
        log.log(&record("/before"));
        wait_for_line(&path, "/before");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        log.log(&record("/after"));
        drop(log);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 1, "{text:?}");
        assert!(text.starts_with("20"), "no hole before the line: {text:?}");
    }
}
