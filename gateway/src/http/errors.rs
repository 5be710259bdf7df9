//! Error pages: HTML for browsers, JSON for clients that ask for `application/json`.

use std::time::Duration;

use hyper::header::{self, HeaderValue};
use hyper::{HeaderMap, Response, StatusCode};

use super::{Body, full};
use crate::html::escape;

/// What keeps every VM from a request, for the title of the "no VM" page (its text gives the
/// counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoVmCause {
    /// VMs are booting or not probed yet, or the pool is being woken.
    Starting,
    /// Every VM that serves is at its session limit.
    Full,
    /// The VMs are down or draining.
    Unavailable,
}

impl NoVmCause {
    /// The cause of `no_vm`; `waking`: the request has woken the pool (the autoscaler starts a
    /// VM when none runs).
    pub fn of(no_vm: &router_core::NoVm, waking: bool) -> Self {
        if no_vm.starting > 0 || (waking && no_vm.full == 0) {
            Self::Starting
        } else if no_vm.full > 0 && no_vm.unhealthy == 0 {
            Self::Full
        } else {
            Self::Unavailable
        }
    }
}

/// Why the gateway answers itself instead of the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayError {
    /// No VM can take the request (pool starting, all busy, all down): 503 with `Retry-After`.
    NoVm {
        /// What the page's title says.
        cause: NoVmCause,
        /// The pool's reason, from router-core.
        reason: String,
        /// Seconds until the browser should retry.
        retry_after: Duration,
    },
    /// The VM could not be reached or failed mid-response: 502.
    VmFailed {
        /// The VM.
        vm: String,
        /// What failed.
        detail: String,
    },
    /// The VM did not answer in time: 504.
    Timeout {
        /// The VM.
        vm: String,
        /// The response-header timeout.
        after: Duration,
    },
    /// A request the gateway refuses (absolute-form target, `CONNECT`, oversized URI …).
    Refused {
        /// Status to answer.
        status: StatusCode,
        /// What is wrong.
        detail: String,
    },
}

impl GatewayError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoVm { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::VmFailed { .. } => StatusCode::BAD_GATEWAY,
            Self::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::Refused { status, .. } => *status,
        }
    }

    fn title(&self) -> &'static str {
        match self {
            Self::NoVm {
                cause: NoVmCause::Starting,
                ..
            } => "No VM is available; the pool is starting",
            Self::NoVm {
                cause: NoVmCause::Full,
                ..
            } => "No VM has room right now; every VM is at its session limit",
            Self::NoVm {
                cause: NoVmCause::Unavailable,
                ..
            } => "No VM is available right now",
            Self::VmFailed { .. } => "The VM did not answer",
            Self::Timeout { .. } => "The VM took too long to answer",
            Self::Refused { .. } => "Request refused",
        }
    }

    /// What happened and what to do: for a person looking at the page (`page`), or for a
    /// program that asked for JSON (a notebook's API call, a script), which reloads nothing.
    fn detail(&self, page: bool) -> String {
        match self {
            Self::NoVm {
                reason,
                retry_after,
                ..
            } => {
                let secs = retry_after.as_secs();
                if page {
                    format!("{reason}. This page reloads by itself in {secs} seconds.")
                } else {
                    format!("{reason}. Try again in {secs} seconds (Retry-After).")
                }
            }
            Self::VmFailed { vm, detail } => {
                let next = if page { "Reload the page" } else { "Try again" };
                format!(
                    "poolgate could not get an answer from VM {vm}: {detail}. {next}; \
                     if the VM is down you will be moved to another one."
                )
            }
            Self::Timeout { vm, after } => {
                let next = if page {
                    "Reload the page to try again"
                } else {
                    "Try again"
                };
                format!(
                    "VM {vm} sent no response within {}. {next}.",
                    humantime::format_duration(*after)
                )
            }
            Self::Refused { detail, .. } => detail.clone(),
        }
    }

    /// The response, in the format the request's `Accept` header prefers.
    pub fn response(&self, request_headers: &HeaderMap) -> Response<Body> {
        self.response_as(wants_json(request_headers))
    }

    /// The error page, as JSON when `json` (see [`wants_json`]) and HTML otherwise.
    pub fn response_as(&self, json: bool) -> Response<Body> {
        let status = self.status();
        let body = if json {
            serde_json::json!({
                "status": status.as_u16(),
                "error": self.title(),
                "message": self.detail(false),
            })
            .to_string()
        } else {
            self.html()
        };
        let mut resp = Response::new(full(body));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(if json {
                "application/json"
            } else {
                "text/html; charset=utf-8"
            }),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Self::NoVm { retry_after, .. } = self
            && let Ok(v) = HeaderValue::from_str(&retry_after.as_secs().to_string())
        {
            h.insert(header::RETRY_AFTER, v);
        }
        resp
    }

    fn html(&self) -> String {
        let refresh = match self {
            Self::NoVm { retry_after, .. } => format!(
                "<meta http-equiv=\"refresh\" content=\"{}\">",
                retry_after.as_secs()
            ),
            _ => String::new(),
        };
        format!(
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">{refresh}\
             <title>{status} {title}</title>\
             <style>body{{font-family:system-ui,sans-serif;max-width:40em;margin:4em auto;\
             padding:0 1em;color:#222}}h1{{font-size:1.4em}}p{{line-height:1.5}}\
             small{{color:#777}}</style></head>\
             <body><h1>{title}</h1><p>{detail}</p><p><small>{status} \u{b7} poolgate</small></p>\
             </body></html>\n",
            status = self.status(),
            title = escape(self.title()),
            detail = escape(&self.detail(true)),
        )
    }
}

