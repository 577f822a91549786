//! The connection manager: keeps trying to reach the replica, authenticates, compares
//! generations, hands the link to the write path and runs resync; on a disconnect it starts
//! over with backoff. "What happens on a disconnect" starts here and in `link.rs` (`fail`).

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use log::{info, warn};
use mirror_proto::conn::{self, error_chain, ConnError, FrameReader};
use mirror_proto::frame::{DiskState, Frame, NodeInfo, RefuseCode};
use mirror_proto::generation::{decide, SyncDecision};
use mirror_proto::secure::{self, SecureError, SecureReader, SecureWriter};
use thiserror::Error;

use super::link::{Link, LinkReader, LinkWriter};
use super::{resync, Mirror, PeerAddr, PeerState};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(3);

#[derive(Debug, Error)]
pub enum HandshakeError {
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("cannot connect to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("link I/O")]
    Conn(#[from] ConnError),
    #[error("handshake with the replica failed")]
    Secure(#[source] SecureError),
    #[error("refused by the replica: {reason}")]
    Refused { code: RefuseCode, reason: String },
    #[error("replica image is {replica} bytes, ours is {ours} bytes")]
    SizeMismatch { replica: u64, ours: u64 },
}

/// Runs forever (until the process exits).
pub fn run(m: Arc<Mirror>, peer: PeerAddr) {
    let mut backoff = BACKOFF_MIN;
    loop {
        if m.stopping.load(Ordering::Relaxed) {
            return;
        }
        match connect(&m, &peer) {
            Ok((writer, reader, replica)) => {
                let attached = std::time::Instant::now();
                serve_link(&m, &peer, writer, reader, replica);
                // A link that dies right away (a replica out of space, say) is retried with
                // growing delays; one that lived a while is retried at once.
                if attached.elapsed() > Duration::from_secs(10) {
                    backoff = BACKOFF_MIN;
                } else {
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
            Err(e) => {
                let msg = error_chain(&e);
                if let (
                    Some(f),
                    HandshakeError::Refused {
                        code: RefuseCode::Fenced,
                        ..
                    },
                ) = (&m.fence, &e)
                {
                    f.superseded(&format!("replica {}: {msg}", peer.addr));
                }
                let (state, wait) = match &e {
                    // A wrong secret on either side: the replica closes without a word
                    // after our first message (it tells no one who lacks the secret anything).
                    HandshakeError::Secure(SecureError::Auth | SecureError::Closed) => {
                        (PeerState::AuthFailed, BACKOFF_MAX)
                    }
                    HandshakeError::Secure(SecureError::OldVersion(_)) => {
                        (PeerState::Refused, BACKOFF_MAX)
                    }
                    HandshakeError::Refused {
                        code: RefuseCode::AuthFailed,
                        ..
                    } => (PeerState::AuthFailed, BACKOFF_MAX),
                    HandshakeError::Refused {
                        code: RefuseCode::SplitBrain,
                        ..
                    } => (PeerState::SplitBrain, BACKOFF_MAX),
                    HandshakeError::Refused { .. } | HandshakeError::SizeMismatch { .. } => {
                        (PeerState::Refused, BACKOFF_MAX)
                    }
                    _ => (PeerState::Disconnected, backoff),
                };
                let (prev_state, prev_reason) = {
                    let s = m.status_lock();
                    (s.state, s.reason.clone())
                };
                if state != prev_state || prev_reason.as_deref() != Some(msg.as_str()) {
                    if state == PeerState::Disconnected {
                        info!("replica {} not reachable (retrying): {msg}", peer.addr);
                    } else {
                        warn!("replica {}: {msg}", peer.addr);
                    }
                }
                m.set_peer(state, Some(msg));
                std::thread::sleep(wait);
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Connects, runs the Noise handshake (both sides prove the secret, session keys agreed), and
/// exchanges node information inside the encrypted link.
fn connect(
    m: &Mirror,
    peer: &PeerAddr,
) -> Result<(LinkWriter, LinkReader, NodeInfo), HandshakeError> {
    let addr = peer
        .addr
        .to_socket_addrs()
        .map_err(|_| HandshakeError::Resolve(peer.addr.clone()))?
        .next()
        .ok_or_else(|| HandshakeError::Resolve(peer.addr.clone()))?;
    let mut stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|source| {
        HandshakeError::Connect {
            addr: peer.addr.clone(),
            source,
        }
    })?;
    let io = |e| HandshakeError::Conn(ConnError::Io(e));
    // The whole handshake, Attach included, within HANDSHAKE_TIMEOUT however the bytes come.
    let _deadline =
        conn::Deadline::arm(stream.try_clone().map_err(io)?, HANDSHAKE_TIMEOUT).map_err(io)?;
    stream.set_nodelay(true).map_err(io)?;
    stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(io)?;
    stream
        .set_write_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(io)?;
    let keys = secure::initiate(&mut stream, &peer.secret).map_err(HandshakeError::Secure)?;
    let mut reader = FrameReader::new(SecureReader::new(
        stream.try_clone().map_err(io)?,
        keys.clone(),
    ));
    let mut writer = SecureWriter::new(stream, keys);
    let ours = m.sync_state().node_info(0);
    conn::send(&mut writer, 0, &Frame::Attach(ours.clone()))?;
    let replica = match reader.read_frame()?.frame {
        Frame::Attached(info) => info,
        Frame::Refuse { code, reason } => return Err(refused(code, reason)),
        f => return Err(ConnError::Unexpected(f.name()).into()),
    };
    writer.get_ref().set_write_timeout(None).map_err(io)?;
    if replica.size != 0 && replica.size != ours.size {
        let reason = format!(
            "replica image is {} bytes, primary image is {} bytes",
            replica.size, ours.size
        );
        let _ = conn::send(
            &mut writer,
            0,
            &Frame::Refuse {
                code: RefuseCode::SizeMismatch,
                reason: &reason,
            },
        );
        return Err(HandshakeError::SizeMismatch {
            replica: replica.size,
            ours: ours.size,
        });
    }
    Ok((writer, reader, replica))
}

fn refused(code: RefuseCode, reason: &str) -> HandshakeError {
    HandshakeError::Refused {
        code,
        reason: mirror_proto::control::escape_controls(reason),
    }
}

/// Decides what the attached replica needs, then runs the link until it dies.
fn serve_link(
    m: &Arc<Mirror>,
    peer: &PeerAddr,
    mut writer: LinkWriter,
    reader: LinkReader,
    replica: NodeInfo,
) {
    let ours = m.sync_state().node_info(0);
    let decision = decide(&ours, &replica);
    info!(
        "replica {} attached: generation {:016x} ({}), ours {:016x}: {:?}",
        peer.addr,
        replica.generation,
        replica.disk_state.as_str(),
        ours.generation,
        decision
    );
    {
        let mut s = m.status_lock();
        s.peer_generation = Some(replica.generation);
        s.peer_disk = Some(replica.disk_state);
        s.peer_hashes = replica.flags & mirror_proto::frame::NODE_FLAG_HASHES != 0;
    }
    let mut refuse = |code, state, reason: String| {
        let _ = conn::send(
            &mut writer,
            0,
            &Frame::Refuse {
                code,
                reason: &reason,
            },
        );
        warn!("replica {}: {reason}", peer.addr);
        m.set_peer(state, Some(reason));
        std::thread::sleep(BACKOFF_MAX);
    };
    match decision {
        SyncDecision::SplitBrain => {
            return refuse(
                RefuseCode::SplitBrain,
                PeerState::SplitBrain,
                format!(
                    "split brain: both sides wrote since they last agreed (ours {:016x}, replica {:016x}); nothing overwritten",
                    ours.generation, replica.generation
                ),
            )
        }
        SyncDecision::PeerNewer => {
            return refuse(
                RefuseCode::Other,
                PeerState::Refused,
                format!(
                    "the replica has newer data (generation {:016x}) than this primary ({:016x}); not overwriting it",
                    replica.generation, ours.generation
                ),
            )
        }
        _ => {}
    }
    let mm = m.clone();
    let on_down = Box::new(move |ranges: &[(u64, u64)], reason: &str| {
        // One fdatasync for all of them. A failure is retried by every later mark, and the
        // requests that see the link die re-mark their own ranges (failing if that fails).
        if let Err(e) = mm.sync_state().mark_ranges(ranges) {
            log::error!("cannot record out-of-sync ranges: {}", error_chain(&e));
        }
        // Before any waiter hears of it: what the replica lacks is held from now on.
        if let Some(f) = &mm.fence {
            f.link_lost();
        }
        mm.set_peer(PeerState::Disconnected, Some(reason.to_owned()));
        if !mm.sync_state().bitmap.is_clear() {
            mm.status_lock().peer_disk = Some(DiskState::Outdated);
        }
        mm.notify_changed();
    });
    let link = match Link::start(writer, reader, m.stats.clone(), on_down) {
        Ok(l) => l,
        Err(e) => {
            warn!("cannot start the link: {e}");
            return;
        }
    };
    if decision == SyncDecision::Full {
        let marked = m.sync_state().mark_all(replica.generation);
        if let Err(e) = marked {
            log::error!("cannot record a full sync: {}", error_chain(&e));
            link.fail("cannot record a full sync");
            return;
        }
    } else if !replica.hot.is_empty() {
        // The replica was a primary that crashed: its hot extents may hold writes we never
        // saw. Ours are the truth now; copy them over theirs.
        let ext = mirror_proto::activity_log::EXTENT_SIZE;
        let size = m.disk.size();
        let mut s = m.sync_state();
        for &e in &replica.hot {
            let off = e.saturating_mul(ext);
            if off < size {
                if let Err(err) = s.mark(off, ext.min(size - off)) {
                    log::error!("cannot record hot extents: {}", error_chain(&err));
                    drop(s);
                    link.fail("cannot record the replica's hot extents");
                    return;
                }
            }
        }
        info!(
            "replica reports {} hot extent(s) from its time as primary: resyncing them",
            replica.hot.len()
        );
    }
    // Any replica not already at our generation gets a resync, even one with nothing to copy:
    // its SyncDone records our generation there (and makes a returning old primary a
    // secondary).
    if let Some(f) = &m.fence {
        f.attaching(replica.generation);
    }
    let mut need_sync = decision != SyncDecision::InSync;
    // With a witness, a replica attached while writes it lacks may be held (or recorded at
    // the witness) always gets a SyncStart (it is inconsistent, so not promotable, until the
    // SyncDone), and the resync's end clears the witness's records.
    if m.fence_gate()
        .is_some_and(|g| g != super::fence::Gate::Attached)
    {
        need_sync = true;
    }
    let bitmap_clear = m.sync_state().bitmap.is_clear();
    if need_sync || !bitmap_clear {
        // Before any guest write reaches it: the replica records itself inconsistent
        // (durably), so a replica that got some of this generation's writes but not all of
        // the resync is never promoted as up to date.
        // (Not inside the send: the SyncState lock must not be held while waiting, on_down
        // needs it.)
        let bytes = m.sync_state().out_of_sync_bytes();
        let started = link
            .send(Frame::SyncStart {
                full: decision == SyncDecision::Full,
                bytes,
            })
            .map(|w| w.wait());
        if !matches!(
            started,
            Ok(Ok(super::link::Reply::Ack(
                mirror_proto::frame::AckStatus::Ok
            )))
        ) {
            warn!("replica {}: SyncStart failed: {started:?}", peer.addr);
            m.status_lock().peer_disk = Some(DiskState::Outdated);
            link.fail("the replica could not start a resync");
            let reason = link.wait_dead();
            info!("replica {} detached: {reason}", peer.addr);
            return;
        }
        m.status_lock().peer_disk = Some(DiskState::Inconsistent);
    }
    m.set_peer(PeerState::Connected, None);
    // The replica has everything, or recorded itself inconsistent (not promotable): what it
    // lacks may be acknowledged (it is resynced).
    if let Some(f) = &m.fence {
        f.attached(|| link.is_alive());
    }
    if decision == SyncDecision::InSync && bitmap_clear && !need_sync {
        m.status_lock().peer_disk = Some(DiskState::UpToDate);
    }
    m.publish(Some(link.clone()));
    info!("replicating to {}", peer.addr);
    // Copy whatever is out of sync (also regions marked while we were connecting), then watch.
    let full = decision == SyncDecision::Full;
    let mut sync_started = need_sync || !bitmap_clear;
    while link.is_alive() {
        if need_sync || !m.sync_state().bitmap.is_clear() {
            let r = resync::run(m, &link, full && need_sync, sync_started);
            sync_started = false;
            match r {
                Ok(()) => need_sync = false,
                Err(e) => {
                    warn!("resync stopped: {}", error_chain(&e));
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        } else {
            m.wait_changed();
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let reason = link.wait_dead();
    m.publish(None);
    m.status_lock().resyncing = false;
    info!("replica {} detached: {reason}", peer.addr);
}
