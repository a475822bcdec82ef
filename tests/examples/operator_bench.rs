//! Operator surfaces benchmark (issue 13): with 1,000 hosts (8 GPUs and 3 components
//! each, a few GPUs quarantined) and 24 h of 1 s samples for one GPU metric of one
//! host, measured against the whole collector ([`Service`], real HTTP) on a private
//! PostgreSQL (fsync off, as in the tests):
//!
//! - `GET /api/v1/overview` p50/p99 (the route serves one answer for 1 s, then up to
//!   5 s old while one refresh runs behind the request: a watched overview is answered
//!   from memory and the SQL runs about once a second), next to the bare SQL of
//!   its main query (hosts with their counts and their GPUs' recent values) run on the
//!   same pool every iteration, uncached;
//! - `GET /api/v1/history` over 24 h down to 1,000 points p50/p99, next to the bare SQL
//!   it wraps (the rollup rows, or the raw rows when the answer came from them), while
//!   the fleet's samples keep arriving (half a million rows every 50 reads); the first
//!   read, which finds the raw samples' indexes unsummarized and wakes the collector's
//!   summarizer, is reported on its own with how long the summarizer's first pass took;
//! - the dashboard's fleet page with the 1,000 hosts in headless Chromium: wall time of
//!   `--dump-dom` until the page is rendered (the app's `data-ready` marker checked),
//!   minus the same run on an empty page (Chromium's own start).
//!
//! Every host's GPUs have the last 15 s of four GPU metrics (the overview's window), so
//! the latest-value scan reads what a live fleet of this size would have in it.
//!
//! With `RAZAR_BENCH_EXPLAIN` set, the overview's plan is printed first.
//!
//! Run: `cargo build --release -p razar-tests --example operator_bench && cargo run
//! --release -p razar-tests --example operator_bench -- [HOSTS] [ITERATIONS]` (defaults
//! 1000 and 200). Chromium: `/usr/bin/chromium` or `RAZAR_CHROMIUM`; skipped with a
//! note when absent. Compare runs on one machine.

