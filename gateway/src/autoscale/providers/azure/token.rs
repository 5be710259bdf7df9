//! ARM access tokens from `azure_identity` 1.x, sent over the provider's own hyper client.
//!
//! azure_identity builds each credential on an azure_core pipeline whose transport is
//! pluggable. We plug in [`HyperTransport`] so the crate needs no reqwest, and so
//! `pool.azure.identity_endpoint` can point the managed-identity (IMDS) request elsewhere — the
//! seam the tests use to reach an in-process token endpoint. Tokens are cached by the ARM
//! pipeline's bearer-token policy (azure_core): one is reused until five minutes before it
//! expires, then fetched again — which matters most for the Azure CLI credential, which itself
//! caches nothing and runs `az` on every request.
//!
//! The cloud (`pool.azure.cloud`, `authority_host`) goes to azure_identity as its
//! `CloudConfiguration`, so every Entra ID credential signs in at that cloud's authority.

use std::sync::Arc;
use std::time::Duration;

use azure_core::cloud::{CloudConfiguration, CustomConfiguration};
use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use azure_core::http::headers::{HeaderName, HeaderValue, Headers};
use azure_core::http::{
    AsyncRawResponse, ClientMethodOptions, ClientOptions, HttpClient, Method, Transport, Url,
};
use azure_identity::{
    AzureCliCredential, AzureCliCredentialOptions, ClientAssertion, ClientAssertionCredential,
    ClientAssertionCredentialOptions, ClientSecretCredential, ClientSecretCredentialOptions,
    ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId,
    WorkloadIdentityCredential, WorkloadIdentityCredentialOptions,
};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use poolgate_config::{Azure, AzureCloud, Credential};

use super::arm::HyperClient;
use crate::autoscale::providers::ProviderError;

/// Where a VM's managed identity gets tokens (IMDS).
pub const IMDS_TOKEN_ENDPOINT: &str = "http://169.254.169.254/metadata/identity/oauth2/token";

/// Largest response (ARM's or a token endpoint's) we read: a page of 1000 instances with
/// instance views is ~2 MiB.
const MAX_RESPONSE: usize = 32 << 20;

/// A client assertion (certificate credential) is valid this long; Entra ID accepts up to ten
/// minutes of skew, and a new one is signed for every token request.
const ASSERTION_LIFETIME: Duration = Duration::from_secs(10 * 60);

/// The credential named by `pool.azure.credential`, and the ARM scope its tokens are for.
#[derive(Clone)]
pub struct TokenSource {
    /// The credential, its errors carrying what to check.
    pub credential: Arc<dyn TokenCredential>,
    /// `{ARM endpoint}/.default`.
    pub scope: String,
    kind: &'static str,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource")
            .field("kind", &self.kind)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// The token scope for an ARM endpoint: `{endpoint}/.default`.
pub fn arm_scope(arm_endpoint: &str) -> String {
    format!("{}/.default", arm_endpoint.trim_end_matches('/'))
}

/// The Entra ID authority credentials sign in at: `authority_host`, else the cloud's.
pub fn authority_host(config: &Azure) -> String {
    if let Some(host) = &config.authority_host {
        return host.trim_end_matches('/').to_owned();
    }
    match config.cloud {
        AzureCloud::Public => "https://login.microsoftonline.com",
        AzureCloud::UsGovernment => "https://login.microsoftonline.us",
        AzureCloud::China => "https://login.chinacloudapi.cn",
    }
    .to_owned()
}

/// azure_identity's name for the configured cloud.
fn cloud_configuration(config: &Azure) -> CloudConfiguration {
    if let Some(host) = &config.authority_host {
        let mut custom = CustomConfiguration::default();
        custom.authority_host = host.trim_end_matches('/').to_owned();
        return CloudConfiguration::Custom(custom);
    }
    match config.cloud {
        AzureCloud::Public => CloudConfiguration::AzurePublic,
        AzureCloud::UsGovernment => CloudConfiguration::AzureGovernment,
        AzureCloud::China => CloudConfiguration::AzureChina,
    }
}

fn token_error(kind: &str, message: impl Into<String>) -> ProviderError {
    ProviderError {
        provider: "azure-vmss",
        operation: "token".into(),
        message: format!("{kind}: {}", message.into()),
        no_capacity: false,
    }
}

/// `tenant_id` and `client_id`, which `credential` needs.
fn tenant_and_client(config: &Azure, kind: &str) -> Result<(String, String), ProviderError> {
    match (config.tenant_id.clone(), config.client_id.clone()) {
        (Some(tenant), Some(client)) => Ok((tenant, client)),
        _ => Err(token_error(
            kind,
            "pool.azure.tenant_id and pool.azure.client_id are required",
        )),
    }
}

impl TokenSource {
    /// The credential named by `pool.azure.credential`, sending its requests through `http`;
    /// one token request may take `timeout` (`None`: as long as it takes).
    pub fn from_config(
        config: &Azure,
        http: HyperClient,
        timeout: Option<Duration>,
    ) -> Result<Self, ProviderError> {
        Self::with_cli_executor(config, http, timeout, None)
    }

