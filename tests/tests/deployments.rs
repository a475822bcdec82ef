//! Deployments end to end (`razar_collector::deployments`): the whole collector
//! ([`Service`]) against a private PostgreSQL, real agent daemons (one per host, each
//! with its own certificate) supervising real child processes over QUIC with mTLS.
//!
//! - a crashing revision (its process exits at once) to 4 hosts with 1 canary: the
//!   canary is reverted to its old revision, the deployment ends `reverted` with the
//!   reason, and no other host is touched (no command, its process never restarted);
//! - a good revision with manual promotion waits after the canary for `promote`, holds
//!   while paused (also once promoted), then rolls through every host one at a time;
//!   with automatic promotion it goes through all waves by itself.
//!
//! Each host's component appends its revision to a file in its working directory at
//! every start: the file counts starts, so "not touched" is counted, not guessed.

use razar_agent::config::Config;
use razar_agent::daemon::{Daemon, DaemonOptions};
use razar_collector::config::{CollectorConfig, Database, TlsPaths};
use razar_collector::deployments::{
    Deployment, DeploymentError, HostSelector, NewDeployment, Promotion,
};
use razar_collector::service::Service;
use razar_shared::protocol::RevisionSpec;
use razar_tests::ca::{TestCa, COLLECTOR_NAMES};
use razar_tests::pg::TestPg;
use sqlx::PgPool;
use std::future::Future;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Every wait for a condition gives up after this (a loaded 2-core machine).
const PATIENCE: Duration = Duration::from_secs(90);

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

struct Fixture {
    ca: TestCa,
    pg: TestPg,
    pool: PgPool,
    quic_port: u16,
    dir: tempfile::TempDir,
    hosts: Vec<String>,
}

impl Fixture {
    async fn new(n: usize) -> Fixture {
        let ca = TestCa::new().expect("test CA");
        let pg = TestPg::start().await.expect("PostgreSQL");
        pg.store().await.expect("migrated store").close().await;
        let pool = pg.pool().await.expect("pool");
        Fixture {
            ca,
            pg,
            pool,
            quic_port: free_udp_port(),
            dir: tempfile::tempdir().expect("test dir"),
            hosts: (1..=n).map(|i| format!("deploy-h{i}")).collect(),
        }
    }

    /// The collector: this database, heartbeats every 250 ms, the driver every 200 ms.
    async fn collector(&self) -> Service {
        let mut c = CollectorConfig::defaults(&self.dir.path().join("collector"));
        c.quic_listen = ([127, 0, 0, 1], self.quic_port).into();
        c.http_listen = ([127, 0, 0, 1], 0).into();
        c.tls = TlsPaths {
            ca: self.ca.ca_path(),
            cert: self.ca.collector().cert_path.clone(),
            key: self.ca.collector().key_path.clone(),
            crl: Some(self.ca.crl_path()),
        };
        c.database = Database::Url(self.pg.url());
        c.pool_size = NonZeroU32::new(8).expect("nonzero");
        c.ingest_writers = NonZeroU32::new(2).expect("nonzero");
        c.heartbeat_interval = Duration::from_millis(250);
        c.lost_after_missed = NonZeroU32::new(8).expect("nonzero");
        c.health.database_slow = Duration::from_secs(30);
        c.deployments.tick = Duration::from_millis(200);
        Service::start(c).await.expect("collector starts")
    }

    fn host_dir(&self, host: &str) -> PathBuf {
        self.dir.path().join(host)
    }

    /// The revisions the host's component started with, in order.
    fn starts(&self, host: &str) -> Vec<String> {
        std::fs::read_to_string(self.host_dir(host).join("starts"))
            .map(|s| s.lines().map(str::to_owned).collect())
            .unwrap_or_default()
    }

