//! The collector drives the pure decision engine (`razar-engine`): one collector at a
//! time, fed from committed events by a durable cursor, carrying out what it decides.
//!
//! - **Leadership.** A collector that wants to decide takes the PostgreSQL advisory lock
//!   [`EngineSettings::lock_key`] on a dedicated connection (not the pool) and, having it,
//!   increments `engine_state.term`. Every decision transaction locks the
//!   `engine_state` row and checks the term is still its own (fencing): a collector
//!   that lost its lock connection, or was overtaken, writes nothing. The others poll
//!   the lock and take over when the leader's connection closes (it died).
//! - **Cursor.** `events.event_id` commits out of order (a bigserial taken by concurrent
//!   ingest transactions), so the engine reads by transaction instead: every event
//!   carries the `xid8` of the transaction that inserted it (`events.xact`), and one
//!   step reads every event of the transactions in `[horizon, xmin)` where `xmin` is the
//!   oldest transaction still running (`pg_snapshot_xmin(pg_current_snapshot())`):
//!   those are settled and visible, and none can appear later below `xmin`. The new
//!   horizon is written in the transaction that stores the decisions it produced, with
//!   the engine's state (the snapshot), so a restart or a new leader re-reads exactly
//!   what was not decided.
//! - **Actions.** Actions that reach outside the store are written to `engine_actions`
//!   with their decision (an outbox) and carried out after the commit; a command's
//!   idempotency key is `engine-action-<id>` (caller `engine`), so carrying one out again
//!   after a crash never sends it twice. Escalations, GPU health and webhook
//!   notifications are projections written in the decision transaction itself.
//! - **Operator inputs** (acknowledge/resolve an escalation, set a GPU healthy or
//!   unhealthy) are events too, written by [`EngineHandle`] from any collector: they
//!   reach the leader through the same cursor.

use crate::dispatch::{hex_id, CommandRequest, Dispatch, DispatchError};
use crate::notify::{self, NotifySettings};
use crate::store::audit::AuditEntry;
use crate::supervise::Beat;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use prometheus::{Gauge, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use razar_engine::breaker::Breaker;
use razar_engine::model::{Escalation, EscalationState, FailureRecord, XidRecord};
use razar_engine::{
    Action, Decision, EngineConfig, EscalationKey, EscalationKind, FailureKind, FleetView,
    GpuHealth, Host, HostState, Input,
};
use razar_shared::domain::Severity;
use razar_shared::protocol::CommandAction;
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgConnectOptions, PgListener};
use sqlx::{Connection, PgConnection, PgPool, Postgres, Row, Transaction};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The caller name of the engine's commands.
pub const CALLER: &str = "engine";

/// `[engine]`: the decision loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineSettings {
    /// Whether this collector takes part (decides when it is the leader).
    pub enabled: bool,
    /// How often a step runs (and a follower polls the lock).
    pub tick: Duration,
    /// The advisory lock all collectors of one database compete for.
    pub lock_key: i64,
    /// The deadline given to the engine's commands.
    pub command_deadline: Duration,
    /// Health is degraded while the oldest undecided event is older than this.
    pub max_lag: Duration,
    /// Most events one step decides (whole transactions: a bigger one is taken alone).
    pub batch_events: u32,
    /// The rules' tunables.
    pub rules: EngineConfig,
}

impl Default for EngineSettings {
    fn default() -> EngineSettings {
        EngineSettings {
            enabled: true,
            tick: Duration::from_secs(1),
            lock_key: crate::store::locks::ENGINE_LEADER,
            command_deadline: Duration::from_secs(600),
            max_lag: Duration::from_secs(60),
            batch_events: 5_000,
            rules: EngineConfig::default(),
        }
    }
}

/// Why a step failed (the supervisor restarts the loop; leadership is given up).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("engine state: {0}")]
    State(String),
    #[error("engine configuration: {0}")]
    Config(#[from] razar_engine::ConfigError),
    #[error("dispatch: {0}")]
    Dispatch(#[from] DispatchError),
}

/// What the engine calls when it blames a revision: pause that revision's deployment.
/// The deployments module implements it (`crate::deployments::pause_for_blame`); the
/// default only logs.
pub trait DeploymentHooks: Send + Sync + 'static {
    fn pause_for_blame<'a>(
        &'a self,
        component: &'a str,
        revision: &'a str,
        decision_id: i64,
    ) -> BoxFuture<'a, Result<(), String>>;
}

/// The default [`DeploymentHooks`]: logs the pause it would make.
#[derive(Debug, Default, Clone, Copy)]
pub struct LogDeploymentHooks;

impl DeploymentHooks for LogDeploymentHooks {
    fn pause_for_blame<'a>(
        &'a self,
        component: &'a str,
        revision: &'a str,
        decision_id: i64,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            tracing::warn!(
                component,
                revision,
                decision_id,
                "revision blamed: its deployment should pause (no deployment driver wired)"
            );
            Ok(())
        })
    }
}

/// The engine's metrics.
#[derive(Clone)]
pub struct EngineMetrics {
    /// `razar_collector_decisions_total{rule}`
    pub decisions: IntCounterVec,
    /// `razar_collector_escalations_open{severity}` (open or acknowledged)
    pub escalations_open: IntGaugeVec,
    /// `razar_collector_engine_lag_seconds`
    pub lag_seconds: Gauge,
    /// `razar_collector_engine_term`
    pub term: IntGauge,
    /// `razar_collector_engine_is_leader`
    pub is_leader: IntGauge,
    /// `razar_collector_engine_actions_total{kind, outcome}`
    pub actions: IntCounterVec,
    /// `razar_collector_engine_events_total`
    pub events: prometheus::IntCounter,
    /// `razar_collector_engine_wakeups_total`
    pub wakeups: prometheus::IntCounter,
}

impl EngineMetrics {
    pub fn new(registry: &Registry) -> Result<EngineMetrics, prometheus::Error> {
        let m = EngineMetrics {
            decisions: IntCounterVec::new(
                Opts::new(
                    "razar_collector_decisions_total",
                    "Decisions stored by this collector's engine, by rule id.",
                ),
                &["rule"],
            )?,
            escalations_open: IntGaugeVec::new(
                Opts::new(
                    "razar_collector_escalations_open",
                    "Escalations open or acknowledged (not resolved), by severity (set by the leader).",
                ),
                &["severity"],
            )?,
            lag_seconds: Gauge::new(
                "razar_collector_engine_lag_seconds",
                "Age of the oldest event the engine has not decided yet (0 when none; leader only).",
            )?,
            term: IntGauge::new(
                "razar_collector_engine_term",
                "The engine leadership term this collector holds (0 when not the leader).",
            )?,
            is_leader: IntGauge::new(
                "razar_collector_engine_is_leader",
                "1 while this collector's engine is the leader.",
            )?,
            actions: IntCounterVec::new(
                Opts::new(
                    "razar_collector_engine_actions_total",
                    "Engine actions carried out (commands, deployment pauses), by kind and \
                     outcome (done, failed, skipped).",
                ),
                &["kind", "outcome"],
            )?,
            events: prometheus::IntCounter::new(
                "razar_collector_engine_events_total",
                "Stored events the engine read from the cursor.",
            )?,
            wakeups: prometheus::IntCounter::new(
                "razar_collector_engine_wakeups_total",
                "Steps the leader took because events were committed (not on its tick).",
            )?,
        };
        registry.register(Box::new(m.decisions.clone()))?;
        registry.register(Box::new(m.escalations_open.clone()))?;
        registry.register(Box::new(m.lag_seconds.clone()))?;
        registry.register(Box::new(m.term.clone()))?;
        registry.register(Box::new(m.is_leader.clone()))?;
        registry.register(Box::new(m.actions.clone()))?;
        registry.register(Box::new(m.events.clone()))?;
        registry.register(Box::new(m.wakeups.clone()))?;
        Ok(m)
    }
}

/// Everything the loop needs.
#[derive(Clone)]
pub struct EngineLoop {
    pub pool: PgPool,
    /// For the dedicated lock connection.
    pub connect: PgConnectOptions,
    pub dispatch: Dispatch,
    pub settings: EngineSettings,
    pub notify: NotifySettings,
    pub hooks: Arc<dyn DeploymentHooks>,
    pub metrics: EngineMetrics,
    /// Who leads, as stored in `engine_state.leader`.
    pub name: String,
    /// Whether the circuit breaker holds automation (a scope open or half-open): the
    /// leader sets it after each step from its view, a follower from the stored
    /// snapshot at each tick. Scheduled pulses read it ([`crate::pulses::PauseHook`]).
    pub automation_paused: Arc<AtomicBool>,
}

/// The engine's state stored with the horizon (everything of the [`FleetView`] but its
/// configuration and the decisions already taken away).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Snapshot {
    hosts: BTreeMap<String, Host>,
    escalations: Vec<Escalation>,
    xids: Vec<XidRecord>,
    failures: Vec<FailureRecord>,
    blamed: BTreeSet<(String, String)>,
    breaker: Breaker,
    next_decision: u64,
}

