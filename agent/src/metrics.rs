//! The agent's own Prometheus metrics, served on the local `/metrics` endpoint.
//! Names follow `razar_<what>_<unit>`, counters end in `_total`, label values are
//! bounded (component names from the config, state and event kind names from enums).

use crate::supervisor::component::ComponentStatus;
use prometheus::{
    Encoder, Gauge, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use razar_shared::domain::ComponentState;
use razar_shared::protocol::{Event, EventKind};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, PoisonError};

/// All metrics of one agent.
pub struct Metrics {
    registry: Registry,
    state: IntGaugeVec,
    restarts: IntCounterVec,
    events: IntCounterVec,
    pulse_recovery: GaugeVec,
    process_cpu: GaugeVec,
    process_rss: GaugeVec,
    process_files: GaugeVec,
    process_threads: GaugeVec,
    process_count: GaugeVec,
    component_vram: GaugeVec,
    /// Components with a `component_vram` series now.
    vram_components: Mutex<BTreeSet<String>>,
    pub uptime: Gauge,
    pub reloads: IntCounterVec,
    pub components: IntGauge,
    events_dropped: IntCounterVec,
    /// 1 while GPU events can be lost (the kernel log cannot be read), else 0.
    gpu_events_degraded: IntGauge,
    flow: FlowMetrics,
    /// The last time a queue or budget dropped something, and which (for `/health`).
    last_drop: Mutex<Option<(std::time::Instant, &'static str)>>,
}

/// Queues and budgets that can drop, as read from the spool, the uplink and the logs.
/// Totals are cumulative; [`Metrics::flow`] turns them into counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flow {
    pub spool_batches: u64,
    pub spool_bytes: u64,
    pub spool_budget_bytes: u64,
    pub spool_dropped_samples_total: u64,
    pub spool_dropped_events_total: u64,
    pub uplink_connected: bool,
    pub uplink_commands_dropped_total: u64,
    pub uplink_outbound_dropped_total: u64,
    pub log_lines_dropped_total: u64,
    /// Live followers of component logs (one per running log follow).
    pub log_followers: u64,
}

struct FlowMetrics {
    spool_batches: IntGauge,
    spool_bytes: IntGauge,
    spool_budget_bytes: IntGauge,
    spool_dropped_samples: IntCounter,
    spool_dropped_events: IntCounter,
    uplink_connected: IntGauge,
    uplink_commands_dropped: IntCounter,
    uplink_outbound_dropped: IntCounter,
    log_lines_dropped: IntCounter,
    log_followers: IntGauge,
}

impl FlowMetrics {
    fn new(registry: &Registry) -> Result<FlowMetrics, prometheus::Error> {
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        Ok(FlowMetrics {
            spool_batches: gauge("razar_spool_batches", "Batches in the spool awaiting the collector's ack.")?,
            spool_bytes: gauge("razar_spool_bytes", "Encoded size of the batches in the spool.")?,
            spool_budget_bytes: gauge("razar_spool_budget_bytes", "Disk budget of the spool (agent.spool_budget).")?,
            spool_dropped_samples: counter(
                "razar_spool_dropped_samples_total",
                "Samples dropped from the spool over its budget (each reported as a gap event).",
            )?,
            spool_dropped_events: counter(
                "razar_spool_dropped_events_total",
                "Events dropped from the spool over its budget, after every sample (each reported).",
            )?,
            uplink_connected: gauge("razar_uplink_connected", "1 while the collector has welcomed this agent.")?,
            uplink_commands_dropped: counter(
                "razar_uplink_commands_dropped_total",
                "Commands from the collector dropped because the executor's queue was full (redelivered).",
            )?,
            uplink_outbound_dropped: counter(
                "razar_uplink_outbound_dropped_total",
                "Command results and log chunks dropped (link down or outbound queue full).",
            )?,
            log_lines_dropped: counter(
                "razar_log_lines_dropped_total",
                "Component log lines not written to their files (writer behind) or lost by a follower.",
            )?,
            log_followers: gauge(
                "razar_log_followers",
                "Live followers of component logs (log follows the collector asked for).",
            )?,
        })
    }
}

/// Raises `counter` to `total` (counters only go up).
/// Raises `counter` to `total`; returns whether it moved.
fn raise(counter: &IntCounter, total: u64) -> bool {
    let seen = counter.get();
    if total > seen {
        counter.inc_by(total - seen);
        return true;
    }
    false
}

