//! Fleet load benchmark: simulated agents, each a real QUIC connection with its own
//! certificate, against a real collector process and a real PostgreSQL on this machine.
//!
//! Run: `cargo run --release -p razar-collector --example fleet_bench [-- OPTIONS]`
//! (`-- --help` lists them; `-- --quick` is a short smoke run).
//!
//! Phases, each printed with its figures:
//! 1. prefill: raw COPY of realistic GPU-fleet rows so `samples` holds >= 10 M rows;
//! 2. anchor: raw batched binary COPY of the same kind of rows into the same table,
//!    with 1, 2 and 4 writers (before and after the peak phase; the best rate is the
//!    anchor);
//! 3. peak: N agents replay a backlog as fast as acknowledgements allow (the
//!    collector's own back-pressure and `max_unacked_batches` window); stored samples/s
//!    and the ratio to the anchor; then a sustained anchor: 4 raw COPY writers for as
//!    long as the peak's measured window (`--no-sustained-anchor` skips it);
//! 4. sustained: 1,000 agents × one 100-sample batch per second for 60 s; ack latency
//!    (agent-side, from writing a batch to reading the `Ack` covering it), stored
//!    samples/s, collector CPU and RSS;
//! 5. idle: 10,000 connections with 1 s heartbeats held for 30 s; collector RSS total
//!    and per connection.
//!
//! Layout: PostgreSQL (fsync on, product settings) is started by this process; the
//! collector is this same binary re-executed as `fleet_bench --serve CONFIG`, which runs
//! `razar_collector::service::Service` (what `razar-collector run --config` runs) in its
//! own process, a fresh one per phase, so its CPU (utime+stime) and RSS (VmRSS) are read
//! from `/proc/<pid>` apart from the load generator's (this process) and PostgreSQL's
//! (the postmaster and its backends). All three share the machine's cores. Background
//! compaction is deferred (`compact_after` = 10 years) so it does not eat the table under
//! measurement; its cost is measured by `store_bench`, which also gives the bytes on disk
//! per stored sample after 24 h of simulated fleet data.
//!
//! Agent certificates carry the same profile as `razar-certs issue agent` (URI SAN
//! `razar://host/<id>`, clientAuth, ECDSA P-256) and are signed with the fleet CA's key
//! by rcgen in memory: `Ca::issue_agent` rewrites the whole CA index per certificate,
//! which makes 10,000 issuances quadratic.

use std::collections::VecDeque;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context as _};
use clap::Parser;
use razar_certs::{Ca, InitOptions, IssueOptions};
use razar_collector::embedded_pg::{EmbeddedPg, EmbeddedPgOptions};
use razar_collector::store::{SeriesId, Store};
use razar_shared::protocol::codec::{encode_agent, encode_into, CollectorFrameDecoder};
use razar_shared::protocol::{
    AgentMessage, Batch, CollectorMessage, GpuInfo, Heartbeat, Hello, SeriesDef, SeriesPoints,
    StatusDigest, Welcome, PROTOCOL_MAX, PROTOCOL_MIN,
};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinSet;

#[path = "support/sim.rs"]
mod sim;
use sim::{Rng, Shape};

const GPUS: u32 = 8;
const DAY_MS: i64 = 86_400_000;
/// Series per agent in the peak phase: 8 GPUs × 15 metrics + 20 host metrics (as in
/// `store_bench`).
const PEAK_SERIES: usize = 140;

#[derive(Debug, Parser)]
#[command(
    name = "fleet_bench",
    about = "Razar fleet load benchmark (collector + PostgreSQL on this machine)"
)]
struct Opts {
    /// Short smoke run: 1 M prefill, 20 peak agents, 100 sustained agents, 1,000 idle.
    #[arg(long)]
    quick: bool,
    /// Phases to run, comma-separated, from: peak, sustained, idle (prefill and anchor
    /// run with peak).
    #[arg(long, default_value = "peak,sustained,idle")]
    phases: String,
    /// Rows in `samples` before the anchor and peak phases.
    #[arg(long)]
    prefill_rows: Option<u64>,
    /// Rows per anchor run (each of 6 runs: 1, 2 and 4 writers, before and after peak).
    #[arg(long)]
    anchor_rows: Option<u64>,
    /// Skip the sustained anchor (4 raw COPY writers for as long as the peak's measured
    /// window, after the peak).
    #[arg(long)]
    no_sustained_anchor: bool,
    /// Rows per transaction of the anchor (raw batched COPY).
    #[arg(long, default_value_t = 10_000)]
    anchor_batch: usize,
    /// Agents in the peak phase.
    #[arg(long)]
    peak_agents: Option<usize>,
    /// Measured seconds of the peak phase (after a warm-up).
    #[arg(long)]
    peak_secs: Option<u64>,
    /// Agents in the sustained phase.
    #[arg(long)]
    sustained_agents: Option<usize>,
    /// Samples per second per agent in the sustained phase (one batch per second).
    #[arg(long, default_value_t = 100)]
    sustained_rate: usize,
    /// Measured seconds of the sustained phase (after a warm-up).
    #[arg(long)]
    sustained_secs: Option<u64>,
    /// Connections in the idle phase.
    #[arg(long)]
    idle_conns: Option<usize>,
    /// Seconds the idle connections are held once all are up.
    #[arg(long)]
    idle_secs: Option<u64>,
    /// Warm-up seconds before each measured window.
    #[arg(long)]
    warmup_secs: Option<u64>,
    /// Agent connections per client UDP socket (quinn endpoint) in the load generator.
    #[arg(long, default_value_t = 100)]
    conns_per_endpoint: usize,
    /// Connection handshakes (QUIC + Hello/Welcome) in progress at once.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Receive buffer asked for each load-generator UDP socket (capped by the kernel's
    /// net.core.rmem_max); the collector asks for 8 MiB on its own socket.
    #[arg(long, default_value_t = 4 << 20)]
    client_rcvbuf: usize,
    /// Print one line per second during the measured windows of peak and sustained.
    #[arg(long)]
    timeline: bool,
    /// Skip settling the database (VACUUM ANALYZE + CHECKPOINT) before each measured step.
    #[arg(long)]
    no_settle: bool,
    /// The collector's database pool size (`database.pool_size`).
    #[arg(long, default_value_t = 16)]
    pool_size: u32,
    /// The collector's group-commit writers (`database.ingest_writers`); the collector's
    /// default when absent.
    #[arg(long)]
    ingest_writers: Option<u32>,
    /// Of those writers, how many may run their `COPY` at once
    /// (`database.ingest_copy_slots`); the collector's default when absent.
    #[arg(long)]
    ingest_copy_slots: Option<u32>,
    /// PostgreSQL `shared_buffers` (the embedded product default is 128MB).
    #[arg(long, default_value = "128MB")]
    shared_buffers: String,
    /// During the peak phase, read one series' history through the API once a second
    /// (a watched dashboard): the collector then keeps the raw samples' BRIN indexes
    /// summarized, which it does not do without readers.
    #[arg(long)]
    history_reader: bool,
}

/// The effective settings after `--quick` and the defaults.
#[derive(Debug, Clone)]
struct Plan {
    peak: bool,
    sustained: bool,
    idle: bool,
    prefill_rows: u64,
    anchor_rows: u64,
    sustained_anchor: bool,
    anchor_batch: usize,
    peak_agents: usize,
    peak_secs: u64,
    sustained_agents: usize,
    sustained_rate: usize,
    sustained_secs: u64,
    idle_conns: usize,
    idle_secs: u64,
    warmup_secs: u64,
    conns_per_endpoint: usize,
    connect_concurrency: usize,
    client_rcvbuf: usize,
    timeline: bool,
    settle: bool,
    pool_size: u32,
    ingest_writers: Option<u32>,
    ingest_copy_slots: Option<u32>,
    shared_buffers: String,
    history_reader: bool,
}

impl Plan {
    fn from(o: Opts) -> anyhow::Result<Plan> {
        let q = o.quick;
        let mut plan = Plan {
            peak: false,
            sustained: false,
            idle: false,
            prefill_rows: o
                .prefill_rows
                .unwrap_or(if q { 1_000_000 } else { 10_000_000 }),
            anchor_rows: o.anchor_rows.unwrap_or(if q { 300_000 } else { 2_000_000 }),
            sustained_anchor: !o.no_sustained_anchor,
            history_reader: o.history_reader,
            anchor_batch: o.anchor_batch.max(1),
            peak_agents: o.peak_agents.unwrap_or(if q { 20 } else { 100 }).max(1),
            peak_secs: o.peak_secs.unwrap_or(if q { 10 } else { 30 }).max(1),
            sustained_agents: o.sustained_agents.unwrap_or(if q { 100 } else { 1_000 }),
            sustained_rate: o.sustained_rate.clamp(1, 10_000),
            sustained_secs: o.sustained_secs.unwrap_or(if q { 15 } else { 60 }).max(1),
            idle_conns: o.idle_conns.unwrap_or(if q { 1_000 } else { 10_000 }),
            idle_secs: o.idle_secs.unwrap_or(if q { 10 } else { 30 }).max(1),
            warmup_secs: o.warmup_secs.unwrap_or(if q { 3 } else { 5 }),
            conns_per_endpoint: o.conns_per_endpoint.max(1),
            connect_concurrency: o.connect_concurrency.max(1),
            client_rcvbuf: o.client_rcvbuf,
            timeline: o.timeline,
            settle: !o.no_settle,
            pool_size: o.pool_size.max(2),
            ingest_writers: o.ingest_writers,
            ingest_copy_slots: o.ingest_copy_slots,
            shared_buffers: o.shared_buffers,
        };
        for phase in o.phases.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match phase {
                "peak" => plan.peak = true,
                "sustained" => plan.sustained = true,
                "idle" => plan.idle = true,
                other => bail!("unknown phase {other:?} (peak, sustained, idle)"),
            }
        }
        Ok(plan)
    }
}

/// The collector binary's allocator, so the collector this re-executes (`--serve`) runs
/// as `razar-collector` does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--serve") {
        let config = args
            .get(2)
            .context("--serve needs the collector config path")?;
        return serve(Path::new(config));
    }
    let plan = Plan::from(Opts::parse())?;
    razar_shared::tls::install_crypto_provider();
    // One worker: the simulated agents stand for other machines, so the load generator
    // should take as little of the collector's and PostgreSQL's cores as it can; on one
    // thread its tasks wake each other without cross-thread hand-offs. (Row generation
    // for the anchor runs via block_in_place, off that thread.)
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(bench(plan))
}

// ---------------------------------------------------------------------------------------
// The collector process.

/// `fleet_bench --serve CONFIG`: the collector service, as `razar-collector run` starts
/// it, until stdin closes.
fn serve(config: &Path) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let config = razar_collector::config::CollectorConfig::load(config)?;
        let service = razar_collector::service::Service::start(config).await?;
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "READY {} {}", service.quic_addr(), service.http_addr())?;
            out.flush()?;
        }
        let mut sink = Vec::new();
        let _ = tokio::io::stdin().read_to_end(&mut sink).await;
        service.shutdown().await;
        Ok(())
    })
}

