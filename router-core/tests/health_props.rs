//! Property tests of the health state machine against its definition.

use std::time::{Duration, Instant};

use proptest::prelude::*;
use router_core::health::HISTORY_LEN;
use router_core::{Health, HealthPolicy, HealthTracker};

proptest! {
    /// For any result sequence: the first result decides at once; a
    /// transition happens exactly when the run of results disagreeing with
    /// the verdict since the last transition reaches `fall` (from Up) or
    /// `rise` (from Down); transitions chain; the history is the last
    /// results, bounded.
    #[test]
    fn transitions_follow_rise_and_fall(
        rise in 0u32..5,
        fall in 0u32..5,
        results in prop::collection::vec(any::<bool>(), 0..100),
    ) {
        let t0 = Instant::now();
        let mut h = HealthTracker::new(HealthPolicy { rise, fall });
        let mut verdict = Health::Unknown;
        let mut run = 0u32; // disagreeing results since the last transition
        for (i, &ok) in results.iter().enumerate() {
            let now = t0 + Duration::from_secs(i as u64);
            let got = h.observe(ok, now);
            let want = match verdict {
                Health::Unknown => Some(if ok { Health::Up } else { Health::Down }),
                Health::Up if !ok => {
                    run += 1;
                    (run >= fall.max(1)).then_some(Health::Down)
                }
                Health::Down if ok => {
                    run += 1;
                    (run >= rise.max(1)).then_some(Health::Up)
                }
                _ => {
                    run = 0;
                    None
                }
            };
            prop_assert_eq!(got.map(|t| t.to), want);
            if let Some(t) = got {
                prop_assert_eq!(t.from, verdict);
                prop_assert_eq!(t.at, now);
                prop_assert_ne!(t.from, t.to);
                verdict = t.to;
                run = 0;
                prop_assert_eq!(h.since(), Some(now));
            }
            prop_assert_eq!(h.health(), verdict);
        }
        let hist: Vec<bool> = h.history().map(|(_, ok)| ok).collect();
        let start = results.len().saturating_sub(HISTORY_LEN);
        prop_assert_eq!(&hist[..], &results[start..]);
    }
}
