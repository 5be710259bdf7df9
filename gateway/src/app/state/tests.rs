use std::os::unix::fs::PermissionsExt;

use prometheus::IntGauge;
use router_core::{RoutingPolicy, SystemClock, VmSpec};

use super::*;

/// A driver over `pool` and `provider`, for a pool of up to two VMs.
fn driver_over(
    pool: &Arc<Pool>,
    provider: Arc<dyn crate::autoscale::providers::Provider>,
    enabled: bool,
) -> Arc<Driver> {
    let settings = crate::autoscale::DriverSettings {
        enabled,
        ..crate::autoscale::DriverSettings::for_tests(router_core::autoscale::AutoscaleConfig {
            min_vms: 0,
            max_vms: 2,
            sessions_per_vm: 4,
            spare_vms: 0,
            scale_in_after: Duration::from_secs(60),
            scale_to_zero_after: Duration::from_secs(60),
            cooldown: Duration::ZERO,
        })
    };
    Driver::new(
        pool.clone(),
        provider,
        settings,
        Arc::new(crate::metrics::Metrics::new()),
    )
}

/// A driver over `pool` with autoscaling off: enough to hold and report scale-in drains.
pub(in crate::app) fn driver(pool: &Arc<Pool>) -> Arc<Driver> {
    let provider = crate::autoscale::providers::StaticProvider::new(Vec::new());
    driver_over(pool, Arc::new(provider), false)
}

/// A driver over `pool` that scales (its provider's commands never run here): scale-in drains
/// are its own.
pub(in crate::app) fn scaling_driver(pool: &Arc<Pool>) -> Arc<Driver> {
    use crate::autoscale::providers::exec::{ExecProvider, ExecSettings};
    let never = || Some(vec!["false".to_owned()]);
    let provider = ExecProvider::new(ExecSettings {
        list: vec!["false".to_owned()],
        start: never(),
        stop: never(),
        create: None,
        delete: None,
        timeout: Duration::from_secs(1),
        defaults: VmSpec::new("defaults", "127.0.0.1"),
    });
    let driver = driver_over(pool, Arc::new(provider), true);
    assert!(driver.scales());
    driver
}

/// The pool's draining VMs, by name.
pub(in crate::app) fn draining(pool: &Pool) -> Vec<String> {
    pool.snapshot()
        .vms()
        .iter()
        .filter(|vm| vm.status().draining)
        .map(|vm| vm.name().to_owned())
        .collect()
}

fn gauge() -> IntGauge {
    IntGauge::new("state_file_failing", "test").unwrap()
}

fn pool(names: &[&str]) -> Arc<Pool> {
    let pool = Arc::new(Pool::new(RoutingPolicy::default(), Arc::new(SystemClock)));
    pool.set_vms(names.iter().map(|n| VmSpec::new(*n, "127.0.0.1")).collect());
    pool
}

/// What a gateway over `pool` writes at exit, having started with no file to read.
fn saved_at_exit(path: &Path, pool: &Arc<Pool>) {
    let keeper = StateKeeper::new(path.to_owned(), pool.clone(), driver(pool), gauge());
    keeper.adopted(None);
    keeper.finish();
}

fn affinity(pool: &Pool, user: &str) -> Option<String> {
    let now = pool.clock().now();
    pool.store()
        .affinity(user, now, pool.policy().affinity_ttl)
        .map(|vm| vm.to_string())
}

#[test]
fn drains_and_affinity_survive_a_restart_through_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run").join("state.json");
    let old = pool(&["vm-a", "vm-b", "vm-c"]);
    let old_driver = driver(&old);
    old.drain("vm-a");
    old.drain("vm-c");
    old_driver.inherit_scale_in_drains(&["vm-c".to_owned()]);
    let now = old.clock().now();
    old.store().session_started("alice", "vm-b", now);
    old.store().session_started("bob", "vm-c", now);
    old.store().session_ended("bob", "vm-c", now);
    let file = StateKeeper::new(path.clone(), old.clone(), old_driver, gauge());
    file.restore();
    file.finish();

    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    let dir_mode = std::fs::metadata(path.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o777, 0o700, "{dir_mode:o}");
    let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["state.json"], "no temporary file is left");

    let new = pool(&["vm-a", "vm-b", "vm-c"]);
    let new_driver = scaling_driver(&new);
    let file = StateKeeper::new(path.clone(), new.clone(), new_driver.clone(), gauge());
    file.restore();
    assert!(
        file.pending.lock().unwrap().is_none(),
        "nothing waits for the pool"
    );
    assert_eq!(draining(&new), ["vm-a", "vm-c"]);
    assert_eq!(new_driver.scale_in_drains(), ["vm-c"]);
    assert_eq!(affinity(&new, "alice").as_deref(), Some("vm-b"));
    assert_eq!(affinity(&new, "bob").as_deref(), Some("vm-c"));
    assert_eq!(affinity(&new, "carol"), None);
}

