//! The replica's ReadHashes, off the request pipeline: [`WORKERS`] threads read and hash the
//! ranges asked for while the session goes on applying the requests behind them, and answer
//! each on the link themselves (replies are matched by sequence number; a Hashes may come
//! after the replies to later requests, as a Flush's may).
//!
//! Invariants:
//! - **The hashes are of the image as it is once every request before the ReadHashes was
//!   applied** (PROTOCOL.md), as when the session hashed in line: a ReadHashes is queued only
//!   once the session applied everything before it, and a write-type request behind it that
//!   overlaps its range waits until the range was read (`wait_clear`) before it is applied.
//! - **What is hashed is what the disk holds** (`replica::HashReader`).
//! - A promotion is never overtaken: a range read after one is answered `Fenced`, never with
//!   hashes.

use std::collections::VecDeque;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use log::error;
use mirror_proto::frame::{self, AckStatus, Frame};
use mirror_proto::secure::SecureWriter;
use mirror_proto::sys::AlignedBuf;

use crate::chain;
use crate::replica::ReplicaError;
use crate::server::{lock, Node};
use crate::status::Counters;

/// Hash workers per session: two reads in flight keep a disk busier than one (a 4 MiB
/// `O_DIRECT` read ran at 600-700 MB/s here, two in parallel at 1.2 GiB/s), and one reads
/// while the other hashes.
pub const WORKERS: usize = 2;
/// ReadHashes queued and not yet taken by a worker, at most: beyond that the session waits
/// (a primary asking faster than the disk reads makes nothing grow).
pub const MAX_QUEUED: usize = 8;

/// One ReadHashes. Told apart by all of it, not by `seq` alone: the primary's sequence
/// numbers are not checked to be unique, and a reused one must not let go of another job's
/// range (two equal jobs are interchangeable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Job {
    seq: u64,
    offset: u64,
    len: u32,
}

impl Job {
    fn overlaps(&self, offset: u64, end: u64) -> bool {
        self.offset < end && offset < self.offset + u64::from(self.len)
    }
}

/// What the session and its hash workers share.
#[derive(Default)]
pub struct HashQueue {
    state: Mutex<State>,
    changed: Condvar,
    /// ReadHashes queued and not yet answered. Only the session adds to it, so the session
    /// reading 0 knows that none is outstanding (the fast path of `wait_clear`).
    pending: AtomicUsize,
}

#[derive(Default)]
struct State {
    waiting: VecDeque<Job>,
    /// Jobs taken by a worker whose range is not read yet.
    reading: Vec<Job>,
    stop: bool,
    /// An error was logged on this connection (the rest are counted).
    logged: bool,
}

/// Ends the queue if a worker panics: the session's next wait returns, and the link ends
/// (the ReadHashes was never answered: the primary's link times out and resyncs).
struct StopOnUnwind<'a> {
    q: &'a HashQueue,
    stream: &'a TcpStream,
}

impl Drop for StopOnUnwind<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The link first: once the queue is stopped, the session's writes no longer wait
            // for the ranges the other worker is reading, whose hashes must then not go out.
            let _ = self.stream.shutdown(Shutdown::Both);
            self.q.stop();
        }
    }
}

/// Stops the hash workers when dropped (the session's loop ended, also by a panic).
pub struct StopOnDrop<'a>(pub &'a HashQueue);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.stop();
    }
}

