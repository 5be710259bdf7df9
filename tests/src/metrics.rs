//! Reading the gateway's `/metrics` (Prometheus text format) and checking it with `promtool`.

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::time::Duration;

use crate::gateway::workspace_dir;
use crate::output::stderr;
use crate::process::run_with_input;
use crate::tools::tool;

/// Every sample line of a scrape: `name{labels}` exactly as exposed → value.
pub fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let value = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().ok()?,
            };
            Some((series.to_string(), value))
        })
        .collect()
}

/// `# TYPE name kind` lines: metric family → kind.
pub fn metric_types(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.to_string(), f.next()?.to_string()))
        })
        .collect()
}

/// The value of series `series` (exactly as exposed, labels in the exposed order), if present.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    samples(text).get(series).copied()
}

/// `poolgate_sessions_active{protocol="ssh",vm="<vm>"}`.
pub fn ssh_active(metrics: &str, vm: &str) -> Option<f64> {
    sample(
        metrics,
        &format!("poolgate_sessions_active{{protocol=\"ssh\",vm=\"{vm}\"}}"),
    )
}

/// `poolgate_vm_up{vm="<vm>"}`.
pub fn vm_up(metrics: &str, vm: &str) -> Option<f64> {
    sample(metrics, &format!("poolgate_vm_up{{vm=\"{vm}\"}}"))
}

/// `poolgate_vm_protocol_up{protocol="<protocol>",vm="<vm>"}`: 1 while that side of the VM
/// takes new sessions.
pub fn vm_protocol_up(metrics: &str, vm: &str, protocol: &str) -> Option<f64> {
    sample(
        metrics,
        &format!("poolgate_vm_protocol_up{{protocol=\"{protocol}\",vm=\"{vm}\"}}"),
    )
}

/// Runs `promtool check metrics` on `text` and asserts it passes (exit 0, no lint problem);
/// the text is kept in `tests/artifacts/<artifact>`.
pub fn promtool_check(text: &str, artifact: &str) {
    let out = run_with_input(
        Command::new(tool("promtool")).args(["check", "metrics"]),
        text.as_bytes(),
        Duration::from_secs(30),
    );
    let artifacts = workspace_dir().join("tests").join("artifacts");
    let _ = std::fs::create_dir_all(&artifacts);
    let _ = std::fs::write(artifacts.join(artifact), text);
    assert!(
        out.status.success(),
        "promtool check metrics failed ({}):\n{}{}\n--- metrics ---\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_series_and_types() {
        let text = "# HELP poolgate_vm_up Up.\n# TYPE poolgate_vm_up gauge\n\
                    poolgate_vm_up{vm=\"vm-a\"} 1\npoolgate_x_bucket{le=\"+Inf\"} +Inf\n";
        assert_eq!(vm_up(text, "vm-a"), Some(1.0));
        assert_eq!(vm_up(text, "vm-b"), None);
        assert_eq!(
            sample(text, "poolgate_x_bucket{le=\"+Inf\"}"),
            Some(f64::INFINITY)
        );
        assert_eq!(
            metric_types(text).get("poolgate_vm_up").map(String::as_str),
            Some("gauge")
        );
    }
}
