//! The deployment wave machine (pure): a new revision of one component rolled out to a
//! set of hosts: canaries first, then waves of at most `max_parallel` hosts; a host
//! counts as done once it has run the new revision for `min_healthy_ms` without a
//! failure, and fails if that has not happened within `healthy_deadline_ms` of its
//! update. A failure stops the rollout (failed), or, with `auto_revert`, reverts every
//! host that got the new revision, without canaries: the failed hosts first, then the
//! others in rollout order, at most `max_parallel` at a time, the next one only once a
//! reverting host runs the old revision again (a healthy instance is never stopped while
//! `max_parallel` reverts are still coming up). Canaries can wait for a manual promote.
//! Operators (and the engine's `PauseDeployment`) pause and resume; a pause holds new
//! updates, never a revert.

use std::collections::BTreeMap;

use razar_shared::protocol::UnixMillis;
use serde::{Deserialize, Serialize};

/// How a rollout proceeds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaveConfig {
    /// How many of the hosts (first in order) are canaries.
    pub canaries: u32,
    /// At most this many hosts updating at once.
    pub max_parallel: u32,
    /// A host is done after running the new revision this long without failing.
    pub min_healthy_ms: i64,
    /// A host not done this long after its update failed.
    pub healthy_deadline_ms: i64,
    /// Revert every updated host on a failure (else the rollout stops, failed).
    pub auto_revert: bool,
    /// Wait for [`DeployInput::Promote`] after the canaries.
    pub manual_promote: bool,
}

/// Why a rollout cannot be created or cannot take an input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeployError {
    /// The configuration is inconsistent.
    #[error("invalid wave configuration: {0}")]
    Config(String),
    /// The input names a host that is not part of the rollout.
    #[error("host {0} is not part of this rollout")]
    UnknownHost(String),
    /// The input does not apply in the current phase.
    #[error("{input} does not apply while the rollout is {phase:?}")]
    Phase { input: &'static str, phase: Phase },
}

/// The rollout as a whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Canary,
    AwaitingPromotion,
    Rolling,
    Succeeded,
    /// Stopped on a failure (no auto-revert).
    Failed,
    Reverting,
    Reverted,
}

/// One host of the rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostPhase {
    Pending,
    /// Asked to run the new revision at `since`.
    Updating {
        since: UnixMillis,
    },
    /// Runs the new revision since `running` (asked at `since`).
    Running {
        since: UnixMillis,
        running: UnixMillis,
    },
    Done,
    Failed,
    Reverting,
    Reverted,
    /// To be reverted when a revert slot frees up (appended: stored rollouts decode).
    AwaitingRevert,
}

/// What happened to the rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeployInput {
    /// The host runs the new revision.
    HostStarted {
        host: String,
    },
    /// The component failed on the host (crash loop, liveness, gave up...).
    HostFailed {
        host: String,
        reason: String,
    },
    /// The host runs the old revision again.
    HostReverted {
        host: String,
    },
    Promote,
    Pause,
    Resume,
    Tick,
}

/// What the collector is to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeployAction {
    Update {
        host: String,
        revision: String,
    },
    Revert {
        host: String,
        revision: String,
    },
    /// The rollout entered a new phase (for the record and the dashboard).
    Phase(Phase),
}

/// A rollout of `component` from `from` to `to` over `hosts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    pub component: String,
    pub from: String,
    pub to: String,
    pub config: WaveConfig,
    /// In rollout order; the first `config.canaries` are the canaries.
    pub order: Vec<String>,
    pub hosts: BTreeMap<String, HostPhase>,
    pub phase: Phase,
    pub paused: bool,
    /// The hosts to revert, in the order their reverts go out (failed hosts first).
    #[serde(default)]
    pub revert_order: Vec<String>,
}