impl HashQueue {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues ReadHashes `seq` (every request before it has been applied). Waits while
    /// [`MAX_QUEUED`] are queued.
    pub fn push(&self, seq: u64, offset: u64, len: u32) {
        let mut s = self.lock();
        while s.waiting.len() >= MAX_QUEUED && !s.stop {
            s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        self.pending.fetch_add(1, Ordering::AcqRel);
        s.waiting.push_back(Job { seq, offset, len });
        drop(s);
        self.changed.notify_all();
    }

    /// Waits until no queued ReadHashes, and none whose range is still being read, overlaps
    /// `offset..offset + len`: a write-type request there may be applied then.
    pub fn wait_clear(&self, offset: u64, len: u64) {
        if self.pending.load(Ordering::Acquire) == 0 {
            return;
        }
        let end = offset.saturating_add(len);
        let mut s = self.lock();
        while !s.stop
            && s.waiting
                .iter()
                .chain(s.reading.iter())
                .any(|j| j.overlaps(offset, end))
        {
            s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Whether a ReadHashes is unanswered (the primary is waiting for it: not idle).
    pub fn busy(&self) -> bool {
        self.pending.load(Ordering::Acquire) > 0
    }

    /// Waits until every queued ReadHashes is answered (or the workers stopped).
    pub fn drain(&self) {
        let mut s = self.lock();
        while self.pending.load(Ordering::Acquire) > 0 && !s.stop {
            s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Tells the workers to return (after the job each is on; queued ones are dropped).
    pub fn stop(&self) {
        self.lock().stop = true;
        self.changed.notify_all();
    }

    /// A hash worker: reads and hashes each queued range and answers it on `writer`.
    pub fn run(&self, node: &Node, writer: &Mutex<SecureWriter<&TcpStream>>, stream: &TcpStream) {
        let _unwind = StopOnUnwind { q: self, stream };
        let mut raw = AlignedBuf::default();
        let mut hashes = Vec::new();
        let mut out = Vec::new();
        loop {
            let job = {
                let mut s = self.lock();
                loop {
                    if s.stop {
                        return;
                    }
                    if let Some(j) = s.waiting.pop_front() {
                        s.reading.push(j);
                        break j;
                    }
                    s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
                }
            };
            // Room in the queue again.
            self.changed.notify_all();
            hashes.clear();
            let r = self.hash(node, job, &mut raw, &mut hashes);
            // (Read or failed: `hash` let go of the range.)
            out.clear();
            let c = &node.status.counters;
            match r {
                Ok(()) => {
                    Counters::add(&c.bytes_hashed, u64::from(job.len));
                    frame::encode(job.seq, &Frame::Hashes { hashes: &hashes }, &mut out);
                }
                Err(e) => {
                    Counters::add(&c.errors, 1);
                    let ack = e.ack_status();
                    let first = ack != AckStatus::Fenced
                        && !std::mem::replace(&mut self.lock().logged, true);
                    if first {
                        error!(
                            "image {}: {} (answered {ack:?}); further such errors on this \
                             connection are only counted",
                            node.status.image().display(),
                            chain(&e)
                        );
                    }
                    frame::encode(job.seq, &Frame::Ack { status: ack }, &mut out);
                }
            }
            let sent = {
                let mut w = writer.lock().unwrap_or_else(PoisonError::into_inner);
                let r = w.send(&out);
                Counters::add(&c.bytes_sent, out.len() as u64);
                r.is_ok()
            };
            self.pending.fetch_sub(1, Ordering::AcqRel);
            self.changed.notify_all();
            // A ReadHashes answered is activity, as a request applied is (the session's
            // `primary_activity` after `apply`): the primary waits for it meanwhile, and the
            // reaper (`cut_idle_primary`) does not see the workers, which hold no lock.
            node.status.primary_activity();
            if !sent {
                // The link failed: the session's next read fails too.
                let _ = stream.shutdown(Shutdown::Read);
            }
        }
    }

    /// Reads `job`'s range (letting go of it as soon as it is read) and hashes it.
    fn hash(
        &self,
        node: &Node,
        job: Job,
        raw: &mut AlignedBuf,
        out: &mut Vec<u8>,
    ) -> Result<(), ReplicaError> {
        let len = job.len as usize;
        let reader = lock(&node.replica).hash_reader(job.offset, u64::from(job.len));
        let data = match reader {
            Ok(Some(reader)) => {
                let r = reader.read(job.offset, len, raw);
                // Read before any promotion, or answered Fenced (a worker's read is not under
                // the replica's lock).
                let fenced = lock(&node.replica).is_fenced();
                self.done_reading(job);
                match r {
                    Ok(_) if fenced => return Err(ReplicaError::Fenced),
                    Ok(d) => d,
                    Err(e) => return Err(e),
                }
            }
            Ok(None) => {
                // No reader of its own: as the session did, under the replica's lock.
                let r = lock(&node.replica).hashes(job.offset, len, raw, out);
                self.done_reading(job);
                return r;
            }
            Err(e) => {
                self.done_reading(job);
                return Err(e);
            }
        };
        mirror_proto::blockhash::hash_blocks(data, out);
        Ok(())
    }

    fn done_reading(&self, job: Job) {
        let mut s = self.lock();
        if let Some(i) = s.reading.iter().position(|j| *j == job) {
            s.reading.swap_remove(i);
        }
        drop(s);
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_write_waits_only_for_overlapping_hashes_and_a_flood_waits_for_room() {
        let q = HashQueue::default();
        q.wait_clear(0, u64::MAX); // nothing pending: returns at once
        q.push(1, 4096, 8192);
        assert!(q.busy());
        std::thread::scope(|s| {
            // Not overlapping (before, after, touching): no wait.
            q.wait_clear(0, 4096);
            q.wait_clear(12288, 4096);
            let t = s.spawn(|| q.wait_clear(8191, 2));
            std::thread::sleep(Duration::from_millis(100));
            assert!(!t.is_finished(), "an overlapping write did not wait");
            // Taken by a worker, still being read: still waits.
            {
                let mut st = q.lock();
                let j = st.waiting.pop_front().unwrap();
                st.reading.push(j);
            }
            q.changed.notify_all();
            std::thread::sleep(Duration::from_millis(100));
            assert!(
                !t.is_finished(),
                "a write overlapping a range being read did not wait"
            );
            q.done_reading(Job {
                seq: 1,
                offset: 4096,
                len: 8192,
            });
            t.join().unwrap();
        });
        for seq in 0..MAX_QUEUED as u64 {
            q.push(10 + seq, 0, 4096);
        }
        std::thread::scope(|s| {
            let t = s.spawn(|| q.push(99, 0, 4096));
            std::thread::sleep(Duration::from_millis(100));
            assert!(!t.is_finished(), "a push beyond MAX_QUEUED did not wait");
            q.lock().waiting.pop_front();
            q.changed.notify_all();
            t.join().unwrap();
        });
        q.stop();
        q.wait_clear(0, u64::MAX);
        q.drain();
    }

    #[test]
    fn a_reused_sequence_number_does_not_let_go_of_another_range() {
        // A primary's sequence numbers are not checked: two ReadHashes with the same one,
        // both being read. The one at 1 MiB read first must not free the range at 0.
        let q = HashQueue::default();
        q.push(7, 0, 4096);
        q.push(7, 1 << 20, 4096);
        {
            let mut st = q.lock();
            while let Some(j) = st.waiting.pop_front() {
                st.reading.push(j);
            }
        }
        q.done_reading(Job {
            seq: 7,
            offset: 1 << 20,
            len: 4096,
        });
        std::thread::scope(|s| {
            let t = s.spawn(|| q.wait_clear(0, 4096));
            std::thread::sleep(Duration::from_millis(100));
            assert!(
                !t.is_finished(),
                "a write to a range still being read did not wait"
            );
            q.done_reading(Job {
                seq: 7,
                offset: 0,
                len: 4096,
            });
            t.join().unwrap();
        });
    }
}
