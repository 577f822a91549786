//! One authenticated, encrypted TCP connection to the replica in its data phase: many requests in flight,
//! matched to replies by sequence number.
//!
//! Writers append encoded frames to one send buffer under a short lock; a sender thread writes
//! whatever accumulated with one syscall (natural batching); a receiver thread completes the
//! waiters. When the link dies, every range the replica may lack (requests without a reply,
//! and writes since the replica's last completed flush) is handed to `on_down` before any
//! waiter learns of the failure, so the caller can record them as out of sync first.

use std::collections::HashMap;
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{info, warn};
use mirror_proto::conn::{ConnError, FrameReader};
use mirror_proto::frame::{self, AckStatus, Frame, MAX_DATA};
use mirror_proto::metrics::Histogram;
use mirror_proto::secure::{SecureReader, SecureWriter};

use crate::completion::QueueEvent;

/// A request that got no reply for this long kills the link.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the sender looks for requests without a reply for [`REPLY_TIMEOUT`].
const STUCK_CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// An idle link sends a Ping this often.
pub const PING_INTERVAL: Duration = Duration::from_secs(1);
/// Once this many bytes were written since the last Flush, the link sends one of its own: the
/// replica's unflushed data (and what a dying link must mark and resync) stays bounded
/// however rarely the guest flushes. (Large, so that it is rare: each costs the replica an
/// `fdatasync`, though its pipeline goes on meanwhile.)
pub const AUTO_FLUSH_BYTES: u64 = 8 << 30;
/// Likewise for the number of separate unflushed ranges (the memory they take), counted after
/// compaction to whole 64 KiB regions (which is what a dying link marks anyway).
pub const AUTO_FLUSH_RANGES: usize = 65536;
/// The unflushed ranges are compacted once there are this many (and twice as many as after
/// the last compaction).
const COMPACT_AT: usize = 4096;
/// A writer that finds this many bytes waiting in the send buffer waits until the sender took
/// them (backpressure to the queue workers): a stalled replica or a slow link cannot make the
/// primary's memory grow (the buffer and the batch being sent hold at most twice this, plus
/// one frame).
pub const MAX_SEND_BUFFER: usize = 16 << 20;
/// A queue worker that queued a request on an empty buffer sends it itself (no wake-up of the
/// sender thread) when the batch is at most this large; larger ones go to the sender thread.
const DIRECT_MAX: usize = 64 * 1024;
/// ... and only while the socket holds at most this many unsent bytes (so it does not block).
const DIRECT_SOCKET_QUEUE: usize = 256 * 1024;
/// A write's data at least this large is queued shared ([`SharedData`]) rather than copied
/// into the send buffer: sharing costs a record of its own for the frame's header and a
/// reference count, copying a `memmove` of every byte (for 1 MiB writes, 15% of vhost-mirror's
/// CPU on the benchmark's machine).
pub const SHARE_MIN: usize = 64 * 1024;
/// Compaction granularity: the out-of-sync bitmap's region.
const COMPACT_GRAIN: u64 = mirror_proto::bitmap::REGION_SIZE;

/// What a request got back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ack(AckStatus),
    Data(Vec<u8>),
}

/// The link went down before the reply arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkDown;

/// Where one reply is delivered.
#[derive(Debug, Default)]
pub struct Waiter {
    slot: Mutex<WaiterSlot>,
    ready: Condvar,
}

#[derive(Debug, Default)]
struct WaiterSlot {
    reply: Option<Result<Reply, LinkDown>>,
    /// Someone sleeps in `wait` (only then does `complete` need a wake-up syscall).
    sleeping: bool,
    /// The queue worker's completion event, signalled with the reply.
    notify: Option<Arc<QueueEvent>>,
}

impl Waiter {
    fn complete(&self, r: Result<Reply, LinkDown>) {
        let mut g = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        g.reply = Some(r);
        let wake = g.sleeping;
        let notify = g.notify.take();
        drop(g);
        if wake {
            self.ready.notify_all();
        }
        if let Some(n) = notify {
            n.signal();
        }
    }

    /// Signals `ev` when the reply arrives (nothing if it is already there: the worker looks
    /// at its requests after arming `ev`).
    pub fn notify_when_ready(&self, ev: &Arc<QueueEvent>) {
        let mut g = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        if g.reply.is_none() {
            g.notify = Some(ev.clone());
        }
    }

    /// Whether the reply (or the link's death) has arrived: `wait` will not block.
    pub fn is_ready(&self) -> bool {
        self.slot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .reply
            .is_some()
    }

