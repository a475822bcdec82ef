//! What the engine asks the collector to do.

use razar_shared::domain::Severity;
use serde::{Deserialize, Serialize};

/// What an escalation is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum EscalationKind {
    HostLost,
    /// Heartbeats without samples.
    SamplerStalled,
    PulseMissed,
    /// A hardware-class GPU fault (quarantine, ladder).
    GpuFault,
    /// A GPU needs a person with a screwdriver.
    GpuInspection,
    /// An XID the catalog does not know (or gives no bucket for).
    XidUnknown,
    /// An XID whose catalog action is for a person (contact support, check cooling...).
    XidReport,
    /// XID 45 alone: restart the fabric manager.
    FabricManager,
    /// A component the agent gave up on (quarantined on its host).
    ComponentQuarantined,
    /// A revision blamed and rolled back.
    RevisionBlamed,
    /// The circuit breaker holds automatic actions back.
    BreakerOpen,
    /// The recovery ladder asks a person to reboot a host (no agent command does it).
    RebootRequested,
}

/// Escalations are deduplicated by this key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EscalationKey {
    /// `None` for fleet-wide subjects (a revision, a breaker scope).
    pub host: Option<String>,
    /// What it is about: a GPU uuid, a component, `component@revision`, a scope.
    pub subject: String,
    pub kind: EscalationKind,
}

impl EscalationKey {
    pub fn new(host: Option<&str>, subject: impl Into<String>, kind: EscalationKind) -> Self {
        EscalationKey {
            host: host.map(str::to_owned),
            subject: subject.into(),
            kind,
        }
    }
}

/// One thing to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Stop scheduling work on the GPU.
    QuarantineGpu {
        host: String,
        gpu: String,
    },
    /// Stop the components on a GPU (or the named ones).
    DrainComponents {
        host: String,
        gpu: Option<String>,
        components: Vec<String>,
    },
    /// Restart components (application-class XIDs).
    RestartComponents {
        host: String,
        components: Vec<String>,
    },
    ResetGpu {
        host: String,
        gpu: String,
    },
    RequestReboot {
        host: String,
    },
    RequireInspection {
        host: String,
        gpu: String,
    },
    ReturnGpuToService {
        host: String,
        gpu: String,
    },
    RollBack {
        host: String,
        component: String,
        to_revision: String,
    },
    PauseDeployment {
        component: String,
        revision: String,
    },
    Escalate {
        key: EscalationKey,
        severity: Severity,
        summary: String,
    },
    ResolveEscalation {
        key: EscalationKey,
    },
    /// Re-notify an escalation nobody acknowledged, at a higher level.
    Notify {
        key: EscalationKey,
        level: u32,
    },
}

impl Action {
    /// Whether the breaker may hold it back: actions that take working GPUs, hosts or
    /// components out of service. Recovery (returning a GPU, resolving), restarting a
    /// component whose GPU context is already dead (the catalog's RESTART_APP) and
    /// talking to people are never held back.
    pub fn is_disruptive(&self) -> bool {
        matches!(
            self,
            Action::QuarantineGpu { .. }
                | Action::DrainComponents { .. }
                | Action::ResetGpu { .. }
                | Action::RequestReboot { .. }
                | Action::RollBack { .. }
        )
    }

    /// The host it touches, if any.
    pub fn host(&self) -> Option<&str> {
        match self {
            Action::QuarantineGpu { host, .. }
            | Action::DrainComponents { host, .. }
            | Action::RestartComponents { host, .. }
            | Action::ResetGpu { host, .. }
            | Action::RequestReboot { host }
            | Action::RequireInspection { host, .. }
            | Action::ReturnGpuToService { host, .. }
            | Action::RollBack { host, .. } => Some(host),
            Action::PauseDeployment { .. }
            | Action::Escalate { .. }
            | Action::ResolveEscalation { .. }
            | Action::Notify { .. } => None,
        }
    }

    /// A one-line description (escalation summaries list held actions with it).
    pub fn describe(&self) -> String {
        match self {
            Action::QuarantineGpu { host, gpu } => format!("quarantine {host}/{gpu}"),
            Action::DrainComponents {
                host, components, ..
            } => format!("drain {host}/[{}]", components.join(",")),
            Action::RestartComponents { host, components } => {
                format!("restart {host}/[{}]", components.join(","))
            }
            Action::ResetGpu { host, gpu } => format!("reset {host}/{gpu}"),
            Action::RequestReboot { host } => format!("reboot {host}"),
            Action::RequireInspection { host, gpu } => format!("inspect {host}/{gpu}"),
            Action::ReturnGpuToService { host, gpu } => format!("return {host}/{gpu}"),
            Action::RollBack {
                host,
                component,
                to_revision,
            } => format!("roll back {host}/{component} to {to_revision}"),
            Action::PauseDeployment {
                component,
                revision,
            } => format!("pause deployment {component}@{revision}"),
            Action::Escalate { key, .. } => format!("escalate {key:?}"),
            Action::ResolveEscalation { key } => format!("resolve {key:?}"),
            Action::Notify { key, level } => format!("notify {key:?} level {level}"),
        }
    }
}
