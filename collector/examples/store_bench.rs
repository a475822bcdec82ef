//! Store benchmark: bytes on disk per stored sample after 24 h of simulated GPU fleet
//! telemetry, and ingest throughput through `Store::ingest` next to the anchor measured
//! in the same run (raw binary COPY of the same rows into the same table).
//!
//! Run: `cargo run --release -p razar-collector --example store_bench [-- HOSTS [HOURS]]`
//! (defaults: 2 hosts × (8 GPUs × 15 metrics + 20 host metrics) at 1 s, 24 h).
//! Starts a private PostgreSQL (fsync on, like the product) in a temporary directory.
//!
//! `-- HOSTS HOURS steady` instead replays the data in time order with compaction every
//! 10 simulated minutes (as the collector runs it) and reports every sample table's size,
//! the raw partition included: the steady-state bytes per sample.

use std::time::{Duration, Instant};

use razar_collector::embedded_pg::{EmbeddedPg, EmbeddedPgOptions};
use razar_collector::store::{SeriesMap, Store};
use razar_shared::protocol::{Batch, SeriesDef, SeriesPoints};

#[path = "support/sim.rs"]
mod sim;
use sim::{Rng, Shape, Sim};
use sqlx::types::chrono::{DateTime, Utc};

const GPUS: u32 = 8;
/// Agent batches of one second; `Store::ingest` takes this many per transaction.
const BATCHES_PER_INGEST: usize = 50;

const GPU_METRICS: [(&str, Shape); 15] = [
    ("gpu_utilization_ratio", Shape::Utilisation),
    ("gpu_memory_utilization_ratio", Shape::Utilisation),
    ("gpu_memory_used_bytes", Shape::MemoryUsed),
    ("gpu_memory_total_bytes", Shape::Constant(85_899_345_920.0)),
    ("gpu_temperature_celsius", Shape::Temperature),
    ("gpu_power_watts", Shape::Power),
    ("gpu_power_limit_watts", Shape::Constant(700.0)),
    ("gpu_sm_clock_mhz", Shape::Clock),
    ("gpu_memory_clock_mhz", Shape::Constant(2619.0)),
    ("gpu_fan_speed_ratio", Shape::Constant(0.0)),
    ("gpu_throttle_reasons", Shape::Constant(0.0)),
    ("gpu_ecc_corrected_total", Shape::RareCounter),
    ("gpu_ecc_uncorrected_total", Shape::Constant(0.0)),
    ("gpu_pcie_tx_bytes_per_second", Shape::Rate(2.0e9)),
    ("gpu_pcie_rx_bytes_per_second", Shape::Rate(6.0e8)),
];

const HOST_METRICS: [(&str, Shape); 20] = [
    ("host_cpu_usage_ratio", Shape::CpuShare),
    ("host_load1", Shape::Load),
    ("host_load5", Shape::Load),
    ("host_load15", Shape::Load),
    ("host_memory_used_bytes", Shape::HostMemory),
    ("host_memory_available_bytes", Shape::HostMemory),
    ("host_swap_used_bytes", Shape::Constant(0.0)),
    ("host_disk_used_bytes", Shape::HostMemory),
    ("host_disk_read_bytes_per_second", Shape::Rate(5.0e6)),
    ("host_disk_write_bytes_per_second", Shape::Rate(2.0e7)),
    ("host_network_rx_bytes_per_second", Shape::Rate(1.0e8)),
    ("host_network_tx_bytes_per_second", Shape::Rate(8.0e7)),
    ("host_processes", Shape::Constant(412.0)),
    ("host_open_files", Shape::Constant(9120.0)),
    ("component_cpu_usage_ratio", Shape::CpuShare),
    ("component_cpu_usage_ratio", Shape::CpuShare),
    ("component_cpu_usage_ratio", Shape::CpuShare),
    ("component_memory_rss_bytes", Shape::HostMemory),
    ("component_memory_rss_bytes", Shape::HostMemory),
    ("component_memory_rss_bytes", Shape::HostMemory),
];

/// One simulated agent.
struct Agent {
    host: String,
    defs: Vec<SeriesDef>,
    sims: Vec<(Sim, Option<usize>)>,
    map: SeriesMap,
    rng: Rng,
    seq: u64,
}

