//! The agent's link to the collector: a quinn client with mTLS that drives the sans-IO
//! [`AgentSession`] over one bidirectional stream per connection.
//!
//! One task, one `select!` over socket reads, stream writes, the session's timer, new
//! batches, outbound command results and the shutdown signal. Batches come from the
//! [`Spool`] (they are durable before they get here) and are fed to the session lazily,
//! a bounded number at a time, so a long backlog never sits in memory and live batches
//! keep flowing behind it. Every batch goes through [`Spool::prepare`] on its way to the
//! socket, so the copy held here never carries samples the spool's budget dropped, and
//! loss reports ride in the batches they describe. Acks delete from the spool. The first
//! `Welcome` of a new (wiped) spool may renumber it above the collector's cursor
//! ([`Spool::welcome`]); the session then forgets its copies and reads them again.
//! Inventory changes go out at once to a collector of protocol version 2. Connections
//! are retried with exponential backoff and jitter.
//!
//! **Acceptance:** with TLS 1.3 the client finishes its handshake before the server has
//! checked the client certificate, so the link counts as connected only once the
//! collector's `Welcome` arrives; otherwise the close reason (refusal, TLS alert, idle
//! timeout) is recorded in [`LinkStatus::last_error`].

use crate::spool::{Spool, SpoolError};
use razar_shared::protocol::codec::{encode_into, CollectorFrameDecoder};
use razar_shared::protocol::session::{AgentEvent, AgentSession};
use razar_shared::protocol::{
    AgentMessage, Batch, Command, CommandResult, ComponentInfo, Event, GpuInfo, Hello, LogChunk,
    SeriesPoints, StatusDigest, UnixMillis, PROTOCOL_MAX, PROTOCOL_MIN,
};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// Application close codes on the QUIC connection (both directions).
pub use razar_shared::close_code;

/// Errors setting up the uplink.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UplinkError {
    /// The UDP socket for the client endpoint could not be bound.
    #[error("cannot bind the QUIC client socket: {0}")]
    Bind(std::io::Error),
    /// The rustls client config is unusable for QUIC (TLS 1.3 with AES-128-GCM needed).
    #[error("TLS client config unusable for QUIC: {0}")]
    Tls(String),
    /// A backoff parameter is out of range.
    #[error("invalid backoff: {0}")]
    Backoff(&'static str),
    /// The spool failed.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// The uplink task is gone.
    #[error("the uplink has stopped")]
    Stopped,
}

/// Exponential backoff with jitter, validated on construction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    jitter: f64,
}

impl Backoff {
    /// Delays start at `min`, double per failed attempt up to `max`, and each is reduced
    /// by a random fraction of up to `jitter` (0 ≤ jitter ≤ 1).
    pub fn try_new(min: Duration, max: Duration, jitter: f64) -> Result<Backoff, UplinkError> {
        if min.is_zero() {
            return Err(UplinkError::Backoff("min must be above zero"));
        }
        if min > max {
            return Err(UplinkError::Backoff("min must not exceed max"));
        }
        if !(0.0..=1.0).contains(&jitter) {
            return Err(UplinkError::Backoff("jitter must be within 0..=1"));
        }
        Ok(Backoff { min, max, jitter })
    }

    /// The delay before retry number `attempt` (0 = first retry), given a uniform random
    /// `unit` in `0..1`.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let base = self
            .min
            .saturating_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
            .min(self.max);
        let cut = self.jitter * unit.clamp(0.0, 1.0);
        base.mul_f64(1.0 - cut).max(Duration::from_millis(1))
    }
}

impl Default for Backoff {
    /// 100 ms doubling up to 10 s, with 50 % jitter.
    fn default() -> Self {
        Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_secs(10),
            jitter: 0.5,
        }
    }
}

