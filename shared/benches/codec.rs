//! Encode and decode of a realistic 1,000-sample telemetry batch: 8 GPUs × 12 metrics
//! plus 29 host metrics, 8 samples per series at 1 s spacing. Besides criterion's
//! output it prints samples/s on one core and bytes per sample, next to an anchor
//! measured in the same run (a plain copy of the same frame).
//!
//! `cargo bench -p razar-shared` (goal: decode ≥ 5 M samples/s, ≤ 12 bytes/sample).

use criterion::{BenchmarkId, Criterion, Throughput};
use razar_shared::protocol::{
    decode_payload, encode_agent, encode_into, AgentFrameDecoder, AgentMessage, Batch,
    SeriesPoints, HEADER_LEN,
};
use std::hint::black_box;
use std::time::{Duration, Instant};

const GPUS: u32 = 8;
const STEPS: u32 = 8;

/// Deterministic jitter in [-1, 1).
fn wobble(state: &mut u64) -> f64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    (*state >> 11) as f64 / (1u64 << 52) as f64 - 1.0
}

/// Rounds like the samplers do (NVML and /proc give fixed resolutions).
fn round(value: f64, decimals: i32) -> f64 {
    let f = 10f64.powi(decimals);
    (value * f).round() / f
}

/// The batch: GPU series first (index × metric), then host series.
fn realistic_batch() -> Batch {
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut series = Vec::new();
    let mut id = 1u32;
    // (base value, spread, decimals) per GPU metric.
    let gpu_metrics: [(f64, f64, i32); 12] = [
        (87.0, 12.0, 2),            // utilisation %
        (41.0, 15.0, 2),            // memory copy utilisation %
        (67.0, 4.0, 0),             // GPU temperature °C
        (79.0, 3.0, 0),             // memory temperature °C
        (612.0, 80.0, 3),           // power W (from mW)
        (71_303_168_000.0, 2e9, 0), // framebuffer used bytes
        (14_596_177_920.0, 2e9, 0), // framebuffer free bytes
        (1_980.0, 45.0, 0),         // SM clock MHz
        (2_619.0, 0.0, 0),          // memory clock MHz
        (3.1e9, 9e8, 0),            // PCIe tx bytes/s
        (9.7e12, 1e6, 0),           // total energy mJ (counter)
        (0.0, 0.0, 0),              // ECC errors (counter)
    ];
    for _gpu in 0..GPUS {
        for (base, spread, decimals) in gpu_metrics {
            let mut points = Vec::new();
            for step in 0..STEPS {
                let value = round(base + spread * wobble(&mut rng), decimals);
                points.push((step * 1_000, value.max(0.0)));
            }
            series.push(SeriesPoints { series: id, points });
            id += 1;
        }
    }
    // Host: per-core CPU %, load averages, memory, disk and network rates.
    let host_metrics: [(f64, f64, i32); 29] = [
        (34.5, 20.0, 2),
        (36.1, 20.0, 2),
        (31.7, 20.0, 2),
        (29.9, 20.0, 2),
        (40.2, 20.0, 2),
        (38.8, 20.0, 2),
        (33.0, 20.0, 2),
        (35.4, 20.0, 2),
        (36.0, 10.0, 2), // CPU total %
        (12.4, 2.0, 2),
        (11.9, 1.0, 2),
        (11.2, 0.5, 2),                // load 1/5/15
        (412_316_860_416.0, 1e9, 0),   // memory used bytes
        (1_649_267_441_664.0, 1e9, 0), // memory available bytes
        (0.0, 0.0, 0),                 // swap used
        (104_857_600.0, 5e7, 0),
        (52_428_800.0, 3e7, 0), // disk read/write bytes/s
        (1_200.0, 300.0, 0),
        (800.0, 200.0, 0), // disk IOPS r/w
        (1.25e9, 3e8, 0),
        (1.1e9, 3e8, 0), // net rx/tx bytes/s (eth0)
        (2.4e10, 4e9, 0),
        (2.3e10, 4e9, 0), // net rx/tx bytes/s (ib0)
        (0.0, 0.0, 0),
        (0.0, 0.0, 0),         // net errors rx/tx
        (1_843.0, 40.0, 0),    // processes
        (93_211.0, 500.0, 0),  // open files
        (47.0, 3.0, 0),        // CPU package temperature °C
        (3_151_000.0, 1.0, 0), // uptime s
    ];
    for (base, spread, decimals) in host_metrics {
        let mut points = Vec::new();
        for step in 0..STEPS {
            let value = round(base + spread * wobble(&mut rng), decimals);
            points.push((step * 1_000, value.max(0.0)));
        }
        series.push(SeriesPoints { series: id, points });
        id += 1;
    }
    Batch {
        seq: 1_234_567,
        base_ts_ms: 1_750_000_000_000,
        series,
        events: Vec::new(),
    }
}

