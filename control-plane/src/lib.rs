//! Berth's control plane: the gRPC API over etcd, node sessions, and the leader's scheduler,
//! reconciler and node monitor (docs/architecture.md).
#![forbid(unsafe_code)]

mod api;
mod auth;
pub mod autoscale;
pub mod config;
mod dashboard;
mod housekeeping;
pub mod incoming;
mod leader;
mod metrics;
mod nodes;
pub mod server;

pub use config::Config;
pub use server::{run, ServerError};
