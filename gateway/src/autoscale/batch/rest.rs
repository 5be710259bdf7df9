//! Slurm's queue read through slurmrestd (`batch.rest_url`) with a JWT, instead of `squeue` and
//! `sinfo`: `GET /slurm/{version}/jobs` and `/slurm/{version}/nodes`, headers
//! `X-SLURM-USER-NAME` and `X-SLURM-USER-TOKEN`. The token file is read on every read, so a
//! token rotated with `scontrol token` is used at the next tick. The token is never logged nor
//! put in an error message.
//!
//! Drains and resumes still run `scontrol` (`batch.scontrol`): the `v0.0.38` API of Slurm 22.05
//! has no node update — its `/slurm/v0.0.38/node/{node_name}` serves `GET` only (its OpenAPI
//! document, `GET /openapi/v3`, lists no other method and a `POST` is answered 405).
//!
//! The answers are read by field name, tolerating the shapes of later API versions as well as
//! `v0.0.38`'s: a state is a string or a list of flags, a count an integer or a
//! `{"set": …, "number": …}` object, a node's partitions a list or a comma-separated string.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::StatusCode;
use hyper::header::{ACCEPT, HeaderValue};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use poolgate_config::Batch;
use serde_json::Value;

use super::{BatchEngine, BatchView, NodeState, Slurm, is_demand};

/// Largest slurmrestd answer read. `/jobs` lists every job slurmctld still holds (finished ones
/// for `MinJobAge`), about 3 KiB each in `v0.0.38`: 64 MiB is some 20,000 jobs.
const MAX_RESPONSE: usize = 64 << 20;
/// Largest token file read (a Slurm JWT is a few hundred bytes).
const MAX_TOKEN_FILE: u64 = 64 << 10;

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// Slurm read through slurmrestd; drains and resumes through `scontrol`.
pub struct SlurmRest {
    commands: Slurm,
    /// `rest_url` without a trailing `/`.
    base: String,
    version: String,
    token_file: PathBuf,
    user: Option<String>,
    partition: String,
    timeout: Duration,
    client: HttpClient,
}

impl SlurmRest {
    /// slurmrestd as `[batch]` describes it (`rest_url` and `rest_token_file` set; validated
    /// with the configuration).
    pub fn new(config: &Batch) -> Result<Self, String> {
        let base = config
            .rest_url
            .as_deref()
            .ok_or("batch.rest_url is not set")?
            .trim_end_matches('/')
            .to_owned();
        let token_file = config
            .rest_token_file
            .clone()
            .ok_or("batch.rest_token_file is not set")?;
        Ok(Self {
            commands: Slurm::new(config),
            base,
            version: config.rest_version.clone(),
            token_file,
            user: config.rest_user.clone(),
            partition: config.partition.clone(),
            timeout: config.timeout,
            client: http_client(config.timeout)?,
        })
    }

