//! Deployments: a revision of one component rolled out to a set of hosts in waves.
//!
//! The wave machine is the engine's pure [`Rollout`] (canaries, `max_parallel`, min
//! healthy time, healthy deadline, auto-revert, manual or automatic promotion); this
//! module stores it (`deployments`, `deployment_hosts`: migration 0006), feeds it what the
//! hosts report, and carries out what it returns:
//!
//! - an update is a `DeployRevision` command, a revert a `Rollback` to the revision the
//!   host ran when the deployment was created, both through [`Dispatch`] (caller
//!   `deployments`, idempotency key `deployment/<id>/<host>/<deploy|revert>`: a driver
//!   that dies between sending and storing sends nothing twice);
//! - a host *started* once its deploy command succeeded and the components table shows
//!   the component `ready` on the new revision; it *failed* when the command failed or
//!   expired, or the component is `backoff`, `unhealthy` or `quarantined` on the new
//!   revision (with that as the reason); it is *reverted* once the component is `ready`
//!   on its old revision again. The min healthy time and healthy deadline are the
//!   machine's.
//! - a failure with auto-revert (the default) reverts the hosts that got the revision,
//!   failed hosts first, `max_parallel` at a time, the next only once a reverting host
//!   runs the old revision (no canaries again); the deployment ends `reverted`, its
//!   reason saying which host failed and why. Without auto-revert it ends `failed`
//!   and an operator may [`Deployments::roll_back`].
//!
//! Every step runs in one transaction holding the deployment's row lock (the driver
//! skips a row an operator holds), so replicas and operators never step a deployment
//! twice at once. Operations are a Rust API ([`Deployments`]); the HTTP API wraps them.

use crate::dispatch::{CommandRequest, CommandState, Dispatch, DispatchError};
use crate::store::audit::AuditEntry;
use crate::supervise::Beat;
use chrono::{DateTime, Utc};
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use razar_engine::deployment::{
    DeployAction, DeployError, DeployInput, HostPhase, Phase, Rollout, WaveConfig,
};
use razar_shared::protocol::{CommandAction, CommandId, RevisionSpec};
use serde::{Deserialize, Serialize};
use sqlx::types::Json;
use sqlx::{PgPool, Postgres, Row, Transaction};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::watch;

/// The caller name of every command a deployment sends.
pub const CALLER: &str = "deployments";

/// Every stored deployment state.
pub const STATES: [&str; 9] = [
    "created",
    "canary",
    "waiting_promotion",
    "rolling",
    "succeeded",
    "paused",
    "reverting",
    "reverted",
    "failed",
];

/// Component states that fail a host on the new revision.
const FAILING: [&str; 3] = ["backoff", "unhealthy", "quarantined"];

/// Longest reason stored (bytes, cut at a character boundary).
const MAX_REASON_BYTES: usize = 2048;

/// Driver settings (`[deployments]` in the collector config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeploymentSettings {
    /// How often the driver looks at the active deployments.
    pub tick: Duration,
    /// Deadline of each deploy or revert command sent.
    pub command_deadline: Duration,
}

impl Default for DeploymentSettings {
    /// Every second; commands valid for 10 minutes.
    fn default() -> DeploymentSettings {
        DeploymentSettings {
            tick: Duration::from_secs(1),
            command_deadline: Duration::from_secs(600),
        }
    }
}

/// Why a deployment operation was refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeploymentError {
    #[error("no deployment {0}")]
    NotFound(i64),
    /// The request is inconsistent (selector, numbers, revision).
    #[error("invalid deployment: {0}")]
    Invalid(String),
    /// Another deployment of the component is still active on a selected host.
    #[error("deployment {other} of {component:?} is still active on {host}")]
    Busy {
        other: i64,
        component: String,
        host: String,
    },
    /// The operation does not apply in the deployment's state.
    #[error("deployment {id} is {state}: {reason}")]
    State {
        id: i64,
        state: String,
        reason: String,
    },
    #[error("command: {0}")]
    Dispatch(#[from] DispatchError),
    /// A stored row does not decode.
    #[error("stored deployment {id}: {reason}")]
    Corrupt { id: i64, reason: String },
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

/// Which hosts a deployment goes to: the listed hosts (in this order, first), and every
/// host of `profile`, or every host (`all`), that runs the component.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSelector {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub profile: Option<String>,
    #[serde(default)]
    pub all: bool,
}

/// Promotion after the canaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Promotion {
    /// Waits in `waiting_promotion` for [`Deployments::promote`].
    Manual,
    /// Rolls on once the canaries are healthy.
    Auto,
}

impl Promotion {
    fn as_str(self) -> &'static str {
        match self {
            Promotion::Manual => "manual",
            Promotion::Auto => "auto",
        }
    }
}

/// What an operator asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDeployment {
    pub component: String,
    pub revision: RevisionSpec,
    pub selector: HostSelector,
    /// The first this many hosts are canaries.
    pub canaries: u32,
    pub max_parallel: u32,
    /// A host is healthy after running the revision this long without failing.
    pub min_healthy: Duration,
    /// A host not healthy this long after its update failed.
    pub healthy_deadline: Duration,
    /// Revert the updated hosts on a failure (default on).
    pub auto_revert: bool,
    pub promotion: Promotion,
    /// Who asks (recorded).
    pub created_by: String,
}

impl NewDeployment {
    /// A deployment with the defaults: 1 canary, 1 at a time, healthy after 30 s within
    /// 5 min, auto-revert on, manual promotion.
    pub fn new(component: &str, revision: RevisionSpec, selector: HostSelector) -> Self {
        NewDeployment {
            component: component.to_owned(),
            revision,
            selector,
            canaries: 1,
            max_parallel: 1,
            min_healthy: Duration::from_secs(30),
            healthy_deadline: Duration::from_secs(300),
            auto_revert: true,
            promotion: Promotion::Manual,
            created_by: "operator".to_owned(),
        }
    }
}

