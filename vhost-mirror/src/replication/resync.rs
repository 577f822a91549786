//! Resync: copies the out-of-sync regions to the replica while the guest keeps running.
//!
//! Each run of regions is taken in the in-flight table first (so a guest write to the same
//! bytes waits, or is waited for: they never race), read from the local image, sent with the
//! RESYNC flag, and given back when the replica acknowledged it. Acknowledged runs go in
//! batches; each batch ends with a Flush, and a batch's regions are cleared from the bitmap
//! only once that Flush is acknowledged, i.e. once the replica has them durably (an ack of a
//! write alone means its page cache), and only those regions nobody marked since the batch's
//! first copy was read (`SyncState::clear_unless_marked_since`): a guest write that failed on
//! one side, or a dying link re-marking what it had not flushed, keeps its bit.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::info;
use mirror_proto::bitmap::REGION_SIZE;
use mirror_proto::blockhash;
use mirror_proto::frame::{AckStatus, DiskState, Frame, MAX_DATA};
use thiserror::Error;

use super::inflight::{Token, RESYNC};
use super::link::{ChunkPool, Link, Reply, SharedData, Waiter, SHARE_MIN};
use super::out_of_sync::region_bytes;
use super::Mirror;
use crate::disk::DiskError;

/// Regions per resync frame (1 MiB).
const RUN_REGIONS: u64 = MAX_DATA as u64 / REGION_SIZE;
/// Resync writes in flight (each holds its range until acknowledged).
const WINDOW: usize = 8;
/// Runs of a partial resync whose hashes are asked for at once (each holds its range and a
/// buffer of up to 1 MiB).
const HASH_WINDOW: usize = 8;
/// Acknowledged runs per batch (each batch ends with a Flush, an `fdatasync` on the replica,
/// which goes on applying meanwhile: 256 MiB between them, so that a typical resync needs
/// one, which SyncDone's flush then finds done); at most two batches wait for their Flush.
const BATCH: usize = 256;
/// While the guest writes: regions per run (64 KiB), one run in the link at a time.
const BUSY_RUN_REGIONS: u64 = 1;
/// The guest counts as writing for this long after its last write-type request or flush.
const BUSY_FOR: Duration = Duration::from_millis(20);
/// Persist the (shrinking) bitmap after this many bytes.
const PERSIST_EVERY: u64 = 64 << 20;
/// The resync rate of the metrics is measured over windows of this length.
const RATE_WINDOW: Duration = Duration::from_secs(1);

