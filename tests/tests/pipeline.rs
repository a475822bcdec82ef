//! The telemetry pipeline end to end: agent spool → QUIC mTLS uplink → collector ingest →
//! PostgreSQL, with real certificates, a real private PostgreSQL and real QUIC on
//! loopback. Batches are produced synthetically through the agent's real spool and
//! uplink. Each fault test ends with "every produced sample and event stored exactly
//! once".
//!
//! The collector runs in its own tokio runtime on its own thread; "killing" it shuts
//! that runtime down at once: its tasks, QUIC state and database connections vanish
//! mid-flight without a goodbye, as with SIGKILL.

use razar_agent::spool::Spool;
use razar_agent::uplink::{Backoff, LinkState, Uplink, UplinkConfig};
use razar_certs::Issued;
use razar_collector::server::prometheus::Registry;
use razar_collector::server::{Collector, IngestConfig};
use razar_collector::store::Store;
use razar_shared::domain::Severity;
use razar_shared::protocol::codec::{encode_agent, CollectorFrameDecoder};
use razar_shared::protocol::{
    AgentMessage, Batch, CollectorMessage, Event, EventKind, Hello, SeriesDef, SeriesPoints,
    SessionConfig, Subject, PROTOCOL_MAX, PROTOCOL_MIN,
};
use razar_tests::ca::TestCa;
use razar_tests::pg::TestPg;
use sqlx::PgPool;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const HOST: &str = "gpu-host-1";
/// The time of the first batch: six hours ago, fixed for the test binary (the collector
/// refuses samples older than its retention or ahead of its clock).
fn base_ms() -> i64 {
    static BASE: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *BASE.get_or_init(|| {
        let now = razar_tests::fixtures::now_ms() - 6 * 3_600_000;
        now - now.rem_euclid(1_000)
    })
}
const SERIES_PER_BATCH: u32 = 2;
const POINTS_PER_SERIES: u32 = 5;

/// Heartbeats every 250 ms, lost after 4 missed: a 1 s grace.
fn session_config() -> SessionConfig {
    SessionConfig {
        heartbeat_interval_ms: 250,
        lost_after_missed: 4,
        max_unacked_batches: 64,
    }
}

fn free_udp_port() -> u16 {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a probe socket");
    socket.local_addr().expect("probe address").port()
}

/// A collector in its own runtime, killable at once.
struct RunningCollector {
    runtime: Option<tokio::runtime::Runtime>,
    collector: Option<Collector>,
}

impl RunningCollector {
    /// Starts a collector on `port` against the database at `url` (blocking: run it
    /// from `spawn_blocking`).
    fn start(url: &str, ca: &TestCa, port: u16) -> RunningCollector {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("collector runtime");
        let tls = Arc::new(ca.server_config().expect("server TLS config"));
        let crls = ca.crls().expect("CRLs");
        let mut config = IngestConfig::new(([127, 0, 0, 1], port).into(), tls, crls);
        config.session = session_config();
        config.keep_alive = Duration::from_millis(500);
        config.idle_timeout = Duration::from_secs(5);
        config.db_writers = 2;
        let url = url.to_owned();
        let collector = runtime.block_on(async move {
            let store = Store::connect(&url, 4).await.expect("collector store");
            store.migrate().await.expect("migrate");
            // The UDP port of a killed collector may take a moment to be free again.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match Collector::start(config.clone(), store.clone(), &Registry::new()).await {
                    Ok(c) => break c,
                    Err(e) if Instant::now() < deadline => {
                        eprintln!("collector start: {e}; retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => panic!("collector start: {e}"),
                }
            }
        });
        RunningCollector {
            runtime: Some(runtime),
            collector: Some(collector),
        }
    }

    fn collector(&self) -> &Collector {
        self.collector.as_ref().expect("collector running")
    }

    /// Stops everything at once: no close frames, no commits, no acks.
    fn kill(mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        drop(self.collector.take());
    }
}

async fn start_collector(url: &str, ca: &Arc<TestCa>, port: u16) -> RunningCollector {
    let url = url.to_owned();
    let ca = ca.clone();
    tokio::task::spawn_blocking(move || RunningCollector::start(&url, &ca, port))
        .await
        .expect("collector start task")
}

