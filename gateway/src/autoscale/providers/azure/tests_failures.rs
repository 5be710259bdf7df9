//! Failure modes against the fake ARM server, with ARM's own error answers
//! (`fake/examples/ArmErrors.json`): writes that fail back off per instance, every request is
//! counted by status code, and instances that never come up are exported and deleted by their
//! exact ids when the pool grows. Paused tokio clock: backoffs and polls cost no real time.

use std::sync::Arc;
use std::time::Duration;

use poolgate_config::{Azure, Orchestration};
use router_core::Lifecycle;
use serde_json::json;

use super::arm::Tuning;
use super::fake::{FakeArm, Logged, RG, SUB, vmss_path};
use super::tests::{
    a_session_on_healthy_vms, config, driver_over, provider, provider_with, summary,
};
use super::{AzureProvider, Provider};
use crate::metrics::Metrics;

fn posts_to(log: &[Logged], suffix: &str) -> Vec<Logged> {
    log.iter()
        .filter(|l| l.method == "POST" && l.path.ends_with(suffix))
        .cloned()
        .collect()
}

fn deallocated(fake: &FakeArm, ids: &[u32]) {
    let mut s = fake.state();
    for id in ids {
        if let Some(i) = s.instances.get_mut(id) {
            i.power = "deallocated".into();
        }
    }
}

/// The `sku.capacity` values the provider wrote, in order.
fn written_capacities(log: &[Logged]) -> Vec<u64> {
    log.iter()
        .filter(|l| l.method == "PATCH")
        .filter_map(|l| l.body.as_ref()?.pointer("/sku/capacity")?.as_u64())
        .collect()
}

fn requests(metrics: &Metrics, operation: &str, method: &str, code: &str) -> u64 {
    metrics
        .azure_requests_total
        .with_label_values(&[operation, method, code])
        .get()
}

#[tokio::test(start_paused = true)]
async fn a_start_refused_for_quota_is_not_sent_again_for_that_instance_before_its_backoff() {
    let fake = FakeArm::start(3, |s| s.polls_per_op = 1).await;
    deallocated(&fake, &[1, 2]);
    let metrics = Arc::new(Metrics::new());
    let p = provider(&fake).with_metrics(metrics.clone());
    p.list().await.expect("list");
    let starts = || posts_to(&fake.state().arm_log(), "/start").len();

    // ARM's cores-quota answer (409 OperationNotAllowed).
    fake.state().fail_next_example = Some("QuotaExceeded");
    let err = p.start(&["dsvm_1".to_owned()]).await.expect_err("quota");
    assert!(err.message.contains("quota increase"), "{err}");
    assert!(!err.message.contains("another operation"), "{err}");
    assert!(!err.no_capacity);
    assert_eq!(starts(), 1);
    assert_eq!(requests(&metrics, "start", "POST", "409"), 1);

    // The next ticks: refused without a request, saying when the next try is.
    tokio::time::advance(Duration::from_secs(10)).await;
    let err = p
        .start(&["dsvm_1".to_owned()])
        .await
        .expect_err("backing off");
    assert!(
        err.message.contains("not sent for dsvm_1 (in 20s)"),
        "{err}"
    );
    assert!(!err.no_capacity, "a quota error is no lack of capacity");
    assert_eq!(starts(), 1);

    // Another instance is not held back by it.
    p.start(&["dsvm_2".to_owned()]).await.expect("start dsvm_2");
    assert_eq!(starts(), 2);

    // After 30 s the instance is tried again; a second failure doubles the wait.
    tokio::time::advance(Duration::from_secs(21)).await;
    fake.state().fail_next_example = Some("QuotaExceeded");
    p.start(&["dsvm_1".to_owned()])
        .await
        .expect_err("still no quota");
    assert_eq!(starts(), 3);
    tokio::time::advance(Duration::from_secs(45)).await;
    let err = p
        .start(&["dsvm_1".to_owned()])
        .await
        .expect_err("backing off");
    assert!(err.message.contains("(in 15s)"), "{err}");
    assert_eq!(starts(), 3);
    tokio::time::advance(Duration::from_secs(16)).await;
    p.start(&["dsvm_1".to_owned()]).await.expect("quota raised");
    assert_eq!(starts(), 4);
    assert_eq!(
        fake.state().instances.get(&1).map(|i| i.power.clone()),
        Some("running".to_owned())
    );
}

