//! `razar-dev` (also `razar-collector dev`): Razar on one machine. A dev CA and certificates, the embedded
//! PostgreSQL, the collector, and an agent in the same process supervising demo
//! components with two fake GPUs. State lives in the data dir and is reused next time.
//! Whatever signal stops it (SIGINT, SIGTERM, SIGHUP), it stops the components, the
//! agent, the collector and PostgreSQL before it exits. The fake GPUs raise a hardware
//! XID (79, fallen off the bus) on GPU 1 after 45 s, and `crashloop` fails every few
//! seconds until it is quarantined, so the first two minutes show both paths.

use anyhow::Context;
use razar_agent::config::Config as AgentConfig;
use razar_agent::daemon::{Daemon, DaemonOptions};
use razar_certs::{Ca, InitOptions, IssueOptions};
use razar_collector::config::{CollectorConfig, TlsPaths};
use razar_collector::service::Service;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `println!` that a closed standard output (`razar-dev | head`) does not
/// stop: dev mode keeps running, its banner just goes nowhere.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// Host id of the dev agent (its certificate's identity).
pub const DEV_HOST: &str = "dev-host";

/// Options of `razar-dev` (and `razar-collector dev`).
#[derive(Debug, Clone, clap::Args)]
pub struct DevArgs {
    /// Where state lives (CA, PostgreSQL cluster, agent spool and logs).
    #[arg(long, default_value = "razar-data")]
    pub data_dir: PathBuf,
    /// HTTP API port on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 7080)]
    pub http_port: u16,
    /// QUIC port on 127.0.0.1 for agents (0: any free port).
    #[arg(long, default_value_t = 7443)]
    pub quic_port: u16,
    /// The agent's local /health and /metrics port (0: any free port).
    #[arg(long, default_value_t = 9464)]
    pub agent_port: u16,
    /// Port of the demo model server (0: any free port).
    #[arg(long, default_value_t = 7090)]
    pub demo_port: u16,
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create {}", args.data_dir.display()))?;
    let data_dir = args
        .data_dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", args.data_dir.display()))?;
    let ca_dir = data_dir.join("ca");
    let agent_cert = prepare_ca(&ca_dir)?;

    let mut config = CollectorConfig::defaults(&data_dir);
    config.http_listen = SocketAddr::from(([127, 0, 0, 1], args.http_port));
    config.quic_listen = SocketAddr::from(([127, 0, 0, 1], args.quic_port));
    config.tls = TlsPaths::in_dir(&ca_dir);
    say!(
        "razar dev: starting PostgreSQL and the collector under {}",
        data_dir.display()
    );
    let service = Service::start(config).await?;

    let demo_port = free_port(args.demo_port)?;
    let agent_port = free_port(args.agent_port)?;
    let agent_toml = data_dir.join("agent.toml");
    let scenario = data_dir.join("gpu-scenario.toml");
    std::fs::write(&scenario, GPU_SCENARIO)
        .with_context(|| format!("cannot write {}", scenario.display()))?;
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    std::fs::write(
        &agent_toml,
        agent_config(
            &data_dir,
            &exe,
            &agent_cert,
            &ca_dir,
            &scenario,
            service.quic_addr(),
            agent_port,
            demo_port,
        ),
    )
    .with_context(|| format!("cannot write {}", agent_toml.display()))?;
    let agent_config = match AgentConfig::load(&agent_toml) {
        Ok(c) => c,
        Err(errors) => {
            service.shutdown().await;
            anyhow::bail!("generated agent config is invalid:\n{errors}");
        }
    };
    let daemon = match Daemon::start(agent_config, DaemonOptions::default()).await {
        Ok(d) => d,
        Err(e) => {
            service.shutdown().await;
            return Err(e.into());
        }
    };

    let token = match operator_token(service.store().pool(), &data_dir).await {
        Ok(t) => t,
        Err(e) => {
            daemon.shutdown().await;
            service.shutdown().await;
            return Err(e);
        }
    };