    /// Starts every host's agent: component `api` at revision v1, in its own directory.
    async fn agents(&mut self) -> Vec<Daemon> {
        let mut daemons = Vec::new();
        for host in self.hosts.clone() {
            let issued = self.ca.agent(&host).expect("agent certificate");
            let files = self.ca.client_files(&issued);
            let d = self.host_dir(&host);
            std::fs::create_dir_all(&d).expect("host dir");
            let text = format!(
                "[agent]\nprofile = \"core\"\ndata_dir = \"{d}/data\"\nlog_dir = \"{d}/logs\"\nlisten = \"127.0.0.1:0\"\nsample_interval = \"200ms\"\n\n\
                 [collector]\naddress = \"127.0.0.1:{port}\"\nserver_name = \"{name}\"\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\n\
                 [[component]]\nname = \"api\"\nrevision = \"v1\"\nworking_dir = \"{d}\"\ncommand = \"sh\"\nargs = [\"-c\", \"echo v1 >> starts; exec sleep 1000.61\"]\n",
                d = d.display(),
                port = self.quic_port,
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
            .expect("agent daemon starts");
            daemons.push(daemon);
        }
        for host in &self.hosts {
            wait_for("every host's api ready on v1", || async {
                let row: Option<(String, String)> = sqlx::query_as(
                    "SELECT state, revision FROM components WHERE host_id = $1 AND name = 'api'",
                )
                .bind(host)
                .fetch_optional(&self.pool)
                .await
                .expect("components");
                (row == Some(("ready".into(), "v1".into()))).then_some(())
            })
            .await;
        }
        daemons
    }

    /// (host, state, revision) of every host's component.
    async fn components(&self) -> Vec<(String, String, String)> {
        sqlx::query_as(
            "SELECT host_id, state, revision FROM components WHERE name = 'api' ORDER BY host_id",
        )
        .fetch_all(&self.pool)
        .await
        .expect("components")
    }

    /// Commands stored per host.
    async fn commands_of(&self, host: &str) -> Vec<(String, String)> {
        sqlx::query_as("SELECT kind, state FROM commands WHERE host_id = $1 ORDER BY created_at")
            .bind(host)
            .fetch_all(&self.pool)
            .await
            .expect("commands")
    }
}

fn revision(version: &str, script: &str) -> RevisionSpec {
    RevisionSpec {
        version: version.into(),
        command: "sh".into(),
        args: vec!["-c".into(), format!("echo {version} >> starts; {script}")],
        env: vec![("RAZAR_REVISION".into(), version.into())],
    }
}

async fn wait_state(service: &Service, id: i64, state: &str) -> Deployment {
    wait_for(&format!("deployment {id} {state}"), || async {
        let d = service
            .deployments()
            .get(id)
            .await
            .expect("read the deployment")
            .expect("the deployment is stored");
        assert!(
            d.state == state || !matches!(d.state.as_str(), "succeeded" | "reverted" | "failed"),
            "deployment ended {} instead of {state}: {d:#?}",
            d.state
        );
        (d.state == state).then_some(d)
    })
    .await
}

async fn shutdown(service: Service, daemons: Vec<Daemon>) {
    for daemon in daemons {
        daemon.shutdown().await;
    }
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashing_revision_reverts_the_canary_and_touches_no_other_host() {
    let mut f = Fixture::new(4).await;
    let service = f.collector().await;
    let daemons = f.agents().await;

    let mut new = NewDeployment::new(
        "api",
        revision("v2", "exit 3"),
        HostSelector {
            all: true,
            ..HostSelector::default()
        },
    );
    new.canaries = 1;
    new.max_parallel = 2;
    new.min_healthy = Duration::from_secs(3);
    new.healthy_deadline = Duration::from_secs(60);
    new.promotion = Promotion::Auto;
    let created = service
        .deployments()
        .create(new)
        .await
        .expect("deployment created");
    assert_eq!(created.state, "created");
    assert_eq!(created.hosts.len(), 4);
    assert!(created.auto_revert, "auto-revert is on by default");
    let canary = created.hosts[0].host.clone();
    assert!(created.hosts[0].canary && !created.hosts[1].canary);

    let done = wait_state(&service, created.id, "reverted").await;
    let reason = done.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("canary") && reason.contains(&canary) && reason.contains("v2"),
        "the reason says which host failed and why: {reason}"
    );
    let first = &done.hosts[0];
    assert_eq!(first.state, "reverted", "{done:#?}");
    assert!(first.reason.is_some() && first.failed_at.is_some() && first.reverted_at.is_some());
    for other in &done.hosts[1..] {
        assert_eq!(other.state, "pending", "{done:#?}");
        assert!(other.deploying_at.is_none(), "{other:?}");
    }

    // The canary runs v1 again; nobody else ever left it, nor restarted.
    wait_for("the canary ready on v1", || async {
        f.components()
            .await
            .iter()
            .any(|c| c.0 == canary && c.1 == "ready" && c.2 == "v1")
            .then_some(())
    })
    .await;
    let starts = f.starts(&canary);
    assert_eq!(starts.first().map(String::as_str), Some("v1"));
    assert!(starts.iter().any(|s| s == "v2"), "{starts:?}");
    assert_eq!(starts.last().map(String::as_str), Some("v1"), "{starts:?}");
    let kinds: Vec<String> = f
        .commands_of(&canary)
        .await
        .into_iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(kinds, ["deploy_revision", "rollback"]);
    for host in &f.hosts[1..] {
        assert_eq!(f.starts(host), ["v1"], "{host} was touched");
        assert!(f.commands_of(host).await.is_empty(), "{host} got a command");
    }
    for (host, state, rev) in f.components().await {
        assert_eq!((state.as_str(), rev.as_str()), ("ready", "v1"), "{host}");
    }
    // Ended: operations are refused, and the metrics count it.
    assert!(service.deployments().resume(created.id).await.is_err());
    service.deployments().drive_once().await.expect("a pass");
    let m = service.deployments().metrics();
    assert_eq!(m.by_state.with_label_values(&["reverted"]).get(), 1);
    assert_eq!(
        m.host_steps.with_label_values(&["deploy", "failed"]).get(),
        1
    );
    assert_eq!(
        m.host_steps
            .with_label_values(&["revert", "reverted"])
            .get(),
        1
    );
    shutdown(service, daemons).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_revision_waits_for_promotion_holds_while_paused_and_rolls_through_all_waves() {
    let mut f = Fixture::new(3).await;
    let service = f.collector().await;
    let daemons = f.agents().await;
    let deployments = service.deployments();

    // Manual promotion, one host at a time.
    let mut new = NewDeployment::new(
        "api",
        revision("v2", "exec sleep 1000.62"),
        HostSelector {
            hosts: vec![f.hosts[2].clone()],
            profile: Some("core".into()),
            all: false,
        },
    );
    new.min_healthy = Duration::from_secs(1);
    new.healthy_deadline = Duration::from_secs(60);
    let created = deployments.create(new).await.expect("deployment created");
    let order: Vec<&str> = created.hosts.iter().map(|h| h.host.as_str()).collect();
    assert_eq!(
        order,
        [
            f.hosts[2].as_str(),
            f.hosts[0].as_str(),
            f.hosts[1].as_str()
        ],
        "listed hosts first, then the profile's"
    );
    let waiting = wait_state(&service, created.id, "waiting_promotion").await;
    assert_eq!(waiting.hosts[0].state, "healthy", "{waiting:#?}");
    // It waits: passes of the driver send nothing more.
    for _ in 0..3 {
        deployments.drive_once().await.expect("a pass");
    }
    let still = deployments
        .get(created.id)
        .await
        .expect("get")
        .expect("stored");
    assert_eq!(still.state, "waiting_promotion");
    assert!(
        still.hosts[1..].iter().all(|h| h.state == "pending"),
        "{still:#?}"
    );

    // Paused (by the engine's blame rule, as it would), then promoted: it still holds.
    let blamed = deployments
        .pause_for_blame("api", "v2", "change freeze")
        .await
        .expect("pause for blame");
    assert_eq!(blamed, [created.id]);
    let paused = deployments
        .get(created.id)
        .await
        .expect("get")
        .expect("stored");
    assert_eq!(paused.state, "paused");
    assert!(paused
        .reason
        .as_deref()
        .is_some_and(|r| r.contains("change freeze")));
    let promoted = deployments.promote(created.id).await.expect("promote");
    assert_eq!(promoted.state, "paused", "{promoted:#?}");
    for _ in 0..3 {
        deployments.drive_once().await.expect("a pass");
    }
    let held = deployments
        .get(created.id)
        .await
        .expect("get")
        .expect("stored");
    assert!(
        held.hosts[1..].iter().all(|h| h.state == "pending"),
        "{held:#?}"
    );
    assert!(f.commands_of(&f.hosts[0]).await.is_empty());
    assert!(
        deployments.promote(created.id).await.is_err(),
        "promoted once"
    );
    // One active deployment of a component per host.
    let mut overlapping = NewDeployment::new(
        "api",
        revision("v4", "exec sleep 1000.64"),
        HostSelector {
            hosts: vec![f.hosts[0].clone()],
            ..HostSelector::default()
        },
    );
    overlapping.canaries = 0;
    let refused = deployments.create(overlapping).await;
    assert!(
        matches!(&refused, Err(DeploymentError::Busy { .. })),
        "{refused:?}"
    );

    let resumed = deployments.resume(created.id).await.expect("resume");
    assert_eq!(resumed.state, "rolling", "{resumed:#?}");
    let done = wait_state(&service, created.id, "succeeded").await;
    assert!(done.hosts.iter().all(|h| h.state == "healthy"), "{done:#?}");
    assert!(done.finished_at.is_some() && done.reason.is_none());
    // One at a time: each host began after the previous one was healthy.
    for pair in done.hosts.windows(2) {
        let (before, after) = (&pair[0], &pair[1]);
        assert!(
            after.deploying_at >= before.healthy_at && before.healthy_at.is_some(),
            "{before:?} then {after:?}"
        );
    }
    for (host, state, rev) in f.components().await {
        assert_eq!((state.as_str(), rev.as_str()), ("ready", "v2"), "{host}");
    }

    // A deployment paused before it started sends nothing until resumed; rolled back
    // then, it ends without touching a host.
    let mut held = NewDeployment::new(
        "api",
        revision("v9", "exit 3"),
        HostSelector {
            all: true,
            ..HostSelector::default()
        },
    );
    held.promotion = Promotion::Auto;
    let held = deployments.create(held).await.expect("deployment created");
    let before = f.commands_of(&f.hosts[0]).await.len();
    // The driver may start it first (then the pause holds only what follows the canary).
    let paused = deployments.pause(held.id, "not yet").await.expect("pause");
    let canary_sent = paused.hosts[0].state != "pending";
    for _ in 0..3 {
        deployments.drive_once().await.expect("a pass");
    }
    let still = deployments
        .get(held.id)
        .await
        .expect("get")
        .expect("stored");
    assert!(
        still.hosts[1..].iter().all(|h| h.state == "pending"),
        "{still:#?}"
    );
    if !canary_sent {
        assert_eq!(still.state, "paused");
        assert!(
            still.hosts.iter().all(|h| h.state == "pending"),
            "{still:#?}"
        );
        let ended = deployments
            .roll_back(held.id, "abandoned")
            .await
            .expect("roll back");
        assert_eq!(ended.state, "reverted", "{ended:#?}");
        assert_eq!(f.commands_of(&f.hosts[0]).await.len(), before);
    } else {
        // Its canary (v9 crashes) is reverted: wait for the end before going on.
        wait_state(&service, held.id, "reverted").await;
        wait_for("every host ready on v2", || async {
            f.components()
                .await
                .iter()
                .all(|c| c.1 == "ready" && c.2 == "v2")
                .then_some(())
        })
        .await;
    }

    // Automatic promotion, two at a time: through every wave by itself.
    let mut new = NewDeployment::new(
        "api",
        revision("v3", "exec sleep 1000.63"),
        HostSelector {
            all: true,
            ..HostSelector::default()
        },
    );
    new.max_parallel = 2;
    new.min_healthy = Duration::from_secs(1);
    new.healthy_deadline = Duration::from_secs(60);
    new.promotion = Promotion::Auto;
    let created = deployments.create(new).await.expect("deployment created");
    let done = wait_state(&service, created.id, "succeeded").await;
    assert!(done.hosts.iter().all(|h| h.state == "healthy"), "{done:#?}");
    for (host, state, rev) in f.components().await {
        assert_eq!((state.as_str(), rev.as_str()), ("ready", "v3"), "{host}");
    }
    for host in &f.hosts {
        let starts = f.starts(host);
        // (A v9 canary that got out is reverted to v2: that start is v2 again.)
        let mut kept: Vec<&str> = starts
            .iter()
            .map(String::as_str)
            .filter(|s| *s != "v9")
            .collect();
        kept.dedup();
        assert_eq!(kept, ["v1", "v2", "v3"], "{host}");
    }
    deployments.drive_once().await.expect("a pass");
    let m = deployments.metrics();
    assert_eq!(m.by_state.with_label_values(&["succeeded"]).get(), 2);
    assert_eq!(m.by_state.with_label_values(&["reverted"]).get(), 1);
    assert_eq!(
        m.host_steps.with_label_values(&["deploy", "healthy"]).get(),
        6
    );
    shutdown(service, daemons).await;
}