use anyhow::Context as _;
use razar_collector::api::routes_sql;
use razar_collector::config::{CollectorConfig, Database, TlsPaths};
use razar_collector::service::Service;
use razar_collector::store::tokens::{self, Role};
use razar_tests::ca::TestCa;
use razar_tests::pg::TestPg;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// GPUs per host.
const GPUS: i32 = 8;
/// The host whose GPU 0 utilisation has 24 h of 1 s samples.
const HISTORY_HOST: &str = "host-0000";
const GPU_METRICS: [&str; 4] = [
    "razar_gpu_utilization_ratio",
    "razar_gpu_memory_used_bytes",
    "razar_gpu_temperature_celsius",
    "razar_gpu_power_watts",
];

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let hosts: i32 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1000);
    let iterations: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(200);

    let dir = tempfile::tempdir()?;
    let ca = TestCa::new()?;
    let pg = TestPg::start().await?;
    let store = pg.store().await?;
    let pool = pg.pool().await?;
    let mut c = CollectorConfig::defaults(&dir.path().join("collector"));
    c.http_listen = ([127, 0, 0, 1], 0).into();
    c.quic_listen = ([127, 0, 0, 1], 0).into();
    c.tls = TlsPaths {
        ca: ca.ca_path(),
        cert: ca.collector().cert_path.clone(),
        key: ca.collector().key_path.clone(),
        crl: Some(ca.crl_path()),
    };
    c.database = Database::Url(pg.url());
    c.pool_size = NonZeroU32::new(8).context("nonzero")?;
    // The bench's one token asks as fast as answers come: no rate limit in the way.
    c.api.rate_per_second = 1_000_000;
    c.api.burst = 1_000_000;
    // This run compacts the day itself (below), not the maintenance task meanwhile.
    c.compact_after = Duration::from_secs(30 * 86_400);
    let service = Service::start(c).await?;
    let server = format!("http://{}", service.http_addr());
    let (_, token) = tokens::create(&pool, "bench", Role::Viewer, None, None).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;

    // The fleet.
    let t = Instant::now();
    sqlx::query(
        "SELECT razar_ensure_day(d::date)
         FROM generate_series(current_date - 2, current_date + 1, interval '1 day') d",
    )
    .execute(&pool)
    .await?;
    sqlx::query(
        "INSERT INTO hosts (host_id, first_seen, last_seen, state, lost_since, agent_version, profile)
         SELECT format('host-%s', lpad(i::text, 4, '0')), now() - interval '2 days', now(),
                CASE WHEN i % 100 = 99 THEN 'lost' ELSE 'online' END,
                CASE WHEN i % 100 = 99 THEN now() END, '0.1.0', 'core'
         FROM generate_series(0, $1 - 1) i",
    )
    .bind(hosts)
    .execute(&pool)
    .await?;
    sqlx::query(
        "INSERT INTO components (host_id, name, state, revision, critical, updated_at)
         SELECT h.host_id, c.name,
                CASE WHEN c.name = 'trainer' AND h.host_id LIKE '%7' THEN 'backoff' ELSE 'ready' END,
                'r1', c.name = 'model-server', now()
         FROM hosts h CROSS JOIN (VALUES ('model-server'), ('trainer'), ('exporter')) c(name)",
    )
    .execute(&pool)
    .await?;
    sqlx::query(
        "INSERT INTO gpus (host_id, gpu_index, uuid, name, pci_bus_id, memory_total_bytes, updated_at)
         SELECT h.host_id, g, format('GPU-%s-%s', h.host_id, g), 'NVIDIA H100 80GB HBM3',
                format('0000:%s:00.0', 10 + g), 85899345920, now()
         FROM hosts h CROSS JOIN generate_series(0, $1 - 1) g",
    )
    .bind(GPUS)
    .execute(&pool)
    .await?;
    sqlx::query(
        "INSERT INTO gpu_health (host_id, gpu_uuid, gpu_index, state, cycles, updated_at)
         SELECT host_id, uuid, gpu_index,
                CASE WHEN gpu_index = 0 AND host_id LIKE '%3' THEN 'quarantined'
                     WHEN gpu_index = 1 AND host_id LIKE '%5' THEN 'probation'
                     ELSE 'healthy' END, 0, now()
         FROM gpus",
    )
    .execute(&pool)
    .await?;
    sqlx::query(
        "INSERT INTO series (host_id, metric, labels)
         SELECT g.host_id, m.metric,
                CASE m.metric
                    WHEN 'razar_gpu_utilization_ratio' THEN jsonb_build_object('gpu', g.gpu_index::text, 'engine', 'gpu')
                    WHEN 'razar_gpu_temperature_celsius' THEN jsonb_build_object('gpu', g.gpu_index::text, 'sensor', 'gpu')
                    ELSE jsonb_build_object('gpu', g.gpu_index::text) END
         FROM gpus g CROSS JOIN unnest($1::text[]) WITH ORDINALITY m(metric, n)
         -- A host's series get consecutive ids, as its agent registers them together.
         ORDER BY g.host_id, g.gpu_index, m.n",
    )
    .bind(&GPU_METRICS[..])
    .execute(&pool)
    .await?;
    let history_series: i64 = sqlx::query_scalar(
        "SELECT series_id FROM series
         WHERE host_id = $1 AND metric = 'razar_gpu_utilization_ratio' AND labels->>'gpu' = '0'",
    )
    .bind(HISTORY_HOST)
    .fetch_one(&pool)
    .await?;
    // 24 h of 1 s samples for one GPU metric of one host, compacted into chunks and
    // rollups as the maintenance task does past `compact_after`.
    let now = chrono::Utc::now();
    sqlx::query(
        "INSERT INTO samples (series_id, ts, value)
         SELECT $1, ts, 0.5 + 0.4 * sin(extract(epoch FROM ts) / 600)
         FROM generate_series($2 - interval '24 hours', $2 - interval '16 seconds', interval '1 second') ts",
    )
    .bind(history_series)
    .bind(now)
    .execute(&pool)
    .await?;
    let report = store.compact(now - chrono::Duration::minutes(15)).await?;
    // Planner statistics as a live collector has them: it analyzes `series` as agents
    // register theirs, and autovacuum the rest.
    sqlx::query("ANALYZE hosts, components, gpus, gpu_health, series")
        .execute(&pool)
        .await?;
    println!(
        "fleet: {hosts} hosts, {} GPUs, {} series, 24 h of 1 s samples for one series \
         ({report:?}); built in {:.1} s",
        hosts * GPUS,
        hosts * GPUS * 4,
        t.elapsed().as_secs_f64()
    );

    // The overview, with the last 15 s of every GPU series in the window.
    fill_window(&pool, history_series).await?;
    if std::env::var_os("RAZAR_BENCH_EXPLAIN").is_some() {
        let since = chrono::Utc::now() - routes_sql::OVERVIEW_WINDOW;
        let plan: Vec<String> =
            sqlx::query_scalar(&format!("EXPLAIN {}", routes_sql::OVERVIEW_HOSTS_SQL))
                .bind(since)
                .bind(GPU_METRICS[0])
                .bind(GPU_METRICS[1])
                .fetch_all(&pool)
                .await?;
        println!("{}", plan.join("\n"));
    }
    let overview_url = format!("{server}/api/v1/overview");
    let body: serde_json::Value = http
        .get(&overview_url)
        .bearer_auth(&token)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    println!(
        "overview: hosts {} ({} online), GPUs {} ({} healthy, util avg {}), {} host lines",
        body["hosts"]["total"],
        body["hosts"]["online"],
        body["gpus"]["total"],
        body["gpus"]["healthy"],
        body["gpus"]["utilization_avg"],
        body["host_list"].as_array().map_or(0, Vec::len)
    );
    let mut api = Vec::with_capacity(iterations);
    let mut bare = Vec::with_capacity(iterations);
    for i in 0..iterations {
        if i % 50 == 0 {
            fill_window(&pool, history_series).await?;
        }
        api.push(timed_get(&http, &overview_url, &token).await?);
        let since = chrono::Utc::now() - routes_sql::OVERVIEW_WINDOW;
        let t = Instant::now();
        let rows = sqlx::query(routes_sql::OVERVIEW_HOSTS_SQL)
            .bind(since)
            .bind(GPU_METRICS[0])
            .bind(GPU_METRICS[1])
            .fetch_all(&pool)
            .await?;
        bare.push(t.elapsed());
        anyhow::ensure!(rows.len() == usize::try_from(hosts)?, "one row per host");
    }
    println!("GET /api/v1/overview         {}", summary(&mut api));
    println!("  bare SQL (hosts + latest)  {}", summary(&mut bare));

    // 24 h of history down to 1,000 points.
    let from = now - chrono::Duration::hours(24);
    let history_url = format!(
        "{server}/api/v1/history?metric=razar_gpu_utilization_ratio&host={HISTORY_HOST}\
         &labels=%7B%22gpu%22%3A%220%22%7D&from={}&to={}&points=1000",
        from.format("%Y-%m-%dT%H:%M:%SZ"),
        now.format("%Y-%m-%dT%H:%M:%SZ")
    );
    let t = Instant::now();
    let body: serde_json::Value = http
        .get(&history_url)
        .bearer_auth(&token)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let cold = t.elapsed();
    let source = body["source"].as_str().unwrap_or("?").to_owned();
    println!(
        "history: source {source}, step {} ms, {} points",
        body["step_ms"],
        body["series"][0]["points"].as_array().map_or(0, Vec::len)
    );
    let bare_sql = if source == "raw" {
        "SELECT ts, value FROM samples WHERE series_id = $1 AND ts >= $2 AND ts < $3"
    } else {
        "SELECT window_start, data FROM rollups_1m
         WHERE series_id = $1 AND window_start >= $2 AND window_start < $3"
    };
    // The route reads the rollups and then the raw rows not yet compacted (found through
    // the BRIN indexes on `ts` and `series_id`).
    let tail_sql =
        "SELECT ts, value FROM samples WHERE series_id = $1 AND ts >= $2 AND ts < $3 ORDER BY ts";
    // The raw samples' BRIN indexes are summarized only while history is read: the
    // read above was the first, so it scanned every unsummarized range of the tail and
    // woke the collector's summarizer. Wait for its first pass.
    let summarized = || async {
        let text = http
            .get(format!("{server}/metrics"))
            .send()
            .await?
            .text()
            .await?;
        anyhow::Ok(
            text.lines()
                .find_map(|l| l.strip_prefix("razar_collector_brin_ranges_summarized_total "))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0),
        )
    };
    let t = Instant::now();
    while summarized().await? == 0.0 {
        anyhow::ensure!(t.elapsed() < Duration::from_secs(60), "nothing summarized");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "first history read (a cold tail) {:.1} ms; the summarizer's first pass done {:.0} ms later",
        cold.as_secs_f64() * 1e3,
        t.elapsed().as_secs_f64() * 1e3
    );
    // Ingest goes on while the history is read, two ways: the live fleet's rate (each
    // second, one second of every series: 32,000 rows), and bursts (every 50 reads, 16 s
    // of the fleet's samples at once, half a million rows, as after a mass reconnect).
    for burst in [false, true] {
        let live = (!burst).then(|| live_ingest(&pool, history_series));
        let vacuums_before = autovacuums(&pool).await?;
        let mut api = Vec::with_capacity(iterations);
        let mut bare = Vec::with_capacity(iterations);
        let mut both = Vec::with_capacity(iterations);
        for i in 0..iterations {
            if burst && i % 50 == 25 {
                fill_window(&pool, history_series).await?;
            }
            api.push(timed_get(&http, &history_url, &token).await?);
            let t = Instant::now();
            sqlx::query(bare_sql)
                .bind(history_series)
                .bind(from)
                .bind(now)
                .fetch_all(&pool)
                .await?;
            bare.push(t.elapsed());
            if source != "raw" {
                sqlx::query(tail_sql)
                    .bind(history_series)
                    .bind(from)
                    .bind(now)
                    .fetch_all(&pool)
                    .await?;
                both.push(t.elapsed());
            }
        }
        if let Some(live) = live {
            live.abort();
        }
        let (vacuums, analyzes) = autovacuums(&pool).await?;
        println!(
            "ingest meanwhile: {}; autovacuum on samples meanwhile: {} vacuum(s), {} analyze(s)",
            if burst {
                "bursts of 16 s of the fleet's samples (512,000 rows) every 50 reads"
            } else {
                "the fleet's live rate (32,000 rows each second)"
            },
            vacuums - vacuums_before.0,
            analyzes - vacuums_before.1
        );
        println!("GET /api/v1/history 24 h     {}", summary(&mut api));
        println!("  bare SQL ({source:<9})       {}", summary(&mut bare));
        if !both.is_empty() {
            println!(
                "  bare SQL (rollup_1m + raw tail, the route's two queries) {}",
                summary(&mut both)
            );
        }
    }

    // One host's GPUs with their latest values (the dashboard's host page), while the
    // fleet's samples arrive at its live rate.
    let live = live_ingest(&pool, history_series);
    let gpus_url = format!("{server}/api/v1/hosts/host-0001/gpus");
    let mut took = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let t = Instant::now();
        let gpus: serde_json::Value = http
            .get(&gpus_url)
            .bearer_auth(&token)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        took.push(t.elapsed());
        anyhow::ensure!(
            gpus.as_array().is_some_and(|g| g.len() == 8
                && g.iter()
                    .all(|g| g["values"].as_array().is_some_and(|v| v.len() == 4))),
            "host-0001 shows 8 GPUs with 4 latest values each: {gpus}"
        );
    }
    live.abort();
    println!("GET /api/v1/hosts/H/gpus     {}", summary(&mut took));

    // The fleet page in headless Chromium.
    let chromium = std::env::var_os("RAZAR_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if chromium.is_file() {
        fill_window(&pool, history_series).await?;
        let page = format!("{server}/?nolive#token={token}");
        let runs = 5;
        let mut empty = Vec::new();
        let mut fleet = Vec::new();
        for _ in 0..runs {
            let (d, _) = dump_dom(&chromium, "about:blank").await?;
            empty.push(d);
            let (d, dom) = dump_dom(&chromium, &page).await?;
            anyhow::ensure!(
                dom.contains(r##"data-ready="#/""##),
                "the fleet page did not render"
            );
            anyhow::ensure!(
                dom.matches("class=\"tile ").count() == usize::try_from(hosts)?,
                "the fleet page does not show every host"
            );
            fleet.push(d);
        }
        let median = |v: &mut Vec<Duration>| {
            v.sort();
            v[v.len() / 2]
        };
        let (e, f) = (median(&mut empty), median(&mut fleet));
        println!(
            "dashboard fleet page, {hosts} hosts, headless Chromium --dump-dom (median of {runs}): \
             {:.0} ms, empty page {:.0} ms: rendered in {:.0} ms",
            f.as_secs_f64() * 1e3,
            e.as_secs_f64() * 1e3,
            f.saturating_sub(e).as_secs_f64() * 1e3
        );
    } else {
        println!("dashboard: {} not found; not measured", chromium.display());
    }

    service.shutdown().await;
    store.close().await;
    Ok(())
}

