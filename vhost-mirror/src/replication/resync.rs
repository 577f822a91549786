//! Resync: copies the out-of-sync regions to the replica while the guest keeps running.
//!
//! Each run of regions is taken in the in-flight table first (so a guest write to the same
//! bytes waits, or is waited for: they never race), read from the local image and sent with
//! the RESYNC flag. Runs go in batches; each batch ends with a Flush, and a batch's regions are
//! cleared from the bitmap only once that Flush is acknowledged, i.e. once the replica has
//! them durably (an ack of a write alone means its page cache). The batch keeps its ranges in
//! the in-flight table until then, so no guest write to them can be sent, and later marked by
//! a dying link, between the copy and the clearing.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::info;
use mirror_proto::bitmap::REGION_SIZE;
use mirror_proto::frame::{AckStatus, DiskState, Frame, MAX_DATA};
use thiserror::Error;

use super::inflight::{Token, RESYNC};
use super::link::{Link, Reply, Waiter};
use super::out_of_sync::region_bytes;
use super::Mirror;
use crate::disk::DiskError;

/// Regions per resync frame (1 MiB).
const RUN_REGIONS: u64 = MAX_DATA as u64 / REGION_SIZE;
/// Runs per batch (each batch ends with a Flush); at most two batches are in flight.
const BATCH: usize = 16;
/// Persist the (shrinking) bitmap after this many bytes.
const PERSIST_EVERY: u64 = 64 << 20;

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
    waiter: Arc<Waiter>,
    first: u64,
    count: u64,
    bytes: u64,
    token: Token,
}

/// Runs sent and the Flush that makes them durable on the replica.
struct Batch {
    runs: Vec<InFlight>,
    flush: Option<Arc<Waiter>>,
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
    let generation = m.sync_state().meta.generation;
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

fn wait_ok(w: Arc<Waiter>) -> Result<(), ResyncError> {
    match w.wait() {
        Ok(Reply::Ack(AckStatus::Ok)) => Ok(()),
        Ok(Reply::Ack(s)) => Err(ResyncError::Replica(s)),
        Ok(Reply::Data(_)) => Err(ResyncError::Replica(AckStatus::IoError)),
        Err(_) => Err(ResyncError::LinkDown),
    }
}

/// Ends the open batch with a Flush (it becomes a closed one).
fn close_batch(link: &Link, open: &mut Vec<InFlight>, closed: &mut VecDeque<Batch>) {
    if open.is_empty() {
        return;
    }
    let flush = link.send(Frame::Flush).ok();
    closed.push_back(Batch {
        runs: std::mem::take(open),
        flush,
    });
}

/// Closes the open batch and settles every batch (waits for them, clears what is durable).
fn settle_all(
    m: &Mirror,
    link: &Link,
    open: &mut Vec<InFlight>,
    closed: &mut VecDeque<Batch>,
) -> Result<(), ResyncError> {
    close_batch(link, open, closed);
    let mut r = Ok(());
    while let Some(b) = closed.pop_front() {
        let x = settle(m, b);
        if r.is_ok() {
            r = x;
        }
    }
    r
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
    let mut open: Vec<InFlight> = Vec::new();
    let mut closed: VecDeque<Batch> = VecDeque::new();
    let mut buf = vec![0u8; MAX_DATA];
    let mut cursor = 0u64;
    let mut since_persist = 0u64;
    let started = Instant::now();
    let mut sent_bytes = 0u64;
    let result = loop {
        let next = m.sync_state().bitmap.next_run(cursor, RUN_REGIONS);
        let Some((first, count)) = next else {
            if !open.is_empty() || !closed.is_empty() {
                if let Err(e) = settle_all(m, link, &mut open, &mut closed) {
                    break Err(e);
                }
                continue;
            }
            if m.sync_state().bitmap.is_clear() {
                break Ok(());
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
                if let Err(e) = settle_all(m, link, &mut open, &mut closed) {
                    break Err(e);
                }
                // A guest request holding the range may itself wait for the next link
                // (suspend mode): give up when this one dies, so that a new one can come.
                match reserve_while_alive(m, link, offset, len) {
                    Some(t) => t,
                    None => break Err(ResyncError::LinkDown),
                }
            }
        };
        let data = &mut buf[..len as usize];
        if let Err(e) = m.disk.read_at(data, offset) {
            m.inflight.release(token);
            break Err(ResyncError::Read(e));
        }
        // All-zero regions (sparse parts of the image) travel as a 24-byte WriteZeroes.
        let req = if data.iter().all(|b| *b == 0) {
            Frame::WriteZeroes {
                offset,
                len,
                unmap: true,
            }
        } else {
            Frame::Write {
                offset,
                data,
                resync: true,
            }
        };
        let waiter = match link.send(req) {
            Ok(w) => w,
            Err(_) => {
                m.inflight.release(token);
                break Err(ResyncError::LinkDown);
            }
        };
        open.push(InFlight {
            waiter,
            first,
            count,
            bytes: len,
            token,
        });
        cursor = first + count;
        sent_bytes += len;
        since_persist += len;
        if open.len() >= BATCH {
            close_batch(link, &mut open, &mut closed);
            if closed.len() >= 2 {
                if let Some(b) = closed.pop_front() {
                    if let Err(e) = settle(m, b) {
                        break Err(e);
                    }
                }
            }
        }
        if since_persist >= PERSIST_EVERY {
            since_persist = 0;
            if let Err(e) = m.sync_state().persist() {
                break Err(ResyncError::Bitmap(e));
            }
        }
        if let Some(rate) = m.cfg.resync_rate {
            // Hold the average at `rate` bytes per second.
            let due = Duration::from_secs_f64(sent_bytes as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                // Free the ranges in flight first: guest writes to them must not wait out the
                // pause.
                if let Err(e) = settle_all(m, link, &mut open, &mut closed) {
                    break Err(e);
                }
                std::thread::sleep(wait);
            }
        }
    };
    // On error, let what is in flight finish (or fail) and free its ranges.
    let _ = settle_all(m, link, &mut open, &mut closed);
    result
}

fn reserve_while_alive(m: &Mirror, link: &Link, offset: u64, len: u64) -> Option<Token> {
    loop {
        let end = offset.saturating_add(len);
        if let Some(t) = m
            .inflight
            .acquire_timeout(RESYNC, offset, end, Duration::from_millis(100))
        {
            return Some(t);
        }
        if !link.is_alive() {
            return None;
        }
    }
}

/// Waits for a batch's acks and its Flush; only then clears its regions (the replica has them
/// durably); frees its ranges either way.
fn settle(m: &Mirror, b: Batch) -> Result<(), ResyncError> {
    let mut r = Ok(());
    for f in &b.runs {
        let x = wait_ok(f.waiter.clone());
        if r.is_ok() {
            r = x;
        }
    }
    let flushed = match b.flush {
        Some(w) => wait_ok(w),
        None => Err(ResyncError::LinkDown),
    };
    if r.is_ok() {
        r = flushed;
    }
    if r.is_ok() {
        let mut s = m.sync_state();
        for f in &b.runs {
            s.clear_regions(f.first, f.count);
        }
        drop(s);
        let bytes: u64 = b.runs.iter().map(|f| f.bytes).sum();
        m.status_lock().resync_done += bytes;
        m.resync_total.fetch_add(bytes, Ordering::Relaxed);
    }
    for f in b.runs {
        m.inflight.release(f.token);
    }
    r
}
