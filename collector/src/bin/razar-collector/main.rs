//! `razar-collector`: the collector daemon. `razar-collector dev` runs the `razar-dev`
//! binary found next to this one (dev mode needs the agent, which the collector does
//! not depend on).

mod token;

use clap::{Parser, Subcommand};
use razar_collector::config::CollectorConfig;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(name = "razar-collector", version, about = "Razar collector")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate a configuration file and exit.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Run the collector with a configuration file.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Run Razar on this machine: dev CA, embedded PostgreSQL, collector, and an agent
    /// supervising demo components with two fake GPUs (runs `razar-dev`, installed
    /// next to this program; its options: `razar-collector dev --help`).
    #[command(disable_help_flag = true)]
    Dev {
        /// Passed to `razar-dev` as they are.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Operator API tokens: `token create --role R --name N [--expires 30d]`, `list`,
    /// `revoke ID`.
    Token(token::TokenArgs),
}

/// mimalloc: the collector allocates and frees millions of small buffers a second
/// (decoded batches, dropped on another worker thread after their commit), where glibc's
/// allocator spent a quarter of the collector's CPU (BENCHMARKS.md, fleet load).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        // Both check the values and the TLS files the way `run` uses them.
        Command::Check { config } => match CollectorConfig::load_checked(&config) {
            Ok(_) => {
                let mut out = std::io::stdout().lock();
                match writeln!(out, "{}: ok", config.display()) {
                    Ok(()) => ExitCode::SUCCESS,
                    // `razar-collector check ... | head -c 3`: the reader has what it wanted.
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("razar-collector: error: writing to standard output: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            Err(errors) => {
                eprintln!("{errors}");
                eprintln!("{} error(s)", errors.0.len());
                ExitCode::from(2)
            }
        },
        Command::Run { config } => match CollectorConfig::load_checked(&config) {
            Ok(c) => block_on(run(c)),
            Err(errors) => {
                eprintln!("{errors}");
                eprintln!("refusing to start: {} config error(s)", errors.0.len());
                ExitCode::from(2)
            }
        },
        Command::Dev { args } => exec_dev(&args),
        Command::Token(args) => block_on(token::run(args)),
    }
}

/// Replaces this process with `razar-dev` from this program's directory (same pid, so
/// signals reach dev mode itself); returns only if that fails.
fn exec_dev(args: &[std::ffi::OsString]) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let dev = match std::env::current_exe() {
        Ok(exe) => exe.with_file_name("razar-dev"),
        Err(e) => {
            eprintln!("razar-collector: error: cannot find this program's path: {e}");
            return ExitCode::FAILURE;
        }
    };
    if !dev.is_file() {
        eprintln!(
            "razar-collector: error: dev mode needs the razar-dev program next to this one, at {} (build it with `cargo build -p razar-dev`)",
            dev.display()
        );
        return ExitCode::FAILURE;
    }
    let error = std::process::Command::new(&dev).args(args).exec();
    eprintln!(
        "razar-collector: error: cannot run {}: {error}",
        dev.display()
    );
    ExitCode::FAILURE
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs `f` on a multi-threaded runtime and maps the error chain to a one-line message.
fn block_on(f: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    init_logging();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("razar-collector: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(f) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("razar-collector: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `razar-collector run`: serve until SIGINT/SIGTERM; SIGHUP reloads certificates and CRL.
async fn run(config: CollectorConfig) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let service = razar_collector::service::Service::start(config).await?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = hup.recv() => match service.reload_tls() {
                Ok(closed) => tracing::info!(closed, "TLS certificates and CRL reloaded"),
                Err(error) => tracing::error!(%error, "TLS reload refused; keeping the old configuration"),
            },
        }
    }
    service.shutdown().await;
    Ok(())
}