async fn kill_collector(c: RunningCollector) {
    tokio::task::spawn_blocking(move || c.kill())
        .await
        .expect("collector kill task");
}

struct Fixture {
    ca: Arc<TestCa>,
    agent: Issued,
    pg: TestPg,
    pool: PgPool,
    port: u16,
    dir: tempfile::TempDir,
}

impl Fixture {
    async fn new() -> Fixture {
        let mut ca = TestCa::new().expect("test CA");
        let agent = ca.agent(HOST).expect("agent certificate");
        let pg = TestPg::start().await.expect("PostgreSQL");
        let store = pg.store().await.expect("migrated store");
        store.close().await;
        let pool = pg.pool().await.expect("pool");
        Fixture {
            ca: Arc::new(ca),
            agent,
            pg,
            pool,
            port: free_udp_port(),
            dir: tempfile::tempdir().expect("spool dir"),
        }
    }

    fn spool_path(&self) -> PathBuf {
        self.dir.path().join("spool.redb")
    }

    async fn collector(&self) -> RunningCollector {
        start_collector(&self.pg.url(), &self.ca, self.port).await
    }

    fn uplink(&self, spool: Arc<Spool>) -> Uplink {
        let tls = self
            .ca
            .client_config(&self.agent)
            .expect("client TLS config");
        let mut config = UplinkConfig::new(
            format!("127.0.0.1:{}", self.port),
            "localhost",
            Arc::new(tls),
            HOST,
        );
        config.backoff =
            Backoff::try_new(Duration::from_millis(50), Duration::from_millis(400), 0.5)
                .expect("backoff");
        config.keep_alive = Duration::from_millis(500);
        config.idle_timeout = Duration::from_secs(5);
        config.connect_timeout = Duration::from_secs(2);
        let (uplink, _commands) = Uplink::spawn(config, spool).expect("uplink");
        uplink
    }
}

fn open_spool(path: &Path, budget: u64) -> Arc<Spool> {
    // After an aborted agent its last references may take a moment to go.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Spool::open(path, budget) {
            Ok(s) => return Arc::new(s),
            Err(e) if Instant::now() < deadline => {
                eprintln!("spool open: {e}; retrying");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("spool open: {e}"),
        }
    }
}

/// What the agent produced (durably spooled), to compare with what is stored.
#[derive(Debug, Default, Clone)]
struct Produced {
    /// (metric, gpu label, ts ms, value) per sample.
    samples: Vec<(String, String, i64, f64)>,
    /// Event messages.
    events: Vec<String>,
    /// Seq → batch index, and the batch's sample count.
    seqs: BTreeMap<u64, u64>,
    next: u64,
}

impl Produced {
    /// The content of batch number `k`: unique values and timestamps per sample.
    fn batch(k: u64, ids: &[u32]) -> (i64, Vec<SeriesPoints>, Vec<Event>) {
        let base = base_ms() + k as i64 * 1_000;
        let series = ids
            .iter()
            .enumerate()
            .map(|(s, id)| SeriesPoints {
                series: *id,
                points: (0..POINTS_PER_SERIES)
                    .map(|j| (j * 100, (k * 100 + s as u64 * 10 + u64::from(j)) as f64))
                    .collect(),
            })
            .collect();
        let events = vec![Event {
            ts_ms: base,
            severity: Severity::Info,
            subject: Subject::Host,
            kind: EventKind::Other {
                code: "pipeline_test".into(),
            },
            message: format!("ev-{k}"),
        }];
        (base, series, events)
    }

    fn record(&mut self, k: u64, seq: u64) {
        let (base, series, events) = Self::batch(k, &[0, 1]);
        for (s, points) in series.iter().enumerate() {
            for (offset, value) in &points.points {
                self.samples.push((
                    "gpu_utilization_ratio".into(),
                    s.to_string(),
                    base + i64::from(*offset),
                    *value,
                ));
            }
        }
        self.events.extend(events.into_iter().map(|e| e.message));
        self.seqs.insert(seq, k);
    }

