//! Data-driven fixtures: an initial fleet, inputs at simulated times, and the exact
//! actions each input must produce. Escalation summaries are compared separately (where a
//! test cares), so a reworded summary does not break every fixture.

use razar_engine::breaker::Scope;
use razar_engine::decision::Decision;
use razar_engine::model::EscalationState;
use razar_engine::{
    decide, Action, EngineConfig, EscalationKey, EscalationKind, FailureKind, FleetView, GpuHealth,
    Input, Rule, Rung, UnixMillis,
};
use razar_shared::domain::Severity;

const MIN: i64 = 60_000;

/// h1, h2, h3 with two H100s each (`hN-g0`, `hN-g1`); `llm` on g0 and `embed` on g1,
/// both at v1 since t=0.
fn fleet(config: EngineConfig) -> FleetView {
    let mut v = FleetView::new(config).expect("valid config");
    for h in ["h1", "h2", "h3"] {
        add_host(&mut v, h, "H100");
    }
    v
}

fn add_host(v: &mut FleetView, h: &str, model: &str) {
    let g0 = format!("{h}-g0");
    let g1 = format!("{h}-g1");
    v.add_gpu(h, &g0, 0, model);
    v.add_gpu(h, &g1, 1, model);
    v.add_component(h, "llm", "v1", None, 0, &[&g0]);
    v.add_component(h, "embed", "v1", None, 0, &[&g1]);
}

/// The defaults, except re-notification (a day, out of the way of the GPU fixtures;
/// its own test sets it).
fn config() -> EngineConfig {
    EngineConfig {
        renotify_after_ms: 24 * 60 * MIN,
        ..EngineConfig::default()
    }
}

/// Feeds each input at its time and compares the actions it produced with the
/// expected ones (escalation summaries blanked). Returns the view for further checks.
fn check(mut view: FleetView, steps: Vec<(UnixMillis, Input, Vec<Action>)>) -> FleetView {
    for (i, (now, input, expected)) in steps.into_iter().enumerate() {
        let actions: Vec<Action> = decide(&mut view, &input, now)
            .into_iter()
            .map(blank)
            .collect();
        assert_eq!(
            actions, expected,
            "step {i} at t={now}: {input:?}\ndecisions so far:\n{:#?}",
            view.decisions
        );
    }
    view
}

fn blank(action: Action) -> Action {
    match action {
        Action::Escalate { key, severity, .. } => Action::Escalate {
            key,
            severity,
            summary: String::new(),
        },
        other => other,
    }
}

fn xid(host: &str, gpu: &str, code: u32, revs: &[(&str, &str)], event: i64) -> Input {
    Input::XidObserved {
        host: host.into(),
        gpu: gpu.into(),
        xid: code,
        revisions: revs
            .iter()
            .map(|(c, r)| ((*c).to_owned(), (*r).to_owned()))
            .collect(),
        message: None,
        event,
    }
}

fn xid_msg(host: &str, gpu: &str, code: u32, message: &str, event: i64) -> Input {
    match xid(host, gpu, code, &[], event) {
        Input::XidObserved {
            host,
            gpu,
            xid,
            revisions,
            event,
            ..
        } => Input::XidObserved {
            host,
            gpu,
            xid,
            revisions,
            message: Some(message.into()),
            event,
        },
        other => other,
    }
}

fn failed(host: &str, component: &str, revision: &str, kind: FailureKind, event: i64) -> Input {
    Input::ComponentFailed {
        host: host.into(),
        component: component.into(),
        revision: revision.into(),
        kind,
        event,
    }
}

fn started(host: &str, component: &str, revision: &str, gpu: &str, event: i64) -> Input {
    Input::RevisionStarted {
        host: host.into(),
        component: component.into(),
        revision: revision.into(),
        gpus: vec![gpu.into()],
        event,
    }
}

fn reset_done(host: &str, gpu: &str, ok: bool, event: i64) -> Input {
    Input::GpuResetDone {
        host: host.into(),
        gpu: gpu.into(),
        ok,
        event,
    }
}

fn quarantine(host: &str, gpu: &str) -> Action {
    Action::QuarantineGpu {
        host: host.into(),
        gpu: gpu.into(),
    }
}

fn drain(host: &str, gpu: &str, components: &[&str]) -> Action {
    Action::DrainComponents {
        host: host.into(),
        gpu: Some(gpu.into()),
        components: components.iter().map(|c| (*c).to_owned()).collect(),
    }
}

fn reset(host: &str, gpu: &str) -> Action {
    Action::ResetGpu {
        host: host.into(),
        gpu: gpu.into(),
    }
}

fn reboot(host: &str) -> Action {
    Action::RequestReboot { host: host.into() }
}

/// A reboot is asked of a person: its escalation.
fn reboot_esc(host: &str) -> Action {
    esc(
        Some(host),
        "host",
        EscalationKind::RebootRequested,
        Severity::Critical,
    )
}

fn inspect(host: &str, gpu: &str) -> Action {
    Action::RequireInspection {
        host: host.into(),
        gpu: gpu.into(),
    }
}

fn back_to_service(host: &str, gpu: &str) -> Action {
    Action::ReturnGpuToService {
        host: host.into(),
        gpu: gpu.into(),
    }
}

fn restart(host: &str, components: &[&str]) -> Action {
    Action::RestartComponents {
        host: host.into(),
        components: components.iter().map(|c| (*c).to_owned()).collect(),
    }
}

fn key(host: Option<&str>, subject: &str, kind: EscalationKind) -> EscalationKey {
    EscalationKey::new(host, subject, kind)
}

fn esc(host: Option<&str>, subject: &str, kind: EscalationKind, severity: Severity) -> Action {
    Action::Escalate {
        key: key(host, subject, kind),
        severity,
        summary: String::new(),
    }
}

fn resolve(host: Option<&str>, subject: &str, kind: EscalationKind) -> Action {
    Action::ResolveEscalation {
        key: key(host, subject, kind),
    }
}

fn gpu_fault(host: &str, gpu: &str, severity: Severity) -> Action {
    esc(Some(host), gpu, EscalationKind::GpuFault, severity)
}

