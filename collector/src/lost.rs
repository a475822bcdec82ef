//! Lost-host detection: one task owns every host's lost/back transition, so the two can
//! never race. Connection tasks report what they hear ([`Liveness`]); the task marks a
//! host lost in the store once nothing was heard from it for the grace period (and no
//! connection of it is paused by back-pressure), and back when it is welcomed again.
//! It also writes `last_seen` to the store, at most every few seconds per host.
//!
//! At start it takes every host the store has `online` as heard at that moment, with a
//! longer grace (`lost_after_restart`): a host that died while the collector was down
//! is marked lost once it does not reconnect in time.
//!
//! The same record tells health which hosts have unacknowledged data that does not
//! advance, and how far behind the most-behind connected host's stored data is.

use crate::store::Store;
use crate::supervise::Beat;
use chrono::Utc;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// How often `last_seen` is written per host at most.
const TOUCH_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct Host {
    last_heard: Instant,
    /// Open connections of this host.
    connections: u32,
    /// Connections that stopped reading on purpose (database back-pressure): the host is
    /// not silent, we are not listening.
    paused: u32,
    /// As recorded in the store (as far as this process knows).
    lost: bool,
    /// Welcomed since the last `mark_back` was written.
    back_pending: bool,
    last_touch: Option<Instant>,
    heard_since_touch: bool,
    /// Since when received data waits for its commit without any commit of this host
    /// (`None`: nothing waits).
    unacked_since: Option<Instant>,
    /// Agent timestamp (Unix ms) of the newest data of this host stored by this process.
    newest_stored_ms: Option<i64>,
    /// When the last batch with samples arrived (or the agent was welcomed, which starts
    /// the clock).
    last_sample: Instant,
    /// A `heartbeats_without_samples` event is recorded for the current stall.
    sampler_stalled: bool,
}

impl Host {
    fn new(now: Instant) -> Host {
        Host {
            last_heard: now,
            connections: 0,
            paused: 0,
            lost: false,
            back_pending: false,
            last_touch: None,
            heard_since_touch: true,
            unacked_since: None,
            newest_stored_ms: None,
            last_sample: now,
            sampler_stalled: false,
        }
    }
}

/// What health needs from ingest: stuck hosts and the lag of the most-behind one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IngestReport {
    /// Connected hosts whose unacknowledged data has not advanced for the limit, with
    /// how long, most stuck first.
    pub stuck: Vec<(String, Duration)>,
    /// Now minus the newest stored data's timestamp of the most-behind connected host
    /// (seconds; `None` before any connected host had data stored).
    pub lag_seconds: Option<f64>,
}

/// Shared record of what each host was last heard.
#[derive(Debug, Default)]
pub struct Liveness {
    hosts: Mutex<HashMap<String, Host>>,
}

impl Liveness {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Host>> {
        // The map holds plain values; a panic elsewhere cannot leave it half-updated.
        self.hosts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection presenting `host`'s certificate was accepted.
    pub fn connected(&self, host: &str, now: Instant) {
        let mut hosts = self.lock();
        let entry = hosts
            .entry(host.to_owned())
            .or_insert_with(|| Host::new(now));
        entry.connections += 1;
        entry.last_heard = now;
    }

    /// The agent was welcomed: it is back if it was lost.
    pub fn welcomed(&self, host: &str, now: Instant) {
        if let Some(h) = self.lock().get_mut(host) {
            h.last_heard = now;
            h.back_pending = true;
            h.heard_since_touch = true;
            // A (re)connected agent gets the whole stall time to send its first samples.
            h.last_sample = now;
        }
    }

    /// A batch carrying samples arrived from `host`.
    pub fn sampled(&self, host: &str, now: Instant) {
        if let Some(h) = self.lock().get_mut(host) {
            h.last_sample = h.last_sample.max(now);
        }
    }

    /// Something arrived from `host`.
    pub fn heard(&self, host: &str, now: Instant) {
        if let Some(h) = self.lock().get_mut(host) {
            h.last_heard = now;
            h.heard_since_touch = true;
        }
    }

