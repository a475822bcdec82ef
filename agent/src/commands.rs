//! The typed command executor: commands from the collector, carried out on configured
//! components only (never a shell string from the network).
//!
//! Exactly once, durably: a command's id is recorded in the store *before* it acts
//! (claim: "failed: interrupted", what stands if the agent dies mid-command), and its
//! final outcome replaces the claim after it ran. A redelivered command does not run
//! again: it answers `Duplicate` with the original outcome, message and finish time.
//! Records older than `retention` are pruned (at start, then hourly).
//!
//! Log follows (`TailLogs` with `follow`) run as their own tasks and end on their
//! deadline, on a `CancelTail` command, or when the component goes away, always with a
//! last chunk marked `end`; a full outbound queue drops (and counts) chunks but never
//! ends a follow by itself. `Rollback` pins a component to one of its recorded revisions
//! ([`crate::revisions`]).
//!
//! GPU commands name a GPU by index or UUID ([`GpuRef`]), resolved against this host's
//! GPU inventory (an unknown GPU fails with the known ones). `DrainGpu` stops the
//! components whose `gpus` list the GPU and keeps them stopped, durably, until
//! `SetGpuHealth { healthy: true }`; `ResetGpu` drains, waits for them to stop, then runs
//! `gpu.reset_command` (an argv with `{index}`/`{uuid}`, killed after
//! `gpu.reset_timeout`) and succeeds iff it exits 0; the GPU stays drained.
//! `SwitchProfile` switches to a profile the config file defines ([`crate::profile`]).
//!
//! ([`crate::revisions`]); `DeployRevision` pins it to a revision the collector pushes
//! (same mechanism) and succeeds once the component has started on it.

use crate::config::{Argv, Config};
use crate::revisions;
use crate::store::{CommandRecord, Store};
use crate::supervisor::machine::Control;
use crate::supervisor::runtime::Agent;
use crate::supervisor::state_store::GpuDrain;
use crate::uplink::{Outbound, Uplink};
use razar_shared::domain::{ComponentState, GpuRef};
use razar_shared::protocol::{
    Command, CommandAction, CommandId, CommandOutcome, CommandResult, Event, EventKind, GpuInfo,
    LogChunk, RevisionSpec, UnixMillis,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{broadcast, mpsc, oneshot};

/// Most log lines one tail command returns.
pub const MAX_TAIL_LINES: u32 = 10_000;
/// How long executed-command records are kept by default.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long a log follow runs at most by default (the collector renews it).
pub const DEFAULT_FOLLOW_LIMIT: Duration = Duration::from_secs(3600);
/// How long a deployment waits for its component to start by default.
pub const DEFAULT_START_WAIT: Duration = Duration::from_secs(30);
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Where results and log chunks go (the uplink; a channel in tests).
pub trait Outbox: Send + Sync + 'static {
    /// False when the message had to be dropped (queue full, link down).
    fn send(&self, message: Outbound) -> bool;
}

impl Outbox for Uplink {
    fn send(&self, message: Outbound) -> bool {
        Uplink::send(self, message)
    }
}

impl Outbox for mpsc::UnboundedSender<Outbound> {
    fn send(&self, message: Outbound) -> bool {
        mpsc::UnboundedSender::send(self, message).is_ok()
    }
}

/// Executor settings.
#[derive(Debug, Clone, Copy)]
pub struct ExecutorOptions {
    /// Executed-command records older than this are pruned.
    pub retention: Duration,
    /// A log follow ends after this long unless cancelled sooner.
    pub follow_limit: Duration,
    /// A deployed revision answers once its component started, or after this long (it
    /// may wait for its dependencies): succeeded either way, with its state.
    pub start_wait: Duration,
}

impl Default for ExecutorOptions {
    fn default() -> Self {
        ExecutorOptions {
            retention: DEFAULT_RETENTION,
            follow_limit: DEFAULT_FOLLOW_LIMIT,
            start_wait: DEFAULT_START_WAIT,
        }
    }
}

