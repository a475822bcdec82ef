//! Commands to agents (dispatch): typed commands addressed to a host and, where it
//! applies, a component, persisted in PostgreSQL before they are sent.
//!
//! Life of a command (`commands` table, migration 0004):
//! `queued` (persisted, not handed to a connection) → `sent` (handed to the host's live
//! connection; `attempts` counts the hand-overs) → `succeeded` | `failed` | `expired`.
//!
//! - [`Dispatch::submit`] refuses an unknown host, component or command (for
//!   `CancelTail`), a deadline already past and text PostgreSQL cannot store, with the
//!   reason; it persists the command as `queued` **before** sending it, then hands it to
//!   the host's live connection if there is one (`sent`). The same idempotency key from
//!   the same caller returns the existing command and sends nothing.
//! - On every Welcome of a host (`ingest.rs`), its `queued` and `sent` commands are
//!   delivered again in creation order; the agent executes an id at most once and
//!   answers a redelivery with the original outcome (`Duplicate`), so delivering twice is
//!   safe. A `queued` command past its deadline is `expired` (never delivered, so never
//!   run). A `sent` one past its deadline is still delivered for a grace
//!   ([`IngestConfig::command_result_grace`](crate::server::IngestConfig)): if the agent
//!   ran it, its answer tells the real outcome; past the grace it is `expired` too. A
//!   periodic sweep does the same expiry for hosts that stay away, and hands a command
//!   still `queued` while its host is connected (its connection's queue was full, or
//!   reading it at the Welcome failed) to the connection.
//! - The first result from the agent settles the command (outcome, the agent's finish
//!   time, message); a `Duplicate` answer stores the original outcome parsed from its
//!   message prefix and sets `duplicate`. Later results and results for ids this host
//!   does not have are counted and ignored.
//!
//! - GPU commands name their GPU by index or UUID ([`GpuRef`]); submit resolves it
//!   against the host's `gpus` table (its last inventory) and stores the index, or
//!   refuses an unknown GPU with the reason.
//! - Version 3 commands ([`CommandAction::min_version`]) are refused at submit while the
//!   host's last session negotiated an older version; one already queued that meets an
//!   older session (an agent downgraded since) is not sent: it is settled `failed` with
//!   the reason on that connection.
//!
//! The decisions (what a command targets, how a result settles it) are pure functions
//! at the bottom; the [`Ledger`] is the only code that touches the table.

use crate::server::{Delivery, Shared};
use crate::store::audit::AuditEntry;
use chrono::{DateTime, Utc};
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use razar_shared::domain::GpuRef;
use razar_shared::protocol::{Command, CommandAction, CommandId, CommandOutcome, CommandResult};
use sqlx::postgres::{PgPool, PgRow};
use sqlx::types::Json;
use sqlx::Row;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

/// Longest message stored with a result (bytes, cut at a character boundary).
const MAX_MESSAGE_BYTES: usize = 4096;

/// Longest caller, idempotency key or request id accepted (bytes).
const MAX_KEY_BYTES: usize = 256;

/// Why a command was refused or could not be recorded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DispatchError {
    /// No agent with this host id ever connected.
    #[error("unknown host {host:?}")]
    UnknownHost { host: String },
    /// The host has no component of this name (as its last inventory says).
    #[error("host {host:?} has no component {component:?}")]
    UnknownComponent { host: String, component: String },
    /// The host has no GPU with this index or UUID (as its last inventory says).
    #[error("host {host:?} has no GPU {gpu:?} (by index or UUID)")]
    UnknownGpu { host: String, gpu: String },
    /// The host's agent (its last session) speaks a protocol older than the command.
    #[error("host {host:?}'s agent speaks protocol {version}; {kind} needs {needed} (upgrade the agent)")]
    AgentTooOld {
        host: String,
        kind: &'static str,
        version: u16,
        needed: u16,
    },
    /// A `CancelTail` names a command this host never had.
    #[error("host {host:?} has no command {command}")]
    UnknownCommand { host: String, command: String },
    /// The deadline is not in the future.
    #[error("the deadline {deadline} has already passed")]
    DeadlinePassed { deadline: DateTime<Utc> },
    /// A text field cannot be stored (a NUL character, or too long).
    #[error("{field}: {reason}")]
    InvalidText {
        field: &'static str,
        reason: &'static str,
    },
    /// The idempotency key was used by this caller for a different command.
    #[error("idempotency key {key:?} of caller {caller:?} was used for a different command")]
    IdempotencyConflict { caller: String, key: String },
    /// A stored row does not decode (written by something else than this module).
    #[error("stored command {id}: {reason}")]
    Corrupt { id: String, reason: String },
    /// The database refused or could not be reached.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

/// Where a command stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandState {
    /// Persisted; not handed to a connection yet.
    Queued,
    /// Handed to the host's live connection; no result yet.
    Sent,
    Succeeded,
    Failed,
    /// Its deadline passed before it ran (or before a result could be had).
    Expired,
}

impl CommandState {
    /// The name stored in the `state` column.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandState::Queued => "queued",
            CommandState::Sent => "sent",
            CommandState::Succeeded => "succeeded",
            CommandState::Failed => "failed",
            CommandState::Expired => "expired",
        }
    }

    /// The state named `s` (as stored).
    pub fn parse(s: &str) -> Option<CommandState> {
        Some(match s {
            "queued" => CommandState::Queued,
            "sent" => CommandState::Sent,
            "succeeded" => CommandState::Succeeded,
            "failed" => CommandState::Failed,
            "expired" => CommandState::Expired,
            _ => return None,
        })
    }

    /// Whether the command is settled (no delivery any more).
    pub fn is_final(self) -> bool {
        !matches!(self, CommandState::Queued | CommandState::Sent)
    }
}

