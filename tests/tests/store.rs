//! The collector's PostgreSQL store against a real private PostgreSQL per test:
//! migrations, exactly-once ingest, events, compaction (crash and concurrency included),
//! rollups, queries across raw and compacted samples, retention, and the embedded
//! cluster's lifecycle.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use razar_collector::embedded_pg::{EmbeddedPg, EmbeddedPgError, EmbeddedPgOptions};
use razar_collector::store::{SeriesId, SeriesMap, Store};
use razar_shared::domain::{ComponentState, Severity};
use razar_shared::protocol::{
    Batch, Event, EventKind, GpuInfo, Hello, SeriesDef, SeriesPoints, Subject,
};
use razar_tests::fixtures::now_ms;
use razar_tests::pg::TestPg;
use sqlx::types::chrono::{DateTime, Utc};

const HOST: &str = "gpu-host-1";

fn at(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).expect("timestamp in range")
}

fn hello(host: &str) -> Hello {
    razar_tests::fixtures::hello(
        host,
        vec![GpuInfo {
            index: 0,
            uuid: "GPU-0000".to_owned(),
            name: "Fake H100".to_owned(),
            pci_bus_id: "0000:01:00.0".to_owned(),
            memory_total_bytes: 80 * 1024 * 1024 * 1024,
        }],
    )
}

fn series_defs(n: u32) -> Vec<SeriesDef> {
    (0..n)
        .map(|i| SeriesDef {
            id: 100 + i,
            metric: "gpu_utilization_ratio".to_owned(),
            labels: vec![("gpu".to_owned(), i.to_string())],
        })
        .collect()
}

/// The value series `s` has at second `i`: quantised like real telemetry, with a
/// noisy float series among them.
fn value(s: u32, i: i64) -> f64 {
    match s % 3 {
        0 => ((i * 7 + i64::from(s)) % 101) as f64,
        1 => 250.0 + ((i * 13) % 17) as f64 * 0.125,
        _ => ((i as f64) * 0.37 + f64::from(s)).sin() * 1e3,
    }
}

/// Batches of `seconds_per_batch` seconds each, 1 sample/s per series, starting at `start_ms`.
fn batches(
    defs: &[SeriesDef],
    first_seq: u64,
    count: u64,
    start_ms: i64,
    seconds_per_batch: i64,
) -> Vec<Batch> {
    (0..count)
        .map(|b| {
            let base = start_ms + (b as i64) * seconds_per_batch * 1000;
            Batch {
                seq: first_seq + b,
                base_ts_ms: base,
                series: defs
                    .iter()
                    .map(|d| SeriesPoints {
                        series: d.id,
                        points: (0..seconds_per_batch)
                            .map(|k| {
                                let i = (base - start_ms) / 1000 + k;
                                ((k * 1000) as u32, value(d.id, i))
                            })
                            .collect(),
                    })
                    .collect(),
                events: Vec::new(),
            }
        })
        .collect()
}

/// Every point the batches carry, per database series id.
fn expected_points(batches: &[Batch], map: &SeriesMap) -> HashMap<SeriesId, Vec<(i64, u64)>> {
    let mut out: HashMap<SeriesId, Vec<(i64, u64)>> = HashMap::new();
    for b in batches {
        for s in &b.series {
            let id = map[&s.series];
            out.entry(id).or_default().extend(
                s.points
                    .iter()
                    .map(|&(o, v)| (b.base_ts_ms + i64::from(o), v.to_bits())),
            );
        }
    }
    for v in out.values_mut() {
        v.sort();
    }
    out
}

async fn stored_points(store: &Store, id: SeriesId, from: i64, to: i64) -> Vec<(i64, u64)> {
    let mut points: Vec<(i64, u64)> = store
        .series_points(id, at(from), at(to), Duration::ZERO)
        .await
        .expect("query")
        .into_iter()
        .map(|p| (p.ts_ms, p.value.to_bits()))
        .collect();
    points.sort();
    points
}

async fn count(store: &Store, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(store.pool())
        .await
        .expect("count query")
}

