//! The event ledger: counts XIDs per GPU and XID, pairs the same XID seen through the
//! NVML event set and the kernel log so it is counted once, reports a lost GPU once,
//! and queues events until the agent drains them.

use crate::reading::{GpuEvent, GpuEventKind, XidOrigin, XID_SOURCE_BOTH};
use crate::xid;
use razar_shared::protocol::UnixMillis;
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// Events kept for the agent at most; older ones are dropped and counted.
pub const MAX_QUEUED_EVENTS: usize = 4_096;

/// Sightings kept waiting for their twin from the other origin at most.
const MAX_UNMATCHED: usize = 1_024;

#[derive(Debug)]
struct Sighting {
    gpu: u32,
    xid: u32,
    origin: XidOrigin,
    at: Instant,
}

/// Counts and queues GPU events; shared between the sampler and the watcher threads.
#[derive(Debug)]
pub struct Ledger {
    window: Duration,
    counts: Vec<BTreeMap<u32, u64>>,
    /// XIDs per GPU by the source that saw them (a paired one counts in both
    /// origins and in `both`).
    sources: Vec<BTreeMap<&'static str, u64>>,
    last_xid: Vec<Option<u32>>,
    lost: Vec<bool>,
    /// XIDs counted from one origin and not yet matched by the other.
    unmatched: VecDeque<Sighting>,
    queue: VecDeque<GpuEvent>,
    dropped: u64,
    twins: u64,
    coalesced: u64,
    /// The last kernel log record read, and the last one whose XIDs were drained.
    kernel_seq_read: Option<u64>,
    kernel_seq_drained: Option<u64>,
    /// Called when an event is queued (not when one is folded into a queued event).
    waker: Option<EventWaker>,
}

/// Wakes whoever drains the ledger as soon as an event is queued, so a fault does not
/// wait for the next poll. Called on the watcher threads, under the ledger's lock: it
/// must be quick and must not block (e.g. `tokio::sync::Notify::notify_one`).
#[derive(Clone)]
pub struct EventWaker(std::sync::Arc<dyn Fn() + Send + Sync>);

impl EventWaker {
    pub fn new(wake: impl Fn() + Send + Sync + 'static) -> EventWaker {
        EventWaker(std::sync::Arc::new(wake))
    }

    pub fn wake(&self) {
        (self.0)();
    }
}

impl std::fmt::Debug for EventWaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventWaker")
    }
}

impl Ledger {
    /// A ledger for `gpus` GPUs; an NVML event and a kernel log line for the same GPU
    /// and XID within `window` of each other are one XID.
    pub fn new(gpus: usize, window: Duration) -> Ledger {
        Ledger {
            window,
            counts: vec![BTreeMap::new(); gpus],
            sources: vec![BTreeMap::new(); gpus],
            last_xid: vec![None; gpus],
            lost: vec![false; gpus],
            unmatched: VecDeque::new(),
            queue: VecDeque::new(),
            dropped: 0,
            twins: 0,
            coalesced: 0,
            kernel_seq_read: None,
            kernel_seq_drained: None,
            waker: None,
        }
    }

    /// Calls `waker` whenever an event is queued from now on.
    pub fn set_waker(&mut self, waker: EventWaker) {
        self.waker = Some(waker);
    }

