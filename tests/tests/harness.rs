//! Smoke test of the end-to-end harness itself: real sshd VMs trusting a user CA, reached
//! directly (no gateway) with real OpenSSH clients.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use poolgate_tests::*;

const VALIDITY: Duration = Duration::from_secs(600);

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn ssh_reaches_each_vm_with_a_certificate_and_returns_exit_status() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let started = Instant::now();
    let users = TestUsers::ensure(1);
    let user = &users.user(1).name;
    let ca = UserCa::generate();
    let vm_a = SshdVm::builder("vm-a")
        .trusted_user_ca_keys(ca.public_key_path())
        .start();
    let vm_b = SshdVm::builder("vm-b")
        .trusted_user_ca_keys(ca.public_key_path())
        .start();
    assert_ne!(vm_a.port(), vm_b.port());
    let known_hosts = KnownHosts::new();
    known_hosts.add_vm(&vm_a).add_vm(&vm_b);
    let key = UserKey::generate(user);
    ca.sign(&key, user, VALIDITY);

    for vm in [&vm_a, &vm_b] {
        // The VM's name arrives as the gateway sends it, in the session's environment
        // (the VMs accept it: `AcceptEnv POOLGATE_VM`).
        let ssh = SshClient::new(user, vm.port(), known_hosts.path())
            .user_key(&key)
            .option(&format!("SetEnv=POOLGATE_VM={}", vm.name()));
        let out = ssh.run("echo $POOLGATE_VM");
        assert!(
            out.status.success(),
            "ssh to {}: {}",
            vm.name(),
            stderr(&out)
        );
        assert_eq!(stdout(&out), vm.name());
        let out = ssh.run("whoami; exit 3");
        assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
        assert_eq!(stdout(&out), *user);
    }
    vm_a.wait_for_log(
        &format!("Accepted publickey for {user}"),
        Duration::from_secs(5),
    );
    eprintln!("harness smoke (ssh): {:?}", started.elapsed());
}

#[test]
fn a_key_the_ca_did_not_sign_is_refused() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let users = TestUsers::ensure(1);
    let user = &users.user(1).name;
    let ca = UserCa::generate();
    let vm = SshdVm::builder("vm-a")
        .trusted_user_ca_keys(ca.public_key_path())
        .start();
    let known_hosts = KnownHosts::new();
    known_hosts.add_vm(&vm);

    let unsigned = UserKey::generate("unsigned");
    let out = SshClient::new(user, vm.port(), known_hosts.path())
        .user_key(&unsigned)
        .run("echo $POOLGATE_VM");
    assert_eq!(out.status.code(), Some(255), "must be refused");
    assert!(
        stderr(&out).contains("Permission denied"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stdout(&out), "");

    // Signed by another CA, or for another principal: refused as well.
    let other_ca = UserCa::generate();
    let foreign = UserKey::generate("foreign");
    other_ca.sign(&foreign, user, VALIDITY);
    let wrong_principal = UserKey::generate("wrong-principal");
    ca.sign(&wrong_principal, "someone-else", VALIDITY);
    for key in [&foreign, &wrong_principal] {
        let out = SshClient::new(user, vm.port(), known_hosts.path())
            .user_key(key)
            .run("true");
        assert_eq!(out.status.code(), Some(255), "{}", stderr(&out));
    }
}