/// How the uplink reaches the collector.
#[derive(Debug, Clone)]
pub struct UplinkConfig {
    /// Collector address, `host:port` (resolved at every attempt).
    pub collector: String,
    /// Name the collector's certificate must carry.
    pub server_name: String,
    /// mTLS client config (`razar_shared::tls::client_config`).
    pub tls: Arc<rustls::ClientConfig>,
    /// Host id, version, profile and inventory for every `Hello`; `last_acked_seq` and
    /// `agent_time_ms` are filled in by the uplink.
    pub hello: Hello,
    pub backoff: Backoff,
    /// QUIC keep-alive; must stay below `idle_timeout`.
    pub keep_alive: Duration,
    /// QUIC idle timeout (a backstop: liveness runs on heartbeats).
    pub idle_timeout: Duration,
    /// Time allowed for one connection attempt (UDP + TLS handshake).
    pub connect_timeout: Duration,
    /// Batches held in memory for the session; the rest stays in the spool.
    pub feed_batches: usize,
    /// Capacity of the channels for live batches, commands and outbound messages.
    pub channel_capacity: usize,
}

impl UplinkConfig {
    /// A config with the default timings: keep-alive 1 s, idle timeout 10 s, connect
    /// timeout 10 s, 256 batches fed at a time.
    pub fn new(
        collector: impl Into<String>,
        server_name: impl Into<String>,
        tls: Arc<rustls::ClientConfig>,
        host_id: impl Into<String>,
    ) -> UplinkConfig {
        UplinkConfig {
            collector: collector.into(),
            server_name: server_name.into(),
            tls,
            hello: Hello {
                protocol_min: PROTOCOL_MIN,
                protocol_max: PROTOCOL_MAX,
                host_id: host_id.into(),
                agent_version: env!("CARGO_PKG_VERSION").into(),
                profile: String::new(),
                components: Vec::new(),
                gpus: Vec::new(),
                last_acked_seq: 0,
                agent_time_ms: 0,
            },
            backoff: Backoff::default(),
            keep_alive: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            feed_batches: 256,
            channel_capacity: 1024,
        }
    }
}

/// Where the link stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LinkState {
    /// Not connected; waiting out a backoff delay.
    #[default]
    Disconnected,
    /// QUIC/TLS handshake in progress.
    Connecting,
    /// Connected, `Hello` sent, waiting for `Welcome`.
    Handshaking,
    /// Welcomed by the collector: telemetry flows.
    Connected,
    /// Shut down.
    Stopped,
}

impl LinkState {
    /// Stable lower-case name for `/health` and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Disconnected => "disconnected",
            LinkState::Connecting => "connecting",
            LinkState::Handshaking => "handshaking",
            LinkState::Connected => "connected",
            LinkState::Stopped => "stopped",
        }
    }
}

/// The link's state for `/health` and `/metrics`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LinkStatus {
    pub state: LinkState,
    /// Wall clock of the last state change.
    pub since_ms: UnixMillis,
    /// Why the last connection failed or ended, if it did.
    pub last_error: Option<String>,
    /// Connections the collector welcomed.
    pub connections_total: u64,
    /// Connection attempts that failed or ended.
    pub failures_total: u64,
    /// Highest seq the collector acknowledged.
    pub acked_seq: u64,
    /// Collector clock minus agent clock at the last heartbeat answer.
    pub clock_offset_ms: Option<i64>,
    /// Commands dropped because the agent did not take them fast enough (the collector
    /// redelivers them).
    pub commands_dropped_total: u64,
    /// Command results or log chunks dropped because the link was down or the queue
    /// full.
    pub outbound_dropped_total: u64,
}

/// A message for the collector other than telemetry.
#[derive(Debug, Clone, PartialEq)]
pub enum Outbound {
    CommandResult(CommandResult),
    LogChunk(LogChunk),
}

/// Handle to the running uplink task.
pub struct Uplink {
    spool: Arc<Spool>,
    batches: mpsc::Sender<Batch>,
    outbound: mpsc::Sender<Outbound>,
    digest: watch::Sender<StatusDigest>,
    inventory: watch::Sender<(Vec<ComponentInfo>, Vec<GpuInfo>)>,
    status: watch::Receiver<LinkStatus>,
    /// Outbound messages refused because the queue was full or the link gone.
    outbound_full: AtomicU64,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Uplink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uplink")
            .field("status", &*self.status.borrow())
            .finish_non_exhaustive()
    }
}

