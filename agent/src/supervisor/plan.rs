//! The start planner: which components may start now, what the others wait for, and
//! which may stop now during a shutdown (everything depending on them is down). Pure
//! functions.
//!
//! The start rule: a `pending` component starts once every dependency is `ready` and
//! no other pending component whose dependencies are ready has a lower `priority`
//! number. So among components free to start, lower numbers are *started* (spawned)
//! first; those of equal number start together; a higher number waits only for the
//! lower ones to be started, not to be ready (that is what `depends_on` is for).

use crate::config::{ComponentName, ComponentSpec};
use razar_shared::domain::ComponentState;
use std::collections::{BTreeMap, BTreeSet};

/// Topological order by `depends_on`, ties broken by `priority` (lower first) then name.
/// Dependencies outside `specs` (other profiles) are ignored; cycles are refused by
/// config validation, and any left over are appended in priority order.
pub fn start_order(specs: &[&ComponentSpec]) -> Vec<ComponentName> {
    let names: BTreeSet<&ComponentName> = specs.iter().map(|s| &s.name).collect();
    let mut waiting: BTreeMap<&ComponentName, usize> = specs
        .iter()
        .map(|s| {
            (
                &s.name,
                s.depends_on
                    .iter()
                    .filter(|d| names.contains(d) && **d != s.name)
                    .count(),
            )
        })
        .collect();
    let key = |s: &&ComponentSpec| (s.priority, s.name.clone());
    let mut ready: BTreeSet<(i32, ComponentName)> = specs
        .iter()
        .filter(|s| waiting.get(&s.name) == Some(&0))
        .map(key)
        .collect();
    let mut order = Vec::with_capacity(specs.len());
    while let Some(next) = ready.pop_first() {
        let name = next.1;
        for s in specs
            .iter()
            .filter(|s| s.depends_on.contains(&name) && s.name != name)
        {
            if let Some(n) = waiting.get_mut(&s.name) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    ready.insert(key(s));
                }
            }
        }
        waiting.remove(&name);
        order.push(name);
    }
    let mut rest: Vec<&&ComponentSpec> = specs
        .iter()
        .filter(|s| waiting.contains_key(&s.name))
        .collect();
    rest.sort_by_key(|s| key(s));
    order.extend(rest.into_iter().map(|s| s.name.clone()));
    order
}

/// Pending components whose dependencies are all ready. A component whose state is
/// not known yet (its task has not reported) counts as pending: it may be about to start.
fn free_to_start<'a>(
    specs: &[&'a ComponentSpec],
    states: &BTreeMap<ComponentName, ComponentState>,
) -> Vec<&'a ComponentSpec> {
    specs
        .iter()
        .copied()
        .filter(|s| {
            states
                .get(&s.name)
                .is_none_or(|st| *st == ComponentState::Pending)
        })
        .filter(|s| dependencies_ready(s, specs, states))
        .collect()
}

/// Components that may start now, in start order: pending, every dependency ready, and
/// no other such component with a lower priority number (see the module docs).
pub fn startable(
    specs: &[&ComponentSpec],
    states: &BTreeMap<ComponentName, ComponentState>,
) -> Vec<ComponentName> {
    let free = free_to_start(specs, states);
    let Some(lowest) = free.iter().map(|s| s.priority).min() else {
        return Vec::new();
    };
    start_order(specs)
        .into_iter()
        .filter(|name| states.get(name) == Some(&ComponentState::Pending))
        .filter(|name| free.iter().any(|s| &s.name == name && s.priority == lowest))
        .collect()
}

/// What a pending component waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wait {
    /// Dependencies not ready yet, with their state (`None`: not reported yet).
    Dependencies(Vec<(ComponentName, Option<ComponentState>)>),
    /// Components free to start with a lower priority number, started first.
    Priority(Vec<ComponentName>),
}

