//! TOML text to [`Config`], reporting every shape error and unknown key by its key path.
//!
//! Syntax errors stop parsing (nothing after them can be trusted) and are reported with line and
//! column. A value of the wrong shape (`ssh_port = 70000`, `interval = "5 parsecs"`,
//! `provider = "x"`) is reported by key path, removed from the document so that its default
//! applies, and parsing is retried; so one run reports every such value. Keys the types do not
//! know are collected with `serde_ignored` and reported with a "did you mean" hint.

use std::ops::Range;
use std::path::Path;

use toml::de::{DeArray, DeTable, DeValue};

use crate::error::{ConfigError, ValidationError};
use crate::keys::did_you_mean;
use crate::model::Config;

/// What [`deserialize`] found: a configuration (defaults where values were wrong) and the
/// problems that were worked around.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub(crate) config: Config,
    /// Shape errors, then unknown keys, each with its key path.
    pub(crate) errors: Vec<ValidationError>,
    /// Key paths whose values were dropped because of a shape error.
    pub(crate) dropped: Vec<String>,
}

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

/// Renders `pool.backends[1].ssh_port`.
fn render(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                let bare = !k.is_empty()
                    && k.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                if bare {
                    out.push_str(k);
                } else {
                    out.push_str(&format!("{k:?}"));
                }
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Segments with indexes folded into the array's name: `["pool", "backends[]", "name"]`.
fn normalized(path: &[Seg]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for seg in path {
        match seg {
            Seg::Key(k) => out.push(k.clone()),
            Seg::Index(_) => {
                if let Some(last) = out.last_mut() {
                    last.push_str("[]");
                }
            }
        }
    }
    out
}

fn ignored_path(path: &serde_ignored::Path<'_>) -> Vec<Seg> {
    use serde_ignored::Path as P;
    match path {
        P::Root => Vec::new(),
        P::Seq { parent, index } => {
            let mut v = ignored_path(parent);
            v.push(Seg::Index(*index));
            v
        }
        P::Map { parent, key } => {
            let mut v = ignored_path(parent);
            v.push(Seg::Key(key.clone()));
            v
        }
        P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
            ignored_path(parent)
        }
    }
}

/// The message for an unknown key.
fn unknown_key(path: &[Seg]) -> ValidationError {
    let hint = did_you_mean(&normalized(path)).unwrap_or_else(|| {
        "not a poolgate setting: remove it; docs/configuration.md lists every key".to_owned()
    });
    ValidationError::new(render(path), format!("unknown key ({hint})"))
}

/// Bound on repair rounds; far more than there are keys.
const MAX_ROUNDS: usize = 10_000;

/// Parses `text` (read from `file`, used only in error messages).
pub(crate) fn deserialize(text: &str, file: &Path) -> Result<Outcome, ConfigError> {
    let mut doc =
        DeTable::parse(text).map_err(|e| parse_error(file, text, e.span(), e.message()))?;
    let mut errors = Vec::new();
    let mut dropped = Vec::new();
    let mut patched: Vec<Vec<Seg>> = Vec::new();
    let mut rounds = 0;
    loop {
        let mut ignored = Vec::new();
        let result: Result<Config, toml::de::Error> =
            serde_ignored::deserialize(toml::de::Deserializer::from(doc.clone()), |path| {
                ignored.push(ignored_path(&path))
            });
        let error = match result {
            Ok(config) => {
                errors.extend(ignored.iter().map(|p| unknown_key(p)));
                errors.dedup();
                return Ok(Outcome {
                    config,
                    errors,
                    dropped,
                });
            }
            Err(error) => error,
        };
        // Find the value the error is about, report it by key, drop it and try again. A wrong
        // array item is replaced by an empty table or string (at most once per path), so the
        // indexes of the items after it stay those of the file.
        let path = error.span().and_then(|span| locate(&doc, &span));
        rounds += 1;
        match path {
            Some(path) if !path.is_empty() && rounds <= MAX_ROUNDS => {
                let key = render(&path);
                let message = with_hint(&key, tidy(error.message()));
                let placeholder = if patched.contains(&path) {
                    None
                } else if message.ends_with("expected a table") {
                    Some(DeValue::Table(DeTable::new()))
                } else {
                    Some(DeValue::String("".into()))
                };
                if !remove(doc.get_mut(), &path, placeholder) {
                    return Err(parse_error(file, text, error.span(), error.message()));
                }
                errors.push(ValidationError::new(&key, message));
                dropped.push(key);
                patched.push(path);
            }
            _ => return Err(parse_error(file, text, error.span(), error.message())),
        }
    }
}

