//! The collector as one unit: PostgreSQL (embedded or external), the store, the QUIC
//! ingest server, the HTTP API and the maintenance loop (partitions, compaction,
//! retention). `razar-collector run` and `razar-collector dev` both start it.

use crate::api::{self, ApiState, Ready};
use crate::config::{CollectorConfig, Database};
use crate::deployments::Deployments;
use crate::embedded_pg::{EmbeddedPg, EmbeddedPgError, EmbeddedPgOptions};
use crate::engine_loop::{DeploymentHooks, EngineHandle, EngineLoop, EngineMetrics};
use crate::fleet_metrics::{EngineQuarantines, FleetMetrics, FleetMetricsOptions, ScrapeGauges};
use crate::notify::NotifyMetrics;
use crate::server::{Collector, IngestConfig, ServerError};
use crate::store::{Store, StoreError};
use crate::supervise::Beat;
use razar_shared::protocol::SessionConfig;
use razar_shared::tls::{ServerTlsFiles, TlsError};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How often the maintenance loop runs.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(60);
/// How often the raw samples' new BRIN ranges are summarized while history is read: the
/// span a read by series still scans whole.
const SUMMARIZE_EVERY: Duration = Duration::from_millis(250);

/// Why the collector could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    #[error(transparent)]
    EmbeddedPostgres(#[from] EmbeddedPgError),
    #[error("database: {0}")]
    Store(#[from] StoreError),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("QUIC server: {0}")]
    Server(#[from] ServerError),
    #[error("cannot listen on {addr} for HTTP: {source}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("API: {0}")]
    Api(#[from] crate::api::ApiSetupError),
}

/// What [`Service::start`] starts behind the API.
struct Serving {
    config: CollectorConfig,
    pg: Option<EmbeddedPg>,
    store: Store,
    collector: Collector,
    background: Vec<JoinHandle<()>>,
    pause: crate::pulses::PauseHook,
    /// The pulse scheduler, when `[pulses]` is enabled.
    pulses: Option<JoinHandle<()>>,
    deployments: Deployments,
}

/// A running collector.
pub struct Service {
    config: CollectorConfig,
    pg: Option<EmbeddedPg>,
    store: Store,
    collector: Collector,
    http_addr: SocketAddr,
    /// `[api.tls]`: the API port's HTTPS config (reloaded with the QUIC one).
    api_tls: Option<crate::api::tls::ApiTlsConfig>,
    stop: watch::Sender<bool>,
    deployments: Deployments,
    tasks: Vec<JoinHandle<()>>,
    pause: crate::pulses::PauseHook,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("quic", &self.collector.local_addr())
            .field("http", &self.http_addr)
            .finish_non_exhaustive()
    }
}

impl Service {
    /// Serves the HTTP API at once, then starts PostgreSQL if embedded (or reaches the
    /// external one, retrying while it is down: health says `unavailable` meanwhile),
    /// migrates, and serves agents. Returns once agents are served.
    /// A blamed revision's deployment is paused through this collector's deployments.
    pub async fn start(config: CollectorConfig) -> Result<Service, ServiceError> {
        Service::start_hooked(config, None).await
    }

    /// [`Service::start`] with the engine's deployment hooks (what a blamed revision's
    /// deployment pause calls).
    pub async fn start_with(
        config: CollectorConfig,
        hooks: Arc<dyn DeploymentHooks>,
    ) -> Result<Service, ServiceError> {
        Service::start_hooked(config, Some(hooks)).await
    }

    async fn start_hooked(
        config: CollectorConfig,
        hooks: Option<Arc<dyn DeploymentHooks>>,
    ) -> Result<Service, ServiceError> {
        razar_shared::tls::install_crypto_provider();
        // TLS first: a bad certificate refuses start before anything runs.
        // The verifier records typed refusals (expired vs not yet valid, ...) for the
        // ingest server's counters.
        let refusals = razar_shared::tls::HandshakeRefusals::default();
        let tls =
            razar_shared::tls::server_config_from_files_tracked(&tls_files(&config), &refusals)?;
        let crls = tls_files(&config)
            .crls
            .iter()
            .map(|p| razar_shared::tls::load_crl_file(p))
            .collect::<Result<Vec<_>, _>>()?;

        let api_tls = config
            .api_tls
            .as_ref()
            .map(|t| crate::api::tls::ApiTlsConfig::load(t.files()))
            .transpose()?;

        let registry = prometheus::Registry::new();
        let listener = tokio::net::TcpListener::bind(config.http_listen)
            .await
            .map_err(|source| ServiceError::Http {
                addr: config.http_listen,
                source,
            })?;
        let http_addr = listener.local_addr().map_err(|source| ServiceError::Http {
            addr: config.http_listen,
            source,
        })?;
        let (stop, stop_rx) = watch::channel(false);
        let mut api_state = ApiState::new(registry.clone(), config.health, config.api)?;
        let ready = api_state.ready.clone();
        registry.register(Box::new(ScrapeGauges::new(
            ready.clone(),
            config.health.stuck_after,
            config.pool_size.get(),
            vec![
                ("collector", config.tls.cert.clone()),
                ("ca", config.tls.ca.clone()),
            ],
        )?))?;
        // GPU quarantine states: the decision engine's `gpu_health`.
        api_state.fleet = Some(FleetMetrics::new(
            ready.clone(),
            Arc::new(EngineQuarantines::new(ready)),
            FleetMetricsOptions::default(),
        ));
        if let Some(t) = &config.api_tls {
            api_state.cert_roles = Arc::new(t.operators.clone());
        }
        let app = api::router(api_state.clone());
        let mut http_stop = stop_rx.clone();
        let stopped = async move {
            let _ = http_stop.wait_for(|s| *s).await;
        };
        let http = match &api_tls {
            None => tokio::spawn(async move {
                let served = axum::serve(listener, app)
                    .with_graceful_shutdown(stopped)
                    .await;
                if let Err(error) = served {
                    tracing::error!(%error, "HTTP API stopped");
                }
            }),
            Some(tls) => {
                use crate::api::tls::{handshake_failures, ApiPeer, ApiTlsListener};
                let listener =
                    ApiTlsListener::new(listener, tls.clone(), handshake_failures(&registry)?)
                        .map_err(|source| ServiceError::Http {
                            addr: config.http_listen,
                            source,
                        })?;
                let app = app.into_make_service_with_connect_info::<ApiPeer>();
                tokio::spawn(async move {
                    let served = axum::serve(listener, app)
                        .with_graceful_shutdown(stopped)
                        .await;
                    if let Err(error) = served {
                        tracing::error!(%error, "HTTPS API stopped");
                    }
                })
            }
        };
        // The API answers from here on: stop it if the rest fails.
        let started = Self::start_serving(
            config,
            (tls, refusals),
            crls,
            &registry,
            &api_state,
            &stop_rx,
            hooks,
        )
        .await;
        match started {
            Ok(Serving {
                config,
                pg,
                store,
                collector,
                background,
                pause,
                pulses,
                deployments,
            }) => {
                let _ = api_state.ready.set(Ready {
                    pool: store.pool().clone(),
                    store: store.clone(),
                    dispatch: collector.dispatch(),
                    logs: collector.logs().clone(),
                    ingest: collector.metrics().clone(),
                    tasks: collector.tasks().clone(),
                    liveness: collector.liveness().clone(),
                    deployments: deployments.clone(),
                });
                tracing::info!(quic = %collector.local_addr(), http = %http_addr, "collector started");
                Ok(Service {
                    config,
                    pg,
                    store,
                    collector,
                    http_addr,
                    api_tls,
                    stop,
                    deployments,
                    tasks: std::iter::once(http)
                        .chain(background)
                        .chain(pulses)
                        .collect(),
                    pause,
                })
            }
            Err(e) => {
                let _ = stop.send(true);
                let _ = http.await;
                Err(e)
            }
        }
    }

    /// The database (retried while unreachable), the QUIC server and maintenance.
    async fn start_serving(
        config: CollectorConfig,
        (tls, refusals): (rustls::ServerConfig, razar_shared::tls::HandshakeRefusals),
        crls: Vec<rustls::pki_types::CertificateRevocationListDer<'static>>,
        registry: &prometheus::Registry,
        api: &ApiState,
        stop: &watch::Receiver<bool>,
        hooks: Option<Arc<dyn DeploymentHooks>>,
    ) -> Result<Serving, ServiceError> {
        let (pg, store) = match &config.database {
            Database::Url(url) => (None, connect_retrying(url, &config, api).await?),
            Database::Embedded => {
                let pg =
                    EmbeddedPg::start(EmbeddedPgOptions::new(config.data_dir.join("postgres")))
                        .await?;
                let store =
                    Store::connect_with(pg.connect_options(), config.pool_size.get()).await?;
                store.migrate().await?;
                store.ensure_partitions(chrono::Utc::now()).await?;
                (Some(pg), store)
            }
        };
        let store = store.with_rules(config.ingest_rules());
        store.register_metrics(registry)?;
        let mut ingest = IngestConfig::new(config.quic_listen, Arc::new(tls), crls);
        ingest.refusals = refusals;
        ingest.group.writers = config.ingest_writers.get() as usize;
        ingest.group.copy_slots = config.ingest_copy_slots.get() as usize;
        ingest.session = SessionConfig {
            heartbeat_interval_ms: u32::try_from(config.heartbeat_interval.as_millis())
                .unwrap_or(u32::MAX),
            lost_after_missed: config.lost_after_missed.get(),
            ..SessionConfig::default()
        };
        ingest.lost_after_restart = config.lost_after_restart;
        ingest.samples_stalled_after = config.samples_stalled_after;
        // Stable across restarts (and shared by collectors with the same key), so agents
        // learn at once that a restarted collector lost their connection.
        ingest.reset_key = std::fs::read(&config.tls.key)
            .ok()
            .map(|key| IngestConfig::derive_reset_key(&key));
        let collector = Collector::start(ingest, store.clone(), registry).await?;
        let maintenance = {
            let (store, config, stop) = (store.clone(), config.clone(), stop.clone());
            collector.tasks().spawn(
                "maintenance",
                Some(config.health.maintenance_deadline),
                Some(stop.clone()),
                move |beat| maintain(store.clone(), config.clone(), stop.clone(), beat),
            )
        };
        let summarize_task = {
            let (store, stop) = (store.clone(), stop.clone());
            collector.tasks().spawn(
                "summarize",
                // A first pass after a long quiet spell catches up on every new range.
                Some(Duration::from_secs(120)),
                Some(stop.clone()),
                move |beat| summarize(store.clone(), stop.clone(), beat),
            )
        };
        let deployments = Deployments::new(
            store.pool().clone(),
            collector.dispatch(),
            registry,
            config.deployments,
        )?;
        let deployments_task = {
            let (deployments, stop) = (deployments.clone(), stop.clone());
            // Late when no pass completed for a minute beyond a few ticks.
            let deadline = config.deployments.tick.saturating_mul(10) + Duration::from_secs(60);
            collector.tasks().spawn(
                "deployments",
                Some(deadline),
                Some(stop.clone()),
                move |beat| deployments.clone().run(stop.clone(), beat),
            )
        };
        let pause = crate::pulses::PauseHook::default();
        let mut pulses_task = None;
        if config.pulses.enabled && !config.pulses.schedules.is_empty() {
            let metrics = crate::pulses::PulseMetrics::new(registry)?;
            let (pulses, dispatch, pool) = (
                config.pulses.clone(),
                collector.dispatch(),
                store.pool().clone(),
            );
            let (pause, stop) = (pause.clone(), stop.clone());
            // Supervised like maintenance; ends on `stop`.
            pulses_task = Some(collector.tasks().spawn(
                "pulse_scheduler",
                Some(Duration::from_secs(60)),
                Some(stop.clone()),
                move |beat| {
                    let run = crate::pulses::run(
                        pulses.clone(),
                        dispatch.clone(),
                        pool.clone(),
                        pause.clone(),
                        metrics.clone(),
                        stop.clone(),
                        beat,
                    );
                    async move {
                        run.await;
                        Ok::<(), std::convert::Infallible>(())
                    }
                },
            ));
            tracing::info!(
                schedules = config.pulses.schedules.len(),
                "scheduled failure pulses on"
            );
        }
        let engine_metrics = EngineMetrics::new(registry)?;
        let notify_metrics = NotifyMetrics::new(registry)?;
        let mut background = vec![maintenance, summarize_task];
        if config.engine.enabled {
            // Scheduled pulses never fire while the engine's breaker holds automation.
            let automation_paused = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let paused = automation_paused.clone();
            pause.set(Arc::new(move || {
                paused.load(std::sync::atomic::Ordering::Relaxed)
            }));
            let engine = EngineLoop {
                automation_paused,
                pool: store.pool().clone(),
                connect: store.pool().connect_options().as_ref().clone(),
                dispatch: collector.dispatch(),
                settings: config.engine.clone(),
                notify: config.notify.clone(),
                hooks: hooks.unwrap_or_else(|| Arc::new(deployments.clone())),
                metrics: engine_metrics,
                name: format!(
                    "collector pid {} ({})",
                    std::process::id(),
                    collector.local_addr()
                ),
            };
            let stop = stop.clone();
            background.push(collector.tasks().spawn(
                "engine",
                Some(config.engine.max_lag),
                Some(stop.clone()),
                move |beat| engine.clone().run(beat, stop.clone()),
            ));
        }
        if !config.notify.webhooks.is_empty() {
            let (pool, settings, stop) =
                (store.pool().clone(), config.notify.clone(), stop.clone());
            background.push(
                collector.tasks().spawn(
                    "notify",
                    Some(
                        settings
                            .poll
                            .saturating_mul(30)
                            .max(Duration::from_secs(60)),
                    ),
                    Some(stop.clone()),
                    move |beat| {
                        crate::notify::run(
                            pool.clone(),
                            settings.clone(),
                            notify_metrics.clone(),
                            beat,
                            stop.clone(),
                        )
                    },
                ),
            );
        }
        background.push(deployments_task);
        Ok(Serving {
            config,
            pg,
            store,
            collector,
            background,
            pause,
            pulses: pulses_task,
            deployments,
        })
    }

    /// Where the "automation paused?" hook of scheduled pulses is set (the engine
    /// loop's circuit breaker): no pulse fires while it answers true.
    pub fn automation_pause(&self) -> &crate::pulses::PauseHook {
        &self.pause
    }

    /// UDP address agents connect to.
    pub fn quic_addr(&self) -> SocketAddr {
        self.collector.local_addr()
    }

    /// TCP address of the HTTP API.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn collector(&self) -> &Collector {
        &self.collector
    }

    /// The operator's handle on the decision engine (escalations, decisions, GPU
    /// overrides).
    pub fn engine(&self) -> EngineHandle {
        EngineHandle::new(self.store.pool().clone())
    }

    /// Deployments: operations (create, pause, resume, promote, roll back) and the
    /// driver's state.
    pub fn deployments(&self) -> &Deployments {
        &self.deployments
    }

    /// The embedded PostgreSQL, when the collector runs one.
    pub fn embedded_pg(&self) -> Option<&EmbeddedPg> {
        self.pg.as_ref()
    }

    /// Re-reads the certificate, key and CRL; new connections use them, open connections
    /// whose certificate is now revoked are closed. Returns how many were closed.
    pub fn reload_tls(&self) -> Result<usize, ServiceError> {
        // Both are built before either is installed: a bad file changes nothing.
        if let Some(api) = &self.api_tls {
            razar_shared::tls::api_server_config_from_files(api.files())?;
        }
        let closed = self.collector.reload_tls_files(&tls_files(&self.config))?;
        if let Some(api) = &self.api_tls {
            api.reload()?;
        }
        Ok(closed)
    }

    /// The API's base URL: `https://ADDR` with `[api.tls]`, `http://ADDR` without.
    pub fn api_url(&self) -> String {
        let scheme = if self.api_tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.http_addr)
    }

    /// Stops serving, closes connections, and stops the embedded PostgreSQL.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        self.collector.shutdown(Duration::from_secs(2)).await;
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        self.store.close().await;
        if let Some(mut pg) = self.pg.take() {
            if let Err(error) = pg.stop().await {
                tracing::warn!(%error, "embedded PostgreSQL did not stop cleanly");
            }
        }
    }
}

