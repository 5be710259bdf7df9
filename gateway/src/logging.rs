//! The log on standard error, written by a thread of its own.
//!
//! An event is formatted where it happens and handed to a bounded queue; a dedicated thread
//! writes the lines. A standard error that stops taking lines (a stalled journal, a full pipe
//! nobody reads) therefore never holds up a login or a session: once [`QUEUED_LINES`] lines are
//! waiting, further ones are dropped and counted (`poolgate_log_dropped_total`). Lines still
//! waiting are written when the [`Guard`] is dropped at exit (for at most [`FLUSH_AT_EXIT`]).
//!
//! The access log has a writer of its own (`http::access_log`), which batches its lines.
//!
//! A leaf module: the CLI sets it up and hands [`Guard::drops`] to `metrics`.

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// Lines that may wait for standard error before new ones are dropped. The queue's slots are
/// allocated up front (32 bytes each), the lines only while they wait.
pub const QUEUED_LINES: usize = 16 * 1024;

/// Keeps the log's writer thread; dropping it writes the lines still waiting, for at most
/// [`FLUSH_AT_EXIT`].
#[must_use = "dropping the guard stops the log's writer"]
pub struct Guard {
    writer: Option<WorkerGuard>,
    dropped: ErrorCounter,
}

/// How long exiting waits for the log's lines still queued.
pub const FLUSH_AT_EXIT: std::time::Duration = std::time::Duration::from_millis(1500);

impl Drop for Guard {
    /// `WorkerGuard`'s own drop waits about a second for the writer, but when the queue is full
    /// it reports that on standard output with a blocking write, which a stalled journal (the
    /// same stream under systemd) never takes. It is dropped on a thread of its own instead,
    /// and exiting waits for it at most [`FLUSH_AT_EXIT`].
    fn drop(&mut self) {
        let Some(writer) = self.writer.take() else {
            return;
        };
        let (done, finished) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("log-flush".into())
            .spawn(move || {
                drop(writer);
                let _ = done.send(());
            });
        if spawned.is_ok() {
            let _ = finished.recv_timeout(FLUSH_AT_EXIT);
        }
    }
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
    let filter = EnvFilter::try_new(with_quiet_libraries(filter)).unwrap_or_else(|e| {
        eprintln!("poolgate: invalid --log filter {filter:?} ({e}); using \"info\"");
        EnvFilter::new(with_quiet_libraries("info"))
    });
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("log")
        .finish(std::io::stderr());
    let dropped = writer.error_counter();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colours())
        .with_writer(writer);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
    Guard {
        writer: Some(guard),
        dropped,
    }
}

/// `filter`, with rustls's own lines at `error` unless it names rustls: rustls warns about what
/// a client sent (an IP address as the TLS server name, as every client that connects by
/// address does), a line per handshake that any client can repeat at will. A filter that names
/// `rustls` is taken as it is.
fn with_quiet_libraries(filter: &str) -> String {
    let names_rustls = filter.split(',').any(|directive| {
        let d = directive.trim();
        d == "rustls"
            || ["rustls=", "rustls::", "rustls["]
                .iter()
                .any(|p| d.starts_with(p))
    });
    if names_rustls || filter.trim() == "off" {
        filter.to_owned()
    } else {
        format!("{filter},rustls=error")
    }
}

/// Whether text lines are coloured: only on a terminal, and not with `NO_COLOR` set (a file, a
/// pipe, `docker logs` or the journal gets plain text).
fn colours() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustls_is_quiet_unless_the_filter_names_it() {
        assert_eq!(with_quiet_libraries("info"), "info,rustls=error");
        assert_eq!(
            with_quiet_libraries("warn,gateway=debug"),
            "warn,gateway=debug,rustls=error"
        );
        assert_eq!(with_quiet_libraries("rustls=debug"), "rustls=debug");
        assert_eq!(with_quiet_libraries("off"), "off");
        assert_eq!(
            with_quiet_libraries("tokio_rustls=debug"),
            "tokio_rustls=debug,rustls=error"
        );
        assert_eq!(
            with_quiet_libraries("info,rustls::server=debug"),
            "info,rustls::server=debug"
        );
        assert!(EnvFilter::try_new(with_quiet_libraries("info")).is_ok());
    }
}