    /// The same, running the Azure CLI through `executor` (tests; `None`: a tokio process).
    pub fn with_cli_executor(
        config: &Azure,
        http: HyperClient,
        timeout: Option<Duration>,
        executor: Option<Arc<dyn azure_identity::Executor>>,
    ) -> Result<Self, ProviderError> {
        let scope = arm_scope(config.resource_manager());
        let options = |redirect| client_options(http.clone(), redirect, timeout, config);
        let (kind, credential): (&'static str, Arc<dyn TokenCredential>) = match config.credential {
            Credential::ManagedIdentity => {
                let kind = "managed identity";
                let redirect = match &config.identity_endpoint {
                    Some(url) => Some(Url::parse(url).map_err(|e| {
                        token_error(
                            kind,
                            format!("pool.azure.identity_endpoint {url:?} is not a URL: {e}"),
                        )
                    })?),
                    None => None,
                };
                let options = ManagedIdentityCredentialOptions {
                    user_assigned_id: config.client_id.clone().map(UserAssignedId::ClientId),
                    client_options: options(redirect),
                };
                let credential = ManagedIdentityCredential::new(Some(options))
                    .map_err(|e| token_error(kind, e.to_string()))?;
                (kind, credential)
            }
            Credential::ClientSecret => {
                let kind = "client secret";
                let (tenant, client_id) = tenant_and_client(config, kind)?;
                let Some(path) = config.client_secret_file.as_ref() else {
                    return Err(token_error(
                        kind,
                        "pool.azure.client_secret_file is required",
                    ));
                };
                let secret = std::fs::read_to_string(path).map_err(|e| {
                    token_error(
                        kind,
                        format!(
                            "cannot read pool.azure.client_secret_file {}: {e}",
                            path.display()
                        ),
                    )
                })?;
                let options = ClientSecretCredentialOptions {
                    client_options: options(None),
                };
                let credential = ClientSecretCredential::new(
                    &tenant,
                    client_id,
                    secret.trim().to_owned().into(),
                    Some(options),
                )
                .map_err(|e| token_error(kind, e.to_string()))?;
                (kind, credential)
            }
            Credential::ClientCertificate => {
                let kind = "client certificate";
                let (tenant, client_id) = tenant_and_client(config, kind)?;
                let Some(path) = config.client_certificate_file.as_ref() else {
                    return Err(token_error(
                        kind,
                        "pool.azure.client_certificate_file is required",
                    ));
                };
                let pem = std::fs::read(path).map_err(|e| {
                    token_error(
                        kind,
                        format!(
                            "cannot read pool.azure.client_certificate_file {}: {e}",
                            path.display()
                        ),
                    )
                })?;
                let audience = format!("{}/{tenant}/oauth2/v2.0/token", authority_host(config));
                let assertion = CertificateAssertion::from_pem(&pem, client_id.clone(), audience)
                    .map_err(|e| {
                    token_error(
                        kind,
                        format!("pool.azure.client_certificate_file {}: {e}", path.display()),
                    )
                })?;
                let options = ClientAssertionCredentialOptions {
                    client_options: options(None),
                };
                let credential =
                    ClientAssertionCredential::new(tenant, client_id, assertion, Some(options))
                        .map_err(|e| token_error(kind, e.to_string()))?;
                (kind, credential)
            }
            Credential::WorkloadIdentity => {
                let kind = "workload identity";
                let options = WorkloadIdentityCredentialOptions {
                    credential_options: ClientAssertionCredentialOptions {
                        client_options: options(None),
                    },
                    client_id: config.client_id.clone(),
                    tenant_id: config.tenant_id.clone(),
                    token_file_path: config.federated_token_file.clone(),
                };
                let credential = WorkloadIdentityCredential::new(Some(options)).map_err(|e| {
                    token_error(
                        kind,
                        format!(
                            "{e} (set pool.azure.tenant_id, client_id and federated_token_file, or \
                             AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_FEDERATED_TOKEN_FILE)"
                        ),
                    )
                })?;
                (kind, credential)
            }
            Credential::AzureCli => {
                let kind = "azure cli";
                let options = AzureCliCredentialOptions {
                    tenant_id: config.tenant_id.clone(),
                    executor,
                    ..Default::default()
                };
                let credential = AzureCliCredential::new(Some(options))
                    .map_err(|e| token_error(kind, e.to_string()))?;
                (kind, credential)
            }
        };
        Ok(Self {
            credential: Arc::new(Hinted {
                inner: credential,
                kind,
                timeout,
            }),
            scope,
            kind,
        })
    }
}

/// What to check when a credential yields no token.
fn hint(kind: &str) -> &'static str {
    match kind {
        "managed identity" => {
            "is a managed identity assigned to the gateway VM (and, for a user-assigned one, is pool.azure.client_id its client id)?"
        }
        "client secret" => {
            "check pool.azure.tenant_id, client_id and the secret in client_secret_file (it may have expired), and pool.azure.cloud"
        }
        "client certificate" => {
            "check pool.azure.tenant_id, client_id, that the certificate in client_certificate_file is registered on the app and not expired, and pool.azure.cloud"
        }
        "workload identity" => {
            "check that the app or managed identity trusts the token's issuer and subject (a federated identity credential), that the token file is fresh, and pool.azure.cloud"
        }
        _ => "run `az login` as the user running poolgate",
    }
}

