//! `poolgate`: SSH/HTTP session-routing gateway for shared pools of data-science VMs.

mod cli;

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::cli::{Cli, Command, LogFormat};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format, &cli.log);
    match cli.command {
        Command::CheckConfig { file } => check_config(&file),
        other => not_implemented(&other),
    }
}

fn init_tracing(format: LogFormat, filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|e| {
        eprintln!("poolgate: invalid --log filter {filter:?} ({e}); using \"info\"");
        EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn check_config(file: &std::path::Path) -> ExitCode {
    match poolgate_config::load(file) {
        Ok(config) => {
            println!("{}: ok", file.display());
            print!("{}", config.summary());
            ExitCode::SUCCESS
        }
        Err(poolgate_config::ConfigError::Invalid(errors)) => {
            for error in &errors {
                println!("{error}");
            }
            eprintln!("{}: {} error(s)", file.display(), errors.len());
            ExitCode::FAILURE
        }
        Err(other) => {
            println!("{other}");
            ExitCode::FAILURE
        }
    }
}

fn not_implemented(command: &Command) -> ExitCode {
    let name = match command {
        Command::Run { .. } => "run",
        Command::CheckConfig { .. } => "check-config",
        Command::Demo(_) => "demo",
        Command::Status(_) => "status",
        Command::Drain { .. } => "drain",
        Command::Undrain { .. } => "undrain",
        Command::Simulate(_) => "simulate",
    };
    eprintln!("poolgate {name}: not implemented yet");
    ExitCode::from(2)
}
