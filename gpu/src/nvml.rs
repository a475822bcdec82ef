//! The NVML [`GpuSource`]: nvml-wrapper with the library loaded at run time, one
//! watcher thread on an NVML event set (XIDs, double-bit ECC) and one on the kernel
//! log (`NVRM: Xid` lines, since an event set keeps only the last event between waits).

use crate::kernel_log::{
    parse_kmsg_header, parse_xid_line, KernelLogTail, KmsgFilter, LineClass, PciAddress,
};
use crate::ledger::Ledger;
use crate::reading::{
    now_ms, GpuEvent, GpuIdentity, GpuProcess, GpuProcesses, GpuReading, UsedMemory, XidOrigin,
};
use crate::{GpuError, GpuSource};
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{
    Clock, EccCounter, MemoryError, PcieUtilCounter, RetirementCause, TemperatureSensor,
};
use nvml_wrapper::enums::device::{SampleValue, UsedGpuMemory};
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::struct_wrappers::device::FieldValueSample;
use nvml_wrapper::structs::device::FieldId;
use nvml_wrapper::{Device, EventSet, Nvml};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// NVML field ids read through `nvmlDeviceGetFieldValues` (stable numbering below 251).
const FI_MEMORY_TEMP: u32 = 82;
const FI_REMAPPED_COR: u32 = 142;
const FI_REMAPPED_UNC: u32 = 143;
const FI_REMAPPED_PENDING: u32 = 144;
const FI_REMAPPED_FAILURE: u32 = 145;
const FIELD_IDS: [FieldId; 5] = [
    FieldId(FI_MEMORY_TEMP),
    FieldId(FI_REMAPPED_COR),
    FieldId(FI_REMAPPED_UNC),
    FieldId(FI_REMAPPED_PENDING),
    FieldId(FI_REMAPPED_FAILURE),
];

/// How the NVML source is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmlOptions {
    /// Library to load instead of the system's `libnvidia-ml.so`.
    pub library_path: Option<PathBuf>,
    /// Kernel log to read `NVRM: Xid` lines from (`/dev/kmsg`, or a file); `None` for none.
    pub kernel_log: Option<PathBuf>,
    /// Whether to run the NVML event-set watcher.
    pub events: bool,
    /// Longest single `nvmlEventSetWait`; also bounds how long dropping the source takes.
    pub event_wait: Duration,
    /// The kernel log record (kmsg sequence number) an earlier run of this boot reported
    /// up to: records up to it are not reported again. `None`: every record is new to us
    /// (first run, or a reboot). Records written before the source opened are reported
    /// once as historical events at their own time.
    pub kernel_log_after: Option<u64>,
    /// How often the kernel log is read.
    pub kernel_log_poll: Duration,
    /// An NVML event and a kernel log line for the same GPU and XID this close are one XID.
    pub dedupe_window: Duration,
}

impl Default for NvmlOptions {
    fn default() -> Self {
        NvmlOptions {
            library_path: None,
            kernel_log: Some(PathBuf::from("/dev/kmsg")),
            events: true,
            event_wait: Duration::from_millis(500),
            kernel_log_after: None,
            kernel_log_poll: Duration::from_millis(200),
            dedupe_window: Duration::from_secs(5),
        }
    }
}

/// The NVML calls a GPU may not support; an unsupported one is not asked again.
#[derive(Debug, Clone, Copy)]
enum Call {
    Memory,
    Utilization,
    Encoder,
    Decoder,
    Temperature,
    FieldValues,
    Power,
    PowerLimit,
    Energy,
    SmClock,
    MemoryClock,
    Throttle,
    PerformanceState,
    FanSpeed,
    PcieReplay,
    PcieTx,
    PcieRx,
    EccVolatileCorrected,
    EccVolatileUncorrected,
    EccAggregateCorrected,
    EccAggregateUncorrected,
    RetiredSingleBit,
    RetiredDoubleBit,
    Processes,
}

#[derive(Debug)]
struct Slot {
    identity: Arc<GpuIdentity>,
    /// Bit per [`Call`] that answered not supported / not found.
    unsupported: u64,
    fans_supported: bool,
}

