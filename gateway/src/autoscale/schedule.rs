//! `[[autoscale.schedule]]` on the wall clock: which windows are on at an instant, in their own
//! time zones (daylight saving followed), and so how many VMs the policy keeps warm.
//!
//! A window opens at `from` and closes at `to`, local time, on each of its `days`; one whose `to`
//! is not after its `from` runs past midnight into the next day. The floor at an instant is the
//! largest `min_vms` of the windows on; looking ahead by the boot time starts the VMs early
//! enough to be warm when a window opens.

use std::fmt;
use std::time::Duration;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use poolgate_config::ScheduleWindow;

/// The windows of `[[autoscale.schedule]]`, ready to ask.
#[derive(Debug, Clone, Default)]
pub struct Schedule {
    windows: Vec<Window>,
}

#[derive(Debug, Clone)]
struct Window {
    /// Monday first.
    days: [bool; 7],
    /// Minutes after local midnight.
    from: u16,
    to: u16,
    zone: TimeZone,
    min_vms: u32,
    /// As written, for logs: `mon-fri 07:30-18:00 Europe/Berlin`.
    label: String,
}

/// A window that cannot be used (its configuration was not validated).
#[derive(Debug, thiserror::Error)]
#[error("autoscale.schedule[{index}]: {message}")]
pub struct ScheduleError {
    index: usize,
    message: String,
}

impl Schedule {
    /// The windows of a validated configuration.
    pub fn new(config: &[ScheduleWindow]) -> Result<Self, ScheduleError> {
        let windows = config
            .iter()
            .enumerate()
            .map(|(index, w)| {
                let fail = |message: String| ScheduleError { index, message };
                let (Some(from), Some(to)) = (w.from, w.to) else {
                    return Err(fail("from and to are required".into()));
                };
                let zone = TimeZone::get(&w.time_zone)
                    .map_err(|e| fail(format!("time zone \"{}\": {e}", w.time_zone)))?;
                let mut days = [false; 7];
                for day in &w.days {
                    days[usize::from(day.index())] = true;
                }
                Ok(Window {
                    days,
                    from: from.minutes(),
                    to: to.minutes(),
                    zone,
                    min_vms: w.min_vms,
                    label: format!("{} {from}-{to} {}", days_label(&days), w.time_zone),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { windows })
    }

    /// No windows at all.
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// The time zone of the first window (UTC without windows): where a simulated trace starts.
    pub fn first_zone(&self) -> TimeZone {
        self.windows
            .first()
            .map_or(TimeZone::UTC, |w| w.zone.clone())
    }

    /// The VMs kept warm at `at`, and the window that asks for them (the largest `min_vms` of
    /// the windows on; 0 and `None` outside every window).
    pub fn floor_at(&self, at: Timestamp) -> Floor<'_> {
        self.windows
            .iter()
            .filter(|w| w.contains(at))
            .max_by_key(|w| w.min_vms)
            .map_or(Floor::NONE, |w| Floor {
                min_vms: w.min_vms,
                window: Some(&w.label),
            })
    }

    /// [`Schedule::floor_at`] now and `lead` ahead, whichever keeps more: VMs for a window are
    /// started `lead` (the boot time) before it opens, and kept until it closes.
    pub fn floor_ahead(&self, at: Timestamp, lead: Duration) -> Floor<'_> {
        let now = self.floor_at(at);
        let ahead = jiff::SignedDuration::try_from(lead)
            .ok()
            .and_then(|lead| at.checked_add(lead).ok())
            .map_or(Floor::NONE, |later| self.floor_at(later));
        if ahead.min_vms > now.min_vms {
            ahead
        } else {
            now
        }
    }
}

/// How many VMs a schedule keeps warm, and because of which window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Floor<'a> {
    /// Running VMs kept (0: no window on).
    pub min_vms: u32,
    /// The window, as written (`mon-fri 07:30-18:00 Europe/Berlin`).
    pub window: Option<&'a str>,
}

impl Floor<'_> {
    const NONE: Self = Floor {
        min_vms: 0,
        window: None,
    };
}

impl Window {
    fn contains(&self, at: Timestamp) -> bool {
        let local = at.to_zoned_datetime(self.zone.clone());
        let day = usize::from(local.weekday().to_monday_zero_offset().unsigned_abs());
        let minute =
            u16::try_from(i32::from(local.hour()) * 60 + i32::from(local.minute())).unwrap_or(0);
        if self.from < self.to {
            self.days[day] && (self.from..self.to).contains(&minute)
        } else {
            // Past midnight: the evening part on its own day, the morning part on the next.
            let yesterday = (day + 6) % 7;
            (self.days[day] && minute >= self.from) || (self.days[yesterday] && minute < self.to)
        }
    }
}

