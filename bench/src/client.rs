//! The load generator: libblkio's `virtio-blk-vhost-user` driver, i.e. the same virtqueues a
//! guest's virtio-blk driver fills, one thread per queue, completions waited for on the
//! completion eventfd (no busy polling).

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::util::{Ctx, Result, Rng};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
}

/// One workload of the benchmark.
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    /// Name on the command line and in the tables.
    pub name: &'static str,
    pub op: Op,
    /// Request size in bytes.
    pub bs: usize,
    /// Requests in flight per queue (a flush counts as one).
    pub qd: usize,
    /// Sequential (wrapping at the end of the disk) instead of random offsets.
    pub seq: bool,
    /// A flush after every this many writes (0: never).
    pub flush_every: usize,
    /// The flushes are a guest's fsync: a flush is sent once the `flush_every` writes before it
    /// have completed, and the next write once the flush has completed. Such a group (its
    /// writes and their flush) counts as one operation, its latency from the submission of its
    /// first write to the completion of its flush. Without it a flush takes the next free slot
    /// while other writes are in flight, and writes are the operations.
    pub fsync: bool,
    /// Client queues (one thread each); the backend is started with this many queues.
    pub queues: usize,
}

impl Workload {
    /// Whether the table shows MiB/s (large requests) rather than IOPS.
    pub fn shows_bandwidth(&self) -> bool {
        self.bs >= 64 * 1024
    }
}

pub const WORKLOADS: &[Workload] = &[
    Workload {
        name: "randread-4k-qd1",
        op: Op::Read,
        bs: 4096,
        qd: 1,
        seq: false,
        flush_every: 0,
        fsync: false,
        queues: 1,
    },
    Workload {
        name: "randread-4k-qd32",
        op: Op::Read,
        bs: 4096,
        qd: 32,
        seq: false,
        flush_every: 0,
        fsync: false,
        queues: 1,
    },
    Workload {
        name: "randwrite-4k-qd1",
        op: Op::Write,
        bs: 4096,
        qd: 1,
        seq: false,
        flush_every: 0,
        fsync: false,
        queues: 1,
    },
    Workload {
        name: "randwrite-4k-qd32",
        op: Op::Write,
        bs: 4096,
        qd: 32,
        seq: false,
        flush_every: 0,
        fsync: false,
        queues: 1,
    },
    Workload {
        name: "randwrite-4k-qd32-flush32",
        op: Op::Write,
        bs: 4096,
        qd: 32,
        seq: false,
        flush_every: 32,
        fsync: false,
        queues: 1,
    },
    Workload {
        name: "randwrite-4k-qd32-flush8",
        op: Op::Write,
        bs: 4096,
        qd: 32,
        seq: false,
        flush_every: 8,
        fsync: false,
        queues: 1,
    },
    Workload {
        name: "writeflush-4k-qd1",
        op: Op::Write,
        bs: 4096,
        qd: 1,
        seq: false,
        flush_every: 1,
        fsync: true,
        queues: 1,
    },
    Workload {
        name: "seqwrite-1m-qd4",
        op: Op::Write,
        bs: 1 << 20,
        qd: 4,
        seq: true,
        flush_every: 0,
        fsync: false,
        queues: 1,
    },
    Workload {
        name: "randwrite-4k-qd32-2q",
        op: Op::Write,
        bs: 4096,
        qd: 32,
        seq: false,
        flush_every: 0,
        fsync: false,
        queues: 2,
    },
];

pub fn workload(name: &str) -> Option<&'static Workload> {
    WORKLOADS.iter().find(|w| w.name == name)
}

/// What one run measured (all queues together), counting only requests that completed inside
/// the measurement window.
#[derive(Debug, Default)]
pub struct Measure {
    pub secs: f64,
    /// Reads or writes (flushes not included); with `Workload::fsync`, groups of writes and
    /// their flush.
    pub ops: u64,
    pub bytes: u64,
    /// Latency of every counted operation in ns, sorted.
    pub lat_ns: Vec<u32>,
    pub flushes: u64,
    pub flush_lat_ns_sum: u128,
    /// CPU time (utime + stime, clock ticks) of the backend processes during the window.
    pub cpu_ticks: u64,
}

/// A connected, started libblkio instance with one mapped buffer region.
pub struct Client {
    // Field order: the queues must go before the Blkio instance.
    queues: Vec<blkio::Blkioq>,
    _blkio: blkio::Blkio,
    pub capacity: u64,
    region_addr: usize,
    per_queue: usize,
}