/// A collector child process.
struct CollectorProc {
    child: tokio::process::Child,
    stdin: Option<tokio::process::ChildStdin>,
    pid: u32,
    quic: SocketAddr,
    http: SocketAddr,
    log: PathBuf,
}

impl CollectorProc {
    async fn spawn(config: &Path, log: PathBuf) -> anyhow::Result<CollectorProc> {
        let exe = std::env::current_exe()?;
        let log_file = std::fs::File::create(&log)?;
        let mut child = tokio::process::Command::new(exe)
            .arg("--serve")
            .arg(config)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().context("collector child has no pid")?;
        let stdout = child.stdout.take().context("collector stdout")?;
        let stdin = child.stdin.take();
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .map_err(|_| anyhow!("collector not ready within 60 s (see {})", log.display()))??
            .ok_or_else(|| anyhow!("collector exited at start (see {})", log.display()))?;
        let mut parts = line.split_whitespace();
        if parts.next() != Some("READY") {
            bail!("unexpected collector output {line:?}");
        }
        let quic = parts.next().context("quic address")?.parse()?;
        let http = parts.next().context("http address")?.parse()?;
        Ok(CollectorProc {
            child,
            stdin,
            pid,
            quic,
            http,
            log,
        })
    }

    async fn health(&self, client: &reqwest::Client) -> anyhow::Result<Health> {
        let v: serde_json::Value = client
            .get(format!("http://{}/api/v1/health", self.http))
            .send()
            .await?
            .json()
            .await?;
        Ok(Health {
            samples_stored: v["samples_stored"].as_u64().unwrap_or(0),
            batches_stored: v["batches_stored"].as_u64().unwrap_or(0),
            agents_connected: v["agents_connected"].as_i64().unwrap_or(0),
            connections_paused: v["connections_paused"].as_i64().unwrap_or(0),
        })
    }

    /// Closes stdin (the service shuts down in order), then waits; kills after 20 s.
    async fn stop(mut self) {
        drop(self.stdin.take());
        if tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .is_err()
        {
            eprintln!(
                "collector did not stop within 20 s; killing it (log {})",
                self.log.display()
            );
            let _ = self.child.kill().await;
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Health {
    samples_stored: u64,
    batches_stored: u64,
    agents_connected: i64,
    connections_paused: i64,
}

// ---------------------------------------------------------------------------------------
// /proc measurements.

#[derive(Debug, Clone, Copy, Default)]
struct ProcStat {
    ppid: u32,
    /// utime + stime, clock ticks.
    own: u64,
    /// cutime + cstime (reaped children), clock ticks.
    children: u64,
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = text.get(text.rfind(')')? + 1..)?;
    let f: Vec<&str> = after.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok());
    Some(ProcStat {
        ppid: n(1)? as u32,
        own: n(11)? + n(12)?,
        children: n(13)? + n(14)?,
    })
}

fn proc_status_kb(pid: u32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// CPU ticks of the postmaster, its reaped children and its live children.
fn pg_ticks(postmaster: u32) -> u64 {
    let mut total = proc_stat(postmaster).map_or(0, |s| s.own + s.children);
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(s) = proc_stat(pid) {
                if s.ppid == postmaster {
                    total += s.own;
                }
            }
        }
    }
    total
}

/// (busy, stolen, total) jiffies of the whole machine; busy excludes the time the
/// hypervisor gave our virtual CPUs to someone else (steal).
fn machine_ticks() -> (u64, u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|s| s.parse().ok())
        .collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    let total: u64 = v.iter().take(8).sum();
    let steal = at(7);
    (total.saturating_sub(at(3) + at(4) + steal), steal, total)
}

/// Datagrams dropped by the kernel (receive buffer full) on the UDP socket bound to
/// `port` and on every other UDP socket of the machine (the load generator's), from the
/// `drops` column of /proc/net/udp.
fn udp_drops(port: u16) -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/net/udp").unwrap_or_default();
    let (mut server, mut others) = (0, 0);
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let local_port = f
            .get(1)
            .and_then(|a| a.split(':').nth(1))
            .and_then(|p| u16::from_str_radix(p, 16).ok());
        let drops: u64 = f.last().and_then(|d| d.parse().ok()).unwrap_or(0);
        if local_port == Some(port) {
            server += drops;
        } else {
            others += drops;
        }
    }
    (server, others)
}

fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// What a measurement window saw.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    secs: f64,
    /// Percent of one core.
    collector_cpu: f64,
    pg_cpu: f64,
    loadgen_cpu: f64,
    /// Percent of the whole machine (all cores) busy, and stolen by the hypervisor.
    machine_busy: f64,
    steal: f64,
    collector_rss_kb: u64,
    collector_rss_max_kb: u64,
    loadgen_rss_kb: u64,
    pg_commits_per_s: f64,
    /// UDP datagrams dropped by the kernel on the collector's socket / the others.
    collector_udp_drops: u64,
    loadgen_udp_drops: u64,
    /// PostgreSQL checkpoints started, WAL written, seconds an autovacuum worker ran.
    checkpoints: i64,
    wal_mb_per_s: f64,
    autovacuum_secs: u64,
}

impl Usage {
    /// CPU of everything else on the machine (other tenants' processes, the kernel's own
    /// threads), in % of one core; steal not included.
    fn others_cpu(&self) -> f64 {
        (self.machine_busy * cores() as f64 - self.collector_cpu - self.pg_cpu - self.loadgen_cpu)
            .max(0.0)
    }
}

struct Window {
    started: Instant,
    collector: u32,
    postmaster: u32,
    collector_ticks: u64,
    pg_ticks: u64,
    loadgen_ticks: u64,
    machine: (u64, u64, u64),
    commits: i64,
    port: u16,
    drops: (u64, u64),
    pg: (i64, f64),
    autovacuum: Arc<AtomicU64>,
    rss_max: Arc<AtomicU64>,
    sampling: Arc<AtomicBool>,
}

struct Meter {
    tck: f64,
    postmaster: u32,
    store: Store,
}

