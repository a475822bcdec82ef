//! Webhook notifications of escalations (`[notify]`, `[[notify.webhook]]`).
//!
//! The engine writes a `notifications` row per configured webhook (whose
//! `min_severity` the escalation reaches) in the same transaction as the decision that
//! opened, re-notified (a level higher, unacknowledged in time) or resolved it. The
//! supervised `notify` task delivers due rows (`FOR UPDATE SKIP LOCKED`: any number of
//! collectors may run it, each row is posted by one at a time): an HTTP 2xx answer
//! marks it `delivered`; anything else records the error and retries after an
//! exponential backoff ([`backoff`]) until `max_attempts`, then it is kept as
//! `undeliverable` (visible, counted), never dropped.

use crate::supervise::Beat;
use chrono::Utc;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use razar_engine::model::Escalation;
use razar_shared::domain::Severity;
use sqlx::{PgPool, Postgres, Transaction};
use std::time::Duration;
use tokio::sync::watch;

/// One webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    /// `http://` URL the JSON is POSTed to (the client has no TLS yet).
    pub url: String,
    /// Escalations below this severity are not sent to it.
    pub min_severity: Severity,
    /// One attempt gives up after this.
    pub timeout: Duration,
}

/// `[notify]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifySettings {
    pub webhooks: Vec<Webhook>,
    /// Attempts before a notification is kept as undeliverable.
    pub max_attempts: u32,
    /// Delay after the first failed attempt; doubles per attempt...
    pub backoff_first: Duration,
    /// ...up to this.
    pub backoff_max: Duration,
    /// How often due notifications are looked for.
    pub poll: Duration,
}

impl Default for NotifySettings {
    fn default() -> NotifySettings {
        NotifySettings {
            webhooks: Vec::new(),
            max_attempts: 8,
            backoff_first: Duration::from_secs(5),
            backoff_max: Duration::from_secs(600),
            poll: Duration::from_secs(1),
        }
    }
}

/// The wait before attempt `attempts + 1` after `attempts` failed ones (≥ 1):
/// `first · 2^(attempts-1)`, at most `max`.
pub fn backoff(attempts: u32, first: Duration, max: Duration) -> Duration {
    let doublings = attempts.saturating_sub(1).min(31);
    first.saturating_mul(1u32 << doublings).min(max)
}

/// Notification metrics.
#[derive(Clone)]
pub struct NotifyMetrics {
    /// `razar_collector_notifications_total{outcome}`: delivered, failed (an attempt),
    /// undeliverable (given up).
    pub attempts: IntCounterVec,
    /// `razar_collector_notifications_pending`
    pub pending: IntGauge,
    /// `razar_collector_notifications_undeliverable`
    pub undeliverable: IntGauge,
}

impl NotifyMetrics {
    pub fn new(registry: &Registry) -> Result<NotifyMetrics, prometheus::Error> {
        let m = NotifyMetrics {
            attempts: IntCounterVec::new(
                Opts::new(
                    "razar_collector_notifications_total",
                    "Webhook notification attempts by outcome: delivered, failed (retried \
                     later), undeliverable (kept, no more attempts).",
                ),
                &["outcome"],
            )?,
            pending: IntGauge::new(
                "razar_collector_notifications_pending",
                "Webhook notifications waiting for delivery.",
            )?,
            undeliverable: IntGauge::new(
                "razar_collector_notifications_undeliverable",
                "Webhook notifications kept as undeliverable.",
            )?,
        };
        registry.register(Box::new(m.attempts.clone()))?;
        registry.register(Box::new(m.pending.clone()))?;
        registry.register(Box::new(m.undeliverable.clone()))?;
        Ok(m)
    }
}

/// Queues the notification of escalation `id` for every webhook it concerns (in the
/// decision's transaction).
pub async fn enqueue(
    tx: &mut Transaction<'static, Postgres>,
    settings: &NotifySettings,
    id: i64,
    e: &Escalation,
    reason: &str,
    level: u32,
) -> Result<(), sqlx::Error> {
    let payload = serde_json::json!({
        "escalation_id": id,
        "reason": reason,
        "level": level,
        "host": e.key.host,
        "subject": e.key.subject,
        "kind": crate::engine_loop::kind_str(e.key.kind),
        "severity": e.severity.as_str(),
        "summary": e.summary,
        "occurrences": e.occurrences,
    });
    for hook in settings
        .webhooks
        .iter()
        .filter(|h| e.severity >= h.min_severity)
    {
        sqlx::query(
            "INSERT INTO notifications (escalation_id, url, level, reason, payload, state,
                 next_attempt_at, created_at)
             VALUES ($1, $2, $3, $4, $5, 'pending', now(), now())",
        )
        .bind(id)
        .bind(&hook.url)
        .bind(i32::try_from(level).unwrap_or(i32::MAX))
        .bind(reason)
        .bind(&payload)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Why a delivery run failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NotifyError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("HTTP client: {0}")]
    Client(String),
}

