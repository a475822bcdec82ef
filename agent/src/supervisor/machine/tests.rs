//! State machine tests: scripted scenarios plus a property test over random inputs.

use super::*;
use crate::config::Config;
use proptest::prelude::*;
use std::path::Path;

fn spec(extra: &str) -> ComponentSpec {
    let text = format!("[[component]]\nname = \"web\"\ncommand = \"x\"\n{extra}");
    Config::parse(Path::new("t.toml"), text.as_bytes())
        .unwrap_or_else(|e| panic!("{e}"))
        .components
        .remove(0)
}

struct Rig {
    m: Machine,
    t0: Instant,
    ms: u64,
    timers: [Option<(u64, Instant)>; 2],
    next_pid: u32,
    log: Vec<Action>,
}

impl Rig {
    fn new(extra: &str) -> Rig {
        Rig {
            m: Machine::new(spec(extra), 7),
            t0: Instant::now(),
            ms: 0,
            timers: [None, None],
            next_pid: 100,
            log: Vec::new(),
        }
    }
    fn now(&self) -> Now {
        Now {
            at: self.t0 + Duration::from_millis(self.ms),
            unix_ms: 1_000 + self.ms as i64,
        }
    }
    fn apply(&mut self, actions: Vec<Action>) {
        for a in &actions {
            match a {
                Action::SetTimer { kind, token, at } => {
                    self.timers[timer_slot(*kind)] = Some((*token, *at))
                }
                Action::ClearTimer { kind } => self.timers[timer_slot(*kind)] = None,
                _ => {}
            }
        }
        self.log.extend(actions);
    }
    fn feed(&mut self, input: Input) {
        let now = self.now();
        let a = self.m.handle(input, now);
        self.apply(a);
    }
    fn cmd(&mut self, c: Control) -> Result<(), String> {
        let now = self.now();
        let a = self.m.command(c, now)?;
        self.apply(a);
        Ok(())
    }
    /// Advances the clock to the next armed timer of `kind` and fires it; returns the wait.
    fn fire(&mut self, kind: TimerKind) -> Duration {
        let (token, at) = self.timers[timer_slot(kind)].take().expect("timer armed");
        let wait = at.saturating_duration_since(self.now().at);
        self.ms = (at - self.t0).as_millis() as u64;
        self.feed(Input::Timer { kind, token });
        wait
    }
    fn spawned(&mut self) -> u32 {
        assert_eq!(
            self.log.last(),
            Some(&Action::Spawn),
            "log: {:#?}",
            self.log
        );
        self.next_pid += 1;
        let pid = self.next_pid;
        self.feed(Input::Spawned { pid });
        pid
    }
    fn states(&self) -> Vec<ComponentState> {
        self.log
            .iter()
            .filter_map(|a| match a {
                Action::Emit(Event {
                    kind: EventKind::StateChanged { to, .. },
                    ..
                }) => Some(*to),
                _ => None,
            })
            .collect()
    }
}

use ComponentState::*;

#[test]
fn starts_when_dependencies_ready_and_becomes_ready_on_probe() {
    let mut r = Rig::new(
        "[component.readiness]\nkind = \"tcp\"\naddress = \"127.0.0.1:1\"\nsuccess_threshold = 2\n",
    );
    assert_eq!(r.m.state(), Pending);
    r.feed(Input::DependenciesReady);
    r.spawned();
    assert_eq!(r.m.probing(), Some(ProbeRole::Readiness));
    r.feed(Input::Probe {
        role: ProbeRole::Readiness,
        passed: true,
        detail: String::new(),
    });
    assert_eq!(r.m.state(), Starting);
    r.feed(Input::Probe {
        role: ProbeRole::Readiness,
        passed: true,
        detail: String::new(),
    });
    assert_eq!(r.states(), [Starting, Ready]);
}

