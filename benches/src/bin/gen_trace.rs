//! Synthetic session traces of a data-science team's week, for `poolgate simulate`.
//!
//! ```text
//! cargo run -p poolgate-benches --bin gen_trace -- [--seed N] [--days N] [--people N] [--arrive-spread MIN] > trace.csv
//! cargo run -p poolgate-benches --bin gen_trace -- --batch [--seed N] [--days N] [--people N] > batch.csv
//! ```
//!
//! Day 0 is a Monday. On weekdays each person (present with 90 % chance) arrives between 8 and
//! 10 h (most around 9; `--arrive-spread 10` narrows that to 8:50–9:10, a team that starts
//! together), works in sessions of 30 min to 3 h with short gaps, mostly breaks for
//! lunch between 12 and 13 h, and leaves between 17 and 19 h. About half the people keep a
//! JupyterHub (HTTP) session open next to their SSH work; the others alternate. A few weekday
//! nights run a batch job (1–4 h, started between 22 and 3 h). Weekends are nearly empty: a
//! few people drop in for an hour or three. The same seed gives the same trace.
//!
//! `--batch` prints the same team's batch jobs instead (`poolgate simulate --batch`, CSV
//! `job,submit_s,duration_s,nodes`), from a random stream of their own (the session trace of a
//! seed does not change): on weekdays each person submits a short analysis job (10–60 min,
//! sometimes up to 3 h; 1 node, now and then 2) with a 35 % chance in the morning and again in
//! the afternoon, and with a 15 % chance a long training run when leaving (17–19 h, 2–8 h, 1
//! node, one in five on 2 or 4 nodes); every night, weekends included, a cron ETL job at 02:00
//! (1–2 h, 1 node).

use std::io::Write;
use std::process::ExitCode;

const HOUR: u64 = 3600;
const MINUTE: u64 = 60;
const DAY: u64 = 24 * HOUR;

/// splitmix64: small, deterministic, good enough for synthetic workloads.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    /// True with probability `p`.
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 + f64::EPSILON < p
    }

    /// Triangular in `lo..=hi`, peaking at `mode` (the morning ramp, the evening spread).
    fn triangle(&mut self, lo: u64, mode: u64, hi: u64) -> u64 {
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        let (lo, mode, hi) = (lo as f64, mode as f64, hi as f64);
        let cut = (mode - lo) / (hi - lo);
        let x = if u < cut {
            lo + ((hi - lo) * (mode - lo) * u).sqrt()
        } else {
            hi - ((hi - lo) * (hi - mode) * (1.0 - u)).sqrt()
        };
        x.round() as u64
    }
}

struct Session {
    user: String,
    protocol: &'static str,
    start: u64,
    end: u64,
}

struct Options {
    seed: u64,
    days: u64,
    people: u64,
    /// Arrivals spread this many minutes either side of 9:00.
    arrive_spread: u64,
    /// Print the batch jobs, not the sessions.
    batch: bool,
}

fn parse_args() -> Result<Options, String> {
    let mut options = Options {
        seed: 6,
        days: 7,
        people: 20,
        arrive_spread: 60,
        batch: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--batch" {
            options.batch = true;
            continue;
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number: u64 = value
            .parse()
            .map_err(|_| format!("{flag} {value:?} is not a whole number"))?;
        match flag.as_str() {
            "--seed" => options.seed = number,
            "--days" if (1..=366).contains(&number) => options.days = number,
            "--people" if (1..=1000).contains(&number) => options.people = number,
            "--arrive-spread" if (1..=120).contains(&number) => options.arrive_spread = number,
            "--days" | "--people" | "--arrive-spread" => {
                return Err(format!("{flag} {number} is out of range"));
            }
            _ => {
                return Err(format!(
                    "unknown option {flag} (--seed, --days, --people, --arrive-spread, --batch)"
                ));
            }
        }
    }
    Ok(options)
}

/// Sessions of 30 min to 3 h with 5–20 min gaps filling `from..to`, alternating or paired
/// protocols.
fn work_block(rng: &mut Rng, user: &str, jupyter_user: bool, from: u64, to: u64) -> Vec<Session> {
    let mut out = Vec::new();
    if jupyter_user && to > from + 30 * MINUTE {
        // A notebook open for the whole block, next to the SSH sessions below.
        out.push(Session {
            user: user.to_string(),
            protocol: "http",
            start: from + rng.range(0, 10) * MINUTE,
            end: to - rng.range(0, 10) * MINUTE,
        });
    }
    let mut t = from;
    while t + 20 * MINUTE < to {
        let length = rng.range(30, 180) * MINUTE;
        let end = (t + length).min(to);
        let protocol = if jupyter_user || rng.chance(0.6) {
            "ssh"
        } else {
            "http"
        };
        out.push(Session {
            user: user.to_string(),
            protocol,
            start: t,
            end,
        });
        t = end + rng.range(5, 20) * MINUTE;
    }
    out
}

