//! proptest strategies for every wire message type, covering every enum variant.

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use razar_shared::domain::{ComponentState, LogStream, Severity, XidClass};
use razar_shared::protocol::{
    AgentMessage, Batch, CollectorMessage, Command, CommandAction, CommandOutcome, CommandResult,
    ComponentInfo, Event, EventKind, GpuInfo, Heartbeat, Hello, Inventory, LogChunk, Refusal,
    RefusalReason, RevisionSpec, SeriesDef, SeriesPoints, SessionConfig, StatusDigest, Subject,
    Welcome,
};

/// Short strings with arbitrary Unicode (multi-byte UTF-8 included).
fn text() -> impl Strategy<Value = String> {
    "\\PC{0,12}"
}

fn component_state() -> impl Strategy<Value = ComponentState> {
    select(ComponentState::ALL.to_vec())
}

fn severity() -> impl Strategy<Value = Severity> {
    select(vec![Severity::Info, Severity::Warning, Severity::Critical])
}

fn xid_class() -> impl Strategy<Value = XidClass> {
    select(vec![
        XidClass::RestartApplication,
        XidClass::Ignore,
        XidClass::FollowsOtherError,
        XidClass::ResetGpu,
        XidClass::Report,
        XidClass::NvLink,
        XidClass::RebootHost,
        XidClass::FollowRecoveryAction,
        XidClass::Unknown,
    ])
}

fn log_stream() -> impl Strategy<Value = LogStream> {
    select(vec![LogStream::Stdout, LogStream::Stderr])
}

fn component_info() -> impl Strategy<Value = ComponentInfo> {
    (text(), text(), component_state(), any::<bool>()).prop_map(
        |(name, revision, state, critical)| ComponentInfo {
            name,
            revision,
            state,
            critical,
        },
    )
}

fn gpu_info() -> impl Strategy<Value = GpuInfo> {
    (any::<u32>(), text(), text(), text(), any::<u64>()).prop_map(
        |(index, uuid, name, pci_bus_id, memory_total_bytes)| GpuInfo {
            index,
            uuid,
            name,
            pci_bus_id,
            memory_total_bytes,
        },
    )
}

pub fn hello() -> impl Strategy<Value = Hello> {
    (
        any::<u16>(),
        any::<u16>(),
        text(),
        text(),
        text(),
        vec(component_info(), 0..3),
        vec(gpu_info(), 0..3),
        any::<u64>(),
        any::<i64>(),
    )
        .prop_map(
            |(
                protocol_min,
                protocol_max,
                host_id,
                agent_version,
                profile,
                components,
                gpus,
                last_acked_seq,
                agent_time_ms,
            )| Hello {
                protocol_min,
                protocol_max,
                host_id,
                agent_version,
                profile,
                components,
                gpus,
                last_acked_seq,
                agent_time_ms,
            },
        )
}

fn series_def() -> impl Strategy<Value = SeriesDef> {
    (any::<u32>(), text(), vec((text(), text()), 0..3)).prop_map(|(id, metric, labels)| SeriesDef {
        id,
        metric,
        labels,
    })
}

fn subject() -> impl Strategy<Value = Subject> {
    prop_oneof![
        Just(Subject::Host),
        text().prop_map(Subject::Component),
        any::<u32>().prop_map(Subject::Gpu),
    ]
}

