//! File transfer through the gateway: scp and `rsync -e ssh` of 100 MiB both ways with matching
//! sha256, and an sftp batch (put, get, ls, rm).

// Test code: a failed step should abort the test at once (as in tests/src/lib.rs).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use poolgate_tests::*;

const SIZE: u64 = 100 << 20;
const LIMIT: Duration = Duration::from_secs(60);

/// sha256 of a file on the VM side, through the gateway.
fn remote_sha256(client: &SshClient, path: &str) -> String {
    let out = client.run(&format!("sha256sum {path}"));
    assert_ok(&out, "remote sha256sum");
    stdout(&out)
        .split_whitespace()
        .next()
        .expect("a digest")
        .to_string()
}

#[test]
fn scp_100_mib_both_ways_intact() {
    require_tools!("sshd", "ssh", "ssh-keygen", "scp", "sha256sum");
    require_root!();
    let pool = GatewayPool::builder().vm("vm-a").users(1).start();
    let ssh = pool.client(1).timeout(LIMIT);
    let local = tempfile::tempdir().unwrap();
    let src = local.path().join("up.bin");
    let digest = random_file(&src, SIZE);
    let remote_dir = pool.remote_scratch("scp");
    assert_ok(&ssh.run(&format!("mkdir -p {remote_dir}")), "mkdir");

    let t = Instant::now();
    let out = run_with_timeout(&mut ssh.scp_to(&src, &format!("{remote_dir}/f.bin")), LIMIT);
    assert_ok(&out, "scp upload");
    let up = t.elapsed();
    assert_eq!(remote_sha256(&ssh, &format!("{remote_dir}/f.bin")), digest);

    let back = local.path().join("down.bin");
    let t = Instant::now();
    let out = run_with_timeout(
        &mut ssh.scp_from(&format!("{remote_dir}/f.bin"), &back),
        LIMIT,
    );
    assert_ok(&out, "scp download");
    let down = t.elapsed();
    assert_eq!(sha256_file(&back), digest);
    assert_ok(&ssh.run(&format!("rm -rf {remote_dir}")), "cleanup");
    eprintln!("scp 100 MiB: upload {up:?}, download {down:?}");
}

#[test]
fn rsync_over_ssh_100_mib_both_ways_intact() {
    require_tools!("sshd", "ssh", "ssh-keygen", "rsync", "sha256sum");
    require_root!();
    let pool = GatewayPool::builder().vm("vm-a").users(1).start();
    let ssh = pool.client(1).timeout(LIMIT);
    let local = tempfile::tempdir().unwrap();
    let src = local.path().join("up.bin");
    let digest = random_file(&src, SIZE);
    let remote_dir = pool.remote_scratch("rsync");
    assert_ok(&ssh.run(&format!("mkdir -p {remote_dir}")), "mkdir");
    let remote = ssh.remote_path(&format!("{remote_dir}/f.bin"));

    let t = Instant::now();
    let out = run_with_timeout(
        &mut ssh.rsync(&["-a", src.to_str().unwrap(), &remote]),
        LIMIT,
    );
    assert_ok(&out, "rsync upload");
    let up = t.elapsed();
    assert_eq!(remote_sha256(&ssh, &format!("{remote_dir}/f.bin")), digest);

    let back = local.path().join("down.bin");
    let t = Instant::now();
    let out = run_with_timeout(
        &mut ssh.rsync(&["-a", &remote, back.to_str().unwrap()]),
        LIMIT,
    );
    assert_ok(&out, "rsync download");
    let down = t.elapsed();
    assert_eq!(sha256_file(&back), digest);

    // A second upload of a changed file uses rsync's delta algorithm (both directions at once).
    let out = run_with_timeout(
        std::process::Command::new("sh").arg("-c").arg(format!(
            "printf 'changed' | dd of={} bs=1 seek=5000000 conv=notrunc status=none",
            src.display()
        )),
        LIMIT,
    );
    assert_ok(&out, "modify the local file");
    let changed = sha256_file(&src);
    let out = run_with_timeout(
        &mut ssh.rsync(&[
            "-a",
            "--no-whole-file",
            "--stats",
            src.to_str().unwrap(),
            &remote,
        ]),
        LIMIT,
    );
    assert_ok(&out, "rsync delta upload");
    assert_eq!(remote_sha256(&ssh, &format!("{remote_dir}/f.bin")), changed);
    assert_ok(&ssh.run(&format!("rm -rf {remote_dir}")), "cleanup");
    eprintln!("rsync 100 MiB: upload {up:?}, download {down:?}");
}

#[test]
fn sftp_batch_put_get_ls_rm() {
    require_tools!("sshd", "ssh", "ssh-keygen", "sftp", "sha256sum");
    require_root!();
    let pool = GatewayPool::builder().vm("vm-a").users(1).start();
    let ssh = pool.client(1).timeout(LIMIT);
    let local = tempfile::tempdir().unwrap();
    let src = local.path().join("up.bin");
    let digest = random_file(&src, 10 << 20);
    let back = local.path().join("down.bin");
    let remote_dir = pool.remote_scratch("sftp");
    let batch = local.path().join("batch");
    std::fs::write(
        &batch,
        format!(
            "mkdir {d}\n\
             put {src} {d}/sftp.bin\n\
             ls -l {d}\n\
             get {d}/sftp.bin {back}\n\
             rm {d}/sftp.bin\n\
             ls {d}\n\
             rmdir {d}\n",
            d = remote_dir,
            src = src.display(),
            back = back.display(),
        ),
    )
    .unwrap();
    let out = run_with_timeout(&mut ssh.sftp_batch(&batch), LIMIT);
    assert_ok(&out, "sftp -b");
    assert_eq!(sha256_file(&back), digest);
    let listing = String::from_utf8_lossy(&out.stdout);
    // `ls -l` showed the uploaded file with its size; the final `ls` showed nothing.
    assert!(
        listing
            .lines()
            .any(|l| l.contains("sftp.bin") && l.contains(&(10u64 << 20).to_string())),
        "{listing}"
    );
    let out = ssh.run(&format!(
        "test -e {remote_dir} && echo still-there || echo gone"
    ));
    assert_eq!(stdout(&out), "gone", "rm and rmdir took effect on the VM");
    // The sftp session was a subsystem session: the audit line has it.
    pool.wait_for_sessions_ended(2, Duration::from_secs(10));
}
