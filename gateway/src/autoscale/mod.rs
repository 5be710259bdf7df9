//! Autoscaler driver: keeps the pool in sync with the provider, runs router-core's policy every
//! `autoscale.tick` (or at once when a connection waits), applies its actions and explains them.

pub mod batch;
pub mod busy;
mod command;
pub mod providers;
pub mod schedule;
mod status;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use router_core::autoscale::{Action, AutoscaleConfig, Autoscaler, Observation, VmObservation};
use router_core::{Lifecycle, Pool};
use tokio::sync::{Notify, watch};

use self::busy::{BusyCheck, BusyTracker};
use self::providers::{Provider, ProviderError};
use crate::metrics::Metrics;

pub use self::status::{AutoscaleStatus, AutoscaleView};

/// Driver settings.
#[derive(Debug, Clone)]
pub struct DriverSettings {
    /// Run the policy at all (`autoscale.enabled`).
    pub enabled: bool,
    /// Policy numbers.
    pub policy: AutoscaleConfig,
    /// Time between decisions.
    pub tick: Duration,
    /// Time between provider listings.
    pub poll_interval: Duration,
    /// Hold connections while the pool wakes.
    pub wake_on_connect: bool,
    /// How long to hold them.
    pub hold_connect_for: Duration,
    /// Typical VM boot time (shown to waiting users).
    pub boot_estimate: Duration,
    /// What the health checks add after a VM's services are up before it serves: `health.rise`
    /// probes `health.interval` apart, the last of which may take `health.timeout`. A VM
    /// that came up counts as on its way for `boot_estimate` plus this.
    pub probe_margin: Duration,
}

#[cfg(test)]
impl DriverSettings {
    /// `policy` on, deciding and listing every second, no wake on connect: what unit tests
    /// drive.
    pub(crate) fn for_tests(policy: AutoscaleConfig) -> Self {
        Self {
            enabled: true,
            policy,
            tick: Duration::from_secs(1),
            poll_interval: Duration::from_secs(1),
            wake_on_connect: false,
            hold_connect_for: Duration::from_secs(60),
            boot_estimate: Duration::from_secs(2),
            probe_margin: Duration::ZERO,
        }
    }
}

/// Whether this gateway may act on the provider now. With several replicas only the holder of
/// the cluster's leader lease may (joined in by `app/`); a single replica always may.
pub trait Leadership: Send + Sync {
    /// True while this replica leads.
    fn leads(&self) -> bool;
}

