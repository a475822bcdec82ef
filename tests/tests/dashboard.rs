//! The dashboard in headless Chromium (Debian's `chromium`) against a live collector
//! ([`Service`] in-process, a private PostgreSQL) fed by the real `razar-agent` binary
//! with two fake GPUs and one supervised component. Each page is loaded with
//! `--dump-dom` and the test checks what it shows (host names, GPU counts, charts with
//! data, events, escalation/decision/deployment rows); a screenshot of each is saved
//! under `target/artifacts/dashboard/`.
//!
//! The escalation, decision and deployment rows are written into the engine's tables
//! by the test (a fault path would take minutes); the pages read them through the API.
//!
//! Needs `cargo build -p razar-agent --bins` and `/usr/bin/chromium` (or
//! `RAZAR_CHROMIUM`); without Chromium the test fails and says so.

use razar_collector::config::{CollectorConfig, Database, TlsPaths};
use razar_collector::deployments::{HostSelector, NewDeployment};
use razar_collector::service::Service;
use razar_collector::store::tokens::{self, Role};
use razar_shared::protocol::RevisionSpec;
use razar_tests::ca::TestCa;
use razar_tests::pg::TestPg;
use serde_json::Value;
use sqlx::PgPool;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const HOST: &str = "dash-host";
const COMPONENT: &str = "ticker";
const GPU_MODEL: &str = "NVIDIA H100 80GB HBM3";
const ESCALATION_SUMMARY: &str = "GPU 1 fell off the bus (XID 79) on dash-host";
const DECISION_RULE: &str = "dash_test_rule";
const DEPLOYMENT_REVISION: &str = "dash-v2";

/// Two fake GPUs (as `razar-dev` has them), values from the first second.
const GPU_SCENARIO: &str = r#"clock = "wall"
driver_version = "550.54.15"

[[gpu]]
name = "NVIDIA H100 80GB HBM3"
fans = 0
values = { utilization_gpu = [[0, 55], [600, 85]], temperature_gpu = [[0, 44], [600, 71]], power_usage = [[0, 280000], [600, 610000]], memory_used = [[0, 21474836480], [600, 64424509440]] }

[[gpu]]
name = "NVIDIA H100 80GB HBM3"
fans = 0
values = { utilization_gpu = [[0, 20], [600, 40]], temperature_gpu = [[0, 33], [600, 52]], power_usage = [[0, 75000], [600, 300000]], memory_used = [[0, 536870912], [600, 21474836480]] }
"#;

/// A binary built by this workspace, next to the test executable.
fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test executable");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not found: build it first with `cargo build -p razar-agent --bins`",
        path.display()
    );
    path
}

/// Chromium, or a failure that says how to get it.
fn chromium() -> PathBuf {
    let path = std::env::var_os("RAZAR_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        path.is_file(),
        "Chromium not found at {}: the dashboard test needs a headless browser. \
         Install it (`apt-get install chromium`; .ci/run does) or point RAZAR_CHROMIUM at one.",
        path.display()
    );
    path
}

/// Where screenshots go: `target/artifacts/dashboard/`.
fn artifacts() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("artifacts").join("dashboard");
    std::fs::create_dir_all(&dir).expect("artifacts dir");
    dir
}

fn free_udp_port() -> u16 {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a probe socket");
    socket.local_addr().expect("probe address").port()
}

fn toml_path(p: &Path) -> String {
    serde_json::to_string(&p.to_string_lossy()).expect("a JSON string is a TOML string")
}