fn generate(options: &Options) -> Vec<Session> {
    let mut rng = Rng(options.seed);
    let mut sessions = Vec::new();
    let people: Vec<(String, bool)> = (1..=options.people)
        .map(|i| (format!("user{i:02}"), rng.chance(0.5)))
        .collect();
    for day in 0..options.days {
        let base = day * DAY;
        let weekend = day % 7 >= 5;
        for (user, jupyter_user) in &people {
            if weekend {
                if rng.chance(0.08) {
                    let start = base + rng.range(10 * 60, 16 * 60) * MINUTE;
                    let end = start + rng.range(60, 180) * MINUTE;
                    sessions.extend(work_block(&mut rng, user, *jupyter_user, start, end));
                }
                continue;
            }
            if !rng.chance(0.9) {
                continue;
            }
            let spread = options.arrive_spread;
            let arrive = base + rng.triangle(9 * 60 - spread, 9 * 60, 9 * 60 + spread) * MINUTE;
            let leave = base + rng.triangle(17 * 60, 17 * 60 + 45, 19 * 60) * MINUTE;
            if rng.chance(0.8) {
                let lunch = base + rng.range(12 * 60, 12 * 60 + 30) * MINUTE;
                let back = lunch + rng.range(30, 60) * MINUTE;
                sessions.extend(work_block(&mut rng, user, *jupyter_user, arrive, lunch));
                sessions.extend(work_block(&mut rng, user, *jupyter_user, back, leave));
            } else {
                sessions.extend(work_block(&mut rng, user, *jupyter_user, arrive, leave));
            }
        }
        // A few night batch jobs on weekdays, started by whoever owns them.
        if !weekend && rng.chance(0.4) {
            let owner = &people[rng.range(0, options.people - 1) as usize].0;
            let start = base + 22 * HOUR + rng.range(0, 5 * 60) * MINUTE;
            sessions.push(Session {
                user: owner.clone(),
                protocol: "ssh",
                start,
                end: start + rng.range(60, 240) * MINUTE,
            });
        }
    }
    sessions.sort_by_key(|s| (s.start, s.end));
    sessions
}

struct BatchJob {
    job: String,
    submit: u64,
    duration: u64,
    nodes: u32,
}

/// The team's batch jobs (see the top of the file).
fn generate_batch(options: &Options) -> Vec<BatchJob> {
    // A stream apart from the sessions': the same seed keeps its session trace.
    let mut rng = Rng(options.seed ^ 0xba7c_4a0b_5eed_0001);
    let mut jobs = Vec::new();
    for day in 0..options.days {
        let base = day * DAY;
        let weekend = day % 7 >= 5;
        if !weekend {
            for i in 1..=options.people {
                let user = format!("user{i:02}");
                for (from, to) in [(9 * 60 + 30, 12 * 60), (13 * 60, 17 * 60)] {
                    if rng.chance(0.35) {
                        let duration = if rng.chance(0.8) {
                            rng.range(10, 60)
                        } else {
                            rng.range(60, 180)
                        };
                        jobs.push(BatchJob {
                            job: format!("analysis-{user}"),
                            submit: base + rng.range(from, to) * MINUTE,
                            duration: duration * MINUTE,
                            nodes: if rng.chance(0.1) { 2 } else { 1 },
                        });
                    }
                }
                if rng.chance(0.15) {
                    let nodes = match rng.range(0, 9) {
                        0 => 4,
                        1 => 2,
                        _ => 1,
                    };
                    jobs.push(BatchJob {
                        job: format!("train-{user}"),
                        submit: base + rng.range(17 * 60, 19 * 60) * MINUTE,
                        duration: rng.range(2 * 60, 8 * 60) * MINUTE,
                        nodes,
                    });
                }
            }
        }
        jobs.push(BatchJob {
            job: "etl-nightly".to_string(),
            submit: base + 2 * HOUR,
            duration: rng.range(60, 120) * MINUTE,
            nodes: 1,
        });
    }
    jobs.sort_by_key(|j| j.submit);
    jobs
}

fn main() -> ExitCode {
    let options = match parse_args() {
        Ok(options) => options,
        Err(e) => {
            eprintln!("gen_trace: {e}");
            return ExitCode::from(2);
        }
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut text = String::new();
    if options.batch {
        text.push_str("job,submit_s,duration_s,nodes\n");
        for j in generate_batch(&options) {
            text.push_str(&format!(
                "{},{},{},{}\n",
                j.job, j.submit, j.duration, j.nodes
            ));
        }
    } else {
        text.push_str("user,protocol,start_s,end_s\n");
        for s in generate(&options) {
            text.push_str(&format!(
                "{},{},{},{}\n",
                s.user, s.protocol, s.start, s.end
            ));
        }
    }
    if out
        .write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .is_err()
    {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
