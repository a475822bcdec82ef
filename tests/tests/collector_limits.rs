//! The real collector (in this process, with a private PostgreSQL and real QUIC with
//! mTLS on loopback) against peers that misbehave:
//!
//! - every kind of bad client is refused and counted under its own typed reason in
//!   `razar_collector_connections_refused_total{reason}` (an expired certificate and one
//!   not yet valid send the same TLS alert, yet are counted apart);
//! - a peer with a valid certificate that never reads its stream is closed as
//!   `slow_reader` and counted in `razar_collector_connections_closed_total{reason}`,
//!   with the collector's memory bounded, while a legitimate agent streaming at the same
//!   time loses nothing;
//! - a CRL reload closes the open connection of a revoked certificate and counts it.

use anyhow::Context;
use quinn::crypto::rustls::QuicClientConfig;
use quinn::ConnectionError;
use razar_agent::spool::Spool;
use razar_agent::uplink::{close_code, Backoff, Uplink, UplinkConfig};
use razar_certs::{IssueOptions, Issued, Validity};
use razar_collector::server::prometheus::{Registry, TextEncoder};
use razar_collector::server::{Collector, IngestConfig, IngestMetrics};
use razar_shared::protocol::codec::{encode_agent, encode_into, CollectorFrameDecoder};
use razar_shared::protocol::{
    AgentMessage, CollectorMessage, Heartbeat, Hello, SeriesPoints, SessionConfig, StatusDigest,
    ALPN, PROTOCOL_MAX, PROTOCOL_MIN,
};
use razar_shared::tls;
use razar_tests::ca::TestCa;
use razar_tests::fixtures::now_ms;
use razar_tests::pg::TestPg;
use sqlx::PgPool;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Upper bound for anything to happen; reached only when something is broken.
const DEADLINE: Duration = Duration::from_secs(60);

/// A collector serving on loopback, with its database.
struct Running {
    collector: Collector,
    registry: Registry,
    pool: PgPool,
    _pg: TestPg,
}

/// Starts a collector whose TLS config records typed refusals, as the service builds it.
async fn start_collector(
    ca: &TestCa,
    configure: impl FnOnce(&mut IngestConfig),
) -> anyhow::Result<Running> {
    let pg = TestPg::start().await?;
    let store = pg.store().await?;
    let pool = pg.pool().await?;
    let placeholder = Arc::new(ca.server_config()?);
    let mut config = IngestConfig::new("127.0.0.1:0".parse()?, placeholder, ca.crls()?);
    config.tls = Arc::new(tls::server_config_from_files_tracked(
        &ca.server_files(),
        &config.refusals,
    )?);
    config.session = SessionConfig {
        heartbeat_interval_ms: 250,
        lost_after_missed: 8,
        max_unacked_batches: 64,
    };
    config.db_writers = 2;
    configure(&mut config);
    let registry = Registry::new();
    let collector = Collector::start(config, store, &registry).await?;
    Ok(Running {
        collector,
        registry,
        pool,
        _pg: pg,
    })
}

fn client_endpoint(config: rustls::ClientConfig) -> anyhow::Result<quinn::Endpoint> {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let crypto = QuicClientConfig::try_from(Arc::new(config))?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    Ok(endpoint)
}

fn hello(host: &str) -> Hello {
    Hello {
        protocol_min: PROTOCOL_MIN,
        protocol_max: PROTOCOL_MAX,
        host_id: host.into(),
        agent_version: "test".into(),
        profile: String::new(),
        components: Vec::new(),
        gpus: Vec::new(),
        last_acked_seq: 0,
        agent_time_ms: now_ms(),
    }
}

