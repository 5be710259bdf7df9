//! Users' public keys: the `ssh.authorized_keys` path template (`{user}` substituted) read in
//! OpenSSH `authorized_keys` format, option prefixes included.
//!
//! Options are honoured where the gateway can enforce them (`from=`, `expiry-time=`, `restrict`,
//! `no-port-forwarding`, `no-agent-forwarding`, `no-pty` and their `restrict` counterparts). A key
//! carrying an option the gateway cannot enforce on the VM (`command=`, `permitopen=`,
//! `permitlisten=`, `principals=`, `tunnel=`, `environment=`, `cert-authority`) is refused, so no
//! restriction is silently lost. Unknown options are ignored.

use std::net::IpAddr;
use std::path::PathBuf;

use russh::keys::ssh_key::PublicKey;

use super::known_hosts::glob_match;

/// What an accepted key allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyPermissions {
    /// `-L`/`-R` forwarding.
    pub port_forwarding: bool,
    /// `-A` agent forwarding.
    pub agent_forwarding: bool,
    /// Pseudo-terminals.
    pub pty: bool,
}

impl KeyPermissions {
    /// Everything allowed (no options).
    pub const ALL: Self = Self {
        port_forwarding: true,
        agent_forwarding: true,
        pty: true,
    };
}

/// Why a key was not accepted (for the debug log; users only see "permission denied").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The user name cannot name a file safely.
    BadUserName,
    /// The file could not be read (missing, unreadable).
    NoFile(String),
    /// No line holds this key.
    NotListed,
    /// A line holds the key, but `from=` excludes the client address.
    FromMismatch,
    /// A line holds the key, but its `expiry-time` has passed.
    Expired,
    /// A line holds the key with an option the gateway cannot enforce.
    Unenforceable(String),
}

/// Whether a string is a plausible login name: what the path template may safely receive.
pub fn valid_user_name(user: &str) -> bool {
    !user.is_empty()
        && user.len() <= 64
        && !user.starts_with(['-', '.'])
        && user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '@'))
}

/// The authorized_keys file for `user`, from the path template.
pub fn path_for(template: &str, user: &str) -> Option<PathBuf> {
    valid_user_name(user).then(|| PathBuf::from(template.replace("{user}", user)))
}

/// Looks `key` up in the user's authorized_keys file.
pub fn check(
    template: &str,
    user: &str,
    key: &PublicKey,
    client: IpAddr,
    now_unix: u64,
) -> Result<KeyPermissions, Refusal> {
    let path = path_for(template, user).ok_or(Refusal::BadUserName)?;
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Refusal::NoFile(format!("{}: {e}", path.display())))?;
    check_text(&text, key, client, now_unix)
}

/// Looks `key` up in authorized_keys text. Malformed lines are skipped.
pub fn check_text(
    text: &str,
    key: &PublicKey,
    client: IpAddr,
    now_unix: u64,
) -> Result<KeyPermissions, Refusal> {
    let mut refusal = Refusal::NotListed;
    for line in text.lines() {
        let Some((options, listed)) = parse_line(line) else {
            continue;
        };
        if listed.key_data() != key.key_data() {
            continue;
        }
        match apply_options(split_options(options), client, now_unix) {
            Ok(perms) => return Ok(perms),
            Err(r) => refusal = r,
        }
    }
    Err(refusal)
}

/// Splits an authorized_keys line into its option prefix (possibly empty) and its key. Comments,
/// blank and malformed lines give `None`.
fn parse_line(line: &str) -> Option<(&str, PublicKey)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    if let Ok(key) = PublicKey::from_openssh(line) {
        return Some(("", key));
    }
    // Options end at the first space outside double quotes.
    let mut quoted = false;
    let mut end = None;
    for (i, c) in line.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ' ' | '\t' if !quoted => {
                end = Some(i);
                break;
            }
            _ => {}
        }
    }
    let end = end?;
    let key = PublicKey::from_openssh(line[end..].trim()).ok()?;
    Some((&line[..end], key))
}

/// Splits `a,b="x,y",c` at commas outside double quotes.
fn split_options(options: &str) -> impl Iterator<Item = &str> {
    let mut rest = options;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut quoted = false;
        let mut cut = rest.len();
        for (i, c) in rest.char_indices() {
            match c {
                '"' => quoted = !quoted,
                ',' if !quoted => {
                    cut = i;
                    break;
                }
                _ => {}
            }
        }
        let item = &rest[..cut];
        rest = rest.get(cut + 1..).unwrap_or("");
        Some(item)
    })
    .filter(|o| !o.is_empty())
}

