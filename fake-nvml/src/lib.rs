//! A fake `libnvidia-ml.so.1`: exports the NVML C symbols the agent uses and answers
//! them from a scenario file (see `razar_gpu::scenario`), so the real nvml-wrapper
//! code path runs without a GPU.
//!
//! The scenario is read at `nvmlInit` from `$RAZAR_FAKE_NVML_SCENARIO`, or else from
//! `scenario.toml` next to the loaded library (tests copy the library into a temp dir
//! with a scenario beside it, which also gives each copy its own state). With the step
//! clock, time is the number in the scenario's step file, re-read by the calls that
//! start a tick (`nvmlDeviceGetCount_v2`, `nvmlDeviceGetHandleByIndex_v2`) and by
//! `nvmlEventSetWait_v2` while it waits.
//!
//! Like NVML, an event set reports only the most recent event since the previous wait.
//!
//! A scenario process given by `pid_file` is read from its file at each
//! `nvmlDeviceGetComputeRunningProcesses_v3` call (and for the default used memory),
//! through the same `ScenarioGpu::processes_at` the scenario source uses.
//!
//! Every exported function is `unsafe extern "C"`: nvml-wrapper calls them with the
//! pointers NVML's API defines. None unwinds: each body runs under `catch_unwind` and
//! answers NVML_ERROR_UNKNOWN if it panicked.

#![allow(unsafe_code)] // The whole point of this crate is a C ABI.
#![allow(non_snake_case)] // NVML's symbol names.
#![allow(clippy::missing_safety_doc)] // The contract of each function is NVML's.

use razar_gpu::kernel_log::PciAddress;
use razar_gpu::scenario::{ClockMode, Field, FieldStatus, Scenario, ScenarioGpu};
use std::ffi::{c_char, c_int, c_uint, c_ulong, c_ulonglong, c_void, CStr};
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

type Ret = c_uint;
const SUCCESS: Ret = 0;
const UNINITIALIZED: Ret = 1;
const INVALID_ARGUMENT: Ret = 2;
const NOT_SUPPORTED: Ret = 3;
const INSUFFICIENT_SIZE: Ret = 7;
const TIMEOUT: Ret = 10;
const FUNCTION_NOT_FOUND: Ret = 13;
const GPU_IS_LOST: Ret = 15;
const UNKNOWN: Ret = 999;

const EVENT_DOUBLE_BIT_ECC: u64 = 2;
const EVENT_XID: u64 = 8;
const NOT_AVAILABLE: u64 = u64::MAX;
const NO_INSTANCE: c_uint = 0xFFFF_FFFF;
/// How often a waiting `nvmlEventSetWait_v2` looks at the clock again.
const WAIT_SLICE: Duration = Duration::from_millis(5);

/// Environment variable naming the scenario file.
pub const SCENARIO_ENV: &str = "RAZAR_FAKE_NVML_SCENARIO";

type Device = *mut c_void;
type EventSet = *mut c_void;

#[repr(C)]
pub struct PciInfo {
    bus_id_legacy: [c_char; 16],
    domain: c_uint,
    bus: c_uint,
    device: c_uint,
    pci_device_id: c_uint,
    pci_sub_system_id: c_uint,
    bus_id: [c_char; 32],
}

#[repr(C)]
pub struct MemoryV1 {
    total: c_ulonglong,
    free: c_ulonglong,
    used: c_ulonglong,
}

#[repr(C)]
pub struct MemoryV2 {
    version: c_uint,
    total: c_ulonglong,
    reserved: c_ulonglong,
    free: c_ulonglong,
    used: c_ulonglong,
}

#[repr(C)]
pub struct Utilization {
    gpu: c_uint,
    memory: c_uint,
}

#[repr(C)]
pub struct ProcessInfo {
    pid: c_uint,
    used_gpu_memory: c_ulonglong,
    gpu_instance_id: c_uint,
    compute_instance_id: c_uint,
}