fn unix_ms() -> UnixMillis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Uplink {
    /// Binds the client endpoint and starts the uplink task (inside a tokio runtime).
    /// Returns the handle and the receiver of commands from the collector.
    pub fn spawn(
        config: UplinkConfig,
        spool: Arc<Spool>,
    ) -> Result<(Uplink, mpsc::Receiver<Command>), UplinkError> {
        let quic_tls = quinn::crypto::rustls::QuicClientConfig::try_from(config.tls.clone())
            .map_err(|e| UplinkError::Tls(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(quic_tls));
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(config.keep_alive));
        transport.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(config.idle_timeout)
                .map_err(|_| UplinkError::Tls("idle timeout out of range".into()))?,
        ));
        client.transport_config(Arc::new(transport));
        let bind: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 0));
        let mut endpoint = quinn::Endpoint::client(bind).map_err(UplinkError::Bind)?;
        endpoint.set_default_client_config(client);

        let capacity = config.channel_capacity.max(1);
        let (batches_tx, batches_rx) = mpsc::channel(capacity);
        let (outbound_tx, outbound_rx) = mpsc::channel(capacity);
        let (commands_tx, commands_rx) = mpsc::channel(capacity);
        let (digest_tx, digest_rx) = watch::channel(StatusDigest::default());
        let (inventory_tx, inventory_rx) =
            watch::channel((config.hello.components.clone(), config.hello.gpus.clone()));
        let (status_tx, status_rx) = watch::channel(LinkStatus {
            since_ms: unix_ms(),
            acked_seq: spool.acked(),
            ..LinkStatus::default()
        });
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let link = Link {
            config,
            endpoint,
            spool: spool.clone(),
            batches: batches_rx,
            outbound: outbound_rx,
            commands: commands_tx,
            digest: digest_rx,
            inventory: inventory_rx,
            status: status_tx,
            shutdown: shutdown_rx,
            defined: HashSet::new(),
        };
        let task = tokio::spawn(link.run());
        Ok((
            Uplink {
                spool,
                batches: batches_tx,
                outbound: outbound_tx,
                digest: digest_tx,
                inventory: inventory_tx,
                status: status_rx,
                outbound_full: AtomicU64::new(0),
                shutdown: shutdown_tx,
                task,
            },
            commands_rx,
        ))
    }

    /// Appends a batch to the spool (durably, off the async threads) and hands it to the
    /// link. Returns its sequence number.
    pub async fn publish(
        &self,
        base_ts_ms: UnixMillis,
        series: Vec<SeriesPoints>,
        events: Vec<Event>,
    ) -> Result<u64, UplinkError> {
        let spool = self.spool.clone();
        let batch = tokio::task::spawn_blocking(move || spool.append(base_ts_ms, series, events))
            .await
            .map_err(|_| UplinkError::Stopped)??;
        let seq = batch.seq;
        // Logged after the durable commit: the record of what this agent produced.
        tracing::debug!(
            seq,
            base_ts_ms = batch.base_ts_ms,
            samples = batch.sample_count(),
            events = batch.events.len(),
            "batch spooled"
        );
        self.notify(batch);
        Ok(seq)
    }

    /// Hands a batch that is already in the spool to the link. Never blocks: when the
    /// link is behind, the batch is left for it to read from the spool.
    pub fn notify(&self, batch: Batch) {
        // Full or closed: the spool has the batch; the link reads it from there.
        let _ = self.batches.try_send(batch);
    }

    /// Queues a command result or log chunk for the collector. Returns false when it
    /// had to be dropped (link down or queue full; counted in the status).
    pub fn send(&self, message: Outbound) -> bool {
        let sent = self.outbound.try_send(message).is_ok();
        if !sent {
            self.outbound_full.fetch_add(1, Ordering::Relaxed);
        }
        sent
    }

    /// Sets the digest carried by heartbeats (the spool size is filled in by the link).
    pub fn set_digest(&self, digest: StatusDigest) {
        self.digest.send_replace(digest);
    }

    /// Sets the inventory: sent in the next `Hello`, and at once to a collector that
    /// speaks protocol version 2.
    pub fn set_inventory(&self, components: Vec<ComponentInfo>, gpus: Vec<GpuInfo>) {
        self.inventory.send_replace((components, gpus));
    }

    /// The link's current status.
    pub fn status(&self) -> LinkStatus {
        let mut status = self.status.borrow().clone();
        status.outbound_dropped_total += self.outbound_full.load(Ordering::Relaxed);
        status
    }

    /// A receiver that sees every status change.
    pub fn watch_status(&self) -> watch::Receiver<LinkStatus> {
        self.status.clone()
    }

    /// The spool behind this link.
    pub fn spool(&self) -> &Arc<Spool> {
        &self.spool
    }

    /// Closes the connection in order and waits for the task to end.
    pub async fn shutdown(self) {
        self.shutdown.send_replace(true);
        let _ = self.task.await;
    }

    /// Stops the task at once, as if the process died (tests of crash recovery).
    pub fn abort(self) {
        self.task.abort();
    }
}

