//! Cost of one sampling tick for 8 GPUs (fake NVML library, real nvml-wrapper path) and
//! the host: thread CPU µs, wall µs and allocations per tick, next to an anchor from the
//! same run (the same NVML calls made bare through nvml-wrapper, without the source).
//!
//! Run: `cargo bench -p razar-gpu --bench sampling_tick`

#![allow(unsafe_code)] // A counting global allocator and clock_gettime need it.

use nvml_wrapper::enum_wrappers::device::{
    Clock, EccCounter, MemoryError, PcieUtilCounter, RetirementCause, TemperatureSensor,
};
use nvml_wrapper::structs::device::FieldId;
use nvml_wrapper::Nvml;
use razar_gpu::exposition::{gpu_samples, host_samples};
use razar_gpu::host::HostSampler;
use razar_gpu::{GpuSource, NvmlOptions, NvmlSource};
use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[derive(Default)]
struct Stats {
    cpu_us: Vec<f64>,
    wall_us: Vec<f64>,
    allocs: u64,
    bytes: u64,
}

impl Stats {
    fn measure(&mut self, f: &mut impl FnMut()) {
        let (a0, b0) = (
            ALLOCS.load(Ordering::Relaxed),
            BYTES.load(Ordering::Relaxed),
        );
        let (c0, w0) = (thread_cpu(), Instant::now());
        f();
        let (c1, w1) = (thread_cpu(), Instant::now());
        self.cpu_us.push((c1 - c0).as_secs_f64() * 1e6);
        self.wall_us.push((w1 - w0).as_secs_f64() * 1e6);
        self.allocs += ALLOCS.load(Ordering::Relaxed) - a0;
        self.bytes += BYTES.load(Ordering::Relaxed) - b0;
    }

    fn print(&mut self, name: &str) {
        let n = self.cpu_us.len() as f64;
        let pct = |v: &mut Vec<f64>, p: f64| {
            v.sort_by(f64::total_cmp);
            v[((v.len() - 1) as f64 * p) as usize]
        };
        let mean_cpu = self.cpu_us.iter().sum::<f64>() / n;
        let mean_wall = self.wall_us.iter().sum::<f64>() / n;
        println!(
            "{name:<44} cpu mean {mean_cpu:>8.1} µs  p50 {:>8.1}  p99 {:>8.1} | wall mean {mean_wall:>8.1} µs | {:>7.1} allocs {:>9.0} B per tick",
            pct(&mut self.cpu_us, 0.5),
            pct(&mut self.cpu_us, 0.99),
            self.allocs as f64 / n,
            self.bytes as f64 / n,
        );
    }
}

fn scenario(gpus: u32) -> String {
    let mut text = String::from("clock = \"wall\"\nkernel_log = \"kmsg.log\"\n");
    for i in 0..gpus {
        text.push_str(&format!(
            "[[gpu]]\nvalues = {{ utilization_gpu = [[0, 10], [60, 90]], power_usage = [[0, 100000], [60, 600000]] }}\n\
             process = [{{ pid = {}, used_memory = 8589934592 }}, {{ pid = {}, used_memory = 1073741824 }}]\n",
            1000 + 2 * i,
            1001 + 2 * i
        ));
    }
    text
}

/// The NVML calls one tick makes, bare: no bookkeeping, no readings built.
fn bare_calls(nvml: &Nvml, gpus: u32) {
    let fields = [
        FieldId(82),
        FieldId(142),
        FieldId(143),
        FieldId(144),
        FieldId(145),
    ];
    for i in 0..gpus {
        let Ok(d) = nvml.device_by_index(i) else {
            continue;
        };
        black_box(d.memory_info().ok());
        black_box(d.utilization_rates().ok());
        black_box(d.encoder_utilization().ok());
        black_box(d.decoder_utilization().ok());
        black_box(d.temperature(TemperatureSensor::Gpu).ok());
        black_box(d.field_values_for(&fields).ok());
        black_box(d.power_usage().ok());
        black_box(d.enforced_power_limit().ok());
        black_box(d.total_energy_consumption().ok());
        black_box(d.clock_info(Clock::SM).ok());
        black_box(d.clock_info(Clock::Memory).ok());
        black_box(d.current_throttle_reasons().ok());
        black_box(d.performance_state().ok());
        black_box(d.pcie_replay_counter().ok());
        black_box(d.pcie_throughput(PcieUtilCounter::Send).ok());
        black_box(d.pcie_throughput(PcieUtilCounter::Receive).ok());
        for (e, c) in [
            (MemoryError::Corrected, EccCounter::Volatile),
            (MemoryError::Uncorrected, EccCounter::Volatile),
            (MemoryError::Corrected, EccCounter::Aggregate),
            (MemoryError::Uncorrected, EccCounter::Aggregate),
        ] {
            black_box(d.total_ecc_errors(e, c).ok());
        }
        black_box(
            d.retired_pages(RetirementCause::MultipleSingleBitEccErrors)
                .ok(),
        );
        black_box(d.retired_pages(RetirementCause::DoubleBitEccError).ok());
        black_box(d.running_compute_processes().ok());
    }
}

