//! What `poolgate simulate --config FILE` reads: the `[autoscale]` section and the per-VM
//! session cap of the provider section, validated with the same messages and key paths as
//! `check-config`. Nothing else in the file is validated and no file it names is opened, so a
//! what-if file holding only `[autoscale]` works, and so does a full gateway configuration
//! whose keys or known_hosts live on another machine.

use std::path::Path;

use crate::de;
use crate::enums::Provider;
use crate::error::{ConfigError, ValidationError};
use crate::model::{Autoscale, Config};
use crate::validate::{Report, autoscale_policy, max_sessions};

/// The settings a simulation replays.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SimulationConfig {
    /// `[autoscale]`.
    pub autoscale: Autoscale,
    /// The per-VM session cap of the provider `pool.provider` names: `pool.exec.max_sessions`,
    /// `pool.azure.max_sessions`, or the smallest `pool.backends[].max_sessions`; `None` when
    /// that section is absent (or for the demo provider).
    pub max_sessions: Option<u32>,
}

impl SimulationConfig {
    /// The simulation settings of a full configuration.
    pub fn from_config(config: &Config) -> Self {
        let pool = &config.pool;
        let max_sessions = match pool.provider {
            Provider::AzureVmss => pool.azure.as_ref().map(|az| az.max_sessions),
            Provider::Exec => pool.exec.as_ref().map(|ex| ex.max_sessions),
            Provider::Static => pool.backends.iter().map(|b| b.max_sessions).min(),
            Provider::Demo => None,
        };
        Self {
            autoscale: config.autoscale.clone(),
            max_sessions,
        }
    }
}

/// Reads the file at `path` for `poolgate simulate`: TOML syntax errors anywhere are reported
/// (with line and column); wrong values and unknown keys only inside `[autoscale]`, in the
/// provider's `max_sessions` and `pool.provider`, and unknown top-level sections (a misspelt
/// `[autoscale]` must not silently replay the defaults).
pub fn load_simulation(path: &Path) -> Result<SimulationConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_simulation_in(&text, path)
}

/// [`load_simulation`] for configuration text; parse errors name the file `<config>`.
pub fn parse_simulation(text: &str) -> Result<SimulationConfig, ConfigError> {
    parse_simulation_in(text, Path::new("<config>"))
}

fn parse_simulation_in(text: &str, file: &Path) -> Result<SimulationConfig, ConfigError> {
    let de::Outcome {
        config,
        errors: shape_and_unknown,
        dropped,
    } = de::deserialize(text, file)?;
    let provider = config.pool.provider;
    let is_dropped = |key: &str| dropped.iter().any(|d| d == key);
    let mut errors: Vec<ValidationError> = shape_and_unknown
        .into_iter()
        .filter(|e| {
            in_autoscale(&e.key)
                || used_pool_key(&e.key, provider)
                || (one_segment(&e.key) && !is_dropped(&e.key))
        })
        .collect();

    let mut r = Report::default();
    autoscale_policy(&config.autoscale, &mut r);
    let simulation = SimulationConfig::from_config(&config);
    match (provider, &config.pool.azure, &config.pool.exec) {
        (Provider::AzureVmss, Some(az), _) => max_sessions(&mut r, "pool.azure", az.max_sessions),
        (Provider::Exec, _, Some(ex)) => max_sessions(&mut r, "pool.exec", ex.max_sessions),
        (Provider::Static, _, _) => {
            for (i, b) in config.pool.backends.iter().enumerate() {
                max_sessions(&mut r, &format!("pool.backends[{i}]"), b.max_sessions);
            }
        }
        _ => {}
    }
    // A value that was dropped holds its default now; don't report that default too.
    errors.extend(r.0.into_iter().filter(|e| {
        !dropped.iter().any(|d| {
            e.key == *d
                || e.key
                    .strip_prefix(d.as_str())
                    .is_some_and(|rest| rest.starts_with(['.', '[']))
        })
    }));
    let mut seen = std::collections::HashSet::new();
    errors.retain(|e| seen.insert(e.clone()));
    if errors.is_empty() {
        Ok(simulation)
    } else {
        Err(ConfigError::Invalid(errors))
    }
}

/// `autoscale`, `autoscale.x`, `autoscale.x[1].y`.
fn in_autoscale(key: &str) -> bool {
    key.strip_prefix("autoscale")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
}

/// A key path of one segment: `frobnicate`, `"odd key"` (a top-level key).
fn one_segment(key: &str) -> bool {
    match key.strip_prefix('"') {
        Some(quoted) => quoted
            .strip_suffix('"')
            .is_some_and(|inner| !inner.contains("\".") && !inner.contains("\"[")),
        None => !key.contains(['.', '[']),
    }
}