/// Whether the client prefers JSON (`Accept: application/json`, and not HTML first).
pub fn wants_json(headers: &HeaderMap) -> bool {
    accepts_json(headers.get(header::ACCEPT))
}

/// [`wants_json`] for the request's `Accept` value.
pub fn accepts_json(accept: Option<&HeaderValue>) -> bool {
    let accept = accept.and_then(|v| v.to_str().ok()).unwrap_or("");
    let json = accept.find("application/json");
    let html = accept.find("text/html");
    match (json, html) {
        (Some(j), Some(h)) => j < h,
        (Some(_), None) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn text(resp: Response<Body>) -> String {
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn accept(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, HeaderValue::from_str(v).expect("value"));
        h
    }

    #[tokio::test]
    async fn no_vm_page_refreshes_and_says_retry_after() {
        let e = GatewayError::NoVm {
            cause: NoVmCause::Starting,
            reason: "no VM is available right now: 2 VMs \u{2014} 2 starting".into(),
            retry_after: Duration::from_secs(10),
        };
        let resp = e.response(&accept("text/html,application/xhtml+xml"));
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "10");
        let body = text(resp).await;
        assert!(
            body.contains("http-equiv=\"refresh\" content=\"10\""),
            "{body}"
        );
        assert!(body.contains("the pool is starting"), "{body}");

        let resp = e.response(&accept("application/json"));
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
        let v: serde_json::Value = serde_json::from_str(&text(resp).await).expect("json");
        assert_eq!(v["status"], 503);
        let message = v["message"].as_str().unwrap_or("");
        assert!(message.contains("2 starting"), "{message}");
        // A program reloads nothing: it is told when to try again.
        assert!(
            message.ends_with("Try again in 10 seconds (Retry-After)."),
            "{message}"
        );
        assert!(!message.contains("page"), "{message}");
    }

    #[test]
    fn the_no_vm_title_names_the_cause() {
        let no_vm = |starting, full, unhealthy| router_core::NoVm {
            total: starting + full + unhealthy,
            starting,
            full,
            unhealthy,
            ..router_core::NoVm::default()
        };
        let title = |cause| {
            GatewayError::NoVm {
                cause,
                reason: String::new(),
                retry_after: Duration::from_secs(10),
            }
            .title()
        };
        assert_eq!(NoVmCause::of(&no_vm(1, 2, 0), false), NoVmCause::Starting);
        assert_eq!(NoVmCause::of(&no_vm(0, 0, 0), true), NoVmCause::Starting);
        assert_eq!(NoVmCause::of(&no_vm(0, 3, 0), true), NoVmCause::Full);
        assert_eq!(NoVmCause::of(&no_vm(0, 2, 0), false), NoVmCause::Full);
        assert_eq!(
            NoVmCause::of(&no_vm(0, 2, 1), false),
            NoVmCause::Unavailable
        );
        assert_eq!(
            NoVmCause::of(&no_vm(0, 0, 3), false),
            NoVmCause::Unavailable
        );
        assert!(title(NoVmCause::Full).contains("session limit"));
        assert!(!title(NoVmCause::Unavailable).contains("starting"));
    }

    #[tokio::test]
    async fn statuses_and_escaping() {
        let e = GatewayError::VmFailed {
            vm: "<vm>".into(),
            detail: "connection refused".into(),
        };
        assert_eq!(e.status(), 502);
        let body = text(e.response(&HeaderMap::new())).await;
        assert!(body.contains("&lt;vm&gt;") && !body.contains("<vm>"));
        let t = GatewayError::Timeout {
            vm: "a".into(),
            after: Duration::from_secs(60),
        };
        assert_eq!(t.status(), 504);
        assert!(wants_json(&accept("application/json, text/plain, */*")));
        assert!(!wants_json(&accept("text/html, application/json")));
        assert!(!wants_json(&HeaderMap::new()));
    }
}
