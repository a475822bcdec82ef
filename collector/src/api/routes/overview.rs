//! The fleet overview the dashboard's first page shows: hosts, GPUs by health with
//! their utilisation and memory, open escalations, deployments in progress, the
//! automation breaker, and one line per host.
//!
//! A handful of set-based queries run concurrently, never one per host: hosts with
//! their component, GPU and GPU-health counts joined in, and their GPUs' recent values
//! (each series' mean over [`LATEST_WINDOW`], the samples' BRIN index on `ts` bounding
//! the scan as for `/metrics/fleet`); the GPU totals; escalations; deployments; the
//! breaker from the engine's snapshot. One answer serves every request for
//! [`CACHE_FOR`]; then, up to [`SERVE_STALE_FOR`], requests get it while one refresh
//! runs behind them; a request finding nothing that recent computes the answer while
//! concurrent ones wait for it. The answer says when it was computed (`as_of`).

use crate::api::error::ApiError;
use crate::api::types::{
    Overview, OverviewBreaker, OverviewDeployment, OverviewEscalation, OverviewGpus, OverviewHost,
    OverviewHosts,
};
use crate::api::ApiState;
use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// GPU values are means over samples this recent (agents sample every second by
/// default; a few periods cover a slow batch).
pub const LATEST_WINDOW: chrono::TimeDelta = chrono::TimeDelta::seconds(15);
/// One answer serves every request for this long.
pub const CACHE_FOR: Duration = Duration::from_secs(1);
/// After [`CACHE_FOR`] and up to this age, an answer is still served while one refresh
/// runs behind it, so a request never waits for the queries while someone watches;
/// older, the request computes a fresh one.
pub const SERVE_STALE_FOR: Duration = Duration::from_secs(5);
/// Escalations listed (all are counted).
const ESCALATIONS_SHOWN: i64 = 10;
/// Deployments listed.
const DEPLOYMENTS_SHOWN: i64 = 20;

const UTIL: &str = "razar_gpu_utilization_ratio";
const MEM_USED: &str = "razar_gpu_memory_used_bytes";

/// One row per host: its counts and its GPUs' recent utilisation and memory in use, each
/// GPU series' mean over [`LATEST_WINDOW`] (a hash aggregate: no sort of the window's
/// rows, which a per-series "newest row" would need). Utilisation is the `gpu` engine's
/// (series without an `engine` label count as it).
pub const HOSTS_SQL: &str = "
WITH latest AS (
    SELECT se.host_id, se.metric, avg(s.value) AS value
    FROM samples s JOIN series se ON se.series_id = s.series_id
    WHERE s.ts >= $1 AND se.metric IN ($2, $3)
      AND coalesce(se.labels->>'engine', 'gpu') = 'gpu'
      AND abs(s.value) < 'Infinity'::float8 -- finite (NaN sorts above Infinity)
    GROUP BY s.series_id, se.host_id, se.metric
), per_host AS (
    SELECT host_id,
           sum(value) FILTER (WHERE metric = $2) AS util_sum,
           count(*) FILTER (WHERE metric = $2) AS util_n,
           sum(value) FILTER (WHERE metric = $3) AS mem_used
    FROM latest GROUP BY host_id
)
SELECT h.host_id, h.state, h.last_seen, h.agent_version,
       coalesce(g.n, 0), coalesce(gh.unhealthy, 0),
       p.util_sum, coalesce(p.util_n, 0), coalesce(p.mem_used, 0)::float8,
       coalesce(c.n, 0), coalesce(c.failed, 0)
FROM hosts h
LEFT JOIN (SELECT host_id, count(*) AS n FROM gpus GROUP BY host_id) g
       ON g.host_id = h.host_id
LEFT JOIN (SELECT host_id, count(*) FILTER (WHERE state <> 'healthy') AS unhealthy
           FROM gpu_health GROUP BY host_id) gh ON gh.host_id = h.host_id
LEFT JOIN (SELECT host_id, count(*) AS n,
                  count(*) FILTER (WHERE state IN ('unhealthy', 'backoff', 'quarantined')) AS failed
           FROM components GROUP BY host_id) c ON c.host_id = h.host_id
LEFT JOIN per_host p ON p.host_id = h.host_id
ORDER BY h.host_id";

