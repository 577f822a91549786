//! The quorum witness: its rules (the [`Book`]), its file, and the client both nodes use.
//!
//! A witness is a third, diskless party that decides the one question two nodes cannot settle
//! alone once the link between them is gone: may the primary go on acknowledging writes the
//! replica lacks, or may the replica be promoted? Never both. Every record is about **the
//! replica holding a generation** (a random 64-bit identifier both sides know: the replica's
//! up-to-date generation is the base of the primary's out-of-sync bitmap):
//!
//! - `Outdate(g)`, from a primary that lost its replica: answered Ok once "the holder of g is
//!   outdated" is on the witness's disk; the primary acknowledges nothing the replica lacks
//!   before that. Answered Fenced if another node was promoted from g first: the primary is
//!   superseded and acknowledges no further write. (The node promoted from g, now a primary
//!   itself, gets Ok: its replica, the old primary, is the one outdated.) A primary asks for
//!   every generation its replica may hold up to date (its bitmap's base, and its own
//!   generation if a SyncDone may have reached the replica).
//! - `Promote(g)`, from a replica holding g: answered Ok once "this node was promoted from g"
//!   is on disk (again Ok to the same node: a retry); Outdated if a primary recorded the holder
//!   of g outdated first, or another node was promoted from g. A former primary promoting its
//!   own image asks about its base and its generation; the primary that outdated g is answered
//!   Ok for g (it is the newer side).
//! - `Clear(g)`, from a primary whose replica is in sync again: the outdated record of g goes.
//!   Promotion records stay (the old primary they supersede may still be running). A witness
//!   holding [`MAX_RECORDS`] refuses new records (IoError) rather than forget one.
//!
//! The order the witness receives Outdate(g) and Promote(g) in decides; each answer is
//! durable before it is sent, so a witness that restarts answers the same way.

use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::auth::Secret;
use crate::conn::{self, ConnError, FrameReader};
use crate::files;
use crate::frame::{AckStatus, Frame, WitnessOp};
use crate::secure::{self, SecureError, SecureReader, SecureWriter};

/// Records a witness keeps (about 100 bytes each in its file); the oldest go first.
pub const MAX_RECORDS: usize = 4096;
/// The witness's file in its `--state-dir`.
pub const BOOK_FILE: &str = "witness.json";
const BOOK_FORMAT: u32 = 1;

/// What the witness knows about the holder of a generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    Outdated,
    Promoted,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The generation, as 16 hex digits.
    pub generation: String,
    pub state: State,
    /// The node that asked (outdated: the primary; promoted: the promoted node), 16 hex
    /// digits.
    pub node: String,
    /// Seconds since 1970 when it was recorded.
    pub since: u64,
}

/// The witness's decisions, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Book {
    format: u32,
    records: Vec<Record>,
}

/// The answer to a request, and whether the book changed (and must be saved first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub answer: AckStatus,
    pub changed: bool,
}

fn hex(g: u64) -> String {
    format!("{g:016x}")
}

impl Book {
    pub fn new() -> Book {
        Book {
            format: BOOK_FORMAT,
            records: Vec::new(),
        }
    }

    pub fn records(&self) -> &[Record] {
        &self.records
    }

    pub fn state_of(&self, generation: u64) -> Option<State> {
        self.record(generation).map(|r| r.state)
    }

    fn record(&self, generation: u64) -> Option<&Record> {
        let g = hex(generation);
        self.records.iter().find(|r| r.generation == g)
    }

    /// Adds a record; false (nothing changed) if the book is full: a record that still
    /// stands is never dropped to make room (the asker holds, or does not promote, instead).
    fn add(&mut self, generation: u64, state: State, node: u64, now: u64) -> bool {
        if self.records.len() >= MAX_RECORDS {
            return false;
        }
        self.records.push(Record {
            generation: hex(generation),
            state,
            node: hex(node),
            since: now,
        });
        true
    }

    /// Applies one request from `node` at time `now` (seconds since 1970).
    pub fn decide(&mut self, op: WitnessOp, generation: u64, node: u64, now: u64) -> Decision {
        let have = self
            .record(generation)
            .map(|r| (r.state, r.node == hex(node)));
        let (answer, change) = match (op, have) {
            // The node promoted from g is a primary now: its replica is the one outdated.
            (WitnessOp::Outdate, Some((State::Promoted, same))) => (
                if same {
                    AckStatus::Ok
                } else {
                    AckStatus::Fenced
                },
                None,
            ),
            (WitnessOp::Outdate, Some((State::Outdated, _))) => (AckStatus::Ok, None),
            (WitnessOp::Outdate, None) => (AckStatus::Ok, Some(Some(State::Outdated))),
            (WitnessOp::Promote, Some((State::Promoted, true))) => (AckStatus::Ok, None),
            // The primary that outdated the holder of g, promoting its own image again (a
            // former primary back after a restart): it is the newer side.
            (WitnessOp::Promote, Some((State::Outdated, true))) => (AckStatus::Ok, None),
            (WitnessOp::Promote, Some(_)) => (AckStatus::Outdated, None),
            (WitnessOp::Promote, None) => (AckStatus::Ok, Some(Some(State::Promoted))),
            (WitnessOp::Clear, Some((State::Outdated, _))) => (AckStatus::Ok, Some(None)),
            (WitnessOp::Clear, _) => (AckStatus::Ok, None),
        };
        let changed = match change {
            Some(Some(state)) => {
                if !self.add(generation, state, node, now) {
                    return Decision {
                        answer: AckStatus::IoError,
                        changed: false,
                    };
                }
                true
            }
            Some(None) => {
                self.records.retain(|r| r.generation != hex(generation));
                true
            }
            None => false,
        };
        Decision { answer, changed }
    }
}