#[test]
fn an_unknown_host_key_is_refused_by_the_client() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let users = TestUsers::ensure(1);
    let user = &users.user(1).name;
    let ca = UserCa::generate();
    let vm = SshdVm::builder("vm-a")
        .trusted_user_ca_keys(ca.public_key_path())
        .start();
    let key = UserKey::generate(user);
    ca.sign(&key, user, VALIDITY);
    let empty = KnownHosts::new();
    let out = SshClient::new(user, vm.port(), empty.path())
        .user_key(&key)
        .run("true");
    assert_eq!(out.status.code(), Some(255));
    assert!(
        stderr(&out).contains("Host key verification failed"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn stop_refuses_connections_and_restart_keeps_port_and_host_key() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let users = TestUsers::ensure(1);
    let user = &users.user(1).name;
    let ca = UserCa::generate();
    let mut vm = SshdVm::builder("vm-a")
        .trusted_user_ca_keys(ca.public_key_path())
        .start();
    let key = UserKey::generate(user);
    ca.sign(&key, user, VALIDITY);
    let known_hosts = KnownHosts::new();
    known_hosts.add_vm(&vm);
    let ssh = SshClient::new(user, vm.port(), known_hosts.path())
        .user_key(&key)
        .option("SetEnv=POOLGATE_VM=vm-a");
    let (port, host_key) = (vm.port(), vm.host_public_key_line());

    vm.stop();
    assert!(!vm.is_running());
    let refused = TcpStream::connect(vm.addr()).expect_err("stopped VM must refuse");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    assert_eq!(ssh.run("true").status.code(), Some(255));

    vm.restart();
    assert!(vm.is_running());
    assert_eq!((vm.port(), vm.host_public_key_line()), (port, host_key));
    // StrictHostKeyChecking=yes with the old known_hosts: proves the same host key is served.
    let out = ssh.run("echo $POOLGATE_VM");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "vm-a");
}

#[test]
fn stop_kills_open_sessions() {
    require_tools!("sshd", "ssh", "ssh-keygen");
    require_root!();
    let users = TestUsers::ensure(1);
    let user = &users.user(1).name;
    let ca = UserCa::generate();
    let mut vm = SshdVm::builder("vm-a")
        .trusted_user_ca_keys(ca.public_key_path())
        .start();
    let key = UserKey::generate(user);
    ca.sign(&key, user, VALIDITY);
    let known_hosts = KnownHosts::new();
    known_hosts.add_vm(&vm);
    let ssh = SshClient::new(user, vm.port(), known_hosts.path())
        .user_key(&key)
        .timeout(Duration::from_secs(20));

    // A session that would outlive the test; `stop()` must end it (the VM "goes down").
    let marker = format!("pg-stop-{}", vm.port());
    let mut session = ssh
        .command(&format!("exec -a {marker} sleep 60"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn ssh");
    let marker_running = || {
        std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c.starts_with(marker.as_bytes()))
        })
    };
    wait_until(
        Duration::from_secs(10),
        "the remote sleep to start",
        marker_running,
    );
    vm.stop();
    assert!(!marker_running(), "the session's process survived stop()");
    let status = wait_for_exit(
        &mut session,
        Duration::from_secs(10),
        "the ssh client of a VM that went down",
    );
    assert!(!status.success());
}

#[test]
fn scp_sftp_and_rsync_move_files() {
    require_tools!("sshd", "ssh", "ssh-keygen", "scp", "sftp", "rsync");
    require_root!();
    let users = TestUsers::ensure(1);
    let user = users.user(1);
    let ca = UserCa::generate();
    let vm = SshdVm::builder("vm-a")
        .trusted_user_ca_keys(ca.public_key_path())
        .start();
    let key = UserKey::generate(&user.name);
    ca.sign(&key, &user.name, VALIDITY);
    let known_hosts = KnownHosts::new();
    known_hosts.add_vm(&vm);
    let ssh = SshClient::new(&user.name, vm.port(), known_hosts.path()).user_key(&key);
    let local = tempfile::tempdir().unwrap();
    // Tests share the account's home: a per-VM-port directory keeps them apart.
    let remote_dir = format!("pgtest-harness-{}", vm.port());
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let src = local.path().join("payload.bin");
    std::fs::write(&src, &payload).unwrap();
    let limit = Duration::from_secs(30);
    let ok = |out: std::process::Output, what: &str| {
        assert!(out.status.success(), "{what}: {}", stderr(&out));
    };

    ok(ssh.run(&format!("mkdir -p {remote_dir}")), "mkdir");
    ok(
        run_with_timeout(
            &mut ssh.scp_to(&src, &format!("{remote_dir}/scp.bin")),
            limit,
        ),
        "scp upload",
    );
    let back = local.path().join("scp-back.bin");
    ok(
        run_with_timeout(
            &mut ssh.scp_from(&format!("{remote_dir}/scp.bin"), &back),
            limit,
        ),
        "scp download",
    );
    assert_eq!(std::fs::read(&back).unwrap(), payload);

    let batch = local.path().join("batch");
    let sftp_back = local.path().join("sftp-back.bin");
    std::fs::write(
        &batch,
        format!(
            "put {} {remote_dir}/sftp.bin\nget {remote_dir}/sftp.bin {}\n",
            src.display(),
            sftp_back.display()
        ),
    )
    .unwrap();
    ok(
        run_with_timeout(&mut ssh.sftp_batch(&batch), limit),
        "sftp -b",
    );
    assert_eq!(std::fs::read(&sftp_back).unwrap(), payload);

    let rsync_back = local.path().join("rsync-back.bin");
    let remote = ssh.remote_path(&format!("{remote_dir}/rsync.bin"));
    let src_arg = src.to_str().unwrap();
    ok(
        run_with_timeout(&mut ssh.rsync(&["-a", src_arg, &remote]), limit),
        "rsync upload",
    );
    ok(
        run_with_timeout(
            &mut ssh.rsync(&["-a", &remote, rsync_back.to_str().unwrap()]),
            limit,
        ),
        "rsync download",
    );
    assert_eq!(std::fs::read(&rsync_back).unwrap(), payload);

    let out = ssh.run(&format!(
        "sha256sum {remote_dir}/*.bin | awk '{{print $1}}' | uniq | wc -l; rm -rf {remote_dir}"
    ));
    assert_eq!(stdout(&out), "1", "all uploads identical: {}", stderr(&out));
}