/// One host of a deployment as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeploymentHost {
    pub host: String,
    pub position: i32,
    pub canary: bool,
    pub from_revision: String,
    /// `pending`, `deploying`, `healthy`, `failed`, `reverting` or `reverted`.
    pub state: String,
    pub reason: Option<String>,
    pub deploying_at: Option<DateTime<Utc>>,
    pub running_at: Option<DateTime<Utc>>,
    pub healthy_at: Option<DateTime<Utc>>,
    pub failed_at: Option<DateTime<Utc>>,
    pub reverting_at: Option<DateTime<Utc>>,
    pub reverted_at: Option<DateTime<Utc>>,
}

/// A deployment as stored, with its hosts in rollout order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Deployment {
    pub id: i64,
    pub component: String,
    pub revision: String,
    pub spec: RevisionSpec,
    pub selector: HostSelector,
    pub canaries: u32,
    pub max_parallel: u32,
    pub min_healthy_ms: i64,
    pub healthy_deadline_ms: i64,
    pub auto_revert: bool,
    pub promotion: String,
    /// One of [`STATES`].
    pub state: String,
    pub paused: bool,
    pub reason: Option<String>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub hosts: Vec<DeploymentHost>,
}

/// `razar_collector_deployments{state}` and `razar_collector_deployment_host_steps_total`.
#[derive(Debug, Clone)]
pub struct DeploymentMetrics {
    /// Deployments by state (refreshed each driver tick).
    pub by_state: IntGaugeVec,
    /// Host steps, by step (`deploy`, `revert`) and result (`sent`, `started`,
    /// `healthy`, `failed`, `reverted`).
    pub host_steps: IntCounterVec,
}

impl DeploymentMetrics {
    pub fn new(registry: &Registry) -> Result<DeploymentMetrics, prometheus::Error> {
        let m = DeploymentMetrics {
            by_state: IntGaugeVec::new(
                Opts::new(
                    "razar_collector_deployments",
                    "Deployments by state (created, canary, waiting_promotion, rolling, \
                     succeeded, paused, reverting, reverted, failed).",
                ),
                &["state"],
            )?,
            host_steps: IntCounterVec::new(
                Opts::new(
                    "razar_collector_deployment_host_steps_total",
                    "Deployment steps on hosts, by step (deploy, revert) and result (sent, \
                     started, healthy, failed, reverted).",
                ),
                &["step", "result"],
            )?,
        };
        registry.register(Box::new(m.by_state.clone()))?;
        registry.register(Box::new(m.host_steps.clone()))?;
        Ok(m)
    }

    fn step(&self, step: &str, result: &str) {
        self.host_steps.with_label_values(&[step, result]).inc();
    }
}

/// An operator's operation on a deployment (with its reason where it takes one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    Pause(String),
    Resume,
    Promote,
    RollBack(String),
}

/// An operator's (or the engine's) input to a deployment.
#[derive(Debug, Clone)]
enum Op {
    Pause(String),
    Resume,
    Promote,
    RollBack(String),
}

/// The deployments of one collector: operations and the driver.
#[derive(Debug, Clone)]
pub struct Deployments {
    pool: PgPool,
    dispatch: Dispatch,
    metrics: DeploymentMetrics,
    settings: DeploymentSettings,
}

/// Milliseconds since the epoch of `t`.
fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn duration_ms(d: Duration, what: &str) -> Result<i64, DeploymentError> {
    i64::try_from(d.as_millis())
        .map_err(|_| DeploymentError::Invalid(format!("{what} is too long")))
}

fn cap(mut s: String) -> String {
    if s.len() > MAX_REASON_BYTES {
        let mut end = MAX_REASON_BYTES;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s.replace('\0', "")
}

/// The stored state of a rollout.
fn state_of(rollout: &Rollout) -> &'static str {
    match rollout.phase {
        Phase::Succeeded => "succeeded",
        Phase::Failed => "failed",
        Phase::Reverting => "reverting",
        Phase::Reverted => "reverted",
        _ if rollout.paused => "paused",
        Phase::Canary => "canary",
        Phase::AwaitingPromotion => "waiting_promotion",
        Phase::Rolling => "rolling",
    }
}

fn terminal(state: &str) -> bool {
    matches!(state, "succeeded" | "reverted" | "failed")
}

/// The stored state of a host.
fn host_state(phase: &HostPhase) -> &'static str {
    match phase {
        HostPhase::Pending => "pending",
        HostPhase::Updating { .. } | HostPhase::Running { .. } => "deploying",
        HostPhase::Done => "healthy",
        HostPhase::Failed => "failed",
        HostPhase::AwaitingRevert | HostPhase::Reverting => "reverting",
        HostPhase::Reverted => "reverted",
    }
}

fn text_ok(field: &str, value: &str) -> Result<(), DeploymentError> {
    if value.contains('\0') || value.len() > 4096 {
        return Err(DeploymentError::Invalid(format!(
            "{field}: NUL character or longer than 4096 bytes"
        )));
    }
    Ok(())
}

/// A host row as the driver needs it.
#[derive(Debug, Clone)]
struct HostRow {
    from_revision: String,
    state: String,
    command_id: Option<CommandId>,
    reason: Option<String>,
}

/// A component row: state and revision as the host last reported.
#[derive(Debug, Clone)]
struct ComponentRow {
    state: String,
    revision: String,
}

impl Deployments {
    pub fn new(
        pool: PgPool,
        dispatch: Dispatch,
        registry: &Registry,
        settings: DeploymentSettings,
    ) -> Result<Deployments, prometheus::Error> {
        Ok(Deployments {
            pool,
            dispatch,
            metrics: DeploymentMetrics::new(registry)?,
            settings,
        })
    }

    pub fn metrics(&self) -> &DeploymentMetrics {
        &self.metrics
    }