/// GPU totals: inventory size and memory, health states.
pub const GPUS_SQL: &str = "
SELECT (SELECT count(*) FROM gpus),
       (SELECT coalesce(sum(memory_total_bytes), 0)::bigint FROM gpus),
       count(*) FILTER (WHERE state = 'quarantined'),
       count(*) FILTER (WHERE state = 'probation'),
       count(*) FILTER (WHERE state = 'inspection')
FROM gpu_health";

const ESCALATIONS_SQL: &str = "
SELECT escalation_id, host_id, subject, kind, state, severity, summary, opened_at,
       decision_id
FROM escalations WHERE state <> 'resolved'
ORDER BY escalation_id DESC LIMIT $1";

const ESCALATIONS_COUNT_SQL: &str = "SELECT count(*) FROM escalations WHERE state <> 'resolved'";

const DEPLOYMENTS_SQL: &str = "
SELECT d.deployment_id, d.component, d.revision, d.state, d.paused, d.created_at,
       (SELECT count(*) FILTER (WHERE dh.state = 'healthy') FROM deployment_hosts dh
        WHERE dh.deployment_id = d.deployment_id),
       (SELECT count(*) FROM deployment_hosts dh WHERE dh.deployment_id = d.deployment_id)
FROM deployments d
WHERE d.state NOT IN ('succeeded', 'reverted', 'failed')
ORDER BY d.deployment_id DESC LIMIT $1";

const BREAKER_SQL: &str = "SELECT snapshot->'breaker'->'scopes' FROM engine_state WHERE id = 1";

type HostRow = (
    String,
    String,
    DateTime<Utc>,
    String,
    i64,
    i64,
    Option<f64>,
    i64,
    f64,
    i64,
    i64,
);

type EscalationRow = (
    i64,
    String,
    String,
    String,
    String,
    String,
    String,
    DateTime<Utc>,
    Option<i64>,
);

type DeploymentRow = (i64, String, String, String, bool, DateTime<Utc>, i64, i64);

/// The fleet at a glance: what the dashboard's fleet page shows.
#[utoipa::path(get, path = "/api/v1/overview", tag = "overview",
    security(("bearer" = ["viewer"])),
    responses((status = 200, body = Overview),
              (status = 401, body = crate::api::types::ErrorBody),
              (status = 503, body = crate::api::types::ErrorBody)))]
pub async fn overview(State(state): State<ApiState>) -> Result<Json<Overview>, ApiError> {
    let pool = &state.ready()?.pool;
    let cache = &state.overview_cache;
    if let Some((at, answer)) = cache.current() {
        let age = at.elapsed();
        if age < CACHE_FOR {
            return Ok(Json(answer));
        }
        if age < SERVE_STALE_FOR {
            // Stale while revalidating: this request gets the answer of a moment ago,
            // one refresh runs behind it (none when one already runs).
            if let Ok(guard) = Arc::clone(&cache.refresh).try_lock_owned() {
                let (pool, cache) = (pool.clone(), Arc::clone(cache));
                tokio::spawn(async move {
                    let _one_at_a_time = guard;
                    match query(&pool).await {
                        Ok(answer) => cache.store(answer),
                        Err(e) => tracing::warn!(error = %e.message, "overview refresh failed"),
                    }
                });
            }
            return Ok(Json(answer));
        }
    }
    // No answer recent enough to serve: compute one; concurrent requests wait for it.
    let _one_at_a_time = cache.refresh.lock().await;
    if let Some((at, answer)) = cache.current() {
        if at.elapsed() < CACHE_FOR {
            return Ok(Json(answer));
        }
    }
    let answer = query(pool).await?;
    cache.store(answer.clone());
    Ok(Json(answer))
}

/// The overview last computed, shared by requests (see [`CACHE_FOR`] and
/// [`SERVE_STALE_FOR`]). Nothing refreshes it while nobody asks.
#[derive(Debug, Default)]
pub struct OverviewCache {
    answer: std::sync::RwLock<Option<(Instant, Overview)>>,
    refresh: Arc<tokio::sync::Mutex<()>>,
}