/// A credential whose failures say which credential failed and what to check, and which gives
/// up after `timeout`.
#[derive(Debug)]
struct Hinted {
    inner: Arc<dyn TokenCredential>,
    kind: &'static str,
    timeout: Option<Duration>,
}

#[async_trait::async_trait]
impl TokenCredential for Hinted {
    async fn get_token(
        &self,
        scopes: &[&str],
        options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        let fetch = self.inner.get_token(scopes, options);
        let result = match self.timeout {
            None => fetch.await,
            Some(limit) => tokio::time::timeout(limit, fetch)
                .await
                .unwrap_or_else(|_| {
                    Err(azure_core::Error::with_message(
                        azure_core::error::ErrorKind::Credential,
                        format!("no ARM token within {}", humantime::format_duration(limit)),
                    ))
                }),
        };
        result.map_err(|e| {
            azure_core::Error::with_message(
                azure_core::error::ErrorKind::Credential,
                format!("{}: {e}; {}", self.kind, hint(self.kind)),
            )
        })
    }
}

/// The signed JWT a certificate credential presents instead of a secret (Microsoft identity
/// platform, "certificate credentials"): RS256, the certificate's SHA-1 thumbprint as `x5t`,
/// `aud` the tenant's token endpoint, `iss` = `sub` = the client id, a fresh `jti`, valid ten
/// minutes. azure_identity's own certificate credential needs OpenSSL and PKCS#12; this one
/// takes the PEM file `az ad sp create-for-rbac --create-cert` writes and signs with aws-lc-rs
/// through jsonwebtoken, and azure_identity's assertion credential does the token exchange.
struct CertificateAssertion {
    key: jsonwebtoken::EncodingKey,
    header: jsonwebtoken::Header,
    client_id: String,
    audience: String,
}