/// The autoscaler driver.
pub struct Driver {
    pool: Arc<Pool>,
    provider: std::sync::RwLock<Arc<dyn Provider>>,
    settings: DriverSettings,
    policy: Mutex<Autoscaler>,
    metrics: Arc<Metrics>,
    waiting: AtomicU32,
    /// The same, per protocol (in `Protocol::ALL` order).
    waiting_by: [AtomicU32; 2],
    /// Connections other replicas hold while the pool wakes, per protocol (cluster).
    remote_waiting: [AtomicU32; 2],
    /// Who may act; unset: this gateway alone.
    leadership: std::sync::OnceLock<Arc<dyn Leadership>>,
    poke: Notify,
    view: Mutex<AutoscaleView>,
    /// Scale-in protection last set per VM (VMs with sessions are protected).
    protected: Mutex<std::collections::HashMap<String, bool>>,
    /// VMs that came up (provider: running) and have not passed a health probe since, with when
    /// they came up: still on their way for up to `boot_estimate` (their services start after
    /// the machine does).
    came_up: Mutex<std::collections::HashMap<String, tokio::time::Instant>>,
    /// The busy check (`autoscale.busy_command`), when on.
    busy: std::sync::OnceLock<BusyTracker>,
    /// VMs drained for scale-in (by this driver, or inherited from an earlier leader) and still
    /// draining — also while they are being stopped, after the policy has let go of them.
    scale_in: Mutex<std::collections::BTreeSet<String>>,
    /// Provider actions still running (a start, stop, delete or create can take minutes on
    /// Azure): the next decisions are made meanwhile and count them.
    in_flight: Mutex<InFlight>,
    /// `[[autoscale.schedule]]`, when it has windows.
    schedule: std::sync::OnceLock<schedule::Schedule>,
    /// The batch scheduler (`[batch]`), when there is one.
    batch: std::sync::OnceLock<Arc<dyn batch::BatchEngine>>,
    /// Its last successful read, and whether reads fail now (logged once each way).
    batch_view: Mutex<(Option<batch::BatchView>, bool)>,
    /// `batch.register_within` (zero: no check).
    register_within: std::sync::OnceLock<Duration>,
    /// Running VMs whose Slurm node has not registered, by VM name.
    unregistered: Mutex<std::collections::HashMap<String, Unregistered>>,
    /// The provider has listed the pool at least once (before that, a VM missing from the pool
    /// may just not be known yet).
    listed: std::sync::atomic::AtomicBool,
    /// The last listing failed (with its error, and since when): the pool the driver knows may
    /// be stale, so it starts, creates, stops and deletes nothing until a listing works again
    /// (see [`Driver::sync`]).
    listing_failed: Mutex<Option<(String, tokio::time::Instant)>>,
    /// Held across one listing and its application to the pool, so that a listing that began
    /// earlier is never applied over a later one (the loop's and an action's run side by side).
    sync_lock: tokio::sync::Mutex<()>,
    /// A task writing scale-in protection runs (one at a time).
    protecting: std::sync::atomic::AtomicBool,
    /// Slurm nodes of VMs gone for good that Slurm would not delete (logged once each).
    unforgettable: Mutex<std::collections::HashSet<String>>,
    /// The schedule's floor last applied, and its window (logged when it changes).
    schedule_floor: Mutex<(u32, Option<String>)>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("provider", &self.provider().name())
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Driver {
    /// A driver for `pool` over `provider`.
    pub fn new(
        pool: Arc<Pool>,
        provider: Arc<dyn Provider>,
        settings: DriverSettings,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let enabled = settings.enabled && provider.capabilities().can_scale();
        if settings.enabled && !enabled {
            tracing::warn!(
                provider = provider.name(),
                "autoscale.enabled, but the provider cannot start or create VMs; autoscaling is off"
            );
        }
        let view = AutoscaleView {
            enabled,
            min_vms: settings.policy.min_vms,
            max_vms: settings.policy.max_vms,
            ..Default::default()
        };
        metrics.autoscale_max_vms.set(if enabled {
            i64::from(settings.policy.max_vms)
        } else {
            0
        });
        Arc::new(Self {
            policy: Mutex::new(Autoscaler::new(settings.policy)),
            settings: DriverSettings {
                enabled,
                ..settings
            },
            pool,
            provider: std::sync::RwLock::new(provider),
            metrics,
            waiting: AtomicU32::new(0),
            waiting_by: [AtomicU32::new(0), AtomicU32::new(0)],
            remote_waiting: [AtomicU32::new(0), AtomicU32::new(0)],
            leadership: std::sync::OnceLock::new(),
            poke: Notify::new(),
            view: Mutex::new(view),
            protected: Mutex::new(std::collections::HashMap::new()),
            came_up: Mutex::new(std::collections::HashMap::new()),
            busy: std::sync::OnceLock::new(),
            scale_in: Mutex::new(std::collections::BTreeSet::new()),
            in_flight: Mutex::new(InFlight::default()),
            schedule: std::sync::OnceLock::new(),
            schedule_floor: Mutex::new((0, None)),
            batch: std::sync::OnceLock::new(),
            batch_view: Mutex::new((None, false)),
            register_within: std::sync::OnceLock::new(),
            unregistered: Mutex::new(std::collections::HashMap::new()),
            listed: std::sync::atomic::AtomicBool::new(false),
            listing_failed: Mutex::new(None),
            sync_lock: tokio::sync::Mutex::new(()),
            protecting: std::sync::atomic::AtomicBool::new(false),
            unforgettable: Mutex::new(std::collections::HashSet::new()),
        })
    }

    /// Sets the time-of-day windows (`[[autoscale.schedule]]`) that keep VMs warm. Set once, at
    /// startup; an empty schedule changes nothing.
    pub fn set_schedule(&self, schedule: schedule::Schedule) {
        if schedule.is_empty() {
            return;
        }
        if self.settings.enabled {
            tracing::info!(%schedule, "autoscale schedule");
        }
        let _ = self.schedule.set(schedule);
    }

    /// Reads Slurm's queue every decision (`[batch]`): pending jobs are demand, nodes running
    /// jobs are busy VMs, and drains are kept in step; a VM running for `register_within`
    /// (`batch.register_within`, zero: no check) whose node has not registered is reported and
    /// stops pending jobs from starting VMs. Set once, at startup.
    pub fn set_batch(&self, engine: Arc<dyn batch::BatchEngine>, register_within: Duration) {
        let _ = self.batch.set(engine);
        let _ = self.register_within.set(register_within);
    }

    /// Slurm now, or its last successful read when this one fails; and whether it is now's.
    async fn batch_view(&self) -> Option<(batch::BatchView, bool)> {
        let engine = self.batch.get()?;
        let read = engine.observe().await;
        let Ok(mut last) = self.batch_view.lock() else {
            return None;
        };
        match read {
            Ok(view) => {
                if last.1 {
                    tracing::info!("reading the batch queue works again");
                }
                self.metrics.batch_up.set(1);
                self.metrics
                    .batch_jobs
                    .with_label_values(&["pending"])
                    .set(i64::from(view.pending_jobs));
                self.metrics
                    .batch_jobs
                    .with_label_values(&["running"])
                    .set(i64::from(view.running_jobs));
                *last = (Some(view), false);
            }
            Err(e) => {
                if !last.1 {
                    tracing::warn!(error = %e, "reading the batch queue failed; deciding on the last view (VMs it showed running jobs stay busy)");
                }
                self.metrics.batch_up.set(0);
                last.1 = true;
            }
        }
        let fresh = !last.1;
        last.0.clone().map(|view| (view, fresh))
    }

    /// Running VMs whose Slurm node has not registered for `batch.register_within` or longer:
    /// absent from the partition, or in a state meaning its slurmd never registered or stopped
    /// answering ([`batch::UNREGISTERED`]). Timed from the first read that showed the VM running
    /// with its node so, and updated from fresh reads only (a VM started since the last good read
    /// is not in it). Warns once per VM (until it stops or registers), tells when it registers
    /// after all, and exports the count.
    fn unregistered_nodes(
        &self,
        view: &batch::BatchView,
        fresh: bool,
        snapshot: &router_core::Snapshot,
    ) -> u32 {
        let (Some(engine), Ok(mut known)) = (self.batch.get(), self.unregistered.lock()) else {
            return 0;
        };
        let within = self.register_within.get().copied().unwrap_or_default();
        if within.is_zero() {
            known.clear();
        } else if fresh {
            let now = tokio::time::Instant::now();
            let mut still = std::collections::HashSet::new();
            for vm in snapshot.vms() {
                if vm.status().lifecycle != Lifecycle::Running {
                    continue;
                }
                let node = engine.node_of(vm.name());
                let state = match view.nodes.get(&node) {
                    None => Some("absent from batch.partition".to_owned()),
                    Some(n) => n.unregistered.clone(),
                };
                let Some(state) = state else {
                    if known.remove(vm.name()).is_some_and(|u| u.overdue) {
                        tracing::info!(vm = vm.name(), %node, "the VM's Slurm node has registered");
                    }
                    continue;
                };
                still.insert(vm.name().to_owned());
                let entry = known
                    .entry(vm.name().to_owned())
                    .or_insert_with(|| Unregistered {
                        since: now,
                        overdue: false,
                    });
                if !entry.overdue && now.saturating_duration_since(entry.since) >= within {
                    entry.overdue = true;
                    tracing::warn!(
                        vm = vm.name(),
                        %node,
                        slurm_state = %state,
                        register_within = %humantime::format_duration(within),
                        "the VM's Slurm node has not registered: the VM runs, but Slurm cannot run jobs there. Pending jobs get another VM in its place while such VMs are fewer than those whose node registered, and start no more VMs once they are as many. Check on the VM: slurmd runs and registers (journalctl -u slurmd; slurmd -V must be 22.05 or newer and at most two major releases behind slurmctld), its munge key is the controller's (munge -n | unmunge there), and batch.node_name gives the name slurmd registers with"
                    );
                }
            }
            known.retain(|vm, _| still.contains(vm));
        }
        let overdue = known.values().filter(|u| u.overdue).count();
        let overdue = u32::try_from(overdue).unwrap_or(u32::MAX);
        self.metrics
            .batch_nodes_unregistered
            .set(i64::from(overdue));
        overdue
    }

    /// Keeps Slurm's drains in step with the pool's: a VM poolgate drains is drained in Slurm
    /// (no new job lands there), and a node poolgate drained is resumed once its VM serves again
    /// (undrained, or started). Other drains (an admin's own) are left alone.
    async fn sync_batch_drains(&self, view: &batch::BatchView, snapshot: &router_core::Snapshot) {
        let Some(engine) = self.batch.get() else {
            return;
        };
        let scale_in: std::collections::BTreeSet<String> =
            self.scale_in.lock().map(|s| s.clone()).unwrap_or_default();
        for vm in snapshot.vms() {
            let node = engine.node_of(vm.name());
            let Some(state) = view.nodes.get(&node) else {
                continue;
            };
            let status = vm.status();
            if status.leaving {
                // Gone from the VM set, draining here only until its sessions end: its Slurm
                // node is left as it is, as for any VM poolgate no longer manages.
                continue;
            }
            let alive = matches!(status.lifecycle, Lifecycle::Running | Lifecycle::Starting);
            if status.draining && alive && !state.drain {
                let reason = if scale_in.contains(vm.name()) {
                    batch::SCALE_IN_REASON
                } else {
                    batch::OPERATOR_REASON
                };
                match engine.drain(&node, reason).await {
                    Ok(()) => {
                        tracing::info!(vm = vm.name(), %node, reason, "drained the VM's Slurm node")
                    }
                    Err(e) => {
                        tracing::warn!(vm = vm.name(), %node, error = %e, "draining the VM's Slurm node failed; will retry")
                    }
                }
            } else if !status.draining
                && status.lifecycle == Lifecycle::Running
                && state.drained_by_poolgate()
            {
                match engine.resume(&node).await {
                    Ok(()) => tracing::info!(vm = vm.name(), %node, "resumed the VM's Slurm node"),
                    Err(e) => {
                        tracing::warn!(vm = vm.name(), %node, error = %e, "resuming the VM's Slurm node failed; will retry")
                    }
                }
            }
        }
        self.forget_gone_nodes(engine.as_ref(), view, snapshot)
            .await;
    }

    /// Deletes from Slurm the nodes poolgate drained whose VM is gone for good (deleted on
    /// scale-in, `deallocate_idle = false` or a provider without stop, or as failed): each VM
    /// registers a dynamic node under its own name, and without this they would stay DOWN in
    /// `sinfo` forever and count toward `MaxNodeCount`, which a new VM's node then cannot pass.
    /// A stopped VM keeps its node (it registers again when started); nodes poolgate did not
    /// drain (an admin's, other machines') and nodes with a job are never touched.
    async fn forget_gone_nodes(
        &self,
        engine: &dyn batch::BatchEngine,
        view: &batch::BatchView,
        snapshot: &router_core::Snapshot,
    ) {
        if !self.listed.load(Ordering::Acquire) {
            return;
        }
        let ours: std::collections::HashSet<String> = snapshot
            .vms()
            .iter()
            .map(|vm| engine.node_of(vm.name()))
            .collect();
        for (node, state) in &view.nodes {
            if ours.contains(node) || state.busy || !state.drained_by_poolgate() {
                continue;
            }
            match engine.forget(node).await {
                Ok(()) => tracing::info!(
                    %node,
                    "deleted the Slurm node of a VM that is gone (scontrol delete)"
                ),
                Err(e) => {
                    if self
                        .unforgettable
                        .lock()
                        .is_ok_and(|mut s| s.insert(node.clone()))
                    {
                        tracing::warn!(%node, error = %e, "the Slurm node of a VM that is gone could not be deleted (only dynamic nodes can be); it stays in sinfo");
                    }
                }
            }
        }
    }

    /// VMs the schedule keeps warm now, started a boot ahead of each window; logs when a window
    /// opens or closes.
    fn schedule_floor(&self) -> u32 {
        let Some(schedule) = self.schedule.get() else {
            return 0;
        };
        let floor = schedule.floor_ahead(jiff::Timestamp::now(), self.settings.boot_estimate);
        self.metrics
            .autoscale_schedule_min_vms
            .set(i64::from(floor.min_vms));
        if let Ok(mut last) = self.schedule_floor.lock()
            && (last.0, last.1.as_deref()) != (floor.min_vms, floor.window)
        {
            match floor.window {
                Some(window) => tracing::info!(
                    window,
                    min_vms = floor.min_vms,
                    "schedule window on: keeping VMs warm (started a boot ahead of the window)"
                ),
                None => tracing::info!("no schedule window on: the usual rules apply"),
            }
            *last = (floor.min_vms, floor.window.map(str::to_owned));
        }
        floor.min_vms
    }

    /// Turns the busy check on: idle VMs are asked before they are drained for scale-in and
    /// right before they are stopped, and kept while work runs on them. Set once, at startup.
    pub fn set_busy_check(&self, check: Arc<dyn BusyCheck>) {
        let p = &self.settings.policy;
        let tracker = BusyTracker::new(
            check,
            self.metrics.clone(),
            self.pool.clock().clone(),
            p.scale_in_after,
            p.scale_to_zero_after,
            self.settings.tick,
        );
        tracing::info!(
            recheck_s = tracker.recheck().as_secs_f64(),
            "busy check on: idle VMs are asked whether work runs on them before scale-in"
        );
        let _ = self.busy.set(tracker);
    }

    /// Makes the driver act only while `leadership` says so (several replicas). Set once, at
    /// startup.
    pub fn set_leadership(&self, leadership: Arc<dyn Leadership>) {
        let _ = self.leadership.set(leadership);
    }

    /// Whether this gateway may act on the provider now.
    pub fn leads(&self) -> bool {
        self.leadership.get().is_none_or(|l| l.leads())
    }

    /// Connections this gateway holds while the pool wakes, (SSH, HTTP).
    pub fn local_waiting(&self) -> (u32, u32) {
        (
            self.waiting_by[router_core::Protocol::Ssh.index()].load(Ordering::Acquire),
            self.waiting_by[router_core::Protocol::Http.index()].load(Ordering::Acquire),
        )
    }

    /// Connections other replicas hold while the pool wakes, (SSH, HTTP): the leader counts them
    /// as its own, and decides at once when someone new waits.
    pub fn set_remote_waiting(&self, (ssh, http): (u32, u32)) {
        let before = self.remote_waiting[router_core::Protocol::Ssh.index()]
            .swap(ssh, Ordering::AcqRel)
            + self.remote_waiting[router_core::Protocol::Http.index()].swap(http, Ordering::AcqRel);
        if ssh + http > before {
            self.poke.notify_one();
        }
    }

    /// VMs drained for scale-in that are still draining (until stopped, removed or undrained):
    /// published with the drain, so that a new leader can finish the job.
    pub fn scale_in_drains(&self) -> Vec<String> {
        let snapshot = self.pool.snapshot();
        let Ok(mut scale_in) = self.scale_in.lock() else {
            return Vec::new();
        };
        scale_in.retain(|vm| snapshot.get(vm).is_some_and(|v| v.status().draining));
        scale_in.iter().cloned().collect()
    }

    /// Takes over scale-in drains an earlier leader made (several replicas): the policy removes
    /// those VMs once empty, or undrains them when needed, as if it had drained them itself.
    /// Drains this driver made (or took over) already are its own, in the policy or being
    /// stopped.
    pub fn inherit_scale_in_drains(&self, vms: &[String]) {
        let (Ok(mut scale_in), Ok(mut policy)) = (self.scale_in.lock(), self.policy.lock()) else {
            return;
        };
        for vm in vms {
            if scale_in.insert(vm.clone()) {
                let _ = policy.adopt_drain(vm);
                tracing::info!(%vm, "took over a scale-in drain an earlier autoscaler made (another replica's, or this gateway's before an upgrade or a restart)");
            }
        }
    }

    fn waiting_for(&self, protocol: router_core::Protocol) -> u32 {
        self.waiting_by[protocol.index()].load(Ordering::Acquire)
            + self.remote_waiting[protocol.index()].load(Ordering::Acquire)
    }

    /// The provider in force.
    pub fn provider(&self) -> Arc<dyn Provider> {
        match self.provider.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the provider (config reload of a static pool, for instance).
    pub fn set_provider(&self, provider: Arc<dyn Provider>) {
        if let Ok(mut current) = self.provider.write() {
            *current = provider;
        }
    }

    /// Whether it scales: `autoscale.enabled`, with a provider that can start or create VMs.
    pub fn scales(&self) -> bool {
        self.settings.enabled
    }

    /// Whether a listing of the provider has worked since the start (an empty one too).
    pub fn has_listed(&self) -> bool {
        self.listed.load(Ordering::Acquire)
    }

    /// Whether connections should be held while the pool wakes.
    pub fn wakes_on_connect(&self) -> bool {
        self.settings.enabled && self.settings.wake_on_connect
    }

    /// Typical boot time.
    pub fn boot_estimate(&self) -> Duration {
        self.settings.boot_estimate
    }

    /// The sessions per VM the policy sizes the pool for (`autoscale.sessions_per_vm`).
    pub fn sessions_per_vm(&self) -> u32 {
        self.settings.policy.sessions_per_vm.max(1)
    }

    /// Whether some VM is still on its way: starting, being created, or running but not yet
    /// through its health probes within its boot time (on a real cloud the platform says
    /// "running" before sshd listens, so such a VM is down, not starting, in the pool).
    pub fn vms_on_their_way(&self) -> bool {
        let snapshot = self.pool.snapshot();
        snapshot
            .vms()
            .iter()
            .any(|vm| vm.status().lifecycle == Lifecycle::Starting)
            || !self.booting(&snapshot).is_empty()
            || self
                .in_flight
                .lock()
                .is_ok_and(|f| f.creating(&snapshot) > 0)
    }

    /// How long connections are held.
    pub fn hold_for(&self) -> Duration {
        self.settings.hold_connect_for
    }

    /// Registers a waiting connection and wakes the policy; the registration lasts as long as the
    /// returned guard.
    pub fn wait_guard(self: &Arc<Self>, protocol: router_core::Protocol) -> WaitGuard {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        self.waiting_by[protocol.index()].fetch_add(1, Ordering::AcqRel);
        self.metrics
            .sessions_waiting
            .with_label_values(&[protocol.as_str()])
            .inc();
        self.poke.notify_one();
        WaitGuard {
            driver: self.clone(),
            protocol,
        }
    }

    /// Lists the provider's VMs into the pool. While listings fail, the driver acts on nothing:
    /// a create that finished but whose instances were never listed would otherwise look
    /// undone, and every decision would add capacity again (on Azure the scale set's
    /// `sku.capacity` grew by the whole shortfall each time, past `max_vms`, while reads were
    /// throttled or not permitted and writes went through).
    pub async fn sync(&self) -> Result<(), ProviderError> {
        let _one_at_a_time = self.sync_lock.lock().await;
        let provider = self.provider();
        let listed = match provider.list().await {
            Ok(listed) => listed,
            Err(e) => {
                self.metrics.autoscale_provider_up.set(0);
                if let Ok(mut failed) = self.listing_failed.lock() {
                    let since = failed
                        .as_ref()
                        .map_or_else(tokio::time::Instant::now, |f| f.1);
                    *failed = Some((e.to_string(), since));
                }
                return Err(e);
            }
        };
        self.metrics.autoscale_provider_up.set(1);
        let was_failing = self.listing_failed.lock().ok().and_then(|mut f| f.take());
        if let Some((_, since)) = was_failing {
            tracing::info!(
                failed_for = %humantime::format_duration(Duration::from_secs(since.elapsed().as_secs())),
                "provider listing works again; the autoscaler acts again"
            );
        }
        let specs = listed.iter().map(|vm| vm.spec.clone()).collect();
        self.pool.set_vms(specs);
        self.listed.store(true, Ordering::Release);
        let snapshot = self.pool.snapshot();
        // A VM listed for the first time while instances are being created is one of them.
        let creating = self.in_flight.lock().is_ok_and(|f| !f.creates.is_empty());
        for vm in &listed {
            let current = snapshot.get(&vm.spec.name).map(|v| v.status().lifecycle);
            // A VM we asked to stop stays "stopping" until the provider says it stopped.
            let keep_stopping =
                current == Some(Lifecycle::Stopping) && vm.lifecycle == Lifecycle::Running;
            // A VM whose start is still running stays "starting" while the provider lists it
            // stopped (the start has not reached the platform yet): never started twice.
            let keep_starting = current == Some(Lifecycle::Starting)
                && vm.lifecycle == Lifecycle::Stopped
                && self.in_flight_for(&vm.spec.name);
            if current != Some(vm.lifecycle) && !keep_stopping && !keep_starting {
                self.pool.set_lifecycle(&vm.spec.name, vm.lifecycle);
                if vm.lifecycle == Lifecycle::Running
                    && (current.is_some() || creating)
                    && let Ok(mut came_up) = self.came_up.lock()
                {
                    came_up.insert(vm.spec.name.clone(), tokio::time::Instant::now());
                }
                tracing::info!(vm = %vm.spec.name, lifecycle = vm.lifecycle.as_str(), provider = provider.name(), "VM lifecycle");
            }
        }
        Ok(())
    }

    /// One policy decision, applied: returns once its provider actions have finished. The
    /// driver's own loop does not wait for them ([`Driver::run`]).
    pub async fn tick(self: &Arc<Self>) {
        for action in self.decide_and_dispatch().await {
            let _ = action.await;
        }
    }

    /// Whether a start, stop or delete of `vm` is running.
    fn in_flight_for(&self, vm: &str) -> bool {
        self.in_flight
            .lock()
            .map(|f| f.vms.contains(vm))
            .unwrap_or(false)
    }

    /// Why the pool the driver knows may be stale: the last listing failed (how long ago it
    /// began failing, and why). `None` while listings work.
    fn stale_view(&self) -> Option<String> {
        if !self.listed.load(Ordering::Acquire) {
            return Some(
                "the provider has not listed the pool yet; no VM is started or created before it has"
                    .to_owned(),
            );
        }
        let failed = self.listing_failed.lock().ok()?;
        let (error, since) = failed.as_ref()?;
        let failing_for = Duration::from_secs(since.elapsed().as_secs());
        Some(format!(
            "the provider's listing has failed for {}: {error}; no VM is started, created, \
             stopped or deleted until it works again",
            humantime::format_duration(failing_for)
        ))
    }

    /// One policy decision: drains and undrains applied at once, provider actions started on
    /// their own tasks (returned), so that a start or create that takes minutes never holds up
    /// the next decision. Actions still running are counted: their VMs are starting or
    /// stopping, and instances being created count as starting until they are listed. While the
    /// provider's listing fails nothing is decided ([`Driver::sync`]).
    async fn decide_and_dispatch(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        if self.stale_view().is_some() {
            return Vec::new();
        }
        let snapshot = self.pool.snapshot();
        let waiting_protocols: Vec<router_core::Protocol> = router_core::Protocol::ALL
            .into_iter()
            .filter(|&p| self.waiting_for(p) > 0)
            .collect();
        let booting = self.booting(&snapshot);
        let mut vms: Vec<VmObservation> = snapshot
            .vms()
            .iter()
            .map(|vm| {
                let status = vm.status();
                VmObservation {
                    name: vm.spec().name.clone(),
                    lifecycle: status.lifecycle,
                    draining: status.draining,
                    sessions: vm.total_sessions(),
                    idle_since: vm.idle_since(),
                    busy: false,
                    booting: booting.contains(vm.name()),
                    accepts_new: takes_waiting(vm, &waiting_protocols),
                }
            })
            .collect();
        if let Some(tracker) = self.busy.get() {
            let ours: std::collections::BTreeSet<String> = match self.policy.lock() {
                Ok(policy) => policy.draining().map(str::to_owned).collect(),
                Err(_) => return Vec::new(),
            };
            let specs: Vec<router_core::VmSpec> =
                snapshot.vms().iter().map(|vm| vm.spec().clone()).collect();
            tracker.observe(&mut vms, &specs, &ours, self.pool.clock().now());
        }
        // VMs whose Slurm node runs a job are busy, whatever the busy check said.
        let batch = self.batch_view().await;
        let mut busy_nodes = 0;
        let mut unregistered = 0;
        let mut registered = 0;
        if let (Some((view, fresh)), Some(engine)) = (&batch, self.batch.get()) {
            for v in &mut vms {
                let node = view.nodes.get(&engine.node_of(&v.name));
                if node.is_some_and(|n| n.busy) {
                    v.busy = true;
                    busy_nodes += 1u32;
                }
                if v.lifecycle == Lifecycle::Running
                    && node.is_some_and(|n| n.unregistered.is_none())
                {
                    registered += 1u32;
                }
            }
            self.metrics.batch_nodes_busy.set(i64::from(busy_nodes));
            unregistered = self.unregistered_nodes(view, *fresh, &snapshot);
            self.sync_batch_drains(view, &snapshot).await;
        }
        // Platform scale-in protection follows what the VMs said, not checks still under way.
        // Written on its own task: on Azure each change is a write followed to its end (5 s and
        // more), and ten VMs getting their first session at 9:00 would otherwise hold up the
        // scale-out their users wait for by a minute. One such task at a time.
        let kept = self.busy.get().map(BusyTracker::view).unwrap_or_default();
        let mut running = Vec::new();
        if let Some(changes) = self.protection_changes(&vms, &kept)
            && !self.protecting.swap(true, Ordering::AcqRel)
        {
            let driver = self.clone();
            let listed: std::collections::HashSet<String> =
                vms.iter().map(|v| v.name.clone()).collect();
            running.push(tokio::spawn(async move {
                // Let go also if the write panics: else no protection would be written again.
                let _done = ResetOnDrop(&driver.protecting);
                driver.protect(changes, &listed).await;
            }));
        }
        // Instances asked for and not listed yet are on their way like starting VMs.
        let creating = self
            .in_flight
            .lock()
            .map(|f| f.creating(&snapshot))
            .unwrap_or(0);
        vms.extend((1..=creating).map(|i| VmObservation {
            name: format!("(instance {i} being created)"),
            lifecycle: Lifecycle::Starting,
            draining: false,
            sessions: 0,
            idle_since: None,
            busy: false,
            booting: false,
            accepts_new: false,
        }));
        let waiting = router_core::Protocol::ALL
            .into_iter()
            .map(|p| self.waiting_for(p))
            .sum();
        let min_warm = self.schedule_floor();
        let decision = match self.policy.lock() {
            Ok(mut policy) => policy.decide(&Observation {
                vms: &vms,
                waiting,
                now: self.pool.clock().now(),
                min_warm,
                batch_pending_nodes: batch.as_ref().map_or(0, |(v, _)| v.pending_nodes),
                batch_running_nodes: busy_nodes,
                batch_unregistered_nodes: unregistered,
                batch_registered_nodes: registered,
            }),
            Err(_) => return Vec::new(),
        };
        self.metrics
            .autoscale_desired_vms
            .set(i64::from(decision.desired));
        let mut last = None;
        for (action, reason) in decision.actions {
            // A leader whose lease ran out while it decided does not act (another may lead now).
            if !self.leads() {
                tracing::warn!(action = ?action, "not applied: this replica no longer leads the autoscaler");
                break;
            }
            last = Some(format!("{action:?}: {reason}"));
            match self.prepare(&action, &vms) {
                Prepared::Done(label) => self.applied(&action, &reason, label),
                Prepared::Nothing => {
                    tracing::debug!(action = ?action, %reason, "autoscaler: no VM to start (the stopped ones are drained by an operator) and the provider cannot create");
                }
                prepared => {
                    let driver = self.clone();
                    running.push(tokio::spawn(async move {
                        let label = driver.execute(&prepared).await;
                        driver.finish(&prepared).await;
                        driver.applied(&action, &reason, label);
                    }));
                }
            }
        }
        if let Ok(mut view) = self.view.lock() {
            view.desired_vms = decision.desired;
            view.waiting = waiting;
            view.schedule_min_vms = min_warm;
            if last.is_some() {
                view.last_decision = last;
            }
        }
        if let Ok(f) = self.in_flight.lock() {
            self.publish_in_flight(&f);
        }
        running
    }

    /// `poolgate_autoscale_actions_in_flight` after actions were started or finished.
    fn publish_in_flight(&self, f: &InFlight) {
        self.metrics
            .autoscale_actions_in_flight
            .set(i64::try_from(f.len()).unwrap_or(i64::MAX));
    }

    /// Logs and counts an applied action.
    fn applied(&self, action: &Action, reason: &str, label: &'static str) {
        tracing::info!(action = ?action, %reason, result = label, "autoscaler");
        self.metrics
            .autoscale_actions_total
            .with_label_values(&[label])
            .inc();
    }

    /// The running VMs still on their way: not probed yet, or came up less than `boot_estimate`
    /// (plus what the health checks take to pass it: `probe_margin`) ago and not through a
    /// health probe since (sshd and JupyterHub start after the machine, so their first probes
    /// may fail). A VM that stays down past that is down. Before the margin, a VM that needed
    /// `health.rise` probes after a boot of about `boot_estimate` counted as down meanwhile,
    /// and the autoscaler started another for the same user.
    fn booting(&self, snapshot: &router_core::Snapshot) -> std::collections::HashSet<String> {
        let now = tokio::time::Instant::now();
        let Ok(mut came_up) = self.came_up.lock() else {
            return std::collections::HashSet::new();
        };
        came_up.retain(|name, at| {
            snapshot.get(name).is_some_and(|vm| {
                let status = vm.status();
                status.lifecycle == Lifecycle::Running
                    && status.health() != router_core::Health::Up
                    && now.saturating_duration_since(*at)
                        < self.settings.boot_estimate + self.settings.probe_margin
            })
        });
        snapshot
            .vms()
            .iter()
            .filter(|vm| {
                let status = vm.status();
                status.lifecycle == Lifecycle::Running
                    && (status.health() == router_core::Health::Unknown
                        || came_up.contains_key(vm.name()))
            })
            .map(|vm| vm.name().to_owned())
            .collect()
    }

    /// Which running VMs should be protected from the platform's own scale-in (Azure
    /// `protectFromScaleIn`) or no longer, because they have sessions or work the busy check
    /// found (`kept`): only changes from what was last set. `None`: no change.
    fn protection_changes(
        &self,
        vms: &[VmObservation],
        kept: &std::collections::BTreeMap<String, bool>,
    ) -> Option<Vec<(String, bool)>> {
        let changes: Vec<(String, bool)> = match self.protected.lock() {
            Ok(known) => vms
                .iter()
                .filter(|v| v.lifecycle == Lifecycle::Running)
                .map(|v| {
                    let busy = kept.get(&v.name).copied().unwrap_or(false);
                    (v.name.clone(), v.sessions > 0 || busy)
                })
                .filter(|(name, busy)| known.get(name).copied().unwrap_or(false) != *busy)
                .collect(),
            Err(_) => return None,
        };
        (!changes.is_empty()).then_some(changes)
    }

    /// Sends protection `changes` to the provider; remembers them once they went through
    /// (forgetting VMs no longer `listed`).
    async fn protect(
        &self,
        changes: Vec<(String, bool)>,
        listed: &std::collections::HashSet<String>,
    ) {
        match self.provider().protect(&changes).await {
            Ok(()) => {
                if let Ok(mut known) = self.protected.lock() {
                    known.retain(|name, _| listed.contains(name));
                    known.extend(changes);
                }
            }
            Err(e) => {
                // Counted like any failed provider action (the Azure provider backs off per VM,
                // so this is not a failure every tick).
                self.metrics
                    .autoscale_actions_total
                    .with_label_values(&["error"])
                    .inc();
                tracing::warn!(error = %e, "setting scale-in protection failed; will retry");
            }
        }
    }

    /// Applies a drain or undrain at once; for a provider action, marks what it will change
    /// (VMs starting or stopping, instances being created) so that the decisions made while it
    /// runs count it.
    fn prepare(&self, action: &Action, vms: &[VmObservation]) -> Prepared {
        let caps = self.provider().capabilities();
        match action {
            Action::Drain(vm) => {
                self.pool.drain(vm);
                if let Ok(mut scale_in) = self.scale_in.lock() {
                    scale_in.insert(vm.clone());
                }
                Prepared::Done("drain")
            }
            Action::Undrain(vm) => {
                self.pool.undrain(vm);
                Prepared::Done("undrain")
            }
            Action::Start(count) => {
                let provider = self.provider();
                // Stopped VMs the provider would start now first: one whose last start failed
                // and is backing off is asked for only when no other is stopped. A VM an
                // operator drained (stopped for patching, say) is never started: starting it
                // would put it back into service behind the operator's back.
                let ours = self.scale_in.lock().map(|s| s.clone()).unwrap_or_default();
                let mut stopped: Vec<String> = if caps.start_stop {
                    let mut stopped: Vec<&VmObservation> = vms
                        .iter()
                        .filter(|v| v.lifecycle == Lifecycle::Stopped)
                        .filter(|v| !v.draining || ours.contains(&v.name))
                        .collect();
                    stopped.sort_by_key(|v| !provider.can_start_now(&v.name));
                    stopped.into_iter().map(|v| v.name.clone()).collect()
                } else {
                    Vec::new()
                };
                stopped.truncate(*count as usize);
                if stopped.is_empty() && !caps.create_delete {
                    return Prepared::Nothing;
                }
                for vm in &stopped {
                    self.pool.undrain(vm);
                    self.pool.set_lifecycle(vm, Lifecycle::Starting);
                }
                let id = self.in_flight.lock().map_or(0, |mut f| {
                    f.vms.extend(stopped.iter().cloned());
                    let create = if caps.create_delete {
                        count.saturating_sub(stopped.len() as u32)
                    } else {
                        0
                    };
                    f.add_create(create, &self.pool.snapshot())
                });
                Prepared::Start {
                    stopped,
                    count: *count,
                    create_id: id,
                }
            }
            Action::Remove(vm) => {
                if let Ok(mut f) = self.in_flight.lock() {
                    f.vms.insert(vm.clone());
                }
                Prepared::Remove(vm.clone())
            }
        }
    }

    /// Runs a prepared provider action; the label counted for it.
    async fn execute(&self, prepared: &Prepared) -> &'static str {
        let provider = self.provider();
        let caps = provider.capabilities();
        let result = match prepared {
            Prepared::Done(label) => return label,
            Prepared::Nothing => return "none",
            Prepared::Start {
                stopped,
                count,
                create_id,
            } => {
                let mut result = Ok("start");
                // Instances to add beside the stopped ones started.
                let mut still = count.saturating_sub(stopped.len() as u32);
                if !stopped.is_empty() {
                    result = provider.start(stopped).await.map(|()| "start");
                    // No capacity for the stopped instances (Azure AllocationFailed, …): a new
                    // instance may be placed where there is, and the user waits for that
                    // instead of for a start that keeps failing. The count stays within the
                    // policy's room (stopped instances are not alive).
                    if let Err(e) = &result
                        && e.no_capacity
                        && caps.create_delete
                    {
                        tracing::warn!(error = %e, "starting stopped VMs failed for lack of capacity; creating new ones instead");
                        for vm in stopped {
                            self.pool.set_lifecycle(vm, Lifecycle::Stopped);
                        }
                        if let Ok(mut f) = self.in_flight.lock() {
                            for vm in stopped {
                                f.vms.remove(vm);
                            }
                            f.grow_create(*create_id, *count);
                        }
                        still = *count;
                        result = Ok("start");
                    }
                }
                if still > 0 && caps.create_delete && result.is_ok() {
                    result = provider.create(still).await.map(|()| "create");
                }
                result
            }
            Prepared::Remove(vm) => {
                if self.kept_busy(vm).await {
                    return "kept_busy";
                }
                self.pool.set_lifecycle(vm, Lifecycle::Stopping);
                let names = [vm.clone()];
                if caps.start_stop {
                    provider.stop(&names).await.map(|()| "stop")
                } else {
                    provider.delete(&names).await.map(|()| "delete")
                }
            }
        };
        match result {
            Ok(label) => label,
            Err(e) => {
                tracing::error!(error = %e, "autoscaler action failed");
                match prepared {
                    // Still there: make it serve again rather than leave it in limbo.
                    Prepared::Remove(vm) => {
                        self.pool.set_lifecycle(vm, Lifecycle::Running);
                        self.pool.undrain(vm);
                    }
                    // Not started: stopped again, for a later decision to try.
                    Prepared::Start { stopped, .. } => {
                        for vm in stopped {
                            self.pool.set_lifecycle(vm, Lifecycle::Stopped);
                        }
                    }
                    Prepared::Done(_) | Prepared::Nothing => {}
                }
                "error"
            }
        }
    }

    /// After a provider action: the provider's view of what changed is listed, then the action
    /// no longer counts as running (its instances are listed now, or it failed).
    async fn finish(&self, prepared: &Prepared) {
        if !matches!(prepared, Prepared::Done(_) | Prepared::Nothing)
            && let Err(e) = self.sync().await
        {
            tracing::warn!(error = %e, "provider listing after an action failed");
        }
        if let Ok(mut f) = self.in_flight.lock() {
            match prepared {
                Prepared::Start {
                    stopped, create_id, ..
                } => {
                    for vm in stopped {
                        f.vms.remove(vm);
                    }
                    f.creates.retain(|c| c.id != *create_id);
                }
                Prepared::Remove(vm) => {
                    f.vms.remove(vm);
                }
                Prepared::Done(_) | Prepared::Nothing => {}
            }
            self.publish_in_flight(&f);
        }
    }

    /// The check right before a VM is stopped or deleted: true when work runs on it (or the
    /// check cannot tell), in which case it is taken back into service instead.
    async fn kept_busy(&self, vm: &str) -> bool {
        if let Some(engine) = self.batch.get() {
            // Slurm asked again: a job that started since the decision keeps the VM.
            let node = engine.node_of(vm);
            let busy = match engine.observe().await {
                Ok(view) => view.nodes.get(&node).is_some_and(|n| n.busy),
                Err(e) => {
                    tracing::warn!(%vm, error = %e, "cannot read Slurm right before stopping the VM; kept");
                    true
                }
            };
            if busy {
                self.pool.undrain(vm);
                tracing::info!(%vm, %node, "not stopping the VM: a Slurm job runs on it; taken back into service");
                return true;
            }
        }
        let Some(tracker) = self.busy.get() else {
            return false;
        };
        let Some(spec) = self.pool.snapshot().get(vm).map(|v| v.spec().clone()) else {
            return false;
        };
        let verdict = tracker.check_now(&spec).await;
        if !verdict.keeps() {
            return false;
        }
        self.pool.undrain(vm);
        tracing::info!(
            %vm,
            result = verdict.label(),
            "not stopping the VM: the check right before stopping found work running (or could not tell); taken back into service"
        );
        true
    }

    /// Syncs and decides every tick (at once when poked) until shutdown.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut last_sync: Option<tokio::time::Instant> = None;
        loop {
            let due = last_sync.is_none_or(|at| at.elapsed() >= self.settings.poll_interval);
            if due {
                match self.sync().await {
                    Ok(()) => last_sync = Some(tokio::time::Instant::now()),
                    Err(e) => {
                        tracing::warn!(error = %e, "provider listing failed; keeping the last known pool, and starting, creating, stopping or deleting no VM until a listing works");
                        self.metrics
                            .autoscale_actions_total
                            .with_label_values(&["error"])
                            .inc();
                        last_sync = Some(tokio::time::Instant::now());
                    }
                }
            }
            if self.settings.enabled && self.leads() {
                // Provider actions run on their own tasks; the next decision does not wait.
                drop(self.decide_and_dispatch().await);
            } else if let Ok(mut unregistered) = self.unregistered.lock() {
                // Only the leader reads Slurm: a follower (or a former leader) counts nothing,
                // and times again from scratch once it leads.
                unregistered.clear();
                self.metrics.batch_nodes_unregistered.set(0);
            }
            tokio::select! {
                _ = tokio::time::sleep(self.settings.tick.min(self.settings.poll_interval)) => {}
                _ = self.poke.notified() => {}
                _ = shutdown.changed() => if *shutdown.borrow() { return },
            }
        }
    }
}

