//! The busy check: before the autoscaler drains an idle VM, and again right before it stops
//! it, it asks the VM whether work runs there that does not flow through the gateway (tmux,
//! nohup, cron jobs, busy kernels) and keeps the VM while it does.
//!
//! This module holds what the driver needs: the [`BusyCheck`] interface (the composition root
//! implements it over the SSH side's forced-command login), the exit-status mapping, and [`BusyTracker`], which
//! caches results per VM and runs checks in the background so that a tick never waits on one.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use router_core::autoscale::VmObservation;
use router_core::{Clock, Lifecycle, VmSpec};

use crate::metrics::Metrics;

/// What one check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Work is running (exit status 0): what the check printed first.
    Busy(String),
    /// Nothing is running (exit status 1).
    Idle,
    /// The check could not tell (other exit status, signal, timeout, connect or login
    /// failure): why. Treated as busy.
    Unknown(String),
}

impl Verdict {
    /// Whether the VM must be kept.
    pub fn keeps(&self) -> bool {
        !matches!(self, Self::Idle)
    }

    /// `busy` | `idle` | `unknown` (the metric label).
    pub fn label(&self) -> &'static str {
        match self {
            Self::Busy(_) => "busy",
            Self::Idle => "idle",
            Self::Unknown(_) => "unknown",
        }
    }
}

/// Longest piece of the check's output carried into logs.
const MAX_REASON_CHARS: usize = 200;

/// Maps how the check ended to a verdict: exit status 0 = busy, 1 = idle, anything else
/// (another status, a signal, no status at all) = unknown. `output` is the check's stdout; its
/// first line becomes the reason, cut short and stripped of control characters.
pub fn verdict(exit_status: Option<u32>, exit_signal: Option<&str>, output: &str) -> Verdict {
    let first = first_line(output);
    match (exit_status, exit_signal) {
        (Some(0), _) => Verdict::Busy(if first.is_empty() {
            "the check exited with status 0 (busy)".into()
        } else {
            first
        }),
        (Some(1), _) => Verdict::Idle,
        (Some(status), _) => Verdict::Unknown(if first.is_empty() {
            format!("the check exited with status {status} (0 = busy, 1 = idle)")
        } else {
            format!("the check exited with status {status} (0 = busy, 1 = idle): {first}")
        }),
        (None, Some(signal)) => Verdict::Unknown(format!(
            "the check was killed by signal {}",
            first_line(signal)
        )),
        (None, None) => Verdict::Unknown("the check ended without an exit status".into()),
    }
}

fn first_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or_default()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_REASON_CHARS)
        .collect()
}

/// The verdict of one run. The built-in check must also say `idle: …` for an exit status of 1:
/// a login shell that runs no command (`nologin`, `false`) exits 1 too, and must not pass for
/// "idle" — that would scale in VMs whatever runs there.
pub fn interpret(
    builtin: bool,
    user: &str,
    status: Option<u32>,
    signal: Option<&str>,
    output: &str,
) -> Verdict {
    match verdict(status, signal, output) {
        Verdict::Idle if builtin && !output.trim_start().starts_with("idle:") => {
            Verdict::Unknown(format!(
                "the check exited with status 1 without saying \"idle:\" (the login shell of {user} on the VM must be /bin/sh, not nologin or false): {}",
                output
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .chars()
                    .take(120)
                    .collect::<String>()
            ))
        }
        other => other,
    }
}

/// Runs the busy check on one VM. Implementations bound the whole check by their timeout and
/// never fail: every problem is a [`Verdict::Unknown`] naming it.
pub trait BusyCheck: Send + Sync {
    /// Asks `vm`.
    fn check<'a>(&'a self, vm: &'a VmSpec) -> BoxFuture<'a, Verdict>;
}

/// One VM's last result.
#[derive(Debug, Default)]
struct Entry {
    last: Option<(Verdict, Instant)>,
    in_flight: bool,
}