/// One GPU's calls within a tick: skips unsupported calls and stops at GPU_IS_LOST.
struct Probe<'s> {
    slot: &'s mut Slot,
    lost: bool,
}

impl Probe<'_> {
    fn get<T>(&mut self, call: Call, read: impl FnOnce() -> Result<T, NvmlError>) -> Option<T> {
        let bit = 1u64 << call as u32;
        if self.lost || self.slot.unsupported & bit != 0 {
            return None;
        }
        match read() {
            Ok(value) => Some(value),
            Err(error) => {
                self.settle(bit, call, &error);
                None
            }
        }
    }

    fn settle(&mut self, bit: u64, call: Call, error: &NvmlError) {
        match error {
            NvmlError::NotSupported
            | NvmlError::FunctionNotFound
            | NvmlError::FailedToLoadSymbol(_) => {
                self.slot.unsupported |= bit;
                tracing::debug!(gpu = self.slot.identity.index, ?call, %error, "not supported; not asked again");
            }
            NvmlError::GpuLost => self.lost = true,
            _ => tracing::debug!(gpu = self.slot.identity.index, ?call, %error, "NVML call failed"),
        }
    }
}

/// GPU telemetry through NVML.
pub struct NvmlSource {
    nvml: Arc<Nvml>,
    slots: Vec<Slot>,
    identities: Vec<GpuIdentity>,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    event_sets: Arc<AtomicU64>,
    /// Why the kernel log cannot be read (`None` while it can, or none is configured).
    kernel_log_problem: Arc<Mutex<Option<String>>>,
}

impl std::fmt::Debug for NvmlSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlSource")
            .field("gpus", &self.identities.len())
            .finish()
    }
}

fn lock(ledger: &Mutex<Ledger>) -> MutexGuard<'_, Ledger> {
    ledger.lock().unwrap_or_else(PoisonError::into_inner)
}

fn lock_problem(problem: &Mutex<Option<String>>) -> MutexGuard<'_, Option<String>> {
    problem.lock().unwrap_or_else(PoisonError::into_inner)
}

impl NvmlSource {
    /// Loads NVML, reads the inventory and starts the watcher threads.
    ///
    /// Fails with [`GpuError::NoNvml`] when the library cannot be loaded or initialised
    /// (no driver): the agent then runs on without GPUs.
    pub fn open(options: &NvmlOptions) -> Result<NvmlSource, GpuError> {
        let mut builder = Nvml::builder();
        if let Some(path) = &options.library_path {
            builder.lib_path(path.as_os_str());
        }
        let nvml = Arc::new(builder.init().map_err(|e| GpuError::NoNvml {
            reason: e.to_string(),
        })?);
        let count = nvml.device_count().map_err(|source| GpuError::Nvml {
            call: "device_count",
            source,
        })?;
        let driver_version = nvml.sys_driver_version().ok();
        let ledger = Arc::new(Mutex::new(Ledger::new(
            count as usize,
            options.dedupe_window,
        )));
        let mut slots = Vec::with_capacity(count as usize);
        for index in 0..count {
            let (slot, lost) = identify(&nvml, index, driver_version.clone());
            if lost {
                lock(&ledger).mark_lost(index, now_ms());
            }
            slots.push(slot);
        }
        let identities: Vec<GpuIdentity> = slots
            .iter()
            .map(|s| GpuIdentity::clone(&s.identity))
            .collect();
        let mut source = NvmlSource {
            nvml,
            slots,
            identities,
            ledger,
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            event_sets: Arc::new(AtomicU64::new(0)),
            kernel_log_problem: Arc::new(Mutex::new(None)),
        };
        source.start_watchers(options)?;
        Ok(source)
    }