/// The usual answer to a hardware fault: quarantine, drain, reset, escalate.
fn hardware_reset(host: &str, gpu: &str, components: &[&str]) -> Vec<Action> {
    vec![
        quarantine(host, gpu),
        drain(host, gpu, components),
        reset(host, gpu),
        gpu_fault(host, gpu, Severity::Warning),
    ]
}

fn last(view: &FleetView) -> &Decision {
    view.decisions.last().expect("a decision")
}

fn health(view: &FleetView, host: &str, gpu: &str) -> GpuHealth {
    view.gpu(host, gpu).expect("gpu").health
}

// ------------------------------------------------------------------------- XIDs

#[test]
fn xid_48_alone_resets_that_gpu_only() {
    let v = check(
        fleet(config()),
        vec![(
            1000,
            xid("h1", "h1-g0", 48, &[("llm", "v1")], 1),
            vec![
                quarantine("h1", "h1-g0"),
                reset("h1", "h1-g0"),
                gpu_fault("h1", "h1-g0", Severity::Warning),
            ],
        )],
    );
    let d = last(&v);
    assert_eq!(d.rule, Rule::Xid48);
    assert_eq!(d.rule_id, "xid.48");
    assert_eq!(d.evidence, vec![1]);
    assert!(d.catalog_revision.starts_with("nvidia-xid-catalog/"));
    assert!(d.rejected.iter().any(|r| r.reason.contains("no XID 63/64")));
    assert!(matches!(
        health(&v, "h1", "h1-g0"),
        GpuHealth::Quarantined {
            rung: Rung::Reset,
            ..
        }
    ));
    assert_eq!(health(&v, "h1", "h1-g1"), GpuHealth::Healthy);
}

#[test]
fn xid_48_with_63_or_64_drains_and_resets() {
    // 63 before the 48.
    let v = check(
        fleet(config()),
        vec![
            (1000, xid("h1", "h1-g0", 63, &[], 1), vec![]),
            (
                2000,
                xid("h1", "h1-g0", 48, &[], 2),
                hardware_reset("h1", "h1-g0", &["llm"]),
            ),
        ],
    );
    assert_eq!(last(&v).evidence, vec![1, 2]);
    assert_eq!(v.decisions[0].rule, Rule::XidBucket, "63 alone is IGNORE");
    // 64 after the 48: the drain follows.
    let v = check(
        fleet(config()),
        vec![
            (
                1000,
                xid("h1", "h1-g0", 48, &[], 1),
                vec![
                    quarantine("h1", "h1-g0"),
                    reset("h1", "h1-g0"),
                    gpu_fault("h1", "h1-g0", Severity::Warning),
                ],
            ),
            (
                2000,
                xid("h1", "h1-g0", 64, &[], 2),
                vec![drain("h1", "h1-g0", &["llm"])],
            ),
        ],
    );
    assert_eq!(last(&v).rule, Rule::Xid48);
    // A 63 outside the window does not count.
    check(
        fleet(config()),
        vec![
            (0, xid("h1", "h1-g0", 63, &[], 1), vec![]),
            (
                11 * MIN,
                xid("h1", "h1-g0", 48, &[], 2),
                vec![
                    quarantine("h1", "h1-g0"),
                    reset("h1", "h1-g0"),
                    gpu_fault("h1", "h1-g0", Severity::Warning),
                ],
            ),
        ],
    );
}

#[test]
fn xid_13_once_is_an_application_fault() {
    let v = check(
        fleet(config()),
        vec![(
            1000,
            xid("h1", "h1-g0", 13, &[("llm", "v1")], 1),
            vec![restart("h1", &["llm"])],
        )],
    );
    let d = v
        .decisions
        .iter()
        .find(|d| d.rule == Rule::Xid13And31)
        .expect("xid decision");
    assert_eq!(d.rejected[0].alternative, "hardware fault");
    assert_eq!(health(&v, "h1", "h1-g0"), GpuHealth::Healthy);
}

#[test]
fn xid_13_31_repeated_on_one_gpu_is_hardware() {
    let r = &[("llm", "v1")];
    let v = check(
        fleet(config()),
        vec![
            (
                1000,
                xid("h1", "h1-g0", 13, r, 1),
                vec![restart("h1", &["llm"])],
            ),
            (
                2000,
                xid("h1", "h1-g0", 31, r, 2),
                vec![restart("h1", &["llm"])],
            ),
            // A 13 on another GPU is not this GPU's repetition.
            (
                2500,
                xid("h1", "h1-g1", 13, &[("embed", "v1")], 3),
                vec![restart("h1", &["embed"])],
            ),
            (
                3000,
                xid("h1", "h1-g0", 13, r, 4),
                hardware_reset("h1", "h1-g0", &["llm"]),
            ),
        ],
    );
    let d = last(&v);
    assert_eq!(d.evidence, vec![1, 2, 4]);
    assert!(d.rejected[0].reason.contains("repeated 3 times"), "{d:?}");
    // Repetitions further apart than the window do not add up.
    check(
        fleet(config()),
        vec![
            (
                0,
                xid("h1", "h1-g0", 13, r, 1),
                vec![restart("h1", &["llm"])],
            ),
            (
                11 * MIN,
                xid("h1", "h1-g0", 13, r, 2),
                vec![restart("h1", &["llm"])],
            ),
            (
                22 * MIN,
                xid("h1", "h1-g0", 13, r, 3),
                vec![restart("h1", &["llm"])],
            ),
        ],
    );
}

#[test]
fn xid_13_on_one_gpu_across_revisions_is_not_a_revision_fault() {
    let v = check(
        fleet(config()),
        vec![
            (
                1000,
                xid("h1", "h1-g0", 13, &[("llm", "v1")], 1),
                vec![restart("h1", &["llm"])],
            ),
            (2000, started("h1", "llm", "v2", "h1-g0", 2), vec![]),
            (
                3000,
                xid("h1", "h1-g0", 13, &[("llm", "v2")], 3),
                hardware_reset("h1", "h1-g0", &["llm"]),
            ),
        ],
    );
    let d = last(&v);
    assert_eq!(
        d.rejected[0].reason,
        "not a revision fault: same XID 13 on h1/GPU 0 under revisions llm@v1 and llm@v2"
    );
    assert!(!v.decisions.iter().any(|d| d
        .actions
        .iter()
        .any(|a| matches!(a, Action::RollBack { .. }))));
}