impl AutoscaleStatus for Driver {
    fn view(&self) -> AutoscaleView {
        let mut view = self.view.lock().map(|v| v.clone()).unwrap_or_default();
        view.waiting = router_core::Protocol::ALL
            .into_iter()
            .map(|p| self.waiting_for(p))
            .sum();
        if let Some(tracker) = self.busy.get() {
            view.busy = tracker.view();
        }
        if view.enabled {
            view.provider_error = self.stale_view();
        }
        view
    }
}

/// Clears a flag when dropped.
struct ResetOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for ResetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// A decided action, its effects on the pool marked.
#[derive(Debug)]
enum Prepared {
    /// Applied already (drain, undrain), with its label.
    Done(&'static str),
    /// Start these stopped VMs and create the rest of `count`.
    Start {
        stopped: Vec<String>,
        count: u32,
        /// Its entry in [`InFlight::creates`].
        create_id: u64,
    },
    /// Stop or delete this VM (after the busy check).
    Remove(String),
    /// Nothing the provider can do: the only stopped VMs are drained by an operator, and it
    /// cannot create.
    Nothing,
}

/// A running VM whose Slurm node has not registered.
#[derive(Debug)]
struct Unregistered {
    /// First read that showed it so.
    since: tokio::time::Instant,
    /// Past `batch.register_within` (warned, counted).
    overdue: bool,
}

/// Provider actions under way.
#[derive(Debug, Default)]
struct InFlight {
    /// VMs being started, stopped or deleted.
    vms: std::collections::HashSet<String>,
    /// Instances being created.
    creates: Vec<Creating>,
    next_id: u64,
}

/// A create under way: `count` instances asked for when the pool held `known`.
#[derive(Debug)]
struct Creating {
    id: u64,
    count: u32,
    known: std::collections::HashSet<String>,
}

impl InFlight {
    /// Registers a create of `count` instances (none: an entry that only reserves the id);
    /// returns its id.
    fn add_create(&mut self, count: u32, snapshot: &router_core::Snapshot) -> u64 {
        self.next_id += 1;
        self.creates.push(Creating {
            id: self.next_id,
            count,
            known: snapshot
                .vms()
                .iter()
                .map(|vm| vm.name().to_owned())
                .collect(),
        });
        self.next_id
    }