#[test]
fn crash_loop_backs_off_then_quarantines_with_hook() {
    let mut r = Rig::new(
        "give_up_hook = [\"hook\"]\n[component.restart]\ninitial_backoff = \"100ms\"\nmax_backoff = \"300ms\"\njitter = 0.0\n[component.give_up]\nmax_failures = 4\nwindow = \"1m\"\n",
    );
    r.feed(Input::DependenciesReady);
    let mut waits = Vec::new();
    for _ in 0..3 {
        let pid = r.spawned();
        r.feed(Input::Exited {
            pid,
            code: Some(1),
            signal: None,
        });
        assert_eq!(r.m.state(), Backoff);
        waits.push(r.fire(TimerKind::State));
    }
    assert_eq!(
        waits,
        [
            Duration::from_millis(100),
            Duration::from_millis(200),
            Duration::from_millis(300)
        ]
    );
    let pid = r.spawned();
    r.feed(Input::Exited {
        pid,
        code: Some(1),
        signal: None,
    });
    assert_eq!(r.m.state(), Quarantined);
    let hook = r.log.iter().position(|a| matches!(a, Action::RunGiveUpHook { context } if context.failures == 4 && context.last_exit_code == Some(1)));
    let persist = r
        .log
        .iter()
        .position(|a| matches!(a, Action::PersistQuarantine { .. }));
    assert!(
        hook.is_some() && hook < persist,
        "hook runs before quarantine: {:#?}",
        r.log
    );
    assert!(r.cmd(Control::Start).is_err());
    r.cmd(Control::Resolve {
        note: "fixed disk".into(),
    })
    .unwrap();
    assert_eq!(r.m.state(), Pending);
    assert!(r.log.contains(&Action::ClearQuarantine));
}

#[test]
fn stable_run_resets_the_backoff() {
    let mut r = Rig::new("[component.restart]\ninitial_backoff = \"1s\"\nmax_backoff = \"1m\"\njitter = 0.0\nreset_after = \"10s\"\n");
    r.feed(Input::DependenciesReady);
    let pid = r.spawned();
    r.feed(Input::Exited {
        pid,
        code: Some(1),
        signal: None,
    });
    assert_eq!(r.fire(TimerKind::State), Duration::from_secs(1));
    let pid = r.spawned();
    r.feed(Input::Exited {
        pid,
        code: Some(1),
        signal: None,
    });
    assert_eq!(r.fire(TimerKind::State), Duration::from_secs(2));
    let pid = r.spawned();
    r.ms += 11_000;
    r.feed(Input::Exited {
        pid,
        code: Some(1),
        signal: None,
    });
    assert_eq!(r.fire(TimerKind::State), Duration::from_secs(1));
}

#[test]
fn liveness_failures_restart_and_recovery_action_runs_first() {
    let mut r = Rig::new("recovery_action = [\"flush\"]\n[component.liveness]\nkind = \"tcp\"\naddress = \"h:1\"\nfailure_threshold = 2\n[component.restart]\ninitial_backoff = \"0s\"\nmax_backoff = \"0s\"\n");
    r.feed(Input::DependenciesReady);
    let pid = r.spawned();
    assert_eq!(r.m.state(), Ready);
    r.feed(Input::Probe {
        role: ProbeRole::Liveness,
        passed: false,
        detail: "refused".into(),
    });
    assert_eq!(r.m.state(), Unhealthy);
    r.feed(Input::Probe {
        role: ProbeRole::Liveness,
        passed: false,
        detail: "refused".into(),
    });
    assert_eq!(r.m.state(), Stopping);
    assert!(r.log.contains(&Action::SignalTree {
        pid,
        signal: Signal::SIGTERM
    }));
    // Grace runs out: SIGKILL.
    r.fire(TimerKind::State);
    assert!(r.log.contains(&Action::KillTree { pid }));
    r.feed(Input::Exited {
        pid,
        code: None,
        signal: Some(9),
    });
    assert_eq!(r.m.state(), Backoff);
    r.fire(TimerKind::State);
    let n = r.log.len();
    assert_eq!(r.log[n - 2..], [Action::RunRecoveryAction, Action::Spawn]);
    assert_eq!(
        r.states(),
        [Starting, Ready, Unhealthy, Stopping, Backoff, Starting]
    );
}

#[test]
fn on_failure_and_never_policies() {
    let mut r = Rig::new("[component.restart]\npolicy = \"on-failure\"\n");
    r.feed(Input::DependenciesReady);
    let pid = r.spawned();
    r.feed(Input::Exited {
        pid,
        code: Some(0),
        signal: None,
    });
    assert_eq!(r.m.state(), Stopped);
    let mut r = Rig::new("[component.restart]\npolicy = \"never\"\n");
    r.feed(Input::DependenciesReady);
    let pid = r.spawned();
    r.feed(Input::Exited {
        pid,
        code: Some(3),
        signal: None,
    });
    assert_eq!(r.m.state(), Stopped);
}

