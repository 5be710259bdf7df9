//! `exec`: VMs listed and managed by operator commands, for on-premises pools.
//!
//! Contract (documented in README "Autoscaling"):
//! * `list` prints JSON on stdout: `{"vms": [{"name": "vm-1", "host": "10.0.0.4",
//!   "state": "running"}]}` (or just the array). `state` is one of `running`, `starting`,
//!   `stopping`, `stopped`. Optional per VM: `ssh_port`, `http_port`, `weight`, `max_sessions`
//!   (defaults from `[pool.exec]`).
//! * `start`, `stop`, `delete` get the VM names as extra arguments; `create` gets the count.
//! * Exit status 0 means done; anything else is an error whose stderr is logged. A command
//!   running longer than `timeout` is killed. Commands run without a shell.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use router_core::{Lifecycle, VmSpec};
use serde::Deserialize;

use super::{Capabilities, Provider, ProviderError, ProviderVm};

/// Settings of the exec provider (from `[pool.exec]`).
#[derive(Debug, Clone)]
pub struct ExecSettings {
    /// `list` argv.
    pub list: Vec<String>,
    /// `start` argv.
    pub start: Option<Vec<String>>,
    /// `stop` argv.
    pub stop: Option<Vec<String>>,
    /// `create` argv.
    pub create: Option<Vec<String>>,
    /// `delete` argv.
    pub delete: Option<Vec<String>>,
    /// Per-command deadline.
    pub timeout: Duration,
    /// Defaults for VMs that don't say.
    pub defaults: VmSpec,
}

/// The exec provider.
#[derive(Debug, Clone)]
pub struct ExecProvider {
    settings: ExecSettings,
    /// Fields of the `list` output poolgate does not read, already warned about (once each).
    ignored: Arc<Mutex<BTreeSet<String>>>,
}

/// The fields of one VM in the `list` output that poolgate reads.
const LISTED_FIELDS: [&str; 7] = [
    "name",
    "host",
    "state",
    "ssh_port",
    "http_port",
    "weight",
    "max_sessions",
];

/// One VM of the `list` output. Other fields (a zone, a size, the script's own notes) are
/// ignored, with a warning once per field name: scripts grow, and one more field must not
/// stop the whole listing.
#[derive(Debug, Deserialize)]
struct ListedVm {
    name: String,
    host: String,
    state: String,
    ssh_port: Option<u16>,
    http_port: Option<u16>,
    weight: Option<u32>,
    max_sessions: Option<u32>,
}

impl ExecProvider {
    /// A provider running the configured commands.
    pub fn new(settings: ExecSettings) -> Self {
        Self {
            settings,
            ignored: Arc::default(),
        }
    }

    /// The VMs of the `list` output, `{"vms": [...]}` or the bare array, each checked on its
    /// own so that an error names the VM (by position) and the field.
    fn listed_vms(&self, text: &str) -> Result<Vec<ListedVm>, ProviderError> {
        let expected = "expected {\"vms\": [{\"name\", \"host\", \"state\"}]}";
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Self::error("list", format!("output is not JSON ({e}); {expected}")))?;
        let entries = match value {
            serde_json::Value::Array(entries) => entries,
            serde_json::Value::Object(mut object) => match object.remove("vms") {
                Some(serde_json::Value::Array(entries)) => entries,
                _ => {
                    return Err(Self::error(
                        "list",
                        format!("output has no \"vms\" array; {expected}"),
                    ));
                }
            },
            _ => {
                return Err(Self::error(
                    "list",
                    format!("output is neither an object nor an array; {expected}"),
                ));
            }
        };
        entries
            .into_iter()
            .enumerate()
            .map(|(i, entry)| {
                if let Some(object) = entry.as_object() {
                    self.warn_ignored(object.keys());
                }
                serde_json::from_value(entry).map_err(|e| {
                    Self::error(
                        "list",
                        format!("VM {} of the output: {e}; {expected}", i + 1),
                    )
                })
            })
            .collect()
    }

    /// Warns once per field name of the `list` output that poolgate does not read.
    fn warn_ignored<'a>(&self, keys: impl Iterator<Item = &'a String>) {
        for key in keys.filter(|k| !LISTED_FIELDS.contains(&k.as_str())) {
            let first = self
                .ignored
                .lock()
                .map(|mut seen| seen.insert(key.clone()))
                .unwrap_or(false);
            if first {
                tracing::warn!(field = %key, read = ?LISTED_FIELDS, "pool.exec list output has a field poolgate does not read; ignored (a misspelt field is ignored too)");
            }
        }
    }

    fn error(operation: &str, message: impl Into<String>) -> ProviderError {
        ProviderError {
            provider: "exec",
            operation: operation.to_string(),
            message: message.into(),
            no_capacity: false,
        }
    }

    async fn run(
        &self,
        operation: &str,
        argv: &[String],
        extra: &[String],
    ) -> Result<String, ProviderError> {
        if argv.is_empty() {
            return Err(Self::error(
                operation,
                format!("pool.exec.{operation} is not set"),
            ));
        }
        crate::autoscale::command::run(argv, extra, self.settings.timeout, "pool.exec.timeout")
            .await
            .map_err(|e| Self::error(operation, e))
    }

    /// Parses the `list` command's output.
    pub fn parse_list(&self, text: &str) -> Result<Vec<ProviderVm>, ProviderError> {
        let listed = self.listed_vms(text)?;
        let d = &self.settings.defaults;
        listed
            .into_iter()
            .map(|vm| {
                let lifecycle = match vm.state.as_str() {
                    "running" => Lifecycle::Running,
                    "starting" => Lifecycle::Starting,
                    "stopping" => Lifecycle::Stopping,
                    "stopped" | "deallocated" => Lifecycle::Stopped,
                    other => {
                        return Err(Self::error(
                            "list",
                            format!("VM {:?} has unknown state {other:?} (running, starting, stopping, stopped)", vm.name),
                        ));
                    }
                };
                if vm.name.is_empty() || vm.host.is_empty() {
                    return Err(Self::error("list", "every VM needs a name and a host"));
                }
                Ok(ProviderVm {
                    spec: VmSpec {
                        name: vm.name,
                        host: vm.host,
                        ssh_port: vm.ssh_port.unwrap_or(d.ssh_port),
                        http_port: vm.http_port.unwrap_or(d.http_port),
                        weight: vm.weight.unwrap_or(d.weight),
                        max_sessions: vm.max_sessions.unwrap_or(d.max_sessions),
                    },
                    lifecycle,
                })
            })
            .collect()
    }
}

