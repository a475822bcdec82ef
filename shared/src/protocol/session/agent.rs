//! The agent's side of a session: handshake, send window of unacknowledged batches,
//! series definitions per connection, resend after reconnect, heartbeats and the
//! lost-collector timer.

use super::{heartbeat_interval, lost_after, validate_config, SessionError, WallClock};
use crate::protocol::{
    AgentMessage, Batch, CollectorMessage, Command, CommandResult, ComponentInfo, GpuInfo,
    Heartbeat, Hello, Inventory, LogChunk, Refusal, SeriesDef, SessionConfig, StatusDigest,
    UnixMillis, PROTOCOL_INVENTORY, PROTOCOL_MIN,
};
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Instant;

/// Where the agent's session stands on the current connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentState {
    /// No connection; batches wait in the session.
    Disconnected,
    /// `Hello` sent (or queued), waiting for `Welcome` or a refusal.
    AwaitingWelcome,
    /// Welcomed; batches flow.
    Established { version: u16 },
    /// Refused, peer lost, or the collector broke the protocol: the driver closes the
    /// connection and calls [`AgentSession::disconnected`].
    Closed,
}

/// Something the driver acts on.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentEvent {
    /// The collector accepted the agent. Its cursor says every batch with
    /// `seq <= collector_acked_seq` is stored; the agent's seq counter must stay above it
    /// (a collector cursor above anything the agent remembers means the agent lost its
    /// state: continue numbering above the cursor or the collector drops the batches).
    Established {
        version: u16,
        collector_acked_seq: u64,
        collector_time_ms: UnixMillis,
        config: SessionConfig,
    },
    /// Every batch with `seq <= upto` is committed by the collector: delete them from
    /// the spool and persist `upto`.
    Acked { upto: u64 },
    /// A command from the collector.
    Command(Command),
    /// The collector answered a heartbeat (its clock, for skew estimation).
    HeartbeatAcked { collector_time_ms: UnixMillis },
    /// The collector refused the connection.
    Refused(Refusal),
    /// Nothing heard from the collector for `lost_after_missed` heartbeat intervals
    /// (or no `Welcome` in that time).
    PeerLost,
    /// The collector sent something the protocol does not allow here.
    ProtocolViolation { detail: &'static str },
}

/// What waits to be written; batches are referenced by seq so the window holds the
/// only copy until it is polled.
#[derive(Debug)]
enum Outgoing {
    Message(AgentMessage),
    Batch(u64),
}

/// The agent's session. Lives across reconnects: it owns the send window, the batches
/// not yet acknowledged and the series dictionary.
///
/// Driving it: [`connected`](Self::connected) when a stream is open, feed every decoded
/// [`CollectorMessage`] to [`handle`](Self::handle), call
/// [`handle_timeout`](Self::handle_timeout) at [`poll_timeout`](Self::poll_timeout),
/// write every [`poll_transmit`](Self::poll_transmit) message, act on every
/// [`poll_event`](Self::poll_event), and call [`disconnected`](Self::disconnected) when
/// the connection ends for any reason.
#[derive(Debug)]
pub struct AgentSession {
    hello: Hello,
    clock: WallClock,
    state: AgentState,
    config: SessionConfig,
    series: HashMap<u32, SeriesDef>,
    /// Series ids sent in `DefineSeries` on the current connection.
    defined: HashSet<u32>,
    /// Batches not yet sent on this connection, in seq order.
    unsent: VecDeque<Batch>,
    /// Batches sent (or queued for sending) and not yet acknowledged, in seq order.
    in_flight: VecDeque<Batch>,
    acked_seq: u64,
    /// Highest seq pushed or acknowledged.
    highest_seq: u64,
    transmit: VecDeque<Outgoing>,
    events: VecDeque<AgentEvent>,
    last_received: Instant,
    next_heartbeat: Option<Instant>,
    digest: StatusDigest,
    /// The inventory changed after the `Hello` of this connection was queued.
    inventory_changed: bool,
}