#[tokio::test(start_paused = true)]
async fn an_allocation_failure_on_start_still_says_no_capacity_while_backing_off() {
    let fake = FakeArm::start(2, |s| s.polls_per_op = 1).await;
    deallocated(&fake, &[1]);
    let p = provider(&fake);
    p.list().await.expect("list");
    // The start is accepted (202); its operation ends Failed with AllocationFailed.
    fake.state().op_failure_example = Some("AllocationFailed");
    let err = p
        .start(&["dsvm_1".to_owned()])
        .await
        .expect_err("no capacity");
    assert!(err.no_capacity, "{err}");
    assert!(err.message.contains("AllocationFailed"), "{err}");
    fake.state().op_failure_example = None;
    let before = fake.state().arm_log().len();
    let err = p
        .start(&["dsvm_1".to_owned()])
        .await
        .expect_err("backing off");
    // Still "no capacity", so the driver creates a new instance instead of waiting for this one.
    assert!(err.no_capacity, "{err}");
    assert!(err.message.contains("Azure had no capacity"), "{err}");
    assert_eq!(
        fake.state().arm_log().len(),
        before,
        "no request while backing off"
    );
}

#[tokio::test(start_paused = true)]
async fn driver_does_not_send_a_failed_start_again_every_tick() {
    let fake = FakeArm::start(1, |s| s.polls_per_op = 1).await;
    deallocated(&fake, &[0]);
    let (driver, _pool, _clock) = driver_over(&fake, true).await;
    let _waiting = driver.wait_guard(router_core::Protocol::Ssh);
    fake.state().fail_next_example = Some("QuotaExceeded");
    driver.tick().await;
    // Ticks every 5 s for 25 s, each after a fresh listing (the instance is stopped again).
    for _ in 0..5 {
        tokio::time::advance(Duration::from_secs(5)).await;
        driver.sync().await.expect("sync");
        driver.tick().await;
    }
    let log = fake.state().arm_log();
    assert_eq!(posts_to(&log, "/start").len(), 1, "{:?}", summary(&log));
    assert!(
        !log.iter().any(|l| l.method == "PATCH"),
        "a quota error does not fall back to creating: {:?}",
        summary(&log)
    );
    assert_eq!(
        driver
            .metrics
            .autoscale_actions_total
            .with_label_values(&["error"])
            .get(),
        6,
        "every refused tick is still an error"
    );
    // Past the backoff the start goes out again (and succeeds).
    tokio::time::advance(Duration::from_secs(6)).await;
    driver.sync().await.expect("sync");
    driver.tick().await;
    let s = fake.state();
    assert_eq!(posts_to(&s.arm_log(), "/start").len(), 2);
    assert_eq!(
        s.instances.get(&0).map(|i| i.power.as_str()),
        Some("running")
    );
}

#[tokio::test(start_paused = true)]
async fn driver_starts_another_stopped_instance_while_one_backs_off() {
    let fake = FakeArm::start(3, |s| s.polls_per_op = 1).await;
    deallocated(&fake, &[0, 1, 2]);
    let (driver, _pool, _clock) = driver_over(&fake, true).await;
    let _waiting = driver.wait_guard(router_core::Protocol::Ssh);
    // The aim is two VMs (one waiting session, one spare): dsvm_0 and dsvm_1 come first, and
    // their start is refused for quota.
    fake.state().fail_next_example = Some("QuotaExceeded");
    driver.tick().await;
    tokio::time::advance(Duration::from_secs(5)).await;
    driver.sync().await.expect("sync");
    // The next decision asks for dsvm_2 first, not again for the two backing off.
    driver.tick().await;
    let s = fake.state();
    let starts: Vec<Option<serde_json::Value>> = posts_to(&s.arm_log(), "/start")
        .into_iter()
        .map(|l| l.body)
        .collect();
    assert_eq!(
        starts,
        vec![
            Some(json!({"instanceIds": ["0", "1"]})),
            Some(json!({"instanceIds": ["2"]}))
        ],
        "{:?}",
        summary(&s.arm_log())
    );
    assert_eq!(
        s.instances.get(&2).map(|i| i.power.as_str()),
        Some("running")
    );
}

