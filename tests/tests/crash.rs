//! Crash tests with real processes: the `razar-collector` and `razar-agent` binaries run
//! as child processes against a private PostgreSQL, with mTLS certificates from a
//! throwaway CA, an agent sampling two fake GPUs and supervising one shell component.
//! Processes are killed with SIGKILL mid-stream; each test ends with "every produced
//! sample and event stored exactly once".
//!
//! What the agent produced is read from its own log: `razar_agent::uplink` logs one
//! `batch spooled seq=… base_ts_ms=… samples=… events=…` line at debug level after each
//! batch is durably committed to the spool. A SIGKILL between that commit and the log
//! write leaves one committed batch unlogged; the tests allow exactly the seq right after
//! the last logged one at each agent kill to be missing from the log (and say so).
//!
//! The binaries are found next to this test's executable (`target/<profile>/`):
//! `cargo test --workspace` builds them; otherwise build them first with
//! `cargo build -p razar-collector -p razar-agent`.

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use razar_agent::spool::Spool;
use razar_agent::uplink::{Backoff, Uplink, UplinkConfig};
use razar_certs::Issued;
use razar_tests::ca::TestCa;
use razar_tests::pg::TestPg;
use sqlx::PgPool;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The agent's host id (its certificate's URI SAN).
const HOST: &str = "crash-host";
/// The agent's sampling period: a batch every 250 ms keeps a stream in flight.
const SAMPLE_INTERVAL: &str = "250ms";
/// The agent's count of ProcessAdopted events it emitted.
const ADOPTED_METRIC: &str = "razar_events_total{kind=\"process_adopted\"}";
/// Name of the supervised component.
const COMPONENT: &str = "ticker";

/// Two fake GPUs (copied from `razar-collector dev`).
const GPU_SCENARIO: &str = r#"clock = "wall"
driver_version = "550.54.15"

[[gpu]]
name = "NVIDIA H100 80GB HBM3"
fans = 0
values = { utilization_gpu = [[0, 5], [60, 85], [120, 92]], temperature_gpu = [[0, 34], [120, 71]], power_usage = [[0, 80000], [120, 610000]], memory_used = [[0, 1073741824], [60, 64424509440]] }

[[gpu]]
name = "NVIDIA H100 80GB HBM3"
fans = 0
values = { utilization_gpu = [[0, 0], [90, 40]], temperature_gpu = [[0, 33], [600, 52]], power_usage = [[0, 75000], [600, 300000]], memory_used = [[0, 536870912], [90, 21474836480]] }
"#;

// ---------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------

/// A binary built by this workspace, next to the test executable.
fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test executable");
    // target/<profile>/deps/crash-XXXX → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not found: build the binaries first with \
         `cargo build -p razar-collector -p razar-agent` (`cargo test --workspace` builds them)",
        path.display()
    );
    path
}

