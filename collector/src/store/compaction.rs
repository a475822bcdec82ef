//! Compaction: settled raw samples move into per-series 10-minute chunks, with their
//! 1-minute rollups, one transaction per window.
//!
//! Each window is one `REPEATABLE READ` transaction: it reads the window's raw rows,
//! merges them with any chunk already stored for the window (late data after a long
//! disconnect), upserts chunks and rollups, and deletes exactly the raw rows it read
//! (rows committed after its snapshot are invisible to the `DELETE` and stay for the
//! next run). A crash anywhere rolls the window back whole: nothing lost, nothing
//! doubled. Two compactors cannot both move a window: one holds the window's advisory
//! lock, and a snapshot that raced a commit fails with a serialisation error instead
//! of writing twice.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use sqlx::Row;

use super::codec::{decode_points, encode_points, encode_rollups, rollup};
use super::{day_of, Store, StoreError, WINDOW_MS};

/// Advisory lock key held by the transaction compacting a window.
const COMPACTION_LOCK: i64 = super::locks::COMPACTION;
/// Retries of a window whose transaction hit a serialisation failure.
const MAX_RETRIES: u32 = 5;
const DAY_MS: i64 = 86_400_000;

/// What one [`Store::compact`] call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompactionReport {
    /// Windows whose raw rows were moved.
    pub windows: u32,
    /// Raw samples moved into chunks.
    pub samples: u64,
    /// Chunk rows written (inserted or merged).
    pub chunks: u64,
    /// Another compactor held the lock, so this call stopped early.
    pub contended: bool,
    /// Raw partitions of past days emptied by compaction and truncated.
    pub partitions_truncated: u32,
    /// The raw table was vacuumed after rows moved out of it.
    pub vacuumed: bool,
}

enum WindowResult {
    Moved { samples: u64, chunks: u64 },
    Empty,
    Contended,
}

