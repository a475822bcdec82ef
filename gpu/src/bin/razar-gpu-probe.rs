//! `razar-gpu-probe`: opens the NVML source (or a fake library), prints one full
//! reading, the processes, the events seen while waiting, and a host sample as JSON.
//! Used to check the agent's NVML path on a real GPU.
//!
//! Usage: razar-gpu-probe [--lib PATH] [--kernel-log PATH|none] [--wait-ms N]

use razar_gpu::host::HostSampler;
use razar_gpu::{GpuSource, NvmlOptions, NvmlSource};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("razar-gpu-probe: {message}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<(), String> {
    let mut options = NvmlOptions::default();
    let mut wait = Duration::from_millis(1500);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--lib" => options.library_path = Some(PathBuf::from(value()?)),
            "--kernel-log" => {
                let v = value()?;
                options.kernel_log = (v != "none").then(|| PathBuf::from(v));
            }
            "--wait-ms" => {
                let v = value()?;
                wait = Duration::from_millis(v.parse().map_err(|e| format!("--wait-ms {v}: {e}"))?);
            }
            "-h" | "--help" => {
                println!(
                    "usage: razar-gpu-probe [--lib PATH] [--kernel-log PATH|none] [--wait-ms N]"
                );
                return Ok(());
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let mut host = HostSampler::new(false);
    host.sample();
    let started = std::time::Instant::now();
    let mut source = NvmlSource::open(&options).map_err(|e| e.to_string())?;
    let open_us = started.elapsed().as_micros();
    let started = std::time::Instant::now();
    let readings = source.sample().map_err(|e| e.to_string())?;
    let sample_us = started.elapsed().as_micros();
    let processes = source.processes().map_err(|e| e.to_string())?;
    std::thread::sleep(wait);
    let events = source.poll_events();
    let report = serde_json::json!({
        "inventory": source.inventory(),
        "readings": readings,
        "processes": processes,
        "events": events,
        "host": host.sample(),
        "timing_us": { "open": open_us, "first_sample": sample_us },
    });
    let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
    println!("{text}");
    Ok(())
}
