//! The properties poolgate's fuzz targets assert, one function per target.
//!
//! Each function takes the raw fuzz input, runs it through the gateway or config code and panics
//! (an `assert!`) when a property does not hold. The fuzz targets in `fuzz_targets/` call them,
//! and so does the workspace test `tests/tests/fuzz_corpus.rs` (which includes this file as a
//! module) with every committed seed in `corpus/`, so the targets cannot rot.
//!
//! Inputs are text with a small header line, so seeds stay readable; a header that does not
//! parse falls back to defaults, so every input is exercised.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Component, Path};
use std::sync::OnceLock;
use std::time::Duration;

use data_encoding::BASE64URL_NOPAD;
use gateway::http::cookie::{CookieFinder, CookieSigner, Pin, set_cookie_header};
use gateway::http::headers::{
    Forwarding, set_forwarding, strip_hop_by_hop, strip_request, wants_upgrade,
};
use gateway::ssh::authorized_keys::{self, KeyPermissions, Refusal};
use gateway::ssh::known_hosts::{HostKeyPolicy, Verdict};
use hyper::HeaderMap;
use hyper::header::{HeaderName, HeaderValue};
use poolgate_config::{ConfigError, ValidationError};
use russh::keys::ssh_key::PublicKey;

/// A target's check: panics when a property does not hold for the input.
pub type Check = fn(&[u8]);

/// The fuzz targets, by name (the names of `fuzz_targets/*.rs` and `corpus/*/`).
pub const TARGETS: &[(&str, Check)] = &[
    ("config_parse", config_parse),
    ("cookie_verify", cookie_verify),
    ("authorized_keys", authorized_keys),
    ("known_hosts", known_hosts),
    ("forwarded_headers", forwarded_headers),
];

/// Public keys the SSH targets look up (generated with ssh-keygen for these seeds only; nobody
/// holds the private halves). Keys 0 and 3 have the same algorithm.
pub const KEYS: [&str; 4] = [
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFM0REbix5htjnaSdaedIKe/9QkBzeoOlC+iI158VeZH fuzz-ed25519",
    "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBCaiAdNE7rbPOgdgtPSctsJD9Ve+ID74QiAuV9nW5L+Co6wVPkAQqVqjcZaetfkXhBYtkwij0G82o3G9bBhTc14= fuzz-ecdsa",
    "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQCq9c57CWkmycgimKiR/akTRkUOUEE15zpSsYYVV+L+XUTo6kL2aoeVbJsauZvPoEWHdV7+T0hft/VJhVwpnL2xmg+nesFOEwXVYbXR8rjINWWXdgf5aG2XOcXeO6XiRpMXuHEZ9/yvpBnYuhHmzH2ScF0NJSpLoXcGMhQAww3/xpvoNOGqbigKQu409xAGVeXVEtp948TgZ1gbeS4NavQHtldJEjBsTYx/J3VQejhOXi6v8F8ILUYfZ/DKUYCn4ZmKEOgJ/SKYVxUIWhN+XMKbez37Fy412bcNzoeMfbTN6Rkc9TQOdtXdFtKwsKKlh6OWEpEa9xr8l6weRIuG+h2Z fuzz-rsa",
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICkkvt4qOkRzKpXmERDO4EmJLQfxwg3oLzG2DNfhHUi1 fuzz-ed25519-b",
];

fn key(index: usize) -> PublicKey {
    PublicKey::from_openssh(KEYS[index % KEYS.len()]).expect("KEYS are valid OpenSSH keys")
}

/// Splits off the first line (the header) and returns it and the rest.
fn header_and_rest(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}

