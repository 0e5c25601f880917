//! Client-side authenticated encryption of a backup stream.
//!
//! The format is the STREAM construction (as in age and Tink's streaming
//! AEAD): the plaintext is cut into 64 KiB chunks, each sealed with
//! AES-256-GCM under a nonce made of a random per-backup prefix, the
//! chunk's counter and a flag marking the last chunk. So a chunk cannot be
//! reordered, dropped or replayed from another backup, and a stream cut
//! short is told apart from one that ended (no chunk carries the flag).
//! Memory is one chunk, whatever the backup's size.
//!
//! ```text
//! header:  "CUTBAK\0\x01" | key id length (1) | key id | key check (16) | nonce prefix (7)
//! chunk:   ciphertext length (u32 BE, tag included) | ciphertext
//! nonce:   prefix (7) | counter (u32 BE) | last (1)
//! aad:     the whole header
//! ```
//!
//! The key id names which configured key sealed the backup, so keys can
//! rotate: new backups use the current key, old ones open with the key
//! their header names. The key check (a hash of the key, not of the data)
//! tells "the wrong key under that id" apart from a corrupt object.

use std::io::{self, Read, Write};
use std::path::Path;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use sha2::{Digest, Sha256};

/// The first bytes of every sealed backup.
pub const MAGIC: &[u8; 8] = b"CUTBAK\x00\x01";
/// Plaintext bytes per chunk.
pub const CHUNK: usize = 64 * 1024;
const TAG: usize = 16;
const PREFIX: usize = 7;

/// Why a sealed stream does not open. Carried inside `io::Error`s so the
/// streaming plumbing stays `Read`/`Write`; see [`SealError::of`].
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SealError {
    #[error("not a cutover backup (bad header)")]
    NotABackup,
    #[error("sealed with key {0:?}, which this agent does not have")]
    UnknownKey(String),
    #[error("the key configured as {0:?} is not the key this backup was sealed with")]
    WrongKey(String),
    #[error("chunk {0} failed authentication (the object was altered)")]
    Corrupt(u32),
    #[error("the stream ends before its last chunk (truncated)")]
    Truncated,
    #[error("bytes after the last chunk")]
    Trailing,
    #[error("bad key {0}")]
    BadKey(String),
}

impl SealError {
    /// The seal error inside an I/O error, if that is what it is.
    pub fn of(e: &io::Error) -> Option<&SealError> {
        e.get_ref().and_then(|inner| inner.downcast_ref::<SealError>())
    }

    fn io(self) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, self)
    }
}

/// A 256-bit backup key and the id it is configured under.
#[derive(Clone)]
pub struct BackupKey {
    pub id: String,
    key: [u8; 32],
}

impl std::fmt::Debug for BackupKey {
    // Never the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl BackupKey {
    /// `id` (1 to 64 characters of `[A-Za-z0-9._-]`) and 32 key bytes.
    pub fn new(id: &str, key: [u8; 32]) -> Result<BackupKey, SealError> {
        if id.is_empty()
            || id.len() > 64
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(SealError::BadKey(format!(
                "id {}: use 1 to 64 of A-Z a-z 0-9 . _ -",
                cutover_shared::domain::quote(id)
            )));
        }
        Ok(BackupKey { id: id.to_owned(), key })
    }

    /// Reads a key file: 64 hexadecimal characters (`openssl rand -hex 32`),
    /// surrounding whitespace ignored. Errors name the file, never its content.
    pub fn from_file(id: &str, path: &Path) -> Result<BackupKey, SealError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| SealError::BadKey(format!("{}: cannot read: {e}", path.display())))?;
        let hex = text.trim();
        let bad = || SealError::BadKey(format!("{}: expected 64 hexadecimal characters", path.display()));
        if hex.len() != 64 {
            return Err(bad());
        }
        let mut key = [0u8; 32];
        for (i, b) in key.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16).map_err(|_| bad())?;
        }
        BackupKey::new(id, key)
    }

    /// A fresh random key (tests, `cutover dev`).
    pub fn generate(id: &str) -> Result<BackupKey, SealError> {
        let mut key = [0u8; 32];
        aws_lc_rs::rand::fill(&mut key).map_err(|_| SealError::BadKey("no randomness".into()))?;
        BackupKey::new(id, key)
    }

    /// The key as 64 hexadecimal characters, for writing a key file.
    pub fn to_hex(&self) -> String {
        cutover_shared::release::hex(&self.key)
    }

    fn check(&self) -> [u8; 16] {
        let d = Sha256::new()
            .chain_update(b"cutover backup key check\0")
            .chain_update(self.key)
            .finalize();
        let mut out = [0u8; 16];
        out.copy_from_slice(&d[..16]);
        out
    }

    fn aead(&self) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &self.key).expect("32 bytes is an AES-256 key"))
    }
}

