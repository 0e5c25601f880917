//! How Raft entries, votes, snapshots and peer messages are encoded: a
//! three-byte tag (`CV` and a format version), then MessagePack with named
//! fields (`rmp-serde`). Named fields keep serde's defaults working, so a
//! field added later still decodes from what an earlier version wrote.
//!
//! Version 0 is JSON without a tag, what the first releases wrote. It is
//! still read (a JSON document never starts with `C`), never written, so a
//! data directory from before the binary encoding opens as it is.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The tag of format version 1: MessagePack, named fields.
const V1: [u8; 3] = *b"CV\x01";

/// Why bytes did not decode.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("encode: {0}")]
    Encode(String),
    #[error("decode (format {version}): {why}")]
    Decode { version: u8, why: String },
    #[error("unknown encoding version {0} (written by a newer release?)")]
    UnknownVersion(u8),
}

/// Encodes `v` in the current format.
pub fn encode<T: Serialize + ?Sized>(v: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = V1.to_vec();
    rmp_serde::encode::write_named(&mut out, v).map_err(|e| CodecError::Encode(e.to_string()))?;
    Ok(out)
}

/// Decodes bytes in any format this release reads.
pub fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, CodecError> {
    match b {
        [b'C', b'V', 1, rest @ ..] => rmp_serde::from_slice(rest).map_err(|e| CodecError::Decode {
            version: 1,
            why: e.to_string(),
        }),
        [b'C', b'V', v, ..] => Err(CodecError::UnknownVersion(*v)),
        json => serde_json::from_slice(json).map_err(|e| CodecError::Decode {
            version: 0,
            why: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{AuditDraft, Command};

    #[test]
    fn round_trips_reads_json_and_refuses_unknown_versions() {
        let cmd = Command::Audit(AuditDraft {
            at_unix_ms: 7,
            actor: "operator/a".into(),
            action: "X".into(),
            parameters: "{\"k\":1}".into(),
            outcome: "ok".into(),
        });
        let bin = encode(&cmd).unwrap();
        assert_eq!(&bin[..3], b"CV\x01");
        let json = serde_json::to_vec(&cmd).unwrap();
        assert!(bin.len() < json.len(), "{} >= {}", bin.len(), json.len());
        assert_eq!(decode::<Command>(&bin).unwrap(), cmd);
        assert_eq!(decode::<Command>(&json).unwrap(), cmd);
        let mut future = bin.clone();
        future[2] = 9;
        assert!(matches!(decode::<Command>(&future), Err(CodecError::UnknownVersion(9))));
    }
}

/// Fuzzing the decoders of everything a peer or the disk hands us (issue:
/// security hardening, finding 8): log entries, votes, append-entries
/// requests, snapshot metadata and snapshots, and proposed commands. See
/// `shared/tests/fuzz.rs` for why proptest and for `CUTOVER_FUZZ_CASES`.
#[cfg(test)]
mod fuzz {
    use openraft::EntryPayload;
    use openraft::type_config::alias::{EntryOf, SnapshotMetaOf, VoteOf};
    use proptest::prelude::*;

    use super::*;
    use crate::raft::TypeConfig;
    use crate::raft::state_machine::SmData;
    use crate::state::{AuditDraft, Command};

    fn config() -> ProptestConfig {
        ProptestConfig {
            cases: cutover_shared::fuzz_cases(),
            max_shrink_iters: 2048,
            ..ProptestConfig::default()
        }
    }

    fn command() -> Command {
        Command::Audit(AuditDraft {
            at_unix_ms: 7,
            actor: "operator/a".into(),
            action: "Deploy".into(),
            parameters: "{\"app\":\"sample\"}".into(),
            outcome: "ok".into(),
        })
    }

    /// Valid encodings of each decoded type, to mutate.
    fn seeds() -> Vec<Vec<u8>> {
        let entry = EntryOf::<TypeConfig> {
            log_id: openraft::testing::log_id::<TypeConfig>(3, 1, 42),
            payload: EntryPayload::Normal(command()),
        };
        let rpc = openraft::raft::AppendEntriesRequest::<TypeConfig> {
            vote: VoteOf::<TypeConfig>::new_committed(3, 1),
            prev_log_id: Some(openraft::testing::log_id::<TypeConfig>(3, 1, 41)),
            entries: vec![entry.clone()],
            leader_commit: Some(openraft::testing::log_id::<TypeConfig>(3, 1, 40)),
        };
        let meta = SnapshotMetaOf::<TypeConfig> {
            last_log_id: Some(openraft::testing::log_id::<TypeConfig>(3, 1, 42)),
            last_membership: Default::default(),
        };
        vec![
            encode(&command()).unwrap(),
            encode(&entry).unwrap(),
            encode(&rpc).unwrap(),
            encode(&meta).unwrap(),
            encode(&SmData::default()).unwrap(),
            serde_json::to_vec(&command()).unwrap(),
        ]
    }

    /// Every decoder on `bytes`: none may panic; what decodes re-encodes
    /// and decodes to the same value.
    fn check(bytes: &[u8]) {
        if let Ok(c) = decode::<Command>(bytes) {
            assert_eq!(decode::<Command>(&encode(&c).unwrap()).unwrap(), c);
        }
        if let Ok(e) = decode::<EntryOf<TypeConfig>>(bytes) {
            assert_eq!(decode::<EntryOf<TypeConfig>>(&encode(&e).unwrap()).unwrap(), e);
        }
        let _ = decode::<openraft::raft::AppendEntriesRequest<TypeConfig>>(bytes);
        let _ = decode::<openraft::raft::VoteRequest<TypeConfig>>(bytes);
        let _ = decode::<VoteOf<TypeConfig>>(bytes);
        let _ = decode::<SnapshotMetaOf<TypeConfig>>(bytes);
        let _ = decode::<SmData>(bytes);
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn raft_decoders_arbitrary(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            check(&bytes);
        }

        #[test]
        fn raft_decoders_after_the_tag(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut tagged = V1.to_vec();
            tagged.extend_from_slice(&bytes);
            check(&tagged);
        }

        #[test]
        fn raft_decoders_mutated(
            which in 0usize..6,
            edits in proptest::collection::vec((any::<usize>(), any::<u8>(), any::<bool>()), 0..8),
            cut in proptest::option::weighted(0.2, any::<usize>()),
        ) {
            let mut b = seeds().swap_remove(which);
            for (pos, byte, insert) in edits {
                let at = pos % (b.len() + 1);
                if insert || at == b.len() { b.insert(at, byte) } else { b[at] = byte }
            }
            if let Some(cut) = cut {
                b.truncate(cut % (b.len() + 1));
            }
            check(&b);
        }
    }
}
