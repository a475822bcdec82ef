//! GPU health: an operator's override (set healthy / unhealthy with a note), stored as
//! an operator event (audited in its transaction) that the decision engine records as
//! a decision; the GPU listing (`hosts::list_gpus`) shows the engine's state.

use crate::api::auth::{Caller, RequestId};
use crate::api::error::{ApiError, ApiJson, ApiPath};
use crate::api::types::{GpuHealth, GpuHealthOverride, Requested};
use crate::api::{audit_entry, ApiState};
use crate::engine_loop::{EngineHandle, GpuHealthRecord};
use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};

/// The API view of a GPU's stored health (pure).
pub fn health_view(r: &GpuHealthRecord) -> GpuHealth {
    GpuHealth {
        state: r.state.clone(),
        rung: r.rung.clone(),
        since: r.since,
        until: r.until,
        cycles: r.cycles,
    }
}

/// Overrides a GPU's health (by index or UUID); the engine records it as a decision.
#[utoipa::path(post, path = "/api/v1/hosts/{host}/gpus/{gpu}/health", tag = "hosts",
    security(("bearer" = ["operator"])),
    params(("host" = String, Path, description = "host id"),
           ("gpu" = String, Path, description = "GPU index or UUID")),
    request_body = GpuHealthOverride,
    responses((status = 202, body = Requested),
              (status = 404, description = "unknown host or GPU", body = crate::api::types::ErrorBody),
              (status = 422, body = crate::api::types::ErrorBody)))]
pub async fn override_gpu_health(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Extension(request_id): Extension<RequestId>,
    ApiPath((host, gpu)): ApiPath<(String, String)>,
    ApiJson(body): ApiJson<GpuHealthOverride>,
) -> Result<(StatusCode, Json<Requested>), ApiError> {
    let ready = state.ready()?;
    let audit = audit_entry(
        &caller,
        &request_id,
        "POST",
        "/api/v1/hosts/{host}/gpus/{gpu}/health",
        serde_json::json!({ "host": host, "gpu": gpu, "healthy": body.healthy, "note": body.note }),
    );
    let event_id = EngineHandle::new(ready.pool.clone())
        .override_gpu_audited(
            &host,
            &gpu,
            body.healthy,
            &caller.who(),
            &body.note,
            Some(&audit),
        )
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Requested {
            event_id,
            request: "gpu_health".to_owned(),
            escalation: None,
        }),
    ))
}