/// Checks that every expected point is stored exactly once (raw or compacted).
async fn assert_exactly_once(
    store: &Store,
    expected: &HashMap<SeriesId, Vec<(i64, u64)>>,
    from: i64,
    to: i64,
) {
    for (id, points) in expected {
        let stored = stored_points(store, *id, from, to).await;
        assert_eq!(stored.len(), points.len(), "series {id}: sample count");
        assert!(
            stored == *points,
            "series {id}: stored points differ from produced ones"
        );
    }
}

async fn setup(pg: &TestPg, n_series: u32) -> (Store, Vec<SeriesDef>, SeriesMap) {
    let store = pg.store().await.expect("store");
    store
        .record_hello(&hello(HOST), Utc::now())
        .await
        .expect("hello");
    let defs = series_defs(n_series);
    let map = store.register_series(HOST, &defs).await.expect("series");
    (store, defs, map)
}

/// A start time aligned to a compaction window, `hours_ago` hours in the past.
fn aligned_start(hours_ago: i64) -> i64 {
    let start = now_ms() - hours_ago * 3_600_000;
    start - start.rem_euclid(3_600_000)
}

#[tokio::test]
async fn migrations_apply_twice_and_from_a_second_replica() {
    let pg = TestPg::start().await.expect("postgres");
    let store = pg.store().await.expect("first migrate");
    store.migrate().await.expect("second migrate, same store");
    let replica = Store::connect(&pg.url(), 2).await.expect("connect");
    let (a, b) = tokio::join!(store.migrate(), replica.migrate());
    a.expect("concurrent migrate a");
    b.expect("concurrent migrate b");
    let tables = count(
        &store,
        "SELECT count(*) FROM pg_tables WHERE tablename IN
         ('hosts','agent_sessions','components','gpus','events','series','agent_cursors')",
    )
    .await;
    assert_eq!(tables, 7);
    let applied = count(
        &store,
        "SELECT count(*) FROM _sqlx_migrations WHERE success",
    )
    .await;
    assert!(applied >= 1);
}

#[tokio::test]
async fn hello_records_host_components_gpus_and_sessions() {
    let pg = TestPg::start().await.expect("postgres");
    let store = pg.store().await.expect("store");
    let cursor = store
        .record_hello(&hello(HOST), Utc::now())
        .await
        .expect("hello");
    assert_eq!(cursor, 0);
    assert_eq!(
        count(&store, "SELECT count(*) FROM gpus WHERE uuid = 'GPU-0000'").await,
        1
    );
    assert_eq!(
        count(
            &store,
            "SELECT count(*) FROM components WHERE state = 'starting' AND critical"
        )
        .await,
        1
    );
    let session = store
        .open_session(HOST, "127.0.0.1:4000", 1, Utc::now())
        .await
        .expect("open");
    store
        .close_session(session, Utc::now())
        .await
        .expect("close");
    assert_eq!(
        count(
            &store,
            "SELECT count(*) FROM agent_sessions WHERE disconnected_at IS NOT NULL"
        )
        .await,
        1
    );
    // Registering the same series again maps to the same ids.
    let defs = series_defs(3);
    let first = store.register_series(HOST, &defs).await.expect("register");
    let again = store
        .register_series(HOST, &defs)
        .await
        .expect("register again");
    assert_eq!(first, again);
    assert_eq!(first.len(), 3);
    assert_eq!(count(&store, "SELECT count(*) FROM series").await, 3);
}

#[tokio::test]
async fn lost_and_back_are_transitions_with_events() {
    let pg = TestPg::start().await.expect("postgres");
    let store = pg.store().await.expect("store");
    store
        .record_hello(&hello(HOST), Utc::now())
        .await
        .expect("hello");
    let t = now_ms();
    assert!(store.mark_lost(HOST, at(t)).await.expect("lost"));
    assert!(!store
        .mark_lost(HOST, at(t + 1000))
        .await
        .expect("lost again"));
    let lost: (String, Option<DateTime<Utc>>) =
        sqlx::query_as("SELECT state, lost_since FROM hosts WHERE host_id = $1")
            .bind(HOST)
            .fetch_one(store.pool())
            .await
            .expect("host");
    assert_eq!(lost, ("lost".to_owned(), Some(at(t))));
    assert!(store.mark_back(HOST, at(t + 5000)).await.expect("back"));
    assert!(!store
        .mark_back(HOST, at(t + 6000))
        .await
        .expect("back again"));
    assert!(!store
        .mark_lost("unknown-host", at(t))
        .await
        .expect("unknown"));
    assert_eq!(
        count(
            &store,
            "SELECT count(*) FROM events WHERE kind IN ('host_lost', 'host_back')"
        )
        .await,
        2
    );
}

