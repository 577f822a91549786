//! The replica's FLUSH, off the request pipeline: a primary's Flush is answered after an
//! `fdatasync` that started after every request received before it had been applied, while
//! the session goes on applying the requests behind it. Flushes that arrive while one runs
//! are answered together by the next `fdatasync` (it covers them all).
//!
//! Invariants (ARCHITECTURE.md, "Durability", invariant 8):
//! - a Flush is acknowledged Ok only after an `fdatasync` that began after the last request
//!   before it was applied (the session queues it only then), and after the acks of those
//!   requests are on the wire (the session writes them out first);
//! - a failed `fdatasync` is recorded (image outdated, durably) before any answer; if it cannot
//!   be, the connection is closed without an answer; after a failure every later Flush fails
//!   too, and the session ends;
//! - a promotion waits for a running `fdatasync` and its outcome (`Node::flush_gate`), so an
//!   image whose writeback just failed is never promoted as up to date.

use std::net::{Shutdown, TcpStream};
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
        s.busy = false;
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
}

#[derive(Default)]
struct State {
    /// Sequence numbers of Flushes waiting for an `fdatasync` that starts after them.
    waiting: Vec<u64>,
    /// An `fdatasync` is running.
    busy: bool,
    /// A flush failed: how it was answered (every later one gets the same).
    failed: Option<AckStatus>,
    stop: bool,
}

impl FlushQueue {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues the Flush `seq` (every request before it has been applied, and answered). At
    /// most [`MAX_WAITING`] wait: beyond that the session waits for the running `fdatasync`
    /// to end (it takes them all), so a peer sending Flushes as fast as it can makes neither
    /// this queue nor the batch of answers grow without bound.
    pub fn push(&self, seq: u64) {
        let mut s = self.lock();
        while s.waiting.len() >= MAX_WAITING && !s.stop {
            s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        s.waiting.push(seq);
        drop(s);
        self.changed.notify_all();
    }

    /// Whether a Flush is queued or being flushed (the primary is waiting for it: not idle).
    pub fn busy(&self) -> bool {
        let s = self.lock();
        s.busy || !s.waiting.is_empty()
    }

    /// The answer a failed flush got, if one failed.
    pub fn failed(&self) -> Option<AckStatus> {
        self.lock().failed
    }

    /// Waits until every queued Flush is answered; the answer of a failed one, if any failed.
    pub fn drain(&self) -> Option<AckStatus> {
        let mut s = self.lock();
        while s.busy || !s.waiting.is_empty() {
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
            let (batch, failed) = {
                let mut s = self.lock();
                while s.waiting.is_empty() && !s.stop {
                    s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
                }
                if s.waiting.is_empty() {
                    return;
                }
                s.busy = true;
                let taken = (std::mem::take(&mut s.waiting), s.failed);
                drop(s);
                // Room again for a session waiting in `push`.
                self.changed.notify_all();
                taken
            };
            // A panic below must not leave `busy` set (the session would wait forever).
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
                s.busy = false;
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
            q.push(seq);
        }
        std::thread::scope(|s| {
            let t = s.spawn(|| q.push(u64::MAX));
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
}
