//! The API's resources, one module each. Reads are SQL on the store's pool (read-only,
//! bound parameters only); writes go through the store's modules and dispatch.

pub mod audit;
pub mod commands;
pub mod events;
pub mod health;
pub mod history;
pub mod hosts;
pub mod logs;
pub mod overview;
pub mod tokens;
// ops (session 7)
pub mod decisions;
pub mod deployments;
pub mod escalations;
pub mod gpus;