/// The path of the smallest key or value whose span contains `span`.
fn locate(doc: &toml::Spanned<DeTable<'_>>, span: &Range<usize>) -> Option<Vec<Seg>> {
    fn visit_table(
        table: &DeTable<'_>,
        path: &mut Vec<Seg>,
        span: &Range<usize>,
        best: &mut Option<(usize, Vec<Seg>)>,
    ) {
        for (key, value) in table.iter() {
            path.push(Seg::Key(key.get_ref().to_string()));
            consider(&key.span(), path, span, best);
            visit_value(value, path, span, best);
            path.pop();
        }
    }
    fn visit_value(
        value: &toml::Spanned<DeValue<'_>>,
        path: &mut Vec<Seg>,
        span: &Range<usize>,
        best: &mut Option<(usize, Vec<Seg>)>,
    ) {
        consider(&value.span(), path, span, best);
        match value.get_ref() {
            DeValue::Table(t) => visit_table(t, path, span, best),
            DeValue::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    path.push(Seg::Index(i));
                    visit_value(item, path, span, best);
                    path.pop();
                }
            }
            _ => {}
        }
    }
    fn consider(
        candidate: &Range<usize>,
        path: &[Seg],
        span: &Range<usize>,
        best: &mut Option<(usize, Vec<Seg>)>,
    ) {
        let contains = candidate.start <= span.start && span.end <= candidate.end;
        let size = candidate.end - candidate.start;
        if contains && best.as_ref().is_none_or(|(b, _)| size < *b) {
            *best = Some((size, path.to_vec()));
        }
    }
    let mut best = None;
    visit_table(doc.get_ref(), &mut Vec::new(), span, &mut best);
    best.map(|(_, path)| path)
}

/// Removes the value at `path`, or, for an array item, replaces it with `placeholder` when
/// given; false when there is no such value.
fn remove(table: &mut DeTable<'_>, path: &[Seg], placeholder: Option<DeValue<'static>>) -> bool {
    match path {
        [Seg::Key(k)] => table.remove(k.as_str()).is_some(),
        [Seg::Key(k), rest @ ..] => table
            .get_mut(k.as_str())
            .is_some_and(|v| remove_in(v.get_mut(), rest, placeholder)),
        _ => false,
    }
}

fn remove_in(value: &mut DeValue<'_>, path: &[Seg], placeholder: Option<DeValue<'static>>) -> bool {
    match (value, path) {
        (DeValue::Table(t), _) => remove(t, path, placeholder),
        (DeValue::Array(items), [Seg::Index(i)]) if *i < items.len() => {
            if let Some(placeholder) = placeholder {
                if let Some(item) = items.get_mut(*i) {
                    *item.get_mut() = placeholder;
                }
            } else {
                let mut kept = DeArray::new();
                for (j, item) in items.iter().enumerate() {
                    if j != *i {
                        kept.push(item.clone());
                    }
                }
                *items = kept;
            }
            true
        }
        (DeValue::Array(items), [Seg::Index(i), rest @ ..]) => items
            .get_mut(*i)
            .is_some_and(|v| remove_in(v.get_mut(), rest, placeholder)),
        _ => false,
    }
}

/// Rewrites serde's type names into words an operator knows.
fn tidy(message: &str) -> String {
    let mut m = message.replace('\n', "; ");
    if let Some(i) = m.find("expected struct ") {
        m.truncate(i);
        m.push_str("expected a table");
    }
    for (from, to) in [
        ("expected u16", "expected a whole number from 0 to 65535"),
        (
            "expected u32",
            "expected a whole number from 0 to 4294967295",
        ),
        ("expected usize", "expected a whole number of 0 or more"),
        ("expected a sequence", "expected an array"),
        ("expected a boolean", "expected true or false"),
    ] {
        m = m.replace(from, to);
    }
    m
}

