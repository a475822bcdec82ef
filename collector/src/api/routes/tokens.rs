//! API tokens (admin): create (shown once), list, revoke; each change audited in its
//! transaction.

use crate::api::auth::{Caller, RequestId};
use crate::api::error::{ApiError, ApiJson, ApiPath};
use crate::api::types::{CreateToken, CreatedToken, Role as RoleDto, Token};
use crate::api::{audit_entry, ApiState};
use crate::store::tokens::{self, Role, TokenError, TokenInfo};
use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use chrono::Utc;

/// Longest token lifetime accepted (10 years).
pub const MAX_EXPIRY: std::time::Duration = std::time::Duration::from_secs(3650 * 86_400);

pub fn role_dto(role: Role) -> RoleDto {
    match role {
        Role::Viewer => RoleDto::Viewer,
        Role::Operator => RoleDto::Operator,
        Role::Admin => RoleDto::Admin,
    }
}

pub fn role_of(role: RoleDto) -> Role {
    match role {
        RoleDto::Viewer => Role::Viewer,
        RoleDto::Operator => Role::Operator,
        RoleDto::Admin => Role::Admin,
    }
}

pub fn token_dto(t: &TokenInfo) -> Token {
    Token {
        id: t.id,
        name: t.name.clone(),
        role: role_dto(t.role),
        created_at: t.created_at,
        expires_at: t.expires_at,
        revoked_at: t.revoked_at,
        last_used: t.last_used,
    }
}

/// `expires_in` (e.g. `30d`) as an instant after `now`.
pub fn expiry(
    expires_in: Option<&str>,
    now: chrono::DateTime<Utc>,
) -> Result<Option<chrono::DateTime<Utc>>, String> {
    let Some(text) = expires_in else {
        return Ok(None);
    };
    let d = humantime::parse_duration(text).map_err(|e| format!("expires_in: {e}"))?;
    if d.is_zero() || d > MAX_EXPIRY {
        return Err("expires_in must be above zero and at most 10 years".into());
    }
    let d = chrono::Duration::from_std(d).map_err(|e| format!("expires_in: {e}"))?;
    Ok(Some(now + d))
}

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> ApiError {
        match e {
            TokenError::Db(e) => e.into(),
            e => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", e.to_string()),
        }
    }
}

/// Creates a token; its text is in this answer only.
#[utoipa::path(post, path = "/api/v1/tokens", tag = "tokens",
    security(("bearer" = ["admin"])),
    request_body = CreateToken,
    responses((status = 201, body = CreatedToken), (status = 400, body = crate::api::types::ErrorBody)))]
pub async fn create_token(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Extension(request_id): Extension<RequestId>,
    ApiJson(body): ApiJson<CreateToken>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    let ready = state.ready()?;
    let expires_at =
        expiry(body.expires_in.as_deref(), Utc::now()).map_err(ApiError::bad_request)?;
    let audit = audit_entry(
        &caller,
        &request_id,
        "POST",
        "/api/v1/tokens",
        serde_json::to_value(&body).unwrap_or(serde_json::Value::Null),
    );
    let (info, text) = tokens::create(
        &ready.pool,
        &body.name,
        role_of(body.role),
        expires_at,
        Some(&audit),
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            token: text,
            info: token_dto(&info),
        }),
    ))
}

/// Every token (never their secrets).
#[utoipa::path(get, path = "/api/v1/tokens", tag = "tokens",
    security(("bearer" = ["admin"])),
    responses((status = 200, body = Vec<Token>)))]
pub async fn list_tokens(State(state): State<ApiState>) -> Result<Json<Vec<Token>>, ApiError> {
    let ready = state.ready()?;
    let list = tokens::list(&ready.pool).await?;
    Ok(Json(list.iter().map(token_dto).collect()))
}

/// Revokes a token: it is refused from now on.
#[utoipa::path(delete, path = "/api/v1/tokens/{id}", tag = "tokens",
    security(("bearer" = ["admin"])),
    params(("id" = i64, Path, description = "token id")),
    responses((status = 200, body = Token), (status = 404, body = crate::api::types::ErrorBody)))]
pub async fn revoke_token(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Extension(request_id): Extension<RequestId>,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<Token>, ApiError> {
    let ready = state.ready()?;
    let audit = audit_entry(
        &caller,
        &request_id,
        "DELETE",
        "/api/v1/tokens/{id}",
        serde_json::json!({ "id": id }),
    );
    match tokens::revoke(&ready.pool, id, Some(&audit)).await? {
        Some(t) => Ok(Json(token_dto(&t))),
        None => Err(ApiError::not_found(format!("no token {id}"))),
    }
}