/// What a caller asks for.
#[derive(Debug, Clone)]
pub struct CommandRequest {
    pub host: String,
    pub action: CommandAction,
    /// After this instant the command is not started any more.
    pub deadline: DateTime<Utc>,
    /// Who asks (an operator's name, `engine`): idempotency keys are unique per caller.
    pub caller: String,
    /// The same key from the same caller returns the existing command.
    pub idempotency_key: Option<String>,
    /// The caller's request id, stored for tracing.
    pub request_id: Option<String>,
}

/// A command as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandRecord {
    pub id: CommandId,
    pub host: String,
    /// Stable snake_case kind ([`kind`]).
    pub kind: String,
    pub component: Option<String>,
    pub gpu: Option<u32>,
    pub action: CommandAction,
    pub state: CommandState,
    pub caller: String,
    pub idempotency_key: Option<String>,
    pub request_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub deadline: DateTime<Utc>,
    /// Why it ended as it did (the agent's message, or the collector's for an expiry).
    pub message: Option<String>,
    /// Times it was handed to a connection.
    pub attempts: u32,
    /// The outcome came from the answer to a redelivery (the agent had run it before).
    pub duplicate: bool,
}

impl CommandRecord {
    /// The command as the wire carries it.
    pub fn command(&self) -> Command {
        Command {
            id: self.id,
            deadline_ms: self.deadline.timestamp_millis(),
            action: self.action.clone(),
        }
    }
}

/// The dispatch metrics, registered with the ingest metrics.
#[derive(Debug, Clone)]
pub struct DispatchMetrics {
    /// `razar_collector_commands_total{kind,result}`: commands settled
    /// (`succeeded`, `failed`, `expired`) or refused at submission (`refused`).
    pub commands: IntCounterVec,
    /// `razar_collector_commands_submitted_total{kind}`: commands persisted.
    pub submitted: IntCounterVec,
    /// `razar_collector_command_deliveries_total{via}`: hand-overs to a live connection,
    /// at submission (`submit`) or on a host's (re)connect (`reconnect`).
    pub deliveries: IntCounterVec,
    /// `razar_collector_command_deliveries_dropped_total`: hand-overs refused because
    /// the connection's command queue was full (delivered on the next reconnect).
    pub deliveries_dropped: prometheus::IntCounter,
    /// `razar_collector_command_results_duplicate_total`: results answering a
    /// redelivery (`Duplicate`) that settled a command.
    pub results_duplicate: prometheus::IntCounter,
    /// `razar_collector_command_results_ignored_total{reason}`: results for an id the
    /// host does not have (`unknown`) or for a command already settled (`settled`).
    pub results_ignored: IntCounterVec,
    /// `razar_collector_commands_pending`: commands `queued` or `sent` at the last sweep.
    pub pending: IntGauge,
}

impl DispatchMetrics {
    pub(crate) fn new(registry: &Registry) -> Result<DispatchMetrics, prometheus::Error> {
        let m = DispatchMetrics {
            commands: IntCounterVec::new(
                Opts::new(
                    "razar_collector_commands_total",
                    "Commands settled (succeeded, failed, expired) or refused at submission, by kind.",
                ),
                &["kind", "result"],
            )?,
            submitted: IntCounterVec::new(
                Opts::new(
                    "razar_collector_commands_submitted_total",
                    "Commands persisted for delivery, by kind.",
                ),
                &["kind"],
            )?,
            deliveries: IntCounterVec::new(
                Opts::new(
                    "razar_collector_command_deliveries_total",
                    "Commands handed to a live agent connection, at submission or on reconnect.",
                ),
                &["via"],
            )?,
            deliveries_dropped: prometheus::IntCounter::new(
                "razar_collector_command_deliveries_dropped_total",
                "Commands not handed to a connection whose command queue was full (delivered on reconnect).",
            )?,
            results_duplicate: prometheus::IntCounter::new(
                "razar_collector_command_results_duplicate_total",
                "Command results answering a redelivery (the agent had run it) that settled a command.",
            )?,
            results_ignored: IntCounterVec::new(
                Opts::new(
                    "razar_collector_command_results_ignored_total",
                    "Command results ignored: unknown id for the host, or command already settled.",
                ),
                &["reason"],
            )?,
            pending: IntGauge::new(
                "razar_collector_commands_pending",
                "Commands queued or sent without a result, at the last sweep.",
            )?,
        };
        registry.register(Box::new(m.commands.clone()))?;
        registry.register(Box::new(m.submitted.clone()))?;
        registry.register(Box::new(m.deliveries.clone()))?;
        registry.register(Box::new(m.deliveries_dropped.clone()))?;
        registry.register(Box::new(m.results_duplicate.clone()))?;
        registry.register(Box::new(m.results_ignored.clone()))?;
        registry.register(Box::new(m.pending.clone()))?;
        Ok(m)
    }

    fn settled(&self, kind: &str, state: CommandState) {
        self.commands
            .with_label_values(&[kind, state.as_str()])
            .inc();
    }
}

/// How a command was handed to a connection (the `via` label).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Via {
    /// At submission, the host being connected.
    Submit,
    /// On the host's Welcome.
    Reconnect,
    /// By the sweep: still `queued` while its host is connected (its queue was full at
    /// submission, or reading it at the Welcome failed).
    Sweep,
}

impl Via {
    fn label(self) -> &'static str {
        match self {
            Via::Submit => "submit",
            Via::Reconnect => "reconnect",
            Via::Sweep => "sweep",
        }
    }
}

/// The `commands` table: every read and write of it.
#[derive(Debug, Clone)]
pub(crate) struct Ledger {
    pool: PgPool,
    metrics: DispatchMetrics,
    /// How long past its deadline a `sent` command is still delivered to learn its
    /// outcome.
    result_grace: Duration,
}

const COLUMNS: &str = "command_id, host_id, kind, component, gpu, action, state, caller, \
     idempotency_key, request_id, created_at, sent_at, finished_at, deadline, message, \
     attempts, duplicate";

