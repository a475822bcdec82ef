//! Log tail of a component, streamed from its agent as server-sent events.
//!
//! The route sends a `TailLogs` command (audited) and subscribes to its chunks
//! ([`crate::logs::LogHub`]). Each chunk is one `log` event; the stream ends with an
//! `end` event when the agent ends the tail, or when the command fails or expires. A
//! following client that leaves ends the follow: dropping the stream unsubscribes and
//! sends `CancelTail`, so no task, subscription or agent-side follow is left behind
//! (`razar_collector_log_follows` counts live ones).

use super::commands::caller_name;
use crate::api::auth::{Caller, RequestId};
use crate::api::error::{ApiError, ApiPath, ApiQuery};
use crate::api::types::{LogLines, LogQuery};
use crate::api::{audit_entry, ApiState};
use crate::dispatch::{hex_id, CommandRequest, CommandState, Dispatch};
use crate::logs::Subscription;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use chrono::Utc;
use razar_shared::domain::LogStream;
use razar_shared::protocol::{CommandAction, CommandId};
use std::convert::Infallible;
use std::time::Duration;

/// Most lines of history a tail asks for.
pub const MAX_LINES: u32 = 10_000;
/// Deadline of the tail command (it must start by then).
const TAIL_DEADLINE: Duration = Duration::from_secs(60);
/// Without a chunk for this long, the command's state is looked at.
const QUIET_CHECK: Duration = Duration::from_secs(5);

/// Ends the agent's follow when the client leaves before the tail ended.
struct FollowGuard {
    dispatch: Dispatch,
    host: String,
    command: CommandId,
    caller: String,
    request_id: String,
    follow: bool,
    ended: bool,
}

impl Drop for FollowGuard {
    fn drop(&mut self) {
        if !self.follow || self.ended {
            return;
        }
        let request = CommandRequest {
            host: self.host.clone(),
            action: CommandAction::CancelTail {
                command: self.command,
            },
            deadline: Utc::now()
                + chrono::Duration::from_std(TAIL_DEADLINE).unwrap_or(chrono::Duration::zero()),
            caller: self.caller.clone(),
            idempotency_key: Some(format!("cancel-tail-{}", hex_id(&self.command))),
            request_id: Some(self.request_id.clone()),
        };
        let dispatch = self.dispatch.clone();
        let command = hex_id(&self.command);
        // Short-lived: one insert and a hand-over.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(error) = dispatch.submit(request).await {
                    tracing::warn!(%error, %command, "cannot cancel a log follow");
                }
            });
        }
    }
}

struct Tail {
    sub: Subscription,
    guard: FollowGuard,
    done: bool,
}

fn stream_name(s: LogStream) -> String {
    match s {
        LogStream::Stdout => "stdout",
        LogStream::Stderr => "stderr",
    }
    .to_owned()
}

impl Tail {
    /// The next SSE event, or `None` once the tail ended.
    async fn next(&mut self) -> Option<SseEvent> {
        if self.done {
            return None;
        }
        loop {
            match tokio::time::timeout(QUIET_CHECK, self.sub.chunks.recv()).await {
                Ok(Some(chunk)) => {
                    if chunk.end {
                        self.done = true;
                        self.guard.ended = true;
                    }
                    let lines = LogLines {
                        stream: stream_name(chunk.stream),
                        lines: chunk.lines,
                    };
                    if lines.lines.is_empty() && chunk.end {
                        return Some(SseEvent::default().event("end").data("tail ended"));
                    }
                    match SseEvent::default().event("log").json_data(&lines) {
                        Ok(e) => return Some(e),
                        Err(error) => tracing::warn!(%error, "log tail: cannot encode lines"),
                    }
                }
                Ok(None) => return None,
                Err(_) => {
                    // Quiet: did the command fail or expire (no chunk will ever come)?
                    let state = self.guard.dispatch.command(&self.guard.command).await;
                    if let Ok(Some(record)) = state {
                        if matches!(record.state, CommandState::Failed | CommandState::Expired) {
                            self.done = true;
                            self.guard.ended = true;
                            let message = record.message.unwrap_or_default();
                            return Some(
                                SseEvent::default()
                                    .event("end")
                                    .data(format!("{}: {message}", record.state.as_str())),
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Tails a component's log (`lines` of history, then new lines while `follow`), as
/// server-sent events: `log` events (`{stream, lines}`), then `end`.
#[utoipa::path(get, path = "/api/v1/hosts/{host}/components/{component}/logs", tag = "logs",
    security(("bearer" = ["operator"])),
    params(("host" = String, Path, description = "host id"),
           ("component" = String, Path, description = "component name"),
           LogQuery),
    responses((status = 200, description = "text/event-stream of `log` events", content_type = "text/event-stream", body = LogLines),
              (status = 404, body = crate::api::types::ErrorBody)))]
pub async fn tail_logs(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Extension(request_id): Extension<RequestId>,
    ApiPath((host, component)): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery<LogQuery>,
) -> Result<Response, ApiError> {
    let ready = state.ready()?;
    let lines = match q.lines {
        None => 100,
        Some(n @ 0..=MAX_LINES) => n,
        Some(n) => {
            return Err(ApiError::bad_request(format!(
                "lines {n} is outside 0..={MAX_LINES}"
            )))
        }
    };
    let follow = q.follow.unwrap_or(false);
    let audit = audit_entry(
        &caller,
        &request_id,
        "GET",
        "/api/v1/hosts/{host}/components/{component}/logs",
        serde_json::json!({ "host": host, "component": component, "lines": lines, "follow": follow }),
    );
    let request = CommandRequest {
        host: host.clone(),
        action: CommandAction::TailLogs {
            component,
            lines,
            follow,
        },
        deadline: Utc::now()
            + chrono::Duration::from_std(TAIL_DEADLINE).unwrap_or(chrono::Duration::zero()),
        caller: caller_name(&caller),
        idempotency_key: None,
        request_id: Some(request_id.0.clone()),
    };
    let record = ready.dispatch.submit_audited(request, Some(&audit)).await?;
    let tail = Tail {
        sub: ready.logs.subscribe(record.id),
        guard: FollowGuard {
            dispatch: ready.dispatch.clone(),
            host,
            command: record.id,
            caller: caller_name(&caller),
            request_id: request_id.0,
            follow,
            ended: false,
        },
        done: false,
    };
    let events = futures::stream::unfold(tail, |mut tail| async move {
        let event = tail.next().await?;
        Some((Ok::<_, Infallible>(event), tail))
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(5)))
        .into_response())
}
