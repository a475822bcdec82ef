//! The collector as one unit: PostgreSQL (embedded or external), the store, the QUIC
//! ingest server, the HTTP API and the maintenance loop (partitions, compaction,
//! retention). `razar-collector run` and `razar-collector dev` both start it.

use crate::api::{self, ApiState};
use crate::config::{CollectorConfig, Database};
use crate::embedded_pg::{EmbeddedPg, EmbeddedPgError, EmbeddedPgOptions};
use crate::server::{Collector, IngestConfig, ServerError};
use crate::store::{Store, StoreError};
use razar_shared::protocol::SessionConfig;
use razar_shared::tls::{ServerTlsFiles, TlsError};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How often the maintenance loop runs.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(60);

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
}

/// A running collector.
pub struct Service {
    config: CollectorConfig,
    pg: Option<EmbeddedPg>,
    store: Store,
    collector: Collector,
    http_addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
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
    /// Starts PostgreSQL if embedded, migrates, then serves agents and the API.
    pub async fn start(config: CollectorConfig) -> Result<Service, ServiceError> {
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
        let (pg, store) = match &config.database {
            Database::Url(url) => (None, Store::connect(url, config.pool_size.get()).await?),
            Database::Embedded => {
                let pg =
                    EmbeddedPg::start(EmbeddedPgOptions::new(config.data_dir.join("postgres")))
                        .await?;
                let store =
                    Store::connect_with(pg.connect_options(), config.pool_size.get()).await?;
                (Some(pg), store)
            }
        };
        store.migrate().await?;
        store.ensure_partitions(chrono::Utc::now()).await?;

        let registry = prometheus::Registry::new();
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
        // Stable across restarts (and shared by collectors with the same key), so agents
        // learn at once that a restarted collector lost their connection.
        ingest.reset_key = std::fs::read(&config.tls.key)
            .ok()
            .map(|key| IngestConfig::derive_reset_key(&key));
        let collector = Collector::start(ingest, store.clone(), &registry).await?;

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
        let app = api::router(ApiState {
            pool: store.pool().clone(),
            ingest: collector.metrics().clone(),
            registry,
            started: Instant::now(),
        });
        let mut http_stop = stop_rx.clone();
        let http = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = http_stop.wait_for(|s| *s).await;
                })
                .await;
            if let Err(error) = served {
                tracing::error!(%error, "HTTP API stopped");
            }
        });
        let maintenance = tokio::spawn(maintain(store.clone(), config.clone(), stop_rx));
        tracing::info!(quic = %collector.local_addr(), http = %http_addr, "collector started");
        Ok(Service {
            config,
            pg,
            store,
            collector,
            http_addr,
            stop,
            tasks: vec![http, maintenance],
        })
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

    /// The embedded PostgreSQL, when the collector runs one.
    pub fn embedded_pg(&self) -> Option<&EmbeddedPg> {
        self.pg.as_ref()
    }

    /// Re-reads the certificate, key and CRL; new connections use them, open connections
    /// whose certificate is now revoked are closed. Returns how many were closed.
    pub fn reload_tls(&self) -> Result<usize, ServiceError> {
        Ok(self.collector.reload_tls_files(&tls_files(&self.config))?)
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

/// Partitions ahead of time, compaction of settled samples, retention.
async fn maintain(store: Store, config: CollectorConfig, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(MAINTENANCE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let now = chrono::Utc::now();
        if let Err(error) = store.ensure_partitions(now).await {
            tracing::warn!(%error, "cannot create partitions");
        }
        let settled = chrono::Duration::from_std(config.compact_after)
            .unwrap_or_else(|_| chrono::Duration::minutes(15));
        match store.compact(now - settled).await {
            Ok(report) => tracing::debug!(?report, "compaction"),
            Err(error) => tracing::warn!(%error, "compaction failed"),
        }
        if let Err(error) = store
            .apply_retention(now, config.retention_days.get())
            .await
        {
            tracing::warn!(%error, "retention failed");
        }
    }
}