impl Rollout {
    /// Starts a rollout: the canaries (as many as `max_parallel` allows) are updated.
    pub fn start(
        component: &str,
        from: &str,
        to: &str,
        hosts: Vec<String>,
        config: WaveConfig,
        now: UnixMillis,
    ) -> Result<(Rollout, Vec<DeployAction>), DeployError> {
        let canaries = usize::try_from(config.canaries).unwrap_or(usize::MAX);
        let problem = if hosts.is_empty() {
            Some("no hosts".to_owned())
        } else if config.max_parallel == 0 {
            Some("max_parallel must be >= 1".to_owned())
        } else if canaries > hosts.len() {
            Some(format!("{canaries} canaries for {} hosts", hosts.len()))
        } else if config.min_healthy_ms <= 0 || config.healthy_deadline_ms <= config.min_healthy_ms
        {
            Some("need 0 < min_healthy_ms < healthy_deadline_ms".to_owned())
        } else {
            let mut sorted = hosts.clone();
            sorted.sort();
            sorted.dedup();
            (sorted.len() != hosts.len()).then(|| "a host is listed twice".to_owned())
        };
        if let Some(p) = problem {
            return Err(DeployError::Config(p));
        }
        let mut rollout = Rollout {
            component: component.to_owned(),
            from: from.to_owned(),
            to: to.to_owned(),
            hosts: hosts
                .iter()
                .map(|h| (h.clone(), HostPhase::Pending))
                .collect(),
            order: hosts,
            phase: if canaries > 0 {
                Phase::Canary
            } else {
                Phase::Rolling
            },
            config,
            paused: false,
            revert_order: Vec::new(),
        };
        let mut actions = vec![DeployAction::Phase(rollout.phase.clone())];
        actions.extend(rollout.advance(now));
        Ok((rollout, actions))
    }

    /// Takes one input at `now`.
    pub fn step(
        &mut self,
        input: &DeployInput,
        now: UnixMillis,
    ) -> Result<Vec<DeployAction>, DeployError> {
        let mut actions = Vec::new();
        match input {
            DeployInput::HostStarted { host } => {
                if let HostPhase::Updating { since } = *self.host(host)? {
                    self.hosts.insert(
                        host.clone(),
                        HostPhase::Running {
                            since,
                            running: now,
                        },
                    );
                }
            }
            DeployInput::HostFailed { host, .. } => {
                if matches!(
                    self.host(host)?,
                    HostPhase::Updating { .. } | HostPhase::Running { .. } | HostPhase::Done
                ) {
                    self.hosts.insert(host.clone(), HostPhase::Failed);
                    actions.extend(self.fail());
                }
            }
            DeployInput::HostReverted { host } => {
                if *self.host(host)? == HostPhase::Reverting {
                    self.hosts.insert(host.clone(), HostPhase::Reverted);
                }
            }
            DeployInput::Promote => {
                if self.phase != Phase::AwaitingPromotion {
                    return Err(DeployError::Phase {
                        input: "promote",
                        phase: self.phase.clone(),
                    });
                }
                actions.extend(self.enter(Phase::Rolling));
            }
            DeployInput::Pause => self.paused = true,
            DeployInput::Resume => self.paused = false,
            DeployInput::Tick => {
                let deadline = self.config.healthy_deadline_ms;
                let min = self.config.min_healthy_ms;
                let mut late = false;
                for phase in self.hosts.values_mut() {
                    match *phase {
                        HostPhase::Running { running, .. }
                            if now.saturating_sub(running) >= min =>
                        {
                            *phase = HostPhase::Done;
                        }
                        HostPhase::Updating { since } | HostPhase::Running { since, .. }
                            if now.saturating_sub(since) >= deadline =>
                        {
                            *phase = HostPhase::Failed;
                            late = true;
                        }
                        _ => {}
                    }
                }
                if late {
                    actions.extend(self.fail());
                }
            }
        }
        actions.extend(self.advance(now));
        Ok(actions)
    }

    fn host(&self, host: &str) -> Result<&HostPhase, DeployError> {
        self.hosts
            .get(host)
            .ok_or_else(|| DeployError::UnknownHost(host.to_owned()))
    }

