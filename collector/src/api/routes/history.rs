//! Metric history: any series by metric and labels, bucketed to `step` (or to at most
//! `points` points), decoded in the collector. Steps of a minute or more are served from
//! the 1-minute rollups (24 h of 1 s samples down to 1,000 points reads 1,440 minute
//! summaries per series, not 86,400 rows); finer steps from raw samples and chunks,
//! for ranges up to [`MAX_RAW_RANGE`].

use crate::api::error::{ApiError, ApiQuery};
use crate::api::types::{History, HistoryPoint, HistoryQuery, HistorySeries};
use crate::api::ApiState;
use crate::store::Rollup;
use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use sqlx::types::Json as SqlJson;
use sqlx::Row;
use std::time::Duration;

/// Most points per series.
pub const MAX_POINTS: u32 = 10_000;
/// Default points per series.
pub const DEFAULT_POINTS: u32 = 1_000;
/// Most series one query returns.
pub const MAX_SERIES: i64 = 100;
/// Longest range served from raw samples (finer steps than a minute).
pub const MAX_RAW_RANGE: Duration = Duration::from_secs(6 * 3600);
/// Longest range of a query.
pub const MAX_RANGE: Duration = Duration::from_secs(400 * 86_400);
const MINUTE_MS: i64 = 60_000;

/// What a query resolves to (pure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub from_ms: i64,
    pub to_ms: i64,
    pub step_ms: i64,
    pub rollups: bool,
}

/// Checks a query's range and step and picks the source (pure).
pub fn plan(
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    step: Option<Duration>,
    points: Option<u32>,
) -> Result<Plan, String> {
    let (from_ms, to_ms) = (from.timestamp_millis(), to.timestamp_millis());
    if to_ms <= from_ms {
        return Err("`to` must be after `from`".into());
    }
    let range = to_ms - from_ms;
    if range > i64::try_from(MAX_RANGE.as_millis()).unwrap_or(i64::MAX) {
        return Err(format!(
            "the range is longer than {} days",
            MAX_RANGE.as_secs() / 86_400
        ));
    }
    let points = match points {
        None => DEFAULT_POINTS,
        Some(p @ 1..=MAX_POINTS) => p,
        Some(p) => return Err(format!("points {p} is outside 1..={MAX_POINTS}")),
    };
    let step_ms = match step {
        Some(step) => {
            let ms = i64::try_from(step.as_millis()).map_err(|_| "step is too large")?;
            if ms < 1 {
                return Err("step must be at least 1ms".into());
            }
            if ms > range {
                return Err("step is longer than the range".into());
            }
            if range / ms > i64::from(MAX_POINTS) {
                return Err(format!(
                    "step gives more than {MAX_POINTS} points over the range; use a longer step"
                ));
            }
            ms
        }
        None => (range + i64::from(points) - 1) / i64::from(points),
    };
    let rollups = step_ms >= MINUTE_MS;
    if !rollups && range > i64::try_from(MAX_RAW_RANGE.as_millis()).unwrap_or(i64::MAX) {
        return Err(format!(
            "steps under a minute need a range of at most {} hours",
            MAX_RAW_RANGE.as_secs() / 3600
        ));
    }
    // Rollup buckets hold whole minutes.
    let step_ms = if rollups {
        (step_ms + MINUTE_MS - 1) / MINUTE_MS * MINUTE_MS
    } else {
        step_ms
    };
    Ok(Plan {
        from_ms,
        to_ms,
        step_ms,
        rollups,
    })
}

fn push(out: &mut Vec<HistoryPoint>, start: i64, sum: f64, p: HistoryPoint) {
    out.push(HistoryPoint {
        ts_ms: start,
        value: sum / f64::from(p.count.max(1)),
        ..p
    });
}