#[test]
fn agent_holds_a_certificate_for_ssh() {
    require_tools!("sshd", "ssh", "ssh-keygen", "ssh-agent", "ssh-add");
    require_root!();
    let users = TestUsers::ensure(1);
    let user = &users.user(1).name;
    let ca = UserCa::generate();
    let vm = SshdVm::builder("vm-a")
        .trusted_user_ca_keys(ca.public_key_path())
        .start();
    let key = UserKey::generate(user);
    ca.sign(&key, user, VALIDITY);
    let known_hosts = KnownHosts::new();
    known_hosts.add_vm(&vm);
    let agent = SshAgent::start();
    agent.add(&key);
    assert!(
        agent.list().contains("cert-v01@openssh.com"),
        "{}",
        agent.list()
    );
    // No -i: the only credentials are in the agent.
    let out = SshClient::new(user, vm.port(), known_hosts.path())
        .agent(agent.socket())
        .option("IdentitiesOnly=no")
        .option("SetEnv=POOLGATE_VM=vm-a")
        .run("echo $POOLGATE_VM");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "vm-a");
}

#[test]
fn sshd_start_failures_explain_themselves() {
    require_tools!("sshd", "ssh-keygen");
    require_root!();
    let panic_text = |f: Box<dyn FnOnce() + std::panic::UnwindSafe>| -> String {
        let err = std::panic::catch_unwind(f).expect_err("start must fail");
        err.downcast_ref::<String>().cloned().unwrap_or_default()
    };

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let msg = panic_text(Box::new(move || {
        SshdVm::builder("vm-taken").port(port).start();
    }));
    assert!(msg.contains("Address already in use"), "{msg}");
    assert!(msg.contains("sshd VM vm-taken"), "{msg}");

    let msg = panic_text(Box::new(|| {
        SshdVm::builder("vm-bad")
            .config_line("NoSuchOption yes")
            .start();
    }));
    assert!(msg.contains("NoSuchOption"), "{msg}");
}

#[test]
fn test_users_can_be_ensured_from_many_threads_at_once() {
    require_root!();
    let users: Vec<TestUsers> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8).map(|_| s.spawn(|| TestUsers::ensure(3))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for u in &users {
        assert_eq!(u.names(), ["pgtest1", "pgtest2", "pgtest3"]);
        assert_eq!(u.all(), users[0].all());
    }
    let shadow = std::fs::read_to_string("/etc/shadow").unwrap();
    for user in users[0].all() {
        let line = shadow
            .lines()
            .find(|l| l.starts_with(&format!("{}:", user.name)));
        assert!(!line.unwrap().split(':').nth(1).unwrap().starts_with('!'));
        assert!(user.home.is_dir());
    }
}
