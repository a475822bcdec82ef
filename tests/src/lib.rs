//! Test support for Razar's end-to-end tests: a throwaway fleet CA per test (`ca`), a
//! private PostgreSQL (`pg`) and shared protocol values (`fixtures`).

pub mod ca;
pub mod fixtures;
pub mod live;
pub mod pg;
