//! ARM access tokens from `azure_identity` 1.x, sent over the provider's own hyper client.
//!
//! azure_identity builds each credential on an azure_core pipeline whose transport is
//! pluggable. We plug in [`HyperTransport`] so the crate needs no reqwest, and so
//! `pool.azure.identity_endpoint` can point the managed-identity (IMDS) request elsewhere — the
//! seam the tests use to reach an in-process token endpoint. Caching and refresh are the crate's:
//! a token is reused until five minutes before it expires (wall clock), then fetched again.

use std::sync::Arc;

use azure_core::credentials::TokenCredential;
use azure_core::http::headers::{HeaderName, HeaderValue, Headers};
use azure_core::http::{AsyncRawResponse, ClientOptions, HttpClient, Method, Transport, Url};
use azure_identity::{
    AzureCliCredential, AzureCliCredentialOptions, ClientSecretCredential,
    ClientSecretCredentialOptions, ManagedIdentityCredential, ManagedIdentityCredentialOptions,
    UserAssignedId,
};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use poolgate_config::{Azure, Credential};

use super::arm::HyperClient;
use crate::autoscale::providers::ProviderError;

/// Where a VM's managed identity gets tokens (IMDS).
pub const IMDS_TOKEN_ENDPOINT: &str = "http://169.254.169.254/metadata/identity/oauth2/token";

/// Largest token response we read.
const MAX_TOKEN_RESPONSE: usize = 1 << 20;

/// Gets bearer tokens for ARM.
#[derive(Clone)]
pub struct TokenSource {
    credential: Arc<dyn TokenCredential>,
    scope: String,
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

/// The token scope for an ARM endpoint: `{endpoint}/.default` for real (https) clouds, the public
/// cloud's for plain-http test servers.
pub fn arm_scope(arm_endpoint: &str) -> String {
    let base = arm_endpoint.trim_end_matches('/');
    if base.starts_with("https://") {
        format!("{base}/.default")
    } else {
        "https://management.azure.com/.default".to_owned()
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

impl TokenSource {
    /// The credential named by `pool.azure.credential`, sending its requests through `http`.
    pub fn from_config(config: &Azure, http: HyperClient) -> Result<Self, ProviderError> {
        let scope = arm_scope(&config.arm_endpoint);
        let (kind, credential): (&'static str, Arc<dyn TokenCredential>) = match config.credential {
            Credential::ManagedIdentity => {
                let redirect = match &config.identity_endpoint {
                    Some(url) => Some(Url::parse(url).map_err(|e| {
                        token_error(
                            "managed identity",
                            format!("pool.azure.identity_endpoint {url:?} is not a URL: {e}"),
                        )
                    })?),
                    None => None,
                };
                let options = ManagedIdentityCredentialOptions {
                    user_assigned_id: config.client_id.clone().map(UserAssignedId::ClientId),
                    client_options: client_options(http, redirect),
                };
                let credential = ManagedIdentityCredential::new(Some(options))
                    .map_err(|e| token_error("managed identity", e.to_string()))?;
                ("managed identity", credential)
            }
            Credential::ClientSecret => {
                let (Some(tenant), Some(client_id), Some(path)) = (
                    config.tenant_id.as_deref(),
                    config.client_id.clone(),
                    config.client_secret_file.as_ref(),
                ) else {
                    return Err(token_error(
                        "client secret",
                        "tenant_id, client_id and client_secret_file are required",
                    ));
                };
                let secret = std::fs::read_to_string(path).map_err(|e| {
                    token_error(
                        "client secret",
                        format!(
                            "cannot read pool.azure.client_secret_file {}: {e}",
                            path.display()
                        ),
                    )
                })?;
                let options = ClientSecretCredentialOptions {
                    client_options: client_options(http, None),
                };
                let credential = ClientSecretCredential::new(
                    tenant,
                    client_id,
                    secret.trim().to_owned().into(),
                    Some(options),
                )
                .map_err(|e| token_error("client secret", e.to_string()))?;
                ("client secret", credential)
            }
            Credential::AzureCli => {
                let options = AzureCliCredentialOptions {
                    tenant_id: config.tenant_id.clone(),
                    ..Default::default()
                };
                let credential = AzureCliCredential::new(Some(options))
                    .map_err(|e| token_error("azure cli", e.to_string()))?;
                ("azure cli", credential)
            }
        };
        Ok(Self {
            credential,
            scope,
            kind,
        })
    }

    /// What to check when this credential yields no token.
    fn hint(&self) -> &'static str {
        match self.kind {
            "managed identity" => {
                "is a managed identity assigned to the gateway VM (and, for a user-assigned one, is pool.azure.client_id its client id)?"
            }
            "client secret" => {
                "check pool.azure.tenant_id, client_id and the secret in client_secret_file (it may have expired)"
            }
            _ => "run `az login` as the user running poolgate",
        }
    }

    /// A bearer token (cached by the credential until shortly before it expires), waiting at
    /// most `within` (`None`: as long as the credential takes).
    pub async fn bearer(
        &self,
        within: Option<std::time::Duration>,
    ) -> Result<String, ProviderError> {
        let scopes = [self.scope.as_str()];
        let fetch = self.credential.get_token(&scopes, None);
        let result = match within {
            None => fetch.await,
            Some(limit) => tokio::time::timeout(limit, fetch).await.map_err(|_| {
                token_error(
                    self.kind,
                    format!(
                        "no ARM token within {}; {}",
                        humantime::format_duration(limit),
                        self.hint()
                    ),
                )
            })?,
        };
        let token = result.map_err(|e| {
            token_error(
                self.kind,
                format!("cannot get an ARM token: {e}; {}", self.hint()),
            )
        })?;
        Ok(token.token.secret().to_owned())
    }
}

fn client_options(http: HyperClient, redirect: Option<Url>) -> ClientOptions {
    ClientOptions {
        transport: Some(Transport::new(Arc::new(HyperTransport { http, redirect }))),
        ..Default::default()
    }
}

/// azure_core transport over the provider's hyper client. With `redirect`, requests for the IMDS
/// token endpoint go to that URL instead (the query is kept).
#[derive(Clone)]
pub struct HyperTransport {
    http: HyperClient,
    redirect: Option<Url>,
}

impl std::fmt::Debug for HyperTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HyperTransport")
            .field("redirect", &self.redirect.as_ref().map(Url::as_str))
            .finish_non_exhaustive()
    }
}

impl HyperTransport {
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
            .map_err(|e| transport_error(format!("bad token request: {e}")))?;
        let host = url.host_str().unwrap_or_default().to_owned();
        let response = self.http.request(hyper_request).await.map_err(|e| {
            azure_core::Error::with_message(
                azure_core::error::ErrorKind::Connection,
                format!("cannot reach {host}: {e}"),
            )
        })?;
        let (parts, body) = response.into_parts();
        let bytes: Bytes = Limited::new(body, MAX_TOKEN_RESPONSE)
            .collect()
            .await
            .map_err(|e| transport_error(format!("reading the response from {host}: {e}")))?
            .to_bytes();
        let mut headers = Headers::new();
        for (name, value) in &parts.headers {
            if let Ok(value) = value.to_str() {
                headers.insert(
                    HeaderName::from(name.as_str().to_owned()),
                    HeaderValue::from(value.to_owned()),
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
        assert_eq!(
            arm_scope("http://127.0.0.1:1234"),
            "https://management.azure.com/.default"
        );
    }
}
