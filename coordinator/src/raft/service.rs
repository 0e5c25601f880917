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
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, LevelRequest,
    LevelResponse, PreVoteRequest, PreVoteResponse, ProposeRequest, ProposeResponse, ReadIndexRequest,
    ReadIndexResponse, RelayAgentsRequest, RelayAgentsResponse, TransferLeaderRequest, TransferLeaderResponse,
    VoteRequest, VoteResponse,
};
use futures::StreamExt;
use openraft::vote::RaftLeaderId;
use sha2::Digest;
use tonic::{Request, Response, Status};

use super::{Consensus, NodeId, ProposeError};

pub struct RaftGrpc {
    pub consensus: Consensus,
    /// Takes the agent liveness followers relay (the agent hub).
    pub agents: std::sync::Arc<dyn super::AgentRelay>,
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

/// Collects a snapshot's data: `first` is the stream's first chunk, `rest`
/// the chunks after it. Why the length and digest checks: a truncated
/// snapshot handed to openraft fails to decode in the state machine, and a
/// storage error stops the node's Raft for good. A sender that gives up
/// mid-stream (its timeout, or replication closed) resets the HTTP/2 stream
/// with CANCEL, which hyper reports to the server as a clean end of the
/// body; only the declared length and digest tell that from the whole.
async fn receive_snapshot(
    first: InstallSnapshotRequest,
    mut rest: impl futures::Stream<Item = Result<InstallSnapshotRequest, Status>> + Unpin,
) -> Result<Vec<u8>, Status> {
    use super::network::{MAX_SNAPSHOT, SNAPSHOT_CHUNK};
    let total = first.total_bytes;
    if total == 0 && first.sha256.is_empty() && !first.data.is_empty() {
        // A leader of an earlier release declares neither: a cut-short
        // stream from it could not be told from a whole one.
        return Err(Status::failed_precondition(
            "snapshot stream without a declared length and SHA-256 (a leader of an earlier release): \
             refused; upgrade the leader, or let a node of this release lead",
        ));
    }
    if total > MAX_SNAPSHOT as u64 {
        return Err(Status::resource_exhausted(format!(
            "a snapshot of {total} bytes; at most {MAX_SNAPSHOT} are accepted"
        )));
    }
    // Grows as chunks arrive past 64 MiB: a declared length is not yet
    // bytes received.
    let mut data = Vec::with_capacity(total.min(64 << 20) as usize);
    let mut digest = sha2::Sha256::new();
    let mut chunk = first.data;
    loop {
        if chunk.len() > SNAPSHOT_CHUNK {
            return Err(Status::invalid_argument(format!(
                "snapshot chunk of {} bytes; at most {SNAPSHOT_CHUNK} are sent",
                chunk.len(),
            )));
        }
        if (data.len() + chunk.len()) as u64 > total {
            return Err(Status::invalid_argument(format!(
                "snapshot stream carries more than the {total} bytes it declared"
            )));
        }
        digest.update(&chunk);
        data.extend_from_slice(&chunk);
        match rest.next().await.transpose()? {
            Some(next) => chunk = next.data,
            None => break,
        }
    }
    if data.len() as u64 != total {
        return Err(Status::aborted(format!(
            "snapshot stream ended after {} of {total} bytes",
            data.len()
        )));
    }
    if digest.finalize().as_slice() != first.sha256.as_slice() {
        return Err(Status::data_loss(format!(
            "snapshot of {total} bytes does not match its SHA-256"
        )));
    }
    Ok(data)
}

#[tonic::async_trait]
impl RaftService for RaftGrpc {
    async fn append_entries(
        &self,
        req: Request<AppendEntriesRequest>,
    ) -> Result<Response<AppendEntriesResponse>, Status> {
        let start_us = super::trace::enabled().then(super::trace::now_us);
        let sender = self.peer(&req)?;
        let rpc: openraft::raft::AppendEntriesRequest<super::TypeConfig> =
            decode(&req.into_inner().payload, "append-entries")?;
        speaks_for(sender, *rpc.vote.leader_id().node_id(), "append-entries")?;
        // Heard from a leader: reset on arrival as well as on acceptance,
        // since a reply waits for the log's flush, which a slow disk makes
        // longer than a timeout.
        self.consensus.election.reset();
        let span = start_us.and_then(|_| super::trace::span(&rpc.entries));
        let r = self.consensus.raft.append_entries(rpc).await.map_err(|e| e.to_string());
        // Accepted from the leader (heartbeats included): no election yet.
        // A higher vote means the sender is a deposed leader.
        if matches!(&r, Ok(resp) if !matches!(resp, openraft::raft::AppendEntriesResponse::HigherVote(_))) {
            self.consensus.election.reset();
        }
        if let (Some(start_us), Some((first, last))) = (start_us, span) {
            super::trace::rpc("receive", sender, first, last, start_us, super::trace::now_us());
        }
        Ok(super::level::stamp(Response::new(AppendEntriesResponse {
            payload: encode(&r)?,
        })))
    }

