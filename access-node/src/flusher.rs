//! The replica's FLUSH, off the request pipeline: a primary's Flush is answered after an
//! `fdatasync` that started after every request received before it had been applied, while
//! the session goes on applying the requests behind it. Flushes that arrive while one runs
//! are answered together by the next `fdatasync` (it covers them all), unless no write-type
//! request was applied since the running one began: then it covers them already, and answers
//! them too.
//!
//! Early fdatasync: when the last Flush followed exactly one write-type request (a guest's
//! fsync pattern: write, wait, flush), the next one starts an `fdatasync` as soon as it is
//! applied ([`FlushQueue::wrote`]), and the Flush that follows joins it: the replica's
//! `fdatasync` gets the head start of the ack's trip to the primary, the guest and the Flush's
//! trip back. At most one per Flush, so a primary that stops flushing costs at most one more.
//!
//! Invariants (ARCHITECTURE.md, "Durability", invariant 8):
//! - a Flush is acknowledged Ok only after an `fdatasync` that began after the last request
//!   before it was applied (the session queues it only then, and counts every write-type
//!   request once applied: a running `fdatasync` that began with the same count covers it),
//!   and after the acks of those requests are on the wire (the session writes them out first);
//! - an early `fdatasync` that fails is a failed flush like any other (recorded, the session
//!   ends), whether or not a Flush had joined it;
//! - a failed `fdatasync` is recorded (image outdated, durably) before any answer; if it cannot
//!   be, the connection is closed without an answer; after a failure every later Flush fails
//!   too, and the session ends;
//! - a promotion waits for a running `fdatasync` and its outcome (`Node::flush_gate`), so an
//!   image whose writeback just failed is never promoted as up to date.

use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use log::error;
use mirror_proto::frame::{self, AckStatus, Frame};
use mirror_proto::secure::SecureWriter;

use crate::chain;
use crate::replica::ReplicaError;
use crate::server::{lock, Node};
use crate::status::Counters;

/// Ends the queue if the flusher panics mid-batch: not busy any more, failed (the batch was
/// never answered: the primary's link times out and resyncs).
struct FailOnUnwind<'a>(&'a FlushQueue);

impl Drop for FailOnUnwind<'_> {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.running = None;
        // Never answered (the primary's link times out): nothing waits for them.
        s.waiting.clear();
        s.early = false;
        s.stop = true;
        s.failed.get_or_insert(AckStatus::IoError);
        drop(s);
        self.0.changed.notify_all();
    }
}

/// Stops the flusher when dropped (the session's loop ended, also by a panic).
pub struct StopOnDrop<'a>(pub &'a FlushQueue);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// Flushes waiting for the next `fdatasync`, at most (a batch's answers: about 100 KiB).
pub const MAX_WAITING: usize = 4096;

/// What the session and the flusher thread share.
#[derive(Default)]
pub struct FlushQueue {
    state: Mutex<State>,
    changed: Condvar,
    /// Write-type requests applied so far on this connection (counted once they returned).
    applied: AtomicU64,
    /// The last Flush followed exactly one write-type request: the next starts an early
    /// `fdatasync`.
    armed: AtomicBool,
}

/// The `fdatasync` running and the Flushes it answers.
struct Running {
    /// How many write-type requests had been applied when it began (it covers them); None
    /// once it returned (no Flush joins it any more).
    covers: Option<u64>,
    batch: Vec<u64>,
}

#[derive(Default)]
struct State {
    /// Sequence numbers of Flushes waiting for an `fdatasync` that starts after them.
    waiting: Vec<u64>,
    /// An `fdatasync` is running (or its answers are being sent).
    running: Option<Running>,
    /// An early `fdatasync` is wanted ([`FlushQueue::wrote`]).
    early: bool,
    /// `applied` at the last Flush.
    last_flush_at: u64,
    /// What the last `fdatasync` that succeeded covered (`applied` when it began). None
    /// before the first of this session: an earlier session's writes may still be in the
    /// page cache.
    durable: Option<u64>,
    /// A flush failed: how it was answered (every later one gets the same).
    failed: Option<AckStatus>,
    stop: bool,
}

