//! The supervisor's driver: owns one task per component, starts them in dependency
//! order, forwards commands, reloads the config, and stops everything in reverse order.
//! [`Agent`] is the library entry point (the binary and the collector's dev mode use it).

use super::component::{
    component_event, publish, ComponentStatus, ComponentTask, Shared, ToComponent,
};
use super::machine::{Control, Input};
use super::plan;
use super::state_store::{GpuDrain, StateStore};
use crate::config::{ComponentName, ComponentSpec, Config, ConfigErrors};
use crate::logs::Logs;
use crate::metrics::Metrics;
use crate::resources::{Sampler, Usage};
use razar_shared::domain::{ComponentState, Severity};
use razar_shared::protocol::{Event, EventKind, Subject};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// Agent version, shown by `/health` and in metrics.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Why the agent could not start or act.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The durable store could not be opened.
    #[error("cannot open the state store: {0}")]
    Store(String),
    /// The durable store refused a write.
    #[error("cannot write the state store: {0}")]
    StoreWrite(String),
    /// Log capture could not start.
    #[error("cannot start log capture: {0}")]
    Logs(#[from] crate::logs::LogError),
    /// The local endpoint could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The control socket could not be bound.
    #[error("cannot listen on the control socket {}: {source}", path.display())]
    ControlSocket {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The supervisor task has ended.
    #[error("the agent is shutting down")]
    Gone,
    /// No such component on this host.
    #[error("no component `{0}` on this host")]
    UnknownComponent(String),
    /// The component refused the command.
    #[error("{0}")]
    Refused(String),
    /// The new configuration is invalid; the running one is kept.
    #[error("new configuration refused:\n{0}")]
    Config(ConfigErrors),
}

/// How to run an agent besides its config.
pub struct AgentOptions {
    /// Durable state; `None`: the redb store under the config's `data_dir`.
    pub store: Option<Arc<dyn StateStore>>,
    /// Serve `/health`, `/metrics` and the control API (on the config's `listen`).
    pub serve_http: bool,
    /// Override the listen address (e.g. port 0 in tests).
    pub listen: Option<SocketAddr>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            store: None,
            serve_http: true,
            listen: None,
        }
    }
}

enum Request {
    Command {
        component: String,
        control: Control,
        reply: oneshot::Sender<Result<(), AgentError>>,
    },
    Reload {
        config: Option<Box<Config>>,
        reply: oneshot::Sender<Result<Vec<String>, AgentError>>,
    },
    Vram {
        component: String,
        used_bytes: u64,
    },
    Memory {
        component: String,
        used_bytes: u64,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
    Drain {
        gpu: u32,
        drain: Option<GpuDrain>,
        reply: oneshot::Sender<Result<Vec<String>, AgentError>>,
    },
}

/// Read-only view of a running agent, shared with the HTTP endpoints.
pub struct AgentView {
    pub(crate) config: RwLock<Arc<Config>>,
    pub(crate) statuses: watch::Receiver<BTreeMap<String, ComponentStatus>>,
    pub(crate) events: broadcast::Sender<Event>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) started: Instant,
    pub(crate) logs: Logs,
    pub(crate) usage: watch::Sender<BTreeMap<String, Usage>>,
    /// Each component's process tree (leader and descendants) at the latest sample.
    pub(crate) trees: watch::Sender<BTreeMap<String, BTreeSet<u32>>>,
    /// The collector link as shown by `/health` (set by the uplink).
    pub(crate) link: watch::Sender<String>,
    /// Why GPU telemetry is off, as shown by `/health` (set by the daemon).
    pub(crate) gpu: watch::Sender<Option<String>>,
    /// Why GPU events can be lost now (`/health` is degraded meanwhile).
    pub(crate) gpu_degraded: watch::Sender<Option<String>>,
    /// Drained GPUs by index, as `/health` shows them (set by the supervisor).
    pub(crate) drained: watch::Sender<BTreeMap<u32, GpuDrain>>,
    /// Becomes true once the supervisor has stopped everything.
    pub(crate) stopped: watch::Sender<bool>,
    /// A receiver made with the channel, before any component ran: it holds the events
    /// of the start itself (first transitions, adoptions) for the one who spools them.
    pub(crate) startup_events: std::sync::Mutex<Option<broadcast::Receiver<Event>>>,
}

impl AgentView {
    /// Resolves once the agent has shut down.
    pub async fn stopped(&self) {
        let mut rx = self.stopped.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }
}

