//! Several gateway replicas behind one address, sharing state in Redis (`[cluster]`).
//!
//! What is shared, and how (docs/scaling.md has the whole story):
//! - **Session counts.** Every `sync_interval` a replica publishes the sessions it holds per VM
//!   under a key that lives one `lease`, and reads the other live replicas' counts into the pool
//!   (`Pool::set_remote_load`): least-loaded, `max_sessions` and idleness see the whole pool. A
//!   replica killed with `kill -9` stops counting within one lease.
//! - **Affinity.** Placements are written to the store as they happen ([`SharedStore`]); a login
//!   asks the store first ([`SharedAffinity`]), so a user's second connection through another
//!   replica lands on the same VM.
//! - **Drains.** A drain or undrain on any replica (admin API, autoscaler) is published at the next
//!   sync and applied by every other replica at theirs.
//! - **Autoscaler leadership.** One replica at a time holds a lease with a fencing epoch and runs
//!   the autoscaler; the others publish their waiting connections for it. The leader acts only
//!   while its lease is valid by its own clock (renewed every sync, given up when a renewal fails).
//!   Drains carry whether the autoscaler made them for scale-in, so a new leader finishes the
//!   scale-ins an old one left half done instead of leaving those VMs drained.
//!
//! Redis is off the hot path: one round trip per replica per `sync_interval`, one GET per SSH
//! login, one write per placement, none per HTTP request or relayed byte. When Redis is
//! unreachable every replica keeps serving on its last view plus its own counts (other replicas'
//! counts are dropped after `remote_stale_after`), nobody leads, and everything converges when it
//! returns.

pub mod redis;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use router_core::{LoadCounts, Pool, Protocol};
use serde::Serialize;
use tokio::sync::watch;

pub use self::redis::{RedisStore, ReplicaRecord, StoreError};
use self::redis::{SyncReply, SyncRequest};
pub use self::store::SharedStore;
use crate::metrics::Metrics;
use crate::placement::SharedAffinity;

/// Settings of one replica's cluster membership.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// What this replica tells the others about itself.
    pub record: ReplicaRecord,
    /// Lifetime of published state and of the leader lease.
    pub lease: Duration,
    /// Time between syncs.
    pub sync_interval: Duration,
    /// Other replicas' counts are dropped when the store has been unreachable this long.
    pub remote_stale_after: Duration,
    /// How long a placement keeps a user's affinity (`routing.affinity_ttl`).
    pub affinity_ttl: Duration,
    /// Whether this replica may lead (it runs an autoscaler).
    pub wants_lead: bool,
}

/// How the cluster reaches the autoscaler without knowing it (joined in `app/`).
pub trait AutoscalerLink: Send + Sync {
    /// Connections this replica holds while the pool wakes, (SSH, HTTP).
    fn local_waiting(&self) -> (u32, u32);
    /// Connections the other replicas hold, (SSH, HTTP), for the leader's decisions.
    fn set_remote_waiting(&self, waiting: (u32, u32));
    /// VMs this replica's autoscaler drained for scale-in (published with the drain, so that a
    /// new leader can finish the job).
    fn scale_in_drains(&self) -> Vec<String>;
    /// Scale-in drains made by an earlier leader, handed to this one when it leads: it removes
    /// those VMs once empty, or undrains them when needed, instead of leaving them drained.
    fn inherit_scale_in_drains(&self, vms: &[String]);
}

/// One replica as `/api/v1/replicas` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ReplicaView {
    /// `cluster.replica_id`.
    pub id: String,
    /// poolgate version.
    pub version: String,
    /// Start time, seconds since the Unix epoch.
    pub started_unix: u64,
    /// Whether this is the replica answering.
    #[serde(rename = "self")]
    pub this: bool,
    /// Whether it runs the autoscaler now.
    pub leader: bool,
    /// Sessions it holds, all VMs.
    pub sessions: SessionTotals,
    /// Connections it holds while the pool wakes.
    pub waiting: u32,
    /// Host-key fingerprint (all replicas must agree).
    pub host_keys: String,
    /// Cookie-secret fingerprint (all replicas must agree).
    pub cookie_secret: String,
}