#[tokio::test]
async fn ingest_stores_exactly_the_rows_and_a_resend_is_stored_once() {
    let pg = TestPg::start().await.expect("postgres");
    let (store, defs, map) = setup(&pg, 4).await;
    let start = aligned_start(1);
    let all = batches(&defs, 1, 4, start, 10);

    let outcome = store.ingest(HOST, &all[..3], &map).await.expect("ingest");
    assert_eq!(outcome.cursor, 3);
    assert_eq!(outcome.batches_stored, 3);
    assert_eq!(outcome.samples, 3 * 4 * 10);
    assert_eq!(count(&store, "SELECT count(*) FROM samples").await, 120);

    // The same batches again: nothing new, same cursor.
    let again = store.ingest(HOST, &all[..3], &map).await.expect("resend");
    assert_eq!(again.cursor, 3);
    assert_eq!(again.batches_stored, 0);
    assert_eq!(again.batches_duplicate, 3);
    assert_eq!(count(&store, "SELECT count(*) FROM samples").await, 120);

    // An overlapping resend: only the new batch is stored.
    let overlap = store.ingest(HOST, &all[1..], &map).await.expect("overlap");
    assert_eq!(
        (
            overlap.cursor,
            overlap.batches_stored,
            overlap.batches_duplicate
        ),
        (4, 1, 2)
    );
    assert_eq!(store.cursor(HOST).await.expect("cursor"), 4);
    assert_exactly_once(
        &store,
        &expected_points(&all, &map),
        start,
        start + 3_600_000,
    )
    .await;
    assert_eq!(
        count(&store, "SELECT samples_stored FROM agent_cursors").await,
        160
    );

    // A batch naming an undefined series stores nothing and leaves the cursor.
    let mut bad = batches(&defs, 5, 1, start + 40_000, 10);
    bad[0].series[0].series = 9_999;
    assert!(store.ingest(HOST, &bad, &map).await.is_err());
    assert_eq!(store.cursor(HOST).await.expect("cursor"), 4);
    assert_eq!(count(&store, "SELECT count(*) FROM samples").await, 160);
}

#[tokio::test]
async fn events_are_stored_and_component_states_follow() {
    let pg = TestPg::start().await.expect("postgres");
    let (store, defs, map) = setup(&pg, 1).await;
    let t = now_ms();
    let mut batch = batches(&defs, 1, 1, t - 10_000, 5).remove(0);
    batch.events = vec![
        Event {
            ts_ms: t - 2000,
            severity: Severity::Info,
            subject: Subject::Component("model-server".to_owned()),
            kind: EventKind::StateChanged {
                from: ComponentState::Starting,
                to: ComponentState::Ready,
            },
            message: "readiness probe passed".to_owned(),
        },
        Event {
            ts_ms: t - 1000,
            severity: Severity::Critical,
            subject: Subject::Gpu(0),
            kind: EventKind::Xid {
                xid: 79,
                class: razar_shared::domain::XidClass::RebootHost,
            },
            message: "GPU fell off the bus".to_owned(),
        },
    ];
    let outcome = store
        .ingest(HOST, &[batch.clone()], &map)
        .await
        .expect("ingest");
    assert_eq!(outcome.events, 2);
    store.ingest(HOST, &[batch], &map).await.expect("resend");
    assert_eq!(count(&store, "SELECT count(*) FROM events").await, 2);
    let xid: (String, String, Option<String>, serde_json::Value) = sqlx::query_as(
        "SELECT kind, subject_kind, subject_id, payload FROM events WHERE severity = 'critical'",
    )
    .fetch_one(store.pool())
    .await
    .expect("xid event");
    assert_eq!(xid.0, "xid");
    assert_eq!((xid.1.as_str(), xid.2.as_deref()), ("gpu", Some("0")));
    assert_eq!(xid.3["Xid"]["xid"], 79);
    let state: String =
        sqlx::query_scalar("SELECT state FROM components WHERE name = 'model-server'")
            .fetch_one(store.pool())
            .await
            .expect("component");
    // The hello was recorded at "now", after the event: the newer state stays.
    assert_eq!(state, "starting");
    sqlx::query("UPDATE components SET updated_at = now() - interval '1 hour'")
        .execute(store.pool())
        .await
        .expect("age the component row");
    let mut later = batches(&defs, 2, 1, t - 5_000, 1).remove(0);
    later.events = vec![Event {
        ts_ms: t,
        severity: Severity::Warning,
        subject: Subject::Component("model-server".to_owned()),
        kind: EventKind::StateChanged {
            from: ComponentState::Ready,
            to: ComponentState::Backoff,
        },
        message: "process exited".to_owned(),
    }];
    store.ingest(HOST, &[later], &map).await.expect("ingest");
    let state: String =
        sqlx::query_scalar("SELECT state FROM components WHERE name = 'model-server'")
            .fetch_one(store.pool())
            .await
            .expect("component");
    assert_eq!(state, "backoff");
}

