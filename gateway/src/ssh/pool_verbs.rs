//! `ssh HOST pool submit|jobs|logs|cancel …` (with `[batch]`): an exec request whose first word
//! is `pool` is rewritten into the Slurm command line that does it, and that line runs as the
//! user on the VM their session landed on, like any command. poolgate keeps no job state; Slurm
//! checks who may see or cancel what, and the scripts below refuse other users' jobs first with
//! a clear message.
//!
//! Every user-given value reaches the VM's shell single-quoted (or checked to be a number), so
//! nothing a user types is interpreted by the shell.

use std::fmt::Write as _;

/// The reserved first word.
pub const VERB: &str = "pool";

/// `pool submit`'s own options, taken before or after the script (a `--` ends them: what
/// follows goes to the script as it is).
const OPTIONS: &[&str] = &["--time", "--gpus", "--nice", "--nodes", "--name"];

const USAGE: &str = "usage: pool submit SCRIPT [ARGS...] [--time 2h] [--gpus N] [--nice N] [--nodes N] [--name NAME] [-- ARGS...]\n       pool jobs\n       pool logs JOB_ID\n       pool cancel JOB_ID\n       pool help";

/// `pool jobs`: the queue (`squeue --me`), then the user's jobs Slurm still remembers that have
/// ended, with their exit codes. `$1` is the partition.
const JOBS_SCRIPT: &str = r#"me=$(id -un)
squeue --me -p "$1" -o '%.10i %.20j %.10T %.10M %.10l %.6D %R'
scontrol -o show job 2>/dev/null | awk -v me="$me" '
  { user = ""; state = ""; id = ""; name = ""; code = ""
    for (i = 1; i <= NF; i++) {
      split($i, kv, "=")
      if (kv[1] == "JobId") id = kv[2]
      else if (kv[1] == "JobName") name = kv[2]
      else if (kv[1] == "UserId") { user = kv[2]; sub(/\(.*/, "", user) }
      else if (kv[1] == "JobState") state = kv[2]
      else if (kv[1] == "ExitCode") code = kv[2]
    }
    if (user == me && state != "PENDING" && state != "RUNNING" && state != "CONFIGURING" && state != "COMPLETING") {
      if (!header) { print ""; printf "%10s %20s %10s %s\n", "ENDED", "NAME", "STATE", "EXIT"; header = 1 }
      sub(/:.*/, "", code)
      printf "%10s %20s %10s %s\n", id, substr(name, 1, 20), state, code
    }
  }'"#;

/// Shared by `logs` and `cancel`: `$1` is the job id; sets `job` (its `scontrol -o` line) and
/// refuses a job that is not the caller's.
const OWN_JOB: &str = r#"job=$(scontrol -o show job "$1" 2>/dev/null) || { echo "pool: no job $1 (Slurm forgets jobs a few minutes after they end)" >&2; exit 2; }
owner=$(printf '%s\n' "$job" | tr ' ' '\n' | sed -n 's/^UserId=\([^(]*\).*/\1/p')
if [ "$owner" != "$(id -un)" ]; then echo "pool: job $1 is not yours" >&2; exit 2; fi
field() { printf '%s\n' "$job" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
"#;

/// `pool logs ID`: prints the output file, follows it while the job is pending or running, then
/// prints the job's end and exits with its exit code.
const LOGS_SCRIPT: &str = r#"out=$(field StdOut)
state=$(field JobState)
if [ "$state" = PENDING ]; then echo "pool: job $1 is pending ($(field Reason)); waiting for it to start" >&2; fi
while [ "$state" = PENDING ] || { [ ! -e "$out" ] && [ "$state" = RUNNING ]; }; do
  sleep 2
  job=$(scontrol -o show job "$1" 2>/dev/null) || break
  state=$(field JobState)
done
case "$state" in
  RUNNING|CONFIGURING|COMPLETING|SUSPENDED)
    tail -n +1 -F "$out" 2>/dev/null &
    follower=$!
    while job=$(scontrol -o show job "$1" 2>/dev/null); do
      state=$(field JobState)
      case "$state" in RUNNING|CONFIGURING|COMPLETING|SUSPENDED|PENDING) sleep 2 ;; *) break ;; esac
    done
    sleep 1
    kill "$follower" 2>/dev/null
    wait "$follower" 2>/dev/null ;;
  *) [ -e "$out" ] && cat "$out" ;;