impl AgentView {
    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        match self.config.read() {
            Ok(c) => Arc::clone(&c),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Every component's status, by name.
    pub fn statuses(&self) -> BTreeMap<String, ComponentStatus> {
        self.statuses.borrow().clone()
    }

    /// The GPUs drained on this host, by index.
    pub fn drained_gpus(&self) -> BTreeMap<u32, GpuDrain> {
        self.drained.borrow().clone()
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

/// A running agent. Cheap to clone; dropping it does not stop the agent: call [`Agent::shutdown`].
#[derive(Clone)]
pub struct Agent {
    requests: mpsc::Sender<Request>,
    view: Arc<AgentView>,
    local_addr: Option<SocketAddr>,
    control_socket: Option<std::path::PathBuf>,
    done: Arc<tokio::sync::Mutex<Option<JoinHandle<()>>>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("local_addr", &self.local_addr)
            .finish()
    }
}

impl Agent {
    /// Starts supervising `config`'s components (must be called inside a tokio runtime).
    pub async fn start(config: Config, options: AgentOptions) -> Result<Agent, AgentError> {
        let store: Arc<dyn StateStore> = match options.store {
            Some(store) => store,
            None => Arc::new(
                crate::store::Store::open(&config.agent.data_dir)
                    .map_err(|e| AgentError::Store(e.to_string()))?,
            ),
        };
        let logs = Logs::start()?;
        let metrics = Arc::new(Metrics::new(VERSION)?);
        let (events, startup_events) = broadcast::channel(4096);
        let (status_tx, status_rx) = watch::channel(BTreeMap::new());
        let shared = Arc::new(Shared {
            logs: logs.clone(),
            store,
            events: events.clone(),
            statuses: status_tx,
            metrics: Arc::clone(&metrics),
            stdio_dir: Some(config.agent.data_dir.join(crate::process::STDIO_DIR)),
        });
        let view = Arc::new(AgentView {
            config: RwLock::new(Arc::new(config.clone())),
            statuses: status_rx,
            events,
            metrics,
            started: Instant::now(),
            logs,
            usage: watch::channel(BTreeMap::new()).0,
            trees: watch::channel(BTreeMap::new()).0,
            stopped: watch::channel(false).0,
            drained: watch::channel(BTreeMap::new()).0,
            link: watch::channel("disconnected".to_owned()).0,
            gpu: watch::channel(None).0,
            gpu_degraded: watch::channel(None).0,
            startup_events: std::sync::Mutex::new(Some(startup_events)),
        });

        let local_addr = if options.serve_http {
            let addr = options.listen.unwrap_or(config.agent.listen);
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| AgentError::Listen { addr, source })?;
            let bound = listener
                .local_addr()
                .map_err(|source| AgentError::Listen { addr, source })?;
            let path = config.agent.control_socket.clone();
            let control = crate::local_api::bind_control_socket(
                &path,
                config.agent.control_group.as_ref().map(|g| g.1),
            )
            .map_err(|source| AgentError::ControlSocket {
                path: path.clone(),
                source,
            })?;
            Some((bound, listener, (path, control)))
        } else {
            None
        };

        let (requests, rx) = mpsc::channel(64);
        let agent_requests = requests.clone();
        let supervisor = Supervisor {
            shared: Arc::clone(&shared),
            view: Arc::clone(&view),
            config: Arc::new(config),
            tasks: BTreeMap::new(),
            removing: BTreeSet::new(),
            vram_over: BTreeMap::new(),
            memory_over: BTreeMap::new(),
            waiting: BTreeMap::new(),
            drained: BTreeMap::new(),
        };
        let done = tokio::spawn(supervisor.run(rx));
        tokio::spawn(sample(Arc::clone(&view), requests.downgrade()));
        let mut agent = Agent {
            requests: agent_requests,
            view,
            local_addr: None,
            control_socket: None,
            done: Arc::new(tokio::sync::Mutex::new(Some(done))),
        };
        if let Some((bound, listener, control)) = local_addr {
            agent.local_addr = Some(bound);
            let router = crate::local_api::read_only_router(agent.clone());
            let view = Arc::clone(&agent.view);
            tokio::spawn(async move {
                let stopped = async move { view.stopped().await };
                if let Err(error) = axum::serve(listener, router)
                    .with_graceful_shutdown(stopped)
                    .await
                {
                    tracing::error!(%error, "local endpoint stopped");
                }
            });
            let (path, listener) = control;
            agent.control_socket = Some(path.clone());
            let router = crate::local_api::control_router(agent.clone());
            let view = Arc::clone(&agent.view);
            tokio::spawn(async move {
                let stopped = async move { view.stopped().await };
                if let Err(error) = axum::serve(listener, router)
                    .with_graceful_shutdown(stopped)
                    .await
                {
                    tracing::error!(%error, "control socket stopped");
                }
                let _ = std::fs::remove_file(&path);
            });
        }
        Ok(agent)
    }

    /// Where the read-only `/health` and `/metrics` listen.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// The control API's unix socket (every route, control included).
    pub fn control_socket(&self) -> Option<&std::path::Path> {
        self.control_socket.as_deref()
    }

    pub fn view(&self) -> &Arc<AgentView> {
        &self.view
    }

    /// Every component's status, by name.
    pub fn statuses(&self) -> BTreeMap<String, ComponentStatus> {
        self.view.statuses()
    }

    /// Watch every component's status (for the uplink's heartbeat digest).
    pub fn watch_statuses(&self) -> watch::Receiver<BTreeMap<String, ComponentStatus>> {
        self.view.statuses.clone()
    }

    /// Every event from now on: transitions, exits, pulses, reloads, budgets (for the uplink).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.view.events.subscribe()
    }

