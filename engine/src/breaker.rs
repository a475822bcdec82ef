//! The circuit breaker: automatic, disruptive actions are counted per scope (the fleet,
//! a GPU model, a component revision, a host label: the host's profile) over a sliding
//! window; a scope that touches more
//! hosts or GPUs than allowed opens, holds every further disruptive action in it and
//! raises one escalation listing them. After a cool-down it is half-open: one held
//! action that no other open scope holds back goes through (the trial); at the next
//! tick it closes (there is no success signal beyond "nothing tripped meanwhile") and
//! what it still holds is re-evaluated against the current view: stale actions are
//! dropped with the reason, never replayed, the rest are judged under the normal
//! limits again. Recovery (returning GPUs, resolving escalations), restarts of
//! applications whose GPU context is already dead, and talking to people are never
//! held.

use std::collections::{BTreeMap, BTreeSet};

use razar_shared::protocol::UnixMillis;
use serde::{Deserialize, Serialize};

use crate::action::Action;
use crate::config::BreakerConfig;
use crate::decision::ScopeState;
use crate::model::{FleetView, GpuHealth, HostState, Rung};

/// A set of hosts and GPUs that automation is limited in.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Scope {
    Fleet,
    GpuModel(String),
    Revision {
        component: String,
        revision: String,
    },
    /// Hosts carrying a label: `key` is `profile` (the role label every agent reports,
    /// the host label Razar has), `value` its value.
    Label {
        key: String,
        value: String,
    },
}

impl Scope {
    pub fn name(&self) -> String {
        match self {
            Scope::Fleet => "fleet".to_owned(),
            Scope::GpuModel(m) => format!("model:{m}"),
            Scope::Revision {
                component,
                revision,
            } => format!("revision:{component}@{revision}"),
            Scope::Label { key, value } => format!("label:{key}={value}"),
        }
    }
}

/// A scope that is not closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    Open { since: UnixMillis },
    HalfOpen { trial_used: bool },
}

/// An action held back, with when it was held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    pub action: Action,
    pub at: UnixMillis,
}

/// A scope's breaker when not closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScopeBreaker {
    pub mode: Mode,
    pub held: Vec<Held>,
}

/// One disruptive action that went through, for counting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Touch {
    pub at: UnixMillis,
    pub host: String,
    pub gpus: Vec<String>,
    pub scopes: Vec<Scope>,
}

/// The breaker's state (part of the [`FleetView`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Breaker {
    /// Scopes not closed; a scope absent here is closed.
    pub scopes: BTreeMap<Scope, ScopeBreaker>,
    pub touches: Vec<Touch>,
}

/// What the breaker says about one action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Held in `scope`; `tripped` when this action opened it (with the reason).
    Hold {
        scope: Scope,
        tripped: Option<String>,
    },
}

/// The GPUs an action touches and its scopes.
fn reach(view: &FleetView, action: &Action) -> (Vec<String>, Vec<Scope>) {
    let Some(host_name) = action.host() else {
        return (Vec::new(), vec![Scope::Fleet]);
    };
    let Some(host) = view.hosts.get(host_name) else {
        return (Vec::new(), vec![Scope::Fleet]);
    };
    let gpus: Vec<String> = match action {
        Action::QuarantineGpu { gpu, .. }
        | Action::ResetGpu { gpu, .. }
        | Action::RequireInspection { gpu, .. }
        | Action::ReturnGpuToService { gpu, .. }
        | Action::DrainComponents { gpu: Some(gpu), .. } => vec![gpu.clone()],
        Action::DrainComponents {
            gpu: None,
            components,
            ..
        }
        | Action::RestartComponents { components, .. } => components
            .iter()
            .filter_map(|c| host.components.get(c))
            .flat_map(|c| c.gpus.iter().cloned())
            .collect(),
        Action::RollBack { component, .. } => host
            .components
            .get(component)
            .map(|c| c.gpus.clone())
            .unwrap_or_default(),
        Action::RequestReboot { .. } => host.gpus.keys().cloned().collect(),
        _ => Vec::new(),
    };
    let mut scopes = BTreeSet::from([Scope::Fleet]);
    if let Some(label) = profile_scope(host) {
        scopes.insert(label);
    }
    for g in &gpus {
        if let Some(gpu) = host.gpus.get(g) {
            scopes.insert(Scope::GpuModel(gpu.model.clone()));
        }
        for (name, c) in &host.components {
            if c.gpus.contains(g) {
                scopes.insert(Scope::Revision {
                    component: name.clone(),
                    revision: c.revision.clone(),
                });
            }
        }
    }
    let named: Vec<&String> = match action {
        Action::RestartComponents { components, .. } => components.iter().collect(),
        Action::RollBack { component, .. } => vec![component],
        _ => Vec::new(),
    };
    for name in named {
        if let Some(c) = host.components.get(name) {
            scopes.insert(Scope::Revision {
                component: name.clone(),
                revision: c.revision.clone(),
            });
        }
    }
    let mut gpus = gpus;
    gpus.sort();
    gpus.dedup();
    (gpus, scopes.into_iter().collect())
}

