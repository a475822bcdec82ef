//! Scheduled failure pulses: the collector asks agents to kill a component on purpose
//! (`Pulse` commands through [dispatch](crate::dispatch)) on a cron schedule, to prove
//! its recovery works; the agent measures the recovery and reports it.
//!
//! Off by default (`pulses.enabled`). Each `[[pulses.schedule]]` names a component, the
//! hosts it applies to (host ids, `*` as a wildcard; every host running the component
//! by default), a cron expression (UTC, 5 fields, via `croner`), allowed windows (UTC
//! times of day, `"02:00-05:00"`; none: any time) and the recovery budget.
//!
//! The [`Planner`] is pure (time is a value): at each occurrence it fires, or skips
//! when the occurrence falls outside every window or automation is paused (the circuit
//! breaker is open). Missed occurrences (the collector was down, the check was late)
//! collapse into one: no backlog is replayed. [`run`] drives it and submits the
//! commands; each carries an idempotency key of (schedule, host, occurrence), so a
//! restarted collector never pulses twice for one occurrence.

use crate::dispatch::{CommandRequest, Dispatch};
use chrono::{DateTime, Timelike, Utc};
use prometheus::{IntCounterVec, Opts, Registry};
use razar_shared::protocol::CommandAction;
use serde::Deserialize;
use sqlx::PgPool;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;
use toml::Spanned;

/// The caller recorded with pulse commands.
pub const CALLER: &str = "pulse-scheduler";
/// Default `budget` of a schedule.
pub const DEFAULT_BUDGET: Duration = Duration::from_secs(60);
/// How long a pulse command may wait for its host before it expires.
const COMMAND_DEADLINE: Duration = Duration::from_secs(60);
/// How often the runner looks at the clock.
const TICK: Duration = Duration::from_secs(1);

/// "Is automation paused now?" (the engine loop's circuit breaker). Pulses never fire
/// while it answers true.
pub type AutomationPaused = Arc<dyn Fn() -> bool + Send + Sync>;

/// Where the running service's [`AutomationPaused`] hook is set (by whoever owns the
/// circuit breaker, after start); not paused while none is set.
#[derive(Clone, Default)]
pub struct PauseHook(Arc<std::sync::RwLock<Option<AutomationPaused>>>);

impl std::fmt::Debug for PauseHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PauseHook").finish_non_exhaustive()
    }
}

impl PauseHook {
    pub fn set(&self, hook: AutomationPaused) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(hook);
    }

    pub fn paused(&self) -> bool {
        let hook = self
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        hook.is_some_and(|f| f())
    }
}

/// `[pulses]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PulsesConfig {
    /// `pulses.enabled` (default false): nothing is scheduled unless true.
    pub enabled: bool,
    pub schedules: Vec<PulseSchedule>,
}

/// One `[[pulses.schedule]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct PulseSchedule {
    pub component: String,
    pub hosts: HostSelector,
    pub cron: croner::Cron,
    /// Allowed windows; empty: any time.
    pub windows: Vec<Window>,
    pub budget: Duration,
}

/// Which hosts a schedule applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostSelector {
    /// Every host running the component.
    All,
    /// Host ids matching one of these patterns (`*` matches any run of characters).
    Patterns(Vec<String>),
}

impl HostSelector {
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostSelector::All => true,
            HostSelector::Patterns(patterns) => patterns.iter().any(|p| glob(p, host)),
        }
    }
}

/// `*` matches any run of characters (also none); everything else itself.
fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let Some(first) = parts.next() else {
        return text.is_empty();
    };
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// A UTC time-of-day window `[start, end)` in minutes since midnight; `start > end`
/// wraps past midnight (`"22:00-02:00"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    start: u32,
    end: u32,
}

