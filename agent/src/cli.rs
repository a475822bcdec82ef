//! The `razar-agent` command line: `run`, `check`, and the local control commands
//! (`status`, `start`, `stop`, `restart`, `resolve`, `pulse`, `reload`) that talk to a
//! running agent over its unix control socket (HTTP/1.1 through hyper).
//!
//! The socket is `--socket`, else the one the config file names (its `control_socket`,
//! else `data_dir/control.sock`), found even when the rest of the file no longer
//! validates: a typo in the file must not cut an operator off from the running agent.

use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default config path.
pub const DEFAULT_CONFIG: &str = "/etc/razar/agent.toml";
/// File under the data dir where a running agent writes its bound address.
pub const ADDR_FILE: &str = "agent.addr";

#[derive(Debug, Parser)]
#[command(
    name = "razar-agent",
    version,
    about = "Razar agent: supervises the processes of a GPU host"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Args)]
pub struct Target {
    /// Agent config file (to find the agent's control socket; it need not validate).
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// The agent's control socket (overrides the config).
    #[arg(long)]
    pub socket: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent in the foreground.
    Run {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Validate a config file without starting anything (exit 2 on errors).
    Check {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Show the running agent's health and components.
    Status {
        #[command(flatten)]
        target: Target,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Start a component.
    Start {
        component: String,
        #[command(flatten)]
        target: Target,
    },
    /// Stop a component.
    Stop {
        component: String,
        #[command(flatten)]
        target: Target,
    },
    /// Restart a component.
    Restart {
        component: String,
        #[command(flatten)]
        target: Target,
    },
    /// Clear a quarantine and start the component again.
    Resolve {
        component: String,
        #[arg(long)]
        note: String,
        #[command(flatten)]
        target: Target,
    },
    /// Kill a component on purpose and report the time to ready again.
    Pulse {
        component: String,
        /// Recovery budget in milliseconds.
        #[arg(long, default_value_t = 30_000)]
        budget_ms: u64,
        #[command(flatten)]
        target: Target,
    },
    /// Ask the running agent to reload its config (like SIGHUP).
    Reload {
        #[command(flatten)]
        target: Target,
    },
}

/// The running agent's control socket: `--socket`, else from the config file, read as
/// leniently as possible.
pub fn resolve_socket(target: &Target) -> anyhow::Result<PathBuf> {
    if let Some(socket) = &target.socket {
        return Ok(socket.clone());
    }
    razar_agent::config::locate_control_socket(&target.config).ok_or_else(|| {
        anyhow::anyhow!(
            "cannot read {} to find the agent's control socket (give --socket)",
            target.config.display()
        )
    })
}

/// One HTTP/1.1 request to the agent over its control socket; returns (status, body).
pub async fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let io = async {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::PermissionDenied => anyhow::anyhow!(
                    "permission denied on {}: the control socket is for root and its group \
                     (agent.control_group)",
                    socket.display()
                ),
                _ => anyhow::anyhow!(
                    "cannot reach the agent at {}: {e} (is it running?)",
                    socket.display()
                ),
            })?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "razar-agent")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(bytes::Bytes::from(body.unwrap_or("").to_owned())))?;
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok::<_, anyhow::Error>((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(60), io)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "the agent at {} did not answer within 60 s",
                socket.display()
            )
        })?
}

/// Standard output was closed by its reader (`razar-agent status | head -c 10`): the
/// reader has what it wanted, so the command still succeeds.
#[derive(Debug, thiserror::Error)]
#[error("standard output closed")]
pub struct StdoutClosed;

/// Writes `text` to standard output; [`StdoutClosed`] when the reader went away.
pub fn print(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("writing to standard output")),
    }
}

/// The latest pulse of `component` as `/health` shows it (`Ok(None)`: none yet).
async fn last_pulse(
    socket: &Path,
    component: &str,
) -> anyhow::Result<Option<razar_agent::supervisor::machine::PulseReport>> {
    let (status, body) = request(socket, "GET", "/health", None).await?;
    if status != 200 {
        anyhow::bail!("/health answered {status}: {body}");
    }
    let health: razar_agent::local_api::Health =
        serde_json::from_str(&body).map_err(|e| anyhow::anyhow!("parsing /health: {e}"))?;
    Ok(health
        .components
        .into_iter()
        .find(|c| c.name == component)
        .and_then(|c| c.last_pulse))
}

/// `pulse`: kills `component` on purpose, waits for the agent's verdict and prints the
/// measured time to ready again, or the failure. Exit code 0 passed, 1 failed, 2 refused.
pub async fn pulse(socket: &Path, component: &str, budget_ms: u64) -> anyhow::Result<i32> {
    let before = last_pulse(socket, component).await?;
    let body = serde_json::json!({ "budget_ms": budget_ms }).to_string();
    let path = format!("/v1/components/{component}/pulse");
    let (status, answer) = request(socket, "POST", &path, Some(&body)).await?;
    if status != 200 {
        eprintln!("{answer}");
        return Ok(2);
    }
    // The agent decides by the budget; the slack covers a slow answer, not a slow component.
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(budget_ms) + Duration::from_secs(30);
    loop {
        let report = last_pulse(socket, component)
            .await?
            .filter(|r| Some(r.started_ms) != before.map(|b| b.started_ms))
            .filter(|r| r.done);
        if let Some(r) = report {
            return Ok(match r.recovered_ms {
                Some(ms) if r.passed => {
                    println!(
                        "ok: pulse {component}: ready again after {ms} ms (budget {} ms)",
                        r.budget_ms
                    );
                    0
                }
                Some(ms) => {
                    println!(
                        "failed: pulse {component}: ready again after {ms} ms, over the budget of {} ms",
                        r.budget_ms
                    );
                    1
                }
                None => {
                    println!(
                        "failed: pulse {component}: not ready again within {} ms",
                        r.budget_ms
                    );
                    1
                }
            });
        }
        if tokio::time::Instant::now() > deadline {
            eprintln!("pulse {component}: no result from the agent");
            return Ok(1);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Validates `path` as `run` would (values and the files it names); prints "ok" or
/// every error. Returns the exit code (0 or 2).
pub fn check(path: &Path) -> i32 {
    match razar_agent::config::Config::load_checked(path) {
        Ok(config) => {
            let text = format!(
                "ok: {} components ({} on profile `{}`), sha256 {}\n",
                config.components.len(),
                config.active_components().count(),
                config.agent.profile,
                config.hash
            );
            match print(&text) {
                Ok(()) => 0,
                Err(e) if e.is::<StdoutClosed>() => 0,
                Err(e) => {
                    eprintln!("razar-agent: {e:#}");
                    1
                }
            }
        }
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("{} error(s)", errors.0.len());
            2
        }
    }
}
