//! Session traces: CSV with the header `user,protocol,start_s,end_s`, one session a line, times
//! in whole seconds from the start of the trace. Job traces (detached work that does not flow
//! through the gateway: tmux, nohup, cron): the same style with the header `user,start_s,end_s`.

use crate::vm::Protocol;

/// The header every trace starts with.
pub const HEADER: &str = "user,protocol,start_s,end_s";

/// The header every job trace starts with.
pub const JOBS_HEADER: &str = "user,start_s,end_s";

/// One detached job: started by `user` at `start_s` on a VM where they have a session (else any
/// running VM), running until `end_s` unless its VM is removed first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceJob {
    /// Whose job.
    pub user: String,
    /// When it starts, in seconds from the trace start.
    pub start_s: u64,
    /// When it ends (at or after `start_s`).
    pub end_s: u64,
}

/// Parses a job trace: like [`parse_trace`], with the header [`JOBS_HEADER`]. Jobs come back
/// sorted by start time (stable).
pub fn parse_jobs(text: &str) -> Result<Vec<TraceJob>, TraceError> {
    let mut jobs = Vec::new();
    let mut header_seen = false;
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let content = raw.trim_start_matches('\u{feff}').trim();
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        if !header_seen {
            let fields: Vec<String> = content
                .split(',')
                .map(|f| f.trim().to_ascii_lowercase())
                .collect();
            if fields.join(",") != JOBS_HEADER {
                return Err(TraceError {
                    line,
                    message: format!("expected the header `{JOBS_HEADER}`, found `{content}`"),
                });
            }
            header_seen = true;
            continue;
        }
        let err = |message: String| TraceError { line, message };
        let fields: Vec<&str> = content.split(',').map(str::trim).collect();
        let [user, start, end] = fields[..] else {
            return Err(err(format!(
                "expected 3 comma-separated fields ({JOBS_HEADER}), found {}",
                fields.len()
            )));
        };
        if user.is_empty() {
            return Err(err("user is empty".to_string()));
        }
        let start_s = seconds("start_s", start, line)?;
        let end_s = seconds("end_s", end, line)?;
        if end_s < start_s {
            return Err(err(format!("end_s {end_s} is before start_s {start_s}")));
        }
        jobs.push(TraceJob {
            user: user.to_string(),
            start_s,
            end_s,
        });
    }
    if !header_seen {
        return Err(TraceError {
            line: 1,
            message: format!("the job trace is empty: expected the header `{JOBS_HEADER}`"),
        });
    }
    jobs.sort_by_key(|j| j.start_s);
    Ok(jobs)
}

/// A time field: whole seconds, at most [`MAX_TRACE_SECONDS`].
fn seconds(name: &str, value: &str, line: usize) -> Result<u64, TraceError> {
    let err = |message: String| TraceError { line, message };
    let s: u64 = value.parse().map_err(|_| {
        err(format!(
            "{name} {value:?} is not a whole number of seconds (0 or more)"
        ))
    })?;
    if s > MAX_TRACE_SECONDS {
        return Err(err(format!(
            "{name} {s} is beyond {MAX_TRACE_SECONDS} s (ten years)"
        )));
    }
    Ok(s)
}

/// Latest time a trace may mention: ten years, far beyond any replay worth running.
pub const MAX_TRACE_SECONDS: u64 = 10 * 366 * 24 * 3600;

/// One session of a trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceSession {
    /// Who.
    pub user: String,
    /// SSH or HTTP (both count as load alike).
    pub protocol: Protocol,
    /// When the user connects, in seconds from the trace start.
    pub start_s: u64,
    /// When the user leaves (at or after `start_s`).
    pub end_s: u64,
}

impl TraceSession {
    /// How long the session lasts once it has landed on a VM.
    pub fn duration_s(&self) -> u64 {
        self.end_s - self.start_s
    }
}

/// Why a trace was rejected, with the 1-based line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct TraceError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong and what was expected.
    pub message: String,
}

/// Parses a trace. Blank lines and lines starting with `#` are skipped; the first other line
/// must be the header. Sessions come back sorted by start time (stable). The first problem is
/// returned with its line number.
pub fn parse_trace(text: &str) -> Result<Vec<TraceSession>, TraceError> {
    let mut sessions = Vec::new();
    let mut header_seen = false;
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let content = raw.trim_start_matches('\u{feff}').trim();
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        if !header_seen {
            let fields: Vec<String> = content
                .split(',')
                .map(|f| f.trim().to_ascii_lowercase())
                .collect();
            if fields.join(",") != HEADER {
                return Err(TraceError {
                    line,
                    message: format!("expected the header `{HEADER}`, found `{content}`"),
                });
            }
            header_seen = true;
            continue;
        }
        sessions.push(parse_line(content, line)?);
    }
    if !header_seen {
        return Err(TraceError {
            line: 1,
            message: format!("the trace is empty: expected the header `{HEADER}`"),
        });
    }
    sessions.sort_by_key(|s| s.start_s);
    Ok(sessions)
}