/// Sessions by protocol.
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct SessionTotals {
    /// SSH sessions.
    pub ssh: u32,
    /// Browser sessions.
    pub http: u32,
}

/// The cluster as the admin API shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ClusterView {
    /// `"memory"` or `"redis"`.
    pub store: String,
    /// Whether the last store call succeeded.
    pub store_up: bool,
    /// Seconds since the last successful sync (`None`: never).
    pub synced_seconds_ago: Option<f64>,
    /// This replica.
    pub replica_id: String,
    /// The leader's id, if any.
    pub leader: Option<String>,
    /// The leader's fencing epoch, if known.
    pub epoch: Option<u64>,
    /// Live replicas, this one first.
    pub replicas: Vec<ReplicaView>,
    /// Sessions per VM per replica (other replicas only; this one's are the pool's own).
    pub sessions_by_replica: BTreeMap<String, BTreeMap<String, SessionTotals>>,
}

/// Read access to the cluster, for the admin API.
pub trait ClusterStatus: Send + Sync {
    /// The current view.
    fn view(&self) -> ClusterView;
}

/// Margin by which a leader stops acting before its lease could have run out in Redis.
fn fencing_margin(lease: Duration) -> Duration {
    (lease / 5).max(Duration::from_millis(500))
}

#[derive(Default)]
struct State {
    /// Drain flags as last agreed with the store, per VM.
    synced_drains: HashMap<String, bool>,
    /// The store's identity at the last sync.
    boot: Option<String>,
    /// Our leader epoch (0: not leading).
    epoch: u64,
    /// When our leadership ends by our own clock.
    lead_until: Option<Instant>,
    last_ok: Option<Instant>,
    /// Whether other replicas' counts are applied to the pool.
    remote_applied: bool,
    /// When the affinity of users with live sessions was last re-written.
    affinity_refreshed: Option<Instant>,
    reply: SyncReply,
}

/// One replica's membership of the cluster.
pub struct Cluster {
    settings: ClusterSettings,
    store: RedisStore,
    pool: Arc<Pool>,
    metrics: Arc<Metrics>,
    autoscaler: std::sync::OnceLock<Arc<dyn AutoscalerLink>>,
    /// Placements to share, taken by [`Cluster::run`]'s writer.
    placements: Mutex<Option<store::Placements>>,
    state: Mutex<State>,
    store_up: AtomicBool,
    /// Shutting down: not leading, publishing counts until the sessions end.
    stopping: AtomicBool,
    /// Set when this process has handed its place to a new process of the same replica (an
    /// upgrade in place): the id it publishes its draining sessions under from then on,
    /// `<replica_id>~<pid>` (`~` is never part of a configured id).
    twin: std::sync::OnceLock<String>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("replica", &self.settings.record.id)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Membership of `pool` in the cluster behind `store`.
    pub fn new(
        settings: ClusterSettings,
        store: RedisStore,
        placements: Option<store::Placements>,
        pool: Arc<Pool>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        metrics.cluster_store_up.set(0);
        metrics.cluster_replicas.set(0);
        metrics.autoscale_leader.set(0);
        Arc::new(Self {
            settings,
            store,
            pool,
            metrics,
            autoscaler: std::sync::OnceLock::new(),
            placements: Mutex::new(placements),
            state: Mutex::new(State::default()),
            store_up: AtomicBool::new(true),
            stopping: AtomicBool::new(false),
            twin: std::sync::OnceLock::new(),
        })
    }

    /// An upgrade in place: the new process now publishes under this replica's id, so this one
    /// publishes its draining sessions under an id of its own until they end (the others count
    /// them as another replica's), and leaves the cluster under that id.
    pub fn hand_over(&self) {
        let twin = format!("{}~{}", self.settings.record.id, std::process::id());
        tracing::info!(replica = %twin, "upgrade: publishing this process's draining sessions under their own id");
        let _ = self.twin.set(twin);
    }

    /// The id this process publishes under.
    fn published_id(&self) -> &str {
        self.twin
            .get()
            .map_or(&self.settings.record.id, String::as_str)
    }