#[repr(C)]
pub struct EventData {
    device: Device,
    event_type: c_ulonglong,
    event_data: c_ulonglong,
    gpu_instance_id: c_uint,
    compute_instance_id: c_uint,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub union Value {
    d: f64,
    si: c_int,
    ui: c_uint,
    ul: c_ulong,
    ull: c_ulonglong,
    sll: i64,
    us: u16,
}

#[repr(C)]
pub struct FieldValue {
    field_id: c_uint,
    scope_id: c_uint,
    timestamp: i64,
    latency_usec: i64,
    value_type: c_uint,
    nvml_return: Ret,
    value: Value,
}

struct Set {
    /// (gpu index, event mask)
    devices: Vec<(u32, u64)>,
    /// Events at or before this time were delivered or lost.
    delivered_until: f64,
}

struct Fake {
    scenario: Scenario,
    started: Instant,
    t: f64,
    inits: u32,
    sets: Vec<Option<Set>>,
    /// Per GPU, per scheduled XID: already written to the kernel log.
    logged: Vec<Vec<bool>>,
}

static STATE: Mutex<Option<Fake>> = Mutex::new(None);

fn state() -> MutexGuard<'static, Option<Fake>> {
    STATE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs an exported function's body; a panic becomes NVML_ERROR_UNKNOWN.
fn guard(body: impl FnOnce() -> Ret) -> Ret {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(UNKNOWN)
}

/// Writes `value` through `out` after a null check.
fn put<T>(out: *mut T, value: T) -> Ret {
    if out.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: NVML's API passes a valid, aligned, writable pointer for every out
    // parameter; we checked it is not null.
    unsafe { out.write(value) };
    SUCCESS
}

/// Copies `text` and a NUL into a caller buffer of `len` bytes.
fn put_str(buf: *mut c_char, len: c_uint, text: &str) -> Ret {
    if buf.is_null() {
        return INVALID_ARGUMENT;
    }
    if text.len() + 1 > len as usize {
        return INSUFFICIENT_SIZE;
    }
    // SAFETY: `buf` points to at least `len` writable bytes (NVML API contract) and we
    // write `text.len() + 1 <= len` of them.
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr().cast::<c_char>(), buf, text.len());
        buf.add(text.len()).write(0);
    }
    SUCCESS
}

fn handle(index: u32) -> Device {
    (index as usize + 1) as Device
}

fn index_of(device: Device) -> Option<u32> {
    u32::try_from((device as usize).checked_sub(1)?).ok()
}

impl Fake {
    /// Re-reads the clock and writes kernel log lines for XIDs that fell due.
    fn refresh(&mut self) {
        match self.scenario.clock {
            ClockMode::Wall => self.t = self.started.elapsed().as_secs_f64(),
            ClockMode::Step => {
                let step = self
                    .scenario
                    .step_file
                    .as_ref()
                    .and_then(|p| std::fs::read_to_string(p).ok())
                    .and_then(|s| s.trim().parse::<f64>().ok());
                if let Some(step) = step.filter(|s| s.is_finite()) {
                    self.t = step;
                }
            }
        }
        self.write_kernel_log();
    }

    fn write_kernel_log(&mut self) {
        let Some(path) = self.scenario.kernel_log.clone() else {
            return;
        };
        let mut lines = String::new();
        for (gi, gpu) in self.scenario.gpus.iter().enumerate() {
            let pci = PciAddress::parse(&gpu.pci_bus_id(gi as u32));
            for (xi, xid) in gpu.xids.iter().enumerate() {
                if xid.at > self.t || self.logged[gi][xi] {
                    continue;
                }
                self.logged[gi][xi] = true;
                let Some(pci) = pci else { continue };
                lines.push_str(&format!(
                    "[{:>12.6}] NVRM: Xid (PCI:{:04x}:{:02x}:{:02x}): {}, pid=4242, name=fake, razar-fake-nvml scenario\n",
                    xid.at, pci.domain, pci.bus, pci.device, xid.xid
                ));
            }
        }
        if lines.is_empty() {
            return;
        }
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(lines.as_bytes()));
        if let Err(error) = written {
            eprintln!("razar-fake-nvml: kernel log {}: {error}", path.display());
        }
    }

    fn gpu(&self, device: Device) -> Result<(u32, &ScenarioGpu), Ret> {
        let index = index_of(device).ok_or(INVALID_ARGUMENT)?;
        let gpu = self
            .scenario
            .gpus
            .get(index as usize)
            .ok_or(INVALID_ARGUMENT)?;
        Ok((index, gpu))
    }
}

