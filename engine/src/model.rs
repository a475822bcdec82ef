//! The fleet as the engine sees it: hosts, their GPUs and components, open
//! escalations, recent history, the breaker, and the decisions not yet taken away.

use std::collections::{BTreeMap, BTreeSet};

use razar_shared::domain::Severity;
use razar_shared::protocol::UnixMillis;
use serde::{Deserialize, Serialize};

use crate::action::EscalationKey;
use crate::breaker::Breaker;
use crate::config::{ConfigError, EngineConfig};
use crate::decision::Decision;
use crate::input::{EventId, FailureKind};

/// Whether a host is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostState {
    Online,
    Lost { since: UnixMillis },
}

/// A rung of the GPU recovery ladder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Rung {
    /// Reset the GPU.
    Reset,
    /// Reboot the host.
    Reboot,
}

impl Rung {
    /// The rung above, `None` above the top (hardware inspection comes next).
    pub fn next(self) -> Option<Rung> {
        match self {
            Rung::Reset => Some(Rung::Reboot),
            Rung::Reboot => None,
        }
    }
}

/// A GPU's health in the engine's eyes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GpuHealth {
    Healthy,
    /// Out of service; recovery is at `rung`.
    Quarantined {
        rung: Rung,
        since: UnixMillis,
    },
    /// Recovered at `rung`; returns to service at `until` unless it faults first.
    Probation {
        rung: Rung,
        until: UnixMillis,
    },
    /// Out of service until a person has looked at it (a lemon, or an operator's call).
    Inspection {
        since: UnixMillis,
    },
}

/// One GPU of a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gpu {
    pub index: u32,
    pub model: String,
    pub health: GpuHealth,
    /// Quarantine cycles since an operator last cleared it.
    pub cycles: u32,
}

impl Gpu {
    pub fn new(index: u32, model: impl Into<String>) -> Self {
        Gpu {
            index,
            model: model.into(),
            health: GpuHealth::Healthy,
            cycles: 0,
        }
    }
}

/// One supervised component of a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Component {
    pub revision: String,
    /// The revision it ran before `revision` (what a rollback returns to).
    pub previous_revision: Option<String>,
    /// When `revision` started on this host.
    pub revision_since: UnixMillis,
    /// UUIDs of the GPUs it uses.
    pub gpus: Vec<String>,
}

/// One host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    pub state: HostState,
    /// The host's profile: the role label its agent reports (`inference`, `training`
    /// …); the breaker limits automation per profile too. Empty when not known.
    #[serde(default)]
    pub profile: String,
    /// By GPU UUID.
    pub gpus: BTreeMap<String, Gpu>,
    /// By component name.
    pub components: BTreeMap<String, Component>,
}

impl Host {
    pub fn new() -> Self {
        Host {
            state: HostState::Online,
            profile: String::new(),
            gpus: BTreeMap::new(),
            components: BTreeMap::new(),
        }
    }

    /// Names of the components that use `gpu`.
    pub fn components_on(&self, gpu: &str) -> Vec<String> {
        self.components
            .iter()
            .filter(|(_, c)| c.gpus.iter().any(|g| g == gpu))
            .map(|(name, _)| name.clone())
            .collect()
    }
}

impl Default for Host {
    fn default() -> Self {
        Host::new()
    }
}

/// Lifecycle of an escalation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EscalationState {
    Open,
    Acknowledged,
    Resolved,
}

/// An escalation to a person, deduplicated by its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Escalation {
    pub key: EscalationKey,
    pub state: EscalationState,
    pub severity: Severity,
    pub summary: String,
    pub opened: UnixMillis,
    pub last_seen: UnixMillis,
    /// How many times it was raised while open or acknowledged.
    pub occurrences: u32,
    /// Notification level (0 at opening, +1 per re-notification).
    pub level: u32,
    pub last_notified: UnixMillis,
}

/// An XID as remembered for the workflows that look back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct XidRecord {
    pub host: String,
    pub gpu: String,
    pub xid: u32,
    /// (component, revision) on that GPU when it happened.
    pub revisions: Vec<(String, String)>,
    pub at: UnixMillis,
    pub event: EventId,
}

