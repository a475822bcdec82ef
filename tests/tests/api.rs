//! The operator API (`/api/v1`) against the whole collector ([`Service`]) and a private
//! PostgreSQL, over real HTTP:
//!
//! - every route of the OpenAPI document, for every role and for missing, revoked and
//!   expired tokens: refused or allowed exactly as the document says; the document and
//!   the router describe the same routes;
//! - every mutation writes one audit row with the request id, in its transaction; the
//!   commands it creates carry the request id;
//! - hostile input gets a 4xx JSON error and nothing is stored;
//! - the per-token rate limit answers 429 with `Retry-After` and is counted;
//! - 24 h of 1 s samples come back as at most 1,000 points from the rollups;
//! - the event stream, with ids committed out of order and one rolled back, resumed
//!   with `Last-Event-ID`, has no gap and no duplicate;
//! - a log follow ends when its client leaves: the subscription is gone (the live
//!   follows gauge back to 0) and `CancelTail` is sent.

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use razar_collector::config::{CollectorConfig, Database, TlsPaths};
use razar_collector::service::Service;
use razar_collector::store::tokens::{self, Role};
use razar_tests::ca::TestCa;
use razar_tests::live::{wait_for, PATIENCE};
use razar_tests::pg::TestPg;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sqlx::PgPool;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

const HOST: &str = "api-host";
const COMPONENT: &str = "web";

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
    base: String,
    _dir: tempfile::TempDir,
}

struct Tokens {
    viewer: String,
    operator: String,
    admin: String,
    revoked: String,
    expired: String,
}

impl Fixture {
    async fn new(adjust: impl FnOnce(&mut CollectorConfig)) -> Fixture {
        let ca = TestCa::new().expect("test CA");
        let pg = TestPg::start().await.expect("PostgreSQL");
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
        // The role matrix makes hundreds of requests per token.
        c.api.rate_per_second = 10_000;
        c.api.burst = 10_000;
        adjust(&mut c);
        let service = Service::start(c).await.expect("collector");
        let base = format!("http://{}", service.http_addr());
        let pool = pg.pool().await.expect("pool");
        Fixture {
            _ca: ca,
            _pg: pg,
            pool,
            service: Some(service),
            http: reqwest::Client::new(),
            base,
            _dir: dir,
        }
    }

    /// A host with one component and one GPU, as an agent's Hello would leave them.
    async fn seed_host(&self) {
        let now = Utc::now();
        sqlx::query(
            "INSERT INTO hosts (host_id, first_seen, last_seen, state, agent_version, profile)
             VALUES ($1, $2, $2, 'lost', '0.1.0', 'default')",
        )
        .bind(HOST)
        .bind(now)
        .execute(&self.pool)
        .await
        .expect("host");
        sqlx::query(
            "INSERT INTO components (host_id, name, state, revision, critical, updated_at)
             VALUES ($1, $2, 'running', 'v1', true, $3)",
        )
        .bind(HOST)
        .bind(COMPONENT)
        .bind(now)
        .execute(&self.pool)
        .await
        .expect("component");
        sqlx::query(
            "INSERT INTO gpus (host_id, gpu_index, uuid, name, pci_bus_id, memory_total_bytes, updated_at)
             VALUES ($1, 0, 'GPU-0', 'H100', '0000:01:00.0', 85899345920, $2)",
        )
        .bind(HOST)
        .bind(now)
        .execute(&self.pool)
        .await
        .expect("gpu");
    }