#[test]
fn xid_45_alone_asks_for_the_fabric_manager_and_follows_another_xid() {
    check(
        fleet(config()),
        vec![(
            1000,
            xid("h1", "h1-g0", 45, &[], 1),
            vec![esc(
                Some("h1"),
                "h1-g0",
                EscalationKind::FabricManager,
                Severity::Warning,
            )],
        )],
    );
    let v = check(
        fleet(config()),
        vec![
            (
                1000,
                xid("h1", "h1-g0", 79, &[], 1),
                vec![
                    quarantine("h1", "h1-g0"),
                    drain("h1", "h1-g0", &["llm"]),
                    reboot("h1"),
                    reboot_esc("h1"),
                    gpu_fault("h1", "h1-g0", Severity::Critical),
                ],
            ),
            (1500, xid("h1", "h1-g0", 45, &[], 2), vec![]),
        ],
    );
    let d = last(&v);
    assert_eq!(d.rule, Rule::Xid45);
    assert_eq!(d.evidence, vec![1, 2]);
    assert_eq!(d.rejected[0].reason, "XID 45 is not solo");
}

#[test]
fn xid_154_follows_the_recovery_action_in_its_message() {
    check(
        fleet(config()),
        vec![
            (
                1000,
                xid_msg(
                    "h1",
                    "h1-g0",
                    154,
                    "GPU recovery action changed from 0x0 (None) to 0x1 (GPU Reset Required)",
                    1,
                ),
                vec![
                    quarantine("h1", "h1-g0"),
                    reset("h1", "h1-g0"),
                    gpu_fault("h1", "h1-g0", Severity::Warning),
                ],
            ),
            (
                1000,
                xid_msg(
                    "h2",
                    "h2-g1",
                    154,
                    "GPU recovery action changed from 0x0 (None) to 0x2 (Node Reboot Required)",
                    2,
                ),
                vec![
                    quarantine("h2", "h2-g1"),
                    drain("h2", "h2-g1", &["embed"]),
                    reboot("h2"),
                    reboot_esc("h2"),
                    gpu_fault("h2", "h2-g1", Severity::Critical),
                ],
            ),
            (
                1000,
                xid_msg(
                    "h3",
                    "h3-g0",
                    154,
                    "GPU recovery action changed from 0x1 (GPU Reset Required) to 0x0 (None)",
                    3,
                ),
                vec![],
            ),
            (
                1000,
                xid("h3", "h3-g1", 154, &[], 4),
                vec![esc(
                    Some("h3"),
                    "h3-g1",
                    EscalationKind::XidUnknown,
                    Severity::Warning,
                )],
            ),
        ],
    );
}

#[test]
fn nvlink_workflows_drain_and_reset() {
    for code in [74, 144, 150] {
        check(
            fleet(config()),
            vec![(
                1000,
                xid("h2", "h2-g1", code, &[], 1),
                hardware_reset("h2", "h2-g1", &["embed"]),
            )],
        );
    }
}

#[test]
fn unknown_codes_are_escalated_never_dropped() {
    check(
        fleet(config()),
        vec![
            (
                1000,
                xid("h1", "h1-g0", 999, &[], 1),
                vec![esc(
                    Some("h1"),
                    "h1-g0/xid999",
                    EscalationKind::XidUnknown,
                    Severity::Warning,
                )],
            ),
            (
                1000,
                xid("h1", "h1-g0", 172, &[], 2),
                vec![esc(
                    Some("h1"),
                    "h1-g0/xid172",
                    EscalationKind::XidUnknown,
                    Severity::Warning,
                )],
            ),
            // The same unknown code again: one escalation, not two.
            (2000, xid("h1", "h1-g0", 999, &[], 3), vec![]),
        ],
    );
    // Every code, known or not, leaves a decision carrying its event.
    for code in 0..=200 {
        let mut v = fleet(config());
        decide(&mut v, &xid("h1", "h1-g0", code, &[], 7), 1000);
        assert!(
            v.decisions.iter().any(|d| d.evidence.contains(&7)),
            "XID {code} left no decision"
        );
    }
}

// ------------------------------------------------------------------ GPU ladder

#[test]
fn probation_returns_a_gpu_only_after_a_quiet_period() {
    let probation = config().probation_ms;
    check(
        fleet(config()),
        vec![
            (
                0,
                xid("h1", "h1-g0", 95, &[], 1),
                hardware_reset("h1", "h1-g0", &["llm"]),
            ),
            (MIN, reset_done("h1", "h1-g0", true, 2), vec![]),
            (MIN + probation - 1, Input::Tick, vec![]),
            (
                MIN + probation,
                Input::Tick,
                vec![
                    back_to_service("h1", "h1-g0"),
                    resolve(Some("h1"), "h1-g0", EscalationKind::GpuFault),
                ],
            ),
            (MIN + probation + 1, Input::Tick, vec![]),
        ],
    );
}