esac
code=$(field ExitCode); code=${code%%:*}
echo "pool: job $1 $(field JobState), exit code ${code:-unknown}" >&2
case "$code" in ''|*[!0-9]*) exit 1 ;; *) exit "$code" ;; esac"#;

/// What an exec request means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verb {
    /// Not `pool …`: relayed as it is.
    NotOurs,
    /// `pool …`: this shell command line runs instead.
    Run {
        /// The verb (`submit`, `jobs`, …), for the log.
        name: &'static str,
        /// The command line for the VM.
        command: String,
    },
}

/// Rewrites `pool …` for `partition`; anything else is [`Verb::NotOurs`]. Errors in the
/// arguments become a command that prints the error and the usage and exits 2.
pub fn rewrite(command: &[u8], partition: &str) -> Verb {
    let Ok(text) = std::str::from_utf8(command) else {
        return Verb::NotOurs;
    };
    let Some(words) = split_words(text) else {
        if text.trim_start().starts_with("pool ") {
            return refuse("help", "unbalanced quotes");
        }
        return Verb::NotOurs;
    };
    let Some((first, rest)) = words.split_first() else {
        return Verb::NotOurs;
    };
    if first != VERB {
        return Verb::NotOurs;
    }
    let partition = quote(partition);
    match rest.split_first() {
        Some((verb, args)) if verb == "submit" => submit(args, &partition),
        Some((verb, args)) if verb == "jobs" => {
            if !args.is_empty() {
                return refuse("jobs", "pool jobs takes no arguments");
            }
            Verb::Run {
                name: "jobs",
                command: format!("sh -c {} pool-jobs {partition}", quote(JOBS_SCRIPT)),
            }
        }
        Some((verb, args)) if verb == "logs" || verb == "cancel" => {
            let name = if verb == "logs" { "logs" } else { "cancel" };
            let [id] = args else {
                return refuse(name, &format!("pool {name} takes one job id"));
            };
            if id.is_empty() || id.len() > 20 || !id.chars().all(|c| c.is_ascii_digit()) {
                return refuse(name, &format!("{} is not a job id", shown(id)));
            }
            let body = if name == "logs" {
                format!("{OWN_JOB}{LOGS_SCRIPT}")
            } else {
                format!("{OWN_JOB}scancel \"$1\" && echo \"pool: cancelled job $1\"")
            };
            Verb::Run {
                name,
                command: format!("sh -c {} pool-{name} {id}", quote(&body)),
            }
        }
        Some((verb, _)) if verb == "help" => Verb::Run {
            name: "help",
            command: format!("printf '%s\\n' {}", quote(USAGE)),
        },
        Some((verb, _)) => refuse("help", &format!("unknown verb {}", shown(verb))),
        None => refuse("help", "a verb is missing"),
    }
}

