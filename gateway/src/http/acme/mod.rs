//! Certificates from an ACME CA (`[tls] acme_domains`), with instant-acme as the RFC 8555 client.
//!
//! - At build, a valid cached certificate covering every name is loaded and served at once
//!   (a restart orders nothing).
//! - [`Acme::run`] orders when there is no certificate and renews when a third of the
//!   certificate's lifetime remains (about 30 days before a 90-day certificate expires); the new
//!   certificate is written to the cache and swapped into the running TLS configuration.
//! - Names are proved with HTTP-01: the plain HTTP listener (`listen.http`, port 80 in
//!   production) answers `/.well-known/acme-challenge/TOKEN` from [`Challenges`] before it
//!   redirects to HTTPS. Answers are also written to the cache directory, so replicas that share
//!   it answer for each other; an order lock in it lets one replica order at a time.
//! - Until the first certificate arrives, HTTPS handshakes fail with a TLS alert (nothing to
//!   present); SSH and the HTTP listener serve meanwhile.
//! - A failed attempt is logged once, as one error line saying what failed, and retried after
//!   1 min, doubling up to 1 h. The account key is written only to the cache, never logged.

mod cache;

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use bytes::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, BytesResponse, ChallengeType,
    Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use tokio::sync::{Notify, watch};

pub use cache::CacheDir;

use super::tls::{self, ServedCert};

/// Path prefix of HTTP-01 challenge requests.
pub const CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// First wait after a failed attempt; doubled after each further failure.
const FIRST_RETRY: Duration = Duration::from_secs(60);
/// Longest wait between attempts.
const MAX_RETRY: Duration = Duration::from_secs(3600);
/// Wait while another replica holds the order lock.
const LOCKED_RETRY: Duration = Duration::from_secs(10);
/// The cache is re-read at least this often (a replica sharing it may have renewed).
const RECHECK_EVERY: Duration = Duration::from_secs(3600);
/// One attempt (account, order, validation, certificate) may take this long.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(300);
/// One HTTP exchange with the ACME server may take this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// `[tls] acme_*` as the ACME side's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeSettings {
    /// Names on the certificate (`tls.acme_domains`).
    pub domains: Vec<String>,
    /// Directory URL (`tls.acme_directory`).
    pub directory: String,
    /// Contact address (`tls.acme_email`).
    pub email: Option<String>,
    /// Cache directory (`tls.acme_cache`).
    pub cache: PathBuf,
    /// Extra CA certificates to trust for the directory (`tls.acme_directory_ca`).
    pub directory_ca: Option<PathBuf>,
    /// Who holds the order lock (the replica id or host name), written into the lock file.
    pub owner: String,
}

/// The HTTP-01 answers being served: token → key authorization.
#[derive(Debug)]
pub struct Challenges {
    live: Mutex<HashMap<String, String>>,
    cache: CacheDir,
}

impl Challenges {
    /// The body to answer `GET /.well-known/acme-challenge/{token}` with, if the token is one of
    /// ours (or of a replica sharing the cache directory).
    pub fn answer(&self, token: &str) -> Option<String> {
        let live = self
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(token)
            .cloned();
        live.or_else(|| self.cache.get_challenge(token))
    }

    fn put(&self, token: &str, key_authorization: &str) {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(token.to_owned(), key_authorization.to_owned());
        if let Err(e) = self.cache.put_challenge(token, key_authorization) {
            tracing::warn!(
                "ACME: cannot write the HTTP-01 answer to {} ({e}); only this replica answers it",
                self.cache.dir().display()
            );
        }
    }

    fn clear(&self) {
        let tokens: Vec<String> = self
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .map(|(t, _)| t)
            .collect();
        for token in tokens {
            self.cache.remove_challenge(&token);
        }
    }
}

/// The ACME certificate manager of the HTTPS listener.
pub struct Acme {
    settings: AcmeSettings,
    cache: CacheDir,
    http: AcmeHttp,
    served: Arc<ServedCert>,
    challenges: Arc<Challenges>,
    /// Modification time of the cached `cert.pem` last loaded.
    loaded_stamp: Mutex<Option<SystemTime>>,
}

impl std::fmt::Debug for Acme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acme")
            .field("domains", &self.settings.domains)
            .field("directory", &self.settings.directory)
            .finish_non_exhaustive()
    }
}

