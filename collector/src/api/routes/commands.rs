//! Commands: create (through dispatch, audited in the command's transaction), get, list.

use crate::api::auth::{Caller, RequestId};
use crate::api::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use crate::api::types::{Action, CommandPage, CommandQuery, CommandView, CreateCommand};
use crate::api::{audit_entry, page_limit, ApiState};
use crate::dispatch::{hex_id, CommandRecord, CommandRequest, CommandState};
use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use chrono::Utc;
use razar_shared::protocol::{CommandAction, CommandId};

/// Default deadline of a command (seconds).
pub const DEFAULT_DEADLINE_SECS: u32 = 300;
/// Longest deadline of a command (seconds).
pub const MAX_DEADLINE_SECS: u32 = 86_400;

/// The wire action of an API action (pure).
pub fn wire_action(action: &Action) -> CommandAction {
    match action.clone() {
        Action::Restart { component } => CommandAction::Restart { component },
        Action::Stop { component } => CommandAction::Stop { component },
        Action::Start { component } => CommandAction::Start { component },
        Action::Quarantine { component, note } => CommandAction::Quarantine { component, note },
        Action::Resolve { component, note } => CommandAction::Resolve { component, note },
        Action::Pulse {
            component,
            budget_ms,
        } => CommandAction::Pulse {
            component,
            budget_ms,
        },
        Action::Rollback {
            component,
            revision,
        } => CommandAction::Rollback {
            component,
            revision,
        },
        Action::DrainGpu { gpu, note } => CommandAction::DrainGpu { gpu, note },
        Action::ResetGpu { gpu } => CommandAction::ResetGpu { gpu },
        Action::SetGpuHealth { gpu, healthy, note } => {
            CommandAction::SetGpuHealth { gpu, healthy, note }
        }
        Action::SwitchProfile { profile } => CommandAction::SwitchProfile { profile },
    }
}

/// Who the caller is as a command's caller (idempotency keys are unique per caller):
/// `token:<id>:<name>` or `cert:<operator>`.
pub fn caller_name(caller: &Caller) -> String {
    caller.key()
}

pub(crate) fn view(record: &CommandRecord) -> CommandView {
    CommandView {
        id: hex_id(&record.id),
        host: record.host.clone(),
        kind: record.kind.clone(),
        component: record.component.clone(),
        gpu: record.gpu,
        state: record.state.as_str().to_owned(),
        caller: record.caller.clone(),
        request_id: record.request_id.clone(),
        idempotency_key: record.idempotency_key.clone(),
        created_at: record.created_at,
        sent_at: record.sent_at,
        finished_at: record.finished_at,
        deadline: record.deadline,
        message: record.message.clone(),
        attempts: record.attempts,
        duplicate: record.duplicate,
        action: serde_json::to_value(&record.action).unwrap_or(serde_json::Value::Null),
    }
}

/// Parses a command id (32 hex digits).
pub fn parse_id(text: &str) -> Option<CommandId> {
    if text.len() != 32 {
        return None;
    }
    let bytes = hex::decode(text).ok()?;
    CommandId::try_from(bytes.as_slice()).ok()
}

/// Sends a command to a host's agent (persisted first; delivered when the host is
/// connected, until its deadline).
#[utoipa::path(post, path = "/api/v1/commands", tag = "commands",
    security(("bearer" = ["operator"])),
    request_body = CreateCommand,
    responses((status = 201, body = CommandView),
              (status = 400, body = crate::api::types::ErrorBody),
              (status = 404, description = "unknown host, component or GPU", body = crate::api::types::ErrorBody),
              (status = 409, description = "idempotency key used for another command", body = crate::api::types::ErrorBody)))]