impl Meter {
    async fn commits(&self) -> i64 {
        sqlx::query_scalar(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(self.store.pool())
        .await
        .unwrap_or(0)
    }

    /// (checkpoints started, WAL bytes written) since the server started.
    async fn pg_counters(&self) -> (i64, f64) {
        sqlx::query_as(
            "SELECT (SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter)::int8,
                    (SELECT wal_bytes FROM pg_stat_wal)::float8",
        )
        .fetch_one(self.store.pool())
        .await
        .unwrap_or((0, 0.0))
    }

    /// Starts a measurement window; `collector` 0 when none runs.
    async fn start(&self, collector: u32, port: u16) -> Window {
        let rss_max = Arc::new(AtomicU64::new(0));
        let autovacuum = Arc::new(AtomicU64::new(0));
        let sampling = Arc::new(AtomicBool::new(true));
        {
            let (rss_max, sampling, autovacuum) =
                (rss_max.clone(), sampling.clone(), autovacuum.clone());
            let store = self.store.clone();
            tokio::spawn(async move {
                let mut k = 0u64;
                while sampling.load(Ordering::Relaxed) {
                    if let Some(kb) = proc_status_kb(collector, "VmRSS:") {
                        rss_max.fetch_max(kb, Ordering::Relaxed);
                    }
                    if k == 0 {
                        let workers: i64 = sqlx::query_scalar(
                            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'",
                        )
                        .fetch_one(store.pool())
                        .await
                        .unwrap_or(0);
                        if workers > 0 {
                            autovacuum.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    k = (k + 1) & 3;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            });
        }
        Window {
            started: Instant::now(),
            collector,
            postmaster: self.postmaster,
            collector_ticks: proc_stat(collector).map_or(0, |s| s.own),
            pg_ticks: pg_ticks(self.postmaster),
            loadgen_ticks: proc_stat(std::process::id()).map_or(0, |s| s.own),
            machine: machine_ticks(),
            commits: self.commits().await,
            port,
            drops: udp_drops(port),
            pg: self.pg_counters().await,
            autovacuum,
            rss_max,
            sampling,
        }
    }

    async fn finish(&self, w: Window) -> Usage {
        let secs = w.started.elapsed().as_secs_f64().max(1e-3);
        let pct = |ticks: u64| ticks as f64 / self.tck / secs * 100.0;
        let collector_ticks = proc_stat(w.collector).map_or(0, |s| s.own);
        let pg = pg_ticks(w.postmaster);
        let loadgen = proc_stat(std::process::id()).map_or(0, |s| s.own);
        let machine = machine_ticks();
        let commits = self.commits().await;
        let drops = udp_drops(w.port);
        let pg_counters = self.pg_counters().await;
        w.sampling.store(false, Ordering::Relaxed);
        let rss = proc_status_kb(w.collector, "VmRSS:").unwrap_or(0);
        let busy = machine.0.saturating_sub(w.machine.0) as f64;
        let stolen = machine.1.saturating_sub(w.machine.1) as f64;
        let total = machine.2.saturating_sub(w.machine.2).max(1) as f64;
        Usage {
            secs,
            collector_cpu: pct(collector_ticks.saturating_sub(w.collector_ticks)),
            pg_cpu: pct(pg.saturating_sub(w.pg_ticks)),
            loadgen_cpu: pct(loadgen.saturating_sub(w.loadgen_ticks)),
            machine_busy: busy / total * 100.0,
            steal: stolen / total * 100.0,
            collector_rss_kb: rss,
            collector_rss_max_kb: w.rss_max.load(Ordering::Relaxed).max(rss),
            loadgen_rss_kb: proc_status_kb(std::process::id(), "VmRSS:").unwrap_or(0),
            pg_commits_per_s: (commits - w.commits) as f64 / secs,
            collector_udp_drops: drops.0.saturating_sub(w.drops.0),
            loadgen_udp_drops: drops.1.saturating_sub(w.drops.1),
            checkpoints: pg_counters.0 - w.pg.0,
            wal_mb_per_s: (pg_counters.1 - w.pg.1) / 1048576.0 / secs,
            autovacuum_secs: w.autovacuum.load(Ordering::Relaxed),
        }
    }
}

fn print_usage(u: &Usage) {
    println!(
        "  CPU (% of one core, {:.0} s): collector {:.0} %, PostgreSQL {:.0} %, load generator {:.0} %, other processes {:.0} %; machine {:.0} % busy + {:.0} % stolen by the hypervisor, of {} cores",
        u.secs,
        u.collector_cpu,
        u.pg_cpu,
        u.loadgen_cpu,
        u.others_cpu(),
        u.machine_busy,
        u.steal,
        cores()
    );
    println!(
        "  RSS: collector {} (max {}), load generator {}; PostgreSQL commits {:.0}/s; UDP datagrams dropped (receive buffer full): collector socket {}, load generator sockets {}",
        mib(u.collector_rss_kb),
        mib(u.collector_rss_max_kb),
        mib(u.loadgen_rss_kb),
        u.pg_commits_per_s,
        u.collector_udp_drops,
        u.loadgen_udp_drops
    );
    println!(
        "  PostgreSQL: WAL {:.1} MiB/s, {} checkpoint(s) started, an autovacuum worker running during {} s",
        u.wal_mb_per_s, u.checkpoints, u.autovacuum_secs
    );
}

/// Flushes what earlier steps left behind (dirty pages, tables to vacuum) so that each
/// measured step starts from a settled database.
async fn settle(env: &Env, before: &str) -> anyhow::Result<()> {
    if !env.plan.settle {
        return Ok(());
    }
    let t = Instant::now();
    sqlx::raw_sql("VACUUM (ANALYZE) samples")
        .execute(env.store.pool())
        .await?;
    sqlx::raw_sql("CHECKPOINT")
        .execute(env.store.pool())
        .await?;
    println!(
        "  (settled before {before}: VACUUM (ANALYZE) samples + CHECKPOINT in {:.1} s)",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn mib(kb: u64) -> String {
    format!("{:.1} MiB", kb as f64 / 1024.0)
}

// ---------------------------------------------------------------------------------------
// Simulated telemetry.

const GPU_METRICS: [(&str, Shape); 15] = [
    ("gpu_utilization_ratio", Shape::Utilisation),
    ("gpu_temperature_celsius", Shape::Temperature),
    ("gpu_power_watts", Shape::Power),
    ("gpu_memory_used_bytes", Shape::MemoryUsed),
    ("gpu_sm_clock_mhz", Shape::Clock),
    ("gpu_memory_utilization_ratio", Shape::Utilisation),
    ("gpu_pcie_tx_bytes_per_second", Shape::Rate(2.0e9)),
    ("gpu_pcie_rx_bytes_per_second", Shape::Rate(6.0e8)),
    ("gpu_ecc_corrected_total", Shape::RareCounter),
    ("gpu_memory_total_bytes", Shape::Constant(85_899_345_920.0)),
    ("gpu_power_limit_watts", Shape::Constant(700.0)),
    ("gpu_memory_clock_mhz", Shape::Constant(2619.0)),
    ("gpu_fan_speed_ratio", Shape::Constant(0.0)),
    ("gpu_throttle_reasons", Shape::Constant(0.0)),
    ("gpu_ecc_uncorrected_total", Shape::Constant(0.0)),
];

const HOST_METRICS: [(&str, Shape); 20] = [
    ("host_cpu_usage_ratio", Shape::CpuShare),
    ("host_load1", Shape::Load),
    ("host_memory_used_bytes", Shape::HostMemory),
    ("host_network_rx_bytes_per_second", Shape::Rate(1.0e8)),
    ("host_network_tx_bytes_per_second", Shape::Rate(8.0e7)),
    ("host_disk_read_bytes_per_second", Shape::Rate(5.0e6)),
    ("host_disk_write_bytes_per_second", Shape::Rate(2.0e7)),
    ("host_memory_available_bytes", Shape::HostMemory),
    ("component_cpu_usage_ratio", Shape::CpuShare),
    ("component_memory_rss_bytes", Shape::HostMemory),
    ("host_load5", Shape::Load),
    ("host_load15", Shape::Load),
    ("host_swap_used_bytes", Shape::Constant(0.0)),
    ("host_disk_used_bytes", Shape::HostMemory),
    ("host_processes", Shape::Constant(412.0)),
    ("host_open_files", Shape::Constant(9120.0)),
    ("component_cpu_usage_ratio", Shape::CpuShare),
    ("component_memory_rss_bytes", Shape::HostMemory),
    ("component_cpu_usage_ratio", Shape::CpuShare),
    ("component_memory_rss_bytes", Shape::HostMemory),
];

/// `count` series: about 88 % GPU metrics over 8 GPUs, the rest host metrics (140 gives
/// 8 × 15 + 20, 100 gives 8 × 11 + 12).
fn series_layout(count: usize) -> Vec<(SeriesDef, Shape)> {
    let per_gpu = (count * 88 / 100 / GPUS as usize).clamp(1, GPU_METRICS.len());
    let mut out = Vec::with_capacity(count);
    'gpus: for gpu in 0..GPUS {
        for (metric, shape) in GPU_METRICS.iter().take(per_gpu) {
            if out.len() == count {
                break 'gpus;
            }
            out.push((
                SeriesDef {
                    id: out.len() as u32,
                    metric: (*metric).to_owned(),
                    labels: vec![("gpu".to_owned(), gpu.to_string())],
                },
                *shape,
            ));
        }
    }
    let mut slot = 0usize;
    while out.len() < count {
        let (metric, shape) = HOST_METRICS[slot % HOST_METRICS.len()];
        out.push((
            SeriesDef {
                id: out.len() as u32,
                metric: metric.to_owned(),
                labels: vec![("slot".to_owned(), slot.to_string())],
            },
            shape,
        ));
        slot += 1;
    }
    out
}

/// One agent's simulated series.
/// One simulated host: its series (shapes shared with `store_bench`) and their latest values.
struct Sim {
    series: Vec<sim::Sim>,
    values: Vec<f64>,
    rng: Rng,
}

impl Sim {
    fn new(index: usize, layout: &[(SeriesDef, Shape)]) -> Sim {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((index as u64 + 1) * 0x1234_5678_9abc));
        let series = layout
            .iter()
            .map(|(_, shape)| sim::Sim::new(*shape, &mut rng))
            .collect();
        Sim {
            series,
            values: vec![0.0; layout.len()],
            rng,
        }
    }

    /// Advances one second; the values are in `self.values`. Temperature and power follow
    /// the utilisation series seen last.
    fn step(&mut self) {
        let mut util = 50.0;
        for (series, value) in self.series.iter_mut().zip(self.values.iter_mut()) {
            *value = series.step(&mut self.rng, util);
            if matches!(series.shape(), Shape::Utilisation) {
                util = *value;
            }
        }
    }

    /// The next second's batch, written into `batch` (a batch this method filled before,
    /// or an empty one): every series sampled once, with a few milliseconds of jitter as
    /// a real sampling loop has. Reuses the batch's allocations, so the load generator
    /// spends its CPU on the wire rather than on building values.
    fn fill(&mut self, batch: &mut Batch, seq: u64, base_ts_ms: i64) {
        self.step();
        let jitter = (self.rng.next() % 4) as u32;
        batch.seq = seq;
        batch.base_ts_ms = base_ts_ms;
        batch.events.clear();
        batch
            .series
            .resize_with(self.values.len(), || SeriesPoints {
                series: 0,
                points: Vec::with_capacity(1),
            });
        for (i, (points, v)) in batch.series.iter_mut().zip(&self.values).enumerate() {
            points.series = i as u32;
            points.points.clear();
            points.points.push((jitter, *v));
        }
    }
}

fn hello(host: &str, index: usize) -> Hello {
    Hello {
        protocol_min: PROTOCOL_MIN,
        protocol_max: PROTOCOL_MAX,
        host_id: host.to_owned(),
        agent_version: "fleet-bench".to_owned(),
        profile: "core".to_owned(),
        components: Vec::new(),
        gpus: (0..GPUS)
            .map(|g| GpuInfo {
                index: g,
                uuid: format!("GPU-{index:08x}-{g:04x}-bench"),
                name: "NVIDIA H100 80GB HBM3".to_owned(),
                pci_bus_id: format!("00000000:{:02X}:00.0", 0x18 + g * 0x10),
                memory_total_bytes: 85_899_345_920,
            })
            .collect(),
        last_acked_seq: 0,
        agent_time_ms: unix_ms(),
    }
}

fn unix_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn host_name(index: usize) -> String {
    format!("fleet-{index:05}")
}

// ---------------------------------------------------------------------------------------
// Raw binary COPY (prefill and anchor).

const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// One binary COPY stream of (series_id, ts, value) rows, as the store's ingest writes.
struct CopyBuf {
    buf: Vec<u8>,
    rows: u64,
}

impl CopyBuf {
    fn new(rows: usize) -> CopyBuf {
        let mut buf = Vec::with_capacity(21 + rows * 38);
        buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        buf.extend_from_slice(&[0; 8]);
        CopyBuf { buf, rows: 0 }
    }
    fn push(&mut self, id: i64, ts_ms: i64, v: f64) {
        self.buf.extend_from_slice(&3i16.to_be_bytes());
        self.buf.extend_from_slice(&8i32.to_be_bytes());
        self.buf.extend_from_slice(&id.to_be_bytes());
        self.buf.extend_from_slice(&8i32.to_be_bytes());
        self.buf
            .extend_from_slice(&(ts_ms * 1000 - PG_EPOCH_OFFSET_US).to_be_bytes());
        self.buf.extend_from_slice(&8i32.to_be_bytes());
        self.buf.extend_from_slice(&v.to_bits().to_be_bytes());
        self.rows += 1;
    }
    fn finish(mut self) -> (Vec<u8>, u64) {
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
        (self.buf, self.rows)
    }
}

async fn raw_copy(
    store: &Store,
    buf: impl std::ops::Deref<Target = [u8]>,
) -> Result<(), sqlx::Error> {
    let mut tx = store.pool().begin().await?;
    let mut sink = tx
        .copy_in_raw("COPY samples (series_id, ts, value) FROM STDIN (FORMAT binary)")
        .await?;
    sink.send(buf).await?;
    sink.finish().await?;
    tx.commit().await
}

/// Rows of the peak agents' series, one second of every agent after another, starting
/// at `second` (seconds after `base_ms`), as COPY buffers of `per_buf` rows.
struct RowSource {
    sims: Vec<Sim>,
    ids: Vec<Vec<SeriesId>>,
    base_ms: i64,
    second: i64,
}

impl RowSource {
    fn buffers(&mut self, rows: u64, per_buf: usize) -> Vec<(Vec<u8>, u64)> {
        let mut out = Vec::new();
        let mut left = rows;
        let mut current = CopyBuf::new(per_buf);
        while left > 0 {
            let ts = self.base_ms + self.second * 1000;
            for (sim, ids) in self.sims.iter_mut().zip(&self.ids) {
                sim.step();
                let jitter = (sim.rng.next() % 4) as i64;
                for (v, id) in sim.values.iter().zip(ids) {
                    current.push(*id, ts + jitter, *v);
                    left = left.saturating_sub(1);
                    if current.rows as usize >= per_buf {
                        out.push(std::mem::replace(&mut current, CopyBuf::new(per_buf)).finish());
                    }
                }
            }
            self.second += 1;
        }
        if current.rows > 0 {
            out.push(current.finish());
        }
        out
    }
}

/// Runs the COPY buffers with `writers` concurrent connections; returns rows/s.
async fn anchor_run(
    store: &Store,
    buffers: Vec<(Vec<u8>, u64)>,
    writers: usize,
) -> anyhow::Result<f64> {
    let rows: u64 = buffers.iter().map(|b| b.1).sum();
    let queue = Arc::new(Mutex::new(VecDeque::from(buffers)));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..writers {
        let (queue, store) = (queue.clone(), store.clone());
        tasks.spawn(async move {
            loop {
                let next = lock(&queue).pop_front();
                let Some((buf, _)) = next else {
                    return Ok::<_, sqlx::Error>(());
                };
                raw_copy(&store, buf).await?;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(rows as f64 / started.elapsed().as_secs_f64())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------------------
// Certificates.

struct AgentCert {
    host: String,
    cert_pem: String,
    key_pem: String,
}

/// Issues `n` agent certificates with the fleet CA's key, with the profile of
/// `Ca::issue_agent`.
fn issue_agents(ca_dir: &Path, n: usize) -> anyhow::Result<Vec<AgentCert>> {
    use rcgen::{
        CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType, SerialNumber,
    };
    let ca_pem = std::fs::read_to_string(ca_dir.join("ca.pem"))?;
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("ca.key"))?)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    let now = SystemTime::now();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let host = host_name(i);
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host.as_str());
        dn.push(DnType::OrganizationName, "Razar");
        params.distinguished_name = dn;
        let uri = format!("{}{host}", razar_shared::tls::HOST_URI_PREFIX);
        params.subject_alt_names = vec![SanType::URI(uri.try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let mut serial: [u8; 16] = rand::random();
        serial[0] = (serial[0] & 0x7f).max(1);
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.not_before = (now - Duration::from_secs(3600)).into();
        params.not_after = (now + Duration::from_secs(30 * 86_400)).into();
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &issuer)?;
        out.push(AgentCert {
            host,
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Simulated agents.

#[derive(Default)]
struct Stats {
    connected: AtomicUsize,
    failed: AtomicUsize,
    alive: AtomicUsize,
    sent_batches: AtomicU64,
    acked_batches: AtomicU64,
    acked_samples: AtomicU64,
    heartbeats_acked: AtomicU64,
    /// Batch ticks that found the unacknowledged window full (sustained phase).
    late: AtomicU64,
    recording: AtomicBool,
    stopping: AtomicBool,
    ack_us: Mutex<Vec<u32>>,
    heartbeat_us: Mutex<Vec<u32>>,
    connect_us: Mutex<Vec<u32>>,
    errors: Mutex<Vec<String>>,
    error_count: AtomicU64,
}

impl Stats {
    fn error(&self, e: impl std::fmt::Display) {
        self.error_count.fetch_add(1, Ordering::Relaxed);
        let mut errors = lock(&self.errors);
        if errors.len() < 5 {
            errors.push(e.to_string());
        }
    }
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// Batches written and not yet acknowledged, shared by an agent's writer and reader.
#[derive(Default)]
struct Flight {
    queue: Mutex<VecDeque<(u64, Instant, u32)>>,
    space: Notify,
    heartbeat_sent: Mutex<Option<Instant>>,
    closed: AtomicBool,
}

impl Flight {
    fn len(&self) -> usize {
        lock(&self.queue).len()
    }
    fn closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }
}

#[derive(Clone, Copy)]
enum Mode {
    /// Send as fast as the window allows; batch k of an agent is stamped `base_ms + k s`.
    Peak { base_ms: i64 },
    /// One batch per second stamped with the wall clock.
    Sustained,
    /// Heartbeats only.
    Idle,
}

struct Fleet {
    stats: Arc<Stats>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    _endpoints: Vec<quinn::Endpoint>,
}

struct AgentCtx {
    ca_pem: String,
    certs: Vec<AgentCert>,
    transport: Arc<quinn::TransportConfig>,
}

/// A client UDP socket for many agent connections, its receive buffer enlarged.
fn client_endpoint(rcvbuf: usize) -> anyhow::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let state = quinn::udp::UdpSocketState::new((&socket).into())?;
    if let Err(e) = state.set_recv_buffer_size((&socket).into(), rcvbuf) {
        eprintln!("cannot set the client socket's receive buffer: {e}");
    }
    let runtime = quinn::default_runtime().context("no async runtime")?;
    Ok(quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        runtime,
    )?)
}

/// The receive buffer the kernel grants a UDP socket asking for `bytes`.
fn granted_rcvbuf(bytes: usize) -> Option<usize> {
    let socket = std::net::UdpSocket::bind(SocketAddr::from(([127, 0, 0, 1], 0))).ok()?;
    let state = quinn::udp::UdpSocketState::new((&socket).into()).ok()?;
    let default = state.recv_buffer_size((&socket).into()).ok()?;
    state.set_recv_buffer_size((&socket).into(), bytes).ok()?;
    let granted = state.recv_buffer_size((&socket).into()).ok()?;
    println!("UDP receive buffers: system default {default} bytes (the collector's socket); load generator sockets asked {bytes}, granted {granted}");
    Some(granted)
}

/// Starts `hosts` agents (indices into the certificates) against `addr`.
fn launch(
    ctx: &Arc<AgentCtx>,
    hosts: std::ops::Range<usize>,
    series: usize,
    mode: Mode,
    addr: SocketAddr,
    plan: &Plan,
) -> anyhow::Result<Fleet> {
    let stats = Arc::new(Stats::default());
    let (stop, stop_rx) = watch::channel(false);
    let permits = Arc::new(Semaphore::new(plan.connect_concurrency));
    let layout = Arc::new(series_layout(series));
    let n = hosts.len();
    let endpoints: Vec<quinn::Endpoint> = (0..n.div_ceil(plan.conns_per_endpoint))
        .map(|_| client_endpoint(plan.client_rcvbuf))
        .collect::<anyhow::Result<_>>()?;
    let mut tasks = JoinSet::new();
    for (k, index) in hosts.enumerate() {
        let endpoint = endpoints[k / plan.conns_per_endpoint].clone();
        let (ctx, stats, permits, layout) =
            (ctx.clone(), stats.clone(), permits.clone(), layout.clone());
        let stop = stop_rx.clone();
        tasks.spawn(async move {
            agent(
                ctx, stats, index, endpoint, addr, layout, mode, stop, permits,
            )
            .await;
        });
    }
    Ok(Fleet {
        stats,
        stop,
        tasks,
        _endpoints: endpoints,
    })
}

impl Fleet {
    /// Waits until every agent connected or failed; prints progress. Returns the time.
    async fn wait_connected(&self, label: &str, within: Duration) -> Duration {
        let started = Instant::now();
        let n = self.tasks.len();
        let mut last_print = Instant::now();
        loop {
            let c = self.stats.connected.load(Ordering::Relaxed);
            let f = self.stats.failed.load(Ordering::Relaxed);
            if c + f >= n || started.elapsed() > within {
                break;
            }
            if last_print.elapsed() > Duration::from_secs(5) {
                println!(
                    "  {label}: {c} of {n} connected, {f} failed, {} still open...",
                    self.stats.alive.load(Ordering::Relaxed)
                );
                last_print = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        started.elapsed()
    }

    /// Tells every agent to finish its stream, waits for them (30 s at most).
    async fn stop(mut self) {
        self.stats.stopping.store(true, Ordering::Relaxed);
        self.stop.send_replace(true);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::time::timeout_at(deadline, self.tasks.join_next())
            .await
            .ok()
            .flatten()
            .is_some()
        {}
        self.tasks.abort_all();
    }
}

/// The agent's end of the stream, read frame by frame.
struct Reader {
    recv: quinn::RecvStream,
    decoder: CollectorFrameDecoder,
    pending: Vec<u8>,
    buf: Vec<u8>,
}

impl Reader {
    async fn next(&mut self) -> anyhow::Result<Option<CollectorMessage>> {
        loop {
            let mut input = &self.pending[..];
            let decoded = self.decoder.feed(&mut input)?;
            let consumed = self.pending.len() - input.len();
            self.pending.drain(..consumed);
            if let Some(msg) = decoded {
                return Ok(Some(msg));
            }
            match self.recv.read(&mut self.buf).await? {
                Some(n) => {
                    let got = self.buf.get(..n).unwrap_or_default();
                    self.pending.extend_from_slice(got);
                }
                None => return Ok(None),
            }
        }
    }
}

struct Link {
    conn: quinn::Connection,
    send: quinn::SendStream,
    reader: Reader,
    welcome: Welcome,
}

async fn write_msg(send: &mut quinn::SendStream, msg: &AgentMessage) -> anyhow::Result<()> {
    let frame = encode_agent(msg)?;
    send.write_all(&frame).await?;
    Ok(())
}

/// QUIC handshake with the agent's own certificate, `Hello`, `Welcome`.
async fn open_link(
    ctx: &AgentCtx,
    index: usize,
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
) -> anyhow::Result<Link> {
    let cert = ctx.certs.get(index).context("no certificate")?;
    let tls = razar_shared::tls::client_config(
        ctx.ca_pem.as_bytes(),
        cert.cert_pem.as_bytes(),
        cert.key_pem.as_bytes(),
    )?;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls))?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    client.transport_config(ctx.transport.clone());
    let conn = endpoint.connect_with(client, addr, "localhost")?.await?;
    let (mut send, recv) = conn.open_bi().await?;
    write_msg(&mut send, &AgentMessage::Hello(hello(&cert.host, index))).await?;
    let mut reader = Reader {
        recv,
        decoder: CollectorFrameDecoder::new(),
        pending: Vec::new(),
        buf: vec![0u8; 4096],
    };
    match reader.next().await? {
        Some(CollectorMessage::Welcome(welcome)) => Ok(Link {
            conn,
            send,
            reader,
            welcome,
        }),
        Some(CollectorMessage::Refusal(r)) => bail!("refused: {} ({})", r.reason.code(), r.message),
        Some(other) => bail!("expected Welcome, got {other:?}"),
        None => bail!(
            "stream ended before Welcome: {:?}",
            conn.close_reason().map(|r| r.to_string())
        ),
    }
}

#[allow(clippy::too_many_arguments)]
async fn agent(
    ctx: Arc<AgentCtx>,
    stats: Arc<Stats>,
    index: usize,
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    layout: Arc<Vec<(SeriesDef, Shape)>>,
    mode: Mode,
    stop: watch::Receiver<bool>,
    permits: Arc<Semaphore>,
) {
    let link = {
        let Ok(_permit) = permits.acquire().await else {
            return;
        };
        if *stop.borrow() {
            return;
        }
        let started = Instant::now();
        match tokio::time::timeout(
            Duration::from_secs(60),
            open_link(&ctx, index, &endpoint, addr),
        )
        .await
        {
            Ok(Ok(link)) => {
                lock(&stats.connect_us).push(micros(started.elapsed()));
                link
            }
            Ok(Err(e)) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                stats.error(format!("connect: {e:#}"));
                return;
            }
            Err(_) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                stats.error("connect: no Welcome within 60 s");
                return;
            }
        }
    };
    stats.alive.fetch_add(1, Ordering::Relaxed);
    stats.connected.fetch_add(1, Ordering::Relaxed);
    let Link {
        conn,
        mut send,
        reader,
        welcome,
    } = link;
    let flight = Arc::new(Flight::default());
    let reader_task = tokio::spawn(read_loop(reader, flight.clone(), stats.clone()));
    let result = match mode {
        Mode::Idle => idle_writer(&mut send, &welcome, &flight, stop).await,
        Mode::Peak { .. } | Mode::Sustained => {
            load_writer(
                &mut send, &welcome, &flight, &stats, index, &layout, mode, stop,
            )
            .await
        }
    };
    if let Err(e) = result {
        if !stats.stopping.load(Ordering::Relaxed) {
            stats.error(format!("write: {e:#}"));
        }
    }
    // The collector commits what it has, acknowledges it and closes.
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(15), reader_task).await;
    conn.close(0u32.into(), b"bench done");
}

async fn read_loop(mut reader: Reader, flight: Arc<Flight>, stats: Arc<Stats>) {
    loop {
        match reader.next().await {
            Ok(Some(CollectorMessage::Ack { upto })) => {
                let now = Instant::now();
                let recording = stats.recording.load(Ordering::Relaxed);
                let (mut batches, mut samples) = (0u64, 0u64);
                let mut latencies = Vec::new();
                {
                    let mut q = lock(&flight.queue);
                    while q.front().is_some_and(|f| f.0 <= upto) {
                        if let Some((_, sent, n)) = q.pop_front() {
                            batches += 1;
                            samples += u64::from(n);
                            if recording {
                                latencies.push(micros(now.saturating_duration_since(sent)));
                            }
                        }
                    }
                }
                stats.acked_batches.fetch_add(batches, Ordering::Relaxed);
                stats.acked_samples.fetch_add(samples, Ordering::Relaxed);
                if !latencies.is_empty() {
                    lock(&stats.ack_us).extend(latencies);
                }
                flight.space.notify_one();
            }
            Ok(Some(CollectorMessage::HeartbeatAck { .. })) => {
                stats.heartbeats_acked.fetch_add(1, Ordering::Relaxed);
                let sent = lock(&flight.heartbeat_sent).take();
                if let (Some(sent), true) = (sent, stats.recording.load(Ordering::Relaxed)) {
                    lock(&stats.heartbeat_us).push(micros(sent.elapsed()));
                }
            }
            Ok(Some(CollectorMessage::Refusal(r))) => {
                stats.error(format!("refused: {} ({})", r.reason.code(), r.message));
                break;
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => {
                if !stats.stopping.load(Ordering::Relaxed) {
                    stats.error(format!("read: {e:#}"));
                }
                break;
            }
        }
    }
    flight.closed.store(true, Ordering::Relaxed);
    flight.space.notify_one();
    stats.alive.fetch_sub(1, Ordering::Relaxed);
}

/// Resolves once the fleet is told to stop (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn heartbeat(flight: &Flight) -> AgentMessage {
    *lock(&flight.heartbeat_sent) = Some(Instant::now());
    AgentMessage::Heartbeat(Heartbeat {
        agent_time_ms: unix_ms(),
        digest: StatusDigest {
            gpus: GPUS,
            ..StatusDigest::default()
        },
    })
}

fn heartbeat_interval(welcome: &Welcome) -> Duration {
    Duration::from_millis(u64::from(welcome.config.heartbeat_interval_ms.max(10)))
}

async fn idle_writer(
    send: &mut quinn::SendStream,
    welcome: &Welcome,
    flight: &Flight,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let every = heartbeat_interval(welcome);
    let first = tokio::time::Instant::now() + every.mul_f64(rand::random::<f64>());
    let mut tick = tokio::time::interval_at(first, every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped(&mut stop) => return Ok(()),
        }
        if flight.closed() {
            bail!("connection closed by the collector");
        }
        write_msg(send, &heartbeat(flight)).await?;
    }
}

#[allow(clippy::too_many_arguments)]
async fn load_writer(
    send: &mut quinn::SendStream,
    welcome: &Welcome,
    flight: &Flight,
    stats: &Stats,
    index: usize,
    layout: &[(SeriesDef, Shape)],
    mode: Mode,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let defs: Vec<SeriesDef> = layout.iter().map(|(d, _)| d.clone()).collect();
    write_msg(send, &AgentMessage::DefineSeries(defs)).await?;
    let mut sim = Sim::new(index, layout);
    let mut next = AgentMessage::Batch(Batch {
        seq: 0,
        base_ts_ms: 0,
        series: Vec::new(),
        events: Vec::new(),
    });
    let mut frame_len = 0;
    let window = (welcome.config.max_unacked_batches as usize).max(1);
    let every = heartbeat_interval(welcome);
    let mut next_heartbeat = Instant::now() + every;
    let mut seq = welcome.acked_seq;
    let mut k: i64 = 0;
    // Sustained: one batch per second from a random phase in the second.
    let first = tokio::time::Instant::now() + Duration::from_secs(1).mul_f64(rand::random::<f64>());
    let mut tick = tokio::time::interval_at(first, Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        if flight.closed() {
            bail!("connection closed by the collector");
        }
        if let Mode::Sustained = mode {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stopped(&mut stop) => return Ok(()),
            }
        }
        if Instant::now() + Duration::from_millis(10) >= next_heartbeat {
            write_msg(send, &heartbeat(flight)).await?;
            next_heartbeat = Instant::now() + every;
        }
        if flight.len() >= window {
            if let Mode::Sustained = mode {
                stats.late.fetch_add(1, Ordering::Relaxed);
            }
            while flight.len() >= window && !flight.closed() {
                tokio::select! {
                    _ = flight.space.notified() => {}
                    _ = tokio::time::sleep_until(next_heartbeat.into()) => {
                        write_msg(send, &heartbeat(flight)).await?;
                        next_heartbeat = Instant::now() + every;
                    }
                    _ = stopped(&mut stop) => return Ok(()),
                }
            }
            if let Mode::Peak { .. } = mode {
                continue;
            }
        }
        seq += 1;
        let ts = match mode {
            Mode::Peak { base_ms } => base_ms + k * 1000,
            _ => unix_ms(),
        };
        k += 1;
        let AgentMessage::Batch(batch) = &mut next else {
            bail!("the batch template is a batch");
        };
        sim.fill(batch, seq, ts);
        let samples = batch.sample_count() as u32;
        // Sized from the last frame and handed to quinn without a copy.
        let mut frame = Vec::with_capacity(frame_len + 64);
        encode_into(&next, &mut frame)?;
        frame_len = frame.len();
        lock(&flight.queue).push_back((seq, Instant::now(), samples));
        send.write_chunk(bytes::Bytes::from(frame)).await?;
        stats.sent_batches.fetch_add(1, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------
// Reporting helpers.

#[derive(Debug, Clone, Copy, Default)]
struct Pcts {
    n: usize,
    p50: f64,
    p95: f64,
    p99: f64,
    max: f64,
}

/// Percentiles in milliseconds.
fn percentiles(mut us: Vec<u32>) -> Pcts {
    if us.is_empty() {
        return Pcts::default();
    }
    us.sort_unstable();
    let at = |q: f64| {
        let i = ((us.len() as f64 * q).ceil() as usize).clamp(1, us.len()) - 1;
        f64::from(us[i]) / 1000.0
    };
    Pcts {
        n: us.len(),
        p50: at(0.50),
        p95: at(0.95),
        p99: at(0.99),
        max: f64::from(us[us.len() - 1]) / 1000.0,
    }
}

fn print_errors(stats: &Stats) {
    let n = stats.error_count.load(Ordering::Relaxed);
    if n > 0 {
        println!("  agent errors: {n}; first ones:");
        for e in lock(&stats.errors).iter() {
            println!("    {e}");
        }
    }
}

fn fmt_rate(r: f64) -> String {
    let digits = (r.round() as u64).to_string();
    let mut groups = Vec::new();
    let mut end = digits.len();
    while end > 3 {
        groups.push(&digits[end - 3..end]);
        end -= 3;
    }
    groups.push(&digits[..end]);
    groups.reverse();
    groups.join(",")
}

// ---------------------------------------------------------------------------------------
// The benchmark.

#[derive(Debug, Default)]
struct Summary {
    table_rows: Option<i64>,
    anchor_1: Vec<f64>,
    anchor_2: Vec<f64>,
    anchor_4: Vec<f64>,
    /// 4 writers for as long as the peak's window, after it.
    anchor_sustained: Option<f64>,
    peak: Option<PeakResult>,
    sustained: Option<SustainedResult>,
    idle: Option<IdleResult>,
}

#[derive(Debug, Clone, Copy)]
struct PeakResult {
    agents: usize,
    stored_per_s: f64,
    acked_per_s: f64,
    ack: Pcts,
    usage: Usage,
}

#[derive(Debug, Clone, Copy)]
struct SustainedResult {
    agents: usize,
    rate: usize,
    connect_secs: f64,
    stored_per_s: f64,
    ack: Pcts,
    late: u64,
    errors: u64,
    usage: Usage,
}

#[derive(Debug, Clone, Copy)]
struct IdleResult {
    target: usize,
    held: usize,
    collector_reports: i64,
    connect_secs: f64,
    baseline_kb: u64,
    heartbeat: Pcts,
    heartbeats_per_s: f64,
    errors: u64,
    connecting: Usage,
    usage: Usage,
}

struct Env {
    plan: Plan,
    dir: PathBuf,
    config: PathBuf,
    store: Store,
    meter: Meter,
    ctx: Arc<AgentCtx>,
    http: reqwest::Client,
    spawned: usize,
}

impl Env {
    async fn collector(&mut self, phase: &str) -> anyhow::Result<CollectorProc> {
        self.spawned += 1;
        let log = self
            .dir
            .join(format!("collector-{}-{phase}.log", self.spawned));
        let c = CollectorProc::spawn(&self.config, log).await?;
        println!(
            "  collector pid {} on {} (log {})",
            c.pid,
            c.quic,
            c.log.display()
        );
        Ok(c)
    }
}

async fn bench(plan: Plan) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let mem_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|s| s.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let nofile = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .map(|l| {
                    l.split_whitespace()
                        .skip(3)
                        .take(2)
                        .collect::<Vec<_>>()
                        .join("/")
                })
        })
        .unwrap_or_default();
    println!(
        "machine: {} cores ({model}), {:.1} GiB RAM; RLIMIT_NOFILE soft/hard {nofile}",
        cores(),
        mem_kb as f64 / 1048576.0
    );
    println!("plan: {plan:?}");
    let _ = granted_rcvbuf(plan.client_rcvbuf);

    let dir = tempfile::Builder::new().prefix("razar-fleet").tempdir()?;
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let mut options = EmbeddedPgOptions::new(dir.path().join("pg"));
    options.shared_buffers = plan.shared_buffers.clone();
    options.max_connections = 200;
    let pg = EmbeddedPg::start(options).await?;
    let store = Store::connect_with(pg.connect_options(), 4).await?;
    store.migrate().await?;
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(store.pool())
        .await?;
    let postmaster: u32 = std::fs::read_to_string(pg.data_dir().join("postmaster.pid"))?
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .context("postmaster.pid")?;
    println!(
        "PostgreSQL {version} (fsync on, shared_buffers {}), postmaster pid {postmaster}",
        plan.shared_buffers
    );

    // The fleet CA, the collector's certificate, the agents' certificates.
    let ca_dir = dir.path().join("ca");
    let mut ca = Ca::init(&ca_dir, &InitOptions::default())?;
    let collector_cert = ca.issue_collector(&["localhost".to_owned()], &IssueOptions::days(30)?)?;
    ca.write_crl(Duration::from_secs(86_400))?;
    let hosts_needed = plan
        .idle_conns
        .max(plan.sustained_agents + plan.peak_agents);
    let started = Instant::now();
    let certs = issue_agents(&ca_dir, hosts_needed)?;
    let issue_secs = started.elapsed().as_secs_f64();
    println!(
        "certificates: {hosts_needed} agent certificates (ECDSA P-256, own key each) issued in {:.2} s ({:.2} ms each)",
        issue_secs,
        issue_secs * 1000.0 / hosts_needed.max(1) as f64
    );

    let config = dir.path().join("collector.toml");
    let q = |p: &Path| format!("{:?}", p.to_string_lossy());
    std::fs::write(
        &config,
        format!(
            "data_dir = {data}\n\
             [listen]\nquic = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n\
             [tls]\nca = {ca}\ncert = {cert}\nkey = {key}\ncrl = {crl}\n\
             [database]\nurl = {url:?}\npool_size = {pool}\n{writers}\
             [heartbeat]\ninterval = \"1s\"\nlost_after_missed = 3\n\
             [retention]\ndays = 30\ncompact_after = \"3650days\"\n",
            data = q(&dir.path().join("collector")),
            ca = q(&ca.cert_path()),
            cert = q(&collector_cert.cert_path),
            key = q(&collector_cert.key_path),
            crl = q(&ca.crl_path()),
            url = pg.url(),
            pool = plan.pool_size,
            writers = [
                plan.ingest_writers
                    .map(|n| format!("ingest_writers = {n}\n")),
                plan.ingest_copy_slots
                    .map(|n| format!("ingest_copy_slots = {n}\n")),
            ]
            .into_iter()
            .flatten()
            .collect::<String>(),
        ),
    )?;

    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(1)));
    transport.max_idle_timeout(Some(quinn::IdleTimeout::try_from(Duration::from_secs(10))?));
    let ctx = Arc::new(AgentCtx {
        ca_pem: ca.cert_pem().to_owned(),
        certs,
        transport: Arc::new(transport),
    });
    let mut env = Env {
        plan: plan.clone(),
        dir: dir.path().to_path_buf(),
        config,
        store: store.clone(),
        meter: Meter {
            tck: clock_ticks_per_second(),
            postmaster,
            store: store.clone(),
        },
        ctx,
        http: reqwest::Client::new(),
        spawned: 0,
    };
    let mut summary = Summary::default();

    if plan.peak {
        peak_phases(&mut env, &mut summary).await?;
    }
    if plan.sustained && plan.sustained_agents > 0 {
        summary.sustained = Some(sustained_phase(&mut env).await?);
    }
    if plan.idle && plan.idle_conns > 0 {
        summary.idle = Some(idle_phase(&mut env).await?);
    }

    print_summary(&env.plan, &summary, &version);
    println!("total run time {:.0} s", t0.elapsed().as_secs_f64());
    store.close().await;
    drop(pg);
    Ok(())
}

/// Prefill, anchor, peak ingest, anchor again.
async fn peak_phases(env: &mut Env, summary: &mut Summary) -> anyhow::Result<()> {
    let plan = env.plan.clone();
    let store = env.store.clone();
    let layout = series_layout(PEAK_SERIES);
    let defs: Vec<SeriesDef> = layout.iter().map(|(d, _)| d.clone()).collect();
    let first_host = plan.sustained_agents;
    let hosts = first_host..first_host + plan.peak_agents;

    // The peak agents' series exist in the dictionary, as after their first connection.
    let mut ids = Vec::new();
    let mut sims = Vec::new();
    for index in hosts.clone() {
        let host = host_name(index);
        store
            .record_hello(&hello(&host, index), chrono::Utc::now())
            .await?;
        let map = store.register_series(&host, &defs).await?;
        ids.push(
            defs.iter()
                .map(|d| map.get(&d.id).copied().context("series id"))
                .collect::<anyhow::Result<Vec<SeriesId>>>()?,
        );
        sims.push(Sim::new(index, &layout));
    }
    // Historical data goes to the day before yesterday and on (UTC days), partitions first.
    let now = unix_ms();
    let base_ms = now - now.rem_euclid(DAY_MS) - 2 * DAY_MS;
    for day in 0..3 {
        let date = chrono::DateTime::from_timestamp_millis(base_ms + day * DAY_MS)
            .context("date")?
            .date_naive();
        sqlx::query("SELECT razar_ensure_day($1)")
            .bind(date)
            .execute(store.pool())
            .await?;
    }
    let mut source = RowSource {
        sims,
        ids,
        base_ms,
        second: 0,
    };

    // 1. Prefill: raw COPY, generation and COPY overlapped.
    println!(
        "\n## 1. prefill: {} rows of {} agents × {PEAK_SERIES} series",
        fmt_rate(plan.prefill_rows as f64),
        plan.peak_agents
    );
    let started = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            while let Some(buf) = rx.recv().await {
                raw_copy(&store, buf).await?;
            }
            Ok::<_, sqlx::Error>(())
        })
    };
    let mut left = plan.prefill_rows;
    while left > 0 {
        let chunk = left.min(1_000_000);
        let bufs = tokio::task::block_in_place(|| source.buffers(chunk, 100_000));
        for (buf, rows) in bufs {
            left = left.saturating_sub(rows);
            if tx.send(buf).await.is_err() {
                break;
            }
        }
    }
    drop(tx);
    writer.await??;
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM samples")
        .fetch_one(store.pool())
        .await?;
    println!(
        "  {} rows in samples after {:.1} s (prefill by raw COPY, 100k rows per transaction)",
        fmt_rate(count as f64),
        started.elapsed().as_secs_f64()
    );
    summary.table_rows = Some(count);

    // 2. Anchor before.
    println!(
        "\n## 2. anchor: raw binary COPY into samples, {} rows per transaction",
        fmt_rate(plan.anchor_batch as f64)
    );
    anchor_round(env, &mut source, summary, "before peak").await?;

    // 3. Peak.
    println!(
        "\n## 3. peak ingest: {} agents replay a backlog as fast as acks allow ({PEAK_SERIES} samples per batch)",
        plan.peak_agents
    );
    settle(env, "the peak phase").await?;
    let collector = env.collector("peak").await?;
    let peak_base = base_ms + (source.second + 60) * 1000;
    let fleet = launch(
        &env.ctx,
        hosts,
        PEAK_SERIES,
        Mode::Peak { base_ms: peak_base },
        collector.quic,
        &plan,
    )?;
    let ramp = fleet.wait_connected("peak", Duration::from_secs(120)).await;
    println!(
        "  {} agents connected in {:.1} s",
        fleet.stats.connected.load(Ordering::Relaxed),
        ramp.as_secs_f64()
    );
    let reader = if plan.history_reader {
        let (_, token) = razar_collector::store::tokens::create(
            store.pool(),
            "history-reader",
            razar_collector::store::tokens::Role::Viewer,
            None,
            None,
        )
        .await?;
        let def = &defs[0];
        let labels: serde_json::Map<String, serde_json::Value> = def
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        let from =
            chrono::DateTime::from_timestamp_millis(peak_base - 3_600_000).context("from")?;
        let url = reqwest::Url::parse_with_params(
            &format!("http://{}/api/v1/history", collector.http),
            &[
                ("metric", def.metric.clone()),
                ("host", host_name(first_host)),
                ("labels", serde_json::Value::Object(labels).to_string()),
                ("from", from.to_rfc3339()),
                ("to", (from + chrono::Duration::hours(24)).to_rfc3339()),
                ("points", "1000".to_owned()),
            ],
        )?;
        println!("  a history reader asks for one series' 24 h once a second");
        Some(HistoryReader::start(env.http.clone(), url, token))
    } else {
        None
    };
    tokio::time::sleep(Duration::from_secs(plan.warmup_secs)).await;
    let h0 = collector.health(&env.http).await?;
    let acked0 = fleet.stats.acked_samples.load(Ordering::Relaxed);
    fleet.stats.recording.store(true, Ordering::Relaxed);
    let window = env.meter.start(collector.pid, collector.quic.port()).await;
    observe(env, &collector, &fleet.stats, plan.peak_secs).await;
    let usage = env.meter.finish(window).await;
    fleet.stats.recording.store(false, Ordering::Relaxed);
    let h1 = collector.health(&env.http).await?;
    let acked1 = fleet.stats.acked_samples.load(Ordering::Relaxed);
    let stored_per_s = (h1.samples_stored - h0.samples_stored) as f64 / usage.secs;
    let acked_per_s = (acked1 - acked0) as f64 / usage.secs;
    let ack = percentiles(std::mem::take(&mut *lock(&fleet.stats.ack_us)));
    let batches = (h1.batches_stored - h0.batches_stored) as f64;
    println!(
        "  stored {} samples/s ({} acknowledged to agents/s), {:.0} batches/s, {:.1} batches per commit; connections paused by back-pressure at the end: {}",
        fmt_rate(stored_per_s),
        fmt_rate(acked_per_s),
        batches / usage.secs,
        batches / (usage.pg_commits_per_s * usage.secs).max(1.0),
        h1.connections_paused
    );
    println!(
        "  ack latency with full windows (queueing included): p50 {:.1} ms, p99 {:.1} ms",
        ack.p50, ack.p99
    );
    println!(
        "  CPU per stored sample: PostgreSQL {:.2} µs, collector {:.2} µs, load generator {:.2} µs",
        usage.pg_cpu / 100.0 / stored_per_s.max(1.0) * 1e6,
        usage.collector_cpu / 100.0 / stored_per_s.max(1.0) * 1e6,
        usage.loadgen_cpu / 100.0 / stored_per_s.max(1.0) * 1e6
    );
    print_usage(&usage);
    print_errors(&fleet.stats);
    if let Some(reader) = reader {
        let (took, failed) = reader.stop().await;
        let p = percentiles(took);
        println!(
            "  history reads during the peak: p50 {:.1} ms, p99 {:.1} ms, {failed} failed",
            p.p50, p.p99
        );
    }
    fleet.stop().await;
    collector.stop().await;
    summary.peak = Some(PeakResult {
        agents: plan.peak_agents,
        stored_per_s,
        acked_per_s,
        ack,
        usage,
    });
    // Further rows go after what the agents stored.
    source.second += 86_400 / 4;

    println!("\n## 2'. anchor again, after the peak phase");
    anchor_round(env, &mut source, summary, "after peak").await?;
    let anchor = best_anchor(summary);
    println!(
        "  peak ingest {} samples/s = {:.0} % of the anchor ({} rows/s, best run)",
        fmt_rate(stored_per_s),
        stored_per_s / anchor * 100.0,
        fmt_rate(anchor)
    );
    if plan.sustained_anchor {
        println!(
            "\n## 2''. sustained anchor: 4 raw COPY writers for {} s, as long as the peak's window",
            plan.peak_secs
        );
        let rate = sustained_anchor(env, &mut source).await?;
        summary.anchor_sustained = Some(rate);
        println!(
            "  peak ingest {} samples/s = {:.0} % of the sustained anchor",
            fmt_rate(stored_per_s),
            stored_per_s / rate * 100.0
        );
    }
    Ok(())
}

