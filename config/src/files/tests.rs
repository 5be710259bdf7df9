//! Unix-only: the checks exercise file modes.
#![cfg(unix)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::enums::{Credential, Provider};
use crate::model::{Azure, Backend, Config, Exec, Tls};

fn write(path: &Path, text: &str, mode: u32) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// A static config in `dir` with a known_hosts file and nothing else.
fn config_in(dir: &Path) -> Config {
    let mut c = Config::default();
    c.pool.backends = vec![Backend {
        name: "dsvm-1".into(),
        host: "10.0.0.4".into(),
        ..Backend::default()
    }];
    c.resolve_paths(dir);
    write(
        &dir.join("keys/backend_known_hosts"),
        "10.0.0.4 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n",
        0o644,
    );
    c
}

/// The message for `ssh.backend_known_hosts` among `errs`.
fn known_hosts_message(errs: &[crate::ValidationError]) -> Option<String> {
    errs.iter()
        .find(|e| e.key == "ssh.backend_known_hosts")
        .map(|e| e.message.clone())
}

fn messages(c: &Config) -> Vec<String> {
    c.check_files().iter().map(ToString::to_string).collect()
}

#[test]
fn generated_files_may_be_missing() {
    let dir = tempfile::tempdir().unwrap();
    let c = config_in(dir.path());
    assert_eq!(messages(&c), Vec::<String>::new());
}

#[test]
fn secret_with_open_permissions_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let c = config_in(dir.path());
    let ca = dir.path().join("keys/user_ca");
    write(&ca, "-----BEGIN OPENSSH PRIVATE KEY-----\n", 0o644);
    assert_eq!(
        messages(&c),
        vec![format!(
            "ssh.user_ca_key: {0} has permissions 0644, too open for a secret (run: chmod 600 {0})",
            ca.display()
        )]
    );
    fs::set_permissions(&ca, fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(messages(&c), Vec::<String>::new());
    let secret = dir.path().join("keys/cookie_secret");
    write(&secret, "0123456789abcdef0123456789abcdef", 0o640);
    let errs = messages(&c);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].starts_with("http.cookie_secret_file: "),
        "{errs:#?}"
    );
    assert!(errs[0].contains("has permissions 0640"), "{errs:#?}");
}

#[test]
fn a_cookie_secret_too_short_for_the_gateway_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let c = config_in(dir.path());
    let secret = dir.path().join("keys/cookie_secret");
    write(&secret, "s3cret", 0o600);
    assert_eq!(
        messages(&c),
        vec![format!(
            "http.cookie_secret_file: {0} holds 6 bytes, a cookie secret needs at least 16 (delete it to have poolgate generate one, or write one: head -c 32 /dev/urandom > {0} && chmod 600 {0})",
            secret.display()
        )]
    );
    write(&secret, "0123456789abcdef", 0o600);
    assert_eq!(messages(&c), Vec::<String>::new());
}

#[test]
fn operator_supplied_files_must_exist() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config_in(dir.path());
    fs::remove_file(dir.path().join("keys/backend_known_hosts")).unwrap();
    c.tls = Some(Tls {
        cert: dir.path().join("tls/cert.pem"),
        key: dir.path().join("tls/key.pem"),
        ..Tls::default()
    });
    c.admin.token_file = Some(dir.path().join("keys/admin_token"));
    c.pool.azure = Some(Azure {
        credential: Credential::ClientSecret,
        client_secret_file: Some(dir.path().join("keys/azure_secret")),
        ..Azure::default()
    });
    let errs = c.check_files();
    let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        vec![
            "tls.cert",
            "tls.key",
            "admin.token_file",
            "ssh.backend_known_hosts",
            "pool.azure.client_secret_file"
        ],
        "{errs:#?}"
    );
    let known = dir.path().join("keys/backend_known_hosts");
    assert_eq!(
        errs[3].message,
        format!(
            "{0} does not exist (create it with: ssh-keyscan -p 22 10.0.0.4 >> {0}; or set ssh.backend_host_ca)",
            known.display()
        )
    );
    assert!(
        errs.iter().all(|e| e.message.contains(" does not exist (")),
        "{errs:#?}"
    );
}