    /// Records an XID; returns whether it was counted (false: the twin of one already
    /// counted from the other origin).
    pub fn record_xid(
        &mut self,
        gpu: u32,
        xid: u32,
        origin: XidOrigin,
        now: Instant,
        ts_ms: UnixMillis,
    ) -> bool {
        let Some(slot) = self.counts.get_mut(gpu as usize) else {
            return false;
        };
        let window = self.window;
        self.unmatched
            .retain(|s| now.saturating_duration_since(s.at) <= window);
        let twin = self.unmatched.iter().position(|s| {
            s.gpu == gpu
                && s.xid == xid
                && s.origin != origin
                && s.origin != XidOrigin::Scenario
                && origin != XidOrigin::Scenario
        });
        if let Some(pos) = twin {
            self.unmatched.remove(pos);
            if let Some(sources) = self.sources.get_mut(gpu as usize) {
                *sources.entry(origin.as_str()).or_insert(0) += 1;
                *sources.entry(XID_SOURCE_BOTH).or_insert(0) += 1;
            }
            self.twins += 1;
            return false;
        }
        *slot.entry(xid).or_insert(0) += 1;
        if let Some(sources) = self.sources.get_mut(gpu as usize) {
            *sources.entry(origin.as_str()).or_insert(0) += 1;
        }
        self.last_xid[gpu as usize] = Some(xid);
        if origin != XidOrigin::Scenario {
            // Bounded: in a storm every kernel log line waits here; the oldest go first
            // (an NVML event still pairs with a newer line of the same XID).
            if self.unmatched.len() >= MAX_UNMATCHED {
                self.unmatched.pop_front();
            }
            self.unmatched.push_back(Sighting {
                gpu,
                xid,
                origin,
                at: now,
            });
        }
        // A storm: the same XID on the same GPU while the first is still queued is
        // folded into it (counted, last time kept) instead of queueing another event.
        let queued = self.queue.iter_mut().rev().find_map(|e| match &mut e.kind {
            GpuEventKind::Xid {
                xid: x,
                count,
                last_ts_ms,
                ..
            } if e.gpu_index == gpu && *x == xid && !e.historical => Some((count, last_ts_ms)),
            _ => None,
        });
        if let Some((count, last_ts_ms)) = queued {
            *count += 1;
            *last_ts_ms = (*last_ts_ms).max(ts_ms);
            self.coalesced += 1;
            return true;
        }
        let class = xid::classify(xid);
        self.push(GpuEvent {
            ts_ms,
            gpu_index: gpu,
            historical: false,
            kind: GpuEventKind::Xid {
                xid,
                class,
                action: xid::recommended_action(class),
                origin,
                count: 1,
                last_ts_ms: ts_ms,
            },
        });
        true
    }

    /// XIDs folded into an event already queued for the same GPU and XID.
    pub fn coalesced(&self) -> u64 {
        self.coalesced
    }

    pub fn record_double_bit_ecc(&mut self, gpu: u32, ts_ms: UnixMillis) {
        self.push(GpuEvent {
            ts_ms,
            gpu_index: gpu,
            historical: false,
            kind: GpuEventKind::DoubleBitEcc,
        });
    }

    /// Marks a GPU lost; the event is queued only the first time. Returns whether it was new.
    pub fn mark_lost(&mut self, gpu: u32, ts_ms: UnixMillis) -> bool {
        match self.lost.get_mut(gpu as usize) {
            Some(lost) if !*lost => {
                *lost = true;
                self.push(GpuEvent {
                    ts_ms,
                    gpu_index: gpu,
                    historical: false,
                    kind: GpuEventKind::Lost,
                });
                true
            }
            _ => false,
        }
    }

    pub fn is_lost(&self, gpu: u32) -> bool {
        self.lost.get(gpu as usize).copied().unwrap_or(false)
    }

    /// XID counts of a GPU since the ledger was created.
    pub fn xid_counts(&self, gpu: u32) -> BTreeMap<u32, u64> {
        self.counts.get(gpu as usize).cloned().unwrap_or_default()
    }

