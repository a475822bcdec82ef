//! The engine's tunables, validated once ([`EngineConfig::validate`]) before the first
//! decision; every problem is reported at once.

use serde::{Deserialize, Serialize};

/// Everything the rules are allowed to vary. Durations are milliseconds (the engine's
/// clock is a plain [`UnixMillis`](razar_shared::protocol::UnixMillis)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineConfig {
    /// How far back XIDs on one GPU are related (13/31 repetition, 48 with 63/64, 45
    /// after another XID).
    pub xid_window_ms: i64,
    /// XID 13/31 seen this many times on one GPU within the window: hardware path.
    pub xid_repeat_threshold: u32,
    /// How long a GPU stays in probation without a fault before it returns to service.
    pub probation_ms: i64,
    /// Quarantine cycles of one GPU (counted until an operator clears it) after which
    /// it goes to hardware inspection: a lemon.
    pub lemon_cycles: u32,
    /// How far back failures count for blame.
    pub blame_window_ms: i64,
    /// Distinct GPUs/hosts that must show a failure on a new revision before it is
    /// blamed (1 for a canary).
    pub blame_min_places: u32,
    /// An open, unacknowledged escalation is re-notified one level higher after this.
    pub renotify_after_ms: i64,
    /// The circuit breaker.
    pub breaker: BreakerConfig,
}

/// Limits on automatic, disruptive actions per scope (fleet, GPU model, revision).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakerConfig {
    /// The sliding window over which touched hosts and GPUs are counted.
    pub window_ms: i64,
    /// At most this many distinct hosts touched per scope in the window.
    pub max_hosts: u32,
    /// At most this many distinct GPUs touched per scope in the window.
    pub max_gpus: u32,
    /// At most this percentage of a scope's hosts (or GPUs) touched in the window...
    pub max_share_percent: u32,
    /// ...once the scope has at least this many hosts (or GPUs); smaller scopes are
    /// limited by the counts only.
    pub share_min_population: u32,
    /// An open scope becomes half-open after this long.
    pub cooldown_ms: i64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            xid_window_ms: 10 * 60_000,
            xid_repeat_threshold: 3,
            probation_ms: 30 * 60_000,
            lemon_cycles: 3,
            blame_window_ms: 60 * 60_000,
            blame_min_places: 2,
            renotify_after_ms: 30 * 60_000,
            breaker: BreakerConfig::default(),
        }
    }
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            window_ms: 10 * 60_000,
            max_hosts: 5,
            max_gpus: 16,
            max_share_percent: 10,
            share_min_population: 20,
            cooldown_ms: 15 * 60_000,
        }
    }
}

/// One invalid setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigProblem {
    /// A duration that must be positive is not.
    #[error("{key} must be > 0 ms, got {value}")]
    NotPositive { key: &'static str, value: i64 },
    /// A count that must be at least one is zero.
    #[error("{key} must be >= 1")]
    Zero { key: &'static str },
    /// A percentage outside 1..=100.
    #[error("{key} must be within 1..=100, got {value}")]
    Percent { key: &'static str, value: u32 },
}

/// Every problem of a configuration, reported at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid engine configuration: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct ConfigError(pub Vec<ConfigProblem>);

impl EngineConfig {
    /// Checks every setting; all problems at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let durations = [
            ("xid_window_ms", self.xid_window_ms),
            ("probation_ms", self.probation_ms),
            ("blame_window_ms", self.blame_window_ms),
            ("renotify_after_ms", self.renotify_after_ms),
            ("breaker.window_ms", self.breaker.window_ms),
            ("breaker.cooldown_ms", self.breaker.cooldown_ms),
        ];
        for (key, value) in durations {
            if value <= 0 {
                problems.push(ConfigProblem::NotPositive { key, value });
            }
        }
        let counts = [
            ("xid_repeat_threshold", self.xid_repeat_threshold),
            ("lemon_cycles", self.lemon_cycles),
            ("blame_min_places", self.blame_min_places),
            ("breaker.max_hosts", self.breaker.max_hosts),
            ("breaker.max_gpus", self.breaker.max_gpus),
        ];
        for (key, value) in counts {
            if value == 0 {
                problems.push(ConfigProblem::Zero { key });
            }
        }
        let share = self.breaker.max_share_percent;
        if !(1..=100).contains(&share) {
            problems.push(ConfigProblem::Percent {
                key: "breaker.max_share_percent",
                value: share,
            });
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(problems))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        assert_eq!(EngineConfig::default().validate(), Ok(()));
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let c = EngineConfig {
            probation_ms: 0,
            blame_min_places: 0,
            breaker: BreakerConfig {
                max_share_percent: 101,
                ..BreakerConfig::default()
            },
            ..EngineConfig::default()
        };
        let err = c.validate().unwrap_err();
        assert_eq!(err.0.len(), 3, "{err}");
        assert!(err.to_string().contains("probation_ms"), "{err}");
        assert!(err.to_string().contains("blame_min_places"), "{err}");
    }
}
