//! Exposition of GPU and host readings: telemetry samples with razar-native names
//! (base units, `_total` counters) for the agent's batches, and a Prometheus collector
//! that serves the same native series plus dcgm-exporter-compatible ones
//! (`DCGM_FI_DEV_*` with dcgm-exporter's labels `gpu`, `UUID`, `pci_bus_id`, `device`,
//! `modelName`, `hostname` (or `Hostname`, see [`HostnameLabel`]) and
//! `DCGM_FI_DRIVER_VERSION`). A field that is absent produces no series.

use crate::host::HostReading;
use crate::reading::GpuReading;
use prometheus::core::{Collector, Desc};
use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

/// Prometheus metric type of a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Gauge,
    Counter,
}

/// A metric family: name, help, type and the labels it adds to the base labels.
#[derive(Debug)]
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
}

/// One telemetry sample for the agent's batches (labels sorted by key).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub metric: &'static str,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

macro_rules! family {
    ($id:ident, $name:literal, $kind:ident, [$($label:literal),*], $help:literal) => {
        const $id: Family = Family { name: $name, help: $help, kind: Kind::$kind, labels: &[$($label),*] };
    };
}

// razar-native GPU families (labels gpu, uuid + these).
family!(
    N_MEM_TOTAL,
    "razar_gpu_memory_total_bytes",
    Gauge,
    [],
    "GPU memory (framebuffer) size."
);
family!(
    N_MEM_USED,
    "razar_gpu_memory_used_bytes",
    Gauge,
    [],
    "GPU memory in use, excluding reserved."
);
family!(
    N_MEM_FREE,
    "razar_gpu_memory_free_bytes",
    Gauge,
    [],
    "GPU memory free."
);
family!(
    N_MEM_RESERVED,
    "razar_gpu_memory_reserved_bytes",
    Gauge,
    [],
    "GPU memory reserved by the driver."
);
family!(
    N_UTIL,
    "razar_gpu_utilization_ratio",
    Gauge,
    ["engine"],
    "Share of the last sample period the engine was busy (0-1)."
);
family!(
    N_TEMP,
    "razar_gpu_temperature_celsius",
    Gauge,
    ["sensor"],
    "GPU temperature."
);
family!(
    N_POWER,
    "razar_gpu_power_watts",
    Gauge,
    [],
    "GPU power draw."
);
family!(
    N_POWER_LIMIT,
    "razar_gpu_power_limit_watts",
    Gauge,
    [],
    "Enforced GPU power limit."
);
family!(
    N_ENERGY,
    "razar_gpu_energy_joules_total",
    Counter,
    [],
    "Energy used since the driver loaded."
);
family!(
    N_CLOCK,
    "razar_gpu_clock_hertz",
    Gauge,
    ["clock"],
    "Current clock frequency."
);
family!(
    N_THROTTLE,
    "razar_gpu_throttle_reasons",
    Gauge,
    [],
    "NVML clocks throttle reason bitmask (0 = none)."
);
family!(
    N_PSTATE,
    "razar_gpu_performance_state",
    Gauge,
    [],
    "Performance state (0 = P0, maximum)."
);
family!(
    N_FAN,
    "razar_gpu_fan_speed_ratio",
    Gauge,
    ["fan"],
    "Fan speed as a share of maximum (0-1)."
);
family!(
    N_REPLAY,
    "razar_gpu_pcie_replays_total",
    Counter,
    [],
    "PCIe replay count."
);
family!(
    N_PCIE,
    "razar_gpu_pcie_bytes_per_second",
    Gauge,
    ["direction"],
    "PCIe throughput."
);
family!(
    N_ECC,
    "razar_gpu_ecc_errors_total",
    Counter,
    ["counter", "error"],
    "ECC errors: volatile (since driver load) or aggregate (lifetime)."
);
family!(
    N_RETIRED,
    "razar_gpu_retired_pages",
    Gauge,
    ["cause"],
    "Retired memory pages."
);
family!(
    N_REMAPPED,
    "razar_gpu_remapped_rows",
    Gauge,
    ["error"],
    "Remapped memory rows."
);
family!(
    N_REMAP_PENDING,
    "razar_gpu_row_remap_pending",
    Gauge,
    [],
    "1 when a row remap waits for a GPU reset."
);
family!(
    N_REMAP_FAILED,
    "razar_gpu_row_remap_failed",
    Gauge,
    [],
    "1 when a row remap failed."
);
family!(
    N_XID,
    "razar_gpu_xid_errors_total",
    Counter,
    ["xid", "class"],
    "XID errors seen since the agent started, per XID; class is NVIDIA's immediate resolution bucket (RESTART_APP, RESET_GPU, ...; UNKNOWN outside the catalog)."
);
family!(
    N_XID_SOURCES,
    "razar_gpu_xid_sources_total",
    Counter,
    ["source"],
    "XIDs seen since the agent started, by source: nvml, kernel_log, scenario; both: an NVML event and a kernel log line paired as one XID (also counted in each). Seen by one source alone: nvml - both, kernel_log - both."
);
family!(
    N_LOST,
    "razar_gpu_lost",
    Gauge,
    [],
    "1 when the GPU has fallen off the bus."
);