fn tls_files(config: &CollectorConfig) -> ServerTlsFiles {
    ServerTlsFiles {
        ca: config.tls.ca.clone(),
        cert: config.tls.cert.clone(),
        key: config.tls.key.clone(),
        crls: config.tls.crl.iter().cloned().collect(),
    }
}

/// Why a maintenance run failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MaintenanceError {
    /// `retention.compact_after` reaches before the earliest time that can be
    /// represented: nothing would ever be compacted.
    #[error("retention.compact_after ({0:?}) reaches before the earliest representable time")]
    CompactAfterOutOfRange(Duration),
    /// One or more steps failed (each is tried every run).
    #[error("{}", .0.join("; "))]
    Steps(Vec<String>),
}

/// Samples before this are settled and compacted: `now - compact_after`, checked.
pub fn compaction_cutoff(
    now: chrono::DateTime<chrono::Utc>,
    compact_after: Duration,
) -> Result<chrono::DateTime<chrono::Utc>, MaintenanceError> {
    chrono::Duration::from_std(compact_after)
        .ok()
        .and_then(|settled| now.checked_sub_signed(settled))
        .ok_or(MaintenanceError::CompactAfterOutOfRange(compact_after))
}

/// Partitions ahead of time, compaction of settled samples, retention: one run every
/// [`MAINTENANCE_EVERY`], each step tried every run. A run with a failed step ends the
/// task with the error (its supervisor counts it and restarts it); `beat` marks each
/// complete run.
async fn maintain(
    store: Store,
    config: CollectorConfig,
    mut stop: watch::Receiver<bool>,
    beat: Beat,
) -> Result<(), MaintenanceError> {
    let mut tick = tokio::time::interval(MAINTENANCE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
        maintain_once(&store, &config, chrono::Utc::now()).await?;
        beat.ok();
    }
}