fn status_code(gpu: &ScenarioGpu, fields: &[Field]) -> Ret {
    for field in fields {
        match gpu.status(*field) {
            FieldStatus::Supported => {}
            FieldStatus::NotSupported => return NOT_SUPPORTED,
            FieldStatus::Missing => return FUNCTION_NOT_FOUND,
        }
    }
    SUCCESS
}

/// Runs `body` for a device after the checks every device call makes: initialised,
/// valid handle, not lost, every field in `fields` supported.
fn with_device(
    device: Device,
    fields: &[Field],
    body: impl FnOnce(&ScenarioGpu, u32, f64) -> Ret,
) -> Ret {
    guard(|| {
        let guard = state();
        let Some(fake) = guard.as_ref() else {
            return UNINITIALIZED;
        };
        let (index, gpu) = match fake.gpu(device) {
            Ok(found) => found,
            Err(code) => return code,
        };
        if gpu.is_lost(fake.t) {
            return GPU_IS_LOST;
        }
        match status_code(gpu, fields) {
            SUCCESS => body(gpu, index, fake.t),
            code => code,
        }
    })
}

fn scenario_path() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(SCENARIO_ENV) {
        return Some(PathBuf::from(path));
    }
    let mut info = std::mem::MaybeUninit::<libc::Dl_info>::zeroed();
    // SAFETY: dladdr reads the address of one of our own functions and fills `info`;
    // on success `dli_fname` is a NUL-terminated path owned by the loader.
    let library = unsafe {
        if libc::dladdr(nvmlInit_v2 as *const c_void, info.as_mut_ptr()) == 0 {
            return None;
        }
        let info = info.assume_init();
        if info.dli_fname.is_null() {
            return None;
        }
        PathBuf::from(
            CStr::from_ptr(info.dli_fname)
                .to_string_lossy()
                .into_owned(),
        )
    };
    Some(library.parent()?.join("scenario.toml"))
}

