//! The error types: [`FaultFsError`] for setting up and running the daemon, [`ControlError`] for
//! a malformed control command (sent back as `err <message>`).

use std::io;
use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum FaultFsError {
    #[error("backing directory {path}: {source}")]
    Backing { path: PathBuf, source: io::Error },
    #[error("mounting on {path}: {source}")]
    Mount { path: PathBuf, source: io::Error },
    #[error("control socket {path}: {source}")]
    Control { path: PathBuf, source: io::Error },
    #[error("signal handling: {0}")]
    Signals(io::Error),
    #[error("spawning a thread: {0}")]
    Thread(io::Error),
    #[error("writing dirty data at exit: {0}")]
    FinalSync(io::Error),
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ControlError {
    #[error("empty command")]
    Empty,
    #[error("unknown command {0:?} (cut, fail, clear, stats, sync)")]
    Unknown(String),
    #[error("usage: {0}")]
    Usage(&'static str),
    #[error("bad op {0:?} (read, write, fsync, any)")]
    BadOp(String),
    #[error("bad errno {0:?} (EIO, ENOSPC)")]
    BadErrno(String),
    #[error("bad count {0:?} (a positive integer)")]
    BadCount(String),
    #[error("sync failed: {0}")]
    Sync(String),
}
