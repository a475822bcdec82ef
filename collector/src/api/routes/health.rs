//! `GET /api/v1/health`.

use crate::api::ApiState;
use crate::supervise::Check;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use std::time::{Duration, Instant};

/// Most stuck hosts named in the health body.
const STUCK_NAMED: usize = 20;

/// Body of `GET /api/v1/health`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Health {
    /// `ok`, `degraded` (a check fails) or `unavailable` (database unreachable).
    pub status: &'static str,
    /// Every check, passing or not.
    pub checks: Vec<Check>,
    pub version: &'static str,
    pub uptime_seconds: u64,
    pub database: DatabaseCheck,
    pub agents_connected: i64,
    /// Since this collector started.
    pub samples_stored: u64,
    pub events_stored: u64,
    pub batches_stored: u64,
    /// Batches resent by agents and recognised as already stored.
    pub batches_duplicate: u64,
    /// Now minus the timestamp of the newest stored data of the most-behind connected
    /// host; null while no connected host had data stored.
    pub ingest_lag_seconds: Option<f64>,
    /// Connected hosts whose unacknowledged data has not advanced for
    /// `health.stuck_after`, most stuck first.
    pub stuck_hosts: Vec<String>,
    /// Connections currently not read because the database is behind (back-pressure).
    pub connections_paused: i64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DatabaseCheck {
    /// Reachable (it may still be slow: see the `database` check).
    pub ok: bool,
    pub latency_ms: f64,
    pub error: Option<String>,
}

/// Health of the collector: `ok`, `degraded` (the failing checks listed) or
/// `unavailable` (503: the database is unreachable).
#[utoipa::path(get, path = "/api/v1/health", tag = "health",
    responses((status = 200, description = "ok or degraded", body = Health),
              (status = 503, description = "the database is unreachable", body = Health)))]
pub async fn health(State(state): State<ApiState>) -> Response {
    let Some(ready) = state.ready.get() else {
        let error = state
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| "starting".to_owned());
        let body = Health {
            status: "unavailable",
            checks: vec![Check {
                name: "database".into(),
                ok: false,
                detail: format!("not reached since start: {error}"),
            }],
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: state.started.elapsed().as_secs(),
            database: DatabaseCheck {
                ok: false,
                latency_ms: 0.0,
                error: Some(error),
            },
            agents_connected: 0,
            samples_stored: 0,
            events_stored: 0,
            batches_stored: 0,
            batches_duplicate: 0,
            ingest_lag_seconds: None,
            stuck_hosts: Vec::new(),
            connections_paused: 0,
        };
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    };
    let probe_timeout = state.limits.database_slow.max(Duration::from_secs(2));
    let started = Instant::now();
    let probe = tokio::time::timeout(
        probe_timeout,
        sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&ready.pool),
    )
    .await;
    let latency = started.elapsed();
    let latency_ms = latency.as_secs_f64() * 1e3;
    let database = match probe {
        Ok(Ok(_)) => DatabaseCheck {
            ok: true,
            latency_ms,
            error: None,
        },
        Ok(Err(e)) => DatabaseCheck {
            ok: false,
            latency_ms,
            error: Some(e.to_string()),
        },
        Err(_) => DatabaseCheck {
            ok: false,
            latency_ms,
            error: Some(format!("timed out after {probe_timeout:?}")),
        },
    };
    let now = Instant::now();
    let report = ready.liveness.ingest_report(
        now,
        chrono::Utc::now().timestamp_millis(),
        state.limits.stuck_after,
    );
    let mut checks = vec![database_check(
        &database,
        latency,
        state.limits.database_slow,
    )];
    checks.push(ingest_check(&report.stuck, state.limits.stuck_after));
    checks.extend(ready.tasks.checks(now));
    let status = if !database.ok {
        "unavailable"
    } else if checks.iter().all(|c| c.ok) {
        "ok"
    } else {
        "degraded"
    };
    let code = if database.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let m = &ready.ingest;
    let body = Health {
        status,
        checks,
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: state.started.elapsed().as_secs(),
        database,
        agents_connected: m.agents_connected.get(),
        samples_stored: m.samples_stored.get(),
        events_stored: m.events_stored.get(),
        batches_stored: m.batches_stored.get(),
        batches_duplicate: m.batches_duplicate.get(),
        ingest_lag_seconds: report.lag_seconds,
        stuck_hosts: report.stuck.into_iter().map(|(host, _)| host).collect(),
        connections_paused: m.connections_paused.get(),
    };
    (code, Json(body)).into_response()
}

/// Reachable and within the slow limit.
fn database_check(db: &DatabaseCheck, latency: Duration, slow: Duration) -> Check {
    let (ok, detail) = match &db.error {
        Some(error) => (false, format!("unreachable: {error}")),
        None if latency > slow => (
            false,
            format!(
                "slow: answered in {:.0} ms (limit {:.0} ms)",
                db.latency_ms,
                slow.as_secs_f64() * 1e3
            ),
        ),
        None => (true, format!("answered in {:.1} ms", db.latency_ms)),
    };
    Check {
        name: "database".into(),
        ok,
        detail,
    }
}

/// No connected host's unacknowledged data stuck.
fn ingest_check(stuck: &[(String, Duration)], stuck_after: Duration) -> Check {
    if stuck.is_empty() {
        return Check {
            name: "ingest".into(),
            ok: true,
            detail: "every connected host's data advances".into(),
        };
    }
    let mut named: Vec<String> = stuck
        .iter()
        .take(STUCK_NAMED)
        .map(|(host, waited)| format!("{host} ({:.0}s)", waited.as_secs_f64()))
        .collect();
    if stuck.len() > STUCK_NAMED {
        named.push(format!("and {} more", stuck.len() - STUCK_NAMED));
    }
    Check {
        name: "ingest".into(),
        ok: false,
        detail: format!(
            "{} host(s) with unacknowledged data not advancing for over {:.0}s: {}",
            stuck.len(),
            stuck_after.as_secs_f64(),
            named.join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(latency_ms: f64, error: Option<&str>) -> DatabaseCheck {
        DatabaseCheck {
            ok: error.is_none(),
            latency_ms,
            error: error.map(str::to_owned),
        }
    }

    #[test]
    fn database_check_fails_when_unreachable_or_slow() {
        let slow = Duration::from_millis(500);
        let fast = database_check(&db(3.0, None), Duration::from_millis(3), slow);
        assert!(fast.ok);
        let late = database_check(&db(900.0, None), Duration::from_millis(900), slow);
        assert!(!late.ok && late.detail.contains("slow"), "{late:?}");
        let down = database_check(&db(1.0, Some("refused")), Duration::from_millis(1), slow);
        assert!(!down.ok && down.detail.contains("refused"), "{down:?}");
    }

    #[test]
    fn ingest_check_names_the_stuck_hosts() {
        let after = Duration::from_secs(60);
        assert!(ingest_check(&[], after).ok);
        let c = ingest_check(&[("gpu-7".into(), Duration::from_secs(75))], after);
        assert!(!c.ok);
        assert!(c.detail.contains("gpu-7 (75s)"), "{}", c.detail);
        let many: Vec<(String, Duration)> = (0..25)
            .map(|i| (format!("h{i}"), Duration::from_secs(61)))
            .collect();
        assert!(ingest_check(&many, after).detail.ends_with("and 5 more"));
    }
}
