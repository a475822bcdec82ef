//! The store boundary against a real private PostgreSQL: no batch can stall a host.
//! Agent values are made storable (text cleaned and capped) or refused by rule
//! (samples outside `[now - retention, now + max_clock_skew]`, series past the host's
//! cap or too large), counted and recorded as events while the rest is stored; a batch
//! the database still refuses for its data is set aside in `rejected_batches`,
//! acknowledged and counted; and end to end, a component whose health endpoint answers
//! a NUL status line does not stop its host's samples.

use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use razar_agent::config::ProbeCheck;
use razar_agent::probe::{run_probe, ProbeOutcome};
use razar_agent::spool::Spool;
use razar_agent::uplink::{Backoff, Uplink, UplinkConfig};
use razar_collector::group::{GroupConfig, GroupError, GroupMetrics, GroupWriter};
use razar_collector::server::prometheus::Registry;
use razar_collector::server::{Collector, IngestConfig};
use razar_collector::store::{IngestRules, Reason, SeriesMap, Store, REFUSED_SERIES};
use razar_shared::domain::{ComponentState, Severity};
use razar_shared::protocol::codec::{decode_payload, HEADER_LEN};
use razar_shared::protocol::{
    Batch, ComponentInfo, Event, EventKind, GpuInfo, Hello, SeriesDef, SeriesPoints, SessionConfig,
    Subject,
};
use razar_tests::ca::TestCa;
use razar_tests::fixtures::now_ms;
use razar_tests::pg::TestPg;
use sqlx::types::chrono::Utc;

const HOST: &str = "gpu-host-1";
const DAY_MS: i64 = 86_400_000;

fn hello(host: &str) -> Hello {
    razar_tests::fixtures::hello(host, Vec::new())
}

fn defs(n: u32) -> Vec<SeriesDef> {
    (0..n)
        .map(|i| SeriesDef {
            id: 100 + i,
            metric: "gpu_utilization_ratio".to_owned(),
            labels: vec![("gpu".to_owned(), i.to_string())],
        })
        .collect()
}

fn points(series: u32, offsets: &[u32]) -> SeriesPoints {
    SeriesPoints {
        series,
        points: offsets.iter().map(|&o| (o, f64::from(o))).collect(),
    }
}

fn event(ts_ms: i64, message: &str) -> Event {
    Event {
        ts_ms,
        severity: Severity::Warning,
        subject: Subject::Component("model-server".to_owned()),
        kind: EventKind::Other {
            code: "test".to_owned(),
        },
        message: message.to_owned(),
    }
}

