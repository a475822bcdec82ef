//! The collector's QUIC server: a quinn endpoint with the fleet's mTLS server config,
//! one task per agent connection ([`crate::ingest`]), the registry of live connections
//! (one per host: a newer connection supersedes the older; revoked certificates are
//! closed on TLS reload), the group writer that commits the batches of many connections
//! together ([`crate::group`]), the lost-host task ([`crate::lost`]) and the ingest
//! metrics.
//!
//! Identity comes from the client certificate only (URI SAN `razar://host/<id>`); the
//! `Hello` must agree with it. Every refused connection is counted in
//! `razar_collector_connections_refused_total{reason}`; handshake refusals are classified
//! from rustls' typed errors ([`HandshakeRefusal`]) and logged once per kind per
//! interval, so junk from unauthenticated peers cannot flood the log. Every connection
//! the collector closes on its own is counted in
//! `razar_collector_connections_closed_total{reason}` ([`CloseReason`]).

use crate::dispatch::{self, Dispatch, DispatchMetrics, Ledger};
use crate::group::{GroupConfig, GroupMetrics, GroupWriter};
use crate::ingest;
use crate::lost::{self, HostTransition, Liveness, LostTiming};
use crate::store::Store;
use crate::supervise::{RestartBackoff, Tasks};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use razar_shared::protocol::{Command, SessionConfig};
use razar_shared::tls::{self, HandshakeRefusal, HandshakeRefusals, ServerTlsFiles, TlsError};
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

/// The metrics crate, so callers can build the [`prometheus::Registry`] to pass in.
pub use prometheus;

/// Application close codes, shared with the agent's uplink.
pub use razar_shared::close_code;

/// Errors starting or reconfiguring the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The UDP socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The rustls config is unusable for QUIC (TLS 1.3 with AES-128-GCM needed).
    #[error("TLS server config unusable for QUIC: {0}")]
    Quic(String),
    /// Loading certificates, key or CRL failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A metric could not be registered (a name registered twice).
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// A setting is out of range.
    #[error("invalid setting: {0}")]
    Invalid(&'static str),
}

/// How the ingest server runs. [`IngestConfig::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// UDP address to listen on (port 0 picks one; see [`Collector::local_addr`]).
    pub listen: SocketAddr,
    /// mTLS server config (`razar_shared::tls::server_config`), CRLs inside.
    pub tls: Arc<rustls::ServerConfig>,
    /// The CRLs the config was built with (to close connections revoked later).
    pub crls: Vec<CertificateRevocationListDer<'static>>,
    /// Timing the agents are asked to use; the lost-host grace is
    /// `heartbeat_interval_ms × lost_after_missed`.
    pub session: SessionConfig,
    /// QUIC keep-alive (below `idle_timeout`).
    pub keep_alive: Duration,
    /// QUIC idle timeout (a backstop behind heartbeats).
    pub idle_timeout: Duration,
    /// Most batches of one connection in one write request (its part of a group
    /// commit).
    pub max_batches_per_txn: usize,
    /// A connection stops reading once this many batches wait for the database...
    pub max_pending_batches: usize,
    /// ...or this many samples.
    pub max_pending_samples: usize,
    /// Series registrations running at the same time (all hosts together; batches go
    /// through the group writer).
    pub db_writers: usize,
    /// The group writer: writer tasks (`database.ingest_writers`, below the pool size)
    /// and the limits of one group commit.
    pub group: GroupConfig,
    /// Time allowed for the agent's `Hello` and for recording it in the database;
    /// past it the agent is refused as `unavailable`.
    pub hello_timeout: Duration,
    /// Secret for QUIC stateless resets. When it stays the same across a restart, the
    /// restarted collector answers the agents' packets for their old connections with a
    /// stateless reset, and they reconnect at once instead of waiting out the missed
    /// heartbeats. `None`: a random key (quinn's default).
    pub reset_key: Option<[u8; 32]>,
    /// A host the store has online when the collector starts is marked lost unless it
    /// reconnects within this time (it died while the collector was down).
    pub lost_after_restart: Duration,
    /// Heartbeats without samples this long: `heartbeats_without_samples`
    /// (`[silence] samples_stalled_after`).
    pub samples_stalled_after: Duration,
    /// Most bytes of replies (acks, heartbeat acks, commands) waiting to be sent to one
    /// agent. At the bound the connection stops reading (and taking commands) until the
    /// agent takes its replies: a peer that never reads cannot grow the collector.
    pub max_pending_reply_bytes: usize,
    /// A connection whose replies stay at `max_pending_reply_bytes` this long is closed
    /// as `slow_reader` (the peer does not read its stream).
    pub reply_stall_timeout: Duration,
    /// Typed handshake refusals recorded by the client certificate verifier: build `tls`
    /// with `tls::server_config_from_files_tracked(files, &config.refusals)` (reloads do
    /// it themselves). Without it, refusals are classified from the TLS alert alone
    /// (an expired certificate and one not yet valid then both count as expired).
    pub refusals: HandshakeRefusals,
    /// At most one log line per refusal kind per this interval (the rest are counted
    /// and reported with the next line).
    pub refusal_log_interval: Duration,
    /// How often commands past their deadline are expired ([`crate::dispatch`]).
    pub command_sweep_interval: Duration,
    /// How long past its deadline a command that was sent without a result is still
    /// delivered on reconnect (the agent answers with the outcome it had, if it ran
    /// it); past this it is expired.
    pub command_result_grace: Duration,
}