#[derive(Debug, Error)]
pub enum BookError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is damaged or not a witness file ({why}); the witness refuses to start rather than forget a decision (restore it, or remove it only if neither node can act on an old decision)")]
    Damaged { path: PathBuf, why: String },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Loads the book from `dir` (an empty one if there is no file yet).
pub fn load(dir: &Path) -> Result<Book, BookError> {
    let path = dir.join(BOOK_FILE);
    let bytes = match files::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Book::new()),
        Err(source) => return Err(BookError::Read { path, source }),
    };
    let damaged = |why: String| BookError::Damaged {
        path: path.clone(),
        why,
    };
    let book: Book = serde_json::from_slice(&bytes).map_err(|e| damaged(e.to_string()))?;
    if book.format != BOOK_FORMAT {
        return Err(damaged(format!("format {}", book.format)));
    }
    let is_hex = |s: &str| s.len() == 16 && u64::from_str_radix(s, 16).is_ok();
    if book.records.len() > MAX_RECORDS
        || book
            .records
            .iter()
            .any(|r| !is_hex(&r.generation) || !is_hex(&r.node))
    {
        return Err(damaged("a record out of bounds".into()));
    }
    Ok(book)
}

/// Saves the book in `dir` crash-safely (the old or the new file, never a mix).
pub fn save(dir: &Path, book: &Book) -> Result<(), BookError> {
    let path = dir.join(BOOK_FILE);
    let mut bytes = serde_json::to_vec_pretty(book).map_err(|e| BookError::Write {
        path: path.clone(),
        source: io::Error::other(e),
    })?;
    bytes.push(b'\n');
    files::replace(&path, &bytes).map_err(|source| BookError::Write { path, source })
}

