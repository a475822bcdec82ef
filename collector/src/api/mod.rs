//! The collector's HTTP API: the operator API under `/api/v1` (JSON; its OpenAPI 3.1
//! document, generated from the handlers, at `/api/v1/openapi.json`) and `/metrics`
//! (Prometheus text).
//!
//! - `auth`: request ids, bearer tokens, roles (from the document), rate limits;
//! - `error`: `{code, message, request_id}` answers, extractors whose rejections are 4xx;
//! - `types`: request and response bodies, shared with clients;
//! - `routes`: one module per resource.
//!
//! Every mutating call writes an audit row in the transaction of its effect
//! (`store::audit`); the commands it creates carry its request id.

pub mod auth;
pub mod error;
mod routes;
pub mod tls;
pub mod types;

use crate::config::{ApiSettings, HealthLimits};
use crate::dispatch::Dispatch;
use crate::logs::LogHub;
use crate::lost::Liveness;
use crate::server::IngestMetrics;
use crate::store::Store;
use crate::supervise::Tasks;
use auth::{RateLimiter, RouteTable};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use error::ApiError;
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use routes::health::{DatabaseCheck, Health};

/// The fleet overview's main query and its window, for benchmarks that time the route
/// next to its bare SQL.
pub mod routes_sql {
    pub use super::routes::overview::{
        HOSTS_SQL as OVERVIEW_HOSTS_SQL, LATEST_WINDOW as OVERVIEW_WINDOW,
    };
}

/// What the API handlers read.
#[derive(Clone)]
pub struct ApiState {
    pub registry: Registry,
    pub started: Instant,
    pub limits: HealthLimits,
    /// Set once the database is reached and ingest runs.
    pub ready: Arc<OnceLock<Ready>>,
    /// Until then, why not (the last error reaching the database).
    pub waiting: Arc<Mutex<Option<String>>>,
    pub settings: ApiSettings,
    /// Access rule of every documented route.
    pub routes: Arc<RouteTable>,
    pub limiter: Arc<RateLimiter>,
    pub metrics: ApiMetrics,
    /// The OpenAPI document, served as is.
    pub openapi: Arc<String>,
    /// `/metrics/fleet`: the fleet's latest state from the store.
    pub fleet: Option<crate::fleet_metrics::FleetMetrics>,
    /// `GET /api/v1/overview`'s last answer and when it was computed.
    pub overview_cache: Arc<routes::overview::OverviewCache>,
    /// `[api.tls] operators`: operator certificate name → role (empty without TLS).
    pub cert_roles: Arc<std::collections::BTreeMap<String, crate::store::tokens::Role>>,
}

/// The running collector's parts the API reads and drives.
#[derive(Clone)]
pub struct Ready {
    pub pool: sqlx::PgPool,
    pub store: Store,
    pub ingest: IngestMetrics,
    pub tasks: Arc<Tasks>,
    pub liveness: Arc<Liveness>,
    pub dispatch: Dispatch,
    pub logs: LogHub,
    /// Deployments: the operations the API exposes.
    pub deployments: crate::deployments::Deployments,
}

/// The API's own metrics.
#[derive(Debug, Clone)]
pub struct ApiMetrics {
    /// `razar_collector_api_rate_limited_total`: requests answered 429.
    pub rate_limited: IntCounter,
    /// `razar_collector_api_auth_refused_total{reason}`: `malformed`, `unknown`,
    /// `revoked`, `expired` tokens, `role` too low; on the HTTPS port, `cert_unmapped`
    /// (an operator certificate not in `[api.tls] operators`) and `cert_not_operator`.
    pub auth_refused: IntCounterVec,
}

impl ApiMetrics {
    fn new(registry: &Registry) -> Result<ApiMetrics, prometheus::Error> {
        let m = ApiMetrics {
            rate_limited: IntCounter::new(
                "razar_collector_api_rate_limited_total",
                "API requests refused by their token's rate limit (429)",
            )?,
            auth_refused: IntCounterVec::new(
                Opts::new(
                    "razar_collector_api_auth_refused_total",
                    "API requests refused for their token, by reason",
                ),
                &["reason"],
            )?,
        };
        registry.register(Box::new(m.rate_limited.clone()))?;
        registry.register(Box::new(m.auth_refused.clone()))?;
        Ok(m)
    }
}

impl ApiState {
    /// The API's state, its metrics registered in `registry`.
    pub fn new(
        registry: Registry,
        limits: HealthLimits,
        settings: ApiSettings,
    ) -> Result<ApiState, ApiSetupError> {
        let doc = openapi();
        let json = doc
            .to_pretty_json()
            .map_err(|e| ApiSetupError::Document(e.to_string()))?;
        let value: serde_json::Value =
            serde_json::from_str(&json).map_err(|e| ApiSetupError::Document(e.to_string()))?;
        let routes = RouteTable::from_openapi(&value).map_err(ApiSetupError::Document)?;
        Ok(ApiState {
            metrics: ApiMetrics::new(&registry)?,
            registry,
            started: Instant::now(),
            limits,
            ready: Arc::new(OnceLock::new()),
            waiting: Arc::new(Mutex::new(None)),
            limiter: Arc::new(RateLimiter::new(settings.rate_per_second, settings.burst)),
            settings,
            routes: Arc::new(routes),
            openapi: Arc::new(json),
            fleet: None,
            overview_cache: Arc::default(),
            cert_roles: Arc::default(),
        })
    }