    /// Every event since the agent started, the start's own included (transitions out of
    /// `pending`, adoptions): for the telemetry loop, which spools them. The first caller
    /// gets the receiver made with the channel; later callers get [`Agent::subscribe`].
    pub fn subscribe_from_start(&self) -> broadcast::Receiver<Event> {
        let taken = match self.view.startup_events.lock() {
            Ok(mut slot) => slot.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        taken.unwrap_or_else(|| self.view.events.subscribe())
    }

    /// Publishes an event from outside the supervisor (GPU sampler, uplink).
    pub fn emit(&self, event: Event) {
        self.view.metrics.event(&event);
        let _ = self.view.events.send(event);
    }

    /// Component pids (tree leaders), for mapping GPU processes and resources to components.
    pub fn pids(&self) -> BTreeMap<String, u32> {
        self.statuses()
            .into_iter()
            .filter_map(|(name, s)| s.pid.map(|p| (name, p)))
            .collect()
    }

    /// The latest resource sample per component (by name) and per watch (`watch:<name>`).
    pub fn usage(&self) -> BTreeMap<String, Usage> {
        self.view.usage.borrow().clone()
    }

    /// Each component's process tree (pids of the leader and its descendants) as of the
    /// latest resource sample; a component started since then is missing.
    pub fn trees(&self) -> BTreeMap<String, BTreeSet<u32>> {
        self.view.trees.borrow().clone()
    }

    /// Uplink hook: the collector link's state for `/health` (e.g. `connected`,
    /// `disconnected`, `connecting`); `disconnected` until set.
    pub fn set_collector_link(&self, status: &str) {
        self.view.link.send_replace(status.to_owned());
    }

    /// Daemon hook: why GPU telemetry is off, for `/health`'s `gpu` field; `None` (the
    /// default) while GPUs are sampled.
    pub fn set_gpu_status(&self, status: Option<&str>) {
        self.view.gpu.send_replace(status.map(str::to_owned));
    }

    /// Telemetry hook: why GPU events can be lost now (`None`: they cannot). `/health`
    /// is `degraded` with this reason meanwhile.
    pub fn set_gpu_degraded(&self, reason: Option<&str>) {
        self.view.metrics.gpu_events_degraded(reason.is_some());
        self.view
            .gpu_degraded
            .send_replace(reason.map(str::to_owned));
    }

    /// Log capture, for the uplink's log tails.
    pub fn logs(&self) -> &Logs {
        &self.view.logs
    }

    /// Sends an operator command to `component`.
    pub async fn command(&self, component: &str, control: Control) -> Result<(), AgentError> {
        let (reply, rx) = oneshot::channel();
        self.requests
            .send(Request::Command {
                component: component.to_owned(),
                control,
                reply,
            })
            .await
            .map_err(|_| AgentError::Gone)?;
        rx.await.map_err(|_| AgentError::Gone)?
    }

    /// Drains GPU `gpu` (`Some`) or lifts its drain (`None`), durably. A drained GPU's
    /// components (those whose `gpus` list it) are stopped and kept from starting;
    /// lifting starts again those it held stopped and no other drain holds. Returns the
    /// components mapped to the GPU.
    pub async fn set_gpu_drain(
        &self,
        gpu: u32,
        drain: Option<GpuDrain>,
    ) -> Result<Vec<String>, AgentError> {
        let (reply, rx) = oneshot::channel();
        self.requests
            .send(Request::Drain { gpu, drain, reply })
            .await
            .map_err(|_| AgentError::Gone)?;
        rx.await.map_err(|_| AgentError::Gone)?
    }

    /// Re-reads the config file and applies it; returns the components that changed.
    pub async fn reload(&self) -> Result<Vec<String>, AgentError> {
        self.reload_with(None).await
    }

    /// Applies `config` (already validated) instead of re-reading the file.
    pub async fn reload_with(&self, config: Option<Config>) -> Result<Vec<String>, AgentError> {
        let (reply, rx) = oneshot::channel();
        self.requests
            .send(Request::Reload {
                config: config.map(Box::new),
                reply,
            })
            .await
            .map_err(|_| AgentError::Gone)?;
        rx.await.map_err(|_| AgentError::Gone)?
    }

    /// GPU sampler hook: `component` uses `used_bytes` of VRAM now. Over its budget this
    /// emits `VramBudgetExceeded` (once per crossing; a new process over budget is a new
    /// crossing) and, with `vram_policy = "restart"`, restarts it.
    pub async fn report_vram(&self, component: &str, used_bytes: u64) {
        let _ = self
            .requests
            .send(Request::Vram {
                component: component.to_owned(),
                used_bytes,
            })
            .await;
    }

    /// Stops every component in reverse dependency order within their grace periods,
    /// then ends the supervisor. Idempotent.
    pub async fn shutdown(&self) {
        let (reply, rx) = oneshot::channel();
        if self
            .requests
            .send(Request::Shutdown { reply })
            .await
            .is_ok()
        {
            let _ = rx.await;
        }
        if let Some(handle) = self.done.lock().await.take() {
            let _ = handle.await;
        }
    }
}

struct Supervisor {
    shared: Arc<Shared>,
    view: Arc<AgentView>,
    config: Arc<Config>,
    tasks: BTreeMap<String, mpsc::Sender<ToComponent>>,
    removing: BTreeSet<String>,
    /// Components over their VRAM budget, with the process that crossed it: a new
    /// process (after a restart) over budget is a new crossing.
    vram_over: BTreeMap<String, Option<u32>>,
    /// Like `vram_over`: per process, so a new process over budget is a new breach.
    memory_over: BTreeMap<String, Option<u32>>,
    /// What each pending component was last told it waits for.
    waiting: BTreeMap<String, String>,
    /// Drained GPUs by index (durable in the store).
    drained: BTreeMap<u32, GpuDrain>,
}

fn host_event(severity: Severity, kind: EventKind, message: String) -> Event {
    Event {
        ts_ms: super::component::unix_ms(),
        severity,
        subject: Subject::Host,
        kind,
        message,
    }
}

impl Supervisor {
    fn active(&self) -> Vec<&ComponentSpec> {
        self.config.active_components().collect()
    }

