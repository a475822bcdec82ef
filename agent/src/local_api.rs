//! Local endpoints. On the loopback TCP port (`agent.listen`), read-only: `/health`
//! (JSON), `/metrics` (Prometheus text) and `GET /v1/components`. The control API used by
//! the `razar-agent` CLI (`POST /v1/components/{name}/{action}`, `POST /v1/reload`, and
//! the read-only routes) is served only on a unix socket under the data dir, mode 0660
//! (owner root, group `agent.control_group`): on a GPU host shared with shell accounts,
//! any local user can reach a loopback port, but only root and that group can stop or
//! restart a model server.

use crate::supervisor::machine::Control;
use crate::supervisor::runtime::{Agent, AgentError, VERSION};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// Default failure-pulse budget when none is given.
pub const DEFAULT_PULSE_BUDGET: Duration = Duration::from_secs(30);

/// `/health` body.
#[derive(Debug, Serialize, Deserialize)]
pub struct Health {
    /// `ok`, or `degraded` with the reasons in `problems`.
    pub status: String,
    /// Why the status is `degraded`: quarantined components, GPU events that can be lost,
    /// a queue or budget that dropped something in the last 5 minutes.
    #[serde(default)]
    pub problems: Vec<String>,
    pub version: String,
    pub uptime_seconds: u64,
    pub config_hash: String,
    pub profile: String,
    /// The collector link as the uplink last reported it (`disconnected` until then).
    pub collector: String,
    /// Why GPU telemetry is off (no NVML library or driver, a bad scenario, `source =
    /// "none"`); `null` while GPUs are sampled.
    #[serde(default)]
    pub gpu: Option<String>,
    /// Why GPU events can be lost now (the kernel log cannot be read); `null` otherwise.
    #[serde(default)]
    pub gpu_events: Option<String>,
    /// GPUs drained on this host (`DrainGpu`, `ResetGpu`, `SetGpuHealth`): their
    /// components are kept stopped. `/health` is degraded while one is.
    #[serde(default)]
    pub drained_gpus: Vec<DrainedGpu>,
    /// Count of components per state.
    pub components_by_state: BTreeMap<String, u32>,
    pub components: Vec<crate::supervisor::component::ComponentStatus>,
}

/// A drained GPU as `/health` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainedGpu {
    pub index: u32,
    pub uuid: String,
    pub note: String,
    pub since_ms: i64,
}

/// Body of `POST /v1/components/{name}/resolve`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ResolveBody {
    pub note: String,
}

/// Body of `POST /v1/components/{name}/pulse`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct PulseBody {
    pub budget_ms: Option<u64>,
}

/// Error body: a stable code and a message.
#[derive(Debug, Serialize, Deserialize)]
pub struct ApiError {
    pub code: String,
    pub message: String,
}

/// The loopback TCP port's routes: read-only.
pub(crate) fn read_only_router(agent: Agent) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/components", get(components))
        .with_state(agent)
}

/// The control socket's routes: the read-only ones and every control route.
pub(crate) fn control_router(agent: Agent) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/components", get(components))
        .route("/v1/components/{name}/{action}", post(control))
        .route("/v1/reload", post(reload))
        .with_state(agent)
}

/// Binds the control socket: a stale file left by a killed agent is replaced, a live
/// agent's socket is not; mode 0660, group `group` when given.
pub(crate) fn bind_control_socket(
    path: &std::path::Path,
    group: Option<u32>,
) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("another agent answers on {}", path.display()),
        ));
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    if let Some(gid) = group {
        nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid)))
            .map_err(std::io::Error::from)?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

/// Builds the `/health` body.
pub fn health_of(agent: &Agent) -> Health {
    let view = agent.view();
    let statuses = view.statuses();
    let mut by_state: BTreeMap<String, u32> = BTreeMap::new();
    for s in statuses.values() {
        *by_state.entry(s.state.as_str().to_owned()).or_default() += 1;
    }
    let quarantined = by_state.get("quarantined").copied().unwrap_or(0);
    let config = view.config();
    let gpu_events = view.gpu_degraded.borrow().clone();
    let drop = view
        .metrics()
        .last_drop()
        .map(|(at, what)| (at.elapsed(), what));
    let drained_gpus: Vec<DrainedGpu> = view
        .drained_gpus()
        .into_iter()
        .map(|(index, d)| DrainedGpu {
            index,
            uuid: d.uuid,
            note: d.note,
            since_ms: d.since_ms,
        })
        .collect();
    let mut problems = health_problems(quarantined, gpu_events.as_deref(), drop);
    for gpu in &drained_gpus {
        problems.push(format!(
            "GPU {} drained{}",
            gpu.index,
            if gpu.note.is_empty() {
                String::new()
            } else {
                format!(": {}", gpu.note)
            }
        ));
    }
    Health {
        status: if problems.is_empty() {
            "ok"
        } else {
            "degraded"
        }
        .to_owned(),
        problems,
        version: VERSION.to_owned(),
        uptime_seconds: view.uptime().as_secs(),
        config_hash: config.hash.clone(),
        profile: config.agent.profile.clone(),
        collector: view.link.borrow().clone(),
        gpu: view.gpu.borrow().clone(),
        gpu_events,
        drained_gpus,
        components_by_state: by_state,
        components: statuses.into_values().collect(),
    }
}