impl std::fmt::Debug for CertificateAssertion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAssertion")
            .field("x5t", &self.header.x5t)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

impl CertificateAssertion {
    /// From a PEM file holding an RSA private key and the certificate registered on the app
    /// (the first certificate in the file; chains may follow).
    fn from_pem(pem: &[u8], client_id: String, audience: String) -> Result<Self, String> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let certificate = CertificateDer::pem_slice_iter(pem)
            .next()
            .ok_or("holds no certificate (-----BEGIN CERTIFICATE-----)")?
            .map_err(|e| format!("its certificate is not valid PEM: {e}"))?;
        let key_block = private_key_block(pem)
            .ok_or("holds no private key (-----BEGIN PRIVATE KEY----- or RSA PRIVATE KEY)")?;
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(key_block).map_err(|e| {
            format!("its private key is not an RSA key poolgate can sign with: {e}")
        })?;
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.x5t = Some(data_encoding::BASE64URL_NOPAD.encode(&sha1_digest(&certificate)));
        Ok(Self {
            key,
            header,
            client_id,
            audience,
        })
    }
}

fn sha1_digest(bytes: &[u8]) -> Vec<u8> {
    use sha1::Digest;
    sha1::Sha1::digest(bytes).to_vec()
}

/// The bytes of the first private-key PEM block of a file (from `-----BEGIN` to the end of
/// its `-----END … PRIVATE KEY-----` line).
fn private_key_block(pem: &[u8]) -> Option<&[u8]> {
    let text = std::str::from_utf8(pem).ok()?;
    let begin = text
        .find("-----BEGIN RSA PRIVATE KEY-----")
        .or_else(|| text.find("-----BEGIN PRIVATE KEY-----"))?;
    let rest = &text[begin..];
    let end_marker = if rest.starts_with("-----BEGIN RSA") {
        "-----END RSA PRIVATE KEY-----"
    } else {
        "-----END PRIVATE KEY-----"
    };
    let end = rest.find(end_marker)? + end_marker.len();
    Some(&rest.as_bytes()[..end])
}

#[derive(serde::Serialize)]
struct AssertionClaims<'a> {
    aud: &'a str,
    iss: &'a str,
    sub: &'a str,
    jti: String,
    nbf: u64,
    iat: u64,
    exp: u64,
}

#[async_trait::async_trait]
impl ClientAssertion for CertificateAssertion {
    async fn secret(&self, _: Option<ClientMethodOptions<'_>>) -> azure_core::Result<String> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let claims = AssertionClaims {
            aud: &self.audience,
            iss: &self.client_id,
            sub: &self.client_id,
            jti: data_encoding::HEXLOWER.encode(&rand::random::<[u8; 16]>()),
            nbf: now,
            iat: now,
            exp: now + ASSERTION_LIFETIME.as_secs(),
        };
        jsonwebtoken::encode(&self.header, &claims, &self.key).map_err(|e| {
            azure_core::Error::with_message(
                azure_core::error::ErrorKind::Credential,
                format!("cannot sign the client assertion: {e}"),
            )
        })
    }
}

fn client_options(
    http: HyperClient,
    redirect: Option<Url>,
    timeout: Option<Duration>,
    config: &Azure,
) -> ClientOptions {
    ClientOptions {
        transport: Some(Transport::new(Arc::new(HyperTransport {
            http,
            redirect,
            timeout,
        }))),
        cloud: Some(Arc::new(cloud_configuration(config))),
        ..Default::default()
    }
}

/// azure_core transport over the provider's hyper client: every ARM call and every token request
/// goes through one. With `redirect`, requests for the IMDS token endpoint go to that URL instead
/// (the query is kept).
#[derive(Clone)]
pub struct HyperTransport {
    http: HyperClient,
    redirect: Option<Url>,
    /// One exchange (request, response head and body) may take this long (`None`: no limit).
    /// Running out is not retried by the pipeline: the driver asks again on its next tick.
    timeout: Option<Duration>,
}

