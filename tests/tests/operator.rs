//! The operator's surfaces against a live collector ([`Service`] in-process, a private
//! PostgreSQL, real HTTP):
//!
//! - `/metrics` carries the collector's scrape-time gauges (ingest lag, database pool,
//!   certificate expiry) and `/metrics/fleet` the fleet's latest state from the store
//!   (hosts, components, GPU inventory, the newest GPU samples within the window and
//!   none older); `promtool check metrics` passes on both;
//! - the `razar` CLI (the built binary, `cargo build -p razar-cli`): health in every
//!   output format, the server from the config file, the API's errors shown with exit
//!   code 1, bad usage with exit code 2.

use razar_collector::config::{CollectorConfig, Database, TlsPaths};
use razar_collector::service::Service;
use razar_tests::ca::TestCa;
use razar_tests::pg::TestPg;
use serde_json::Value;
use sqlx::PgPool;
use std::io::Write as _;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A binary built by this workspace, next to the test executable.
fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test executable");
    // target/<profile>/deps/operator-XXXX → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not found: build it first with `cargo build -p razar-cli`",
        path.display()
    );
    path
}

fn free_udp_port() -> u16 {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a probe socket");
    socket.local_addr().expect("probe address").port()
}

struct Fixture {
    _ca: TestCa,
    _pg: TestPg,
    pool: PgPool,
    service: Option<Service>,
    http: reqwest::Client,
    dir: tempfile::TempDir,
}

impl Fixture {
    async fn start() -> Fixture {
        let ca = TestCa::new().expect("test CA");
        let pg = TestPg::start().await.expect("PostgreSQL");
        pg.store().await.expect("migrated store").close().await;
        let pool = pg.pool().await.expect("pool");
        let dir = tempfile::tempdir().expect("test dir");
        let mut c = CollectorConfig::defaults(&dir.path().join("collector"));
        c.http_listen = ([127, 0, 0, 1], 0).into();
        c.tls = TlsPaths {
            ca: ca.ca_path(),
            cert: ca.collector().cert_path.clone(),
            key: ca.collector().key_path.clone(),
            crl: Some(ca.crl_path()),
        };
        c.database = Database::Url(pg.url());
        c.pool_size = NonZeroU32::new(4).expect("nonzero");
        c.ingest_writers = NonZeroU32::new(1).expect("nonzero");
        let deadline = Instant::now() + Duration::from_secs(10);
        let service = loop {
            c.quic_listen = ([127, 0, 0, 1], free_udp_port()).into();
            match Service::start(c.clone()).await {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("collector start: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("collector start: {e}"),
            }
        };
        Fixture {
            _ca: ca,
            _pg: pg,
            pool,
            service: Some(service),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("HTTP client"),
            dir,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.service.as_ref().expect("running").http_addr()
    }

    fn server(&self) -> String {
        format!("http://{}", self.addr())
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let response = self
            .http
            .get(format!("{}{path}", self.server()))
            .send()
            .await
            .expect("GET");
        let status = response.status().as_u16();
        (status, response.text().await.expect("body"))
    }

    /// Runs `razar` with these arguments and environment (nothing inherited that could
    /// point it elsewhere: no HOME, no RAZAR_*).
    async fn razar(&self, args: &[&str], env: &[(&str, String)]) -> Output {
        let mut cmd = Command::new(binary("razar"));
        cmd.args(args)
            .env_clear()
            .env("HOME", self.dir.path())
            .stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        tokio::task::spawn_blocking(move || cmd.output().expect("run razar"))
            .await
            .expect("razar finished")
    }

    async fn stop(mut self) {
        if let Some(s) = self.service.take() {
            s.shutdown().await;
        }
    }
}

/// `promtool check metrics` on a page: its findings, empty when clean.
fn promtool(page: &str) -> String {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) is installed");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(page.as_bytes())
        .expect("write the page");
    let out = child.wait_with_output().expect("promtool ran");
    let findings = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        findings.trim().to_owned()
    } else {
        format!("exit {:?}: {findings}", out.status.code())
    }
}

