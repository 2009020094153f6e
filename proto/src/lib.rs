//! The `berth.v1` API: messages, gRPC clients and servers generated from `proto/berth/v1`,
//! with serde impls in protobuf's canonical JSON mapping.
#![forbid(unsafe_code)]

/// Package `berth.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("berth.v1");
    include!(concat!(env!("OUT_DIR"), "/berth.v1.serde.rs"));
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