impl AgentSession {
    /// A disconnected session. `hello` is the template for every connection's `Hello`:
    /// its `last_acked_seq` is the agent's persisted cursor and its `agent_time_ms` the
    /// wall clock at `now` (later wall times are derived from `Instant`s; re-anchor with
    /// [`set_wall_clock`](Self::set_wall_clock)).
    pub fn new(hello: Hello, now: Instant) -> Self {
        let acked_seq = hello.last_acked_seq;
        AgentSession {
            clock: WallClock {
                at: now,
                unix_ms: hello.agent_time_ms,
            },
            hello,
            state: AgentState::Disconnected,
            config: SessionConfig::default(),
            series: HashMap::new(),
            defined: HashSet::new(),
            unsent: VecDeque::new(),
            in_flight: VecDeque::new(),
            acked_seq,
            highest_seq: acked_seq,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            last_received: now,
            next_heartbeat: None,
            digest: StatusDigest::default(),
            inventory_changed: false,
        }
    }

    /// Re-anchors the wall clock used for `Hello` and heartbeat timestamps.
    pub fn set_wall_clock(&mut self, now: Instant, unix_ms: UnixMillis) {
        self.clock = WallClock { at: now, unix_ms };
    }

    /// Replaces the inventory sent in the next `Hello`. On an established connection
    /// of version 2 or later, a changed inventory is also sent at once.
    pub fn set_inventory(&mut self, components: Vec<ComponentInfo>, gpus: Vec<GpuInfo>) {
        if self.hello.components == components && self.hello.gpus == gpus {
            return;
        }
        self.hello.components = components;
        self.hello.gpus = gpus;
        match self.state {
            AgentState::Established { .. } => self.send_inventory(),
            // The Hello on its way has the old one: send this after the Welcome.
            AgentState::AwaitingWelcome => self.inventory_changed = true,
            AgentState::Disconnected | AgentState::Closed => {}
        }
    }

    fn send_inventory(&mut self) {
        self.inventory_changed = false;
        if matches!(self.state, AgentState::Established { version } if version >= PROTOCOL_INVENTORY)
        {
            self.transmit
                .push_back(Outgoing::Message(AgentMessage::Inventory(Inventory {
                    components: self.hello.components.clone(),
                    gpus: self.hello.gpus.clone(),
                })));
        }
    }

    /// Sets the status digest carried by the following heartbeats.
    pub fn set_digest(&mut self, digest: StatusDigest) {
        self.digest = digest;
    }

    /// Registers a series so batches may reference its id. Kept across reconnects and
    /// sent once per connection, before the first batch that uses it.
    pub fn define_series(&mut self, def: SeriesDef) {
        if self.series.get(&def.id) != Some(&def) {
            // A changed definition must be sent again.
            self.defined.remove(&def.id);
            self.series.insert(def.id, def);
        }
    }

    /// Queues a batch that is already durable in the spool. Seqs must increase, and
    /// every series it references must have been defined.
    pub fn push_batch(&mut self, batch: Batch) -> Result<(), SessionError> {
        if batch.seq <= self.highest_seq {
            return Err(SessionError::BatchOutOfOrder {
                seq: batch.seq,
                highest: self.highest_seq,
            });
        }
        if let Some(missing) = batch
            .series
            .iter()
            .find(|s| !self.series.contains_key(&s.series))
        {
            return Err(SessionError::UnknownSeries {
                seq: batch.seq,
                series: missing.series,
            });
        }
        self.highest_seq = batch.seq;
        self.unsent.push_back(batch);
        self.fill_window();
        Ok(())
    }

    /// The driver's store renumbered its batches (a new agent state met a collector
    /// cursor): every held batch carries an old number and is forgotten, unsent, and the
    /// next pushed batch must be above `highest`. The driver pushes them again, renumbered.
    pub fn restart_numbering(&mut self, highest: u64) {
        self.unsent.clear();
        self.in_flight.clear();
        self.transmit
            .retain(|out| !matches!(out, Outgoing::Batch(_)));
        self.highest_seq = self.highest_seq.max(highest);
    }

    /// A new connection is open: queues `Hello` and starts the handshake timer.
    /// Anything left of a previous connection is treated as disconnected first.
    pub fn connected(&mut self, now: Instant) {
        self.disconnected();
        self.state = AgentState::AwaitingWelcome;
        self.inventory_changed = false;
        self.last_received = now;
        let mut hello = self.hello.clone();
        hello.last_acked_seq = self.acked_seq;
        hello.agent_time_ms = self.clock.unix_ms(now);
        self.transmit
            .push_back(Outgoing::Message(AgentMessage::Hello(hello)));
    }