#[test]
fn pulse_measures_time_to_ready() {
    let mut r = Rig::new("[component.restart]\ninitial_backoff = \"50ms\"\njitter = 0.0\n[component.give_up]\nmax_failures = 1\n");
    r.feed(Input::DependenciesReady);
    let pid = r.spawned();
    r.cmd(Control::Pulse {
        budget: Duration::from_secs(1),
    })
    .unwrap();
    assert!(r.log.contains(&Action::KillTree { pid }));
    r.ms += 5;
    r.feed(Input::Exited {
        pid,
        code: None,
        signal: Some(9),
    });
    // A pulse is not a failure: no quarantine even with max_failures = 1.
    assert_eq!(r.m.state(), Backoff);
    r.fire(TimerKind::State);
    r.spawned();
    let result = r.log.iter().find_map(|a| match a {
        Action::Emit(Event {
            kind:
                EventKind::PulseResult {
                    recovered_ms,
                    passed,
                    ..
                },
            ..
        }) => Some((*recovered_ms, *passed)),
        _ => None,
    });
    assert_eq!(result, Some((Some(55), true)));
    let report = r.m.last_pulse().expect("pulse report");
    assert_eq!(
        (
            report.recovered_ms,
            report.done,
            report.passed,
            report.budget_ms
        ),
        (Some(55), true, true, 1000)
    );
}

/// The severity of the `ProcessExited` event in the log.
fn exit_severity(r: &Rig) -> Option<Severity> {
    r.log.iter().find_map(|a| match a {
        Action::Emit(Event {
            kind: EventKind::ProcessExited { .. },
            severity,
            ..
        }) => Some(*severity),
        _ => None,
    })
}

#[test]
fn a_clean_exit_the_policy_accepts_is_info_a_restart_is_a_warning() {
    for (policy, code, severity) in [
        ("on-failure", 0, Severity::Info),
        ("never", 0, Severity::Info),
        ("on-failure", 1, Severity::Warning),
        ("always", 0, Severity::Warning),
    ] {
        let mut r = Rig::new(&format!("[component.restart]\npolicy = \"{policy}\"\n"));
        r.feed(Input::DependenciesReady);
        let pid = r.spawned();
        r.feed(Input::Exited {
            pid,
            code: Some(code),
            signal: None,
        });
        assert_eq!(exit_severity(&r), Some(severity), "{policy} exit {code}");
    }
}

fn probe(r: &mut Rig, passed: bool) {
    r.feed(Input::Probe {
        role: ProbeRole::Readiness,
        passed,
        detail: "exit status 1".into(),
    });
}

#[test]
fn readiness_that_never_passes_is_a_failed_start_after_the_start_period() {
    let mut r = Rig::new(
        "[component.readiness]\nkind = \"exec\"\ncommand = [\"false\"]\nsuccess_threshold = 2\nfailure_threshold = 2\nstart_period = \"1s\"\n[component.restart]\ninitial_backoff = \"100ms\"\njitter = 0.0\n[component.give_up]\nmax_failures = 2\n",
    );
    r.feed(Input::DependenciesReady);
    let pid = r.spawned();
    // Inside the start period failures do not count.
    for _ in 0..5 {
        r.ms += 100;
        probe(&mut r, false);
    }
    assert_eq!(r.m.state(), Starting);
    r.ms = 1000;
    probe(&mut r, false);
    // A pass (one of the two needed) resets the count.
    probe(&mut r, true);
    probe(&mut r, false);
    assert_eq!(r.m.state(), Starting);
    probe(&mut r, false);
    assert_eq!(r.m.state(), Stopping);
    assert!(r.log.contains(&Action::SignalTree {
        pid,
        signal: Signal::SIGTERM
    }));
    r.feed(Input::Exited {
        pid,
        code: None,
        signal: Some(15),
    });
    assert_eq!(r.m.state(), Backoff);
    let reason = r
        .log
        .iter()
        .rev()
        .find_map(|a| match a {
            Action::Emit(Event {
                kind: EventKind::StateChanged { to: Backoff, .. },
                message,
                ..
            }) => Some(message.clone()),
            _ => None,
        })
        .expect("backoff event");
    assert!(
        reason.starts_with("readiness probe failed 2 times after the 1000 ms start period: exit status 1; restart in 100 ms"),
        "{reason}"
    );
    // Restarted, fails again: the give-up rule applies.
    r.fire(TimerKind::State);
    let pid = r.spawned();
    r.ms += 1000;
    probe(&mut r, false);
    probe(&mut r, false);
    r.feed(Input::Exited {
        pid,
        code: None,
        signal: Some(15),
    });
    assert_eq!(r.m.state(), Quarantined);
}

const ONESHOT: &str = "kind = \"oneshot\"\n[component.restart]\ninitial_backoff = \"0s\"\n";

