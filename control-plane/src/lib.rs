//! Berth's control plane: the gRPC API over etcd. The scheduler, node sessions and the gateway
//! arrive with their issues.
#![forbid(unsafe_code)]

pub mod admin;
pub mod api;
pub mod auth;
pub mod config;
pub mod defaults;
pub mod gateway;
pub mod incoming;
pub mod leader;
pub mod manifest;
pub mod metrics;
pub mod nodes;
pub mod quantity;
pub mod server;
pub mod store;
pub mod time;
pub mod validate;

pub use config::Config;
pub use server::{run, ServerError};
