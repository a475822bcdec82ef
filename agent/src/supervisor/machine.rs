//! The pure lifecycle state machine of one component. It never spawns, signals or
//! sleeps: callers feed it plain inputs with an explicit `now` and carry out the
//! actions it returns (spawn, signal the tree, set a timer, run a hook, emit an event).
//!
//! States: `pending → starting → ready ⇄ unhealthy → backoff → … → quarantined`,
//! plus `stopping` and `stopped`. Every state change is an `Emit` of a
//! `StateChanged` event with a reason and a timestamp.

use crate::config::{ComponentKind, ComponentSpec, RestartPolicy, VramPolicy};
use nix::sys::signal::Signal;
use razar_shared::domain::{ComponentState, Severity};
use razar_shared::protocol::{Event, EventKind, Subject, UnixMillis};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The current time, monotonic for timers and wall-clock for event timestamps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub at: Instant,
    pub unix_ms: UnixMillis,
}

/// Which probe a result belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeRole {
    Readiness,
    Liveness,
}

/// The machine's two independent timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TimerKind {
    /// Backoff delay or stop grace period, depending on the state.
    State,
    /// A failure pulse's recovery budget.
    Pulse,
}

/// Things that happen to a component.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// Everything this component depends on is ready (only acted on in `pending`).
    DependenciesReady,
    /// The process asked for by `Action::Spawn` is running.
    Spawned { pid: u32 },
    /// `Action::Spawn` failed (command missing, user unknown, ...).
    SpawnFailed { reason: String },
    /// A process left by a previous agent run is still alive and taken over.
    Adopted { pid: u32 },
    /// The process (tree leader) exited.
    Exited {
        pid: u32,
        code: Option<i32>,
        signal: Option<i32>,
    },
    /// A probe finished.
    Probe {
        role: ProbeRole,
        passed: bool,
        detail: String,
    },
    /// A timer set by `Action::SetTimer` fired; stale tokens are ignored.
    Timer { kind: TimerKind, token: u64 },
    /// The component was quarantined before the agent restarted.
    RestoreQuarantine { reason: String },
    /// A one-shot completed (exited 0) with `revision` before the agent restarted.
    RestoreCompleted { revision: String },
    /// The GPU sampler saw this component use more VRAM than its budget.
    VramExceeded { used_bytes: u64, budget_bytes: u64 },
    /// The memory sampler saw this component use more memory than its budget.
    MemoryExceeded { used_bytes: u64, budget_bytes: u64 },
}

/// Operator commands (local CLI, later the collector).
#[derive(Debug, Clone, PartialEq)]
pub enum Control {
    Start,
    Stop,
    Restart,
    Resolve {
        note: String,
    },
    Quarantine {
        note: String,
    },
    /// Kill on purpose and measure the time to ready again.
    Pulse {
        budget: Duration,
    },
}

/// What the give-up hook receives on stdin, as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailureContext {
    pub component: String,
    pub failures: u32,
    pub window_ms: u64,
    pub last_exit_code: Option<i32>,
    pub last_signal: Option<i32>,
    pub reason: String,
    pub ts_ms: UnixMillis,
}

/// What the caller must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Run the recovery action from the config and wait for it (before a restart).
    RunRecoveryAction,
    /// Start the process (the caller answers with `Spawned` or `SpawnFailed`).
    Spawn,
    /// Send `signal` to the whole process group of `pid`.
    SignalTree { pid: u32, signal: Signal },
    /// SIGKILL the whole process group of `pid`.
    KillTree { pid: u32 },
    /// Arm `kind` to fire at `at` with `token` (replaces an earlier one of the same kind).
    SetTimer {
        kind: TimerKind,
        token: u64,
        at: Instant,
    },
    /// Disarm `kind`.
    ClearTimer { kind: TimerKind },
    /// Run the give-up hook with this context on stdin and wait for it.
    RunGiveUpHook { context: FailureContext },
    /// Record the quarantine durably.
    PersistQuarantine { reason: String },
    /// Remove the durable quarantine.
    ClearQuarantine,
    /// Record durably that this one-shot completed with its current revision.
    PersistCompleted,
    /// Publish an event.
    Emit(Event),
}