    /// Publishes `n` batches through the uplink (each durable in the spool first).
    async fn publish(&mut self, uplink: &Uplink, n: u64) {
        let spool = uplink.spool().clone();
        let ids: Vec<u32> = (0..SERIES_PER_BATCH)
            .map(|g| {
                spool
                    .series_id("gpu_utilization_ratio", &[("gpu".into(), g.to_string())])
                    .expect("series id")
            })
            .collect();
        for _ in 0..n {
            let k = self.next;
            self.next += 1;
            let (base, series, events) = Self::batch(k, &ids);
            let seq = uplink.publish(base, series, events).await.expect("publish");
            self.record(k, seq);
        }
    }
}

#[derive(Debug, Default, PartialEq)]
struct Stored {
    samples: Vec<(String, String, i64, f64)>,
    events: Vec<String>,
}

async fn stored(pool: &PgPool) -> Stored {
    let samples: Vec<(String, String, i64, f64)> = sqlx::query_as(
        "SELECT s.metric, s.labels->>'gpu', (extract(epoch FROM x.ts) * 1000)::int8, x.value
         FROM samples x JOIN series s ON s.series_id = x.series_id
         WHERE s.host_id = $1",
    )
    .bind(HOST)
    .fetch_all(pool)
    .await
    .expect("query samples");
    let events: Vec<(String,)> = sqlx::query_as(
        "SELECT message FROM events WHERE host_id = $1 AND payload::text LIKE '%pipeline_test%'",
    )
    .bind(HOST)
    .fetch_all(pool)
    .await
    .expect("query events");
    let mut s = Stored {
        samples,
        events: events.into_iter().map(|e| e.0).collect(),
    };
    s.samples
        .sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    s.events.sort();
    s
}