fn apply_options<'a>(
    options: impl Iterator<Item = &'a str>,
    client: IpAddr,
    now_unix: u64,
) -> Result<KeyPermissions, Refusal> {
    let mut perms = KeyPermissions::ALL;
    for option in options {
        let (name, value) = match option.split_once('=') {
            Some((n, v)) => (n.to_ascii_lowercase(), Some(v.trim_matches('"'))),
            None => (option.to_ascii_lowercase(), None),
        };
        match (name.as_str(), value) {
            ("restrict", None) => {
                perms = KeyPermissions {
                    port_forwarding: false,
                    agent_forwarding: false,
                    pty: false,
                }
            }
            ("no-port-forwarding", None) => perms.port_forwarding = false,
            ("no-agent-forwarding", None) => perms.agent_forwarding = false,
            ("no-pty", None) => perms.pty = false,
            ("port-forwarding", None) => perms.port_forwarding = true,
            ("agent-forwarding", None) => perms.agent_forwarding = true,
            ("pty", None) => perms.pty = true,
            ("from", Some(list)) => {
                if !from_matches(list, client) {
                    return Err(Refusal::FromMismatch);
                }
            }
            ("expiry-time", Some(stamp)) => match parse_expiry(stamp) {
                Some(expiry) if expiry > now_unix => {}
                _ => return Err(Refusal::Expired),
            },
            (
                "command" | "permitopen" | "permitlisten" | "principals" | "tunnel" | "environment"
                | "cert-authority",
                _,
            ) => return Err(Refusal::Unenforceable(name)),
            _ => tracing::debug!(option = %name, "ignoring unknown authorized_keys option"),
        }
    }
    Ok(perms)
}

/// `from="pattern-list"`: comma-separated globs or CIDR blocks matched against the client IP,
/// `!` negating. Host names are not resolved (no DNS on the login path).
fn from_matches(list: &str, client: IpAddr) -> bool {
    let ip = client.to_canonical().to_string();
    let mut matched = false;
    for raw in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (negated, pattern) = match raw.strip_prefix('!') {
            Some(p) => (true, p),
            None => (false, raw),
        };
        let hit = match pattern.parse::<ipnet::IpNet>() {
            Ok(net) => net.contains(&client.to_canonical()),
            Err(_) => glob_match(pattern, &ip),
        };
        if hit && negated {
            return false;
        }
        matched |= hit;
    }
    matched
}

/// `expiry-time="YYYYMMDD[HHMM[SS]]"` in UTC, as seconds since the epoch.
fn parse_expiry(stamp: &str) -> Option<u64> {
    if !(stamp.len() == 8 || stamp.len() == 12 || stamp.len() == 14)
        || !stamp.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| stamp.get(r).and_then(|s| s.parse::<i64>().ok());
    let (y, m, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let hh = num(8..10).unwrap_or(0);
    let mm = num(10..12).unwrap_or(0);
    let ss = num(12..14).unwrap_or(0);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use russh::keys::ssh_key::{Algorithm, PrivateKey};

    fn key() -> PublicKey {
        PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)
            .unwrap()
            .public_key()
            .clone()
    }
    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn plain_key_accepted_other_refused() {
        let (a, b) = (key(), key());
        let text = format!("# comment\n\n{}\n", a.to_openssh().unwrap());
        assert_eq!(check_text(&text, &a, LOCAL, 0), Ok(KeyPermissions::ALL));
        assert_eq!(check_text(&text, &b, LOCAL, 0), Err(Refusal::NotListed));
    }

    #[test]
    fn from_option() {
        let a = key();
        let text = format!(
            "from=\"10.*,127.0.0.0/8,!127.0.0.9\" {}",
            a.to_openssh().unwrap()
        );
        assert!(check_text(&text, &a, LOCAL, 0).is_ok());
        assert!(check_text(&text, &a, "10.1.2.3".parse().unwrap(), 0).is_ok());
        assert_eq!(
            check_text(&text, &a, "127.0.0.9".parse().unwrap(), 0),
            Err(Refusal::FromMismatch)
        );
        assert_eq!(
            check_text(&text, &a, "192.168.1.1".parse().unwrap(), 0),
            Err(Refusal::FromMismatch)
        );
    }

    #[test]
    fn restrictions_and_unenforceable_options() {
        let a = key();
        let k = a.to_openssh().unwrap();
        let perms = check_text(&format!("restrict,pty {k}"), &a, LOCAL, 0).unwrap();
        assert_eq!(
            perms,
            KeyPermissions {
                port_forwarding: false,
                agent_forwarding: false,
                pty: true
            }
        );
        let perms = check_text(
            &format!("no-agent-forwarding,no-touch-required {k}"),
            &a,
            LOCAL,
            0,
        )
        .unwrap();
        assert!(!perms.agent_forwarding && perms.port_forwarding);
        assert_eq!(
            check_text(&format!("command=\"/bin/true\" {k}"), &a, LOCAL, 0),
            Err(Refusal::Unenforceable("command".into()))
        );
    }

    #[test]
    fn expiry_time() {
        let a = key();
        let k = a.to_openssh().unwrap();
        let text = format!("expiry-time=\"20300101\" {k}");
        assert_eq!(parse_expiry("19700102"), Some(86_400));
        assert!(check_text(&text, &a, LOCAL, 1_800_000_000).is_ok());
        assert_eq!(
            check_text(&text, &a, LOCAL, 1_900_000_000),
            Err(Refusal::Expired)
        );
        assert_eq!(parse_expiry("2030"), None);
    }

    #[test]
    fn user_names_cannot_escape_the_template() {
        assert!(path_for("/home/{user}/.ssh/authorized_keys", "alice").is_some());
        for bad in ["", "../etc", "a/b", "-rf", ".hidden", "a b", "x\0"] {
            assert!(path_for("/home/{user}/k", bad).is_none(), "{bad:?}");
        }
    }
}
