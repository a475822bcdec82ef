//! The two-phase parse lives in razar-shared (`config_support::document`), shared with
//! the collector; re-exported here at its old path.

pub use razar_shared::config_support::document::*;
