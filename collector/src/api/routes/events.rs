//! Events: filtered pages and a live stream (SSE) resumable with no gap and no
//! duplicate.
//!
//! Event ids come from a sequence, so they are handed out in one order and committed in
//! another: id 8 may be visible while 7's transaction is still open. The stream
//! delivers events strictly in id order and never passes a missing id until it is
//! known to be settled: either it appears, or every transaction open when the gap was
//! first seen has ended (then the id was rolled back and will never appear). A client
//! resuming from the last id it saw (`Last-Event-ID`) therefore misses nothing and sees
//! nothing twice.

use crate::api::error::{ApiError, ApiQuery};
use crate::api::types::{Event, EventPage, EventQuery, StreamQuery};
use crate::api::{page_limit, ApiState};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use sqlx::postgres::PgRow;
use sqlx::types::Json as SqlJson;
use sqlx::{PgPool, Row};
use std::convert::Infallible;
use std::time::Duration;

pub(crate) const EVENT_COLUMNS: &str =
    "event_id, host_id, ts, severity, subject_kind, subject_id, kind, message, payload";

/// How often the stream looks for new events.
const STREAM_POLL: Duration = Duration::from_millis(250);
/// Most events read per look.
const STREAM_BATCH: i64 = 1000;

pub(crate) fn event_from_row(row: &PgRow) -> Result<Event, sqlx::Error> {
    let SqlJson(payload): SqlJson<serde_json::Value> = row.try_get(8)?;
    Ok(Event {
        id: row.try_get(0)?,
        host_id: row.try_get(1)?,
        ts: row.try_get(2)?,
        severity: row.try_get(3)?,
        subject_kind: row.try_get(4)?,
        subject_id: row.try_get(5)?,
        kind: row.try_get(6)?,
        message: row.try_get(7)?,
        payload,
    })
}

/// Events, newest first, filtered; page with `before`.
#[utoipa::path(get, path = "/api/v1/events", tag = "events",
    security(("bearer" = ["viewer"])),
    params(EventQuery),
    responses((status = 200, body = EventPage), (status = 400, body = crate::api::types::ErrorBody)))]
pub async fn list_events(
    State(state): State<ApiState>,
    ApiQuery(q): ApiQuery<EventQuery>,
) -> Result<Json<EventPage>, ApiError> {
    let limit = page_limit(q.limit)?;
    if let (Some(from), Some(to)) = (q.from, q.to) {
        if to <= from {
            return Err(ApiError::bad_request("`to` must be after `from`"));
        }
    }
    let pool = &state.ready()?.pool;
    let (subject_kind, subject_id) = match (&q.component, q.gpu) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "filter by `component` or by `gpu`, not both",
            ))
        }
        (Some(c), None) => (Some("component"), Some(c.clone())),
        (None, Some(g)) => (Some("gpu"), Some(g.to_string())),
        (None, None) => (None, None),
    };
    let rows = sqlx::query(&format!(
        "SELECT {EVENT_COLUMNS} FROM events
         WHERE ($1::text IS NULL OR host_id = $1)
           AND ($2::text IS NULL OR subject_kind = $2)
           AND ($3::text IS NULL OR subject_id = $3)
           AND ($4::text IS NULL OR kind = $4)
           AND ($5::text IS NULL OR severity = $5)
           AND ($6::timestamptz IS NULL OR ts >= $6)
           AND ($7::timestamptz IS NULL OR ts < $7)
           AND ($8::bigint IS NULL OR event_id < $8)
         ORDER BY event_id DESC LIMIT $9"
    ))
    .bind(&q.host)
    .bind(subject_kind)
    .bind(subject_id)
    .bind(&q.kind)
    .bind(&q.severity)
    .bind(q.from)
    .bind(q.to)
    .bind(q.before)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let events: Vec<Event> = rows.iter().map(event_from_row).collect::<Result<_, _>>()?;
    let next_cursor = if i64::try_from(events.len()).unwrap_or(i64::MAX) == limit {
        events.last().map(|e| e.id)
    } else {
        None
    };
    Ok(Json(EventPage {
        events,
        next_cursor,
    }))
}

/// Where a stream stands.
#[derive(Debug, Clone, PartialEq)]
pub struct Cursor {
    /// Every id up to this one is delivered or settled as never to come.
    pub last: i64,
    /// The first missing id above `last` and when (server time) it was first seen
    /// missing.
    pub gap: Option<(i64, DateTime<Utc>)>,
}

impl Cursor {
    /// Advances over `ids` (ascending, all above `last`, as read at `seen_at`); returns
    /// how many of them may be delivered now. `open_since` is the start of the oldest
    /// transaction open just before they were read (none: no transaction open): a gap
    /// first seen before it started can only be an id rolled back (pure).
    pub fn advance(
        &mut self,
        ids: &[i64],
        seen_at: DateTime<Utc>,
        open_since: Option<DateTime<Utc>>,
    ) -> usize {
        let mut delivered = 0;
        for &id in ids {
            while id > self.last + 1 {
                let missing = self.last + 1;
                match self.gap {
                    Some((g, first_seen))
                        if g == missing && open_since.is_none_or(|s| s > first_seen) =>
                    {
                        // Everything open when it went missing has ended: rolled back.
                        self.last = missing;
                        self.gap = None;
                    }
                    Some((g, _)) if g == missing => return delivered,
                    _ => {
                        self.gap = Some((missing, seen_at));
                        return delivered;
                    }
                }
            }
            self.last = id;
            self.gap = None;
            delivered += 1;
        }
        delivered
    }
}

struct Stream {
    pool: PgPool,
    cursor: Cursor,
    filter: StreamQuery,
}

