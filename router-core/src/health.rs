//! Health as a pure state machine.
//!
//! A [`HealthTracker`] is fed probe results with the time they were observed
//! and answers with a [`Transition`] when the VM's [`Health`] changes. It does
//! no I/O: the gateway runs the probes and forwards transitions to
//! [`Pool::set_health`](crate::Pool::set_health).
//!
//! Rules:
//! - A new tracker is [`Health::Unknown`]. The **first** result decides at
//!   once (`Up` on success, `Down` on failure), so a static pool is usable
//!   right after its first probe.
//! - `Up -> Down` needs `fall` consecutive failures.
//! - `Down -> Up` needs `rise` consecutive successes.
//! - A threshold of 0 behaves like 1.

use std::collections::VecDeque;
use std::fmt;
use std::time::Instant;

/// How many past results a tracker keeps for the status page.
pub const HISTORY_LEN: usize = 32;

/// The health verdict on a VM, as far as probes can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Health {
    /// Not probed yet.
    #[default]
    Unknown,
    /// Probes pass.
    Up,
    /// Probes fail.
    Down,
}

impl Health {
    /// Lowercase name: `"unknown"`, `"up"` or `"down"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Up => "up",
            Health::Down => "down",
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Rise and fall thresholds (consecutive results needed to change verdict).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthPolicy {
    /// Consecutive successes that bring a `Down` VM back `Up`.
    pub rise: u32,
    /// Consecutive failures that take an `Up` VM `Down`.
    pub fall: u32,
}

impl Default for HealthPolicy {
    /// `rise = 2`, `fall = 3`, the documented config defaults.
    fn default() -> Self {
        Self { rise: 2, fall: 3 }
    }
}

/// A change of [`Health`], returned by [`HealthTracker::observe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// Verdict before the result.
    pub from: Health,
    /// Verdict after the result.
    pub to: Health,
    /// When the deciding result was observed.
    pub at: Instant,
}

/// Rise/fall health state machine for one VM, with a bounded history.
#[derive(Debug, Clone)]
pub struct HealthTracker {
    policy: HealthPolicy,
    health: Health,
    /// Consecutive results that disagree with the current verdict.
    streak: u32,
    since: Option<Instant>,
    history: VecDeque<(Instant, bool)>,
}

impl HealthTracker {
    /// A tracker in [`Health::Unknown`] with an empty history.
    pub fn new(policy: HealthPolicy) -> Self {
        Self {
            policy,
            health: Health::Unknown,
            streak: 0,
            since: None,
            history: VecDeque::with_capacity(HISTORY_LEN),
        }
    }

    /// Records one probe result observed at `now` and returns the transition
    /// it caused, if any.
    pub fn observe(&mut self, ok: bool, now: Instant) -> Option<Transition> {
        if self.history.len() == HISTORY_LEN {
            self.history.pop_front();
        }
        self.history.push_back((now, ok));

        let to = match (self.health, ok) {
            (Health::Unknown, true) => Health::Up,
            (Health::Unknown, false) => Health::Down,
            // A result that agrees with the verdict resets the streak.
            (Health::Up, true) | (Health::Down, false) => {
                self.streak = 0;
                return None;
            }
            (Health::Up, false) => {
                self.streak += 1;
                if self.streak < self.policy.fall.max(1) {
                    return None;
                }
                Health::Down
            }
            (Health::Down, true) => {
                self.streak += 1;
                if self.streak < self.policy.rise.max(1) {
                    return None;
                }
                Health::Up
            }
        };
        let from = self.health;
        self.health = to;
        self.streak = 0;
        self.since = Some(now);
        Some(Transition { from, to, at: now })
    }

    /// The current verdict.
    pub fn health(&self) -> Health {
        self.health
    }

    /// When the current verdict was reached (`None` while `Unknown`).
    pub fn since(&self) -> Option<Instant> {
        self.since
    }

    /// The thresholds in use.
    pub fn policy(&self) -> HealthPolicy {
        self.policy
    }

    /// Changes the thresholds; the current verdict and streak are kept.
    pub fn set_policy(&mut self, policy: HealthPolicy) {
        self.policy = policy;
    }

    /// The last (up to [`HISTORY_LEN`]) results, oldest first.
    pub fn history(&self) -> impl Iterator<Item = (Instant, bool)> + '_ {
        self.history.iter().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(base: Instant, s: u64) -> Instant {
        base + Duration::from_secs(s)
    }

    #[test]
    fn first_result_decides_at_once() {
        let t = Instant::now();
        let mut up = HealthTracker::new(HealthPolicy { rise: 5, fall: 5 });
        assert_eq!(up.health(), Health::Unknown);
        assert_eq!(
            up.observe(true, t),
            Some(Transition {
                from: Health::Unknown,
                to: Health::Up,
                at: t
            })
        );
        let mut down = HealthTracker::new(HealthPolicy { rise: 5, fall: 5 });
        let tr = down.observe(false, t).map(|t| t.to);
        assert_eq!(tr, Some(Health::Down));
        assert_eq!(down.since(), Some(t));
    }

    #[test]
    fn fall_needs_consecutive_failures() {
        let t = Instant::now();
        let mut h = HealthTracker::new(HealthPolicy { rise: 2, fall: 3 });
        h.observe(true, at(t, 0));
        assert_eq!(h.observe(false, at(t, 1)), None);
        assert_eq!(h.observe(false, at(t, 2)), None);
        // A success resets the failure streak.
        assert_eq!(h.observe(true, at(t, 3)), None);
        assert_eq!(h.observe(false, at(t, 4)), None);
        assert_eq!(h.observe(false, at(t, 5)), None);
        let tr = h.observe(false, at(t, 6));
        assert_eq!(
            tr,
            Some(Transition {
                from: Health::Up,
                to: Health::Down,
                at: at(t, 6)
            })
        );
        assert_eq!(h.health(), Health::Down);
    }

    #[test]
    fn rise_needs_consecutive_successes() {
        let t = Instant::now();
        let mut h = HealthTracker::new(HealthPolicy { rise: 2, fall: 1 });
        h.observe(false, at(t, 0));
        assert_eq!(h.observe(true, at(t, 1)), None);
        assert_eq!(h.observe(false, at(t, 2)), None);
        assert_eq!(h.observe(true, at(t, 3)), None);
        let tr = h.observe(true, at(t, 4)).map(|t| (t.from, t.to));
        assert_eq!(tr, Some((Health::Down, Health::Up)));
        // fall = 1: one failure is enough.
        let tr = h.observe(false, at(t, 5)).map(|t| t.to);
        assert_eq!(tr, Some(Health::Down));
    }

    #[test]
    fn zero_thresholds_behave_like_one() {
        let t = Instant::now();
        let mut h = HealthTracker::new(HealthPolicy { rise: 0, fall: 0 });
        h.observe(true, t);
        assert_eq!(h.observe(false, t).map(|t| t.to), Some(Health::Down));
        assert_eq!(h.observe(true, t).map(|t| t.to), Some(Health::Up));
    }

    #[test]
    fn history_is_bounded_and_ordered() {
        let t = Instant::now();
        let mut h = HealthTracker::new(HealthPolicy::default());
        for i in 0..40u64 {
            h.observe(i % 3 != 0, at(t, i));
        }
        let hist: Vec<_> = h.history().collect();
        assert_eq!(hist.len(), HISTORY_LEN);
        assert_eq!(hist[0], (at(t, 8), true));
        assert_eq!(hist[HISTORY_LEN - 1], (at(t, 39), false));
    }
}