    /// One `GET /slurm/{version}/{what}`, its JSON.
    async fn get(&self, what: &str, user: &str, token: &str) -> Result<Value, String> {
        let url = format!("{}/slurm/{}/{what}", self.base, self.version);
        let mut token = HeaderValue::from_str(token)
            .map_err(|_| self.token_problem("holds characters a token cannot have"))?;
        token.set_sensitive(true);
        let user = HeaderValue::from_str(user).map_err(|_| {
            format!("the slurmrestd user {user:?} cannot be sent in a header (batch.rest_user)")
        })?;
        let request = hyper::Request::get(&url)
            .header(ACCEPT, "application/json")
            .header("X-SLURM-USER-NAME", user)
            .header("X-SLURM-USER-TOKEN", token)
            .body(Empty::new())
            .map_err(|e| format!("cannot build the request for {url}: {e} (batch.rest_url)"))?;
        let response = self.client.request(request).await.map_err(|e| {
            format!(
                "cannot reach slurmrestd at {url}: {} (is slurmrestd running and listening there? batch.rest_url)",
                error_chain(&e)
            )
        })?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| {
                format!(
                    "reading slurmrestd's answer to {url} failed: {e} (answers over {} MiB are refused)",
                    MAX_RESPONSE >> 20
                )
            })?
            .to_bytes();
        let json: Option<Value> = serde_json::from_slice(&body).ok();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(format!(
                "slurmrestd refused the request for {url} (HTTP {status}): check that batch.rest_token_file holds a valid token (scontrol token username=USER), that batch.rest_user is the token's user, and that slurmrestd runs with -a rest_auth/jwt"
            ));
        }
        if status == StatusCode::NOT_FOUND {
            return Err(format!(
                "slurmrestd has no {url} (HTTP 404): batch.rest_version \"{}\" is not among the versions it serves (GET {}/openapi/v3 lists them)",
                self.version, self.base
            ));
        }
        let Some(json) = json else {
            return Err(format!(
                "slurmrestd answered {url} with HTTP {status} and no JSON ({}); is batch.rest_url slurmrestd?",
                snippet(&body)
            ));
        };
        let errors = slurm_errors(&json);
        if !status.is_success() || !errors.is_empty() {
            let errors = if errors.is_empty() {
                "no error given".to_owned()
            } else {
                errors.join("; ")
            };
            return Err(format!(
                "slurmrestd could not read Slurm's {what} (HTTP {status}: {errors}); Slurm 22.05 answers so when the token has expired or is not valid (write a new one to batch.rest_token_file with scontrol token), when it was made for another user than batch.rest_user, or when slurmctld does not accept tokens (slurm.conf needs AuthAltTypes=auth/jwt and AuthAltParameters=jwt_key=…)"
            ));
        }
        Ok(json)
    }

    /// The token file's JWT, and the user to send with it.
    fn credentials(&self) -> Result<(String, String), String> {
        let token = read_token(&self.token_file)?;
        let user = match &self.user {
            Some(user) => user.clone(),
            None => token_user(&token).ok_or_else(|| {
                self.token_problem(
                    "does not name its user (no \"sun\" claim): set batch.rest_user to the user it was made for",
                )
            })?,
        };
        Ok((token, user))
    }

    fn token_problem(&self, what: &str) -> String {
        format!(
            "the token in {} (batch.rest_token_file) {what}",
            self.token_file.display()
        )
    }
}

impl BatchEngine for SlurmRest {
    fn observe(&self) -> BoxFuture<'_, Result<BatchView, String>> {
        Box::pin(async move {
            let (token, user) = self.credentials()?;
            let read = async {
                futures::try_join!(
                    self.get("jobs", &user, &token),
                    self.get("nodes", &user, &token)
                )
            };
            let (jobs, nodes) =
                tokio::time::timeout(self.timeout, read)
                    .await
                    .map_err(|_| {
                        format!(
                            "slurmrestd at {} did not answer within {} (batch.timeout)",
                            self.base,
                            humantime::format_duration(self.timeout)
                        )
                    })??;
            parse_rest_view(&jobs, &nodes, &self.partition)
        })
    }

    fn drain<'a>(&'a self, node: &'a str, reason: &'a str) -> BoxFuture<'a, Result<(), String>> {
        self.commands.drain(node, reason)
    }

    fn resume<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<(), String>> {
        self.commands.resume(node)
    }

    fn forget<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<(), String>> {
        self.commands.forget(node)
    }

    fn node_of(&self, vm: &str) -> String {
        self.commands.node_of(vm)
    }
}

/// A client for http and https (system CAs), connecting within `timeout`.
fn http_client(timeout: Duration) -> Result<HttpClient, String> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    let tls = rustls::ClientConfig::builder_with_provider(
        rustls::crypto::aws_lc_rs::default_provider().into(),
    )
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS client for slurmrestd: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(timeout));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .build(connector))
}

/// The JWT in `path`: the file as `scontrol token` prints it (`SLURM_JWT=…`) or the bare token.
fn read_token(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let shown = path.display();
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_TOKEN_FILE).read_to_string(&mut text))
        .map_err(|e| {
            format!("cannot read the slurmrestd token {shown} (batch.rest_token_file): {e}")
        })?;
    let token = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.strip_prefix("export ").unwrap_or(l))
        .map(|l| l.strip_prefix("SLURM_JWT=").unwrap_or(l).trim())
        .unwrap_or_default();
    let parts: Vec<&str> = token.split('.').collect();
    let jwt_like = parts.len() == 3
        && parts.iter().all(|p| {
            p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'='))
        })
        && !parts[0].is_empty()
        && !parts[1].is_empty();
    if !jwt_like {
        return Err(format!(
            "{shown} (batch.rest_token_file) holds no JWT (write the output of scontrol token username=USER into it)"
        ));
    }
    Ok(token.to_owned())
}

/// The user a Slurm JWT was made for: its `sun` claim (read, not verified: slurmctld verifies).
fn token_user(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = data_encoding::BASE64URL_NOPAD
        .decode(payload.trim_end_matches('=').as_bytes())
        .ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    let user = claims.get("sun")?.as_str()?;
    (!user.is_empty()).then(|| user.to_owned())
}

