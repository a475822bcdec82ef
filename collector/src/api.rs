//! The collector's HTTP API: `/api/v1/health` (JSON, 503 when the database is
//! unreachable) and `/metrics` (Prometheus text). The operator API grows here.

use crate::server::IngestMetrics;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use std::time::{Duration, Instant};

/// What the API handlers read.
#[derive(Clone)]
pub struct ApiState {
    pub pool: sqlx::PgPool,
    pub ingest: IngestMetrics,
    pub registry: prometheus::Registry,
    pub started: Instant,
}

/// Body of `GET /api/v1/health`.
#[derive(Debug, Serialize)]
pub struct Health {
    /// `ok` or `unavailable` (database unreachable).
    pub status: &'static str,
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
    /// Mean time from a batch's arrival to its acknowledgement (commit included), since
    /// start; null before the first batch.
    pub ingest_lag_seconds: Option<f64>,
    /// Connections currently not read because the database is behind (back-pressure).
    pub connections_paused: i64,
}

#[derive(Debug, Serialize)]
pub struct DatabaseCheck {
    pub ok: bool,
    pub latency_ms: f64,
    pub error: Option<String>,
}

/// The API's routes.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/api/v1/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn health(State(state): State<ApiState>) -> Response {
    let started = Instant::now();
    let probe = tokio::time::timeout(
        Duration::from_secs(2),
        sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&state.pool),
    )
    .await;
    let latency_ms = started.elapsed().as_secs_f64() * 1e3;
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
            error: Some("timed out after 2s".into()),
        },
    };
    let m = &state.ingest;
    let acks = m.ack_latency.get_sample_count();
    let code = if database.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Health {
        status: if database.ok { "ok" } else { "unavailable" },
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: state.started.elapsed().as_secs(),
        database,
        agents_connected: m.agents_connected.get(),
        samples_stored: m.samples_stored.get(),
        events_stored: m.events_stored.get(),
        batches_stored: m.batches_stored.get(),
        batches_duplicate: m.batches_duplicate.get(),
        ingest_lag_seconds: (acks > 0).then(|| m.ack_latency.get_sample_sum() / acks as f64),
        connections_paused: m.connections_paused.get(),
    };
    (code, Json(body)).into_response()
}

async fn metrics(State(state): State<ApiState>) -> Response {
    let encoder = prometheus::TextEncoder::new();
    match encoder.encode_to_string(&state.registry.gather()) {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
