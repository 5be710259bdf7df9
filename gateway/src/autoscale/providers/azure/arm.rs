//! A small ARM REST client on an azure_core pipeline, paging by `nextLink`, long-running
//! operations (`Azure-AsyncOperation`, else `Location`), and ARM errors turned into messages that
//! say what to do.
//!
//! Every call goes through azure_core's `Pipeline`, as Azure's own Rust clients do: a client
//! request id (`x-ms-client-request-id`, a fresh UUID per call, which Azure support can find in
//! its logs) and the user agent (`poolgate azsdk-rust-poolgate/<version> (…)`) per call, then the retry
//! policy (429, 408, 500, 502, 503, 504 and failed connections; `Retry-After` as seconds or an
//! HTTP date, else exponential backoff; bounded), and per try the bearer-token policy (which
//! caches the token until five minutes before it expires, and refuses to send one over plain
//! http) and [`MeterPolicy`], which counts every try; the transport is our hyper client.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use azure_core::http::policies::auth::BearerTokenAuthorizationPolicy;
use azure_core::http::policies::{Policy, PolicyResult, RetryHeaders, RetryPolicy};
use azure_core::http::{
    ClientOptions, Context, Pipeline, PipelineSendOptions, RetryOptions, Transport,
    UserAgentOptions,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Method, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::token::{HyperTransport, TokenSource};
use crate::autoscale::providers::ProviderError;

/// The hyper client shared by ARM calls and token requests.
pub type HyperClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Pages of a listing we follow at most.
const MAX_PAGES: usize = 100;

/// A client that speaks http and https, trusting the system's CA certificates.
pub fn http_client() -> Result<HyperClient, ProviderError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (added, _) = roots.add_parsable_certificates(native.certs);
    if added == 0 {
        tracing::warn!(
            "no CA certificates found; https to ARM will fail (install ca-certificates)"
        );
    }
    http_client_trusting(roots)
}

/// A client that speaks http and https (h2 or http/1.1 by ALPN, aws-lc-rs), trusting `roots`.
pub fn http_client_trusting(roots: rustls::RootCertStore) -> Result<HyperClient, ProviderError> {
    let config = rustls::ClientConfig::builder_with_provider(
        rustls::crypto::aws_lc_rs::default_provider().into(),
    )
    .with_safe_default_protocol_versions()
    .map_err(|e| error("setup", format!("TLS client: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    // A token endpoint that does not exist (IMDS off Azure) must fail fast, not after the
    // kernel's SYN retries.
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .build(connector))
}

/// Timing of retries and long-running operations.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Retries of a call ARM throttled (429), timed out (408) or failed (500, 502, 503, 504), or
    /// that found no connection, before giving up.
    pub max_retries: u32,
    /// First wait before a retry when the answer has no usable `Retry-After` (doubling per
    /// retry).
    pub default_retry_after: Duration,
    /// Longest wait we accept from `Retry-After`.
    pub max_retry_after: Duration,
    /// Time between polls of a long-running operation when ARM does not say.
    pub poll_every: Duration,
    /// Give up waiting for a long-running operation after this long.
    pub operation_deadline: Duration,
    /// One HTTP exchange (and one token fetch) may take this long; `None`: no limit (tests on
    /// tokio's paused clock, where an idle runtime would jump straight to the deadline).
    pub request_timeout: Option<Duration>,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            max_retries: 4,
            default_retry_after: Duration::from_secs(5),
            max_retry_after: Duration::from_secs(120),
            // Per-scale-set read budgets are small (FIELD-NOTES): ~5 s between polls.
            poll_every: Duration::from_secs(5),
            operation_deadline: Duration::from_secs(30 * 60),
            request_timeout: Some(Duration::from_secs(60)),
        }
    }
}