#[test]
fn a_drain_of_a_vm_no_longer_in_the_pool_is_dropped_and_one_before_the_first_listing_waits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    let old = pool(&["vm-a", "vm-gone"]);
    old.drain("vm-a");
    old.drain("vm-gone");
    saved_at_exit(&path, &old);

    let new = pool(&["vm-a"]);
    let restored = load(&path)
        .unwrap()
        .unwrap()
        .remembered
        .restore_drains(&new, &driver(&new));
    assert_eq!(restored.drained, ["vm-a"]);
    assert_eq!(restored.unknown, ["vm-gone"]);

    // The provider has not listed the pool yet: the drains wait.
    let empty = pool(&[]);
    let file = StateKeeper::new(path, empty.clone(), driver(&empty), gauge());
    file.restore();
    let pending = file.pending.lock().unwrap();
    assert_eq!(
        pending
            .as_ref()
            .expect("drains wait")
            .remembered
            .drained
            .len(),
        2
    );
}

#[test]
fn an_entry_older_than_the_affinity_ttl_is_not_restored() {
    let pool = pool(&["vm-a"]);
    let ttl = pool.policy().affinity_ttl;
    let remembered = Remembered {
        affinity: BTreeMap::from([
            ("old".to_owned(), ("vm-a".to_owned(), ttl.as_secs() - 10)),
            ("fresh".to_owned(), ("vm-a".to_owned(), 10)),
        ]),
        ..Remembered::default()
    };
    // The file was written 20 s before the start: "old" has lapsed meanwhile.
    assert_eq!(
        remembered.restore_affinity(&pool, Duration::from_secs(20)),
        1
    );
    assert_eq!(affinity(&pool, "old"), None);
    assert_eq!(affinity(&pool, "fresh").as_deref(), Some("vm-a"));
}

#[test]
fn an_unreadable_file_is_reported_and_a_missing_one_is_none() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    assert!(load(&path).unwrap().is_none());
    std::fs::write(&path, "{\"format\": 1, \"saved_unix\": 0, \"drain").unwrap();
    let invalid = |want: &str| match load(&path) {
        Err(LoadError::Invalid(e)) => assert!(e.contains(want), "{e}"),
        other => panic!("{other:?}"),
    };
    invalid("EOF");
    assert!(
        load(&path.join("state.json")).unwrap().is_none(),
        "a path through a regular file holds nothing"
    );
    std::fs::write(&path, "{\"format\": 9, \"saved_unix\": 0, \"drained\": []}").unwrap();
    invalid("newer poolgate (format 9");
    std::fs::write(&path, vec![b' '; (MAX_FILE + 1) as usize]).unwrap();
    invalid("larger than 32 MiB");
    // A start with a bad file goes on with nothing restored.
    let pool = pool(&["vm-a"]);
    let keeper = StateKeeper::new(path, pool.clone(), driver(&pool), gauge());
    keeper.restore();
    assert!(keeper.pending.lock().unwrap().is_none());
    assert!(!pool.snapshot().vms()[0].status().draining);
}

/// A file that cannot be read (permissions, I/O) may hold drains: it is not written over,
/// neither while the gateway runs nor at exit, and the gauge says so.
#[test]
fn a_file_that_cannot_be_read_is_not_written_over() {
    let dir = tempfile::tempdir().unwrap();
    // A directory where the file should be: opened, but not read.
    let path = dir.path().join("state.json");
    std::fs::create_dir(&path).unwrap();
    assert!(matches!(load(&path), Err(LoadError::Unreadable(_))));
    let pool = pool(&["vm-a"]);
    pool.drain("vm-a");
    let failing = gauge();
    let keeper = StateKeeper::new(path.clone(), pool.clone(), driver(&pool), failing.clone());
    keeper.restore();
    assert_eq!(failing.get(), 1);
    assert!(!keeper.save(true), "no write");
    keeper.finish();
    assert!(path.is_dir(), "left as it was");

    // An upgrade's successor, told the state by its predecessor, leaves it alone too.
    let failing = gauge();
    let successor = StateKeeper::new(path.clone(), pool.clone(), driver(&pool), failing.clone());
    successor.adopted(None);
    assert_eq!(failing.get(), 1);
    assert!(!successor.save(true), "no write");
    assert!(path.is_dir(), "left as it was");
}

/// An upgrade's successor stopped before the predecessor's report was taken in (or the file
/// read) leaves the file alone: its own view is empty, the file holds the drains.
#[test]
fn a_stop_before_the_state_is_taken_in_does_not_write_over_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    let old = pool(&["vm-a"]);
    old.drain("vm-a");
    saved_at_exit(&path, &old);

    let new = pool(&["vm-a"]);
    StateKeeper::new(path.clone(), new.clone(), driver(&new), gauge()).finish();
    assert_eq!(
        load(&path).unwrap().unwrap().remembered.drained,
        BTreeSet::from(["vm-a".to_owned()])
    );
    // Once taken in (here: nothing deferred), its exit writes its view.
    let keeper = StateKeeper::new(path.clone(), new.clone(), driver(&new), gauge());
    keeper.adopted(None);
    keeper.finish();
    assert!(load(&path).unwrap().unwrap().remembered.drained.is_empty());
}