/// Adds what to write for keys whose shape is easy to get wrong.
fn with_hint(key: &str, message: String) -> String {
    if !message.ends_with("expected an array") {
        return message;
    }
    if key.starts_with("pool.exec.") {
        format!("{message} (write the command as an argv array, e.g. [\"pool-vms\", \"list\"])")
    } else if key == "ssh.host_keys" {
        format!("{message} (e.g. [\"keys/ssh_host_ed25519_key\"])")
    } else if message.contains("invalid type: map") {
        // `[pool.backends]` where `[[pool.backends]]` was meant: one table, not an array.
        format!("{message} (write [[{key}]], with two brackets, above each entry)")
    } else {
        message
    }
}

/// A [`ConfigError::Parse`] at the byte offset `span.start` of `text`.
fn parse_error(file: &Path, text: &str, span: Option<Range<usize>>, message: &str) -> ConfigError {
    let (line, column) = span.map_or((1, 1), |s| line_column(text, s.start));
    let mut message = message.trim().replace('\n', "; ");
    // The line itself, so that "duplicate key" or "invalid float" say what they are about.
    let source = text
        .lines()
        .nth(line - 1)
        .map(str::trim)
        .unwrap_or_default();
    if !source.is_empty() && source.chars().count() <= 120 {
        message.push_str(&format!(", in `{source}`"));
        // An address or path written without quotes reads to TOML as a broken number.
        if let Some((_, value)) = source.split_once('=')
            && let value = value.trim()
            && !value.starts_with(['"', '\'', '[', '{'])
            && value.contains([':', '/', '.'])
            && value.chars().any(|c| c.is_ascii_digit() || c == '/')
            && value.parse::<f64>().is_err()
        {
            message.push_str(&format!(" (text values are quoted: \"{value}\")"));
        }
    }
    ConfigError::Parse {
        path: file.to_path_buf(),
        line,
        column,
        message,
    }
}

