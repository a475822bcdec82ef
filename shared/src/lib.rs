//! Razar's shared core: domain types, the sans-IO wire protocol, and the rustls
//! configuration and certificate identity used by both agent and collector.
//!
//! **Architecture invariant:** this crate performs no I/O of its own: no tokio, no
//! quinn, no sockets, no clock. Callers pass `Instant`s and bytes in and take messages
//! and deadlines out.
#![forbid(unsafe_code)]

pub mod close_code;
pub mod config_support;
pub mod domain;
pub mod protocol;
pub mod tls;
pub mod xid_catalog;
