//! `[[autoscale.schedule]]` end to end: the exec provider's scripts start and stop a real OpenSSH
//! `sshd` "VM" behind a real gateway, with windows placed around the wall clock of the run.
//!
//! - A window that is on keeps a VM warm with nobody connected, through several idle windows;
//!   then 20 users log in at once and none of them waits for a VM ("9:00 on a Monday").
//! - A window that opens within `boot_estimate` starts its VM ahead; a window later in the day
//!   starts nothing, and the pool stays at zero.

use std::time::Duration;

use poolgate_tests::*;

/// `HH:MM` of now (UTC) plus `minutes` (negative: earlier), wrapped around the day.
fn utc_time_in(minutes: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64;
    let minute_of_day = ((now / 60 + minutes) % 1440 + 1440) % 1440;
    format!("{:02}:{:02}", minute_of_day / 60, minute_of_day % 60)
}

/// One stopped sshd VM the exec scripts start and stop, and a gateway with `schedule` (TOML of
/// `[[autoscale.schedule]]` tables) and `boot_estimate`.
struct Fixture {
    pool: GatewayPool,
    _vm: ExecSshdVm,
}

fn start(schedule: &str, boot_estimate: &str, users: usize) -> Fixture {
    let ca = UserCa::generate();
    let exec = ExecSshdVm::stopped("poolgate-schedule-e2e-", &ca);
    let scripts = &exec.scripts;
    // Idle timers of seconds, so that a VM kept only by the rules would be stopped within the
    // test; the busy check is off (this sshd shares the machine's process table).
    let pool = GatewayPool::builder()
        .users(users)
        .user_ca(ca)
        .known_vm(&exec.vm)
        // Room for the whole team on the one VM: a wait could then only be for a VM to start.
        .config_toml(&format!(
            "{}max_sessions = 25\n",
            scripts.pool_toml(Duration::from_secs(10))
        ))
        .config_toml(&format!(
            "[autoscale]\nenabled = true\nmax_vms = 1\n\
             scale_in_after = \"2s\"\nscale_to_zero_after = \"3s\"\ntick = \"1s\"\ncooldown = \"1s\"\n\
             boot_estimate = \"{boot_estimate}\"\nhold_connect_for = \"30s\"\nbusy_command = []\n\
             {schedule}"
        ))
        .start();
    Fixture { pool, _vm: exec }
}

fn schedule_floor(pool: &GatewayPool) -> Option<f64> {
    sample(&pool.metrics(), "poolgate_autoscale_schedule_min_vms")
}

#[test]
fn a_window_that_is_on_keeps_a_vm_warm_and_twenty_users_at_once_never_wait() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    // The smallest window a user writes: from, to, min_vms (every day, UTC).
    let window = format!(
        "[[autoscale.schedule]]\nfrom = \"{}\"\nto = \"{}\"\nmin_vms = 1\n",
        utc_time_in(-120),
        utc_time_in(120)
    );
    let f = start(&window, "2s", 20);
    let pool = &f.pool;
    // Nobody connects, yet the VM is started for the window and serves.
    let took = pool.wait_for_state("vm-a", "healthy", Duration::from_secs(30));
    eprintln!("the window's VM was healthy {took:?} after start");
    pool.gateway
        .wait_for_log("schedule window on", Duration::from_secs(5));
    assert_eq!(schedule_floor(pool), Some(1.0), "{}", pool.metrics());
    // Idle through several scale-in windows (2 s, to zero after 3 s): kept.
    let mut seen = Vec::new();
    for _ in 0..20 {
        seen.push(pool.vm_state("vm-a"));
        std::thread::sleep(Duration::from_millis(300)); // sampling the state, not waiting for it
    }
    assert!(
        seen.iter().all(|s| s == "healthy"),
        "the window's VM was drained or stopped while idle: {seen:?}\n{}",
        pool.log()
    );
    // 20 people at 9:00: all in at once, none held for a VM to start.
    let handles: Vec<_> = (1..=20)
        .map(|i| {
            let client = pool.client(i).timeout(Duration::from_secs(60));
            std::thread::spawn(move || client.run("echo on $POOLGATE_VM"))
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let out = h.join().expect("client thread");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "user {}: {stderr}", i + 1);
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "on vm-a");
        assert!(
            !stderr.contains("starting a VM"),
            "user {} waited for a VM: {stderr}",
            i + 1
        );
    }
    pool.assert_no_panic();
}

#[test]
fn a_window_opening_within_a_boot_starts_ahead_and_a_later_one_starts_nothing() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    // Opens in 3 to 4 hours: nothing to do now. The pool stays at zero through several ticks.
    let later = format!(
        "[[autoscale.schedule]]\nfrom = \"{}\"\nto = \"{}\"\ntime_zone = \"UTC\"\nmin_vms = 1\n",
        utc_time_in(180),
        utc_time_in(240)
    );
    let f = start(&later, "2s", 1);
    let pool = &f.pool;
    pool.wait_for_state("vm-a", "stopped", Duration::from_secs(15));
    pool.gateway
        .wait_for_log("autoscale schedule", Duration::from_secs(5));
    for _ in 0..10 {
        assert_eq!(pool.vm_state("vm-a"), "stopped", "{}", pool.log());
        std::thread::sleep(Duration::from_millis(300)); // sampling the state, not waiting for it
    }
    assert_eq!(schedule_floor(pool), Some(0.0), "{}", pool.metrics());
    drop(f);

    // Opens in 2 to 3 minutes, VMs boot in 10 minutes: started now, to be warm in time.
    let soon = format!(
        "[[autoscale.schedule]]\nfrom = \"{}\"\nto = \"{}\"\nmin_vms = 1\n",
        utc_time_in(3),
        utc_time_in(60)
    );
    let f = start(&soon, "10m", 1);
    let pool = &f.pool;
    pool.wait_for_state("vm-a", "healthy", Duration::from_secs(30));
    pool.gateway
        .wait_for_log("schedule window on", Duration::from_secs(5));
    assert_eq!(schedule_floor(pool), Some(1.0), "{}", pool.metrics());
    pool.assert_no_panic();
}