/// A response with a success (2xx) status.
#[derive(Debug)]
pub struct ArmResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// The ARM client of one scale set.
#[derive(Debug, Clone)]
pub struct Arm {
    pipeline: Pipeline,
    endpoint: String,
    origin: Option<(String, String, u16)>,
    /// "scale set rg/name in subscription s", for messages.
    target: String,
    pub tuning: Tuning,
    /// Where the per-try policy counts requests and throttling budgets.
    meter: Arc<Meter>,
}

/// The call a request belongs to (`list`, `start`, …), in the pipeline's context.
#[derive(Debug, Clone)]
struct CallName(String);

/// Metrics of the ARM requests, attached after the client is built.
#[derive(Debug, Default)]
struct Meter {
    /// `poolgate_azure_requests_total{operation,method,code}`.
    requests: OnceLock<prometheus::IntCounterVec>,
    /// `poolgate_azure_ratelimit_remaining{policy}`.
    remaining: OnceLock<prometheus::IntGaugeVec>,
}

/// Per-try policy: counts each request that went out (each retry and each operation poll too)
/// by its status code, or `unanswered`, and reads ARM's remaining throttling budgets off every
/// answer.
#[derive(Debug)]
struct MeterPolicy(Arc<Meter>);

#[async_trait::async_trait]
impl Policy for MeterPolicy {
    async fn send(
        &self,
        ctx: &Context,
        request: &mut azure_core::http::Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        let result = next[0].send(ctx, request, &next[1..]).await;
        let operation = ctx.value::<CallName>().map_or("", |c| c.0.as_str());
        let method = request.method();
        let code = match &result {
            Ok(response) => u16::from(response.status()).to_string(),
            Err(_) => "unanswered".to_owned(),
        };
        if let Some(requests) = self.0.requests.get() {
            requests
                .with_label_values(&[operation, method.as_str(), code.as_str()])
                .inc();
        }
        if let (Ok(response), Some(gauge)) = (&result, self.0.remaining.get()) {
            // The transport joined the repeated header into one value (token.rs).
            let remaining = response.headers().get_optional_str(&RATELIMIT_REMAINING);
            for (policy, count) in ratelimits(remaining) {
                gauge.with_label_values(&[policy.as_str()]).set(count);
            }
        }
        result
    }
}

/// ARM's remaining calls per throttling policy, on every answer.
const RATELIMIT_REMAINING: azure_core::http::headers::HeaderName =
    azure_core::http::headers::HeaderName::from_static("x-ms-ratelimit-remaining-resource");

/// When to retry and how long to wait: the statuses and transport failures azure_core's retry
/// policy retries, `max_retries` times at most; the wait is what `Retry-After` (or
/// `retry-after-ms`) says, else `default_retry_after` doubling per retry — never more than
/// `max_retry_after`.
#[derive(Debug)]
struct ArmRetry {
    max_retries: u32,
    first_wait: Duration,
    max_wait: Duration,
    headers: RetryHeaders,
}

const RETRY_STATUS: &[azure_core::http::StatusCode] = &[
    azure_core::http::StatusCode::RequestTimeout,
    azure_core::http::StatusCode::TooManyRequests,
    azure_core::http::StatusCode::InternalServerError,
    azure_core::http::StatusCode::BadGateway,
    azure_core::http::StatusCode::ServiceUnavailable,
    azure_core::http::StatusCode::GatewayTimeout,
];

fn to_std(d: azure_core::time::Duration) -> Duration {
    Duration::from_millis(u64::try_from(d.whole_milliseconds()).unwrap_or(0))
}

