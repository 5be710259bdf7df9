//! poolgate configuration: serde types with per-field defaults, loading, and validation that
//! reports every problem with its key path.
//!
//! ```no_run
//! let config = poolgate_config::load(std::path::Path::new("/etc/poolgate/poolgate.toml"))?;
//! println!("{}", config.summary());
//! # Ok::<(), poolgate_config::ConfigError>(())
//! ```
//!
//! [`load`] returns only a configuration that parsed, validated and whose files check out;
//! otherwise a [`ConfigError`]: [`ConfigError::Io`] (file unreadable),
//! [`ConfigError::Parse`] (TOML syntax, with line and column) or [`ConfigError::Invalid`]
//! with every problem as `key.path: what is wrong (what to do)`.
//! docs/configuration.md documents every key; [`known_keys`] lists them.
//!
//! `poolgate simulate` reads a file with [`load_simulation`] instead: only `[autoscale]` and the
//! per-VM session cap it replays are validated, and no file the configuration names is opened.

mod de;
mod enums;
mod error;
mod files;
mod keys;
mod model;
mod serde_util;
mod simulation;
mod summary;
mod validate;

use std::path::{Path, PathBuf};

pub use enums::{
    Affinity, AzureCloud, BackendScheme, BatchEngine, Credential, Orchestration, PasswordAuth,
    Provider, StoreKind, Weekday,
};
pub use error::{ConfigError, ValidationError};
pub use keys::known_keys;
pub use model::{
    AccessLog, Admin, Autoscale, Azure, Backend, Batch, Cluster, Config, DEFAULT_BUSY_SCRIPT, Exec,
    GatewaySection, Health, Http, LETS_ENCRYPT_DIRECTORY, Listen, Pool, Routing, ScheduleWindow,
    Ssh, StateFile, TimeOfDay, Tls, default_busy_command,
};
pub use simulation::{SimulationConfig, load_simulation, parse_simulation};

/// Reads, parses and validates the configuration file at `path`, including the files it names
/// ([`Config::check_files`]). Relative paths in the file are resolved against the file's
/// directory, so the returned configuration holds absolute paths. Under a systemd service with
/// `StateDirectory=` (`$STATE_DIRECTORY` set), a `gateway.state_file` the file does not set goes
/// there: a service's configuration directory is usually read-only to it.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    load_in(path, systemd_state_directory().as_deref())
}

/// systemd's state directory for the service, from `$STATE_DIRECTORY`.
pub(crate) fn systemd_state_directory() -> Option<PathBuf> {
    first_state_directory(std::env::var_os("STATE_DIRECTORY")?.to_str()?)
}

/// The first directory of `$STATE_DIRECTORY` (colon-separated when `StateDirectory=` names
/// several), if it is an absolute path.
fn first_state_directory(value: &str) -> Option<PathBuf> {
    let first = PathBuf::from(value.split(':').next()?);
    first.is_absolute().then_some(first)
}

/// [`load`] with the state directory given.
fn load_in(path: &Path, state_directory: Option<&Path>) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let parent = path.parent().unwrap_or(Path::new(""));
    let base_dir = std::path::absolute(parent).unwrap_or_else(|_| parent.to_path_buf());
    let (config, mut errors) = parse_collecting(&text, &base_dir, state_directory, path)?;
    errors.extend(config.check_files());
    finish(config, errors)
}

/// Parses and validates configuration text as if it were a file in `base_dir` (relative paths
/// are joined to it). Does not touch the filesystem: [`load`] also runs
/// [`Config::check_files`]. Parse errors name the file `<config>`.
pub fn parse(text: &str, base_dir: &Path) -> Result<Config, ConfigError> {
    let (config, errors) = parse_collecting(text, base_dir, None, Path::new("<config>"))?;
    finish(config, errors)
}

/// Parses, resolves paths and validates, returning the configuration with every problem found.
fn parse_collecting(
    text: &str,
    base_dir: &Path,
    state_directory: Option<&Path>,
    file: &Path,
) -> Result<(Config, Vec<ValidationError>), ConfigError> {
    let de::Outcome {
        mut config,
        mut errors,
        dropped,
    } = de::deserialize(text, file)?;
    config.resolve_paths_in(base_dir, state_directory);
    let provider_known = !dropped.iter().any(|k| k == "pool.provider" || k == "pool");
    // A key whose value was dropped holds its default now; don't report that default too.
    let shadowed = |key: &str| {
        dropped.iter().any(|d| {
            key == d
                || key
                    .strip_prefix(d.as_str())
                    .is_some_and(|rest| rest.starts_with(['.', '[']))
        })
    };
    errors.extend(
        config
            .validate_with(provider_known)
            .into_iter()
            .filter(|e| !shadowed(&e.key)),
    );
    Ok((config, errors))
}

fn finish(config: Config, mut errors: Vec<ValidationError>) -> Result<Config, ConfigError> {
    let mut seen = std::collections::HashSet::new();
    errors.retain(|e| seen.insert(e.clone()));
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid(errors))
    }
}

#[cfg(test)]
mod tests;
