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
//!   before that. Answered Fenced if the holder of g was promoted first: the primary is
//!   superseded and acknowledges no further write.
//! - `Promote(g)`, from a replica holding g up to date: answered Ok once "the holder of g was
//!   promoted" is on disk; Outdated if a primary recorded it outdated first.
//! - `Clear(g)`, from a primary whose replica (which held g) is in sync again: its outdated
//!   record goes. Promotion records stay (the old primary they supersede may still be
//!   running); the oldest records are dropped beyond [`MAX_RECORDS`].
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
        let g = hex(generation);
        self.records
            .iter()
            .find(|r| r.generation == g)
            .map(|r| r.state)
    }

    fn set(&mut self, generation: u64, state: State, now: u64) {
        self.records.retain(|r| r.generation != hex(generation));
        self.records.push(Record {
            generation: hex(generation),
            state,
            since: now,
        });
        if self.records.len() > MAX_RECORDS {
            let extra = self.records.len() - MAX_RECORDS;
            self.records.drain(..extra);
        }
    }

    /// Applies one request at time `now` (seconds since 1970).
    pub fn decide(&mut self, op: WitnessOp, generation: u64, now: u64) -> Decision {
        let have = self.state_of(generation);
        let (answer, change) = match (op, have) {
            (WitnessOp::Outdate, Some(State::Promoted)) => (AckStatus::Fenced, None),
            (WitnessOp::Outdate, Some(State::Outdated)) => (AckStatus::Ok, None),
            (WitnessOp::Outdate, None) => (AckStatus::Ok, Some(Some(State::Outdated))),
            (WitnessOp::Promote, Some(State::Outdated)) => (AckStatus::Outdated, None),
            (WitnessOp::Promote, Some(State::Promoted)) => (AckStatus::Ok, None),
            (WitnessOp::Promote, None) => (AckStatus::Ok, Some(Some(State::Promoted))),
            (WitnessOp::Clear, Some(State::Outdated)) => (AckStatus::Ok, Some(None)),
            (WitnessOp::Clear, _) => (AckStatus::Ok, None),
        };
        match change {
            Some(Some(state)) => self.set(generation, state, now),
            Some(None) => self.records.retain(|r| r.generation != hex(generation)),
            None => {}
        }
        Decision {
            answer,
            changed: change.is_some(),
        }
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
    if book.records.len() > MAX_RECORDS
        || book
            .records
            .iter()
            .any(|r| r.generation.len() != 16 || u64::from_str_radix(&r.generation, 16).is_err())
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
    conn::send(&mut writer, 1, &Frame::Witness { op, generation })?;
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

    #[test]
    fn outdate_and_promote_exclude_each_other_in_either_order() {
        let mut b = Book::new();
        let d = b.decide(WitnessOp::Outdate, 7, 1);
        assert_eq!((d.answer, d.changed), (AckStatus::Ok, true));
        assert!(!b.decide(WitnessOp::Outdate, 7, 2).changed);
        assert_eq!(
            b.decide(WitnessOp::Promote, 7, 3).answer,
            AckStatus::Outdated
        );
        let mut b = Book::new();
        assert_eq!(b.decide(WitnessOp::Promote, 7, 1).answer, AckStatus::Ok);
        assert_eq!(b.decide(WitnessOp::Promote, 7, 1).answer, AckStatus::Ok);
        assert_eq!(b.decide(WitnessOp::Outdate, 7, 2).answer, AckStatus::Fenced);
        // Clear forgets an outdated record only: a promotion still supersedes.
        assert!(!b.decide(WitnessOp::Clear, 7, 3).changed);
        assert_eq!(b.decide(WitnessOp::Outdate, 7, 4).answer, AckStatus::Fenced);
        // Other generations are other replicas.
        assert_eq!(b.decide(WitnessOp::Outdate, 8, 4).answer, AckStatus::Ok);
        assert!(b.decide(WitnessOp::Clear, 8, 5).changed);
        assert_eq!(b.decide(WitnessOp::Promote, 8, 6).answer, AckStatus::Ok);
    }

    #[test]
    fn the_book_is_bounded_and_survives_a_reload() {
        let d = tempfile::tempdir().unwrap();
        let mut b = Book::new();
        for g in 0..(MAX_RECORDS as u64 + 10) {
            b.decide(WitnessOp::Outdate, g, g);
        }
        assert_eq!(b.records().len(), MAX_RECORDS);
        assert_eq!(b.state_of(0), None, "the oldest went first");
        assert_eq!(b.state_of(MAX_RECORDS as u64 + 9), Some(State::Outdated));
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
            b"{\"format\": 1, \"records\": [{\"generation\": \"xyz\", \"state\": \"outdated\", \"since\": 0}]}",
            b"{\"format\": 1, \"records\": [], \"extra\": 1}",
        ] {
            std::fs::write(d.path().join(BOOK_FILE), bad).unwrap();
            let e = load(d.path()).unwrap_err();
            assert!(matches!(e, BookError::Damaged { .. }), "{e}");
        }
    }
}