fn from_std(d: Duration) -> azure_core::time::Duration {
    azure_core::time::Duration::milliseconds(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[async_trait::async_trait]
impl RetryPolicy for ArmRetry {
    fn is_expired(&self, _since_start: azure_core::time::Duration, retry_count: u32) -> bool {
        retry_count >= self.max_retries
    }

    fn retry_headers(&self) -> Option<&RetryHeaders> {
        Some(&self.headers)
    }

    fn retry_status_codes(&self) -> &[azure_core::http::StatusCode] {
        RETRY_STATUS
    }

    fn sleep_duration(&self, retry_count: u32) -> azure_core::time::Duration {
        let doubled = self
            .first_wait
            .saturating_mul(1u32 << retry_count.saturating_sub(1).min(16));
        from_std(doubled.min(self.max_wait))
    }

    async fn wait(&self, retry_count: u32, retry_after: Option<azure_core::time::Duration>) {
        let wait = retry_after
            .map(to_std)
            .unwrap_or_else(|| to_std(self.sleep_duration(retry_count)))
            .min(self.max_wait);
        tracing::info!(retry = retry_count, wait = %humantime::format_duration(wait), "ARM throttled or failed the call; retrying");
        tokio::time::sleep(wait).await;
    }
}

/// The message of the innermost error of a chain.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

/// azure_core's headers as hyper's.
fn header_map(headers: &azure_core::http::headers::Headers) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in headers.iter() {
        if let (Ok(name), Ok(value)) = (
            hyper::header::HeaderName::from_bytes(name.as_str().as_bytes()),
            HeaderValue::from_str(value.as_str()),
        ) {
            map.append(name, value);
        }
    }
    map
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: Option<ErrorDetail>,
    code: Option<String>,
    message: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ErrorDetail {
    code: Option<String>,
    message: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Page<T> {
    #[serde(default = "Vec::new")]
    value: Vec<T>,
    #[serde(rename = "nextLink")]
    next_link: Option<String>,
}

#[derive(Debug, Deserialize)]
struct OperationStatus {
    status: Option<String>,
    error: Option<ErrorDetail>,
}

pub(super) fn error(operation: &str, message: impl Into<String>) -> ProviderError {
    ProviderError {
        provider: "azure-vmss",
        operation: operation.to_owned(),
        message: message.into(),
        no_capacity: false,
    }
}

/// The wait a `Retry-After` header asks for: delta-seconds, or an HTTP date (RFC 9110 §10.2.3
/// allows both; a date already past means "now").
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    retry_after_at(headers, std::time::SystemTime::now())
}

fn retry_after_at(headers: &HeaderMap, now: std::time::SystemTime) -> Option<Duration> {
    let value = headers
        .get(hyper::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Policies a scale set's answers name are few (Compute's documented ones); more than this many
/// distinct names are not exported.
const MAX_POLICIES: usize = 64;

/// The `(policy, remaining calls)` pairs of an answer's `x-ms-ratelimit-remaining-resource`
/// headers: `<source RP>/<policy or bucket>;<count>`, one header per policy or several joined by
/// commas, e.g. `Microsoft.Compute/DeleteVMScaleSet3Min;107` (Microsoft's "Troubleshooting API
/// throttling errors" article for virtual machines, "Call rate informational response
/// headers"). Names that are not plain policy names are skipped.
fn ratelimits<'a>(values: impl IntoIterator<Item = &'a str>) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for text in values {
        for item in text.split(',') {
            let Some((policy, count)) = item.trim().rsplit_once(';') else {
                continue;
            };
            let policy = policy.trim();
            let plain = !policy.is_empty()
                && policy.len() <= 100
                && policy
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-'));
            if let (true, Ok(count)) = (plain, count.trim().parse::<i64>()) {
                out.push((policy.to_owned(), count));
            }
        }
    }
    out.truncate(MAX_POLICIES);
    out
}

/// The origin of an absolute `http(s)` URL: lowercase scheme, lowercase host and effective port
/// (the scheme's default when absent). `None` for anything else, including a URL with user info.
///
/// ARM's Compute listings hand back `nextLink`s that spell the default port, e.g.
/// `https://management.azure.com:443/subscriptions/…/virtualMachineScaleSets/vmss1/virtualMachines?api-version=…&$skiptoken=…`
/// (a real scale-set page link kept in Azure/azure-sdk-for-java's azure-core RestProxy test
/// `doesNotChangeEncodedPath`), so origins are compared, not authority strings.
fn origin_of(url: &str) -> Option<(String, String, u16)> {
    let uri: hyper::Uri = url.parse().ok()?;
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "https" => 443,
        "http" => 80,
        _ => return None,
    };
    let authority = uri.authority()?;
    if authority.as_str().contains('@') {
        return None;
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    let port = match authority.port_u16() {
        Some(port) => port,
        // Written but not a port (out of range): not the default one either. `host:` is.
        None if authority.as_str().len() > authority.host().len() + 1 => return None,
        None => default_port,
    };
    Some((scheme, host.to_ascii_lowercase(), port))
}

impl Arm {
    /// A client for `endpoint` (no trailing slash needed), authenticated by `tokens`.
    pub fn new(
        http: HyperClient,
        tokens: &TokenSource,
        endpoint: &str,
        target: String,
        tuning: Tuning,
    ) -> Self {
        let endpoint = endpoint.trim_end_matches('/').to_owned();
        let origin = origin_of(&endpoint);
        let meter = Arc::new(Meter::default());
        let retry = ArmRetry {
            max_retries: tuning.max_retries,
            first_wait: tuning.default_retry_after,
            max_wait: tuning.max_retry_after,
            headers: RetryHeaders {
                retry_headers: vec![
                    azure_core::http::headers::X_MS_RETRY_AFTER_MS,
                    azure_core::http::headers::RETRY_AFTER_MS,
                    azure_core::http::headers::RETRY_AFTER,
                ],
            },
        };
        let options = ClientOptions {
            transport: Some(Transport::new(Arc::new(HyperTransport::new(
                http,
                tuning.request_timeout,
            )))),
            retry: RetryOptions::custom(Arc::new(retry)),
            user_agent: UserAgentOptions {
                // An RFC 9110 token of at most 24 characters, or azure_core panics.
                application_id: Some("poolgate".to_owned()),
            },
            ..Default::default()
        };
        let bearer =
            BearerTokenAuthorizationPolicy::new(tokens.credential.clone(), [tokens.scope.clone()]);
        let pipeline = Pipeline::new(
            Some("poolgate"),
            Some(env!("CARGO_PKG_VERSION")),
            options,
            Vec::new(),
            vec![Arc::new(bearer), Arc::new(MeterPolicy(meter.clone()))],
            None,
        );
        Self {
            pipeline,
            endpoint,
            origin,
            target,
            tuning,
            meter,
        }
    }

    /// Counts every request (each retry and each operation poll too) in `requests`
    /// (`poolgate_azure_requests_total{operation,method,code}`).
    pub fn count_requests_in(&mut self, requests: prometheus::IntCounterVec) {
        let _ = self.meter.requests.set(requests);
    }

    /// Exports the remaining calls of each throttling policy ARM reports on its answers
    /// (`x-ms-ratelimit-remaining-resource`) in `remaining`
    /// (`poolgate_azure_ratelimit_remaining{policy}`).
    pub fn export_ratelimits_in(&mut self, remaining: prometheus::IntGaugeVec) {
        let _ = self.meter.remaining.set(remaining);
    }

    /// The full URL for a path (starting with `/`) or an absolute URL ARM handed us, which must
    /// point at the same host: the bearer token goes nowhere else.
    fn url(&self, operation: &str, path_or_url: &str) -> Result<String, ProviderError> {
        if path_or_url.starts_with('/') {
            return Ok(format!("{}{path_or_url}", self.endpoint));
        }
        if self.origin.is_some() && origin_of(path_or_url) == self.origin {
            return Ok(path_or_url.to_owned());
        }
        Err(error(
            operation,
            format!(
                "ARM pointed to {path_or_url:?}, which is not on {}; not following it",
                self.endpoint
            ),
        ))
    }

    /// Sends one call through the pipeline (which retries throttled and failed tries, see the
    /// module comment) and returns the response whatever its status.
    async fn send(
        &self,
        operation: &str,
        method: Method,
        path_or_url: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(StatusCode, HeaderMap, Bytes), ProviderError> {
        let url = self.url(operation, path_or_url)?;
        let parsed = azure_core::http::Url::parse(&url)
            .map_err(|e| error(operation, format!("bad request URL {url:?}: {e}")))?;
        let verb = match method {
            Method::GET => azure_core::http::Method::Get,
            Method::POST => azure_core::http::Method::Post,
            Method::PUT => azure_core::http::Method::Put,
            Method::PATCH => azure_core::http::Method::Patch,
            Method::DELETE => azure_core::http::Method::Delete,
            _ => return Err(error(operation, format!("unsupported method {method}"))),
        };
        let mut request = azure_core::http::Request::new(parsed, verb);
        request.insert_header("accept", "application/json");
        if let Some(value) = body {
            let payload = serde_json::to_vec(value)
                .map_err(|e| error(operation, format!("cannot encode the request body: {e}")))?;
            request.insert_header("content-type", "application/json");
            request.set_body(payload);
        }
        let ctx = Context::new().with_value(CallName(operation.to_owned()));
        let options = PipelineSendOptions {
            skip_checks: true,
            ..Default::default()
        };
        let response = self
            .pipeline
            .send(&ctx, &mut request, Some(options))
            .await
            .map_err(|e| self.unanswered(operation, &e))?;
        let (status, headers, bytes) = response.deconstruct();
        let status = StatusCode::from_u16(u16::from(status))
            .map_err(|e| error(operation, format!("ARM answered a bad status: {e}")))?;
        let headers = header_map(&headers);
        let bytes = Bytes::from(bytes);
        if matches!(
            status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) {
            let (code, message) = error_text(&bytes);
            return Err(error(
                operation,
                format!(
                    "ARM answered {status} ({code}: {message}) {} times; giving up for now. \
                     The scale set's request budget is shared by everything that manages it: \
                     raise pool.azure.poll_interval and check for other tools polling {}",
                    self.tuning.max_retries + 1,
                    self.target
                ),
            ));
        }
        Ok((status, headers, bytes))
    }

    /// A call the pipeline could not complete: no token, no connection, no answer in time.
    fn unanswered(&self, operation: &str, e: &azure_core::Error) -> ProviderError {
        // The pipeline wraps the cause in its own context ("retry policy expired…"): say the
        // cause.
        let cause = root_cause(e);
        match e.kind() {
            // The credential's own message (token.rs) names it and says what to check.
            azure_core::error::ErrorKind::Credential => error("token", cause),
            azure_core::error::ErrorKind::Io | azure_core::error::ErrorKind::Connection => error(
                operation,
                format!(
                    "cannot reach ARM at {} (tried {} times): {cause}",
                    self.endpoint,
                    self.tuning.max_retries + 1
                ),
            ),
            _ => error(operation, format!("ARM at {}: {cause}", self.endpoint)),
        }
    }

    /// One call that must succeed (2xx).
    pub async fn call(
        &self,
        operation: &str,
        method: Method,
        path_or_url: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<ArmResponse, ProviderError> {
        let (status, headers, body) = self.send(operation, method, path_or_url, body).await?;
        if status.is_success() {
            Ok(ArmResponse {
                status,
                headers,
                body,
            })
        } else {
            Err(self.failure(operation, status, &body))
        }
    }

    /// GET and decode.
    pub async fn get_json<T: DeserializeOwned>(
        &self,
        operation: &str,
        path: &str,
    ) -> Result<T, ProviderError> {
        let response = self.call(operation, Method::GET, path, None).await?;
        decode(operation, &response.body)
    }

    /// GET a listing and every further page (`nextLink`).
    pub async fn get_pages<T: DeserializeOwned>(
        &self,
        operation: &str,
        path: &str,
    ) -> Result<Vec<T>, ProviderError> {
        let mut items = Vec::new();
        let mut next = Some(path.to_owned());
        let mut pages = 0;
        while let Some(url) = next.take() {
            pages += 1;
            if pages > MAX_PAGES {
                return Err(error(
                    operation,
                    format!("more than {MAX_PAGES} pages; is ARM looping on nextLink?"),
                ));
            }
            let page: Page<T> = self.get_json(operation, &url).await?;
            items.extend(page.value);
            next = page.next_link.filter(|l| !l.is_empty());
        }
        Ok(items)
    }

    /// Starts a long-running operation and waits until it ends.
    pub async fn long_running(
        &self,
        operation: &str,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(), ProviderError> {
        let response = self.call(operation, method, path, body).await?;
        self.wait(operation, &response).await
    }

    /// Follows `Azure-AsyncOperation` (status document) or else `Location` (202 until done) of
    /// a response; a response with neither is already done.
    pub async fn wait(&self, operation: &str, response: &ArmResponse) -> Result<(), ProviderError> {
        let header = |name: &str| {
            response
                .headers
                .get(name)
                .and_then(|v: &HeaderValue| v.to_str().ok())
                .map(str::to_owned)
        };
        let deadline = tokio::time::Instant::now() + self.tuning.operation_deadline;
        let mut wait = retry_after(&response.headers).unwrap_or(self.tuning.poll_every);
        if let Some(url) = header("azure-asyncoperation") {
            loop {
                self.sleep_until_next_poll(operation, wait, deadline)
                    .await?;
                let (status, headers, body) = self.send(operation, Method::GET, &url, None).await?;
                if !status.is_success() {
                    return Err(self.failure(operation, status, &body));
                }
                let doc: OperationStatus = decode(operation, &body)?;
                match doc.status.as_deref().unwrap_or_default() {
                    s if s.eq_ignore_ascii_case("Succeeded") => return Ok(()),
                    s if s.eq_ignore_ascii_case("Failed") || s.eq_ignore_ascii_case("Canceled") => {
                        let (code, message) = doc
                            .error
                            .map(|e| (e.code.unwrap_or_default(), e.message.unwrap_or_default()))
                            .unwrap_or_default();
                        // An allocation failure usually surfaces here, after the 202.
                        return Err(ProviderError {
                            no_capacity: is_allocation_failure(&code),
                            ..error(
                                operation,
                                format!(
                                    "the Azure operation ended {s}: {code}: {message} (see the scale set's activity log)"
                                ),
                            )
                        });
                    }
                    _ => wait = retry_after(&headers).unwrap_or(self.tuning.poll_every),
                }
            }
        }
        if response.status == StatusCode::ACCEPTED
            && let Some(url) = header("location")
        {
            loop {
                self.sleep_until_next_poll(operation, wait, deadline)
                    .await?;
                let (status, headers, body) = self.send(operation, Method::GET, &url, None).await?;
                match status {
                    StatusCode::ACCEPTED => {
                        wait = retry_after(&headers).unwrap_or(self.tuning.poll_every);
                    }
                    s if s.is_success() => return Ok(()),
                    s => return Err(self.failure(operation, s, &body)),
                }
            }
        }
        Ok(())
    }

    async fn sleep_until_next_poll(
        &self,
        operation: &str,
        wait: Duration,
        deadline: tokio::time::Instant,
    ) -> Result<(), ProviderError> {
        if tokio::time::Instant::now() >= deadline {
            return Err(error(
                operation,
                format!(
                    "still running in Azure after {}; poolgate stopped waiting (the operation may still finish: see the scale set's activity log)",
                    humantime::format_duration(self.tuning.operation_deadline)
                ),
            ));
        }
        tokio::time::sleep(wait.min(self.tuning.max_retry_after)).await;
        Ok(())
    }

    /// An error for a non-2xx ARM response, with ARM's code and what to do.
    pub fn failure(&self, operation: &str, status: StatusCode, body: &[u8]) -> ProviderError {
        let (code, message) = error_text(body);
        let quota = message.to_ascii_lowercase().contains("quota");
        let no_capacity = is_allocation_failure(&code);
        let advice = match status {
            StatusCode::FORBIDDEN if code == "LinkedAuthorizationFailed" => format!(
                "the gateway's identity may write to {} but lacks the action ARM names on a linked \
                 resource (the scope after \"linked scope(s)\"); grant that action there, or keep \
                 the write from naming the linked resource; poolgate backs off before trying again",
                self.target
            ),
            _ if no_capacity => {
                "Azure has no capacity for this VM size here right now; poolgate backs off and \
                 tries again (another size or zone in the scale set model avoids it)"
                    .to_owned()
            }
            StatusCode::CONFLICT if quota || code.contains("Quota") => format!(
                "a subscription quota would be exceeded by growing {}; request a quota increase \
                 for the VM family in this region (or lower autoscale max_vms); poolgate backs off \
                 before trying again",
                self.target
            ),
            StatusCode::UNAUTHORIZED => format!(
                "ARM did not accept the token; check that the credential belongs to the tenant of {}",
                self.target
            ),
            StatusCode::FORBIDDEN => format!(
                "the gateway's identity lacks the action ARM names on {}: assign it the \
                 deployment's custom autoscaler role, which has exactly the actions poolgate uses \
                 (deploy/azure), or the built-in 'Virtual Machine Contributor' role \
                 (az role assignment create --assignee <principalId> --role <role> --scope <scale set id>); \
                 poolgate backs off before trying again",
                self.target
            ),
            StatusCode::NOT_FOUND => format!(
                "not found: check pool.azure.subscription_id, resource_group and scale_set ({}), and pool.azure.orchestration",
                self.target
            ),
            StatusCode::CONFLICT => {
                "another operation on the scale set is in progress; poolgate will try again on a later tick".to_owned()
            }
            s if s.is_server_error() => "ARM failed; poolgate will try again on a later tick".to_owned(),
            _ => "ARM refused the request".to_owned(),
        };
        ProviderError {
            no_capacity,
            ..error(operation, format!("{status} {code}: {message} — {advice}"))
        }
    }
}

/// ARM error codes that say the region (or zone) has no capacity for the VM size right now.
pub(super) fn is_allocation_failure(code: &str) -> bool {
    matches!(
        code,
        "AllocationFailed"
            | "ZonalAllocationFailed"
            | "SkuNotAvailable"
            | "OverconstrainedAllocationRequest"
    )
}

/// ARM's error code and message from an error body (either `{"error":{…}}` or bare).
fn error_text(body: &[u8]) -> (String, String) {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(parsed) => {
            let (code, message) = match parsed.error {
                Some(detail) => (detail.code, detail.message),
                None => (parsed.code, parsed.message),
            };
            (
                code.unwrap_or_else(|| "NoCode".to_owned()),
                message.unwrap_or_default(),
            )
        }
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let short: String = text.chars().take(200).collect();
            ("NoCode".to_owned(), short)
        }
    }
}

/// Decodes a JSON body, naming the call when it does not parse.
pub fn decode<T: DeserializeOwned>(operation: &str, body: &[u8]) -> Result<T, ProviderError> {
    serde_json::from_slice(body).map_err(|e| {
        error(
            operation,
            format!("ARM's response is not the documented JSON: {e}"),
        )
    })
}

/// Percent-encodes a query value.
pub fn encode_query(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_and_headers() {
        assert_eq!(
            error_text(br#"{"error":{"code":"AuthorizationFailed","message":"no"}}"#),
            ("AuthorizationFailed".to_owned(), "no".to_owned())
        );
        assert_eq!(
            error_text(br#"{"code":"Conflict","message":"busy"}"#),
            ("Conflict".to_owned(), "busy".to_owned())
        );
        assert_eq!(error_text(b"<html>").0, "NoCode");
        let mut headers = HeaderMap::new();
        headers.insert(hyper::header::RETRY_AFTER, HeaderValue::from_static(" 7 "));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        headers.insert(
            hyper::header::RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        let date = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").expect("date");
        assert_eq!(
            retry_after_at(&headers, date - Duration::from_secs(12)),
            Some(Duration::from_secs(12))
        );
        assert_eq!(
            retry_after_at(&headers, date + Duration::from_secs(5)),
            Some(Duration::ZERO)
        );
        headers.insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn ratelimit_headers_give_the_remaining_calls_per_policy() {
        let mut headers = HeaderMap::new();
        // As in Microsoft's throttling article: one header per policy.
        for value in [
            "Microsoft.Compute/DeleteVMScaleSet3Min;107",
            "Microsoft.Compute/DeleteVMScaleSet30Min;587",
            "Microsoft.Compute/VMScaleSetBatchedVMRequests5Min;3704",
        ] {
            headers.append(
                "x-ms-ratelimit-remaining-resource",
                HeaderValue::from_static(value),
            );
        }
        // Several in one header, and junk that is skipped.
        headers.append(
            "x-ms-ratelimit-remaining-resource",
            HeaderValue::from_static(
                "Microsoft.Compute/HighCostGet3Min;159, Microsoft.Compute/HighCostGet30Min;1277,bad name;3,x;y",
            ),
        );
        assert_eq!(
            ratelimits(
                headers
                    .get_all("x-ms-ratelimit-remaining-resource")
                    .iter()
                    .filter_map(|v| v.to_str().ok())
            ),
            vec![
                ("Microsoft.Compute/DeleteVMScaleSet3Min".to_owned(), 107),
                ("Microsoft.Compute/DeleteVMScaleSet30Min".to_owned(), 587),
                (
                    "Microsoft.Compute/VMScaleSetBatchedVMRequests5Min".to_owned(),
                    3704
                ),
                ("Microsoft.Compute/HighCostGet3Min".to_owned(), 159),
                ("Microsoft.Compute/HighCostGet30Min".to_owned(), 1277),
            ]
        );
    }

    #[test]
    fn origins_compare_scheme_host_and_effective_port() {
        let arm = origin_of("https://management.azure.com");
        assert_eq!(
            arm,
            Some(("https".to_owned(), "management.azure.com".to_owned(), 443))
        );
        for same in [
            "https://management.azure.com:443/subscriptions/s/x?api-version=1&$skiptoken=2",
            "https://management.azure.com/subscriptions/s/x",
            "HTTPS://Management.Azure.com:443/x",
            "https://management.azure.com:/x",
        ] {
            assert_eq!(origin_of(same), arm, "{same}");
        }
        for other in [
            "http://management.azure.com/x",
            "https://management.azure.com:8443/x",
            "https://management.azure.com.evil.example/x",
            "https://evil.example@management.azure.com/x",
            "https://management.azure.com:443@evil.example/x",
            "ftp://management.azure.com/x",
            "https://management.azure.com:99999/x",
            "https:///x",
            "/subscriptions/s",
        ] {
            assert_ne!(origin_of(other), arm, "{other}");
        }
        assert_eq!(
            origin_of("http://[::1]:8080/x"),
            Some(("http".to_owned(), "::1".to_owned(), 8080))
        );
        assert_eq!(
            origin_of("http://127.0.0.1/x"),
            Some(("http".to_owned(), "127.0.0.1".to_owned(), 80))
        );
        assert_eq!(
            encode_query("'virtualMachineScaleSet/id' eq '/s/x'"),
            "%27virtualMachineScaleSet/id%27%20eq%20%27/s/x%27"
        );
    }
}