impl Window {
    /// Parses `"HH:MM-HH:MM"`.
    pub fn parse(text: &str) -> Result<Window, String> {
        let bad = || format!("`{text}` is not a window like \"02:00-05:00\" (UTC)");
        let (a, b) = text.split_once('-').ok_or_else(bad)?;
        let minute = |t: &str| -> Option<u32> {
            let (h, m) = t.trim().split_once(':')?;
            let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
            (h < 24 && m < 60).then_some(h * 60 + m)
        };
        let (start, end) = (minute(a).ok_or_else(bad)?, minute(b).ok_or_else(bad)?);
        if start == end {
            return Err(format!("`{text}` is an empty window"));
        }
        Ok(Window { start, end })
    }

    pub fn contains(&self, at: DateTime<Utc>) -> bool {
        let m = at.hour() * 60 + at.minute();
        if self.start < self.end {
            (self.start..self.end).contains(&m)
        } else {
            m >= self.start || m < self.end
        }
    }
}

/// What the planner decided for one occurrence of one schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tick {
    Fire {
        schedule: usize,
        at: DateTime<Utc>,
    },
    Skip {
        schedule: usize,
        at: DateTime<Utc>,
        why: Skip,
    },
}

/// Why an occurrence was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    OutsideWindows,
    AutomationPaused,
}

impl Skip {
    fn label(self) -> &'static str {
        match self {
            Skip::OutsideWindows => "skipped_window",
            Skip::AutomationPaused => "skipped_paused",
        }
    }
}

/// The pure schedule: each schedule's next occurrence, advanced by [`Planner::due`].
#[derive(Debug)]
pub struct Planner {
    schedules: Vec<PulseSchedule>,
    next: Vec<Option<DateTime<Utc>>>,
}

fn next_after(cron: &croner::Cron, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
    cron.find_next_occurrence(&at, false).ok()
}

impl Planner {
    /// Occurrences strictly after `now` are planned.
    pub fn new(schedules: Vec<PulseSchedule>, now: DateTime<Utc>) -> Planner {
        let next = schedules.iter().map(|s| next_after(&s.cron, now)).collect();
        Planner { schedules, next }
    }

    pub fn schedule(&self, index: usize) -> Option<&PulseSchedule> {
        self.schedules.get(index)
    }

    /// The next planned occurrence of any schedule (when to look again).
    pub fn next_due(&self) -> Option<DateTime<Utc>> {
        self.next.iter().flatten().min().copied()
    }

    /// Every schedule whose occurrence is due at `now`: fired, or skipped (outside its
    /// windows, or `paused`). Occurrences missed before `now` count as one.
    pub fn due(&mut self, now: DateTime<Utc>, paused: bool) -> Vec<Tick> {
        let mut ticks = Vec::new();
        for (schedule, (s, next)) in self.schedules.iter().zip(&mut self.next).enumerate() {
            let Some(at) = *next else { continue };
            if at > now {
                continue;
            }
            *next = next_after(&s.cron, now);
            let in_window = s.windows.is_empty() || s.windows.iter().any(|w| w.contains(at));
            ticks.push(if !in_window {
                Tick::Skip {
                    schedule,
                    at,
                    why: Skip::OutsideWindows,
                }
            } else if paused {
                Tick::Skip {
                    schedule,
                    at,
                    why: Skip::AutomationPaused,
                }
            } else {
                Tick::Fire { schedule, at }
            });
        }
        ticks
    }
}

/// `[pulses]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPulses {
    enabled: Option<Spanned<bool>>,
    #[serde(default)]
    schedule: Vec<Spanned<RawSchedule>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    component: Option<Spanned<String>>,
    hosts: Option<Vec<Spanned<String>>>,
    cron: Option<Spanned<String>>,
    windows: Option<Vec<Spanned<String>>>,
    budget: Option<Spanned<String>>,
}

