//! Domain vocabulary shared by agent, collector and protocol: host ids, component
//! states, severities and GPU fault classes.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Lifecycle state of a supervised component (see DESIGN.md "States").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ComponentState {
    /// Configured, waiting for its dependencies or its turn.
    Pending,
    /// Process spawned, readiness not yet proven.
    Starting,
    /// Readiness probe passes (or no probe and the process is up).
    Ready,
    /// Liveness probe failing while the process still runs.
    Unhealthy,
    /// Process exited or was killed; waiting out the restart delay.
    Backoff,
    /// Gave up after too many failures; only an explicit resolve restarts it.
    Quarantined,
    /// Stop signal sent, waiting for the process tree to exit.
    Stopping,
    /// Not running, and not meant to run until commanded.
    Stopped,
}

impl ComponentState {
    /// Stable lower-case name used in APIs, metrics and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            ComponentState::Pending => "pending",
            ComponentState::Starting => "starting",
            ComponentState::Ready => "ready",
            ComponentState::Unhealthy => "unhealthy",
            ComponentState::Backoff => "backoff",
            ComponentState::Quarantined => "quarantined",
            ComponentState::Stopping => "stopping",
            ComponentState::Stopped => "stopped",
        }
    }

    /// Every state, in lifecycle order.
    pub const ALL: [ComponentState; 8] = [
        ComponentState::Pending,
        ComponentState::Starting,
        ComponentState::Ready,
        ComponentState::Unhealthy,
        ComponentState::Backoff,
        ComponentState::Quarantined,
        ComponentState::Stopping,
        ComponentState::Stopped,
    ];
}

impl fmt::Display for ComponentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How urgent an event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// What an XID calls for, after NVIDIA's XID catalog resolution buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum XidClass {
    /// Application error: restart the application (13, 31, 94).
    RestartApplication,
    /// Informational, no action (43, 63, 92).
    Ignore,
    /// Follows another error; act on that one (45).
    FollowsOtherError,
    /// Stop every process on the GPU, then reset it (48, 62, 64, 95, 119, 120).
    ResetGpu,
    /// Report to the operator (61).
    Report,
    /// NVLink error (74).
    NvLink,
    /// GPU fell off the bus: reboot the host (79).
    RebootHost,
    /// Recovery action changed: follow the linked XID (154).
    FollowRecoveryAction,
    /// Not in our table: reported as unknown, never dropped.
    Unknown,
}

impl XidClass {
    pub fn as_str(self) -> &'static str {
        match self {
            XidClass::RestartApplication => "restart_application",
            XidClass::Ignore => "ignore",
            XidClass::FollowsOtherError => "follows_other_error",
            XidClass::ResetGpu => "reset_gpu",
            XidClass::Report => "report",
            XidClass::NvLink => "nvlink",
            XidClass::RebootHost => "reboot_host",
            XidClass::FollowRecoveryAction => "follow_recovery_action",
            XidClass::Unknown => "unknown",
        }
    }
}

/// Where a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LogStream {
    Stdout,
    Stderr,
}

/// How a GPU command (`DrainGpu`, `ResetGpu`, `SetGpuHealth`) names its GPU: a decimal
/// index (`"3"`) or anything else, taken as the GPU's UUID (`"GPU-…"`). The agent and the
/// collector resolve it with this same rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuRef {
    Index(u32),
    Uuid(String),
}

impl GpuRef {
    /// Parses a command's `gpu` text: all ASCII digits (and fits `u32`) is an index,
    /// anything else non-empty a UUID. `None` for an empty or blank text.
    pub fn parse(text: &str) -> Option<GpuRef> {
        let text = text.trim();
        if text.is_empty() {
            return None;
        }
        if text.bytes().all(|b| b.is_ascii_digit()) {
            return text.parse().ok().map(GpuRef::Index);
        }
        Some(GpuRef::Uuid(text.to_owned()))
    }

    /// Whether a GPU with this index and UUID is the one named (UUIDs compare without
    /// regard to ASCII case).
    pub fn matches(&self, index: u32, uuid: &str) -> bool {
        match self {
            GpuRef::Index(i) => *i == index,
            GpuRef::Uuid(u) => u.eq_ignore_ascii_case(uuid),
        }
    }
}

#[cfg(test)]
mod gpu_ref_tests {
    use super::GpuRef;

    #[test]
    fn a_gpu_is_named_by_decimal_index_or_uuid() {
        assert_eq!(GpuRef::parse("3"), Some(GpuRef::Index(3)));
        assert_eq!(GpuRef::parse(" 0 "), Some(GpuRef::Index(0)));
        assert_eq!(
            GpuRef::parse("GPU-abc"),
            Some(GpuRef::Uuid("GPU-abc".into()))
        );
        assert_eq!(GpuRef::parse(""), None);
        assert_eq!(GpuRef::parse("  "), None);
        // Digits too large for an index: refused, not taken as a UUID.
        assert_eq!(GpuRef::parse("99999999999"), None);
        assert!(GpuRef::parse("gpu-ABC").is_some_and(|g| g.matches(1, "GPU-abc")));
        assert!(!GpuRef::Index(1).matches(2, "GPU-abc"));
    }
}
