//! In-flight tracking (vhost-user `INFLIGHT_SHMFD`, split rings): which requests the guest
//! handed us are not completed yet, kept in a shared memory region that the frontend (QEMU)
//! holds for us, so that a vhost-mirror started after a crash or a restart finds them again.
//!
//! Without it a restart loses requests: QEMU, when the backend's connection breaks, rewinds the
//! ring to the used index (`virtio_queue_restore_last_avail_idx`), which is exact only if the
//! backend completed requests in the order it took them. We complete them out of order (a read
//! does not wait for a mirrored write, a FLUSH's `fdatasync` runs while later writes complete):
//! after a rewind a request completed out of order runs twice (its descriptor may already
//! carry the guest's next request) and one taken before it never completes (the guest waits
//! for it forever).
//!
//! The region (one part per queue; layout as libvhost-user's, `VuVirtqInflight`):
//! ```text
//! queue part: features u64 | version u16 | desc_num u16 | last_batch_head u16 | used_idx u16
//!             desc[desc_num]: inflight u8 | 5 bytes padding | next u16 | counter u64
//! ```
//! The protocol, per request (`QueueInflight`):
//! - taken from the ring: `desc[head].counter = counter++; desc[head].inflight = 1`;
//! - completed: `last_batch_head = head`, the used element and the used index written to the
//!   ring, then `desc[head].inflight = 0; used_idx = the ring's used index`.
//!
//! **Invariant: after a restart, every request the guest made available is either completed
//! in the used ring or run again, exactly once, in the order it was first taken.** At start
//! (`QueueInflight::recover`): if the region's `used_idx` differs from the ring's, we died
//! between writing the used index and clearing the entry, so `last_batch_head`'s entry is
//! cleared. Every request taken is then either in the used ring (the ring's used index counts
//! them) or marked in flight, so the next one to take from the ring is at used index +
//! in-flight count; the in-flight ones are run again first, by counter. A request taken but
//! not yet marked (a crash between the two) is counted by neither and taken again from the ring.
//!
//! The frontend's messages for the region (`GET_INFLIGHT_FD`, `SET_INFLIGHT_FD`) are answered by
//! the relay in `frontend.rs` ([`intercept`]): vhost-user-backend answers both with an error.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use thiserror::Error;
use virtio_queue::desc::split::Descriptor;
use vm_memory::mmap::{MmapRegion, MmapRegionError};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemory, VolatileMemory, VolatileSlice};

/// vhost-user requests handled here.
pub const GET_INFLIGHT_FD: u32 = 31;
pub const SET_INFLIGHT_FD: u32 = 32;
pub const SET_VRING_KICK: u32 = 12;
/// Header flags: protocol version 1, a reply, the frontend wants a reply (REPLY_ACK).
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
/// `VhostUserInflight`: mmap_size u64, mmap_offset u64, num_queues u16, queue_size u16 (24
/// bytes with its padding, as QEMU sends and expects it).
const INFLIGHT_PAYLOAD: usize = 24;

const HEADER: usize = 16;
const DESC: usize = 16;
const ALIGN: usize = 64;
const VERSION: u16 = 1;
const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH: usize = 12;
const OFF_USED_IDX: usize = 14;
const DESC_INFLIGHT: usize = 0;
const DESC_COUNTER: usize = 8;
/// Largest split ring (VIRTIO 1.x).
const MAX_QUEUE_SIZE: u16 = 32768;
/// Most queues a region may describe (vhost-user's limit on a device's queues is far lower in
/// practice; this bounds what a frontend can make us map).
const MAX_QUEUES: u16 = 1024;