    /// Blocks until the reply (or the link's death) arrives.
    pub fn wait(&self) -> Result<Reply, LinkDown> {
        let mut g = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(r) = g.reply.take() {
                g.sleeping = false;
                return r;
            }
            g.sleeping = true;
            g = self.ready.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Link counters, kept across reconnects.
#[derive(Debug, Default)]
pub struct LinkStats {
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub write_acks: AtomicU64,
    pub write_latency_ns: AtomicU64,
    /// Exponentially weighted average write round trip, ns.
    pub write_latency_ewma_ns: AtomicU64,
    /// Flushes the replica answered Ok, and their round trips in all, ns.
    pub flush_acks: AtomicU64,
    pub flush_latency_ns: AtomicU64,
    /// Guest write round trips (each chunk sent to its ack), for the metrics.
    pub write_ack: Histogram,
}

impl LinkStats {
    fn record_write_latency(&self, d: Duration) {
        self.write_ack.record(d);
        let ns = d.as_nanos() as u64;
        self.write_acks.fetch_add(1, Ordering::Relaxed);
        self.write_latency_ns.fetch_add(ns, Ordering::Relaxed);
        let old = self.write_latency_ewma_ns.load(Ordering::Relaxed);
        let new = if old == 0 { ns } else { (old * 15 + ns) / 16 };
        self.write_latency_ewma_ns.store(new, Ordering::Relaxed);
    }

    /// Average write round trip in microseconds (0 before the first write).
    pub fn avg_write_latency_us(&self) -> u64 {
        let n = self.write_acks.load(Ordering::Relaxed);
        self.write_latency_ns
            .load(Ordering::Relaxed)
            .checked_div(n)
            .unwrap_or(0)
            / 1000
    }
}

/// The kind of frame a request must be answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Ack,
    ReadData,
    Hashes,
    Pong,
}

impl Answer {
    fn of(f: &Frame<'_>) -> Answer {
        match f {
            Frame::Read { .. } => Answer::ReadData,
            Frame::ReadHashes { .. } => Answer::Hashes,
            Frame::Ping { .. } => Answer::Pong,
            _ => Answer::Ack,
        }
    }
}

struct Pending {
    /// What the reply must be (a reply of another kind kills the link).
    answer: Answer,
    waiter: Option<Arc<Waiter>>,
    /// A guest write: its round trip counts toward the link's write latency.
    measure: bool,
    /// Byte range of a write-type request, to mark if the reply never comes.
    range: Option<(u64, u64)>,
    sent: Instant,
    is_flush: bool,
}

struct Out {
    buf: SendBuf,
    next_seq: u64,
    alive: bool,
    pending: HashMap<u64, Pending>,
    /// Writes sent since the last flush was sent: the replica has them only in its cache.
    unflushed: Vec<(u64, u64)>,
    unflushed_bytes: u64,
    /// Length of `unflushed` right after its last compaction.
    compacted_len: usize,
    /// Flushes in flight, oldest first, each with the writes it will make durable.
    flushing: Vec<(u64, Vec<(u64, u64)>)>,
    last_send: Instant,
    /// Writers waiting for room in `buf` (the sender wakes them only if there are any).
    room_waiters: usize,
}

/// A write's data sent by reference: `buf[at..at + len]`, sealed into records straight from
/// there by whoever sends the batch (never copied into the send buffer). The link holds a
/// clone of `buf` until those bytes are on the wire; its owner can reuse it once
/// `Arc::get_mut` says nobody else does.
#[derive(Debug, Clone)]
pub struct SharedData {
    buf: Arc<Vec<u8>>,
    at: usize,
    len: usize,
}

impl SharedData {
    /// `buf[at..at + len]`, at most [`MAX_DATA`] bytes (a caller's bug otherwise: panics).
    pub fn new(buf: Arc<Vec<u8>>, at: usize, len: usize) -> Self {
        assert!(
            len <= MAX_DATA && at.checked_add(len).is_some_and(|end| end <= buf.len()),
            "shared data {at}+{len} outside its buffer of {} bytes (or over MAX_DATA)",
            buf.len()
        );
        SharedData { buf, at, len }
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[self.at..self.at + self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }
}

/// Buffers for data sent shared ([`SharedData`]): a queue worker's large writes, a resync's
/// runs. The link seals a buffer's bytes straight from it and lets go of it once they are on
/// the wire; a buffer still held is not reused, and at most `max` are kept.
#[derive(Debug)]
pub struct ChunkPool {
    bufs: Vec<Arc<Vec<u8>>>,
    max: usize,
}

impl Default for ChunkPool {
    /// A queue worker's: the link holds a chunk only until it is on the wire, so a guest with
    /// up to 8 large writes in flight finds one free (a guest with more gets new ones).
    fn default() -> Self {
        ChunkPool::with_max(8)
    }
}

impl ChunkPool {
    pub fn with_max(max: usize) -> Self {
        ChunkPool {
            bufs: Vec::new(),
            max,
        }
    }

    /// A buffer of at least `n` bytes nobody else holds (never shrunk, so that reusing it
    /// for a larger write zero-fills only what it grows by; a new one comes from calloc).
    pub fn take(&mut self, n: usize) -> Vec<u8> {
        if let Some(i) = self.bufs.iter().position(|c| Arc::strong_count(c) == 1) {
            match Arc::try_unwrap(self.bufs.swap_remove(i)) {
                Ok(mut v) => {
                    if v.len() < n {
                        v.resize(n, 0);
                    }
                    return v;
                }
                Err(c) => self.bufs.push(c),
            }
        }
        vec![0; n]
    }

    /// Keeps `c` for reuse (once the link let go of it).
    pub fn give(&mut self, c: Arc<Vec<u8>>) {
        if self.bufs.len() < self.max {
            self.bufs.push(c);
        }
    }

    /// Bytes it keeps.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.bufs.iter().map(|c| c.capacity()).sum()
    }
}

/// Frames queued for the wire: their bytes, with the data of shared writes inserted where
/// their headers end.
#[derive(Debug, Default)]
pub struct SendBuf {
    bytes: Vec<u8>,
    /// Each: where in `bytes` the data goes (right after its frame's header), the data.
    shared: Vec<(usize, SharedData)>,
    shared_bytes: usize,
}

impl SendBuf {
    /// Bytes queued (shared data included).
    fn len(&self) -> usize {
        self.bytes.len() + self.shared_bytes
    }

