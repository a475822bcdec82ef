//! Group commit of telemetry against a real private PostgreSQL per test: batches of
//! several hosts in one transaction (`Store::ingest_group`) and the collector's group
//! writer (`razar_collector::group`): duplicates are filtered per host, each request
//! gets its own cursor, an invalid request fails alone, a second request of a host waits
//! for the next group, and concurrent groups over overlapping hosts neither deadlock nor
//! store anything twice.

use std::sync::Arc;
use std::time::Duration;

use razar_collector::group::{GroupConfig, GroupError, GroupMetrics, GroupWriter};
use razar_collector::server::prometheus::Registry;
use razar_collector::store::{IngestItem, SeriesMap, Store, StoreError};
use razar_shared::domain::{ComponentState, Severity};
use razar_shared::protocol::{Batch, Event, EventKind, Hello, SeriesDef, SeriesPoints, Subject};
use razar_tests::fixtures::now_ms;
use razar_tests::pg::TestPg;
use sqlx::types::chrono::Utc;

const SERIES: u32 = 3;
const SECONDS_PER_BATCH: i64 = 10;

fn hello(host: &str) -> Hello {
    razar_tests::fixtures::hello(host, Vec::new())
}

fn series_defs() -> Vec<SeriesDef> {
    (0..SERIES)
        .map(|i| SeriesDef {
            id: 100 + i,
            metric: "gpu_utilization_ratio".to_owned(),
            labels: vec![("gpu".to_owned(), i.to_string())],
        })
        .collect()
}

/// Batch `seq` of a host: 10 s of 1 sample/s per series, at a time given by `seq` (so a
/// resend carries exactly the same rows), values distinct per host.
fn batch(host_no: u32, seq: u64, start_ms: i64) -> Batch {
    let base = start_ms + (seq as i64 - 1) * SECONDS_PER_BATCH * 1000;
    Batch {
        seq,
        base_ts_ms: base,
        series: series_defs()
            .iter()
            .map(|d| SeriesPoints {
                series: d.id,
                points: (0..SECONDS_PER_BATCH)
                    .map(|k| {
                        let value = f64::from(host_no) * 1e6 + seq as f64 * 100.0 + k as f64;
                        ((k * 1000) as u32, value)
                    })
                    .collect(),
            })
            .collect(),
        events: Vec::new(),
    }
}

fn batches(host_no: u32, seqs: std::ops::RangeInclusive<u64>, start_ms: i64) -> Vec<Batch> {
    seqs.map(|seq| batch(host_no, seq, start_ms)).collect()
}

fn state_event(ts_ms: i64, to: ComponentState) -> Event {
    Event {
        ts_ms,
        severity: Severity::Info,
        subject: Subject::Component("model-server".to_owned()),
        kind: EventKind::StateChanged {
            from: ComponentState::Starting,
            to,
        },
        message: format!("now {}", to.as_str()),
    }
}

/// A start an hour ago, aligned to the hour (every batch of a test on one day or two).
fn start_ms() -> i64 {
    let start = now_ms() - 3_600_000;
    start - start.rem_euclid(3_600_000)
}

async fn scalar(store: &Store, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(store.pool())
        .await
        .expect("scalar query")
}

/// (acked_seq, samples_stored, events_stored) of a host's cursor.
async fn cursor_row(store: &Store, host: &str) -> Option<(i64, i64, i64)> {
    sqlx::query_as(
        "SELECT acked_seq, samples_stored, events_stored FROM agent_cursors WHERE host_id = $1",
    )
    .bind(host)
    .fetch_optional(store.pool())
    .await
    .expect("cursor row")
}

/// Samples stored for a host's series, and how many (series, ts) pairs are stored more
/// than once.
async fn host_samples(store: &Store, map: &SeriesMap) -> (i64, i64) {
    let ids: Vec<i64> = map.values().copied().collect();
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM samples WHERE series_id = ANY($1)")
        .bind(&ids)
        .fetch_one(store.pool())
        .await
        .expect("sample count");
    let doubled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM samples WHERE series_id = ANY($1)
         GROUP BY series_id, ts HAVING count(*) > 1) d",
    )
    .bind(&ids)
    .fetch_one(store.pool())
    .await
    .expect("doubled samples");
    (total, doubled)
}