impl FlushQueue {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues the Flush `seq` (every request before it has been applied, and answered). An
    /// `fdatasync` already running answers it if no write-type request was applied since it
    /// began. At most [`MAX_WAITING`] wait: beyond that the session waits for the running
    /// `fdatasync` to end (it takes them all), so a peer sending Flushes as fast as it can
    /// makes neither this queue nor the batch of answers grow without bound.
    ///
    /// True: an `fdatasync` that began after all of them already succeeded (an early one that
    /// finished before this Flush came); the caller answers it Ok itself. Only if `may_answer`
    /// (the caller found the image neither fenced nor failed by another path's `fdatasync`):
    /// otherwise the next `fdatasync` answers it, and says so.
    pub fn push(&self, seq: u64, may_answer: bool) -> bool {
        let at = self.applied.load(Ordering::SeqCst);
        let mut s = self.lock();
        while s.waiting.len() >= MAX_WAITING && !s.stop {
            s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        let one_write = at.wrapping_sub(s.last_flush_at) == 1;
        s.last_flush_at = at;
        let idle = s.running.is_none() && s.waiting.is_empty();
        let done = may_answer && s.failed.is_none() && s.durable.is_some_and(|d| d >= at);
        let joined = done
            || match s.running.as_mut() {
                Some(r) if r.covers.is_some_and(|c| c >= at) && r.batch.len() < MAX_WAITING => {
                    r.batch.push(seq);
                    true
                }
                _ => false,
            };
        // Exactly one write since the last Flush, and this one did not have to wait for a
        // running fdatasync: the fsync pattern. A Flush queued behind a running fdatasync
        // (a deep queue of writes and Flushes) is not: an early one would delay the next.
        self.armed
            .store(one_write && (joined || idle), Ordering::Relaxed);
        if joined {
            return done;
        }
        s.waiting.push(seq);
        drop(s);
        self.changed.notify_all();
        false
    }

    /// A write-type request was applied (it returned). After a Flush that followed exactly
    /// one, starts an early `fdatasync` if none is running or wanted.
    pub fn wrote(&self) {
        self.applied.fetch_add(1, Ordering::SeqCst);
        if !self.armed.swap(false, Ordering::Relaxed) {
            return;
        }
        let mut s = self.lock();
        if s.running.is_none() && s.waiting.is_empty() && !s.early && !s.stop {
            s.early = true;
            drop(s);
            self.changed.notify_all();
        }
    }

    /// Whether a Flush is queued or being flushed (the primary is waiting for it: not idle).
    pub fn busy(&self) -> bool {
        let s = self.lock();
        // (An early fdatasync no Flush joined is not waited for.)
        s.running.as_ref().is_some_and(|r| !r.batch.is_empty()) || !s.waiting.is_empty()
    }

    /// The answer a failed flush got, if one failed.
    pub fn failed(&self) -> Option<AckStatus> {
        self.lock().failed
    }

    /// Waits until every queued Flush is answered (and an early `fdatasync` returned); the
    /// answer of a failed one, if any failed.
    pub fn drain(&self) -> Option<AckStatus> {
        let mut s = self.lock();
        while s.running.is_some() || !s.waiting.is_empty() || s.early {
            s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        s.failed
    }

    /// Tells the flusher thread to return once the queue is empty.
    pub fn stop(&self) {
        self.lock().stop = true;
        self.changed.notify_all();
    }

    /// The flusher thread: `fdatasync`s the replica image for each batch of queued Flushes
    /// and answers them on `writer`.
    pub fn run(&self, node: &Node, writer: &Mutex<SecureWriter<&TcpStream>>, stream: &TcpStream) {
        let mut out = Vec::new();
        loop {
            let failed = {
                let mut s = self.lock();
                while s.waiting.is_empty() && !s.early && !s.stop {
                    s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
                }
                if s.waiting.is_empty() && !s.early {
                    return;
                }
                if s.waiting.is_empty() {
                    Counters::add(&node.status.counters.early_flushes, 1);
                }
                s.early = false;
                // Read under the lock, before the fdatasync: every request counted here had
                // been applied.
                let covers = self.applied.load(Ordering::SeqCst);
                let batch = std::mem::take(&mut s.waiting);
                s.running = Some(Running {
                    covers: Some(covers),
                    batch,
                });
                let failed = s.failed;
                drop(s);
                // Room again for a session waiting in `push`.
                self.changed.notify_all();
                failed
            };
            // A panic below must not leave `running` set (the session would wait forever).
            let unwinding = FailOnUnwind(self);
            let ack = match failed {
                Some(ack) => Some(ack),
                None => {
                    let t = std::time::Instant::now();
                    let ack = self.flush(node);
                    node.status.counters.flush.record(t.elapsed());
                    ack
                }
            };
            let batch = {
                let mut s = self.lock();
                match s.running.as_mut() {
                    Some(r) => {
                        let covered = r.covers.take();
                        let batch = std::mem::take(&mut r.batch);
                        match ack {
                            Some(AckStatus::Ok) => s.durable = s.durable.max(covered),
                            // No Flush is answered from an earlier fdatasync any more.
                            _ => s.durable = None,
                        }
                        batch
                    }
                    None => Vec::new(),
                }
            };
            out.clear();
            for &seq in &batch {
                let status = ack.unwrap_or(AckStatus::Ok);
                frame::encode(seq, &Frame::Ack { status }, &mut out);
            }
            Counters::add(&node.status.counters.flushes, batch.len() as u64);
            // `None`: a failed flush that could not be recorded; no answer, the link ends.
            let sent = ack.is_some() && {
                let mut w = writer.lock().unwrap_or_else(PoisonError::into_inner);
                let r = w.send(&out);
                Counters::add(&node.status.counters.bytes_sent, out.len() as u64);
                r.is_ok()
            };
            // Fenced (promoted meanwhile): the connection is cut anyway; nothing was lost.
            let lost = !matches!(ack, Some(AckStatus::Ok | AckStatus::Fenced));
            {
                let mut s = self.lock();
                s.running = None;
                if lost && s.failed.is_none() {
                    s.failed = Some(ack.unwrap_or(AckStatus::IoError));
                }
            }
            self.changed.notify_all();
            std::mem::forget(unwinding);
            if !sent || lost {
                // The session ends (its next read fails): nothing behind a lost flush is
                // applied any more than it must.
                let _ = stream.shutdown(Shutdown::Read);
            }
        }
    }

    /// One `fdatasync` under the flush gate. `Some(Ok)`: durable; `Some(status)`: failed and
    /// recorded (image outdated) or refused; `None`: failed and not recorded.
    fn flush(&self, node: &Node) -> Option<AckStatus> {
        let _gate = lock(&node.flush_gate);
        // The image is released (promotion) only under the gate: it stays open meanwhile.
        let file = {
            let rep = lock(&node.replica);
            if rep.is_fenced() {
                return Some(AckStatus::Fenced);
            }
            rep.syncer()
        };
        let r = file.and_then(|f| {
            f.sync().map_err(|source| ReplicaError::Io {
                op: "fdatasync",
                offset: 0,
                source,
            })
        });
        let mut rep = lock(&node.replica);
        // Another path's fdatasync (a failed promote, say) may have been told of the error
        // this one would have seen: the kernel reports it once.
        let r = r.and_then(|()| match rep.writeback_failed() {
            false => Ok(()),
            true => Err(ReplicaError::Io {
                op: "fdatasync",
                offset: 0,
                source: std::io::Error::other("an earlier fdatasync of this image failed"),
            }),
        });
        let Err(ack) = r else {
            return Some(AckStatus::Ok);
        };
        let status = ack.ack_status();
        Counters::add(&node.status.counters.errors, 1);
        if let Err(me) = rep.flush_failed() {
            error!(
                "image {}: flush failed ({}) and it cannot be recorded that the image is \
                 outdated: {}; dropping the primary",
                node.status.image().display(),
                chain(&ack),
                chain(&me)
            );
            return None;
        }
        error!(
            "image {}: {} (answered {status:?}); the image is outdated, the session ends",
            node.status.image().display(),
            chain(&ack)
        );
        Some(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_flood_of_flushes_waits_for_room_instead_of_growing_the_queue() {
        let q = FlushQueue::default();
        for seq in 0..MAX_WAITING as u64 {
            q.push(seq, true);
        }
        std::thread::scope(|s| {
            let t = s.spawn(|| q.push(u64::MAX, true));
            std::thread::sleep(Duration::from_millis(200));
            assert!(!t.is_finished(), "a push beyond MAX_WAITING did not wait");
            assert_eq!(q.lock().waiting.len(), MAX_WAITING);
            // The flusher takes the batch: room again.
            let taken = std::mem::take(&mut q.lock().waiting);
            q.changed.notify_all();
            assert_eq!(taken.len(), MAX_WAITING);
            t.join().unwrap();
        });
        assert_eq!(q.lock().waiting, vec![u64::MAX]);
    }

    #[test]
    fn a_flush_is_covered_only_by_an_fdatasync_that_began_after_its_writes() {
        let q = FlushQueue::default();
        // The session's first Flush needs an fdatasync of its own, writes or not.
        assert!(!q.push(1, true));
        assert_eq!(q.lock().waiting, vec![1]);
        q.lock().waiting.clear();
        q.wrote();
        // An fdatasync begins with that write applied: a Flush now joins it.
        q.lock().running = Some(Running {
            covers: Some(1),
            batch: Vec::new(),
        });
        assert!(!q.push(2, true));
        assert_eq!(q.lock().running.as_ref().unwrap().batch, vec![2]);
        // A write applied while it runs: the next Flush waits for the next fdatasync.
        q.wrote();
        assert!(!q.push(3, true));
        assert_eq!(q.lock().running.as_ref().unwrap().batch, vec![2]);
        assert_eq!(q.lock().waiting, vec![3]);
        // Once it returned, nothing joins it any more.
        q.lock().running.as_mut().unwrap().covers = None;
        q.lock().waiting.clear();
        assert!(!q.push(4, true));
        assert_eq!(q.lock().waiting, vec![4]);
        // A succeeded fdatasync that covered everything applied answers a Flush at once...
        q.lock().waiting.clear();
        q.lock().running = None;
        q.lock().durable = Some(2);
        // Not when the session found the image fenced or failed by another path.
        assert!(!q.push(50, false));
        assert_eq!(q.lock().waiting, vec![50]);
        q.lock().waiting.clear();
        assert!(q.push(5, true));
        // ...but not after another write, nor after a failure.
        q.wrote();
        assert!(!q.push(6, true));
        q.lock().waiting.clear();
        q.lock().durable = Some(3);
        q.lock().failed = Some(AckStatus::IoError);
        assert!(!q.push(7, true));
    }

    #[test]
    fn early_fdatasync_only_after_a_flush_that_followed_one_write_on_an_idle_flusher() {
        let q = FlushQueue::default();
        q.wrote();
        assert!(!q.lock().early, "early fdatasync before any Flush");
        q.push(1, true);
        q.lock().waiting.clear();
        q.wrote();
        assert!(q.lock().early);
        // At most one per Flush.
        q.lock().early = false;
        q.wrote();
        assert!(!q.lock().early);
        // Two writes since the last Flush: not the pattern.
        q.push(2, true);
        q.lock().waiting.clear();
        q.wrote();
        assert!(!q.lock().early);
        // One write, but the Flush queued behind a running fdatasync (a deep queue).
        q.push(3, true);
        q.lock().waiting.clear();
        q.wrote();
        q.lock().early = false;
        q.lock().running = Some(Running {
            covers: Some(0),
            batch: Vec::new(),
        });
        q.push(4, true);
        q.lock().running = None;
        q.lock().waiting.clear();
        q.wrote();
        assert!(!q.lock().early);
    }
}