impl IngestConfig {
    /// Defaults: heartbeats 1 s, lost after 3 missed, window 64 batches, keep-alive 1 s,
    /// idle timeout 10 s, hosts online at start lost after 60 s without reconnecting,
    /// 256 batches per write request, pause at 512 batches or 500,000
    /// samples pending, 8 series registrations at once, 4 group writers (groups of at
    /// most 50,000 samples or 256 hosts), 2.5 s for the `Hello`, 256 KiB of replies
    /// waiting per connection and 5 s for a peer to start taking them, one refusal log
    /// line per kind per 10 s, a command sweep every 5 s and results of sent commands
    /// awaited 10 min past their deadline.
    pub fn new(
        listen: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        crls: Vec<CertificateRevocationListDer<'static>>,
    ) -> IngestConfig {
        IngestConfig {
            listen,
            tls,
            crls,
            session: SessionConfig::default(),
            keep_alive: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(10),
            max_batches_per_txn: 256,
            max_pending_batches: 512,
            max_pending_samples: 500_000,
            db_writers: 8,
            group: GroupConfig::default(),
            hello_timeout: Duration::from_millis(2_500),
            reset_key: None,
            lost_after_restart: Duration::from_secs(60),
            samples_stalled_after: Duration::from_secs(120),
            max_pending_reply_bytes: 256 * 1024,
            reply_stall_timeout: Duration::from_secs(5),
            refusals: HandshakeRefusals::default(),
            refusal_log_interval: Duration::from_secs(10),
            command_sweep_interval: Duration::from_secs(5),
            command_result_grace: Duration::from_secs(600),
        }
    }

    /// A stable stateless-reset secret derived from `secret` (e.g. the collector's
    /// private key file): SHA-256 over a fixed label and the secret.
    pub fn derive_reset_key(secret: &[u8]) -> [u8; 32] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"razar collector QUIC stateless reset v1\0");
        ctx.update(secret);
        let mut key = [0u8; 32];
        key.copy_from_slice(ctx.finish().as_ref());
        key
    }

    /// The lost-host grace: heartbeat interval × missed heartbeats.
    pub fn lost_grace(&self) -> Duration {
        Duration::from_millis(u64::from(self.session.heartbeat_interval_ms))
            .saturating_mul(self.session.lost_after_missed)
    }

    fn quinn_config(&self) -> Result<quinn::ServerConfig, ServerError> {
        quinn_server_config(self.tls.clone(), self.keep_alive, self.idle_timeout)
    }
}

