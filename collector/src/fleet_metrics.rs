//! Prometheus exposition of the fleet's latest state (`GET /metrics/fleet`) and the
//! collector's own scrape-time gauges on `/metrics` (ingest lag, database pool,
//! certificate expiry).
//!
//! The fleet page is rendered from the store on scrape: hosts, components and GPUs from
//! their tables, GPU gauges from the samples of the last [`FleetMetricsOptions::window`]
//! (a host with nothing newer shows no gauge rather than a stale one), GPU quarantine
//! states from a [`QuarantineSource`]. One render serves every scrape for
//! [`FleetMetricsOptions::cache`]; concurrent scrapes wait for the render in progress
//! instead of each querying. Every label value is bounded: host ids, component names
//! and GPU indexes come from the store (cleaned and capped at the store boundary), and
//! the few free-text labels (`agent_version`, `profile`, `model`) are capped again here;
//! states, engines and sensors are closed sets.
//!
//! Rendering is pure ([`render`]); the queries are in [`FleetMetrics::snapshot`].

use crate::api::Ready;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::future::BoxFuture;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Gauge, GaugeVec, IntGauge, IntGaugeVec, Opts};
use razar_shared::domain::ComponentState;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

/// Longest free-text label value (agent version, profile, GPU model), in bytes.
const MAX_TEXT_LABEL: usize = 64;

/// The content type of Prometheus' text format.
pub const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// GPU metrics the agents send that the fleet page shows, with the fleet name and the
/// extra label (and its allowed values) each carries besides `gpu`.
const GPU_GAUGES: [GpuGauge; 4] = [
    GpuGauge {
        source: "razar_gpu_utilization_ratio",
        name: "razar_fleet_gpu_utilization_ratio",
        help: "Latest share of the sample period the GPU engine was busy (0-1).",
        label: Some(("engine", &["gpu", "memory", "encoder", "decoder"])),
    },
    GpuGauge {
        source: "razar_gpu_memory_used_bytes",
        name: "razar_fleet_gpu_memory_used_bytes",
        help: "Latest GPU memory in use.",
        label: None,
    },
    GpuGauge {
        source: "razar_gpu_temperature_celsius",
        name: "razar_fleet_gpu_temperature_celsius",
        help: "Latest GPU temperature.",
        label: Some(("sensor", &["gpu", "memory"])),
    },
    GpuGauge {
        source: "razar_gpu_power_watts",
        name: "razar_fleet_gpu_power_watts",
        help: "Latest GPU power draw.",
        label: None,
    },
];

struct GpuGauge {
    /// The agent's metric name (the `series.metric` column).
    source: &'static str,
    /// The fleet page's name.
    name: &'static str,
    help: &'static str,
    /// Label name and the values it may take (other values are not shown).
    label: Option<(&'static str, &'static [&'static str])>,
}

/// How the fleet page is rendered.
#[derive(Debug, Clone, Copy)]
pub struct FleetMetricsOptions {
    /// GPU gauges come from samples this recent; older ones are not shown.
    pub window: Duration,
    /// One render serves every scrape for this long.
    pub cache: Duration,
    /// Longest a render may take (its queries are cancelled past it: 503).
    pub timeout: Duration,
}

impl Default for FleetMetricsOptions {
    fn default() -> Self {
        FleetMetricsOptions {
            // Agents sample every second by default: a few periods cover a slow batch.
            window: Duration::from_secs(15),
            cache: Duration::from_secs(1),
            timeout: Duration::from_secs(10),
        }
    }
}

/// A GPU's quarantine state, as the decision loop keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuQuarantineState {
    /// Out of service after a fault.
    Quarantined,
    /// Back in service, watched for faults.
    Probation,
    /// Waiting for a hardware inspection.
    Inspection,
}

impl GpuQuarantineState {
    pub const ALL: [GpuQuarantineState; 3] = [
        GpuQuarantineState::Quarantined,
        GpuQuarantineState::Probation,
        GpuQuarantineState::Inspection,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            GpuQuarantineState::Quarantined => "quarantined",
            GpuQuarantineState::Probation => "probation",
            GpuQuarantineState::Inspection => "inspection",
        }
    }
}