/// `mon-fri`, `sat,sun`, `every day`, `mon,wed`.
fn days_label(days: &[bool; 7]) -> String {
    const NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    let on: Vec<usize> = (0..7).filter(|&d| days[d]).collect();
    match on.as_slice() {
        [] => "no day".to_owned(),
        [_, _, _, _, _, _, _] => "every day".to_owned(),
        [first, .., last] if on.len() > 2 && last - first + 1 == on.len() => {
            format!("{}-{}", NAMES[*first], NAMES[*last])
        }
        _ => on.iter().map(|&d| NAMES[d]).collect::<Vec<_>>().join(","),
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let labels: Vec<String> = self
            .windows
            .iter()
            .map(|w| format!("{} ({} VMs)", w.label, w.min_vms))
            .collect();
        f.write_str(&labels.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(days: &[&str], from: &str, to: &str, zone: &str, min_vms: u32) -> ScheduleWindow {
        ScheduleWindow {
            days: days.iter().map(|d| d.parse().expect("day")).collect(),
            from: Some(from.parse().expect("from")),
            to: Some(to.parse().expect("to")),
            time_zone: zone.into(),
            min_vms,
        }
    }

    fn at(text: &str) -> Timestamp {
        text.parse().expect("timestamp")
    }

    #[test]
    fn a_working_day_window_in_berlin_follows_daylight_saving() {
        let s = Schedule::new(&[window(
            &["mon", "tue", "wed", "thu", "fri"],
            "07:30",
            "18:00",
            "Europe/Berlin",
            3,
        )])
        .expect("schedule");
        // Monday 2026-01-05, winter (UTC+1): opens 06:30 UTC.
        assert_eq!(s.floor_at(at("2026-01-05T06:29:59Z")).min_vms, 0);
        assert_eq!(s.floor_at(at("2026-01-05T06:30:00Z")).min_vms, 3);
        assert_eq!(s.floor_at(at("2026-01-05T16:59:59Z")).min_vms, 3);
        assert_eq!(s.floor_at(at("2026-01-05T17:00:00Z")).min_vms, 0);
        // Monday 2026-07-06, summer (UTC+2): opens 05:30 UTC.
        assert_eq!(s.floor_at(at("2026-07-06T05:30:00Z")).min_vms, 3);
        // Saturday: off.
        assert_eq!(s.floor_at(at("2026-01-10T10:00:00Z")).min_vms, 0);
        assert_eq!(
            s.floor_at(at("2026-01-05T10:00:00Z")).window,
            Some("mon-fri 07:30-18:00 Europe/Berlin")
        );
        // Started a boot ahead: at 06:28 UTC with 3 minutes of boot, the floor is on.
        let lead = Duration::from_secs(180);
        assert_eq!(s.floor_ahead(at("2026-01-05T06:26:59Z"), lead).min_vms, 0);
        assert_eq!(s.floor_ahead(at("2026-01-05T06:27:00Z"), lead).min_vms, 3);
        // ...and kept until it closes, not a boot early.
        assert_eq!(s.floor_ahead(at("2026-01-05T16:59:00Z"), lead).min_vms, 3);
    }

    #[test]
    fn a_window_past_midnight_runs_into_the_next_day_and_overlaps_take_the_largest() {
        let s = Schedule::new(&[
            window(&["fri"], "22:00", "02:00", "UTC", 1),
            window(&["sat"], "00:00", "24:00", "UTC", 2),
        ])
        .expect("schedule");
        // Friday 2026-01-09 23:00: the first; Saturday 01:00: both, the larger wins.
        assert_eq!(s.floor_at(at("2026-01-09T23:00:00Z")).min_vms, 1);
        assert_eq!(s.floor_at(at("2026-01-10T01:00:00Z")).min_vms, 2);
        assert_eq!(s.floor_at(at("2026-01-10T23:59:00Z")).min_vms, 2);
        // Thursday night is not Friday night.
        assert_eq!(s.floor_at(at("2026-01-08T23:00:00Z")).min_vms, 0);
        assert_eq!(s.floor_at(at("2026-01-09T01:00:00Z")).min_vms, 0);
        assert_eq!(
            s.to_string(),
            "fri 22:00-02:00 UTC (1 VMs); sat 00:00-24:00 UTC (2 VMs)"
        );
    }

    #[test]
    fn day_labels_are_short() {
        let mut d = [true; 7];
        assert_eq!(days_label(&d), "every day");
        d[5] = false;
        d[6] = false;
        assert_eq!(days_label(&d), "mon-fri");
        assert_eq!(
            days_label(&[true, false, true, false, false, false, false]),
            "mon,wed"
        );
        assert_eq!(
            days_label(&[false, false, false, false, false, true, true]),
            "sat,sun"
        );
    }
}