/// What to do once the process has exited after a stop signal.
#[derive(Debug, Clone, PartialEq)]
enum AfterStop {
    Stop,
    Restart,
    Fail(String),
    Quarantine(String),
    Reload,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Pulse {
    started: Instant,
    budget: Duration,
}

/// The latest failure pulse of a component, as `status` and `/health` show it (the CLI's
/// `pulse` waits for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PulseReport {
    /// When the process was killed.
    pub started_ms: UnixMillis,
    pub budget_ms: u64,
    /// Kill to ready again, once it was.
    pub recovered_ms: Option<u64>,
    /// The result is in: ready again, or the budget ran out first.
    pub done: bool,
    /// Ready again within the budget.
    pub passed: bool,
}

/// One component's lifecycle.
#[derive(Debug, Clone)]
pub struct Machine {
    spec: ComponentSpec,
    pending_spec: Option<ComponentSpec>,
    state: ComponentState,
    pid: Option<u32>,
    spawned_at: Option<Instant>,
    ready_since: Option<Instant>,
    /// Restarts since the component was last stable (drives the backoff).
    attempt: u32,
    failures: VecDeque<Instant>,
    probe_passes: u32,
    probe_fails: u32,
    after_stop: Option<AfterStop>,
    next_token: u64,
    timers: [Option<u64>; 2],
    pulse: Option<Pulse>,
    pulse_kill: bool,
    last_pulse: Option<PulseReport>,
    last_exit: (Option<i32>, Option<i32>),
    rng: u64,
}

fn timer_slot(kind: TimerKind) -> usize {
    match kind {
        TimerKind::State => 0,
        TimerKind::Pulse => 1,
    }
}

impl Machine {
    /// A machine for `spec`: `pending` when it autostarts, `stopped` otherwise.
    /// `seed` drives the backoff jitter (any value; fixed in tests).
    pub fn new(spec: ComponentSpec, seed: u64) -> Machine {
        let state = if spec.autostart {
            ComponentState::Pending
        } else {
            ComponentState::Stopped
        };
        Machine {
            spec,
            pending_spec: None,
            state,
            pid: None,
            spawned_at: None,
            ready_since: None,
            attempt: 0,
            failures: VecDeque::new(),
            probe_passes: 0,
            probe_fails: 0,
            after_stop: None,
            next_token: 1,
            timers: [None, None],
            pulse: None,
            pulse_kill: false,
            last_pulse: None,
            last_exit: (None, None),
            rng: seed | 1,
        }
    }

    pub fn state(&self) -> ComponentState {
        self.state
    }