/// Native GPU families, in exposition order.
pub const NATIVE_GPU_FAMILIES: &[&Family] = &[
    &N_MEM_TOTAL,
    &N_MEM_USED,
    &N_MEM_FREE,
    &N_MEM_RESERVED,
    &N_UTIL,
    &N_TEMP,
    &N_POWER,
    &N_POWER_LIMIT,
    &N_ENERGY,
    &N_CLOCK,
    &N_THROTTLE,
    &N_PSTATE,
    &N_FAN,
    &N_REPLAY,
    &N_PCIE,
    &N_ECC,
    &N_RETIRED,
    &N_REMAPPED,
    &N_REMAP_PENDING,
    &N_REMAP_FAILED,
    &N_XID,
    &N_XID_SOURCES,
    &N_LOST,
];

// dcgm-exporter-compatible families (labels gpu, UUID, pci_bus_id, device, modelName, hostname).
family!(
    D_GPU_UTIL,
    "DCGM_FI_DEV_GPU_UTIL",
    Gauge,
    [],
    "GPU utilization (in %)."
);
family!(
    D_MEM_COPY_UTIL,
    "DCGM_FI_DEV_MEM_COPY_UTIL",
    Gauge,
    [],
    "Memory utilization (in %)."
);
family!(
    D_ENC_UTIL,
    "DCGM_FI_DEV_ENC_UTIL",
    Gauge,
    [],
    "Encoder utilization (in %)."
);
family!(
    D_DEC_UTIL,
    "DCGM_FI_DEV_DEC_UTIL",
    Gauge,
    [],
    "Decoder utilization (in %)."
);
family!(
    D_FB_FREE,
    "DCGM_FI_DEV_FB_FREE",
    Gauge,
    [],
    "Framebuffer memory free (in MiB)."
);
family!(
    D_FB_USED,
    "DCGM_FI_DEV_FB_USED",
    Gauge,
    [],
    "Framebuffer memory used (in MiB)."
);
family!(
    D_FB_RESERVED,
    "DCGM_FI_DEV_FB_RESERVED",
    Gauge,
    [],
    "Framebuffer memory reserved (in MiB)."
);
family!(
    D_GPU_TEMP,
    "DCGM_FI_DEV_GPU_TEMP",
    Gauge,
    [],
    "GPU temperature (in C)."
);
family!(
    D_MEM_TEMP,
    "DCGM_FI_DEV_MEMORY_TEMP",
    Gauge,
    [],
    "Memory temperature (in C)."
);
family!(
    D_POWER,
    "DCGM_FI_DEV_POWER_USAGE",
    Gauge,
    [],
    "Power draw (in W)."
);
family!(
    D_POWER_LIMIT,
    "DCGM_FI_DEV_ENFORCED_POWER_LIMIT",
    Gauge,
    [],
    "Enforced power limit (in W)."
);
family!(
    D_ENERGY,
    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
    Counter,
    [],
    "Total energy consumption since boot (in mJ)."
);
family!(
    D_SM_CLOCK,
    "DCGM_FI_DEV_SM_CLOCK",
    Gauge,
    [],
    "SM clock frequency (in MHz)."
);
family!(
    D_MEM_CLOCK,
    "DCGM_FI_DEV_MEM_CLOCK",
    Gauge,
    [],
    "Memory clock frequency (in MHz)."
);
family!(
    D_THROTTLE,
    "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS",
    Gauge,
    [],
    "Current clock throttle reasons (bitmask)."
);
family!(
    D_FAN,
    "DCGM_FI_DEV_FAN_SPEED",
    Gauge,
    [],
    "Fan speed (in %), mean over fans."
);
family!(
    D_REPLAY,
    "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
    Counter,
    [],
    "Total number of PCIe retries."
);
family!(
    D_PCIE_TX,
    "DCGM_FI_DEV_PCIE_TX_THROUGHPUT",
    Gauge,
    [],
    "PCIe Tx throughput (in KB/s)."
);
family!(
    D_PCIE_RX,
    "DCGM_FI_DEV_PCIE_RX_THROUGHPUT",
    Gauge,
    [],
    "PCIe Rx throughput (in KB/s)."
);
family!(
    D_SBE_VOL,
    "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL",
    Counter,
    [],
    "Total single-bit volatile ECC errors."
);
family!(
    D_DBE_VOL,
    "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
    Counter,
    [],
    "Total double-bit volatile ECC errors."
);
family!(
    D_SBE_AGG,
    "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL",
    Counter,
    [],
    "Total single-bit persistent ECC errors."
);
family!(
    D_DBE_AGG,
    "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL",
    Counter,
    [],
    "Total double-bit persistent ECC errors."
);
family!(
    D_RETIRED_SBE,
    "DCGM_FI_DEV_RETIRED_SBE",
    Gauge,
    [],
    "Total number of retired pages due to single-bit errors."
);
family!(
    D_RETIRED_DBE,
    "DCGM_FI_DEV_RETIRED_DBE",
    Gauge,
    [],
    "Total number of retired pages due to double-bit errors."
);
family!(
    D_REMAP_COR,
    "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
    Counter,
    [],
    "Number of remapped rows for correctable errors."
);
family!(
    D_REMAP_UNC,
    "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
    Counter,
    [],
    "Number of remapped rows for uncorrectable errors."
);
family!(
    D_REMAP_FAIL,
    "DCGM_FI_DEV_ROW_REMAP_FAILURE",
    Gauge,
    [],
    "Whether remapping of rows has failed."
);
family!(
    D_REMAP_PENDING,
    "DCGM_FI_DEV_ROW_REMAP_PENDING",
    Gauge,
    [],
    "Whether a row remap is pending."
);
family!(
    D_XID,
    "DCGM_FI_DEV_XID_ERRORS",
    Gauge,
    [],
    "Value of the last XID error encountered (see razar_gpu_xid_errors_total for counts)."
);

