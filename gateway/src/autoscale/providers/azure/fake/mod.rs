//! An in-process fake of the ARM endpoints the provider uses, plus a managed-identity token
//! endpoint, on 127.0.0.1:0. It keeps a little scale-set state, answers in the documented JSON
//! shapes, runs long operations over several polls, and logs every request for assertions.

mod shapes;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub const SUB: &str = "00000000-0000-0000-0000-000000000001";
pub const RG: &str = "rg-pool";
pub const VMSS: &str = "dsvm";
pub const TOKEN_PATH: &str = "/metadata/identity/oauth2/token";

/// One VM of the fake scale set.
#[derive(Debug, Clone)]
pub struct Inst {
    pub power: String,
    pub provisioning: String,
    pub protect: bool,
    pub ip: String,
}

/// One request the fake saw.
#[derive(Debug, Clone)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub query: HashMap<String, String>,
    pub body: Option<Value>,
    pub auth: Option<String>,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    /// `user-agent`.
    pub user_agent: Option<String>,
    /// `x-ms-client-request-id`.
    pub request_id: Option<String>,
    /// The fields of a form body (Entra ID token requests).
    pub form: HashMap<String, String>,
}

/// An Entra ID token endpoint path: `/{tenant}/oauth2/v2.0/token`.
pub fn is_entra_token_path(path: &str) -> bool {
    path.ends_with("/oauth2/v2.0/token")
}

fn is_token_path(path: &str) -> bool {
    path == TOKEN_PATH || is_entra_token_path(path)
}

#[derive(Debug)]
pub(super) enum Effect {
    Capacity(u32),
    Power(Vec<u32>, &'static str),
    Delete(Vec<u32>),
    Nothing,
}

#[derive(Debug)]
pub(super) struct Op {
    pub(super) polls_left: u32,
    pub(super) effect: Option<Effect>,
}

/// The fake's state; tests set it up and inspect it.
#[derive(Debug)]
pub struct State {
    pub flexible: bool,
    /// Instances the scale set has (as its operations finished).
    pub capacity: u32,
    /// `sku.capacity` as last written, while an operation realising it runs: ARM's model
    /// changes when a write is accepted, so a read right after shows it.
    pub written_capacity: Option<u32>,
    pub next_id: u32,
    pub instances: BTreeMap<u32, Inst>,
    /// Polls an operation takes (it succeeds on this poll).
    pub polls_per_op: u32,
    /// Answer long operations with `Location` only (no `Azure-AsyncOperation`).
    pub location_only: bool,
    /// Finish writes at once and answer `200` without operation headers (the `"200": {}`
    /// answer of the official examples).
    pub sync_writes: bool,
    /// The next this-many ARM requests get 429 with `Retry-After: 1`.
    pub throttle_next: u32,
    /// Throttle with `Retry-After` as an HTTP date this many seconds ahead instead.
    pub throttle_until_date: Option<u64>,
    /// The next ARM request fails with this status, code and message.
    pub fail_next: Option<(u16, &'static str, &'static str)>,
    /// The next ARM request gets this answer of `examples/ArmErrors.json`, verbatim.
    pub fail_next_example: Option<&'static str>,
    /// Every listing of the instances (and their NICs) fails with this status, code and message
    /// while writes go through: reads and writes are separate permissions and separate
    /// throttling budgets in ARM.
    pub fail_listing: Option<(u16, &'static str, &'static str)>,
    /// Long operations end `Failed` with this code and message.
    pub op_failure: Option<(&'static str, &'static str)>,
    /// Long operations end with this status document of `examples/ArmErrors.json` instead.
    pub op_failure_example: Option<&'static str>,
    /// Calls left in the read policy the fake reports on GET answers
    /// (`x-ms-ratelimit-remaining-resource: Microsoft.Compute/HighCostGetVMScaleSet3Min;N`),
    /// one less per GET; `None`: no such header.
    pub read_budget: Option<u32>,
    /// Lifetime of issued tokens, in seconds.
    pub token_lifetime: u64,
    pub tokens_issued: Vec<String>,
    /// Instances per page of the instance listing.
    pub page_size: usize,
    /// Point `nextLink` at another host (ARM never does; the provider must not follow it).
    pub foreign_next_link: bool,
    /// Spell the fake's own origin differently in `nextLink` (case, explicit port), as ARM does
    /// with `https://management.azure.com:443/…`.
    pub next_link_origin: Option<String>,
    /// The gateway's identity may not join the pool's subnet (as deployed): a write that names
    /// the subnet fails with `LinkedAuthorizationFailed`.
    pub deny_subnet_join: bool,
    /// Answer the Uniform instance listing with this body (an official example) instead.
    pub instances_override: Option<Value>,
    pub log: Vec<Logged>,
    pub(super) ops: HashMap<String, Op>,
    pub(super) next_op: u32,
    pub(super) addr: String,
}

impl State {
    fn new(count: u32) -> Self {
        let mut instances = BTreeMap::new();
        for id in 0..count {
            instances.insert(id, running(id));
        }
        Self {
            flexible: false,
            capacity: count,
            written_capacity: None,
            next_id: count,
            instances,
            polls_per_op: 2,
            location_only: false,
            sync_writes: false,
            throttle_next: 0,
            throttle_until_date: None,
            fail_next: None,
            fail_next_example: None,
            fail_listing: None,
            op_failure: None,
            op_failure_example: None,
            read_budget: None,
            token_lifetime: 3600,
            tokens_issued: Vec::new(),
            page_size: 100,
            foreign_next_link: false,
            next_link_origin: None,
            deny_subnet_join: true,
            instances_override: None,
            log: Vec::new(),
            ops: HashMap::new(),
            next_op: 0,
            addr: String::new(),
        }
    }

