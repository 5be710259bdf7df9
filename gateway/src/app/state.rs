//! What a gateway must not forget when its process ends: which VMs are drained (by an operator,
//! or by the autoscaler for scale-in) and which VM each user goes back to.
//!
//! An upgrade in place hands it to the new process in its first report ([`super::handover`]).
//! A restart (or a crash) reads it back from `gateway.state_file`, which [`StateKeeper`] rewrites
//! while the gateway runs: within [`SAVE_EVERY`] of a drain, an undrain or a user's first or last
//! session, at least every [`REFRESH_EVERY`] while sessions are open (their users' "last seen"
//! is then), and at exit. With `[cluster] store = "redis"` none of this is used: Redis keeps the
//! drains and the affinity for every replica.
//!
//! A scale-in drain stays the autoscaler's in the next process: it removes the VM once empty, or
//! takes it back into service when needed. Taken for an operator's drain it would stay drained,
//! running and unused, until someone undrained it by hand; for the same reason a next process
//! that does not scale (autoscaling turned off) lets it go.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus::IntGauge;
use router_core::Pool;
use serde::{Deserialize, Serialize};

use crate::autoscale::Driver;

/// How often the file is brought up to date (when something in it changed).
pub(super) const SAVE_EVERY: Duration = Duration::from_secs(2);
/// How often drains read before the provider's first listing look for the pool's VMs.
const PENDING_CHECK_EVERY: Duration = Duration::from_millis(200);
/// How often it is rewritten anyway while users have open sessions, so that after a crash their
/// affinity counts from at most this long before it.
pub(super) const REFRESH_EVERY: Duration = Duration::from_secs(60);
/// A state file older than this at a start is named in a warning with its drains.
const STALE_AFTER: Duration = Duration::from_secs(24 * 60 * 60);
/// The file's format; a newer one is not read.
const FORMAT: u32 = 1;
/// A state file larger than this is neither written nor read (about 600 000 users' affinity).
const MAX_FILE: u64 = 32 << 20;

/// Drains and affinity, as one process hands them to the next.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct Remembered {
    /// VMs drained (by an operator or for scale-in).
    pub drained: BTreeSet<String>,
    /// Of those, the ones the autoscaler drained for scale-in.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub scale_in: BTreeSet<String>,
    /// Every user the affinity store remembers: their VM and how many seconds before the report
    /// (or before the file was saved) they were last seen; 0 while they have open sessions.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub affinity: BTreeMap<String, (String, u64)>,
}

/// What a drain restore did.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Restored {
    /// VMs drained again (scale-in drains included).
    pub drained: Vec<String>,
    /// Of those, the ones handed back to the autoscaler as its scale-in drains.
    pub scale_in: Vec<String>,
    /// VMs not in the pool (any more), whose drain was dropped.
    pub unknown: Vec<String>,
    /// Scale-in drains let go because this gateway does not scale (`autoscale.enabled` is
    /// off now): nothing would ever finish them, so the VMs serve again.
    pub released: Vec<String>,
}

/// Whether drains can be restored now: the provider has listed the pool (or the pool has VMs
/// anyway). Before that every VM would look unknown and its drain would be dropped.
pub(super) fn pool_listed(pool: &Pool, driver: &Driver) -> bool {
    driver.has_listed() || !pool.snapshot().vms().is_empty()
}

/// Returns once [`pool_listed`], looking every [`PENDING_CHECK_EVERY`].
async fn until_listed(pool: &Pool, driver: &Driver) {
    let mut listed = tokio::time::interval(PENDING_CHECK_EVERY);
    while !pool_listed(pool, driver) {
        listed.tick().await;
    }
}

/// Restores `drains` once the pool is listed: the drains an upgrade's predecessor reported
/// before this process could list its pool, when no state file keeps them meanwhile.
pub(super) async fn restore_drains_once_listed(
    pool: Arc<Pool>,
    driver: Arc<Driver>,
    drains: Remembered,
) {
    until_listed(&pool, &driver).await;
    log_inherited(&drains.restore_drains(&pool, &driver));
}

/// Logs the scale-in drains let go because autoscaling is off.
fn log_released(restored: &Restored) {
    for vm in &restored.released {
        tracing::info!(
            vm,
            "drained for scale-in before, but autoscaling is off now: the VM serves again"
        );
    }
}

