//! Raft RPCs to peer coordinators over mutual TLS. openraft messages travel as
//! `codec`-encoded bytes inside the `RaftService` protobuf envelopes.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cutover_shared::proto::raft_service_client::RaftServiceClient;
use cutover_shared::proto::{
    AppendEntriesRequest, InstallSnapshotRequest, PreVoteRequest, TransferLeaderRequest, VoteRequest,
};
use cutover_shared::tls::TlsFiles;
use openraft::BasicNode;
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{AppendEntriesResponse, SnapshotResponse, TransferLeaderResponse, VoteResponse};
use openraft::type_config::alias::{SnapshotOf, VoteOf};
use sha2::Digest;
use tonic::transport::Channel;

use super::{NodeId, TypeConfig};

/// Largest gRPC message between peers. Snapshots travel in chunks, so this
/// bounds a batch of log entries (a release's bundle is at most 1 MiB, and
/// openraft sends up to 300 entries at once) and replies.
pub const MAX_PEER_MESSAGE: usize = 256 * 1024 * 1024;

/// Snapshot data per `InstallSnapshot` chunk.
pub const SNAPSHOT_CHUNK: usize = 1024 * 1024;

/// Largest snapshot a node accepts (the state is bounded by retention; this
/// is the backstop against a peer streaming without end).
pub const MAX_SNAPSHOT: usize = 8 * 1024 * 1024 * 1024;

/// Creates and caches one channel per peer address.
#[derive(Clone)]
pub struct PeerChannels {
    tls: TlsFiles,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    /// The feature level each peer last answered with.
    pub levels: super::level::PeerLevels,
}

impl PeerChannels {
    pub fn new(tls: TlsFiles) -> Self {
        Self {
            tls,
            channels: Default::default(),
            levels: Default::default(),
        }
    }

    /// A Raft client for the node at `addr`.
    pub fn client(&self, addr: &str) -> Result<RaftServiceClient<Channel>, cutover_shared::Error> {
        let mut map = self.channels.lock().expect("peer channel map poisoned");
        let channel = match map.get(addr) {
            Some(c) => c.clone(),
            None => {
                let c = self.tls.channel(addr, None)?;
                map.insert(addr.to_owned(), c.clone());
                c
            }
        };
        Ok(RaftServiceClient::new(channel)
            .max_decoding_message_size(MAX_PEER_MESSAGE)
            .max_encoding_message_size(MAX_PEER_MESSAGE))
    }
}

impl RaftNetworkFactory<TypeConfig> for PeerChannels {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        PeerClient {
            target,
            client: self.client(&node.addr).map_err(|e| e.to_string()),
            levels: self.levels.clone(),
        }
    }
}

/// The connection to one peer.
pub struct PeerClient {
    target: NodeId,
    client: Result<RaftServiceClient<Channel>, String>,
    levels: super::level::PeerLevels,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Msg(String);

fn unreachable<E: std::fmt::Display>(e: E) -> Unreachable<TypeConfig> {
    Unreachable::new(&Msg(e.to_string()))
}

fn status_to_rpc(s: tonic::Status) -> RPCError<TypeConfig> {
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled | tonic::Code::Unknown => {
            RPCError::Unreachable(unreachable(format!("{}: {}", s.code(), s.message())))
        }
        _ => RPCError::Network(NetworkError::new(&Msg(format!("{}: {}", s.code(), s.message())))),
    }
}

/// How long a snapshot of `bytes` may take to send and install. openraft
/// hands every snapshot the same `install_snapshot_timeout` (200 ms by
/// default), sized for one small message; a snapshot of tens of MiB on a
/// loaded machine needs longer, and one that always times out never
/// catches its follower up. Ten seconds, and one more per 8 MiB.
fn snapshot_deadline(ttl: Duration, bytes: u64) -> Duration {
    ttl.max(Duration::from_secs(10) + Duration::from_secs(bytes / (8 << 20)))
}

/// The least time an append carrying entries may take. openraft gives
/// every append the heartbeat interval (50 ms by default) as its deadline;
/// on a loaded machine a follower that fsyncs and answers in 80 ms is slow,
/// not gone, and timing its appends out made replication restart and the
/// leader's lease lapse (`bench fleet`). Heartbeats (no entries) keep the
/// short deadline: openraft bounds them itself.
const APPEND_DEADLINE: Duration = Duration::from_secs(1);

fn append_deadline(ttl: Duration, entries: usize) -> Duration {
    if entries == 0 { ttl } else { ttl.max(APPEND_DEADLINE) }
}

fn request<T>(msg: T, ttl: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(ttl);
    r
}

impl PeerClient {
    fn client(&self) -> Result<RaftServiceClient<Channel>, RPCError<TypeConfig>> {
        self.client.clone().map_err(|e| RPCError::Unreachable(unreachable(e)))
    }

    /// Notes the peer's feature level from its answer and unwraps it.
    fn heard<T>(&self, r: tonic::Response<T>) -> T {
        self.levels.heard(self.target, r.metadata());
        r.into_inner()
    }