fn parse_line(content: &str, line: usize) -> Result<TraceSession, TraceError> {
    let err = |message: String| TraceError { line, message };
    let fields: Vec<&str> = content.split(',').map(str::trim).collect();
    let [user, protocol, start, end] = fields[..] else {
        return Err(err(format!(
            "expected 4 comma-separated fields ({HEADER}), found {}",
            fields.len()
        )));
    };
    if user.is_empty() {
        return Err(err("user is empty".to_string()));
    }
    let protocol = match protocol.to_ascii_lowercase().as_str() {
        "ssh" => Protocol::Ssh,
        "http" => Protocol::Http,
        _ => {
            return Err(err(format!(
                "protocol {protocol:?} is neither \"ssh\" nor \"http\""
            )));
        }
    };
    let start_s = seconds("start_s", start, line)?;
    let end_s = seconds("end_s", end, line)?;
    if end_s < start_s {
        return Err(err(format!("end_s {end_s} is before start_s {start_s}")));
    }
    Ok(TraceSession {
        user: user.to_string(),
        protocol,
        start_s,
        end_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sessions_sorted_skipping_blanks_and_comments() {
        let text = "\u{feff}user,protocol,start_s,end_s\n# a comment\nann,ssh,100,200\n\nbob, HTTP ,50,60\n";
        let trace = parse_trace(text).unwrap();
        assert_eq!(
            trace,
            vec![
                TraceSession {
                    user: "bob".into(),
                    protocol: Protocol::Http,
                    start_s: 50,
                    end_s: 60
                },
                TraceSession {
                    user: "ann".into(),
                    protocol: Protocol::Ssh,
                    start_s: 100,
                    end_s: 200
                },
            ]
        );
        assert_eq!(trace[1].duration_s(), 100);
    }

    #[test]
    fn errors_name_the_line_and_the_problem() {
        let cases = [
            ("", 1, "empty"),
            ("name,proto,a,b\n", 1, "expected the header"),
            (
                "user,protocol,start_s,end_s\nann,ssh,1\n",
                2,
                "4 comma-separated",
            ),
            (
                "user,protocol,start_s,end_s\n,ssh,1,2\n",
                2,
                "user is empty",
            ),
            (
                "user,protocol,start_s,end_s\nann,rdp,1,2\n",
                2,
                "neither \"ssh\" nor \"http\"",
            ),
            (
                "user,protocol,start_s,end_s\n\nann,ssh,-1,2\n",
                3,
                "start_s \"-1\" is not a whole number",
            ),
            (
                "user,protocol,start_s,end_s\nann,ssh,1,2.5\n",
                2,
                "end_s \"2.5\"",
            ),
            (
                "user,protocol,start_s,end_s\nann,ssh,9,2\n",
                2,
                "end_s 2 is before start_s 9",
            ),
            (
                "user,protocol,start_s,end_s\nann,ssh,1,99999999999999999\n",
                2,
                "beyond",
            ),
        ];
        for (text, line, needle) in cases {
            let e = parse_trace(text).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.to_string().contains(needle), "{text:?}: {e}");
        }
    }

    #[test]
    fn parses_jobs_and_names_bad_lines() {
        let jobs = parse_jobs("user,start_s,end_s\n# cron\nann,100,5000\nbob,50,60\n").unwrap();
        assert_eq!(
            jobs,
            vec![
                TraceJob {
                    user: "bob".into(),
                    start_s: 50,
                    end_s: 60
                },
                TraceJob {
                    user: "ann".into(),
                    start_s: 100,
                    end_s: 5000
                },
            ]
        );
        for (text, line, needle) in [
            ("", 1, "empty"),
            (
                "user,protocol,start_s,end_s\n",
                1,
                "expected the header `user,start_s,end_s`",
            ),
            ("user,start_s,end_s\nann,ssh,1,2\n", 2, "3 comma-separated"),
            ("user,start_s,end_s\nann,9,2\n", 2, "before start_s"),
        ] {
            let e = parse_jobs(text).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.to_string().contains(needle), "{text:?}: {e}");
        }
    }
}