/// dcgm-exporter families, in exposition order.
pub const DCGM_FAMILIES: &[&Family] = &[
    &D_GPU_UTIL,
    &D_MEM_COPY_UTIL,
    &D_ENC_UTIL,
    &D_DEC_UTIL,
    &D_FB_FREE,
    &D_FB_USED,
    &D_FB_RESERVED,
    &D_GPU_TEMP,
    &D_MEM_TEMP,
    &D_POWER,
    &D_POWER_LIMIT,
    &D_ENERGY,
    &D_SM_CLOCK,
    &D_MEM_CLOCK,
    &D_THROTTLE,
    &D_FAN,
    &D_REPLAY,
    &D_PCIE_TX,
    &D_PCIE_RX,
    &D_SBE_VOL,
    &D_DBE_VOL,
    &D_SBE_AGG,
    &D_DBE_AGG,
    &D_RETIRED_SBE,
    &D_RETIRED_DBE,
    &D_REMAP_COR,
    &D_REMAP_UNC,
    &D_REMAP_FAIL,
    &D_REMAP_PENDING,
    &D_XID,
];

// Host families (no base labels).
family!(
    H_CPU,
    "razar_host_cpu_usage_ratio",
    Gauge,
    [],
    "CPU busy share over all cores (0-1)."
);
family!(
    H_CORE,
    "razar_host_cpu_core_usage_ratio",
    Gauge,
    ["core"],
    "CPU busy share per core (0-1)."
);
family!(
    H_MEM_TOTAL,
    "razar_host_memory_total_bytes",
    Gauge,
    [],
    "Host memory size."
);
family!(
    H_MEM_USED,
    "razar_host_memory_used_bytes",
    Gauge,
    [],
    "Host memory in use."
);
family!(
    H_MEM_AVAILABLE,
    "razar_host_memory_available_bytes",
    Gauge,
    [],
    "Host memory available."
);
family!(
    H_SWAP_TOTAL,
    "razar_host_swap_total_bytes",
    Gauge,
    [],
    "Swap size."
);
family!(
    H_SWAP_USED,
    "razar_host_swap_used_bytes",
    Gauge,
    [],
    "Swap in use."
);
family!(
    H_LOAD1,
    "razar_host_load1",
    Gauge,
    [],
    "Load average over 1 minute."
);
family!(
    H_LOAD5,
    "razar_host_load5",
    Gauge,
    [],
    "Load average over 5 minutes."
);
family!(
    H_LOAD15,
    "razar_host_load15",
    Gauge,
    [],
    "Load average over 15 minutes."
);
family!(
    H_DISK_TOTAL,
    "razar_host_disk_total_bytes",
    Gauge,
    ["mount"],
    "Filesystem size."
);
family!(
    H_DISK_AVAILABLE,
    "razar_host_disk_available_bytes",
    Gauge,
    ["mount"],
    "Filesystem space available."
);
family!(
    H_NET_RX,
    "razar_host_network_receive_bytes_total",
    Counter,
    ["interface"],
    "Bytes received since boot."
);
family!(
    H_NET_TX,
    "razar_host_network_transmit_bytes_total",
    Counter,
    ["interface"],
    "Bytes sent since boot."
);

