//! The `demo` provider: a pool of in-process demo VMs, `demo-1` … `demo-N`, all stopped at
//! first. `start` boots them after a short delay (so "starting" can be seen), `stop` stops them;
//! VMs are never created or deleted.

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::future::BoxFuture;
use router_core::{Lifecycle, VmSpec};
use tokio::task::JoinHandle;

use super::{DemoVm, DemoVmSettings};
use crate::autoscale::providers::{Capabilities, Provider, ProviderError, ProviderVm};

/// Sessions one demo VM takes at most.
const MAX_SESSIONS: u32 = 20;

enum State {
    Stopped,
    Starting(JoinHandle<()>),
    Running(DemoVm),
}

struct Slot {
    name: String,
    /// SSH and HTTP ports: reserved at start-up, then those the VM last listened on.
    ports: (u16, u16),
    state: State,
}

/// The `demo` provider.
pub struct DemoProvider {
    slots: Arc<Mutex<Vec<Slot>>>,
    settings: Arc<DemoVmSettings>,
    boot_delay: Duration,
}

impl std::fmt::Debug for DemoProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DemoProvider")
            .field("boot_delay", &self.boot_delay)
            .finish_non_exhaustive()
    }
}

impl DemoProvider {
    /// `count` demo VMs, all stopped; a started VM serves after `boot_delay`.
    pub fn new(count: u32, settings: Arc<DemoVmSettings>, boot_delay: Duration) -> Self {
        let slots = (1..=count)
            .map(|i| Slot {
                name: format!("demo-{i}"),
                ports: (free_port(), free_port()),
                state: State::Stopped,
            })
            .collect();
        Self {
            slots: Arc::new(Mutex::new(slots)),
            settings,
            boot_delay,
        }
    }

    fn error(operation: &str, message: impl Into<String>) -> ProviderError {
        ProviderError {
            provider: "demo",
            operation: operation.to_string(),
            message: message.into(),
            no_capacity: false,
        }
    }

    fn lock(&self) -> Result<MutexGuard<'_, Vec<Slot>>, ProviderError> {
        self.slots
            .lock()
            .map_err(|_| Self::error("lock", "internal state poisoned; restart poolgate demo"))
    }

    fn boot(&self, name: String, ports: (u16, u16)) -> JoinHandle<()> {
        let slots = self.slots.clone();
        let settings = self.settings.clone();
        let delay = self.boot_delay;
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let started = DemoVm::start(&name, ports, settings).await;
            let Ok(mut slots) = slots.lock() else { return };
            let Some(slot) = slots.iter_mut().find(|s| s.name == name) else {
                return;
            };
            if !matches!(slot.state, State::Starting(_)) {
                return; // stopped while booting: `vm` is dropped, which stops it
            }
            match started {
                Ok(vm) => {
                    slot.ports = (vm.ssh_addr().port(), vm.http_addr().port());
                    slot.state = State::Running(vm);
                }
                Err(e) => {
                    tracing::error!(vm = %name, error = %e, "demo VM failed to start");
                    slot.state = State::Stopped;
                }
            }
        })
    }
}

