//! Filesystem checks: files the operator supplies must exist and be readable; secrets must not be
//! readable by group or others. Files the gateway generates may be missing.

use std::fs;
use std::io;
use std::path::Path;

use crate::enums::Provider;
use crate::error::ValidationError;
use crate::model::{Config, starts_with_tilde};
use crate::validate::Report;

/// Fewest bytes of a cookie secret the gateway accepts (it generates 32).
const MIN_COOKIE_SECRET: usize = 16;

/// What to say when a file is missing; `None` when the gateway creates it.
type WhenMissing = Option<String>;

impl Config {
    /// Checks the files the configuration names (run by [`crate::load`] after parsing; call it
    /// again after changing paths). Returns every problem found.
    ///
    /// * must exist and be readable: `tls.cert`, `tls.key`, `admin.token_file`,
    ///   `ssh.backend_host_ca`, `pool.azure.client_secret_file`, `pool.azure.client_certificate_file`
    ///   (PEM key and certificate), and `ssh.backend_known_hosts`
    ///   unless `ssh.backend_host_ca` is set or nothing logs in to a VM over SSH
    ///   ([`Config::logs_in_to_vms`]);
    /// * may be missing (generated on first start), readable when present: `ssh.host_keys`,
    ///   `ssh.user_ca_key`, `http.cookie_secret_file` (at least 16 bytes when present) — except
    ///   with a shared `[cluster]` store, where every replica must be given the same files, so
    ///   they must exist (`poolgate keys init DIR` writes them); `cluster.redis_password_file`
    ///   must exist when set;
    /// * secrets (`tls.key`, `admin.token_file`, host keys, `ssh.user_ca_key`,
    ///   `http.cookie_secret_file`, `pool.azure.client_secret_file`,
    ///   `pool.azure.client_certificate_file`) must not be accessible by
    ///   group or others (Unix);
    /// * `pool.exec` programs written as paths must exist and be executable;
    /// * with ACME: `tls.acme_directory_ca` must exist and hold a PEM certificate; `tls.acme_cache`
    ///   may be missing (created), else it must be a directory that group and others cannot
    ///   open.
    /// * `batch.rest_token_file` (slurmrestd's JWT) must exist, not be empty, and not be
    ///   accessible by group or others (Unix), like the secrets above.
    pub fn check_files(&self) -> Vec<ValidationError> {
        let mut r = Report::default();
        if let Some(tls) = &self.tls {
            if check(
                &mut r,
                "tls.cert",
                &tls.cert,
                Some("create it, or point tls.cert at your PEM certificate chain".into()),
                false,
            ) {
                expect_pem(&mut r, "tls.cert", &tls.cert, "CERTIFICATE-----");
            }
            if check(
                &mut r,
                "tls.key",
                &tls.key,
                Some("point tls.key at the certificate's PEM private key".into()),
                true,
            ) {
                expect_pem(&mut r, "tls.key", &tls.key, "PRIVATE KEY-----");
            }
        }
        if let Some(tls) = self.tls.as_ref().filter(|t| t.uses_acme()) {
            acme_files(&mut r, tls);
        }
        if let Some(token) = &self.admin.token_file {
            let hint = format!(
                "create it: head -c 32 /dev/urandom | base64 > {0} && chmod 600 {0}",
                token.display()
            );
            if check(&mut r, "admin.token_file", token, Some(hint), true)
                && read(token).is_some_and(|t| t.trim().is_empty())
            {
                r.err(
                    "admin.token_file",
                    format!(
                        "{} is empty (put a long random token in it)",
                        token.display()
                    ),
                );
            }
        }
        self.check_ssh_files(&mut r);
        let secret = &self.http.cookie_secret_file;
        if self.shared_secret_hint().is_none() && self.listen.serves_http() {
            can_generate(&mut r, "http.cookie_secret_file", secret);
        }
        if check(
            &mut r,
            "http.cookie_secret_file",
            secret,
            self.shared_secret_hint(),
            true,
        ) && let Some(len) = fs::read(secret).ok().map(|b| b.len())
            && len < MIN_COOKIE_SECRET
        {
            r.err(
                "http.cookie_secret_file",
                format!(
                    "{0} holds {len} bytes, a cookie secret needs at least {MIN_COOKIE_SECRET} (delete it to have poolgate generate one, or write one: head -c 32 /dev/urandom > {0} && chmod 600 {0})",
                    secret.display()
                ),
            );
        }
        if let Some(azure) = &self.pool.azure {
            if let Some(secret) = &azure.client_secret_file {
                check(
                    &mut r,
                    "pool.azure.client_secret_file",
                    secret,
                    Some("put the service principal's client secret in it".into()),
                    true,
                );
            }
            if let Some(certificate) = &azure.client_certificate_file
                && check(
                    &mut r,
                    "pool.azure.client_certificate_file",
                    certificate,
                    Some("put the service principal's PEM private key and certificate in it (az ad sp create-for-rbac --create-cert writes such a file)".into()),
                    true,
                )
            {
                expect_pem(
                    &mut r,
                    "pool.azure.client_certificate_file",
                    certificate,
                    "CERTIFICATE-----",
                );
                expect_pem(
                    &mut r,
                    "pool.azure.client_certificate_file",
                    certificate,
                    "PRIVATE KEY-----",
                );
            }
        }
        if let Some(password) = self
            .cluster
            .as_ref()
            .and_then(|c| c.redis_password_file.as_ref())
        {
            check(
                &mut r,
                "cluster.redis_password_file",
                password,
                Some("put the Redis password in it, mode 0600".into()),
                true,
            );
        }
        if let Some(token) = self.batch.as_ref().and_then(|b| b.rest_token_file.as_ref())
            && check(
                &mut r,
                "batch.rest_token_file",
                token,
                Some(format!(
                    "put slurmrestd's JWT in it: (umask 077; scontrol token username=USER lifespan=SECONDS > {})",
                    token.display()
                )),
                true,
            )
            && read(token).is_some_and(|t| t.trim().is_empty())
        {
            r.err(
                "batch.rest_token_file",
                format!(
                    "{} is empty (put the JWT from `scontrol token` in it)",
                    token.display()
                ),
            );
        }
        if let Some(ca) = self.cluster.as_ref().and_then(|c| c.redis_ca_file.as_ref())
            && check(
                &mut r,
                "cluster.redis_ca_file",
                ca,
                Some("point it at the PEM certificate of the CA that signed the Redis server's certificate".into()),
                false,
            )
        {
            expect_pem(&mut r, "cluster.redis_ca_file", ca, "CERTIFICATE-----");
        }
        if let Some(exec) = &self.pool.exec {
            let commands = std::iter::once(("list", Some(&exec.list)))
                .chain(exec.optional_commands())
                .filter_map(|(name, argv)| Some((name, argv?.first()?)));
            for (name, program) in commands {
                if program.contains('/') {
                    executable(&mut r, &format!("pool.exec.{name}[0]"), Path::new(program));
                }
            }
        }
        r.0
    }