/// A command's checks, one row: the host is known (`host`), so is its component
/// (`component`), its agent's protocol (`protocol`, only when `{need}`: the action needs
/// more than the oldest), the GPU's index (`gpu`, by index or UUID), and the command a
/// `resolve` names (`command`). The placeholders become parameters: [`CHECKS_SQL`] on
/// its own, [`INSERT_SQL`] as its subquery.
const CHECKS_TEMPLATE: &str = "SELECT EXISTS (SELECT 1 FROM hosts WHERE host_id = {host}) AS host,
        ({component}::text IS NULL
         OR EXISTS (SELECT 1 FROM components WHERE host_id = {host} AND name = {component}))
            AS component,
        CASE WHEN {need} THEN
            (SELECT protocol_version FROM agent_sessions WHERE host_id = {host}
             ORDER BY connected_at DESC, session_id DESC LIMIT 1)
        END AS protocol,
        (SELECT gpu_index FROM gpus
         WHERE host_id = {host}
           AND (gpu_index = {gpu_index}::int OR lower(uuid) = lower({gpu_uuid}::text))
         ORDER BY gpu_index LIMIT 1) AS gpu,
        ({command}::bytea IS NULL
         OR EXISTS (SELECT 1 FROM commands WHERE host_id = {host} AND command_id = {command}))
            AS command";

/// [`CHECKS_TEMPLATE`] with these parameters.
fn checks_sql(params: [&str; 6]) -> String {
    let [host, component, need, index, uuid, command] = params;
    CHECKS_TEMPLATE
        .replace("{host}", host)
        .replace("{component}", component)
        .replace("{need}", need)
        .replace("{gpu_index}", index)
        .replace("{gpu_uuid}", uuid)
        .replace("{command}", command)
}

/// The checks alone: `$1` host, `$2` component, `$3` whether the protocol matters, `$4`
/// GPU index, `$5` GPU UUID, `$6` the named command's id.
static CHECKS_SQL: LazyLock<String> =
    LazyLock::new(|| checks_sql(["$1", "$2", "$3", "$4", "$5", "$6"]));

/// The insert of a command where every check holds, the GPU index resolved: `$1` id,
/// `$2` host, `$3` kind, `$4` component, `$5` action, `$6` caller, `$7` idempotency key,
/// `$8` request id, `$9` created, `$10` deadline, `$11` whether the protocol matters,
/// `$12` the protocol needed, `$13` GPU index, `$14` GPU UUID, `$15` whether a GPU is
/// named, `$16` the named command's id.
static INSERT_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO commands (command_id, host_id, kind, component, gpu, action, state, \
             caller, idempotency_key, request_id, created_at, deadline)
         SELECT $1, $2, $3, $4, c.gpu, $5, 'queued', $6, $7, $8, $9, $10
         FROM ({}) c
         WHERE c.host AND c.component AND (c.protocol IS NULL OR c.protocol >= $12)
           AND (NOT $15 OR c.gpu IS NOT NULL) AND c.command
         ON CONFLICT (caller, idempotency_key) DO NOTHING
         RETURNING {COLUMNS}",
        checks_sql(["$2", "$4", "$11", "$13", "$14", "$16"])
    )
});

/// The values a command's checks are made of.
struct Checks<'a> {
    /// The protocol version the action needs.
    needed: u16,
    need_version: bool,
    gpu_by_index: Option<i32>,
    gpu_by_uuid: Option<&'a str>,
}

impl<'a> Checks<'a> {
    fn of(request: &CommandRequest, target: &Target<'a>) -> Checks<'a> {
        let needed = request.action.min_version();
        // A GPU named by something that is neither an index nor a UUID matches none.
        let (gpu_by_index, gpu_by_uuid) = match target.gpu.and_then(GpuRef::parse) {
            Some(GpuRef::Index(index)) => (i32::try_from(index).ok(), None),
            Some(GpuRef::Uuid(_)) => (None, target.gpu.map(str::trim)),
            None => (None, None),
        };
        Checks {
            needed,
            need_version: needed > razar_shared::protocol::PROTOCOL_MIN,
            gpu_by_index,
            gpu_by_uuid,
        }
    }
}

impl Ledger {
    pub(crate) fn new(pool: PgPool, metrics: DispatchMetrics, result_grace: Duration) -> Ledger {
        Ledger {
            pool,
            metrics,
            result_grace,
        }
    }

    pub(crate) fn metrics(&self) -> &DispatchMetrics {
        &self.metrics
    }

    fn grace(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.result_grace).unwrap_or(chrono::Duration::MAX)
    }