#[derive(Debug, Error)]
pub enum ResyncError {
    #[error("the link went down")]
    LinkDown,
    #[error("the replica answered {0:?}")]
    Replica(AckStatus),
    #[error("cannot read the local image")]
    Read(#[source] DiskError),
    #[error("cannot update the bitmap")]
    Bitmap(#[source] super::out_of_sync::SyncStateError),
}

struct InFlight {
    /// The run's writes (none if the replica had it all already).
    waiters: Vec<Arc<Waiter>>,
    first: u64,
    count: u64,
    bytes: u64,
    token: Token,
    /// The last mark before this run was read.
    since: u64,
}

/// Acknowledged runs and the Flush that makes them durable on the replica.
struct Batch {
    runs: Vec<(u64, u64)>,
    bytes: u64,
    since: u64,
    flush: Option<Arc<Waiter>>,
}

/// The resync's pipeline: writes in flight, acknowledged runs, batches waiting for a Flush.
/// A run of regions held in the ordering table, its local copy read after mark `since`.
struct Run {
    first: u64,
    count: u64,
    offset: u64,
    token: Token,
    since: u64,
}

/// A run whose hashes were asked of the replica.
struct Hashing {
    run: Run,
    data: Vec<u8>,
    theirs: Arc<Waiter>,
}

struct Pipeline {
    /// Runs waiting for the replica's hashes (at most [`HASH_WINDOW`]).
    hashing: VecDeque<Hashing>,
    /// Buffers of runs the link let go of, for the next ones.
    spare: ChunkPool,
    window: VecDeque<InFlight>,
    acked: Vec<(u64, u64)>,
    acked_bytes: u64,
    acked_since: Option<u64>,
    closed: VecDeque<Batch>,
}

impl Pipeline {
    fn new() -> Self {
        Pipeline {
            hashing: VecDeque::new(),
            spare: ChunkPool::with_max(WINDOW + HASH_WINDOW),
            window: VecDeque::new(),
            acked: Vec::new(),
            acked_bytes: 0,
            acked_since: None,
            closed: VecDeque::new(),
        }
    }

    /// Waits for the oldest write in flight; frees its range; adds it to the open batch.
    fn complete_one(&mut self, m: &Mirror, link: &Link) -> Result<(), ResyncError> {
        let Some(f) = self.window.pop_front() else {
            return Ok(());
        };
        let mut r = Ok(());
        for w in f.waiters {
            let x = wait_ok(w);
            if r.is_ok() {
                r = x;
            }
        }
        m.inflight.release(f.token);
        r?;
        self.acked.push((f.first, f.count));
        self.acked_bytes += f.bytes;
        // The batch's first copy is the one read first (runs complete out of read order
        // once some wait for hashes).
        self.acked_since = Some(self.acked_since.map_or(f.since, |s| s.min(f.since)));
        if self.acked.len() >= BATCH {
            self.close_batch(link);
        }
        Ok(())
    }

    /// Ends the open batch with a Flush.
    fn close_batch(&mut self, link: &Link) {
        let Some(since) = self.acked_since.take() else {
            return;
        };
        let flush = link.send(Frame::Flush).ok();
        self.closed.push_back(Batch {
            runs: std::mem::take(&mut self.acked),
            bytes: std::mem::take(&mut self.acked_bytes),
            since,
            flush,
        });
    }

    /// Waits for the oldest closed batch's Flush; clears what it made durable.
    fn settle_one(&mut self, m: &Mirror) -> Result<(), ResyncError> {
        let Some(b) = self.closed.pop_front() else {
            return Ok(());
        };
        match b.flush {
            Some(w) => wait_ok(w)?,
            None => return Err(ResyncError::LinkDown),
        }
        m.sync_state().clear_unless_marked_since(b.since, &b.runs);
        m.status_lock().resync_done += b.bytes;
        m.resync_total.fetch_add(b.bytes, Ordering::Relaxed);
        Ok(())
    }

    /// Compares the oldest hashed run with the replica's hashes and sends the blocks that
    /// differ (the run joins the write window, with no write if none differs).
    fn settle_hash(&mut self, m: &Mirror, link: &Link) -> Result<(), ResyncError> {
        let Some(h) = self.hashing.pop_front() else {
            return Ok(());
        };
        let len = h.data.len();
        let mut mine = Vec::new();
        blockhash::hash_blocks(&h.data, &mut mine);
        let theirs = match wait_data(h.theirs) {
            Ok(t) => t,
            Err(e) => {
                m.inflight.release(h.run.token);
                return Err(e);
            }
        };
        let parts = blockhash::differing_runs(&mine, &theirs, len);
        let differing: u64 = parts.iter().map(|r| r.1 as u64).sum();
        m.resync_same
            .fetch_add(len as u64 - differing, Ordering::Relaxed);
        self.send_run(m, link, h.run, h.data, &parts)
    }

    /// Sends `parts` of a run's local copy `data` as resync writes; the run joins the write
    /// window, also when the link died midway (the drain then waits for what went out and
    /// frees the range). `data` goes back to the spare buffers.
    fn send_run(
        &mut self,
        m: &Mirror,
        link: &Link,
        run: Run,
        data: Vec<u8>,
        parts: &[(usize, usize)],
    ) -> Result<(), ResyncError> {
        let data = Arc::new(data);
        let (waiters, alive) = match send_parts(m, link, run.offset, &data, parts) {
            Ok(w) => (w, true),
            Err(w) => (w, false),
        };
        let bytes = data.len() as u64;
        self.spare.give(data);
        self.window.push_back(InFlight {
            waiters,
            first: run.first,
            count: run.count,
            bytes,
            token: run.token,
            since: run.since,
        });
        if alive {
            Ok(())
        } else {
            Err(ResyncError::LinkDown)
        }
    }

    /// Waits for the runs being hashed and the writes in flight (their ranges are free after).
    fn settle_all(&mut self, m: &Mirror, link: &Link) -> Result<(), ResyncError> {
        while !self.hashing.is_empty() {
            self.settle_hash(m, link)?;
        }
        while !self.window.is_empty() {
            self.complete_one(m, link)?;
        }
        Ok(())
    }

    /// Waits for everything: runs being hashed, writes in flight, then every batch (the open
    /// one closed first). Ranges are freed even on errors; the first error is returned.
    fn drain(&mut self, m: &Mirror, link: &Link) -> Result<(), ResyncError> {
        let mut r = Ok(());
        while !self.hashing.is_empty() {
            if r.is_ok() {
                r = self.settle_hash(m, link);
            } else if let Some(h) = self.hashing.pop_front() {
                m.inflight.release(h.run.token);
            }
        }
        while !self.window.is_empty() {
            let x = self.complete_one(m, link);
            if r.is_ok() {
                r = x;
            }
        }
        if r.is_ok() {
            self.close_batch(link);
        }
        while !self.closed.is_empty() {
            let x = if r.is_ok() {
                self.settle_one(m)
            } else {
                self.closed.clear();
                Ok(())
            };
            if r.is_ok() {
                r = x;
            }
        }
        r
    }
}

/// Copies every out-of-sync region, then tells the replica it is up to date. `sync_started`:
/// the caller already sent SyncStart on this link.
pub fn run(
    m: &Mirror,
    link: &Arc<Link>,
    full: bool,
    sync_started: bool,
) -> Result<(), ResyncError> {
    let size = m.disk.size();
    let total = m.sync_state().out_of_sync_bytes();
    info!(
        "{} resync of {} bytes to {} starting",
        if full { "full" } else { "partial" },
        total,
        m.peer_name()
    );
    {
        let mut s = m.status_lock();
        s.resyncing = true;
        s.resync_done = 0;
        s.peer_disk = Some(DiskState::Inconsistent);
    }
    let started = Instant::now();
    let result = copy_all(m, link, full, total, size, sync_started);
    m.status_lock().resyncing = false;
    if let Err(ResyncError::Replica(status)) = &result {
        // E.g. the replica ran out of space: it is outdated until a later attempt succeeds.
        m.status_lock().peer_disk = Some(DiskState::Outdated);
        link.fail(&format!("replica answered {status:?} during resync"));
    }
    result?;
    // With a witness, the replica becomes up to date at a generation no record of the
    // witness names: an outdated record of an earlier one can never stand for it again.
    let generation = if m.fence.as_ref().is_some_and(|f| f.witness().is_some()) {
        m.sync_state()
            .fresh_generation()
            .map_err(ResyncError::Bitmap)?
    } else {
        m.sync_state().meta.generation
    };
    wait_ok(
        link.send(Frame::SyncDone { generation })
            .map_err(|_| ResyncError::LinkDown)?,
    )?;
    m.sync_state()
        .resync_finished(generation)
        .map_err(ResyncError::Bitmap)?;
    {
        let mut s = m.status_lock();
        s.peer_disk = Some(DiskState::UpToDate);
        s.peer_generation = Some(generation);
    }
    if let Some(f) = &m.fence {
        f.in_sync();
    }
    let secs = started.elapsed().as_secs_f64();
    info!(
        "resync finished: {} bytes in {:.2}s ({:.0} MiB/s); replica up to date at generation {:016x}",
        total,
        secs,
        total as f64 / secs.max(1e-6) / (1 << 20) as f64,
        generation
    );
    m.notify_changed();
    Ok(())
}

/// Sends `parts` (offset in the run, length) of a run's `data` at `offset` as resync writes
/// (all-zero parts as a 24-byte WriteZeroes; large parts shared, not copied). Err: the link
/// died, with the waiters of what went out before.
fn send_parts(
    m: &Mirror,
    link: &Link,
    offset: u64,
    data: &Arc<Vec<u8>>,
    parts: &[(usize, usize)],
) -> Result<Vec<Arc<Waiter>>, Vec<Arc<Waiter>>> {
    let mut waiters = Vec::with_capacity(parts.len());
    for &(at, n) in parts {
        let part = &data[at..at + n];
        let o = offset + at as u64;
        let sent = if part.iter().all(|b| *b == 0) {
            link.send(Frame::WriteZeroes {
                offset: o,
                len: n as u64,
                unmap: true,
            })
        } else if n >= SHARE_MIN {
            let shared = SharedData::new(data.clone(), at, n);
            link.send_write_shared(o, shared, true, false)
        } else {
            link.send(Frame::Write {
                offset: o,
                data: part,
                resync: true,
            })
        };
        match sent {
            Ok(w) => waiters.push(w),
            Err(_) => return Err(waiters),
        }
        m.resync_sent.fetch_add(n as u64, Ordering::Relaxed);
    }
    Ok(waiters)
}

/// Whether the guest is writing: its write-type requests and flushes, counted by the mirror,
/// grew within [`BUSY_FOR`].
struct Guest<'a> {
    m: &'a Mirror,
    seen: u64,
    changed: Instant,
}

impl<'a> Guest<'a> {
    fn new(m: &'a Mirror) -> Self {
        Guest {
            m,
            seen: m.guest_writes.load(Ordering::Relaxed),
            // Idle until the count moves (a busy guest moves it within the first run).
            changed: Instant::now() - BUSY_FOR,
        }
    }

