//! Decision records: why the engine did what it did (stored as JSON by the collector).

use razar_shared::protocol::UnixMillis;
use serde::{Deserialize, Serialize};

use crate::action::Action;
use crate::input::EventId;

/// Every rule, with a stable id and a version bumped whenever its behaviour changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Rule {
    /// XIDs whose immediate bucket alone decides (reset, reboot, report, ignore).
    XidBucket,
    /// XID 13/31: repeated on one GPU or across revisions → hardware; else application.
    Xid13And31,
    /// XID 45: alone → restart the fabric manager; after another XID → that one's.
    Xid45,
    /// XID 48: alone → reset; with 63/64 → drain and reset.
    Xid48,
    /// XID 154: the recovery action from the message.
    Xid154,
    /// NVLink workflows → drain and reset.
    XidNvlink,
    /// Codes the catalog does not know or gives no bucket for → escalate.
    XidUnknown,
    /// The GPU recovery ladder: reset results, reboots, probation.
    GpuLadder,
    /// Operator override of a GPU's health.
    GpuOverride,
    /// A component failed (escalation when quarantined; feeds blame).
    ComponentFailed,
    /// Blaming a revision and rolling it back.
    Blame,
    /// A component started a new revision.
    RevisionStarted,
    HostLost,
    HostBack,
    /// Heartbeats without samples.
    SamplerStalled,
    PulseMissed,
    /// Breaker state changes and held actions re-evaluated.
    Breaker,
    /// Acknowledge, resolve and re-notify escalations.
    EscalationLifecycle,
}

impl Rule {
    /// Stable id, e.g. `xid.48`.
    pub fn id(self) -> &'static str {
        match self {
            Rule::XidBucket => "xid.bucket",
            Rule::Xid13And31 => "xid.13_31",
            Rule::Xid45 => "xid.45",
            Rule::Xid48 => "xid.48",
            Rule::Xid154 => "xid.154",
            Rule::XidNvlink => "xid.nvlink",
            Rule::XidUnknown => "xid.unknown",
            Rule::GpuLadder => "gpu.ladder",
            Rule::GpuOverride => "gpu.override",
            Rule::ComponentFailed => "component.failed",
            Rule::Blame => "blame.revision",
            Rule::RevisionStarted => "revision.started",
            Rule::HostLost => "silence.host_lost",
            Rule::HostBack => "silence.host_back",
            Rule::SamplerStalled => "silence.no_samples",
            Rule::PulseMissed => "silence.pulse_missed",
            Rule::Breaker => "breaker",
            Rule::EscalationLifecycle => "escalation.lifecycle",
        }
    }

    /// The rule's version (recorded with each decision).
    ///
    /// 2 (session 7): every rule that can climb the GPU ladder to a host reboot escalates
    /// that reboot to a person (`RebootRequested`), resolved when the host is back;
    /// `silence.no_samples` resolves its escalation when samples resume.
    pub fn version(self) -> u32 {
        match self {
            Rule::XidBucket
            | Rule::Xid13And31
            | Rule::Xid48
            | Rule::Xid154
            | Rule::XidNvlink
            | Rule::GpuLadder
            | Rule::Blame
            | Rule::HostBack
            | Rule::SamplerStalled => 2,
            _ => 1,
        }
    }
}

/// An alternative the rule considered and did not take, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    pub alternative: String,
    pub reason: String,
}

/// One breaker scope's state when the decision was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScopeState {
    pub scope: String,
    pub state: String,
    pub held: usize,
}

/// One decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// Sequence number within this view.
    pub id: u64,
    pub at: UnixMillis,
    pub rule: Rule,
    pub rule_id: String,
    pub rule_version: u32,
    /// [`razar_shared::xid_catalog::CATALOG_REVISION`].
    pub catalog_revision: String,
    /// Events that led to it.
    pub evidence: Vec<EventId>,
    /// What the rule saw, in words.
    pub facts: Vec<String>,
    pub rejected: Vec<Rejected>,
    /// What is to be done now.
    pub actions: Vec<Action>,
    /// What the breaker held back.
    pub held: Vec<Action>,
    /// Scopes not closed (empty when the breaker is closed everywhere).
    pub breaker: Vec<ScopeState>,
    /// The operator, for overrides and escalation changes.
    pub operator: Option<String>,
}