/// Logs the drains restored from a predecessor's report.
pub(super) fn log_inherited(restored: &Restored) {
    log_released(restored);
    for vm in &restored.drained {
        let scale_in = restored.scale_in.contains(vm);
        tracing::info!(vm, scale_in, "drained, as it was in the previous gateway");
    }
    for vm in &restored.unknown {
        tracing::info!(
            vm,
            "drained in the previous gateway but not in the pool now: drain dropped"
        );
    }
}

impl Remembered {
    /// The pool's drains now, scale-in drains marked.
    pub fn drains(pool: &Pool, driver: &Driver) -> Self {
        let drained: BTreeSet<String> = pool
            .snapshot()
            .vms()
            .iter()
            .filter(|vm| vm.status().draining && !vm.status().leaving)
            .map(|vm| vm.name().to_owned())
            .collect();
        let scale_in = driver
            .scale_in_drains()
            .into_iter()
            .filter(|vm| drained.contains(vm))
            .collect();
        Self {
            drained,
            scale_in,
            affinity: BTreeMap::new(),
        }
    }

    /// [`drains`](Self::drains) and every user the affinity store remembers.
    pub fn all(pool: &Pool, driver: &Driver) -> Self {
        let mut remembered = Self::drains(pool, driver);
        let now = pool.clock().now();
        remembered.affinity = pool
            .store()
            .remembered(now, pool.policy().affinity_ttl)
            .into_iter()
            .map(|(user, vm, ago)| (user, (vm.to_string(), ago.as_secs())))
            .collect();
        remembered
    }

    /// Only the drains, without the affinity.
    pub fn only_drains(&self) -> Self {
        Self {
            drained: self.drained.clone(),
            scale_in: self.scale_in.clone(),
            affinity: BTreeMap::new(),
        }
    }

    /// Adds `other`'s drains to these.
    pub fn add_drains(&mut self, other: &Remembered) {
        self.drained.extend(other.drained.iter().cloned());
        self.scale_in.extend(other.scale_in.iter().cloned());
    }

    /// Drains the VMs that were drained, handing the scale-in ones back to the autoscaler.
    pub fn restore_drains(&self, pool: &Pool, driver: &Driver) -> Restored {
        let mut restored = Restored::default();
        for vm in &self.drained {
            let scale_in = self.scale_in.contains(vm);
            if scale_in && !driver.scales() {
                restored.released.push(vm.clone());
            } else if pool.drain(vm) {
                restored.drained.push(vm.clone());
                if scale_in {
                    restored.scale_in.push(vm.clone());
                }
            } else {
                restored.unknown.push(vm.clone());
            }
        }
        driver.inherit_scale_in_drains(&restored.scale_in);
        restored
    }

    /// Sends users back to their VM, their "last seen" `older` further back than the entries
    /// say. Users the store knows already (they logged in meanwhile) stay where they are; an
    /// entry that has lapsed stays forgotten. Returns how many were restored.
    pub fn restore_affinity(&self, pool: &Pool, older: Duration) -> usize {
        let now = pool.clock().now();
        let ttl = pool.policy().affinity_ttl;
        let mut restored = 0;
        for (user, (vm, ago)) in &self.affinity {
            let ago = Duration::from_secs(*ago).saturating_add(older);
            if ago >= ttl || pool.store().affinity(user, now, ttl).is_some() {
                continue;
            }
            // A session that started and ended then (or, should the monotonic clock not reach
            // that far back, now: a little longer than it should).
            let seen = now.checked_sub(ago).unwrap_or(now);
            pool.store().session_started(user, vm, seen);
            pool.store().session_ended(user, vm, seen);
            restored += 1;
        }
        restored
    }

    /// What decides whether the file must be written now: drains, and each user's VM and
    /// whether they have open sessions (not how long ago they were seen).
    fn key(&self) -> Key {
        Key {
            drained: self.drained.clone(),
            scale_in: self.scale_in.clone(),
            users: self
                .affinity
                .iter()
                .map(|(user, (vm, ago))| (user.clone(), (vm.clone(), *ago == 0)))
                .collect(),
        }
    }
}