/// Reads one series' history once a second until stopped; keeps each read's time (µs).
struct HistoryReader {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<(Vec<u32>, u64)>,
}

impl HistoryReader {
    fn start(http: reqwest::Client, url: reqwest::Url, token: String) -> HistoryReader {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let (mut took, mut failed) = (Vec::new(), 0);
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.wait_for(|s| *s) => break,
                }
                let t = Instant::now();
                let ok = match http.get(url.clone()).bearer_auth(&token).send().await {
                    Ok(r) => r.error_for_status().is_ok(),
                    Err(_) => false,
                };
                if ok {
                    took.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
                } else {
                    failed += 1;
                }
            }
            (took, failed)
        });
        HistoryReader { stop, task }
    }

    async fn stop(self) -> (Vec<u32>, u64) {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or_default()
    }
}

/// Raw COPY with 4 writers (the best short anchor's shape) for the peak's measured
/// duration, in the table state the peak left: the short runs last about a second, so
/// the best of them also catches this machine's fast moments (a VM whose page-cache
/// growth costs vary with the host), while the peak is an average over its window.
/// Cycles through a pool of pre-encoded buffers (rows repeat; the raw table has no
/// unique key), so generating rows costs nothing during the run.
async fn sustained_anchor(env: &mut Env, source: &mut RowSource) -> anyhow::Result<f64> {
    const WRITERS: usize = 4;
    settle(env, "the sustained anchor").await?;
    let plan = env.plan.clone();
    let pool: Arc<Vec<(bytes::Bytes, u64)>> = Arc::new(
        tokio::task::block_in_place(|| source.buffers(plan.anchor_rows, plan.anchor_batch))
            .into_iter()
            .map(|(buf, rows)| (bytes::Bytes::from(buf), rows))
            .collect(),
    );
    if pool.is_empty() {
        bail!("no anchor rows");
    }
    let next = Arc::new(AtomicUsize::new(0));
    let end = Instant::now() + Duration::from_secs(plan.peak_secs);
    let window = env.meter.start(0, 0).await;
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..WRITERS {
        let (pool, next, store) = (pool.clone(), next.clone(), env.store.clone());
        tasks.spawn(async move {
            let mut rows = 0u64;
            while Instant::now() < end {
                let (buf, n) = &pool[next.fetch_add(1, Ordering::Relaxed) % pool.len()];
                raw_copy(&store, buf.clone()).await?;
                rows += n;
            }
            Ok::<_, sqlx::Error>(rows)
        });
    }
    let mut rows = 0;
    while let Some(r) = tasks.join_next().await {
        rows += r??;
    }
    let rate = rows as f64 / started.elapsed().as_secs_f64();
    let u = env.meter.finish(window).await;
    println!(
        "  sustained: {WRITERS} writers, {:.1} s: {} rows/s; PostgreSQL CPU {:.0} % ({:.2} µs per row), this process {:.0} %, other processes {:.0} %; WAL {:.0} MiB/s; {} checkpoint(s) started",
        u.secs,
        fmt_rate(rate),
        u.pg_cpu,
        u.pg_cpu / 100.0 / rate * 1e6,
        u.loadgen_cpu,
        u.others_cpu(),
        u.wal_mb_per_s,
        u.checkpoints
    );
    Ok(rate)
}