fn init() -> Ret {
    guard(|| {
        let mut guard = state();
        if let Some(fake) = guard.as_mut() {
            fake.inits += 1;
            return SUCCESS;
        }
        let Some(path) = scenario_path() else {
            eprintln!("razar-fake-nvml: no scenario (set {SCENARIO_ENV})");
            return UNKNOWN;
        };
        let scenario = match Scenario::load(&path) {
            Ok(scenario) => scenario,
            Err(error) => {
                eprintln!("razar-fake-nvml: {error}");
                return UNKNOWN;
            }
        };
        if let Some(code) = scenario.init_error {
            return code;
        }
        let logged = scenario
            .gpus
            .iter()
            .map(|g| vec![false; g.xids.len()])
            .collect();
        let mut fake = Fake {
            scenario,
            started: Instant::now(),
            t: 0.0,
            inits: 1,
            sets: Vec::new(),
            logged,
        };
        fake.refresh();
        *guard = Some(fake);
        SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlInit_v2() -> Ret {
    init()
}

#[no_mangle]
pub unsafe extern "C" fn nvmlInit() -> Ret {
    init()
}

#[no_mangle]
pub unsafe extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> Ret {
    init()
}

#[no_mangle]
pub unsafe extern "C" fn nvmlShutdown() -> Ret {
    guard(|| {
        let mut guard = state();
        match guard.as_mut() {
            None => UNINITIALIZED,
            Some(fake) => {
                fake.inits -= 1;
                if fake.inits == 0 {
                    *guard = None;
                }
                SUCCESS
            }
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlErrorString(result: Ret) -> *const c_char {
    let text: &'static [u8] = match result {
        SUCCESS => b"Success\0",
        UNINITIALIZED => b"Uninitialized\0",
        INVALID_ARGUMENT => b"Invalid Argument\0",
        NOT_SUPPORTED => b"Not Supported\0",
        INSUFFICIENT_SIZE => b"Insufficient Size\0",
        9 => b"Driver Not Loaded\0",
        TIMEOUT => b"Timeout\0",
        FUNCTION_NOT_FOUND => b"Function Not Found\0",
        GPU_IS_LOST => b"GPU is lost\0",
        _ => b"Unknown Error\0",
    };
    text.as_ptr().cast()
}

#[no_mangle]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(version: *mut c_char, length: c_uint) -> Ret {
    guard(|| match state().as_ref() {
        None => UNINITIALIZED,
        Some(fake) => put_str(version, length, &fake.scenario.driver_version),
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlSystemGetNVMLVersion(version: *mut c_char, length: c_uint) -> Ret {
    guard(|| match state().as_ref() {
        None => UNINITIALIZED,
        Some(fake) => put_str(
            version,
            length,
            &format!("12.{}", fake.scenario.driver_version),
        ),
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> Ret {
    guard(|| match state().as_mut() {
        None => UNINITIALIZED,
        Some(fake) => {
            fake.refresh();
            put(count, fake.scenario.gpus.len() as c_uint)
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(index: c_uint, device: *mut Device) -> Ret {
    guard(|| match state().as_mut() {
        None => UNINITIALIZED,
        Some(fake) => {
            fake.refresh();
            if index as usize >= fake.scenario.gpus.len() {
                return INVALID_ARGUMENT;
            }
            put(device, handle(index))
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetIndex(device: Device, index: *mut c_uint) -> Ret {
    with_device(device, &[], |_, i, _| put(index, i))
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: Device,
    uuid: *mut c_char,
    length: c_uint,
) -> Ret {
    with_device(device, &[], |gpu, i, _| put_str(uuid, length, &gpu.uuid(i)))
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: Device,
    name: *mut c_char,
    length: c_uint,
) -> Ret {
    with_device(device, &[], |gpu, _, _| put_str(name, length, &gpu.name))
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetSerial(
    device: Device,
    serial: *mut c_char,
    length: c_uint,
) -> Ret {
    with_device(device, &[Field::Serial], |gpu, i, _| {
        put_str(serial, length, &gpu.serial(i))
    })
}

fn c_chars<const N: usize>(text: &str) -> [c_char; N] {
    let mut out = [0 as c_char; N];
    for (slot, byte) in out.iter_mut().zip(text.bytes().take(N - 1)) {
        *slot = byte as c_char;
    }
    out
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetPciInfo_v3(device: Device, pci: *mut PciInfo) -> Ret {
    with_device(device, &[], |gpu, i, _| {
        let bus_id = gpu.pci_bus_id(i);
        let address = PciAddress::parse(&bus_id);
        let legacy = address.map_or_else(String::new, |a| {
            format!("{:04X}:{:02X}:{:02X}.0", a.domain, a.bus, a.device)
        });
        put(
            pci,
            PciInfo {
                bus_id_legacy: c_chars(&legacy),
                domain: address.map_or(0, |a| a.domain),
                bus: address.map_or(0, |a| a.bus),
                device: address.map_or(0, |a| a.device),
                pci_device_id: 0x2330_10de,
                pci_sub_system_id: 0x16c1_10de,
                bus_id: c_chars(&bus_id),
            },
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(device: Device, memory: *mut MemoryV2) -> Ret {
    with_device(device, &[Field::MemoryUsed], |gpu, _, t| {
        let used = gpu.memory_used(t);
        put(
            memory,
            MemoryV2 {
                version: (std::mem::size_of::<MemoryV2>() | (2 << 24)) as c_uint,
                total: gpu.memory_total,
                reserved: gpu.memory_reserved,
                free: gpu.memory_total - gpu.memory_reserved - used,
                used,
            },
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(device: Device, memory: *mut MemoryV1) -> Ret {
    with_device(device, &[Field::MemoryUsed], |gpu, _, t| {
        let used = gpu.memory_used(t) + gpu.memory_reserved;
        put(
            memory,
            MemoryV1 {
                total: gpu.memory_total,
                free: gpu.memory_total - used,
                used,
            },
        )
    })
}

fn u32_at(gpu: &ScenarioGpu, field: Field, t: f64) -> c_uint {
    gpu.value(field, t) as c_uint
}

fn u64_at(gpu: &ScenarioGpu, field: Field, t: f64) -> c_ulonglong {
    gpu.value(field, t) as c_ulonglong
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    device: Device,
    utilization: *mut Utilization,
) -> Ret {
    with_device(
        device,
        &[Field::UtilizationGpu, Field::UtilizationMemory],
        |gpu, _, t| {
            put(
                utilization,
                Utilization {
                    gpu: u32_at(gpu, Field::UtilizationGpu, t),
                    memory: u32_at(gpu, Field::UtilizationMemory, t),
                },
            )
        },
    )
}

fn codec_utilization(
    device: Device,
    field: Field,
    utilization: *mut c_uint,
    period: *mut c_uint,
) -> Ret {
    with_device(device, &[field], |gpu, _, t| {
        match put(utilization, u32_at(gpu, field, t)) {
            SUCCESS => put(period, 167_000),
            code => code,
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetEncoderUtilization(
    device: Device,
    utilization: *mut c_uint,
    sampling_period_us: *mut c_uint,
) -> Ret {
    codec_utilization(
        device,
        Field::EncoderUtilization,
        utilization,
        sampling_period_us,
    )
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetDecoderUtilization(
    device: Device,
    utilization: *mut c_uint,
    sampling_period_us: *mut c_uint,
) -> Ret {
    codec_utilization(
        device,
        Field::DecoderUtilization,
        utilization,
        sampling_period_us,
    )
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetTemperature(
    device: Device,
    sensor: c_uint,
    temp: *mut c_uint,
) -> Ret {
    if sensor != 0 {
        return INVALID_ARGUMENT;
    }
    with_device(device, &[Field::TemperatureGpu], |gpu, _, t| {
        put(temp, u32_at(gpu, Field::TemperatureGpu, t))
    })
}

fn scalar_u32(device: Device, field: Field, out: *mut c_uint) -> Ret {
    with_device(device, &[field], |gpu, _, t| {
        put(out, u32_at(gpu, field, t))
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetPowerUsage(device: Device, power: *mut c_uint) -> Ret {
    scalar_u32(device, Field::PowerUsage, power)
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetEnforcedPowerLimit(
    device: Device,
    limit: *mut c_uint,
) -> Ret {
    scalar_u32(device, Field::PowerLimit, limit)
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetTotalEnergyConsumption(
    device: Device,
    energy: *mut c_ulonglong,
) -> Ret {
    with_device(device, &[Field::Energy], |gpu, _, t| {
        put(energy, u64_at(gpu, Field::Energy, t))
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetClockInfo(
    device: Device,
    clock_type: c_uint,
    clock: *mut c_uint,
) -> Ret {
    let field = match clock_type {
        0 | 1 => Field::SmClock,
        2 => Field::MemoryClock,
        3 => return NOT_SUPPORTED,
        _ => return INVALID_ARGUMENT,
    };
    scalar_u32(device, field, clock)
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCurrentClocksThrottleReasons(
    device: Device,
    reasons: *mut c_ulonglong,
) -> Ret {
    with_device(device, &[Field::ThrottleReasons], |gpu, _, t| {
        put(reasons, u64_at(gpu, Field::ThrottleReasons, t))
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCurrentClocksEventReasons(
    device: Device,
    reasons: *mut c_ulonglong,
) -> Ret {
    nvmlDeviceGetCurrentClocksThrottleReasons(device, reasons)
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetPerformanceState(device: Device, state: *mut c_uint) -> Ret {
    with_device(device, &[Field::PerformanceState], |gpu, _, t| {
        put(state, u32_at(gpu, Field::PerformanceState, t).min(15))
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetNumFans(device: Device, fans: *mut c_uint) -> Ret {
    with_device(device, &[Field::Fans], |gpu, _, _| put(fans, gpu.fans))
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetFanSpeed_v2(
    device: Device,
    fan: c_uint,
    speed: *mut c_uint,
) -> Ret {
    with_device(device, &[Field::Fans, Field::FanSpeed], |gpu, _, t| {
        if gpu.fans == 0 {
            NOT_SUPPORTED
        } else if fan >= gpu.fans {
            INVALID_ARGUMENT
        } else {
            put(speed, u32_at(gpu, Field::FanSpeed, t).min(100))
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetFanSpeed(device: Device, speed: *mut c_uint) -> Ret {
    nvmlDeviceGetFanSpeed_v2(device, 0, speed)
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetPcieReplayCounter(device: Device, value: *mut c_uint) -> Ret {
    scalar_u32(device, Field::PcieReplay, value)
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetPcieThroughput(
    device: Device,
    counter: c_uint,
    value: *mut c_uint,
) -> Ret {
    let field = match counter {
        0 => Field::PcieTx,
        1 => Field::PcieRx,
        _ => return INVALID_ARGUMENT,
    };
    scalar_u32(device, field, value)
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetTotalEccErrors(
    device: Device,
    error_type: c_uint,
    counter_type: c_uint,
    count: *mut c_ulonglong,
) -> Ret {
    let field = match (error_type, counter_type) {
        (0, 0) => Field::EccVolatileCorrected,
        (1, 0) => Field::EccVolatileUncorrected,
        (0, 1) => Field::EccAggregateCorrected,
        (1, 1) => Field::EccAggregateUncorrected,
        _ => return INVALID_ARGUMENT,
    };
    with_device(device, &[field], |gpu, _, t| {
        put(count, u64_at(gpu, field, t))
    })
}

fn retired_pages(
    device: Device,
    cause: c_uint,
    count: *mut c_uint,
    addresses: *mut c_ulonglong,
    timestamps: *mut c_ulonglong,
) -> Ret {
    let field = match cause {
        0 => Field::RetiredPagesSingleBit,
        1 => Field::RetiredPagesDoubleBit,
        _ => return INVALID_ARGUMENT,
    };
    with_device(device, &[field], |gpu, _, t| {
        if count.is_null() {
            return INVALID_ARGUMENT;
        }
        let pages = u32_at(gpu, field, t).min(4_096);
        // SAFETY: `count` is a valid in/out pointer (checked not null).
        let room = unsafe { count.read() };
        let _ = put(count, pages);
        if pages == 0 {
            return SUCCESS;
        }
        if room < pages || addresses.is_null() {
            return INSUFFICIENT_SIZE;
        }
        for k in 0..pages as usize {
            // SAFETY: the caller provided `room >= pages` entries in each array;
            // `timestamps` may be null (v1 call).
            unsafe {
                addresses.add(k).write(0x1000 * (k as u64 + 1));
                if !timestamps.is_null() {
                    timestamps.add(k).write(1_700_000_000 + k as u64);
                }
            }
        }
        SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetRetiredPages(
    device: Device,
    cause: c_uint,
    count: *mut c_uint,
    addresses: *mut c_ulonglong,
) -> Ret {
    retired_pages(device, cause, count, addresses, std::ptr::null_mut())
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetRetiredPages_v2(
    device: Device,
    cause: c_uint,
    count: *mut c_uint,
    addresses: *mut c_ulonglong,
    timestamps: *mut c_ulonglong,
) -> Ret {
    retired_pages(device, cause, count, addresses, timestamps)
}

const REMAPPED: [Field; 4] = [
    Field::RemappedRowsCorrectable,
    Field::RemappedRowsUncorrectable,
    Field::RemappedRowsPending,
    Field::RemappedRowsFailure,
];

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetRemappedRows(
    device: Device,
    correctable: *mut c_uint,
    uncorrectable: *mut c_uint,
    pending: *mut c_uint,
    failure: *mut c_uint,
) -> Ret {
    with_device(device, &REMAPPED, |gpu, _, t| {
        let outs = [correctable, uncorrectable, pending, failure];
        for (out, field) in outs.into_iter().zip(REMAPPED) {
            let code = put(out, u32_at(gpu, field, t));
            if code != SUCCESS {
                return code;
            }
        }
        SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetFieldValues(
    device: Device,
    count: c_int,
    values: *mut FieldValue,
) -> Ret {
    with_device(device, &[], |gpu, _, t| {
        let Ok(count) = usize::try_from(count) else {
            return INVALID_ARGUMENT;
        };
        if values.is_null() {
            return INVALID_ARGUMENT;
        }
        for k in 0..count {
            // SAFETY: the caller passes `count` initialised entries (NVML API contract).
            let value = unsafe { &mut *values.add(k) };
            let field = match value.field_id {
                82 => Some(Field::TemperatureMemory),
                142 => Some(Field::RemappedRowsCorrectable),
                143 => Some(Field::RemappedRowsUncorrectable),
                144 => Some(Field::RemappedRowsPending),
                145 => Some(Field::RemappedRowsFailure),
                _ => None,
            };
            value.timestamp = (t * 1e6) as i64;
            value.latency_usec = 0;
            value.value_type = 1; // unsigned int
            value.nvml_return = match field {
                None => NOT_SUPPORTED,
                Some(field) => status_code(gpu, &[field]),
            };
            if let (Some(field), SUCCESS) = (field, value.nvml_return) {
                value.value = Value {
                    ui: u32_at(gpu, field, t),
                };
            }
        }
        SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    device: Device,
    count: *mut c_uint,
    infos: *mut ProcessInfo,
) -> Ret {
    with_device(device, &[Field::Processes], |gpu, _, t| {
        if count.is_null() {
            return INVALID_ARGUMENT;
        }
        let running: Vec<_> = gpu.processes_at(t).collect();
        // SAFETY: `count` is a valid in/out pointer (checked not null).
        let room = unsafe { count.read() } as usize;
        let _ = put(count, running.len() as c_uint);
        if running.is_empty() {
            return SUCCESS;
        }
        if room < running.len() || infos.is_null() {
            return INSUFFICIENT_SIZE;
        }
        for (k, process) in running.iter().enumerate() {
            // SAFETY: the caller provided `room >= running.len()` entries.
            unsafe {
                infos.add(k).write(ProcessInfo {
                    pid: process.pid,
                    used_gpu_memory: process.used_memory.unwrap_or(NOT_AVAILABLE),
                    gpu_instance_id: NO_INSTANCE,
                    compute_instance_id: NO_INSTANCE,
                });
            }
        }
        SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetSupportedEventTypes(
    device: Device,
    types: *mut c_ulonglong,
) -> Ret {
    with_device(device, &[Field::Events], |_, _, _| {
        put(types, EVENT_XID | EVENT_DOUBLE_BIT_ECC)
    })
}

fn set_index(set: EventSet) -> Option<usize> {
    (set as usize).checked_sub(1)
}

#[no_mangle]
pub unsafe extern "C" fn nvmlEventSetCreate(set: *mut EventSet) -> Ret {
    guard(|| match state().as_mut() {
        None => UNINITIALIZED,
        Some(fake) => {
            fake.refresh();
            let delivered_until = fake.t;
            fake.sets.push(Some(Set {
                devices: Vec::new(),
                delivered_until,
            }));
            put(set, fake.sets.len() as EventSet)
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceRegisterEvents(
    device: Device,
    types: c_ulonglong,
    set: EventSet,
) -> Ret {
    let code = with_device(device, &[Field::Events], |_, _, _| SUCCESS);
    if code != SUCCESS {
        return code;
    }
    guard(|| {
        let mut guard = state();
        let Some(fake) = guard.as_mut() else {
            return UNINITIALIZED;
        };
        let (Some(index), Some(Some(set))) = (
            index_of(device),
            set_index(set).map(|i| fake.sets.get_mut(i)),
        ) else {
            return INVALID_ARGUMENT;
        };
        let Some(set) = set.as_mut() else {
            return INVALID_ARGUMENT;
        };
        set.devices.push((index, types));
        SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlEventSetFree(set: EventSet) -> Ret {
    guard(|| {
        let mut guard = state();
        let Some(fake) = guard.as_mut() else {
            return UNINITIALIZED;
        };
        match set_index(set).and_then(|i| fake.sets.get_mut(i)) {
            Some(slot @ Some(_)) => {
                *slot = None;
                SUCCESS
            }
            _ => INVALID_ARGUMENT,
        }
    })
}

/// One look at a set: `Some(code)` when the wait is over.
fn poll_set(fake: &mut Fake, set: usize, data: *mut EventData) -> Option<Ret> {
    fake.refresh();
    let t = fake.t;
    let Some(Some(entry)) = fake.sets.get(set) else {
        return Some(INVALID_ARGUMENT);
    };
    let from = entry.delivered_until;
    let mut latest: Option<(f64, u32, u64, u64)> = None;
    for (gpu_index, mask) in &entry.devices {
        let Some(gpu) = fake.scenario.gpus.get(*gpu_index as usize) else {
            continue;
        };
        if gpu.is_lost(t) {
            return Some(GPU_IS_LOST);
        }
        let due = |at: f64| at > from && at <= t;
        let xids = gpu
            .xids
            .iter()
            .filter(|_| mask & EVENT_XID != 0)
            .filter(|x| due(x.at))
            .map(|x| (x.at, EVENT_XID, u64::from(x.xid)));
        let dbes = gpu
            .double_bit_ecc_at
            .iter()
            .filter(|_| mask & EVENT_DOUBLE_BIT_ECC != 0)
            .filter(|at| due(**at))
            .map(|at| (*at, EVENT_DOUBLE_BIT_ECC, 0));
        for (at, kind, value) in xids.chain(dbes) {
            if latest.is_none_or(|l| at >= l.0) {
                latest = Some((at, *gpu_index, kind, value));
            }
        }
    }
    let (_, gpu_index, kind, value) = latest?;
    // NVML keeps only the most recent event between waits: the rest are gone.
    if let Some(Some(entry)) = fake.sets.get_mut(set) {
        entry.delivered_until = t;
    }
    Some(put(
        data,
        EventData {
            device: handle(gpu_index),
            event_type: kind,
            event_data: value,
            gpu_instance_id: NO_INSTANCE,
            compute_instance_id: NO_INSTANCE,
        },
    ))
}

#[no_mangle]
pub unsafe extern "C" fn nvmlEventSetWait_v2(
    set: EventSet,
    data: *mut EventData,
    timeout_ms: c_uint,
) -> Ret {
    guard(|| {
        let Some(set) = set_index(set) else {
            return INVALID_ARGUMENT;
        };
        let deadline = Instant::now() + Duration::from_millis(u64::from(timeout_ms));
        loop {
            {
                let mut guard = state();
                let Some(fake) = guard.as_mut() else {
                    return UNINITIALIZED;
                };
                if let Some(code) = poll_set(fake, set, data) {
                    return code;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return TIMEOUT;
            }
            std::thread::sleep(left.min(WAIT_SLICE));
        }
    })
}