/// Counters of the executor (exported by the agent's metrics).
#[derive(Debug, Default)]
pub struct ExecutorStats {
    pub executed: AtomicU64,
    pub duplicates: AtomicU64,
    /// Results or log chunks the outbox refused (queue full or link down).
    pub outbound_dropped: AtomicU64,
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> UnixMillis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn outcome_word(outcome: CommandOutcome) -> &'static str {
    match outcome {
        CommandOutcome::Succeeded => "succeeded",
        CommandOutcome::Failed => "failed",
        CommandOutcome::Expired => "expired",
        CommandOutcome::Duplicate => "duplicate",
    }
}

/// Runs commands from the collector until the channel closes.
pub struct Executor<O: Outbox> {
    agent: Agent,
    store: Arc<Store>,
    outbox: Arc<O>,
    options: ExecutorOptions,
    stats: Arc<ExecutorStats>,
    follows: Arc<Mutex<HashMap<CommandId, oneshot::Sender<()>>>>,
    /// This host's GPUs (what GPU commands are resolved against).
    gpus: Vec<GpuInfo>,
}

impl<O: Outbox> Executor<O> {
    pub fn new(agent: Agent, store: Arc<Store>, outbox: Arc<O>, options: ExecutorOptions) -> Self {
        Executor {
            agent,
            store,
            outbox,
            options,
            stats: Arc::default(),
            follows: Arc::default(),
            gpus: Vec::new(),
        }
    }

    /// The host's GPU inventory, for GPU commands (none by default: every GPU is unknown).
    pub fn with_gpus(mut self, gpus: Vec<GpuInfo>) -> Self {
        self.gpus = gpus;
        self
    }

    pub fn stats(&self) -> Arc<ExecutorStats> {
        Arc::clone(&self.stats)
    }

    /// Executes commands until `commands` closes.
    pub async fn run(self, mut commands: mpsc::Receiver<Command>) {
        let mut events = Some(self.agent.subscribe());
        self.prune().await;
        self.record_revisions().await;
        let mut prune = tokio::time::interval(PRUNE_EVERY);
        prune.tick().await;
        loop {
            tokio::select! {
                command = commands.recv() => {
                    let Some(command) = command else { break };
                    let result = self.execute(command).await;
                    self.emit(Outbound::CommandResult(result));
                }
                event = async {
                    match events.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => match event {
                    // Every applied config adds its revisions to the history.
                    Ok(Event { kind: EventKind::ConfigReloaded { .. }, .. })
                    | Err(broadcast::error::RecvError::Lagged(_)) => self.record_revisions().await,
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Closed) => events = None,
                },
                _ = prune.tick() => self.prune().await,
            }
        }
        // The follows end with the executor.
        let follows: Vec<_> = self
            .follows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .collect();
        for (_, cancel) in follows {
            let _ = cancel.send(());
        }
    }

    fn emit(&self, message: Outbound) {
        if !self.outbox.send(message) {
            self.stats.outbound_dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("command result dropped: outbound queue full or link down");
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> T + Send + 'static,
    ) -> Option<T> {
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || f(&store)).await.ok()
    }

    async fn prune(&self) {
        let before = now_ms()
            .saturating_sub(i64::try_from(self.options.retention.as_millis()).unwrap_or(i64::MAX));
        match self.blocking(move |s| s.prune_commands(before)).await {
            Some(Ok(n)) if n > 0 => tracing::info!(pruned = n, "old command records pruned"),
            Some(Err(error)) => tracing::warn!(%error, "cannot prune command records"),
            _ => {}
        }
    }

    /// Records the revisions the components run now (their history for rollbacks).
    async fn record_revisions(&self) {
        let config = self.agent.view().config();
        self.blocking(move |s| revisions::record_running(s, &config, now_ms()))
            .await;
    }