    /// What to say when a secret the gateway would generate is missing: nothing for one
    /// replica (it generates it), the way to share it when replicas share a store.
    fn shared_secret_hint(&self) -> WhenMissing {
        self.cluster.as_ref().filter(|c| c.is_shared()).map(|_| {
            "replicas sharing a [cluster] store must all be given the same file, so none is generated: create the set once with `poolgate keys init DIR` and copy it to every replica".to_owned()
        })
    }

    fn check_ssh_files(&self, r: &mut Report) {
        let s = &self.ssh;
        // With no SSH listener the host keys are not used, and with nothing logging in to a VM
        // the user CA is not either: neither has to be there, in a cluster or not.
        for (i, key) in s.host_keys.iter().enumerate() {
            let hint = self
                .shared_secret_hint()
                .filter(|_| self.listen.serves_ssh());
            let name = format!("ssh.host_keys[{i}]");
            if hint.is_none() && self.listen.serves_ssh() {
                can_generate(r, &name, key);
            }
            check(r, &name, key, hint, true);
        }
        let hint = self.shared_secret_hint().filter(|_| self.logs_in_to_vms());
        if hint.is_none() && self.logs_in_to_vms() {
            can_generate(r, "ssh.user_ca_key", &s.user_ca_key);
        }
        check(r, "ssh.user_ca_key", &s.user_ca_key, hint, true);
        if let Some(ca) = &s.backend_host_ca {
            let hint = "point it at the public key of the CA that signs the VMs' host keys";
            if check(r, "ssh.backend_host_ca", ca, Some(hint.into()), false)
                && read(ca).is_some_and(|t| t.contains("PRIVATE KEY"))
            {
                r.err(
                    "ssh.backend_host_ca",
                    format!(
                        "{} is a private key (give the CA's public key, usually the .pub file)",
                        ca.display()
                    ),
                );
            }
        }
        if let Some(known) = &s.backend_known_hosts {
            // Not needed when nothing logs in to a VM over SSH (`listen.ssh = "off"`, no busy
            // check), but checked like any other file when it is there.
            let required = s.backend_host_ca.is_none() && self.logs_in_to_vms();
            // The keys directory may not be there yet on a first install: the command must
            // work as printed.
            let mkdir = known
                .parent()
                .filter(|dir| !dir.as_os_str().is_empty() && !dir.exists())
                .map(|dir| format!("mkdir -p {} && ", dir.display()))
                .unwrap_or_default();
            let hint = format!(
                "create it with: {mkdir}{}; or set ssh.backend_host_ca",
                self.keyscan_commands(known)
            );
            if check(
                r,
                "ssh.backend_known_hosts",
                known,
                required.then_some(hint),
                false,
            ) && required
                && read(known).is_some_and(|t| {
                    t.lines()
                        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
                })
            {
                r.err(
                    "ssh.backend_known_hosts",
                    format!(
                        "{} has no host keys, so no VM could be verified (add them: {})",
                        known.display(),
                        self.keyscan_commands(known)
                    ),
                );
            }
        }
    }

