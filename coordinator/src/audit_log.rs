//! The audit file: `<data_dir>/audit.jsonl`, where audit events go when
//! retention moves them out of the replicated state. One JSON object per
//! line, append-only, each line carrying the SHA-256 of the previous line's
//! hash and its own event, so editing or removing any line breaks the
//! chain from there on ([`verify`] says where).
//!
//! Every node writes its own copy as it applies `Compact`. Appends are
//! idempotent by sequence number: a node that restarts and re-applies log
//! entries it had already applied writes nothing twice.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use cutover_shared::domain::AuditEvent;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The chain's starting hash (before the first line).
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One line of the file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    #[serde(flatten)]
    pub event: AuditEvent,
    /// The previous line's `hash` (zeros for the first line).
    pub prev: String,
    /// SHA-256 of `prev` and the event's canonical JSON.
    pub hash: String,
}

fn chain_hash(prev: &str, event: &AuditEvent) -> String {
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(serde_json::to_vec(event).unwrap_or_default());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Errors of the audit file.
#[derive(Debug, thiserror::Error)]
pub enum AuditLogError {
    #[error("audit file {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("audit file {path} line {line}: {why}")]
    Corrupt { path: PathBuf, line: usize, why: String },
}

/// The appender of one node's audit file.
pub struct AuditLog {
    path: PathBuf,
    last_hash: String,
    last_sequence: u64,
}

impl AuditLog {
    /// Opens (or creates) the file in `data_dir`, checking the whole chain.
    pub fn open(data_dir: &Path) -> Result<AuditLog, AuditLogError> {
        let path = data_dir.join("audit.jsonl");
        let lines = read(&path)?;
        let (last_hash, last_sequence) = lines
            .last()
            .map_or((GENESIS.to_owned(), 0), |l| (l.hash.clone(), l.event.sequence));
        Ok(AuditLog {
            path,
            last_hash,
            last_sequence,
        })
    }

    /// Appends the events not yet in the file, and syncs it.
    pub fn append(&mut self, events: &[AuditEvent]) -> Result<usize, AuditLogError> {
        let io_err = |source| AuditLogError::Io {
            path: self.path.clone(),
            source,
        };
        let mut out = String::new();
        let (mut prev, mut seq) = (self.last_hash.clone(), self.last_sequence);
        let mut n = 0;
        for e in events.iter().filter(|e| e.sequence > self.last_sequence) {
            let hash = chain_hash(&prev, e);
            let line = Line {
                event: e.clone(),
                prev: prev.clone(),
                hash: hash.clone(),
            };
            out.push_str(&serde_json::to_string(&line).unwrap_or_default());
            out.push('\n');
            prev = hash;
            seq = e.sequence;
            n += 1;
        }
        if n == 0 {
            return Ok(0);
        }
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(io_err)?;
        f.write_all(out.as_bytes()).map_err(io_err)?;
        f.sync_data().map_err(io_err)?;
        self.last_hash = prev;
        self.last_sequence = seq;
        Ok(n)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads and verifies every line of the file at `path` (none if it does not
/// exist). A broken chain is an error naming the first bad line.
pub fn read(path: &Path) -> Result<Vec<Line>, AuditLogError> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
        Err(source) => {
            return Err(AuditLogError::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    let corrupt = |line: usize, why: String| AuditLogError::Corrupt {
        path: path.to_owned(),
        line,
        why,
    };
    let mut prev = GENESIS.to_owned();
    let mut out = Vec::new();
    for (i, text) in BufReader::new(f).lines().enumerate() {
        let text = text.map_err(|source| AuditLogError::Io {
            path: path.to_owned(),
            source,
        })?;
        let line: Line = serde_json::from_str(&text).map_err(|e| corrupt(i + 1, e.to_string()))?;
        if line.prev != prev {
            return Err(corrupt(i + 1, "does not continue the previous line's hash".into()));
        }
        if chain_hash(&line.prev, &line.event) != line.hash {
            return Err(corrupt(i + 1, "its hash does not match its content (edited)".into()));
        }
        prev = line.hash.clone();
        out.push(line);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(sequence: u64) -> AuditEvent {
        AuditEvent {
            sequence,
            at_unix_ms: 1000 * sequence as i64,
            actor: "operator/alice".into(),
            action: "Deploy".into(),
            parameters: "{}".into(),
            outcome: "accepted".into(),
        }
    }

    #[test]
    fn appends_once_and_detects_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = AuditLog::open(dir.path()).unwrap();
        assert_eq!(log.append(&[event(1), event(2)]).unwrap(), 2);
        // A replay after a restart writes nothing twice.
        let mut log = AuditLog::open(dir.path()).unwrap();
        assert_eq!(log.append(&[event(2), event(3)]).unwrap(), 1);
        let lines = read(log.path()).unwrap();
        assert_eq!(lines.iter().map(|l| l.event.sequence).collect::<Vec<_>>(), [1, 2, 3]);
        // Edit one line's actor: the chain breaks at that line.
        let text = std::fs::read_to_string(log.path()).unwrap();
        std::fs::write(
            log.path(),
            text.replacen("alice", "mallory", 2).replacen("mallory", "alice", 1),
        )
        .unwrap();
        let err = read(log.path()).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("edited"), "{err}");
        // Remove a line: the next one no longer continues the chain.
        let kept: Vec<&str> = text
            .lines()
            .enumerate()
            .filter(|(i, _)| *i != 1)
            .map(|(_, l)| l)
            .collect();
        std::fs::write(log.path(), kept.join("\n") + "\n").unwrap();
        let err = read(log.path()).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("previous"), "{err}");
    }
}