impl Snapshot {
    fn of(view: &FleetView) -> Snapshot {
        Snapshot {
            hosts: view.hosts.clone(),
            escalations: view.escalations.values().cloned().collect(),
            xids: view.xids.clone(),
            failures: view.failures.clone(),
            blamed: view.blamed.clone(),
            breaker: view.breaker.clone(),
            next_decision: view.next_decision,
        }
    }

    fn into_view(self, config: EngineConfig) -> Result<FleetView, EngineError> {
        let mut view = FleetView::new(config)?;
        view.hosts = self.hosts;
        view.escalations = self
            .escalations
            .into_iter()
            .map(|e| (e.key.clone(), e))
            .collect();
        view.xids = self.xids;
        view.failures = self.failures;
        view.blamed = self.blamed;
        view.breaker = self.breaker;
        view.next_decision = self.next_decision.max(1);
        Ok(view)
    }
}

/// What the outbox carries out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Planned {
    Command(CommandAction),
    PauseDeployment {
        component: String,
        revision: String,
    },
    /// No command exists for it yet (host reboot, hardware inspection): escalated only.
    Unsupported {
        what: String,
    },
}

/// The outbox entries an engine action becomes (host, kind, what).
pub fn plan(action: &Action) -> Vec<(Option<String>, &'static str, Planned)> {
    let cmd = |host: &str, a: CommandAction| {
        let kind = crate::dispatch::kind(&a);
        (Some(host.to_owned()), kind, Planned::Command(a))
    };
    match action {
        Action::QuarantineGpu { host, gpu }
        | Action::DrainComponents {
            host,
            gpu: Some(gpu),
            ..
        } => vec![cmd(
            host,
            CommandAction::DrainGpu {
                gpu: gpu.clone(),
                note: format!("razar engine: {}", action.describe()),
            },
        )],
        Action::DrainComponents {
            host,
            gpu: None,
            components,
        } => components
            .iter()
            .map(|c| {
                cmd(
                    host,
                    CommandAction::Stop {
                        component: c.clone(),
                    },
                )
            })
            .collect(),
        Action::RestartComponents { host, components } => components
            .iter()
            .map(|c| {
                cmd(
                    host,
                    CommandAction::Restart {
                        component: c.clone(),
                    },
                )
            })
            .collect(),
        Action::ResetGpu { host, gpu } => {
            vec![cmd(host, CommandAction::ResetGpu { gpu: gpu.clone() })]
        }
        Action::ReturnGpuToService { host, gpu } => vec![cmd(
            host,
            CommandAction::SetGpuHealth {
                gpu: gpu.clone(),
                healthy: true,
                note: "razar engine: probation passed".to_owned(),
            },
        )],
        Action::RollBack {
            host,
            component,
            to_revision,
        } => vec![cmd(
            host,
            CommandAction::Rollback {
                component: component.clone(),
                revision: to_revision.clone(),
            },
        )],
        Action::PauseDeployment {
            component,
            revision,
        } => vec![(
            None,
            "pause_deployment",
            Planned::PauseDeployment {
                component: component.clone(),
                revision: revision.clone(),
            },
        )],
        Action::RequestReboot { host } => vec![(
            Some(host.clone()),
            "reboot",
            Planned::Unsupported {
                what: action.describe(),
            },
        )],
        Action::RequireInspection { host, .. } => vec![(
            Some(host.clone()),
            "inspection",
            Planned::Unsupported {
                what: action.describe(),
            },
        )],
        Action::Escalate { .. } | Action::ResolveEscalation { .. } | Action::Notify { .. } => {
            Vec::new()
        }
    }
}

/// The outbox entries of one decision: a quarantine and a drain of the same GPU are one
/// `DrainGpu`.
fn plan_decision(actions: &[Action]) -> Vec<(Option<String>, &'static str, Planned)> {
    let mut out: Vec<(Option<String>, &'static str, Planned)> = Vec::new();
    for action in actions {
        for entry in plan(action) {
            let duplicate = out.iter().any(|(h, k, p)| {
                h == &entry.0
                    && *k == entry.1
                    && match (p, &entry.2) {
                        (
                            Planned::Command(CommandAction::DrainGpu { gpu: a, .. }),
                            Planned::Command(CommandAction::DrainGpu { gpu: b, .. }),
                        ) => a == b,
                        (a, b) => a == b,
                    }
            });
            if !duplicate {
                out.push(entry);
            }
        }
    }
    out
}

/// Stable text of an escalation kind (`GpuFault`...), as stored.
pub fn kind_str(kind: EscalationKind) -> String {
    match serde_json::to_value(kind) {
        Ok(serde_json::Value::String(s)) => s,
        _ => format!("{kind:?}"),
    }
}

/// The kind stored as text, parsed back.
pub fn parse_kind(s: &str) -> Option<EscalationKind> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).ok()
}

fn state_str(s: EscalationState) -> &'static str {
    match s {
        EscalationState::Open => "open",
        EscalationState::Acknowledged => "acknowledged",
        EscalationState::Resolved => "resolved",
    }
}

fn millis(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// One stored event as the engine reads it.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub id: i64,
    pub host: String,
    pub subject_kind: String,
    pub subject_id: Option<String>,
    pub kind: String,
    pub payload: serde_json::Value,
    pub message: String,
    /// The GPU of an attributed GPU event (issue 15: protocol version 3).
    pub gpu_uuid: Option<String>,
    /// Read from the kernel log as written before the agent started: not a new fault.
    pub historical: bool,
    /// The revision a component event's component ran (attributed events).
    pub component_revision: Option<String>,
    /// The GPUs a component event's component used (attributed events).
    pub gpu_uuids: Option<Vec<String>>,
    /// A fault's components mapped to its GPU then, with their revisions
    /// (`fault_components`), sorted.
    pub fault_components: Vec<(String, String)>,
}

/// Who did what to an escalation, kept for the projection.
#[derive(Debug, Clone)]
struct OperatorNote {
    who: String,
    note: Option<String>,
}

/// Learns the component→GPU mapping from an attributed event (issue 15): a fault's
/// components ran on its GPU; a component event names the GPUs its processes used. The
/// store's inventory has no such mapping, so without this the engine could neither drain
/// a faulty GPU's components nor tie a later failure to a GPU. Pure.
pub fn learn(view: &mut FleetView, e: &StoredEvent) {
    if e.subject_kind == "gpu" && !e.fault_components.is_empty() {
        let Some(gpu) = e.gpu_uuid.clone().or_else(|| {
            let index = e.subject_id.as_deref()?.parse::<u32>().ok()?;
            view.hosts
                .get(&e.host)?
                .gpus
                .iter()
                .find(|(_, g)| g.index == index)
                .map(|(u, _)| u.clone())
        }) else {
            return;
        };
        let Some(h) = view.hosts.get_mut(&e.host) else {
            return;
        };
        for (name, _) in &e.fault_components {
            if let Some(c) = h.components.get_mut(name) {
                if !c.gpus.contains(&gpu) {
                    c.gpus.push(gpu.clone());
                }
            }
        }
    } else if e.subject_kind == "component" {
        let (Some(name), Some(gpus)) = (&e.subject_id, &e.gpu_uuids) else {
            return;
        };
        if gpus.is_empty() {
            return;
        }
        if let Some(c) = view
            .hosts
            .get_mut(&e.host)
            .and_then(|h| h.components.get_mut(name))
        {
            c.gpus.clone_from(gpus);
        }
    }
}

