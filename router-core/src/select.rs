//! Choosing a VM for a new session.
//!
//! Order: the pinned VM (HTTP cookie) if eligible; else the user's affinity
//! VM if eligible; else the least-loaded eligible VM by `sessions / weight`
//! (tentative browsers included in `sessions`, see
//! [`Pool::http_route_new`](crate::Pool::http_route_new))
//! (compared by cross-multiplication, no floats), ties broken by the lower
//! load hint, then by name. The scan reads atomics from an immutable
//! snapshot: no lock, no allocation.

use std::sync::Arc;

use crate::snapshot::Snapshot;
use crate::vm::{Protocol, Vm, VmState};

/// What a new session needs from the pool.
#[derive(Debug, Clone, Copy)]
pub struct PickRequest<'a> {
    /// Protocol the session arrived on.
    pub protocol: Protocol,
    /// The authenticated user, when known (enables user affinity).
    pub user: Option<&'a str>,
    /// The VM named by a valid HTTP affinity cookie.
    pub pinned_vm: Option<&'a str>,
    /// VMs already tried for this connection; never chosen again.
    pub exclude: &'a [String],
    /// The request comes from a browser already pinned to `pinned_vm`: keep
    /// it there even while that VM is draining, as long as the VM is running,
    /// probed up and has room ("a draining VM keeps the browsers already
    /// pinned to it").
    pub keep_draining: bool,
    /// The user's affinity VM as a shared store (several gateway replicas)
    /// knows it; when set, it is used instead of this process's own store.
    pub affinity_hint: Option<&'a str>,
    /// The VM the user named: that one or none (see [`Snapshot::why_not`]
    /// for why it cannot take the session).
    ///
    /// [`Snapshot::why_not`]: crate::Snapshot::why_not
    pub only: Option<&'a str>,
    /// A VM with this many sessions (or more) counts as full for this request: a connection
    /// held while the pool wakes takes a place on a VM started for it rather than crowd onto
    /// the first one up (the caller sets it only while other VMs are still starting).
    pub room_below: Option<u32>,
    /// A browser sent to `pinned_vm` whose cookie comes back for the first time with a request
    /// that must not go to another VM (a form posted to the VM that served the form: another
    /// VM's JupyterHub refuses it, "XSRF cookie does not match"): when that VM has filled up
    /// meanwhile, no VM rather than another one.
    pub stay_pinned: bool,
}

impl<'a> PickRequest<'a> {
    /// A request with no user, no pin and nothing excluded.
    pub fn new(protocol: Protocol) -> Self {
        Self {
            protocol,
            user: None,
            pinned_vm: None,
            exclude: &[],
            keep_draining: false,
            affinity_hint: None,
            only: None,
            room_below: None,
            stay_pinned: false,
        }
    }

    /// Sets [`PickRequest::room_below`].
    pub fn room_below(mut self, sessions: u32) -> Self {
        self.room_below = Some(sessions);
        self
    }

    /// Sets [`PickRequest::only`].
    pub fn only(mut self, vm: &'a str) -> Self {
        self.only = Some(vm);
        self
    }

    /// Sets [`PickRequest::affinity_hint`].
    pub fn affinity_hint(mut self, vm: &'a str) -> Self {
        self.affinity_hint = Some(vm);
        self
    }

    /// Sets [`PickRequest::user`].
    pub fn user(mut self, user: &'a str) -> Self {
        self.user = Some(user);
        self
    }

    /// Sets [`PickRequest::pinned_vm`] and [`PickRequest::keep_draining`].
    pub fn pinned(mut self, vm: &'a str, keep_draining: bool) -> Self {
        self.pinned_vm = Some(vm);
        self.keep_draining = keep_draining;
        self
    }

    /// Sets [`PickRequest::stay_pinned`].
    pub fn staying_pinned(mut self, stay: bool) -> Self {
        self.stay_pinned = stay;
        self
    }

    /// Sets [`PickRequest::exclude`].
    pub fn excluding(mut self, exclude: &'a [String]) -> Self {
        self.exclude = exclude;
        self
    }

    fn excludes(&self, name: &str) -> bool {
        self.exclude.iter().any(|e| e == name)
    }

