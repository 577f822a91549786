//! `access-node witness`: the quorum witness, a third party with no disk image that records
//! which side of a broken pair may go on (the rules: `mirror_proto::witness`). One request per
//! connection: the Noise handshake with the shared secret, one Witness frame, one Ack, whose
//! decision is on disk (`DIR/witness.json`) before it is sent. Connections that have not
//! authenticated are limited as access-node's own are (`preauth.rs`).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::{error, info, warn};
use mirror_proto::auth::{AuthError, Secret};
use mirror_proto::conn::{self, FrameReader};
use mirror_proto::control::{self, Handler};
use mirror_proto::frame::{AckStatus, Frame, WitnessOp};
use mirror_proto::secure::{self, ReplayGuard, SecureReader, SecureWriter};
use mirror_proto::sys::{GroupError, SocketAccess, SocketPathError};
use mirror_proto::witness::{self, Book, BookError};
use serde_json::{json, Value};
use thiserror::Error;

use crate::args::WitnessArgs;
use crate::chain;
use crate::preauth::{Admission, RateLimitedLog, MAX_PREAUTH, REAP_INTERVAL};
use crate::server::{defer_accept, lock};

/// The whole exchange (handshake, request, answer) of one connection.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_CONNECTIONS: usize = 2 * MAX_PREAUTH + 16;