#[tokio::test]
async fn compaction_keeps_every_sample_and_queries_span_raw_and_chunks() {
    let pg = TestPg::start().await.expect("postgres");
    let (store, defs, map) = setup(&pg, 6).await;
    let start = aligned_start(2);
    // One hour in 60-second batches.
    let all = batches(&defs, 1, 60, start, 60);
    for group in all.chunks(10) {
        store.ingest(HOST, group, &map).await.expect("ingest");
    }
    let expected = expected_points(&all, &map);
    let total: usize = expected.values().map(Vec::len).sum();
    assert_eq!(
        count(&store, "SELECT count(*) FROM samples").await as usize,
        total
    );

    // Compact the first 30 minutes only: the query must merge chunks and raw rows.
    let report = store
        .compact(at(start + 30 * 60_000))
        .await
        .expect("compact");
    assert_eq!(report.windows, 3);
    assert_eq!(report.samples as usize, total / 2);
    assert_eq!(report.chunks, 3 * 6);
    assert_eq!(
        count(&store, "SELECT count(*) FROM samples").await as usize,
        total / 2
    );
    assert_exactly_once(&store, &expected, start - 60_000, start + 3_700_000).await;

    // Compacting again changes nothing; then the rest.
    let again = store
        .compact(at(start + 30 * 60_000))
        .await
        .expect("compact again");
    assert_eq!(again.samples, 0);
    store
        .compact(at(start + 60 * 60_000))
        .await
        .expect("compact rest");
    assert_eq!(count(&store, "SELECT count(*) FROM samples").await, 0);
    assert_eq!(
        count(&store, "SELECT sum(n) FROM sample_chunks").await as usize,
        total
    );
    assert_exactly_once(&store, &expected, start, start + 3_600_000).await;

    // Downsampled: 60-second buckets average 60 samples each.
    let id = map[&defs[0].id];
    let buckets = store
        .series_points(id, at(start), at(start + 600_000), Duration::from_secs(60))
        .await
        .expect("buckets");
    assert_eq!(buckets.len(), 10);
    let first: f64 = (0..60).map(|i| value(defs[0].id, i)).sum::<f64>() / 60.0;
    assert!((buckets[0].value - first).abs() < 1e-9);
    assert_eq!(buckets[1].ts_ms, start + 60_000);
    // Partial ranges inside a chunk.
    let inside = stored_points(&store, id, start + 90_500, start + 95_000).await;
    assert_eq!(inside.len(), 4);
    assert_eq!(inside[0].0, start + 91_000);
}