impl Agent {
    fn new(index: u32) -> Agent {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (u64::from(index + 1) * 0x1234_5678_9abc));
        let mut defs = Vec::new();
        let mut sims = Vec::new();
        for gpu in 0..GPUS {
            let util_index = sims.len();
            for (metric, shape) in GPU_METRICS {
                defs.push(SeriesDef {
                    id: defs.len() as u32,
                    metric: metric.to_owned(),
                    labels: vec![("gpu".to_owned(), gpu.to_string())],
                });
                sims.push((Sim::new(shape, &mut rng), Some(util_index)));
            }
        }
        for (i, (metric, shape)) in HOST_METRICS.iter().enumerate() {
            defs.push(SeriesDef {
                id: defs.len() as u32,
                metric: (*metric).to_owned(),
                labels: vec![("slot".to_owned(), i.to_string())],
            });
            sims.push((Sim::new(*shape, &mut rng), None));
        }
        Agent {
            host: format!("gpu-node-{index:04}"),
            defs,
            sims,
            map: SeriesMap::default(),
            rng,
            seq: 0,
        }
    }

    /// The batch for one second: every series sampled once, timestamps with the few
    /// milliseconds of jitter a real sampling loop has.
    fn batch(&mut self, second_ms: i64) -> Batch {
        self.seq += 1;
        let jitter = (self.rng.next() % 4) as u32;
        let mut values = Vec::with_capacity(self.sims.len());
        let mut util = 0.0;
        for i in 0..self.sims.len() {
            if let Some(u) = self.sims[i].1 {
                if u == i {
                    util = self.sims[i].0.step(&mut self.rng, 0.0);
                    values.push(util);
                    continue;
                }
            }
            values.push(self.sims[i].0.step(&mut self.rng, util));
        }
        Batch {
            seq: self.seq,
            base_ts_ms: second_ms,
            series: values
                .into_iter()
                .enumerate()
                .map(|(i, v)| SeriesPoints {
                    series: i as u32,
                    points: vec![(jitter, v)],
                })
                .collect(),
            events: Vec::new(),
        }
    }
}

fn at(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

async fn sizes(store: &Store, table: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0)::int8
         FROM pg_inherits WHERE inhparent = $1::regclass",
    )
    .bind(table)
    .fetch_one(store.pool())
    .await
}

