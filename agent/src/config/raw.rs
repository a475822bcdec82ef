//! The config file as written: serde structs with `deny_unknown_fields`, every value
//! kept with its span so validation can name the line. Nothing here is checked beyond
//! TOML types; `validate` turns these into typed values.

use serde::Deserialize;
use std::collections::BTreeMap;
use toml::Spanned;

/// Shorthand: an optional value with its position in the file.
pub type S<T> = Option<Spanned<T>>;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub agent: Option<Spanned<RawAgent>>,
    pub collector: Option<Spanned<RawCollector>>,
    pub gpu: Option<Spanned<RawGpu>>,
    #[serde(default)]
    pub component: Vec<Spanned<RawComponent>>,
    #[serde(default)]
    pub watch: Vec<Spanned<RawWatch>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgent {
    pub host_id: S<String>,
    pub profile: S<String>,
    pub data_dir: S<String>,
    pub listen: S<String>,
    pub control_socket: S<String>,
    pub control_group: S<String>,
    pub command_retention: S<String>,
    pub log_follow_limit: S<String>,
    pub sample_interval: S<String>,
    pub spool_budget: S<String>,
    pub log_dir: S<String>,
    pub log_max_size: S<String>,
    pub log_max_files: S<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCollector {
    pub address: S<String>,
    pub server_name: S<String>,
    pub ca: S<String>,
    pub cert: S<String>,
    pub key: S<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGpu {
    pub source: S<String>,
    pub scenario: S<String>,
    pub nvml_library: S<String>,
    pub kernel_log: S<String>,
    pub dcgm_hostname_label: S<String>,
    pub reset_command: Option<Spanned<Vec<String>>>,
    pub reset_timeout: S<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawComponent {
    pub name: S<String>,
    pub kind: S<String>,
    pub command: S<String>,
    pub args: Option<Vec<String>>,
    pub env: Option<BTreeMap<String, String>>,
    pub working_dir: S<String>,
    pub user: S<String>,
    pub depends_on: Option<Vec<Spanned<String>>>,
    pub priority: S<i64>,
    pub profiles: Option<Vec<Spanned<String>>>,
    pub gpus: Option<Vec<Spanned<i64>>>,
    pub autostart: Option<bool>,
    pub critical: Option<bool>,
    pub revision: S<String>,
    pub stop_signal: S<String>,
    pub stop_grace: S<String>,
    pub memory_budget: S<String>,
    pub vram_budget: S<String>,
    pub vram_policy: S<String>,
    pub recovery_action: Option<Spanned<Vec<String>>>,
    pub give_up_hook: Option<Spanned<Vec<String>>>,
    pub readiness: Option<Spanned<RawProbe>>,
    pub liveness: Option<Spanned<RawProbe>>,
    pub restart: Option<Spanned<RawRestart>>,
    pub give_up: Option<Spanned<RawGiveUp>>,
    pub logs: Option<Spanned<RawLogs>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProbe {
    pub kind: S<String>,
    pub url: S<String>,
    pub address: S<String>,
    pub command: Option<Spanned<Vec<String>>>,
    pub interval: S<String>,
    pub timeout: S<String>,
    pub failure_threshold: S<i64>,
    pub success_threshold: S<i64>,
    pub start_period: S<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRestart {
    pub policy: S<String>,
    pub initial_backoff: S<String>,
    pub max_backoff: S<String>,
    pub multiplier: S<f64>,
    pub jitter: S<f64>,
    pub reset_after: S<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGiveUp {
    pub max_failures: S<i64>,
    pub window: S<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLogs {
    pub dir: S<String>,
    pub max_size: S<String>,
    pub max_files: S<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWatch {
    pub name: S<String>,
    pub match_name: S<String>,
    pub match_cmdline: S<String>,
}