/// The value of the one sample line starting with `series ` on a page.
fn value_of(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A seeded series: metric, labels (JSON) and its points as (age in ms, value).
type Seeded = (&'static str, &'static str, &'static [(i64, f64)]);

async fn seed_fleet(pool: &PgPool) {
    let now = chrono::Utc::now();
    for (host, state) in [("fleet-a", "online"), ("fleet-b", "lost")] {
        sqlx::query(
            "INSERT INTO hosts (host_id, first_seen, last_seen, state, agent_version, profile)
             VALUES ($1, $2, $2, $3, '0.1.0', 'train \"x\"')",
        )
        .bind(host)
        .bind(now)
        .bind(state)
        .execute(pool)
        .await
        .expect("host");
    }
    for (name, state) in [("trainer", "ready"), ("side\\car", "backoff")] {
        sqlx::query(
            "INSERT INTO components (host_id, name, state, revision, critical, updated_at)
             VALUES ('fleet-a', $1, $2, 'r1', true, $3)",
        )
        .bind(name)
        .bind(state)
        .bind(now)
        .execute(pool)
        .await
        .expect("component");
    }
    sqlx::query(
        "INSERT INTO gpus (host_id, gpu_index, uuid, name, pci_bus_id, memory_total_bytes, updated_at)
         VALUES ('fleet-a', 0, 'GPU-a0', 'NVIDIA H100', '0000:01:00.0', 85899345920, $1)",
    )
    .bind(now)
    .execute(pool)
    .await
    .expect("gpu");
    // (metric, labels, [(age, value)]): the newest within the window is shown; the
    // power series is older than the window and must not be.
    let series: [Seeded; 3] = [
        (
            "razar_gpu_utilization_ratio",
            r#"{"gpu":"0","uuid":"GPU-a0","engine":"gpu"}"#,
            &[(3_000, 0.5), (1_000, 0.75)],
        ),
        (
            "razar_gpu_temperature_celsius",
            r#"{"gpu":"0","uuid":"GPU-a0","sensor":"gpu"}"#,
            &[(2_000, 61.0)],
        ),
        (
            "razar_gpu_power_watts",
            r#"{"gpu":"0","uuid":"GPU-a0"}"#,
            &[(120_000, 300.0)],
        ),
    ];
    for (metric, labels, points) in series {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO series (host_id, metric, labels) VALUES ('fleet-a', $1, $2::jsonb)
             RETURNING series_id",
        )
        .bind(metric)
        .bind(labels)
        .fetch_one(pool)
        .await
        .expect("series");
        for (age_ms, value) in points {
            let ts = now - chrono::Duration::milliseconds(*age_ms);
            sqlx::query("SELECT razar_ensure_day(($1::timestamptz AT TIME ZONE 'UTC')::date)")
                .bind(ts)
                .execute(pool)
                .await
                .expect("partition");
            sqlx::query("INSERT INTO samples (series_id, ts, value) VALUES ($1, $2, $3)")
                .bind(id)
                .bind(ts)
                .bind(value)
                .execute(pool)
                .await
                .expect("sample");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_pages_pass_promtool_and_show_the_fleet() {
    let f = Fixture::start().await;
    seed_fleet(&f.pool).await;

    let (status, own) = f.get("/metrics").await;
    assert_eq!(status, 200, "{own}");
    assert_eq!(promtool(&own), "", "promtool on /metrics:\n{own}");
    let expiry = value_of(
        &own,
        "razar_collector_certificate_expiry_seconds{certificate=\"collector\"}",
    )
    .unwrap_or_else(|| panic!("collector certificate expiry in\n{own}"));
    assert!(expiry > 86_400.0, "{expiry}");
    assert!(
        value_of(
            &own,
            "razar_collector_certificate_expiry_seconds{certificate=\"ca\"}"
        )
        .is_some(),
        "{own}"
    );
    assert_eq!(
        value_of(&own, "razar_collector_db_pool_max_connections"),
        Some(4.0)
    );
    assert!(own.contains("razar_collector_db_pool_connections{state=\"idle\"}"));
    assert!(own.contains("razar_collector_ingest_lag_seconds "));

    let (status, fleet) = f.get("/metrics/fleet").await;
    assert_eq!(status, 200, "{fleet}");
    assert_eq!(promtool(&fleet), "", "promtool on /metrics/fleet:\n{fleet}");
    for (series, value) in [
        ("razar_fleet_host_up{host=\"fleet-a\"}", 1.0),
        ("razar_fleet_host_up{host=\"fleet-b\"}", 0.0),
        (
            "razar_fleet_component_state{host=\"fleet-a\",component=\"trainer\",state=\"ready\"}",
            1.0,
        ),
        (
            "razar_fleet_component_state{host=\"fleet-a\",component=\"side\\\\car\",state=\"backoff\"}",
            1.0,
        ),
        ("razar_fleet_components{state=\"ready\"}", 1.0),
        ("razar_fleet_components{state=\"quarantined\"}", 0.0),
        (
            "razar_fleet_gpu_info{host=\"fleet-a\",gpu=\"0\",uuid=\"GPU-a0\",model=\"NVIDIA H100\"}",
            1.0,
        ),
        (
            "razar_fleet_gpu_utilization_ratio{host=\"fleet-a\",gpu=\"0\",engine=\"gpu\"}",
            0.75,
        ),
        (
            "razar_fleet_gpu_temperature_celsius{host=\"fleet-a\",gpu=\"0\",sensor=\"gpu\"}",
            61.0,
        ),
        ("razar_fleet_gpus_quarantined{state=\"quarantined\"}", 0.0),
    ] {
        assert_eq!(value_of(&fleet, series), Some(value), "{series} in\n{fleet}");
    }
    assert!(
        !fleet.contains("razar_fleet_gpu_power_watts{"),
        "a sample older than the window is not the latest state:\n{fleet}"
    );
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn razar_cli_against_a_live_collector() {
    let f = Fixture::start().await;
    let server = f.server();

    // Health as a table, JSON and YAML, the server from the flag.
    let out = f.razar(&["health", "--server", &server], &[]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(stdout.starts_with("status: "), "{stdout}");
    assert!(stdout.contains("database"), "{stdout}");
    let out = f
        .razar(&["health", "-o", "json", "--server", &server], &[])
        .await;
    let json: Value = serde_json::from_slice(&out.stdout).expect("health as JSON");
    assert!(json["checks"].is_array(), "{json}");
    let out = f
        .razar(&["-o", "yaml", "health", "--server", &server], &[])
        .await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("checks:"),
        "{out:?}"
    );

    // The server from the config file; the environment beats the file.
    let config = f.dir.path().join("cli.toml");
    std::fs::write(&config, format!("server = \"{server}\"\n")).expect("config file");
    let cfg = || ("RAZAR_CONFIG", config.display().to_string());
    let out = f.razar(&["health"], &[cfg()]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = f
        .razar(
            &["health"],
            &[cfg(), ("RAZAR_SERVER", "http://127.0.0.1:9".into())],
        )
        .await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("127.0.0.1:9"),
        "{out:?}"
    );

    // An error answer from the API (a wrong token, or a route this build lacks): exit 1,
    // the API's message (or its status) on stderr.
    let out = f
        .razar(
            &["hosts", "--server", &server],
            &[("RAZAR_TOKEN", "wrong-token".into())],
        )
        .await;
    let raw = f
        .http
        .get(format!("{server}/api/v1/hosts"))
        .bearer_auth("wrong-token")
        .send()
        .await
        .expect("GET /api/v1/hosts");
    let status = raw.status().as_u16();
    let body = raw.text().await.expect("body");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if status >= 400 {
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(stderr.contains(&format!("HTTP {status}")), "{stderr}");
        if let Some(message) = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_owned))
        {
            assert!(stderr.contains(&message), "{message:?} not in {stderr}");
        }
    }

    // Bad usage: exit 2, with what was wrong.
    for args in [
        vec!["restart", "no-slash", "--server", &server],
        vec!["frobnicate"],
        vec!["hosts", "-o", "xml"],
        vec!["history"],
    ] {
        let out = f.razar(&args, &[]).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(!out.stderr.is_empty(), "{args:?}");
    }
    // A config file with an unknown key is a usage error too.
    std::fs::write(&config, "sever = \"typo\"\n").expect("config file");
    let out = f.razar(&["health"], &[cfg()]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("sever"),
        "{out:?}"
    );
    f.stop().await;
}
