//! The whole agent as one unit: supervisor, durable store, spool, uplink to the
//! collector, telemetry loop and command executor. `razar-agent run` and the
//! collector's dev mode both start it.

use crate::commands::{Executor, ExecutorOptions};
use crate::config::Config;
use crate::spool::Spool;
use crate::store::Store;
use crate::supervisor::runtime::{Agent, AgentError, AgentOptions};
use crate::telemetry::{open_gpu_source, run_telemetry, KernelLogProgress};
use crate::uplink::{LinkStatus, Uplink, UplinkConfig};
use razar_gpu::exposition::TelemetryCollector;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Default spool budget on disk (`agent.spool_budget`).
pub use crate::config::DEFAULT_SPOOL_BUDGET_BYTES;

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// The durable state store could not be opened.
    #[error("state store {path}: {reason}")]
    Store { path: String, reason: String },
    /// The spool could not be opened.
    #[error("spool {path}: {reason}")]
    Spool { path: String, reason: String },
    /// Certificates for the collector link could not be loaded.
    #[error("collector TLS: {0}")]
    Tls(#[from] razar_shared::tls::TlsError),
    /// The host id configured differs from the one in the agent certificate.
    #[error("agent.host_id {configured:?} differs from the certificate's host id {certificate:?}")]
    HostIdMismatch {
        configured: String,
        certificate: String,
    },
    /// The uplink could not start.
    #[error("uplink: {0}")]
    Uplink(#[from] crate::uplink::UplinkError),
    /// The supervisor could not start.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// GPU metrics could not be registered.
    #[error("GPU metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// This machine's host name (for metric labels when no certificate names the host).
fn local_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// How to run the daemon besides its config.
#[derive(Debug, Default, Clone)]
pub struct DaemonOptions {
    /// Override the local endpoint's address (e.g. port 0).
    pub listen: Option<SocketAddr>,
    /// Spool budget on disk, over `agent.spool_budget` from the config.
    pub spool_budget_bytes: Option<u64>,
}

/// A running agent with its collector link.
pub struct Daemon {
    agent: Agent,
    uplink: Option<Arc<Uplink>>,
    host_id: Option<String>,
    gpu_status: Option<String>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("host_id", &self.host_id)
            .field("gpu_status", &self.gpu_status)
            .finish_non_exhaustive()
    }
}

impl Daemon {
    /// Starts everything `config` asks for (inside a tokio runtime).
    pub async fn start(config: Config, options: DaemonOptions) -> Result<Daemon, DaemonError> {
        razar_shared::tls::install_crypto_provider();
        let data_dir = config.agent.data_dir.clone();
        let store = Arc::new(Store::open(&data_dir).map_err(|e| DaemonError::Store {
            path: data_dir.display().to_string(),
            reason: e.to_string(),
        })?);
        // The link is prepared before the supervisor starts, so a bad certificate is
        // refused before any component runs (never half-start).
        let link = match &config.collector {
            Some(c) => {
                let files = razar_shared::tls::ClientTlsFiles {
                    ca: c.ca.clone(),
                    cert: c.cert.clone(),
                    key: c.key.clone(),
                };
                let tls = razar_shared::tls::client_config_from_files(&files)?;
                let cert_der = razar_shared::tls::certificates(
                    &razar_shared::tls::read_file(&c.cert)?,
                    &c.cert.display().to_string(),
                )?;
                let host_id = match cert_der.first() {
                    Some(der) => razar_shared::tls::host_id_from_certificate(der)?,
                    None => {
                        return Err(DaemonError::Tls(razar_shared::tls::TlsError::Missing {
                            what: c.cert.display().to_string(),
                            expected: "a certificate",
                        }))
                    }
                };
                if let Some(configured) = &config.agent.host_id {
                    if configured != &host_id {
                        return Err(DaemonError::HostIdMismatch {
                            configured: configured.clone(),
                            certificate: host_id,
                        });
                    }
                }
                let spool_path = data_dir.join("spool.redb");
                let spool = Spool::open(
                    &spool_path,
                    options
                        .spool_budget_bytes
                        .unwrap_or(config.agent.spool_budget_bytes),
                )
                .map_err(|e| DaemonError::Spool {
                    path: spool_path.display().to_string(),
                    reason: e.to_string(),
                })?;
                let mut uplink = UplinkConfig::new(
                    c.address.clone(),
                    c.server_name.clone(),
                    Arc::new(tls),
                    host_id.clone(),
                );
                uplink.hello.profile = config.agent.profile.clone();
                Some((uplink, Arc::new(spool), host_id))
            }
            None => None,
        };
        let interval = config.agent.sample_interval;
        let (kernel_log, kernel_log_after) = KernelLogProgress::resume(store.clone());
        let (gpu, gpu_status) = open_gpu_source(&config.gpu, kernel_log_after);
        let config_arc = Arc::new(config.clone());
        let agent = Agent::start(
            config,
            AgentOptions {
                store: Some(store.clone()),
                serve_http: true,
                listen: options.listen,
            },
        )
        .await?;
        agent.set_gpu_status(gpu_status.as_deref());
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let hostname = link
            .as_ref()
            .map(|l| l.2.clone())
            .or_else(|| config_arc.agent.host_id.clone())
            .unwrap_or_else(local_hostname);
        let exposition =
            TelemetryCollector::with_hostname_label(&hostname, config_arc.dcgm_hostname_label)?;
        agent
            .view()
            .metrics()
            .registry()
            .register(Box::new(exposition.clone()))
            .map_err(AgentError::Metrics)?;
        let (uplink, host_id) = match link {
            Some((mut uplink_config, spool, host_id)) => {
                // The first Hello carries the inventory as it is now (the supervisor
                // has started, the GPUs are known), not the empty one before the first
                // sampling tick.
                uplink_config.hello.components = started_inventory(&agent, &config_arc).await;
                uplink_config.hello.gpus = gpu.inventory().iter().map(|g| g.to_info()).collect();
                let (uplink, commands) = Uplink::spawn(uplink_config, spool)?;
                let uplink = Arc::new(uplink);
                tasks.push(tokio::spawn(mirror_link_status(
                    agent.clone(),
                    uplink.watch_status(),
                )));
                let executor = Executor::new(
                    agent.clone(),
                    store,
                    uplink.clone(),
                    ExecutorOptions {
                        retention: config_arc.agent.command_retention,
                        follow_limit: config_arc.agent.log_follow_limit,
                        ..ExecutorOptions::default()
                    },
                )
                .with_gpus(gpu.inventory().iter().map(|g| g.to_info()).collect());
                tasks.push(tokio::spawn(executor.run(commands)));
                (Some(uplink), Some(host_id))
            }
            None => {
                agent.set_collector_link("not configured");
                (None, None)
            }
        };
        // The telemetry task is the first: shutdown waits for its last tick.
        tasks.insert(
            0,
            tokio::spawn(run_telemetry(
                agent.clone(),
                uplink.clone(),
                gpu,
                exposition,
                interval,
                kernel_log,
                stop_rx,
            )),
        );
        Ok(Daemon {
            agent,
            uplink,
            host_id,
            gpu_status,
            stop,
            tasks,
        })
    }

    pub fn agent(&self) -> &Agent {
        &self.agent
    }

    /// The host id from the agent certificate (`None` without a collector link).
    pub fn host_id(&self) -> Option<&str> {
        self.host_id.as_deref()
    }

    /// Why GPU telemetry is off, if it is.
    pub fn gpu_status(&self) -> Option<&str> {
        self.gpu_status.as_deref()
    }

    /// The collector link's status (`None` without a collector link).
    pub fn link_status(&self) -> Option<LinkStatus> {
        self.uplink.as_ref().map(|u| u.status())
    }

    /// Stops components in reverse order, takes a last sample so their final events are
    /// spooled, then closes the link. Spooled batches not yet acknowledged stay on disk
    /// and are sent after the next start.
    pub async fn shutdown(self) {
        self.agent.shutdown().await;
        let _ = self.stop.send(true);
        let mut tasks = self.tasks;
        // The telemetry task ends after one last tick; the command task ends when the
        // uplink closes its channel.
        if let Some(telemetry) = tasks.first_mut() {
            let _ = telemetry.await;
        }
        // The command task holds the uplink and only ends when the uplink does: end it
        // (and the status mirror) first, so that the uplink is ours alone to close.
        for task in tasks.iter().skip(1) {
            task.abort();
        }
        for task in tasks.into_iter().skip(1) {
            let _ = task.await;
        }
        if let Some(uplink) = self.uplink {
            match Arc::try_unwrap(uplink) {
                // Closes the connection with the shutdown code and waits for it.
                Ok(uplink) => uplink.shutdown().await,
                Err(shared) => {
                    tracing::warn!("the uplink is still in use at shutdown: not closed cleanly");
                    drop(shared);
                }
            }
        }
    }
}

/// The component inventory once every active component has published its first status
/// (component tasks start asynchronously), or after 5 s with what is there.
async fn started_inventory(
    agent: &Agent,
    config: &Config,
) -> Vec<razar_shared::protocol::ComponentInfo> {
    let expected: Vec<String> = config
        .active_components()
        .map(|c| c.name.to_string())
        .collect();
    let mut statuses = agent.watch_statuses();
    let all_known = async {
        loop {
            let known = {
                let s = statuses.borrow_and_update();
                expected.iter().all(|name| s.contains_key(name))
            };
            if known || statuses.changed().await.is_err() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), all_known).await;
    component_inventory(agent)
}

/// Every supervised component as the collector's inventory lists it.
pub(crate) fn component_inventory(agent: &Agent) -> Vec<razar_shared::protocol::ComponentInfo> {
    agent
        .statuses()
        .values()
        .map(|s| razar_shared::protocol::ComponentInfo {
            name: s.name.clone(),
            revision: s.revision.clone(),
            state: s.state,
            critical: s.critical,
        })
        .collect()
}

/// Keeps `/health`'s `collector` field in step with the uplink: the state, and why the
/// last connection failed while it is not connected.
async fn mirror_link_status(agent: Agent, mut status: watch::Receiver<LinkStatus>) {
    loop {
        let text = {
            let s = status.borrow_and_update();
            match (&s.state, &s.last_error) {
                (crate::uplink::LinkState::Connected, _) | (_, None) => s.state.as_str().to_owned(),
                (state, Some(why)) => format!("{} ({why})", state.as_str()),
            }
        };
        agent.set_collector_link(&text);
        if status.changed().await.is_err() {
            break;
        }
    }
}
