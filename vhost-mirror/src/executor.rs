//! Executes a parsed request against the disk engine and reports the virtio status.
//!
//! This is the seam replication plugs into: a request is parsed (`request.rs`), executed here,
//! and completed by the queue worker (`device.rs`) with the status this returns.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use log::{debug, warn};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use vm_memory::{Address, Bytes, GuestMemory, GuestMemoryMmap, Permissions};

use mirror_proto::sys::error_chain as chain;

use crate::blk_config::ID_BYTES;
use crate::disk::{DiskError, RawImage};
use crate::replication::inflight::Token;
use crate::replication::{ChunkPool, Mirror, Remote, SharedData, WriteOp, SHARE_MIN};
use crate::request::{Request, RequestType, Segment};
use crate::stats::QueueCounters;
use mirror_proto::frame::MAX_DATA;

/// Scratch buffers reused by one queue worker: an iovec array, the chunk of a small mirrored
/// write's data copied out of guest memory, and the chunks of large ones (shared with the
/// link until they are on the wire).
#[derive(Default)]
pub struct IovecBuf(Vec<libc::iovec>, Vec<u8>, ChunkPool);

// SAFETY: the vector only holds pointers while one request is being executed by the thread
// that owns the buffer; it is cleared before and after each use and never dereferenced
// otherwise, so moving it to another thread cannot expose a dangling pointer.
unsafe impl Send for IovecBuf {}

impl IovecBuf {
    /// Bytes allocated (all start empty and grow with the requests served).
    #[cfg(test)]
    pub fn buffer_bytes(&self) -> usize {
        self.0.capacity() * std::mem::size_of::<libc::iovec>() + self.1.capacity() + self.2.bytes()
    }
}

/// What the device needs to know to execute requests.
pub struct Target<'a> {
    pub disk: &'a RawImage,
    /// Write cache enabled (virtio-blk WCE). When off, every write is made durable before it
    /// completes.
    pub writeback: bool,
    pub id: &'a [u8; ID_BYTES],
    /// The replica, to read from when a local read fails.
    pub mirror: Option<&'a Mirror>,
}

/// A local read failed: serve it from the replica if it has the data.
fn read_from_replica(
    req: &Request,
    mem: &GuestMemoryMmap,
    target: &Target<'_>,
    local: DiskError,
) -> Result<(), DiskError> {
    let Some(m) = target.mirror else {
        return Err(local);
    };
    if !matches!(local, DiskError::Io { .. }) {
        return Err(local);
    }
    // Each chunk goes straight into the guest's buffers, in order.
    let (mut seg, mut seg_at) = (0usize, 0u32);
    let mut bad = false;
    let served = m.read_remote(req.offset, req.data_len, |mut chunk| {
        while !chunk.is_empty() {
            let Some(s) = req.data.get(seg) else {
                return false;
            };
            let n = ((s.len - seg_at) as usize).min(chunk.len());
            if mem
                .write_slice(&chunk[..n], s.addr.unchecked_add(u64::from(seg_at)))
                .is_err()
            {
                bad = true;
                return false;
            }
            chunk = &chunk[n..];
            seg_at += n as u32;
            if seg_at == s.len {
                (seg, seg_at) = (seg + 1, 0);
            }
        }
        true
    });
    if bad {
        return Err(bad_buffer());
    }
    if !served {
        return Err(local);
    }
    warn!(
        "local read at offset {} failed ({}); served from the replica",
        req.offset,
        chain(&local)
    );
    Ok(())
}

/// Result of one request: the status byte and how many bytes were written to guest memory
/// (data plus status), for the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub status: u8,
    pub used_len: u32,
}

