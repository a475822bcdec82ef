//! Collector configuration: one TOML file, parsed in two phases (raw serde structs
//! with `deny_unknown_fields`, then a pure validation step) by the agent config's
//! machinery, so errors follow its standard: every problem at once, each with file,
//! line, column, key path and reason. [`CollectorConfig::load_checked`] (`check` and
//! `run`) also reads and parses the TLS files the config names.

use crate::store::tokens::Role;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

/// Validated collector configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct CollectorConfig {
    /// Where the embedded PostgreSQL cluster, dev certificates and state live.
    pub data_dir: PathBuf,
    /// UDP address of the QUIC listener for agents.
    pub quic_listen: SocketAddr,
    /// TCP address of the HTTP API (health, metrics, operator API).
    pub http_listen: SocketAddr,
    pub tls: TlsPaths,
    pub database: Database,
    /// Connections in the PostgreSQL pool.
    pub pool_size: NonZeroU32,
    /// Group-commit writer tasks for telemetry (each holds at most one pool connection
    /// at a time); below `pool_size`.
    pub ingest_writers: NonZeroU32,
    /// Group-commit writers whose samples' `COPY` may run at once (the rest of their
    /// transactions overlap freely).
    pub ingest_copy_slots: NonZeroU32,
    /// Heartbeat interval asked of agents.
    pub heartbeat_interval: Duration,
    /// Missed heartbeats after which a host is marked lost.
    pub lost_after_missed: NonZeroU32,
    /// Days of history kept (whole daily partitions are dropped past it).
    pub retention_days: NonZeroU32,
    /// Raw samples older than this are compacted into per-series chunks.
    pub compact_after: Duration,
    /// Samples stamped further than this ahead of the collector's clock are refused
    /// (as are samples older than the retention).
    pub max_clock_skew: Duration,
    /// Series one host may define; definitions past it are refused.
    pub max_series_per_host: NonZeroU32,
    /// A host the store has online when the collector starts is marked lost unless it
    /// reconnects within this time (it died while the collector was down).
    pub lost_after_restart: Duration,
    /// `[silence] samples_stalled_after`: a connected host whose heartbeats arrive but
    /// whose samples stopped this long ago (a stalled sampler or NVML call) gets a
    /// `heartbeats_without_samples` event (the engine escalates it); `samples_resumed`
    /// when they come back. Default 2 min: longer than any agent's `sample_interval`
    /// plus its batching.
    pub samples_stalled_after: Duration,
    /// When `/api/v1/health` says `degraded`.
    pub health: HealthLimits,
    /// `[pulses]`: scheduled failure pulses (off by default).
    pub pulses: crate::pulses::PulsesConfig,
    /// `[engine]`: the decision loop.
    pub engine: crate::engine_loop::EngineSettings,
    /// `[notify]`: webhooks for escalations.
    pub notify: crate::notify::NotifySettings,
    /// The deployments driver (`[deployments]`).
    pub deployments: crate::deployments::DeploymentSettings,
    /// The operator API (`[api]`).
    pub api: ApiSettings,
    /// HTTPS and operator certificates on the API port (`[api.tls]`); `None`: plain
    /// HTTP (dev mode, tests).
    pub api_tls: Option<ApiTlsSettings>,
}

/// `[api.tls]`: the API port serves HTTPS; a client may present an operator
/// certificate (`razar-certs issue operator`) instead of a bearer token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiTlsSettings {
    /// The API's certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA that operator certificates must chain to (PEM).
    pub client_ca: PathBuf,
    /// CRL (DER or PEM) of `client_ca`; a revoked certificate fails the handshake.
    pub crl: Option<PathBuf>,
    /// Operator name (the certificate's `razar://operator/<name>`) → role. A valid
    /// certificate whose name is not here is refused (403), never given a default role.
    pub operators: BTreeMap<String, Role>,
}

impl ApiTlsSettings {
    /// The files as the TLS builders take them.
    pub fn files(&self) -> razar_shared::tls::ServerTlsFiles {
        razar_shared::tls::ServerTlsFiles {
            ca: self.client_ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            crls: self.crl.iter().cloned().collect(),
        }
    }
}

/// The operator API's limits (`[api]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiSettings {
    /// Requests a second per token (`api.rate_per_second`), refilling its bucket.
    pub rate_per_second: u32,
    /// Requests a token may make at once before the rate applies (`api.burst`).
    pub burst: u32,
    /// Largest request body accepted (`api.max_body_bytes`); larger ones get 413.
    pub max_body_bytes: usize,
}

impl Default for ApiSettings {
    fn default() -> ApiSettings {
        ApiSettings {
            rate_per_second: 20,
            burst: 100,
            max_body_bytes: 64 * 1024,
        }
    }
}

/// Limits past which health says `degraded` (`[health]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthLimits {
    /// A connected host whose unacknowledged data has not advanced (no commit) for this
    /// long is stuck.
    pub stuck_after: Duration,
    /// The database answering health's probe slower than this is slow.
    pub database_slow: Duration,
    /// The maintenance task (partitions, compaction, retention; every minute) must
    /// complete a run at least this often.
    pub maintenance_deadline: Duration,
}

impl Default for HealthLimits {
    /// Stuck after 2 min, slow database above 1 s, maintenance within 10 min.
    fn default() -> HealthLimits {
        HealthLimits {
            stuck_after: Duration::from_secs(120),
            database_slow: Duration::from_secs(1),
            maintenance_deadline: Duration::from_secs(600),
        }
    }
}

/// Certificate files of the collector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// DER or PEM CRL; absent means no certificate is revoked yet.
    pub crl: Option<PathBuf>,
}

/// Which PostgreSQL to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// An external server.
    Url(String),
    /// A private cluster run by the collector under `data_dir/postgres`.
    Embedded,
}

pub use razar_shared::config_support::{ConfigError, ConfigErrors};