    fn start_watchers(&mut self, options: &NvmlOptions) -> Result<(), GpuError> {
        if options.events && !self.slots.is_empty() {
            let watcher = EventWatcher {
                nvml: self.nvml.clone(),
                gpus: self.slots.len() as u32,
                ledger: self.ledger.clone(),
                stop: self.stop.clone(),
                wait: options.event_wait,
                built: self.event_sets.clone(),
            };
            let (ready_tx, ready) = std::sync::mpsc::sync_channel(1);
            let thread = std::thread::Builder::new()
                .name("razar-nvml-events".into())
                .spawn(move || watcher.run(ready_tx))
                .map_err(|source| GpuError::Thread {
                    name: "razar-nvml-events",
                    source,
                })?;
            self.threads.push(thread);
            // Events are watched once `open` returns (or the watcher gave up).
            if ready.recv_timeout(Duration::from_secs(5)).is_err() {
                tracing::warn!("NVML event watcher slow to start");
            }
        }
        if let Some(path) = &options.kernel_log {
            let tail = KernelLogTail::from_start(path);
            let filter = KmsgFilter::new(
                options.kernel_log_after,
                crate::kernel_log::uptime_us().unwrap_or(u64::MAX),
                now_ms(),
            );
            *lock_problem(&self.kernel_log_problem) = tail.problem().map(str::to_owned);
            let problem = self.kernel_log_problem.clone();
            let addresses: Vec<Option<PciAddress>> = self
                .identities
                .iter()
                .map(|g| PciAddress::parse(&g.pci_bus_id))
                .collect();
            let (ledger, stop, poll) = (
                self.ledger.clone(),
                self.stop.clone(),
                options.kernel_log_poll,
            );
            let thread = std::thread::Builder::new()
                .name("razar-kernel-log".into())
                .spawn(move || {
                    watch_kernel_log(tail, filter, &addresses, &ledger, &problem, &stop, poll)
                })
                .map_err(|source| GpuError::Thread {
                    name: "razar-kernel-log",
                    source,
                })?;
            self.threads.push(thread);
        }
        Ok(())
    }

    /// XIDs seen both as an NVML event and a kernel log line, and counted once.
    pub fn xid_twins(&self) -> u64 {
        lock(&self.ledger).twins()
    }

    /// Event sets registered so far (a lost GPU makes the watcher build a new one).
    pub fn event_sets_built(&self) -> u64 {
        self.event_sets.load(Ordering::Relaxed)
    }

    /// Events dropped because `poll_events` was not called often enough.
    pub fn dropped_events(&self) -> u64 {
        lock(&self.ledger).dropped()
    }

    fn read(nvml: &Nvml, slot: &mut Slot, ledger: &Mutex<Ledger>) -> GpuReading {
        let index = slot.identity.index;
        let mut reading = GpuReading::empty(slot.identity.clone());
        if lock(ledger).is_lost(index) {
            reading.lost = true;
        } else {
            match nvml.device_by_index(index) {
                Ok(device) => {
                    let mut probe = Probe { slot, lost: false };
                    fill(&device, &mut probe, &mut reading);
                    if probe.lost {
                        lock(ledger).mark_lost(index, now_ms());
                        reading = GpuReading::empty(reading.gpu);
                        reading.lost = true;
                    }
                }
                Err(NvmlError::GpuLost) => {
                    lock(ledger).mark_lost(index, now_ms());
                    reading.lost = true;
                }
                Err(error) => tracing::debug!(gpu = index, %error, "device handle"),
            }
        }
        let ledger = lock(ledger);
        reading.xid_errors_total = ledger.xid_counts(index);
        reading.xid_sources_total = ledger.xid_sources(index);
        reading.last_xid = ledger.last_xid(index);
        reading
    }
}

impl Drop for NvmlSource {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                tracing::warn!("a GPU watcher thread panicked");
            }
        }
    }
}

