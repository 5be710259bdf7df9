//! The admin API as plain functions of (method, path, credentials) → reply, so it is tested
//! without sockets; `server` puts it on the admin listener.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use router_core::{Pool, Protocol};
use serde::Serialize;

use crate::autoscale::AutoscaleStatus;
use crate::cluster::ClusterStatus;
use crate::health::HealthChecker;
use crate::metrics::Metrics;

use super::status_page;

/// Everything the admin endpoints read.
pub struct AdminState {
    /// The pool.
    pub pool: Arc<Pool>,
    /// Health history.
    pub health: Arc<HealthChecker>,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// Bearer token required on `/api/v1` when set.
    pub token: Option<String>,
    /// Autoscaler, when there is one.
    pub autoscale: Option<Arc<dyn AutoscaleStatus>>,
    /// The replicas (a cluster of one without `[cluster]`).
    pub cluster: Arc<dyn ClusterStatus>,
}

/// An HTTP reply, transport-agnostic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// Body.
    pub body: String,
}

impl Reply {
    fn json(status: u16, value: &impl Serialize) -> Self {
        Self {
            status,
            content_type: "application/json",
            body: serde_json::to_string_pretty(value).unwrap_or_else(|_| "{}".into()),
        }
    }

    fn error(status: u16, message: &str) -> Self {
        Self::json(status, &serde_json::json!({ "error": message }))
    }
}

/// One VM in `GET /api/v1/vms`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct VmView {
    /// Name.
    pub name: String,
    /// Address.
    pub host: String,
    /// sshd port.
    pub ssh_port: u16,
    /// Web port.
    pub http_port: u16,
    /// Routing weight.
    pub weight: u32,
    /// Session cap.
    pub max_sessions: u32,
    /// starting | healthy | unhealthy | draining | stopped.
    pub state: String,
    /// unknown | up | down, over both protocols: up when either side is up.
    pub health: String,
    /// Each protocol's side: its health and whether it takes new sessions.
    pub protocols: ProtocolSides,
    /// What the provider says: starting | running | stopping | stopped.
    pub lifecycle: String,
    /// Drained by an operator or the autoscaler, or leaving.
    pub draining: bool,
    /// Gone from the pool's VM set (a reload, the provider's listing) while sessions run on it:
    /// it drains until they end, then leaves the list.
    #[serde(default)]
    pub leaving: bool,
    /// Live sessions by protocol.
    pub sessions: SessionCounts,
    /// node_load1 per CPU, when scraped.
    pub load_hint: Option<f64>,
    /// Seconds since the VM last had no session, when idle.
    pub idle_seconds: Option<f64>,
    /// Recent results of the sides that have a probe of their own, oldest first.
    pub health_history: Vec<Probe>,
    /// Last busy check: true = kept because work runs there outside the gateway (or the check
    /// could not tell), false = idle, null = not checked (in use, or not a scale-in candidate).
    #[serde(default)]
    pub busy: Option<bool>,
    /// Sessions on this VM by gateway replica (`cluster.replica_id`), the answering replica
    /// included; `sessions` is their sum.
    #[serde(default)]
    pub sessions_by_replica: std::collections::BTreeMap<String, crate::cluster::SessionTotals>,
}

/// A VM's two sides.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ProtocolSides {
    /// sshd.
    pub ssh: ProtocolSide,
    /// The web side (JupyterHub).
    pub http: ProtocolSide,
}

/// One protocol's side of a VM.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ProtocolSide {
    /// unknown | up | down (unknown: not probed yet, or the gateway does not serve this
    /// protocol).
    pub health: String,
    /// New sessions of this protocol may go here now (running, this side up, not draining, below
    /// `max_sessions`).
    pub accepts_new: bool,
    /// This side has a probe of its own (else its health follows the sides that are probed).
    pub probed: bool,
    /// The gateway serves this protocol (false: an SSH-only or a browser-only gateway; this
    /// side's health is then `unknown` and it takes no sessions).
    #[serde(default = "served_by_default")]
    pub served: bool,
    /// Recent results of this side, oldest first.
    pub history: Vec<Probe>,
}

/// A gateway older than `served` served both protocols or said nothing of the one it did not.
fn served_by_default() -> bool {
    true
}

