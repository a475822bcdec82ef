//! The agent's telemetry loop: every tick it samples the GPUs, the host and each
//! component's process tree, turns readings and supervisor events into one batch, spools
//! it and hands it to the uplink. (Commands from the collector: [`crate::commands`].)

use crate::config::GpuSettings;
use crate::store::Store;
use crate::supervisor::component::ComponentStatus;
use crate::supervisor::runtime::Agent;
use crate::uplink::Uplink;
use razar_gpu::exposition::{gpu_samples, host_samples, Sample, TelemetryCollector};
use razar_gpu::host::HostSampler;
use razar_gpu::kernel_log::KernelLogCursor;
use razar_gpu::mapping::{vram_by_component, GhostMemoryDetector};
use razar_gpu::{
    EventWaker, GpuAttribution, GpuEvent, GpuIdentity, GpuProcesses, GpuSource, NoGpus,
    NvmlOptions, ScenarioSource,
};
use razar_shared::domain::ComponentState;
use razar_shared::protocol::{
    ComponentEvent, ComponentEventKind, ComponentInfo, ComponentRevision, Event, EventKind,
    FaultProcess, GpuInfo, GpuRef, SeriesPoints, StatusDigest, Subject, UnixMillis,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{broadcast, watch};

/// Ghost memory: VRAM not accounted for by any process above this many bytes…
const GHOST_THRESHOLD_BYTES: u64 = 512 << 20;
/// …for this many consecutive samples.
const GHOST_SAMPLES: u32 = 5;

/// A series as the samplers name it: metric and labels.
type SeriesKey = (&'static str, Vec<(String, String)>);

/// How often the GPU source is asked for events between sampling ticks, for sources
/// that cannot wake the loop themselves (the NVML source wakes it the moment its
/// watcher threads queue an event: [`GpuSource::set_event_waker`]).
const FAULT_POLL: Duration = Duration::from_millis(100);

/// Least time between two GPU event drains woken by the source: under a storm the loop
/// drains at most this often (the ledger folds repeats into counted events meanwhile),
/// so a flapping link cannot turn into a batch per XID.
const FAULT_WAKE_GAP: Duration = Duration::from_millis(20);

/// What woke the telemetry loop.
enum Wake {
    /// The sampling tick (or shutdown: one last tick).
    Tick,
    /// Time to ask the GPU source for events.
    Faults,
    /// An event on the agent's bus.
    Event(Result<Event, broadcast::error::RecvError>),
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> UnixMillis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Opens the configured GPU source. A source that cannot be opened leaves the agent
/// running without GPUs; the returned status line says why (shown once, in logs and
/// `/health`).
/// `kernel_log_after`: the kernel log record reported up to by an earlier run of this
/// boot ([`KernelLogProgress::resume`]).
pub fn open_gpu_source(
    settings: &GpuSettings,
    kernel_log_after: Option<u64>,
) -> (Box<dyn GpuSource>, Option<String>) {
    match settings {
        GpuSettings::None => (Box::new(NoGpus), Some("GPU sampling disabled".into())),
        GpuSettings::Nvml {
            library,
            kernel_log,
        } => razar_gpu::open_nvml_or_none(&NvmlOptions {
            library_path: library.clone(),
            kernel_log: Some(kernel_log.clone()),
            kernel_log_after,
            ..NvmlOptions::default()
        }),
        GpuSettings::Scenario { path } => match ScenarioSource::load(path) {
            Ok(source) => (Box::new(source), None),
            Err(error) => {
                let status = format!("GPU scenario {}: {error}", path.display());
                tracing::warn!(error = %status, "GPU telemetry disabled");
                (Box::new(NoGpus), Some(status))
            }
        },
    }
}

/// The agent store's key of the kernel log cursor ([`KernelLogCursor::encode`]).
pub const KERNEL_LOG_CURSOR_KEY: &str = "kernel_log_cursor";

/// How far the kernel log's XIDs were reported, kept in the agent's store once their
/// events are spooled, so an agent restart does not report them again (a reboot starts
/// over: the cursor belongs to a boot id).
pub struct KernelLogProgress {
    store: Arc<Store>,
    boot_id: String,
    saved: Option<u64>,
}

impl KernelLogProgress {
    /// The progress of this boot (`None` when the boot id cannot be read: every run
    /// then reads the kernel log from its start) and the record to resume after.
    pub fn resume(store: Arc<Store>) -> (Option<KernelLogProgress>, Option<u64>) {
        let Some(boot_id) = razar_gpu::kernel_log::boot_id() else {
            return (None, None);
        };
        let stored = match store.value(KERNEL_LOG_CURSOR_KEY) {
            Ok(v) => v
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|t| KernelLogCursor::decode(&t)),
            Err(error) => {
                tracing::warn!(%error, "cannot read the kernel log cursor; reading it from the start");
                None
            }
        };
        let after = KernelLogCursor::resume_after(stored.as_ref(), &boot_id);
        let progress = KernelLogProgress {
            store,
            boot_id,
            saved: after,
        };
        (Some(progress), after)
    }

    /// Keeps `reported` (the events up to it are spooled). Blocking: redb.
    fn save(&mut self, reported: Option<u64>) {
        let Some(seq) = reported else { return };
        if self.saved.is_some_and(|s| s >= seq) {
            return;
        }
        let cursor = KernelLogCursor {
            boot_id: self.boot_id.clone(),
            seq,
        };
        match self
            .store
            .set_value(KERNEL_LOG_CURSOR_KEY, cursor.encode().as_bytes())
        {
            Ok(()) => self.saved = Some(seq),
            Err(error) => tracing::warn!(%error, "cannot keep the kernel log cursor"),
        }
    }
}

/// Saves the kernel log cursor on the blocking pool once the events up to `reported`
/// are spooled.
async fn save_progress(progress: &mut Option<KernelLogProgress>, reported: Option<u64>) {
    let Some(mut p) = progress.take() else { return };
    if reported.is_none() || p.saved >= reported {
        *progress = Some(p);
        return;
    }
    match tokio::task::spawn_blocking(move || {
        p.save(reported);
        p
    })
    .await
    {
        Ok(p) => *progress = Some(p),
        Err(error) => tracing::error!(%error, "kernel log cursor thread failed"),
    }
}

/// What one sampling tick read off the hardware, produced on a blocking thread.
struct Tick {
    samples: Vec<Sample>,
    events: Vec<Event>,
    vram: BTreeMap<String, u64>,
    /// The GPUs each component's processes use.
    component_gpus: ComponentGpus,
    gpus: Vec<GpuInfo>,
    /// Why GPU events can be lost now ([`GpuSource::degraded`]).
    degraded: Option<String>,
    /// [`GpuSource::kernel_log_reported`] after this tick's events were taken.
    kernel_log_reported: Option<u64>,
}

/// State of the hardware samplers, moved to a blocking thread for each tick.
struct Samplers {
    gpu: Box<dyn GpuSource>,
    host: HostSampler,
    ghost: GhostMemoryDetector,
    /// The `/metrics` view of the latest readings (dcgm-exporter names and razar's).
    exposition: TelemetryCollector,
}

impl Samplers {
    fn tick(&mut self, agent: &Agent) -> Tick {
        let ts = now_ms();
        let mut samples = Vec::with_capacity(256);
        let mut events = Vec::new();
        let readings = match self.gpu.sample() {
            Ok(r) => r,
            Err(error) => {
                tracing::debug!(%error, "GPU sample failed");
                Vec::new()
            }
        };
        gpu_samples(&readings, &mut samples);
        self.exposition.update_gpus(&readings);
        let processes = self.gpu.processes().unwrap_or_default();
        let walk = processes.iter().any(|g| !g.processes.is_empty());
        let usage = vram_by_component(&processes, &component_trees(agent, walk));
        let vram = usage
            .iter()
            .map(|(name, v)| (name.clone(), v.used_bytes))
            .collect();
        let gpus: Vec<GpuInfo> = self.gpu.inventory().iter().map(|g| g.to_info()).collect();
        let component_gpus = usage
            .iter()
            .map(|(name, v)| {
                let used = self
                    .gpu
                    .inventory()
                    .iter()
                    .filter(|g| v.per_gpu.get(&g.index).is_some_and(|b| *b > 0))
                    .map(gpu_ref)
                    .collect();
                (name.clone(), used)
            })
            .collect();
        // One series per component and GPU (labelled with the GPU's index and UUID);
        // without GPUs there is no VRAM to report: no series of zeros.
        for (name, v) in &usage {
            for gpu in self.gpu.inventory() {
                samples.push(Sample {
                    metric: "razar_component_gpu_memory_used_bytes",
                    labels: vec![
                        ("component".into(), name.clone()),
                        ("gpu".into(), gpu.index.to_string()),
                        ("uuid".into(), gpu.uuid.clone()),
                    ],
                    value: v.per_gpu.get(&gpu.index).copied().unwrap_or(0) as f64,
                });
            }
        }
        for ghost in self.ghost.observe(&readings, &processes) {
            events.push(ghost.to_event(ts));
        }
        let found = self.gpu.poll_events();
        events.extend(attribute(&found, self.gpu.inventory(), &processes, agent));
        let host = self.host.sample();
        self.exposition.update_host(&host);
        host_samples(&host, &mut samples);
        Tick {
            samples,
            events,
            vram,
            component_gpus,
            gpus,
            degraded: self.gpu.degraded(),
            kernel_log_reported: self.gpu.kernel_log_reported(),
        }
    }
}

/// Runs the telemetry loop until `shutdown` turns true. Without an uplink the readings
/// still reach `/metrics` through `exposition` and GPU findings still become events.
pub async fn run_telemetry(
    agent: Agent,
    uplink: Option<Arc<Uplink>>,
    gpu: Box<dyn GpuSource>,
    exposition: TelemetryCollector,
    interval: Duration,
    mut kernel_log: Option<KernelLogProgress>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut events = agent.subscribe_from_start();
    let mut samplers = Some(Samplers {
        gpu,
        host: HostSampler::new(false),
        ghost: GhostMemoryDetector::new(
            GHOST_THRESHOLD_BYTES,
            NonZeroU32::new(GHOST_SAMPLES).unwrap_or(NonZeroU32::MIN),
        ),
        exposition,
    });
    // Series ids are looked up in the spool's persistent dictionary once per series.
    let mut series_ids: HashMap<SeriesKey, u32> = HashMap::new();
    let mut last_inventory: Option<(Vec<ComponentInfo>, Vec<GpuInfo>)> = None;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut fault_poll = tokio::time::interval(FAULT_POLL.min(interval));
    fault_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The GPU source wakes us when it queues an event (a permit is kept while we work).
    let fault_wake = Arc::new(tokio::sync::Notify::new());
    if let Some(s) = samplers.as_mut() {
        let wake = fault_wake.clone();
        s.gpu
            .set_event_waker(EventWaker::new(move || wake.notify_one()));
    }
    let mut last_drain = tokio::time::Instant::now();
    let mut bus_open = true;
    let mut degraded: Option<String> = None;
    // The GPUs each component used at the latest tick (component events carry them).
    let mut component_gpus = ComponentGpus::new();
    loop {
        let wake = tokio::select! {
            _ = ticker.tick() => Wake::Tick,
            _ = shutdown.changed() => Wake::Tick,
            _ = fault_poll.tick() => Wake::Faults,
            _ = fault_wake.notified() => {
                // A storm wakes us at most once per gap; the ledger coalesces meanwhile.
                tokio::time::sleep_until(last_drain + FAULT_WAKE_GAP).await;
                Wake::Faults
            }
            received = events.recv(), if bus_open => Wake::Event(received),
        };
        let stopping = *shutdown.borrow();
        // The fast path: events leave as soon as they are spooled, samples keep the tick.
        let mut first = Vec::new();
        // The kernel log record up to which GPU events were taken (saved once spooled).
        let mut reported = None;
        if !matches!(wake, Wake::Tick) {
            match wake {
                Wake::Event(Ok(event)) => first.push(event),
                Wake::Event(Err(broadcast::error::RecvError::Lagged(n))) => {
                    tracing::warn!(lost = n, "event subscription lagged");
                    agent.view().metrics().events_dropped("telemetry", n);
                    first.push(lagged_event(now_ms(), n));
                }
                Wake::Event(Err(broadcast::error::RecvError::Closed)) => bus_open = false,
                Wake::Faults => {
                    last_drain = tokio::time::Instant::now();
                    let Some(mut s) = samplers.take() else { break };
                    if s.gpu.inventory().is_empty() {
                        samplers = Some(s);
                    } else {
                        let polled = agent.clone();
                        let joined = tokio::task::spawn_blocking(move || {
                            let found = s.gpu.poll_events();
                            // What runs on the GPUs now, asked only when something happened.
                            let found = if found.is_empty() {
                                Vec::new()
                            } else {
                                let processes = s.gpu.processes().unwrap_or_default();
                                attribute(&found, s.gpu.inventory(), &processes, &polled)
                            };
                            let reported = s.gpu.kernel_log_reported();
                            (s, found, reported)
                        })
                        .await;
                        let Ok((s, found, kernel_log_seq)) = joined else {
                            tracing::error!("GPU event poll thread failed; telemetry stops");
                            break;
                        };
                        samplers = Some(s);
                        reported = kernel_log_seq;
                        for event in found {
                            agent.emit(event);
                        }
                    }
                }
                Wake::Tick => {}
            }
            // Stopping: what was taken goes with the last tick's batch.
            if !stopping {
                first.extend(drain(&mut events, agent.view().metrics()));
                if let (Some(uplink), false) = (&uplink, first.is_empty()) {
                    attribute_components(&mut first, &agent, &component_gpus);
                    match uplink.publish(now_ms(), Vec::new(), first).await {
                        Ok(_) => save_progress(&mut kernel_log, reported).await,
                        Err(error) => tracing::error!(%error, "cannot spool an event batch"),
                    }
                } else if uplink.is_none() {
                    save_progress(&mut kernel_log, reported).await;
                }
                continue;
            }
        }
        let Some(mut s) = samplers.take() else { break };
        let sampled = agent.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let tick = s.tick(&sampled);
            (s, tick)
        })
        .await;
        let (s, mut tick) = match joined {
            Ok(v) => v,
            Err(error) => {
                tracing::error!(%error, "sampler thread failed; telemetry stops");
                break;
            }
        };
        samplers = Some(s);
        let base = now_ms();
        component_gpus = std::mem::take(&mut tick.component_gpus);

        // Component resources, sampled by the supervisor each tick.
        for (key, usage) in agent.usage() {
            let (label, name) = match key.strip_prefix("watch:") {
                Some(w) => ("watch", w.to_string()),
                None => ("component", key),
            };
            let labels = vec![(label.to_string(), name)];
            for (metric, value) in [
                ("razar_component_cpu_seconds_total", usage.cpu_seconds),
                (
                    "razar_component_resident_memory_bytes",
                    usage.rss_bytes as f64,
                ),
                ("razar_component_open_files", usage.open_files as f64),
                ("razar_component_threads", usage.threads as f64),
                ("razar_component_processes", f64::from(usage.processes)),
            ] {
                tick.samples.push(Sample {
                    metric,
                    labels: labels.clone(),
                    value,
                });
            }
        }
        // Without GPUs there is no VRAM to show (every component would read 0).
        if tick.gpus.is_empty() {
            tick.vram.clear();
        }
        agent.view().metrics().component_vram(&tick.vram);
        for (component, used) in &tick.vram {
            agent.report_vram(component, *used).await;
        }

        if tick.degraded != degraded {
            agent.emit(degraded_event(base, tick.degraded.as_deref()));
            agent.set_gpu_degraded(tick.degraded.as_deref());
            degraded = tick.degraded.take();
        }
        // GPU findings go through the agent's event bus (metrics, local subscribers) and
        // come back to us there, with the supervisor's events since the last tick.
        for event in tick.events.drain(..) {
            agent.emit(event);
        }
        let mut batch_events = first;
        batch_events.extend(drain(&mut events, agent.view().metrics()));
        attribute_components(&mut batch_events, &agent, &component_gpus);
        agent
            .view()
            .metrics()
            .flow(&flow(&agent, uplink.as_deref()));
        let Some(uplink) = &uplink else {
            // No spool: the events are out once emitted.
            save_progress(&mut kernel_log, tick.kernel_log_reported).await;
            if stopping {
                break;
            }
            continue;
        };

        let mut by_series: BTreeMap<u32, Vec<(u32, f64)>> = BTreeMap::new();
        for sample in tick.samples {
            if !sample.value.is_finite() {
                continue;
            }
            let key = (sample.metric, sample.labels);
            let id = match series_ids.get(&key) {
                Some(id) => *id,
                None => match uplink.spool().series_id(key.0, &key.1) {
                    Ok(id) => {
                        series_ids.insert(key, id);
                        id
                    }
                    Err(error) => {
                        tracing::error!(%error, "cannot register a series");
                        continue;
                    }
                },
            };
            by_series.entry(id).or_default().push((0, sample.value));
        }
        let series: Vec<SeriesPoints> = by_series
            .into_iter()
            .map(|(series, points)| SeriesPoints { series, points })
            .collect();
        match uplink.publish(base, series, batch_events).await {
            Ok(_) => save_progress(&mut kernel_log, tick.kernel_log_reported).await,
            Err(error) => tracing::error!(%error, "cannot spool a batch"),
        }

        let statuses = agent.statuses();
        // The inventory lists what the config runs: a component whose status is gone
        // (its task ended in a clean shutdown) is `stopped`, not removed — only a reload
        // that drops it from the config removes it from the collector's inventory.
        let config = agent.view().config();
        let components: Vec<ComponentInfo> = config
            .active_components()
            .map(|spec| match statuses.get(spec.name.as_str()) {
                Some(s) => ComponentInfo {
                    name: s.name.clone(),
                    revision: s.revision.clone(),
                    state: s.state,
                    critical: s.critical,
                },
                None => ComponentInfo {
                    name: spec.name.to_string(),
                    revision: spec.revision.clone(),
                    state: ComponentState::Stopped,
                    critical: spec.critical,
                },
            })
            .collect();
        uplink.set_digest(StatusDigest {
            components_total: count(&statuses, |_| true),
            components_ready: count(&statuses, |s| s == ComponentState::Ready),
            components_quarantined: count(&statuses, |s| s == ComponentState::Quarantined),
            gpus: u32::try_from(tick.gpus.len()).unwrap_or(u32::MAX),
            spool_batches: 0,
        });
        let inventory = (components, tick.gpus);
        if last_inventory.as_ref() != Some(&inventory) {
            uplink.set_inventory(inventory.0.clone(), inventory.1.clone());
            last_inventory = Some(inventory);
        }
        if stopping {
            break;
        }
    }
}