    async fn vote(&self, req: Request<VoteRequest>) -> Result<Response<VoteResponse>, Status> {
        let sender = self.peer(&req)?;
        let rpc: openraft::raft::VoteRequest<super::TypeConfig> = decode(&req.into_inner().payload, "vote")?;
        speaks_for(sender, *rpc.vote.leader_id().node_id(), "vote request")?;
        let r = self.consensus.raft.vote(rpc).await.map_err(|e| e.to_string());
        // Raft: a node that granted its vote waits a whole timeout before
        // standing itself, giving the candidate time to win.
        if matches!(&r, Ok(resp) if resp.vote_granted) {
            self.consensus.election.reset();
        }
        Ok(super::level::stamp(Response::new(VoteResponse {
            payload: encode(&r)?,
        })))
    }

    async fn pre_vote(&self, req: Request<PreVoteRequest>) -> Result<Response<PreVoteResponse>, Status> {
        let sender = self.peer(&req)?;
        let rpc: openraft::raft::VoteRequest<super::TypeConfig> = decode(&req.into_inner().payload, "pre-vote")?;
        speaks_for(sender, *rpc.vote.leader_id().node_id(), "pre-vote request")?;
        let r = self.consensus.raft.pre_vote(rpc).await.map_err(|e| e.to_string());
        Ok(super::level::stamp(Response::new(PreVoteResponse {
            payload: encode(&r)?,
        })))
    }

    async fn transfer_leader(
        &self,
        req: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        let sender = self.peer(&req)?;
        let rpc: openraft::raft::TransferLeaderRequest<super::TypeConfig> =
            decode(&req.into_inner().payload, "transfer-leader")?;
        speaks_for(
            sender,
            *rpc.from_leader().leader_id().node_id(),
            "transfer-leader request",
        )?;
        let r = self
            .consensus
            .raft
            .handle_transfer_leader(rpc)
            .await
            .map_err(|e| e.to_string());
        Ok(super::level::stamp(Response::new(TransferLeaderResponse {
            payload: encode(&r)?,
        })))
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
        let data = receive_snapshot(first, chunks).await?;
        let snapshot = openraft::Snapshot { meta, snapshot: data };
        let r = self
            .consensus
            .raft
            .install_full_snapshot(vote, snapshot)
            .await
            .map_err(|e| e.to_string());
        if matches!(&r, Ok(resp) if resp.vote == vote) {
            self.consensus.election.reset();
        }
        Ok(super::level::stamp(Response::new(InstallSnapshotResponse {
            payload: encode(&r)?,
        })))
    }