/// A child process that is SIGKILLed and reaped on drop unless it already ended.
struct Proc {
    what: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `program`, stdout and stderr appended to `log`.
    fn spawn(
        what: &'static str,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        log: &Path,
    ) -> Proc {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open the process log");
        let err = out.try_clone().expect("clone the log handle");
        let child = Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        Proc {
            what,
            child,
            log: log.to_path_buf(),
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits i32"))
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// SIGKILL and reap.
    fn kill9(&mut self) {
        if self.exited().is_none() {
            let _ = kill(self.pid(), Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }

    /// SIGTERM, then waits for the exit (SIGKILL and panic past `within`).
    async fn terminate(&mut self, within: Duration) -> ExitStatus {
        kill(self.pid(), Signal::SIGTERM).expect("send SIGTERM");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            if Instant::now() > deadline {
                self.kill9();
                panic!(
                    "{} did not stop within {within:?} of SIGTERM; log tail:\n{}",
                    self.what,
                    tail(&self.log)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The last lines of a log, for failure messages.
fn tail(log: &Path) -> String {
    let text = std::fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Pids of processes whose command line has `marker` as one of its arguments.
fn marked_pids(marker: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if cmdline
            .split(|b| *b == 0)
            .any(|arg| arg == marker.as_bytes())
        {
            pids.push(pid);
        }
    }
    pids
}

/// Kills the component processes (and their process groups) carrying the marker on
/// drop: they run in their own groups and outlive a SIGKILLed agent by design.
struct ComponentReaper {
    marker: String,
}

impl Drop for ComponentReaper {
    fn drop(&mut self) {
        for pid in marked_pids(&self.marker) {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

fn free_udp_port() -> u16 {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a probe socket");
    socket.local_addr().expect("probe address").port()
}

fn free_tcp_port() -> u16 {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a probe socket");
    socket.local_addr().expect("probe address").port()
}

/// A path as a TOML basic string.
fn toml_str(s: impl AsRef<str>) -> String {
    format!(
        "\"{}\"",
        s.as_ref().replace('\\', "\\\\").replace('"', "\\\"")
    )
}

fn toml_path(p: &Path) -> String {
    toml_str(p.display().to_string())
}

/// Waits until `check` returns `Some`, polling; panics with `what` past `within`.
async fn wait_for<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Some spread in when a kill lands (not for correctness: the waits are on conditions).
fn jitter(max_ms: u64) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()));
    Duration::from_millis(nanos % max_ms.max(1))
}

/// The value of `series` (name with labels, as exposed) in Prometheus text; 0 if absent.
fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Batches the collector recognised as resent and did not store again.
const DUPLICATE_METRIC: &str = "razar_collector_batches_duplicate_total";

// ---------------------------------------------------------------------------------------
// What the agent produced (its log) and what the collector stored (PostgreSQL)
// ---------------------------------------------------------------------------------------

/// One `batch spooled` log line: a batch durably committed to the agent's spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Spooled {
    seq: u64,
    base_ts_ms: i64,
    samples: u64,
    events: u64,
}

/// Removes ANSI escape sequences (in case the log is coloured).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Every `batch spooled` line of the agent's log, in order.
fn spooled_batches(log: &Path) -> Vec<Spooled> {
    let text = std::fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let mut out = Vec::new();
    for line in text.lines().filter(|l| l.contains("batch spooled")) {
        let line = strip_ansi(line);
        let mut fields: BTreeMap<&str, &str> = BTreeMap::new();
        for token in line.split_whitespace() {
            if let Some((k, v)) = token.split_once('=') {
                fields.insert(k, v);
            }
        }
        let get = |k: &str| -> i64 {
            fields
                .get(k)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("log line without a numeric {k}: {line}"))
        };
        out.push(Spooled {
            seq: get("seq") as u64,
            base_ts_ms: get("base_ts_ms"),
            samples: get("samples") as u64,
            events: get("events") as u64,
        });
    }
    out
}

/// The collector's cursor for the host: (acked_seq, samples_stored, events_stored).
async fn cursor(pool: &PgPool) -> Option<(i64, i64, i64)> {
    sqlx::query_as(
        "SELECT acked_seq, samples_stored, events_stored FROM agent_cursors WHERE host_id = $1",
    )
    .bind(HOST)
    .fetch_optional(pool)
    .await
    .ok()
    .flatten()
}

async fn acked_seq(pool: &PgPool) -> i64 {
    cursor(pool).await.map_or(0, |c| c.0)
}

async fn scalar(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .bind(HOST)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Agent events stored for the host (not the collector's own host_lost/host_back).
/// The host's events that came from its agent: not those the collector writes itself
/// (host state, store refusals, silence, and the decision engine's: a storm's XIDs
/// quarantine the GPU and its reset result becomes a `gpu_reset_result` event).
const AGENT_EVENTS: &str = "SELECT count(*) FROM events WHERE host_id = $1 AND kind NOT IN (
        'host_lost', 'host_back', 'values_refused', 'batch_rejected',
        'heartbeats_without_samples', 'samples_resumed', 'gpu_reset_result',
        'escalation_ack', 'escalation_resolve', 'gpu_override')";

/// What the final check found, for the test's summary line.
#[derive(Debug)]
struct Verified {
    batches: u64,
    samples: u64,
    events: u64,
    unlogged: Vec<u64>,
}

// ---------------------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------------------

/// Collector and agent processes, their database, certificates and files. Field order
/// is drop order: processes go before the database and the directories.
struct Fixture {
    agent: Option<Proc>,
    components: ComponentReaper,
    collector: Option<Proc>,
    pool: PgPool,
    http: reqwest::Client,
    pg: TestPg,
    ca: TestCa,
    agent_cert: Issued,
    quic_port: u16,
    http_port: u16,
    collector_starts: u32,
    dir: tempfile::TempDir,
}

impl Fixture {
    async fn new(test: &str) -> Fixture {
        Fixture::with(test, SAMPLE_INTERVAL, GPU_SCENARIO).await
    }

    /// A fixture whose agent samples every `sample_interval` and plays `gpu_scenario`.
    async fn with(test: &str, sample_interval: &str, gpu_scenario: &str) -> Fixture {
        let mut ca = TestCa::new().expect("test CA");
        let agent_cert = ca.agent(HOST).expect("agent certificate");
        let pg = TestPg::start().await.expect("PostgreSQL");
        // Migrated up front so the test's queries work before the collector's first start.
        pg.store().await.expect("migrated store").close().await;
        let pool = pg.pool().await.expect("pool");
        let dir = tempfile::Builder::new()
            .prefix("razar-crash")
            .tempdir()
            .expect("test dir");
        let marker = format!(
            "razar-crash-{test}-{}-{}",
            std::process::id(),
            jitter(1_000_000).as_millis()
        );
        let f = Fixture {
            agent: None,
            components: ComponentReaper { marker },
            collector: None,
            pool,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("HTTP client"),
            pg,
            ca,
            agent_cert,
            quic_port: free_udp_port(),
            http_port: free_tcp_port(),
            collector_starts: 0,
            dir,
        };
        f.write_configs(sample_interval, gpu_scenario);
        f
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn agent_data_dir(&self) -> PathBuf {
        self.path("agent")
    }

    fn agent_log(&self) -> PathBuf {
        self.path("agent.log")
    }

    fn write_configs(&self, sample_interval: &str, gpu_scenario: &str) {
        let collector = self.ca.collector();
        let collector_toml = format!(
            r#"data_dir = {data}

[listen]
quic = "127.0.0.1:{quic}"
http = "127.0.0.1:{http}"

[tls]
ca = {ca}
cert = {cert}
key = {key}
crl = {crl}

[database]
url = {url}
pool_size = 4

[heartbeat]
interval = "1s"
lost_after_missed = 3

[retention]
compact_after = "1h"
"#,
            data = toml_path(&self.path("collector")),
            quic = self.quic_port,
            http = self.http_port,
            ca = toml_path(&self.ca.ca_path()),
            cert = toml_path(&collector.cert_path),
            key = toml_path(&collector.key_path),
            crl = toml_path(&self.ca.crl_path()),
            url = toml_str(self.pg.url()),
        );
        std::fs::write(self.path("collector.toml"), collector_toml).expect("collector.toml");
        std::fs::write(self.path("gpu-scenario.toml"), gpu_scenario).expect("scenario");
        let agent_toml = format!(
            r#"[agent]
data_dir = {data}
listen = "127.0.0.1:0"
sample_interval = "{sample_interval}"
log_dir = {logs}

[collector]
address = "127.0.0.1:{quic}"
server_name = "localhost"
ca = {ca}
cert = {cert}
key = {key}

[gpu]
source = "scenario"
scenario = {scenario}

[[component]]
name = "{COMPONENT}"
command = "/bin/sh"
args = ["-c", "while :; do echo tick; sleep 1; done", {marker}]
stop_grace = "3s"
"#,
            data = toml_path(&self.agent_data_dir()),
            logs = toml_path(&self.path("agent-logs")),
            quic = self.quic_port,
            ca = toml_path(&self.ca.ca_path()),
            cert = toml_path(&self.agent_cert.cert_path),
            key = toml_path(&self.agent_cert.key_path),
            scenario = toml_path(&self.path("gpu-scenario.toml")),
            marker = toml_str(&self.components.marker),
        );
        std::fs::write(self.path("agent.toml"), agent_toml).expect("agent.toml");
    }

    async fn collector_healthy(&self) -> bool {
        let url = format!("http://127.0.0.1:{}/api/v1/health", self.http_port);
        matches!(self.http.get(url).send().await, Ok(r) if r.status().is_success())
    }

    /// Starts the collector process and waits for its API; retries while the previous
    /// incarnation's ports are briefly busy.
    async fn start_collector(&mut self) {
        assert!(self.collector.is_none(), "collector already running");
        let started = Instant::now();
        let deadline = started + Duration::from_secs(60);
        let config = self.path("collector.toml");
        let config = config.to_str().expect("UTF-8 path");
        loop {
            self.collector_starts += 1;
            let log = self.path(&format!("collector-{}.log", self.collector_starts));
            let mut proc = Proc::spawn(
                "collector",
                &binary("razar-collector"),
                &["run", "--config", config],
                &[("RUST_LOG", "info,sqlx=warn"), ("NO_COLOR", "1")],
                &log,
            );
            let up = loop {
                if let Some(status) = proc.exited() {
                    eprintln!(
                        "collector start #{} ended ({status}); retrying. Log tail:\n{}",
                        self.collector_starts,
                        tail(&log)
                    );
                    break false;
                }
                if self.collector_healthy().await {
                    break true;
                }
                assert!(
                    Instant::now() < deadline,
                    "collector did not come up within 60 s; log tail:\n{}",
                    tail(&log)
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            if up {
                self.collector = Some(proc);
                eprintln!(
                    "collector #{} up in {:.1} s",
                    self.collector_starts,
                    started.elapsed().as_secs_f64()
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "collector would not start within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn kill_collector(&mut self) {
        let mut proc = self.collector.take().expect("collector running");
        proc.kill9();
    }

    /// Starts the agent process and waits until its local API answers.
    async fn start_agent(&mut self) {
        assert!(self.agent.is_none(), "agent already running");
        let addr_file = self.agent_data_dir().join("agent.addr");
        let _ = std::fs::remove_file(&addr_file);
        let config = self.path("agent.toml");
        let mut proc = Proc::spawn(
            "agent",
            &binary("razar-agent"),
            &["run", "--config", config.to_str().expect("UTF-8 path")],
            &[
                ("RUST_LOG", "info,razar_agent::uplink=debug"),
                ("NO_COLOR", "1"),
            ],
            &self.agent_log(),
        );
        let log = self.agent_log();
        let started = Instant::now();
        wait_for("the agent's local API", Duration::from_secs(60), || {
            if let Some(status) = proc.exited() {
                panic!(
                    "agent exited at start ({status}); log tail:\n{}",
                    tail(&log)
                );
            }
            let addr = std::fs::read_to_string(&addr_file)
                .ok()
                .and_then(|a| a.trim().parse::<SocketAddr>().ok());
            async move { addr.map(|_| ()) }
        })
        .await;
        self.agent = Some(proc);
        eprintln!("agent up in {:.1} s", started.elapsed().as_secs_f64());
    }

    /// The running agent's `/health` body.
    async fn agent_health(&self) -> Option<serde_json::Value> {
        let addr = std::fs::read_to_string(self.agent_data_dir().join("agent.addr")).ok()?;
        let url = format!("http://{}/health", addr.trim());
        let response = self.http.get(url).send().await.ok()?;
        response.json().await.ok()
    }

    /// A counter or gauge from the running collector's `/metrics` (0 when absent).
    async fn collector_metric(&self, series: &str) -> Option<f64> {
        let url = format!("http://127.0.0.1:{}/metrics", self.http_port);
        let text = self.http.get(url).send().await.ok()?.text().await.ok()?;
        Some(metric_value(&text, series))
    }

    /// A counter or gauge from the running agent's `/metrics` (0 when absent).
    async fn agent_metric(&self, series: &str) -> Option<f64> {
        let addr = std::fs::read_to_string(self.agent_data_dir().join("agent.addr")).ok()?;
        let url = format!("http://{}/metrics", addr.trim());
        let text = self.http.get(url).send().await.ok()?.text().await.ok()?;
        Some(metric_value(&text, series))
    }

    /// The component's (pid, state, restarts) as the agent reports it.
    async fn component(&self) -> Option<(u32, String, u64)> {
        let health = self.agent_health().await?;
        let c = health["components"]
            .as_array()?
            .iter()
            .find(|c| c["name"] == COMPONENT)?
            .clone();
        Some((
            u32::try_from(c["pid"].as_u64()?).ok()?,
            c["state"].as_str()?.to_owned(),
            c["restarts"].as_u64()?,
        ))
    }

    fn signal(proc: &Option<Proc>, signal: Signal) {
        let proc = proc.as_ref().expect("process running");
        kill(proc.pid(), signal).unwrap_or_else(|e| panic!("{signal} to {}: {e}", proc.what));
    }

    /// The highest seq in the agent's `batch spooled` lines (0 before the first).
    fn last_spooled(&self) -> u64 {
        spooled_batches(&self.agent_log())
            .last()
            .map_or(0, |b| b.seq)
    }

    /// Waits until the agent has spooled `n` more batches than `after`.
    async fn wait_spooled(&self, after: u64, n: u64) -> u64 {
        wait_for(
            "the agent to spool more batches",
            Duration::from_secs(30),
            || {
                let last = self.last_spooled();
                async move { (last >= after + n).then_some(last) }
            },
        )
        .await
    }

    /// Waits until the collector's cursor passes `seq` by at least `by` batches.
    async fn wait_progress(&self, what: &str, from: i64, by: i64) -> i64 {
        let pool = &self.pool;
        wait_for(what, Duration::from_secs(60), || async move {
            let acked = acked_seq(pool).await;
            (acked >= from + by).then_some(acked)
        })
        .await
    }

    /// Stops the agent cleanly, delivers what is left in its spool with the agent's own
    /// uplink (in this process: no new batches are produced), and checks that every
    /// batch, sample and event the agent produced is stored exactly once.
    async fn stop_and_verify(&mut self, unlogged_allowed: &BTreeSet<u64>) -> Verified {
        let mut agent = self.agent.take().expect("agent running");
        let status = agent.terminate(Duration::from_secs(60)).await;
        assert!(
            status.success(),
            "agent exit after SIGTERM: {status}; log tail:\n{}",
            tail(&agent.log)
        );
        drop(agent);

        // The spool file as the agent left it.
        let spool_path = self.agent_data_dir().join("spool.redb");
        let spool = Arc::new(
            wait_for("the agent's spool to open", Duration::from_secs(10), || {
                let s = Spool::open(&spool_path, u64::MAX).ok();
                async move { s }
            })
            .await,
        );
        let last_seq = spool.last_seq();
        let left = spool.len();
        if left > 0 {
            let started = Instant::now();
            let tls = self
                .ca
                .client_config(&self.agent_cert)
                .expect("client TLS config");
            let mut config = UplinkConfig::new(
                format!("127.0.0.1:{}", self.quic_port),
                "localhost",
                Arc::new(tls),
                HOST,
            );
            config.backoff =
                Backoff::try_new(Duration::from_millis(50), Duration::from_millis(500), 0.5)
                    .expect("backoff");
            let (uplink, _commands) = Uplink::spawn(config, spool.clone()).expect("uplink");
            let s = spool.clone();
            wait_for(
                "the spool to drain to the collector",
                Duration::from_secs(60),
                || {
                    let empty = s.is_empty();
                    async move { empty.then_some(()) }
                },
            )
            .await;
            uplink.shutdown().await;
            eprintln!(
                "drained {left} batch(es) left in the spool in {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
        assert_eq!(spool.acked(), last_seq, "spool acked == its last seq");
        assert!(spool.is_empty(), "spool empty after the drain");
        assert_eq!(
            spool.last_seq(),
            last_seq,
            "nothing produced while draining"
        );
        assert_eq!(spool.dropped_samples_total(), 0, "spool dropped samples");
        assert_eq!(spool.dropped_events_total(), 0, "spool dropped events");
        drop(spool);

        // What the agent produced, from its log.
        let produced = spooled_batches(&self.agent_log());
        assert!(
            !produced.is_empty(),
            "no `batch spooled` lines in {}: is target/*/razar-agent older than \
             agent/src/uplink.rs? Rebuild it with `cargo build -p razar-agent`",
            self.agent_log().display()
        );
        let mut unlogged = Vec::new();
        let mut expected_seq = 1u64;
        for b in &produced {
            while b.seq > expected_seq && unlogged_allowed.contains(&expected_seq) {
                unlogged.push(expected_seq);
                expected_seq += 1;
            }
            assert_eq!(
                b.seq, expected_seq,
                "spooled seqs must run 1, 2, 3, … without reuse or gaps \
                 (a gap is allowed only right after an agent kill: {unlogged_allowed:?})"
            );
            expected_seq += 1;
        }
        let logged_last = expected_seq - 1;
        assert_eq!(
            logged_last, last_seq,
            "last logged seq == the spool's last seq"
        );

        // The collector's cursor and rows.
        let (acked, samples_stored, events_stored) =
            cursor(&self.pool).await.expect("the host has a cursor");
        assert_eq!(
            acked as u64, last_seq,
            "collector acked_seq == agent last seq"
        );
        let rows = scalar(
            &self.pool,
            "SELECT count(*) FROM samples x JOIN series s ON s.series_id = x.series_id
             WHERE s.host_id = $1",
        )
        .await;
        let all_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM samples")
            .fetch_one(&self.pool)
            .await
            .expect("count samples");
        assert_eq!(rows, all_rows, "every stored sample belongs to the host");
        let chunks: i64 = sqlx::query_scalar("SELECT count(*) FROM sample_chunks")
            .fetch_one(&self.pool)
            .await
            .expect("count chunks");
        assert_eq!(
            chunks, 0,
            "nothing compacted: raw rows are the whole history"
        );
        assert_eq!(
            samples_stored, rows,
            "agent_cursors.samples_stored == stored sample rows"
        );
        let duplicates = scalar(
            &self.pool,
            "SELECT count(*) FROM (SELECT x.series_id, x.ts FROM samples x
               JOIN series s ON s.series_id = x.series_id WHERE s.host_id = $1
               GROUP BY 1, 2 HAVING count(*) > 1) d",
        )
        .await;
        assert_eq!(duplicates, 0, "duplicate (series_id, ts) samples");

        // Per batch: every point of a batch has its base timestamp (offset 0), so the
        // stored rows at that timestamp are exactly that batch's samples.
        let per_ts: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT (extract(epoch FROM x.ts) * 1000)::int8, count(*) FROM samples x
             JOIN series s ON s.series_id = x.series_id WHERE s.host_id = $1 GROUP BY 1",
        )
        .bind(HOST)
        .fetch_all(&self.pool)
        .await
        .expect("samples per timestamp");
        let stored_at: BTreeMap<i64, u64> =
            per_ts.into_iter().map(|(ts, n)| (ts, n as u64)).collect();
        let mut produced_at: BTreeMap<i64, u64> = BTreeMap::new();
        for b in &produced {
            *produced_at.entry(b.base_ts_ms).or_default() += b.samples;
        }
        let mut mismatched = Vec::new();
        for (ts, want) in &produced_at {
            let got = stored_at.get(ts).copied().unwrap_or(0);
            if got != *want {
                mismatched.push((*ts, *want, got));
            }
        }
        assert!(
            mismatched.is_empty(),
            "batches stored not exactly once, (base_ts_ms, produced, stored): {mismatched:?}"
        );
        let extra: Vec<(i64, u64)> = stored_at
            .iter()
            .filter(|(ts, _)| !produced_at.contains_key(*ts))
            .map(|(ts, n)| (*ts, *n))
            .collect();
        assert!(
            extra.len() <= unlogged.len(),
            "samples stored at timestamps of no produced batch: {extra:?} (unlogged seqs {unlogged:?})"
        );
        let produced_samples: u64 = produced.iter().map(|b| b.samples).sum();
        let extra_samples: u64 = extra.iter().map(|e| e.1).sum();
        assert_eq!(
            rows as u64,
            produced_samples + extra_samples,
            "stored samples == produced samples"
        );

        // Events.
        let produced_events: u64 = produced.iter().map(|b| b.events).sum();
        let stored_events = scalar(&self.pool, AGENT_EVENTS).await as u64;
        assert_eq!(
            events_stored as u64, stored_events,
            "agent_cursors.events_stored == stored agent events"
        );
        if unlogged.is_empty() {
            assert_eq!(
                stored_events, produced_events,
                "stored agent events == produced events"
            );
        } else {
            assert!(
                stored_events >= produced_events,
                "stored agent events {stored_events} < produced {produced_events}"
            );
        }
        let duplicate_events = scalar(
            &self.pool,
            "SELECT count(*) FROM (SELECT ts, kind, subject_kind, subject_id, payload, message
               FROM events WHERE host_id = $1 GROUP BY 1, 2, 3, 4, 5, 6 HAVING count(*) > 1) d",
        )
        .await;
        assert_eq!(duplicate_events, 0, "duplicate events");

        Verified {
            batches: last_seq,
            samples: rows as u64,
            events: stored_events,
            unlogged,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

/// The collector process is SIGKILLed five times while the agent streams (three times
/// anywhere in the steady stream, twice while it catches up on a backlog it was sent
/// while frozen with SIGSTOP); each time it is started again on the same ports and the
/// agent reconnects and resends what was not acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_sigkilled_five_times_during_a_stream() {
    let t0 = Instant::now();
    let mut f = Fixture::new("collector").await;
    f.start_collector().await;
    f.start_agent().await;
    let mut acked = f.wait_progress("the first stored batches", 0, 4).await;
    let (pid, _, _) = wait_for("the component running", Duration::from_secs(30), || {
        let f = &f;
        async move { f.component().await }
    })
    .await;
    eprintln!(
        "streaming after {:.1} s (acked seq {acked})",
        t0.elapsed().as_secs_f64()
    );

    let mut duplicates = 0.0;
    for round in 1..=5 {
        f.wait_progress("progress before the kill", acked, 3).await;
        duplicates += f.collector_metric(DUPLICATE_METRIC).await.unwrap_or(0.0);
        let how = if round % 2 == 1 {
            // Anywhere in the steady stream.
            tokio::time::sleep(jitter(250)).await;
            "in the stream"
        } else {
            // In a burst: frozen while the agent sends a backlog, thawed, killed while
            // it ingests and acknowledges it.
            Fixture::signal(&f.collector, Signal::SIGSTOP);
            f.wait_spooled(f.last_spooled(), 3).await;
            Fixture::signal(&f.collector, Signal::SIGCONT);
            tokio::time::sleep(jitter(40)).await;
            "in a catch-up burst"
        };
        let killed = Instant::now();
        f.kill_collector();
        let at_kill = acked_seq(&f.pool).await;
        f.start_collector().await;
        acked = f
            .wait_progress("progress after the restart", at_kill, 3)
            .await;
        eprintln!(
            "kill {round} ({how}): acked seq {at_kill} at the kill, {acked} {:.1} s later",
            killed.elapsed().as_secs_f64()
        );
    }

    // The agent never noticed anything but the link: its component ran throughout.
    let (pid_now, state, restarts) = f.component().await.expect("component status");
    assert_eq!(
        (pid_now, restarts),
        (pid, 0),
        "component untouched ({state})"
    );

    let verified = f.stop_and_verify(&BTreeSet::new()).await;
    duplicates += f.collector_metric(DUPLICATE_METRIC).await.unwrap_or(0.0);
    assert!(verified.unlogged.is_empty());
    let sessions = scalar(
        &f.pool,
        "SELECT count(*) FROM agent_sessions WHERE host_id = $1",
    )
    .await;
    assert!(
        sessions >= 6,
        "the agent connected to all six collector incarnations ({sessions} sessions)"
    );
    eprintln!(
        "collector killed 5 times: {} batches, {} samples, {} events stored exactly once; \
         {sessions} sessions; {duplicates} resent batch(es) recognised (before the kills); {:.1} s",
        verified.batches,
        verified.samples,
        verified.events,
        t0.elapsed().as_secs_f64()
    );
    f.pool.close().await;
}

/// The agent process is SIGKILLed mid-stream three times and restarted with the same
/// config and data dir: its durable spool carries on (seqs continue, nothing lost or
/// stored twice) and its component is adopted, not started a second time. The first
/// kill lands anywhere in the stream; the other two are arranged so that the collector
/// has stored batches whose acknowledgement the agent never processed (checked against
/// the dead agent's spool), the case that would store them twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sigkilled_and_restarted() {
    let t0 = Instant::now();
    let mut f = Fixture::new("agent").await;
    f.start_collector().await;
    f.start_agent().await;
    let mut acked = f.wait_progress("the first stored batches", 0, 4).await;
    let (pid, _, _) = wait_for("the component running", Duration::from_secs(30), || {
        let f = &f;
        async move { f.component().await }
    })
    .await;
    eprintln!(
        "streaming after {:.1} s (acked seq {acked}, component pid {pid})",
        t0.elapsed().as_secs_f64()
    );

    let mut unlogged_allowed = BTreeSet::new();
    for round in 1..=3 {
        acked = f.wait_progress("progress before the kill", acked, 3).await;
        let how = if round == 1 {
            // Anywhere in the steady stream.
            tokio::time::sleep(jitter(250)).await;
            "in the stream"
        } else {
            // Stored but not acknowledged: the collector is frozen while the agent sends
            // a few batches; then the agent is frozen while the collector stores them
            // and acknowledges into the void; then the agent dies.
            Fixture::signal(&f.collector, Signal::SIGSTOP);
            let from = f.last_spooled();
            f.wait_spooled(from, 3).await;
            Fixture::signal(&f.agent, Signal::SIGSTOP);
            let frozen_at = acked_seq(&f.pool).await;
            Fixture::signal(&f.collector, Signal::SIGCONT);
            f.wait_progress("the frozen agent's batches stored", frozen_at, 1)
                .await;
            "stored, ack unseen"
        };
        let killed = Instant::now();
        f.agent.take().expect("agent running").kill9();
        // A batch committed just before the kill may have missed its log line.
        let last_logged = f.last_spooled();
        unlogged_allowed.insert(last_logged + 1);
        // What the dead agent's spool knows, against what the collector stored.
        let spool_path = f.agent_data_dir().join("spool.redb");
        let spool_acked = wait_for("the dead agent's spool", Duration::from_secs(10), || {
            let acked = Spool::open(&spool_path, u64::MAX).ok().map(|s| s.acked());
            async move { acked }
        })
        .await;
        let stored_upto = acked_seq(&f.pool).await as u64;
        if round > 1 {
            assert!(
                stored_upto > spool_acked,
                "the collector stored batches the agent never saw acknowledged \
                 (collector cursor {stored_upto}, spool acked {spool_acked})"
            );
        }
        assert!(
            kill(Pid::from_raw(pid as i32), None).is_ok(),
            "the component outlives the agent's SIGKILL"
        );
        f.start_agent().await;
        let (pid_now, state) = wait_for("the component adopted", Duration::from_secs(30), || {
            let f = &f;
            async move {
                f.component()
                    .await
                    .filter(|(_, state, _)| state == "ready" || state == "starting")
                    .map(|(p, s, _)| (p, s))
            }
        })
        .await;
        assert_eq!(pid_now, pid, "the same process is supervised ({state})");
        let adoptions = f
            .agent_metric(ADOPTED_METRIC)
            .await
            .expect("the agent's /metrics");
        assert_eq!(
            adoptions, 1.0,
            "the new agent emitted one ProcessAdopted event"
        );
        let marked = marked_pids(&f.components.marker);
        assert_eq!(
            marked,
            vec![pid as i32],
            "exactly one component process runs"
        );
        acked = f
            .wait_progress(
                "progress after the restart",
                (stored_upto as i64).max(acked),
                3,
            )
            .await;
        eprintln!(
            "kill {round} ({how}): last logged seq {last_logged}, spool acked {spool_acked}, \
             collector cursor {stored_upto} at the kill; cursor {acked} {:.1} s later",
            killed.elapsed().as_secs_f64()
        );
    }
    let (_, _, restarts) = f.component().await.expect("component status");
    assert_eq!(restarts, 0, "the component was never restarted");

    let verified = f.stop_and_verify(&unlogged_allowed).await;
    let duplicates = f.collector_metric(DUPLICATE_METRIC).await.unwrap_or(0.0);
    eprintln!(
        "agent killed 3 times: {} batches, {} samples, {} events stored exactly once \
         (unlogged seqs: {:?}); {duplicates} resent batch(es) recognised; {:.1} s",
        verified.batches,
        verified.samples,
        verified.events,
        verified.unlogged,
        t0.elapsed().as_secs_f64()
    );
    f.pool.close().await;
}

/// Events the agent emits while it starts (a component's first `Pending → Starting`,
/// `ProcessAdopted` after an agent restart) reach the collector.
///
/// They used to be lost: the telemetry loop subscribed to the event channel only when
/// its task first ran, after the components had published them. It now takes a
/// receiver made together with the channel (`Agent::subscribe_from_start`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_events_reach_the_collector() {
    let mut f = Fixture::new("startup").await;
    f.start_collector().await;
    f.start_agent().await;
    let acked = f.wait_progress("the first stored batches", 0, 4).await;
    let (pid, _, _) = wait_for("the component running", Duration::from_secs(30), || {
        let f = &f;
        async move { f.component().await }
    })
    .await;
    f.agent.take().expect("agent running").kill9();
    let last_logged = spooled_batches(&f.agent_log()).last().map_or(0, |b| b.seq);
    f.start_agent().await;
    wait_for("the component adopted", Duration::from_secs(30), || {
        let f = &f;
        async move { f.component().await.filter(|c| c.0 == pid && c.1 == "ready") }
    })
    .await;
    let emitted = f.agent_metric(ADOPTED_METRIC).await.expect("/metrics");
    f.wait_progress("progress after the restart", acked, 4)
        .await;
    f.stop_and_verify(&BTreeSet::from([last_logged + 1])).await;
    let starting = scalar(
        &f.pool,
        "SELECT count(*) FROM events WHERE host_id = $1 AND kind = 'state_changed'
           AND payload->'StateChanged'->>'to' = 'Starting'",
    )
    .await;
    let adopted = scalar(
        &f.pool,
        "SELECT count(*) FROM events WHERE host_id = $1 AND kind = 'process_adopted'",
    )
    .await;
    assert_eq!(
        (starting, adopted),
        (1, 1),
        "stored (Pending → Starting, ProcessAdopted) events; the agent emitted {emitted} adoption(s)"
    );
    f.pool.close().await;
}

/// Samples stored per timestamp (ms) for the host at or after `from_ms`.
async fn samples_by_ts(pool: &PgPool, from_ms: i64) -> BTreeMap<i64, i64> {
    let rows: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT (extract(epoch FROM x.ts) * 1000)::int8 AS ms, count(*)
         FROM samples x JOIN series s ON s.series_id = x.series_id
         WHERE s.host_id = $1 AND x.ts >= to_timestamp($2::float8 / 1000)
         GROUP BY 1",
    )
    .bind(HOST)
    .bind(from_ms)
    .fetch_all(pool)
    .await
    .expect("samples by timestamp");
    rows.into_iter().collect()
}

/// An agent whose state directory was wiped but which keeps its certificate (a
/// re-imaged host) starts numbering from 1 again while the collector's cursor for the
/// host is far above. Everything the agent produces afterwards must be stored, the
/// batches it spooled before meeting the collector included, and the reset recorded as
/// an event.
///
/// Before the fix, the first `Welcome` carried the old cursor and the agent deleted its
/// unsent batches at or below it as acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wiped_agent_state_renumbers_above_the_cursor_and_loses_nothing() {
    let mut f = Fixture::new("wiped").await;
    f.start_collector().await;
    f.start_agent().await;
    let old_cursor = f.wait_progress("the first life's batches", 0, 12).await;
    let mut agent = f.agent.take().expect("agent running");
    let status = agent.terminate(Duration::from_secs(60)).await;
    assert!(status.success(), "agent exit: {status}");
    drop(agent);
    // The collector is away while the new agent starts: it spools before it meets it.
    f.kill_collector();
    std::fs::remove_dir_all(f.agent_data_dir()).expect("wipe the agent's state");
    let first_life = spooled_batches(&f.agent_log()).len();
    f.start_agent().await;
    wait_for(
        "the new agent to spool a few batches",
        Duration::from_secs(30),
        || {
            let n = spooled_batches(&f.agent_log()).len();
            async move { (n >= first_life + 4).then_some(()) }
        },
    )
    .await;
    f.start_collector().await;
    f.wait_progress("the new life's batches", old_cursor, 8)
        .await;
    // Everything the new agent spooled up to now is stored, sample for sample.
    let new_life: Vec<Spooled> = spooled_batches(&f.agent_log())
        .into_iter()
        .skip(first_life)
        .collect();
    let since = new_life.first().map_or(0, |b| b.base_ts_ms);
    let expected: BTreeMap<i64, i64> = new_life
        .iter()
        .filter(|b| b.samples > 0)
        .map(|b| (b.base_ts_ms, b.samples as i64))
        .collect();
    wait_for(
        "every sample of the new life stored",
        Duration::from_secs(60),
        || {
            let pool = &f.pool;
            let expected = &expected;
            async move {
                let got = samples_by_ts(pool, since).await;
                expected
                    .iter()
                    .all(|(ts, n)| got.get(ts) == Some(n))
                    .then_some(())
            }
        },
    )
    .await;
    let resets = scalar(
        &f.pool,
        "SELECT count(*) FROM events WHERE host_id = $1 AND kind = 'other'
           AND payload::text LIKE '%spool_reset%'",
    )
    .await;
    assert_eq!(resets, 1, "one reset event recorded");
    let mut agent = f.agent.take().expect("agent running");
    agent.terminate(Duration::from_secs(60)).await;
    f.pool.close().await;
}

/// The collector knows the host's GPUs and components from the first `Hello` (the
/// inventory used to be empty there: it went out before the first sampling tick), and
/// follows changes on the open connection: a component added by a reload appears, a
/// stopped one shows `stopped`, a removed one goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_is_in_the_database_from_the_first_hello_and_follows_changes() {
    let mut f = Fixture::new("inventory").await;
    f.start_collector().await;
    f.start_agent().await;
    // The Hello's host row, GPUs and components are written in one transaction.
    wait_for("the host recorded", Duration::from_secs(30), || {
        let pool = &f.pool;
        async move {
            (scalar(pool, "SELECT count(*) FROM hosts WHERE host_id = $1").await > 0).then_some(())
        }
    })
    .await;
    assert_eq!(
        scalar(&f.pool, "SELECT count(*) FROM gpus WHERE host_id = $1").await,
        2,
        "both GPUs from the first Hello"
    );
    assert_eq!(
        scalar(
            &f.pool,
            &format!("SELECT count(*) FROM components WHERE host_id = $1 AND name = '{COMPONENT}'")
        )
        .await,
        1,
        "the component from the first Hello"
    );
    let connections = f
        .collector_metric("razar_collector_connections_accepted_total")
        .await
        .expect("collector /metrics");

    // A component added by a reload: only an inventory update can tell the collector.
    let config = std::fs::read_to_string(f.path("agent.toml")).expect("agent.toml");
    let added = format!(
        r#"{config}
[[component]]
name = "sleeper"
command = "/bin/sh"
args = ["-c", "while :; do sleep 1; done", {marker}]
stop_grace = "3s"
"#,
        marker = toml_str(&f.components.marker)
    );
    std::fs::write(f.path("agent.toml"), added).expect("agent.toml");
    // The control API is the agent's unix socket; its CLI finds it from the config.
    let agent_cli = |args: &[&str]| {
        let out = std::process::Command::new(binary("razar-agent"))
            .args(args)
            .arg("--config")
            .arg(f.path("agent.toml"))
            .output()
            .expect("razar-agent cli");
        assert!(
            out.status.success(),
            "razar-agent {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    agent_cli(&["reload"]);
    wait_for(
        "the added component in the database",
        Duration::from_secs(30),
        || {
            let pool = &f.pool;
            async move {
                (scalar(
                    pool,
                    "SELECT count(*) FROM components WHERE host_id = $1 AND name = 'sleeper'",
                )
                .await
                    == 1)
                    .then_some(())
            }
        },
    )
    .await;

    // A state change.
    agent_cli(&["stop", COMPONENT]);
    wait_for("the stopped state in the database", Duration::from_secs(30), || {
        let pool = &f.pool;
        async move {
            (scalar(
                pool,
                &format!(
                    "SELECT count(*) FROM components WHERE host_id = $1 AND name = '{COMPONENT}' AND state = 'stopped'"
                ),
            )
            .await
                == 1)
                .then_some(())
        }
    })
    .await;
    // Removed by a reload: gone from the database.
    std::fs::write(f.path("agent.toml"), &config).expect("agent.toml");
    agent_cli(&["reload"]);
    wait_for(
        "the removed component gone from the database",
        Duration::from_secs(30),
        || {
            let pool = &f.pool;
            async move {
                (scalar(
                    pool,
                    "SELECT count(*) FROM components WHERE host_id = $1 AND name = 'sleeper'",
                )
                .await
                    == 0)
                    .then_some(())
            }
        },
    )
    .await;
    assert_eq!(
        f.collector_metric("razar_collector_connections_accepted_total")
            .await
            .expect("collector /metrics"),
        connections,
        "the same connection carried the changes (no new Hello)"
    );
    // A clean agent stop keeps its components in the inventory (stopped, not forgotten):
    // commands for them must stay addressable while the host is away.
    let before = scalar(
        &f.pool,
        "SELECT count(*) FROM components WHERE host_id = $1",
    )
    .await;
    assert!(before >= 1, "components listed before the stop");
    let mut agent = f.agent.take().expect("agent running");
    agent.terminate(Duration::from_secs(60)).await;
    assert_eq!(
        scalar(
            &f.pool,
            "SELECT count(*) FROM components WHERE host_id = $1"
        )
        .await,
        before,
        "a clean stop must not empty the host's inventory"
    );
    f.pool.close().await;
}

// ---------------------------------------------------------------------------------------
// GPU faults
// ---------------------------------------------------------------------------------------

/// XID events stored for the host: (xid, GPU index, XIDs the event stands for), from
/// the typed columns (migration 0003); every one has its first and last time in order.
async fn stored_xids(pool: &PgPool) -> Vec<(i64, String, i64)> {
    let disordered: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE host_id = $1 AND kind = 'xid'
         AND NOT (first_ts <= last_ts AND first_ts = ts)",
    )
    .bind(HOST)
    .fetch_one(pool)
    .await
    .expect("XID times");
    assert_eq!(
        disordered, 0,
        "every XID event has first_ts = ts <= last_ts"
    );
    sqlx::query_as(
        "SELECT xid::int8, coalesce(subject_id, ''), fault_count
         FROM events WHERE host_id = $1 AND kind = 'xid' ORDER BY event_id",
    )
    .bind(HOST)
    .fetch_all(pool)
    .await
    .expect("stored XID events")
}

/// A fault leaves the agent when it is seen, not at the next sampling tick: with a
/// sampling interval of an hour (one tick at start, the next far after the test), an
/// XID that falls due seconds after the start still reaches PostgreSQL.
///
/// Before the fix, GPU events were polled and sent only at the sampling tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_xid_reaches_the_database_without_a_sampling_tick() {
    let scenario = r#"clock = "wall"
driver_version = "550.54.15"

[[gpu]]
name = "NVIDIA H100 80GB HBM3"

[[gpu]]
name = "NVIDIA H100 80GB HBM3"
xid = [{ at = 4, xid = 79 }]
"#;
    let mut f = Fixture::with("fast-xid", "1h", scenario).await;
    f.start_collector().await;
    f.start_agent().await;
    let started = Instant::now();
    let pool = &f.pool;
    let stored = wait_for("the XID stored", Duration::from_secs(60), || async move {
        let xids = stored_xids(pool).await;
        (!xids.is_empty()).then_some(xids)
    })
    .await;
    eprintln!(
        "XID stored {:.1} s after the agent started",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(stored, vec![(79, "1".to_owned(), 1)]);
    f.stop_and_verify(&BTreeSet::new()).await;
    assert_eq!(stored_xids(&f.pool).await, vec![(79, "1".to_owned(), 1)]);
    f.pool.close().await;
}

/// A storm of thousands of XIDs a second on one GPU is coalesced per (GPU, XID) into
/// counted events: far fewer events than XIDs, their counts add up to every injected
/// XID, and the agent's counter (stored as a sample) equals the injected count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_xid_storm_is_coalesced_and_counted_exactly() {
    const STORM: usize = 5_000;
    let mut scenario = String::from(
        "clock = \"wall\"\ndriver_version = \"550.54.15\"\n\n[[gpu]]\nname = \"NVIDIA H100 80GB HBM3\"\nxid = [\n",
    );
    for i in 0..STORM {
        // 5,000 XIDs 31 within one second, from t = 3 s.
        scenario.push_str(&format!(
            "  {{ at = {:.4}, xid = 31 }},\n",
            3.0 + i as f64 * 0.0002
        ));
    }
    scenario.push_str("  { at = 3.5, xid = 79 },\n]\n");
    let mut f = Fixture::with("storm", SAMPLE_INTERVAL, &scenario).await;
    f.start_collector().await;
    f.start_agent().await;
    let pool = &f.pool;
    let total = |xid: i64, xids: &[(i64, String, i64)]| -> i64 {
        xids.iter().filter(|x| x.0 == xid).map(|x| x.2).sum()
    };
    wait_for("every XID stored", Duration::from_secs(60), || async move {
        let xids = stored_xids(pool).await;
        (total(31, &xids) >= STORM as i64 && total(79, &xids) >= 1).then_some(())
    })
    .await;
    let counter = "SELECT coalesce(max(x.value), 0)::int8 FROM samples x
                   JOIN series s ON s.series_id = x.series_id
                   WHERE s.host_id = $1 AND s.metric = 'razar_gpu_xid_errors_total'
                     AND s.labels->>'xid' = '31'";
    wait_for(
        "the XID counter stored",
        Duration::from_secs(60),
        || async move { (scalar(pool, counter).await >= STORM as i64).then_some(()) },
    )
    .await;
    f.stop_and_verify(&BTreeSet::new()).await;
    let xids = stored_xids(&f.pool).await;
    assert_eq!(total(31, &xids), STORM as i64, "every XID counted once");
    assert_eq!(total(79, &xids), 1);
    let events_31 = xids.iter().filter(|x| x.0 == 31).count();
    assert!(
        events_31 <= STORM / 50,
        "{STORM} XIDs coalesced into {events_31} events"
    );
    assert_eq!(
        scalar(&f.pool, counter).await,
        STORM as i64,
        "the counter is exact"
    );
    f.pool.close().await;
}

/// GPU 0 runs component `a` at revision v1, GPU 1 runs `b` at v2 (each a real process
/// of its component on the fake GPU, by pid file). An XID on GPU 1 is stored naming GPU
/// 1's UUID and PCI bus id, `b`, v2, its spec hash and pid, and the process on the GPU;
/// not `a`. SQL answers "which faults hit revision R" and "which revisions ran on GPU U
/// when it faulted" from columns, without parsing text.
///
/// Before the fix the row said only `subject = gpu 1` and `{"Xid": {...}}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_xid_is_stored_with_its_gpu_processes_and_the_revisions_on_it() {
    let scenario = r#"clock = "wall"
driver_version = "550.54.15"

[[gpu]]
name = "NVIDIA H100 80GB HBM3"
uuid = "GPU-00000000-0000-0000-0000-00000000000a"
process = [{ pid_file = "a.pid", used_memory = 1073741824 }]

[[gpu]]
name = "NVIDIA H100 80GB HBM3"
uuid = "GPU-00000000-0000-0000-0000-00000000000b"
process = [{ pid_file = "b.pid", used_memory = 2147483648 }]
xid = [{ at = 12, xid = 13 }]
"#;
    let mut f = Fixture::with("attribution", SAMPLE_INTERVAL, scenario).await;
    let mut components = String::new();
    for (name, revision) in [("a", "v1"), ("b", "v2")] {
        let pid_file = f.path(&format!("{name}.pid"));
        // Runs until `<name>.stop` exists, then exits 3 (a component event after the
        // agent saw the component on its GPU).
        components.push_str(&format!(
            "\n[[component]]\nname = \"{name}\"\nrevision = \"{revision}\"\ncommand = \"/bin/sh\"\nargs = [\"-c\", {script}, {marker}]\nstop_grace = \"3s\"\n",
            script = toml_str(format!(
                "echo $$ > {}; while [ ! -e {} ]; do sleep 0.2; done; exit 3",
                pid_file.display(),
                f.path(&format!("{name}.stop")).display()
            )),
            marker = toml_str(&f.components.marker),
        ));
    }
    let config = f.path("agent.toml");
    let mut text = std::fs::read_to_string(&config).expect("agent.toml");
    text.push_str(&components);
    std::fs::write(&config, text).expect("agent.toml");
    f.start_collector().await;
    f.start_agent().await;
    let pid_of = |name: &str| {
        std::fs::read_to_string(f.path(&format!("{name}.pid")))
            .ok()
            .and_then(|p| p.trim().parse::<i64>().ok())
    };
    // b's pid while it runs on GPU 1, read before the XID (at 12 s): the XID is an
    // application fault, which the decision engine answers by restarting b (a new pid).
    let b_pid = wait_for("b wrote its pid", Duration::from_secs(60), || async move {
        pid_of("b")
    })
    .await;
    let pool = &f.pool;
    let event_id: i64 = wait_for("the XID stored", Duration::from_secs(60), || async move {
        sqlx::query_scalar("SELECT event_id FROM events WHERE host_id = $1 AND kind = 'xid'")
            .bind(HOST)
            .fetch_optional(pool)
            .await
            .expect("query")
    })
    .await;
    assert!(pid_of("a").is_some(), "a wrote its pid");

    let (uuid, index, pci, xid, count, first_is_ts): FaultColumns = sqlx::query_as(
        "SELECT gpu_uuid, gpu_index, pci_bus_id, xid, fault_count, first_ts = ts
         FROM events WHERE event_id = $1",
    )
    .bind(event_id)
    .fetch_one(pool)
    .await
    .expect("event row");
    let (inventory_uuid, inventory_pci): (String, String) =
        sqlx::query_as("SELECT uuid, pci_bus_id FROM gpus WHERE host_id = $1 AND gpu_index = 1")
            .bind(HOST)
            .fetch_one(pool)
            .await
            .expect("GPU 1 in the inventory");
    assert_eq!(inventory_uuid, "GPU-00000000-0000-0000-0000-00000000000b");
    assert_eq!(uuid.as_deref(), Some(inventory_uuid.as_str()));
    assert_eq!(pci.as_deref(), Some(inventory_pci.as_str()));
    assert_eq!(
        (index, xid, count, first_is_ts),
        (Some(1), Some(13), Some(1), true)
    );

    let components: Vec<(String, String, String, Option<i64>, String)> = sqlx::query_as(
        "SELECT component, revision, spec_hash, pid, gpu_uuid FROM fault_components
         WHERE event_id = $1 ORDER BY component",
    )
    .bind(event_id)
    .fetch_all(pool)
    .await
    .expect("fault components");
    assert_eq!(components.len(), 1, "only b ran on GPU 1: {components:?}");
    let (name, revision, spec_hash, pid, gpu) = &components[0];
    assert_eq!((name.as_str(), revision.as_str()), ("b", "v2"));
    assert_eq!(*pid, Some(b_pid));
    assert_eq!(gpu, &inventory_uuid);
    assert!(
        spec_hash.len() == 64 && spec_hash.chars().all(|c| c.is_ascii_hexdigit()),
        "{spec_hash}"
    );
    let processes: Vec<(i64, String, Option<i64>)> = sqlx::query_as(
        "SELECT pid, name, used_memory_bytes FROM fault_processes WHERE event_id = $1",
    )
    .bind(event_id)
    .fetch_all(pool)
    .await
    .expect("fault processes");
    assert_eq!(processes, vec![(b_pid, "sh".to_owned(), Some(2 << 30))]);

    // Which faults hit revision v2 of b (one), v1 of a (none); which revisions ran on
    // GPU 1 when it faulted (b v2).
    let hits = |component: &'static str, revision: &'static str| async move {
        scalar_bind(
            pool,
            "SELECT count(*) FROM fault_components f JOIN events e USING (event_id)
             WHERE e.kind = 'xid' AND f.component = $1 AND f.revision = $2",
            &[component, revision],
        )
        .await
    };
    assert_eq!(hits("b", "v2").await, 1);
    assert_eq!(hits("a", "v1").await, 0);
    let on_gpu: Vec<(String, String)> = sqlx::query_as(
        "SELECT f.component, f.revision FROM events e JOIN fault_components f USING (event_id)
         WHERE e.gpu_uuid = $1",
    )
    .bind(&inventory_uuid)
    .fetch_all(pool)
    .await
    .expect("revisions on the GPU");
    assert_eq!(on_gpu, vec![("b".to_owned(), "v2".to_owned())]);

    // A component event carries its revision and the GPUs the component used: b exits.
    std::fs::write(f.path("b.stop"), "").expect("b.stop");
    let exited: (Option<String>, Option<String>, Option<Vec<String>>) =
        wait_for("b's exit stored", Duration::from_secs(60), || async move {
            sqlx::query_as(
                "SELECT component_revision, component_spec_hash, gpu_uuids FROM events
                 WHERE host_id = $1 AND subject_id = 'b' AND kind = 'process_exited'",
            )
            .bind(HOST)
            .fetch_optional(pool)
            .await
            .expect("query")
        })
        .await;
    assert_eq!(
        exited,
        (
            Some("v2".to_owned()),
            Some(spec_hash.clone()),
            Some(vec![inventory_uuid.clone()])
        )
    );
    let revisions: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT DISTINCT subject_id, component_revision FROM events
         WHERE host_id = $1 AND subject_kind = 'component' AND subject_id IN ('a', 'b')
         ORDER BY 1, 2",
    )
    .bind(HOST)
    .fetch_all(pool)
    .await
    .expect("component events");
    assert_eq!(
        revisions,
        vec![
            ("a".to_owned(), Some("v1".to_owned())),
            ("b".to_owned(), Some("v2".to_owned()))
        ],
        "every component event names its revision"
    );
    f.stop_and_verify(&BTreeSet::new()).await;
    f.pool.close().await;
}

/// An XID event's typed columns: GPU UUID, index, PCI bus id, XID, count, first = ts.
type FaultColumns = (
    Option<String>,
    Option<i32>,
    Option<String>,
    Option<i32>,
    Option<i64>,
    bool,
);

/// A count from `sql` with text parameters.
async fn scalar_bind(pool: &PgPool, sql: &str, params: &[&str]) -> i64 {
    let mut query = sqlx::query_scalar(sql);
    for p in params {
        query = query.bind(*p);
    }
    query.fetch_one(pool).await.expect("count")
}

/// Makes the fixture's agent read its GPUs through the fake NVML library (the real NVML
/// code path) playing `scenario`, with the kernel log the library writes (`kmsg.log`
/// beside it) as `gpu.kernel_log`.
fn use_fake_nvml(f: &Fixture, scenario: &str) {
    let exe = std::env::current_exe().expect("test executable path");
    let built = exe.parent().expect("deps dir").join("libnvidia_ml.so");
    assert!(built.is_file(), "{} missing", built.display());
    let host = f.path("gpu-host");
    std::fs::create_dir_all(&host).expect("fake host dir");
    let library = host.join("libnvidia-ml.so.1");
    std::fs::copy(&built, &library).expect("copy the fake library");
    std::fs::write(host.join("scenario.toml"), scenario).expect("fake scenario");
    let config = f.path("agent.toml");
    let text = std::fs::read_to_string(&config).expect("agent.toml");
    let start = text.find("[gpu]\n").expect("a [gpu] section");
    let end = start + text[start..].find("\n\n").expect("end of [gpu]");
    let gpu = format!(
        "[gpu]\nsource = \"nvml\"\nnvml_library = {}\nkernel_log = {}",
        toml_path(&library),
        toml_path(&host.join("kmsg.log"))
    );
    std::fs::write(&config, format!("{}{gpu}{}", &text[..start], &text[end..]))
        .expect("agent.toml");
}

/// With the kernel log readable, a same-instant pair (XID 79 beside 154 on one GPU) is
/// stored as two faults: NVML's event set keeps only the latest of the two, the kernel
/// log has both, and the pair seen twice is counted once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_same_instant_pair_is_stored_as_two_faults() {
    let mut f = Fixture::with("pair", SAMPLE_INTERVAL, GPU_SCENARIO).await;
    use_fake_nvml(
        &f,
        "clock = \"wall\"\ndriver_version = \"550.54.15\"\nkernel_log = \"kmsg.log\"\n\n[[gpu]]\n\n[[gpu]]\nxid = [{ at = 4, xid = 79 }, { at = 4, xid = 154 }]\n",
    );
    f.start_collector().await;
    f.start_agent().await;
    let pool = &f.pool;
    let mut stored = wait_for("both XIDs stored", Duration::from_secs(60), || async move {
        let xids = stored_xids(pool).await;
        (xids.len() >= 2).then_some(xids)
    })
    .await;
    f.stop_and_verify(&BTreeSet::new()).await;
    let after = stored_xids(&f.pool).await;
    assert_eq!(after.len(), stored.len(), "nothing stored late: {after:?}");
    stored.sort();
    assert_eq!(
        stored,
        vec![(79, "1".to_owned(), 1), (154, "1".to_owned(), 1)],
        "two faults, each once"
    );
    let with_uuid = scalar(
        &f.pool,
        "SELECT count(*) FROM events WHERE host_id = $1 AND kind = 'xid' AND gpu_uuid IS NOT NULL",
    )
    .await;
    assert_eq!(with_uuid, 2);
    f.pool.close().await;
}

/// Seconds since boot now, in microseconds (`/proc/uptime`, the kmsg clock).
fn uptime_us() -> u64 {
    let text = std::fs::read_to_string("/proc/uptime").expect("/proc/uptime");
    let seconds: f64 = text
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .expect("uptime");
    (seconds * 1e6) as u64
}

/// `Some` once at least `n` XID events are stored.
async fn stored_count(pool: &PgPool, n: usize) -> Option<()> {
    (stored_xids(pool).await.len() >= n).then_some(())
}

/// Appends a `/dev/kmsg`-form line for XID `xid` on the fake GPU 0 (PCI 0000:01:00).
fn append_kmsg_xid(path: &Path, seq: u64, xid: u32) {
    use std::io::Write;
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open kernel log");
    writeln!(
        file,
        "3,{seq},{},-;NVRM: Xid (PCI:0000:01:00): {xid}, pid=77, name=trainer, test",
        uptime_us()
    )
    .expect("write kernel log");
}

/// Kernel log XIDs across an agent SIGKILL and restart: none stored twice (the agent
/// keeps the kmsg sequence number it reported up to), none lost (the lines written
/// while it was down are reported at the restart, historical, at their own time).
///
/// Before the fix the restarted agent read the kernel log from its end: the XIDs of the
/// down time were lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_log_xids_across_an_agent_sigkill_are_stored_once() {
    let mut f = Fixture::with("kmsg-kill", SAMPLE_INTERVAL, GPU_SCENARIO).await;
    // The fake library raises no XID of its own: every XID comes from the kernel log,
    // each a distinct (unknown, never dropped) code so each line is told apart.
    use_fake_nvml(&f, "driver_version = \"550.54.15\"\n\n[[gpu]]\n");
    let kmsg = f.path("gpu-host/kmsg.log");
    std::fs::write(&kmsg, "").expect("kernel log");
    f.start_collector().await;
    f.start_agent().await;
    for seq in 1..=5 {
        append_kmsg_xid(&kmsg, seq, 1000 + seq as u32);
    }
    wait_for("five XIDs stored", Duration::from_secs(60), || {
        stored_count(&f.pool, 5)
    })
    .await;
    f.agent.take().expect("agent running").kill9();
    // While the agent is down.
    for seq in 6..=8 {
        append_kmsg_xid(&kmsg, seq, 1000 + seq as u32);
    }
    f.start_agent().await;
    for seq in 9..=10 {
        append_kmsg_xid(&kmsg, seq, 1000 + seq as u32);
    }
    wait_for("ten XIDs stored", Duration::from_secs(60), || {
        stored_count(&f.pool, 10)
    })
    .await;
    f.stop_and_verify(&BTreeSet::new()).await;
    let mut xids: Vec<i64> = stored_xids(&f.pool).await.iter().map(|x| x.0).collect();
    xids.sort_unstable();
    assert_eq!(xids, (1001..=1010).collect::<Vec<i64>>(), "each XID once");
    let historical: Vec<i64> = sqlx::query_scalar(
        "SELECT xid::int8 FROM events WHERE host_id = $1 AND kind = 'xid' AND historical
         ORDER BY xid",
    )
    .bind(HOST)
    .fetch_all(&f.pool)
    .await
    .expect("historical XIDs");
    assert_eq!(historical, vec![1006, 1007, 1008], "the down time's XIDs");
    f.pool.close().await;
}

/// The decision engine end to end over real processes: an XID 79 on GPU 1 of the agent's
/// fake GPUs reaches the collector's engine through QUIC and the store; that GPU (only)
/// is quarantined and a `DrainGpu` command for it is delivered to the agent and settled
/// by the agent's answer (this branch's agent answers GPU commands "not supported yet").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_xid_79_from_a_real_agent_quarantines_that_gpu_and_drains_it() {
    let scenario = r#"clock = "wall"
driver_version = "550.54.15"

[[gpu]]
name = "NVIDIA H100 80GB HBM3"

[[gpu]]
name = "NVIDIA H100 80GB HBM3"
xid = [{ at = 3, xid = 79 }]
"#;
    let mut f = Fixture::with("engine-xid", "1h", scenario).await;
    f.start_collector().await;
    f.start_agent().await;
    let pool = &f.pool;
    let quarantined = wait_for(
        "GPU 1 quarantined",
        Duration::from_secs(60),
        || async move {
            sqlx::query_scalar::<_, String>(
                "SELECT gpu_uuid FROM gpu_health WHERE host_id = $1 AND gpu_index = 1
             AND state = 'quarantined'",
            )
            .bind(HOST)
            .fetch_optional(pool)
            .await
            .expect("gpu_health")
        },
    )
    .await;
    // The drain reached the agent and its answer is stored.
    let (action, state, message) = wait_for(
        "the drain command settled",
        Duration::from_secs(60),
        || async move {
            sqlx::query_as::<_, (serde_json::Value, String, Option<String>)>(
                "SELECT action, state, message FROM commands
                 WHERE host_id = $1 AND caller = 'engine' AND kind = 'drain_gpu'
                 AND state IN ('succeeded', 'failed')",
            )
            .bind(HOST)
            .fetch_optional(pool)
            .await
            .expect("commands")
        },
    )
    .await;
    assert_eq!(action["DrainGpu"]["gpu"], quarantined.as_str(), "{action}");
    eprintln!("drain command {state}: {message:?}");
    // GPU 0 untouched: no command names it, its health is not quarantined.
    let others: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM commands WHERE host_id = $1 AND caller = 'engine'
         AND (kind = 'rollback' OR NOT action::text LIKE '%' || $2 || '%')",
    )
    .bind(HOST)
    .bind(&quarantined)
    .fetch_one(pool)
    .await
    .expect("commands");
    assert_eq!(others, 0, "only GPU 1 is touched, no rollback");
    let gpu0: Option<String> =
        sqlx::query_scalar("SELECT state FROM gpu_health WHERE host_id = $1 AND gpu_index = 0")
            .bind(HOST)
            .fetch_optional(pool)
            .await
            .expect("gpu_health");
    assert!(gpu0.as_deref().is_none_or(|s| s == "healthy"), "{gpu0:?}");
    f.stop_and_verify(&BTreeSet::new()).await;
    f.pool.close().await;
}
