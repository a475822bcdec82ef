//! Log chunks from agents (answers to `TailLogs` commands) routed to the API clients
//! that asked for them, keyed by command id.
//!
//! A chunk may arrive before its subscriber registers (the agent answers while the
//! command's submission is still returning): chunks for an id nobody follows yet are
//! kept briefly ([`PARKED_FOR`], at most [`MAX_PARKED`] chunks) and handed to the
//! subscriber when it registers. Every chunk the hub cannot hand on is counted
//! (`razar_collector_log_chunks_dropped_total{reason}`).

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use razar_shared::protocol::{CommandId, LogChunk};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How long a chunk for an id nobody follows (yet) is kept.
pub const PARKED_FOR: Duration = Duration::from_secs(10);
/// Most chunks kept for ids nobody follows (yet), over all ids.
pub const MAX_PARKED: usize = 256;
/// Chunks queued per subscriber before new ones are dropped (a slow client).
pub const SUBSCRIBER_QUEUE: usize = 256;

/// The hub's metrics.
#[derive(Debug, Clone)]
pub struct LogMetrics {
    /// `razar_collector_log_follows`: live log subscriptions (API clients following).
    pub follows: IntGauge,
    /// `razar_collector_log_chunks_dropped_total{reason}`: `slow_subscriber` (its queue
    /// was full), `unclaimed` (nobody subscribed within the parking time or the parking
    /// space was full).
    pub dropped: IntCounterVec,
}

impl LogMetrics {
    fn new() -> Result<LogMetrics, prometheus::Error> {
        Ok(LogMetrics {
            follows: IntGauge::new(
                "razar_collector_log_follows",
                "Live log subscriptions of API clients",
            )?,
            dropped: IntCounterVec::new(
                Opts::new(
                    "razar_collector_log_chunks_dropped_total",
                    "Log chunks from agents not handed to a subscriber, by reason",
                ),
                &["reason"],
            )?,
        })
    }
}

#[derive(Default)]
struct Inner {
    subscribers: HashMap<CommandId, mpsc::Sender<LogChunk>>,
    parked: VecDeque<(Instant, LogChunk)>,
}

/// Routes chunks to subscribers; cheap to clone.
#[derive(Clone)]
pub struct LogHub {
    inner: Arc<Mutex<Inner>>,
    metrics: LogMetrics,
}

impl std::fmt::Debug for LogHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogHub").finish_non_exhaustive()
    }
}

/// A live subscription: chunks come on `chunks`; dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    pub chunks: mpsc::Receiver<LogChunk>,
    guard: SubscriptionGuard,
}

impl Subscription {
    /// The command followed.
    pub fn command(&self) -> CommandId {
        self.guard.command
    }
}

#[derive(Debug)]
struct SubscriptionGuard {
    hub: LogHub,
    command: CommandId,
}

impl Drop for SubscriptionGuard {
    fn drop(&mut self) {
        self.hub.lock().subscribers.remove(&self.command);
        self.hub.metrics.follows.dec();
    }
}

impl LogHub {
    pub fn new() -> Result<LogHub, prometheus::Error> {
        Ok(LogHub {
            inner: Arc::default(),
            metrics: LogMetrics::new()?,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn metrics(&self) -> &LogMetrics {
        &self.metrics
    }

    pub fn register_metrics(&self, registry: &Registry) -> Result<(), prometheus::Error> {
        registry.register(Box::new(self.metrics.follows.clone()))?;
        registry.register(Box::new(self.metrics.dropped.clone()))?;
        Ok(())
    }

    /// Follows `command`'s chunks, those already parked first.
    pub fn subscribe(&self, command: CommandId) -> Subscription {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
        let mut inner = self.lock();
        let mut kept = VecDeque::with_capacity(inner.parked.len());
        for (at, chunk) in inner.parked.drain(..) {
            if chunk.command == command {
                if tx.try_send(chunk).is_err() {
                    self.metrics
                        .dropped
                        .with_label_values(&["slow_subscriber"])
                        .inc();
                }
            } else {
                kept.push_back((at, chunk));
            }
        }
        inner.parked = kept;
        inner.subscribers.insert(command, tx);
        drop(inner);
        self.metrics.follows.inc();
        Subscription {
            chunks: rx,
            guard: SubscriptionGuard {
                hub: self.clone(),
                command,
            },
        }
    }

    /// Hands `chunk` to its subscriber, or parks it for one that is about to come.
    pub fn publish(&self, chunk: LogChunk) {
        self.publish_at(chunk, Instant::now());
    }

    fn publish_at(&self, chunk: LogChunk, now: Instant) {
        let mut inner = self.lock();
        if let Some(tx) = inner.subscribers.get(&chunk.command) {
            if tx.try_send(chunk).is_err() {
                self.metrics
                    .dropped
                    .with_label_values(&["slow_subscriber"])
                    .inc();
            }
            return;
        }
        let mut expired = 0u64;
        while inner
            .parked
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > PARKED_FOR)
        {
            inner.parked.pop_front();
            expired += 1;
        }
        if inner.parked.len() >= MAX_PARKED {
            inner.parked.pop_front();
            expired += 1;
        }
        inner.parked.push_back((now, chunk));
        drop(inner);
        if expired > 0 {
            self.metrics
                .dropped
                .with_label_values(&["unclaimed"])
                .inc_by(expired);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use razar_shared::domain::LogStream;

    fn chunk(id: u8, line: &str) -> LogChunk {
        LogChunk {
            command: [id; 16],
            component: "c".into(),
            stream: LogStream::Stdout,
            lines: vec![line.into()],
            end: false,
        }
    }

    #[tokio::test]
    async fn parked_chunks_reach_a_late_subscriber_and_dropping_unsubscribes() {
        let hub = LogHub::new().expect("hub");
        hub.publish(chunk(1, "early"));
        hub.publish(chunk(2, "other"));
        let mut sub = hub.subscribe([1; 16]);
        assert_eq!(hub.metrics().follows.get(), 1);
        hub.publish(chunk(1, "late"));
        assert_eq!(
            sub.chunks.recv().await.map(|c| c.lines),
            Some(vec!["early".to_owned()])
        );
        assert_eq!(
            sub.chunks.recv().await.map(|c| c.lines),
            Some(vec!["late".to_owned()])
        );
        drop(sub);
        assert_eq!(hub.metrics().follows.get(), 0);
        assert!(hub.lock().subscribers.is_empty());
        // The other id's chunk is still parked, then expires and is counted.
        let later = Instant::now() + PARKED_FOR + Duration::from_secs(1);
        hub.publish_at(chunk(3, "x"), later);
        assert_eq!(
            hub.metrics()
                .dropped
                .with_label_values(&["unclaimed"])
                .get(),
            1
        );
    }

    #[test]
    fn parking_is_bounded() {
        let hub = LogHub::new().expect("hub");
        for i in 0..(MAX_PARKED + 5) {
            hub.publish(chunk((i % 200) as u8, "l"));
        }
        assert_eq!(hub.lock().parked.len(), MAX_PARKED);
        assert_eq!(
            hub.metrics()
                .dropped
                .with_label_values(&["unclaimed"])
                .get(),
            5
        );
    }
}