#[test]
fn the_ladder_climbs_reset_then_reboot_then_inspection() {
    let probation = config().probation_ms;
    let v = check(
        fleet(config()),
        vec![
            (
                0,
                xid("h1", "h1-g0", 95, &[], 1),
                hardware_reset("h1", "h1-g0", &["llm"]),
            ),
            (MIN, reset_done("h1", "h1-g0", true, 2), vec![]),
            // A fault in probation: one rung up, a host reboot. The escalation is open.
            (
                2 * MIN,
                xid("h1", "h1-g0", 95, &[], 3),
                vec![
                    quarantine("h1", "h1-g0"),
                    drain("h1", "h1-g0", &["llm"]),
                    reboot("h1"),
                    reboot_esc("h1"),
                ],
            ),
            (
                3 * MIN,
                Input::HostLost {
                    host: "h1".into(),
                    event: 4,
                },
                vec![esc(
                    Some("h1"),
                    "host",
                    EscalationKind::HostLost,
                    Severity::Critical,
                )],
            ),
            (
                4 * MIN,
                Input::HostBack {
                    host: "h1".into(),
                    event: 5,
                },
                vec![
                    resolve(Some("h1"), "host", EscalationKind::HostLost),
                    resolve(Some("h1"), "host", EscalationKind::RebootRequested),
                ],
            ),
            // Probation after the reboot: a fault now exhausts the ladder.
            (
                5 * MIN,
                xid("h1", "h1-g0", 95, &[], 6),
                vec![
                    quarantine("h1", "h1-g0"),
                    drain("h1", "h1-g0", &["llm"]),
                    inspect("h1", "h1-g0"),
                    esc(
                        Some("h1"),
                        "h1-g0",
                        EscalationKind::GpuInspection,
                        Severity::Critical,
                    ),
                ],
            ),
            // Inspection is not left by time.
            (5 * MIN + 2 * probation, Input::Tick, vec![]),
        ],
    );
    assert!(matches!(
        health(&v, "h1", "h1-g0"),
        GpuHealth::Inspection { .. }
    ));
    assert_eq!(health(&v, "h1", "h1-g1"), GpuHealth::Healthy);
}

#[test]
fn a_failed_reset_requests_a_reboot() {
    check(
        fleet(config()),
        vec![
            (
                0,
                xid("h2", "h2-g0", 119, &[], 1),
                hardware_reset("h2", "h2-g0", &["llm"]),
            ),
            (
                MIN,
                reset_done("h2", "h2-g0", false, 2),
                vec![reboot("h2"), reboot_esc("h2")],
            ),
            // A late, duplicate result changes nothing.
            (2 * MIN, reset_done("h2", "h2-g0", true, 3), vec![]),
        ],
    );
}

#[test]
fn a_lemon_goes_to_inspection() {
    let probation = config().probation_ms;
    let mut steps = Vec::new();
    let mut t = 0;
    for cycle in 0..2 {
        let e = cycle * 10;
        steps.push((
            t,
            xid("h3", "h3-g1", 95, &[], e + 1),
            hardware_reset("h3", "h3-g1", &["embed"]),
        ));
        steps.push((t + MIN, reset_done("h3", "h3-g1", true, e + 2), vec![]));
        steps.push((
            t + MIN + probation,
            Input::Tick,
            vec![
                back_to_service("h3", "h3-g1"),
                resolve(Some("h3"), "h3-g1", EscalationKind::GpuFault),
            ],
        ));
        t += 2 * MIN + probation;
    }
    steps.push((
        t,
        xid("h3", "h3-g1", 95, &[], 99),
        vec![
            quarantine("h3", "h3-g1"),
            drain("h3", "h3-g1", &["embed"]),
            inspect("h3", "h3-g1"),
            esc(
                Some("h3"),
                "h3-g1",
                EscalationKind::GpuInspection,
                Severity::Critical,
            ),
        ],
    ));
    let v = check(fleet(config()), steps);
    assert!(
        last(&v)
            .facts
            .iter()
            .any(|f| f.contains("3 quarantine cycles")),
        "{:?}",
        last(&v)
    );
}

#[test]
fn operator_overrides_are_decisions() {
    let v = check(
        fleet(config()),
        vec![
            (
                0,
                Input::OperatorOverride {
                    host: "h1".into(),
                    gpu: "h1-g1".into(),
                    healthy: false,
                    note: "fan noise".into(),
                    who: "ana".into(),
                    event: 1,
                },
                vec![quarantine("h1", "h1-g1"), drain("h1", "h1-g1", &["embed"])],
            ),
            (
                MIN,
                Input::OperatorOverride {
                    host: "h1".into(),
                    gpu: "h1-g1".into(),
                    healthy: true,
                    note: "fan replaced".into(),
                    who: "bo".into(),
                    event: 2,
                },
                vec![back_to_service("h1", "h1-g1")],
            ),
        ],
    );
    let d = last(&v);
    assert_eq!(d.rule, Rule::GpuOverride);
    assert_eq!(d.operator.as_deref(), Some("bo"));
    assert!(d.facts[0].contains("fan replaced"));
    assert_eq!(health(&v, "h1", "h1-g1"), GpuHealth::Healthy);
}

// ------------------------------------------------------------------------ blame

fn rollback(host: &str, component: &str, to: &str) -> Action {
    Action::RollBack {
        host: host.into(),
        component: component.into(),
        to_revision: to.into(),
    }
}

fn pause(component: &str, revision: &str) -> Action {
    Action::PauseDeployment {
        component: component.into(),
        revision: revision.into(),
    }
}

fn blamed(component_at: &str) -> Action {
    esc(
        None,
        component_at,
        EscalationKind::RevisionBlamed,
        Severity::Critical,
    )
}

#[test]
fn a_canary_failing_on_its_new_revision_is_rolled_back() {
    let cfg = EngineConfig {
        blame_min_places: 1,
        ..config()
    };
    let v = check(
        fleet(cfg),
        vec![
            (1000, started("h1", "llm", "v2", "h1-g0", 1), vec![]),
            (
                2000,
                failed("h1", "llm", "v2", FailureKind::CrashLoop, 2),
                vec![
                    rollback("h1", "llm", "v1"),
                    pause("llm", "v2"),
                    blamed("llm@v2"),
                ],
            ),
            // Blamed once.
            (
                3000,
                failed("h1", "llm", "v2", FailureKind::CrashLoop, 3),
                vec![],
            ),
        ],
    );
    let d = v
        .decisions
        .iter()
        .find(|d| d.rule == Rule::Blame)
        .expect("blame");
    assert!(
        d.facts
            .iter()
            .any(|f| f == "clean on older revisions: h2, h3"),
        "{d:?}"
    );
}