    /// Validates `request` and persists it as `queued`; with an idempotency key already
    /// used by the caller, returns the existing command instead (`false`: not new).
    async fn insert(
        &self,
        request: &CommandRequest,
        now: DateTime<Utc>,
        audit: Option<&AuditEntry>,
    ) -> Result<(CommandRecord, bool), DispatchError> {
        check_request(request)?;
        if let Some(key) = &request.idempotency_key {
            if let Some(existing) = self.by_key(&request.caller, key).await? {
                return same_command(existing, request).map(|r| (r, false));
            }
        }
        if request.deadline <= now {
            return Err(DispatchError::DeadlinePassed {
                deadline: request.deadline,
            });
        }
        let host = &request.host;
        let target = Target::of(&request.action);
        let checks = Checks::of(request, &target);
        // The common path is one statement, its own transaction: the command is
        // inserted only where every check holds (the host, its component, its agent's
        // protocol, its GPU, the command a `resolve` names), the GPU index resolved in
        // the same statement. Nothing inserted: `diagnose` says which check failed, or
        // another submission with the same key won the race.
        let id: CommandId = rand::random();
        let query = sqlx::query(&INSERT_SQL)
            .bind(&id[..])
            .bind(host)
            .bind(kind(&request.action))
            .bind(target.component)
            .bind(Json(&request.action))
            .bind(&request.caller)
            .bind(&request.idempotency_key)
            .bind(&request.request_id)
            .bind(now)
            .bind(request.deadline)
            .bind(checks.need_version)
            .bind(i32::from(checks.needed))
            .bind(checks.gpu_by_index)
            .bind(checks.gpu_by_uuid)
            .bind(target.gpu.is_some())
            .bind(target.command.map(|c| c.to_vec()));
        let inserted = match audit {
            // The caller's audit row commits with the command, or neither does.
            Some(audit) => {
                let mut tx = self.pool.begin().await?;
                let inserted = query.fetch_optional(&mut *tx).await?;
                if let Some(row) = &inserted {
                    let record = record(row)?;
                    audit
                        .write(
                            &mut tx,
                            &format!("queued command {}", hex_id(&record.id)),
                            now,
                        )
                        .await?;
                }
                tx.commit().await?;
                inserted
            }
            None => query.fetch_optional(&self.pool).await?,
        };
        if let Some(row) = inserted {
            return Ok((record(&row)?, true));
        }
        self.diagnose(request, &target, &checks).await?;
        // Every check holds: another submission with the same key won the race.
        let key = request.idempotency_key.as_deref().unwrap_or_default();
        match self.by_key(&request.caller, key).await? {
            Some(existing) => same_command(existing, request).map(|r| (r, false)),
            None => Err(DispatchError::Corrupt {
                id: hex_id(&id),
                reason: "insert conflicted with a command that is not there".into(),
            }),
        }
    }

    /// Why a command was not inserted: the first check that fails, as the error the
    /// caller gets (`Ok` when every check holds).
    async fn diagnose(
        &self,
        request: &CommandRequest,
        target: &Target<'_>,
        checks: &Checks<'_>,
    ) -> Result<(), DispatchError> {
        let host = &request.host;
        let row = sqlx::query(&CHECKS_SQL)
            .bind(host)
            .bind(target.component)
            .bind(checks.need_version)
            .bind(checks.gpu_by_index)
            .bind(checks.gpu_by_uuid)
            .bind(target.command.map(|c| c.to_vec()))
            .fetch_one(&self.pool)
            .await?;
        if !row.try_get::<bool, _>("host")? {
            return Err(DispatchError::UnknownHost { host: host.clone() });
        }
        if let Some(component) = target.component {
            if !row.try_get::<bool, _>("component")? {
                return Err(DispatchError::UnknownComponent {
                    host: host.clone(),
                    component: component.to_owned(),
                });
            }
        }
        let last: Option<i32> = row.try_get("protocol")?;
        if let Some(version) = last.and_then(|v| u16::try_from(v).ok()) {
            if version < checks.needed {
                return Err(DispatchError::AgentTooOld {
                    host: host.clone(),
                    kind: kind(&request.action),
                    version,
                    needed: checks.needed,
                });
            }
        }
        if let Some(gpu) = target.gpu {
            if row.try_get::<Option<i32>, _>("gpu")?.is_none() {
                return Err(DispatchError::UnknownGpu {
                    host: host.clone(),
                    gpu: gpu.to_owned(),
                });
            }
        }
        if let Some(command) = target.command {
            if !row.try_get::<bool, _>("command")? {
                return Err(DispatchError::UnknownCommand {
                    host: host.clone(),
                    command: hex_id(&command),
                });
            }
        }
        Ok(())
    }

