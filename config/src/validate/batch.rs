//! `[batch]` rules.

use super::Report;
use crate::model::Config;

pub(crate) fn batch(c: &Config, r: &mut Report) {
    let Some(b) = &c.batch else {
        return;
    };
    if !valid_name(&b.partition) {
        r.err(
            "batch.partition",
            format!(
                "\"{}\" is not a Slurm partition name (letters, digits, '-', '_', '.')",
                b.partition
            ),
        );
    }
    if !b.node_name.contains("{vm}") {
        r.err(
            "batch.node_name",
            format!(
                "\"{}\" must contain {{vm}} (the VM's name), e.g. \"{{vm}}\" or \"{{vm}}-batch\"",
                b.node_name
            ),
        );
    } else if !valid_name(&b.node_name.replace("{vm}", "vm")) {
        r.err(
            "batch.node_name",
            format!(
                "\"{}\" would not give Slurm node names (letters, digits, '-', '_', '.')",
                b.node_name
            ),
        );
    }
    for (key, argv) in [
        ("batch.squeue", &b.squeue),
        ("batch.sinfo", &b.sinfo),
        ("batch.scontrol", &b.scontrol),
    ] {
        if argv.first().is_none_or(|p| p.trim().is_empty()) {
            r.err(
                key,
                "must name the program to run (e.g. [\"squeue\"], or a wrapper such as [\"ssh\", \"slurm-head\", \"squeue\"])",
            );
        } else if argv.iter().any(|a| a.contains('\0')) {
            r.err(
                key,
                "contains a NUL character, which cannot be passed to a command",
            );
        }
    }
    r.positive("batch.timeout", b.timeout);
}

/// A Slurm name: non-empty, ASCII letters, digits, `-`, `_`, `.`.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}
