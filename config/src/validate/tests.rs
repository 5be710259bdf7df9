use std::time::Duration;

use crate::enums::{Credential, Provider};
use crate::model::{Azure, Backend, Config, Exec, Tls};

fn backend(name: &str, host: &str) -> Backend {
    Backend {
        name: name.into(),
        host: host.into(),
        ..Backend::default()
    }
}

/// A valid static configuration.
fn valid() -> Config {
    let mut c = Config::default();
    c.pool.backends = vec![backend("dsvm-1", "10.0.0.4"), backend("dsvm-2", "10.0.0.5")];
    c
}

fn messages(c: &Config) -> Vec<String> {
    c.validate().iter().map(ToString::to_string).collect()
}

fn has(c: &Config, expected: &str) {
    let errs = messages(c);
    assert!(
        errs.iter().any(|e| e == expected),
        "{expected:?} not in {errs:#?}"
    );
}

fn has_key(c: &Config, key: &str) {
    let errs = c.validate();
    assert!(
        errs.iter().any(|e| e.key == key),
        "no error for {key} in {errs:#?}"
    );
}

#[test]
fn valid_static_config_has_no_errors() {
    assert_eq!(messages(&valid()), Vec::<String>::new());
}

#[test]
fn default_config_only_lacks_backends() {
    assert_eq!(
        messages(&Config::default()),
        vec![
            "pool.backends: the static provider needs at least one [[pool.backends]] entry (add one per VM, or choose another pool.provider)"
        ]
    );
}

#[test]
fn several_independent_mistakes_are_all_reported() {
    let mut c = valid();
    c.pool.backends.push(backend("dsvm-1", "10.0.0.6"));
    c.pool.backends[1].ssh_port = 0;
    c.pool.backends[0].weight = 0;
    c.autoscale.min_vms = 5;
    c.autoscale.max_vms = 3;
    c.listen.https = Some(([0, 0, 0, 0], 8443).into());
    c.health.rise = 0;
    c.health.timeout = Duration::from_secs(10);
    c.http.cookie_name = "pool gate".into();
    c.ssh.authorized_keys = "/home/alice/.ssh/authorized_keys".into();
    let errs = messages(&c);
    for expected in [
        "pool.backends[1].ssh_port: must be between 1 and 65535",
        "pool.backends[0].weight: must be at least 1 (load is divided by the weight)",
        "pool.backends[2].name: duplicate VM name \"dsvm-1\" (also pool.backends[0])",
        "autoscale.min_vms: 5 is more than autoscale.max_vms (3) (lower min_vms or raise max_vms)",
        "listen.https: HTTPS needs a [tls] section with cert and key, or with acme_domains (add [tls], or remove listen.https)",
        "health.rise: must be at least 1 (successful probes before a VM is up)",
        "health.timeout: 10s is longer than health.interval (5s) (make the timeout at most the interval)",
    ] {
        assert!(
            errs.iter().any(|e| e == expected),
            "{expected:?} not in {errs:#?}"
        );
    }
    has_key(&c, "http.cookie_name");
    has_key(&c, "ssh.authorized_keys");
    assert_eq!(errs.len(), 9, "{errs:#?}");
}

#[test]
fn static_provider_cannot_autoscale() {
    let mut c = valid();
    c.autoscale.enabled = true;
    has(
        &c,
        "autoscale.enabled: the static provider cannot scale (set pool.provider to \"azure-vmss\", \"exec\" or \"demo\", or enabled = false)",
    );
}

#[test]
fn backend_names_and_hosts() {
    let mut c = valid();
    c.pool.backends = vec![
        backend("", "10.0.0.1"),
        backend("bad name!", "10.0.0.2"),
        backend("ok", ""),
        backend("url", "http://10.0.0.3"),
        backend("port", "10.0.0.4:22"),
        backend("v6", "fd00::1"),
        backend("dup-host", "fd00::1"),
    ];
    has_key(&c, "pool.backends[0].name");
    has(
        &c,
        "pool.backends[1].name: \"bad name!\" may only contain letters, digits, '.', '_' and '-'",
    );
    has_key(&c, "pool.backends[2].host");
    has_key(&c, "pool.backends[3].host");
    has(
        &c,
        "pool.backends[4].host: \"10.0.0.4:22\" includes a port (put it in ssh_port / http_port instead)",
    );
    has_key(&c, "pool.backends[6].host");
    assert!(
        !c.validate()
            .iter()
            .any(|e| e.key == "pool.backends[5].host")
    );
}

