//! The operator API's request and response bodies (serde, plus their OpenAPI schemas):
//! shared with clients such as the `razar` CLI. No I/O here.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// Every error: a stable machine-readable code and a human message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Stable code, e.g. `bad_request`, `unauthorized`, `forbidden`, `not_found`,
    /// `conflict`, `payload_too_large`, `rate_limited`, `unavailable`, `internal`.
    pub code: String,
    pub message: String,
    /// The request's id (also in the `x-request-id` response header).
    #[serde(default)]
    pub request_id: Option<String>,
}

/// A role: `viewer` reads; `operator` also sends commands; `admin` also manages tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

/// A component's revision as a host runs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ComponentRevision {
    pub name: String,
    pub state: String,
    pub revision: String,
}

/// A host as the collector knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Host {
    pub host_id: String,
    /// `online` or `lost`.
    pub state: String,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub lost_since: Option<DateTime<Utc>>,
    pub agent_version: String,
    pub profile: String,
    /// Every component with its state and revision.
    pub components: Vec<ComponentRevision>,
    pub gpu_count: i64,
}

/// A component of a host, with its recent events (state transitions first of all).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Component {
    pub name: String,
    pub state: String,
    pub revision: String,
    pub critical: bool,
    pub updated_at: DateTime<Utc>,
    /// The component's most recent events, newest first (at most 20).
    pub recent_events: Vec<Event>,
}

/// The newest value of one GPU metric.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GpuValue {
    pub metric: String,
    pub value: f64,
    pub ts: DateTime<Utc>,
}

/// A GPU of a host: inventory and its newest values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Gpu {
    pub index: i32,
    pub uuid: String,
    pub name: String,
    pub pci_bus_id: String,
    pub memory_total_bytes: i64,
    pub updated_at: DateTime<Utc>,
    /// `healthy`, `quarantined`, `probation` or `inspection` (the decision engine's).
    pub health_state: Option<String>,
    /// The engine's record of the GPU (null while it never judged the GPU).
    #[serde(default)]
    pub health: Option<GpuHealth>,
    /// Newest sample of each of the GPU's series in the last 10 minutes.
    pub values: Vec<GpuValue>,
}

/// An event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    pub id: i64,
    pub host_id: String,
    pub ts: DateTime<Utc>,
    pub severity: String,
    /// `host`, `component` or `gpu`.
    pub subject_kind: String,
    pub subject_id: Option<String>,
    pub kind: String,
    pub message: String,
    pub payload: serde_json::Value,
}

/// A page of events, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EventPage {
    pub events: Vec<Event>,
    /// Pass as `before` for the next (older) page; null on the last page.
    pub next_cursor: Option<i64>,
}

/// Event filters (every one optional).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventQuery {
    pub host: Option<String>,
    /// Events of this component.
    pub component: Option<String>,
    /// Events of this GPU (its index).
    pub gpu: Option<u32>,
    pub kind: Option<String>,
    pub severity: Option<String>,
    /// RFC 3339; events at or after.
    pub from: Option<DateTime<Utc>>,
    /// RFC 3339; events before.
    pub to: Option<DateTime<Utc>>,
    /// Only events with a smaller id (the previous page's `next_cursor`).
    pub before: Option<i64>,
    /// 1 to 1000 (default 100).
    pub limit: Option<u32>,
}

/// Filters of the live event stream; resumes after `after` or the `Last-Event-ID` header.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    pub host: Option<String>,
    pub kind: Option<String>,
    pub severity: Option<String>,
    /// Resume after this event id (the `Last-Event-ID` header wins).
    pub after: Option<i64>,
}