/// Builds iovecs pointing at the request's guest buffers.
fn guest_iovecs(
    mem: &GuestMemoryMmap,
    data: &[Segment],
    access: Permissions,
    iov: &mut Vec<libc::iovec>,
) -> Result<(), vm_memory::GuestMemoryError> {
    iov.clear();
    for seg in data {
        for slice in mem.get_slices(seg.addr, seg.len as usize, access)? {
            let slice = slice?;
            iov.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    Ok(())
}

/// Fills `out` with the bytes starting `skip` bytes into the request's guest buffers. False
/// if part of the buffers is not in guest memory (any more).
fn copy_from_guest(mem: &GuestMemoryMmap, data: &[Segment], mut skip: u64, out: &mut [u8]) -> bool {
    let len = out.len();
    let mut at = 0;
    for seg in data {
        if at == len {
            break;
        }
        let seg_len = u64::from(seg.len);
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let n = ((seg_len - skip) as usize).min(len - at);
        let addr = vm_memory::GuestAddress(seg.addr.0 + skip);
        if mem.read_slice(&mut out[at..at + n], addr).is_err() {
            warn!("guest buffer at {:#x} is not in guest memory", addr.0);
            return false;
        }
        at += n;
        skip = 0;
    }
    at == len
}

/// A request whose background parts are in flight: the replica's answer (a mirrored
/// write-type request or FLUSH) and/or a FLUSH's local `fdatasync`.
pub struct Deferred {
    pub head: u16,
    pub completion: Completion,
    pub status_addr: Option<vm_memory::GuestAddress>,
    /// The replica's part, when mirrored.
    pub remote: Option<Remote>,
    pub local_ok: bool,
    /// A FLUSH's local fdatasync, running in the background.
    pub flush: Option<std::sync::Arc<crate::flusher::FlushTicket>>,
    /// When a FLUSH was taken from the ring (its latency is recorded when it finishes).
    pub flush_started: Option<Instant>,
    /// A write of [`POLL_MAX_BYTES`] or more: its ack is milliseconds away, not worth
    /// polling for.
    pub large: bool,
}

/// Writes this large or larger are not polled for while in flight (`--poll-inflight-us`):
/// sealing, sending and applying them takes far longer than the poll, which would only take
/// the CPU their copies and encryption need.
pub const POLL_MAX_BYTES: u64 = 256 * 1024;

impl Deferred {
    /// Signals `ev` when each missing part finishes.
    pub fn notify_when_ready(
        &self,
        mirror: Option<&Mirror>,
        ev: &std::sync::Arc<crate::completion::QueueEvent>,
    ) {
        if let Some(f) = &self.flush {
            f.notify_when_done(ev);
        }
        if let (Some(r), Some(m)) = (&self.remote, mirror) {
            m.notify_when_answered(r, ev);
        }
    }

    /// Whether [`finish_deferred`] will not block.
    pub fn is_ready(&self, mirror: Option<&Mirror>) -> bool {
        self.flush.as_ref().is_none_or(|f| f.is_done())
            && match (&self.remote, mirror) {
                (Some(r), Some(m)) => m.is_answered(r),
                _ => true,
            }
    }
}

/// How a write-type request goes to the replica.
pub struct Mirrored<'a> {
    pub mirror: &'a Mirror,
    /// Its range in the ordering table (None: not a write-type request after all).
    pub token: Option<Token>,
    /// The last request at hand: the worker may put it on the wire itself.
    pub direct: bool,
}

/// Executes a write-type request (OUT, DISCARD, WRITE_ZEROES) on a mirrored device:
/// the request goes to the replica first (or is recorded as out of sync), then to the local
/// image. The guest's completion waits for [`finish_deferred`].
///
/// A write's data is read from guest memory once, a chunk of at most [`MAX_DATA`] bytes at
/// a time, and that copy goes both to the link and to the local image: a guest that changes
/// its buffer while the request is in flight cannot make the two images differ.
pub fn execute_mirrored(
    req: &Request,
    mem: &GuestMemoryMmap,
    target: &Target<'_>,
    iov: &mut IovecBuf,
    counters: &QueueCounters,
    mirrored: Mirrored<'_>,
) -> (Completion, Option<(Remote, bool)>) {
    let Mirrored {
        mirror,
        token,
        direct,
    } = mirrored;
    let Some(token) = token else {
        return (execute(req, mem, target, iov, counters), None);
    };
    let (offset, len, op) = match (req.kind(), req.ranges.first()) {
        (RequestType::Out, _) => (req.offset, req.data_len, WriteOp::Write),
        (RequestType::Discard, Some(r)) => (r.offset, r.len, WriteOp::Discard),
        (RequestType::WriteZeroes, Some(r)) => {
            (r.offset, r.len, WriteOp::WriteZeroes { unmap: r.unmap })
        }
        _ => {
            mirror.release(token);
            return (execute(req, mem, target, iov, counters), None);
        }
    };
    let refused = |e: crate::replication::MirrorError| {
        QueueCounters::add(&counters.errors, 1);
        warn!(
            "{:?} at offset {} refused: {}",
            req.kind(),
            req.offset,
            chain(&e)
        );
        (complete(mem, req, VIRTIO_BLK_S_IOERR as u8, 0), None)
    };
    let mut remote = match mirror.begin_write(token, offset, len) {
        Ok(r) => r,
        Err(e) => return refused(e),
    };
    let c = match op {
        WriteOp::Write => {
            QueueCounters::add(&counters.writes, 1);
            let mut local: Result<(), DiskError> = Ok(());
            // Only the local pwrites (not the copies or the link).
            let mut local_time = std::time::Duration::ZERO;
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(MAX_DATA as u64) as usize;
                let at = offset + done;
                // A large chunk is shared with the link (sealed from where it lies), a small
                // one copied into its send buffer.
                let mut large = (n >= SHARE_MIN).then(|| iov.2.take(n));
                let chunk = match &mut large {
                    Some(c) => &mut c[..n],
                    None => {
                        // Zero-filled only when it grows (not per request).
                        if iov.1.len() < n {
                            iov.1.resize(n, 0);
                        }
                        &mut iov.1[..n]
                    }
                };
                if !copy_from_guest(mem, &req.data, done, chunk) {
                    mirror.fail_request(remote);
                    QueueCounters::add(&counters.errors, 1);
                    return (complete(mem, req, VIRTIO_BLK_S_IOERR as u8, 0), None);
                }
                let shared = large.map(Arc::new);
                let sent = match &shared {
                    Some(c) => {
                        let data = SharedData::new(c.clone(), 0, n);
                        mirror.send_shared(&mut remote, at, data, direct)
                    }
                    None => mirror.send_data(&mut remote, at, &iov.1[..n], direct),
                };
                if let Err(e) = sent {
                    mirror.fail_request(remote);
                    return refused(e);
                }
                if local.is_ok() {
                    // The same bytes the link sends (a guest changing its buffer meanwhile
                    // cannot make the images differ).
                    let bytes = match &shared {
                        Some(c) => &c[..n],
                        None => &iov.1[..n],
                    };
                    let t = Instant::now();
                    local = target.disk.write_at(bytes, at);
                    local_time += t.elapsed();
                }
                if let Some(c) = shared {
                    iov.2.give(c);
                }
                done += n as u64;
            }
            counters.local_write.record(local_time);
            let local = local.and_then(|()| sync_if_writethrough(target));
            status_of(mem, req, local, counters, |c| {
                QueueCounters::add(&c.bytes_written, len)
            })
        }
        WriteOp::Discard | WriteOp::WriteZeroes { .. } => {
            if let Err(e) = mirror.send_op(&mut remote, op, direct) {
                mirror.fail_request(remote);
                return refused(e);
            }
            execute(req, mem, target, iov, counters)
        }
    };
    if !target.writeback {
        // Write-through: durable on the replica too before the guest hears of it.
        if let Err(e) = mirror.send_durable(&mut remote) {
            mirror.fail_request(remote);
            return refused(e);
        }
    }
    let ok = c.status == VIRTIO_BLK_S_OK as u8;
    (c, Some((remote, ok)))
}