/// One GPU not simply in service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuQuarantine {
    pub host: String,
    pub gpu: u32,
    pub state: GpuQuarantineState,
}

/// Where the fleet page reads GPU quarantine states from: [`EngineQuarantines`] (the
/// decision engine's `gpu_health`) in the collector; [`NoQuarantines`] knows none.
pub trait QuarantineSource: Send + Sync {
    /// Every GPU currently quarantined, on probation or awaiting inspection.
    fn gpu_quarantines(&self) -> BoxFuture<'_, Result<Vec<GpuQuarantine>, String>>;
}

/// No quarantine state known yet: the page shows no `razar_fleet_gpu_quarantine_state`.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoQuarantines;

impl QuarantineSource for NoQuarantines {
    fn gpu_quarantines(&self) -> BoxFuture<'_, Result<Vec<GpuQuarantine>, String>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}

/// The decision engine's GPU states (`gpu_health`, kept by the engine's leader on any
/// collector of the database).
#[derive(Clone)]
pub struct EngineQuarantines {
    ready: Arc<OnceLock<Ready>>,
}

impl EngineQuarantines {
    pub fn new(ready: Arc<OnceLock<Ready>>) -> EngineQuarantines {
        EngineQuarantines { ready }
    }
}

impl GpuQuarantineState {
    /// The state of a stored `gpu_health` state; `None` for `healthy` (pure).
    pub fn parse(state: &str) -> Option<GpuQuarantineState> {
        GpuQuarantineState::ALL
            .into_iter()
            .find(|s| s.as_str() == state)
    }
}

impl QuarantineSource for EngineQuarantines {
    fn gpu_quarantines(&self) -> BoxFuture<'_, Result<Vec<GpuQuarantine>, String>> {
        Box::pin(async move {
            let ready = self
                .ready
                .get()
                .ok_or_else(|| "the database has not been reached yet".to_owned())?;
            let rows = crate::engine_loop::EngineHandle::new(ready.pool.clone())
                .gpu_health(None)
                .await
                .map_err(|e| e.to_string())?;
            Ok(rows
                .into_iter()
                .filter_map(|r| {
                    let state = GpuQuarantineState::parse(&r.state)?;
                    let gpu = u32::try_from(r.gpu_index).ok()?;
                    Some(GpuQuarantine {
                        host: r.host_id,
                        gpu,
                        state,
                    })
                })
                .collect())
        })
    }
}

/// One host row.
#[derive(Debug, Clone, PartialEq)]
pub struct HostRow {
    pub host: String,
    pub online: bool,
    pub last_seen_seconds: f64,
    pub agent_version: String,
    pub profile: String,
}

/// One component row.
#[derive(Debug, Clone, PartialEq)]
pub struct ComponentRow {
    pub host: String,
    pub component: String,
    pub state: String,
    pub critical: bool,
}

/// One GPU of the inventory.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuRow {
    pub host: String,
    pub gpu: i32,
    pub uuid: String,
    pub model: String,
    pub memory_total_bytes: i64,
}

/// The latest value of one GPU series.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuValue {
    pub host: String,
    pub metric: String,
    pub gpu: Option<String>,
    pub engine: Option<String>,
    pub sensor: Option<String>,
    pub value: f64,
}

/// What one render shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub hosts: Vec<HostRow>,
    pub components: Vec<ComponentRow>,
    pub gpus: Vec<GpuRow>,
    pub values: Vec<GpuValue>,
    pub quarantines: Vec<GpuQuarantine>,
    /// Why the quarantine source failed (the rest is still shown).
    pub quarantine_error: Option<String>,
}

