//! Berth's node agent. The Docker-driving agent arrives with the node-agent issue; this crate
//! holds its place in the workspace.
#![forbid(unsafe_code)]