    fn decode<T: serde::de::DeserializeOwned>(&self, payload: &[u8]) -> Result<T, RPCError<TypeConfig>> {
        super::codec::decode(payload).map_err(|e| {
            RPCError::Network(NetworkError::new(&Msg(format!(
                "undecodable reply from node {}: {e}",
                self.target
            ))))
        })
    }
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, RPCError<TypeConfig>> {
    super::codec::encode(v).map_err(|e| RPCError::Network(NetworkError::new(&Msg(e.to_string()))))
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = Vec<u8>;

    async fn append_entries(
        &mut self,
        rpc: openraft::raft::AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let traced = super::trace::span(&rpc.entries).map(|(first, last)| (first, last, super::trace::now_us()));
        let deadline = append_deadline(option.hard_ttl(), rpc.entries.len());
        let payload = encode(&rpc)?;
        let reply = self
            .client()?
            .append_entries(request(AppendEntriesRequest { payload }, deadline))
            .await
            .map_err(status_to_rpc)?;
        let reply = self.heard(reply);
        let r: Result<AppendEntriesResponse<TypeConfig>, String> = self.decode(&reply.payload)?;
        if let Some((first, last, start_us)) = traced {
            super::trace::rpc("send", self.target, first, last, start_us, super::trace::now_us());
        }
        r.map_err(|e| RPCError::Network(NetworkError::new(&Msg(e))))
    }

    async fn vote(
        &mut self,
        rpc: openraft::raft::VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let payload = encode(&rpc)?;
        let reply = self
            .client()?
            .vote(request(VoteRequest { payload }, option.hard_ttl()))
            .await
            .map_err(status_to_rpc)?
            .into_inner();
        let r: Result<VoteResponse<TypeConfig>, String> = self.decode(&reply.payload)?;
        r.map_err(|e| RPCError::Network(NetworkError::new(&Msg(e))))
    }

    async fn pre_vote(
        &mut self,
        rpc: openraft::raft::VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let payload = encode(&rpc)?;
        let reply = match self
            .client()?
            .pre_vote(request(PreVoteRequest { payload }, option.hard_ttl()))
            .await
        {
            Ok(r) => self.heard(r),
            // A peer of a release before Pre-Vote: count it as granting,
            // which is what it would have done before (the real vote
            // still decides), so a cluster mid-upgrade keeps electing.
            // A peer that cannot be reached is not a grant: an isolated
            // node must not talk itself into a term.
            Err(s) if s.code() == tonic::Code::Unimplemented => {
                tracing::info!(peer = self.target, "peer predates Pre-Vote; counting its grant");
                return Ok(VoteResponse::new(rpc.vote, None, true));
            }
            Err(s) => return Err(status_to_rpc(s)),
        };
        let r: Result<VoteResponse<TypeConfig>, String> = self.decode(&reply.payload)?;
        r.map_err(|e| RPCError::Network(NetworkError::new(&Msg(e))))
    }

    async fn transfer_leader(
        &mut self,
        req: openraft::raft::TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        let payload = encode(&req)?;
        let reply = self
            .client()?
            .transfer_leader(request(TransferLeaderRequest { payload }, option.hard_ttl()))
            .await
            .map_err(status_to_rpc)?
            .into_inner();
        let r: Result<TransferLeaderResponse<TypeConfig>, String> = self.decode(&reply.payload)?;
        r.map_err(|e| RPCError::Network(NetworkError::new(&Msg(e))))
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<TypeConfig>,
        snapshot: SnapshotOf<TypeConfig, Vec<u8>>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let to_stream = |e: RPCError<TypeConfig>| match e {
            RPCError::Unreachable(u) => StreamingError::Unreachable(u),
            RPCError::Network(n) => StreamingError::Network(n),
            other => StreamingError::Network(NetworkError::new(&Msg(other.to_string()))),
        };
        let vote = encode(&vote).map_err(to_stream)?;
        let meta = encode(&snapshot.meta).map_err(to_stream)?;
        // The digest of a snapshot of tens of MiB: off the runtime's threads.
        let (data, sha256) = tokio::task::spawn_blocking(move || {
            let digest = sha2::Sha256::digest(&snapshot.snapshot).to_vec();
            (snapshot.snapshot, digest)
        })
        .await
        .map_err(|e| StreamingError::Network(NetworkError::new(&Msg(e.to_string()))))?;
        let total_bytes = data.len() as u64;
        // The first chunk carries the vote, metadata, length and digest;
        // each carries at most SNAPSHOT_CHUNK bytes of data, copied as it is
        // sent.
        let chunks = data.len().div_ceil(SNAPSHOT_CHUNK).max(1);
        let stream = futures::stream::iter((0..chunks).map(move |i| {
            let piece = data[i * SNAPSHOT_CHUNK..((i + 1) * SNAPSHOT_CHUNK).min(data.len())].to_vec();
            if i == 0 {
                InstallSnapshotRequest {
                    vote: vote.clone(),
                    meta: meta.clone(),
                    data: piece,
                    total_bytes,
                    sha256: sha256.clone(),
                }
            } else {
                InstallSnapshotRequest {
                    data: piece,
                    ..Default::default()
                }
            }
        }));
        let mut client = self.client().map_err(to_stream)?;
        let call = client.install_snapshot(request(stream, snapshot_deadline(option.hard_ttl(), total_bytes)));
        let reply = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            r = call => r.map_err(|s| to_stream(status_to_rpc(s)))?.into_inner(),
        };
        let r: Result<SnapshotResponse<TypeConfig>, String> = self.decode(&reply.payload).map_err(to_stream)?;
        r.map_err(|e| StreamingError::Network(NetworkError::new(&Msg(e))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_with_entries_get_a_second_and_heartbeats_keep_openrafts_deadline() {
        let ttl = Duration::from_millis(50);
        assert_eq!(append_deadline(ttl, 0), ttl, "a heartbeat");
        assert_eq!(append_deadline(ttl, 3), APPEND_DEADLINE);
        // A longer deadline from openraft is kept.
        assert_eq!(append_deadline(Duration::from_secs(5), 3), Duration::from_secs(5));
    }

    #[test]
    fn a_snapshot_gets_ten_seconds_and_one_more_per_8_mib() {
        let ttl = Duration::from_millis(200);
        assert_eq!(snapshot_deadline(ttl, 0), Duration::from_secs(10));
        assert_eq!(snapshot_deadline(ttl, 80 << 20), Duration::from_secs(20));
    }
}
