//! The log on standard error, written by a thread of its own.
//!
//! An event is formatted where it happens and handed to a bounded queue; a dedicated thread
//! writes the lines. A standard error that stops taking lines (a stalled journal, a full pipe
//! nobody reads) therefore never holds up a login or a session: once [`QUEUED_LINES`] lines are
//! waiting, further ones are dropped and counted (`poolgate_log_dropped_total`). Lines still
//! waiting are written when the [`Guard`] is dropped at exit (for at most a second).
//!
//! The access log has a writer of its own (`http::access_log`), which batches its lines.

use std::sync::OnceLock;

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

/// Lines that may wait for standard error before new ones are dropped. The queue's slots are
/// allocated up front (32 bytes each), the lines only while they wait.
pub const QUEUED_LINES: usize = 16 * 1024;

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Keeps the log's writer thread; dropping it writes the lines still waiting.
#[must_use = "dropping the guard stops the log's writer"]
pub struct Guard(#[allow(dead_code)] WorkerGuard);

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Guard")
    }
}

/// Sets up the log: `filter` as `--log` gives it (an invalid one falls back to `info`, with a
/// word on standard error), text or JSON lines, written by a thread of its own.
pub fn init(format: LogFormat, filter: &str) -> Guard {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|e| {
        eprintln!("poolgate: invalid --log filter {filter:?} ({e}); using \"info\"");
        EnvFilter::new("info")
    });
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("log")
        .finish(std::io::stderr());
    let _ = DROPPED.set(writer.error_counter());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    // The access log writes its own lines (`http.access_log`), in the same format.
    crate::http::access_log::use_json(matches!(format, LogFormat::Json));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Guard(guard)
}

/// Log lines dropped so far because standard error did not take them (0 before [`init`]).
pub fn dropped_lines() -> u64 {
    DROPPED
        .get()
        .map_or(0, |counter| counter.dropped_lines() as u64)
}
