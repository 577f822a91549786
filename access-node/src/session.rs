//! One connection from a primary: the handshake of PROTOCOL.md (the Noise handshake of
//! `mirror_proto::secure`, then Attach inside the encrypted link: refuse a second primary,
//! check or create the image), then the data phase: requests applied one at a time in arrival
//! order, replies coalesced into one write whenever the input runs dry. Flushes are answered
//! by a flusher thread (`flusher.rs`) after the replies before them, so replies to requests
//! behind a Flush may come first. ReadHashes are read, hashed and answered by hash workers
//! (`hasher.rs`) while the requests behind them are applied (a write overlapping one waits
//! until its range was read).

use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use mirror_proto::conn::{ConnError, FrameReader};
use mirror_proto::frame::{
    self, AckStatus, Frame, FrameError, NodeInfo, RefuseCode, NODE_FLAG_DISCARD_MY_DATA,
};
use mirror_proto::secure::{self, SecureError, SecureReader, SecureWriter};
use thiserror::Error;

use crate::chain;
use crate::flusher::{FlushQueue, StopOnDrop};
use crate::hasher::{self, HashQueue};
use crate::replica::ReplicaError;
use crate::server::{lock, ClaimError, Node, SlotGuard};
use crate::status::{Counters, PeerState};

/// Replies are written once this much is pending, even if more requests are buffered.
const OUT_HIGH_WATER: usize = 256 * 1024;

#[derive(Debug, Error)]
pub enum SessionError {
    #[error("connection closed by peer")]
    Closed,
    #[error("nothing received for {} s", .0.as_secs())]
    Timeout(Duration),
    #[error("link I/O failed")]
    Io(#[source] io::Error),
    #[error("protocol violation")]
    Frame(#[source] FrameError),
    #[error("peer sent {got} where {expected} was expected")]
    Unexpected {
        got: &'static str,
        expected: &'static str,
        /// Sequence number of the offending frame (the Refuse that answers it carries it).
        seq: u64,
    },
    #[error(
        "a write failed on this replica: the session ends (the primary resyncs on its next attach)"
    )]
    LostWrite,
}

/// A handshake frame, copied out of the reader's buffer.
enum Hs {
    Attach(NodeInfo),
    Refuse(RefuseCode, String),
    Goodbye,
    Other(&'static str),
}

/// How an attached primary's session ended without an error.
enum End {
    Goodbye,
    Refused(RefuseCode, String),
}

struct Session<'n> {
    stream: &'n TcpStream,
    reader: FrameReader<SecureReader<&'n TcpStream>>,
    /// Shared with the flusher thread, which writes the answers to Flushes.
    writer: &'n Mutex<SecureWriter<&'n TcpStream>>,
    out: Vec<u8>,
    node: &'n Node,
    peer: SocketAddr,
}

/// Serves one connection to its end; logs one line for how it ended. `preauth_id`: its entry
/// in `node.admission.preauth`, left once the primary proved the secret (its first record decrypted).
pub fn serve(stream: TcpStream, peer: SocketAddr, node: &Node, preauth_id: u64) {
    debug!("connection from {peer}");
    let keys = match noise(&stream, node) {
        Ok(k) => {
            node.admission.preauth.proven(preauth_id);
            k
        }
        Err(e) => {
            handshake_failed(node, peer, &e);
            return;
        }
    };
    let writer = Mutex::new(SecureWriter::new(&stream, keys.clone()));
    let mut s = Session {
        stream: &stream,
        reader: FrameReader::new(SecureReader::new(&stream, keys)),
        writer: &writer,
        out: Vec::with_capacity(64 * 1024),
        node,
        peer,
    };
    let guard = match s.handshake(|| node.admission.preauth.done(preauth_id)) {
        Ok(Some(g)) => g,
        Ok(None) => return,
        Err(e) => {
            s.refuse_unexpected(&e);
            warn!(
                "connection from {peer} dropped during the handshake: {}",
                chain(&e)
            );
            return;
        }
    };
    let result = s.data_phase();
    // Whatever happened, what the primary had acknowledged is made durable before another
    // primary can attach.
    if let Err(e) = lock(&node.replica).flush() {
        error!("fdatasync after {peer} detached failed: {}", chain(&e));
    }
    let status = &node.status;
    if node.slot.is_fenced() {
        // The promotion logged it; the connection was cut, whatever the session saw.
        debug!(
            "primary {peer} cut off: {result:?}",
            result = result.as_ref().err()
        );
        status.detached(Some(format!("{peer} fenced: this node was promoted")));
        drop(guard);
        return;
    }
    match result {
        Ok(End::Goodbye) => {
            info!("primary {peer} detached cleanly");
            status.detached(None);
        }
        Ok(End::Refused(code, reason)) => {
            let line = format!("primary {peer} refused this node ({code:?}): {reason}");
            if status.refused_by_primary(refusal_state(code), reason) {
                warn!("{line}");
            } else {
                debug!("{line} (again)");
            }
        }
        Err(e) => {
            s.refuse_unexpected(&e);
            let why = chain(&e);
            warn!("primary {peer} dropped: {why}");
            status.detached(Some(why));
        }
    }
    drop(guard);
}