    /// The connection is gone: unacknowledged batches go back to the front of the
    /// queue in order, series will be defined again, unsent messages are dropped
    /// (command results and log chunks included; the collector redelivers commands).
    pub fn disconnected(&mut self) {
        while let Some(batch) = self.in_flight.pop_back() {
            self.unsent.push_front(batch);
        }
        self.defined.clear();
        self.transmit.clear();
        self.next_heartbeat = None;
        self.state = AgentState::Disconnected;
    }

    /// Handles one message from the collector.
    pub fn handle(&mut self, msg: CollectorMessage, now: Instant) {
        if matches!(self.state, AgentState::Disconnected | AgentState::Closed) {
            return;
        }
        self.last_received = now;
        match (self.state, msg) {
            (_, CollectorMessage::Refusal(refusal)) => {
                self.close();
                self.events.push_back(AgentEvent::Refused(refusal));
            }
            (AgentState::AwaitingWelcome, CollectorMessage::Welcome(welcome)) => {
                if welcome.version < self.hello.protocol_min
                    || welcome.version > self.hello.protocol_max
                {
                    return self.violation("Welcome chose a version outside the offered range");
                }
                if validate_config(&welcome.config).is_err() {
                    return self.violation("Welcome carried an invalid session config");
                }
                self.config = welcome.config;
                self.state = AgentState::Established {
                    version: welcome.version,
                };
                self.events.push_back(AgentEvent::Established {
                    version: welcome.version,
                    collector_acked_seq: welcome.acked_seq,
                    collector_time_ms: welcome.collector_time_ms,
                    config: welcome.config,
                });
                self.acknowledge(welcome.acked_seq);
                if self.inventory_changed {
                    self.send_inventory();
                }
                self.next_heartbeat = now.checked_add(heartbeat_interval(&self.config));
                self.fill_window();
            }
            (AgentState::AwaitingWelcome, _) => {
                self.violation("expected Welcome or Refusal");
            }
            (AgentState::Established { .. }, CollectorMessage::Welcome(_)) => {
                self.violation("second Welcome");
            }
            (AgentState::Established { .. }, CollectorMessage::Ack { upto }) => {
                let last_sent = self.in_flight.back().map_or(self.acked_seq, |b| b.seq);
                if upto > last_sent {
                    return self.violation("Ack beyond the last batch sent");
                }
                self.acknowledge(upto);
                self.fill_window();
            }
            (AgentState::Established { .. }, CollectorMessage::Command(command)) => {
                self.events.push_back(AgentEvent::Command(command));
            }
            (
                AgentState::Established { .. },
                CollectorMessage::HeartbeatAck { collector_time_ms },
            ) => {
                self.events
                    .push_back(AgentEvent::HeartbeatAcked { collector_time_ms });
            }
            (AgentState::Disconnected | AgentState::Closed, _) => {}
        }
    }

    /// Fires due timers: the lost-collector timer and the heartbeat.
    pub fn handle_timeout(&mut self, now: Instant) {
        if !matches!(
            self.state,
            AgentState::AwaitingWelcome | AgentState::Established { .. }
        ) {
            return;
        }
        if self.lost_deadline().is_some_and(|deadline| now >= deadline) {
            self.close();
            self.events.push_back(AgentEvent::PeerLost);
            return;
        }
        if self.next_heartbeat.is_some_and(|due| now >= due) {
            let heartbeat = Heartbeat {
                agent_time_ms: self.clock.unix_ms(now),
                digest: self.digest,
            };
            self.transmit
                .push_back(Outgoing::Message(AgentMessage::Heartbeat(heartbeat)));
            self.next_heartbeat = now.checked_add(heartbeat_interval(&self.config));
        }
    }

    /// Queues a command's result. Unsent results are dropped on disconnect.
    pub fn send_command_result(&mut self, result: CommandResult) -> Result<(), SessionError> {
        self.send_established(AgentMessage::CommandResult(result))
    }

    /// Queues a piece of a log tail.
    pub fn send_log_chunk(&mut self, chunk: LogChunk) -> Result<(), SessionError> {
        self.send_established(AgentMessage::LogChunk(chunk))
    }