/// The last 15 s of 1 s samples of every GPU series but the history one (whose day
/// already reaches there), in the order 1 s agent batches arrive: each second, every
/// host's series together, hosts in a different order each second.
async fn fill_window(pool: &sqlx::PgPool, history_series: i64) -> anyhow::Result<()> {
    fill(pool, history_series, Duration::from_secs(15)).await
}

/// The last `span` (and this second) of 1 s samples of every GPU series but the
/// history one, in the order 1 s agent batches arrive.
async fn fill(pool: &sqlx::PgPool, history_series: i64, span: Duration) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO samples (series_id, ts, value)
         SELECT s.series_id, ts,
                CASE s.metric WHEN 'razar_gpu_utilization_ratio' THEN random()
                              WHEN 'razar_gpu_memory_used_bytes' THEN 4e10
                              ELSE 50 END
         FROM series s CROSS JOIN generate_series(now() - $2 * interval '1 second', now(), interval '1 second') ts
         WHERE s.series_id <> $1
         ORDER BY ts, hashtext(s.host_id || ts::text), s.series_id",
    )
    .bind(history_series)
    .bind(span.as_secs_f64())
    .execute(pool)
    .await?;
    if span.is_zero() {
        return Ok(());
    }
    sqlx::query("ANALYZE samples").execute(pool).await?;
    Ok(())
}