async fn scalar(store: &Store, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(store.pool())
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// The `values_refused` events of `host`, as (payload, message).
async fn refusal_events(store: &Store, host: &str) -> Vec<(serde_json::Value, String)> {
    sqlx::query_as(
        "SELECT payload, message FROM events WHERE host_id = $1 AND kind = 'values_refused'
         ORDER BY event_id",
    )
    .bind(host)
    .fetch_all(store.pool())
    .await
    .expect("refusal events")
}

async fn registered(store: &Store, host: &str, n: u32) -> SeriesMap {
    store
        .record_hello(&hello(host), Utc::now())
        .await
        .expect("hello");
    store.register_series(host, &defs(n)).await.expect("series")
}

#[tokio::test]
async fn samples_outside_the_window_are_refused_counted_recorded_and_the_rest_stored() {
    let pg = TestPg::start().await.expect("postgres");
    let store = pg.store().await.expect("store");
    let map = registered(&store, HOST, 2).await;
    let now = now_ms();
    let partitions =
        "SELECT count(*) FROM pg_class WHERE relname LIKE 'samples\\_p%' AND relkind = 'r'";
    // 45 days back: one point too old, three inside (a day ago, an hour ago, now).
    let old_base = now - 45 * DAY_MS;
    let inside = |ago: i64| u32::try_from(now - ago - old_base).expect("offset fits");
    let first = Batch {
        seq: 1,
        base_ts_ms: old_base,
        series: vec![
            points(100, &[0, inside(DAY_MS), inside(3_600_000)]),
            points(101, &[inside(0)]),
        ],
        events: vec![event(now, "fine")],
    };
    // A clock running a year ahead, then a clock in 1990: every point refused, and the
    // event kept at the collector's time.
    let future = Batch {
        seq: 2,
        base_ts_ms: now + 365 * DAY_MS,
        series: vec![points(100, &[0, 1_000]), points(101, &[0])],
        events: vec![event(now + 365 * DAY_MS, "from the future")],
    };
    let ancient = Batch {
        seq: 3,
        base_ts_ms: 631_152_000_000,
        series: vec![points(100, &[0, 40 * 86_400_000])],
        events: Vec::new(),
    };
    let outcome = store
        .ingest(HOST, &[first, future, ancient], &map)
        .await
        .expect("ingest stores the rest");
    assert_eq!((outcome.cursor, outcome.batches_stored), (3, 3));
    assert_eq!(outcome.samples, 3);
    let refused = outcome.refusals;
    assert_eq!(
        (
            refused.get(Reason::SampleTooOld),
            refused.get(Reason::SampleInFuture),
            refused.get(Reason::EventTime)
        ),
        (3, 3, 1)
    );
    assert_eq!(scalar(&store, "SELECT count(*) FROM samples").await, 3);
    // Only the days of stored samples got partitions: at most yesterday and today.
    assert!(scalar(&store, partitions).await <= 2);
    for day in [old_base, now + 365 * DAY_MS, 631_152_000_000] {
        let name = format!(
            "samples_p{}",
            sqlx::types::chrono::DateTime::from_timestamp_millis(day)
                .expect("day")
                .format("%Y%m%d")
        );
        let exists = scalar(
            &store,
            &format!("SELECT count(*) FROM pg_class WHERE relname = '{name}'"),
        )
        .await;
        assert_eq!(exists, 0, "{name} created for refused samples");
    }
    // Counted, and recorded on the host.
    let metrics = store.metrics();
    assert_eq!(metrics.refused(Reason::SampleTooOld), 3);
    assert_eq!(metrics.refused(Reason::SampleInFuture), 3);
    let events = refusal_events(&store, HOST).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].0["sample_too_old"], 3);
    assert_eq!(events[0].0["sample_in_future"], 3);
    // The future event is stored at the collector's time, its own in the message.
    let (ts_ms, message): (i64, String) = sqlx::query_as(
        "SELECT (extract(epoch FROM ts) * 1000)::int8, message FROM events
         WHERE message LIKE 'from the future%'",
    )
    .fetch_one(store.pool())
    .await
    .expect("future event");
    assert!((ts_ms - now).abs() < 600_000, "{ts_ms} vs {now}");
    assert!(message.contains("agent clock"), "{message}");
    // The host goes on: its cursor moved past every batch.
    assert_eq!(store.cursor(HOST).await.expect("cursor"), 3);
}