/// The agent process, killed and reaped on drop.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Fixture {
    ca: TestCa,
    _pg: TestPg,
    pool: PgPool,
    service: Option<Service>,
    agent: Option<Agent>,
    http: reqwest::Client,
    dir: tempfile::TempDir,
    token: String,
    /// The escalation and decision ids written by `seed_engine_rows`.
    seeded: (i64, i64),
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
        let (_, token) = tokens::create(&pool, "dashboard-test", Role::Viewer, None, None)
            .await
            .expect("viewer token");
        Fixture {
            ca,
            _pg: pg,
            pool,
            service: Some(service),
            agent: None,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("HTTP client"),
            dir,
            token,
            seeded: (0, 0),
        }
    }

    fn server(&self) -> String {
        format!(
            "http://{}",
            self.service.as_ref().expect("running").http_addr()
        )
    }

    fn start_agent(&mut self) {
        let cert = self.ca.agent(HOST).expect("agent certificate");
        let d = self.dir.path();
        std::fs::write(d.join("gpu-scenario.toml"), GPU_SCENARIO).expect("scenario");
        let quic = self.service.as_ref().expect("running").quic_addr();
        let agent_toml = format!(
            r#"[agent]
data_dir = {data}
listen = "127.0.0.1:0"
sample_interval = "1s"
log_dir = {logs}

[collector]
address = "{quic}"
server_name = "localhost"
ca = {ca}
cert = {cert}
key = {key}

[gpu]
source = "scenario"
scenario = {scenario}

[[component]]
name = "{COMPONENT}"
command = "/bin/sh"
args = ["-c", "while :; do echo tick; sleep 1; done"]
stop_grace = "2s"
"#,
            data = toml_path(&d.join("agent")),
            logs = toml_path(&d.join("agent-logs")),
            ca = toml_path(&self.ca.ca_path()),
            cert = toml_path(&cert.cert_path),
            key = toml_path(&cert.key_path),
            scenario = toml_path(&d.join("gpu-scenario.toml")),
        );
        std::fs::write(d.join("agent.toml"), agent_toml).expect("agent.toml");
        let log = std::fs::File::create(d.join("agent.log")).expect("agent log");
        let child = Command::new(binary("razar-agent"))
            .args(["run", "--config"])
            .arg(d.join("agent.toml"))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start razar-agent");
        self.agent = Some(Agent(child));
    }

    fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    async fn get(&self, path: &str) -> Option<Value> {
        let response = self
            .http
            .get(format!("{}/api/v1{path}", self.server()))
            .bearer_auth(&self.token)
            .send()
            .await
            .ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.json().await.ok()
    }

    /// Waits until the agent's host, GPUs, utilisation and some history are stored.
    async fn wait_for_data(&self) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let overview = self.get("/overview").await;
            // What the host page asks for: the last hour in 300 points (12 s each); a
            // chart draws a line from its second point.
            let since = chrono::Utc::now() - chrono::Duration::hours(1);
            let history = format!(
                "/history?metric=razar_gpu_utilization_ratio&host={HOST}&from={}&points=300",
                since.format("%Y-%m-%dT%H:%M:%SZ")
            );
            let points = self.get(&history).await.map_or(0, |h| {
                h["series"].as_array().map_or(0, |s| {
                    s.iter()
                        .map(|s| s["points"].as_array().map_or(0, Vec::len))
                        .min()
                        .unwrap_or(0)
                })
            });
            let events = self
                .get(&format!("/events?host={HOST}&limit=1"))
                .await
                .map_or(0, |e| e["events"].as_array().map_or(0, Vec::len));
            if let Some(o) = &overview {
                if events > 0
                    && o["hosts"]["online"] == 1
                    && o["gpus"]["total"] == 2
                    && o["gpus"]["utilization_avg"].is_f64()
                    && o["host_list"][0]["components"] == 1
                    && points >= 3
                {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the agent's data did not arrive within 90 s (overview {overview:?}, {points} \
                 history points, {events} events); agent log:\n{}",
                self.agent_log()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Rows of the engine's tables the escalation, decision and deployment pages show.
    async fn seed_engine_rows(&mut self) {
        let decision: i64 = sqlx::query_scalar(
            "INSERT INTO decisions (seq, term, rule, rule_version, catalog_revision, evidence,
                 rejected, actions, held, breaker, decided_at)
             VALUES (1000000, 1, $1, 3, 'test', $2, $3, '[]', '[]', '[]', now())
             RETURNING decision_id",
        )
        .bind(DECISION_RULE)
        .bind(serde_json::json!({"events": [], "facts": ["xid 79 on gpu 1"]}))
        .bind(serde_json::json!([{"alternative": "reset the GPU", "reason": "XID 79 needs a reboot"}]))
        .fetch_one(&self.pool)
        .await
        .expect("decision row");
        let escalation: i64 = sqlx::query_scalar(
            "INSERT INTO escalations (host_id, subject, kind, state, severity, summary,
                 opened_at, last_seen, decision_id, updated_at)
             VALUES ($1, 'gpu 1', 'gpu_fault', 'open', 'critical', $2, now(), now(), $3, now())
             RETURNING escalation_id",
        )
        .bind(HOST)
        .bind(ESCALATION_SUMMARY)
        .bind(decision)
        .fetch_one(&self.pool)
        .await
        .expect("escalation row");
        self.seeded = (escalation, decision);
        // A real deployment of the agent's component, healthy only after 10 minutes:
        // its canary stays in progress while the test runs.
        let revision = RevisionSpec {
            version: DEPLOYMENT_REVISION.to_owned(),
            command: "/bin/sh".to_owned(),
            args: vec![
                "-c".to_owned(),
                "while :; do echo tock; sleep 1; done".to_owned(),
            ],
            env: Vec::new(),
        };
        let selector = HostSelector {
            hosts: vec![HOST.to_owned()],
            ..HostSelector::default()
        };
        let mut new = NewDeployment::new(COMPONENT, revision, selector);
        new.min_healthy = Duration::from_secs(600);
        new.healthy_deadline = Duration::from_secs(900);
        new.created_by = "dashboard-test".to_owned();
        self.service
            .as_ref()
            .expect("running")
            .deployments()
            .create(new)
            .await
            .expect("deployment");
    }

    async fn stop(mut self) {
        drop(self.agent.take());
        if let Some(s) = self.service.take() {
            s.shutdown().await;
        }
    }
}

