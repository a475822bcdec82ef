//! Wire message types for both directions.
//!
//! Encoded with postcard, one message per length-prefixed frame. postcard is not
//! self-describing: **only ever append** enum variants and never reorder fields of a
//! released version; anything new goes in a new variant. No type here is recursive,
//! and nesting stays shallow (postcard/serde cap pre-allocation per collection).

use crate::domain::{ComponentState, LogStream, Severity, XidClass};
use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch (UTC).
pub type UnixMillis = i64;

/// Unique command id (a random 128-bit value, rendered as hex by the collector).
pub type CommandId = [u8; 16];

/// Everything an agent sends to the collector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AgentMessage {
    /// First message on every connection. Must stay variant 0 forever.
    Hello(Hello),
    /// Series definitions, sent once per connection before the first batch that uses them.
    DefineSeries(Vec<SeriesDef>),
    /// A telemetry batch with its per-agent sequence number.
    Batch(Batch),
    /// Liveness plus a small status digest.
    Heartbeat(Heartbeat),
    /// The outcome of a command.
    CommandResult(CommandResult),
    /// A piece of a component's log (answer to a log-tail command).
    LogChunk(LogChunk),
    /// The host's inventory changed since the `Hello` (protocol version 2 and later):
    /// the whole current list of components and GPUs.
    Inventory(Inventory),
}

/// Everything the collector sends to an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CollectorMessage {
    /// Accepts the `Hello`. Must stay variant 0 forever.
    Welcome(Welcome),
    /// Refuses the connection; the collector closes right after.
    Refusal(Refusal),
    /// Cumulative acknowledgement: every batch with `seq <= upto` is committed in PostgreSQL.
    Ack { upto: u64 },
    /// A command to execute.
    Command(Command),
    /// Answer to a heartbeat, carrying the collector's clock for skew estimation.
    HeartbeatAck { collector_time_ms: UnixMillis },
}

/// The agent introduces itself. The host id is a claim: the collector checks it
/// against the certificate and refuses a mismatch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_min: u16,
    pub protocol_max: u16,
    pub host_id: String,
    pub agent_version: String,
    pub profile: String,
    pub components: Vec<ComponentInfo>,
    pub gpus: Vec<GpuInfo>,
    /// Highest sequence number the agent saw acknowledged (0 = none).
    pub last_acked_seq: u64,
    /// Agent's clock when it sent the hello.
    pub agent_time_ms: UnixMillis,
}

/// A component as the agent has it configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentInfo {
    pub name: String,
    /// Revision label of the running spec (e.g. a version or a config hash).
    pub revision: String,
    pub state: ComponentState,
    pub critical: bool,
}

/// GPU inventory entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub pci_bus_id: String,
    pub memory_total_bytes: u64,
}

/// The collector accepts the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// Version chosen: the highest both sides speak.
    pub version: u16,
    pub collector_time_ms: UnixMillis,
    /// The collector's cursor for this host: every batch with `seq <= acked_seq` is
    /// already stored, so the agent may drop it from its spool without resending.
    pub acked_seq: u64,
    pub config: SessionConfig,
}

/// Timing the collector asks the agent to use on this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionConfig {
    pub heartbeat_interval_ms: u32,
    /// Missed heartbeats after which either side considers the peer lost.
    pub lost_after_missed: u32,
    /// Maximum batches in flight without an ack.
    pub max_unacked_batches: u32,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            heartbeat_interval_ms: 1_000,
            lost_after_missed: 3,
            max_unacked_batches: 64,
        }
    }
}

/// Why a connection was refused. Every reason has a stable code for metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusalReason {
    /// No protocol version in common.
    VersionUnsupported {
        collector_min: u16,
        collector_max: u16,
    },
    /// The host id in `Hello` differs from the one in the client certificate.
    HostIdMismatch {
        certificate: String,
        claimed: String,
    },
    /// The first message was not a `Hello`.
    ExpectedHello,
    /// The certificate was revoked after the connection was established.
    Revoked,
    /// Another connection for the same host replaced this one.
    Superseded,
    /// A frame could not be decoded or broke the protocol's rules.
    ProtocolViolation,
    /// The collector cannot serve right now (e.g. shutting down).
    Unavailable,
}

impl RefusalReason {
    /// Stable snake_case code, used as a metric label and in logs.
    pub fn code(&self) -> &'static str {
        match self {
            RefusalReason::VersionUnsupported { .. } => "version_unsupported",
            RefusalReason::HostIdMismatch { .. } => "host_id_mismatch",
            RefusalReason::ExpectedHello => "expected_hello",
            RefusalReason::Revoked => "revoked",
            RefusalReason::Superseded => "superseded",
            RefusalReason::ProtocolViolation => "protocol_violation",
            RefusalReason::Unavailable => "unavailable",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub reason: RefusalReason,
    pub message: String,
}

/// A metric series: name plus labels. Defined once per connection, then referenced by id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SeriesDef {
    /// Agent-assigned id, stable for the agent's lifetime (persisted with its spool).
    pub id: u32,
    pub metric: String,
    /// Label pairs, sorted by key.
    pub labels: Vec<(String, String)>,
}

