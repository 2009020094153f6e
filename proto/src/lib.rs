//! The `berth.v1` API contract: messages, gRPC clients and servers generated from
//! `proto/berth/v1` (with serde impls in protobuf's canonical JSON mapping), and what every
//! part must agree on: defaults, validation, quantities, durations, manifests and what a
//! request to the gateway means. Used alike by the servers, the CLI and the fuzz targets
//! (docs/architecture.md).
#![forbid(unsafe_code)]

pub mod defaults;
pub mod manifest;
pub mod quantity;
pub mod request;
pub mod time;
pub mod validate;

/// Package `berth.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("berth.v1");
    include!(concat!(env!("OUT_DIR"), "/berth.v1.serde.rs"));
}

impl v1::AgentStatus {
    /// The condition of type `kind` (`Available`, `CrashLoop`, ...), if it holds now.
    pub fn holding(&self, kind: &str) -> Option<&v1::Condition> {
        self.conditions
            .iter()
            .find(|c| c.r#type == kind && c.status == v1::ConditionStatus::True as i32)
    }
}

impl v1::Agent {
    /// Whether the user wants it running (neither stopped nor paused): what autoscaling acts
    /// on.
    pub fn wants_running(&self) -> bool {
        self.meta.as_ref().is_none_or(|m| {
            matches!(
                v1::DesiredState::try_from(m.desired_state),
                Ok(v1::DesiredState::Running | v1::DesiredState::Unspecified)
            )
        })
    }

    /// The replicas it should have: none while stopped, else its spec's (or the default).
    pub fn desired_replicas(&self) -> u32 {
        let stopped = self
            .meta
            .as_ref()
            .is_some_and(|m| m.desired_state == v1::DesiredState::Stopped as i32);
        match stopped {
            true => 0,
            false => self
                .spec
                .as_ref()
                .and_then(|s| s.replicas)
                .unwrap_or(defaults::REPLICAS),
        }
    }
}

/// The encoded `FileDescriptorSet` of every `berth.v1` file, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/berth_descriptor.bin"));

pub use pbjson_types;

/// A protobuf timestamp of `time` (the epoch for times before it).
pub fn timestamp(time: std::time::SystemTime) -> pbjson_types::Timestamp {
    let since = time
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    pbjson_types::Timestamp {
        seconds: since.as_secs() as i64,
        nanos: since.subsec_nanos() as i32,
    }
}

/// A digest of the parts of a spec a container is made from (image, command, environment and
/// secret environment, volumes, limits, port, labels, stop grace). A new generation that changes only the run
/// state, replicas or the health check keeps the container; one that changes the digest
/// replaces it.
pub fn container_digest(spec: &v1::AgentSpec) -> String {
    use sha2::{Digest, Sha256};
    let sorted = |m: &std::collections::HashMap<String, String>| {
        let mut pairs: Vec<(String, String)> = m.clone().into_iter().collect();
        pairs.sort();
        pairs
    };
    let canonical = format!(
        "{:?}",
        (
            &spec.image,
            &spec.command,
            &spec.args,
            sorted(&spec.env),
            sorted(&spec.secret_env),
            sorted(&spec.labels),
            &spec.volumes,
            &spec.resources,
            spec.port,
            &spec.stop_grace,
        )
    );
    let digest = Sha256::digest(canonical.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// What every output shows in place of a secret value.
pub const REDACTED: &str = "<redacted>";