/// Connects with `config`, sends a `Hello` for `host` and waits for the connection to
/// be closed or welcomed; returns the close error, if any.
async fn try_connect(
    addr: std::net::SocketAddr,
    config: rustls::ClientConfig,
    host: &str,
) -> anyhow::Result<Option<ConnectionError>> {
    let endpoint = client_endpoint(config)?;
    let outcome = tokio::time::timeout(DEADLINE, async {
        let conn = match endpoint.connect(addr, "localhost")?.await {
            Ok(conn) => conn,
            Err(error) => return Ok::<_, anyhow::Error>(Some(error)),
        };
        // In TLS 1.3 the client finishes first: the proof is the Welcome, or the close.
        let (mut send, mut recv) = match conn.open_bi().await {
            Ok(streams) => streams,
            Err(error) => return Ok(Some(error)),
        };
        if send
            .write_all(&encode_agent(&AgentMessage::Hello(hello(host)))?)
            .await
            .is_err()
        {
            return Ok(Some(conn.closed().await));
        }
        // The first message: a Welcome, or a Refusal followed by the close.
        let mut decoder = CollectorFrameDecoder::new();
        let welcomed = loop {
            match recv.read_chunk(1024, true).await {
                Ok(Some(chunk)) => {
                    let mut input = &chunk.bytes[..];
                    match decoder.feed(&mut input) {
                        Ok(Some(message)) => {
                            break matches!(message, CollectorMessage::Welcome(_));
                        }
                        Ok(None) => {}
                        Err(_) => break false,
                    }
                }
                _ => break false,
            }
        };
        let outcome = if welcomed {
            None
        } else {
            Some(conn.closed().await)
        };
        conn.close(0u32.into(), b"done");
        Ok(outcome)
    })
    .await
    .context("no answer from the collector before the deadline")??;
    endpoint.close(0u32.into(), b"done");
    Ok(outcome)
}

fn refused(metrics: &IngestMetrics, reason: &str) -> u64 {
    metrics.refused.with_label_values(&[reason]).get()
}

fn closed(metrics: &IngestMetrics, reason: &str) -> u64 {
    metrics.closed.with_label_values(&[reason]).get()
}

/// Every `reason` of a counter in the exposition with its value (non-zero ones),
/// sorted: what `/metrics` shows.
fn counts(registry: &Registry, name: &str) -> Vec<(String, u64)> {
    let text = TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap_or_default();
    let prefix = format!("{name}{{reason=\"");
    let mut all: Vec<(String, u64)> = text
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(&prefix)?;
            let (reason, value) = rest.split_once("\"} ")?;
            Some((reason.to_string(), value.trim().parse().ok()?))
        })
        .filter(|(_, v)| *v > 0)
        .collect();
    all.sort();
    all
}

fn refusals(running: &Running) -> Vec<(String, u64)> {
    counts(
        &running.registry,
        "razar_collector_connections_refused_total",
    )
}

