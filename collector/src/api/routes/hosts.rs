//! Hosts, their components and GPUs.

use super::events::event_from_row;
use crate::api::error::{ApiError, ApiPath};
use crate::api::types::{Component, ComponentRevision, Gpu, GpuValue, Host};
use crate::api::ApiState;
use axum::extract::State;
use axum::Json;
use sqlx::postgres::PgRow;
use sqlx::types::Json as SqlJson;
use sqlx::Row;
use std::collections::HashMap;

const HOST_SELECT: &str = "SELECT h.host_id, h.state, h.first_seen, h.last_seen, h.lost_since,
        h.agent_version, h.profile,
        coalesce((SELECT jsonb_agg(jsonb_build_object('name', c.name, 'state', c.state,
                                   'revision', c.revision) ORDER BY c.name)
                  FROM components c WHERE c.host_id = h.host_id), '[]'::jsonb),
        (SELECT count(*) FROM gpus g WHERE g.host_id = h.host_id)
    FROM hosts h WHERE ($1::text IS NULL OR h.host_id = $1) ORDER BY h.host_id";

fn host_from_row(row: &PgRow) -> Result<Host, sqlx::Error> {
    let SqlJson(components): SqlJson<Vec<ComponentRevision>> = row.try_get(7)?;
    Ok(Host {
        host_id: row.try_get(0)?,
        state: row.try_get(1)?,
        first_seen: row.try_get(2)?,
        last_seen: row.try_get(3)?,
        lost_since: row.try_get(4)?,
        agent_version: row.try_get(5)?,
        profile: row.try_get(6)?,
        components,
        gpu_count: row.try_get(8)?,
    })
}

/// Every host with its state, agent version, profile and component revisions.
#[utoipa::path(get, path = "/api/v1/hosts", tag = "hosts",
    security(("bearer" = ["viewer"])),
    responses((status = 200, body = Vec<Host>),
              (status = 401, body = crate::api::types::ErrorBody)))]
pub async fn list_hosts(State(state): State<ApiState>) -> Result<Json<Vec<Host>>, ApiError> {
    let ready = state.ready()?;
    let rows = sqlx::query(HOST_SELECT)
        .bind(None::<String>)
        .fetch_all(&ready.pool)
        .await?;
    let hosts = rows.iter().map(host_from_row).collect::<Result<_, _>>()?;
    Ok(Json(hosts))
}

async fn one_host(state: &ApiState, host: &str) -> Result<Host, ApiError> {
    let ready = state.ready()?;
    let row = sqlx::query(HOST_SELECT)
        .bind(host)
        .fetch_optional(&ready.pool)
        .await?;
    match row {
        Some(row) => Ok(host_from_row(&row)?),
        None => Err(ApiError::not_found(format!("no host {host:?}"))),
    }
}

/// One host.
#[utoipa::path(get, path = "/api/v1/hosts/{host}", tag = "hosts",
    security(("bearer" = ["viewer"])),
    params(("host" = String, Path, description = "host id")),
    responses((status = 200, body = Host), (status = 404, body = crate::api::types::ErrorBody)))]
pub async fn get_host(
    State(state): State<ApiState>,
    ApiPath(host): ApiPath<String>,
) -> Result<Json<Host>, ApiError> {
    Ok(Json(one_host(&state, &host).await?))
}

/// A host's components with their states and recent events (transitions among them).
#[utoipa::path(get, path = "/api/v1/hosts/{host}/components", tag = "hosts",
    security(("bearer" = ["viewer"])),
    params(("host" = String, Path, description = "host id")),
    responses((status = 200, body = Vec<Component>), (status = 404, body = crate::api::types::ErrorBody)))]