    fn enter(&mut self, phase: Phase) -> Vec<DeployAction> {
        if self.phase == phase {
            return Vec::new();
        }
        self.phase = phase.clone();
        vec![DeployAction::Phase(phase)]
    }

    /// A host failed: revert every host that got the new revision, or stop.
    fn fail(&mut self) -> Vec<DeployAction> {
        if matches!(
            self.phase,
            Phase::Reverting | Phase::Reverted | Phase::Failed
        ) {
            return Vec::new();
        }
        if !self.config.auto_revert {
            return self.enter(Phase::Failed);
        }
        self.revert()
    }

    /// Reverts every host that got the new revision (an operator's roll back, also
    /// after a failure without auto-revert); the reverts go out with the next step's
    /// [`Rollout::step`] (`Tick`), `max_parallel` at a time, failed hosts first.
    pub fn revert(&mut self) -> Vec<DeployAction> {
        if matches!(self.phase, Phase::Reverting | Phase::Reverted) {
            return Vec::new();
        }
        let actions = self.enter(Phase::Reverting);
        let failed = |p: &HostPhase| *p == HostPhase::Failed;
        let (first, rest): (Vec<&String>, Vec<&String>) = self
            .order
            .iter()
            .filter(|h| self.hosts.get(*h).is_some_and(|p| *p != HostPhase::Pending))
            .partition(|h| self.hosts.get(*h).is_some_and(failed));
        self.revert_order = first.into_iter().chain(rest).cloned().collect();
        for host in &self.revert_order {
            if let Some(phase) = self.hosts.get_mut(host) {
                *phase = HostPhase::AwaitingRevert;
            }
        }
        // The reverts go out from `advance`, `max_parallel` at a time.
        actions
    }

    /// Sends reverts while fewer than `max_parallel` hosts are reverting.
    fn revert_next(&mut self) -> Vec<DeployAction> {
        let max = usize::try_from(self.config.max_parallel).unwrap_or(usize::MAX);
        let mut busy = self
            .hosts
            .values()
            .filter(|p| **p == HostPhase::Reverting)
            .count();
        let mut actions = Vec::new();
        for host in &self.revert_order {
            if busy >= max {
                break;
            }
            if let Some(phase) = self.hosts.get_mut(host) {
                if *phase == HostPhase::AwaitingRevert {
                    *phase = HostPhase::Reverting;
                    busy += 1;
                    actions.push(DeployAction::Revert {
                        host: host.clone(),
                        revision: self.from.clone(),
                    });
                }
            }
        }
        actions
    }

    /// Moves the rollout on: phase changes and new host updates.
    fn advance(&mut self, now: UnixMillis) -> Vec<DeployAction> {
        let mut actions = Vec::new();
        let canaries = usize::try_from(self.config.canaries).unwrap_or(usize::MAX);
        let all = |r: &Rollout, range: &[String], want: fn(&HostPhase) -> bool| {
            range.iter().all(|h| r.hosts.get(h).is_some_and(want))
        };
        match self.phase {
            Phase::Canary if all(self, &self.order[..canaries], |p| *p == HostPhase::Done) => {
                actions.extend(self.enter(if self.config.manual_promote {
                    Phase::AwaitingPromotion
                } else {
                    Phase::Rolling
                }));
            }
            Phase::Reverting
                if all(self, &self.order, |p| {
                    matches!(p, HostPhase::Pending | HostPhase::Reverted)
                }) =>
            {
                actions.extend(self.enter(Phase::Reverted));
            }
            _ => {}
        }
        if self.phase == Phase::Rolling && all(self, &self.order, |p| *p == HostPhase::Done) {
            actions.extend(self.enter(Phase::Succeeded));
        }
        if self.phase == Phase::Reverting {
            actions.extend(self.revert_next());
        }
        let eligible = match self.phase {
            Phase::Canary => canaries,
            Phase::Rolling => self.order.len(),
            _ => 0,
        };
        if self.paused {
            return actions;
        }
        let max = usize::try_from(self.config.max_parallel).unwrap_or(usize::MAX);
        let mut busy = self
            .hosts
            .values()
            .filter(|p| matches!(p, HostPhase::Updating { .. } | HostPhase::Running { .. }))
            .count();
        for host in self.order.iter().take(eligible) {
            if busy >= max {
                break;
            }
            if let Some(phase) = self.hosts.get_mut(host) {
                if *phase == HostPhase::Pending {
                    *phase = HostPhase::Updating { since: now };
                    busy += 1;
                    actions.push(DeployAction::Update {
                        host: host.clone(),
                        revision: self.to.clone(),
                    });
                }
            }
        }
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> WaveConfig {
        WaveConfig {
            canaries: 1,
            max_parallel: 2,
            min_healthy_ms: 100,
            healthy_deadline_ms: 1_000,
            auto_revert: true,
            manual_promote: false,
        }
    }

    fn hosts(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("h{i}")).collect()
    }