/// Host families, in exposition order.
pub const HOST_FAMILIES: &[&Family] = &[
    &H_CPU,
    &H_CORE,
    &H_MEM_TOTAL,
    &H_MEM_USED,
    &H_MEM_AVAILABLE,
    &H_SWAP_TOTAL,
    &H_SWAP_USED,
    &H_LOAD1,
    &H_LOAD5,
    &H_LOAD15,
    &H_DISK_TOTAL,
    &H_DISK_AVAILABLE,
    &H_NET_RX,
    &H_NET_TX,
];

/// Receives one point: family, values of the family's own labels, value.
type Emit<'e> = dyn FnMut(&'static Family, &[&str], f64) + 'e;

const MIB: f64 = 1024.0 * 1024.0;

fn opt<T: Into<f64>>(
    emit: &mut Emit<'_>,
    family: &'static Family,
    labels: &[&str],
    value: Option<T>,
) {
    if let Some(v) = value {
        emit(family, labels, v.into());
    }
}

fn u64f(v: Option<u64>) -> Option<f64> {
    v.map(|v| v as f64)
}

fn native(r: &GpuReading, emit: &mut Emit<'_>) {
    emit(&N_LOST, &[], if r.lost { 1.0 } else { 0.0 });
    for (xid, count) in &r.xid_errors_total {
        emit(
            &N_XID,
            &[&xid.to_string(), crate::xid_catalog::bucket_name(*xid)],
            *count as f64,
        );
    }
    for (source, count) in &r.xid_sources_total {
        emit(&N_XID_SOURCES, &[source], *count as f64);
    }
    opt(emit, &N_MEM_TOTAL, &[], u64f(r.memory_total_bytes));
    opt(emit, &N_MEM_USED, &[], u64f(r.memory_used_bytes));
    opt(emit, &N_MEM_FREE, &[], u64f(r.memory_free_bytes));
    opt(emit, &N_MEM_RESERVED, &[], u64f(r.memory_reserved_bytes));
    let ratio = |p: Option<u32>| p.map(|p| f64::from(p) / 100.0);
    opt(emit, &N_UTIL, &["gpu"], ratio(r.utilization_gpu_percent));
    opt(
        emit,
        &N_UTIL,
        &["memory"],
        ratio(r.utilization_memory_percent),
    );
    opt(
        emit,
        &N_UTIL,
        &["encoder"],
        ratio(r.utilization_encoder_percent),
    );
    opt(
        emit,
        &N_UTIL,
        &["decoder"],
        ratio(r.utilization_decoder_percent),
    );
    opt(emit, &N_TEMP, &["gpu"], r.temperature_gpu_celsius);
    opt(emit, &N_TEMP, &["memory"], r.temperature_memory_celsius);
    let watts = |mw: Option<u32>| mw.map(|mw| f64::from(mw) / 1000.0);
    opt(emit, &N_POWER, &[], watts(r.power_usage_milliwatts));
    opt(emit, &N_POWER_LIMIT, &[], watts(r.power_limit_milliwatts));
    opt(
        emit,
        &N_ENERGY,
        &[],
        r.energy_millijoules.map(|mj| mj as f64 / 1000.0),
    );
    let hertz = |mhz: Option<u32>| mhz.map(|mhz| f64::from(mhz) * 1e6);
    opt(emit, &N_CLOCK, &["sm"], hertz(r.sm_clock_mhz));
    opt(emit, &N_CLOCK, &["memory"], hertz(r.memory_clock_mhz));
    opt(emit, &N_THROTTLE, &[], u64f(r.throttle_reasons));
    opt(emit, &N_PSTATE, &[], r.performance_state);
    for (fan, speed) in r.fan_speed_percent.iter().flatten().enumerate() {
        emit(&N_FAN, &[&fan.to_string()], f64::from(*speed) / 100.0);
    }
    opt(emit, &N_REPLAY, &[], u64f(r.pcie_replay_count));
    opt(emit, &N_PCIE, &["tx"], u64f(r.pcie_tx_bytes_per_second));
    opt(emit, &N_PCIE, &["rx"], u64f(r.pcie_rx_bytes_per_second));
    opt(
        emit,
        &N_ECC,
        &["volatile", "corrected"],
        u64f(r.ecc.volatile_corrected),
    );
    opt(
        emit,
        &N_ECC,
        &["volatile", "uncorrected"],
        u64f(r.ecc.volatile_uncorrected),
    );
    opt(
        emit,
        &N_ECC,
        &["aggregate", "corrected"],
        u64f(r.ecc.aggregate_corrected),
    );
    opt(
        emit,
        &N_ECC,
        &["aggregate", "uncorrected"],
        u64f(r.ecc.aggregate_uncorrected),
    );
    opt(
        emit,
        &N_RETIRED,
        &["single_bit"],
        u64f(r.retired_pages_single_bit),
    );
    opt(
        emit,
        &N_RETIRED,
        &["double_bit"],
        u64f(r.retired_pages_double_bit),
    );
    opt(
        emit,
        &N_REMAPPED,
        &["correctable"],
        u64f(r.remapped_rows_correctable),
    );
    opt(
        emit,
        &N_REMAPPED,
        &["uncorrectable"],
        u64f(r.remapped_rows_uncorrectable),
    );
    opt(emit, &N_REMAP_PENDING, &[], u64f(r.remapped_rows_pending));
    opt(emit, &N_REMAP_FAILED, &[], u64f(r.remapped_rows_failure));
}