/// The delivery task: due notifications every `poll`.
pub async fn run(
    pool: PgPool,
    settings: NotifySettings,
    metrics: NotifyMetrics,
    beat: Beat,
    mut stop: watch::Receiver<bool>,
) -> Result<(), NotifyError> {
    let client = reqwest::Client::builder()
        .build()
        .map_err(|e| NotifyError::Client(e.to_string()))?;
    loop {
        while deliver_due(&pool, &settings, &client, &metrics).await? {}
        let (pending, undeliverable): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE state = 'pending'),
                    count(*) FILTER (WHERE state = 'undeliverable')
             FROM notifications",
        )
        .fetch_one(&pool)
        .await?;
        metrics.pending.set(pending);
        metrics.undeliverable.set(undeliverable);
        beat.ok();
        tokio::select! {
            _ = tokio::time::sleep(settings.poll) => {}
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
    }
}

/// Attempts a handful of due notifications; true when there may be more.
async fn deliver_due(
    pool: &PgPool,
    settings: &NotifySettings,
    client: &reqwest::Client,
    metrics: &NotifyMetrics,
) -> Result<bool, NotifyError> {
    const BATCH: i64 = 16;
    let mut tx = pool.begin().await?;
    let due: Vec<(i64, String, serde_json::Value, i32)> = sqlx::query_as(
        "SELECT notification_id, url, payload, attempts FROM notifications
         WHERE state = 'pending' AND next_attempt_at <= now()
         ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(BATCH)
    .fetch_all(&mut *tx)
    .await?;
    let full = i64::try_from(due.len()).unwrap_or(0) == BATCH;
    for (id, url, payload, attempts) in due {
        let timeout = settings
            .webhooks
            .iter()
            .find(|h| h.url == url)
            .map_or(Duration::from_secs(10), |h| h.timeout);
        let sent = client
            .post(&url)
            .timeout(timeout)
            .json(&payload)
            .send()
            .await;
        let error = match sent {
            Ok(r) if r.status().is_success() => None,
            Ok(r) => Some(format!("HTTP {}", r.status())),
            Err(e) => Some(e.to_string()),
        };
        let attempts = u32::try_from(attempts).unwrap_or(0).saturating_add(1);
        match error {
            None => {
                metrics.attempts.with_label_values(&["delivered"]).inc();
                sqlx::query(
                    "UPDATE notifications SET state = 'delivered', attempts = $2,
                         delivered_at = now() WHERE notification_id = $1",
                )
                .bind(id)
                .bind(i32::try_from(attempts).unwrap_or(i32::MAX))
                .execute(&mut *tx)
                .await?;
            }
            Some(error) => {
                let give_up = attempts >= settings.max_attempts;
                let outcome = if give_up { "undeliverable" } else { "failed" };
                metrics.attempts.with_label_values(&[outcome]).inc();
                tracing::warn!(
                    notification = id,
                    url,
                    attempts,
                    error,
                    outcome,
                    "webhook delivery failed"
                );
                let wait = backoff(attempts, settings.backoff_first, settings.backoff_max);
                let next = Utc::now()
                    + chrono::Duration::from_std(wait)
                        .unwrap_or_else(|_| chrono::Duration::hours(1));
                sqlx::query(
                    "UPDATE notifications SET state = $2, attempts = $3, last_error = $4,
                         next_attempt_at = $5 WHERE notification_id = $1",
                )
                .bind(id)
                .bind(if give_up { "undeliverable" } else { "pending" })
                .bind(i32::try_from(attempts).unwrap_or(i32::MAX))
                .bind(error)
                .bind(next)
                .execute(&mut *tx)
                .await?;
            }
        }
    }
    tx.commit().await?;
    Ok(full)
}

/// A notification as stored.
#[derive(Debug, Clone, PartialEq, serde::Serialize, sqlx::FromRow)]
pub struct NotificationRecord {
    pub notification_id: i64,
    pub escalation_id: i64,
    pub url: String,
    pub level: i32,
    pub reason: String,
    pub payload: serde_json::Value,
    pub state: String,
    pub attempts: i32,
    pub next_attempt_at: chrono::DateTime<Utc>,
    pub last_error: Option<String>,
    pub created_at: chrono::DateTime<Utc>,
    pub delivered_at: Option<chrono::DateTime<Utc>>,
}

/// Notifications, newest first (of one escalation when given): pending, delivered and
/// undeliverable alike.
pub async fn list(
    pool: &PgPool,
    escalation: Option<i64>,
    limit: i64,
) -> Result<Vec<NotificationRecord>, sqlx::Error> {
    sqlx::query_as(
        "SELECT notification_id, escalation_id, url, level, reason, payload, state, attempts,
             next_attempt_at, last_error, created_at, delivered_at
         FROM notifications WHERE $1::bigint IS NULL OR escalation_id = $1
         ORDER BY notification_id DESC LIMIT $2",
    )
    .bind(escalation)
    .bind(limit.clamp(1, 10_000))
    .fetch_all(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let s = Duration::from_secs;
        assert_eq!(backoff(1, s(5), s(600)), s(5));
        assert_eq!(backoff(2, s(5), s(600)), s(10));
        assert_eq!(backoff(3, s(5), s(600)), s(20));
        assert_eq!(backoff(8, s(5), s(600)), s(600));
        assert_eq!(backoff(u32::MAX, s(5), s(600)), s(600));
        assert_eq!(backoff(0, s(5), s(600)), s(5));
    }
}
