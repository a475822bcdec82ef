//! One tokio task per component: a single `select!` over its mailbox, its process's
//! exit, its two timers and its probe, feeding the pure [`Machine`] and carrying out
//! the actions it returns with real processes.

use super::machine::{Action, Control, Input, Machine, Now, ProbeRole, PulseReport, TimerKind};
use super::state_store::StateStore;
use crate::config::{Argv, ComponentKind, ComponentSpec};
use crate::logs::{LogPolicy, Logs};
use crate::probe::{run_probe, ProbeOutcome};
use crate::process::{self, AdoptedProcess, ComponentProcess, Exit, SpawnSpec};
use futures::future::BoxFuture;
use nix::sys::signal::killpg;
use nix::unistd::Pid;
use razar_shared::domain::{ComponentState, Severity};
use razar_shared::protocol::{Event, EventKind, Subject, UnixMillis};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::AsyncWriteExt;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;

/// How long a recovery action may run before it is killed.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a give-up hook may run before it is killed.
const HOOK_TIMEOUT: Duration = Duration::from_secs(30);

/// What the agent shows about one component.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentStatus {
    pub name: String,
    #[serde(with = "state_name")]
    pub state: ComponentState,
    pub pid: Option<u32>,
    pub revision: String,
    pub critical: bool,
    /// Processes started after the first one.
    pub restarts: u64,
    /// Failures inside the give-up window.
    pub recent_failures: u32,
    /// When the current state was entered.
    pub since_ms: UnixMillis,
    /// Why it is in this state; for a pending component, what it waits for.
    pub reason: String,
    /// The latest failure pulse (`razar-agent pulse` waits for its result).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_pulse: Option<PulseReport>,
}

