//! Log tail through the operator API end to end: the collector ([`Service`]), a real
//! agent daemon over QUIC with mTLS supervising a component that prints a line every
//! 200 ms. `GET /api/v1/hosts/{host}/components/{component}/logs?follow=true` streams
//! the agent's `LogChunk`s as server-sent events, history first, then new lines; when
//! the client leaves, the subscription ends (the live follows gauge returns to 0) and
//! `CancelTail` reaches the agent, which settles it.

use razar_agent::config::Config;
use razar_agent::daemon::{Daemon, DaemonOptions};
use razar_collector::config::{CollectorConfig, Database, TlsPaths};
use razar_collector::service::Service;
use razar_collector::store::tokens::{self, Role};
use razar_tests::ca::{TestCa, COLLECTOR_NAMES};
use razar_tests::pg::TestPg;
use std::future::Future;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

const HOST: &str = "logs-host";
const PATIENCE: Duration = Duration::from_secs(60);

fn free_udp_port() -> u16 {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a probe socket");
    socket.local_addr().expect("probe address").port()
}

async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn metric(http: &reqwest::Client, base: &str, name: &str) -> Option<f64> {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followed_log_streams_agent_lines_and_ends_on_the_agent_when_the_client_leaves() {
    let mut ca = TestCa::new().expect("test CA");
    let agent_cert = ca.agent(HOST).expect("agent certificate");
    let pg = TestPg::start().await.expect("PostgreSQL");
    let dir = tempfile::tempdir().expect("test dir");
    let quic_port = free_udp_port();
    let mut c = CollectorConfig::defaults(&dir.path().join("collector"));
    c.quic_listen = ([127, 0, 0, 1], quic_port).into();
    c.http_listen = ([127, 0, 0, 1], 0).into();
    c.tls = TlsPaths {
        ca: ca.ca_path(),
        cert: ca.collector().cert_path.clone(),
        key: ca.collector().key_path.clone(),
        crl: Some(ca.crl_path()),
    };
    c.database = Database::Url(pg.url());
    c.pool_size = NonZeroU32::new(6).expect("nonzero");
    c.ingest_writers = NonZeroU32::new(1).expect("nonzero");
    c.heartbeat_interval = Duration::from_millis(250);
    c.health.database_slow = Duration::from_secs(30);
    let service = Service::start(c).await.expect("collector");
    let base = format!("http://{}", service.http_addr());
    let pool = pg.pool().await.expect("pool");

    let files = ca.client_files(&agent_cert);
    let d = dir.path();
    let text = format!(
        "[agent]\nprofile = \"core\"\ndata_dir = \"{d}/data\"\nlog_dir = \"{d}/logs\"\nlisten = \"127.0.0.1:0\"\n\n\
         [collector]\naddress = \"127.0.0.1:{quic_port}\"\nserver_name = \"{name}\"\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\n\
         [[component]]\nname = \"talker\"\ncommand = \"sh\"\nargs = [\"-c\", \"i=0; while true; do echo line-$i; i=$((i+1)); sleep 0.2; done\"]\n",
        d = d.display(),
        name = COLLECTOR_NAMES[0],
        ca = files.ca.display(),
        cert = files.cert.display(),
        key = files.key.display(),
    );
    let path = d.join("agent.toml");
    std::fs::write(&path, &text).expect("agent config");
    let config = Config::load(&path).unwrap_or_else(|e| panic!("agent config: {e}"));
    let daemon = Daemon::start(
        config,
        DaemonOptions {
            listen: Some(([127, 0, 0, 1], 0).into()),
            ..DaemonOptions::default()
        },
    )
    .await
    .expect("agent");
    wait_for("the component in the inventory", || async {
        sqlx::query_scalar::<_, String>(
            "SELECT state FROM components WHERE host_id = $1 AND name = 'talker'",
        )
        .bind(HOST)
        .fetch_optional(&pool)
        .await
        .ok()
        .flatten()
    })
    .await;
    let (_, token) = tokens::create(&pool, "ops", Role::Operator, None, None)
        .await
        .expect("token");
    let http = reqwest::Client::new();
    // Some history to tail first.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut response = http
        .get(format!(
            "{base}/api/v1/hosts/{HOST}/components/talker/logs?follow=true&lines=3"
        ))
        .bearer_auth(&token)
        .send()
        .await
        .expect("response");
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    let mut text = String::new();
    let deadline = Instant::now() + PATIENCE;
    let mut numbers: Vec<u64> = Vec::new();
    while numbers.len() < 10 {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "lines so far: {text}");
        let chunk = tokio::time::timeout(left, response.chunk())
            .await
            .unwrap_or_else(|_| panic!("lines so far: {text}"))
            .expect("stream")
            .unwrap_or_else(|| panic!("the follow ended early: {text}"));
        text.push_str(&String::from_utf8_lossy(&chunk));
        numbers = text
            .split("line-")
            .skip(1)
            .filter_map(|s| {
                s.chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
                    .parse()
                    .ok()
            })
            .collect();
    }
    assert!(text.contains("event: log"), "{text}");
    // History then live lines, in order, none twice.
    assert!(numbers.windows(2).all(|w| w[1] > w[0]), "{numbers:?}");
    assert_eq!(
        metric(&http, &base, "razar_collector_log_follows").await,
        Some(1.0)
    );
    drop(response);
    wait_for("the follow to end on the collector", || async {
        (metric(&http, &base, "razar_collector_log_follows").await == Some(0.0)).then_some(())
    })
    .await;
    let state: String = wait_for("CancelTail to be settled by the agent", || async {
        sqlx::query_scalar::<_, String>(
            "SELECT state FROM commands WHERE kind = 'cancel_tail' AND state IN ('succeeded', 'failed')",
        )
        .fetch_optional(&pool)
        .await
        .ok()
        .flatten()
    })
    .await;
    assert_eq!(state, "succeeded");
    daemon.shutdown().await;
    service.shutdown().await;
}
