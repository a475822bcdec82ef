//! The collector's PostgreSQL store: schema migrations, hosts and sessions, component
//! states, GPU inventory, the series dictionary, telemetry ingest (exactly once through
//! a per-agent cursor), compaction of settled samples into compact chunks with 1-minute
//! rollups, queries over both, and retention by whole daily partitions.
//!
//! Row types here are the store's own; the protocol's types are converted at this edge.

pub mod audit;
mod boundary;
mod codec;
mod compaction;
mod copy;
mod ingest;
pub mod locks;
mod partitions;
mod query;
pub mod tokens;

pub use boundary::{IngestRules, Reason, Refusals, Window};
pub use codec::CodecError;
pub use compaction::CompactionReport;
pub use ingest::{Checked, IngestItem, IngestOutcome};
pub use query::{Point, Rollup};

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use std::borrow::Cow;

use boundary::{clean, MAX_LABELS, MAX_NAME_BYTES, MAX_SERIES_KEY_BYTES};
use chrono::{DateTime, Utc};
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use razar_shared::protocol::{ComponentInfo, GpuInfo, Hello, Inventory, SeriesDef, UnixMillis};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::Row;

/// Samples are compacted per series and window of this length.
pub const WINDOW_MS: i64 = 10 * 60 * 1000;

/// A database series id (the agent's own ids are `u32`, mapped per host).
pub type SeriesId = i64;

/// An agent's series ids mapped to database ids ([`Store::register_series`]). Looked up
/// for every sample stored, so it hashes with FxHash rather than SipHash: the keys come
/// from an authenticated agent's own definitions and only ever collide within its map.
pub type SeriesMap = HashMap<u32, SeriesId, rustc_hash::FxBuildHasher>;

/// The id a [`SeriesMap`] gives a series the store refused (over the host's cap, key too
/// large): its samples are refused and counted. Database ids start at 1.
pub const REFUSED_SERIES: SeriesId = 0;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database refused or could not be reached.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// Applying the embedded migrations failed.
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The store's counters could not be created.
    #[error("metrics: {0}")]
    Metrics(prometheus::Error),
    /// The database URL does not parse.
    #[error("database URL: {0}")]
    Url(String),
    /// A batch references a series the agent never defined on this connection.
    #[error("host {host}: batch {seq} references undefined series {series}")]
    UnknownSeries { host: String, seq: u64, series: u32 },
    /// A batch sequence number above what the cursor column holds (`i64::MAX`).
    #[error("host {host}: batch sequence {seq} out of range")]
    SeqOutOfRange { host: String, seq: u64 },
    /// Stored encoded samples do not decode.
    #[error("series {series_id}: {source}")]
    Corrupt {
        series_id: SeriesId,
        source: CodecError,
    },
}

impl StoreError {
    /// Whether the database refused the data itself (SQLSTATE class 22, 23 or 54), so
    /// that retrying the same data cannot succeed.
    pub fn is_data_error(&self) -> bool {
        match self {
            StoreError::Db(sqlx::Error::Database(e)) => e
                .code()
                .is_some_and(|code| boundary::is_data_error_code(&code)),
            _ => false,
        }
    }
}

/// What the store boundary counts (created with the store; exported once registered
/// with [`Store::register_metrics`]). Counted after the commit that stored the rest.
#[derive(Debug, Clone)]
pub struct StoreMetrics {
    /// `razar_collector_values_refused_total{reason}`: agent values refused by rule.
    pub values_refused: IntCounterVec,
    /// `razar_collector_texts_cleaned_total`: agent text fields changed to be storable.
    pub texts_cleaned: IntCounter,
    /// `razar_collector_batches_rejected_total`: batches set aside in `rejected_batches`.
    pub batches_rejected: IntCounter,
    /// `razar_collector_brin_ranges_summarized_total`: BRIN block ranges of the raw
    /// samples summarized on demand (see [`Store::summarize_new_ranges`]).
    pub ranges_summarized: IntCounter,
}