impl Store {
    /// Moves every raw sample in a 10-minute window that ends at or before `cutoff`
    /// into chunks and rollups. Call it periodically with `now - settle` (e.g. 15 min).
    pub async fn compact(&self, cutoff: DateTime<Utc>) -> Result<CompactionReport, StoreError> {
        let limit = cutoff.timestamp_millis().div_euclid(WINDOW_MS) * WINDOW_MS;
        let mut report = CompactionReport::default();
        let Some(limit_ts) = DateTime::from_timestamp_millis(limit) else {
            return Ok(report);
        };
        let oldest: Option<DateTime<Utc>> =
            sqlx::query_scalar("SELECT min(ts) FROM samples WHERE ts < $1")
                .bind(limit_ts)
                .fetch_one(&self.pool)
                .await?;
        if let Some(oldest) = oldest {
            let mut window = oldest.timestamp_millis().div_euclid(WINDOW_MS) * WINDOW_MS;
            'windows: while window < limit {
                let mut attempt = 0;
                loop {
                    match self.compact_window(window).await {
                        Ok(WindowResult::Moved { samples, chunks }) => {
                            report.windows += 1;
                            report.samples += samples;
                            report.chunks += chunks;
                        }
                        Ok(WindowResult::Empty) => {}
                        Ok(WindowResult::Contended) => {
                            report.contended = true;
                            break 'windows;
                        }
                        Err(StoreError::Db(e))
                            if is_serialization_failure(&e) && attempt < MAX_RETRIES =>
                        {
                            attempt += 1;
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                    break;
                }
                window += WINDOW_MS;
            }
        }
        if !report.contended {
            report.partitions_truncated = self.truncate_emptied_partitions(limit).await?;
        }
        if report.windows > 0 {
            // The moved rows are dead tuples in the current day's raw partition: vacuum
            // now so new samples reuse that space instead of growing the file (autovacuum
            // would get there too, but later and after the table had grown). Pages that
            // are all-visible are skipped, so this costs about the rows just moved.
            sqlx::raw_sql("VACUUM (SKIP_LOCKED) samples")
                .execute(&self.pool)
                .await?;
            report.vacuumed = true;
        }
        Ok(report)
    }

    async fn compact_window(&self, window: i64) -> Result<WindowResult, StoreError> {
        let (Some(start), Some(end)) = (
            DateTime::from_timestamp_millis(window),
            DateTime::from_timestamp_millis(window + WINDOW_MS),
        ) else {
            return Ok(WindowResult::Empty);
        };
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ")
            .await?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(COMPACTION_LOCK)
            .fetch_one(&mut *tx)
            .await?;
        if !locked {
            tx.rollback().await?;
            return Ok(WindowResult::Contended);
        }
        // COPY takes no parameters: the bounds are formatted from integers.
        let statement = format!(
            "COPY (SELECT series_id, ts, value FROM samples \
             WHERE ts >= '{}' AND ts < '{}') TO STDOUT (FORMAT binary)",
            start.format("%Y-%m-%dT%H:%M:%S%.3fZ"),
            end.format("%Y-%m-%dT%H:%M:%S%.3fZ"),
        );
        let mut raw_bytes = Vec::new();
        {
            let mut stream = tx.copy_out_raw(&statement).await?;
            while let Some(chunk) = stream.try_next().await? {
                raw_bytes.extend_from_slice(&chunk);
            }
        }
        let mut rows = parse_sample_copy(&raw_bytes).map_err(|what| {
            StoreError::Db(sqlx::Error::Protocol(format!(
                "COPY OUT of samples: {what}"
            )))
        })?;
        drop(raw_bytes);
        if rows.is_empty() {
            tx.rollback().await?;
            return Ok(WindowResult::Empty);
        }
        let read = rows.len() as u64;
        rows.sort_by_key(|r| (r.0, r.1));

        let mut series_ids: Vec<i64> = rows.iter().map(|r| r.0).collect();
        series_ids.dedup();
        let existing_rows = sqlx::query(
            "SELECT series_id, data FROM sample_chunks
             WHERE window_start = $1 AND series_id = ANY($2)",
        )
        .bind(start)
        .bind(&series_ids)
        .fetch_all(&mut *tx)
        .await?;
        let mut existing: HashMap<i64, Vec<(i64, f64)>> = HashMap::new();
        for row in existing_rows {
            let id: i64 = row.try_get(0)?;
            let data: Vec<u8> = row.try_get(1)?;
            let points = decode_points(&data).map_err(|source| StoreError::Corrupt {
                series_id: id,
                source,
            })?;
            existing.insert(id, points);
        }

        let mut ids = Vec::with_capacity(series_ids.len());
        let mut counts = Vec::with_capacity(series_ids.len());
        let mut chunks = Vec::with_capacity(series_ids.len());
        let mut rollups = Vec::with_capacity(series_ids.len());
        let mut merged: Vec<(i64, f64)> = Vec::new();
        for group in rows.chunk_by(|a, b| a.0 == b.0) {
            let id = group[0].0;
            merged.clear();
            if let Some(old) = existing.remove(&id) {
                merged.extend(old);
            }
            merged.extend(group.iter().map(|&(_, ts, v)| (ts - window, v)));
            // Stable: earlier stored points keep their place among equal timestamps.
            merged.sort_by_key(|p| p.0);
            ids.push(id);
            counts.push(merged.len() as i32);
            chunks.push(encode_points(&merged));
            rollups.push(encode_rollups(&rollup(&merged)));
        }
        sqlx::query(
            "INSERT INTO sample_chunks (series_id, window_start, n, data)
             SELECT s, $2, n, d FROM UNNEST($1::int8[], $3::int4[], $4::bytea[]) AS c(s, n, d)
             ON CONFLICT (series_id, window_start) DO UPDATE SET n = EXCLUDED.n, data = EXCLUDED.data",
        )
        .bind(&ids)
        .bind(start)
        .bind(&counts)
        .bind(&chunks)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO rollups_1m (series_id, window_start, data)
             SELECT s, $2, d FROM UNNEST($1::int8[], $3::bytea[]) AS r(s, d)
             ON CONFLICT (series_id, window_start) DO UPDATE SET data = EXCLUDED.data",
        )
        .bind(&ids)
        .bind(start)
        .bind(&rollups)
        .execute(&mut *tx)
        .await?;
        let deleted = sqlx::query("DELETE FROM samples WHERE ts >= $1 AND ts < $2")
            .bind(start)
            .bind(end)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if deleted != read {
            // Cannot happen under REPEATABLE READ; refuse rather than lose a sample.
            tx.rollback().await?;
            return Err(StoreError::Db(sqlx::Error::Protocol(format!(
                "compaction of window {start}: read {read} raw samples but would delete {deleted}"
            ))));
        }
        tx.commit().await?;
        Ok(WindowResult::Moved {
            samples: read,
            chunks: ids.len() as u64,
        })
    }

