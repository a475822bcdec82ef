//! Real QUIC with mutual TLS on loopback: quinn endpoints built from
//! `razar_shared::tls` configs and certificates issued by `razar-certs`.
//!
//! A valid agent is accepted and its host id read from the certificate on the server;
//! every kind of bad client is refused with its own reason, observed by the client (the
//! QUIC close it receives) and by the server (the handshake error or the refusal it sent).
//!
//! In TLS 1.3 the client finishes its handshake before the server has checked the client
//! certificate, so the client here, like the agent, waits for the server's first
//! application message (a `Welcome`) or for the connection to close, never trusting
//! `connect` alone.

use anyhow::{bail, Context};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, Endpoint};
use razar_certs::Issued;
use razar_shared::protocol::{
    encode_agent, encode_collector, AgentFrameDecoder, AgentMessage, CollectorEvent,
    CollectorFrameDecoder, CollectorMessage, CollectorSession, Hello, SessionConfig, ALPN,
    PROTOCOL_MAX, PROTOCOL_MIN,
};
use razar_shared::tls;
use razar_tests::ca::TestCa;
use rustls::pki_types::CertificateDer;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Upper bound for any one exchange; reached only when something is broken.
const DEADLINE: Duration = Duration::from_secs(20);
/// Largest test message accepted on a stream.
const MAX_MESSAGE: usize = 64 * 1024;
/// Application close code the test server uses for a refusal.
const REFUSED: u32 = 1;

// TLS alert codes (RFC 8446 §6) that a QUIC close carries as 0x100 + alert.
const CERTIFICATE_REVOKED: u8 = 44;
const CERTIFICATE_EXPIRED: u8 = 45;
const UNKNOWN_CA: u8 = 48;
const DECRYPT_ERROR: u8 = 51;
const CERTIFICATE_REQUIRED: u8 = 116;
const NO_APPLICATION_PROTOCOL: u8 = 120;

/// What the client saw.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum ClientSaw {
    /// The collector's first application message: accepted.
    Welcome,
    /// A `Refusal` message, or an application close carrying its reason code.
    Refused(String),
    /// A QUIC close carrying a TLS alert.
    TlsAlert(u8),
    /// Anything else (a test failure).
    Other(String),
}

/// What the server saw.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum ServerSaw {
    /// Accepted the agent whose certificate names this host id.
    Accepted { host: String },
    /// Refused after the handshake, with this reason.
    Refused(String),
    /// The handshake failed with this TLS alert.
    TlsAlert(u8),
    /// Anything else (a test failure).
    Other(String),
}

fn tls_alert(error: &ConnectionError) -> Option<u8> {
    let code = match error {
        ConnectionError::ConnectionClosed(close) => u64::from(close.error_code),
        ConnectionError::TransportError(error) => u64::from(error.code),
        _ => return None,
    };
    if (0x100..0x200).contains(&code) {
        u8::try_from(code - 0x100).ok()
    } else {
        None
    }
}

fn client_saw_error(error: &ConnectionError) -> ClientSaw {
    if let Some(alert) = tls_alert(error) {
        return ClientSaw::TlsAlert(alert);
    }
    match error {
        ConnectionError::ApplicationClosed(close) if close.error_code == REFUSED.into() => {
            ClientSaw::Refused(String::from_utf8_lossy(&close.reason).into_owned())
        }
        other => ClientSaw::Other(other.to_string()),
    }
}

fn encode_hello(host_id: &str) -> anyhow::Result<Vec<u8>> {
    encode_agent(&hello(host_id)).context("encoding a hello")
}

fn hello(host_id: &str) -> AgentMessage {
    AgentMessage::Hello(Hello {
        protocol_min: PROTOCOL_MIN,
        protocol_max: PROTOCOL_MAX,
        host_id: host_id.into(),
        agent_version: "test".into(),
        profile: "test".into(),
        components: Vec::new(),
        gpus: Vec::new(),
        last_acked_seq: 0,
        agent_time_ms: 0,
    })
}

