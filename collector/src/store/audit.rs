//! The audit log (`audit_log`, migration 0007): one row per mutating operator call,
//! written in the same transaction as the call's effect.

use chrono::{DateTime, Utc};
use sqlx::postgres::PgConnection;
use sqlx::types::Json;
use sqlx::{PgPool, Row};

/// Who made a call and how (everything of an audit row but its result).
#[derive(Debug, Clone)]
pub struct AuditEntry {
    pub token_id: Option<i64>,
    pub who: String,
    pub role: String,
    pub method: String,
    /// The route template, e.g. `/api/v1/commands`.
    pub route: String,
    pub arguments: serde_json::Value,
    pub request_id: String,
}

/// A stored audit row.
#[derive(Debug, Clone)]
pub struct AuditRow {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub token_id: Option<i64>,
    pub who: String,
    pub role: String,
    pub method: String,
    pub route: String,
    pub arguments: serde_json::Value,
    pub result: String,
    pub request_id: String,
}

impl AuditEntry {
    /// Writes the row with `result` on `conn` (the transaction of the effect).
    pub async fn write(
        &self,
        conn: &mut PgConnection,
        result: &str,
        at: DateTime<Utc>,
    ) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(
            "INSERT INTO audit_log (at, token_id, who, role, method, route, arguments, result, request_id)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING audit_id",
        )
        .bind(at)
        .bind(self.token_id)
        .bind(&self.who)
        .bind(&self.role)
        .bind(&self.method)
        .bind(&self.route)
        .bind(Json(&self.arguments))
        .bind(result)
        .bind(&self.request_id)
        .fetch_one(conn)
        .await
    }
}

/// Audit rows with `audit_id < before` (all when `None`), newest first.
pub async fn list(
    pool: &PgPool,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<AuditRow>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT audit_id, at, token_id, who, role, method, route, arguments, result, request_id
         FROM audit_log WHERE ($1::bigint IS NULL OR audit_id < $1)
         ORDER BY audit_id DESC LIMIT $2",
    )
    .bind(before)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(AuditRow {
                id: r.try_get(0)?,
                at: r.try_get(1)?,
                token_id: r.try_get(2)?,
                who: r.try_get(3)?,
                role: r.try_get(4)?,
                method: r.try_get(5)?,
                route: r.try_get(6)?,
                arguments: r.try_get::<Json<serde_json::Value>, _>(7)?.0,
                result: r.try_get(8)?,
                request_id: r.try_get(9)?,
            })
        })
        .collect()
}
