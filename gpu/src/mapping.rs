//! GPU ↔ component mapping: per-component VRAM from GPU processes and the agent's
//! component process trees, VRAM budget breaches, and ghost memory (VRAM in use that
//! no process accounts for) held over several samples.

use crate::reading::{GpuProcesses, GpuReading, UsedMemory};
use razar_shared::domain::Severity;
use razar_shared::protocol::{Event, EventKind, Subject, UnixMillis};
use std::collections::{BTreeMap, BTreeSet};
use std::num::NonZeroU32;

/// VRAM one component uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ComponentVram {
    /// Bytes over every GPU.
    pub used_bytes: u64,
    /// Bytes per GPU index.
    pub per_gpu: BTreeMap<u32, u64>,
    /// Processes of the component on a GPU whose memory NVML reports as unavailable
    /// (then `used_bytes` is a lower bound).
    pub unavailable_processes: u32,
}

/// Sums GPU process memory per component. `components` maps a component name to the
/// pids of its process tree (host pid namespace). A pid in no tree is not counted.
pub fn vram_by_component(
    gpu_processes: &[GpuProcesses],
    components: &BTreeMap<String, BTreeSet<u32>>,
) -> BTreeMap<String, ComponentVram> {
    let owner: BTreeMap<u32, &str> = components
        .iter()
        .flat_map(|(name, pids)| pids.iter().map(move |pid| (*pid, name.as_str())))
        .collect();
    let mut usage: BTreeMap<String, ComponentVram> = components
        .keys()
        .map(|name| (name.clone(), ComponentVram::default()))
        .collect();
    for gpu in gpu_processes {
        for process in &gpu.processes {
            let Some(vram) = owner
                .get(&process.pid)
                .and_then(|name| usage.get_mut(*name))
            else {
                continue;
            };
            match process.used_memory {
                UsedMemory::Bytes(bytes) => {
                    vram.used_bytes += bytes;
                    *vram.per_gpu.entry(gpu.gpu_index).or_insert(0) += bytes;
                }
                UsedMemory::Unavailable => vram.unavailable_processes += 1,
            }
        }
    }
    usage
}

/// A component using more VRAM than its budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VramBreach {
    pub component: String,
    pub used_bytes: u64,
    pub budget_bytes: u64,
}

impl VramBreach {
    /// The wire event (the agent restarts the component if its policy says so).
    pub fn to_event(&self, ts_ms: UnixMillis) -> Event {
        Event {
            ts_ms,
            severity: Severity::Warning,
            subject: Subject::Component(self.component.clone()),
            kind: EventKind::VramBudgetExceeded {
                used_bytes: self.used_bytes,
                budget_bytes: self.budget_bytes,
            },
            message: format!(
                "component {} uses {} MiB of VRAM, budget {} MiB",
                self.component,
                self.used_bytes >> 20,
                self.budget_bytes >> 20
            ),
        }
    }
}

/// Components whose VRAM exceeds their budget (`budgets`: component → bytes).
pub fn vram_breaches(
    usage: &BTreeMap<String, ComponentVram>,
    budgets: &BTreeMap<String, u64>,
) -> Vec<VramBreach> {
    budgets
        .iter()
        .filter_map(|(component, budget)| {
            let used = usage.get(component)?.used_bytes;
            (used > *budget).then(|| VramBreach {
                component: component.clone(),
                used_bytes: used,
                budget_bytes: *budget,
            })
        })
        .collect()
}

/// VRAM in use that no process accounts for, held for `samples` consecutive samples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GhostMemory {
    pub gpu_index: u32,
    pub uuid: String,
    /// `fb_used − Σ per-process used` at the latest sample.
    pub unaccounted_bytes: u64,
    pub samples: u32,
}

impl GhostMemory {
    pub fn to_event(&self, ts_ms: UnixMillis) -> Event {
        Event {
            ts_ms,
            severity: Severity::Warning,
            subject: Subject::Gpu(self.gpu_index),
            kind: EventKind::GhostMemory {
                bytes: self.unaccounted_bytes,
            },
            message: format!(
                "{} MiB of VRAM on GPU {} belongs to no process for {} samples: \
                 restarting components will not free it; it needs a GPU reset",
                self.unaccounted_bytes >> 20,
                self.gpu_index,
                self.samples
            ),
        }
    }
}

/// Detects ghost memory: `fb_used − Σ per-process used` above a threshold for N
/// consecutive samples. Reports once per episode; a sample below the threshold ends it.
/// A GPU with a process whose memory is unavailable cannot be judged and resets its streak.
#[derive(Debug, Clone)]
pub struct GhostMemoryDetector {
    threshold_bytes: u64,
    samples: NonZeroU32,
    /// Per GPU index: consecutive samples above the threshold.
    streaks: BTreeMap<u32, u32>,
}

impl GhostMemoryDetector {
    pub fn new(threshold_bytes: u64, samples: NonZeroU32) -> GhostMemoryDetector {
        GhostMemoryDetector {
            threshold_bytes,
            samples,
            streaks: BTreeMap::new(),
        }
    }

    /// Feeds one tick; returns the GPUs whose ghost memory just reached N samples.
    pub fn observe(
        &mut self,
        readings: &[GpuReading],
        processes: &[GpuProcesses],
    ) -> Vec<GhostMemory> {
        let mut found = Vec::new();
        for reading in readings {
            let index = reading.gpu.index;
            let procs = processes.iter().find(|p| p.gpu_index == index);
            let accounted: Option<u64> = procs.map_or(Some(0), |p| {
                p.processes.iter().map(|p| p.used_memory.bytes()).sum()
            });
            let unaccounted = match (reading.memory_used_bytes, accounted, reading.lost) {
                (Some(used), Some(accounted), false) if procs.is_some() => {
                    used.saturating_sub(accounted)
                }
                _ => {
                    self.streaks.remove(&index);
                    continue;
                }
            };
            if unaccounted <= self.threshold_bytes {
                self.streaks.remove(&index);
                continue;
            }
            let streak = self.streaks.entry(index).or_insert(0);
            *streak = streak.saturating_add(1);
            if *streak == self.samples.get() {
                found.push(GhostMemory {
                    gpu_index: index,
                    uuid: reading.gpu.uuid.clone(),
                    unaccounted_bytes: unaccounted,
                    samples: *streak,
                });
            }
        }
        found
    }
}
