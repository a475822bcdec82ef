//! Fault path benchmark: from an agent spooling a GPU fault (an events-only batch, what
//! the telemetry loop's fast path publishes) to its row visible in PostgreSQL, with 1
//! and with N agents streaming on loopback, beside the sample path's figure (a 100-sample
//! batch, spooled at each agent's 1 s tick) from the same run.
//!
//! Run: `cargo run --release -p razar-tests --example fault_bench -- [AGENTS] [SECS]`
//! (defaults 100 and 20). Each agent is the real uplink (QUIC, mTLS, its own certificate,
//! its own redb spool); the collector is the whole [`Service`] on a private PostgreSQL
//! (fsync off, as in the tests). Every agent spools a sample batch each second and one
//! attributed XID (`EventKind::GpuFault`) at a random instant of each second. A batch is
//! visible when its host's cursor (committed in the same transaction) reaches its seq;
//! one poller reads the cursors every 2 ms, so figures carry up to ~2 ms of polling
//! granularity. Not measured here: the wait from the GPU's fault to the agent's poll
//! of its GPU source (every 100 ms, so up to 100 ms more). Compare runs on one machine.

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
        let waiting = waiting.clone();
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

    for n in [1, agents] {
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
        println!(
            "{n} agent(s) streaming {secs} s: fault -> row visible {}; sample batch -> rows visible {}",
            summary(&mut fault),
            summary(&mut sample)
        );
    }
    poller.abort();
    service.shutdown().await;
    Ok(())
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