impl StoreMetrics {
    fn new() -> Result<StoreMetrics, prometheus::Error> {
        let m = StoreMetrics {
            values_refused: IntCounterVec::new(
                Opts::new(
                    "razar_collector_values_refused_total",
                    "Agent values the store refused by rule (by reason); the rest of their batch is stored.",
                ),
                &["reason"],
            )?,
            texts_cleaned: IntCounter::new(
                "razar_collector_texts_cleaned_total",
                "Agent text fields stored cleaned (NUL replaced, cut to their length cap).",
            )?,
            batches_rejected: IntCounter::new(
                "razar_collector_batches_rejected_total",
                "Batches the database refused alone with a data error: set aside in rejected_batches and acknowledged.",
            )?,
            ranges_summarized: IntCounter::new(
                "razar_collector_brin_ranges_summarized_total",
                "BRIN block ranges of the raw samples summarized while history is read (the series index's new pages).",
            )?,
        };
        // Every reason exported from the start, at zero.
        for reason in Reason::ALL {
            m.values_refused.with_label_values(&[reason.code()]);
        }
        Ok(m)
    }

    /// Counts what one committed write refused or cleaned.
    pub(crate) fn count(&self, refusals: &Refusals) {
        for (reason, n) in refusals.iter() {
            self.values_refused
                .with_label_values(&[reason.code()])
                .inc_by(n);
        }
        self.texts_cleaned.inc_by(refusals.texts_cleaned);
    }

    /// Refused values of `reason` counted so far.
    pub fn refused(&self, reason: Reason) -> u64 {
        self.values_refused
            .with_label_values(&[reason.code()])
            .get()
    }
}

/// A handle on the store; cheap to clone (a connection pool inside).
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    /// Days whose partitions are known to exist.
    days: std::sync::Arc<Mutex<HashSet<i64>>>,
    /// What the store refuses of agents' values.
    rules: IngestRules,
    metrics: StoreMetrics,
    /// When a read by series last touched the raw samples (see [`TailReads`]).
    tail_reads: std::sync::Arc<TailReads>,
    /// When `series` was last analyzed after new series (see
    /// [`Store::analyze_series_soon`]).
    series_analyzed: std::sync::Arc<Mutex<Option<std::time::Instant>>>,
}

/// When raw samples were last read by series, so the collector summarizes the raw
/// samples' BRIN indexes only while someone reads history: summarizing re-reads every
/// new row, a cost worth paying only for readers.
#[derive(Debug, Default)]
pub struct TailReads {
    /// Milliseconds since the Unix epoch of the last read; 0 for never.
    last_ms: std::sync::atomic::AtomicI64,
    /// Woken by the first read after a quiet spell.
    woken: tokio::sync::Notify,
}

impl TailReads {
    /// How long after a read the summarizer keeps the indexes current.
    pub const KEEP_CURRENT_FOR: std::time::Duration = std::time::Duration::from_secs(600);

    /// Records a read at `now_ms`; wakes the summarizer when none came within
    /// [`TailReads::KEEP_CURRENT_FOR`].
    pub fn note(&self, now_ms: i64) {
        let before = self
            .last_ms
            .swap(now_ms, std::sync::atomic::Ordering::Relaxed);
        if !Self::recent(before, now_ms) {
            self.woken.notify_one();
        }
    }

    /// Whether a read came within [`TailReads::KEEP_CURRENT_FOR`] of `now_ms`.
    pub fn active(&self, now_ms: i64) -> bool {
        Self::recent(
            self.last_ms.load(std::sync::atomic::Ordering::Relaxed),
            now_ms,
        )
    }

    fn recent(last_ms: i64, now_ms: i64) -> bool {
        let window = i64::try_from(Self::KEEP_CURRENT_FOR.as_millis()).unwrap_or(i64::MAX);
        last_ms > 0 && now_ms.saturating_sub(last_ms) < window
    }

    /// Resolves at the first read after a quiet spell (or at once if one came since the
    /// last wait).
    pub async fn woken(&self) {
        self.woken.notified().await;
    }
}

/// Where a lost/back transition was recorded: `true` when the state changed.
pub type Transitioned = bool;

impl Store {
    /// Connects a pool of `pool_size` connections (no migration: see [`Store::migrate`]).
    pub async fn connect(url: &str, pool_size: u32) -> Result<Store, StoreError> {
        let options: PgConnectOptions = url
            .parse()
            .map_err(|e: sqlx::Error| StoreError::Url(e.to_string()))?;
        Self::connect_with(options, pool_size).await
    }

