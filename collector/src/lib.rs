//! Razar collector: QUIC ingest, PostgreSQL store, lost-host detection, operator API.
#![forbid(unsafe_code)]

pub mod api;
pub mod config;
pub mod dashboard;
pub mod deployments;
pub mod dispatch;
pub mod embedded_pg;
pub mod engine_loop;
pub mod fleet_metrics;
pub mod group;
mod ingest;
pub mod logs;
pub mod lost;
pub mod notify;
pub mod pulses;
pub mod server;
pub mod service;
pub mod store;
pub mod supervise;