/// On a first install the keys directory is not there yet: the printed command makes it.
#[test]
fn the_known_hosts_hint_makes_a_missing_keys_directory() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config_in(dir.path());
    let known = dir.path().join("new-keys/backend_known_hosts");
    c.ssh.backend_known_hosts = Some(known.clone());
    let errs = c.check_files();
    assert_eq!(
        known_hosts_message(&errs),
        Some(format!(
            "{0} does not exist (create it with: mkdir -p {1} && ssh-keyscan -p 22 10.0.0.4 >> {0}; or set ssh.backend_host_ca)",
            known.display(),
            dir.path().join("new-keys").display()
        )),
        "{errs:#?}"
    );
}

#[test]
fn known_hosts_may_be_missing_with_a_host_ca() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config_in(dir.path());
    fs::remove_file(dir.path().join("keys/backend_known_hosts")).unwrap();
    let ca = dir.path().join("keys/host_ca.pub");
    c.ssh.backend_host_ca = Some(ca.clone());
    let errs = messages(&c);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(errs[0].starts_with("ssh.backend_host_ca: "), "{errs:#?}");
    write(
        &ca,
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl ca\n",
        0o644,
    );
    assert_eq!(messages(&c), Vec::<String>::new());
    write(&ca, "-----BEGIN OPENSSH PRIVATE KEY-----\n", 0o600);
    assert!(messages(&c)[0].contains("is a private key"));
}

#[test]
fn content_checks() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config_in(dir.path());
    write(
        &dir.path().join("keys/backend_known_hosts"),
        "# nothing yet\n\n",
        0o644,
    );
    let token = dir.path().join("keys/admin_token");
    write(&token, "\n", 0o600);
    c.admin.token_file = Some(token);
    let cert = dir.path().join("tls/cert.pem");
    let key = dir.path().join("tls/key.pem");
    write(&cert, "not pem", 0o644);
    write(
        &key,
        "-----BEGIN PRIVATE KEY-----\nMII\n-----END PRIVATE KEY-----\n",
        0o600,
    );
    c.tls = Some(Tls {
        cert,
        key,
        ..Tls::default()
    });
    let errs = c.check_files();
    let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        vec!["tls.cert", "admin.token_file", "ssh.backend_known_hosts"],
        "{errs:#?}"
    );
}

#[test]
fn directory_instead_of_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config_in(dir.path());
    c.ssh.host_keys = vec![dir.path().to_path_buf()];
    let errs = messages(&c);
    assert_eq!(
        errs,
        vec![format!(
            "ssh.host_keys[0]: {} is a directory (point ssh.host_keys[0] at a file)",
            dir.path().display()
        )]
    );
}

#[test]
fn exec_programs_given_as_paths_must_be_executable() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config_in(dir.path());
    c.pool.backends.clear();
    c.pool.provider = Provider::Exec;
    let script = dir.path().join("list-vms");
    write(&script, "#!/bin/sh\n", 0o644);
    c.pool.exec = Some(Exec {
        list: vec![script.display().to_string()],
        start: Some(vec!["pool-vms".into(), "start".into()]),
        stop: Some(vec![dir.path().join("nope").display().to_string()]),
        ..Exec::default()
    });
    let errs = messages(&c);
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(errs[0].starts_with("pool.exec.list[0]: ") && errs[0].contains("is not executable"));
    assert!(errs[1].starts_with("pool.exec.stop[0]: ") && errs[1].contains("does not exist"));
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(messages(&c).len(), 1);
}

#[test]
fn empty_and_tilde_paths_are_left_to_validation() {
    // Paths validation rejects are skipped here rather than reported twice.
    let mut c = Config::default();
    c.ssh.user_ca_key = PathBuf::from("~/ca");
    c.ssh.backend_known_hosts = None;
    c.ssh.backend_host_ca = Some(PathBuf::new());
    c.ssh.host_keys = vec![PathBuf::from("/nonexistent/poolgate/host_key")];
    c.http.cookie_secret_file = PathBuf::from("/nonexistent/poolgate/cookie");
    assert_eq!(messages(&c), Vec::<String>::new());
}