    /// The running collector's parts, or 503.
    pub fn ready(&self) -> Result<&Ready, ApiError> {
        self.ready.get().ok_or_else(ApiError::unavailable)
    }
}

/// Why the API could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiSetupError {
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("OpenAPI document: {0}")]
    Document(String),
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Razar operator API", description = "Hosts, GPUs, history, events, commands, logs, tokens and audit of a Razar fleet."),
    modifiers(&BearerScheme),
    tags((name = "health"), (name = "hosts"), (name = "history"), (name = "events"),
         (name = "commands"), (name = "logs"), (name = "tokens"), (name = "audit"),
         (name = "escalations"), (name = "decisions"), (name = "deployments"), (name = "overview"))
)]
struct ApiDoc;

/// Adds the `bearer` security scheme the operations name with their role.
struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A token from `razar-collector token create`; the requirement lists the least role (viewer < operator < admin).",
                    ))
                    .build(),
            ),
        );
    }
}

/// The documented routes and their document, built together so they cannot drift.
fn documented() -> OpenApiRouter<ApiState> {
    use routes::overview;
    use routes::{audit, commands, events, health, history, hosts, logs, tokens};
    use routes::{decisions, deployments, escalations, gpus};
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(health::health))
        .routes(routes!(hosts::list_hosts))
        .routes(routes!(hosts::get_host))
        .routes(routes!(hosts::list_components))
        .routes(routes!(hosts::list_gpus))
        .routes(routes!(history::history))
        .routes(routes!(events::list_events))
        .routes(routes!(events::stream_events))
        .routes(routes!(commands::create_command, commands::list_commands))
        .routes(routes!(commands::get_command))
        .routes(routes!(logs::tail_logs))
        .routes(routes!(tokens::create_token, tokens::list_tokens))
        .routes(routes!(tokens::revoke_token))
        .routes(routes!(audit::list_audit))
        // ops (session 7)
        .routes(routes!(escalations::list_escalations))
        .routes(routes!(escalations::get_escalation))
        .routes(routes!(escalations::ack_escalation))
        .routes(routes!(escalations::resolve_escalation))
        .routes(routes!(decisions::list_decisions))
        .routes(routes!(decisions::get_decision))
        .routes(routes!(gpus::override_gpu_health))
        .routes(routes!(
            deployments::create_deployment,
            deployments::list_deployments
        ))
        .routes(routes!(deployments::get_deployment))
        .routes(routes!(deployments::pause_deployment))
        .routes(routes!(deployments::resume_deployment))
        .routes(routes!(deployments::promote_deployment))
        .routes(routes!(deployments::rollback_deployment))
        // dash
        .routes(routes!(overview::overview))
}

/// The OpenAPI document of the API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    documented().into_openapi()
}

/// The API's routes.
pub fn router(state: ApiState) -> Router {
    let (api, _) = documented().split_for_parts();
    let fleet = state.fleet.clone().map(crate::fleet_metrics::router);
    let router = api
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authorize,
        ))
        .route("/api/v1/openapi.json", get(openapi_json))
        .route("/metrics", get(metrics))
        // The dashboard's page and assets (public: it asks for a token itself).
        .merge(crate::dashboard::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.settings.max_body_bytes))
        .layer(axum::middleware::from_fn(auth::request_id))
        .with_state(state);
    match fleet {
        Some(fleet) => router.merge(fleet),
        None => router,
    }
}

async fn openapi_json(State(state): State<ApiState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        state.openapi.as_str().to_owned(),
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take this method",
    )
}

async fn metrics(State(state): State<ApiState>) -> Response {
    let encoder = prometheus::TextEncoder::new();
    match encoder.encode_to_string(&state.registry.gather()) {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Limits and `[0, max]` clamps of list parameters.
pub(crate) fn page_limit(limit: Option<u32>) -> Result<i64, ApiError> {
    match limit {
        None => Ok(100),
        Some(n @ 1..=1000) => Ok(i64::from(n)),
        Some(n) => Err(ApiError::bad_request(format!(
            "limit {n} is outside 1..=1000"
        ))),
    }
}

/// The audit entry of a mutating call (its result is added when written).
pub(crate) fn audit_entry(
    caller: &auth::Caller,
    request_id: &auth::RequestId,
    method: &str,
    route: &str,
    arguments: serde_json::Value,
) -> crate::store::audit::AuditEntry {
    crate::store::audit::AuditEntry {
        token_id: caller.token_id(),
        who: caller.who(),
        role: caller.role.as_str().to_owned(),
        method: method.to_owned(),
        route: route.to_owned(),
        arguments,
        request_id: request_id.0.clone(),
    }
}