impl Acme {
    /// Prepares the client (reading `tls.acme_directory_ca`) and serves a valid cached
    /// certificate at once. Writes nothing, so `check-config` runs it too.
    pub fn new(settings: AcmeSettings, served: Arc<ServedCert>) -> anyhow::Result<Arc<Self>> {
        let http = AcmeHttp::new(settings.directory_ca.as_deref())?;
        let cache = CacheDir::new(&settings.cache, &settings.directory);
        let acme = Arc::new(Self {
            challenges: Arc::new(Challenges {
                live: Mutex::new(HashMap::new()),
                cache: cache.clone(),
            }),
            cache,
            http,
            served,
            settings,
            loaded_stamp: Mutex::new(None),
        });
        if acme.load_cached() {
            tracing::info!(
                path = %acme.cache.cert().display(),
                "ACME: serving the cached certificate"
            );
        }
        Ok(acme)
    }

    /// The HTTP-01 answers, for the plain HTTP listener.
    pub fn challenges(&self) -> Arc<Challenges> {
        self.challenges.clone()
    }

    /// Loads the cached certificate when it changed since the last load and is usable: it
    /// parses, its key matches, it covers every name and has not expired. Returns whether a
    /// certificate was loaded.
    fn load_cached(&self) -> bool {
        let cert = self.cache.cert();
        let stamp = std::fs::metadata(&cert).and_then(|m| m.modified()).ok();
        if stamp.is_none() {
            return false;
        }
        {
            let loaded = self
                .loaded_stamp
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if *loaded == stamp && self.served.current().is_some() {
                return false;
            }
        }
        let ck = match tls::load_certified_key(&cert, &self.cache.key()) {
            Ok(ck) => ck,
            Err(e) => {
                tracing::warn!("ACME: ignoring the cached certificate: {e:#}");
                return false;
            }
        };
        if let Err(why) = self.usable(&ck, SystemTime::now()) {
            tracing::info!(path = %cert.display(), "ACME: not using the cached certificate: {why}");
            return false;
        }
        self.served.store(ck);
        *self
            .loaded_stamp
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = stamp;
        true
    }

    /// Why `ck` cannot be served for our names now, if it cannot.
    fn usable(&self, ck: &CertifiedKey, now: SystemTime) -> Result<(), String> {
        let names = tls::dns_names(ck);
        let missing: Vec<&String> = self
            .settings
            .domains
            .iter()
            .filter(|d| !names.contains(&d.to_ascii_lowercase()))
            .collect();
        if !missing.is_empty() {
            return Err(format!("it does not cover {missing:?}"));
        }
        match tls::validity(ck) {
            Some(v) if v.not_after > now => Ok(()),
            Some(_) => Err("it has expired".into()),
            None => Err("its validity cannot be read".into()),
        }
    }

    /// Time until the served certificate should be renewed (zero: now, or there is none).
    fn renew_in(&self, now: SystemTime) -> Duration {
        let Some(v) = self.served.current().and_then(|ck| tls::validity(&ck)) else {
            return Duration::ZERO;
        };
        renew_at(v).duration_since(now).unwrap_or(Duration::ZERO)
    }