    /// Executes one command (or answers its redelivery) and returns its result.
    pub async fn execute(&self, command: Command) -> CommandResult {
        let id = command.id;
        let claim = CommandRecord {
            outcome: CommandOutcome::Failed,
            finished_ms: now_ms(),
            message: "interrupted: the agent stopped before the command finished".into(),
        };
        let claimed = self.blocking(move |s| s.record_command(&id, &claim)).await;
        match claimed {
            Some(Ok(Some(earlier))) => {
                self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                return CommandResult {
                    id,
                    finished_ms: earlier.finished_ms,
                    outcome: CommandOutcome::Duplicate,
                    message: format!("{}: {}", outcome_word(earlier.outcome), earlier.message),
                };
            }
            Some(Ok(None)) => {}
            Some(Err(error)) => {
                return CommandResult {
                    id,
                    finished_ms: now_ms(),
                    outcome: CommandOutcome::Failed,
                    message: format!("cannot record the command: {error}"),
                }
            }
            None => {
                return CommandResult {
                    id,
                    finished_ms: now_ms(),
                    outcome: CommandOutcome::Failed,
                    message: "cannot record the command: store task failed".into(),
                }
            }
        }
        self.stats.executed.fetch_add(1, Ordering::Relaxed);
        let (outcome, message) = if now_ms() > command.deadline_ms {
            (
                CommandOutcome::Expired,
                "deadline passed before delivery".to_owned(),
            )
        } else {
            self.carry_out(id, command.action).await
        };
        let record = CommandRecord {
            outcome,
            finished_ms: now_ms(),
            message,
        };
        let stored = record.clone();
        match self.blocking(move |s| s.finish_command(&id, &stored)).await {
            Some(Ok(())) => {}
            Some(Err(error)) => tracing::warn!(%error, "cannot record a command's outcome"),
            None => tracing::warn!("cannot record a command's outcome: store task failed"),
        }
        CommandResult {
            id,
            finished_ms: record.finished_ms,
            outcome: record.outcome,
            message: record.message,
        }
    }