/// What each pending component that cannot start now waits for.
pub fn waiting(
    specs: &[&ComponentSpec],
    states: &BTreeMap<ComponentName, ComponentState>,
) -> BTreeMap<ComponentName, Wait> {
    let free = free_to_start(specs, states);
    let lowest = free.iter().map(|s| s.priority).min();
    let mut out = BTreeMap::new();
    for spec in specs {
        if states.get(&spec.name) != Some(&ComponentState::Pending) {
            continue;
        }
        let unready: Vec<(ComponentName, Option<ComponentState>)> = spec
            .depends_on
            .iter()
            .filter(|d| specs.iter().any(|s| &s.name == *d))
            .filter(|d| states.get(d) != Some(&ComponentState::Ready))
            .map(|d| (d.clone(), states.get(d).copied()))
            .collect();
        if !unready.is_empty() {
            out.insert(spec.name.clone(), Wait::Dependencies(unready));
        } else if lowest.is_some_and(|l| spec.priority > l) {
            let first = free
                .iter()
                .filter(|s| s.priority < spec.priority)
                .map(|s| s.name.clone())
                .collect();
            out.insert(spec.name.clone(), Wait::Priority(first));
        }
    }
    out
}

/// Whether every dependency of `spec` (within `specs`) is ready.
pub fn dependencies_ready(
    spec: &ComponentSpec,
    specs: &[&ComponentSpec],
    states: &BTreeMap<ComponentName, ComponentState>,
) -> bool {
    spec.depends_on
        .iter()
        .filter(|d| specs.iter().any(|s| &s.name == *d))
        .all(|d| states.get(d) == Some(&ComponentState::Ready))
}

/// Whether a component in `state` has (or may have) a process.
pub fn is_down(state: ComponentState) -> bool {
    matches!(
        state,
        ComponentState::Stopped
            | ComponentState::Quarantined
            | ComponentState::Pending
            | ComponentState::Backoff
    )
}

