//! Generated protobuf and gRPC code for `cutover.v1`.
//!
//! Only the edges of the system (gRPC handlers, the CLI, `convert`) touch these
//! types; everything else works with the plain Rust types in `domain`.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("cutover.v1");

/// The protobuf codec of every cutover service: tonic-prost's, with smaller
/// initial buffers.
///
/// tonic gives each stream an 8 KiB decode buffer and each response body an
/// 8 KiB encode buffer up front. A coordinator holds one long-lived
/// `AgentService.Connect` stream per agent, whose messages (heartbeats and
/// their acks) are tens of bytes: at 10,000 agents those two buffers alone
/// were about 160 MiB of the leader's memory (`bench fanin` under
/// heaptrack). Both buffers grow on demand to fit a larger message, so a
/// smaller start costs a reallocation only for messages over 1 KiB.
pub mod codec {
    use std::marker::PhantomData;

    use tonic::codec::{BufferSettings, Codec};
    use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

    /// Initial size of a stream's decode and encode buffer.
    pub const INITIAL_BUFFER: usize = 1024;
    /// tonic's default: a streaming response yields to the runtime after
    /// this many buffered bytes.
    const YIELD_THRESHOLD: usize = 32 * 1024;

    /// See the module documentation; named by `codec_path` in `build.rs`.
    #[derive(Debug, Clone, Copy)]
    pub struct LeanCodec<T, U>(PhantomData<(T, U)>);

    impl<T, U> Default for LeanCodec<T, U> {
        fn default() -> Self {
            Self(PhantomData)
        }
    }

    fn settings() -> BufferSettings {
        BufferSettings::new(INITIAL_BUFFER, YIELD_THRESHOLD)
    }

    impl<T, U> Codec for LeanCodec<T, U>
    where
        T: prost::Message + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = ProstEncoder<T>;
        type Decoder = ProstDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            ProstCodec::<T, U>::raw_encoder(settings())
        }

        fn decoder(&mut self) -> Self::Decoder {
            ProstCodec::<T, U>::raw_decoder(settings())
        }
    }
}

/// The encoded `FileDescriptorSet` of every cutover proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("cutover_descriptor");
