//! Pure checks of a parsed configuration: no filesystem, no network. Every problem is collected.

mod batch;
mod cluster;
mod pool;
mod tls;

pub(crate) use pool::{autoscale_policy, max_sessions};

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::enums::{Affinity, BackendScheme};
use crate::error::ValidationError;
use crate::model::{AccessLog, Config, starts_with_tilde};
use crate::serde_util::format_duration;

impl Config {
    /// Checks every rule that needs no filesystem access and returns every problem found
    /// (empty when the configuration is valid). See docs/configuration.md for the rules.
    pub fn validate(&self) -> Vec<ValidationError> {
        self.validate_with(true)
    }

    /// As [`Config::validate`]; with `provider_known = false` (the provider string could not be
    /// read) the checks that depend on which provider is used are skipped, so a typo in
    /// `pool.provider` does not also produce errors about the wrong provider.
    pub(crate) fn validate_with(&self, provider_known: bool) -> Vec<ValidationError> {
        let mut r = Report::default();
        listen(self, &mut r);
        if let Some(p) = self.gateway.state_file.path() {
            r.path("gateway.state_file", p);
        }
        admin_and_tls(self, &mut r);
        ssh(self, &mut r);
        http(self, &mut r);
        routing_and_health(self, &mut r);
        pool::pool(self, provider_known, &mut r);
        pool::autoscale(self, provider_known, &mut r);
        cluster::cluster(self, &mut r);
        batch::batch(self, &mut r);
        r.0
    }
}

/// Collects errors.
#[derive(Default)]
pub(crate) struct Report(pub(crate) Vec<ValidationError>);

impl Report {
    pub(crate) fn err(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(ValidationError::new(key, message));
    }

    /// `d` must not be zero.
    pub(crate) fn positive(&mut self, key: &str, d: Duration) {
        if d.is_zero() {
            self.err(
                key,
                "must be longer than 0s (write a duration like \"30s\" or \"5m\")",
            );
        }
    }

    /// `n` must be at least 1.
    pub(crate) fn at_least_one(&mut self, key: &str, n: u64, what: &str) {
        if n == 0 {
            self.err(key, format!("must be at least 1 ({what})"));
        }
    }

    /// `port` must not be 0.
    pub(crate) fn port(&mut self, key: &str, port: u16) {
        if port == 0 {
            self.err(key, "must be between 1 and 65535");
        }
    }

    /// A path the operator wrote: not empty, no `~`.
    pub(crate) fn path(&mut self, key: &str, path: &Path) {
        if path.as_os_str().is_empty() {
            self.err(key, "must not be empty (give a file path)");
        } else if starts_with_tilde(path) {
            self.err(
                key,
                format!(
                    "{} starts with \"~\", which poolgate does not expand (write the full path, or one relative to the config file)",
                    path.display()
                ),
            );
        }
    }
}

fn listen(c: &Config, r: &mut Report) {
    if c.listen.https.is_some() && c.tls.is_none() {
        r.err(
            "listen.https",
            "HTTPS needs a [tls] section with cert and key, or with acme_domains (add [tls], or remove listen.https)",
        );
    }
    if !c.listen.serves_ssh() && !c.listen.serves_http() {
        r.err(
            "listen.ssh",
            "\"off\", and so are listen.http and listen.https: the gateway would serve nothing (keep one of them)",
        );
    }
    let mut listeners: Vec<(&str, SocketAddr)> = Vec::new();
    if let Some(ssh) = c.listen.ssh {
        listeners.push(("listen.ssh", ssh));
    }
    if let Some(http) = c.listen.http {
        listeners.push(("listen.http", http));
    }
    if let Some(https) = c.listen.https {
        listeners.push(("listen.https", https));
    }
    listeners.push(("listen.admin", c.listen.admin));
    for (i, (key, addr)) in listeners.iter().enumerate() {
        let clash = listeners[..i].iter().find(|(_, other)| {
            addr.port() != 0
                && addr.port() == other.port()
                && (addr.ip() == other.ip()
                    || addr.ip().is_unspecified()
                    || other.ip().is_unspecified())
        });
        if let Some((other_key, other)) = clash {
            r.err(
                *key,
                format!(
                    "{addr} collides with {other_key} ({other}) (give each listener its own port)"
                ),
            );
        }
    }
    if !c.listen.admin.ip().is_loopback() && c.admin.token_file.is_none() {
        r.err(
            "admin.token_file",
            format!(
                "listen.admin {} is reachable from other hosts, so the admin API needs a token (set admin.token_file, or listen on 127.0.0.1)",
                c.listen.admin
            ),
        );
    }
}

fn admin_and_tls(c: &Config, r: &mut Report) {
    if let Some(token) = &c.admin.token_file {
        r.path("admin.token_file", token);
    }
    if let Some(tls) = &c.tls {
        tls::tls(c, tls, r);
    }
}