    fn is_empty(&self) -> bool {
        self.bytes.is_empty() && self.shared.is_empty()
    }

    fn push_shared(&mut self, d: SharedData) {
        self.shared_bytes += d.len;
        self.shared.push((self.bytes.len(), d));
    }

    /// The queued bytes in wire order.
    fn parts(&self) -> Vec<&[u8]> {
        let mut parts = Vec::with_capacity(2 * self.shared.len() + 1);
        let mut at = 0;
        for (pos, d) in &self.shared {
            parts.push(&self.bytes[at..*pos]);
            parts.push(d.bytes());
            at = *pos;
        }
        parts.push(&self.bytes[at..]);
        parts
    }

    /// Empties it, letting go of the shared buffers (a grown byte buffer shrinks back).
    fn clear(&mut self) {
        self.bytes.clear();
        if self.bytes.capacity() > 8 << 20 {
            self.bytes.shrink_to(1 << 20);
        }
        self.shared.clear();
        self.shared_bytes = 0;
    }
}

/// The link's receiving side: frames out of decrypted records.
pub type LinkReader = FrameReader<SecureReader<TcpStream>>;
/// The link's sending side: batches of frames encrypted into records.
pub type LinkWriter = SecureWriter<TcpStream>;

/// Called with the ranges the replica may lack, when the link dies.
pub type OnDown = Box<dyn Fn(&[(u64, u64)], &str) + Send + Sync>;

pub struct Link {
    out: Mutex<Out>,
    /// The sending half and a spare buffer, held by whoever is putting bytes on the wire (the
    /// sender thread, or a queue worker sending its own small request directly).
    writer: Mutex<(LinkWriter, SendBuf)>,
    wake_sender: Condvar,
    /// Signalled when the sender took the send buffer (or the link died).
    room: Condvar,
    stream: TcpStream,
    stats: Arc<LinkStats>,
    on_down: OnDown,
    dead: Mutex<Option<String>>,
    died: Condvar,
}

impl Link {
    /// Starts the sender and receiver threads on an authenticated, attached connection.
    pub fn start(
        writer: LinkWriter,
        reader: LinkReader,
        stats: Arc<LinkStats>,
        on_down: OnDown,
    ) -> std::io::Result<Arc<Link>> {
        let stream = writer.get_ref().try_clone()?;
        stream.set_read_timeout(Some(Duration::from_secs(1)))?;
        // A replica that stops reading fails the send instead of blocking it forever.
        stream.set_write_timeout(Some(REPLY_TIMEOUT))?;
        let link = Arc::new(Link {
            out: Mutex::new(Out {
                buf: SendBuf::default(),
                next_seq: 1,
                alive: true,
                pending: HashMap::new(),
                unflushed: Vec::new(),
                unflushed_bytes: 0,
                compacted_len: 0,
                flushing: Vec::new(),
                last_send: Instant::now(),
                room_waiters: 0,
            }),
            writer: Mutex::new((writer, SendBuf::default())),
            wake_sender: Condvar::new(),
            room: Condvar::new(),
            stream,
            stats,
            on_down,
            dead: Mutex::new(None),
            died: Condvar::new(),
        });
        let l = link.clone();
        std::thread::Builder::new()
            .name("link-send".into())
            .spawn(move || l.send_loop())?;
        let l = link.clone();
        std::thread::Builder::new()
            .name("link-recv".into())
            .spawn(move || l.recv_loop(reader))?;
        Ok(link)
    }

    fn lock(&self) -> MutexGuard<'_, Out> {
        self.out.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Locks the send side once the buffer has room for another data frame.
    fn lock_with_room(&self) -> MutexGuard<'_, Out> {
        let mut g = self.lock();
        while g.alive && g.buf.len() >= MAX_SEND_BUFFER {
            g.room_waiters += 1;
            g = self.room.wait(g).unwrap_or_else(|p| p.into_inner());
            g.room_waiters -= 1;
        }
        g
    }

    pub fn is_alive(&self) -> bool {
        self.lock().alive
    }

    /// Queues a write whose data `fill` appends to the send buffer (one copy, straight from
    /// its source). `len` must be at most [`MAX_DATA`]. `direct`: the caller may put it on
    /// the wire itself (see [`Link::kick`]).
    pub fn send_write_with(
        &self,
        offset: u64,
        len: u64,
        resync: bool,
        direct: bool,
        fill: impl FnOnce(&mut Vec<u8>),
    ) -> Result<Arc<Waiter>, LinkDown> {
        self.queue_write(offset, len, direct, |buf, seq| {
            let start = frame::begin_write(&mut buf.bytes, seq, offset);
            fill(&mut buf.bytes);
            frame::finish_write(&mut buf.bytes, start, resync);
        })
    }