    /// Why `spec` is held stopped: the first drained GPU it is mapped to.
    fn held(&self, spec: &ComponentSpec) -> Option<String> {
        spec.gpus.iter().find_map(|index| {
            self.drained.get(index).map(|d| {
                if d.note.is_empty() {
                    format!("held: GPU {index} is drained")
                } else {
                    format!("held: GPU {index} is drained ({})", d.note)
                }
            })
        })
    }

    /// Drains or lifts GPU `gpu`; see [`Agent::set_gpu_drain`].
    async fn drain(
        &mut self,
        gpu: u32,
        drain: Option<GpuDrain>,
    ) -> Result<Vec<String>, AgentError> {
        let mut drained = self.drained.clone();
        let lifted = match drain {
            Some(d) => {
                drained.insert(gpu, d);
                false
            }
            None => drained.remove(&gpu).is_some(),
        };
        self.shared
            .store
            .set_drained_gpus(&drained)
            .map_err(AgentError::StoreWrite)?;
        let before: BTreeSet<String> = self
            .active()
            .into_iter()
            .filter(|s| self.held(s).is_some())
            .map(|s| s.name.to_string())
            .collect();
        self.drained = drained;
        self.view.drained.send_replace(self.drained.clone());
        let mapped: Vec<String> = self
            .active()
            .into_iter()
            .filter(|s| s.gpus.contains(&gpu))
            .map(|s| s.name.to_string())
            .collect();
        if lifted {
            // What the drain held stopped starts again (unless another drain holds it).
            let statuses = self.shared.statuses.borrow().clone();
            let freed: Vec<String> = self
                .active()
                .into_iter()
                .filter(|s| self.held(s).is_none() && before.contains(s.name.as_str()))
                .map(|s| s.name.to_string())
                .collect();
            for name in freed {
                let stopped = statuses
                    .get(&name)
                    .is_some_and(|s| s.state == ComponentState::Stopped);
                if let (true, Some(tx)) = (stopped, self.tasks.get(&name)) {
                    let (reply, _) = oneshot::channel();
                    let _ = tx.send(ToComponent::Command(Control::Start, reply)).await;
                }
            }
        }
        Ok(mapped)
    }

    fn states(&self) -> BTreeMap<ComponentName, ComponentState> {
        self.shared
            .statuses
            .borrow()
            .iter()
            .filter_map(|(n, s)| ComponentName::parse(n).ok().map(|n| (n, s.state)))
            .collect()
    }

    fn launch(
        &mut self,
        spec: ComponentSpec,
        quarantines: &BTreeMap<String, String>,
        previous: &BTreeMap<String, (crate::process::ProcessId, String)>,
    ) {
        let name = spec.name.to_string();
        let (tx, rx) = mpsc::channel(32);
        let task = ComponentTask::new(spec, rx, Arc::clone(&self.shared));
        tokio::spawn(task.run(
            quarantines.get(&name).cloned(),
            previous.get(&name).cloned(),
        ));
        self.waiting.remove(&name);
        self.tasks.insert(name, tx);
    }

