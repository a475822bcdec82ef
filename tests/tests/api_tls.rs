//! Operator certificates on the HTTPS API port (`[api.tls]`), against the whole
//! collector ([`Service`]) and a private PostgreSQL, over real TLS with certificates
//! from our own `razar-certs`:
//!
//! - an operator certificate mapped to `operator` creates a command without a token,
//!   and the audit row names it `cert:<name>`;
//! - a certificate mapped to `viewer` reads but gets 403 on a mutation;
//! - a valid certificate whose name is not mapped gets 403 (never a default role), as
//!   does a fleet certificate that names no operator (an agent's);
//! - neither certificate nor token: 401; a bearer token over TLS still works;
//! - a certificate of another CA fails the handshake;
//! - a certificate revoked (CRL rewritten, then reloaded as SIGHUP does) is refused;
//! - the `razar` CLI with `--cert/--key/--ca` lists the hosts.

use chrono::Utc;
use razar_certs::Issued;
use razar_collector::config::{ApiTlsSettings, CollectorConfig, Database, TlsPaths};
use razar_collector::service::Service;
use razar_collector::store::tokens::{self, Role};
use razar_tests::ca::TestCa;
use razar_tests::live::binary;
use razar_tests::pg::TestPg;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;
use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::time::Duration;

const HOST: &str = "tls-host";
const COMPONENT: &str = "web";

fn free_udp_port() -> u16 {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a probe socket");
    socket.local_addr().expect("probe address").port()
}

struct Fixture {
    ca: TestCa,
    _pg: TestPg,
    pool: PgPool,
    service: Option<Service>,
    /// `https://localhost:PORT` (the collector certificate names `localhost`).
    base: String,
    _dir: tempfile::TempDir,
}

impl Fixture {
    /// A collector with `[api.tls]` (the collector certificate, the fleet CA as client
    /// CA, its CRL) and `operators` as the role table.
    async fn new(operators: &[(&str, Role)]) -> Fixture {
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
        c.api_tls = Some(ApiTlsSettings {
            cert: ca.collector().cert_path.clone(),
            key: ca.collector().key_path.clone(),
            client_ca: ca.ca_path(),
            crl: Some(ca.crl_path()),
            operators: operators
                .iter()
                .map(|(name, role)| ((*name).to_owned(), *role))
                .collect::<BTreeMap<_, _>>(),
        });
        c.database = Database::Url(pg.url());
        c.pool_size = NonZeroU32::new(8).expect("nonzero");
        c.ingest_writers = NonZeroU32::new(1).expect("nonzero");
        c.health.database_slow = Duration::from_secs(30);
        let service = Service::start(c).await.expect("collector");
        assert!(service.api_url().starts_with("https://"));
        let base = format!("https://localhost:{}", service.http_addr().port());
        let pool = pg.pool().await.expect("pool");
        let f = Fixture {
            ca,
            _pg: pg,
            pool,
            service: Some(service),
            base,
            _dir: dir,
        };
        f.seed_host().await;
        f
    }

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
    }

    /// An HTTPS client trusting the fleet CA, presenting `cert` if given. A fresh
    /// client each time: no connection (and no earlier handshake) is reused.
    fn client(&self, cert: Option<&Issued>) -> reqwest::Client {
        let ca = reqwest::Certificate::from_pem(self.ca.ca_pem().as_bytes()).expect("CA PEM");
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .add_root_certificate(ca)
            .timeout(Duration::from_secs(60));
        if let Some(cert) = cert {
            builder = builder.identity(identity(cert));
        }
        builder.build().expect("HTTPS client")
    }

    async fn command(
        &self,
        client: &reqwest::Client,
        token: Option<&str>,
        request_id: &str,
    ) -> Result<reqwest::Response, reqwest::Error> {
        let mut r = client
            .post(format!("{}/api/v1/commands", self.base))
            .header("x-request-id", request_id)
            .json(&json!({"host": HOST, "action": {"kind": "restart", "component": COMPONENT}}));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send().await
    }

    async fn hosts(&self, client: &reqwest::Client) -> Result<reqwest::Response, reqwest::Error> {
        client
            .get(format!("{}/api/v1/hosts", self.base))
            .send()
            .await
    }

    async fn audit_who(&self, request_id: &str) -> Option<(String, String, Option<i64>)> {
        sqlx::query_as("SELECT who, role, token_id FROM audit_log WHERE request_id = $1")
            .bind(request_id)
            .fetch_optional(&self.pool)
            .await
            .expect("audit query")
    }

    /// The `/metrics` page, fetched over HTTPS with `cert` if given.
    async fn metrics(&self, cert: Option<&Issued>) -> String {
        self.client(cert)
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }

    async fn shutdown(mut self) {
        if let Some(service) = self.service.take() {
            service.shutdown().await;
        }
    }
}

