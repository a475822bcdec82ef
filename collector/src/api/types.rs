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
    /// Quarantine / probation state from the decision loop; null until it runs.
    pub health_state: Option<String>,
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