/// While raw samples are read by series (within [`TailReads::KEEP_CURRENT_FOR`] of a
/// read), every [`SUMMARIZE_EVERY`] and at once on the first read after a quiet spell:
/// [`Store::summarize_new_ranges`]. With no reader it only beats: summarizing re-reads
/// every new row, which ingest alone does not need. A failure ends the task (its
/// supervisor counts it and restarts it); `beat` marks each good pass.
///
/// [`TailReads::KEEP_CURRENT_FOR`]: crate::store::TailReads::KEEP_CURRENT_FOR
async fn summarize(
    store: Store,
    mut stop: watch::Receiver<bool>,
    beat: Beat,
) -> Result<(), StoreError> {
    let mut tick = tokio::time::interval(SUMMARIZE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = store.tail_reads().woken() => {}
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
        if store
            .tail_reads()
            .active(chrono::Utc::now().timestamp_millis())
        {
            let ranges = store.summarize_new_ranges().await?;
            tracing::trace!(ranges, "BRIN ranges summarized");
        }
        beat.ok();
    }
}

async fn maintain_once(
    store: &Store,
    config: &CollectorConfig,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(), MaintenanceError> {
    let mut failed = Vec::new();
    if let Err(error) = store.ensure_partitions(now).await {
        failed.push(format!("partitions: {error}"));
    }
    match compaction_cutoff(now, config.compact_after) {
        Ok(cutoff) => match store.compact(cutoff).await {
            Ok(report) => tracing::debug!(?report, "compaction"),
            Err(error) => failed.push(format!("compaction: {error}")),
        },
        Err(error) => failed.push(format!("compaction: {error}")),
    }
    if let Err(error) = store
        .apply_retention(now, config.retention_days.get())
        .await
    {
        failed.push(format!("retention: {error}"));
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(MaintenanceError::Steps(failed))
    }
}

/// Connects to the external database, migrates and creates today's partitions,
/// retrying while the server cannot be reached (health says why meanwhile). Other
/// errors (a URL that does not parse, a refused login, a failed migration) end the
/// start.
async fn connect_retrying(
    url: &str,
    config: &CollectorConfig,
    api: &ApiState,
) -> Result<Store, ServiceError> {
    let mut delay = Duration::from_millis(250);
    loop {
        let attempt = async {
            let store = Store::connect(url, config.pool_size.get()).await?;
            store.migrate().await?;
            store.ensure_partitions(chrono::Utc::now()).await?;
            Ok::<_, StoreError>(store)
        };
        match attempt.await {
            Ok(store) => return Ok(store),
            Err(error) if unreachable(&error) => {
                tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "database unreachable; retrying (health: unavailable)");
                *api.waiting.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.to_string());
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(error) => return Err(error.into()),
        }
    }
}

/// The server is down, starting up or not reachable: worth retrying.
fn unreachable(error: &StoreError) -> bool {
    let db = match error {
        StoreError::Db(e) => e,
        StoreError::Migrate(sqlx::migrate::MigrateError::Execute(e)) => e,
        _ => return false,
    };
    match db {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_) => true,
        // cannot_connect_now (starting up, shutting down), too_many_connections,
        // admin_shutdown, crash_shutdown.
        sqlx::Error::Database(e) => matches!(
            e.code().as_deref(),
            Some("57P03" | "53300" | "57P01" | "57P02")
        ),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compaction_cutoff_is_checked() {
        let now = chrono::Utc::now();
        let quarter = Duration::from_secs(15 * 60);
        assert_eq!(
            compaction_cutoff(now, quarter).ok(),
            Some(now - chrono::Duration::minutes(15))
        );
        // "300000years" once panicked the maintenance task on a date overflow.
        let far = humantime::parse_duration("300000years").unwrap();
        assert!(matches!(
            compaction_cutoff(now, far),
            Err(MaintenanceError::CompactAfterOutOfRange(_))
        ));
        assert!(compaction_cutoff(now, Duration::MAX).is_err());
    }
}