    /// Joins the autoscaler in: its waiting connections and scale-in drains (set once, at
    /// start-up).
    pub fn set_autoscaler(&self, autoscaler: Arc<dyn AutoscalerLink>) {
        let _ = self.autoscaler.set(autoscaler);
    }

    /// This replica's id.
    pub fn replica_id(&self) -> &str {
        &self.settings.record.id
    }

    /// Whether this replica may act as the autoscaler now: it holds the leader lease and, by its
    /// own clock, the lease has not run out (minus a margin).
    pub fn leads(&self) -> bool {
        self.state
            .lock()
            .is_ok_and(|s| s.lead_until.is_some_and(|until| Instant::now() < until))
    }

    /// Checks, before anything is served, that the live replicas were given the same host keys
    /// and cookie secret as this one. A store that cannot be reached is no reason not to start
    /// (logged); a mismatch is (the error names it).
    /// `successor`: this process takes over from the replica's previous process (an upgrade in
    /// place), which is then expected live under the same id.
    pub async fn check_peers(&self, successor: bool) -> anyhow::Result<()> {
        let peers = match self.store.peers().await {
            Ok(peers) => peers,
            Err(e) => {
                tracing::warn!(error = %e, "cluster store unreachable at start; serving on local state, will join when it answers");
                return Ok(());
            }
        };
        let me = &self.settings.record;
        for peer in peers.iter().filter(|p| p.id != me.id) {
            mismatch(me, peer)?;
        }
        if let Some(same) = peers
            .iter()
            .find(|p| !successor && p.id == me.id && p.started_unix != me.started_unix)
        {
            tracing::warn!(replica = %same.id, "another live replica uses this replica_id (or this replica restarted within one lease); give every replica its own cluster.replica_id");
        }
        Ok(())
    }

    fn local_ssh_sessions(&self) -> u32 {
        self.pool
            .snapshot()
            .vms()
            .iter()
            .map(|vm| vm.local_sessions(Protocol::Ssh))
            .sum()
    }