    /// Orders the first certificate and renews it, until `shutdown`. `asked` (SIGHUP) re-reads
    /// the cache and retries a failed attempt at once.
    pub async fn run(self: Arc<Self>, asked: Arc<Notify>, mut shutdown: watch::Receiver<bool>) {
        let mut failures: u32 = 0;
        let mut retry_at: Option<Instant> = None;
        loop {
            let wait = match retry_at {
                Some(at) => at.saturating_duration_since(Instant::now()),
                None => self.renew_in(SystemTime::now()),
            };
            if !wait.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(wait.min(RECHECK_EVERY)) => {}
                    () = asked.notified() => retry_at = None,
                    r = shutdown.changed() => if r.is_err() || *shutdown.borrow() { return },
                }
                if self.load_cached() {
                    tracing::info!("ACME: loaded a newer certificate from the cache");
                }
                if retry_at.is_some_and(|at| at > Instant::now())
                    || (retry_at.is_none() && !self.renew_in(SystemTime::now()).is_zero())
                {
                    continue;
                }
            }
            let renewing = self.served.current().is_some();
            let attempt = tokio::select! {
                r = tokio::time::timeout(ATTEMPT_TIMEOUT, self.attempt()) => r
                    .unwrap_or_else(|_| Err(Failure::Error(anyhow::anyhow!(
                        "no certificate within {}s", ATTEMPT_TIMEOUT.as_secs()
                    )))),
                r = shutdown.changed() => if r.is_err() || *shutdown.borrow() { return } else { continue },
            };
            self.challenges.clear();
            match attempt {
                Ok(Obtained::Issued(v)) => {
                    failures = 0;
                    retry_at = None;
                    tracing::info!(
                        domains = ?self.settings.domains,
                        not_after = %httpdate::fmt_http_date(v.not_after),
                        renew_after = %httpdate::fmt_http_date(renew_at(v)),
                        "ACME: {} certificate installed",
                        if renewing { "renewed" } else { "new" }
                    );
                }
                Ok(Obtained::FromCache) => {
                    failures = 0;
                    retry_at = None;
                    tracing::info!(
                        "ACME: another replica renewed the certificate; loaded it from the cache"
                    );
                }
                Err(Failure::Locked) => {
                    retry_at = Some(Instant::now() + LOCKED_RETRY);
                    tracing::info!(
                        path = %self.cache.dir().display(),
                        "ACME: another replica is ordering (order.lock is held); checking again in {}s",
                        LOCKED_RETRY.as_secs()
                    );
                }
                Err(Failure::Error(e)) => {
                    failures = failures.saturating_add(1);
                    let delay = retry_delay(failures);
                    retry_at = Some(Instant::now() + delay);
                    tracing::error!(
                        domains = ?self.settings.domains,
                        directory = %self.settings.directory,
                        attempt = failures,
                        retry_in = %humantime::format_duration(delay),
                        "ACME: could not {} the certificate: {e:#}",
                        if renewing { "renew" } else { "get" }
                    );
                }
            }
        }
    }

    /// One attempt: takes the order lock, re-reads the cache, then orders.
    async fn attempt(&self) -> Result<Obtained, Failure> {
        self.cache.create().with_context(|| {
            format!(
                "tls.acme_cache: cannot create {} (let the user poolgate runs as create it, or \
                 point tls.acme_cache elsewhere)",
                self.cache.dir().display()
            )
        })?;
        let _lock = self
            .cache
            .lock(&self.settings.owner)
            .with_context(|| {
                format!(
                    "tls.acme_cache: cannot create the order lock in {}",
                    self.cache.dir().display()
                )
            })?
            .ok_or(Failure::Locked)?;
        if self.load_cached() && !self.renew_in(SystemTime::now()).is_zero() {
            return Ok(Obtained::FromCache);
        }
        let v = self.order().await?;
        Ok(Obtained::Issued(v))
    }

    /// The account from the cache, or a new one registered (and cached) now.
    async fn account(&self) -> anyhow::Result<Account> {
        let path = self.cache.account();
        let directory = &self.settings.directory;
        if let Ok(text) = std::fs::read(&path) {
            match serde_json::from_slice::<AccountCredentials>(&text) {
                Ok(credentials) => {
                    return Account::builder_with_http(Box::new(self.http.clone()))
                        .from_credentials(credentials)
                        .await
                        .with_context(|| format!("cannot reach the ACME directory {directory}"));
                }
                Err(_) => tracing::warn!(
                    path = %path.display(),
                    "ACME: the cached account is unreadable; registering a new account"
                ),
            }
        }
        let contact = self.settings.email.as_ref().map(|e| format!("mailto:{e}"));
        let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
        let (account, credentials) = Account::builder_with_http(Box::new(self.http.clone()))
            .create(
                &NewAccount {
                    contact: &contacts,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                directory.clone(),
                None,
            )
            .await
            .with_context(|| format!("cannot register an ACME account at {directory}"))?;
        let json = serde_json::to_vec(&credentials).context("cannot encode the ACME account")?;
        CacheDir::write_private(&path, &json)
            .with_context(|| format!("tls.acme_cache: cannot write {}", path.display()))?;
        tracing::info!(id = account.id(), "ACME: registered a new account");
        Ok(account)
    }

    /// Orders a certificate for every name, proves them by HTTP-01, stores and serves it.
    async fn order(&self) -> anyhow::Result<tls::Validity> {
        let account = self.account().await?;
        let identifiers: Vec<Identifier> = self
            .settings
            .domains
            .iter()
            .map(|d| Identifier::Dns(d.clone()))
            .collect();
        let mut order = match account.new_order(&NewOrder::new(&identifiers)).await {
            Ok(order) => order,
            Err(instant_acme::Error::Api(p))
                if p.r#type.as_deref()
                    == Some("urn:ietf:params:acme:error:accountDoesNotExist") =>
            {
                // The CA forgot the account (a test CA restarted): register again next time.
                let _ = std::fs::remove_file(self.cache.account());
                anyhow::bail!(
                    "the ACME CA does not know the cached account ({p}); a new account is \
                     registered at the next attempt"
                );
            }
            Err(e) => return Err(explain(e)).context("the ACME CA refused the order"),
        };
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz
                .map_err(explain)
                .context("cannot read an authorization")?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => anyhow::bail!("the authorization for {} is {other:?}", authz.identifier()),
            }
            let name = authz.identifier().to_string();
            let mut challenge = authz
                .challenge(ChallengeType::Http01)
                .with_context(|| format!("the ACME CA offers no HTTP-01 challenge for {name}"))?;
            self.challenges
                .put(&challenge.token, challenge.key_authorization().as_str());
            challenge
                .set_ready()
                .await
                .map_err(explain)
                .with_context(|| format!("the HTTP-01 challenge for {name} failed"))?;
        }
        let retries = RetryPolicy::new()
            .initial_delay(Duration::from_millis(250))
            .backoff(1.5)
            .timeout(Duration::from_secs(120));
        let status = order
            .poll_ready(&retries)
            .await
            .map_err(explain)
            .context("waiting for the ACME CA to validate the names")?;
        if status != OrderStatus::Ready {
            let mut why = Vec::new();
            let mut authorizations = order.authorizations();
            while let Some(Ok(authz)) = authorizations.next().await {
                for c in &authz.challenges {
                    if let Some(error) = &c.error {
                        why.push(format!("{}: {error}", authz.identifier()));
                    }
                }
            }
            anyhow::bail!(
                "the order is {status:?}{} (the CA must reach http://NAME/.well-known/acme-challenge/ \
                 on port 80 of every name, answered by listen.http)",
                if why.is_empty() {
                    String::new()
                } else {
                    format!(": {}", why.join("; "))
                }
            );
        }
        let key = rcgen::KeyPair::generate().context("cannot generate the certificate key")?;
        let csr = rcgen::CertificateParams::new(self.settings.domains.clone())
            .and_then(|params| params.serialize_request(&key))
            .context("cannot make the certificate signing request")?;
        order
            .finalize_csr(csr.der())
            .await
            .map_err(explain)
            .context("the ACME CA refused to finalize the order")?;
        let chain = order
            .poll_certificate(&retries)
            .await
            .map_err(explain)
            .context("waiting for the certificate")?;
        let key_pem = key.serialize_pem();
        let ck = certified_key(&chain, &key_pem)?;
        let v = tls::validity(&ck).context("the issued certificate has no readable validity")?;
        CacheDir::write_private(&self.cache.key(), key_pem.as_bytes()).with_context(|| {
            format!(
                "tls.acme_cache: cannot write {}",
                self.cache.key().display()
            )
        })?;
        CacheDir::write_private(&self.cache.cert(), chain.as_bytes()).with_context(|| {
            format!(
                "tls.acme_cache: cannot write {}",
                self.cache.cert().display()
            )
        })?;
        self.served.store(ck);
        let stamp = std::fs::metadata(self.cache.cert())
            .and_then(|m| m.modified())
            .ok();
        *self
            .loaded_stamp
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = stamp;
        Ok(v)
    }
}

