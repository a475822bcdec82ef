//! Test support for Razar's end-to-end tests: a throwaway fleet CA per test (`ca`).

pub mod ca;
pub mod pg;