fn dcgm(r: &GpuReading, emit: &mut Emit<'_>) {
    opt(emit, &D_GPU_UTIL, &[], r.utilization_gpu_percent);
    opt(emit, &D_MEM_COPY_UTIL, &[], r.utilization_memory_percent);
    opt(emit, &D_ENC_UTIL, &[], r.utilization_encoder_percent);
    opt(emit, &D_DEC_UTIL, &[], r.utilization_decoder_percent);
    let mib = |b: Option<u64>| b.map(|b| (b as f64 / MIB).floor());
    opt(emit, &D_FB_FREE, &[], mib(r.memory_free_bytes));
    opt(emit, &D_FB_USED, &[], mib(r.memory_used_bytes));
    opt(emit, &D_FB_RESERVED, &[], mib(r.memory_reserved_bytes));
    opt(emit, &D_GPU_TEMP, &[], r.temperature_gpu_celsius);
    opt(emit, &D_MEM_TEMP, &[], r.temperature_memory_celsius);
    let watts = |mw: Option<u32>| mw.map(|mw| f64::from(mw) / 1000.0);
    opt(emit, &D_POWER, &[], watts(r.power_usage_milliwatts));
    opt(emit, &D_POWER_LIMIT, &[], watts(r.power_limit_milliwatts));
    opt(emit, &D_ENERGY, &[], u64f(r.energy_millijoules));
    opt(emit, &D_SM_CLOCK, &[], r.sm_clock_mhz);
    opt(emit, &D_MEM_CLOCK, &[], r.memory_clock_mhz);
    opt(emit, &D_THROTTLE, &[], u64f(r.throttle_reasons));
    if let Some(fans) = r.fan_speed_percent.as_ref().filter(|f| !f.is_empty()) {
        let mean = fans.iter().map(|s| f64::from(*s)).sum::<f64>() / fans.len() as f64;
        emit(&D_FAN, &[], mean);
    }
    opt(emit, &D_REPLAY, &[], u64f(r.pcie_replay_count));
    let kb = |b: Option<u64>| b.map(|b| (b / 1024) as f64);
    opt(emit, &D_PCIE_TX, &[], kb(r.pcie_tx_bytes_per_second));
    opt(emit, &D_PCIE_RX, &[], kb(r.pcie_rx_bytes_per_second));
    opt(emit, &D_SBE_VOL, &[], u64f(r.ecc.volatile_corrected));
    opt(emit, &D_DBE_VOL, &[], u64f(r.ecc.volatile_uncorrected));
    opt(emit, &D_SBE_AGG, &[], u64f(r.ecc.aggregate_corrected));
    opt(emit, &D_DBE_AGG, &[], u64f(r.ecc.aggregate_uncorrected));
    opt(emit, &D_RETIRED_SBE, &[], u64f(r.retired_pages_single_bit));
    opt(emit, &D_RETIRED_DBE, &[], u64f(r.retired_pages_double_bit));
    opt(emit, &D_REMAP_COR, &[], u64f(r.remapped_rows_correctable));
    opt(emit, &D_REMAP_UNC, &[], u64f(r.remapped_rows_uncorrectable));
    opt(emit, &D_REMAP_FAIL, &[], u64f(r.remapped_rows_failure));
    opt(emit, &D_REMAP_PENDING, &[], u64f(r.remapped_rows_pending));
    opt(emit, &D_XID, &[], r.last_xid);
}