/// A rendered page and when it was rendered.
type Rendered = (Instant, Arc<str>);

/// The fleet page: the store, the quarantine source and the render cache.
#[derive(Clone)]
pub struct FleetMetrics {
    ready: Arc<OnceLock<Ready>>,
    quarantines: Arc<dyn QuarantineSource>,
    options: FleetMetricsOptions,
    cache: Arc<tokio::sync::Mutex<Option<Rendered>>>,
}

impl std::fmt::Debug for FleetMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetMetrics")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Why the page could not be rendered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FleetMetricsError {
    /// The database has not been reached since start.
    #[error("the database has not been reached yet")]
    NotReady,
    /// A query failed.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// The render took longer than its timeout.
    #[error("rendering took longer than {0:?}")]
    Timeout(Duration),
}

impl FleetMetrics {
    pub fn new(
        ready: Arc<OnceLock<Ready>>,
        quarantines: Arc<dyn QuarantineSource>,
        options: FleetMetricsOptions,
    ) -> FleetMetrics {
        FleetMetrics {
            ready,
            quarantines,
            options,
            cache: Arc::new(tokio::sync::Mutex::new(None)),
        }
    }

    /// The page, from the cache while it is fresh. Concurrent callers share one render.
    pub async fn page(&self) -> Result<Arc<str>, FleetMetricsError> {
        let mut cache = self.cache.lock().await;
        if let Some((at, text)) = cache.as_ref() {
            if at.elapsed() < self.options.cache {
                return Ok(text.clone());
            }
        }
        let started = Instant::now();
        let snapshot = tokio::time::timeout(self.options.timeout, self.snapshot())
            .await
            .map_err(|_| FleetMetricsError::Timeout(self.options.timeout))??;
        let text: Arc<str> = render(&snapshot, started.elapsed()).into();
        *cache = Some((Instant::now(), text.clone()));
        Ok(text)
    }

    /// Reads the fleet's latest state from the store: four bounded queries (one row per
    /// host, component, GPU and GPU series sampled within the window).
    pub async fn snapshot(&self) -> Result<Snapshot, FleetMetricsError> {
        let ready = self.ready.get().ok_or(FleetMetricsError::NotReady)?;
        let pool = &ready.pool;
        let hosts = sqlx::query_as::<_, (String, String, f64, String, String)>(
            "SELECT host_id, state, extract(epoch FROM last_seen)::float8, agent_version, profile
             FROM hosts ORDER BY host_id",
        )
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(
            |(host, state, last_seen_seconds, agent_version, profile)| HostRow {
                host,
                online: state == "online",
                last_seen_seconds,
                agent_version,
                profile,
            },
        )
        .collect();
        let components = sqlx::query_as::<_, (String, String, String, bool)>(
            "SELECT host_id, name, state, critical FROM components ORDER BY host_id, name",
        )
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|(host, component, state, critical)| ComponentRow {
            host,
            component,
            state,
            critical,
        })
        .collect();
        let gpus = sqlx::query_as::<_, (String, i32, String, String, i64)>(
            "SELECT host_id, gpu_index, uuid, name, memory_total_bytes FROM gpus
             ORDER BY host_id, gpu_index",
        )
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|(host, gpu, uuid, model, memory_total_bytes)| GpuRow {
            host,
            gpu,
            uuid,
            model,
            memory_total_bytes,
        })
        .collect();
        // The newest sample of each GPU series within the window: the samples' BRIN
        // index on ts bounds the scan to the window; the metric filter is a hash join
        // on the (small) series dictionary.
        let metrics: Vec<&str> = GPU_GAUGES.iter().map(|g| g.source).collect();
        let window = chrono::Duration::from_std(self.options.window)
            .unwrap_or_else(|_| chrono::Duration::seconds(15));
        let since = chrono::Utc::now() - window;
        let values = sqlx::query_as::<
            _,
            (
                String,
                String,
                Option<String>,
                Option<String>,
                Option<String>,
                f64,
            ),
        >(
            "SELECT DISTINCT ON (s.series_id)
                    se.host_id, se.metric, se.labels->>'gpu', se.labels->>'engine',
                    se.labels->>'sensor', s.value
             FROM samples s JOIN series se ON se.series_id = s.series_id
             WHERE s.ts >= $1 AND se.metric = ANY($2)
             ORDER BY s.series_id, s.ts DESC",
        )
        .bind(since)
        .bind(&metrics)
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|(host, metric, gpu, engine, sensor, value)| GpuValue {
            host,
            metric,
            gpu,
            engine,
            sensor,
            value,
        })
        .collect();
        let (quarantines, quarantine_error) = match self.quarantines.gpu_quarantines().await {
            Ok(q) => (q, None),
            Err(error) => (Vec::new(), Some(error)),
        };
        Ok(Snapshot {
            hosts,
            components,
            gpus,
            values,
            quarantines,
            quarantine_error,
        })
    }
}