/// Validates `[pulses]`; every problem goes to `push(span, key, reason)`.
pub(crate) fn validate(
    raw: &RawPulses,
    push: &mut dyn FnMut(Option<Range<usize>>, String, String),
) -> PulsesConfig {
    let mut config = PulsesConfig {
        enabled: raw.enabled.as_ref().is_some_and(|e| *e.get_ref()),
        schedules: Vec::new(),
    };
    for (i, entry) in raw.schedule.iter().enumerate() {
        let key = |field: &str| format!("pulses.schedule[{i}].{field}");
        let s = entry.get_ref();
        let component = match &s.component {
            Some(c) if !c.get_ref().trim().is_empty() => Some(c.get_ref().clone()),
            Some(c) => {
                push(Some(c.span()), key("component"), "must not be empty".into());
                None
            }
            None => {
                push(Some(entry.span()), key("component"), "is required".into());
                None
            }
        };
        let cron = match &s.cron {
            Some(c) => match c.get_ref().parse::<croner::Cron>() {
                Ok(cron) => Some(cron),
                Err(e) => {
                    push(
                        Some(c.span()),
                        key("cron"),
                        format!("not a cron expression like \"0 3 * * *\": {e}"),
                    );
                    None
                }
            },
            None => {
                push(Some(entry.span()), key("cron"), "is required".into());
                None
            }
        };
        let mut windows = Vec::new();
        for w in s.windows.iter().flatten() {
            match Window::parse(w.get_ref()) {
                Ok(window) => windows.push(window),
                Err(reason) => push(Some(w.span()), key("windows"), reason),
            }
        }
        let hosts = match &s.hosts {
            None => HostSelector::All,
            Some(list) if list.is_empty() => {
                push(
                    Some(entry.span()),
                    key("hosts"),
                    "an empty list selects no host (leave it out for every host)".into(),
                );
                HostSelector::All
            }
            Some(list) => {
                HostSelector::Patterns(list.iter().map(|h| h.get_ref().clone()).collect())
            }
        };
        let budget = match &s.budget {
            None => DEFAULT_BUDGET,
            Some(b) => match humantime::parse_duration(b.get_ref()) {
                Ok(d) if !d.is_zero() => d,
                Ok(_) => {
                    push(
                        Some(b.span()),
                        key("budget"),
                        "must be greater than zero".into(),
                    );
                    DEFAULT_BUDGET
                }
                Err(e) => {
                    push(
                        Some(b.span()),
                        key("budget"),
                        format!("not a duration like \"60s\": {e}"),
                    );
                    DEFAULT_BUDGET
                }
            },
        };
        if let (Some(component), Some(cron)) = (component, cron) {
            config.schedules.push(PulseSchedule {
                component,
                hosts,
                cron,
                windows,
                budget,
            });
        }
    }
    config
}

/// Counters of the scheduler (`razar_collector_pulses_total{result}`).
#[derive(Debug, Clone)]
pub struct PulseMetrics {
    /// `sent`, `refused` (dispatch refused it), `skipped_window`, `skipped_paused`,
    /// `failed` (the database could not be asked or written).
    pub pulses: IntCounterVec,
}

impl PulseMetrics {
    pub fn new(registry: &Registry) -> Result<PulseMetrics, prometheus::Error> {
        let pulses = IntCounterVec::new(
            Opts::new(
                "razar_collector_pulses_total",
                "Scheduled failure pulses by result (per host for sent/refused/failed, per occurrence for skips)",
            ),
            &["result"],
        )?;
        registry.register(Box::new(pulses.clone()))?;
        Ok(PulseMetrics { pulses })
    }
}

/// The hosts running `component` that `selector` picks (online ones only: a lost host
/// is not pulsed).
async fn targets(
    pool: &PgPool,
    component: &str,
    selector: &HostSelector,
) -> Result<Vec<String>, sqlx::Error> {
    let hosts: Vec<String> = sqlx::query_scalar(
        "SELECT c.host_id FROM components c JOIN hosts h USING (host_id)
         WHERE c.name = $1 AND h.state = 'online' ORDER BY c.host_id",
    )
    .bind(component)
    .fetch_all(pool)
    .await?;
    Ok(hosts.into_iter().filter(|h| selector.matches(h)).collect())
}