    async fn tokens(&self) -> Tokens {
        let pool = &self.pool;
        let make = |name: &'static str, role| async move {
            tokens::create(pool, name, role, None, None)
                .await
                .expect("token")
        };
        let (_, viewer) = make("viewer", Role::Viewer).await;
        let (_, operator) = make("operator", Role::Operator).await;
        let (_, admin) = make("admin", Role::Admin).await;
        let (revoked_info, revoked) = make("revoked", Role::Admin).await;
        tokens::revoke(pool, revoked_info.id, None)
            .await
            .expect("revoke");
        let (expired_info, expired) = make("expired", Role::Admin).await;
        sqlx::query(
            "UPDATE api_tokens SET expires_at = now() - interval '1 second' WHERE token_id = $1",
        )
        .bind(expired_info.id)
        .execute(pool)
        .await
        .expect("expire");
        Tokens {
            viewer,
            operator,
            admin,
            revoked,
            expired,
        }
    }

    fn request(&self, method: Method, path: &str, token: Option<&str>) -> reqwest::RequestBuilder {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r
    }

    /// GET `path` with `token`: the answer must be 200; its JSON body.
    async fn get_json(&self, path: &str, token: &str) -> Value {
        let response = self
            .request(Method::GET, path, Some(token))
            .send()
            .await
            .expect("response");
        assert_eq!(response.status(), StatusCode::OK, "GET {path}");
        response.json().await.expect("JSON body")
    }

    async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(&self.pool)
            .await
            .expect("count")
    }

    async fn metric(&self, name: &str) -> Option<f64> {
        let text = self
            .http
            .get(format!("{}/metrics", self.base))
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

    async fn stop(mut self) {
        if let Some(s) = self.service.take() {
            s.shutdown().await;
        }
    }
}

/// The least role of an operation, from its `bearer` security requirement.
fn least_role(op: &Value) -> Option<Role> {
    let roles = op.get("security")?.as_array()?;
    roles
        .iter()
        .filter_map(|r| r.get("bearer")?.as_array().cloned())
        .flatten()
        .filter_map(|r| r.as_str().and_then(Role::parse))
        .min()
}