/// Sessions by protocol.
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct SessionCounts {
    /// SSH connections.
    pub ssh: u32,
    /// Active browser sessions.
    pub http: u32,
    /// Both.
    pub total: u32,
    /// Browsers sent here by their first request whose cookie has not come back yet
    /// (`http.tentative_for`): they weigh in the choice of VM, but are not sessions.
    #[serde(default)]
    pub tentative: u32,
}

/// One probe result.
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize, PartialEq)]
pub struct Probe {
    /// How long ago.
    pub age_seconds: f64,
    /// Passed.
    pub ok: bool,
}

/// One session in `GET /api/v1/sessions`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct SessionView {
    /// Session id.
    pub id: u64,
    /// User, when known.
    pub user: Option<String>,
    /// VM.
    pub vm: String,
    /// ssh | http.
    pub protocol: String,
    /// Start, seconds since the Unix epoch.
    pub started_unix: u64,
    /// User → VM bytes.
    pub bytes_up: u64,
    /// VM → user bytes.
    pub bytes_down: u64,
}

/// The VMs as the API shows them.
pub fn vms(state: &AdminState) -> Vec<VmView> {
    let snapshot = state.pool.snapshot();
    let now = state.pool.clock().now();
    let busy = state
        .autoscale
        .as_ref()
        .map(|a| a.view().busy)
        .unwrap_or_default();
    let cluster = state.cluster.view();
    snapshot
        .vms()
        .iter()
        .map(|vm| {
            let spec = vm.spec();
            let status = vm.status();
            let history = |protocol: Protocol| -> Vec<Probe> {
                state
                    .health
                    .history(&spec.name, protocol)
                    .into_iter()
                    .map(|(age, ok)| Probe {
                        age_seconds: age.as_secs_f64(),
                        ok,
                    })
                    .collect()
            };
            let side = |vm: &router_core::Vm, protocol: Protocol| ProtocolSide {
                health: status.health_of(protocol).as_str().to_string(),
                accepts_new: vm.accepts_new_sessions(protocol),
                probed: state.health.probes(protocol),
                served: state.health.serves(protocol),
                history: history(protocol),
            };
            let (ssh, http) = (vm.sessions(Protocol::Ssh), vm.sessions(Protocol::Http));
            VmView {
                name: spec.name.clone(),
                host: spec.host.clone(),
                ssh_port: spec.ssh_port,
                http_port: spec.http_port,
                weight: spec.weight,
                max_sessions: spec.max_sessions,
                state: vm.state().as_str().to_string(),
                health: status.health().as_str().to_string(),
                protocols: ProtocolSides {
                    ssh: side(vm, Protocol::Ssh),
                    http: side(vm, Protocol::Http),
                },
                lifecycle: status.lifecycle.as_str().to_string(),
                draining: status.draining,
                leaving: status.leaving,
                sessions: SessionCounts {
                    ssh,
                    http,
                    total: ssh + http,
                    tentative: vm.tentative_sessions(),
                },
                load_hint: vm.load_hint(),
                idle_seconds: vm
                    .idle_since()
                    .map(|since| now.saturating_duration_since(since).as_secs_f64()),
                health_history: {
                    let mut all: Vec<Probe> = Protocol::ALL
                        .iter()
                        .filter(|&&p| state.health.probes(p))
                        .flat_map(|&p| history(p))
                        .collect();
                    all.sort_by(|a, b| b.age_seconds.total_cmp(&a.age_seconds));
                    all
                },
                busy: busy.get(&spec.name).copied(),
                sessions_by_replica: {
                    let own = crate::cluster::SessionTotals {
                        ssh: vm.local_sessions(Protocol::Ssh),
                        http: vm.local_sessions(Protocol::Http),
                    };
                    std::iter::once((cluster.replica_id.clone(), own))
                        .chain(
                            cluster
                                .sessions_by_replica
                                .iter()
                                .filter_map(|(id, per_vm)| {
                                    per_vm.get(&spec.name).map(|s| (id.clone(), *s))
                                }),
                        )
                        .collect()
                },
            }
        })
        .collect()
}

/// The live sessions as the API shows them.
pub fn sessions(state: &AdminState) -> Vec<SessionView> {
    let mut list: Vec<SessionView> = state
        .pool
        .sessions()
        .into_iter()
        .map(|s| SessionView {
            id: s.id,
            user: s.user,
            vm: s.vm,
            protocol: s.protocol.as_str().to_string(),
            started_unix: s
                .started
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default(),
            bytes_up: s.bytes_up,
            bytes_down: s.bytes_down,
        })
        .collect();
    list.sort_by_key(|s| s.id);
    list
}

