//! Whole-crate tests: `load` and `parse` end to end, the shipped examples, and the docs.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use crate::{ConfigError, Provider, first_state_directory, known_keys, load, load_in, parse};

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn invalid(result: Result<crate::Config, ConfigError>) -> Vec<String> {
    match result {
        Err(ConfigError::Invalid(errors)) => errors.iter().map(ToString::to_string).collect(),
        other => panic!("expected Invalid, got {other:?}"),
    }
}

fn contains(errs: &[String], expected: &str) {
    assert!(
        errs.iter().any(|e| e == expected),
        "{expected:?} not in {errs:#?}"
    );
}

#[test]
fn examples_load() {
    for name in ["static.toml", "azure-vmss.toml", "exec.toml"] {
        let path = crate_dir().join("examples").join(name);
        let config = load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            config.ssh.user_ca_key.is_absolute(),
            "{name}: paths are resolved"
        );
        assert!(config.summary().contains("pool: "), "{name}");
    }
    let static_pool = load(&crate_dir().join("examples/static.toml")).unwrap();
    assert_eq!(static_pool.pool.backends.len(), 3);
    assert_eq!(
        static_pool.ssh.backend_known_hosts,
        Some(crate_dir().join("examples/keys/backend_known_hosts"))
    );
    let azure = load(&crate_dir().join("examples/azure-vmss.toml")).unwrap();
    assert_eq!(azure.pool.provider, Provider::AzureVmss);
    assert!(azure.autoscale.enabled);
}

#[test]
fn missing_file_is_an_io_error_naming_the_file() {
    let err = load(Path::new("/nonexistent/poolgate.toml")).unwrap_err();
    assert!(
        matches!(&err, ConfigError::Io { path, .. } if path == Path::new("/nonexistent/poolgate.toml"))
    );
    let shown = err.to_string();
    assert!(
        shown.starts_with("cannot read config file /nonexistent/poolgate.toml: "),
        "{shown}"
    );
    assert!(!shown.contains('\n'));
}

#[test]
fn parse_error_names_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("poolgate.toml");
    fs::write(&path, "[listen]\nssh = \"0.0.0.0:2222\"\n[health\n").unwrap();
    let err = load(&path).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}:3:8: unclosed table, expected `]`, in `[health`",
            path.display()
        )
    );
    let err = parse("a = [", Path::new("/")).unwrap_err();
    assert!(matches!(err, ConfigError::Parse { line: 1, .. }), "{err}");
    assert!(err.to_string().starts_with("<config>:1:"), "{err}");
}

/// One file with mistakes of every kind: each is reported once, by key, in one error.
#[test]
fn load_reports_every_mistake_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("poolgate.toml");
    fs::write(
        &path,
        r#"
[listen]
https = "0.0.0.0:8443"

[ssh]
pasword_auth = "passthrough"
login_grace = "30 parsecs"
backend_known_hosts = "known_hosts"

[health]
interval = "5s"
timeout = "10s"

[[pool.backends]]
name = "dsvm-1"
host = "10.0.0.4"

[[pool.backends]]
name = "dsvm-2"
host = "10.0.0.5"
ssh_port = 0
wieght = 2

[[pool.backends]]
name = "dsvm-1"
host = "10.0.0.6"

[autoscale]
min_vms = 5
max_vms = 3
"#,
    )
    .unwrap();
    let errs = invalid(load(&path));
    let known_hosts = dir.path().join("known_hosts");
    for expected in [
        "ssh.login_grace: invalid duration \"30 parsecs\": unknown unit \"parsecs\" (units: ms, s, m, h, d; also sec, min, hours, days, weeks) (write it like \"30s\", \"15m\" or \"1h 30m\")",
        "ssh.pasword_auth: unknown key (did you mean \"password_auth\"?)",
        "pool.backends[1].wieght: unknown key (did you mean \"weight\"?)",
        "listen.https: HTTPS needs a [tls] section with cert and key, or with acme_domains (add [tls], or remove listen.https)",
        "health.timeout: 10s is longer than health.interval (5s) (make the timeout at most the interval)",
        "pool.backends[1].ssh_port: must be between 1 and 65535",
        "pool.backends[2].name: duplicate VM name \"dsvm-1\" (also pool.backends[0])",
        "autoscale.min_vms: 5 is more than autoscale.max_vms (3) (lower min_vms or raise max_vms)",
        &format!(
            "ssh.backend_known_hosts: {0} does not exist (create it with: ssh-keyscan -p 22 10.0.0.4 10.0.0.6 >> {0}; or set ssh.backend_host_ca)",
            known_hosts.display()
        ),
    ] {
        contains(&errs, expected);
    }
    assert_eq!(errs.len(), 9, "{errs:#?}");
}

#[test]
fn unknown_provider_does_not_hide_other_errors_or_invent_new_ones() {
    let errs = invalid(parse(
        "[pool]\nprovider = \"azure\"\n[autoscale]\nenabled = true\nsessions_per_vm = 0\n",
        Path::new("/etc/poolgate"),
    ));
    assert_eq!(
        errs,
        vec![
            "pool.provider: unknown provider \"azure\" (expected one of: static, azure-vmss, exec, demo)",
            "autoscale.sessions_per_vm: must be at least 1 (the target load per VM)",
        ]
    );
}

