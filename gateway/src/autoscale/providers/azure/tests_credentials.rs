//! Credentials and the ARM pipeline against the fake: the certificate and workload identity
//! credentials sign in at the configured cloud's authority (here the fake's Entra ID token
//! endpoint), Azure CLI tokens are cached by the pipeline, every ARM call carries a client
//! request id and poolgate's user agent, and a failed try (500) is retried.

use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use poolgate_config::{Azure, AzureCloud, Credential, Orchestration};

use super::arm::{Arm, Tuning};
use super::fake::{FakeArm, Logged, is_entra_token_path, vmss_path};
use super::tests::{config, provider};
use super::token::{TokenSource, arm_scope, authority_host};
use super::{AzureProvider, Provider};
use crate::metrics::Metrics;

const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
const CLIENT: &str = "22222222-2222-2222-2222-222222222222";

fn paused_tuning() -> Tuning {
    Tuning {
        request_timeout: None,
        ..Tuning::default()
    }
}

fn entra_requests(fake: &FakeArm) -> Vec<Logged> {
    fake.state()
        .log
        .iter()
        .filter(|l| is_entra_token_path(&l.path))
        .cloned()
        .collect()
}

fn write_secret(dir: &tempfile::TempDir, name: &str, content: &[u8]) -> std::path::PathBuf {
    let path = dir.path().join(name);
    let mut file = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(&path)
        .expect("create");
    file.write_all(content).expect("write");
    path
}

