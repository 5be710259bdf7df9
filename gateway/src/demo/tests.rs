//! A demo VM driven in-process by the gateway's own VM-leg client (`ssh::backend`): host
//! certificate verification, certificate and password logins, exec with exit status and
//! exit-signal, pty size and window-change, env requests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use russh::ChannelMsg;
use russh::keys::ssh_key::{Algorithm, PrivateKey};

use super::*;
use crate::ssh::backend::{self, Backend, BackendError, Credential, Target};
use crate::ssh::keys::{CertRequest, UserCa};
use crate::ssh::known_hosts::HostKeyPolicy;

struct Fixture {
    vm: DemoVm,
    user_ca: UserCa,
    trusted_hosts: HostKeyPolicy,
}

fn key() -> PrivateKey {
    PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap()
}

async fn fixture() -> Fixture {
    let user_ca = key();
    let host_ca = key();
    let trusted_hosts = HostKeyPolicy::parse(&format!(
        "@cert-authority * {}",
        host_ca.public_key().to_openssh().unwrap()
    ));
    let settings = Arc::new(DemoVmSettings {
        user_ca: user_ca.public_key().clone(),
        host_ca,
        shell: ShellSettings {
            program: "/bin/sh".into(),
            home: std::env::temp_dir(),
            user: "tester".into(),
            bash_rc: None,
            sftp_server: None,
            setsid: None,
        },
    });
    let vm = DemoVm::start("demo-7", (0, 0), settings).await.unwrap();
    Fixture {
        vm,
        user_ca: UserCa::new(user_ca, Duration::from_secs(300)),
        trusted_hosts,
    }
}

impl Fixture {
    async fn connect(
        &self,
        user: &str,
        credential: Credential<'_>,
        policy: HostKeyPolicy,
    ) -> Result<Backend, BackendError> {
        let port = self.vm.ssh_addr().port();
        backend::connect(
            &Target {
                vm: "demo-7",
                host: "127.0.0.1",
                port,
                user,
            },
            credential,
            Arc::new(policy),
            Arc::new(backend::client_config(true)),
            Duration::from_secs(10),
        )
        .await
    }

    async fn login(&self, user: &str) -> Backend {
        let credential = Credential::Certificate {
            ca: &self.user_ca,
            request: CertRequest {
                user,
                session: 1,
                client: "127.0.0.1:1",
                port_forwarding: true,
                agent_forwarding: false,
                pty: true,
            },
        };
        self.connect(user, credential, self.trusted_hosts.clone())
            .await
            .unwrap()
    }
}

/// Output, exit status and exit signal of one channel, until it closes.
async fn collect(
    channel: &mut russh::Channel<russh::client::Msg>,
) -> (String, Option<u32>, Option<String>) {
    let (mut out, mut status, mut signal) = (Vec::new(), None, None);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, channel.wait()).await {
        match msg {
            ChannelMsg::Data { data } | ChannelMsg::ExtendedData { data, .. } => {
                out.extend_from_slice(&data)
            }
            ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
            ChannelMsg::ExitSignal { signal_name, .. } => signal = Some(format!("{signal_name:?}")),
            ChannelMsg::Close => break,
            _ => {}
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), status, signal)
}

#[tokio::test]
async fn certificate_login_exec_env_status_and_signal() {
    let f = fixture().await;
    let backend = f.login("alice").await;

    let mut ch = backend.handle.channel_open_session().await.unwrap();
    ch.set_env(true, "PGTEST_X", "from-env").await.unwrap();
    ch.exec(
        true,
        "echo $POOLGATE_VM $PGTEST_X $POOLGATE_DEMO_LOGIN; exit 5",
    )
    .await
    .unwrap();
    let (out, status, _) = collect(&mut ch).await;
    assert_eq!(out.trim(), "demo-7 from-env alice");
    assert_eq!(status, Some(5));

    let mut ch = backend.handle.channel_open_session().await.unwrap();
    ch.exec(true, "kill -TERM $$").await.unwrap();
    let (_, status, signal) = collect(&mut ch).await;
    assert_eq!(status, None);
    assert_eq!(signal.as_deref(), Some("TERM"));

    // stdin reaches the program; EOF ends it.
    let mut ch = backend.handle.channel_open_session().await.unwrap();
    ch.exec(true, "cat").await.unwrap();
    ch.data(&b"round trip\n"[..]).await.unwrap();
    ch.eof().await.unwrap();
    let (out, status, _) = collect(&mut ch).await;
    assert_eq!(out, "round trip\n");
    assert_eq!(status, Some(0));
}