#[test]
fn out_of_range_port_is_reported_like_port_zero() {
    let text = "[[pool.backends]]\nname = \"a\"\nhost = \"h\"\n[[pool.backends]]\nname = \"b\"\nhost = \"h2\"\nssh_port = 70000\nhttp_port = 0\n";
    let errs = invalid(parse(text, Path::new("/")));
    assert_eq!(
        errs,
        vec![
            "pool.backends[1].ssh_port: must be between 1 and 65535",
            "pool.backends[1].http_port: must be between 1 and 65535",
        ]
    );
}

#[test]
fn parse_resolves_relative_paths_and_keeps_absolute_ones() {
    let text = r#"
[admin]
token_file = "/run/secrets/admin_token"
[tls]
cert = "tls/cert.pem"
key = "../private/key.pem"
[listen]
https = "0.0.0.0:8443"
[[pool.backends]]
name = "a"
host = "10.0.0.4"
"#;
    let c = parse(text, Path::new("/etc/poolgate")).unwrap();
    let tls = c.tls.unwrap();
    assert_eq!(tls.cert, PathBuf::from("/etc/poolgate/tls/cert.pem"));
    assert_eq!(tls.key, PathBuf::from("/etc/poolgate/../private/key.pem"));
    assert_eq!(
        c.admin.token_file,
        Some(PathBuf::from("/run/secrets/admin_token"))
    );
    assert_eq!(
        c.ssh.host_keys,
        vec![PathBuf::from("/etc/poolgate/keys/ssh_host_ed25519_key")]
    );
}

#[test]
fn access_log_is_stderr_off_or_a_file_relative_to_the_config() {
    use crate::AccessLog;
    let backend = "[[pool.backends]]\nname = \"a\"\nhost = \"10.0.0.4\"\n";
    let c = parse(backend, Path::new("/etc/poolgate")).unwrap();
    assert_eq!(c.http.access_log, AccessLog::Stderr, "the default");
    for (value, expected) in [
        ("stderr", AccessLog::Stderr),
        ("off", AccessLog::Off),
        (
            "logs/access.log",
            AccessLog::File("/etc/poolgate/logs/access.log".into()),
        ),
        (
            "/var/log/poolgate/access.log",
            AccessLog::File("/var/log/poolgate/access.log".into()),
        ),
    ] {
        let text = format!("[http]\naccess_log = \"{value}\"\n{backend}");
        let c = parse(&text, Path::new("/etc/poolgate")).unwrap();
        assert_eq!(c.http.access_log, expected, "{value}");
        // It writes back as it was read (absolute once resolved).
        let again = parse(&toml::to_string(&c).unwrap(), Path::new("/")).unwrap();
        assert_eq!(again.http.access_log, expected, "{value} round trip");
    }
    for (text, error) in [
        ("access_log = \"\"", "must not be empty"),
        ("access_log = 1", "\"stderr\", \"off\" or a file path"),
        ("access_log = \"~/access.log\"", "does not expand"),
    ] {
        let errs = invalid(parse(&format!("[http]\n{text}\n{backend}"), Path::new("/")));
        assert!(
            errs.iter()
                .any(|e| e.starts_with("http.access_log: ") && e.contains(error)),
            "{text}: {errs:#?}"
        );
    }
}

#[test]
fn state_file_is_beside_the_config_by_default_off_or_a_path() {
    use crate::StateFile;
    let backend = "[[pool.backends]]\nname = \"a\"\nhost = \"10.0.0.4\"\n";
    let c = parse(backend, Path::new("/etc/poolgate")).unwrap();
    assert_eq!(
        c.gateway.state_file,
        StateFile::File("/etc/poolgate/state.json".into()),
        "the default"
    );
    assert!(
        c.summary()
            .contains("drains and users' VMs: kept across restarts in /etc/poolgate/state.json\n"),
        "{}",
        c.summary()
    );
    for (value, expected) in [
        ("off", StateFile::Off),
        (
            "/var/lib/poolgate/state.json",
            StateFile::File("/var/lib/poolgate/state.json".into()),
        ),
        (
            "run/state.json",
            StateFile::File("/etc/poolgate/run/state.json".into()),
        ),
    ] {
        let text = format!("[gateway]\nstate_file = \"{value}\"\n{backend}");
        let c = parse(&text, Path::new("/etc/poolgate")).unwrap();
        assert_eq!(c.gateway.state_file, expected, "{value}");
        let again = parse(&toml::to_string(&c).unwrap(), Path::new("/")).unwrap();
        assert_eq!(again.gateway.state_file, expected, "{value} round trip");
        if value == "off" {
            assert!(
                c.summary().contains("forgotten at a restart"),
                "{}",
                c.summary()
            );
        }
    }
    for (text, error) in [
        ("state_file = \"\"", "must not be empty"),
        ("state_file = true", "\"off\" or a file path"),
        ("state_file = \"~/state.json\"", "does not expand"),
    ] {
        let errs = invalid(parse(
            &format!("[gateway]\n{text}\n{backend}"),
            Path::new("/"),
        ));
        assert!(
            errs.iter()
                .any(|e| e.starts_with("gateway.state_file: ") && e.contains(error)),
            "{text}: {errs:#?}"
        );
    }
}