#[test]
fn blame_waits_for_enough_distinct_places() {
    let v = check(
        fleet(config()),
        vec![
            (1000, started("h1", "llm", "v2", "h1-g0", 1), vec![]),
            (1000, started("h2", "llm", "v2", "h2-g0", 2), vec![]),
            (
                2000,
                failed("h1", "llm", "v2", FailureKind::Liveness, 3),
                vec![],
            ),
            // The same host again is not a second place.
            (
                2500,
                failed("h1", "llm", "v2", FailureKind::Liveness, 4),
                vec![],
            ),
        ],
    );
    let d = last(&v);
    assert_eq!(d.rule, Rule::Blame);
    assert_eq!(d.rejected[0].reason, "seen on 1 of 2 required GPUs/hosts");
    check(
        v,
        vec![(
            3000,
            failed("h2", "llm", "v2", FailureKind::CrashLoop, 5),
            vec![
                rollback("h1", "llm", "v1"),
                rollback("h2", "llm", "v1"),
                pause("llm", "v2"),
                blamed("llm@v2"),
            ],
        )],
    );
}

#[test]
fn application_xids_spread_over_gpus_blame_the_revision() {
    let v2 = &[("llm", "v2")];
    check(
        fleet(config()),
        vec![
            (1000, started("h1", "llm", "v2", "h1-g0", 1), vec![]),
            (1000, started("h2", "llm", "v2", "h2-g0", 2), vec![]),
            (
                2000,
                xid("h1", "h1-g0", 31, v2, 3),
                vec![restart("h1", &["llm"])],
            ),
            (
                2000,
                xid("h2", "h2-g0", 31, v2, 4),
                vec![
                    restart("h2", &["llm"]),
                    rollback("h1", "llm", "v1"),
                    rollback("h2", "llm", "v1"),
                    pause("llm", "v2"),
                    blamed("llm@v2"),
                ],
            ),
        ],
    );
}

#[test]
fn the_same_failure_on_the_old_revision_is_not_the_revisions_fault() {
    let v = check(
        fleet(EngineConfig {
            blame_min_places: 1,
            ..config()
        }),
        vec![
            (
                0,
                failed("h3", "llm", "v1", FailureKind::CrashLoop, 1),
                vec![],
            ),
            (1000, started("h1", "llm", "v2", "h1-g0", 2), vec![]),
            (
                2000,
                failed("h1", "llm", "v2", FailureKind::CrashLoop, 3),
                vec![],
            ),
        ],
    );
    let d = last(&v);
    assert_eq!(d.rule, Rule::Blame);
    assert_eq!(d.evidence, vec![1, 3]);
    assert!(
        d.rejected[0]
            .reason
            .starts_with("not a revision fault: llm fails on v1 too"),
        "{d:?}"
    );
}

#[test]
fn a_failure_that_began_before_the_revision_is_not_blamed_on_it() {
    let v = check(
        fleet(EngineConfig {
            blame_min_places: 1,
            ..config()
        }),
        vec![
            (500, started("h1", "llm", "v2", "h1-g0", 1), vec![]),
            // Failing already under v2 before v3 started (same host).
            (
                600,
                failed("h1", "llm", "v2", FailureKind::CrashLoop, 2),
                vec![
                    rollback("h1", "llm", "v1"),
                    pause("llm", "v2"),
                    blamed("llm@v2"),
                ],
            ),
            (1000, started("h1", "llm", "v3", "h1-g0", 3), vec![]),
            (
                2000,
                failed("h1", "llm", "v3", FailureKind::CrashLoop, 4),
                vec![],
            ),
        ],
    );
    let d = last(&v);
    assert!(
        d.rejected[0]
            .reason
            .starts_with("began before v3 started on h1"),
        "{d:?}"
    );
}

#[test]
fn a_failure_on_a_quarantined_gpu_is_hardware_not_the_revision() {
    let v = check(
        fleet(EngineConfig {
            blame_min_places: 1,
            ..config()
        }),
        vec![
            (1000, started("h1", "llm", "v2", "h1-g0", 1), vec![]),
            (
                1500,
                xid("h1", "h1-g0", 48, &[], 2),
                vec![
                    quarantine("h1", "h1-g0"),
                    reset("h1", "h1-g0"),
                    gpu_fault("h1", "h1-g0", Severity::Warning),
                ],
            ),
            (
                2000,
                xid("h1", "h1-g0", 94, &[("llm", "v2")], 3),
                vec![restart("h1", &["llm"])],
            ),
        ],
    );
    let d = last(&v);
    assert!(
        d.rejected[0].reason.starts_with("hardware-class fault"),
        "{d:?}"
    );
}

#[test]
fn a_component_failing_on_a_quarantined_gpu_is_not_blamed_on_its_revision() {
    let v = check(
        fleet(EngineConfig {
            blame_min_places: 1,
            ..config()
        }),
        vec![
            (1000, started("h1", "llm", "v2", "h1-g0", 1), vec![]),
            (
                1500,
                xid("h1", "h1-g0", 119, &[], 2),
                hardware_reset("h1", "h1-g0", &["llm"]),
            ),
            // Drained with its GPU, it fails its liveness probe: not v2's fault.
            (
                2000,
                failed("h1", "llm", "v2", FailureKind::Liveness, 3),
                vec![],
            ),
        ],
    );
    let d = last(&v);
    assert_eq!(d.rule, Rule::Blame);
    assert!(
        d.rejected[0]
            .reason
            .starts_with("hardware-class fault: h1/GPU 0"),
        "{d:?}"
    );
}

// ----------------------------------------------------------------------- silence

