//! Command-line interface: `poolgate run | check-config | demo | status | drain | undrain | simulate`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// poolgate — one front door (SSH and HTTPS) for a shared pool of data-science VMs.
#[derive(Debug, Parser)]
#[command(name = "poolgate", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Log format: human-readable text, or one JSON object per line for log shippers.
    #[arg(long, global = true, help_heading = "Logging", value_enum, default_value_t = LogFormat::Text, env = "POOLGATE_LOG_FORMAT")]
    pub log_format: LogFormat,

    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `poolgate=debug,russh=warn`.
    #[arg(
        long,
        global = true,
        help_heading = "Logging",
        default_value = "info",
        env = "POOLGATE_LOG"
    )]
    pub log: String,

    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Sub-commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway with a configuration file.
    Run {
        /// Path to the TOML configuration file.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate a configuration file: lists every error with its key path (exit 1), or
    /// prints a summary of the pool it would serve (exit 0).
    CheckConfig {
        /// Path to the TOML configuration file.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Run a self-contained demo: the gateway in front of an in-process pool, on 127.0.0.1.
    Demo(DemoArgs),
    /// Print the pool as a table (VMs, state, sessions), read from the admin API.
    Status(AdminArgs),
    /// Drain a VM: it keeps its open sessions and receives no new ones.
    Drain {
        /// VM name, as listed by `poolgate status`.
        vm: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Undrain a VM: it takes new sessions again.
    Undrain {
        /// VM name, as listed by `poolgate status`.
        vm: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Replay a session trace through the autoscale policy and compare it with baselines.
    Simulate(SimulateArgs),
    /// Key material shared by gateway replicas.
    #[command(subcommand)]
    Keys(KeysCommand),
}

/// `poolgate keys …`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Writes a new SSH host key, user CA key and cookie secret into DIR (mode 0600), once, for
    /// every replica of a cluster to be given the same files. Refuses to overwrite a file.
    Init {
        /// Directory to write into (created 0700 when missing).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

/// Options of `poolgate demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// SSH listener port (on 127.0.0.1).
    #[arg(long, default_value_t = 2222)]
    pub ssh_port: u16,
    /// HTTP listener port (on 127.0.0.1).
    #[arg(long, default_value_t = 8080)]
    pub http_port: u16,
    /// Admin listener port (on 127.0.0.1): /status, /metrics, /api/v1.
    #[arg(long, default_value_t = 9090)]
    pub admin_port: u16,
    /// Fewest demo VMs kept running.
    #[arg(long, default_value_t = 0)]
    pub min_vms: u32,
    /// Most demo VMs the autoscaler may start (the demo pool has this many VMs).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub max_vms: u32,
    /// Time a starting demo VM takes to boot.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration, hide = true)]
    pub boot_delay: std::time::Duration,
    /// A demo VM idle this long is drained and stopped.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub scale_in_after: std::time::Duration,
    /// The whole pool idle this long: down to --min-vms.
    #[arg(long, default_value = "90s", value_parser = humantime::parse_duration)]
    pub scale_to_zero_after: std::time::Duration,
    /// Directory for the demo's keys [default: $XDG_STATE_HOME/poolgate-demo or
    /// ~/.local/state/poolgate-demo].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

/// How to reach the admin API.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// Address of the gateway's admin listener.
    #[arg(long, default_value = "127.0.0.1:9090", env = "POOLGATE_ADMIN")]
    pub admin: SocketAddr,
    /// File holding the admin bearer token (when the gateway has `admin.token_file` set).
    #[arg(long, value_name = "FILE", env = "POOLGATE_ADMIN_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

/// Options of `poolgate simulate`.
#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Session trace: CSV with header `user,protocol,start_s,end_s`.
    #[arg(long, value_name = "FILE")]
    pub trace: PathBuf,
    /// Detached jobs (tmux, nohup, cron work the gateway does not see): CSV with header
    /// `user,start_s,end_s`. A job killed by a scale-in counts in `killed_sessions`.
    #[arg(long, value_name = "FILE")]
    pub jobs: Option<PathBuf>,
    /// Batch jobs submitted to the queue (Slurm on the pool VMs): CSV with header
    /// `job,submit_s,duration_s,nodes`. Adds job wait p50/p95, killed (requeued) jobs and
    /// their lost node-hours to the report (JSON keys `job_wait_p50_s`, `job_wait_p95_s`,
    /// `job_wait_max_s`, `killed_batch_jobs`, `lost_batch_node_hours`).
    #[arg(long, value_name = "FILE")]
    pub batch: Option<PathBuf>,
    /// Configuration whose `[autoscale]` section is replayed (defaults otherwise): a what-if
    /// file holding only `[autoscale]`, or a full gateway configuration. Only `[autoscale]`
    /// and the provider's `max_sessions` are validated; no file it names is opened.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Simulated VM boot time in seconds.
    #[arg(long, default_value_t = 90)]
    pub boot_seconds: u64,
    /// Wall-clock time of the trace's second 0, for `[[autoscale.schedule]]` windows:
    /// `2026-12-07T00:00` (in the first window's time zone) or with an offset
    /// (`2026-12-07T00:00:00+01:00`, `…Z`). Default: Monday 2024-01-01 00:00 in that zone.
    #[arg(long, value_name = "TIME")]
    pub trace_start: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
}

/// Output format of reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// A human-readable table.
    Text,
    /// One JSON object.
    Json,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_every_subcommand() {
        for args in [
            &["poolgate", "run", "--config", "x.toml"][..],
            &["poolgate", "check-config", "x.toml"],
            &["poolgate", "demo", "--max-vms", "2"],
            &[
                "poolgate",
                "demo",
                "--ssh-port",
                "2022",
                "--scale-in-after",
                "5s",
                "--boot-delay",
                "500ms",
            ],
            &["poolgate", "status"],
            &["poolgate", "drain", "dsvm-1"],
            &["poolgate", "undrain", "dsvm-1", "--admin", "127.0.0.1:9999"],
            &[
                "poolgate", "simulate", "--trace", "t.csv", "--batch", "b.csv", "--format", "json",
            ],
            &["poolgate", "--log-format", "json", "status"],
        ] {
            Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        }
    }
}
