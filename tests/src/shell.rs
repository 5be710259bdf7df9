//! Quoting for `sh` (and for rsync's `-e` parser, which follows the same rules).

use std::process::Command;

/// Single-quotes `s` for `sh` unless it needs no quotes.
pub fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The command line of `cmd` as one `sh` string (program and arguments quoted).
pub fn shell_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| sh_quote(&a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_only_what_needs_it() {
        assert_eq!(sh_quote("-oBatchMode=yes"), "-oBatchMode=yes");
        assert_eq!(sh_quote("a b'c"), r"'a b'\''c'");
        assert_eq!(sh_quote(""), "''");
        let mut cmd = Command::new("echo");
        cmd.args(["a b", "c"]);
        assert_eq!(shell_line(&cmd), "echo 'a b' c");
    }
}