    /// Whether `vm` may take this new session as its pinned VM (`pinned`) or
    /// otherwise.
    pub(crate) fn admits(&self, vm: &Vm, pinned: bool) -> bool {
        self.admits_ignoring_capacity(vm, pinned) && !vm.is_full()
    }

    /// [`PickRequest::admits`] without the capacity check, for callers that
    /// reserve a slot next anyway (the reservation checks capacity
    /// atomically, and skipping the extra read saves a cache-line transfer
    /// on busy VMs).
    pub(crate) fn admits_ignoring_capacity(&self, vm: &Vm, pinned: bool) -> bool {
        let status = vm.status();
        let state_ok = status.accepts_new(self.protocol)
            || (pinned && self.keep_draining && !status.leaving && status.serving(self.protocol));
        state_ok
            && !self.excludes(vm.name())
            && self
                .room_below
                .is_none_or(|below| vm.total_sessions() < below)
    }
}

/// Why no VM could take a new session: the pool's VMs by reason.
///
/// Each VM is counted once, under the first reason that applies:
/// stopped, draining, unhealthy, starting, already tried, at its limit.
/// Health is that of the session's protocol: for an SSH session, a VM whose
/// web side is down but whose sshd is up is not unhealthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, thiserror::Error)]
#[error("{}", self.describe())]
pub struct NoVm {
    /// VMs in the pool.
    pub total: usize,
    /// VMs whose probes fail.
    pub unhealthy: usize,
    /// VMs draining.
    pub draining: usize,
    /// Healthy VMs at their session limit (or with weight 0).
    pub full: usize,
    /// VMs booting or not probed yet.
    pub starting: usize,
    /// VMs stopping or stopped.
    pub stopped: usize,
    /// Healthy VMs already tried for this connection.
    pub excluded: usize,
    /// The protocol the session asked for (names the side whose probes
    /// fail in the message).
    pub protocol: Option<Protocol>,
}

impl NoVm {
    /// Counts the snapshot's VMs by reason for `req`.
    pub(crate) fn tally(snapshot: &Snapshot, req: &PickRequest<'_>) -> Self {
        let mut n = NoVm {
            total: snapshot.len(),
            ..NoVm::default()
        };
        for vm in snapshot.vms() {
            match vm.status().state_of(req.protocol) {
                VmState::Stopped => n.stopped += 1,
                VmState::Draining => n.draining += 1,
                VmState::Unhealthy => n.unhealthy += 1,
                VmState::Starting => n.starting += 1,
                VmState::Healthy if req.excludes(vm.name()) => n.excluded += 1,
                VmState::Healthy
                    if vm.is_full() || req.room_below.is_some_and(|b| vm.total_sessions() >= b) =>
                {
                    n.full += 1
                }
                VmState::Healthy => {}
            }
        }
        n.protocol = Some(req.protocol);
        n
    }

    fn describe(&self) -> String {
        if self.total == 0 {
            return "the pool has no VMs".to_owned();
        }
        let plural = |n: usize, one: &str, many: &str| {
            if n == 1 {
                format!("{n} {one}")
            } else {
                format!("{n} {many}")
            }
        };
        let mut parts = Vec::new();
        if self.unhealthy > 0 {
            match self.protocol {
                Some(Protocol::Ssh) => {
                    parts.push(format!("{} unhealthy (SSH probe fails)", self.unhealthy))
                }
                Some(Protocol::Http) => {
                    parts.push(format!("{} unhealthy (web probe fails)", self.unhealthy))
                }
                None => parts.push(format!("{} unhealthy", self.unhealthy)),
            }
        }
        if self.draining > 0 {
            parts.push(format!("{} draining", self.draining));
        }
        if self.full > 0 {
            parts.push(plural(
                self.full,
                "at its session limit",
                "at their session limit",
            ));
        }
        if self.starting > 0 {
            parts.push(format!("{} starting", self.starting));
        }
        if self.stopped > 0 {
            parts.push(format!("{} stopped", self.stopped));
        }
        if self.excluded > 0 {
            parts.push(format!("{} already tried", self.excluded));
        }
        let vms = plural(self.total, "VM", "VMs");
        if parts.is_empty() {
            format!("no VM is available right now: {vms}, all busy; try again")
        } else {
            format!(
                "no VM is available right now: {vms} \u{2014} {}",
                parts.join(", ")
            )
        }
    }
}

