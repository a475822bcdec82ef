//! The collector's side of one connection: checks the `Hello` (identity, version),
//! welcomes with the stored cursor, filters duplicate batches, acknowledges after
//! commit, answers heartbeats and runs the lost-agent timer.

use super::{lost_after, negotiate_version, validate_config, SessionError, WallClock};
use crate::protocol::{
    AgentMessage, Batch, CollectorMessage, Command, CommandResult, Heartbeat, Hello, Inventory,
    LogChunk, Refusal, RefusalReason, SeriesDef, SessionConfig, UnixMillis, Welcome, PROTOCOL_MAX,
    PROTOCOL_MIN,
};
use rustc_hash::FxHashMap;
use std::collections::VecDeque;
use std::time::Instant;

/// Where one collector connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CollectorState {
    /// Waiting for the agent's first message, which must be `Hello`.
    AwaitingHello,
    /// `Hello` passed the checks; the driver looks up the cursor and calls `accept`.
    AwaitingAccept,
    /// Welcomed; batches flow.
    Established { version: u16 },
    /// Refused or the agent was lost: write what `poll_transmit` still returns, then
    /// close the connection.
    Closed,
}

/// Something the driver acts on.
#[derive(Debug, Clone, PartialEq)]
pub enum CollectorEvent {
    /// A `Hello` passed the identity and version checks; call
    /// [`CollectorSession::accept`] (or [`CollectorSession::refuse`]).
    HelloReceived(Hello),
    /// Series definitions for this connection (also kept by the session, see
    /// [`CollectorSession::series`]).
    SeriesDefined(Vec<SeriesDef>),
    /// A new batch (seq above the cursor): store it, commit, then call
    /// [`CollectorSession::committed`]. Every series it uses is defined.
    Batch(Batch),
    /// A heartbeat (already answered).
    Heartbeat(Heartbeat),
    /// A command's outcome.
    CommandResult(CommandResult),
    /// A piece of a log tail.
    LogChunk(LogChunk),
    /// The agent's inventory changed (protocol version 2 and later).
    Inventory(Inventory),
    /// The session refused the agent, by itself or through `refuse`; the refusal is
    /// queued for sending.
    Refused(Refusal),
    /// Nothing heard from the agent for `lost_after_missed` heartbeat intervals.
    /// Reported once.
    PeerLost,
}

/// The collector's side of one connection. Create one per accepted connection with the
/// host id read from the client certificate.
#[derive(Debug)]
pub struct CollectorSession {
    certificate_host_id: String,
    versions: (u16, u16),
    state: CollectorState,
    version: u16,
    config: SessionConfig,
    clock: Option<WallClock>,
    /// Checked for every series of every batch: a fast hasher for the small keys.
    series: FxHashMap<u32, SeriesDef>,
    cursor: u64,
    /// Highest batch seq passed to the driver on this connection (or the cursor).
    received_seq: u64,
    duplicates: u64,
    transmit: VecDeque<CollectorMessage>,
    events: VecDeque<CollectorEvent>,
    last_received: Instant,
}

impl CollectorSession {
    /// A session for a connection whose client certificate names `certificate_host_id`.
    /// Speaks versions `PROTOCOL_MIN..=PROTOCOL_MAX`.
    pub fn new(certificate_host_id: String, now: Instant) -> Self {
        CollectorSession {
            certificate_host_id,
            versions: (PROTOCOL_MIN, PROTOCOL_MAX),
            state: CollectorState::AwaitingHello,
            version: 0,
            config: SessionConfig::default(),
            clock: None,
            series: FxHashMap::default(),
            cursor: 0,
            received_seq: 0,
            duplicates: 0,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            last_received: now,
        }
    }

    /// Overrides the range of versions spoken (compatibility tests, staged rollouts).
    pub fn with_versions(mut self, min: u16, max: u16) -> Self {
        self.versions = (min, max);
        self
    }

