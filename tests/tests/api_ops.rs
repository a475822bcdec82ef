//! The operator API's escalations, decisions, GPU health and deployments, and the `razar`
//! CLI on them, against the whole collector ([`Service`]) with its decision engine and a
//! private PostgreSQL, over real HTTP. Faults enter through the store's real ingest
//! path (`Store::ingest`), so the engine decides on exactly what committed ingest leaves.
//!
//! - XID 79 on one GPU: the API lists the escalation, shows the decision with its
//!   evidence events and rule; an XID 13 decision shows its rejected alternative; the
//!   GPU listing and `/metrics/fleet` show the quarantine; an operator acknowledges and
//!   resolves it (each audited with its request id; a second ack or resolve is 409, an
//!   unknown id 404, a viewer 403), then overrides the GPU healthy: a decision with
//!   the operator;
//! - deployments: create → get → list → pause → resume → (promote refused in the canary
//!   wave) → roll back (a second roll back refused); a finished deployment refuses
//!   promote and resume; an overlapping deployment is 409; each success audited once;
//! - the CLI (the built binary, `cargo build -p razar-cli`): escalations, ack, resolve,
//!   decisions, why, deploy, rollout status / pause, rollback with -o table and -o json;
//!   exit 0 on success, 1 on the API's refusals, 2 on bad usage.

use chrono::Utc;
use razar_collector::config::{CollectorConfig, Database, TlsPaths};
use razar_collector::service::Service;
use razar_collector::store::tokens::{self, Role};
use razar_collector::store::Store;
use razar_shared::domain::{Severity, XidClass};
use razar_shared::protocol::{Batch, Event, EventKind, GpuInfo, Subject};
use razar_tests::ca::TestCa;
use razar_tests::live::wait_for;
use razar_tests::pg::TestPg;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sqlx::PgPool;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn free_udp_port() -> u16 {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a probe socket");
    socket.local_addr().expect("probe address").port()
}

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
        "{} not found: build it first with `cargo build -p razar-cli`",
        path.display()
    );
    path
}

struct Fixture {
    _ca: TestCa,
    _pg: TestPg,
    pool: PgPool,
    store: Store,
    service: Option<Service>,
    http: reqwest::Client,
    base: String,
    dir: tempfile::TempDir,
    viewer: String,
    operator: String,
}

impl Fixture {
    /// The collector with its engine stepping every 100 ms; the deployments driver
    /// steps only when the test says (`drive`).
    async fn new() -> Fixture {
        let ca = TestCa::new().expect("test CA");
        let pg = TestPg::start().await.expect("PostgreSQL");
        let store = pg.store().await.expect("migrated store");
        let pool = pg.pool().await.expect("pool");
        let dir = tempfile::tempdir().expect("test dir");
        let mut c = CollectorConfig::defaults(&dir.path().join("collector"));
        c.quic_listen = ([127, 0, 0, 1], free_udp_port()).into();
        c.http_listen = ([127, 0, 0, 1], 0).into();
        c.tls = TlsPaths {
            ca: ca.ca_path(),
            cert: ca.collector().cert_path.clone(),
            key: ca.collector().key_path.clone(),
            crl: Some(ca.crl_path()),
        };
        c.database = Database::Url(pg.url());
        c.pool_size = NonZeroU32::new(8).expect("nonzero");
        c.ingest_writers = NonZeroU32::new(1).expect("nonzero");
        c.health.database_slow = Duration::from_secs(30);
        c.engine.tick = Duration::from_millis(100);
        c.deployments.tick = Duration::from_secs(3600);
        c.api.rate_per_second = 10_000;
        c.api.burst = 10_000;
        let service = Service::start(c).await.expect("collector");
        let base = format!("http://{}", service.http_addr());
        let (_, viewer) = tokens::create(&pool, "viewer", Role::Viewer, None, None)
            .await
            .expect("viewer token");
        let (_, operator) = tokens::create(&pool, "operator", Role::Operator, None, None)
            .await
            .expect("operator token");
        Fixture {
            _ca: ca,
            _pg: pg,
            pool,
            store,
            service: Some(service),
            http: reqwest::Client::new(),
            base,
            dir,
            viewer,
            operator,
        }
    }

    fn service(&self) -> &Service {
        self.service.as_ref().expect("running")
    }