#[test]
fn backends_with_another_provider() {
    let mut c = valid();
    c.pool.provider = Provider::Demo;
    has_key(&c, "pool.backends");
    c.pool.backends.clear();
    assert_eq!(messages(&c), Vec::<String>::new());
}

#[test]
fn azure_rules() {
    let mut c = Config::default();
    c.pool.provider = Provider::AzureVmss;
    has(
        &c,
        "pool.azure: provider \"azure-vmss\" needs a [pool.azure] section (with subscription_id, resource_group and scale_set)",
    );
    c.pool.azure = Some(Azure {
        credential: Credential::ClientSecret,
        ssh_port: 0,
        arm_endpoint: Some("http://management.azure.com".into()),
        authority_host: Some("login.example".into()),
        identity_endpoint: Some("169.254.169.254/metadata/identity/oauth2/token".into()),
        ..Azure::default()
    });
    for key in [
        "pool.azure.subscription_id",
        "pool.azure.resource_group",
        "pool.azure.scale_set",
        "pool.azure.tenant_id",
        "pool.azure.client_id",
        "pool.azure.client_secret_file",
        "pool.azure.ssh_port",
        "pool.azure.arm_endpoint",
        "pool.azure.authority_host",
        "pool.azure.identity_endpoint",
    ] {
        has_key(&c, key);
    }
    c.pool.azure = Some(Azure {
        subscription_id: "00000000-0000-0000-0000-000000000000".into(),
        resource_group: "rg".into(),
        scale_set: "vmss".into(),
        ..Azure::default()
    });
    c.autoscale.enabled = true;
    assert_eq!(messages(&c), Vec::<String>::new());
}

#[test]
fn exec_rules() {
    let mut c = Config::default();
    c.pool.provider = Provider::Exec;
    has_key(&c, "pool.exec");
    c.pool.exec = Some(Exec {
        start: Some(vec![]),
        create: Some(vec!["".into()]),
        ..Exec::default()
    });
    c.autoscale.enabled = true;
    has_key(&c, "pool.exec.list");
    has_key(&c, "pool.exec.start");
    has_key(&c, "pool.exec.create[0]");
    has(
        &c,
        "pool.exec.stop: must be set together with pool.exec.start (set both, or neither)",
    );
    has_key(&c, "pool.exec.delete");
    c.pool.exec = Some(Exec {
        list: vec!["pool-vms".into(), "list".into()],
        ..Exec::default()
    });
    has_key(&c, "autoscale.enabled");
    c.autoscale.enabled = false;
    assert_eq!(messages(&c), Vec::<String>::new());
}

#[test]
fn provider_sections_must_match() {
    let mut c = valid();
    c.pool.exec = Some(Exec {
        list: vec!["x".into()],
        ..Exec::default()
    });
    has_key(&c, "pool.exec");
}

#[test]
fn zero_durations_where_meaningless() {
    let mut c = valid();
    c.health.interval = Duration::ZERO;
    c.ssh.login_grace = Duration::ZERO;
    c.ssh.cert_validity = Duration::ZERO;
    c.http.session_idle = Duration::ZERO;
    c.autoscale.tick = Duration::ZERO;
    c.ssh.idle_timeout = Some(Duration::ZERO);
    for key in [
        "health.interval",
        "ssh.login_grace",
        "ssh.cert_validity",
        "http.session_idle",
        "autoscale.tick",
        "ssh.idle_timeout",
    ] {
        has_key(&c, key);
    }
    let mut c = valid();
    c.ssh.cert_validity = Duration::from_secs(25 * 3600);
    has(
        &c,
        "ssh.cert_validity: 1day 1h is longer than 24h (backend certificates are meant to be short-lived; the default is 5m)",
    );
}