use razar_shared::config_support::document::parse_document;
use razar_shared::config_support::files::{check_file, FileKind};
use razar_shared::config_support::ErrorCollector;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    data_dir: Option<Spanned<String>>,
    #[serde(default)]
    listen: RawListen,
    tls: Option<Spanned<RawTls>>,
    #[serde(default)]
    database: RawDatabase,
    #[serde(default)]
    heartbeat: RawHeartbeat,
    #[serde(default)]
    retention: RawRetention,
    #[serde(default)]
    ingest: RawIngest,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    pulses: crate::pulses::RawPulses,
    #[serde(default)]
    engine: RawEngine,
    #[serde(default)]
    notify: RawNotify,
    #[serde(default)]
    deployments: RawDeployments,
    #[serde(default)]
    api: RawApi,
    #[serde(default)]
    silence: RawSilence,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    rate_per_second: Option<Spanned<u32>>,
    burst: Option<Spanned<u32>>,
    max_body_bytes: Option<Spanned<u32>>,
    tls: Option<Spanned<RawApiTls>>,
}

/// `[api.tls]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApiTls {
    cert: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
    client_ca: Option<Spanned<String>>,
    crl: Option<Spanned<String>>,
    #[serde(default)]
    operators: BTreeMap<String, Spanned<String>>,
}

/// `[engine]` (the decision loop, `engine_loop.rs`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEngine {
    enabled: Option<bool>,
    tick: Option<Spanned<String>>,
    lock_key: Option<Spanned<i64>>,
    command_deadline: Option<Spanned<String>>,
    max_lag: Option<Spanned<String>>,
    batch_events: Option<Spanned<u32>>,
    xid_window: Option<Spanned<String>>,
    xid_repeat_threshold: Option<Spanned<u32>>,
    probation: Option<Spanned<String>>,
    lemon_cycles: Option<Spanned<u32>>,
    blame_window: Option<Spanned<String>>,
    blame_min_places: Option<Spanned<u32>>,
    renotify_after: Option<Spanned<String>>,
    #[serde(default)]
    breaker: RawBreaker,
}

/// `[engine.breaker]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBreaker {
    window: Option<Spanned<String>>,
    max_hosts: Option<Spanned<u32>>,
    max_gpus: Option<Spanned<u32>>,
    max_share_percent: Option<Spanned<u32>>,
    share_min_population: Option<u32>,
    cooldown: Option<Spanned<String>>,
}

/// `[notify]` and its `[[notify.webhook]]`s (`notify.rs`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotify {
    max_attempts: Option<Spanned<u32>>,
    backoff_first: Option<Spanned<String>>,
    backoff_max: Option<Spanned<String>>,
    #[serde(default)]
    webhook: Vec<RawWebhook>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    url: Spanned<String>,
    min_severity: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeployments {
    tick: Option<Spanned<String>>,
    command_deadline: Option<Spanned<String>>,
}

/// `[silence]` (session 7, "gaps"): hosts that talk but send no data.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSilence {
    samples_stalled_after: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    stuck_after: Option<Spanned<String>>,
    database_slow: Option<Spanned<String>>,
    maintenance_deadline: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    quic: Option<Spanned<String>>,
    http: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: Option<Spanned<String>>,
    cert: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
    crl: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    url: Option<Spanned<String>>,
    pool_size: Option<Spanned<u32>>,
    ingest_writers: Option<Spanned<u32>>,
    ingest_copy_slots: Option<Spanned<u32>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeartbeat {
    interval: Option<Spanned<String>>,
    lost_after_missed: Option<Spanned<u32>>,
    lost_after_restart: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetention {
    days: Option<Spanned<u32>>,
    compact_after: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIngest {
    max_clock_skew: Option<Spanned<String>>,
    max_series_per_host: Option<Spanned<u32>>,
}

/// Default QUIC port for agents.
pub const DEFAULT_QUIC_PORT: u16 = 7443;
/// Default HTTP port for the API.
pub const DEFAULT_HTTP_PORT: u16 = 7080;
/// Default group-commit writers (fewer when the pool is small: one below its size).
pub const DEFAULT_INGEST_WRITERS: u32 = 8;
/// Default `COPY`s running at once (BENCHMARKS.md, fleet load: 3 beat unlimited).
pub const DEFAULT_INGEST_COPY_SLOTS: u32 = 3;
/// Shortest `heartbeat.interval`: every agent sends one per interval.
pub const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(100);
/// Longest `heartbeat.interval`: agents are told it in milliseconds, as a `u32`.
pub const MAX_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(u32::MAX as u64);
/// Longest `retention.compact_after` (100 years): compaction computes
/// `now - compact_after` as a date, which must stay within chrono's range.
pub const MAX_COMPACT_AFTER: Duration = Duration::from_secs(36_500 * 86_400);

/// Whether validation opens the files the config names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Files {
    Skip,
    Check,
}

impl CollectorConfig {
    /// Defaults for a data dir, as used by `razar-collector dev`.
    pub fn defaults(data_dir: &Path) -> CollectorConfig {
        CollectorConfig {
            data_dir: data_dir.to_path_buf(),
            quic_listen: SocketAddr::from(([0, 0, 0, 0], DEFAULT_QUIC_PORT)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_HTTP_PORT)),
            tls: TlsPaths::in_dir(&data_dir.join("ca")),
            database: Database::Embedded,
            pool_size: NonZeroU32::new(16).unwrap_or(NonZeroU32::MIN),
            ingest_writers: NonZeroU32::new(DEFAULT_INGEST_WRITERS).unwrap_or(NonZeroU32::MIN),
            ingest_copy_slots: NonZeroU32::new(DEFAULT_INGEST_COPY_SLOTS)
                .unwrap_or(NonZeroU32::MIN),
            heartbeat_interval: Duration::from_secs(1),
            lost_after_missed: NonZeroU32::new(3).unwrap_or(NonZeroU32::MIN),
            retention_days: NonZeroU32::new(30).unwrap_or(NonZeroU32::MIN),
            compact_after: Duration::from_secs(15 * 60),
            lost_after_restart: Duration::from_secs(60),
            samples_stalled_after: Duration::from_secs(120),
            health: HealthLimits::default(),
            deployments: crate::deployments::DeploymentSettings::default(),
            api: ApiSettings::default(),
            api_tls: None,
            max_clock_skew: Duration::from_secs(5 * 60),
            max_series_per_host: NonZeroU32::new(100_000).unwrap_or(NonZeroU32::MIN),
            pulses: crate::pulses::PulsesConfig::default(),
            engine: crate::engine_loop::EngineSettings::default(),
            notify: crate::notify::NotifySettings::default(),
        }
    }

    /// What the store refuses of agents' values under this configuration: samples
    /// outside `[now - retention.days, now + ingest.max_clock_skew]`, series past
    /// `ingest.max_series_per_host`.
    pub fn ingest_rules(&self) -> crate::store::IngestRules {
        crate::store::IngestRules {
            retention: Duration::from_secs(u64::from(self.retention_days.get()) * 86_400),
            max_clock_skew: self.max_clock_skew,
            max_series_per_host: self.max_series_per_host.get(),
        }
    }

    /// Reads and validates a file; every problem is reported at once. The files it
    /// names are not opened (see [`CollectorConfig::load_checked`]).
    pub fn load(path: &Path) -> Result<CollectorConfig, ConfigErrors> {
        CollectorConfig::load_with(path, Files::Skip)
    }

    /// Reads and validates a file as `run` uses it: [`CollectorConfig::load`], and the
    /// TLS files (CA, certificate, key, CRL) are read, parsed and built into the server
    /// configuration; every problem is reported at once.
    pub fn load_checked(path: &Path) -> Result<CollectorConfig, ConfigErrors> {
        CollectorConfig::load_with(path, Files::Check)
    }

    fn load_with(path: &Path, files: Files) -> Result<CollectorConfig, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: path.to_path_buf(),
                line: 0,
                column: 0,
                key: String::new(),
                reason: format!("cannot read the file: {e}"),
            }])
        })?;
        CollectorConfig::parse_with(path, &text, files)
    }

    /// Parses and validates configuration text; `path` names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<CollectorConfig, ConfigErrors> {
        CollectorConfig::parse_with(path, text, Files::Skip)
    }

    fn parse_with(path: &Path, text: &str, files: Files) -> Result<CollectorConfig, ConfigErrors> {
        let mut v = Validator {
            c: ErrorCollector::new(path, text),
        };
        let cfg = parse_document::<RawConfig>(text, &mut v.c).map(|raw| v.build(&raw, files));
        v.c.finish(cfg)
    }
}