fn event_kind() -> impl Strategy<Value = EventKind> {
    prop_oneof![
        (component_state(), component_state())
            .prop_map(|(from, to)| EventKind::StateChanged { from, to }),
        (any::<u32>(), any::<bool>())
            .prop_map(|(pid, adopted)| EventKind::ProcessAdopted { pid, adopted }),
        (any::<u32>(), any::<Option<i32>>(), any::<Option<i32>>())
            .prop_map(|(pid, code, signal)| EventKind::ProcessExited { pid, code, signal }),
        (any::<Option<u64>>(), any::<u64>(), any::<bool>()).prop_map(
            |(recovered_ms, budget_ms, passed)| EventKind::PulseResult {
                recovered_ms,
                budget_ms,
                passed
            }
        ),
        vec(text(), 0..3).prop_map(|changed| EventKind::ConfigReloaded { changed }),
        text().prop_map(|note| EventKind::QuarantineResolved { note }),
        (any::<u32>(), xid_class()).prop_map(|(xid, class)| EventKind::Xid { xid, class }),
        Just(EventKind::EccDoubleBit),
        Just(EventKind::GpuLost),
        (any::<u64>(), any::<u64>()).prop_map(|(used_bytes, budget_bytes)| {
            EventKind::VramBudgetExceeded {
                used_bytes,
                budget_bytes,
            }
        }),
        any::<u64>().prop_map(|bytes| EventKind::GhostMemory { bytes }),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
            |(first_seq, last_seq, samples_lost)| EventKind::SpoolGap {
                first_seq,
                last_seq,
                samples_lost
            }
        ),
        (any::<u64>(), any::<u64>()).prop_map(|(used_bytes, budget_bytes)| {
            EventKind::MemoryBudgetExceeded {
                used_bytes,
                budget_bytes,
            }
        }),
        text().prop_map(|code| EventKind::Other { code }),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    (any::<i64>(), severity(), subject(), event_kind(), text()).prop_map(
        |(ts_ms, severity, subject, kind, message)| Event {
            ts_ms,
            severity,
            subject,
            kind,
            message,
        },
    )
}

pub fn batch() -> impl Strategy<Value = Batch> {
    let points = vec((any::<u32>(), any::<f64>()), 0..8);
    let series = vec(
        (any::<u32>(), points).prop_map(|(series, points)| SeriesPoints { series, points }),
        0..5,
    );
    (any::<u64>(), any::<i64>(), series, vec(event(), 0..3)).prop_map(
        |(seq, base_ts_ms, series, events)| Batch {
            seq,
            base_ts_ms,
            series,
            events,
        },
    )
}

fn status_digest() -> impl Strategy<Value = StatusDigest> {
    (
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        any::<u64>(),
    )
        .prop_map(
            |(components_total, components_ready, components_quarantined, gpus, spool_batches)| {
                StatusDigest {
                    components_total,
                    components_ready,
                    components_quarantined,
                    gpus,
                    spool_batches,
                }
            },
        )
}

fn command_action() -> impl Strategy<Value = CommandAction> {
    prop_oneof![
        text().prop_map(|component| CommandAction::Restart { component }),
        text().prop_map(|component| CommandAction::Stop { component }),
        text().prop_map(|component| CommandAction::Start { component }),
        (text(), text())
            .prop_map(|(component, note)| CommandAction::Quarantine { component, note }),
        (text(), text()).prop_map(|(component, note)| CommandAction::Resolve { component, note }),
        (text(), any::<u64>()).prop_map(|(component, budget_ms)| CommandAction::Pulse {
            component,
            budget_ms
        }),
        (text(), text()).prop_map(|(component, revision)| CommandAction::Rollback {
            component,
            revision
        }),
        (text(), any::<u32>(), any::<bool>()).prop_map(|(component, lines, follow)| {
            CommandAction::TailLogs {
                component,
                lines,
                follow,
            }
        }),
        any::<[u8; 16]>().prop_map(|command| CommandAction::CancelTail { command }),
        (text(), text()).prop_map(|(gpu, note)| CommandAction::DrainGpu { gpu, note }),
        text().prop_map(|gpu| CommandAction::ResetGpu { gpu }),
        (text(), any::<bool>(), text()).prop_map(|(gpu, healthy, note)| {
            CommandAction::SetGpuHealth { gpu, healthy, note }
        }),
        (
            text(),
            text(),
            text(),
            vec(text(), 0..3),
            vec((text(), text()), 0..3)
        )
            .prop_map(|(component, version, command, args, env)| {
                CommandAction::DeployRevision {
                    component,
                    revision: RevisionSpec {
                        version,
                        command,
                        args,
                        env,
                    },
                }
            }),
        text().prop_map(|profile| CommandAction::SwitchProfile { profile }),
    ]
}

pub fn command() -> impl Strategy<Value = Command> {
    (any::<[u8; 16]>(), any::<i64>(), command_action()).prop_map(|(id, deadline_ms, action)| {
        Command {
            id,
            deadline_ms,
            action,
        }
    })
}

fn command_outcome() -> impl Strategy<Value = CommandOutcome> {
    select(vec![
        CommandOutcome::Succeeded,
        CommandOutcome::Failed,
        CommandOutcome::Expired,
        CommandOutcome::Duplicate,
    ])
}

