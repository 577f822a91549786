//! The vhost-user-blk device: feature negotiation, config space, and one worker per virtqueue.
//!
//! `vhost-user-backend` runs one thread per entry of `queues_per_thread`; we give each queue its
//! own thread and its own state, so queues never wait for each other on the I/O path.
//!
//! Every offered queue (`--num-queues`) gets its thread when a frontend connects (the library
//! makes them all then, each blocked in its epoll loop), but nothing else until the frontend
//! starts and enables that queue: its completion eventfd is made and registered then, by its
//! own worker (`BlkBackend::start_queue`), and its request buffers grow with its first
//! requests. A queue the frontend never uses costs an idle thread and a few hundred bytes.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use log::{debug, error, warn};
use mirror_proto::sys::RefusalLog;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::blk_config::{off, read_config, DeviceModel, ID_BYTES};
use crate::disk::RawImage;
use mirror_proto::sys::error_chain as chain;

use crate::completion::QueueEvent;
use crate::executor::{self, Completion, Deferred, IovecBuf, Target};
use crate::flusher::Flusher;
use crate::inflight_shm::{HeadChain, InflightHost, InflightRegion, QueueInflight};
use crate::replication::Mirror;
use crate::request::{ParseError, Request, RequestType};
use crate::stats::QueueCounters;

/// State of one queue worker, kept across connections. Its mutex is taken by that queue's
/// worker thread, by `stop_vring` (GET_VRING_BASE) and by `lock_all_drained` (shutdown, a
/// frontend gone). Its buffers start empty (no allocation) and grow with the queue's requests.
pub struct QueueWorker {
    request: Request,
    iov: IovecBuf,
    /// Requests whose background parts (replica ack, a FLUSH's `fdatasync`) are in flight.
    deferred: Vec<Deferred>,
    /// Bad requests are logged at most once per few seconds (a guest can send any number).
    bad_log: RefusalLog,
    /// This queue's part of the in-flight region (`inflight_shm.rs`), if the frontend gave one.
    inflight: Option<QueueInflight>,
    /// The region `inflight` belongs to ([`Device::inflight_epoch`] when it was looked at).
    inflight_epoch: u64,
    /// Requests left in flight by the last process, to run again before taking new ones.
    resubmit: VecDeque<u16>,
}

impl Default for QueueWorker {
    fn default() -> Self {
        QueueWorker {
            request: Request::default(),
            iov: IovecBuf::default(),
            deferred: Vec::new(),
            bad_log: RefusalLog::new("guest requests"),
            inflight: None,
            inflight_epoch: 0,
            resubmit: VecDeque::new(),
        }
    }
}

impl QueueWorker {
    /// Bytes its buffers hold allocated (0 for a queue that never served a request).
    #[cfg(test)]
    pub fn buffer_bytes(&self) -> usize {
        self.request.buffer_bytes()
            + self.iov.buffer_bytes()
            + self.deferred.capacity() * std::mem::size_of::<Deferred>()
    }
}

/// Most replicated requests a worker keeps in flight before it waits for their replies.
const MAX_DEFERRED: usize = 128;

/// Everything that outlives a single frontend connection.
pub struct Device {
    pub disk: Arc<RawImage>,
    pub model: DeviceModel,
    pub counters: Vec<QueueCounters>,
    pub workers: Vec<Mutex<QueueWorker>>,
    /// Held while one caller takes every worker (`lock_all_drained`): two callers at once (a
    /// SIGTERM's `quiesce` and the departing frontend's `finish_all_deferred`) could each hold
    /// part of the workers and wait for the rest forever.
    draining: Mutex<()>,
    /// Guest's write-cache setting (virtio-blk WCE); writeback by default.
    pub writeback: AtomicBool,
    /// Set on shutdown: workers stop taking new requests.
    pub stopping: AtomicBool,
    /// The frontend went away: workers take no new requests until the next one connects.
    pub frontend_gone: AtomicBool,
    /// How long a worker with nothing in flight keeps looking at its ring for new requests
    /// before it sleeps (with requests deferred it sleeps at once, woken by their completion).
    pub poll: std::time::Duration,
    /// How long a worker whose requests are all in flight (waiting for the replica or an
    /// fdatasync) watches them and its ring before it sleeps until their completion event.
    pub poll_inflight: std::time::Duration,
    pub id: [u8; ID_BYTES],
    /// Synchronous replication, when a peer is configured.
    pub mirror: Option<Arc<Mirror>>,
    /// Runs the fdatasync of guest FLUSH requests in the background.
    pub flusher: Flusher,
    /// Per queue: signalled when one of its deferred requests finished (`completion.rs`). Made
    /// when the frontend first enables the queue (`completion_event`), kept across connections.
    events: Vec<OnceLock<Arc<QueueEvent>>>,
    /// Per queue: the frontend started and enabled it, as its worker last saw it (cleared when
    /// the frontend stops the ring or goes away). `status` counts them (`queues_enabled`).
    enabled: Vec<AtomicBool>,
    /// Per queue: enabled at some time in the current connection (for the disconnect's log
    /// line: by then the frontend has stopped every ring).
    used: Vec<AtomicBool>,
    /// The in-flight region of the current frontend (SET_INFLIGHT_FD, through the relay), and
    /// its epoch, changed with it under the same lock whenever it changes: a worker takes the
    /// two together, so it never records an epoch with another epoch's region (and recovers
    /// the region again, its own requests in flight among "the last process's").
    inflight: Mutex<(u64, Option<Arc<InflightRegion>>)>,
    /// The epoch, for a worker's look at each turn (stored under `inflight`'s lock).
    inflight_epoch: AtomicU64,
}

impl InflightHost for Device {
    fn set_region(&self, region: Option<Arc<InflightRegion>>) {
        let mut g = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        g.0 += 1;
        g.1 = region;
        self.inflight_epoch.store(g.0, Ordering::SeqCst);
    }