/// Waits `secs` seconds; with `--timeline`, prints what each second saw.
async fn observe(env: &Env, collector: &CollectorProc, stats: &Stats, secs: u64) {
    let end = tokio::time::Instant::now() + Duration::from_secs(secs);
    if !env.plan.timeline {
        tokio::time::sleep_until(end).await;
        return;
    }
    let mut all = Vec::new();
    let mut last = collector.health(&env.http).await.unwrap_or_default();
    let mut commits = env.meter.commits().await;
    let mut second = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    while tokio::time::Instant::now() + Duration::from_millis(500) < end {
        tick.tick().await;
        second += 1;
        let h = collector.health(&env.http).await.unwrap_or_default();
        let c = env.meter.commits().await;
        let lat = std::mem::take(&mut *lock(&stats.ack_us));
        let p = percentiles(lat.clone());
        all.extend(lat);
        println!(
            "    t={second:>3}s stored {:>9}/s  acks {:>6} p50 {:>7.1} p99 {:>7.1} max {:>7.1} ms  paused {:>4}  commits {:>5}/s",
            fmt_rate(h.samples_stored.saturating_sub(last.samples_stored) as f64),
            p.n,
            p.p50,
            p.p99,
            p.max,
            h.connections_paused,
            c - commits
        );
        last = h;
        commits = c;
    }
    tokio::time::sleep_until(end).await;
    lock(&stats.ack_us).extend(all);
}