/// The completion of a request whose I/O gave `result`.
fn status_of(
    mem: &GuestMemoryMmap,
    req: &Request,
    result: Result<(), DiskError>,
    counters: &QueueCounters,
    on_ok: impl FnOnce(&QueueCounters),
) -> Completion {
    match result {
        Ok(()) => {
            on_ok(counters);
            complete(mem, req, VIRTIO_BLK_S_OK as u8, 0)
        }
        Err(e) => {
            QueueCounters::add(&counters.errors, 1);
            warn!(
                "{:?} at offset {} failed: {}",
                req.kind(),
                req.offset,
                chain(&e)
            );
            complete(mem, req, VIRTIO_BLK_S_IOERR as u8, 0)
        }
    }
}

/// A finished deferred request: its used-ring entry, and in suspend mode after a replica
/// failure, the range the guest must be held on before it sees the completion.
pub struct Finished {
    pub head: u16,
    pub used_len: u32,
    pub hold: Option<(u64, u64)>,
    /// Where the guest reads the status byte (a held request that must fail after all
    /// rewrites it).
    pub status_addr: Option<vm_memory::GuestAddress>,
}

/// Waits for the background parts of a request (the local fdatasync of a FLUSH, the
/// replica's ack); a failure turns the guest's status into IOERR.
pub fn finish_deferred(
    mem: &GuestMemoryMmap,
    mirror: Option<&Mirror>,
    counters: &QueueCounters,
    mut d: Deferred,
) -> Finished {
    let (fresh_failure, hold) = settle(mirror, counters, &mut d);
    if fresh_failure {
        if let Some(addr) = d.status_addr {
            let _ = mem.write_obj(VIRTIO_BLK_S_IOERR as u8, addr);
        }
        return Finished {
            head: d.head,
            used_len: 1,
            hold,
            status_addr: d.status_addr,
        };
    }
    if d.flush.is_some() {
        // A FLUSH's status is written only now that its outcome is known.
        if let Some(addr) = d.status_addr {
            let _ = mem.write_obj(VIRTIO_BLK_S_OK as u8, addr);
        }
    }
    Finished {
        head: d.head,
        used_len: d.completion.used_len,
        hold,
        status_addr: d.status_addr,
    }
}