/// `pool.provider`, the provider's `max_sessions` and the tables holding it.
fn used_pool_key(key: &str, provider: Provider) -> bool {
    if matches!(key, "pool" | "pool.provider") {
        return true;
    }
    let section = match provider {
        Provider::AzureVmss => "pool.azure",
        Provider::Exec => "pool.exec",
        Provider::Static => "pool.backends",
        Provider::Demo => return false,
    };
    let Some(rest) = key.strip_prefix(section) else {
        return false;
    };
    if rest.is_empty() || rest == ".max_sessions" {
        return true;
    }
    // pool.backends[3] or pool.backends[3].max_sessions
    rest.strip_prefix('[')
        .and_then(|r| r.split_once(']'))
        .is_some_and(|(index, tail)| {
            !index.is_empty()
                && index.bytes().all(|b| b.is_ascii_digit())
                && (tail.is_empty() || tail == ".max_sessions")
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn errors(text: &str) -> Vec<String> {
        match parse_simulation(text) {
            Err(ConfigError::Invalid(errors)) => errors.iter().map(ToString::to_string).collect(),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn only_autoscale_is_enough() {
        let s = parse_simulation(
            "[autoscale]\nenabled = true\nmax_vms = 3\nsessions_per_vm = 6\nscale_in_after = \"2m\"\n",
        )
        .unwrap();
        assert_eq!(s.autoscale.max_vms, 3);
        assert_eq!(s.autoscale.sessions_per_vm, 6);
        assert_eq!(s.autoscale.scale_in_after, Duration::from_secs(120));
        // `enabled = true` with the default static provider is a check-config error, but the
        // simulation replays the policy whatever runs it.
        assert!(s.autoscale.enabled);
        assert_eq!(s.max_sessions, None);
        assert_eq!(parse_simulation("").unwrap(), SimulationConfig::default());
    }

    #[test]
    fn autoscale_errors_have_the_check_config_messages() {
        let text = "[autoscale]\nmin_vms = 5\nmax_vms = 2\ntick = \"0s\"\ncooldwn = \"1m\"\nspare_vms = -1\n";
        let errs = errors(text);
        let full = match crate::parse(text, Path::new("/")) {
            Err(ConfigError::Invalid(errors)) => errors
                .iter()
                .map(ToString::to_string)
                .filter(|e| e.starts_with("autoscale."))
                .collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        };
        assert_eq!(errs, full);
        for expected in [
            "autoscale.min_vms: 5 is more than autoscale.max_vms (2) (lower min_vms or raise max_vms)",
            "autoscale.tick: must be longer than 0s (write a duration like \"30s\" or \"5m\")",
            "autoscale.cooldwn: unknown key (did you mean \"cooldown\"?)",
        ] {
            assert!(errs.iter().any(|e| e == expected), "{expected}: {errs:#?}");
        }
        assert!(
            errs.iter().any(|e| e.starts_with("autoscale.spare_vms: ")),
            "{errs:#?}"
        );
        assert_eq!(errs.len(), 4, "{errs:#?}");
    }

    #[test]
    fn a_misspelt_section_is_reported_not_ignored() {
        assert_eq!(
            errors("[autoscal]\nmax_vms = 3\n"),
            ["autoscal: unknown key (did you mean \"autoscale\"?)"]
        );
    }

    #[test]
    fn the_rest_of_a_gateway_config_is_not_checked() {
        // No backends, missing files, bad values outside [autoscale]: all unused here.
        let s = parse_simulation(
            r#"
[listen]
ssh = "not an address"
[ssh]
backend_known_hosts = "/nonexistent/known_hosts"
nonsense = 1
[tls]
cert = "/nonexistent/cert.pem"
key = "/nonexistent/key.pem"
[pool]
provider = "exec"
[pool.exec]
list = []
max_sessions = 5
ssh_port = 70000
[autoscale]
max_vms = 4
"#,
        )
        .unwrap();
        assert_eq!(s.max_sessions, Some(5));
        assert_eq!(s.autoscale.max_vms, 4);
    }

    #[test]
    fn the_cap_it_uses_is_checked() {
        assert_eq!(
            errors("[pool]\nprovider = \"exec\"\n[pool.exec]\nmax_sessions = 0\n"),
            [
                "pool.exec.max_sessions: must be at least 1 (a VM that takes no sessions is useless; drain it instead)"
            ]
        );
        let errs = errors(
            "[[pool.backends]]\nname = \"a\"\nmax_sessions = 2\n[[pool.backends]]\nname = \"b\"\nmax_sessions = -3\nweight = -1\n",
        );
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert!(
            errs[0].starts_with("pool.backends[1].max_sessions: "),
            "{errs:#?}"
        );
        // Another provider's section is not used.
        let s = parse_simulation(
            "[pool]\nprovider = \"azure-vmss\"\n[pool.azure]\nmax_sessions = 3\n[pool.exec]\nmax_sessions = 0\n",
        )
        .unwrap();
        assert_eq!(s.max_sessions, Some(3));
        assert!(
            errors("[pool]\nprovider = \"nope\"\n")[0]
                .starts_with("pool.provider: unknown provider")
        );
    }

    #[test]
    fn key_helpers() {
        assert!(in_autoscale("autoscale"));
        assert!(in_autoscale("autoscale.tick"));
        assert!(!in_autoscale("autoscaler"));
        assert!(one_segment("frobnicate"));
        assert!(one_segment("\"a.b\""));
        assert!(!one_segment("a.b"));
        assert!(!one_segment("\"a\".b"));
        assert!(used_pool_key(
            "pool.backends[12].max_sessions",
            Provider::Static
        ));
        assert!(used_pool_key("pool.backends[0]", Provider::Static));
        assert!(!used_pool_key("pool.backends[0].weight", Provider::Static));
        assert!(!used_pool_key("pool.backends[0]", Provider::Exec));
        assert!(used_pool_key("pool.exec.max_sessions", Provider::Exec));
        assert!(!used_pool_key("pool.exec.list", Provider::Exec));
    }
}