#[derive(Debug, PartialEq)]
struct Key {
    drained: BTreeSet<String>,
    scale_in: BTreeSet<String>,
    users: BTreeMap<String, (String, bool)>,
}

/// `gateway.state_file` as written.
#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    /// [`FORMAT`].
    format: u32,
    /// When it was written, seconds since the Unix epoch.
    saved_unix: u64,
    #[serde(flatten)]
    remembered: Remembered,
}

/// A state file read at start: what it holds, and how long ago it was written.
#[derive(Debug)]
pub(super) struct Loaded {
    pub remembered: Remembered,
    pub age: Duration,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Why a state file was not read.
#[derive(Debug, PartialEq)]
pub(super) enum LoadError {
    /// It could not be read (permissions, I/O): what it holds may be fine, so it is not
    /// written over.
    Unreadable(String),
    /// Its content is no state file this gateway reads (damaged, too large, a newer format):
    /// written afresh.
    Invalid(String),
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::Unreadable(e) | LoadError::Invalid(e) => f.write_str(e),
        }
    }
}

/// Why the file at `path` cannot be read, if it exists and cannot (its first byte is read).
fn unreadable(path: &Path) -> Option<String> {
    let read = std::fs::File::open(path)
        .and_then(|mut file| std::io::Read::read(&mut file, &mut [0u8; 1]).map(drop));
    match read {
        Err(e) if !no_file(&e) => Some(e.to_string()),
        _ => None,
    }
}

/// No file there, nor can there be one (a path through a regular file): nothing held.
fn no_file(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
    )
}

/// Reads the state file: `Ok(None)` when there is none yet.
pub(super) fn load(path: &Path) -> Result<Option<Loaded>, LoadError> {
    let text = match std::fs::File::open(path) {
        Ok(file) => {
            let mut text = Vec::new();
            std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_FILE + 1), &mut text)
                .map_err(|e| LoadError::Unreadable(e.to_string()))?;
            if text.len() as u64 > MAX_FILE {
                return Err(LoadError::Invalid(format!(
                    "larger than {} MiB",
                    MAX_FILE >> 20
                )));
            }
            text
        }
        Err(e) if no_file(&e) => return Ok(None),
        Err(e) => return Err(LoadError::Unreadable(e.to_string())),
    };
    let saved: Saved =
        serde_json::from_slice(&text).map_err(|e| LoadError::Invalid(e.to_string()))?;
    if saved.format > FORMAT {
        return Err(LoadError::Invalid(format!(
            "written by a newer poolgate (format {}, this one reads {FORMAT})",
            saved.format
        )));
    }
    Ok(Some(Loaded {
        remembered: saved.remembered,
        age: Duration::from_secs(unix_now().saturating_sub(saved.saved_unix)),
    }))
}

/// Writes `remembered` to `path` as a whole: a temporary file beside it (mode 0600), flushed
/// to disk, then renamed over it, so a crash leaves the old file or the new one.
fn write(path: &Path, remembered: &Remembered) -> Result<(), String> {
    let saved = Saved {
        format: FORMAT,
        saved_unix: unix_now(),
        remembered: remembered.clone(),
    };
    let mut text = serde_json::to_vec_pretty(&saved).map_err(|e| e.to_string())?;
    text.push(b'\n');
    if text.len() as u64 > MAX_FILE {
        return Err(format!(
            "{} MiB, more than a start reads ({} MiB)",
            text.len() >> 20,
            MAX_FILE >> 20
        ));
    }
    crate::secrets::write(path, &text).map_err(|e| e.to_string())
}

/// Keeps `gateway.state_file` up to date while the gateway runs.
pub(super) struct StateKeeper {
    path: PathBuf,
    pool: Arc<Pool>,
    driver: Arc<Driver>,
    /// `poolgate_state_file_failing`: 1 from a failed write to the next one that works.
    failing: IntGauge,
    /// Drains read from the file (or reported by an upgrade's predecessor) before the provider
    /// listed the pool: restored once it has, and written meanwhile (with what else changes),
    /// so that a stop before then loses none.
    pending: Mutex<Option<Pending>>,
    /// What the file or the predecessor held has been taken in (or there was none): until
    /// then a write at exit would put this process's empty view over it.
    loaded: AtomicBool,
    last: Mutex<Last>,
}