    async fn carry_out(&self, id: CommandId, action: CommandAction) -> (CommandOutcome, String) {
        let failed = |message: String| (CommandOutcome::Failed, message);
        if let CommandAction::CancelTail { command } = action {
            let cancel = self
                .follows
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&command);
            return match cancel {
                Some(cancel) => {
                    let _ = cancel.send(());
                    (CommandOutcome::Succeeded, "log follow cancelled".into())
                }
                None => failed(format!("no log follow {} is running", hex::encode(command))),
            };
        }
        let component = match &action {
            CommandAction::Restart { component }
            | CommandAction::Stop { component }
            | CommandAction::Start { component }
            | CommandAction::Quarantine { component, .. }
            | CommandAction::Resolve { component, .. }
            | CommandAction::Pulse { component, .. }
            | CommandAction::Rollback { component, .. }
            | CommandAction::DeployRevision { component, .. }
            | CommandAction::TailLogs { component, .. } => component.clone(),
            CommandAction::CancelTail { .. } => String::new(),
            CommandAction::DrainGpu { gpu, note } => {
                return match self.resolve_gpu(gpu) {
                    Ok(g) => self.drain_gpu(&g, note).await,
                    Err(why) => failed(why),
                };
            }
            CommandAction::ResetGpu { gpu } => {
                return match self.resolve_gpu(gpu) {
                    Ok(g) => self.reset_gpu(&g).await,
                    Err(why) => failed(why),
                };
            }
            CommandAction::SetGpuHealth { gpu, healthy, note } => {
                return match (self.resolve_gpu(gpu), healthy) {
                    (Ok(g), true) => self.lift_gpu(&g).await,
                    (Ok(g), false) => self.drain_gpu(&g, note).await,
                    (Err(why), _) => failed(why),
                };
            }
            CommandAction::SwitchProfile { profile } => {
                return self.switch_profile(profile).await;
            }
        };
        let config = self.agent.view().config();
        if config.component(&component).is_none() {
            return failed(format!(
                "no component {component:?} is configured on this host"
            ));
        }
        let control = match action {
            CommandAction::Restart { .. } => Control::Restart,
            CommandAction::Stop { .. } => Control::Stop,
            CommandAction::Start { .. } => Control::Start,
            CommandAction::Quarantine { note, .. } => Control::Quarantine { note },
            CommandAction::Resolve { note, .. } => Control::Resolve { note },
            CommandAction::Pulse { budget_ms, .. } => Control::Pulse {
                budget: Duration::from_millis(budget_ms),
            },
            CommandAction::Rollback { revision, .. } => {
                return self.roll_back(&component, &revision).await;
            }
            CommandAction::DeployRevision { revision, .. } => {
                return self.deploy(&component, &revision).await;
            }
            CommandAction::TailLogs { lines, follow, .. } => {
                return self.tail(id, &component, lines, follow).await;
            }
            CommandAction::CancelTail { .. }
            | CommandAction::DrainGpu { .. }
            | CommandAction::ResetGpu { .. }
            | CommandAction::SetGpuHealth { .. }
            | CommandAction::SwitchProfile { .. } => return failed("unreachable".into()),
        };
        match self.agent.command(&component, control).await {
            Ok(()) => (CommandOutcome::Succeeded, "done".into()),
            Err(error) => failed(error.to_string()),
        }
    }

    /// The GPU `text` names (index or UUID) on this host.
    fn resolve_gpu(&self, text: &str) -> Result<GpuInfo, String> {
        resolve_gpu(&self.gpus, text).cloned()
    }

    /// Drains `gpu` (keeping an earlier drain's note and time) and waits for its
    /// components to stop.
    async fn drain_gpu(&self, gpu: &GpuInfo, note: &str) -> (CommandOutcome, String) {
        match self.drain_and_wait(gpu, note).await {
            Ok(stopped) => (
                CommandOutcome::Succeeded,
                format!("GPU {} ({}) drained; {}", gpu.index, gpu.uuid, stopped),
            ),
            Err(why) => (CommandOutcome::Failed, why),
        }
    }

    async fn drain_and_wait(&self, gpu: &GpuInfo, note: &str) -> Result<String, String> {
        let existing = self.agent.view().drained_gpus().remove(&gpu.index);
        let drain = match existing {
            Some(d) if note.is_empty() || d.note == note => d,
            _ => GpuDrain {
                uuid: gpu.uuid.clone(),
                note: note.to_owned(),
                since_ms: now_ms(),
            },
        };
        let mapped = self
            .agent
            .set_gpu_drain(gpu.index, Some(drain))
            .await
            .map_err(|e| format!("cannot drain GPU {}: {e}", gpu.index))?;
        self.emit_event(
            gpu.index,
            "gpu_drained",
            format!("GPU {} ({}) drained: {note}", gpu.index, gpu.uuid),
        );
        let config = self.agent.view().config();
        let grace: Duration = mapped
            .iter()
            .filter_map(|name| config.component(name))
            .map(|c| c.stop_grace + Duration::from_secs(10))
            .sum();
        let wait = grace + Duration::from_secs(10);
        let mut statuses = self.agent.watch_statuses();
        let all_down = async {
            loop {
                let up: Vec<String> = {
                    let now = statuses.borrow_and_update();
                    mapped
                        .iter()
                        .filter(|name| {
                            now.get(name.as_str()).is_some_and(|s| {
                                !matches!(
                                    s.state,
                                    ComponentState::Stopped | ComponentState::Quarantined
                                )
                            })
                        })
                        .cloned()
                        .collect()
                };
                if up.is_empty() || statuses.changed().await.is_err() {
                    return up;
                }
            }
        };
        match tokio::time::timeout(wait, all_down).await {
            Ok(up) if up.is_empty() => Ok(if mapped.is_empty() {
                "no component is mapped to it".to_owned()
            } else {
                format!("stopped: {}", mapped.join(", "))
            }),
            Ok(up) => Err(format!(
                "GPU {} drained, but the agent is stopping: {} still up",
                gpu.index,
                up.join(", ")
            )),
            Err(_) => Err(format!(
                "GPU {} drained, but its components did not stop within {}s",
                gpu.index,
                wait.as_secs()
            )),
        }
    }

    /// Drains `gpu`, then runs the host's reset command for it.
    async fn reset_gpu(&self, gpu: &GpuInfo) -> (CommandOutcome, String) {
        let config = self.agent.view().config();
        let Some(argv) = config.gpu_commands.reset_command.clone() else {
            return (
                CommandOutcome::Failed,
                "no GPU reset action on this host (gpu.reset_command is not configured)".into(),
            );
        };
        let stopped = match self.drain_and_wait(gpu, "reset requested").await {
            Ok(s) => s,
            Err(why) => return (CommandOutcome::Failed, why),
        };
        let argv = reset_argv(&argv, gpu);
        let shown = argv.join(" ");
        let outcome = run_reset(&argv, config.gpu_commands.reset_timeout).await;
        let (result, message) = match outcome {
            Ok(()) => (
                CommandOutcome::Succeeded,
                format!(
                    "GPU {} ({}) reset: `{shown}` exited 0; {stopped}; the GPU stays drained",
                    gpu.index, gpu.uuid
                ),
            ),
            Err(why) => (
                CommandOutcome::Failed,
                format!(
                    "GPU {} reset failed: `{shown}` {why}; the GPU stays drained",
                    gpu.index
                ),
            ),
        };
        self.emit_event(gpu.index, "gpu_reset", message.clone());
        (result, message)
    }

    /// Lifts `gpu`'s drain: the components it held start again.
    async fn lift_gpu(&self, gpu: &GpuInfo) -> (CommandOutcome, String) {
        let was = self.agent.view().drained_gpus().contains_key(&gpu.index);
        match self.agent.set_gpu_drain(gpu.index, None).await {
            Ok(mapped) => {
                let message = match (was, mapped.is_empty()) {
                    (false, _) => format!("GPU {} was not drained", gpu.index),
                    (true, true) => format!("GPU {} back in service", gpu.index),
                    (true, false) => format!(
                        "GPU {} back in service; starting {}",
                        gpu.index,
                        mapped.join(", ")
                    ),
                };
                if was {
                    self.emit_event(gpu.index, "gpu_undrained", message.clone());
                }
                (CommandOutcome::Succeeded, message)
            }
            Err(e) => (
                CommandOutcome::Failed,
                format!("cannot lift the drain of GPU {}: {e}", gpu.index),
            ),
        }
    }

    /// Switches to `profile` of the config file, durably (until the file changes its own).
    async fn switch_profile(&self, profile: &str) -> (CommandOutcome, String) {
        let current = self.agent.view().config();
        let new = match crate::profile::switched(&current, profile) {
            Ok(c) => c,
            Err(why) => return (CommandOutcome::Failed, why),
        };
        if current.agent.profile == profile {
            return (
                CommandOutcome::Succeeded,
                format!("profile `{profile}` already runs"),
            );
        }
        let wanted = profile.to_owned();
        let saved = self
            .blocking_config(&current, move |config| {
                let file = crate::profile::file_profile(config);
                crate::profile::save(config, &wanted, &file)
            })
            .await;
        if let Err(e) = saved {
            return (
                CommandOutcome::Failed,
                format!("cannot record the profile switch: {e}"),
            );
        }
        match self.agent.reload_with(Some(new)).await {
            Ok(changed) => (
                CommandOutcome::Succeeded,
                format!(
                    "switched from profile `{}` to `{profile}`; changed: {}",
                    current.agent.profile,
                    if changed.is_empty() {
                        "none".to_owned()
                    } else {
                        changed.join(", ")
                    }
                ),
            ),
            Err(e) => (CommandOutcome::Failed, e.to_string()),
        }
    }

    async fn blocking_config(
        &self,
        config: &Arc<Config>,
        f: impl FnOnce(&Config) -> std::io::Result<()> + Send + 'static,
    ) -> std::io::Result<()> {
        let config = Arc::clone(config);
        tokio::task::spawn_blocking(move || f(&config))
            .await
            .map_err(std::io::Error::other)?
    }

    /// A host event about GPU `index` on the agent's bus (spooled and sent).
    fn emit_event(&self, index: u32, code: &str, message: String) {
        self.agent.emit(Event {
            ts_ms: now_ms(),
            severity: razar_shared::domain::Severity::Warning,
            subject: razar_shared::protocol::Subject::Gpu(index),
            kind: EventKind::Other { code: code.into() },
            message,
        });
    }

    async fn roll_back(&self, component: &str, revision: &str) -> (CommandOutcome, String) {
        // The history first holds what runs now.
        self.record_revisions().await;
        let current = self.agent.view().config();
        let (name, wanted) = (component.to_owned(), revision.to_owned());
        let planned = self
            .blocking(move |s| revisions::roll_back(s, &current, &name, &wanted))
            .await;
        let (config, summary) = match planned {
            Some(Ok(planned)) => planned,
            Some(Err(error)) => return (CommandOutcome::Failed, error.to_string()),
            None => return (CommandOutcome::Failed, "rollback task failed".into()),
        };
        match self.agent.reload_with(Some(config)).await {
            Ok(_) => (CommandOutcome::Succeeded, format!("rolled back {summary}")),
            Err(error) => (CommandOutcome::Failed, error.to_string()),
        }
    }

    /// Pins `component` to the pushed revision, applies it (the component restarts on
    /// it) and waits, up to `options.start_wait`, until it has started on it.
    async fn deploy(&self, component: &str, spec: &RevisionSpec) -> (CommandOutcome, String) {
        // The history first holds what runs now: a rollback returns to it.
        self.record_revisions().await;
        let current = self.agent.view().config();
        let (name, spec) = (component.to_owned(), spec.clone());
        let planned = self
            .blocking(move |_| revisions::deploy(&current, &name, &spec))
            .await;
        let (config, summary) = match planned {
            Some(Ok(planned)) => planned,
            Some(Err(error)) => return (CommandOutcome::Failed, error.to_string()),
            None => return (CommandOutcome::Failed, "deployment task failed".into()),
        };
        let to = config
            .component(component)
            .map(|c| c.revision.clone())
            .unwrap_or_default();
        if let Err(error) = self.agent.reload_with(Some(config)).await {
            return (CommandOutcome::Failed, error.to_string());
        }
        self.record_revisions().await;
        let mut statuses = self.agent.watch_statuses();
        let started = tokio::time::timeout(self.options.start_wait, async {
            loop {
                let state = statuses
                    .borrow_and_update()
                    .get(component)
                    .filter(|s| s.revision == to)
                    .map(|s| s.state);
                if let Some(state) = state.filter(|s| started_state(*s)) {
                    return Ok(state);
                }
                if statuses.changed().await.is_err() {
                    return Err(());
                }
            }
        })
        .await;
        match started {
            Ok(Ok(state)) => (
                CommandOutcome::Succeeded,
                format!("deployed {summary} ({})", state.as_str()),
            ),
            Ok(Err(())) => (
                CommandOutcome::Failed,
                format!("deployed {summary}, but the agent is stopping"),
            ),
            Err(_) => {
                let now = self
                    .agent
                    .statuses()
                    .get(component)
                    .map(|s| format!("{}: {}", s.state.as_str(), s.reason))
                    .unwrap_or_default();
                (
                    CommandOutcome::Succeeded,
                    format!(
                        "deployed {summary}; not started within {}s ({now})",
                        self.options.start_wait.as_secs()
                    ),
                )
            }
        }
    }

    async fn tail(
        &self,
        id: CommandId,
        component: &str,
        lines: u32,
        follow: bool,
    ) -> (CommandOutcome, String) {
        let limit = usize::try_from(lines.min(MAX_TAIL_LINES)).unwrap_or(0);
        let tail = match self.agent.logs().tail(component, limit).await {
            Ok(t) => t,
            Err(error) => return (CommandOutcome::Failed, error.to_string()),
        };
        // Subscribe before sending the tail, so no line falls between the two.
        let follower = if follow {
            match self.agent.logs().follow(component) {
                Ok(rx) => Some(rx),
                Err(error) => return (CommandOutcome::Failed, error.to_string()),
            }
        } else {
            None
        };
        let mut chunks: Vec<LogChunk> = Vec::new();
        for line in tail {
            match chunks.last_mut() {
                Some(chunk) if chunk.stream == line.stream => chunk.lines.push(line.text),
                _ => chunks.push(LogChunk {
                    command: id,
                    component: component.to_owned(),
                    stream: line.stream,
                    lines: vec![line.text],
                    end: false,
                }),
            }
        }
        if let (Some(last), false) = (chunks.last_mut(), follow) {
            last.end = true;
        }
        for chunk in chunks {
            self.emit(Outbound::LogChunk(chunk));
        }
        let Some(mut rx) = follower else {
            return (CommandOutcome::Succeeded, format!("tail of {component}"));
        };
        let (cancel, mut cancelled) = oneshot::channel();
        self.follows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, cancel);
        let outbox = Arc::clone(&self.outbox);
        let stats = Arc::clone(&self.stats);
        let follows = Arc::clone(&self.follows);
        let name = component.to_owned();
        let limit = self.options.follow_limit;
        tokio::spawn(async move {
            let component = name;
            let deadline = tokio::time::sleep(limit);
            tokio::pin!(deadline);
            let why = loop {
                tokio::select! {
                    line = rx.recv() => match line {
                        Ok(line) => {
                            let chunk = LogChunk {
                                command: id,
                                component: component.clone(),
                                stream: line.stream,
                                lines: vec![line.text],
                                end: false,
                            };
                            if !outbox.send(Outbound::LogChunk(chunk)) {
                                stats.outbound_dropped.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            stats.outbound_dropped.fetch_add(n, Ordering::Relaxed);
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                            break "the component's log closed";
                        }
                    },
                    _ = &mut deadline => break "the follow reached its deadline",
                    _ = &mut cancelled => break "cancelled",
                }
            };
            follows
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
            tracing::debug!(component, why, "log follow ended");
            let last = LogChunk {
                command: id,
                component,
                stream: razar_shared::domain::LogStream::Stdout,
                lines: Vec::new(),
                end: true,
            };
            if !outbox.send(Outbound::LogChunk(last)) {
                stats.outbound_dropped.fetch_add(1, Ordering::Relaxed);
            }
        });
        (
            CommandOutcome::Succeeded,
            format!("following {component} (up to {}s)", limit.as_secs()),
        )
    }
}

