//! The config error machinery shared by the agent's and the collector's configs: a
//! two-phase parse (`document`: every unknown key or wrong type with its key path),
//! errors that name file, line, key path and reason, all reported at once (`error`),
//! and the checks of the TLS files a config names (`files`, the only I/O).

pub mod document;
mod error;
pub mod files;

pub use error::{line_column, Collector as ErrorCollector, ConfigError, ConfigErrors};