fn quinn_server_config(
    tls: Arc<rustls::ServerConfig>,
    keep_alive: Duration,
    idle_timeout: Duration,
) -> Result<quinn::ServerConfig, ServerError> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| ServerError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(keep_alive));
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(idle_timeout)
            .map_err(|_| ServerError::Invalid("idle_timeout out of range"))?,
    ));
    transport.max_concurrent_bidi_streams(4u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    // Bounded memory per connection on quinn's side too: what an agent sends and we have
    // not read (all its streams together, not 4 × a stream's window), and what we wrote
    // and it has not acknowledged (quinn's default is 10 MB per connection).
    transport.stream_receive_window(STREAM_RECEIVE_WINDOW.into());
    transport.receive_window(STREAM_RECEIVE_WINDOW.into());
    transport.send_window(SEND_WINDOW);
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Bytes an agent may send ahead of what the collector has read, per stream and per
/// connection (quinn's default stream window: 100 Mbit/s over 100 ms).
const STREAM_RECEIVE_WINDOW: u32 = 1_250_000;

/// Bytes of replies quinn keeps per connection until the agent acknowledges them
/// (replies are acks, heartbeat acks and commands: small).
const SEND_WINDOW: u64 = 1 << 20;

/// The ingest metrics, registered in the registry given to [`Collector::start`].
#[derive(Debug, Clone)]
pub struct IngestMetrics {
    pub refused: IntCounterVec,
    /// Connections the collector closed on its own, by [`CloseReason::label`].
    pub closed: IntCounterVec,
    pub agents_connected: IntGauge,
    pub connections_accepted: IntCounter,
    pub batches_stored: IntCounter,
    pub batches_duplicate: IntCounter,
    pub samples_stored: IntCounter,
    pub events_stored: IntCounter,
    pub db_retries: IntCounter,
    pub connections_paused: IntGauge,
    pub ack_latency: Histogram,
    pub host_transitions: IntCounterVec,
    /// Transitions not handed to the consumer of `take_transitions` (nobody took the
    /// stream, or it fell behind).
    pub host_transitions_dropped: IntCounter,
    /// Group commit: commits, hosts and samples per commit, failed groups.
    pub group: GroupMetrics,
}

impl IngestMetrics {
    fn new(registry: &Registry) -> Result<IngestMetrics, prometheus::Error> {
        let m = IngestMetrics {
            refused: IntCounterVec::new(
                Opts::new(
                    "razar_collector_connections_refused_total",
                    "Agent connections refused (TLS handshake, identity or protocol), by reason.",
                ),
                &["reason"],
            )?,
            closed: IntCounterVec::new(
                Opts::new(
                    "razar_collector_connections_closed_total",
                    "Connections the collector closed on its own, by reason.",
                ),
                &["reason"],
            )?,
            agents_connected: IntGauge::new(
                "razar_collector_agents_connected",
                "Agents currently welcomed.",
            )?,
            connections_accepted: IntCounter::new(
                "razar_collector_connections_accepted_total",
                "Agent connections welcomed.",
            )?,
            batches_stored: IntCounter::new(
                "razar_collector_batches_stored_total",
                "Telemetry batches committed to the database.",
            )?,
            batches_duplicate: IntCounter::new(
                "razar_collector_batches_duplicate_total",
                "Resent batches recognised as already stored.",
            )?,
            samples_stored: IntCounter::new(
                "razar_collector_samples_stored_total",
                "Samples committed to the database.",
            )?,
            events_stored: IntCounter::new(
                "razar_collector_events_stored_total",
                "Events committed to the database.",
            )?,
            db_retries: IntCounter::new(
                "razar_collector_ingest_db_retries_total",
                "Database writes retried after an error.",
            )?,
            connections_paused: IntGauge::new(
                "razar_collector_connections_paused",
                "Connections not read because the database is behind (back-pressure).",
            )?,
            ack_latency: Histogram::with_opts(
                HistogramOpts::new(
                    "razar_collector_ack_latency_seconds",
                    "From a batch's arrival to its commit.",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0,
                ]),
            )?,
            host_transitions: IntCounterVec::new(
                Opts::new(
                    "razar_collector_host_transitions_total",
                    "Hosts marked lost or back.",
                ),
                &["to"],
            )?,
            host_transitions_dropped: IntCounter::new(
                "razar_collector_host_transitions_dropped_total",
                "Lost/back transitions not delivered to their consumer (none, or behind).",
            )?,
            group: GroupMetrics::new(registry)?,
        };
        registry.register(Box::new(m.host_transitions_dropped.clone()))?;
        registry.register(Box::new(m.refused.clone()))?;
        registry.register(Box::new(m.closed.clone()))?;
        registry.register(Box::new(m.agents_connected.clone()))?;
        registry.register(Box::new(m.connections_accepted.clone()))?;
        registry.register(Box::new(m.batches_stored.clone()))?;
        registry.register(Box::new(m.batches_duplicate.clone()))?;
        registry.register(Box::new(m.samples_stored.clone()))?;
        registry.register(Box::new(m.events_stored.clone()))?;
        registry.register(Box::new(m.db_retries.clone()))?;
        registry.register(Box::new(m.connections_paused.clone()))?;
        registry.register(Box::new(m.ack_latency.clone()))?;
        registry.register(Box::new(m.host_transitions.clone()))?;
        Ok(m)
    }

    /// Counts a refusal under its stable reason code.
    pub fn refuse(&self, reason: &str) {
        self.refused.with_label_values(&[reason]).inc();
    }
}

/// Why the collector closes a connection on its own. Every such close goes through one
/// place, which counts it under `razar_collector_connections_closed_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// No stream (no `Hello`) within `hello_timeout`.
    HelloTimeout,
    /// The certificate names no host.
    NoIdentity,
    /// A newer connection of the same host was welcomed.
    Superseded,
    /// The certificate is revoked by a reloaded CRL.
    Revoked,
    /// The session refused the agent; the protocol's refusal code.
    Refused(&'static str),
    /// Nothing heard within the heartbeat grace.
    PeerLost,
    /// The heartbeat grace ran out in the middle of a frame (a peer trickling bytes).
    PartialFrame,
    /// The peer did not take its replies within `reply_stall_timeout`.
    SlowReader,
    /// The agent finished its stream; everything received was committed.
    StreamFinished,
    /// The collector is shutting down; everything received was committed.
    Shutdown,
}

impl CloseReason {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::HelloTimeout => "hello_timeout",
            CloseReason::NoIdentity => "no_identity",
            CloseReason::Superseded => "superseded",
            CloseReason::Revoked => "revoked",
            CloseReason::Refused(code) => code,
            CloseReason::PeerLost => "peer_lost",
            CloseReason::PartialFrame => "partial_frame",
            CloseReason::SlowReader => "slow_reader",
            CloseReason::StreamFinished => "stream_finished",
            CloseReason::Shutdown => "shutdown",
        }
    }

    /// The application close code the peer receives.
    pub fn code(self) -> u32 {
        match self {
            CloseReason::PeerLost | CloseReason::PartialFrame => close_code::PEER_LOST,
            CloseReason::StreamFinished | CloseReason::Shutdown => close_code::SHUTDOWN,
            _ => close_code::REFUSED,
        }
    }

    /// The close reason the peer receives (a refusal's code under `REFUSED`).
    fn message(self) -> &'static [u8] {
        match self {
            CloseReason::PeerLost => b"no heartbeat within the grace",
            CloseReason::PartialFrame => b"partial frame past the grace",
            CloseReason::StreamFinished | CloseReason::Shutdown => b"collector shutting down",
            other => other.label().as_bytes(),
        }
    }
}