/// The GPU `text` (index or UUID) names among `gpus`.
pub fn resolve_gpu<'g>(gpus: &'g [GpuInfo], text: &str) -> Result<&'g GpuInfo, String> {
    let known = || {
        if gpus.is_empty() {
            "this host has no GPU".to_owned()
        } else {
            let list: Vec<String> = gpus
                .iter()
                .map(|g| format!("{} ({})", g.index, g.uuid))
                .collect();
            format!("GPUs here: {}", list.join(", "))
        }
    };
    let Some(wanted) = GpuRef::parse(text) else {
        return Err(format!("`{text}` is not a GPU index or UUID; {}", known()));
    };
    gpus.iter()
        .find(|g| wanted.matches(g.index, &g.uuid))
        .ok_or_else(|| format!("no GPU `{text}` on this host; {}", known()))
}

/// The reset argv with `{index}` and `{uuid}` replaced by `gpu`'s (in every argument).
pub fn reset_argv(argv: &Argv, gpu: &GpuInfo) -> Vec<String> {
    std::iter::once(&argv.program)
        .chain(&argv.args)
        .map(|a| {
            a.replace("{index}", &gpu.index.to_string())
                .replace("{uuid}", &gpu.uuid)
        })
        .collect()
}

/// Runs the reset command (no shell), killed after `timeout`; `Ok` iff it exits 0.
async fn run_reset(argv: &[String], timeout: Duration) -> Result<(), String> {
    let Some((program, args)) = argv.split_first() else {
        return Err("is empty".into());
    };
    // Its own process group, so a timeout kills whatever it started too.
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("could not start: {e}"))?;
    let group = child.id().and_then(|pid| i32::try_from(pid).ok());
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Err(_) => {
            if let Some(group) = group {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(group),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            Err(format!(
                "timed out after {}s and was killed",
                timeout.as_secs()
            ))
        }
        Ok(Err(e)) => Err(format!("failed: {e}")),
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: String = stderr
                .trim()
                .chars()
                .rev()
                .take(300)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            Err(format!(
                "exited with {}{}",
                out.status,
                if tail.is_empty() {
                    String::new()
                } else {
                    format!(": {tail}")
                }
            ))
        }
    }
}

/// The component runs (or ran) a process of its current spec: started, whatever its
/// readiness (the collector watches that).
fn started_state(state: ComponentState) -> bool {
    matches!(
        state,
        ComponentState::Starting
            | ComponentState::Ready
            | ComponentState::Unhealthy
            | ComponentState::Backoff
            | ComponentState::Quarantined
    )
}
