//! The config error machinery lives in razar-shared (`config_support`), shared with the
//! collector; re-exported here at its old paths.

pub use razar_shared::config_support::{
    line_column, ConfigError, ConfigErrors, ErrorCollector as Collector,
};