async fn host_events(store: &Store, host: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events WHERE host_id = $1")
        .bind(host)
        .fetch_one(store.pool())
        .await
        .expect("event count")
}

async fn component_state(store: &Store, host: &str) -> String {
    sqlx::query_scalar("SELECT state FROM components WHERE host_id = $1 AND name = 'model-server'")
        .bind(host)
        .fetch_one(store.pool())
        .await
        .expect("component state")
}

fn samples_of(n_batches: u64) -> u64 {
    n_batches * u64::from(SERIES) * SECONDS_PER_BATCH as u64
}

#[tokio::test]
async fn a_group_of_hosts_stores_a_resent_batch_once_and_answers_each_cursor() {
    let pg = TestPg::start().await.expect("postgres");
    let store = pg.store().await.expect("store");
    let hosts = ["gpu-a", "gpu-b", "gpu-c"];
    // gpu-c never said Hello: its cursor row is created by the group itself.
    for host in &hosts[..2] {
        store
            .record_hello(&hello(host), Utc::now())
            .await
            .expect("hello");
    }
    sqlx::query("UPDATE components SET updated_at = now() - interval '1 hour'")
        .execute(store.pool())
        .await
        .expect("age the component rows");
    let mut maps = Vec::new();
    for host in &hosts {
        maps.push(
            store
                .register_series(host, &series_defs())
                .await
                .expect("series"),
        );
    }
    let start = start_ms();
    let t = now_ms();

    // gpu-a already has 1..2 stored; the group resends them with 3..4.
    let first = store
        .ingest(hosts[0], &batches(0, 1..=2, start), &maps[0])
        .await
        .expect("first ingest");
    assert_eq!(first.cursor, 2);

    let mut a = batches(0, 1..=4, start);
    a[2].events = vec![state_event(t - 3_000, ComponentState::Ready)];
    let mut b = batches(1, 1..=3, start);
    b[1].events = vec![
        state_event(t - 2_000, ComponentState::Ready),
        state_event(t - 1_000, ComponentState::Unhealthy),
    ];
    let c = batches(2, 1..=2, start);
    let items = [
        IngestItem {
            host: hosts[0],
            batches: &a,
            series: &maps[0],
        },
        IngestItem {
            host: hosts[1],
            batches: &b,
            series: &maps[1],
        },
        IngestItem {
            host: hosts[2],
            batches: &c,
            series: &maps[2],
        },
    ];
    let outcomes = store.ingest_group(&items).await.expect("group");
    let summary: Vec<(u64, u32, u32, u64, u64)> = outcomes
        .iter()
        .map(|o| {
            (
                o.cursor,
                o.batches_stored,
                o.batches_duplicate,
                o.samples,
                o.events,
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (4, 2, 2, samples_of(2), 1),
            (3, 3, 0, samples_of(3), 2),
            (2, 2, 0, samples_of(2), 0),
        ]
    );

    let expected = [(4, 4, 1), (3, 3, 2), (2, 2, 0)];
    for ((host, map), (seq, n_batches, events)) in hosts.iter().zip(&maps).zip(expected) {
        let samples = samples_of(n_batches) as i64;
        assert_eq!(
            host_samples(&store, map).await,
            (samples, 0),
            "{host}: samples stored once"
        );
        assert_eq!(
            cursor_row(&store, host).await,
            Some((seq, samples, events)),
            "{host}: cursor"
        );
        assert_eq!(host_events(&store, host).await, events, "{host}: events");
    }
    // Each host's latest state change, applied to its own component only.
    assert_eq!(component_state(&store, hosts[0]).await, "ready");
    assert_eq!(component_state(&store, hosts[1]).await, "unhealthy");

    // The whole group again: every batch a duplicate, nothing stored, same cursors.
    let again = store.ingest_group(&items).await.expect("group resent");
    let cursors: Vec<(u64, u32, u32)> = again
        .iter()
        .map(|o| (o.cursor, o.batches_stored, o.batches_duplicate))
        .collect();
    assert_eq!(cursors, vec![(4, 0, 4), (3, 0, 3), (2, 0, 2)]);
    assert_eq!(
        scalar(&store, "SELECT count(*) FROM samples").await,
        samples_of(9) as i64
    );
    assert_eq!(scalar(&store, "SELECT count(*) FROM events").await, 3);

    // Through the store API an invalid item fails the call and stores nothing (the group
    // writer checks each request before grouping: see the next test).
    let d = batches(0, 5..=5, start);
    let mut bad = batches(1, 4..=4, start);
    bad[0].series[0].series = 9_999;
    let err = store
        .ingest_group(&[
            IngestItem {
                host: hosts[0],
                batches: &d,
                series: &maps[0],
            },
            IngestItem {
                host: hosts[1],
                batches: &bad,
                series: &maps[1],
            },
        ])
        .await
        .expect_err("an undefined series");
    assert!(
        matches!(err, StoreError::UnknownSeries { series: 9_999, .. }),
        "{err}"
    );
    assert_eq!(store.cursor(hosts[0]).await.expect("cursor"), 4);
}

struct Writer {
    writer: GroupWriter,
    metrics: GroupMetrics,
}

fn writer(store: &Store, writers: usize) -> Writer {
    writer_with(
        store,
        GroupConfig {
            writers,
            ..GroupConfig::default()
        },
    )
}

fn writer_with(store: &Store, config: GroupConfig) -> Writer {
    let metrics = GroupMetrics::new(&Registry::new()).expect("metrics");
    let (writer, _tasks) = GroupWriter::start(store.clone(), config, metrics.clone());
    Writer { writer, metrics }
}

async fn registered(store: &Store, host: &str) -> Arc<SeriesMap> {
    store
        .record_hello(&hello(host), Utc::now())
        .await
        .expect("hello");
    Arc::new(
        store
            .register_series(host, &series_defs())
            .await
            .expect("series"),
    )
}

// A current-thread runtime: the requests of one `join!` are all queued before the writer
// runs, so they form one group (the writer takes whatever is queued).
#[tokio::test]
async fn an_invalid_request_fails_alone_and_the_rest_of_its_group_commits() {
    let pg = TestPg::start().await.expect("postgres");
    let store = pg.store().await.expect("store");
    let w = writer(&store, 1);
    let hosts = ["gpu-a", "gpu-b", "gpu-c"];
    let mut maps = Vec::new();
    for host in hosts {
        maps.push(registered(&store, host).await);
    }
    let start = start_ms();
    let mut bad = batches(1, 1..=2, start);
    bad[1].series[0].series = 999; // never defined
    let (a, b, c) = tokio::join!(
        w.writer.ingest(
            hosts[0].to_owned(),
            Arc::new(batches(0, 1..=3, start)),
            maps[0].clone()
        ),
        w.writer
            .ingest(hosts[1].to_owned(), Arc::new(bad), maps[1].clone()),
        w.writer.ingest(
            hosts[2].to_owned(),
            Arc::new(batches(2, 1..=2, start)),
            maps[2].clone()
        ),
    );
    let a = a.expect("gpu-a stored");
    let c = c.expect("gpu-c stored");
    assert_eq!((a.cursor, a.batches_stored), (3, 3));
    assert_eq!((c.cursor, c.batches_stored), (2, 2));
    assert!(
        matches!(
            b,
            Err(GroupError::Refused(StoreError::UnknownSeries {
                series: 999,
                ..
            }))
        ),
        "{b:?}"
    );
    assert_eq!(store.cursor(hosts[1]).await.expect("cursor"), 0);
    assert_eq!(host_samples(&store, &maps[1]).await, (0, 0));
    assert_eq!(
        host_samples(&store, &maps[0]).await,
        (samples_of(3) as i64, 0)
    );
    // gpu-a and gpu-c in one commit.
    assert_eq!(w.metrics.commits.get(), 1);
    assert_eq!(w.metrics.commit_hosts.get_sample_sum(), 2.0);
    assert_eq!(
        w.metrics.commit_samples.get_sample_sum(),
        samples_of(5) as f64
    );
}

#[tokio::test]
async fn a_second_request_of_a_host_waits_for_the_next_group_in_order() {
    let pg = TestPg::start().await.expect("postgres");
    let store = pg.store().await.expect("store");
    let w = writer(&store, 1);
    let a = registered(&store, "gpu-a").await;
    let b = registered(&store, "gpu-b").await;
    let start = start_ms();
    // Two connections of gpu-a (an old one and its successor resending) and gpu-b.
    let (first, second, other) = tokio::join!(
        w.writer.ingest(
            "gpu-a".to_owned(),
            Arc::new(batches(0, 1..=3, start)),
            a.clone()
        ),
        w.writer.ingest(
            "gpu-a".to_owned(),
            Arc::new(batches(0, 2..=5, start)),
            a.clone()
        ),
        w.writer.ingest(
            "gpu-b".to_owned(),
            Arc::new(batches(1, 1..=1, start)),
            b.clone()
        ),
    );
    let first = first.expect("first request");
    let second = second.expect("second request");
    let other = other.expect("gpu-b");
    assert_eq!(
        (first.cursor, first.batches_stored, first.batches_duplicate),
        (3, 3, 0)
    );
    // Applied after the first: 2 and 3 are duplicates.
    assert_eq!(
        (
            second.cursor,
            second.batches_stored,
            second.batches_duplicate
        ),
        (5, 2, 2)
    );
    assert_eq!(other.cursor, 1);
    // {gpu-a first, gpu-b}, then {gpu-a second}.
    assert_eq!(w.metrics.commits.get(), 2);
    assert_eq!(w.metrics.commit_hosts.get_sample_sum(), 3.0);
    assert_eq!(host_samples(&store, &a).await, (samples_of(5) as i64, 0));
    assert_eq!(
        cursor_row(&store, "gpu-a").await,
        Some((5, samples_of(5) as i64, 0))
    );
}

/// Overlapping hosts, each group in its own order, resends in every item: the groups
/// must all commit (a deadlock would surface as an error from PostgreSQL's detector)
/// and every row must be stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_groups_over_overlapping_hosts_do_not_deadlock_and_store_once() {
    const HOSTS: u32 = 8;
    const TASKS: u32 = 4;
    const ROUNDS: u64 = 12;
    let pg = TestPg::start().await.expect("postgres");
    let store = pg.store().await.expect("store");
    let hosts: Vec<String> = (0..HOSTS).map(|h| format!("gpu-{h:02}")).collect();
    let mut maps = Vec::new();
    for (h, host) in hosts.iter().enumerate() {
        // Half the hosts never said Hello: concurrent groups create their cursor rows.
        if h % 2 == 0 {
            store
                .record_hello(&hello(host), Utc::now())
                .await
                .expect("hello");
        }
        maps.push(Arc::new(
            store
                .register_series(host, &series_defs())
                .await
                .expect("series"),
        ));
    }
    let start = start_ms();
    let t = now_ms();
    let event_at = move |host_no: u32, seq: u64| t - 600_000 + host_no as i64 * 1_000 + seq as i64;

    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..TASKS {
        let store = store.clone();
        let hosts = hosts.clone();
        let maps = maps.clone();
        tasks.spawn(async move {
            for round in 1..=ROUNDS {
                // Six of the eight hosts, starting at a different host per task and
                // round, in reverse order for odd tasks.
                let mut members: Vec<u32> = (0..6)
                    .map(|k| (task * 3 + round as u32 + k) % HOSTS)
                    .collect();
                if task % 2 == 1 {
                    members.reverse();
                }
                // Every item carries batches 1..=round+task: mostly resends.
                let last = round + u64::from(task);
                let owned: Vec<(u32, Vec<Batch>)> = members
                    .iter()
                    .map(|&h| {
                        let mut bs = batches(h, 1..=last, start);
                        for b in &mut bs {
                            b.events = vec![state_event(event_at(h, b.seq), ComponentState::Ready)];
                        }
                        (h, bs)
                    })
                    .collect();
                let items: Vec<IngestItem<'_>> = owned
                    .iter()
                    .map(|(h, bs)| IngestItem {
                        host: &hosts[*h as usize],
                        batches: bs,
                        series: &maps[*h as usize],
                    })
                    .collect();
                let outcomes = store
                    .ingest_group(&items)
                    .await
                    .unwrap_or_else(|e| panic!("task {task} round {round}: {e}"));
                for outcome in outcomes {
                    assert!(outcome.cursor >= last, "cursor covers what was sent");
                }
            }
        });
    }
    let all = async {
        while let Some(joined) = tasks.join_next().await {
            joined.expect("group task");
        }
    };
    tokio::time::timeout(Duration::from_secs(120), all)
        .await
        .expect("every group committed within 2 minutes");

    // What was sent per host: the highest `last` of any group it was in.
    let mut highest = vec![0u64; HOSTS as usize];
    for task in 0..TASKS {
        for round in 1..=ROUNDS {
            for k in 0..6 {
                let h = ((task * 3 + round as u32 + k) % HOSTS) as usize;
                highest[h] = highest[h].max(round + u64::from(task));
            }
        }
    }
    for (h, host) in hosts.iter().enumerate() {
        let n = highest[h];
        let samples = samples_of(n) as i64;
        assert_eq!(
            host_samples(&store, &maps[h]).await,
            (samples, 0),
            "{host}: every sample once"
        );
        assert_eq!(
            cursor_row(&store, host).await,
            Some((n as i64, samples, n as i64)),
            "{host}: cursor and totals"
        );
        assert_eq!(host_events(&store, host).await, n as i64, "{host}: events");
    }
}