/// Whether the request carries the admin token (when one is configured): `Authorization: Bearer
/// TOKEN`, or — so that a browser can open `/status` — HTTP Basic with the token as the password
/// (any user name).
fn authorized(state: &AdminState, authorization: Option<&str>) -> bool {
    let Some(token) = &state.token else {
        return true;
    };
    let Some(header) = authorization else {
        return false;
    };
    if let Some(given) = header.strip_prefix("Bearer ") {
        return same_secret(given.trim().as_bytes(), token.as_bytes());
    }
    if let Some(encoded) = header.strip_prefix("Basic ")
        && let Ok(decoded) = data_encoding::BASE64.decode(encoded.trim().as_bytes())
        && let Some(colon) = decoded.iter().position(|&b| b == b':')
    {
        return same_secret(&decoded[colon + 1..], token.as_bytes());
    }
    false
}

/// Constant-time comparison: the token is a secret.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Answers one admin request.
pub fn handle(state: &AdminState, method: &str, path: &str, authorization: Option<&str>) -> Reply {
    let path = path.split('?').next().unwrap_or(path);
    match (method, path) {
        ("GET" | "HEAD", "/healthz") => Reply {
            status: 200,
            content_type: "text/plain; charset=utf-8",
            body: "ok\n".into(),
        },
        ("GET" | "HEAD", "/metrics") => Reply {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: state.metrics.render(&state.pool),
        },
        // The page names users: with a token configured it needs the token too.
        ("GET" | "HEAD", "/status" | "/") if !authorized(state, authorization) => Reply {
            status: 401,
            content_type: "text/plain; charset=utf-8",
            body: "the status page needs the admin token (admin.token_file): send \
                   `Authorization: Bearer TOKEN`, or in a browser log in with any user name and \
                   the token as the password\n"
                .into(),
        },
        ("GET" | "HEAD", "/status" | "/") => Reply {
            status: 200,
            content_type: "text/html; charset=utf-8",
            body: status_page::render(
                &vms(state),
                &sessions(state),
                state.autoscale.as_ref().map(|a| a.view()),
                &state.cluster.view(),
                SystemTime::now(),
            ),
        },
        (_, p) if p.starts_with("/api/") => {
            if !authorized(state, authorization) {
                return Reply::error(401, "a valid bearer token is required (admin.token_file)");
            }
            api(state, method, p)
        }
        _ => Reply::error(
            404,
            "not found; try /status, /metrics, /healthz or /api/v1/vms",
        ),
    }
}

