//! An agent session and a collector session joined by an in-memory byte pipe that runs
//! through the real codec, on a simulated clock (after quinn-proto's test `Pair`).
//!
//! The pair also plays both applications: the agent's spool (seqs durable until acked)
//! and the collector's database (seqs committed with the cursor, in one transaction
//! that a dropped connection rolls back).

use razar_shared::protocol::{
    encode_into, AgentEvent, AgentFrameDecoder, AgentMessage, AgentSession, AgentState, Batch,
    CollectorEvent, CollectorFrameDecoder, CollectorSession, CollectorState, Hello, SeriesDef,
    SeriesPoints, SessionConfig, UnixMillis, PROTOCOL_MAX, PROTOCOL_MIN,
};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

pub const HOST: &str = "gpu-node-01";
/// Wall clock of the agent and collector at the pair's start.
pub const START_UNIX_MS: UnixMillis = 1_750_000_000_000;
const SERIES: u32 = 4;

pub fn hello(host: &str, protocol_min: u16, protocol_max: u16) -> Hello {
    Hello {
        protocol_min,
        protocol_max,
        host_id: host.to_owned(),
        agent_version: "0.1.0".into(),
        profile: "default".into(),
        components: Vec::new(),
        gpus: Vec::new(),
        last_acked_seq: 0,
        agent_time_ms: START_UNIX_MS,
    }
}

/// One connection as the collector saw it.
#[derive(Debug, Default)]
pub struct Connection {
    /// Seq of every batch frame that reached the collector, in order.
    pub batches: Vec<u64>,
    /// Number of `DefineSeries` frames and series ids defined.
    pub define_frames: usize,
    pub defined_ids: Vec<u32>,
    pub heartbeats: usize,
}

pub struct Pair {
    pub start: Instant,
    pub now: Instant,
    pub agent: AgentSession,
    pub collector: Option<CollectorSession>,
    pub certificate_host: String,
    pub collector_versions: (u16, u16),
    /// What the collector's `accept` passes.
    pub config: SessionConfig,

    // The collector's database.
    pub stored: Vec<u64>,
    pub db_cursor: u64,
    /// Delivered to the store, transaction not yet committed.
    pub pending: Vec<u64>,
    pub auto_commit: bool,

    // The agent's spool.
    pub spool: VecDeque<u64>,
    pub next_seq: u64,

    // The wire.
    to_collector: Vec<u8>,
    to_agent: Vec<u8>,
    collector_decoder: AgentFrameDecoder,
    agent_decoder: CollectorFrameDecoder,
    /// Messages the agent writes vanish (a broken path).
    pub drop_to_collector: bool,
    /// Messages the collector writes vanish.
    pub drop_to_agent: bool,

    // What happened.
    pub agent_events: Vec<(Instant, AgentEvent)>,
    pub collector_events: Vec<(Instant, CollectorEvent)>,
    pub connections: Vec<Connection>,
}

impl Default for Pair {
    fn default() -> Self {
        Self::new()
    }
}

impl Pair {
    pub fn new() -> Self {
        Self::with_hello(hello(HOST, PROTOCOL_MIN, PROTOCOL_MAX))
    }

    pub fn with_hello(hello: Hello) -> Self {
        let start = Instant::now();
        let mut agent = AgentSession::new(hello, start);
        for id in 1..=SERIES {
            agent.define_series(SeriesDef {
                id,
                metric: format!("razar_gpu_metric_{id}"),
                labels: vec![("gpu".into(), id.to_string())],
            });
        }
        Pair {
            start,
            now: start,
            agent,
            collector: None,
            certificate_host: HOST.to_owned(),
            collector_versions: (PROTOCOL_MIN, PROTOCOL_MAX),
            config: SessionConfig {
                heartbeat_interval_ms: 1_000,
                lost_after_missed: 3,
                max_unacked_batches: 4,
            },
            stored: Vec::new(),
            db_cursor: 0,
            pending: Vec::new(),
            auto_commit: true,
            spool: VecDeque::new(),
            next_seq: 1,
            to_collector: Vec::new(),
            to_agent: Vec::new(),
            collector_decoder: AgentFrameDecoder::new(),
            agent_decoder: CollectorFrameDecoder::new(),
            drop_to_collector: false,
            drop_to_agent: false,
            agent_events: Vec::new(),
            collector_events: Vec::new(),
            connections: Vec::new(),
        }
    }