fn gauge_u64(gauge: &IntGauge, value: u64) {
    gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn kind_name(kind: &EventKind) -> &'static str {
    match kind {
        EventKind::StateChanged { .. } => "state_changed",
        EventKind::ProcessAdopted { .. } => "process_adopted",
        EventKind::ProcessExited { .. } => "process_exited",
        EventKind::PulseResult { .. } => "pulse_result",
        EventKind::ConfigReloaded { .. } => "config_reloaded",
        EventKind::QuarantineResolved { .. } => "quarantine_resolved",
        EventKind::Xid { .. } => "xid",
        EventKind::EccDoubleBit => "ecc_double_bit",
        EventKind::GpuLost => "gpu_lost",
        EventKind::VramBudgetExceeded { .. } => "vram_budget_exceeded",
        EventKind::GhostMemory { .. } => "ghost_memory",
        EventKind::SpoolGap { .. } => "spool_gap",
        EventKind::MemoryBudgetExceeded { .. } => "memory_budget_exceeded",
        EventKind::Other { .. } => "other",
        // Counted as the fault it is (an attributed XID is an `xid`).
        EventKind::GpuFault(fault) => kind_name(&fault.legacy_kind()),
        EventKind::ComponentEvent(event) => kind_name(&event.legacy_kind()),
    }
}

impl Metrics {
    /// Builds and registers every metric. Fails only on a programming error (a bad name).
    pub fn new(version: &str) -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let info = IntGaugeVec::new(
            Opts::new("razar_agent_build_info", "Agent build metadata (always 1)."),
            &["version"],
        )?;
        registry.register(Box::new(info.clone()))?;
        info.with_label_values(&[version]).set(1);
        let state = IntGaugeVec::new(
            Opts::new(
                "razar_component_state",
                "1 for the state each component is in, 0 for the others.",
            ),
            &["component", "state"],
        )?;
        let restarts = IntCounterVec::new(
            Opts::new(
                "razar_component_restarts_total",
                "Processes started for a component after its first.",
            ),
            &["component"],
        )?;
        let events = IntCounterVec::new(
            Opts::new(
                "razar_events_total",
                "Events emitted by the agent, by kind.",
            ),
            &["kind"],
        )?;
        let pulse_recovery = GaugeVec::new(
            Opts::new(
                "razar_pulse_recovery_seconds",
                "Time from the last failure pulse's kill to ready again.",
            ),
            &["component"],
        )?;
        let uptime = Gauge::new(
            "razar_agent_uptime_seconds",
            "Seconds since the agent started.",
        )?;
        let reloads = IntCounterVec::new(
            Opts::new(
                "razar_config_reloads_total",
                "Configuration reloads, by result (applied or refused).",
            ),
            &["result"],
        )?;
        let components = IntGauge::new("razar_components", "Components supervised on this host.")?;
        let component_vram = GaugeVec::new(
            Opts::new(
                "razar_component_gpu_memory_used_bytes",
                "GPU memory used by a running component's process tree, over every GPU (only with GPU telemetry).",
            ),
            &["component"],
        )?;
        let labels = &["target", "kind"];
        let gauge = |name: &str, help: &str| -> Result<GaugeVec, prometheus::Error> {
            let g = GaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let process_cpu = gauge(
            "razar_process_cpu_usage_ratio",
            "CPU used by a component's process tree (kind=component) or a watched process (kind=watch), 1 = one core.",
        )?;
        let process_rss = gauge(
            "razar_process_resident_memory_bytes",
            "Resident memory of the process tree.",
        )?;
        let process_files = gauge(
            "razar_process_open_files",
            "Open file descriptors of the process tree.",
        )?;
        let process_threads = gauge("razar_process_threads", "Threads of the process tree.")?;
        let process_count = gauge(
            "razar_process_processes",
            "Live processes in the tree (0: not running or no match).",
        )?;
        registry.register(Box::new(state.clone()))?;
        registry.register(Box::new(restarts.clone()))?;
        registry.register(Box::new(events.clone()))?;
        registry.register(Box::new(pulse_recovery.clone()))?;
        registry.register(Box::new(uptime.clone()))?;
        registry.register(Box::new(reloads.clone()))?;
        registry.register(Box::new(components.clone()))?;
        registry.register(Box::new(component_vram.clone()))?;
        let events_dropped = IntCounterVec::new(
            Opts::new(
                "razar_agent_events_dropped_total",
                "Events a receiver of the agent's event bus lost by lagging, by receiver (telemetry: each loss also becomes an event).",
            ),
            &["receiver"],
        )?;
        registry.register(Box::new(events_dropped.clone()))?;
        let gpu_events_degraded = IntGauge::new(
            "razar_agent_gpu_events_degraded",
            "1 while GPU events can be lost: the kernel log cannot be read, so XIDs that arrive together are lost (NVML's event set keeps only the latest); 0 otherwise.",
        )?;
        registry.register(Box::new(gpu_events_degraded.clone()))?;
        let flow = FlowMetrics::new(&registry)?;
        Ok(Metrics {
            registry,
            state,
            restarts,
            events,
            pulse_recovery,
            process_cpu,
            process_rss,
            process_files,
            process_threads,
            process_count,
            component_vram,
            vram_components: Mutex::new(BTreeSet::new()),
            uptime,
            reloads,
            components,
            events_dropped,
            gpu_events_degraded,
            flow,
            last_drop: Mutex::new(None),
        })
    }

