//! Deployments: create (audited in the transaction that stores it), list, get, and the
//! operator's operations (pause, resume, promote, roll back), each audited in the
//! transaction of its step. A refused operation (the deployment ended, is not paused,
//! is already reverting...) is a 409 and writes nothing.

use crate::api::auth::{Caller, RequestId};
use crate::api::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use crate::api::types::{
    CreateDeployment, Deployment, DeploymentHost, DeploymentOp, DeploymentPage, DeploymentQuery,
    DeploymentSelector, RevisionBody,
};
use crate::api::{audit_entry, page_limit, ApiState};
use crate::deployments::{
    self, DeploymentError, HostSelector, NewDeployment, Operation, Promotion,
};
use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use razar_shared::protocol::RevisionSpec;
use std::time::Duration;

/// Longest min healthy time or healthy deadline accepted (a day).
pub const MAX_WAIT: Duration = Duration::from_secs(86_400);

impl From<DeploymentError> for ApiError {
    fn from(e: DeploymentError) -> ApiError {
        let message = e.to_string();
        match e {
            DeploymentError::NotFound(_) => ApiError::not_found(message),
            DeploymentError::Invalid(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", message)
            }
            DeploymentError::State { .. } | DeploymentError::Busy { .. } => {
                ApiError::new(StatusCode::CONFLICT, "conflict", message)
            }
            DeploymentError::Dispatch(e) => e.into(),
            DeploymentError::Db(e) => e.into(),
            e => ApiError::internal(e),
        }
    }
}

/// A duration such as `30s` within `(0, MAX_WAIT]` (pure).
fn wait(field: &str, text: Option<&str>, default: Duration) -> Result<Duration, ApiError> {
    let Some(text) = text else {
        return Ok(default);
    };
    let d = humantime::parse_duration(text)
        .map_err(|e| ApiError::bad_request(format!("{field}: {e}")))?;
    if d.is_zero() || d > MAX_WAIT {
        return Err(ApiError::bad_request(format!(
            "{field} must be above zero and at most 24h"
        )));
    }
    Ok(d)
}

/// The deployment an API request asks for (pure).
pub fn new_deployment(body: &CreateDeployment, who: &str) -> Result<NewDeployment, ApiError> {
    let revision = RevisionSpec {
        version: body.revision.version.clone(),
        command: body.revision.command.clone(),
        args: body.revision.args.clone(),
        env: body
            .revision
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    };
    let selector = HostSelector {
        hosts: body.hosts.clone(),
        profile: body.profile.clone(),
        all: body.all,
    };
    let mut new = NewDeployment::new(&body.component, revision, selector);
    if let Some(c) = body.canaries {
        new.canaries = c;
    }
    if let Some(m) = body.max_parallel {
        new.max_parallel = m;
    }
    new.min_healthy = wait("min_healthy", body.min_healthy.as_deref(), new.min_healthy)?;
    new.healthy_deadline = wait(
        "healthy_deadline",
        body.healthy_deadline.as_deref(),
        new.healthy_deadline,
    )?;
    if let Some(a) = body.auto_revert {
        new.auto_revert = a;
    }
    new.promotion = match body.promotion.as_deref() {
        None | Some("manual") => Promotion::Manual,
        Some("auto") => Promotion::Auto,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "promotion {other:?} is manual or auto"
            )))
        }
    };
    new.created_by = who.to_owned();
    Ok(new)
}

/// The API view of a stored deployment (pure).
pub fn view(d: &deployments::Deployment) -> Deployment {
    let healthy = d.hosts.iter().filter(|h| h.state == "healthy").count();
    Deployment {
        id: d.id,
        component: d.component.clone(),
        revision: d.revision.clone(),
        spec: RevisionBody {
            version: d.spec.version.clone(),
            command: d.spec.command.clone(),
            args: d.spec.args.clone(),
            env: d.spec.env.iter().cloned().collect(),
        },
        selector: DeploymentSelector {
            hosts: d.selector.hosts.clone(),
            profile: d.selector.profile.clone(),
            all: d.selector.all,
        },
        canaries: d.canaries,
        max_parallel: d.max_parallel,
        min_healthy_ms: d.min_healthy_ms,
        healthy_deadline_ms: d.healthy_deadline_ms,
        auto_revert: d.auto_revert,
        promotion: d.promotion.clone(),
        state: d.state.clone(),
        paused: d.paused,
        reason: d.reason.clone(),
        progress: format!("{healthy}/{} healthy", d.hosts.len()),
        created_by: d.created_by.clone(),
        created_at: d.created_at,
        updated_at: d.updated_at,
        finished_at: d.finished_at,
        hosts: d
            .hosts
            .iter()
            .map(|h| DeploymentHost {
                host: h.host.clone(),
                position: h.position,
                canary: h.canary,
                wave: if h.canary { "canary" } else { "main" }.to_owned(),
                from_revision: h.from_revision.clone(),
                state: h.state.clone(),
                reason: h.reason.clone(),
                updated_at: [
                    h.deploying_at,
                    h.running_at,
                    h.healthy_at,
                    h.failed_at,
                    h.reverting_at,
                    h.reverted_at,
                ]
                .into_iter()
                .flatten()
                .max(),
                deploying_at: h.deploying_at,
                running_at: h.running_at,
                healthy_at: h.healthy_at,
                failed_at: h.failed_at,
                reverting_at: h.reverting_at,
                reverted_at: h.reverted_at,
            })
            .collect(),
    }
}

