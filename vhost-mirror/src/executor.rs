//! Executes a parsed request against the disk engine and reports the virtio status.
//!
//! This is the seam replication plugs into: a request is parsed (`request.rs`), executed here,
//! and completed by the queue worker (`device.rs`) with the status this returns.

use std::sync::atomic::AtomicU64;

use log::{debug, warn};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use vm_memory::{Bytes, GuestMemory, GuestMemoryMmap, Permissions};

use crate::blk_config::ID_BYTES;
use crate::disk::{DiskError, RawImage};
use crate::request::{Request, RequestType, Segment};
use crate::stats::QueueCounters;

/// Scratch iovec array reused by one queue worker.
#[derive(Default)]
pub struct IovecBuf(Vec<libc::iovec>);

// SAFETY: the vector only holds pointers while one request is being executed by the thread
// that owns the buffer; it is cleared before and after each use and never dereferenced
// otherwise, so moving it to another thread cannot expose a dangling pointer.
unsafe impl Send for IovecBuf {}

/// What the device needs to know to execute requests.
pub struct Target<'a> {
    pub disk: &'a RawImage,
    /// Write cache enabled (virtio-blk WCE). When off, every write is made durable before it
    /// completes.
    pub writeback: bool,
    pub id: &'a [u8; ID_BYTES],
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
                Ok(()) => unsafe { disk.read_vectored(&mut iov.0, req.offset) }.map(|()| {
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
                // SAFETY: as above; the memory is only read.
                Ok(()) => unsafe { disk.write_vectored(&mut iov.0, req.offset) }
                    .and_then(|()| sync_if_writethrough(target))
                    .map(|()| add(&counters.bytes_written, req.data_len)),
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

/// An error with its sources, on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