#[test]
fn ssh_rules() {
    let mut c = valid();
    c.ssh.backend_known_hosts = None;
    has(
        &c,
        "ssh.backend_known_hosts: neither ssh.backend_known_hosts nor ssh.backend_host_ca is set, so no VM host key could be verified (set one of them)",
    );
    c.ssh.backend_host_ca = Some("keys/host_ca.pub".into());
    assert_eq!(messages(&c), Vec::<String>::new());
    c.ssh.max_unauthenticated = 0;
    c.ssh.host_keys = vec![];
    c.ssh.user_ca_key = "~/ca".into();
    has_key(&c, "ssh.max_unauthenticated");
    has_key(&c, "ssh.host_keys");
    has_key(&c, "ssh.user_ca_key");
}

#[test]
fn listeners_and_admin() {
    let mut c = valid();
    c.listen.http = Some(([127, 0, 0, 1], 2222).into());
    has(
        &c,
        "listen.http: 127.0.0.1:2222 collides with listen.ssh (0.0.0.0:2222) (give each listener its own port)",
    );
    let mut c = valid();
    c.listen.ssh = Some(([127, 0, 0, 1], 0).into());
    c.listen.http = Some(([127, 0, 0, 1], 0).into());
    c.listen.admin = ([127, 0, 0, 1], 0).into();
    assert_eq!(
        messages(&c),
        Vec::<String>::new(),
        "port 0 means any free port"
    );
    c.listen.admin = ([0, 0, 0, 0], 9090).into();
    has_key(&c, "admin.token_file");
    c.admin.token_file = Some("/etc/poolgate/token".into());
    assert_eq!(messages(&c), Vec::<String>::new());
    c.tls = Some(Tls::default());
    has(
        &c,
        "tls.cert: must be set (path of the PEM certificate chain)",
    );
    has_key(&c, "tls.key");
}

#[test]
fn health_and_http_rules() {
    let mut c = valid();
    c.health.http_path = "hub/health".into();
    c.health.fall = 0;
    c.health.load_metrics_port = Some(0);
    c.http.max_header_bytes = 1024;
    has(
        &c,
        "health.http_path: \"hub/health\" must start with '/' (e.g. \"/hub/health\")",
    );
    has_key(&c, "health.fall");
    has(&c, "health.load_metrics_port: must be between 1 and 65535");
    has_key(&c, "http.max_header_bytes");
    c.http.backend_scheme = crate::BackendScheme::Https;
    has(
        &c,
        "http.backend_scheme: \"https\" is not supported yet: the gateway reaches JupyterHub on the VMs over plain HTTP on their private network (set backend_scheme = \"http\", or remove the key)",
    );
}

#[test]
fn autoscale_limits() {
    let mut c = Config::default();
    c.pool.provider = Provider::Demo;
    c.autoscale.enabled = true;
    c.autoscale.max_vms = 0;
    c.autoscale.sessions_per_vm = 0;
    has_key(&c, "autoscale.max_vms");
    has_key(&c, "autoscale.sessions_per_vm");
}

#[test]
fn cookie_tokens() {
    use super::is_cookie_token;
    assert!(is_cookie_token("poolgate_vm"));
    assert!(is_cookie_token("__Host-pg"));
    for bad in ["", "a b", "a;b", "a=b", "é"] {
        assert!(!is_cookie_token(bad), "{bad:?}");
    }
}

#[test]
fn busy_check_rules() {
    let mut c = valid();
    c.autoscale.busy_command = vec![" ".into()];
    c.autoscale.busy_user = "Probe User".into();
    c.autoscale.busy_timeout = Duration::ZERO;
    has_key(&c, "autoscale.busy_command[0]");
    has_key(&c, "autoscale.busy_user");
    has_key(&c, "autoscale.busy_timeout");
    c.autoscale.busy_user = "root".into();
    has_key(&c, "autoscale.busy_user");
    c.autoscale.busy_command = vec!["/bin/check".into(), "a\0b".into()];
    has_key(&c, "autoscale.busy_command[1]");
    // `[]` turns the check off: nothing about it is checked then.
    c.autoscale.busy_command = Vec::new();
    c.autoscale.busy_user = "poolgate-probe".into();
    assert!(c.validate().is_empty(), "{:?}", c.validate());
}