/// One batch of telemetry. Self-contained apart from series ids.
///
/// Samples are grouped by series; each series carries timestamps as millisecond
/// offsets from `base_ts_ms` and its values, so a typical sample costs a varint
/// offset plus eight bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    /// Per-agent sequence number, strictly increasing, never reused.
    pub seq: u64,
    pub base_ts_ms: UnixMillis,
    pub series: Vec<SeriesPoints>,
    pub events: Vec<Event>,
}

impl Batch {
    /// Number of samples carried.
    pub fn sample_count(&self) -> usize {
        self.series.iter().map(|s| s.points.len()).sum()
    }
}

/// Points of one series within a batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeriesPoints {
    pub series: u32,
    /// (offset from the batch's `base_ts_ms` in ms, value).
    pub points: Vec<(u32, f64)>,
}

/// Something that happened on the host, with a reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub ts_ms: UnixMillis,
    pub severity: Severity,
    pub subject: Subject,
    pub kind: EventKind,
    /// Human-readable reason.
    pub message: String,
}

/// What an event is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Subject {
    Host,
    Component(String),
    Gpu(u32),
}

/// Typed event payloads. Append-only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum EventKind {
    /// A component changed state.
    StateChanged {
        from: ComponentState,
        to: ComponentState,
    },
    /// A process left over from a previous agent run was adopted (or stopped).
    ProcessAdopted { pid: u32, adopted: bool },
    /// A component's process exited.
    ProcessExited {
        pid: u32,
        code: Option<i32>,
        signal: Option<i32>,
    },
    /// A failure pulse finished.
    PulseResult {
        recovered_ms: Option<u64>,
        budget_ms: u64,
        passed: bool,
    },
    /// The agent's configuration was reloaded.
    ConfigReloaded { changed: Vec<String> },
    /// A quarantine was cleared by an operator.
    QuarantineResolved { note: String },
    /// An XID error on a GPU, classified.
    Xid { xid: u32, class: XidClass },
    /// A double-bit ECC error.
    EccDoubleBit,
    /// A GPU stopped answering (fell off the bus).
    GpuLost,
    /// A component used more VRAM than its budget.
    VramBudgetExceeded { used_bytes: u64, budget_bytes: u64 },
    /// VRAM in use that no process accounts for.
    GhostMemory { bytes: u64 },
    /// The spool dropped batches over its disk budget: seqs `first..=last` lost.
    SpoolGap {
        first_seq: u64,
        last_seq: u64,
        samples_lost: u64,
    },
    /// A component used more memory than its budget.
    MemoryBudgetExceeded { used_bytes: u64, budget_bytes: u64 },
    /// Anything else, with a stable code.
    Other { code: String },
    /// A GPU fault with what ran on the GPU when it was seen (version 3,
    /// [`PROTOCOL_ATTRIBUTION`](crate::protocol::PROTOCOL_ATTRIBUTION); an older collector
    /// gets [`GpuFault::legacy_kind`]: `Xid`, `EccDoubleBit` or `GpuLost`).
    GpuFault(Box<GpuFault>),
    /// A component's event with the revision it ran and the GPUs it used (version 3,
    /// [`PROTOCOL_ATTRIBUTION`](crate::protocol::PROTOCOL_ATTRIBUTION); an older collector
    /// gets the event alone, [`ComponentEvent::legacy_kind`]).
    ComponentEvent(Box<ComponentEvent>),
}

impl EventKind {
    /// This kind as a peer of protocol `version` knows it: attributed kinds of version 3
    /// become their version 1 form for an older peer (the attribution is left out).
    pub fn for_version(&self, version: u16) -> Option<EventKind> {
        match self {
            EventKind::GpuFault(fault) if version < crate::protocol::PROTOCOL_ATTRIBUTION => {
                Some(fault.legacy_kind())
            }
            EventKind::ComponentEvent(event) if version < crate::protocol::PROTOCOL_ATTRIBUTION => {
                Some(event.legacy_kind())
            }
            _ => None,
        }
    }
}

impl Batch {
    /// The batch as a peer of protocol `version` can decode it (see
    /// [`EventKind::for_version`]); unchanged for a current peer.
    pub fn for_version(mut self, version: u16) -> Batch {
        for event in &mut self.events {
            if let Some(kind) = event.kind.for_version(version) {
                event.kind = kind;
            }
        }
        self
    }
}

/// A GPU as a fault names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuRef {
    pub index: u32,
    pub uuid: String,
    /// NVML form: `00000000:3B:00.0`.
    pub pci_bus_id: String,
}