#[test]
fn oneshot_is_ready_once_it_exits_zero_and_stays_ready_without_a_process() {
    let mut r = Rig::new(ONESHOT);
    r.feed(Input::DependenciesReady);
    let pid = r.spawned();
    assert_eq!(r.m.state(), Starting, "running is not ready for a one-shot");
    // A failure restarts it.
    r.feed(Input::Exited {
        pid,
        code: Some(1),
        signal: None,
    });
    assert_eq!(r.m.state(), Backoff);
    r.fire(TimerKind::State);
    let pid = r.spawned();
    r.feed(Input::Exited {
        pid,
        code: Some(0),
        signal: None,
    });
    assert_eq!((r.m.state(), r.m.pid()), (Ready, None));
    assert!(r.log.contains(&Action::PersistCompleted));
    assert_eq!(exit_severity(&r), Some(Severity::Warning), "the failed run");
    assert_eq!(r.log.iter().filter(|a| **a == Action::Spawn).count(), 2);
    // An operator restart runs it again.
    r.log.clear();
    r.cmd(Control::Restart).unwrap();
    let pid = r.spawned();
    assert_eq!(r.m.state(), Starting);
    r.feed(Input::Exited {
        pid,
        code: Some(0),
        signal: None,
    });
    assert_eq!(r.m.state(), Ready);
    assert_eq!(exit_severity(&r), Some(Severity::Info));
    // A stop leaves it stopped, with nothing to signal.
    r.cmd(Control::Stop).unwrap();
    assert_eq!(r.m.state(), Stopped);
}

#[test]
fn oneshot_completed_before_an_agent_restart_is_ready_unless_its_revision_changed() {
    let mut r = Rig::new(ONESHOT);
    let revision = r.m.spec().revision.clone();
    r.feed(Input::RestoreCompleted {
        revision: "other".into(),
    });
    assert_eq!(r.m.state(), Pending, "another revision runs again");
    r.feed(Input::RestoreCompleted { revision });
    assert_eq!((r.m.state(), r.m.pid()), (Ready, None));
    assert!(!r.log.contains(&Action::Spawn));
    // A service ignores it.
    let mut r = Rig::new("");
    let revision = r.m.spec().revision.clone();
    r.feed(Input::RestoreCompleted { revision });
    assert_eq!(r.m.state(), Pending);
}

#[test]
fn oneshot_reload_with_a_new_spec_runs_it_again() {
    let mut r = Rig::new(ONESHOT);
    r.feed(Input::DependenciesReady);
    let pid = r.spawned();
    r.feed(Input::Exited {
        pid,
        code: Some(0),
        signal: None,
    });
    assert_eq!(r.m.state(), Ready);
    let now = r.now();
    let a =
        r.m.reload(spec(&format!("args = [\"v2\"]\n{ONESHOT}")), now);
    r.apply(a);
    assert_eq!(r.m.state(), Pending);
    r.feed(Input::DependenciesReady);
    r.spawned();
    assert_eq!(r.m.state(), Starting);
}

#[test]
fn pulse_over_budget_fails() {
    let mut r = Rig::new("[component.restart]\ninitial_backoff = \"5s\"\nmax_backoff = \"5s\"\n");
    r.feed(Input::DependenciesReady);
    let pid = r.spawned();
    r.cmd(Control::Pulse {
        budget: Duration::from_secs(1),
    })
    .unwrap();
    r.feed(Input::Exited {
        pid,
        code: None,
        signal: Some(9),
    });
    r.fire(TimerKind::Pulse);
    assert!(r.log.iter().any(|a| matches!(
        a,
        Action::Emit(Event {
            kind: EventKind::PulseResult {
                recovered_ms: None,
                passed: false,
                ..
            },
            ..
        })
    )));
}

#[test]
fn reload_restarts_with_new_spec() {
    let mut r = Rig::new("");
    r.feed(Input::DependenciesReady);
    let pid = r.spawned();
    let mut new = spec("args = [\"--new\"]\n");
    new.autostart = true;
    let now = r.now();
    let a = r.m.reload(new, now);
    r.apply(a);
    assert_eq!(r.m.state(), Stopping);
    r.feed(Input::Exited {
        pid,
        code: Some(0),
        signal: Some(15),
    });
    assert_eq!(r.m.state(), Pending);
    assert_eq!(r.m.spec().args, ["--new"]);
}