    /// Queues a write of `data` without copying it: the sender seals it into records straight
    /// from `data`'s buffer, and lets go of the buffer once it is on the wire (its owner may
    /// then reuse it). At most [`MAX_DATA`] bytes.
    pub fn send_write_shared(
        &self,
        offset: u64,
        data: SharedData,
        resync: bool,
        direct: bool,
    ) -> Result<Arc<Waiter>, LinkDown> {
        // Not under the send buffer's lock: up to 1 MiB to checksum.
        let crc = frame::data_crc(data.bytes());
        self.queue_write(offset, data.len as u64, direct, |buf, seq| {
            frame::encode_write_header(&mut buf.bytes, seq, offset, data.len, crc, resync);
            buf.push_shared(data);
        })
    }

    fn queue_write(
        &self,
        offset: u64,
        len: u64,
        direct: bool,
        put: impl FnOnce(&mut SendBuf, u64),
    ) -> Result<Arc<Waiter>, LinkDown> {
        debug_assert!(len as usize <= MAX_DATA);
        let mut g = self.lock_with_room();
        if !g.alive {
            drop(g);
            return Err(self.down());
        }
        let seq = g.next_seq;
        g.next_seq += 1;
        let was_empty = g.buf.is_empty();
        put(&mut g.buf, seq);
        g.add_unflushed(offset, len);
        let w = Arc::new(Waiter::default());
        g.pending.insert(
            seq,
            Pending {
                answer: Answer::Ack,
                waiter: Some(w.clone()),
                measure: true,
                range: Some((offset, len)),
                sent: Instant::now(),
                is_flush: false,
            },
        );
        let queued = g.buf.len();
        drop(g);
        self.kick(was_empty, direct, queued);
        Ok(w)
    }

    /// Gets what was just queued on its way. Only the writer that found the buffer empty has
    /// to (the others' frames go with its). A small batch the caller sends itself when
    /// `direct` (a queue worker with no further request at hand: no wake-up of the sender
    /// thread on the way to the wire) and the socket has room (it must not block a queue
    /// worker); the rest wakes the sender thread, so that a queue worker goes on with its
    /// next request while a large batch is encrypted and sent.
    fn kick(&self, was_empty: bool, direct: bool, queued: usize) {
        if !was_empty {
            return;
        }
        if direct && queued <= DIRECT_MAX && self.socket_has_room() {
            self.push_once();
        } else {
            // The sender only ever sleeps on an empty buffer.
            self.wake_sender.notify_one();
        }
    }

