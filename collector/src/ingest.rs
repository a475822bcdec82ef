//! One agent connection: a task that drives the sans-IO [`CollectorSession`] over the
//! agent's stream and hands what it receives to the store.
//!
//! Ordering and exactly-once: database work (series registrations, batches) runs in
//! arrival order, one write at a time per connection; batches already received go
//! together as one request to the group writer ([`crate::group`]), which commits the
//! requests of many connections in one transaction (group commit) and answers each with
//! its own outcome; the session acknowledges only what the store committed (each
//! agent's cursor moves in the same transaction as its batches).
//!
//! Back-pressure: when the pending work reaches its bound (batches or samples) the task
//! stops reading the stream, so QUIC flow control pushes back on the agent; it resumes
//! when the database catches up (the group writer's queue is bounded too). Database
//! errors (a failed group included) are retried with backoff, forever, while the
//! connection lives; nothing is acknowledged before its commit. A request the store
//! refuses (undefined series, sequence out of range) fails alone and closes the session;
//! values it will not keep are refused by rule inside a stored batch, and a batch the
//! database refuses for its data is set aside and acknowledged ([`crate::group`]).
//!
//! Replies are bounded too: at most `max_pending_reply_bytes` wait to be sent; at the
//! bound the task stops reading and taking commands until the agent takes its replies,
//! and a peer that does not take them within `reply_stall_timeout` is closed as
//! `slow_reader`. Writing comes before reading, so a busy stream cannot starve the
//! replies.

use crate::group::GroupError;
use crate::server::{CloseReason, Shared};
use crate::store::{IngestOutcome, SeriesMap, StoreError};
use chrono::Utc;
use razar_shared::protocol::codec::{encode_into, AgentFrameDecoder};
use razar_shared::protocol::session::{
    negotiate_version, CollectorEvent, CollectorSession, CollectorState, SessionError,
};
use razar_shared::protocol::{
    Batch, Command, Hello, RefusalReason, SeriesDef, PROTOCOL_MAX, PROTOCOL_MIN,
};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Most bytes taken from an agent's stream at a time.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Capacity the reply buffer keeps once everything is sent (10,000 idle agents should
/// not each keep the largest burst they ever had).
const REPLY_KEEP_CAPACITY: usize = 16 * 1024;

/// Database work waiting its turn, in arrival order.
enum Op {
    Define(Vec<SeriesDef>),
    Batch(Batch, Instant),
}

/// The outcome of one database write, with the work it covered (kept for a retry).
enum Written {
    Defined {
        defs: Vec<SeriesDef>,
        result: Result<SeriesMap, StoreError>,
    },
    Ingested {
        /// The writers release their reference before answering: sole owner again.
        batches: Arc<Vec<Batch>>,
        /// When each batch arrived (for the ack latency).
        arrived: Vec<Instant>,
        result: Result<IngestOutcome, GroupError>,
    },
}

type WriteFuture = Pin<Box<dyn Future<Output = Written> + Send>>;

enum Step {
    Read(Result<Option<bytes::Bytes>, quinn::ReadError>),
    Wrote(Result<usize, quinn::WriteError>),
    Db(Written),
    Retry,
    Timer,
    Command(Option<Command>),
    Shutdown,
    ReplyStall,
    Closed,
}

/// Replies encoded for the agent and not yet taken by its stream, bounded by the caller
/// (see [`Replies::backlog`]); what was sent is dropped as it goes, so the buffer never
/// holds more than the backlog plus what was sent since the last compaction (at most as
/// much again).
#[derive(Debug, Default)]
struct Replies {
    buf: Vec<u8>,
    sent: usize,
}

impl Replies {
    /// Bytes waiting to be sent.
    fn backlog(&self) -> usize {
        self.buf.len() - self.sent
    }

    fn unsent(&self) -> &[u8] {
        &self.buf[self.sent..]
    }

    /// `n` more bytes were taken by the stream.
    fn consumed(&mut self, n: usize) {
        self.sent = (self.sent + n).min(self.buf.len());
        if self.sent == self.buf.len() {
            self.buf.clear();
            self.sent = 0;
            if self.buf.capacity() > REPLY_KEEP_CAPACITY {
                self.buf.shrink_to(REPLY_KEEP_CAPACITY);
            }
        } else if self.sent * 2 >= self.buf.len() {
            // Drop the sent half: amortised, one copy of what is left.
            self.buf.drain(..self.sent);
            self.sent = 0;
        }
    }

