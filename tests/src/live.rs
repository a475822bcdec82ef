//! A live fleet of one for operator-facing tests: a private PostgreSQL, the collector
//! ([`Service`], in process, HTTP API on an ephemeral port) and the `razar-agent`
//! binary as a child process (so its descriptors can be counted under `/proc`), over
//! QUIC with mTLS, with two fake GPUs and the components the test configures.
//!
//! The binaries are found next to the test executable (`target/<profile>/`): build them
//! first with `cargo build -p razar-agent --bins` (and `-p razar-cli` for the CLI).

use crate::ca::{TestCa, COLLECTOR_NAMES};
use crate::pg::TestPg;
use razar_collector::config::{CollectorConfig, Database, TlsPaths};
use razar_collector::service::Service;
use razar_collector::store::tokens::{self, Role};
use sqlx::PgPool;
use std::future::Future;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a condition is waited for (a loaded 2-core machine).
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Two fake GPUs (as `razar-collector dev` has them).
pub const GPU_SCENARIO: &str = r#"clock = "wall"
driver_version = "550.54.15"

[[gpu]]
name = "NVIDIA H100 80GB HBM3"
fans = 0
values = { utilization_gpu = [[0, 5], [60, 85], [120, 92]], temperature_gpu = [[0, 34], [120, 71]], power_usage = [[0, 80000], [120, 610000]], memory_used = [[0, 1073741824], [60, 64424509440]] }

[[gpu]]
name = "NVIDIA H100 80GB HBM3"
fans = 0
values = { utilization_gpu = [[0, 0], [90, 40]], temperature_gpu = [[0, 33], [600, 52]], power_usage = [[0, 75000], [600, 300000]], memory_used = [[0, 536870912], [90, 21474836480]] }
"#;

/// Waits until `check` gives a value, polling every 100 ms; panics after [`PATIENCE`].
pub async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
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

/// A binary of this workspace, next to the test executable.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test executable");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not found: build it first (`cargo build -p razar-agent --bins -p razar-cli`)",
        path.display()
    );
    path
}

/// A TOML basic string.
pub fn toml_str(s: impl AsRef<str>) -> String {
    serde_json::Value::String(s.as_ref().to_owned()).to_string()
}

fn free_udp_port() -> u16 {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a probe socket");
    socket.local_addr().expect("probe address").port()
}

/// The fleet of one.
pub struct LiveFleet {
    pub host: String,
    pub ca: TestCa,
    pub pg: TestPg,
    pub pool: PgPool,
    pub service: Option<Service>,
    /// `http://127.0.0.1:PORT` of the collector's API.
    pub base: String,
    /// An operator token.
    pub token: String,
    pub dir: tempfile::TempDir,
    agent_head: String,
    agent: Option<Child>,
}

impl LiveFleet {
    /// Starts PostgreSQL, the collector and the agent with `components` (TOML
    /// `[[component]]` tables), and waits until the host's components are in the database.
    pub async fn start(host: &str, components: &str) -> LiveFleet {
        let mut ca = TestCa::new().expect("test CA");
        let agent_cert = ca.agent(host).expect("agent certificate");
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
        let (_, token) = tokens::create(&pool, "live-ops", Role::Operator, None, None)
            .await
            .expect("token");

        let files = ca.client_files(&agent_cert);
        let d = dir.path();
        std::fs::write(d.join("gpu-scenario.toml"), GPU_SCENARIO).expect("scenario");
        let agent_head = format!(
            "[agent]\ndata_dir = {data}\nlog_dir = {logs}\nlisten = \"127.0.0.1:0\"\nsample_interval = \"500ms\"\n\n\
             [collector]\naddress = \"127.0.0.1:{quic_port}\"\nserver_name = {name}\nca = {ca}\ncert = {cert}\nkey = {key}\n\n\
             [gpu]\nsource = \"scenario\"\nscenario = {scenario}\n\n",
            data = toml_str(d.join("agent-data").to_string_lossy()),
            logs = toml_str(d.join("agent-logs").to_string_lossy()),
            name = toml_str(COLLECTOR_NAMES[0]),
            ca = toml_str(files.ca.to_string_lossy()),
            cert = toml_str(files.cert.to_string_lossy()),
            key = toml_str(files.key.to_string_lossy()),
            scenario = toml_str(d.join("gpu-scenario.toml").to_string_lossy()),
        );
        let mut fleet = LiveFleet {
            host: host.to_owned(),
            ca,
            pg,
            pool,
            service: Some(service),
            base,
            token,
            dir,
            agent_head,
            agent: None,
        };
        fleet.write_components(components);
        let log = std::fs::File::create(fleet.path("agent.log")).expect("agent log");
        let err = log.try_clone().expect("agent log");
        let child = Command::new(binary("razar-agent"))
            .arg("run")
            .arg("--config")
            .arg(fleet.path("agent.toml"))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .expect("start razar-agent");
        fleet.agent = Some(child);
        let pool = fleet.pool.clone();
        let host = fleet.host.clone();
        wait_for("the agent's components in the database", || {
            let (pool, host) = (pool.clone(), host.clone());
            async move {
                let n: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM components WHERE host_id = $1")
                        .bind(&host)
                        .fetch_one(&pool)
                        .await
                        .ok()?;
                (n > 0).then_some(())
            }
        })
        .await;
        fleet
    }

    /// A path in the test's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The agent's directory of component logs.
    pub fn agent_logs(&self) -> PathBuf {
        self.path("agent-logs")
    }

    /// Rewrites the agent's config with `components` (a reload applies it).
    pub fn write_components(&self, components: &str) {
        std::fs::write(
            self.path("agent.toml"),
            format!("{}{components}", self.agent_head),
        )
        .expect("agent.toml");
    }

    /// Runs `razar-agent ARGS --config agent.toml` (the agent's own CLI) and checks it succeeded.
    pub fn agent_cli(&self, args: &[&str]) -> Output {
        let out = Command::new(binary("razar-agent"))
            .args(args)
            .arg("--config")
            .arg(self.path("agent.toml"))
            .output()
            .expect("razar-agent cli");
        assert!(
            out.status.success(),
            "razar-agent {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// The agent's process id.
    pub fn agent_pid(&self) -> u32 {
        self.agent.as_ref().map(Child::id).expect("agent running")
    }

    /// Targets of the agent's open file descriptors.
    pub fn agent_fds(&self) -> Vec<PathBuf> {
        let dir = format!("/proc/{}/fd", self.agent_pid());
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| std::fs::read_link(e.path()).ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The agent's own log so far (for failure messages).
    pub fn agent_log(&self) -> String {
        let text = std::fs::read_to_string(self.path("agent.log")).unwrap_or_default();
        let start = text.len().saturating_sub(4000);
        text.get(start..).unwrap_or(&text).to_owned()
    }

    /// The value of one sample line of the collector's `/metrics` (`name` with or without labels).
    pub async fn metric(&self, http: &reqwest::Client, name: &str) -> Option<f64> {
        let text = http
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

    /// Stops the agent (TERM, then KILL after 30 s) and the collector.
    pub async fn shutdown(mut self) {
        self.stop_agent();
        if let Some(service) = self.service.take() {
            service.shutdown().await;
        }
    }

    fn stop_agent(&mut self) {
        if let Some(mut child) = self.agent.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for LiveFleet {
    fn drop(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
