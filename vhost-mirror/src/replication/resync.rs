//! Resync: copies the out-of-sync regions to the replica while the guest keeps running.
//!
//! Each run of regions is taken in the in-flight table first (so a guest write to the same
//! bytes waits, or is waited for: they never race), read from the local image, sent with the
//! RESYNC flag, and cleared from the bitmap only when the replica acknowledged it.

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
/// Resync frames in flight.
const WINDOW: usize = 8;
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

/// Copies every out-of-sync region, then tells the replica it is up to date.
pub fn run(m: &Mirror, link: &Arc<Link>, full: bool) -> Result<(), ResyncError> {
    let size = m.disk.size();
    let total = m.sync_state().out_of_sync_bytes();
    info!(
        "{} resync of {} bytes to {} starting",
        if full { "full" } else { "partial" },
        total,
        m.cfg.peer
    );
    {
        let mut s = m.status_lock();
        s.resyncing = true;
        s.resync_done = 0;
        s.peer_disk = Some(DiskState::Inconsistent);
    }
    let started = Instant::now();
    let result = copy_all(m, link, full, total, size);
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
        .resync_finished()
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

fn copy_all(
    m: &Mirror,
    link: &Arc<Link>,
    full: bool,
    total: u64,
    size: u64,
) -> Result<(), ResyncError> {
    wait_ok(
        link.send(Frame::SyncStart { full, bytes: total })
            .map_err(|_| ResyncError::LinkDown)?,
    )?;
    let mut window: VecDeque<InFlight> = VecDeque::new();
    let mut buf = vec![0u8; MAX_DATA];
    let mut cursor = 0u64;
    let mut since_persist = 0u64;
    let started = Instant::now();
    let mut sent_bytes = 0u64;
    let result = loop {
        let next = m.sync_state().bitmap.next_run(cursor, RUN_REGIONS);
        let Some((first, count)) = next else {
            if let Some(f) = window.pop_front() {
                if let Err(e) = complete(m, f) {
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
                let mut err = None;
                while let Some(f) = window.pop_front() {
                    if let Err(e) = complete(m, f) {
                        err = Some(e);
                    }
                }
                if let Some(e) = err {
                    break Err(e);
                }
                m.reserve(RESYNC, offset, len)
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
        window.push_back(InFlight {
            waiter,
            first,
            count,
            bytes: len,
            token,
        });
        cursor = first + count;
        sent_bytes += len;
        since_persist += len;
        if window.len() >= WINDOW {
            if let Some(f) = window.pop_front() {
                if let Err(e) = complete(m, f) {
                    break Err(e);
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
                let mut err = None;
                while let Some(f) = window.pop_front() {
                    if let Err(e) = complete(m, f) {
                        err = Some(e);
                    }
                }
                if let Some(e) = err {
                    break Err(e);
                }
                std::thread::sleep(wait);
            }
        }
    };
    // On error, let what is in flight finish (or fail) and free its ranges.
    for f in window.drain(..) {
        let _ = complete(m, f);
    }
    result
}

/// Waits for one resync frame's ack, clears its regions, frees its range.
fn complete(m: &Mirror, f: InFlight) -> Result<(), ResyncError> {
    let r = wait_ok(f.waiter);
    if r.is_ok() {
        m.sync_state().clear_regions(f.first, f.count);
        m.status_lock().resync_done += f.bytes;
        m.resync_total.fetch_add(f.bytes, Ordering::Relaxed);
    }
    m.inflight.release(f.token);
    r
}
