//! Berth's control plane: the gRPC API over etcd, node sessions, and the leader's scheduler,
//! reconciler and node monitor (docs/architecture.md).
#![forbid(unsafe_code)]

pub mod admin;
pub mod api;
pub mod auth;
pub mod config;
pub mod housekeeping;
pub mod incoming;
pub mod leader;
pub mod metrics;
pub mod nodes;
pub mod server;

pub use config::Config;
pub use server::{run, ServerError};