enum Obtained {
    Issued(tls::Validity),
    FromCache,
}

enum Failure {
    Locked,
    Error(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Self::Error(e)
    }
}

/// An instant-acme error as an error whose chain says what happened (a rate limit, a refused
/// connection) rather than only "client error".
fn explain(e: instant_acme::Error) -> anyhow::Error {
    match e {
        instant_acme::Error::Api(p)
            if p.r#type.as_deref() == Some("urn:ietf:params:acme:error:rateLimited") =>
        {
            anyhow::anyhow!("rate limited by the ACME CA: {p}")
        }
        other => anyhow::Error::new(other),
    }
}

/// The chain and key as a signing key, checked to belong together.
fn certified_key(chain_pem: &str, key_pem: &str) -> anyhow::Result<CertifiedKey> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .context("the ACME CA sent a certificate chain that is not PEM")?;
    anyhow::ensure!(
        !chain.is_empty(),
        "the ACME CA sent an empty certificate chain"
    );
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .context("cannot read back the certificate key")?;
    let signing = rustls::crypto::aws_lc_rs::default_provider()
        .key_provider
        .load_private_key(key)
        .context("cannot load the certificate key")?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match()
        .context("the issued certificate does not match its key")?;
    Ok(ck)
}

/// When a certificate valid over `v` is renewed: when a third of its lifetime remains.
pub fn renew_at(v: tls::Validity) -> SystemTime {
    let lifetime = v
        .not_after
        .duration_since(v.not_before)
        .unwrap_or(Duration::ZERO);
    v.not_after
        .checked_sub(lifetime / 3)
        .unwrap_or(v.not_before)
}