/// `GET /metrics/fleet`.
pub fn router(fleet: FleetMetrics) -> Router {
    Router::new()
        .route("/metrics/fleet", get(serve))
        .with_state(fleet)
}

async fn serve(State(fleet): State<FleetMetrics>) -> Response {
    match fleet.page().await {
        Ok(text) => ([(header::CONTENT_TYPE, TEXT_FORMAT)], text.to_string()).into_response(),
        Err(error) => {
            tracing::warn!(%error, "fleet metrics not rendered");
            (StatusCode::SERVICE_UNAVAILABLE, error.to_string()).into_response()
        }
    }
}

/// The fleet page in Prometheus' text format (0.0.4).
pub fn render(s: &Snapshot, took: Duration) -> String {
    let mut out = String::with_capacity(256 + 160 * (s.hosts.len() + s.values.len()));
    let mut page = Page { out: &mut out };

    page.family(
        "razar_fleet_host_up",
        "gauge",
        "1 while the host's agent is connected (online), 0 once it is lost.",
    );
    for h in &s.hosts {
        page.sample(
            "razar_fleet_host_up",
            &[("host", &h.host)],
            if h.online { 1.0 } else { 0.0 },
        );
    }
    page.family(
        "razar_fleet_host_last_seen_timestamp_seconds",
        "gauge",
        "When the host was last heard from (Unix time).",
    );
    for h in &s.hosts {
        page.sample(
            "razar_fleet_host_last_seen_timestamp_seconds",
            &[("host", &h.host)],
            h.last_seen_seconds,
        );
    }
    page.family(
        "razar_fleet_host_info",
        "gauge",
        "The host's agent version and profile (always 1).",
    );
    for h in &s.hosts {
        page.sample(
            "razar_fleet_host_info",
            &[
                ("host", &h.host),
                ("agent_version", capped(&h.agent_version)),
                ("profile", capped(&h.profile)),
            ],
            1.0,
        );
    }

    page.family(
        "razar_fleet_component_state",
        "gauge",
        "The component's current state (1; one series per component).",
    );
    for c in &s.components {
        page.sample(
            "razar_fleet_component_state",
            &[
                ("host", &c.host),
                ("component", &c.component),
                ("state", component_state(&c.state)),
            ],
            1.0,
        );
    }
    page.family(
        "razar_fleet_component_critical",
        "gauge",
        "1 for a component marked critical, else 0.",
    );
    for c in &s.components {
        page.sample(
            "razar_fleet_component_critical",
            &[("host", &c.host), ("component", &c.component)],
            if c.critical { 1.0 } else { 0.0 },
        );
    }
    page.family(
        "razar_fleet_components",
        "gauge",
        "Components in the fleet by state (every state, zeros included).",
    );
    for state in ComponentState::ALL
        .iter()
        .map(|s| s.as_str())
        .chain(["unknown"])
    {
        let n = s
            .components
            .iter()
            .filter(|c| component_state(&c.state) == state)
            .count();
        page.sample("razar_fleet_components", &[("state", state)], n as f64);
    }

    page.family(
        "razar_fleet_gpu_info",
        "gauge",
        "A GPU of the host's inventory, with its UUID and model (always 1).",
    );
    for g in &s.gpus {
        let gpu = g.gpu.to_string();
        page.sample(
            "razar_fleet_gpu_info",
            &[
                ("host", &g.host),
                ("gpu", &gpu),
                ("uuid", capped(&g.uuid)),
                ("model", capped(&g.model)),
            ],
            1.0,
        );
    }
    page.family(
        "razar_fleet_gpu_memory_total_bytes",
        "gauge",
        "GPU memory size, from the inventory.",
    );
    for g in &s.gpus {
        let gpu = g.gpu.to_string();
        page.sample(
            "razar_fleet_gpu_memory_total_bytes",
            &[("host", &g.host), ("gpu", &gpu)],
            g.memory_total_bytes as f64,
        );
    }
    for gauge in &GPU_GAUGES {
        page.family(gauge.name, "gauge", gauge.help);
        let mut rows: Vec<(&str, u32, Option<&str>, f64)> = s
            .values
            .iter()
            .filter(|v| v.metric == gauge.source && v.value.is_finite())
            .filter_map(|v| {
                // A GPU index that is not a small number is not a GPU this page shows.
                let gpu = v.gpu.as_deref()?.parse::<u32>().ok()?;
                let extra = match gauge.label {
                    None => None,
                    Some((name, allowed)) => {
                        let value = match name {
                            "engine" => v.engine.as_deref(),
                            _ => v.sensor.as_deref(),
                        }?;
                        Some(*allowed.iter().find(|a| **a == value)?)
                    }
                };
                Some((v.host.as_str(), gpu, extra, v.value))
            })
            .collect();
        rows.sort_by(|a, b| (a.0, a.1, a.2).cmp(&(b.0, b.1, b.2)));
        // Two series for one label set (an agent that renamed its labels): the first.
        rows.dedup_by(|a, b| (a.0, a.1, a.2) == (b.0, b.1, b.2));
        for (host, gpu, extra, value) in rows {
            let gpu = gpu.to_string();
            let mut labels = vec![("host", host), ("gpu", gpu.as_str())];
            if let (Some((name, _)), Some(extra)) = (gauge.label, extra) {
                labels.push((name, extra));
            }
            page.sample(gauge.name, &labels, value);
        }
    }

    page.family(
        "razar_fleet_gpu_quarantine_state",
        "gauge",
        "A GPU out of normal service: quarantined, on probation or awaiting inspection (1).",
    );
    let mut quarantines: Vec<&GpuQuarantine> = s.quarantines.iter().collect();
    quarantines.sort_by(|a, b| (&a.host, a.gpu).cmp(&(&b.host, b.gpu)));
    quarantines.dedup_by(|a, b| (&a.host, a.gpu) == (&b.host, b.gpu));
    for q in quarantines {
        let gpu = q.gpu.to_string();
        page.sample(
            "razar_fleet_gpu_quarantine_state",
            &[
                ("host", &q.host),
                ("gpu", &gpu),
                ("state", q.state.as_str()),
            ],
            1.0,
        );
    }
    page.family(
        "razar_fleet_gpus_quarantined",
        "gauge",
        "GPUs in the fleet by quarantine state (every state, zeros included).",
    );
    for state in GpuQuarantineState::ALL {
        let n = s.quarantines.iter().filter(|q| q.state == state).count();
        page.sample(
            "razar_fleet_gpus_quarantined",
            &[("state", state.as_str())],
            n as f64,
        );
    }
    page.family(
        "razar_fleet_quarantine_source_up",
        "gauge",
        "1 when the GPU quarantine states could be read for this page, else 0.",
    );
    page.sample(
        "razar_fleet_quarantine_source_up",
        &[],
        if s.quarantine_error.is_some() {
            0.0
        } else {
            1.0
        },
    );
    page.family(
        "razar_fleet_render_seconds",
        "gauge",
        "How long the queries behind this page took.",
    );
    page.sample("razar_fleet_render_seconds", &[], took.as_secs_f64());
    out
}