    /// ARM requests (not token requests) in order.
    pub fn arm_log(&self) -> Vec<Logged> {
        self.log
            .iter()
            .filter(|l| !is_token_path(&l.path))
            .cloned()
            .collect()
    }

    /// Number of token requests.
    pub fn token_requests(&self) -> usize {
        self.log.iter().filter(|l| is_token_path(&l.path)).count()
    }
}

pub(super) fn running(id: u32) -> Inst {
    Inst {
        power: "running".into(),
        provisioning: "Succeeded".into(),
        protect: false,
        ip: format!("10.0.0.{}", id + 4),
    }
}

/// The running fake.
pub struct FakeArm {
    base: String,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
    /// The server's self-signed certificate (for `localhost`).
    cert: rustls::pki_types::CertificateDer<'static>,
}

impl Drop for FakeArm {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn vmss_path() -> String {
    format!(
        "/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/virtualMachineScaleSets/{VMSS}"
    )
}

pub(super) fn group_path() -> String {
    format!("/subscriptions/{SUB}/resourceGroups/{RG}")
}

pub(super) fn flex_name(id: u32) -> String {
    format!("{VMSS}_{id:08x}")
}

pub(super) fn flex_id(name: &str) -> Option<u32> {
    u32::from_str_radix(name.strip_prefix(&format!("{VMSS}_"))?, 16).ok()
}

impl FakeArm {
    /// A fake scale set with `count` running instances, adjusted by `setup`, over TLS (h2 or
    /// http/1.1 by ALPN) with a fresh self-signed certificate for `localhost` — ARM is https
    /// only, and azure_core's bearer-token policy sends no token over plain http.
    pub async fn start(count: u32, setup: impl FnOnce(&mut State)) -> Self {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("rcgen");
        let cert = ck.cert.der().clone();
        let key = rustls::pki_types::PrivateKeyDer::try_from(ck.signing_key.serialize_der())
            .expect("key");
        let mut config = rustls::ServerConfig::builder_with_provider(
            rustls::crypto::aws_lc_rs::default_provider().into(),
        )
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .expect("server config");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        Self::serve(count, setup, acceptor, cert).await
    }

    /// A client that trusts this server's certificate.
    pub fn client(&self) -> super::arm::HyperClient {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.clone()).expect("root");
        super::arm::http_client_trusting(roots).expect("client")
    }