/// Drains waiting for the pool's first listing.
#[derive(Clone)]
struct Pending {
    remembered: Remembered,
    /// How long before the start the file was saved; `None`: the predecessor's report.
    saved_ago: Option<String>,
}

#[derive(Default)]
struct Last {
    key: Option<Key>,
    at: Option<Instant>,
    /// This process writes no more: it handed over to a successor, or wrote a last time at exit.
    stopped: bool,
}

impl StateKeeper {
    pub fn new(
        path: PathBuf,
        pool: Arc<Pool>,
        driver: Arc<Driver>,
        failing: IntGauge,
    ) -> Arc<Self> {
        Arc::new(Self {
            path,
            pool,
            driver,
            failing,
            pending: Mutex::new(None),
            loaded: AtomicBool::new(false),
            last: Mutex::new(Last::default()),
        })
    }

    /// Reads the file and restores what it holds. Drains wait while the provider has not
    /// listed the pool (its first listing failed): [`keep`](Self::keep) restores them then.
    pub fn restore(&self) {
        self.restore_file();
        self.loaded.store(true, Ordering::Release);
    }

    fn restore_file(&self) {
        let loaded = match load(&self.path) {
            Ok(Some(loaded)) => loaded,
            Ok(None) => {
                tracing::info!(path = %self.path.display(), "no state file yet: no drains or affinity to restore");
                return;
            }
            Err(LoadError::Invalid(e)) => {
                tracing::warn!(
                    path = %self.path.display(),
                    "cannot read the state file ({e}); starting without its drains and affinity, and writing it afresh"
                );
                return;
            }
            Err(LoadError::Unreadable(e)) => {
                self.stop_unreadable(&e);
                return;
            }
        };
        let users = loaded.remembered.restore_affinity(&self.pool, loaded.age);
        let saved_ago = humantime::format_duration(loaded.age).to_string();
        if loaded.age > STALE_AFTER && !loaded.remembered.drained.is_empty() {
            // Not written since (the gateway ran with the file off, or an older poolgate ran):
            // an operator may have lifted these drains meanwhile.
            tracing::warn!(
                path = %self.path.display(),
                saved_ago,
                drained = ?loaded.remembered.drained,
                "the state file is old; its drains are restored: check them (poolgate status) and undrain what should serve"
            );
        }
        if !pool_listed(&self.pool, &self.driver) && !loaded.remembered.drained.is_empty() {
            tracing::info!(
                path = %self.path.display(),
                saved_ago,
                users,
                drained = ?loaded.remembered.drained,
                "restored users' affinity from the state file; its drains wait for the provider's first listing"
            );
            if let Ok(mut pending) = self.pending.lock() {
                *pending = Some(Pending {
                    remembered: loaded.remembered.only_drains(),
                    saved_ago: Some(saved_ago),
                });
            }
            return;
        }
        self.restore_drains(&loaded.remembered, users, &saved_ago);
    }

    /// An upgrade's successor: the predecessor's report has been applied, all but `deferred`,
    /// its drains that wait for the provider's first listing here ([`keep`](Self::keep)
    /// restores them then).
    pub fn adopted(&self, deferred: Option<Remembered>) {
        // A file the predecessor could not read is not this process's to write over either.
        if let Some(e) = unreadable(&self.path) {
            self.stop_unreadable(&e);
        }
        if let Some(remembered) = deferred
            && let Ok(mut pending) = self.pending.lock()
        {
            *pending = Some(Pending {
                remembered,
                saved_ago: None,
            });
        }
        self.loaded.store(true, Ordering::Release);
    }

    /// A file that cannot be read: written over, what it holds would be lost for good, so it
    /// is left alone until a restart can read it.
    fn stop_unreadable(&self, error: &str) {
        if let Ok(mut last) = self.last.lock() {
            last.stopped = true;
        }
        self.failing.set(1);
        tracing::error!(
            path = %self.path.display(),
            "cannot read the state file ({error}); starting without its drains and affinity, and not writing it either, so as not to lose them: make it readable for the gateway and restart"
        );
    }