    fn has_region(&self) -> bool {
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .is_some()
    }
}

/// The epoll `data` of a queue thread's completion event (0..num_queues are the kicks, and
/// num_queues the library's own event).
fn completion_event_id(num_queues: usize) -> u16 {
    num_queues as u16 + 1
}

impl Device {
    pub fn new(
        disk: Arc<RawImage>,
        model: DeviceModel,
        id: [u8; ID_BYTES],
        mirror: Option<Arc<Mirror>>,
        flusher: Flusher,
    ) -> Self {
        let n = usize::from(model.num_queues);
        Device {
            disk,
            model,
            counters: (0..n).map(|_| QueueCounters::default()).collect(),
            workers: (0..n).map(|_| Mutex::new(QueueWorker::default())).collect(),
            draining: Mutex::new(()),
            writeback: AtomicBool::new(true),
            stopping: AtomicBool::new(false),
            frontend_gone: AtomicBool::new(false),
            poll: std::time::Duration::ZERO,
            poll_inflight: std::time::Duration::ZERO,
            id,
            mirror,
            flusher,
            events: (0..n).map(|_| OnceLock::new()).collect(),
            enabled: (0..n).map(|_| AtomicBool::new(false)).collect(),
            used: (0..n).map(|_| AtomicBool::new(false)).collect(),
            inflight: Mutex::new((0, None)),
            inflight_epoch: AtomicU64::new(0),
        }
    }

    /// Whether workers take new requests (not shutting down, the frontend still there). When
    /// not, requests stay on the ring: nothing may loop on "the ring has some".
    fn accepting(&self) -> bool {
        !self.stopping.load(Ordering::Acquire) && !self.frontend_gone.load(Ordering::Acquire)
    }

    /// Queue `q`'s completion event, if the frontend ever enabled `q`.
    fn event(&self, q: usize) -> Option<&Arc<QueueEvent>> {
        self.events.get(q).and_then(OnceLock::get)
    }

    /// Queue `q`'s completion event, made now if this is the first time the frontend enabled
    /// `q` (only `q`'s worker thread calls this for `q`).
    fn completion_event(&self, q: usize) -> io::Result<&Arc<QueueEvent>> {
        let slot = self
            .events
            .get(q)
            .ok_or_else(|| io::Error::other(format!("no queue {q}")))?;
        if slot.get().is_none() {
            // Set by nobody else meanwhile (one thread per queue); if it were, that one is kept.
            let _ = slot.set(Arc::new(QueueEvent::new()?));
        }
        slot.get()
            .ok_or_else(|| io::Error::other(format!("no completion event for queue {q}")))
    }

    /// How many queues the frontend started and enabled (a worker serves them).
    pub fn queues_enabled(&self) -> usize {
        self.enabled
            .iter()
            .filter(|e| e.load(Ordering::Relaxed))
            .count()
    }

    /// How many queues the frontend enabled at some time in this connection.
    pub fn queues_used(&self) -> usize {
        self.used
            .iter()
            .filter(|e| e.load(Ordering::Relaxed))
            .count()
    }

    /// The frontend is gone and its daemon (so every queue worker) dropped: no queue is enabled.
    pub fn frontend_left(&self) {
        for e in self.enabled.iter().chain(&self.used) {
            e.store(false, Ordering::Relaxed);
        }
        // The region was that frontend's; the next one brings its own (or none).
        self.set_region(None);
    }

    /// After the frontend went away (before its daemon, and so the queue workers, are
    /// dropped): no worker takes a new request, and every deferred one is finished, waiting
    /// for its background parts; nothing is written to guest memory. The ordering table, the
    /// activity log and the out-of-sync records are as if each had completed.
    pub fn finish_all_deferred(&self) {
        self.frontend_gone.store(true, Ordering::SeqCst);
        drop(self.lock_all_drained());
    }

