//! The server side of `RaftService`: hands peer messages to the local Raft
//! node, and accepts writes forwarded by followers when this node leads.

use cutover_shared::proto::raft_service_server::RaftService;
use cutover_shared::proto::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, ProposeRequest,
    ProposeResponse, ReadIndexRequest, ReadIndexResponse, VoteRequest, VoteResponse,
};
use tonic::{Request, Response, Status};

use super::{Consensus, ProposeError};

pub struct RaftGrpc {
    pub consensus: Consensus,
}

fn decode<T: serde::de::DeserializeOwned>(b: &[u8], what: &str) -> Result<T, Status> {
    super::codec::decode(b).map_err(|e| Status::invalid_argument(format!("malformed {what}: {e}")))
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, Status> {
    super::codec::encode(v).map_err(|e| Status::internal(e.to_string()))
}

#[tonic::async_trait]
impl RaftService for RaftGrpc {
    async fn append_entries(
        &self,
        req: Request<AppendEntriesRequest>,
    ) -> Result<Response<AppendEntriesResponse>, Status> {
        let rpc = decode(&req.into_inner().payload, "append-entries")?;
        let r = self.consensus.raft.append_entries(rpc).await.map_err(|e| e.to_string());
        Ok(Response::new(AppendEntriesResponse { payload: encode(&r)? }))
    }

    async fn vote(&self, req: Request<VoteRequest>) -> Result<Response<VoteResponse>, Status> {
        let rpc = decode(&req.into_inner().payload, "vote")?;
        let r = self.consensus.raft.vote(rpc).await.map_err(|e| e.to_string());
        Ok(Response::new(VoteResponse { payload: encode(&r)? }))
    }

    async fn install_snapshot(
        &self,
        req: Request<tonic::Streaming<InstallSnapshotRequest>>,
    ) -> Result<Response<InstallSnapshotResponse>, Status> {
        let mut chunks = req.into_inner();
        let first = chunks
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        let vote = decode(&first.vote, "vote")?;
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

    async fn read_index(&self, _req: Request<ReadIndexRequest>) -> Result<Response<ReadIndexResponse>, Status> {
        // Only the leader can tell: a follower answers UNAVAILABLE.
        match self.consensus.read_index().await {
            Ok(index) => Ok(Response::new(ReadIndexResponse { index })),
            Err(e) => Err(Status::unavailable(e.to_string())),
        }
    }
}