/// Reads a GPU's identity; the bool says it answered GPU_IS_LOST.
fn identify(nvml: &Nvml, index: u32, driver_version: Option<String>) -> (Slot, bool) {
    let mut identity = GpuIdentity {
        index,
        uuid: format!("unknown-{index}"),
        name: "unknown".to_owned(),
        pci_bus_id: String::new(),
        serial: None,
        driver_version,
        memory_total_bytes: None,
        fans: 0,
    };
    let mut lost = false;
    let mut fans_supported = false;
    match nvml.device_by_index(index) {
        Ok(device) => {
            let mut keep = |target: &mut String, value: Result<String, NvmlError>| match value {
                Ok(v) => *target = v,
                Err(e) => lost |= matches!(e, NvmlError::GpuLost),
            };
            keep(&mut identity.uuid, device.uuid());
            keep(&mut identity.name, device.name());
            keep(
                &mut identity.pci_bus_id,
                device.pci_info().map(|p| p.bus_id),
            );
            identity.serial = device.serial().ok();
            identity.memory_total_bytes = device.memory_info().ok().map(|m| m.total);
            if let Ok(fans) = device.num_fans() {
                identity.fans = fans;
                fans_supported = true;
            }
        }
        Err(error) => {
            lost = matches!(error, NvmlError::GpuLost);
            tracing::warn!(gpu = index, %error, "cannot open GPU");
        }
    }
    let slot = Slot {
        identity: Arc::new(identity),
        unsupported: 0,
        fans_supported,
    };
    (slot, lost)
}

fn fill(device: &Device<'_>, p: &mut Probe<'_>, r: &mut GpuReading) {
    if let Some(m) = p.get(Call::Memory, || device.memory_info()) {
        r.memory_total_bytes = Some(m.total);
        r.memory_used_bytes = Some(m.used);
        r.memory_free_bytes = Some(m.free);
        r.memory_reserved_bytes = Some(m.reserved);
    }
    if let Some(u) = p.get(Call::Utilization, || device.utilization_rates()) {
        r.utilization_gpu_percent = Some(u.gpu);
        r.utilization_memory_percent = Some(u.memory);
    }
    r.utilization_encoder_percent = p
        .get(Call::Encoder, || device.encoder_utilization())
        .map(|u| u.utilization);
    r.utilization_decoder_percent = p
        .get(Call::Decoder, || device.decoder_utilization())
        .map(|u| u.utilization);
    r.temperature_gpu_celsius = p.get(Call::Temperature, || {
        device.temperature(TemperatureSensor::Gpu)
    });
    if let Some(values) = p.get(Call::FieldValues, || device.field_values_for(&FIELD_IDS)) {
        for sample in values.into_iter().flatten() {
            let FieldValueSample { field, value, .. } = sample;
            let Some(v) = value.ok().and_then(sample_u64) else {
                continue;
            };
            match field.0 {
                FI_MEMORY_TEMP => r.temperature_memory_celsius = u32::try_from(v).ok(),
                FI_REMAPPED_COR => r.remapped_rows_correctable = Some(v),
                FI_REMAPPED_UNC => r.remapped_rows_uncorrectable = Some(v),
                FI_REMAPPED_PENDING => r.remapped_rows_pending = Some(v),
                FI_REMAPPED_FAILURE => r.remapped_rows_failure = Some(v),
                _ => {}
            }
        }
    }
    r.power_usage_milliwatts = p.get(Call::Power, || device.power_usage());
    r.power_limit_milliwatts = p.get(Call::PowerLimit, || device.enforced_power_limit());
    r.energy_millijoules = p.get(Call::Energy, || device.total_energy_consumption());
    r.sm_clock_mhz = p.get(Call::SmClock, || device.clock_info(Clock::SM));
    r.memory_clock_mhz = p.get(Call::MemoryClock, || device.clock_info(Clock::Memory));
    r.throttle_reasons = p
        .get(Call::Throttle, || device.current_throttle_reasons())
        .map(|t| t.bits());
    r.performance_state = p
        .get(Call::PerformanceState, || device.performance_state())
        .map(|s| s.as_c())
        .filter(|s| *s <= 15);
    if p.slot.fans_supported {
        let fans = p.slot.identity.fans;
        let mut speeds = Vec::with_capacity(fans as usize);
        for fan in 0..fans {
            match p.get(Call::FanSpeed, || device.fan_speed(fan)) {
                Some(speed) => speeds.push(speed),
                None => break,
            }
        }
        r.fan_speed_percent = (speeds.len() == fans as usize).then_some(speeds);
    }
    r.pcie_replay_count = p
        .get(Call::PcieReplay, || device.pcie_replay_counter())
        .map(u64::from);
    r.pcie_tx_bytes_per_second = p
        .get(Call::PcieTx, || {
            device.pcie_throughput(PcieUtilCounter::Send)
        })
        .map(|kb| u64::from(kb) * 1024);
    r.pcie_rx_bytes_per_second = p
        .get(Call::PcieRx, || {
            device.pcie_throughput(PcieUtilCounter::Receive)
        })
        .map(|kb| u64::from(kb) * 1024);
    let ecc = |p: &mut Probe<'_>, call, error, counter| {
        p.get(call, || device.total_ecc_errors(error, counter))
    };
    r.ecc.volatile_corrected = ecc(
        p,
        Call::EccVolatileCorrected,
        MemoryError::Corrected,
        EccCounter::Volatile,
    );
    r.ecc.volatile_uncorrected = ecc(
        p,
        Call::EccVolatileUncorrected,
        MemoryError::Uncorrected,
        EccCounter::Volatile,
    );
    r.ecc.aggregate_corrected = ecc(
        p,
        Call::EccAggregateCorrected,
        MemoryError::Corrected,
        EccCounter::Aggregate,
    );
    r.ecc.aggregate_uncorrected = ecc(
        p,
        Call::EccAggregateUncorrected,
        MemoryError::Uncorrected,
        EccCounter::Aggregate,
    );
    r.retired_pages_single_bit = p
        .get(Call::RetiredSingleBit, || {
            device.retired_pages(RetirementCause::MultipleSingleBitEccErrors)
        })
        .map(|pages| pages.len() as u64);
    r.retired_pages_double_bit = p
        .get(Call::RetiredDoubleBit, || {
            device.retired_pages(RetirementCause::DoubleBitEccError)
        })
        .map(|pages| pages.len() as u64);
}