fn ready_deployments(state: &ApiState) -> Result<&deployments::Deployments, ApiError> {
    Ok(&state.ready()?.deployments)
}

/// Starts a deployment: a revision of one component, in waves, to the selected hosts.
#[utoipa::path(post, path = "/api/v1/deployments", tag = "deployments",
    security(("bearer" = ["operator"])),
    request_body = CreateDeployment,
    responses((status = 201, body = Deployment),
              (status = 400, body = crate::api::types::ErrorBody),
              (status = 409, description = "another deployment of the component is active on a host", body = crate::api::types::ErrorBody),
              (status = 422, description = "inconsistent (unknown host, empty selector...)", body = crate::api::types::ErrorBody)))]
pub async fn create_deployment(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Extension(request_id): Extension<RequestId>,
    ApiJson(body): ApiJson<CreateDeployment>,
) -> Result<(StatusCode, Json<Deployment>), ApiError> {
    let deployments = ready_deployments(&state)?;
    let new = new_deployment(&body, &caller.who())?;
    let audit = audit_entry(
        &caller,
        &request_id,
        "POST",
        "/api/v1/deployments",
        serde_json::to_value(&body).unwrap_or(serde_json::Value::Null),
    );
    let created = deployments.create_audited(new, Some(&audit)).await?;
    Ok((StatusCode::CREATED, Json(view(&created))))
}

/// Deployments, newest first, with their hosts; page with `before`.
#[utoipa::path(get, path = "/api/v1/deployments", tag = "deployments",
    security(("bearer" = ["viewer"])),
    params(DeploymentQuery),
    responses((status = 200, body = DeploymentPage), (status = 400, body = crate::api::types::ErrorBody)))]
pub async fn list_deployments(
    State(state): State<ApiState>,
    ApiQuery(q): ApiQuery<DeploymentQuery>,
) -> Result<Json<DeploymentPage>, ApiError> {
    let deployments = ready_deployments(&state)?;
    let limit = page_limit(q.limit)?;
    if let Some(s) = q.state.as_deref() {
        if s != "active" && !deployments::STATES.contains(&s) {
            return Err(ApiError::bad_request(format!(
                "state is active or one of {}",
                deployments::STATES.join(", ")
            )));
        }
    }
    let rows = deployments
        .list_filtered(
            q.state.as_deref(),
            q.component.as_deref(),
            q.before,
            u32::try_from(limit).unwrap_or(100),
        )
        .await?;
    let next_cursor = if i64::try_from(rows.len()).unwrap_or(i64::MAX) == limit {
        rows.last().map(|d| d.id)
    } else {
        None
    };
    Ok(Json(DeploymentPage {
        deployments: rows.iter().map(view).collect(),
        next_cursor,
    }))
}

/// One deployment with its hosts.
#[utoipa::path(get, path = "/api/v1/deployments/{id}", tag = "deployments",
    security(("bearer" = ["viewer"])),
    params(("id" = i64, Path, description = "deployment id")),
    responses((status = 200, body = Deployment), (status = 404, body = crate::api::types::ErrorBody)))]
pub async fn get_deployment(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<Deployment>, ApiError> {
    let deployments = ready_deployments(&state)?;
    match deployments.get(id).await? {
        Some(d) => Ok(Json(view(&d))),
        None => Err(ApiError::not_found(format!("no deployment {id}"))),
    }
}

async fn operate(
    state: &ApiState,
    caller: &Caller,
    request_id: &RequestId,
    id: i64,
    verb: &str,
    body: &DeploymentOp,
) -> Result<Json<Deployment>, ApiError> {
    let deployments = ready_deployments(state)?;
    let reason = body
        .reason
        .clone()
        .unwrap_or_else(|| format!("by {}", caller.who()));
    let operation = match verb {
        "pause" => Operation::Pause(reason),
        "resume" => Operation::Resume,
        "promote" => Operation::Promote,
        _ => Operation::RollBack(reason),
    };
    let audit = audit_entry(
        caller,
        request_id,
        "POST",
        &format!("/api/v1/deployments/{{id}}/{verb}"),
        serde_json::json!({ "id": id, "reason": body.reason }),
    );
    let d = deployments.operate_audited(id, operation, &audit).await?;
    Ok(Json(view(&d)))
}

/// Holds new updates of a deployment (reverts go on).
#[utoipa::path(post, path = "/api/v1/deployments/{id}/pause", tag = "deployments",
    security(("bearer" = ["operator"])),
    params(("id" = i64, Path, description = "deployment id")),
    request_body = DeploymentOp,
    responses((status = 200, body = Deployment), (status = 404, body = crate::api::types::ErrorBody),
              (status = 409, description = "it has ended", body = crate::api::types::ErrorBody)))]