    /// Drains read from the file that still wait for the provider's first listing: an upgrade
    /// in the meantime reports them with the pool's own.
    pub fn pending_drains(&self) -> Option<Remembered> {
        self.pending
            .lock()
            .ok()?
            .as_ref()
            .map(|p| p.remembered.clone())
    }

    fn restore_drains(&self, remembered: &Remembered, users: usize, saved_ago: &str) {
        let restored = remembered.restore_drains(&self.pool, &self.driver);
        log_released(&restored);
        for vm in &restored.unknown {
            tracing::info!(
                vm,
                "drained before the restart but not in the pool now: drain dropped"
            );
        }
        tracing::info!(
            path = %self.path.display(),
            saved_ago,
            users,
            drained = ?restored.drained,
            scale_in = ?restored.scale_in,
            "restored from the state file: the drains and each user's VM before the restart"
        );
    }

    /// Restores drains that waited for the pool's first listing, then writes the file whenever
    /// what it holds changes, until [`finish`](Self::finish) or [`hand_over`](Self::hand_over).
    pub async fn keep(self: Arc<Self>) {
        let pending = self.pending.lock().ok().and_then(|p| p.clone());
        if let Some(pending) = pending {
            until_listed(&self.pool, &self.driver).await;
            match &pending.saved_ago {
                Some(saved_ago) => {
                    tracing::info!(
                        "the provider has listed the pool: restoring the state file's drains"
                    );
                    self.restore_drains(&pending.remembered, 0, saved_ago);
                }
                None => log_inherited(&pending.remembered.restore_drains(&self.pool, &self.driver)),
            }
            // Only now: a write meanwhile still has them.
            if let Ok(mut p) = self.pending.lock() {
                *p = None;
            }
        }
        let mut every = tokio::time::interval(SAVE_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let this = self.clone();
            match tokio::task::spawn_blocking(move || this.save(false)).await {
                Ok(true) => {}
                Ok(false) | Err(_) => return,
            }
        }
    }

    /// Writes the file if it changed (or a refresh is due). False once writing has stopped.
    fn save(&self, force: bool) -> bool {
        let Ok(mut last) = self.last.lock() else {
            return false;
        };
        self.save_locked(&mut last, force)
    }

    fn save_locked(&self, last: &mut Last, force: bool) -> bool {
        if last.stopped {
            return false;
        }
        let mut remembered = Remembered::all(&self.pool, &self.driver);
        if let Some(pending) = self.pending_drains() {
            remembered.add_drains(&pending);
        }
        let key = remembered.key();
        let live = key.users.values().any(|(_, live)| *live);
        let due = force
            || last.key.as_ref() != Some(&key)
            || (live && last.at.is_none_or(|at| at.elapsed() >= REFRESH_EVERY));
        if !due {
            return true;
        }
        match write(&self.path, &remembered) {
            Ok(()) => {
                if self.failing.get() != 0 {
                    self.failing.set(0);
                    tracing::info!(path = %self.path.display(), "the state file is written again");
                }
                last.key = Some(key);
                last.at = Some(Instant::now());
            }
            Err(e) => {
                if self.failing.get() == 0 {
                    self.failing.set(1);
                    tracing::warn!(
                        path = %self.path.display(),
                        error = %e,
                        "cannot write the state file: a restart would forget the drains and users' VMs (make its directory writable for the gateway, or set gateway.state_file); retrying every 2 s"
                    );
                }
            }
        }
        true
    }

    /// Writes the file a last time (open sessions have ended: their users were last seen now)
    /// and stops writing. Not if what the file or the predecessor held was never taken in (a
    /// stop right after an upgrade's start): the file still holds it.
    pub fn finish(&self) {
        if let Ok(mut last) = self.last.lock() {
            if self.loaded.load(Ordering::Acquire) {
                self.save_locked(&mut last, true);
            }
            last.stopped = true;
        }
    }

    /// Stops writing without a last write: the successor of an upgrade writes from now on. A
    /// write under way is let finish first, so none lands after the successor's.
    pub fn hand_over(&self) {
        if let Ok(mut last) = self.last.lock() {
            last.stopped = true;
        }
    }
}

#[cfg(test)]
pub(super) mod tests;