/// The anchor: one binary COPY of the given rows (what `Store::ingest` writes) in its own
/// transaction, with the same framing our ingest uses.
async fn raw_copy(store: &Store, rows: &[(i64, i64, f64)]) -> Result<(), sqlx::Error> {
    const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;
    let mut buf = Vec::with_capacity(21 + rows.len() * 38);
    buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    buf.extend_from_slice(&[0; 8]);
    for &(id, ts, v) in rows {
        buf.extend_from_slice(&3i16.to_be_bytes());
        buf.extend_from_slice(&8i32.to_be_bytes());
        buf.extend_from_slice(&id.to_be_bytes());
        buf.extend_from_slice(&8i32.to_be_bytes());
        buf.extend_from_slice(&(ts * 1000 - PG_EPOCH_OFFSET_US).to_be_bytes());
        buf.extend_from_slice(&8i32.to_be_bytes());
        buf.extend_from_slice(&v.to_bits().to_be_bytes());
    }
    buf.extend_from_slice(&(-1i16).to_be_bytes());
    let mut tx = store.pool().begin().await?;
    let mut sink = tx
        .copy_in_raw("COPY samples (series_id, ts, value) FROM STDIN (FORMAT binary)")
        .await?;
    sink.send(buf).await?;
    sink.finish().await?;
    tx.commit().await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let hosts: u32 = args.get(1).map(|a| a.parse()).transpose()?.unwrap_or(2);
    let hours: i64 = args.get(2).map(|a| a.parse()).transpose()?.unwrap_or(24);
    let measured_hours = 1.min(hours);

    let dir = tempfile::Builder::new().prefix("razar-bench").tempdir()?;
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let mut options = EmbeddedPgOptions::new(dir.path().join("pg"));
    options.shared_buffers = "512MB".to_owned();
    let pg = EmbeddedPg::start(options).await?;
    let store = Store::connect(&pg.url(), 4).await?;
    store.migrate().await?;
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(store.pool())
        .await?;

    let mut agents: Vec<Agent> = (0..hosts).map(Agent::new).collect();
    let per_host = agents[0].defs.len();
    for agent in &mut agents {
        let hello = razar_shared::protocol::Hello {
            protocol_min: 1,
            protocol_max: 1,
            host_id: agent.host.clone(),
            agent_version: "bench".to_owned(),
            profile: "core".to_owned(),
            components: Vec::new(),
            gpus: Vec::new(),
            last_acked_seq: 0,
            agent_time_ms: 0,
        };
        store.record_hello(&hello, Utc::now()).await?;
        agent.map = store.register_series(&agent.host, &agent.defs).await?;
    }
    println!(
        "PostgreSQL {version}, fsync on; {hosts} hosts × {per_host} series ({GPUS} GPUs × {} GPU metrics + {} host metrics) at 1 s for {hours} h",
        GPU_METRICS.len(),
        HOST_METRICS.len()
    );

    let now = Utc::now().timestamp_millis();
    let end = now - now.rem_euclid(3_600_000) - 3_600_000;
    let start = end - hours * 3_600_000;
    let seconds = hours * 3600;
    let fill_seconds = seconds - measured_hours * 3600;

    if args.get(3).is_some_and(|a| a == "steady") {
        steady(&store, &mut agents, start, seconds).await?;
        store.close().await;
        drop(pg);
        return Ok(());
    }

    // Fill: every second but the last hour, through Store::ingest.
    let fill_started = Instant::now();
    let mut stored = 0u64;
    let mut second = 0i64;
    while second < fill_seconds {
        let n = (BATCHES_PER_INGEST as i64).min(fill_seconds - second);
        for agent in &mut agents {
            let batches: Vec<Batch> = (0..n)
                .map(|k| agent.batch(start + (second + k) * 1000))
                .collect();
            stored += store
                .ingest(&agent.host, &batches, &agent.map)
                .await?
                .samples;
        }
        second += n;
    }
    let fill_elapsed = fill_started.elapsed();
    let raw_filled = sizes(&store, "samples").await?;
    println!(
        "fill: {stored} samples through Store::ingest in {:.1} s ({:.0} samples/s, table growing from 0)",
        fill_elapsed.as_secs_f64(),
        stored as f64 / fill_elapsed.as_secs_f64()
    );

    // Ingest throughput on the filled table, interleaved with the anchor: each round
    // stores the same rows once through Store::ingest and once by raw binary COPY
    // (anchor rows carry series ids shifted out of the way and are deleted afterwards).
    const ANCHOR_SHIFT: i64 = 1_000_000_000;
    let (mut ours, mut anchor) = (Duration::ZERO, Duration::ZERO);
    let mut measured = 0u64;
    while second < seconds {
        let n = (BATCHES_PER_INGEST as i64).min(seconds - second);
        for agent in &mut agents {
            let batches: Vec<Batch> = (0..n)
                .map(|k| agent.batch(start + (second + k) * 1000))
                .collect();
            let rows: Vec<(i64, i64, f64)> = batches
                .iter()
                .flat_map(|b| {
                    b.series.iter().flat_map(move |s| {
                        s.points
                            .iter()
                            .map(move |&(o, v)| (s.series, b.base_ts_ms + i64::from(o), v))
                    })
                })
                .map(|(s, ts, v)| (agent.map[&s] + ANCHOR_SHIFT, ts, v))
                .collect();
            let t = Instant::now();
            measured += store
                .ingest(&agent.host, &batches, &agent.map)
                .await?
                .samples;
            ours += t.elapsed();
            let t = Instant::now();
            raw_copy(&store, &rows).await?;
            anchor += t.elapsed();
        }
        second += n;
    }
    let ours_rate = measured as f64 / ours.as_secs_f64();
    let anchor_rate = measured as f64 / anchor.as_secs_f64();
    println!(
        "ingest on a table of {stored}+ rows, {} samples per transaction ({BATCHES_PER_INGEST} one-second batches):",
        BATCHES_PER_INGEST * per_host
    );
    println!("  Store::ingest        {ours_rate:>12.0} samples/s");
    println!("  anchor raw COPY      {anchor_rate:>12.0} samples/s");
    println!(
        "  ratio                {:>12.1} %",
        100.0 * ours_rate / anchor_rate
    );
    sqlx::query("DELETE FROM samples WHERE series_id >= $1")
        .bind(ANCHOR_SHIFT)
        .execute(store.pool())
        .await?;
    let total = stored + measured;

    let t = Instant::now();
    let report = store.compact(at(end)).await?;
    let compact_elapsed = t.elapsed();
    println!(
        "compaction: {} samples in {} windows into {} chunks in {:.1} s ({:.0} samples/s)",
        report.samples,
        report.windows,
        report.chunks,
        compact_elapsed.as_secs_f64(),
        report.samples as f64 / compact_elapsed.as_secs_f64()
    );
    for table in ["samples", "sample_chunks", "rollups_1m"] {
        sqlx::raw_sql(&format!("VACUUM {table}"))
            .execute(store.pool())
            .await?;
    }
    let raw = sizes(&store, "samples").await?;
    let chunks = sizes(&store, "sample_chunks").await?;
    let rollups = sizes(&store, "rollups_1m").await?;
    println!("storage after compaction of {total} samples (tables, indexes and TOAST):");
    println!(
        "  raw rows (after the fill)    {:>12} bytes  {:>6.2} bytes/sample",
        raw_filled,
        raw_filled as f64 / stored as f64
    );
    print_tables(chunks, rollups, raw, total);

    // Query latency: one series, one hour from chunks at 1-minute steps, and the raw
    // recent data read right after an ingest.
    let id = agents[0].map[&5];
    let t = Instant::now();
    let points = store
        .series_points(id, at(end - 3_600_000), at(end), Duration::from_secs(60))
        .await?;
    let chunk_query = t.elapsed();
    let t = Instant::now();
    let rollups_day = store.series_rollups(id, at(start), at(end)).await?;
    let rollup_query = t.elapsed();
    println!(
        "queries: 1 h of one series at 60 s steps from chunks: {} points in {:.1} ms; {} h of 1-minute rollups: {} rows in {:.1} ms",
        points.len(),
        chunk_query.as_secs_f64() * 1e3,
        hours,
        rollups_day.len(),
        rollup_query.as_secs_f64() * 1e3
    );
    store.close().await;
    drop(pg);
    Ok(())
}

