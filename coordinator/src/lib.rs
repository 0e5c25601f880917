//! The cutover coordinator: one node of the Raft-replicated control plane.
//!
//! - `raft`: consensus (the only module that knows openraft) and its storage;
//! - `state`: the replicated state machine, pure and deterministic;
//! - `cluster_clock`: real time as the leaders measured it, in the state;
//! - `control`: the operator-facing `ControlService`;
//! - `orchestrator`: advances app operations step by step (leader only);
//! - `agents`: the `AgentService` stream, agent liveness and task dispatch,
//!   which only the leader runs;
//! - `audit_log`: the hash-chained audit file that compacted events go to;
//! - `node`: wiring, the gRPC server, bootstrap and shutdown.

#![forbid(unsafe_code)]

pub mod agents;
pub mod audit_log;
pub mod cluster_clock;
pub mod control;
pub mod dr;
pub mod node;
pub mod orchestrator;
pub mod raft;
pub mod state;

pub use node::{Node, NodeError};