#[test]
fn silence_escalates_and_host_back_resolves() {
    let v = check(
        fleet(config()),
        vec![
            (
                0,
                Input::HostLost {
                    host: "h2".into(),
                    event: 1,
                },
                vec![esc(
                    Some("h2"),
                    "host",
                    EscalationKind::HostLost,
                    Severity::Critical,
                )],
            ),
            (
                MIN,
                Input::HostLost {
                    host: "h2".into(),
                    event: 2,
                },
                vec![],
            ),
            (
                2 * MIN,
                Input::HostBack {
                    host: "h2".into(),
                    event: 3,
                },
                vec![resolve(Some("h2"), "host", EscalationKind::HostLost)],
            ),
            (
                3 * MIN,
                Input::HeartbeatsWithoutSamples {
                    host: "h3".into(),
                    event: 4,
                },
                vec![esc(
                    Some("h3"),
                    "sampler",
                    EscalationKind::SamplerStalled,
                    Severity::Warning,
                )],
            ),
            (
                4 * MIN,
                Input::PulseMissed {
                    host: "h3".into(),
                    component: "llm".into(),
                    event: 5,
                },
                vec![esc(
                    Some("h3"),
                    "llm",
                    EscalationKind::PulseMissed,
                    Severity::Warning,
                )],
            ),
            // Samples again: the stall's escalation resolves (and only once).
            (
                4 * MIN + 1,
                Input::SamplesResumed {
                    host: "h3".into(),
                    event: 7,
                },
                vec![resolve(
                    Some("h3"),
                    "sampler",
                    EscalationKind::SamplerStalled,
                )],
            ),
            (
                4 * MIN + 2,
                Input::SamplesResumed {
                    host: "h3".into(),
                    event: 8,
                },
                vec![],
            ),
            // Lost again after being back: a new escalation.
            (
                5 * MIN,
                Input::HostLost {
                    host: "h2".into(),
                    event: 6,
                },
                vec![esc(
                    Some("h2"),
                    "host",
                    EscalationKind::HostLost,
                    Severity::Critical,
                )],
            ),
        ],
    );
    let e = &v.escalations[&key(Some("h2"), "host", EscalationKind::HostLost)];
    assert_eq!(e.state, EscalationState::Open);
    assert_eq!(e.occurrences, 1);
}

// ------------------------------------------------------------------- escalations

#[test]
fn escalations_are_deduplicated_acknowledged_resolved_and_renotified() {
    let k = key(Some("h1"), "sampler", EscalationKind::SamplerStalled);
    let stalled = |event| Input::HeartbeatsWithoutSamples {
        host: "h1".into(),
        event,
    };
    let renotify = config().renotify_after_ms;
    let v = check(
        fleet(config()),
        vec![
            (
                0,
                stalled(1),
                vec![esc(
                    Some("h1"),
                    "sampler",
                    EscalationKind::SamplerStalled,
                    Severity::Warning,
                )],
            ),
            (MIN, stalled(2), vec![]),
            (
                renotify,
                Input::Tick,
                vec![Action::Notify {
                    key: k.clone(),
                    level: 1,
                }],
            ),
            (renotify + 1, Input::Tick, vec![]),
            (
                renotify + 2,
                Input::EscalationAcknowledged {
                    key: k.clone(),
                    who: "ana".into(),
                    event: 3,
                },
                vec![],
            ),
            // Acknowledged: no re-notification, still deduplicated.
            (3 * renotify, Input::Tick, vec![]),
            (3 * renotify, stalled(4), vec![]),
            (
                3 * renotify + 1,
                Input::EscalationResolved {
                    key: k.clone(),
                    who: "ana".into(),
                    event: 5,
                },
                vec![],
            ),
            // Resolved: the next one opens anew.
            (
                3 * renotify + 2,
                stalled(6),
                vec![esc(
                    Some("h1"),
                    "sampler",
                    EscalationKind::SamplerStalled,
                    Severity::Warning,
                )],
            ),
        ],
    );
    assert_eq!(v.escalations[&k].occurrences, 1);
    assert!(v
        .decisions
        .iter()
        .any(|d| d.rule == Rule::EscalationLifecycle && d.operator.as_deref() == Some("ana")));
}

// ----------------------------------------------------------------------- breaker

fn breaker_config(max_hosts: u32) -> EngineConfig {
    let mut c = config();
    c.breaker.max_hosts = max_hosts;
    c
}

#[test]
fn the_breaker_holds_mass_actions_and_lets_recovery_through() {
    let cooldown = config().breaker.cooldown_ms;
    let mut v = fleet(breaker_config(2));
    add_host(&mut v, "h4", "H100");
    let v = check(
        v,
        vec![
            (
                0,
                xid("h1", "h1-g0", 95, &[], 1),
                hardware_reset("h1", "h1-g0", &["llm"]),
            ),
            (
                1,
                xid("h2", "h2-g0", 95, &[], 2),
                hardware_reset("h2", "h2-g0", &["llm"]),
            ),
            // A third host in the window: held, one escalation listing it.
            (
                2,
                xid("h3", "h3-g0", 95, &[], 3),
                vec![
                    gpu_fault("h3", "h3-g0", Severity::Warning),
                    esc(
                        None,
                        "fleet",
                        EscalationKind::BreakerOpen,
                        Severity::Critical,
                    ),
                ],
            ),
            // A fourth: held too, no second breaker escalation.
            (
                3,
                xid("h4", "h4-g1", 95, &[], 4),
                vec![gpu_fault("h4", "h4-g1", Severity::Warning)],
            ),
            // Recovery is never held.
            (
                4,
                Input::OperatorOverride {
                    host: "h4".into(),
                    gpu: "h4-g1".into(),
                    healthy: true,
                    note: "false alarm".into(),
                    who: "ana".into(),
                    event: 5,
                },
                vec![
                    back_to_service("h4", "h4-g1"),
                    resolve(Some("h4"), "h4-g1", EscalationKind::GpuFault),
                ],
            ),
            (MIN, reset_done("h1", "h1-g0", true, 6), vec![]),
            // Cool-down over: half-open; the held actions are re-evaluated: h4's are
            // stale (the operator returned the GPU), h3's first one goes through as the trial.
            (2 + cooldown, Input::Tick, vec![quarantine("h3", "h3-g0")]),
            // The trial went through: closed; what is still needed goes under the limits.
            (
                3 + cooldown,
                Input::Tick,
                vec![
                    resolve(None, "fleet", EscalationKind::BreakerOpen),
                    drain("h3", "h3-g0", &["llm"]),
                    reset("h3", "h3-g0"),
                ],
            ),
        ],
    );
    let opened = v
        .decisions
        .iter()
        .find(|d| d.evidence == vec![3])
        .expect("decision of event 3");
    assert_eq!(opened.held.len(), 3, "{opened:?}");
    assert_eq!(opened.breaker[0].scope, "fleet");
    let e = &v.escalations[&key(None, "fleet", EscalationKind::BreakerOpen)];
    assert!(e.summary.contains("reset h4/h4-g1"), "{}", e.summary);
    let half_open = v
        .decisions
        .iter()
        .find(|d| d.rule == Rule::Breaker && d.facts.iter().any(|f| f.contains("half-open trial")))
        .expect("half-open decision");
    assert!(
        half_open
            .rejected
            .iter()
            .any(|r| r.reason.starts_with("stale: h4/h4-g1 is now Healthy")),
        "{half_open:?}"
    );
    for d in &v.decisions {
        assert!(
            !d.held.iter().any(|a| matches!(
                a,
                Action::ReturnGpuToService { .. } | Action::ResolveEscalation { .. }
            )),
            "recovery held: {d:?}"
        );
    }
}

