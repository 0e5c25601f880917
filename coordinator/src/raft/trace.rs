//! The write timeline: where the time of one write goes, stage by stage, on
//! every node, like etcd's `--trace` (issue: performance round 2).
//!
//! Off unless the `cutover::write_trace` target is enabled at TRACE level
//! (`RUST_LOG=info,cutover::write_trace=trace`); a disabled event costs one
//! cached check of the callsite. Each event names a stage, the log indexes
//! it covers and when it started and ended, in microseconds of the wall
//! clock: the nodes of one machine share that clock, so the bench joins
//! their logs by log index into one timeline (`bench trace`). The wall
//! clock is right here, unlike for decisions (`shared::clock`): a trace
//! reads durations of a few milliseconds off one machine.
//!
//! Stages, in the order a write meets them:
//! - `propose` (leader): the command handed to Raft until it is applied
//!   and its response is back, `index` the entry's;
//! - `append`: a batch of entries written to the log and fsynced, on each
//!   node;
//! - `send` (leader): an append-entries RPC carrying entries to `to`,
//!   from encoding it to its decoded reply;
//! - `receive` (follower): that RPC, from its arrival to the reply (the
//!   follower answers once the entries are on its disk);
//! - `apply`: a batch of committed entries applied to the state machine.

use std::time::{SystemTime, UNIX_EPOCH};

use openraft::type_config::alias::EntryOf;

use super::TypeConfig;

/// Microseconds since the Unix epoch, by the wall clock.
pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// Whether the timeline is being logged (spares the caller the clock read).
pub fn enabled() -> bool {
    tracing::enabled!(target: "cutover::write_trace", tracing::Level::TRACE)
}

/// The first and last log index of `entries`, if the timeline is on and
/// there are any (heartbeats carry none).
pub fn span(entries: &[EntryOf<TypeConfig>]) -> Option<(u64, u64)> {
    if !enabled() {
        return None;
    }
    Some((entries.first()?.log_id.index, entries.last()?.log_id.index))
}

/// Logs one stage covering log indexes `first..=last`.
pub fn stage(stage: &'static str, first: u64, last: u64, start_us: i64, end_us: i64) {
    tracing::trace!(target: "cutover::write_trace", stage, first, last, start_us, end_us);
}

/// Logs an RPC stage with the peer it went to or came from.
pub fn rpc(stage: &'static str, peer: u64, first: u64, last: u64, start_us: i64, end_us: i64) {
    tracing::trace!(target: "cutover::write_trace", stage, peer, first, last, start_us, end_us);
}