    /// A host with `gpus` GPUs (`GPU-<host>-<i>`), as its agent's Hello leaves it.
    async fn host(&self, host: &str, gpus: u32) {
        let gpus = (0..gpus)
            .map(|i| GpuInfo {
                index: i,
                uuid: format!("GPU-{host}-{i}"),
                name: "NVIDIA H100 80GB HBM3".to_owned(),
                pci_bus_id: format!("0000:{i:02x}:00.0"),
                memory_total_bytes: 80 << 30,
            })
            .collect();
        self.store
            .record_hello(&razar_tests::fixtures::hello(host, gpus), Utc::now())
            .await
            .expect("hello");
    }

    /// Stores `events` of `host` as one agent batch (the ingest path); returns their ids.
    async fn events(&self, host: &str, events: Vec<Event>) -> Vec<i64> {
        let before: i64 = self
            .scalar("SELECT coalesce(max(event_id), 0) FROM events")
            .await;
        let cursor = self.store.cursor(host).await.expect("cursor");
        let batch = Batch {
            seq: cursor + 1,
            base_ts_ms: razar_tests::fixtures::now_ms(),
            series: Vec::new(),
            events,
        };
        let map = self.store.register_series(host, &[]).await.expect("series");
        self.store
            .ingest(host, &[batch], &map)
            .await
            .expect("ingest");
        sqlx::query_scalar(
            "SELECT event_id FROM events WHERE host_id = $1 AND event_id > $2 ORDER BY event_id",
        )
        .bind(host)
        .bind(before)
        .fetch_all(&self.pool)
        .await
        .expect("event ids")
    }

