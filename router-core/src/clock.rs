//! Time as a parameter.
//!
//! Everything in router-core that depends on time (health history, affinity
//! expiry, HTTP session idleness, `idle_since`) reads it from a [`Clock`], so
//! tests drive time with a [`ManualClock`] instead of sleeping.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

/// A source of monotonic and wall-clock time.
pub trait Clock: Send + Sync {
    /// Monotonic time, used for every interval computation.
    fn now(&self) -> Instant;
    /// Wall-clock time, used only for display (for example a session's start).
    fn wall(&self) -> SystemTime;
}

/// The real clock: [`Instant::now`] and [`SystemTime::now`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that only moves when told to, for tests.
///
/// Both [`Clock::now`] and [`Clock::wall`] advance together from the moment
/// the clock was created. Reading and advancing are lock-free, so one
/// `ManualClock` can be shared by many threads.
#[derive(Debug)]
pub struct ManualClock {
    base: Instant,
    base_wall: SystemTime,
    offset_nanos: AtomicU64,
}

impl ManualClock {
    /// A clock frozen at the current real time.
    pub fn new() -> Self {
        Self::starting_at(SystemTime::now())
    }

    /// A clock whose wall time starts at `wall` (its monotonic time starts at
    /// the current real [`Instant`], since an `Instant` cannot be made up).
    pub fn starting_at(wall: SystemTime) -> Self {
        Self {
            base: Instant::now(),
            base_wall: wall,
            offset_nanos: AtomicU64::new(0),
        }
    }

    /// Moves both clocks forward by `by` (saturating after ~584 years).
    pub fn advance(&self, by: Duration) {
        let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        // fetch_update never fails with a closure that always returns Some.
        let _ = self
            .offset_nanos
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                Some(cur.saturating_add(nanos))
            });
    }

    /// How far the clock has been advanced since it was created.
    pub fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.offset_nanos.load(Ordering::Acquire))
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.base + self.elapsed()
    }

    fn wall(&self) -> SystemTime {
        self.base_wall + self.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_advanced() {
        let clock = ManualClock::starting_at(SystemTime::UNIX_EPOCH);
        let t0 = clock.now();
        assert_eq!(clock.now(), t0);
        assert_eq!(clock.wall(), SystemTime::UNIX_EPOCH);
        clock.advance(Duration::from_secs(5));
        assert_eq!(clock.now() - t0, Duration::from_secs(5));
        assert_eq!(
            clock.wall(),
            SystemTime::UNIX_EPOCH + Duration::from_secs(5)
        );
        assert_eq!(clock.elapsed(), Duration::from_secs(5));
    }

    #[test]
    fn system_clock_is_monotonic() {
        let c = SystemClock;
        let a = c.now();
        let b = c.now();
        assert!(b >= a);
    }
}