fn host(h: &HostReading, emit: &mut Emit<'_>) {
    emit(&H_CPU, &[], h.cpu_usage_ratio);
    for (core, usage) in h.cpu_per_core_ratio.iter().enumerate() {
        emit(&H_CORE, &[&core.to_string()], *usage);
    }
    emit(&H_MEM_TOTAL, &[], h.memory_total_bytes as f64);
    emit(&H_MEM_USED, &[], h.memory_used_bytes as f64);
    emit(&H_MEM_AVAILABLE, &[], h.memory_available_bytes as f64);
    emit(&H_SWAP_TOTAL, &[], h.swap_total_bytes as f64);
    emit(&H_SWAP_USED, &[], h.swap_used_bytes as f64);
    emit(&H_LOAD1, &[], h.load1);
    emit(&H_LOAD5, &[], h.load5);
    emit(&H_LOAD15, &[], h.load15);
    for d in &h.disks {
        emit(&H_DISK_TOTAL, &[&d.mount], d.total_bytes as f64);
        emit(&H_DISK_AVAILABLE, &[&d.mount], d.available_bytes as f64);
    }
    for n in &h.networks {
        emit(&H_NET_RX, &[&n.interface], n.received_bytes_total as f64);
        emit(&H_NET_TX, &[&n.interface], n.transmitted_bytes_total as f64);
    }
}