/// The whitespace-separated words of a header line (lossy UTF-8).
fn words(line: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(line)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

fn word<T: std::str::FromStr>(words: &[String], i: usize, default: T) -> T {
    words.get(i).and_then(|w| w.parse().ok()).unwrap_or(default)
}

// ---- config_parse -------------------------------------------------------------------------

/// Where the config text is pretended to live (relative paths are joined to it).
const CONFIG_BASE: &str = "/srv/poolgate";

/// `poolgate_config::parse` on arbitrary text: either `Ok` with a configuration that validates
/// and survives a TOML round trip unchanged, or an error whose every line starts with a key path
/// (`pool.backends[1].ssh_port: ...`) or `FILE:LINE:COLUMN` (`<config>:3:7: ...`).
pub fn config_parse(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let base = Path::new(CONFIG_BASE);
    let result = poolgate_config::parse(text, base);
    match &result {
        Ok(config) => {
            let problems = config.validate();
            assert!(
                problems.is_empty(),
                "parse returned Ok with problems: {problems:?}"
            );
            let _ = config.summary();
            // What the gateway holds can be written back as TOML and reads back identically.
            let written = toml::to_string(config).expect("a parsed Config serializes to TOML");
            match poolgate_config::parse(&written, base) {
                Ok(again) => assert!(
                    again == *config,
                    "round trip changed the config:\n{written}\n{again:#?}\n!=\n{config:#?}"
                ),
                Err(e) => panic!("the config written back does not parse: {e}\n{written}"),
            }
        }
        Err(ConfigError::Parse {
            path,
            line,
            column,
            message,
        }) => {
            assert_eq!(path, Path::new("<config>"));
            let lines = text.split('\n').count();
            assert!(
                *line >= 1 && *line <= lines,
                "line {line} outside 1..={lines}"
            );
            assert!(*column >= 1, "column {column}");
            assert!(!message.contains(['\n', '\r']), "{message:?}");
            let shown = result.as_ref().err().map(ToString::to_string);
            let prefix = format!("<config>:{line}:{column}: ");
            assert!(
                shown.as_deref().is_some_and(|s| s.starts_with(&prefix)),
                "{shown:?}"
            );
        }
        Err(ConfigError::Invalid(errors)) => check_validation_errors(errors),
        Err(other) => panic!("parse touched the filesystem: {other}"),
    }
    // Every line of the message an operator sees starts with FILE:LINE:COLUMN or a key path.
    if let Err(e) = &result {
        let shown = e.to_string();
        let mut lines = shown.lines();
        if let ConfigError::Invalid(errors) = e {
            let first = lines.next().unwrap_or_default();
            assert!(
                first.starts_with("invalid configuration (") && first.ends_with("):"),
                "{first:?}"
            );
            assert_eq!(lines.clone().count(), errors.len(), "{shown}");
            for (line, error) in lines.zip(errors) {
                let rest = line.strip_prefix("  ").unwrap_or_default();
                let key = rest.split_once(": ").map(|(k, _)| k);
                assert_eq!(key, Some(error.key.as_str()), "{line:?}");
            }
        } else {
            assert_eq!(shown.lines().count(), 1, "{shown:?}");
        }
    }
    // Parsing is a pure function of the text.
    let again = poolgate_config::parse(text, base);
    assert_eq!(
        again.as_ref().map_err(ToString::to_string),
        result.as_ref().map_err(ToString::to_string)
    );
}

fn check_validation_errors(errors: &[ValidationError]) {
    assert!(!errors.is_empty(), "Invalid without problems");
    let known = known_paths();
    for error in errors {
        assert!(
            !error.key.contains(['\n', '\r']) && !error.message.contains(['\n', '\r']),
            "a problem spans lines: {error:?}"
        );
        assert!(!error.message.is_empty(), "{error:?}");
        let Some(segments) = key_path_segments(&error.key) else {
            panic!("not a key path: {:?} ({error})", error.key);
        };
        // A problem with a value names a key poolgate knows (or a table above one); only
        // unknown keys name something else.
        if !error.message.starts_with("unknown key") {
            assert!(
                known.contains(&segments),
                "problem reported at a key poolgate does not know: {error}"
            );
        }
    }
    let mut unique = errors.to_vec();
    unique.dedup();
    assert_eq!(unique.len(), errors.len(), "duplicate problems: {errors:?}");
}

/// Every known key and every table above one, as segments with array items written `name[]`.
fn known_paths() -> &'static BTreeSet<Vec<String>> {
    static PATHS: OnceLock<BTreeSet<Vec<String>>> = OnceLock::new();
    PATHS.get_or_init(|| {
        let mut paths = BTreeSet::new();
        for key in poolgate_config::known_keys() {
            let segments: Vec<String> = key.split('.').map(str::to_owned).collect();
            // Items of an array of values (`ssh.host_keys[1]`) are reported by index.
            let mut items = segments.clone();
            if let Some(last) = items.last_mut() {
                last.push_str("[]");
            }
            paths.insert(items);
            for n in 1..=segments.len() {
                paths.insert(segments[..n].to_vec());
                // `pool.backends[]` is also reported as `pool.backends` (the array itself).
                let mut bare = segments[..n].to_vec();
                if let Some(last) = bare.last_mut()
                    && let Some(stripped) = last.strip_suffix("[]")
                {
                    *last = stripped.to_owned();
                    paths.insert(bare);
                }
            }
        }
        paths
    })
}