/// One log line per key per interval: the first occurrence is logged, later ones within
/// the interval are only counted and reported with the next line. Keys are static (a
/// bounded set), so the map stays small.
#[derive(Debug)]
pub(crate) struct LogLimiter {
    interval: Duration,
    last: HashMap<&'static str, (Instant, u64)>,
}

impl LogLimiter {
    pub(crate) fn new(interval: Duration) -> LogLimiter {
        LogLimiter {
            interval,
            last: HashMap::new(),
        }
    }

    /// `Some(suppressed)` when a line for `key` may be logged at `now` (with how many
    /// were left out since the previous line), `None` when it is left out.
    pub(crate) fn admit(&mut self, key: &'static str, now: Instant) -> Option<u64> {
        match self.last.get_mut(key) {
            Some((at, suppressed)) if now.saturating_duration_since(*at) < self.interval => {
                *suppressed += 1;
                None
            }
            Some((at, suppressed)) => {
                let left_out = *suppressed;
                *at = now;
                *suppressed = 0;
                Some(left_out)
            }
            None => {
                self.last.insert(key, (now, 0));
                Some(0)
            }
        }
    }
}

/// One live, identified connection.
#[derive(Debug)]
pub(crate) struct LiveConnection {
    pub host: String,
    /// Client certificate serial (lower-case hex).
    pub serial: String,
    pub conn: quinn::Connection,
    pub commands: mpsc::Sender<Command>,
    /// Welcomed (owns the host) rather than still in its handshake.
    pub welcomed: bool,
}

/// Live connections by id, and which one owns each host.
#[derive(Debug, Default)]
pub(crate) struct Connections {
    by_id: HashMap<u64, LiveConnection>,
    owner: HashMap<String, u64>,
}

/// State shared by the server, its connection tasks and the handle.
#[derive(Debug)]
pub(crate) struct Shared {
    pub store: Store,
    pub config: IngestConfig,
    pub metrics: IngestMetrics,
    pub liveness: Arc<Liveness>,
    pub db_writers: Arc<Semaphore>,
    /// Where connections queue their batches for a group commit.
    pub writer: GroupWriter,
    /// The persisted commands ([`crate::dispatch`]).
    pub ledger: Ledger,
    /// Log chunks from agents to the API clients following them.
    pub logs: crate::logs::LogHub,
    connections: Mutex<Connections>,
    next_id: AtomicU64,
    log_limiter: Mutex<LogLimiter>,
}

impl Shared {
    fn connections(&self) -> MutexGuard<'_, Connections> {
        // Plain maps; a panic elsewhere cannot leave them half-updated.
        self.connections.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes `conn` for `reason` and counts it: the one place the collector closes a
    /// connection on its own. A connection already closed (by either side) is left as
    /// it is and not counted again.
    pub(crate) fn close(&self, conn: &quinn::Connection, reason: CloseReason) {
        if conn.close_reason().is_some() {
            return;
        }
        conn.close(reason.code().into(), reason.message());
        self.metrics
            .closed
            .with_label_values(&[reason.label()])
            .inc();
    }

    /// Whether a line about `kind` may be logged now (see [`LogLimiter`]); `Some` holds
    /// how many were left out since the last one.
    pub(crate) fn admit_log(&self, kind: &'static str) -> Option<u64> {
        self.log_limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(kind, Instant::now())
    }

    /// Registers a connection still in its handshake; returns its id.
    pub(crate) fn register(
        &self,
        host: &str,
        serial: &str,
        conn: &quinn::Connection,
        commands: mpsc::Sender<Command>,
    ) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.connections().by_id.insert(
            id,
            LiveConnection {
                host: host.to_owned(),
                serial: serial.to_owned(),
                conn: conn.clone(),
                commands,
                welcomed: false,
            },
        );
        id
    }

    /// Connection `id` was welcomed: it now owns its host, and an older connection of
    /// the same host is closed as superseded.
    pub(crate) fn take_ownership(&self, id: u64) {
        let superseded = {
            let mut c = self.connections();
            let Some(host) = c.by_id.get_mut(&id).map(|l| {
                l.welcomed = true;
                l.host.clone()
            }) else {
                return;
            };
            let previous = match c.owner.insert(host.clone(), id) {
                Some(old) if old != id => c.by_id.get(&old).map(|p| (host, p.conn.clone())),
                _ => None,
            };
            self.metrics.agents_connected.set(c.owner.len() as i64);
            previous
        };
        // Found under the lock, closed outside it.
        if let Some((host, previous)) = superseded {
            tracing::info!(host = %host, "newer connection supersedes the older one");
            self.close(&previous, CloseReason::Superseded);
            self.metrics.refuse("superseded");
        }
    }

    /// Hands `command` to the connection that owns `host`, if any.
    pub(crate) fn deliver(&self, host: &str, command: Command) -> Delivery {
        let c = self.connections();
        let Some(live) = c.owner.get(host).and_then(|id| c.by_id.get(id)) else {
            return Delivery::NotConnected;
        };
        match live.commands.try_send(command) {
            Ok(()) => Delivery::Handed,
            Err(mpsc::error::TrySendError::Full(_)) => Delivery::QueueFull,
            Err(mpsc::error::TrySendError::Closed(_)) => Delivery::NotConnected,
        }
    }

    /// Hosts owned by a welcomed connection, sorted.
    pub(crate) fn owned_hosts(&self) -> Vec<String> {
        let mut hosts: Vec<String> = self.connections().owner.keys().cloned().collect();
        hosts.sort();
        hosts
    }

    /// Connection `id` ended.
    pub(crate) fn unregister(&self, id: u64) {
        let mut c = self.connections();
        if let Some(live) = c.by_id.remove(&id) {
            if c.owner.get(&live.host) == Some(&id) {
                c.owner.remove(&live.host);
            }
        }
        self.metrics.agents_connected.set(c.owner.len() as i64);
    }
}