pub async fn list_components(
    State(state): State<ApiState>,
    ApiPath(host): ApiPath<String>,
) -> Result<Json<Vec<Component>>, ApiError> {
    one_host(&state, &host).await?;
    let pool = &state.ready()?.pool;
    let rows = sqlx::query(
        "SELECT name, state, revision, critical, updated_at FROM components
         WHERE host_id = $1 ORDER BY name",
    )
    .bind(&host)
    .fetch_all(pool)
    .await?;
    let events = sqlx::query(&format!(
        "SELECT {} FROM (SELECT *, row_number() OVER (PARTITION BY subject_id ORDER BY event_id DESC) AS rn
               FROM events WHERE host_id = $1 AND subject_kind = 'component') e
         WHERE rn <= 20 ORDER BY event_id DESC",
        super::events::EVENT_COLUMNS
    ))
    .bind(&host)
    .fetch_all(pool)
    .await?;
    let mut by_component: HashMap<String, Vec<_>> = HashMap::new();
    for row in &events {
        let event = event_from_row(row)?;
        if let Some(name) = event.subject_id.clone() {
            by_component.entry(name).or_default().push(event);
        }
    }
    let components = rows
        .iter()
        .map(|r| {
            let name: String = r.try_get(0)?;
            Ok(Component {
                recent_events: by_component.remove(&name).unwrap_or_default(),
                name,
                state: r.try_get(1)?,
                revision: r.try_get(2)?,
                critical: r.try_get(3)?,
                updated_at: r.try_get(4)?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()?;
    Ok(Json(components))
}

/// A host's GPUs: inventory and the newest value of each of their series.
#[utoipa::path(get, path = "/api/v1/hosts/{host}/gpus", tag = "hosts",
    security(("bearer" = ["viewer"])),
    params(("host" = String, Path, description = "host id")),
    responses((status = 200, body = Vec<Gpu>), (status = 404, body = crate::api::types::ErrorBody)))]
pub async fn list_gpus(
    State(state): State<ApiState>,
    ApiPath(host): ApiPath<String>,
) -> Result<Json<Vec<Gpu>>, ApiError> {
    one_host(&state, &host).await?;
    let pool = &state.ready()?.pool;
    let rows = sqlx::query(
        "SELECT gpu_index, uuid, name, pci_bus_id, memory_total_bytes, updated_at FROM gpus
         WHERE host_id = $1 ORDER BY gpu_index",
    )
    .bind(&host)
    .fetch_all(pool)
    .await?;
    // The host's GPU series, in the order a client reads them: per metric, the `gpu`
    // engine's utilisation and the `gpu` sensor's temperature first.
    let series: Vec<(i64, String, Option<String>)> = sqlx::query_as(
        "SELECT series_id, metric, labels->>'gpu' FROM series
         WHERE host_id = $1 AND labels ? 'gpu'
         ORDER BY metric, coalesce(labels->>'engine', labels->>'sensor', 'gpu') <> 'gpu', series_id",
    )
    .bind(&host)
    .fetch_all(pool)
    .await?;
    let newest: HashMap<i64, (chrono::DateTime<chrono::Utc>, f64)> = match (
        series.iter().map(|s| s.0).min(),
        series.iter().map(|s| s.0).max(),
    ) {
        (Some(lo), Some(hi)) => {
            sqlx::query_as::<_, (i64, chrono::DateTime<chrono::Utc>, f64)>(HOST_GPU_VALUES_SQL)
                .bind(lo)
                .bind(hi)
                // Planned with these bounds every time (an unnamed statement), so the
                // planner sees how narrow the range is and takes the series BRIN.
                .persistent(false)
                .fetch_all(pool)
                .await?
                .into_iter()
                .map(|(id, ts, value)| (id, (ts, value)))
                .collect()
        }
        _ => HashMap::new(),
    };
    // The decision engine's view of each GPU (ops, session 7).
    let mut health: HashMap<String, crate::engine_loop::GpuHealthRecord> =
        crate::engine_loop::EngineHandle::new(pool.clone())
            .gpu_health(Some(&host))
            .await?
            .into_iter()
            .map(|r| (r.gpu_uuid.clone(), r))
            .collect();
    let mut values: HashMap<String, Vec<GpuValue>> = HashMap::new();
    for (id, metric, gpu) in series {
        if let (Some(gpu), Some(&(ts, value))) = (gpu, newest.get(&id)) {
            values
                .entry(gpu)
                .or_default()
                .push(GpuValue { metric, ts, value });
        }
    }
    let gpus = rows
        .iter()
        .map(|r| {
            let index: i32 = r.try_get(0)?;
            let uuid: String = r.try_get(1)?;
            let health = health.remove(&uuid).map(|h| super::gpus::health_view(&h));
            Ok(Gpu {
                index,
                health_state: Some(
                    health
                        .as_ref()
                        .map_or_else(|| "healthy".to_owned(), |h| h.state.clone()),
                ),
                health,
                uuid,
                name: r.try_get(2)?,
                pci_bus_id: r.try_get(3)?,
                memory_total_bytes: r.try_get(4)?,
                updated_at: r.try_get(5)?,
                values: values.remove(&index.to_string()).unwrap_or_default(),
            })
        })
        .collect::<Result<_, sqlx::Error>>()?;
    Ok(Json(gpus))
}

/// The newest value of each series with an id in `[$1, $2]` within the last 10 minutes,
/// in ONE pass over the raw samples: a host's series ids are consecutive (its agent
/// registers them together), so one range condition finds its pages through the
/// `series_id` BRIN, where a probe per series would read the whole index each time.
/// The time bound is written so no index can serve it (`ts + 0 s`): given both BRINs,
/// the planner sometimes took the `ts` one alone and read the whole fleet's last 10
/// minutes (169 ms against 21 ms in one benchmark run of three).
pub const HOST_GPU_VALUES_SQL: &str = "
SELECT DISTINCT ON (series_id) series_id, ts, value FROM samples
WHERE ts + interval '0 s' > now() - interval '10 minutes' AND series_id BETWEEN $1 AND $2
ORDER BY series_id, ts DESC";