#[tokio::test]
async fn series_past_the_host_cap_or_too_large_are_refused_and_their_samples_counted() {
    let pg = TestPg::start().await.expect("postgres");
    let store = pg.store().await.expect("store").with_rules(IngestRules {
        max_series_per_host: 3,
        ..IngestRules::default()
    });
    store
        .record_hello(&hello(HOST), Utc::now())
        .await
        .expect("hello");
    let mut five = defs(5);
    // Too large for the unique index (about 4 KB of labels) whatever the cap.
    five.push(SeriesDef {
        id: 200,
        metric: "wide".to_owned(),
        labels: (0..20)
            .map(|i| (format!("label{i:02}"), "v".repeat(200)))
            .collect(),
    });
    let map = store.register_series(HOST, &five).await.expect("series");
    let refused: Vec<u32> = {
        let mut ids: Vec<u32> = map
            .iter()
            .filter(|(_, &id)| id == REFUSED_SERIES)
            .map(|(&agent, _)| agent)
            .collect();
        ids.sort_unstable();
        ids
    };
    assert_eq!(refused, vec![103, 104, 200]);
    // Registering again (a reconnect) keeps the ids of the known ones.
    let again = store.register_series(HOST, &five).await.expect("again");
    assert_eq!(again, map);
    // Another host has its own cap.
    let other = registered(&store, "gpu-host-2", 3).await;
    assert!(other.values().all(|&id| id != REFUSED_SERIES));

    let batch = Batch {
        seq: 1,
        base_ts_ms: now_ms() - 60_000,
        series: five.iter().map(|d| points(d.id, &[0, 1_000])).collect(),
        events: Vec::new(),
    };
    let outcome = store.ingest(HOST, &[batch], &map).await.expect("ingest");
    assert_eq!(outcome.samples, 6);
    assert_eq!(outcome.refusals.get(Reason::SampleOfRefusedSeries), 6);
    assert_eq!(
        scalar(
            &store,
            "SELECT count(*) FROM series WHERE host_id = 'gpu-host-1'"
        )
        .await,
        3
    );
    let metrics = store.metrics();
    assert_eq!(metrics.refused(Reason::SeriesOverCap), 4); // twice 2
    assert_eq!(metrics.refused(Reason::SeriesTooLarge), 2);
    assert_eq!(metrics.refused(Reason::SampleOfRefusedSeries), 6);
    let events = refusal_events(&store, HOST).await;
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(events[0].0["series_over_cap"], 2);
    assert_eq!(events[0].0["series_too_large"], 1);
    assert_eq!(events[2].0["sample_of_refused_series"], 6);
}

// A current-thread runtime: the requests of one `join!` are queued before the writer
// runs, so they form one group.
#[tokio::test]
async fn a_batch_the_database_refuses_is_set_aside_acknowledged_counted_and_later_ones_stored() {
    let pg = TestPg::start().await.expect("postgres");
    let store = pg.store().await.expect("store");
    // A data error the boundary cannot know about: a constraint of this database
    // (named so that its own error message passes it).
    sqlx::query(
        "ALTER TABLE events ADD CONSTRAINT test_refuses_marked CHECK (message NOT LIKE '%b-o-o-m%')",
    )
    .execute(store.pool())
    .await
    .expect("constraint");
    let metrics = GroupMetrics::new(&Registry::new()).expect("metrics");
    let (writer, _tasks) = GroupWriter::start(
        store.clone(),
        GroupConfig {
            writers: 1,
            ..GroupConfig::default()
        },
        metrics,
    );
    let map = Arc::new(registered(&store, HOST, 2).await);
    let other = Arc::new(registered(&store, "gpu-host-2", 2).await);
    let start = now_ms() - 600_000;
    let batch = |seq: u64, message: &str| Batch {
        seq,
        base_ts_ms: start + i64::try_from(seq).expect("seq") * 10_000,
        series: vec![points(100, &[0, 1_000]), points(101, &[0])],
        events: vec![event(start, message)],
    };
    let (bad, good) = tokio::join!(
        writer.ingest(
            HOST.to_owned(),
            Arc::new(vec![batch(1, "ok"), batch(2, "b-o-o-m"), batch(3, "ok")]),
            map.clone()
        ),
        writer.ingest(
            "gpu-host-2".to_owned(),
            Arc::new(vec![batch(1, "ok")]),
            other.clone()
        ),
    );
    let bad = bad.expect("the refused batch is set aside, not an error");
    assert_eq!(
        (bad.cursor, bad.batches_stored, bad.batches_rejected),
        (3, 2, 1)
    );
    assert_eq!(good.expect("the other host is stored").cursor, 1);
    let (seq, sqlstate, payload): (i64, Option<String>, Vec<u8>) =
        sqlx::query_as("SELECT seq, sqlstate, payload FROM rejected_batches WHERE host_id = $1")
            .bind(HOST)
            .fetch_one(store.pool())
            .await
            .expect("rejected batch");
    assert_eq!((seq, sqlstate.as_deref()), (2, Some("23514")));
    let kept: Batch = decode_payload(&payload[HEADER_LEN..]).expect("raw batch decodes");
    assert_eq!(kept, batch(2, "b-o-o-m"));
    assert_eq!(store.metrics().batches_rejected.get(), 1);
    assert_eq!(
        scalar(
            &store,
            "SELECT count(*) FROM events WHERE host_id = 'gpu-host-1' AND kind = 'batch_rejected'"
        )
        .await,
        1
    );
    assert_eq!(store.cursor(HOST).await.expect("cursor"), 3);
    // Later batches are stored as usual.
    let later = writer
        .ingest(
            HOST.to_owned(),
            Arc::new(vec![batch(4, "ok"), batch(5, "ok")]),
            map.clone(),
        )
        .await
        .expect("later batches");
    assert_eq!((later.cursor, later.batches_stored), (5, 2));
    let host_samples = "SELECT count(*) FROM samples x JOIN series s USING (series_id)
                        WHERE s.host_id = 'gpu-host-1'";
    assert_eq!(scalar(&store, host_samples).await, 4 * 3);
}