    /// Syncs every `sync_interval`. At shutdown it stops leading at once (another replica takes
    /// over within one lease) and goes on publishing its counts while its SSH sessions drain,
    /// then leaves the cluster (its counts vanish at once).
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.settings.sync_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let placements = self.placements.lock().ok().and_then(|mut p| p.take());
        let writer = async {
            match placements {
                Some(p) => SharedStore::write(p, self.clone()).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(writer);
        let mut writing = true;
        let mut stopping = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if stopping && self.local_ssh_sessions() == 0 {
                        break;
                    }
                    self.sync_once().await;
                }
                () = &mut writer, if writing => writing = false,
                _ = shutdown.changed(), if !stopping => if *shutdown.borrow() {
                    stopping = true;
                    self.stopping.store(true, Ordering::Release);
                    if let Ok(mut s) = self.state.lock() {
                        s.lead_until = None;
                    }
                    self.metrics.autoscale_leader.set(0);
                },
            }
        }
        let epoch = self.state.lock().map(|s| s.epoch).unwrap_or(0);
        if let Ok(mut s) = self.state.lock() {
            s.lead_until = None;
        }
        self.metrics.autoscale_leader.set(0);
        match self.store.leave(self.published_id(), epoch).await {
            Ok(()) => tracing::info!("left the cluster"),
            Err(e) => {
                tracing::warn!(error = %e, "could not leave the cluster; this replica's counts expire within one lease")
            }
        }
    }

    /// One sync: publish, read, apply.
    pub async fn sync_once(&self) {
        let snapshot = self.pool.snapshot();
        let local_waiting = self.autoscaler.get().map_or((0, 0), |a| a.local_waiting());
        let scale_in: Vec<String> = self
            .autoscaler
            .get()
            .map(|a| a.scale_in_drains())
            .unwrap_or_default();
        let (request, pushed) = {
            let Ok(state) = self.state.lock() else {
                return;
            };
            let mut record = self.settings.record.clone();
            record.id = self.published_id().to_owned();
            let mut req = SyncRequest {
                record,
                waiting: local_waiting,
                epoch: if self.stopping.load(Ordering::Acquire) {
                    0
                } else {
                    state.epoch
                },
                want_lead: self.settings.wants_lead && !self.stopping.load(Ordering::Acquire),
                ..SyncRequest::default()
            };
            let mut pushed = Vec::new();
            // A VM that left this replica's VM set drains here only until its sessions end:
            // not an operator's drain to publish.
            for vm in snapshot.vms() {
                let counts = LoadCounts {
                    ssh: vm.local_sessions(Protocol::Ssh),
                    http: vm.local_sessions(Protocol::Http),
                    tentative: vm.local_tentative_sessions(),
                };
                req.load.insert(vm.name().to_owned(), counts);
                if vm.status().leaving {
                    continue;
                }
                let draining = vm.status().draining;
                if let Some(&agreed) = state.synced_drains.get(vm.name())
                    && agreed != draining
                {
                    if draining {
                        let why = DrainRecord {
                            by: self.settings.record.id.clone(),
                            at_unix: unix_now(),
                            scale_in: scale_in.iter().any(|n| n == vm.name()),
                        };
                        req.drain_set.push((vm.name().to_owned(), why.to_json()));
                    } else {
                        req.drain_clear.push(vm.name().to_owned());
                    }
                    pushed.push((vm.name().to_owned(), draining));
                }
            }
            (req, pushed)
        };
        let sent = Instant::now();
        match self.store.sync(&request, self.settings.lease).await {
            Ok(reply) => self.apply(reply, sent, &pushed, &snapshot),
            Err(e) => self.store_failed(&e),
        }
        self.refresh_affinity().await;
    }

    /// Re-writes the affinity of users with live sessions here every quarter of its lifetime, so
    /// a session that outlives `routing.affinity_ttl` keeps its user's later logins through other
    /// replicas on its VM.
    async fn refresh_affinity(&self) {
        let every = (self.settings.affinity_ttl / 4).max(self.settings.sync_interval);
        let due = self.state.lock().is_ok_and(|mut s| {
            let due = s.affinity_refreshed.is_none_or(|t| t.elapsed() >= every);
            if due {
                s.affinity_refreshed = Some(Instant::now());
            }
            due
        });
        if !due {
            return;
        }
        let mut live: Vec<(String, String)> = self
            .pool
            .sessions()
            .into_iter()
            .filter_map(|s| Some((s.user?, s.vm)))
            .collect();
        live.sort();
        live.dedup_by(|a, b| a.0 == b.0);
        self.write_affinity(&live).await;
    }

    fn apply(
        &self,
        reply: SyncReply,
        sent: Instant,
        pushed: &[(String, bool)],
        snapshot: &router_core::Snapshot,
    ) {
        if !self.store_up.swap(true, Ordering::AcqRel) {
            tracing::info!("cluster store reachable again; sharing state");
        }
        let me = self.published_id().to_owned();
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        // Drains: our own changes landed; the store's changes apply here.
        let store_lost_data = state.boot.as_ref().is_some_and(|b| *b != reply.boot);
        // Leaving now, or when the request was made: such a VM drains itself until its
        // sessions end (see the request above), and its agreed flag stays as it was.
        let now = self.pool.snapshot();
        for vm in snapshot.vms() {
            let name = vm.name();
            if vm.status().leaving || now.get(name).is_some_and(|v| v.status().leaving) {
                continue;
            }
            let in_store = reply.drained.contains_key(name);
            let agreed = if let Some((_, mine)) = pushed.iter().find(|(n, _)| n == name) {
                *mine
            } else if store_lost_data {
                // The store restarted empty: this replica's flags are the truth; republish.
                false
            } else {
                let local = now
                    .get(name)
                    .map_or(vm.status().draining, |v| v.status().draining);
                let agreed = state.synced_drains.get(name).copied();
                if agreed.is_none_or(|a| a != in_store) && local != in_store {
                    if in_store {
                        self.pool.drain(name);
                    } else {
                        self.pool.undrain(name);
                    }
                    tracing::info!(vm = %name, draining = in_store, "drain from another replica");
                }
                in_store
            };
            state.synced_drains.insert(name.to_owned(), agreed);
        }
        state
            .synced_drains
            .retain(|name, _| snapshot.get(name).is_some());
        if store_lost_data {
            tracing::warn!(
                "the cluster store lost its data (restarted without persistence?); republishing this replica's drains"
            );
        }
        state.boot = Some(reply.boot.clone());
        // Leadership.
        let leading = reply.epoch > 0;
        if leading && state.epoch != reply.epoch {
            tracing::info!(epoch = reply.epoch, "took the autoscaler leadership");
        } else if !leading && state.epoch > 0 {
            tracing::warn!(epoch = state.epoch, leader = ?reply.leader, "lost the autoscaler leadership; not acting");
        }
        state.epoch = reply.epoch;
        state.lead_until = leading.then(|| {
            sent + self
                .settings
                .lease
                .saturating_sub(fencing_margin(self.settings.lease))
        });
        self.metrics.autoscale_leader.set(i64::from(leading));
        // A leader finishes the scale-in drains an earlier leader left (it may have died
        // between draining a VM and removing it); an operator's drains stay the operator's.
        let inherit: Vec<String> = if leading {
            // The drains just applied above are in the pool's current snapshot.
            let now = self.pool.snapshot();
            reply
                .drained
                .iter()
                .filter(|(name, why)| {
                    DrainRecord::parse(why).is_some_and(|r| r.scale_in)
                        && now.get(name).is_some_and(|vm| vm.status().draining)
                })
                .map(|(name, _)| name.clone())
                .collect()
        } else {
            Vec::new()
        };
        // Other replicas' counts.
        let mut remote: HashMap<&str, LoadCounts> = HashMap::new();
        let mut waiting = (0u32, 0u32);
        for r in reply.replicas.iter().filter(|r| r.record.id != me) {
            for (vm, load) in &r.load {
                let e = remote.entry(vm.as_str()).or_default();
                *e = e.saturating_add(*load);
            }
            waiting.0 = waiting.0.saturating_add(r.waiting.0);
            waiting.1 = waiting.1.saturating_add(r.waiting.1);
        }
        for vm in snapshot.vms() {
            let load = remote.get(vm.name()).copied().unwrap_or_default();
            self.pool.set_remote_load(vm.name(), load);
        }
        if let Some(a) = self.autoscaler.get() {
            a.set_remote_waiting(waiting);
        }
        state.remote_applied = true;
        state.last_ok = Some(Instant::now());
        self.metrics.cluster_store_up.set(1);
        self.metrics
            .cluster_replicas
            .set(i64::try_from(reply.replicas.len()).unwrap_or(i64::MAX));
        state.reply = reply;
        drop(state);
        if !inherit.is_empty()
            && let Some(a) = self.autoscaler.get()
        {
            a.inherit_scale_in_drains(&inherit);
        }
    }

    fn store_failed(&self, error: &StoreError) {
        if self.store_up.swap(false, Ordering::AcqRel) {
            tracing::warn!(%error, "cluster store unreachable; routing on the last view and this replica's counts, not leading until it answers");
        }
        self.metrics.cluster_store_up.set(0);
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        // A leader that cannot renew stops at the end of its lease by its own clock (`leads`).
        if state.lead_until.is_some_and(|u| Instant::now() >= u) {
            state.lead_until = None;
            if state.epoch > 0 {
                tracing::warn!(
                    epoch = state.epoch,
                    "autoscaler leadership lapsed (store unreachable); not acting"
                );
            }
            state.epoch = 0;
            self.metrics.autoscale_leader.set(0);
        }
        let stale = state
            .last_ok
            .is_none_or(|t| t.elapsed() >= self.settings.remote_stale_after);
        if stale && state.remote_applied {
            for vm in self.pool.snapshot().vms() {
                self.pool.set_remote_load(vm.name(), LoadCounts::default());
            }
            if let Some(a) = self.autoscaler.get() {
                a.set_remote_waiting((0, 0));
            }
            state.remote_applied = false;
            tracing::warn!(
                after_s = self.settings.remote_stale_after.as_secs_f64(),
                "other replicas' counts are too old; routing on this replica's own counts"
            );
        }
    }

    /// Records users' latest placements (from [`SharedStore`]).
    pub(crate) async fn write_affinity(&self, entries: &[(String, String)]) {
        if !self.store_up.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = self
            .store
            .set_affinity(entries, self.settings.affinity_ttl)
            .await
        {
            tracing::debug!(error = %e, "affinity not shared");
        }
    }
}