impl OverviewCache {
    fn current(&self) -> Option<(Instant, Overview)> {
        match self.answer.read() {
            Ok(answer) => answer.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn store(&self, overview: Overview) {
        let mut answer = match self.answer.write() {
            Ok(answer) => answer,
            Err(poisoned) => poisoned.into_inner(),
        };
        *answer = Some((Instant::now(), overview));
    }
}

async fn query(pool: &sqlx::PgPool) -> Result<Overview, ApiError> {
    let since = Utc::now() - LATEST_WINDOW;
    let hosts = sqlx::query_as::<_, HostRow>(HOSTS_SQL)
        .bind(since)
        .bind(UTIL)
        .bind(MEM_USED)
        .fetch_all(pool);
    let gpus = sqlx::query_as::<_, (i64, i64, i64, i64, i64)>(GPUS_SQL).fetch_one(pool);
    let escalations = sqlx::query_as::<_, EscalationRow>(ESCALATIONS_SQL)
        .bind(ESCALATIONS_SHOWN)
        .fetch_all(pool);
    let escalations_count = sqlx::query_scalar::<_, i64>(ESCALATIONS_COUNT_SQL).fetch_one(pool);
    let deployments = sqlx::query_as::<_, DeploymentRow>(DEPLOYMENTS_SQL)
        .bind(DEPLOYMENTS_SHOWN)
        .fetch_all(pool);
    let breaker =
        sqlx::query_scalar::<_, Option<serde_json::Value>>(BREAKER_SQL).fetch_optional(pool);
    let (hosts, gpus, escalations, escalations_count, deployments, breaker) = tokio::try_join!(
        hosts,
        gpus,
        escalations,
        escalations_count,
        deployments,
        breaker
    )?;
    Ok(assemble(
        hosts,
        gpus,
        escalations,
        escalations_count,
        deployments,
        breaker.flatten(),
    ))
}

/// The answer from the queries' rows (pure).
fn assemble(
    hosts: Vec<HostRow>,
    (gpu_total, memory_total, quarantined, probation, inspection): (i64, i64, i64, i64, i64),
    escalations: Vec<EscalationRow>,
    escalations_count: i64,
    deployments: Vec<DeploymentRow>,
    breaker: Option<serde_json::Value>,
) -> Overview {
    let mut util_sum = 0.0;
    let mut util_n = 0i64;
    let mut memory_used = 0.0;
    let mut online = 0;
    let host_list: Vec<OverviewHost> = hosts
        .into_iter()
        .map(
            |(
                host,
                state,
                last_seen,
                agent_version,
                gpus,
                unhealthy,
                u_sum,
                u_n,
                mem,
                comps,
                failed,
            )| {
                if state == "online" {
                    online += 1;
                }
                util_sum += u_sum.unwrap_or(0.0);
                util_n += u_n;
                memory_used += mem;
                OverviewHost {
                    host,
                    state,
                    last_seen,
                    gpus,
                    gpus_unhealthy: unhealthy,
                    gpu_util: mean(u_sum, u_n),
                    components: comps,
                    components_failed: failed,
                    agent_version,
                }
            },
        )
        .collect();
    let total = i64::try_from(host_list.len()).unwrap_or(i64::MAX);
    let out_of_service = quarantined + probation + inspection;
    Overview {
        as_of: Utc::now(),
        hosts: OverviewHosts {
            total,
            online,
            lost: total - online,
        },
        gpus: OverviewGpus {
            total: gpu_total,
            healthy: (gpu_total - out_of_service).max(0),
            quarantined,
            probation,
            inspection,
            utilization_avg: mean(Some(util_sum), util_n),
            memory_used_bytes: saturating_i64(memory_used),
            memory_total_bytes: memory_total,
        },
        escalations_open_count: escalations_count,
        escalations_open: escalations
            .into_iter()
            .map(
                |(id, host, subject, kind, state, severity, summary, opened_at, decision_id)| {
                    OverviewEscalation {
                        id,
                        host,
                        subject,
                        kind,
                        state,
                        severity,
                        summary,
                        opened_at,
                        decision_id,
                    }
                },
            )
            .collect(),
        deployments_active: deployments
            .into_iter()
            .map(
                |(id, component, revision, state, paused, created_at, done, total)| {
                    OverviewDeployment {
                        id,
                        component,
                        revision,
                        state,
                        paused,
                        hosts_done: done,
                        hosts_total: total,
                        created_at,
                    }
                },
            )
            .collect(),
        breaker: breaker_summary(breaker.as_ref()),
        host_list,
    }
}

fn mean(sum: Option<f64>, n: i64) -> Option<f64> {
    match (sum, n) {
        (Some(sum), n) if n > 0 => {
            // A count of GPUs is far below 2^53: exact as f64.
            let n = n as f64;
            Some(sum / n)
        }
        _ => None,
    }
}

fn saturating_i64(v: f64) -> i64 {
    if !v.is_finite() || v <= 0.0 {
        0
    } else if v >= i64::MAX as f64 {
        i64::MAX
    } else {
        // In range and finite: the cast truncates the fraction only.
        v as i64
    }
}

/// The breaker's fleet-wide summary from the engine snapshot's `breaker.scopes` (a
/// scope absent is closed; each present one is `{"mode": {"Open": ..} | {"HalfOpen":
/// ..}, "held": [...]}`). Read as JSON, not as the engine's types, so that a snapshot
/// written by another version still shows.
pub fn breaker_summary(scopes: Option<&serde_json::Value>) -> OverviewBreaker {
    let mut summary = OverviewBreaker {
        state: "closed".to_owned(),
        scopes: 0,
        held: 0,
    };
    let entries: Vec<&serde_json::Value> = match scopes {
        Some(serde_json::Value::Object(map)) => map.values().collect(),
        // A map with non-string keys may be written as a list of [key, value] pairs.
        Some(serde_json::Value::Array(pairs)) => pairs
            .iter()
            .filter_map(|p| p.as_array().and_then(|kv| kv.get(1)))
            .collect(),
        _ => Vec::new(),
    };
    for scope in entries {
        summary.scopes += 1;
        let held = scope
            .get("held")
            .and_then(|h| h.as_array())
            .map_or(0, |h| h.len());
        summary.held += i64::try_from(held).unwrap_or(i64::MAX);
        let open = match scope.get("mode") {
            Some(serde_json::Value::Object(m)) => m.contains_key("Open"),
            Some(serde_json::Value::String(s)) => s == "Open",
            _ => false,
        };
        if open {
            summary.state = "open".to_owned();
        } else if summary.state == "closed" {
            summary.state = "half_open".to_owned();
        }
    }
    summary
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn breaker_closed_without_scopes() {
        assert_eq!(breaker_summary(None).state, "closed");
        assert_eq!(breaker_summary(Some(&json!({}))).state, "closed");
    }

    #[test]
    fn breaker_open_wins_and_held_actions_add_up() {
        let scopes = json!({
            "Fleet": {"mode": {"HalfOpen": {"trial_used": false}}, "held": [{}]},
            "other": {"mode": {"Open": {"since": 1}}, "held": [{}, {}]},
        });
        let b = breaker_summary(Some(&scopes));
        assert_eq!((b.state.as_str(), b.scopes, b.held), ("open", 2, 3));
        let half = json!([["Fleet", {"mode": {"HalfOpen": {"trial_used": true}}, "held": []}]]);
        let b = breaker_summary(Some(&half));
        assert_eq!((b.state.as_str(), b.scopes, b.held), ("half_open", 1, 0));
    }

    #[test]
    fn totals_and_means() {
        let now = Utc::now();
        let hosts = vec![
            (
                "a".into(),
                "online".into(),
                now,
                "1".into(),
                2,
                1,
                Some(1.0),
                2,
                10.0,
                3,
                1,
            ),
            (
                "b".into(),
                "lost".into(),
                now,
                "1".into(),
                2,
                0,
                None,
                0,
                0.0,
                1,
                0,
            ),
        ];
        let o = assemble(hosts, (4, 100, 1, 0, 0), Vec::new(), 0, Vec::new(), None);
        assert_eq!((o.hosts.total, o.hosts.online, o.hosts.lost), (2, 1, 1));
        assert_eq!(
            (o.gpus.total, o.gpus.healthy, o.gpus.quarantined),
            (4, 3, 1)
        );
        assert_eq!(o.gpus.utilization_avg, Some(0.5));
        assert_eq!(o.gpus.memory_used_bytes, 10);
        assert_eq!(o.host_list[0].gpu_util, Some(0.5));
        assert_eq!(o.host_list[1].gpu_util, None);
        assert_eq!(o.breaker.state, "closed");
    }
}