/// Cached verdicts per VM, background checks, metrics and logs.
pub struct BusyTracker {
    check: Arc<dyn BusyCheck>,
    entries: Arc<Mutex<HashMap<String, Entry>>>,
    metrics: Arc<Metrics>,
    /// The pool's clock: verdicts are stamped with it.
    clock: Arc<dyn Clock>,
    /// A verdict is used for this long; then the VM is asked again.
    recheck: Duration,
    /// An idle VM is asked once it has been idle this long (before it can be a candidate).
    lead: Duration,
}

impl std::fmt::Debug for BusyTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusyTracker")
            .field("recheck", &self.recheck)
            .field("lead", &self.lead)
            .finish_non_exhaustive()
    }
}

impl BusyTracker {
    /// A tracker for a policy scaling in after `scale_in_after` (or the whole pool after
    /// `scale_to_zero_after`) and deciding every `tick`: VMs are asked once idle for half the
    /// shorter of the two, and again every quarter of `scale_in_after` (between `tick` and a
    /// minute), so a VM is stopped within about one `scale_in_after` after its work ends.
    pub fn new(
        check: Arc<dyn BusyCheck>,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
        scale_in_after: Duration,
        scale_to_zero_after: Duration,
        tick: Duration,
    ) -> Self {
        let recheck =
            (scale_in_after / 4).clamp(tick.min(Duration::from_secs(60)), Duration::from_secs(60));
        Self {
            check,
            entries: Arc::new(Mutex::new(HashMap::new())),
            metrics,
            clock,
            recheck,
            lead: scale_in_after.min(scale_to_zero_after) / 2,
        }
    }

    /// How long a verdict is used before the VM is asked again.
    pub fn recheck(&self) -> Duration {
        self.recheck
    }