fn labelled(base: &[(&str, &str)], family: &Family, values: &[&str]) -> Vec<(String, String)> {
    let mut labels: Vec<(String, String)> = base
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .chain(
            family
                .labels
                .iter()
                .zip(values)
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        )
        .collect();
    labels.sort();
    labels
}

/// Native GPU samples (labels `gpu`, `uuid` and the family's own) for telemetry batches.
pub fn gpu_samples(readings: &[GpuReading], out: &mut Vec<Sample>) {
    for r in readings {
        let index = r.gpu.index.to_string();
        let base = [("gpu", index.as_str()), ("uuid", r.gpu.uuid.as_str())];
        native(r, &mut |family, values, value| {
            out.push(Sample {
                metric: family.name,
                labels: labelled(&base, family, values),
                value,
            });
        });
    }
}

/// Host samples for telemetry batches.
pub fn host_samples(reading: &HostReading, out: &mut Vec<Sample>) {
    host(reading, &mut |family, values, value| {
        out.push(Sample {
            metric: family.name,
            labels: labelled(&[], family, values),
            value,
        });
    });
}

#[derive(Debug, Default)]
struct Latest {
    gpus: Vec<GpuReading>,
    host: Option<HostReading>,
}

/// Serves the latest readings to a Prometheus registry. Clone it, register one clone,
/// and `update` through the other each tick; series of absent fields are not exported.
#[derive(Debug, Clone)]
pub struct TelemetryCollector {
    hostname: Arc<str>,
    hostname_label: HostnameLabel,
    descs: Arc<Vec<Desc>>,
    latest: Arc<Mutex<Latest>>,
}

/// The name of the host label on `DCGM_FI_DEV_*` series. dcgm-exporter's main branch
/// writes `hostname` (since its #655); its releases up to 4.5.3-4.8.2 write `Hostname`,
/// which dashboards built on those releases expect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostnameLabel {
    /// `hostname` (dcgm-exporter's main branch; the default).
    #[default]
    Lower,
    /// `Hostname` (dcgm-exporter releases up to 4.5.3-4.8.2).
    Capitalized,
}

impl HostnameLabel {
    pub fn as_str(self) -> &'static str {
        match self {
            HostnameLabel::Lower => "hostname",
            HostnameLabel::Capitalized => "Hostname",
        }
    }

    /// From a config value: exactly `hostname` or `Hostname`.
    pub fn parse(value: &str) -> Option<HostnameLabel> {
        match value {
            "hostname" => Some(HostnameLabel::Lower),
            "Hostname" => Some(HostnameLabel::Capitalized),
            _ => None,
        }
    }
}

/// dcgm-exporter's per-GPU labels, in its order; the host label's name is chosen by
/// [`HostnameLabel`] and follows them, then the driver version (empty when unknown).
const DCGM_LABELS: [&str; 5] = ["gpu", "UUID", "pci_bus_id", "device", "modelName"];
const DCGM_DRIVER_LABEL: &str = "DCGM_FI_DRIVER_VERSION";
const NATIVE_LABELS: [&str; 2] = ["gpu", "uuid"];

impl TelemetryCollector {
    /// A collector whose dcgm-compatible series carry `hostname` (the default label).
    pub fn new(hostname: &str) -> Result<TelemetryCollector, prometheus::Error> {
        TelemetryCollector::with_hostname_label(hostname, HostnameLabel::default())
    }

