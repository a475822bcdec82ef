//! Agent configuration: one TOML file read in two phases. `raw` holds what was written
//! (serde, unknown keys refused); `validate` turns it into the typed values below and
//! reports every problem at once with file, line, key and reason.

pub mod document;
mod error;
pub mod files;
mod raw;
pub mod units;
mod validate;

pub use error::{line_column, Collector as ErrorCollector, ConfigError, ConfigErrors};

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
    /// `gpu.dcgm_hostname_label`: the host label's name on `DCGM_FI_DEV_*` series
    /// (`hostname`, the default, or `Hostname` for dashboards built on dcgm-exporter's
    /// released versions).
    pub dcgm_hostname_label: razar_gpu::exposition::HostnameLabel,
    /// `gpu.reset_command`, `gpu.reset_timeout`: what `ResetGpu` runs.
    pub gpu_commands: GpuCommandSettings,
    /// Every component in the file, in file order (see [`Config::active_components`]).
    pub components: Vec<ComponentSpec>,
    pub watches: Vec<WatchSpec>,
    /// Each component's `[[component]]` table as TOML, by name: the full spec a
    /// revision is kept with for rollbacks ([`crate::revisions`]).
    pub component_sources: BTreeMap<String, String>,
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

    /// Reads and validates `path` as `run` uses it: [`Config::load`], and every file the
    /// config names (collector certificate, key and CA, GPU scenario, NVML library) is
    /// read and parsed; all problems are reported together.
    pub fn load_checked(path: &Path) -> Result<Config, ConfigErrors> {
        match std::fs::read(path) {
            Ok(bytes) => Config::parse_with(path, &bytes, Files::Check),
            Err(_) => Config::load(path),
        }
    }

    /// Validates `bytes` as if read from `path` (the files it names are not opened).
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Config, ConfigErrors> {
        Config::parse_with(path, bytes, Files::Skip)
    }

    fn parse_with(path: &Path, bytes: &[u8], files: Files) -> Result<Config, ConfigErrors> {
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
        let mut config = validate::validate(path, text, hash, files)?;
        config.component_sources = crate::revisions::component_tables(text)
            .into_iter()
            .filter_map(|(name, table)| Some((name, toml::to_string(&table).ok()?)))
            .collect();
        Ok(config)
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

/// Whether validation opens the files a config names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Files {
    Skip,
    Check,
}

/// The kernel log XIDs are read from unless `gpu.kernel_log` says otherwise.
pub const DEFAULT_KERNEL_LOG: &str = "/dev/kmsg";

/// Shortest `agent.sample_interval`: each tick samples every GPU, the host and every
/// component's process tree on the blocking pool and spools one batch.
pub const MIN_SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

/// `[agent]`: this host's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentSettings {
    /// Host id; `None`: the collector takes it from the certificate, the agent shows the hostname.
    pub host_id: Option<String>,
    /// The profile this host runs (`core`, `vision`, ...).
    pub profile: String,
    /// Durable state (store, spool).
    pub data_dir: PathBuf,
    /// Local read-only `/health` and `/metrics`; always a loopback address.
    pub listen: SocketAddr,
    /// Resource sampling period.
    pub sample_interval: Duration,
    /// `agent.spool_budget`: disk budget of the telemetry spool (encoded batches); over
    /// it the oldest batches lose samples, then events, each loss reported as a gap
    /// event. Default 512 MiB.
    pub spool_budget_bytes: u64,
    /// `agent.control_socket`: the unix socket of the control API (start, stop, restart,
    /// resolve, quarantine, pulse, reload), mode 0660; default `<data_dir>/control.sock`.
    pub control_socket: PathBuf,
    /// `agent.control_group`: the group (name, gid) given the control socket, so its
    /// members may steer the agent; `None`: root's group only.
    pub control_group: Option<(String, u32)>,
    /// `agent.command_retention`: how long executed-command records are kept to answer
    /// redeliveries (default 7 days).
    pub command_retention: Duration,
    /// `agent.log_follow_limit`: how long a log follow asked by the collector runs at
    /// most (default 1 hour).
    pub log_follow_limit: Duration,
}