/// What became of a command handed to a host's connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// In the connection's command queue.
    Handed,
    /// The connection's command queue is full.
    QueueFull,
    /// No welcomed connection owns the host.
    NotConnected,
}

/// The running ingest server.
pub struct Collector {
    endpoint: quinn::Endpoint,
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    accept_task: JoinHandle<()>,
    lost_task: JoinHandle<()>,
    sweep_task: JoinHandle<()>,
    writer_tasks: Vec<JoinHandle<()>>,
    tasks: Arc<Tasks>,
    transitions: Mutex<Option<mpsc::Receiver<HostTransition>>>,
    started: Instant,
}

impl std::fmt::Debug for Collector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collector")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Collector {
    /// Binds the QUIC endpoint and starts accepting agents. `store` must be migrated.
    /// The ingest metrics are registered in `metrics`.
    pub async fn start(
        config: IngestConfig,
        store: Store,
        metrics: &Registry,
    ) -> Result<Collector, ServerError> {
        razar_shared::protocol::session::validate_config(&config.session)
            .map_err(|_| ServerError::Invalid("session config has a zero field"))?;
        if config.keep_alive >= config.idle_timeout {
            return Err(ServerError::Invalid(
                "keep_alive must be below idle_timeout",
            ));
        }
        if config.max_batches_per_txn == 0
            || config.max_pending_batches == 0
            || config.db_writers == 0
        {
            return Err(ServerError::Invalid(
                "batch limits and db_writers must be at least 1",
            ));
        }
        if config.command_sweep_interval.is_zero() {
            return Err(ServerError::Invalid(
                "command_sweep_interval must be above zero",
            ));
        }
        if config.max_pending_reply_bytes == 0 || config.reply_stall_timeout.is_zero() {
            return Err(ServerError::Invalid(
                "max_pending_reply_bytes and reply_stall_timeout must be above zero",
            ));
        }
        let group = config.group;
        if group.writers == 0 || group.max_samples == 0 || group.max_hosts == 0 || group.queue == 0
        {
            return Err(ServerError::Invalid(
                "group writers, group limits and queue must be at least 1",
            ));
        }
        let quinn_config = config.quinn_config()?;
        let endpoint_config = match config.reset_key {
            Some(key) => {
                let hmac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
                // Connection ids carry a keyed hash that the endpoint checks before it
                // answers an unknown one with a reset: that key must be stable too.
                let mut cid_key = [0u8; 8];
                cid_key.copy_from_slice(&ring::hmac::sign(&hmac, b"cid").as_ref()[..8]);
                let cid_key = u64::from_le_bytes(cid_key);
                let mut endpoint = quinn::EndpointConfig::new(Arc::new(hmac));
                endpoint.cid_generator(move || {
                    Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
                });
                endpoint
            }
            None => quinn::EndpointConfig::default(),
        };
        let bind = |source| ServerError::Bind {
            addr: config.listen,
            source,
        };
        let socket = std::net::UdpSocket::bind(config.listen).map_err(bind)?;
        enlarge_socket_buffers(&socket);
        let runtime = quinn::default_runtime()
            .ok_or_else(|| bind(std::io::Error::other("no async runtime for quinn")))?;
        let endpoint = quinn::Endpoint::new(endpoint_config, Some(quinn_config), socket, runtime)
            .map_err(bind)?;
        let local_addr = endpoint.local_addr().map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?;
        let tasks = Tasks::new(metrics, RestartBackoff::default())?;
        let ledger = Ledger::new(
            store.pool().clone(),
            DispatchMetrics::new(metrics)?,
            config.command_result_grace,
        );
        let logs = crate::logs::LogHub::new()?;
        logs.register_metrics(metrics)?;
        let metrics = IngestMetrics::new(metrics)?;
        let (writer, writer_tasks) =
            GroupWriter::start_supervised(store.clone(), group, metrics.group.clone(), &tasks);
        let shared = Arc::new(Shared {
            store: store.clone(),
            db_writers: Arc::new(Semaphore::new(config.db_writers)),
            writer,
            ledger,
            logs,
            liveness: Arc::new(Liveness::default()),
            metrics,
            connections: Mutex::new(Connections::default()),
            next_id: AtomicU64::new(1),
            log_limiter: Mutex::new(LogLimiter::new(config.refusal_log_interval)),
            config,
        });
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (transitions_tx, transitions_rx) = mpsc::channel(TRANSITIONS_CAPACITY);
        let (counted_tx, mut counted_rx) = mpsc::unbounded_channel::<HostTransition>();
        let counter = {
            let shared = shared.clone();
            async move {
                while let Some(t) = counted_rx.recv().await {
                    let to = match &t {
                        HostTransition::Lost(_) => "lost",
                        HostTransition::Back(_) => "back",
                    };
                    shared
                        .metrics
                        .host_transitions
                        .with_label_values(&[to])
                        .inc();
                    // Nobody listening (or a consumer behind) only costs the
                    // stream: the store has every transition.
                    if transitions_tx.try_send(t).is_err() {
                        shared.metrics.host_transitions_dropped.inc();
                    }
                }
            }
        };
        // Ends once the lost-host task is gone for good (its senders dropped).
        tokio::spawn(counter);
        let timing = LostTiming {
            grace: shared.config.lost_grace(),
            restart_grace: shared.config.lost_after_restart,
            samples_stalled_after: shared.config.samples_stalled_after,
        };
        let lost_task = {
            let shared = shared.clone();
            let shutdown = shutdown_rx.clone();
            tasks.spawn(
                "lost_hosts",
                Some(timing.deadline()),
                Some(shutdown_rx.clone()),
                move |beat| {
                    let run = lost::run(
                        shared.liveness.clone(),
                        shared.store.clone(),
                        timing,
                        counted_tx.clone(),
                        shutdown.clone(),
                        beat,
                    );
                    async move {
                        run.await;
                        Ok::<(), std::convert::Infallible>(())
                    }
                },
            )
        };
        let sweep_task = {
            let shared = shared.clone();
            let every = shared.config.command_sweep_interval;
            let stop = shutdown_rx.clone();
            tasks.spawn(
                "command_sweep",
                Some(every.saturating_mul(4) + Duration::from_secs(60)),
                Some(shutdown_rx.clone()),
                move |beat| {
                    let run = dispatch::run_sweep(shared.clone(), every, stop.clone(), beat);
                    async move {
                        run.await;
                        Ok::<(), std::convert::Infallible>(())
                    }
                },
            )
        };
        let accept_task = tokio::spawn(accept_loop(endpoint.clone(), shared.clone(), shutdown_rx));
        tracing::info!(addr = %local_addr, "collector listening for agents (QUIC, mTLS)");
        Ok(Collector {
            endpoint,
            local_addr,
            shared,
            shutdown: shutdown_tx,
            accept_task,
            lost_task,
            sweep_task,
            writer_tasks,
            tasks,
            transitions: Mutex::new(Some(transitions_rx)),
            started: Instant::now(),
        })
    }

    /// The address agents connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// When the server started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Installs a new TLS config (new certificate, new CRLs) for new connections, and
    /// closes open connections whose certificate serial is listed in `crls`. Healthy
    /// connections stay up. Returns how many were closed.
    ///
    /// Build `tls` with the tracker in [`IngestConfig::refusals`]
    /// (`tls::server_config_from_files_tracked`) to keep typed refusal reasons.
    pub fn reload_tls(
        &self,
        tls: Arc<rustls::ServerConfig>,
        crls: &[CertificateRevocationListDer<'static>],
    ) -> Result<usize, ServerError> {
        let config = quinn_server_config(
            tls,
            self.shared.config.keep_alive,
            self.shared.config.idle_timeout,
        )?;
        self.endpoint.set_server_config(Some(config));
        // Each CRL is parsed once; every connection is then one lookup.
        let mut revoked = HashSet::new();
        for crl in crls {
            match tls::revoked_serials(crl.as_ref()) {
                Ok(serials) => revoked.extend(serials),
                // The verifier just accepted it, so this is not expected.
                Err(error) => tracing::error!(%error, "cannot list the serials of a CRL"),
            }
        }
        let to_close: Vec<(String, String, quinn::Connection)> = if revoked.is_empty() {
            Vec::new()
        } else {
            self.shared
                .connections()
                .by_id
                .values()
                .filter(|live| revoked.contains(&live.serial))
                .map(|live| (live.host.clone(), live.serial.clone(), live.conn.clone()))
                .collect()
        };
        // Found under the lock, closed outside it.
        for (host, serial, conn) in &to_close {
            tracing::warn!(host = %host, serial = %serial, "certificate revoked: closing its connection");
            self.shared.close(conn, CloseReason::Revoked);
            self.shared.metrics.refuse("revoked");
        }
        Ok(to_close.len())
    }

    /// [`reload_tls`](Self::reload_tls) from files (what SIGHUP does). Nothing changes
    /// if any file fails to load.
    pub fn reload_tls_files(&self, files: &ServerTlsFiles) -> Result<usize, ServerError> {
        let config = tls::server_config_from_files_tracked(files, &self.shared.config.refusals)?;
        let crls = files
            .crls
            .iter()
            .map(|p| tls::load_crl_file(p))
            .collect::<Result<Vec<_>, _>>()?;
        self.reload_tls(Arc::new(config), &crls)
    }

    /// Agents currently welcomed.
    pub fn agents_connected(&self) -> usize {
        self.shared.connections().owner.len()
    }

    /// Host ids currently welcomed, sorted.
    pub fn connected_hosts(&self) -> Vec<String> {
        self.shared.owned_hosts()
    }

    /// Queues a command for `host`'s live connection, unrecorded. False when it is not
    /// connected or its queue is full. Commands that must survive a disconnect and
    /// have their result stored go through [`Collector::dispatch`].
    pub fn send_command(&self, host: &str, command: Command) -> bool {
        self.shared.deliver(host, command) == Delivery::Handed
    }

    /// Persisted commands: submit, look up, expire ([`crate::dispatch`]).
    pub fn dispatch(&self) -> Dispatch {
        Dispatch::new(self.shared.clone())
    }

    /// The supervised background tasks (lost hosts, group writers); the service adds
    /// its own (maintenance).
    /// Where agents' log chunks go (the API's log follows subscribe here).
    pub fn logs(&self) -> &crate::logs::LogHub {
        &self.shared.logs
    }

    pub fn tasks(&self) -> &Arc<Tasks> {
        &self.tasks
    }

    /// Liveness and ingest progress of every host (lost hosts, stuck hosts, lag).
    pub fn liveness(&self) -> &Arc<Liveness> {
        &self.shared.liveness
    }

    /// The ingest metrics.
    pub fn metrics(&self) -> &IngestMetrics {
        &self.shared.metrics
    }

    /// Whether `host` is currently considered lost (by this process).
    pub fn is_lost(&self, host: &str) -> bool {
        self.shared.liveness.is_lost(host)
    }

    /// The stream of lost/back transitions, once (for the decision engine).
    pub fn take_transitions(&self) -> Option<mpsc::Receiver<HostTransition>> {
        self.transitions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Stops accepting, lets every connection commit what it has and acknowledge it,
    /// closes them, and waits for the endpoint to go idle (at most `grace`).
    pub async fn shutdown(self, grace: Duration) {
        self.shutdown.send_replace(true);
        let _ = tokio::time::timeout(grace, self.accept_task).await;
        self.endpoint
            .close(close_code::SHUTDOWN.into(), b"collector shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        self.lost_task.abort();
        self.sweep_task.abort();
        // Every connection has ended or been cut: nothing left to acknowledge.
        for task in &self.writer_tasks {
            task.abort();
        }
    }
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tasks = JoinSet::new();
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = shutdown.changed() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let Some(incoming) = incoming else { break };
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(conn) => conn,
                Err(e) => {
                    let reason = handshake_refusal(&e, &shared.config.refusals).code();
                    shared.metrics.refuse(reason);
                    // Unauthenticated: one line per kind per interval, never one per peer.
                    if let Some(left_out) = shared.admit_log(reason) {
                        tracing::info!(remote = %remote, reason, error = %e, similar_left_out = left_out, "agent handshake refused");
                    }
                    return;
                }
            };
            let Some((host, serial)) = identity(&conn) else {
                if let Some(left_out) = shared.admit_log("no_identity") {
                    tracing::warn!(remote = %remote, similar_left_out = left_out, "client certificate names no host; closing");
                }
                shared.close(&conn, CloseReason::NoIdentity);
                shared.metrics.refuse("no_identity");
                return;
            };
            ingest::serve(shared, conn, host, serial, shutdown).await;
        });
    }
    // Let connections finish their commits and close in order.
    while tasks.join_next().await.is_some() {}
}

