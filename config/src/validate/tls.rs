//! `[tls]`: certificate files or ACME, not both, and the ACME settings.

use super::Report;
use crate::model::{Config, LETS_ENCRYPT_DIRECTORY, Tls};

/// Most names in one certificate (Let's Encrypt's limit).
const MAX_DOMAINS: usize = 100;

pub(super) fn tls(c: &Config, tls: &Tls, r: &mut Report) {
    if tls.uses_acme() {
        if tls.uses_files() {
            r.err(
                "tls.acme_domains",
                "set either tls.cert and tls.key (certificate files) or tls.acme_domains (a certificate from ACME), not both (remove one)",
            );
        }
        acme(c, tls, r);
        return;
    }
    if tls.cert.as_os_str().is_empty() {
        r.err(
            "tls.cert",
            "must be set (path of the PEM certificate chain)",
        );
    } else {
        r.path("tls.cert", &tls.cert);
    }
    if tls.key.as_os_str().is_empty() {
        r.err("tls.key", "must be set (path of the PEM private key)");
    } else {
        r.path("tls.key", &tls.key);
    }
    let unused = "is only used with tls.acme_domains (add acme_domains to get a certificate by ACME, or remove this key)";
    if tls.acme_email.is_some() {
        r.err("tls.acme_email", unused);
    }
    if tls.acme_directory_ca.is_some() {
        r.err("tls.acme_directory_ca", unused);
    }
    if tls.acme_directory != LETS_ENCRYPT_DIRECTORY {
        r.err("tls.acme_directory", unused);
    }
}

fn acme(c: &Config, tls: &Tls, r: &mut Report) {
    if c.listen.https.is_none() {
        r.err(
            "tls.acme_domains",
            "the ACME certificate is served on the HTTPS listener, which is not set (set listen.https, e.g. \"0.0.0.0:443\")",
        );
    }
    if c.listen.http.is_none() {
        r.err(
            "tls.acme_domains",
            "the ACME CA checks each name with an HTTP-01 challenge answered on listen.http, which is \"off\" (set listen.http and make port 80 of every name reach it)",
        );
    }
    if tls.acme_domains.len() > MAX_DOMAINS {
        r.err(
            "tls.acme_domains",
            format!(
                "lists {} names; one certificate holds at most {MAX_DOMAINS}",
                tls.acme_domains.len()
            ),
        );
    }
    for (i, name) in tls.acme_domains.iter().enumerate() {
        let key = format!("tls.acme_domains[{i}]");
        if let Err(why) = check_domain(name) {
            r.err(&key, format!("\"{name}\" {why}"));
        } else if let Some(first) = tls.acme_domains[..i]
            .iter()
            .position(|d| d.eq_ignore_ascii_case(name))
        {
            r.err(
                key,
                format!("\"{name}\" is listed twice (also tls.acme_domains[{first}])"),
            );
        }
    }
    check_directory(&tls.acme_directory, r);
    if let Some(email) = &tls.acme_email {
        check_email(email, r);
    }
    r.path("tls.acme_cache", &tls.acme_cache);
    if let Some(ca) = &tls.acme_directory_ca {
        r.path("tls.acme_directory_ca", ca);
    }
}

/// A DNS name an ACME CA can validate by HTTP-01: no wildcard, no IP address, letters, digits
/// and hyphens in labels of at most 63, at least two labels.
fn check_domain(name: &str) -> Result<(), String> {
    if name.starts_with("*.") {
        return Err("is a wildcard name, which needs the DNS-01 challenge poolgate does not use (list each name instead)".into());
    }
    if name.contains("://") || name.contains('/') || name.contains(':') {
        return Err(
            "is not a bare host name (write only the name, e.g. \"pool.example.org\": no scheme, port or path)"
                .into(),
        );
    }
    if name.ends_with('.') {
        return Err("ends with a dot (write the name without it)".into());
    }
    if name.len() > 253 {
        return Err("is longer than 253 characters".into());
    }
    let labels: Vec<&str> = name.split('.').collect();
    if labels.len() < 2 {
        return Err(
            "is not a fully qualified name (a public CA issues only for names like \"pool.example.org\")"
                .into(),
        );
    }
    for label in &labels {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!(
                "has an invalid label \"{label}\" (letters, digits and inner hyphens, 1 to 63 characters; write internationalized names in their xn-- form)"
            ));
        }
    }
    if labels
        .last()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("is an IP address; ACME certificates here are for DNS names".into());
    }
    Ok(())
}

fn check_directory(url: &str, r: &mut Report) {
    let Some(rest) = url.strip_prefix("https://") else {
        r.err(
            "tls.acme_directory",
            format!(
                "\"{url}\" is not an https:// URL (ACME directories are served over HTTPS; the default is {LETS_ENCRYPT_DIRECTORY})"
            ),
        );
        return;
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if host.is_empty() || host.contains(char::is_whitespace) || url.contains(char::is_whitespace) {
        r.err(
            "tls.acme_directory",
            format!("\"{url}\" has no valid host (e.g. {LETS_ENCRYPT_DIRECTORY})"),
        );
    }
}

fn check_email(email: &str, r: &mut Report) {
    if email.starts_with("mailto:") {
        r.err(
            "tls.acme_email",
            format!(
                "\"{email}\": write the address without \"mailto:\" (e.g. \"ops@example.org\")"
            ),
        );
        return;
    }
    let valid = match email.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !email.contains(|ch: char| ch.is_whitespace() || ",;<>\"".contains(ch))
                && !domain.contains('@')
        }
        None => false,
    };
    if !valid {
        r.err(
            "tls.acme_email",
            format!("\"{email}\" is not an e-mail address (e.g. \"ops@example.org\")"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains() {
        assert!(check_domain("pool.example.org").is_ok());
        assert!(check_domain("a-b.c1.example.org").is_ok());
        assert!(check_domain("poolgate.westeurope.cloudapp.azure.com").is_ok());
        for bad in [
            "*.example.org",
            "https://pool.example.org",
            "pool.example.org:443",
            "pool.example.org.",
            "localhost",
            "-a.example.org",
            "a..example.org",
            "a_b.example.org",
            "10.0.0.4",
            "",
        ] {
            assert!(check_domain(bad).is_err(), "{bad}");
        }
    }
}