    /// Truncates raw partitions of whole days before `limit` that compaction emptied
    /// (their space returns to the filesystem at once). Skips a busy partition.
    async fn truncate_emptied_partitions(&self, limit: i64) -> Result<u32, StoreError> {
        let today_before_limit = day_of(limit);
        let mut truncated = 0;
        for (table, day) in self.partitions().await? {
            if !table.starts_with("samples_p")
                || (day + 1) * DAY_MS > limit
                || day >= today_before_limit
            {
                continue;
            }
            let mut tx = self.pool.begin().await?;
            let locked = sqlx::query(&format!(
                "LOCK TABLE \"{table}\" IN ACCESS EXCLUSIVE MODE NOWAIT"
            ))
            .execute(&mut *tx)
            .await;
            if locked.is_err() {
                tx.rollback().await?;
                continue;
            }
            let empty: bool =
                sqlx::query_scalar(&format!("SELECT NOT EXISTS (SELECT 1 FROM \"{table}\")"))
                    .fetch_one(&mut *tx)
                    .await?;
            let size: i64 = sqlx::query_scalar("SELECT pg_relation_size($1::regclass)")
                .bind(&table)
                .fetch_one(&mut *tx)
                .await?;
            if empty && size > 0 {
                sqlx::query(&format!("TRUNCATE \"{table}\""))
                    .execute(&mut *tx)
                    .await?;
                truncated += 1;
            }
            tx.commit().await?;
        }
        Ok(truncated)
    }
}

fn is_serialization_failure(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("40001") || db.code().as_deref() == Some("40P01"))
}

/// Parses a binary COPY stream of `(int8, timestamptz, float8)` rows into
/// `(series_id, unix ms, value)`.
fn parse_sample_copy(data: &[u8]) -> Result<Vec<(i64, i64, f64)>, &'static str> {
    const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;
    if data.is_empty() {
        return Ok(Vec::new());
    }
    let header = data.get(..19).ok_or("short header")?;
    if &header[..11] != b"PGCOPY\n\xff\r\n\0" {
        return Err("bad signature");
    }
    let ext = i32::from_be_bytes([header[15], header[16], header[17], header[18]]);
    let mut pos = 19usize
        .checked_add(usize::try_from(ext).map_err(|_| "bad header")?)
        .ok_or("bad header")?;
    let mut rows = Vec::with_capacity(data.len() / 38);
    let field = |pos: &mut usize| -> Result<[u8; 8], &'static str> {
        let len = data.get(*pos..*pos + 4).ok_or("truncated")?;
        if len != 8i32.to_be_bytes() {
            return Err("unexpected field length");
        }
        let bytes = data.get(*pos + 4..*pos + 12).ok_or("truncated")?;
        *pos += 12;
        let mut out = [0u8; 8];
        out.copy_from_slice(bytes);
        Ok(out)
    };
    loop {
        let count = data.get(pos..pos + 2).ok_or("missing trailer")?;
        let count = i16::from_be_bytes([count[0], count[1]]);
        pos += 2;
        if count == -1 {
            return Ok(rows);
        }
        if count != 3 {
            return Err("unexpected field count");
        }
        let id = i64::from_be_bytes(field(&mut pos)?);
        let ts_us = i64::from_be_bytes(field(&mut pos)?);
        let value = f64::from_bits(u64::from_be_bytes(field(&mut pos)?));
        rows.push((id, (ts_us + PG_EPOCH_OFFSET_US).div_euclid(1000), value));
    }
}
