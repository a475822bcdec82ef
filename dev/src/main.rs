//! `razar-dev`: Razar on one machine (see [`dev`]), and the demo components it
//! supervises (`razar-dev demo <kind>`). `razar-collector dev` runs this binary.

mod demo;
mod dev;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "razar-dev",
    version,
    about = "Razar on this machine: dev CA, embedded PostgreSQL, collector, and an agent supervising demo components with two fake GPUs"
)]
struct Cli {
    #[command(subcommand)]
    demo: Option<Demo>,
    #[command(flatten)]
    args: dev::DevArgs,
}

#[derive(Debug, Subcommand)]
enum Demo {
    /// Run a demo component (what dev mode's agent supervises).
    #[command(subcommand, hide = true)]
    Demo(demo::DemoKind),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.demo {
        Some(Demo::Demo(kind)) => block_on(demo::run(kind)),
        None => block_on(dev::run(cli.args)),
    }
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
            eprintln!("razar-dev: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(f) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("razar-dev: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
