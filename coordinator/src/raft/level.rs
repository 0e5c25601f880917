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

/// Why a command was not let through by [`check`].
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A member said it is at a lower level (an older release, a rolling
    /// upgrade under way).
    Behind(String),
    /// A member has not been heard from since this node began leading, and
    /// the log holds no entry of that level yet: its level is not known.
    Unheard(String),
}

/// Refuses a command of level `needed` unless every member is known to
/// apply it: `members` are each member's id and what was heard from it (as
/// [`PeerLevels::get`], with this node's own level for itself);
/// `in_use` is the highest level of an entry already in the log
/// (`State::level_in_use`).
///
/// Once the log holds an entry of level `needed`, it passes whatever the
/// members say: that entry was let through only when every member said it
/// applies it, and no node below it is added since (`AddNode` checks), so
/// a member not heard from (a lost region's coordinator) cannot hold the
/// leader back. A member restarted on an older release after that is a
/// downgrade, which is not supported (as etcd's cluster version, the level
/// in use never goes down).
pub fn check(
    needed: u32,
    in_use: u32,
    members: impl IntoIterator<Item = (NodeId, Option<Option<u32>>)>,
) -> Result<(), Refusal> {
    if needed <= UNADVERTISED_LEVEL || in_use >= needed {
        return Ok(());
    }
    let mut behind = Vec::new();
    let mut unheard = Vec::new();
    for (id, heard) in members {
        match heard {
            None => unheard.push(format!("node {id}")),
            Some(level) => {
                let level = level.unwrap_or(UNADVERTISED_LEVEL);
                if level < needed {
                    behind.push(format!("node {id} at level {level}"));
                }
            }
        }
    }
    if !behind.is_empty() {
        return Err(Refusal::Behind(format!(
            "this write needs every coordinator at feature level {needed} or later, and {} (an older release): \
             finish the rolling upgrade first",
            behind.join(", ")
        )));
    }
    if !unheard.is_empty() {
        return Err(Refusal::Unheard(format!(
            "this write needs every coordinator at feature level {needed} or later, and {} not heard from yet",
            unheard.join(", ")
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn a_write_older_voters_cannot_apply_is_refused_naming_them() {
        let voters = || [(1, Some(Some(2))), (2, Some(None)), (3, Some(Some(1))), (4, None)];
        // What every release applies passes, whatever the members say.
        assert_eq!(check(1, 1, voters()), Ok(()));
        let Err(Refusal::Behind(e)) = check(2, 1, voters()) else {
            panic!("a member heard at level 1 lets a level-2 write through")
        };
        assert!(e.contains("node 2 at level 1, node 3 at level 1"), "{e}");
        assert!(!e.contains("node 1") && !e.contains("node 4"), "{e}");
        assert!(e.contains("finish the rolling upgrade"), "{e}");
        // A member not heard from: its level is not known, which is not
        // the same as known to be behind.
        let Err(Refusal::Unheard(e)) = check(2, 1, [(1, Some(Some(2))), (4, None)]) else {
            panic!("an unheard member is taken to be at some level")
        };
        assert!(e.contains("node 4 not heard from"), "{e}");
        // Once every voter said it is at level 2, it passes.
        assert_eq!(check(2, 1, [(1, Some(Some(2))), (2, Some(Some(3)))]), Ok(()));
        // Once the log holds a level-2 entry, a member not heard from (a
        // lost region's coordinator) does not hold the leader back.
        assert_eq!(check(2, 2, [(1, Some(Some(2))), (4, None)]), Ok(()));
        // The cluster clock's tick is the first level-2 command.
        assert_eq!(
            needed(&Command::Tick {
                term: 1,
                led_ms: 0,
                pins: BTreeMap::new()
            }),
            2
        );
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