impl TlsPaths {
    /// The layout `razar-certs --dir DIR` writes for the collector.
    pub fn in_dir(dir: &Path) -> TlsPaths {
        TlsPaths {
            ca: dir.join("ca.pem"),
            cert: dir.join("collector.pem"),
            key: dir.join("collector.key"),
            crl: Some(dir.join("crl.pem")),
        }
    }
}

/// A TLS file the config names (or defaults to) and where.
struct TlsFile {
    key: &'static str,
    span: Option<Range<usize>>,
    path: PathBuf,
    kind: FileKind,
}

struct Validator<'a> {
    c: ErrorCollector<'a>,
}

impl Validator<'_> {
    /// Every value of `raw` over the defaults; problems are recorded, not returned.
    fn build(&mut self, raw: &RawConfig, files: Files) -> CollectorConfig {
        let v = self;
        let data_dir = raw
            .data_dir
            .as_ref()
            .map(|d| PathBuf::from(d.get_ref()))
            .unwrap_or_else(|| PathBuf::from("/var/lib/razar"));
        let mut cfg = CollectorConfig::defaults(&data_dir);
        if let Some(q) = &raw.listen.quic {
            if let Some(a) = v.addr("listen.quic", q) {
                cfg.quic_listen = a;
            }
        }
        if let Some(h) = &raw.listen.http {
            if let Some(a) = v.addr("listen.http", h) {
                cfg.http_listen = a;
            }
        }
        let tls_files = v.tls(raw, &mut cfg);
        if let Some(url) = &raw.database.url {
            let u = url.get_ref();
            if !(u.starts_with("postgres://") || u.starts_with("postgresql://")) {
                v.push(
                    "database.url",
                    url.span(),
                    "must start with postgres:// or postgresql://",
                );
            } else if let Err(e) = u.parse::<sqlx::postgres::PgConnectOptions>() {
                v.push("database.url", url.span(), format!("not a valid URL: {e}"));
            } else {
                cfg.database = Database::Url(u.clone());
            }
        }
        if let Some(n) = &raw.database.pool_size {
            if let Some(n) = v.nonzero("database.pool_size", n) {
                cfg.pool_size = n;
            }
        }
        match &raw.database.ingest_writers {
            Some(raw_writers) => {
                if let Some(n) = v.nonzero("database.ingest_writers", raw_writers) {
                    if n >= cfg.pool_size {
                        v.push(
                            "database.ingest_writers",
                            raw_writers.span(),
                            format!(
                                "must be below database.pool_size ({}): the pool also serves \
                                 series registrations, hellos and the API",
                                cfg.pool_size
                            ),
                        );
                    } else {
                        cfg.ingest_writers = n;
                    }
                }
            }
            None => {
                let fit = DEFAULT_INGEST_WRITERS.min(cfg.pool_size.get().saturating_sub(1));
                cfg.ingest_writers = NonZeroU32::new(fit).unwrap_or(NonZeroU32::MIN);
            }
        }
        if let Some(n) = &raw.database.ingest_copy_slots {
            if let Some(n) = v.nonzero("database.ingest_copy_slots", n) {
                cfg.ingest_copy_slots = n;
            }
        }
        if let Some(d) = &raw.heartbeat.interval {
            if let Some(d) = v.duration_within(
                "heartbeat.interval",
                d,
                MIN_HEARTBEAT_INTERVAL,
                MAX_HEARTBEAT_INTERVAL,
                "agents are told it in whole milliseconds, a 32-bit number",
            ) {
                cfg.heartbeat_interval = d;
            }
        }
        if let Some(n) = &raw.heartbeat.lost_after_missed {
            if let Some(n) = v.nonzero("heartbeat.lost_after_missed", n) {
                cfg.lost_after_missed = n;
            }
        }
        if let Some(n) = &raw.retention.days {
            if let Some(n) = v.nonzero("retention.days", n) {
                cfg.retention_days = n;
            }
        }
        if let Some(d) = &raw.retention.compact_after {
            if let Some(d) = v.duration_within(
                "retention.compact_after",
                d,
                Duration::from_nanos(1),
                MAX_COMPACT_AFTER,
                "compaction computes now - compact_after as a date",
            ) {
                cfg.compact_after = d;
            }
        }
        if let Some(d) = &raw.ingest.max_clock_skew {
            if let Some(d) = v.duration("ingest.max_clock_skew", d) {
                cfg.max_clock_skew = d;
            }
        }
        if let Some(n) = &raw.ingest.max_series_per_host {
            if let Some(n) = v.nonzero("ingest.max_series_per_host", n) {
                cfg.max_series_per_host = n;
            }
        }
        if let Some(d) = &raw.heartbeat.lost_after_restart {
            if let Some(d) = v.duration("heartbeat.lost_after_restart", d) {
                cfg.lost_after_restart = d;
            }
        }
        if let Some(d) = &raw.silence.samples_stalled_after {
            if let Some(d) = v.duration("silence.samples_stalled_after", d) {
                cfg.samples_stalled_after = d;
            }
        }
        let health = [
            (
                "health.stuck_after",
                &raw.health.stuck_after,
                &mut cfg.health.stuck_after,
            ),
            (
                "health.database_slow",
                &raw.health.database_slow,
                &mut cfg.health.database_slow,
            ),
            (
                "health.maintenance_deadline",
                &raw.health.maintenance_deadline,
                &mut cfg.health.maintenance_deadline,
            ),
        ];
        for (key, raw, value) in health {
            if let Some(d) = raw.as_ref().and_then(|d| v.duration(key, d)) {
                *value = d;
            }
        }
        cfg.pulses = crate::pulses::validate(&raw.pulses, &mut |span, key, reason| {
            v.c.push(span, key, reason)
        });
        v.engine(&raw.engine, &mut cfg.engine);
        v.notify(&raw.notify, &mut cfg.notify);
        let deployments = [
            (
                "deployments.tick",
                &raw.deployments.tick,
                &mut cfg.deployments.tick,
            ),
            (
                "deployments.command_deadline",
                &raw.deployments.command_deadline,
                &mut cfg.deployments.command_deadline,
            ),
        ];
        for (key, raw, value) in deployments {
            if let Some(d) = raw.as_ref().and_then(|d| v.duration(key, d)) {
                *value = d;
            }
        }
        if let Some(n) = &raw.api.rate_per_second {
            if let Some(n) = v.nonzero("api.rate_per_second", n) {
                cfg.api.rate_per_second = n.get();
            }
        }
        if let Some(n) = &raw.api.burst {
            if let Some(n) = v.nonzero("api.burst", n) {
                cfg.api.burst = n.get();
            }
        }
        if let Some(n) = &raw.api.max_body_bytes {
            if let Some(n) = v.nonzero("api.max_body_bytes", n) {
                cfg.api.max_body_bytes = usize::try_from(n.get()).unwrap_or(usize::MAX);
            }
        }
        if let Some(t) = &raw.api.tls {
            cfg.api_tls = v.api_tls(t, files);
        }
        if files == Files::Check {
            v.check_tls_files(&tls_files, &cfg.tls);
        }
        cfg
    }

    /// `[api.tls]`; with `Files::Check` its files are read and the HTTPS config built.
    fn api_tls(&mut self, raw: &Spanned<RawApiTls>, files: Files) -> Option<ApiTlsSettings> {
        let table = raw.span();
        let raw = raw.get_ref();
        let mut ok = true;
        let mut named = Vec::new();
        let mut need = |value: &Option<Spanned<String>>, key: &'static str, kind, required| {
            match value {
                Some(p) if p.get_ref().is_empty() => {
                    self.push(key, p.span(), "must not be empty");
                    ok = false;
                }
                Some(p) => {
                    named.push(TlsFile::new(key, Some(p.span()), p.get_ref(), kind));
                    return Some(PathBuf::from(p.get_ref()));
                }
                None if required => {
                    self.push(key, table.clone(), "is required in [api.tls]");
                    ok = false;
                }
                None => {}
            }
            None
        };
        let cert = need(&raw.cert, "api.tls.cert", FileKind::Certificates, true);
        let key = need(&raw.key, "api.tls.key", FileKind::PrivateKey, true);
        let client_ca = need(
            &raw.client_ca,
            "api.tls.client_ca",
            FileKind::CaCertificates,
            true,
        );
        let crl = need(&raw.crl, "api.tls.crl", FileKind::Crl, false);
        let mut operators = BTreeMap::new();
        for (name, role) in &raw.operators {
            let key = format!("api.tls.operators.{name}");
            if let Err(reason) = razar_shared::tls::validate_name(name) {
                self.push(&key, role.span(), format!("not an operator name: {reason}"));
                ok = false;
                continue;
            }
            match Role::parse(role.get_ref()) {
                Some(r) => {
                    operators.insert(name.clone(), r);
                }
                None => {
                    self.push(
                        &key,
                        role.span(),
                        format!(
                            "unknown role {:?}: viewer, operator or admin",
                            role.get_ref()
                        ),
                    );
                    ok = false;
                }
            }
        }
        let (Some(cert), Some(key), Some(client_ca), true) = (cert, key, client_ca, ok) else {
            return None;
        };
        let settings = ApiTlsSettings {
            cert,
            key,
            client_ca,
            crl,
            operators,
        };
        if files == Files::Check {
            let mut usable = true;
            for file in &named {
                if let Err(reason) = check_file(&file.path, file.kind) {
                    self.c.push(file.span.clone(), file.key, reason);
                    usable = false;
                }
            }
            if usable {
                if let Err(e) = razar_shared::tls::api_server_config_from_files(&settings.files()) {
                    let key = match e {
                        razar_shared::tls::TlsError::Verifier(_) => "api.tls.crl",
                        _ => "api.tls.key",
                    };
                    let span = named
                        .iter()
                        .find(|f| f.key == key)
                        .and_then(|f| f.span.clone());
                    self.c.push(span, key, e.to_string());
                }
            }
        }
        Some(settings)
    }

    /// `[engine]` into `e`.
    fn engine(&mut self, raw: &RawEngine, e: &mut crate::engine_loop::EngineSettings) {
        if let Some(on) = raw.enabled {
            e.enabled = on;
        }
        if let Some(k) = &raw.lock_key {
            match crate::store::locks::reserved_by(*k.get_ref()) {
                Some(task) => self.push(
                    "engine.lock_key",
                    k.span(),
                    format!("is the advisory lock key of {task}: pick another"),
                ),
                None => e.lock_key = *k.get_ref(),
            }
        }
        let durations = [
            ("engine.tick", &raw.tick, &mut e.tick),
            (
                "engine.command_deadline",
                &raw.command_deadline,
                &mut e.command_deadline,
            ),
            ("engine.max_lag", &raw.max_lag, &mut e.max_lag),
        ];
        for (key, raw, value) in durations {
            if let Some(d) = raw.as_ref().and_then(|d| self.duration(key, d)) {
                *value = d;
            }
        }
        if let Some(n) = raw
            .batch_events
            .as_ref()
            .and_then(|n| self.nonzero("engine.batch_events", n))
        {
            e.batch_events = n.get();
        }
        let r = &mut e.rules;
        let millis = [
            ("engine.xid_window", &raw.xid_window, &mut r.xid_window_ms),
            ("engine.probation", &raw.probation, &mut r.probation_ms),
            (
                "engine.blame_window",
                &raw.blame_window,
                &mut r.blame_window_ms,
            ),
            (
                "engine.renotify_after",
                &raw.renotify_after,
                &mut r.renotify_after_ms,
            ),
            (
                "engine.breaker.window",
                &raw.breaker.window,
                &mut r.breaker.window_ms,
            ),
            (
                "engine.breaker.cooldown",
                &raw.breaker.cooldown,
                &mut r.breaker.cooldown_ms,
            ),
        ];
        for (key, raw, value) in millis {
            if let Some(d) = raw.as_ref().and_then(|d| self.duration(key, d)) {
                match i64::try_from(d.as_millis()) {
                    Ok(ms) => *value = ms,
                    Err(_) => self.push(
                        key,
                        raw.as_ref().map(|r| r.span()).unwrap_or_default(),
                        "too long",
                    ),
                }
            }
        }
        let counts = [
            (
                "engine.xid_repeat_threshold",
                &raw.xid_repeat_threshold,
                &mut r.xid_repeat_threshold,
            ),
            (
                "engine.lemon_cycles",
                &raw.lemon_cycles,
                &mut r.lemon_cycles,
            ),
            (
                "engine.blame_min_places",
                &raw.blame_min_places,
                &mut r.blame_min_places,
            ),
            (
                "engine.breaker.max_hosts",
                &raw.breaker.max_hosts,
                &mut r.breaker.max_hosts,
            ),
            (
                "engine.breaker.max_gpus",
                &raw.breaker.max_gpus,
                &mut r.breaker.max_gpus,
            ),
        ];
        for (key, raw, value) in counts {
            if let Some(n) = raw.as_ref().and_then(|n| self.nonzero(key, n)) {
                *value = n.get();
            }
        }
        if let Some(p) = &raw.breaker.max_share_percent {
            if (1..=100).contains(p.get_ref()) {
                r.breaker.max_share_percent = *p.get_ref();
            } else {
                self.push(
                    "engine.breaker.max_share_percent",
                    p.span(),
                    "must be within 1..=100",
                );
            }
        }
        if let Some(n) = raw.breaker.share_min_population {
            r.breaker.share_min_population = n;
        }
    }

    /// `[notify]` into `n`.
    fn notify(&mut self, raw: &RawNotify, n: &mut crate::notify::NotifySettings) {
        if let Some(a) = raw
            .max_attempts
            .as_ref()
            .and_then(|a| self.nonzero("notify.max_attempts", a))
        {
            n.max_attempts = a.get();
        }
        if let Some(d) = raw
            .backoff_first
            .as_ref()
            .and_then(|d| self.duration("notify.backoff_first", d))
        {
            n.backoff_first = d;
        }
        if let Some(d) = raw
            .backoff_max
            .as_ref()
            .and_then(|d| self.duration("notify.backoff_max", d))
        {
            n.backoff_max = d;
        }
        for hook in &raw.webhook {
            let url = hook.url.get_ref();
            // The HTTP client is built without TLS: plain http:// only (an https:// URL
            // would fail at every attempt).
            if !url.starts_with("http://") || url.contains(char::is_whitespace) {
                self.push(
                    "notify.webhook.url",
                    hook.url.span(),
                    "must be an http:// URL (https is not supported yet)",
                );
                continue;
            }
            let min_severity = match hook
                .min_severity
                .as_ref()
                .map(|s| (s, s.get_ref().as_str()))
            {
                None => razar_shared::domain::Severity::Warning,
                Some((_, "info")) => razar_shared::domain::Severity::Info,
                Some((_, "warning")) => razar_shared::domain::Severity::Warning,
                Some((_, "critical")) => razar_shared::domain::Severity::Critical,
                Some((s, _)) => {
                    self.push(
                        "notify.webhook.min_severity",
                        s.span(),
                        "must be info, warning or critical",
                    );
                    continue;
                }
            };
            let timeout = match &hook.timeout {
                None => Duration::from_secs(10),
                Some(t) => match self.duration("notify.webhook.timeout", t) {
                    Some(d) => d,
                    None => continue,
                },
            };
            n.webhooks.push(crate::notify::Webhook {
                url: url.clone(),
                min_severity,
                timeout,
            });
        }
    }

    /// `[tls]` into `cfg.tls`; returns the files to check, written or defaulted.
    fn tls(&mut self, raw: &RawConfig, cfg: &mut CollectorConfig) -> Vec<TlsFile> {
        let Some(tls) = &raw.tls else {
            // Not set: the layout of `razar-certs` under data_dir/ca.
            let t = &cfg.tls;
            let mut files = vec![
                TlsFile::new("tls.ca", None, &t.ca, FileKind::CaCertificates),
                TlsFile::new("tls.cert", None, &t.cert, FileKind::Certificates),
                TlsFile::new("tls.key", None, &t.key, FileKind::PrivateKey),
            ];
            if let Some(crl) = &t.crl {
                files.push(TlsFile::new("tls.crl", None, crl, FileKind::Crl));
            }
            return files;
        };
        let table = tls.span();
        let tls = tls.get_ref();
        let mut files = Vec::new();
        let mut need = |value: &Option<Spanned<String>>, key: &'static str, kind| {
            match value {
                Some(p) if p.get_ref().is_empty() => {
                    self.push(key, p.span(), "must not be empty");
                }
                Some(p) => files.push(TlsFile::new(key, Some(p.span()), p.get_ref(), kind)),
                None => self.push(key, table.clone(), "is required in [tls]"),
            }
            value
                .as_ref()
                .map(|p| PathBuf::from(p.get_ref()))
                .unwrap_or_default()
        };
        let ca = need(&tls.ca, "tls.ca", FileKind::CaCertificates);
        let cert = need(&tls.cert, "tls.cert", FileKind::Certificates);
        let key = need(&tls.key, "tls.key", FileKind::PrivateKey);
        let crl = tls
            .crl
            .as_ref()
            .map(|_| need(&tls.crl, "tls.crl", FileKind::Crl))
            .filter(|p| !p.as_os_str().is_empty());
        cfg.tls = TlsPaths { ca, cert, key, crl };
        files
    }

    /// Reads and parses each TLS file, then builds the server configuration from them as
    /// `run` does (a key that does not match its certificate, or a CRL the verifier
    /// refuses, shows only then).
    fn check_tls_files(&mut self, files: &[TlsFile], tls: &TlsPaths) {
        let mut usable = true;
        for file in files {
            if let Err(reason) = check_file(&file.path, file.kind) {
                let reason = match file.span {
                    Some(_) => reason,
                    None => format!("{reason} (the default: [tls] is not set)"),
                };
                self.c.push(file.span.clone(), file.key, reason);
                usable = false;
            }
        }
        let named = |kind| files.iter().any(|f| f.kind == kind);
        if !usable
            || !named(FileKind::CaCertificates)
            || !named(FileKind::Certificates)
            || !named(FileKind::PrivateKey)
        {
            return;
        }
        let server = razar_shared::tls::ServerTlsFiles {
            ca: tls.ca.clone(),
            cert: tls.cert.clone(),
            key: tls.key.clone(),
            crls: tls.crl.iter().cloned().collect(),
        };
        if let Err(e) = razar_shared::tls::server_config_from_files(&server) {
            let key = match e {
                razar_shared::tls::TlsError::Verifier(_) => "tls.crl",
                _ => "tls.key",
            };
            let span = files
                .iter()
                .find(|f| f.key == key)
                .and_then(|f| f.span.clone());
            self.c.push(span, key, e.to_string());
        }
    }

    fn push(&mut self, key: &str, span: Range<usize>, reason: impl Into<String>) {
        self.c.push(Some(span), key, reason);
    }

    fn addr(&mut self, key: &str, value: &Spanned<String>) -> Option<SocketAddr> {
        match value.get_ref().parse() {
            Ok(a) => Some(a),
            Err(e) => {
                self.push(
                    key,
                    value.span(),
                    format!("not an address like 127.0.0.1:7080: {e}"),
                );
                None
            }
        }
    }

    fn duration(&mut self, key: &str, value: &Spanned<String>) -> Option<Duration> {
        match humantime::parse_duration(value.get_ref()) {
            Ok(d) if !d.is_zero() => Some(d),
            Ok(_) => {
                self.push(key, value.span(), "must be greater than zero");
                None
            }
            Err(e) => {
                self.push(
                    key,
                    value.span(),
                    format!("not a duration like \"1s\" or \"15m\": {e}"),
                );
                None
            }
        }
    }

    /// A duration from `min` to `max`; `why` says what needs the bound.
    fn duration_within(
        &mut self,
        key: &str,
        value: &Spanned<String>,
        min: Duration,
        max: Duration,
        why: &str,
    ) -> Option<Duration> {
        let d = self.duration(key, value)?;
        if d < min {
            self.push(
                key,
                value.span(),
                format!("must be at least {}", humantime::format_duration(min)),
            );
            None
        } else if d > max {
            self.push(
                key,
                value.span(),
                format!(
                    "must be at most {} ({why})",
                    humantime::format_duration(max)
                ),
            );
            None
        } else {
            Some(d)
        }
    }

    fn nonzero(&mut self, key: &str, value: &Spanned<u32>) -> Option<NonZeroU32> {
        let n = NonZeroU32::new(*value.get_ref());
        if n.is_none() {
            self.push(key, value.span(), "must be at least 1");
        }
        n
    }
}

