//! The server side of `RaftService`: hands peer messages to the local Raft
//! node, and accepts writes forwarded by followers when this node leads.
//!
//! The access guard lets only coordinator certificates in; this module
//! decides which coordinators. A coordinator certificate names its Raft node
//! id (`spiffe://<trust-domain>/coordinator/<node-id>`), and only current
//! members may call: a removed node, or another environment's coordinator
//! from the same CA, is refused at once. A message that speaks for a node
//! (the vote in AppendEntries, Vote and InstallSnapshot) must come from that
//! node. A node that is not yet in any membership (a spare waiting for
//! `AddNode`, or one whose bootstrap has not applied) accepts any
//! coordinator of its trust domain: it has nothing to protect yet.

use cutover_shared::grpc::caller;
use cutover_shared::proto::raft_service_server::RaftService;
use cutover_shared::proto::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, ProposeRequest,
    ProposeResponse, ReadIndexRequest, ReadIndexResponse, VoteRequest, VoteResponse,
};
use openraft::vote::RaftLeaderId;
use tonic::{Request, Response, Status};

use super::{Consensus, NodeId, ProposeError};

pub struct RaftGrpc {
    pub consensus: Consensus,
}

fn decode<T: serde::de::DeserializeOwned>(b: &[u8], what: &str) -> Result<T, Status> {
    super::codec::decode(b).map_err(|e| Status::invalid_argument(format!("malformed {what}: {e}")))
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, Status> {
    super::codec::encode(v).map_err(|e| Status::internal(e.to_string()))
}

impl RaftGrpc {
    /// The calling coordinator's node id, if it may call: it is a current
    /// member (or this node has no membership yet).
    fn peer<T>(&self, req: &Request<T>) -> Result<NodeId, Status> {
        let who = caller(req)?;
        let id: NodeId = who.name.parse().map_err(|_| {
            Status::permission_denied(format!("{who}: a coordinator certificate must name its Raft node id"))
        })?;
        if !self.consensus.accepts_peer(id) {
            return Err(Status::permission_denied(format!(
                "{who} is not a member of this cluster"
            )));
        }
        Ok(id)
    }
}

/// Refuses a message that speaks for another node than its sender.
fn speaks_for(sender: NodeId, claimed: NodeId, what: &str) -> Result<(), Status> {
    if sender == claimed {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "coordinator {sender} sent a {what} for node {claimed}"
        )))
    }
}

#[tonic::async_trait]
impl RaftService for RaftGrpc {
    async fn append_entries(
        &self,
        req: Request<AppendEntriesRequest>,
    ) -> Result<Response<AppendEntriesResponse>, Status> {
        let sender = self.peer(&req)?;
        let rpc: openraft::raft::AppendEntriesRequest<super::TypeConfig> =
            decode(&req.into_inner().payload, "append-entries")?;
        speaks_for(sender, *rpc.vote.leader_id().node_id(), "append-entries")?;
        let r = self.consensus.raft.append_entries(rpc).await.map_err(|e| e.to_string());
        Ok(Response::new(AppendEntriesResponse { payload: encode(&r)? }))
    }

    async fn vote(&self, req: Request<VoteRequest>) -> Result<Response<VoteResponse>, Status> {
        let sender = self.peer(&req)?;
        let rpc: openraft::raft::VoteRequest<super::TypeConfig> = decode(&req.into_inner().payload, "vote")?;
        speaks_for(sender, *rpc.vote.leader_id().node_id(), "vote request")?;
        let r = self.consensus.raft.vote(rpc).await.map_err(|e| e.to_string());
        Ok(Response::new(VoteResponse { payload: encode(&r)? }))
    }

    async fn install_snapshot(
        &self,
        req: Request<tonic::Streaming<InstallSnapshotRequest>>,
    ) -> Result<Response<InstallSnapshotResponse>, Status> {
        let sender = self.peer(&req)?;
        let mut chunks = req.into_inner();
        let first = chunks
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        let vote: openraft::type_config::alias::VoteOf<super::TypeConfig> = decode(&first.vote, "vote")?;
        speaks_for(sender, *vote.leader_id().node_id(), "snapshot")?;
        let meta = decode(&first.meta, "snapshot meta")?;
        let mut data = first.data;
        while let Some(chunk) = chunks.message().await? {
            if chunk.data.len() > super::network::SNAPSHOT_CHUNK {
                return Err(Status::invalid_argument(format!(
                    "snapshot chunk of {} bytes; at most {} are sent",
                    chunk.data.len(),
                    super::network::SNAPSHOT_CHUNK
                )));
            }
            if data.len() + chunk.data.len() > super::network::MAX_SNAPSHOT {
                return Err(Status::resource_exhausted(format!(
                    "snapshot larger than {} bytes",
                    super::network::MAX_SNAPSHOT
                )));
            }
            data.extend_from_slice(&chunk.data);
        }
        let snapshot = openraft::Snapshot { meta, snapshot: data };
        let r = self
            .consensus
            .raft
            .install_full_snapshot(vote, snapshot)
            .await
            .map_err(|e| e.to_string());
        Ok(Response::new(InstallSnapshotResponse { payload: encode(&r)? }))
    }

    async fn propose(&self, req: Request<ProposeRequest>) -> Result<Response<ProposeResponse>, Status> {
        self.peer(&req)?;
        let cmd = decode(&req.into_inner().command, "command")?;
        // Only the leader takes forwarded writes: one hop, no forwarding loops.
        let r = match self.consensus.propose_local(cmd).await {
            Err(ProposeError::NotLeader { .. }) => {
                return Err(Status::unavailable(
                    "not the leader (leadership moved while forwarding)",
                ));
            }
            other => other.map_err(|e| e.to_string()),
        };
        Ok(Response::new(ProposeResponse { payload: encode(&r)? }))
    }

    async fn read_index(&self, req: Request<ReadIndexRequest>) -> Result<Response<ReadIndexResponse>, Status> {
        self.peer(&req)?;
        // Only the leader can tell: a follower answers UNAVAILABLE.
        match self.consensus.read_index().await {
            Ok(index) => Ok(Response::new(ReadIndexResponse { index })),
            Err(e) => Err(Status::unavailable(e.to_string())),
        }
    }
}
