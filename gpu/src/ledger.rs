//! The event ledger: counts XIDs per GPU and XID, pairs the same XID seen through the
//! NVML event set and the kernel log so it is counted once, reports a lost GPU once,
//! and queues events until the agent drains them.

use crate::reading::{GpuEvent, GpuEventKind, XidOrigin};
use crate::xid;
use razar_shared::protocol::UnixMillis;
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// Events kept for the agent at most; older ones are dropped and counted.
pub const MAX_QUEUED_EVENTS: usize = 4_096;

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
    last_xid: Vec<Option<u32>>,
    lost: Vec<bool>,
    /// XIDs counted from one origin and not yet matched by the other.
    unmatched: VecDeque<Sighting>,
    queue: VecDeque<GpuEvent>,
    dropped: u64,
    twins: u64,
}

impl Ledger {
    /// A ledger for `gpus` GPUs; an NVML event and a kernel log line for the same GPU
    /// and XID within `window` of each other are one XID.
    pub fn new(gpus: usize, window: Duration) -> Ledger {
        Ledger {
            window,
            counts: vec![BTreeMap::new(); gpus],
            last_xid: vec![None; gpus],
            lost: vec![false; gpus],
            unmatched: VecDeque::new(),
            queue: VecDeque::new(),
            dropped: 0,
            twins: 0,
        }
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
            self.twins += 1;
            return false;
        }
        *slot.entry(xid).or_insert(0) += 1;
        self.last_xid[gpu as usize] = Some(xid);
        if origin != XidOrigin::Scenario {
            self.unmatched.push_back(Sighting {
                gpu,
                xid,
                origin,
                at: now,
            });
        }
        let class = xid::classify(xid);
        self.push(GpuEvent {
            ts_ms,
            gpu_index: gpu,
            kind: GpuEventKind::Xid {
                xid,
                class,
                action: xid::recommended_action(class),
                origin,
            },
        });
        true
    }

    pub fn record_double_bit_ecc(&mut self, gpu: u32, ts_ms: UnixMillis) {
        self.push(GpuEvent {
            ts_ms,
            gpu_index: gpu,
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

    pub fn last_xid(&self, gpu: u32) -> Option<u32> {
        self.last_xid.get(gpu as usize).copied().flatten()
    }

    /// Takes every queued event, oldest first.
    pub fn drain(&mut self) -> Vec<GpuEvent> {
        self.queue.drain(..).collect()
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
        assert_eq!(
            ledger.drain().len() as u64,
            expected.values().sum::<u64>(),
            "one event per counted XID"
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
