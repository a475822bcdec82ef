//! Supervision: the pure per-component state machine, the start planner, and the
//! tokio runtime that drives them with real processes.

pub mod backoff;
pub mod component;
pub mod machine;
pub mod plan;
pub mod runtime;
pub mod state_store;
