//! `razar`: the operator CLI, a client of the collector's HTTP API (`/api/v1`).
//!
//! Exit codes: 0 success, 1 failure (the API refused, the server is unreachable, a
//! command failed), 2 usage (bad arguments, a bad config file).
#![forbid(unsafe_code)]

mod args;
mod client;
mod commands;
mod output;
mod settings;

use clap::Parser;
use std::process::ExitCode;

/// Exit codes.
const FAILURE: u8 = 1;
const USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = match args::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print and succeed; everything else is usage.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let env = |name: &str| std::env::var(name).ok();
    let settings = match load_settings(&cli, &env) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("razar: {e}");
            return ExitCode::from(USAGE);
        }
    };
    match commands::run(&cli, &settings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(commands::Failure::Usage(message)) => {
            eprintln!("razar: {message}");
            ExitCode::from(USAGE)
        }
        Err(commands::Failure::Failed(e)) => {
            eprintln!("razar: {e:#}");
            ExitCode::from(FAILURE)
        }
    }
}

fn load_settings(
    cli: &args::Cli,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<settings::Settings, settings::SettingsError> {
    let flags = settings::Flags {
        server: cli.server.clone(),
        token: cli.token.clone(),
        config: cli.config.clone(),
        cert: cli.cert.clone(),
        key: cli.key.clone(),
        ca: cli.ca.clone(),
    };
    let explicit = flags.config.is_some() || env("RAZAR_CONFIG").is_some_and(|c| !c.is_empty());
    let file = match settings::config_path(flags.config.as_deref(), env) {
        Some(path) => settings::read_file(&path, explicit)?,
        None => None,
    };
    settings::resolve(&flags, env, file.as_ref())
}