    let http = service.http_addr();
    say!();
    say!("Razar is running on this machine.");
    say!("  dashboard:  http://{http}/#token={token}");
    say!(
        "  token:      {token}  (role operator, kept in {})",
        data_dir.join(TOKEN_FILE).display()
    );
    say!("  health:     http://{http}/api/v1/health");
    say!("  metrics:    http://{http}/metrics");
    say!(
        "  agent:      http://127.0.0.1:{agent_port}/health  (host {DEV_HOST}, config {})",
        agent_toml.display()
    );
    say!(
        "  agents:     QUIC {} (mTLS, CA in {})",
        service.quic_addr(),
        ca_dir.display()
    );
    if let Some(pg) = service.embedded_pg() {
        say!(
            "  database:   psql \"host={} port={} user=postgres dbname=razar\"",
            pg.socket_dir().display(),
            razar_collector::embedded_pg::SOCKET_PORT
        );
    }
    let cli_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.display().to_string()))
        .unwrap_or_else(|| ".".to_owned());
    say!("The razar CLI (built next to this program: put {cli_dir} on PATH):");
    say!("  export RAZAR_SERVER=http://{http} RAZAR_TOKEN={token}");
    for line in [
        "razar hosts",
        "razar gpus",
        "razar escalations",
        "razar events -f",
    ] {
        say!("  RAZAR_SERVER=http://{http} RAZAR_TOKEN={token} {line}");
    }
    say!("Press Ctrl-C to stop everything.");

    let signal = wait_for_stop().await;
    say!("razar dev: {signal}: stopping components, agent, collector and PostgreSQL");
    daemon.shutdown().await;
    service.shutdown().await;
    say!("razar dev: stopped");
    Ok(())
}

/// The file in the data dir that keeps dev mode's operator token (mode 0600).
pub const TOKEN_FILE: &str = "operator.token";
/// The name of dev mode's operator token.
const TOKEN_NAME: &str = "razar-dev operator";

