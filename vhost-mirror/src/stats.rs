//! Counters of served requests, one set per queue (no cache line shared by two queue
//! workers), summed only when someone asks for status.

use std::sync::atomic::{AtomicU64, Ordering};

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
    }
}