/// Samples `(ts_ms, value)` (ascending) averaged per bucket of `step_ms` from
/// `from_ms` (pure).
pub fn bucket_points(points: &[(i64, f64)], from_ms: i64, step_ms: i64) -> Vec<HistoryPoint> {
    let mut out = Vec::new();
    let mut cur: Option<(i64, f64, HistoryPoint)> = None;
    for &(ts, v) in points {
        let start = from_ms + (ts - from_ms).div_euclid(step_ms) * step_ms;
        match &mut cur {
            Some((s, sum, p)) if *s == start => {
                *sum += v;
                p.min = p.min.min(v);
                p.max = p.max.max(v);
                p.count += 1;
            }
            _ => {
                if let Some((s, sum, p)) = cur.take() {
                    push(&mut out, s, sum, p);
                }
                cur = Some((
                    start,
                    v,
                    HistoryPoint {
                        ts_ms: start,
                        value: v,
                        min: v,
                        max: v,
                        count: 1,
                    },
                ));
            }
        }
    }
    if let Some((s, sum, p)) = cur {
        push(&mut out, s, sum, p);
    }
    out
}

/// Minute rollups (ascending) merged per bucket of `step_ms` from `from_ms`, averages
/// weighted by their sample counts (pure).
pub fn bucket_rollups(rollups: &[Rollup], from_ms: i64, step_ms: i64) -> Vec<HistoryPoint> {
    let mut out = Vec::new();
    let mut cur: Option<(i64, f64, HistoryPoint)> = None;
    for r in rollups {
        let start = from_ms + (r.minute_ms - from_ms).div_euclid(step_ms) * step_ms;
        let weighted = r.avg * f64::from(r.count);
        match &mut cur {
            Some((s, sum, p)) if *s == start => {
                *sum += weighted;
                p.min = p.min.min(r.min);
                p.max = p.max.max(r.max);
                p.count += r.count;
            }
            _ => {
                if let Some((s, sum, p)) = cur.take() {
                    push(&mut out, s, sum, p);
                }
                cur = Some((
                    start,
                    weighted,
                    HistoryPoint {
                        ts_ms: start,
                        value: r.avg,
                        min: r.min,
                        max: r.max,
                        count: r.count,
                    },
                ));
            }
        }
    }
    if let Some((s, sum, p)) = cur {
        push(&mut out, s, sum, p);
    }
    out
}

/// History of the series of `metric` (on `host`, with at least `labels`).
#[utoipa::path(get, path = "/api/v1/history", tag = "history",
    security(("bearer" = ["viewer"])),
    params(HistoryQuery),
    responses((status = 200, body = History), (status = 400, body = crate::api::types::ErrorBody)))]