fn count(statuses: &BTreeMap<String, ComponentStatus>, f: impl Fn(ComponentState) -> bool) -> u32 {
    u32::try_from(statuses.values().filter(|s| f(s.state)).count()).unwrap_or(u32::MAX)
}

/// Stable code of the event recording events the telemetry loop lost by lagging behind
/// the agent's event bus.
pub const EVENTS_LAGGED_CODE: &str = "events_dropped";

/// Every event received since the last call. Events lost by lagging become one event
/// saying how many (and are counted), so a loss is never silent.
fn drain(events: &mut broadcast::Receiver<Event>, metrics: &crate::metrics::Metrics) -> Vec<Event> {
    let mut out = Vec::new();
    loop {
        match events.try_recv() {
            Ok(e) => out.push(e),
            Err(broadcast::error::TryRecvError::Lagged(n)) => {
                tracing::warn!(lost = n, "event subscription lagged");
                metrics.events_dropped("telemetry", n);
                out.push(lagged_event(now_ms(), n));
            }
            Err(_) => return out,
        }
    }
}

/// Stable code of the event saying GPU events can be lost (the kernel log cannot be read).
pub const GPU_EVENTS_DEGRADED_CODE: &str = "kernel_log_unreadable";
/// Stable code of the event saying the kernel log is read again.
pub const GPU_EVENTS_RESTORED_CODE: &str = "kernel_log_readable";