#[async_trait]
impl SharedAffinity for Cluster {
    async fn affinity(&self, user: &str) -> Option<String> {
        // While the store is known to be down, logins do not wait for it.
        if !self.store_up.load(Ordering::Acquire) {
            return None;
        }
        match self.store.affinity(user).await {
            Ok(vm) => vm,
            Err(e) => {
                tracing::debug!(error = %e, "shared affinity unavailable for this login");
                None
            }
        }
    }
}

impl ClusterStatus for Cluster {
    fn view(&self) -> ClusterView {
        let Ok(state) = self.state.lock() else {
            return self.empty_view();
        };
        let me = &self.settings.record.id;
        let leader_id = state
            .reply
            .leader
            .as_deref()
            .and_then(|l| l.rsplit_once(':'))
            .map(|(id, _)| id.to_owned());
        let epoch = state
            .reply
            .leader
            .as_deref()
            .and_then(|l| l.rsplit_once(':'))
            .and_then(|(_, e)| e.parse().ok());
        let mut replicas: Vec<ReplicaView> = state
            .reply
            .replicas
            .iter()
            .map(|r| {
                let mut sessions = SessionTotals::default();
                for load in r.load.values() {
                    sessions.ssh += load.ssh;
                    sessions.http += load.http;
                }
                ReplicaView {
                    id: r.record.id.clone(),
                    version: r.record.version.clone(),
                    started_unix: r.record.started_unix,
                    this: &r.record.id == me,
                    leader: leader_id.as_deref() == Some(r.record.id.as_str()),
                    sessions,
                    waiting: r.waiting.0 + r.waiting.1,
                    host_keys: r.record.host_keys.clone(),
                    cookie_secret: r.record.cookie_secret.clone(),
                }
            })
            .collect();
        if !replicas.iter().any(|r| r.this) {
            replicas.push(self.own_view());
        }
        replicas.sort_by(|a, b| b.this.cmp(&a.this).then_with(|| a.id.cmp(&b.id)));
        let sessions_by_replica = state
            .reply
            .replicas
            .iter()
            .filter(|r| &r.record.id != me)
            .map(|r| {
                let per_vm = r
                    .load
                    .iter()
                    .map(|(vm, load)| {
                        let totals = SessionTotals {
                            ssh: load.ssh,
                            http: load.http,
                        };
                        (vm.clone(), totals)
                    })
                    .collect();
                (r.record.id.clone(), per_vm)
            })
            .collect();
        ClusterView {
            store: "redis".into(),
            store_up: self.store_up.load(Ordering::Acquire) && state.last_ok.is_some(),
            synced_seconds_ago: state.last_ok.map(|t| t.elapsed().as_secs_f64()),
            replica_id: me.clone(),
            leader: leader_id,
            epoch,
            replicas,
            sessions_by_replica,
        }
    }
}