/// Under a systemd service with `StateDirectory=` the default state file goes there (the
/// configuration directory is read-only to the service); a path the file gives stays where it
/// says, and without a state directory the default is beside the file.
#[test]
fn the_default_state_file_goes_to_systemds_state_directory() {
    use crate::StateFile;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("poolgate.toml");
    // HTTP only: no VM host keys to check.
    let backend = "[listen]\nssh = \"off\"\n[[pool.backends]]\nname = \"a\"\nhost = \"10.0.0.4\"\n";
    let state = Path::new("/var/lib/poolgate");
    for (text, with_systemd, without) in [
        (
            backend.to_owned(),
            state.join("state.json"),
            dir.path().join("state.json"),
        ),
        (
            format!("[gateway]\nshutdown_grace = \"1m\"\n{backend}"),
            state.join("state.json"),
            dir.path().join("state.json"),
        ),
        (
            format!("[gateway]\nstate_file = \"state.json\"\n{backend}"),
            dir.path().join("state.json"),
            dir.path().join("state.json"),
        ),
        (
            format!("[gateway]\nstate_file = \"/srv/pg/state.json\"\n{backend}"),
            "/srv/pg/state.json".into(),
            "/srv/pg/state.json".into(),
        ),
    ] {
        fs::write(&path, &text).unwrap();
        let c = load_in(&path, Some(state)).unwrap();
        assert_eq!(
            c.gateway.state_file,
            StateFile::File(with_systemd),
            "{text}"
        );
        let c = load_in(&path, None).unwrap();
        assert_eq!(c.gateway.state_file, StateFile::File(without), "{text}");
    }
    assert_eq!(
        first_state_directory("/var/lib/poolgate:/var/lib/poolgate/keys"),
        Some(state.to_path_buf())
    );
    assert_eq!(first_state_directory("poolgate"), None);
    assert_eq!(first_state_directory(""), None);
    fs::write(&path, format!("[gateway]\nstate_file = \"off\"\n{backend}")).unwrap();
    assert_eq!(
        load_in(&path, Some(state)).unwrap().gateway.state_file,
        StateFile::Off
    );
}

#[test]
fn load_with_a_relative_path_gives_absolute_paths() {
    let c = load(Path::new("examples/static.toml")).unwrap();
    assert!(c.http.cookie_secret_file.is_absolute());
    let keys_dir = c.http.cookie_secret_file.parent().unwrap();
    assert_eq!(
        keys_dir.canonicalize().unwrap(),
        crate_dir().join("examples/keys").canonicalize().unwrap()
    );
}

#[test]
fn default_config_roundtrips_through_toml() {
    let mut c = crate::Config::default();
    c.pool.backends.push(crate::Backend {
        name: "a".into(),
        host: "10.0.0.4".into(),
        ..crate::Backend::default()
    });
    let text = toml::to_string(&c).unwrap();
    let mut expected = c.clone();
    expected.resolve_paths(Path::new("/srv"));
    assert_eq!(parse(&text, Path::new("/srv")).unwrap(), expected);
}

/// Keys in docs/configuration.md: the first column of table rows, written as `` `key` ``.
fn documented_keys() -> BTreeSet<String> {
    let doc = fs::read_to_string(crate_dir().join("../docs/configuration.md"))
        .expect("docs/configuration.md is readable");
    doc.lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split_once('`'))
        .map(|(key, _)| key.to_owned())
        .collect()
}

#[test]
fn docs_list_exactly_the_known_keys() {
    let known: BTreeSet<String> = known_keys().into_iter().collect();
    let documented = documented_keys();
    let undocumented: Vec<_> = known.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&known).collect();
    assert!(
        undocumented.is_empty(),
        "keys missing from docs/configuration.md: {undocumented:?}"
    );
    assert!(
        unknown.is_empty(),
        "docs/configuration.md documents keys the crate does not know: {unknown:?}"
    );
}

/// A client silent for about ten minutes is kept (a laptop closed for a meeting), as sshd
/// configured for idle users would: 20 keepalives, 30 s apart.
#[test]
fn a_silent_client_is_kept_about_ten_minutes_by_default() {
    let c = crate::Config::default();
    assert_eq!(
        c.ssh.client_alive_interval,
        std::time::Duration::from_secs(30)
    );
    assert_eq!(c.ssh.client_alive_count_max, 20);
    let text = "[ssh]\nclient_alive_interval = \"0s\"\nclient_alive_count_max = 0\n";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("poolgate.toml");
    std::fs::write(&path, text).unwrap();
    let errors = invalid(load(&path));
    for key in [
        "ssh.client_alive_interval: ",
        "ssh.client_alive_count_max: ",
    ] {
        assert!(errors.iter().any(|e| e.starts_with(key)), "{errors:?}");
    }
}