/// A collector stand-in: accepts QUIC connections, reads the host id from the client
/// certificate, checks the `Hello`'s claim against it, and answers `Welcome` or `Refusal`.
struct Server {
    endpoint: Endpoint,
    addr: SocketAddr,
    seen: mpsc::UnboundedReceiver<ServerSaw>,
    connections: mpsc::UnboundedReceiver<quinn::Connection>,
}

impl Server {
    fn start(config: rustls::ServerConfig) -> anyhow::Result<Server> {
        let endpoint = Endpoint::server(quic_server_config(config)?, "127.0.0.1:0".parse()?)?;
        let addr = endpoint.local_addr()?;
        let (seen_tx, seen) = mpsc::unbounded_channel();
        let (conn_tx, connections) = mpsc::unbounded_channel();
        let accepting = endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = accepting.accept().await {
                let seen = seen_tx.clone();
                let conns = conn_tx.clone();
                tokio::spawn(async move {
                    let saw = serve(incoming, conns).await;
                    // The receiver is gone only when the test has finished.
                    let _ = seen.send(saw);
                });
            }
        });
        Ok(Server {
            endpoint,
            addr,
            seen,
            connections,
        })
    }

    async fn next_seen(&mut self) -> anyhow::Result<ServerSaw> {
        tokio::time::timeout(DEADLINE, self.seen.recv())
            .await
            .context("the server reported nothing before the deadline")?
            .context("the server stopped")
    }

    async fn next_connection(&mut self) -> anyhow::Result<quinn::Connection> {
        tokio::time::timeout(DEADLINE, self.connections.recv())
            .await
            .context("no accepted connection before the deadline")?
            .context("the server stopped")
    }
}

fn quic_server_config(config: rustls::ServerConfig) -> anyhow::Result<quinn::ServerConfig> {
    let crypto = QuicServerConfig::try_from(Arc::new(config))?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(crypto)))
}

async fn serve(
    incoming: quinn::Incoming,
    accepted: mpsc::UnboundedSender<quinn::Connection>,
) -> ServerSaw {
    let connection = match incoming.await {
        Ok(connection) => connection,
        Err(error) => {
            return match tls_alert(&error) {
                Some(alert) => ServerSaw::TlsAlert(alert),
                None => ServerSaw::Other(error.to_string()),
            }
        }
    };
    match check(&connection).await {
        Ok(host) => {
            let _ = accepted.send(connection);
            ServerSaw::Accepted { host }
        }
        Err(reason) => ServerSaw::Refused(reason),
    }
}

/// Identity from the certificate, never from the `Hello`: the protocol's collector
/// session is created with the certificate's host id and refuses a `Hello` that claims
/// another. Frames use the protocol codec.
async fn check(connection: &quinn::Connection) -> Result<String, String> {
    let host = match peer_host(connection) {
        Ok(host) => host,
        Err(error) => return Err(format!("no identity: {error}")),
    };
    let mut session = CollectorSession::new(host.clone(), Instant::now());
    let (mut send, mut recv) = connection
        .accept_bi()
        .await
        .map_err(|e| format!("no stream: {e}"))?;
    let bytes = recv
        .read_to_end(MAX_MESSAGE)
        .await
        .map_err(|e| format!("no hello: {e}"))?;
    let mut decoder = AgentFrameDecoder::new();
    let mut input = &bytes[..];
    while let Some(message) = decoder.feed(&mut input).map_err(|e| e.code().to_string())? {
        session.handle(message, Instant::now());
    }
    let mut refused = None;
    while let Some(event) = session.poll_event() {
        match event {
            CollectorEvent::HelloReceived(_) => session
                .accept(0, SessionConfig::default(), Instant::now(), 0)
                .map_err(|e| format!("accept: {e}"))?,
            CollectorEvent::Refused(refusal) => refused = Some(refusal.reason),
            other => return Err(format!("unexpected event {other:?}")),
        }
    }
    let mut out = Vec::new();
    while let Some(message) = session.poll_transmit() {
        out.extend(encode_collector(&message).map_err(|e| e.to_string())?);
    }
    send.write_all(&out)
        .await
        .map_err(|e| format!("write: {e}"))?;
    send.finish().map_err(|e| format!("finish: {e}"))?;
    match refused {
        Some(reason) => {
            // Let the client read the refusal, then close with its code.
            let _ = send.stopped().await;
            connection.close(REFUSED.into(), reason.code().as_bytes());
            Err(reason.code().into())
        }
        None => Ok(host),
    }
}

