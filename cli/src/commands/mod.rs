//! The client commands.

pub mod agents;
pub mod deploy;
pub mod events;
pub mod export;
pub mod logs;
pub mod nodes;
pub mod requests;
pub mod tokens;
pub mod wait;
