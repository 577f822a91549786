//! Synchronous replication to an access node: the primary's side.
//!
//! | file | what it owns |
//! | --- | --- |
//! | `mod.rs` | [`Mirror`]: the write path's entry points (reserve, start, finish), peer status |
//! | `peer.rs` | the connection manager: connect with backoff, authenticate, compare generations |
//! | `link.rs` | one connection's data phase: pipelined requests, replies by sequence number |
//! | `resync.rs` | copying out-of-sync regions while the guest keeps running |
//! | `out_of_sync.rs` | the persistent bitmap and the generation bookkeeping |
//! | `inflight.rs` | the ordering rule for overlapping writes |

pub mod activity_log;
pub mod inflight;
pub mod link;
pub mod out_of_sync;
pub mod peer;
pub mod resync;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use log::error;
use mirror_proto::auth::Secret;
use mirror_proto::frame::{AckStatus, DiskState, Frame, MAX_DATA};
use serde_json::{json, Value};
use thiserror::Error;

use crate::disk::RawImage;
use activity_log::ActivityLog;
use inflight::{Inflight, Owner, Token};
use link::{Link, LinkDown, LinkStats, Reply, Waiter};
use out_of_sync::{SyncState, SyncStateError};

#[derive(Debug, Error)]
pub enum MirrorError {
    #[error("cannot record out-of-sync regions")]
    Record(#[source] SyncStateError),
    #[error("shutting down while waiting for the peer (--on-peer-loss suspend)")]
    ShuttingDown,
    #[error("cannot record the write in the activity log")]
    ActivityLog(#[source] mirror_proto::activity_log::AlError),
}

/// What to do with guest writes while the peer is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PeerLoss {
    /// Keep running on the local disk, record what changed, resync later.
    Degrade,
    /// Hold guest writes until the peer is back.
    Suspend,
}

#[derive(Debug, Clone)]
pub struct MirrorConfig {
    pub image: PathBuf,
    pub peer: String,
    pub secret: Secret,
    pub on_peer_loss: PeerLoss,
    /// Resync bandwidth limit in bytes per second (None: unlimited).
    pub resync_rate: Option<u64>,
}

pub use mirror_proto::control::PeerState;

#[derive(Debug)]
struct PeerStatus {
    state: PeerState,
    reason: Option<String>,
    peer_disk: Option<DiskState>,
    peer_generation: Option<u64>,
    resyncing: bool,
    resync_done: u64,
}

/// A write-type request on its way to the replica; finish it with [`Mirror::finish`].
#[derive(Debug)]
pub struct Remote {
    token: Option<Token>,
    waiters: Vec<Arc<Waiter>>,
    range: (u64, u64),
    /// The range's extents are pinned in the activity log.
    al_pinned: bool,
}

/// The replication state of one served image, shared by all queue workers.
pub struct Mirror {
    cfg: MirrorConfig,
    disk: Arc<RawImage>,
    sync: Mutex<SyncState>,
    link: RwLock<Option<Arc<Link>>>,
    /// Signalled when the link comes or goes or regions get copied (suspend mode waits here).
    changed: Condvar,
    changed_lock: Mutex<()>,
    inflight: Inflight,
    activity_log: ActivityLog,
    status: Mutex<PeerStatus>,
    stats: Arc<LinkStats>,
    resync_total: AtomicU64,
    stopping: AtomicBool,
}

/// The write-type requests that are mirrored.
#[derive(Debug, Clone, Copy)]
pub enum WriteOp {
    Write,
    Discard,
    WriteZeroes { unmap: bool },
}

impl Mirror {
    pub fn new(cfg: MirrorConfig, disk: Arc<RawImage>) -> Result<Arc<Self>, SyncStateError> {
        let mut sync = SyncState::open(&cfg.image, disk.size())?;
        let (activity_log, hot) =
            ActivityLog::open(&cfg.image).map_err(SyncStateError::ActivityLog)?;
        if !hot.is_empty() {
            // The last run ended without a clean shutdown: writes to these extents may have
            // reached only one side.
            for &e in &hot {
                let ext = mirror_proto::activity_log::EXTENT_SIZE;
                sync.mark(e * ext, ext.min(disk.size().saturating_sub(e * ext)))?;
            }
            log::warn!(
                "unclean shutdown: {} hot extent(s) of the activity log marked out of sync",
                hot.len()
            );
            activity_log.clear().map_err(SyncStateError::ActivityLog)?;
        }
        Ok(Arc::new(Mirror {
            cfg,
            disk,
            sync: Mutex::new(sync),
            link: RwLock::new(None),
            changed: Condvar::new(),
            changed_lock: Mutex::new(()),
            inflight: Inflight::default(),
            activity_log,
            status: Mutex::new(PeerStatus {
                state: PeerState::Connecting,
                reason: None,
                peer_disk: None,
                peer_generation: None,
                resyncing: false,
                resync_done: 0,
            }),
            stats: Arc::new(LinkStats::default()),
            resync_total: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
        }))
    }