fn sample_u64(value: SampleValue) -> Option<u64> {
    match value {
        SampleValue::U32(v) => Some(u64::from(v)),
        SampleValue::U64(v) => Some(v),
        SampleValue::I64(v) => u64::try_from(v).ok(),
        SampleValue::F64(v) if v.is_finite() && v >= 0.0 => Some(v as u64),
        SampleValue::F64(_) => None,
    }
}

impl GpuSource for NvmlSource {
    fn inventory(&self) -> &[GpuIdentity] {
        &self.identities
    }

    fn sample(&mut self) -> Result<Vec<GpuReading>, GpuError> {
        let (nvml, ledger) = (&self.nvml, &self.ledger);
        Ok(self
            .slots
            .iter_mut()
            .map(|slot| NvmlSource::read(nvml, slot, ledger))
            .collect())
    }

    fn processes(&mut self) -> Result<Vec<GpuProcesses>, GpuError> {
        let mut all = Vec::with_capacity(self.slots.len());
        for slot in &mut self.slots {
            let index = slot.identity.index;
            if lock(&self.ledger).is_lost(index) {
                continue;
            }
            let device = match self.nvml.device_by_index(index) {
                Ok(device) => device,
                Err(NvmlError::GpuLost) => {
                    lock(&self.ledger).mark_lost(index, now_ms());
                    continue;
                }
                Err(_) => continue,
            };
            let mut probe = Probe { slot, lost: false };
            let found = probe.get(Call::Processes, || device.running_compute_processes());
            if probe.lost {
                lock(&self.ledger).mark_lost(index, now_ms());
                continue;
            }
            if let Some(found) = found {
                all.push(GpuProcesses {
                    gpu_index: index,
                    processes: found
                        .into_iter()
                        .map(|p| GpuProcess {
                            pid: p.pid,
                            used_memory: match p.used_gpu_memory {
                                UsedGpuMemory::Used(bytes) => UsedMemory::Bytes(bytes),
                                UsedGpuMemory::Unavailable => UsedMemory::Unavailable,
                            },
                        })
                        .collect(),
                });
            }
        }
        Ok(all)
    }