    /// Locks every queue worker and finishes what each deferred (no guest told). A worker
    /// that holds its lock while it waits in the ordering table for a range another queue's
    /// deferred request holds gets it once that one is finished here: so the workers are
    /// locked in rounds, whichever is free, never in a fixed order.
    fn lock_all_drained(&self) -> Vec<std::sync::MutexGuard<'_, QueueWorker>> {
        // One taker at a time (a second one waits here, then for the guards the first keeps).
        let _one = self.draining.lock().unwrap_or_else(|p| p.into_inner());
        let mut guards: Vec<Option<std::sync::MutexGuard<'_, QueueWorker>>> =
            self.workers.iter().map(|_| None).collect();
        loop {
            for (q, w) in self.workers.iter().enumerate() {
                if guards[q].is_some() {
                    continue;
                }
                let g = match w.try_lock() {
                    Ok(g) => g,
                    Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                    Err(std::sync::TryLockError::WouldBlock) => continue,
                };
                let mut g = g;
                drain_deferred(&mut g.deferred, self.mirror.as_deref(), &self.counters[q]);
                self.counters[q].inflight.store(0, Ordering::Relaxed);
                guards[q] = Some(g);
            }
            if guards.iter().all(Option::is_some) {
                return guards.into_iter().flatten().collect();
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Waits until no queue worker is in the middle of a batch, and keeps them from starting
    /// another (the returned guards hold every worker).
    pub fn quiesce(&self) -> Vec<std::sync::MutexGuard<'_, QueueWorker>> {
        self.stopping.store(true, Ordering::SeqCst);
        // Workers with deferred requests wake and complete them to the guest (waiting for
        // them); what is left (a ring not running) is finished without the guest.
        for e in self.events.iter().filter_map(OnceLock::get) {
            e.force_signal();
        }
        self.lock_all_drained()
    }
}

/// The backend for one frontend connection.
#[derive(Clone)]
pub struct BlkBackend {
    dev: Arc<Device>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    event_idx: Arc<AtomicBool>,
    /// Each queue's vring, once its worker saw it (for `stop_vring`, which is not given it).
    vrings: Arc<Vec<OnceLock<VringRwLock>>>,
    /// This connection's event loops, one per queue (`set_event_loops`): a queue's completion
    /// event joins its loop when the frontend first enables the queue. Weak: each loop holds a
    /// clone of this backend.
    loops: Arc<OnceLock<Vec<Weak<VringEpollHandler<BlkBackend>>>>>,
    /// Per queue: its completion event is in its loop (the queue is started).
    started: Arc<Vec<AtomicBool>>,
    /// Per queue: the guest was interrupted in this connection. The first turn of a
    /// connection interrupts it whatever it completed: the process before us (killed, or a
    /// connection that broke) may have put requests on the used ring and died before telling
    /// the guest, and with EVENT_IDX the guest's `used_event` is then behind the used index,
    /// so no later completion would tell it either (libvhost-user: `signalled_used_valid`).
    told_guest: Arc<Vec<AtomicBool>>,
}

impl BlkBackend {
    pub fn new(dev: Arc<Device>, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> Self {
        let n = dev.workers.len();
        BlkBackend {
            dev,
            mem,
            event_idx: Arc::new(AtomicBool::new(false)),
            vrings: Arc::new((0..n).map(|_| OnceLock::new()).collect()),
            loops: Arc::new(OnceLock::new()),
            started: Arc::new((0..n).map(|_| AtomicBool::new(false)).collect()),
            told_guest: Arc::new((0..n).map(|_| AtomicBool::new(false)).collect()),
        }
    }

    /// Hands this connection's event loops (the daemon's, one per queue) to the backend,
    /// before the frontend is attached.
    pub fn set_event_loops(&self, loops: &[Arc<VringEpollHandler<BlkBackend>>]) -> io::Result<()> {
        if loops.len() != self.started.len() {
            return Err(io::Error::other(format!(
                "{} event loops for {} queues",
                loops.len(),
                self.started.len()
            )));
        }
        self.loops
            .set(loops.iter().map(Arc::downgrade).collect())
            .map_err(|_| io::Error::other("event loops set twice"))
    }

    /// The frontend enabled queue `q` (its worker runs for the first time in this connection):
    /// its completion event is made (the first time ever) and joins the worker's event loop.
    /// Called on `q`'s worker thread only.
    fn start_queue(&self, q: usize) -> io::Result<()> {
        let Some(started) = self.started.get(q) else {
            return Err(io::Error::other(format!("no queue {q}")));
        };
        if started.load(Ordering::Relaxed) {
            return Ok(());
        }
        let ev = self.dev.completion_event(q)?;
        let event_loop = self
            .loops
            .get()
            .and_then(|l| l.get(q))
            .and_then(Weak::upgrade)
            .ok_or_else(|| io::Error::other(format!("no event loop for queue {q}")))?;
        event_loop.register_listener(
            ev.as_raw_fd(),
            EventSet::IN,
            u64::from(completion_event_id(self.dev.events.len())),
        )?;
        started.store(true, Ordering::Relaxed);
        debug!("queue {q}: enabled by the frontend");
        Ok(())
    }

    /// Drains the queue: parse, execute, complete what is ready, then notify the guest once
    /// per batch. Returns whether requests stay deferred (their completion event is armed).
    /// `drain`: take no new request and finish every deferred one, waiting for them (the ring
    /// is being stopped); also so on shutdown (`dev.stopping`).
    fn process_queue(&self, queue: usize, vring: &VringRwLock, drain: bool) -> io::Result<bool> {
        let dev = &*self.dev;
        let Some(worker) = dev.workers.get(queue) else {
            return Err(io::Error::other(format!("no worker for queue {queue}")));
        };
        let mut worker = worker.lock().unwrap_or_else(|p| p.into_inner());
        let r = self.process_locked(queue, &mut worker, vring, drain);
        // However the turn ended (an error part way too): what is left in flight.
        dev.counters[queue]
            .inflight
            .store(worker.deferred.len() as u64, Ordering::Relaxed);
        r
    }

    /// [`Self::process_queue`]'s turn, with the queue's worker state locked.
    fn process_locked(
        &self,
        queue: usize,
        worker: &mut QueueWorker,
        vring: &VringRwLock,
        drain: bool,
    ) -> io::Result<bool> {
        let dev = &*self.dev;
        let stopping = || drain || !dev.accepting();
        if !drain {
            resume_inflight(dev, queue, worker, vring, &self.mem.memory());
        }
        let QueueWorker {
            request,
            iov,
            deferred,
            bad_log,
            inflight,
            inflight_epoch: _,
            resubmit,
        } = worker;
        let inflight = &*inflight;
        let counters = &dev.counters[queue];
        let mirror = dev.mirror.as_deref();
        let target = Target {
            disk: &dev.disk,
            writeback: dev.writeback.load(Ordering::Relaxed),
            id: &dev.id,
            mirror,
        };
        let mem = self.mem.memory();
        let mut state = vring.get_mut();
        // Under the worker's lock: `stop_vring` (which holds it too) clears it for good. Written
        // only when it changes: the flags of all queues share a cache line.
        let enabled = !drain && state.get_queue().ready() && state.is_enabled();
        if dev.enabled[queue].load(Ordering::Relaxed) != enabled {
            dev.enabled[queue].store(enabled, Ordering::Relaxed);
            if enabled {
                dev.used[queue].store(true, Ordering::Relaxed);
            }
        }
        let used_any = std::cell::Cell::new(false);
        // Every completion goes through here: in-flight tracking brackets the ring's update.
        let add_used = |state: &mut vhost_user_backend::VringState<_>, head, len| {
            used_any.set(true);
            if let Some(i) = inflight {
                i.completing(head);
            }
            let q = state.get_queue_mut();
            q.add_used(&*mem, head, len)
                .map_err(|e| io::Error::other(format!("add_used: {e}")))?;
            if let Some(i) = inflight {
                i.completed(head, q.next_used());
            }
            Ok::<(), io::Error>(())
        };
        // Completions that must wait for the replica (suspend mode, after a failure).
        let mut held: Vec<executor::Finished> = Vec::new();
        // The in-flight gauge (metrics), kept current during a long turn: a relaxed store to
        // this queue's own counters.
        macro_rules! gauge {
            () => {
                counters
                    .inflight
                    .store((deferred.len() + held.len()) as u64, Ordering::Relaxed)
            };
        }
        // Puts a finished deferred request on the used ring, or aside if the guest must be held.
        macro_rules! done {
            ($f:expr) => {{
                let f: executor::Finished = $f;
                match f.hold {
                    None => add_used(&mut state, f.head, f.used_len)?,
                    Some(_) => held.push(f),
                }
            }};
        }
        // Finishes every deferred request (waiting for each), then puts them on the used ring:
        // all are finished (their ranges released) even if the ring refuses one.
        macro_rules! finish_all {
            () => {{
                let finished: Vec<executor::Finished> = deferred
                    .drain(..)
                    .map(|d| executor::finish_deferred(&mem, mirror, counters, d))
                    .collect();
                for f in finished {
                    done!(f);
                }
            }};
        }
        // Holds the guest on what is set aside, but only once this worker holds no range in the
        // ordering table (resync may need it to clear what the guest waits for).
        macro_rules! settle_holds {
            () => {
                if !held.is_empty() {
                    finish_all!();
                    gauge!();
                    for f in held.drain(..) {
                        let mut len = f.used_len;
                        if let (Some(m), Some(r)) = (mirror, f.hold) {
                            if !m.hold(r) {
                                // Superseded (or stopping while the witness had not answered):
                                // the replica lacks it, and that is never acknowledged.
                                if let Some(addr) = f.status_addr {
                                    let _ = mem.write_obj(VIRTIO_BLK_S_IOERR as u8, addr);
                                }
                                QueueCounters::add(&counters.errors, 1);
                                len = 1;
                            }
                        }
                        add_used(&mut state, f.head, len)?;
                    }
                }
            };
        }
        // Completes every deferred request that is ready (without waiting); how many.
        macro_rules! harvest {
            () => {{
                let mut n = 0usize;
                let mut k = 0;
                while k < deferred.len() {
                    if deferred[k].is_ready(mirror) {
                        let d = deferred.remove(k);
                        done!(executor::finish_deferred(&mem, mirror, counters, d));
                        n += 1;
                    } else {
                        k += 1;
                    }
                }
                if n > 0 {
                    settle_holds!();
                    gauge!();
                }
                n
            }};
        }
        // At most MAX_DEFERRED in flight: completes what is ready, or else waits for the oldest.
        macro_rules! make_room {
            () => {
                if deferred.len() >= MAX_DEFERRED && harvest!() == 0 {
                    let d = deferred.remove(0);
                    done!(executor::finish_deferred(&mem, mirror, counters, d));
                    settle_holds!();
                }
            };
        }
        // Tells the guest about what was put on the used ring (if it wants to hear), and the
        // first time in this connection in any case (`told_guest`).
        let told_guest = &self.told_guest[queue];
        macro_rules! notify_guest {
            () => {
                let wants = used_any.replace(false)
                    && state
                        .get_queue_mut()
                        .needs_notification(&*mem)
                        .map_err(|e| io::Error::other(format!("needs_notification: {e}")))?;
                if wants || !told_guest.load(Ordering::Relaxed) {
                    state.signal_used_queue()?;
                    told_guest.store(true, Ordering::Relaxed);
                }
            };
        }
        let Some(event) = dev.event(queue) else {
            return Err(io::Error::other(format!("queue {queue} was never started")));
        };
        // The in-flight poll counts new requests on the ring as a reason to go round again,
        // unless that once found nothing to take (a ring whose index is off: no busy loop).
        let mut watch_ring = true;
        let mut woke_for_ring = false;
        loop {
            let mut took_any = false;
            // When stopping, take no new requests; the deferred ones are finished below.
            while !stopping() {
                let (capacity, readonly, max_data) = (
                    dev.model.capacity_sectors,
                    dev.model.readonly,
                    dev.model.max_request_bytes(),
                );
                // Requests the last process left in flight first, in the order it took them.
                let (head, parsed) = if let Some(head) = resubmit.pop_front() {
                    let q = state.get_queue();
                    let descs = HeadChain::new(&*mem, GuestAddress(q.desc_table()), q.size(), head);
                    let parsed = request.parse_descs(descs, &*mem, capacity, readonly, max_data);
                    (head, parsed)
                } else {
                    let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem.clone())
                    else {
                        break;
                    };
                    let head = chain.head_index();
                    if let Some(i) = inflight {
                        i.taken(head);
                    }
                    (head, request.parse(chain, capacity, readonly, max_data))
                };
                took_any = true;
                let completion = match (parsed, mirror) {
                    (Ok(()), _) if request.kind() == RequestType::Flush => {
                        // Local fdatasync in the background, the replica's flush on the link;
                        // the requests behind this one go on meanwhile.
                        QueueCounters::add(&counters.flushes, 1);
                        let last = !ring_has_new(state.get_queue(), &mem);
                        let remote = mirror.map(|m| m.start_flush(last));
                        let d = Deferred {
                            head,
                            completion: Completion {
                                status: VIRTIO_BLK_S_OK as u8,
                                used_len: 1,
                            },
                            status_addr: request.status,
                            remote,
                            local_ok: true,
                            flush: Some(dev.flusher.submit()),
                            flush_started: Some(std::time::Instant::now()),
                            large: false,
                        };
                        d.notify_when_ready(mirror, event);
                        deferred.push(d);
                        make_room!();
                        gauge!();
                        continue;
                    }
                    (Ok(()), Some(m)) if request.is_mirrored() => {
                        // Take the range in the ordering table; if another queue holds an
                        // overlapping one, finish our own in-flight requests before waiting.
                        let token = match request.write_range() {
                            Some((off, len)) => Some(match m.try_reserve(queue, off, len) {
                                Some(t) => t,
                                None => {
                                    finish_all!();
                                    settle_holds!();
                                    m.reserve(queue, off, len)
                                }
                            }),
                            None => None,
                        };
                        // The last request at hand goes on the wire from here (no wake-up
                        // of the link's sender); with more behind it, the sender batches.
                        let last = !ring_has_new(state.get_queue(), &mem);
                        let (c, remote) = executor::execute_mirrored(
                            request,
                            &mem,
                            &target,
                            iov,
                            counters,
                            executor::Mirrored {
                                mirror: m,
                                token,
                                direct: last,
                            },
                        );
                        dev.flusher.wrote();
                        match remote {
                            Some((remote, local_ok)) => {
                                let d = Deferred {
                                    head,
                                    completion: c,
                                    status_addr: request.status,
                                    remote: Some(remote),
                                    local_ok,
                                    flush: None,
                                    flush_started: None,
                                    large: request
                                        .write_range()
                                        .is_some_and(|(_, len)| len >= executor::POLL_MAX_BYTES),
                                };
                                d.notify_when_ready(mirror, event);
                                deferred.push(d);
                                make_room!();
                                gauge!();
                                continue;
                            }
                            None => c,
                        }
                    }
                    (Ok(()), _) => {
                        let c = executor::execute(request, &mem, &target, iov, counters);
                        if request.write_range().is_some() {
                            dev.flusher.wrote();
                        }
                        c
                    }
                    (Err(e), _) => {
                        if e.status() == VIRTIO_BLK_S_UNSUPP as u8 {
                            QueueCounters::add(&counters.unsupported, 1);
                            debug!("queue {queue}: {e}");
                        } else {
                            QueueCounters::add(&counters.errors, 1);
                            if let Some(more) = bad_log.tick(std::time::Instant::now()) {
                                let status = if matches!(e, ParseError::NoStatus) {
                                    " (completed without a status byte)"
                                } else {
                                    ""
                                };
                                warn!(
                                    "queue {queue}: bad request {head}: {e}{status} ({more} more \
                                     since the last message; all counted in errors)"
                                );
                            }
                        }
                        executor::complete(&mem, request, e.status(), 0)
                    }
                };
                add_used(&mut state, head, completion.used_len)?;
            }
            if woke_for_ring && !took_any {
                watch_ring = false;
            }
            woke_for_ring = false;
            if deferred.is_empty() {
                break;
            }
            if stopping() {
                // The ring stops (or we do): every deferred request completes now.
                finish_all!();
                settle_holds!();
                break;
            }
            // Nothing new from the guest: complete what is ready. The rest signals this
            // queue's completion event when it finishes, and the worker goes back to its
            // event loop (where a kick or that event brings it back here); it never sleeps on
            // one request. Armed first, then looked at again: a request that finished in
            // between is seen now, one that finishes later signals.
            // Read before looking: a request that finishes after the look changes it.
            let signals = event.count();
            if harvest!() == 0 {
                // --poll-inflight-us: watch the requests in flight and the ring a while
                // before sleeping (a wake-up costs more than the wait on an idle vCPU). The
                // guest hears of what completed so far first.
                // Not while a large write is in flight: its ack is far off, and the spin
                // would take the CPU its copies and encryption need.
                if !dev.poll_inflight.is_zero() && !deferred.iter().any(|d| d.large) {
                    notify_guest!();
                    let start = std::time::Instant::now();
                    let mut hit = false;
                    while start.elapsed() < dev.poll_inflight && !stopping() {
                        if event.count() != signals {
                            hit = true;
                            break;
                        }
                        if watch_ring && ring_has_new(state.get_queue(), &mem) {
                            hit = true;
                            woke_for_ring = true;
                            break;
                        }
                        std::hint::spin_loop();
                    }
                    if hit {
                        continue;
                    }
                }
                event.arm();
                if harvest!() == 0 {
                    break;
                }
            }
            settle_holds!();
        }
        notify_guest!();
        Ok(!deferred.is_empty())
    }
}

/// Finishes deferred requests without a guest to tell (it disconnected, or we stop).
fn drain_deferred(deferred: &mut Vec<Deferred>, mirror: Option<&Mirror>, c: &QueueCounters) {
    for d in deferred.drain(..) {
        executor::finish_detached(mirror, c, d);
    }
}

/// Looks at the in-flight region when the frontend gave a new one (or took it away): on the
/// first turn of a connection that brought one, the requests the last process left in flight
/// are queued to run again and the ring resumes after the ones it took (`inflight_shm.rs`).
fn resume_inflight(
    dev: &Device,
    queue: usize,
    worker: &mut QueueWorker,
    vring: &VringRwLock,
    mem: &GuestMemoryMmap,
) {
    if worker.inflight_epoch == dev.inflight_epoch.load(Ordering::SeqCst) {
        return;
    }
    let (epoch, region) = dev
        .inflight
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    worker.inflight_epoch = epoch;
    worker.inflight = None;
    worker.resubmit.clear();
    let Some(region) = region else {
        return;
    };
    let mut state = vring.get_mut();
    let q = state.get_queue_mut();
    let Some(mut part) = region.queue(queue, q.size()) else {
        warn!(
            "queue {queue}: the in-flight region has no part for a ring of {} entries; \
             requests in flight are not tracked",
            q.size()
        );
        return;
    };
    let used = match q.used_idx(mem, Ordering::Acquire) {
        Ok(u) => u.0,
        Err(e) => {
            warn!("queue {queue}: cannot read the used index ({e}); requests in flight are not tracked");
            return;
        }
    };
    let r = part.recover(used);
    if !r.resubmit.is_empty() || r.next_avail != q.next_avail() {
        log::info!(
            "queue {queue}: {} request(s) left in flight by the last process run again; \
             the ring resumes at {} (used {used}{})",
            r.resubmit.len(),
            r.next_avail,
            if r.cleared_last {
                ", the last completion was done"
            } else {
                ""
            }
        );
    }
    q.set_next_avail(r.next_avail);
    q.set_next_used(used);
    worker.resubmit = r.resubmit.into();
    worker.inflight = Some(part);
}

/// Whether the guest made requests available that the device has not taken yet.
fn ring_has_new(q: &virtio_queue::Queue, mem: &GuestMemoryMmap) -> bool {
    q.avail_idx(mem, std::sync::atomic::Ordering::Acquire)
        .is_ok_and(|avail| avail != std::num::Wrapping(q.next_avail()))
}

impl BlkBackend {
    /// Spins for up to `dev.poll` waiting for the guest to add a request: true if it did.
    /// Saves the wake-up (and its latency) of a sleeping worker when requests follow closely.
    fn poll_ring(&self, vring: &VringRwLock) -> bool {
        let poll = self.dev.poll;
        if poll.is_zero() {
            return false;
        }
        let mem = self.mem.memory();
        let start = std::time::Instant::now();
        while start.elapsed() < poll && self.dev.accepting() {
            if ring_has_new(vring.get_ref().get_queue(), &mem) {
                return true;
            }
            std::hint::spin_loop();
        }
        false
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.dev.model.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.dev.model.queue_size)
    }