    fn unix_ms(&self) -> UnixMillis {
        START_UNIX_MS + (self.now - self.start).as_millis() as i64
    }

    /// Opens a new connection: a fresh collector session, the agent's `connected`.
    pub fn connect(&mut self) {
        self.reset_wire();
        let collector = CollectorSession::new(self.certificate_host.clone(), self.now)
            .with_versions(self.collector_versions.0, self.collector_versions.1);
        self.collector = Some(collector);
        self.agent.connected(self.now);
        self.connections.push(Connection::default());
    }

    /// Drops the connection: bytes in flight are lost, the uncommitted transaction
    /// rolls back.
    pub fn disconnect(&mut self) {
        self.agent.disconnected();
        self.collector = None;
        self.pending.clear();
        self.reset_wire();
    }

    pub fn reconnect(&mut self) {
        self.disconnect();
        self.connect();
    }

    fn reset_wire(&mut self) {
        self.to_collector.clear();
        self.to_agent.clear();
        self.collector_decoder = AgentFrameDecoder::new();
        self.agent_decoder = CollectorFrameDecoder::new();
    }

    /// A new batch, durable in the spool, handed to the agent session.
    pub fn push_batches(&mut self, count: usize) {
        for _ in 0..count {
            let seq = self.next_seq;
            self.next_seq += 1;
            let series = (1..=SERIES)
                .filter(|id| !matches!((seq + u64::from(*id)) % 3, 0))
                .map(|series| SeriesPoints {
                    series,
                    points: vec![(0, seq as f64), (1_000, f64::from(series) + 0.5)],
                })
                .collect();
            let batch = Batch {
                seq,
                base_ts_ms: self.unix_ms(),
                series,
                events: Vec::new(),
            };
            self.spool.push_back(seq);
            self.agent
                .push_batch(batch)
                .expect("pair pushes seqs in order");
        }
    }

    /// Moves what both sessions want to send onto the wire, through the encoder.
    fn flush(&mut self) {
        while let Some(msg) = self.agent.poll_transmit() {
            if !self.drop_to_collector {
                encode_into(&msg, &mut self.to_collector).expect("agent message encodes");
            }
        }
        if let Some(collector) = &mut self.collector {
            while let Some(msg) = collector.poll_transmit() {
                if !self.drop_to_agent {
                    encode_into(&msg, &mut self.to_agent).expect("collector message encodes");
                }
            }
        }
    }

    /// Delivers up to `limit` bytes in each direction; returns whether any moved.
    fn deliver(&mut self, limit: usize) -> bool {
        let now = self.now;
        let n = limit.min(self.to_collector.len());
        let bytes: Vec<u8> = self.to_collector.drain(..n).collect();
        let mut input = &bytes[..];
        while let Some(msg) = self
            .collector_decoder
            .feed(&mut input)
            .expect("collector decodes the agent's frames")
        {
            if let Some(conn) = self.connections.last_mut() {
                match &msg {
                    AgentMessage::Batch(b) => conn.batches.push(b.seq),
                    AgentMessage::DefineSeries(defs) => {
                        conn.define_frames += 1;
                        conn.defined_ids.extend(defs.iter().map(|d| d.id));
                    }
                    AgentMessage::Heartbeat(_) => conn.heartbeats += 1,
                    _ => {}
                }
            }
            if let Some(collector) = &mut self.collector {
                collector.handle(msg, now);
            }
        }
        let m = limit.min(self.to_agent.len());
        let bytes: Vec<u8> = self.to_agent.drain(..m).collect();
        let mut input = &bytes[..];
        while let Some(msg) = self
            .agent_decoder
            .feed(&mut input)
            .expect("agent decodes the collector's frames")
        {
            self.agent.handle(msg, now);
        }
        n + m > 0
    }