/// Runs `f` repeatedly for about `budget` and returns calls per second.
fn rate(budget: Duration, mut f: impl FnMut()) -> f64 {
    let mut calls = 0u64;
    let start = Instant::now();
    let mut batch = 1u64;
    loop {
        for _ in 0..batch {
            f();
        }
        calls += batch;
        let elapsed = start.elapsed();
        if elapsed >= budget {
            return calls as f64 / elapsed.as_secs_f64();
        }
        batch = (batch * 2).min(4096);
    }
}

fn main() {
    let batch = realistic_batch();
    let samples = batch.sample_count();
    assert_eq!(samples, 1_000, "the batch must hold 1,000 samples");
    let msg = AgentMessage::Batch(batch);
    let frame = encode_agent(&msg).expect("the batch encodes");
    let payload = &frame[HEADER_LEN..];

    let mut criterion = Criterion::default().configure_from_args();
    {
        let mut group = criterion.benchmark_group("batch_1000_samples");
        group.throughput(Throughput::Elements(samples as u64));
        let mut out = Vec::with_capacity(frame.len());
        group.bench_function(BenchmarkId::new("encode", samples), |b| {
            b.iter(|| {
                out.clear();
                encode_into(black_box(&msg), &mut out).expect("encodes");
                black_box(out.len())
            })
        });
        group.bench_function(BenchmarkId::new("decode_payload", samples), |b| {
            b.iter(|| decode_payload::<AgentMessage>(black_box(payload)).expect("decodes"))
        });
        group.bench_function(BenchmarkId::new("decode_stream_16k_chunks", samples), |b| {
            let mut decoder = AgentFrameDecoder::new();
            b.iter(|| {
                let mut got = None;
                for chunk in black_box(&frame[..]).chunks(16 * 1024) {
                    let mut input = chunk;
                    if let Some(m) = decoder.feed(&mut input).expect("decodes") {
                        got = Some(m);
                    }
                }
                got
            })
        });
        group.bench_function(BenchmarkId::new("anchor_copy_frame", samples), |b| {
            b.iter(|| black_box(black_box(&frame[..]).to_vec()))
        });
        group.finish();
    }
    criterion.final_summary();

    // Our own figures, one core, same run. Short under `cargo test --benches`.
    let benching = std::env::args().any(|a| a == "--bench");
    let budget = if benching {
        Duration::from_secs(2)
    } else {
        Duration::from_millis(20)
    };
    let mut out = Vec::with_capacity(frame.len());
    let encode_per_s = rate(budget, || {
        out.clear();
        encode_into(black_box(&msg), &mut out).expect("encodes");
        black_box(out.len());
    });
    let decode_per_s = rate(budget, || {
        black_box(decode_payload::<AgentMessage>(black_box(payload)).expect("decodes"));
    });
    let mut decoder = AgentFrameDecoder::new();
    let stream_per_s = rate(budget, || {
        for chunk in black_box(&frame[..]).chunks(16 * 1024) {
            let mut input = chunk;
            black_box(decoder.feed(&mut input).expect("decodes"));
        }
    });
    let copy_per_s = rate(budget, || {
        black_box(black_box(&frame[..]).to_vec());
    });
    let s = samples as f64;
    let bytes_per_sample = frame.len() as f64 / s;
    println!();
    println!(
        "razar-shared codec, realistic batch: {samples} samples, {} series, frame {} bytes",
        GPUS * 12 + 29,
        frame.len()
    );
    println!(
        "encode: {:.2} M samples/s (one core), {bytes_per_sample:.2} bytes/sample",
        encode_per_s * s / 1e6
    );
    println!(
        "decode: {:.2} M samples/s (one core), {bytes_per_sample:.2} bytes/sample",
        decode_per_s * s / 1e6
    );
    println!(
        "decode via FrameDecoder (16 KiB chunks): {:.2} M samples/s",
        stream_per_s * s / 1e6
    );
    println!(
        "anchor (same run): copying the same frame: {:.2} GB/s, i.e. {:.0} M samples/s",
        copy_per_s * frame.len() as f64 / 1e9,
        copy_per_s * s / 1e6
    );
    println!("goal: decode >= 5 M samples/s, <= 12 bytes/sample");
}