/// The event for a change of [`GpuSource::degraded`] to `now`, logged here too.
fn degraded_event(ts_ms: UnixMillis, now: Option<&str>) -> Event {
    use razar_shared::domain::Severity;
    use razar_shared::protocol::{EventKind, Subject};
    let (severity, code, message) = match now {
        Some(reason) => {
            tracing::warn!(reason, "GPU events can be lost");
            (
                Severity::Warning,
                GPU_EVENTS_DEGRADED_CODE,
                reason.to_owned(),
            )
        }
        None => {
            tracing::info!("kernel log readable again: GPU events are complete");
            (
                Severity::Info,
                GPU_EVENTS_RESTORED_CODE,
                "kernel log readable again".to_owned(),
            )
        }
    };
    Event {
        ts_ms,
        severity,
        subject: Subject::Host,
        kind: EventKind::Other { code: code.into() },
        message,
    }
}

/// The event standing for `lost` events the telemetry loop never received.
fn lagged_event(ts_ms: UnixMillis, lost: u64) -> Event {
    Event {
        ts_ms,
        severity: razar_shared::domain::Severity::Warning,
        subject: razar_shared::protocol::Subject::Host,
        kind: razar_shared::protocol::EventKind::Other {
            code: EVENTS_LAGGED_CODE.into(),
        },
        message: format!("{lost} agent events lost: the telemetry loop fell behind the event bus"),
    }
}