/// Runs the schedule until `stop` is set: every due occurrence becomes one `Pulse`
/// command per selected host, unless skipped.
pub async fn run(
    config: PulsesConfig,
    dispatch: Dispatch,
    pool: PgPool,
    paused: PauseHook,
    metrics: PulseMetrics,
    mut stop: tokio::sync::watch::Receiver<bool>,
    beat: crate::supervise::Beat,
) {
    let mut planner = Planner::new(config.schedules, Utc::now());
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        beat.ok();
        let now = Utc::now();
        for t in planner.due(now, paused.paused()) {
            match t {
                Tick::Skip { schedule, at, why } => {
                    metrics.pulses.with_label_values(&[why.label()]).inc();
                    let component = planner.schedule(schedule).map(|s| s.component.as_str());
                    tracing::info!(?component, %at, reason = why.label(), "scheduled pulse skipped");
                }
                Tick::Fire { schedule, at } => {
                    let Some(s) = planner.schedule(schedule) else {
                        continue;
                    };
                    fire(s, schedule, at, &dispatch, &pool, &metrics).await;
                }
            }
        }
    }
}

async fn fire(
    s: &PulseSchedule,
    index: usize,
    at: DateTime<Utc>,
    dispatch: &Dispatch,
    pool: &PgPool,
    metrics: &PulseMetrics,
) {
    let hosts = match targets(pool, &s.component, &s.hosts).await {
        Ok(h) => h,
        Err(error) => {
            metrics.pulses.with_label_values(&["failed"]).inc();
            tracing::warn!(%error, component = %s.component, "cannot list the hosts to pulse");
            return;
        }
    };
    let budget_ms = u64::try_from(s.budget.as_millis()).unwrap_or(u64::MAX);
    let deadline = chrono::Duration::from_std(COMMAND_DEADLINE)
        .ok()
        .and_then(|d| Utc::now().checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    for host in hosts {
        let request = CommandRequest {
            host: host.clone(),
            action: CommandAction::Pulse {
                component: s.component.clone(),
                budget_ms,
            },
            deadline,
            caller: CALLER.into(),
            idempotency_key: Some(format!(
                "pulse/{index}/{}/{host}/{}",
                s.component,
                at.timestamp()
            )),
            request_id: None,
        };
        match dispatch.submit(request).await {
            Ok(_) => {
                metrics.pulses.with_label_values(&["sent"]).inc();
                tracing::info!(%host, component = %s.component, %at, "scheduled pulse sent");
            }
            Err(crate::dispatch::DispatchError::Db(error)) => {
                metrics.pulses.with_label_values(&["failed"]).inc();
                tracing::warn!(%host, %error, "cannot submit a scheduled pulse");
            }
            Err(error) => {
                metrics.pulses.with_label_values(&["refused"]).inc();
                tracing::warn!(%host, %error, "scheduled pulse refused");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 2, h, m, s)
            .single()
            .unwrap_or_else(|| panic!("time"))
    }

    fn schedule(cron: &str, windows: &[&str]) -> PulseSchedule {
        PulseSchedule {
            component: "web".into(),
            hosts: HostSelector::All,
            cron: cron.parse().unwrap_or_else(|e| panic!("{e}")),
            windows: windows
                .iter()
                .map(|w| Window::parse(w).unwrap_or_else(|e| panic!("{e}")))
                .collect(),
            budget: DEFAULT_BUDGET,
        }
    }

    #[test]
    fn occurrences_fire_once_on_the_simulated_clock_and_missed_ones_collapse() {
        // Every 15 minutes.
        let mut p = Planner::new(vec![schedule("*/15 * * * *", &[])], at(10, 0, 0));
        assert_eq!(p.next_due(), Some(at(10, 15, 0)));
        assert!(p.due(at(10, 14, 59), false).is_empty());
        assert_eq!(
            p.due(at(10, 15, 0), false),
            [Tick::Fire {
                schedule: 0,
                at: at(10, 15, 0)
            }]
        );
        assert!(p.due(at(10, 15, 1), false).is_empty(), "fired once");
        // The collector was away for an hour: one pulse, not four.
        assert_eq!(
            p.due(at(11, 20, 0), false),
            [Tick::Fire {
                schedule: 0,
                at: at(10, 30, 0)
            }]
        );
        assert_eq!(p.next_due(), Some(at(11, 30, 0)));
    }

    #[test]
    fn only_inside_the_windows_and_never_while_automation_is_paused() {
        // Hourly, allowed 02:00-04:00 and (wrapping) 23:00-01:00.
        let mut p = Planner::new(
            vec![schedule("0 * * * *", &["02:00-04:00", "23:00-01:00"])],
            at(0, 30, 0),
        );
        let mut fired = Vec::new();
        let mut skipped = Vec::new();
        for hour in 1..24 {
            let paused = hour == 3;
            for t in p.due(at(hour, 0, 0), paused) {
                match t {
                    Tick::Fire { at, .. } => fired.push(at.hour()),
                    Tick::Skip { at, why, .. } => skipped.push((at.hour(), why)),
                }
            }
        }
        assert_eq!(fired, [2, 23], "inside a window, not paused");
        assert!(skipped.contains(&(3, Skip::AutomationPaused)));
        assert!(
            skipped.contains(&(1, Skip::OutsideWindows)),
            "01:00 is the wrapped end"
        );
        assert!(
            skipped.contains(&(4, Skip::OutsideWindows)),
            "04:00 is the end"
        );
        assert_eq!(fired.len() + skipped.len(), 23);
    }

    #[test]
    fn windows_and_host_selectors_parse_and_match() {
        assert!(Window::parse("25:00-01:00").is_err());
        assert!(Window::parse("02:00").is_err());
        assert!(Window::parse("02:00-02:00").is_err());
        let w = Window::parse("22:30-02:00").unwrap_or_else(|e| panic!("{e}"));
        assert!(w.contains(at(22, 30, 0)) && w.contains(at(1, 59, 59)));
        assert!(!w.contains(at(2, 0, 0)) && !w.contains(at(22, 29, 0)));
        let hosts = HostSelector::Patterns(vec!["gpu-*-a".into(), "edge".into()]);
        assert!(hosts.matches("gpu-7-a") && hosts.matches("gpu--a") && hosts.matches("edge"));
        assert!(!hosts.matches("gpu-7-b") && !hosts.matches("edge2") && !hosts.matches("xgpu-1-a"));
        assert!(glob("*", "") && glob("a*b*c", "aXbYc") && !glob("a*b*c", "aXc"));
    }

    #[test]
    fn config_is_checked_with_key_paths() {
        let text = "enabled = true\n\n[[schedule]]\ncomponent = \"web\"\ncron = \"0 3 * * *\"\nwindows = [\"02:00-05:00\"]\nbudget = \"30s\"\nhosts = [\"gpu-*\"]\n\n[[schedule]]\ncomponent = \"\"\ncron = \"not cron\"\nwindows = [\"noon\"]\n";
        let raw: RawPulses = toml::from_str(text).unwrap_or_else(|e| panic!("{e}"));
        let mut errors = Vec::new();
        let config = validate(&raw, &mut |_, key, reason| {
            errors.push(format!("{key}: {reason}"))
        });
        assert!(config.enabled);
        assert_eq!(config.schedules.len(), 1);
        assert_eq!(config.schedules[0].budget, Duration::from_secs(30));
        let keys: Vec<&str> = errors
            .iter()
            .map(|e| e.split(':').next().unwrap_or(""))
            .collect();
        assert_eq!(
            keys,
            [
                "pulses.schedule[1].component",
                "pulses.schedule[1].cron",
                "pulses.schedule[1].windows"
            ],
            "{errors:?}"
        );
        let off: RawPulses = toml::from_str("").unwrap_or_else(|e| panic!("{e}"));
        assert!(!validate(&off, &mut |_, _, _| {}).enabled, "off by default");
    }
}