    /// Sets whether GPU events can be lost now (see [`crate::telemetry`]).
    pub fn gpu_events_degraded(&self, degraded: bool) {
        self.gpu_events_degraded.set(i64::from(degraded));
    }

    /// When something was last dropped, and what (events, spool samples, ...).
    pub fn last_drop(&self) -> Option<(std::time::Instant, &'static str)> {
        *self.last_drop.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn dropped(&self, what: &'static str) {
        *self.last_drop.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((std::time::Instant::now(), what));
    }

    /// Counts `n` events lost by the event-bus receiver `receiver`.
    pub fn events_dropped(&self, receiver: &str, n: u64) {
        if n > 0 {
            self.dropped("events lost by a lagging receiver of the event bus");
        }
        self.events_dropped.with_label_values(&[receiver]).inc_by(n);
    }

    /// Mirrors the spool, uplink and log queues; a counter that moved is a drop `/health`
    /// reports.
    pub fn flow(&self, flow: &Flow) {
        let m = &self.flow;
        gauge_u64(&m.spool_batches, flow.spool_batches);
        gauge_u64(&m.spool_bytes, flow.spool_bytes);
        gauge_u64(&m.spool_budget_bytes, flow.spool_budget_bytes);
        m.uplink_connected.set(i64::from(flow.uplink_connected));
        gauge_u64(&m.log_followers, flow.log_followers);
        let drops = [
            (
                &m.spool_dropped_samples,
                flow.spool_dropped_samples_total,
                "spool over its disk budget: samples dropped",
            ),
            (
                &m.spool_dropped_events,
                flow.spool_dropped_events_total,
                "spool over its disk budget: events dropped",
            ),
            (
                &m.uplink_commands_dropped,
                flow.uplink_commands_dropped_total,
                "commands from the collector dropped (queue full)",
            ),
            (
                &m.uplink_outbound_dropped,
                flow.uplink_outbound_dropped_total,
                "command results or log chunks dropped (queue full or link down)",
            ),
            (
                &m.log_lines_dropped,
                flow.log_lines_dropped_total,
                "component log lines dropped",
            ),
        ];
        for (counter, total, what) in drops {
            if raise(counter, total) {
                self.dropped(what);
            }
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Counts an event.
    pub fn event(&self, event: &Event) {
        self.events
            .with_label_values(&[kind_name(&event.kind)])
            .inc();
        if let (
            EventKind::PulseResult {
                recovered_ms: Some(ms),
                ..
            },
            razar_shared::protocol::Subject::Component(name),
        ) = (&event.kind, &event.subject)
        {
            self.pulse_recovery
                .with_label_values(&[name.as_str()])
                .set(*ms as f64 / 1000.0);
        }
    }

    /// Mirrors a component's status.
    pub fn component(&self, status: &ComponentStatus) {
        for state in ComponentState::ALL {
            self.state
                .with_label_values(&[status.name.as_str(), state.as_str()])
                .set(i64::from(state == status.state));
        }
        let counter = self.restarts.with_label_values(&[status.name.as_str()]);
        let seen = counter.get();
        if status.restarts > seen {
            counter.inc_by(status.restarts - seen);
        }
    }

    /// Records one resource sample of a component (`kind = "component"`) or watch (`"watch"`).
    pub fn usage(&self, target: &str, kind: &str, usage: &crate::resources::Usage) {
        let l = &[target, kind];
        if let Some(p) = usage.cpu_percent {
            self.process_cpu.with_label_values(l).set(p / 100.0);
        }
        self.process_rss
            .with_label_values(l)
            .set(usage.rss_bytes as f64);
        self.process_files
            .with_label_values(l)
            .set(usage.open_files as f64);
        self.process_threads
            .with_label_values(l)
            .set(usage.threads as f64);
        self.process_count
            .with_label_values(l)
            .set(f64::from(usage.processes));
    }

    /// Drops the resource series of `target`.
    pub fn forget_usage(&self, target: &str, kind: &str) {
        let l = &[target, kind];
        let _ = self.process_cpu.remove_label_values(l);
        let _ = self.process_rss.remove_label_values(l);
        let _ = self.process_files.remove_label_values(l);
        let _ = self.process_threads.remove_label_values(l);
        let _ = self.process_count.remove_label_values(l);
    }

    /// Sets each running component's VRAM (bytes) and drops the series of components
    /// not in `used` (stopped, removed, or no GPU telemetry).
    pub fn component_vram(&self, used: &BTreeMap<String, u64>) {
        let mut shown = self
            .vram_components
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for gone in shown.iter().filter(|name| !used.contains_key(*name)) {
            let _ = self.component_vram.remove_label_values(&[gone.as_str()]);
        }
        for (name, bytes) in used {
            self.component_vram
                .with_label_values(&[name.as_str()])
                .set(*bytes as f64);
        }
        *shown = used.keys().cloned().collect();
    }

    /// Drops a removed component's series.
    pub fn forget_component(&self, name: &str) {
        for state in ComponentState::ALL {
            let _ = self.state.remove_label_values(&[name, state.as_str()]);
        }
        let _ = self.restarts.remove_label_values(&[name]);
        let _ = self.pulse_recovery.remove_label_values(&[name]);
        let _ = self.component_vram.remove_label_values(&[name]);
        self.forget_usage(name, "component");
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_counter_that_moves_is_a_recent_drop_for_health() {
        let metrics = match Metrics::new("test") {
            Ok(m) => m,
            Err(e) => panic!("metrics: {e}"),
        };
        let mut flow = Flow::default();
        metrics.flow(&flow);
        assert!(metrics.last_drop().is_none(), "nothing dropped yet");
        flow.spool_dropped_samples_total = 3;
        metrics.flow(&flow);
        let (_, what) = metrics.last_drop().unwrap_or_else(|| panic!("a drop"));
        assert!(what.contains("samples dropped"), "{what}");
        flow.log_lines_dropped_total = 1;
        metrics.flow(&flow);
        assert!(metrics
            .last_drop()
            .is_some_and(|(_, w)| w.contains("log lines")));
    }

    #[test]
    fn flow_is_exported_and_counters_only_go_up() {
        let metrics = match Metrics::new("test") {
            Ok(m) => m,
            Err(e) => panic!("metrics: {e}"),
        };
        let mut flow = Flow {
            spool_batches: 7,
            spool_bytes: 700,
            spool_budget_bytes: 1000,
            spool_dropped_samples_total: 40,
            spool_dropped_events_total: 2,
            uplink_connected: true,
            uplink_commands_dropped_total: 1,
            uplink_outbound_dropped_total: 3,
            log_lines_dropped_total: 5,
            log_followers: 2,
        };
        metrics.flow(&flow);
        flow.spool_dropped_samples_total = 50;
        flow.uplink_connected = false;
        metrics.flow(&flow);
        let text = metrics.render();
        for line in [
            "razar_spool_batches 7",
            "razar_spool_bytes 700",
            "razar_spool_budget_bytes 1000",
            "razar_spool_dropped_samples_total 50",
            "razar_spool_dropped_events_total 2",
            "razar_uplink_connected 0",
            "razar_uplink_commands_dropped_total 1",
            "razar_uplink_outbound_dropped_total 3",
            "razar_log_lines_dropped_total 5",
            "razar_log_followers 2",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
    }
}