#[tokio::test]
async fn rollups_are_correct_for_compacted_and_raw_minutes() {
    let pg = TestPg::start().await.expect("postgres");
    let (store, defs, map) = setup(&pg, 3).await;
    let start = aligned_start(2);
    let all = batches(&defs, 1, 20, start, 60);
    store.ingest(HOST, &all, &map).await.expect("ingest");
    store
        .compact(at(start + 10 * 60_000))
        .await
        .expect("compact first window");
    for def in &defs {
        let id = map[&def.id];
        let rollups = store
            .series_rollups(id, at(start), at(start + 20 * 60_000))
            .await
            .expect("rollups");
        assert_eq!(rollups.len(), 20, "minutes of compacted and raw data");
        for (m, r) in rollups.iter().enumerate() {
            let values: Vec<f64> = (0..60).map(|s| value(def.id, m as i64 * 60 + s)).collect();
            assert_eq!(r.minute_ms, start + m as i64 * 60_000);
            assert_eq!(r.count, 60);
            assert_eq!(r.min, values.iter().copied().fold(f64::INFINITY, f64::min));
            assert_eq!(
                r.max,
                values.iter().copied().fold(f64::NEG_INFINITY, f64::max)
            );
            assert_eq!(r.last, values[59]);
            let avg = values.iter().sum::<f64>() / 60.0;
            assert!(
                (r.avg - avg).abs() < 1e-9 * avg.abs().max(1.0),
                "minute {m}"
            );
        }
    }
}

#[tokio::test]
async fn late_samples_merge_into_an_already_compacted_window() {
    let pg = TestPg::start().await.expect("postgres");
    let (store, defs, map) = setup(&pg, 2).await;
    let start = aligned_start(3);
    // Every other minute first, then the missing minutes arrive late.
    let all = batches(&defs, 1, 10, start, 60);
    let (early, late): (Vec<Batch>, Vec<Batch>) = all.iter().cloned().partition(|b| b.seq % 2 == 1);
    store.ingest(HOST, &early, &map).await.expect("early");
    store.compact(at(start + 600_000)).await.expect("compact");
    // Late batches carry new sequence numbers (they were spooled later).
    let late: Vec<Batch> = late
        .into_iter()
        .enumerate()
        .map(|(i, mut b)| {
            b.seq = 100 + i as u64;
            b
        })
        .collect();
    store.ingest(HOST, &late, &map).await.expect("late");
    let report = store
        .compact(at(start + 600_000))
        .await
        .expect("compact late");
    assert_eq!(report.windows, 1);
    assert_eq!(count(&store, "SELECT count(*) FROM samples").await, 0);
    assert_eq!(count(&store, "SELECT count(*) FROM sample_chunks").await, 2);
    assert_exactly_once(&store, &expected_points(&all, &map), start, start + 600_000).await;
    let rollups = store
        .series_rollups(map[&defs[0].id], at(start), at(start + 600_000))
        .await
        .expect("rollups");
    assert_eq!(rollups.len(), 10);
    assert!(rollups.iter().all(|r| r.count == 60));
}

#[tokio::test]
async fn concurrent_compactions_lose_and_duplicate_nothing() {
    let pg = TestPg::start().await.expect("postgres");
    let (store, defs, map) = setup(&pg, 8).await;
    let start = aligned_start(5);
    let all = batches(&defs, 1, 4 * 60, start, 60);
    for group in all.chunks(30) {
        store.ingest(HOST, group, &map).await.expect("ingest");
    }
    let other = Store::connect(&pg.url(), 4).await.expect("second store");
    let (a, b) = tokio::join!(
        store.compact(at(start + 4 * 3_600_000)),
        other.compact(at(start + 4 * 3_600_000))
    );
    let (a, b) = (a.expect("compactor a"), b.expect("compactor b"));
    // Whatever split they made, a final run finds nothing left behind.
    store
        .compact(at(start + 4 * 3_600_000))
        .await
        .expect("final");
    assert_eq!(count(&store, "SELECT count(*) FROM samples").await, 0);
    let expected = expected_points(&all, &map);
    let total: u64 = expected.values().map(|v| v.len() as u64).sum();
    assert!(a.samples + b.samples <= total);
    assert_eq!(
        count(&store, "SELECT sum(n) FROM sample_chunks").await as u64,
        total
    );
    assert_exactly_once(&store, &expected, start, start + 4 * 3_600_000).await;
}