impl std::fmt::Debug for HyperTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HyperTransport")
            .field("redirect", &self.redirect.as_ref().map(Url::as_str))
            .finish_non_exhaustive()
    }
}

impl HyperTransport {
    /// A transport over `http`, each exchange bounded by `timeout`.
    pub fn new(http: HyperClient, timeout: Option<Duration>) -> Self {
        Self {
            http,
            redirect: None,
            timeout,
        }
    }

    fn target(&self, url: &Url) -> Url {
        let Some(to) = &self.redirect else {
            return url.clone();
        };
        let mut plain = url.clone();
        plain.set_query(None);
        if plain.as_str() != IMDS_TOKEN_ENDPOINT {
            return url.clone();
        }
        let mut target = to.clone();
        target.set_query(url.query());
        target
    }
}

fn transport_error(message: String) -> azure_core::Error {
    azure_core::Error::with_message(azure_core::error::ErrorKind::Io, message)
}

#[async_trait::async_trait]
impl HttpClient for HyperTransport {
    async fn execute_request(
        &self,
        request: &azure_core::http::Request,
    ) -> azure_core::Result<AsyncRawResponse> {
        let url = self.target(request.url());
        let method = match request.method() {
            Method::Get => hyper::Method::GET,
            Method::Post => hyper::Method::POST,
            Method::Put => hyper::Method::PUT,
            Method::Patch => hyper::Method::PATCH,
            Method::Delete => hyper::Method::DELETE,
            Method::Head => hyper::Method::HEAD,
            other => return Err(transport_error(format!("unsupported method {other:?}"))),
        };
        let body = match request.body() {
            azure_core::http::Body::Bytes(bytes) => bytes.clone(),
            azure_core::http::Body::SeekableStream(_) => {
                return Err(transport_error(
                    "streamed request bodies are not supported".into(),
                ));
            }
        };
        let mut builder = hyper::Request::builder().method(method).uri(url.as_str());
        for (name, value) in request.headers().iter() {
            builder = builder.header(name.as_str(), value.as_str());
        }
        let hyper_request = builder
            .body(Full::new(body))
            .map_err(|e| transport_error(format!("bad request {url}: {e}")))?;
        let host = url.host_str().unwrap_or_default().to_owned();
        let exchange = async {
            let response = self.http.request(hyper_request).await.map_err(|e| {
                azure_core::Error::with_message(
                    azure_core::error::ErrorKind::Connection,
                    format!("cannot reach {host}: {e}"),
                )
            })?;
            let (parts, body) = response.into_parts();
            let bytes: Bytes = Limited::new(body, MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| transport_error(format!("reading the response from {host}: {e}")))?
                .to_bytes();
            Ok::<_, azure_core::Error>((parts, bytes))
        };
        let (parts, bytes) = match self.timeout {
            None => exchange.await?,
            Some(limit) => tokio::time::timeout(limit, exchange).await.map_err(|_| {
                azure_core::Error::with_message(
                    azure_core::error::ErrorKind::Other,
                    format!(
                        "{host} did not answer within {}",
                        humantime::format_duration(limit)
                    ),
                )
            })??,
        };
        // One field per name in azure_core's headers: repeated ones (ARM sends
        // `x-ms-ratelimit-remaining-resource` once per throttling policy) are joined with
        // commas, as RFC 9110 §5.3 allows for list-valued fields.
        let mut headers = Headers::new();
        for name in parts.headers.keys() {
            let values: Vec<&str> = parts
                .headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            if !values.is_empty() {
                headers.insert(
                    HeaderName::from(name.as_str().to_owned()),
                    HeaderValue::from(values.join(", ")),
                );
            }
        }
        Ok(AsyncRawResponse::from_bytes(
            parts.status.as_u16().into(),
            headers,
            bytes,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_follows_the_arm_endpoint() {
        assert_eq!(
            arm_scope("https://management.azure.com/"),
            "https://management.azure.com/.default"
        );
        assert_eq!(
            arm_scope("https://management.usgovcloudapi.net"),
            "https://management.usgovcloudapi.net/.default"
        );
    }
}
