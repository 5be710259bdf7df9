//! The provider against the in-process fake ARM server and token endpoint (127.0.0.1 only).
//! Time is tokio's paused clock: `Retry-After` and operation polls cost no real time.

use std::sync::Arc;
use std::time::Duration;

use poolgate_config::{Azure, Orchestration};
use router_core::autoscale::AutoscaleConfig;
use router_core::{Lifecycle, ManualClock, Pool, RoutingPolicy};
use serde_json::json;

use super::arm::Tuning;
use super::fake::{FakeArm, Logged, RG, SUB, TOKEN_PATH, VMSS, vmss_path};
use super::{AzureProvider, Provider};
use crate::autoscale::{Driver, DriverSettings};
use crate::metrics::Metrics;

pub(super) fn config(fake: &FakeArm, orchestration: Orchestration) -> Azure {
    Azure {
        subscription_id: SUB.into(),
        resource_group: RG.into(),
        scale_set: VMSS.into(),
        arm_endpoint: Some(fake.url()),
        identity_endpoint: Some(format!("{}{TOKEN_PATH}", fake.url())),
        orchestration,
        ..Azure::default()
    }
}

pub(super) fn provider(fake: &FakeArm) -> AzureProvider {
    provider_with(fake, Orchestration::Uniform)
}

pub(super) fn provider_with(fake: &FakeArm, orchestration: Orchestration) -> AzureProvider {
    let tuning = Tuning {
        // Under the paused clock a request timeout would fire whenever the runtime idles on I/O.
        request_timeout: None,
        ..Tuning::default()
    };
    AzureProvider::with_client(&config(fake, orchestration), tuning, fake.client())
        .expect("provider")
}

pub(super) fn summary(log: &[Logged]) -> Vec<String> {
    log.iter()
        .map(|l| {
            let path = l
                .path
                .strip_prefix(&vmss_path())
                .map(|rest| format!("{{vmss}}{rest}"))
                .unwrap_or_else(|| l.path.clone());
            let path = if path.contains("/operations/") {
                "{operation}".to_owned()
            } else {
                path
            };
            format!("{} {path}", l.method)
        })
        .collect()
}