    async fn run(mut self, mut requests: mpsc::Receiver<Request>) {
        let store = Arc::clone(&self.shared.store);
        let quarantines = store.quarantines().unwrap_or_else(|error| {
            tracing::error!(%error, "cannot read quarantines");
            BTreeMap::new()
        });
        let previous = store.processes().unwrap_or_default();
        self.drained = store.drained_gpus().unwrap_or_else(|error| {
            tracing::error!(%error, "cannot read drained GPUs");
            BTreeMap::new()
        });
        self.view.drained.send_replace(self.drained.clone());
        // Processes of components no longer configured here: stop them.
        let active: BTreeSet<String> = self.active().iter().map(|s| s.name.to_string()).collect();
        for (name, (id, _)) in &previous {
            if active.contains(name) {
                continue;
            }
            if let Some(adopted) = crate::process::adopt(*id) {
                publish(
                    &self.shared,
                    component_event(name, Severity::Info, EventKind::ProcessAdopted { pid: id.pid, adopted: false }, format!("pid {} left from a previous run of a component no longer configured: stopped", id.pid)),
                );
                let _ = adopted
                    .stop(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(10))
                    .await;
            }
            let _ = store.clear_process(name);
        }
        // Their named pipes (and any left by a start cut short) go too.
        if let Some(dir) = &self.shared.stdio_dir {
            match crate::process::sweep_fifos(dir, &active) {
                Ok(swept) if !swept.is_empty() => {
                    tracing::info!(
                        ?swept,
                        "removed the output pipes of components no longer configured"
                    );
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "cannot sweep output pipes"),
            }
        }
        let specs: Vec<ComponentSpec> = self.active().into_iter().cloned().collect();
        self.shared.metrics.components.set(specs.len() as i64);
        for spec in specs {
            self.launch(spec, &quarantines, &previous);
        }
        let mut statuses = self.view.statuses.clone();
        let mut shutdown: Option<oneshot::Sender<()>> = None;
        loop {
            tokio::select! {
                request = requests.recv() => match request {
                    None => break,
                    Some(Request::Shutdown { reply }) => {
                        shutdown = Some(reply);
                        break;
                    }
                    Some(Request::Command { component, control, reply }) => {
                        let _ = reply.send(self.command(&component, control).await);
                    }
                    Some(Request::Reload { config, reply }) => {
                        let _ = reply.send(self.reload(config.map(|c| *c)).await);
                    }
                    Some(Request::Drain { gpu, drain, reply }) => {
                        let _ = reply.send(self.drain(gpu, drain).await);
                    }
                    Some(Request::Vram { component, used_bytes }) => self.vram(&component, used_bytes).await,
                    Some(Request::Memory { component, used_bytes }) => self.memory(&component, used_bytes).await,
                },
                changed = statuses.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
            }
            self.view
                .metrics
                .uptime
                .set(self.view.started.elapsed().as_secs_f64());
            self.plan().await;
        }
        self.stop_all(&mut statuses).await;
        self.view.stopped.send_replace(true);
        if let Some(reply) = shutdown {
            let _ = reply.send(());
        }
    }

    /// Starts what may start, tells the pending what they wait for; ends tasks of
    /// removed components once they are down.
    async fn plan(&mut self) {
        let states = self.states();
        let active = self.active();
        let held: BTreeMap<String, String> = active
            .iter()
            .filter_map(|s| self.held(s).map(|why| (s.name.to_string(), why)))
            .collect();
        for name in plan::startable(&active, &states) {
            if held.contains_key(name.as_str()) {
                continue;
            }
            if let Some(tx) = self.tasks.get(name.as_str()) {
                let _ = tx.try_send(ToComponent::Input(Input::DependenciesReady));
            }
        }
        // A component of a drained GPU is kept stopped, whatever brought it up.
        for name in held.keys() {
            let state = states
                .iter()
                .find(|(k, _)| k.as_str() == name.as_str())
                .map(|(_, s)| *s);
            let parked = matches!(
                state,
                None | Some(
                    ComponentState::Stopped
                        | ComponentState::Stopping
                        | ComponentState::Quarantined
                )
            );
            if let (false, Some(tx)) = (parked, self.tasks.get(name.as_str())) {
                let (reply, _) = oneshot::channel();
                let _ = tx.try_send(ToComponent::Command(Control::Stop, reply));
            }
        }
        let waits = plan::waiting(&active, &states);
        let statuses = self.shared.statuses.borrow().clone();
        let names: Vec<String> = self.tasks.keys().cloned().collect();
        for name in names {
            let text = held.get(&name).cloned().or_else(|| {
                ComponentName::parse(&name)
                    .ok()
                    .and_then(|n| waits.get(&n))
                    .map(|w| describe_wait(w, &statuses))
            });
            if self.waiting.get(&name) == text.as_ref() {
                continue;
            }
            let Some(tx) = self.tasks.get(&name) else {
                continue;
            };
            if tx.try_send(ToComponent::Waiting(text.clone())).is_ok() {
                match text {
                    Some(t) => self.waiting.insert(name, t),
                    None => self.waiting.remove(&name),
                };
            }
        }
        let done: Vec<String> = self
            .removing
            .iter()
            .filter(|n| {
                states
                    .iter()
                    .find(|(k, _)| k.as_str() == n.as_str())
                    .is_none_or(|(_, s)| plan::is_down(*s))
            })
            .cloned()
            .collect();
        for name in done {
            self.removing.remove(&name);
            if let Some(tx) = self.tasks.remove(&name) {
                let _ = tx.send(ToComponent::Exit).await;
            }
        }
    }

