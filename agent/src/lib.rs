//! Razar agent: supervises the processes of a GPU host, samples its GPUs and resources,
//! and streams telemetry to the collector. The binary `razar-agent` is a thin wrapper.
#![forbid(unsafe_code)]

pub mod commands;
pub mod config;
pub mod daemon;
pub mod local_api;
pub mod logs;
pub mod metrics;
pub mod probe;
pub mod process;
pub mod profile;
pub mod resources;
pub mod revisions;
pub mod spool;
pub mod store;
pub mod supervisor;
pub mod telemetry;
pub mod uplink;