/// A component state from the store, as one of the closed set (else `unknown`).
fn component_state(state: &str) -> &'static str {
    ComponentState::ALL
        .iter()
        .map(|s| s.as_str())
        .find(|s| *s == state)
        .unwrap_or("unknown")
}

/// At most [`MAX_TEXT_LABEL`] bytes, cut on a character boundary.
fn capped(text: &str) -> &str {
    if text.len() <= MAX_TEXT_LABEL {
        return text;
    }
    let mut end = MAX_TEXT_LABEL;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

struct Page<'a> {
    out: &'a mut String,
}

impl Page<'_> {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(k);
                self.out.push_str("=\"");
                escape_label(self.out, v);
                self.out.push('"');
            }
            self.out.push('}');
        }
        self.out.push(' ');
        format_value(self.out, value);
        self.out.push('\n');
    }
}

/// Label values escape backslash, double quote and line feed.
fn escape_label(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn format_value(out: &mut String, value: f64) {
    if value.is_nan() {
        out.push_str("NaN");
    } else if value.is_infinite() {
        out.push_str(if value > 0.0 { "+Inf" } else { "-Inf" });
    } else {
        let _ = write!(out, "{value}");
    }
}

/// The collector's own gauges read at scrape time, registered once on `/metrics`:
/// ingest lag and stuck hosts, the database pool, and the seconds until the collector's
/// certificate and its CA expire (read from the configured files at each scrape, so a
/// renewal shows at once).
pub struct ScrapeGauges {
    ready: Arc<OnceLock<Ready>>,
    stuck_after: Duration,
    certificates: Vec<(&'static str, PathBuf)>,
    lag: Gauge,
    lag_known: IntGauge,
    stuck: IntGauge,
    pool: IntGaugeVec,
    pool_max: IntGauge,
    expiry: GaugeVec,
    descs: Vec<Desc>,
}

impl std::fmt::Debug for ScrapeGauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScrapeGauges")
            .field("certificates", &self.certificates)
            .finish_non_exhaustive()
    }
}