    async fn by_key(
        &self,
        caller: &str,
        key: &str,
    ) -> Result<Option<CommandRecord>, DispatchError> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM commands WHERE caller = $1 AND idempotency_key = $2"
        ))
        .bind(caller)
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(record).transpose()
    }

    /// The command `id`, if stored.
    pub(crate) async fn get(&self, id: &CommandId) -> Result<Option<CommandRecord>, DispatchError> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM commands WHERE command_id = $1"
        ))
        .bind(&id[..])
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(record).transpose()
    }

    /// The commands `ids` were handed to a connection at `at`: one more attempt, and
    /// `sent` unless a result settled them meanwhile (a fast agent answers before this
    /// runs).
    pub(crate) async fn mark_sent(
        &self,
        ids: &[CommandId],
        via: Via,
        now: DateTime<Utc>,
    ) -> Result<(), DispatchError> {
        if ids.is_empty() {
            return Ok(());
        }
        let ids: Vec<Vec<u8>> = ids.iter().map(|id| id.to_vec()).collect();
        sqlx::query(
            "UPDATE commands
             SET state = CASE WHEN state IN ('queued', 'sent') THEN 'sent' ELSE state END,
                 sent_at = $2, attempts = attempts + 1
             WHERE command_id = ANY($1)",
        )
        .bind(&ids)
        .bind(now)
        .execute(&self.pool)
        .await?;
        self.metrics
            .deliveries
            .with_label_values(&[via.label()])
            .inc_by(u64::try_from(ids.len()).unwrap_or(u64::MAX));
        Ok(())
    }

    /// [`Ledger::mark_sent`] for one command, returning it as stored afterwards (one
    /// round trip).
    pub(crate) async fn mark_sent_one(
        &self,
        id: &CommandId,
        via: Via,
        now: DateTime<Utc>,
    ) -> Result<Option<CommandRecord>, DispatchError> {
        let row = sqlx::query(&format!(
            "UPDATE commands
             SET state = CASE WHEN state IN ('queued', 'sent') THEN 'sent' ELSE state END,
                 sent_at = $2, attempts = attempts + 1
             WHERE command_id = $1
             RETURNING {COLUMNS}"
        ))
        .bind(&id[..])
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        self.metrics
            .deliveries
            .with_label_values(&[via.label()])
            .inc();
        row.as_ref().map(record).transpose()
    }

    /// Expires what is past its deadline (`host`'s only, or every host's), counting it.
    pub(crate) async fn expire(
        &self,
        host: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<u64, DispatchError> {
        let kinds: Vec<String> = sqlx::query_scalar(
            "UPDATE commands SET state = 'expired', finished_at = $2,
                 message = CASE WHEN state = 'queued' THEN 'deadline passed before delivery'
                                ELSE 'no result from the agent by the deadline' END
             WHERE state IN ('queued', 'sent') AND ($1::text IS NULL OR host_id = $1)
               AND ((state = 'queued' AND deadline <= $2) OR (state = 'sent' AND deadline <= $3))
             RETURNING kind",
        )
        .bind(host)
        .bind(now)
        .bind(
            now.checked_sub_signed(self.grace())
                .unwrap_or(DateTime::<Utc>::MIN_UTC),
        )
        .fetch_all(&self.pool)
        .await?;
        for kind in &kinds {
            self.metrics.settled(kind, CommandState::Expired);
        }
        Ok(u64::try_from(kinds.len()).unwrap_or(u64::MAX))
    }

    /// What a host that just connected must be given, in creation order: its `queued`
    /// and `sent` commands still within their deadline (a `sent` one within the result
    /// grace). What is past it is expired first.
    pub(crate) async fn due(
        &self,
        host: &str,
        now: DateTime<Utc>,
    ) -> Result<Vec<Command>, DispatchError> {
        self.expire(Some(host), now).await?;
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM commands
             WHERE host_id = $1 AND state IN ('queued', 'sent')
             ORDER BY seq"
        ))
        .bind(host)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| record(row).map(|r| r.command()))
            .collect()
    }

    /// Settles `host`'s command `id` as `failed` with `message` without the agent (it
    /// cannot be delivered on this connection, e.g. a protocol too old for it).
    pub(crate) async fn fail_undeliverable(
        &self,
        host: &str,
        id: CommandId,
        message: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<CommandState>, DispatchError> {
        let result = CommandResult {
            id,
            finished_ms: now.timestamp_millis(),
            outcome: CommandOutcome::Failed,
            message: message.to_owned(),
        };
        self.record_result(host, &result, now).await
    }

    /// Stores the agent's result for one of `host`'s commands: the first result settles
    /// it; later ones and unknown ids are counted and ignored. Returns the state stored,
    /// if this result settled the command.
    pub(crate) async fn record_result(
        &self,
        host: &str,
        result: &CommandResult,
        now: DateTime<Utc>,
    ) -> Result<Option<CommandState>, DispatchError> {
        let settled = settle(result);
        let finished_at = DateTime::from_timestamp_millis(result.finished_ms).unwrap_or(now);
        let kind: Option<String> = sqlx::query_scalar(
            "UPDATE commands SET state = $3, finished_at = $4, message = $5, duplicate = $6
             WHERE command_id = $1 AND host_id = $2 AND state IN ('queued', 'sent')
             RETURNING kind",
        )
        .bind(&result.id[..])
        .bind(host)
        .bind(settled.state.as_str())
        .bind(finished_at)
        .bind(&settled.message)
        .bind(settled.duplicate)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(kind) = kind {
            self.metrics.settled(&kind, settled.state);
            if settled.duplicate {
                self.metrics.results_duplicate.inc();
            }
            return Ok(Some(settled.state));
        }
        let exists: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM commands WHERE command_id = $1 AND host_id = $2)",
        )
        .bind(&result.id[..])
        .bind(host)
        .fetch_one(&self.pool)
        .await?;
        let reason = if exists { "settled" } else { "unknown" };
        self.metrics
            .results_ignored
            .with_label_values(&[reason])
            .inc();
        Ok(None)
    }

    /// The `queued` commands of `hosts` created before `before`, in creation order.
    pub(crate) async fn queued(
        &self,
        hosts: &[String],
        before: DateTime<Utc>,
    ) -> Result<Vec<(String, Command)>, DispatchError> {
        if hosts.is_empty() {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM commands
             WHERE state = 'queued' AND host_id = ANY($1) AND created_at < $2
             ORDER BY seq"
        ))
        .bind(hosts)
        .bind(before)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| record(row).map(|r| (r.host.clone(), r.command())))
            .collect()
    }

    /// One sweep: expires what is past its deadline on every host and updates the
    /// pending gauge.
    pub(crate) async fn sweep(&self, now: DateTime<Utc>) -> Result<u64, DispatchError> {
        let expired = self.expire(None, now).await?;
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM commands WHERE state IN ('queued', 'sent')")
                .fetch_one(&self.pool)
                .await?;
        self.metrics.pending.set(pending);
        Ok(expired)
    }
}

/// The public handle on dispatch ([`crate::server::Collector::dispatch`]).
#[derive(Clone)]
pub struct Dispatch {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Dispatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatch").finish_non_exhaustive()
    }
}

impl Dispatch {
    pub(crate) fn new(shared: Arc<Shared>) -> Dispatch {
        Dispatch { shared }
    }

    /// Persists a command (`queued`) and, if its host is connected, hands it to the
    /// connection (`sent`); returns it as stored. A command for a host that is away is
    /// delivered when it reconnects, until its deadline. The same idempotency key from
    /// the same caller returns the existing command and sends nothing.
    pub async fn submit(&self, request: CommandRequest) -> Result<CommandRecord, DispatchError> {
        self.submit_audited(request, None).await
    }