/// `pool submit SCRIPT [ARGS…] [options]` → `sbatch --parsable --partition=P … SCRIPT ARGS…`.
fn submit(args: &[String], partition: &str) -> Verb {
    let mut options: Vec<String> = Vec::new();
    let mut positional: Vec<&str> = Vec::new();
    let mut it = args.iter();
    let mut only_arguments = false;
    while let Some(arg) = it.next() {
        if only_arguments {
            positional.push(arg);
            continue;
        }
        if arg == "--" {
            only_arguments = true;
            continue;
        }
        let (key, inline) = match arg.split_once('=') {
            Some((k, v)) => (k, Some(v.to_owned())),
            None => (arg.as_str(), None),
        };
        if !OPTIONS.contains(&key) {
            // Before the script every option must be ours; after it, the script's own.
            if positional.is_empty() && arg.starts_with('-') {
                return refuse("submit", &format!("unknown option {}", shown(key)));
            }
            positional.push(arg);
            continue;
        }
        let Some(value) = inline.or_else(|| it.next().cloned()) else {
            return refuse("submit", &format!("{key} needs a value"));
        };
        let option = match key {
            "--time" => match minutes(&value) {
                Some(m) => format!("--time={m}"),
                None => {
                    return refuse(
                        "submit",
                        &format!("--time {}: write it like 30m, 2h or 1d 12h", shown(&value)),
                    );
                }
            },
            "--gpus" => match value.parse::<u16>() {
                Ok(n) if n > 0 => format!("--gres=gpu:{n}"),
                _ => return refuse("submit", "--gpus takes a number of GPUs (1 or more)"),
            },
            "--nice" => match value.parse::<u32>() {
                Ok(n) if n <= 10_000 => format!("--nice={n}"),
                _ => {
                    return refuse(
                        "submit",
                        "--nice takes 0 to 10000 (higher = lower priority)",
                    );
                }
            },
            "--nodes" => match value.parse::<u16>() {
                Ok(n) if n > 0 => format!("--nodes={n}"),
                _ => return refuse("submit", "--nodes takes a number of nodes (1 or more)"),
            },
            _ => format!("--job-name={}", quote(&value)),
        };
        options.push(option);
    }
    let Some((script, script_args)) = positional.split_first() else {
        return refuse("submit", "the job script is missing");
    };
    if script.starts_with('-') {
        return refuse("submit", &format!("{} is not a script", shown(script)));
    }
    let mut command = format!("id=$(sbatch --parsable --partition={partition}");
    for option in &options {
        let _ = write!(command, " {option}");
    }
    for word in std::iter::once(script).chain(script_args) {
        let _ = write!(command, " {}", quote(word));
    }
    command.push_str(
        ") || exit $?\nid=${id%%;*}\necho \"$id\"\necho \"pool: job $id submitted; see it with: pool jobs, pool logs $id, pool cancel $id\" >&2",
    );
    Verb::Run {
        name: "submit",
        command,
    }
}

/// A command that prints `why` and the usage on stderr and exits 2.
fn refuse(name: &'static str, why: &str) -> Verb {
    Verb::Run {
        name,
        command: format!(
            "printf '%s\\n' {} {} >&2; exit 2",
            quote(&format!("pool: {why}")),
            quote(USAGE)
        ),
    }
}

/// Whole minutes of a human duration (`90m`, `2h`, `1d 12h`), at least 1, at most a year.
fn minutes(text: &str) -> Option<u64> {
    let d = humantime::parse_duration(text.trim()).ok()?;
    let m = d.as_secs().div_ceil(60);
    (1..=366 * 24 * 60).contains(&m).then_some(m)
}

/// A user's word inside a message, shown in double quotes (control characters dropped).
fn shown(word: &str) -> String {
    let clean: String = word.chars().filter(|c| !c.is_control()).take(80).collect();
    format!("\"{clean}\"")
}

/// POSIX-shell single quoting.
fn quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', "'\\''"))
}