/// Steady state, as the collector runs it: samples arrive in time order and compaction
/// runs every 10 simulated minutes on what is older than 15 minutes (the collector's
/// default `compact_after`), so the raw partition only ever holds the unsettled tail.
/// Reports every sample table's size, raw partition included, after `seconds` of data.
async fn steady(
    store: &Store,
    agents: &mut [Agent],
    start: i64,
    seconds: i64,
) -> Result<(), Box<dyn std::error::Error>> {
    const COMPACT_EVERY_S: i64 = 600;
    const SETTLE_MS: i64 = 15 * 60 * 1000;
    let began = Instant::now();
    let (mut stored, mut compacted) = (0u64, 0u64);
    let mut compact_time = Duration::ZERO;
    let mut raw_peak = 0i64;
    let mut second = 0i64;
    let mut next_compaction = COMPACT_EVERY_S;
    while second < seconds {
        let n = (BATCHES_PER_INGEST as i64).min(seconds - second);
        for agent in agents.iter_mut() {
            let batches: Vec<Batch> = (0..n)
                .map(|k| agent.batch(start + (second + k) * 1000))
                .collect();
            stored += store
                .ingest(&agent.host, &batches, &agent.map)
                .await?
                .samples;
        }
        second += n;
        if second >= next_compaction {
            next_compaction += COMPACT_EVERY_S;
            raw_peak = raw_peak.max(sizes(store, "samples").await?);
            let t = Instant::now();
            compacted += store
                .compact(at(start + second * 1000 - SETTLE_MS))
                .await?
                .samples;
            compact_time += t.elapsed();
        }
    }
    let t = Instant::now();
    compacted += store.compact(at(start + seconds * 1000)).await?.samples;
    compact_time += t.elapsed();
    let elapsed = began.elapsed();
    let raw = sizes(store, "samples").await?;
    let chunks = sizes(store, "sample_chunks").await?;
    let rollups = sizes(store, "rollups_1m").await?;
    let per = |bytes: i64| bytes as f64 / stored as f64;
    println!(
        "steady state: {stored} samples ingested in time order with compaction every {} simulated minutes, in {:.1} s ({:.0} samples/s, compaction {:.1} s of it); {compacted} compacted",
        COMPACT_EVERY_S / 60,
        elapsed.as_secs_f64(),
        stored as f64 / elapsed.as_secs_f64(),
        compact_time.as_secs_f64()
    );
    println!(
        "storage after {} h (tables, indexes and TOAST):",
        seconds / 3600
    );
    println!("  raw partition, largest seen   {raw_peak:>12} bytes  (the unsettled tail)");
    print_tables(chunks, rollups, raw, stored);
    println!(
        "  same, raw at its largest     {:>12} bytes  {:>6.2} bytes/sample",
        chunks + rollups + raw_peak.max(raw),
        per(chunks + rollups + raw_peak.max(raw))
    );
    Ok(())
}

/// Sizes of the sample tables per stored sample.
fn print_tables(chunks: i64, rollups: i64, raw: i64, samples: u64) {
    let per = |bytes: i64| bytes as f64 / samples as f64;
    for (what, bytes) in [
        ("chunks", chunks),
        ("1-minute rollups", rollups),
        ("raw left", raw),
    ] {
        println!(
            "  {what:<28} {bytes:>12} bytes  {:>6.2} bytes/sample",
            per(bytes)
        );
    }
    println!(
        "  {:<28} {:>12} bytes  {:>6.2} bytes/sample (goal ≤ 3)",
        "all sample tables",
        chunks + rollups + raw,
        per(chunks + rollups + raw)
    );
}