/// Parses a rendered key path (`pool.backends[1].ssh_port`, `a."b.c"[2]`) into segments with
/// indexes folded as `[]` (`["pool", "backends[]", "ssh_port"]`); `None` when it is not one.
fn key_path_segments(key: &str) -> Option<Vec<String>> {
    let mut segments = Vec::new();
    let mut chars = key.chars().peekable();
    loop {
        let mut segment = String::new();
        if chars.peek() == Some(&'"') {
            // A quoted segment, as Rust's `{:?}` writes it.
            segment.push('"');
            chars.next();
            loop {
                match chars.next()? {
                    '\\' => {
                        segment.push('\\');
                        segment.push(chars.next()?);
                    }
                    '"' => break,
                    c => segment.push(c),
                }
            }
            segment.push('"');
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    segment.push(c);
                    chars.next();
                } else {
                    break;
                }
            }
            if segment.is_empty() {
                return None;
            }
        }
        while chars.peek() == Some(&'[') {
            chars.next();
            let mut digits = 0;
            while chars.peek().is_some_and(char::is_ascii_digit) {
                chars.next();
                digits += 1;
            }
            if digits == 0 || chars.next()? != ']' {
                return None;
            }
            segment.push_str("[]");
        }
        segments.push(segment);
        match chars.next() {
            None => return Some(segments),
            Some('.') => {}
            Some(_) => return None,
        }
    }
}

// ---- cookie_verify ------------------------------------------------------------------------

/// The key the cookie seeds are signed with.
pub const COOKIE_KEY: &[u8; 32] = b"poolgate fuzz cookie key, 32 b!!";
/// How far in the future a cookie may be issued (clock skew), as documented by the gateway.
const COOKIE_SKEW_SECS: u64 = 300;
const COOKIE_NAME: &str = "poolgate_vm";

/// A cookie seed: the VM and session to sign, the times, and a cookie value to verify.
pub fn cookie_seed(vm: &str, session: &str, issued: u64, now: u64, max_age: u64) -> String {
    let signer = CookieSigner::new(COOKIE_KEY, Duration::from_secs(max_age));
    let value = signer.sign(vm, session, issued);
    format!("{vm}\n{session}\n{issued} {now} {max_age}\n{value}\n")
}