#[test]
fn vram_over_budget_restarts_by_policy() {
    let mut r = Rig::new("vram_budget = \"1GiB\"\nvram_policy = \"restart\"\n");
    r.feed(Input::DependenciesReady);
    let pid = r.spawned();
    r.feed(Input::VramExceeded {
        used_bytes: 2 << 30,
        budget_bytes: 1 << 30,
    });
    assert_eq!(r.m.state(), Stopping);
    assert!(r.log.contains(&Action::SignalTree {
        pid,
        signal: Signal::SIGTERM
    }));
}

#[test]
fn restored_quarantine_holds_until_resolved() {
    let mut r = Rig::new("");
    r.feed(Input::RestoreQuarantine {
        reason: "crash loop".into(),
    });
    r.feed(Input::DependenciesReady);
    assert_eq!(r.m.state(), Quarantined);
    assert!(!r.log.contains(&Action::Spawn));
}

fn arb_input() -> impl Strategy<Value = (u8, u32, bool, u16)> {
    (0u8..12, 0u32..4, any::<bool>(), 0u16..2000)
}

proptest! {
    /// Random inputs never panic, never spawn while a process runs, chain transitions
    /// consistently, and leave quarantine only through resolve.
    #[test]
    fn invariants_hold(steps in proptest::collection::vec(arb_input(), 1..80)) {
        let mut r = Rig::new("[component.readiness]\nkind = \"tcp\"\naddress = \"h:1\"\n[component.liveness]\nkind = \"tcp\"\naddress = \"h:1\"\nfailure_threshold = 2\n[component.restart]\ninitial_backoff = \"10ms\"\nmax_backoff = \"1s\"\n[component.give_up]\nmax_failures = 3\nwindow = \"1s\"\n");
        let mut state = r.m.state();
        for (op, arg, flag, dt) in steps {
            r.ms += u64::from(dt);
            let before_pid = r.m.pid();
            let before = r.log.len();
            let now = r.now();
            let mut resolved = false;
            let actions = match op {
                0 => r.m.handle(Input::DependenciesReady, now),
                1 => { let p = 1000 + arg; r.m.handle(Input::Spawned { pid: p }, now) }
                2 => r.m.handle(Input::Exited { pid: r.m.pid().unwrap_or(1000 + arg), code: Some(arg as i32), signal: None }, now),
                3 => r.m.handle(Input::Probe { role: if flag { ProbeRole::Readiness } else { ProbeRole::Liveness }, passed: arg > 0, detail: String::new() }, now),
                4 => match r.timers[(arg % 2) as usize] { Some((token, _)) => r.m.handle(Input::Timer { kind: if arg % 2 == 0 { TimerKind::State } else { TimerKind::Pulse }, token }, now), None => vec![] },
                5 => r.m.command(Control::Start, now).unwrap_or_default(),
                6 => r.m.command(Control::Stop, now).unwrap_or_default(),
                7 => r.m.command(Control::Restart, now).unwrap_or_default(),
                8 => { let a = r.m.command(Control::Resolve { note: "n".into() }, now); resolved = a.is_ok(); a.unwrap_or_default() }
                9 => r.m.command(Control::Pulse { budget: Duration::from_millis(u64::from(dt)) }, now).unwrap_or_default(),
                10 => r.m.handle(Input::SpawnFailed { reason: "x".into() }, now),
                _ => r.m.command(Control::Quarantine { note: "q".into() }, now).unwrap_or_default(),
            };
            r.apply(actions);
            let mut no_process = before_pid.is_none();
            for a in &r.log[before..] {
                match a {
                    Action::Emit(Event { kind: EventKind::ProcessExited { .. }, .. }) => no_process = true,
                    Action::Spawn => {
                        prop_assert!(no_process, "spawn while pid {:?} runs", before_pid);
                        no_process = false;
                    }
                    Action::Emit(Event { kind: EventKind::StateChanged { from, to }, .. }) => {
                        prop_assert_eq!(*from, state);
                        if *from == Quarantined { prop_assert!(resolved, "left quarantine without resolve"); }
                        state = *to;
                    }
                    Action::SetTimer { at, kind: TimerKind::State, .. } => {
                        prop_assert!(*at <= now.at + Duration::from_secs(10));
                    }
                    _ => {}
                }
            }
            prop_assert_eq!(state, r.m.state());
            if matches!(r.m.state(), Ready | Unhealthy | Stopping) { prop_assert!(r.m.pid().is_some()); }
            if matches!(r.m.state(), Backoff | Pending | Stopped | Quarantined) { prop_assert!(r.m.pid().is_none()); }
        }
    }
}