fn main() {
    const GPUS: u32 = 8;
    const WARMUP: usize = 50;
    const TICKS: usize = 2_000;
    let exe = std::env::current_exe().expect("bench executable");
    let built = exe.parent().expect("deps dir").join("libnvidia_ml.so");
    let dir = tempfile::tempdir().expect("tempdir");
    let library = dir.path().join("libnvidia-ml.so.1");
    std::fs::copy(&built, &library).unwrap_or_else(|e| panic!("copy {}: {e}", built.display()));
    std::fs::write(dir.path().join("scenario.toml"), scenario(GPUS)).expect("scenario");

    let options = NvmlOptions {
        library_path: Some(library.clone()),
        kernel_log: Some(dir.path().join("kmsg.log")),
        ..NvmlOptions::default()
    };
    let mut gpu = NvmlSource::open(&options).expect("open NVML source on the fake library");
    assert_eq!(gpu.inventory().len(), GPUS as usize);
    let anchor_nvml = Nvml::builder()
        .lib_path(library.as_os_str())
        .init()
        .expect("second NVML handle");
    let mut host = HostSampler::new(false);
    let mut samples = Vec::with_capacity(1024);

    let mut anchor = Stats::default();
    let mut gpu_tick = Stats::default();
    let mut host_tick = Stats::default();
    let mut exposition = Stats::default();
    let mut whole = Stats::default();
    let mut readings = Vec::new();
    let mut host_reading = host.sample();
    for round in 0..WARMUP + TICKS {
        let measured = round >= WARMUP;
        let mut stats = [
            Stats::default(),
            Stats::default(),
            Stats::default(),
            Stats::default(),
            Stats::default(),
        ];
        stats[0].measure(&mut || bare_calls(&anchor_nvml, GPUS));
        stats[1].measure(&mut || {
            readings = gpu.sample().expect("sample");
            black_box(gpu.processes().expect("processes"));
            black_box(gpu.poll_events());
        });
        stats[2].measure(&mut || host_reading = host.sample());
        stats[3].measure(&mut || {
            samples.clear();
            gpu_samples(&readings, &mut samples);
            host_samples(&host_reading, &mut samples);
        });
        stats[4].measure(&mut || {
            readings = gpu.sample().expect("sample");
            black_box(gpu.processes().expect("processes"));
            black_box(gpu.poll_events());
            host_reading = host.sample();
            samples.clear();
            gpu_samples(&readings, &mut samples);
            host_samples(&host_reading, &mut samples);
        });
        if measured {
            for (into, from) in [
                &mut anchor,
                &mut gpu_tick,
                &mut host_tick,
                &mut exposition,
                &mut whole,
            ]
            .into_iter()
            .zip(stats)
            {
                into.cpu_us.extend(from.cpu_us);
                into.wall_us.extend(from.wall_us);
                into.allocs += from.allocs;
                into.bytes += from.bytes;
            }
        }
    }
    println!(
        "GPU sampling tick: {GPUS} fake GPUs via nvml-wrapper, {TICKS} ticks, {} samples per tick",
        samples.len()
    );
    anchor.print("anchor: bare nvml-wrapper calls (8 GPUs)");
    gpu_tick.print("GPU: sample + processes + poll_events");
    host_tick.print("host: HostSampler::sample");
    exposition.print("samples: gpu_samples + host_samples");
    whole.print("whole tick (GPU + host + samples)");
    println!("goal: whole tick < 2000 µs CPU");
}
