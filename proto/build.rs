//! Compiles `proto/berth/v1/*.proto` with protox (no `protoc` needed), generates the tonic
//! clients and servers, the pbjson serde impls (protobuf's canonical JSON mapping), and writes
//! the encoded file descriptor set that server reflection serves.

use prost::Message;
use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "berth/v1/agent.proto",
    "berth/v1/event.proto",
    "berth/v1/node.proto",
    "berth/v1/request.proto",
    "berth/v1/node_agent.proto",
    "berth/v1/token.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let fds = protox::compile(PROTOS, ["."])?;
    let descriptor_bytes = fds.encode_to_vec();
    std::fs::write(out.join("berth_descriptor.bin"), &descriptor_bytes)?;

    tonic_prost_build::configure()
        // Well-known types come from pbjson-types so that they serialize as canonical JSON
        // ("10s", RFC 3339 timestamps) like every other protobuf client prints them.
        // `NodeAgentService.Connect` would clash with the generated `connect` constructor;
        // clients are built with `new(channel)` instead.
        .build_transport(false)
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_fds(fds)?;

    pbjson_build::Builder::new()
        .register_descriptors(&descriptor_bytes)?
        .build(&[".berth.v1"])?;
    Ok(())
}