/// A drop this recent keeps `/health` degraded.
pub const RECENT_DROP: Duration = Duration::from_secs(300);

/// Why `/health` is degraded (empty: ok): quarantined components, GPU events that can be
/// lost, and anything a queue or budget dropped within [`RECENT_DROP`].
pub fn health_problems(
    quarantined: u32,
    gpu_events: Option<&str>,
    last_drop: Option<(Duration, &str)>,
) -> Vec<String> {
    let mut problems = Vec::new();
    if quarantined > 0 {
        problems.push(format!("{quarantined} component(s) quarantined"));
    }
    if let Some(why) = gpu_events {
        problems.push(format!("GPU events can be lost: {why}"));
    }
    if let Some((ago, what)) = last_drop.filter(|(ago, _)| *ago < RECENT_DROP) {
        problems.push(format!("{what} {}s ago", ago.as_secs()));
    }
    problems
}

async fn health(State(agent): State<Agent>) -> Json<Health> {
    Json(health_of(&agent))
}

async fn metrics(State(agent): State<Agent>) -> Response {
    let m = agent.view().metrics();
    m.uptime.set(agent.view().uptime().as_secs_f64());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        m.render(),
    )
        .into_response()
}

async fn components(
    State(agent): State<Agent>,
) -> Json<Vec<crate::supervisor::component::ComponentStatus>> {
    Json(agent.statuses().into_values().collect())
}

fn error(status: StatusCode, code: &str, message: String) -> Response {
    (
        status,
        Json(ApiError {
            code: code.to_owned(),
            message,
        }),
    )
        .into_response()
}

fn agent_error(e: AgentError) -> Response {
    match e {
        AgentError::UnknownComponent(_) => {
            error(StatusCode::NOT_FOUND, "unknown_component", e.to_string())
        }
        AgentError::Refused(_) => error(StatusCode::CONFLICT, "refused", e.to_string()),
        AgentError::Config(_) => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_config",
            e.to_string(),
        ),
        _ => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        ),
    }
}

async fn control(
    State(agent): State<Agent>,
    Path((name, action)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    let control = match action.as_str() {
        "start" => Control::Start,
        "stop" => Control::Stop,
        "restart" => Control::Restart,
        "resolve" | "quarantine" => match serde_json::from_slice::<ResolveBody>(&body) {
            Ok(b) if !b.note.trim().is_empty() => {
                if action == "resolve" {
                    Control::Resolve { note: b.note }
                } else {
                    Control::Quarantine { note: b.note }
                }
            }
            Ok(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "note_required",
                    "a non-empty note is required".into(),
                )
            }
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_body",
                    format!("expected {{\"note\": \"...\"}}: {e}"),
                )
            }
        },
        "pulse" => {
            let body: PulseBody = if body.is_empty() {
                PulseBody::default()
            } else {
                match serde_json::from_slice(&body) {
                    Ok(b) => b,
                    Err(e) => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            "bad_body",
                            format!("expected {{\"budget_ms\": N}}: {e}"),
                        )
                    }
                }
            };
            Control::Pulse {
                budget: body
                    .budget_ms
                    .map_or(DEFAULT_PULSE_BUDGET, Duration::from_millis),
            }
        }
        other => {
            return error(
                StatusCode::NOT_FOUND,
                "unknown_action",
                format!("unknown action `{other}`"),
            )
        }
    };
    match agent.command(&name, control).await {
        Ok(()) => (StatusCode::OK, Json(serde_json::json!({"ok": true}))).into_response(),
        Err(e) => agent_error(e),
    }
}

async fn reload(State(agent): State<Agent>) -> Response {
    match agent.reload().await {
        Ok(changed) => (
            StatusCode::OK,
            Json(serde_json::json!({"changed": changed})),
        )
            .into_response(),
        Err(e) => agent_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_is_degraded_while_anything_is_lost_or_quarantined() {
        assert!(health_problems(0, None, None).is_empty());
        let recent = Some((
            Duration::from_secs(12),
            "spool over its disk budget: samples dropped",
        ));
        let problems = health_problems(0, None, recent);
        assert_eq!(
            problems,
            ["spool over its disk budget: samples dropped 12s ago"]
        );
        assert!(
            health_problems(0, None, Some((RECENT_DROP, "x"))).is_empty(),
            "old drops pass"
        );
        let all = health_problems(2, Some("kernel log unreadable"), recent);
        assert_eq!(all.len(), 3, "{all:?}");
        assert!(all[0].contains("2 component(s) quarantined"));
        assert!(all[1].contains("kernel log unreadable"));
    }
}