#[test]
fn the_file_is_written_when_its_content_changes_and_refreshed_only_while_users_are_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    let pool = pool(&["vm-a", "vm-b"]);
    let file = StateKeeper::new(path.clone(), pool.clone(), driver(&pool), gauge());
    let written = || std::fs::read_to_string(&path).unwrap_or_default();
    file.save(false);
    assert!(written().contains("\"drained\": []"), "{}", written());
    std::fs::remove_file(&path).unwrap();
    file.save(false);
    assert_eq!(written(), "", "unchanged: not written again");
    pool.drain("vm-b");
    file.save(false);
    assert!(written().contains("vm-b"), "{}", written());
    // A login is a change; the same user still on is not, until a refresh is due.
    let now = pool.clock().now();
    pool.store().session_started("alice", "vm-a", now);
    file.save(false);
    assert!(written().contains("alice"));
    std::fs::remove_file(&path).unwrap();
    file.save(false);
    assert_eq!(written(), "");
    if let Ok(mut last) = file.last.lock() {
        last.at = Some(Instant::now() - REFRESH_EVERY);
    }
    file.save(false);
    assert!(written().contains("alice"), "refreshed while alice is on");
    // Handed over: this process writes no more.
    file.hand_over();
    pool.undrain("vm-b");
    assert!(!file.save(true), "stopped");
    assert!(written().contains("vm-b"));
}

#[tokio::test(start_paused = true)]
async fn drains_read_before_the_first_listing_are_kept_and_restored_once_the_pool_has_vms() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    let old = pool(&["vm-a", "vm-b"]);
    old.drain("vm-b");
    old.store()
        .session_started("alice", "vm-a", old.clock().now());
    saved_at_exit(&path, &old);
    let drained = |path: &Path| load(path).unwrap().unwrap().remembered.drained;

    // Stopped before the provider ever listed the pool: the drains are written back.
    let empty = pool(&[]);
    let stopped = StateKeeper::new(path.clone(), empty.clone(), driver(&empty), gauge());
    stopped.restore();
    assert_eq!(affinity(&empty, "alice").as_deref(), Some("vm-a"));
    stopped.finish();
    assert_eq!(drained(&path), BTreeSet::from(["vm-b".to_owned()]));

    // Listed at last: restored then.
    let new = pool(&[]);
    let keeper = StateKeeper::new(path.clone(), new.clone(), driver(&new), gauge());
    keeper.restore();
    let keeping = tokio::spawn(keeper.clone().keep());
    tokio::time::sleep(SAVE_EVERY * 2).await;
    assert!(keeper.pending.lock().unwrap().is_some(), "still waiting");
    new.set_vms(
        ["vm-a", "vm-b"]
            .map(|n| VmSpec::new(n, "127.0.0.1"))
            .to_vec(),
    );
    let mut restored = false;
    for _ in 0..50 {
        restored = new
            .snapshot()
            .get("vm-b")
            .is_some_and(|vm| vm.status().draining);
        if restored {
            break;
        }
        tokio::time::sleep(PENDING_CHECK_EVERY).await;
    }
    assert!(restored, "vm-b drained once listed");
    keeper.finish();
    keeping.await.unwrap();
    assert_eq!(drained(&path), BTreeSet::from(["vm-b".to_owned()]));

    // Listed, and empty (a pool scaled to zero whose VMs were deleted): nothing waits, and a
    // VM created later under the same name does not inherit the drain.
    let gone = pool(&[]);
    let gone_driver = driver(&gone);
    gone_driver.sync().await.unwrap();
    let keeper = StateKeeper::new(path.clone(), gone.clone(), gone_driver, gauge());
    keeper.restore();
    assert!(keeper.pending.lock().unwrap().is_none(), "nothing waits");
    keeper.finish();
    assert!(drained(&path).is_empty());
}

#[test]
fn a_file_that_cannot_be_written_is_retried_and_written_once_it_can() {
    let dir = tempfile::tempdir().unwrap();
    // Its directory is a regular file: no write can succeed (whoever runs the test).
    let blocker = dir.path().join("run");
    std::fs::write(&blocker, "").unwrap();
    let path = blocker.join("state.json");
    let pool = pool(&["vm-a"]);
    pool.drain("vm-a");
    let failing = gauge();
    let file = StateKeeper::new(path.clone(), pool.clone(), driver(&pool), failing.clone());
    assert!(file.save(false), "writing goes on");
    assert_eq!(failing.get(), 1, "poolgate_state_file_failing");
    file.save(false);
    assert!(!path.exists());
    std::fs::remove_file(&blocker).unwrap();
    file.save(false);
    assert_eq!(failing.get(), 0);
    assert_eq!(
        load(&path).unwrap().unwrap().remembered.drained,
        BTreeSet::from(["vm-a".to_owned()])
    );
}