    /// Actions under way: VMs being started or stopped, and creates of at least one instance.
    fn len(&self) -> usize {
        self.vms.len() + self.creates.iter().filter(|c| c.count > 0).count()
    }

    /// A start that fell back to creating: `count` instances now.
    fn grow_create(&mut self, id: u64, count: u32) {
        if let Some(c) = self.creates.iter_mut().find(|c| c.id == id) {
            c.count = count;
        }
    }

    /// Instances asked for that the pool does not list yet.
    fn creating(&self, snapshot: &router_core::Snapshot) -> u32 {
        self.creates
            .iter()
            .map(|c| {
                let new = snapshot
                    .vms()
                    .iter()
                    .filter(|vm| !c.known.contains(vm.name()))
                    .count();
                c.count
                    .saturating_sub(u32::try_from(new).unwrap_or(u32::MAX))
            })
            .sum()
    }
}

/// Whether `vm` takes new sessions of every protocol someone waits on (of any protocol when
/// nobody waits): an SSH user waiting while every sshd is down still gets a VM started, even
/// though the web sides take browsers.
fn takes_waiting(vm: &router_core::Vm, waiting: &[router_core::Protocol]) -> bool {
    if waiting.is_empty() {
        router_core::Protocol::ALL
            .iter()
            .any(|&p| vm.accepts_new_sessions(p))
    } else {
        waiting.iter().all(|&p| vm.accepts_new_sessions(p))
    }
}

/// A connection counted as waiting for a VM.
pub struct WaitGuard {
    driver: Arc<Driver>,
    protocol: router_core::Protocol,
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        self.driver.waiting.fetch_sub(1, Ordering::AcqRel);
        self.driver.waiting_by[self.protocol.index()].fetch_sub(1, Ordering::AcqRel);
        self.driver
            .metrics
            .sessions_waiting
            .with_label_values(&[self.protocol.as_str()])
            .dec();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use std::collections::BTreeSet;
    use std::sync::Mutex;
    use std::time::Duration;

