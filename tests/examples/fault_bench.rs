//! Fault path benchmark: from a GPU raising a fault to its row visible in PostgreSQL,
//! with 1 and with N agents streaming on loopback, beside the sample path's figure (a
//! 100-sample batch, spooled at each agent's 1 s tick) from the same run.
//!
//! Run: `cargo build --release -p razar-agent && cargo run --release -p razar-tests
//! --example fault_bench -- [AGENTS] [SECS] [STORM_SECS] [STORM_RATE]` (defaults 100, 20,
//! 60 and 10,000; STORM_SECS 0 skips the storm). The collector is the whole [`Service`]
//! on a private PostgreSQL (fsync off, as in the tests).
//!
//! Raise → row (the honest figure): one real `razar-agent` process (built in the same
//! profile, beside this example's directory) on the fake NVML library with a step clock;
//! once a second, at a pseudo-random instant, this process advances the step file and
//! the fake GPU raises an XID at that step. The clock starts at that write (the fault's
//! raise) and stops when the XID's event row is visible: it covers the NVML event wait
//! (the fake re-reads the step file every 5 ms while an `nvmlEventSetWait` waits, so up
//! to 5 ms of it is the fake's own granularity), the agent's fault path (attribution,
//! spool), QUIC, ingest and commit.
//!
//! Spool → row and sample path: AGENTS simulated agents, each the real uplink (QUIC,
//! mTLS, its own certificate, its own redb spool); each spools a sample batch each
//! second and one attributed XID (`EventKind::GpuFault`) at a random instant of each
//! second, timed from the spooling. A batch is visible when its host's cursor
//! (committed in the same transaction) reaches its seq; pollers read every 2 ms, so
//! figures carry up to ~2 ms of polling granularity. Compare runs on one machine.
//!
//! Storm: a second real `razar-agent` on the fake NVML library reads a kernel log file
//! this process writes STORM_RATE `NVRM: Xid` lines a second into for STORM_SECS, while
//! the other agents stream as above. Printed: the agent's CPU and peak RSS, whether the
//! XID counter and the stored events' counts equal the injected count, how many events
//! carried them, and the other hosts' latencies during the storm.