    /// [`Dispatch::submit`], writing `audit` (with the command's id as its result) in the
    /// transaction that persists the command; nothing is audited when the command is
    /// refused or an idempotent repeat.
    pub async fn submit_audited(
        &self,
        request: CommandRequest,
        audit: Option<&AuditEntry>,
    ) -> Result<CommandRecord, DispatchError> {
        let ledger = &self.shared.ledger;
        let kind = kind(&request.action);
        let (mut record, new) = match ledger.insert(&request, Utc::now(), audit).await {
            Ok(r) => r,
            Err(e) => {
                if !matches!(e, DispatchError::Db(_)) {
                    ledger
                        .metrics()
                        .commands
                        .with_label_values(&[kind, "refused"])
                        .inc();
                }
                tracing::info!(host = %request.host, kind, error = %e, "command refused");
                return Err(e);
            }
        };
        if !new {
            return Ok(record);
        }
        ledger.metrics().submitted.with_label_values(&[kind]).inc();
        tracing::info!(host = %record.host, kind, command = %hex_id(&record.id), "command queued");
        let handed_at = Utc::now();
        match self.shared.deliver(&record.host, record.command()) {
            Delivery::Handed => {
                // Handed over: a failure to record it only leaves the command `queued`
                // (delivered again on reconnect), never unsent.
                let marked = ledger
                    .mark_sent_one(&record.id, Via::Submit, handed_at)
                    .await;
                match marked {
                    Ok(stored) => {
                        if let Some(stored) = stored {
                            record = stored;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(host = %record.host, command = %hex_id(&record.id), error = %e, "cannot mark a command sent")
                    }
                }
            }
            Delivery::QueueFull => {
                ledger.metrics().deliveries_dropped.inc();
                tracing::warn!(host = %record.host, command = %hex_id(&record.id), "connection's command queue full; delivered on reconnect");
            }
            Delivery::NotConnected => {}
        }
        Ok(record)
    }

    /// The command `id` as stored.
    pub async fn command(&self, id: &CommandId) -> Result<Option<CommandRecord>, DispatchError> {
        self.shared.ledger.get(id).await
    }

    /// Commands newest first, filtered by host and state, with `seq < before` (a cursor:
    /// the `seq` of the last one of the previous page).
    pub async fn list(
        &self,
        host: Option<&str>,
        state: Option<CommandState>,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<(i64, CommandRecord)>, DispatchError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS}, seq FROM commands
             WHERE ($1::text IS NULL OR host_id = $1) AND ($2::text IS NULL OR state = $2)
               AND ($3::bigint IS NULL OR seq < $3)
             ORDER BY seq DESC LIMIT $4"
        ))
        .bind(host)
        .bind(state.map(CommandState::as_str))
        .bind(before)
        .bind(limit)
        .fetch_all(&self.shared.ledger.pool)
        .await?;
        rows.iter()
            .map(|row| Ok((row.try_get::<i64, _>("seq")?, record(row)?)))
            .collect()
    }

    /// Expires every command past its deadline now (the periodic sweep does it too);
    /// returns how many.
    pub async fn sweep(&self) -> Result<u64, DispatchError> {
        self.shared.ledger.sweep(Utc::now()).await
    }

    /// The dispatch metrics.
    pub fn metrics(&self) -> &DispatchMetrics {
        self.shared.ledger.metrics()
    }
}

/// Every `every` until `stop` is set: expires what is past its deadline
/// ([`Ledger::sweep`]) and hands the `queued` commands of connected hosts to their
/// connections. Each good run is a beat; a failed one is logged and tried again at the
/// next tick (late beats show in health).
pub(crate) async fn run_sweep(
    shared: Arc<Shared>,
    every: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
    beat: crate::supervise::Beat,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match sweep_once(&shared, every).await {
            Ok(()) => beat.ok(),
            Err(error) => tracing::warn!(%error, "command sweep failed"),
        }
    }
}

/// One sweep. Only commands queued for a whole interval are handed over: a fresh one is
/// still being handed over by its submission or its host's Welcome.
async fn sweep_once(shared: &Shared, every: Duration) -> Result<(), DispatchError> {
    let ledger = &shared.ledger;
    let now = Utc::now();
    let expired = ledger.sweep(now).await?;
    if expired > 0 {
        tracing::info!(expired, "commands past their deadline expired");
    }
    let before = chrono::Duration::from_std(every)
        .ok()
        .and_then(|every| now.checked_sub_signed(every))
        .unwrap_or(DateTime::<Utc>::MIN_UTC);
    let queued = ledger.queued(&shared.owned_hosts(), before).await?;
    let handed_at = Utc::now();
    let mut handed = Vec::new();
    for (host, command) in queued {
        let id = command.id;
        match shared.deliver(&host, command) {
            Delivery::Handed => handed.push(id),
            Delivery::QueueFull => ledger.metrics().deliveries_dropped.inc(),
            Delivery::NotConnected => {}
        }
    }
    ledger.mark_sent(&handed, Via::Sweep, handed_at).await
}

/// The stable snake_case kind of an action (a metric label and the `kind` column).
pub fn kind(action: &CommandAction) -> &'static str {
    match action {
        CommandAction::Restart { .. } => "restart",
        CommandAction::Stop { .. } => "stop",
        CommandAction::Start { .. } => "start",
        CommandAction::Quarantine { .. } => "quarantine",
        CommandAction::Resolve { .. } => "resolve",
        CommandAction::Pulse { .. } => "pulse",
        CommandAction::Rollback { .. } => "rollback",
        CommandAction::TailLogs { .. } => "tail_logs",
        CommandAction::CancelTail { .. } => "cancel_tail",
        CommandAction::DrainGpu { .. } => "drain_gpu",
        CommandAction::ResetGpu { .. } => "reset_gpu",
        CommandAction::SetGpuHealth { .. } => "set_gpu_health",
        CommandAction::DeployRevision { .. } => "deploy_revision",
        CommandAction::SwitchProfile { .. } => "switch_profile",
    }
}

/// What an action is addressed to besides its host.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Target<'a> {
    component: Option<&'a str>,
    /// The GPU as the command names it (index or UUID), resolved at submit.
    gpu: Option<&'a str>,
    /// Another command of the same host (`CancelTail`).
    command: Option<CommandId>,
}