fn nonce(prefix: &[u8; PREFIX], counter: u32, last: bool) -> Nonce {
    let mut n = [0u8; 12];
    n[..PREFIX].copy_from_slice(prefix);
    n[PREFIX..PREFIX + 4].copy_from_slice(&counter.to_be_bytes());
    n[11] = u8::from(last);
    Nonce::assume_unique_for_key(n)
}

/// Seals what is written to it into `out`. Call [`Sealer::finish`]: a
/// sealer dropped without it leaves a truncated stream, which never opens.
pub struct Sealer<W: Write> {
    out: W,
    key: LessSafeKey,
    prefix: [u8; PREFIX],
    header: Vec<u8>,
    counter: u32,
    buf: Vec<u8>,
}

impl<W: Write> Sealer<W> {
    pub fn new(mut out: W, key: &BackupKey) -> io::Result<Sealer<W>> {
        let mut prefix = [0u8; PREFIX];
        aws_lc_rs::rand::fill(&mut prefix).map_err(|_| io::Error::other("no randomness for a nonce"))?;
        let mut header = MAGIC.to_vec();
        header.push(key.id.len() as u8);
        header.extend_from_slice(key.id.as_bytes());
        header.extend_from_slice(&key.check());
        header.extend_from_slice(&prefix);
        out.write_all(&header)?;
        Ok(Sealer {
            out,
            key: key.aead(),
            prefix,
            header,
            counter: 0,
            buf: Vec::with_capacity(CHUNK + TAG),
        })
    }

    fn seal_chunk(&mut self, last: bool) -> io::Result<()> {
        if self.counter == u32::MAX {
            return Err(io::Error::other("backup too large for one stream (256 TiB)"));
        }
        let n = nonce(&self.prefix, self.counter, last);
        self.key
            .seal_in_place_append_tag(n, Aad::from(&self.header[..]), &mut self.buf)
            .map_err(|_| io::Error::other("sealing failed"))?;
        self.out.write_all(&(self.buf.len() as u32).to_be_bytes())?;
        self.out.write_all(&self.buf)?;
        self.buf.clear();
        self.counter += 1;
        Ok(())
    }

