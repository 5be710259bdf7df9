//! Reading the gateway's log: its lines carry structured fields (`vm=vm-a`). The gateway colours
//! them only on a terminal, which the tests never give it; the log helpers still strip ANSI
//! colour codes, so that a log from a terminal reads the same.

/// `text` without ANSI escape sequences (`ESC [ … letter`).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Whether a log line has the structured field `name=value` (exactly that value).
pub fn has_field(line: &str, name: &str, value: &str) -> bool {
    let field = format!("{name}={value}");
    line.split_whitespace().any(|word| word == field)
}

/// Whether one of the spans a log line names (`name{field=value ...}:`, as the text format
/// writes the spans an event happened in) has the field `name=value` (exactly that value).
pub fn has_span_field(line: &str, name: &str, value: &str) -> bool {
    let field = format!("{name}={value}");
    line.split('{')
        .skip(1)
        .filter_map(|rest| rest.split_once('}'))
        .any(|(fields, _)| fields.split_whitespace().any(|word| word == field))
}

/// Lines of `log` that contain every one of `needles`.
pub fn log_lines<'a>(log: &'a str, needles: &[&str]) -> Vec<&'a str> {
    log.lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .collect()
}

/// Waits until the file at `path` contains `needle` (a log written by another process);
/// panics after `timeout` naming `what` and showing the file.
pub(crate) fn wait_for_text(
    path: &std::path::Path,
    what: &str,
    needle: &str,
    timeout: std::time::Duration,
) {
    let read = || std::fs::read_to_string(path).unwrap_or_default();
    let deadline = std::time::Instant::now() + timeout;
    let mut backoff = crate::process::Backoff::new();
    while !read().contains(needle) {
        if std::time::Instant::now() >= deadline {
            panic!("{needle:?} not in {what} after {timeout:?}:\n{}", read());
        }
        backoff.sleep_until(deadline);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_match_whole_words_after_colours_are_gone() {
        let line = strip_ansi("\u{1b}[32mINFO\u{1b}[0m VM is up vm=vm-a protocol=ssh");
        assert_eq!(line, "INFO VM is up vm=vm-a protocol=ssh");
        assert!(has_field(&line, "vm", "vm-a"));
        assert!(!has_field(&line, "vm", "vm"));
        assert_eq!(log_lines(&line, &["VM is up", "vm=vm-a"]), [line.as_str()]);
    }

    #[test]
    fn span_fields_are_found_inside_their_braces_only() {
        let line = "WARN ssh{client=127.0.0.1:5 user=pgtest4}:relay{ch=1}: gateway: failed \
                    user=pgtest9 vm=vm-a";
        assert!(has_span_field(line, "user", "pgtest4"));
        assert!(has_span_field(line, "client", "127.0.0.1:5"));
        assert!(has_span_field(line, "ch", "1"));
        assert!(!has_span_field(line, "user", "pgtest"));
        assert!(
            !has_span_field(line, "user", "pgtest9"),
            "an event field, not a span's"
        );
        assert!(!has_span_field(line, "vm", "vm-a"));
        assert!(has_field(line, "vm", "vm-a"));
    }
}