/// The wait after the `failures`-th failure in a row: 1 min, 2 min, 4 min, … at most 1 h.
fn retry_delay(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FIRST_RETRY.saturating_mul(1 << doublings).min(MAX_RETRY)
}

/// The HTTPS client instant-acme talks to the CA through: hyper with rustls (aws-lc-rs),
/// trusting the system's CA certificates plus `tls.acme_directory_ca`.
#[derive(Clone)]
struct AcmeHttp {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, BodyWrapper<Bytes>>,
}

impl AcmeHttp {
    fn new(directory_ca: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        let (_, _) =
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        if let Some(ca) = directory_ca {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
                .with_context(|| format!("tls.acme_directory_ca: cannot read {}", ca.display()))?
                .collect::<Result<_, _>>()
                .with_context(|| {
                    format!(
                        "tls.acme_directory_ca: {} is not a PEM certificate file",
                        ca.display()
                    )
                })?;
            let (added, _) = roots.add_parsable_certificates(certs);
            anyhow::ensure!(
                added > 0,
                "tls.acme_directory_ca: {} holds no usable CA certificate",
                ca.display()
            );
        }
        let config = rustls::ClientConfig::builder_with_provider(
            rustls::crypto::aws_lc_rs::default_provider().into(),
        )
        .with_safe_default_protocol_versions()
        .context("TLS client for ACME")?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_only()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        Ok(Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
        })
    }
}

impl instant_acme::HttpClient for AcmeHttp {
    fn request(
        &self,
        req: hyper::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let uri = req.uri().clone();
        let fut = self.client.request(req);
        Box::pin(async move {
            match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
                Ok(Ok(resp)) => Ok(BytesResponse::from(resp)),
                Ok(Err(e)) => Err(instant_acme::Error::Other(
                    anyhow::Error::new(e)
                        .context(format!("request to {uri} failed"))
                        .into(),
                )),
                Err(_) => Err(instant_acme::Error::Other(
                    format!(
                        "request to {uri} got no answer within {}s",
                        REQUEST_TIMEOUT.as_secs()
                    )
                    .into(),
                )),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_when_a_third_of_the_lifetime_remains() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let v = tls::Validity {
            not_before: t0,
            not_after: t0 + Duration::from_secs(90 * 86400),
        };
        assert_eq!(renew_at(v), t0 + Duration::from_secs(60 * 86400));
    }

    #[test]
    fn challenges_are_answered_from_memory_and_from_a_shared_cache() {
        let tmp = tempfile::tempdir().unwrap();
        let directory = "https://ca.example/dir";
        let cache = CacheDir::new(tmp.path(), directory);
        cache.create().unwrap();
        let ours = Challenges {
            live: Mutex::new(HashMap::new()),
            cache: cache.clone(),
        };
        // Another replica with the same (shared) cache directory.
        let theirs = Challenges {
            live: Mutex::new(HashMap::new()),
            cache: CacheDir::new(tmp.path(), directory),
        };
        ours.put("tok-1", "tok-1.thumbprint");
        assert_eq!(ours.answer("tok-1").as_deref(), Some("tok-1.thumbprint"));
        assert_eq!(theirs.answer("tok-1").as_deref(), Some("tok-1.thumbprint"));
        assert_eq!(theirs.answer("../account.json"), None);
        ours.clear();
        assert_eq!(ours.answer("tok-1"), None);
        assert_eq!(theirs.answer("tok-1"), None);
    }

    #[test]
    fn retries_back_off_from_one_minute_to_one_hour() {
        let waits: Vec<u64> = (1..=8).map(|n| retry_delay(n).as_secs()).collect();
        assert_eq!(waits, [60, 120, 240, 480, 960, 1920, 3600, 3600]);
        assert_eq!(retry_delay(u32::MAX), MAX_RETRY);
    }
}
