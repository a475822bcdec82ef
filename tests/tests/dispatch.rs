//! Commands end to end (`razar_collector::dispatch`): the whole collector ([`Service`])
//! against a private PostgreSQL, the real agent daemon supervising a real child process
//! over QUIC with mTLS.
//!
//! - a command for a host that is away is persisted `queued`, delivered when the host
//!   reconnects, and its result stored;
//! - a command whose deadline passes while the host is away expires (the periodic
//!   sweep) and never runs;
//! - a command delivered twice (its result lost, delivered again on reconnect) runs once
//!   and the stored outcome is the first one; a late second answer is ignored;
//! - a command for an unknown component or host is refused with the reason, nothing
//!   stored;
//! - the same idempotency key from the same caller returns the same command;
//! - a GPU drain (named by UUID) stops the components mapped to that GPU and only them;
//!   an unknown GPU is refused; a version 3 command for a host whose last session
//!   negotiated an older protocol is refused at submit;
//! - a scheduled failure pulse is sent through dispatch and the agent carries it out.
//!
//! The component appends a line to a file each time it starts: the file counts its
//! starts, so "ran once" is counted, not guessed.

use chrono::{DateTime, Utc};
use razar_agent::config::Config;
use razar_agent::daemon::{Daemon, DaemonOptions};
use razar_certs::Issued;
use razar_collector::config::{CollectorConfig, Database, TlsPaths};
use razar_collector::dispatch::{CommandRecord, CommandRequest, CommandState, DispatchError};
use razar_collector::service::Service;
use razar_shared::protocol::{CommandAction, CommandId};
use razar_tests::ca::{TestCa, COLLECTOR_NAMES};
use razar_tests::live::{wait_for, PATIENCE};
use razar_tests::pg::TestPg;
use sqlx::PgPool;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const HOST: &str = "dispatch-host";

fn free_udp_port() -> u16 {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a probe socket");
    socket.local_addr().expect("probe address").port()
}

struct Fixture {
    ca: TestCa,
    agent: Issued,
    pg: TestPg,
    pool: PgPool,
    quic_port: u16,
    dir: tempfile::TempDir,
}

impl Fixture {
    async fn new() -> Fixture {
        let mut ca = TestCa::new().expect("test CA");
        let agent = ca.agent(HOST).expect("agent certificate");
        let pg = TestPg::start().await.expect("PostgreSQL");
        pg.store().await.expect("migrated store").close().await;
        let pool = pg.pool().await.expect("pool");
        Fixture {
            ca,
            agent,
            pg,
            pool,
            quic_port: free_udp_port(),
            dir: tempfile::tempdir().expect("test dir"),
        }
    }

    /// The collector: this database, heartbeats every 250 ms (lost after 1 s).
    async fn collector(&self) -> Service {
        self.collector_with(|_| {}).await
    }

    /// [`Fixture::collector`] with `change` applied to its config.
    async fn collector_with(&self, change: impl FnOnce(&mut CollectorConfig)) -> Service {
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
        c.pool_size = NonZeroU32::new(6).expect("nonzero");
        c.ingest_writers = NonZeroU32::new(2).expect("nonzero");
        c.heartbeat_interval = Duration::from_millis(250);
        c.lost_after_missed = NonZeroU32::new(4).expect("nonzero");
        c.health.database_slow = Duration::from_secs(30);
        change(&mut c);
        Service::start(c).await.expect("collector starts")
    }

    /// The file the component appends a line to at each start.
    fn starts_file(&self) -> PathBuf {
        self.dir.path().join("web.starts")
    }

