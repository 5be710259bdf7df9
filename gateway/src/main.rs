//! `poolgate`: SSH/HTTP session-routing gateway for shared pools of data-science VMs.

use gateway::{app, cli};

use std::process::ExitCode;

use std::io::Write;

use clap::Parser;

use crate::cli::{Cli, Command, LogFormat};

fn main() -> ExitCode {
    // Sockets passed by the gateway this one upgrades (SIGUSR2), taken before any thread starts:
    // taking them edits the environment.
    let inherited = app::Inherited::from_env();
    let cli = Cli::parse();
    let json = matches!(cli.log_format, LogFormat::Json);
    // Held to the end: dropping it writes the log lines still waiting.
    let log = gateway::logging::init(json, &cli.log);
    gateway::metrics::count_log_drops(log.drops());
    // The access log writes its own lines (`http.access_log`), in the same format.
    gateway::http::access_log::use_json(json);
    match cli.command {
        Command::CheckConfig { file } => check_config(&file),
        Command::Run { config } => run(&config, inherited),
        Command::Status(admin) => admin_command(&admin, None),
        Command::Drain { vm, admin } => admin_command(&admin, Some((vm, true))),
        Command::Undrain { vm, admin } => admin_command(&admin, Some((vm, false))),
        Command::Demo(args) => demo(&args),
        Command::Simulate(args) => simulate(&args),
        Command::Keys(cli::KeysCommand::Init { dir }) => keys_init(&dir),
    }
}