#[tokio::test]
async fn a_transient_error_is_not_set_aside_and_the_retry_stores_the_batch() {
    let pg = TestPg::start().await.expect("postgres");
    // Every new connection waits at most 200 ms for a lock (55P03 past it).
    let admin = pg.pool().await.expect("admin pool");
    sqlx::query("ALTER DATABASE razar SET lock_timeout = '200ms'")
        .execute(&admin)
        .await
        .expect("lock_timeout");
    let store = pg.store().await.expect("store");
    let metrics = GroupMetrics::new(&Registry::new()).expect("metrics");
    let (writer, _tasks) = GroupWriter::start(store.clone(), GroupConfig::default(), metrics);
    let map = Arc::new(registered(&store, HOST, 1).await);
    let batch = Batch {
        seq: 1,
        base_ts_ms: now_ms() - 1_000,
        series: vec![points(100, &[0])],
        events: Vec::new(),
    };
    // Another session holds the host's cursor: the write fails on the lock.
    let mut holder = admin.begin().await.expect("holder");
    sqlx::query("SELECT 1 FROM agent_cursors WHERE host_id = $1 FOR UPDATE")
        .bind(HOST)
        .execute(&mut *holder)
        .await
        .expect("lock the cursor");
    let failed = writer
        .ingest(HOST.to_owned(), Arc::new(vec![batch.clone()]), map.clone())
        .await;
    match failed {
        Err(GroupError::Failed(e)) => assert!(!e.is_data_error(), "{e}"),
        other => panic!("a lock timeout must fail the request for a retry: {other:?}"),
    }
    assert_eq!(
        scalar(&store, "SELECT count(*) FROM rejected_batches").await,
        0
    );
    assert_eq!(store.cursor(HOST).await.expect("cursor"), 0);
    holder.rollback().await.expect("release");
    let retried = writer
        .ingest(HOST.to_owned(), Arc::new(vec![batch]), map)
        .await
        .expect("the retry stores it");
    assert_eq!((retried.cursor, retried.batches_stored), (1, 1));
    assert_eq!(store.metrics().batches_rejected.get(), 0);
}

/// Text from raw bytes as an agent makes it (lossy UTF-8 keeps NUL), biased towards
/// NUL and long strings.
fn agent_text() -> impl Strategy<Value = String> {
    let byte = prop_oneof![Just(0u8), Just(b'a'), any::<u8>()];
    prop_oneof![
        proptest::collection::vec(byte.clone(), 0..16),
        proptest::collection::vec(byte, 0..6_000),
    ]
    .prop_map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
}

#[derive(Debug, Clone)]
struct Texts {
    version: String,
    component: String,
    revision: String,
    gpu: String,
    metric: String,
    label: (String, String),
    message: String,
    code: String,
    note: String,
    changed: String,
}

