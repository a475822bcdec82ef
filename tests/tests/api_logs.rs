//! Log tail through the operator API end to end: the collector ([`Service`]), a real
//! agent daemon over QUIC with mTLS supervising a component that prints a line every
//! 200 ms. `GET /api/v1/hosts/{host}/components/{component}/logs?follow=true` streams
//! the agent's `LogChunk`s as server-sent events, history first, then new lines; when
//! the client leaves, the subscription ends (the live follows gauge returns to 0) and
//! `CancelTail` reaches the agent, which settles it.
//!
//! The second test runs the `razar-agent` binary (`cargo build -p razar-agent --bins`
//! first) so that its descriptors can be counted: one follow survives a restart of the
//! component and several rotations of its log file, and ends when a reload removes the
//! component, leaving no follow on the collector or the agent and no descriptor of the
//! component's on the agent.

use razar_agent::config::Config;
use razar_agent::daemon::{Daemon, DaemonOptions};
use razar_collector::config::{CollectorConfig, Database, TlsPaths};
use razar_collector::service::Service;
use razar_collector::store::tokens::{self, Role};
use razar_tests::ca::{TestCa, COLLECTOR_NAMES};
use razar_tests::live::{wait_for, PATIENCE};
use razar_tests::pg::TestPg;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

const HOST: &str = "logs-host";

fn free_udp_port() -> u16 {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a probe socket");
    socket.local_addr().expect("probe address").port()
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
    // Some history to tail first: three lines written.
    wait_for("three lines of history", || async {
        let text = http
            .get(format!(
                "{base}/api/v1/hosts/{HOST}/components/talker/logs?lines=3"
            ))
            .bearer_auth(&token)
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        (text.matches("line-").count() >= 3).then_some(())
    })
    .await;
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

/// `log` events seen so far on an SSE body, and whether an `end` event came.
#[derive(Debug, Default)]
struct Sse {
    text: String,
    /// (process id of the run, line number), in order.
    lines: Vec<(u32, u64)>,
    ended: bool,
}

impl Sse {
    /// Appends a chunk of the body and parses the complete events.
    fn push(&mut self, chunk: &[u8]) {
        self.text.push_str(&String::from_utf8_lossy(chunk));
        while let Some(at) = self.text.find("\n\n") {
            let block: String = self.text.drain(..at + 2).collect();
            let mut event = "";
            let mut data = String::new();
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event:") {
                    event = e.trim();
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push_str(d.trim());
                }
            }
            match event {
                "end" => self.ended = true,
                "log" => {
                    let value: serde_json::Value =
                        serde_json::from_str(&data).unwrap_or_else(|e| panic!("{e}: {data}"));
                    for line in value["lines"].as_array().into_iter().flatten() {
                        // "run-<pid> line-<n>"
                        let text = line.as_str().unwrap_or_default();
                        let mut words = text.split(' ');
                        let run = words.next().and_then(|w| w.strip_prefix("run-"));
                        let n = words.next().and_then(|w| w.strip_prefix("line-"));
                        if let (Some(run), Some(n)) = (run, n) {
                            if let (Ok(run), Ok(n)) = (run.parse(), n.parse()) {
                                self.lines.push((run, n));
                            }
                        }
                    }
                }
                _ => {}
            }
        }
    }

    fn runs(&self) -> Vec<u32> {
        let mut runs: Vec<u32> = Vec::new();
        for (run, _) in &self.lines {
            if runs.last() != Some(run) {
                runs.push(*run);
            }
        }
        runs
    }
}

/// Reads the body until `done` holds; panics on a deadline or an early end of the body.
async fn read_until(
    response: &mut reqwest::Response,
    sse: &mut Sse,
    what: &str,
    mut done: impl FnMut(&Sse) -> bool,
) {
    let deadline = Instant::now() + PATIENCE;
    while !done(sse) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "timed out waiting for {what}: {sse:?}");
        match tokio::time::timeout(left, response.chunk()).await {
            Err(_) => panic!("timed out waiting for {what}: {sse:?}"),
            Ok(Err(e)) => panic!("stream error waiting for {what}: {e}"),
            Ok(Ok(None)) => {
                assert!(done(sse), "the stream ended before {what}: {sse:?}");
                return;
            }
            Ok(Ok(Some(chunk))) => sse.push(&chunk),
        }
    }
}