/// Finishes a deferred request whose guest is gone (disconnected, or we stop): waits for its
/// background parts and does the replica's bookkeeping; nothing goes to guest memory.
pub fn finish_detached(mirror: Option<&Mirror>, counters: &QueueCounters, mut d: Deferred) {
    let _ = settle(mirror, counters, &mut d);
}

/// Waits for a deferred request's background parts and records their outcome (the replica's
/// part through `Mirror::finish`). Returns whether the request fails for the guest although
/// its completion said OK, and the range to hold the guest on (suspend mode).
fn settle(
    mirror: Option<&Mirror>,
    counters: &QueueCounters,
    d: &mut Deferred,
) -> (bool, Option<(u64, u64)>) {
    let mut ok = d.completion.status == VIRTIO_BLK_S_OK as u8;
    let mut fresh_failure = false;
    let mut hold = None;
    let mut local_ok = d.local_ok;
    if let Some(f) = &d.flush {
        if f.wait().is_err() {
            local_ok = false;
            if ok {
                ok = false;
                fresh_failure = true;
            }
        }
    }
    if let (Some(remote), Some(m)) = (d.remote.take(), mirror) {
        let (recorded, h) = m.finish(remote, local_ok);
        hold = h;
        if !recorded && ok {
            fresh_failure = true;
        }
    }
    if fresh_failure {
        QueueCounters::add(&counters.errors, 1);
    }
    if let Some(t) = d.flush_started.take() {
        counters.flush.record(t.elapsed());
    }
    (fresh_failure, hold)
}

