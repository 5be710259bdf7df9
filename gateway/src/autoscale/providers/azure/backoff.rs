//! Exponential backoff of failed ARM writes, per key (an action, an action on one VM): a quota
//! 409, `AllocationFailed` or a missing role would otherwise be retried with a fresh write every
//! tick and use up the scale set's write budget (about 4 writes a minute sustained).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::autoscale::providers::ProviderError;

/// Writes that failed, per key, each backing off until its deadline.
#[derive(Debug)]
pub(super) struct Backoffs<K>(Mutex<HashMap<K, Backoff>>);

impl<K: std::hash::Hash + Eq> Backoffs<K> {
    pub(super) fn new() -> Self {
        Self(Mutex::new(HashMap::new()))
    }

    /// At `now`: `Err` with the backoff still running for `key`, else `Ok` with the last
    /// (expired) one, which the next failure doubles.
    pub(super) fn check(&self, key: &K, now: Instant) -> Result<Option<Backoff>, Backoff> {
        let previous = self.0.lock().ok().and_then(|m| m.get(key).copied());
        match previous {
            Some(b) if now < b.until => Err(b),
            _ => Ok(previous),
        }
    }

    /// Forgets the keys `keep` says no to (VMs that are gone).
    pub(super) fn retain(&self, mut keep: impl FnMut(&K) -> bool) {
        if let Ok(mut map) = self.0.lock() {
            map.retain(|k, _| keep(k));
        }
    }

    /// Records how the write after [`Backoffs::check`] went: a success clears `key`, a failure
    /// starts its next backoff, which is returned.
    pub(super) fn record(
        &self,
        key: K,
        failure: Option<&ProviderError>,
        previous: Option<Backoff>,
        now: Instant,
    ) -> Option<Backoff> {
        let mut map = self.0.lock().ok()?;
        match failure {
            Some(e) => {
                let next = Backoff::after_failure(previous, now, e.no_capacity);
                map.insert(key, next);
                Some(next)
            }
            None => {
                map.remove(&key);
                None
            }
        }
    }
}

/// Exponential backoff of one action (on one VM): 30 s, doubling to 30 min.
#[derive(Debug, Clone, Copy)]
pub(super) struct Backoff {
    pub(super) until: Instant,
    pub(super) delay: Duration,
    /// The failure that started it was a lack of capacity (`AllocationFailed`, …).
    pub(super) no_capacity: bool,
}

impl Backoff {
    pub(super) const FIRST: Duration = Duration::from_secs(30);
    pub(super) const MAX: Duration = Duration::from_secs(30 * 60);

    /// The backoff after one more failure at `now`.
    fn after_failure(previous: Option<Self>, now: Instant, no_capacity: bool) -> Self {
        let delay = previous.map_or(Self::FIRST, |b| (b.delay * 2).min(Self::MAX));
        Self {
            until: now + delay,
            delay,
            no_capacity,
        }
    }

    /// Whole seconds left at `now`, for messages.
    pub(super) fn left(&self, now: Instant) -> String {
        humantime::format_duration(Duration::from_secs(
            self.until.saturating_duration_since(now).as_secs(),
        ))
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoscale::providers::azure::arm::error;

    #[test]
    fn backoff_doubles_to_thirty_minutes_and_a_success_clears_it() {
        let backoffs: Backoffs<&str> = Backoffs::new();
        let now = Instant::now();
        let failure = error("start", "quota");
        let mut delays = Vec::new();
        for i in 0..8 {
            let at = now + Duration::from_secs(3600 * i);
            let previous = backoffs.check(&"a", at).expect("expired");
            let next = backoffs
                .record("a", Some(&failure), previous, at)
                .expect("a backoff");
            delays.push(next.delay.as_secs());
            assert!(backoffs.check(&"a", at + Duration::from_secs(1)).is_err());
        }
        assert_eq!(delays, [30, 60, 120, 240, 480, 960, 1800, 1800]);
        let later = now + Duration::from_secs(3600 * 9);
        let previous = backoffs.check(&"a", later).expect("expired");
        assert!(backoffs.record("a", None, previous, later).is_none());
        assert!(matches!(backoffs.check(&"a", later), Ok(None)));
        assert!(backoffs.check(&"b", later).is_ok(), "keys are independent");
    }
}