/// During a shutdown: components still up whose dependents are all down, in reverse start order.
pub fn stoppable(
    specs: &[&ComponentSpec],
    states: &BTreeMap<ComponentName, ComponentState>,
) -> Vec<ComponentName> {
    let mut order = start_order(specs);
    order.reverse();
    order
        .into_iter()
        .filter(|name| states.get(name).is_some_and(|s| !is_down(*s)))
        .filter(|name| {
            specs
                .iter()
                .filter(|s| s.depends_on.contains(name))
                .all(|s| states.get(&s.name).is_none_or(|st| is_down(*st)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn specs(text: &str) -> Vec<ComponentSpec> {
        Config::parse(Path::new("t.toml"), text.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"))
            .components
    }

    fn names(v: &[ComponentName]) -> Vec<&str> {
        v.iter().map(|n| n.as_str()).collect()
    }

    const FLEET: &str = "
[[component]]
name = \"gateway\"
command = \"x\"
depends_on = [\"model\", \"cache\"]
[[component]]
name = \"model\"
command = \"x\"
depends_on = [\"db\"]
priority = 5
[[component]]
name = \"cache\"
command = \"x\"
priority = 1
[[component]]
name = \"db\"
command = \"x\"
priority = 0
";

    #[test]
    fn topological_then_priority() {
        let all = specs(FLEET);
        let refs: Vec<&ComponentSpec> = all.iter().collect();
        assert_eq!(
            names(&start_order(&refs)),
            ["db", "cache", "model", "gateway"]
        );
    }

    #[test]
    fn only_components_with_ready_dependencies_start() {
        let all = specs(FLEET);
        let refs: Vec<&ComponentSpec> = all.iter().collect();
        let mut states: BTreeMap<ComponentName, ComponentState> = all
            .iter()
            .map(|s| (s.name.clone(), ComponentState::Pending))
            .collect();
        // Lower priority numbers start first.
        assert_eq!(names(&startable(&refs, &states)), ["db"]);
        states.insert(
            ComponentName::parse("db").unwrap(),
            ComponentState::Starting,
        );
        assert_eq!(names(&startable(&refs, &states)), ["cache"]);
        for n in ["db", "cache"] {
            states.insert(ComponentName::parse(n).unwrap(), ComponentState::Starting);
        }
        assert!(startable(&refs, &states).is_empty());
        states.insert(ComponentName::parse("db").unwrap(), ComponentState::Ready);
        assert_eq!(names(&startable(&refs, &states)), ["model"]);
    }

    fn pending(all: &[ComponentSpec]) -> BTreeMap<ComponentName, ComponentState> {
        all.iter()
            .map(|s| (s.name.clone(), ComponentState::Pending))
            .collect()
    }

    fn set(states: &mut BTreeMap<ComponentName, ComponentState>, n: &str, st: ComponentState) {
        states.insert(ComponentName::parse(n).unwrap(), st);
    }

    const PRIORITIES: &str = "
[[component]]
name = \"a\"
command = \"x\"
priority = 50
[[component]]
name = \"b\"
command = \"x\"
priority = 40
[[component]]
name = \"c\"
command = \"x\"
priority = 30
[[component]]
name = \"d\"
command = \"x\"
priority = 20
[[component]]
name = \"e\"
command = \"x\"
priority = 10
[[component]]
name = \"e2\"
command = \"x\"
priority = 10
";

    #[test]
    fn lower_priority_numbers_are_started_first_equal_ones_together() {
        let all = specs(PRIORITIES);
        let refs: Vec<&ComponentSpec> = all.iter().collect();
        let mut states = pending(&all);
        let mut started = Vec::new();
        loop {
            let now = startable(&refs, &states);
            if now.is_empty() {
                break;
            }
            started.push(names(&now).join(","));
            for n in &now {
                // Started, not ready: that is enough for the next priority.
                states.insert(n.clone(), ComponentState::Starting);
            }
        }
        assert_eq!(started, ["e,e2", "d", "c", "b", "a"]);
    }

    #[test]
    fn a_component_not_reported_yet_holds_back_higher_numbers() {
        let all = specs(PRIORITIES);
        let refs: Vec<&ComponentSpec> = all.iter().collect();
        let mut states = pending(&all);
        states.remove(&ComponentName::parse("e").unwrap());
        states.remove(&ComponentName::parse("e2").unwrap());
        assert!(startable(&refs, &states).is_empty());
        let waits = waiting(&refs, &states);
        assert_eq!(
            waits.get(&ComponentName::parse("a").unwrap()),
            Some(&Wait::Priority(
                ["b", "c", "d", "e", "e2"]
                    .iter()
                    .map(|n| ComponentName::parse(n).unwrap())
                    .collect()
            ))
        );
        set(&mut states, "e", ComponentState::Pending);
        set(&mut states, "e2", ComponentState::Stopped);
        assert_eq!(names(&startable(&refs, &states)), ["e"]);
    }

    #[test]
    fn priority_does_not_wait_for_components_whose_dependencies_are_not_ready() {
        let all = specs(FLEET);
        let refs: Vec<&ComponentSpec> = all.iter().collect();
        let mut states = pending(&all);
        // db (0) first, then cache (1); model (5) waits for db's readiness, not priority.
        assert_eq!(names(&startable(&refs, &states)), ["db"]);
        set(&mut states, "db", ComponentState::Starting);
        assert_eq!(names(&startable(&refs, &states)), ["cache"]);
        set(&mut states, "cache", ComponentState::Ready);
        assert!(startable(&refs, &states).is_empty());
        let waits = waiting(&refs, &states);
        let db = ComponentName::parse("db").unwrap();
        assert_eq!(
            waits.get(&ComponentName::parse("model").unwrap()),
            Some(&Wait::Dependencies(vec![(
                db.clone(),
                Some(ComponentState::Starting)
            )]))
        );
        set(&mut states, "db", ComponentState::Ready);
        assert_eq!(names(&startable(&refs, &states)), ["model"]);
        assert!(!waiting(&refs, &states).contains_key(&ComponentName::parse("model").unwrap()));
    }

    #[test]
    fn stop_is_reverse_order() {
        let all = specs(FLEET);
        let refs: Vec<&ComponentSpec> = all.iter().collect();
        let mut states: BTreeMap<ComponentName, ComponentState> = all
            .iter()
            .map(|s| (s.name.clone(), ComponentState::Ready))
            .collect();
        assert_eq!(names(&stoppable(&refs, &states)), ["gateway"]);
        states.insert(
            ComponentName::parse("gateway").unwrap(),
            ComponentState::Stopped,
        );
        assert_eq!(names(&stoppable(&refs, &states)), ["model", "cache"]);
        states.insert(
            ComponentName::parse("model").unwrap(),
            ComponentState::Stopped,
        );
        assert_eq!(names(&stoppable(&refs, &states)), ["cache", "db"]);
    }
}