    /// The next message to write to the stream, in order.
    pub fn poll_transmit(&mut self) -> Option<AgentMessage> {
        while let Some(next) = self.transmit.pop_front() {
            match next {
                Outgoing::Message(msg) => return Some(msg),
                Outgoing::Batch(seq) => {
                    // Absent if acknowledged before it was polled; then it needs no send.
                    if let Ok(i) = self.in_flight.binary_search_by_key(&seq, |b| b.seq) {
                        let version = match self.state {
                            AgentState::Established { version } => version,
                            _ => PROTOCOL_MIN,
                        };
                        // An older collector gets the event kinds it knows.
                        return self
                            .in_flight
                            .get(i)
                            .cloned()
                            .map(|b| AgentMessage::Batch(b.for_version(version)));
                    }
                }
            }
        }
        None
    }

    /// When [`handle_timeout`](Self::handle_timeout) must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            AgentState::AwaitingWelcome => self.lost_deadline(),
            AgentState::Established { .. } => match (self.lost_deadline(), self.next_heartbeat) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
            AgentState::Disconnected | AgentState::Closed => None,
        }
    }

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<AgentEvent> {
        self.events.pop_front()
    }

    /// Current state.
    pub fn state(&self) -> AgentState {
        self.state
    }

    /// Highest seq the collector has acknowledged (or the persisted cursor).
    pub fn acked_seq(&self) -> u64 {
        self.acked_seq
    }

    /// Highest seq pushed or acknowledged; the next pushed batch must be above it.
    pub fn highest_seq(&self) -> u64 {
        self.highest_seq
    }

    /// Batches held and not yet acknowledged (sent or not). Drivers feed the session
    /// from the spool while this stays below a few windows.
    pub fn queued_batches(&self) -> usize {
        self.unsent.len() + self.in_flight.len()
    }

    /// Batches sent on this connection and not yet acknowledged.
    pub fn in_flight_batches(&self) -> usize {
        self.in_flight.len()
    }

    /// The session config in force (the collector's, once welcomed).
    pub fn config(&self) -> SessionConfig {
        self.config
    }

    fn send_established(&mut self, msg: AgentMessage) -> Result<(), SessionError> {
        if !matches!(self.state, AgentState::Established { .. }) {
            return Err(SessionError::NotEstablished);
        }
        self.transmit.push_back(Outgoing::Message(msg));
        Ok(())
    }

    /// Drops every held batch with `seq <= upto` and tells the driver.
    fn acknowledge(&mut self, upto: u64) {
        if upto <= self.acked_seq {
            return;
        }
        self.acked_seq = upto;
        self.highest_seq = self.highest_seq.max(upto);
        while self.in_flight.front().is_some_and(|b| b.seq <= upto) {
            self.in_flight.pop_front();
        }
        while self.unsent.front().is_some_and(|b| b.seq <= upto) {
            self.unsent.pop_front();
        }
        self.events.push_back(AgentEvent::Acked { upto });
    }

    /// Moves batches into the window while it has room, defining their series first.
    fn fill_window(&mut self) {
        if !matches!(self.state, AgentState::Established { .. }) {
            return;
        }
        let window = usize::try_from(self.config.max_unacked_batches).unwrap_or(usize::MAX);
        while self.in_flight.len() < window {
            let Some(batch) = self.unsent.pop_front() else {
                break;
            };
            let mut defs = Vec::new();
            for points in &batch.series {
                if self.defined.insert(points.series) {
                    if let Some(def) = self.series.get(&points.series) {
                        defs.push(def.clone());
                    }
                }
            }
            if !defs.is_empty() {
                self.transmit
                    .push_back(Outgoing::Message(AgentMessage::DefineSeries(defs)));
            }
            self.transmit.push_back(Outgoing::Batch(batch.seq));
            self.in_flight.push_back(batch);
        }
    }

    fn lost_deadline(&self) -> Option<Instant> {
        self.last_received.checked_add(lost_after(&self.config))
    }

    fn close(&mut self) {
        self.state = AgentState::Closed;
        self.next_heartbeat = None;
        self.transmit.clear();
    }

    fn violation(&mut self, detail: &'static str) {
        self.close();
        self.events
            .push_back(AgentEvent::ProtocolViolation { detail });
    }
}