/// The label scope of a host: its profile, when it has one.
fn profile_scope(host: &crate::model::Host) -> Option<Scope> {
    (!host.profile.is_empty()).then(|| Scope::Label {
        key: "profile".to_owned(),
        value: host.profile.clone(),
    })
}

/// Hosts and GPUs in a scope.
fn population(view: &FleetView, scope: &Scope) -> (usize, usize) {
    let mut hosts = 0;
    let mut gpus = 0;
    for host in view.hosts.values() {
        let n = match scope {
            Scope::Fleet => host.gpus.len(),
            Scope::GpuModel(m) => host.gpus.values().filter(|g| &g.model == m).count(),
            Scope::Revision {
                component,
                revision,
            } => host
                .components
                .get(component)
                .filter(|c| &c.revision == revision)
                .map_or(0, |c| c.gpus.len().max(1)),
            Scope::Label { key, value } => {
                if key == "profile" && &host.profile == value {
                    host.gpus.len()
                } else {
                    0
                }
            }
        };
        let member = match scope {
            Scope::Fleet => true,
            Scope::Label { key, value } => key == "profile" && &host.profile == value,
            _ => n > 0,
        };
        if member {
            hosts += 1;
            gpus += n;
        }
    }
    (hosts, gpus)
}

pub(crate) fn over_share(touched: usize, population: usize, cfg: &BreakerConfig) -> bool {
    let min = usize::try_from(cfg.share_min_population).unwrap_or(usize::MAX);
    let share = usize::try_from(cfg.max_share_percent).unwrap_or(100);
    population >= min && touched.saturating_mul(100) > share.saturating_mul(population)
}

impl Breaker {
    /// Whether every scope is closed.
    pub fn is_closed(&self) -> bool {
        self.scopes.is_empty()
    }

    pub(crate) fn snapshot(&self) -> Vec<ScopeState> {
        self.scopes
            .iter()
            .map(|(scope, b)| ScopeState {
                scope: scope.name(),
                state: match b.mode {
                    Mode::Open { since } => format!("open since {since}"),
                    Mode::HalfOpen { trial_used } => {
                        format!(
                            "half-open (trial {})",
                            if trial_used { "used" } else { "free" }
                        )
                    }
                },
                held: b.held.len(),
            })
            .collect()
    }

    pub(crate) fn prune(&mut self, now: UnixMillis, cfg: &BreakerConfig) {
        let from = now.saturating_sub(cfg.window_ms);
        self.touches.retain(|t| t.at >= from);
    }

    /// Judges one action against the limits, recording it when it passes and holding it
    /// when its scope is (or now becomes) open.
    pub(crate) fn admit(
        &mut self,
        view: &FleetView,
        action: &Action,
        now: UnixMillis,
        cfg: &BreakerConfig,
    ) -> Verdict {
        if !action.is_disruptive() {
            return Verdict::Pass;
        }
        let (gpus, scopes) = reach(view, action);
        let host = action.host().unwrap_or_default().to_owned();
        // An open scope holds; a half-open one lets its one trial through.
        let mut trial: Option<Scope> = None;
        for scope in &scopes {
            match self.scopes.get(scope).map(|b| &b.mode) {
                Some(Mode::Open { .. }) | Some(Mode::HalfOpen { trial_used: true }) => {
                    return self.hold(scope.clone(), action, now, None);
                }
                Some(Mode::HalfOpen { trial_used: false }) => trial = Some(scope.clone()),
                None => {}
            }
        }
        if let Some(scope) = trial {
            if let Some(b) = self.scopes.get_mut(&scope) {
                b.mode = Mode::HalfOpen { trial_used: true };
            }
            self.record(now, host, gpus, scopes);
            return Verdict::Pass;
        }
        for scope in &scopes {
            let mut hosts = BTreeSet::from([host.as_str()]);
            let mut touched_gpus: BTreeSet<&str> = gpus.iter().map(String::as_str).collect();
            for t in self.touches.iter().filter(|t| t.scopes.contains(scope)) {
                hosts.insert(t.host.as_str());
                touched_gpus.extend(t.gpus.iter().map(String::as_str));
            }
            let (pop_hosts, pop_gpus) = population(view, scope);
            let reason = if hosts.len() > usize::try_from(cfg.max_hosts).unwrap_or(usize::MAX) {
                Some(format!(
                    "{} hosts touched within the window (limit {})",
                    hosts.len(),
                    cfg.max_hosts
                ))
            } else if touched_gpus.len() > usize::try_from(cfg.max_gpus).unwrap_or(usize::MAX) {
                Some(format!(
                    "{} GPUs touched within the window (limit {})",
                    touched_gpus.len(),
                    cfg.max_gpus
                ))
            } else if over_share(hosts.len(), pop_hosts, cfg) {
                Some(format!(
                    "{} of {} hosts touched within the window (limit {} %)",
                    hosts.len(),
                    pop_hosts,
                    cfg.max_share_percent
                ))
            } else if over_share(touched_gpus.len(), pop_gpus, cfg) {
                Some(format!(
                    "{} of {} GPUs touched within the window (limit {} %)",
                    touched_gpus.len(),
                    pop_gpus,
                    cfg.max_share_percent
                ))
            } else {
                None
            };
            if let Some(reason) = reason {
                self.scopes.insert(
                    scope.clone(),
                    ScopeBreaker {
                        mode: Mode::Open { since: now },
                        held: Vec::new(),
                    },
                );
                return self.hold(scope.clone(), action, now, Some(reason));
            }
        }
        self.record(now, host, gpus, scopes);
        Verdict::Pass
    }