/// A compute process on the GPU when the fault was seen (NVML's running processes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultProcess {
    pub pid: u32,
    /// The process name (`/proc/<pid>/comm`), empty when it could not be read.
    pub name: String,
    /// GPU memory it used; `None` when NVML cannot tell.
    pub used_memory_bytes: Option<u64>,
}

/// A component running on the GPU when the fault was seen, with its revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentRevision {
    pub component: String,
    /// The revision's version label (`revision` in the config).
    pub version: String,
    /// sha256 (hex) of the component's spec as the agent runs it.
    pub spec_hash: String,
    /// The component's main pid then, if it ran.
    pub pid: Option<u32>,
}

/// What went wrong on the GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum GpuFaultKind {
    /// `count` XIDs `xid` (repeats coalesced) seen from `first_ms` to `last_ms`.
    Xid {
        xid: u32,
        class: XidClass,
        count: u64,
        first_ms: UnixMillis,
        last_ms: UnixMillis,
    },
    /// A double-bit ECC error.
    EccDoubleBit,
    /// The GPU fell off the bus.
    Lost,
}

/// A GPU fault with its attribution: the GPU, its processes and the components (with
/// their revisions) mapped to it at that moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuFault {
    pub fault: GpuFaultKind,
    pub gpu: GpuRef,
    pub processes: Vec<FaultProcess>,
    pub components: Vec<ComponentRevision>,
    /// Read from the kernel log as written before the agent started: the event's time is
    /// the line's own, and it is not a new fault.
    pub historical: bool,
}

impl GpuFault {
    /// The version 1 kind of this fault (no attribution).
    pub fn legacy_kind(&self) -> EventKind {
        match &self.fault {
            GpuFaultKind::Xid { xid, class, .. } => EventKind::Xid {
                xid: *xid,
                class: *class,
            },
            GpuFaultKind::EccDoubleBit => EventKind::EccDoubleBit,
            GpuFaultKind::Lost => EventKind::GpuLost,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub agent_time_ms: UnixMillis,
    pub digest: StatusDigest,
}

/// Small status summary carried by every heartbeat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusDigest {
    pub components_total: u32,
    pub components_ready: u32,
    pub components_quarantined: u32,
    pub gpus: u32,
    /// Batches in the spool not yet acknowledged.
    pub spool_batches: u64,
}

/// A typed command; the agent never runs a shell string from the network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub id: CommandId,
    /// After this instant the agent must not start executing it.
    pub deadline_ms: UnixMillis,
    pub action: CommandAction,
}

/// What a command asks for. Append-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandAction {
    Restart {
        component: String,
    },
    Stop {
        component: String,
    },
    Start {
        component: String,
    },
    Quarantine {
        component: String,
        note: String,
    },
    Resolve {
        component: String,
        note: String,
    },
    Pulse {
        component: String,
        budget_ms: u64,
    },
    Rollback {
        component: String,
        revision: String,
    },
    TailLogs {
        component: String,
        lines: u32,
        follow: bool,
    },
    /// Ends the log follow started by command `command` (a `TailLogs` with `follow`).
    CancelTail {
        command: CommandId,
    },
    /// Stops the components mapped to the GPU and keeps the GPU out of service on this
    /// host (no component mapped to it starts) until `SetGpuHealth { healthy: true }` or
    /// a successful `ResetGpu`'s probation ends. `gpu` is the GPU's UUID or its index.
    /// Version 3.
    DrainGpu {
        gpu: String,
        note: String,
    },
    /// Drains the GPU, then runs the host's configured reset action for it (e.g.
    /// `nvidia-smi --gpu-reset -i N`, from the agent's config, never from the network);
    /// succeeds when the reset action does. The GPU stays drained (probation is the
    /// collector's decision). Version 3.
    ResetGpu {
        gpu: String,
    },
    /// Operator override: `healthy` lifts a drain and starts the components mapped to
    /// the GPU again; not `healthy` drains it. Version 3.
    SetGpuHealth {
        gpu: String,
        healthy: bool,
        note: String,
    },
    /// Runs `revision` for `component`: overlaid on the file config and kept in the
    /// component's revision history, so `Rollback` can return to the previous one.
    /// Version 3.
    DeployRevision {
        component: String,
        revision: RevisionSpec,
    },
    /// Switches the agent to a profile of its config file. Version 3.
    SwitchProfile {
        profile: String,
    },
}