/// The page's URL: signed in through the fragment, the live stream off.
fn page_url(server: &str, token: &str, route: &str) -> String {
    format!("{server}/?nolive#token={token}&next={route}")
}

/// Runs Chromium headless with these arguments; its standard output.
async fn run_chromium(profile: &Path, args: Vec<String>) -> String {
    let mut cmd = Command::new(chromium());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args)
    .stdin(Stdio::null());
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run chromium"))
        .await
        .expect("chromium finished");
    assert!(
        out.status.success(),
        "chromium failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The page's DOM once the app marked it rendered (`data-ready` on `#app`); retried
/// while the page is not there yet (a loaded machine may need more than the budget).
async fn dump_dom(f: &Fixture, route: &str) -> String {
    let profile = tempfile::tempdir().expect("chromium profile");
    let url = page_url(&f.server(), &f.token, route);
    let marker = format!("data-ready=\"#{route}\"");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let dom = run_chromium(
            profile.path(),
            vec![
                "--virtual-time-budget=5000".to_owned(),
                "--dump-dom".to_owned(),
                url.clone(),
            ],
        )
        .await;
        if dom.contains(&marker) {
            return dom;
        }
        // The app shows a failed API call as `<p class="error">code: message</p>`.
        if let Some(at) = dom.find(r#"<main id="app"><p class="error">"#) {
            panic!(
                "page #{route} shows an error: {}",
                &dom[at..(at + 300).min(dom.len())]
            );
        }
        assert!(
            Instant::now() < deadline,
            "page #{route} never rendered (no {marker}); last DOM:\n{dom}"
        );
        eprintln!("page #{route} not rendered yet; again");
    }
}

async fn screenshot(f: &Fixture, route: &str, name: &str) {
    let profile = tempfile::tempdir().expect("chromium profile");
    let path = artifacts().join(format!("{name}.png"));
    let _ = std::fs::remove_file(&path);
    run_chromium(
        profile.path(),
        vec![
            "--virtual-time-budget=5000".to_owned(),
            format!("--screenshot={}", path.display()),
            "--window-size=1400,1000".to_owned(),
            page_url(&f.server(), &f.token, route),
        ],
    )
    .await;
    let size = std::fs::metadata(&path).map_or(0, |m| m.len());
    assert!(
        size > 1000,
        "no screenshot at {} ({size} bytes)",
        path.display()
    );
    eprintln!("screenshot {}", path.display());
}