use anyhow::Context as _;
use razar_agent::spool::Spool;
use razar_agent::uplink::{Backoff, Uplink, UplinkConfig};
use razar_collector::config::{CollectorConfig, Database, TlsPaths};
use razar_collector::service::Service;
use razar_shared::domain::{Severity, XidClass};
use razar_shared::protocol::{
    ComponentRevision, Event, EventKind, FaultProcess, GpuFault, GpuFaultKind, GpuRef,
    SeriesPoints, Subject,
};
use razar_tests::ca::TestCa;
use razar_tests::fixtures::now_ms;
use razar_tests::pg::TestPg;
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// (host, seq) → (spooled at, where to send the latency).
type Waiting = Arc<Mutex<HashMap<(String, u64), (Instant, oneshot::Sender<Duration>)>>>;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Path {
    Fault,
    Sample,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let agents: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(100);
    let secs: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(20);
    let dir = tempfile::tempdir()?;
    let mut ca = TestCa::new()?;
    let pg = TestPg::start().await?;
    pg.store().await?.close().await;
    let pool = pg.pool().await?;
    let quic_port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut c = CollectorConfig::defaults(&dir.path().join("collector"));
    c.quic_listen = ([127, 0, 0, 1], quic_port).into();
    c.http_listen = ([127, 0, 0, 1], 0).into();
    c.tls = TlsPaths {
        ca: ca.ca_path(),
        cert: ca.collector().cert_path.clone(),
        key: ca.collector().key_path.clone(),
        crl: Some(ca.crl_path()),
    };
    c.database = Database::Url(pg.url());
    c.pool_size = NonZeroU32::new(8).context("pool size")?;
    let service = Service::start(c).await?;

    let mut uplinks = Vec::new();
    for i in 0..agents {
        let host = format!("fault-{i:04}");
        let issued = ca.agent(&host)?;
        let spool = Arc::new(Spool::open(
            dir.path().join(format!("{host}.redb")),
            u64::MAX,
        )?);
        let tls = ca.client_config(&issued)?;
        let mut config = UplinkConfig::new(
            format!("127.0.0.1:{quic_port}"),
            "localhost",
            Arc::new(tls),
            host.clone(),
        );
        config.backoff =
            Backoff::try_new(Duration::from_millis(50), Duration::from_millis(400), 0.5)?;
        let (uplink, commands) = Uplink::spawn(config, spool)?;
        drop(commands);
        uplinks.push((host, Arc::new(uplink)));
    }
    let started = Instant::now();
    while service.collector().agents_connected() < agents {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "agents did not connect"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let waiting: Waiting = Arc::default();
    let poller = {
        let (waiting, pool) = (waiting.clone(), pool.clone());
        tokio::spawn(async move {
            loop {
                let busy = !waiting.lock().unwrap_or_else(|p| p.into_inner()).is_empty();
                if busy {
                    let cursors: Vec<(String, i64)> =
                        sqlx::query_as("SELECT host_id, acked_seq FROM agent_cursors")
                            .fetch_all(&pool)
                            .await
                            .unwrap_or_default();
                    let now = Instant::now();
                    let cursors: HashMap<String, u64> = cursors
                        .into_iter()
                        .filter_map(|(h, s)| Some((h, u64::try_from(s).ok()?)))
                        .collect();
                    let mut w = waiting.lock().unwrap_or_else(|p| p.into_inner());
                    let done: Vec<(String, u64)> = w
                        .keys()
                        .filter(|(h, seq)| cursors.get(h).is_some_and(|c| c >= seq))
                        .cloned()
                        .collect();
                    for key in done {
                        if let Some((t0, tx)) = w.remove(&key) {
                            let _ = tx.send(now.saturating_duration_since(t0));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };

    let raiser = RealAgent::start(
        &mut ca,
        dir.path(),
        "raise-host",
        quic_port,
        // XID 13 on GPU 1 at every step; the bench advances the step.
        &format!(
            "clock = \"step\"\ndriver_version = \"550.54.15\"\n\n[[gpu]]\n\n[[gpu]]\nxid = [{}]\n",
            (1..=2 * secs)
                .map(|k| format!("{{ at = {k}, xid = 13 }}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )?;
    raiser.wait_streaming(&pool).await?;
    let mut step = 0u64;
    for n in [1, agents] {
        let raised = {
            let (pool, dir, first) = (pool.clone(), raiser.dir.clone(), step);
            tokio::spawn(async move { raise(pool, dir, "raise-host", first, secs).await })
        };
        step += secs;
        let mut runs = Vec::new();
        for (host, uplink) in uplinks.iter().take(n) {
            runs.push(tokio::spawn(stream(
                host.clone(),
                uplink.clone(),
                waiting.clone(),
                secs,
            )));
        }
        let mut fault = Vec::new();
        let mut sample = Vec::new();
        for run in runs {
            for (path, d) in run.await?? {
                match path {
                    Path::Fault => fault.push(d),
                    Path::Sample => sample.push(d),
                }
            }
        }
        let mut raised = raised.await??;
        println!(
            "{n} simulated agent(s) + 1 real agent streaming {secs} s: fault raised -> row visible \
             (real agent, fake NVML) {}; fault spooled -> row visible {}; sample batch spooled -> \
             rows visible {}",
            summary(&mut raised),
            summary(&mut fault),
            summary(&mut sample)
        );
    }
    raiser.stop().await;
    let storm_secs: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(60);
    let storm_rate: u64 = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(10_000);
    if storm_secs > 0 {
        storm(
            &mut ca,
            dir.path(),
            quic_port,
            &pg,
            &uplinks,
            &waiting,
            storm_secs,
            storm_rate,
        )
        .await?;
    }
    poller.abort();
    service.shutdown().await;
    Ok(())
}

/// utime + stime of `pid` in clock ticks, and its VmRSS in KiB.
fn proc_usage(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.get(stat.rfind(')')? + 1..)?;
    let f: Vec<&str> = after.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok());
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((n(11)? + n(12)?, rss))
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

fn uptime_us() -> u64 {
    let text = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
    let seconds: f64 = text
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0);
    (seconds * 1e6) as u64
}

/// The storm phase (see the module doc).
#[allow(clippy::too_many_arguments)]
async fn storm(
    ca: &mut TestCa,
    dir: &std::path::Path,
    quic_port: u16,
    pg: &TestPg,
    uplinks: &[(String, Arc<Uplink>)],
    waiting: &Waiting,
    secs: u64,
    rate: u64,
) -> anyhow::Result<()> {
    use std::io::Write as _;
    let host = "storm-host";
    let agent = RealAgent::start(
        ca,
        dir,
        host,
        quic_port,
        "driver_version = \"550.54.15\"\n\n[[gpu]]\n",
    )?;
    let (pid, kmsg) = (agent.pid, agent.dir.join("kmsg"));
    let pool = pg.pool().await?;
    agent.wait_streaming(&pool).await?;
    let (cpu0, _) = proc_usage(pid).context("agent /proc")?;
    // The other hosts stream meanwhile.
    let mut runs = Vec::new();
    for (h, uplink) in uplinks.iter().skip(1) {
        runs.push(tokio::spawn(stream(
            h.clone(),
            uplink.clone(),
            waiting.clone(),
            secs,
        )));
    }
    let writer = std::thread::spawn(move || -> std::io::Result<(u64, u64)> {
        let mut file = std::fs::OpenOptions::new().append(true).open(&kmsg)?;
        let started = Instant::now();
        let mut written = 0u64;
        let mut peak_rss = 0u64;
        let mut seq = 1u64;
        while started.elapsed() < Duration::from_secs(secs) {
            let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
            let mut chunk = String::new();
            while written < due.min(rate * secs) {
                chunk.push_str(&format!(
                    "3,{seq},{},-;NVRM: Xid (PCI:0000:01:00): 74, pid=1, name=x, NVLink error\n",
                    uptime_us()
                ));
                seq += 1;
                written += 1;
            }
            file.write_all(chunk.as_bytes())?;
            if let Some((_, rss)) = proc_usage(pid) {
                peak_rss = peak_rss.max(rss);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // The last slice's lines: exactly `rate * secs` in all.
        let mut chunk = String::new();
        while written < rate * secs {
            chunk.push_str(&format!(
                "3,{seq},{},-;NVRM: Xid (PCI:0000:01:00): 74, pid=1, name=x, NVLink error\n",
                uptime_us()
            ));
            seq += 1;
            written += 1;
        }
        file.write_all(chunk.as_bytes())?;
        Ok((written, peak_rss))
    });
    let (injected, mut peak_rss) = tokio::task::spawn_blocking(move || writer.join())
        .await?
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    let injected_i = i64::try_from(injected)?;
    // Everything stored: the events' counts and the counter.
    let t1 = Instant::now();
    let (events, counted, counter) = loop {
        let (events, counted): (i64, Option<i64>) = sqlx::query_as(
            "SELECT count(*), sum(fault_count)::int8 FROM events
             WHERE host_id = $1 AND kind = 'xid' AND xid = 74",
        )
        .bind(host)
        .fetch_one(&pool)
        .await?;
        let counter: Option<f64> = sqlx::query_scalar(
            "SELECT max(x.value) FROM samples x JOIN series s ON s.series_id = x.series_id
             WHERE s.host_id = $1 AND s.metric = 'razar_gpu_xid_errors_total'
               AND s.labels->>'xid' = '74'",
        )
        .bind(host)
        .fetch_one(&pool)
        .await?;
        if let Some((_, rss)) = proc_usage(pid) {
            peak_rss = peak_rss.max(rss);
        }
        let counter = counter.unwrap_or(0.0);
        let done = counted.unwrap_or(0) >= injected_i && counter >= injected as f64;
        if done || t1.elapsed() > Duration::from_secs(120) {
            break (events, counted.unwrap_or(0), counter);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (cpu1, _) = proc_usage(pid).context("agent /proc")?;
    let cpu_s = (cpu1 - cpu0) as f64 / clock_ticks_per_second();
    let wall = secs as f64 + t1.elapsed().as_secs_f64();
    let mut fault = Vec::new();
    let mut sample = Vec::new();
    for run in runs {
        for (path, d) in run.await?? {
            match path {
                Path::Fault => fault.push(d),
                Path::Sample => sample.push(d),
            }
        }
    }
    println!(
        "storm {secs} s x {rate} XIDs/s on one host: injected {injected}, stored in {events} events \
         counting {counted} ({}), counter {counter} ({}); agent CPU {cpu_s:.1} s over {wall:.0} s \
         ({:.0} % of a core), peak RSS {:.1} MiB",
        if counted == injected_i { "exact" } else { "NOT exact" },
        if counter == injected as f64 { "exact" } else { "NOT exact" },
        100.0 * cpu_s / wall,
        peak_rss as f64 / 1024.0,
    );
    println!(
        "  the other {} hosts meanwhile: fault -> row visible {}; sample batch -> rows visible {}",
        uplinks.len().saturating_sub(1),
        summary(&mut fault),
        summary(&mut sample)
    );
    agent.stop().await;
    Ok(())
}

/// A real `razar-agent` process (built in this example's profile) on a copy of the fake
/// NVML library with `scenario` beside it, its kernel log an empty file `kmsg` in `dir`.
struct RealAgent {
    child: std::process::Child,
    pid: u32,
    host: String,
    /// The host's directory: scenario, step file, kernel log, agent data.
    dir: std::path::PathBuf,
}

impl RealAgent {
    fn start(
        ca: &mut TestCa,
        dir: &std::path::Path,
        host: &str,
        quic_port: u16,
        scenario: &str,
    ) -> anyhow::Result<RealAgent> {
        let exe = std::env::current_exe()?;
        let profile_dir = exe
            .parent()
            .and_then(std::path::Path::parent)
            .context("target/<profile>/examples")?;
        let agent_bin = profile_dir.join("razar-agent");
        anyhow::ensure!(
            agent_bin.is_file(),
            "{} missing: build razar-agent in this profile",
            agent_bin.display()
        );
        let fake = profile_dir.join("deps/libnvidia_ml.so");
        anyhow::ensure!(fake.is_file(), "{} missing", fake.display());
        let host_dir = dir.join(host);
        std::fs::create_dir_all(&host_dir)?;
        let library = host_dir.join("libnvidia-ml.so.1");
        std::fs::copy(&fake, &library)?;
        std::fs::write(host_dir.join("scenario.toml"), scenario)?;
        std::fs::write(host_dir.join("step"), "0")?;
        let kmsg = host_dir.join("kmsg");
        std::fs::write(&kmsg, "")?;
        let issued = ca.agent(host)?;
        let config = format!(
            "[agent]\ndata_dir = {data:?}\nlog_dir = {logs:?}\nlisten = \"127.0.0.1:0\"\nsample_interval = \"1s\"\n\n[collector]\naddress = \"127.0.0.1:{quic_port}\"\nserver_name = \"localhost\"\nca = {ca_path:?}\ncert = {cert:?}\nkey = {key:?}\n\n[gpu]\nsource = \"nvml\"\nnvml_library = {library:?}\nkernel_log = {kmsg:?}\n",
            data = host_dir.join("data"),
            logs = host_dir.join("logs"),
            ca_path = ca.ca_path(),
            cert = issued.cert_path,
            key = issued.key_path,
        );
        let config_path = host_dir.join("agent.toml");
        std::fs::write(&config_path, config)?;
        let child = std::process::Command::new(&agent_bin)
            .args(["run", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(host_dir.join("agent.log"))?)
            .spawn()?;
        Ok(RealAgent {
            pid: child.id(),
            child,
            host: host.to_owned(),
            dir: host_dir,
        })
    }

    /// Until its cursor row exists (its first batch is stored).
    async fn wait_streaming(&self, pool: &sqlx::PgPool) -> anyhow::Result<()> {
        let t0 = Instant::now();
        loop {
            let n: i64 =
                sqlx::query_scalar("SELECT count(*) FROM agent_cursors WHERE host_id = $1")
                    .bind(&self.host)
                    .fetch_one(pool)
                    .await?;
            if n > 0 {
                return Ok(());
            }
            anyhow::ensure!(
                t0.elapsed() < Duration::from_secs(60),
                "agent {} not streaming (see {})",
                self.host,
                self.dir.join("agent.log").display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn stop(self) {
        if let Ok(pid) = i32::try_from(self.pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let mut child = self.child;
        let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    }
}

/// Raises one XID a second for `secs` seconds on the real agent's fake GPU (steps
/// `first + 1 ..= first + secs`), each at a pseudo-random instant of its second: from
/// the step file's write to the XID's event row visible.
async fn raise(
    pool: sqlx::PgPool,
    dir: std::path::PathBuf,
    host: &str,
    first: u64,
    secs: u64,
) -> anyhow::Result<Vec<Duration>> {
    let count = |pool: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM events WHERE host_id = $1 AND kind = 'xid'",
        )
        .bind(host)
        .fetch_one(&pool)
        .await
    };
    let mut out = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    for k in first + 1..=first + secs {
        tick.tick().await;
        let offset = (k.wrapping_mul(0x9E37_79B9) >> 7) % 800;
        tokio::time::sleep(Duration::from_millis(offset)).await;
        let before = count(pool.clone()).await?;
        // Written whole, then renamed: the fake never reads half a number.
        let tmp = dir.join("step.tmp");
        std::fs::write(&tmp, k.to_string())?;
        let t0 = Instant::now();
        std::fs::rename(&tmp, dir.join("step"))?;
        loop {
            if count(pool.clone()).await? > before {
                out.push(t0.elapsed());
                break;
            }
            anyhow::ensure!(
                t0.elapsed() < Duration::from_secs(60),
                "XID at step {k} not visible within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    Ok(out)
}

fn summary(all: &mut [Duration]) -> String {
    if all.is_empty() {
        return "n=0".into();
    }
    all.sort();
    let pick = |q: f64| all[((all.len() as f64 - 1.0) * q).round() as usize];
    format!(
        "n={} p50={:.1} ms p99={:.1} ms max={:.1} ms",
        all.len(),
        pick(0.5).as_secs_f64() * 1e3,
        pick(0.99).as_secs_f64() * 1e3,
        pick(1.0).as_secs_f64() * 1e3,
    )
}

/// One agent for `secs` seconds: a 100-sample batch at each 1 s tick, one attributed
/// XID at a random instant of each second; each from its spooling to its row visible.
async fn stream(
    host: String,
    uplink: Arc<Uplink>,
    waiting: Waiting,
    secs: u64,
) -> anyhow::Result<Vec<(Path, Duration)>> {
    let mut series = Vec::new();
    for i in 0..100 {
        let labels = vec![("gpu".to_owned(), (i % 8).to_string())];
        series.push(
            uplink
                .spool()
                .series_id(&format!("bench_metric_{}", i / 8), &labels)?,
        );
    }
    let mut pending = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let seed = host
        .bytes()
        .fold(7u64, |a, b| a.wrapping_mul(31).wrapping_add(u64::from(b)));
    for second in 0..secs {
        tick.tick().await;
        let points: Vec<SeriesPoints> = series
            .iter()
            .map(|&s| SeriesPoints {
                series: s,
                points: vec![(0, second as f64)],
            })
            .collect();
        pending.push(publish(&host, &uplink, &waiting, Path::Sample, points, Vec::new()).await?);
        // The fault at a pseudo-random instant of this second.
        let offset = (seed.wrapping_mul(second + 1) >> 7) % 900;
        tokio::time::sleep(Duration::from_millis(offset)).await;
        pending.push(
            publish(
                &host,
                &uplink,
                &waiting,
                Path::Fault,
                Vec::new(),
                vec![fault(second)],
            )
            .await?,
        );
    }
    let mut out = Vec::new();
    for (path, rx) in pending {
        let d = tokio::time::timeout(Duration::from_secs(60), rx)
            .await
            .context("not visible within 60 s")??;
        out.push((path, d));
    }
    Ok(out)
}

async fn publish(
    host: &str,
    uplink: &Uplink,
    waiting: &Waiting,
    path: Path,
    series: Vec<SeriesPoints>,
    events: Vec<Event>,
) -> anyhow::Result<(Path, oneshot::Receiver<Duration>)> {
    let t0 = Instant::now();
    let seq = uplink.publish(now_ms(), series, events).await?;
    let (tx, rx) = oneshot::channel();
    waiting
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert((host.to_owned(), seq), (t0, tx));
    Ok((path, rx))
}

/// An attributed XID 13 on GPU 1, as the agent's fault path sends it.
fn fault(k: u64) -> Event {
    let ts = now_ms();
    Event {
        ts_ms: ts,
        severity: Severity::Warning,
        subject: Subject::Gpu(1),
        kind: EventKind::GpuFault(Box::new(GpuFault {
            fault: GpuFaultKind::Xid {
                xid: 13,
                class: XidClass::RestartApplication,
                count: 1,
                first_ms: ts,
                last_ms: ts,
            },
            gpu: GpuRef {
                index: 1,
                uuid: "GPU-00000000-0000-0000-0000-000000000001".into(),
                pci_bus_id: "00000000:02:00.0".into(),
            },
            processes: vec![FaultProcess {
                pid: 4242,
                name: "trainer".into(),
                used_memory_bytes: Some(40 << 30),
            }],
            components: vec![ComponentRevision {
                component: "trainer".into(),
                version: "v2".into(),
                spec_hash: "ab".repeat(32),
                pid: Some(4242),
            }],
            historical: false,
        })),
        message: format!("XID 13 (restart_application) #{k}: restart the application"),
    }
}