    /// A connection of `host` stops (`true`) or resumes (`false`) reading because the
    /// database is behind.
    pub fn paused(&self, host: &str, paused: bool, now: Instant) {
        if let Some(h) = self.lock().get_mut(host) {
            if paused {
                h.paused += 1;
            } else {
                h.paused = h.paused.saturating_sub(1);
                // Time spent not listening does not count as silence.
                h.last_heard = h.last_heard.max(now);
            }
        }
    }

    /// A connection of `host` ended. `was_paused` if it ended while paused.
    pub fn disconnected(&self, host: &str, was_paused: bool) {
        if let Some(h) = self.lock().get_mut(host) {
            h.connections = h.connections.saturating_sub(1);
            if was_paused {
                h.paused = h.paused.saturating_sub(1);
            }
            if h.connections == 0 {
                h.unacked_since = None;
            }
        }
    }

    /// Hosts the store has online when the collector starts: each counts as heard at
    /// `now`, and is due lost once silent for `restart_grace` (instead of the usual
    /// grace: agents reconnect with their own backoff). Hosts already known are left
    /// alone.
    pub fn seed_online(
        &self,
        hosts: &[String],
        now: Instant,
        grace: Duration,
        restart_grace: Duration,
    ) {
        let mut map = self.lock();
        // Silence counts from `last_heard`: placing it ahead of now makes the host due
        // at `now + restart_grace`.
        let heard = now + restart_grace.saturating_sub(grace);
        for host in hosts {
            map.entry(host.clone()).or_insert_with(|| Host {
                // Not heard yet: its `last_seen` stays what the store has.
                heard_since_touch: false,
                ..Host::new(heard)
            });
        }
    }

    /// Data of `host` waits for its commit since `since` (`None`: nothing waits). Set
    /// when data arrives with nothing waiting, and after each commit.
    pub fn unacked(&self, host: &str, since: Option<Instant>) {
        if let Some(h) = self.lock().get_mut(host) {
            h.unacked_since = since;
        }
    }

    /// Data of `host` up to agent time `newest_ms` (Unix ms) is stored.
    pub fn stored(&self, host: &str, newest_ms: i64) {
        if let Some(h) = self.lock().get_mut(host) {
            h.newest_stored_ms = Some(h.newest_stored_ms.map_or(newest_ms, |n| n.max(newest_ms)));
        }
    }

    /// Stuck hosts (unacknowledged data not advanced for `stuck_after`) and the ingest
    /// lag, among connected hosts, at `now` (`now_ms`: the same moment in Unix ms).
    pub fn ingest_report(&self, now: Instant, now_ms: i64, stuck_after: Duration) -> IngestReport {
        let hosts = self.lock();
        let mut stuck: Vec<(String, Duration)> = hosts
            .iter()
            .filter(|(_, h)| h.connections > 0)
            .filter_map(|(name, h)| {
                let waited = now.saturating_duration_since(h.unacked_since?);
                (waited >= stuck_after).then(|| (name.clone(), waited))
            })
            .collect();
        stuck.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let oldest = hosts
            .values()
            .filter(|h| h.connections > 0)
            .filter_map(|h| h.newest_stored_ms)
            .min();
        IngestReport {
            stuck,
            lag_seconds: oldest.map(|ms| (now_ms.saturating_sub(ms)).max(0) as f64 / 1e3),
        }
    }