const QUEUE_SIZE: i32 = 128;
const IO_TIMEOUT: Duration = Duration::from_secs(20);

fn berr(what: &str) -> impl FnOnce(blkio::Error) -> String + '_ {
    move |e| format!("{what}: {e} ({:?})", e.errno())
}

impl Client {
    /// Connects to `socket` (retrying while the socket refuses or is missing, up to
    /// `connect_timeout`), starts `queues` queues and maps `per_queue` bytes of buffer for each.
    pub fn connect(
        socket: &Path,
        queues: usize,
        per_queue: usize,
        connect_timeout: Duration,
    ) -> Result<Client> {
        let path = socket
            .to_str()
            .ctx(|| format!("socket path {} is not UTF-8", socket.display()))?;
        let deadline = Instant::now() + connect_timeout;
        let mut b = loop {
            let mut b = blkio::Blkio::new("virtio-blk-vhost-user").map_err(berr("blkio new"))?;
            b.set_str("path", path).map_err(berr("set path"))?;
            match b.connect() {
                Ok(()) => break b,
                Err(e)
                    if (e.errno() == blkio::Errno::CONNREFUSED
                        || e.errno() == blkio::Errno::NOENT)
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    return Err(format!(
                        "connecting to {}: {e} ({:?})",
                        socket.display(),
                        e.errno()
                    ))
                }
            }
        };
        let nq = i32::try_from(queues).ctx(|| "queues".to_string())?;
        b.set_i32("num-queues", nq)
            .map_err(berr("set num-queues"))?;
        b.set_i32("queue-size", QUEUE_SIZE)
            .map_err(berr("set queue-size"))?;
        let capacity = b.get_u64("capacity").map_err(berr("get capacity"))?;
        let started = b.start().map_err(berr("blkio start"))?;
        let per_queue = per_queue.div_ceil(1 << 21) << 21;
        let region = b
            .alloc_mem_region(per_queue * queues)
            .map_err(berr("alloc_mem_region"))?;
        b.map_mem_region(&region).map_err(berr("map_mem_region"))?;
        // The payload: random bytes (no zero blocks a backend could treat specially).
        // SAFETY: the region was just allocated for us (addr..addr+len is a live private mapping
        // owned by `b`), and no request uses it yet.
        let mem = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, region.len) };
        Rng::new(0x5eed_b10c).fill(mem);
        Ok(Client {
            queues: started.queues,
            _blkio: b,
            capacity,
            region_addr: region.addr,
            per_queue,
        })
    }

    /// Writes `len` bytes of fresh random data at each of `offs` (`qd` in flight), then flushes.
    pub fn write_offsets(&mut self, offs: &[u64], len: usize, qd: usize, seed: u64) -> Result<()> {
        let qd = qd.clamp(1, self.per_queue / len);
        let q = self.queues.first_mut().ctx(|| "no queue".to_string())?;
        let mut rng = Rng::new(seed);
        let mut free: Vec<usize> = (0..qd).collect();
        let mut completions: Vec<MaybeUninit<blkio::Completion>> =
            (0..qd).map(|_| MaybeUninit::uninit()).collect();
        let mut next = 0usize;
        let mut in_flight = 0usize;
        let flags = blkio::ReqFlags::empty();
        let mut flushed = false;
        loop {
            while next < offs.len() {
                let Some(slot) = free.pop() else { break };
                let p = self.region_addr + slot * len;
                // SAFETY: slot*len..(slot+1)*len lies inside our mapped region (qd*len <=
                // per_queue), and the slot is free: no request in flight uses that memory.
                let b = unsafe { std::slice::from_raw_parts_mut(p as *mut u8, len) };
                rng.fill(b);
                q.write(offs[next], p as *const u8, len, slot, flags);
                next += 1;
                in_flight += 1;
            }
            if next == offs.len() && in_flight == 0 {
                if flushed {
                    return Ok(());
                }
                q.flush(usize::MAX, flags);
                in_flight += 1;
                flushed = true;
            }
            let mut timeout = IO_TIMEOUT;
            let n = q
                .do_io(&mut completions, 1, Some(&mut timeout), None)
                .map_err(berr("do_io"))?;
            for c in &completions[..n] {
                // SAFETY: do_io() initialised the first n completions.
                let c = unsafe { c.assume_init_ref() };
                if c.ret != 0 {
                    return Err(format!(
                        "write/flush failed: {}",
                        std::io::Error::from_raw_os_error(-c.ret)
                    ));
                }
                if c.user_data != usize::MAX {
                    free.push(c.user_data);
                }
                in_flight -= 1;
            }
        }
    }

    /// Runs `wl` for `warmup` + `secs` (one thread per queue); the measurement window is the
    /// last `secs`. `cpu()` (the backends' CPU ticks) is sampled at both ends of the window on
    /// this thread, and `tick()` is called about every 100 ms meanwhile.
    pub fn run(
        &mut self,
        wl: &Workload,
        warmup: Duration,
        secs: Duration,
        cpu: &dyn Fn() -> Result<u64>,
        tick: &mut dyn FnMut(),
    ) -> Result<Measure> {
        if self.queues.len() < wl.queues {
            return Err(format!(
                "{}: client has {} queue(s)",
                wl.name,
                self.queues.len()
            ));
        }
        if wl.qd * wl.bs > self.per_queue {
            return Err(format!("{}: buffer too small", wl.name));
        }
        if wl.fsync && (wl.op != Op::Write || wl.flush_every == 0) {
            return Err(format!(
                "{}: fsync groups need writes and flush_every",
                wl.name
            ));
        }
        let blocks = self.capacity / wl.bs as u64;
        if blocks == 0 {
            return Err(format!("{}: disk smaller than one request", wl.name));
        }
        let t_start = Instant::now() + warmup;
        let t_end = t_start + secs;
        let region = self.region_addr;
        let per_queue = self.per_queue;
        let (results, cpu0, cpu1) = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .queues
                .iter_mut()
                .take(wl.queues)
                .enumerate()
                .map(|(i, q)| {
                    let buf = region + i * per_queue;
                    s.spawn(move || drive(q, buf, wl, blocks, i as u64, t_start, t_end))
                })
                .collect();
            let mut cpu0 = None;
            let mut cpu1 = None;
            loop {
                let now = Instant::now();
                if cpu0.is_none() && now >= t_start {
                    cpu0 = Some(cpu());
                }
                if now >= t_end {
                    cpu1 = Some(cpu());
                    break;
                }
                if handles.iter().all(|h| h.is_finished()) {
                    break;
                }
                let next = if now < t_start { t_start } else { t_end };
                std::thread::sleep((next - now).min(Duration::from_millis(100)));
                if now >= t_start {
                    tick();
                }
            }
            let results: Vec<Result<Measure>> = handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err("client thread panicked".to_string()))
                })
                .collect();
            (results, cpu0, cpu1)
        });
        let mut total = Measure {
            secs: secs.as_secs_f64(),
            ..Measure::default()
        };
        for r in results {
            let m = r?;
            total.ops += m.ops;
            total.bytes += m.bytes;
            total.lat_ns.extend_from_slice(&m.lat_ns);
            total.flushes += m.flushes;
            total.flush_lat_ns_sum += m.flush_lat_ns_sum;
        }
        total.lat_ns.sort_unstable();
        let (Some(c0), Some(c1)) = (cpu0, cpu1) else {
            return Err(format!("{}: the run ended before its window", wl.name));
        };
        total.cpu_ticks = c1?.saturating_sub(c0?);
        Ok(total)
    }
}

