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
//! | `verify.rs` | online verify: comparing block hashes with the replica while the guest runs |
//! | `fence.rs` | with a witness: whether writes the replica lacks may be acknowledged |

pub mod activity_log;
pub mod fence;
pub mod inflight;
pub mod link;
pub mod out_of_sync;
pub mod peer;
pub mod resync;
pub mod verify;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use log::error;
use mirror_proto::activity_log::AlError;
use mirror_proto::auth::Secret;
use mirror_proto::frame::{AckStatus, DiskState, Frame, MAX_DATA};
use serde_json::{json, Value};
use thiserror::Error;

use crate::completion::QueueEvent;
use crate::disk::RawImage;
use activity_log::ActivityLog;
use inflight::{Inflight, Owner, Token};
pub use link::{ChunkPool, SharedData, SHARE_MIN};
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PeerLoss {
    /// Keep running on the local disk, record what changed, resync later.
    Degrade,
    /// Hold guest writes until the peer is back.
    Suspend,
}

#[derive(Debug, Clone)]
pub struct MirrorConfig {
    pub image: PathBuf,
    /// The replica's address and the shared secret; None: the image of a pair is served
    /// alone (standalone), and every write is recorded out of sync for the peer's return.
    pub peer: Option<PeerAddr>,
    pub on_peer_loss: PeerLoss,
    /// Resync bandwidth limit in bytes per second (None: unlimited).
    pub resync_rate: Option<u64>,
    /// Resync rate while the guest writes, in bytes per second (DRBD's c-min-rate).
    pub resync_min_rate: u64,
    /// `--witness ADDR`: the quorum witness (the peer's secret).
    pub witness: Option<String>,
    /// `--fence-peer CMD`: DRBD's fence-peer handler, the alternative to a witness.
    pub fence_peer: Option<String>,
}

/// `--resync-min-rate`'s default (bytes per second), for a mirror without a peer.
pub const DEFAULT_RESYNC_MIN_RATE: u64 = 2 << 20;

#[derive(Debug, Clone)]
pub struct PeerAddr {
    pub addr: String,
    pub secret: Secret,
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
    /// The attached replica answers ReadHashes (NodeInfo flag).
    peer_hashes: bool,
}

/// A write-type request (or a FLUSH) on its way to the replica; finish it with
/// [`Mirror::finish`].
#[derive(Debug)]
pub struct Remote {
    token: Option<Token>,
    waiters: Vec<Arc<Waiter>>,
    /// The link the waiters belong to (a failure is that link's, not a later one's).
    link: Option<Arc<Link>>,
    range: (u64, u64),
    /// The range's extents are pinned in the activity log.
    al_pinned: bool,
    /// A FLUSH: the activity-log barrier it completes when it succeeds on both sides.
    barrier: Option<u64>,
    /// A part could not be sent (the link died between parts): the replica lacks it even if
    /// every part sent was acknowledged.
    lost: bool,
}

impl Remote {
    fn new(token: Option<Token>, range: (u64, u64)) -> Remote {
        Remote {
            token,
            waiters: Vec::new(),
            link: None,
            range,
            al_pinned: false,
            barrier: None,
            lost: false,
        }
    }
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
    /// Resync bytes sent as data, and bytes a partial resync found equal on the replica by
    /// their block hashes (not sent).
    resync_sent: AtomicU64,
    resync_same: AtomicU64,
    /// The running resync's rate: bytes of regions copied or compared per second over its
    /// last second or so (0 when none runs).
    resync_rate: AtomicU64,
    /// Guest write-type requests and flushes so far (the resync yields while it grows).
    guest_writes: AtomicU64,
    /// The resync is yielding to guest writes right now.
    resync_yielding: AtomicBool,
    /// The running verify's progress, and the last result (kept in `IMG.verify`).
    verify: verify::Progress,
    verify_last: Mutex<Option<Value>>,
    stopping: AtomicBool,
    /// With a witness: whether writes the replica lacks may be acknowledged.
    fence: Option<Arc<fence::Fence>>,
}

