//! Escalations: filtered pages, one escalation, acknowledge and resolve with a note.
//!
//! Acknowledging or resolving stores an operator event (audited in its transaction) that
//! the decision engine's leader decides on; the answer (202) carries that event's id and
//! the escalation as it stood.

use crate::api::auth::{Caller, RequestId};
use crate::api::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use crate::api::types::{Escalation, EscalationNote, EscalationPage, EscalationQuery, Requested};
use crate::api::{audit_entry, page_limit, ApiState};
use crate::engine_loop::{EngineHandle, EscalationRecord, HandleError};
use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};

/// Every escalation state, and `live` (not resolved).
pub const STATES: [&str; 4] = ["open", "acknowledged", "resolved", "live"];

impl From<HandleError> for ApiError {
    fn from(e: HandleError) -> ApiError {
        let message = e.to_string();
        match e {
            HandleError::UnknownEscalation(_) | HandleError::UnknownGpu { .. } => {
                ApiError::not_found(message)
            }
            HandleError::AlreadyResolved(_) | HandleError::AlreadyAcknowledged(_) => {
                ApiError::new(StatusCode::CONFLICT, "conflict", message)
            }
            HandleError::InvalidText { .. } => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", message)
            }
            HandleError::Db(e) => e.into(),
        }
    }
}

/// The API view of a stored escalation (pure).
pub fn view(e: &EscalationRecord) -> Escalation {
    Escalation {
        id: e.escalation_id,
        host: (!e.host_id.is_empty()).then(|| e.host_id.clone()),
        subject: e.subject.clone(),
        kind: e.kind.clone(),
        state: e.state.clone(),
        severity: e.severity.clone(),
        summary: e.summary.clone(),
        level: e.level,
        occurrences: e.occurrences,
        opened_at: e.opened_at,
        last_seen: e.last_seen,
        acknowledged_at: e.acknowledged_at,
        acknowledged_by: e.acknowledged_by.clone(),
        resolved_at: e.resolved_at,
        resolved_by: e.resolved_by.clone(),
        note: e.note.clone(),
        decision_id: e.decision_id,
    }
}

/// Who an operator is in the engine's records (the token's name).
fn who(caller: &Caller) -> String {
    caller.who()
}

/// Escalations, newest first, filtered; page with `before`.
#[utoipa::path(get, path = "/api/v1/escalations", tag = "escalations",
    security(("bearer" = ["viewer"])),
    params(EscalationQuery),
    responses((status = 200, body = EscalationPage), (status = 400, body = crate::api::types::ErrorBody)))]
pub async fn list_escalations(
    State(state): State<ApiState>,
    ApiQuery(q): ApiQuery<EscalationQuery>,
) -> Result<Json<EscalationPage>, ApiError> {
    let ready = state.ready()?;
    let limit = page_limit(q.limit)?;
    if let Some(s) = q.state.as_deref() {
        if !STATES.contains(&s) {
            return Err(ApiError::bad_request(
                "state is one of open, acknowledged, resolved, live",
            ));
        }
    }
    let rows: Vec<EscalationRecord> = sqlx::query_as(
        "SELECT escalation_id, host_id, subject, kind, state, severity, summary, level,
             occurrences, opened_at, last_seen, acknowledged_at, acknowledged_by,
             resolved_at, resolved_by, note, decision_id
         FROM escalations
         WHERE ($1::text IS NULL OR state = $1 OR ($1 = 'live' AND state <> 'resolved'))
           AND ($2::text IS NULL OR host_id = $2)
           AND ($3::text IS NULL OR severity = $3)
           AND ($4::text IS NULL OR kind = $4)
           AND ($5::bigint IS NULL OR escalation_id < $5)
         ORDER BY escalation_id DESC LIMIT $6",
    )
    .bind(q.state.as_deref())
    .bind(q.host.as_deref())
    .bind(q.severity.as_deref())
    .bind(q.kind.as_deref())
    .bind(q.before)
    .bind(limit)
    .fetch_all(&ready.pool)
    .await?;
    let next_cursor = if i64::try_from(rows.len()).unwrap_or(i64::MAX) == limit {
        rows.last().map(|e| e.escalation_id)
    } else {
        None
    };
    Ok(Json(EscalationPage {
        escalations: rows.iter().map(view).collect(),
        next_cursor,
    }))
}

