//! The command line (clap).

use crate::output::Format;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// Query and steer a Razar fleet through its collector's API.
///
/// Server and token: --server/--token, else RAZAR_SERVER/RAZAR_TOKEN, else the config
/// file (--config, RAZAR_CONFIG, or ~/.config/razar/cli.toml with `server` and `token`).
#[derive(Debug, Parser)]
#[command(name = "razar", version, propagate_version = true)]
pub struct Cli {
    /// The collector's HTTP API, e.g. http://collector:7080.
    #[arg(long, global = true, value_name = "URL")]
    pub server: Option<String>,
    /// An API token (`razar-collector token create`).
    #[arg(long, global = true, value_name = "TOKEN")]
    pub token: Option<String>,
    /// An operator certificate (PEM, `razar-certs issue operator`) for a collector whose
    /// API port has `[api.tls]`; with --key. Env RAZAR_CERT, config-file key `cert`.
    #[arg(long, global = true, value_name = "FILE")]
    pub cert: Option<String>,
    /// The operator certificate's private key (PEM). Env RAZAR_KEY, config-file key `key`.
    #[arg(long, global = true, value_name = "FILE")]
    pub key: Option<String>,
    /// The CA (PEM) to trust for an https:// server's certificate. Env RAZAR_CA,
    /// config-file key `ca`.
    #[arg(long, global = true, value_name = "FILE")]
    pub ca: Option<String>,
    /// The config file (default ~/.config/razar/cli.toml).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Format::Table)]
    pub output: Format,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The collector's health and checks.
    Health,
    /// Where the server and token come from (the token is not shown).
    Config,
    /// Every host: state, last seen, agent version, profile.
    Hosts,
    /// One host.
    Host { host: String },
    /// Components of one host, or of every host.
    Components { host: Option<String> },
    /// GPUs of one host, or of every host, with live values.
    Gpus { host: Option<String> },
    /// Events, newest first; -f follows the live stream (resumes where it left off).
    Events(EventsArgs),
    /// Escalations.
    Escalations {
        /// Only this state (e.g. open, acknowledged, resolved).
        #[arg(long)]
        state: Option<String>,
    },
    /// Acknowledge an escalation.
    Ack(NoteArgs),
    /// Resolve an escalation.
    Resolve(NoteArgs),
    /// Restart a component: HOST/COMPONENT.
    Restart(ComponentCommand),
    /// Stop a component: HOST/COMPONENT.
    Stop(ComponentCommand),
    /// Start a component: HOST/COMPONENT.
    Start(ComponentCommand),
    /// Pulse a component (restart and check it comes back within the budget).
    Pulse {
        #[command(flatten)]
        target: ComponentCommand,
        /// Time the component has to be ready again.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        budget: std::time::Duration,
    },
    /// A command's state.
    #[command(name = "command")]
    Inspect { id: String },
    /// A component's log: HOST/COMPONENT.
    Logs {
        target: String,
        /// Keep following (across restarts and rotation) until interrupted.
        #[arg(short, long)]
        follow: bool,
        /// Lines from the end to start with.
        #[arg(long, default_value_t = 100)]
        tail: u32,
    },
    /// A metric's history as a sparkline (or its points with -o json/yaml).
    History(HistoryArgs),
    /// Start a deployment from a spec file (JSON, YAML or TOML) as the API takes it.
    Deploy {
        /// The deployment spec.
        file: PathBuf,
    },
    /// Deployments in progress.
    Rollout {
        #[command(subcommand)]
        action: RolloutAction,
    },
    /// Roll a deployment back.
    Rollback { deployment: String },
    /// Decisions the engine took.
    Decisions {
        /// At most this many.
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Why a decision was taken: its evidence and rejected alternatives.
    Why { decision: String },
    /// The audit log.
    Audit {
        /// At most this many.
        #[arg(long)]
        limit: Option<u32>,
    },
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Follow the live stream.
    #[arg(short, long)]
    pub follow: bool,
    #[arg(long)]
    pub host: Option<String>,
    #[arg(long)]
    pub kind: Option<String>,
    #[arg(long)]
    pub severity: Option<String>,
    /// Only events this recent (e.g. 1h, 30m).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub since: Option<std::time::Duration>,
    #[arg(long)]
    pub limit: Option<u32>,
    /// Continue a listing from the cursor the previous page returned.
    #[arg(long)]
    pub cursor: Option<String>,
}

#[derive(Debug, Args)]
pub struct NoteArgs {
    /// The escalation id.
    pub id: String,
    /// Why (kept with the escalation and in the audit log).
    #[arg(long, short = 'm', default_value = "")]
    pub note: String,
}

#[derive(Debug, Args)]
pub struct ComponentCommand {
    /// HOST/COMPONENT.
    pub target: String,
    /// Wait until the agent answered and exit 1 if the command failed.
    #[arg(long)]
    pub wait: bool,
    /// A key that makes a retried submission the same command.
    #[arg(long)]
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// The metric, e.g. razar_gpu_utilization_ratio.
    pub metric: String,
    #[arg(long)]
    pub host: Option<String>,
    /// How far back (e.g. 24h, 90m).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub since: std::time::Duration,
    /// Points per series the collector returns.
    #[arg(long, default_value_t = 120)]
    pub points: u32,
}

#[derive(Debug, Subcommand)]
pub enum RolloutAction {
    /// Deployments and their waves (one with an id).
    Status { deployment: Option<String> },
    /// Pause a deployment.
    Pause { deployment: String },
    /// Resume a paused deployment.
    Resume { deployment: String },
    /// Promote past a manual gate.
    Promote { deployment: String },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_go_anywhere() {
        let cli = Cli::try_parse_from(["razar", "hosts", "-o", "json", "--server", "http://x"])
            .expect("parses");
        assert_eq!(cli.output, Format::Json);
        assert_eq!(cli.server.as_deref(), Some("http://x"));
        assert!(Cli::try_parse_from(["razar", "-o", "xml", "hosts"]).is_err());
        assert!(Cli::try_parse_from(["razar", "history"]).is_err());
    }
}