pub async fn pause_deployment(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Extension(request_id): Extension<RequestId>,
    ApiPath(id): ApiPath<i64>,
    ApiJson(body): ApiJson<DeploymentOp>,
) -> Result<Json<Deployment>, ApiError> {
    operate(&state, &caller, &request_id, id, "pause", &body).await
}

/// Lets a paused deployment go on.
#[utoipa::path(post, path = "/api/v1/deployments/{id}/resume", tag = "deployments",
    security(("bearer" = ["operator"])),
    params(("id" = i64, Path, description = "deployment id")),
    request_body = DeploymentOp,
    responses((status = 200, body = Deployment), (status = 404, body = crate::api::types::ErrorBody),
              (status = 409, description = "not paused, or ended", body = crate::api::types::ErrorBody)))]
pub async fn resume_deployment(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Extension(request_id): Extension<RequestId>,
    ApiPath(id): ApiPath<i64>,
    ApiJson(body): ApiJson<DeploymentOp>,
) -> Result<Json<Deployment>, ApiError> {
    operate(&state, &caller, &request_id, id, "resume", &body).await
}

/// Promotes a deployment past its canaries (manual promotion).
#[utoipa::path(post, path = "/api/v1/deployments/{id}/promote", tag = "deployments",
    security(("bearer" = ["operator"])),
    params(("id" = i64, Path, description = "deployment id")),
    request_body = DeploymentOp,
    responses((status = 200, body = Deployment), (status = 404, body = crate::api::types::ErrorBody),
              (status = 409, description = "not waiting for promotion, or ended", body = crate::api::types::ErrorBody)))]
pub async fn promote_deployment(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Extension(request_id): Extension<RequestId>,
    ApiPath(id): ApiPath<i64>,
    ApiJson(body): ApiJson<DeploymentOp>,
) -> Result<Json<Deployment>, ApiError> {
    operate(&state, &caller, &request_id, id, "promote", &body).await
}

/// Rolls a deployment back: every host that got the revision returns to the one it ran.
#[utoipa::path(post, path = "/api/v1/deployments/{id}/rollback", tag = "deployments",
    security(("bearer" = ["operator"])),
    params(("id" = i64, Path, description = "deployment id")),
    request_body = DeploymentOp,
    responses((status = 200, body = Deployment), (status = 404, body = crate::api::types::ErrorBody),
              (status = 409, description = "already reverting, or ended", body = crate::api::types::ErrorBody)))]
pub async fn rollback_deployment(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Extension(request_id): Extension<RequestId>,
    ApiPath(id): ApiPath<i64>,
    ApiJson(body): ApiJson<DeploymentOp>,
) -> Result<Json<Deployment>, ApiError> {
    operate(&state, &caller, &request_id, id, "rollback", &body).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(extra: serde_json::Value) -> Result<CreateDeployment, serde_json::Error> {
        let mut v = serde_json::json!({
            "component": "trainer",
            "revision": {"version": "v2", "command": "/bin/trainer", "env": {"A": "1"}},
            "hosts": ["h1"],
        });
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        serde_json::from_value(v)
    }

    #[test]
    fn specs_become_deployments_with_defaults_and_strict_fields() {
        let b = body(serde_json::json!({})).unwrap();
        let n = new_deployment(&b, "ann").unwrap();
        assert_eq!(n.canaries, 1);
        assert_eq!(n.promotion, Promotion::Manual);
        assert!(n.auto_revert);
        assert_eq!(n.created_by, "ann");
        assert_eq!(n.revision.env, vec![("A".to_owned(), "1".to_owned())]);
        let b = body(serde_json::json!({"min_healthy": "2s", "promotion": "auto"})).unwrap();
        let n = new_deployment(&b, "ann").unwrap();
        assert_eq!(n.min_healthy, Duration::from_secs(2));
        assert_eq!(n.promotion, Promotion::Auto);
        for bad in [
            serde_json::json!({"min_healthy": "soon"}),
            serde_json::json!({"healthy_deadline": "48h"}),
            serde_json::json!({"promotion": "yolo"}),
        ] {
            let b = body(bad.clone()).unwrap();
            assert!(new_deployment(&b, "ann").is_err(), "{bad}");
        }
        assert!(body(serde_json::json!({"surprise": 1})).is_err());
        assert!(body(serde_json::json!({"canaries": -1})).is_err());
    }
}