impl TlsFile {
    fn new(
        key: &'static str,
        span: Option<Range<usize>>,
        path: impl Into<PathBuf>,
        kind: FileKind,
    ) -> TlsFile {
        TlsFile {
            key,
            span,
            path: path.into(),
            kind,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_err(text: &str, expected: &[(usize, &str, &str)]) {
        let err = CollectorConfig::parse(Path::new("c.toml"), text).unwrap_err();
        let got: Vec<(usize, &str, bool)> = err
            .0
            .iter()
            .zip(expected)
            .map(|(i, e)| (i.line, i.key.as_str(), i.reason.contains(e.2)))
            .collect();
        let want: Vec<(usize, &str, bool)> = expected.iter().map(|e| (e.0, e.1, true)).collect();
        assert_eq!(got, want, "{err}");
        assert_eq!(err.0.len(), expected.len(), "{err}");
    }

    #[test]
    fn example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/collector.example.toml");
        let cfg = CollectorConfig::load(&path).unwrap();
        assert_eq!(cfg.heartbeat_interval, Duration::from_secs(1));
        assert_eq!(cfg.lost_after_missed.get(), 3);
        assert!(matches!(cfg.database, Database::Url(_)));
        assert_eq!(cfg.ingest_writers.get(), 8);
        assert_eq!(cfg.api_tls, None);
        // The commented-out `[api.tls]` example parses once uncommented.
        let text = std::fs::read_to_string(&path).unwrap();
        let mut in_api_tls = false;
        let uncommented: Vec<String> = text
            .lines()
            .map(|l| {
                in_api_tls = (in_api_tls && l.starts_with('#')) || l == "#[api.tls]";
                match in_api_tls {
                    true => l.trim_start_matches('#').to_owned(),
                    false => l.to_owned(),
                }
            })
            .collect();
        let cfg = CollectorConfig::parse(&path, &uncommented.join("\n")).unwrap();
        let api_tls = cfg.api_tls.unwrap();
        assert_eq!(api_tls.operators.len(), 3);
        assert_eq!(api_tls.operators.get("bob"), Some(&Role::Operator));
    }

    #[test]
    fn empty_config_uses_defaults_and_embedded_database() {
        let cfg = CollectorConfig::parse(Path::new("c.toml"), "").unwrap();
        assert_eq!(cfg.database, Database::Embedded);
        assert_eq!(cfg.http_listen.port(), DEFAULT_HTTP_PORT);
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        check_err(
            "\n[listen]\nquick = \"x\"\n",
            &[(3, "listen.quick", "unknown field")],
        );
    }

    #[test]
    fn shape_errors_are_all_reported_with_their_key_path() {
        // Before: the first serde error stopped parsing and its key was a token taken
        // from the message (`quick`, or a value).
        check_err(
            "[listen]\nquick = \"x\"\n[heartbeat]\ninterval = 5\n[database]\npool_size = -1\n\
             [retention]\ndays = \"30\"\n",
            &[
                (2, "listen.quick", "unknown field"),
                (4, "heartbeat.interval", "string"),
                (6, "database.pool_size", "u32"),
                (8, "retention.days", "u32"),
            ],
        );
    }

    #[test]
    fn durations_are_bounded_as_run_uses_them() {
        check_err(
            "[heartbeat]\ninterval = \"50ms\"\n[retention]\ncompact_after = \"1000000years\"\n",
            &[
                (2, "heartbeat.interval", "at least 100ms"),
                (4, "retention.compact_after", "at most"),
            ],
        );
        check_err(
            "[heartbeat]\ninterval = \"50days\"\n",
            &[(2, "heartbeat.interval", "32-bit")],
        );
        let ok = CollectorConfig::parse(
            Path::new("c.toml"),
            "[heartbeat]\ninterval = \"100ms\"\n[retention]\ncompact_after = \"36500days\"\n",
        )
        .unwrap();
        assert_eq!(ok.heartbeat_interval, MIN_HEARTBEAT_INTERVAL);
        assert_eq!(ok.compact_after, MAX_COMPACT_AFTER);
    }

    #[test]
    fn database_url_is_parsed_as_run_parses_it() {
        check_err(
            "[database]\nurl = \"postgres://db.example:99999/razar\"\n",
            &[(2, "database.url", "not a valid URL")],
        );
    }

    #[test]
    fn tls_keys_are_required_and_named() {
        check_err(
            "[tls]\nca = \"\"\ncert = \"c.pem\"\n",
            &[
                (1, "tls.key", "is required"),
                (2, "tls.ca", "must not be empty"),
            ],
        );
    }

    #[test]
    fn every_semantic_error_reported_at_once() {
        let text = "[listen]\nquic = \"nope\"\n[heartbeat]\ninterval = \"0s\"\nlost_after_missed = 0\n[database]\nurl = \"mysql://x\"\n";
        check_err(
            text,
            &[
                (2, "listen.quic", "not an address"),
                (4, "heartbeat.interval", "greater than zero"),
                (5, "heartbeat.lost_after_missed", "at least 1"),
                (7, "database.url", "postgres://"),
            ],
        );
    }

    #[test]
    fn ingest_writers_default_fits_the_pool_and_must_stay_below_it() {
        let parse = |text: &str| CollectorConfig::parse(Path::new("c.toml"), text);
        assert_eq!(parse("").unwrap().ingest_writers.get(), 8);
        let small = parse("[database]\npool_size = 3\n").unwrap();
        assert_eq!(small.ingest_writers.get(), 2);
        let set = parse("[database]\npool_size = 8\ningest_writers = 6\n").unwrap();
        assert_eq!(set.ingest_writers.get(), 6);
        check_err(
            "[database]\npool_size = 4\ningest_writers = 4\n",
            &[(3, "database.ingest_writers", "below database.pool_size (4)")],
        );
        check_err(
            "[database]\ningest_writers = 0\n",
            &[(2, "database.ingest_writers", "at least 1")],
        );
    }

    #[test]
    fn ingest_copy_slots_default_and_bounds() {
        let parse = |text: &str| CollectorConfig::parse(Path::new("c.toml"), text);
        assert_eq!(parse("").unwrap().ingest_copy_slots.get(), 3);
        let set = parse("[database]\ningest_copy_slots = 5\n").unwrap();
        assert_eq!(set.ingest_copy_slots.get(), 5);
        check_err(
            "[database]\ningest_copy_slots = 0\n",
            &[(2, "database.ingest_copy_slots", "at least 1")],
        );
    }

    #[test]
    fn health_limits_and_lost_after_restart() {
        let parse = |text: &str| CollectorConfig::parse(Path::new("c.toml"), text);
        let d = parse("").unwrap();
        assert_eq!(d.health, HealthLimits::default());
        assert_eq!(d.lost_after_restart, Duration::from_secs(60));
        let set = parse(
            "[heartbeat]\nlost_after_restart = \"5m\"\n[health]\nstuck_after = \"30s\"\n\
             database_slow = \"250ms\"\nmaintenance_deadline = \"1h\"\n",
        )
        .unwrap();
        assert_eq!(set.lost_after_restart, Duration::from_secs(300));
        assert_eq!(d.samples_stalled_after, Duration::from_secs(120));
        let silence = parse("[silence]\nsamples_stalled_after = \"45s\"\n").expect("valid");
        assert_eq!(silence.samples_stalled_after, Duration::from_secs(45));
        assert_eq!(
            set.health,
            HealthLimits {
                stuck_after: Duration::from_secs(30),
                database_slow: Duration::from_millis(250),
                maintenance_deadline: Duration::from_secs(3_600),
            }
        );
        check_err(
            "[health]\nstuck_after = \"0s\"\ndatabase_slow = \"soon\"\n",
            &[
                (2, "health.stuck_after", "greater than zero"),
                (3, "health.database_slow", "not a duration"),
            ],
        );
    }

    #[test]
    fn engine_and_notify_sections() {
        let parse = |text: &str| CollectorConfig::parse(Path::new("c.toml"), text);
        let d = parse("").unwrap();
        assert_eq!(d.engine, crate::engine_loop::EngineSettings::default());
        assert!(d.notify.webhooks.is_empty());
        let set = parse(
            "[engine]\nenabled = false\ntick = \"250ms\"\nprobation = \"5m\"\n\
             blame_min_places = 1\n[engine.breaker]\nmax_hosts = 3\ncooldown = \"1m\"\n\
             [notify]\nmax_attempts = 4\nbackoff_first = \"2s\"\n\
             [[notify.webhook]]\nurl = \"http://h:1/x\"\nmin_severity = \"critical\"\n",
        )
        .unwrap();
        assert!(!set.engine.enabled);
        assert_eq!(set.engine.tick, Duration::from_millis(250));
        assert_eq!(set.engine.rules.probation_ms, 300_000);
        assert_eq!(set.engine.rules.blame_min_places, 1);
        assert_eq!(set.engine.rules.breaker.max_hosts, 3);
        assert_eq!(set.engine.rules.breaker.cooldown_ms, 60_000);
        assert_eq!(set.notify.max_attempts, 4);
        assert_eq!(set.notify.backoff_first, Duration::from_secs(2));
        assert_eq!(set.notify.webhooks.len(), 1);
        assert_eq!(
            set.notify.webhooks[0].min_severity,
            razar_shared::domain::Severity::Critical
        );
        check_err(
            "[engine]\nlemon_cycles = 0\n[engine.breaker]\nmax_share_percent = 101\n\
             [[notify.webhook]]\nurl = \"ftp://x\"\n[[notify.webhook]]\nurl = \"http://y\"\n\
             min_severity = \"loud\"\n",
            &[
                (2, "engine.lemon_cycles", "at least 1"),
                (4, "engine.breaker.max_share_percent", "1..=100"),
                (6, "notify.webhook.url", "http"),
                (
                    9,
                    "notify.webhook.min_severity",
                    "info, warning or critical",
                ),
            ],
        );
    }

    #[test]
    fn api_settings_default_and_bounds() {
        let parse = |text: &str| CollectorConfig::parse(Path::new("c.toml"), text);
        assert_eq!(parse("").unwrap().api, ApiSettings::default());
        let set = parse("[api]\nrate_per_second = 5\nburst = 7\nmax_body_bytes = 1024\n").unwrap();
        assert_eq!(
            set.api,
            ApiSettings {
                rate_per_second: 5,
                burst: 7,
                max_body_bytes: 1024,
            }
        );
        check_err(
            "[api]\nrate_per_second = 0\nburst = 0\nmax_body_bytes = 0\n",
            &[
                (2, "api.rate_per_second", "at least 1"),
                (3, "api.burst", "at least 1"),
                (4, "api.max_body_bytes", "at least 1"),
            ],
        );
    }

    #[test]
    fn api_tls_section_is_optional_and_checked() {
        let parse = |text: &str| CollectorConfig::parse(Path::new("c.toml"), text);
        assert_eq!(parse("").unwrap().api_tls, None);
        let set = parse(
            "[api.tls]\ncert = \"a.pem\"\nkey = \"a.key\"\nclient_ca = \"ca.pem\"\n\
             [api.tls.operators]\nalice = \"admin\"\nbob = \"viewer\"\n",
        )
        .unwrap()
        .api_tls
        .unwrap();
        assert_eq!(set.cert, PathBuf::from("a.pem"));
        assert_eq!(set.client_ca, PathBuf::from("ca.pem"));
        assert_eq!(set.crl, None);
        assert_eq!(set.operators.get("alice"), Some(&Role::Admin));
        assert_eq!(set.operators.get("bob"), Some(&Role::Viewer));
        check_err(
            "[api.tls]\ncert = \"\"\ncrl = \"c.der\"\n[api.tls.operators]\nalice = \"root\"\n",
            &[
                (1, "api.tls.key", "is required in [api.tls]"),
                (1, "api.tls.client_ca", "is required in [api.tls]"),
                (2, "api.tls.cert", "must not be empty"),
                (5, "api.tls.operators.alice", "unknown role \"root\""),
            ],
        );
    }

    #[test]
    fn api_tls_files_are_read_when_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        let text = format!(
            "[tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/c.pem\"\nkey = \"{d}/c.key\"\n\
             [api.tls]\ncert = \"{d}/missing.pem\"\nkey = \"{d}/c.key\"\nclient_ca = \"{d}/ca.pem\"\n",
            d = dir.path().display()
        );
        std::fs::write(&path, text).unwrap();
        let err = CollectorConfig::load_checked(&path).unwrap_err();
        let api: Vec<_> = err
            .0
            .iter()
            .filter(|e| e.key.starts_with("api.tls"))
            .collect();
        assert!(
            api.iter().any(|e| e.key == "api.tls.cert"
                && e.line == 6
                && e.reason.contains("missing.pem")),
            "{err}"
        );
    }

