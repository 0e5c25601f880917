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