    async fn scalar(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// A host running `component` at `revision` (no agent connected).
    async fn seed_component(&self, host: &str, component: &str, revision: &str) {
        let now = Utc::now();
        sqlx::query(
            "INSERT INTO hosts (host_id, first_seen, last_seen, state, agent_version, profile)
             VALUES ($1, $2, $2, 'lost', '0.1.0', 'default') ON CONFLICT (host_id) DO NOTHING",
        )
        .bind(host)
        .bind(now)
        .execute(&self.pool)
        .await
        .expect("host");
        sqlx::query(
            "INSERT INTO components (host_id, name, state, revision, critical, updated_at)
             VALUES ($1, $2, 'ready', $3, true, $4)",
        )
        .bind(host)
        .bind(component)
        .bind(revision)
        .bind(now)
        .execute(&self.pool)
        .await
        .expect("component");
    }

    /// A request; `request_id` sets `x-request-id`.
    async fn call(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<Value>,
        request_id: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(id) = request_id {
            r = r.header("x-request-id", id);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let response = r.send().await.expect("response");
        let status = response.status();
        let text = response.text().await.expect("body");
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    async fn get(&self, path: &str) -> Value {
        let (status, body) = self.call(Method::GET, path, &self.viewer, None, None).await;
        assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
        body
    }

    async fn post(&self, path: &str, body: Value, request_id: &str) -> (StatusCode, Value) {
        self.call(
            Method::POST,
            path,
            &self.operator,
            Some(body),
            Some(request_id),
        )
        .await
    }

    /// Audit rows (route, result) of a request id.
    async fn audit(&self, request_id: &str) -> Vec<(String, String)> {
        sqlx::query_as("SELECT route, result FROM audit_log WHERE request_id = $1")
            .bind(request_id)
            .fetch_all(&self.pool)
            .await
            .expect("audit rows")
    }

    /// Runs `razar` against this collector as the operator (nothing inherited).
    async fn razar(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(binary("razar"));
        cmd.args(args)
            .env_clear()
            .env("HOME", self.dir.path())
            .env("RAZAR_SERVER", &self.base)
            .env("RAZAR_TOKEN", &self.operator)
            .stdin(Stdio::null());
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

fn xid(gpu: u32, code: u32, class: XidClass) -> Event {
    Event {
        ts_ms: razar_tests::fixtures::now_ms(),
        severity: Severity::Critical,
        subject: Subject::Gpu(gpu),
        kind: EventKind::Xid { xid: code, class },
        message: format!("Xid {code}"),
    }
}

/// `promtool check metrics` on a page: its findings ("" when clean).
fn promtool(page: &str) -> String {
    use std::io::Write as _;
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

fn ok(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json_out(out: &Output) -> Value {
    let text = ok(out);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// XID 79 on GPU 1 of `h1`: waits for its open escalation; returns (event id, escalation).
async fn gpu_fault(f: &Fixture) -> (i64, Value) {
    f.host("h1", 2).await;
    let ids = f.events("h1", vec![xid(1, 79, XidClass::RebootHost)]).await;
    let esc = wait_for("the GPU fault escalation in the API", || async {
        let page = f.get("/api/v1/escalations?state=open&host=h1").await;
        page["escalations"]
            .as_array()?
            .iter()
            .find(|e| e["kind"] == "GpuFault" && e["subject"] == "GPU-h1-1")
            .cloned()
    })
    .await;
    (ids[0], esc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escalations_decisions_and_gpu_overrides_through_the_api() {
    let f = Fixture::new().await;
    let (event, esc) = gpu_fault(&f).await;
    let id = esc["id"].as_i64().expect("escalation id");
    assert_eq!(esc["host"], "h1");
    assert_eq!(esc["state"], "open");
    let one = f.get(&format!("/api/v1/escalations/{id}")).await;
    assert_eq!(one["id"], id);
    assert!(
        one["summary"].as_str().is_some_and(|s| !s.is_empty()),
        "{one}"
    );
    // Filters: another host has none; a bad state is a 400; an unknown id 404.
    let none = f.get("/api/v1/escalations?host=nobody").await;
    assert_eq!(none["escalations"], json!([]), "{none}");
    let (status, body) = f
        .call(
            Method::GET,
            "/api/v1/escalations?state=bogus",
            &f.viewer,
            None,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["code"].is_string() && body["message"].is_string());
    let (status, _) = f
        .call(
            Method::GET,
            "/api/v1/escalations/999999",
            &f.viewer,
            None,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // The decision on the fault: its evidence (the event itself), rule, catalog, term,
    // and the drain it ordered.
    let page = f.get(&format!("/api/v1/decisions?event={event}")).await;
    let first = page["decisions"][0].clone();
    let did = first["id"].as_i64().expect("a decision rests on the XID");
    assert_eq!(first["host"], "h1", "{first}");
    let d = f.get(&format!("/api/v1/decisions/{did}")).await;
    assert_eq!(d["evidence"]["events"], json!([event]), "{d}");
    assert!(
        d["summary"].as_str().is_some_and(|s| s.contains("XID 79")),
        "{d}"
    );
    assert_eq!(d["events"][0]["id"], event, "{d}");
    assert_eq!(d["events"][0]["kind"], "xid", "{d}");
    assert!(d["rule"].as_str().is_some_and(|r| !r.is_empty()), "{d}");
    assert!(d["rule_version"].as_i64() >= Some(1), "{d}");
    assert!(
        d["catalog_revision"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{d}"
    );
    assert_eq!(d["term"], 1, "{d}");
    assert!(d["rejected"].is_array(), "{d}");
    let drains = wait_for("the drain action carried out", || async {
        let d = f.get(&format!("/api/v1/decisions/{did}")).await;
        let actions = d["engine_actions"].as_array()?.clone();
        actions
            .iter()
            .any(|a| a["kind"] == "drain_gpu" && a["command_id"].is_string())
            .then_some(actions)
    })
    .await;
    assert!(!drains.is_empty());
    let by_host = f.get("/api/v1/decisions?host=h1&limit=5").await;
    assert!(
        by_host["decisions"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["id"] == did)),
        "{by_host}"
    );
    assert_eq!(
        f.get("/api/v1/decisions?host=nobody").await["decisions"],
        json!([])
    );
    let (status, _) = f
        .call(
            Method::GET,
            "/api/v1/decisions/999999",
            &f.viewer,
            None,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // An application-class XID once: a decision that rejected the hardware path.
    let app = f
        .events("h1", vec![xid(0, 13, XidClass::RestartApplication)])
        .await[0];
    let rejected = wait_for("the XID 13 decision", || async {
        let page = f.get(&format!("/api/v1/decisions?event={app}")).await;
        let id = page["decisions"][0]["id"].as_i64()?;
        let d = f.get(&format!("/api/v1/decisions/{id}")).await;
        d["rejected"].as_array().filter(|r| !r.is_empty()).cloned()
    })
    .await;
    assert!(
        rejected[0]["alternative"].as_str().is_some() && rejected[0]["reason"].as_str().is_some(),
        "{rejected:?}"
    );

    // The GPU listing and the fleet page show the quarantine.
    let gpus = f.get("/api/v1/hosts/h1/gpus").await;
    let gpu = |i: i64| {
        gpus.as_array()
            .and_then(|a| a.iter().find(|g| g["index"] == i))
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert_eq!(gpu(1)["health_state"], "quarantined", "{gpus}");
    assert_eq!(gpu(1)["health"]["rung"], "reboot", "{gpus}");
    assert_eq!(gpu(0)["health_state"], "healthy", "{gpus}");
    wait_for("the fleet page's quarantine", || async {
        let text = f
            .http
            .get(format!("{}/metrics/fleet", f.base))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.contains(
            "razar_fleet_gpu_quarantine_state{host=\"h1\",gpu=\"1\",state=\"quarantined\"} 1",
        )
        .then_some(())
    })
    .await;
    // The collector's own metrics: decisions by rule, escalations open by severity;
    // both pages pass `promtool check metrics`.
    let own = wait_for("the engine's metrics", || async {
        let text = f
            .http
            .get(format!("{}/metrics", f.base))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        (text.contains("razar_collector_decisions_total{rule=")
            && text.contains("razar_collector_escalations_open{severity="))
        .then_some(text)
    })
    .await;
    assert_eq!(promtool(&own), "", "/metrics");
    let fleet = f
        .http
        .get(format!("{}/metrics/fleet", f.base))
        .send()
        .await
        .expect("fleet page")
        .text()
        .await
        .expect("text");
    assert_eq!(promtool(&fleet), "", "/metrics/fleet");

    // Acknowledge: a viewer may not; the operator's request is audited with its id.
    let path = format!("/api/v1/escalations/{id}/ack");
    let (status, _) = f
        .call(
            Method::POST,
            &path,
            &f.viewer,
            Some(json!({"note": "x"})),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = f
        .post(&path, json!({"note": "looking at it"}), "req-ack-1")
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let ack_event = body["event_id"].as_i64().expect("event id");
    let audit = f.audit("req-ack-1").await;
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!(audit[0].0, "/api/v1/escalations/{id}/ack");
    assert_eq!(audit[0].1, format!("event {ack_event}"));
    let acked = wait_for("acknowledged", || async {
        let e = f.get(&format!("/api/v1/escalations/{id}")).await;
        (e["state"] == "acknowledged").then_some(e)
    })
    .await;
    assert_eq!(acked["acknowledged_by"], "operator", "{acked}");
    assert_eq!(acked["note"], "looking at it", "{acked}");
    // Again: 409, not audited. Unknown: 404. Hostile bodies: 4xx.
    let (status, body) = f.post(&path, json!({"note": "again"}), "req-ack-2").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "conflict");
    assert!(f.audit("req-ack-2").await.is_empty());
    let (status, _) = f
        .post("/api/v1/escalations/999999/ack", json!({}), "req-ack-3")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    for (i, bad) in [
        json!({"note": 7}),
        json!({"note": "x", "extra": 1}),
        json!([1]),
    ]
    .into_iter()
    .enumerate()
    {
        let (status, body) = f.post(&path, bad, &format!("req-bad-{i}")).await;
        assert!(status.is_client_error(), "{status}: {body}");
    }
    let (status, body) = f.post(&path, json!({"note": "a\u{0}b"}), "req-nul").await;
    assert!(status.is_client_error(), "{status}: {body}");

    // Resolve; then both ack and resolve are 409.
    let rpath = format!("/api/v1/escalations/{id}/resolve");
    let (status, body) = f
        .post(&rpath, json!({"note": "card reseated"}), "req-resolve-1")
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(f.audit("req-resolve-1").await.len(), 1);
    let resolved = wait_for("resolved", || async {
        let e = f.get(&format!("/api/v1/escalations/{id}")).await;
        (e["state"] == "resolved").then_some(e)
    })
    .await;
    assert_eq!(resolved["resolved_by"], "operator", "{resolved}");
    let resolved_list = f.get("/api/v1/escalations?state=resolved").await;
    assert!(
        resolved_list["escalations"]
            .as_array()
            .is_some_and(|a| a.iter().any(|e| e["id"] == id)),
        "{resolved_list}"
    );
    for (p, rid) in [(&rpath, "req-resolve-2"), (&path, "req-ack-4")] {
        let (status, _) = f.post(p, json!({"note": "late"}), rid).await;
        assert_eq!(status, StatusCode::CONFLICT, "{p}");
        assert!(f.audit(rid).await.is_empty(), "{rid}");
    }

    // Operator override of GPU 1: recorded as a decision with the operator.
    let (status, body) = f
        .post(
            "/api/v1/hosts/h1/gpus/1/health",
            json!({"healthy": true, "note": "reseated the card"}),
            "req-gpu-1",
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let ov = body["event_id"].as_i64().expect("event id");
    assert_eq!(f.audit("req-gpu-1").await.len(), 1);
    let d = wait_for("the override decision", || async {
        let page = f.get(&format!("/api/v1/decisions?event={ov}")).await;
        page["decisions"].as_array()?.first().cloned()
    })
    .await;
    assert_eq!(d["rule"], "gpu.override", "{d}");
    assert_eq!(d["operator"], "operator", "{d}");
    wait_for("GPU 1 healthy in the listing", || async {
        let gpus = f.get("/api/v1/hosts/h1/gpus").await;
        gpus.as_array()?
            .iter()
            .any(|g| g["index"] == 1 && g["health_state"] == "healthy")
            .then_some(())
    })
    .await;
    for (p, rid) in [
        ("/api/v1/hosts/h1/gpus/7/health", "req-gpu-2"),
        ("/api/v1/hosts/nobody/gpus/0/health", "req-gpu-3"),
    ] {
        let (status, _) = f.post(p, json!({"healthy": false, "note": ""}), rid).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{p}");
        assert!(f.audit(rid).await.is_empty(), "{rid}");
    }
    let (status, _) = f
        .post(
            "/api/v1/hosts/h1/gpus/0/health",
            json!({"healthy": "yes"}),
            "req-gpu-4",
        )
        .await;
    assert!(status.is_client_error());
    // Exactly the successful mutations were audited.
    assert_eq!(
        f.scalar("SELECT count(*) FROM audit_log").await,
        3,
        "ack, resolve, override"
    );
    f.stop().await;
}

fn spec(component: &str, hosts: &[&str], version: &str) -> Value {
    json!({
        "component": component,
        "revision": {"version": version, "command": "/bin/sleep", "args": ["3600"], "env": {"MODE": "x"}},
        "hosts": hosts,
        "canaries": 1,
        "max_parallel": 1,
        "min_healthy": "1s",
        "healthy_deadline": "10m",
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_through_the_api_with_409_for_illegal_transitions() {
    let f = Fixture::new().await;
    for h in ["d1", "d2"] {
        f.seed_component(h, "trainer", "v1").await;
    }
    f.seed_component("d1", "web", "w1").await;

    let (status, created) = f
        .post(
            "/api/v1/deployments",
            spec("trainer", &["d1", "d2"], "v2"),
            "req-dep-1",
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_i64().expect("deployment id");
    assert_eq!(created["state"], "created");
    assert_eq!(created["revision"], "v2");
    assert_eq!(created["spec"]["env"]["MODE"], "x");
    assert_eq!(created["created_by"], "operator");
    assert_eq!(created["hosts"][0]["host"], "d1");
    assert_eq!(created["hosts"][0]["wave"], "canary");
    assert_eq!(created["hosts"][1]["wave"], "main");
    assert_eq!(created["hosts"][0]["from_revision"], "v1");
    let audit = f.audit("req-dep-1").await;
    assert_eq!(
        audit,
        vec![("/api/v1/deployments".to_owned(), format!("deployment {id}"))]
    );
    let got = f.get(&format!("/api/v1/deployments/{id}")).await;
    assert_eq!(got["id"], id);
    let listed = f.get("/api/v1/deployments?state=active").await;
    assert_eq!(listed["deployments"][0]["id"], id, "{listed}");
    assert_eq!(
        f.get("/api/v1/deployments?state=succeeded").await["deployments"],
        json!([])
    );

    // Refused creations: overlapping (409), unknown host (422), hostile bodies (4xx);
    // none stored or audited.
    let (status, body) = f
        .post(
            "/api/v1/deployments",
            spec("trainer", &["d2"], "v3"),
            "req-dep-2",
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, body) = f
        .post(
            "/api/v1/deployments",
            spec("trainer", &["zz"], "v3"),
            "req-dep-3",
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let mut unknown_field = spec("web", &["d1"], "w2");
    unknown_field["surprise"] = json!(true);
    let mut bad_wait = spec("web", &["d1"], "w2");
    bad_wait["min_healthy"] = json!("soon");
    let mut sql = spec("web'; DROP TABLE deployments; --", &["d1"], "w2");
    sql["hosts"] = json!(["d1' OR '1'='1"]);
    for (i, bad) in [unknown_field, bad_wait, sql, json!({"component": 7})]
        .into_iter()
        .enumerate()
    {
        let rid = format!("req-dep-bad-{i}");
        let (status, body) = f.post("/api/v1/deployments", bad, &rid).await;
        assert!(status.is_client_error(), "{status}: {body}");
        assert!(f.audit(&rid).await.is_empty());
    }
    assert_eq!(f.scalar("SELECT count(*) FROM deployments").await, 1);

    // Pause (before it started), resume; resume again is 409.
    let op = |verb: &str| format!("/api/v1/deployments/{id}/{verb}");
    let (status, paused) = f
        .post(
            &op("pause"),
            json!({"reason": "change freeze"}),
            "req-dep-4",
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{paused}");
    assert_eq!(paused["state"], "paused");
    assert!(paused["reason"]
        .as_str()
        .is_some_and(|r| r.contains("change freeze")));
    let (status, resumed) = f.post(&op("resume"), json!({}), "req-dep-5").await;
    assert_eq!(status, StatusCode::OK, "{resumed}");
    assert_eq!(resumed["paused"], false);
    let (status, body) = f.post(&op("resume"), json!({}), "req-dep-6").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(f.audit("req-dep-6").await.is_empty());

    // The driver starts it: the canary wave. Promote is refused there (409).
    f.service().deployments().drive_once().await.expect("drive");
    let started = f.get(&format!("/api/v1/deployments/{id}")).await;
    assert_eq!(started["state"], "canary", "{started}");
    assert_eq!(started["hosts"][0]["state"], "deploying", "{started}");
    let (status, body) = f.post(&op("promote"), json!({}), "req-dep-7").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(f.audit("req-dep-7").await.is_empty());

    // Roll back: reverting (the canary goes back to v1); again is 409.
    let (status, back) = f
        .post(&op("rollback"), json!({"reason": "bad build"}), "req-dep-8")
        .await;
    assert_eq!(status, StatusCode::OK, "{back}");
    assert!(
        back["state"] == "reverting" || back["state"] == "reverted",
        "{back}"
    );
    assert!(back["reason"]
        .as_str()
        .is_some_and(|r| r.contains("bad build")));
    let audit = f.audit("req-dep-8").await;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].0, "/api/v1/deployments/{id}/rollback");
    let (status, _) = f.post(&op("rollback"), json!({}), "req-dep-9").await;
    assert_eq!(status, StatusCode::CONFLICT);

    // A finished deployment: promote and resume are 409; an unknown one 404.
    let (status, web) = f
        .post(
            "/api/v1/deployments",
            spec("web", &["d1"], "w2"),
            "req-dep-10",
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{web}");
    let wid = web["id"].as_i64().expect("id");
    let (status, ended) = f
        .post(
            &format!("/api/v1/deployments/{wid}/rollback"),
            json!({}),
            "req-dep-11",
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{ended}");
    assert_eq!(ended["state"], "reverted", "{ended}");
    for verb in ["promote", "resume", "pause", "rollback"] {
        let rid = format!("req-dep-ended-{verb}");
        let (status, body) = f
            .post(
                &format!("/api/v1/deployments/{wid}/{verb}"),
                json!({}),
                &rid,
            )
            .await;
        assert_eq!(status, StatusCode::CONFLICT, "{verb}: {body}");
        assert!(f.audit(&rid).await.is_empty());
    }
    let (status, _) = f
        .post("/api/v1/deployments/999999/pause", json!({}), "req-dep-12")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = f
        .call(Method::POST, &op("pause"), &f.viewer, Some(json!({})), None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Audited: two creations, pause, resume, two roll backs.
    assert_eq!(f.scalar("SELECT count(*) FROM audit_log").await, 6);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn razar_cli_escalations_decisions_and_deployments_against_a_live_collector() {
    let f = Fixture::new().await;
    let (event, esc) = gpu_fault(&f).await;
    let id = esc["id"].as_i64().expect("id").to_string();
    f.seed_component("d1", "trainer", "v1").await;

    // Escalations as a table and as JSON.
    let table = ok(&f.razar(&["escalations", "--state", "open"]).await);
    assert!(
        table.contains("SEVERITY") && table.contains("GPU-h1-1"),
        "{table}"
    );
    let list = json_out(&f.razar(&["escalations", "-o", "json"]).await);
    assert!(
        list["escalations"]
            .as_array()
            .is_some_and(|a| a
                .iter()
                .any(|e| e["id"].as_i64().map(|v| v.to_string()).as_deref() == Some(id.as_str()))),
        "{list}"
    );
    // Ack, then a second ack is refused (exit 1, the API's message).
    let acked = json_out(&f.razar(&["-o", "json", "ack", &id, "-m", "on it"]).await);
    assert_eq!(acked["request"], "ack", "{acked}");
    wait_for("acknowledged", || async {
        let e = f.get(&format!("/api/v1/escalations/{id}")).await;
        (e["state"] == "acknowledged").then_some(())
    })
    .await;
    let again = f.razar(&["ack", &id, "-m", "again"]).await;
    assert_eq!(again.status.code(), Some(1), "{again:?}");
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already acknowledged"),
        "{again:?}"
    );
    let resolved = ok(&f.razar(&["resolve", &id, "-m", "fixed"]).await);
    assert!(resolved.contains("resolve"), "{resolved}");
    let missing = f.razar(&["resolve", "999999"]).await;
    assert_eq!(missing.status.code(), Some(1), "{missing:?}");

    // Decisions and why.
    let table = ok(&f.razar(&["decisions", "--limit", "10"]).await);
    assert!(table.contains("RULE") && table.contains("h1"), "{table}");
    let decisions = json_out(&f.razar(&["-o", "json", "decisions"]).await);
    let did = decisions["decisions"]
        .as_array()
        .and_then(|a| {
            a.iter().find(|d| {
                d["evidence"]["events"]
                    .as_array()
                    .is_some_and(|e| e.contains(&json!(event)))
            })
        })
        .and_then(|d| d["id"].as_i64())
        .expect("the XID's decision")
        .to_string();
    let why = ok(&f.razar(&["why", &did]).await);
    assert!(why.contains("XID 79"), "{why}");
    let why = json_out(&f.razar(&["why", &did, "-o", "json"]).await);
    assert_eq!(why["events"][0]["id"], event, "{why}");
    assert_eq!(f.razar(&["why"]).await.status.code(), Some(2));
    assert_eq!(f.razar(&["why", "999999"]).await.status.code(), Some(1));

    // Deploy from a YAML spec, status, pause, rollback.
    let file = f.dir.path().join("deploy.yaml");
    std::fs::write(
        &file,
        "component: trainer\nrevision:\n  version: v2\n  command: /bin/sleep\n  args: [\"3600\"]\nhosts: [d1]\nmin_healthy: 1s\n",
    )
    .expect("spec file");
    let created = json_out(
        &f.razar(&["-o", "json", "deploy", &file.display().to_string()])
            .await,
    );
    let dep = created["id"].as_i64().expect("deployment id").to_string();
    assert_eq!(created["state"], "created", "{created}");
    let table = ok(&f.razar(&["rollout", "status"]).await);
    assert!(table.contains("trainer") && table.contains("v2"), "{table}");
    let one = json_out(&f.razar(&["rollout", "status", &dep, "-o", "json"]).await);
    assert_eq!(one["hosts"][0]["host"], "d1", "{one}");
    let paused = json_out(&f.razar(&["-o", "json", "rollout", "pause", &dep]).await);
    assert_eq!(paused["state"], "paused", "{paused}");
    let back = ok(&f.razar(&["rollback", &dep]).await);
    assert!(back.contains("reverted"), "{back}");
    let ended = f.razar(&["rollout", "promote", &dep]).await;
    assert_eq!(ended.status.code(), Some(1), "{ended:?}");
    assert!(
        String::from_utf8_lossy(&ended.stderr).contains("409"),
        "{ended:?}"
    );
    let bad = f.dir.path().join("bad.json");
    std::fs::write(&bad, "{").expect("bad spec");
    let out = f.razar(&["deploy", &bad.display().to_string()]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(f.razar(&["rollback"]).await.status.code(), Some(2));
    f.stop().await;
}