/// Why one connection ended.
enum Ending {
    Shutdown,
    Closed {
        welcomed: bool,
        reason: String,
        code: u32,
    },
}

/// One step of the connection loop, taken out of `select!` so its handler may use
/// everything the branches borrowed.
enum Step {
    Shutdown,
    Read(Result<Option<usize>, quinn::ReadError>),
    Wrote(Result<usize, quinn::WriteError>),
    Timer,
    Batch(Option<Batch>),
    Outbound(Option<Outbound>),
    /// The inventory changed (false: its sender is gone).
    Inventory(bool),
}

struct Link {
    config: UplinkConfig,
    endpoint: quinn::Endpoint,
    spool: Arc<Spool>,
    batches: mpsc::Receiver<Batch>,
    outbound: mpsc::Receiver<Outbound>,
    commands: mpsc::Sender<Command>,
    digest: watch::Receiver<StatusDigest>,
    inventory: watch::Receiver<(Vec<ComponentInfo>, Vec<GpuInfo>)>,
    status: watch::Sender<LinkStatus>,
    shutdown: watch::Receiver<bool>,
    /// Series ids given to the session (it keeps them across reconnects).
    defined: HashSet<u32>,
}

impl Link {
    fn set_state(&self, state: LinkState) {
        self.status.send_modify(|s| {
            if s.state != state {
                s.state = state;
                s.since_ms = unix_ms();
            }
        });
    }

    fn record_failure(&self, reason: String) {
        tracing::warn!(collector = %self.config.collector, error = %reason, "collector link down");
        self.status.send_modify(|s| {
            s.failures_total += 1;
            s.last_error = Some(reason);
        });
    }