/// Input lines: VM, session id, `issued now max_age`, a cookie value, `edit-seed`.
///
/// * A value that verifies is exactly what the signer issues for its [`Pin`] (one encoding per
///   pin), lies in the time window, and does not verify under another key.
/// * `sign(vm, session, issued)` verifies, back to the same `Pin`, exactly when the VM is
///   non-empty, the session is a 16-byte base64url id and `issued` is in the window.
/// * No one-character change, deletion, insertion or truncation of a valid signed cookie
///   verifies.
/// * The `Set-Cookie` value is a valid header, and [`CookieFinder`] finds the value in a
///   `Cookie` header again.
/// * In a `Cookie` header made of the input's cookie value line, whatever it holds, the finder
///   does not panic, finds a value only if the header holds the name followed by `=`, and the
///   value it finds is part of the header.
pub fn cookie_verify(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let vm = lines.next().unwrap_or_default();
    let session = lines.next().unwrap_or_default();
    let times = words(lines.next().unwrap_or_default().as_bytes());
    let value = lines.next().unwrap_or_default();
    let edit: u64 = word(
        &words(lines.next().unwrap_or_default().as_bytes()),
        0,
        0x5eed,
    );
    let now: u64 = word(&times, 1, 1_700_000_000);
    let issued: u64 = word(&times, 0, now);
    let max_age: u64 = word(&times, 2, 86_400);
    let signer = CookieSigner::new(COOKIE_KEY, Duration::from_secs(max_age));
    let other = CookieSigner::new(
        b"another key of the same length!!",
        Duration::from_secs(max_age),
    );
    let in_window = |issued: u64| {
        issued <= now.saturating_add(COOKIE_SKEW_SECS) && now.saturating_sub(issued) <= max_age
    };

    // An arbitrary value.
    if let Some(pin) = signer.verify(value, now) {
        assert_eq!(
            signer.sign(&pin.vm, &pin.session, pin.issued_at),
            value,
            "a verified cookie is not what the signer issues for {pin:?}"
        );
        assert!(!pin.vm.is_empty() && in_window(pin.issued_at), "{pin:?}");
        assert_eq!(session_id_len(&pin.session), Some(16), "{pin:?}");
        assert_eq!(other.verify(value, now), None, "verifies under another key");
        let _ = signer.wants_refresh(&pin, now);
    }

    // Sign, then verify.
    let signed = signer.sign(vm, session, issued);
    let expected = (!vm.is_empty()
        && session_id_len(session) == Some(16)
        && signed.len() <= 1024
        && in_window(issued))
    .then(|| Pin {
        vm: vm.to_owned(),
        issued_at: issued,
        session: session.to_owned(),
    });
    assert_eq!(signer.verify(&signed, now), expected, "cookie {signed:?}");
    if expected.is_none() {
        return;
    }
    assert_eq!(
        other.verify(&signed, now),
        None,
        "verifies under another key"
    );
    // Any change to a signed cookie is refused.
    let bytes = signed.as_bytes();
    let mut mutants: Vec<Vec<u8>> = Vec::new();
    for i in 0..bytes.len() {
        // Substitute a different printable character, chosen by the input.
        let replacement = 0x21 + ((u64::from(bytes[i]) + edit + i as u64) % 94) as u8;
        if replacement != bytes[i] {
            let mut m = bytes.to_vec();
            m[i] = replacement;
            mutants.push(m);
        }
        let mut deleted = bytes.to_vec();
        deleted.remove(i);
        mutants.push(deleted);
        mutants.push(bytes[..i].to_vec());
    }
    let at = (edit as usize) % (bytes.len() + 1);
    for inserted in [b'.', b'A', b'0', (0x21 + (edit % 94)) as u8] {
        let mut m = bytes.to_vec();
        m.insert(at, inserted);
        mutants.push(m);
    }
    for mutant in &mutants {
        let Ok(mutant) = std::str::from_utf8(mutant) else {
            continue;
        };
        assert_ne!(mutant, signed);
        assert_eq!(
            signer.verify(mutant, now),
            None,
            "mutant {mutant:?} of {signed:?} verifies"
        );
    }
    // Stale and future cookies are refused.
    if let Some(late) = issued.checked_add(max_age).and_then(|t| t.checked_add(1)) {
        assert_eq!(signer.verify(&signed, late), None, "stale cookie verifies");
    }
    if let Some(early) = issued.checked_sub(COOKIE_SKEW_SECS + 1) {
        assert_eq!(
            signer.verify(&signed, early),
            None,
            "future cookie verifies"
        );
    }
    // What the gateway sends and reads back.
    let set = set_cookie_header(COOKIE_NAME, &signed, Duration::from_secs(max_age), true);
    assert!(HeaderValue::from_str(&set).is_ok(), "Set-Cookie {set:?}");
    let mut headers = HeaderMap::new();
    let cookie = format!("_xsrf=x; {COOKIE_NAME}={signed}; other=1");
    headers.insert(
        hyper::header::COOKIE,
        HeaderValue::from_str(&cookie).expect("signed cookies are header-safe"),
    );
    let finder = CookieFinder::new(COOKIE_NAME);
    assert_eq!(finder.find(&headers), Some(signed.as_bytes()));
    if let Ok(any) = HeaderValue::from_bytes(value.as_bytes()) {
        let mut headers = HeaderMap::new();
        headers.insert(hyper::header::COOKIE, any);
        if let Some(found) = finder.find(&headers) {
            assert!(
                value.contains(&format!("{COOKIE_NAME}="))
                    && (found.is_empty()
                        || value.as_bytes().windows(found.len()).any(|w| w == found)),
                "{found:?} found in {value:?}"
            );
        }
    }
}