    /// Seals the rest as the last chunk and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.seal_chunk(true)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

impl<W: Write> Write for Sealer<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        // A full chunk is sealed only when more data follows, so the last
        // chunk is never an empty one after a full one by accident: either
        // way the flag marks the end.
        if self.buf.len() == CHUNK && !data.is_empty() {
            self.seal_chunk(false)?;
        }
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Opens a sealed stream, yielding the plaintext. Every error is an
/// `io::Error` carrying a [`SealError`].
pub struct Opener<R: Read> {
    input: R,
    key: LessSafeKey,
    prefix: [u8; PREFIX],
    header: Vec<u8>,
    counter: u32,
    plain: Vec<u8>,
    at: usize,
    done: bool,
}

fn read_exact_or(input: &mut impl Read, buf: &mut [u8], short: SealError) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) => return Err(short.io()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl<R: Read> Opener<R> {
    /// Reads the header and picks the key it names from `keys`.
    pub fn new(mut input: R, keys: &[BackupKey]) -> io::Result<Opener<R>> {
        let mut fixed = [0u8; 9];
        read_exact_or(&mut input, &mut fixed, SealError::NotABackup)?;
        if &fixed[..8] != MAGIC {
            return Err(SealError::NotABackup.io());
        }
        let mut id = vec![0u8; fixed[8] as usize];
        read_exact_or(&mut input, &mut id, SealError::NotABackup)?;
        let mut rest = [0u8; 16 + PREFIX];
        read_exact_or(&mut input, &mut rest, SealError::NotABackup)?;
        let id = String::from_utf8(id).map_err(|_| SealError::NotABackup.io())?;
        let key = keys
            .iter()
            .find(|k| k.id == id)
            .ok_or_else(|| SealError::UnknownKey(id.clone()).io())?;
        if key.check()[..] != rest[..16] {
            return Err(SealError::WrongKey(id).io());
        }
        let mut header = fixed.to_vec();
        header.extend_from_slice(id.as_bytes());
        header.extend_from_slice(&rest);
        let mut prefix = [0u8; PREFIX];
        prefix.copy_from_slice(&rest[16..]);
        Ok(Opener {
            input,
            key: key.aead(),
            prefix,
            header,
            counter: 0,
            plain: Vec::with_capacity(CHUNK + TAG),
            at: 0,
            done: false,
        })
    }

    /// Reads and opens the next chunk into `self.plain`.
    fn next_chunk(&mut self) -> io::Result<()> {
        let mut len = [0u8; 4];
        read_exact_or(&mut self.input, &mut len, SealError::Truncated)?;
        let len = u32::from_be_bytes(len) as usize;
        if !(TAG..=CHUNK + TAG).contains(&len) {
            return Err(SealError::Corrupt(self.counter).io());
        }
        self.plain.resize(len, 0);
        read_exact_or(&mut self.input, &mut self.plain, SealError::Truncated)?;
        // Try as a middle chunk, then as the last: the flag is part of the
        // nonce, so only the right guess authenticates.
        let aad = Aad::from(&self.header[..]);
        let mut copy = self.plain.clone();
        let last = match self
            .key
            .open_in_place(nonce(&self.prefix, self.counter, false), aad, &mut copy)
        {
            Ok(p) => {
                let n = p.len();
                copy.truncate(n);
                false
            }
            Err(_) => {
                let aad = Aad::from(&self.header[..]);
                let n = self
                    .key
                    .open_in_place(nonce(&self.prefix, self.counter, true), aad, &mut self.plain)
                    .map_err(|_| SealError::Corrupt(self.counter).io())?
                    .len();
                self.plain.truncate(n);
                copy = std::mem::take(&mut self.plain);
                true
            }
        };
        self.plain = copy;
        self.at = 0;
        self.counter = self.counter.wrapping_add(1);
        if last {
            self.done = true;
            let mut probe = [0u8; 1];
            loop {
                match self.input.read(&mut probe) {
                    Ok(0) => break,
                    Ok(_) => return Err(SealError::Trailing.io()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }
}

impl<R: Read> Read for Opener<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.at == self.plain.len() {
            if self.done {
                return Ok(0);
            }
            self.next_chunk()?;
        }
        let n = out.len().min(self.plain.len() - self.at);
        out[..n].copy_from_slice(&self.plain[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seal(data: &[u8], key: &BackupKey) -> Vec<u8> {
        let mut s = Sealer::new(Vec::new(), key).unwrap();
        // Odd write sizes, across chunk boundaries.
        for piece in data.chunks(10_007) {
            s.write_all(piece).unwrap();
        }
        s.finish().unwrap()
    }

    fn open(sealed: &[u8], keys: &[BackupKey]) -> Result<Vec<u8>, SealError> {
        let mut out = Vec::new();
        Opener::new(sealed, keys)
            .and_then(|mut o| o.read_to_end(&mut out))
            .map_err(|e| SealError::of(&e).cloned().unwrap_or_else(|| panic!("{e}")))?;
        Ok(out)
    }

    #[test]
    fn round_trips_any_length_and_detects_every_kind_of_damage() {
        let key = BackupKey::generate("k1").unwrap();
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let sealed = seal(&data, &key);
            assert_eq!(open(&sealed, std::slice::from_ref(&key)).unwrap(), data, "length {len}");
            if len == 0 {
                continue;
            }
            // One flipped byte anywhere in the chunks.
            let header = 8 + 1 + 2 + 16 + PREFIX;
            for at in [header + 5, sealed.len() / 2, sealed.len() - 1] {
                let mut bad = sealed.clone();
                bad[at] ^= 0x01;
                let e = open(&bad, std::slice::from_ref(&key)).unwrap_err();
                assert!(matches!(e, SealError::Corrupt(_)), "flip at {at} of {len}: {e}");
            }
            // Cut at a chunk boundary or inside one.
            let first_chunk_end = header + 4 + (len.min(CHUNK) + TAG);
            for cut in [header, first_chunk_end, sealed.len() - 1] {
                if cut >= sealed.len() {
                    continue;
                }
                let e = open(&sealed[..cut], std::slice::from_ref(&key)).unwrap_err();
                assert_eq!(e, SealError::Truncated, "cut at {cut} of {len}");
            }
            let mut longer = sealed.clone();
            longer.push(0);
            assert_eq!(
                open(&longer, std::slice::from_ref(&key)).unwrap_err(),
                SealError::Trailing
            );
        }
    }

    #[test]
    fn keys_rotate_by_id_and_a_wrong_key_is_named() {
        let old = BackupKey::generate("2026-01").unwrap();
        let new = BackupKey::generate("2026-07").unwrap();
        let sealed = seal(b"orders", &old);
        assert_eq!(open(&sealed, &[new.clone(), old.clone()]).unwrap(), b"orders");
        assert_eq!(
            open(&sealed, std::slice::from_ref(&new)).unwrap_err(),
            SealError::UnknownKey("2026-01".into())
        );
        let impostor = BackupKey::generate("2026-01").unwrap();
        assert_eq!(
            open(&sealed, &[impostor]).unwrap_err(),
            SealError::WrongKey("2026-01".into())
        );
        assert_eq!(open(b"PGDMP....", &[old]).unwrap_err(), SealError::NotABackup);
    }

    #[test]
    fn key_files_are_hex_and_errors_do_not_quote_them() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("k");
        let key = BackupKey::generate("k").unwrap();
        std::fs::write(&good, format!("{}\n", key.to_hex())).unwrap();
        assert_eq!(BackupKey::from_file("k", &good).unwrap().to_hex(), key.to_hex());
        let bad = dir.path().join("bad");
        std::fs::write(&bad, "s3cr3t-not-hex").unwrap();
        let e = BackupKey::from_file("k", &bad).unwrap_err().to_string();
        assert!(!e.contains("s3cr3t"), "{e}");
        assert!(!format!("{key:?}").contains(&key.to_hex()));
    }
}