/// The spool, uplink and log queues as `/metrics` shows them.
fn flow(agent: &Agent, uplink: Option<&Uplink>) -> crate::metrics::Flow {
    let logs = agent.logs();
    let mut flow = crate::metrics::Flow {
        log_lines_dropped_total: logs.dropped_lines_total() + logs.dropped_follow_lines_total(),
        log_followers: logs.followers(),
        ..crate::metrics::Flow::default()
    };
    if let Some(uplink) = uplink {
        let spool = uplink.spool();
        let status = uplink.status();
        flow.spool_batches = spool.len();
        flow.spool_bytes = spool.bytes();
        flow.spool_budget_bytes = spool.budget_bytes();
        flow.spool_dropped_samples_total = spool.dropped_samples_total();
        flow.spool_dropped_events_total = spool.dropped_events_total();
        flow.uplink_connected = status.state == crate::uplink::LinkState::Connected;
        flow.uplink_commands_dropped_total = status.commands_dropped_total;
        flow.uplink_outbound_dropped_total = status.outbound_dropped_total;
    }
    flow
}

/// GPU events as wire events attributed to what ran on their GPU at that moment: the
/// GPU's identity, its compute processes (pid, name, memory) and the components whose
/// process tree holds one of them, with their revision (version label, spec hash) and
/// main pid. Blocking (procfs).
fn attribute(
    found: &[GpuEvent],
    inventory: &[GpuIdentity],
    processes: &[GpuProcesses],
    agent: &Agent,
) -> Vec<Event> {
    if found.is_empty() {
        return Vec::new();
    }
    let walk = processes.iter().any(|g| !g.processes.is_empty());
    let trees = component_trees(agent, walk);
    let statuses = agent.statuses();
    let config = agent.view().config();
    found
        .iter()
        .map(|event| {
            let on_gpu: &[razar_gpu::GpuProcess] = processes
                .iter()
                .find(|g| g.gpu_index == event.gpu_index)
                .map_or(&[], |g| g.processes.as_slice());
            let components = trees
                .iter()
                .filter(|(_, tree)| on_gpu.iter().any(|p| tree.contains(&p.pid)))
                .map(|(name, _)| {
                    let status = statuses.get(name);
                    ComponentRevision {
                        component: name.clone(),
                        version: status.map(|s| s.revision.clone()).unwrap_or_default(),
                        spec_hash: crate::revisions::spec_hash(&config, name).unwrap_or_default(),
                        pid: status.and_then(|s| s.pid),
                    }
                })
                .collect();
            let attribution = GpuAttribution {
                processes: on_gpu
                    .iter()
                    .map(|p| FaultProcess {
                        pid: p.pid,
                        name: process_name(p.pid),
                        used_memory_bytes: p.used_memory.bytes(),
                    })
                    .collect(),
                components,
            };
            let gpu = inventory.iter().find(|g| g.index == event.gpu_index);
            event.to_attributed_event(gpu, attribution)
        })
        .collect()
}