    fn up(h: &str) -> DeployAction {
        DeployAction::Update {
            host: h.into(),
            revision: "v2".into(),
        }
    }

    fn down(h: &str) -> DeployAction {
        DeployAction::Revert {
            host: h.into(),
            revision: "v1".into(),
        }
    }

    fn started(h: &str) -> DeployInput {
        DeployInput::HostStarted { host: h.into() }
    }

    /// Starts a rollout and checks each step's actions.
    fn check(
        config: WaveConfig,
        n: usize,
        first: Vec<DeployAction>,
        steps: Vec<(UnixMillis, DeployInput, Vec<DeployAction>)>,
    ) -> Rollout {
        let (mut r, actions) = Rollout::start("llm", "v1", "v2", hosts(n), config, 0).unwrap();
        assert_eq!(actions, first);
        for (i, (now, input, want)) in steps.into_iter().enumerate() {
            let got = r.step(&input, now).unwrap();
            assert_eq!(got, want, "step {i} at {now}: {input:?}\n{r:#?}");
        }
        r
    }

    #[test]
    fn canary_then_waves_of_max_parallel() {
        let r = check(
            config(),
            4,
            vec![DeployAction::Phase(Phase::Canary), up("h1")],
            vec![
                (10, started("h1"), vec![]),
                (109, DeployInput::Tick, vec![]),
                (
                    110,
                    DeployInput::Tick,
                    vec![DeployAction::Phase(Phase::Rolling), up("h2"), up("h3")],
                ),
                (120, started("h2"), vec![]),
                (130, started("h3"), vec![]),
                (220, DeployInput::Tick, vec![up("h4")]),
                (230, DeployInput::Tick, vec![]),
                (240, started("h4"), vec![]),
                (
                    340,
                    DeployInput::Tick,
                    vec![DeployAction::Phase(Phase::Succeeded)],
                ),
            ],
        );
        assert!(r.hosts.values().all(|p| *p == HostPhase::Done));
    }

    #[test]
    fn manual_promote_pause_and_resume() {
        let cfg = WaveConfig {
            manual_promote: true,
            ..config()
        };
        let (mut r, _) = Rollout::start("llm", "v1", "v2", hosts(3), cfg, 0).unwrap();
        assert!(matches!(
            r.step(&DeployInput::Promote, 1),
            Err(DeployError::Phase { .. })
        ));
        r.step(&started("h1"), 1).unwrap();
        assert_eq!(
            r.step(&DeployInput::Tick, 101).unwrap(),
            vec![DeployAction::Phase(Phase::AwaitingPromotion)]
        );
        r.step(&DeployInput::Pause, 102).unwrap();
        assert_eq!(
            r.step(&DeployInput::Promote, 103).unwrap(),
            vec![DeployAction::Phase(Phase::Rolling)]
        );
        assert_eq!(
            r.step(&DeployInput::Resume, 104).unwrap(),
            vec![up("h2"), up("h3")]
        );
    }

