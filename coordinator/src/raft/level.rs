//! Feature levels: which log entries a coordinator can apply, so that in a
//! cluster of mixed releases (a rolling upgrade) the leader refuses a
//! write an older member could not apply, with an error that says which
//! node to upgrade, instead of that member stopping on the entry
//! (etcd's cluster version, by the same idea).
//!
//! Every node answers each Raft RPC with its level in the
//! `cutover-feature-level` header; the leader, which hears every member
//! (voters and learners: both apply every entry) each heartbeat, keeps the
//! last level it heard from each. A release before levels were advertised
//! sends no header: it is taken to be at [`UNADVERTISED_LEVEL`]. A command
//! needs [`needed`] of every member.
//!
//! Levels: 1, every command of the releases before levels; 2, `Tick` (the
//! cluster clock).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::NodeId;
use crate::state::Command;

/// The highest level this release applies. A release that adds a command
/// (or a field an older node would refuse) raises it and returns the new
/// level from [`needed`] for what it added; the previous release then
/// cannot be handed such an entry while it is a voter.
pub const FEATURE_LEVEL: u32 = 2;

/// What a peer that sends no level is taken to apply: every command of the
/// releases before levels were advertised.
pub const UNADVERTISED_LEVEL: u32 = 1;

/// The response header that carries a node's level.
pub const HEADER: &str = "cutover-feature-level";

/// The level a member needs to apply `cmd`.
pub fn needed(cmd: &Command) -> u32 {
    match cmd {
        Command::Tick { .. } => 2,
        _ => 1,
    }
}

/// Adds this node's level to a response.
pub fn stamp<T>(mut r: tonic::Response<T>) -> tonic::Response<T> {
    r.metadata_mut()
        .insert(HEADER, tonic::metadata::MetadataValue::from(FEATURE_LEVEL));
    r
}

/// The level a response says its node is at, if it says one.
pub fn read(meta: &tonic::metadata::MetadataMap) -> Option<u32> {
    meta.get(HEADER)?.to_str().ok()?.parse().ok()
}

/// The last level heard from each peer (this node's own is
/// [`FEATURE_LEVEL`]). `None` in a level: the peer answered without one
/// (an older release).
#[derive(Clone, Default)]
pub struct PeerLevels(Arc<Mutex<HashMap<NodeId, Option<u32>>>>);

impl PeerLevels {
    /// Records what `node`'s response said.
    pub fn heard(&self, node: NodeId, meta: &tonic::metadata::MetadataMap) {
        let level = read(meta);
        self.0.lock().expect("peer levels").insert(node, level);
    }

    /// The last level heard from `node`: `Some(None)` for a node that
    /// answered without one, `None` for a node not heard from.
    pub fn get(&self, node: NodeId) -> Option<Option<u32>> {
        self.0.lock().expect("peer levels").get(&node).copied()
    }
}

/// Refuses a command of level `needed` unless every member is known to
/// apply it: `members` are each member's id and what was heard from it (as
/// [`PeerLevels::get`], with this node's own level for itself). A member
/// not heard from yet counts as [`UNADVERTISED_LEVEL`] (a leader hears
/// every live member within a heartbeat).
pub fn check(needed: u32, members: impl IntoIterator<Item = (NodeId, Option<Option<u32>>)>) -> Result<(), String> {
    if needed <= UNADVERTISED_LEVEL {
        return Ok(());
    }
    let behind: Vec<String> = members
        .into_iter()
        .filter_map(|(id, heard)| {
            let level = heard.flatten().unwrap_or(UNADVERTISED_LEVEL);
            (level < needed).then(|| format!("node {id} at level {level}"))
        })
        .collect();
    if behind.is_empty() {
        return Ok(());
    }
    Err(format!(
        "this write needs every coordinator at feature level {needed} or later, and {} (an older release): \
         finish the rolling upgrade first",
        behind.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_older_voters_cannot_apply_is_refused_naming_them() {
        let voters = || [(1, Some(Some(2))), (2, Some(None)), (3, None)];
        // What every release applies passes, whatever the members say.
        assert_eq!(check(1, voters()), Ok(()));
        let e = check(2, voters()).unwrap_err();
        assert!(e.contains("node 2 at level 1, node 3 at level 1"), "{e}");
        assert!(!e.contains("node 1"), "{e}");
        assert!(e.contains("finish the rolling upgrade"), "{e}");
        // Once every voter said it is at level 2, it passes.
        assert_eq!(check(2, [(1, Some(Some(2))), (2, Some(Some(3)))]), Ok(()));
        // The cluster clock's tick is the first level-2 command.
        assert_eq!(needed(&Command::Tick { term: 1, led_ms: 0 }), 2);
        assert_eq!(needed(&Command::TaskDispatched { task_id: "t".into() }), 1);
    }

    #[test]
    fn the_level_travels_in_a_response_header() {
        let r = stamp(tonic::Response::new(()));
        assert_eq!(read(r.metadata()), Some(FEATURE_LEVEL));
        assert_eq!(read(tonic::Response::new(()).metadata()), None);
        let levels = PeerLevels::default();
        levels.heard(2, r.metadata());
        levels.heard(3, tonic::Response::new(()).metadata());
        assert_eq!(levels.get(2), Some(Some(FEATURE_LEVEL)));
        assert_eq!(levels.get(3), Some(None));
        assert_eq!(levels.get(4), None);
    }
}