/// What a history query asks for.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    pub metric: String,
    pub host: Option<String>,
    /// A JSON object of labels the series must have, e.g. `{"gpu":"0"}`.
    pub labels: Option<String>,
    /// RFC 3339 (default: `to` minus one hour).
    pub from: Option<DateTime<Utc>>,
    /// RFC 3339 (default: now).
    pub to: Option<DateTime<Utc>>,
    /// Bucket length, e.g. `10s`, `1m` (default: the range over `points`).
    pub step: Option<String>,
    /// Most points per series, 1 to 10000 (default 1000).
    pub points: Option<u32>,
}

/// One point: the bucket start and the bucket's average (min, max and count of samples
/// in it).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HistoryPoint {
    /// Milliseconds since the Unix epoch.
    pub ts_ms: i64,
    pub value: f64,
    pub min: f64,
    pub max: f64,
    pub count: u32,
}

/// One series of a history answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HistorySeries {
    pub series_id: i64,
    pub host_id: String,
    pub labels: serde_json::Value,
    pub points: Vec<HistoryPoint>,
}

/// A history answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct History {
    pub metric: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub step_ms: i64,
    /// `raw` (samples and chunks) or `rollup_1m` (1-minute rollups).
    pub source: String,
    pub series: Vec<HistorySeries>,
}

/// A command to send (`kind` names the action).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
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
    DrainGpu {
        gpu: String,
        note: String,
    },
    ResetGpu {
        gpu: String,
    },
    SetGpuHealth {
        gpu: String,
        healthy: bool,
        note: String,
    },
    SwitchProfile {
        profile: String,
    },
}

/// `POST /api/v1/commands`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCommand {
    pub host: String,
    pub action: Action,
    /// Not started after this many seconds (1 to 86400, default 300).
    pub deadline_seconds: Option<u32>,
    /// The same key from the same token returns the existing command.
    pub idempotency_key: Option<String>,
}

/// A command as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CommandView {
    /// 32 hex digits.
    pub id: String,
    pub host: String,
    pub kind: String,
    pub component: Option<String>,
    pub gpu: Option<u32>,
    /// `queued`, `sent`, `succeeded`, `failed` or `expired`.
    pub state: String,
    pub caller: String,
    pub request_id: Option<String>,
    pub idempotency_key: Option<String>,
    pub created_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub deadline: DateTime<Utc>,
    pub message: Option<String>,
    pub attempts: u32,
    pub duplicate: bool,
    /// The action as the wire carries it.
    pub action: serde_json::Value,
}

/// A page of commands, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CommandPage {
    pub commands: Vec<CommandView>,
    /// Pass as `before` for the next page; null on the last page.
    pub next_cursor: Option<i64>,
}

/// Command filters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CommandQuery {
    pub host: Option<String>,
    pub state: Option<String>,
    pub before: Option<i64>,
    /// 1 to 1000 (default 100).
    pub limit: Option<u32>,
}

/// Log tail options.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogQuery {
    /// Lines of history first (0 to 10000, default 100).
    pub lines: Option<u32>,
    /// Keep following until the client leaves.
    pub follow: Option<bool>,
}

/// One SSE `log` event's data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LogLines {
    /// `stdout` or `stderr`.
    pub stream: String,
    pub lines: Vec<String>,
}

/// `POST /api/v1/tokens`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    pub name: String,
    pub role: Role,
    /// e.g. `30d`; none: never expires.
    pub expires_in: Option<String>,
}

/// A token (never its secret).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Token {
    pub id: i64,
    pub name: String,
    pub role: Role,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used: Option<DateTime<Utc>>,
}

/// A new token: `token` is shown this once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CreatedToken {
    pub token: String,
    pub info: Token,
}

/// An audit row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub token_id: Option<i64>,
    pub who: String,
    pub role: String,
    pub method: String,
    pub route: String,
    pub arguments: serde_json::Value,
    pub result: String,
    pub request_id: String,
}

/// A page of audit rows, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AuditPage {
    pub entries: Vec<AuditEntry>,
    pub next_cursor: Option<i64>,
}

/// Paging of lists that only page.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    pub before: Option<i64>,
    /// 1 to 1000 (default 100).
    pub limit: Option<u32>,
}

