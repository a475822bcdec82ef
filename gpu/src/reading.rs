//! What a GPU source reports: inventory, per-tick readings (every optional field
//! absent when the GPU does not support it, never zero), processes and events.

use razar_shared::domain::{Severity, XidClass};
use razar_shared::protocol::{Event, EventKind, GpuInfo, Subject, UnixMillis};
use serde::{Serialize, Serializer};
use std::collections::BTreeMap;
use std::sync::Arc;

/// A GPU's identity, read once when the source opens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuIdentity {
    /// NVML index (`nvidia<index>`).
    pub index: u32,
    pub uuid: String,
    /// Model name, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// NVML form: `00000000:3B:00.0`.
    pub pci_bus_id: String,
    pub serial: Option<String>,
    pub driver_version: Option<String>,
    pub memory_total_bytes: Option<u64>,
    /// Number of fans; 0 is normal on SXM boards.
    pub fans: u32,
}

impl GpuIdentity {
    /// The wire inventory entry (memory total 0 when unknown).
    pub fn to_info(&self) -> GpuInfo {
        GpuInfo {
            index: self.index,
            uuid: self.uuid.clone(),
            name: self.name.clone(),
            pci_bus_id: self.pci_bus_id.clone(),
            memory_total_bytes: self.memory_total_bytes.unwrap_or(0),
        }
    }

    /// The device name dcgm-exporter uses (`nvidia0`).
    pub fn device(&self) -> String {
        format!("nvidia{}", self.index)
    }
}

fn serialize_identity<S: Serializer>(v: &Arc<GpuIdentity>, s: S) -> Result<S::Ok, S::Error> {
    v.as_ref().serialize(s)
}

/// ECC error counts; each absent where the GPU has no ECC or does not report it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EccCounts {
    pub volatile_corrected: Option<u64>,
    pub volatile_uncorrected: Option<u64>,
    pub aggregate_corrected: Option<u64>,
    pub aggregate_uncorrected: Option<u64>,
}

/// One GPU at one tick. Units are in the field names.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuReading {
    #[serde(serialize_with = "serialize_identity")]
    pub gpu: Arc<GpuIdentity>,
    /// The GPU fell off the bus (or answers GPU_IS_LOST); every value below is absent.
    pub lost: bool,
    pub memory_total_bytes: Option<u64>,
    /// Excludes reserved memory (NVML memory info v2).
    pub memory_used_bytes: Option<u64>,
    pub memory_free_bytes: Option<u64>,
    pub memory_reserved_bytes: Option<u64>,
    pub utilization_gpu_percent: Option<u32>,
    pub utilization_memory_percent: Option<u32>,
    pub utilization_encoder_percent: Option<u32>,
    pub utilization_decoder_percent: Option<u32>,
    pub temperature_gpu_celsius: Option<u32>,
    pub temperature_memory_celsius: Option<u32>,
    pub power_usage_milliwatts: Option<u32>,
    pub power_limit_milliwatts: Option<u32>,
    /// Since the driver was loaded.
    pub energy_millijoules: Option<u64>,
    pub sm_clock_mhz: Option<u32>,
    pub memory_clock_mhz: Option<u32>,
    /// NVML clocks throttle (event) reason bitmask.
    pub throttle_reasons: Option<u64>,
    /// P-state 0..=15 (0 is maximum performance).
    pub performance_state: Option<u32>,
    /// Percent per fan; `Some(vec![])` for a board without fans, `None` when unsupported.
    pub fan_speed_percent: Option<Vec<u32>>,
    pub pcie_replay_count: Option<u64>,
    pub pcie_tx_bytes_per_second: Option<u64>,
    pub pcie_rx_bytes_per_second: Option<u64>,
    pub ecc: EccCounts,
    pub retired_pages_single_bit: Option<u64>,
    pub retired_pages_double_bit: Option<u64>,
    pub remapped_rows_correctable: Option<u64>,
    pub remapped_rows_uncorrectable: Option<u64>,
    pub remapped_rows_pending: Option<u64>,
    pub remapped_rows_failure: Option<u64>,
    /// XIDs counted since the source opened, per XID (a counter, not the last value).
    pub xid_errors_total: BTreeMap<u32, u64>,
    /// XIDs by the source that saw them (`nvml`, `kernel_log`, `scenario`; `both`: an
    /// NVML event and a kernel log line paired as one XID, also counted in each).
    pub xid_sources_total: BTreeMap<&'static str, u64>,
    /// The most recent XID (what dcgm-exporter's XID_ERRORS gauge shows).
    pub last_xid: Option<u32>,
}

impl GpuReading {
    /// A reading with identity only and every value absent.
    pub fn empty(gpu: Arc<GpuIdentity>) -> GpuReading {
        GpuReading {
            gpu,
            lost: false,
            memory_total_bytes: None,
            memory_used_bytes: None,
            memory_free_bytes: None,
            memory_reserved_bytes: None,
            utilization_gpu_percent: None,
            utilization_memory_percent: None,
            utilization_encoder_percent: None,
            utilization_decoder_percent: None,
            temperature_gpu_celsius: None,
            temperature_memory_celsius: None,
            power_usage_milliwatts: None,
            power_limit_milliwatts: None,
            energy_millijoules: None,
            sm_clock_mhz: None,
            memory_clock_mhz: None,
            throttle_reasons: None,
            performance_state: None,
            fan_speed_percent: None,
            pcie_replay_count: None,
            pcie_tx_bytes_per_second: None,
            pcie_rx_bytes_per_second: None,
            ecc: EccCounts::default(),
            retired_pages_single_bit: None,
            retired_pages_double_bit: None,
            remapped_rows_correctable: None,
            remapped_rows_uncorrectable: None,
            remapped_rows_pending: None,
            remapped_rows_failure: None,
            xid_errors_total: BTreeMap::new(),
            xid_sources_total: BTreeMap::new(),
            last_xid: None,
        }
    }
}