#[derive(Debug, Error)]
pub enum WitnessError {
    #[error("--listen {addr:?} is not an address like 127.0.0.1:7900")]
    Listen {
        addr: String,
        #[source]
        source: std::net::AddrParseError,
    },
    #[error(transparent)]
    Secret(#[from] AuthError),
    #[error("--socket-group")]
    SocketGroup(#[source] GroupError),
    #[error("--state-dir {0}: not a directory")]
    StateDir(PathBuf),
    #[error(transparent)]
    Book(#[from] BookError),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Control(#[from] SocketPathError),
    #[error("cannot start a thread")]
    Thread(#[source] std::io::Error),
}

struct Witness {
    secret: Secret,
    dir: PathBuf,
    book: Mutex<Book>,
    replays: ReplayGuard,
    admission: Admission,
    /// Connections that failed to authenticate (anyone can cause these: rate-limited).
    log: RateLimitedLog,
    requests: AtomicU64,
    refused: AtomicU64,
    handshake_failures: AtomicU64,
}

impl Witness {
    fn status(&self) -> Value {
        let book = lock(&self.book);
        json!({
            "role": "witness",
            "state_dir": self.dir,
            "records": book.records(),
            "requests": self.requests.load(Ordering::Relaxed),
            "refused": self.refused.load(Ordering::Relaxed),
            "handshake_failures": self.handshake_failures.load(Ordering::Relaxed),
        })
    }

    /// Decides one request; the decision is on disk before it is returned (IoError if it
    /// cannot be: nothing changed then).
    fn decide(&self, op: WitnessOp, generation: u64, node: u64, peer: SocketAddr) -> AckStatus {
        let mut book = lock(&self.book);
        let mut next = book.clone();
        let d = next.decide(op, generation, node, now_secs());
        if d.changed {
            if let Err(e) = witness::save(&self.dir, &next) {
                error!(
                    "{peer}: {} of generation {generation:016x} not recorded: {}",
                    op.as_str(),
                    chain(&e)
                );
                return AckStatus::IoError;
            }
            *book = next;
        }
        let what = match (op, d.answer) {
            (_, AckStatus::IoError) => "not recorded: the witness is full of promotion records",
            (WitnessOp::Outdate, AckStatus::Ok) => "recorded outdated; its primary goes on",
            (WitnessOp::Outdate, _) => "was promoted: this old primary is refused (superseded)",
            (WitnessOp::Promote, AckStatus::Ok) => "may be promoted (recorded)",
            (WitnessOp::Promote, _) => {
                "was recorded outdated, or another node was promoted from it: promotion refused"
            }
            (WitnessOp::Clear, _) => "in sync again: its outdated record cleared",
        };
        if d.changed || d.answer != AckStatus::Ok {
            info!(
                "{peer} (node {node:016x}): the replica holding generation {generation:016x} {what}"
            );
        }
        if d.answer != AckStatus::Ok {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        d.answer
    }

    /// One connection: handshake, one request, one answer.
    fn serve(&self, stream: TcpStream, peer: SocketAddr, id: u64) {
        let fail = |what: String| {
            self.handshake_failures.fetch_add(1, Ordering::Relaxed);
            if let Some(more) = self.log.tick() {
                warn!("witness connection from {peer} dropped: {what} ({more} more since the last message)");
            }
        };
        let io_setup = stream
            .try_clone()
            .and_then(|c| conn::Deadline::arm(c, EXCHANGE_TIMEOUT))
            .and_then(|d| {
                stream.set_read_timeout(Some(EXCHANGE_TIMEOUT))?;
                stream.set_write_timeout(Some(EXCHANGE_TIMEOUT))?;
                stream.set_nodelay(true)?;
                Ok(d)
            });
        let _deadline = match io_setup {
            Ok(d) => d,
            Err(e) => return fail(e.to_string()),
        };
        let mut s = &stream;
        let keys = match secure::respond(&mut s, &self.secret, &self.replays) {
            Ok(k) => k,
            Err(e) => return fail(chain(&e)),
        };
        self.admission.preauth.proven(id);
        let Ok(read_half) = stream.try_clone() else {
            return fail("cannot clone the socket".into());
        };
        let mut reader = FrameReader::new(SecureReader::new(read_half, keys.clone()));
        let (seq, op, generation, node) = match reader.read_frame() {
            Ok(d) => match d.frame {
                Frame::Witness {
                    op,
                    generation,
                    node,
                } => (d.seq, op, generation, node),
                f => return fail(format!("expected a Witness request, got {}", f.name())),
            },
            Err(e) => return fail(chain(&e)),
        };
        self.requests.fetch_add(1, Ordering::Relaxed);
        let answer = self.decide(op, generation, node, peer);
        let mut writer = SecureWriter::new(&stream, keys);
        if let Err(e) = conn::send(&mut writer, seq, &Frame::Ack { status: answer }) {
            // The decision stands (it is on disk); the node asks again and gets the same.
            warn!("{peer}: cannot send the witness's answer: {}", chain(&e));
        }
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `access-node witness ...`: serves until killed.
pub fn run(a: WitnessArgs) -> Result<(), WitnessError> {
    let listen = a
        .listen
        .parse::<SocketAddr>()
        .map_err(|source| WitnessError::Listen {
            addr: a.listen.clone(),
            source,
        })?;
    let secret = Secret::load(&a.secret_file)?;
    if !a.state_dir.is_dir() {
        return Err(WitnessError::StateDir(a.state_dir));
    }
    let book = witness::load(&a.state_dir)?;
    let access = SocketAccess {
        group: match &a.socket_group {
            Some(g) => {
                Some(mirror_proto::sys::resolve_group(g).map_err(WitnessError::SocketGroup)?)
            }
            None => None,
        },
    };
    let listener = TcpListener::bind(listen).map_err(|source| WitnessError::Bind {
        addr: listen,
        source,
    })?;
    defer_accept(&listener, EXCHANGE_TIMEOUT.as_secs());
    let w = Arc::new(Witness {
        secret,
        dir: a.state_dir.clone(),
        book: Mutex::new(book),
        replays: ReplayGuard::default(),
        admission: Admission::new(MAX_CONNECTIONS),
        log: RateLimitedLog::new("witness handshakes"),
        requests: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        handshake_failures: AtomicU64::new(0),
    });
    if let Some(p) = &a.control {
        let l = mirror_proto::sys::listen_unix(p, &access)?;
        let ww = w.clone();
        let f: Handler = Arc::new(move |cmd| match cmd {
            "status" => ww.status(),
            other => json!({ "error": format!("unknown command {other:?}") }),
        });
        control::spawn_server(l, access, f).map_err(WitnessError::Thread)?;
    }
    let ww = w.clone();
    std::thread::Builder::new()
        .name("handshake-reaper".into())
        .spawn(move || loop {
            std::thread::sleep(REAP_INTERVAL);
            ww.admission.preauth.reap(EXCHANGE_TIMEOUT);
        })
        .map_err(WitnessError::Thread)?;
    info!(
        "witness listening on {} (state in {}, {} record(s))",
        listener.local_addr().unwrap_or(listen),
        a.state_dir.display(),
        lock(&w.book).records().len()
    );
    Admission::accept_loop(
        &w,
        |w| &w.admission,
        &listener,
        "witness",
        |w, stream, peer, id| w.serve(stream, peer, id),
    );
    Ok(())
}