    #[test]
    fn ingest_rules_default_and_bounds() {
        let parse = |text: &str| CollectorConfig::parse(Path::new("c.toml"), text);
        let rules = parse("").unwrap().ingest_rules();
        assert_eq!(rules, crate::store::IngestRules::default());
        let set = parse(
            "[retention]\ndays = 2\n[ingest]\nmax_clock_skew = \"30s\"\nmax_series_per_host = 10\n",
        )
        .unwrap()
        .ingest_rules();
        assert_eq!(
            set,
            crate::store::IngestRules {
                retention: Duration::from_secs(2 * 86_400),
                max_clock_skew: Duration::from_secs(30),
                max_series_per_host: 10,
            }
        );
        check_err(
            "[ingest]\nmax_clock_skew = \"soon\"\nmax_series_per_host = 0\n",
            &[
                (2, "ingest.max_clock_skew", "not a duration"),
                (3, "ingest.max_series_per_host", "at least 1"),
            ],
        );
    }

    #[test]
    fn engine_lock_key_may_not_take_a_reserved_key() {
        let text = format!("[engine]\nlock_key = {}\n", crate::store::locks::COMPACTION);
        check_err(
            &text,
            &[(2, "engine.lock_key", "advisory lock key of compaction")],
        );
        let ok = CollectorConfig::parse(Path::new("c.toml"), "[engine]\nlock_key = 42\n");
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn error_display_names_file() {
        let err = CollectorConfig::parse(Path::new("/etc/razar/c.toml"), "[x]").unwrap_err();
        assert!(err.to_string().starts_with("/etc/razar/c.toml:1:"), "{err}");
    }
}
