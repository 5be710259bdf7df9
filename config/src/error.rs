//! Errors returned while loading a configuration.

use std::fmt;
use std::path::PathBuf;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (missing, unreadable, not UTF-8).
    #[error("cannot read config file {}: {source}", path.display())]
    Io {
        /// The file that was being read.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a value could not be located to report it by key.
    #[error("{}:{line}:{column}: {message}", path.display())]
    Parse {
        /// The file being parsed (`<config>` when parsing text without a file).
        path: PathBuf,
        /// 1-based line of the problem.
        line: usize,
        /// 1-based column (in characters) of the problem.
        column: usize,
        /// What is wrong, on one line.
        message: String,
    },
    /// The file parsed, but one or more settings are wrong. Holds every problem found.
    #[error("{}", InvalidDisplay(.0))]
    Invalid(Vec<ValidationError>),
}

impl ConfigError {
    /// The individual problems when the configuration is invalid; empty for other errors.
    pub fn validation_errors(&self) -> &[ValidationError] {
        match self {
            ConfigError::Invalid(errors) => errors,
            _ => &[],
        }
    }
}

struct InvalidDisplay<'a>(&'a [ValidationError]);

impl fmt::Display for InvalidDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(
            f,
            "invalid configuration ({n} {}):",
            if n == 1 { "problem" } else { "problems" }
        )?;
        for error in self.0 {
            write!(f, "\n  {error}")?;
        }
        Ok(())
    }
}

/// One problem with one setting, named by its key path (`pool.backends[1].ssh_port`).
///
/// `message` says what is wrong and, in parentheses, what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ValidationError {
    /// Dotted key path; array items as `[i]`, e.g. `pool.backends[1].ssh_port`.
    pub key: String,
    /// What is wrong (what to do).
    pub message: String,
}

impl ValidationError {
    /// Builds an error for `key`.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

impl std::error::Error for ValidationError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_formats() {
        let e = ValidationError::new("pool.backends[1].ssh_port", "must be between 1 and 65535");
        assert_eq!(
            e.to_string(),
            "pool.backends[1].ssh_port: must be between 1 and 65535"
        );
        let parse = ConfigError::Parse {
            path: PathBuf::from("/etc/poolgate.toml"),
            line: 3,
            column: 7,
            message: "invalid string".into(),
        };
        assert_eq!(parse.to_string(), "/etc/poolgate.toml:3:7: invalid string");
        let invalid = ConfigError::Invalid(vec![e.clone(), ValidationError::new("a.b", "bad")]);
        assert_eq!(
            invalid.to_string(),
            "invalid configuration (2 problems):\n  pool.backends[1].ssh_port: must be between 1 and 65535\n  a.b: bad"
        );
        assert_eq!(invalid.validation_errors().len(), 2);
    }
}
