//! Razar's decision engine: given the fleet as it stands ([`FleetView`]) and one thing
//! that happened ([`Input`]) at a time given as a plain number ([`UnixMillis`]),
//! [`decide`] says what to do ([`Action`]s) and records why ([`Decision`]s, kept in the
//! view until [`FleetView::take_decisions`]).
//!
//! **Architecture invariant:** this crate is pure. No tokio, sqlx, quinn, sockets,
//! files or clock: the collector's engine loop is its only driver; it feeds committed
//! events, command results, operator requests and ticks in, and carries the actions out.
//! The same inputs at the same times always give the same actions and decisions, so
//! every rule is tested on a simulated clock (`tests/fixtures.rs`).
//!
//! # Rules (id; [`Rule::version`] is recorded with each decision, as
//! is the XID catalog's [`CATALOG_REVISION`](razar_shared::xid_catalog::CATALOG_REVISION))
//!
//! | id | what it decides |
//! |---|---|
//! | `xid.bucket` | XIDs by the catalog's immediate bucket: RESET_GPU → hardware path from a GPU reset; RESTART_BM/VM → hardware path from a host reboot; RESTART_APP → application path (restart the GPU's components, feed blame); CONTACT_SUPPORT, CHECK_* , UPDATE_SWFW → escalation for a person; IGNORE → recorded only |
//! | `xid.13_31` | XID 13/31 seen under different revisions on one GPU, or `xid_repeat_threshold` times on one GPU within `xid_window_ms` → hardware path (the application alternative is recorded as rejected); otherwise application path |
//! | `xid.45` | alone → escalate "restart the fabric manager"; after another XID on that GPU within the window → that XID's decision stands |
//! | `xid.48` | alone → quarantine and reset; with 63/64 on that GPU within the window (before or after) → drain and reset |
//! | `xid.154` | the recovery action decoded from the message (reset, reboot, drain P2P, drain and reset, none); unreadable → escalate |
//! | `xid.nvlink` | NVLink workflows (74, 144-150...) → quarantine, drain, reset |
//! | `xid.unknown` | codes outside the catalog or without a bucket → escalate, never dropped |
//! | `gpu.ladder` | hardware path: quarantine that GPU only, drain its components, escalate; reset → (failed) host reboot (no agent command reboots a host: a reboot that passes the breaker is escalated as `RebootRequested`, a request to a person, resolved when the host is back) → inspection (escalated to a person); a recovered GPU is on probation for `probation_ms` and returns to service only without a fault; a fault in probation climbs one rung; `lemon_cycles` quarantines → inspection |
//! | `gpu.override` | an operator sets a GPU healthy (back to service, cycles cleared, escalations resolved) or unhealthy (held for inspection), recorded with who and the note |
//! | `component.failed` | a component the agent gave up on → escalation; every failure feeds blame |
//! | `blame.revision` | a failure is the revision's fault only when it began after the revision started on that host, shows on the new revision on ≥ `blame_min_places` distinct GPUs/hosts, does not show on older revisions, and is not a hardware-class fault or one repeating on one GPU across revisions → roll back every host on it, pause its deployment, escalate; otherwise the rejected alternative says why |
//! | `revision.started` | a component's new revision on a host (remembers the previous one) |
//! | `silence.host_lost` / `silence.host_back` | escalate / auto-resolve; GPUs waiting for a reboot enter probation when their host is back; more hosts lost within the breaker's window than its limits (count or share) is a mass silence: the fleet scope opens and one `BreakerOpen` escalation replaces the per-host ones |
//! | `silence.no_samples` | heartbeats without samples (the collector's `heartbeats_without_samples` event) → its own escalation; samples again (`samples_resumed`) → resolved |
//! | `silence.pulse_missed` | a pulse not recovered in budget → escalation |
//! | `breaker` | see [`breaker`]: per-scope limits on disruptive actions, half-open trial, held actions re-evaluated |
//! | `escalation.lifecycle` | open → acknowledged → resolved, de-duplicated by (host, subject, kind); unacknowledged ones re-notified a level higher after `renotify_after_ms` |
//!
//! Every rule records a [`Decision`]: rule id and version, catalog revision, the events
//! it rests on, the facts it saw, the alternatives it rejected and why (for example
//! "not a revision fault: same XID 13 on h1/GPU 0 under revisions llm@v1 and llm@v2"),
//! the actions, what the breaker held and the breaker's state. The collector adds the
//! leader term when it stores them.
//!
//! [`deployment`] is the pure wave machine for rollouts (canaries, max parallel, min
//! healthy time, healthy deadline, auto-revert without re-running canaries, manual
//! promote, pause/resume); the engine's `PauseDeployment` and `RollBack` feed it.
#![forbid(unsafe_code)]

pub mod action;
pub mod breaker;
pub mod config;
pub mod decision;
pub mod deployment;
pub mod input;
pub mod model;
mod rules;
pub mod xid;

pub use action::{Action, EscalationKey, EscalationKind};
pub use config::{BreakerConfig, ConfigError, EngineConfig};
pub use decision::{Decision, Rejected, Rule};
pub use input::{EventId, FailureKind, Input};
pub use model::{FleetView, Gpu, GpuHealth, Host, HostState, Rung};
pub use razar_shared::protocol::UnixMillis;

/// Decides what `input` at `now` calls for: updates `view`, appends the decisions to it
/// and returns the actions to carry out, in order.
pub fn decide(view: &mut FleetView, input: &Input, now: UnixMillis) -> Vec<Action> {
    rules::decide(view, input, now)
}