/// The page's `<main>` (what the app rendered).
fn main(dom: &str) -> &str {
    let start = dom.find("<main").unwrap_or(0);
    let end = dom[start..]
        .find("</main>")
        .map_or(dom.len(), |e| start + e);
    &dom[start..end]
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

/// A collector with the agent's data in and the engine's rows written.
async fn fleet() -> Fixture {
    chromium();
    let mut f = Fixture::start().await;
    f.start_agent();
    f.wait_for_data().await;
    // What the host page's GPU cards show: each GPU's latest values, utilisation within
    // its scenario's range (GPU 0: 55-85 %, GPU 1: 20-40 %).
    let gpus = f
        .get(&format!("/hosts/{HOST}/gpus"))
        .await
        .expect("the host's GPUs");
    for (gpu, (lo, hi)) in [(0, (0.55, 0.85)), (1, (0.20, 0.40))] {
        let util = gpus[gpu]["values"]
            .as_array()
            .and_then(|v| {
                v.iter()
                    .find(|v| v["metric"] == "razar_gpu_utilization_ratio")
            })
            .and_then(|v| v["value"].as_f64());
        assert!(
            util.is_some_and(|u| (lo..=hi).contains(&u)),
            "GPU {gpu} utilisation {util:?} outside {lo}-{hi}: {gpus}"
        );
    }
    f.seed_engine_rows().await;
    // The overview is computed at most once a second and may be served a few seconds
    // stale while it is computed again (its `as_of` says when): wait until it holds
    // the rows just written.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let overview = f.get("/overview").await;
        if overview.as_ref().is_some_and(|o| {
            o["escalations_open_count"] == 1
                && o["deployments_active"]
                    .as_array()
                    .is_some_and(|d| !d.is_empty())
        }) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the overview never showed the seeded rows: {overview:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    f
}

/// The fleet, host and events pages (the overview, hosts, history and events routes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_fleet_host_and_events_pages_in_headless_chromium() {
    let f = fleet().await;

    // Fleet: one host online of one, both GPUs in service, the host's line and tile,
    // the open escalation and the deployment in progress.
    let dom = dump_dom(&f, "/").await;
    assert!(
        dom.contains(r#"data-test="hosts-online"><div class="n">1<span class="muted"> / 1</span>"#),
        "fleet page: 1 / 1 hosts online expected:\n{dom}"
    );
    assert!(
        dom.contains(r#"data-test="gpus"><div class="n">2<span class="muted"> / 2</span>"#),
        "fleet page: 2 / 2 GPUs in service expected:\n{dom}"
    );
    assert!(
        dom.contains(&format!(r##"href="#/host/{HOST}">{HOST}</a>"##)),
        "fleet page: host line expected:\n{dom}"
    );
    assert!(
        dom.contains(&format!(r#"title="{HOST}: online""#)),
        "fleet page: host tile expected:\n{dom}"
    );
    assert!(
        dom.contains(ESCALATION_SUMMARY),
        "fleet page: the open escalation expected:\n{dom}"
    );
    assert!(
        dom.contains(DEPLOYMENT_REVISION),
        "fleet page: the deployment in progress expected:\n{dom}"
    );
    screenshot(&f, "/", "fleet").await;

    // Host: its component, both GPUs with live values, charts with data.
    let route = format!("/host/{HOST}");
    let dom = dump_dom(&f, &route).await;
    assert!(
        dom.contains(&format!("<td>{COMPONENT}</td>")),
        "host page: component:\n{dom}"
    );
    assert_eq!(
        count(&dom, &format!("<td>{GPU_MODEL}</td>")),
        2,
        "host page: two GPUs:\n{dom}"
    );
    assert!(
        dom.contains(" °C</td>"),
        "host page: GPU temperatures:\n{dom}"
    );
    for title in [
        "GPU utilisation",
        "GPU memory used",
        "GPU temperature",
        "GPU power",
    ] {
        let at = dom
            .find(&format!("<h2>{title}</h2>"))
            .unwrap_or_else(|| panic!("host page: no {title} chart:\n{dom}"));
        let card = &dom[at..];
        let card = &card[..card.find("</div></div>").unwrap_or(card.len())];
        assert!(
            card.split("<path d=\"").skip(1).any(|d| d
                .split('"')
                .next()
                .is_some_and(|d| d.starts_with('M') && d.contains('L'))),
            "host page: the {title} chart has no line:\n{card}"
        );
    }
    assert!(
        !main(&dom).contains(r#"class="error""#),
        "host page shows an error:\n{dom}"
    );
    screenshot(&f, &route, "host").await;

    // Events: the agent's events, with its host.
    let dom = dump_dom(&f, "/events").await;
    assert!(
        !dom.contains("No events."),
        "events page: events expected:\n{dom}"
    );
    assert!(
        dom.contains(&format!(r##"href="#/host/{HOST}">{HOST}</a>"##)),
        "events page: events of {HOST} expected:\n{dom}"
    );
    screenshot(&f, "/events", "events").await;
    f.stop().await;
}

/// The escalations, decisions and deployments pages (the engine's API routes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_engine_pages_in_headless_chromium() {
    let f = fleet().await;
    let dom = dump_dom(&f, "/escalations").await;
    assert!(dom.contains(ESCALATION_SUMMARY), "escalations page:\n{dom}");
    screenshot(&f, "/escalations", "escalations").await;
    let (escalation, decision) = f.seeded;
    let route = format!("/escalation/{escalation}");
    let dom = dump_dom(&f, &route).await;
    assert!(dom.contains(ESCALATION_SUMMARY), "escalation page:\n{dom}");
    assert!(
        dom.contains(&format!(r##"href="#/decision/{decision}""##)),
        "escalation page: link to its decision:\n{dom}"
    );
    screenshot(&f, &route, "escalation").await;
    let dom = dump_dom(&f, "/decisions").await;
    assert!(dom.contains(DECISION_RULE), "decisions page:\n{dom}");
    screenshot(&f, "/decisions", "decisions").await;
    let route = format!("/decision/{decision}");
    let dom = dump_dom(&f, &route).await;
    assert!(
        dom.contains("xid 79 on gpu 1"),
        "decision page: evidence:\n{dom}"
    );
    assert!(
        dom.contains("reset the GPU: XID 79 needs a reboot"),
        "decision page: rejected alternative:\n{dom}"
    );
    screenshot(&f, &route, "decision").await;
    let dom = dump_dom(&f, "/deployments").await;
    assert!(
        dom.contains(DEPLOYMENT_REVISION),
        "deployments page:\n{dom}"
    );
    screenshot(&f, "/deployments", "deployments").await;

    f.stop().await;
}
