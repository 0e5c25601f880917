//! Generates a minimal etcd v3 client (KV.Put and Maintenance.Status) from
//! `proto/etcd/rpc.proto` with protox, so no system `protoc` is needed (the
//! `etcd-client` crate's build script needs one).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    let file = "etcd/rpc.proto";
    println!("cargo:rerun-if-changed={}", root.join(file).display());
    let fds = protox::compile([file], [&root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