    /// Sets `busy` on each observed VM from the cached verdicts and starts background checks
    /// of idle VMs whose verdict is missing or older than [`recheck`](Self::recheck):
    /// * a running VM without sessions, not draining, idle for the lead time: busy unless a
    ///   fresh verdict says idle (no verdict yet = keep it until there is one);
    /// * a VM the policy drained (`ours`): its last verdict (the stop itself asks again);
    /// * anything else (sessions, operator-drained, not running): not busy; a VM with sessions
    ///   or not running forgets its verdict, so it is asked afresh once idle again.
    pub fn observe(
        &self,
        vms: &mut [VmObservation],
        specs: &[VmSpec],
        ours: &BTreeSet<String>,
        now: Instant,
    ) {
        let mut to_check = Vec::new();
        if let Ok(mut entries) = self.entries.lock() {
            entries.retain(|name, _| vms.iter().any(|v| &v.name == name));
            for vm in vms.iter_mut() {
                vm.busy = false;
                if vm.lifecycle != Lifecycle::Running || vm.sessions > 0 {
                    if let Some(entry) = entries.get_mut(&vm.name) {
                        entry.last = None;
                    }
                    continue;
                }
                if vm.draining {
                    vm.busy = ours.contains(&vm.name)
                        && entries
                            .get(&vm.name)
                            .and_then(|e| e.last.as_ref())
                            .is_some_and(|(v, _)| v.keeps());
                    continue;
                }
                let idle_for = vm
                    .idle_since
                    .map(|since| now.saturating_duration_since(since))
                    .unwrap_or_default();
                if idle_for < self.lead {
                    continue;
                }
                let entry = entries.entry(vm.name.clone()).or_default();
                let fresh = entry
                    .last
                    .as_ref()
                    .filter(|(_, at)| now.saturating_duration_since(*at) < self.recheck);
                vm.busy = fresh.is_none_or(|(v, _)| v.keeps());
                if fresh.is_none()
                    && !entry.in_flight
                    && let Some(spec) = specs.iter().find(|s| s.name == vm.name)
                {
                    entry.in_flight = true;
                    to_check.push(spec.clone());
                }
            }
        }
        self.forget_gauges(vms);
        for spec in to_check {
            let check = self.check.clone();
            let entries = self.entries.clone();
            let metrics = self.metrics.clone();
            let clock = self.clock.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let verdict = check.check(&spec).await;
                record(
                    &entries,
                    &metrics,
                    &spec.name,
                    verdict,
                    started,
                    clock.now(),
                );
            });
        }
    }

    /// Asks `vm` now and waits for the answer (bounded by the check's timeout): the check right
    /// before a VM is stopped or deleted.
    pub async fn check_now(&self, vm: &VmSpec) -> Verdict {
        let started = Instant::now();
        let verdict = self.check.check(vm).await;
        record(
            &self.entries,
            &self.metrics,
            &vm.name,
            verdict.clone(),
            started,
            self.clock.now(),
        );
        verdict
    }

    /// The last verdict per VM that has one: true = kept (busy or unknown), false = idle.
    pub fn view(&self) -> BTreeMap<String, bool> {
        self.entries
            .lock()
            .map(|entries| {
                entries
                    .iter()
                    .filter_map(|(name, e)| Some((name.clone(), e.last.as_ref()?.0.keeps())))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Drops `vm_busy` of VMs that have no verdict (vanished, in use, stopped).
    fn forget_gauges(&self, vms: &[VmObservation]) {
        let known = self.view();
        for vm in vms {
            if !known.contains_key(&vm.name) {
                let _ = self
                    .metrics
                    .vm_busy
                    .remove_label_values(&[vm.name.as_str()]);
            }
        }
    }
}

/// Stores a verdict, counts it, sets the gauge and logs what changed.
fn record(
    entries: &Mutex<HashMap<String, Entry>>,
    metrics: &Metrics,
    vm: &str,
    verdict: Verdict,
    started: Instant,
    at: Instant,
) {
    let check_ms = started.elapsed().as_millis() as u64;
    metrics
        .autoscale_busy_checks_total
        .with_label_values(&[verdict.label()])
        .inc();
    metrics
        .vm_busy
        .with_label_values(&[vm])
        .set(i64::from(verdict.keeps()));
    let previous = entries.lock().ok().and_then(|mut entries| {
        let entry = entries.entry(vm.to_string()).or_default();
        entry.in_flight = false;
        entry.last.replace((verdict.clone(), at))
    });
    let was = previous.map(|(v, _)| v.label());
    match &verdict {
        Verdict::Unknown(reason) => tracing::warn!(
            %vm, %reason, check_ms,
            "busy check failed; keeping the VM (unknown counts as busy; see autoscale.busy_command)"
        ),
        Verdict::Busy(found) if was != Some("busy") => tracing::info!(
            %vm, %found, check_ms,
            "work is running on the VM outside the gateway; kept in service"
        ),
        Verdict::Idle if was.is_some_and(|w| w != "idle") => tracing::info!(
            %vm, check_ms,
            "no more work running on the VM; it may be scaled in"
        ),
        _ => tracing::debug!(%vm, result = verdict.label(), check_ms, "busy check"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_check_must_say_idle() {
        let user = "poolgate-probe";
        assert_eq!(
            interpret(
                true,
                user,
                Some(1),
                None,
                "idle: no work of login users is running\n"
            ),
            Verdict::Idle
        );
        let Verdict::Unknown(why) = interpret(
            true,
            user,
            Some(1),
            None,
            "This account is currently not available.\n",
        ) else {
            panic!("nologin's exit 1 must not count as idle")
        };
        assert!(
            why.contains("/bin/sh") && why.contains("not available"),
            "{why}"
        );
        // A custom command: exit 1 is idle, whatever it prints.
        assert_eq!(interpret(false, user, Some(1), None, ""), Verdict::Idle);
        assert!(matches!(
            interpret(
                true,
                user,
                Some(0),
                None,
                "busy: sleep (pid 2) of ann is running"
            ),
            Verdict::Busy(_)
        ));
    }

    #[test]
    fn exit_status_maps_to_busy_idle_or_unknown() {
        assert_eq!(
            verdict(
                Some(0),
                None,
                "busy: sleep (pid 7) of alice is running\nmore"
            ),
            Verdict::Busy("busy: sleep (pid 7) of alice is running".into())
        );
        assert!(matches!(verdict(Some(0), None, ""), Verdict::Busy(_)));
        assert_eq!(verdict(Some(1), None, "idle: nothing"), Verdict::Idle);
        let Verdict::Unknown(why) = verdict(Some(2), None, "cannot read /proc") else {
            panic!("status 2 must be unknown")
        };
        assert!(why.contains("status 2") && why.contains("/proc"), "{why}");
        assert!(matches!(verdict(Some(127), None, ""), Verdict::Unknown(_)));
        assert!(matches!(
            verdict(None, Some("KILL"), ""),
            Verdict::Unknown(_)
        ));
        assert!(matches!(verdict(None, None, ""), Verdict::Unknown(_)));
        assert!(Verdict::Unknown(String::new()).keeps() && Verdict::Busy(String::new()).keeps());
        assert!(!Verdict::Idle.keeps());
    }

    #[test]
    fn reasons_are_one_short_clean_line() {
        let long = format!("\n  busy: {}\x1b[31m\n", "x".repeat(500));
        let Verdict::Busy(reason) = verdict(Some(0), None, &long) else {
            panic!()
        };
        assert_eq!(reason.chars().count(), MAX_REASON_CHARS);
        assert!(!reason.chars().any(char::is_control));
    }

    /// A check that answers from a script of verdicts.
    struct Scripted(Mutex<Vec<Verdict>>);

    impl BusyCheck for Scripted {
        fn check<'a>(&'a self, _vm: &'a VmSpec) -> BoxFuture<'a, Verdict> {
            let next = self
                .0
                .lock()
                .unwrap()
                .pop()
                .unwrap_or(Verdict::Unknown("no more".into()));
            Box::pin(async move { next })
        }
    }

    fn idle_vm(name: &str, since: Instant) -> VmObservation {
        VmObservation {
            name: name.into(),
            lifecycle: Lifecycle::Running,
            draining: false,
            sessions: 0,
            idle_since: Some(since),
            busy: false,
            booting: false,
            accepts_new: true,
        }
    }

    #[tokio::test]
    async fn an_idle_vm_is_kept_until_a_fresh_check_says_idle() {
        let metrics = Arc::new(Metrics::new());
        let clock = Arc::new(router_core::ManualClock::new());
        let check = Arc::new(Scripted(Mutex::new(vec![
            Verdict::Idle,
            Verdict::Busy("busy: tmux".into()),
        ])));
        let t = BusyTracker::new(
            check,
            metrics.clone(),
            clock.clone(),
            Duration::from_secs(40),
            Duration::from_secs(60),
            Duration::from_secs(1),
        );
        assert_eq!(t.recheck(), Duration::from_secs(10));
        let t0 = clock.now();
        let specs = [VmSpec::new("a", "127.0.0.1"), VmSpec::new("b", "127.0.0.1")];
        let ours = BTreeSet::new();
        // "b" has sessions: never asked, never busy. "a" idle long enough: asked, kept meanwhile.
        let mut vms = [
            idle_vm("a", t0),
            VmObservation {
                sessions: 2,
                idle_since: None,
                ..idle_vm("b", t0)
            },
        ];
        clock.advance(Duration::from_secs(30));
        t.observe(&mut vms, &specs, &ours, clock.now());
        assert!(vms[0].busy && !vms[1].busy);
        // The background check answers "busy".
        while t.view().is_empty() {
            tokio::task::yield_now().await;
        }
        assert_eq!(t.view().get("a"), Some(&true));
        assert_eq!(metrics.vm_busy.with_label_values(&["a"]).get(), 1);
        clock.advance(Duration::from_secs(1));
        t.observe(&mut vms, &specs, &ours, clock.now());
        assert!(vms[0].busy);
        // Stale after `recheck`: asked again; meanwhile still kept; then idle.
        clock.advance(Duration::from_secs(10));
        t.observe(&mut vms, &specs, &ours, clock.now());
        assert!(vms[0].busy);
        while t.view().get("a") != Some(&false) {
            tokio::task::yield_now().await;
        }
        t.observe(&mut vms, &specs, &ours, clock.now());
        assert!(!vms[0].busy);
        assert_eq!(metrics.vm_busy.with_label_values(&["a"]).get(), 0);
        // Sessions again: the verdict is forgotten (asked afresh next time it idles).
        vms[0].sessions = 1;
        t.observe(&mut vms, &specs, &ours, clock.now());
        assert!(t.view().is_empty());
    }
}