fn peer_certificate(connection: &quinn::Connection) -> anyhow::Result<CertificateDer<'static>> {
    let identity = connection
        .peer_identity()
        .context("the client presented no certificate")?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| anyhow::anyhow!("peer identity is not a rustls certificate chain"))?;
    chain
        .first()
        .cloned()
        .context("the certificate chain is empty")
}

fn peer_host(connection: &quinn::Connection) -> anyhow::Result<String> {
    Ok(tls::host_id_from_certificate(&peer_certificate(
        connection,
    )?)?)
}

/// Connects, sends a `Hello` claiming `claimed_host`, and reports the first thing the
/// server answers with: a `Welcome`, a `Refusal`, or a close.
async fn connect(
    addr: SocketAddr,
    config: rustls::ClientConfig,
    claimed_host: &str,
) -> anyhow::Result<ClientSaw> {
    let mut endpoint = Endpoint::client("127.0.0.1:0".parse()?)?;
    let crypto = QuicClientConfig::try_from(Arc::new(config))?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let saw = tokio::time::timeout(DEADLINE, exchange(&endpoint, addr, claimed_host))
        .await
        .context("no answer from the server before the deadline")??;
    endpoint.close(0u32.into(), b"done");
    Ok(saw)
}

async fn exchange(
    endpoint: &Endpoint,
    addr: SocketAddr,
    claimed_host: &str,
) -> anyhow::Result<ClientSaw> {
    let connection = match endpoint.connect(addr, "localhost")?.await {
        Ok(connection) => connection,
        Err(error) => return Ok(client_saw_error(&error)),
    };
    let (mut send, mut recv) = match connection.open_bi().await {
        Ok(streams) => streams,
        Err(error) => return Ok(client_saw_error(&error)),
    };
    if send.write_all(&encode_hello(claimed_host)?).await.is_err() || send.finish().is_err() {
        // The write failed because the connection closed; wait for and report the reason.
        let error = connection.closed().await;
        return Ok(client_saw_error(&error));
    }
    let bytes = match recv.read_to_end(MAX_MESSAGE).await {
        Ok(bytes) => bytes,
        // The read failed because the connection closed; report why.
        Err(_) => return Ok(client_saw_error(&connection.closed().await)),
    };
    let mut decoder = CollectorFrameDecoder::new();
    let mut input = &bytes[..];
    let saw = match decoder.feed(&mut input) {
        Ok(Some(CollectorMessage::Welcome(_))) => ClientSaw::Welcome,
        Ok(Some(CollectorMessage::Refusal(refusal))) => {
            ClientSaw::Refused(refusal.reason.code().into())
        }
        other => ClientSaw::Other(format!("unexpected answer: {other:?}")),
    };
    connection.close(0u32.into(), b"done");
    Ok(saw)
}