    async fn propose(&self, req: Request<ProposeRequest>) -> Result<Response<ProposeResponse>, Status> {
        self.peer(&req)?;
        let mut cmd: super::Proposal = decode(&req.into_inner().command, "command")?;
        // Agent reports are dated on this leader's clock, whichever node
        // holds the agent's session (`Command::stamp_arrival`).
        if let super::Proposal::Command(c) = &mut cmd {
            c.stamp_arrival(cutover_shared::domain::now_unix_ms());
        }
        // Only the leader takes forwarded writes: one hop, no forwarding loops.
        let r = match self.consensus.propose_local(cmd).await {
            Err(ProposeError::NotLeader { .. }) => {
                return Err(Status::unavailable(
                    "not the leader (leadership moved while forwarding)",
                ));
            }
            other => other.map_err(|e| e.to_string()),
        };
        Ok(super::level::stamp(Response::new(ProposeResponse {
            payload: encode(&r)?,
        })))
    }

    async fn level(&self, req: Request<LevelRequest>) -> Result<Response<LevelResponse>, Status> {
        // Asked by a cluster's leader before adding this node, so before
        // it is a member: any coordinator certificate will do.
        self.peer(&req)?;
        Ok(super::level::stamp(Response::new(LevelResponse {
            level: super::level::FEATURE_LEVEL,
        })))
    }

    async fn relay_agents(&self, req: Request<RelayAgentsRequest>) -> Result<Response<RelayAgentsResponse>, Status> {
        self.peer(&req)?;
        // Only a leader with a fresh lease: the follower's OK is its proof
        // that a quorum's leader hears it, which its agents' acks (their
        // lease) rely on.
        if !self.consensus.is_leader() {
            return Err(Status::failed_precondition("not leading under a fresh lease"));
        }
        self.agents.relayed(req.into_inner().agents);
        Ok(Response::new(RelayAgentsResponse {}))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(data: &[u8]) -> InstallSnapshotRequest {
        InstallSnapshotRequest {
            data: data.to_vec(),
            ..Default::default()
        }
    }

    fn first(data: &[u8], whole: &[u8]) -> InstallSnapshotRequest {
        InstallSnapshotRequest {
            total_bytes: whole.len() as u64,
            sha256: sha2::Sha256::digest(whole).to_vec(),
            ..chunk(data)
        }
    }

    async fn receive(first: InstallSnapshotRequest, rest: Vec<InstallSnapshotRequest>) -> Result<Vec<u8>, Status> {
        receive_snapshot(first, futures::stream::iter(rest.into_iter().map(Ok))).await
    }

    #[tokio::test]
    async fn a_whole_snapshot_is_received_in_order() {
        let whole = b"abcdefgh";
        let got = receive(first(b"abc", whole), vec![chunk(b"def"), chunk(b"gh")])
            .await
            .unwrap();
        assert_eq!(got, whole);
        let empty = receive(first(b"", b""), vec![]).await.unwrap();
        assert!(empty.is_empty());
    }

    /// What a cancelled sender looks like to the server: the stream ends
    /// early, cleanly. It must not reach the state machine.
    #[tokio::test]
    async fn a_stream_that_ends_early_is_refused() {
        let whole = b"abcdefgh";
        let err = receive(first(b"abc", whole), vec![chunk(b"def")]).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Aborted, "{err}");
        assert!(err.message().contains("ended after 6 of 8 bytes"), "{}", err.message());
    }

    #[tokio::test]
    async fn a_stream_longer_or_other_than_declared_is_refused() {
        let whole = b"abcdefgh";
        let err = receive(first(b"abc", whole), vec![chunk(b"defgh"), chunk(b"i")])
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        let err = receive(first(b"abc", whole), vec![chunk(b"dXfgh")]).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::DataLoss, "{err}");
        // A sender of an earlier release declares nothing: refused, not
        // installed half-read.
        let legacy = InstallSnapshotRequest {
            total_bytes: 0,
            sha256: vec![],
            ..chunk(b"abc")
        };
        let err = receive(legacy, vec![]).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
        assert!(err.message().contains("earlier release"), "{}", err.message());
    }

    #[tokio::test]
    async fn a_transport_error_mid_stream_is_passed_on() {
        let whole = b"abcdef";
        let rest = futures::stream::iter(vec![Ok(chunk(b"def")), Err(Status::unavailable("reset"))]);
        // The error ends the receive even though the bytes are all there.
        let err = receive_snapshot(first(b"abc", whole), rest).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
    }
}