impl Stream {
    /// One look: the events now deliverable, in id order, filtered.
    async fn next_batch(&mut self) -> Result<Vec<Event>, sqlx::Error> {
        // The horizon first, then the events: a gap's writer started before the gap
        // was seen, so once no transaction that old is open, the gap is final.
        let open_since: Option<DateTime<Utc>> = sqlx::query_scalar(
            "SELECT min(xact_start) FROM pg_stat_activity
             WHERE xact_start IS NOT NULL AND pid <> pg_backend_pid()
               AND backend_type = 'client backend' AND datname = current_database()",
        )
        .fetch_one(&self.pool)
        .await?;
        let rows = sqlx::query(&format!(
            "SELECT {EVENT_COLUMNS}, clock_timestamp() FROM events
             WHERE event_id > $1 ORDER BY event_id LIMIT $2"
        ))
        .bind(self.cursor.last)
        .bind(STREAM_BATCH)
        .fetch_all(&self.pool)
        .await?;
        let Some(seen_at) = rows
            .last()
            .map(|r| r.try_get::<DateTime<Utc>, _>(9))
            .transpose()?
        else {
            return Ok(Vec::new());
        };
        let events: Vec<Event> = rows.iter().map(event_from_row).collect::<Result<_, _>>()?;
        let ids: Vec<i64> = events.iter().map(|e| e.id).collect();
        let n = self.cursor.advance(&ids, seen_at, open_since);
        let f = &self.filter;
        Ok(events
            .into_iter()
            .take(n)
            .filter(|e| {
                f.host.as_ref().is_none_or(|h| *h == e.host_id)
                    && f.kind.as_ref().is_none_or(|k| *k == e.kind)
                    && f.severity.as_ref().is_none_or(|s| *s == e.severity)
            })
            .collect())
    }
}

/// Live events as server-sent events (`event: event`, `id:` the event id, `data:` the
/// event as JSON), in id order. Resumes after the `Last-Event-ID` header (or `after`)
/// with no gap and no duplicate; without either, starts after the newest event.
#[utoipa::path(get, path = "/api/v1/events/stream", tag = "events",
    security(("bearer" = ["viewer"])),
    params(StreamQuery, ("Last-Event-ID" = Option<String>, Header, description = "resume after this event id")),
    responses((status = 200, description = "text/event-stream of events", content_type = "text/event-stream", body = Event),
              (status = 400, body = crate::api::types::ErrorBody)))]
pub async fn stream_events(
    State(state): State<ApiState>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<StreamQuery>,
) -> Result<Response, ApiError> {
    let pool = state.ready()?.pool.clone();
    let resume = match headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
                .filter(|id| *id >= 0)
                .ok_or_else(|| ApiError::bad_request("Last-Event-ID is not an event id"))?,
        ),
        None => q.after,
    };
    if resume.is_some_and(|id| id < 0) {
        return Err(ApiError::bad_request("`after` must not be negative"));
    }
    let last = match resume {
        Some(id) => id,
        None => sqlx::query_scalar::<_, Option<i64>>("SELECT max(event_id) FROM events")
            .fetch_one(&pool)
            .await?
            .unwrap_or(0),
    };
    let stream = Stream {
        pool,
        cursor: Cursor { last, gap: None },
        filter: q,
    };
    let events = futures::stream::unfold(stream, |mut stream| async move {
        loop {
            match stream.next_batch().await {
                Ok(batch) if !batch.is_empty() => return Some((batch, stream)),
                Ok(_) => tokio::time::sleep(STREAM_POLL).await,
                Err(error) => {
                    tracing::warn!(%error, "event stream: reading events failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    })
    .flat_map(futures::stream::iter)
    .filter_map(|event| async move {
        match SseEvent::default()
            .id(event.id.to_string())
            .event("event")
            .json_data(&event)
        {
            Ok(e) => Some(Ok::<_, Infallible>(e)),
            Err(error) => {
                tracing::warn!(%error, id = event.id, "event stream: cannot encode an event");
                None
            }
        }
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(5)))
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + s, 0).unwrap()
    }

    #[test]
    fn contiguous_ids_are_delivered() {
        let mut c = Cursor { last: 4, gap: None };
        assert_eq!(c.advance(&[5, 6, 7], t(0), None), 3);
        assert_eq!(c.last, 7);
    }

    #[test]
    fn a_gap_holds_back_what_follows_until_it_fills() {
        let mut c = Cursor { last: 4, gap: None };
        // 6 committed before 5: 6 waits.
        assert_eq!(c.advance(&[6], t(0), Some(t(-1))), 0);
        assert_eq!(c.gap, Some((5, t(0))));
        // Still open (a transaction from before the gap was seen).
        assert_eq!(c.advance(&[6], t(1), Some(t(-1))), 0);
        assert_eq!(c.last, 4);
        // 5 commits: both go, in order.
        assert_eq!(c.advance(&[5, 6], t(2), Some(t(-1))), 2);
        assert_eq!((c.last, c.gap), (6, None));
    }

    #[test]
    fn a_rolled_back_id_is_passed_once_every_older_transaction_ended() {
        let mut c = Cursor { last: 4, gap: None };
        assert_eq!(c.advance(&[6, 7], t(0), Some(t(-5))), 0);
        // Only transactions that started after the gap was seen are open now.
        assert_eq!(c.advance(&[6, 7], t(3), Some(t(1))), 2);
        assert_eq!(c.last, 7);
        // Nothing open at all also settles a gap.
        let mut c = Cursor { last: 0, gap: None };
        assert_eq!(c.advance(&[2], t(0), None), 0);
        assert_eq!(c.advance(&[2], t(1), None), 1);
    }
}