    /// Whether `host` is currently considered lost.
    pub fn is_lost(&self, host: &str) -> bool {
        self.lock().get(host).is_some_and(|h| h.lost)
    }
}

/// Work the task found due at one tick.
#[derive(Debug, Default)]
struct Due {
    lost: Vec<String>,
    back: Vec<String>,
    touch: Vec<String>,
    /// Heard within the grace, but no samples for `stall`: the sampler is stalled.
    stalled: Vec<String>,
    /// Samples again after a recorded stall.
    resumed: Vec<String>,
}

fn due(liveness: &Liveness, grace: Duration, stall: Duration, now: Instant) -> Due {
    let mut out = Due::default();
    let mut hosts = liveness.lock();
    for (name, h) in hosts.iter_mut() {
        let silent = now.saturating_duration_since(h.last_heard) >= grace;
        if h.back_pending {
            out.back.push(name.clone());
        } else if !h.lost && h.paused == 0 && silent {
            out.lost.push(name.clone());
        }
        let starved = now.saturating_duration_since(h.last_sample) >= stall;
        if h.sampler_stalled && !starved {
            out.resumed.push(name.clone());
        } else if !h.sampler_stalled
            && starved
            && !silent
            && !h.lost
            && !h.back_pending
            && h.connections > 0
            && h.paused == 0
        {
            // Talking (heartbeats within the grace) while no samples arrive: not a lost
            // host, a stalled sampler. A paused connection is us not reading.
            out.stalled.push(name.clone());
        }
        if h.heard_since_touch
            && h.last_touch
                .is_none_or(|t| now.duration_since(t) >= TOUCH_EVERY)
        {
            out.touch.push(name.clone());
        }
    }
    out
}

/// The lost-host task's timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LostTiming {
    /// Silence after which a connected host is lost.
    pub grace: Duration,
    /// Silence after the collector's start after which a host the store had online is
    /// lost (it died while the collector was down, or does not come back).
    pub restart_grace: Duration,
    /// Heartbeats without samples for this long: the sampler is stalled.
    pub samples_stalled_after: Duration,
}

impl LostTiming {
    /// How often the task looks.
    pub fn tick(&self) -> Duration {
        (self.grace / 8).clamp(Duration::from_millis(20), Duration::from_millis(500))
    }

    /// A run (tick) must complete at least this often for health: 30 s, or 4 graces.
    pub fn deadline(&self) -> Duration {
        Duration::from_secs(30).max(self.grace.saturating_mul(4))
    }
}

/// Runs the lost-host task until `shutdown` turns true (or its sender is dropped).
/// Store failures are retried at the next tick; `beat` marks each tick that completed
/// without one.
pub async fn run(
    liveness: Arc<Liveness>,
    store: Store,
    timing: LostTiming,
    events: mpsc::UnboundedSender<HostTransition>,
    mut shutdown: watch::Receiver<bool>,
    beat: Beat,
) {
    let grace = timing.grace;
    let mut interval = tokio::time::interval(timing.tick());
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seeded = false;
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
        let mut clean = true;
        if !seeded {
            match store.online_hosts().await {
                Ok(hosts) => {
                    if !hosts.is_empty() {
                        tracing::info!(
                            hosts = hosts.len(),
                            restart_grace_ms = timing.restart_grace.as_millis() as u64,
                            "hosts online at start: each is lost unless it reconnects in time"
                        );
                    }
                    liveness.seed_online(&hosts, Instant::now(), grace, timing.restart_grace);
                    seeded = true;
                }
                Err(e) => {
                    clean = false;
                    tracing::warn!(error = %e, "cannot read the hosts online at start; retrying");
                }
            }
        }
        let now = Instant::now();
        let work = due(&liveness, grace, timing.samples_stalled_after, now);
        for (host, stalled) in work
            .stalled
            .into_iter()
            .map(|h| (h, true))
            .chain(work.resumed.into_iter().map(|h| (h, false)))
        {
            let (kind, severity, message) = if stalled {
                (
                    "heartbeats_without_samples",
                    "warning",
                    format!(
                        "heartbeats arrive but no samples for {} s: sampler stalled",
                        timing.samples_stalled_after.as_secs()
                    ),
                )
            } else {
                ("samples_resumed", "info", "samples arrive again".to_owned())
            };
            match store
                .record_host_event(&host, Utc::now(), kind, severity, &message)
                .await
            {
                Ok(()) => {
                    if let Some(h) = liveness.lock().get_mut(&host) {
                        h.sampler_stalled = stalled;
                    }
                    if stalled {
                        tracing::warn!(host = %host, "heartbeats without samples: sampler stalled");
                    } else {
                        tracing::info!(host = %host, "samples arrive again");
                    }
                }
                Err(e) => {
                    clean = false;
                    tracing::warn!(host = %host, error = %e, "cannot record a sampler stall; retrying");
                }
            }
        }
        for host in work.back {
            match store.mark_back(&host, Utc::now()).await {
                Ok(changed) => {
                    if let Some(h) = liveness.lock().get_mut(&host) {
                        h.back_pending = false;
                        h.lost = false;
                    }
                    if changed {
                        tracing::info!(host = %host, "host back");
                        let _ = events.send(HostTransition::Back(host));
                    }
                }
                Err(e) => {
                    clean = false;
                    tracing::warn!(host = %host, error = %e, "cannot record host back; retrying")
                }
            }
        }
        for host in work.lost {
            // Re-check under the lock: it may have been heard while we wrote.
            let still_silent = liveness.lock().get(&host).is_some_and(|h| {
                !h.back_pending
                    && h.paused == 0
                    && Instant::now().saturating_duration_since(h.last_heard) >= grace
            });
            if !still_silent {
                continue;
            }
            match store.mark_lost(&host, Utc::now()).await {
                Ok(changed) => {
                    if let Some(h) = liveness.lock().get_mut(&host) {
                        h.lost = true;
                    }
                    if changed {
                        tracing::warn!(host = %host, grace_ms = grace.as_millis() as u64, "host lost");
                        let _ = events.send(HostTransition::Lost(host));
                    }
                }
                Err(e) => {
                    clean = false;
                    tracing::warn!(host = %host, error = %e, "cannot record host lost; retrying")
                }
            }
        }
        // One statement for every host due, so 10,000 hosts cost one commit a tick, not
        // 10,000 (which once delayed the lost checks above by seconds).
        if !work.touch.is_empty() {
            match store.touch_hosts(&work.touch, Utc::now()).await {
                Ok(()) => {
                    let mut hosts = liveness.lock();
                    for host in &work.touch {
                        if let Some(h) = hosts.get_mut(host) {
                            h.last_touch = Some(now);
                            h.heard_since_touch = false;
                        }
                    }
                }
                Err(e) => {
                    clean = false;
                    tracing::debug!(error = %e, "cannot record last_seen; retrying");
                }
            }
        }
        // Forget hosts that are lost and have no connection: the store remembers them.
        liveness
            .lock()
            .retain(|_, h| !(h.lost && h.connections == 0 && !h.back_pending));
        if clean {
            beat.ok();
        }
    }
}