fn texts() -> impl Strategy<Value = Texts> {
    (
        (agent_text(), agent_text(), agent_text(), agent_text()),
        (agent_text(), agent_text(), agent_text()),
        (agent_text(), agent_text(), agent_text(), agent_text()),
    )
        .prop_map(
            |(
                (version, component, revision, gpu),
                (metric, k, v),
                (message, code, note, changed),
            )| {
                Texts {
                    version,
                    component,
                    revision,
                    gpu,
                    metric,
                    label: (k, v),
                    message,
                    code,
                    note,
                    changed,
                }
            },
        )
}

/// One agent's session of messages carrying `t` in every text field; every store call
/// must succeed (what it does not keep is refused by rule, never by the database).
async fn store_everything(store: &Store, seq: u64, t: &Texts) -> Result<(), String> {
    let hello = Hello {
        agent_version: t.version.clone(),
        profile: t.note.clone(),
        components: vec![
            ComponentInfo {
                name: t.component.clone(),
                revision: t.revision.clone(),
                state: ComponentState::Starting,
                critical: false,
            },
            // The same name twice: one row.
            ComponentInfo {
                name: t.component.clone(),
                revision: t.version.clone(),
                state: ComponentState::Ready,
                critical: true,
            },
        ],
        gpus: vec![
            GpuInfo {
                index: 0,
                uuid: t.gpu.clone(),
                name: t.message.clone(),
                pci_bus_id: t.code.clone(),
                memory_total_bytes: u64::MAX,
            },
            GpuInfo {
                index: u32::MAX,
                uuid: t.gpu.clone(),
                name: String::new(),
                pci_bus_id: String::new(),
                memory_total_bytes: 0,
            },
        ],
        ..hello(HOST)
    };
    store
        .record_hello(&hello, Utc::now())
        .await
        .map_err(|e| format!("hello: {e}"))?;
    // The same texts in an inventory update on an open connection (protocol 2).
    let inventory = razar_shared::protocol::Inventory {
        components: hello.components.clone(),
        gpus: hello.gpus.clone(),
    };
    store
        .record_inventory(HOST, &inventory, Utc::now())
        .await
        .map_err(|e| format!("inventory: {e}"))?;
    let defs = vec![
        SeriesDef {
            id: 1,
            metric: t.metric.clone(),
            labels: vec![t.label.clone()],
        },
        SeriesDef {
            id: 2,
            metric: "m".to_owned(),
            labels: vec![(t.label.0.clone(), t.message.clone()), t.label.clone()],
        },
    ];
    let map = store
        .register_series(HOST, &defs)
        .await
        .map_err(|e| format!("series: {e}"))?;
    let now = now_ms();
    let subject = Subject::Component(t.component.clone());
    let kinds = [
        EventKind::Other {
            code: t.code.clone(),
        },
        EventKind::QuarantineResolved {
            note: t.note.clone(),
        },
        EventKind::ConfigReloaded {
            changed: vec![t.changed.clone(), t.metric.clone()],
        },
        EventKind::StateChanged {
            from: ComponentState::Starting,
            to: ComponentState::Ready,
        },
    ];
    let batch = Batch {
        seq,
        base_ts_ms: now,
        series: vec![points(1, &[0]), points(2, &[0])],
        events: kinds
            .into_iter()
            .map(|kind| Event {
                ts_ms: now,
                severity: Severity::Critical,
                subject: subject.clone(),
                kind,
                message: t.message.clone(),
            })
            .collect(),
    };
    let outcome = store
        .ingest(HOST, &[batch], &map)
        .await
        .map_err(|e| format!("ingest: {e}"))?;
    if outcome.cursor != seq {
        return Err(format!("cursor {} after batch {seq}", outcome.cursor));
    }
    Ok(())
}