    /// How many times the component started.
    fn starts(&self) -> usize {
        std::fs::read_to_string(self.starts_file())
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    /// The agent's config (same data directory every time): one component `web`.
    fn agent_config(&self) -> Config {
        let files = self.ca.client_files(&self.agent);
        let d = self.dir.path();
        let text = format!(
            "[agent]\nprofile = \"core\"\ndata_dir = \"{d}/data\"\nlog_dir = \"{d}/logs\"\nlisten = \"127.0.0.1:0\"\n\n\
             [collector]\naddress = \"127.0.0.1:{port}\"\nserver_name = \"{name}\"\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\n\
             [[component]]\nname = \"web\"\ncommand = \"sh\"\nargs = [\"-c\", \"echo started >> {starts}; exec sleep 1000.71\"]\n",
            d = d.display(),
            port = self.quic_port,
            name = COLLECTOR_NAMES[0],
            ca = files.ca.display(),
            cert = files.cert.display(),
            key = files.key.display(),
            starts = self.starts_file().display(),
        );
        let path = d.join("agent.toml");
        std::fs::write(&path, &text).expect("agent config");
        Config::load(&path).unwrap_or_else(|e| panic!("agent config: {e}"))
    }

    /// The agent daemon on the test's runtime. After a crashed one, its store may stay
    /// open a moment (its last references going away): retried.
    async fn agent(&self) -> Daemon {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match Daemon::start(self.agent_config(), daemon_options()).await {
                Ok(daemon) => return daemon,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("agent start: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("agent start: {e}"),
            }
        }
    }

    /// The agent daemon on a runtime of its own, welcomed, its component started: it can
    /// vanish at once ([`Fixture::crash_agent`]).
    async fn crashable_agent(&self, service: &Service) -> CrashableAgent {
        let config = self.agent_config();
        let agent = tokio::task::spawn_blocking(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("agent runtime");
            let daemon = runtime
                .block_on(Daemon::start(config, daemon_options()))
                .expect("agent daemon starts");
            CrashableAgent { runtime, daemon }
        })
        .await
        .expect("agent start task");
        self.welcomed(service, 1).await;
        agent
    }

    /// The agent vanishes as with SIGKILL or a cut network: no goodbye and no last
    /// inventory (a clean shutdown's last inventory lists no components); the
    /// collector notices when its heartbeats stop.
    async fn crash_agent(&self, service: &Service, agent: CrashableAgent) {
        tokio::task::spawn_blocking(move || {
            let CrashableAgent { runtime, daemon } = agent;
            runtime.shutdown_background();
            drop(daemon);
        })
        .await
        .expect("agent kill task");
        wait_for("the agent's connection to end", || async {
            (service.collector().agents_connected() == 0).then_some(())
        })
        .await;
    }

    /// Starts the agent and waits until the collector welcomed it and its component
    /// started `starts` times in all.
    async fn connected_agent(&self, service: &Service, starts: usize) -> Daemon {
        let daemon = self.agent().await;
        self.welcomed(service, starts).await;
        daemon
    }

    /// Waits until the collector welcomed the agent and its component started `starts`
    /// times in all.
    async fn welcomed(&self, service: &Service, starts: usize) {
        wait_for("the agent to be welcomed", || async {
            service
                .collector()
                .connected_hosts()
                .contains(&HOST.to_owned())
                .then_some(())
        })
        .await;
        wait_for("the component to start", || async {
            (self.starts() >= starts).then_some(())
        })
        .await;
    }

    /// Stops the agent and waits until the collector has no connection of it.
    async fn stop_agent(&self, service: &Service, daemon: Daemon) {
        daemon.shutdown().await;
        wait_for("the agent's connection to end", || async {
            (service.collector().agents_connected() == 0).then_some(())
        })
        .await;
    }

    async fn commands_stored(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM commands")
            .fetch_one(&self.pool)
            .await
            .expect("count commands")
    }
}

/// An agent daemon with its own runtime.
struct CrashableAgent {
    runtime: tokio::runtime::Runtime,
    daemon: Daemon,
}

fn daemon_options() -> DaemonOptions {
    DaemonOptions {
        listen: Some(([127, 0, 0, 1], 0).into()),
        ..DaemonOptions::default()
    }
}

fn restart(component: &str) -> CommandAction {
    CommandAction::Restart {
        component: component.into(),
    }
}

fn request(action: CommandAction, deadline: DateTime<Utc>, key: Option<&str>) -> CommandRequest {
    CommandRequest {
        host: HOST.into(),
        action,
        deadline,
        caller: "operator-ann".into(),
        idempotency_key: key.map(str::to_owned),
        request_id: Some("req-1".into()),
    }
}

fn in_a_minute() -> DateTime<Utc> {
    Utc::now() + chrono::Duration::seconds(60)
}

/// Waits until command `id` is settled; returns it.
async fn settled(service: &Service, id: &CommandId) -> CommandRecord {
    wait_for("the command's result to be stored", || async {
        let record = service
            .collector()
            .dispatch()
            .command(id)
            .await
            .expect("read the command")
            .expect("the command is stored");
        record.state.is_final().then_some(record)
    })
    .await
}