#[tokio::test(start_paused = true)]
async fn arm_requests_are_counted_by_operation_method_and_status_code() {
    let fake = FakeArm::start(1, |s| {
        s.polls_per_op = 2;
        // Compute's throttling answer with Retry-After as an HTTP date.
        s.throttle_next = 1;
        s.throttle_until_date = Some(3);
        s.read_budget = Some(100);
    })
    .await;
    let metrics = Arc::new(Metrics::new());
    let p = provider(&fake).with_metrics(metrics.clone());
    let budget = || {
        metrics
            .azure_ratelimit_remaining
            .with_label_values(&["Microsoft.Compute/HighCostGetVMScaleSet3Min"])
            .get()
    };
    let t0 = tokio::time::Instant::now();
    p.list().await.expect("list after one 429");
    assert!(
        t0.elapsed() >= Duration::from_secs(1),
        "Retry-After date honoured"
    );
    assert_eq!(requests(&metrics, "list", "GET", "429"), 1);
    assert_eq!(
        requests(&metrics, "list", "GET", "200"),
        3,
        "the scale set (once), instances, NICs"
    );
    // The policy the answers name, as the last one said: 100 less the three reads (the 429
    // said 0).
    assert_eq!(budget(), 97);
    p.create(1).await.expect("create");
    assert_eq!(
        requests(&metrics, "create", "GET", "200"),
        3,
        "the scale set, then two polls"
    );
    assert_eq!(requests(&metrics, "create", "PATCH", "200"), 1);
    let pool = router_core::Pool::new(
        router_core::RoutingPolicy::default(),
        Arc::new(router_core::SystemClock),
    );
    let text = metrics.render(&pool);
    assert!(
        text.contains(
            "poolgate_azure_requests_total{code=\"429\",method=\"GET\",operation=\"list\"} 1"
        ),
        "{text}"
    );

    // A request without an answer is counted too.
    let closed = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        listener.local_addr().expect("addr")
    };
    let config = Azure {
        arm_endpoint: Some(format!("https://localhost:{}", closed.port())),
        ..config(&fake, Orchestration::Uniform)
    };
    let tuning = Tuning {
        request_timeout: None,
        ..Tuning::default()
    };
    let unreachable = AzureProvider::with_client(&config, tuning.clone(), fake.client())
        .expect("provider")
        .with_metrics(metrics.clone());
    let err = unreachable.list().await.expect_err("nothing listens");
    // A failed connection is retried like a 503, then reported.
    let tries = u64::from(tuning.max_retries) + 1;
    assert_eq!(requests(&metrics, "list", "GET", "unanswered"), tries);
    assert!(err.message.contains("cannot reach ARM"), "{err}");
    assert!(
        err.message.contains(&format!("tried {tries} times")),
        "{err}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_instance_stuck_without_power_state_is_exported_and_deleted_when_the_pool_grows() {
    let fake = FakeArm::start(2, |s| {
        s.polls_per_op = 1;
        if let Some(i) = s.instances.get_mut(&1) {
            // A create that never finishes: no power state, no NIC.
            i.power = String::new();
            i.provisioning = "Creating".into();
            i.ip = String::new();
        }
    })
    .await;
    let metrics = Arc::new(Metrics::new());
    let p = provider(&fake).with_metrics(metrics.clone());
    let failed = |vm: &str, reason: &str| {
        metrics
            .azure_instance_failed
            .with_label_values(&[vm, reason])
            .get()
    };
    p.list().await.expect("list");
    assert_eq!(failed("dsvm_1", "start_timeout"), 0);
    // Not deleted while it may still come up.
    p.create(1).await.expect("create");
    assert!(posts_to(&fake.state().arm_log(), "/delete").is_empty());
    tokio::time::advance(Duration::from_secs(20 * 60)).await;
    p.list().await.expect("list");
    assert_eq!(failed("dsvm_1", "start_timeout"), 1);

    let before = fake.state().arm_log().len();
    p.create(1).await.expect("create");
    {
        let s = fake.state();
        let log = s.arm_log();
        let writes: Vec<String> = summary(&log[before..])
            .into_iter()
            .filter(|l| !l.starts_with("GET"))
            .collect();
        // New capacity first, then the exact failed instance goes (sent, not waited for).
        assert_eq!(writes, ["PATCH {vmss}", "POST {vmss}/delete"]);
        let deletes = posts_to(&log, "/delete");
        assert_eq!(deletes[0].body, Some(json!({"instanceIds": ["1"]})));
    }
    assert_eq!(
        metrics
            .autoscale_actions_total
            .with_label_values(&["delete_failed"])
            .get(),
        1
    );
    // While it is being deleted it is on its way out, not failed again (no second delete).
    let vms = p.list().await.expect("list");
    assert_eq!(
        vms.iter()
            .find(|v| v.spec.name == "dsvm_1")
            .map(|v| v.lifecycle),
        Some(Lifecycle::Stopping)
    );
    assert_eq!(failed("dsvm_1", "start_timeout"), 0);
    p.create(1).await.expect("create");
    assert_eq!(posts_to(&fake.state().arm_log(), "/delete").len(), 1);
    // ARM finishes the delete in the background: gone, and capacity was never lowered by us.
    {
        let mut s = fake.state();
        s.instances.remove(&1);
        s.capacity -= 1;
    }
    let vms = p.list().await.expect("list");
    assert!(vms.iter().all(|v| v.spec.name != "dsvm_1"));
    let capacities = written_capacities(&fake.state().arm_log());
    assert_eq!(capacities, [3, 4, 5], "capacity is only ever raised");
}