/// Splits a command line into words the way a shell would for plain words, single and double
/// quotes and backslashes (no expansions). `None` for unbalanced quotes.
fn split_words(text: &str) -> Option<Vec<String>> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' | '\n' => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next()? {
                        '\'' => break,
                        c => word.push(c),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next()? {
                        '"' => break,
                        '\\' => word.push(chars.next()?),
                        c => word.push(c),
                    }
                }
            }
            '\\' => {
                in_word = true;
                word.push(chars.next()?);
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Some(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(text: &str) -> String {
        match rewrite(text.as_bytes(), "pool") {
            Verb::Run { command, .. } => command,
            Verb::NotOurs => panic!("{text} should be a pool verb"),
        }
    }

    #[test]
    fn other_commands_are_not_touched() {
        for text in [
            "ls -l",
            "pooling",
            "echo pool",
            "/usr/bin/pool submit x",
            "",
        ] {
            assert_eq!(rewrite(text.as_bytes(), "pool"), Verb::NotOurs, "{text}");
        }
        assert_eq!(rewrite(b"\xff\xfe", "pool"), Verb::NotOurs);
    }

    #[test]
    fn submit_maps_options_to_sbatch_and_quotes_every_word() {
        let c = run("pool submit train.sh --lr 0.1");
        assert!(
            c.starts_with("id=$(sbatch --parsable --partition='pool' 'train.sh' '--lr' '0.1')"),
            "{c}"
        );
        let c = run("pool submit --time 2h --gpus 1 --nice 10 --nodes=2 --name 'my job' 'a b.sh'");
        assert!(
            c.contains(
                "sbatch --parsable --partition='pool' --time=120 --gres=gpu:1 --nice=10 --nodes=2 --job-name='my job' 'a b.sh')"
            ),
            "{c}"
        );
        // Shell syntax in arguments stays text.
        let c = run("pool submit 'x.sh; rm -rf ~' '$(id)' \"`id`\"");
        assert!(c.contains("'x.sh; rm -rf ~' '$(id)' '`id`'"), "{c}");
        // Options after the script are ours too; after `--`, the script's.
        let c = run("pool submit job.sh --name n --verbose -- --time 3");
        assert!(
            c.contains("--job-name='n' 'job.sh' '--verbose' '--time' '3')"),
            "{c}"
        );
        let c = run("pool submit \"it's.sh\"");
        assert!(c.contains("'it'\\''s.sh'"), "{c}");
    }

    #[test]
    fn bad_arguments_print_the_problem_and_exit_2() {
        for (text, why) in [
            ("pool submit", "the job script is missing"),
            ("pool submit --time soon x.sh", "--time \"soon\""),
            ("pool submit --gpus 0 x.sh", "--gpus takes"),
            ("pool submit --nice -5 x.sh", "--nice takes"),
            (
                "pool submit --frobnicate 1 x.sh",
                "unknown option \"--frobnicate\"",
            ),
            ("pool submit --time", "--time needs a value"),
            ("pool logs", "takes one job id"),
            ("pool logs 12; reboot", "takes one job id"),
            ("pool cancel 1x", "\"1x\" is not a job id"),
            ("pool jobs --all", "takes no arguments"),
            ("pool frob", "unknown verb \"frob\""),
            ("pool", "a verb is missing"),
            ("pool submit 'x.sh", "unbalanced quotes"),
        ] {
            let c = run(text);
            assert!(c.ends_with(">&2; exit 2"), "{text}: {c}");
            assert!(c.contains(why), "{text}: {c}");
            assert!(c.contains("usage: pool submit"), "{text}: {c}");
        }
    }

    #[test]
    fn logs_and_cancel_check_the_owner_first() {
        let c = run("pool logs 42");
        assert!(
            c.starts_with("sh -c '") && c.ends_with("' pool-logs 42"),
            "{c}"
        );
        assert!(c.contains("is not yours"), "{c}");
        let c = run("pool cancel 42");
        assert!(c.contains("is not yours") && c.contains("scancel"), "{c}");
        let c = run("pool jobs");
        assert!(
            c.contains("squeue --me") && c.ends_with("pool-jobs 'pool'"),
            "{c}"
        );
    }

    #[test]
    fn durations_become_whole_minutes() {
        assert_eq!(minutes("30m"), Some(30));
        assert_eq!(minutes("90s"), Some(2));
        assert_eq!(minutes("1d 12h"), Some(2160));
        assert_eq!(minutes("0s"), None);
        assert_eq!(minutes("500d"), None);
    }
}
