//! Simulated GPU-host telemetry shared by the benchmarks (`store_bench`, `fleet_bench`):
//! a deterministic generator and per-series value shapes quantised like NVML and sysinfo
//! output. Included with `#[path = "support/sim.rs"] mod sim;`.
#![allow(dead_code)]

/// Deterministic xorshift generator.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Roughly normal, mean 0, deviation 1.
    pub fn gauss(&mut self) -> f64 {
        (0..4).map(|_| self.unit()).sum::<f64>() * 1.732 - 3.464
    }
}

/// How a simulated series evolves.
#[derive(Clone, Copy)]
pub enum Shape {
    /// GPU utilisation in whole percent: a random walk with occasional job changes.
    Utilisation,
    /// Temperature in whole °C following utilisation slowly.
    Temperature,
    /// Power in watts with milliwatt resolution: load-driven plus noise.
    Power,
    /// Constant value (limits, totals, clocks of idle memory).
    Constant(f64),
    /// Memory in bytes: steps when a job starts, constant in between.
    MemoryUsed,
    /// Clock in MHz: boost, occasional throttling.
    Clock,
    /// A counter of rare errors.
    RareCounter,
    /// A noisy rate in bytes/s (KiB resolution), bursty.
    Rate(f64),
    /// CPU share as the OS reports it: an f32 widened to f64.
    CpuShare,
    /// Load average with two decimals.
    Load,
    /// Host memory in bytes, page-granular noise.
    HostMemory,
}

pub struct Sim {
    shape: Shape,
    value: f64,
    level: f64,
}

impl Sim {
    pub fn new(shape: Shape, rng: &mut Rng) -> Sim {
        let value = match shape {
            Shape::Constant(v) => v,
            Shape::MemoryUsed => 40.0 * 1024.0 * 1024.0 * 1024.0,
            Shape::HostMemory => 200.0 * 1024.0 * 1024.0 * 1024.0,
            Shape::Clock => 1980.0,
            _ => 0.0,
        };
        Sim {
            shape,
            value,
            level: 50.0 + rng.unit() * 40.0,
        }
    }

    /// How this series evolves.
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// Advances one second; `util` is the GPU's current utilisation.
    pub fn step(&mut self, rng: &mut Rng, util: f64) -> f64 {
        match self.shape {
            Shape::Utilisation => {
                if rng.unit() < 0.002 {
                    self.level = (rng.unit() * 100.0).round();
                }
                self.value = (self.value + (self.level - self.value) * 0.1 + rng.gauss() * 2.0)
                    .clamp(0.0, 100.0)
                    .round();
            }
            Shape::Temperature => {
                let target = 35.0 + util * 0.45;
                self.value += (target - self.value) * 0.02;
                return self.value.round();
            }
            Shape::Power => {
                let watts = 90.0 + util * 5.5 + rng.gauss() * 6.0;
                self.value = (watts * 1000.0).round() / 1000.0;
            }
            Shape::Constant(_) => {}
            Shape::MemoryUsed => {
                if rng.unit() < 0.001 {
                    self.value = ((rng.unit() * 70.0 + 2.0) * 1024.0).round() * 1024.0 * 1024.0;
                }
            }
            Shape::Clock => {
                self.value = if rng.unit() < 0.01 { 1755.0 } else { 1980.0 };
            }
            Shape::RareCounter => {
                if rng.unit() < 0.0005 {
                    self.value += 1.0;
                }
            }
            Shape::Rate(mean) => {
                let burst = if rng.unit() < 0.1 { 8.0 } else { 1.0 };
                let r = (mean * burst * (1.0 + rng.gauss() * 0.2)).max(0.0);
                self.value = (r / 1024.0).round() * 1024.0;
            }
            Shape::CpuShare => {
                self.level = (self.level + rng.gauss()).clamp(1.0, 99.0);
                self.value = f64::from((self.level + rng.gauss() * 3.0).clamp(0.0, 100.0) as f32);
            }
            Shape::Load => {
                self.level = (self.level + rng.gauss() * 0.3).clamp(0.5, 64.0);
                self.value = (self.level * 100.0).round() / 100.0;
            }
            Shape::HostMemory => {
                self.value = (self.value + (rng.gauss() * 2e6 / 4096.0).round() * 4096.0).max(0.0);
            }
        }
        self.value
    }
}