/// The replication figures of the metrics ([`Mirror::metrics`]).
#[derive(Debug, Clone)]
pub struct MirrorMetrics {
    pub peer_state: PeerState,
    /// The replica's disk as last heard of (None: not yet).
    pub peer_disk: Option<DiskState>,
    /// With a witness or a fence-peer handler: the fence's gate.
    pub fence: Option<fence::Gate>,
    pub generation: u64,
    pub out_of_sync: u64,
    pub resyncing: bool,
    pub resync_yielding: bool,
    /// Bytes of regions resynced (copied or found equal, then flushed), in all.
    pub resync_done: u64,
    pub resync_sent: u64,
    pub resync_same: u64,
    /// Bytes per second of the running resync.
    pub resync_rate: u64,
    pub link_sent: u64,
    pub link_received: u64,
    pub replica_ack: mirror_proto::metrics::HistogramSnapshot,
    pub activity_log_writes: u64,
    pub bitmap_writes: u64,
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
        let standalone = cfg.peer.is_none();
        let arbiter = match (&cfg.peer, &cfg.witness, &cfg.fence_peer) {
            (Some(p), Some(w), _) => Some(fence::Arbiter::Witness {
                addr: w.clone(),
                secret: p.secret.clone(),
            }),
            (Some(_), None, Some(c)) => Some(fence::Arbiter::Command(c.clone())),
            _ => None,
        }
        // Suspend mode never acknowledges what the replica lacks: no arbiter needed.
        .filter(|_| cfg.on_peer_loss == PeerLoss::Degrade);
        // With a fence, generations are deferred (out_of_sync.rs) from the start: also for the
        // activity log's marks below.
        let mut sync = SyncState::open(&cfg.image, disk.size(), arbiter.is_some())?;
        if arbiter.is_none() {
            // An image a fenced run left held at its generation (second review): without a
            // fence, writes the replica lacks are acknowledged at once.
            sync.confirm_generation()?;
        }
        let (activity_log, hot) = match ActivityLog::open(&cfg.image) {
            Err(AlError::Damaged { path, reason }) => {
                // Which extents the last run left hot is unknown: any may differ. Marked
                // (durably) before the log is replaced.
                log::warn!(
                    "activity log {} is damaged ({reason}): every region of the image is \
                     marked out of sync and will be copied again",
                    path.display()
                );
                sync.mark(0, disk.size())?;
                mirror_proto::activity_log::reset(&cfg.image)?;
                ActivityLog::open(&cfg.image)?
            }
            r => r?,
        };
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
        let verify_last = verify::load_last(&cfg.image);
        let fence = arbiter.map(|a| Arc::new(fence::Fence::new(a, sync.meta.node_id)));
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
                state: if standalone {
                    PeerState::Standalone
                } else {
                    PeerState::Connecting
                },
                reason: None,
                peer_disk: None,
                peer_generation: None,
                resyncing: false,
                resync_done: 0,
                peer_hashes: false,
            }),
            stats: Arc::new(LinkStats::default()),
            resync_total: AtomicU64::new(0),
            resync_sent: AtomicU64::new(0),
            guest_writes: AtomicU64::new(0),
            resync_yielding: AtomicBool::new(false),
            resync_same: AtomicU64::new(0),
            resync_rate: AtomicU64::new(0),
            verify: verify::Progress::default(),
            verify_last: Mutex::new(verify_last),
            stopping: AtomicBool::new(false),
            fence,
        }))
    }

    /// Starts the connection manager thread.
    pub fn spawn_manager(self: &Arc<Self>) -> std::io::Result<()> {
        let Some(peer) = self.cfg.peer.clone() else {
            return Ok(());
        };
        if let Some(f) = &self.fence {
            let (m, f) = (self.clone(), f.clone());
            std::thread::Builder::new()
                .name("fence".into())
                .spawn(move || fence::run(m, f))?;
        }
        let m = self.clone();
        std::thread::Builder::new()
            .name("peer".into())
            .spawn(move || peer::run(m, peer))
            .map(|_| ())
    }

    fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// The generations the replica may hold up to date (what the witness's records are
    /// about): ours (in sync, or a SyncDone it applied whose answer we never got), and the
    /// base of the out-of-sync bitmap.
    fn replica_generations(&self) -> Vec<u64> {
        let s = self.sync_state();
        let mut v = vec![s.meta.generation];
        if s.meta.bitmap_generation != 0 && s.meta.bitmap_generation != s.meta.generation {
            v.push(s.meta.bitmap_generation);
        }
        v
    }

    /// The fence's gate, if there is a witness.
    fn fence_gate(&self) -> Option<fence::Gate> {
        self.fence.as_ref().map(|f| f.gate())
    }

    /// The replica's address, for log lines ("(none)" when standalone).
    pub fn peer_name(&self) -> &str {
        self.cfg.peer.as_ref().map_or("(none)", |p| p.addr.as_str())
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
        // Every caller marks the bytes of a write this side made without the replica: the
        // difference is in those blocks, which the resync then sends without comparing.
        self.sync_state()
            .mark_known(offset, len)
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

    /// Takes the range for `owner` (resync, verify: holding no other), waiting for
    /// overlapping ones of others as long as `link` lives (a guest request holding the range
    /// may itself wait for the next link, in suspend mode); None once it died.
    pub fn reserve_while_alive(
        &self,
        owner: Owner,
        link: &Link,
        offset: u64,
        len: u64,
    ) -> Option<Token> {
        let end = offset.saturating_add(len);
        loop {
            if let Some(t) =
                self.inflight
                    .acquire_timeout(owner, offset, end, Duration::from_millis(100))
            {
                return Some(t);
            }
            if !link.is_alive() {
                return None;
            }
        }
    }

    /// Gives back a range taken with [`Mirror::try_reserve`] or [`Mirror::reserve`].
    pub fn release(&self, token: Token) {
        self.inflight.release(token);
    }

    /// First step of a write-type request that holds `token` for `offset..offset + len`:
    /// makes its extents hot in the activity log (durably, before any local write is issued)
    /// or, for a range too large for the log, records it out of sync. Then send its data with
    /// [`Mirror::send_data`] (or [`Mirror::send_op`]) and finish it with [`Mirror::finish`].
    pub fn begin_write(&self, token: Token, offset: u64, len: u64) -> Result<Remote, MirrorError> {
        let mut remote = Remote::new(Some(token), (offset, len));
        self.guest_writes.fetch_add(1, Ordering::Relaxed);
        if self.cfg.peer.is_none() {
            // Standalone: no replica writes at all; the bitmap records every write (no
            // resync runs in this process, so no blocks are remembered).
            if let Err(e) = self
                .sync_state()
                .mark(offset, len)
                .map_err(MirrorError::Record)
            {
                self.abandon(remote);
                return Err(e);
            }
            return Ok(remote);
        }
        let mut barriers = 0;
        loop {
            match self.activity_log.begin(offset, len) {
                Ok(activity_log::Begin::Pinned) => {
                    remote.al_pinned = true;
                    return Ok(remote);
                }
                // A barrier frees the idle extents it covers (other queues may take them
                // first: a few tries); if that is not enough (or the local flush failed), the
                // bitmap covers this write instead.
                Ok(activity_log::Begin::NeedBarrier) if barriers < 3 && self.barrier() => {
                    barriers += 1;
                }
                // Too large for the log, or no room in it: the bitmap covers it (resynced
                // later).
                Ok(
                    activity_log::Begin::TooLarge
                    | activity_log::Begin::Full
                    | activity_log::Begin::NeedBarrier,
                ) => {
                    if let Err(e) = self.mark(offset, len) {
                        self.abandon(remote);
                        return Err(e);
                    }
                    return Ok(remote);
                }
                Err(e) => {
                    self.abandon(remote);
                    return Err(MirrorError::ActivityLog(e));
                }
            }
        }
    }

    /// Makes every write completed so far durable on both sides (a local fdatasync and a
    /// replica Flush, or a dead link whose marks cover the replica), then lets the activity
    /// log release the extents it covers. False if the local flush failed.
    pub fn barrier(&self) -> bool {
        let b = self.activity_log.barrier_begin();
        let remote = self.current_link().map(|l| (l.send(Frame::Flush), l));
        if let Err(e) = self.disk.flush() {
            error!("barrier: {}", mirror_proto::sys::error_chain(&e));
            return false;
        }
        let replica_ok = match remote {
            Some((Ok(w), _)) => match w.wait() {
                Ok(Reply::Ack(AckStatus::Ok)) => true,
                // A failed Flush kills the link, which marks what it covered.
                _ => self.marks_durable(),
            },
            Some((Err(LinkDown), _)) | None => self.marks_durable(),
        };
        // Every mark must be on disk too: a bit only in memory (its persist failed) would let
        // an extent go whose difference nothing else records.
        let ok = replica_ok && self.marks_durable();
        if ok {
            self.activity_log.barrier_done(b);
        }
        ok
    }

    /// Whether every range recorded out of sync is in the bitmap file (retrying a persist
    /// that failed before).
    fn marks_durable(&self) -> bool {
        self.sync_state().mark_ranges(&[]).is_ok()
    }

    /// Sends one chunk (at most [`MAX_DATA`] bytes) of a write's data, already copied out of
    /// guest memory, to the replica; without a link it records the chunk out of sync
    /// (degrade) or waits for the link (suspend, while nothing of the request was sent).
    /// `direct`: the caller (a queue worker with no further request at hand) may put it on
    /// the wire itself instead of waking the link's sender thread.
    pub fn send_data(
        &self,
        remote: &mut Remote,
        offset: u64,
        data: &[u8],
        direct: bool,
    ) -> Result<(), MirrorError> {
        self.send_with(remote, offset, data.len() as u64, |link| {
            link.send_write_with(offset, data.len() as u64, false, direct, |b| {
                b.extend_from_slice(data)
            })
        })
    }

    /// As [`Mirror::send_data`], for a chunk the link seals straight from its buffer (no copy
    /// into the send buffer: worth it for large chunks, see [`SHARE_MIN`]).
    pub fn send_shared(
        &self,
        remote: &mut Remote,
        offset: u64,
        data: SharedData,
        direct: bool,
    ) -> Result<(), MirrorError> {
        let len = data.len() as u64;
        self.send_with(remote, offset, len, |link| {
            link.send_write_shared(offset, data.clone(), false, direct)
        })
    }

    /// Sends a DISCARD or WRITE_ZEROES of the whole range of `remote` (`direct`: as for
    /// [`Mirror::send_data`]).
    pub fn send_op(
        &self,
        remote: &mut Remote,
        op: WriteOp,
        direct: bool,
    ) -> Result<(), MirrorError> {
        let (offset, len) = remote.range;
        self.send_with(remote, offset, len, |link| match op {
            WriteOp::Write => Err(LinkDown),
            WriteOp::Discard => link.send_frame(Frame::Discard { offset, len }, direct),
            WriteOp::WriteZeroes { unmap } => {
                link.send_frame(Frame::WriteZeroes { offset, len, unmap }, direct)
            }
        })
    }

    /// Write-through (the guest turned its write cache off): the request's data must be
    /// durable on the replica too before it completes.
    pub fn send_durable(&self, remote: &mut Remote) -> Result<(), MirrorError> {
        if remote.waiters.is_empty() {
            return Ok(());
        }
        let (offset, _) = remote.range;
        self.send_with(remote, offset, 0, |link| link.send(Frame::Flush))
    }

    fn send_with(
        &self,
        remote: &mut Remote,
        offset: u64,
        len: u64,
        send: impl Fn(&Link) -> Result<Arc<Waiter>, LinkDown>,
    ) -> Result<(), MirrorError> {
        if self.cfg.peer.is_none() {
            return Ok(());
        }
        loop {
            let link = match &remote.link {
                // All parts of a request travel on one link: once it died, the rest is marked.
                Some(l) => Some(l.clone()),
                None => self.current_link(),
            };
            if let Some(link) = link {
                // Err: the link died under us; whatever it had queued is marked by then.
                if let Ok(w) = send(&link) {
                    remote.waiters.push(w);
                    remote.link = Some(link);
                    return Ok(());
                }
                if remote.link.is_some() {
                    remote.lost = true;
                    return self.mark(offset, len);
                }
            }
            match self.cfg.on_peer_loss {
                PeerLoss::Degrade => return self.mark(offset, len),
                PeerLoss::Suspend => {
                    if !remote.waiters.is_empty() || remote.link.is_some() {
                        // Part of the request went out before the link died: those parts are
                        // marked; mark the rest too and wait for the resync in finish().
                        remote.lost = true;
                        return self.mark(offset, len);
                    }
                    if self.stopping.load(Ordering::Relaxed) {
                        return Err(MirrorError::ShuttingDown);
                    }
                    self.wait_changed();
                }
            }
        }
    }

    /// Gives up on a request that failed after parts of it may have reached either side: its
    /// range is recorded out of sync (whatever the replica answered), then abandoned.
    pub fn fail_request(&self, remote: Remote) {
        let (offset, len) = remote.range;
        for w in &remote.waiters {
            let _ = w.wait();
        }
        if len > 0 {
            if let Err(e) = self.mark(offset, len) {
                error!(
                    "cannot record a failed request's range: {}",
                    mirror_proto::sys::error_chain(&e)
                );
            }
        }
        self.abandon(remote);
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

    /// Starts a flush on the replica (no waiter: no replica to flush). Also an activity-log
    /// barrier: completed by [`Mirror::finish`] once both sides are durable.
    pub fn start_flush(&self, direct: bool) -> Remote {
        let mut remote = Remote::new(None, (0, 0));
        remote.barrier = Some(self.activity_log.barrier_begin());
        self.guest_writes.fetch_add(1, Ordering::Relaxed);
        if self.cfg.peer.is_none() {
            return remote;
        }
        loop {
            if let Some(link) = self.current_link() {
                if let Ok(w) = link.send_frame(Frame::Flush, direct) {
                    remote.waiters.push(w);
                    remote.link = Some(link);
                    return remote;
                }
            }
            if self.cfg.on_peer_loss == PeerLoss::Degrade || self.stopping.load(Ordering::Relaxed) {
                return remote;
            }
            self.wait_changed();
        }
    }

    /// Signals `ev` when each of `remote`'s replies arrives.
    pub fn notify_when_answered(&self, remote: &Remote, ev: &Arc<QueueEvent>) {
        for w in &remote.waiters {
            w.notify_when_ready(ev);
        }
    }

    /// Whether every reply of `remote` has arrived ([`Mirror::finish`] will not wait for the
    /// replica).
    pub fn is_answered(&self, remote: &Remote) -> bool {
        remote.waiters.iter().all(|w| w.is_ready())
    }

    /// Waits for the replica's replies, records failures, releases the range. `local_ok`:
    /// whether the local part succeeded (a write: if not, the copies may differ and the range
    /// is marked; a FLUSH: its fdatasync). Returns false if the request must fail for the
    /// guest (what the replica lacks could not be recorded), and, in suspend mode after a
    /// failure, the range to [`Mirror::hold`] the guest on.
    pub fn finish(&self, mut remote: Remote, local_ok: bool) -> (bool, Option<(u64, u64)>) {
        let mut failed: Option<String> = None;
        let mut sent = false;
        for w in remote.waiters.drain(..) {
            sent = true;
            match w.wait() {
                Ok(Reply::Ack(AckStatus::Ok)) => {}
                Ok(Reply::Ack(status)) => {
                    if status == AckStatus::Fenced {
                        if let Some(f) = &self.fence {
                            f.superseded("the replica says it was promoted");
                        }
                    }
                    failed.get_or_insert(format!("replica answered {status:?}"));
                }
                Ok(Reply::Data(_)) => {
                    failed.get_or_insert("replica answered a write with data".to_owned());
                }
                // Marked by the link before it told us.
                Err(LinkDown) => {
                    failed.get_or_insert_with(String::new);
                }
            }
        }
        let (offset, len) = remote.range;
        let mut ok = true;
        if let Some(reason) = &failed {
            if !reason.is_empty() {
                // The replica refused this write (e.g. out of space): it is outdated now.
                if let Some(link) = &remote.link {
                    link.fail(&format!("{reason} for offset {offset}"));
                }
                self.status_lock().peer_disk = Some(DiskState::Outdated);
            }
            // The link marked the range when it died; marking again costs nothing when that
            // worked, and retries the bitmap file when it did not. A FLUSH checks that every
            // mark the dying link made is durable.
            let recorded = if len > 0 {
                self.mark(offset, len).map_err(|e| e.to_string())
            } else {
                self.sync_state()
                    .mark_ranges(&[])
                    .map_err(|e| e.to_string())
            };
            if let Err(e) = recorded {
                error!("cannot record what the replica lacks: {e}");
                ok = false;
            }
        }
        if !local_ok && sent && len > 0 {
            if let Err(e) = self.mark(offset, len) {
                error!("{}", mirror_proto::sys::error_chain(&e));
                ok = false;
            }
        }
        if remote.link.is_none() && len == 0 && !self.marks_durable() {
            // A degraded FLUSH covers the marks of the link that died before it.
            ok = false;
        }
        if let Some(b) = remote.barrier {
            if ok && local_ok && self.marks_durable() {
                self.activity_log.barrier_done(b);
            }
        }
        if let Some(t) = remote.token.take() {
            self.inflight.release(t);
        }
        if remote.al_pinned {
            self.activity_log.end(offset, len);
        }
        // What the replica lacks is acknowledged only once the fence allows (`fence.rs`).
        let lacks = failed.is_some() || remote.lost || remote.link.is_none();
        let hold = (((failed.is_some() || remote.lost)
            && self.cfg.on_peer_loss == PeerLoss::Suspend)
            || (lacks && self.fence.is_some()))
        .then_some((offset, len));
        (ok, hold)
    }

    /// Holds a completion the replica lacks: with a witness, until the fence allows it
    /// (false: it must fail, this primary is superseded); in suspend mode, until the replica
    /// has `range` again (a FLUSH's empty range: until it has everything again). The caller
    /// must hold no range in the ordering table (resync may need it).
    pub fn hold(&self, range: (u64, u64)) -> bool {
        if let Some(f) = &self.fence {
            if !f.acknowledgeable(&|| self.is_stopping()) {
                return false;
            }
            // Every completion the replica lacks is acknowledged here: our own generation is
            // on disk first (out_of_sync.rs, deferred generations). Whatever opened the gate
            // (the witness, a handler, an attached replica that recorded itself inconsistent).
            return match self.sync_state().confirm_generation() {
                Ok(_) => true,
                Err(e) => {
                    log::error!(
                        "cannot start a new generation before acknowledging a request the \
                         replica lacks: {}; the request fails",
                        mirror_proto::sys::error_chain(&e)
                    );
                    false
                }
            };
        }
        self.hold_until_resynced(range);
        true
    }

    fn hold_until_resynced(&self, (offset, len): (u64, u64)) {
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

    /// Reads a range from the replica (when a local read failed), one chunk of at most
    /// [`MAX_DATA`] bytes at a time, handing each to `sink` in order (no buffer sized by the
    /// request). False if the replica cannot serve it (no link, the range is out of sync there,
    /// a reply of the wrong kind or size) or `sink` refused a chunk.
    pub fn read_remote(&self, offset: u64, len: u64, mut sink: impl FnMut(&[u8]) -> bool) -> bool {
        let Some(link) = self.current_link() else {
            return false;
        };
        if self.sync_state().bitmap.any_in_range(offset, len) {
            return false;
        }
        let mut done = 0;
        while done < len {
            let n = (len - done).min(MAX_DATA as u64);
            let Ok(w) = link.send(Frame::Read {
                offset: offset + done,
                len: n as u32,
            }) else {
                return false;
            };
            match w.wait() {
                Ok(Reply::Data(d)) if d.len() as u64 == n => {
                    if !sink(&d) {
                        return false;
                    }
                }
                _ => return false,
            }
            done += n;
        }
        true
    }

    /// First step of a shutdown: nothing waits for the peer any more.
    pub fn begin_shutdown(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.notify_changed();
        if let Some(f) = &self.fence {
            f.wake();
        }
    }

    /// Last step of a shutdown (no request in flight): flush the replica and say goodbye.
    /// The activity log is emptied only when both sides are durable (`local_flushed`: the
    /// final local fdatasync worked); otherwise the next start resyncs its extents.
    pub fn shutdown(&self, local_flushed: bool) {
        self.begin_shutdown();
        let mut replica_ok = true;
        if let Some(link) = self.current_link() {
            replica_ok = match link.send(Frame::Flush).map(|w| w.wait()) {
                Ok(Ok(Reply::Ack(AckStatus::Ok))) => true,
                _ => self.marks_durable(),
            };
            link.goodbye();
            link.fail("shutting down");
        }
        if !(local_flushed && replica_ok && self.marks_durable()) {
            log::warn!("activity log kept: not everything is known to be durable on both sides");
            return;
        }
        // Nothing is in flight any more: no extent can differ because of a crash.
        if let Err(e) = self.activity_log.clear() {
            error!("{}", mirror_proto::sys::error_chain(&e));
        }
    }

    /// The replication figures the metrics export (`metrics.rs`), read at one moment.
    pub fn metrics(&self) -> MirrorMetrics {
        let (out_of_sync, generation, bitmap_writes) = {
            let s = self.sync_state();
            (s.out_of_sync_bytes(), s.meta.generation, s.bitmap_writes())
        };
        let (peer_state, peer_disk, resyncing) = {
            let st = self.status_lock();
            (st.state, st.peer_disk, st.resyncing)
        };
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MirrorMetrics {
            peer_state,
            peer_disk,
            fence: self.fence.as_ref().map(|f| f.gate()),
            generation,
            out_of_sync,
            resyncing,
            resync_yielding: self.resync_yielding.load(Ordering::Relaxed),
            resync_done: l(&self.resync_total),
            resync_sent: l(&self.resync_sent),
            resync_same: l(&self.resync_same),
            resync_rate: l(&self.resync_rate),
            link_sent: l(&self.stats.bytes_sent),
            link_received: l(&self.stats.bytes_received),
            replica_ack: self.stats.write_ack.snapshot(),
            activity_log_writes: self.activity_log.writes(),
            bitmap_writes,
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
            "disk_state": if self.disk.failure().is_some() { "failed" } else { "up-to-date" },
            "peer": self.cfg.peer.as_ref().map(|p| p.addr.clone()),
            "peer_state": st.state.as_str(),
            "peer_reason": st.reason,
            "peer_disk_state": st.peer_disk.map(DiskState::as_str),
            "witness": self.fence.as_ref().and_then(|f| f.witness()).map(str::to_owned),
            "fence_peer": self.fence.as_ref().and_then(|f| f.command()).map(str::to_owned),
            "fence_state": self.fence.as_ref().map(|f| f.gate().as_str()),
            "peer_generation": st.peer_generation,
            "on_peer_loss": match self.cfg.on_peer_loss { PeerLoss::Degrade => "degrade", PeerLoss::Suspend => "suspend" },
            "out_of_sync_bytes": oos,
            "resyncing": st.resyncing,
            "resync_done_bytes": st.resync_done,
            "resync_total_bytes": self.resync_total.load(Ordering::Relaxed),
            "resync_sent_bytes": self.resync_sent.load(Ordering::Relaxed),
            "resync_yielding": self.resync_yielding.load(Ordering::Relaxed),
            "resync_same_bytes": self.resync_same.load(Ordering::Relaxed),
            "verify_running": self.verify.running.load(Ordering::Relaxed),
            "verify_done_bytes": self.verify.done.load(Ordering::Relaxed),
            "verify_total_bytes": self.verify.total.load(Ordering::Relaxed),
            "verify_last": self.verify_last.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            "generation": generation,
            "link_write_latency_us": self.stats.avg_write_latency_us(),
            "link_write_latency_ewma_us": self.stats.write_latency_ewma_ns.load(Ordering::Relaxed) / 1000,
            // Totals (a client takes differences): write and flush round trips to the replica.
            "link_write_acks": self.stats.write_acks.load(Ordering::Relaxed),
            "link_write_ns": self.stats.write_latency_ns.load(Ordering::Relaxed),
            "link_flush_acks": self.stats.flush_acks.load(Ordering::Relaxed),
            "link_flush_ns": self.stats.flush_latency_ns.load(Ordering::Relaxed),
            "bytes_sent": self.stats.bytes_sent.load(Ordering::Relaxed),
            "bytes_received": self.stats.bytes_received.load(Ordering::Relaxed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mirror_proto::conn::{self, FrameReader};

    /// A Mirror on a temp image (no connection manager) and a way to give it links.
    fn mirror() -> (tempfile::TempDir, Arc<Mirror>) {
        mirror_with(1 << 20, |_| {})
    }

    /// [`mirror`] on an image of `size` bytes, its configuration changed by `tweak`.
    fn mirror_with(
        size: usize,
        tweak: impl FnOnce(&mut MirrorConfig),
    ) -> (tempfile::TempDir, Arc<Mirror>) {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        std::fs::write(&img, vec![0u8; size]).unwrap();
        let disk = Arc::new(RawImage::open(&img, false).unwrap());
        let mut cfg = MirrorConfig {
            image: img,
            peer: Some(PeerAddr {
                addr: "test".into(),
                secret: Secret::from_bytes(b"0123456789abcdef").unwrap(),
            }),
            on_peer_loss: PeerLoss::Degrade,
            resync_rate: None,
            resync_min_rate: DEFAULT_RESYNC_MIN_RATE,
            witness: None,
            fence_peer: None,
        };
        tweak(&mut cfg);
        (d, Mirror::new(cfg, disk).unwrap())
    }

    /// A garbage activity log (which extents were hot is unknown) marks the whole image out of
    /// sync, durably, and is replaced; before, it read as "no hot extents".
    #[test]
    fn a_damaged_activity_log_marks_the_whole_image() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        std::fs::write(&img, vec![0u8; 9 << 20]).unwrap();
        let cfg = || MirrorConfig {
            image: img.clone(),
            peer: None,
            on_peer_loss: PeerLoss::Degrade,
            resync_rate: None,
            resync_min_rate: DEFAULT_RESYNC_MIN_RATE,
            witness: None,
            fence_peer: None,
        };
        let disk = || Arc::new(RawImage::open(&img, false).unwrap());
        drop(Mirror::new(cfg(), disk()).unwrap());
        std::fs::write(mirror_proto::activity_log::al_path(&img), vec![0x5a; 8192]).unwrap();
        let m = Mirror::new(cfg(), disk()).unwrap();
        assert_eq!(m.sync_state().out_of_sync_bytes(), 9 << 20);
        let g = m.sync_state().meta.generation;
        drop(m);
        assert!(mirror_proto::activity_log::read(&img).unwrap().is_empty());
        let m = Mirror::new(cfg(), disk()).unwrap();
        assert_eq!(m.sync_state().out_of_sync_bytes(), 9 << 20);
        assert_eq!(m.sync_state().meta.generation, g);
    }

    /// A link to a loopback peer, published to `m`; returns it and the peer's side.
    fn link(m: &Arc<Mirror>) -> (Arc<Link>, link::testing::TestPeer) {
        let mm = m.clone();
        let on_down: link::OnDown = Box::new(move |ranges, _| {
            let _ = mm.sync_state().mark_ranges(ranges);
        });
        let (link, peer) = link::testing::start(m.stats.clone(), on_down);
        m.publish(Some(link.clone()));
        (link, peer)
    }

    /// The next data-phase frame's kind and sequence number (pings skipped).
    fn next_frame<R: std::io::Read>(r: &mut FrameReader<R>) -> (String, u64) {
        loop {
            let d = r.read_frame().unwrap();
            if !matches!(d.frame, Frame::Ping { .. }) {
                return (d.frame.name().to_owned(), d.seq);
            }
        }
    }

    fn write(m: &Mirror, offset: u64, durable: bool) -> Remote {
        let t = m.try_reserve(0, offset, 4096).unwrap();
        let mut r = m.begin_write(t, offset, 4096).unwrap();
        m.send_data(&mut r, offset, &[7u8; 4096], false).unwrap();
        if durable {
            m.send_durable(&mut r).unwrap();
        }
        r
    }

    /// Review of the witness: a write whose first part the replica acknowledged but whose
    /// next part could not be sent (the link died in between) lacks that part on the replica:
    /// with a witness it is held (not completed as if replicated), in suspend mode too.
    #[test]
    fn a_write_whose_later_part_was_never_sent_is_held() {
        for (suspend, witness) in [(false, true), (true, false)] {
            let (_d, m) = mirror_with(4 << 20, |c| {
                if suspend {
                    c.on_peer_loss = PeerLoss::Suspend;
                }
                c.witness = witness.then(|| "127.0.0.1:1".to_owned());
            });
            let (link, peer) = link(&m);
            let (mut r, mut w) = (peer.reader, peer.writer);
            let len = 2 * MAX_DATA as u64;
            let t = m.try_reserve(0, 0, len).unwrap();
            let mut remote = m.begin_write(t, 0, len).unwrap();
            m.send_data(&mut remote, 0, &vec![7u8; MAX_DATA], false)
                .unwrap();
            let (kind, seq) = next_frame(&mut r);
            assert_eq!(kind, "Write");
            let ack = Frame::Ack {
                status: AckStatus::Ok,
            };
            conn::send(&mut w, seq, &ack).unwrap();
            assert!(wait_until(|| m.is_answered(&remote)));
            link.fail("cut between the parts");
            m.send_data(&mut remote, MAX_DATA as u64, &vec![7u8; MAX_DATA], false)
                .unwrap();
            let (ok, hold) = m.finish(remote, true);
            assert!(ok);
            assert_eq!(
                hold,
                Some((0, len)),
                "suspend {suspend}, witness {witness}: completed as if replicated"
            );
        }
    }

    fn wait_until(mut f: impl FnMut() -> bool) -> bool {
        let end = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < end {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    /// Finding 7: with the guest's write cache off (write-through), a write completes only
    /// once it is durable on the replica too: a Flush follows it on the link, and the request
    /// waits for that Flush's answer.
    #[test]
    fn write_through_writes_are_flushed_on_the_replica() {
        let (_d, m) = mirror();
        let (_link, peer) = link(&m);
        let (mut r, mut w) = (peer.reader, peer.writer);
        let remote = write(&m, 0, true);
        let (kind, seq_w) = next_frame(&mut r);
        assert_eq!(kind, "Write");
        let (kind, seq_f) = next_frame(&mut r);
        assert_eq!(kind, "Flush", "no Flush after a write-through write");
        let ack = Frame::Ack {
            status: AckStatus::Ok,
        };
        conn::send(&mut w, seq_w, &ack).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !m.is_answered(&remote),
            "the write counts as done before the replica flushed it"
        );
        // The queue worker's completion event is signalled once the last reply is in.
        let ev = Arc::new(QueueEvent::new().unwrap());
        m.notify_when_answered(&remote, &ev);
        ev.arm();
        conn::send(&mut w, seq_f, &ack).unwrap();
        assert!(ev.wait_signalled(Duration::from_secs(5)));
        assert!(m.is_answered(&remote));
        assert_eq!(m.finish(remote, true), (true, None));
    }

    /// Issue 9: "the primary does not check the kind of reply it gets for a sequence number".
    /// A write answered with a Pong or ReadData is not a write acknowledged: the link dies
    /// and the write's range is out of sync.
    #[test]
    fn a_reply_of_the_wrong_kind_kills_the_link() {
        for wrong in [
            Frame::Pong { nanos: 1 },
            Frame::ReadData { data: &[0; 4096] },
        ] {
            let (_d, m) = mirror();
            let (link, peer) = link(&m);
            let (mut r, mut w) = (peer.reader, peer.writer);
            let remote = write(&m, 8192, false);
            let (kind, seq) = next_frame(&mut r);
            assert_eq!(kind, "Write");
            conn::send(&mut w, seq, &wrong).unwrap();
            let (ok, _) = m.finish(remote, true);
            assert!(ok, "the guest's write itself is fine (local)");
            assert!(!link.is_alive(), "{wrong:?} accepted as a write's answer");
            assert!(m.sync_state().bitmap.any_in_range(8192, 4096));
        }
    }

    /// Finding 7: a request's failure is its own link's: a reply on an old link never tears
    /// down the link that replaced it.
    #[test]
    fn a_failure_on_an_old_link_leaves_the_new_one_alone() {
        let (_d, m) = mirror();
        let (old, peer) = link(&m);
        let (mut r, mut w) = (peer.reader, peer.writer);
        let remote = write(&m, 0, false);
        let (_, seq) = next_frame(&mut r);
        // A new link comes (the old one is still up, its request unanswered).
        let (new, _peer2) = link(&m);
        // The old link's replica fails the write.
        let nospace = Frame::Ack {
            status: AckStatus::NoSpace,
        };
        conn::send(&mut w, seq, &nospace).unwrap();
        let (ok, _) = m.finish(remote, true);
        assert!(ok, "the failure was recorded, the guest's write is fine");
        assert!(
            !old.is_alive(),
            "the link that failed the write is still up"
        );
        assert!(
            new.is_alive(),
            "a failure on the old link tore down the new one"
        );
        assert!(
            m.sync_state().bitmap.any_in_range(0, 4096),
            "the failed write is not recorded out of sync"
        );
        new.fail("done");
    }

    /// Review: a held image (a fenced primary's run left its bitmap's base == its generation)
    /// served again without a fence (standalone, or degrade without --witness/--fence-peer)
    /// acknowledges writes at once: it must have a generation of its own first.
    #[test]
    fn review_a_held_image_served_without_a_fence_starts_its_generation() {
        for standalone in [true, false] {
            let d = tempfile::tempdir().unwrap();
            let img = d.path().join("disk.img");
            let size = 4u64 << 20;
            std::fs::write(&img, vec![0u8; size as usize]).unwrap();
            {
                let mut s = SyncState::open(&img, size, true).unwrap();
                s.mark(0, 4096).unwrap();
                assert_eq!(s.meta.generation, s.meta.bitmap_generation);
            }
            let cfg = MirrorConfig {
                image: img.clone(),
                peer: (!standalone).then(|| PeerAddr {
                    addr: "test".into(),
                    secret: Secret::from_bytes(b"0123456789abcdef").unwrap(),
                }),
                on_peer_loss: PeerLoss::Degrade,
                resync_rate: None,
                resync_min_rate: DEFAULT_RESYNC_MIN_RATE,
                witness: None,
                fence_peer: None,
            };
            let m = Mirror::new(cfg, Arc::new(RawImage::open(&img, false).unwrap())).unwrap();
            let t = m.try_reserve(0, 1 << 20, 4096).unwrap();
            let mut r = m.begin_write(t, 1 << 20, 4096).unwrap();
            m.send_data(&mut r, 1 << 20, &[7u8; 4096], false).unwrap();
            let (ok, hold) = m.finish(r, true);
            assert!(ok && hold.is_none(), "acknowledged at once");
            let meta = m.sync_state().meta.clone();
            assert_ne!(
                meta.generation, meta.bitmap_generation,
                "standalone {standalone}: a write the replica lacks was acknowledged while \
                 the generation is still the replica's (access-node will call it held)"
            );
        }
    }

    /// Review: with a fence, a FLUSH held with a clear bitmap (no link yet, or an idle link
    /// that died) opens the gate with no generation started; a later write's first mark
    /// records only the base, and it is acknowledged at once (the gate is open).
    #[test]
    fn review_a_flush_opens_the_gate_before_any_mark() {
        let (_d, m) = mirror_with(4 << 20, |c| c.fence_peer = Some("exit 4".into()));
        let f = m.fence.clone().unwrap();
        let (mm, ff) = (m.clone(), f.clone());
        let th = std::thread::spawn(move || fence::run(mm, ff));
        let remote = m.start_flush(false);
        let (ok, hold) = m.finish(remote, true);
        assert!(ok);
        assert!(m.hold(hold.expect("a degraded flush is held")));
        assert_eq!(f.gate(), fence::Gate::Outdated);
        let t = m.try_reserve(0, 0, 4096).unwrap();
        let mut r = m.begin_write(t, 0, 4096).unwrap();
        m.send_data(&mut r, 0, &[7u8; 4096], false).unwrap();
        let (ok, hold) = m.finish(r, true);
        assert!(ok);
        assert!(m.hold(hold.expect("held")), "acknowledged");
        let meta = m.sync_state().meta.clone();
        m.begin_shutdown();
        th.join().unwrap();
        assert_ne!(
            meta.generation, meta.bitmap_generation,
            "a write the replica lacks was acknowledged at the replica's generation"
        );
    }
}