/// The embedded default busy check is deploy/vm/poolgate-busy-check, byte for byte.
#[test]
fn embedded_busy_check_is_the_deploy_script() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let shipped = std::fs::read_to_string(dir.join("../deploy/vm/poolgate-busy-check"))
        .expect("deploy/vm/poolgate-busy-check is readable");
    assert!(
        shipped == crate::DEFAULT_BUSY_SCRIPT,
        "config/src/model/poolgate-busy-check and deploy/vm/poolgate-busy-check differ: copy one over the other"
    );
}

#[test]
fn cluster_rules() {
    use crate::enums::StoreKind;
    use crate::model::Cluster;

    let mut c = valid();
    c.cluster = Some(Cluster {
        store: StoreKind::Redis,
        redis_url: Some("redis://127.0.0.1:6379/0".into()),
        ..Cluster::default()
    });
    assert!(c.validate().is_empty(), "{:?}", messages(&c));
    c.cluster = Some(Cluster {
        store: StoreKind::Redis,
        ..Cluster::default()
    });
    has_key(&c, "cluster.redis_url");
    c.cluster = Some(Cluster {
        store: StoreKind::Redis,
        redis_url: Some("rediss://user:hunter2@cache.example:6380/0".into()),
        ..Cluster::default()
    });
    let errs = messages(&c);
    assert!(
        errs.iter()
            .any(|e| e.starts_with("cluster.redis_url: holds a password")),
        "{errs:#?}"
    );
    assert!(!errs.iter().any(|e| e.contains("hunter2")), "secret echoed");
    c.cluster = Some(Cluster {
        store: StoreKind::Redis,
        redis_url: Some("http://x:1".into()),
        replica_id: Some("gw 1".into()),
        key_prefix: "{pool}".into(),
        lease: Duration::from_secs(1),
        ..Cluster::default()
    });
    for key in [
        "cluster.redis_url",
        "cluster.replica_id",
        "cluster.key_prefix",
        "cluster.lease",
        "cluster.sync_interval",
    ] {
        has_key(&c, key);
    }
    c.cluster = Some(Cluster {
        redis_url: Some("redis://127.0.0.1:6379".into()),
        ..Cluster::default()
    });
    has_key(&c, "cluster.redis_url");
}

#[test]
fn schedule_windows_are_read_from_toml_and_checked() {
    // The smallest window a user writes: from, to, min_vms (every day, UTC).
    let c = crate::parse(
        r#"
[[pool.backends]]
name = "dsvm-1"
host = "10.0.0.4"
[autoscale]
max_vms = 4
[[autoscale.schedule]]
from = "07:30"
to = "18:00"
min_vms = 2
[[autoscale.schedule]]
days = ["fri", "sat"]
from = "22:00"
to = "02:00"
time_zone = "Europe/Berlin"
min_vms = 1
"#,
        std::path::Path::new("/etc/poolgate"),
    );
    let c = c.expect("parses");
    let w = &c.autoscale.schedule;
    assert_eq!(w.len(), 2);
    assert_eq!(w[0].days.len(), 7);
    assert_eq!(
        (w[0].from.map(|t| t.minutes()), w[0].to.map(|t| t.minutes())),
        (Some(450), Some(1080))
    );
    assert_eq!(w[0].time_zone, "UTC");
    assert_eq!(w[1].days, [crate::Weekday::Fri, crate::Weekday::Sat]);

    let mut bad = valid();
    bad.autoscale.max_vms = 3;
    bad.autoscale.schedule = vec![
        crate::ScheduleWindow {
            from: "08:00".parse().ok(),
            to: "08:00".parse().ok(),
            time_zone: "Mars/Olympus".into(),
            min_vms: 4,
            days: Vec::new(),
        },
        crate::ScheduleWindow {
            min_vms: 0,
            ..Default::default()
        },
    ];
    for key in [
        "autoscale.schedule[0].to",
        "autoscale.schedule[0].days",
        "autoscale.schedule[0].time_zone",
        "autoscale.schedule[0].min_vms",
        "autoscale.schedule[1].from",
        "autoscale.schedule[1].to",
        "autoscale.schedule[1].min_vms",
    ] {
        has_key(&bad, key);
    }
    has(
        &bad,
        "autoscale.schedule[0].min_vms: 4 is more than autoscale.max_vms (3) (lower it or raise max_vms)",
    );

    // A malformed time or day is a shape error at its key path.
    let Err(crate::ConfigError::Invalid(errors)) = crate::parse(
        "[[pool.backends]]\nname = \"a\"\nhost = \"10.0.0.4\"\n[[autoscale.schedule]]\ndays = [\"monday\"]\nfrom = \"7.30\"\nto = \"18:00\"\n",
        std::path::Path::new("/"),
    ) else {
        panic!("a bad time and day must be refused");
    };
    let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
    assert!(keys.contains(&"autoscale.schedule[0].from"), "{errors:?}");
    assert!(
        keys.iter()
            .any(|k| k.starts_with("autoscale.schedule[0].days")),
        "{errors:?}"
    );
}