/// slurmrestd's `errors` list as `error (description, from source)` lines.
fn slurm_errors(json: &Value) -> Vec<String> {
    let Some(errors) = json.get("errors").and_then(Value::as_array) else {
        return Vec::new();
    };
    errors
        .iter()
        .map(|e| {
            let field = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or_default();
            let mut line = field("error").to_owned();
            if line.is_empty() {
                line = "error".to_owned();
            }
            let detail: Vec<String> = [("", field("description")), ("from ", field("source"))]
                .into_iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(prefix, v)| format!("{prefix}{v}"))
                .collect();
            if !detail.is_empty() {
                line.push_str(&format!(" ({})", detail.join(", ")));
            }
            line
        })
        .collect()
}

/// The start of a body that is not JSON, printable, for a message.
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(120)]);
    let clean: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if clean.trim().is_empty() {
        "empty body".to_owned()
    } else {
        format!("starts {:?}", clean.trim())
    }
}

/// An error and its sources, on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Maps slurmrestd's `/jobs` and `/nodes` answers into the view the command reader gives:
/// jobs and nodes of `partition` only; pending, running (or completing) jobs; the nodes pending
/// jobs would use when more VMs could start them; each node's busy, drain and reason.
pub fn parse_rest_view(jobs: &Value, nodes: &Value, partition: &str) -> Result<BatchView, String> {
    let job_list = jobs
        .get("jobs")
        .and_then(Value::as_array)
        .ok_or("slurmrestd's /jobs answer has no \"jobs\" list")?;
    let node_list = nodes
        .get("nodes")
        .and_then(Value::as_array)
        .ok_or("slurmrestd's /nodes answer has no \"nodes\" list")?;
    let mut view = BatchView::default();
    for job in job_list {
        let in_partition = job
            .get("partition")
            .and_then(Value::as_str)
            .is_some_and(|p| p.split(',').any(|p| p.trim() == partition));
        if !in_partition {
            continue;
        }
        let states = words(job.get("job_state"));
        if states.iter().any(|s| s == "PENDING") {
            view.pending_jobs += 1;
            let reason = job
                .get("state_reason")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if is_demand(reason) {
                let count = count(job.get("node_count")).unwrap_or(1).max(1);
                view.pending_nodes = view.pending_nodes.saturating_add(count);
            }
        } else if states
            .iter()
            .any(|s| matches!(s.as_str(), "RUNNING" | "COMPLETING" | "CONFIGURING"))
        {
            view.running_jobs += 1;
        }
    }
    for node in node_list {
        let Some(name) = node.get("name").and_then(Value::as_str) else {
            continue;
        };
        let in_partition = match node.get("partitions") {
            Some(Value::Array(ps)) => ps.iter().any(|p| p.as_str() == Some(partition)),
            Some(Value::String(ps)) => ps.split(',').any(|p| p.trim() == partition),
            _ => false,
        };
        if !in_partition {
            continue;
        }
        // v0.0.38: "state": "allocated", "state_flags": ["DRAIN"]; "state": "down",
        // "state_flags": ["NOT_RESPONDING"]; later: "state": ["IDLE", "DRAIN"].
        let mut states = words(node.get("state"));
        states.extend(words(node.get("state_flags")));
        let busy = states
            .iter()
            .any(|s| matches!(s.as_str(), "ALLOCATED" | "MIXED" | "COMPLETING"));
        let drain = states.iter().any(|s| s == "DRAIN");
        let reason = node
            .get("reason")
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .unwrap_or("none");
        view.nodes.insert(
            name.to_owned(),
            NodeState {
                busy,
                drain,
                reason: reason.to_owned(),
                unregistered: super::unregistered(
                    &states.iter().map(String::as_str).collect::<Vec<_>>(),
                ),
            },
        );
    }
    Ok(view)
}

/// A state as upper-case words: `"allocated"` → `["ALLOCATED"]`, `["IDLE", "DRAIN"]` → both.
fn words(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::String(s)) => vec![s.to_ascii_uppercase()],
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_ascii_uppercase)
            .collect(),
        _ => Vec::new(),
    }
}

/// A count: `2`, or `{"set": true, "infinite": false, "number": 2}` (`None` when not set).
fn count(v: Option<&Value>) -> Option<u32> {
    let n = match v? {
        Value::Object(o) => {
            if o.get("set").and_then(Value::as_bool) == Some(false) {
                return None;
            }
            o.get("number")?.as_u64()?
        }
        other => other.as_u64()?,
    };
    u32::try_from(n).ok()
}

#[cfg(test)]
mod tests;