// ---------------------------------------------------------------- ops (session 7):
// escalations, decisions, GPU health, deployments.

/// A GPU's health in the decision engine's eyes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GpuHealth {
    /// `healthy`, `quarantined`, `probation` or `inspection`.
    pub state: String,
    /// Quarantined / probation: the recovery ladder's rung (`reset`, `reboot`).
    pub rung: Option<String>,
    pub since: Option<DateTime<Utc>>,
    /// Probation: back in service at this time unless it faults first.
    pub until: Option<DateTime<Utc>>,
    /// Failed recovery cycles so far.
    pub cycles: i32,
}

/// An operator's override of a GPU's health (recorded as a decision).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GpuHealthOverride {
    pub healthy: bool,
    /// Why (kept with the decision and in the audit log).
    #[serde(default)]
    pub note: String,
}

/// An operator request the decision engine decides on (asynchronously): the event it
/// reads. Poll the escalation, GPU or decisions to see its effect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Requested {
    /// The stored event the engine decides on.
    pub event_id: i64,
    /// `ack`, `resolve` or `gpu_health`.
    pub request: String,
    /// The escalation as it stands (before the engine decided), for ack / resolve.
    pub escalation: Option<Escalation>,
}

/// An escalation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Escalation {
    pub id: i64,
    /// Null for fleet-wide escalations.
    pub host: Option<String>,
    pub subject: String,
    pub kind: String,
    /// `open`, `acknowledged` or `resolved`.
    pub state: String,
    pub severity: String,
    pub summary: String,
    /// Notification level (raised while nobody acknowledges).
    pub level: i32,
    pub occurrences: i32,
    pub opened_at: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub acknowledged_at: Option<DateTime<Utc>>,
    pub acknowledged_by: Option<String>,
    pub resolved_at: Option<DateTime<Utc>>,
    pub resolved_by: Option<String>,
    pub note: Option<String>,
    /// The last decision that raised, re-notified or settled it.
    pub decision_id: Option<i64>,
}

/// A page of escalations, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EscalationPage {
    pub escalations: Vec<Escalation>,
    /// Pass as `before` for the next page; null on the last.
    pub next_cursor: Option<i64>,
}

/// Escalation filters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EscalationQuery {
    /// `open`, `acknowledged`, `resolved`, or `live` (open or acknowledged).
    pub state: Option<String>,
    pub host: Option<String>,
    pub severity: Option<String>,
    pub kind: Option<String>,
    /// Only escalations with a smaller id (the previous page's `next_cursor`).
    pub before: Option<i64>,
    /// 1 to 1000 (default 100).
    pub limit: Option<u32>,
}

/// An operator's note on an escalation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EscalationNote {
    #[serde(default)]
    pub note: String,
}

/// An alternative the rule considered and rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RejectedAlternative {
    pub alternative: String,
    pub reason: String,
}

/// A decision of the engine (list entry).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Decision {
    pub id: i64,
    /// Sequence number within the engine's view.
    pub seq: i64,
    /// The leader's term (fencing) when decided.
    pub term: i64,
    pub rule: String,
    pub rule_version: i32,
    /// The XID catalog revision the rule followed.
    pub catalog_revision: String,
    /// Host of the first event it rests on (null for fleet-wide decisions).
    pub host: Option<String>,
    /// Subject (component, GPU...) of the first event it rests on.
    pub subject: Option<String>,
    /// The first fact the rule saw.
    pub summary: String,
    /// The operator, for overrides.
    pub operator: Option<String>,
    /// When the engine decided.
    pub created_at: DateTime<Utc>,
    /// `{events: [event ids], facts: [what the rule saw]}`.
    pub evidence: serde_json::Value,
    pub rejected: Vec<RejectedAlternative>,
    /// What the engine does (engine actions).
    pub actions: serde_json::Value,
    /// Actions the circuit breaker held back.
    pub held: serde_json::Value,
    /// The breaker's scopes when decided.
    pub breaker: serde_json::Value,
}