fn names_and_states(vms: &[super::ProviderVm]) -> Vec<(String, String, Lifecycle)> {
    vms.iter()
        .map(|v| (v.spec.name.clone(), v.spec.host.clone(), v.lifecycle))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn discovery_lists_instances_with_private_ips_and_power_states() {
    let fake = FakeArm::start(4, |s| {
        s.page_size = 2;
        if let Some(i) = s.instances.get_mut(&1) {
            i.power = "deallocated".into();
        }
        if let Some(i) = s.instances.get_mut(&2) {
            i.power = "starting".into();
            i.provisioning = "Updating".into();
        }
        if let Some(i) = s.instances.get_mut(&3) {
            // Being created: no power state, no NIC yet.
            i.power = String::new();
            i.provisioning = "Creating".into();
            i.ip = String::new();
        }
    })
    .await;
    let p = provider(&fake);
    assert_eq!(p.name(), "azure-vmss");
    assert!(p.capabilities().start_stop && p.capabilities().create_delete);
    let vms = p.list().await.expect("list");
    assert_eq!(
        names_and_states(&vms),
        vec![
            ("dsvm_0".into(), "10.0.0.4".into(), Lifecycle::Running),
            ("dsvm_1".into(), "10.0.0.5".into(), Lifecycle::Stopped),
            ("dsvm_2".into(), "10.0.0.6".into(), Lifecycle::Starting),
            ("dsvm_3".into(), String::new(), Lifecycle::Starting),
        ]
    );
    assert!(
        vms.iter()
            .all(|v| v.spec.ssh_port == 22 && v.spec.http_port == 8000)
    );
    let s = fake.state();
    let log = s.arm_log();
    // The scale set itself is read once, before the first listing (its orchestration mode).
    assert_eq!(
        summary(&log),
        vec![
            "GET {vmss}",
            "GET {vmss}/virtualMachines",
            "GET {vmss}/virtualMachines",
            "GET {vmss}/networkInterfaces"
        ]
    );
    let log = &log[1..];
    assert_eq!(
        log[0].query.get("$expand").map(String::as_str),
        Some("instanceView")
    );
    assert_eq!(
        log[0].query.get("api-version").map(String::as_str),
        Some("2024-07-01")
    );
    assert_eq!(
        log[1].query.get("$skiptoken").map(String::as_str),
        Some("2")
    );
    assert_eq!(
        log[2].query.get("api-version").map(String::as_str),
        Some("2018-10-01")
    );
    assert!(
        log.iter()
            .all(|l| l.auth.as_deref() == Some("Bearer tok-1"))
    );
    assert_eq!(s.token_requests(), 1);
}

#[tokio::test(start_paused = true)]
async fn scale_out_raises_capacity_and_new_instances_appear_after_the_operation() {
    let fake = FakeArm::start(2, |s| s.polls_per_op = 3).await;
    let p = provider(&fake);
    assert_eq!(p.list().await.expect("list").len(), 2);
    let before = fake.state().arm_log().len();
    p.create(2).await.expect("create");
    {
        let s = fake.state();
        let log = s.arm_log();
        let log = &log[before..];
        assert_eq!(
            summary(log),
            vec![
                "GET {vmss}",
                "PATCH {vmss}",
                "GET {operation}",
                "GET {operation}",
                "GET {operation}"
            ]
        );
        assert_eq!(log[1].body, Some(json!({"sku": {"capacity": 4}})));
        assert_eq!(s.capacity, 4);
    }
    let vms = p.list().await.expect("list");
    assert_eq!(
        names_and_states(&vms)[2..],
        [
            ("dsvm_2".into(), "10.0.0.6".into(), Lifecycle::Running),
            ("dsvm_3".into(), "10.0.0.7".into(), Lifecycle::Running),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn scale_in_deletes_exactly_the_idle_instance_and_never_lowers_capacity() {
    let fake = FakeArm::start(3, |_| {}).await;
    let p = provider(&fake);
    p.list().await.expect("list");
    // The driver drained dsvm_1 and saw it idle; now it is removed by its instance id.
    p.delete(&["dsvm_1".to_owned()]).await.expect("delete");
    let vms = p.list().await.expect("list");
    assert_eq!(
        vms.iter().map(|v| v.spec.name.as_str()).collect::<Vec<_>>(),
        ["dsvm_0", "dsvm_2"]
    );
    let s = fake.state();
    let log = s.arm_log();
    let deletes: Vec<&Logged> = log
        .iter()
        .filter(|l| l.method == "POST" && l.path.ends_with("/delete"))
        .collect();
    assert_eq!(deletes.len(), 1);
    assert_eq!(deletes[0].path, format!("{}/delete", vmss_path()));
    assert_eq!(deletes[0].body, Some(json!({"instanceIds": ["1"]})));
    assert!(
        !log.iter().any(|l| l.method == "PATCH"),
        "capacity must never be lowered: {:?}",
        summary(&log)
    );
    assert_eq!(s.capacity, 2);
}

#[tokio::test(start_paused = true)]
async fn start_and_deallocate_specific_instances() {
    let fake = FakeArm::start(3, |s| {
        if let Some(i) = s.instances.get_mut(&2) {
            i.power = "deallocated".into();
        }
    })
    .await;
    let p = provider(&fake);
    p.list().await.expect("list");
    p.stop(&["dsvm_0".to_owned()]).await.expect("deallocate");
    p.start(&["dsvm_2".to_owned()]).await.expect("start");
    let vms = p.list().await.expect("list");
    assert_eq!(
        vms.iter().map(|v| v.lifecycle).collect::<Vec<_>>(),
        [Lifecycle::Stopped, Lifecycle::Running, Lifecycle::Running]
    );
    let s = fake.state();
    let posts: Vec<(String, Option<serde_json::Value>)> = s
        .arm_log()
        .into_iter()
        .filter(|l| l.method == "POST")
        .map(|l| (l.path, l.body))
        .collect();
    assert_eq!(
        posts,
        vec![
            (
                format!("{}/deallocate", vmss_path()),
                Some(json!({"instanceIds": ["0"]}))
            ),
            (
                format!("{}/start", vmss_path()),
                Some(json!({"instanceIds": ["2"]}))
            ),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn throttled_call_is_retried_after_retry_after() {
    let fake = FakeArm::start(1, |s| s.throttle_next = 1).await;
    let p = provider(&fake);
    let t0 = tokio::time::Instant::now();
    assert_eq!(p.list().await.expect("list after one 429").len(), 1);
    assert!(
        t0.elapsed() >= Duration::from_secs(1),
        "Retry-After: 1 honoured"
    );
    {
        let s = fake.state();
        assert_eq!(
            summary(&s.arm_log()),
            vec![
                "GET {vmss}",
                "GET {vmss}",
                "GET {vmss}/virtualMachines",
                "GET {vmss}/networkInterfaces"
            ]
        );
    }
    // Throttled for good: bounded retries, then a clear error.
    fake.state().throttle_next = 100;
    let before = fake.state().arm_log().len();
    let err = p.list().await.expect_err("still throttled");
    assert!(err.message.contains("429"), "{err}");
    assert!(err.message.contains("giving up"), "{err}");
    assert!(err.message.contains("pool.azure.poll_interval"), "{err}");
    assert_eq!(
        fake.state().arm_log().len() - before,
        5,
        "1 try + 4 retries"
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_as_an_http_date_is_honoured() {
    let fake = FakeArm::start(1, |s| {
        s.throttle_next = 1;
        s.throttle_until_date = Some(20);
    })
    .await;
    let p = provider(&fake);
    let t0 = tokio::time::Instant::now();
    assert_eq!(p.list().await.expect("list after one 429").len(), 1);
    // The date has one-second resolution and the wall clock moves on while the fake answers.
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_secs(18) && waited <= Duration::from_secs(21),
        "waited {waited:?} for a Retry-After 20 s ahead"
    );
}

#[tokio::test(start_paused = true)]
async fn async_operation_is_polled_until_it_succeeds() {
    let fake = FakeArm::start(1, |s| s.polls_per_op = 3).await;
    let p = provider(&fake);
    p.list().await.expect("list");
    let before = fake.state().arm_log().len();
    let t0 = tokio::time::Instant::now();
    p.stop(&["dsvm_0".to_owned()]).await.expect("deallocate");
    {
        let s = fake.state();
        let log = s.arm_log();
        assert_eq!(
            summary(&log[before..]),
            vec![
                "POST {vmss}/deallocate",
                "GET {operation}",
                "GET {operation}",
                "GET {operation}"
            ]
        );
        assert_eq!(
            s.instances.get(&0).map(|i| i.power.as_str()),
            Some("deallocated")
        );
    }
    // Polls honour the operation's Retry-After (1 s), not the 5 s default.
    assert_eq!(t0.elapsed(), Duration::from_secs(3));

    // Operations that only give a Location: 202 until done.
    fake.state().location_only = true;
    let before = fake.state().arm_log().len();
    p.start(&["dsvm_0".to_owned()]).await.expect("start");
    let s = fake.state();
    let log = s.arm_log();
    let polls: Vec<&Logged> = log[before..]
        .iter()
        .filter(|l| l.path.contains("/operations/"))
        .collect();
    assert_eq!(polls.len(), 3);
    assert!(polls.iter().all(|l| l.query.contains_key("monitor")));
    assert_eq!(
        s.instances.get(&0).map(|i| i.power.as_str()),
        Some("running")
    );
}

#[tokio::test(start_paused = true)]
async fn tokens_are_cached_and_fetched_again_when_they_near_expiry() {
    // Long-lived tokens: one token request for several calls.
    let fake = FakeArm::start(1, |s| s.token_lifetime = 3600).await;
    let p = provider(&fake);
    p.list().await.expect("list");
    p.list().await.expect("list");
    assert_eq!(fake.state().token_requests(), 1);

    // Short-lived tokens (inside azure_identity's 5-minute refresh margin) count as expired:
    // every ARM call fetches a new one, and ARM sees the new token.
    let fake = FakeArm::start(1, |s| s.token_lifetime = 120).await;
    let p = provider(&fake);
    p.list().await.expect("list");
    assert_eq!(
        fake.state().token_requests(),
        3,
        "one per ARM call (the scale set, its instances, their NICs)"
    );
    p.list().await.expect("list");
    let s = fake.state();
    assert_eq!(s.token_requests(), 5);
    let auths: Vec<String> = s.arm_log().iter().filter_map(|l| l.auth.clone()).collect();
    assert_eq!(
        auths,
        [
            "Bearer tok-1",
            "Bearer tok-2",
            "Bearer tok-3",
            "Bearer tok-4",
            "Bearer tok-5"
        ]
    );
    let token_queries: Vec<&Logged> = s.log.iter().filter(|l| l.path == TOKEN_PATH).collect();
    assert!(
        token_queries
            .iter()
            .all(|l| { l.query.get("resource").map(String::as_str) == Some(fake.url().as_str()) })
    );
}

#[tokio::test(start_paused = true)]
async fn next_link_on_the_same_origin_spelled_differently_is_followed() {
    let fake = FakeArm::start(3, |s| s.page_size = 1).await;
    // ARM's own links spell the default port (`https://management.azure.com:443/…`); here the
    // same origin in upper case, port spelled out (the `:443` case itself is in arm.rs's unit
    // test, which needs no listener on 443).
    let origin = fake.url().replacen("http://", "HTTP://", 1);
    fake.state().next_link_origin = Some(origin);
    let p = provider(&fake);
    let vms = p.list().await.expect("list over three pages");
    assert_eq!(vms.len(), 3);
    let s = fake.state();
    let pages = s
        .arm_log()
        .iter()
        .filter(|l| l.path.ends_with("/virtualMachines"))
        .count();
    assert_eq!(pages, 3);
}

#[tokio::test(start_paused = true)]
async fn arm_errors_say_what_to_do() {
    let fake = FakeArm::start(2, |s| {
        s.fail_next = Some((
            403,
            "AuthorizationFailed",
            "The client 'x' does not have authorization to perform action 'Microsoft.Compute/virtualMachineScaleSets/virtualMachines/read'.",
        ))
    })
    .await;
    let p = provider(&fake);
    let err = p.list().await.expect_err("forbidden");
    assert!(err.message.contains("AuthorizationFailed"), "{err}");
    assert!(err.message.contains("Virtual Machine Contributor"), "{err}");

    fake.state().fail_next = Some((404, "ResourceNotFound", "not found"));
    let err = p.list().await.expect_err("not found");
    assert!(
        err.message.contains("check pool.azure.subscription_id"),
        "{err}"
    );

    let err = p
        .delete(&["dsvm_9".to_owned()])
        .await
        .expect_err("unknown VM");
    assert!(err.message.contains("no instance named dsvm_9"), "{err}");
    assert!(
        !fake.state().arm_log().iter().any(|l| l.method == "POST"),
        "nothing deleted for an unknown name"
    );

    // A nextLink to another host is not followed: the bearer token goes to ARM only.
    fake.state().page_size = 1;
    fake.state().foreign_next_link = true;
    let err = p.list().await.expect_err("foreign nextLink");
    assert!(err.message.contains("not following it"), "{err}");
    fake.state().page_size = 100;

    // An operation that ends Failed is an error naming ARM's code.
    fake.state().op_failure = Some((
        "AllocationFailed",
        "Allocation failed. We do not have sufficient capacity for the requested VM size.",
    ));
    let err = p.create(1).await.expect_err("allocation failed");
    assert!(
        err.message.contains("ended Failed: AllocationFailed"),
        "{err}"
    );
    assert_eq!(fake.state().capacity, 2);
}

#[tokio::test(start_paused = true)]
async fn advice_matches_the_error_code() {
    let fake = FakeArm::start(1, |_| {}).await;
    let p = provider(&fake);
    // Shapes of ARM's answers as reported in public issues: a cores-quota 409, a capacity
    // failure, a linked-authorization 403, and a real conflict — with what the advice must and
    // must not say, and whether the error says "no capacity" (a failed start then creates).
    let cases: [(u16, &str, &str, &str, &str, bool); 4] = [
        (
            409,
            "OperationNotAllowed",
            "Operation could not be completed as it results in exceeding approved standardDSv5Family Cores quota.",
            "quota increase",
            "another operation",
            false,
        ),
        (
            409,
            "AllocationFailed",
            "Allocation failed. We do not have sufficient capacity for the requested VM size in this region.",
            "no capacity for this VM size",
            "another operation",
            true,
        ),
        (
            403,
            "LinkedAuthorizationFailed",
            "... does not have permission to perform action(s) 'Microsoft.Network/virtualNetworks/subnets/join/action' on the linked scope(s) ...",
            "linked resource",
            "Virtual Machine Contributor",
            false,
        ),
        (
            409,
            "OperationNotAllowed",
            "Operation 'start' is not allowed since the scale set is being updated.",
            "another operation",
            "quota",
            false,
        ),
    ];
    for (status, code, message, says, does_not_say, no_capacity) in cases {
        fake.state().fail_next = Some((status, code, message));
        let err = p.create(1).await.expect_err(code);
        assert!(err.message.contains(says), "{err}");
        assert!(!err.message.contains(does_not_say), "{err}");
        assert_eq!(err.no_capacity, no_capacity, "{err}");
        // Past the create backoff (it doubles from 30 s).
        tokio::time::advance(Duration::from_secs(3600)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn protect_from_scale_in_sends_only_the_protection_policy() {
    // The fake refuses (LinkedAuthorizationFailed) any write naming the subnet, as ARM does for
    // an identity without subnet join rights: only the minimal documented body gets through.
    let fake = FakeArm::start(2, |s| s.polls_per_op = 1).await;
    let p = provider(&fake);
    p.list().await.expect("list");
    p.protect(&[("dsvm_1".to_owned(), true), ("dsvm_0".to_owned(), false)])
        .await
        .expect("protect");
    let s = fake.state();
    let log = s.arm_log();
    let puts: Vec<&Logged> = log.iter().filter(|l| l.method == "PUT").collect();
    // dsvm_0 is already unprotected: no write spent on it.
    assert_eq!(puts.len(), 1);
    assert_eq!(puts[0].path, format!("{}/virtualMachines/1", vmss_path()));
    assert_eq!(
        puts[0].body,
        Some(json!({"properties": {"protectionPolicy": {"protectFromScaleIn": true}}}))
    );
    // No GET of the instance model first.
    assert!(
        !log.iter()
            .any(|l| l.method == "GET" && l.path.ends_with("/virtualMachines/1"))
    );
    assert!(s.instances.get(&1).is_some_and(|i| i.protect));
}

#[tokio::test(start_paused = true)]
async fn failed_protection_backs_off_per_vm_instead_of_writing_every_tick() {
    let fake = FakeArm::start(2, |s| s.polls_per_op = 1).await;
    let p = provider(&fake);
    p.list().await.expect("list");
    let want = [("dsvm_1".to_owned(), true)];
    fake.state().fail_next = Some((
        403,
        "AuthorizationFailed",
        "The client 'poolgate' does not have authorization to perform action 'Microsoft.Compute/virtualMachineScaleSets/virtualMachines/write'.",
    ));
    let err = p.protect(&want).await.expect_err("forbidden");
    assert!(err.message.contains("AuthorizationFailed"), "{err}");
    let attempts = || {
        fake.state()
            .log
            .iter()
            .filter(|l| l.method == "PUT")
            .count()
    };
    assert_eq!(attempts(), 1);
    // Ticks within the backoff send nothing.
    for _ in 0..2 {
        tokio::time::advance(Duration::from_secs(10)).await;
        p.protect(&want).await.expect("backing off");
    }
    assert_eq!(attempts(), 1);
    // After 30 s it tries again; a second failure doubles the wait to 60 s.
    tokio::time::advance(Duration::from_secs(11)).await;
    fake.state().fail_next = Some((403, "AuthorizationFailed", "still no role"));
    p.protect(&want).await.expect_err("still forbidden");
    assert_eq!(attempts(), 2);
    tokio::time::advance(Duration::from_secs(45)).await;
    p.protect(&want).await.expect("backing off");
    assert_eq!(attempts(), 2);
    tokio::time::advance(Duration::from_secs(16)).await;
    p.protect(&want).await.expect("the role was granted");
    assert_eq!(attempts(), 3);
    assert!(fake.state().instances.get(&1).is_some_and(|i| i.protect));
}

#[tokio::test(start_paused = true)]
async fn flexible_lists_by_scale_set_filter_and_acts_per_vm_name() {
    let fake = FakeArm::start(3, |s| s.flexible = true).await;
    let p = provider_with(&fake, Orchestration::Flexible);
    let vms = p.list().await.expect("list");
    assert_eq!(
        names_and_states(&vms),
        vec![
            (
                "dsvm_00000000".into(),
                "10.0.0.4".into(),
                Lifecycle::Running
            ),
            (
                "dsvm_00000001".into(),
                "10.0.0.5".into(),
                Lifecycle::Running
            ),
            (
                "dsvm_00000002".into(),
                "10.0.0.6".into(),
                Lifecycle::Running
            ),
        ]
    );
    p.stop(&["dsvm_00000001".to_owned()])
        .await
        .expect("deallocate");
    p.start(&["dsvm_00000001".to_owned()]).await.expect("start");
    p.delete(&["dsvm_00000002".to_owned()])
        .await
        .expect("delete");
    p.create(1).await.expect("create");
    let vms = p.list().await.expect("list");
    assert_eq!(
        vms.iter().map(|v| v.spec.name.as_str()).collect::<Vec<_>>(),
        ["dsvm_00000000", "dsvm_00000001", "dsvm_00000003"]
    );
    let s = fake.state();
    let writes: Vec<String> = summary(&s.arm_log())
        .into_iter()
        .filter(|l| !l.starts_with("GET"))
        .collect();
    let vm = format!(
        "/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/virtualMachines"
    );
    assert_eq!(
        writes,
        vec![
            format!("POST {vm}/dsvm_00000001/deallocate"),
            format!("POST {vm}/dsvm_00000001/start"),
            format!("DELETE {vm}/dsvm_00000002"),
            "PATCH {vmss}".to_owned(),
        ]
    );
    let log = s.arm_log();
    let patch = log.iter().find(|l| l.method == "PATCH");
    assert_eq!(
        patch.and_then(|l| l.body.clone()),
        Some(json!({"sku": {"capacity": 3}})),
        "capacity raised from 2 (after the delete) to 3"
    );
}

#[test]
fn provider_is_built_from_the_config() {
    let mut config = poolgate_config::Config::default();
    config.pool.provider = poolgate_config::Provider::AzureVmss;
    config.pool.azure = Some(Azure {
        subscription_id: SUB.into(),
        resource_group: RG.into(),
        scale_set: VMSS.into(),
        identity_endpoint: Some("http://127.0.0.1:9/metadata/identity/oauth2/token".into()),
        ..Azure::default()
    });
    let metrics = Arc::new(Metrics::new());
    let provider = crate::app::provider(&config, &metrics).expect("azure provider");
    assert_eq!(provider.name(), "azure-vmss");
    config.pool.azure = Some(Azure {
        scale_set: "bad/name".into(),
        ..config.pool.azure.clone().unwrap_or_default()
    });
    let err = crate::app::provider(&config, &metrics)
        .err()
        .map(|e| e.to_string());
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("pool.azure.scale_set")),
        "{err:?}"
    );
}

/// The real driver and policy over the provider: three idle VMs, aim one.
pub(super) async fn driver_over(
    fake: &FakeArm,
    deallocate_idle: bool,
) -> (Arc<Driver>, Arc<Pool>, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new());
    let pool = Arc::new(Pool::new(RoutingPolicy::default(), clock.clone()));
    let tuning = Tuning {
        request_timeout: None,
        ..Tuning::default()
    };
    let config = Azure {
        deallocate_idle,
        ..config(fake, Orchestration::Uniform)
    };
    let provider =
        Arc::new(AzureProvider::with_client(&config, tuning, fake.client()).expect("provider"));
    let settings = DriverSettings {
        enabled: true,
        policy: AutoscaleConfig {
            min_vms: 0,
            max_vms: 5,
            sessions_per_vm: 4,
            spare_vms: 1,
            scale_in_after: Duration::from_secs(15 * 60),
            scale_to_zero_after: Duration::from_secs(24 * 3600),
            cooldown: Duration::ZERO,
        },
        tick: Duration::from_secs(5),
        poll_interval: Duration::from_secs(15),
        wake_on_connect: true,
        hold_connect_for: Duration::from_secs(300),
        boot_estimate: Duration::from_secs(60),
        probe_margin: Duration::ZERO,
    };
    let driver = Driver::new(pool.clone(), provider, settings, Arc::new(Metrics::new()));
    driver.sync().await.expect("sync");
    (driver, pool, clock)
}

/// Marks `dsvm_0` and `dsvm_1` up on their SSH side and places one session on one of them.
pub(super) fn a_session_on_healthy_vms(pool: &Pool) -> router_core::SessionGuard {
    for vm in ["dsvm_0", "dsvm_1"] {
        pool.set_protocol_health(vm, router_core::Protocol::Ssh, router_core::Health::Up);
    }
    pool.acquire(&router_core::PickRequest::new(router_core::Protocol::Ssh))
        .expect("a VM")
}

fn draining(pool: &Pool, name: &str) -> bool {
    pool.snapshot()
        .get(name)
        .is_some_and(|vm| vm.status().draining)
}

#[tokio::test(start_paused = true)]
async fn driver_drains_then_deletes_exactly_the_idle_instance() {
    let fake = FakeArm::start(3, |s| s.polls_per_op = 2).await;
    let (driver, pool, clock) = driver_over(&fake, false).await;
    assert_eq!(pool.snapshot().vms().len(), 3);
    clock.advance(Duration::from_secs(16 * 60));
    driver.tick().await;
    assert!(draining(&pool, "dsvm_0"), "drained first");
    assert!(!fake.state().arm_log().iter().any(|l| l.method != "GET"));
    driver.tick().await;
    let s = fake.state();
    let log = s.arm_log();
    let writes: Vec<&Logged> = log.iter().filter(|l| l.method != "GET").collect();
    assert_eq!(writes.len(), 1, "{:?}", summary(&log));
    assert_eq!(writes[0].path, format!("{}/delete", vmss_path()));
    assert_eq!(writes[0].body, Some(json!({"instanceIds": ["0"]})));
    assert!(
        !log.iter().any(|l| l.method == "PATCH"),
        "capacity never lowered"
    );
    assert_eq!(s.capacity, 2);
    assert!(!s.instances.contains_key(&0));
    drop(s);
    assert!(
        pool.snapshot().get("dsvm_0").is_none(),
        "gone from the pool"
    );
}

#[tokio::test(start_paused = true)]
async fn driver_deallocates_idle_instances_and_starts_them_again_on_demand() {
    let fake = FakeArm::start(2, |s| s.polls_per_op = 2).await;
    let (driver, pool, clock) = driver_over(&fake, true).await;
    clock.advance(Duration::from_secs(16 * 60));
    driver.tick().await;
    driver.tick().await;
    {
        let s = fake.state();
        let writes: Vec<Logged> = s
            .arm_log()
            .into_iter()
            .filter(|l| l.method != "GET")
            .collect();
        assert_eq!(writes.len(), 1);
        assert_eq!(writes[0].path, format!("{}/deallocate", vmss_path()));
        assert_eq!(writes[0].body, Some(json!({"instanceIds": ["0"]})));
        assert_eq!(s.capacity, 2, "a deallocated instance keeps its place");
    }
    assert_eq!(
        pool.snapshot()
            .get("dsvm_0")
            .map(|vm| vm.status().lifecycle),
        Some(Lifecycle::Stopped)
    );
    // Someone connects while one VM serves and it is full: the stopped VM is started, not created.
    let _waiting = driver.wait_guard(router_core::Protocol::Ssh);
    driver.tick().await;
    let s = fake.state();
    let writes: Vec<Logged> = s
        .arm_log()
        .into_iter()
        .filter(|l| l.method != "GET")
        .collect();
    assert_eq!(writes.len(), 2, "{:?}", summary(&s.arm_log()));
    assert_eq!(writes[1].path, format!("{}/start", vmss_path()));
    assert_eq!(writes[1].body, Some(json!({"instanceIds": ["0"]})));
    assert_eq!(
        s.instances.get(&0).map(|i| i.power.as_str()),
        Some("running")
    );
}

#[tokio::test(start_paused = true)]
async fn unreachable_token_endpoint_is_a_clear_error() {
    let fake = FakeArm::start(1, |_| {}).await;
    let closed = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        listener.local_addr().expect("addr")
    };
    let config = Azure {
        identity_endpoint: Some(format!("http://{closed}{TOKEN_PATH}")),
        ..config(&fake, Orchestration::Uniform)
    };
    let p =
        AzureProvider::with_client(&config, Tuning::default(), fake.client()).expect("provider");
    let err = p.list().await.expect_err("no token");
    assert_eq!(err.operation, "token");
    // azure_identity retries IMDS for up to 72 s; the provider stops waiting after a minute.
    assert!(err.message.contains("no ARM token within 1m"), "{err}");
    assert!(
        err.message.contains("is a managed identity assigned"),
        "{err}"
    );
    assert!(
        fake.state().arm_log().is_empty(),
        "no ARM call without a token"
    );
}

// Real clock here: under the paused clock, an idle runtime waiting on the h2 connection task
// would jump straight to the request timeout. No sleeps happen in this test.
#[tokio::test]
async fn https_with_alpn_to_a_trusted_server() {
    let fake = FakeArm::start(2, |_| {}).await;
    let p = AzureProvider::with_client(
        &config(&fake, Orchestration::Uniform),
        Tuning::default(),
        fake.client(),
    )
    .expect("provider");
    let vms = p.list().await.expect("list over https");
    assert_eq!(vms.len(), 2);
    let s = fake.state();
    assert_eq!(s.arm_log().len(), 3);
    assert!(
        s.log.iter().all(|l| l.version == "HTTP/2.0"),
        "h2 negotiated by ALPN: {:?}",
        s.log.iter().map(|l| &l.version).collect::<Vec<_>>()
    );
    // The token scope follows the endpoint (sovereign clouds).
    let token = s.log.iter().find(|l| l.path == TOKEN_PATH);
    assert_eq!(
        token
            .and_then(|l| l.query.get("resource"))
            .map(String::as_str),
        Some(fake.url().as_str())
    );
}

/// A busy check answering from a table per VM (absent = idle).
struct Table(std::sync::Mutex<std::collections::HashMap<String, crate::autoscale::busy::Verdict>>);

impl Table {
    fn set(&self, vm: &str, verdict: crate::autoscale::busy::Verdict) {
        self.0.lock().unwrap().insert(vm.to_string(), verdict);
    }
}

impl crate::autoscale::busy::BusyCheck for Table {
    fn check<'a>(
        &'a self,
        vm: &'a router_core::VmSpec,
    ) -> futures::future::BoxFuture<'a, crate::autoscale::busy::Verdict> {
        let verdict = self
            .0
            .lock()
            .unwrap()
            .get(&vm.name)
            .cloned()
            .unwrap_or(crate::autoscale::busy::Verdict::Idle);
        Box::pin(async move { verdict })
    }
}

/// Lets background busy checks finish (they answer at once here).
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn driver_never_drains_or_deletes_an_instance_running_detached_work() {
    use crate::autoscale::busy::Verdict;
    let fake = FakeArm::start(2, |s| s.polls_per_op = 2).await;
    let (driver, pool, clock) = driver_over(&fake, false).await;
    let table = Arc::new(Table(Default::default()));
    driver.set_busy_check(table.clone());
    table.set(
        "dsvm_0",
        Verdict::Busy("busy: python (pid 7) of ann is running".into()),
    );
    table.set("dsvm_1", Verdict::Unknown("no answer".into()));
    clock.advance(Duration::from_secs(16 * 60));
    // The first tick only asks (nothing is known yet: both kept); the answers keep both.
    for _ in 0..5 {
        driver.tick().await;
        settle().await;
        clock.advance(Duration::from_secs(5));
    }
    assert!(!draining(&pool, "dsvm_0") && !draining(&pool, "dsvm_1"));
    assert!(
        !fake
            .state()
            .arm_log()
            .iter()
            .any(|l| l.path.ends_with("/delete")),
        "a busy instance was deleted"
    );
    let view = crate::autoscale::AutoscaleStatus::view(&*driver);
    assert_eq!(view.busy.get("dsvm_0"), Some(&true));
    assert_eq!(
        view.busy.get("dsvm_1"),
        Some(&true),
        "unknown counts as busy"
    );

    // dsvm_1 turns out idle: drained; work starts there before the stop: the check right
    // before it keeps the instance and takes it back into service.
    table.set("dsvm_1", Verdict::Idle);
    clock.advance(Duration::from_secs(61));
    driver.tick().await;
    settle().await;
    driver.tick().await;
    assert!(draining(&pool, "dsvm_1"), "the idle instance is drained");
    table.set(
        "dsvm_1",
        Verdict::Busy("busy: tmux: server (pid 9) of bob is running".into()),
    );
    driver.tick().await;
    assert!(
        !draining(&pool, "dsvm_1"),
        "kept and taken back into service"
    );
    assert!(
        !fake
            .state()
            .arm_log()
            .iter()
            .any(|l| l.path.ends_with("/delete")),
        "deleted although the check right before found work"
    );
    assert_eq!(
        driver
            .metrics
            .autoscale_actions_total
            .with_label_values(&["kept_busy"])
            .get(),
        1
    );

    // The work ends: drained and deleted.
    table.set("dsvm_1", Verdict::Idle);
    clock.advance(Duration::from_secs(61));
    for _ in 0..4 {
        driver.tick().await;
        settle().await;
    }
    let log = fake.state().arm_log();
    let deletes: Vec<&Logged> = log.iter().filter(|l| l.path.ends_with("/delete")).collect();
    assert_eq!(deletes.len(), 1, "{:?}", summary(&log));
    assert_eq!(deletes[0].body, Some(json!({"instanceIds": ["1"]})));
    assert!(
        pool.snapshot().get("dsvm_0").is_some(),
        "the busy one stays"
    );
}

/// An official example kept under `fake/examples/`, whole.
pub(super) fn example_request(file: &str) -> serde_json::Value {
    let path = format!(
        "{}/src/autoscale/providers/azure/fake/examples/{file}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).expect("example file");
    serde_json::from_str(&text).expect("example JSON")
}

/// The `responses.200.body` of an official example kept under `fake/examples/`.
pub(super) fn example_body(file: &str) -> serde_json::Value {
    let path = format!(
        "{}/src/autoscale/providers/azure/fake/examples/{file}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).expect("example file");
    let example: serde_json::Value = serde_json::from_str(&text).expect("example JSON");
    example
        .pointer("/responses/200/body")
        .cloned()
        .expect("a 200 body")
}

#[tokio::test(start_paused = true)]
async fn the_minimal_official_listing_is_read_without_error_and_nameless_instances_skipped() {
    // Azure's minimum-set listing has neither name nor instanceId nor properties: the provider
    // must not fail the whole listing (or guess a name to act on), only skip the instance.
    let body = example_body("VirtualMachineScaleSetVM_List_MinimumSet_Gen.json");
    let fake = FakeArm::start(0, |s| s.instances_override = Some(body)).await;
    let p = provider(&fake);
    let vms = p.list().await.expect("list");
    assert!(vms.is_empty(), "{vms:?}");
}

#[tokio::test(start_paused = true)]
async fn a_failed_last_operation_leaves_the_instance_what_its_power_state_says() {
    // `provisioningState` `Failed` is the state of the last operation only: a VM extension that
    // failed on a running VM, a start refused for want of capacity (the VM stays deallocated).
    // Only an instance whose creation failed (no power state at all) is on its way out.
    let fake = FakeArm::start(4, |s| {
        if let Some(i) = s.instances.get_mut(&1) {
            i.provisioning = "Failed".into();
        }
        if let Some(i) = s.instances.get_mut(&2) {
            i.provisioning = "Failed".into();
            i.power = "deallocated".into();
        }
        if let Some(i) = s.instances.get_mut(&3) {
            i.provisioning = "Failed".into();
            i.power = String::new();
            i.ip = String::new();
        }
    })
    .await;
    let p = provider(&fake);
    let vms = p.list().await.expect("list");
    let states: Vec<Lifecycle> = vms.iter().map(|v| v.lifecycle).collect();
    assert_eq!(
        states,
        vec![
            Lifecycle::Running,
            Lifecycle::Running,
            Lifecycle::Stopped,
            Lifecycle::Stopping
        ]
    );
}

/// A scale set of one instance, set up by `only`; one user waits; one decision. The fake, and
/// the writes the decision sent (reads aside).
async fn writes_for_one_waiting_user(
    only: impl FnOnce(&mut super::fake::Inst),
) -> (FakeArm, Vec<String>) {
    let fake = FakeArm::start(1, |s| {
        s.polls_per_op = 1;
        if let Some(i) = s.instances.get_mut(&0) {
            only(i);
        }
    })
    .await;
    let (driver, _pool, _clock) = driver_over(&fake, true).await;
    let _waiting = driver.wait_guard(router_core::Protocol::Ssh);
    driver.tick().await;
    let writes = summary(&fake.state().arm_log())
        .into_iter()
        .filter(|l| !l.starts_with("GET"))
        .collect();
    (fake, writes)
}

#[tokio::test(start_paused = true)]
async fn driver_starts_a_deallocated_instance_whose_last_start_failed() {
    // A start refused earlier (AllocationFailed): deallocated, provisioning Failed.
    let (fake, writes) = writes_for_one_waiting_user(|i| {
        i.provisioning = "Failed".into();
        i.power = "deallocated".into();
    })
    .await;
    // Started again (not deleted with its disk, as it was before), plus the policy's spare VM.
    assert_eq!(
        writes.first().map(String::as_str),
        Some("POST {vmss}/start")
    );
    assert!(!writes.iter().any(|w| w.ends_with("/delete")), "{writes:?}");
    assert_eq!(
        fake.state().instances.get(&0).map(|i| i.power.as_str()),
        Some("running")
    );
}

#[tokio::test(start_paused = true)]
async fn driver_wakes_the_pool_by_creating_when_the_only_instance_failed_to_be_created() {
    let (fake, writes) = writes_for_one_waiting_user(|i| {
        i.provisioning = "Failed".into();
        i.power = String::new();
        i.ip = String::new();
    })
    .await;
    // Not a start of the failed instance: new capacity.
    assert!(!writes.iter().any(|w| w.ends_with("/start")), "{writes:?}");
    assert_eq!(writes.first().map(String::as_str), Some("PATCH {vmss}"));
    // One for the waiting user, plus the policy's spare VM.
    assert_eq!(fake.state().capacity, 3);
}

#[tokio::test(start_paused = true)]
async fn an_instance_without_power_state_stops_counting_as_starting_after_start_timeout() {
    let fake = FakeArm::start(2, |s| {
        if let Some(i) = s.instances.get_mut(&1) {
            // Stuck in a create that never finishes: no power state, no NIC.
            i.power = String::new();
            i.provisioning = "Creating".into();
            i.ip = String::new();
        }
    })
    .await;
    let p = provider(&fake);
    let state = |vms: &[super::ProviderVm]| {
        vms.iter()
            .find(|v| v.spec.name == "dsvm_1")
            .map(|v| v.lifecycle)
    };
    assert_eq!(
        state(&p.list().await.expect("list")),
        Some(Lifecycle::Starting)
    );
    tokio::time::advance(Duration::from_secs(19 * 60)).await;
    assert_eq!(
        state(&p.list().await.expect("list")),
        Some(Lifecycle::Starting)
    );
    // pool.azure.start_timeout (20 min by default) after it was first listed.
    tokio::time::advance(Duration::from_secs(60)).await;
    assert_eq!(
        state(&p.list().await.expect("list")),
        Some(Lifecycle::Stopping)
    );
    // It comes up after all: a power state clears the verdict.
    if let Some(i) = fake.state().instances.get_mut(&1) {
        i.power = "running".into();
        i.provisioning = "Succeeded".into();
        i.ip = "10.0.0.9".into();
    }
    assert_eq!(
        state(&p.list().await.expect("list")),
        Some(Lifecycle::Running)
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_create_is_not_sent_again_every_tick() {
    let fake = FakeArm::start(1, |s| s.polls_per_op = 1).await;
    let p = provider(&fake);
    let patches = || {
        fake.state()
            .log
            .iter()
            .filter(|l| l.method == "PATCH")
            .count()
    };
    fake.state().op_failure = Some((
        "OperationNotAllowed",
        "Operation could not be completed as it results in exceeding approved standardDSv5Family Cores quota.",
    ));
    p.create(1).await.expect_err("quota");
    assert_eq!(patches(), 1);
    fake.state().op_failure = None;
    // Ticks within 30 s: refused without a request, saying when the next try is.
    tokio::time::advance(Duration::from_secs(10)).await;
    let err = p.create(1).await.expect_err("backing off");
    assert!(err.message.contains("trying again in"), "{err}");
    assert_eq!(patches(), 1);
    tokio::time::advance(Duration::from_secs(21)).await;
    p.create(1).await.expect("quota raised");
    assert_eq!(patches(), 2);
    assert_eq!(fake.state().capacity, 2);
}

#[tokio::test(start_paused = true)]
async fn a_failed_protection_counts_as_an_autoscaler_error() {
    let fake = FakeArm::start(2, |s| s.polls_per_op = 1).await;
    let (driver, pool, _clock) = driver_over(&fake, false).await;
    // A session on one VM: the driver asks for its protection, and ARM refuses.
    let _session = a_session_on_healthy_vms(&pool);
    fake.state().fail_next = Some((
        403,
        "AuthorizationFailed",
        "The client 'poolgate' does not have authorization to perform action 'Microsoft.Compute/virtualMachineScaleSets/virtualMachines/write'.",
    ));
    driver.tick().await;
    let errors = || {
        driver
            .metrics
            .autoscale_actions_total
            .with_label_values(&["error"])
            .get()
    };
    assert_eq!(errors(), 1);
    assert_eq!(
        fake.state()
            .arm_log()
            .iter()
            .filter(|l| l.method == "PUT")
            .count(),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn a_start_refused_for_lack_of_capacity_falls_back_to_creating() {
    let fake = FakeArm::start(1, |s| {
        s.polls_per_op = 1;
        if let Some(i) = s.instances.get_mut(&0) {
            i.power = "deallocated".into();
        }
    })
    .await;
    let (driver, _pool, _clock) = driver_over(&fake, true).await;
    let _waiting = driver.wait_guard(router_core::Protocol::Ssh);
    fake.state().fail_next = Some((
        409,
        "AllocationFailed",
        "Allocation failed. We do not have sufficient capacity for the requested VM size in this region.",
    ));
    driver.tick().await;
    let s = fake.state();
    let writes: Vec<String> = summary(&s.arm_log())
        .into_iter()
        .filter(|l| !l.starts_with("GET"))
        .collect();
    assert!(
        writes.first().is_some_and(|w| w.ends_with("/start")),
        "{writes:?}"
    );
    // The start failed for lack of capacity: new instances instead of waiting on it.
    assert!(writes.iter().any(|w| w == "PATCH {vmss}"), "{writes:?}");
    assert!(s.capacity > 1, "capacity raised: {}", s.capacity);
    drop(s);
    assert_eq!(
        driver
            .metrics
            .autoscale_actions_total
            .with_label_values(&["create"])
            .get(),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn twenty_users_at_once_on_a_sleeping_pool_cost_one_start_and_one_capacity_write() {
    // Three deallocated instances; twenty people connect at 9:00 (max_vms 5, 4 sessions per VM).
    let fake = FakeArm::start(3, |s| {
        s.polls_per_op = 2;
        for i in s.instances.values_mut() {
            i.power = "deallocated".into();
        }
    })
    .await;
    let (driver, pool, _clock) = driver_over(&fake, true).await;
    let _waiting: Vec<_> = (0..20)
        .map(|_| driver.wait_guard(router_core::Protocol::Ssh))
        .collect();
    let running = || {
        pool.snapshot()
            .vms()
            .iter()
            .filter(|vm| vm.status().lifecycle == Lifecycle::Running)
            .count()
    };
    let mut ticks = 0;
    loop {
        driver.tick().await;
        ticks += 1;
        if running() == 5 || ticks == 20 {
            break;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let s = fake.state();
    let log = s.arm_log();
    let writes: Vec<&Logged> = log.iter().filter(|l| l.method != "GET").collect();
    // The stopped instances are started in one call, the rest created in one capacity write:
    // two writes for twenty users, within max_vms, not one per user.
    assert_eq!(writes.len(), 2, "{:?}", summary(&log));
    let start = writes
        .iter()
        .find(|l| l.path == format!("{}/start", vmss_path()))
        .expect("one start");
    assert_eq!(
        start.body,
        Some(json!({"instanceIds": ["0", "1", "2"]})),
        "{:?}",
        summary(&log)
    );
    assert!(
        writes
            .iter()
            .any(|l| l.method == "PATCH" && l.body == Some(json!({"sku": {"capacity": 5}}))),
        "{:?}",
        summary(&log)
    );
    assert_eq!(s.capacity, 5);
    drop(s);
    assert_eq!(running(), 5, "all five serve within {ticks} ticks");
}
