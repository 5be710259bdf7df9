//! A short human summary for `poolgate check-config`.

use std::fmt::Write as _;

use crate::enums::Provider;
use crate::model::Config;
use crate::serde_util::format_duration;

/// Backends listed by name before the summary says "and N more".
const LISTED_VMS: usize = 8;

impl Config {
    /// A few lines saying what this configuration does: listeners, provider and its VMs or
    /// scale set, and whether the autoscaler runs.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let l = &self.listen;
        let or_off = |addr: Option<std::net::SocketAddr>| {
            addr.map_or_else(|| "off".to_owned(), |a| a.to_string())
        };
        let _ = write!(
            out,
            "listen: ssh {}, http {}",
            or_off(l.ssh),
            or_off(l.http)
        );
        if let Some(https) = l.https {
            let _ = write!(out, ", https {https}");
        }
        let _ = write!(out, ", admin {}", l.admin);
        if l.proxy_protocol {
            let _ = write!(out, " (PROXY protocol header required on ssh and http)");
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "pool: {}", self.pool_summary());
        let redis = self
            .cluster
            .as_ref()
            .is_some_and(|c| c.store == crate::enums::StoreKind::Redis);
        match (redis, self.gateway.state_file.path()) {
            (true, _) => {
                let _ = writeln!(out, "drains and users' VMs: in Redis ([cluster])");
            }
            (false, Some(path)) => {
                let _ = writeln!(
                    out,
                    "drains and users' VMs: kept across restarts in {}",
                    path.display()
                );
            }
            (false, None) => {
                let _ = writeln!(
                    out,
                    "drains and users' VMs: forgotten at a restart (gateway.state_file = \"off\")"
                );
            }
        }
        let a = &self.autoscale;
        if a.enabled {
            let _ = write!(
                out,
                "autoscale: on ({}-{} VMs, {} sessions per VM, {} spare, scale in after {}",
                a.min_vms,
                a.max_vms,
                a.sessions_per_vm,
                a.spare_vms,
                format_duration(a.scale_in_after)
            );
            if a.min_vms == 0 {
                let _ = write!(
                    out,
                    ", to zero after {}",
                    format_duration(a.scale_to_zero_after)
                );
            }
            let _ = writeln!(out, ")");
            if !a.schedule.is_empty() {
                let _ = writeln!(
                    out,
                    "schedule: {} window(s) keeping VMs warm",
                    a.schedule.len()
                );
            }
        } else {
            let _ = writeln!(out, "autoscale: off");
        }
        if let Some(b) = &self.batch {
            let _ = writeln!(
                out,
                "batch: {} partition {}, nodes {}{}{}{}",
                b.engine,
                b.partition,
                b.node_name,
                b.rest_url
                    .as_deref()
                    .map(|u| format!(", queue read from slurmrestd {u} ({})", b.rest_version))
                    .unwrap_or_default(),
                if b.verbs { ", `pool` verbs on" } else { "" },
                if a.enabled {
                    ""
                } else {
                    " (autoscale off: the queue is not read)"
                }
            );
        }
        out
    }

    /// Settings that are valid but probably not what the operator meant: one line each, starting
    /// with the key. `check-config` prints them and `run` logs them; neither refuses the file.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.health.http && !self.listen.serves_http() {
            out.push(
                "health.http: the web side's probe is on, but no HTTP or HTTPS listener is \
                 configured (listen.http = \"off\", no listen.https), so the gateway serves SSH \
                 only and never runs it (set health.http = false to say so)"
                    .to_owned(),
            );
        }
        out
    }

    fn pool_summary(&self) -> String {
        let p = &self.pool;
        match p.provider {
            Provider::Static => {
                let n = p.backends.len();
                let mut s = format!("static, {n} VM{}", if n == 1 { "" } else { "s" });
                let listed: Vec<String> = p
                    .backends
                    .iter()
                    .take(LISTED_VMS)
                    .map(|b| format!("{} ({})", b.name, b.host))
                    .collect();
                if !listed.is_empty() {
                    let _ = write!(s, ": {}", listed.join(", "));
                }
                if n > LISTED_VMS {
                    let _ = write!(s, " and {} more", n - LISTED_VMS);
                }
                s
            }
            Provider::AzureVmss => match &p.azure {
                Some(az) => format!(
                    "azure-vmss, scale set {} in resource group {} (subscription {}, credential {}, ARM {})",
                    az.scale_set,
                    az.resource_group,
                    az.subscription_id,
                    az.credential,
                    az.resource_manager()
                ),
                None => "azure-vmss (no [pool.azure] section)".to_owned(),
            },
            Provider::Exec => match &p.exec {
                Some(ex) => format!("exec, VMs listed by: {}", ex.list.join(" ")),
                None => "exec (no [pool.exec] section)".to_owned(),
            },
            Provider::Demo => "demo (in-process demo VMs)".to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::model::{Backend, Config};

    #[test]
    fn summary_names_listeners_pool_and_autoscale() {
        let mut c = Config::default();
        c.pool.backends = (1..=10)
            .map(|i| Backend {
                name: format!("dsvm-{i}"),
                host: format!("10.0.0.{i}"),
                ..Backend::default()
            })
            .collect();
        let s = c.summary();
        assert!(
            s.contains("listen: ssh 0.0.0.0:2222, http 0.0.0.0:8080, admin 127.0.0.1:9090"),
            "{s}"
        );
        assert!(
            s.contains("pool: static, 10 VMs: dsvm-1 (10.0.0.1), "),
            "{s}"
        );
        assert!(s.contains(" and 2 more"), "{s}");
        assert!(s.contains("autoscale: off"), "{s}");
        c.autoscale.enabled = true;
        assert!(c.summary().contains("autoscale: on (0-10 VMs, 4 sessions per VM, 1 spare, scale in after 15m, to zero after 30m)"));
        assert_eq!(c.summary().lines().count(), 4);
    }

    #[test]
    fn http_off_is_parsed_summarised_and_warned_about() {
        let text =
            "[listen]\nhttp = \"off\"\n[[pool.backends]]\nname = \"a\"\nhost = \"127.0.0.1\"\n";
        let c = crate::parse(text, std::path::Path::new("/etc/poolgate")).expect("valid");
        assert_eq!(c.listen.http, None);
        assert!(!c.listen.serves_http());
        assert!(c.summary().contains("http off"), "{}", c.summary());
        let warnings = c.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].starts_with("health.http: "), "{warnings:?}");
        let mut quiet = c.clone();
        quiet.health.http = false;
        assert!(quiet.warnings().is_empty());
        // The defaults serve HTTP: nothing to warn about.
        assert!(Config::default().warnings().is_empty());
        // A bad value names "off" as the alternative.
        let err = crate::parse("[listen]\nhttp = \"nope\"\n", std::path::Path::new("/"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("\"off\""), "{err}");
    }

    #[test]
    fn ssh_off_is_parsed_and_summarised() {
        let text =
            "[listen]\nssh = \"off\"\n[[pool.backends]]\nname = \"a\"\nhost = \"127.0.0.1\"\n";
        let c = crate::parse(text, std::path::Path::new("/etc/poolgate")).expect("valid");
        assert_eq!(c.listen.ssh, None);
        assert!(!c.listen.serves_ssh());
        assert!(!c.logs_in_to_vms());
        assert!(
            c.summary()
                .starts_with("listen: ssh off, http 0.0.0.0:8080"),
            "{}",
            c.summary()
        );
        assert!(c.warnings().is_empty(), "{:?}", c.warnings());
        let err = crate::parse("[listen]\nssh = \"nope\"\n", std::path::Path::new("/"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("\"off\""), "{err}");
    }
}