#[derive(Clone, Copy)]
enum Slot {
    Free,
    Io(Instant),
    Flush(Instant),
}

/// One queue's loop: keep `qd` requests in flight until `t_end`, then drain.
fn drive(
    q: &mut blkio::Blkioq,
    buf: usize,
    wl: &Workload,
    blocks: u64,
    seed: u64,
    t_start: Instant,
    t_end: Instant,
) -> Result<Measure> {
    let mut rng = Rng::new(0xb1e5_0000 + seed);
    let mut slots = vec![Slot::Free; wl.qd];
    let mut free: Vec<usize> = (0..wl.qd).rev().collect();
    let mut completions: Vec<MaybeUninit<blkio::Completion>> =
        (0..wl.qd).map(|_| MaybeUninit::uninit()).collect();
    let mut in_flight = 0usize;
    let mut cursor = (blocks / 2 * seed) % blocks;
    let mut writes_since_flush = 0usize;
    // fsync mode: the flush of the current group is in flight; the submission of its first write.
    let mut fsync_flush_in_flight = false;
    let mut group_t0 = Instant::now();
    let expected =
        usize::try_from((t_end - t_start).as_secs_f64() as u64 * 300_000 * wl.qd.min(4) as u64)
            .unwrap_or(1 << 20)
            .min(1 << 24);
    let mut m = Measure {
        lat_ns: Vec::with_capacity(expected),
        ..Measure::default()
    };
    let flags = blkio::ReqFlags::empty();
    loop {
        let now = Instant::now();
        if now < t_end {
            while let Some(&slot) = free.last() {
                let flush_due = wl.flush_every > 0 && writes_since_flush >= wl.flush_every;
                if wl.fsync && (fsync_flush_in_flight || (flush_due && in_flight > 0)) {
                    // An fsync: its flush waits for its writes, the next write for the flush.
                    break;
                }
                free.pop();
                if flush_due {
                    writes_since_flush = 0;
                    fsync_flush_in_flight = wl.fsync;
                    q.flush(slot, flags);
                    slots[slot] = Slot::Flush(Instant::now());
                } else {
                    let blk = if wl.seq {
                        let b = cursor;
                        cursor = (cursor + 1) % blocks;
                        b
                    } else {
                        rng.below(blocks)
                    };
                    let off = blk * wl.bs as u64;
                    let p = (buf + slot * wl.bs) as *mut u8;
                    let t0 = Instant::now();
                    match wl.op {
                        Op::Read => q.read(off, p, wl.bs, slot, flags),
                        Op::Write => {
                            if writes_since_flush == 0 {
                                group_t0 = t0;
                            }
                            q.write(off, p, wl.bs, slot, flags);
                            writes_since_flush += 1;
                        }
                    }
                    slots[slot] = Slot::Io(t0);
                }
                in_flight += 1;
            }
        }
        if in_flight == 0 {
            break;
        }
        let mut timeout = IO_TIMEOUT;
        let n = q
            .do_io(&mut completions, 1, Some(&mut timeout), None)
            .map_err(|e| {
                format!(
                    "{}: queue {seed}: do_io: {e} ({:?}); {in_flight} requests in flight \
                     (no completion within {IO_TIMEOUT:?}: backend hung?)",
                    wl.name,
                    e.errno()
                )
            })?;
        let t = Instant::now();
        let counted = t >= t_start && t <= t_end;
        for c in &completions[..n] {
            // SAFETY: do_io() initialised the first n completions.
            let c = unsafe { c.assume_init_ref() };
            let slot = c.user_data;
            let state = slots
                .get(slot)
                .copied()
                .ctx(|| format!("completion for unknown slot {slot}"))?;
            if c.ret != 0 {
                return Err(format!(
                    "{}: request failed with {} ({})",
                    wl.name,
                    c.ret,
                    std::io::Error::from_raw_os_error(-c.ret)
                ));
            }
            match state {
                Slot::Free => return Err(format!("completion for free slot {slot}")),
                Slot::Io(t0) if counted && !wl.fsync => {
                    m.ops += 1;
                    m.bytes += wl.bs as u64;
                    let ns = (t - t0).as_nanos();
                    m.lat_ns.push(u32::try_from(ns).unwrap_or(u32::MAX));
                }
                Slot::Flush(t0) => {
                    if counted {
                        m.flushes += 1;
                        m.flush_lat_ns_sum += (t - t0).as_nanos();
                        if wl.fsync {
                            m.ops += 1;
                            m.bytes += (wl.flush_every * wl.bs) as u64;
                            let ns = (t - group_t0).as_nanos();
                            m.lat_ns.push(u32::try_from(ns).unwrap_or(u32::MAX));
                        }
                    }
                    fsync_flush_in_flight = false;
                }
                _ => {}
            }
            slots[slot] = Slot::Free;
            free.push(slot);
            in_flight -= 1;
        }
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_table_is_consistent() {
        for (i, w) in WORKLOADS.iter().enumerate() {
            assert!(
                WORKLOADS[..i].iter().all(|x| x.name != w.name),
                "{} twice",
                w.name
            );
            assert!(w.qd >= 1 && w.queues >= 1 && w.bs >= 512, "{w:?}");
            if w.fsync {
                assert!(w.op == Op::Write && w.flush_every > 0, "{w:?}");
            }
            if w.flush_every > 0 {
                assert_eq!(w.op, Op::Write, "{w:?}");
            }
            assert_eq!(workload(w.name).map(|x| x.name), Some(w.name));
        }
        let wf = workload("writeflush-4k-qd1").expect("writeflush-4k-qd1");
        assert!(wf.fsync && wf.qd == 1 && wf.flush_every == 1 && wf.bs == 4096);
        let f8 = workload("randwrite-4k-qd32-flush8").expect("randwrite-4k-qd32-flush8");
        assert!(!f8.fsync && f8.qd == 32 && f8.flush_every == 8 && f8.bs == 4096);
    }
}