    /// The tracked process (tree leader), if one runs.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    pub fn spec(&self) -> &ComponentSpec {
        &self.spec
    }

    /// Restarts counted towards the backoff.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The latest failure pulse, if any ran.
    pub fn last_pulse(&self) -> Option<PulseReport> {
        self.last_pulse
    }

    /// Failures inside the give-up window, as last counted.
    pub fn recent_failures(&self) -> usize {
        self.failures.len()
    }

    /// Which probe should run now, if any.
    pub fn probing(&self) -> Option<ProbeRole> {
        match self.state {
            ComponentState::Starting if self.pid.is_some() && self.spec.readiness.is_some() => {
                Some(ProbeRole::Readiness)
            }
            ComponentState::Ready | ComponentState::Unhealthy if self.spec.liveness.is_some() => {
                Some(ProbeRole::Liveness)
            }
            _ => None,
        }
    }

    /// Whether a process of this component may be running (so it must not be started).
    pub fn is_running(&self) -> bool {
        self.pid.is_some()
    }

    fn random(&mut self) -> f64 {
        // xorshift64*: deterministic for a seed, good enough for jitter.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let v = self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (v >> 11) as f64 / (1u64 << 53) as f64
    }

    fn event(&self, now: Now, severity: Severity, kind: EventKind, message: String) -> Action {
        Action::Emit(Event {
            ts_ms: now.unix_ms,
            severity,
            subject: Subject::Component(self.spec.name.to_string()),
            kind,
            message,
        })
    }

    fn go(
        &mut self,
        to: ComponentState,
        reason: impl Into<String>,
        now: Now,
        out: &mut Vec<Action>,
    ) {
        let from = self.state;
        if from == to {
            return;
        }
        self.state = to;
        let severity = match to {
            ComponentState::Quarantined if self.spec.critical => Severity::Critical,
            ComponentState::Quarantined | ComponentState::Backoff | ComponentState::Unhealthy => {
                Severity::Warning
            }
            _ => Severity::Info,
        };
        out.push(self.event(
            now,
            severity,
            EventKind::StateChanged { from, to },
            reason.into(),
        ));
        if to == ComponentState::Ready {
            self.ready_since = Some(now.at);
            if let Some(pulse) = self.pulse.take() {
                out.push(Action::ClearTimer {
                    kind: TimerKind::Pulse,
                });
                self.timers[timer_slot(TimerKind::Pulse)] = None;
                let took = now.at.saturating_duration_since(pulse.started);
                let passed = took <= pulse.budget;
                if let Some(report) = &mut self.last_pulse {
                    report.recovered_ms = Some(duration_ms(took));
                    report.done = true;
                    report.passed = passed;
                }
                out.push(self.event(
                    now,
                    if passed {
                        Severity::Info
                    } else {
                        Severity::Warning
                    },
                    EventKind::PulseResult {
                        recovered_ms: Some(duration_ms(took)),
                        budget_ms: duration_ms(pulse.budget),
                        passed,
                    },
                    format!("ready again {} ms after the pulse", duration_ms(took)),
                ));
            }
        }
        if !matches!(to, ComponentState::Ready | ComponentState::Unhealthy) {
            self.ready_since = None;
        }
    }

    fn set_timer(&mut self, kind: TimerKind, at: Instant, out: &mut Vec<Action>) {
        let token = self.next_token;
        self.next_token += 1;
        self.timers[timer_slot(kind)] = Some(token);
        out.push(Action::SetTimer { kind, token, at });
    }

    fn clear_timer(&mut self, kind: TimerKind, out: &mut Vec<Action>) {
        if self.timers[timer_slot(kind)].take().is_some() {
            out.push(Action::ClearTimer { kind });
        }
    }

    fn spawn(&mut self, restart: bool, reason: &str, now: Now, out: &mut Vec<Action>) {
        self.probe_passes = 0;
        self.probe_fails = 0;
        self.go(ComponentState::Starting, reason, now, out);
        if restart && self.spec.recovery_action.is_some() {
            out.push(Action::RunRecoveryAction);
        }
        out.push(Action::Spawn);
    }

    /// The process is up: ready at once without a readiness probe; a one-shot only
    /// once it has exited 0.
    fn running(&mut self, pid: u32, reason: &str, now: Now, out: &mut Vec<Action>) {
        self.pid = Some(pid);
        self.spawned_at = Some(now.at);
        self.probe_passes = 0;
        self.probe_fails = 0;
        if self.spec.kind == ComponentKind::Oneshot {
            self.go(
                ComponentState::Starting,
                format!("{reason} (one-shot: ready once it exits 0)"),
                now,
                out,
            );
        } else if self.spec.readiness.is_none() {
            self.go(
                ComponentState::Ready,
                format!("{reason} (no readiness probe)"),
                now,
                out,
            );
        } else {
            self.go(ComponentState::Starting, reason, now, out);
        }
    }

    fn begin_stop(&mut self, after: AfterStop, reason: &str, now: Now, out: &mut Vec<Action>) {
        match self.pid {
            Some(pid) => {
                self.after_stop = Some(after);
                if self.state != ComponentState::Stopping {
                    self.go(ComponentState::Stopping, reason, now, out);
                    out.push(Action::SignalTree {
                        pid,
                        signal: self.spec.stop_signal,
                    });
                    let at = now.at + self.spec.stop_grace;
                    self.set_timer(TimerKind::State, at, out);
                }
            }
            None => {
                self.clear_timer(TimerKind::State, out);
                self.after_stopped(after, reason, now, out);
            }
        }
    }

    fn after_stopped(&mut self, after: AfterStop, reason: &str, now: Now, out: &mut Vec<Action>) {
        match after {
            AfterStop::Stop => self.go(ComponentState::Stopped, reason, now, out),
            AfterStop::Restart => self.spawn(true, reason, now, out),
            AfterStop::Fail(why) => self.fail(why, false, now, out),
            AfterStop::Quarantine(note) => self.quarantine(note, now, out),
            AfterStop::Reload => {
                if let Some(spec) = self.pending_spec.take() {
                    self.spec = spec;
                }
                self.attempt = 0;
                self.failures.clear();
                self.go(
                    ComponentState::Pending,
                    format!("{reason}: new spec"),
                    now,
                    out,
                );
            }
        }
    }

    fn quarantine(&mut self, reason: String, now: Now, out: &mut Vec<Action>) {
        self.clear_timer(TimerKind::State, out);
        out.push(Action::PersistQuarantine {
            reason: reason.clone(),
        });
        self.go(ComponentState::Quarantined, reason, now, out);
    }

    /// The process is gone for a reason that counts against the component.
    fn fail(&mut self, reason: String, clean_exit: bool, now: Now, out: &mut Vec<Action>) {
        self.pid = None;
        if std::mem::take(&mut self.pulse_kill) {
            let r = self.random();
            let delay = self.spec.backoff.delay(self.attempt, r);
            self.go(
                ComponentState::Backoff,
                format!("{reason} (failure pulse)"),
                now,
                out,
            );
            self.set_timer(TimerKind::State, now.at + delay, out);
            return;
        }
        if self.spec.restart_policy == RestartPolicy::Never {
            self.go(
                ComponentState::Stopped,
                format!("{reason}; restart policy is never"),
                now,
                out,
            );
            return;
        }
        if self.spec.restart_policy == RestartPolicy::OnFailure && clean_exit {
            self.go(
                ComponentState::Stopped,
                format!("{reason}; restart policy is on-failure"),
                now,
                out,
            );
            return;
        }
        let stable = self.ready_since.is_some_and(|since| {
            now.at.saturating_duration_since(since) >= self.spec.backoff.reset_after()
        });
        if stable {
            self.attempt = 0;
        }
        let window = self.spec.give_up.window;
        self.failures.push_back(now.at);
        while self
            .failures
            .front()
            .is_some_and(|t| now.at.saturating_duration_since(*t) > window)
        {
            self.failures.pop_front();
        }
        let count = self.failures.len();
        let max = self.spec.give_up.max_failures.get() as usize;
        if count >= max {
            let why = format!(
                "gave up after {count} failures within {} s: {reason}",
                window.as_secs()
            );
            if self.spec.give_up_hook.is_some() {
                out.push(Action::RunGiveUpHook {
                    context: FailureContext {
                        component: self.spec.name.to_string(),
                        failures: u32::try_from(count).unwrap_or(u32::MAX),
                        window_ms: duration_ms(window),
                        last_exit_code: self.last_exit.0,
                        last_signal: self.last_exit.1,
                        reason: reason.clone(),
                        ts_ms: now.unix_ms,
                    },
                });
            }
            self.quarantine(why, now, out);
            return;
        }
        let r = self.random();
        let delay = self.spec.backoff.delay(self.attempt, r);
        self.attempt = self.attempt.saturating_add(1);
        self.go(
            ComponentState::Backoff,
            format!(
                "{reason}; restart in {} ms (failure {count} of {max})",
                duration_ms(delay)
            ),
            now,
            out,
        );
        self.set_timer(TimerKind::State, now.at + delay, out);
    }

    /// Feeds one input; returns the actions to carry out, in order.
    pub fn handle(&mut self, input: Input, now: Now) -> Vec<Action> {
        let mut out = Vec::new();
        match input {
            Input::DependenciesReady => {
                if self.state == ComponentState::Pending && self.pid.is_none() {
                    self.spawn(false, "dependencies ready", now, &mut out);
                }
            }
            Input::Spawned { pid } => {
                if self.state == ComponentState::Starting && self.pid.is_none() {
                    self.running(pid, &format!("spawned pid {pid}"), now, &mut out);
                    if self.pending_spec.is_some() {
                        self.begin_stop(
                            AfterStop::Reload,
                            "config reloaded during start",
                            now,
                            &mut out,
                        );
                    }
                } else if self.pid != Some(pid) {
                    // A spawn nobody asked for any more (e.g. stopped meanwhile): stop it.
                    out.push(Action::KillTree { pid });
                }
            }
            Input::SpawnFailed { reason } => {
                if self.state == ComponentState::Starting && self.pid.is_none() {
                    self.last_exit = (None, None);
                    if let Some(spec) = self.pending_spec.take() {
                        self.spec = spec;
                        self.after_stop = None;
                        self.go(
                            ComponentState::Pending,
                            "config reloaded during start",
                            now,
                            &mut out,
                        );
                        return out;
                    }
                    self.fail(format!("spawn failed: {reason}"), false, now, &mut out);
                }
            }
            Input::Adopted { pid } => {
                if self.pid.is_none()
                    && matches!(
                        self.state,
                        ComponentState::Pending | ComponentState::Stopped
                    )
                {
                    self.running(pid, &format!("adopted running pid {pid}"), now, &mut out);
                }
            }
            Input::Exited { pid, code, signal } => {
                if self.pid != Some(pid) {
                    return out;
                }
                self.last_exit = (code, signal);
                let how = match (code, signal) {
                    (_, Some(s)) => format!("killed by signal {s}"),
                    (Some(c), None) => format!("exited with code {c}"),
                    (None, None) => "exited".to_owned(),
                };
                let clean = code == Some(0) && signal.is_none();
                let oneshot = self.spec.kind == ComponentKind::Oneshot;
                // An exit the policy does not hold against the component is news, not
                // a warning: asked for, a one-shot's success, or 0 under on-failure/never.
                let severity = if self.state == ComponentState::Stopping
                    || (clean
                        && !self.pulse_kill
                        && (oneshot || self.spec.restart_policy != RestartPolicy::Always))
                {
                    Severity::Info
                } else {
                    Severity::Warning
                };
                out.push(self.event(
                    now,
                    severity,
                    EventKind::ProcessExited { pid, code, signal },
                    format!("pid {pid} {how}"),
                ));
                if self.state == ComponentState::Stopping {
                    self.pid = None;
                    self.clear_timer(TimerKind::State, &mut out);
                    let after = self.after_stop.take().unwrap_or(AfterStop::Stop);
                    self.after_stopped(after, &format!("stopped ({how})"), now, &mut out);
                } else if oneshot && clean && !self.pulse_kill {
                    self.pid = None;
                    self.clear_timer(TimerKind::State, &mut out);
                    out.push(Action::PersistCompleted);
                    self.go(
                        ComponentState::Ready,
                        format!("completed ({how})"),
                        now,
                        &mut out,
                    );
                } else {
                    self.fail(how, clean, now, &mut out);
                }
            }
            Input::Probe {
                role,
                passed,
                detail,
            } => self.probe(role, passed, detail, now, &mut out),
            Input::Timer { kind, token } => {
                if self.timers[timer_slot(kind)] != Some(token) {
                    return out;
                }
                self.timers[timer_slot(kind)] = None;
                match (kind, self.state) {
                    (TimerKind::State, ComponentState::Backoff) => {
                        self.spawn(true, "backoff elapsed", now, &mut out);
                    }
                    (TimerKind::State, ComponentState::Stopping) => {
                        if let Some(pid) = self.pid {
                            out.push(Action::KillTree { pid });
                            out.push(self.event(
                                now,
                                Severity::Warning,
                                EventKind::Other {
                                    code: "stop_grace_exceeded".into(),
                                },
                                format!(
                                    "still running {} ms after {}: SIGKILL",
                                    duration_ms(self.spec.stop_grace),
                                    self.spec.stop_signal
                                ),
                            ));
                        }
                    }
                    (TimerKind::Pulse, _) => {
                        if let Some(pulse) = self.pulse.take() {
                            if let Some(report) = &mut self.last_pulse {
                                report.done = true;
                                report.passed = false;
                            }
                            out.push(self.event(
                                now,
                                Severity::Critical,
                                EventKind::PulseResult {
                                    recovered_ms: None,
                                    budget_ms: duration_ms(pulse.budget),
                                    passed: false,
                                },
                                format!("not ready again within {} ms", duration_ms(pulse.budget)),
                            ));
                        }
                    }
                    _ => {}
                }
            }
            Input::RestoreQuarantine { reason } => {
                if self.pid.is_none() && self.state != ComponentState::Quarantined {
                    self.clear_timer(TimerKind::State, &mut out);
                    self.go(
                        ComponentState::Quarantined,
                        format!("still quarantined from before the agent restarted: {reason}"),
                        now,
                        &mut out,
                    );
                }
            }
            Input::RestoreCompleted { revision } => {
                if self.spec.kind == ComponentKind::Oneshot
                    && self.state == ComponentState::Pending
                    && self.pid.is_none()
                    && revision == self.spec.revision
                {
                    self.go(
                        ComponentState::Ready,
                        format!("completed in an earlier agent run (revision {revision})"),
                        now,
                        &mut out,
                    );
                }
            }
            Input::VramExceeded {
                used_bytes,
                budget_bytes,
            } => {
                out.push(self.event(
                    now,
                    Severity::Warning,
                    EventKind::VramBudgetExceeded {
                        used_bytes,
                        budget_bytes,
                    },
                    format!("uses {used_bytes} bytes of VRAM, budget {budget_bytes}"),
                ));
                if self.spec.vram_policy == VramPolicy::Restart && self.pid.is_some() {
                    self.begin_stop(
                        AfterStop::Fail("VRAM budget exceeded".into()),
                        "VRAM budget exceeded; restarting by policy",
                        now,
                        &mut out,
                    );
                }
            }
            Input::MemoryExceeded {
                used_bytes,
                budget_bytes,
            } => {
                out.push(self.event(
                    now,
                    Severity::Warning,
                    EventKind::MemoryBudgetExceeded {
                        used_bytes,
                        budget_bytes,
                    },
                    format!("uses {used_bytes} bytes of memory, budget {budget_bytes}"),
                ));
            }
        }
        out
    }

    fn probe(
        &mut self,
        role: ProbeRole,
        passed: bool,
        detail: String,
        now: Now,
        out: &mut Vec<Action>,
    ) {
        if self.probing() != Some(role) {
            return;
        }
        let Some(spec) = (match role {
            ProbeRole::Readiness => self.spec.readiness.clone(),
            ProbeRole::Liveness => self.spec.liveness.clone(),
        }) else {
            return;
        };
        if passed {
            self.probe_fails = 0;
            self.probe_passes = self.probe_passes.saturating_add(1);
            if self.probe_passes >= spec.success_threshold.get() {
                match self.state {
                    ComponentState::Starting => {
                        self.go(ComponentState::Ready, "readiness probe passed", now, out)
                    }
                    ComponentState::Unhealthy => self.go(
                        ComponentState::Ready,
                        "liveness probe passes again",
                        now,
                        out,
                    ),
                    _ => {}
                }
            }
            return;
        }
        self.probe_passes = 0;
        let in_start_period = self
            .spawned_at
            .is_some_and(|t| now.at.saturating_duration_since(t) < spec.start_period);
        if in_start_period {
            return;
        }
        self.probe_fails = self.probe_fails.saturating_add(1);
        let threshold = spec.failure_threshold.get();
        if role == ProbeRole::Readiness {
            // A start that never becomes ready is a failed start: stopped, then the
            // restart policy and the give-up rule decide, like a crash.
            if self.probe_fails >= threshold {
                let reason = format!(
                    "readiness probe failed {threshold} times after the {} ms start period: {detail}",
                    duration_ms(spec.start_period)
                );
                self.begin_stop(AfterStop::Fail(reason.clone()), &reason, now, out);
            }
            return;
        }
        if self.probe_fails >= threshold {
            let reason = format!("liveness probe failed {threshold} times: {detail}");
            self.begin_stop(AfterStop::Fail(reason.clone()), &reason, now, out);
        } else if self.state == ComponentState::Ready {
            self.go(
                ComponentState::Unhealthy,
                format!(
                    "liveness probe failed ({} of {threshold}): {detail}",
                    self.probe_fails
                ),
                now,
                out,
            );
        }
    }

    /// Carries out an operator command; refused with a reason when it does not apply.
    pub fn command(&mut self, control: Control, now: Now) -> Result<Vec<Action>, String> {
        let mut out = Vec::new();
        let state = self.state;
        match control {
            Control::Start => match state {
                ComponentState::Quarantined => return Err("quarantined: resolve it first".into()),
                ComponentState::Stopped => {
                    self.go(ComponentState::Pending, "start requested", now, &mut out)
                }
                ComponentState::Stopping => self.after_stop = Some(AfterStop::Restart),
                _ => {}
            },
            Control::Stop => match state {
                ComponentState::Quarantined | ComponentState::Stopped => {}
                ComponentState::Stopping => self.after_stop = Some(AfterStop::Stop),
                _ => self.begin_stop(AfterStop::Stop, "stop requested", now, &mut out),
            },
            Control::Restart => match state {
                ComponentState::Quarantined => return Err("quarantined: resolve it first".into()),
                ComponentState::Stopped => {
                    self.go(ComponentState::Pending, "restart requested", now, &mut out)
                }
                ComponentState::Pending => {}
                ComponentState::Stopping => self.after_stop = Some(AfterStop::Restart),
                _ => self.begin_stop(AfterStop::Restart, "restart requested", now, &mut out),
            },
            Control::Resolve { note } => {
                if state != ComponentState::Quarantined {
                    return Err(format!("not quarantined (state {state})"));
                }
                self.failures.clear();
                self.attempt = 0;
                out.push(Action::ClearQuarantine);
                out.push(self.event(
                    now,
                    Severity::Info,
                    EventKind::QuarantineResolved { note: note.clone() },
                    format!("quarantine resolved: {note}"),
                ));
                self.go(
                    ComponentState::Pending,
                    format!("resolved: {note}"),
                    now,
                    &mut out,
                );
            }
            Control::Quarantine { note } => match state {
                ComponentState::Quarantined => {}
                _ => self.begin_stop(
                    AfterStop::Quarantine(format!("quarantined by operator: {note}")),
                    "quarantine requested",
                    now,
                    &mut out,
                ),
            },
            Control::Pulse { budget } => {
                let Some(pid) = self.pid else {
                    return Err(format!("not running (state {state})"));
                };
                if state != ComponentState::Ready {
                    return Err(format!("a pulse needs a ready component (state {state})"));
                }
                if self.pulse.is_some() {
                    return Err("a pulse is already running".into());
                }
                self.pulse = Some(Pulse {
                    started: now.at,
                    budget,
                });
                self.last_pulse = Some(PulseReport {
                    started_ms: now.unix_ms,
                    budget_ms: duration_ms(budget),
                    recovered_ms: None,
                    done: false,
                    passed: false,
                });
                self.pulse_kill = true;
                out.push(self.event(
                    now,
                    Severity::Info,
                    EventKind::Other {
                        code: "pulse_started".into(),
                    },
                    format!(
                        "failure pulse: killing pid {pid}, budget {} ms",
                        duration_ms(budget)
                    ),
                ));
                out.push(Action::KillTree { pid });
                self.set_timer(TimerKind::Pulse, now.at + budget, &mut out);
            }
        }
        Ok(out)
    }

    /// Takes a changed spec (config reload): a running component is stopped and started
    /// again with it once its dependencies are ready; otherwise it applies at once.
    pub fn reload(&mut self, spec: ComponentSpec, now: Now) -> Vec<Action> {
        let mut out = Vec::new();
        match self.state {
            ComponentState::Quarantined | ComponentState::Stopped => self.spec = spec,
            ComponentState::Pending => self.spec = spec,
            ComponentState::Backoff => {
                self.spec = spec;
                self.clear_timer(TimerKind::State, &mut out);
                self.attempt = 0;
                self.go(
                    ComponentState::Pending,
                    "config reloaded: new spec",
                    now,
                    &mut out,
                );
            }
            ComponentState::Stopping => {
                self.pending_spec = Some(spec);
                if !matches!(
                    self.after_stop,
                    Some(AfterStop::Stop) | Some(AfterStop::Quarantine(_))
                ) {
                    self.after_stop = Some(AfterStop::Reload);
                }
            }
            ComponentState::Starting if self.pid.is_none() => {
                // Spawn in flight: take the new spec; the caller's Spawned restarts it below.
                self.pending_spec = Some(spec);
                self.after_stop = Some(AfterStop::Reload);
            }
            _ => {
                self.pending_spec = Some(spec);
                self.begin_stop(
                    AfterStop::Reload,
                    "config reloaded: spec changed",
                    now,
                    &mut out,
                );
            }
        }
        out
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;