    /// Handles one message from the agent.
    pub fn handle(&mut self, msg: AgentMessage, now: Instant) {
        if self.state == CollectorState::Closed {
            return;
        }
        self.last_received = now;
        match (self.state, msg) {
            (CollectorState::AwaitingHello, AgentMessage::Hello(hello)) => self.hello(hello),
            (CollectorState::AwaitingHello, _) => {
                self.refuse(
                    RefusalReason::ExpectedHello,
                    "the first message must be Hello",
                );
            }
            (_, AgentMessage::Hello(_)) => {
                self.refuse(RefusalReason::ProtocolViolation, "second Hello");
            }
            (CollectorState::AwaitingAccept, _) => {
                self.refuse(RefusalReason::ProtocolViolation, "message before Welcome");
            }
            (CollectorState::Established { .. }, AgentMessage::DefineSeries(defs)) => {
                for def in &defs {
                    self.series.insert(def.id, def.clone());
                }
                self.events.push_back(CollectorEvent::SeriesDefined(defs));
            }
            (CollectorState::Established { .. }, AgentMessage::Batch(batch)) => self.batch(batch),
            (CollectorState::Established { .. }, AgentMessage::Heartbeat(heartbeat)) => {
                let collector_time_ms = self.clock.map_or(0, |c| c.unix_ms(now));
                self.transmit
                    .push_back(CollectorMessage::HeartbeatAck { collector_time_ms });
                self.events.push_back(CollectorEvent::Heartbeat(heartbeat));
            }
            (CollectorState::Established { .. }, AgentMessage::CommandResult(result)) => {
                self.events.push_back(CollectorEvent::CommandResult(result));
            }
            (CollectorState::Established { .. }, AgentMessage::LogChunk(chunk)) => {
                self.events.push_back(CollectorEvent::LogChunk(chunk));
            }
            (CollectorState::Established { .. }, AgentMessage::Inventory(inventory)) => {
                self.events.push_back(CollectorEvent::Inventory(inventory));
            }
            (CollectorState::Closed, _) => {}
        }
    }

    /// Welcomes the agent after [`CollectorEvent::HelloReceived`]. `stored_cursor` is
    /// the highest seq committed for this host; `collector_time_ms` is the wall clock
    /// at `now` (heartbeat answers are derived from it). The lost-agent timer (default
    /// config until now) keeps running between `HelloReceived` and this call, so look
    /// the cursor up promptly.
    pub fn accept(
        &mut self,
        stored_cursor: u64,
        config: SessionConfig,
        now: Instant,
        collector_time_ms: UnixMillis,
    ) -> Result<(), SessionError> {
        if self.state != CollectorState::AwaitingAccept {
            return Err(SessionError::NotAwaitingAccept);
        }
        validate_config(&config)?;
        self.config = config;
        self.cursor = stored_cursor;
        self.received_seq = stored_cursor;
        self.clock = Some(WallClock {
            at: now,
            unix_ms: collector_time_ms,
        });
        // The agent stayed silent while we looked the cursor up; its clock starts now.
        self.last_received = now;
        self.state = CollectorState::Established {
            version: self.version,
        };
        self.transmit.push_back(CollectorMessage::Welcome(Welcome {
            version: self.version,
            collector_time_ms,
            acked_seq: stored_cursor,
            config,
        }));
        Ok(())
    }

    /// Refuses the agent (e.g. `Superseded`, `Revoked`, `Unavailable`, or a frame that
    /// failed to decode: `ProtocolViolation`). Queues the refusal and closes.
    pub fn refuse(&mut self, reason: RefusalReason, message: &str) {
        if self.state == CollectorState::Closed {
            return;
        }
        let refusal = Refusal {
            reason,
            message: message.to_owned(),
        };
        self.state = CollectorState::Closed;
        self.transmit
            .push_back(CollectorMessage::Refusal(refusal.clone()));
        self.events.push_back(CollectorEvent::Refused(refusal));
    }