#[derive(Debug, Error)]
pub enum AskError {
    #[error("cannot resolve the witness address {0}")]
    Resolve(String),
    #[error("cannot connect to the witness at {addr}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("handshake with the witness failed")]
    Secure(#[source] SecureError),
    #[error("talking to the witness")]
    Conn(#[from] ConnError),
    #[error("the witness refused: {0}")]
    Refused(String),
}

/// Asks the witness at `addr` one question; its answer (Ok, Fenced, Outdated, or IoError when
/// it cannot record). Everything within about `timeout`.
pub fn ask(
    addr: &str,
    secret: &Secret,
    op: WitnessOp,
    generation: u64,
    node: u64,
    timeout: Duration,
) -> Result<AckStatus, AskError> {
    let sa = addr
        .to_socket_addrs()
        .map_err(|_| AskError::Resolve(addr.to_owned()))?
        .next()
        .ok_or_else(|| AskError::Resolve(addr.to_owned()))?;
    let mut stream =
        TcpStream::connect_timeout(&sa, timeout).map_err(|source| AskError::Connect {
            addr: addr.to_owned(),
            source,
        })?;
    let io = |e| AskError::Conn(ConnError::Io(e));
    let _deadline = conn::Deadline::arm(stream.try_clone().map_err(io)?, timeout).map_err(io)?;
    stream.set_nodelay(true).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let keys = secure::initiate(&mut stream, secret).map_err(AskError::Secure)?;
    let mut reader = FrameReader::new(SecureReader::new(
        stream.try_clone().map_err(io)?,
        keys.clone(),
    ));
    let mut writer = SecureWriter::new(stream, keys);
    conn::send(
        &mut writer,
        1,
        &Frame::Witness {
            op,
            generation,
            node,
        },
    )?;
    let d = reader.read_frame()?;
    match d.frame {
        Frame::Ack { status } if d.seq == 1 => Ok(status),
        Frame::Refuse { reason, .. } => Err(AskError::Refused(reason.to_owned())),
        f => Err(ConnError::Unexpected(f.name()).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = 0xa;
    const R: u64 = 0xb;

    #[test]
    fn outdate_and_promote_exclude_each_other_in_either_order() {
        let mut b = Book::new();
        let d = b.decide(WitnessOp::Outdate, 7, P, 1);
        assert_eq!((d.answer, d.changed), (AckStatus::Ok, true));
        assert!(!b.decide(WitnessOp::Outdate, 7, P, 2).changed);
        assert_eq!(
            b.decide(WitnessOp::Promote, 7, R, 3).answer,
            AckStatus::Outdated
        );
        let mut b = Book::new();
        assert_eq!(b.decide(WitnessOp::Promote, 7, R, 1).answer, AckStatus::Ok);
        assert_eq!(b.decide(WitnessOp::Promote, 7, R, 1).answer, AckStatus::Ok);
        // Another node holding 7 is not the promoted one.
        assert_eq!(
            b.decide(WitnessOp::Promote, 7, P, 1).answer,
            AckStatus::Outdated
        );
        assert_eq!(
            b.decide(WitnessOp::Outdate, 7, P, 2).answer,
            AckStatus::Fenced
        );
        // The promoted node, a primary now, outdates its own replica (the old primary).
        assert_eq!(b.decide(WitnessOp::Outdate, 7, R, 2).answer, AckStatus::Ok);
        // Clear forgets an outdated record only: a promotion still supersedes.
        assert!(!b.decide(WitnessOp::Clear, 7, R, 3).changed);
        assert_eq!(
            b.decide(WitnessOp::Outdate, 7, P, 4).answer,
            AckStatus::Fenced
        );
        // The primary that outdated the holder of 8 may promote its own image from 8 (a
        // former primary); no one else may.
        let mut b2 = Book::new();
        b2.decide(WitnessOp::Outdate, 8, P, 1);
        assert_eq!(b2.decide(WitnessOp::Promote, 8, P, 2).answer, AckStatus::Ok);
        assert_eq!(
            b2.decide(WitnessOp::Promote, 8, R, 2).answer,
            AckStatus::Outdated
        );
        // Other generations are other replicas.
        assert_eq!(b.decide(WitnessOp::Outdate, 8, P, 4).answer, AckStatus::Ok);
        assert!(b.decide(WitnessOp::Clear, 8, P, 5).changed);
        assert_eq!(b.decide(WitnessOp::Promote, 8, R, 6).answer, AckStatus::Ok);
    }

    #[test]
    fn a_full_book_drops_no_record() {
        let mut b = Book::new();
        b.decide(WitnessOp::Promote, 1_000_000, R, 0);
        for g in 0..(MAX_RECORDS as u64 - 1) {
            assert_eq!(b.decide(WitnessOp::Outdate, g, P, g).answer, AckStatus::Ok);
        }
        assert_eq!(b.records().len(), MAX_RECORDS);
        let d = b.decide(WitnessOp::Outdate, u64::MAX, P, 0);
        assert_eq!((d.answer, d.changed), (AckStatus::IoError, false));
        let d = b.decide(WitnessOp::Promote, u64::MAX - 1, R, 0);
        assert_eq!((d.answer, d.changed), (AckStatus::IoError, false));
        // What stands still stands, and a Clear makes room.
        assert_eq!(
            b.decide(WitnessOp::Promote, 0, R, 0).answer,
            AckStatus::Outdated
        );
        assert_eq!(
            b.decide(WitnessOp::Outdate, 1_000_000, P, 0).answer,
            AckStatus::Fenced
        );
        assert!(b.decide(WitnessOp::Clear, 0, P, 0).changed);
        assert_eq!(
            b.decide(WitnessOp::Outdate, u64::MAX, P, 0).answer,
            AckStatus::Ok
        );
    }

    #[test]
    fn the_book_survives_a_reload() {
        let d = tempfile::tempdir().unwrap();
        let mut b = Book::new();
        b.decide(WitnessOp::Outdate, 5, P, 1);
        b.decide(WitnessOp::Promote, 6, R, 2);
        save(d.path(), &b).unwrap();
        assert_eq!(load(d.path()).unwrap(), b);
    }

    #[test]
    fn a_damaged_book_is_refused_and_a_missing_one_is_empty() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(load(d.path()).unwrap(), Book::new());
        for bad in [
            &b"{"[..],
            b"{\"format\": 9, \"records\": []}",
            b"{\"format\": 1, \"records\": [{\"generation\": \"xyz\", \"state\": \"outdated\", \"node\": \"000000000000000a\", \"since\": 0}]}",
            b"{\"format\": 1, \"records\": [{\"generation\": \"0000000000000001\", \"state\": \"outdated\", \"since\": 0}]}",
            b"{\"format\": 1, \"records\": [], \"extra\": 1}",
        ] {
            std::fs::write(d.path().join(BOOK_FILE), bad).unwrap();
            let e = load(d.path()).unwrap_err();
            assert!(matches!(e, BookError::Damaged { .. }), "{e}");
        }
    }
}
