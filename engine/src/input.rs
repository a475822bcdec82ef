//! What the engine is told. The collector turns committed events, command results,
//! operator requests and its tick into these; nothing else reaches the rules.

use serde::{Deserialize, Serialize};

use crate::action::EscalationKey;

/// The store's id of the event an input came from (recorded as evidence).
pub type EventId = i64;

/// How a component failed, as the agent's supervisor saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum FailureKind {
    /// It keeps exiting soon after each start.
    CrashLoop,
    /// Its liveness probe fails.
    Liveness,
    /// The supervisor gave up restarting it (the component is quarantined on the host).
    GaveUp,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::CrashLoop => "crash_loop",
            FailureKind::Liveness => "liveness",
            FailureKind::GaveUp => "gave_up",
        }
    }
}

/// One input to [`decide`](crate::decide).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Input {
    /// An XID on a GPU, with the revisions of the components on that GPU at that moment
    /// and the driver's message (XID 154 carries its recovery action there).
    XidObserved {
        host: String,
        gpu: String,
        xid: u32,
        revisions: Vec<(String, String)>,
        message: Option<String>,
        event: EventId,
    },
    /// A component failed.
    ComponentFailed {
        host: String,
        component: String,
        revision: String,
        kind: FailureKind,
        event: EventId,
    },
    /// A component started a new revision on a host (its previous one is remembered).
    RevisionStarted {
        host: String,
        component: String,
        revision: String,
        gpus: Vec<String>,
        event: EventId,
    },
    /// The host's session ended and did not come back in time.
    HostLost { host: String, event: EventId },
    /// The host is connected again.
    HostBack { host: String, event: EventId },
    /// Heartbeats arrive but no samples: the sampler is stalled.
    HeartbeatsWithoutSamples { host: String, event: EventId },
    /// Samples arrive again after [`Input::HeartbeatsWithoutSamples`].
    SamplesResumed { host: String, event: EventId },
    /// A failure pulse did not recover within its budget.
    PulseMissed {
        host: String,
        component: String,
        event: EventId,
    },
    /// The result of a [`ResetGpu`](crate::Action::ResetGpu) command.
    GpuResetDone {
        host: String,
        gpu: String,
        ok: bool,
        event: EventId,
    },
    /// An operator declares a GPU healthy (back to service) or unhealthy (held out).
    OperatorOverride {
        host: String,
        gpu: String,
        healthy: bool,
        note: String,
        who: String,
        event: EventId,
    },
    /// An operator acknowledged an escalation.
    EscalationAcknowledged {
        key: EscalationKey,
        who: String,
        event: EventId,
    },
    /// An operator resolved an escalation.
    EscalationResolved {
        key: EscalationKey,
        who: String,
        event: EventId,
    },
    /// Time passed (probation ends, breaker cool-downs, re-notification).
    Tick,
}

impl Input {
    /// The event it came from, if any.
    pub fn event(&self) -> Option<EventId> {
        match self {
            Input::XidObserved { event, .. }
            | Input::ComponentFailed { event, .. }
            | Input::RevisionStarted { event, .. }
            | Input::HostLost { event, .. }
            | Input::HostBack { event, .. }
            | Input::HeartbeatsWithoutSamples { event, .. }
            | Input::SamplesResumed { event, .. }
            | Input::PulseMissed { event, .. }
            | Input::GpuResetDone { event, .. }
            | Input::OperatorOverride { event, .. }
            | Input::EscalationAcknowledged { event, .. }
            | Input::EscalationResolved { event, .. } => Some(*event),
            Input::Tick => None,
        }
    }
}
