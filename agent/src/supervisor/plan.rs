//! The start planner: which components may start now (all dependencies ready), in
//! what order (topological by `depends_on`, then `priority`, then name), and which may
//! stop now during a shutdown (everything depending on them is down). Pure functions.

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

/// Components in `pending` whose dependencies are all `ready`, in start order.
pub fn startable(
    specs: &[&ComponentSpec],
    states: &BTreeMap<ComponentName, ComponentState>,
) -> Vec<ComponentName> {
    start_order(specs)
        .into_iter()
        .filter(|name| states.get(name) == Some(&ComponentState::Pending))
        .filter(|name| {
            specs
                .iter()
                .find(|s| &s.name == name)
                .is_some_and(|s| dependencies_ready(s, specs, states))
        })
        .collect()
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
        // Independents start together.
        assert_eq!(names(&startable(&refs, &states)), ["db", "cache"]);
        for n in ["db", "cache"] {
            states.insert(ComponentName::parse(n).unwrap(), ComponentState::Starting);
        }
        assert!(startable(&refs, &states).is_empty());
        states.insert(ComponentName::parse("db").unwrap(), ComponentState::Ready);
        assert_eq!(names(&startable(&refs, &states)), ["model"]);
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
