//! Properties over random input sequences on a simulated clock: the engine never
//! panics, is deterministic, never holds recovery back, never raises an escalation that
//! is already open, and a GPU fault never takes another GPU out of service.

use proptest::prelude::*;
use razar_engine::model::EscalationState;
use razar_engine::{
    decide, Action, BreakerConfig, EngineConfig, EscalationKey, FailureKind, FleetView, Input,
};

const HOSTS: [&str; 3] = ["h1", "h2", "h3"];

fn fleet() -> FleetView {
    let mut v = FleetView::new(EngineConfig {
        xid_window_ms: 5_000,
        probation_ms: 10_000,
        blame_window_ms: 20_000,
        blame_min_places: 1,
        renotify_after_ms: 15_000,
        breaker: BreakerConfig {
            window_ms: 10_000,
            max_hosts: 2,
            max_gpus: 3,
            cooldown_ms: 8_000,
            ..BreakerConfig::default()
        },
        ..EngineConfig::default()
    })
    .expect("valid config");
    for h in HOSTS {
        let g0 = format!("{h}-g0");
        let g1 = format!("{h}-g1");
        v.add_gpu(h, &g0, 0, "H100");
        v.add_gpu(h, &g1, 1, "H100");
        v.add_component(h, "llm", "v1", None, 0, &[&g0]);
        v.add_component(h, "embed", "v1", None, 0, &[&g1]);
    }
    v
}

fn input() -> impl Strategy<Value = Input> {
    let host = prop::sample::select(HOSTS.to_vec()).prop_map(str::to_owned);
    let gpu = (0usize..2).prop_map(|i| i);
    let xid = prop_oneof![
        prop::sample::select(vec![
            13u32, 31, 45, 48, 63, 64, 74, 79, 94, 95, 119, 154, 999
        ]),
        1u32..=180,
    ];
    let rev = prop::sample::select(vec!["v1", "v2"]).prop_map(str::to_owned);
    let kind = prop::sample::select(vec![
        FailureKind::CrashLoop,
        FailureKind::Liveness,
        FailureKind::GaveUp,
    ]);
    prop_oneof![
        (host.clone(), gpu.clone(), xid, rev.clone(), any::<bool>()).prop_map(
            |(host, g, xid, rev, msg)| Input::XidObserved {
                gpu: format!("{host}-g{g}"),
                revisions: vec![((if g == 0 { "llm" } else { "embed" }).to_owned(), rev)],
                message: msg.then(|| {
                    "recovery action changed from 0x0 (None) to 0x1 (GPU Reset Required)".to_owned()
                }),
                host,
                xid,
                event: 0,
            }
        ),
        (host.clone(), rev.clone(), kind).prop_map(|(host, revision, kind)| {
            Input::ComponentFailed {
                host,
                component: "llm".into(),
                revision,
                kind,
                event: 0,
            }
        }),
        (host.clone(), rev).prop_map(|(host, revision)| Input::RevisionStarted {
            gpus: vec![format!("{host}-g0")],
            host,
            component: "llm".into(),
            revision,
            event: 0,
        }),
        host.clone()
            .prop_map(|host| Input::HostLost { host, event: 0 }),
        host.clone()
            .prop_map(|host| Input::HostBack { host, event: 0 }),
        host.clone()
            .prop_map(|host| Input::HeartbeatsWithoutSamples { host, event: 0 }),
        host.clone()
            .prop_map(|host| Input::SamplesResumed { host, event: 0 }),
        (host.clone(), gpu.clone(), any::<bool>()).prop_map(|(host, g, ok)| {
            Input::GpuResetDone {
                gpu: format!("{host}-g{g}"),
                host,
                ok,
                event: 0,
            }
        }),
        (host, gpu, any::<bool>()).prop_map(|(host, g, healthy)| Input::OperatorOverride {
            gpu: format!("{host}-g{g}"),
            host,
            healthy,
            note: "n".into(),
            who: "op".into(),
            event: 0,
        }),
        Just(Input::Tick),
        Just(Input::Tick),
    ]
}

fn with_event(input: Input, id: i64) -> Input {
    let mut input = input;
    match &mut input {
        Input::XidObserved { event, .. }
        | Input::ComponentFailed { event, .. }
        | Input::RevisionStarted { event, .. }
        | Input::HostLost { event, .. }
        | Input::HostBack { event, .. }
        | Input::HeartbeatsWithoutSamples { event, .. }
        | Input::SamplesResumed { event, .. }
        | Input::PulseMissed { event, .. }
        | Input::GpuResetDone { event, .. }
        | Input::OperatorOverride { event, .. }
        | Input::EscalationAcknowledged { event, .. }
        | Input::EscalationResolved { event, .. } => *event = id,
        Input::Tick => {}
    }
    input
}

fn run(steps: &[(i64, Input)]) -> (Vec<Vec<Action>>, FleetView) {
    let mut view = fleet();
    let mut now = 0;
    let mut out = Vec::new();
    for (i, (dt, input)) in steps.iter().enumerate() {
        now += dt;
        let id = i64::try_from(i).unwrap_or(i64::MAX);
        out.push(decide(&mut view, &with_event(input.clone(), id), now));
    }
    (out, view)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn engine_invariants(steps in prop::collection::vec((0i64..4_000, input()), 1..60)) {
        let (actions, view) = run(&steps);
        // Deterministic: the same inputs at the same times give the same actions.
        let (again, _) = run(&steps);
        prop_assert_eq!(&actions, &again);

        // Replaying the escalations: never one raised while the same key is open.
        let mut open: std::collections::BTreeSet<EscalationKey> = Default::default();
        for step in &actions {
            for a in step {
                match a {
                    Action::Escalate { key, .. } => {
                        prop_assert!(open.insert(key.clone()), "raised twice: {:?}", key);
                    }
                    Action::ResolveEscalation { key } => {
                        prop_assert!(open.remove(key), "resolved what is not open: {:?}", key);
                    }
                    _ => {}
                }
            }
        }
        for d in &view.decisions {
            // Recovery, restarts of dead applications and escalations are never held.
            prop_assert!(!d.held.iter().any(|a| matches!(
                a,
                Action::ReturnGpuToService { .. }
                    | Action::ResolveEscalation { .. }
                    | Action::Escalate { .. }
                    | Action::RestartComponents { .. }
            )), "recovery held: {:?}", d);
            // An XID decision touches only its own GPU.
            if let (Some(ev), true) = (d.evidence.first(), d.rule_id.starts_with("xid.")) {
                let i = usize::try_from(*ev).unwrap_or(usize::MAX);
                if let Some((_, Input::XidObserved { host, gpu, .. })) = steps.get(i) {
                    for a in &d.actions {
                        if let Action::QuarantineGpu { host: h, gpu: g }
                        | Action::ResetGpu { host: h, gpu: g } = a {
                            prop_assert_eq!((h, g), (host, gpu));
                        }
                    }
                }
            }
        }
        // The view agrees with the escalations replayed from the actions.
        for (key, e) in &view.escalations {
            let is_open = e.state != EscalationState::Resolved;
            prop_assert_eq!(is_open, open.contains(key) || e.state == EscalationState::Acknowledged);
        }
    }
}
