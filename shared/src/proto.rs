//! Generated protobuf and gRPC code for `cutover.v1`.
//!
//! Only the edges of the system (gRPC handlers, the CLI, `convert`) touch these
//! types; everything else works with the plain Rust types in `domain`.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("cutover.v1");

/// The encoded `FileDescriptorSet` of every cutover proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("cutover_descriptor");