/// The GPUs each component's processes use (by name).
type ComponentGpus = BTreeMap<String, Vec<GpuRef>>;

fn gpu_ref(gpu: &GpuIdentity) -> GpuRef {
    GpuRef {
        index: gpu.index,
        uuid: gpu.uuid.clone(),
        pci_bus_id: gpu.pci_bus_id.clone(),
    }
}

/// Component events made attributed (`EventKind::ComponentEvent`) for the collector: the
/// revision the component runs (version label, spec hash, main pid) and the GPUs its
/// processes used at the latest tick. The agent's own bus keeps the plain events.
fn attribute_components(events: &mut [Event], agent: &Agent, gpus: &ComponentGpus) {
    let mut context = None;
    for event in events {
        let Subject::Component(name) = &event.subject else {
            continue;
        };
        let Some(kind) = ComponentEventKind::from_kind(&event.kind) else {
            continue;
        };
        let (statuses, config) =
            context.get_or_insert_with(|| (agent.statuses(), agent.view().config()));
        let status = statuses.get(name);
        let Some(version) = status
            .map(|s| s.revision.clone())
            .or_else(|| config.component(name).map(|c| c.revision.clone()))
        else {
            continue;
        };
        event.kind = EventKind::ComponentEvent(Box::new(ComponentEvent {
            event: kind,
            revision: ComponentRevision {
                component: name.clone(),
                version,
                spec_hash: crate::revisions::spec_hash(config, name).unwrap_or_default(),
                pid: status.and_then(|s| s.pid),
            },
            gpus: gpus.get(name).cloned().unwrap_or_default(),
        }));
    }
}

/// A process's name (`/proc/<pid>/comm`), empty when it cannot be read (gone, or in
/// another pid namespace).
fn process_name(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_owned())
        .unwrap_or_default()
}

/// Each component's process tree (leader plus descendants), for GPU memory mapping.
/// The trees come from the supervisor's latest resource sample; only a component whose
/// leader is not in it (started since) is walked here. With `walk` false (no process
/// uses a GPU) every component gets an empty tree, which maps to zero VRAM.
fn component_trees(agent: &Agent, walk: bool) -> BTreeMap<String, BTreeSet<u32>> {
    let cached = if walk { agent.trees() } else { BTreeMap::new() };
    agent
        .pids()
        .into_iter()
        .map(|(name, pid)| {
            let tree = match cached.get(&name) {
                _ if !walk => BTreeSet::new(),
                Some(tree) if tree.contains(&pid) => tree.clone(),
                _ => crate::resources::tree_pids(pid).into_iter().collect(),
            };
            (name, tree)
        })
        .collect()
}