/// 1-based line and column (in characters) of byte `offset`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn errors(text: &str) -> Vec<String> {
        deserialize(text, Path::new("t.toml"))
            .unwrap()
            .errors
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn line_and_column() {
        assert_eq!(line_column("abc", 0), (1, 1));
        assert_eq!(line_column("a\nbcd", 4), (2, 3));
        assert_eq!(line_column("é\nx", 3), (2, 1));
        assert_eq!(line_column("ab", 99), (1, 3));
    }

    #[test]
    fn syntax_error_has_line_and_column() {
        let text = "[ssh]\nlogin_grace = \"30s\"\n\n[health]\ninterval = 5s\n";
        let err = deserialize(text, Path::new("/etc/pg.toml")).unwrap_err();
        let ConfigError::Parse {
            path, line, column, ..
        } = &err
        else {
            panic!("{err:?}");
        };
        assert_eq!(path, Path::new("/etc/pg.toml"));
        assert_eq!((*line, *column), (5, 12));
        let shown = err.to_string();
        assert_eq!(
            shown,
            "/etc/pg.toml:5:12: string values must be quoted, expected literal string, in \
             `interval = 5s`"
        );
        assert!(!shown.contains('\n'), "{shown}");
    }

    #[test]
    fn duplicate_key_is_a_parse_error() {
        let err =
            deserialize("[ssh]\nbanner = \"a\"\nbanner = \"b\"\n", Path::new("x")).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { line: 3, .. }), "{err}");
        assert!(err.to_string().ends_with(", in `banner = \"b\"`"), "{err}");
    }

    #[test]
    fn an_unquoted_address_is_shown_quoted() {
        let err = deserialize("[listen]\nssh = 127.0.0.1:2222\n", Path::new("x")).unwrap_err();
        assert!(
            err.to_string().ends_with(
                "in `ssh = 127.0.0.1:2222` (text values are quoted: \"127.0.0.1:2222\")"
            ),
            "{err}"
        );
    }

    #[test]
    fn durations_and_enums_from_toml() {
        let out = deserialize(
            "[health]\ninterval = \"1m 30s\"\n[ssh]\nidle_timeout = \"2h\"\npassword_auth = \"passthrough\"\n",
            Path::new("x"),
        )
        .unwrap();
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        assert_eq!(out.config.health.interval, Duration::from_secs(90));
        assert_eq!(out.config.ssh.idle_timeout, Some(Duration::from_secs(7200)));
    }

    #[test]
    fn every_wrong_value_is_reported_by_key() {
        let text = r#"
[listen]
ssh = "localhost:22"

[health]
interval = "5 parsecs"
timeout = 2
rise = -1

[pool]
provider = "x"

[[pool.backends]]
name = "a"
host = "10.0.0.4"

[[pool.backends]]
name = "b"
host = "10.0.0.5"
ssh_port = 70000
"#;
        let out = deserialize(text, Path::new("x")).unwrap();
        let errs: Vec<String> = out.errors.iter().map(ToString::to_string).collect();
        let keys: Vec<&str> = out.errors.iter().map(|e| e.key.as_str()).collect();
        for key in [
            "listen.ssh",
            "health.interval",
            "health.timeout",
            "health.rise",
            "pool.provider",
            "pool.backends[1].ssh_port",
        ] {
            assert!(keys.contains(&key), "{key} not in {errs:#?}");
        }
        assert_eq!(out.errors.len(), 6, "{errs:#?}");
        assert!(errs.contains(
            &"pool.provider: unknown provider \"x\" (expected one of: static, azure-vmss, exec, demo)"
                .to_owned()
        ));
        assert!(
            errs.contains(&"pool.backends[1].ssh_port: must be between 1 and 65535".to_owned()),
            "{errs:#?}"
        );
        assert!(out.dropped.contains(&"pool.provider".to_owned()));
        // Values next to the wrong ones survive.
        assert_eq!(out.config.pool.backends[1].host, "10.0.0.5");
        assert_eq!(out.config.pool.backends[1].ssh_port, 22);
    }

    #[test]
    fn unknown_keys_all_reported_with_hints() {
        let errs = errors(
            "[ssh]\npasword_auth = \"off\"\n[[pool.backends]]\nname = \"a\"\nhost = \"h\"\n[[pool.backends]]\nnmae = \"b\"\n[frobnicate]\nx = 1\n",
        );
        for expected in [
            "ssh.pasword_auth: unknown key (did you mean \"password_auth\"?)",
            "pool.backends[1].nmae: unknown key (did you mean \"name\"?)",
            "frobnicate: unknown key (not a poolgate setting: remove it; docs/configuration.md lists every key)",
        ] {
            assert!(
                errs.iter().any(|e| e == expected),
                "{expected} not in {errs:#?}"
            );
        }
        assert_eq!(errs.len(), 3, "{errs:#?}");
    }

    #[test]
    fn wrong_type_messages_are_readable() {
        let errs = errors("tls = 5\n[ssh]\nport_forwarding = \"yes\"\nhost_keys = \"k\"\n");
        assert!(
            errs.contains(&"tls: invalid type: integer `5`, expected a table".to_owned()),
            "{errs:#?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.starts_with("ssh.port_forwarding: ")
                    && e.ends_with("expected true or false")),
            "{errs:#?}"
        );
        assert!(
            errs.iter()
                .any(|e| e == "ssh.host_keys: invalid type: string \"k\", expected an array (e.g. [\"keys/ssh_host_ed25519_key\"])"),
            "{errs:#?}"
        );
    }

    #[test]
    fn bad_array_items_keep_their_index() {
        let errs = errors("[ssh]\nhost_keys = [\"a\", 5, 6]\n");
        let keys: Vec<&str> = errs.iter().map(|e| e.split(':').next().unwrap()).collect();
        assert_eq!(keys, ["ssh.host_keys[1]", "ssh.host_keys[2]"], "{errs:#?}");
        let errs = errors(
            "[pool]\nbackends = [1, { name = \"a\", host = \"h\", weight = -1, nmae = 2 }]\n",
        );
        assert_eq!(
            errs,
            [
                "pool.backends[0]: invalid type: integer `1`, expected a table",
                "pool.backends[1].weight: invalid value: integer `-1`, expected a whole number from 0 to 4294967295",
                "pool.backends[1].nmae: unknown key (did you mean \"name\"?)",
            ]
        );
    }

    #[test]
    fn render_quotes_odd_keys() {
        assert_eq!(
            render(&[Seg::Key("a".into()), Seg::Key("b.c".into()), Seg::Index(2)]),
            "a.\"b.c\"[2]"
        );
    }
}
