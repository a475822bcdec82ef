//! Reading history back: raw recent samples and compacted chunks merged transparently,
//! from one consistent snapshot (a compaction committing meanwhile is not seen twice).

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::codec::{decode_points, decode_rollups, rollup, MinuteRollup};
use super::{SeriesId, Store, StoreError, WINDOW_MS};

/// One point of a series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// Milliseconds since the Unix epoch (the bucket start when downsampled).
    pub ts_ms: i64,
    pub value: f64,
}

/// One minute of a series, summarised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rollup {
    /// Start of the minute, milliseconds since the Unix epoch.
    pub minute_ms: i64,
    pub min: f64,
    pub max: f64,
    pub avg: f64,
    pub last: f64,
    pub count: u32,
}

impl Store {
    /// Points of a series with `from <= ts < to`, raw and compacted alike. With a
    /// non-zero `step` the points are averaged per bucket of `step` starting at `from`
    /// (each bucket reported at its start); with `Duration::ZERO` every sample is returned.
    pub async fn series_points(
        &self,
        series: SeriesId,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        step: Duration,
    ) -> Result<Vec<Point>, StoreError> {
        let (from_ms, to_ms) = (from.timestamp_millis(), to.timestamp_millis());
        if to_ms <= from_ms {
            return Ok(Vec::new());
        }
        let first_window = from_ms.div_euclid(WINDOW_MS) * WINDOW_MS;
        let Some(first_window_ts) = DateTime::from_timestamp_millis(first_window) else {
            return Ok(Vec::new());
        };
        self.tail_reads.note(Utc::now().timestamp_millis());
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        let chunks = sqlx::query(
            "SELECT window_start, data FROM sample_chunks
             WHERE series_id = $1 AND window_start >= $2 AND window_start < $3
             ORDER BY window_start",
        )
        .bind(series)
        .bind(first_window_ts)
        .bind(to)
        .fetch_all(&mut *tx)
        .await?;
        let raw: Vec<(DateTime<Utc>, f64)> = sqlx::query_as(
            "SELECT ts, value FROM samples WHERE series_id = $1 AND ts >= $2 AND ts < $3",
        )
        .bind(series)
        .bind(from)
        .bind(to)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;

        let mut points: Vec<Point> = Vec::with_capacity(raw.len() + chunks.len() * 600);
        for row in chunks {
            let window: DateTime<Utc> = row.try_get(0)?;
            let data: Vec<u8> = row.try_get(1)?;
            let window = window.timestamp_millis();
            let decoded = decode_points(&data).map_err(|source| StoreError::Corrupt {
                series_id: series,
                source,
            })?;
            points.extend(
                decoded
                    .into_iter()
                    .map(|(offset, value)| Point {
                        ts_ms: window + offset,
                        value,
                    })
                    .filter(|p| p.ts_ms >= from_ms && p.ts_ms < to_ms),
            );
        }
        points.extend(raw.into_iter().map(|(ts, value)| Point {
            ts_ms: ts.timestamp_millis(),
            value,
        }));
        points.sort_by_key(|p| p.ts_ms);
        let step_ms = i64::try_from(step.as_millis()).unwrap_or(i64::MAX);
        if step_ms == 0 {
            return Ok(points);
        }
        let mut out: Vec<Point> = Vec::new();
        let mut bucket: Option<(i64, f64, u32)> = None;
        for p in points {
            let start = from_ms + (p.ts_ms - from_ms) / step_ms * step_ms;
            match &mut bucket {
                Some((b, sum, n)) if *b == start => {
                    *sum += p.value;
                    *n += 1;
                }
                _ => {
                    if let Some((b, sum, n)) = bucket {
                        out.push(Point {
                            ts_ms: b,
                            value: sum / f64::from(n),
                        });
                    }
                    bucket = Some((start, p.value, 1));
                }
            }
        }
        if let Some((b, sum, n)) = bucket {
            out.push(Point {
                ts_ms: b,
                value: sum / f64::from(n),
            });
        }
        Ok(out)
    }

    /// 1-minute rollups of a series for the minutes overlapping `[from, to)`: stored
    /// rollups of compacted windows, computed on the fly for raw samples not yet compacted.
    pub async fn series_rollups(
        &self,
        series: SeriesId,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<Rollup>, StoreError> {
        let (from_ms, to_ms) = (from.timestamp_millis(), to.timestamp_millis());
        if to_ms <= from_ms {
            return Ok(Vec::new());
        }
        let first_window = from_ms.div_euclid(WINDOW_MS) * WINDOW_MS;
        let last_minute_end = (to_ms + 59_999).div_euclid(60_000) * 60_000;
        let (Some(first_window_ts), Some(raw_from), Some(raw_to)) = (
            DateTime::from_timestamp_millis(first_window),
            DateTime::from_timestamp_millis(from_ms.div_euclid(60_000) * 60_000),
            DateTime::from_timestamp_millis(last_minute_end),
        ) else {
            return Ok(Vec::new());
        };
        self.tail_reads.note(Utc::now().timestamp_millis());
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        let stored = sqlx::query(
            "SELECT window_start, data FROM rollups_1m
             WHERE series_id = $1 AND window_start >= $2 AND window_start < $3",
        )
        .bind(series)
        .bind(first_window_ts)
        .bind(to)
        .fetch_all(&mut *tx)
        .await?;
        let raw: Vec<(DateTime<Utc>, f64)> = sqlx::query_as(
            "SELECT ts, value FROM samples WHERE series_id = $1 AND ts >= $2 AND ts < $3 ORDER BY ts",
        )
        .bind(series)
        .bind(raw_from)
        .bind(raw_to)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;

        let mut minutes: BTreeMap<i64, Rollup> = BTreeMap::new();
        let mut add = |window: i64, r: &MinuteRollup| {
            let minute_ms = window + i64::from(r.minute) * 60_000;
            let new = Rollup {
                minute_ms,
                min: r.min,
                max: r.max,
                avg: r.avg,
                last: r.last,
                count: r.count,
            };
            minutes
                .entry(minute_ms)
                .and_modify(|old| {
                    let n = old.count + new.count;
                    old.avg = (old.avg * f64::from(old.count) + new.avg * f64::from(new.count))
                        / f64::from(n);
                    old.min = old.min.min(new.min);
                    old.max = old.max.max(new.max);
                    old.last = new.last;
                    old.count = n;
                })
                .or_insert(new);
        };
        for row in stored {
            let window: DateTime<Utc> = row.try_get(0)?;
            let data: Vec<u8> = row.try_get(1)?;
            let decoded = decode_rollups(&data).map_err(|source| StoreError::Corrupt {
                series_id: series,
                source,
            })?;
            for r in &decoded {
                add(window.timestamp_millis(), r);
            }
        }
        let raw: Vec<(i64, f64)> = raw
            .into_iter()
            .map(|(ts, v)| (ts.timestamp_millis(), v))
            .collect();
        for group in raw.chunk_by(|a, b| a.0.div_euclid(WINDOW_MS) == b.0.div_euclid(WINDOW_MS)) {
            let window = group[0].0.div_euclid(WINDOW_MS) * WINDOW_MS;
            let relative: Vec<(i64, f64)> = group.iter().map(|&(t, v)| (t - window, v)).collect();
            for r in &rollup(&relative) {
                add(window, r);
            }
        }
        Ok(minutes
            .into_values()
            .filter(|r| r.minute_ms + 60_000 > from_ms && r.minute_ms < to_ms)
            .collect())
    }
}