    /// XIDs of a GPU by the source that saw them: `nvml`, `kernel_log`, `scenario`, and
    /// `both` for an NVML event and a kernel log line paired as one XID (counted in both
    /// origins too). Seen by NVML alone: `nvml - both`; by the kernel log alone:
    /// `kernel_log - both`. Every value only grows (Prometheus counters).
    pub fn xid_sources(&self, gpu: u32) -> BTreeMap<&'static str, u64> {
        self.sources.get(gpu as usize).cloned().unwrap_or_default()
    }

    pub fn last_xid(&self, gpu: u32) -> Option<u32> {
        self.last_xid.get(gpu as usize).copied().flatten()
    }

    /// Takes every queued event, oldest first.
    pub fn drain(&mut self) -> Vec<GpuEvent> {
        self.kernel_seq_drained = self.kernel_seq_read;
        self.queue.drain(..).collect()
    }

    /// An XID from a kernel log line written before the agent started and never
    /// reported: queued once as a historical event at its own time, not counted (it is
    /// not a new fault) and never paired or coalesced with live ones.
    pub fn record_historical_xid(&mut self, gpu: u32, xid: u32, ts_ms: UnixMillis) {
        if gpu as usize >= self.counts.len() {
            return;
        }
        let class = xid::classify(xid);
        self.push(GpuEvent {
            ts_ms,
            gpu_index: gpu,
            historical: true,
            kind: GpuEventKind::Xid {
                xid,
                class,
                action: xid::recommended_action(class),
                origin: XidOrigin::KernelLog,
                count: 1,
                last_ts_ms: ts_ms,
            },
        });
    }

    /// The kernel log was read up to record `seq` (its XIDs are queued).
    pub fn kernel_log_read(&mut self, seq: u64) {
        self.kernel_seq_read = Some(self.kernel_seq_read.map_or(seq, |s| s.max(seq)));
    }

    /// The kernel log record up to which every XID was handed out by [`drain`](Self::drain).
    pub fn kernel_log_drained(&self) -> Option<u64> {
        self.kernel_seq_drained
    }

    /// Whether no event waits to be drained.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Events dropped because the agent did not drain the queue in time.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// XIDs seen from both origins and counted once.
    pub fn twins(&self) -> u64 {
        self.twins
    }

    fn push(&mut self, event: GpuEvent) {
        if self.queue.len() >= MAX_QUEUED_EVENTS {
            self.queue.pop_front();
            self.dropped += 1;
        }
        self.queue.push_back(event);
        if let Some(waker) = &self.waker {
            waker.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(sightings: &[(u32, XidOrigin, u64)], expected: &[(u32, u64)]) {
        let mut ledger = Ledger::new(1, Duration::from_secs(5));
        let t0 = Instant::now();
        for (xid, origin, ms) in sightings {
            ledger.record_xid(0, *xid, *origin, t0 + Duration::from_millis(*ms), 0);
        }
        let expected: BTreeMap<u32, u64> = expected.iter().copied().collect();
        assert_eq!(ledger.xid_counts(0), expected, "{sightings:?}");
        let s = ledger.xid_sources(0);
        let get = |k: &str| s.get(k).copied().unwrap_or(0);
        assert_eq!(
            get("nvml") + get("kernel_log") + get("scenario") - get("both"),
            expected.values().sum::<u64>(),
            "sources add up to the count: {sightings:?}"
        );
        let counted: u64 = ledger
            .drain()
            .iter()
            .map(|e| match e.kind {
                GpuEventKind::Xid { count, .. } => count,
                _ => 0,
            })
            .sum();
        assert_eq!(
            counted,
            expected.values().sum::<u64>(),
            "every counted XID is in an event's count"
        );
    }

    #[test]
    fn xids_are_counted_by_the_source_that_saw_them() {
        use XidOrigin::{KernelLog as K, Nvml as N};
        let mut ledger = Ledger::new(1, Duration::from_secs(5));
        let t0 = Instant::now();
        // 79 seen by both; 31 by the kernel log alone (NVML keeps only the latest); 13
        // by NVML alone.
        for (xid, origin, ms) in [(31, K, 0), (79, K, 1), (79, N, 2), (13, N, 3)] {
            ledger.record_xid(0, xid, origin, t0 + Duration::from_millis(ms), 0);
        }
        // nvml 2 (79, 13), kernel_log 2 (31, 79), both 1 (79): NVML alone 1, kernel
        // log alone 1.
        assert_eq!(
            ledger.xid_sources(0),
            BTreeMap::from([("both", 1), ("kernel_log", 2), ("nvml", 2)])
        );
    }

    #[test]
    fn a_storm_is_coalesced_per_gpu_and_xid_and_counted_exactly() {
        let mut ledger = Ledger::new(2, Duration::ZERO);
        let t0 = Instant::now();
        for i in 0..10_000i64 {
            ledger.record_xid(0, 31, XidOrigin::Scenario, t0, 1_000 + i);
            ledger.record_xid(1, 31, XidOrigin::Scenario, t0, 1_000 + i);
            ledger.record_xid(0, 13, XidOrigin::Scenario, t0, 1_000 + i);
        }
        assert_eq!(
            ledger.xid_counts(0),
            BTreeMap::from([(13, 10_000), (31, 10_000)])
        );
        assert_eq!(ledger.dropped(), 0, "nothing dropped from the queue");
        let events = ledger.drain();
        let summary: Vec<_> = events
            .iter()
            .map(|e| match e.kind {
                GpuEventKind::Xid {
                    xid,
                    count,
                    last_ts_ms,
                    ..
                } => (e.gpu_index, xid, count, e.ts_ms, last_ts_ms),
                _ => panic!("{e:?}"),
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (0, 31, 10_000, 1_000, 10_999),
                (1, 31, 10_000, 1_000, 10_999),
                (0, 13, 10_000, 1_000, 10_999),
            ]
        );
        assert_eq!(ledger.coalesced(), 3 * 9_999);
        // Once drained, the next XID is a new event.
        ledger.record_xid(0, 31, XidOrigin::Scenario, t0, 20_000);
        assert_eq!(ledger.drain().len(), 1);
    }

    #[test]
    fn the_waker_is_called_when_an_event_is_queued_not_when_one_is_folded_in() {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        let mut ledger = Ledger::new(2, Duration::ZERO);
        let wakes = Arc::new(AtomicU64::new(0));
        let counted = wakes.clone();
        ledger.set_waker(EventWaker::new(move || {
            counted.fetch_add(1, Ordering::Relaxed);
        }));
        let t0 = Instant::now();
        assert_eq!(wakes.load(Ordering::Relaxed), 0);
        ledger.record_xid(0, 79, XidOrigin::Scenario, t0, 1);
        assert_eq!(wakes.load(Ordering::Relaxed), 1, "a new event wakes");
        for i in 0..100 {
            ledger.record_xid(0, 79, XidOrigin::Scenario, t0, 2 + i);
        }
        assert_eq!(
            wakes.load(Ordering::Relaxed),
            1,
            "a storm folded in does not"
        );
        ledger.record_double_bit_ecc(1, 3);
        ledger.mark_lost(1, 4);
        assert_eq!(wakes.load(Ordering::Relaxed), 3, "every other event wakes");
        assert!(!ledger.is_empty());
        assert_eq!(ledger.drain().len(), 3);
        assert!(ledger.is_empty());
        ledger.record_xid(0, 79, XidOrigin::Scenario, t0, 200);
        assert_eq!(
            wakes.load(Ordering::Relaxed),
            4,
            "after a drain, a new event again"
        );
    }

    #[test]
    fn nvml_and_kernel_log_twins_count_once() {
        use XidOrigin::{KernelLog as K, Nvml as N, Scenario as S};
        // NVML saw only the last of two; the kernel log saw both.
        check(&[(31, K, 0), (79, K, 1), (79, N, 2)], &[(31, 1), (79, 1)]);
        // NVML first.
        check(&[(79, N, 0), (31, K, 1), (79, K, 2)], &[(31, 1), (79, 1)]);
        // Two genuine XIDs of the same number: both lines count, NVML's one pairs.
        check(&[(13, K, 0), (13, N, 1), (13, K, 2)], &[(13, 2)]);
        // Same origin never pairs.
        check(&[(13, N, 0), (13, N, 1)], &[(13, 2)]);
        // Outside the window: two XIDs.
        check(&[(13, N, 0), (13, K, 6_000)], &[(13, 2)]);
        // Scenario XIDs always count.
        check(&[(13, S, 0), (13, S, 0)], &[(13, 2)]);
    }

    #[test]
    fn lost_is_reported_once_and_queue_is_bounded() {
        let mut ledger = Ledger::new(2, Duration::from_secs(5));
        assert!(ledger.mark_lost(1, 0));
        assert!(!ledger.mark_lost(1, 0));
        assert!(!ledger.mark_lost(7, 0), "unknown gpu ignored");
        assert_eq!(ledger.drain().len(), 1);
        for _ in 0..MAX_QUEUED_EVENTS + 3 {
            ledger.record_double_bit_ecc(0, 0);
        }
        assert_eq!(ledger.dropped(), 3);
        assert_eq!(ledger.drain().len(), MAX_QUEUED_EVENTS);
    }
}