/// The same through the group writer: four writers, two concurrent connections per host
/// sending overlapping ranges, many hosts at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_writers_with_two_connections_per_host_store_everything_once() {
    const HOSTS: u32 = 12;
    const BATCHES: u64 = 20;
    let pg = TestPg::start().await.expect("postgres");
    let store = pg.store().await.expect("store");
    let w = writer(&store, 4);
    let mut maps = Vec::new();
    for h in 0..HOSTS {
        maps.push(registered(&store, &format!("gpu-{h:02}")).await);
    }
    let start = start_ms();
    let mut tasks = tokio::task::JoinSet::new();
    for h in 0..HOSTS {
        for conn in 0..2u64 {
            let writer = w.writer.clone();
            let map = maps[h as usize].clone();
            let store = store.clone();
            tasks.spawn(async move {
                // One write in flight per connection, in order, 2-3 batches per write.
                // The second connection is a successor welcomed at the cursor stored
                // when it starts: it resends from there, overlapping what the first one
                // still has in flight (an agent never skips past its welcome cursor).
                let mut next = 1;
                if conn == 1 {
                    let at = store.cursor(&format!("gpu-{h:02}")).await.expect("cursor");
                    next = at + 1;
                }
                while next <= BATCHES {
                    let last = (next + 1 + (next % 2)).min(BATCHES);
                    let outcome = writer
                        .ingest(
                            format!("gpu-{h:02}"),
                            Arc::new(batches(h, next..=last, start)),
                            map.clone(),
                        )
                        .await
                        .unwrap_or_else(|e| panic!("gpu-{h:02} {next}..={last}: {e}"));
                    assert!(outcome.cursor >= last);
                    next = last + 1;
                }
            });
        }
    }
    let all = async {
        while let Some(joined) = tasks.join_next().await {
            joined.expect("connection task");
        }
    };
    tokio::time::timeout(Duration::from_secs(120), all)
        .await
        .expect("every request answered within 2 minutes");
    for h in 0..HOSTS {
        let host = format!("gpu-{h:02}");
        assert_eq!(
            host_samples(&store, &maps[h as usize]).await,
            (samples_of(BATCHES) as i64, 0),
            "{host}: every sample once"
        );
        assert_eq!(
            store.cursor(&host).await.expect("cursor"),
            BATCHES,
            "{host}"
        );
    }
    let stored: f64 = w.metrics.commit_samples.get_sample_sum();
    assert_eq!(stored, samples_of(BATCHES) as f64 * f64::from(HOSTS));
    eprintln!(
        "{} commits for {} hosts' writes, {:.1} hosts per commit on average",
        w.metrics.commits.get(),
        HOSTS * 2,
        w.metrics.commit_hosts.get_sample_sum() / w.metrics.commits.get().max(1) as f64
    );
}