#[tokio::test]
async fn compaction_interrupted_by_a_crash_loses_and_duplicates_nothing() {
    let mut pg = TestPg::start().await.expect("postgres");
    let (store, defs, map) = setup(&pg, 24).await;
    let start = aligned_start(14);
    let all = batches(&defs, 1, 12 * 60, start, 60);
    for group in all.chunks(60) {
        store.ingest(HOST, group, &map).await.expect("ingest");
    }
    let expected = expected_points(&all, &map);
    let total: i64 = expected.values().map(|v| v.len() as i64).sum();

    let compactor = store.clone();
    let cutoff = at(start + 12 * 3_600_000);
    let task = tokio::spawn(async move { compactor.compact(cutoff).await });
    // Crash PostgreSQL as soon as the first windows are committed.
    let watcher = Store::connect(&pg.url(), 1).await.expect("watcher");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let chunks = count(&watcher, "SELECT count(*) FROM sample_chunks").await;
        if chunks > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "compaction never committed a window"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    watcher.close().await;
    pg.crash().await.expect("crash postgres");
    let result = task.await.expect("task");
    assert!(
        result.is_err(),
        "compaction finished before the crash; the test needs a larger backlog: {result:?}"
    );
    pg.start_again().await.expect("restart postgres");

    let store = pg.store().await.expect("store after crash");
    let moved = count(&store, "SELECT coalesce(sum(n), 0) FROM sample_chunks").await;
    let raw = count(&store, "SELECT count(*) FROM samples").await;
    assert!(
        moved > 0 && raw > 0,
        "the crash left the compaction half done: {moved} moved, {raw} raw"
    );
    assert_eq!(moved + raw, total, "chunks plus raw rows after the crash");
    store
        .compact(cutoff)
        .await
        .expect("compact after the crash");
    assert_eq!(count(&store, "SELECT count(*) FROM samples").await, 0);
    assert_exactly_once(&store, &expected, start, start + 12 * 3_600_000).await;
}