/// Bytes in a base64url (no padding) session id, `None` when it does not decode.
fn session_id_len(session: &str) -> Option<usize> {
    BASE64URL_NOPAD
        .decode(session.as_bytes())
        .ok()
        .map(|v| v.len())
}

// ---- authorized_keys ----------------------------------------------------------------------

const NO_PERMISSIONS: KeyPermissions = KeyPermissions {
    port_forwarding: false,
    agent_forwarding: false,
    pty: false,
};
/// `expiry-time="20300101"` in Unix seconds.
const EXPIRY_2030: u64 = 1_893_456_000;

/// Input: a header line `client-ip now key-index`, then authorized_keys text.
///
/// `check_text` is deterministic, and lines added before or after the text act as OpenSSH
/// (and the module docs) say: the first line that accepts the key wins, a refusing line only
/// matters when no line accepts. So appending the plain key always accepts with the earlier
/// permissions or all of them; prepending `restrict` gives no permissions; prepending `from=`
/// with the client's address accepts; prepending `command=`, `from="!ip,*"` or an expired
/// `expiry-time=` refuses only when nothing else accepts. A user name accepted for the path
/// template never leaves the user's directory.
pub fn authorized_keys(data: &[u8]) {
    let (header, rest) = header_and_rest(data);
    let params = words(header);
    let client: IpAddr = word(&params, 0, IpAddr::from([127, 0, 0, 1]));
    let now: u64 = word(&params, 1, 1_700_000_000);
    let index: usize = word(&params, 2, 0);
    let text = String::from_utf8_lossy(rest);
    let key = key(index);
    let line = KEYS[index % KEYS.len()];
    let check = |text: &str| authorized_keys::check_text(text, &key, client, now);

    let result = check(&text);
    assert_eq!(check(&text), result, "not deterministic");
    let accepted_or = |r: Result<KeyPermissions, Refusal>| match &result {
        Ok(p) => Ok(*p),
        Err(_) => r,
    };
    // The refusal when a refusing line comes first.
    let refused_first = |refusal: Refusal| match &result {
        Ok(p) => Ok(*p),
        Err(Refusal::NotListed) => Err(refusal),
        Err(r) => Err(r.clone()),
    };
    assert_eq!(
        check(&format!("{text}\n{line}\n")),
        accepted_or(Ok(KeyPermissions::ALL)),
        "appended plain key"
    );
    assert_eq!(
        check(&format!("restrict {line}\n{text}")),
        Ok(NO_PERMISSIONS),
        "prepended restrict"
    );
    let ip = client.to_canonical();
    assert_eq!(
        check(&format!("from=\"{ip}\",no-pty {line}\n{text}")),
        Ok(KeyPermissions {
            pty: false,
            ..KeyPermissions::ALL
        }),
        "prepended from= the client"
    );
    assert_eq!(
        check(&format!("from=\"!{ip},*\" {line}\n{text}")),
        refused_first(Refusal::FromMismatch),
        "prepended from= everyone but the client"
    );
    assert_eq!(
        check(&format!("command=\"/bin/true\" {line}\n{text}")),
        refused_first(Refusal::Unenforceable("command".into())),
        "prepended command="
    );
    let expiring = check(&format!("expiry-time=\"20300101\" {line}\n{text}"));
    if now < EXPIRY_2030 {
        assert_eq!(expiring, Ok(KeyPermissions::ALL), "unexpired key");
    } else {
        assert_eq!(expiring, refused_first(Refusal::Expired), "expired key");
    }

    // User names from the text: an accepted one is a single path component.
    let template = "/home/{user}/.ssh/authorized_keys";
    for user in text.lines().take(4) {
        if let Some(path) = authorized_keys::path_for(template, user) {
            let parts: Vec<Component<'_>> = path.components().collect();
            assert!(
                parts.len() == 5
                    && parts[0] == Component::RootDir
                    && parts[1..].iter().all(|c| matches!(c, Component::Normal(_)))
                    && path.starts_with("/home")
                    && path.ends_with(".ssh/authorized_keys"),
                "user {user:?} gives {path:?}"
            );
        }
    }
}

// ---- known_hosts --------------------------------------------------------------------------