/// Component states as their stable lower-case names in JSON.
mod state_name {
    use razar_shared::domain::ComponentState;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(state: &ComponentState, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(state.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ComponentState, D::Error> {
        let name = String::deserialize(d)?;
        ComponentState::ALL
            .into_iter()
            .find(|s| s.as_str() == name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown state `{name}`")))
    }
}

/// Messages to a component task.
#[derive(Debug)]
pub(crate) enum ToComponent {
    Input(Input),
    Command(Control, oneshot::Sender<Result<(), String>>),
    /// New spec; answered once the machine took it (e.g. the stop has begun).
    Reload(Box<ComponentSpec>, oneshot::Sender<()>),
    /// What a pending component waits for (dependencies not ready, components of a lower
    /// priority number still to start); shown as its reason while it is pending.
    Waiting(Option<String>),
    /// End the task (the component is down).
    Exit,
}

/// What every component task shares.
pub(crate) struct Shared {
    pub logs: Logs,
    pub store: Arc<dyn StateStore>,
    pub events: broadcast::Sender<Event>,
    pub statuses: watch::Sender<BTreeMap<String, ComponentStatus>>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Where components' stdout and stderr named pipes live (see
    /// [`process::spawn_with_fifos`]); `None`: anonymous pipes, which end with the agent.
    pub stdio_dir: Option<std::path::PathBuf>,
}

pub(crate) fn now() -> Now {
    Now {
        at: std::time::Instant::now(),
        unix_ms: unix_ms(),
    }
}

pub(crate) fn unix_ms() -> UnixMillis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Publishes an event: broadcast, metrics, log line.
pub(crate) fn publish(shared: &Shared, event: Event) {
    shared.metrics.event(&event);
    tracing::info!(
        subject = ?event.subject,
        kind = ?event.kind,
        severity = event.severity.as_str(),
        message = %event.message,
        "event"
    );
    let _ = shared.events.send(event);
}

pub(crate) fn component_event(
    name: &str,
    severity: Severity,
    kind: EventKind,
    message: String,
) -> Event {
    Event {
        ts_ms: unix_ms(),
        severity,
        subject: Subject::Component(name.to_owned()),
        kind,
        message,
    }
}

enum Running {
    Child(ComponentProcess),
    Adopted(AdoptedProcess),
}

impl Running {
    fn pid(&self) -> u32 {
        match self {
            Running::Child(c) => c.pid(),
            Running::Adopted(a) => a.pid(),
        }
    }
    fn pgid(&self) -> i32 {
        match self {
            Running::Child(c) => c.pgid(),
            Running::Adopted(a) => a.pgid(),
        }
    }
}

async fn wait_exit(running: &mut Option<Running>) -> Exit {
    match running {
        Some(Running::Child(c)) => c.wait().await.unwrap_or(Exit::Unknown),
        Some(Running::Adopted(a)) => a.wait().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn poll_probe(
    probe: &mut Option<BoxFuture<'static, (ProbeRole, ProbeOutcome)>>,
) -> (ProbeRole, ProbeOutcome) {
    match probe {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

enum Wake {
    Mail(Option<ToComponent>),
    Exited(Exit),
    Timer(TimerKind, u64),
    ProbeDue,
    Probed(ProbeRole, ProbeOutcome),
}

pub(crate) struct ComponentTask {
    name: String,
    machine: Machine,
    mailbox: mpsc::Receiver<ToComponent>,
    shared: Arc<Shared>,
    running: Option<Running>,
    timers: [Option<(Instant, u64)>; 2],
    probe: Option<BoxFuture<'static, (ProbeRole, ProbeOutcome)>>,
    probe_role: Option<ProbeRole>,
    next_probe: Option<Instant>,
    spawns: u64,
    since_ms: UnixMillis,
    reason: String,
    waiting: Option<String>,
    /// The status last published: an unchanged one is not sent again (the supervisor
    /// plans on every change).
    published: Option<ComponentStatus>,
}

fn slot(kind: TimerKind) -> usize {
    match kind {
        TimerKind::State => 0,
        TimerKind::Pulse => 1,
    }
}

impl ComponentTask {
    pub(crate) fn new(
        spec: ComponentSpec,
        mailbox: mpsc::Receiver<ToComponent>,
        shared: Arc<Shared>,
    ) -> ComponentTask {
        let seed = unix_ms() as u64 ^ (spec.name.as_str().len() as u64).wrapping_mul(0x9E37_79B9);
        let name = spec.name.to_string();
        ComponentTask {
            name,
            machine: Machine::new(spec, seed),
            mailbox,
            shared,
            running: None,
            timers: [None, None],
            probe: None,
            probe_role: None,
            next_probe: None,
            spawns: 0,
            since_ms: unix_ms(),
            reason: "configured".into(),
            waiting: None,
            published: None,
        }
    }

    fn status(&self) -> ComponentStatus {
        ComponentStatus {
            name: self.name.clone(),
            state: self.machine.state(),
            pid: self.machine.pid(),
            revision: self.machine.spec().revision.clone(),
            critical: self.machine.spec().critical,
            restarts: self.spawns.saturating_sub(1),
            recent_failures: u32::try_from(self.machine.recent_failures()).unwrap_or(u32::MAX),
            since_ms: self.since_ms,
            reason: match &self.waiting {
                Some(waiting) if self.machine.state() == ComponentState::Pending => waiting.clone(),
                _ => self.reason.clone(),
            },
            last_pulse: self.machine.last_pulse(),
        }
    }

    fn publish_status(&mut self) {
        let status = self.status();
        if self.published.as_ref() == Some(&status) {
            return;
        }
        self.published = Some(status.clone());
        self.shared.metrics.component(&status);
        self.shared.statuses.send_modify(|m| {
            m.insert(self.name.clone(), status);
        });
    }

    fn register_logs(&self) {
        let logs = &self.machine.spec().logs;
        let policy = LogPolicy {
            dir: logs.dir.clone(),
            max_file_bytes: logs.max_size_bytes.get(),
            max_files: logs.max_files.get(),
        };
        if let Err(error) = self.shared.logs.register(&self.name, policy) {
            tracing::warn!(component = %self.name, %error, "log capture unavailable");
        }
    }

    /// Restores durable state (quarantine, a process from before an agent restart), then runs.
    pub(crate) async fn run(
        mut self,
        quarantine: Option<String>,
        previous: Option<(process::ProcessId, String)>,
    ) {
        self.register_logs();
        if let Some(reason) = quarantine {
            self.step(Input::RestoreQuarantine { reason }).await;
        }
        if let Some((id, revision)) = previous {
            self.take_over(id, revision).await;
        }
        if self.machine.spec().kind == ComponentKind::Oneshot {
            self.restore_completion().await;
        }
        self.publish_status();
        loop {
            self.sync_probe();
            let wake = tokio::select! {
                mail = self.mailbox.recv() => Wake::Mail(mail),
                exit = wait_exit(&mut self.running) => Wake::Exited(exit),
                _ = sleep_until(self.timers[0].map(|t| t.0)) => Wake::Timer(TimerKind::State, self.timers[0].map_or(0, |t| t.1)),
                _ = sleep_until(self.timers[1].map(|t| t.0)) => Wake::Timer(TimerKind::Pulse, self.timers[1].map_or(0, |t| t.1)),
                _ = sleep_until(self.next_probe), if self.probe.is_none() => Wake::ProbeDue,
                (role, outcome) = poll_probe(&mut self.probe) => Wake::Probed(role, outcome),
            };
            match wake {
                Wake::Mail(None) => break,
                Wake::Mail(Some(ToComponent::Exit)) => {
                    self.remove_fifos();
                    // Removed from the config: its log follows end, its log file closes.
                    self.shared.logs.unregister(&self.name).await;
                    break;
                }
                Wake::Mail(Some(ToComponent::Input(input))) => self.step(input).await,
                Wake::Mail(Some(ToComponent::Waiting(waiting))) => self.waiting = waiting,
                Wake::Mail(Some(ToComponent::Command(control, reply))) => {
                    match self.machine.command(control, now()) {
                        Ok(actions) => {
                            let _ = reply.send(Ok(()));
                            self.execute(actions).await;
                        }
                        Err(reason) => {
                            let _ = reply.send(Err(reason));
                        }
                    }
                }
                Wake::Mail(Some(ToComponent::Reload(spec, reply))) => {
                    let actions = self.machine.reload(*spec, now());
                    self.register_logs();
                    let _ = reply.send(());
                    self.execute(actions).await;
                }
                Wake::Exited(exit) => self.exited(exit).await,
                Wake::Timer(kind, token) => {
                    self.timers[slot(kind)] = None;
                    self.step(Input::Timer { kind, token }).await;
                }
                Wake::ProbeDue => self.start_probe(),
                Wake::Probed(role, outcome) => {
                    self.probe = None;
                    let interval = match role {
                        ProbeRole::Readiness => {
                            self.machine.spec().readiness.as_ref().map(|p| p.interval)
                        }
                        ProbeRole::Liveness => {
                            self.machine.spec().liveness.as_ref().map(|p| p.interval)
                        }
                    };
                    self.next_probe = interval.map(|i| Instant::now() + i);
                    let (passed, detail) = match outcome {
                        ProbeOutcome::Success => (true, String::new()),
                        ProbeOutcome::Failure(reason) => (false, reason),
                    };
                    self.step(Input::Probe {
                        role,
                        passed,
                        detail,
                    })
                    .await;
                }
            }
            self.publish_status();
        }
        self.shared.statuses.send_modify(|m| {
            m.remove(&self.name);
        });
        self.shared.metrics.forget_component(&self.name);
    }

    /// Removes the component's named pipes once it is down for good.
    fn remove_fifos(&self) {
        if self.running.is_some() {
            return;
        }
        if let Some(dir) = &self.shared.stdio_dir {
            if let Err(error) = process::remove_fifos(dir, &self.name) {
                tracing::warn!(component = %self.name, %error, "cannot remove output pipes");
            }
        }
    }

    /// Starts, restarts or stops probing to match the machine's state.
    fn sync_probe(&mut self) {
        let want = self.machine.probing();
        if want != self.probe_role {
            self.probe = None;
            self.probe_role = want;
            self.next_probe = match want {
                Some(ProbeRole::Readiness) => Some(Instant::now()),
                Some(ProbeRole::Liveness) => self
                    .machine
                    .spec()
                    .liveness
                    .as_ref()
                    .map(|p| Instant::now() + p.interval),
                None => None,
            };
        }
    }

    fn start_probe(&mut self) {
        self.next_probe = None;
        let Some(role) = self.probe_role else { return };
        let spec = match role {
            ProbeRole::Readiness => self.machine.spec().readiness.clone(),
            ProbeRole::Liveness => self.machine.spec().liveness.clone(),
        };
        if let Some(spec) = spec {
            self.probe = Some(Box::pin(async move {
                (role, run_probe(&spec.check, spec.timeout).await)
            }));
        }
    }

    /// A one-shot that completed with this revision before the agent restarted is ready
    /// without running again; a completion of another revision is forgotten.
    async fn restore_completion(&mut self) {
        match self.shared.store.completed(&self.name) {
            Ok(Some(revision)) if revision == self.machine.spec().revision => {
                self.step(Input::RestoreCompleted { revision }).await;
            }
            Ok(Some(_)) => {
                if let Err(error) = self.shared.store.clear_completed(&self.name) {
                    tracing::error!(component = %self.name, %error, "cannot clear one-shot completion");
                }
            }
            Ok(None) => {}
            Err(error) => {
                tracing::error!(component = %self.name, %error, "cannot read one-shot completion: it runs again");
            }
        }
    }

    async fn take_over(&mut self, id: process::ProcessId, revision: String) {
        let Some(adopted) = process::adopt(id) else {
            let _ = self.shared.store.clear_process(&self.name);
            return;
        };
        // Read its output on, whether it is kept or stopped (what it says while it stops
        // is worth keeping, and a full pipe would hold up its exit).
        if let Some(dir) = &self.shared.stdio_dir {
            if let Err(error) = process::resume_capture(&self.name, &self.shared.logs, dir) {
                tracing::warn!(
                    component = %self.name,
                    pid = id.pid,
                    %error,
                    "cannot capture the adopted process's output again"
                );
            }
        }
        let spec = self.machine.spec();
        let keep = self.machine.state() == ComponentState::Pending && spec.revision == revision;
        let message = if keep {
            format!(
                "pid {} from the previous agent run is still alive: adopted",
                id.pid
            )
        } else {
            format!(
                "pid {} from the previous agent run is still alive: stopped ({})",
                id.pid,
                if spec.revision != revision {
                    "spec changed"
                } else {
                    "component not meant to run"
                }
            )
        };
        publish(
            &self.shared,
            component_event(
                &self.name,
                Severity::Info,
                EventKind::ProcessAdopted {
                    pid: id.pid,
                    adopted: keep,
                },
                message,
            ),
        );
        if keep {
            self.running = Some(Running::Adopted(adopted));
            self.step(Input::Adopted { pid: id.pid }).await;
        } else {
            let spec = self.machine.spec();
            let _ = adopted.stop(spec.stop_signal, spec.stop_grace).await;
            let _ = self.shared.store.clear_process(&self.name);
        }
    }

    async fn exited(&mut self, exit: Exit) {
        let Some(running) = self.running.take() else {
            return;
        };
        let pid = running.pid();
        // Whatever the leader left in its group (grandchildren) goes with it.
        let _ = process::kill_tree(running.pgid());
        // The stored pid is left as is: it names a dead process now (adoption checks the
        // start time), and the next spawn overwrites it. Not writing here keeps a durable
        // commit off the kill → restart path.
        let (code, signal) = match exit {
            Exit::Code(c) => (Some(c), None),
            Exit::Signal(s) => (None, Some(s)),
            Exit::Unknown => (None, None),
        };
        self.step(Input::Exited { pid, code, signal }).await;
    }

    async fn step(&mut self, input: Input) {
        let actions = self.machine.handle(input, now());
        self.execute(actions).await;
    }

    /// Carries out actions in order; actions that produce inputs feed them back.
    async fn execute(&mut self, actions: Vec<Action>) {
        let mut queue: VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            let follow_up = match action {
                Action::Spawn => Some(self.spawn()),
                Action::RunRecoveryAction => {
                    if let Some(argv) = self.machine.spec().recovery_action.clone() {
                        let result = run_command(&argv, None, RECOVERY_TIMEOUT).await;
                        let (severity, message) = match result {
                            Ok(()) => (Severity::Info, "recovery action succeeded".to_owned()),
                            Err(e) => (Severity::Warning, format!("recovery action failed: {e}")),
                        };
                        publish(
                            &self.shared,
                            component_event(
                                &self.name,
                                severity,
                                EventKind::Other {
                                    code: "recovery_action".into(),
                                },
                                message,
                            ),
                        );
                    }
                    None
                }
                Action::SignalTree { pid, signal } => {
                    if let Some(running) = self.running.as_ref().filter(|r| r.pid() == pid) {
                        let _ = killpg(Pid::from_raw(running.pgid()), signal);
                    }
                    None
                }
                Action::KillTree { pid } => {
                    match self.running.as_ref().filter(|r| r.pid() == pid) {
                        Some(running) => {
                            let _ = process::kill_tree(running.pgid());
                        }
                        // A stray spawn the machine refused: its own group.
                        None => {
                            let _ = process::kill_tree(pid as i32);
                        }
                    }
                    None
                }
                // A timer already due (a zero restart backoff) fires at once: going through
                // tokio's timer wheel would round it up to its next millisecond tick.
                Action::SetTimer { kind, token, at } if at <= std::time::Instant::now() => {
                    self.timers[slot(kind)] = None;
                    Some(Input::Timer { kind, token })
                }
                Action::SetTimer { kind, token, at } => {
                    self.timers[slot(kind)] = Some((Instant::from_std(at), token));
                    None
                }
                Action::ClearTimer { kind } => {
                    self.timers[slot(kind)] = None;
                    None
                }
                Action::RunGiveUpHook { context } => {
                    if let Some(argv) = self.machine.spec().give_up_hook.clone() {
                        let json = serde_json::to_vec(&context).unwrap_or_default();
                        let result = run_command(&argv, Some(json), HOOK_TIMEOUT).await;
                        let (severity, message) = match result {
                            Ok(()) => (Severity::Info, "give-up hook succeeded".to_owned()),
                            Err(e) => (Severity::Warning, format!("give-up hook failed: {e}")),
                        };
                        publish(
                            &self.shared,
                            component_event(
                                &self.name,
                                severity,
                                EventKind::Other {
                                    code: "give_up_hook".into(),
                                },
                                message,
                            ),
                        );
                    }
                    None
                }
                Action::PersistQuarantine { reason } => {
                    if let Err(error) = self.shared.store.set_quarantine(&self.name, &reason) {
                        tracing::error!(component = %self.name, %error, "cannot persist quarantine");
                    }
                    None
                }
                Action::ClearQuarantine => {
                    if let Err(error) = self.shared.store.clear_quarantine(&self.name) {
                        tracing::error!(component = %self.name, %error, "cannot clear quarantine");
                    }
                    None
                }
                Action::PersistCompleted => {
                    let revision = self.machine.spec().revision.clone();
                    if let Err(error) = self.shared.store.set_completed(&self.name, &revision) {
                        tracing::error!(component = %self.name, %error, "cannot persist one-shot completion");
                    }
                    None
                }
                Action::Emit(event) => {
                    if let EventKind::StateChanged { .. } = event.kind {
                        self.since_ms = event.ts_ms;
                        self.reason = event.message.clone();
                    }
                    publish(&self.shared, event);
                    None
                }
            };
            if let Some(input) = follow_up {
                let more = self.machine.handle(input, now());
                for a in more.into_iter().rev() {
                    queue.push_front(a);
                }
            }
        }
    }

    fn spawn(&mut self) -> Input {
        let spec = self.machine.spec();
        if spec.kind == ComponentKind::Oneshot {
            // Running again: until it exits 0, it has not completed (an agent restart
            // in between must not take it as done).
            if let Err(error) = self.shared.store.clear_completed(&self.name) {
                tracing::error!(component = %self.name, %error, "cannot clear one-shot completion");
            }
        }
        let spawn_spec = SpawnSpec::from_component(spec);
        let spawned = match &self.shared.stdio_dir {
            Some(dir) => process::spawn_with_fifos(&spawn_spec, &self.shared.logs, dir),
            None => process::spawn(&spawn_spec, Some(&self.shared.logs)),
        };
        match spawned {
            Ok(child) => {
                let id = child.id();
                if let Err(error) = self
                    .shared
                    .store
                    .set_process(&self.name, id, &spec.revision)
                {
                    tracing::error!(component = %self.name, %error, "cannot store pid");
                }
                self.spawns += 1;
                self.running = Some(Running::Child(child));
                Input::Spawned { pid: id.pid }
            }
            Err(error) => {
                // Without log capture rather than not at all.
                if matches!(error, process::ProcessError::Logs(_)) {
                    if let Ok(child) = process::spawn(&spawn_spec, None) {
                        let id = child.id();
                        let _ = self
                            .shared
                            .store
                            .set_process(&self.name, id, &spec.revision);
                        self.spawns += 1;
                        self.running = Some(Running::Child(child));
                        return Input::Spawned { pid: id.pid };
                    }
                }
                Input::SpawnFailed {
                    reason: error.to_string(),
                }
            }
        }
    }
}

/// Runs a configured command (recovery action, give-up hook) in its own process group,
/// optionally feeding `stdin`, killing the group after `limit`.
async fn run_command(argv: &Argv, stdin: Option<Vec<u8>>, limit: Duration) -> Result<(), String> {
    let mut command = tokio::process::Command::new(&argv.program);
    command
        .args(&argv.args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start `{}`: {e}", argv.program))?;
    let pgid = child.id().map(|p| p as i32);
    let run = async {
        if let (Some(bytes), Some(mut pipe)) = (stdin, child.stdin.take()) {
            let _ = pipe.write_all(&bytes).await;
            drop(pipe);
        }
        child.wait().await
    };
    match tokio::time::timeout(limit, run).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(format!("`{}` {status}", argv.program)),
        Ok(Err(e)) => Err(format!("cannot wait for `{}`: {e}", argv.program)),
        Err(_) => {
            if let Some(pgid) = pgid {
                let _ = process::kill_tree(pgid);
            }
            Err(format!(
                "`{}` still running after {limit:?}: killed",
                argv.program
            ))
        }
    }
}