    fn features(&self) -> u64 {
        self.dev.model.features()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            // Answered by the relay (frontend.rs, inflight_shm.rs), not by the library.
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = self
            .dev
            .model
            .config_space(self.dev.writeback.load(Ordering::Relaxed));
        read_config(&config, offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only the write-cache-enable byte is writable (VIRTIO_BLK_F_CONFIG_WCE).
        if offset as usize == off::WCE && buf.len() == 1 {
            let wb = buf[0] != 0;
            self.dev.writeback.store(wb, Ordering::Relaxed);
            log::info!(
                "guest set write cache to {}",
                if wb { "writeback" } else { "writethrough" }
            );
            if !wb {
                self.dev
                    .disk
                    .flush()
                    .map_err(|e| io::Error::other(chain(&e)))?;
            }
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("config write of {} bytes at {offset} refused", buf.len()),
            ))
        }
    }

    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        // The daemon updates the GuestMemoryAtomic we were built with; nothing to do.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.dev.model.num_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    /// The frontend stops ring `q` (GET_VRING_BASE): every request the worker deferred
    /// completes first (waiting for it), so the index the frontend gets back covers exactly
    /// the requests it will see completed.
    fn stop_vring(&self, q: u32) -> io::Result<()> {
        match self.vrings.get(q as usize).and_then(|s| s.get()) {
            Some(v) => self.process_queue(q as usize, v, true).map(|_| ()),
            None => Ok(()),
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        // One queue per thread: the vring is vrings[0] and the queue index is the thread's.
        // Only a started, enabled queue has events: its first one starts it.
        if let Err(e) = self.start_queue(thread_id) {
            // The library ends this worker on an error without a word.
            error!("queue {thread_id}: cannot start it: {e}");
            return Err(e);
        }
        let vring = if device_event == completion_event_id(self.dev.events.len()) {
            // Deferred requests finished.
            let Some(ev) = self.dev.event(thread_id) else {
                return Err(io::Error::other(format!("no completion event {thread_id}")));
            };
            ev.consume();
            match vrings.first() {
                Some(v) if v.get_ref().get_queue().ready() && v.get_ref().is_enabled() => v,
                // Stopped (its requests were completed by `stop_vring`) or disabled (they are,
                // at the next kick once enabled, or when it stops).
                _ => return Ok(()),
            }
        } else {
            let Some(vring) = vrings.get(usize::from(device_event)) else {
                return Err(io::Error::other(format!("unknown event {device_event}")));
            };
            vring
        };
        if let Some(slot) = self.vrings.get(thread_id) {
            slot.get_or_init(|| vring.clone());
        }
        let mut pending;
        loop {
            if self.event_idx.load(Ordering::Relaxed) {
                // Disable notifications while draining, re-enable, and drain again if the
                // guest added requests in between (the EVENT_IDX protocol).
                loop {
                    vring
                        .disable_notification()
                        .map_err(|e| io::Error::other(format!("disable_notification: {e}")))?;
                    pending = self.process_queue(thread_id, vring, false)?;
                    if !vring
                        .enable_notification()
                        .map_err(|e| io::Error::other(format!("enable_notification: {e}")))?
                        || !self.dev.accepting()
                    {
                        break;
                    }
                }
            } else {
                pending = self.process_queue(thread_id, vring, false)?;
            }
            // A short poll before sleeping (--poll-us): the next request often comes within
            // microseconds; catching it here saves a wake-up. Not while requests are in
            // flight: their completion event wakes us, and the CPU is better left to the
            // threads finishing them.
            if pending || !self.poll_ring(vring) {
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vhost_user_backend::VhostUserDaemon;
    use vm_memory::Address;

    fn device(num_queues: u16) -> (tempfile::TempDir, Arc<Device>) {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        let disk = Arc::new(RawImage::open(&img, false).unwrap());
        let model = DeviceModel {
            capacity_sectors: disk.size() / 512,
            num_queues,
            queue_size: 256,
            readonly: false,
        };
        let flusher = Flusher::start(disk.clone()).unwrap();
        let dev = Device::new(disk, model, [0; ID_BYTES], None, flusher);
        (d, Arc::new(dev))
    }

    /// A queue the frontend never enables has no buffers and no eventfd; one it enables gets
    /// its event (registered in its own loop) and counts as enabled until it is stopped.
    /// Found by the fresh-clone run once 16 queues became the default: a SIGTERM's `quiesce`
    /// and the departing frontend's `finish_all_deferred` took the workers together, each
    /// got part of them, and both waited for the rest forever (the process never exited).
    #[test]
    fn two_takers_of_every_worker_never_deadlock() {
        let (_d, dev) = device(16);
        for _ in 0..200 {
            let barrier = Arc::new(std::sync::Barrier::new(2));
            let (tx, rx) = std::sync::mpsc::channel();
            for _ in 0..2 {
                let (dev, barrier, tx) = (dev.clone(), barrier.clone(), tx.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    drop(dev.lock_all_drained());
                    let _ = tx.send(());
                });
            }
            for _ in 0..2 {
                rx.recv_timeout(std::time::Duration::from_secs(5))
                    .expect("a taker of every worker is stuck");
            }
        }
    }

    #[test]
    fn queues_cost_nothing_until_enabled() {
        let (_d, dev) = device(16);
        let idle = |dev: &Device, q: usize| {
            dev.event(q).is_none() && dev.workers[q].lock().unwrap().buffer_bytes() == 0
        };
        assert!((0..16).all(|q| idle(&dev, q)));
        assert_eq!(dev.queues_enabled(), 0);

        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = BlkBackend::new(dev.clone(), mem.clone());
        let daemon = VhostUserDaemon::new("test".into(), backend.clone(), mem.clone()).unwrap();
        let loops = daemon.get_epoll_handlers();
        assert_eq!(loops.len(), 16, "one worker thread per offered queue");
        backend.set_event_loops(&loops).unwrap();
        assert!(backend.set_event_loops(&loops).is_err());

        // The frontend starts and enables queue 3: its worker's first event.
        let vring = VringRwLock::new(mem, 256).unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        backend
            .handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 3)
            .unwrap();
        assert!(dev.event(3).is_some());
        assert!((0..16).filter(|&q| q != 3).all(|q| idle(&dev, q)));
        assert_eq!(dev.queues_enabled(), 1);
        // Registered in queue 3's loop already: a second registration is refused.
        let ev = dev.event(3).unwrap();
        assert!(loops[3]
            .register_listener(
                ev.as_raw_fd(),
                EventSet::IN,
                u64::from(completion_event_id(16))
            )
            .is_err());

        // GET_VRING_BASE stops it.
        vring.set_queue_ready(false);
        backend.stop_vring(3).unwrap();
        assert_eq!(dev.queues_enabled(), 0);
        // The disconnect's log line still counts it.
        assert_eq!(dev.queues_used(), 1);
        drop(loops);
        drop(daemon);
        dev.frontend_left();
        assert_eq!(dev.queues_enabled(), 0);
        assert_eq!(dev.queues_used(), 0);
        // The event stays for the next connection (and is registered again there).
        assert!(dev.event(3).is_some());
    }

    /// A guest's split ring of 16 entries in guest memory, the driver's side written by hand
    /// (desc table at 0, avail ring at 0x1000, used ring at 0x2000), and the queue worker's
    /// side as the daemon sets it up for a connection.
    struct Guest {
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        vring: VringRwLock,
        /// The read end of the queue's call eventfd (the guest's interrupt).
        call: std::fs::File,
    }

    const RING: u16 = 16;
    const DESC: GuestAddress = GuestAddress(0);
    const AVAIL: GuestAddress = GuestAddress(0x1000);
    const USED: GuestAddress = GuestAddress(0x2000);

    impl Guest {
        fn new() -> Guest {
            let gm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
            let mem = GuestMemoryAtomic::new(gm);
            let vring = VringRwLock::new(mem.clone(), 256).unwrap();
            // SAFETY: eventfd(2) with constant flags; the result is checked.
            let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
            assert!(fd >= 0);
            // SAFETY: eventfd just returned this descriptor; nothing else owns it.
            let call = std::fs::File::from(unsafe {
                <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
            });
            vring.set_call(Some(call.try_clone().unwrap()));
            Guest { mem, vring, call }
        }

        fn m(&self) -> vm_memory::GuestMemoryLoadGuard<GuestMemoryMmap> {
            self.mem.memory()
        }

        /// A READ of sector `head` in the three descriptors from `head` (header, 512 bytes of
        /// data, status).
        fn read_request(&self, head: u16) {
            use virtio_queue::desc::split::Descriptor as D;
            let m = self.m();
            let h = u64::from(head);
            let hdr = GuestAddress(0x10_0000 + h * 0x1000);
            let mut header = [0u8; 16];
            header[8..16].copy_from_slice(&h.to_le_bytes());
            m.write_slice(&header, hdr).unwrap();
            let descs = [
                D::new(hdr.0, 16, 1, head + 1),
                D::new(0x20_0000 + h * 0x1000, 512, 1 | 2, head + 2),
                D::new(0x30_0000 + h, 1, 2, 0),
            ];
            for (i, d) in descs.into_iter().enumerate() {
                m.write_obj(d, DESC.unchecked_add((h + i as u64) * 16))
                    .unwrap();
            }
            m.write_obj(0xffu8, GuestAddress(0x30_0000 + h)).unwrap();
        }

        /// The guest makes `head` available.
        fn make_available(&self, head: u16) {
            let m = self.m();
            let idx: u16 = m.read_obj(AVAIL.unchecked_add(2)).unwrap();
            let slot = AVAIL.unchecked_add(4 + 2 * u64::from(idx % RING));
            m.write_obj(head, slot).unwrap();
            m.write_obj(idx.wrapping_add(1), AVAIL.unchecked_add(2))
                .unwrap();
        }

        fn used_idx(&self) -> u16 {
            self.m().read_obj(USED.unchecked_add(2)).unwrap()
        }

        /// The used element at ring index `i`: (head, len).
        fn used_elem(&self, i: u16) -> (u32, u32) {
            let at = USED.unchecked_add(4 + 8 * u64::from(i % RING));
            let m = self.m();
            (
                m.read_obj(at).unwrap(),
                m.read_obj(at.unchecked_add(4)).unwrap(),
            )
        }

        /// What a (previous) device did: `head` put on the used ring.
        fn put_used(&self, head: u16, len: u32) {
            let i = self.used_idx();
            let at = USED.unchecked_add(4 + 8 * u64::from(i % RING));
            let m = self.m();
            m.write_obj(u32::from(head), at).unwrap();
            m.write_obj(len, at.unchecked_add(4)).unwrap();
            m.write_obj(i.wrapping_add(1), USED.unchecked_add(2))
                .unwrap();
        }

        /// EVENT_IDX: the guest wants an interrupt once the used index passes `idx`.
        fn set_used_event(&self, idx: u16) {
            let at = AVAIL.unchecked_add(4 + 2 * u64::from(RING));
            self.m().write_obj(idx, at).unwrap();
        }

        /// Whether the guest was interrupted since the last look.
        fn interrupted(&self) -> bool {
            use std::io::Read;
            let mut b = [0u8; 8];
            (&self.call).read_exact(&mut b).is_ok()
        }

        /// The frontend starts the ring for a connection: SET_VRING_BASE with `base` (QEMU
        /// after a disconnect: the used index), SET_VRING_ADDR (the library reads the used
        /// index), enabled.
        fn start_ring(&self, base: u16, event_idx: bool) {
            let v = &self.vring;
            v.set_queue_size(RING);
            v.set_queue_info(DESC.0, AVAIL.0, USED.0).unwrap();
            v.set_queue_event_idx(event_idx);
            v.set_queue_next_avail(base);
            v.set_queue_next_used(self.used_idx());
            v.set_queue_ready(true);
            v.set_enabled(true);
        }
    }

    /// A connection's backend for `dev` on `guest`'s memory, its queues' loops set.
    fn connect(
        dev: &Arc<Device>,
        guest: &Guest,
        event_idx: bool,
    ) -> (BlkBackend, VhostUserDaemon<BlkBackend>) {
        let backend = BlkBackend::new(dev.clone(), guest.mem.clone());
        let daemon =
            VhostUserDaemon::new("test".into(), backend.clone(), guest.mem.clone()).unwrap();
        backend
            .set_event_loops(&daemon.get_epoll_handlers())
            .unwrap();
        backend.set_event_idx(event_idx);
        (backend, daemon)
    }

    /// The killed process took heads 0 and 3 (reads), put 3 on the used ring and died before
    /// it interrupted the guest, which, with EVENT_IDX, asked to be interrupted once the used
    /// index passes 0. The next process runs 0 again: the guest must hear of both, or it waits
    /// forever (no later completion passes its used_event until the index wraps).
    #[test]
    fn a_restart_interrupts_the_guest_for_what_the_killed_process_left_unsignalled() {
        for event_idx in [true, false] {
            let (_d, dev) = device(1);
            let guest = Guest::new();
            guest.read_request(0);
            guest.read_request(3);
            guest.make_available(0);
            guest.make_available(3);
            guest.set_used_event(0);
            let (region, _file) = InflightRegion::create(1, RING).unwrap();
            let region = Arc::new(region);
            {
                // The killed process.
                let mut q = region.queue(0, RING).unwrap();
                q.recover(0);
                q.taken(0);
                q.taken(3);
                q.completing(3);
                guest.put_used(3, 513);
                q.completed(3, 1);
            }
            // The next process: QEMU hands it the region and rewinds the ring to used.
            dev.set_region(Some(region.clone()));
            guest.start_ring(1, event_idx);
            let (backend, _daemon) = connect(&dev, &guest, event_idx);
            backend
                .handle_event(0, EventSet::IN, std::slice::from_ref(&guest.vring), 0)
                .unwrap();
            assert_eq!(guest.used_idx(), 2, "event_idx {event_idx}");
            assert_eq!(guest.used_elem(1), (0, 513), "event_idx {event_idx}");
            assert!(
                guest.interrupted(),
                "event_idx {event_idx}: the guest never hears of its completions"
            );
            assert_eq!(
                region.queue(0, RING).unwrap().recover(2).resubmit,
                Vec::<u16>::new()
            );
        }
    }

    /// The same with nothing left to run (the killed process completed both, told nobody), and
    /// no region (a frontend without in-flight tracking): the first turn tells the guest.
    #[test]
    fn a_restart_with_nothing_to_run_still_interrupts_the_guest() {
        for event_idx in [true, false] {
            let (_d, dev) = device(1);
            let guest = Guest::new();
            guest.read_request(0);
            guest.make_available(0);
            guest.set_used_event(0);
            guest.put_used(0, 513);
            guest.start_ring(1, event_idx);
            let (backend, _daemon) = connect(&dev, &guest, event_idx);
            backend
                .handle_event(0, EventSet::IN, std::slice::from_ref(&guest.vring), 0)
                .unwrap();
            assert_eq!(guest.used_idx(), 1);
            assert!(guest.interrupted(), "event_idx {event_idx}");
            // Later turns interrupt only when there is something new.
            backend
                .handle_event(0, EventSet::IN, std::slice::from_ref(&guest.vring), 0)
                .unwrap();
            assert!(!guest.interrupted(), "event_idx {event_idx}");
        }
    }
}