#[derive(Debug, Error)]
pub enum InflightError {
    #[error("in-flight region: queue size {0} is not a power of two up to {MAX_QUEUE_SIZE}")]
    QueueSize(u16),
    #[error("in-flight region: {0} queues (1 to {MAX_QUEUES})")]
    Queues(u16),
    #[error("in-flight region of {size} bytes at offset {offset}: {needed} bytes needed, file holds {file}")]
    Size {
        size: u64,
        offset: u64,
        needed: u64,
        file: u64,
    },
    #[error("cannot create the in-flight region")]
    Create(#[source] io::Error),
    #[error("cannot map the in-flight region")]
    Map(#[source] MmapRegionError),
    #[error("in-flight region: its file could shrink under the mapping (not sealed against it)")]
    Unsealed(#[source] io::Error),
    #[error("vhost-user {request} message: {why}")]
    Message { request: u32, why: &'static str },
}

/// Bytes of one queue's part for a ring of `queue_size` entries.
pub fn queue_part_bytes(queue_size: u16) -> usize {
    (HEADER + DESC * usize::from(queue_size)).next_multiple_of(ALIGN)
}

fn check_shape(num_queues: u16, queue_size: u16) -> Result<(), InflightError> {
    if queue_size == 0 || !queue_size.is_power_of_two() || queue_size > MAX_QUEUE_SIZE {
        return Err(InflightError::QueueSize(queue_size));
    }
    if num_queues == 0 || num_queues > MAX_QUEUES {
        return Err(InflightError::Queues(num_queues));
    }
    Ok(())
}

/// The whole region, mapped: one part per queue.
pub struct InflightRegion {
    map: MmapRegion<()>,
    num_queues: u16,
    queue_size: u16,
}

impl InflightRegion {
    /// A new, zeroed region in a memfd (GET_INFLIGHT_FD); the file goes to the frontend.
    pub fn create(
        num_queues: u16,
        queue_size: u16,
    ) -> Result<(InflightRegion, File), InflightError> {
        check_shape(num_queues, queue_size)?;
        let size = usize::from(num_queues) * queue_part_bytes(queue_size);
        // SAFETY: a constant NUL-terminated name and flags; the result is checked.
        let fd = unsafe {
            libc::memfd_create(
                c"vhost-mirror-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(InflightError::Create(io::Error::last_os_error()));
        }
        // SAFETY: memfd_create just returned this descriptor; nothing else owns it.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(size as u64).map_err(InflightError::Create)?;
        // The frontend holds the file: sealed, as libvhost-user seals its own, so that it cannot
        // shrink it under our mapping (a mark past the end is SIGBUS) nor grow it.
        add_seals(
            &file,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
        )
        .map_err(InflightError::Create)?;
        let dup = file.try_clone().map_err(InflightError::Create)?;
        let region = Self::map(dup, 0, size as u64, num_queues, queue_size)?;
        Ok((region, file))
    }

    /// Maps the region the frontend gave us (SET_INFLIGHT_FD), after checking that the file
    /// holds it all and cannot shrink (a mapping past the file's end faults on access): ours
    /// are sealed so; another memfd is sealed now, anything else refused.
    pub fn map(
        file: File,
        offset: u64,
        size: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<InflightRegion, InflightError> {
        check_shape(num_queues, queue_size)?;
        // SAFETY: F_GET_SEALS on a descriptor we own; the result is checked.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            add_seals(&file, libc::F_SEAL_SHRINK).map_err(InflightError::Unsealed)?;
        }
        let needed = u64::from(num_queues) * queue_part_bytes(queue_size) as u64;
        let file_len = file.metadata().map_err(InflightError::Create)?.len();
        let page = 4096;
        if size < needed
            || !offset.is_multiple_of(page)
            || offset.checked_add(size).is_none_or(|end| end > file_len)
        {
            return Err(InflightError::Size {
                size,
                offset,
                needed,
                file: file_len,
            });
        }
        let map = MmapRegion::from_file(FileOffset::new(file, offset), needed as usize)
            .map_err(InflightError::Map)?;
        Ok(InflightRegion {
            map,
            num_queues,
            queue_size,
        })
    }

    /// Queue `q`'s part, for a ring of `ring_size` entries; `None` if the region has no part for
    /// it or was made for smaller rings.
    pub fn queue(self: &Arc<Self>, q: usize, ring_size: u16) -> Option<QueueInflight> {
        if q >= usize::from(self.num_queues) || ring_size > self.queue_size || ring_size == 0 {
            return None;
        }
        Some(QueueInflight {
            region: self.clone(),
            base: q * queue_part_bytes(self.queue_size),
            size: ring_size,
            counter: std::cell::Cell::new(0),
        })
    }
}

/// Adds `seals` to a memfd (one made with `MFD_ALLOW_SEALING` and not sealed with
/// `F_SEAL_SEAL`; anything else refuses).
fn add_seals(file: &File, seals: libc::c_int) -> io::Result<()> {
    // SAFETY: F_ADD_SEALS on a descriptor we own, with seal flags; the result is checked.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What a queue does after [`QueueInflight::recover`].
#[derive(Debug, PartialEq, Eq)]
pub struct Resume {
    /// The ring index of the next request to take (the used index + the requests in flight).
    pub next_avail: u16,
    /// Heads of the requests to run again, in the order they were first taken.
    pub resubmit: Vec<u16>,
    /// `last_batch_head`'s entry was cleared (we died right after completing it).
    pub cleared_last: bool,
}

/// One queue's part of the region.
pub struct QueueInflight {
    region: Arc<InflightRegion>,
    base: usize,
    size: u16,
    counter: std::cell::Cell<u64>,
}

impl QueueInflight {
    fn slice(&self) -> VolatileSlice<'_> {
        // In bounds: `queue` checked q < num_queues and the map holds num_queues parts.
        self.region
            .map
            .get_slice(self.base, queue_part_bytes(self.region.queue_size))
            .unwrap_or_else(|_| self.region.map.as_volatile_slice())
    }

    fn store<T: vm_memory::AtomicAccess>(&self, v: T, at: usize) {
        // Aligned and in bounds by construction (offsets of the fixed layout).
        let _ = self.slice().store(v, at, Ordering::Release);
    }

    fn load<T: vm_memory::AtomicAccess + Default>(&self, at: usize) -> T {
        self.slice().load(at, Ordering::Acquire).unwrap_or_default()
    }

    fn desc_at(head: u16) -> usize {
        HEADER + DESC * usize::from(head)
    }

    /// At the queue's start: what was in flight when the last process stopped. `used_idx` is
    /// the ring's used index (guest memory). A fresh region (version 0) or one made for another
    /// ring size starts empty.
    pub fn recover(&mut self, used_idx: u16) -> Resume {
        let version: u16 = self.load(OFF_VERSION);
        let desc_num: u16 = self.load(OFF_DESC_NUM);
        if version != VERSION || desc_num != self.size {
            if version != 0 {
                log::warn!(
                    "in-flight region of version {version} for {desc_num} entries (ring of {}): \
                     starting it afresh",
                    self.size
                );
            }
            for h in 0..self.size {
                self.store(0u8, Self::desc_at(h) + DESC_INFLIGHT);
                self.store(0u64, Self::desc_at(h) + DESC_COUNTER);
            }
            self.store(used_idx, OFF_USED_IDX);
            self.store(0u16, OFF_LAST_BATCH);
            self.store(self.size, OFF_DESC_NUM);
            self.store(VERSION, OFF_VERSION);
            self.counter.set(0);
            return Resume {
                next_avail: used_idx,
                resubmit: Vec::new(),
                cleared_last: false,
            };
        }
        let mut cleared_last = false;
        if self.load::<u16>(OFF_USED_IDX) != used_idx {
            let last: u16 = self.load(OFF_LAST_BATCH);
            if last < self.size {
                cleared_last = self.load::<u8>(Self::desc_at(last) + DESC_INFLIGHT) != 0;
                self.store(0u8, Self::desc_at(last) + DESC_INFLIGHT);
            }
            self.store(used_idx, OFF_USED_IDX);
        }
        let mut inflight: Vec<(u64, u16)> = (0..self.size)
            .filter(|&h| self.load::<u8>(Self::desc_at(h) + DESC_INFLIGHT) != 0)
            .map(|h| (self.load::<u64>(Self::desc_at(h) + DESC_COUNTER), h))
            .collect();
        inflight.sort_unstable();
        self.counter
            .set(inflight.last().map_or(0, |&(c, _)| c.wrapping_add(1)));
        Resume {
            // At most `size` entries are in flight: the count fits a u16.
            next_avail: used_idx.wrapping_add(inflight.len() as u16),
            resubmit: inflight.into_iter().map(|(_, h)| h).collect(),
            cleared_last,
        }
    }

    /// The request at `head` was taken from the ring.
    pub fn taken(&self, head: u16) {
        if head >= self.size {
            return; // the ring refuses such a head; nothing to track
        }
        let c = self.counter.get();
        self.store(c, Self::desc_at(head) + DESC_COUNTER);
        self.counter.set(c.wrapping_add(1));
        self.store(1u8, Self::desc_at(head) + DESC_INFLIGHT);
    }

    /// The request at `head` is about to be put on the used ring.
    pub fn completing(&self, head: u16) {
        if head < self.size {
            self.store(head, OFF_LAST_BATCH);
        }
    }

    /// The request at `head` is on the used ring, whose used index is now `used_idx`.
    pub fn completed(&self, head: u16, used_idx: u16) {
        if head < self.size {
            self.store(0u8, Self::desc_at(head) + DESC_INFLIGHT);
        }
        self.store(used_idx, OFF_USED_IDX);
    }

    /// Requests marked in flight (for tests and status).
    #[cfg(test)]
    fn marked(&self) -> usize {
        (0..self.size)
            .filter(|&h| self.load::<u8>(Self::desc_at(h) + DESC_INFLIGHT) != 0)
            .count()
    }
}

/// The descriptors of the chain at `head` in a split ring's descriptor table, as the queue's
/// own `DescriptorChain` yields them (virtio-queue builds one only for a head it takes from the
/// avail ring; a request run again is not there any more). Same rules: at most `queue_size`
/// descriptors, one level of indirect table (of at most 65535 descriptors), at most 4 GiB in
/// all; anything else ends the chain, and the request parser refuses what is left.
#[derive(Clone)]
pub struct HeadChain<'a, M: GuestMemory> {
    mem: &'a M,
    table: GuestAddress,
    table_len: u16,
    next: u16,
    ttl: u16,
    indirect: bool,
    bytes: u32,
}

impl<'a, M: GuestMemory> HeadChain<'a, M> {
    pub fn new(mem: &'a M, desc_table: GuestAddress, queue_size: u16, head: u16) -> Self {
        HeadChain {
            mem,
            table: desc_table,
            table_len: queue_size,
            next: head,
            ttl: queue_size,
            indirect: false,
            bytes: 0,
        }
    }
}

impl<M: GuestMemory> Iterator for HeadChain<'_, M> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        loop {
            if self.ttl == 0 || self.next >= self.table_len {
                return None;
            }
            let at = self
                .table
                .0
                .checked_add(u64::from(self.next) * DESC as u64)?;
            let desc: Descriptor = self.mem.read_obj(GuestAddress(at)).ok()?;
            if desc.refers_to_indirect_table() {
                if self.indirect || !desc.len().is_multiple_of(DESC as u32) {
                    return None;
                }
                let len = u16::try_from(desc.len() / DESC as u32).ok()?;
                self.table = desc.addr();
                self.table_len = len;
                self.next = 0;
                self.ttl = len;
                self.indirect = true;
                continue;
            }
            self.bytes = self.bytes.checked_add(desc.len())?;
            if desc.has_next() {
                self.next = desc.next();
                self.ttl -= 1;
            } else {
                self.ttl = 0;
            }
            return Some(desc);
        }
    }
}

/// Where the relay keeps the region of the current connection.
pub trait InflightHost: Send + Sync {
    /// A region for this connection (GET_INFLIGHT_FD, SET_INFLIGHT_FD), replacing any earlier
    /// one; `None`: no region (a GET_INFLIGHT_FD we could not answer with one).
    fn set_region(&self, region: Option<Arc<InflightRegion>>);
    /// Whether a region is set (the relay then kicks each queue once it has its kick eventfd,
    /// so that requests to run again are run without waiting for the guest's next request).
    fn has_region(&self) -> bool;
}

/// What the relay does with a message from the frontend.
pub enum Intercepted {
    /// Not ours: pass it to the daemon.
    Forward,
    /// Answered here; send this to the frontend (empty: no answer).
    Reply(Vec<u8>, Vec<OwnedFd>),
}

fn reply(request: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(12 + payload.len());
    v.extend_from_slice(&request.to_ne_bytes());
    v.extend_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_ne_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_ne_bytes());
    v.extend_from_slice(payload);
    v
}