fn session_config() -> impl Strategy<Value = SessionConfig> {
    (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(
        |(heartbeat_interval_ms, lost_after_missed, max_unacked_batches)| SessionConfig {
            heartbeat_interval_ms,
            lost_after_missed,
            max_unacked_batches,
        },
    )
}

fn refusal_reason() -> impl Strategy<Value = RefusalReason> {
    prop_oneof![
        (any::<u16>(), any::<u16>()).prop_map(|(collector_min, collector_max)| {
            RefusalReason::VersionUnsupported {
                collector_min,
                collector_max,
            }
        }),
        (text(), text()).prop_map(|(certificate, claimed)| RefusalReason::HostIdMismatch {
            certificate,
            claimed
        }),
        Just(RefusalReason::ExpectedHello),
        Just(RefusalReason::Revoked),
        Just(RefusalReason::Superseded),
        Just(RefusalReason::ProtocolViolation),
        Just(RefusalReason::Unavailable),
    ]
}

pub fn agent_message() -> impl Strategy<Value = AgentMessage> {
    prop_oneof![
        hello().prop_map(AgentMessage::Hello),
        vec(series_def(), 0..4).prop_map(AgentMessage::DefineSeries),
        batch().prop_map(AgentMessage::Batch),
        (any::<i64>(), status_digest()).prop_map(|(agent_time_ms, digest)| {
            AgentMessage::Heartbeat(Heartbeat {
                agent_time_ms,
                digest,
            })
        }),
        (any::<[u8; 16]>(), any::<i64>(), command_outcome(), text()).prop_map(
            |(id, finished_ms, outcome, message)| AgentMessage::CommandResult(CommandResult {
                id,
                finished_ms,
                outcome,
                message,
            })
        ),
        (
            any::<[u8; 16]>(),
            text(),
            log_stream(),
            vec(text(), 0..4),
            any::<bool>()
        )
            .prop_map(|(command, component, stream, lines, end)| {
                AgentMessage::LogChunk(LogChunk {
                    command,
                    component,
                    stream,
                    lines,
                    end,
                })
            }),
        (vec(component_info(), 0..3), vec(gpu_info(), 0..3)).prop_map(|(components, gpus)| {
            AgentMessage::Inventory(Inventory { components, gpus })
        }),
    ]
}

pub fn collector_message() -> impl Strategy<Value = CollectorMessage> {
    prop_oneof![
        (any::<u16>(), any::<i64>(), any::<u64>(), session_config()).prop_map(
            |(version, collector_time_ms, acked_seq, config)| CollectorMessage::Welcome(Welcome {
                version,
                collector_time_ms,
                acked_seq,
                config,
            })
        ),
        (refusal_reason(), text())
            .prop_map(|(reason, message)| CollectorMessage::Refusal(Refusal { reason, message })),
        any::<u64>().prop_map(|upto| CollectorMessage::Ack { upto }),
        command().prop_map(CollectorMessage::Command),
        any::<i64>()
            .prop_map(|collector_time_ms| CollectorMessage::HeartbeatAck { collector_time_ms }),
    ]
}

/// Variant index, matched exhaustively: appending a variant breaks the build here until
/// the strategies above (and the coverage test) know it.
pub fn agent_variant(msg: &AgentMessage) -> usize {
    match msg {
        AgentMessage::Hello(_) => 0,
        AgentMessage::DefineSeries(_) => 1,
        AgentMessage::Batch(_) => 2,
        AgentMessage::Heartbeat(_) => 3,
        AgentMessage::CommandResult(_) => 4,
        AgentMessage::LogChunk(_) => 5,
        AgentMessage::Inventory(_) => 6,
    }
}

pub const AGENT_VARIANTS: usize = 7;

/// See [`agent_variant`].
pub fn collector_variant(msg: &CollectorMessage) -> usize {
    match msg {
        CollectorMessage::Welcome(_) => 0,
        CollectorMessage::Refusal(_) => 1,
        CollectorMessage::Ack { .. } => 2,
        CollectorMessage::Command(_) => 3,
        CollectorMessage::HeartbeatAck { .. } => 4,
    }
}

pub const COLLECTOR_VARIANTS: usize = 5;