impl<'a> Target<'a> {
    fn of(action: &'a CommandAction) -> Target<'a> {
        match action {
            CommandAction::Restart { component }
            | CommandAction::Stop { component }
            | CommandAction::Start { component }
            | CommandAction::Quarantine { component, .. }
            | CommandAction::Resolve { component, .. }
            | CommandAction::Pulse { component, .. }
            | CommandAction::Rollback { component, .. }
            | CommandAction::TailLogs { component, .. }
            | CommandAction::DeployRevision { component, .. } => Target {
                component: Some(component),
                ..Target::default()
            },
            CommandAction::CancelTail { command } => Target {
                command: Some(*command),
                ..Target::default()
            },
            CommandAction::DrainGpu { gpu, .. }
            | CommandAction::ResetGpu { gpu }
            | CommandAction::SetGpuHealth { gpu, .. } => Target {
                gpu: Some(gpu),
                ..Target::default()
            },
            CommandAction::SwitchProfile { .. } => Target::default(),
        }
    }
}

/// Refuses text PostgreSQL cannot store (NUL in `text` or `jsonb`) and oversized keys.
fn check_request(request: &CommandRequest) -> Result<(), DispatchError> {
    let nul = |field| DispatchError::InvalidText {
        field,
        reason: "contains a NUL character",
    };
    let long = |field| DispatchError::InvalidText {
        field,
        reason: "longer than 256 bytes",
    };
    let keys = [
        ("host", Some(request.host.as_str())),
        ("caller", Some(request.caller.as_str())),
        ("idempotency_key", request.idempotency_key.as_deref()),
        ("request_id", request.request_id.as_deref()),
    ];
    for (field, value) in keys {
        let Some(value) = value else { continue };
        if value.contains('\0') {
            return Err(nul(field));
        }
        if value.len() > MAX_KEY_BYTES {
            return Err(long(field));
        }
    }
    let texts: Vec<(&'static str, &str)> = match &request.action {
        CommandAction::Quarantine { component, note }
        | CommandAction::Resolve { component, note } => {
            vec![("component", component.as_str()), ("note", note.as_str())]
        }
        CommandAction::Rollback {
            component,
            revision,
        } => vec![
            ("component", component.as_str()),
            ("revision", revision.as_str()),
        ],
        CommandAction::Restart { component }
        | CommandAction::Stop { component }
        | CommandAction::Start { component }
        | CommandAction::Pulse { component, .. }
        | CommandAction::TailLogs { component, .. } => vec![("component", component.as_str())],
        CommandAction::CancelTail { .. } => Vec::new(),
        CommandAction::DrainGpu { gpu, note } | CommandAction::SetGpuHealth { gpu, note, .. } => {
            vec![("gpu", gpu.as_str()), ("note", note.as_str())]
        }
        CommandAction::ResetGpu { gpu } => vec![("gpu", gpu.as_str())],
        CommandAction::SwitchProfile { profile } => vec![("profile", profile.as_str())],
        CommandAction::DeployRevision {
            component,
            revision,
        } => {
            let mut texts = vec![
                ("component", component.as_str()),
                ("revision", revision.version.as_str()),
                ("command", revision.command.as_str()),
            ];
            texts.extend(revision.args.iter().map(|a| ("args", a.as_str())));
            for (key, value) in &revision.env {
                texts.push(("env", key.as_str()));
                texts.push(("env", value.as_str()));
            }
            texts
        }
    };
    match texts.into_iter().find(|(_, t)| t.contains('\0')) {
        Some((field, _)) => Err(nul(field)),
        None => Ok(()),
    }
}

/// The existing command for a reused idempotency key, if it is the same command.
fn same_command(
    existing: CommandRecord,
    request: &CommandRequest,
) -> Result<CommandRecord, DispatchError> {
    if existing.host == request.host && existing.action == request.action {
        Ok(existing)
    } else {
        Err(DispatchError::IdempotencyConflict {
            caller: request.caller.clone(),
            key: request.idempotency_key.clone().unwrap_or_default(),
        })
    }
}

/// How a result settles its command.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Settled {
    state: CommandState,
    message: String,
    duplicate: bool,
}

/// The state and message a result stores. A `Duplicate` answer carries the original
/// outcome as the prefix of its message (`"succeeded: …"`): that outcome and the rest
/// of the message are stored, flagged `duplicate`; a prefix that names no outcome
/// stores `failed` with the whole message.
fn settle(result: &CommandResult) -> Settled {
    let (state, message, duplicate) = match result.outcome {
        CommandOutcome::Succeeded => (CommandState::Succeeded, result.message.as_str(), false),
        CommandOutcome::Failed => (CommandState::Failed, result.message.as_str(), false),
        CommandOutcome::Expired => (CommandState::Expired, result.message.as_str(), false),
        CommandOutcome::Duplicate => {
            let parsed = result.message.split_once(": ").and_then(|(word, rest)| {
                let state = match word {
                    "succeeded" => CommandState::Succeeded,
                    "failed" => CommandState::Failed,
                    "expired" => CommandState::Expired,
                    _ => return None,
                };
                Some((state, rest))
            });
            match parsed {
                Some((state, rest)) => (state, rest, true),
                None => (CommandState::Failed, result.message.as_str(), true),
            }
        }
    };
    Settled {
        state,
        message: storable(message),
        duplicate,
    }
}

/// `text` without NUL characters, cut to [`MAX_MESSAGE_BYTES`] at a character boundary.
fn storable(text: &str) -> String {
    let mut end = text.len().min(MAX_MESSAGE_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].replace('\0', "\u{fffd}")
}