    #[test]
    fn a_failure_reverts_every_updated_host_without_canaries() {
        check(
            WaveConfig {
                canaries: 0,
                ..config()
            },
            3,
            vec![DeployAction::Phase(Phase::Rolling), up("h1"), up("h2")],
            vec![
                (10, started("h1"), vec![]),
                (
                    20,
                    DeployInput::HostFailed {
                        host: "h2".into(),
                        reason: "crash loop".into(),
                    },
                    vec![
                        DeployAction::Phase(Phase::Reverting),
                        down("h2"),
                        down("h1"),
                    ],
                ),
                (30, DeployInput::HostReverted { host: "h1".into() }, vec![]),
                (
                    40,
                    DeployInput::HostReverted { host: "h2".into() },
                    vec![DeployAction::Phase(Phase::Reverted)],
                ),
                // h3 never got it; nothing more happens.
                (50, DeployInput::Tick, vec![]),
            ],
        );
    }

    #[test]
    fn a_revert_goes_failed_first_max_parallel_at_a_time_and_ignores_a_pause() {
        let failed = |h: &str| DeployInput::HostFailed {
            host: h.into(),
            reason: "crash loop".into(),
        };
        let reverted = |h: &str| DeployInput::HostReverted { host: h.into() };
        let r = check(
            WaveConfig {
                canaries: 0,
                ..config()
            },
            4,
            vec![DeployAction::Phase(Phase::Rolling), up("h1"), up("h2")],
            vec![
                (10, started("h1"), vec![]),
                (110, DeployInput::Tick, vec![up("h3")]),
                (120, DeployInput::Pause, vec![]),
                // h3 fails: it goes first, then h1 (healthy) only with a free slot.
                (
                    130,
                    failed("h3"),
                    vec![
                        DeployAction::Phase(Phase::Reverting),
                        down("h3"),
                        down("h1"),
                    ],
                ),
                (140, DeployInput::Tick, vec![]),
                (150, reverted("h3"), vec![down("h2")]),
                (160, reverted("h1"), vec![]),
                (
                    170,
                    reverted("h2"),
                    vec![DeployAction::Phase(Phase::Reverted)],
                ),
            ],
        );
        assert_eq!(
            r.hosts.get("h4"),
            Some(&HostPhase::Pending),
            "never touched"
        );
    }

    #[test]
    fn a_host_not_healthy_by_its_deadline_fails_the_rollout() {
        check(
            WaveConfig {
                auto_revert: false,
                ..config()
            },
            2,
            vec![DeployAction::Phase(Phase::Canary), up("h1")],
            vec![
                (999, DeployInput::Tick, vec![]),
                (
                    1_000,
                    DeployInput::Tick,
                    vec![DeployAction::Phase(Phase::Failed)],
                ),
                (2_000, started("h1"), vec![]),
                (3_000, DeployInput::Tick, vec![]),
            ],
        );
    }

    #[test]
    fn bad_configurations_are_refused() {
        let bad = [
            WaveConfig {
                max_parallel: 0,
                ..config()
            },
            WaveConfig {
                canaries: 5,
                ..config()
            },
            WaveConfig {
                min_healthy_ms: 1_000,
                ..config()
            },
        ];
        for cfg in bad {
            assert!(matches!(
                Rollout::start("c", "v1", "v2", hosts(3), cfg, 0),
                Err(DeployError::Config(_))
            ));
        }
        assert!(
            Rollout::start("c", "v1", "v2", vec!["a".into(), "a".into()], config(), 0).is_err()
        );
        let (mut r, _) = Rollout::start("c", "v1", "v2", hosts(1), config(), 0).unwrap();
        assert_eq!(
            r.step(&started("nope"), 1),
            Err(DeployError::UnknownHost("nope".into()))
        );
    }
}
