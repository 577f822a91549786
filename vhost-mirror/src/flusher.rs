//! Background fdatasync: a guest FLUSH completes when the image is durable, without holding up
//! the requests queued behind it on the same virtqueue (they are not covered by it anyway).
//!
//! One thread; flushes that arrive while an fdatasync runs are served together by the next one
//! (each was submitted before it started, so it covers every write completed before them),
//! unless no write-type operation returned since the running one began: then it covers them
//! already, and answers them too.
//!
//! Early fdatasync: when the last FLUSH followed exactly one write (a guest's fsync pattern:
//! write, wait, flush), the next write starts an fdatasync as soon as its local part returned,
//! and the FLUSH that follows joins it. A mirrored write completes only once the replica
//! acknowledged it, so the local fdatasync gets a round trip's head start.
//!
//! Invariant (ARCHITECTURE.md, "Durability"): a FLUSH is answered Ok only by an fdatasync that
//! began after every write-type operation the image counted when the FLUSH arrived had
//! returned (`RawImage::modifications`, read before the fdatasync and at the FLUSH).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    state: Mutex<State>,
    wake: Condvar,
    /// The last FLUSH followed exactly one write: the next write starts an early fdatasync.
    armed: AtomicBool,
}

#[derive(Default)]
struct State {
    /// FLUSHes waiting for an fdatasync that starts after them.
    waiting: Vec<Arc<FlushTicket>>,
    /// The running fdatasync: the image's modification count when it began (it covers that
    /// many write-type operations), and the FLUSHes it answers.
    running: Option<(u64, Vec<Arc<FlushTicket>>)>,
    /// An early fdatasync is wanted (see [`Flusher::wrote`]).
    early: bool,
    /// The modification count at the last FLUSH.
    last_flush_at: u64,
    /// What the last fdatasync that succeeded covered (its modification count at the start).
    /// None before the first: writes an earlier process left in the page cache are durable
    /// only after an fdatasync of this one.
    durable: Option<u64>,
}

/// How many fdatasyncs ran and how long they took in all (status: where a flush's time goes).
#[derive(Debug, Default)]
pub struct FlushStats {
    pub count: AtomicU64,
    pub nanos: AtomicU64,
    /// fdatasyncs started early (after a write, before a FLUSH asked: see [`Flusher::wrote`]).
    pub early: AtomicU64,
    /// FLUSHes answered by an fdatasync already running when they arrived.
    pub joined: AtomicU64,
}