    /// Validates and stores a deployment (`created`); the driver starts it at its next
    /// tick. The hosts are resolved now: the listed ones first (each must run the
    /// component), then those of the profile or all, in host id order.
    pub async fn create(&self, new: NewDeployment) -> Result<Deployment, DeploymentError> {
        self.create_audited(new, None).await
    }

    /// [`Deployments::create`], writing `audit` (result: the deployment id) in the
    /// transaction that stores the deployment.
    pub async fn create_audited(
        &self,
        new: NewDeployment,
        audit: Option<&AuditEntry>,
    ) -> Result<Deployment, DeploymentError> {
        for (field, value) in [
            ("component", new.component.as_str()),
            ("revision.version", new.revision.version.as_str()),
            ("revision.command", new.revision.command.as_str()),
            ("created_by", new.created_by.as_str()),
        ] {
            text_ok(field, value)?;
        }
        for a in &new.revision.args {
            text_ok("revision.args", a)?;
        }
        for (k, v) in &new.revision.env {
            text_ok("revision.env", k)?;
            text_ok("revision.env", v)?;
        }
        if new.revision.version.trim().is_empty() {
            return Err(DeploymentError::Invalid(
                "the revision needs a version label".into(),
            ));
        }
        if new.revision.command.trim().is_empty() {
            return Err(DeploymentError::Invalid(
                "the revision needs a command".into(),
            ));
        }
        let sel = &new.selector;
        if sel.hosts.is_empty() && sel.profile.is_none() && !sel.all {
            return Err(DeploymentError::Invalid(
                "the host selector is empty (hosts, profile or all)".into(),
            ));
        }
        let min_healthy_ms = duration_ms(new.min_healthy, "min_healthy")?;
        let healthy_deadline_ms = duration_ms(new.healthy_deadline, "healthy_deadline")?;
        let config = WaveConfig {
            canaries: new.canaries,
            max_parallel: new.max_parallel,
            min_healthy_ms,
            healthy_deadline_ms,
            auto_revert: new.auto_revert,
            manual_promote: new.promotion == Promotion::Manual,
        };
        let mut tx = self.pool.begin().await?;
        // Every host running the component, with the revision it runs and its profile.
        let rows: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT c.host_id, c.revision, h.profile FROM components c
             JOIN hosts h ON h.host_id = c.host_id
             WHERE c.name = $1 ORDER BY c.host_id",
        )
        .bind(&new.component)
        .fetch_all(&mut *tx)
        .await?;
        let running: BTreeMap<&str, (&str, &str)> = rows
            .iter()
            .map(|(h, r, p)| (h.as_str(), (r.as_str(), p.as_str())))
            .collect();
        let mut order: Vec<String> = Vec::new();
        for host in &sel.hosts {
            if !running.contains_key(host.as_str()) {
                return Err(DeploymentError::Invalid(format!(
                    "host {host:?} does not run {:?}",
                    new.component
                )));
            }
            if !order.contains(host) {
                order.push(host.clone());
            }
        }
        for (host, (_, profile)) in &running {
            let chosen = sel.all || sel.profile.as_deref() == Some(*profile);
            if chosen && !order.iter().any(|h| h == host) {
                order.push((*host).to_owned());
            }
        }
        // One active deployment of a component per host at a time.
        let busy: Option<(i64, String)> = sqlx::query_as(
            "SELECT d.deployment_id, h.host_id FROM deployments d
             JOIN deployment_hosts h ON h.deployment_id = d.deployment_id
             WHERE d.component = $1 AND d.state NOT IN ('succeeded', 'reverted', 'failed')
               AND h.host_id = ANY($2)
             ORDER BY d.deployment_id, h.position LIMIT 1",
        )
        .bind(&new.component)
        .bind(&order)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((other, host)) = busy {
            return Err(DeploymentError::Busy {
                other,
                component: new.component.clone(),
                host,
            });
        }
        // The machine checks the numbers (and the host list) as it will run them.
        Rollout::start(
            &new.component,
            "previous",
            &new.revision.version,
            order.clone(),
            config.clone(),
            0,
        )
        .map_err(|e| DeploymentError::Invalid(e.to_string()))?;
        let now = Utc::now();
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO deployments (component, revision, spec, selector, canaries,
                 max_parallel, min_healthy_ms, healthy_deadline_ms, auto_revert, promotion,
                 state, created_by, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'created', $11, $12, $12)
             RETURNING deployment_id",
        )
        .bind(&new.component)
        .bind(&new.revision.version)
        .bind(Json(&new.revision))
        .bind(Json(&new.selector))
        .bind(
            i32::try_from(new.canaries)
                .map_err(|_| DeploymentError::Invalid("canaries too large".into()))?,
        )
        .bind(
            i32::try_from(new.max_parallel)
                .map_err(|_| DeploymentError::Invalid("max_parallel too large".into()))?,
        )
        .bind(min_healthy_ms)
        .bind(healthy_deadline_ms)
        .bind(new.auto_revert)
        .bind(new.promotion.as_str())
        .bind(&new.created_by)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let canaries = usize::try_from(new.canaries).unwrap_or(usize::MAX);
        for (i, host) in order.iter().enumerate() {
            let from = running.get(host.as_str()).map_or("", |r| r.0);
            sqlx::query(
                "INSERT INTO deployment_hosts (deployment_id, host_id, position, canary,
                     from_revision, state, updated_at)
                 VALUES ($1, $2, $3, $4, $5, 'pending', $6)",
            )
            .bind(id)
            .bind(host)
            .bind(i32::try_from(i).unwrap_or(i32::MAX))
            .bind(i < canaries)
            .bind(from)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        if let Some(audit) = audit {
            audit
                .write(&mut tx, &format!("deployment {id}"), now)
                .await?;
        }
        tx.commit().await?;
        tracing::info!(deployment = id, component = %new.component, revision = %new.revision.version, hosts = order.len(), "deployment created");
        self.get(id).await?.ok_or(DeploymentError::NotFound(id))
    }

    /// The deployment `id` with its hosts.
    pub async fn get(&self, id: i64) -> Result<Option<Deployment>, DeploymentError> {
        let row = sqlx::query(
            "SELECT deployment_id, component, revision, spec, selector, canaries,
                 max_parallel, min_healthy_ms, healthy_deadline_ms, auto_revert, promotion,
                 state, paused, reason, created_by, created_at, updated_at, finished_at
             FROM deployments WHERE deployment_id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let mut deployment = decode_deployment(&row)?;
        deployment.hosts = self.hosts_of(id).await?;
        Ok(Some(deployment))
    }

    /// The latest `limit` deployments, newest first, with their hosts.
    pub async fn list(&self, limit: u32) -> Result<Vec<Deployment>, DeploymentError> {
        let rows = sqlx::query(
            "SELECT deployment_id, component, revision, spec, selector, canaries,
                 max_parallel, min_healthy_ms, healthy_deadline_ms, auto_revert, promotion,
                 state, paused, reason, created_by, created_at, updated_at, finished_at
             FROM deployments ORDER BY deployment_id DESC LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut d = decode_deployment(row)?;
            d.hosts = self.hosts_of(d.id).await?;
            out.push(d);
        }
        Ok(out)
    }

    async fn hosts_of(&self, id: i64) -> Result<Vec<DeploymentHost>, DeploymentError> {
        let rows = sqlx::query(
            "SELECT host_id, position, canary, from_revision, state, reason, deploying_at,
                 running_at, healthy_at, failed_at, reverting_at, reverted_at
             FROM deployment_hosts WHERE deployment_id = $1 ORDER BY position",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(DeploymentHost {
                    host: r.try_get("host_id")?,
                    position: r.try_get("position")?,
                    canary: r.try_get("canary")?,
                    from_revision: r.try_get("from_revision")?,
                    state: r.try_get("state")?,
                    reason: r.try_get("reason")?,
                    deploying_at: r.try_get("deploying_at")?,
                    running_at: r.try_get("running_at")?,
                    healthy_at: r.try_get("healthy_at")?,
                    failed_at: r.try_get("failed_at")?,
                    reverting_at: r.try_get("reverting_at")?,
                    reverted_at: r.try_get("reverted_at")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(DeploymentError::Db)
    }

    /// Holds new updates (reverts go on) with `reason` shown.
    pub async fn pause(&self, id: i64, reason: &str) -> Result<Deployment, DeploymentError> {
        self.operate(id, Op::Pause(reason.to_owned()), None).await
    }

    /// Lets a paused deployment go on.
    pub async fn resume(&self, id: i64) -> Result<Deployment, DeploymentError> {
        self.operate(id, Op::Resume, None).await
    }

    /// Rolls on past the canaries (manual promotion).
    pub async fn promote(&self, id: i64) -> Result<Deployment, DeploymentError> {
        self.operate(id, Op::Promote, None).await
    }

    /// Reverts every host that got the revision (failed hosts first, `max_parallel` at a
    /// time), also after a failure without auto-revert.
    pub async fn roll_back(&self, id: i64, reason: &str) -> Result<Deployment, DeploymentError> {
        self.operate(id, Op::RollBack(reason.to_owned()), None)
            .await
    }

    /// An operator's operation (the HTTP API): `audit` (result: the state reached) is
    /// written in the transaction of the step; a refused operation writes nothing.
    pub async fn operate_audited(
        &self,
        id: i64,
        operation: Operation,
        audit: &AuditEntry,
    ) -> Result<Deployment, DeploymentError> {
        let op = match operation {
            Operation::Pause(why) => Op::Pause(why),
            Operation::Resume => Op::Resume,
            Operation::Promote => Op::Promote,
            Operation::RollBack(why) => Op::RollBack(why),
        };
        self.operate(id, op, Some(audit)).await
    }

    /// Deployments newest first, with `deployment_id < before` when given, of one state
    /// (or `active`: not ended) and component when given.
    pub async fn list_filtered(
        &self,
        state: Option<&str>,
        component: Option<&str>,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<Deployment>, DeploymentError> {
        let rows = sqlx::query(
            "SELECT deployment_id, component, revision, spec, selector, canaries,
                 max_parallel, min_healthy_ms, healthy_deadline_ms, auto_revert, promotion,
                 state, paused, reason, created_by, created_at, updated_at, finished_at
             FROM deployments
             WHERE ($1::text IS NULL OR state = $1
                    OR ($1 = 'active' AND state NOT IN ('succeeded', 'reverted', 'failed')))
               AND ($2::text IS NULL OR component = $2)
               AND ($3::bigint IS NULL OR deployment_id < $3)
             ORDER BY deployment_id DESC LIMIT $4",
        )
        .bind(state)
        .bind(component)
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut d = decode_deployment(row)?;
            d.hosts = self.hosts_of(d.id).await?;
            out.push(d);
        }
        Ok(out)
    }

    /// Pauses every active deployment of `component` at `revision` with `reason` (the
    /// engine loop's blame rule, which rolls the blamed hosts back itself). Returns the
    /// ids paused.
    pub async fn pause_for_blame(
        &self,
        component: &str,
        revision: &str,
        reason: &str,
    ) -> Result<Vec<i64>, DeploymentError> {
        let ids: Vec<i64> = sqlx::query_scalar(
            "SELECT deployment_id FROM deployments
             WHERE component = $1 AND revision = $2
               AND state NOT IN ('succeeded', 'reverted', 'failed')
             ORDER BY deployment_id",
        )
        .bind(component)
        .bind(revision)
        .fetch_all(&self.pool)
        .await?;
        let mut paused = Vec::new();
        for id in ids {
            match self.operate(id, Op::Pause(reason.to_owned()), None).await {
                Ok(_) => paused.push(id),
                // Ended meanwhile: nothing to pause.
                Err(DeploymentError::State { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(paused)
    }

    async fn operate(
        &self,
        id: i64,
        op: Op,
        audit: Option<&AuditEntry>,
    ) -> Result<Deployment, DeploymentError> {
        let mut tx = self.pool.begin().await?;
        self.step(&mut tx, id, Some(op), false).await?;
        if let Some(audit) = audit {
            let state: String =
                sqlx::query_scalar("SELECT state FROM deployments WHERE deployment_id = $1")
                    .bind(id)
                    .fetch_one(&mut *tx)
                    .await?;
            audit
                .write(&mut tx, &format!("deployment {id} {state}"), Utc::now())
                .await?;
        }
        tx.commit().await?;
        self.get(id).await?.ok_or(DeploymentError::NotFound(id))
    }

    /// One driver pass over every active deployment; returns how many were stepped.
    pub async fn drive_once(&self) -> Result<usize, DeploymentError> {
        let ids: Vec<i64> = sqlx::query_scalar(
            "SELECT deployment_id FROM deployments
             WHERE state NOT IN ('succeeded', 'reverted', 'failed') ORDER BY deployment_id",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut stepped = 0;
        for id in ids {
            let mut tx = self.pool.begin().await?;
            if self.step(&mut tx, id, None, true).await? {
                stepped += 1;
            }
            tx.commit().await?;
        }
        let counts: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, count(*) FROM deployments GROUP BY state")
                .fetch_all(&self.pool)
                .await?;
        for state in STATES {
            let n = counts.iter().find(|c| c.0 == state).map_or(0, |c| c.1);
            self.metrics.by_state.with_label_values(&[state]).set(n);
        }
        Ok(stepped)
    }

    /// The driver: [`Deployments::drive_once`] every tick until `stop` is set. An error
    /// ends the run (its supervisor logs, counts and restarts it).
    pub async fn run(
        self,
        mut stop: watch::Receiver<bool>,
        beat: Beat,
    ) -> Result<(), DeploymentError> {
        let mut tick = tokio::time::interval(self.settings.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if *stop.borrow_and_update() {
                return Ok(());
            }
            tokio::select! {
                _ = tick.tick() => {}
                changed = stop.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    continue;
                }
            }
            self.drive_once().await?;
            beat.ok();
        }
    }

    /// Steps deployment `id` in `tx`: the operation (if any), what the hosts report, a
    /// tick; carries out the machine's actions and stores the result. `skip_locked`:
    /// leave a row another transaction holds (false: wait for it). Returns false when
    /// skipped or already ended.
    async fn step(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        id: i64,
        op: Option<Op>,
        skip_locked: bool,
    ) -> Result<bool, DeploymentError> {
        let lock = if skip_locked {
            " FOR UPDATE SKIP LOCKED"
        } else {
            " FOR UPDATE"
        };
        let row = sqlx::query(&format!(
            "SELECT deployment_id, component, revision, spec, selector, canaries,
                 max_parallel, min_healthy_ms, healthy_deadline_ms, auto_revert, promotion,
                 state, paused, reason, created_by, created_at, updated_at, finished_at, rollout
             FROM deployments WHERE deployment_id = $1{lock}"
        ))
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?;
        let Some(row) = row else {
            return if skip_locked {
                Ok(false)
            } else {
                Err(DeploymentError::NotFound(id))
            };
        };
        let deployment = decode_deployment(&row)?;
        let corrupt = |reason: String| DeploymentError::Corrupt { id, reason };
        let rolls_back_failed = deployment.state == "failed" && matches!(op, Some(Op::RollBack(_)));
        if terminal(&deployment.state) && !rolls_back_failed {
            return match op {
                None => Ok(false),
                Some(_) => Err(DeploymentError::State {
                    id,
                    state: deployment.state.clone(),
                    reason: "it has ended".into(),
                }),
            };
        }
        let now = Utc::now();
        let now_ms = ms(now);
        let hosts: BTreeMap<String, HostRow> = {
            let rows = sqlx::query(
                "SELECT host_id, from_revision, state, command_id, reason
                 FROM deployment_hosts WHERE deployment_id = $1 ORDER BY position",
            )
            .bind(id)
            .fetch_all(&mut **tx)
            .await?;
            let mut hosts = BTreeMap::new();
            for r in &rows {
                let raw: Option<Vec<u8>> = r.try_get("command_id")?;
                let command_id = match raw {
                    Some(raw) => Some(
                        CommandId::try_from(raw.as_slice())
                            .map_err(|_| corrupt("a command id is not 16 bytes".into()))?,
                    ),
                    None => None,
                };
                hosts.insert(
                    r.try_get::<String, _>("host_id")?,
                    HostRow {
                        from_revision: r.try_get("from_revision")?,
                        state: r.try_get("state")?,
                        command_id,
                        reason: r.try_get("reason")?,
                    },
                );
            }
            hosts
        };
        let mut reason = deployment.reason.clone();
        let mut host_reasons: BTreeMap<String, String> = BTreeMap::new();
        let mut actions = Vec::new();
        let stored: Option<Json<Rollout>> = row.try_get("rollout")?;
        if stored.is_none() {
            // Not started yet: a pause holds the start itself, a roll back ends it.
            let set = |state: &'static str, paused: bool, reason: Option<String>| {
                sqlx::query(
                    "UPDATE deployments SET state = $2, paused = $3, reason = $4,
                         updated_at = $5,
                         finished_at = CASE WHEN $2 = 'reverted' THEN $5 ELSE NULL END
                     WHERE deployment_id = $1",
                )
                .bind(id)
                .bind(state)
                .bind(paused)
                .bind(reason)
                .bind(now)
            };
            match &op {
                Some(Op::Pause(why)) => {
                    set("paused", true, Some(cap(format!("paused: {why}"))))
                        .execute(&mut **tx)
                        .await?;
                    return Ok(true);
                }
                Some(Op::Resume) if deployment.paused => {
                    set("created", false, None).execute(&mut **tx).await?;
                    return Ok(true);
                }
                Some(Op::RollBack(why)) => {
                    let why = cap(format!("rolled back before it started: {why}"));
                    set("reverted", false, Some(why)).execute(&mut **tx).await?;
                    return Ok(true);
                }
                None if deployment.paused => return Ok(false),
                _ => {}
            }
        }
        let mut rollout = match stored {
            Some(Json(r)) => r,
            None => {
                let order: Vec<String> = {
                    let mut rows: Vec<(i32, String)> = sqlx::query_as(
                        "SELECT position, host_id FROM deployment_hosts
                         WHERE deployment_id = $1 ORDER BY position",
                    )
                    .bind(id)
                    .fetch_all(&mut **tx)
                    .await?;
                    rows.sort();
                    rows.into_iter().map(|r| r.1).collect()
                };
                let config = WaveConfig {
                    canaries: deployment.canaries,
                    max_parallel: deployment.max_parallel,
                    min_healthy_ms: deployment.min_healthy_ms,
                    healthy_deadline_ms: deployment.healthy_deadline_ms,
                    auto_revert: deployment.auto_revert,
                    manual_promote: deployment.promotion == "manual",
                };
                let (r, first) = Rollout::start(
                    &deployment.component,
                    "previous",
                    &deployment.revision,
                    order,
                    config,
                    now_ms,
                )
                .map_err(|e| corrupt(e.to_string()))?;
                actions.extend(first);
                r
            }
        };
        let mut refusal: Option<DeployError> = None;
        match op {
            None => {}
            Some(Op::Pause(why)) => {
                reason = Some(cap(format!("paused: {why}")));
                actions.extend(self.input(&mut rollout, &DeployInput::Pause, now_ms));
            }
            Some(Op::Resume) => {
                if !rollout.paused {
                    return Err(DeploymentError::State {
                        id,
                        state: deployment.state,
                        reason: "it is not paused".into(),
                    });
                }
                reason = None;
                actions.extend(self.input(&mut rollout, &DeployInput::Resume, now_ms));
            }
            Some(Op::Promote) => match rollout.step(&DeployInput::Promote, now_ms) {
                Ok(a) => actions.extend(a),
                Err(e) => refusal = Some(e),
            },
            Some(Op::RollBack(why)) => {
                if matches!(rollout.phase, Phase::Reverting | Phase::Reverted) {
                    return Err(DeploymentError::State {
                        id,
                        state: deployment.state,
                        reason: "it is already reverting".into(),
                    });
                }
                reason = Some(cap(format!("rolled back: {why}")));
                actions.extend(rollout.revert());
                actions.extend(self.input(&mut rollout, &DeployInput::Tick, now_ms));
            }
        }
        if let Some(e) = refusal {
            return Err(DeploymentError::State {
                id,
                state: deployment.state,
                reason: e.to_string(),
            });
        }
        // What the hosts report.
        let components: BTreeMap<String, ComponentRow> = {
            let rows: Vec<(String, String, String)> = sqlx::query_as(
                "SELECT c.host_id, c.state, c.revision FROM components c
                 JOIN deployment_hosts d ON d.host_id = c.host_id
                 WHERE d.deployment_id = $1 AND c.name = $2",
            )
            .bind(id)
            .bind(&deployment.component)
            .fetch_all(&mut **tx)
            .await?;
            rows.into_iter()
                .map(|(h, state, revision)| (h, ComponentRow { state, revision }))
                .collect()
        };
        let to = deployment.revision.clone();
        let phases: Vec<(String, HostPhase)> =
            rollout.hosts.iter().map(|(h, p)| (h.clone(), *p)).collect();
        for (host, phase) in phases {
            let Some(row) = hosts.get(&host) else {
                continue;
            };
            let component = components.get(&host);
            let command = match row.command_id {
                Some(cid) => self.dispatch.command(&cid).await?,
                None => None,
            };
            let on_new = component.is_some_and(|c| c.revision == to);
            let input = match phase {
                HostPhase::Updating { .. } | HostPhase::Running { .. } | HostPhase::Done => {
                    let command_failed = command.as_ref().and_then(|c| {
                        matches!(c.state, CommandState::Failed | CommandState::Expired).then(|| {
                            format!(
                                "deploy command {}: {}",
                                c.state.as_str(),
                                c.message.clone().unwrap_or_default()
                            )
                        })
                    });
                    let failing = component
                        .filter(|c| on_new && FAILING.contains(&c.state.as_str()))
                        .map(|c| {
                            format!("{} is {} on {to} on {host}", deployment.component, c.state)
                        });
                    let succeeded = command
                        .as_ref()
                        .is_some_and(|c| c.state == CommandState::Succeeded);
                    if let Some(why) = command_failed.or(failing) {
                        Some(DeployInput::HostFailed {
                            host: host.clone(),
                            reason: why,
                        })
                    } else if matches!(phase, HostPhase::Updating { .. })
                        && succeeded
                        && on_new
                        && component.is_some_and(|c| c.state == "ready")
                    {
                        self.metrics.step("deploy", "started");
                        Some(DeployInput::HostStarted { host: host.clone() })
                    } else {
                        None
                    }
                }
                HostPhase::Reverting => {
                    if let Some(c) = command
                        .as_ref()
                        .filter(|c| matches!(c.state, CommandState::Failed | CommandState::Expired))
                    {
                        // The host cannot be brought back by the deployment: it stops,
                        // failed, for an operator.
                        let why = cap(format!(
                            "revert of {host} {}: {}",
                            c.state.as_str(),
                            c.message.clone().unwrap_or_default()
                        ));
                        self.metrics.step("revert", "failed");
                        host_reasons.insert(host.clone(), why.clone());
                        reason = Some(why);
                        rollout.phase = Phase::Failed;
                        None
                    } else if component
                        .is_some_and(|c| c.revision == row.from_revision && c.state == "ready")
                        && command
                            .as_ref()
                            .is_some_and(|c| c.state == CommandState::Succeeded)
                    {
                        self.metrics.step("revert", "reverted");
                        Some(DeployInput::HostReverted { host: host.clone() })
                    } else {
                        None
                    }
                }
                _ => None,
            };
            if let Some(input) = input {
                if let DeployInput::HostFailed { reason: why, .. } = &input {
                    self.metrics.step("deploy", "failed");
                    let why = cap(why.clone());
                    host_reasons.insert(host.clone(), why.clone());
                    if !matches!(
                        rollout.phase,
                        Phase::Reverting | Phase::Reverted | Phase::Failed
                    ) {
                        let canary =
                            rollout
                                .order
                                .iter()
                                .position(|h| *h == host)
                                .is_some_and(|i| {
                                    i < usize::try_from(rollout.config.canaries).unwrap_or(0)
                                });
                        let then = if rollout.config.auto_revert {
                            "reverting"
                        } else {
                            "stopped"
                        };
                        let what = if canary { "canary" } else { "host" };
                        reason = Some(cap(format!("{what} {host} failed: {why}; {then}")));
                    }
                }
                actions.extend(self.input(&mut rollout, &input, now_ms));
            }
        }
        // Hosts the tick will fail for their healthy deadline (as the machine rules).
        let (min, deadline) = (
            rollout.config.min_healthy_ms,
            rollout.config.healthy_deadline_ms,
        );
        for (host, phase) in &rollout.hosts {
            let late = match *phase {
                HostPhase::Updating { since } => now_ms.saturating_sub(since) >= deadline,
                HostPhase::Running { since, running } => {
                    now_ms.saturating_sub(running) < min && now_ms.saturating_sub(since) >= deadline
                }
                _ => false,
            };
            if late && !host_reasons.contains_key(host) {
                let why = format!(
                    "{} not healthy on {to} on {host} within {deadline} ms",
                    deployment.component
                );
                self.metrics.step("deploy", "failed");
                if !matches!(rollout.phase, Phase::Reverting | Phase::Failed) {
                    let then = if rollout.config.auto_revert {
                        "reverting"
                    } else {
                        "stopped"
                    };
                    reason = Some(cap(format!("{why}; {then}")));
                }
                host_reasons.insert(host.clone(), why);
            }
        }
        actions.extend(self.input(&mut rollout, &DeployInput::Tick, now_ms));
        // Carry out the actions (a refused update fails its host: the machine's answer
        // joins the queue).
        let mut sent: BTreeMap<String, CommandId> = BTreeMap::new();
        let mut queue: std::collections::VecDeque<DeployAction> = actions.into();
        while let Some(action) = queue.pop_front() {
            match &action {
                DeployAction::Update { host, .. } => {
                    let request = CommandRequest {
                        host: host.clone(),
                        action: CommandAction::DeployRevision {
                            component: deployment.component.clone(),
                            revision: deployment.spec.clone(),
                        },
                        deadline: now + self.command_deadline(),
                        caller: CALLER.into(),
                        idempotency_key: Some(format!("deployment/{id}/{host}/deploy")),
                        request_id: None,
                    };
                    match self.dispatch.submit(request).await {
                        Ok(record) => {
                            self.metrics.step("deploy", "sent");
                            sent.insert(host.clone(), record.id);
                        }
                        Err(DispatchError::Db(e)) => return Err(DeploymentError::Db(e)),
                        Err(e) => {
                            // Refused (the host no longer runs it...): that host fails.
                            let why = cap(format!("deploy refused: {e}"));
                            host_reasons.insert(host.clone(), why.clone());
                            let failed = DeployInput::HostFailed {
                                host: host.clone(),
                                reason: why,
                            };
                            if !matches!(
                                rollout.phase,
                                Phase::Reverting | Phase::Reverted | Phase::Failed
                            ) {
                                reason = Some(cap(format!("host {host} failed: {e}")));
                            }
                            queue.extend(self.input(&mut rollout, &failed, now_ms));
                        }
                    }
                }
                DeployAction::Revert { host, .. } => {
                    let from = hosts
                        .get(host)
                        .map(|h| h.from_revision.clone())
                        .filter(|r| !r.is_empty())
                        .unwrap_or_else(|| "previous".into());
                    let request = CommandRequest {
                        host: host.clone(),
                        action: CommandAction::Rollback {
                            component: deployment.component.clone(),
                            revision: from,
                        },
                        deadline: now + self.command_deadline(),
                        caller: CALLER.into(),
                        idempotency_key: Some(format!("deployment/{id}/{host}/revert")),
                        request_id: None,
                    };
                    match self.dispatch.submit(request).await {
                        Ok(record) => {
                            self.metrics.step("revert", "sent");
                            sent.insert(host.clone(), record.id);
                        }
                        Err(DispatchError::Db(e)) => return Err(DeploymentError::Db(e)),
                        Err(e) => {
                            // Refused (the host no longer runs the component...): the
                            // deployment cannot bring it back; it stops for an operator.
                            let why = cap(format!("revert of {host} refused: {e}"));
                            self.metrics.step("revert", "failed");
                            host_reasons.insert(host.clone(), why.clone());
                            reason = Some(why);
                            rollout.phase = Phase::Failed;
                        }
                    }
                }
                DeployAction::Phase(phase) => {
                    tracing::info!(deployment = id, component = %deployment.component, revision = %to, ?phase, "deployment phase");
                }
            }
        }
        // Store it.
        let state = state_of(&rollout);
        if state == "succeeded" {
            reason = None;
        }
        let finished = terminal(state).then_some(now);
        sqlx::query(
            "UPDATE deployments SET state = $2, paused = $3, reason = $4, rollout = $5,
                 updated_at = $6, finished_at = COALESCE(finished_at, $7)
             WHERE deployment_id = $1",
        )
        .bind(id)
        .bind(state)
        .bind(rollout.paused)
        .bind(&reason)
        .bind(Json(&rollout))
        .bind(now)
        .bind(finished)
        .execute(&mut **tx)
        .await?;
        for (host, phase) in &rollout.hosts {
            let Some(row) = hosts.get(host) else { continue };
            let new_state = host_state(phase);
            let running = matches!(phase, HostPhase::Running { .. } | HostPhase::Done);
            let new_reason = host_reasons.get(host).cloned().or(row.reason.clone());
            let command = sent.get(host).copied().or(row.command_id);
            if new_state == row.state
                && new_reason == row.reason
                && command == row.command_id
                && !running
            {
                continue;
            }
            if new_state == "healthy" && row.state != "healthy" {
                self.metrics.step("deploy", "healthy");
            }
            sqlx::query(
                "UPDATE deployment_hosts SET state = $3, reason = $4, command_id = $5,
                     deploying_at = CASE WHEN $3 = 'deploying' THEN COALESCE(deploying_at, $6) ELSE deploying_at END,
                     running_at = CASE WHEN $7 THEN COALESCE(running_at, $6) ELSE running_at END,
                     healthy_at = CASE WHEN $3 = 'healthy' THEN COALESCE(healthy_at, $6) ELSE healthy_at END,
                     failed_at = CASE WHEN $3 = 'failed' OR ($3 = 'reverting' AND $8) THEN COALESCE(failed_at, $6) ELSE failed_at END,
                     reverting_at = CASE WHEN $3 = 'reverting' THEN COALESCE(reverting_at, $6) ELSE reverting_at END,
                     reverted_at = CASE WHEN $3 = 'reverted' THEN COALESCE(reverted_at, $6) ELSE reverted_at END,
                     updated_at = $6
                 WHERE deployment_id = $1 AND host_id = $2",
            )
            .bind(id)
            .bind(host)
            .bind(new_state)
            .bind(&new_reason)
            .bind(command.map(|c| c.to_vec()))
            .bind(now)
            .bind(running)
            .bind(host_reasons.contains_key(host))
            .execute(&mut **tx)
            .await?;
        }
        Ok(true)
    }

    fn command_deadline(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.settings.command_deadline)
            .unwrap_or_else(|_| chrono::Duration::minutes(10))
    }

    /// Steps the machine; an input that does not apply is logged and dropped (only
    /// operator inputs are refused, by the caller).
    fn input(&self, rollout: &mut Rollout, input: &DeployInput, now: i64) -> Vec<DeployAction> {
        match rollout.step(input, now) {
            Ok(actions) => actions,
            Err(error) => {
                tracing::warn!(%error, ?input, "deployment input not applied");
                Vec::new()
            }
        }
    }
}

fn decode_deployment(row: &sqlx::postgres::PgRow) -> Result<Deployment, DeploymentError> {
    let id: i64 = row.try_get("deployment_id")?;
    let corrupt = |reason: &str| DeploymentError::Corrupt {
        id,
        reason: reason.to_owned(),
    };
    let Json(spec): Json<RevisionSpec> = row.try_get("spec")?;
    let Json(selector): Json<HostSelector> = row.try_get("selector")?;
    let canaries: i32 = row.try_get("canaries")?;
    let max_parallel: i32 = row.try_get("max_parallel")?;
    Ok(Deployment {
        id,
        component: row.try_get("component")?,
        revision: row.try_get("revision")?,
        spec,
        selector,
        canaries: u32::try_from(canaries).map_err(|_| corrupt("negative canaries"))?,
        max_parallel: u32::try_from(max_parallel).map_err(|_| corrupt("negative max_parallel"))?,
        min_healthy_ms: row.try_get("min_healthy_ms")?,
        healthy_deadline_ms: row.try_get("healthy_deadline_ms")?,
        auto_revert: row.try_get("auto_revert")?,
        promotion: row.try_get("promotion")?,
        state: row.try_get("state")?,
        paused: row.try_get("paused")?,
        reason: row.try_get("reason")?,
        created_by: row.try_get("created_by")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        finished_at: row.try_get("finished_at")?,
        hosts: Vec::new(),
    })
}

/// The engine's blame rule pauses the deployments of a blamed revision through this.
impl crate::engine_loop::DeploymentHooks for Deployments {
    fn pause_for_blame<'a>(
        &'a self,
        component: &'a str,
        revision: &'a str,
        decision_id: i64,
    ) -> futures::future::BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let reason = format!(
                "decision #{decision_id}: revision {revision} of {component} blamed for failures"
            );
            Deployments::pause_for_blame(self, component, revision, &reason)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(phase: Phase, paused: bool) -> Rollout {
        let config = WaveConfig {
            canaries: 1,
            max_parallel: 1,
            min_healthy_ms: 1,
            healthy_deadline_ms: 2,
            auto_revert: true,
            manual_promote: false,
        };
        let (mut r, _) = Rollout::start("c", "v1", "v2", vec!["h".into()], config, 0)
            .unwrap_or_else(|e| panic!("{e}"));
        r.phase = phase;
        r.paused = paused;
        r
    }

    #[test]
    fn stored_states_pause_only_a_running_rollout() {
        let cases = [
            (Phase::Canary, false, "canary"),
            (Phase::Canary, true, "paused"),
            (Phase::AwaitingPromotion, false, "waiting_promotion"),
            (Phase::Rolling, true, "paused"),
            (Phase::Reverting, true, "reverting"),
            (Phase::Reverted, true, "reverted"),
            (Phase::Succeeded, false, "succeeded"),
            (Phase::Failed, true, "failed"),
        ];
        for (phase, paused, want) in cases {
            let got = state_of(&rollout(phase.clone(), paused));
            assert_eq!(got, want, "{phase:?} paused={paused}");
            assert!(STATES.contains(&got));
        }
    }

    #[test]
    fn reasons_are_capped_at_a_character_boundary_without_nul() {
        let long = format!("{}\0{}", "é".repeat(MAX_REASON_BYTES), "x");
        let capped = cap(long);
        assert!(capped.len() <= MAX_REASON_BYTES);
        assert!(!capped.contains('\0'));
    }
}