    use futures::future::BoxFuture;
    use router_core::autoscale::AutoscaleConfig;
    use router_core::{Health, Lifecycle, ManualClock, Pool, Protocol, RoutingPolicy, VmSpec};

    use super::batch::{BatchEngine, BatchView, NodeState};
    use super::providers::{Capabilities, Provider, ProviderError, ProviderVm};
    use super::{Driver, DriverSettings, InFlight, Metrics, takes_waiting};

    #[test]
    fn instances_being_created_count_until_they_are_listed() {
        let pool = Pool::new(RoutingPolicy::default(), Arc::new(ManualClock::new()));
        pool.set_vms(vec![VmSpec::new("a", "127.0.0.1")]);
        let mut f = InFlight::default();
        let id = f.add_create(2, &pool.snapshot());
        let _start_only = f.add_create(0, &pool.snapshot());
        assert_eq!((f.creating(&pool.snapshot()), f.len()), (2, 1));
        pool.set_vms(vec![
            VmSpec::new("a", "127.0.0.1"),
            VmSpec::new("b", "127.0.0.2"),
        ]);
        assert_eq!(f.creating(&pool.snapshot()), 1);
        // A start that fell back to creating three.
        f.grow_create(id, 3);
        assert_eq!(f.creating(&pool.snapshot()), 2);
        pool.set_vms(
            ["a", "b", "c", "d"]
                .iter()
                .map(|n| VmSpec::new(*n, "127.0.0.1"))
                .collect(),
        );
        assert_eq!(f.creating(&pool.snapshot()), 0);
        f.creates.retain(|c| c.id != id);
        assert_eq!(f.len(), 0);
    }

