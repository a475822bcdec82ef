//! VRAM budgets and ghost memory, driven by scenario data through the scenario source.

use razar_gpu::mapping::{vram_breaches, vram_by_component, GhostMemoryDetector, VramBreach};
use razar_gpu::{GpuSource, Scenario, ScenarioSource};
use razar_shared::protocol::{EventKind, Subject};
use std::collections::{BTreeMap, BTreeSet};
use std::num::NonZeroU32;

const GIB: u64 = 1024 * 1024 * 1024;

fn source(text: &str) -> ScenarioSource {
    ScenarioSource::new(Scenario::parse(text, "test scenario").expect("scenario"))
}

fn trees(entries: &[(&str, &[u32])]) -> BTreeMap<String, BTreeSet<u32>> {
    entries
        .iter()
        .map(|(name, pids)| ((*name).to_owned(), pids.iter().copied().collect()))
        .collect()
}

#[test]
fn component_over_its_vram_budget_is_a_breach_with_an_event() {
    // The model server grows from 10 to 30 GiB at step 2; its budget is 24 GiB.
    let mut gpus = source(
        r#"
[[gpu]]
process = [
  { pid = 500, used_memory = 10737418240, until = 2 },
  { pid = 500, used_memory = 32212254720, from = 2 },
  { pid = 600, used_memory = 1073741824 },
]
"#,
    );
    let components = trees(&[("model-server", &[499, 500]), ("embedder", &[600])]);
    let budgets = BTreeMap::from([
        ("model-server".to_owned(), 24 * GIB),
        ("embedder".to_owned(), 2 * GIB),
    ]);

    let mut per_step = Vec::new();
    for step in 0..3 {
        gpus.set_time(f64::from(step));
        let usage = vram_by_component(&gpus.processes().expect("processes"), &components);
        per_step.push(vram_breaches(&usage, &budgets));
    }
    assert_eq!(per_step[0], vec![]);
    assert_eq!(per_step[1], vec![]);
    assert_eq!(
        per_step[2],
        vec![VramBreach {
            component: "model-server".to_owned(),
            used_bytes: 30 * GIB,
            budget_bytes: 24 * GIB,
        }]
    );
    let event = per_step[2][0].to_event(1_000);
    assert_eq!(event.subject, Subject::Component("model-server".to_owned()));
    assert_eq!(
        event.kind,
        EventKind::VramBudgetExceeded {
            used_bytes: 30 * GIB,
            budget_bytes: 24 * GIB
        }
    );
}

#[test]
fn ghost_memory_after_a_killed_process_is_found_once_after_n_samples() {
    // pid 700 is killed at step 3 but its 20 GiB stays allocated (fb_used stays high).
    let mut gpus = source(
        r#"
[[gpu]]
values = { memory_used = [[0, 22548578304], [10, 22548578304]] }
process = [{ pid = 700, used_memory = 21474836480, until = 3 }, { pid = 701, used_memory = 1073741824 }]

[[gpu]]
process = [{ pid = 800, used_memory = 1073741824 }]
"#,
    );
    let mut detector = GhostMemoryDetector::new(GIB, NonZeroU32::new(3).expect("nonzero"));
    let mut findings = Vec::new();
    for step in 0..9 {
        gpus.set_time(f64::from(step));
        let readings = gpus.sample().expect("sample");
        let processes = gpus.processes().expect("processes");
        for ghost in detector.observe(&readings, &processes) {
            findings.push((step, ghost));
        }
    }
    assert_eq!(findings.len(), 1, "{findings:?}");
    let (step, ghost) = &findings[0];
    assert_eq!(
        *step, 5,
        "third consecutive sample after the kill at step 3"
    );
    assert_eq!(ghost.gpu_index, 0);
    assert_eq!(ghost.unaccounted_bytes, 20 * GIB);
    assert_eq!(ghost.samples, 3);
    assert_eq!(
        ghost.to_event(0).kind,
        EventKind::GhostMemory { bytes: 20 * GIB }
    );
}

#[test]
fn ghost_streak_resets_below_threshold_and_unknown_memory_is_not_judged() {
    let mut gpus = source(
        r#"
[[gpu]]
values = { memory_used = [[0, 5368709120], [1, 5368709120], [2, 0], [3, 5368709120], [9, 5368709120]] }
process = []

[[gpu]]
values = { memory_used = 5368709120 }
process = [{ pid = 900 }]
"#,
    );
    let mut detector = GhostMemoryDetector::new(GIB, NonZeroU32::new(3).expect("nonzero"));
    let mut found_at = Vec::new();
    for step in 0..7 {
        gpus.set_time(f64::from(step));
        let readings = gpus.sample().expect("sample");
        let processes = gpus.processes().expect("processes");
        found_at.extend(
            detector
                .observe(&readings, &processes)
                .into_iter()
                .map(|g| (step, g.gpu_index)),
        );
    }
    // GPU 0: above at 0, 1; below at 2 (reset); above from 3 → found at 5.
    // GPU 1: its only process has unavailable memory: never judged.
    assert_eq!(found_at, vec![(5, 0)]);
}