/// How long a GET of `url` with `token` takes, its body read; an error status fails.
async fn timed_get(http: &reqwest::Client, url: &str, token: &str) -> anyhow::Result<Duration> {
    let t = Instant::now();
    http.get(url)
        .bearer_auth(token)
        .send()
        .await?
        .error_for_status()?
        .bytes()
        .await?;
    Ok(t.elapsed())
}

/// The fleet's live ingest until aborted: each second, one second of every GPU series.
fn live_ingest(
    pool: &sqlx::PgPool,
    history_series: i64,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let pool = pool.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            fill(&pool, history_series, Duration::ZERO).await?;
        }
    })
}

/// Autovacuum and autoanalyze runs so far on the raw samples' partitions.
async fn autovacuums(pool: &sqlx::PgPool) -> anyhow::Result<(i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT coalesce(sum(autovacuum_count), 0)::bigint, coalesce(sum(autoanalyze_count), 0)::bigint
         FROM pg_stat_user_tables WHERE relname LIKE 'samples_p%'",
    )
    .fetch_one(pool)
    .await?)
}

/// Wall time of `chromium --dump-dom URL` and the DOM it printed.
async fn dump_dom(chromium: &std::path::Path, url: &str) -> anyhow::Result<(Duration, String)> {
    let profile = tempfile::tempdir()?;
    let mut cmd = std::process::Command::new(chromium);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--virtual-time-budget=5000",
        "--dump-dom",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .arg(url)
    .stdin(std::process::Stdio::null());
    let t = Instant::now();
    let out = tokio::task::spawn_blocking(move || cmd.output()).await??;
    let took = t.elapsed();
    anyhow::ensure!(out.status.success(), "chromium: {}", out.status);
    Ok((took, String::from_utf8_lossy(&out.stdout).into_owned()))
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
