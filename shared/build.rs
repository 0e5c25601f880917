//! Compiles `proto/` with protox (a pure-Rust protobuf compiler, so no system
//! `protoc` is needed) and generates the tonic client and server code. The
//! encoded descriptor set is kept for gRPC server reflection.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    let files = [
        "cutover/v1/common.proto",
        "cutover/v1/agent.proto",
        "cutover/v1/control.proto",
        "cutover/v1/raft.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    let fds = protox::compile(files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("cutover_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // The generated `connect(dst)` constructor would clash with the
        // `AgentService.Connect` RPC; clients are built from a `Channel`.
        .build_transport(false)
        // Smaller initial buffers per stream: see `proto::codec`.
        .codec_path("crate::proto::codec::LeanCodec")
        .compile_fds(fds)?;
    Ok(())
}