    async fn command(&mut self, component: &str, control: Control) -> Result<(), AgentError> {
        if matches!(control, Control::Start | Control::Restart) {
            if let Some(why) = self.config.component(component).and_then(|s| self.held(s)) {
                return Err(AgentError::Refused(format!(
                    "{why}: lift the drain (set the GPU healthy) first"
                )));
            }
        }
        let tx = self
            .tasks
            .get(component)
            .filter(|_| !self.removing.contains(component))
            .ok_or_else(|| AgentError::UnknownComponent(component.to_owned()))?;
        let (reply, rx) = oneshot::channel();
        tx.send(ToComponent::Command(control, reply))
            .await
            .map_err(|_| AgentError::Gone)?;
        rx.await
            .map_err(|_| AgentError::Gone)?
            .map_err(AgentError::Refused)
    }

    async fn vram(&mut self, component: &str, used_bytes: u64) {
        let Some(budget) = self
            .config
            .component(component)
            .and_then(|c| c.vram_budget_bytes)
        else {
            return;
        };
        if used_bytes <= budget.get() {
            self.vram_over.remove(component);
            return;
        }
        let pid = self.pid_of(component);
        if self.vram_over.insert(component.to_owned(), pid) == Some(pid) {
            return;
        }
        if let Some(tx) = self.tasks.get(component) {
            let _ = tx
                .send(ToComponent::Input(Input::VramExceeded {
                    used_bytes,
                    budget_bytes: budget.get(),
                }))
                .await;
        }
    }

    /// The component's current pid, to tell a new process's breach from an old one's.
    fn pid_of(&self, component: &str) -> Option<u32> {
        self.view
            .statuses
            .borrow()
            .get(component)
            .and_then(|s| s.pid)
    }

    async fn memory(&mut self, component: &str, used_bytes: u64) {
        let Some(budget) = self
            .config
            .component(component)
            .and_then(|c| c.memory_budget_bytes)
        else {
            return;
        };
        if used_bytes <= budget.get() {
            self.memory_over.remove(component);
            return;
        }
        let pid = self.pid_of(component);
        if self.memory_over.insert(component.to_owned(), pid) == Some(pid) {
            return;
        }
        if let Some(tx) = self.tasks.get(component) {
            let _ = tx
                .send(ToComponent::Input(Input::MemoryExceeded {
                    used_bytes,
                    budget_bytes: budget.get(),
                }))
                .await;
        }
    }