    /// Whether a scope of `action` other than `except` is open (or half-open with its
    /// trial spent).
    pub(crate) fn open_elsewhere(&self, view: &FleetView, action: &Action, except: &Scope) -> bool {
        let (_, scopes) = reach(view, action);
        scopes.iter().filter(|s| *s != except).any(|s| {
            matches!(
                self.scopes.get(s).map(|b| &b.mode),
                Some(Mode::Open { .. }) | Some(Mode::HalfOpen { trial_used: true })
            )
        })
    }

    /// Counts an action that goes through without being judged (a half-open trial).
    pub(crate) fn count(&mut self, view: &FleetView, action: &Action, now: UnixMillis) {
        if action.is_disruptive() {
            let (gpus, scopes) = reach(view, action);
            let host = action.host().unwrap_or_default().to_owned();
            self.record(now, host, gpus, scopes);
        }
    }

    fn record(&mut self, at: UnixMillis, host: String, gpus: Vec<String>, scopes: Vec<Scope>) {
        self.touches.push(Touch {
            at,
            host,
            gpus,
            scopes,
        });
    }

    fn hold(
        &mut self,
        scope: Scope,
        action: &Action,
        now: UnixMillis,
        tripped: Option<String>,
    ) -> Verdict {
        if let Some(b) = self.scopes.get_mut(&scope) {
            b.held.push(Held {
                action: action.clone(),
                at: now,
            });
        }
        Verdict::Hold { scope, tripped }
    }

    /// The actions held in a scope, described.
    pub(crate) fn held_list(&self, scope: &Scope) -> String {
        self.scopes.get(scope).map_or_else(String::new, |b| {
            b.held
                .iter()
                .map(|h| h.action.describe())
                .collect::<Vec<_>>()
                .join("; ")
        })
    }
}

/// Whether a held action still makes sense in the current view; `Err` says why not.
pub(crate) fn still_valid(view: &FleetView, action: &Action) -> Result<(), String> {
    let host_of = |h: &str| {
        view.hosts
            .get(h)
            .ok_or_else(|| format!("host {h} is no longer in the fleet"))
    };
    match action {
        Action::QuarantineGpu { host, gpu }
        | Action::ResetGpu { host, gpu }
        | Action::DrainComponents {
            host,
            gpu: Some(gpu),
            ..
        } => {
            let h = host_of(host)?;
            if let HostState::Lost { .. } = h.state {
                return Err(format!("host {host} is lost"));
            }
            match h.gpus.get(gpu).map(|g| g.health) {
                Some(GpuHealth::Quarantined { .. }) => Ok(()),
                Some(GpuHealth::Inspection { .. })
                    if !matches!(action, Action::ResetGpu { .. }) =>
                {
                    Ok(())
                }
                Some(other) => Err(format!("{host}/{gpu} is now {other:?}")),
                None => Err(format!("{host}/{gpu} is no longer known")),
            }
        }
        Action::RequestReboot { host } => {
            let h = host_of(host)?;
            if h.gpus.values().any(|g| {
                matches!(
                    g.health,
                    GpuHealth::Quarantined {
                        rung: Rung::Reboot,
                        ..
                    }
                )
            }) {
                Ok(())
            } else {
                Err(format!("no GPU of {host} waits for a reboot any more"))
            }
        }
        Action::RollBack {
            host,
            component,
            to_revision,
        } => {
            let h = host_of(host)?;
            match h.components.get(component) {
                Some(c) if &c.revision != to_revision => Ok(()),
                Some(_) => Err(format!("{host}/{component} already runs {to_revision}")),
                None => Err(format!("{host}/{component} is gone")),
            }
        }
        Action::RestartComponents { .. } | Action::DrainComponents { gpu: None, .. } => Err(
            "a restart or drain for a past failure is stale once held past the cool-down"
                .to_owned(),
        ),
        _ => Ok(()),
    }
}
