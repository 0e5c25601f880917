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
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

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
    hex(&h.finalize())
}

/// Lower-case hex of `bytes`, without a `String` per byte.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
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

/// What the writer thread reports: how far the file is durable, or why it
/// cannot be written.
struct Report {
    durable: tokio::sync::watch::Sender<Result<u64, String>>,
    /// Set with the error, so that `send` checks one atomic per apply.
    failed: Arc<AtomicBool>,
}

impl Report {
    fn fail(&self, why: String) {
        self.failed.store(true, Ordering::SeqCst);
        self.durable.send_modify(|d| {
            if d.is_ok() {
                *d = Err(why);
            }
        });
    }
}

/// Tells the writer's waiters when its thread ends, however it ends: a
/// panic must not leave `flushed` waiting forever.
impl Drop for Report {
    fn drop(&mut self) {
        self.fail("the audit file's writer stopped".into());
    }
}

/// Appends a node's pruned audit events on a thread of its own, in order,
/// so that applying a `Compact` does not wait for the file's write and
/// fsync (10,000 events at a time on a busy cluster: every apply on the
/// node stalled behind it). What stays true: nothing leaves the state
/// without reaching the file first *for anything that survives a crash*.
/// A snapshot taken after a compaction is stored only once the events
/// that compaction moved are durable ([`AuditWriter::flushed`]); until
/// then a restart replays the `Compact` from the log, and appends are
/// idempotent by sequence. A read of the file waits the same way, so an
/// event is always in the state or in the file.
pub struct AuditWriter {
    queue: std::sync::Mutex<Option<std::sync::mpsc::Sender<Vec<AuditEvent>>>>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The highest sequence handed to the thread.
    sent: AtomicU64,
    /// The highest sequence on disk, or why the file cannot be written.
    durable: tokio::sync::watch::Sender<Result<u64, String>>,
    /// Whether `durable` holds an error.
    failed: Arc<AtomicBool>,
}

impl AuditWriter {
    /// Starts the thread that owns `log`.
    pub fn start(mut log: AuditLog) -> io::Result<AuditWriter> {
        let (tx, rx) = std::sync::mpsc::channel::<Vec<AuditEvent>>();
        let (durable, _) = tokio::sync::watch::channel(Ok(log.last_sequence));
        let failed = Arc::new(AtomicBool::new(false));
        let report = Report {
            durable: durable.clone(),
            failed: failed.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("cutover-audit".into())
            .spawn(move || {
                let report = report;
                while let Ok(mut events) = rx.recv() {
                    // Whatever queued meanwhile goes in the same write.
                    events.extend(rx.try_iter().flatten());
                    let last = events.last().map_or(0, |e| e.sequence);
                    match log.append(&events) {
                        Ok(_) => report.durable.send_modify(|d| {
                            if let Ok(seq) = d {
                                *seq = (*seq).max(last);
                            }
                        }),
                        Err(e) => {
                            tracing::error!("audit file: {e}; this node stops applying");
                            report.fail(e.to_string());
                            return;
                        }
                    }
                }
            })?;
        Ok(AuditWriter {
            queue: std::sync::Mutex::new(Some(tx)),
            thread: std::sync::Mutex::new(Some(thread)),
            sent: AtomicU64::new(0),
            durable,
            failed,
        })
    }

    /// Hands `events` (in sequence order, newer than any handed before) to
    /// the thread. Fails once the file could not be written, or after
    /// [`AuditWriter::close`].
    pub fn send(&self, events: Vec<AuditEvent>) -> io::Result<()> {
        // Checked on every apply, events or not: a node whose audit file
        // cannot be written stops at its next apply, not its next
        // compaction.
        if self.failed.load(Ordering::SeqCst)
            && let Err(e) = &*self.durable.borrow()
        {
            return Err(io::Error::other(e.clone()));
        }
        let Some(last) = events.last().map(|e| e.sequence) else {
            return Ok(());
        };
        let queue = self
            .queue
            .lock()
            .map_err(|_| io::Error::other("audit queue poisoned"))?;
        let tx = queue.as_ref().ok_or_else(|| io::Error::other("audit file closed"))?;
        tx.send(events)
            .map_err(|_| io::Error::other("audit file thread gone"))?;
        self.sent.fetch_max(last, Ordering::SeqCst);
        Ok(())
    }

    /// The highest sequence handed over so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    /// Waits until everything handed over so far is on disk.
    pub async fn flushed_all(&self) -> io::Result<()> {
        self.flushed(self.sent()).await
    }

    /// Waits until every event up to sequence `upto` is on disk.
    pub async fn flushed(&self, upto: u64) -> io::Result<()> {
        let mut rx = self.durable.subscribe();
        loop {
            match &*rx.borrow_and_update() {
                Ok(seq) if *seq >= upto => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(io::Error::other(e.clone())),
            }
            // The sender lives in `self`: it cannot close while we wait.
            let _ = rx.changed().await;
        }
    }

    /// Writes what is queued and stops the thread (a node shutting down:
    /// the next instance in this process reopens the file).
    pub fn close(&self) {
        if let Ok(mut q) = self.queue.lock() {
            q.take();
        }
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = thread
            && t.join().is_err()
        {
            tracing::error!("audit file thread panicked");
        }
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

    /// Hashes are written as before the hand-rolled hex: files written by
    /// an earlier release still verify.
    #[test]
    fn hashes_keep_their_lower_case_hex_form() {
        let bytes: Vec<u8> = (0..=255).collect();
        let expected: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex(&bytes), expected);
        assert_eq!(chain_hash(GENESIS, &event(1)).len(), GENESIS.len());
    }

    /// The writer thread appends what it is handed in order; `flushed`
    /// returns once those events are in the file, `close` writes what is
    /// queued; and a file that cannot be written stops the node's applies
    /// (a storage failure, as a failed log write is), not silently.
    #[tokio::test]
    async fn the_writer_thread_appends_in_order_and_reports_failure() {
        let dir = tempfile::tempdir().unwrap();
        let w = AuditWriter::start(AuditLog::open(dir.path()).unwrap()).unwrap();
        w.send(vec![event(1), event(2)]).unwrap();
        w.send(vec![]).unwrap();
        w.send(vec![event(3)]).unwrap();
        assert_eq!(w.sent(), 3);
        w.flushed_all().await.unwrap();
        let seqs = |p: &Path| read(p).unwrap().iter().map(|l| l.event.sequence).collect::<Vec<_>>();
        assert_eq!(seqs(&dir.path().join("audit.jsonl")), [1, 2, 3]);
        w.send(vec![event(4)]).unwrap();
        w.close();
        assert_eq!(seqs(&dir.path().join("audit.jsonl")), [1, 2, 3, 4]);
        assert!(w.send(vec![event(5)]).is_err(), "closed");

        // The file's directory gone: the append fails, and says so to
        // whoever waits and to the next send.
        let gone = tempfile::tempdir().unwrap();
        let w = AuditWriter::start(AuditLog::open(gone.path()).unwrap()).unwrap();
        std::fs::remove_dir_all(gone.path()).unwrap();
        w.send(vec![event(1)]).unwrap();
        let err = w.flushed(1).await.unwrap_err().to_string();
        assert!(err.contains("audit file"), "{err}");
        assert!(w.send(vec![event(2)]).is_err());
        w.close();
    }
}