/// Waits `secs` seconds; with `--timeline`, prints what each second of the idle hold saw.
async fn observe_idle(env: &Env, collector: &CollectorProc, stats: &Stats, secs: u64) {
    let end = tokio::time::Instant::now() + Duration::from_secs(secs);
    if !env.plan.timeline {
        tokio::time::sleep_until(end).await;
        return;
    }
    let port = collector.quic.port();
    let mut all = Vec::new();
    let mut heartbeats = stats.heartbeats_acked.load(Ordering::Relaxed);
    let mut drops = udp_drops(port).0;
    let mut ticks = proc_stat(collector.pid).map_or(0, |s| s.own);
    let mut second = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    while tokio::time::Instant::now() + Duration::from_millis(500) < end {
        tick.tick().await;
        second += 1;
        let rtt = std::mem::take(&mut *lock(&stats.heartbeat_us));
        let p = percentiles(rtt.clone());
        all.extend(rtt);
        let hb = stats.heartbeats_acked.load(Ordering::Relaxed);
        let d = udp_drops(port).0;
        let t = proc_stat(collector.pid).map_or(0, |s| s.own);
        println!(
            "    t={second:>3}s open {:>6}  heartbeats answered {:>6}/s rtt p50 {:>7.1} p99 {:>7.1} ms  collector socket drops {:>6}  collector CPU {:>3.0} %",
            stats.alive.load(Ordering::Relaxed),
            hb - heartbeats,
            p.p50,
            p.p99,
            d.saturating_sub(drops),
            t.saturating_sub(ticks) as f64 / env.meter.tck * 100.0
        );
        heartbeats = hb;
        drops = d;
        ticks = t;
    }
    tokio::time::sleep_until(end).await;
    lock(&stats.heartbeat_us).extend(all);
}