    /// Whether the socket's send queue is short (then a small send does not block).
    fn socket_has_room(&self) -> bool {
        let mut queued: libc::c_int = 0;
        // SAFETY: TIOCOUTQ on a socket fd we own writes one c_int, which `queued` is.
        let r = unsafe { libc::ioctl(self.stream.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
        r == 0 && usize::try_from(queued).is_ok_and(|q| q <= DIRECT_SOCKET_QUEUE)
    }

    /// Sends one batch, unless someone else is sending (their batch, or the sender thread's
    /// next one, takes it). Whatever was queued meanwhile goes to the sender thread: a queue
    /// worker never ends up sending other queues' traffic.
    fn push_once(&self) {
        let mut w = match self.writer.try_lock() {
            Ok(w) => w,
            Err(std::sync::TryLockError::WouldBlock) => {
                // The holder looks at the buffer again once it let go of the writer.
                return;
            }
            Err(std::sync::TryLockError::Poisoned(_)) => {
                self.fail("the link's writer panicked");
                return;
            }
        };
        self.send_batch(&mut w);
        drop(w);
        // Queued while we held the writer (its writer found the buffer empty, our try_lock
        // taken): nobody else is sending it.
        let g = self.lock();
        if g.alive && !g.buf.is_empty() {
            drop(g);
            self.wake_sender.notify_one();
        }
    }

    /// Takes the send buffer (if anything is in it) and writes it; false if there was nothing
    /// to send or the link failed.
    fn send_batch(&self, w: &mut (LinkWriter, SendBuf)) -> bool {
        let (stream, spare) = w;
        let mut g = self.lock();
        if !g.alive || g.buf.is_empty() {
            return false;
        }
        std::mem::swap(&mut g.buf, spare);
        g.last_send = Instant::now();
        // Only a full buffer makes writers wait: no wake-up (a futex call) otherwise.
        let waiters = g.room_waiters > 0;
        drop(g);
        if waiters {
            self.room.notify_all();
        }
        let r = stream.send_parts(&spare.parts());
        let n = spare.len() as u64;
        // The shared buffers go back to their owners here.
        spare.clear();
        if let Err(e) = r {
            self.fail(&format!("send failed: {e}"));
            return false;
        }
        self.stats.bytes_sent.fetch_add(n, Ordering::Relaxed);
        true
    }

    /// Queues a request frame of the data phase (Write, Discard, WriteZeroes, Flush, Read,
    /// SyncStart, SyncDone), for the sender thread to send.
    pub fn send(&self, frame: Frame<'_>) -> Result<Arc<Waiter>, LinkDown> {
        self.send_frame(frame, false)
    }

    /// As [`Link::send`]; `direct`: the caller may put it on the wire itself ([`Link::kick`]).
    pub fn send_frame(&self, frame: Frame<'_>, direct: bool) -> Result<Arc<Waiter>, LinkDown> {
        // The bytes a write-type request changes: marked out of sync if it is never answered.
        let range = match frame {
            Frame::Write { offset, data, .. } => Some((offset, data.len() as u64)),
            Frame::Discard { offset, len } | Frame::WriteZeroes { offset, len, .. } => {
                Some((offset, len))
            }
            _ => None,
        };
        let is_flush = matches!(frame, Frame::Flush | Frame::SyncDone { .. });
        let mut g = if matches!(frame, Frame::Write { .. }) {
            self.lock_with_room()
        } else {
            self.lock()
        };
        if !g.alive {
            drop(g);
            return Err(self.down());
        }
        let seq = g.next_seq;
        g.next_seq += 1;
        let was_empty = g.buf.is_empty();
        frame::encode(seq, &frame, &mut g.buf.bytes);
        if let Some((o, l)) = range {
            g.add_unflushed(o, l);
        }
        if is_flush {
            g.start_flush(seq);
        }
        let w = Arc::new(Waiter::default());
        g.pending.insert(
            seq,
            Pending {
                answer: Answer::of(&frame),
                waiter: Some(w.clone()),
                measure: false,
                range,
                sent: Instant::now(),
                is_flush,
            },
        );
        let queued = g.buf.len();
        drop(g);
        self.kick(was_empty, direct, queued);
        Ok(w)
    }

    /// A request found the link dead: it returns only once the dying link's ranges are
    /// recorded (`on_down` ran), so a caller that goes on without the replica never gets
    /// ahead of those marks (a degraded FLUSH must cover them).
    fn down(&self) -> LinkDown {
        self.wait_dead();
        LinkDown
    }

    /// Sends Goodbye (after the caller made sure nothing is in flight) and closes.
    pub fn goodbye(&self) {
        let mut g = self.lock();
        if g.alive {
            frame::encode(0, &Frame::Goodbye, &mut g.buf.bytes);
        }
        drop(g);
        self.wake_sender.notify_one();
        // Give the sender a moment to put it on the wire.
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline && !self.lock().buf.is_empty() {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Tears the link down (idempotent): marks what the replica may lack, fails every waiter.
    /// Returns once the marks are made (also when another thread is tearing it down).
    pub fn fail(&self, reason: &str) {
        let mut g = self.lock();
        if !g.alive {
            drop(g);
            self.wait_dead();
            return;
        }
        g.alive = false;
        let pending: Vec<Pending> = g.pending.drain().map(|(_, p)| p).collect();
        let mut ranges: Vec<(u64, u64)> = pending.iter().filter_map(|p| p.range).collect();
        ranges.append(&mut g.unflushed);
        g.unflushed_bytes = 0;
        for (_, mut r) in g.flushing.drain(..) {
            ranges.append(&mut r);
        }
        g.buf.clear();
        drop(g);
        let _ = self.stream.shutdown(Shutdown::Both);
        warn!("replication link down: {reason}");
        (self.on_down)(&ranges, reason);
        for p in pending {
            if let Some(w) = p.waiter {
                w.complete(Err(LinkDown));
            }
        }
        *self.dead.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.to_owned());
        self.died.notify_all();
        self.wake_sender.notify_all();
        self.room.notify_all();
    }

    /// Blocks until the link is dead; returns why.
    pub fn wait_dead(&self) -> String {
        let mut g = self.dead.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(r) = g.as_ref() {
                return r.clone();
            }
            g = self.died.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn send_loop(self: Arc<Self>) {
        let mut last_check = Instant::now();
        loop {
            let mut g = self.lock();
            loop {
                // Replies are checked here too, not only when a read times out: a record
                // trickled a byte at a time keeps the receiver's reads from ever timing out.
                if last_check.elapsed() >= STUCK_CHECK_INTERVAL {
                    last_check = Instant::now();
                    if g.pending.values().any(|p| p.sent.elapsed() > REPLY_TIMEOUT) {
                        drop(g);
                        self.fail(&format!("no reply from the replica for {REPLY_TIMEOUT:?}"));
                        return;
                    }
                }
                if !g.alive || !g.buf.is_empty() {
                    break;
                }
                let idle = g.last_send.elapsed();
                if idle >= PING_INTERVAL {
                    let nanos = idle.as_nanos() as u64;
                    g.queue_own(&Frame::Ping { nanos });
                    break;
                }
                g = self
                    .wake_sender
                    .wait_timeout(g, (PING_INTERVAL - idle).min(STUCK_CHECK_INTERVAL))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
            if !g.alive {
                return;
            }
            drop(g);
            // Everything queued until the buffer is empty (a queue worker sending its own
            // batch right now is waited for; its leftovers are ours).
            let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            while self.send_batch(&mut w) {}
        }
    }

    fn recv_loop(self: Arc<Self>, mut reader: LinkReader) {
        let reason = loop {
            let d = match reader.read_frame() {
                Ok(d) => d,
                Err(e) if e.is_timeout() => {
                    let g = self.lock();
                    if !g.alive {
                        return;
                    }
                    let stuck = g.pending.values().any(|p| p.sent.elapsed() > REPLY_TIMEOUT);
                    drop(g);
                    if stuck {
                        break format!("no reply from the replica for {REPLY_TIMEOUT:?}");
                    }
                    continue;
                }
                Err(ConnError::Closed) => break "replica closed the connection".to_owned(),
                Err(e) => break mirror_proto::conn::error_chain(&e),
            };
            self.stats
                .bytes_received
                .fetch_add(d.consumed as u64, Ordering::Relaxed);
            let seq = d.seq;
            let (reply, answer) = match d.frame {
                Frame::Ack { status } => (Reply::Ack(status), Answer::Ack),
                Frame::ReadData { data } => (Reply::Data(data.to_vec()), Answer::ReadData),
                Frame::Hashes { hashes } => (Reply::Data(hashes.to_vec()), Answer::Hashes),
                Frame::Pong { .. } => (Reply::Ack(AckStatus::Ok), Answer::Pong),
                Frame::Refuse { reason, .. } => {
                    let reason = mirror_proto::control::escape_controls(reason);
                    break format!("replica refused: {reason}");
                }
                other => break format!("unexpected {} frame from the replica", other.name()),
            };
            let mut g = self.lock();
            let Some(p) = g.pending.remove(&seq) else {
                drop(g);
                break format!("reply for unknown request {seq}");
            };
            if p.answer != answer {
                g.pending.insert(seq, p);
                drop(g);
                break format!(
                    "the replica answered request {seq} with {answer:?}, not the kind it asked for"
                );
            }
            if let (Some((offset, _)), Reply::Ack(status)) = (p.range, &reply) {
                if *status != AckStatus::Ok {
                    // The replica lacks this write now: fail the link, which marks its range
                    // (and everything else unconfirmed) before the waiter hears of it.
                    let status = *status;
                    g.pending.insert(seq, p);
                    drop(g);
                    break format!(
                        "the replica answered {status:?} for a write at offset {offset}"
                    );
                }
            }
            if p.is_flush {
                if reply != Reply::Ack(AckStatus::Ok) {
                    // What this flush covered is not durable on the replica: fail the link,
                    // which marks it (and everything else unconfirmed) out of sync first.
                    g.pending.insert(seq, p);
                    drop(g);
                    break format!("the replica could not flush: {reply:?}");
                }
                // The flush made every write sent before it durable: drop those ranges.
                if let Some(i) = g.flushing.iter().position(|(s, _)| *s == seq) {
                    g.flushing.drain(..=i);
                }
            }
            drop(g);
            if p.measure && reply == Reply::Ack(AckStatus::Ok) {
                self.stats.record_write_latency(p.sent.elapsed());
            } else if p.is_flush {
                self.stats.flush_acks.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .flush_latency_ns
                    .fetch_add(p.sent.elapsed().as_nanos() as u64, Ordering::Relaxed);
            }
            if let Some(w) = p.waiter {
                w.complete(Ok(reply));
            }
        };
        if self.is_alive() {
            info!("replication link: {reason}");
        }
        self.fail(&reason);
    }
}

impl Out {
    /// Records a write the replica has only in its cache; sends a Flush of the link's own
    /// when too much has accumulated.
    fn add_unflushed(&mut self, offset: u64, len: u64) {
        push_range(&mut self.unflushed, offset, len);
        self.unflushed_bytes += len;
        if self.unflushed.len() >= COMPACT_AT && self.unflushed.len() >= 2 * self.compacted_len {
            compact(&mut self.unflushed);
            self.compacted_len = self.unflushed.len();
        }
        if self.unflushed_bytes >= AUTO_FLUSH_BYTES || self.unflushed.len() >= AUTO_FLUSH_RANGES {
            let seq = self.queue_own(&Frame::Flush);
            self.start_flush(seq);
        }
    }

    /// Queues a request of the link's own (a Ping, a Flush): nobody waits for its reply.
    fn queue_own(&mut self, f: &Frame<'_>) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        frame::encode(seq, f, &mut self.buf.bytes);
        self.pending.insert(
            seq,
            Pending {
                answer: Answer::of(f),
                waiter: None,
                measure: false,
                range: None,
                sent: Instant::now(),
                is_flush: matches!(f, Frame::Flush),
            },
        );
        seq
    }

    /// A Flush with sequence number `seq` was queued: it covers every write queued before it.
    fn start_flush(&mut self, seq: u64) {
        let covered = std::mem::take(&mut self.unflushed);
        self.unflushed_bytes = 0;
        self.compacted_len = 0;
        self.flushing.push((seq, covered));
    }
}

/// Rounds every range out to whole regions, sorts and merges them.
fn compact(v: &mut Vec<(u64, u64)>) {
    for r in v.iter_mut() {
        let start = r.0 / COMPACT_GRAIN * COMPACT_GRAIN;
        let end = r.0.saturating_add(r.1).div_ceil(COMPACT_GRAIN) * COMPACT_GRAIN;
        *r = (start, end - start);
    }
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for &(o, l) in v.iter() {
        match out.last_mut() {
            Some(last) if o <= last.0 + last.1 => {
                last.1 = last.1.max(o + l - last.0);
            }
            _ => out.push((o, l)),
        }
    }
    *v = out;
}

/// Appends a range, merging it with the last one when they touch.
fn push_range(v: &mut Vec<(u64, u64)>, offset: u64, len: u64) {
    if let Some(last) = v.last_mut() {
        if last.0 + last.1 == offset {
            last.1 += len;
            return;
        }
    }
    v.push((offset, len));
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("alive", &self.is_alive())
            .finish_non_exhaustive()
    }
}

/// A link to a loopback peer that speaks the encrypted protocol, for tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use mirror_proto::auth::Secret;
    use mirror_proto::secure;
    use std::net::TcpListener;

    /// The replica's side of a test link.
    pub(crate) struct TestPeer {
        pub reader: FrameReader<SecureReader<TcpStream>>,
        pub writer: SecureWriter<TcpStream>,
    }

    pub(crate) fn start(stats: Arc<LinkStats>, on_down: OnDown) -> (Arc<Link>, TestPeer) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut s = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut peer, _) = l.accept().unwrap();
        let secret = Secret::from_bytes(b"0123456789abcdef").unwrap();
        let r = secret.clone();
        let t = std::thread::spawn(move || {
            let keys = secure::respond(&mut peer, &r, &Default::default()).unwrap();
            TestPeer {
                reader: FrameReader::new(SecureReader::new(
                    peer.try_clone().unwrap(),
                    keys.clone(),
                )),
                writer: SecureWriter::new(peer, keys),
            }
        });
        let keys = secure::initiate(&mut s, &secret).unwrap();
        let peer = t.join().unwrap();
        let reader = FrameReader::new(SecureReader::new(s.try_clone().unwrap(), keys.clone()));
        let link = Link::start(SecureWriter::new(s, keys), reader, stats, on_down).unwrap();
        (link, peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    /// A link to a silent loopback peer; `on_down` takes 300 ms and then sets the flag.
    fn link_with_slow_on_down() -> (Arc<Link>, Arc<AtomicBool>, testing::TestPeer) {
        let marked = Arc::new(AtomicBool::new(false));
        let m = marked.clone();
        let on_down: OnDown = Box::new(move |_, _| {
            std::thread::sleep(Duration::from_millis(300));
            m.store(true, Ordering::SeqCst);
        });
        let (link, peer) = testing::start(Arc::new(LinkStats::default()), on_down);
        (link, marked, peer)
    }

    /// Shared writes (sealed from their own buffers) and copied ones, interleaved with other
    /// frames, reach the replica whole and in order; the link lets go of a shared buffer once
    /// it is on the wire, so the pool hands it out again.
    #[test]
    fn shared_writes_arrive_whole_and_in_order_and_come_back() {
        let (link, mut peer) = testing::start(Arc::new(LinkStats::default()), Box::new(|_, _| {}));
        let mut pool = ChunkPool::default();
        let mut expect = Vec::new();
        for i in 0..12u64 {
            let n = [SHARE_MIN, MAX_DATA, 4096, SHARE_MIN + 512, 100 * 1024][i as usize % 5];
            let mut c = pool.take(n);
            assert!(c.len() >= n);
            c.truncate(n);
            c.iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = (j as u64 * 31 + i * 7) as u8);
            let c = Arc::new(c);
            let offset = i << 21;
            if n >= SHARE_MIN {
                // Only part of the buffer, not at its start.
                let at = (i as usize % 3) * 512;
                let len = n - at;
                let d = SharedData::new(c.clone(), at, len);
                link.send_write_shared(offset, d, i % 2 == 0, false)
                    .unwrap();
                expect.push((offset, c[at..].to_vec(), i % 2 == 0));
            } else {
                link.send_write_with(offset, n as u64, false, false, |b| b.extend_from_slice(&c))
                    .unwrap();
                expect.push((offset, c.to_vec(), false));
            }
            pool.give(c);
            if i % 4 == 3 {
                link.send(Frame::Flush).unwrap();
            }
        }
        let mut flushes = 0;
        let mut got = Vec::new();
        while got.len() < expect.len() || flushes < 3 {
            let d = peer.reader.read_frame().unwrap();
            match d.frame {
                Frame::Write {
                    offset,
                    resync,
                    data,
                } => got.push((offset, data.to_vec(), resync)),
                Frame::Flush => {
                    flushes += 1;
                    assert_eq!(got.len(), 4 * flushes, "a Flush after the writes before it");
                }
                f => panic!("unexpected {}", f.name()),
            }
        }
        assert!(got == expect, "the writes as sent, in order");
        // Everything was sent: every pooled buffer is the pool's alone again.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !link.lock().buf.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let _w = link.writer.lock().unwrap();
        assert!(pool.bufs.iter().all(|c| Arc::strong_count(c) == 1));
        let before = pool.bytes();
        let again = pool.take(MAX_DATA);
        assert_eq!(again.len(), MAX_DATA);
        assert!(pool.bytes() < before, "a buffer was reused");
    }

    /// Shared data queued on a link that dies is let go of with the rest of the send buffer:
    /// its owners get their buffers back.
    #[test]
    fn a_dying_link_lets_go_of_its_shared_buffers() {
        let (link, _peer) = testing::start(Arc::new(LinkStats::default()), Box::new(|_, _| {}));
        // Nothing goes on the wire while this is held.
        let held = link.writer.lock().unwrap();
        let bufs: Vec<Arc<Vec<u8>>> = (0..10).map(|_| Arc::new(vec![1u8; SHARE_MIN])).collect();
        for (i, b) in bufs.iter().enumerate() {
            let d = SharedData::new(b.clone(), 0, SHARE_MIN);
            link.send_write_shared((i as u64) << 20, d, false, false)
                .unwrap();
        }
        assert!(bufs.iter().all(|b| Arc::strong_count(b) == 2), "queued");
        link.fail("test");
        assert!(bufs.iter().all(|b| Arc::strong_count(b) == 1), "let go");
        drop(held);
    }

    /// Finding 6: a request that finds the link dying must not go on (degraded) before the
    /// dying link's ranges are recorded, or a FLUSH could complete ahead of those marks.
    #[test]
    fn a_request_on_a_dying_link_waits_for_its_marks() {
        let (link, marked, _peer) = link_with_slow_on_down();
        let l = link.clone();
        let killer = std::thread::spawn(move || l.fail("test"));
        // Wait until the link is seen dead, then send.
        while link.is_alive() {
            std::thread::yield_now();
        }
        assert_eq!(link.send(Frame::Flush).err(), Some(LinkDown));
        assert!(
            marked.load(Ordering::SeqCst),
            "send returned LinkDown before the dying link's marks were made"
        );
        let r = link.send_write_with(0, 4, false, false, |b| b.extend_from_slice(&[1, 2, 3, 4]));
        assert_eq!(r.err(), Some(LinkDown));
        killer.join().unwrap();
    }

    /// Finding 7: a guest that never flushes still gets the replica's cache flushed by the
    /// link itself, so what a dying link must mark (and the memory it takes) stays bounded.
    /// Ranges are first compacted to whole regions; only ranges that stay apart count.
    #[test]
    fn unflushed_writes_are_bounded() {
        let (link, _marked, peer) = link_with_slow_on_down();
        // The peer takes what it is sent (a silent one would stall the link: backpressure).
        let mut drain = peer.reader.get_ref().get_ref().try_clone().unwrap();
        std::thread::spawn(move || std::io::copy(&mut drain, &mut std::io::sink()));
        let region = mirror_proto::bitmap::REGION_SIZE;
        // Eight small writes per region: compacted, they never reach the limit.
        for i in 0..(8 * COMPACT_AT as u64) {
            let _w = link
                .send_write_with(i * region / 8, 512, false, false, |b| {
                    b.extend_from_slice(&[0; 512])
                })
                .unwrap();
        }
        {
            let g = link.lock();
            assert!(g.flushing.is_empty(), "a flush for compactable ranges");
            assert!(g.unflushed.len() <= 2 * COMPACT_AT, "{}", g.unflushed.len());
        }
        // One write in each of more regions than the limit: the link flushes on its own.
        let base = 1 << 40;
        for i in 0..(AUTO_FLUSH_RANGES as u64 + 10) {
            let _w = link
                .send_write_with(base + i * 2 * region, 512, false, false, |b| {
                    b.extend_from_slice(&[0; 512])
                })
                .unwrap();
            assert!(link.lock().unflushed.len() < AUTO_FLUSH_RANGES);
        }
        assert!(
            !link.lock().flushing.is_empty(),
            "no flush of the link's own"
        );
        link.fail("done");
    }

    /// Review finding: a record trickled a byte at a time never lets a read time out; the
    /// link must still die REPLY_TIMEOUT after an unanswered request, marking it first.
    #[test]
    fn a_trickled_record_does_not_keep_the_link_alive() {
        let (link, marked, peer) = link_with_slow_on_down();
        let w = link
            .send_write_with(0, 4, false, false, |b| b.extend_from_slice(&[1, 2, 3, 4]))
            .unwrap();
        let mut raw = peer.writer.get_ref().try_clone().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let trickle = std::thread::spawn(move || {
            use std::io::Write;
            let _ = raw.write_all(&[0xff, 0xff]);
            while !st.load(Ordering::SeqCst) && raw.write_all(&[0]).is_ok() {
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        let t0 = Instant::now();
        let r = w.wait();
        stop.store(true, Ordering::SeqCst);
        let _ = trickle.join();
        assert_eq!(r, Err(LinkDown));
        assert!(t0.elapsed() < REPLY_TIMEOUT + Duration::from_secs(3));
        assert!(marked.load(Ordering::SeqCst), "failed before the marks");
    }

    /// Issue 9: "no byte limit on the link's send buffer". A replica that stops reading
    /// makes writers wait once the buffer holds MAX_SEND_BUFFER; the link's death frees them.
    #[test]
    fn a_stalled_replica_bounds_the_send_buffer() {
        let (link, _marked, _peer) = link_with_slow_on_down();
        let l = link.clone();
        let writer = std::thread::spawn(move || {
            let data = vec![0x5au8; MAX_DATA];
            let mut sent = 0usize;
            while l
                .send_write_with(0, MAX_DATA as u64, false, false, |b| {
                    b.extend_from_slice(&data)
                })
                .is_ok()
            {
                sent += 1;
            }
            sent
        });
        std::thread::sleep(Duration::from_secs(2));
        assert!(
            !writer.is_finished(),
            "the writer should be waiting for room"
        );
        let queued = link.lock().buf.len();
        assert!(
            queued <= MAX_SEND_BUFFER + MAX_DATA + 64,
            "{queued} bytes queued"
        );
        link.fail("test");
        let sent = writer.join().unwrap();
        // The send buffer, the batch the sender holds, and the sockets' own buffers.
        assert!(sent < 64, "{sent} MiB accepted from the writer");
    }

    #[test]
    fn compaction_rounds_to_regions_and_merges() {
        let r = mirror_proto::bitmap::REGION_SIZE;
        let mut v = vec![
            (3 * r + 5, 10),
            (r, 1),
            (3 * r, 1),
            (r + 100, 2 * r),
            (10 * r, r),
        ];
        compact(&mut v);
        assert_eq!(v, vec![(r, 3 * r), (10 * r, r)]);
    }
}