/// Host id and certificate serial from the verified client certificate.
fn identity(conn: &quinn::Connection) -> Option<(String, String)> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    let leaf = certs.first()?;
    let host = tls::host_id_from_certificate(leaf.as_ref()).ok()?;
    let serial = tls::certificate_serial_hex(leaf.as_ref()).ok()?;
    Some((host, serial))
}

/// Why a handshake failed, from its typed parts, never its text: a timeout, or the TLS
/// alert this side sent (quinn closes with `0x100 + alert`), refined by the typed error
/// the certificate verifier recorded in `refusals` (an expired certificate and one not
/// yet valid send the same alert).
pub fn handshake_refusal(
    e: &quinn::ConnectionError,
    refusals: &HandshakeRefusals,
) -> HandshakeRefusal {
    match e {
        quinn::ConnectionError::TimedOut => HandshakeRefusal::HandshakeTimeout,
        quinn::ConnectionError::TransportError(error) => match tls_alert(error.code.into()) {
            Some(alert) => refusals.classify(alert),
            None => HandshakeRefusal::HandshakeFailed,
        },
        // The peer gave up on us (e.g. it does not trust the collector's certificate):
        // nothing of ours to refine.
        _ => HandshakeRefusal::HandshakeFailed,
    }
}

/// The TLS alert carried by a QUIC transport error code (`0x100..0x200`).
fn tls_alert(code: u64) -> Option<u8> {
    if (0x100..0x200).contains(&code) {
        u8::try_from(code - 0x100).ok()
    } else {
        None
    }
}