fn identity(cert: &Issued) -> reqwest::Identity {
    let mut pem = std::fs::read(&cert.cert_path).expect("certificate");
    pem.push(b'\n');
    pem.extend(std::fs::read(&cert.key_path).expect("key"));
    reqwest::Identity::from_pem(&pem).expect("identity")
}

async fn error_code(response: reqwest::Response) -> (StatusCode, String, String) {
    let status = response.status();
    let body: Value = response.json().await.expect("JSON error");
    (
        status,
        body["code"].as_str().unwrap_or_default().to_owned(),
        body["message"].as_str().unwrap_or_default().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_certificates_authenticate_on_the_https_api() {
    let mut f = Fixture::new(&[
        ("alice", Role::Operator),
        ("vera", Role::Viewer),
        ("rex", Role::Operator),
    ])
    .await;
    let alice = f.ca.operator("alice").expect("alice");
    let vera = f.ca.operator("vera").expect("vera");
    let uma = f.ca.operator("uma").expect("uma (not in the table)");
    let rex = f.ca.operator("rex").expect("rex");
    let stranger = f.ca.other_ca_agent("stranger").expect("other CA");

    // An operator certificate mapped to `operator`: a command without a token, audited
    // under the certificate's name (no token id).
    let created = f
        .command(&f.client(Some(&alice)), None, "req-cert-alice")
        .await
        .expect("response");
    assert_eq!(created.status(), StatusCode::CREATED);
    let command: Value = created.json().await.expect("command");
    assert_eq!(command["request_id"], "req-cert-alice");
    assert_eq!(
        f.audit_who("req-cert-alice").await,
        Some(("cert:alice".to_owned(), "operator".to_owned(), None))
    );

    // Mapped to `viewer`: reads, but may not mutate; nothing audited or stored.
    let client = f.client(Some(&vera));
    assert_eq!(
        f.hosts(&client).await.expect("response").status(),
        StatusCode::OK
    );
    let (status, code, _) = error_code(
        f.command(&client, None, "req-cert-vera")
            .await
            .expect("response"),
    )
    .await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    assert_eq!(f.audit_who("req-cert-vera").await, None);

    // Valid but not in the table: refused, never a default role.
    let (status, _, message) =
        error_code(f.hosts(&f.client(Some(&uma))).await.expect("response")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        message.contains("certificate not mapped to a role"),
        "{message}"
    );

    // A fleet certificate that names no operator (an agent's): refused too.
    let agent = f.ca.agent("some-host").expect("agent certificate");
    let (status, _, message) =
        error_code(f.hosts(&f.client(Some(&agent))).await.expect("response")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(message.contains("not an operator certificate"), "{message}");

    // Neither certificate nor token: 401.
    let anonymous = f.client(None);
    let response = f.hosts(&anonymous).await.expect("response");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let (status, _, _) = error_code(
        f.command(&anonymous, None, "req-anonymous")
            .await
            .expect("response"),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // A bearer token over TLS, without a certificate, still works (and is audited as
    // the token).
    let (_, token) = tokens::create(&f.pool, "ops-token", Role::Operator, None, None)
        .await
        .expect("token");
    let response = f
        .command(&anonymous, Some(&token), "req-token-tls")
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::CREATED);
    let (who, role, token_id) = f.audit_who("req-token-tls").await.expect("audit row");
    assert_eq!((who.as_str(), role.as_str()), ("ops-token", "operator"));
    assert!(token_id.is_some());

    // A certificate from another CA: the handshake fails, no answer at all.
    let refused = f.hosts(&f.client(Some(&stranger))).await;
    assert!(refused.is_err(), "another CA's certificate got {refused:?}");

    // Revocation: rex works, is revoked (new CRL, reloaded as SIGHUP does), then
    // refused at the handshake.
    assert_eq!(
        f.hosts(&f.client(Some(&rex)))
            .await
            .expect("response")
            .status(),
        StatusCode::OK
    );
    f.ca.revoke(&rex).expect("revoke rex");
    f.service
        .as_ref()
        .expect("service")
        .reload_tls()
        .expect("reload");
    let refused = f.command(&f.client(Some(&rex)), None, "req-revoked").await;
    assert!(refused.is_err(), "a revoked certificate got {refused:?}");
    assert_eq!(f.audit_who("req-revoked").await, None);
    // Others are unaffected by the reload.
    assert_eq!(
        f.hosts(&f.client(Some(&alice)))
            .await
            .expect("response")
            .status(),
        StatusCode::OK
    );

    // The failed handshakes and the refusals are counted.
    let metrics = f.metrics(Some(&alice)).await;
    let value = |line_start: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    assert!(
        value("razar_collector_api_tls_handshakes_failed_total{reason=\"error\"}")
            .is_some_and(|v| v >= 2.0),
        "{metrics}"
    );
    assert_eq!(
        value("razar_collector_api_auth_refused_total{reason=\"cert_unmapped\"}"),
        Some(1.0),
        "{metrics}"
    );
    f.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn razar_cli_lists_hosts_with_an_operator_certificate() {
    let mut f = Fixture::new(&[("alice", Role::Viewer)]).await;
    let alice = f.ca.operator("alice").expect("alice");
    let run = |args: Vec<String>| async move {
        tokio::process::Command::new(binary("razar"))
            .args(args)
            .env_remove("RAZAR_SERVER")
            .env_remove("RAZAR_TOKEN")
            .env_remove("RAZAR_CONFIG")
            .env_remove("RAZAR_CERT")
            .env_remove("RAZAR_KEY")
            .env_remove("RAZAR_CA")
            .env("XDG_CONFIG_HOME", "/nonexistent")
            .output()
            .await
            .expect("run razar")
    };
    let path = |p: &std::path::Path| p.display().to_string();
    let args = |with_cert: bool| {
        let mut a = vec![
            "--server".to_owned(),
            f.base.clone(),
            "--ca".to_owned(),
            path(&f.ca.ca_path()),
        ];
        if with_cert {
            a.extend([
                "--cert".to_owned(),
                path(&alice.cert_path),
                "--key".to_owned(),
                path(&alice.key_path),
            ]);
        }
        a.extend(["-o".to_owned(), "json".to_owned(), "hosts".to_owned()]);
        a
    };
    let out = run(args(true)).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(HOST), "{stdout}");
    // Without the certificate (and no token) the same call is refused: exit 1.
    let out = run(args(false)).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    f.shutdown().await;
}

/// A client that opens the HTTPS port and never sends its TLS hello (a slowloris) does
/// not keep others out while it waits, and the collector closes it after
/// `HANDSHAKE_TIMEOUT` and counts it as a `timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_handshake_is_cut_off_and_counted() {
    use razar_collector::api::tls::HANDSHAKE_TIMEOUT;
    use tokio::io::AsyncReadExt as _;
    let f = Fixture::new(&[]).await;
    let port = f.service.as_ref().expect("service").http_addr().port();
    let started = std::time::Instant::now();
    let mut silent = Vec::new();
    for _ in 0..8 {
        silent.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect"),
        );
    }
    // Meanwhile, a client with a token gets in.
    let (_, token) = tokens::create(&f.pool, "viewer-token", Role::Viewer, None, None)
        .await
        .expect("token");
    let response = f
        .client(None)
        .get(format!("{}/api/v1/hosts", f.base))
        .bearer_auth(&token)
        .send()
        .await
        .expect("hosts");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        started.elapsed() < HANDSHAKE_TIMEOUT,
        "the token client waited for the silent ones"
    );
    // Each silent connection is closed by the collector, not before the timeout.
    for mut socket in silent {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(
            HANDSHAKE_TIMEOUT + razar_tests::live::PATIENCE,
            socket.read(&mut buf),
        )
        .await
        .expect("the collector never closed a silent connection");
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "a silent connection got bytes: {read:?}"
        );
    }
    assert!(
        started.elapsed() >= HANDSHAKE_TIMEOUT - Duration::from_millis(500),
        "closed after {:?}, before the handshake timeout",
        started.elapsed()
    );
    let text = f.metrics(None).await;
    let timeouts: f64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("razar_collector_api_tls_handshakes_failed_total{reason=\"timeout\"} ")
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert_eq!(timeouts, 8.0, "{text}");
    f.shutdown().await;
}