/// Whether hint `a` ranks before hint `b`: lower first, unknown last.
#[inline]
fn hint_before(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a < b,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// The least-loaded eligible VM, ignoring pins and affinity.
pub(crate) fn least_loaded<'s>(
    snapshot: &'s Snapshot,
    req: &PickRequest<'_>,
) -> Option<&'s Arc<Vm>> {
    let cands = snapshot.candidates(req.protocol);
    let cap = |capacity: u32| req.room_below.map_or(capacity, |below| below.min(capacity));
    let mut best: Option<(usize, u64, u64)> = None; // (candidate, total, weight)
    for (i, c) in cands.iter().enumerate() {
        let total = c.shared.total();
        if total >= cap(c.capacity) {
            continue;
        }
        // Browsers just sent here count towards the order, not the cap.
        let total = u64::from(total) + u64::from(c.shared.tentative_total());
        let weight = u64::from(c.weight);
        if let Some((b, b_total, b_weight)) = best {
            // total/weight vs b_total/b_weight, both weights > 0.
            let lhs = total * b_weight;
            let rhs = b_total * weight;
            if lhs > rhs
                || (lhs == rhs && !hint_before(c.shared.load_hint(), cands[b].shared.load_hint()))
            {
                // Equal load and hint: the earlier name (already `best`) wins.
                continue;
            }
        }
        if !req.exclude.is_empty() && req.excludes(snapshot.vms()[c.index].name()) {
            continue;
        }
        best = Some((i, total, weight));
    }
    best.map(|(i, _, _)| &snapshot.vms()[cands[i].index])
}

/// The VM a new session should go to: pinned (already looked up), else the
/// user's affinity VM (`affinity` is called only if the pinned VM does not
/// take the session), else least loaded. With `check_capacity` false, a full
/// pinned or affinity VM may be returned: the caller's reservation then
/// fails and it asks again with `check_capacity` true.
pub(crate) fn choose<'s>(
    snapshot: &'s Snapshot,
    req: &PickRequest<'_>,
    pinned: Option<&'s Arc<Vm>>,
    affinity: impl FnOnce() -> Option<Arc<str>>,
    check_capacity: bool,
) -> Option<&'s Arc<Vm>> {
    let admits = |vm: &Vm, pinned: bool| {
        if check_capacity {
            req.admits(vm, pinned)
        } else {
            req.admits_ignoring_capacity(vm, pinned)
        }
    };
    if let Some(name) = req.only {
        return snapshot.get(name).filter(|vm| admits(vm, false));
    }
    if let Some(vm) = pinned.filter(|vm| admits(vm, true)) {
        return Some(vm);
    }
    if let Some(vm) = affinity()
        .and_then(|a| snapshot.get(&a))
        .filter(|vm| admits(vm, false))
    {
        return Some(vm);
    }
    least_loaded(snapshot, req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_vm_messages() {
        assert_eq!(NoVm::default().to_string(), "the pool has no VMs");
        let n = NoVm {
            total: 3,
            unhealthy: 2,
            full: 1,
            ..NoVm::default()
        };
        assert_eq!(
            n.to_string(),
            "no VM is available right now: 3 VMs \u{2014} 2 unhealthy, 1 at its session limit"
        );
        let n = NoVm {
            total: 1,
            draining: 1,
            ..NoVm::default()
        };
        assert_eq!(
            n.to_string(),
            "no VM is available right now: 1 VM \u{2014} 1 draining"
        );
        let n = NoVm {
            total: 4,
            full: 2,
            starting: 1,
            excluded: 1,
            ..NoVm::default()
        };
        assert_eq!(
            n.to_string(),
            "no VM is available right now: 4 VMs \u{2014} 2 at their session limit, 1 starting, 1 already tried"
        );
        let n = NoVm {
            total: 2,
            ..NoVm::default()
        };
        assert!(n.to_string().contains("all busy"));
    }

    #[test]
    fn hint_order() {
        assert!(hint_before(Some(0.1), Some(0.2)));
        assert!(!hint_before(Some(0.2), Some(0.2)));
        assert!(hint_before(Some(9.0), None));
        assert!(!hint_before(None, Some(0.0)));
        assert!(!hint_before(None, None));
    }
}