#[tokio::test]
async fn pty_size_and_window_change() {
    let f = fixture().await;
    let backend = f.login("alice").await;
    let mut ch = backend.handle.channel_open_session().await.unwrap();
    ch.request_pty(true, "xterm", 100, 30, 0, 0, &[])
        .await
        .unwrap();
    ch.exec(true, "stty size; sleep 1; stty size")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    ch.window_change(120, 40, 0, 0).await.unwrap();
    let (out, status, _) = collect(&mut ch).await;
    let sizes: Vec<&str> = out.lines().map(str::trim).collect();
    assert_eq!(sizes, ["30 100", "40 120"], "{out:?}");
    assert_eq!(status, Some(0));
}

#[tokio::test]
async fn refuses_wrong_principal_wrong_password_and_untrusted_host_keys() {
    let f = fixture().await;
    // A certificate for bob does not log in alice.
    let credential = Credential::Certificate {
        ca: &f.user_ca,
        request: CertRequest {
            user: "bob",
            session: 1,
            client: "127.0.0.1:1",
            port_forwarding: false,
            agent_forwarding: false,
            pty: true,
        },
    };
    let refused = f
        .connect("alice", credential, f.trusted_hosts.clone())
        .await;
    assert!(
        matches!(refused, Err(BackendError::AuthRefused { .. })),
        "{:?}",
        refused.err()
    );
    // A certificate from another CA neither.
    let other = UserCa::new(key(), Duration::from_secs(300));
    let credential = Credential::Certificate {
        ca: &other,
        request: CertRequest {
            user: "alice",
            session: 1,
            client: "127.0.0.1:1",
            port_forwarding: false,
            agent_forwarding: false,
            pty: true,
        },
    };
    let refused = f
        .connect("alice", credential, f.trusted_hosts.clone())
        .await;
    assert!(matches!(refused, Err(BackendError::AuthRefused { .. })));

    let refused = f
        .connect(
            "alice",
            Credential::Password("nope"),
            f.trusted_hosts.clone(),
        )
        .await;
    assert!(matches!(refused, Err(BackendError::AuthRefused { .. })));
    let ok = f
        .connect(
            "anyone",
            Credential::Password(ssh::PASSWORD),
            f.trusted_hosts.clone(),
        )
        .await;
    assert!(ok.is_ok(), "{:?}", ok.err());

    // The gateway refuses a demo VM whose host CA it does not trust.
    let stranger = HostKeyPolicy::parse(&format!(
        "@cert-authority * {}",
        key().public_key().to_openssh().unwrap()
    ));
    let refused = f
        .connect("alice", Credential::Password(ssh::PASSWORD), stranger)
        .await;
    assert!(
        matches!(refused, Err(BackendError::HostKey { .. })),
        "{:?}",
        refused.err()
    );
}

#[tokio::test]
async fn web_page_health_and_stop() {
    let f = fixture().await;
    let http = f.vm.http_addr();
    let get = |path: &'static str| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(http).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        text
    };
    assert!(get("/hub/health").await.starts_with("HTTP/1.1 200"));
    let page = get("/").await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("demo-7"));
    assert!(get("/nope").await.starts_with("HTTP/1.1 404"));

    let ssh = f.vm.ssh_addr();
    drop(f);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(tokio::net::TcpStream::connect(ssh).await.is_err());
    assert!(tokio::net::TcpStream::connect(http).await.is_err());
}