fn best_anchor(s: &Summary) -> f64 {
    s.anchor_1
        .iter()
        .chain(&s.anchor_2)
        .chain(&s.anchor_4)
        .copied()
        .fold(f64::MIN_POSITIVE, f64::max)
}

async fn anchor_round(
    env: &mut Env,
    source: &mut RowSource,
    summary: &mut Summary,
    label: &str,
) -> anyhow::Result<()> {
    settle(env, &format!("the anchor {label}")).await?;
    let plan = &env.plan;
    for writers in [1usize, 2, 4] {
        let bufs =
            tokio::task::block_in_place(|| source.buffers(plan.anchor_rows, plan.anchor_batch));
        let window = env.meter.start(0, 0).await;
        let rate = anchor_run(&env.store, bufs, writers).await?;
        let u = env.meter.finish(window).await;
        println!(
            "  {label}: {writers} writer(s): {} rows/s; PostgreSQL CPU {:.0} % ({:.2} µs per row), this process {:.0} %, other processes {:.0} %; WAL {:.0} MiB/s",
            fmt_rate(rate),
            u.pg_cpu,
            u.pg_cpu / 100.0 / rate * 1e6,
            u.loadgen_cpu,
            u.others_cpu(),
            u.wal_mb_per_s
        );
        match writers {
            1 => summary.anchor_1.push(rate),
            2 => summary.anchor_2.push(rate),
            _ => summary.anchor_4.push(rate),
        }
    }
    Ok(())
}

async fn sustained_phase(env: &mut Env) -> anyhow::Result<SustainedResult> {
    let plan = env.plan.clone();
    println!(
        "\n## 4. sustained: {} agents × {} samples/s (one batch per second each, heartbeats every 1 s), {} s measured",
        plan.sustained_agents, plan.sustained_rate, plan.sustained_secs
    );
    settle(env, "the sustained phase").await?;
    let collector = env.collector("sustained").await?;
    let connecting = env.meter.start(collector.pid, collector.quic.port()).await;
    let fleet = launch(
        &env.ctx,
        0..plan.sustained_agents,
        plan.sustained_rate,
        Mode::Sustained,
        collector.quic,
        &plan,
    )?;
    let ramp = fleet
        .wait_connected("sustained", Duration::from_secs(300))
        .await;
    let connect = percentiles(lock(&fleet.stats.connect_us).clone());
    println!(
        "  {} agents connected in {:.1} s (handshake + Hello/Welcome p50 {:.0} ms, p99 {:.0} ms), {} failed",
        fleet.stats.connected.load(Ordering::Relaxed),
        ramp.as_secs_f64(),
        connect.p50,
        connect.p99,
        fleet.stats.failed.load(Ordering::Relaxed)
    );
    println!("  while connecting:");
    print_usage(&env.meter.finish(connecting).await);
    tokio::time::sleep(Duration::from_secs(plan.warmup_secs)).await;
    let h0 = collector.health(&env.http).await?;
    let late0 = fleet.stats.late.load(Ordering::Relaxed);
    let errors0 = fleet.stats.error_count.load(Ordering::Relaxed);
    fleet.stats.recording.store(true, Ordering::Relaxed);
    let window = env.meter.start(collector.pid, collector.quic.port()).await;
    observe(env, &collector, &fleet.stats, plan.sustained_secs).await;
    let usage = env.meter.finish(window).await;
    fleet.stats.recording.store(false, Ordering::Relaxed);
    let h1 = collector.health(&env.http).await?;
    let stored_per_s = (h1.samples_stored - h0.samples_stored) as f64 / usage.secs;
    let ack = percentiles(std::mem::take(&mut *lock(&fleet.stats.ack_us)));
    let late = fleet.stats.late.load(Ordering::Relaxed) - late0;
    let errors = fleet.stats.error_count.load(Ordering::Relaxed) - errors0;
    println!(
        "  stored {} samples/s (offered {}), {} agents connected at the end",
        fmt_rate(stored_per_s),
        fmt_rate((plan.sustained_agents * plan.sustained_rate) as f64),
        h1.agents_connected
    );
    println!(
        "  ack latency (write of a batch to its Ack, {} batches): p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms; ticks with a full window: {late}",
        ack.n, ack.p50, ack.p95, ack.p99, ack.max
    );
    print_usage(&usage);
    print_errors(&fleet.stats);
    fleet.stop().await;
    collector.stop().await;
    Ok(SustainedResult {
        agents: plan.sustained_agents,
        rate: plan.sustained_rate,
        connect_secs: ramp.as_secs_f64(),
        stored_per_s,
        ack,
        late,
        errors,
        usage,
    })
}