/// A concrete path for a template, and a valid body for the operation.
fn concrete(path: &str, method: &Method) -> (String, Option<Value>) {
    let path = path
        .replace("{host}", HOST)
        .replace("{component}", COMPONENT)
        .replace("{gpu}", "0")
        .replace(
            "{id}",
            if path.starts_with("/api/v1/tokens") {
                "999999"
            } else {
                "00000000000000000000000000000000"
            },
        );
    let body = match (method.as_str(), path.as_str()) {
        ("POST", "/api/v1/commands") => Some(json!({
            "host": HOST, "action": {"kind": "restart", "component": COMPONENT}
        })),
        ("POST", "/api/v1/tokens") => Some(json!({"name": "made-by-matrix", "role": "viewer"})),
        _ => None,
    };
    (path, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_route_enforces_its_role_and_the_document_matches_the_router() {
    let f = Fixture::new(|_| {}).await;
    f.seed_host().await;
    let t = f.tokens().await;
    let doc: Value = f
        .request(Method::GET, "/api/v1/openapi.json", None)
        .send()
        .await
        .expect("document")
        .json()
        .await
        .expect("JSON document");
    assert!(
        doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1")),
        "{}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().expect("paths");
    let mut operations = 0;
    for (template, item) in paths {
        for (method, op) in item.as_object().expect("path item") {
            let method: Method = method.to_uppercase().parse().expect("method");
            let (path, body) = concrete(template, &method);
            let least = least_role(op);
            let cases: [(&str, Option<&str>, Option<Role>); 6] = [
                ("no token", None, None),
                ("revoked", Some(&t.revoked), None),
                ("expired", Some(&t.expired), None),
                ("viewer", Some(&t.viewer), Some(Role::Viewer)),
                ("operator", Some(&t.operator), Some(Role::Operator)),
                ("admin", Some(&t.admin), Some(Role::Admin)),
            ];
            for (who, token, role) in cases {
                let mut req = f.request(method.clone(), &path, token);
                if let Some(b) = &body {
                    req = req.json(b);
                }
                let response = req.send().await.expect("response");
                let status = response.status();
                let what = format!("{method} {path} as {who}");
                match (least, role) {
                    (None, _) => assert!(
                        status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN,
                        "{what}: public, got {status}"
                    ),
                    (Some(_), None) => {
                        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}");
                        let body: Value = response.json().await.expect("error body");
                        assert_eq!(body["code"], "unauthorized", "{what}: {body}");
                        assert!(body["request_id"].is_string(), "{what}: {body}");
                        continue;
                    }
                    (Some(needed), Some(role)) if role < needed => {
                        assert_eq!(status, StatusCode::FORBIDDEN, "{what}");
                        continue;
                    }
                    (Some(_), Some(_)) => assert!(
                        status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN,
                        "{what}: allowed, got {status}"
                    ),
                }
                // Allowed: the router has the documented route (the fallback's
                // "no such route" never answers) and it does not fail on the server.
                assert!(!status.is_server_error(), "{what}: {status}");
                if status == StatusCode::NOT_FOUND || status == StatusCode::METHOD_NOT_ALLOWED {
                    let body: Value = response.json().await.expect("error body");
                    assert_ne!(body["message"], "no such route", "{what}");
                    assert_ne!(body["code"], "method_not_allowed", "{what}");
                }
            }
            operations += 1;
        }
    }
    assert!(operations >= 15, "only {operations} operations documented");
    // And the router has nothing undocumented under /api/v1 that answers.
    let response = f
        .request(Method::GET, "/api/v1/nothing-here", Some(&t.admin))
        .send()
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mutation_writes_one_audit_row_with_its_request_id() {
    let f = Fixture::new(|_| {}).await;
    f.seed_host().await;
    let t = f.tokens().await;
    let before = f.count("SELECT count(*) FROM audit_log").await;

    let response = f
        .request(Method::POST, "/api/v1/commands", Some(&t.operator))
        .header("x-request-id", "req-command-1")
        .json(&json!({"host": HOST, "action": {"kind": "restart", "component": COMPONENT}}))
        .send()
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.headers()["x-request-id"], "req-command-1");
    let command: Value = response.json().await.expect("command");
    assert_eq!(command["request_id"], "req-command-1");
    let stored: Option<String> = sqlx::query_scalar("SELECT request_id FROM commands")
        .fetch_one(&f.pool)
        .await
        .expect("command row");
    assert_eq!(stored.as_deref(), Some("req-command-1"));
    let (who, role, route, result, args): (String, String, String, String, Value) = sqlx::query_as(
        "SELECT who, role, route, result, arguments FROM audit_log WHERE request_id = 'req-command-1'",
    )
    .fetch_one(&f.pool)
    .await
    .expect("one audit row for the command");
    assert_eq!(
        (who.as_str(), role.as_str(), route.as_str()),
        ("operator", "operator", "/api/v1/commands")
    );
    assert!(
        result.contains(command["id"].as_str().expect("id")),
        "{result}"
    );
    assert_eq!(args["host"], HOST);

    let created: Value = f
        .request(Method::POST, "/api/v1/tokens", Some(&t.admin))
        .header("x-request-id", "req-token-1")
        .json(&json!({"name": "ci", "role": "viewer", "expires_in": "30d"}))
        .send()
        .await
        .expect("response")
        .json()
        .await
        .expect("created token");
    let id = created["info"]["id"].as_i64().expect("token id");
    let secret = created["token"].as_str().expect("token text").to_owned();
    let revoked = f
        .request(
            Method::DELETE,
            &format!("/api/v1/tokens/{id}"),
            Some(&t.admin),
        )
        .header("x-request-id", "req-token-2")
        .send()
        .await
        .expect("response");
    assert_eq!(revoked.status(), StatusCode::OK);
    // The new token worked only until revoked.
    let refused = f
        .request(Method::GET, "/api/v1/hosts", Some(&secret))
        .send()
        .await
        .expect("response");
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);

    // A refused mutation changes nothing and is not audited as done.
    let unknown = f
        .request(Method::POST, "/api/v1/commands", Some(&t.operator))
        .json(&json!({"host": "nobody", "action": {"kind": "restart", "component": COMPONENT}}))
        .send()
        .await
        .expect("response");
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);

    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT request_id, route FROM audit_log ORDER BY audit_id")
            .fetch_all(&f.pool)
            .await
            .expect("audit rows");
    assert_eq!(rows.len() as i64 - before, 3, "{rows:?}");
    assert_eq!(
        rows.iter().map(|(r, _)| r.as_str()).collect::<Vec<_>>(),
        ["req-command-1", "req-token-1", "req-token-2"]
    );
    assert_eq!(f.count("SELECT count(*) FROM commands").await, 1);
    // The audit log reads back through the API (admin only).
    let page: Value = f
        .request(Method::GET, "/api/v1/audit?limit=2", Some(&t.admin))
        .send()
        .await
        .expect("response")
        .json()
        .await
        .expect("audit page");
    assert_eq!(page["entries"].as_array().map(Vec::len), Some(2));
    assert_eq!(page["entries"][0]["request_id"], "req-token-2");
    assert!(page["next_cursor"].is_i64());
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_is_answered_4xx_and_nothing_is_stored() {
    let f = Fixture::new(|_| {}).await;
    f.seed_host().await;
    let t = f.tokens().await;
    let tokens_before = f.count("SELECT count(*) FROM api_tokens").await;
    let sql = "x'; DROP TABLE events; --";
    let enc = |s: &str| {
        s.replace(' ', "%20")
            .replace('\'', "%27")
            .replace(';', "%3B")
    };
    let huge = "a".repeat(1 << 20);
    let posts: Vec<(&str, &str, String)> = vec![
        ("malformed JSON", "/api/v1/commands", "{\"host\": ".to_owned()),
        ("wrong type", "/api/v1/commands", json!({"host": 7, "action": {"kind": "restart", "component": COMPONENT}}).to_string()),
        ("unknown field", "/api/v1/commands", json!({"host": HOST, "action": {"kind": "restart", "component": COMPONENT}, "shell": "rm -rf /"}).to_string()),
        ("unknown field in action", "/api/v1/commands", json!({"host": HOST, "action": {"kind": "restart", "component": COMPONENT, "x": 1}}).to_string()),
        ("unknown action", "/api/v1/commands", json!({"host": HOST, "action": {"kind": "exec", "cmd": "id"}}).to_string()),
        ("huge body", "/api/v1/commands", json!({"host": huge, "action": {"kind": "restart", "component": COMPONENT}}).to_string()),
        ("SQL in host", "/api/v1/commands", json!({"host": sql, "action": {"kind": "restart", "component": COMPONENT}}).to_string()),
        ("SQL in component", "/api/v1/commands", json!({"host": HOST, "action": {"kind": "restart", "component": sql}}).to_string()),
        ("NUL in component", "/api/v1/commands", json!({"host": HOST, "action": {"kind": "restart", "component": "a\u{0}b"}}).to_string()),
        ("deadline too far", "/api/v1/commands", json!({"host": HOST, "action": {"kind": "restart", "component": COMPONENT}, "deadline_seconds": 99_999_999}).to_string()),
        ("negative deadline", "/api/v1/commands", json!({"host": HOST, "action": {"kind": "restart", "component": COMPONENT}, "deadline_seconds": -1}).to_string()),
        ("bad role", "/api/v1/tokens", json!({"name": "x", "role": "root"}).to_string()),
        ("empty name", "/api/v1/tokens", json!({"name": "", "role": "viewer"}).to_string()),
        ("bad expiry", "/api/v1/tokens", json!({"name": "x", "role": "viewer", "expires_in": "-5d"}).to_string()),
        ("endless expiry", "/api/v1/tokens", json!({"name": "x", "role": "viewer", "expires_in": "300000years"}).to_string()),
    ];
    for (what, path, body) in posts {
        let sent = f
            .request(Method::POST, path, Some(&t.admin))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            // The server answers 413 after reading `max_body_bytes` and closes the
            // connection; a client still writing the rest of a 1 MiB body may see the
            // close before the answer. That is a refusal too (nothing stored is checked
            // below); any other error is not.
            Err(e) if what == "huge body" && e.is_request() => continue,
            Err(e) => panic!("{what}: {e:?}"),
        };
        let status = response.status();
        assert!(status.is_client_error(), "{what}: {status}");
        let body: Value = response.json().await.unwrap_or(Value::Null);
        assert!(
            body["code"].is_string() && body["message"].is_string(),
            "{what}: {body}"
        );
    }
    let gets = [
        format!("/api/v1/events?host={}", enc(sql)),
        format!("/api/v1/events?kind={}&severity={}", enc(sql), enc(sql)),
        "/api/v1/events?limit=0".to_owned(),
        "/api/v1/events?limit=-1".to_owned(),
        "/api/v1/events?limit=abc".to_owned(),
        "/api/v1/events?surprise=1".to_owned(),
        "/api/v1/events?from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z".to_owned(),
        "/api/v1/history?metric=gpu_util&step=1ms&from=2020-01-01T00:00:00Z&to=2026-01-01T00:00:00Z".to_owned(),
        "/api/v1/history?metric=gpu_util&step=99999999999999999999s".to_owned(),
        "/api/v1/history?metric=gpu_util&points=0".to_owned(),
        "/api/v1/history?metric=gpu_util&labels=%5B1%5D".to_owned(),
        format!("/api/v1/history?metric={}&labels=%7B%22gpu%22%3A%22{}%22%7D", enc(sql), enc(sql)),
        "/api/v1/history?metric=".to_owned(),
        "/api/v1/commands/not-hex".to_owned(),
        "/api/v1/commands?state=bogus".to_owned(),
        format!("/api/v1/hosts/{}", enc(sql)),
        "/api/v1/hosts/api-host/components/web/logs?lines=99999999".to_owned(),
    ];
    for path in gets {
        let response = f
            .request(Method::GET, &path, Some(&t.admin))
            .send()
            .await
            .expect("response");
        let status = response.status();
        // SQL metacharacters in a filter are only values: an empty answer.
        if path.starts_with("/api/v1/events?host")
            || path.starts_with("/api/v1/events?kind")
            || path.contains("labels=%7B")
        {
            assert_eq!(status, StatusCode::OK, "{path}");
            continue;
        }
        assert!(status.is_client_error(), "{path}: {status}");
        let body: Value = response.json().await.unwrap_or(Value::Null);
        assert!(body["code"].is_string(), "{path}: {body}");
    }
    let bad_resume = f
        .request(Method::GET, "/api/v1/events/stream", Some(&t.admin))
        .header("last-event-id", "1; DROP")
        .send()
        .await
        .expect("response");
    assert_eq!(bad_resume.status(), StatusCode::BAD_REQUEST);
    let revoke_bad = f
        .request(Method::DELETE, "/api/v1/tokens/abc", Some(&t.admin))
        .send()
        .await
        .expect("response");
    assert_eq!(revoke_bad.status(), StatusCode::BAD_REQUEST);

    assert_eq!(f.count("SELECT count(*) FROM commands").await, 0);
    assert_eq!(f.count("SELECT count(*) FROM audit_log").await, 0);
    assert_eq!(
        f.count("SELECT count(*) FROM api_tokens").await,
        tokens_before
    );
    assert!(
        f.count("SELECT count(*) FROM events").await >= 0,
        "events table still there"
    );
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_over_its_rate_limit_gets_429_with_retry_after() {
    let f = Fixture::new(|c| {
        c.api.rate_per_second = 1;
        c.api.burst = 3;
    })
    .await;
    let t = f.tokens().await;
    let mut limited = None;
    for _ in 0..10 {
        let response = f
            .request(Method::GET, "/api/v1/hosts", Some(&t.viewer))
            .send()
            .await
            .expect("response");
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(response);
            break;
        }
        assert_eq!(response.status(), StatusCode::OK);
    }
    let limited = limited.expect("a 429 within 10 quick requests at 1/s, burst 3");
    let retry: u64 = limited.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=2).contains(&retry), "{retry}");
    // Another token has its own bucket.
    let other = f
        .request(Method::GET, "/api/v1/hosts", Some(&t.operator))
        .send()
        .await
        .expect("response");
    assert_eq!(other.status(), StatusCode::OK);
    let counted = f.metric("razar_collector_api_rate_limited_total").await;
    assert!(counted.is_some_and(|n| n >= 1.0), "{counted:?}");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_of_one_second_samples_comes_back_as_at_most_1000_points_from_rollups() {
    let f = Fixture::new(|_| {}).await;
    f.seed_host().await;
    let t = f.tokens().await;
    // 24 h of 1 s samples ending at a settled 10-minute boundary.
    let now = Utc::now();
    let end_ms = (now.timestamp_millis() - 30 * 60_000).div_euclid(600_000) * 600_000;
    let end = DateTime::from_timestamp_millis(end_ms).expect("end");
    let start = end - ChronoDuration::hours(24);
    for day in [start, end] {
        sqlx::query("SELECT razar_ensure_day(($1::timestamptz AT TIME ZONE 'UTC')::date)")
            .bind(day)
            .execute(&f.pool)
            .await
            .expect("partition");
    }
    let series: i64 = sqlx::query_scalar(
        "INSERT INTO series (host_id, metric, labels) VALUES ($1, 'gpu_utilization', '{\"gpu\":\"0\"}') RETURNING series_id",
    )
    .bind(HOST)
    .fetch_one(&f.pool)
    .await
    .expect("series");
    // Each minute's value is its minute number mod 100.
    sqlx::query(
        "INSERT INTO samples (series_id, ts, value)
         SELECT $1, ts, ((extract(epoch FROM ts)::bigint / 60) % 100)::float8
         FROM generate_series($2::timestamptz, $3::timestamptz - interval '1 second', interval '1 second') ts",
    )
    .bind(series)
    .bind(start)
    .bind(end)
    .execute(&f.pool)
    .await
    .expect("samples");
    let service = f.service.as_ref().expect("service");
    // The maintenance task may compact at the same moment (then this pass reports
    // `contended` and moves nothing): pass again until one runs uncontended.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while service
        .store()
        .compact(end)
        .await
        .expect("compaction")
        .contended
    {
        assert!(
            std::time::Instant::now() < deadline,
            "compaction stayed contended"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(
        f.count(&format!(
            "SELECT count(*) FROM samples WHERE series_id = {series}"
        ))
        .await,
        0,
        "compaction moved every sample into chunks and rollups"
    );
    let minute_value = |minute_ms: i64| (minute_ms / 60_000 % 100) as f64;

    let url = format!(
        "/api/v1/history?metric=gpu_utilization&host={HOST}&labels=%7B%22gpu%22%3A%220%22%7D&from={}&to={}&points=1000",
        start.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        end.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    let h = f.get_json(&url, &t.viewer).await;
    assert_eq!(h["source"], "rollup_1m");
    assert_eq!(h["step_ms"], 120_000);
    let points = h["series"][0]["points"].as_array().expect("points");
    assert_eq!(points.len(), 720, "24 h in 2-minute buckets");
    let mut samples = 0;
    for p in points {
        let ts = p["ts_ms"].as_i64().expect("ts");
        let expected = (minute_value(ts) + minute_value(ts + 60_000)) / 2.0;
        let got = p["value"].as_f64().expect("value");
        assert!((got - expected).abs() < 1e-9, "{p}: expected {expected}");
        assert_eq!(p["count"], 120);
        samples += p["count"].as_i64().expect("count");
    }
    assert_eq!(samples, 86_400, "every sample counted once");

    // A short range at a fine step comes from the decoded chunks.
    let from = end - ChronoDuration::minutes(10);
    let url = format!(
        "/api/v1/history?metric=gpu_utilization&host={HOST}&from={}&to={}&step=10s",
        from.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        end.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    let h = f.get_json(&url, &t.viewer).await;
    assert_eq!(h["source"], "raw");
    let points = h["series"][0]["points"].as_array().expect("points");
    assert_eq!(points.len(), 60);
    for p in points {
        let ts = p["ts_ms"].as_i64().expect("ts");
        let got = p["value"].as_f64().expect("value");
        assert!((got - minute_value(ts)).abs() < 1e-9, "{p}");
        assert_eq!(p["count"], 10);
    }
    f.stop().await;
}

/// The raw samples' BRIN indexes (on `ts` and `series_id`) are summarized only while
/// history is read: before any read the collector leaves them to vacuum; the first read
/// wakes the summarizer at once, and rows written while reads go on are summarized on
/// its next pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_raw_samples_index_is_kept_current_while_history_is_read() {
    let f = Fixture::new(|_| {}).await;
    f.seed_host().await;
    let t = f.tokens().await;
    let now = Utc::now();
    for day in [now - ChronoDuration::minutes(20), now] {
        sqlx::query("SELECT razar_ensure_day(($1::timestamptz AT TIME ZONE 'UTC')::date)")
            .bind(day)
            .execute(&f.pool)
            .await
            .expect("partition");
    }
    sqlx::query(
        "INSERT INTO series (host_id, metric, labels)
         SELECT $1, 'gpu_utilization', jsonb_build_object('gpu', g::text) FROM generate_series(0, 29) g",
    )
    .bind(HOST)
    .execute(&f.pool)
    .await
    .expect("series");
    let write = |from: DateTime<Utc>| {
        let pool = f.pool.clone();
        async move {
            sqlx::query(
                "INSERT INTO samples (series_id, ts, value)
                 SELECT s.series_id, ts, 0.5
                 FROM generate_series($1::timestamptz, $1::timestamptz + interval '599 seconds', interval '1 second') ts
                 CROSS JOIN series s WHERE s.metric = 'gpu_utilization'
                 ORDER BY ts, s.series_id",
            )
            .bind(from)
            .execute(&pool)
            .await
            .expect("samples")
        }
    };
    let from = DateTime::from_timestamp(now.timestamp() - 1_200, 0).expect("from");
    write(from).await;
    let summarized = "razar_collector_brin_ranges_summarized_total";
    assert_eq!(
        f.metric(summarized).await,
        Some(0.0),
        "summarized with no reader"
    );

    let url = format!(
        "/api/v1/history?metric=gpu_utilization&host={HOST}&labels=%7B%22gpu%22%3A%227%22%7D&from={}&to={}&step=10s",
        from.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        (from + ChronoDuration::minutes(20)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    let h = f.get_json(&url, &t.viewer).await;
    assert_eq!(h["source"], "raw");
    let counted: i64 = h["series"][0]["points"]
        .as_array()
        .expect("points")
        .iter()
        .filter_map(|p| p["count"].as_i64())
        .sum();
    assert_eq!(counted, 600, "every sample of gpu 7 once");
    let first = wait_for("the first read to start a summary", || async {
        f.metric(summarized).await.filter(|n| *n > 0.0)
    })
    .await;

    // Rows written while reads go on are summarized on a later pass.
    write(from + ChronoDuration::minutes(10)).await;
    f.request(Method::GET, &url, Some(&t.viewer))
        .send()
        .await
        .expect("response");
    wait_for("the new rows to be summarized", || async {
        f.metric(summarized).await.filter(|n| *n > first)
    })
    .await;
    f.stop().await;
}

/// Reads SSE `id:` lines from a response until `n` ids were seen or the deadline.
async fn read_ids(response: &mut reqwest::Response, n: usize, buf: &mut String) -> Vec<i64> {
    let mut ids = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    while ids.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "only {ids:?} of {n} events arrived");
        let chunk = tokio::time::timeout(left, response.chunk())
            .await
            .unwrap_or_else(|_| panic!("only {ids:?} of {n} events arrived"))
            .expect("stream");
        let Some(chunk) = chunk else {
            panic!("stream ended after {ids:?}");
        };
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let frame: String = buf.drain(..end + 2).collect();
            for line in frame.lines() {
                if let Some(id) = line.strip_prefix("id:") {
                    ids.push(id.trim().parse().expect("numeric id"));
                }
            }
        }
    }
    ids
}

async fn insert_event(conn: &mut sqlx::PgConnection, n: i64) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO events (host_id, ts, severity, subject_kind, kind, payload, message)
         VALUES ($1, now(), 'info', 'host', 'test', '{}', $2) RETURNING event_id",
    )
    .bind(HOST)
    .bind(format!("event {n}"))
    .fetch_one(conn)
    .await
    .expect("event")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_resumes_with_no_gap_and_no_duplicate() {
    let f = Fixture::new(|_| {}).await;
    let t = f.tokens().await;
    let mut conn = f.pool.acquire().await.expect("connection");
    let first = insert_event(&mut conn, 0).await;
    let mut stream = f
        .request(Method::GET, "/api/v1/events/stream", Some(&t.viewer))
        .header("last-event-id", (first - 1).to_string())
        .send()
        .await
        .expect("stream");
    assert_eq!(stream.status(), StatusCode::OK);
    let mut buf = String::new();
    assert_eq!(read_ids(&mut stream, 1, &mut buf).await, vec![first]);

    // An id taken first but committed last: the later one must wait for it.
    let mut slow = f.pool.begin().await.expect("transaction");
    let held = insert_event(&mut slow, 1).await;
    let quick = insert_event(&mut conn, 2).await;
    assert!(quick > held);
    // And an id rolled back for good.
    let mut undone = f.pool.begin().await.expect("transaction");
    let lost = insert_event(&mut undone, 3).await;
    undone.rollback().await.expect("rollback");
    let after_lost = insert_event(&mut conn, 4).await;
    assert!(after_lost > lost);
    // Give the stream time to (wrongly) pass the open gap, then commit it.
    tokio::time::sleep(Duration::from_millis(800)).await;
    slow.commit().await.expect("commit");
    let ids = read_ids(&mut stream, 3, &mut buf).await;
    assert_eq!(
        ids,
        vec![held, quick, after_lost],
        "in id order, the rolled-back one skipped"
    );
    drop(stream);

    // Missed while away, then resumed from the last id seen.
    let mut missed = Vec::new();
    for n in 5..10 {
        missed.push(insert_event(&mut conn, n).await);
    }
    let mut resumed = f
        .request(Method::GET, "/api/v1/events/stream", Some(&t.viewer))
        .header("last-event-id", after_lost.to_string())
        .send()
        .await
        .expect("stream");
    let mut buf = String::new();
    let ids = read_ids(&mut resumed, missed.len(), &mut buf).await;
    assert_eq!(ids, missed);
    // Nothing more (no duplicate) until a new one.
    let next = insert_event(&mut conn, 10).await;
    assert_eq!(read_ids(&mut resumed, 1, &mut buf).await, vec![next]);
    drop(resumed);
    drop(conn);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_follow_ends_when_its_client_leaves() {
    let f = Fixture::new(|_| {}).await;
    f.seed_host().await;
    let t = f.tokens().await;
    assert_eq!(f.metric("razar_collector_log_follows").await, Some(0.0));
    let response = f
        .request(
            Method::GET,
            &format!("/api/v1/hosts/{HOST}/components/{COMPONENT}/logs?follow=true&lines=10"),
            Some(&t.operator),
        )
        .header("x-request-id", "req-follow")
        .send()
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    wait_for("the follow to be live", || async {
        (f.metric("razar_collector_log_follows").await == Some(1.0)).then_some(())
    })
    .await;
    let (tail_id, tail_request): (Vec<u8>, Option<String>) =
        sqlx::query_as("SELECT command_id, request_id FROM commands WHERE kind = 'tail_logs'")
            .fetch_one(&f.pool)
            .await
            .expect("the tail command");
    assert_eq!(tail_request.as_deref(), Some("req-follow"));
    drop(response);
    wait_for("the follow to end", || async {
        (f.metric("razar_collector_log_follows").await == Some(0.0)).then_some(())
    })
    .await;
    let cancel: Value = wait_for("CancelTail to be sent", || async {
        sqlx::query_scalar::<_, sqlx::types::Json<Value>>(
            "SELECT action FROM commands WHERE kind = 'cancel_tail'",
        )
        .fetch_optional(&f.pool)
        .await
        .expect("query")
        .map(|j| j.0)
    })
    .await;
    let cancelled: Vec<u8> = cancel["CancelTail"]["command"]
        .as_array()
        .expect("command id")
        .iter()
        .map(|b| b.as_u64().expect("byte") as u8)
        .collect();
    assert_eq!(cancelled, tail_id);
    f.stop().await;
}