    /// Where new replies are encoded.
    fn buf_mut(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Bytes held (sent and not yet compacted, plus the backlog).
    #[cfg(test)]
    fn held(&self) -> usize {
        self.buf.len()
    }
}

struct Conn {
    shared: Arc<Shared>,
    conn: quinn::Connection,
    host: String,
    id: u64,
    session: CollectorSession,
    ops: VecDeque<Op>,
    pending_batches: usize,
    pending_samples: usize,
    series: Arc<SeriesMap>,
    writing: Option<WriteFuture>,
    retry_at: Option<Instant>,
    retry_delay: Duration,
    paused: bool,
    draining: bool,
    db_session: Option<i64>,
    /// Stable code of the refusal that closed the session, for the close reason.
    refusal: Option<&'static str>,
    /// Resends the session answered by itself (at or below the cursor it welcomed with).
    duplicates_seen: u64,
    /// Part of a frame is buffered (for the close reason when the grace runs out).
    partial_frame: bool,
    /// Why the session is draining: the agent finished its stream, or shutdown.
    drain_reason: CloseReason,
}

/// Serves one authenticated connection until it ends.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    host: String,
    serial: String,
    mut shutdown: watch::Receiver<bool>,
) {
    let now = Instant::now();
    shared.liveness.connected(&host, now);
    let (commands_tx, mut commands_rx) = mpsc::channel(256);
    let id = shared.register(&host, &serial, &conn, commands_tx);
    let hello_timeout = shared.config.hello_timeout;
    let stream = tokio::select! {
        s = tokio::time::timeout(hello_timeout, conn.accept_bi()) => s,
        _ = shutdown.changed() => Ok(Err(quinn::ConnectionError::LocallyClosed)),
    };
    let mut c = Conn {
        session: CollectorSession::new(host.clone(), now),
        shared: shared.clone(),
        conn: conn.clone(),
        host: host.clone(),
        id,
        ops: VecDeque::new(),
        pending_batches: 0,
        pending_samples: 0,
        series: Arc::new(SeriesMap::default()),
        writing: None,
        retry_at: None,
        retry_delay: Duration::ZERO,
        paused: false,
        draining: false,
        db_session: None,
        refusal: None,
        duplicates_seen: 0,
        partial_frame: false,
        drain_reason: CloseReason::Shutdown,
    };
    match stream {
        Ok(Ok((send, recv))) => c.run(send, recv, &mut commands_rx, &mut shutdown).await,
        Ok(Err(e)) => {
            tracing::debug!(host = %host, error = %e, "connection ended before its stream opened")
        }
        Err(_) => {
            shared.metrics.refuse("hello_timeout");
            shared.close(&conn, CloseReason::HelloTimeout);
        }
    }
    if c.paused {
        shared.metrics.connections_paused.dec();
    }
    shared.liveness.disconnected(&host, c.paused);
    shared.unregister(id);
    if let Some(session_id) = c.db_session {
        let store = shared.store.clone();
        // Best effort: a session row left open is closed by the next start's cleanup.
        tokio::spawn(async move {
            let _ = store.close_session(session_id, Utc::now()).await;
        });
    }
}