    /// Starts the connection manager thread.
    pub fn spawn_manager(self: &Arc<Self>) -> std::io::Result<()> {
        let m = self.clone();
        std::thread::Builder::new()
            .name("peer".into())
            .spawn(move || peer::run(m))
            .map(|_| ())
    }

    fn sync_state(&self) -> MutexGuard<'_, SyncState> {
        self.sync.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn status_lock(&self) -> MutexGuard<'_, PeerStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The published link. It may have died since: sending on it then fails with
    /// `LinkDown`, which every caller handles, so the hot path takes the link's lock only once.
    fn current_link(&self) -> Option<Arc<Link>> {
        self.link.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn publish(&self, link: Option<Arc<Link>>) {
        *self.link.write().unwrap_or_else(|p| p.into_inner()) = link;
        self.notify_changed();
    }

    fn notify_changed(&self) {
        let _g = self.changed_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.changed.notify_all();
    }

    /// Waits (a bounded time) for a change of link or bitmap.
    fn wait_changed(&self) {
        let g = self.changed_lock.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self.changed.wait_timeout(g, Duration::from_millis(200));
    }

    fn set_peer(&self, state: PeerState, reason: Option<String>) {
        let mut s = self.status_lock();
        s.state = state;
        s.reason = reason;
    }

    /// Records a byte range as out of sync, durably.
    pub fn mark(&self, offset: u64, len: u64) -> Result<(), MirrorError> {
        self.sync_state()
            .mark(offset, len)
            .map_err(MirrorError::Record)
    }

    /// Takes the range for `owner` if no other owner has an overlapping one in flight.
    pub fn try_reserve(&self, owner: Owner, offset: u64, len: u64) -> Option<Token> {
        self.inflight
            .try_acquire(owner, offset, offset.saturating_add(len))
    }

    /// Takes the range, waiting for overlapping ones of other owners. The caller must have
    /// finished its own in-flight requests first.
    pub fn reserve(&self, owner: Owner, offset: u64, len: u64) -> Token {
        self.inflight
            .acquire(owner, offset, offset.saturating_add(len))
    }

    /// Gives back a range taken with [`Mirror::try_reserve`] or [`Mirror::reserve`].
    pub fn release(&self, token: Token) {
        self.inflight.release(token);
    }

    /// Sends a write-type request to the replica before the local I/O is issued, or, without
    /// a link, records the range as out of sync (degrade) or waits for the link (suspend).
    /// `fill(chunk_offset, chunk_len, buf)` appends that chunk of the data to `buf`.
    pub fn start_write(
        &self,
        token: Token,
        op: WriteOp,
        offset: u64,
        len: u64,
        mut fill: impl FnMut(u64, usize, &mut Vec<u8>),
    ) -> Result<Remote, MirrorError> {
        let mut remote = Remote {
            token: Some(token),
            waiters: Vec::new(),
            range: (offset, len),
            al_pinned: false,
        };
        // Hot before the local write is issued (a crash leaves it recorded).
        match self.activity_log.begin(offset, len) {
            Ok(true) => remote.al_pinned = true,
            // Too large for the log: the bitmap covers it (resynced later).
            Ok(false) => {
                if let Err(e) = self.mark(offset, len) {
                    self.abandon(remote);
                    return Err(e);
                }
            }
            Err(e) => {
                self.abandon(remote);
                return Err(MirrorError::ActivityLog(e));
            }
        }
        loop {
            if let Some(link) = self.current_link() {
                let sent = match op {
                    WriteOp::Write => {
                        let mut done = 0u64;
                        let mut r = Ok(());
                        while done < len {
                            let n = (len - done).min(MAX_DATA as u64);
                            match link.send_write_with(offset + done, n, false, |b| {
                                fill(done, n as usize, b)
                            }) {
                                Ok(w) => remote.waiters.push(w),
                                Err(e) => {
                                    r = Err(e);
                                    break;
                                }
                            }
                            done += n;
                        }
                        r
                    }
                    WriteOp::Discard => link
                        .send(Frame::Discard { offset, len })
                        .map(|w| remote.waiters.push(w)),
                    WriteOp::WriteZeroes { unmap } => link
                        .send(Frame::WriteZeroes { offset, len, unmap })
                        .map(|w| remote.waiters.push(w)),
                };
                // Err: the link died under us; whatever was queued is marked by the link.
                if sent.is_ok() {
                    return Ok(remote);
                }
            }
            match self.cfg.on_peer_loss {
                PeerLoss::Degrade => {
                    if let Err(e) = self.mark(offset, len) {
                        self.abandon(remote);
                        return Err(e);
                    }
                    return Ok(remote);
                }
                PeerLoss::Suspend => {
                    if !remote.waiters.is_empty() {
                        // Part of the request went out before the link died: those parts are
                        // marked; mark the rest too and wait for the resync in finish().
                        if let Err(e) = self.mark(offset, len) {
                            self.abandon(remote);
                            return Err(e);
                        }
                        return Ok(remote);
                    }
                    if self.stopping.load(Ordering::Relaxed) {
                        self.abandon(remote);
                        return Err(MirrorError::ShuttingDown);
                    }
                    self.wait_changed();
                }
            }
        }
    }

    /// Gives up on a request that cannot go on: waits for what was sent, frees the range.
    fn abandon(&self, mut remote: Remote) {
        for w in remote.waiters.drain(..) {
            let _ = w.wait();
        }
        if let Some(t) = remote.token.take() {
            self.inflight.release(t);
        }
        if remote.al_pinned {
            self.activity_log.end(remote.range.0, remote.range.1);
        }
    }

    /// Starts a flush on the replica (None: no replica to flush).
    pub fn start_flush(&self) -> Remote {
        let mut remote = Remote {
            token: None,
            waiters: Vec::new(),
            range: (0, 0),
            al_pinned: false,
        };
        loop {
            if let Some(link) = self.current_link() {
                if let Ok(w) = link.send(Frame::Flush) {
                    remote.waiters.push(w);
                    return remote;
                }
            }
            if self.cfg.on_peer_loss == PeerLoss::Degrade || self.stopping.load(Ordering::Relaxed) {
                return remote;
            }
            self.wait_changed();
        }
    }

    /// Whether every reply of `remote` has arrived ([`Mirror::finish`] will not wait for the
    /// replica).
    pub fn is_answered(&self, remote: &Remote) -> bool {
        remote.waiters.iter().all(|w| w.is_ready())
    }

    /// Waits at most `d` for the replica's next missing reply; true if all are there.
    pub fn wait_answered_timeout(&self, remote: &Remote, d: Duration) -> bool {
        match remote.waiters.iter().find(|w| !w.is_ready()) {
            Some(w) => w.wait_ready_timeout(d) && self.is_answered(remote),
            None => true,
        }
    }

    /// Waits for the replica's replies, records failures, releases the range. `local_ok`:
    /// whether the local part succeeded (if not, the copies may differ: the range is marked).
    /// Returns false if the request must fail for the guest (its range could not be recorded),
    /// and, in suspend mode after a failure, the range to [`Mirror::hold`] the guest on.
    pub fn finish(&self, mut remote: Remote, local_ok: bool) -> (bool, Option<(u64, u64)>) {
        let mut failed: Option<String> = None;
        let mut sent = false;
        for w in remote.waiters.drain(..) {
            sent = true;
            match w.wait() {
                Ok(Reply::Ack(AckStatus::Ok)) | Ok(Reply::Data(_)) => {}
                Ok(Reply::Ack(status)) => {
                    failed.get_or_insert(format!("replica answered {status:?}"));
                }
                // Already marked by the link when it went down.
                Err(LinkDown) => {
                    failed.get_or_insert_with(String::new);
                }
            }
        }
        let (offset, len) = remote.range;
        let mut ok = true;
        if let Some(reason) = &failed {
            if !reason.is_empty() && len > 0 {
                // The replica refused this write (e.g. out of space): it is outdated now.
                if let Err(e) = self.mark(offset, len) {
                    error!("{}", mirror_proto::sys::error_chain(&e));
                    ok = false;
                }
                if let Some(link) = self.current_link() {
                    link.fail(&format!("{reason} for offset {offset}"));
                }
                self.status_lock().peer_disk = Some(DiskState::Outdated);
            }
        }
        if !local_ok && sent && len > 0 {
            if let Err(e) = self.mark(offset, len) {
                error!("{}", mirror_proto::sys::error_chain(&e));
                ok = false;
            }
        }
        if let Some(t) = remote.token.take() {
            self.inflight.release(t);
        }
        if remote.al_pinned {
            self.activity_log.end(offset, len);
        }
        let hold = (failed.is_some() && self.cfg.on_peer_loss == PeerLoss::Suspend)
            .then_some((offset, len));
        (ok, hold)
    }

    /// Suspend mode: blocks until the replica has `range` again (a FLUSH's empty range: until
    /// it has everything again). The caller must hold no range in the ordering table (resync
    /// may need it).
    pub fn hold(&self, (offset, len): (u64, u64)) {
        while !self.stopping.load(Ordering::Relaxed)
            && (!self.current_link().is_some_and(|l| l.is_alive()) || {
                let s = self.sync_state();
                if len > 0 {
                    s.bitmap.any_in_range(offset, len)
                } else {
                    !s.bitmap.is_clear()
                }
            })
        {
            self.wait_changed();
        }
    }

    /// Reads a range from the replica (when a local read failed). None if the replica cannot
    /// serve it (no link, or the range is out of sync there).
    pub fn read_remote(&self, offset: u64, len: u64) -> Option<Vec<u8>> {
        let link = self.current_link()?;
        if self.sync_state().bitmap.any_in_range(offset, len) {
            return None;
        }
        let mut out = Vec::with_capacity(len as usize);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(MAX_DATA as u64);
            let w = link
                .send(Frame::Read {
                    offset: offset + done,
                    len: n as u32,
                })
                .ok()?;
            match w.wait() {
                Ok(Reply::Data(d)) if d.len() as u64 == n => out.extend_from_slice(&d),
                _ => return None,
            }
            done += n;
        }
        Some(out)
    }