#[test]
fn times_of_day_are_hh_mm_up_to_24_00() {
    for (text, minutes) in [
        ("00:00", 0),
        ("7:05", 425),
        ("23:59", 1439),
        ("24:00", 1440),
    ] {
        assert_eq!(
            text.parse::<crate::TimeOfDay>().map(|t| t.minutes()),
            Ok(minutes),
            "{text}"
        );
    }
    for text in [
        "24:01", "12:60", "7", "07:5", "-1:00", "ab:cd", "", "07:30:00",
    ] {
        let e = text.parse::<crate::TimeOfDay>().unwrap_err();
        assert!(e.contains("HH:MM"), "{text}: {e}");
    }
}

#[test]
fn tls_files_or_acme_not_both() {
    let mut c = valid();
    c.listen.https = Some(([0, 0, 0, 0], 8443).into());
    c.tls = Some(Tls {
        acme_domains: vec!["pool.example.org".into()],
        ..Tls::default()
    });
    assert_eq!(
        messages(&c),
        Vec::<String>::new(),
        "the smallest ACME config"
    );
    if let Some(t) = c.tls.as_mut() {
        t.cert = "tls/cert.pem".into();
        t.key = "tls/key.pem".into();
    }
    has(
        &c,
        "tls.acme_domains: set either tls.cert and tls.key (certificate files) or tls.acme_domains (a certificate from ACME), not both (remove one)",
    );
    // ACME settings without acme_domains are named as unused.
    c.tls = Some(Tls {
        cert: "tls/cert.pem".into(),
        key: "tls/key.pem".into(),
        acme_email: Some("ops@example.org".into()),
        ..Tls::default()
    });
    has_key(&c, "tls.acme_email");
}

#[test]
fn acme_settings_are_checked() {
    let mut c = valid();
    c.tls = Some(Tls {
        acme_domains: vec![
            "pool.example.org".into(),
            "*.example.org".into(),
            "POOL.example.org".into(),
        ],
        acme_directory: "http://acme.example.org/directory".into(),
        acme_email: Some("mailto:ops@example.org".into()),
        ..Tls::default()
    });
    c.listen.http = None;
    let errs = messages(&c);
    for key in [
        "tls.acme_domains: the ACME certificate is served on the HTTPS listener",
        "tls.acme_domains: the ACME CA checks each name with an HTTP-01 challenge answered on listen.http",
        "tls.acme_domains[1]: \"*.example.org\" is a wildcard name",
        "tls.acme_domains[2]: \"POOL.example.org\" is listed twice (also tls.acme_domains[0])",
        "tls.acme_directory: \"http://acme.example.org/directory\" is not an https:// URL",
        "tls.acme_email: \"mailto:ops@example.org\": write the address without \"mailto:\"",
    ] {
        assert!(
            errs.iter().any(|e| e.starts_with(key)),
            "{key:?} not in {errs:#?}"
        );
    }
    assert_eq!(errs.len(), 6, "{errs:#?}");
}