    /// Every batch up to `upto` is committed (with the cursor, in one transaction):
    /// advances the cursor and queues the acknowledgement.
    pub fn committed(&mut self, upto: u64) -> Result<(), SessionError> {
        if upto <= self.cursor {
            return Ok(());
        }
        if upto > self.received_seq {
            return Err(SessionError::CommitBeyondReceived {
                upto,
                received: self.received_seq,
            });
        }
        self.cursor = upto;
        if matches!(self.state, CollectorState::Established { .. }) {
            self.transmit.push_back(CollectorMessage::Ack { upto });
        }
        Ok(())
    }

    /// Queues a command for the agent; refused (`CommandNeedsVersion`) when this session
    /// negotiated a version older than the command's [`min_version`](crate::protocol::CommandAction::min_version).
    pub fn send_command(&mut self, command: Command) -> Result<(), SessionError> {
        let CollectorState::Established { version } = self.state else {
            return Err(SessionError::NotEstablished);
        };
        let needed = command.action.min_version();
        if version < needed {
            return Err(SessionError::CommandNeedsVersion { needed, version });
        }
        self.transmit.push_back(CollectorMessage::Command(command));
        Ok(())
    }

    /// Fires the lost-agent timer if due.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state == CollectorState::Closed {
            return;
        }
        if self.lost_deadline().is_some_and(|deadline| now >= deadline) {
            self.state = CollectorState::Closed;
            self.events.push_back(CollectorEvent::PeerLost);
        }
    }

    /// The next message to write to the stream, in order.
    pub fn poll_transmit(&mut self) -> Option<CollectorMessage> {
        self.transmit.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            CollectorState::Closed => None,
            _ => self.lost_deadline(),
        }
    }

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<CollectorEvent> {
        self.events.pop_front()
    }

    /// Current state.
    pub fn state(&self) -> CollectorState {
        self.state
    }

    /// Host id from the client certificate.
    pub fn certificate_host_id(&self) -> &str {
        &self.certificate_host_id
    }

    /// Highest seq committed for this host, as far as this connection knows.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Batches received at or below the cursor (resends), answered with an `Ack` and
    /// not passed on.
    pub fn duplicate_batches(&self) -> u64 {
        self.duplicates
    }

    /// A series defined on this connection.
    pub fn series(&self, id: u32) -> Option<&SeriesDef> {
        self.series.get(&id)
    }

    fn hello(&mut self, hello: Hello) {
        if hello.host_id != self.certificate_host_id {
            let reason = RefusalReason::HostIdMismatch {
                certificate: self.certificate_host_id.clone(),
                claimed: hello.host_id.clone(),
            };
            let message = format!(
                "Hello claims host id {:?} but the certificate names {:?}",
                hello.host_id, self.certificate_host_id
            );
            return self.refuse(reason, &message);
        }
        let offered = (hello.protocol_min, hello.protocol_max);
        let Some(version) = negotiate_version(offered, self.versions) else {
            let (collector_min, collector_max) = self.versions;
            let message = format!(
                "agent speaks versions {}..={}, collector {collector_min}..={collector_max}",
                hello.protocol_min, hello.protocol_max
            );
            let reason = RefusalReason::VersionUnsupported {
                collector_min,
                collector_max,
            };
            return self.refuse(reason, &message);
        };
        self.version = version;
        self.state = CollectorState::AwaitingAccept;
        self.events.push_back(CollectorEvent::HelloReceived(hello));
    }

    fn batch(&mut self, batch: Batch) {
        if batch.seq <= self.cursor {
            self.duplicates += 1;
            self.transmit
                .push_back(CollectorMessage::Ack { upto: self.cursor });
            return;
        }
        if batch.seq <= self.received_seq {
            return self.refuse(
                RefusalReason::ProtocolViolation,
                "batch seq did not increase on the connection",
            );
        }
        if batch
            .series
            .iter()
            .any(|s| !self.series.contains_key(&s.series))
        {
            return self.refuse(
                RefusalReason::ProtocolViolation,
                "batch references a series not defined on this connection",
            );
        }
        self.received_seq = batch.seq;
        self.events.push_back(CollectorEvent::Batch(batch));
    }

    fn lost_deadline(&self) -> Option<Instant> {
        self.last_received.checked_add(lost_after(&self.config))
    }
}