impl Conn {
    async fn run(
        &mut self,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        commands: &mut mpsc::Receiver<Command>,
        shutdown: &mut watch::Receiver<bool>,
    ) {
        let mut decoder = AgentFrameDecoder::new();
        let mut out = Replies::default();
        let config = &self.shared.config;
        let (max_pending, max_samples) = (config.max_pending_batches, config.max_pending_samples);
        let (max_replies, reply_stall) =
            (config.max_pending_reply_bytes, config.reply_stall_timeout);
        // Since when the replies have been at their bound.
        let mut replies_full_since: Option<Instant> = None;
        loop {
            while let Some(event) = self.session.poll_event() {
                self.on_event(event).await;
            }
            if self.writing.is_none()
                && !self.ops.is_empty()
                && self.retry_at.is_none_or(|t| Instant::now() >= t)
            {
                self.retry_at = None;
                self.start_write();
            }
            while let Some(msg) = self.session.poll_transmit() {
                if let Err(e) = encode_into(&msg, out.buf_mut()) {
                    tracing::error!(host = %self.host, error = %e, "cannot encode a message for the agent");
                }
            }
            let flushed = out.backlog() == 0;
            let idle = self.ops.is_empty() && self.writing.is_none();
            if self.session.state() == CollectorState::Closed && flushed {
                return self.close_after_refusal(&mut send).await;
            }
            if self.draining && idle && flushed {
                let _ = send.finish();
                self.shared.close(&self.conn, self.drain_reason);
                return;
            }
            // Replies at their bound: read nothing more (no new replies) until the agent
            // takes some; one that takes none within the stall timeout is closed.
            let replies_full = out.backlog() >= max_replies;
            let stall_at = if replies_full {
                Some(*replies_full_since.get_or_insert_with(Instant::now) + reply_stall)
            } else {
                replies_full_since = None;
                None
            };
            if stall_at.is_some_and(|at| Instant::now() >= at) {
                tracing::warn!(host = %self.host, waiting_bytes = out.backlog(), "agent does not read its replies; closing");
                self.shared.close(&self.conn, CloseReason::SlowReader);
                return;
            }
            let should_pause =
                self.pending_batches >= max_pending || self.pending_samples >= max_samples;
            self.set_paused(should_pause);
            let reading = !self.paused
                && !replies_full
                && !self.draining
                && self.session.state() != CollectorState::Closed;
            // The heartbeat grace does not run while this side is not reading.
            let timeout = if self.paused || replies_full {
                None
            } else {
                self.session.poll_timeout()
            };
            let step = tokio::select! {
                biased;
                // Replies first: a stream that always has data to read cannot starve them.
                r = send.write(out.unsent()), if !flushed => Step::Wrote(r),
                // Chunks straight from quinn's receive buffer: no read buffer of our own per
                // connection (10,000 idle agents would hold 64 KiB each).
                r = recv.read_chunk(READ_CHUNK_BYTES, true), if reading => Step::Read(r.map(|c| c.map(|c| c.bytes))),
                w = poll_write(&mut self.writing), if self.writing.is_some() => Step::Db(w),
                _ = sleep_until(self.retry_at), if self.retry_at.is_some() && self.writing.is_none() => Step::Retry,
                _ = sleep_until(timeout), if timeout.is_some() => Step::Timer,
                _ = sleep_until(stall_at), if stall_at.is_some() => Step::ReplyStall,
                c = commands.recv(), if !replies_full => Step::Command(c),
                _ = shutdown.changed(), if !self.draining => Step::Shutdown,
                _ = self.conn.closed() => Step::Closed,
            };
            match step {
                Step::Read(Ok(Some(chunk))) => {
                    let now = Instant::now();
                    self.shared.liveness.heard(&self.host, now);
                    let mut input: &[u8] = &chunk;
                    loop {
                        match decoder.feed(&mut input) {
                            Ok(Some(msg)) => {
                                self.session.handle(msg, now);
                                let duplicates = self.session.duplicate_batches();
                                if duplicates > self.duplicates_seen {
                                    self.shared
                                        .metrics
                                        .batches_duplicate
                                        .inc_by(duplicates - self.duplicates_seen);
                                    self.duplicates_seen = duplicates;
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                tracing::warn!(host = %self.host, error = %e, code = e.code(), "undecodable frame from agent");
                                self.session.refuse(
                                    RefusalReason::ProtocolViolation,
                                    &format!("undecodable frame: {e}"),
                                );
                                break;
                            }
                        }
                        // Events are handled at the top of the loop; stop early if the
                        // session closed.
                        if self.session.state() == CollectorState::Closed {
                            break;
                        }
                    }
                    self.partial_frame = decoder.buffered_len() > 0;
                }
                Step::Read(Ok(None)) => {
                    // The agent finished its stream: commit what we have, then close.
                    self.draining = true;
                    self.drain_reason = CloseReason::StreamFinished;
                }
                Step::Read(Err(e)) => {
                    tracing::debug!(host = %self.host, error = %e, "agent stream read ended");
                    return;
                }
                Step::Wrote(Ok(n)) => out.consumed(n),
                Step::Wrote(Err(e)) => {
                    tracing::debug!(host = %self.host, error = %e, "agent stream write ended");
                    return;
                }
                Step::Db(written) => self.on_written(written),
                Step::Retry => {}
                Step::Timer => self.session.handle_timeout(Instant::now()),
                Step::Command(Some(command)) => {
                    let id = command.id;
                    match self.session.send_command(command) {
                        Ok(()) => {}
                        Err(e @ SessionError::CommandNeedsVersion { .. }) => {
                            fail_undeliverable(&self.shared.ledger, &self.host, id, &e).await;
                        }
                        Err(_) => {
                            tracing::debug!(host = %self.host, "command for an agent not yet welcomed dropped");
                        }
                    }
                }
                Step::Command(None) => {}
                Step::Shutdown => {
                    self.draining = true;
                    self.drain_reason = CloseReason::Shutdown;
                }
                // Checked at the top of the loop.
                Step::ReplyStall => {}
                Step::Closed => return,
            }
        }
    }

    fn set_paused(&mut self, paused: bool) {
        if paused != self.paused {
            self.paused = paused;
            self.shared
                .liveness
                .paused(&self.host, paused, Instant::now());
            if paused {
                tracing::debug!(host = %self.host, batches = self.pending_batches, "database behind: not reading");
                self.shared.metrics.connections_paused.inc();
            } else {
                self.shared.metrics.connections_paused.dec();
            }
        }
    }

    async fn on_event(&mut self, event: CollectorEvent) {
        match event {
            CollectorEvent::HelloReceived(hello) => self.hello(hello).await,
            CollectorEvent::SeriesDefined(defs) => self.ops.push_back(Op::Define(defs)),
            CollectorEvent::Batch(batch) => {
                if self.pending_batches == 0 {
                    // Nothing was waiting: the clock for "not advancing" starts now.
                    self.shared
                        .liveness
                        .unacked(&self.host, Some(Instant::now()));
                }
                self.pending_batches += 1;
                self.pending_samples += batch.sample_count();
                if batch.sample_count() > 0 {
                    self.shared.liveness.sampled(&self.host, Instant::now());
                }
                self.ops.push_back(Op::Batch(batch, Instant::now()));
            }
            CollectorEvent::Heartbeat(_) => {}
            CollectorEvent::CommandResult(result) => {
                tracing::info!(host = %self.host, command = %hex_id(&result.id), outcome = ?result.outcome, "command result");
                // Rare and small, like an inventory. Not stored (database down): the
                // command stays `sent` and is delivered again on the next connection,
                // where the agent answers with the same outcome.
                if let Err(e) = self
                    .shared
                    .ledger
                    .record_result(&self.host, &result, Utc::now())
                    .await
                {
                    tracing::warn!(host = %self.host, command = %hex_id(&result.id), error = %e, "cannot store a command result; it comes again after a reconnect");
                }
            }
            CollectorEvent::LogChunk(chunk) => {
                tracing::debug!(host = %self.host, component = %chunk.component, lines = chunk.lines.len(), "log chunk");
                self.shared.logs.publish(chunk);
            }
            CollectorEvent::Inventory(inventory) => {
                // Rare (a component changed state, a reload, a GPU change) and small.
                let at = Utc::now();
                if let Err(e) = self
                    .shared
                    .store
                    .record_inventory(&self.host, &inventory, at)
                    .await
                {
                    tracing::warn!(host = %self.host, error = %e, "cannot record the inventory; the next change or Hello brings it again");
                }
            }
            CollectorEvent::Refused(refusal) => {
                if let Some(left_out) = self.shared.admit_log(refusal.reason.code()) {
                    tracing::info!(host = %self.host, reason = refusal.reason.code(), message = %refusal.message, similar_left_out = left_out, "agent refused");
                }
                self.shared.metrics.refuse(refusal.reason.code());
                self.refusal = Some(refusal.reason.code());
            }
            CollectorEvent::PeerLost => {
                let reason = if self.partial_frame {
                    CloseReason::PartialFrame
                } else {
                    CloseReason::PeerLost
                };
                tracing::info!(host = %self.host, reason = reason.label(), "agent silent past the grace; closing its connection");
                self.shared.close(&self.conn, reason);
            }
        }
    }

    /// Records the `Hello` (host, inventory, session row), reads the cursor and
    /// welcomes the agent; refuses it as unavailable if the database does not answer
    /// within the hello timeout.
    async fn hello(&mut self, hello: Hello) {
        let deadline = Instant::now() + self.shared.config.hello_timeout;
        let store = self.shared.store.clone();
        let remote = self.conn.remote_address().to_string();
        let mut delay = Duration::from_millis(50);
        let version = negotiate_version(
            (hello.protocol_min, hello.protocol_max),
            (PROTOCOL_MIN, PROTOCOL_MAX),
        )
        .unwrap_or(PROTOCOL_MIN);
        let recorded = loop {
            let attempt = async {
                let cursor = store.record_hello(&hello, Utc::now()).await?;
                let session = store
                    .open_session(&hello.host_id, &remote, version, Utc::now())
                    .await?;
                Ok::<_, StoreError>((cursor, session))
            };
            match tokio::time::timeout_at(deadline.into(), attempt).await {
                Ok(Ok(r)) => break Some(r),
                Ok(Err(e)) => {
                    tracing::warn!(host = %self.host, error = %e, "cannot record Hello; retrying");
                    if Instant::now() + delay >= deadline {
                        break None;
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(500));
                }
                Err(_) => break None,
            }
        };
        let Some((cursor, db_session)) = recorded else {
            self.session.refuse(
                RefusalReason::Unavailable,
                "the collector's database is unavailable",
            );
            return;
        };
        self.db_session = Some(db_session);
        let now = Instant::now();
        let unix_ms = Utc::now().timestamp_millis();
        if let Err(e) = self
            .session
            .accept(cursor, self.shared.config.session, now, unix_ms)
        {
            tracing::error!(host = %self.host, error = %e, "cannot welcome agent");
            self.session
                .refuse(RefusalReason::Unavailable, "internal error");
            return;
        }
        self.shared.take_ownership(self.id);
        self.shared.liveness.welcomed(&self.host, now);
        self.shared.metrics.connections_accepted.inc();
        tracing::info!(host = %self.host, remote = %remote, cursor, "agent welcomed");
        self.redeliver().await;
    }

    /// Delivers the host's commands still waiting (queued, or sent without a result)
    /// in creation order, after expiring those past their deadline. Read after this
    /// connection took ownership of the host, so a command submitted meanwhile is
    /// either seen here or handed to this connection by the submission (or both: the
    /// agent runs an id once).
    async fn redeliver(&mut self) {
        let ledger = &self.shared.ledger;
        let due = match ledger.due(&self.host, Utc::now()).await {
            Ok(due) => due,
            Err(e) => {
                tracing::warn!(host = %self.host, error = %e, "cannot read the host's pending commands; they are delivered on its next connection");
                return;
            }
        };
        let mut sent = Vec::with_capacity(due.len());
        for command in due {
            let id = command.id;
            match self.session.send_command(command) {
                Ok(()) => sent.push(id),
                Err(e @ SessionError::CommandNeedsVersion { .. }) => {
                    fail_undeliverable(&self.shared.ledger, &self.host, id, &e).await;
                }
                Err(_) => {}
            }
        }
        if !sent.is_empty() {
            tracing::info!(host = %self.host, commands = sent.len(), "pending commands delivered");
        }
        if let Err(e) = ledger
            .mark_sent(&sent, crate::dispatch::Via::Reconnect, Utc::now())
            .await
        {
            tracing::warn!(host = %self.host, error = %e, "cannot mark delivered commands sent");
        }
    }

    /// Starts the next database write: a series registration, or every batch at the
    /// front of the queue (up to the per-write limit) as one request to the group
    /// writer, which commits it together with other connections' requests.
    fn start_write(&mut self) {
        let shared = self.shared.clone();
        let host = self.host.clone();
        if let Some(Op::Define(_)) = self.ops.front() {
            let Some(Op::Define(defs)) = self.ops.pop_front() else {
                return;
            };
            self.writing = Some(Box::pin(async move {
                let _permit = shared.db_writers.clone().acquire_owned().await;
                let result = shared.store.register_series(&host, &defs).await;
                Written::Defined { defs, result }
            }));
            return;
        }
        let limit = self.shared.config.max_batches_per_txn;
        let mut batches = Vec::new();
        let mut arrived = Vec::new();
        while batches.len() < limit && matches!(self.ops.front(), Some(Op::Batch(..))) {
            if let Some(Op::Batch(batch, at)) = self.ops.pop_front() {
                batches.push(batch);
                arrived.push(at);
            }
        }
        let batches = Arc::new(batches);
        let series = self.series.clone();
        self.writing = Some(Box::pin(async move {
            let result = shared.writer.ingest(host, batches.clone(), series).await;
            Written::Ingested {
                batches,
                arrived,
                result,
            }
        }));
    }

    fn on_written(&mut self, written: Written) {
        match written {
            Written::Defined {
                result: Ok(map), ..
            } => {
                Arc::make_mut(&mut self.series).extend(map);
                self.retry_delay = Duration::ZERO;
            }
            Written::Defined {
                defs,
                result: Err(StoreError::Db(e)),
            } => {
                self.retry_later(&e);
                self.ops.push_front(Op::Define(defs));
            }
            Written::Defined { result: Err(e), .. } => self.refuse_data(&e),
            Written::Ingested {
                batches,
                arrived,
                result: Ok(outcome),
            } => {
                self.retry_delay = Duration::ZERO;
                let now = Instant::now();
                let m = &self.shared.metrics;
                let mut highest = 0;
                let mut newest_ms: Option<i64> = None;
                for (b, arrived) in batches.iter().zip(&arrived) {
                    highest = highest.max(b.seq);
                    newest_ms = newest_ms.max(Some(newest_data_ms(b)));
                    self.pending_batches = self.pending_batches.saturating_sub(1);
                    self.pending_samples = self.pending_samples.saturating_sub(b.sample_count());
                    m.ack_latency
                        .observe(now.saturating_duration_since(*arrived).as_secs_f64());
                }
                m.batches_stored.inc_by(u64::from(outcome.batches_stored));
                m.batches_duplicate
                    .inc_by(u64::from(outcome.batches_duplicate));
                m.samples_stored.inc_by(outcome.samples);
                m.events_stored.inc_by(outcome.events);
                // The store's cursor may be ahead of this connection (an older
                // connection of the host committed more); acknowledge what we received.
                let upto = outcome.cursor.min(highest);
                let liveness = &self.shared.liveness;
                if let Some(ms) = newest_ms {
                    liveness.stored(&self.host, ms);
                }
                // Progress: what still waits counts from this commit.
                liveness.unacked(&self.host, (self.pending_batches > 0).then_some(now));
                if let Err(e) = self.session.committed(upto) {
                    tracing::error!(host = %self.host, error = %e, "cannot acknowledge");
                }
            }
            Written::Ingested {
                result: Err(GroupError::Refused(e)),
                ..
            } => self.refuse_data(&e),
            Written::Ingested {
                batches,
                arrived,
                result: Err(e),
            } => {
                // The group's transaction failed (connection lost, database restarting)
                // or the writers are stopping: put the batches back, retry after a
                // backoff.
                self.retry_later(&e);
                let batches = Arc::try_unwrap(batches).unwrap_or_else(|shared| (*shared).clone());
                for (batch, at) in batches.into_iter().zip(arrived).rev() {
                    self.ops.push_front(Op::Batch(batch, at));
                }
            }
        }
    }

    /// A transient database error: the work goes back to the front of the queue and the
    /// next write waits a growing backoff; reading stays paused if the queue is full.
    fn retry_later(&mut self, error: &dyn std::fmt::Display) {
        self.shared.metrics.db_retries.inc();
        self.retry_delay = (self.retry_delay * 2)
            .max(Duration::from_millis(50))
            .min(Duration::from_secs(2));
        tracing::warn!(host = %self.host, error = %error, retry_in_ms = self.retry_delay.as_millis() as u64, "database write failed; retrying");
        self.retry_at = Some(Instant::now() + self.retry_delay);
    }

    /// The data itself is unacceptable (undefined series, sequence out of range):
    /// retrying cannot help. Refuses the session; nothing of it is acknowledged.
    fn refuse_data(&mut self, error: &StoreError) {
        tracing::error!(host = %self.host, error = %error, "agent sent data the store refuses");
        self.session.refuse(
            RefusalReason::ProtocolViolation,
            &format!("data refused by the store: {error}"),
        );
        self.ops.clear();
        self.pending_batches = 0;
        self.pending_samples = 0;
        self.shared.liveness.unacked(&self.host, None);
    }

    /// Sends what is left (the refusal) briefly, then closes with the refusal's code.
    async fn close_after_refusal(&mut self, send: &mut quinn::SendStream) {
        let _ = send.finish();
        // Give the refusal frame a moment to leave; the close reason carries it anyway.
        let _ = tokio::time::timeout(Duration::from_millis(200), send.stopped()).await;
        let reason = self.refusal.unwrap_or("closed");
        self.shared.close(&self.conn, CloseReason::Refused(reason));
    }
}

async fn poll_write(writing: &mut Option<WriteFuture>) -> Written {
    match writing.as_mut() {
        Some(fut) => {
            let written = fut.await;
            *writing = None;
            written
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// The agent timestamp (Unix ms) of a batch's newest sample or event (its base time
/// when it carries none).
fn newest_data_ms(batch: &Batch) -> i64 {
    let samples = batch
        .series
        .iter()
        .flat_map(|s| s.points.iter())
        .map(|(offset, _)| batch.base_ts_ms.saturating_add(i64::from(*offset)));
    let events = batch.events.iter().map(|e| e.ts_ms);
    samples.chain(events).max().unwrap_or(batch.base_ts_ms)
}

fn hex_id(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Settles a command a connection cannot carry (its agent's protocol is too old) as
/// failed, with the reason, instead of sending it.
async fn fail_undeliverable(
    ledger: &crate::dispatch::Ledger,
    host: &str,
    id: razar_shared::protocol::CommandId,
    why: &SessionError,
) {
    let message = format!("not sent: {why} (upgrade the agent)");
    tracing::warn!(host, command = %crate::dispatch::hex_id(&id), %message, "command refused for this agent");
    if let Err(e) = ledger
        .fail_undeliverable(host, id, &message, Utc::now())
        .await
    {
        tracing::warn!(host, error = %e, "cannot settle an undeliverable command");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_hold_at_most_twice_the_backlog_under_partial_writes() {
        let mut out = Replies::default();
        // A peer that takes a little less than is added each round: the backlog grows
        // slowly, and what was sent never piles up in front of it.
        for round in 0..10_000usize {
            out.buf_mut().extend_from_slice(&[round as u8; 100]);
            out.consumed(99);
            assert!(
                out.held() <= 2 * out.backlog() + 100,
                "round {round}: {} held for a backlog of {}",
                out.held(),
                out.backlog()
            );
        }
        assert_eq!(out.backlog(), 10_000);
        // The bytes left are the newest ones, in order.
        assert!(out.unsent().iter().rev().take(100).all(|b| *b == 15)); // 9_999 as u8
        out.consumed(out.backlog());
        assert_eq!(out.backlog(), 0);
        assert_eq!(out.held(), 0);
        assert!(out.buf.capacity() <= REPLY_KEEP_CAPACITY);
    }

    #[test]
    fn replies_keep_order_across_compactions() {
        let mut out = Replies::default();
        let mut expected = Vec::new();
        let mut received = Vec::new();
        for i in 0..1_000u32 {
            let bytes = i.to_le_bytes();
            out.buf_mut().extend_from_slice(&bytes);
            expected.extend_from_slice(&bytes);
            let take = (i as usize % 7).min(out.backlog());
            received.extend_from_slice(&out.unsent()[..take]);
            out.consumed(take);
        }
        received.extend_from_slice(out.unsent());
        assert_eq!(received, expected);
    }
}