/// An engine action of a decision as carried out (the outbox).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DecisionAction {
    pub id: i64,
    pub kind: String,
    pub host: Option<String>,
    pub action: serde_json::Value,
    /// `pending`, `done`, `failed`...
    pub state: String,
    /// The command it sent (32 hex digits).
    pub command_id: Option<String>,
    pub error: Option<String>,
}

/// A decision with its evidence events and what became of its actions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DecisionDetail {
    #[serde(flatten)]
    pub decision: Decision,
    /// The stored events it rests on.
    pub events: Vec<Event>,
    pub engine_actions: Vec<DecisionAction>,
}

/// A page of decisions, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DecisionPage {
    pub decisions: Vec<Decision>,
    pub next_cursor: Option<i64>,
}

/// Decision filters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DecisionQuery {
    /// Rule id, e.g. `gpu_quarantine`.
    pub rule: Option<String>,
    /// Decisions resting on an event of this host.
    pub host: Option<String>,
    /// Decisions resting on this event.
    pub event: Option<i64>,
    pub before: Option<i64>,
    /// 1 to 1000 (default 100).
    pub limit: Option<u32>,
}

/// A component revision to deploy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevisionBody {
    /// The version label, e.g. `v2`.
    pub version: String,
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
}

/// A deployment to start: a revision of one component to the selected hosts (the
/// listed ones first, then those of `profile`, or every host with `all`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDeployment {
    pub component: String,
    pub revision: RevisionBody,
    #[serde(default)]
    pub hosts: Vec<String>,
    pub profile: Option<String>,
    #[serde(default)]
    pub all: bool,
    /// Default 1.
    pub canaries: Option<u32>,
    /// Default 1.
    pub max_parallel: Option<u32>,
    /// Healthy after running this long, e.g. `30s` (default).
    pub min_healthy: Option<String>,
    /// Failed when not healthy this long after its update, e.g. `5m` (default).
    pub healthy_deadline: Option<String>,
    /// Revert on a failure (default true).
    pub auto_revert: Option<bool>,
    /// `manual` (default) or `auto`.
    pub promotion: Option<String>,
}

/// An operation on a deployment; `reason` is shown (pause, rollback).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeploymentOp {
    pub reason: Option<String>,
}

/// Which hosts a deployment goes to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DeploymentSelector {
    pub hosts: Vec<String>,
    pub profile: Option<String>,
    pub all: bool,
}

/// A host of a deployment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeploymentHost {
    pub host: String,
    pub position: i32,
    pub canary: bool,
    /// `canary` or `main`.
    pub wave: String,
    /// The revision it ran before (a revert goes back to it).
    pub from_revision: String,
    /// `pending`, `deploying`, `healthy`, `failed`, `reverting` or `reverted`.
    pub state: String,
    pub reason: Option<String>,
    /// Its latest step.
    pub updated_at: Option<DateTime<Utc>>,
    pub deploying_at: Option<DateTime<Utc>>,
    pub running_at: Option<DateTime<Utc>>,
    pub healthy_at: Option<DateTime<Utc>>,
    pub failed_at: Option<DateTime<Utc>>,
    pub reverting_at: Option<DateTime<Utc>>,
    pub reverted_at: Option<DateTime<Utc>>,
}

/// A deployment with its hosts in rollout order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Deployment {
    pub id: i64,
    pub component: String,
    /// The version label deployed.
    pub revision: String,
    pub spec: RevisionBody,
    pub selector: DeploymentSelector,
    pub canaries: u32,
    pub max_parallel: u32,
    pub min_healthy_ms: i64,
    pub healthy_deadline_ms: i64,
    pub auto_revert: bool,
    pub promotion: String,
    /// `created`, `canary`, `waiting_promotion`, `rolling`, `succeeded`, `paused`,
    /// `reverting`, `reverted` or `failed`.
    pub state: String,
    pub paused: bool,
    /// Why it paused, failed or reverted.
    pub reason: Option<String>,
    /// e.g. `1/3 healthy`.
    pub progress: String,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub hosts: Vec<DeploymentHost>,
}

