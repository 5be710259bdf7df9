//! Session traces: CSV with the header `user,protocol,start_s,end_s`, one session a line, times
//! in whole seconds from the start of the trace. Job traces (detached work that does not flow
//! through the gateway: tmux, nohup, cron): the same style with the header `user,start_s,end_s`.
//! Batch traces (jobs submitted to the batch queue, Slurm on the pool VMs): the header
//! `job,submit_s,duration_s,nodes`.

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
    for (line, fields) in rows(text, JOBS_HEADER, "job trace")? {
        let err = |message: String| TraceError { line, message };
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
    jobs.sort_by_key(|j| j.start_s);
    Ok(jobs)
}

/// The header every batch trace starts with.
pub const BATCH_HEADER: &str = "job,submit_s,duration_s,nodes";

/// Most nodes one batch job may ask for (far beyond any pool `max_vms`).
pub const MAX_BATCH_NODES: u32 = 10_000;

/// One batch job: submitted to the queue at `submit_s`, it runs `duration_s` once `nodes` whole
/// VMs are free for it (one job per node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceBatchJob {
    /// A label (a job name; several jobs may share one).
    pub job: String,
    /// When it is submitted, in seconds from the trace start.
    pub submit_s: u64,
    /// How long it runs once started (a run cut short by a scale-in starts over).
    pub duration_s: u64,
    /// VMs it needs at once (at least 1).
    pub nodes: u32,
}

/// Parses a batch trace: like [`parse_trace`], with the header [`BATCH_HEADER`]. Jobs come back
/// sorted by submit time (stable: the queue order of jobs submitted in the same second).
pub fn parse_batch(text: &str) -> Result<Vec<TraceBatchJob>, TraceError> {
    let mut jobs = Vec::new();
    for (line, fields) in rows(text, BATCH_HEADER, "batch trace")? {
        let err = |message: String| TraceError { line, message };
        let [job, submit, duration, nodes] = fields[..] else {
            return Err(err(format!(
                "expected 4 comma-separated fields ({BATCH_HEADER}), found {}",
                fields.len()
            )));
        };
        if job.is_empty() {
            return Err(err("job is empty".to_string()));
        }
        let submit_s = seconds("submit_s", submit, line)?;
        let duration_s = seconds("duration_s", duration, line)?;
        let nodes = match nodes.parse::<u32>() {
            Ok(n) if (1..=MAX_BATCH_NODES).contains(&n) => n,
            _ => {
                return Err(err(format!(
                    "nodes {nodes:?} is not a whole number from 1 to {MAX_BATCH_NODES}"
                )));
            }
        };
        jobs.push(TraceBatchJob {
            job: job.to_string(),
            submit_s,
            duration_s,
            nodes,
        });
    }
    jobs.sort_by_key(|j| j.submit_s);
    Ok(jobs)
}

/// The data lines of a CSV trace as (1-based line, trimmed fields). Blank lines and lines
/// starting with `#` are skipped; the first other line must be `header` (any case, spaces
/// around fields allowed).
fn rows<'t>(
    text: &'t str,
    header: &str,
    what: &str,
) -> Result<Vec<(usize, Vec<&'t str>)>, TraceError> {
    let mut rows = Vec::new();
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
            if fields.join(",") != header {
                return Err(TraceError {
                    line,
                    message: format!("expected the header `{header}`, found `{content}`"),
                });
            }
            header_seen = true;
            continue;
        }
        rows.push((line, content.split(',').map(str::trim).collect()));
    }
    if !header_seen {
        return Err(TraceError {
            line: 1,
            message: format!("the {what} is empty: expected the header `{header}`"),
        });
    }
    Ok(rows)
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
    let mut sessions = rows(text, HEADER, "trace")?
        .into_iter()
        .map(|(line, fields)| parse_line(&fields, line))
        .collect::<Result<Vec<_>, _>>()?;
    sessions.sort_by_key(|s| s.start_s);
    Ok(sessions)
}

fn parse_line(fields: &[&str], line: usize) -> Result<TraceSession, TraceError> {
    let err = |message: String| TraceError { line, message };
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

    #[test]
    fn parses_batch_jobs_in_submit_order_and_names_bad_lines() {
        let jobs = parse_batch(
            "job,submit_s,duration_s,nodes\n# nightly\ntrain,100,7200,2\netl,50,600,1\n",
        )
        .unwrap();
        assert_eq!(
            jobs,
            vec![
                TraceBatchJob {
                    job: "etl".into(),
                    submit_s: 50,
                    duration_s: 600,
                    nodes: 1
                },
                TraceBatchJob {
                    job: "train".into(),
                    submit_s: 100,
                    duration_s: 7200,
                    nodes: 2
                },
            ]
        );
        for (text, line, needle) in [
            ("", 1, "the batch trace is empty"),
            (
                "user,start_s,end_s\n",
                1,
                "expected the header `job,submit_s,duration_s,nodes`",
            ),
            (
                "job,submit_s,duration_s,nodes\na,1,2\n",
                2,
                "4 comma-separated",
            ),
            ("job,submit_s,duration_s,nodes\n,1,2,1\n", 2, "job is empty"),
            (
                "job,submit_s,duration_s,nodes\na,x,2,1\n",
                2,
                "submit_s \"x\"",
            ),
            (
                "job,submit_s,duration_s,nodes\na,1,-2,1\n",
                2,
                "duration_s \"-2\"",
            ),
            (
                "job,submit_s,duration_s,nodes\n\na,1,2,0\n",
                3,
                "nodes \"0\"",
            ),
            (
                "job,submit_s,duration_s,nodes\na,1,2,99999\n",
                2,
                "from 1 to 10000",
            ),
        ] {
            let e = parse_batch(text).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.to_string().contains(needle), "{text:?}: {e}");
        }
    }
}