/// A port that was free a moment ago (a demo VM falls back to any free port if it is taken).
fn free_port() -> u16 {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

impl Provider for DemoProvider {
    fn name(&self) -> &'static str {
        "demo"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            start_stop: true,
            create_delete: false,
        }
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<ProviderVm>, ProviderError>> {
        let listed = self.lock().map(|slots| {
            slots
                .iter()
                .map(|slot| ProviderVm {
                    spec: VmSpec {
                        name: slot.name.clone(),
                        host: "127.0.0.1".into(),
                        ssh_port: slot.ports.0,
                        http_port: slot.ports.1,
                        weight: 1,
                        max_sessions: MAX_SESSIONS,
                    },
                    lifecycle: match slot.state {
                        State::Stopped => Lifecycle::Stopped,
                        State::Starting(_) => Lifecycle::Starting,
                        State::Running(_) => Lifecycle::Running,
                    },
                })
                .collect()
        });
        Box::pin(async move { listed })
    }

    fn start<'a>(&'a self, vms: &'a [String]) -> BoxFuture<'a, Result<(), ProviderError>> {
        let result = (|| {
            let mut slots = self.lock()?;
            for name in vms {
                let slot = slots
                    .iter_mut()
                    .find(|s| &s.name == name)
                    .ok_or_else(|| Self::error("start", format!("no demo VM named {name}")))?;
                if matches!(slot.state, State::Stopped) {
                    tracing::info!(vm = %name, delay = ?self.boot_delay, "demo VM booting");
                    slot.state = State::Starting(self.boot(name.clone(), slot.ports));
                }
            }
            Ok(())
        })();
        Box::pin(async move { result })
    }

    fn stop<'a>(&'a self, vms: &'a [String]) -> BoxFuture<'a, Result<(), ProviderError>> {
        let result = (|| {
            let mut slots = self.lock()?;
            for name in vms {
                let slot = slots
                    .iter_mut()
                    .find(|s| &s.name == name)
                    .ok_or_else(|| Self::error("stop", format!("no demo VM named {name}")))?;
                match std::mem::replace(&mut slot.state, State::Stopped) {
                    State::Starting(boot) => boot.abort(),
                    State::Running(vm) => drop(vm),
                    State::Stopped => {}
                }
            }
            Ok(())
        })();
        Box::pin(async move { result })
    }

    fn create(&self, _count: u32) -> BoxFuture<'_, Result<(), ProviderError>> {
        Box::pin(async {
            Err(Self::error(
                "create",
                "the demo pool has a fixed set of VMs (--max-vms)",
            ))
        })
    }

    fn delete<'a>(&'a self, _vms: &'a [String]) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async {
            Err(Self::error(
                "delete",
                "the demo pool has a fixed set of VMs (--max-vms)",
            ))
        })
    }
}

impl Drop for DemoProvider {
    fn drop(&mut self) {
        if let Ok(mut slots) = self.slots.lock() {
            for slot in slots.iter_mut() {
                if let State::Starting(boot) = std::mem::replace(&mut slot.state, State::Stopped) {
                    boot.abort();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::ShellSettings;
    use russh::keys::ssh_key::{Algorithm, PrivateKey};

    fn settings() -> Arc<DemoVmSettings> {
        let key = || PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap();
        Arc::new(DemoVmSettings {
            user_ca: key().public_key().clone(),
            host_ca: key(),
            shell: ShellSettings {
                program: "/bin/sh".into(),
                home: "/".into(),
                user: "nobody".into(),
                bash_rc: None,
                sftp_server: None,
                setsid: None,
            },
        })
    }

    fn lifecycles(vms: &[ProviderVm]) -> Vec<(&str, Lifecycle)> {
        vms.iter()
            .map(|v| (v.spec.name.as_str(), v.lifecycle))
            .collect()
    }

    #[tokio::test]
    async fn starts_after_the_delay_and_stops() {
        let provider = DemoProvider::new(2, settings(), Duration::from_millis(200));
        let vms = provider.list().await.unwrap();
        assert_eq!(
            lifecycles(&vms),
            [
                ("demo-1", Lifecycle::Stopped),
                ("demo-2", Lifecycle::Stopped)
            ]
        );
        provider.start(&["demo-2".into()]).await.unwrap();
        let vms = provider.list().await.unwrap();
        assert_eq!(vms[1].lifecycle, Lifecycle::Starting);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let running = loop {
            let vms = provider.list().await.unwrap();
            if vms[1].lifecycle == Lifecycle::Running {
                break vms[1].clone();
            }
            assert!(tokio::time::Instant::now() < deadline, "demo-2 never ran");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let ssh = tokio::net::TcpStream::connect(("127.0.0.1", running.spec.ssh_port))
            .await
            .unwrap();
        drop(ssh);
        provider.stop(&["demo-2".into()]).await.unwrap();
        assert_eq!(
            provider.list().await.unwrap()[1].lifecycle,
            Lifecycle::Stopped
        );
        // The listener is gone once the VM's tasks have been aborted.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            tokio::net::TcpStream::connect(("127.0.0.1", running.spec.ssh_port))
                .await
                .is_err()
        );
        assert!(provider.start(&["demo-9".into()]).await.is_err());
    }
}