fn ssh(c: &Config, r: &mut Report) {
    let s = &c.ssh;
    if s.host_keys.is_empty() {
        r.err(
            "ssh.host_keys",
            "must list at least one host key (e.g. [\"keys/ssh_host_ed25519_key\"]; it is generated when missing)",
        );
    }
    for (i, key) in s.host_keys.iter().enumerate() {
        let name = format!("ssh.host_keys[{i}]");
        r.path(&name, key);
        if let Some(first) = s.host_keys[..i].iter().position(|k| k == key) {
            r.err(
                name,
                format!(
                    "{} is listed twice (also ssh.host_keys[{first}])",
                    key.display()
                ),
            );
        }
    }
    if !s.authorized_keys.contains("{user}") {
        r.err(
            "ssh.authorized_keys",
            format!(
                "\"{}\" must contain {{user}}, which is replaced by the login name (e.g. \"/home/{{user}}/.ssh/authorized_keys\")",
                s.authorized_keys
            ),
        );
    } else if starts_with_tilde(Path::new(&s.authorized_keys)) {
        r.path("ssh.authorized_keys", Path::new(&s.authorized_keys));
    }
    r.path("ssh.user_ca_key", &s.user_ca_key);
    match (&s.backend_known_hosts, &s.backend_host_ca) {
        // Nothing logs in to a VM over SSH: no host key to verify.
        _ if !c.logs_in_to_vms() => {}
        (None, None) => r.err(
            "ssh.backend_known_hosts",
            "neither ssh.backend_known_hosts nor ssh.backend_host_ca is set, so no VM host key could be verified (set one of them)",
        ),
        (known, ca) => {
            if let Some(p) = known {
                r.path("ssh.backend_known_hosts", p);
            }
            if let Some(p) = ca {
                r.path("ssh.backend_host_ca", p);
            }
        }
    }
    r.at_least_one(
        "ssh.max_unauthenticated",
        s.max_unauthenticated.into(),
        "connections still authenticating; the default is 256",
    );
    r.positive("ssh.login_grace", s.login_grace);
    r.positive("ssh.cert_validity", s.cert_validity);
    if s.cert_validity > Duration::from_secs(24 * 3600) {
        r.err(
            "ssh.cert_validity",
            format!(
                "{} is longer than 24h (backend certificates are meant to be short-lived; the default is 5m)",
                format_duration(s.cert_validity)
            ),
        );
    }
    r.positive("ssh.connect_timeout", s.connect_timeout);
    r.positive("ssh.client_alive_interval", s.client_alive_interval);
    r.at_least_one(
        "ssh.client_alive_count_max",
        s.client_alive_count_max.into(),
        "unanswered keepalives before a silent client is dropped; the default is 20",
    );
    if s.idle_timeout == Some(Duration::ZERO) {
        r.err(
            "ssh.idle_timeout",
            "must be longer than 0s (remove the key to never close idle connections)",
        );
    }
}

/// RFC 6265 cookie-name: an HTTP token.
fn is_cookie_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
}

fn http(c: &Config, r: &mut Report) {
    let h = &c.http;
    if !is_cookie_token(&h.cookie_name) {
        r.err(
            "http.cookie_name",
            format!(
                "\"{}\" is not a valid cookie name (use letters, digits and - _ . ! # $ % & ' * + ^ ` | ~, e.g. \"poolgate_vm\")",
                h.cookie_name
            ),
        );
    }
    if h.backend_scheme == BackendScheme::Https {
        r.err(
            "http.backend_scheme",
            "\"https\" is not supported yet: the gateway reaches JupyterHub on the VMs over plain HTTP on their private network (set backend_scheme = \"http\", or remove the key)",
        );
    }
    r.path("http.cookie_secret_file", &h.cookie_secret_file);
    if let AccessLog::File(p) = &h.access_log {
        r.path("http.access_log", p);
    }
    r.positive("http.session_idle", h.session_idle);
    r.positive("http.tentative_for", h.tentative_for);
    r.positive("http.connect_timeout", h.connect_timeout);
    r.positive("http.response_header_timeout", h.response_header_timeout);
    r.positive("http.idle_timeout", h.idle_timeout);
    if h.max_header_bytes < 8192 {
        r.err(
            "http.max_header_bytes",
            format!(
                "{} is too small (must be at least 8192; the default is 65536)",
                h.max_header_bytes
            ),
        );
    }
    if h.max_uri_bytes < 256 {
        r.err(
            "http.max_uri_bytes",
            format!(
                "{} is too small (must be at least 256; the default is 8192)",
                h.max_uri_bytes
            ),
        );
    }
    if h.max_connections == 0 {
        r.err(
            "http.max_connections",
            "must be at least 1 (the default is 16384)",
        );
    }
}

fn routing_and_health(c: &Config, r: &mut Report) {
    if c.routing.affinity == Affinity::User {
        r.positive("routing.affinity_ttl", c.routing.affinity_ttl);
    }
    let h = &c.health;
    r.positive("health.interval", h.interval);
    r.positive("health.timeout", h.timeout);
    if !h.interval.is_zero() && h.timeout > h.interval {
        r.err(
            "health.timeout",
            format!(
                "{} is longer than health.interval ({}) (make the timeout at most the interval)",
                format_duration(h.timeout),
                format_duration(h.interval)
            ),
        );
    }
    r.at_least_one(
        "health.rise",
        h.rise.into(),
        "successful probes before a VM is up",
    );
    r.at_least_one(
        "health.fall",
        h.fall.into(),
        "failed probes before a VM is down",
    );
    if !h.http_path.starts_with('/') {
        r.err(
            "health.http_path",
            format!(
                "\"{}\" must start with '/' (e.g. \"/hub/health\")",
                h.http_path
            ),
        );
    }
    if let Some(port) = h.load_metrics_port {
        r.port("health.load_metrics_port", port);
    }
    if !h.load_metrics_path.starts_with('/') {
        r.err(
            "health.load_metrics_path",
            format!(
                "\"{}\" must start with '/' (e.g. \"/metrics\")",
                h.load_metrics_path
            ),
        );
    }
}

#[cfg(test)]
mod tests;