impl ScrapeGauges {
    /// `certificates`: a label (`collector`, `ca`) and the PEM file of each.
    pub fn new(
        ready: Arc<OnceLock<Ready>>,
        stuck_after: Duration,
        pool_max: u32,
        certificates: Vec<(&'static str, PathBuf)>,
    ) -> Result<ScrapeGauges, prometheus::Error> {
        let lag = Gauge::new(
            "razar_collector_ingest_lag_seconds",
            "Now minus the newest stored data of the most-behind connected host (0 until known).",
        )?;
        let lag_known = IntGauge::new(
            "razar_collector_ingest_lag_known",
            "1 once a connected host had data stored (the lag gauge means something), else 0.",
        )?;
        let stuck = IntGauge::new(
            "razar_collector_stuck_hosts",
            "Connected hosts whose unacknowledged data has not advanced for health.stuck_after.",
        )?;
        let pool = IntGaugeVec::new(
            Opts::new(
                "razar_collector_db_pool_connections",
                "Database pool connections, by state (idle, in_use).",
            ),
            &["state"],
        )?;
        let pool_max_gauge = IntGauge::new(
            "razar_collector_db_pool_max_connections",
            "Most connections the database pool opens (database.pool_size).",
        )?;
        pool_max_gauge.set(i64::from(pool_max));
        let expiry = GaugeVec::new(
            Opts::new(
                "razar_collector_certificate_expiry_seconds",
                "Seconds until the certificate expires (negative once expired), by certificate.",
            ),
            &["certificate"],
        )?;
        let descs = [
            lag.desc(),
            lag_known.desc(),
            stuck.desc(),
            pool.desc(),
            pool_max_gauge.desc(),
            expiry.desc(),
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
        Ok(ScrapeGauges {
            ready,
            stuck_after,
            certificates,
            lag,
            lag_known,
            stuck,
            pool,
            pool_max: pool_max_gauge,
            expiry,
            descs,
        })
    }
}

/// Seconds from `now` until the first certificate of a PEM file expires.
pub fn certificate_expiry_seconds(pem: &[u8], now: SystemTime) -> Option<f64> {
    let der = rustls_pemfile::certs(&mut &pem[..]).next()?.ok()?;
    let not_after = razar_shared::tls::certificate_not_after(&der).ok()?;
    Some(match not_after.duration_since(now) {
        Ok(left) => left.as_secs_f64(),
        Err(past) => -past.duration().as_secs_f64(),
    })
}

impl Collector for ScrapeGauges {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut families = Vec::new();
        if let Some(ready) = self.ready.get() {
            let report = ready.liveness.ingest_report(
                Instant::now(),
                chrono::Utc::now().timestamp_millis(),
                self.stuck_after,
            );
            self.lag.set(report.lag_seconds.unwrap_or(0.0));
            self.lag_known.set(i64::from(report.lag_seconds.is_some()));
            self.stuck
                .set(i64::try_from(report.stuck.len()).unwrap_or(i64::MAX));
            let size = i64::from(ready.pool.size());
            let idle = i64::try_from(ready.pool.num_idle()).unwrap_or(i64::MAX);
            self.pool.with_label_values(&["idle"]).set(idle);
            self.pool
                .with_label_values(&["in_use"])
                .set((size - idle).max(0));
            families.extend(self.lag.collect());
            families.extend(self.lag_known.collect());
            families.extend(self.stuck.collect());
            families.extend(self.pool.collect());
        }
        families.extend(self.pool_max.collect());
        let now = SystemTime::now();
        for (label, path) in &self.certificates {
            // An unreadable file shows no value (the TLS reload reports why).
            match std::fs::read(path)
                .ok()
                .and_then(|pem| certificate_expiry_seconds(&pem, now))
            {
                Some(left) => self.expiry.with_label_values(&[label]).set(left),
                None => {
                    let _ = self.expiry.remove_label_values(&[label]);
                }
            }
        }
        families.extend(self.expiry.collect());
        families
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        Snapshot {
            hosts: vec![
                HostRow {
                    host: "gpu-1".into(),
                    online: true,
                    last_seen_seconds: 1_700_000_000.5,
                    agent_version: "0.1.0".into(),
                    profile: "train \"big\"\nline".into(),
                },
                HostRow {
                    host: "gpu-2".into(),
                    online: false,
                    last_seen_seconds: 1_700_000_000.0,
                    agent_version: "x".repeat(200),
                    profile: "p".into(),
                },
            ],
            components: vec![
                ComponentRow {
                    host: "gpu-1".into(),
                    component: "trainer".into(),
                    state: "ready".into(),
                    critical: true,
                },
                ComponentRow {
                    host: "gpu-1".into(),
                    component: "side\\car".into(),
                    state: "exotic-new-state".into(),
                    critical: false,
                },
            ],
            gpus: vec![GpuRow {
                host: "gpu-1".into(),
                gpu: 0,
                uuid: "GPU-0".into(),
                model: "H100".into(),
                memory_total_bytes: 80 << 30,
            }],
            values: vec![
                value("razar_gpu_utilization_ratio", "0", Some("gpu"), None, 0.75),
                // Unknown engine and a GPU index that is not a number: not shown.
                value("razar_gpu_utilization_ratio", "0", Some("warp"), None, 0.1),
                value("razar_gpu_power_watts", "x", None, None, 300.0),
                value(
                    "razar_gpu_temperature_celsius",
                    "0",
                    None,
                    Some("gpu"),
                    61.0,
                ),
                value("razar_gpu_memory_used_bytes", "0", None, None, 1024.0),
                value("razar_gpu_power_watts", "0", None, None, f64::NAN),
            ],
            quarantines: vec![GpuQuarantine {
                host: "gpu-1".into(),
                gpu: 0,
                state: GpuQuarantineState::Probation,
            }],
            quarantine_error: None,
        }
    }

    fn value(
        metric: &str,
        gpu: &str,
        engine: Option<&str>,
        sensor: Option<&str>,
        v: f64,
    ) -> GpuValue {
        GpuValue {
            host: "gpu-1".into(),
            metric: metric.into(),
            gpu: Some(gpu.into()),
            engine: engine.map(Into::into),
            sensor: sensor.map(Into::into),
            value: v,
        }
    }

    #[test]
    fn render_shows_the_latest_state_with_bounded_escaped_labels() {
        let text = render(&snapshot(), Duration::from_millis(3));
        for line in [
            "razar_fleet_host_up{host=\"gpu-1\"} 1",
            "razar_fleet_host_up{host=\"gpu-2\"} 0",
            "razar_fleet_host_info{host=\"gpu-1\",agent_version=\"0.1.0\",profile=\"train \\\"big\\\"\\nline\"} 1",
            "razar_fleet_component_state{host=\"gpu-1\",component=\"trainer\",state=\"ready\"} 1",
            "razar_fleet_component_state{host=\"gpu-1\",component=\"side\\\\car\",state=\"unknown\"} 1",
            "razar_fleet_components{state=\"ready\"} 1",
            "razar_fleet_components{state=\"stopped\"} 0",
            "razar_fleet_components{state=\"unknown\"} 1",
            "razar_fleet_gpu_utilization_ratio{host=\"gpu-1\",gpu=\"0\",engine=\"gpu\"} 0.75",
            "razar_fleet_gpu_temperature_celsius{host=\"gpu-1\",gpu=\"0\",sensor=\"gpu\"} 61",
            "razar_fleet_gpu_memory_used_bytes{host=\"gpu-1\",gpu=\"0\"} 1024",
            "razar_fleet_gpu_memory_total_bytes{host=\"gpu-1\",gpu=\"0\"} 85899345920",
            "razar_fleet_gpu_quarantine_state{host=\"gpu-1\",gpu=\"0\",state=\"probation\"} 1",
            "razar_fleet_gpus_quarantined{state=\"quarantined\"} 0",
            "razar_fleet_quarantine_source_up 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        assert!(!text.contains("warp"), "{text}");
        assert!(!text.contains("razar_fleet_gpu_power_watts{"), "{text}");
        let version = text
            .lines()
            .find(|l| l.starts_with("razar_fleet_host_info{host=\"gpu-2\""))
            .expect("gpu-2 info");
        assert!(version.contains(&format!("\"{}\"", "x".repeat(MAX_TEXT_LABEL))));
        assert!(!version.contains(&"x".repeat(MAX_TEXT_LABEL + 1)));
    }

    #[test]
    fn an_empty_fleet_still_renders_every_family() {
        let text = render(&Snapshot::default(), Duration::ZERO);
        for gauge in &GPU_GAUGES {
            assert!(text.contains(&format!("# TYPE {} gauge", gauge.name)));
        }
        assert!(text.contains("razar_fleet_components{state=\"ready\"} 0"));
    }

    #[test]
    fn capped_cuts_on_a_character_boundary() {
        let text = "é".repeat(MAX_TEXT_LABEL);
        let cut = capped(&text);
        assert!(cut.len() <= MAX_TEXT_LABEL && cut.chars().all(|c| c == 'é'));
        assert_eq!(capped("short"), "short");
    }
}