/// A transition the task recorded (for metrics, logs and the decision engine).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostTransition {
    Lost(String),
    Back(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Long enough that the lost-host tests never see a stall.
    const STALL: Duration = Duration::from_secs(3600);

    #[test]
    fn heartbeats_without_samples_are_a_stall_of_their_own_until_samples_resume() {
        let l = Liveness::default();
        let t0 = Instant::now();
        let grace = Duration::from_secs(3);
        let stall = Duration::from_secs(10);
        l.connected("a", t0);
        l.welcomed("a", t0);
        l.connected("quiet", t0);
        l.welcomed("quiet", t0);
        l.lock().values_mut().for_each(|h| h.back_pending = false);
        // Both heartbeat; only "a" sends samples.
        for s in 1..=12 {
            let t = t0 + Duration::from_secs(s);
            l.heard("a", t);
            l.heard("quiet", t);
            l.sampled("a", t);
        }
        let at = t0 + Duration::from_secs(12);
        let d = due(&l, grace, stall, at);
        assert_eq!(d.stalled, vec!["quiet".to_string()]);
        assert!(d.lost.is_empty() && d.resumed.is_empty());
        l.lock().get_mut("quiet").expect("quiet").sampler_stalled = true;
        // Recorded once per stall.
        assert!(due(&l, grace, stall, at).stalled.is_empty());
        // Samples again: resumed.
        l.sampled("quiet", at);
        assert_eq!(due(&l, grace, stall, at).resumed, vec!["quiet".to_string()]);
        // A silent host is lost, not stalled; a paused one (we do not read) neither.
        l.lock().get_mut("quiet").expect("quiet").sampler_stalled = false;
        let later = at + Duration::from_secs(20);
        let d = due(&l, grace, stall, later);
        assert!(d.stalled.is_empty(), "{d:?}");
        assert_eq!(d.lost.len(), 2);
        l.heard("a", later);
        l.paused("a", true, later);
        assert!(due(&l, grace, stall, later).stalled.is_empty());
    }

    #[test]
    fn silent_host_is_due_lost_after_the_grace_unless_paused() {
        let l = Liveness::default();
        let t0 = Instant::now();
        let grace = Duration::from_secs(3);
        l.connected("a", t0);
        l.connected("b", t0);
        l.paused("b", true, t0);
        let d = due(&l, grace, STALL, t0 + Duration::from_millis(2_999));
        assert!(d.lost.is_empty());
        let d = due(&l, grace, STALL, t0 + grace);
        assert_eq!(d.lost, vec!["a".to_string()]);
        l.heard("a", t0 + grace);
        assert!(due(&l, grace, STALL, t0 + grace).lost.is_empty());
        // Resuming counts from the resume, not from the last message.
        l.paused("b", false, t0 + Duration::from_secs(10));
        let b = "b".to_string();
        assert!(!due(&l, grace, STALL, t0 + Duration::from_secs(12))
            .lost
            .contains(&b));
        assert!(due(&l, grace, STALL, t0 + Duration::from_secs(13))
            .lost
            .contains(&b));
    }

    #[test]
    fn a_host_online_at_start_is_due_lost_after_the_restart_grace_unless_it_reconnects() {
        let l = Liveness::default();
        let t0 = Instant::now();
        let grace = Duration::from_secs(3);
        let restart = Duration::from_secs(20);
        l.connected("back", t0);
        l.seed_online(
            &["dead".into(), "back".into(), "late".into()],
            t0,
            grace,
            restart,
        );
        // "back" reconnected before the restart and keeps talking.
        l.heard("back", t0 + Duration::from_secs(18));
        assert!(due(&l, grace, STALL, t0 + Duration::from_secs(19))
            .lost
            .is_empty());
        l.connected("late", t0 + Duration::from_secs(19));
        let d = due(&l, grace, STALL, t0 + restart);
        assert_eq!(d.lost, vec!["dead".to_string()]);
        // A restart grace below the grace is the grace.
        let l = Liveness::default();
        l.seed_online(&["dead".into()], t0, grace, Duration::from_secs(1));
        assert!(due(&l, grace, STALL, t0 + Duration::from_millis(2_999))
            .lost
            .is_empty());
        assert_eq!(
            due(&l, grace, STALL, t0 + grace).lost,
            vec!["dead".to_string()]
        );
    }

    #[test]
    fn ingest_report_names_stuck_connected_hosts_and_the_most_behind_lag() {
        let l = Liveness::default();
        let t0 = Instant::now();
        let stuck_after = Duration::from_secs(10);
        for h in ["a", "b", "c", "gone"] {
            l.connected(h, t0);
        }
        l.unacked("a", Some(t0));
        l.unacked("b", Some(t0 + Duration::from_secs(5)));
        l.unacked("gone", Some(t0));
        l.disconnected("gone", false);
        l.stored("a", 1_000);
        l.stored("a", 900);
        l.stored("b", 4_000);
        l.stored("gone", 0);
        let r = l.ingest_report(t0 + Duration::from_secs(12), 10_000, stuck_after);
        assert_eq!(r.stuck, vec![("a".to_string(), Duration::from_secs(12))]);
        assert_eq!(r.lag_seconds, Some(9.0));
        // A commit moves it on; nothing waiting is never stuck.
        l.unacked("a", None);
        let r = l.ingest_report(t0 + Duration::from_secs(15), 10_000, stuck_after);
        assert_eq!(r.stuck, vec![("b".to_string(), Duration::from_secs(10))]);
        assert_eq!(
            Liveness::default().ingest_report(t0, 0, stuck_after),
            IngestReport::default()
        );
    }

    #[test]
    fn welcome_is_due_back_before_anything_else() {
        let l = Liveness::default();
        let t0 = Instant::now();
        l.connected("a", t0);
        l.welcomed("a", t0);
        let d = due(
            &l,
            Duration::from_millis(1),
            STALL,
            t0 + Duration::from_secs(5),
        );
        assert_eq!(d.back, vec!["a".to_string()]);
        assert!(d.lost.is_empty());
    }
}