    fn poll_events(&mut self) -> Vec<GpuEvent> {
        lock(&self.ledger).drain()
    }

    fn set_event_waker(&mut self, waker: crate::EventWaker) {
        let mut ledger = lock(&self.ledger);
        // Events queued before the waker was set are not left waiting for a poll.
        let queued = !ledger.is_empty();
        ledger.set_waker(waker.clone());
        if queued {
            waker.wake();
        }
    }

    fn kernel_log_reported(&self) -> Option<u64> {
        lock(&self.ledger).kernel_log_drained()
    }

    fn degraded(&self) -> Option<String> {
        lock_problem(&self.kernel_log_problem).as_ref().map(|p| {
            format!("kernel log {p}: XIDs that arrive together can be lost (NVML keeps only the latest)")
        })
    }
}

/// Sleeps up to `total`, in slices, returning early (true) once `stop` is set.
fn sleep_or_stop(stop: &AtomicBool, total: Duration) -> bool {
    let deadline = Instant::now() + total;
    while !stop.load(Ordering::Relaxed) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
    true
}

/// Waits on an NVML event set for XIDs and double-bit ECC errors.
struct EventWatcher {
    nvml: Arc<Nvml>,
    gpus: u32,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<AtomicBool>,
    wait: Duration,
    built: Arc<AtomicU64>,
}

const WATCHED: EventTypes = EventTypes::CRITICAL_XID_ERROR.union(EventTypes::DOUBLE_BIT_ECC_ERROR);

impl EventWatcher {
    fn run(self, ready: std::sync::mpsc::SyncSender<()>) {
        // GPUs that cannot register events (unsupported) or are lost.
        let mut excluded = BTreeSet::new();
        let mut ready = Some(ready);
        while !self.stop.load(Ordering::Relaxed) {
            let outcome = self.build_set(&mut excluded);
            if let Some(ready) = ready.take() {
                let _ = ready.send(());
            }
            match outcome {
                SetOutcome::Ready(set) => self.wait_on(&set),
                SetOutcome::Retry => {
                    if sleep_or_stop(&self.stop, self.wait) {
                        return;
                    }
                }
                SetOutcome::Nothing => return,
            }
        }
    }

    fn build_set(&self, excluded: &mut BTreeSet<u32>) -> SetOutcome<'_> {
        'build: loop {
            let mut set = match self.nvml.create_event_set() {
                Ok(set) => set,
                Err(error) => {
                    tracing::warn!(%error, "NVML event set unavailable; XIDs come from the kernel log only");
                    return match error {
                        NvmlError::NotSupported
                        | NvmlError::FunctionNotFound
                        | NvmlError::FailedToLoadSymbol(_) => SetOutcome::Nothing,
                        _ => SetOutcome::Retry,
                    };
                }
            };
            let mut registered = 0;
            for index in 0..self.gpus {
                if excluded.contains(&index) || lock(&self.ledger).is_lost(index) {
                    continue;
                }
                let device = match self.nvml.device_by_index(index) {
                    Ok(device) => device,
                    Err(error) => {
                        self.exclude(excluded, index, &error);
                        continue 'build;
                    }
                };
                set = match device.register_events(WATCHED, set) {
                    Ok(set) => set,
                    Err(error) => {
                        // The wrapper released the set: build a new one without this GPU.
                        self.exclude(excluded, index, &error.error);
                        continue 'build;
                    }
                };
                registered += 1;
            }
            if registered == 0 {
                return SetOutcome::Nothing;
            }
            self.built.fetch_add(1, Ordering::Relaxed);
            return SetOutcome::Ready(set);
        }
    }

    fn exclude(&self, excluded: &mut BTreeSet<u32>, index: u32, error: &NvmlError) {
        if matches!(error, NvmlError::GpuLost) {
            lock(&self.ledger).mark_lost(index, now_ms());
        } else {
            tracing::warn!(gpu = index, %error, "GPU events unavailable; its XIDs come from the kernel log only");
        }
        excluded.insert(index);
    }

    /// Waits on `set` until stopped or a GPU is lost (then the set must be rebuilt).
    fn wait_on(&self, set: &EventSet<'_>) {
        let wait_ms = u32::try_from(self.wait.as_millis()).unwrap_or(u32::MAX);
        while !self.stop.load(Ordering::Relaxed) {
            match set.wait(wait_ms) {
                Ok(data) => {
                    let Ok(index) = data.device.index() else {
                        tracing::warn!("event from a device without index");
                        continue;
                    };
                    let mut ledger = lock(&self.ledger);
                    if data.event_type.contains(EventTypes::CRITICAL_XID_ERROR) {
                        let xid = match data.event_data {
                            Some(XidError::Value(xid)) => u32::try_from(xid).unwrap_or(u32::MAX),
                            Some(XidError::Unknown) | None => 999,
                        };
                        ledger.record_xid(index, xid, XidOrigin::Nvml, Instant::now(), now_ms());
                    }
                    if data.event_type.contains(EventTypes::DOUBLE_BIT_ECC_ERROR) {
                        ledger.record_double_bit_ecc(index, now_ms());
                    }
                }
                Err(NvmlError::Timeout) => {}
                Err(NvmlError::GpuLost) => {
                    self.find_lost();
                    return;
                }
                Err(error) => {
                    tracing::warn!(%error, "NVML event wait failed");
                    if sleep_or_stop(&self.stop, self.wait) {
                        return;
                    }
                }
            }
        }
    }

    /// The wait does not say which GPU is lost: ask each one.
    fn find_lost(&self) {
        for index in 0..self.gpus {
            if lock(&self.ledger).is_lost(index) {
                continue;
            }
            let lost = match self.nvml.device_by_index(index) {
                Ok(device) => matches!(device.memory_info(), Err(NvmlError::GpuLost)),
                Err(error) => matches!(error, NvmlError::GpuLost),
            };
            if lost {
                lock(&self.ledger).mark_lost(index, now_ms());
            }
        }
    }
}