#[tokio::test]
async fn ingest_resumes_after_postgres_restarts() {
    let mut pg = TestPg::start().await.expect("postgres");
    let (store, defs, map) = setup(&pg, 2).await;
    let start = aligned_start(1);
    let all = batches(&defs, 1, 6, start, 10);
    store
        .ingest(HOST, &all[..3], &map)
        .await
        .expect("before restart");
    pg.restart().await.expect("restart");
    // The pool reconnects; a resend of an acked batch is still recognised.
    let deadline = Instant::now() + Duration::from_secs(30);
    let outcome = loop {
        match store.ingest(HOST, &all[2..], &map).await {
            Ok(outcome) => break outcome,
            Err(e) => {
                assert!(Instant::now() < deadline, "ingest never recovered: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(
        (
            outcome.cursor,
            outcome.batches_stored,
            outcome.batches_duplicate
        ),
        (6, 3, 1)
    );
    assert_exactly_once(&store, &expected_points(&all, &map), start, start + 60_000).await;
}

#[tokio::test]
async fn retention_drops_whole_old_partitions() {
    let pg = TestPg::start().await.expect("postgres");
    let (store, defs, map) = setup(&pg, 2).await;
    let now = Utc::now();
    store.ensure_partitions(now).await.expect("partitions");
    let old_start = aligned_start(10 * 24);
    let recent_start = aligned_start(1);
    store
        .ingest(HOST, &batches(&defs, 1, 2, old_start, 60), &map)
        .await
        .expect("old");
    store
        .ingest(HOST, &batches(&defs, 3, 2, recent_start, 60), &map)
        .await
        .expect("recent");
    store
        .compact(at(old_start + 600_000))
        .await
        .expect("compact old");
    let old_day = at(old_start).format("%Y%m%d").to_string();
    let dropped = store.apply_retention(now, 7).await.expect("retention");
    for table in ["samples", "sample_chunks", "rollups_1m"] {
        let name = format!("{table}_p{old_day}");
        assert!(dropped.contains(&name), "{name} not in {dropped:?}");
    }
    let old_left = count(
        &store,
        &format!("SELECT count(*) FROM pg_class WHERE relname LIKE '%_p{old_day}'"),
    )
    .await;
    assert_eq!(old_left, 0);
    assert_eq!(
        count(&store, "SELECT count(*) FROM samples").await,
        2 * 2 * 60
    );
    // Today's and tomorrow's partitions stay.
    let today = now.format("%Y%m%d").to_string();
    assert!(!dropped.iter().any(|t| t.ends_with(&today)));
}

fn postmaster_pid(pg: &EmbeddedPg) -> i32 {
    let text =
        std::fs::read_to_string(pg.data_dir().join("postmaster.pid")).expect("postmaster.pid");
    text.lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("pid line")
}

fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// Waits (with a deadline) for a process to be gone: a stopped server's pid must vanish.
async fn wait_gone(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while alive(pid) {
        assert!(Instant::now() < deadline, "postgres {pid} still running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn embedded_postgres_starts_restarts_reuses_its_dir_and_stops() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let mut options = EmbeddedPgOptions::new(dir.path().join("pg"));
    options.fsync = false;
    let mut pg = EmbeddedPg::start(options.clone()).await.expect("start");
    let url = pg.url();
    assert!(url.starts_with("postgres:///razar?host=/"), "{url}");
    let store = Store::connect(&url, 2).await.expect("connect by URL");
    sqlx::raw_sql("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)")
        .execute(store.pool())
        .await
        .expect("write");
    store.close().await;
    let first = postmaster_pid(&pg);

    pg.restart().await.expect("restart");
    let second = postmaster_pid(&pg);
    assert_ne!(first, second);
    wait_gone(first).await;
    pg.stop().await.expect("stop");
    wait_gone(second).await;
    drop(pg);

    // Same data dir again: no initdb, the data is still there; dropping stops it.
    let pg = EmbeddedPg::start(options).await.expect("start again");
    let store = Store::connect(&pg.url(), 2).await.expect("connect");
    let v: i32 = sqlx::query_scalar("SELECT v FROM kept")
        .fetch_one(store.pool())
        .await
        .expect("read");
    assert_eq!(v, 42);
    store.close().await;
    let third = postmaster_pid(&pg);
    drop(pg);
    wait_gone(third).await;
}

#[tokio::test]
async fn a_server_left_running_by_a_killed_collector_is_taken_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let mut options = EmbeddedPgOptions::new(dir.path().join("pg"));
    options.fsync = false;
    let pg = EmbeddedPg::start(options.clone()).await.expect("start");
    let leftover = postmaster_pid(&pg);
    // Simulate a collector killed with SIGKILL: the server keeps running.
    std::mem::forget(pg);
    assert!(alive(leftover));
    let pg = EmbeddedPg::start(options)
        .await
        .expect("start over a leftover server");
    wait_gone(leftover).await;
    let pid = postmaster_pid(&pg);
    drop(pg);
    wait_gone(pid).await;
}

#[tokio::test]
async fn missing_postgres_binaries_are_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let empty = tempfile::tempdir().expect("empty dir");
    let mut options = EmbeddedPgOptions::new(dir.path().join("pg"));
    options.search_dirs = Some(vec![empty.path().to_path_buf()]);
    let err = EmbeddedPg::start(options).await.expect_err("no binaries");
    assert!(
        matches!(err, EmbeddedPgError::NotInstalled { .. }),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("apt-get install postgresql") && text.contains("database URL"),
        "{text}"
    );
    assert!(!text.contains('\n'));
}

/// Every raw-samples partition (made after the migrations) has a BRIN on
/// `series_id` beside the one on `ts`; `summarize_new_ranges` summarizes what was
/// written since its last call (the collector runs it every few seconds), and reads by
/// series still return every point.
#[tokio::test]
async fn raw_samples_have_a_series_brin_and_new_ranges_are_summarized() {
    let pg = TestPg::start().await.expect("pg");
    let (store, defs, map) = setup(&pg, 32).await;
    let start = aligned_start(0) - 600_000;
    let all = batches(&defs, 1, 60, start, 5);
    store.ingest(HOST, &all, &map).await.expect("ingest");
    store
        .ensure_partitions(Utc::now())
        .await
        .expect("partitions");
    let partitions = count(
        &store,
        "SELECT count(*) FROM pg_inherits WHERE inhparent = 'samples'::regclass",
    )
    .await;
    assert!(
        partitions >= 2,
        "{partitions} partitions: today's and tomorrow's"
    );
    let without = count(
        &store,
        "SELECT count(*) FROM pg_inherits inh
         WHERE inh.inhparent = 'samples'::regclass
           AND NOT EXISTS (
               SELECT 1 FROM pg_index i
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
               JOIN pg_class ic ON ic.oid = i.indexrelid
               JOIN pg_am am ON am.oid = ic.relam
               WHERE i.indrelid = inh.inhrelid AND a.attname = 'series_id'
                 AND am.amname = 'brin')",
    )
    .await;
    assert_eq!(without, 0, "a samples partition without the series BRIN");

    let summarized = store.summarize_new_ranges().await.expect("summarize");
    assert!(summarized > 0, "nothing summarized after 9,600 rows");
    assert_eq!(
        store.summarize_new_ranges().await.expect("summarize again"),
        0,
        "a second call finds nothing new"
    );
    let expected = expected_points(&all, &map);
    assert_exactly_once(&store, &expected, start, start + 301_000).await;
}

/// New series refresh the planner's statistics of `series` (at most every 10 s), so a
/// query joining the raw samples to the dictionary does not plan for an empty one: with
/// 16,000 series counted as one, the overview probed the samples once per series and
/// took over a minute.
#[tokio::test]
async fn new_series_refresh_the_planners_count_of_series() {
    let pg = TestPg::start().await.expect("pg");
    let store = pg.store().await.expect("store");
    let reltuples = || async {
        sqlx::query_scalar::<_, f32>(
            "SELECT reltuples FROM pg_class WHERE oid = 'series'::regclass",
        )
        .fetch_one(store.pool())
        .await
        .expect("reltuples")
    };
    assert!(
        reltuples().await < 1.0,
        "a fresh dictionary is counted empty"
    );
    store
        .record_hello(&hello(HOST), Utc::now())
        .await
        .expect("hello");
    store
        .register_series(HOST, &series_defs(300))
        .await
        .expect("series");
    let counted = reltuples().await;
    assert!(counted >= 300.0, "the planner counts {counted} series");
}

/// A partition a vacuum holds (SHARE UPDATE EXCLUSIVE) is skipped by the summarizing
/// pass instead of waited for: the pass ends at once, and never waits long enough for
/// PostgreSQL to cancel an autovacuum on its behalf. Once the lock is gone, the next
/// pass summarizes what was skipped.
#[tokio::test]
async fn summarizing_skips_a_partition_a_vacuum_holds() {
    let pg = TestPg::start().await.expect("pg");
    let (store, defs, map) = setup(&pg, 32).await;
    let start = aligned_start(0) - 600_000;
    store
        .ingest(HOST, &batches(&defs, 1, 60, start, 5), &map)
        .await
        .expect("ingest");
    let partition: String = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'samples'::regclass AND pg_relation_size(c.oid) > 0",
    )
    .fetch_one(store.pool())
    .await
    .expect("the partition written");
    let mut vacuum = store.pool().begin().await.expect("begin");
    sqlx::query(&format!(
        "LOCK TABLE {partition} IN SHARE UPDATE EXCLUSIVE MODE"
    ))
    .execute(&mut *vacuum)
    .await
    .expect("lock as a vacuum does");
    let skipped = tokio::time::timeout(Duration::from_secs(5), store.summarize_new_ranges())
        .await
        .expect("the pass waited for the lock")
        .expect("summarize");
    assert_eq!(skipped, 0, "the held partition was summarized");
    vacuum.rollback().await.expect("unlock");
    let summarized = store.summarize_new_ranges().await.expect("summarize");
    assert!(summarized > 0, "nothing summarized once the lock was gone");
}