    async fn reload(&mut self, given: Option<Config>) -> Result<Vec<String>, AgentError> {
        let new = match given {
            Some(c) => Ok(c),
            None => crate::profile::load_effective(&self.config.path).map(|(config, notes)| {
                for note in notes {
                    tracing::info!(%note, "rollback pins");
                }
                config
            }),
        };
        let new = match new {
            Ok(c) => c,
            Err(errors) => {
                self.view
                    .metrics
                    .reloads
                    .with_label_values(&["refused"])
                    .inc();
                publish(
                    &self.shared,
                    host_event(
                        Severity::Warning,
                        EventKind::Other {
                            code: "config_reload_refused".into(),
                        },
                        format!("new configuration refused, running one kept:\n{errors}"),
                    ),
                );
                return Err(AgentError::Config(errors));
            }
        };
        let (now_applied, at_restart) = agent_changes(&self.config.agent, &new.agent);
        for change in &now_applied {
            tracing::info!("[agent] {change}: in effect now");
        }
        if !at_restart.is_empty() {
            tracing::warn!(
                "[agent] {} changed; takes effect at the next agent restart",
                at_restart.join(", ")
            );
        }
        let old: BTreeMap<String, ComponentSpec> = self
            .active()
            .into_iter()
            .map(|s| (s.name.to_string(), s.clone()))
            .collect();
        let new_active: Vec<ComponentSpec> = new.active_components().cloned().collect();
        let new_refs: Vec<&ComponentSpec> = new_active.iter().collect();
        let order = plan::start_order(&new_refs);
        let mut changed = Vec::new();
        let quarantines = self.shared.store.quarantines().unwrap_or_default();
        let nothing = BTreeMap::new();
        // Removed: stop, then end their tasks once down.
        for name in old.keys() {
            if !new_active.iter().any(|s| s.name.as_str() == name) {
                changed.push(name.clone());
                if let Some(tx) = self.tasks.get(name) {
                    let (reply, rx) = oneshot::channel();
                    if tx
                        .send(ToComponent::Command(Control::Stop, reply))
                        .await
                        .is_ok()
                    {
                        let _ = rx.await;
                    }
                }
                self.removing.insert(name.clone());
            }
        }
        *self
            .view
            .config
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(new.clone());
        self.config = Arc::new(new);
        // Changed: hand over the new spec in dependency order; added: launch.
        for name in order {
            let Some(spec) = new_active.iter().find(|s| s.name == name) else {
                continue;
            };
            match old.get(name.as_str()) {
                Some(previous) if previous == spec => {}
                Some(_) => {
                    changed.push(name.to_string());
                    if let Some(tx) = self.tasks.get(name.as_str()) {
                        let (reply, rx) = oneshot::channel();
                        if tx
                            .send(ToComponent::Reload(Box::new(spec.clone()), reply))
                            .await
                            .is_ok()
                        {
                            let _ = rx.await;
                        }
                    }
                }
                None => {
                    changed.push(name.to_string());
                    self.launch(spec.clone(), &quarantines, &nothing);
                }
            }
        }
        self.shared.metrics.components.set(new_active.len() as i64);
        self.view
            .metrics
            .reloads
            .with_label_values(&["applied"])
            .inc();
        publish(
            &self.shared,
            host_event(
                Severity::Info,
                EventKind::ConfigReloaded {
                    changed: changed.clone(),
                },
                format!(
                    "configuration reloaded; changed: {}{}{}",
                    if changed.is_empty() {
                        "none".to_owned()
                    } else {
                        changed.join(", ")
                    },
                    now_applied
                        .iter()
                        .map(|c| format!("; {c} (in effect now)"))
                        .collect::<String>(),
                    if at_restart.is_empty() {
                        String::new()
                    } else {
                        format!(
                            "; [agent] {} changed: takes effect at the next agent restart",
                            at_restart.join(", ")
                        )
                    }
                ),
            ),
        );
        Ok(changed)
    }