#[test]
fn the_breaker_opens_per_gpu_model_scope() {
    // Share limits: 50 % of a scope with at least 3 hosts.
    let mut c = breaker_config(100);
    c.breaker.max_share_percent = 50;
    c.breaker.share_min_population = 3;
    let mut v = fleet(c);
    for h in ["b1", "b2", "b3"] {
        add_host(&mut v, h, "B200");
    }
    let v = check(
        v,
        vec![
            (
                0,
                xid("h1", "h1-g0", 95, &[], 1),
                hardware_reset("h1", "h1-g0", &["llm"]),
            ),
            // 2 of 3 H100 hosts: the H100 scope opens; the fleet (2 of 6) is fine.
            (
                1,
                xid("h2", "h2-g0", 95, &[], 2),
                vec![
                    gpu_fault("h2", "h2-g0", Severity::Warning),
                    esc(
                        None,
                        "model:H100",
                        EscalationKind::BreakerOpen,
                        Severity::Critical,
                    ),
                ],
            ),
            // A B200 host is outside that scope.
            (
                2,
                xid("b1", "b1-g0", 95, &[], 3),
                hardware_reset("b1", "b1-g0", &["llm"]),
            ),
        ],
    );
    assert!(v
        .breaker
        .scopes
        .contains_key(&Scope::GpuModel("H100".into())));
    assert!(!v.breaker.scopes.contains_key(&Scope::Fleet));
}

#[test]
fn an_invalid_configuration_is_refused() {
    let err = FleetView::new(EngineConfig {
        lemon_cycles: 0,
        ..config()
    })
    .expect_err("invalid");
    assert!(err.to_string().contains("lemon_cycles"), "{err}");
}

#[test]
fn decisions_round_trip_through_json_for_the_store() {
    let mut v = fleet(breaker_config(1));
    decide(&mut v, &xid("h1", "h1-g0", 48, &[], 1), 1000);
    decide(&mut v, &xid("h2", "h2-g0", 48, &[], 2), 1001);
    let d = v.take_decisions();
    assert_eq!(d.len(), 2);
    assert!(v.decisions.is_empty());
    assert!(!d[1].held.is_empty(), "{:?}", d[1]);
    for decision in &d {
        let json = serde_json::to_string(decision).expect("serialize");
        let back: Decision = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(&back, decision);
    }
    let json = serde_json::to_value(&d[0]).expect("serialize");
    assert_eq!(json["rule_id"], "xid.48");
    assert_eq!(json["rule_version"], 2);
}

#[test]
fn the_breaker_opens_per_revision_scope() {
    // Share limits: 50 % of a scope with at least 2 hosts. llm@v2 runs on 2 of 6
    // hosts; quarantining both of its GPUs opens that scope, not the fleet.
    let mut c = breaker_config(100);
    c.breaker.max_share_percent = 50;
    c.breaker.share_min_population = 2;
    c.breaker.max_gpus = 100;
    let mut v = fleet(c);
    for h in ["h4", "h5", "h6"] {
        add_host(&mut v, h, "H100");
    }
    v.add_component("h1", "llm", "v2", Some("v1"), 0, &["h1-g0"]);
    v.add_component("h2", "llm", "v2", Some("v1"), 0, &["h2-g0"]);
    let v = check(
        v,
        vec![
            (
                0,
                xid("h1", "h1-g1", 95, &[], 1),
                hardware_reset("h1", "h1-g1", &["embed"]),
            ),
            (
                1,
                xid("h1", "h1-g0", 95, &[], 2),
                hardware_reset("h1", "h1-g0", &["llm"]),
            ),
            (
                2,
                xid("h2", "h2-g0", 95, &[], 3),
                vec![
                    gpu_fault("h2", "h2-g0", Severity::Warning),
                    esc(
                        None,
                        "revision:llm@v2",
                        EscalationKind::BreakerOpen,
                        Severity::Critical,
                    ),
                ],
            ),
            // Another GPU of h2, outside that revision, is not held.
            (
                3,
                xid("h2", "h2-g1", 95, &[], 4),
                hardware_reset("h2", "h2-g1", &["embed"]),
            ),
        ],
    );
    assert!(v.breaker.scopes.contains_key(&Scope::Revision {
        component: "llm".into(),
        revision: "v2".into()
    }));
    assert_eq!(v.breaker.scopes.len(), 1);
}