#[test]
fn batch_rest_keys() {
    use crate::model::Batch;
    let with = |f: &dyn Fn(&mut Batch)| {
        let mut c = valid();
        let mut b = Batch::default();
        f(&mut b);
        c.batch = Some(b);
        c
    };
    // The smallest slurmrestd configuration, and IPv6 or a path prefix.
    for url in [
        "http://slurm-head:6820",
        "https://slurm-head/slurmrestd/",
        "http://[::1]:6820",
    ] {
        let c = with(&|b| {
            b.rest_url = Some(url.into());
            b.rest_token_file = Some("/etc/poolgate/keys/slurm_jwt".into());
        });
        assert_eq!(messages(&c), Vec::<String>::new(), "{url}");
    }
    let c = with(&|b| b.rest_url = Some("http://slurm-head:6820".into()));
    has(
        &c,
        "batch.rest_token_file: must be set with batch.rest_url: the file holding slurmrestd's JWT, mode 0600 (e.g. (umask 077; scontrol token username=poolgate lifespan=2592000 > /etc/poolgate/keys/slurm_jwt))",
    );
    let c = with(&|b| {
        b.rest_token_file = Some("keys/slurm_jwt".into());
        b.rest_user = Some("poolgate".into());
    });
    has(
        &c,
        "batch.rest_token_file: is only used with batch.rest_url (set it to slurmrestd's URL, or remove rest_token_file to read the queue with squeue and sinfo)",
    );
    has_key(&c, "batch.rest_user");
    for (url, expected) in [
        (
            "slurm-head:6820",
            "batch.rest_url: \"slurm-head:6820\" is not a URL (write http://HOST:PORT, e.g. \"http://slurm-head:6820\")",
        ),
        (
            "unix:///run/slurmrestd.sock",
            "batch.rest_url: scheme \"unix\" is not http or https (e.g. \"http://slurm-head:6820\")",
        ),
        (
            "http://u:p@slurm-head:6820",
            "batch.rest_url: holds user information; slurmrestd is given the user in batch.rest_user and the token in batch.rest_token_file",
        ),
        (
            "http://:6820",
            "batch.rest_url: \"http://:6820\" names no usable host (e.g. \"http://slurm-head:6820\")",
        ),
        (
            "http://slurm-head:0",
            "batch.rest_url: \"http://slurm-head:0\" has no valid port (1-65535; slurmrestd often listens on 6820)",
        ),
        (
            "http://slurm-head:6820/slurm/v0.0.38/jobs?x=1",
            "batch.rest_url: \"http://slurm-head:6820/slurm/v0.0.38/jobs?x=1\" has a query or fragment; give slurmrestd's base URL only (poolgate appends /slurm/VERSION/jobs)",
        ),
    ] {
        let c = with(&|b| {
            b.rest_url = Some(url.into());
            b.rest_token_file = Some("keys/slurm_jwt".into());
        });
        has(&c, expected);
    }
    let c = with(&|b| {
        b.rest_url = Some("http://slurm-head:6820".into());
        b.rest_token_file = Some("~/jwt".into());
        b.rest_user = Some("pool gate".into());
        b.rest_version = "0.0.38".into();
    });
    has_key(&c, "batch.rest_token_file");
    has(
        &c,
        "batch.rest_user: \"pool gate\" is not a user name (letters, digits, '-', '_', '.', '@'; the user the token was made for, or leave it unset to take it from the token)",
    );
    has(
        &c,
        "batch.rest_version: \"0.0.38\" is not a slurmrestd OpenAPI version like \"v0.0.38\" (Slurm 22.05 serves v0.0.36 to v0.0.38; slurmrestd lists its own at /openapi/v3)",
    );
}

/// `listen.ssh = "off"` serves browsers only: no SSH port to collide with, and no known_hosts
/// needed. With no browser listener either there is nothing to serve.
#[test]
fn an_ssh_listener_switched_off() {
    let mut c = valid();
    c.listen.ssh = None;
    c.listen.http = Some(([127, 0, 0, 1], 2222).into());
    c.ssh.backend_known_hosts = None;
    assert_eq!(messages(&c), Vec::<String>::new());
    c.listen.http = None;
    has(
        &c,
        "listen.ssh: \"off\", and so are listen.http and listen.https: the gateway would serve nothing (keep one of them)",
    );
}