/// One escalation.
#[utoipa::path(get, path = "/api/v1/escalations/{id}", tag = "escalations",
    security(("bearer" = ["viewer"])),
    params(("id" = i64, Path, description = "escalation id")),
    responses((status = 200, body = Escalation), (status = 404, body = crate::api::types::ErrorBody)))]
pub async fn get_escalation(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<Escalation>, ApiError> {
    let ready = state.ready()?;
    match EngineHandle::new(ready.pool.clone()).escalation(id).await? {
        Some(e) => Ok(Json(view(&e))),
        None => Err(ApiError::not_found(format!("no escalation {id}"))),
    }
}

async fn request(
    state: &ApiState,
    caller: &Caller,
    request_id: &RequestId,
    id: i64,
    verb: &str,
    note: &EscalationNote,
) -> Result<(StatusCode, Json<Requested>), ApiError> {
    let ready = state.ready()?;
    let engine = EngineHandle::new(ready.pool.clone());
    let audit = audit_entry(
        caller,
        request_id,
        "POST",
        &format!("/api/v1/escalations/{{id}}/{verb}"),
        serde_json::json!({ "id": id, "note": note.note }),
    );
    let who = who(caller);
    let event_id = if verb == "ack" {
        engine
            .acknowledge_audited(id, &who, &note.note, &audit)
            .await?
    } else {
        engine.resolve_audited(id, &who, &note.note, &audit).await?
    };
    let escalation = engine.escalation(id).await?.map(|e| view(&e));
    Ok((
        StatusCode::ACCEPTED,
        Json(Requested {
            event_id,
            request: verb.to_owned(),
            escalation,
        }),
    ))
}

/// Acknowledges an escalation (stops its re-notification); the engine decides on it.
#[utoipa::path(post, path = "/api/v1/escalations/{id}/ack", tag = "escalations",
    security(("bearer" = ["operator"])),
    params(("id" = i64, Path, description = "escalation id")),
    request_body = EscalationNote,
    responses((status = 202, body = Requested),
              (status = 404, body = crate::api::types::ErrorBody),
              (status = 409, description = "already acknowledged or resolved", body = crate::api::types::ErrorBody)))]
pub async fn ack_escalation(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Extension(request_id): Extension<RequestId>,
    ApiPath(id): ApiPath<i64>,
    ApiJson(body): ApiJson<EscalationNote>,
) -> Result<(StatusCode, Json<Requested>), ApiError> {
    request(&state, &caller, &request_id, id, "ack", &body).await
}

/// Resolves an escalation with a note; the engine decides on it.
#[utoipa::path(post, path = "/api/v1/escalations/{id}/resolve", tag = "escalations",
    security(("bearer" = ["operator"])),
    params(("id" = i64, Path, description = "escalation id")),
    request_body = EscalationNote,
    responses((status = 202, body = Requested),
              (status = 404, body = crate::api::types::ErrorBody),
              (status = 409, description = "already resolved", body = crate::api::types::ErrorBody)))]
pub async fn resolve_escalation(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Extension(request_id): Extension<RequestId>,
    ApiPath(id): ApiPath<i64>,
    ApiJson(body): ApiJson<EscalationNote>,
) -> Result<(StatusCode, Json<Requested>), ApiError> {
    request(&state, &caller, &request_id, id, "resolve", &body).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_parse_strictly() {
        let ok: EscalationNote = serde_json::from_str(r#"{"note":"on it"}"#).unwrap();
        assert_eq!(ok.note, "on it");
        let empty: EscalationNote = serde_json::from_str("{}").unwrap();
        assert_eq!(empty.note, "");
        for bad in [
            r#"{"note":7}"#,
            r#"{"note":"x","extra":1}"#,
            r#""note""#,
            "[1]",
        ] {
            assert!(
                serde_json::from_str::<EscalationNote>(bad).is_err(),
                "{bad}"
            );
        }
    }
}