/// A client config like `tls::client_config` but presenting no certificate.
fn client_without_certificate(ca: &TestCa) -> anyhow::Result<rustls::ClientConfig> {
    let roots = tls::root_store(ca.ca_pem().as_bytes(), "CA certificate")?;
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

fn client_config(ca: &TestCa, agent: &Issued) -> anyhow::Result<rustls::ClientConfig> {
    ca.client_config(agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_agent_is_accepted_and_identified_by_its_certificate() -> anyhow::Result<()> {
    let mut ca = TestCa::new()?;
    let agent = ca.agent("gpu-01")?;
    let mut server = Server::start(ca.server_config()?)?;

    let saw = connect(server.addr, client_config(&ca, &agent)?, "gpu-01").await?;
    assert_eq!(saw, ClientSaw::Welcome);
    assert_eq!(
        server.next_seen().await?,
        ServerSaw::Accepted {
            host: "gpu-01".into()
        }
    );
    // The identity on the server is the certificate the CA issued, serial and all.
    let connection = server.next_connection().await?;
    let leaf = peer_certificate(&connection)?;
    assert_eq!(tls::certificate_serial_hex(&leaf)?, agent.serial);
    assert_eq!(
        connection.handshake_data().and_then(|data| data
            .downcast::<quinn::crypto::rustls::HandshakeData>()
            .ok()
            .and_then(|data| data.protocol)),
        Some(ALPN.to_vec())
    );
    server.endpoint.close(0u32.into(), b"done");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_client_is_refused_with_a_distinct_reason() -> anyhow::Result<()> {
    let mut ca = TestCa::new()?;
    let good = ca.agent("gpu-01")?;
    let foreign = ca.other_ca_agent("gpu-02")?;
    let impostor = ca.impostor_ca_agent("gpu-05")?;
    let expired = ca.expired_agent("gpu-03")?;
    let revoked = ca.agent("gpu-04")?;
    ca.revoke(&revoked)?;
    let mut server = Server::start(ca.server_config()?)?;

    let mut wrong_alpn = client_config(&ca, &good)?;
    wrong_alpn.alpn_protocols = vec![b"razar/0".to_vec()];
    let cases: Vec<(&str, rustls::ClientConfig, &str, ClientSaw, ServerSaw)> = vec![
        (
            "no client certificate",
            client_without_certificate(&ca)?,
            "gpu-01",
            ClientSaw::TlsAlert(CERTIFICATE_REQUIRED),
            ServerSaw::TlsAlert(CERTIFICATE_REQUIRED),
        ),
        (
            "certificate from another CA",
            tls::client_config(
                ca.ca_pem().as_bytes(),
                foreign.cert_pem.as_bytes(),
                foreign.key_pem.as_bytes(),
            )?,
            "gpu-02",
            ClientSaw::TlsAlert(UNKNOWN_CA),
            ServerSaw::TlsAlert(UNKNOWN_CA),
        ),
        (
            "certificate from an impostor CA with the fleet CA's name",
            tls::client_config(
                ca.ca_pem().as_bytes(),
                impostor.cert_pem.as_bytes(),
                impostor.key_pem.as_bytes(),
            )?,
            "gpu-05",
            ClientSaw::TlsAlert(DECRYPT_ERROR),
            ServerSaw::TlsAlert(DECRYPT_ERROR),
        ),
        (
            "expired certificate",
            client_config(&ca, &expired)?,
            "gpu-03",
            ClientSaw::TlsAlert(CERTIFICATE_EXPIRED),
            ServerSaw::TlsAlert(CERTIFICATE_EXPIRED),
        ),
        (
            "revoked certificate",
            client_config(&ca, &revoked)?,
            "gpu-04",
            ClientSaw::TlsAlert(CERTIFICATE_REVOKED),
            ServerSaw::TlsAlert(CERTIFICATE_REVOKED),
        ),
        (
            "host id not matching the certificate",
            client_config(&ca, &good)?,
            "gpu-99",
            ClientSaw::Refused("host_id_mismatch".into()),
            ServerSaw::Refused("host_id_mismatch".into()),
        ),
        (
            "wrong ALPN",
            wrong_alpn,
            "gpu-01",
            ClientSaw::TlsAlert(NO_APPLICATION_PROTOCOL),
            ServerSaw::TlsAlert(NO_APPLICATION_PROTOCOL),
        ),
    ];

    let mut client_reasons = BTreeSet::new();
    let mut server_reasons = BTreeSet::new();
    let count = cases.len();
    for (case, config, claimed, client_expected, server_expected) in cases {
        let saw = connect(server.addr, config, claimed)
            .await
            .with_context(|| format!("case {case}"))?;
        assert_eq!(saw, client_expected, "client side of case: {case}");
        let seen = server
            .next_seen()
            .await
            .with_context(|| format!("case {case}"))?;
        assert_eq!(seen, server_expected, "server side of case: {case}");
        client_reasons.insert(saw);
        server_reasons.insert(seen);
    }
    assert_eq!(
        client_reasons.len(),
        count,
        "client reasons: {client_reasons:?}"
    );
    assert_eq!(
        server_reasons.len(),
        count,
        "server reasons: {server_reasons:?}"
    );

    // The server stays up and keeps serving valid agents after all of that.
    assert_eq!(
        connect(server.addr, client_config(&ca, &good)?, "gpu-01").await?,
        ClientSaw::Welcome
    );
    assert_eq!(
        server.next_seen().await?,
        ServerSaw::Accepted {
            host: "gpu-01".into()
        }
    );
    server.endpoint.close(0u32.into(), b"done");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crl_reload_refuses_newly_revoked_certificates_on_new_connections() -> anyhow::Result<()> {
    let mut ca = TestCa::new()?;
    let agent = ca.agent("gpu-01")?;
    let bystander = ca.agent("gpu-02")?;
    let mut server = Server::start(ca.server_config()?)?;
    // One config for both attempts, as an agent keeps it (clones share its session store).
    let agent_config = client_config(&ca, &agent)?;

    assert_eq!(
        connect(server.addr, agent_config.clone(), "gpu-01").await?,
        ClientSaw::Welcome
    );
    assert_eq!(
        server.next_seen().await?,
        ServerSaw::Accepted {
            host: "gpu-01".into()
        }
    );
    let open = server.next_connection().await?;

    // Revoke, then reload: rebuild the server config with the new CRL and swap it in.
    let crl = ca.revoke(&agent)?;
    server
        .endpoint
        .set_server_config(Some(quic_server_config(tls::server_config_from_files(
            &ca.server_files(),
        )?)?));

    assert_eq!(
        connect(server.addr, agent_config.clone(), "gpu-01").await?,
        ClientSaw::TlsAlert(CERTIFICATE_REVOKED)
    );
    assert_eq!(
        server.next_seen().await?,
        ServerSaw::TlsAlert(CERTIFICATE_REVOKED)
    );
    // Others are unaffected.
    assert_eq!(
        connect(server.addr, client_config(&ca, &bystander)?, "gpu-02").await?,
        ClientSaw::Welcome
    );
    assert_eq!(
        server.next_seen().await?,
        ServerSaw::Accepted {
            host: "gpu-02".into()
        }
    );
    // A reload does not touch connections already open: the collector finds them with
    // `is_revoked` and closes them itself.
    let serial = tls::certificate_serial_hex(&peer_certificate(&open)?)?;
    assert!(tls::is_revoked(&crl, &serial)?);
    assert!(!tls::is_revoked(&crl, &bystander.serial)?);
    server.endpoint.close(0u32.into(), b"done");
    Ok(())
}

#[test]
fn server_config_errors_name_the_file() -> anyhow::Result<()> {
    let ca = TestCa::new()?;
    let mut files = ca.server_files();
    files.crls = vec![ca.dir().join("missing-crl.der")];
    let error = tls::server_config_from_files(&files)
        .err()
        .context("a missing CRL must be an error")?;
    let text = error.to_string();
    if !text.contains("missing-crl.der") {
        bail!("error does not name the file: {text}");
    }

    let mut files = ca.server_files();
    files.key = ca.ca_path(); // a certificate where the key should be
    let error = tls::server_config_from_files(&files)
        .err()
        .context("a certificate is not a key")?;
    assert!(
        error.to_string().contains("ca.pem"),
        "error does not name the file: {error}"
    );
    Ok(())
}