    async fn serve(
        count: u32,
        setup: impl FnOnce(&mut State),
        tls: tokio_rustls::TlsAcceptor,
        cert: rustls::pki_types::CertificateDer<'static>,
    ) -> Self {
        let mut state = State::new(count);
        setup(&mut state);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        state.addr = format!("https://localhost:{}", addr.port());
        let base = state.addr.clone();
        let state = Arc::new(Mutex::new(state));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let state = shared.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(handle(&state, req).await) }
                    });
                    let server = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    if let Ok(stream) = tls.accept(stream).await {
                        let _ = server.serve_connection(TokioIo::new(stream), service).await;
                    }
                });
            }
        });
        Self {
            base,
            state,
            task,
            cert,
        }
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("fake state")
    }

    /// `http://127.0.0.1:port` or `https://localhost:port`.
    pub fn url(&self) -> String {
        self.base.clone()
    }
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_map(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

pub(super) fn reply(status: u16, body: Value, headers: &[(&str, String)]) -> Response<Full<Bytes>> {
    let mut builder = Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json; charset=utf-8");
    for (name, value) in headers {
        builder = builder.header(*name, value);
    }
    let bytes = if body.is_null() {
        Bytes::new()
    } else {
        Bytes::from(body.to_string())
    };
    builder
        .body(Full::new(bytes))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

pub(super) fn arm_error(status: u16, code: &str, message: &str) -> Response<Full<Bytes>> {
    reply(
        status,
        json!({"error": {"code": code, "message": message}}),
        &[],
    )
}

/// The status and body of an entry of `examples/ArmErrors.json`.
pub fn arm_example(name: &str) -> (u16, Value) {
    let path = format!(
        "{}/src/autoscale/providers/azure/fake/examples/ArmErrors.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).expect("ArmErrors.json");
    let all: Value = serde_json::from_str(&text).expect("ArmErrors.json is JSON");
    let entry = &all[name];
    let status = entry["status"].as_u64().expect("status");
    (
        u16::try_from(status).expect("an HTTP status"),
        entry["body"].clone(),
    )
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn handle(state: &Arc<Mutex<State>>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().as_str().to_owned();
    let version = format!("{:?}", req.version());
    let path = req.uri().path().to_owned();
    let query = query_map(req.uri().query().unwrap_or(""));
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let metadata = header("metadata");
    let user_agent = header("user-agent");
    let request_id = header("x-ms-client-request-id");
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let form = if is_entra_token_path(&path) {
        query_map(&String::from_utf8_lossy(&body))
    } else {
        HashMap::new()
    };
    let body: Option<Value> = serde_json::from_slice(&body).ok();
    let Ok(mut s) = state.lock() else {
        return arm_error(500, "FakePoisoned", "fake state poisoned");
    };
    s.log.push(Logged {
        method: method.clone(),
        path: path.clone(),
        query: query.clone(),
        body: body.clone(),
        auth: auth.clone(),
        version,
        user_agent,
        request_id,
        form: form.clone(),
    });
    if path == TOKEN_PATH {
        return token(&mut s, &query, metadata.as_deref());
    }
    if is_entra_token_path(&path) {
        return entra_token(&mut s, &method, &form);
    }
    let valid = auth
        .as_deref()
        .and_then(|a| a.strip_prefix("Bearer "))
        .is_some_and(|t| s.tokens_issued.iter().any(|i| i == t));
    if !valid {
        return arm_error(
            401,
            "InvalidAuthenticationToken",
            "The access token is invalid.",
        );
    }
    if s.throttle_next > 0 {
        s.throttle_next -= 1;
        let retry = match s.throttle_until_date {
            Some(ahead) => {
                httpdate::fmt_http_date(SystemTime::now() + std::time::Duration::from_secs(ahead))
            }
            None => "1".to_owned(),
        };
        let (status, body) = arm_example("TooManyRequests");
        // A throttled answer names the exhausted policy with no calls left.
        return reply(
            status,
            body,
            &[
                ("retry-after", retry),
                (
                    "x-ms-ratelimit-remaining-resource",
                    "Microsoft.Compute/HighCostGetVMScaleSet3Min;0".to_owned(),
                ),
            ],
        );
    }
    if let Some((status, code, message)) = s.fail_next.take() {
        return arm_error(status, code, message);
    }
    let listing = path.ends_with("/virtualMachines")
        || path.ends_with("/Microsoft.Compute/virtualMachines")
        || path.ends_with("/networkInterfaces");
    if let Some((status, code, message)) = s.fail_listing.filter(|_| method == "GET" && listing) {
        return arm_error(status, code, message);
    }
    if let Some(name) = s.fail_next_example.take() {
        let (status, body) = arm_example(name);
        return reply(status, body, &[]);
    }
    let budget = match (method.as_str(), s.read_budget.as_mut()) {
        ("GET", Some(left)) => {
            *left = left.saturating_sub(1);
            Some(*left)
        }
        _ => None,
    };
    let mut response = if path.contains("/operations/") {
        shapes::poll(&mut s, &path)
    } else {
        route_checked(&mut s, &method, &path, &query, body.as_ref())
    };
    if let Some(left) = budget
        && let Ok(value) = hyper::header::HeaderValue::from_str(&format!(
            "Microsoft.Compute/HighCostGetVMScaleSet3Min;{left}"
        ))
    {
        response
            .headers_mut()
            .append("x-ms-ratelimit-remaining-resource", value);
    }
    response
}

fn route_checked(
    s: &mut State,
    method: &str,
    path: &str,
    query: &HashMap<String, String>,
    body: Option<&Value>,
) -> Response<Full<Bytes>> {
    if query.get("api-version").is_none_or(String::is_empty) {
        return arm_error(
            400,
            "MissingApiVersionParameter",
            "The api-version query parameter (?api-version=) is required for all requests.",
        );
    }
    shapes::route(s, method, path, query, body)
}

/// Entra ID's token endpoint (client credentials grant): a client secret, or a client assertion
/// (a JWT the test checks itself). Scopes must be `{an ARM}/.default`.
fn entra_token(
    s: &mut State,
    method: &str,
    form: &HashMap<String, String>,
) -> Response<Full<Bytes>> {
    let field = |name: &str| form.get(name).map(String::as_str);
    let assertion_ok = field("client_assertion_type")
        == Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
        && field("client_assertion").is_some_and(|a| !a.is_empty());
    let secret_ok = field("client_secret").is_some_and(|c| !c.is_empty());
    if method != "POST"
        || field("grant_type") != Some("client_credentials")
        || field("client_id").is_none_or(str::is_empty)
        || !field("scope").is_some_and(|scope| scope.ends_with("/.default"))
        || !(assertion_ok || secret_ok)
    {
        return reply(
            400,
            json!({"error": "invalid_request", "error_description": "AADSTS900144: bad client credentials request", "error_codes": [900144]}),
            &[],
        );
    }
    let token = format!("tok-{}", s.tokens_issued.len() + 1);
    s.tokens_issued.push(token.clone());
    reply(
        200,
        json!({
            "token_type": "Bearer",
            "expires_in": s.token_lifetime,
            "ext_expires_in": s.token_lifetime,
            "access_token": token
        }),
        &[],
    )
}

fn token(
    s: &mut State,
    query: &HashMap<String, String>,
    metadata: Option<&str>,
) -> Response<Full<Bytes>> {
    if metadata != Some("true")
        || !query.get("resource").is_some_and(|r| {
            // The public cloud's ARM, or a local server standing in for another cloud.
            r == "https://management.azure.com" || r.starts_with("https://localhost:")
        })
        || query.get("api-version").is_none()
    {
        return reply(
            400,
            json!({"error": "invalid_request", "error_description": "Required metadata header not specified"}),
            &[],
        );
    }
    let token = format!("tok-{}", s.tokens_issued.len() + 1);
    s.tokens_issued.push(token.clone());
    let expires_on = now() + s.token_lifetime;
    reply(
        200,
        json!({
            "access_token": token,
            "client_id": "11111111-1111-1111-1111-111111111111",
            "expires_in": s.token_lifetime.to_string(),
            "expires_on": expires_on.to_string(),
            "ext_expires_in": s.token_lifetime.to_string(),
            "not_before": now().to_string(),
            "resource": "https://management.azure.com",
            "token_type": "Bearer"
        }),
        &[],
    )
}
