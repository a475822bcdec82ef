//! Agent configuration: one TOML file read in two phases. `raw` holds what was written
//! (serde, unknown keys refused); `validate` turns it into the typed values below and
//! reports every problem at once with file, line, key and reason.

mod error;
mod raw;
pub mod units;
mod validate;

pub use error::{ConfigError, ConfigErrors};

use crate::supervisor::backoff::ExponentialBackoff;
use nix::sys::signal::Signal;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU64};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A fully validated agent configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where it was read from.
    pub path: PathBuf,
    /// sha256 of the file's bytes, lower-case hex (shown by `/health`).
    pub hash: String,
    pub agent: AgentSettings,
    /// Absent: no collector link configured (local supervision only).
    pub collector: Option<CollectorSettings>,
    pub gpu: GpuSettings,
    /// Every component in the file, in file order (see [`Config::active_components`]).
    pub components: Vec<ComponentSpec>,
    pub watches: Vec<WatchSpec>,
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        match std::fs::read(path) {
            Ok(bytes) => Config::parse(path, &bytes),
            Err(e) => Err(ConfigErrors(vec![ConfigError {
                file: path.to_path_buf(),
                line: 0,
                column: 0,
                key: String::new(),
                reason: format!("cannot read the file: {e}"),
            }])),
        }
    }

    /// Validates `bytes` as if read from `path`.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Config, ConfigErrors> {
        let hash = hex::encode(Sha256::digest(bytes));
        let text = match std::str::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) => {
                let (line, column) =
                    error::line_column(&String::from_utf8_lossy(bytes), e.valid_up_to());
                return Err(ConfigErrors(vec![ConfigError {
                    file: path.to_path_buf(),
                    line,
                    column,
                    key: String::new(),
                    reason: "the file is not valid UTF-8".into(),
                }]));
            }
        };
        validate::validate(path, text, hash)
    }

    /// Components that run on this host: those listing the host's profile, or no profile.
    pub fn active_components(&self) -> impl Iterator<Item = &ComponentSpec> {
        self.components
            .iter()
            .filter(move |c| c.runs_in(&self.agent.profile))
    }

    /// The active component called `name`.
    pub fn component(&self, name: &str) -> Option<&ComponentSpec> {
        self.active_components().find(|c| c.name.as_str() == name)
    }
}

/// Default of `agent.spool_budget`.
pub const DEFAULT_SPOOL_BUDGET_BYTES: u64 = 512 << 20;

/// `[agent]`: this host's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentSettings {
    /// Host id; `None`: the collector takes it from the certificate, the agent shows the hostname.
    pub host_id: Option<String>,
    /// The profile this host runs (`core`, `vision`, ...).
    pub profile: String,
    /// Durable state (store, spool).
    pub data_dir: PathBuf,
    /// Local `/health`, `/metrics` and control endpoints; always a loopback address.
    pub listen: SocketAddr,
    /// Resource sampling period.
    pub sample_interval: Duration,
    /// `agent.spool_budget`: disk budget of the telemetry spool (encoded batches); over
    /// it the oldest batches lose samples, then events, each loss reported as a gap
    /// event. Default 512 MiB.
    pub spool_budget_bytes: u64,
}

/// `[collector]`: where telemetry goes (used by the uplink).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectorSettings {
    /// `host:port` of the collector's QUIC endpoint.
    pub address: String,
    /// Name the collector's certificate must carry.
    pub server_name: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `[gpu]`: where GPU readings come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuSettings {
    /// NVML loaded at run time; `library` overrides `libnvidia-ml.so.1`.
    Nvml { library: Option<PathBuf> },
    /// A fake GPU driven by a scenario file (tests, demos).
    Scenario { path: PathBuf },
    /// No GPU sampling.
    None,
}

/// A component name: 1 to 64 of `[A-Za-z0-9_.-]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ComponentName(String);

impl ComponentName {
    pub fn parse(text: &str) -> Result<ComponentName, String> {
        let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
        if text.is_empty() || text.len() > 64 || !text.chars().all(ok_char) {
            return Err(format!(
                "`{text}` is not a valid component name (1 to 64 of A-Z a-z 0-9 _ - .)"
            ));
        }
        Ok(ComponentName(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ComponentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Restart policy after a process exits on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

/// What exceeding the VRAM budget does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VramPolicy {
    /// Emit an event only.
    Event,
    /// Emit an event and restart the component.
    Restart,
}

/// How a probe checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeCheck {
    /// HTTP GET expecting a 2xx status.
    Http { url: String },
    /// TCP connect to `host:port`.
    Tcp { address: String },
    /// Run a command; exit status 0 passes.
    Exec { argv: Argv },
}

/// A readiness or liveness probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSpec {
    pub check: ProbeCheck,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive failures that count as failing.
    pub failure_threshold: NonZeroU32,
    /// Consecutive successes that count as passing.
    pub success_threshold: NonZeroU32,
    /// Failures during this period after a start are not held against the component.
    pub start_period: Duration,
}

/// A command line from the local config: program and arguments, never a shell string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Argv {
    pub program: String,
    pub args: Vec<String>,
}

/// N failures within a window → quarantined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GiveUpRule {
    pub max_failures: NonZeroU32,
    pub window: Duration,
}

/// Where and how much of a component's output is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    pub dir: PathBuf,
    pub max_size_bytes: NonZeroU64,
    pub max_files: NonZeroU32,
}

/// One supervised component.
#[derive(Debug, Clone, PartialEq)]
pub struct ComponentSpec {
    pub name: ComponentName,
    pub command: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub working_dir: Option<PathBuf>,
    pub user: Option<String>,
    pub depends_on: Vec<ComponentName>,
    /// Lower starts first among components whose dependencies are equally satisfied.
    pub priority: i32,
    /// Profiles this component runs in; empty: every profile.
    pub profiles: Vec<String>,
    /// `false`: starts only on command.
    pub autostart: bool,
    /// Escalates with higher severity when quarantined.
    pub critical: bool,
    /// Revision label reported to the collector; defaults to a hash of the spec.
    pub revision: String,
    pub stop_signal: Signal,
    pub stop_grace: Duration,
    pub memory_budget_bytes: Option<NonZeroU64>,
    pub vram_budget_bytes: Option<NonZeroU64>,
    pub vram_policy: VramPolicy,
    /// Run before every restart (e.g. flush a GPU's tasks).
    pub recovery_action: Option<Argv>,
    /// Receives the failure context as JSON on stdin when the give-up rule fires.
    pub give_up_hook: Option<Argv>,
    pub readiness: Option<ProbeSpec>,
    pub liveness: Option<ProbeSpec>,
    pub restart_policy: RestartPolicy,
    pub backoff: ExponentialBackoff,
    pub give_up: GiveUpRule,
    pub logs: LogSettings,
}

impl ComponentSpec {
    /// Whether this component runs on a host with `profile`.
    pub fn runs_in(&self, profile: &str) -> bool {
        self.profiles.is_empty() || self.profiles.iter().any(|p| p == profile)
    }
}

/// How a watched process is recognised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchMatch {
    /// Exact process name (`comm`).
    Name(String),
    /// A fragment of the command line.
    Cmdline(String),
}

/// A process the agent does not start but samples like a component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchSpec {
    pub name: String,
    pub matcher: WatchMatch,
}

#[cfg(test)]
mod tests;