impl Provider for ExecProvider {
    fn name(&self) -> &'static str {
        "exec"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            start_stop: self.settings.start.is_some() && self.settings.stop.is_some(),
            create_delete: self.settings.create.is_some() && self.settings.delete.is_some(),
        }
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<ProviderVm>, ProviderError>> {
        Box::pin(async move {
            let text = self.run("list", &self.settings.list, &[]).await?;
            self.parse_list(&text)
        })
    }

    fn start<'a>(&'a self, vms: &'a [String]) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            let argv = self.settings.start.clone().unwrap_or_default();
            self.run("start", &argv, vms).await.map(drop)
        })
    }

    fn stop<'a>(&'a self, vms: &'a [String]) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            let argv = self.settings.stop.clone().unwrap_or_default();
            self.run("stop", &argv, vms).await.map(drop)
        })
    }

    fn create(&self, count: u32) -> BoxFuture<'_, Result<(), ProviderError>> {
        Box::pin(async move {
            let argv = self.settings.create.clone().unwrap_or_default();
            self.run("create", &argv, &[count.to_string()])
                .await
                .map(drop)
        })
    }

    fn delete<'a>(&'a self, vms: &'a [String]) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            let argv = self.settings.delete.clone().unwrap_or_default();
            self.run("delete", &argv, vms).await.map(drop)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(list: &[&str]) -> ExecProvider {
        ExecProvider::new(ExecSettings {
            list: list.iter().map(|s| s.to_string()).collect(),
            start: Some(vec!["true".into()]),
            stop: Some(vec!["false".into()]),
            create: None,
            delete: None,
            timeout: Duration::from_millis(500),
            defaults: VmSpec::new("default", "0.0.0.0"),
        })
    }

    #[tokio::test]
    async fn lists_parses_and_reports_errors() {
        let p = provider(&[
            "sh",
            "-c",
            r#"echo '{"vms":[{"name":"a","host":"127.0.0.1","state":"running","ssh_port":2201},{"name":"b","host":"127.0.0.1","state":"stopped"}]}'"#,
        ]);
        let vms = p.list().await.unwrap();
        assert_eq!(vms.len(), 2);
        assert_eq!(vms[0].spec.ssh_port, 2201);
        assert_eq!(vms[1].lifecycle, Lifecycle::Stopped);
        assert!(p.capabilities().start_stop && !p.capabilities().create_delete);
        p.start(&["b".into()]).await.unwrap();
        let err = p.stop(&["a".into()]).await.unwrap_err();
        assert!(err.to_string().contains("exited with"), "{err}");

        let bad = provider(&["sh", "-c", "echo not-json"]);
        assert!(
            bad.list()
                .await
                .unwrap_err()
                .message
                .contains("output is not JSON")
        );
        // A field poolgate does not read is ignored (the VM is listed); a missing one is named,
        // with the VM's place in the output.
        let extra = provider(&[
            "sh",
            "-c",
            r#"echo '{"vms":[{"name":"a","host":"h","state":"running","zone":"1"}]}'"#,
        ]);
        assert_eq!(extra.list().await.unwrap().len(), 1);
        let missing = provider(&[
            "sh",
            "-c",
            r#"echo '{"vms":[{"name":"a","host":"h","state":"running"},{"name":"b","state":"running"}]}'"#,
        ]);
        let err = missing.list().await.unwrap_err().message;
        assert!(
            err.contains("VM 2 of the output") && err.contains("missing field `host`"),
            "{err}"
        );
        let bad_state = provider(&[
            "sh",
            "-c",
            r#"echo '[{"name":"a","host":"h","state":"exploded"}]'"#,
        ]);
        assert!(
            bad_state
                .list()
                .await
                .unwrap_err()
                .message
                .contains("unknown state")
        );
        let slow = provider(&["sleep", "5"]);
        assert!(
            slow.list()
                .await
                .unwrap_err()
                .message
                .contains("did not finish")
        );
        let missing = provider(&["/nonexistent/program"]);
        assert!(
            missing
                .list()
                .await
                .unwrap_err()
                .message
                .contains("cannot run")
        );
    }
}