pub async fn create_command(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Extension(request_id): Extension<RequestId>,
    ApiJson(body): ApiJson<CreateCommand>,
) -> Result<(StatusCode, Json<CommandView>), ApiError> {
    let ready = state.ready()?;
    let secs = match body.deadline_seconds {
        None => DEFAULT_DEADLINE_SECS,
        Some(s @ 1..=MAX_DEADLINE_SECS) => s,
        Some(s) => {
            return Err(ApiError::bad_request(format!(
                "deadline_seconds {s} is outside 1..={MAX_DEADLINE_SECS}"
            )))
        }
    };
    let deadline = Utc::now() + chrono::Duration::seconds(i64::from(secs));
    let audit = audit_entry(
        &caller,
        &request_id,
        "POST",
        "/api/v1/commands",
        serde_json::to_value(&body).unwrap_or(serde_json::Value::Null),
    );
    let request = CommandRequest {
        host: body.host,
        action: wire_action(&body.action),
        deadline,
        caller: caller_name(&caller),
        idempotency_key: body.idempotency_key,
        request_id: Some(request_id.0.clone()),
    };
    let record = ready.dispatch.submit_audited(request, Some(&audit)).await?;
    Ok((StatusCode::CREATED, Json(view(&record))))
}

/// One command.
#[utoipa::path(get, path = "/api/v1/commands/{id}", tag = "commands",
    security(("bearer" = ["viewer"])),
    params(("id" = String, Path, description = "command id, 32 hex digits")),
    responses((status = 200, body = CommandView), (status = 404, body = crate::api::types::ErrorBody)))]
pub async fn get_command(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<CommandView>, ApiError> {
    let ready = state.ready()?;
    let parsed =
        parse_id(&id).ok_or_else(|| ApiError::bad_request("a command id is 32 hex digits"))?;
    match ready.dispatch.command(&parsed).await? {
        Some(record) => Ok(Json(view(&record))),
        None => Err(ApiError::not_found(format!("no command {id}"))),
    }
}

/// Commands, newest first.
#[utoipa::path(get, path = "/api/v1/commands", tag = "commands",
    security(("bearer" = ["viewer"])),
    params(CommandQuery),
    responses((status = 200, body = CommandPage), (status = 400, body = crate::api::types::ErrorBody)))]
pub async fn list_commands(
    State(state): State<ApiState>,
    ApiQuery(q): ApiQuery<CommandQuery>,
) -> Result<Json<CommandPage>, ApiError> {
    let ready = state.ready()?;
    let limit = page_limit(q.limit)?;
    let filter = match q.state.as_deref() {
        None => None,
        Some(s) => Some(CommandState::parse(s).ok_or_else(|| {
            ApiError::bad_request("state is one of queued, sent, succeeded, failed, expired")
        })?),
    };
    let rows = ready
        .dispatch
        .list(q.host.as_deref(), filter, q.before, limit)
        .await?;
    let next_cursor = if i64::try_from(rows.len()).unwrap_or(i64::MAX) == limit {
        rows.last().map(|(seq, _)| *seq)
    } else {
        None
    };
    Ok(Json(CommandPage {
        commands: rows.iter().map(|(_, r)| view(r)).collect(),
        next_cursor,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_parse_strictly() {
        let ok: Action = serde_json::from_str(r#"{"kind":"restart","component":"web"}"#).unwrap();
        assert_eq!(
            wire_action(&ok),
            CommandAction::Restart {
                component: "web".into()
            }
        );
        for bad in [
            r#"{"kind":"restart","component":"web","extra":1}"#,
            r#"{"kind":"shell","cmd":"rm -rf /"}"#,
            r#"{"kind":"restart","component":7}"#,
            r#"{"component":"web"}"#,
        ] {
            assert!(serde_json::from_str::<Action>(bad).is_err(), "{bad}");
        }
        let body = r#"{"host":"h","action":{"kind":"stop","component":"c"},"surprise":true}"#;
        assert!(serde_json::from_str::<CreateCommand>(body).is_err());
    }

    #[test]
    fn ids_are_32_hex_digits() {
        assert_eq!(parse_id(&"ab".repeat(16)), Some([0xab; 16]));
        assert_eq!(parse_id("ab"), None);
        assert_eq!(parse_id(&"zz".repeat(16)), None);
        assert_eq!(parse_id(&"é".repeat(16)), None);
    }
}