    /// Stops everything in reverse dependency order, then ends the component tasks.
    async fn stop_all(
        &mut self,
        statuses: &mut watch::Receiver<BTreeMap<String, ComponentStatus>>,
    ) {
        let all: Vec<ComponentSpec> = self.config.components.clone();
        let refs: Vec<&ComponentSpec> = all
            .iter()
            .filter(|s| self.tasks.contains_key(s.name.as_str()))
            .collect();
        // Nothing new starts: park what has no process.
        let now_states = self.shared.statuses.borrow().clone();
        for (name, status) in now_states {
            if matches!(
                status.state,
                ComponentState::Pending | ComponentState::Backoff
            ) {
                if let Some(tx) = self.tasks.get(&name) {
                    let (reply, _) = oneshot::channel();
                    let _ = tx.send(ToComponent::Command(Control::Stop, reply)).await;
                }
            }
        }
        let budget: Duration = refs
            .iter()
            .map(|s| s.stop_grace + Duration::from_secs(6))
            .sum::<Duration>()
            + Duration::from_secs(5);
        let deadline = tokio::time::Instant::now() + budget;
        let mut asked: BTreeSet<String> = BTreeSet::new();
        loop {
            let states = self.states();
            if states.values().all(|s| plan::is_down(*s)) {
                break;
            }
            for name in plan::stoppable(&refs, &states) {
                if asked.insert(name.to_string()) {
                    if let Some(tx) = self.tasks.get(name.as_str()) {
                        let (reply, _) = oneshot::channel();
                        let _ = tx.send(ToComponent::Command(Control::Stop, reply)).await;
                    }
                }
            }
            // Re-park anything that came back to pending/backoff meanwhile.
            for (name, state) in &states {
                if matches!(state, ComponentState::Pending | ComponentState::Backoff) {
                    if let Some(tx) = self.tasks.get(name.as_str()) {
                        let (reply, _) = oneshot::channel();
                        let _ = tx.try_send(ToComponent::Command(Control::Stop, reply));
                    }
                }
            }
            if tokio::time::timeout_at(deadline, statuses.changed())
                .await
                .is_err()
            {
                tracing::error!("shutdown: components still up after the grace periods");
                break;
            }
        }
        for (_, tx) in std::mem::take(&mut self.tasks) {
            let _ = tx.send(ToComponent::Exit).await;
        }
    }
}

/// Splits a change of `[agent]` settings on reload into what applies at once (the
/// profile picks the active components; sampling reads its interval every tick) and the
/// keys that only a restart applies.
fn agent_changes(
    old: &crate::config::AgentSettings,
    new: &crate::config::AgentSettings,
) -> (Vec<String>, Vec<&'static str>) {
    let mut now = Vec::new();
    if old.profile != new.profile {
        now.push(format!(
            "profile switched from `{}` to `{}`",
            old.profile, new.profile
        ));
    }
    if old.sample_interval != new.sample_interval {
        now.push(format!(
            "sample_interval {:?} → {:?}",
            old.sample_interval, new.sample_interval
        ));
    }
    let mut later = Vec::new();
    if old.host_id != new.host_id {
        later.push("host_id");
    }
    if old.data_dir != new.data_dir {
        later.push("data_dir");
    }
    if old.listen != new.listen {
        later.push("listen");
    }
    (now, later)
}

/// A pending component's reason: what it waits for, with each dependency's own state
/// and reason (a dependency failing its readiness says why).
fn describe_wait(wait: &plan::Wait, statuses: &BTreeMap<String, ComponentStatus>) -> String {
    match wait {
        plan::Wait::Dependencies(deps) => {
            let list: Vec<String> = deps
                .iter()
                .map(|(name, state)| match (state, statuses.get(name.as_str())) {
                    (Some(state), Some(s)) if !s.reason.is_empty() => {
                        format!("{name} ({state}: {})", s.reason)
                    }
                    (Some(state), _) => format!("{name} ({state})"),
                    (None, _) => format!("{name} (not started yet)"),
                })
                .collect();
            format!("waiting for {} to be ready", list.join(", "))
        }
        plan::Wait::Priority(first) => {
            let list: Vec<&str> = first.iter().map(|n| n.as_str()).collect();
            format!(
                "waiting for {} (lower priority numbers) to start first",
                list.join(", ")
            )
        }
    }
}

/// Samples every component's process tree and every watched process each
/// `sample_interval`, exports them as metrics, and checks memory budgets. Ends with the agent.
async fn sample(view: Arc<AgentView>, requests: mpsc::WeakSender<Request>) {
    let mut sampler = Sampler::new();
    let mut known: BTreeSet<String> = BTreeSet::new();
    loop {
        let config = view.config();
        tokio::select! {
            _ = tokio::time::sleep(config.agent.sample_interval) => {}
            _ = view.stopped() => break,
        }
        let Some(requests) = requests.upgrade() else {
            break;
        };
        let statuses = view.statuses();
        let mut usage = BTreeMap::new();
        let mut trees = BTreeMap::new();
        for (name, status) in &statuses {
            let sampled = status.pid.and_then(|pid| sampler.sample_tree(name, pid));
            match sampled {
                Some(u) => {
                    trees.insert(name.clone(), sampler.members(name).collect());
                    view.metrics.usage(name, "component", &u);
                    if config
                        .component(name)
                        .and_then(|c| c.memory_budget_bytes)
                        .is_some()
                    {
                        let _ = requests.try_send(Request::Memory {
                            component: name.clone(),
                            used_bytes: u.rss_bytes,
                        });
                    }
                    usage.insert(name.clone(), u);
                }
                None => {
                    sampler.forget(name);
                    view.metrics.usage(name, "component", &Usage::default());
                }
            }
        }
        for watch in &config.watches {
            let key = format!("watch:{}", watch.name);
            let u = sampler.sample_watch(&key, &watch.matcher);
            view.metrics.usage(&watch.name, "watch", &u);
            usage.insert(key, u);
        }
        let now: BTreeSet<String> = usage
            .keys()
            .cloned()
            .chain(statuses.keys().cloned())
            .collect();
        for gone in known.difference(&now) {
            sampler.forget(gone);
            match gone.strip_prefix("watch:") {
                Some(w) => view.metrics.forget_usage(w, "watch"),
                None => view.metrics.forget_usage(gone, "component"),
            }
        }
        known = now;
        view.usage.send_replace(usage);
        view.trees.send_replace(trees);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn agent(profile: &str, listen: &str) -> crate::config::AgentSettings {
        let text = format!("[agent]\nprofile = \"{profile}\"\nlisten = \"{listen}\"\n");
        Config::parse(Path::new("t.toml"), text.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"))
            .agent
    }

    #[test]
    fn a_profile_switch_applies_at_once_a_listen_change_at_restart() {
        let old = agent("core", "127.0.0.1:9100");
        let (now, later) = agent_changes(&old, &agent("vision", "127.0.0.1:9100"));
        assert_eq!(now, ["profile switched from `core` to `vision`"]);
        assert!(later.is_empty());
        let (now, later) = agent_changes(&old, &agent("core", "127.0.0.1:9101"));
        assert!(now.is_empty());
        assert_eq!(later, ["listen"]);
    }
}