/// File name of the control socket under the data dir.
pub const CONTROL_SOCKET: &str = "control.sock";

/// Finds the control socket a config file names, reading as little of it as it can: the
/// CLI must reach a running agent even when the file on disk no longer validates (a typo
/// after an edit). Takes `agent.control_socket`, else `agent.data_dir` + `control.sock`,
/// from a file that is at least TOML; from one that is not, the first `data_dir = "..."`
/// or `control_socket = "..."` line. `None` when the file cannot be read.
pub fn locate_control_socket(path: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(path).ok()?;
    let from = |socket: Option<&str>, data_dir: Option<&str>| -> PathBuf {
        match socket {
            Some(s) => PathBuf::from(s),
            None => {
                PathBuf::from(data_dir.unwrap_or(validate::DEFAULT_DATA_DIR)).join(CONTROL_SOCKET)
            }
        }
    };
    if let Ok(value) = text.parse::<toml::Table>() {
        let agent = value.get("agent").and_then(|a| a.as_table());
        let get = |key: &str| agent.and_then(|a| a.get(key)).and_then(|v| v.as_str());
        return Some(from(get("control_socket"), get("data_dir")));
    }
    let line_value = |key: &str| {
        text.lines().find_map(|line| {
            let (k, v) = line.split_once('=')?;
            (k.trim() == key).then(|| v.trim().trim_matches('"').to_owned())
        })
    };
    Some(from(
        line_value("control_socket").as_deref(),
        line_value("data_dir").as_deref(),
    ))
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
    /// NVML loaded at run time; `library` overrides `libnvidia-ml.so.1`. XIDs also come
    /// from `kernel_log` (`gpu.kernel_log`, default `/dev/kmsg`): NVML's event set keeps
    /// only the latest XID between two waits, the kernel log has every one.
    Nvml {
        library: Option<PathBuf>,
        kernel_log: PathBuf,
    },
    /// A fake GPU driven by a scenario file (tests, demos).
    Scenario { path: PathBuf },
    /// No GPU sampling.
    None,
}

/// Default of `gpu.reset_timeout`.
pub const DEFAULT_GPU_RESET_TIMEOUT: Duration = Duration::from_secs(120);

/// How the agent carries out GPU commands (`DrainGpu`, `ResetGpu`, `SetGpuHealth`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuCommandSettings {
    /// `gpu.reset_command`: the host's GPU reset action, an argv (never a shell string)
    /// whose `{index}` and `{uuid}` are replaced by the GPU's; `None`: `ResetGpu` fails
    /// with "no reset command configured".
    pub reset_command: Option<Argv>,
    /// `gpu.reset_timeout`: the reset command is killed (and the reset failed) after this.
    pub reset_timeout: Duration,
}

impl Default for GpuCommandSettings {
    fn default() -> Self {
        GpuCommandSettings {
            reset_command: None,
            reset_timeout: DEFAULT_GPU_RESET_TIMEOUT,
        }
    }
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

/// What a component is: a long-running service, or a step that runs to completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ComponentKind {
    /// Runs until stopped; ready when spawned, or when its readiness probe passes.
    #[default]
    Service,
    /// Runs to completion (a migration, a setup step), like systemd's `Type=oneshot`
    /// with `RemainAfterExit`: ready once it has exited 0, and stays ready with no
    /// process. Not run again after an agent restart while its revision is unchanged.
    Oneshot,
}

impl ComponentKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ComponentKind::Service => "service",
            ComponentKind::Oneshot => "oneshot",
        }
    }
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
    /// `gpus`: indices of the GPUs the component runs on (the GPU mapping `DrainGpu`
    /// uses: a drained GPU stops its components and keeps them from starting).
    pub gpus: Vec<u32>,
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
    /// `service` (the default) or `oneshot`. Kept the last field: the default revision
    /// digests the spec's `Debug` text without it for a service, so adding the key did
    /// not change the revision (and restart) every existing component.
    pub kind: ComponentKind,
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
