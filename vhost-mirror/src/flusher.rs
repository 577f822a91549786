//! Background fdatasync: a guest FLUSH completes when the image is durable, without holding up
//! the requests queued behind it on the same virtqueue (they are not covered by it anyway).
//!
//! One thread; flushes that arrive while an fdatasync runs are served together by the next one
//! (each was submitted before it started, so it covers every write completed before them).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use log::error;

use crate::completion::QueueEvent;
use crate::disk::RawImage;

/// The outcome of one flush, once the flusher got to it.
#[derive(Debug, Default)]
pub struct FlushTicket {
    result: Mutex<TicketState>,
    done: Condvar,
}

#[derive(Debug, Default)]
struct TicketState {
    result: Option<Result<(), String>>,
    /// The queue worker's completion event, signalled with the outcome.
    notify: Option<Arc<QueueEvent>>,
}

impl FlushTicket {
    fn lock(&self) -> MutexGuard<'_, TicketState> {
        self.result.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_done(&self) -> bool {
        self.lock().result.is_some()
    }

    /// Signals `ev` when the fdatasync is done (nothing if it is already).
    pub fn notify_when_done(&self, ev: &Arc<QueueEvent>) {
        let mut g = self.lock();
        if g.result.is_none() {
            g.notify = Some(ev.clone());
        }
    }

    /// Waits for the fdatasync; Err carries the reason it failed.
    pub fn wait(&self) -> Result<(), String> {
        let mut g = self.lock();
        loop {
            if let Some(r) = g.result.as_ref() {
                return r.clone();
            }
            g = self.done.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn complete(&self, r: Result<(), String>) {
        let mut g = self.lock();
        g.result = Some(r);
        let notify = g.notify.take();
        drop(g);
        self.done.notify_all();
        if let Some(n) = notify {
            n.signal();
        }
    }
}

struct Shared {
    queue: Mutex<Vec<Arc<FlushTicket>>>,
    wake: Condvar,
}

/// How many fdatasyncs ran and how long they took in all (status: where a flush's time goes).
#[derive(Debug, Default)]
pub struct FlushStats {
    pub count: AtomicU64,
    pub nanos: AtomicU64,
}

pub struct Flusher {
    shared: Arc<Shared>,
    pub stats: Arc<FlushStats>,
}

impl Flusher {
    /// Starts the flusher thread for `disk`.
    pub fn start(disk: Arc<RawImage>) -> std::io::Result<Flusher> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Vec::new()),
            wake: Condvar::new(),
        });
        let s = shared.clone();
        let stats = Arc::new(FlushStats::default());
        let st = stats.clone();
        std::thread::Builder::new()
            .name("flusher".into())
            .spawn(move || loop {
                let batch = {
                    let mut q = s.queue.lock().unwrap_or_else(|p| p.into_inner());
                    while q.is_empty() {
                        q = s.wake.wait(q).unwrap_or_else(|p| p.into_inner());
                    }
                    std::mem::take(&mut *q)
                };
                let t0 = Instant::now();
                let r = disk.flush().map_err(|e| {
                    let msg = mirror_proto::sys::error_chain(&e);
                    error!("flush failed: {msg}");
                    msg
                });
                st.count.fetch_add(1, Ordering::Relaxed);
                st.nanos
                    .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
                for t in batch {
                    t.complete(r.clone());
                }
            })?;
        Ok(Flusher { shared, stats })
    }

    /// Queues a flush of every write completed so far.
    pub fn submit(&self) -> Arc<FlushTicket> {
        let t = Arc::new(FlushTicket::default());
        self.shared
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(t.clone());
        self.shared.wake.notify_one();
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flushes_complete() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let disk = Arc::new(RawImage::open(&p, false).unwrap());
        let f = Flusher::start(disk).unwrap();
        let tickets: Vec<_> = (0..10).map(|_| f.submit()).collect();
        for t in tickets {
            assert_eq!(t.wait(), Ok(()));
            assert!(t.is_done());
        }
    }
}