fn record(row: &PgRow) -> Result<CommandRecord, DispatchError> {
    let raw_id: Vec<u8> = row.try_get("command_id")?;
    let id: CommandId = raw_id
        .as_slice()
        .try_into()
        .map_err(|_| DispatchError::Corrupt {
            id: hex_id(&raw_id),
            reason: "command id is not 16 bytes".into(),
        })?;
    let corrupt = |reason: String| DispatchError::Corrupt {
        id: hex_id(&id),
        reason,
    };
    let state: String = row.try_get("state")?;
    let gpu: Option<i32> = row.try_get("gpu")?;
    let attempts: i32 = row.try_get("attempts")?;
    let Json(action): Json<CommandAction> = row.try_get("action")?;
    Ok(CommandRecord {
        id,
        host: row.try_get("host_id")?,
        kind: row.try_get("kind")?,
        component: row.try_get("component")?,
        gpu: gpu
            .map(u32::try_from)
            .transpose()
            .map_err(|_| corrupt("negative GPU index".into()))?,
        action,
        state: CommandState::parse(&state).ok_or_else(|| corrupt(format!("state {state:?}")))?,
        caller: row.try_get("caller")?,
        idempotency_key: row.try_get("idempotency_key")?,
        request_id: row.try_get("request_id")?,
        created_at: row.try_get("created_at")?,
        sent_at: row.try_get("sent_at")?,
        finished_at: row.try_get("finished_at")?,
        deadline: row.try_get("deadline")?,
        message: row.try_get("message")?,
        attempts: u32::try_from(attempts).unwrap_or(0),
        duplicate: row.try_get("duplicate")?,
    })
}

/// A command id as lower-case hex (logs, errors).
pub fn hex_id(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(outcome: CommandOutcome, message: &str) -> CommandResult {
        CommandResult {
            id: [7; 16],
            finished_ms: 1,
            outcome,
            message: message.into(),
        }
    }

    #[test]
    fn results_settle_with_their_outcome_and_a_duplicate_with_the_original_one() {
        use CommandOutcome::*;
        use CommandState as S;
        let cases = [
            (Succeeded, "restarted", S::Succeeded, "restarted", false),
            (
                Failed,
                "no such component",
                S::Failed,
                "no such component",
                false,
            ),
            (
                Expired,
                "deadline passed",
                S::Expired,
                "deadline passed",
                false,
            ),
            (
                Duplicate,
                "succeeded: restarted",
                S::Succeeded,
                "restarted",
                true,
            ),
            (
                Duplicate,
                "failed: exit 1: boom",
                S::Failed,
                "exit 1: boom",
                true,
            ),
            (
                Duplicate,
                "expired: deadline passed",
                S::Expired,
                "deadline passed",
                true,
            ),
            (Duplicate, "succeeded: ", S::Succeeded, "", true),
            // A prefix naming no outcome: failed, with the whole message.
            (Duplicate, "duplicate: x", S::Failed, "duplicate: x", true),
            (Duplicate, "garbage", S::Failed, "garbage", true),
        ];
        for (outcome, message, state, stored, duplicate) in cases {
            let got = settle(&result(outcome, message));
            assert_eq!(
                got,
                Settled {
                    state,
                    message: stored.into(),
                    duplicate
                },
                "{outcome:?} {message:?}"
            );
        }
    }

    #[test]
    fn stored_messages_have_no_nul_and_are_cut_at_a_char_boundary() {
        assert_eq!(storable("a\0b"), "a\u{fffd}b");
        let long = "é".repeat(MAX_MESSAGE_BYTES);
        let cut = storable(&long);
        assert!(cut.len() <= MAX_MESSAGE_BYTES);
        assert!(cut.chars().all(|c| c == 'é'));
    }

    #[test]
    fn every_action_has_a_distinct_kind_and_its_target() {
        let actions = [
            CommandAction::Restart {
                component: "a".into(),
            },
            CommandAction::Stop {
                component: "a".into(),
            },
            CommandAction::Start {
                component: "a".into(),
            },
            CommandAction::Quarantine {
                component: "a".into(),
                note: "n".into(),
            },
            CommandAction::Resolve {
                component: "a".into(),
                note: "n".into(),
            },
            CommandAction::Pulse {
                component: "a".into(),
                budget_ms: 1,
            },
            CommandAction::Rollback {
                component: "a".into(),
                revision: "r".into(),
            },
            CommandAction::TailLogs {
                component: "a".into(),
                lines: 1,
                follow: false,
            },
            CommandAction::CancelTail { command: [1; 16] },
        ];
        let kinds: std::collections::HashSet<_> = actions.iter().map(kind).collect();
        assert_eq!(kinds.len(), actions.len());
        for action in &actions[..8] {
            assert_eq!(Target::of(action).component, Some("a"), "{action:?}");
        }
        assert_eq!(Target::of(&actions[8]).command, Some([1; 16]));
        let drain = CommandAction::DrainGpu {
            gpu: "GPU-1".into(),
            note: String::new(),
        };
        assert_eq!(Target::of(&drain).gpu, Some("GPU-1"));
        assert_eq!(
            Target::of(&CommandAction::ResetGpu { gpu: "2".into() }).gpu,
            Some("2")
        );
    }

    #[test]
    fn text_postgresql_refuses_is_refused_with_the_field() {
        let request = |action, key: Option<&str>| CommandRequest {
            host: "h".into(),
            action,
            deadline: Utc::now(),
            caller: "op".into(),
            idempotency_key: key.map(str::to_owned),
            request_id: None,
        };
        let quarantine = CommandAction::Quarantine {
            component: "a".into(),
            note: "x\0y".into(),
        };
        let err = check_request(&request(quarantine, None)).map_err(|e| e.to_string());
        assert_eq!(err, Err("note: contains a NUL character".into()));
        let restart = CommandAction::Restart {
            component: "a".into(),
        };
        let long = "k".repeat(MAX_KEY_BYTES + 1);
        let err = check_request(&request(restart.clone(), Some(&long))).map_err(|e| e.to_string());
        assert_eq!(err, Err("idempotency_key: longer than 256 bytes".into()));
        assert!(check_request(&request(restart, Some("k"))).is_ok());
    }
}