fn api(state: &AdminState, method: &str, path: &str) -> Reply {
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    match (method, segments.as_slice()) {
        ("GET", ["api", "v1", "vms"]) => Reply::json(200, &vms(state)),
        ("GET", ["api", "v1", "sessions"]) => Reply::json(200, &sessions(state)),
        ("GET", ["api", "v1", "replicas"]) => Reply::json(200, &state.cluster.view()),
        ("GET", ["api", "v1", "autoscale"]) => match &state.autoscale {
            Some(autoscale) => Reply::json(200, &autoscale.view()),
            None => Reply::json(200, &crate::autoscale::AutoscaleView::default()),
        },
        ("GET", ["api", "v1", "vms", name]) => {
            match vms(state).into_iter().find(|v| v.name == *name) {
                Some(vm) => Reply::json(200, &vm),
                None => Reply::error(404, &format!("no VM named {name:?}")),
            }
        }
        ("POST", ["api", "v1", "vms", name, action @ ("drain" | "undrain")]) => {
            let leaving = state
                .pool
                .snapshot()
                .get(name)
                .is_some_and(|vm| vm.status().leaving);
            if leaving && *action == "undrain" {
                return Reply::error(
                    409,
                    &format!(
                        "{name} is no longer in the pool's VM set (removed from the configuration \
                         or the provider's listing): it takes no new sessions, and leaves once \
                         the sessions open there end; add it back to use it again"
                    ),
                );
            }
            let done = if *action == "drain" {
                state.pool.drain(name)
            } else {
                state.pool.undrain(name)
            };
            if !done {
                return Reply::error(404, &format!("no VM named {name:?}"));
            }
            tracing::info!(vm = %name, %action, "admin API");
            match vms(state).into_iter().find(|v| v.name == *name) {
                Some(vm) => Reply::json(200, &vm),
                None => Reply::error(404, &format!("no VM named {name:?}")),
            }
        }
        (_, ["api", "v1", "vms", _, "drain" | "undrain"]) => Reply::error(405, "use POST"),
        _ => Reply::error(
            404,
            "unknown API path; see /api/v1/vms, /api/v1/sessions and /api/v1/replicas",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::HealthSettings;
    use router_core::{Health, PickRequest, RoutingPolicy, SystemClock, VmSpec};

    fn state(token: Option<&str>) -> AdminState {
        let pool = Arc::new(Pool::new(RoutingPolicy::default(), Arc::new(SystemClock)));
        pool.set_vms(vec![
            VmSpec::new("vm-a", "10.0.0.4"),
            VmSpec::new("vm-b", "10.0.0.5"),
        ]);
        pool.set_health("vm-a", Health::Up);
        pool.set_health("vm-b", Health::Up);
        let health = HealthChecker::new(pool.clone(), HealthSettings::for_tests());
        AdminState {
            cluster: standalone(&pool),
            pool,
            health,
            metrics: Arc::new(Metrics::new()),
            token: token.map(str::to_string),
            autoscale: None,
        }
    }

    /// A cluster of one, as without `[cluster]`.
    pub(super) fn standalone(pool: &Arc<Pool>) -> Arc<dyn ClusterStatus> {
        Arc::new(crate::cluster::Standalone {
            record: crate::cluster::ReplicaRecord {
                id: "gw-test".into(),
                ..Default::default()
            },
            pool: pool.clone(),
        })
    }

    #[test]
    fn token_is_required_when_configured() {
        let s = state(Some("s3cret"));
        assert_eq!(handle(&s, "GET", "/api/v1/vms", None).status, 401);
        assert_eq!(
            handle(&s, "GET", "/api/v1/vms", Some("Bearer wrong")).status,
            401
        );
        assert_eq!(
            handle(&s, "GET", "/api/v1/vms", Some("Bearer s3cret")).status,
            200
        );
        assert_eq!(handle(&s, "GET", "/healthz", None).status, 200);
    }

    #[test]
    fn status_page_needs_the_token_when_configured() {
        let s = state(Some("s3cret"));
        // The page names users: no token, no page.
        for path in ["/status", "/"] {
            let r = handle(&s, "GET", path, None);
            assert_eq!(r.status, 401, "{path}");
            assert!(!r.body.contains("vm-a"), "{}", r.body);
        }
        assert_eq!(
            handle(&s, "GET", "/status", Some("Bearer s3cret")).status,
            200
        );
        // A browser: Basic with any user and the token as the password.
        let basic = |user_pass: &str| {
            format!(
                "Basic {}",
                data_encoding::BASE64.encode(user_pass.as_bytes())
            )
        };
        let ok = handle(&s, "GET", "/status", Some(&basic("admin:s3cret")));
        assert_eq!(ok.status, 200);
        assert!(ok.body.contains("vm-a"));
        for wrong in ["admin:nope", "s3cret", "admin:s3cret:x"] {
            let r = handle(&s, "GET", "/status", Some(&basic(wrong)));
            assert_eq!(r.status, 401, "{wrong}");
        }
        assert_eq!(
            handle(&s, "GET", "/status", Some("Basic !!!not-base64")).status,
            401
        );
        // Metrics and liveness stay open for scrapers and load balancers.
        assert_eq!(handle(&s, "GET", "/metrics", None).status, 200);
        // Without a token configured the page is open, as before.
        assert_eq!(handle(&state(None), "GET", "/status", None).status, 200);
    }

    #[test]
    fn drain_and_undrain() {
        let s = state(None);
        let r = handle(&s, "POST", "/api/v1/vms/vm-a/drain", None);
        assert_eq!(r.status, 200, "{}", r.body);
        let vm: VmView = serde_json::from_str(&r.body).unwrap();
        assert_eq!(vm.state, "draining");
        // No new session goes to a drained VM.
        for _ in 0..3 {
            let g = s.pool.acquire(&PickRequest::new(Protocol::Ssh)).unwrap();
            assert_eq!(g.vm_name(), "vm-b");
            std::mem::forget(g);
        }
        let r = handle(&s, "POST", "/api/v1/vms/vm-a/undrain", None);
        let vm: VmView = serde_json::from_str(&r.body).unwrap();
        assert_eq!(vm.state, "healthy");
        assert_eq!(
            handle(&s, "POST", "/api/v1/vms/nope/drain", None).status,
            404
        );
        assert_eq!(
            handle(&s, "GET", "/api/v1/vms/vm-a/drain", None).status,
            405
        );
    }

    #[test]
    fn vms_and_sessions_list_live_state() {
        let s = state(None);
        let guard = s
            .pool
            .acquire(&PickRequest::new(Protocol::Ssh).user("alice"))
            .unwrap();
        guard.add_bytes_up(5);
        let list: Vec<VmView> =
            serde_json::from_str(&handle(&s, "GET", "/api/v1/vms", None).body).unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list.iter().map(|v| v.sessions.ssh).sum::<u32>(), 1);
        let sessions: Vec<SessionView> =
            serde_json::from_str(&handle(&s, "GET", "/api/v1/sessions", None).body).unwrap();
        assert_eq!(sessions.len(), 1);
        assert_eq!(sessions[0].user.as_deref(), Some("alice"));
        assert_eq!(sessions[0].bytes_up, 5);
        assert_eq!(sessions[0].protocol, "ssh");
        let page = handle(&s, "GET", "/status", None);
        assert!(page.body.contains("vm-a") && page.body.contains("<html"));
    }
}

#[cfg(test)]
mod busy_tests {
    use super::*;
    use crate::autoscale::AutoscaleView;
    use crate::health::HealthSettings;
    use router_core::{RoutingPolicy, SystemClock, VmSpec};

    /// An autoscaler view with busy-check verdicts.
    struct Verdicts;

    impl AutoscaleStatus for Verdicts {
        fn view(&self) -> AutoscaleView {
            AutoscaleView {
                enabled: true,
                busy: [("vm-a".to_string(), true), ("vm-b".to_string(), false)]
                    .into_iter()
                    .collect(),
                provider_error: Some("the provider's listing has failed for 2m: 403".into()),
                ..AutoscaleView::default()
            }
        }
    }

    #[test]
    fn vms_show_the_busy_check_and_the_status_page_says_why_a_vm_is_kept() {
        let pool = Arc::new(Pool::new(RoutingPolicy::default(), Arc::new(SystemClock)));
        pool.set_vms(vec![
            VmSpec::new("vm-a", "10.0.0.4"),
            VmSpec::new("vm-b", "10.0.0.5"),
            VmSpec::new("vm-c", "10.0.0.6"),
        ]);
        let health = HealthChecker::new(pool.clone(), HealthSettings::for_tests());
        let s = AdminState {
            cluster: super::tests::standalone(&pool),
            pool,
            health,
            metrics: Arc::new(Metrics::new()),
            token: None,
            autoscale: Some(Arc::new(Verdicts)),
        };
        let json: serde_json::Value =
            serde_json::from_str(&handle(&s, "GET", "/api/v1/vms", None).body).unwrap();
        let busy: Vec<serde_json::Value> = json
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["busy"].clone())
            .collect();
        assert_eq!(
            busy,
            [
                serde_json::json!(true),
                serde_json::json!(false),
                serde_json::Value::Null
            ]
        );
        let page = handle(&s, "GET", "/status", None).body;
        assert_eq!(page.matches("kept: work running").count(), 1, "{page}");
        assert!(page.contains("autoscaler waiting"), "{page}");
        let autoscale: serde_json::Value =
            serde_json::from_str(&handle(&s, "GET", "/api/v1/autoscale", None).body).unwrap();
        assert_eq!(autoscale["enabled"], true);
        assert_eq!(
            autoscale["provider_error"],
            "the provider's listing has failed for 2m: 403"
        );
        // `poolgate status` too.
        let table = crate::admin::client::table(&vms(&s));
        let kept: Vec<&str> = table
            .lines()
            .filter(|l| l.contains("(kept: work running)"))
            .collect();
        assert_eq!(kept.len(), 1, "{table}");
        assert!(kept[0].starts_with("vm-a "), "{table}");
    }
}