/// Input: a header line `host port key-index`, then known_hosts text.
///
/// `check_key` is deterministic and never answers `BadCertificate`; `@revoked * KEY` appended
/// revokes the key for every host; an entry naming the host appended makes its key `Trusted`
/// (unless revoked) and another key of the same type `Changed` where it was `Unknown`; an
/// entry matching every host but this one (`!host,*`) changes nothing; an `@cert-authority`
/// entry makes the policy want certificates and does not change a plain key's verdict.
pub fn known_hosts(data: &[u8]) {
    let (header, rest) = header_and_rest(data);
    let params = words(header);
    let host = params.first().cloned().unwrap_or_else(|| "10.0.0.4".into());
    let port: u16 = word(&params, 1, 22);
    let index: usize = word(&params, 2, 0);
    let text = String::from_utf8_lossy(rest);
    let key = key(index);
    let line = KEYS[index % KEYS.len()];
    let verdict = |text: &str| HostKeyPolicy::parse(text).check_key(&host, port, &key);

    let policy = HostKeyPolicy::parse(&text);
    let before = policy.check_key(&host, port, &key);
    assert_eq!(verdict(&text), before, "not deterministic");
    assert!(!matches!(before, Verdict::BadCertificate(_)), "{before:?}");
    let _ = policy.wants_certificates();

    assert_eq!(
        verdict(&format!("{text}\n@revoked * {line}\n")),
        Verdict::Revoked,
        "appended @revoked *"
    );
    let with_ca = HostKeyPolicy::parse(&format!("{text}\n@cert-authority * {line}\n"));
    assert!(with_ca.wants_certificates());
    assert_eq!(with_ca.check_key(&host, port, &key), before, "appended CA");

    // Entries naming the host need a host that is a literal pattern.
    let literal = !host.is_empty()
        && !host.starts_with(['@', '|', '!'])
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b));
    if !literal {
        return;
    }
    let pattern = if port == 22 {
        host.clone()
    } else {
        format!("[{host}]:{port}")
    };
    let expect_unless_revoked = |v: Verdict| {
        if before == Verdict::Revoked {
            Verdict::Revoked
        } else {
            v
        }
    };
    assert_eq!(
        verdict(&format!("{text}\n{pattern} {line}\n")),
        expect_unless_revoked(Verdict::Trusted),
        "appended {pattern}"
    );
    assert_eq!(
        verdict(&format!("{text}\n!{pattern},* {line}\n")),
        before,
        "appended an entry for every host but {pattern}"
    );
    let ed25519 = index % KEYS.len();
    if ed25519 == 0 || ed25519 == 3 {
        let other = KEYS[3 - ed25519];
        let changed = if before == Verdict::Unknown {
            Verdict::Changed
        } else {
            before.clone()
        };
        assert_eq!(
            verdict(&format!("{text}\n{pattern} {other}\n")),
            changed,
            "appended another key for {pattern}"
        );
    }
}

// ---- forwarded_headers --------------------------------------------------------------------

/// Hop-by-hop headers the gateway removes (RFC 9110 §7.6.1 and common non-standard ones).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];
/// Forwarding headers only the gateway may set.
const FORWARDING: &[&str] = &[
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-real-ip",
    "x-scheme",
];

fn by_name(
    headers: &HeaderMap,
    keep: impl Fn(&HeaderName) -> bool,
) -> BTreeMap<String, Vec<HeaderValue>> {
    let mut map: BTreeMap<String, Vec<HeaderValue>> = BTreeMap::new();
    for (name, value) in headers.iter().filter(|(n, _)| keep(n)) {
        map.entry(name.as_str().to_owned())
            .or_default()
            .push(value.clone());
    }
    map
}