/// Prints to stdout, ignoring a closed pipe (`poolgate status | head`).
macro_rules! out {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// The async runtime (multi-threaded for the gateway, single-threaded for CLI calls); `None`
/// after telling the user why it could not start.
fn runtime(multi_thread: bool) -> Option<tokio::runtime::Runtime> {
    let mut builder = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    match builder.enable_all().build() {
        Ok(rt) => Some(rt),
        Err(e) => {
            eprintln!("poolgate: cannot start the async runtime: {e}");
            None
        }
    }
}

fn check_config(file: &std::path::Path) -> ExitCode {
    match poolgate_config::load(file) {
        Ok(config) => {
            // What `run` would still refuse at start: certificate/key pairs, host-key files.
            let problems = app::check_startup(&config);
            if !problems.is_empty() {
                for problem in &problems {
                    out!("{problem}");
                }
                eprintln!("{}: {} error(s)", file.display(), problems.len());
                return ExitCode::FAILURE;
            }
            // Replicas of a cluster must have been given the same secrets.
            if config.cluster.as_ref().is_some_and(|c| c.is_shared()) {
                let checked =
                    runtime(false).map(|rt| rt.block_on(app::cluster::check_peers(&config)));
                match checked {
                    Some(Ok(Some(line))) => out!("{line}"),
                    Some(Ok(None)) | None => {}
                    Some(Err(e)) => {
                        out!("{e:#}");
                        eprintln!("{}: 1 error(s)", file.display());
                        return ExitCode::FAILURE;
                    }
                }
            }
            out!("{}: ok", file.display());
            for warning in config.warnings() {
                out!("warning: {warning}");
            }
            let _ = write!(std::io::stdout(), "{}", config.summary());
            print_host_keys(&config);
            print_user_ca(&config);
            ExitCode::SUCCESS
        }
        Err(poolgate_config::ConfigError::Invalid(errors)) => {
            for error in &errors {
                out!("{error}");
            }
            eprintln!("{}: {} error(s)", file.display(), errors.len());
            ExitCode::FAILURE
        }
        Err(other) => {
            out!("{other}");
            ExitCode::FAILURE
        }
    }
}

/// Names a host key that `run` would generate: a new key is what a first install wants, and
/// what a mistyped path must not do unseen (every user's ssh would then see the gateway's
/// identity change).
fn print_host_keys(config: &poolgate_config::Config) {
    if !config.listen.serves_ssh() {
        return;
    }
    for path in config.ssh.host_keys.iter().filter(|p| !p.exists()) {
        out!(
            "host key: {} does not exist yet; `poolgate run` generates a new one there, which \
             users' ssh asks them to trust (if this gateway already has a host key, fix \
             ssh.host_keys instead)",
            path.display()
        );
    }
}

/// Shows the public half of the user CA that VMs must trust (without creating anything).
fn print_user_ca(config: &poolgate_config::Config) {
    if !config.logs_in_to_vms() {
        out!(
            "user CA: not needed (listen.ssh = \"off\" and no busy check: nothing logs in to a VM over SSH)"
        );
        return;
    }
    let path = &config.ssh.user_ca_key;
    if !path.exists() {
        out!(
            "user CA: {} does not exist yet; `poolgate run` generates it and logs its public key",
            path.display()
        );
        return;
    }
    match app::user_ca(config) {
        Ok(ca) => {
            out!("user CA (put in the VMs' TrustedUserCAKeys file):");
            out!("{}", ca.public_line());
        }
        Err(e) => out!("ssh.user_ca_key: {e:#}"),
    }
}

fn run(path: &std::path::Path, inherited: app::Inherited) -> ExitCode {
    let config = match poolgate_config::load(path) {
        Ok(config) => config,
        Err(poolgate_config::ConfigError::Invalid(errors)) => {
            for error in &errors {
                eprintln!("{error}");
            }
            eprintln!(
                "{}: {} error(s); not starting",
                path.display(),
                errors.len()
            );
            return ExitCode::FAILURE;
        }
        Err(other) => {
            eprintln!("{other}");
            return ExitCode::FAILURE;
        }
    };
    let Some(runtime) = runtime(true) else {
        return ExitCode::FAILURE;
    };
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    match runtime.block_on(
        app::GatewayBuilder::new(config)
            .reload_from(path.to_path_buf())
            .inherit(inherited)
            .run(),
    ) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Once: as the log's last line (the journal's record, in the log's format), or on
            // standard error when the log filter leaves errors out.
            if tracing::enabled!(tracing::Level::ERROR) {
                tracing::error!("{e:#}");
            } else {
                eprintln!("poolgate: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

/// `demo`: the gateway in front of an in-process demo pool, on 127.0.0.1.
#[cfg(feature = "demo")]
fn demo(args: &cli::DemoArgs) -> ExitCode {
    let options = gateway::demo::setup::DemoOptions {
        ssh_port: args.ssh_port,
        http_port: args.http_port,
        admin_port: args.admin_port,
        min_vms: args.min_vms,
        max_vms: args.max_vms,
        boot_delay: args.boot_delay,
        scale_in_after: args.scale_in_after,
        scale_to_zero_after: args.scale_to_zero_after,
        state_dir: args.state_dir.clone(),
    };
    let Some(runtime) = runtime(true) else {
        return ExitCode::FAILURE;
    };
    let result = runtime.block_on(gateway::demo::setup::run(options));
    // Session programs still running are killed with their tasks.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("poolgate demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `demo` in a build without the `demo` feature.
#[cfg(not(feature = "demo"))]
fn demo(_: &cli::DemoArgs) -> ExitCode {
    eprintln!(
        "poolgate demo: this poolgate was built without the demo (cargo feature `demo`); \
         build it with default features to try it"
    );
    ExitCode::FAILURE
}

/// `simulate`: replays a trace through the autoscale policy and the baselines.
fn simulate(args: &cli::SimulateArgs) -> ExitCode {
    match gateway::simulate::run(args) {
        Ok(text) => {
            let _ = write!(std::io::stdout(), "{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("poolgate simulate: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `status`, `drain VM`, `undrain VM`: calls the admin API of a running gateway.
fn admin_command(args: &cli::AdminArgs, drain: Option<(String, bool)>) -> ExitCode {
    use gateway::admin::client;
    let token = match &args.token_file {
        Some(path) => match client::read_token(path) {
            Ok(token) => Some(token),
            Err(e) => {
                eprintln!("poolgate: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let Some(runtime) = runtime(false) else {
        return ExitCode::FAILURE;
    };
    let result = runtime.block_on(async {
        match drain {
            None => client::vms(args.admin, token.as_deref())
                .await
                .map(|vms| client::table(&vms)),
            Some((vm, drain)) => client::set_drain(args.admin, token.as_deref(), &vm, drain)
                .await
                .map(|v| {
                    if drain {
                        format!(
                            "{}: draining — open sessions continue, no new sessions go there\n",
                            v.name
                        )
                    } else {
                        format!("{}: {} — takes new sessions again\n", v.name, v.state)
                    }
                }),
        }
    });
    match result {
        Ok(text) => {
            let _ = write!(std::io::stdout(), "{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("poolgate: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `poolgate keys init DIR`.
fn keys_init(dir: &std::path::Path) -> ExitCode {
    match app::cluster::write_key_bundle(dir) {
        Ok(written) => {
            for path in &written {
                out!("wrote {}", path.display());
            }
            out!(
                "\nGive every replica these files (mode 0600, owned by the user poolgate runs as) and point its configuration at them:\n\n[ssh]\nhost_keys = [\"{}\"]\nuser_ca_key = \"{}\"\n\n[http]\ncookie_secret_file = \"{}\"",
                written[0].display(),
                written[1].display(),
                written[2].display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("poolgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}