    fn busy(&mut self) -> bool {
        let n = self.m.guest_writes.load(Ordering::Relaxed);
        if n != self.seen {
            self.seen = n;
            self.changed = Instant::now();
        }
        let busy = self.changed.elapsed() < BUSY_FOR;
        self.m.resync_yielding.store(busy, Ordering::Relaxed);
        busy
    }
}

/// Waits for a reply that carries data (Hashes).
fn wait_data(w: Arc<Waiter>) -> Result<Vec<u8>, ResyncError> {
    match w.wait() {
        Ok(Reply::Data(d)) => Ok(d),
        Ok(Reply::Ack(s)) => Err(ResyncError::Replica(s)),
        Err(_) => Err(ResyncError::LinkDown),
    }
}

fn wait_ok(w: Arc<Waiter>) -> Result<(), ResyncError> {
    match w.wait() {
        Ok(Reply::Ack(AckStatus::Ok)) => Ok(()),
        Ok(Reply::Ack(s)) => Err(ResyncError::Replica(s)),
        Ok(Reply::Data(_)) => Err(ResyncError::Replica(AckStatus::IoError)),
        Err(_) => Err(ResyncError::LinkDown),
    }
}

fn copy_all(
    m: &Mirror,
    link: &Arc<Link>,
    full: bool,
    total: u64,
    size: u64,
    sync_started: bool,
) -> Result<(), ResyncError> {
    if !sync_started {
        wait_ok(
            link.send(Frame::SyncStart { full, bytes: total })
                .map_err(|_| ResyncError::LinkDown)?,
        )?;
    }
    m.sync_state().watch_marks(true);
    let mut p = Pipeline::new();
    // A full sync copies everything (a fresh replica differs everywhere); a partial one
    // compares block hashes first and sends only the blocks that differ.
    // (Only with a replica that answers ReadHashes: an older one gets whole regions.)
    let csums = !full && m.status_lock().peer_hashes;
    let result = copy_runs(m, link, size, csums, &mut p);
    m.resync_yielding.store(false, Ordering::Relaxed);
    m.resync_rate.store(0, Ordering::Relaxed);
    // On error, let what is in flight finish (or fail) and free its ranges.
    let drained = p.drain(m, link);
    m.sync_state().watch_marks(false);
    result.and(drained)
}

fn copy_runs(
    m: &Mirror,
    link: &Arc<Link>,
    size: u64,
    csums: bool,
    p: &mut Pipeline,
) -> Result<(), ResyncError> {
    let mut guest = Guest::new(m);
    // While the guest writes: the earliest time the next run may go.
    let mut busy_due = Instant::now();
    let mut cursor = 0u64;
    let mut since_persist = 0u64;
    let started = Instant::now();
    let mut sent_bytes = 0u64;
    // The rate the metrics show: bytes of the runs taken over the last RATE_WINDOW or so.
    let mut window = (Instant::now(), 0u64);
    loop {
        let busy = guest.busy();
        if busy {
            // Yield to the guest: nothing of ours in the link while we wait for our turn, then
            // one small run (a guest write queues behind at most that).
            p.settle_all(m, link)?;
            let now = Instant::now();
            if busy_due > now {
                std::thread::sleep(busy_due - now);
            }
        }
        let run_regions = if busy { BUSY_RUN_REGIONS } else { RUN_REGIONS };
        let next = m.sync_state().bitmap.next_run(cursor, run_regions);
        let Some((first, count)) = next else {
            if !p.hashing.is_empty()
                || !p.window.is_empty()
                || !p.acked.is_empty()
                || !p.closed.is_empty()
            {
                p.drain(m, link)?;
                continue;
            }
            if m.sync_state().bitmap.is_clear() {
                return Ok(());
            }
            // Regions marked behind the cursor meanwhile: go round again.
            cursor = 0;
            continue;
        };
        let (offset, len) = region_bytes(first, count, size);
        let token = match m.try_reserve(RESYNC, offset, len) {
            Some(t) => t,
            None => {
                // Never wait for others while holding ranges ourselves.
                p.settle_all(m, link)?;
                // A guest request holding the range may itself wait for the next link
                // (suspend mode): give up when this one dies, so that a new one can come.
                m.reserve_while_alive(RESYNC, link, offset, len)
                    .ok_or(ResyncError::LinkDown)?
            }
        };
        let (since, known) = {
            let st = m.sync_state();
            (st.mark_seq(), st.known_parts(first, count, len))
        };
        let run = Run {
            first,
            count,
            offset,
            token,
            since,
        };
        // What to send without comparing: a full sync's whole run, or the blocks this process
        // wrote without the replica; None: compare by hash first.
        let parts = if csums {
            known
        } else {
            Some(vec![(0, len as usize)])
        };
        // Read now, while the run is held (without parts: hashed once the replica's hashes
        // are asked for; HASH_WINDOW runs wait for them at once).
        let mut data = p.spare.take(len as usize);
        data.truncate(len as usize);
        if let Err(e) = m.disk.read_at(&mut data, offset) {
            m.inflight.release(run.token);
            return Err(ResyncError::Read(e));
        }
        if let Some(parts) = parts {
            p.send_run(m, link, run, data, &parts)?;
        } else {
            let theirs = match link.send(Frame::ReadHashes {
                offset,
                len: len as u32,
            }) {
                Ok(w) => w,
                Err(_) => {
                    m.inflight.release(run.token);
                    return Err(ResyncError::LinkDown);
                }
            };
            p.hashing.push_back(Hashing { run, data, theirs });
            if p.hashing.len() >= HASH_WINDOW {
                p.settle_hash(m, link)?;
            }
        }
        cursor = first + count;
        if busy {
            p.settle_all(m, link)?;
            let min_rate = m.cfg.resync_min_rate.max(1);
            busy_due = Instant::now() + Duration::from_secs_f64(len as f64 / min_rate as f64);
        }
        sent_bytes += len;
        since_persist += len;
        window.1 += len;
        let elapsed = window.0.elapsed();
        if elapsed >= RATE_WINDOW {
            let rate = window.1 as f64 / elapsed.as_secs_f64();
            m.resync_rate.store(rate as u64, Ordering::Relaxed);
            window = (Instant::now(), 0);
        }
        if p.window.len() >= WINDOW {
            p.complete_one(m, link)?;
        }
        if p.closed.len() >= 2 {
            p.settle_one(m)?;
        }
        if since_persist >= PERSIST_EVERY {
            since_persist = 0;
            m.sync_state().persist().map_err(ResyncError::Bitmap)?;
        }
        if let Some(rate) = m.cfg.resync_rate {
            // Hold the average at `rate` bytes per second.
            let due = Duration::from_secs_f64(sent_bytes as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                // Free the ranges in flight first: guest writes to them must not wait out the
                // pause.
                p.settle_all(m, link)?;
                std::thread::sleep(wait);
            }
        }
    }
}