/// The agent's own `/metrics` value of `name`.
async fn agent_metric(
    http: &reqwest::Client,
    data_dir: &std::path::Path,
    name: &str,
) -> Option<f64> {
    let addr = std::fs::read_to_string(data_dir.join("agent.addr")).ok()?;
    let text = http
        .get(format!("http://{}/metrics", addr.trim()))
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

fn inode(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

const KEEPER: &str = "[[component]]\nname = \"keeper\"\ncommand = \"sh\"\nargs = [\"-c\", \"while :; do sleep 1; done\"]\nstop_grace = \"3s\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_follow_survives_a_restart_and_a_rotation_and_ends_with_its_component_leaving_nothing_behind(
) {
    use razar_tests::live::LiveFleet;
    // A line every 100 ms, each run tagged with its pid; ~35 bytes a line in the file,
    // so a 600-byte file rotates every couple of seconds.
    let talker = "[[component]]\nname = \"talker\"\ncommand = \"sh\"\nargs = [\"-c\", \"i=0; while :; do echo run-$$ line-$i; i=$((i+1)); sleep 0.1; done\"]\nstop_grace = \"3s\"\n[component.logs]\nmax_size = \"600B\"\nmax_files = 3\n";
    let fleet = LiveFleet::start("follow-host", &format!("{KEEPER}{talker}")).await;
    let http = reqwest::Client::new();
    let pool = fleet.pool.clone();
    wait_for("talker ready", || async {
        sqlx::query_scalar::<_, String>(
            "SELECT state FROM components WHERE host_id = 'follow-host' AND name = 'talker' AND state = 'ready'",
        )
        .fetch_optional(&pool)
        .await
        .ok()
        .flatten()
    })
    .await;
    let logs = fleet.agent_logs();
    let live_file = logs.join("talker.log");
    wait_for("talker's log file", || async { inode(&live_file) }).await;
    let fds_before = fleet.agent_fds();

    let mut response = http
        .get(format!(
            "{}/api/v1/hosts/follow-host/components/talker/logs?follow=true&lines=2",
            fleet.base
        ))
        .bearer_auth(&fleet.token)
        .send()
        .await
        .expect("response");
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    let mut sse = Sse::default();
    read_until(&mut response, &mut sse, "a few lines", |s| {
        s.lines.len() >= 5
    })
    .await;
    assert_eq!(
        fleet.metric(&http, "razar_collector_log_follows").await,
        Some(1.0)
    );
    let data_dir = fleet.path("agent-data");
    wait_for("the agent's follower gauge at 1", || async {
        (agent_metric(&http, &data_dir, "razar_log_followers").await == Some(1.0)).then_some(())
    })
    .await;

    // Rotation: the live file is renamed and a new one opened, twice; lines keep coming.
    let first = inode(&live_file).expect("live file");
    let seen = sse.lines.len();
    read_until(&mut response, &mut sse, "a rotation", |s| {
        s.lines.len() > seen && inode(&live_file).is_some_and(|i| i != first)
    })
    .await;
    let second = inode(&live_file).expect("live file");
    let seen = sse.lines.len();
    read_until(
        &mut response,
        &mut sse,
        "lines after a second rotation",
        |s| s.lines.len() > seen + 5 && inode(&live_file).is_some_and(|i| i != second),
    )
    .await;
    assert!(logs.join("talker.log.1").exists());

    // Restart: the same follow carries the new process's lines.
    let runs_before = sse.runs();
    assert_eq!(runs_before.len(), 1, "{sse:?}");
    fleet.agent_cli(&["restart", "talker"]);
    read_until(
        &mut response,
        &mut sse,
        "lines of the restarted process",
        |s| {
            s.runs().len() >= 2 && s.lines.iter().filter(|(r, _)| *r != runs_before[0]).count() >= 5
        },
    )
    .await;
    // In order within each run, none twice.
    for run in sse.runs() {
        let numbers: Vec<u64> = sse
            .lines
            .iter()
            .filter(|(r, _)| *r == run)
            .map(|(_, n)| *n)
            .collect();
        assert!(
            numbers.windows(2).all(|w| w[1] > w[0]),
            "run {run}: {numbers:?}"
        );
    }
    assert!(!sse.ended);

    // Removed by a reload: the follow ends with an `end` event and the body closes.
    fleet.write_components(KEEPER);
    fleet.agent_cli(&["reload"]);
    read_until(&mut response, &mut sse, "the end of the follow", |s| {
        s.ended
    })
    .await;
    let rest = tokio::time::timeout(PATIENCE, response.chunk())
        .await
        .expect("the body closes after `end`")
        .expect("stream");
    assert!(rest.is_none(), "more after `end`: {rest:?}");
    drop(response);

    wait_for("no follow left on the collector", || async {
        (fleet.metric(&http, "razar_collector_log_follows").await == Some(0.0)).then_some(())
    })
    .await;
    wait_for("no follower left on the agent", || async {
        (agent_metric(&http, &data_dir, "razar_log_followers").await == Some(0.0)).then_some(())
    })
    .await;
    // No descriptor of the agent's left on the component's log files or pipes, and no
    // more descriptors than before the follow.
    let talker_fds = |fds: &[std::path::PathBuf]| -> Vec<std::path::PathBuf> {
        fds.iter()
            .filter(|p| p.to_string_lossy().contains("talker"))
            .cloned()
            .collect()
    };
    assert!(!talker_fds(&fds_before).is_empty(), "{fds_before:?}");
    let mut last = Vec::new();
    let settled = tokio::time::timeout(PATIENCE, async {
        loop {
            last = fleet.agent_fds();
            if talker_fds(&last).is_empty() && last.len() <= fds_before.len() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(
        settled.is_ok(),
        "agent descriptors before {fds_before:?}, now {last:?}\n{}",
        fleet.agent_log()
    );
    fleet.shutdown().await;
}