    async fn run(mut self) {
        let mut hello = self.config.hello.clone();
        hello.last_acked_seq = self.spool.acked();
        hello.agent_time_ms = unix_ms();
        let mut session = AgentSession::new(hello, Instant::now());
        let mut attempt: u32 = 0;
        let mut shutdown = self.shutdown.clone();
        loop {
            if *shutdown.borrow() {
                break;
            }
            self.set_state(LinkState::Connecting);
            let connected = tokio::select! {
                r = self.connect() => r,
                _ = shutdown.changed() => break,
            };
            match connected {
                Ok((conn, send, recv)) => {
                    let ending = self.drive(&mut session, &conn, send, recv).await;
                    session.disconnected();
                    match ending {
                        Ending::Shutdown => {
                            conn.close(close_code::SHUTDOWN.into(), b"agent shutting down");
                            break;
                        }
                        Ending::Closed {
                            welcomed,
                            reason,
                            code,
                        } => {
                            conn.close(code.into(), reason.as_bytes());
                            self.record_failure(reason);
                            if welcomed {
                                attempt = 0;
                            }
                        }
                    }
                }
                Err(reason) => self.record_failure(reason),
            }
            self.set_state(LinkState::Disconnected);
            let delay = self.config.backoff.delay(attempt, rand::random::<f64>());
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => break,
            }
        }
        self.set_state(LinkState::Stopped);
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }

    async fn connect(
        &self,
    ) -> Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream), String> {
        let attempt = async {
            let addr = tokio::net::lookup_host(&self.config.collector)
                .await
                .map_err(|e| format!("cannot resolve {}: {e}", self.config.collector))?
                .next()
                .ok_or_else(|| format!("{} resolves to no address", self.config.collector))?;
            let connecting = self
                .endpoint
                .connect(addr, &self.config.server_name)
                .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
            let conn = connecting
                .await
                .map_err(|e| format!("handshake with {addr} failed: {e}"))?;
            let (send, recv) = conn
                .open_bi()
                .await
                .map_err(|e| format!("cannot open a stream to {addr}: {e}"))?;
            Ok((conn, send, recv))
        };
        tokio::time::timeout(self.config.connect_timeout, attempt)
            .await
            .map_err(|_| {
                format!(
                    "no connection to {} within {:?}",
                    self.config.collector, self.config.connect_timeout
                )
            })?
    }

    /// Runs one connection until it ends.
    async fn drive(
        &mut self,
        session: &mut AgentSession,
        conn: &quinn::Connection,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> Ending {
        let (components, gpus) = self.inventory.borrow_and_update().clone();
        session.set_inventory(components, gpus);
        let now = Instant::now();
        session.set_wall_clock(now, unix_ms());
        session.connected(now);
        self.set_state(LinkState::Handshaking);
        let mut welcomed = false;
        let mut decoder = CollectorFrameDecoder::new();
        let mut read_buf = vec![0u8; 64 * 1024];
        let mut out: Vec<u8> = Vec::new();
        let mut out_pos = 0usize;
        loop {
            // Keep the session fed from the spool, a bounded number at a time.
            if let Err(e) = self.refill(session).await {
                return Ending::Closed {
                    welcomed,
                    reason: format!("spool: {e}"),
                    code: close_code::SHUTDOWN,
                };
            }
            let mut digest = *self.digest.borrow();
            digest.spool_batches = self.spool.len();
            session.set_digest(digest);
            while let Some(event) = session.poll_event() {
                if let Some(ending) = self.on_event(event, session, &mut welcomed, conn).await {
                    return ending;
                }
            }
            if out_pos == out.len() {
                out.clear();
                out_pos = 0;
            }
            while out.len() < 1024 * 1024 {
                let Some(mut msg) = session.poll_transmit() else {
                    break;
                };
                if let AgentMessage::Batch(batch) = &mut msg {
                    // What the budget took since the copy was read goes, and a run of
                    // lossy batches gets its report (exactly what the spool kept).
                    self.spool.prepare(batch, unix_ms());
                }
                if let Err(e) = encode_into(&msg, &mut out) {
                    // Only an oversized batch can fail; the producer bounds batch sizes.
                    tracing::error!(error = %e, "cannot encode a message for the collector; dropped");
                }
            }
            let timeout = session.poll_timeout();
            let step = tokio::select! {
                _ = self.shutdown.changed() => Step::Shutdown,
                r = recv.read(&mut read_buf) => Step::Read(r),
                r = send.write(&out[out_pos..]), if out_pos < out.len() => Step::Wrote(r),
                _ = sleep_until(timeout), if timeout.is_some() => Step::Timer,
                b = self.batches.recv() => Step::Batch(b),
                m = self.outbound.recv() => Step::Outbound(m),
                r = self.inventory.changed() => Step::Inventory(r.is_ok()),
            };
            match step {
                Step::Shutdown => return Ending::Shutdown,
                Step::Read(Ok(Some(n))) => {
                    let now = Instant::now();
                    let mut input = read_buf.get(..n).unwrap_or_default();
                    loop {
                        match decoder.feed(&mut input) {
                            Ok(Some(msg)) => session.handle(msg, now),
                            Ok(None) => break,
                            Err(e) => {
                                return Ending::Closed {
                                    welcomed,
                                    reason: format!("undecodable frame from the collector: {e}"),
                                    code: close_code::PROTOCOL_VIOLATION,
                                }
                            }
                        }
                    }
                }
                Step::Read(Ok(None)) => {
                    return Ending::Closed {
                        welcomed,
                        reason: close_reason(conn, "the collector ended the stream"),
                        code: close_code::SHUTDOWN,
                    }
                }
                Step::Read(Err(e)) => {
                    return Ending::Closed {
                        welcomed,
                        reason: close_reason(conn, &format!("read failed: {e}")),
                        code: close_code::SHUTDOWN,
                    }
                }
                Step::Wrote(Ok(n)) => out_pos += n,
                Step::Wrote(Err(e)) => {
                    return Ending::Closed {
                        welcomed,
                        reason: close_reason(conn, &format!("write failed: {e}")),
                        code: close_code::SHUTDOWN,
                    }
                }
                Step::Timer => session.handle_timeout(Instant::now()),
                Step::Batch(Some(batch)) => self.take_live(session, batch),
                // The handle is gone: the agent is stopping; finish in order.
                Step::Batch(None) => return Ending::Shutdown,
                Step::Outbound(Some(message)) => {
                    let sent = match message {
                        Outbound::CommandResult(r) => session.send_command_result(r),
                        Outbound::LogChunk(c) => session.send_log_chunk(c),
                    };
                    if sent.is_err() {
                        self.status.send_modify(|s| s.outbound_dropped_total += 1);
                    }
                }
                Step::Outbound(None) => return Ending::Shutdown,
                Step::Inventory(true) => {
                    let (components, gpus) = self.inventory.borrow_and_update().clone();
                    session.set_inventory(components, gpus);
                }
                // The handle is gone: the agent is stopping.
                Step::Inventory(false) => return Ending::Shutdown,
            }
        }
    }

    async fn on_event(
        &mut self,
        event: AgentEvent,
        session: &mut AgentSession,
        welcomed: &mut bool,
        conn: &quinn::Connection,
    ) -> Option<Ending> {
        match event {
            AgentEvent::Established {
                version,
                collector_acked_seq,
                ..
            } => {
                *welcomed = true;
                let spool_acked = self.spool.acked();
                let spool = self.spool.clone();
                let now_ms = unix_ms();
                match tokio::task::spawn_blocking(move || {
                    spool.welcome(collector_acked_seq, now_ms)
                })
                .await
                {
                    Ok(Ok(Some(renumbered))) => {
                        tracing::warn!(
                            collector_acked_seq,
                            offset = renumbered.offset,
                            batches = renumbered.batches,
                            "agent state is new but the collector knows this host: unsent batches renumbered above its cursor"
                        );
                        // The held copies carry the old numbers: read them again.
                        session.restart_numbering(renumbered.offset);
                    }
                    Ok(Ok(None)) => {}
                    Ok(Err(e)) => {
                        return Some(Ending::Closed {
                            welcomed: true,
                            reason: format!("spool: {e}"),
                            code: close_code::SHUTDOWN,
                        })
                    }
                    Err(_) => return Some(Ending::Shutdown),
                }
                if collector_acked_seq < spool_acked {
                    tracing::warn!(
                        collector_acked_seq,
                        spool_acked,
                        "the collector's cursor is behind what it acknowledged before (database restored?)"
                    );
                }
                tracing::info!(
                    collector = %self.config.collector,
                    remote = %conn.remote_address(),
                    version,
                    collector_acked_seq,
                    "connected to the collector"
                );
                self.status.send_modify(|s| {
                    s.connections_total += 1;
                    s.last_error = None;
                });
                self.set_state(LinkState::Connected);
                None
            }
            AgentEvent::Acked { upto } => {
                let spool = self.spool.clone();
                match tokio::task::spawn_blocking(move || spool.ack(upto)).await {
                    Ok(Ok(())) => {
                        self.status
                            .send_modify(|s| s.acked_seq = s.acked_seq.max(upto));
                        None
                    }
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, upto, "spool ack failed");
                        None
                    }
                    Err(_) => Some(Ending::Shutdown),
                }
            }
            AgentEvent::Command(command) => {
                if self.commands.try_send(command).is_err() {
                    self.status.send_modify(|s| s.commands_dropped_total += 1);
                }
                None
            }
            AgentEvent::HeartbeatAcked { collector_time_ms } => {
                let offset = collector_time_ms - unix_ms();
                self.status
                    .send_modify(|s| s.clock_offset_ms = Some(offset));
                None
            }
            AgentEvent::Refused(refusal) => Some(Ending::Closed {
                welcomed: *welcomed,
                reason: format!(
                    "refused by the collector ({}): {}",
                    refusal.reason.code(),
                    refusal.message
                ),
                code: close_code::REFUSED,
            }),
            AgentEvent::PeerLost => Some(Ending::Closed {
                welcomed: *welcomed,
                reason: close_reason(conn, "nothing heard from the collector within the grace"),
                code: close_code::PEER_LOST,
            }),
            AgentEvent::ProtocolViolation { detail } => Some(Ending::Closed {
                welcomed: *welcomed,
                reason: format!("collector broke the protocol: {detail}"),
                code: close_code::PROTOCOL_VIOLATION,
            }),
        }
    }

    /// A live batch: taken directly when it is the next one and there is room,
    /// otherwise left in the spool for [`refill`](Self::refill).
    fn take_live(&mut self, session: &mut AgentSession, batch: Batch) {
        if batch.seq == session.highest_seq() + 1
            && session.queued_batches() < self.config.feed_batches
        {
            self.push(session, batch);
        }
    }

    /// Reads batches the session has not seen from the spool while it holds less than
    /// half of `feed_batches`.
    async fn refill(&mut self, session: &mut AgentSession) -> Result<(), SpoolError> {
        let target = self.config.feed_batches.max(1);
        if session.queued_batches() * 2 >= target || self.spool.last_seq() <= session.highest_seq()
        {
            return Ok(());
        }
        let spool = self.spool.clone();
        let after = session.highest_seq();
        let limit = target - session.queued_batches();
        let batches = tokio::task::spawn_blocking(move || spool.pending_after(after, limit))
            .await
            .map_err(|e| SpoolError::Corrupt {
                what: "spool reader task".into(),
                reason: e.to_string(),
            })??;
        for batch in batches {
            self.push(session, batch);
        }
        Ok(())
    }

    /// Defines the batch's series in the session (from the spool's dictionary) and
    /// queues it.
    fn push(&mut self, session: &mut AgentSession, mut batch: Batch) {
        if batch
            .series
            .iter()
            .any(|p| !self.defined.contains(&p.series))
        {
            for def in self.spool.series() {
                if self.defined.insert(def.id) {
                    session.define_series(def);
                }
            }
            let before = batch.series.len();
            batch.series.retain(|p| self.defined.contains(&p.series));
            if batch.series.len() != before {
                tracing::error!(
                    seq = batch.seq,
                    "batch references series missing from the spool's dictionary; those points are dropped"
                );
            }
        }
        if let Err(e) = session.push_batch(batch) {
            tracing::error!(error = %e, "batch not queued");
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// The connection's close reason when the peer gave one (refusal code, TLS alert),
/// else `fallback`.
fn close_reason(conn: &quinn::Connection, fallback: &str) -> String {
    match conn.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(close)) => format!(
            "collector closed the connection (code {}): {}",
            close.error_code,
            String::from_utf8_lossy(&close.reason)
        ),
        Some(quinn::ConnectionError::ConnectionClosed(close)) => {
            format!("connection closed by the collector: {close}")
        }
        Some(other) => format!("{fallback}: {other}"),
        None => fallback.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn backoff_refuses_bad_parameters() {
        let s = Duration::from_secs(1);
        assert!(Backoff::try_new(Duration::ZERO, s, 0.5).is_err());
        assert!(Backoff::try_new(s * 2, s, 0.5).is_err());
        assert!(Backoff::try_new(s, s, 1.5).is_err());
        assert!(Backoff::try_new(s, s, -0.1).is_err());
        assert!(Backoff::try_new(s, s * 2, 0.0).is_ok());
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let b = match Backoff::try_new(Duration::from_millis(100), Duration::from_secs(1), 0.0) {
            Ok(b) => b,
            Err(e) => panic!("{e}"),
        };
        let delays: Vec<u128> = (0..6).map(|a| b.delay(a, 0.7).as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1000, 1000]);
    }

    proptest! {
        #[test]
        fn backoff_stays_within_jitter_band(
            min_ms in 1u64..5_000, extra_ms in 0u64..60_000, jitter in 0.0f64..=1.0,
            attempt in 0u32..100, unit in 0.0f64..1.0,
        ) {
            let min = Duration::from_millis(min_ms);
            let max = min + Duration::from_millis(extra_ms);
            let b = Backoff::try_new(min, max, jitter).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let d = b.delay(attempt, unit);
            prop_assert!(d <= max);
            let base = min.saturating_mul(1u32 << attempt.min(31)).min(max);
            prop_assert!(d >= base.mul_f64(1.0 - jitter).saturating_sub(Duration::from_millis(1)));
        }
    }
}