fn closes(running: &Running) -> Vec<(String, u64)> {
    counts(
        &running.registry,
        "razar_collector_connections_closed_total",
    )
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

fn config_for(ca: &TestCa, issued: &Issued) -> anyhow::Result<rustls::ClientConfig> {
    Ok(tls::client_config(
        ca.ca_pem().as_bytes(),
        issued.cert_pem.as_bytes(),
        issued.key_pem.as_bytes(),
    )?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_is_counted_under_its_typed_reason() -> anyhow::Result<()> {
    let mut ca = TestCa::new()?;
    let good = ca.agent("gpu-01")?;
    let foreign = ca.other_ca_agent("gpu-02")?;
    let impostor = ca.impostor_ca_agent("gpu-03")?;
    let expired = ca.expired_agent("gpu-04")?;
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let not_yet_valid = ca.ca().issue_agent(
        "gpu-05",
        &IssueOptions {
            validity: Validity::between(now + day, now + 10 * day),
            force: false,
        },
    )?;
    let revoked = ca.agent("gpu-06")?;
    ca.revoke(&revoked)?;
    let running = start_collector(&ca, |_| {}).await?;
    let addr = running.collector.local_addr();
    let metrics = running.collector.metrics();

    let mut wrong_alpn = config_for(&ca, &good)?;
    wrong_alpn.alpn_protocols = vec![b"razar/0".to_vec()];
    let cases: Vec<(&str, rustls::ClientConfig, &str, &str)> = vec![
        (
            "no client certificate",
            client_without_certificate(&ca)?,
            "gpu-01",
            "no_client_certificate",
        ),
        (
            "certificate from another CA",
            config_for(&ca, &foreign)?,
            "gpu-02",
            "unknown_issuer",
        ),
        (
            "certificate from an impostor CA with the fleet CA's name",
            config_for(&ca, &impostor)?,
            "gpu-03",
            "unknown_issuer",
        ),
        (
            "expired certificate",
            config_for(&ca, &expired)?,
            "gpu-04",
            "certificate_expired",
        ),
        (
            "certificate not yet valid",
            config_for(&ca, &not_yet_valid)?,
            "gpu-05",
            "certificate_not_yet_valid",
        ),
        (
            "revoked certificate",
            config_for(&ca, &revoked)?,
            "gpu-06",
            "certificate_revoked",
        ),
        ("wrong ALPN", wrong_alpn, "gpu-01", "alpn_mismatch"),
        (
            "host id not matching the certificate",
            config_for(&ca, &good)?,
            "gpu-99",
            "host_id_mismatch",
        ),
    ];
    for (case, config, host, reason) in cases {
        let before = refusals(&running);
        let error = try_connect(addr, config, host)
            .await
            .with_context(|| format!("case {case}"))?;
        assert!(error.is_some(), "case {case}: the client was welcomed");
        // The refusal is counted when the server side of the handshake ends.
        let deadline = Instant::now() + DEADLINE;
        while refused(metrics, reason) == 0 {
            assert!(
                Instant::now() < deadline,
                "case {case}: `{reason}` not counted; counted: {:?}",
                refusals(&running)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut expected = before.clone();
        match expected.iter_mut().find(|(label, _)| label == reason) {
            Some((_, n)) => *n += 1,
            None => {
                expected.push((reason.to_string(), 1));
                expected.sort();
            }
        }
        assert_eq!(
            refusals(&running),
            expected,
            "case {case}: exactly one refusal, under `{reason}`"
        );
    }

    // The collector keeps welcoming valid agents after all of that.
    assert!(try_connect(addr, config_for(&ca, &good)?, "gpu-01")
        .await?
        .is_none());
    running.collector.shutdown(Duration::from_secs(5)).await;
    Ok(())
}

/// A peer with a valid certificate that is welcomed, then sends heartbeats as fast as
/// its stream takes them and never reads again. Returns how its connection was closed.
async fn never_reading_peer(
    addr: std::net::SocketAddr,
    config: rustls::ClientConfig,
    host: &str,
) -> anyhow::Result<ConnectionError> {
    let endpoint = client_endpoint(config)?;
    let conn = endpoint.connect(addr, "localhost")?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&encode_agent(&AgentMessage::Hello(hello(host)))?)
        .await?;
    // Read the Welcome, and never read again.
    let mut decoder = CollectorFrameDecoder::new();
    let mut pending = Vec::new();
    loop {
        let mut input = &pending[..];
        if let Some(message) = decoder.feed(&mut input)? {
            anyhow::ensure!(
                matches!(message, CollectorMessage::Welcome(_)),
                "expected a Welcome, got {message:?}"
            );
            break;
        }
        let chunk = recv
            .read_chunk(1024, true)
            .await?
            .context("stream ended before the Welcome")?;
        pending.extend_from_slice(&chunk.bytes);
    }
    let heartbeat = AgentMessage::Heartbeat(Heartbeat {
        agent_time_ms: now_ms(),
        digest: StatusDigest::default(),
    });
    let mut burst = Vec::new();
    for _ in 0..1_000 {
        encode_into(&heartbeat, &mut burst)?;
    }
    let flood = async { while send.write_all(&burst).await.is_ok() {} };
    let closed = tokio::select! {
        _ = flood => conn.closed().await,
        error = conn.closed() => error,
    };
    drop(recv);
    endpoint.close(0u32.into(), b"done");
    Ok(closed)
}

/// Resident memory of this process (the collector runs in it), from /proc.
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

async fn samples_of(pool: &PgPool, host: &str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM samples x JOIN series s ON s.series_id = x.series_id
         WHERE s.host_id = $1",
    )
    .bind(host)
    .fetch_one(pool)
    .await?)
}

fn uplink(ca: &TestCa, agent: &Issued, addr: std::net::SocketAddr, spool: Arc<Spool>) -> Uplink {
    let tls = ca.client_config(agent).expect("client TLS config");
    let mut config = UplinkConfig::new(addr.to_string(), "localhost", Arc::new(tls), "gpu-good");
    config.backoff = Backoff::try_new(Duration::from_millis(50), Duration::from_millis(400), 0.5)
        .expect("backoff");
    config.connect_timeout = Duration::from_secs(5);
    let (uplink, _commands) = Uplink::spawn(config, spool).expect("uplink");
    uplink
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads_is_closed_while_an_agent_streams() -> anyhow::Result<()> {
    let mut ca = TestCa::new()?;
    let slow = ca.agent("gpu-slow")?;
    let good = ca.agent("gpu-good")?;
    let running = start_collector(&ca, |c| {
        c.max_pending_reply_bytes = 64 * 1024;
        c.reply_stall_timeout = Duration::from_secs(2);
    })
    .await?;
    let addr = running.collector.local_addr();
    let metrics = running.collector.metrics();
    let rss_before = rss_bytes();

    // The legitimate agent streams all along.
    let dir = tempfile::tempdir()?;
    let spool = Arc::new(Spool::open(dir.path().join("spool.redb"), u64::MAX)?);
    let agent = uplink(&ca, &good, addr, spool.clone());
    let series: Vec<u32> = (0..4)
        .map(|g| spool.series_id("gpu_utilization_ratio", &[("gpu".into(), g.to_string())]))
        .collect::<Result<_, _>>()?;
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let producer = tokio::spawn(async move {
        let mut produced = 0i64;
        let mut k = 0i64;
        loop {
            let base = now_ms() - 60_000 + k;
            let points: Vec<SeriesPoints> = series
                .iter()
                .map(|id| SeriesPoints {
                    series: *id,
                    points: (0..10).map(|j| (j, (k + i64::from(j)) as f64)).collect(),
                })
                .collect();
            let samples: i64 = points.iter().map(|p| p.points.len() as i64).sum();
            agent.publish(base, points, Vec::new()).await?;
            produced += samples;
            k += 10;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = stop_rx.changed() => break,
            }
        }
        Ok::<_, anyhow::Error>((agent, produced))
    });

    let closed_error = tokio::time::timeout(
        DEADLINE,
        never_reading_peer(addr, config_for(&ca, &slow)?, "gpu-slow"),
    )
    .await
    .context("the peer that never reads was not closed in time")??;
    match &closed_error {
        ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, close_code::REFUSED.into());
            assert_eq!(&close.reason[..], b"slow_reader");
        }
        other => panic!("the peer was closed for another reason: {other}"),
    }
    assert_eq!(closed(metrics, "slow_reader"), 1);
    let rss_after = rss_bytes();

    stop_tx.send_replace(true);
    let (agent, produced) = producer.await??;
    let deadline = Instant::now() + DEADLINE;
    loop {
        let stored = samples_of(&running.pool, "gpu-good").await?;
        if stored == produced && spool.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the streaming agent lost data: {stored} of {produced} samples stored"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Nothing of the legitimate agent was closed by the collector.
    assert_eq!(closes(&running), vec![("slow_reader".to_string(), 1)]);
    // A coarse bound only (the whole test process): before the fix this grew by
    // hundreds of MiB within seconds and the peer was never closed.
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        let grown = after.saturating_sub(before);
        eprintln!("RSS grew {} KiB while the peer was connected", grown / 1024);
        assert!(grown < 200 << 20, "RSS grew {grown} bytes");
    }
    agent.shutdown().await;
    running.collector.shutdown(Duration::from_secs(5)).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crl_reload_closes_the_revoked_connection_and_counts_it() -> anyhow::Result<()> {
    let mut ca = TestCa::new()?;
    let doomed = ca.agent("gpu-doomed")?;
    let bystander = ca.agent("gpu-bystander")?;
    let running = start_collector(&ca, |_| {}).await?;
    let addr = running.collector.local_addr();

    let mut open = Vec::new();
    for (issued, host) in [(&doomed, "gpu-doomed"), (&bystander, "gpu-bystander")] {
        let endpoint = client_endpoint(config_for(&ca, issued)?)?;
        let conn = endpoint.connect(addr, "localhost")?.await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(&encode_agent(&AgentMessage::Hello(hello(host)))?)
            .await?;
        let mut buf = [0u8; 1024];
        tokio::time::timeout(DEADLINE, recv.read(&mut buf))
            .await
            .context("no Welcome in time")??
            .context("stream ended before the Welcome")?;
        open.push((endpoint, conn, send, recv));
    }
    ca.revoke(&doomed)?;
    let closed_now = running.collector.reload_tls_files(&ca.server_files())?;
    assert_eq!(closed_now, 1);
    let error = tokio::time::timeout(DEADLINE, open[0].1.closed())
        .await
        .context("the revoked connection stayed open")?;
    match error {
        ConnectionError::ApplicationClosed(close) => assert_eq!(&close.reason[..], b"revoked"),
        other => panic!("closed for another reason: {other}"),
    }
    assert!(
        open[1].1.close_reason().is_none(),
        "the bystander was closed"
    );
    let metrics = running.collector.metrics();
    assert_eq!(closes(&running), vec![("revoked".to_string(), 1)]);
    // The reloaded config keeps the typed refusals: the revoked certificate is refused
    // as such on a new connection.
    assert!(try_connect(addr, config_for(&ca, &doomed)?, "gpu-doomed")
        .await?
        .is_some());
    let deadline = Instant::now() + DEADLINE;
    while refused(metrics, "certificate_revoked") == 0 {
        assert!(Instant::now() < deadline, "{:?}", refusals(&running));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (endpoint, conn, _, _) in open {
        conn.close(0u32.into(), b"done");
        endpoint.close(0u32.into(), b"done");
    }
    running.collector.shutdown(Duration::from_secs(5)).await;
    Ok(())
}

/// Connects with a valid certificate for `host`; with `hello`, sends a `Hello` and reads
/// the `Welcome`.
async fn welcomed_peer(
    addr: std::net::SocketAddr,
    config: rustls::ClientConfig,
    host: &str,
) -> anyhow::Result<(
    quinn::Endpoint,
    quinn::Connection,
    quinn::SendStream,
    quinn::RecvStream,
)> {
    let endpoint = client_endpoint(config)?;
    let conn = endpoint.connect(addr, "localhost")?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&encode_agent(&AgentMessage::Hello(hello(host)))?)
        .await?;
    let mut decoder = CollectorFrameDecoder::new();
    loop {
        let chunk = tokio::time::timeout(DEADLINE, recv.read_chunk(1024, true))
            .await
            .context("no Welcome in time")??
            .context("stream ended before the Welcome")?;
        let mut input = &chunk.bytes[..];
        if let Some(message) = decoder.feed(&mut input)? {
            anyhow::ensure!(
                matches!(message, CollectorMessage::Welcome(_)),
                "expected a Welcome, got {message:?}"
            );
            return Ok((endpoint, conn, send, recv));
        }
    }
}

async fn closed_in_time(conn: &quinn::Connection) -> anyhow::Result<(u64, String)> {
    match tokio::time::timeout(DEADLINE, conn.closed())
        .await
        .context("the collector did not close the connection")?
    {
        ConnectionError::ApplicationClosed(close) => Ok((
            close.error_code.into(),
            String::from_utf8_lossy(&close.reason).into_owned(),
        )),
        other => anyhow::bail!("closed otherwise: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closes_the_collector_makes_on_its_own_are_counted_by_reason() -> anyhow::Result<()> {
    let mut ca = TestCa::new()?;
    let mute = ca.agent("gpu-mute")?;
    let silent = ca.agent("gpu-silent")?;
    let trickle = ca.agent("gpu-trickle")?;
    let running = start_collector(&ca, |c| c.hello_timeout = Duration::from_millis(500)).await?;
    let addr = running.collector.local_addr();

    // Never opens its stream: no Hello within the hello timeout.
    let endpoint = client_endpoint(config_for(&ca, &mute)?)?;
    let conn = endpoint.connect(addr, "localhost")?.await?;
    let (code, reason) = closed_in_time(&conn).await?;
    assert_eq!(
        (code, reason.as_str()),
        (close_code::REFUSED.into(), "hello_timeout")
    );
    endpoint.close(0u32.into(), b"done");

    // Welcomed, then silent past the heartbeat grace.
    let (endpoint, conn, _send, _recv) =
        welcomed_peer(addr, config_for(&ca, &silent)?, "gpu-silent").await?;
    let (code, _) = closed_in_time(&conn).await?;
    assert_eq!(code, u64::from(close_code::PEER_LOST));
    endpoint.close(0u32.into(), b"done");

    // Welcomed, then stops in the middle of a frame.
    let (endpoint, conn, mut send, _recv) =
        welcomed_peer(addr, config_for(&ca, &trickle)?, "gpu-trickle").await?;
    let frame = encode_agent(&AgentMessage::Heartbeat(Heartbeat {
        agent_time_ms: now_ms(),
        digest: StatusDigest::default(),
    }))?;
    send.write_all(&frame[..frame.len() / 2]).await?;
    let (code, reason) = closed_in_time(&conn).await?;
    assert_eq!(code, u64::from(close_code::PEER_LOST));
    assert_eq!(reason, "partial frame past the grace");
    endpoint.close(0u32.into(), b"done");

    assert_eq!(
        closes(&running),
        vec![
            ("hello_timeout".to_string(), 1),
            ("partial_frame".to_string(), 1),
            ("peer_lost".to_string(), 1),
        ]
    );
    running.collector.shutdown(Duration::from_secs(5)).await;
    Ok(())
}

/// The figure for BENCHMARKS.md, and a check that runs in CI: a peer that never reads
/// connects again each time it is closed, for `RAZAR_FIGURE_SECS` (default 12; the
/// figure uses 60); every connection must be closed as `slow_reader` and counted. Prints
/// how long each took to be closed and the process's RSS (collector and peer share this
/// process) against the baseline before it came; no timing is asserted.
/// `RAZAR_FIGURE_SECS=60 cargo test -p razar-tests --test collector_limits figure -- --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn figure_rss_under_a_peer_that_never_reads() -> anyhow::Result<()> {
    let window = Duration::from_secs(
        std::env::var("RAZAR_FIGURE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(12),
    );
    let mut ca = TestCa::new()?;
    let slow = ca.agent("gpu-slow")?;
    // The defaults: 256 KiB of replies per connection, 5 s to start taking them.
    let running = start_collector(&ca, |_| {}).await?;
    let addr = running.collector.local_addr();
    let baseline = rss_bytes().context("no /proc/self/status")?;
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(baseline));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                if let Some(rss) = rss_bytes() {
                    peak.fetch_max(rss, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let start = Instant::now();
    let mut closes = Vec::new();
    while start.elapsed() < window {
        let began = Instant::now();
        let error = tokio::time::timeout(
            Duration::from_secs(60),
            never_reading_peer(addr, config_for(&ca, &slow)?, "gpu-slow"),
        )
        .await;
        let took = began.elapsed();
        let why = match error {
            Ok(Ok(ConnectionError::ApplicationClosed(close))) => {
                String::from_utf8_lossy(&close.reason).into_owned()
            }
            Ok(Ok(other)) => other.to_string(),
            Ok(Err(e)) => format!("peer error: {e}"),
            Err(_) => "not closed within 60 s".into(),
        };
        println!("peer closed after {:.2} s: {why}", took.as_secs_f64());
        assert_eq!(
            why, "slow_reader",
            "each connection is closed as a slow reader"
        );
        closes.push(took);
    }
    sampler.abort();
    let end = rss_bytes().unwrap_or(0);
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
    let slowest = closes.iter().max().copied().unwrap_or_default();
    println!(
        "FIGURE slow_reader: {} connections in {} s, slowest closed after {:.2} s; RSS baseline {:.1} MiB, peak {:.1} MiB (+{:.1}), end {:.1} MiB; closed_total{{slow_reader}} = {:?}",
        closes.len(),
        window.as_secs(),
        slowest.as_secs_f64(),
        mib(baseline),
        mib(peak),
        mib(peak.saturating_sub(baseline)),
        mib(end),
        closes_of(&running, "slow_reader"),
    );
    assert!(!closes.is_empty(), "the peer was never closed");
    assert_eq!(
        closes_of(&running, "slow_reader"),
        u64::try_from(closes.len())?,
        "every close counted under slow_reader"
    );
    running.collector.shutdown(Duration::from_secs(5)).await;
    Ok(())
}

fn closes_of(running: &Running, reason: &str) -> u64 {
    closes(running)
        .into_iter()
        .find(|(r, _)| r == reason)
        .map_or(0, |(_, n)| n)
}