/// Input lines: `client-addr https(0|1) port`, the request's host (empty: none), then client
/// headers as `name: value` (raw bytes).
///
/// `strip_request` (as the gateway runs it) and `strip_hop_by_hop` give the same headers once
/// `set_forwarding` has run. After them: no hop-by-hop header nor one the client's
/// `Connection` named is left; `X-Real-IP`/`X-Scheme` are gone; `X-Forwarded-For`, `-Proto`,
/// `-Port` and `Forwarded` each appear once with exactly the client's (IPv4-unmapped) address,
/// scheme and port, `X-Forwarded-Host` appears iff the host is a plain host[:port] and equals
/// it; every value is a valid header value without CR, LF or NUL; every other client header is
/// passed on unchanged (values of one name in order).
pub fn forwarded_headers(data: &[u8]) {
    let mut lines = data.split(|&b| b == b'\n');
    let params = words(lines.next().unwrap_or_default());
    let client: SocketAddr = word(&params, 0, SocketAddr::from(([203, 0, 113, 7], 50_000)));
    let https = word(&params, 1, 1u8) != 0;
    let port: u16 = word(&params, 2, 443);
    let host_line = String::from_utf8_lossy(lines.next().unwrap_or_default()).into_owned();
    let host = (!host_line.is_empty()).then_some(host_line.as_str());
    let mut headers = HeaderMap::new();
    for line in lines {
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => (&line[..i], line[i + 1..].trim_ascii_start()),
            None => (line, &b""[..]),
        };
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    }
    let upgrade = wants_upgrade(&headers);
    assert!(!upgrade || headers.contains_key(hyper::header::UPGRADE));

    let named: Vec<HeaderName> = headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    let removed = |name: &HeaderName| {
        HOP_BY_HOP.contains(&name.as_str())
            || FORWARDING.contains(&name.as_str())
            || named.contains(name)
    };
    // By name: removing headers may reorder names, never the values of one name.
    let kept: BTreeMap<String, Vec<HeaderValue>> = by_name(&headers, |n| !removed(n));

    let fwd = Forwarding {
        client,
        https,
        port,
    };
    // As the gateway passes it: the request's Host header.
    let host_value = host.and_then(|h| HeaderValue::from_str(h).ok());
    // The gateway's one pass, and the two steps it stands for, leave the same headers.
    let mut out = headers.clone();
    strip_request(&mut out);
    set_forwarding(&mut out, &fwd, host_value.as_ref());
    let mut two_steps = headers.clone();
    strip_hop_by_hop(&mut two_steps);
    set_forwarding(&mut two_steps, &fwd, host_value.as_ref());
    assert_eq!(out, two_steps, "strip_request differs from its two steps");

    for name in HOP_BY_HOP.iter().chain(&["x-real-ip", "x-scheme"]) {
        assert!(!out.contains_key(*name), "{name} left in {out:?}");
    }
    for name in &named {
        if !FORWARDING.contains(&name.as_str()) {
            assert!(!out.contains_key(name), "{name} (named by Connection) left");
        }
    }
    for (name, value) in &out {
        let bytes = value.as_bytes();
        assert!(
            !bytes.iter().any(|b| matches!(b, b'\r' | b'\n' | b'\0')),
            "{name}: {value:?}"
        );
        assert!(HeaderValue::from_bytes(bytes).is_ok(), "{name}: {value:?}");
    }
    let others = by_name(&out, |n| !FORWARDING.contains(&n.as_str()));
    assert_eq!(
        others, kept,
        "end-to-end headers were not passed on unchanged"
    );

    let one = |name: &str| -> String {
        let values: Vec<&HeaderValue> = out.get_all(name).iter().collect();
        assert_eq!(values.len(), 1, "{name}: {values:?}");
        values[0]
            .to_str()
            .unwrap_or_else(|_| panic!("{name} is not visible ASCII: {:?}", values[0]))
            .to_owned()
    };
    let ip = client.ip().to_canonical();
    let proto = if https { "https" } else { "http" };
    assert_eq!(one("x-forwarded-for").parse::<IpAddr>().ok(), Some(ip));
    assert_eq!(one("x-forwarded-proto"), proto);
    assert_eq!(one("x-forwarded-port"), port.to_string());
    let plain_host = host.filter(|h| {
        h.len() <= 255
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b))
    });
    match plain_host {
        Some(h) => assert_eq!(one("x-forwarded-host"), h),
        None => assert!(!out.contains_key("x-forwarded-host"), "{host:?}"),
    }
    // RFC 7239: for=node (IPv6 quoted and bracketed); proto; host as a quoted string.
    let node = match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"[{v6}]\""),
    };
    let mut forwarded = format!("for={node};proto={proto}");
    if let Some(h) = plain_host {
        forwarded.push_str(&format!(";host=\"{h}\""));
    }
    assert_eq!(one("forwarded"), forwarded);
}