    /// The `ssh-keyscan` command(s) that fill `known` for the static backends: one per sshd
    /// port, as `-p` applies to every host of a command; a placeholder for other providers.
    fn keyscan_commands(&self, known: &Path) -> String {
        let mut by_port: std::collections::BTreeMap<u16, Vec<&str>> = Default::default();
        if self.pool.provider == Provider::Static {
            // A port out of range has an error of its own.
            for b in self.pool.backends.iter().filter(|b| b.ssh_port != 0) {
                let hosts = by_port.entry(b.ssh_port).or_default();
                if !hosts.contains(&b.host.as_str()) {
                    hosts.push(b.host.as_str());
                }
            }
        }
        if by_port.is_empty() {
            by_port.insert(22, vec!["VM_HOST"]);
        }
        let commands: Vec<String> = by_port
            .iter()
            .map(|(port, hosts)| {
                format!(
                    "ssh-keyscan -p {port} {} >> {}",
                    hosts.join(" "),
                    known.display()
                )
            })
            .collect();
        commands.join(" && ")
    }
}

/// `tls.acme_directory_ca` and `tls.acme_cache`.
fn acme_files(r: &mut Report, tls: &crate::model::Tls) {
    if let Some(ca) = &tls.acme_directory_ca
        && check(
            r,
            "tls.acme_directory_ca",
            ca,
            Some("point it at the PEM CA certificate of your ACME server, or remove the key to trust the system's CAs".into()),
            false,
        )
    {
        expect_pem(r, "tls.acme_directory_ca", ca, "CERTIFICATE-----");
    }
    let cache = &tls.acme_cache;
    if cache.as_os_str().is_empty() || starts_with_tilde(cache) {
        return;
    }
    match fs::metadata(cache) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => r.err(
            "tls.acme_cache",
            format!(
                "cannot access {}: {e} (check the permissions of its directories)",
                cache.display()
            ),
        ),
        Ok(meta) if !meta.is_dir() => r.err(
            "tls.acme_cache",
            format!(
                "{} is not a directory (point tls.acme_cache at a directory; poolgate creates it when missing)",
                cache.display()
            ),
        ),
        Ok(meta) => {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = meta.permissions().mode() & 0o7777;
                if mode & 0o077 != 0 {
                    r.err(
                        "tls.acme_cache",
                        format!(
                            "{0} has permissions {mode:04o}, too open for the ACME account key (run: chmod 700 {0})",
                            cache.display()
                        ),
                    );
                }
            }
            #[cfg(not(unix))]
            let _ = meta;
        }
    }
}

fn read(path: &Path) -> Option<String> {
    fs::read(path)
        .ok()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
}

