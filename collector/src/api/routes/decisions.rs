//! Decisions of the engine: filtered pages and one decision with its evidence (the
//! events it rests on, the facts the rule saw), the alternatives it rejected, its
//! actions and what became of them, its rule id and version, XID catalog revision and
//! term.

use crate::api::error::{ApiError, ApiPath, ApiQuery};
use crate::api::routes::events::{event_from_row, EVENT_COLUMNS};
use crate::api::types::{
    Decision, DecisionAction, DecisionDetail, DecisionPage, DecisionQuery, RejectedAlternative,
};
use crate::api::{page_limit, ApiState};
use crate::dispatch::hex_id;
use crate::engine_loop::{ActionRecord, EngineHandle};
use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::types::Json as SqlJson;
use sqlx::Row;

/// Columns of a decision with the host and subject of its first evidence event.
const COLUMNS: &str = "d.decision_id, d.seq, d.term, d.rule, d.rule_version, d.catalog_revision,
     d.evidence, d.rejected, d.actions, d.held, d.breaker, d.operator, d.decided_at,
     ev.host_id, ev.subject_id";

/// The first evidence event of `d` (its host and subject), by primary key.
const FIRST_EVENT: &str = "LEFT JOIN LATERAL (
         SELECT e.host_id, e.subject_id FROM events e
         WHERE e.event_id = CASE WHEN jsonb_typeof(d.evidence -> 'events' -> 0) = 'number'
                                 THEN (d.evidence -> 'events' ->> 0)::bigint END) ev ON true";

/// The rejected alternatives as stored (`[{alternative, reason}]`); anything else is
/// shown as one alternative with its JSON (pure).
pub fn rejected(value: &serde_json::Value) -> Vec<RejectedAlternative> {
    match serde_json::from_value::<Vec<RejectedAlternative>>(value.clone()) {
        Ok(r) => r,
        Err(_) if value.is_null() => Vec::new(),
        Err(_) => vec![RejectedAlternative {
            alternative: value.to_string(),
            reason: String::new(),
        }],
    }
}

/// The first fact of the evidence, or the rule (pure).
pub fn summary(rule: &str, evidence: &serde_json::Value) -> String {
    evidence
        .get("facts")
        .and_then(|f| f.as_array())
        .and_then(|f| f.first())
        .and_then(|f| f.as_str())
        .map_or_else(|| rule.to_owned(), str::to_owned)
}

fn decision_from_row(r: &PgRow) -> Result<Decision, sqlx::Error> {
    let rule: String = r.try_get(3)?;
    let SqlJson(evidence): SqlJson<serde_json::Value> = r.try_get(6)?;
    let SqlJson(rejected_json): SqlJson<serde_json::Value> = r.try_get(7)?;
    let SqlJson(actions): SqlJson<serde_json::Value> = r.try_get(8)?;
    let SqlJson(held): SqlJson<serde_json::Value> = r.try_get(9)?;
    let SqlJson(breaker): SqlJson<serde_json::Value> = r.try_get(10)?;
    let created_at: DateTime<Utc> = r.try_get(12)?;
    Ok(Decision {
        id: r.try_get(0)?,
        seq: r.try_get(1)?,
        term: r.try_get(2)?,
        summary: summary(&rule, &evidence),
        rule,
        rule_version: r.try_get(4)?,
        catalog_revision: r.try_get(5)?,
        host: r.try_get(13)?,
        subject: r.try_get(14)?,
        operator: r.try_get(11)?,
        created_at,
        evidence,
        rejected: rejected(&rejected_json),
        actions,
        held,
        breaker,
    })
}

fn action_view(a: &ActionRecord) -> DecisionAction {
    DecisionAction {
        id: a.action_id,
        kind: a.kind.clone(),
        host: a.host_id.clone(),
        action: a.action.clone(),
        state: a.state.clone(),
        command_id: a.command_id.as_deref().map(hex_id),
        error: a.error.clone(),
    }
}

/// Decisions, newest first, filtered; page with `before`.
#[utoipa::path(get, path = "/api/v1/decisions", tag = "decisions",
    security(("bearer" = ["viewer"])),
    params(DecisionQuery),
    responses((status = 200, body = DecisionPage), (status = 400, body = crate::api::types::ErrorBody)))]
pub async fn list_decisions(
    State(state): State<ApiState>,
    ApiQuery(q): ApiQuery<DecisionQuery>,
) -> Result<Json<DecisionPage>, ApiError> {
    let ready = state.ready()?;
    let limit = page_limit(q.limit)?;
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM decisions d {FIRST_EVENT}
         WHERE ($1::text IS NULL OR d.rule = $1)
           AND ($2::text IS NULL OR ev.host_id = $2)
           AND ($3::bigint IS NULL OR d.evidence -> 'events' @> to_jsonb(ARRAY[$3::bigint]))
           AND ($4::bigint IS NULL OR d.decision_id < $4)
         ORDER BY d.decision_id DESC LIMIT $5"
    ))
    .bind(q.rule.as_deref())
    .bind(q.host.as_deref())
    .bind(q.event)
    .bind(q.before)
    .bind(limit)
    .fetch_all(&ready.pool)
    .await?;
    let decisions = rows
        .iter()
        .map(decision_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let next_cursor = if i64::try_from(decisions.len()).unwrap_or(i64::MAX) == limit {
        decisions.last().map(|d| d.id)
    } else {
        None
    };
    Ok(Json(DecisionPage {
        decisions,
        next_cursor,
    }))
}

/// One decision: its evidence events, rejected alternatives and actions.
#[utoipa::path(get, path = "/api/v1/decisions/{id}", tag = "decisions",
    security(("bearer" = ["viewer"])),
    params(("id" = i64, Path, description = "decision id")),
    responses((status = 200, body = DecisionDetail), (status = 404, body = crate::api::types::ErrorBody)))]
pub async fn get_decision(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<DecisionDetail>, ApiError> {
    let ready = state.ready()?;
    let row = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM decisions d {FIRST_EVENT} WHERE d.decision_id = $1"
    ))
    .bind(id)
    .fetch_optional(&ready.pool)
    .await?
    .ok_or_else(|| ApiError::not_found(format!("no decision {id}")))?;
    let decision = decision_from_row(&row)?;
    let ids: Vec<i64> = decision
        .evidence
        .get("events")
        .and_then(|e| e.as_array())
        .map(|a| a.iter().filter_map(serde_json::Value::as_i64).collect())
        .unwrap_or_default();
    let events = sqlx::query(&format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE event_id = ANY($1) ORDER BY event_id"
    ))
    .bind(&ids)
    .fetch_all(&ready.pool)
    .await?
    .iter()
    .map(event_from_row)
    .collect::<Result<Vec<_>, _>>()?;
    let engine_actions = EngineHandle::new(ready.pool.clone())
        .actions(id)
        .await?
        .iter()
        .map(action_view)
        .collect();
    Ok(Json(DecisionDetail {
        decision,
        events,
        engine_actions,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rejected_alternatives_and_summaries_read_what_the_engine_stores() {
        let r = rejected(&json!([{"alternative": "rollback", "reason": "hardware"}]));
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].alternative, "rollback");
        assert!(rejected(&serde_json::Value::Null).is_empty());
        assert_eq!(rejected(&json!({"odd": 1})).len(), 1);
        assert_eq!(
            summary("gpu", &json!({"facts": ["XID 79 on GPU 1"], "events": [3]})),
            "XID 79 on GPU 1"
        );
        assert_eq!(summary("gpu", &json!({"events": []})), "gpu");
    }
}
