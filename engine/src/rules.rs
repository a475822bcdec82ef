//! The rules. Each input is turned into one or more [`Ctx`]s (one per decision); the
//! view is updated as the rule decides, then [`finish`] passes the actions through the
//! breaker and the escalation de-duplication and records the [`Decision`].

use razar_shared::domain::Severity;
use razar_shared::protocol::UnixMillis;
use razar_shared::xid_catalog::{self, CATALOG_REVISION};

use crate::action::{Action, EscalationKey, EscalationKind};
use crate::breaker::{over_share, still_valid, Held, Mode, Scope, ScopeBreaker, Verdict};
use crate::decision::{Decision, Rejected, Rule};
use crate::input::{EventId, FailureKind, Input};
use crate::model::{
    Component, Escalation, EscalationState, FailureRecord, FleetView, GpuHealth, HostState, Rung,
    Signature, XidRecord,
};
use crate::xid::{self, RecoveryAction, XidPlan};

/// A decision being made.
#[derive(Debug)]
pub(crate) struct Ctx {
    rule: Rule,
    evidence: Vec<EventId>,
    facts: Vec<String>,
    rejected: Vec<Rejected>,
    actions: Vec<Action>,
    operator: Option<String>,
    /// Operator decisions and actions the breaker already admitted skip it.
    bypass_breaker: bool,
    /// Record the decision even with no actions.
    always_record: bool,
}

impl Ctx {
    fn new(rule: Rule, event: Option<EventId>) -> Self {
        Ctx {
            rule,
            evidence: event.into_iter().collect(),
            facts: Vec::new(),
            rejected: Vec::new(),
            actions: Vec::new(),
            operator: None,
            bypass_breaker: false,
            always_record: true,
        }
    }

    fn fact(&mut self, fact: impl Into<String>) {
        self.facts.push(fact.into());
    }

    fn reject(&mut self, alternative: impl Into<String>, reason: impl Into<String>) {
        self.rejected.push(Rejected {
            alternative: alternative.into(),
            reason: reason.into(),
        });
    }

    fn act(&mut self, action: Action) {
        self.actions.push(action);
    }

    fn escalate(&mut self, key: EscalationKey, severity: Severity, summary: impl Into<String>) {
        self.actions.push(Action::Escalate {
            key,
            severity,
            summary: summary.into(),
        });
    }
}

/// Runs every rule the input concerns; returns the actions of all decisions made.
pub(crate) fn decide(view: &mut FleetView, input: &Input, now: UnixMillis) -> Vec<Action> {
    view.prune(now);
    let cfg = view.config.breaker.clone();
    view.breaker.prune(now, &cfg);
    let mut ctxs = Vec::new();
    match input {
        Input::XidObserved {
            host,
            gpu,
            xid,
            revisions,
            message,
            event,
        } => on_xid(
            view,
            &mut ctxs,
            XidRecord {
                host: host.clone(),
                gpu: gpu.clone(),
                xid: *xid,
                revisions: sorted(revisions),
                at: now,
                event: *event,
            },
            message.as_deref(),
            now,
        ),
        Input::ComponentFailed {
            host,
            component,
            revision,
            kind,
            event,
        } => on_component_failed(
            view, &mut ctxs, host, component, revision, *kind, *event, now,
        ),
        Input::RevisionStarted {
            host,
            component,
            revision,
            gpus,
            event,
        } => {
            let mut ctx = Ctx::new(Rule::RevisionStarted, Some(*event));
            let h = view.add_host(host);
            let previous = h.components.get(component).and_then(|c| {
                if &c.revision == revision {
                    c.previous_revision.clone()
                } else {
                    Some(c.revision.clone())
                }
            });
            ctx.fact(format!(
                "{host}/{component} runs {revision} (previous {})",
                previous.as_deref().unwrap_or("none")
            ));
            h.components.insert(
                component.clone(),
                Component {
                    revision: revision.clone(),
                    previous_revision: previous,
                    revision_since: now,
                    gpus: gpus.clone(),
                },
            );
            ctxs.push(ctx);
        }
        Input::HostLost { host, event } => {
            let mut ctx = Ctx::new(Rule::HostLost, Some(*event));
            if let Some(h) = view.hosts.get_mut(host) {
                if h.state == HostState::Online {
                    h.state = HostState::Lost { since: now };
                }
            }
            ctx.fact(format!("{host} lost"));
            // Many hosts silent at once is rather the network's or the collector's
            // side than as many host faults: past the breaker's limits the fleet
            // scope opens (no automatic disruptive action while it is open) and one
            // escalation says so, instead of one per host.
            let cfg = &view.config.breaker;
            let from = now.saturating_sub(cfg.window_ms);
            let lost = view
                .hosts
                .values()
                .filter(|h| matches!(h.state, HostState::Lost { since } if since >= from))
                .count();
            let population = view.hosts.len();
            let mass = lost > usize::try_from(cfg.max_hosts).unwrap_or(usize::MAX)
                || over_share(lost, population, cfg);
            if mass {
                ctx.fact(format!(
                    "{lost} of {population} hosts lost within the window (limit {} hosts, {} %)",
                    cfg.max_hosts, cfg.max_share_percent
                ));
                ctx.reject(
                    format!("escalate {host} alone"),
                    "one of many hosts silent at once: one fleet escalation, automation paused",
                );
                view.breaker
                    .scopes
                    .entry(Scope::Fleet)
                    .or_insert_with(|| ScopeBreaker {
                        mode: Mode::Open { since: now },
                        held: Vec::new(),
                    });
                ctx.escalate(
                    EscalationKey::new(None, Scope::Fleet.name(), EscalationKind::BreakerOpen),
                    Severity::Critical,
                    format!(
                        "automation paused in fleet: {lost} of {population} hosts lost within \
                         the window (latest {host})"
                    ),
                );
            } else {
                ctx.escalate(
                    EscalationKey::new(Some(host), "host", EscalationKind::HostLost),
                    Severity::Critical,
                    format!("host {host} is lost: no session"),
                );
            }
            ctxs.push(ctx);
        }
        Input::HostBack { host, event } => on_host_back(view, &mut ctxs, host, *event, now),
        Input::HeartbeatsWithoutSamples { host, event } => {
            let mut ctx = Ctx::new(Rule::SamplerStalled, Some(*event));
            ctx.fact(format!("{host} sends heartbeats but no samples"));
            ctx.escalate(
                EscalationKey::new(Some(host), "sampler", EscalationKind::SamplerStalled),
                Severity::Warning,
                format!("host {host}: heartbeats without samples (sampler stalled)"),
            );
            ctxs.push(ctx);
        }
        Input::SamplesResumed { host, event } => {
            let mut ctx = Ctx::new(Rule::SamplerStalled, Some(*event));
            ctx.fact(format!("{host} sends samples again"));
            ctx.act(Action::ResolveEscalation {
                key: EscalationKey::new(Some(host), "sampler", EscalationKind::SamplerStalled),
            });
            ctxs.push(ctx);
        }
        Input::PulseMissed {
            host,
            component,
            event,
        } => {
            let mut ctx = Ctx::new(Rule::PulseMissed, Some(*event));
            ctx.fact(format!(
                "{host}/{component} did not recover from its pulse in budget"
            ));
            ctx.escalate(
                EscalationKey::new(Some(host), component.clone(), EscalationKind::PulseMissed),
                Severity::Warning,
                format!("{host}/{component}: failure pulse not recovered within budget"),
            );
            ctxs.push(ctx);
        }
        Input::GpuResetDone {
            host,
            gpu,
            ok,
            event,
        } => on_reset_done(view, &mut ctxs, host, gpu, *ok, *event, now),
        Input::OperatorOverride {
            host,
            gpu,
            healthy,
            note,
            who,
            event,
        } => on_override(view, &mut ctxs, host, gpu, *healthy, note, who, *event, now),
        Input::EscalationAcknowledged { key, who, event }
        | Input::EscalationResolved { key, who, event } => {
            let resolve = matches!(input, Input::EscalationResolved { .. });
            let mut ctx = Ctx::new(Rule::EscalationLifecycle, Some(*event));
            ctx.operator = Some(who.clone());
            match view.escalations.get_mut(key) {
                Some(e) if e.state != EscalationState::Resolved => {
                    e.state = if resolve {
                        EscalationState::Resolved
                    } else {
                        EscalationState::Acknowledged
                    };
                    ctx.fact(format!("{key:?} {:?} by {who}", e.state));
                }
                Some(_) => ctx.fact(format!("{key:?} already resolved")),
                None => ctx.fact(format!("{key:?} unknown")),
            }
            ctxs.push(ctx);
        }
        Input::Tick => {
            // Each step sees what the previous one decided (a GPU returned to service
            // has its escalation resolved before re-notification looks).
            let mut out = Vec::new();
            probation_tick(view, &mut ctxs, now);
            flush(view, &mut ctxs, now, &mut out);
            breaker_tick(view, &mut ctxs, now);
            flush(view, &mut ctxs, now, &mut out);
            renotify_tick(view, &mut ctxs, now);
            flush(view, &mut ctxs, now, &mut out);
            return out;
        }
    }
    let mut out = Vec::new();
    flush(view, &mut ctxs, now, &mut out);
    out
}