    /// Plays both applications; returns whether there were any events.
    fn process_events(&mut self) -> bool {
        let mut any = false;
        while let Some(event) = self.agent.poll_event() {
            any = true;
            match &event {
                AgentEvent::Acked { upto } => self.spool.retain(|s| s > upto),
                AgentEvent::Established {
                    collector_acked_seq,
                    ..
                } => self.next_seq = self.next_seq.max(collector_acked_seq + 1),
                _ => {}
            }
            self.agent_events.push((self.now, event));
        }
        let now = self.now;
        let unix = self.unix_ms();
        if let Some(collector) = &mut self.collector {
            while let Some(event) = collector.poll_event() {
                any = true;
                match &event {
                    CollectorEvent::HelloReceived(_) => collector
                        .accept(self.db_cursor, self.config, now, unix)
                        .expect("accept after HelloReceived"),
                    CollectorEvent::Batch(b) => self.pending.push(b.seq),
                    _ => {}
                }
                self.collector_events.push((now, event));
            }
        }
        if self.auto_commit && !self.pending.is_empty() {
            self.commit();
        }
        any
    }

    /// Commits the pending batches with the cursor and tells the collector session.
    pub fn commit(&mut self) {
        let Some(collector) = &mut self.collector else {
            return;
        };
        if self.pending.is_empty() {
            return;
        }
        for seq in self.pending.drain(..) {
            self.stored.push(seq);
            self.db_cursor = self.db_cursor.max(seq);
        }
        collector
            .committed(self.db_cursor)
            .expect("commit of received batches");
    }

    /// One partial round: flush, move at most `limit` bytes each way, handle events.
    pub fn step(&mut self, limit: usize) {
        self.flush();
        self.deliver(limit);
        self.process_events();
    }

    /// Runs until nothing moves.
    pub fn drive(&mut self) {
        for _ in 0..100_000 {
            self.flush();
            let moved = self.deliver(usize::MAX);
            let happened = self.process_events();
            if !moved && !happened {
                return;
            }
        }
        panic!("the pair never went quiet");
    }

    fn next_timeout(&self) -> Option<Instant> {
        let a = self.agent.poll_timeout();
        let c = self.collector.as_ref().and_then(|c| c.poll_timeout());
        match (a, c) {
            (Some(a), Some(c)) => Some(a.min(c)),
            (a, c) => a.or(c),
        }
    }

    /// Moves the clock forward by `by`, firing every timer on the way and driving
    /// after each.
    pub fn advance(&mut self, by: Duration) {
        let target = self.now + by;
        self.drive();
        for _ in 0..1_000_000 {
            match self.next_timeout() {
                Some(t) if t <= target => {
                    self.now = self.now.max(t);
                    self.agent.handle_timeout(self.now);
                    if let Some(c) = &mut self.collector {
                        c.handle_timeout(self.now);
                    }
                    self.drive();
                }
                _ => {
                    self.now = target;
                    return;
                }
            }
        }
        panic!("timers kept firing without the clock reaching the target");
    }

    pub fn agent_established(&self) -> bool {
        matches!(self.agent.state(), AgentState::Established { .. })
    }

    pub fn collector_state(&self) -> Option<CollectorState> {
        self.collector.as_ref().map(|c| c.state())
    }

    /// Agent events matching `f`, with the time they were seen.
    pub fn agent_events_where(
        &self,
        f: impl Fn(&AgentEvent) -> bool,
    ) -> Vec<(Instant, AgentEvent)> {
        self.agent_events
            .iter()
            .filter(|(_, e)| f(e))
            .cloned()
            .collect()
    }

    pub fn collector_events_where(
        &self,
        f: impl Fn(&CollectorEvent) -> bool,
    ) -> Vec<(Instant, CollectorEvent)> {
        self.collector_events
            .iter()
            .filter(|(_, e)| f(e))
            .cloned()
            .collect()
    }
}