pub async fn history(
    State(state): State<ApiState>,
    ApiQuery(q): ApiQuery<HistoryQuery>,
) -> Result<Json<History>, ApiError> {
    if q.metric.is_empty() || q.metric.len() > 256 {
        return Err(ApiError::bad_request("metric must be 1 to 256 bytes"));
    }
    let labels: serde_json::Value = match &q.labels {
        None => serde_json::json!({}),
        Some(text) => match serde_json::from_str::<serde_json::Value>(text) {
            Ok(v @ serde_json::Value::Object(_)) => v,
            _ => return Err(ApiError::bad_request("labels must be a JSON object")),
        },
    };
    let to = q.to.unwrap_or_else(Utc::now);
    let from = match q.from {
        Some(from) => from,
        None => to
            .checked_sub_signed(chrono::Duration::hours(1))
            .ok_or_else(|| ApiError::bad_request("`to` is out of range"))?,
    };
    let step = q
        .step
        .as_deref()
        .map(humantime::parse_duration)
        .transpose()
        .map_err(|e| ApiError::bad_request(format!("step: {e}")))?;
    let plan = plan(from, to, step, q.points).map_err(ApiError::bad_request)?;
    let ready = state.ready()?;
    let series = sqlx::query(
        "SELECT series_id, host_id, labels FROM series
         WHERE metric = $1 AND ($2::text IS NULL OR host_id = $2) AND labels @> $3
         ORDER BY series_id LIMIT $4",
    )
    .bind(&q.metric)
    .bind(&q.host)
    .bind(SqlJson(&labels))
    .bind(MAX_SERIES + 1)
    .fetch_all(&ready.pool)
    .await?;
    if i64::try_from(series.len()).unwrap_or(i64::MAX) > MAX_SERIES {
        return Err(ApiError::bad_request(format!(
            "more than {MAX_SERIES} series match; narrow `host` or `labels`"
        )));
    }
    let mut out = Vec::with_capacity(series.len());
    for row in &series {
        let id: i64 = row.try_get(0)?;
        let SqlJson(labels): SqlJson<serde_json::Value> = row.try_get(2)?;
        let points = if plan.rollups {
            let rollups = ready.store.series_rollups(id, from, to).await?;
            bucket_rollups(&rollups, plan.from_ms, plan.step_ms)
        } else {
            let raw = ready
                .store
                .series_points(id, from, to, Duration::ZERO)
                .await?;
            let raw: Vec<(i64, f64)> = raw.into_iter().map(|p| (p.ts_ms, p.value)).collect();
            bucket_points(&raw, plan.from_ms, plan.step_ms)
        };
        out.push(HistorySeries {
            series_id: id,
            host_id: row.try_get(1)?,
            labels,
            points,
        });
    }
    Ok(Json(History {
        metric: q.metric,
        from,
        to,
        step_ms: plan.step_ms,
        source: if plan.rollups { "rollup_1m" } else { "raw" }.to_owned(),
        series: out,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + s, 0).unwrap()
    }

    #[test]
    fn plans_pick_rollups_for_long_ranges_and_refuse_bad_ones() {
        let day = plan(at(0), at(86_400), None, None).unwrap();
        assert!(day.rollups);
        assert_eq!(day.step_ms, 120_000); // 86.4 s rounded up to whole minutes
        let short = plan(at(0), at(600), None, None).unwrap();
        assert!(!short.rollups);
        assert_eq!(short.step_ms, 600);
        assert!(plan(at(10), at(0), None, None).is_err());
        assert!(plan(at(0), at(86_400), Some(Duration::from_secs(1)), None).is_err());
        assert!(plan(at(0), at(86_400), None, Some(0)).is_err());
        assert!(plan(at(0), at(86_400), None, Some(10_001)).is_err());
        assert!(plan(at(0), at(86_400 * 500), None, None).is_err());
        assert!(plan(at(0), at(60), Some(Duration::from_secs(3600)), None).is_err());
        assert!(plan(at(0), at(60), Some(Duration::MAX), None).is_err());
        assert!(plan(at(0), at(86_400), Some(Duration::from_secs(20)), Some(5000)).is_err());
    }

    #[test]
    fn buckets_average_and_keep_extremes() {
        let pts = [(0, 1.0), (500, 3.0), (1000, 10.0), (2500, 4.0)];
        let b = bucket_points(&pts, 0, 1000);
        assert_eq!(b.len(), 3);
        assert_eq!(
            (b[0].ts_ms, b[0].value, b[0].min, b[0].max, b[0].count),
            (0, 2.0, 1.0, 3.0, 2)
        );
        assert_eq!(b[2].ts_ms, 2000);
        let r = |m: i64, avg: f64, count: u32| Rollup {
            minute_ms: m * MINUTE_MS,
            min: avg - 1.0,
            max: avg + 1.0,
            avg,
            last: avg,
            count,
        };
        let b = bucket_rollups(
            &[r(0, 1.0, 60), r(1, 4.0, 30), r(2, 7.0, 60)],
            0,
            2 * MINUTE_MS,
        );
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].value, 2.0);
        assert_eq!((b[0].min, b[0].max, b[0].count), (0.0, 5.0, 90));
    }
}
