//! The `razar-agent` command line: `run`, `check`, and the local control commands
//! (`status`, `start`, `stop`, `restart`, `resolve`, `pulse`, `reload`) that talk to a
//! running agent over its loopback HTTP port with a minimal HTTP/1.1 client.

use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    /// Agent config file (to find the agent's local address).
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// The agent's local address (overrides the config).
    #[arg(long)]
    pub addr: Option<SocketAddr>,
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

/// Where the running agent listens: `--addr`, else the address file in the data dir,
/// else the config's `listen`.
pub fn resolve_addr(target: &Target) -> anyhow::Result<SocketAddr> {
    if let Some(addr) = target.addr {
        return Ok(addr);
    }
    let config =
        razar_agent::config::Config::load(&target.config).map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Ok(text) = std::fs::read_to_string(config.agent.data_dir.join(ADDR_FILE)) {
        if let Ok(addr) = text.trim().parse() {
            return Ok(addr);
        }
    }
    Ok(config.agent.listen)
}

/// One HTTP/1.1 request to the agent; returns (status, body).
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let io = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let body = body.unwrap_or("");
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.take(16 << 20).read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(30), io)
        .await
        .map_err(|_| anyhow::anyhow!("agent at {addr} did not answer within 30 s"))?
        .map_err(|e| anyhow::anyhow!("cannot reach the agent at {addr}: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("malformed answer from {addr}"))?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(rest.get(..n).unwrap_or(""));
        body = rest.get(n + 2..).unwrap_or("");
    }
    out
}

/// The latest pulse of `component` as `/health` shows it (`Ok(None)`: none yet).
async fn last_pulse(
    addr: SocketAddr,
    component: &str,
) -> anyhow::Result<Option<razar_agent::supervisor::machine::PulseReport>> {
    let (status, body) = request(addr, "GET", "/health", None).await?;
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
pub async fn pulse(addr: SocketAddr, component: &str, budget_ms: u64) -> anyhow::Result<i32> {
    let before = last_pulse(addr, component).await?;
    let body = serde_json::json!({ "budget_ms": budget_ms }).to_string();
    let path = format!("/v1/components/{component}/pulse");
    let (status, answer) = request(addr, "POST", &path, Some(&body)).await?;
    if status != 200 {
        eprintln!("{answer}");
        return Ok(2);
    }
    // The agent decides by the budget; the slack covers a slow answer, not a slow component.
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(budget_ms) + Duration::from_secs(30);
    loop {
        let report = last_pulse(addr, component)
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

/// Validates `path`; prints "ok" or every error. Returns the exit code (0 or 2).
pub fn check(path: &Path) -> i32 {
    match razar_agent::config::Config::load(path) {
        Ok(config) => {
            println!(
                "ok: {} components ({} on profile `{}`), sha256 {}",
                config.components.len(),
                config.active_components().count(),
                config.agent.profile,
                config.hash
            );
            0
        }
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("{} error(s)", errors.0.len());
            2
        }
    }
}