/// A component revision pushed by the collector: what replaces the file config's
/// `command`, `args`, `env` and `revision` of the component (everything else, probes,
/// GPUs, limits, stays as the file says).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevisionSpec {
    /// The version label (`revision` in the config), e.g. `v2`.
    pub version: String,
    pub command: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResult {
    pub id: CommandId,
    pub finished_ms: UnixMillis,
    pub outcome: CommandOutcome,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandOutcome {
    Succeeded,
    Failed,
    /// Deadline passed before it could run.
    Expired,
    /// Already executed earlier (redelivery); the original outcome stands: the result's
    /// `finished_ms` is the original's, its message is `"<outcome>: <original message>"`
    /// (`succeeded: …`, `failed: …`, `expired: …`).
    Duplicate,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogChunk {
    pub command: CommandId,
    pub component: String,
    pub stream: LogStream,
    pub lines: Vec<String>,
    /// Last chunk of a non-follow tail, or the follow ended.
    pub end: bool,
}

/// A host's components and GPUs as they are now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    pub components: Vec<ComponentInfo>,
    pub gpus: Vec<GpuInfo>,
}

/// What happened to a component (the component kinds of [`EventKind`], as an attributed
/// [`ComponentEvent`] carries them; a separate type so that no wire type is recursive).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ComponentEventKind {
    StateChanged {
        from: ComponentState,
        to: ComponentState,
    },
    ProcessAdopted {
        pid: u32,
        adopted: bool,
    },
    ProcessExited {
        pid: u32,
        code: Option<i32>,
        signal: Option<i32>,
    },
    PulseResult {
        recovered_ms: Option<u64>,
        budget_ms: u64,
        passed: bool,
    },
    QuarantineResolved {
        note: String,
    },
    VramBudgetExceeded {
        used_bytes: u64,
        budget_bytes: u64,
    },
    MemoryBudgetExceeded {
        used_bytes: u64,
        budget_bytes: u64,
    },
    Other {
        code: String,
    },
}

impl ComponentEventKind {
    /// The component kind of `kind`; `None` for a kind that is not about a component.
    pub fn from_kind(kind: &EventKind) -> Option<ComponentEventKind> {
        Some(match kind.clone() {
            EventKind::StateChanged { from, to } => ComponentEventKind::StateChanged { from, to },
            EventKind::ProcessAdopted { pid, adopted } => {
                ComponentEventKind::ProcessAdopted { pid, adopted }
            }
            EventKind::ProcessExited { pid, code, signal } => {
                ComponentEventKind::ProcessExited { pid, code, signal }
            }
            EventKind::PulseResult {
                recovered_ms,
                budget_ms,
                passed,
            } => ComponentEventKind::PulseResult {
                recovered_ms,
                budget_ms,
                passed,
            },
            EventKind::QuarantineResolved { note } => {
                ComponentEventKind::QuarantineResolved { note }
            }
            EventKind::VramBudgetExceeded {
                used_bytes,
                budget_bytes,
            } => ComponentEventKind::VramBudgetExceeded {
                used_bytes,
                budget_bytes,
            },
            EventKind::MemoryBudgetExceeded {
                used_bytes,
                budget_bytes,
            } => ComponentEventKind::MemoryBudgetExceeded {
                used_bytes,
                budget_bytes,
            },
            EventKind::Other { code } => ComponentEventKind::Other { code },
            _ => return None,
        })
    }

    /// The same event as an [`EventKind`] of version 1.
    pub fn to_kind(&self) -> EventKind {
        match self.clone() {
            ComponentEventKind::StateChanged { from, to } => EventKind::StateChanged { from, to },
            ComponentEventKind::ProcessAdopted { pid, adopted } => {
                EventKind::ProcessAdopted { pid, adopted }
            }
            ComponentEventKind::ProcessExited { pid, code, signal } => {
                EventKind::ProcessExited { pid, code, signal }
            }
            ComponentEventKind::PulseResult {
                recovered_ms,
                budget_ms,
                passed,
            } => EventKind::PulseResult {
                recovered_ms,
                budget_ms,
                passed,
            },
            ComponentEventKind::QuarantineResolved { note } => {
                EventKind::QuarantineResolved { note }
            }
            ComponentEventKind::VramBudgetExceeded {
                used_bytes,
                budget_bytes,
            } => EventKind::VramBudgetExceeded {
                used_bytes,
                budget_bytes,
            },
            ComponentEventKind::MemoryBudgetExceeded {
                used_bytes,
                budget_bytes,
            } => EventKind::MemoryBudgetExceeded {
                used_bytes,
                budget_bytes,
            },
            ComponentEventKind::Other { code } => EventKind::Other { code },
        }
    }
}

/// A component's event with the revision it ran (version label, spec hash, main pid)
/// and the GPUs its processes used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComponentEvent {
    pub event: ComponentEventKind,
    pub revision: ComponentRevision,
    pub gpus: Vec<GpuRef>,
}

impl ComponentEvent {
    /// The version 1 kind of this event (no revision, no GPUs).
    pub fn legacy_kind(&self) -> EventKind {
        self.event.to_kind()
    }
}
