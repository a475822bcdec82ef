//! Lost-host detection: one task owns every host's lost/back transition, so the two can
//! never race. Connection tasks report what they hear ([`Liveness`]); the task marks a
//! host lost in the store once nothing was heard from it for the grace period (and no
//! connection of it is paused by back-pressure), and back when it is welcomed again.
//! It also writes `last_seen` to the store, at most every few seconds per host.

use crate::store::Store;
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
        let entry = hosts.entry(host.to_owned()).or_insert(Host {
            last_heard: now,
            connections: 0,
            paused: 0,
            lost: false,
            back_pending: false,
            last_touch: None,
            heard_since_touch: true,
        });
        entry.connections += 1;
        entry.last_heard = now;
    }

    /// The agent was welcomed: it is back if it was lost.
    pub fn welcomed(&self, host: &str, now: Instant) {
        if let Some(h) = self.lock().get_mut(host) {
            h.last_heard = now;
            h.back_pending = true;
            h.heard_since_touch = true;
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
}

fn due(liveness: &Liveness, grace: Duration, now: Instant) -> Due {
    let mut out = Due::default();
    let mut hosts = liveness.lock();
    for (name, h) in hosts.iter_mut() {
        if h.back_pending {
            out.back.push(name.clone());
        } else if !h.lost && h.paused == 0 && now.saturating_duration_since(h.last_heard) >= grace {
            out.lost.push(name.clone());
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

/// Runs the lost-host task until `shutdown` turns true (or its sender is dropped).
/// Store failures are retried at the next tick.
pub async fn run(
    liveness: Arc<Liveness>,
    store: Store,
    grace: Duration,
    events: mpsc::UnboundedSender<HostTransition>,
    mut shutdown: watch::Receiver<bool>,
) {
    let tick = (grace / 8).clamp(Duration::from_millis(20), Duration::from_millis(500));
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
        let now = Instant::now();
        let work = due(&liveness, grace, now);
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
                    tracing::warn!(host = %host, error = %e, "cannot record host lost; retrying")
                }
            }
        }
        // One statement for every host due, so 10,000 hosts cost one commit a tick, not
        // 10,000 (which once delayed the lost checks above by seconds).
        if !work.touch.is_empty() && store.touch_hosts(&work.touch, Utc::now()).await.is_ok() {
            let mut hosts = liveness.lock();
            for host in &work.touch {
                if let Some(h) = hosts.get_mut(host) {
                    h.last_touch = Some(now);
                    h.heard_since_touch = false;
                }
            }
        }
        // Forget hosts that are lost and have no connection: the store remembers them.
        liveness
            .lock()
            .retain(|_, h| !(h.lost && h.connections == 0 && !h.back_pending));
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

    #[test]
    fn silent_host_is_due_lost_after_the_grace_unless_paused() {
        let l = Liveness::default();
        let t0 = Instant::now();
        let grace = Duration::from_secs(3);
        l.connected("a", t0);
        l.connected("b", t0);
        l.paused("b", true, t0);
        let d = due(&l, grace, t0 + Duration::from_millis(2_999));
        assert!(d.lost.is_empty());
        let d = due(&l, grace, t0 + grace);
        assert_eq!(d.lost, vec!["a".to_string()]);
        l.heard("a", t0 + grace);
        assert!(due(&l, grace, t0 + grace).lost.is_empty());
        // Resuming counts from the resume, not from the last message.
        l.paused("b", false, t0 + Duration::from_secs(10));
        let b = "b".to_string();
        assert!(!due(&l, grace, t0 + Duration::from_secs(12))
            .lost
            .contains(&b));
        assert!(due(&l, grace, t0 + Duration::from_secs(13))
            .lost
            .contains(&b));
    }

    #[test]
    fn welcome_is_due_back_before_anything_else() {
        let l = Liveness::default();
        let t0 = Instant::now();
        l.connected("a", t0);
        l.welcomed("a", t0);
        let d = due(&l, Duration::from_millis(1), t0 + Duration::from_secs(5));
        assert_eq!(d.back, vec!["a".to_string()]);
        assert!(d.lost.is_empty());
    }
}