fn counted(service: &Service, kind: &str, result: &str) -> u64 {
    service
        .collector()
        .dispatch()
        .metrics()
        .commands
        .with_label_values(&[kind, result])
        .get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_for_a_host_away_is_delivered_when_it_reconnects_and_its_result_stored() {
    let f = Fixture::new().await;
    let service = f.collector().await;
    let agent = f.crashable_agent(&service).await;
    f.crash_agent(&service, agent).await;

    let submitted = service
        .collector()
        .dispatch()
        .submit(request(restart("web"), in_a_minute(), None))
        .await
        .expect("the command is accepted");
    assert_eq!(submitted.state, CommandState::Queued, "{submitted:?}");
    assert_eq!(submitted.attempts, 0);
    assert_eq!(submitted.kind, "restart");
    assert_eq!(submitted.component.as_deref(), Some("web"));
    assert_eq!(submitted.request_id.as_deref(), Some("req-1"));
    assert_eq!(
        f.commands_stored().await,
        1,
        "persisted before any delivery"
    );

    // Back (its component adopted, or started again), then the restart.
    let daemon = f.connected_agent(&service, 1).await;
    let done = settled(&service, &submitted.id).await;
    assert_eq!(done.state, CommandState::Succeeded, "{done:?}");
    // Delivered by the Welcome (a slow reconnect may meet the sweep too: once more).
    assert!(done.attempts >= 1, "{done:?}");
    let dispatch = service.collector().dispatch();
    let deliveries = &dispatch.metrics().deliveries;
    assert!(deliveries.with_label_values(&["reconnect"]).get() >= 1);
    assert_eq!(deliveries.with_label_values(&["submit"]).get(), 0);
    assert!(!done.duplicate, "{done:?}");
    assert!(
        done.sent_at.is_some() && done.finished_at.is_some(),
        "{done:?}"
    );
    assert!(done.message.is_some(), "{done:?}");
    wait_for("the restarted component", || async {
        (f.starts() >= 2).then_some(())
    })
    .await;
    assert_eq!(counted(&service, "restart", "succeeded"), 1);
    daemon.shutdown().await;
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_whose_deadline_passes_while_the_host_is_away_expires_and_never_runs() {
    let f = Fixture::new().await;
    let service = f.collector().await;
    let agent = f.crashable_agent(&service).await;
    f.crash_agent(&service, agent).await;

    let deadline = Utc::now() + chrono::Duration::milliseconds(3_000);
    let submitted = service
        .collector()
        .dispatch()
        .submit(request(restart("web"), deadline, None))
        .await
        .expect("the command is accepted");
    assert_eq!(submitted.state, CommandState::Queued, "{submitted:?}");
    // The periodic sweep (every 5 s by default) expires it; nobody asks.
    let expired = settled(&service, &submitted.id).await;
    assert_eq!(expired.state, CommandState::Expired, "{expired:?}");
    assert_eq!(expired.attempts, 0, "never delivered: {expired:?}");
    assert_eq!(
        expired.message.as_deref(),
        Some("deadline passed before delivery")
    );
    assert!(expired.finished_at.is_some_and(|t| t >= deadline));
    assert_eq!(counted(&service, "restart", "expired"), 1);

    // Back: nothing is delivered. A command submitted after the reconnect goes behind
    // anything delivered on it, so once its result is stored the expired one would have
    // been delivered and run already.
    let daemon = f.connected_agent(&service, 1).await;
    let marker = service
        .collector()
        .dispatch()
        .submit(request(
            CommandAction::Quarantine {
                component: "web".into(),
                note: "marker".into(),
            },
            in_a_minute(),
            None,
        ))
        .await
        .expect("the marker command is accepted");
    assert_eq!(
        settled(&service, &marker.id).await.state,
        CommandState::Succeeded
    );
    let dispatch = service.collector().dispatch();
    let deliveries = &dispatch.metrics().deliveries;
    assert_eq!(
        deliveries.with_label_values(&["reconnect"]).get()
            + deliveries.with_label_values(&["sweep"]).get(),
        0,
        "the expired restart was never delivered"
    );
    assert_eq!(deliveries.with_label_values(&["submit"]).get(), 1);
    let still = service
        .collector()
        .dispatch()
        .command(&submitted.id)
        .await
        .expect("read")
        .expect("stored");
    assert_eq!(still, expired, "an expired command stays as it was");
    daemon.shutdown().await;
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_delivered_twice_runs_once_and_the_first_outcome_is_stored() {
    let f = Fixture::new().await;
    let service = f.collector().await;
    let daemon = f.connected_agent(&service, 1).await;
    let dispatch = service.collector().dispatch();

    let submitted = dispatch
        .submit(request(restart("web"), in_a_minute(), None))
        .await
        .expect("the command is accepted");
    // Handed to the live connection (its result may already be stored).
    assert!(
        submitted.state != CommandState::Queued && submitted.attempts == 1,
        "{submitted:?}"
    );
    let first = settled(&service, &submitted.id).await;
    assert_eq!(first.state, CommandState::Succeeded, "{first:?}");
    wait_for("the restart", || async { (f.starts() >= 2).then_some(()) }).await;

    // A second delivery on the live connection: the agent answers `Duplicate`, and that
    // late answer changes nothing.
    assert!(service.collector().send_command(HOST, submitted.command()));
    wait_for("the late answer to be ignored", || async {
        let ignored = dispatch
            .metrics()
            .results_ignored
            .with_label_values(&["settled"])
            .get();
        (ignored == 1).then_some(())
    })
    .await;
    let after = dispatch
        .command(&submitted.id)
        .await
        .expect("read")
        .expect("stored");
    assert_eq!(after, first);

    // The result is lost (as when the collector dies before storing it): the command
    // is `sent` again, so the next connection delivers it again.
    sqlx::query(
        "UPDATE commands SET state = 'sent', finished_at = NULL, message = NULL
         WHERE command_id = $1",
    )
    .bind(&submitted.id[..])
    .execute(&f.pool)
    .await
    .expect("forget the result");
    f.stop_agent(&service, daemon).await;
    let daemon = f.connected_agent(&service, 3).await;
    let again = settled(&service, &submitted.id).await;
    assert_eq!(again.state, CommandState::Succeeded, "{again:?}");
    assert!(
        again.duplicate,
        "stored from the redelivery's answer: {again:?}"
    );
    assert_eq!(again.attempts, 2, "{again:?}");
    assert_eq!(again.message, first.message, "the original message");
    assert_eq!(
        again.finished_at, first.finished_at,
        "the original finish time"
    );
    assert_eq!(
        dispatch.metrics().results_duplicate.get(),
        1,
        "one redelivery answered"
    );
    // Two starts before, the daemon's own third; a fourth would be a second run.
    assert_eq!(f.starts(), 3, "the command ran once");
    daemon.shutdown().await;
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_for_an_unknown_component_or_host_is_refused_with_the_reason() {
    let f = Fixture::new().await;
    let service = f.collector().await;
    let daemon = f.connected_agent(&service, 1).await;
    let dispatch = service.collector().dispatch();

    let err = dispatch
        .submit(request(restart("nope"), in_a_minute(), None))
        .await
        .expect_err("an unknown component is refused");
    assert!(
        matches!(&err, DispatchError::UnknownComponent { component, .. } if component == "nope"),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!("host \"{HOST}\" has no component \"nope\"")
    );
    let mut elsewhere = request(restart("web"), in_a_minute(), None);
    elsewhere.host = "no-such-host".into();
    let err = dispatch
        .submit(elsewhere)
        .await
        .expect_err("an unknown host is refused");
    assert!(matches!(err, DispatchError::UnknownHost { .. }), "{err:?}");
    let err = dispatch
        .submit(request(
            CommandAction::CancelTail { command: [9; 16] },
            in_a_minute(),
            None,
        ))
        .await
        .expect_err("a cancel of a command the host never had is refused");
    assert!(
        matches!(err, DispatchError::UnknownCommand { .. }),
        "{err:?}"
    );
    let err = dispatch
        .submit(request(
            restart("web"),
            Utc::now() - chrono::Duration::seconds(1),
            None,
        ))
        .await
        .expect_err("a deadline already past is refused");
    assert!(
        matches!(err, DispatchError::DeadlinePassed { .. }),
        "{err:?}"
    );

    assert_eq!(f.commands_stored().await, 0, "nothing refused is stored");
    assert_eq!(counted(&service, "restart", "refused"), 3);
    assert_eq!(counted(&service, "cancel_tail", "refused"), 1);
    assert_eq!(f.starts(), 1, "nothing ran");
    daemon.shutdown().await;
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_idempotency_key_returns_the_same_command() {
    let f = Fixture::new().await;
    let service = f.collector().await;
    let daemon = f.connected_agent(&service, 1).await;
    let dispatch = service.collector().dispatch();

    let first = dispatch
        .submit(request(
            restart("web"),
            in_a_minute(),
            Some("restart-web-1"),
        ))
        .await
        .expect("the command is accepted");
    // Handed to the live connection (its result may already be stored).
    assert!(
        first.state != CommandState::Queued && first.attempts == 1,
        "{first:?}"
    );
    let again = dispatch
        .submit(request(
            restart("web"),
            in_a_minute(),
            Some("restart-web-1"),
        ))
        .await
        .expect("the same key answers");
    assert_eq!(again.id, first.id);
    assert_eq!(f.commands_stored().await, 1);

    // The same key for another command is a conflict, not a silent answer.
    let err = dispatch
        .submit(request(
            restart("other"),
            in_a_minute(),
            Some("restart-web-1"),
        ))
        .await
        .expect_err("a reused key for another command");
    assert!(
        matches!(err, DispatchError::IdempotencyConflict { .. }),
        "{err:?}"
    );
    // Another caller has keys of its own.
    let mut other_caller = request(restart("web"), in_a_minute(), Some("restart-web-1"));
    other_caller.caller = "engine".into();
    let other = dispatch
        .submit(other_caller)
        .await
        .expect("another caller's key");
    assert_ne!(other.id, first.id);

    let done = settled(&service, &first.id).await;
    assert_eq!(done.state, CommandState::Succeeded, "{done:?}");
    assert_eq!(done.attempts, 1, "sent once: {done:?}");
    let after = dispatch
        .submit(request(
            restart("web"),
            in_a_minute(),
            Some("restart-web-1"),
        ))
        .await
        .expect("the same key answers after the result too");
    assert_eq!(after, done);
    assert_eq!(
        settled(&service, &other.id).await.state,
        CommandState::Succeeded
    );
    assert_eq!(f.commands_stored().await, 2);
    assert_eq!(
        dispatch
            .metrics()
            .submitted
            .with_label_values(&["restart"])
            .get(),
        2
    );
    daemon.shutdown().await;
    service.shutdown().await;
}

/// The agent's config with two fake GPUs and a component on each, plus `web` on none.
fn gpu_agent_config(f: &Fixture) -> Config {
    let files = f.ca.client_files(&f.agent);
    let d = f.dir.path();
    let scenario = d.join("scenario.toml");
    std::fs::write(&scenario, "[[gpu]]\n[[gpu]]\n").expect("scenario");
    let text = format!(
        "[agent]\nprofile = \"core\"\ndata_dir = \"{d}/data\"\nlog_dir = \"{d}/logs\"\nlisten = \"127.0.0.1:0\"\n\n\
         [collector]\naddress = \"127.0.0.1:{port}\"\nserver_name = \"{name}\"\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\n\
         [gpu]\nsource = \"scenario\"\nscenario = \"{scenario}\"\n\n\
         [[component]]\nname = \"train0\"\ncommand = \"sleep\"\nargs = [\"1000.81\"]\ngpus = [0]\nstop_grace = \"2s\"\n\n\
         [[component]]\nname = \"train1\"\ncommand = \"sleep\"\nargs = [\"1000.82\"]\ngpus = [1]\nstop_grace = \"2s\"\n\n\
         [[component]]\nname = \"web\"\ncommand = \"sleep\"\nargs = [\"1000.83\"]\nstop_grace = \"2s\"\n",
        d = d.display(),
        port = f.quic_port,
        name = COLLECTOR_NAMES[0],
        ca = files.ca.display(),
        cert = files.cert.display(),
        key = files.key.display(),
        scenario = scenario.display(),
    );
    let path = d.join("agent.toml");
    std::fs::write(&path, &text).expect("agent config");
    Config::load(&path).unwrap_or_else(|e| panic!("agent config: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_drain_stops_the_components_of_that_gpu_only_and_old_agents_get_no_v3_command() {
    use razar_shared::domain::ComponentState;
    let f = Fixture::new().await;
    let service = f.collector().await;
    let daemon = Daemon::start(gpu_agent_config(&f), daemon_options())
        .await
        .expect("agent starts");
    let agent = daemon.agent().clone();
    let ready = |name: &'static str| {
        let agent = agent.clone();
        async move {
            agent
                .statuses()
                .get(name)
                .filter(|s| s.state == ComponentState::Ready)
                .and_then(|s| s.pid)
        }
    };
    let mut pids = Vec::new();
    for name in ["train0", "train1", "web"] {
        pids.push(wait_for(name, || ready(name)).await);
    }
    // The host's GPUs are known from its inventory.
    let uuid: String = wait_for("the host's GPUs stored", || async {
        sqlx::query_scalar("SELECT uuid FROM gpus WHERE host_id = $1 AND gpu_index = 0")
            .bind(HOST)
            .fetch_optional(&f.pool)
            .await
            .expect("read gpus")
    })
    .await;
    let dispatch = service.collector().dispatch();

    for gpu in ["7", "GPU-not-here", ""] {
        let refused = dispatch
            .submit(request(
                CommandAction::DrainGpu {
                    gpu: gpu.into(),
                    note: "x".into(),
                },
                in_a_minute(),
                None,
            ))
            .await;
        assert!(
            matches!(refused, Err(DispatchError::UnknownGpu { .. })),
            "{refused:?}"
        );
    }
    assert_eq!(f.commands_stored().await, 0, "nothing stored for a refusal");

    let drain = dispatch
        .submit(request(
            CommandAction::DrainGpu {
                gpu: uuid.to_lowercase(),
                note: "xid 79".into(),
            },
            in_a_minute(),
            None,
        ))
        .await
        .expect("drain accepted");
    let done = settled(&service, &drain.id).await;
    assert_eq!(done.state, CommandState::Succeeded, "{done:?}");
    let gpu: Option<i32> = sqlx::query_scalar("SELECT gpu FROM commands WHERE command_id = $1")
        .bind(&drain.id[..])
        .fetch_one(&f.pool)
        .await
        .expect("read the command");
    assert_eq!(gpu, Some(0), "stored with the resolved index");
    let statuses = agent.statuses();
    assert_eq!(
        statuses.get("train0").map(|s| s.state),
        Some(ComponentState::Stopped)
    );
    for (name, pid) in [("train1", pids[1]), ("web", pids[2])] {
        let s = statuses.get(name).expect("status");
        assert_eq!(
            (s.state, s.pid),
            (ComponentState::Ready, Some(pid)),
            "{name} keeps running"
        );
    }

    // The host's last session negotiated version 2 (an older agent): a version 3
    // command is refused at submit with the reason; older commands still go.
    sqlx::query("UPDATE agent_sessions SET protocol_version = 2 WHERE host_id = $1")
        .bind(HOST)
        .execute(&f.pool)
        .await
        .expect("simulate an older agent's session");
    let refused = dispatch
        .submit(request(
            CommandAction::ResetGpu { gpu: "0".into() },
            in_a_minute(),
            None,
        ))
        .await;
    assert!(
        matches!(
            refused,
            Err(DispatchError::AgentTooOld {
                version: 2,
                needed: 3,
                ..
            })
        ),
        "{refused:?}"
    );
    assert!(dispatch
        .submit(request(restart("web"), in_a_minute(), None))
        .await
        .is_ok());
    f.stop_agent(&service, daemon).await;
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_pulse_is_sent_through_dispatch_and_carried_out() {
    let f = Fixture::new().await;
    let service = f
        .collector_with(|c| {
            let raw = "enabled = true\n[[pulses.schedule]]\ncomponent = \"web\"\ncron = \"* * * * * *\"\nbudget = \"30s\"\nhosts = [\"dispatch-*\"]\n";
            let text = format!("[pulses]\n{raw}");
            let dir = f.dir.path().join("collector");
            std::fs::create_dir_all(&dir).expect("dir");
            let path = dir.join("pulses.toml");
            std::fs::write(&path, &text).expect("config");
            let parsed = CollectorConfig::parse(&path, &text).unwrap_or_else(|e| panic!("{e}"));
            c.pulses = parsed.pulses;
        })
        .await;
    let daemon = f.connected_agent(&service, 1).await;
    // Every second, for the host running `web`: one command per occurrence.
    let (id, state): (Vec<u8>, String) = wait_for("a settled scheduled pulse", || async {
        sqlx::query_as(
            "SELECT command_id, state FROM commands
             WHERE kind = 'pulse' AND caller = 'pulse-scheduler' AND host_id = $1
               AND state IN ('succeeded', 'failed')
             ORDER BY created_at LIMIT 1",
        )
        .bind(HOST)
        .fetch_optional(&f.pool)
        .await
        .expect("read commands")
    })
    .await;
    assert_eq!(state, "succeeded", "command {id:?}");
    f.stop_agent(&service, daemon).await;
    service.shutdown().await;
}