fn expect_pem(r: &mut Report, key: &str, path: &Path, block: &str) {
    if read(path).is_some_and(|t| !t.contains("-----BEGIN ") || !t.contains(block)) {
        r.err(
            key,
            format!(
                "{} is not a PEM file with a \"-----BEGIN ...{block}\" block",
                path.display()
            ),
        );
    }
}

/// Checks one file; true when it exists, is a file and could be opened (so its content may be
/// checked further). Empty and `~` paths are reported by validation and skipped here.
/// For a key file the gateway generates when it is missing: when it is missing, that it can be
/// created — the nearest directory on its path that exists must not be on a read-only
/// filesystem. Under the shipped systemd unit the configuration directory is
/// read-only to the gateway (`ProtectSystem=strict`): a key path relative to the file
/// (`keys/cookie_secret`) passed `check-config`, and `run` then failed to write the key.
fn can_generate(r: &mut Report, key: &str, path: &Path) {
    use nix::unistd::{AccessFlags, access};
    // Only a path known not to exist (one that cannot be looked at is left to `check`).
    if path.as_os_str().is_empty() || starts_with_tilde(path) || path.try_exists().unwrap_or(true) {
        return;
    }
    let Some(dir) = path.ancestors().skip(1).find(|d| d.is_dir()) else {
        return;
    };
    // Only a read-only filesystem is refused: that holds for every user (the shipped unit's
    // `ProtectSystem=strict`, where its ExecStartPre check-config sees it). Whether a directory
    // is writable depends on who asks, and check-config is often run by another user (root, an
    // admin) than the service: `run` says so itself when it cannot write the key.
    let Err(nix::errno::Errno::EROFS) = access(dir, AccessFlags::W_OK | AccessFlags::X_OK) else {
        return;
    };
    let why = "is on a read-only filesystem";
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let elsewhere = match crate::systemd_state_directory() {
        Some(state) => format!(
            "point {key} into the service's state directory, e.g. {}",
            state.join("keys").join(&name).display()
        ),
        None => format!("point {key} at a writable place"),
    };
    r.err(
        key,
        format!(
            "{} does not exist and cannot be generated: {} {why} (create the keys beforehand, e.g. `poolgate keys init {}` as the directory's owner, or {elsewhere})",
            path.display(),
            dir.display(),
            path.parent().unwrap_or(dir).display(),
        ),
    );
}

fn check(r: &mut Report, key: &str, path: &Path, when_missing: WhenMissing, secret: bool) -> bool {
    if path.as_os_str().is_empty() || starts_with_tilde(path) {
        return false;
    }
    let shown = path.display();
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(hint) = when_missing {
                r.err(key, format!("{shown} does not exist ({hint})"));
            }
            return false;
        }
        Err(e) => {
            r.err(
                key,
                format!("cannot access {shown}: {e} (check the permissions of its directories)"),
            );
            return false;
        }
    };
    if meta.is_dir() {
        r.err(
            key,
            format!("{shown} is a directory (point {key} at a file)"),
        );
        return false;
    }
    if let Err(e) = fs::File::open(path) {
        r.err(
            key,
            format!("cannot read {shown}: {e} (let the user poolgate runs as read it)"),
        );
        return false;
    }
    if secret {
        too_open(r, key, path, &meta);
    }
    true
}

#[cfg(unix)]
fn too_open(r: &mut Report, key: &str, path: &Path, meta: &fs::Metadata) {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        r.err(
            key,
            format!(
                "{0} has permissions {mode:04o}, too open for a secret (run: chmod 600 {0})",
                path.display()
            ),
        );
    }
}

#[cfg(not(unix))]
fn too_open(_: &mut Report, _: &str, _: &Path, _: &fs::Metadata) {}

fn executable(r: &mut Report, key: &str, path: &Path) {
    let shown = path.display();
    match fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => r.err(
            key,
            format!("{shown} does not exist (install it, or give the right path)"),
        ),
        Err(e) => r.err(key, format!("cannot access {shown}: {e}")),
        Ok(meta) if !meta.is_file() => r.err(key, format!("{shown} is not a file")),
        Ok(meta) => {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                if meta.permissions().mode() & 0o111 == 0 {
                    r.err(
                        key,
                        format!("{shown} is not executable (run: chmod +x {shown})"),
                    );
                }
            }
            #[cfg(not(unix))]
            let _ = meta;
        }
    }
}

#[cfg(test)]
mod tests;