/// Executes `req` (already validated) and writes its status byte.
pub fn execute(
    req: &Request,
    mem: &GuestMemoryMmap,
    target: &Target<'_>,
    iov: &mut IovecBuf,
    counters: &QueueCounters,
) -> Completion {
    let add = |c: &AtomicU64, n| QueueCounters::add(c, n);
    let disk = target.disk;
    let mut data_written = 0u32;
    let result: Result<(), DiskError> = match req.kind() {
        RequestType::In => {
            add(&counters.reads, 1);
            match guest_iovecs(mem, &req.data, Permissions::Write, &mut iov.0) {
                // SAFETY: the iovecs point into guest memory regions mapped for the lifetime of
                // `mem`, checked writable-sized by get_slices.
                Ok(()) => unsafe { disk.read_vectored(&mut iov.0, req.offset) }
                    .or_else(|e| read_from_replica(req, mem, target, e))
                    .map(|()| {
                        add(&counters.bytes_read, req.data_len);
                        data_written = req.data_len as u32;
                    }),
                Err(e) => {
                    warn!("guest buffer of a read is not in guest memory: {e}");
                    Err(bad_buffer())
                }
            }
        }
        RequestType::Out => {
            add(&counters.writes, 1);
            match guest_iovecs(mem, &req.data, Permissions::Read, &mut iov.0) {
                Ok(()) => {
                    let t = Instant::now();
                    // SAFETY: as above; the memory is only read.
                    let r = unsafe { disk.write_vectored(&mut iov.0, req.offset) };
                    counters.local_write.record(t.elapsed());
                    r.and_then(|()| sync_if_writethrough(target))
                        .map(|()| add(&counters.bytes_written, req.data_len))
                }
                Err(e) => {
                    warn!("guest buffer of a write is not in guest memory: {e}");
                    Err(bad_buffer())
                }
            }
        }
        RequestType::Flush => {
            add(&counters.flushes, 1);
            disk.flush()
        }
        RequestType::GetId => {
            add(&counters.get_ids, 1);
            let mut left: &[u8] = target.id;
            for seg in &req.data {
                let n = left.len().min(seg.len as usize);
                if n == 0 {
                    break;
                }
                if mem.write_slice(&left[..n], seg.addr).is_err() {
                    break;
                }
                left = &left[n..];
                data_written += n as u32;
            }
            Ok(())
        }
        RequestType::Discard | RequestType::WriteZeroes => {
            let discard = req.kind() == RequestType::Discard;
            add(
                if discard {
                    &counters.discards
                } else {
                    &counters.write_zeroes
                },
                1,
            );
            req.ranges
                .iter()
                .try_for_each(|r| {
                    if discard {
                        disk.discard(r.offset, r.len)
                    } else {
                        disk.write_zeroes(r.offset, r.len, r.unmap)
                    }
                })
                .and_then(|()| sync_if_writethrough(target))
        }
    };
    iov.0.clear();
    let status = match result {
        Ok(()) => VIRTIO_BLK_S_OK as u8,
        Err(e) => {
            add(&counters.errors, 1);
            if matches!(e, DiskError::ReadOnly) {
                debug!("{:?} on a read-only image refused", req.kind());
            } else {
                warn!(
                    "{:?} at offset {} failed: {}",
                    req.kind(),
                    req.offset,
                    chain(&e)
                );
            }
            data_written = 0;
            VIRTIO_BLK_S_IOERR as u8
        }
    };
    complete(mem, req, status, data_written)
}

/// Writes the status byte (if the chain has a place for it) and returns the completion.
pub fn complete(mem: &GuestMemoryMmap, req: &Request, status: u8, data_written: u32) -> Completion {
    let mut used_len = data_written;
    if let Some(addr) = req.status {
        if mem.write_obj(status, addr).is_ok() {
            used_len += 1;
        }
    }
    Completion { status, used_len }
}

fn sync_if_writethrough(target: &Target<'_>) -> Result<(), DiskError> {
    if target.writeback {
        Ok(())
    } else {
        target.disk.flush()
    }
}

fn bad_buffer() -> DiskError {
    DiskError::Io {
        op: "map guest buffer",
        offset: 0,
        source: std::io::Error::from_raw_os_error(libc::EFAULT),
    }
}
