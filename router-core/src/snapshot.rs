//! Immutable views of the pool, swapped atomically by the [`Pool`](crate::Pool).

use std::collections::HashMap;
use std::sync::Arc;

use crate::hash::FastBuild;
use crate::vm::{Protocol, Vm, VmShared, VmState};

/// VM name -> index into [`Snapshot::vms`]. Shared between snapshots that
/// hold the same names (status changes do not rebuild it).
pub(crate) type NameIndex = HashMap<Box<str>, usize, FastBuild>;

/// A VM that took new sessions of one protocol when the snapshot was built
/// (that protocol's probes pass, not draining, capacity above zero), laid out
/// compactly for the least-loaded scan.
#[derive(Debug)]
pub(crate) struct Candidate {
    /// Index into [`Snapshot::vms`].
    pub(crate) index: usize,
    pub(crate) weight: u32,
    pub(crate) capacity: u32,
    pub(crate) shared: Arc<VmShared>,
}

/// The pool at one point in time: every VM, sorted by name.
///
/// Specs and statuses in a snapshot never change; session counts, load hints
/// and `idle_since` are live (shared with newer snapshots). A new snapshot
/// with a higher [`generation`](Snapshot::generation) is published whenever a
/// VM is added, removed, updated or changes status.
#[derive(Debug, Default)]
pub struct Snapshot {
    vms: Vec<Arc<Vm>>,
    generation: u64,
    /// Per protocol, in [`Protocol::ALL`] order.
    candidates: [Vec<Candidate>; 2],
    index: Arc<NameIndex>,
}

impl Snapshot {
    /// Builds a snapshot; `vms` must be sorted by name without duplicates.
    /// `index` is reused when given (it must map exactly these names).
    pub(crate) fn build(vms: Vec<Arc<Vm>>, generation: u64, index: Option<Arc<NameIndex>>) -> Self {
        debug_assert!(vms.windows(2).all(|w| w[0].name() < w[1].name()));
        let index = index.unwrap_or_else(|| {
            Arc::new(
                vms.iter()
                    .enumerate()
                    .map(|(i, vm)| (Box::from(vm.name()), i))
                    .collect(),
            )
        });
        debug_assert_eq!(index.len(), vms.len());
        let candidates = Protocol::ALL.map(|protocol| {
            vms.iter()
                .enumerate()
                .filter(|(_, vm)| vm.status().accepts_new(protocol) && vm.spec().capacity() > 0)
                .map(|(index, vm)| Candidate {
                    index,
                    weight: vm.spec().weight,
                    capacity: vm.spec().capacity(),
                    shared: vm.shared().clone(),
                })
                .collect()
        });
        Self {
            vms,
            generation,
            candidates,
            index,
        }
    }

    pub(crate) fn index(&self) -> &Arc<NameIndex> {
        &self.index
    }

    /// Every VM, sorted by name.
    pub fn vms(&self) -> &[Arc<Vm>] {
        &self.vms
    }

    /// Incremented on every published change (0 for the empty initial pool).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Number of VMs.
    pub fn len(&self) -> usize {
        self.vms.len()
    }

    /// Whether the pool has no VM.
    pub fn is_empty(&self) -> bool {
        self.vms.is_empty()
    }

    /// The VM called `name` (one hash lookup).
    pub fn get(&self, name: &str) -> Option<&Arc<Vm>> {
        self.index.get(name).and_then(|&i| self.vms.get(i))
    }

    /// Why VM `name` cannot take a new session of `protocol` (for a user who
    /// named it): not in the pool (the pool's VMs are listed), or its state.
    /// `None` when it can.
    pub fn why_not(&self, name: &str, protocol: Protocol) -> Option<String> {
        let Some(vm) = self.get(name) else {
            let names: Vec<&str> = self.vms().iter().map(|vm| vm.name()).collect();
            return Some(if names.is_empty() {
                format!("no VM {name} in the pool (the pool has no VMs)")
            } else {
                format!("no VM {name} in the pool (its VMs: {})", names.join(", "))
            });
        };
        let reason = match vm.status().state_of(protocol) {
            VmState::Stopped => "stopped",
            VmState::Draining => "draining",
            VmState::Unhealthy => match protocol {
                Protocol::Ssh => "its SSH probe fails",
                Protocol::Http => "its web probe fails",
            },
            VmState::Starting => "starting",
            VmState::Healthy if vm.is_full() => "at its session limit",
            VmState::Healthy => return None,
        };
        Some(format!("{name} takes no new sessions: {reason}"))
    }

    /// The position of the VM called `name` in [`Snapshot::vms`].
    pub fn position(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// VMs in `state`.
    pub fn count_in(&self, state: VmState) -> usize {
        self.vms.iter().filter(|vm| vm.state() == state).count()
    }

    /// Live sessions of `protocol` over all VMs in this snapshot.
    pub fn sessions(&self, protocol: Protocol) -> u64 {
        self.vms
            .iter()
            .map(|vm| u64::from(vm.sessions(protocol)))
            .sum()
    }

    /// Live sessions over all VMs in this snapshot.
    pub fn total_sessions(&self) -> u64 {
        self.vms
            .iter()
            .map(|vm| u64::from(vm.total_sessions()))
            .sum()
    }

    pub(crate) fn candidates(&self, protocol: Protocol) -> &[Candidate] {
        &self.candidates[protocol.index()]
    }
}
