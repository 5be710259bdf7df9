//! The log on standard error, written by a thread of its own.
//!
//! An event is formatted where it happens and handed to a bounded queue; a dedicated thread
//! writes the lines. A standard error that stops taking lines (a stalled journal, a full pipe
//! nobody reads) therefore never holds up a login or a session: once [`QUEUED_LINES`] lines are
//! waiting, further ones are dropped and counted (`poolgate_log_dropped_total`). Lines still
//! waiting are written when the [`Guard`] is dropped at exit (for at most a second).
//!
//! The access log has a writer of its own (`http::access_log`), which batches its lines.
//!
//! A leaf module: the CLI sets it up and hands [`Guard::drops`] to `metrics`.

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// Lines that may wait for standard error before new ones are dropped. The queue's slots are
/// allocated up front (32 bytes each), the lines only while they wait.
pub const QUEUED_LINES: usize = 16 * 1024;

/// Keeps the log's writer thread; dropping it writes the lines still waiting.
#[must_use = "dropping the guard stops the log's writer"]
pub struct Guard {
    _writer: WorkerGuard,
    dropped: ErrorCounter,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("dropped", &self.dropped.dropped_lines())
            .finish_non_exhaustive()
    }
}

impl Guard {
    /// Reads how many lines have been dropped so far because standard error did not take them.
    pub fn drops(&self) -> impl Fn() -> u64 + Send + Sync + 'static {
        let dropped = self.dropped.clone();
        move || dropped.dropped_lines() as u64
    }
}

/// Sets up the log: `filter` as `--log` gives it (an invalid one falls back to `info`, with a
/// word on standard error), text or (`json`) JSON lines, written by a thread of its own.
pub fn init(json: bool, filter: &str) -> Guard {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|e| {
        eprintln!("poolgate: invalid --log filter {filter:?} ({e}); using \"info\"");
        EnvFilter::new("info")
    });
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("log")
        .finish(std::io::stderr());
    let dropped = writer.error_counter();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
    Guard {
        _writer: guard,
        dropped,
    }
}