/// Runs the Noise handshake with the socket's handshake timeouts (the server's reaper enforces
/// the absolute deadline).
fn noise(stream: &TcpStream, node: &Node) -> Result<secure::Keys, HandshakeFailure> {
    let io = HandshakeFailure::Io;
    stream.set_nodelay(true).map_err(io)?;
    stream
        .set_read_timeout(Some(node.handshake_timeout))
        .and_then(|()| stream.set_write_timeout(Some(node.handshake_timeout)))
        .map_err(io)?;
    let mut s = stream;
    match secure::respond(&mut s, &node.secret, &node.replays) {
        Ok(k) => Ok(k),
        Err(SecureError::OldVersion(v)) => {
            // The one thing said in clear: why a protocol 1 primary cannot attach.
            let mut out = Vec::new();
            frame::encode_v1_refuse(&SecureError::OldVersion(v).to_string(), &mut out);
            let mut w = stream;
            let _ = w.write_all(&out);
            Err(HandshakeFailure::Secure(SecureError::OldVersion(v)))
        }
        Err(e) => Err(HandshakeFailure::Secure(e)),
    }
}

/// Why a connection never authenticated.
#[derive(Debug, Error)]
enum HandshakeFailure {
    #[error("link I/O failed")]
    Io(#[source] io::Error),
    #[error(transparent)]
    Secure(SecureError),
    #[error("no first record that authenticates it")]
    FirstRecord(#[source] ConnError),
}

/// Counts and logs (rate-limited: anyone can connect) a connection that did not authenticate.
/// Nothing it sent reaches the peer state in status.
fn handshake_failed(node: &Node, peer: SocketAddr, e: &HandshakeFailure) {
    node.status
        .handshake_failed(format!("{peer}: {}", chain(e)));
    if let Some(more) = node.handshake_log.tick() {
        let more = if more > 0 {
            format!(" ({more} more since the last message)")
        } else {
            String::new()
        };
        warn!(
            "connection from {peer} dropped before authenticating: {}{more}",
            chain(e)
        );
    }
}

fn refusal_state(code: RefuseCode) -> PeerState {
    match code {
        RefuseCode::AuthFailed => PeerState::AuthFailed,
        RefuseCode::SplitBrain => PeerState::SplitBrain,
        _ => PeerState::Refused,
    }
}

const FENCED_REASON: &str = "this node was promoted: it accepts no primary";

fn conn_error(e: ConnError, timeout: Duration) -> SessionError {
    if e.is_timeout() {
        return SessionError::Timeout(timeout);
    }
    match e {
        ConnError::Closed => SessionError::Closed,
        ConnError::Io(e) => SessionError::Io(e),
        ConnError::Frame(f) => SessionError::Frame(f),
        ConnError::Unexpected(got) => SessionError::Unexpected {
            got,
            expected: "another frame",
            seq: 0,
        },
    }
}

impl<'n> Session<'n> {
    fn set_timeouts(&self, t: Duration) -> Result<(), SessionError> {
        self.stream
            .set_read_timeout(Some(t))
            .and_then(|()| self.stream.set_write_timeout(Some(t)))
            .map_err(SessionError::Io)
    }

    fn hs(d: frame::Decoded<'_>) -> Result<(u64, Hs), SessionError> {
        let hs = match d.frame {
            Frame::Attach(n) => Hs::Attach(n),
            Frame::Refuse { code, reason } => Hs::Refuse(code, reason.to_owned()),
            Frame::Goodbye => Hs::Goodbye,
            ref f => Hs::Other(f.name()),
        };
        Ok((d.seq, hs))
    }

    /// Appends a reply to the output buffer.
    fn push(&mut self, seq: u64, f: &Frame<'_>) {
        frame::encode(seq, f, &mut self.out);
    }

    /// Writes the pending replies.
    fn flush_out(&mut self) -> Result<(), SessionError> {
        if self.out.is_empty() {
            return Ok(());
        }
        flush_pending(self.writer, &mut self.out, self.node)
    }

    fn send(&mut self, seq: u64, f: &Frame<'_>) -> Result<(), SessionError> {
        self.push(seq, f);
        self.flush_out()
    }

    /// Refuses the connection (best effort: it is closed right after).
    fn refuse(&mut self, seq: u64, code: RefuseCode, reason: &str) {
        if let Err(e) = self.send(seq, &Frame::Refuse { code, reason }) {
            debug!("cannot send Refuse to {}: {}", self.peer, chain(&e));
        }
    }

    /// Tells a peer that sent the wrong frame why it is dropped.
    fn refuse_unexpected(&mut self, e: &SessionError) {
        if let SessionError::Unexpected { seq, .. } = e {
            self.out.clear();
            self.refuse(*seq, RefuseCode::Protocol, &e.to_string());
        }
    }

    fn expect(seq: u64, got: Hs, expected: &'static str) -> SessionError {
        let got = match got {
            Hs::Attach(_) => "Attach",
            Hs::Refuse(..) => "Refuse",
            Hs::Goodbye => "Goodbye",
            Hs::Other(name) => name,
        };
        SessionError::Unexpected { got, expected, seq }
    }

    /// Refuses any primary once this node was promoted.
    fn refuse_fenced(&mut self, seq: u64) {
        info!("refused {}: {FENCED_REASON}", self.peer);
        self.refuse(seq, RefuseCode::Fenced, FENCED_REASON);
    }

    /// Refuses a second primary (an authenticated one: it knows the secret).
    fn refuse_busy(&mut self, seq: u64, holder: SocketAddr) {
        let reason = "busy: another primary is attached";
        info!("refused {}: {reason} ({holder})", self.peer);
        self.node
            .status
            .attempt_failed(PeerState::Refused, format!("{}: {reason}", self.peer));
        self.refuse(seq, RefuseCode::Busy, reason);
    }

    /// After the Noise handshake: the first record (Attach) proves the primary; then the
    /// slot, then Attached. `Ok(None)`: refused (logged).
    fn handshake(
        &mut self,
        authenticated: impl FnOnce(),
    ) -> Result<Option<SlotGuard<'n>>, SessionError> {
        let node = self.node;
        let peer = self.peer;
        let first = match self.reader.read_frame() {
            Ok(d) => d,
            // Not authenticated yet: counted and logged (rate-limited) like any failure
            // before authentication.
            Err(e) => {
                handshake_failed(node, peer, &HandshakeFailure::FirstRecord(e));
                return Ok(None);
            }
        };
        authenticated();
        Counters::add(&node.status.counters.bytes_received, first.consumed as u64);
        let (seq, primary) = match Self::hs(first)? {
            (seq, Hs::Attach(n)) => (seq, n),
            (_, Hs::Goodbye) => {
                info!("{peer} left after authenticating");
                return Ok(None);
            }
            (_, Hs::Refuse(code, reason)) => {
                let reason = mirror_proto::control::escape_controls(&reason);
                warn!("{peer} refused this node ({code:?}): {reason}");
                node.status
                    .attempt_failed(refusal_state(code), format!("{peer}: {reason}"));
                return Ok(None);
            }
            (seq, other) => return Err(Self::expect(seq, other, "Attach")),
        };
        if node.slot.is_fenced() {
            self.refuse_fenced(seq);
            return Ok(None);
        }
        let clone = self.stream.try_clone().map_err(SessionError::Io)?;
        let guard = match node.slot.try_claim(peer, clone) {
            Ok(g) => g,
            Err(ClaimError::Busy(holder)) => {
                self.refuse_busy(seq, holder);
                return Ok(None);
            }
            Err(ClaimError::Fenced) => {
                self.refuse_fenced(seq);
                return Ok(None);
            }
        };
        node.status.primary_generation(primary.generation);
        let attached = lock(&node.replica).attach(primary.size);
        match attached {
            Ok(info) => {
                // Before the reply: a primary that sees Attached finds the status updated.
                node.status.attached(peer);
                if let Err(e) = self.send(seq, &Frame::Attached(info.clone())) {
                    node.status.detached(Some(chain(&e)));
                    return Err(e);
                }
                let mut notes = String::new();
                if !info.hot.is_empty() {
                    notes.push_str(&format!("; {} hot extent(s) reported", info.hot.len()));
                }
                if info.flags & NODE_FLAG_DISCARD_MY_DATA != 0 {
                    notes.push_str("; this node's data may be discarded");
                }
                info!(
                    "primary {peer} attached: node {:016x}, {} bytes, generation {:016x}; \
                     replica generation {:016x}, {}, {}{notes}",
                    primary.node_id,
                    primary.size,
                    primary.generation,
                    info.generation,
                    info.role.as_str(),
                    info.disk_state.as_str()
                );
                Ok(Some(guard))
            }
            Err(e) => {
                let (code, reason) = match &e {
                    ReplicaError::SizeMismatch { .. } => (RefuseCode::SizeMismatch, e.to_string()),
                    ReplicaError::Fenced => (RefuseCode::Fenced, FENCED_REASON.to_owned()),
                    _ => (RefuseCode::Other, chain(&e)),
                };
                error!("refused primary {peer}: {reason}");
                node.status
                    .attempt_failed(PeerState::Refused, reason.clone());
                self.refuse(seq, code, &reason);
                Ok(None)
            }
        }
    }

    /// Closes our side and reads (and drops) what the primary still sends, for a moment: a
    /// close with unread input would reset the connection, and the replies just written
    /// could be lost.
    fn linger(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        let _ = self
            .stream
            .set_read_timeout(Some(Duration::from_millis(200)));
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut sink = [0u8; 64 * 1024];
        let mut r = self.stream;
        while Instant::now() < deadline {
            match std::io::Read::read(&mut r, &mut sink) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }

    /// Applies requests until the primary leaves or the link fails. Flushes run on a flusher
    /// thread beside it (`flusher.rs`), so the requests behind a Flush are applied while it
    /// runs.
    fn data_phase(&mut self) -> Result<End, SessionError> {
        let node = self.node;
        self.set_timeouts(node.idle_timeout)?;
        let flushes = FlushQueue::default();
        let hashes = HashQueue::default();
        let (writer, stream) = (self.writer, self.stream);
        std::thread::scope(|scope| {
            let stop_hashes = hasher::StopOnDrop(&hashes);
            let flusher = std::thread::Builder::new()
                .name("replica-flush".into())
                .spawn_scoped(scope, || flushes.run(node, writer, stream))
                .map_err(SessionError::Io)?;
            let stop = StopOnDrop(&flushes);
            for _ in 0..hasher::WORKERS {
                std::thread::Builder::new()
                    .name("replica-hash".into())
                    .spawn_scoped(scope, || hashes.run(node, writer, stream))
                    .map_err(SessionError::Io)?;
            }
            let r = self.apply_requests(&flushes, &hashes);
            drop(stop);
            drop(stop_hashes);
            let _ = flusher.join();
            r
        })
    }

    fn apply_requests(
        &mut self,
        flushes: &FlushQueue,
        hashes: &HashQueue,
    ) -> Result<End, SessionError> {
        let node = self.node;
        let mut logged = Logged::default();
        let mut rbuf = Vec::new();
        loop {
            let d = match self.reader.read_frame() {
                Ok(d) => d,
                // Waiting for a long fdatasync (or a hash) is not idleness (the primary waits
                // too).
                Err(e) if e.is_timeout() && (flushes.busy() || hashes.busy()) => continue,
                Err(e) => {
                    // Replies already computed still go out if the link allows.
                    let _ = flush_pending(self.writer, &mut self.out, node);
                    if flushes.failed().is_some() {
                        return Err(SessionError::LostWrite);
                    }
                    return Err(conn_error(e, node.idle_timeout));
                }
            };
            Counters::add(&node.status.counters.bytes_received, d.consumed as u64);
            node.status.primary_activity();
            let seq = d.seq;
            if flushes.failed().is_some() {
                // A flush failed: nothing behind it is applied (it was answered, the image is
                // recorded outdated).
                self.flush_out()?;
                self.linger();
                return Err(SessionError::LostWrite);
            }
            match d.frame {
                Frame::Goodbye => {
                    hashes.drain();
                    let failed = flushes.drain();
                    flush_pending(self.writer, &mut self.out, node)?;
                    if failed.is_some() {
                        return Err(SessionError::LostWrite);
                    }
                    return Ok(End::Goodbye);
                }
                Frame::Refuse { code, reason } => {
                    let reason = mirror_proto::control::escape_controls(reason);
                    flush_pending(self.writer, &mut self.out, node)?;
                    return Ok(End::Refused(code, reason));
                }
                Frame::Flush => {
                    // The answers to everything before it go out first: the primary sees a
                    // Flush's ack only after the acks of the writes it covers.
                    self.flush_out()?;
                    let may_answer = {
                        let rep = lock(&node.replica);
                        !rep.is_fenced() && !rep.writeback_failed()
                    };
                    if flushes.push(seq, may_answer) {
                        // Already durable: an early fdatasync covering it succeeded.
                        Counters::add(&node.status.counters.flushes, 1);
                        self.send(
                            seq,
                            &Frame::Ack {
                                status: AckStatus::Ok,
                            },
                        )?;
                    }
                    continue;
                }
                Frame::ReadHashes { offset, len } => {
                    // Read and hashed by a hash worker (`hasher.rs`), which answers it;
                    // everything before it has been applied. (The replies before it still go
                    // out below, once the input runs dry.)
                    hashes.push(seq, offset, len);
                }
                f => {
                    // A write-type request applied only once no ReadHashes before it still
                    // has to read its range.
                    match &f {
                        Frame::Write { offset, data, .. } => {
                            hashes.wait_clear(*offset, data.len() as u64)
                        }
                        Frame::Discard { offset, len } | Frame::WriteZeroes { offset, len, .. } => {
                            hashes.wait_clear(*offset, *len)
                        }
                        _ => {}
                    }
                    if matches!(f, Frame::SyncDone { .. }) && flushes.drain().is_some() {
                        // Recorded up to date without what a failed flush lost: never.
                        self.flush_out()?;
                        self.linger();
                        return Err(SessionError::LostWrite);
                    }
                    let writes = matches!(
                        f,
                        Frame::Write { .. } | Frame::Discard { .. } | Frame::WriteZeroes { .. }
                    );
                    let lost = apply(seq, f, &mut self.out, node, &mut logged, &mut rbuf)?;
                    if writes {
                        // Counted once applied: a Flush behind it needs an fdatasync that
                        // began after this (flusher.rs).
                        flushes.wrote();
                    }
                    node.status.primary_activity();
                    if lost {
                        // Nothing after a lost write may be applied (a SyncDone already on
                        // the wire would make this image up to date without it).
                        self.flush_out()?;
                        self.linger();
                        return Err(SessionError::LostWrite);
                    }
                }
            }
            if !self.reader.has_frame() || self.out.len() >= OUT_HIGH_WATER {
                self.flush_out()?;
            }
        }
    }
}

fn flush_pending(
    w: &Mutex<SecureWriter<&TcpStream>>,
    out: &mut Vec<u8>,
    node: &Node,
) -> Result<(), SessionError> {
    if out.is_empty() {
        return Ok(());
    }
    w.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .send(out)
        .map_err(SessionError::Io)?;
    Counters::add(&node.status.counters.bytes_sent, out.len() as u64);
    out.clear();
    Ok(())
}

/// Which kinds of failure were logged on this connection (each is logged once, then counted).
#[derive(Default)]
struct Logged {
    no_space: bool,
    io_error: bool,
    out_of_range: bool,
}

/// Applies one data-phase request and appends its reply to `out`. True: a write-type request
/// (or a flush) failed, the image lacks data from now on, and the session must end.
fn apply(
    seq: u64,
    f: Frame<'_>,
    out: &mut Vec<u8>,
    node: &Node,
    logged: &mut Logged,
    rbuf: &mut Vec<u8>,
) -> Result<bool, SessionError> {
    let status = &node.status;
    let c = &status.counters;
    // One guard for the request and, if it fails, the outdated record: a promotion cannot
    // come in between.
    let mut rep = lock(&node.replica);
    let changes_data = matches!(
        f,
        Frame::Write { .. }
            | Frame::Discard { .. }
            | Frame::WriteZeroes { .. }
            | Frame::SyncDone { .. }
    );
    let result = match f {
        Frame::Write {
            offset,
            resync,
            data,
        } => {
            let start = Instant::now();
            let r = rep.write(offset, data);
            let spent = start.elapsed();
            c.local_write.record(spent);
            Counters::add(&c.write_nanos, spent.as_nanos() as u64);
            Counters::add(&c.writes, 1);
            if r.is_ok() {
                Counters::add(&c.bytes_written, data.len() as u64);
                if resync {
                    status.resync_progress(data.len() as u64);
                }
            }
            r
        }
        Frame::Discard { offset, len } => {
            Counters::add(&c.discards, 1);
            rep.discard(offset, len)
        }
        Frame::WriteZeroes { offset, len, unmap } => {
            Counters::add(&c.write_zeroes, 1);
            rep.write_zeroes(offset, len, unmap)
        }
        Frame::Read { offset, len } => {
            Counters::add(&c.reads, 1);
            rbuf.resize(len as usize, 0);
            match rep.read(offset, rbuf) {
                Ok(()) => {
                    Counters::add(&c.bytes_read, u64::from(len));
                    frame::encode(seq, &Frame::ReadData { data: rbuf }, out);
                    return Ok(false);
                }
                Err(e) => Err(e),
            }
        }
        Frame::SyncStart { full, bytes } => {
            let r = rep.sync_start();
            if r.is_ok() {
                status.sync_started(bytes);
                info!(
                    "{} resync started: {bytes} bytes to copy; replica inconsistent until it ends",
                    if full { "full" } else { "partial" }
                );
            }
            r
        }
        Frame::SyncDone { generation } => {
            let r = rep.sync_done(generation);
            if r.is_ok() {
                status.sync_done();
                info!(
                    "resync done: replica up to date at generation {generation:016x}, \
                     role secondary"
                );
            }
            r
        }
        Frame::Ping { nanos } => {
            frame::encode(seq, &Frame::Pong { nanos }, out);
            return Ok(false);
        }
        other => {
            return Err(SessionError::Unexpected {
                got: other.name(),
                expected: "a request",
                seq,
            })
        }
    };
    let ack = match result {
        Ok(()) => AckStatus::Ok,
        Err(e) => {
            Counters::add(&c.errors, 1);
            let ack = e.ack_status();
            if changes_data && ack != AckStatus::Fenced && ack != AckStatus::OutOfRange {
                // This image lacks a write (or a flush lost some) from now on: recorded
                // before the primary hears of it.
                if let Err(me) = rep.mark_outdated() {
                    error!(
                        "image {}: cannot record that it is outdated: {}; dropping the primary",
                        status.image().display(),
                        chain(&me)
                    );
                    return Err(SessionError::Io(std::io::Error::other(
                        "cannot record the replica outdated",
                    )));
                }
            }
            let first = match ack {
                // The promotion logged it.
                AckStatus::Fenced => false,
                AckStatus::NoSpace => !std::mem::replace(&mut logged.no_space, true),
                AckStatus::OutOfRange => !std::mem::replace(&mut logged.out_of_range, true),
                _ => !std::mem::replace(&mut logged.io_error, true),
            };
            if first {
                error!(
                    "image {}: {} (answered {ack:?}); further such errors on this connection \
                     are only counted",
                    status.image().display(),
                    chain(&e)
                );
            }
            ack
        }
    };
    frame::encode(seq, &Frame::Ack { status: ack }, out);
    // (Fenced: promoted, the image is released; nothing is applied any more anyway.)
    Ok(changes_data
        && !matches!(
            ack,
            AckStatus::Ok | AckStatus::OutOfRange | AckStatus::Fenced
        ))
}