impl Cluster {
    fn own_view(&self) -> ReplicaView {
        own_view(&self.settings.record, &self.pool, self.leads())
    }

    fn empty_view(&self) -> ClusterView {
        ClusterView {
            store: "redis".into(),
            store_up: false,
            synced_seconds_ago: None,
            replica_id: self.settings.record.id.clone(),
            leader: None,
            epoch: None,
            replicas: vec![self.own_view()],
            sessions_by_replica: BTreeMap::new(),
        }
    }
}

/// A single replica with its state in memory (`[cluster]` absent or `store = "memory"`): the
/// admin API shows it as a cluster of one that always leads.
#[derive(Debug)]
pub struct Standalone {
    /// This replica.
    pub record: ReplicaRecord,
    /// Its pool.
    pub pool: Arc<Pool>,
}

impl ClusterStatus for Standalone {
    fn view(&self) -> ClusterView {
        ClusterView {
            store: "memory".into(),
            store_up: true,
            synced_seconds_ago: None,
            replica_id: self.record.id.clone(),
            leader: Some(self.record.id.clone()),
            epoch: None,
            replicas: vec![own_view(&self.record, &self.pool, true)],
            sessions_by_replica: BTreeMap::new(),
        }
    }
}

fn own_view(record: &ReplicaRecord, pool: &Pool, leader: bool) -> ReplicaView {
    let mut sessions = SessionTotals::default();
    for vm in pool.snapshot().vms() {
        sessions.ssh += vm.local_sessions(Protocol::Ssh);
        sessions.http += vm.local_sessions(Protocol::Http);
    }
    ReplicaView {
        id: record.id.clone(),
        version: record.version.clone(),
        started_unix: record.started_unix,
        this: true,
        leader,
        sessions,
        waiting: 0,
        host_keys: record.host_keys.clone(),
        cookie_secret: record.cookie_secret.clone(),
    }
}