#[test]
fn the_breaker_opens_per_host_label_scope() {
    // Share limits: 50 % of a scope with at least 2 hosts. h1 and h2 carry the label
    // profile=train, h3..h6 profile=serve: the second train host touched opens that
    // scope only; the fleet, the model and the revisions stay under their limits.
    let mut c = breaker_config(100);
    c.breaker.max_share_percent = 50;
    c.breaker.share_min_population = 2;
    c.breaker.max_gpus = 100;
    let mut v = fleet(c);
    for h in ["h4", "h5", "h6"] {
        add_host(&mut v, h, "H100");
    }
    for (h, profile) in [
        ("h1", "train"),
        ("h2", "train"),
        ("h3", "serve"),
        ("h4", "serve"),
        ("h5", "serve"),
        ("h6", "serve"),
    ] {
        v.hosts.get_mut(h).expect("host").profile = profile.into();
    }
    let v = check(
        v,
        vec![
            (
                0,
                xid("h1", "h1-g0", 95, &[], 1),
                hardware_reset("h1", "h1-g0", &["llm"]),
            ),
            (
                1,
                xid("h2", "h2-g0", 95, &[], 2),
                vec![
                    gpu_fault("h2", "h2-g0", Severity::Warning),
                    esc(
                        None,
                        "label:profile=train",
                        EscalationKind::BreakerOpen,
                        Severity::Critical,
                    ),
                ],
            ),
            // A host of another profile is not held.
            (
                2,
                xid("h3", "h3-g0", 95, &[], 3),
                hardware_reset("h3", "h3-g0", &["llm"]),
            ),
        ],
    );
    assert_eq!(
        v.breaker.scopes.keys().collect::<Vec<_>>(),
        vec![&Scope::Label {
            key: "profile".into(),
            value: "train".into()
        }]
    );
    assert_eq!(
        v.breaker.scopes.values().next().map(|b| b.held.len()),
        Some(3)
    );
}

#[test]
fn a_half_open_trial_waits_for_every_open_scope_of_its_action() {
    let cooldown = config().breaker.cooldown_ms;
    let mut c = breaker_config(100);
    c.breaker.max_gpus = 100;
    c.breaker.max_share_percent = 50;
    c.breaker.share_min_population = 3;
    let mut v = fleet(c);
    for h in ["h4", "h5", "h6"] {
        add_host(&mut v, h, "H100");
    }
    for h in ["b1", "b2", "b3"] {
        add_host(&mut v, h, "B200");
    }
    let b200 = "model:B200";
    check(
        v,
        vec![
            (
                0,
                xid("b1", "b1-g0", 95, &[], 1),
                hardware_reset("b1", "b1-g0", &["llm"]),
            ),
            // 2 of 3 B200 hosts: that scope opens.
            (
                1,
                xid("b2", "b2-g0", 95, &[], 2),
                vec![
                    gpu_fault("b2", "b2-g0", Severity::Warning),
                    esc(None, b200, EscalationKind::BreakerOpen, Severity::Critical),
                ],
            ),
            (
                2,
                xid("h1", "h1-g0", 95, &[], 3),
                hardware_reset("h1", "h1-g0", &["llm"]),
            ),
            (
                3,
                xid("h2", "h2-g0", 95, &[], 4),
                hardware_reset("h2", "h2-g0", &["llm"]),
            ),
            (
                4,
                xid("h3", "h3-g0", 95, &[], 5),
                hardware_reset("h3", "h3-g0", &["llm"]),
            ),
            // 5 of 9 hosts: the fleet opens too.
            (
                5,
                xid("h4", "h4-g0", 95, &[], 6),
                vec![
                    gpu_fault("h4", "h4-g0", Severity::Warning),
                    esc(
                        None,
                        "fleet",
                        EscalationKind::BreakerOpen,
                        Severity::Critical,
                    ),
                ],
            ),
            // B200 cooled down, but its held actions are in the open fleet scope too.
            (1 + cooldown, Input::Tick, vec![]),
            // The fleet cooled down: its trial; B200 still waits (fleet trial spent).
            (5 + cooldown, Input::Tick, vec![quarantine("h4", "h4-g0")]),
            // The fleet closes; now B200's trial.
            (
                6 + cooldown,
                Input::Tick,
                vec![
                    resolve(None, "fleet", EscalationKind::BreakerOpen),
                    drain("h4", "h4-g0", &["llm"]),
                    reset("h4", "h4-g0"),
                    quarantine("b2", "b2-g0"),
                ],
            ),
            (
                7 + cooldown,
                Input::Tick,
                vec![
                    resolve(None, b200, EscalationKind::BreakerOpen),
                    drain("b2", "b2-g0", &["llm"]),
                    reset("b2", "b2-g0"),
                ],
            ),
        ],
    );
}

fn lost(host: &str, event: i64) -> Input {
    Input::HostLost {
        host: host.into(),
        event,
    }
}

#[test]
fn most_hosts_lost_at_once_open_the_breaker_with_one_escalation() {
    let cooldown = config().breaker.cooldown_ms;
    let mut v = fleet(breaker_config(2));
    add_host(&mut v, "h4", "H100");
    add_host(&mut v, "h5", "H100");
    let host_lost = |h: &str| {
        esc(
            Some(h),
            "host",
            EscalationKind::HostLost,
            Severity::Critical,
        )
    };
    let fleet_esc = esc(
        None,
        "fleet",
        EscalationKind::BreakerOpen,
        Severity::Critical,
    );
    let v = check(
        v,
        vec![
            (0, lost("h1", 1), vec![host_lost("h1")]),
            (1, lost("h2", 2), vec![host_lost("h2")]),
            // The third within the window: mass silence, the fleet scope opens, one
            // escalation for it; the fourth adds none.
            (2, lost("h3", 3), vec![fleet_esc]),
            (3, lost("h4", 4), vec![]),
            // A hardware fault on the last online host meanwhile: held, no action.
            (
                4,
                xid("h5", "h5-g0", 95, &[], 5),
                vec![gpu_fault("h5", "h5-g0", Severity::Warning)],
            ),
            // Recovery still flows.
            (
                5,
                Input::HostBack {
                    host: "h1".into(),
                    event: 6,
                },
                vec![resolve(Some("h1"), "host", EscalationKind::HostLost)],
            ),
            // After the cool-down: half-open, the held quarantine is the trial.
            (2 + cooldown, Input::Tick, vec![quarantine("h5", "h5-g0")]),
        ],
    );
    let mass = v
        .decisions
        .iter()
        .find(|d| d.evidence == vec![3])
        .expect("decision of event 3");
    assert!(
        mass.rejected
            .iter()
            .any(|r| r.alternative == "escalate h3 alone"),
        "{mass:?}"
    );
    assert!(
        mass.facts.iter().any(|f| f.contains("3 of 5 hosts lost")),
        "{mass:?}"
    );
    assert_eq!(
        v.escalations
            .keys()
            .filter(|k| k.kind == EscalationKind::BreakerOpen)
            .count(),
        1
    );
}