    /// First step of a shutdown: nothing waits for the peer any more.
    pub fn begin_shutdown(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.notify_changed();
    }

    /// Last step of a shutdown (no request in flight): flush the replica and say goodbye.
    pub fn shutdown(&self) {
        self.begin_shutdown();
        if let Some(link) = self.current_link() {
            if let Ok(w) = link.send(Frame::Flush) {
                let _ = w.wait();
            }
            link.goodbye();
            link.fail("shutting down");
        }
        // Nothing is in flight any more: no extent can differ because of a crash.
        if let Err(e) = self.activity_log.clear() {
            error!("{}", mirror_proto::sys::error_chain(&e));
        }
    }

    /// Replication fields of the status document.
    pub fn status(&self) -> Value {
        let (oos, generation) = {
            let s = self.sync_state();
            (s.out_of_sync_bytes(), s.meta.generation)
        };
        let st = self.status_lock();
        json!({
            "role": "primary",
            "disk_state": "up-to-date",
            "peer": self.cfg.peer,
            "peer_state": st.state.as_str(),
            "peer_reason": st.reason,
            "peer_disk_state": st.peer_disk.map(DiskState::as_str),
            "peer_generation": st.peer_generation,
            "on_peer_loss": match self.cfg.on_peer_loss { PeerLoss::Degrade => "degrade", PeerLoss::Suspend => "suspend" },
            "out_of_sync_bytes": oos,
            "resyncing": st.resyncing,
            "resync_done_bytes": st.resync_done,
            "resync_total_bytes": self.resync_total.load(Ordering::Relaxed),
            "generation": generation,
            "link_write_latency_us": self.stats.avg_write_latency_us(),
            "link_write_latency_ewma_us": self.stats.write_latency_ewma_ns.load(Ordering::Relaxed) / 1000,
            "bytes_sent": self.stats.bytes_sent.load(Ordering::Relaxed),
            "bytes_received": self.stats.bytes_received.load(Ordering::Relaxed),
        })
    }
}