pub struct Flusher {
    shared: Arc<Shared>,
    disk: Arc<RawImage>,
    pub stats: Arc<FlushStats>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Flusher {
    /// Starts the flusher thread for `disk`.
    pub fn start(disk: Arc<RawImage>) -> std::io::Result<Flusher> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            armed: AtomicBool::new(false),
        });
        let s = shared.clone();
        let stats = Arc::new(FlushStats::default());
        let st = stats.clone();
        let d = disk.clone();
        std::thread::Builder::new()
            .name("flusher".into())
            .spawn(move || loop {
                {
                    let mut q = s.lock();
                    while q.waiting.is_empty() && !q.early {
                        q = s.wake.wait(q).unwrap_or_else(|p| p.into_inner());
                    }
                    if q.waiting.is_empty() {
                        st.early.fetch_add(1, Ordering::Relaxed);
                    }
                    q.early = false;
                    // Read under the lock, before the fdatasync: every write-type operation
                    // counted here had returned, its data in the page cache.
                    let mark = d.modifications();
                    let waiting = std::mem::take(&mut q.waiting);
                    q.running = Some((mark, waiting));
                }
                let t0 = Instant::now();
                let r = d.flush().map_err(|e| {
                    let msg = mirror_proto::sys::error_chain(&e);
                    error!("flush failed: {msg}");
                    msg
                });
                st.count.fetch_add(1, Ordering::Relaxed);
                st.nanos
                    .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
                let batch = {
                    let mut q = s.lock();
                    let run = q.running.take();
                    // (`submit` checks the image has not failed since, before it answers
                    // from this.)
                    if let (Some((mark, _)), Ok(())) = (&run, &r) {
                        q.durable = q.durable.max(Some(*mark));
                    }
                    run.map(|(_, b)| b).unwrap_or_default()
                };
                for t in batch {
                    t.complete(r.clone());
                }
            })?;
        Ok(Flusher {
            shared,
            disk,
            stats,
        })
    }

    /// Queues a flush of every write completed so far. An fdatasync that is running (or
    /// succeeded) already answers it if it began after all of them (no write-type operation
    /// returned since); otherwise the next one does.
    pub fn submit(&self) -> Arc<FlushTicket> {
        let t = Arc::new(FlushTicket::default());
        let mut s = self.shared.lock();
        let at = self.disk.modifications();
        let one_write = at.wrapping_sub(s.last_flush_at) == 1;
        s.last_flush_at = at;
        // A failed image fails every later FLUSH (the next fdatasync says so), even one
        // with no write since the last that succeeded.
        let durable = s.durable.is_some_and(|d| d >= at) && self.disk.failure().is_none();
        let joined = match &mut s.running {
            _ if durable => {
                // An fdatasync that began after all of them already succeeded (an early one
                // that finished before this FLUSH came).
                t.complete(Ok(()));
                self.stats.joined.fetch_add(1, Ordering::Relaxed);
                true
            }
            Some((mark, batch)) if *mark >= at => {
                batch.push(t.clone());
                self.stats.joined.fetch_add(1, Ordering::Relaxed);
                true
            }
            _ => false,
        };
        // A FLUSH after exactly one write, finding the flusher idle (or joining): a guest's
        // fsync of one small write, a journal's commit record. Expect the pattern to go on.
        // A FLUSH that must wait for a running fdatasync (a deep queue of writes and
        // flushes) is not that pattern: an early fdatasync there would only delay the next.
        let idle = s.running.is_none() && s.waiting.is_empty();
        self.shared
            .armed
            .store(one_write && (joined || idle), Ordering::Relaxed);
        if !joined {
            s.waiting.push(t.clone());
            drop(s);
            self.shared.wake.notify_one();
        }
        t
    }

    /// A write-type request's local part returned. After a FLUSH that followed exactly one
    /// write, the next write starts an fdatasync at once (if none runs): the FLUSH expected
    /// next joins it instead of starting its own, and finds it partly done. At most one
    /// early fdatasync per FLUSH, so a guest that stops flushing costs at most one more.
    pub fn wrote(&self) {
        if !self.shared.armed.swap(false, Ordering::Relaxed) {
            return;
        }
        let mut s = self.shared.lock();
        if s.running.is_none() && s.waiting.is_empty() && !s.early {
            s.early = true;
            drop(s);
            self.shared.wake.notify_one();
        }
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

    /// A flusher without its thread: the test plays the thread's part on its state.
    fn idle_flusher(disk: Arc<RawImage>) -> Flusher {
        Flusher {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                wake: Condvar::new(),
                armed: AtomicBool::new(false),
            }),
            disk,
            stats: Arc::new(FlushStats::default()),
        }
    }

    fn image(d: &tempfile::TempDir) -> Arc<RawImage> {
        let p = d.path().join("img");
        std::fs::write(&p, vec![0u8; 8192]).unwrap();
        Arc::new(RawImage::open(&p, false).unwrap())
    }

    #[test]
    fn the_first_flush_needs_an_fdatasync_even_without_writes() {
        // A restarted server: the last process's writes may still be in the page cache.
        let d = tempfile::tempdir().unwrap();
        let f = idle_flusher(image(&d));
        let t = f.submit();
        assert!(!t.is_done());
        assert_eq!(f.shared.lock().waiting.len(), 1);
    }

    #[test]
    fn a_failed_image_answers_no_flush_from_an_earlier_fdatasync() {
        let d = tempfile::tempdir().unwrap();
        let disk = image(&d);
        let f = idle_flusher(disk.clone());
        disk.write_at(&[1; 512], 0).unwrap();
        f.shared.lock().durable = Some(disk.modifications());
        let t = f.submit();
        assert!(t.is_done(), "covered by the fdatasync that succeeded");
        // An fdatasync (an early one, say) failed since: no write counted, yet the next
        // FLUSH must wait for an fdatasync of its own, which fails.
        disk.fail_for_test("fdatasync failed");
        let t = f.submit();
        assert!(!t.is_done());
        assert_eq!(f.shared.lock().waiting.len(), 1);
    }

    #[test]
    fn a_flush_joins_a_running_fdatasync_only_if_no_write_returned_since_it_began() {
        let d = tempfile::tempdir().unwrap();
        let disk = image(&d);
        let f = idle_flusher(disk.clone());
        disk.write_at(&[1; 512], 0).unwrap();
        // An fdatasync begins, covering that write.
        f.shared.lock().running = Some((disk.modifications(), Vec::new()));
        let joined = f.submit();
        assert_eq!(f.shared.lock().running.as_ref().unwrap().1.len(), 1);
        assert!(f.shared.lock().waiting.is_empty());
        // A write returns while it runs: a FLUSH now needs the next one.
        disk.write_at(&[2; 512], 512).unwrap();
        let waits = f.submit();
        let s = f.shared.lock();
        assert_eq!(
            s.running.as_ref().unwrap().1.len(),
            1,
            "joined a sync that began before the write"
        );
        assert_eq!(s.waiting.len(), 1);
        assert!(Arc::ptr_eq(&s.running.as_ref().unwrap().1[0], &joined));
        assert!(Arc::ptr_eq(&s.waiting[0], &waits));
        assert_eq!(f.stats.joined.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn early_fdatasync_only_after_a_flush_that_followed_one_write_on_an_idle_flusher() {
        let d = tempfile::tempdir().unwrap();
        let disk = image(&d);
        let f = idle_flusher(disk.clone());
        // write, FLUSH (idle flusher): armed; the next write asks for an early fdatasync.
        disk.write_at(&[1; 512], 0).unwrap();
        f.wrote();
        assert!(!f.shared.lock().early, "early fdatasync before any FLUSH");
        f.submit();
        f.shared.lock().waiting.clear();
        disk.write_at(&[1; 512], 0).unwrap();
        f.wrote();
        assert!(f.shared.lock().early);
        // Once per FLUSH: another write asks for nothing more.
        f.shared.lock().early = false;
        disk.write_at(&[1; 512], 0).unwrap();
        f.wrote();
        assert!(!f.shared.lock().early);
        // Two writes since the last FLUSH: not the pattern.
        f.submit();
        f.shared.lock().waiting.clear();
        disk.write_at(&[1; 512], 0).unwrap();
        f.wrote();
        assert!(!f.shared.lock().early);
        // One write, but the FLUSH had to wait behind a running fdatasync (a deep queue).
        f.submit();
        f.shared.lock().waiting.clear();
        disk.write_at(&[1; 512], 0).unwrap();
        f.shared.lock().running = Some((0, Vec::new()));
        f.submit();
        f.shared.lock().running = None;
        f.shared.lock().waiting.clear();
        disk.write_at(&[1; 512], 0).unwrap();
        f.wrote();
        assert!(!f.shared.lock().early);
    }

    #[test]
    fn a_write_flush_sequence_is_answered_by_early_fdatasyncs() {
        let d = tempfile::tempdir().unwrap();
        let disk = image(&d);
        let f = Flusher::start(disk.clone()).unwrap();
        for i in 0..50u8 {
            disk.write_at(&[i; 512], 0).unwrap();
            f.wrote();
            // The guest hears of the write, then sends its FLUSH.
            std::thread::sleep(std::time::Duration::from_millis(5));
            assert_eq!(f.submit().wait(), Ok(()));
        }
        let (count, early, joined) = (
            f.stats.count.load(Ordering::Relaxed),
            f.stats.early.load(Ordering::Relaxed),
            f.stats.joined.load(Ordering::Relaxed),
        );
        // One fdatasync per FLUSH (none wasted); all but the first begun early, and the
        // FLUSH answered by it (running or done).
        assert_eq!(count, 50, "{count} fdatasyncs for 50 FLUSHes");
        // (However late the flusher thread wakes, the count above holds; this one needs it
        // awake within 5 ms now and then.)
        assert!(early >= 10, "only {early} of 50 early");
        assert!(joined >= early, "{joined} joined, {early} early");
    }
}