fn inflight_payload(
    mmap_size: u64,
    mmap_offset: u64,
    num_queues: u16,
    queue_size: u16,
) -> [u8; INFLIGHT_PAYLOAD] {
    let mut p = [0u8; INFLIGHT_PAYLOAD];
    p[0..8].copy_from_slice(&mmap_size.to_ne_bytes());
    p[8..16].copy_from_slice(&mmap_offset.to_ne_bytes());
    p[16..18].copy_from_slice(&num_queues.to_ne_bytes());
    p[18..20].copy_from_slice(&queue_size.to_ne_bytes());
    p
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_ne_bytes(x)
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

/// Handles a frontend message (whole: 12-byte header and payload; `fds` came with it) if it
/// is about the in-flight region. A bad one is answered with an error where the frontend
/// waits for an answer, and logged; it never reaches the daemon.
pub fn intercept(bytes: &[u8], fds: &mut Vec<OwnedFd>, host: &dyn InflightHost) -> Intercepted {
    if bytes.len() < 12 {
        return Intercepted::Forward;
    }
    let request = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let flags = u32::from_ne_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    let payload = &bytes[12..];
    // Both messages carry a `VhostUserInflight`: (mmap_size, mmap_offset, num_queues,
    // queue_size).
    let fields = || {
        if payload.len() < 20 {
            return Err(InflightError::Message {
                request,
                why: "payload too short",
            });
        }
        Ok((
            u64_at(payload, 0),
            u64_at(payload, 8),
            u16_at(payload, 16),
            u16_at(payload, 18),
        ))
    };
    match request {
        GET_INFLIGHT_FD => {
            // The frontend asks only when it has no region (the first start, or after a device
            // reset freed it): whatever we had is stale, also if no new one can be made.
            host.set_region(None);
            let r = (|| -> Result<_, InflightError> {
                let (_, _, num_queues, queue_size) = fields()?;
                let (region, file) = InflightRegion::create(num_queues, queue_size)?;
                let size = u64::from(num_queues) * queue_part_bytes(queue_size) as u64;
                host.set_region(Some(Arc::new(region)));
                Ok((size, num_queues, queue_size, file))
            })();
            match r {
                Ok((size, nq, qs, file)) => {
                    log::info!("in-flight tracking: a region for {nq} queue(s) of {qs} entries");
                    Intercepted::Reply(
                        reply(request, &inflight_payload(size, 0, nq, qs)),
                        vec![OwnedFd::from(file)],
                    )
                }
                Err(e) => {
                    log::warn!("GET_INFLIGHT_FD refused: {e}");
                    // mmap_size 0: the frontend goes on without in-flight tracking.
                    Intercepted::Reply(reply(request, &inflight_payload(0, 0, 0, 0)), Vec::new())
                }
            }
        }
        SET_INFLIGHT_FD => {
            let r = (|| {
                let (size, offset, num_queues, queue_size) = fields()?;
                if fds.len() != 1 {
                    return Err(InflightError::Message {
                        request,
                        why: "needs exactly one file descriptor",
                    });
                }
                let file = File::from(fds.remove(0));
                let region = InflightRegion::map(file, offset, size, num_queues, queue_size)?;
                log::info!(
                    "in-flight tracking: the frontend's region ({} queue(s) of {} entries)",
                    region.num_queues,
                    region.queue_size
                );
                host.set_region(Some(Arc::new(region)));
                Ok(())
            })();
            let status: u64 = match r {
                Ok(()) => 0,
                Err(e) => {
                    log::warn!("SET_INFLIGHT_FD refused: {e}");
                    1
                }
            };
            fds.clear();
            if flags & FLAG_NEED_REPLY != 0 {
                Intercepted::Reply(reply(request, &status.to_ne_bytes()), Vec::new())
            } else {
                Intercepted::Reply(Vec::new(), Vec::new())
            }
        }
        _ => Intercepted::Forward,
    }
}

/// After SET_VRING_KICK went to the daemon: a copy of its kick eventfd, to be signalled once
/// (`kick`) when a region is set, so that a queue with requests to run again is woken without
/// waiting for the guest (which may be waiting for exactly those). A spurious kick costs a
/// look at an empty ring.
pub fn kick_fd_of(bytes: &[u8], fds: &[OwnedFd], host: &dyn InflightHost) -> Option<OwnedFd> {
    if bytes.len() < 12 + 8 || fds.len() != 1 || !host.has_region() {
        return None;
    }
    let request = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if request != SET_VRING_KICK {
        return None;
    }
    fds[0].try_clone().ok()
}

/// Signals an eventfd once (the copy [`kick_fd_of`] made).
pub fn kick(fd: OwnedFd) -> io::Result<()> {
    use std::io::Write;
    File::from(fd).write_all(&1u64.to_ne_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(size: u16) -> (Arc<InflightRegion>, QueueInflight) {
        let (region, _file) = InflightRegion::create(2, size).unwrap();
        let region = Arc::new(region);
        let q = region.queue(1, size).unwrap();
        (region, q)
    }

    /// A model of the used ring and the worker: take and complete requests, die at any step,
    /// recover, and check that every request is either completed or run again, once.
    #[test]
    fn a_restart_at_any_step_runs_again_exactly_what_did_not_complete() {
        // Take 0..6 (heads 10..16), complete them out of order: 2, 0, 5, 1; die at each of the
        // steps of the last completion (head of request 1).
        for die_at in 0..4 {
            let (region, mut q) = queue(64);
            assert_eq!(q.recover(0).next_avail, 0);
            let heads: Vec<u16> = (10..16).collect();
            for &h in &heads {
                q.taken(h);
            }
            let mut used = 0u16;
            for &i in &[2usize, 0, 5] {
                q.completing(heads[i]);
                used += 1;
                q.completed(heads[i], used);
            }
            // The last completion, cut short.
            let h = heads[1];
            let ring_used = match die_at {
                0 => used, // before anything
                1 => {
                    q.completing(h);
                    used // used element written, index not yet
                }
                2 => {
                    q.completing(h);
                    used + 1 // used index written, entry not yet cleared
                }
                _ => {
                    q.completing(h);
                    q.completed(h, used + 1);
                    used + 1
                }
            };
            drop(q);
            let mut again = region.queue(1, 64).unwrap();
            let r = again.recover(ring_used);
            let completed_1 = ring_used == used + 1;
            let expected: Vec<u16> = if completed_1 {
                vec![heads[3], heads[4]]
            } else {
                vec![heads[1], heads[3], heads[4]]
            };
            assert_eq!(r.resubmit, expected, "die_at {die_at}");
            assert_eq!(r.cleared_last, die_at == 2, "die_at {die_at}");
            // Taken so far: 6 = completed (ring) + in flight.
            assert_eq!(r.next_avail, 6, "die_at {die_at}");
            assert_eq!(again.marked(), expected.len());
            // The counter goes on after the last one taken.
            again.taken(heads[0]);
            let r2 = {
                drop(again);
                region.queue(1, 64).unwrap().recover(ring_used)
            };
            assert_eq!(*r2.resubmit.last().unwrap(), heads[0]);
        }
    }

    #[test]
    fn a_request_taken_but_not_marked_is_taken_again_from_the_ring() {
        let (region, mut q) = queue(8);
        q.recover(5);
        q.taken(3); // ring index 5
                    // died after taking ring index 6 from the ring, before marking it
        drop(q);
        let r = region.queue(1, 8).unwrap().recover(5);
        assert_eq!(r.resubmit, vec![3]);
        assert_eq!(r.next_avail, 6, "index 6 is taken again from the ring");
    }

    #[test]
    fn a_region_for_another_ring_size_or_damaged_starts_afresh() {
        let (region, mut q) = queue(64);
        q.recover(0);
        q.taken(1);
        drop(q);
        // A smaller ring: the old entries mean nothing.
        let r = region.queue(1, 32).unwrap().recover(7);
        assert_eq!(
            r,
            Resume {
                next_avail: 7,
                resubmit: vec![],
                cleared_last: false
            }
        );
        // A larger ring than the region holds: no tracking.
        assert!(region.queue(1, 128).is_none());
        assert!(region.queue(2, 64).is_none());
        // Garbage everywhere: bounded work, heads within the ring.
        let (region, q) = queue(16);
        let s = q.slice();
        for i in 0..s.len() {
            let _ = s.store(0xffu8, i, Ordering::Relaxed);
        }
        s.store(VERSION, OFF_VERSION, Ordering::Relaxed).unwrap();
        s.store(16u16, OFF_DESC_NUM, Ordering::Relaxed).unwrap();
        drop(q);
        let r = region.queue(1, 16).unwrap().recover(3);
        assert_eq!(r.resubmit.len(), 16);
        assert!(r.resubmit.iter().all(|&h| h < 16));
    }

    /// The frontend holds the region's file: if it could shrink it, our next mark would touch
    /// a page past its end (SIGBUS, the process dies). Ours is sealed as libvhost-user seals
    /// its own; one the frontend brings is sealed against shrinking before it is mapped, or
    /// refused.
    #[test]
    fn a_region_cannot_shrink_under_its_mapping() {
        let (_region, file) = InflightRegion::create(1, 64).unwrap();
        assert!(file.set_len(0).is_err(), "our own region can be shrunk");
        let need = queue_part_bytes(64) as u64;
        // SAFETY: a constant NUL-terminated name and flags; the result is checked.
        let fd = unsafe {
            libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        assert!(fd >= 0);
        // SAFETY: memfd_create just returned this descriptor; nothing else owns it.
        let memfd = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        memfd.set_len(need).unwrap();
        InflightRegion::map(memfd.try_clone().unwrap(), 0, need, 1, 64).unwrap();
        assert!(memfd.set_len(0).is_err(), "a mapped region can be shrunk");
        let plain = tempfile::tempfile().unwrap();
        plain.set_len(need).unwrap();
        assert!(matches!(
            InflightRegion::map(plain, 0, need, 1, 64),
            Err(InflightError::Unsealed(_))
        ));
    }

    #[test]
    fn a_mapping_must_fit_the_file() {
        let (_region, file) = InflightRegion::create(2, 256).unwrap();
        let need = 2 * queue_part_bytes(256) as u64;
        let f = || file.try_clone().unwrap();
        assert!(InflightRegion::map(f(), 0, need, 2, 256).is_ok());
        assert!(matches!(
            InflightRegion::map(f(), 0, need, 4, 256),
            Err(InflightError::Size { .. })
        ));
        assert!(matches!(
            InflightRegion::map(f(), 4096, need, 2, 256),
            Err(InflightError::Size { .. })
        ));
        assert!(matches!(
            InflightRegion::map(f(), u64::MAX - 4095, need, 2, 256),
            Err(InflightError::Size { .. })
        ));
        assert!(matches!(
            InflightRegion::map(f(), 0, need, 2, 100),
            Err(InflightError::QueueSize(100))
        ));
        assert!(matches!(
            InflightRegion::map(f(), 0, need, 0, 256),
            Err(InflightError::Queues(0))
        ));
    }

    struct Host(std::sync::Mutex<Option<Arc<InflightRegion>>>);
    impl InflightHost for Host {
        fn set_region(&self, r: Option<Arc<InflightRegion>>) {
            *self.0.lock().unwrap() = r;
        }
        fn has_region(&self) -> bool {
            self.0.lock().unwrap().is_some()
        }
    }

    fn msg(req: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&req.to_ne_bytes());
        v.extend_from_slice(&flags.to_ne_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_ne_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn get_then_set_shares_one_region_and_bad_messages_are_refused() {
        let host = Host(std::sync::Mutex::new(None));
        let get = msg(GET_INFLIGHT_FD, 1, &inflight_payload(0, 0, 2, 128));
        let Intercepted::Reply(r, mut fds) = intercept(&get, &mut Vec::new(), &host) else {
            panic!("GET_INFLIGHT_FD forwarded");
        };
        assert_eq!(r.len(), 12 + INFLIGHT_PAYLOAD);
        assert_eq!(
            u32::from_ne_bytes(r[4..8].try_into().unwrap()),
            FLAG_VERSION | FLAG_REPLY
        );
        let size = u64_at(&r, 12);
        assert_eq!(size, 2 * queue_part_bytes(128) as u64);
        assert_eq!(fds.len(), 1);
        // What we write through the first mapping, the second sees (as after a restart).
        {
            let mut q = host
                .0
                .lock()
                .unwrap()
                .clone()
                .unwrap()
                .queue(0, 128)
                .unwrap();
            q.recover(0);
            q.taken(9);
        }
        let set = msg(
            SET_INFLIGHT_FD,
            1 | FLAG_NEED_REPLY,
            &inflight_payload(size, 0, 2, 128),
        );
        let Intercepted::Reply(r, _) = intercept(&set, &mut fds, &host) else {
            panic!("SET_INFLIGHT_FD forwarded");
        };
        assert_eq!(u64_at(&r, 12), 0, "accepted");
        let region = host.0.lock().unwrap().clone().unwrap();
        assert_eq!(region.queue(0, 128).unwrap().recover(0).resubmit, vec![9]);
        // Too big for the file, no descriptor, short payload: refused, answered.
        let bad = msg(
            SET_INFLIGHT_FD,
            1 | FLAG_NEED_REPLY,
            &inflight_payload(size * 2, 0, 4, 128),
        );
        let (_r2, f2) = InflightRegion::create(1, 4).unwrap();
        let Intercepted::Reply(r, _) = intercept(&bad, &mut vec![OwnedFd::from(f2)], &host) else {
            panic!()
        };
        assert_eq!(u64_at(&r, 12), 1);
        let Intercepted::Reply(r, _) = intercept(&bad, &mut Vec::new(), &host) else {
            panic!()
        };
        assert_eq!(u64_at(&r, 12), 1);
        let short = msg(GET_INFLIGHT_FD, 1, &[0; 4]);
        let Intercepted::Reply(r, fds) = intercept(&short, &mut Vec::new(), &host) else {
            panic!()
        };
        assert_eq!(u64_at(&r, 12), 0, "mmap_size 0: no tracking");
        assert!(fds.is_empty());
        // Without NEED_REPLY nothing is answered.
        let quiet = msg(SET_INFLIGHT_FD, 1, &inflight_payload(size, 0, 2, 128));
        let Intercepted::Reply(r, _) = intercept(&quiet, &mut Vec::new(), &host) else {
            panic!()
        };
        assert!(r.is_empty());
        // Other requests pass.
        assert!(matches!(
            intercept(&msg(1, 1, &[]), &mut Vec::new(), &host),
            Intercepted::Forward
        ));
    }

    /// QEMU asks for a region (GET_INFLIGHT_FD) only when it has none: at the first start and
    /// after a device reset (`vhost_user_blk_reset` frees it). The region we had is then
    /// stale: if we cannot make the new one, the frontend goes on without tracking, and we
    /// must too (not run the old region's requests again on the guest's new rings, nor kick
    /// for it).
    #[test]
    fn a_refused_get_drops_the_previous_region() {
        let host = Host(std::sync::Mutex::new(None));
        let get = |qs: u16| msg(GET_INFLIGHT_FD, 1, &inflight_payload(0, 0, 1, qs));
        assert!(matches!(
            intercept(&get(64), &mut Vec::new(), &host),
            Intercepted::Reply(..)
        ));
        assert!(host.has_region());
        let Intercepted::Reply(r, fds) = intercept(&get(100), &mut Vec::new(), &host) else {
            panic!("GET_INFLIGHT_FD forwarded");
        };
        assert_eq!(u64_at(&r, 12), 0, "mmap_size 0: no tracking");
        assert!(fds.is_empty());
        assert!(!host.has_region(), "the stale region is still used");
    }

    #[test]
    fn head_chains_match_the_queue_s_own_chains() {
        use virtio_queue::desc::RawDescriptor;
        use virtio_queue::mock::MockSplitQueue;
        use virtio_queue::QueueT;
        use vm_memory::{Address, GuestMemoryMmap};
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let d = |addr: u64, len: u32, flags: u16, next: u16| {
            RawDescriptor::from(Descriptor::new(addr, len, flags, next))
        };
        const NEXT: u16 = 1;
        const WRITE: u16 = 2;
        // A direct chain of three, and one through an indirect table.
        let chains: Vec<Vec<RawDescriptor>> = vec![
            vec![
                d(0x10_0000, 16, NEXT, 1),
                d(0x20_0000, 512, NEXT, 2),
                d(0x30_0000, 1, WRITE, 0),
            ],
            vec![d(0x40_0000, 16, 0, 0)],
        ];
        let mut q: virtio_queue::Queue = vq.create_queue().unwrap();
        let mut from_queue = Vec::new();
        for c in &chains {
            vq.add_desc_chains(c, 0).unwrap();
            let chain = q.pop_descriptor_chain(&mem).unwrap();
            let head = chain.head_index();
            let a: Vec<(u64, u32, u16)> = chain.map(|d| (d.addr().0, d.len(), d.flags())).collect();
            let b: Vec<(u64, u32, u16)> =
                HeadChain::new(&mem, GuestAddress(vq.desc_table_addr().0), 16, head)
                    .map(|d| (d.addr().0, d.len(), d.flags()))
                    .collect();
            assert_eq!(a, b);
            from_queue.push(a);
        }
        // An indirect table: the head points at a table of two.
        let table = GuestAddress(0x50_0000);
        mem.write_obj(Descriptor::new(0x60_0000, 16, NEXT, 1), table)
            .unwrap();
        mem.write_obj(
            Descriptor::new(0x61_0000, 1, WRITE, 0),
            table.unchecked_add(16),
        )
        .unwrap();
        let head = 7u16;
        let dt = GuestAddress(vq.desc_table_addr().0);
        mem.write_obj(
            Descriptor::new(table.0, 32, 4, 0),
            dt.unchecked_add(u64::from(head) * 16),
        )
        .unwrap();
        let b: Vec<(u64, u32)> = HeadChain::new(&mem, dt, 16, head)
            .map(|d| (d.addr().0, d.len()))
            .collect();
        assert_eq!(b, vec![(0x60_0000, 16), (0x61_0000, 1)]);
        // A loop ends after queue_size descriptors; a head out of range yields nothing.
        mem.write_obj(
            Descriptor::new(0x70_0000, 1, NEXT, 3),
            dt.unchecked_add(3 * 16),
        )
        .unwrap();
        assert_eq!(HeadChain::new(&mem, dt, 16, 3).count(), 16);
        assert_eq!(HeadChain::new(&mem, dt, 16, 16).count(), 0);
    }
}