#[tokio::test(start_paused = true)]
async fn a_client_certificate_signs_an_assertion_the_certificate_verifies() {
    let fake = FakeArm::start(2, |_| {}).await;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("RSA key");
    let cert = rcgen::CertificateParams::new(vec!["poolgate-sp".to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("certificate");
    let dir = tempfile::tempdir().expect("tempdir");
    // As `az ad sp create-for-rbac --create-cert` writes it: the key, then the certificate.
    let pem = format!("{}{}", key.serialize_pem(), cert.pem());
    let file = write_secret(&dir, "sp.pem", pem.as_bytes());
    let azure = Azure {
        credential: Credential::ClientCertificate,
        tenant_id: Some(TENANT.into()),
        client_id: Some(CLIENT.into()),
        client_certificate_file: Some(file),
        authority_host: Some(fake.url()),
        ..config(&fake, Orchestration::Uniform)
    };
    let p = AzureProvider::with_client(&azure, paused_tuning(), fake.client()).expect("provider");
    assert_eq!(p.list().await.expect("list").len(), 2);

    let token_requests = entra_requests(&fake);
    assert_eq!(token_requests.len(), 1, "one token for the listing");
    let request = &token_requests[0];
    assert_eq!(request.path, format!("/{TENANT}/oauth2/v2.0/token"));
    assert_eq!(
        request.form.get("scope").map(String::as_str),
        Some(arm_scope(&fake.url()).as_str())
    );
    assert!(!request.form.contains_key("client_secret"));
    let assertion = request.form.get("client_assertion").expect("assertion");
    // Signed with the key of the certificate registered on the app, for this tenant's token
    // endpoint, by this client, and naming the certificate by its SHA-1 thumbprint.
    let decoding =
        jsonwebtoken::DecodingKey::from_rsa_pem(cert.pem().as_bytes()).expect("certificate key");
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    let audience = format!("{}/{TENANT}/oauth2/v2.0/token", fake.url());
    validation.set_audience(&[audience.as_str()]);
    validation.set_issuer(&[CLIENT]);
    validation.sub = Some(CLIENT.to_owned());
    let decoded =
        jsonwebtoken::decode::<serde_json::Value>(assertion, &decoding, &validation).expect("JWT");
    let thumbprint = {
        use sha1::Digest;
        data_encoding::BASE64URL_NOPAD.encode(&sha1::Sha1::digest(cert.der()))
    };
    assert_eq!(decoded.header.x5t.as_deref(), Some(thumbprint.as_str()));
    let claims = decoded.claims;
    assert!(claims["jti"].as_str().is_some_and(|j| j.len() == 32));
    let lifetime = claims["exp"].as_u64().unwrap() - claims["nbf"].as_u64().unwrap();
    assert_eq!(lifetime, 600);

    // ARM saw the token Entra ID issued.
    let s = fake.state();
    assert!(
        s.arm_log()
            .iter()
            .all(|l| l.auth.as_deref() == Some("Bearer tok-1")),
        "{:?}",
        s.arm_log().iter().map(|l| &l.auth).collect::<Vec<_>>()
    );
}

#[tokio::test(start_paused = true)]
async fn a_certificate_file_without_a_key_is_a_clear_error() {
    let fake = FakeArm::start(1, |_| {}).await;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("RSA key");
    let cert = rcgen::CertificateParams::new(vec!["sp".to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("certificate");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write_secret(&dir, "cert-only.pem", cert.pem().as_bytes());
    let azure = Azure {
        credential: Credential::ClientCertificate,
        tenant_id: Some(TENANT.into()),
        client_id: Some(CLIENT.into()),
        client_certificate_file: Some(file.clone()),
        ..config(&fake, Orchestration::Uniform)
    };
    let err = AzureProvider::with_client(&azure, paused_tuning(), fake.client())
        .expect_err("no private key");
    assert_eq!(err.operation, "token");
    assert!(err.message.contains("client certificate"), "{err}");
    assert!(err.message.contains(&file.display().to_string()), "{err}");
    assert!(err.message.contains("holds no private key"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn workload_identity_exchanges_the_federated_token_from_its_file() {
    let fake = FakeArm::start(1, |_| {}).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write_secret(
        &dir,
        "azure-identity-token",
        b"eyJhbGciOiJSUzI1NiJ9.federated.sig",
    );
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let azure = Azure {
        credential: Credential::WorkloadIdentity,
        tenant_id: Some(TENANT.into()),
        client_id: Some(CLIENT.into()),
        federated_token_file: Some(file),
        authority_host: Some(fake.url()),
        ..config(&fake, Orchestration::Uniform)
    };
    let p = AzureProvider::with_client(&azure, paused_tuning(), fake.client()).expect("provider");
    p.list().await.expect("list");
    p.list().await.expect("list again");
    let token_requests = entra_requests(&fake);
    assert_eq!(token_requests.len(), 1, "the token is cached");
    let form = &token_requests[0].form;
    assert_eq!(
        form.get("client_assertion").map(String::as_str),
        Some("eyJhbGciOiJSUzI1NiJ9.federated.sig")
    );
    assert_eq!(form.get("client_id").map(String::as_str), Some(CLIENT));
}

#[tokio::test(start_paused = true)]
async fn workload_identity_without_a_token_file_says_what_to_set() {
    let fake = FakeArm::start(1, |_| {}).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let azure = Azure {
        credential: Credential::WorkloadIdentity,
        tenant_id: Some(TENANT.into()),
        client_id: Some(CLIENT.into()),
        federated_token_file: Some(dir.path().join("missing")),
        ..config(&fake, Orchestration::Uniform)
    };
    let err = AzureProvider::with_client(&azure, paused_tuning(), fake.client())
        .expect_err("no token file");
    assert!(err.message.contains("workload identity"), "{err}");
    assert!(err.message.contains("federated_token_file"), "{err}");
}

/// Answers `az account get-access-token` with a token valid for an hour, counting the runs.
#[derive(Debug, Default)]
struct FakeAz {
    runs: AtomicUsize,
}

#[async_trait::async_trait]
impl azure_identity::Executor for FakeAz {
    async fn run(
        &self,
        _program: &OsStr,
        args: &[&OsStr],
    ) -> std::io::Result<std::process::Output> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        let command = args
            .iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(command.contains("az account get-access-token"), "{command}");
        let expires = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default()
            + 3600;
        let stdout = serde_json::json!({
            "accessToken": "cli-token",
            "expiresOn": "2099-01-01 00:00:00.000000",
            "expires_on": expires,
            "subscription": "00000000-0000-0000-0000-000000000000",
            "tenant": TENANT,
            "tokenType": "Bearer"
        });
        Ok(std::process::Output {
            status: std::os::unix::process::ExitStatusExt::from_raw(0),
            stdout: stdout.to_string().into_bytes(),
            stderr: Vec::new(),
        })
    }
}

#[tokio::test(start_paused = true)]
async fn azure_cli_tokens_are_cached_by_the_pipeline() {
    let fake = FakeArm::start(1, |s| s.tokens_issued.push("cli-token".into())).await;
    let azure = Azure {
        credential: Credential::AzureCli,
        ..config(&fake, Orchestration::Uniform)
    };
    let az = Arc::new(FakeAz::default());
    let tokens = TokenSource::with_cli_executor(&azure, fake.client(), None, Some(az.clone()))
        .expect("credential");
    let arm = Arm::new(
        fake.client(),
        &tokens,
        azure.resource_manager(),
        "the fake scale set".into(),
        paused_tuning(),
    );
    let path = format!("{}?api-version=2024-07-01", vmss_path());
    for _ in 0..5 {
        let _: serde_json::Value = arm.get_json("scale set", &path).await.expect("GET");
    }
    assert_eq!(
        az.runs.load(Ordering::SeqCst),
        1,
        "`az` ran once for five calls"
    );
    assert!(
        fake.state()
            .arm_log()
            .iter()
            .all(|l| l.auth.as_deref() == Some("Bearer cli-token"))
    );
}

#[tokio::test(start_paused = true)]
async fn every_call_carries_a_fresh_client_request_id_and_poolgates_user_agent() {
    let fake = FakeArm::start(3, |s| s.page_size = 1).await;
    provider(&fake).list().await.expect("list");
    let log = fake.state().arm_log();
    assert!(log.len() >= 3, "three pages and the NICs: {}", log.len());
    let ids: std::collections::HashSet<String> =
        log.iter().filter_map(|l| l.request_id.clone()).collect();
    assert_eq!(ids.len(), log.len(), "one id per call: {log:?}");
    assert!(
        ids.iter()
            .all(|id| id.len() == 36 && id.matches('-').count() == 4)
    );
    for l in &log {
        let agent = l.user_agent.as_deref().unwrap_or_default();
        assert!(
            agent.starts_with(&format!(
                "poolgate azsdk-rust-poolgate/{}",
                env!("CARGO_PKG_VERSION")
            )),
            "{agent}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_500_is_retried_and_each_try_is_counted() {
    let fake = FakeArm::start(1, |s| {
        s.fail_next = Some((500, "InternalServerError", "An internal error occurred"));
    })
    .await;
    let metrics = Arc::new(Metrics::new());
    let p = provider(&fake).with_metrics(metrics.clone());
    assert_eq!(p.list().await.expect("listed on the retry").len(), 1);
    let count = |code: &str| {
        metrics
            .azure_requests_total
            .with_label_values(&["list", "GET", code])
            .get()
    };
    assert_eq!(count("500"), 1);
    assert!(count("200") >= 2, "the retried listing and the NICs");
}

#[test]
fn clouds_name_their_authority_and_resource_manager() {
    for (cloud, authority, arm) in [
        (
            AzureCloud::Public,
            "https://login.microsoftonline.com",
            "https://management.azure.com",
        ),
        (
            AzureCloud::UsGovernment,
            "https://login.microsoftonline.us",
            "https://management.usgovcloudapi.net",
        ),
        (
            AzureCloud::China,
            "https://login.chinacloudapi.cn",
            "https://management.chinacloudapi.cn",
        ),
    ] {
        let azure = Azure {
            cloud,
            ..Azure::default()
        };
        assert_eq!(authority_host(&azure), authority);
        assert_eq!(azure.resource_manager(), arm);
        assert_eq!(
            arm_scope(azure.resource_manager()),
            format!("{arm}/.default")
        );
    }
    let stack = Azure {
        authority_host: Some("https://login.stack.example/".into()),
        arm_endpoint: Some("https://management.stack.example".into()),
        ..Azure::default()
    };
    assert_eq!(authority_host(&stack), "https://login.stack.example");
    assert_eq!(stack.resource_manager(), "https://management.stack.example");
}