    /// Like [`Store::connect`] with parsed options.
    pub async fn connect_with(
        options: PgConnectOptions,
        pool_size: u32,
    ) -> Result<Store, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(pool_size.max(2))
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect_with(options)
            .await?;
        Ok(Store {
            pool,
            days: Default::default(),
            rules: IngestRules::default(),
            metrics: StoreMetrics::new().map_err(StoreError::Metrics)?,
            tail_reads: Default::default(),
            series_analyzed: Default::default(),
        })
    }

    /// The store with these rules for agents' values (the defaults otherwise). Set it
    /// before the ingest starts: the group writer copies the rules.
    pub fn with_rules(mut self, rules: IngestRules) -> Store {
        self.rules = rules;
        self
    }

    /// The rules for agents' values.
    pub fn rules(&self) -> IngestRules {
        self.rules
    }

    /// The store boundary's counters.
    pub fn metrics(&self) -> &StoreMetrics {
        &self.metrics
    }

    /// Registers the store boundary's counters in `registry`.
    pub fn register_metrics(&self, registry: &Registry) -> Result<(), prometheus::Error> {
        registry.register(Box::new(self.metrics.values_refused.clone()))?;
        registry.register(Box::new(self.metrics.texts_cleaned.clone()))?;
        registry.register(Box::new(self.metrics.batches_rejected.clone()))?;
        registry.register(Box::new(self.metrics.ranges_summarized.clone()))?;
        Ok(())
    }

    /// Applies the embedded migrations (idempotent; serialised by an advisory lock, so
    /// several replicas may start at once).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("./migrations").run(&self.pool).await?;
        Ok(())
    }

    /// When raw samples were last read by series.
    pub fn tail_reads(&self) -> &TailReads {
        &self.tail_reads
    }

    /// The pool, for queries the store does not wrap (health checks, tests).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Closes every connection.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Highest batch sequence stored for `host` (0 when none).
    pub async fn cursor(&self, host: &str) -> Result<u64, StoreError> {
        let seq: Option<i64> =
            sqlx::query_scalar("SELECT acked_seq FROM agent_cursors WHERE host_id = $1")
                .bind(host)
                .fetch_optional(&self.pool)
                .await?;
        Ok(seq.and_then(|s| u64::try_from(s).ok()).unwrap_or(0))
    }

    /// Records an accepted `Hello`: upserts the host (online, back from lost if it was),
    /// its components and GPU inventory, creates its cursor; returns the cursor for the
    /// `Welcome`. The host id must be the one from the certificate.
    pub async fn record_hello(&self, hello: &Hello, at: DateTime<Utc>) -> Result<u64, StoreError> {
        let mut refusals = Refusals::default();
        let cleaned = &mut refusals.texts_cleaned;
        let agent_version = clean(&hello.agent_version, MAX_NAME_BYTES, cleaned);
        let profile = clean(&hello.profile, MAX_NAME_BYTES, cleaned);
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO hosts (host_id, first_seen, last_seen, state, agent_version, profile)
             VALUES ($1, $2, $2, 'online', $3, $4)
             ON CONFLICT (host_id) DO UPDATE SET last_seen = $2, agent_version = $3, profile = $4",
        )
        .bind(&hello.host_id)
        .bind(at)
        .bind(agent_version.as_ref())
        .bind(profile.as_ref())
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO agent_cursors (host_id, acked_seq, updated_at) VALUES ($1, 0, $2)
             ON CONFLICT (host_id) DO NOTHING",
        )
        .bind(&hello.host_id)
        .bind(at)
        .execute(&mut *tx)
        .await?;
        upsert_components(
            &mut tx,
            &hello.host_id,
            &hello.components,
            at,
            &mut refusals,
        )
        .await?;
        upsert_gpus(&mut tx, &hello.host_id, &hello.gpus, at, &mut refusals).await?;
        insert_refusal_event(&mut tx, &hello.host_id, at, &refusals, "hello").await?;
        let seq: i64 = sqlx::query_scalar("SELECT acked_seq FROM agent_cursors WHERE host_id = $1")
            .bind(&hello.host_id)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        self.metrics.count(&refusals);
        Ok(u64::try_from(seq).unwrap_or(0))
    }

    /// Records an inventory update of a connected host: its components and GPUs as
    /// they are now, in one transaction. The update is the whole inventory, so
    /// components and GPUs it no longer lists (removed by a reload, gone from the bus)
    /// are deleted.
    pub async fn record_inventory(
        &self,
        host: &str,
        inventory: &Inventory,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut refusals = Refusals::default();
        let mut tx = self.pool.begin().await?;
        // Cleaned as the upserts clean them, so a name with a NUL is neither refused by
        // PostgreSQL here nor deleted by mistake.
        let names: Vec<String> = inventory
            .components
            .iter()
            .map(|c| clean(&c.name, MAX_NAME_BYTES, &mut refusals.texts_cleaned).into_owned())
            .collect();
        sqlx::query("DELETE FROM components WHERE host_id = $1 AND NOT (name = ANY($2::text[]))")
            .bind(host)
            .bind(&names)
            .execute(&mut *tx)
            .await?;
        let indexes: Vec<i32> = inventory
            .gpus
            .iter()
            .map(|g| i32::try_from(g.index).unwrap_or(i32::MAX))
            .collect();
        sqlx::query("DELETE FROM gpus WHERE host_id = $1 AND NOT (gpu_index = ANY($2::int4[]))")
            .bind(host)
            .bind(&indexes)
            .execute(&mut *tx)
            .await?;
        upsert_components(&mut tx, host, &inventory.components, at, &mut refusals).await?;
        upsert_gpus(&mut tx, host, &inventory.gpus, at, &mut refusals).await?;
        insert_refusal_event(&mut tx, host, at, &refusals, "inventory").await?;
        tx.commit().await?;
        self.metrics.count(&refusals);
        Ok(())
    }

    /// Replaces the GPU inventory entries given (upsert by index).
    pub async fn upsert_gpus(
        &self,
        host: &str,
        gpus: &[GpuInfo],
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut refusals = Refusals::default();
        let mut tx = self.pool.begin().await?;
        upsert_gpus(&mut tx, host, gpus, at, &mut refusals).await?;
        insert_refusal_event(&mut tx, host, at, &refusals, "gpu inventory").await?;
        tx.commit().await?;
        self.metrics.count(&refusals);
        Ok(())
    }

    /// Upserts components (state, revision, criticality).
    pub async fn upsert_components(
        &self,
        host: &str,
        components: &[ComponentInfo],
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut refusals = Refusals::default();
        let mut tx = self.pool.begin().await?;
        upsert_components(&mut tx, host, components, at, &mut refusals).await?;
        tx.commit().await?;
        self.metrics.count(&refusals);
        Ok(())
    }

    /// Opens a session row for a new connection; returns its id.
    pub async fn open_session(
        &self,
        host: &str,
        remote_addr: &str,
        protocol_version: u16,
        at: DateTime<Utc>,
    ) -> Result<i64, StoreError> {
        let id = sqlx::query_scalar(
            "INSERT INTO agent_sessions (host_id, connected_at, remote_addr, protocol_version)
             VALUES ($1, $2, $3, $4) RETURNING session_id",
        )
        .bind(host)
        .bind(at)
        .bind(remote_addr)
        .bind(i32::from(protocol_version))
        .fetch_one(&self.pool)
        .await?;
        Ok(id)
    }

    /// Closes a session row (idempotent: the first close time stays).
    pub async fn close_session(
        &self,
        session_id: i64,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE agent_sessions SET disconnected_at = $2
             WHERE session_id = $1 AND disconnected_at IS NULL",
        )
        .bind(session_id)
        .bind(at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Moves `last_seen` forward (heartbeats) for many hosts in one statement.
    pub async fn touch_hosts(&self, hosts: &[String], at: DateTime<Utc>) -> Result<(), StoreError> {
        sqlx::query("UPDATE hosts SET last_seen = GREATEST(last_seen, $2) WHERE host_id = ANY($1)")
            .bind(hosts)
            .bind(at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Hosts recorded `online`.
    pub async fn online_hosts(&self) -> Result<Vec<String>, StoreError> {
        let hosts = sqlx::query_scalar("SELECT host_id FROM hosts WHERE state = 'online'")
            .fetch_all(&self.pool)
            .await?;
        Ok(hosts)
    }

    /// Records a host-level event of the collector's own (`kind`, e.g.
    /// `heartbeats_without_samples`) for the engine to read by its cursor.
    pub async fn record_host_event(
        &self,
        host: &str,
        at: DateTime<Utc>,
        kind: &str,
        severity: &str,
        message: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO events (host_id, ts, severity, subject_kind, subject_id, kind, payload, message)
             SELECT host_id, $2, $3, 'host', NULL, $4, '{}'::jsonb, $5 FROM hosts WHERE host_id = $1",
        )
        .bind(host)
        .bind(at)
        .bind(severity)
        .bind(kind)
        .bind(message)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Marks an online host lost since `at`, with a `host_lost` event. Returns whether
    /// the state changed (false if unknown or already lost).
    pub async fn mark_lost(
        &self,
        host: &str,
        at: DateTime<Utc>,
    ) -> Result<Transitioned, StoreError> {
        self.transition(host, at, "lost").await
    }

    /// Marks a lost host online again, with a `host_back` event. Returns whether the
    /// state changed.
    pub async fn mark_back(
        &self,
        host: &str,
        at: DateTime<Utc>,
    ) -> Result<Transitioned, StoreError> {
        self.transition(host, at, "online").await
    }

    async fn transition(
        &self,
        host: &str,
        at: DateTime<Utc>,
        to: &str,
    ) -> Result<Transitioned, StoreError> {
        let mut tx = self.pool.begin().await?;
        let previous: Option<(String, Option<DateTime<Utc>>)> =
            sqlx::query_as("SELECT state, lost_since FROM hosts WHERE host_id = $1 FOR UPDATE")
                .bind(host)
                .fetch_optional(&mut *tx)
                .await?;
        let Some((state, lost_since)) = previous else {
            return Ok(false);
        };
        if state == to {
            return Ok(false);
        }
        let (kind, severity, message, payload) = if to == "lost" {
            (
                "host_lost",
                "critical",
                "heartbeats stopped: host lost".to_owned(),
                serde_json::json!({ "lost_since": at }),
            )
        } else {
            let down_ms = lost_since.map(|s| (at - s).num_milliseconds());
            (
                "host_back",
                "info",
                "host reconnected".to_owned(),
                serde_json::json!({ "lost_since": lost_since, "down_ms": down_ms }),
            )
        };
        sqlx::query(
            "UPDATE hosts SET state = $2,
                lost_since = CASE WHEN $2 = 'lost' THEN $3 ELSE NULL END
             WHERE host_id = $1",
        )
        .bind(host)
        .bind(to)
        .bind(at)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO events (host_id, ts, severity, subject_kind, subject_id, kind, payload, message)
             VALUES ($1, $2, $3, 'host', NULL, $4, $5, $6)",
        )
        .bind(host)
        .bind(at)
        .bind(severity)
        .bind(kind)
        .bind(payload)
        .bind(message)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Registers series definitions of `host` (upsert, one round trip) and returns the
    /// mapping from the agent's ids to database series ids. Text is cleaned first;
    /// definitions the store refuses by rule (key too large, past the host's series
    /// cap) map to [`REFUSED_SERIES`]: their samples are refused and counted, the rest
    /// is stored, and a `values_refused` event records it.
    pub async fn register_series(
        &self,
        host: &str,
        defs: &[SeriesDef],
    ) -> Result<SeriesMap, StoreError> {
        let mut refusals = Refusals::default();
        // One row per distinct (metric, labels); several agent ids may share it.
        let mut keys: Vec<(String, serde_json::Value)> = Vec::new();
        let mut index: HashMap<(String, String), usize> = HashMap::new();
        let mut agent_ids: Vec<(u32, Option<usize>)> = Vec::with_capacity(defs.len());
        for def in defs {
            let cleaned = &mut refusals.texts_cleaned;
            let metric = clean(&def.metric, MAX_NAME_BYTES, cleaned);
            let labels: Vec<(Cow<'_, str>, Cow<'_, str>)> = def
                .labels
                .iter()
                .take(MAX_LABELS + 1)
                .map(|(k, v)| {
                    (
                        clean(k, MAX_NAME_BYTES, cleaned),
                        clean(v, MAX_NAME_BYTES, cleaned),
                    )
                })
                .collect();
            let size = labels
                .iter()
                .fold(metric.len(), |n, (k, v)| n + k.len() + v.len() + 8);
            if labels.len() > MAX_LABELS || size > MAX_SERIES_KEY_BYTES {
                refusals.add(Reason::SeriesTooLarge, 1);
                agent_ids.push((def.id, None));
                continue;
            }
            let labels: serde_json::Map<String, serde_json::Value> = labels
                .into_iter()
                .map(|(k, v)| (k.into_owned(), serde_json::Value::String(v.into_owned())))
                .collect();
            let labels = serde_json::Value::Object(labels);
            let key = (metric.to_string(), labels.to_string());
            let slot = *index.entry(key).or_insert_with(|| {
                keys.push((metric.into_owned(), labels));
                keys.len() - 1
            });
            agent_ids.push((def.id, Some(slot)));
        }
        let mut by_slot = vec![REFUSED_SERIES; keys.len()];
        let mut added = 0usize;
        let mut tx = self.pool.begin().await?;
        if !keys.is_empty() {
            let metrics: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
            let labels: Vec<&serde_json::Value> = keys.iter().map(|k| &k.1).collect();
            let slots: Vec<i32> = (0..keys.len())
                .map(|i| i32::try_from(i).unwrap_or(i32::MAX))
                .collect();
            let cap = i64::from(self.rules.max_series_per_host);
            // One registration of a host at a time, so that its cap holds.
            sqlx::query("SELECT pg_advisory_xact_lock(7265618, hashtext($1))")
                .bind(host)
                .execute(&mut *tx)
                .await?;
            // Known series keep their ids; new ones are inserted up to the host's cap,
            // in definition order. The input is joined back by its position so the
            // answer maps without parsing; a slot missing from it is over the cap.
            let rows = sqlx::query(
                "WITH input AS (
                     SELECT * FROM UNNEST($2::text[], $3::jsonb[], $4::int4[]) AS i(metric, labels, slot)
                 ), known AS (
                     SELECT input.slot, s.series_id FROM input
                     JOIN series s
                         ON s.host_id = $1 AND s.metric = input.metric AND s.labels = input.labels
                 ), fresh AS (
                     SELECT * FROM input WHERE slot NOT IN (SELECT slot FROM known)
                     ORDER BY slot
                     LIMIT GREATEST(0, $5 - (SELECT count(*) FROM series WHERE host_id = $1))
                 ), upserted AS (
                     INSERT INTO series (host_id, metric, labels)
                     SELECT $1, metric, labels FROM fresh
                     ON CONFLICT (host_id, metric, labels) DO UPDATE SET metric = EXCLUDED.metric
                     RETURNING series_id, metric, labels
                 )
                 SELECT slot, series_id, false FROM known
                 UNION ALL
                 SELECT fresh.slot, upserted.series_id, true FROM fresh JOIN upserted USING (metric, labels)",
            )
            .bind(host)
            .bind(&metrics)
            .bind(&labels)
            .bind(&slots)
            .bind(cap)
            .fetch_all(&mut *tx)
            .await?;
            for row in rows {
                let slot: i32 = row.try_get(0)?;
                let id: i64 = row.try_get(1)?;
                if row.try_get::<bool, _>(2)? {
                    added += 1;
                }
                if let Some(entry) = usize::try_from(slot).ok().and_then(|s| by_slot.get_mut(s)) {
                    *entry = id;
                }
            }
            let over_cap = by_slot.iter().filter(|&&id| id == REFUSED_SERIES).count();
            refusals.add(Reason::SeriesOverCap, over_cap as u64);
        }
        insert_refusal_event(&mut tx, host, Utc::now(), &refusals, "series definitions").await?;
        tx.commit().await?;
        self.metrics.count(&refusals);
        if added > 0 {
            self.analyze_series_soon().await;
        }
        Ok(agent_ids
            .into_iter()
            .map(|(agent_id, slot)| {
                let id = slot.and_then(|s| by_slot.get(s).copied());
                (agent_id, id.unwrap_or(REFUSED_SERIES))
            })
            .collect())
    }
}

impl Store {
    /// Refreshes the planner's statistics of `series` after new series were added, at
    /// most once per [`ANALYZE_SERIES_EVERY`]. Queries that join the raw samples to the
    /// series dictionary (the overview, the fleet metrics) must see how many series
    /// there are: with a fleet's worth of series still counted as none, the planner
    /// probes the samples once per series instead of scanning the window once, and a
    /// 5 ms query takes a minute until autovacuum's next visit. A failure is logged,
    /// not returned: the series themselves are stored.
    async fn analyze_series_soon(&self) {
        {
            let mut last = match self.series_analyzed.lock() {
                Ok(last) => last,
                Err(poisoned) => poisoned.into_inner(),
            };
            if last.is_some_and(|at| at.elapsed() < ANALYZE_SERIES_EVERY) {
                return;
            }
            *last = Some(std::time::Instant::now());
        }
        if let Err(error) = sqlx::query("ANALYZE series").execute(&self.pool).await {
            tracing::warn!(%error, "ANALYZE series after new series");
        }
    }
}

/// Least time between two [`Store::analyze_series_soon`] runs.
const ANALYZE_SERIES_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Records what the store refused of a host's values as one `values_refused` event on
/// the host (nothing when nothing was refused; cleaned text alone is only counted).
pub(crate) async fn insert_refusal_event(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    host: &str,
    at: DateTime<Utc>,
    refusals: &Refusals,
    during: &str,
) -> Result<(), StoreError> {
    if !refusals.any() {
        return Ok(());
    }
    let mut payload = refusals.to_json();
    if let Some(map) = payload.as_object_mut() {
        map.insert("during".to_owned(), during.into());
    }
    sqlx::query(
        "INSERT INTO events (host_id, ts, severity, subject_kind, subject_id, kind, payload, message)
         VALUES ($1, $2, 'warning', 'host', NULL, 'values_refused', $3, $4)",
    )
    .bind(host)
    .bind(at)
    .bind(payload)
    .bind(format!(
        "values refused at the store ({during}): {}",
        refusals.summary()
    ))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn upsert_components(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    host: &str,
    components: &[ComponentInfo],
    at: DateTime<Utc>,
    refusals: &mut Refusals,
) -> Result<(), StoreError> {
    if components.is_empty() {
        return Ok(());
    }
    // One row per name (the last wins), in name order: one statement may not upsert a
    // row twice.
    let mut by_name: std::collections::BTreeMap<Cow<'_, str>, &ComponentInfo> =
        std::collections::BTreeMap::new();
    let mut revisions: HashMap<&str, Cow<'_, str>> = HashMap::new();
    for c in components {
        let name = clean(&c.name, MAX_NAME_BYTES, &mut refusals.texts_cleaned);
        revisions.insert(
            c.name.as_str(),
            clean(&c.revision, MAX_NAME_BYTES, &mut refusals.texts_cleaned),
        );
        by_name.insert(name, c);
    }
    let names: Vec<&str> = by_name.keys().map(|n| n.as_ref()).collect();
    let states: Vec<&str> = by_name.values().map(|c| c.state.as_str()).collect();
    let revisions: Vec<&str> = by_name
        .values()
        .map(|c| revisions.get(c.name.as_str()).map_or("", |r| r.as_ref()))
        .collect();
    let critical: Vec<bool> = by_name.values().map(|c| c.critical).collect();
    sqlx::query(
        "INSERT INTO components (host_id, name, state, revision, critical, updated_at)
         SELECT $1, name, state, revision, critical, $6
         FROM UNNEST($2::text[], $3::text[], $4::text[], $5::bool[]) AS c(name, state, revision, critical)
         ON CONFLICT (host_id, name) DO UPDATE SET state = EXCLUDED.state,
             revision = EXCLUDED.revision, critical = EXCLUDED.critical, updated_at = EXCLUDED.updated_at",
    )
    .bind(host)
    .bind(&names)
    .bind(&states)
    .bind(&revisions)
    .bind(&critical)
    .bind(at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn upsert_gpus(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    host: &str,
    gpus: &[GpuInfo],
    at: DateTime<Utc>,
    refusals: &mut Refusals,
) -> Result<(), StoreError> {
    // One row per index (the last wins); an index the column cannot hold is refused.
    let mut by_index: std::collections::BTreeMap<i32, &GpuInfo> = std::collections::BTreeMap::new();
    for g in gpus {
        match i32::try_from(g.index) {
            Ok(i) => {
                by_index.insert(i, g);
            }
            Err(_) => refusals.add(Reason::GpuIndex, 1),
        }
    }
    if by_index.is_empty() {
        return Ok(());
    }
    let cleaned = &mut refusals.texts_cleaned;
    let index: Vec<i32> = by_index.keys().copied().collect();
    let uuid: Vec<Cow<'_, str>> = by_index
        .values()
        .map(|g| clean(&g.uuid, MAX_NAME_BYTES, cleaned))
        .collect();
    let name: Vec<Cow<'_, str>> = by_index
        .values()
        .map(|g| clean(&g.name, MAX_NAME_BYTES, cleaned))
        .collect();
    let pci: Vec<Cow<'_, str>> = by_index
        .values()
        .map(|g| clean(&g.pci_bus_id, MAX_NAME_BYTES, cleaned))
        .collect();
    let uuid: Vec<&str> = uuid.iter().map(|s| s.as_ref()).collect();
    let name: Vec<&str> = name.iter().map(|s| s.as_ref()).collect();
    let pci: Vec<&str> = pci.iter().map(|s| s.as_ref()).collect();
    let memory: Vec<i64> = by_index
        .values()
        .map(|g| i64::try_from(g.memory_total_bytes).unwrap_or(i64::MAX))
        .collect();
    sqlx::query(
        "INSERT INTO gpus (host_id, gpu_index, uuid, name, pci_bus_id, memory_total_bytes, updated_at)
         SELECT $1, i, u, n, p, m, $7
         FROM UNNEST($2::int4[], $3::text[], $4::text[], $5::text[], $6::int8[]) AS g(i, u, n, p, m)
         ON CONFLICT (host_id, gpu_index) DO UPDATE SET uuid = EXCLUDED.uuid, name = EXCLUDED.name,
             pci_bus_id = EXCLUDED.pci_bus_id, memory_total_bytes = EXCLUDED.memory_total_bytes,
             updated_at = EXCLUDED.updated_at",
    )
    .bind(host)
    .bind(&index)
    .bind(&uuid)
    .bind(&name)
    .bind(&pci)
    .bind(&memory)
    .bind(at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Milliseconds since the Unix epoch → a timestamp, or `None` out of range.
pub(crate) fn from_millis(ms: UnixMillis) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_millis(ms)
}

/// The day number (days since the Unix epoch) holding `ms`.
pub(crate) fn day_of(ms: UnixMillis) -> i64 {
    ms.div_euclid(86_400_000)
}

#[cfg(test)]
mod tests {
    use super::TailReads;

    #[test]
    fn tail_reads_keep_the_summarizer_on_for_a_while_and_wake_it_once_per_quiet_spell() {
        let reads = TailReads::default();
        let window = i64::try_from(TailReads::KEEP_CURRENT_FOR.as_millis()).unwrap();
        let t0 = 1_800_000_000_000;
        assert!(!reads.active(t0), "never read: nothing to keep current");
        reads.note(t0);
        assert!(reads.active(t0));
        assert!(reads.active(t0 + window - 1));
        assert!(!reads.active(t0 + window), "quiet for the whole window");
        // The first read woke it (a permit is stored); a read within the window does not.
        let waker = futures::FutureExt::now_or_never(reads.woken());
        assert!(waker.is_some(), "the first read wakes the summarizer");
        reads.note(t0 + 1_000);
        assert!(futures::FutureExt::now_or_never(reads.woken()).is_none());
        // After a quiet spell, the next read wakes it again.
        reads.note(t0 + 1_000 + window);
        assert!(futures::FutureExt::now_or_never(reads.woken()).is_some());
        assert!(reads.active(t0 + 1_000 + window));
    }
}