#[test]
fn acme_cache_and_directory_ca() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config_in(dir.path());
    let cache = dir.path().join("acme");
    c.tls = Some(Tls {
        acme_domains: vec!["pool.example.org".into()],
        acme_cache: cache.clone(),
        acme_directory_ca: Some(dir.path().join("missing-ca.pem")),
        ..Tls::default()
    });
    // A missing cache is created at start; a missing CA file is an error.
    let errs = messages(&c);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].starts_with("tls.acme_directory_ca: ") && errs[0].contains("does not exist"),
        "{errs:#?}"
    );
    let ca = dir.path().join("ca.pem");
    write(&ca, "not pem", 0o644);
    std::fs::create_dir(&cache).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o755)).unwrap();
    if let Some(t) = c.tls.as_mut() {
        t.acme_directory_ca = Some(ca);
    }
    let errs = messages(&c);
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(errs[0].starts_with("tls.acme_directory_ca: ") && errs[0].contains("not a PEM"));
    assert!(
        errs[1].starts_with("tls.acme_cache: ") && errs[1].contains("chmod 700"),
        "{errs:#?}"
    );
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o700)).unwrap();
    assert_eq!(messages(&c).len(), 1);
}

#[test]
fn slurmrestd_token_file_is_a_secret_that_must_exist() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config_in(dir.path());
    let token = dir.path().join("keys/slurm_jwt");
    c.batch = Some(crate::model::Batch {
        rest_url: Some("http://127.0.0.1:6820".into()),
        rest_token_file: Some(token.clone()),
        ..crate::model::Batch::default()
    });
    assert_eq!(
        messages(&c),
        vec![format!(
            "batch.rest_token_file: {0} does not exist (put slurmrestd's JWT in it: (umask 077; scontrol token username=USER lifespan=SECONDS > {0}))",
            token.display()
        )]
    );
    write(&token, "SLURM_JWT=eyJ.eyJ.sig\n", 0o640);
    assert_eq!(
        messages(&c),
        vec![format!(
            "batch.rest_token_file: {0} has permissions 0640, too open for a secret (run: chmod 600 {0})",
            token.display()
        )]
    );
    write(&token, "\n", 0o600);
    assert_eq!(
        messages(&c),
        vec![format!(
            "batch.rest_token_file: {} is empty (put the JWT from `scontrol token` in it)",
            token.display()
        )]
    );
    write(&token, "SLURM_JWT=eyJ.eyJ.sig\n", 0o600);
    assert_eq!(messages(&c), Vec::<String>::new());
}

/// A gateway for browsers only (`listen.ssh = "off"`) logs in to no VM over SSH: it needs no
/// known_hosts file, nor host keys or a user CA in a cluster. Its autoscaler's busy check does
/// log in, and then the VMs' host keys are needed again.
#[test]
fn without_an_ssh_listener_no_vm_host_key_is_needed_unless_the_busy_check_runs() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config_in(dir.path());
    fs::remove_file(dir.path().join("keys/backend_known_hosts")).unwrap();
    assert_eq!(messages(&c).len(), 1, "{:#?}", messages(&c));
    c.listen.ssh = None;
    assert_eq!(messages(&c), Vec::<String>::new());
    c.autoscale.enabled = true;
    let errs = messages(&c);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].starts_with("ssh.backend_known_hosts: ") && errs[0].contains("does not exist"),
        "{errs:#?}"
    );
    c.autoscale.busy_command = Vec::new();
    assert_eq!(messages(&c), Vec::<String>::new());
}

/// VMs on different sshd ports (several sshds on one host, a test bed) get one `ssh-keyscan`
/// per port: `-p` applies to every host of one command.
#[test]
fn the_known_hosts_hint_scans_each_vms_own_port() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config_in(dir.path());
    c.pool.backends = [("vm-1", 41201), ("vm-2", 41202), ("vm-3", 41201)]
        .into_iter()
        .map(|(name, ssh_port)| Backend {
            name: name.into(),
            host: "127.0.0.1".into(),
            ssh_port,
            ..Backend::default()
        })
        .collect();
    let known = dir.path().join("keys/backend_known_hosts");
    std::fs::remove_file(&known).unwrap();
    let errs = c.check_files();
    assert_eq!(
        known_hosts_message(&errs),
        Some(format!(
            "{0} does not exist (create it with: ssh-keyscan -p 41201 127.0.0.1 >> {0} && ssh-keyscan -p 41202 127.0.0.1 >> {0}; or set ssh.backend_host_ca)",
            known.display()
        )),
        "{errs:#?}"
    );
}