/// Dev mode's operator token: the one kept in the data dir while the database still
/// accepts it, else a new one (its plaintext only in the 0600 file; the database keeps
/// its hash).
async fn operator_token(pool: &sqlx::PgPool, data_dir: &Path) -> anyhow::Result<String> {
    use razar_collector::store::tokens;
    let path = data_dir.join(TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let kept = text.trim();
            match tokens::verify(pool, kept).await? {
                Ok(info) if info.role == tokens::Role::Operator => return Ok(kept.to_owned()),
                Ok(info) => tracing::warn!(
                    role = info.role.as_str(),
                    "kept token has another role; creating one"
                ),
                Err(refusal) => tracing::warn!(?refusal, "kept token refused; creating one"),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    let (_, token) = tokens::create(pool, TOKEN_NAME, tokens::Role::Operator, None, None)
        .await
        .context("cannot create the operator token")?;
    write_private(&path, &token)?;
    Ok(token)
}

/// Writes `text` to a file only its owner may read (0600), replacing it atomically.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Waits for SIGINT, SIGTERM or SIGHUP (a closed terminal): each one stops dev mode
/// cleanly. Returns the signal's name.
async fn wait_for_stop() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let on = |kind: SignalKind| async move {
        match signal(kind) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = on(SignalKind::terminate()) => "SIGTERM",
        _ = on(SignalKind::hangup()) => "SIGHUP",
    }
}

/// Creates the dev CA and certificates when absent; returns the agent's cert and key.
fn prepare_ca(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let mut ca = if dir.join(razar_certs::CA_CERT_FILE).exists() {
        Ca::load(dir)?
    } else {
        Ca::init(
            dir,
            &InitOptions {
                common_name: "Razar dev CA".into(),
                ..InitOptions::default()
            },
        )?
    };
    let options = IssueOptions::days(365)?;
    if !dir.join("collector.pem").exists() {
        ca.issue_collector(&["localhost".to_string()], &options)?;
    }
    let agent = (
        dir.join("agents").join(format!("{DEV_HOST}.pem")),
        dir.join("agents").join(format!("{DEV_HOST}.key")),
    );
    let agent = if agent.0.exists() {
        agent
    } else {
        let issued = ca.issue_agent(DEV_HOST, &options)?;
        (issued.cert_path, issued.key_path)
    };
    // A fresh CRL at every start, so the collector's revocation check never sees an
    // outdated one.
    ca.write_crl(Duration::from_secs(7 * 86_400))?;
    Ok(agent)
}

/// `port`, or any free port when 0.
fn free_port(port: u16) -> anyhow::Result<u16> {
    if port != 0 {
        return Ok(port);
    }
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(listener.local_addr()?.port())
}

#[allow(clippy::too_many_arguments)]
fn agent_config(
    data_dir: &Path,
    exe: &Path,
    cert: &(PathBuf, PathBuf),
    ca_dir: &Path,
    scenario: &Path,
    quic: SocketAddr,
    agent_port: u16,
    demo_port: u16,
) -> String {
    let exe = toml_str(exe);
    format!(
        r#"# Generated by `razar-dev`; rewritten at every start.
[agent]
profile = "core"
data_dir = {agent_dir}
listen = "127.0.0.1:{agent_port}"
sample_interval = "1s"
log_dir = {log_dir}

[collector]
address = "{quic}"
server_name = "localhost"
ca = {ca}
cert = {cert}
key = {key}

[gpu]
source = "scenario"
scenario = {scenario}

# A stand-in model server: HTTP on the demo port.
[[component]]
name = "model-server"
command = {exe}
args = ["demo", "http", "--listen", "127.0.0.1:{demo_port}"]
priority = 0
critical = true
vram_budget = "60GiB"

[component.readiness]
kind = "http"
url = "http://127.0.0.1:{demo_port}/health"
interval = "250ms"
timeout = "1s"

[component.liveness]
kind = "http"
url = "http://127.0.0.1:{demo_port}/health"
interval = "2s"
timeout = "1s"
failure_threshold = 3

# A worker that needs the model server: starts once it is ready.
[[component]]
name = "worker"
command = {exe}
args = ["demo", "worker", "--upstream", "127.0.0.1:{demo_port}"]
depends_on = ["model-server"]
priority = 10

# Crashes every 20-40 s; restarted with backoff, quarantined after 10 failures in 30 min.
[[component]]
name = "flaky"
command = {exe}
args = ["demo", "flaky", "--min-seconds", "20"]
priority = 20

[component.restart]
policy = "always"
initial_backoff = "1s"
max_backoff = "30s"

[component.give_up]
max_failures = 10
window = "30m"

# Crash-loops from the start (fails 3 s after each start): quarantined within about a
# minute, an escalation for the collector to raise.
[[component]]
name = "crashloop"
command = {exe}
args = ["demo", "flaky", "--min-seconds", "3", "--max-seconds", "3"]
priority = 20
gpus = [1]

[component.restart]
policy = "always"
initial_backoff = "1s"
max_backoff = "5s"

[component.give_up]
max_failures = 5
window = "5m"
"#,
        agent_dir = toml_str(&data_dir.join("agent")),
        log_dir = toml_str(&data_dir.join("agent").join("logs")),
        ca = toml_str(&ca_dir.join(razar_certs::CA_CERT_FILE)),
        cert = toml_str(&cert.0),
        key = toml_str(&cert.1),
        scenario = toml_str(scenario),
    )
}

/// A path as a TOML basic string.
fn toml_str(path: &Path) -> String {
    let s = path.display().to_string();
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Two fake H100s whose load wanders over ten minutes, then holds; GPU 1 falls off the
/// bus (hardware XID 79) after 45 s.
const GPU_SCENARIO: &str = r#"# Generated by `razar-dev`: two fake GPUs for the demo.
clock = "wall"
driver_version = "550.54.15"

[[gpu]]
name = "NVIDIA H100 80GB HBM3"
fans = 0
values = { utilization_gpu = [[0, 5], [60, 85], [120, 92], [300, 40], [600, 75]], utilization_memory = [[0, 2], [60, 60], [600, 55]], temperature_gpu = [[0, 34], [120, 71], [600, 66]], power_usage = [[0, 80000], [120, 610000], [600, 450000]], memory_used = [[0, 1073741824], [60, 64424509440]] }

[[gpu]]
name = "NVIDIA H100 80GB HBM3"
fans = 0
values = { utilization_gpu = [[0, 0], [90, 40], [600, 55]], temperature_gpu = [[0, 33], [600, 52]], power_usage = [[0, 75000], [600, 300000]], memory_used = [[0, 536870912], [90, 21474836480]] }
xid = [{ at = 45, xid = 79 }]
"#;