/// Batch `seq` of 3 series × `points` samples, one per millisecond: big enough that its
/// `COPY` is seen running.
fn big_batch(seq: u64, points: u32, start_ms: i64) -> Batch {
    Batch {
        seq,
        base_ts_ms: start_ms + (seq as i64) * 60_000,
        series: series_defs()
            .iter()
            .map(|d| SeriesPoints {
                series: d.id,
                points: (0..points).map(|k| (k, f64::from(k))).collect(),
            })
            .collect(),
        events: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_slots_bound_the_copies_running_at_once() {
    const HOSTS: u32 = 8;
    const BATCHES: u64 = 6;
    const POINTS: u32 = 4_000;
    let pg = TestPg::start().await.expect("postgres");
    let store = pg.store().await.expect("store");
    let w = writer_with(
        &store,
        GroupConfig {
            writers: 4,
            copy_slots: 1,
            max_hosts: 2,
            ..GroupConfig::default()
        },
    );
    let mut maps = Vec::new();
    for h in 0..HOSTS {
        maps.push(registered(&store, &format!("gpu-{h:02}")).await);
    }
    let start = start_ms();

    // Watches the database's own view of running statements while the hosts write.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (store, done) = (store.clone(), done.clone());
        tokio::spawn(async move {
            let (mut most, mut seen) = (0i64, 0u64);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let running: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE state = 'active' AND query LIKE 'COPY samples%'
                       AND pid <> pg_backend_pid()",
                )
                .fetch_one(store.pool())
                .await
                .expect("pg_stat_activity");
                most = most.max(running);
                seen += u64::from(running > 0);
            }
            (most, seen)
        })
    };
    let mut tasks = tokio::task::JoinSet::new();
    for h in 0..HOSTS {
        let (writer, map) = (w.writer.clone(), maps[h as usize].clone());
        tasks.spawn(async move {
            for seq in 1..=BATCHES {
                let outcome = writer
                    .ingest(
                        format!("gpu-{h:02}"),
                        Arc::new(vec![big_batch(seq, POINTS, start)]),
                        map.clone(),
                    )
                    .await
                    .unwrap_or_else(|e| panic!("gpu-{h:02} batch {seq}: {e}"));
                assert_eq!(outcome.cursor, seq);
            }
        });
    }
    let all = async {
        while let Some(joined) = tasks.join_next().await {
            joined.expect("host task");
        }
    };
    tokio::time::timeout(Duration::from_secs(120), all)
        .await
        .expect("every request answered within 2 minutes");
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (most, seen) = watcher.await.expect("watcher");
    assert!(
        seen > 0,
        "the watcher saw no COPY running: it proves nothing"
    );
    assert_eq!(most, 1, "COPYs running at once with one slot");
    for (h, map) in maps.iter().enumerate() {
        assert_eq!(
            host_samples(&store, map).await,
            (i64::from(3 * POINTS) * BATCHES as i64, 0),
            "gpu-{h:02}: every sample once"
        );
    }
}
