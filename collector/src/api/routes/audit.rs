//! The audit log (admin).

use crate::api::error::{ApiError, ApiQuery};
use crate::api::types::{AuditEntry, AuditPage, PageQuery};
use crate::api::{page_limit, ApiState};
use crate::store::audit;
use axum::extract::State;
use axum::Json;

/// Audit rows, newest first.
#[utoipa::path(get, path = "/api/v1/audit", tag = "audit",
    security(("bearer" = ["admin"])),
    params(PageQuery),
    responses((status = 200, body = AuditPage), (status = 400, body = crate::api::types::ErrorBody)))]
pub async fn list_audit(
    State(state): State<ApiState>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<AuditPage>, ApiError> {
    let ready = state.ready()?;
    let limit = page_limit(q.limit)?;
    let rows = audit::list(&ready.pool, q.before, limit).await?;
    let next_cursor = if i64::try_from(rows.len()).unwrap_or(i64::MAX) == limit {
        rows.last().map(|r| r.id)
    } else {
        None
    };
    Ok(Json(AuditPage {
        entries: rows
            .into_iter()
            .map(|r| AuditEntry {
                id: r.id,
                at: r.at,
                token_id: r.token_id,
                who: r.who,
                role: r.role,
                method: r.method,
                route: r.route,
                arguments: r.arguments,
                result: r.result,
                request_id: r.request_id,
            })
            .collect(),
        next_cursor,
    }))
}
