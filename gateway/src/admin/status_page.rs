//! `GET /status`: the pool at a glance, one self-refreshing HTML page with no external assets.

use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use super::api::{SessionView, VmView};
use crate::autoscale::AutoscaleView;
use crate::cluster::ClusterView;
use crate::html::escape;

const STYLE: &str = r#"
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d2330;background:#f6f7f9}
h1{font-size:20px;margin:0 0 4px} .sub{color:#667;margin-bottom:18px}
.totals{display:flex;gap:12px;margin-bottom:18px;flex-wrap:wrap}
.card{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:10px 14px;min-width:110px}
.card b{display:block;font-size:22px}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #dde1e7;border-radius:8px}
th,td{text-align:left;padding:8px 10px;border-bottom:1px solid #eef0f3;vertical-align:middle}
th{font-weight:600;color:#556;background:#fafbfc}
.state{padding:2px 8px;border-radius:10px;font-size:12px;font-weight:600;color:#fff}
.healthy{background:#2e9d5b}.starting{background:#d79b00}.unhealthy{background:#d64545}
.draining{background:#6f6fd6}.stopped{background:#8a919c}
.bar{position:relative;width:160px;height:14px;background:#eef0f3;border-radius:7px;overflow:hidden;display:inline-block;vertical-align:middle}
.bar span{position:absolute;top:0;height:100%}
.bar .ssh{background:#3a78d6}.bar .http{background:#e08a2e}
.tl{display:inline-block;vertical-align:middle;line-height:18px}.tl i{width:6px;height:14px;border-radius:1px;display:inline-block;margin-right:2px;vertical-align:middle}
.side{display:inline-block;width:76px;font-size:12px;color:#556}.side.down{color:#d64545;font-weight:600}
.ok{background:#2e9d5b}.bad{background:#d64545}
.legend span{display:inline-block;width:10px;height:10px;border-radius:2px;margin:0 4px 0 10px}
.muted{color:#889}
.by{font-size:12px;color:#667}
"#;

/// Renders the page.
pub fn render(
    vms: &[VmView],
    sessions: &[SessionView],
    autoscale: Option<AutoscaleView>,
    cluster: &ClusterView,
    now: SystemTime,
) -> String {
    // With several replicas, sessions and the autoscaler are the whole pool's; say who holds
    // what.
    let several = cluster.store != "memory" || cluster.replicas.len() > 1;
    let mut html = String::with_capacity(8 * 1024);
    let ssh: u32 = vms.iter().map(|v| v.sessions.ssh).sum();
    let http: u32 = vms.iter().map(|v| v.sessions.http).sum();
    let healthy = vms.iter().filter(|v| v.state == "healthy").count();
    let stamp = now
        .duration_since(UNIX_EPOCH)
        .map(|d| {
            humantime::format_rfc3339_seconds(
                UNIX_EPOCH + std::time::Duration::from_secs(d.as_secs()),
            )
            .to_string()
        })
        .unwrap_or_default();
    let _ = write!(
        html,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"5\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>poolgate — pool status</title><style>{STYLE}</style></head><body>\
         <h1>poolgate — pool status</h1><div class=\"sub\">{stamp} · refreshes every 5 s</div>\
         <div class=\"totals\">\
         <div class=\"card\"><b>{}</b>VMs</div>\
         <div class=\"card\"><b>{healthy}</b>healthy</div>\
         <div class=\"card\"><b>{ssh}</b>SSH sessions</div>\
         <div class=\"card\"><b>{http}</b>browser sessions</div>",
        vms.len()
    );
    match &autoscale {
        Some(a) if a.enabled => {
            let _ = write!(
                html,
                "<div class=\"card\"><b>{}</b>autoscaler aims for ({}–{})</div>\
                 <div class=\"card\"><b>{}</b>waiting for a VM</div>",
                a.desired_vms, a.min_vms, a.max_vms, a.waiting
            );
            if a.schedule_min_vms > 0 {
                let _ = write!(
                    html,
                    "<div class=\"card\"><b>{}</b>kept warm by the schedule</div>",
                    a.schedule_min_vms
                );
            }
        }
        _ => html.push_str("<div class=\"card\"><b>off</b>autoscaler</div>"),
    }
    if several {
        let _ = write!(
            html,
            "<div class=\"card\"><b>{}</b>replicas{}</div>",
            cluster.replicas.len(),
            if cluster.store_up {
                ""
            } else {
                " <span class=\"state unhealthy\">store down</span>"
            }
        );
    }
    html.push_str("</div>");
    if let Some(why) = autoscale.as_ref().and_then(|a| a.provider_error.as_ref()) {
        let _ = write!(
            html,
            "<p><span class=\"state unhealthy\">autoscaler waiting</span> {}</p>",
            escape(why)
        );
    }
    if let Some(decision) = autoscale.as_ref().and_then(|a| a.last_decision.as_ref()) {
        let _ = write!(
            html,
            "<p class=\"muted\">Last autoscaler decision: {}</p>",
            escape(decision)
        );
    }

    html.push_str(
        "<table><tr><th>VM</th><th>state</th><th>load</th><th>sessions</th><th>health by side</th><th>address</th></tr>",
    );
    if vms.is_empty() {
        html.push_str("<tr><td colspan=\"6\" class=\"muted\">The pool has no VMs.</td></tr>");
    }
    for vm in vms {
        let cap = f64::from(vm.max_sessions.max(1));
        let ssh_w = (f64::from(vm.sessions.ssh) / cap * 100.0).min(100.0);
        let http_w = (f64::from(vm.sessions.http) / cap * 100.0).min(100.0 - ssh_w);
        let _ = write!(
            html,
            "<tr><td><b>{name}</b></td><td><span class=\"state {state}\">{state}</span>{kept}</td>\
             <td><span class=\"bar\" title=\"{total} of {max}\"><span class=\"ssh\" style=\"left:0;width:{ssh_w:.1}%\"></span>\
             <span class=\"http\" style=\"left:{ssh_w:.1}%;width:{http_w:.1}%\"></span></span> {total}/{max}</td>\
             <td>{ssh} ssh · {http} http{by}</td><td><span class=\"tl\">",
            name = escape(&vm.name),
            state = escape(&vm.state),
            kept = if vm.leaving {
                " <span class=\"muted\" title=\"removed from the pool's VM set; it goes once the sessions open there end\">leaving</span>"
            } else if vm.busy == Some(true) {
                " <span class=\"muted\" title=\"the busy check found work running outside the gateway; not scaled in\">kept: work running</span>"
            } else {
                ""
            },
            total = vm.sessions.total,
            max = vm.max_sessions,
            ssh = vm.sessions.ssh,
            http = vm.sessions.http,
            by = if several {
                by_replica(&vm.sessions_by_replica)
            } else {
                String::new()
            },
        );
        let sides = [("ssh", &vm.protocols.ssh), ("web", &vm.protocols.http)];
        for (i, (label, side)) in sides.into_iter().filter(|(_, s)| s.probed).enumerate() {
            if i > 0 {
                html.push_str("<br>");
            }
            let _ = write!(
                html,
                "<span class=\"side {health}\" title=\"{label} side: {health}\">{label} {health}</span> ",
                health = escape(&side.health),
            );
            for probe in side.history.iter().rev().take(16).rev() {
                let _ = write!(
                    html,
                    "<i class=\"{}\" title=\"{:.0} s ago\"></i>",
                    if probe.ok { "ok" } else { "bad" },
                    probe.age_seconds
                );
            }
        }
        let _ = write!(
            html,
            "</span></td><td class=\"muted\">{}:{} / :{}</td></tr>",
            escape(&vm.host),
            vm.ssh_port,
            vm.http_port
        );
    }
    html.push_str("</table>");
    html.push_str(
        "<p class=\"legend muted\">load:<span class=\"ssh\" style=\"background:#3a78d6\"></span>SSH\
         <span style=\"background:#e08a2e\"></span>browser · health:<span class=\"ok\"></span>probe passed\
         <span class=\"bad\"></span>probe failed</p>",
    );

    if several {
        replicas_table(&mut html, cluster);
    }
    let _ = write!(
        html,
        "<h2 style=\"font-size:16px\">Sessions {}({})</h2>",
        if several {
            format!("on replica {} ", escape(&cluster.replica_id))
        } else {
            String::new()
        },
        sessions.len()
    );
    if !sessions.is_empty() {
        html.push_str("<table><tr><th>id</th><th>user</th><th>VM</th><th>protocol</th><th>bytes up / down</th></tr>");
        for s in sessions.iter().take(200) {
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} / {}</td></tr>",
                s.id,
                escape(s.user.as_deref().unwrap_or("-")),
                escape(&s.vm),
                escape(&s.protocol),
                s.bytes_up,
                s.bytes_down
            );
        }
        html.push_str("</table>");
    }
    html.push_str("<p class=\"muted\">JSON: <a href=\"/api/v1/vms\">/api/v1/vms</a> · <a href=\"/api/v1/sessions\">/api/v1/sessions</a> · <a href=\"/api/v1/replicas\">/api/v1/replicas</a> · <a href=\"/metrics\">/metrics</a></p></body></html>");
    html
}

/// "gw-0: 2 · gw-1: 1" under a VM's sessions (replicas holding none are left out).
fn by_replica(by: &std::collections::BTreeMap<String, crate::cluster::SessionTotals>) -> String {
    let parts: Vec<String> = by
        .iter()
        .filter(|(_, t)| t.ssh + t.http > 0)
        .map(|(id, t)| format!("{}: {}", escape(id), t.ssh + t.http))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("<br><span class=\"by\">{}</span>", parts.join(" · "))
    }
}

/// The live replicas: who leads, what each holds.
fn replicas_table(html: &mut String, cluster: &ClusterView) {
    let _ = write!(
        html,
        "<h2 style=\"font-size:16px\">Replicas ({}, store {}{})</h2>\
         <table><tr><th>replica</th><th>autoscaler</th><th>sessions</th><th>waiting</th><th>version</th></tr>",
        cluster.replicas.len(),
        escape(&cluster.store),
        if cluster.store_up {
            ""
        } else {
            ", unreachable"
        },
    );
    for r in &cluster.replicas {
        let _ = write!(
            html,
            "<tr><td><b>{id}</b>{this}</td><td>{leader}</td><td>{ssh} ssh · {http} http</td><td>{waiting}</td><td class=\"muted\">{version}</td></tr>",
            id = escape(&r.id),
            this = if r.this {
                " <span class=\"muted\">(this one)</span>"
            } else {
                ""
            },
            leader = if r.leader { "leads" } else { "" },
            ssh = r.sessions.ssh,
            http = r.sessions.http,
            waiting = r.waiting,
            version = escape(&r.version),
        );
    }
    html.push_str("</table>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_without_external_assets() {
        let cluster = ClusterView {
            store: "memory".into(),
            store_up: true,
            synced_seconds_ago: None,
            replica_id: "gw".into(),
            leader: None,
            epoch: None,
            replicas: Vec::new(),
            sessions_by_replica: Default::default(),
        };
        let page = render(&[], &[], None, &cluster, SystemTime::now());
        assert!(page.contains("The pool has no VMs"));
        assert!(!page.contains("http://") && !page.contains("https://"));
    }
}
