//! HTTPS on the API port (`[api.tls]`): rustls through tokio-rustls, served by
//! `axum::serve` with a [`Listener`] whose connections arrive already through their
//! handshake, each with the identity of the client certificate it presented
//! ([`ApiPeer`], in every request's extensions as `ConnectInfo<ApiPeer>`).
//!
//! Client certificates are optional at the TLS layer (bearer-token clients connect
//! without one); one that is presented must chain to `client_ca`, carry the clientAuth
//! usage and not be revoked by the CRL, or the handshake fails. `auth::authorize` maps
//! an operator certificate to its role when the request carries no bearer token.
//!
//! Handshakes run in their own tasks (a slow or silent client never holds up the
//! others), at most [`MAX_HANDSHAKES`] at once, each within [`HANDSHAKE_TIMEOUT`].

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use prometheus::{IntCounterVec, Opts, Registry};
use razar_shared::tls::{ServerTlsFiles, TlsError};
use rustls::ServerConfig;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Longest a client may take over its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; further connections wait in the kernel's backlog.
pub const MAX_HANDSHAKES: usize = 256;

/// The client certificate a connection presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientCert {
    /// None (a bearer-token client).
    None,
    /// An operator certificate (`razar://operator/<name>`) of the client CA.
    Operator(String),
    /// A certificate of the client CA that names no operator (why).
    NotOperator(String),
}

/// Who is at the other end of an HTTPS connection.
#[derive(Debug, Clone)]
pub struct ApiPeer {
    pub addr: SocketAddr,
    pub cert: ClientCert,
}

impl Connected<IncomingStream<'_, ApiTlsListener>> for ApiPeer {
    fn connect_info(stream: IncomingStream<'_, ApiTlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// The API's current rustls config; [`reload`](Self::reload) swaps it for new
/// connections (what SIGHUP does, with the QUIC listener's).
#[derive(Debug, Clone)]
pub struct ApiTlsConfig {
    files: ServerTlsFiles,
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

impl ApiTlsConfig {
    /// Reads the files and builds the config; errors name the file at fault.
    pub fn load(files: ServerTlsFiles) -> Result<ApiTlsConfig, TlsError> {
        let config = razar_shared::tls::api_server_config_from_files(&files)?;
        Ok(ApiTlsConfig {
            files,
            current: Arc::new(RwLock::new(Arc::new(config))),
        })
    }

    /// Re-reads certificate, key, client CA and CRL; nothing changes if one fails.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = razar_shared::tls::api_server_config_from_files(&self.files)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
        Ok(())
    }

    /// The files it is built from.
    pub fn files(&self) -> &ServerTlsFiles {
        &self.files
    }

    fn current(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// `razar_collector_api_tls_handshakes_failed_total{reason}`: `error` (refused
/// certificate, not TLS, ...) or `timeout`.
pub fn handshake_failures(registry: &Registry) -> Result<IntCounterVec, prometheus::Error> {
    let counter = IntCounterVec::new(
        Opts::new(
            "razar_collector_api_tls_handshakes_failed_total",
            "TLS handshakes on the API port that failed, by reason",
        ),
        &["reason"],
    )?;
    registry.register(Box::new(counter.clone()))?;
    Ok(counter)
}

/// A TCP listener whose connections come out of their TLS handshake.
#[derive(Debug)]
pub struct ApiTlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, ApiPeer)>,
}

impl ApiTlsListener {
    /// Starts accepting on `listener`; the accept loop ends when this is dropped.
    pub fn new(
        listener: TcpListener,
        config: ApiTlsConfig,
        failures: IntCounterVec,
    ) -> std::io::Result<ApiTlsListener> {
        let local = listener.local_addr()?;
        // Rendezvous-sized: a finished handshake waits (holding its permit) until
        // axum takes it, so nothing is dropped and the permits bound the backlog.
        let (tx, ready) = mpsc::channel(1);
        tokio::spawn(accept_loop(listener, config, tx, failures));
        Ok(ApiTlsListener { local, ready })
    }
}

impl Listener for ApiTlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = ApiPeer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accept loop only ends once this listener is gone.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(ApiPeer {
            addr: self.local,
            cert: ClientCert::None,
        })
    }
}

async fn accept_loop(
    listener: TcpListener,
    config: ApiTlsConfig,
    tx: mpsc::Sender<(TlsStream<TcpStream>, ApiPeer)>,
    failures: IntCounterVec,
) {
    let permits = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit,
            () = tx.closed() => return,
        };
        let Ok(permit) = permit else { return };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = tx.closed() => return,
        };
        let (tcp, addr) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of descriptors and the like: pause rather than spin.
                tracing::warn!(%error, "API: cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = TlsAcceptor::from(config.current());
        let tx = tx.clone();
        let failures = failures.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let cert = client_cert(&stream);
                    let _ = tx.send((stream, ApiPeer { addr, cert })).await;
                }
                Ok(Err(error)) => {
                    failures.with_label_values(&["error"]).inc();
                    tracing::debug!(%addr, %error, "API: TLS handshake failed");
                }
                Err(_) => {
                    failures.with_label_values(&["timeout"]).inc();
                    tracing::debug!(%addr, "API: TLS handshake timed out");
                }
            }
        });
    }
}

/// The identity in the connection's client certificate, if it presented one.
fn client_cert(stream: &TlsStream<TcpStream>) -> ClientCert {
    let (_, connection) = stream.get_ref();
    match connection.peer_certificates().and_then(|c| c.first()) {
        None => ClientCert::None,
        Some(der) => match razar_shared::tls::operator_from_certificate(der.as_ref()) {
            Ok(name) => ClientCert::Operator(name),
            Err(error) => ClientCert::NotOperator(error.to_string()),
        },
    }
}