/// An error naming what differs between this replica and `peer` (host keys, cookie secret).
pub fn check_same_secrets(me: &ReplicaRecord, peer: &ReplicaRecord) -> anyhow::Result<()> {
    mismatch(me, peer)
}

/// An error naming what differs between this replica and `peer`.
fn mismatch(me: &ReplicaRecord, peer: &ReplicaRecord) -> anyhow::Result<()> {
    if !peer.host_keys.is_empty() && peer.host_keys != me.host_keys {
        anyhow::bail!(
            "cluster: replica {} serves different SSH host keys (fingerprint {}) than this one ({}); every replica must be given the same ssh.host_keys files (see `poolgate keys init`), so this replica does not join",
            peer.id,
            peer.host_keys,
            me.host_keys
        );
    }
    if !peer.cookie_secret.is_empty() && peer.cookie_secret != me.cookie_secret {
        anyhow::bail!(
            "cluster: replica {} uses a different cookie secret (fingerprint {}) than this one ({}); every replica must be given the same http.cookie_secret_file (see `poolgate keys init`), so this replica does not join",
            peer.id,
            peer.cookie_secret,
            me.cookie_secret
        );
    }
    Ok(())
}

/// Who drained a VM and why, as the store keeps it (JSON, so that older and newer replicas read
/// each other's records).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
struct DrainRecord {
    /// The replica that published the drain.
    by: String,
    /// When, seconds since the Unix epoch.
    at_unix: u64,
    /// Drained by the autoscaler for scale-in (false: an operator's drain).
    #[serde(default)]
    scale_in: bool,
}

impl DrainRecord {
    fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    fn parse(text: &str) -> Option<Self> {
        serde_json::from_str(text).ok()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, host: &str, cookie: &str) -> ReplicaRecord {
        ReplicaRecord {
            id: id.into(),
            host_keys: host.into(),
            cookie_secret: cookie.into(),
            ..ReplicaRecord::default()
        }
    }

    #[test]
    fn drain_records_say_whether_the_autoscaler_drained_for_scale_in() {
        let mine = DrainRecord {
            by: "gw-1".into(),
            at_unix: 1_700_000_000,
            scale_in: true,
        };
        assert_eq!(DrainRecord::parse(&mine.to_json()), Some(mine));
        // A record without the field (an operator's drain, or an older replica's): not scale-in.
        let old = DrainRecord::parse(r#"{"by":"gw-0","at_unix":1}"#).unwrap();
        assert!(!old.scale_in);
        assert_eq!(DrainRecord::parse("not json"), None);
    }

    #[test]
    fn mismatched_secrets_are_named() {
        let me = record("gw-1", "aa", "cc");
        assert!(mismatch(&me, &record("gw-2", "aa", "cc")).is_ok());
        let e = mismatch(&me, &record("gw-2", "bb", "cc")).unwrap_err();
        assert!(
            e.to_string()
                .contains("replica gw-2 serves different SSH host keys"),
            "{e}"
        );
        let e = mismatch(&me, &record("gw-2", "aa", "dd")).unwrap_err();
        assert!(e.to_string().contains("different cookie secret"), "{e}");
    }

    #[test]
    fn the_leader_stops_before_its_lease_could_end() {
        assert_eq!(
            fencing_margin(Duration::from_secs(10)),
            Duration::from_secs(2)
        );
        assert_eq!(
            fencing_margin(Duration::from_secs(2)),
            Duration::from_millis(500)
        );
    }
}