enum SetOutcome<'n> {
    Ready(EventSet<'n>),
    Retry,
    Nothing,
}

fn watch_kernel_log(
    mut tail: KernelLogTail,
    mut filter: KmsgFilter,
    addresses: &[Option<PciAddress>],
    ledger: &Mutex<Ledger>,
    problem: &Mutex<Option<String>>,
    stop: &AtomicBool,
    poll: Duration,
) {
    let mut unknown_logged = BTreeSet::new();
    loop {
        tail.poll_lines(|line, old| {
            let class = filter.classify(line, old);
            let seq = parse_kmsg_header(line).map(|(seq, _)| seq);
            let seen = match class {
                LineClass::Skip => None,
                _ => parse_xid_line(line),
            };
            let Some(seen) = seen else {
                if let Some(seq) = seq {
                    lock(ledger).kernel_log_read(seq);
                }
                return;
            };
            match addresses.iter().position(|a| *a == Some(seen.pci)) {
                Some(index) => {
                    // One lock: the record is read exactly when its XID is queued.
                    let mut ledger = lock(ledger);
                    match class {
                        LineClass::Historical { ts_ms } => {
                            ledger.record_historical_xid(index as u32, seen.xid, ts_ms);
                        }
                        _ => {
                            ledger.record_xid(
                                index as u32,
                                seen.xid,
                                XidOrigin::KernelLog,
                                Instant::now(),
                                now_ms(),
                            );
                        }
                    }
                    if let Some(seq) = seq {
                        ledger.kernel_log_read(seq);
                    }
                }
                None => {
                    if let Some(seq) = seq {
                        lock(ledger).kernel_log_read(seq);
                    }
                    if unknown_logged.insert((seen.pci.domain, seen.pci.bus, seen.pci.device)) {
                        tracing::warn!(
                            xid = seen.xid,
                            line,
                            "XID on a PCI address NVML does not list"
                        );
                    }
                }
            }
        });
        let now = tail.problem();
        let mut shared = lock_problem(problem);
        if shared.as_deref() != now {
            *shared = now.map(str::to_owned);
        }
        drop(shared);
        if sleep_or_stop(stop, poll) {
            return;
        }
    }
}