#[test]
fn any_text_in_any_agent_field_is_stored_or_refused_by_rule_never_by_the_database() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let pg = runtime.block_on(TestPg::start()).expect("postgres");
    let store = runtime.block_on(pg.store()).expect("store");
    let seq = std::sync::atomic::AtomicU64::new(0);
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let result = runner.run(&texts(), |t| {
        let seq = seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        runtime
            .block_on(store_everything(&store, seq, &t))
            .map_err(TestCaseError::fail)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // The NUL-biased strategy did exercise the cleaning.
    assert!(store.metrics().texts_cleaned.get() > 0);
}

/// Answers every connection with a status line holding a NUL byte.
async fn nul_health_endpoint() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request).await;
            let _ = stream.write_all(b"HTTP/1.1 2\x000 OK\r\n\r\n").await;
        }
    });
    format!("http://{address}/health")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_endpoint_answering_a_nul_status_line_does_not_stall_its_host() {
    // The component's health probe, as the agent runs it.
    let url = nul_health_endpoint().await;
    let reason = match run_probe(&ProbeCheck::Http { url }, Duration::from_secs(10)).await {
        ProbeOutcome::Failure(reason) => reason,
        ProbeOutcome::Success => panic!("a NUL status line passed the probe"),
    };
    assert!(reason.contains('\0'), "{reason:?}");

    let mut ca = TestCa::new().expect("test CA");
    let agent = ca.agent(HOST).expect("agent certificate");
    let pg = TestPg::start().await.expect("postgres");
    let store = pg.store().await.expect("store");
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("free port")
        .port();
    let mut config = IngestConfig::new(
        ([127, 0, 0, 1], port).into(),
        Arc::new(ca.server_config().expect("server TLS")),
        ca.crls().expect("CRLs"),
    );
    config.session = SessionConfig {
        heartbeat_interval_ms: 250,
        lost_after_missed: 8,
        max_unacked_batches: 64,
    };
    let collector = Collector::start(config, store.clone(), &Registry::new())
        .await
        .expect("collector");

    let dir = tempfile::tempdir().expect("spool dir");
    let spool = Arc::new(Spool::open(dir.path().join("spool.redb"), 64 << 20).expect("spool"));
    let mut uplink_config = UplinkConfig::new(
        format!("127.0.0.1:{port}"),
        "localhost",
        Arc::new(ca.client_config(&agent).expect("client TLS")),
        HOST,
    );
    uplink_config.backoff =
        Backoff::try_new(Duration::from_millis(50), Duration::from_millis(400), 0.5)
            .expect("backoff");
    let (uplink, _commands) = Uplink::spawn(uplink_config, spool.clone()).expect("uplink");
    let ids: Vec<u32> = (0..2)
        .map(|g| {
            spool
                .series_id("gpu_utilization_ratio", &[("gpu".into(), g.to_string())])
                .expect("series id")
        })
        .collect();

    // The host streams; in the middle, the component's probe failure with the NUL.
    let start = now_ms() - 60_000;
    let mut last = 0;
    for k in 0..10i64 {
        let events = if k == 5 {
            vec![Event {
                ts_ms: start + k * 1_000,
                severity: Severity::Warning,
                subject: Subject::Component("model-server".to_owned()),
                kind: EventKind::Other {
                    code: "probe_failed".to_owned(),
                },
                message: format!("liveness probe failed: {reason}"),
            }]
        } else {
            Vec::new()
        };
        let series = ids.iter().map(|&id| points(id, &[0, 500])).collect();
        last = uplink
            .publish(start + k * 1_000, series, events)
            .await
            .expect("publish");
    }

    // Every batch is acknowledged and every sample stored.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let acked = store.cursor(HOST).await.expect("cursor");
        let samples = scalar(&store, "SELECT count(*) FROM samples").await;
        if acked >= last && samples >= 40 {
            assert_eq!((acked, samples), (last, 40));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the host stalled: acked {acked} of {last}, {samples} of 40 samples"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let message: String = sqlx::query_scalar(
        "SELECT message FROM events WHERE host_id = $1 AND payload::text LIKE '%probe_failed%'",
    )
    .bind(HOST)
    .fetch_one(store.pool())
    .await
    .expect("the probe's event is stored");
    assert!(
        message.starts_with("liveness probe failed: bad status code `2\u{FFFD}0`"),
        "{message:?}"
    );
    assert!(store.metrics().texts_cleaned.get() >= 1);
    assert_eq!(store.metrics().batches_rejected.get(), 0);
    drop(uplink);
    collector.shutdown(Duration::from_secs(2)).await;
}