#[tokio::test(start_paused = true)]
async fn provisioning_failed_instances_are_deleted_unless_they_may_have_sessions() {
    let fake = FakeArm::start(5, |s| {
        s.polls_per_op = 1;
        let set = |s: &mut super::fake::State, id: u32, power: &str, protect: bool| {
            if let Some(i) = s.instances.get_mut(&id) {
                i.provisioning = "Failed".into();
                i.power = power.into();
                i.protect = protect;
            }
        };
        // Creations that failed (no power state): deleted unless they may have sessions.
        set(s, 1, "", false); // never served: deleted
        set(s, 2, "", true); // protected (it had sessions): kept
        set(s, 3, "", false); // the driver wanted it protected: kept
        // Running, its last operation failed (an extension, say): it serves; not deleted.
        set(s, 4, "running", false);
    })
    .await;
    let metrics = Arc::new(Metrics::new());
    let p = provider(&fake).with_metrics(metrics.clone());
    p.list().await.expect("list");
    // The driver asked to protect dsvm_3 (sessions); ARM refused the write.
    fake.state().fail_next_example = Some("LinkedAuthorizationFailed");
    let err = p
        .protect(&[("dsvm_3".to_owned(), true)])
        .await
        .expect_err("linked authorization");
    assert!(err.message.contains("linked resource"), "{err}");
    let vms = p.list().await.expect("list");
    let lifecycle = |name: &str| {
        vms.iter()
            .find(|v| v.spec.name == name)
            .map(|v| v.lifecycle)
    };
    assert_eq!(lifecycle("dsvm_4"), Some(Lifecycle::Running));
    assert_eq!(
        metrics
            .azure_instance_failed
            .with_label_values(&["dsvm_4", "provisioning_failed"])
            .get(),
        0
    );
    for vm in ["dsvm_1", "dsvm_2", "dsvm_3"] {
        assert_eq!(lifecycle(vm), Some(Lifecycle::Stopping), "{vm}");
        assert_eq!(
            metrics
                .azure_instance_failed
                .with_label_values(&[vm, "provisioning_failed"])
                .get(),
            1,
            "{vm}"
        );
    }
    p.create(1).await.expect("create");
    let log = fake.state().arm_log();
    let deletes = posts_to(&log, "/delete");
    assert_eq!(deletes.len(), 1, "{:?}", summary(&log));
    assert_eq!(deletes[0].body, Some(json!({"instanceIds": ["1"]})));
    assert_eq!(
        metrics
            .autoscale_actions_total
            .with_label_values(&["delete_failed"])
            .get(),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn a_linked_authorization_failure_on_protection_is_counted_and_backed_off() {
    let fake = FakeArm::start(2, |s| s.polls_per_op = 1).await;
    let metrics = Arc::new(Metrics::new());
    let p = provider(&fake).with_metrics(metrics.clone());
    p.list().await.expect("list");
    let want = [("dsvm_1".to_owned(), true)];
    fake.state().fail_next_example = Some("LinkedAuthorizationFailed");
    let err = p.protect(&want).await.expect_err("403");
    assert!(err.message.contains("LinkedAuthorizationFailed"), "{err}");
    assert!(
        err.message
            .contains("lacks the action ARM names on a linked resource"),
        "{err}"
    );
    assert!(!err.message.contains("  "), "no runs of spaces: {err}");
    assert!(
        !err.message.contains("Virtual Machine Contributor"),
        "{err}"
    );
    assert_eq!(requests(&metrics, "protect", "PUT", "403"), 1);
    tokio::time::advance(Duration::from_secs(10)).await;
    p.protect(&want).await.expect("backing off");
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
async fn flexible_members_are_protected_by_vm_name_from_api_version_2023_09_01() {
    let fake = FakeArm::start(2, |s| {
        s.flexible = true;
        s.polls_per_op = 1;
    })
    .await;
    let p = provider_with(&fake, Orchestration::Flexible);
    p.list().await.expect("list");
    p.protect(&[("dsvm_00000001".to_owned(), true)])
        .await
        .expect("protect");
    {
        let s = fake.state();
        let log = s.arm_log();
        let puts: Vec<&Logged> = log.iter().filter(|l| l.method == "PUT").collect();
        assert_eq!(puts.len(), 1);
        assert_eq!(
            puts[0].path,
            format!("{}/virtualMachines/dsvm_00000001", vmss_path())
        );
        assert_eq!(
            puts[0].body,
            Some(json!({"properties": {"protectionPolicy": {"protectFromScaleIn": true}}}))
        );
        assert!(s.instances.get(&1).is_some_and(|i| i.protect));
    }
    // An older api-version cannot: nothing is sent (ARM would refuse a non-numeric id).
    let old = Azure {
        api_version: "2023-07-01".into(),
        ..config(&fake, Orchestration::Flexible)
    };
    let tuning = Tuning {
        request_timeout: None,
        ..Tuning::default()
    };
    let p = AzureProvider::with_client(&old, tuning, fake.client()).expect("provider");
    p.list().await.expect("list");
    p.protect(&[("dsvm_00000000".to_owned(), true)])
        .await
        .expect("nothing to do");
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
async fn flexible_lists_with_the_quoted_filter_and_deletes_failed_members_by_name() {
    let fake = FakeArm::start(3, |s| {
        s.flexible = true;
        s.polls_per_op = 1;
        if let Some(i) = s.instances.get_mut(&1) {
            // Its creation failed: no power state, no NIC.
            i.provisioning = "Failed".into();
            i.power = String::new();
            i.ip = String::new();
        }
        if let Some(i) = s.instances.get_mut(&2) {
            // Running, its last operation failed: it serves, and is not deleted.
            i.provisioning = "Failed".into();
        }
    })
    .await;
    let p = provider_with(&fake, Orchestration::Flexible);
    p.list().await.expect("list");
    {
        let s = fake.state();
        let list = s
            .arm_log()
            .into_iter()
            .find(|l| l.path.ends_with("/Microsoft.Compute/virtualMachines"))
            .expect("a VM listing");
        assert_eq!(
            list.query.get("$filter").map(String::as_str),
            Some(format!("'virtualMachineScaleSet/id' eq '{}'", vmss_path()).as_str())
        );
    }
    p.create(1).await.expect("create");
    let s = fake.state();
    let deletes: Vec<String> = summary(&s.arm_log())
        .into_iter()
        .filter(|l| l.starts_with("DELETE"))
        .collect();
    assert_eq!(
        deletes,
        [format!(
            "DELETE /subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/virtualMachines/dsvm_00000001"
        )]
    );
}

#[tokio::test(start_paused = true)]
async fn a_reused_instance_id_starts_without_the_old_instances_backoff() {
    let fake = FakeArm::start(2, |s| s.polls_per_op = 1).await;
    deallocated(&fake, &[1]);
    let p = provider(&fake);
    p.list().await.expect("list");
    fake.state().fail_next_example = Some("QuotaExceeded");
    p.start(&["dsvm_1".to_owned()]).await.expect_err("quota");
    // The instance is deleted by hand; a listing without it; Azure reuses its id later.
    let old = fake.state().instances.remove(&1).expect("instance 1");
    p.list().await.expect("list");
    fake.state().instances.insert(1, old);
    p.list().await.expect("list");
    p.start(&["dsvm_1".to_owned()])
        .await
        .expect("a new instance: no backoff");
    assert_eq!(posts_to(&fake.state().arm_log(), "/start").len(), 2);
}

#[tokio::test(start_paused = true)]
async fn instance_writes_follow_both_answers_of_the_official_examples() {
    let example = super::tests::example_request("VirtualMachineScaleSet_Start_MaximumSet_Gen.json");
    let keys = |v: &serde_json::Value| -> Vec<String> {
        v.as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    };
    let documented = keys(&example["parameters"]["vmInstanceIDs"]);
    let delete_example =
        super::tests::example_request("VirtualMachineScaleSet_DeleteInstances_MaximumSet_Gen.json");
    assert_eq!(
        keys(&delete_example["parameters"]["vmInstanceIDs"]),
        documented
    );

    // "200": {} — done at once, nothing to poll.
    let fake = FakeArm::start(3, |s| s.sync_writes = true).await;
    deallocated(&fake, &[1]);
    let p = provider(&fake);
    p.list().await.expect("list");
    p.start(&["dsvm_1".to_owned()]).await.expect("start");
    p.delete(&["dsvm_2".to_owned()]).await.expect("delete");
    {
        let s = fake.state();
        let log = s.arm_log();
        assert!(
            !log.iter().any(|l| l.path.contains("/operations/")),
            "{:?}",
            summary(&log)
        );
        for post in posts_to(&log, "/start")
            .iter()
            .chain(posts_to(&log, "/delete").iter())
        {
            assert_eq!(post.body.as_ref().map(keys), Some(documented.clone()));
        }
        assert_eq!(
            s.instances.get(&1).map(|i| i.power.as_str()),
            Some("running")
        );
        assert!(!s.instances.contains_key(&2));
    }

    // "202" with only a location header — polled until it stops answering 202.
    let fake = FakeArm::start(2, |s| {
        s.location_only = true;
        s.polls_per_op = 3;
    })
    .await;
    deallocated(&fake, &[1]);
    let p = provider(&fake);
    p.list().await.expect("list");
    p.start(&["dsvm_1".to_owned()]).await.expect("start");
    let s = fake.state();
    let polls = s
        .arm_log()
        .iter()
        .filter(|l| l.path.contains("/operations/"))
        .count();
    assert_eq!(polls, 3);
    assert_eq!(
        s.instances.get(&1).map(|i| i.power.as_str()),
        Some("running")
    );
}

#[tokio::test(start_paused = true)]
async fn no_capacity_is_added_while_the_listing_fails_after_a_create() {
    // Writes go through, reads are refused (a role scoped to the scale set cannot list the
    // NICs; or the read budget is used up): the instances a create added are never listed.
    // Before, every decision found the pool short and raised sku.capacity again, past max_vms.
    let fake = FakeArm::start(0, |s| s.polls_per_op = 1).await;
    let (driver, pool, _clock) = driver_over(&fake, true).await;
    let _waiting = driver.wait_guard(router_core::Protocol::Ssh);
    fake.state().fail_listing = Some((403, "AuthorizationFailed", "no read permission"));
    driver.tick().await;
    // One for the waiting user, plus the policy's spare VM.
    assert_eq!(fake.state().capacity, 2);
    let view = crate::autoscale::AutoscaleStatus::view(driver.as_ref());
    let why = view
        .provider_error
        .expect("the status says why nothing happens");
    assert!(why.contains("AuthorizationFailed"), "{why}");
    for _ in 0..5 {
        assert!(driver.sync().await.is_err());
        driver.tick().await;
    }
    {
        let s = fake.state();
        assert_eq!(s.capacity, 2, "{:?}", summary(&s.arm_log()));
        assert!(
            !s.arm_log()
                .iter()
                .any(|l| l.method == "POST" || l.method == "DELETE"),
            "nothing started, stopped or deleted on a stale view"
        );
    }
    // Reads work again: the instances are listed, and the aim is met without more capacity.
    fake.state().fail_listing = None;
    driver.sync().await.expect("sync");
    assert_eq!(pool.snapshot().vms().len(), 2);
    driver.tick().await;
    assert_eq!(fake.state().capacity, 2);
    let view = crate::autoscale::AutoscaleStatus::view(driver.as_ref());
    assert_eq!(view.provider_error, None);
}

#[tokio::test(start_paused = true)]
async fn a_flexible_scale_set_configured_as_uniform_is_listed_as_flexible() {
    // New scale sets are Flexible by default, and `pool.azure.orchestration` defaults to
    // "uniform": listed the Uniform way, every listing failed (the scale set has no instance
    // routes). The scale set's own orchestrationMode decides.
    let fake = FakeArm::start(2, |s| s.flexible = true).await;
    let p = provider_with(&fake, Orchestration::Uniform);
    let vms = p.list().await.expect("listed the Flexible way");
    assert_eq!(vms.len(), 2);
    assert_eq!(p.orchestration(), Orchestration::Flexible);
    {
        let s = fake.state();
        assert!(
            s.arm_log()
                .iter()
                .any(|l| l.path.ends_with("/Microsoft.Compute/virtualMachines")),
            "{:?}",
            summary(&s.arm_log())
        );
    }
    // And the other way round.
    let fake = FakeArm::start(2, |_| {}).await;
    let p = provider_with(&fake, Orchestration::Flexible);
    assert_eq!(p.list().await.expect("listed the Uniform way").len(), 2);
    assert_eq!(p.orchestration(), Orchestration::Uniform);
}

#[tokio::test(start_paused = true)]
async fn two_creates_at_once_each_add_their_instances() {
    // Each reads sku.capacity and writes capacity + n: read and write under one lock, so the
    // second reads what the first wrote.
    let fake = FakeArm::start(2, |s| s.polls_per_op = 3).await;
    let p = provider(&fake);
    p.list().await.expect("list");
    let (a, b) = tokio::join!(p.create(1), p.create(2));
    a.expect("first create");
    b.expect("second create");
    let s = fake.state();
    let capacities = written_capacities(&s.arm_log());
    assert_eq!(capacities.len(), 2);
    assert_eq!(s.capacity, 5, "2 + 1 + 2: {capacities:?}");
}

#[tokio::test(start_paused = true)]
async fn a_slow_protection_write_does_not_hold_up_the_scale_out_users_wait_for() {
    // Each protection write is followed to its end (here 6 polls, a second each): the capacity
    // raise for the users waiting is sent meanwhile, not after it.
    let fake = FakeArm::start(2, |s| s.polls_per_op = 6).await;
    let (driver, pool, _clock) = driver_over(&fake, false).await;
    let _session = a_session_on_healthy_vms(&pool);
    let _waiting: Vec<_> = (0..8)
        .map(|_| driver.wait_guard(router_core::Protocol::Ssh))
        .collect();
    driver.tick().await;
    let log = summary(&fake.state().arm_log());
    let put = log
        .iter()
        .position(|l| l.starts_with("PUT"))
        .expect("a protection write");
    let patch = log
        .iter()
        .position(|l| l == "PATCH {vmss}")
        .expect("a capacity raise");
    let polls_between = log[put..patch]
        .iter()
        .filter(|l| *l == "GET {operation}")
        .count();
    assert!(polls_between < 6, "{log:?}");
}