async fn idle_phase(env: &mut Env) -> anyhow::Result<IdleResult> {
    let plan = env.plan.clone();
    println!(
        "\n## 5. idle: {} connections with heartbeats every 1 s, held {} s",
        plan.idle_conns, plan.idle_secs
    );
    settle(env, "the idle phase").await?;
    let collector = env.collector("idle").await?;
    // Settle, then the baseline.
    collector.health(&env.http).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let baseline_kb = proc_status_kb(collector.pid, "VmRSS:").unwrap_or(0);
    println!(
        "  collector RSS before any connection: {}",
        mib(baseline_kb)
    );
    let connecting = env.meter.start(collector.pid, collector.quic.port()).await;
    let fleet = launch(
        &env.ctx,
        0..plan.idle_conns,
        0,
        Mode::Idle,
        collector.quic,
        &plan,
    )?;
    let ramp = fleet.wait_connected("idle", Duration::from_secs(600)).await;
    let connect = percentiles(lock(&fleet.stats.connect_us).clone());
    println!(
        "  {} connected in {:.1} s ({:.0} connections/s; handshake + Hello/Welcome p50 {:.0} ms, p99 {:.0} ms), {} failed",
        fleet.stats.connected.load(Ordering::Relaxed),
        ramp.as_secs_f64(),
        fleet.stats.connected.load(Ordering::Relaxed) as f64 / ramp.as_secs_f64().max(1e-3),
        connect.p50,
        connect.p99,
        fleet.stats.failed.load(Ordering::Relaxed)
    );
    println!("  while connecting:");
    let connecting = env.meter.finish(connecting).await;
    print_usage(&connecting);
    print_errors(&fleet.stats);
    let errors0 = fleet.stats.error_count.load(Ordering::Relaxed);
    let hb0 = fleet.stats.heartbeats_acked.load(Ordering::Relaxed);
    fleet.stats.recording.store(true, Ordering::Relaxed);
    let window = env.meter.start(collector.pid, collector.quic.port()).await;
    observe_idle(env, &collector, &fleet.stats, plan.idle_secs).await;
    let usage = env.meter.finish(window).await;
    fleet.stats.recording.store(false, Ordering::Relaxed);
    let h = collector.health(&env.http).await?;
    let held = fleet.stats.alive.load(Ordering::Relaxed);
    let heartbeats_per_s =
        (fleet.stats.heartbeats_acked.load(Ordering::Relaxed) - hb0) as f64 / usage.secs;
    let heartbeat = percentiles(std::mem::take(&mut *lock(&fleet.stats.heartbeat_us)));
    let errors = fleet.stats.error_count.load(Ordering::Relaxed) - errors0;
    println!(
        "  held {held} connections to the end ({} welcomed per the collector); {:.0} heartbeats answered/s, round trip p50 {:.1} ms, p99 {:.1} ms",
        h.agents_connected, heartbeats_per_s, heartbeat.p50, heartbeat.p99
    );
    let per_conn = usage.collector_rss_kb.saturating_sub(baseline_kb) as f64 / held.max(1) as f64;
    println!(
        "  collector RSS {} (max {}): {:.1} KiB per connection above the baseline",
        mib(usage.collector_rss_kb),
        mib(usage.collector_rss_max_kb),
        per_conn
    );
    print_usage(&usage);
    if errors > 0 {
        println!("  errors while held: {errors}");
        print_errors(&fleet.stats);
    }
    fleet.stop().await;
    collector.stop().await;
    Ok(IdleResult {
        target: plan.idle_conns,
        held,
        collector_reports: h.agents_connected,
        connect_secs: ramp.as_secs_f64(),
        baseline_kb,
        heartbeat,
        heartbeats_per_s,
        errors,
        connecting,
        usage,
    })
}

fn print_summary(plan: &Plan, s: &Summary, pg_version: &str) {
    let ok = |b: bool| if b { "yes" } else { "**no**" };
    // A run smaller than the goal's scale (e.g. --quick) cannot meet or miss it.
    let at_scale = |b: bool, scale: bool| if scale { ok(b) } else { "n/a (smaller run)" };
    println!("\n## Summary (Markdown)\n");
    println!(
        "Machine: {} cores, PostgreSQL {pg_version} (fsync on, shared_buffers {}), collector and load generator in separate processes on the same cores. CPU in % of one core.\n",
        cores(),
        plan.shared_buffers
    );
    println!("| figure | goal | measured | met |");
    println!("|---|---|---|---|");
    if let Some(sus) = &s.sustained {
        let offered = (sus.agents * sus.rate) as f64;
        println!(
            "| sustained: {} agents × {} samples/s, stored | {} samples/s | {} samples/s ({} ticks with a full window, {} errors) | {} |",
            sus.agents,
            sus.rate,
            fmt_rate(offered),
            fmt_rate(sus.stored_per_s),
            sus.late,
            sus.errors,
            at_scale(
                sus.stored_per_s >= offered * 0.99 && sus.late == 0,
                sus.agents >= 1_000 && sus.rate >= 100
            )
        );
        println!(
            "| sustained: ack latency p50 / p95 / p99 / max | p99 < 200 ms | {:.1} / {:.1} / {:.1} / {:.1} ms ({} batches) | {} |",
            sus.ack.p50,
            sus.ack.p95,
            sus.ack.p99,
            sus.ack.max,
            sus.ack.n,
            at_scale(
                sus.ack.n > 0 && sus.ack.p99 < 200.0,
                sus.agents >= 1_000 && sus.rate >= 100
            )
        );
        println!(
            "| sustained: collector CPU / RSS (max) | — | {:.0} % / {} ({}) | |",
            sus.usage.collector_cpu,
            mib(sus.usage.collector_rss_kb),
            mib(sus.usage.collector_rss_max_kb)
        );
        println!(
            "| sustained: PostgreSQL / load generator / other processes CPU; machine busy + stolen | — | {:.0} % / {:.0} % / {:.0} %; {:.0} % + {:.0} % of {} cores | |",
            sus.usage.pg_cpu,
            sus.usage.loadgen_cpu,
            sus.usage.others_cpu(),
            sus.usage.machine_busy,
            sus.usage.steal,
            cores()
        );
        println!(
            "| sustained: time to connect all agents | — | {:.1} s | |",
            sus.connect_secs
        );
    }
    if let Some(p) = &s.peak {
        let anchor = best_anchor(s);
        let fmt_runs = |v: &[f64]| {
            v.iter()
                .map(|r| fmt_rate(*r))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        println!(
            "| table size when measured | ≥ 10 M rows | {} rows | {} |",
            s.table_rows.map_or("?".into(), |r| fmt_rate(r as f64)),
            at_scale(
                s.table_rows.unwrap_or(0) >= 10_000_000,
                plan.prefill_rows >= 10_000_000
            )
        );
        println!(
            "| anchor: raw binary COPY, {} rows/txn, 1 writer (before / after) | — | {} rows/s | |",
            fmt_rate(plan.anchor_batch as f64),
            fmt_runs(&s.anchor_1)
        );
        println!(
            "| anchor: same, 2 writers (before / after) | — | {} rows/s | |",
            fmt_runs(&s.anchor_2)
        );
        println!(
            "| anchor: same, 4 writers (before / after) | — | {} rows/s | |",
            fmt_runs(&s.anchor_4)
        );
        if let Some(rate) = s.anchor_sustained {
            println!(
                "| anchor: same, 4 writers, sustained for {} s after the peak | — | {} rows/s | |",
                plan.peak_secs,
                fmt_rate(rate)
            );
        }
        println!(
            "| peak ingest: {} agents through QUIC + collector, stored | ≥ 70 % of the best anchor ({} rows/s) | {} samples/s ({} acked/s) = {:.0} % | {} |",
            p.agents,
            fmt_rate(anchor),
            fmt_rate(p.stored_per_s),
            fmt_rate(p.acked_per_s),
            p.stored_per_s / anchor * 100.0,
            at_scale(
                p.stored_per_s >= 0.7 * anchor,
                s.table_rows.unwrap_or(0) >= 10_000_000
            )
        );
        if let Some(rate) = s.anchor_sustained {
            println!(
                "| peak ingest against the sustained anchor (same length as the peak's window) | ≥ 70 % | {:.0} % | {} |",
                p.stored_per_s / rate * 100.0,
                at_scale(
                    p.stored_per_s >= 0.7 * rate,
                    s.table_rows.unwrap_or(0) >= 10_000_000
                )
            );
        }
        println!(
            "| peak: collector / PostgreSQL / load generator / other processes CPU; machine busy + stolen | — | {:.0} % / {:.0} % / {:.0} % / {:.0} %; {:.0} % + {:.0} % | |",
            p.usage.collector_cpu,
            p.usage.pg_cpu,
            p.usage.loadgen_cpu,
            p.usage.others_cpu(),
            p.usage.machine_busy,
            p.usage.steal
        );
        println!(
            "| peak: collector RSS, ack latency p50 / p99 with full windows | — | {}, {:.0} / {:.0} ms | |",
            mib(p.usage.collector_rss_max_kb),
            p.ack.p50,
            p.ack.p99
        );
    }
    if let Some(i) = &s.idle {
        println!(
            "| idle: connections with 1 s heartbeats held {} s | 10,000 | {} of {} ({} per the collector; {} errors) | {} |",
            plan.idle_secs,
            fmt_rate(i.held as f64),
            fmt_rate(i.target as f64),
            i.collector_reports,
            i.errors,
            at_scale(i.held >= 10_000 && i.errors == 0, i.target >= 10_000)
        );
        let per =
            i.usage.collector_rss_kb.saturating_sub(i.baseline_kb) as f64 / i.held.max(1) as f64;
        println!(
            "| idle: collector RSS (max) | < 1 GiB | {} ({}) | {} |",
            mib(i.usage.collector_rss_kb),
            mib(i.usage.collector_rss_max_kb),
            at_scale(
                i.usage.collector_rss_max_kb < 1024 * 1024,
                i.target >= 10_000
            )
        );
        println!(
            "| idle: collector RSS per connection (above {} at start) | — | {per:.1} KiB | |",
            mib(i.baseline_kb)
        );
        println!(
            "| idle: heartbeats answered, round trip p50 / p99 | — | {:.0}/s, {:.1} / {:.1} ms | |",
            i.heartbeats_per_s, i.heartbeat.p50, i.heartbeat.p99
        );
        println!(
            "| idle: UDP datagrams dropped on the collector's socket (receive buffer full), while connecting / while held | — | {} / {} | |",
            fmt_rate(i.connecting.collector_udp_drops as f64),
            fmt_rate(i.usage.collector_udp_drops as f64)
        );
        println!(
            "| idle: collector / PostgreSQL / load generator / other processes CPU, stolen; time to connect all | — | {:.0} % / {:.0} % / {:.0} % / {:.0} %, {:.0} % of the machine; {:.0} s | |",
            i.usage.collector_cpu,
            i.usage.pg_cpu,
            i.usage.loadgen_cpu,
            i.usage.others_cpu(),
            i.usage.steal,
            i.connect_secs
        );
    }
    println!(
        "| bytes on disk per stored sample after 24 h | ≤ 3 | see `store_bench` (`cargo run --release -p razar-collector --example store_bench`) | |"
    );
}