    /// VMs `a` and `b`, stopped until started; records starts and stops.
    #[derive(Default)]
    struct FakeProvider {
        running: Mutex<BTreeSet<String>>,
        log: Mutex<Vec<String>>,
    }

    impl Provider for FakeProvider {
        fn name(&self) -> &'static str {
            "fake"
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities {
                start_stop: true,
                create_delete: false,
            }
        }
        fn list(&self) -> BoxFuture<'_, Result<Vec<ProviderVm>, ProviderError>> {
            let running = self.running.lock().expect("lock").clone();
            Box::pin(async move {
                Ok(["a", "b"]
                    .into_iter()
                    .map(|n| ProviderVm {
                        spec: VmSpec::new(n, "127.0.0.1"),
                        lifecycle: if running.contains(n) {
                            Lifecycle::Running
                        } else {
                            Lifecycle::Stopped
                        },
                    })
                    .collect())
            })
        }
        fn start<'a>(&'a self, vms: &'a [String]) -> BoxFuture<'a, Result<(), ProviderError>> {
            for vm in vms {
                self.running.lock().expect("lock").insert(vm.clone());
                self.log.lock().expect("lock").push(format!("start {vm}"));
            }
            Box::pin(async { Ok(()) })
        }
        fn stop<'a>(&'a self, vms: &'a [String]) -> BoxFuture<'a, Result<(), ProviderError>> {
            for vm in vms {
                self.running.lock().expect("lock").remove(vm);
                self.log.lock().expect("lock").push(format!("stop {vm}"));
            }
            Box::pin(async { Ok(()) })
        }
        fn create(&self, _count: u32) -> BoxFuture<'_, Result<(), ProviderError>> {
            Box::pin(async { Ok(()) })
        }
        fn delete<'a>(&'a self, _vms: &'a [String]) -> BoxFuture<'a, Result<(), ProviderError>> {
            Box::pin(async { Ok(()) })
        }
    }

    /// Slurm as a test sets it: the view each read returns (or a failed read).
    /// And the nodes it was asked to delete.
    struct FakeSlurm(Mutex<Result<BatchView, String>>, Mutex<Vec<String>>);

    impl FakeSlurm {
        fn set(&self, view: Result<BatchView, String>) {
            *self.0.lock().expect("lock") = view;
        }
    }

    impl BatchEngine for FakeSlurm {
        fn observe(&self) -> BoxFuture<'_, Result<BatchView, String>> {
            let view = self.0.lock().expect("lock").clone();
            Box::pin(async move { view })
        }
        fn drain<'a>(&'a self, _: &'a str, _: &'a str) -> BoxFuture<'a, Result<(), String>> {
            Box::pin(async { Ok(()) })
        }
        fn resume<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<(), String>> {
            Box::pin(async { Ok(()) })
        }
        fn forget<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<(), String>> {
            self.1.lock().expect("lock").push(node.to_owned());
            Box::pin(async { Ok(()) })
        }
        fn node_of(&self, vm: &str) -> String {
            format!("node-{vm}")
        }
    }

    fn queue(pending_nodes: u32, nodes: &[(&str, Option<&str>)]) -> BatchView {
        BatchView {
            pending_jobs: pending_nodes,
            pending_nodes,
            running_jobs: 0,
            nodes: nodes
                .iter()
                .map(|(name, unregistered)| {
                    (
                        (*name).to_owned(),
                        NodeState {
                            reason: "none".into(),
                            unregistered: unregistered.map(str::to_owned),
                            ..NodeState::default()
                        },
                    )
                })
                .collect(),
        }
    }

    /// A driver over the fake provider, and what the batch tests look at.
    struct BatchRig {
        clock: Arc<ManualClock>,
        pool: Arc<Pool>,
        provider: Arc<FakeProvider>,
        metrics: Arc<Metrics>,
        driver: Arc<Driver>,
    }

    /// A driver over the fake provider (VMs a and b, max 2) with the given scale-in and
    /// scale-to-zero delays (seconds), on a manual clock.
    fn batch_driver(scale_in_after: u64, scale_to_zero_after: u64) -> BatchRig {
        let clock = Arc::new(ManualClock::new());
        let pool = Arc::new(Pool::new(RoutingPolicy::default(), clock.clone()));
        let provider = Arc::new(FakeProvider::default());
        let metrics = Arc::new(Metrics::new());
        let settings = DriverSettings::for_tests(AutoscaleConfig {
            min_vms: 0,
            max_vms: 2,
            sessions_per_vm: 4,
            spare_vms: 0,
            scale_in_after: Duration::from_secs(scale_in_after),
            scale_to_zero_after: Duration::from_secs(scale_to_zero_after),
            cooldown: Duration::ZERO,
        });
        let driver = Driver::new(pool.clone(), provider.clone(), settings, metrics.clone());
        BatchRig {
            clock,
            pool,
            provider,
            metrics,
            driver,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stopped_vm_an_operator_drained_is_never_started_for_waiting_users() {
        let BatchRig {
            pool,
            provider,
            driver,
            ..
        } = batch_driver(600, 900);
        driver.sync().await.expect("sync");
        // Stopped for patching: the operator drained a.
        pool.drain("a");
        let _waiting = driver.wait_guard(Protocol::Ssh);
        let a_drained = || {
            pool.snapshot()
                .get("a")
                .is_some_and(|vm| vm.status().draining)
        };
        driver.tick().await;
        assert_eq!(*provider.log.lock().expect("lock"), ["start b"]);
        assert!(a_drained());
        // b is up and full; another user waits: a stays stopped and drained.
        driver.sync().await.expect("sync");
        let _more: Vec<_> = (0..8).map(|_| driver.wait_guard(Protocol::Ssh)).collect();
        driver.tick().await;
        driver.tick().await;
        assert_eq!(*provider.log.lock().expect("lock"), ["start b"]);
        assert!(a_drained());
    }

    #[tokio::test(start_paused = true)]
    async fn a_vm_whose_slurm_node_never_registers_is_counted_once_and_no_more_vms_are_started_for_the_queue()
     {
        let BatchRig {
            clock,
            pool,
            provider,
            metrics,
            driver,
        } = batch_driver(2, 3);
        let slurm = Arc::new(FakeSlurm(Mutex::new(Ok(queue(1, &[]))), Mutex::default()));
        driver.set_batch(slurm.clone(), Duration::from_secs(60));
        driver.sync().await.expect("sync");
        let step = |secs: u64| {
            let clock = clock.clone();
            async move {
                clock.advance(Duration::from_secs(secs));
                tokio::time::advance(Duration::from_secs(secs)).await;
            }
        };
        let log = || provider.log.lock().expect("lock").clone();
        // A job pending on a pool at zero starts one VM.
        driver.tick().await;
        assert_eq!(log(), vec!["start a"]);
        pool.set_health("a", Health::Up);
        // Its node is not in the partition (a dynamic node that never registered): within
        // register_within, nothing is reported.
        for _ in 0..5 {
            step(10).await;
            driver.tick().await;
            assert_eq!(metrics.batch_nodes_unregistered.get(), 0);
        }
        // A failed read says nothing new: the last view is not evidence.
        slurm.set(Err("squeue timed out".into()));
        step(25).await;
        driver.tick().await;
        assert_eq!(metrics.batch_nodes_unregistered.get(), 0);
        // Read again, past register_within: counted.
        slurm.set(Ok(queue(1, &[])));
        driver.tick().await;
        assert_eq!(metrics.batch_nodes_unregistered.get(), 1);
        // More jobs queue, and a minute goes by, past scale_in_after and scale_to_zero_after:
        // no VM is started for them, and the one up is neither drained nor stopped.
        slurm.set(Ok(queue(3, &[("node-a", Some("DOWN+NOT_RESPONDING"))])));
        for _ in 0..6 {
            step(10).await;
            driver.tick().await;
            assert_eq!(metrics.batch_nodes_unregistered.get(), 1);
        }
        assert_eq!(log(), vec!["start a"]);
        assert!(!pool.snapshot().get("a").expect("a").status().draining);
        assert!(
            driver
                .unregistered
                .lock()
                .expect("lock")
                .get("a")
                .is_some_and(|u| u.overdue)
        );
        // The node registers (slurmd fixed): no longer counted, and the queue starts b as usual.
        slurm.set(Ok(queue(3, &[("node-a", None)])));
        driver.tick().await;
        assert_eq!(metrics.batch_nodes_unregistered.get(), 0);
        assert_eq!(log(), vec!["start a", "start b"]);
        // b never registers either; a stopped and started again starts its wait over.
        pool.set_health("b", Health::Up);
        slurm.set(Ok(queue(
            2,
            &[("node-a", None), ("node-b", Some("UNKNOWN"))],
        )));
        step(61).await;
        driver.tick().await;
        assert_eq!(metrics.batch_nodes_unregistered.get(), 0, "b just seen");
        step(61).await;
        driver.tick().await;
        assert_eq!(metrics.batch_nodes_unregistered.get(), 1);
        // With no check (register_within 0s) nothing is ever counted.
        let quiet = Driver::new(
            pool.clone(),
            provider.clone(),
            driver.settings.clone(),
            Arc::new(Metrics::new()),
        );
        quiet.set_batch(slurm.clone(), Duration::ZERO);
        quiet.tick().await;
        step(600).await;
        quiet.tick().await;
        assert_eq!(quiet.metrics.batch_nodes_unregistered.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_slurm_node_of_a_vm_gone_for_good_is_deleted_and_no_other() {
        let driver = batch_driver(60, 60).driver;
        let node = |reason: &str, busy: bool| NodeState {
            busy,
            drain: reason != "none",
            reason: reason.to_owned(),
            unregistered: Some("DOWN".to_owned()),
        };
        let mut view = queue(0, &[]);
        view.nodes = [
            // b is stopped, not gone: its node stays for its next start.
            ("node-b", node(super::batch::SCALE_IN_REASON, false)),
            // Gone VMs: deleted by scale-in, and drained by an operator through poolgate.
            ("node-c", node(super::batch::SCALE_IN_REASON, false)),
            ("node-d", node(super::batch::OPERATOR_REASON, false)),
            // Not poolgate's to delete: an admin's drain, no drain, a job still on it.
            ("node-e", node("maintenance", false)),
            ("node-f", node("none", false)),
            ("node-g", node(super::batch::SCALE_IN_REASON, true)),
        ]
        .into_iter()
        .map(|(n, s)| (n.to_owned(), s))
        .collect();
        let slurm = Arc::new(FakeSlurm(Mutex::new(Ok(view)), Mutex::default()));
        driver.set_batch(slurm.clone(), Duration::from_secs(600));
        let forgotten = || {
            let mut v = slurm.1.lock().expect("lock").clone();
            v.sort();
            v
        };
        // Before the provider has listed the pool, no VM is known gone.
        driver.tick().await;
        assert_eq!(forgotten(), Vec::<String>::new());
        driver.sync().await.expect("sync");
        driver.tick().await;
        assert_eq!(forgotten(), vec!["node-c", "node-d"]);
    }

    #[test]
    fn a_vm_takes_waiting_sessions_only_of_the_protocols_it_serves() {
        let pool = Pool::new(RoutingPolicy::default(), Arc::new(ManualClock::new()));
        pool.set_vms(vec![VmSpec::new("a", "127.0.0.1")]);
        // sshd down, web side up.
        pool.set_protocol_health("a", Protocol::Ssh, Health::Down);
        pool.set_protocol_health("a", Protocol::Http, Health::Up);
        let snap = pool.snapshot();
        let vm = snap.get("a").expect("a");
        assert!(takes_waiting(vm, &[]));
        assert!(takes_waiting(vm, &[Protocol::Http]));
        assert!(!takes_waiting(vm, &[Protocol::Ssh]));
        assert!(!takes_waiting(vm, &[Protocol::Ssh, Protocol::Http]));
        pool.drain("a");
        let snap = pool.snapshot();
        assert!(!takes_waiting(snap.get("a").expect("a"), &[]));
    }
}