/// GPU memory a process uses, as NVML reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum UsedMemory {
    Bytes(u64),
    /// NVML cannot tell (e.g. no permission, some MIG or Windows setups): a value, not an error.
    Unavailable,
}

impl UsedMemory {
    pub fn bytes(self) -> Option<u64> {
        match self {
            UsedMemory::Bytes(b) => Some(b),
            UsedMemory::Unavailable => None,
        }
    }
}

/// A compute process on a GPU. Pids are host-namespace pids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct GpuProcess {
    pub pid: u32,
    pub used_memory: UsedMemory,
}

/// The compute processes of one GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuProcesses {
    pub gpu_index: u32,
    pub processes: Vec<GpuProcess>,
}

/// Where an XID was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum XidOrigin {
    /// An NVML event set (`nvmlEventSetWait`).
    Nvml,
    /// A `NVRM: Xid` kernel log line.
    KernelLog,
    /// A scenario (tests, demo).
    Scenario,
}

impl XidOrigin {
    /// The `source` label of an XID counted from this origin alone.
    pub fn as_str(self) -> &'static str {
        match self {
            XidOrigin::Nvml => "nvml",
            XidOrigin::KernelLog => "kernel_log",
            XidOrigin::Scenario => "scenario",
        }
    }
}

/// The `source` label of an XID seen both as an NVML event and a kernel log line.
pub const XID_SOURCE_BOTH: &str = "both";

/// What happened to a GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum GpuEventKind {
    /// An XID, classified, with the recommended action. Repeats of the same XID on the
    /// same GPU seen before the agent drained the first are coalesced into it: `count`
    /// XIDs from the event's `ts_ms` to `last_ts_ms` (the ledger's counter counts each).
    Xid {
        xid: u32,
        class: XidClass,
        action: &'static str,
        origin: XidOrigin,
        count: u64,
        last_ts_ms: UnixMillis,
    },
    /// A double-bit ECC error.
    DoubleBitEcc,
    /// The GPU fell off the bus or answers GPU_IS_LOST. Reported once.
    Lost,
}

/// A GPU event with the wall-clock time it was seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuEvent {
    pub ts_ms: UnixMillis,
    pub gpu_index: u32,
    pub kind: GpuEventKind,
    /// A kernel log line written before the agent started and never reported: `ts_ms` is
    /// the line's own time; not a new fault (not counted).
    pub historical: bool,
}

impl GpuEvent {
    /// The wire event for the collector.
    pub fn to_event(&self) -> Event {
        let (severity, kind, message) = match &self.kind {
            GpuEventKind::Xid {
                xid,
                class,
                action,
                count,
                last_ts_ms,
                ..
            } => (
                crate::xid::severity(*class),
                EventKind::Xid {
                    xid: *xid,
                    class: *class,
                },
                if *count > 1 {
                    format!(
                        "XID {xid} ({}) x{count} from {} to {last_ts_ms} ms: {action}",
                        class.as_str(),
                        self.ts_ms
                    )
                } else {
                    format!("XID {xid} ({}): {action}", class.as_str())
                },
            ),
            GpuEventKind::DoubleBitEcc => (
                Severity::Critical,
                EventKind::EccDoubleBit,
                "double-bit ECC error: stop the GPU's work and reset it".to_owned(),
            ),
            GpuEventKind::Lost => (
                Severity::Critical,
                EventKind::GpuLost,
                "GPU is lost (fallen off the bus): drain the host and reboot it".to_owned(),
            ),
        };
        Event {
            ts_ms: self.ts_ms,
            severity,
            subject: Subject::Gpu(self.gpu_index),
            kind,
            message,
        }
    }
}

/// What ran on a GPU when one of its events was seen (the agent gathers it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuAttribution {
    pub processes: Vec<razar_shared::protocol::FaultProcess>,
    pub components: Vec<razar_shared::protocol::ComponentRevision>,
}

impl GpuEvent {
    /// The wire event with its attribution (protocol version 3: `EventKind::GpuFault`):
    /// same time, severity, subject and message as [`to_event`](Self::to_event), plus the
    /// GPU's identity, its processes and the components mapped to it. `gpu` is the
    /// identity of `self.gpu_index` (`None`: not in the inventory, the plain event).
    pub fn to_attributed_event(
        &self,
        gpu: Option<&GpuIdentity>,
        attribution: GpuAttribution,
    ) -> Event {
        use razar_shared::protocol::{GpuFault, GpuFaultKind, GpuRef};
        let mut event = self.to_event();
        let Some(gpu) = gpu else {
            return event;
        };
        let fault = match &self.kind {
            GpuEventKind::Xid {
                xid,
                class,
                count,
                last_ts_ms,
                ..
            } => GpuFaultKind::Xid {
                xid: *xid,
                class: *class,
                count: *count,
                first_ms: self.ts_ms,
                last_ms: *last_ts_ms,
            },
            GpuEventKind::DoubleBitEcc => GpuFaultKind::EccDoubleBit,
            GpuEventKind::Lost => GpuFaultKind::Lost,
        };
        event.kind = EventKind::GpuFault(Box::new(GpuFault {
            fault,
            gpu: GpuRef {
                index: gpu.index,
                uuid: gpu.uuid.clone(),
                pci_bus_id: gpu.pci_bus_id.clone(),
            },
            processes: attribution.processes,
            components: attribution.components,
            historical: self.historical,
        }));
        event
    }
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_ms() -> UnixMillis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