/// Turns a stored event into the engine's input (pure: the view only resolves GPU
/// indexes to UUIDs and components to their revisions). `None`: not the engine's
/// business.
pub fn translate(view: &FleetView, e: &StoredEvent) -> Option<Input> {
    let host = e.host.clone();
    let gpu_uuid = |view: &FleetView| -> Option<String> {
        if let Some(uuid) = &e.gpu_uuid {
            return Some(uuid.clone());
        }
        let sid = e.subject_id.as_deref()?;
        let h = view.hosts.get(&e.host);
        let by_index = sid.parse::<u32>().ok().and_then(|i| {
            h?.gpus
                .iter()
                .find(|(_, g)| g.index == i)
                .map(|(u, _)| u.clone())
        });
        Some(by_index.unwrap_or_else(|| sid.to_owned()))
    };
    let revisions_on = |view: &FleetView, gpu: &str| -> Vec<(String, String)> {
        view.hosts
            .get(&e.host)
            .map(|h| {
                h.components
                    .iter()
                    .filter(|(_, c)| c.gpus.iter().any(|g| g == gpu))
                    .map(|(n, c)| (n.clone(), c.revision.clone()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let xid = |view: &FleetView, code: u32| -> Option<Input> {
        // A fault from before the agent started is history, not a new fault.
        if e.subject_kind != "gpu" || e.historical {
            return None;
        }
        let gpu = gpu_uuid(view)?;
        // What ran on the GPU when the fault was seen (attributed faults); the view's
        // mapping now only for unattributed ones (older agents).
        let revisions = if e.fault_components.is_empty() {
            revisions_on(view, &gpu)
        } else {
            e.fault_components.clone()
        };
        Some(Input::XidObserved {
            revisions,
            host: host.clone(),
            gpu,
            xid: code,
            message: Some(e.message.clone()),
            event: e.id,
        })
    };
    let field = |name: &str| e.payload.get(name);
    match e.kind.as_str() {
        "xid" => {
            let code = e.payload.get("Xid")?.get("xid")?.as_u64()?;
            xid(view, u32::try_from(code).ok()?)
        }
        // A double-bit ECC error is what XID 48 reports; a GPU off the bus, XID 79.
        "ecc_double_bit" => xid(view, 48),
        "gpu_lost" => xid(view, 79),
        "state_changed" => {
            let change = e.payload.get("StateChanged")?;
            let from = change.get("from")?.as_str()?;
            let to = change.get("to")?.as_str()?;
            let kind = match (from, to) {
                (_, "Quarantined") => FailureKind::GaveUp,
                (_, "Unhealthy") => FailureKind::Liveness,
                // Exited before it was ever ready: a crash at start.
                ("Starting", "Backoff") => FailureKind::CrashLoop,
                _ => return None,
            };
            let component = e.subject_id.clone()?;
            // The revision it ran when it failed (attributed events), else the view's.
            let revision = e.component_revision.clone().unwrap_or_else(|| {
                view.hosts
                    .get(&e.host)
                    .and_then(|h| h.components.get(&component))
                    .map(|c| c.revision.clone())
                    .unwrap_or_default()
            });
            Some(Input::ComponentFailed {
                host,
                component,
                revision,
                kind,
                event: e.id,
            })
        }
        "pulse_result" => {
            let r = e.payload.get("PulseResult")?;
            if r.get("passed")?.as_bool()? {
                return None;
            }
            Some(Input::PulseMissed {
                host,
                component: e.subject_id.clone()?,
                event: e.id,
            })
        }
        "host_lost" => Some(Input::HostLost { host, event: e.id }),
        "host_back" => Some(Input::HostBack { host, event: e.id }),
        "heartbeats_without_samples" => Some(Input::HeartbeatsWithoutSamples { host, event: e.id }),
        "samples_resumed" => Some(Input::SamplesResumed { host, event: e.id }),
        "gpu_reset_result" => Some(Input::GpuResetDone {
            host,
            gpu: field("gpu")?.as_str()?.to_owned(),
            ok: field("ok")?.as_bool()?,
            event: e.id,
        }),
        "gpu_override" => Some(Input::OperatorOverride {
            host,
            gpu: field("gpu")?.as_str()?.to_owned(),
            healthy: field("healthy")?.as_bool()?,
            note: field("note")?.as_str()?.to_owned(),
            who: field("who")?.as_str()?.to_owned(),
            event: e.id,
        }),
        "escalation_ack" | "escalation_resolve" => {
            let host = field("host")?.as_str().map(str::to_owned);
            let key = EscalationKey {
                host,
                subject: field("subject")?.as_str()?.to_owned(),
                kind: parse_kind(field("kind")?.as_str()?)?,
            };
            let who = field("who")?.as_str()?.to_owned();
            Some(if e.kind == "escalation_ack" {
                Input::EscalationAcknowledged {
                    key,
                    who,
                    event: e.id,
                }
            } else {
                Input::EscalationResolved {
                    key,
                    who,
                    event: e.id,
                }
            })
        }
        _ => None,
    }
}

/// An escalation as last written, to write only what changed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Projected {
    state: EscalationState,
    severity: Severity,
    summary: String,
    level: u32,
    occurrences: u32,
}

impl Projected {
    fn of(e: &Escalation) -> Projected {
        Projected {
            state: e.state,
            severity: e.severity,
            summary: e.summary.clone(),
            level: e.level,
            occurrences: e.occurrences,
        }
    }
}

/// The leader's state between steps (dropped on any error: rebuilt from the store).
struct Leader {
    term: i64,
    view: FleetView,
    escalations: BTreeMap<EscalationKey, Projected>,
    gpus: BTreeMap<(String, String), GpuHealth>,
}

/// What a step found.
enum Stepped {
    Done { lag: Duration },
    Deposed,
}

const XID8: &str = "::text::xid8";

/// The channel migration 0008's trigger notifies when events are inserted.
const EVENTS_CHANNEL: &str = "razar_events";
/// Shortest time from one step's start to the next when woken by events.
const MIN_STEP: Duration = Duration::from_millis(20);

/// The next notification; never, while there is no listener. A failed listener is
/// dropped (the tick paces the loop until the next leadership).
async fn next_notification(listener: &mut Option<PgListener>) {
    let Some(l) = listener.as_mut() else {
        return std::future::pending().await;
    };
    if let Err(e) = l.recv().await {
        tracing::warn!(error = %e, "engine: event notifications lost; stepping on the tick");
        *listener = None;
        std::future::pending::<()>().await;
    }
}

impl EngineLoop {
    /// The loop: follower until it holds the lock, then leader until it loses it or
    /// `stop`. An error ends it (the supervisor restarts it; the lock goes with the
    /// connection).
    pub async fn run(self, beat: Beat, mut stop: watch::Receiver<bool>) -> Result<(), EngineError> {
        loop {
            self.metrics.is_leader.set(0);
            self.metrics.term.set(0);
            let mut conn = PgConnection::connect_with(&self.connect).await?;
            loop {
                let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                    .bind(self.settings.lock_key)
                    .fetch_one(&mut conn)
                    .await?;
                if got {
                    break;
                }
                self.follow_breaker().await?;
                beat.ok();
                tokio::select! {
                    _ = tokio::time::sleep(self.settings.tick) => {}
                    _ = stop.wait_for(|s| *s) => return Ok(()),
                }
            }
            let mut leader = self.take_lead().await?;
            let mut listener = self.listen().await;
            self.publish_breaker(&leader.view.breaker);
            tracing::info!(term = leader.term, leader = %self.name, "engine leader");
            self.metrics.is_leader.set(1);
            self.metrics.term.set(leader.term);
            loop {
                if *stop.borrow() {
                    let _ = conn.close().await;
                    return Ok(());
                }
                // The lock lives as long as this connection.
                sqlx::query("SELECT 1").execute(&mut conn).await?;
                let started = tokio::time::Instant::now();
                let stepped = self.step(&mut leader).await?;
                self.publish_breaker(&leader.view.breaker);
                match stepped {
                    Stepped::Done { lag } => {
                        if lag <= self.settings.max_lag {
                            beat.ok();
                        }
                    }
                    Stepped::Deposed => {
                        tracing::warn!(term = leader.term, "engine deposed: another leader's term");
                        break;
                    }
                }
                // The next step: when events commit (the `razar_events` notification),
                // at the latest after a tick; never sooner than MIN_STEP after this one
                // started, so a stream of small commits is decided in batches.
                let woken = tokio::select! {
                    _ = tokio::time::sleep(self.settings.tick) => false,
                    _ = stop.wait_for(|s| *s) => false,
                    () = next_notification(&mut listener) => true,
                };
                if woken {
                    self.metrics.wakeups.inc();
                    tokio::time::sleep_until(started + MIN_STEP).await;
                }
            }
            let _ = conn.close().await;
        }
    }

    /// Listens for committed events; `None` (the tick alone paces the loop) when the
    /// listening connection cannot be had.
    async fn listen(&self) -> Option<PgListener> {
        let mut listener = match PgListener::connect_with(&self.pool).await {
            Ok(listener) => listener,
            Err(e) => {
                tracing::warn!(error = %e, "engine: cannot listen for events; stepping on the tick");
                return None;
            }
        };
        match listener.listen(EVENTS_CHANNEL).await {
            Ok(()) => Some(listener),
            Err(e) => {
                tracing::warn!(error = %e, "engine: cannot listen for events; stepping on the tick");
                None
            }
        }
    }

    /// Tells the pulse scheduler whether the breaker holds automation.
    fn publish_breaker(&self, breaker: &Breaker) {
        self.automation_paused
            .store(!breaker.is_closed(), Ordering::Relaxed);
    }

    /// A follower: the breaker as the leader last stored it.
    async fn follow_breaker(&self) -> Result<(), EngineError> {
        let stored: Option<serde_json::Value> =
            sqlx::query_scalar("SELECT snapshot -> 'breaker' FROM engine_state WHERE id = 1")
                .fetch_optional(&self.pool)
                .await?
                .flatten();
        let breaker = match stored.map(serde_json::from_value::<Breaker>) {
            Some(Ok(b)) => b,
            // No snapshot yet: nothing was ever held.
            None => Breaker::default(),
            Some(Err(e)) => {
                return Err(EngineError::State(format!(
                    "stored breaker does not decode: {e}"
                )))
            }
        };
        self.publish_breaker(&breaker);
        Ok(())
    }

    /// Increments the term and restores the engine's state.
    async fn take_lead(&self) -> Result<Leader, EngineError> {
        let (term, snapshot): (i64, Option<serde_json::Value>) = sqlx::query_as(
            "UPDATE engine_state SET term = term + 1, leader = $1, leader_since = now(), updated_at = now()
             WHERE id = 1 RETURNING term, snapshot",
        )
        .bind(&self.name)
        .fetch_one(&self.pool)
        .await?;
        let snapshot: Snapshot = match snapshot {
            Some(v) => serde_json::from_value(v)
                .map_err(|e| EngineError::State(format!("snapshot does not decode: {e}")))?,
            None => Snapshot::default(),
        };
        Ok(Leader {
            term,
            view: snapshot.into_view(self.settings.rules.clone())?,
            escalations: BTreeMap::new(),
            gpus: BTreeMap::new(),
        })
    }

    async fn step(&self, leader: &mut Leader) -> Result<Stepped, EngineError> {
        let revisions = self.sync_inventory(&mut leader.view).await?;
        self.feed_reset_results().await?;
        let now = Utc::now().timestamp_millis();
        let mut tx = self.pool.begin().await?;
        // First, with no transaction id of our own: every transaction below it is over.
        let xmin: i64 =
            sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
                .fetch_one(&mut *tx)
                .await?;
        let (term, horizon): (i64, i64) = sqlx::query_as(
            "SELECT term, horizon::text::bigint FROM engine_state WHERE id = 1 FOR UPDATE",
        )
        .fetch_one(&mut *tx)
        .await?;
        if term != leader.term {
            return Ok(Stepped::Deposed);
        }
        let upto = self.batch_end(&mut tx, horizon, xmin).await?;
        let events = read_events(&mut tx, horizon, upto).await?;
        self.metrics
            .events
            .inc_by(u64::try_from(events.len()).unwrap_or(0));
        let mut notes: BTreeMap<EscalationKey, OperatorNote> = BTreeMap::new();
        let view = &mut leader.view;
        for input in revisions {
            razar_engine::decide(view, &input, now);
        }
        for e in &events {
            learn(view, e);
            let Some(input) = translate(view, e) else {
                continue;
            };
            if let Input::EscalationAcknowledged { key, who, .. }
            | Input::EscalationResolved { key, who, .. } = &input
            {
                notes.insert(
                    key.clone(),
                    OperatorNote {
                        who: who.clone(),
                        note: e
                            .payload
                            .get("note")
                            .and_then(|n| n.as_str())
                            .map(str::to_owned),
                    },
                );
            }
            razar_engine::decide(view, &input, now);
        }
        razar_engine::decide(view, &Input::Tick, now);
        let decisions = view.take_decisions();
        let mut last_decision: BTreeMap<EscalationKey, i64> = BTreeMap::new();
        let mut notifications: Vec<(EscalationKey, &'static str, u32)> = Vec::new();
        for d in &decisions {
            let id = insert_decision(&mut tx, d, leader.term).await?;
            self.metrics
                .decisions
                .with_label_values(&[&d.rule_id])
                .inc();
            for (host, kind, planned) in plan_decision(&d.actions) {
                let state = match planned {
                    Planned::Unsupported { .. } => "skipped",
                    _ => "pending",
                };
                let action = serde_json::to_value(&planned)
                    .map_err(|e| EngineError::State(format!("action does not encode: {e}")))?;
                sqlx::query(
                    "INSERT INTO engine_actions (decision_id, term, kind, host_id, action, state, error, created_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, now())",
                )
                .bind(id)
                .bind(leader.term)
                .bind(kind)
                .bind(host)
                .bind(action)
                .bind(state)
                .bind((state == "skipped").then_some("no command for it yet: escalated only"))
                .execute(&mut *tx)
                .await?;
                if state == "skipped" {
                    self.metrics
                        .actions
                        .with_label_values(&[kind, "skipped"])
                        .inc();
                }
            }
            for a in &d.actions {
                match a {
                    Action::Escalate { key, .. } => {
                        last_decision.insert(key.clone(), id);
                        notifications.push((key.clone(), "opened", 0));
                    }
                    Action::ResolveEscalation { key } => {
                        last_decision.insert(key.clone(), id);
                        notifications.push((key.clone(), "resolved", 0));
                    }
                    Action::Notify { key, level } => {
                        last_decision.insert(key.clone(), id);
                        notifications.push((key.clone(), "renotify", *level));
                    }
                    _ => {}
                }
            }
            // Operator changes of escalations carry no action: tie them by their input.
            if let Some(who) = &d.operator {
                for (key, n) in &notes {
                    if &n.who == who {
                        last_decision.entry(key.clone()).or_insert(id);
                    }
                }
            }
        }
        // Escalations: write what changed.
        let mut written: BTreeMap<EscalationKey, i64> = BTreeMap::new();
        let mut resolved = Vec::new();
        let mut projected = Vec::new();
        for (key, e) in &view.escalations {
            let p = Projected::of(e);
            if leader.escalations.get(key) == Some(&p) {
                continue;
            }
            let id = upsert_escalation(&mut tx, e, notes.get(key), last_decision.get(key).copied())
                .await?;
            written.insert(key.clone(), id);
            if e.state == EscalationState::Resolved {
                resolved.push(key.clone());
            } else {
                projected.push((key.clone(), p));
            }
        }
        for (key, reason, level) in notifications {
            let (Some(id), Some(e)) = (written.get(&key), view.escalations.get(&key)) else {
                continue;
            };
            let level = if reason == "renotify" { level } else { e.level };
            notify::enqueue(&mut tx, &self.notify, *id, e, reason, level).await?;
        }
        // GPU health.
        let mut gpus_written = Vec::new();
        for (host, h) in &view.hosts {
            for (uuid, g) in &h.gpus {
                let k = (host.clone(), uuid.clone());
                if leader.gpus.get(&k) == Some(&g.health) {
                    continue;
                }
                upsert_gpu(&mut tx, host, uuid, g).await?;
                gpus_written.push((k, g.health));
            }
        }
        for key in &resolved {
            view.escalations.remove(key);
        }
        // Nothing read, decided or projected: the stored snapshot still holds (what
        // changed without a decision, pruned history or newly seen inventory, is derived
        // again after a restore), so an idle engine does not rewrite it every tick.
        let idle = events.is_empty()
            && decisions.is_empty()
            && upto == horizon
            && written.is_empty()
            && gpus_written.is_empty();
        if idle {
            tx.rollback().await?;
        } else {
            self.commit_step(tx, view, upto).await?;
        }
        for key in resolved {
            leader.escalations.remove(&key);
        }
        leader.escalations.extend(projected);
        leader.gpus.extend(gpus_written);
        self.carry_out().await?;
        let lag = self.lag(upto).await?;
        self.metrics.lag_seconds.set(lag.as_secs_f64());
        self.count_open().await?;
        Ok(Stepped::Done { lag })
    }

    /// Writes the snapshot and the new horizon, and commits the step.
    async fn commit_step(
        &self,
        mut tx: Transaction<'static, Postgres>,
        view: &FleetView,
        upto: i64,
    ) -> Result<(), EngineError> {
        let snapshot = serde_json::to_value(Snapshot::of(view))
            .map_err(|e| EngineError::State(format!("snapshot does not encode: {e}")))?;
        sqlx::query(&format!(
            "UPDATE engine_state SET horizon = $1::bigint{XID8}, snapshot = $2, updated_at = now() WHERE id = 1"
        ))
        .bind(upto)
        .bind(snapshot)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Where this step's batch ends: `xmin`, or sooner when more than
    /// [`EngineSettings::batch_events`] events wait (whole transactions).
    async fn batch_end(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        horizon: i64,
        xmin: i64,
    ) -> Result<i64, EngineError> {
        if xmin <= horizon {
            return Ok(horizon);
        }
        let cut: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT xact::text::bigint FROM events
             WHERE xact >= $1::bigint{XID8} AND xact < $2::bigint{XID8}
             ORDER BY xact OFFSET $3 LIMIT 1"
        ))
        .bind(horizon)
        .bind(xmin)
        .bind(i64::from(self.settings.batch_events))
        .fetch_optional(&mut **tx)
        .await?;
        Ok(match cut {
            Some(x) if x > horizon => x,
            Some(_) => horizon.saturating_add(1),
            None => xmin,
        })
    }

    /// Hosts, GPUs and components from the store into the view; a component whose
    /// revision changed becomes a `RevisionStarted` input.
    async fn sync_inventory(&self, view: &mut FleetView) -> Result<Vec<Input>, EngineError> {
        let hosts: Vec<(String, String, Option<DateTime<Utc>>, String)> =
            sqlx::query_as("SELECT host_id, state, lost_since, profile FROM hosts")
                .fetch_all(&self.pool)
                .await?;
        for (host, state, since, profile) in hosts {
            let new = !view.hosts.contains_key(&host);
            let h = view.add_host(&host);
            if h.profile != profile {
                h.profile = profile;
            }
            if new && state == "lost" {
                h.state = HostState::Lost {
                    since: since.map(|s| s.timestamp_millis()).unwrap_or_default(),
                };
            }
        }
        let gpus: Vec<(String, i32, String, String)> =
            sqlx::query_as("SELECT host_id, gpu_index, uuid, name FROM gpus")
                .fetch_all(&self.pool)
                .await?;
        for (host, index, uuid, name) in gpus {
            let Ok(index) = u32::try_from(index) else {
                continue;
            };
            match view.gpu_mut(&host, &uuid) {
                Some(g) => {
                    g.index = index;
                    g.model = name;
                }
                None => view.add_gpu(&host, &uuid, index, &name),
            }
        }
        let components: Vec<(String, String, String)> =
            sqlx::query_as("SELECT host_id, name, revision FROM components")
                .fetch_all(&self.pool)
                .await?;
        let now = Utc::now().timestamp_millis();
        let mut inputs = Vec::new();
        for (host, name, revision) in components {
            let known = view
                .hosts
                .get(&host)
                .and_then(|h| h.components.get(&name))
                .map(|c| (c.revision.clone(), c.gpus.clone()));
            match known {
                None => view.add_component(&host, &name, &revision, None, now, &[]),
                Some((r, gpus)) if r != revision => inputs.push(Input::RevisionStarted {
                    host,
                    component: name,
                    revision,
                    gpus,
                    event: 0,
                }),
                Some(_) => {}
            }
        }
        Ok(inputs)
    }

    /// Results of the engine's GPU resets become `gpu_reset_result` events (read back
    /// through the cursor like any other).
    async fn feed_reset_results(&self) -> Result<(), EngineError> {
        let rows = sqlx::query(
            "SELECT a.action_id, a.host_id, a.action, c.state, c.message, c.gpu
             FROM engine_actions a JOIN commands c ON c.command_id = a.command_id
             WHERE a.kind = 'reset_gpu' AND a.state = 'done' AND NOT a.result_fed
               AND c.state IN ('succeeded', 'failed', 'expired')
             ORDER BY a.action_id LIMIT 100",
        )
        .fetch_all(&self.pool)
        .await?;
        if rows.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for row in rows {
            let action_id: i64 = row.try_get("action_id")?;
            let host: Option<String> = row.try_get("host_id")?;
            let planned: serde_json::Value = row.try_get("action")?;
            let state: String = row.try_get("state")?;
            let message: Option<String> = row.try_get("message")?;
            let gpu = match serde_json::from_value::<Planned>(planned) {
                Ok(Planned::Command(CommandAction::ResetGpu { gpu })) => Some(gpu),
                _ => None,
            };
            if let (Some(host), Some(gpu)) = (host, gpu) {
                let ok = state == "succeeded";
                sqlx::query(
                    "INSERT INTO events (host_id, ts, severity, subject_kind, subject_id, kind, payload, message)
                     VALUES ($1, now(), $2, 'gpu', $3, 'gpu_reset_result', $4, $5)",
                )
                .bind(&host)
                .bind(if ok { "info" } else { "warning" })
                .bind(&gpu)
                .bind(serde_json::json!({ "gpu": gpu, "ok": ok, "action_id": action_id }))
                .bind(format!(
                    "GPU reset {state}: {}",
                    message.as_deref().unwrap_or("")
                ))
                .execute(&mut *tx)
                .await?;
            }
            sqlx::query("UPDATE engine_actions SET result_fed = true WHERE action_id = $1")
                .bind(action_id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Carries out pending outbox entries, oldest first.
    async fn carry_out(&self) -> Result<(), EngineError> {
        let rows: Vec<(i64, i64, String, Option<String>, serde_json::Value)> = sqlx::query_as(
            "SELECT action_id, decision_id, kind, host_id, action FROM engine_actions
             WHERE state = 'pending' ORDER BY action_id LIMIT 500",
        )
        .fetch_all(&self.pool)
        .await?;
        for (id, decision, kind, host, planned) in rows {
            let planned: Result<Planned, _> = serde_json::from_value(planned);
            let outcome: Result<Option<Vec<u8>>, String> = match (planned, host) {
                (Ok(Planned::Command(action)), Some(host)) => {
                    let deadline = Utc::now()
                        + chrono::Duration::from_std(self.settings.command_deadline)
                            .unwrap_or_else(|_| chrono::Duration::minutes(10));
                    let request = CommandRequest {
                        host,
                        action,
                        deadline,
                        caller: CALLER.to_owned(),
                        idempotency_key: Some(format!("engine-action-{id}")),
                        request_id: Some(format!("decision-{decision}")),
                    };
                    match self.dispatch.submit(request).await {
                        Ok(record) => Ok(Some(record.id.to_vec())),
                        // Transient: stays pending, tried again next step.
                        Err(DispatchError::Db(e)) => return Err(EngineError::Db(e)),
                        Err(e) => Err(e.to_string()),
                    }
                }
                (
                    Ok(Planned::PauseDeployment {
                        component,
                        revision,
                    }),
                    _,
                ) => self
                    .hooks
                    .pause_for_blame(&component, &revision, decision)
                    .await
                    .map(|()| None),
                (Ok(other), _) => Err(format!("cannot carry out {other:?}")),
                (Err(e), _) => Err(format!("stored action does not decode: {e}")),
            };
            let (state, command, error) = match outcome {
                Ok(command) => ("done", command, None),
                Err(error) => ("failed", None, Some(error)),
            };
            if let Some(c) = &command {
                tracing::info!(action = id, decision, kind, command = %hex_id(c), "engine command submitted");
            }
            if let Some(e) = &error {
                tracing::warn!(action = id, decision, kind, error = %e, "engine action failed");
            }
            self.metrics
                .actions
                .with_label_values(&[&kind, state])
                .inc();
            sqlx::query(
                "UPDATE engine_actions SET state = $2, command_id = $3, error = $4, done_at = now()
                 WHERE action_id = $1",
            )
            .bind(id)
            .bind(state)
            .bind(command)
            .bind(error)
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }

    /// Age of the oldest event at or past `horizon` (visible ones).
    async fn lag(&self, horizon: i64) -> Result<Duration, EngineError> {
        let oldest: Option<DateTime<Utc>> = sqlx::query_scalar(&format!(
            "SELECT min(ts) FROM events WHERE xact >= $1::bigint{XID8}"
        ))
        .bind(horizon)
        .fetch_one(&self.pool)
        .await?;
        Ok(oldest
            .and_then(|t| (Utc::now() - t).to_std().ok())
            .unwrap_or_default())
    }

    async fn count_open(&self) -> Result<(), EngineError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT severity, count(*) FROM escalations WHERE state <> 'resolved' GROUP BY severity",
        )
        .fetch_all(&self.pool)
        .await?;
        for s in [Severity::Info, Severity::Warning, Severity::Critical] {
            let n = rows
                .iter()
                .find(|(name, _)| name == s.as_str())
                .map_or(0, |(_, n)| *n);
            self.metrics
                .escalations_open
                .with_label_values(&[s.as_str()])
                .set(n);
        }
        Ok(())
    }
}

async fn read_events(
    tx: &mut Transaction<'static, Postgres>,
    from: i64,
    to: i64,
) -> Result<Vec<StoredEvent>, EngineError> {
    if to <= from {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(&format!(
        "SELECT e.event_id, e.host_id, e.subject_kind, e.subject_id, e.kind, e.payload, e.message,
                e.gpu_uuid, e.historical, e.component_revision, e.gpu_uuids,
                coalesce((SELECT jsonb_agg(jsonb_build_array(f.component, f.revision)
                                           ORDER BY f.component)
                          FROM fault_components f WHERE f.event_id = e.event_id),
                         '[]'::jsonb) AS fault_components
         FROM events e
         WHERE e.xact >= $1::bigint{XID8} AND e.xact < $2::bigint{XID8} ORDER BY e.event_id"
    ))
    .bind(from)
    .bind(to)
    .fetch_all(&mut **tx)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(StoredEvent {
                id: r.try_get("event_id")?,
                host: r.try_get("host_id")?,
                subject_kind: r.try_get("subject_kind")?,
                subject_id: r.try_get("subject_id")?,
                kind: r.try_get("kind")?,
                payload: r.try_get("payload")?,
                message: r.try_get("message")?,
                gpu_uuid: r.try_get("gpu_uuid")?,
                historical: r.try_get("historical")?,
                component_revision: r.try_get("component_revision")?,
                gpu_uuids: r.try_get("gpu_uuids")?,
                fault_components: serde_json::from_value(r.try_get("fault_components")?)
                    .unwrap_or_default(),
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(EngineError::from)
}

async fn insert_decision(
    tx: &mut Transaction<'static, Postgres>,
    d: &Decision,
    term: i64,
) -> Result<i64, EngineError> {
    let json = |v: serde_json::Result<serde_json::Value>| {
        v.map_err(|e| EngineError::State(format!("decision does not encode: {e}")))
    };
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO decisions (seq, term, rule, rule_version, catalog_revision, evidence,
             rejected, actions, held, breaker, operator, decided_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING decision_id",
    )
    .bind(i64::try_from(d.id).unwrap_or(i64::MAX))
    .bind(term)
    .bind(&d.rule_id)
    .bind(i32::try_from(d.rule_version).unwrap_or(i32::MAX))
    .bind(&d.catalog_revision)
    .bind(serde_json::json!({ "events": d.evidence, "facts": d.facts }))
    .bind(json(serde_json::to_value(&d.rejected))?)
    .bind(json(serde_json::to_value(&d.actions))?)
    .bind(json(serde_json::to_value(&d.held))?)
    .bind(json(serde_json::to_value(&d.breaker))?)
    .bind(&d.operator)
    .bind(millis(d.at))
    .fetch_one(&mut **tx)
    .await?;
    Ok(id)
}

async fn upsert_escalation(
    tx: &mut Transaction<'static, Postgres>,
    e: &Escalation,
    note: Option<&OperatorNote>,
    decision: Option<i64>,
) -> Result<i64, EngineError> {
    let host = e.key.host.clone().unwrap_or_default();
    let kind = kind_str(e.key.kind);
    let state = state_str(e.state);
    let who = note.map(|n| n.who.clone());
    let text = note.and_then(|n| n.note.clone());
    let updated: Option<i64> = sqlx::query_scalar(
        "UPDATE escalations SET state = $4, severity = $5, summary = $6, level = $7,
             occurrences = $8, last_seen = $9, updated_at = now(),
             decision_id = COALESCE($10, decision_id),
             acknowledged_at = CASE WHEN $4 = 'acknowledged' AND acknowledged_at IS NULL
                                    THEN now() ELSE acknowledged_at END,
             acknowledged_by = CASE WHEN $4 = 'acknowledged' AND acknowledged_by IS NULL
                                    THEN $11 ELSE acknowledged_by END,
             resolved_at = CASE WHEN $4 = 'resolved' THEN now() ELSE NULL END,
             resolved_by = CASE WHEN $4 = 'resolved' THEN COALESCE($11, 'engine') ELSE NULL END,
             note = COALESCE($12, note)
         WHERE host_id = $1 AND subject = $2 AND kind = $3 AND state <> 'resolved'
         RETURNING escalation_id",
    )
    .bind(&host)
    .bind(&e.key.subject)
    .bind(&kind)
    .bind(state)
    .bind(e.severity.as_str())
    .bind(&e.summary)
    .bind(i32::try_from(e.level).unwrap_or(i32::MAX))
    .bind(i32::try_from(e.occurrences).unwrap_or(i32::MAX))
    .bind(millis(e.last_seen))
    .bind(decision)
    .bind(&who)
    .bind(&text)
    .fetch_optional(&mut **tx)
    .await?;
    if let Some(id) = updated {
        return Ok(id);
    }
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO escalations (host_id, subject, kind, state, severity, summary, level,
             occurrences, opened_at, last_seen, decision_id, updated_at,
             acknowledged_at, acknowledged_by, resolved_at, resolved_by, note)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, now(),
             CASE WHEN $4 = 'acknowledged' THEN now() END,
             CASE WHEN $4 = 'acknowledged' THEN $12 END,
             CASE WHEN $4 = 'resolved' THEN now() END,
             CASE WHEN $4 = 'resolved' THEN COALESCE($12, 'engine') END,
             $13)
         RETURNING escalation_id",
    )
    .bind(&host)
    .bind(&e.key.subject)
    .bind(&kind)
    .bind(state)
    .bind(e.severity.as_str())
    .bind(&e.summary)
    .bind(i32::try_from(e.level).unwrap_or(i32::MAX))
    .bind(i32::try_from(e.occurrences).unwrap_or(i32::MAX))
    .bind(millis(e.opened))
    .bind(millis(e.last_seen))
    .bind(decision)
    .bind(&who)
    .bind(&text)
    .fetch_one(&mut **tx)
    .await?;
    Ok(id)
}

async fn upsert_gpu(
    tx: &mut Transaction<'static, Postgres>,
    host: &str,
    uuid: &str,
    g: &razar_engine::Gpu,
) -> Result<(), EngineError> {
    let rung = |r: razar_engine::Rung| match r {
        razar_engine::Rung::Reset => "reset",
        razar_engine::Rung::Reboot => "reboot",
    };
    let (state, rung, since, until) = match g.health {
        GpuHealth::Healthy => ("healthy", None, None, None),
        GpuHealth::Quarantined { rung: r, since } => {
            ("quarantined", Some(rung(r)), Some(millis(since)), None)
        }
        GpuHealth::Probation { rung: r, until } => {
            ("probation", Some(rung(r)), None, Some(millis(until)))
        }
        GpuHealth::Inspection { since } => ("inspection", None, Some(millis(since)), None),
    };
    sqlx::query(
        "INSERT INTO gpu_health (host_id, gpu_uuid, gpu_index, state, rung, since, until, cycles, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now())
         ON CONFLICT (host_id, gpu_uuid) DO UPDATE SET gpu_index = EXCLUDED.gpu_index,
             state = EXCLUDED.state, rung = EXCLUDED.rung, since = EXCLUDED.since,
             until = EXCLUDED.until, cycles = EXCLUDED.cycles, updated_at = now()",
    )
    .bind(host)
    .bind(uuid)
    .bind(i32::try_from(g.index).unwrap_or(i32::MAX))
    .bind(state)
    .bind(rung)
    .bind(since)
    .bind(until)
    .bind(i32::try_from(g.cycles).unwrap_or(i32::MAX))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

// ------------------------------------------------------------------ the API's handle

/// Why an operator request was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandleError {
    #[error("no escalation {0}")]
    UnknownEscalation(i64),
    #[error("escalation {0} is already resolved")]
    AlreadyResolved(i64),
    #[error("escalation {0} is already acknowledged")]
    AlreadyAcknowledged(i64),
    #[error("host {host:?} has no GPU {gpu:?}")]
    UnknownGpu { host: String, gpu: String },
    #[error("{field}: {reason}")]
    InvalidText {
        field: &'static str,
        reason: &'static str,
    },
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

/// An escalation as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct EscalationRecord {
    pub escalation_id: i64,
    /// Empty for fleet-wide escalations.
    pub host_id: String,
    pub subject: String,
    pub kind: String,
    pub state: String,
    pub severity: String,
    pub summary: String,
    pub level: i32,
    pub occurrences: i32,
    pub opened_at: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub acknowledged_at: Option<DateTime<Utc>>,
    pub acknowledged_by: Option<String>,
    pub resolved_at: Option<DateTime<Utc>>,
    pub resolved_by: Option<String>,
    pub note: Option<String>,
    pub decision_id: Option<i64>,
}

/// A decision as stored.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct DecisionRecord {
    pub decision_id: i64,
    pub seq: i64,
    pub term: i64,
    pub rule: String,
    pub rule_version: i32,
    pub catalog_revision: String,
    pub evidence: serde_json::Value,
    pub rejected: serde_json::Value,
    pub actions: serde_json::Value,
    pub held: serde_json::Value,
    pub breaker: serde_json::Value,
    pub operator: Option<String>,
    pub decided_at: DateTime<Utc>,
}

impl DecisionRecord {
    /// The stored event ids it rests on.
    pub fn events(&self) -> Vec<i64> {
        self.evidence
            .get("events")
            .and_then(|e| e.as_array())
            .map(|a| a.iter().filter_map(serde_json::Value::as_i64).collect())
            .unwrap_or_default()
    }
}

/// A GPU's health as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct GpuHealthRecord {
    pub host_id: String,
    pub gpu_uuid: String,
    pub gpu_index: i32,
    pub state: String,
    pub rung: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub cycles: i32,
}

/// An engine action (outbox entry) as stored.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct ActionRecord {
    pub action_id: i64,
    pub decision_id: i64,
    pub term: i64,
    pub kind: String,
    pub host_id: Option<String>,
    pub action: serde_json::Value,
    pub state: String,
    pub command_id: Option<Vec<u8>>,
    pub error: Option<String>,
}

/// Who leads the engine and how far it has decided.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EngineStatus {
    pub term: i64,
    pub leader: Option<String>,
    pub leader_since: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    /// Breaker scopes not closed, with the actions they hold (described).
    pub breaker: Vec<HeldScope>,
}

/// A breaker scope that is not closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HeldScope {
    pub scope: String,
    pub mode: String,
    pub held: Vec<String>,
}

const MAX_NOTE_BYTES: usize = 4096;

fn check_text(field: &'static str, s: &str, max: usize) -> Result<(), HandleError> {
    if s.contains('\0') {
        return Err(HandleError::InvalidText {
            field,
            reason: "contains a NUL character",
        });
    }
    if s.len() > max {
        return Err(HandleError::InvalidText {
            field,
            reason: "too long",
        });
    }
    Ok(())
}

/// The operator's handle on the engine (the HTTP API calls it): requests become events
/// the leader decides; reads come from the store. Works on any collector.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    pool: PgPool,
}

impl EngineHandle {
    pub fn new(pool: PgPool) -> EngineHandle {
        EngineHandle { pool }
    }

    /// Acknowledges an escalation (`who`, `note` recorded); returns the event id the
    /// engine decides on.
    pub async fn acknowledge(&self, id: i64, who: &str, note: &str) -> Result<i64, HandleError> {
        self.escalation_event(id, "escalation_ack", who, note, None)
            .await
    }

    /// Resolves an escalation (`who`, `note` recorded); returns the event id.
    pub async fn resolve(&self, id: i64, who: &str, note: &str) -> Result<i64, HandleError> {
        self.escalation_event(id, "escalation_resolve", who, note, None)
            .await
    }

    /// [`EngineHandle::acknowledge`], writing `audit` (result: the event id) in the
    /// transaction that stores the request's event. An escalation already acknowledged
    /// or resolved is refused.
    pub async fn acknowledge_audited(
        &self,
        id: i64,
        who: &str,
        note: &str,
        audit: &AuditEntry,
    ) -> Result<i64, HandleError> {
        self.escalation_event(id, "escalation_ack", who, note, Some(audit))
            .await
    }

    /// [`EngineHandle::resolve`], writing `audit` in the event's transaction.
    pub async fn resolve_audited(
        &self,
        id: i64,
        who: &str,
        note: &str,
        audit: &AuditEntry,
    ) -> Result<i64, HandleError> {
        self.escalation_event(id, "escalation_resolve", who, note, Some(audit))
            .await
    }

    async fn escalation_event(
        &self,
        id: i64,
        kind: &str,
        who: &str,
        note: &str,
        audit: Option<&AuditEntry>,
    ) -> Result<i64, HandleError> {
        check_text("who", who, 256)?;
        check_text("note", note, MAX_NOTE_BYTES)?;
        let mut tx = self.pool.begin().await?;
        let e: EscalationRecord = sqlx::query_as(
            "SELECT escalation_id, host_id, subject, kind, state, severity, summary, level,
                 occurrences, opened_at, last_seen, acknowledged_at, acknowledged_by,
                 resolved_at, resolved_by, note, decision_id
             FROM escalations WHERE escalation_id = $1",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(HandleError::UnknownEscalation(id))?;
        if e.state == "resolved" {
            return Err(HandleError::AlreadyResolved(id));
        }
        // The API refuses a second acknowledgement; the Rust API keeps accepting it
        // (the engine ignores it).
        if audit.is_some() && kind == "escalation_ack" && e.state == "acknowledged" {
            return Err(HandleError::AlreadyAcknowledged(id));
        }
        let host = (!e.host_id.is_empty()).then(|| e.host_id.clone());
        let event: i64 = sqlx::query_scalar(
            "INSERT INTO events (host_id, ts, severity, subject_kind, subject_id, kind, payload, message)
             VALUES ($1, now(), 'info', 'escalation', $2, $3, $4, $5) RETURNING event_id",
        )
        .bind(&e.host_id)
        .bind(id.to_string())
        .bind(kind)
        .bind(serde_json::json!({
            "escalation_id": id, "host": host, "subject": e.subject, "kind": e.kind,
            "who": who, "note": note,
        }))
        .bind(format!("{kind} of escalation {id} by {who}: {note}"))
        .fetch_one(&mut *tx)
        .await?;
        if let Some(audit) = audit {
            audit
                .write(&mut tx, &format!("event {event}"), Utc::now())
                .await?;
        }
        tx.commit().await?;
        Ok(event)
    }

    /// Operator override of a GPU's health (by UUID or index), recorded as a decision.
    pub async fn override_gpu(
        &self,
        host: &str,
        gpu: &str,
        healthy: bool,
        who: &str,
        note: &str,
    ) -> Result<i64, HandleError> {
        self.override_gpu_audited(host, gpu, healthy, who, note, None)
            .await
    }

    /// [`EngineHandle::override_gpu`], writing `audit` (result: the event id) in the
    /// transaction that stores the request's event.
    pub async fn override_gpu_audited(
        &self,
        host: &str,
        gpu: &str,
        healthy: bool,
        who: &str,
        note: &str,
        audit: Option<&AuditEntry>,
    ) -> Result<i64, HandleError> {
        check_text("who", who, 256)?;
        check_text("note", note, MAX_NOTE_BYTES)?;
        let mut tx = self.pool.begin().await?;
        let uuid: Option<String> = sqlx::query_scalar(
            "SELECT uuid FROM gpus WHERE host_id = $1 AND (uuid = $2 OR gpu_index::text = $2)",
        )
        .bind(host)
        .bind(gpu)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(uuid) = uuid else {
            return Err(HandleError::UnknownGpu {
                host: host.to_owned(),
                gpu: gpu.to_owned(),
            });
        };
        let event: i64 = sqlx::query_scalar(
            "INSERT INTO events (host_id, ts, severity, subject_kind, subject_id, kind, payload, message)
             VALUES ($1, now(), 'info', 'gpu', $2, 'gpu_override', $3, $4) RETURNING event_id",
        )
        .bind(host)
        .bind(&uuid)
        .bind(serde_json::json!({ "gpu": uuid, "healthy": healthy, "who": who, "note": note }))
        .bind(format!(
            "operator {who} sets {host}/{uuid} {}: {note}",
            if healthy { "healthy" } else { "unhealthy" }
        ))
        .fetch_one(&mut *tx)
        .await?;
        if let Some(audit) = audit {
            audit
                .write(&mut tx, &format!("event {event}"), Utc::now())
                .await?;
        }
        tx.commit().await?;
        Ok(event)
    }

    pub async fn escalation(&self, id: i64) -> Result<Option<EscalationRecord>, HandleError> {
        Ok(sqlx::query_as(
            "SELECT escalation_id, host_id, subject, kind, state, severity, summary, level,
                 occurrences, opened_at, last_seen, acknowledged_at, acknowledged_by,
                 resolved_at, resolved_by, note, decision_id
             FROM escalations WHERE escalation_id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Escalations, newest first; `live`: only those not resolved.
    pub async fn escalations(
        &self,
        live: bool,
        limit: i64,
    ) -> Result<Vec<EscalationRecord>, HandleError> {
        Ok(sqlx::query_as(
            "SELECT escalation_id, host_id, subject, kind, state, severity, summary, level,
                 occurrences, opened_at, last_seen, acknowledged_at, acknowledged_by,
                 resolved_at, resolved_by, note, decision_id
             FROM escalations WHERE NOT $1 OR state <> 'resolved'
             ORDER BY escalation_id DESC LIMIT $2",
        )
        .bind(live)
        .bind(limit.clamp(1, 10_000))
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn decision(&self, id: i64) -> Result<Option<DecisionRecord>, HandleError> {
        Ok(sqlx::query_as(
            "SELECT decision_id, seq, term, rule, rule_version, catalog_revision, evidence,
                 rejected, actions, held, breaker, operator, decided_at
             FROM decisions WHERE decision_id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Decisions, newest first, before `before` (a decision id) when given.
    pub async fn decisions(
        &self,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<DecisionRecord>, HandleError> {
        Ok(sqlx::query_as(
            "SELECT decision_id, seq, term, rule, rule_version, catalog_revision, evidence,
                 rejected, actions, held, breaker, operator, decided_at
             FROM decisions WHERE $1::bigint IS NULL OR decision_id < $1
             ORDER BY decision_id DESC LIMIT $2",
        )
        .bind(before)
        .bind(limit.clamp(1, 10_000))
        .fetch_all(&self.pool)
        .await?)
    }

    /// Decisions resting on a stored event.
    pub async fn decisions_for_event(
        &self,
        event: i64,
    ) -> Result<Vec<DecisionRecord>, HandleError> {
        Ok(sqlx::query_as(
            "SELECT decision_id, seq, term, rule, rule_version, catalog_revision, evidence,
                 rejected, actions, held, breaker, operator, decided_at
             FROM decisions WHERE evidence -> 'events' @> to_jsonb(ARRAY[$1::bigint])
             ORDER BY decision_id",
        )
        .bind(event)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The engine actions (commands...) of a decision.
    pub async fn actions(&self, decision: i64) -> Result<Vec<ActionRecord>, HandleError> {
        Ok(sqlx::query_as(
            "SELECT action_id, decision_id, term, kind, host_id, action, state, command_id, error
             FROM engine_actions WHERE decision_id = $1 ORDER BY action_id",
        )
        .bind(decision)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Every GPU's health (of one host when given).
    pub async fn gpu_health(
        &self,
        host: Option<&str>,
    ) -> Result<Vec<GpuHealthRecord>, HandleError> {
        Ok(sqlx::query_as(
            "SELECT host_id, gpu_uuid, gpu_index, state, rung, since, until, cycles
             FROM gpu_health WHERE $1::text IS NULL OR host_id = $1
             ORDER BY host_id, gpu_index",
        )
        .bind(host)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Leader, term, and what the breaker holds back.
    pub async fn status(&self) -> Result<EngineStatus, HandleError> {
        #[derive(sqlx::FromRow)]
        struct Row {
            term: i64,
            leader: Option<String>,
            leader_since: Option<DateTime<Utc>>,
            updated_at: DateTime<Utc>,
            snapshot: Option<serde_json::Value>,
        }
        let Row {
            term,
            leader,
            leader_since,
            updated_at,
            snapshot,
        } = sqlx::query_as(
            "SELECT term, leader, leader_since, updated_at, snapshot FROM engine_state WHERE id = 1",
        )
        .fetch_one(&self.pool)
        .await?;
        let breaker = snapshot
            .and_then(|s| serde_json::from_value::<Snapshot>(s).ok())
            .map(|s| {
                s.breaker
                    .scopes
                    .iter()
                    .map(|(scope, b)| HeldScope {
                        scope: scope.name(),
                        mode: format!("{:?}", b.mode),
                        held: b.held.iter().map(|h| h.action.describe()).collect(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(EngineStatus {
            term,
            leader,
            leader_since,
            updated_at,
            breaker,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(
        kind: &str,
        subject_kind: &str,
        subject: Option<&str>,
        payload: serde_json::Value,
    ) -> StoredEvent {
        StoredEvent {
            id: 7,
            host: "h1".to_owned(),
            subject_kind: subject_kind.to_owned(),
            subject_id: subject.map(str::to_owned),
            kind: kind.to_owned(),
            payload,
            message: "m".to_owned(),
            gpu_uuid: None,
            historical: false,
            component_revision: None,
            gpu_uuids: None,
            fault_components: Vec::new(),
        }
    }

    /// An attributed XID 13 of GPU 0 (`GPU-a`) with what ran on it then.
    fn attributed_xid(components: &[(&str, &str)]) -> StoredEvent {
        StoredEvent {
            gpu_uuid: Some("GPU-a".to_owned()),
            fault_components: components
                .iter()
                .map(|(c, r)| ((*c).to_owned(), (*r).to_owned()))
                .collect(),
            ..event(
                "xid",
                "gpu",
                Some("0"),
                serde_json::json!({ "Xid": { "xid": 13, "class": "RestartApplication" } }),
            )
        }
    }

    #[test]
    fn an_attributed_fault_carries_the_revisions_that_ran_on_its_gpu_then() {
        // The view maps nothing to GPU-a (the store's inventory has no mapping); the
        // fault says llm@v1 ran there when it was seen (before v2 started).
        let e = attributed_xid(&[("llm", "v1")]);
        match translate(&view(), &e) {
            Some(Input::XidObserved { gpu, revisions, .. }) => {
                assert_eq!(gpu, "GPU-a");
                assert_eq!(revisions, vec![("llm".to_owned(), "v1".to_owned())]);
            }
            other => panic!("{other:?}"),
        }
        // The mapping is learnt: GPU-a's components are drained with it from now on.
        let mut v = view();
        learn(&mut v, &e);
        assert_eq!(v.hosts["h1"].components_on("GPU-a"), vec!["llm".to_owned()]);
        assert_eq!(v.hosts["h1"].components["llm"].gpus, vec!["GPU-b", "GPU-a"]);
    }

    #[test]
    fn a_historical_fault_is_not_a_new_one() {
        let e = StoredEvent {
            historical: true,
            ..attributed_xid(&[("llm", "v2")])
        };
        assert_eq!(translate(&view(), &e), None);
    }

    #[test]
    fn a_component_failure_carries_the_revision_it_ran_and_its_gpus() {
        let e = StoredEvent {
            component_revision: Some("v1".to_owned()),
            gpu_uuids: Some(vec!["GPU-a".to_owned()]),
            ..event(
                "state_changed",
                "component",
                Some("llm"),
                serde_json::json!({ "StateChanged": { "from": "Starting", "to": "Backoff" } }),
            )
        };
        match translate(&view(), &e) {
            Some(Input::ComponentFailed { revision, .. }) => assert_eq!(revision, "v1"),
            other => panic!("{other:?}"),
        }
        let mut v = view();
        learn(&mut v, &e);
        assert_eq!(v.hosts["h1"].components["llm"].gpus, vec!["GPU-a"]);
    }

    fn view() -> FleetView {
        let mut v = FleetView::new(EngineConfig::default()).expect("valid");
        v.add_gpu("h1", "GPU-a", 0, "H100");
        v.add_gpu("h1", "GPU-b", 1, "H100");
        v.add_component("h1", "llm", "v2", Some("v1"), 0, &["GPU-b"]);
        v
    }

    #[test]
    fn xid_events_name_the_gpu_by_uuid_with_its_revisions() {
        let e = event(
            "xid",
            "gpu",
            Some("1"),
            serde_json::json!({ "Xid": { "xid": 79, "class": "Hardware" } }),
        );
        assert_eq!(
            translate(&view(), &e),
            Some(Input::XidObserved {
                host: "h1".to_owned(),
                gpu: "GPU-b".to_owned(),
                xid: 79,
                revisions: vec![("llm".to_owned(), "v2".to_owned())],
                message: Some("m".to_owned()),
                event: 7,
            })
        );
    }

    #[test]
    fn component_state_changes_become_failures() {
        let change = |from: &str, to: &str| {
            event(
                "state_changed",
                "component",
                Some("llm"),
                serde_json::json!({ "StateChanged": { "from": from, "to": to } }),
            )
        };
        let kind = |e: &StoredEvent| match translate(&view(), e) {
            Some(Input::ComponentFailed { kind, revision, .. }) => {
                assert_eq!(revision, "v2");
                Some(kind)
            }
            _ => None,
        };
        assert_eq!(
            kind(&change("Backoff", "Quarantined")),
            Some(FailureKind::GaveUp)
        );
        assert_eq!(
            kind(&change("Ready", "Unhealthy")),
            Some(FailureKind::Liveness)
        );
        assert_eq!(
            kind(&change("Starting", "Backoff")),
            Some(FailureKind::CrashLoop)
        );
        assert_eq!(kind(&change("Starting", "Ready")), None);
    }

    #[test]
    fn operator_events_carry_the_key_back() {
        let key = EscalationKey::new(Some("h1"), "GPU-a", EscalationKind::GpuFault);
        let e = event(
            "escalation_ack",
            "escalation",
            Some("3"),
            serde_json::json!({ "host": "h1", "subject": "GPU-a", "kind": kind_str(key.kind), "who": "ann", "note": "on it" }),
        );
        assert_eq!(
            translate(&view(), &e),
            Some(Input::EscalationAcknowledged {
                key,
                who: "ann".to_owned(),
                event: 7
            })
        );
        assert_eq!(parse_kind("BreakerOpen"), Some(EscalationKind::BreakerOpen));
        assert_eq!(parse_kind("nope"), None);
    }

    #[test]
    fn a_quarantine_and_a_drain_of_one_gpu_are_one_command() {
        let actions = vec![
            Action::QuarantineGpu {
                host: "h1".into(),
                gpu: "GPU-a".into(),
            },
            Action::DrainComponents {
                host: "h1".into(),
                gpu: Some("GPU-a".into()),
                components: vec!["llm".into()],
            },
            Action::ResetGpu {
                host: "h1".into(),
                gpu: "GPU-a".into(),
            },
        ];
        let planned = plan_decision(&actions);
        assert_eq!(planned.len(), 2, "{planned:?}");
        assert_eq!(planned[0].1, "drain_gpu");
        assert_eq!(planned[1].1, "reset_gpu");
    }

    #[test]
    fn the_snapshot_round_trips_the_view() {
        let mut v = view();
        razar_engine::decide(
            &mut v,
            &Input::HostLost {
                host: "h1".into(),
                event: 1,
            },
            1_000,
        );
        let _ = v.take_decisions();
        let json = serde_json::to_value(Snapshot::of(&v)).expect("encodes");
        let back: Snapshot = serde_json::from_value(json).expect("decodes");
        let w = back.into_view(EngineConfig::default()).expect("valid");
        assert_eq!(w.hosts, v.hosts);
        assert_eq!(w.escalations, v.escalations);
        assert_eq!(w.next_decision, v.next_decision);
    }
}