    /// A collector whose dcgm-compatible series name the host label as `label` says.
    pub fn with_hostname_label(
        hostname: &str,
        label: HostnameLabel,
    ) -> Result<TelemetryCollector, prometheus::Error> {
        let mut descs = Vec::new();
        let mut dcgm_labels = DCGM_LABELS.to_vec();
        dcgm_labels.push(label.as_str());
        dcgm_labels.push(DCGM_DRIVER_LABEL);
        let groups: [(&[&Family], &[&str]); 3] = [
            (NATIVE_GPU_FAMILIES, &NATIVE_LABELS),
            (DCGM_FAMILIES, &dcgm_labels),
            (HOST_FAMILIES, &[]),
        ];
        for (families, base) in groups {
            for family in families {
                let labels = base
                    .iter()
                    .chain(family.labels)
                    .map(|l| (*l).to_owned())
                    .collect();
                descs.push(Desc::new(
                    family.name.to_owned(),
                    family.help.to_owned(),
                    labels,
                    Default::default(),
                )?);
            }
        }
        Ok(TelemetryCollector {
            hostname: hostname.into(),
            hostname_label: label,
            descs: Arc::new(descs),
            latest: Arc::new(Mutex::new(Latest::default())),
        })
    }

    pub fn update_gpus(&self, readings: &[GpuReading]) {
        self.latest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .gpus = readings.to_vec();
    }

    pub fn update_host(&self, reading: &HostReading) {
        self.latest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .host = Some(reading.clone());
    }
}

fn metric(labels: &[(&str, &str)], family: &Family, values: &[&str], value: f64) -> Metric {
    let mut pairs: Vec<LabelPair> = labels
        .iter()
        .copied()
        .chain(family.labels.iter().copied().zip(values.iter().copied()))
        .map(|(k, v)| {
            let mut pair = LabelPair::default();
            pair.set_name(k.to_owned());
            pair.set_value(v.to_owned());
            pair
        })
        .collect();
    pairs.sort_by(|a, b| a.name().cmp(b.name()));
    let mut m = Metric::default();
    m.set_label(pairs);
    match family.kind {
        Kind::Gauge => {
            let mut g = Gauge::default();
            g.set_value(value);
            m.set_gauge(g);
        }
        Kind::Counter => {
            let mut c = Counter::default();
            c.set_value(value);
            m.set_counter(c);
        }
    }
    m
}

impl Collector for TelemetryCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let latest = self.latest.lock().unwrap_or_else(PoisonError::into_inner);
        let mut by_name: BTreeMap<&'static str, (&'static Family, Vec<Metric>)> = BTreeMap::new();
        let mut add =
            |family: &'static Family, labels: &[(&str, &str)], values: &[&str], value: f64| {
                by_name
                    .entry(family.name)
                    .or_insert_with(|| (family, Vec::new()))
                    .1
                    .push(metric(labels, family, values, value));
            };
        for r in &latest.gpus {
            let (index, device) = (r.gpu.index.to_string(), r.gpu.device());
            let native_labels = [("gpu", index.as_str()), ("uuid", r.gpu.uuid.as_str())];
            native(r, &mut |f, v, x| add(f, &native_labels, v, x));
            let dcgm_labels = [
                ("gpu", index.as_str()),
                ("UUID", r.gpu.uuid.as_str()),
                ("pci_bus_id", r.gpu.pci_bus_id.as_str()),
                ("device", device.as_str()),
                ("modelName", r.gpu.name.as_str()),
                (self.hostname_label.as_str(), &*self.hostname),
                (
                    DCGM_DRIVER_LABEL,
                    r.gpu.driver_version.as_deref().unwrap_or(""),
                ),
            ];
            dcgm(r, &mut |f, v, x| add(f, &dcgm_labels, v, x));
        }
        if let Some(h) = &latest.host {
            host(h, &mut |f, v, x| add(f, &[], v, x));
        }
        by_name
            .into_values()
            .map(|(family, metrics)| {
                let mut mf = MetricFamily::default();
                mf.set_name(family.name.to_owned());
                mf.set_help(family.help.to_owned());
                mf.set_field_type(match family.kind {
                    Kind::Gauge => MetricType::GAUGE,
                    Kind::Counter => MetricType::COUNTER,
                });
                mf.set_metric(metrics);
                mf
            })
            .collect()
    }
}
