//! The collector's PostgreSQL store: schema migrations, hosts and sessions, component
//! states, GPU inventory, the series dictionary, telemetry ingest (exactly once through
//! a per-agent cursor), compaction of settled samples into compact chunks with 1-minute
//! rollups, queries over both, and retention by whole daily partitions.
//!
//! Row types here are the store's own; the protocol's types are converted at this edge.

mod codec;
mod compaction;
mod copy;
mod ingest;
mod partitions;
mod query;

pub use codec::CodecError;
pub use compaction::CompactionReport;
pub use ingest::{IngestItem, IngestOutcome};
pub use query::{Point, Rollup};

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
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
    /// The database URL does not parse.
    #[error("database URL: {0}")]
    Url(String),
    /// A batch references a series the agent never defined on this connection.
    #[error("host {host}: batch {seq} references undefined series {series}")]
    UnknownSeries { host: String, seq: u64, series: u32 },
    /// A timestamp outside what PostgreSQL and chrono can represent.
    #[error("host {host}: timestamp {ts_ms} ms out of range")]
    TimestampOutOfRange { host: String, ts_ms: i64 },
    /// Stored encoded samples do not decode.
    #[error("series {series_id}: {source}")]
    Corrupt {
        series_id: SeriesId,
        source: CodecError,
    },
}

/// A handle on the store; cheap to clone (a connection pool inside).
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    /// Days whose partitions are known to exist.
    days: std::sync::Arc<Mutex<HashSet<i64>>>,
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
        })
    }

    /// Applies the embedded migrations (idempotent; serialised by an advisory lock, so
    /// several replicas may start at once).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("./migrations").run(&self.pool).await?;
        Ok(())
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
        Ok(seq.map_or(0, |s| s as u64))
    }

    /// Records an accepted `Hello`: upserts the host (online, back from lost if it was),
    /// its components and GPU inventory, creates its cursor; returns the cursor for the
    /// `Welcome`. The host id must be the one from the certificate.
    pub async fn record_hello(&self, hello: &Hello, at: DateTime<Utc>) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO hosts (host_id, first_seen, last_seen, state, agent_version, profile)
             VALUES ($1, $2, $2, 'online', $3, $4)
             ON CONFLICT (host_id) DO UPDATE SET last_seen = $2, agent_version = $3, profile = $4",
        )
        .bind(&hello.host_id)
        .bind(at)
        .bind(&hello.agent_version)
        .bind(&hello.profile)
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
        upsert_components(&mut tx, &hello.host_id, &hello.components, at).await?;
        upsert_gpus(&mut tx, &hello.host_id, &hello.gpus, at).await?;
        let seq: i64 = sqlx::query_scalar("SELECT acked_seq FROM agent_cursors WHERE host_id = $1")
            .bind(&hello.host_id)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(seq as u64)
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
        let mut tx = self.pool.begin().await?;
        let names: Vec<&str> = inventory
            .components
            .iter()
            .map(|c| c.name.as_str())
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
        upsert_components(&mut tx, host, &inventory.components, at).await?;
        upsert_gpus(&mut tx, host, &inventory.gpus, at).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Replaces the GPU inventory entries given (upsert by index).
    pub async fn upsert_gpus(
        &self,
        host: &str,
        gpus: &[GpuInfo],
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        upsert_gpus(&mut tx, host, gpus, at).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Upserts components (state, revision, criticality).
    pub async fn upsert_components(
        &self,
        host: &str,
        components: &[ComponentInfo],
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        upsert_components(&mut tx, host, components, at).await?;
        tx.commit().await?;
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
    /// mapping from the agent's ids to database series ids.
    pub async fn register_series(
        &self,
        host: &str,
        defs: &[SeriesDef],
    ) -> Result<SeriesMap, StoreError> {
        // One row per distinct (metric, labels); several agent ids may share it.
        let mut keys: Vec<(String, serde_json::Value)> = Vec::new();
        let mut index: HashMap<(String, String), usize> = HashMap::new();
        let mut agent_ids: Vec<(u32, usize)> = Vec::with_capacity(defs.len());
        for def in defs {
            let labels: serde_json::Map<String, serde_json::Value> = def
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect();
            let labels = serde_json::Value::Object(labels);
            let key = (def.metric.clone(), labels.to_string());
            let slot = *index.entry(key).or_insert_with(|| {
                keys.push((def.metric.clone(), labels));
                keys.len() - 1
            });
            agent_ids.push((def.id, slot));
        }
        if keys.is_empty() {
            return Ok(SeriesMap::default());
        }
        let metrics: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
        let labels: Vec<&serde_json::Value> = keys.iter().map(|k| &k.1).collect();
        let slots: Vec<i32> = (0..keys.len() as i32).collect();
        // The input is joined back by its position so the answer maps without parsing.
        let rows = sqlx::query(
            "WITH input AS (
                 SELECT * FROM UNNEST($2::text[], $3::jsonb[], $4::int4[]) AS i(metric, labels, slot)
             ), upserted AS (
                 INSERT INTO series (host_id, metric, labels)
                 SELECT $1, metric, labels FROM input
                 ON CONFLICT (host_id, metric, labels) DO UPDATE SET metric = EXCLUDED.metric
                 RETURNING series_id, metric, labels
             )
             SELECT input.slot, upserted.series_id
             FROM input JOIN upserted USING (metric, labels)",
        )
        .bind(host)
        .bind(&metrics)
        .bind(&labels)
        .bind(&slots)
        .fetch_all(&self.pool)
        .await?;
        let mut by_slot = vec![0i64; keys.len()];
        for row in rows {
            let slot: i32 = row.try_get(0)?;
            let id: i64 = row.try_get(1)?;
            if let Some(entry) = by_slot.get_mut(slot as usize) {
                *entry = id;
            }
        }
        Ok(agent_ids
            .into_iter()
            .map(|(agent_id, slot)| (agent_id, by_slot[slot]))
            .collect())
    }
}

async fn upsert_components(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    host: &str,
    components: &[ComponentInfo],
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    if components.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = components.iter().map(|c| c.name.as_str()).collect();
    let states: Vec<&str> = components.iter().map(|c| c.state.as_str()).collect();
    let revisions: Vec<&str> = components.iter().map(|c| c.revision.as_str()).collect();
    let critical: Vec<bool> = components.iter().map(|c| c.critical).collect();
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
) -> Result<(), StoreError> {
    if gpus.is_empty() {
        return Ok(());
    }
    let index: Vec<i32> = gpus.iter().map(|g| g.index as i32).collect();
    let uuid: Vec<&str> = gpus.iter().map(|g| g.uuid.as_str()).collect();
    let name: Vec<&str> = gpus.iter().map(|g| g.name.as_str()).collect();
    let pci: Vec<&str> = gpus.iter().map(|g| g.pci_bus_id.as_str()).collect();
    let memory: Vec<i64> = gpus
        .iter()
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