/// What failed, for comparing failures across hosts and revisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Signature {
    /// An application-class XID on a GPU the component uses.
    Xid(u32),
    /// The component itself failed.
    Component(FailureKind),
}

/// A failure remembered for blame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureRecord {
    pub host: String,
    pub component: String,
    pub revision: String,
    pub signature: Signature,
    /// The GPU it was seen on, for XIDs.
    pub gpu: Option<String>,
    pub at: UnixMillis,
    pub event: EventId,
}

impl FailureRecord {
    /// Where it was seen: the GPU for XIDs, else the host (blame counts distinct places).
    pub fn place(&self) -> String {
        match &self.gpu {
            Some(g) => format!("gpu {g}"),
            None => format!("host {}", self.host),
        }
    }
}

/// The engine's whole state. Build it with [`FleetView::new`] and the `add_*` helpers
/// (or from the store), feed it to [`decide`](crate::decide), take the decisions away
/// with [`FleetView::take_decisions`].
#[derive(Debug, Clone)]
pub struct FleetView {
    pub config: EngineConfig,
    pub hosts: BTreeMap<String, Host>,
    pub escalations: BTreeMap<EscalationKey, Escalation>,
    pub xids: Vec<XidRecord>,
    pub failures: Vec<FailureRecord>,
    /// (component, revision) already blamed: blamed once, not again.
    pub blamed: BTreeSet<(String, String)>,
    pub breaker: Breaker,
    pub decisions: Vec<Decision>,
    pub next_decision: u64,
}

impl FleetView {
    /// An empty fleet under `config`, refused when the configuration is invalid
    /// ([`EngineConfig::validate`]).
    pub fn new(config: EngineConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(FleetView {
            config,
            hosts: BTreeMap::new(),
            escalations: BTreeMap::new(),
            xids: Vec::new(),
            failures: Vec::new(),
            blamed: BTreeSet::new(),
            breaker: Breaker::default(),
            decisions: Vec::new(),
            next_decision: 1,
        })
    }

    /// Adds (or replaces) a host, online, with no GPUs or components.
    pub fn add_host(&mut self, host: &str) -> &mut Host {
        self.hosts.entry(host.to_owned()).or_default()
    }

    /// Adds a GPU to a host (creating the host).
    pub fn add_gpu(&mut self, host: &str, uuid: &str, index: u32, model: &str) {
        self.add_host(host)
            .gpus
            .insert(uuid.to_owned(), Gpu::new(index, model));
    }

    /// Adds a component running `revision` since `since` on `gpus` (creating the host).
    pub fn add_component(
        &mut self,
        host: &str,
        name: &str,
        revision: &str,
        previous: Option<&str>,
        since: UnixMillis,
        gpus: &[&str],
    ) {
        self.add_host(host).components.insert(
            name.to_owned(),
            Component {
                revision: revision.to_owned(),
                previous_revision: previous.map(str::to_owned),
                revision_since: since,
                gpus: gpus.iter().map(|g| (*g).to_owned()).collect(),
            },
        );
    }

    pub fn gpu(&self, host: &str, gpu: &str) -> Option<&Gpu> {
        self.hosts.get(host)?.gpus.get(gpu)
    }

    pub fn gpu_mut(&mut self, host: &str, gpu: &str) -> Option<&mut Gpu> {
        self.hosts.get_mut(host)?.gpus.get_mut(gpu)
    }

    /// The decisions made since the last call, oldest first.
    pub fn take_decisions(&mut self) -> Vec<Decision> {
        std::mem::take(&mut self.decisions)
    }

    /// A GPU's display name: `host/GPU index` (uuid when unknown).
    pub fn gpu_name(&self, host: &str, gpu: &str) -> String {
        match self.gpu(host, gpu) {
            Some(g) => format!("{host}/GPU {}", g.index),
            None => format!("{host}/{gpu}"),
        }
    }

    /// Forgets history older than every window.
    pub(crate) fn prune(&mut self, now: UnixMillis) {
        let keep = self
            .config
            .xid_window_ms
            .max(self.config.blame_window_ms)
            .max(self.config.breaker.window_ms);
        let from = now.saturating_sub(keep);
        self.xids.retain(|x| x.at >= from);
        self.failures.retain(|f| f.at >= from);
    }
}