fn flush(view: &mut FleetView, ctxs: &mut Vec<Ctx>, now: UnixMillis, out: &mut Vec<Action>) {
    for ctx in ctxs.drain(..) {
        out.extend(finish(view, ctx, now));
    }
}

fn sorted(revisions: &[(String, String)]) -> Vec<(String, String)> {
    let mut r = revisions.to_vec();
    r.sort();
    r.dedup();
    r
}

fn show_revisions(revisions: &[(String, String)]) -> String {
    if revisions.is_empty() {
        return "(none)".to_owned();
    }
    revisions
        .iter()
        .map(|(c, r)| format!("{c}@{r}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn gpu_fault_key(host: &str, gpu: &str) -> EscalationKey {
    EscalationKey::new(Some(host), gpu, EscalationKind::GpuFault)
}

// ---------------------------------------------------------------------------- XIDs

fn on_xid(
    view: &mut FleetView,
    ctxs: &mut Vec<Ctx>,
    rec: XidRecord,
    message: Option<&str>,
    now: UnixMillis,
) {
    let window_from = now.saturating_sub(view.config.xid_window_ms);
    let prior: Vec<XidRecord> = view
        .xids
        .iter()
        .filter(|x| x.host == rec.host && x.gpu == rec.gpu && x.at >= window_from)
        .cloned()
        .collect();
    view.xids.push(rec.clone());
    let name = view.gpu_name(&rec.host, &rec.gpu);
    let xid = rec.xid;
    let entry = xid_catalog::lookup(xid);
    let describe = entry.map_or_else(
        || format!("XID {xid} on {name} (not in catalog {CATALOG_REVISION})"),
        |e| {
            format!(
                "XID {xid} {} on {name}: immediate {}, investigatory {:?}",
                e.mnemonic,
                e.immediate.as_str(),
                e.investigatory
            )
        },
    );
    let plan = xid::plan(xid);
    // 63/64 after a 48 on the same GPU: the 48 workflow's "with 63/64" branch.
    let after_48 = matches!(xid, 63 | 64) && prior.iter().any(|p| p.xid == 48);
    let rule = match (plan, xid) {
        _ if after_48 => Rule::Xid48,
        (XidPlan::Application, 13 | 31) => Rule::Xid13And31,
        (XidPlan::Xid45, _) => Rule::Xid45,
        (XidPlan::Xid48, _) => Rule::Xid48,
        (XidPlan::NvLink, _) => Rule::XidNvlink,
        (XidPlan::RecoveryAction, _) => Rule::Xid154,
        (XidPlan::Unknown, _) => Rule::XidUnknown,
        _ => Rule::XidBucket,
    };
    let mut ctx = Ctx::new(rule, Some(rec.event));
    // Decisions that follow from this one (blame) are recorded after it.
    let mut follow = Vec::new();
    ctx.fact(describe);
    ctx.fact(format!(
        "revisions on the GPU: {}",
        show_revisions(&rec.revisions)
    ));
    if view.gpu(&rec.host, &rec.gpu).is_none() {
        ctx.fact(format!("{name} is not in the inventory"));
        ctx.escalate(
            EscalationKey::new(Some(&rec.host), rec.gpu.clone(), EscalationKind::XidReport),
            Severity::Warning,
            format!("XID {xid} on a GPU not in the inventory: {name}"),
        );
        ctxs.push(ctx);
        return;
    }
    let (host, gpu) = (rec.host.as_str(), rec.gpu.as_str());
    match plan {
        _ if after_48 => {
            ctx.fact(format!(
                "XID 48 on {name} within the window: drain and reset"
            ));
            let drain = drain_action(view, host, gpu);
            match view.gpu(host, gpu).map(|g| g.health) {
                Some(GpuHealth::Quarantined { .. }) => ctx.act(drain),
                _ => hardware(view, &mut ctx, host, gpu, Rung::Reset, true, now),
            }
        }
        XidPlan::Application if matches!(xid, 13 | 31) => {
            let same: Vec<&XidRecord> = prior.iter().filter(|p| matches!(p.xid, 13 | 31)).collect();
            let other_revisions = same
                .iter()
                .find(|p| p.revisions != rec.revisions && !p.revisions.is_empty());
            let threshold = view.config.xid_repeat_threshold;
            let seen = same.len() + 1;
            if let Some(p) = other_revisions {
                ctx.reject(
                    "application fault (blame the revision)",
                    format!(
                        "not a revision fault: same XID {} on {name} under revisions {} and {}",
                        p.xid,
                        show_revisions(&p.revisions),
                        show_revisions(&rec.revisions)
                    ),
                );
                ctx.evidence.push(p.event);
                hardware(view, &mut ctx, host, gpu, Rung::Reset, true, now);
            } else if seen >= usize::try_from(threshold).unwrap_or(usize::MAX) {
                ctx.reject(
                    "application fault (restart)",
                    format!(
                        "XID 13/31 repeated {seen} times on {name} within {} s (threshold {threshold})",
                        view.config.xid_window_ms / 1000
                    ),
                );
                ctx.evidence.extend(same.iter().map(|p| p.event));
                hardware(view, &mut ctx, host, gpu, Rung::Reset, true, now);
            } else {
                ctx.reject(
                    "hardware fault",
                    format!(
                        "seen {seen} time(s) on {name} within the window (threshold {threshold}), under one revision"
                    ),
                );
                application(view, &mut follow, &mut ctx, &rec, now);
            }
        }
        XidPlan::Application => application(view, &mut follow, &mut ctx, &rec, now),
        XidPlan::ResetGpu => hardware(view, &mut ctx, host, gpu, Rung::Reset, true, now),
        XidPlan::RebootHost => hardware(view, &mut ctx, host, gpu, Rung::Reboot, true, now),
        XidPlan::Report => {
            let hint = entry.map_or("", |e| e.investigatory);
            ctx.escalate(
                EscalationKey::new(Some(host), gpu, EscalationKind::XidReport),
                Severity::Warning,
                format!(
                    "XID {xid} on {name}: {} ({hint})",
                    entry.map_or("?", |e| e.immediate.as_str())
                ),
            );
        }
        XidPlan::Ignore => ctx.fact("catalog says IGNORE: recorded, nothing to do"),
        XidPlan::Xid45 => {
            if let Some(p) = prior.iter().rev().find(|p| p.xid != 45) {
                ctx.evidence.push(p.event);
                ctx.fact(format!(
                    "XID {} on {name} within the window: act on that one (its decision stands)",
                    p.xid
                ));
                ctx.reject("restart the fabric manager", "XID 45 is not solo");
            } else {
                ctx.escalate(
                    EscalationKey::new(Some(host), gpu, EscalationKind::FabricManager),
                    Severity::Warning,
                    format!("XID 45 alone on {name}: restart the fabric manager (RESTART_FM)"),
                );
            }
        }
        XidPlan::Xid48 => {
            if let Some(p) = prior.iter().find(|p| matches!(p.xid, 63 | 64)) {
                ctx.evidence.push(p.event);
                ctx.fact(format!(
                    "XID {} on {name} within the window: drain and reset",
                    p.xid
                ));
                hardware(view, &mut ctx, host, gpu, Rung::Reset, true, now);
            } else {
                ctx.reject(
                    "drain the components",
                    "no XID 63/64 within the window: reset only",
                );
                hardware(view, &mut ctx, host, gpu, Rung::Reset, false, now);
            }
        }
        XidPlan::NvLink => hardware(view, &mut ctx, host, gpu, Rung::Reset, true, now),
        XidPlan::RecoveryAction => match message.and_then(xid::parse_recovery_action) {
            Some(action) => {
                ctx.fact(format!("recovery action from the message: {action:?}"));
                match action {
                    RecoveryAction::None => ctx.fact("no recovery action required"),
                    RecoveryAction::GpuReset => {
                        hardware(view, &mut ctx, host, gpu, Rung::Reset, false, now);
                    }
                    RecoveryAction::DrainAndReset => {
                        hardware(view, &mut ctx, host, gpu, Rung::Reset, true, now);
                    }
                    RecoveryAction::NodeReboot => {
                        hardware(view, &mut ctx, host, gpu, Rung::Reboot, true, now);
                    }
                    RecoveryAction::DrainP2p => {
                        let drain = drain_action(view, host, gpu);
                        ctx.act(drain);
                        ctx.escalate(
                            EscalationKey::new(Some(host), gpu, EscalationKind::XidReport),
                            Severity::Warning,
                            format!("XID 154 on {name}: drain peer-to-peer work"),
                        );
                    }
                }
            }
            None => ctx.escalate(
                EscalationKey::new(Some(host), gpu, EscalationKind::XidUnknown),
                Severity::Warning,
                format!(
                    "XID 154 on {name} without a readable recovery action: {:?}",
                    message.unwrap_or("")
                ),
            ),
        },
        XidPlan::Unknown => ctx.escalate(
            EscalationKey::new(
                Some(host),
                format!("{gpu}/xid{xid}"),
                EscalationKind::XidUnknown,
            ),
            Severity::Warning,
            format!("unknown XID {xid} on {name} (catalog {CATALOG_REVISION})"),
        ),
    }
    ctxs.push(ctx);
    ctxs.extend(follow);
}

fn drain_action(view: &FleetView, host: &str, gpu: &str) -> Action {
    Action::DrainComponents {
        host: host.to_owned(),
        gpu: Some(gpu.to_owned()),
        components: view
            .hosts
            .get(host)
            .map(|h| h.components_on(gpu))
            .unwrap_or_default(),
    }
}

/// An application-class XID: restart what runs on the GPU, remember the failure for
/// blame, and see whether a revision is to blame.
fn application(
    view: &mut FleetView,
    ctxs: &mut Vec<Ctx>,
    ctx: &mut Ctx,
    rec: &XidRecord,
    now: UnixMillis,
) {
    let components = view
        .hosts
        .get(&rec.host)
        .map(|h| h.components_on(&rec.gpu))
        .unwrap_or_default();
    if !components.is_empty() {
        ctx.act(Action::RestartComponents {
            host: rec.host.clone(),
            components,
        });
    }
    let failures: Vec<FailureRecord> = rec
        .revisions
        .iter()
        .map(|(component, revision)| FailureRecord {
            host: rec.host.clone(),
            component: component.clone(),
            revision: revision.clone(),
            signature: Signature::Xid(rec.xid),
            gpu: Some(rec.gpu.clone()),
            at: now,
            event: rec.event,
        })
        .collect();
    view.failures.extend(failures.iter().cloned());
    for f in &failures {
        blame(view, ctxs, f, now);
    }
}

// ------------------------------------------------------------------ GPU ladder

/// A hardware-class fault on one GPU: quarantine it (the host's other GPUs are
/// untouched), drain what runs on it, climb the ladder from `start`.
fn hardware(
    view: &mut FleetView,
    ctx: &mut Ctx,
    host: &str,
    gpu: &str,
    start: Rung,
    drain: bool,
    now: UnixMillis,
) {
    let name = view.gpu_name(host, gpu);
    let lemon = view.config.lemon_cycles;
    let Some(g) = view.gpu_mut(host, gpu) else {
        return;
    };
    let rung = match g.health {
        GpuHealth::Healthy => Some(start),
        GpuHealth::Probation { rung, .. } => {
            ctx.fact(format!(
                "{name} faulted in probation at rung {rung:?}: one rung up"
            ));
            rung.next().map(|r| r.max(start))
        }
        GpuHealth::Quarantined { rung, .. } if start > rung => {
            ctx.fact(format!(
                "{name} already quarantined at {rung:?}; this fault needs {start:?}"
            ));
            g.health = GpuHealth::Quarantined {
                rung: start,
                since: now,
            };
            climb(ctx, host, &name, gpu, start);
            return;
        }
        GpuHealth::Quarantined { rung, .. } => {
            ctx.fact(format!(
                "{name} already quarantined, recovery at {rung:?} under way"
            ));
            return;
        }
        GpuHealth::Inspection { .. } => {
            ctx.fact(format!("{name} already waits for inspection"));
            return;
        }
    };
    g.cycles = g.cycles.saturating_add(1);
    let cycles = g.cycles;
    let quarantine = Action::QuarantineGpu {
        host: host.to_owned(),
        gpu: gpu.to_owned(),
    };
    match rung {
        Some(rung) if cycles < lemon => {
            g.health = GpuHealth::Quarantined { rung, since: now };
            ctx.fact(format!(
                "quarantine cycle {cycles} of {name} (lemon at {lemon})"
            ));
            ctx.act(quarantine);
            if drain {
                ctx.act(drain_action(view, host, gpu));
            }
            climb(ctx, host, &name, gpu, rung);
            ctx.escalate(
                gpu_fault_key(host, gpu),
                if rung == Rung::Reboot {
                    Severity::Critical
                } else {
                    Severity::Warning
                },
                format!("hardware fault on {name}: quarantined, recovery by {rung:?}"),
            );
        }
        _ => {
            g.health = GpuHealth::Inspection { since: now };
            let why = if cycles >= lemon {
                format!("{cycles} quarantine cycles (lemon at {lemon})")
            } else {
                "faulted again after a host reboot: the ladder is exhausted".to_owned()
            };
            ctx.fact(format!("{name} goes to hardware inspection: {why}"));
            ctx.reject("another recovery cycle", why.clone());
            ctx.act(quarantine);
            ctx.act(drain_action(view, host, gpu));
            ctx.act(Action::RequireInspection {
                host: host.to_owned(),
                gpu: gpu.to_owned(),
            });
            ctx.escalate(
                EscalationKey::new(Some(host), gpu, EscalationKind::GpuInspection),
                Severity::Critical,
                format!(
                    "{name} needs hardware inspection by a person: {why}; it stays out of \
                     service until an operator sets it healthy with a note"
                ),
            );
        }
    }
}

/// The key of "a person must reboot this host" (resolved when the host is back).
fn reboot_key(host: &str) -> EscalationKey {
    EscalationKey::new(Some(host), "host", EscalationKind::RebootRequested)
}

/// Acts on a ladder rung. A GPU reset is a command the agent carries out; a host reboot
/// is not (no agent command reboots its own host): [`finish`] escalates it, once the
/// breaker let it through, as a request to a person, and the host's return starts the
/// GPU's probation.
fn climb(ctx: &mut Ctx, host: &str, name: &str, gpu: &str, rung: Rung) {
    if rung == Rung::Reboot {
        ctx.fact(format!(
            "{name} needs {host} rebooted: asked of a person (no agent command reboots a host)"
        ));
    }
    ctx.act(rung_action(host, gpu, rung));
}

/// The escalation that asks a person to carry out a reboot the engine decided.
fn reboot_request(host: &str) -> Action {
    Action::Escalate {
        key: reboot_key(host),
        severity: Severity::Critical,
        summary: format!(
            "a person must reboot {host}: Razar does not reboot hosts itself; its quarantined \
             GPUs stay out of service and start probation when {host} is back"
        ),
    }
}

fn rung_action(host: &str, gpu: &str, rung: Rung) -> Action {
    match rung {
        Rung::Reset => Action::ResetGpu {
            host: host.to_owned(),
            gpu: gpu.to_owned(),
        },
        Rung::Reboot => Action::RequestReboot {
            host: host.to_owned(),
        },
    }
}

fn enter_probation(
    view: &mut FleetView,
    ctx: &mut Ctx,
    host: &str,
    gpu: &str,
    rung: Rung,
    now: UnixMillis,
) {
    let until = now.saturating_add(view.config.probation_ms);
    let name = view.gpu_name(host, gpu);
    if let Some(g) = view.gpu_mut(host, gpu) {
        g.health = GpuHealth::Probation { rung, until };
        ctx.fact(format!(
            "{name} recovered by {rung:?}: probation until {until}"
        ));
    }
}

#[allow(clippy::too_many_arguments)]
fn on_reset_done(
    view: &mut FleetView,
    ctxs: &mut Vec<Ctx>,
    host: &str,
    gpu: &str,
    ok: bool,
    event: EventId,
    now: UnixMillis,
) {
    let mut ctx = Ctx::new(Rule::GpuLadder, Some(event));
    let name = view.gpu_name(host, gpu);
    match view.gpu(host, gpu).map(|g| g.health) {
        Some(GpuHealth::Quarantined {
            rung: Rung::Reset, ..
        }) if ok => enter_probation(view, &mut ctx, host, gpu, Rung::Reset, now),
        Some(GpuHealth::Quarantined {
            rung: Rung::Reset, ..
        }) => {
            ctx.fact(format!("reset of {name} failed: one rung up"));
            if let Some(g) = view.gpu_mut(host, gpu) {
                g.health = GpuHealth::Quarantined {
                    rung: Rung::Reboot,
                    since: now,
                };
            }
            climb(&mut ctx, host, &name, gpu, Rung::Reboot);
        }
        other => ctx.fact(format!(
            "reset result ({ok}) for {name} ignored: it is {other:?}"
        )),
    }
    ctxs.push(ctx);
}

fn on_host_back(
    view: &mut FleetView,
    ctxs: &mut Vec<Ctx>,
    host: &str,
    event: EventId,
    now: UnixMillis,
) {
    let mut ctx = Ctx::new(Rule::HostBack, Some(event));
    let rebooting: Vec<String> = match view.hosts.get_mut(host) {
        Some(h) => {
            h.state = HostState::Online;
            h.gpus
                .iter()
                .filter(|(_, g)| {
                    matches!(
                        g.health,
                        GpuHealth::Quarantined {
                            rung: Rung::Reboot,
                            ..
                        }
                    )
                })
                .map(|(uuid, _)| uuid.clone())
                .collect()
        }
        None => Vec::new(),
    };
    ctx.fact(format!("{host} is back"));
    ctx.act(Action::ResolveEscalation {
        key: EscalationKey::new(Some(host), "host", EscalationKind::HostLost),
    });
    if !rebooting.is_empty() {
        // GPUs waited for its reboot: the request to a person is done.
        ctx.act(Action::ResolveEscalation {
            key: reboot_key(host),
        });
    }
    ctxs.push(ctx);
    if !rebooting.is_empty() {
        let mut ladder = Ctx::new(Rule::GpuLadder, Some(event));
        for gpu in rebooting {
            enter_probation(view, &mut ladder, host, &gpu, Rung::Reboot, now);
        }
        ctxs.push(ladder);
    }
}

#[allow(clippy::too_many_arguments)]
fn on_override(
    view: &mut FleetView,
    ctxs: &mut Vec<Ctx>,
    host: &str,
    gpu: &str,
    healthy: bool,
    note: &str,
    who: &str,
    event: EventId,
    now: UnixMillis,
) {
    let mut ctx = Ctx::new(Rule::GpuOverride, Some(event));
    ctx.operator = Some(who.to_owned());
    ctx.bypass_breaker = true;
    let name = view.gpu_name(host, gpu);
    ctx.fact(format!(
        "{who} sets {name} {}: {note}",
        if healthy { "healthy" } else { "unhealthy" }
    ));
    let drain = drain_action(view, host, gpu);
    let Some(g) = view.gpu_mut(host, gpu) else {
        ctx.fact(format!("{name} is not in the inventory: nothing to do"));
        ctxs.push(ctx);
        return;
    };
    let was = g.health;
    if healthy {
        g.health = GpuHealth::Healthy;
        g.cycles = 0;
        if was != GpuHealth::Healthy {
            ctx.act(Action::ReturnGpuToService {
                host: host.to_owned(),
                gpu: gpu.to_owned(),
            });
        }
        for kind in [EscalationKind::GpuFault, EscalationKind::GpuInspection] {
            ctx.act(Action::ResolveEscalation {
                key: EscalationKey::new(Some(host), gpu, kind),
            });
        }
    } else {
        g.health = GpuHealth::Inspection { since: now };
        if matches!(was, GpuHealth::Healthy | GpuHealth::Probation { .. }) {
            ctx.act(Action::QuarantineGpu {
                host: host.to_owned(),
                gpu: gpu.to_owned(),
            });
            ctx.act(drain);
        }
    }
    ctxs.push(ctx);
}

// ------------------------------------------------------------------ components, blame

#[allow(clippy::too_many_arguments)]
fn on_component_failed(
    view: &mut FleetView,
    ctxs: &mut Vec<Ctx>,
    host: &str,
    component: &str,
    revision: &str,
    kind: FailureKind,
    event: EventId,
    now: UnixMillis,
) {
    let mut ctx = Ctx::new(Rule::ComponentFailed, Some(event));
    ctx.fact(format!(
        "{host}/{component}@{revision} failed: {}",
        kind.as_str()
    ));
    if kind == FailureKind::GaveUp {
        ctx.escalate(
            EscalationKey::new(Some(host), component, EscalationKind::ComponentQuarantined),
            Severity::Critical,
            format!("{host}/{component}@{revision}: the agent gave up restarting it (quarantined)"),
        );
    }
    ctxs.push(ctx);
    let failure = FailureRecord {
        host: host.to_owned(),
        component: component.to_owned(),
        revision: revision.to_owned(),
        signature: Signature::Component(kind),
        gpu: None,
        at: now,
        event,
    };
    view.failures.push(failure.clone());
    blame(view, ctxs, &failure, now);
}

/// Whether `failure` makes its revision the culprit (see the crate docs, rule
/// `blame.revision`). Only failures on a host's *new* revision are candidates.
fn blame(view: &mut FleetView, ctxs: &mut Vec<Ctx>, failure: &FailureRecord, now: UnixMillis) {
    let (c, r) = (&failure.component, &failure.revision);
    let Some(comp) = view
        .hosts
        .get(&failure.host)
        .and_then(|h| h.components.get(c))
        .cloned()
    else {
        return;
    };
    let Some(previous) = comp.previous_revision.clone() else {
        return;
    };
    if &comp.revision != r || view.blamed.contains(&(c.clone(), r.clone())) {
        return;
    }
    let mut ctx = Ctx::new(Rule::Blame, Some(failure.event));
    let alt = format!("roll back {c}@{r} to {previous} and pause its deployment");
    let window_from = now.saturating_sub(view.config.blame_window_ms);
    // 1. It must have begun after the revision started on this host.
    if let Some(early) = view.failures.iter().find(|f| {
        f.host == failure.host
            && &f.component == c
            && f.at >= window_from
            && f.at < comp.revision_since
    }) {
        ctx.evidence.push(early.event);
        ctx.reject(
            alt,
            format!(
                "began before {r} started on {} (first at {} under {})",
                failure.host, early.at, early.revision
            ),
        );
        ctxs.push(ctx);
        return;
    }
    // 2. Not while the GPU it was seen on (or, for a component failure, a GPU the
    //    component uses: draining it makes the component fail) has a hardware fault.
    let suspects: Vec<&String> = match &failure.gpu {
        Some(gpu) => vec![gpu],
        None => comp.gpus.iter().collect(),
    };
    for gpu in suspects {
        if let Some(g) = view.gpu(&failure.host, gpu) {
            if g.health != GpuHealth::Healthy {
                let name = view.gpu_name(&failure.host, gpu);
                ctx.reject(
                    alt,
                    format!("hardware-class fault: {name} is {:?}", g.health),
                );
                ctxs.push(ctx);
                return;
            }
        }
    }
    if let Some(gpu) = &failure.gpu {
        // 3. Not when the same failure repeats on this one GPU across revisions.
        if let Some(other) = view.failures.iter().find(|f| {
            f.gpu.as_ref() == Some(gpu)
                && &f.component == c
                && f.signature == failure.signature
                && &f.revision != r
                && f.at >= window_from
        }) {
            let name = view.gpu_name(&failure.host, gpu);
            ctx.evidence.push(other.event);
            ctx.reject(
                alt,
                format!(
                    "not a revision fault: same {:?} on {name} under revisions {} and {r}",
                    failure.signature, other.revision
                ),
            );
            let host = failure.host.clone();
            hardware(view, &mut ctx, &host, gpu, Rung::Reset, true, now);
            ctxs.push(ctx);
            return;
        }
    }
    // 4. Not when hosts on another revision fail the same way.
    if let Some(old) = view
        .failures
        .iter()
        .find(|f| &f.component == c && &f.revision != r && f.at >= window_from)
    {
        ctx.evidence.push(old.event);
        ctx.reject(
            alt,
            format!(
                "not a revision fault: {c} fails on {} too ({:?} on {})",
                old.revision, old.signature, old.host
            ),
        );
        ctxs.push(ctx);
        return;
    }
    // 5. Seen on enough distinct GPUs/hosts on the new revision, since it started there.
    let mut places = std::collections::BTreeSet::new();
    let mut models = std::collections::BTreeSet::new();
    for f in view
        .failures
        .iter()
        .filter(|f| &f.component == c && &f.revision == r && f.at >= window_from)
    {
        let Some(h) = view.hosts.get(&f.host) else {
            continue;
        };
        let Some(hc) = h.components.get(c) else {
            continue;
        };
        if &hc.revision != r || f.at < hc.revision_since {
            continue;
        }
        places.insert(f.place());
        ctx.evidence.push(f.event);
        let gpus = f.gpu.iter().cloned().chain(hc.gpus.iter().cloned());
        models.extend(gpus.filter_map(|g| h.gpus.get(&g).map(|g| g.model.clone())));
    }
    ctx.evidence.sort_unstable();
    ctx.evidence.dedup();
    let need = view.config.blame_min_places;
    ctx.fact(format!(
        "{c}@{r} failed on {} distinct GPUs/hosts ({}), {need} needed",
        places.len(),
        places.iter().cloned().collect::<Vec<_>>().join(", ")
    ));
    if places.len() < usize::try_from(need).unwrap_or(usize::MAX) {
        ctx.reject(
            alt,
            format!("seen on {} of {need} required GPUs/hosts", places.len()),
        );
        ctxs.push(ctx);
        return;
    }
    // 6. The same GPU models on the old revision are clean (step 4); say which.
    let clean: Vec<String> = view
        .hosts
        .iter()
        .filter(|(_, h)| {
            h.components.get(c).is_some_and(|hc| &hc.revision != r)
                && h.gpus.values().any(|g| models.contains(&g.model))
        })
        .map(|(name, _)| name.clone())
        .collect();
    if clean.is_empty() {
        ctx.fact(format!(
            "no host with the same GPU models ({}) left on an older revision to compare",
            models.iter().cloned().collect::<Vec<_>>().join(",")
        ));
    } else {
        ctx.fact(format!("clean on older revisions: {}", clean.join(", ")));
    }
    view.blamed.insert((c.clone(), r.clone()));
    for (name, h) in &view.hosts {
        if let Some(hc) = h.components.get(c) {
            if &hc.revision == r {
                if let Some(to) = &hc.previous_revision {
                    ctx.act(Action::RollBack {
                        host: name.clone(),
                        component: c.clone(),
                        to_revision: to.clone(),
                    });
                }
            }
        }
    }
    ctx.act(Action::PauseDeployment {
        component: c.clone(),
        revision: r.clone(),
    });
    ctx.escalate(
        EscalationKey::new(None, format!("{c}@{r}"), EscalationKind::RevisionBlamed),
        Severity::Critical,
        format!(
            "{c}@{r} blamed: failing on {} GPUs/hosts; rolled back, deployment paused",
            places.len()
        ),
    );
    ctxs.push(ctx);
}

// ------------------------------------------------------------------------ tick

/// Probation over without a fault: back to service.
fn probation_tick(view: &mut FleetView, ctxs: &mut Vec<Ctx>, now: UnixMillis) {
    let mut due = Vec::new();
    for (host, h) in &view.hosts {
        for (uuid, g) in &h.gpus {
            if let GpuHealth::Probation { until, .. } = g.health {
                if until <= now {
                    due.push((host.clone(), uuid.clone()));
                }
            }
        }
    }
    for (host, gpu) in due {
        let mut ctx = Ctx::new(Rule::GpuLadder, None);
        let name = view.gpu_name(&host, &gpu);
        if let Some(g) = view.gpu_mut(&host, &gpu) {
            g.health = GpuHealth::Healthy;
        }
        ctx.fact(format!("{name} passed probation without a fault"));
        ctx.act(Action::ReturnGpuToService {
            host: host.clone(),
            gpu: gpu.clone(),
        });
        ctx.act(Action::ResolveEscalation {
            key: gpu_fault_key(&host, &gpu),
        });
        ctxs.push(ctx);
    }
}

/// Re-notifies, one level up, what nobody acknowledged in time.
fn renotify_tick(view: &mut FleetView, ctxs: &mut Vec<Ctx>, now: UnixMillis) {
    let after = view.config.renotify_after_ms;
    let mut renotify = Ctx::new(Rule::EscalationLifecycle, None);
    renotify.always_record = false;
    for e in view.escalations.values_mut() {
        if e.state == EscalationState::Open && now.saturating_sub(e.last_notified) >= after {
            e.level = e.level.saturating_add(1);
            e.last_notified = now;
            renotify.fact(format!(
                "{:?} unacknowledged since {}: level {}",
                e.key, e.opened, e.level
            ));
            renotify.act(Action::Notify {
                key: e.key.clone(),
                level: e.level,
            });
        }
    }
    ctxs.push(renotify);
}

fn breaker_tick(view: &mut FleetView, ctxs: &mut Vec<Ctx>, now: UnixMillis) {
    let cooldown = view.config.breaker.cooldown_ms;
    let scopes: Vec<Scope> = view.breaker.scopes.keys().cloned().collect();
    for scope in scopes {
        let Some(b) = view.breaker.scopes.get(&scope).cloned() else {
            continue;
        };
        let mut ctx = Ctx::new(Rule::Breaker, None);
        ctx.bypass_breaker = true;
        let mut valid = Vec::new();
        for held in &b.held {
            match still_valid(view, &held.action) {
                Ok(()) => valid.push(held.clone()),
                Err(why) => ctx.reject(
                    format!("replay {} (held at {})", held.action.describe(), held.at),
                    format!("stale: {why}"),
                ),
            }
        }
        match b.mode {
            Mode::Open { since } if now.saturating_sub(since) >= cooldown => {
                half_open(view, ctxs, ctx, &scope, valid, true, now);
            }
            // Half-open with no trial yet (what it held was stale, or held back by
            // another open scope): try again.
            Mode::HalfOpen { trial_used: false } if !b.held.is_empty() => {
                half_open(view, ctxs, ctx, &scope, valid, false, now);
            }
            Mode::HalfOpen { trial_used: true } => {
                ctx.fact(format!("{}: trial went through, closed", scope.name()));
                view.breaker.scopes.remove(&scope);
                ctx.act(Action::ResolveEscalation {
                    key: EscalationKey::new(None, scope.name(), EscalationKind::BreakerOpen),
                });
                // What it still held is judged afresh, under the normal limits.
                ctx.bypass_breaker = false;
                for held in valid {
                    ctx.fact(format!(
                        "re-evaluated, still needed: {}",
                        held.action.describe()
                    ));
                    ctx.act(held.action);
                }
                ctxs.push(ctx);
            }
            _ => {
                if !ctx.rejected.is_empty() {
                    view.breaker.scopes.insert(
                        scope.clone(),
                        ScopeBreaker {
                            mode: b.mode.clone(),
                            held: valid,
                        },
                    );
                    ctxs.push(ctx);
                }
            }
        }
    }
}

/// A half-open scope lets its first held action through that no other open scope
/// holds back (the trial); the rest stay held until the next tick closes it.
fn half_open(
    view: &mut FleetView,
    ctxs: &mut Vec<Ctx>,
    mut ctx: Ctx,
    scope: &Scope,
    mut valid: Vec<Held>,
    cooled: bool,
    now: UnixMillis,
) {
    if cooled {
        ctx.fact(format!("{}: cool-down over, half-open", scope.name()));
    }
    let trial = valid
        .iter()
        .position(|h| !view.breaker.open_elsewhere(view, &h.action, scope))
        .map(|i| valid.remove(i));
    let trial_used = trial.is_some();
    if let Some(t) = trial {
        ctx.fact(format!("half-open trial: {}", t.action.describe()));
        // Counted like any admitted action.
        let mut breaker = std::mem::take(&mut view.breaker);
        breaker.count(view, &t.action, now);
        view.breaker = breaker;
        ctx.act(t.action);
    } else if !valid.is_empty() {
        ctx.fact(format!(
            "{}: no trial yet, what it holds is held by another open scope too",
            scope.name()
        ));
    }
    view.breaker.scopes.insert(
        scope.clone(),
        ScopeBreaker {
            mode: Mode::HalfOpen { trial_used },
            held: valid,
        },
    );
    if cooled || trial_used || !ctx.rejected.is_empty() {
        ctxs.push(ctx);
    }
}

// ------------------------------------------------------------------------ finish

/// Passes the decision's actions through the breaker and the escalation
/// de-duplication, records the decision, returns what is to be done.
fn finish(view: &mut FleetView, ctx: Ctx, now: UnixMillis) -> Vec<Action> {
    let mut passed = Vec::new();
    let mut held = Vec::new();
    let cfg = view.config.breaker.clone();
    let mut breaker = std::mem::take(&mut view.breaker);
    let mut trips = Vec::new();
    for action in ctx.actions {
        if ctx.bypass_breaker {
            passed.push(action);
            continue;
        }
        match breaker.admit(view, &action, now, &cfg) {
            Verdict::Pass => passed.push(action),
            Verdict::Hold { scope, tripped } => {
                held.push(action);
                trips.push((scope, tripped));
            }
        }
    }
    // One escalation per opened scope, listing what it holds.
    for (scope, tripped) in trips {
        let key = EscalationKey::new(None, scope.name(), EscalationKind::BreakerOpen);
        let list = breaker.held_list(&scope);
        match tripped {
            Some(reason) => passed.push(Action::Escalate {
                key,
                severity: Severity::Critical,
                summary: format!(
                    "automation paused in {}: {reason}; held: {list}",
                    scope.name()
                ),
            }),
            None => {
                if let Some(e) = view.escalations.get_mut(&key) {
                    e.summary = format!("automation paused in {}; held: {list}", scope.name());
                }
            }
        }
    }
    view.breaker = breaker;
    // A reboot that goes through is a request to a person (escalated right after it); a
    // held one asks nobody.
    let passed = passed.into_iter().flat_map(|a| {
        let ask = match &a {
            Action::RequestReboot { host } => Some(reboot_request(host)),
            _ => None,
        };
        std::iter::once(a).chain(ask)
    });
    let actions: Vec<Action> = passed.filter(|a| dedup_escalation(view, a, now)).collect();
    let record = ctx.always_record || !actions.is_empty() || !held.is_empty();
    if record {
        let id = view.next_decision;
        view.next_decision = id.saturating_add(1);
        let mut evidence = ctx.evidence;
        evidence.sort_unstable();
        evidence.dedup();
        view.decisions.push(Decision {
            id,
            at: now,
            rule: ctx.rule,
            rule_id: ctx.rule.id().to_owned(),
            rule_version: ctx.rule.version(),
            catalog_revision: CATALOG_REVISION.to_owned(),
            evidence,
            facts: ctx.facts,
            rejected: ctx.rejected,
            actions: actions.clone(),
            held,
            breaker: view.breaker.snapshot(),
            operator: ctx.operator,
        });
    }
    actions
}

/// Keeps an `Escalate` only when no escalation with its key is open or acknowledged
/// (otherwise counts the occurrence), a `ResolveEscalation` only when there is one to
/// resolve.
fn dedup_escalation(view: &mut FleetView, action: &Action, now: UnixMillis) -> bool {
    match action {
        Action::Escalate {
            key,
            severity,
            summary,
        } => match view.escalations.get_mut(key) {
            Some(e) if e.state != EscalationState::Resolved => {
                e.occurrences = e.occurrences.saturating_add(1);
                e.last_seen = now;
                e.severity = e.severity.max(*severity);
                false
            }
            _ => {
                view.escalations.insert(
                    key.clone(),
                    Escalation {
                        key: key.clone(),
                        state: EscalationState::Open,
                        severity: *severity,
                        summary: summary.clone(),
                        opened: now,
                        last_seen: now,
                        occurrences: 1,
                        level: 0,
                        last_notified: now,
                    },
                );
                true
            }
        },
        Action::ResolveEscalation { key } => match view.escalations.get_mut(key) {
            Some(e) if e.state != EscalationState::Resolved => {
                e.state = EscalationState::Resolved;
                true
            }
            _ => false,
        },
        _ => true,
    }
}