/// Socket buffer size asked for: thousands of agents' heartbeats and batches arrive in
/// bursts, and the system default (~208 KiB) drops datagrams while many connect at once
/// (measured: 100k+ drops connecting 10,000 agents, and connections lost to missed
/// heartbeats; none with 8 MiB).
const SOCKET_BUFFER: usize = 8 << 20;

/// Lost/back transitions queued for the consumer of `take_transitions`.
const TRANSITIONS_CAPACITY: usize = 1024;

/// Asks for [`SOCKET_BUFFER`] on the collector's UDP socket; the kernel caps it at
/// `net.core.rmem_max` / `wmem_max`, which is logged when it is much smaller.
fn enlarge_socket_buffers(socket: &std::net::UdpSocket) {
    let state = match quinn::udp::UdpSocketState::new(socket.into()) {
        Ok(state) => state,
        Err(error) => {
            tracing::warn!(%error, "cannot inspect the QUIC socket");
            return;
        }
    };
    let _ = state.set_recv_buffer_size(socket.into(), SOCKET_BUFFER);
    let _ = state.set_send_buffer_size(socket.into(), SOCKET_BUFFER);
    match state.recv_buffer_size(socket.into()) {
        Ok(got) if got < SOCKET_BUFFER / 4 => tracing::warn!(
            bytes = got,
            wanted = SOCKET_BUFFER,
            "the QUIC socket's receive buffer is small: raise net.core.rmem_max \
             (sysctl) for fleets of thousands of agents"
        ),
        Ok(got) => tracing::debug!(bytes = got, "QUIC socket receive buffer"),
        Err(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_limiter_logs_each_kind_once_per_interval_and_counts_the_rest() {
        let start = Instant::now();
        let mut limiter = LogLimiter::new(Duration::from_secs(10));
        assert_eq!(limiter.admit("certificate_expired", start), Some(0));
        for i in 1..1_000u64 {
            let at = start + Duration::from_millis(i);
            assert_eq!(limiter.admit("certificate_expired", at), None);
        }
        // Another kind has its own line.
        assert_eq!(limiter.admit("alpn_mismatch", start), Some(0));
        // The next interval logs again, with what was left out.
        let later = start + Duration::from_secs(10);
        assert_eq!(limiter.admit("certificate_expired", later), Some(999));
        assert_eq!(limiter.admit("certificate_expired", later), None);
        assert_eq!(
            limiter.admit("certificate_expired", later + Duration::from_secs(10)),
            Some(1)
        );
    }

    #[test]
    fn close_reasons_have_distinct_labels_and_the_agents_codes() {
        let all = [
            CloseReason::HelloTimeout,
            CloseReason::NoIdentity,
            CloseReason::Superseded,
            CloseReason::Revoked,
            CloseReason::Refused("host_id_mismatch"),
            CloseReason::PeerLost,
            CloseReason::PartialFrame,
            CloseReason::SlowReader,
            CloseReason::StreamFinished,
            CloseReason::Shutdown,
        ];
        let labels: HashSet<&str> = all.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), all.len());
        assert_eq!(CloseReason::SlowReader.code(), close_code::REFUSED);
        assert_eq!(CloseReason::SlowReader.message(), b"slow_reader");
        assert_eq!(
            CloseReason::Refused("host_id_mismatch").message(),
            b"host_id_mismatch"
        );
        assert_eq!(CloseReason::PartialFrame.code(), close_code::PEER_LOST);
        assert_eq!(CloseReason::Shutdown.code(), close_code::SHUTDOWN);
    }

    #[test]
    fn handshake_refusals_come_from_the_alert_refined_by_the_typed_error() {
        let refusals = HandshakeRefusals::default();
        let crypto = |alert: u8| {
            quinn::ConnectionError::TransportError(quinn_proto::TransportError {
                code: quinn_proto::TransportErrorCode::crypto(alert),
                frame: None,
                reason: "wording that changes between releases".into(),
            })
        };
        // certificate_expired (45) stands for both; the verifier's record tells them apart.
        refusals.record(45, HandshakeRefusal::CertificateNotYetValid);
        assert_eq!(
            handshake_refusal(&crypto(45), &refusals),
            HandshakeRefusal::CertificateNotYetValid
        );
        assert_eq!(
            handshake_refusal(&crypto(45), &refusals),
            HandshakeRefusal::CertificateExpired
        );
        assert_eq!(
            handshake_refusal(&crypto(120), &refusals),
            HandshakeRefusal::AlpnMismatch
        );
        assert_eq!(
            handshake_refusal(&crypto(116), &refusals),
            HandshakeRefusal::NoClientCertificate
        );
        assert_eq!(
            handshake_refusal(&quinn::ConnectionError::TimedOut, &refusals),
            HandshakeRefusal::HandshakeTimeout
        );
    }
}
