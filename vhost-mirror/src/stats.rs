//! Counters of served requests, one set per queue (no cache line shared by two queue
//! workers), summed only when someone asks for status or metrics.

use std::sync::atomic::{AtomicU64, Ordering};

use mirror_proto::metrics::{Histogram, HistogramSnapshot};

/// Counters for one virtqueue. Aligned so that two queues never share a cache line.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct QueueCounters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    pub write_zeroes: AtomicU64,
    pub get_ids: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Requests that completed with VIRTIO_BLK_S_IOERR (bad chain, out of range, I/O error).
    pub errors: AtomicU64,
    /// Requests that completed with VIRTIO_BLK_S_UNSUPP.
    pub unsupported: AtomicU64,
    /// Requests taken from the ring whose completion waits for the replica or an fdatasync
    /// (a gauge, stored by the queue worker).
    pub inflight: AtomicU64,
    /// The local `pwritev` of each guest write (all its chunks, when mirrored).
    pub local_write: Histogram,
    /// Each guest FLUSH, from the worker taking it to its completion (both sides durable).
    pub flush: Histogram,
}

impl QueueCounters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// A point-in-time sum over all queues.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CounterSnapshot {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    pub get_ids: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub errors: u64,
    pub unsupported: u64,
}

/// Requests in flight over all queues, and the latency histograms summed: local writes and
/// flushes.
pub fn latencies(queues: &[QueueCounters]) -> (u64, HistogramSnapshot, HistogramSnapshot) {
    let (mut inflight, mut write, mut flush) = (
        0u64,
        HistogramSnapshot::default(),
        HistogramSnapshot::default(),
    );
    for q in queues {
        inflight += q.inflight.load(Ordering::Relaxed);
        write.merge(&q.local_write.snapshot());
        flush.merge(&q.flush.snapshot());
    }
    (inflight, write, flush)
}

pub fn snapshot(queues: &[QueueCounters]) -> CounterSnapshot {
    let mut s = CounterSnapshot::default();
    for q in queues {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        s.reads += l(&q.reads);
        s.writes += l(&q.writes);
        s.flushes += l(&q.flushes);
        s.discards += l(&q.discards);
        s.write_zeroes += l(&q.write_zeroes);
        s.get_ids += l(&q.get_ids);
        s.bytes_read += l(&q.bytes_read);
        s.bytes_written += l(&q.bytes_written);
        s.errors += l(&q.errors);
        s.unsupported += l(&q.unsupported);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_over_queues() {
        let q = [QueueCounters::default(), QueueCounters::default()];
        QueueCounters::add(&q[0].reads, 2);
        QueueCounters::add(&q[1].reads, 3);
        QueueCounters::add(&q[1].bytes_written, 4096);
        let s = snapshot(&q);
        assert_eq!(s.reads, 5);
        assert_eq!(s.bytes_written, 4096);
        assert_eq!(std::mem::align_of::<QueueCounters>(), 128);
        q[0].inflight.store(2, Ordering::Relaxed);
        q[1].inflight.store(3, Ordering::Relaxed);
        q[0].local_write.record(std::time::Duration::from_micros(5));
        q[1].local_write.record(std::time::Duration::from_micros(7));
        q[1].flush.record(std::time::Duration::from_millis(2));
        let (inflight, w, f) = latencies(&q);
        assert_eq!(
            (inflight, w.count(), w.sum_ns, f.count()),
            (5, 2, 12_000, 1)
        );
    }
}