/// Waits until at least everything produced is stored, then checks it is stored
/// exactly once.
async fn assert_stored_exactly_once(pool: &PgPool, produced: &Produced, within: Duration) {
    let deadline = Instant::now() + within;
    let got = loop {
        let got = stored(pool).await;
        if got.samples.len() >= produced.samples.len() && got.events.len() >= produced.events.len()
        {
            break got;
        }
        assert!(
            Instant::now() < deadline,
            "not everything stored in time: {} of {} samples, {} of {} events",
            got.samples.len(),
            produced.samples.len(),
            got.events.len(),
            produced.events.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut want = Stored {
        samples: produced.samples.clone(),
        events: produced.events.clone(),
    };
    want.samples
        .sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    want.events.sort();
    assert_eq!(
        got.samples.len(),
        want.samples.len(),
        "sample count (duplicates?)"
    );
    assert_eq!(
        got.events.len(),
        want.events.len(),
        "event count (duplicates?)"
    );
    assert!(got == want, "stored rows differ from the produced ones");
}

async fn wait_until<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn stored_samples(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM samples")
        .fetch_one(pool)
        .await
        .unwrap_or(0)
}

async fn host_state(pool: &PgPool) -> Option<String> {
    sqlx::query_scalar("SELECT state FROM hosts WHERE host_id = $1")
        .bind(HOST)
        .fetch_optional(pool)
        .await
        .ok()
        .flatten()
}

async fn host_events(pool: &PgPool, kind: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events WHERE host_id = $1 AND kind = $2")
        .bind(HOST)
        .bind(kind)
        .fetch_one(pool)
        .await
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_rows_equal_what_the_agent_produced() {
    let f = Fixture::new().await;
    let collector = f.collector().await;
    let uplink = f.uplink(open_spool(&f.spool_path(), u64::MAX));
    let mut produced = Produced::default();
    produced.publish(&uplink, 50).await;
    assert_stored_exactly_once(&f.pool, &produced, Duration::from_secs(60)).await;
    // Everything acknowledged: the spool is empty.
    let spool = uplink.spool().clone();
    wait_until("spool drained", Duration::from_secs(30), || {
        let empty = spool.is_empty();
        async move { empty }
    })
    .await;
    assert_eq!(uplink.status().state, LinkState::Connected);
    assert_eq!(
        collector.collector().connected_hosts(),
        vec![HOST.to_string()]
    );
    assert_eq!(
        collector.collector().metrics().samples_stored.get() as usize,
        produced.samples.len()
    );
    uplink.shutdown().await;
    kill_collector(collector).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_killed_five_times_during_a_stream() {
    let f = Fixture::new().await;
    let mut collector = f.collector().await;
    let uplink = Arc::new(f.uplink(open_spool(&f.spool_path(), u64::MAX)));
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let producer = {
        let uplink = uplink.clone();
        tokio::spawn(async move {
            let mut produced = Produced::default();
            while !*stop_rx.borrow() {
                produced.publish(&uplink, 2).await;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                    _ = stop_rx.changed() => {}
                }
            }
            produced
        })
    };
    for round in 0..5 {
        // Kill only once this collector has stored something: mid-stream.
        let before = stored_samples(&f.pool).await;
        wait_until(
            &format!("progress before kill {round}"),
            Duration::from_secs(60),
            || {
                let pool = f.pool.clone();
                async move { stored_samples(&pool).await > before }
            },
        )
        .await;
        kill_collector(collector).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        collector = f.collector().await;
    }
    stop_tx.send_replace(true);
    let produced = producer.await.expect("producer");
    assert!(
        produced.seqs.len() > 20,
        "stream too short: {}",
        produced.seqs.len()
    );
    assert_stored_exactly_once(&f.pool, &produced, Duration::from_secs(90)).await;
    if let Ok(uplink) = Arc::try_unwrap(uplink) {
        uplink.shutdown().await;
    }
    kill_collector(collector).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_restarted_during_a_stream() {
    let mut f = Fixture::new().await;
    let collector = f.collector().await;
    let uplink = Arc::new(f.uplink(open_spool(&f.spool_path(), u64::MAX)));
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let producer = {
        let uplink = uplink.clone();
        tokio::spawn(async move {
            let mut produced = Produced::default();
            while !*stop_rx.borrow() {
                produced.publish(&uplink, 2).await;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                    _ = stop_rx.changed() => {}
                }
            }
            produced
        })
    };
    for round in 0..2 {
        let before = stored_samples(&f.pool).await;
        wait_until(
            &format!("progress before restart {round}"),
            Duration::from_secs(60),
            || {
                let pool = f.pool.clone();
                async move { stored_samples(&pool).await > before }
            },
        )
        .await;
        f.pg.restart().await.expect("restart PostgreSQL");
        f.pool = f.pg.pool().await.expect("pool after restart");
    }
    // Ingest resumes after the restarts.
    let before = stored_samples(&f.pool).await;
    wait_until("progress after restarts", Duration::from_secs(60), || {
        let pool = f.pool.clone();
        async move { stored_samples(&pool).await > before }
    })
    .await;
    stop_tx.send_replace(true);
    let produced = producer.await.expect("producer");
    assert_stored_exactly_once(&f.pool, &produced, Duration::from_secs(90)).await;
    eprintln!(
        "database writes retried across the restarts: {}",
        collector.collector().metrics().db_retries.get()
    );
    if let Ok(uplink) = Arc::try_unwrap(uplink) {
        uplink.shutdown().await;
    }
    kill_collector(collector).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_and_restarted_resends_its_spool() {
    let f = Fixture::new().await;
    let collector = f.collector().await;
    let mut produced = Produced::default();
    let uplink = f.uplink(open_spool(&f.spool_path(), u64::MAX));
    produced.publish(&uplink, 100).await;
    // Killed mid-stream: whatever was not acknowledged is only on disk now.
    let unacked_at_kill = uplink.spool().len();
    uplink.abort();
    let spool = open_spool(&f.spool_path(), u64::MAX);
    eprintln!(
        "unacknowledged at kill: {unacked_at_kill}, in the reopened spool: {}",
        spool.len()
    );
    assert!(spool.last_seq() >= 100, "seqs survived the restart");
    let uplink = f.uplink(spool);
    produced.publish(&uplink, 50).await;
    assert_eq!(
        *produced.seqs.keys().last().unwrap_or(&0),
        150,
        "numbering continued"
    );
    assert_stored_exactly_once(&f.pool, &produced, Duration::from_secs(60)).await;
    uplink.shutdown().await;
    kill_collector(collector).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_unreachable_past_the_grace_then_backlog_drained_and_host_lost_and_back() {
    let f = Fixture::new().await;
    let collector = f.collector().await;
    let mut produced = Produced::default();
    let uplink = f.uplink(open_spool(&f.spool_path(), u64::MAX));
    produced.publish(&uplink, 10).await;
    assert_stored_exactly_once(&f.pool, &produced, Duration::from_secs(60)).await;
    assert_eq!(host_state(&f.pool).await.as_deref(), Some("online"));

    // The link goes away (as a cut network would look to the collector): heartbeats stop.
    uplink.abort();
    let cut = Instant::now();
    let grace = Duration::from_secs(1);
    wait_until("host marked lost", grace + Duration::from_secs(5), || {
        let pool = f.pool.clone();
        async move { host_state(&pool).await.as_deref() == Some("lost") }
    })
    .await;
    let detected = cut.elapsed();
    eprintln!("lost-host detection after {detected:?} (grace {grace:?})");
    assert_eq!(host_events(&f.pool, "host_lost").await, 1);

    // Meanwhile the agent keeps spooling; stay cut off well past the grace.
    let spool = open_spool(&f.spool_path(), u64::MAX);
    for k in 0..40u64 {
        let kk = produced.next;
        produced.next += 1;
        let ids: Vec<u32> = (0..SERIES_PER_BATCH)
            .map(|g| {
                spool
                    .series_id("gpu_utilization_ratio", &[("gpu".into(), g.to_string())])
                    .expect("series")
            })
            .collect();
        let (base, series, events) = Produced::batch(kk, &ids);
        let b = spool
            .append(base, series, events)
            .expect("append while cut off");
        produced.record(kk, b.seq);
        if k % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(host_state(&f.pool).await.as_deref(), Some("lost"));

    // Reconnected: backlog drained, host back.
    let uplink = f.uplink(spool);
    produced.publish(&uplink, 5).await;
    assert_stored_exactly_once(&f.pool, &produced, Duration::from_secs(60)).await;
    wait_until("host back", Duration::from_secs(10), || {
        let pool = f.pool.clone();
        async move { host_state(&pool).await.as_deref() == Some("online") }
    })
    .await;
    assert_eq!(host_events(&f.pool, "host_back").await, 1);
    uplink.shutdown().await;
    kill_collector(collector).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_over_budget_reports_the_exact_lost_range() {
    let f = Fixture::new().await;
    // While the collector is not there, a budget that holds all 60 batches' events but
    // only about a third of their samples.
    let one = {
        let dir = tempfile::tempdir().expect("probe dir");
        let probe = Spool::open(dir.path().join("probe.redb"), u64::MAX).expect("probe spool");
        let (base, series, events) = Produced::batch(0, &[1, 2]);
        probe.append(base, series, events).expect("probe append");
        probe.bytes()
    };
    let spool = open_spool(&f.spool_path(), one * 50);
    let uplink = f.uplink(spool.clone());
    let mut produced = Produced::default();
    produced.publish(&uplink, 60).await;
    let dropped = spool.dropped_samples_total();
    assert!(dropped > 0, "the budget was exceeded");
    assert_eq!(spool.dropped_events_total(), 0, "samples go first");
    let collector = f.collector().await;

    // Every event arrives; the samples of exactly the reported range are missing.
    let gaps: Vec<(u64, u64, u64)> = {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let rows: Vec<(serde_json::Value,)> = sqlx::query_as(
                "SELECT payload FROM events WHERE host_id = $1 AND kind = 'spool_gap'",
            )
            .bind(HOST)
            .fetch_all(&f.pool)
            .await
            .expect("gap events");
            let stored_events = stored(&f.pool).await.events.len();
            if !rows.is_empty() && stored_events >= produced.events.len() {
                break rows
                    .into_iter()
                    .map(|(p,)| {
                        let g = &p["SpoolGap"];
                        (
                            g["first_seq"].as_u64().expect("first_seq"),
                            g["last_seq"].as_u64().expect("last_seq"),
                            g["samples_lost"].as_u64().expect("samples_lost"),
                        )
                    })
                    .collect();
            }
            assert!(
                Instant::now() < deadline,
                "gap event not stored in time: {} gap rows, {stored_events} of {} events, link {:?}, spool {} batches",
                rows.len(),
                produced.events.len(),
                uplink.status(),
                spool.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let lost: std::collections::BTreeSet<u64> = gaps.iter().flat_map(|(a, b, _)| *a..=*b).collect();
    let per_batch = u64::from(SERIES_PER_BATCH * POINTS_PER_SERIES);
    assert_eq!(gaps.iter().map(|g| g.2).sum::<u64>(), dropped);
    assert_eq!(lost.len() as u64 * per_batch, dropped, "ranges {gaps:?}");
    assert_eq!(lost.iter().next(), Some(&1), "oldest first");
    // What should be stored: everything but the samples of the lost seqs.
    let mut expected = produced.clone();
    let lost_values: std::collections::BTreeSet<u64> = lost
        .iter()
        .filter_map(|seq| produced.seqs.get(seq))
        .copied()
        .collect();
    expected
        .samples
        .retain(|(_, _, _, v)| !lost_values.contains(&((*v as u64) / 100)));
    assert_stored_exactly_once(&f.pool, &expected, Duration::from_secs(60)).await;
    uplink.shutdown().await;
    kill_collector(collector).await;
}

/// A raw agent connection speaking frames directly, to replay what a real agent would
/// do after losing acks.
struct RawAgent {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: CollectorFrameDecoder,
    pending: Vec<u8>,
    _endpoint: quinn::Endpoint,
}

impl RawAgent {
    async fn connect(f: &Fixture) -> RawAgent {
        let tls = f.ca.client_config(&f.agent).expect("client TLS");
        let quic =
            quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls)).expect("quic tls");
        let mut endpoint =
            quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
        let conn = endpoint
            .connect(([127, 0, 0, 1], f.port).into(), "localhost")
            .expect("connect")
            .await
            .expect("handshake");
        let (send, recv) = conn.open_bi().await.expect("stream");
        RawAgent {
            conn,
            send,
            recv,
            decoder: CollectorFrameDecoder::new(),
            pending: Vec::new(),
            _endpoint: endpoint,
        }
    }

    async fn send(&mut self, msg: AgentMessage) {
        let frame = encode_agent(&msg).expect("encode");
        self.send.write_all(&frame).await.expect("write");
    }

    async fn next(&mut self) -> CollectorMessage {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let mut input = &self.pending[..];
            let decoded = self.decoder.feed(&mut input).expect("decode");
            let consumed = self.pending.len() - input.len();
            self.pending.drain(..consumed);
            if let Some(msg) = decoded {
                return msg;
            }
            let n = tokio::time::timeout(Duration::from_secs(30), self.recv.read(&mut buf))
                .await
                .expect("a message in time")
                .expect("read")
                .expect("stream open");
            self.pending.extend_from_slice(&buf[..n]);
        }
    }

    /// Reads until an `Ack` covering `upto` arrives.
    async fn wait_ack(&mut self, upto: u64) {
        loop {
            if let CollectorMessage::Ack { upto: got } = self.next().await {
                if got >= upto {
                    return;
                }
            }
        }
    }
}

fn raw_hello() -> Hello {
    Hello {
        protocol_min: PROTOCOL_MIN,
        protocol_max: PROTOCOL_MAX,
        host_id: HOST.into(),
        agent_version: "test".into(),
        profile: String::new(),
        components: Vec::new(),
        gpus: Vec::new(),
        last_acked_seq: 0,
        agent_time_ms: base_ms(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_resent_after_a_lost_ack_is_stored_once() {
    let f = Fixture::new().await;
    let collector = f.collector().await;
    let defs: Vec<SeriesDef> = (0..SERIES_PER_BATCH)
        .map(|g| SeriesDef {
            id: g + 1,
            metric: "gpu_utilization_ratio".into(),
            labels: vec![("gpu".into(), g.to_string())],
        })
        .collect();
    let mut produced = Produced::default();
    let batches: Vec<Batch> = (0..3u64)
        .map(|k| {
            let (base, series, events) = Produced::batch(k, &[1, 2]);
            produced.record(k, k + 1);
            Batch {
                seq: k + 1,
                base_ts_ms: base,
                series,
                events,
            }
        })
        .collect();

    // First connection: stored and acknowledged, but the agent never sees the acks.
    let mut first = RawAgent::connect(&f).await;
    first.send(AgentMessage::Hello(raw_hello())).await;
    assert!(matches!(first.next().await, CollectorMessage::Welcome(_)));
    first.send(AgentMessage::DefineSeries(defs.clone())).await;
    for b in &batches {
        first.send(AgentMessage::Batch(b.clone())).await;
    }
    first.wait_ack(3).await;
    first.conn.close(0u32.into(), b"ack lost");

    // Second connection: the agent resends everything it did not see acknowledged.
    let mut second = RawAgent::connect(&f).await;
    second.send(AgentMessage::Hello(raw_hello())).await;
    match second.next().await {
        CollectorMessage::Welcome(w) => assert_eq!(w.acked_seq, 3, "cursor survives"),
        other => panic!("expected Welcome, got {other:?}"),
    }
    second.send(AgentMessage::DefineSeries(defs)).await;
    for b in &batches {
        second.send(AgentMessage::Batch(b.clone())).await;
    }
    second.wait_ack(3).await;
    assert_eq!(collector.collector().metrics().batches_duplicate.get(), 3);
    assert_stored_exactly_once(&f.pool, &produced, Duration::from_secs(30)).await;
    second.conn.close(0u32.into(), b"done");
    kill_collector(collector).await;
}

/// The encoded size of one produced batch (two series of five points, one event) and
/// of the same batch without its samples.
fn batch_bytes() -> (u64, u64) {
    let dir = tempfile::tempdir().expect("probe dir");
    let probe = Spool::open(dir.path().join("probe.redb"), u64::MAX).expect("probe spool");
    let (base, series, events) = Produced::batch(100, &[1, 2]);
    probe
        .append(base, series, events.clone())
        .expect("probe append");
    let whole = probe.bytes();
    probe
        .append(base, Vec::new(), events)
        .expect("probe append");
    (whole, probe.bytes() - whole)
}

/// The loss reports stored for the host: (first seq, last seq, count), for samples and
/// for events.
async fn stored_loss_reports(pool: &PgPool) -> (Vec<(u64, u64, u64)>, Vec<(u64, u64, u64)>) {
    let rows: Vec<(String, serde_json::Value, String)> = sqlx::query_as(
        "SELECT kind, payload, message FROM events WHERE host_id = $1
           AND (kind = 'spool_gap' OR payload::text LIKE '%spool_events_dropped%')",
    )
    .bind(HOST)
    .fetch_all(pool)
    .await
    .expect("loss reports");
    let mut samples = Vec::new();
    let mut events = Vec::new();
    for (kind, payload, message) in rows {
        if kind == "spool_gap" {
            let g = &payload["SpoolGap"];
            samples.push((
                g["first_seq"].as_u64().expect("first_seq"),
                g["last_seq"].as_u64().expect("last_seq"),
                g["samples_lost"].as_u64().expect("samples_lost"),
            ));
        } else {
            // "spool over budget: dropped N events of batches A..=B"
            let count = message
                .split("dropped ")
                .nth(1)
                .and_then(|r| r.split(' ').next())
                .and_then(|c| c.parse().ok())
                .expect("event count in the report");
            let range = message.rsplit(' ').next().expect("range");
            let (a, b) = range.split_once("..=").expect("a..=b");
            events.push((
                a.parse().expect("first seq"),
                b.parse().expect("last seq"),
                count,
            ));
        }
    }
    samples.sort_unstable();
    events.sort_unstable();
    (samples, events)
}

/// Every seq named by `reports`, checking that none is named twice.
fn reported_seqs(reports: &[(u64, u64, u64)]) -> std::collections::BTreeSet<u64> {
    let mut seqs = std::collections::BTreeSet::new();
    for (first, last, _) in reports {
        for seq in *first..=*last {
            assert!(seqs.insert(seq), "seq {seq} reported twice: {reports:?}");
        }
    }
    seqs
}

/// A network cut (the collector gone without a goodbye) while the link holds batches
/// in memory, long enough for the spool's budget to strip (and with `events_too`, empty)
/// the oldest of them; then the collector is back. The stored loss reports must name
/// exactly what the database lacks, sample for sample and event for event, one report
/// per contiguous range.
///
/// Before the fix, batches held whole in the link's memory were stripped in the spool,
/// reported lost, and then resent whole (reported lost but stored); and reports that
/// rode in batches whose events were dropped later never arrived.
async fn cut_under_budget_reports_exactly_what_is_missing(events_too: bool) {
    let f = Fixture::new().await;
    let collector = f.collector().await;
    let (whole, events_only) = batch_bytes();
    let budget = if events_too {
        // Room for a few batches: samples go, then the oldest events.
        3 * whole
    } else {
        // Room for the events of every batch and the samples of about 25.
        160 * events_only + 25 * whole
    };
    let spool = open_spool(&f.spool_path(), budget);
    let uplink = f.uplink(spool.clone());
    let mut produced = Produced::default();
    produced.publish(&uplink, 20).await;
    // (Under the tight budget even these may lose some: the final check covers all.)
    wait_until(
        "the first batches acknowledged",
        Duration::from_secs(60),
        || {
            let spool = spool.clone();
            async move { spool.is_empty() }
        },
    )
    .await;

    kill_collector(collector).await;
    produced.publish(&uplink, 150).await;
    let dropped_samples = spool.dropped_samples_total();
    let dropped_events = spool.dropped_events_total();
    assert!(dropped_samples > 0, "the budget was exceeded");
    assert_eq!(
        dropped_events > 0,
        events_too,
        "events dropped: {dropped_events}"
    );
    let collector = f.collector().await;
    produced.publish(&uplink, 5).await;
    wait_until("every batch acknowledged", Duration::from_secs(60), || {
        let spool = spool.clone();
        async move { spool.is_empty() }
    })
    .await;

    // What the database lacks, per produced batch (k = value / 100).
    let per_batch = u64::from(SERIES_PER_BATCH * POINTS_PER_SERIES);
    let got = stored(&f.pool).await;
    let mut samples_of: BTreeMap<u64, u64> = BTreeMap::new();
    for (_, _, _, v) in &got.samples {
        *samples_of.entry((*v as u64) / 100).or_default() += 1;
    }
    let events_of: std::collections::BTreeSet<String> = got.events.iter().cloned().collect();
    assert_eq!(events_of.len(), got.events.len(), "an event stored twice");
    let mut missing_samples = std::collections::BTreeSet::new();
    let mut missing_events = std::collections::BTreeSet::new();
    for (seq, k) in &produced.seqs {
        match samples_of.get(k).copied().unwrap_or(0) {
            0 => {
                missing_samples.insert(*seq);
            }
            n => assert_eq!(n, per_batch, "batch {seq} stored partly or twice"),
        }
        if !events_of.contains(&format!("ev-{k}")) {
            missing_events.insert(*seq);
        }
    }
    let (sample_reports, event_reports) = stored_loss_reports(&f.pool).await;
    eprintln!(
        "dropped {dropped_samples} samples, {dropped_events} events; reports: samples {sample_reports:?}, events {event_reports:?}"
    );
    assert!(!missing_samples.is_empty(), "the cut lost samples");
    assert_eq!(
        reported_seqs(&sample_reports),
        missing_samples,
        "sample reports {sample_reports:?}"
    );
    assert_eq!(
        sample_reports.iter().map(|r| r.2).sum::<u64>(),
        missing_samples.len() as u64 * per_batch,
        "samples counted in the reports"
    );
    // The cut's losses are one contiguous range: one report (before the cut, under the
    // tight budget, acks and sends break the losses into several ranges).
    assert_eq!(
        sample_reports.iter().filter(|r| r.0 > 20).count(),
        1,
        "one report for the cut's contiguous range"
    );
    assert_eq!(
        reported_seqs(&event_reports),
        missing_events,
        "event reports {event_reports:?}"
    );
    assert_eq!(
        event_reports.iter().map(|r| r.2).sum::<u64>(),
        missing_events.len() as u64,
        "events counted in the reports"
    );
    uplink.shutdown().await;
    kill_collector(collector).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_under_a_small_budget_reports_exactly_the_missing_samples() {
    cut_under_budget_reports_exactly_what_is_missing(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_under_a_tight_budget_reports_exactly_the_missing_samples_and_events() {
    cut_under_budget_reports_exactly_what_is_missing(true).await;
}
