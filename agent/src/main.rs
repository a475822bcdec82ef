//! `razar-agent`: thin binary over the library: parse arguments, run or talk to the agent,
//! map errors to exit codes (0 ok, 1 failure, 2 invalid config or refused command).

use anyhow::Context as _;
use clap::Parser;
mod cli;

use cli::{Cli, Command};
use razar_agent::daemon::{Daemon, DaemonOptions};
use razar_agent::local_api::Health;
use tokio::signal::unix::{signal, SignalKind};

fn main() {
    one_malloc_arena();
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Check { config } => cli::check(&config),
        other => {
            // One worker thread: a child's exit, the decision and the respawn then happen
            // on one thread with no cross-thread wake-ups (kill → new pid 0.85 ms median
            // against 1.7 ms with two workers; BENCHMARKS.md). Whatever may block on disk
            // (spool commits, log files, sampling) runs on the blocking pool.
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("razar-agent: cannot start the runtime: {e}");
                    std::process::exit(1);
                }
            };
            match runtime.block_on(dispatch(other)) {
                Ok(code) => code,
                // `razar-agent status | head -c 10`: the reader has what it wanted.
                Err(e) if e.is::<cli::StdoutClosed>() => 0,
                Err(e) => {
                    eprintln!("razar-agent: {e:#}");
                    1
                }
            }
        }
    };
    std::process::exit(code);
}

async fn dispatch(command: Command) -> anyhow::Result<i32> {
    match command {
        Command::Check { config } => Ok(cli::check(&config)),
        Command::Run { config } => run(&config).await,
        Command::Status { target, json } => {
            let socket = cli::resolve_socket(&target)?;
            let (status, body) = cli::request(&socket, "GET", "/health", None).await?;
            if json || status != 200 {
                cli::print(&format!("{body}\n"))?;
                return Ok(if status == 200 { 0 } else { 1 });
            }
            let health: Health = serde_json::from_str(&body).context("parsing /health")?;
            let mut text = format!(
                "agent {} {}  uptime {}s  profile {}  config {}  collector {}\n",
                health.version,
                health.status,
                health.uptime_seconds,
                health.profile,
                health.config_hash.get(..12).unwrap_or(""),
                health.collector
            );
            for problem in &health.problems {
                text.push_str(&format!("degraded: {problem}\n"));
            }
            if let Some(why) = &health.gpu {
                text.push_str(&format!("GPU telemetry off: {why}\n"));
            }
            text.push_str(&format!(
                "{:<24} {:<12} {:>8} {:>9}  reason\n",
                "COMPONENT", "STATE", "PID", "RESTARTS"
            ));
            for c in health.components {
                text.push_str(&format!(
                    "{:<24} {:<12} {:>8} {:>9}  {}\n",
                    c.name,
                    c.state.as_str(),
                    c.pid.map_or("-".to_owned(), |p| p.to_string()),
                    c.restarts,
                    c.reason
                ));
            }
            cli::print(&text)?;
            Ok(0)
        }
        Command::Start { component, target } => control(&target, &component, "start", None).await,
        Command::Stop { component, target } => control(&target, &component, "stop", None).await,
        Command::Restart { component, target } => {
            control(&target, &component, "restart", None).await
        }
        Command::Resolve {
            component,
            note,
            target,
        } => {
            let body = serde_json::json!({ "note": note }).to_string();
            control(&target, &component, "resolve", Some(&body)).await
        }
        Command::Pulse {
            component,
            budget_ms,
            target,
        } => {
            let socket = cli::resolve_socket(&target)?;
            cli::pulse(&socket, &component, budget_ms).await
        }
        Command::Reload { target } => {
            let socket = cli::resolve_socket(&target)?;
            let (status, body) = cli::request(&socket, "POST", "/v1/reload", None).await?;
            if status == 200 {
                cli::print(&format!("{body}\n"))?;
                return Ok(0);
            }
            // The agent's answer carries the config errors (file, line, key, reason).
            match serde_json::from_str::<razar_agent::local_api::ApiError>(&body) {
                Ok(e) => eprintln!("reload refused ({}): {}", e.code, e.message),
                Err(_) => eprintln!("reload refused: {body}"),
            }
            Ok(2)
        }
    }
}

async fn control(
    target: &cli::Target,
    component: &str,
    action: &str,
    body: Option<&str>,
) -> anyhow::Result<i32> {
    let socket = cli::resolve_socket(target)?;
    let path = format!("/v1/components/{component}/{action}");
    let (status, body) = cli::request(&socket, "POST", &path, body).await?;
    if status == 200 {
        cli::print(&format!("ok: {action} {component}\n"))?;
        Ok(0)
    } else {
        eprintln!("{body}");
        Ok(2)
    }
}

async fn run(path: &std::path::Path) -> anyhow::Result<i32> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = match razar_agent::profile::load_effective(path) {
        Ok((c, notes)) => {
            for note in notes {
                tracing::info!(%note, "rollback pins");
            }
            c
        }
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("refusing to start: {} config error(s)", errors.0.len());
            return Ok(2);
        }
    };
    let data_dir = config.agent.data_dir.clone();
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    let daemon = Daemon::start(config, DaemonOptions::default())
        .await
        .context("starting the agent")?;
    if let Some(why) = daemon.gpu_status() {
        tracing::warn!(reason = why, "GPU telemetry off");
    }
    let agent = daemon.agent().clone();
    if let Some(addr) = agent.local_addr() {
        let _ = std::fs::create_dir_all(&data_dir);
        std::fs::write(data_dir.join(cli::ADDR_FILE), addr.to_string())
            .context("writing the address file")?;
        tracing::info!(%addr, "local endpoints listening");
    }
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => match agent.reload().await {
                Ok(changed) => tracing::info!(?changed, "configuration reloaded"),
                Err(error) => tracing::error!(%error, "reload refused; running configuration kept"),
            },
        }
    }
    tracing::info!("stopping components in reverse order");
    daemon.shutdown().await;
    Ok(0)
}

/// The agent allocates little and from few threads: one glibc malloc arena instead of one
/// per thread keeps its resident memory about 0.5 MiB lower (BENCHMARKS.md, footprint),
/// at no measurable CPU cost. Called first thing, before any thread exists.
#[allow(unsafe_code)]
fn one_malloc_arena() {
    // SAFETY: mallopt only sets an allocator tunable; it is called before any other
    // thread is started, and a failure (0) just leaves the default in place.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