/// A page of deployments, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeploymentPage {
    pub deployments: Vec<Deployment>,
    pub next_cursor: Option<i64>,
}

/// Deployment filters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeploymentQuery {
    /// One of the deployment states, or `active` (not ended).
    pub state: Option<String>,
    pub component: Option<String>,
    pub before: Option<i64>,
    /// 1 to 1000 (default 100).
    pub limit: Option<u32>,
}

// ---- dash: the fleet overview (`GET /api/v1/overview`).

/// Hosts by state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OverviewHosts {
    pub total: i64,
    pub online: i64,
    pub lost: i64,
}

/// GPUs by health state, with their utilisation and memory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OverviewGpus {
    /// GPUs of the inventory.
    pub total: i64,
    /// In service: the total less those quarantined, on probation or awaiting inspection.
    pub healthy: i64,
    pub quarantined: i64,
    pub probation: i64,
    pub inspection: i64,
    /// Mean of the GPUs' latest utilisation (0-1) over those sampled recently; null if none.
    pub utilization_avg: Option<f64>,
    /// Sum of the GPUs' latest memory in use (those sampled recently).
    pub memory_used_bytes: i64,
    /// Sum of the inventory's memory sizes.
    pub memory_total_bytes: i64,
}

/// An escalation not resolved (open or acknowledged).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OverviewEscalation {
    pub id: i64,
    /// Empty for a fleet-wide escalation.
    pub host: String,
    pub subject: String,
    pub kind: String,
    pub state: String,
    pub severity: String,
    pub summary: String,
    pub opened_at: DateTime<Utc>,
    pub decision_id: Option<i64>,
}

/// A deployment in progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OverviewDeployment {
    pub id: i64,
    pub component: String,
    pub revision: String,
    pub state: String,
    pub paused: bool,
    /// Hosts whose new revision proved healthy.
    pub hosts_done: i64,
    pub hosts_total: i64,
    pub created_at: DateTime<Utc>,
}

/// The automation circuit breaker, fleet wide.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OverviewBreaker {
    /// `closed`, `half_open` (a trial may go through) or `open` (the worst scope).
    pub state: String,
    /// Scopes not closed (`fleet`, `model:...`, `revision:...` entries counted).
    pub scopes: i64,
    /// Actions the breaker holds back.
    pub held: i64,
}

/// One host's line of the overview.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OverviewHost {
    pub host: String,
    /// `online` or `lost`.
    pub state: String,
    pub last_seen: DateTime<Utc>,
    pub gpus: i64,
    /// GPUs quarantined, on probation or awaiting inspection.
    pub gpus_unhealthy: i64,
    /// Mean latest utilisation (0-1) of its GPUs sampled recently; null if none.
    pub gpu_util: Option<f64>,
    pub components: i64,
    /// Components unhealthy, in backoff or quarantined.
    pub components_failed: i64,
    pub agent_version: String,
}

/// `GET /api/v1/overview`: what the dashboard's fleet page shows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Overview {
    /// When this answer was computed (it serves requests for up to a few seconds).
    pub as_of: DateTime<Utc>,
    pub hosts: OverviewHosts,
    pub gpus: OverviewGpus,
    /// The newest escalations not resolved (at most 10).
    pub escalations_open: Vec<OverviewEscalation>,
    /// Every escalation not resolved.
    pub escalations_open_count: i64,
    /// Deployments not finished, newest first (at most 20).
    pub deployments_active: Vec<OverviewDeployment>,
    pub breaker: OverviewBreaker,
    /// Every host, by id.
    pub host_list: Vec<OverviewHost>,
}
