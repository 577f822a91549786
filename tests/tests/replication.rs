//! Replication tier: `vhost-mirror serve --peer` against a real `access-node serve` on a loopback
//! port, driven by the blkio client.
//!
//! Every test has its own temp dir, free ports and processes (killed on drop, also when an
//! assertion fails) and a watchdog. The primary image is `primary.img`, the replica
//! `replica.img`, both in the test dir (with their `.meta`/`.bitmap` files beside them).
//!
//! Run: `cargo build --workspace && cargo test -p vhost-mirror-tests --test replication`.
//! `REPL_TEST_LOGS=1` prints both logs of the disk-full test in the middle of the run. Test 8
//! builds a small LD_PRELOAD shim with `cc` (the linker cargo uses anyway).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use mirror_proto::auth::Secret;
use mirror_proto::frame::{self, Frame, HEADER_LEN, MAX_PAYLOAD};
use vhost_mirror_tests::{
    bin_path, check_pattern, check_zeros, classify_block, compare_files, create_image, errno_name,
    fill_pattern, is_in_sync, pattern, pattern_word, read_file_range, run_with_timeout,
    secret_file, status_str, status_u64, wait_in_sync, wait_node_status, wait_status,
    write_file_pattern, AccessNode, AccessNodeOpts, Backend, BackendKind, BackendOpts, Client,
    ClientOpts, ClientQueue, Op, Pair, Watchdog, REGION, TIMEOUT,
};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
const BLOCK: u64 = 4096;
/// Largest request of the random mixes, and the per-slot buffer size.
const MAX_REQ: u64 = 256 * KIB;
/// Bound for reaching "in sync" (the initial full sync of 64 MiB included).
const SYNC_TIMEOUT: Duration = Duration::from_secs(20);

fn usz(x: u64) -> usize {
    usize::try_from(x).expect("usize")
}

fn mirror_opts(port: u16, secret: &Path) -> BackendOpts {
    BackendOpts {
        kind: Some(BackendKind::VhostMirror),
        ..BackendOpts::mirrored(port, secret)
    }
}

fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// Exit status 0 after SIGTERM, or a panic with the log.
fn stop_primary(b: &mut Backend) {
    let st = b.terminate(TIMEOUT);
    assert!(
        st.success(),
        "vhost-mirror exit status after SIGTERM: {st}; log:\n{}",
        b.log()
    );
}

fn stop_node(n: &mut AccessNode) {
    let st = n.terminate(TIMEOUT);
    assert!(
        st.success(),
        "access-node exit status after SIGTERM: {st}; log:\n{}",
        n.log()
    );
}

fn assert_identical(primary: &Path, replica: &Path) {
    compare_files(primary, replica).unwrap_or_else(|e| panic!("images differ: {e}"));
}

// ------------------------------------------------------------------------------------------------
// Random verified writes with a model of the device
// ------------------------------------------------------------------------------------------------

/// xorshift64*: small, seedable, good enough for offsets and sizes.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(pattern_word(seed, 0) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What every 4 KiB block of the device should hold: the pattern of a seed, or zeros (0).
struct Model {
    blocks: Vec<u64>,
    next_seed: u64,
}

impl Model {
    fn new(size: u64, first_seed: u64) -> Model {
        Model {
            blocks: vec![0; usz(size / BLOCK)],
            next_seed: first_seed,
        }
    }
    fn size(&self) -> u64 {
        self.blocks.len() as u64 * BLOCK
    }
    fn seed(&mut self) -> u64 {
        self.next_seed += 1;
        self.next_seed
    }
    fn set(&mut self, off: u64, len: u64, seed: u64) {
        for b in off / BLOCK..(off + len) / BLOCK {
            self.blocks[usz(b)] = seed;
        }
    }
    /// Checks `data` read at device offset `off` (4 KiB aligned) against the model.
    fn check(&self, data: &[u8], off: u64) -> Result<(), String> {
        for (i, blk) in data.chunks(usz(BLOCK)).enumerate() {
            let dev = off + i as u64 * BLOCK;
            match self.blocks[usz(dev / BLOCK)] {
                0 => check_zeros(blk, dev),
                seed => check_pattern(blk, dev, seed),
            }
            .map_err(|e| format!("block {dev:#x} (region {}): {e}", dev / REGION))?;
        }
        Ok(())
    }
    /// Reads the whole device through the client and checks it.
    fn verify_device(&self, q: &mut ClientQueue) -> Result<(), String> {
        let mut off = 0;
        while off < self.size() {
            let n = MIB.min(self.size() - off);
            let data = q.read_range(off, n, usz(MAX_REQ), 4);
            self.check(&data, off)?;
            off += n;
        }
        Ok(())
    }
    /// Checks an image file against the model.
    fn verify_file(&self, path: &Path) -> Result<(), String> {
        let mut off = 0;
        while off < self.size() {
            let n = MIB.min(self.size() - off);
            self.check(&read_file_range(path, off, usz(n)), off)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            off += n;
        }
        Ok(())
    }
}

/// The shape of a random write mix.
#[derive(Clone, Copy)]
struct Mix {
    /// Requests in flight at most (each has a MAX_REQ slot of the queue buffer).
    qd: usize,
    /// Request sizes are 4 KiB << k with k in 0..=max_shift.
    max_shift: u32,
    /// Stop after this many requests (flushes included) ...
    count: Option<usize>,
    /// ... or at this instant.
    until: Option<Instant>,
    /// Every n-th request is a flush (0: none).
    flush_every: usize,
    /// At most one request started per this interval.
    pace: Option<Duration>,
}

#[derive(Clone, Copy, Debug)]
struct WriteEv {
    off: u64,
    len: u64,
    seed: u64,
    submit: Instant,
    done: Instant,
}

#[derive(Clone, Copy, Debug)]
struct FlushEv {
    submit: Instant,
    done: Instant,
}

#[derive(Default)]
struct IoLog {
    writes: Vec<WriteEv>,
    flushes: Vec<FlushEv>,
    errors: Vec<String>,
    max_latency: Duration,
}

enum Pending {
    Write { off: u64, len: u64, seed: u64 },
    Flush,
}

/// Random 4 KiB-aligned writes of random sizes with up to `mix.qd` in flight (never two
/// overlapping ones at once, so the model stays exact), plus flushes. Completed writes are
/// applied to the model; failures are collected in the log.
fn random_writes(
    q: &mut ClientQueue,
    model: &mut Model,
    rng: &mut Rng,
    mix: &Mix,
    log: &mut IoLog,
) {
    assert!(
        mix.qd as u64 * MAX_REQ <= q.buf_len() as u64,
        "queue buffer too small for QD {}",
        mix.qd
    );
    let size = model.size();
    let mut slots: Vec<Option<(Pending, Instant)>> = (0..mix.qd).map(|_| None).collect();
    let mut issued = 0usize;
    let start = Instant::now();
    loop {
        let more = |issued: usize| {
            !matches!(mix.count, Some(c) if issued >= c)
                && !matches!(mix.until, Some(t) if Instant::now() >= t)
        };
        let mut paced = false;
        while more(issued) {
            let Some(slot) = slots.iter().position(Option::is_none) else {
                break;
            };
            if let Some(p) = mix.pace {
                let due = start + p * u32::try_from(issued).expect("u32");
                let now = Instant::now();
                if now < due {
                    if q.in_flight() == 0 {
                        std::thread::sleep(due - now);
                    } else {
                        paced = true;
                        break;
                    }
                }
            }
            let now = Instant::now();
            if mix.flush_every > 0 && issued % mix.flush_every == mix.flush_every - 1 {
                q.submit(Op::Flush, slot);
                slots[slot] = Some((Pending::Flush, now));
            } else {
                let len = BLOCK << rng.below(u64::from(mix.max_shift) + 1);
                let mut off;
                let mut tries = 0;
                loop {
                    off = rng.below((size - len) / BLOCK + 1) * BLOCK;
                    let overlaps = slots.iter().flatten().any(|(p, _)| match p {
                        Pending::Write { off: o, len: l, .. } => off < o + l && *o < off + len,
                        Pending::Flush => false,
                    });
                    tries += 1;
                    if !overlaps || tries > 1000 {
                        assert!(!overlaps, "no free range found");
                        break;
                    }
                }
                let seed = model.seed();
                let bo = slot * usz(MAX_REQ);
                fill_pattern(&mut q.buf()[bo..bo + usz(len)], off, seed);
                q.submit(
                    Op::Write {
                        off,
                        buf_off: bo,
                        len: usz(len),
                    },
                    slot,
                );
                slots[slot] = Some((Pending::Write { off, len, seed }, now));
            }
            issued += 1;
        }
        if q.in_flight() == 0 {
            if more(issued) {
                continue;
            }
            break;
        }
        let done = if paced {
            let d = q.kick();
            if d.is_empty() {
                std::thread::sleep(Duration::from_micros(500));
            }
            d
        } else {
            q.wait(1)
        };
        let now = Instant::now();
        for d in done {
            let (p, submit) = slots[d.user_data]
                .take()
                .expect("completion of a free slot");
            log.max_latency = log.max_latency.max(now - submit);
            match (p, d.result()) {
                (Pending::Write { off, len, seed }, Ok(())) => {
                    model.set(off, len, seed);
                    log.writes.push(WriteEv {
                        off,
                        len,
                        seed,
                        submit,
                        done: now,
                    });
                }
                (Pending::Write { off, len, .. }, Err(e)) => log.errors.push(format!(
                    "write of {len} bytes at {off:#x} failed: {}",
                    errno_name(e)
                )),
                (Pending::Flush, Ok(())) => log.flushes.push(FlushEv { submit, done: now }),
                (Pending::Flush, Err(e)) => {
                    log.errors.push(format!("flush failed: {}", errno_name(e)))
                }
            }
        }
    }
}

/// The regions (64 KiB) touched by `[off, off + len)`.
fn regions_of(off: u64, len: u64) -> std::ops::Range<u64> {
    off / REGION..(off + len).div_ceil(REGION)
}

fn client_opts() -> ClientOpts {
    ClientOpts {
        buf_per_queue: usz(16 * MAX_REQ),
        queue_size: 128,
        ..ClientOpts::default()
    }
}

// ------------------------------------------------------------------------------------------------
// 1. Mirrored random writes
// ------------------------------------------------------------------------------------------------

/// 1. Random verified writes (4 KiB..256 KiB, QD 16, flushes, a discard, a write-zeroes) on a
///    mirrored 64 MiB disk whose replica starts missing: after a clean stop of both sides the
///    two image files are byte-identical.
#[test]
fn mirrored_random_writes_identical() {
    let _wd = Watchdog::new("mirrored_random_writes_identical", Duration::from_secs(120));
    let t0 = Instant::now();
    let size = 64 * MIB;
    let s = Pair::new("mirror-rand", size);
    assert!(!s.replica.exists());
    let mut node = s.node();
    let mut b = s.mirror();
    let st = wait_in_sync(&mut b, SYNC_TIMEOUT);
    assert!(s.replica.exists(), "replica image not created");
    assert_eq!(
        std::fs::metadata(&s.replica).expect("replica").len(),
        size,
        "replica size"
    );
    assert_eq!(
        status_u64(&st, "resync_total_bytes"),
        size,
        "initial full sync copies the whole image once: {}",
        pretty(&st)
    );
    let ns = node.status_json();
    assert_eq!(
        status_str(&ns, "peer_state"),
        "connected",
        "{}",
        pretty(&ns)
    );
    assert_eq!(
        status_str(&ns, "disk_state"),
        "up-to-date",
        "{}",
        pretty(&ns)
    );
    assert_eq!(status_str(&ns, "role"), "secondary", "{}", pretty(&ns));
    eprintln!("initial sync done at {:?}", t0.elapsed());

    let mut c = Client::connect_with(b.socket(), &client_opts());
    let dalign = u64::try_from(
        c.blkio()
            .get_i32("discard-alignment")
            .expect("discard-alignment"),
    )
    .expect(">= 0")
    .max(512);
    let q = c.q();
    let mut model = Model::new(size, 0x1000);
    let mut rng = Rng::new(1);
    let mut log = IoLog::default();
    let mix = Mix {
        qd: 16,
        max_shift: 6,
        count: Some(1500),
        until: None,
        flush_every: 100,
        pace: None,
    };
    let tw = Instant::now();
    random_writes(q, &mut model, &mut rng, &mix, &mut log);
    // A discard and a write-zeroes in the middle of the run.
    let doff = (8 * MIB).next_multiple_of(dalign);
    let dlen = MIB.next_multiple_of(dalign);
    assert_eq!(q.discard(doff, dlen), Ok(()), "discard");
    model.set(doff, dlen, 0);
    assert_eq!(
        q.write_zeroes(20 * MIB + 64 * KIB, 512 * KIB, false),
        Ok(()),
        "write-zeroes"
    );
    model.set(20 * MIB + 64 * KIB, 512 * KIB, 0);
    assert_eq!(
        q.write_zeroes(30 * MIB, 256 * KIB, true),
        Ok(()),
        "write-zeroes (unmap)"
    );
    model.set(30 * MIB, 256 * KIB, 0);
    random_writes(q, &mut model, &mut rng, &mix, &mut log);
    q.flush().expect("final flush");
    let bytes: u64 = log.writes.iter().map(|w| w.len).sum();
    eprintln!(
        "{} writes ({} MiB) and {} flushes in {:?}, max latency {:?}",
        log.writes.len(),
        bytes / MIB,
        log.flushes.len(),
        tw.elapsed(),
        log.max_latency
    );
    assert!(log.errors.is_empty(), "failed requests: {:?}", log.errors);
    model
        .verify_device(q)
        .unwrap_or_else(|e| panic!("read back through vhost-mirror: {e}"));

    let st = b.status_json();
    assert!(
        is_in_sync(&st),
        "not in sync after the run: {}",
        pretty(&st)
    );
    assert_eq!(status_u64(&st, "errors"), 0, "{}", pretty(&st));
    assert_eq!(
        status_u64(&st, "resync_total_bytes"),
        size,
        "a resync ran during the writes: {}",
        pretty(&st)
    );
    let ns = node.status_json();
    assert!(
        status_u64(&ns, "writes") >= log.writes.len() as u64,
        "replica counted fewer writes than the client completed: {}",
        pretty(&ns)
    );

    stop_primary(&mut b);
    drop(c);
    stop_node(&mut node);
    model
        .verify_file(&s.primary)
        .unwrap_or_else(|e| panic!("primary image: {e}"));
    assert_identical(&s.primary, &s.replica);
    eprintln!("total {:?}", t0.elapsed());
}

/// 1b. Guest writes from two queues (overlapping ranges across the queues) while a throttled
///     full sync of a non-empty image runs: no request fails, every 4 KiB block holds the initial
///     data or one whole write, and primary and replica end up byte-identical.
#[test]
fn writes_during_throttled_resync_two_queues() {
    let _wd = Watchdog::new(
        "writes_during_throttled_resync_two_queues",
        Duration::from_secs(120),
    );
    let t0 = Instant::now();
    let size = 64 * MIB;
    let s = Pair::new("mirror-race", size);
    let init = 0x7777;
    write_file_pattern(&s.primary, init);
    let mut node = s.node();
    let mut o = mirror_opts(s.port, &s.secret);
    o.num_queues = Some(2);
    o.extra_args
        .extend(["--resync-rate".to_string(), "32".to_string()]);
    let mut b = Backend::spawn(s.dir.path(), &s.primary, &o);
    let mut c = Client::connect_with(
        b.socket(),
        &ClientOpts {
            num_queues: 2,
            ..client_opts()
        },
    );
    let until = Instant::now() + Duration::from_secs(3);
    let mut resyncing_seen = 0;
    let mut polls = 0;
    let logs: Vec<IoLog> = std::thread::scope(|sc| {
        let handles: Vec<_> = c
            .queues_mut()
            .iter_mut()
            .map(|q| {
                sc.spawn(move || {
                    let i = q.index() as u64;
                    let mut model = Model::new(size, 0x10_0000 * (i + 1));
                    let mut rng = Rng::new(0x1b + i);
                    let mut log = IoLog::default();
                    let mix = Mix {
                        qd: 8,
                        max_shift: 6,
                        count: None,
                        until: Some(until),
                        flush_every: 50,
                        pace: Some(Duration::from_micros(500)),
                    };
                    random_writes(q, &mut model, &mut rng, &mix, &mut log);
                    log
                })
            })
            .collect();
        while Instant::now() < until {
            let st = b.status_json();
            polls += 1;
            if st["resyncing"] == true {
                resyncing_seen += 1;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        handles
            .into_iter()
            .map(|h| h.join().expect("writer thread"))
            .collect()
    });
    for (i, log) in logs.iter().enumerate() {
        eprintln!(
            "queue {i}: {} writes, {} flushes, max latency {:?}",
            log.writes.len(),
            log.flushes.len(),
            log.max_latency
        );
        assert!(log.errors.is_empty(), "queue {i}: {:?}", log.errors);
    }
    eprintln!("resyncing in {resyncing_seen} of {polls} status polls during the writes");
    assert!(
        resyncing_seen > 0,
        "the writes did not overlap the resync (make the resync slower?)"
    );
    let st = wait_in_sync(&mut b, SYNC_TIMEOUT);
    assert_eq!(status_u64(&st, "errors"), 0, "{}", pretty(&st));
    drop(c);
    stop_primary(&mut b);
    stop_node(&mut node);
    assert_identical(&s.primary, &s.replica);
    // Every block holds the initial data or one of the writes that covered it, whole.
    let mut cands: Vec<Vec<u64>> = vec![vec![init]; usz(size / BLOCK)];
    for w in logs.iter().flat_map(|l| l.writes.iter()) {
        for blk in w.off / BLOCK..(w.off + w.len) / BLOCK {
            cands[usz(blk)].push(w.seed);
        }
    }
    let mut off = 0;
    while off < size {
        let data = read_file_range(&s.primary, off, usz(MIB));
        for (i, blk) in data.chunks(usz(BLOCK)).enumerate() {
            let dev = off + i as u64 * BLOCK;
            assert!(
                classify_block(blk, dev, &cands[usz(dev / BLOCK)]).is_some(),
                "block {dev:#x} holds neither the initial data nor any write to it (torn?)"
            );
        }
        off += MIB;
    }
    eprintln!("total {:?}", t0.elapsed());
}

/// The resync yields to the guest: while the guest writes, it copies at about
/// `--resync-min-rate` (1 MiB/s here, one 64 KiB run at a time) and says so in status; once
/// the guest stops, it finishes at full speed. (A 64 MiB full sync runs in well under a second
/// here when nothing yields.)
#[test]
fn the_resync_yields_to_guest_writes() {
    let _wd = Watchdog::new(
        "the_resync_yields_to_guest_writes",
        Duration::from_secs(120),
    );
    let size = 64 * MIB;
    let s = Pair::new("mirror-yield", size);
    write_file_pattern(&s.primary, 0x1e1d);
    let mut o = mirror_opts(s.port, &s.secret);
    o.extra_args
        .extend(["--resync-min-rate".to_string(), "1".to_string()]);
    // The primary starts alone; the guest writes before the replica comes.
    let mut b = Backend::spawn(s.dir.path(), &s.primary, &o);
    let mut c = Client::connect_with(b.socket(), &client_opts());
    let secs = 3;
    let until = Instant::now() + Duration::from_secs(secs);
    let mut node = None;
    let mut yielding_seen = 0;
    let mut resyncing_seen = 0;
    let mut sent_at_end = 0;
    let log = std::thread::scope(|sc| {
        let q = &mut c.queues_mut()[0];
        let h = sc.spawn(move || {
            let mut model = Model::new(size, 0x20_0000);
            let mut rng = Rng::new(0x71e1);
            let mut log = IoLog::default();
            let mix = Mix {
                qd: 1,
                max_shift: 0,
                count: None,
                until: Some(until),
                flush_every: 64,
                pace: Some(Duration::from_micros(200)),
            };
            random_writes(q, &mut model, &mut rng, &mix, &mut log);
            log
        });
        std::thread::sleep(Duration::from_millis(200));
        node = Some(s.node());
        while Instant::now() + Duration::from_millis(150) < until {
            let st = b.status_json();
            if st["resyncing"] == true {
                resyncing_seen += 1;
                if st["resync_yielding"] == true {
                    yielding_seen += 1;
                }
            }
            sent_at_end = status_u64(&st, "resync_sent_bytes");
            std::thread::sleep(Duration::from_millis(100));
        }
        h.join().expect("writer thread")
    });
    assert!(log.errors.is_empty(), "{:?}", log.errors);
    eprintln!(
        "{} writes; resyncing in {resyncing_seen} polls, yielding in {yielding_seen}; {} KiB \
         resynced while the guest wrote",
        log.writes.len(),
        sent_at_end / KIB
    );
    assert!(
        resyncing_seen >= 5 && yielding_seen >= resyncing_seen - 1,
        "the resync did not run, or did not yield, while the guest wrote ({resyncing_seen} \
         polls resyncing, {yielding_seen} yielding)"
    );
    // About 3 MiB; a pause of the writer longer than 20 ms (a loaded machine) lets the resync
    // run at full speed meanwhile. Not yielding at all copies all 64 MiB in under a second.
    assert!(
        sent_at_end <= 24 * MIB,
        "the resync sent {} KiB in under {secs} s of guest writes at --resync-min-rate 1",
        sent_at_end / KIB
    );
    let t = Instant::now();
    let st = wait_in_sync(&mut b, SYNC_TIMEOUT);
    eprintln!("in sync {:?} after the guest stopped", t.elapsed());
    assert_eq!(st["resync_yielding"], false, "{}", pretty(&st));
    drop(c);
    stop_primary(&mut b);
    if let Some(mut n) = node {
        stop_node(&mut n);
    }
    assert_identical(&s.primary, &s.replica);
}

// ------------------------------------------------------------------------------------------------
// 2. Replica killed and restarted under load
// ------------------------------------------------------------------------------------------------

/// 2. A client writes continuously (QD 8, with flushes) for ~6 s; after ~1 s the access node is
///    SIGKILLed, after ~3 s restarted on the same image and port. No request fails (degrade),
///    status shows the gap, the partial resync copies no more than the regions written from the
///    last flush before the kill until the node was back, and the images end up identical.
#[test]
fn replica_killed_and_restarted_under_load() {
    let _wd = Watchdog::new(
        "replica_killed_and_restarted_under_load",
        Duration::from_secs(120),
    );
    let t0 = Instant::now();
    let size = 64 * MIB;
    let s = Pair::new("mirror-kill", size);
    let mut node = s.node();
    let mut b = s.mirror();
    let st = wait_in_sync(&mut b, SYNC_TIMEOUT);
    let resync_before = status_u64(&st, "resync_total_bytes");

    let sock = b.socket().to_path_buf();
    let run_for = Duration::from_secs(6);
    let writer = std::thread::spawn(move || {
        let mut c = Client::connect_with(&sock, &client_opts());
        let q = c.q();
        let mut model = Model::new(size, 0x2000);
        let mut rng = Rng::new(2);
        let mut log = IoLog::default();
        // First a flush: what the initial sync sent is durable on the replica.
        let f0 = Instant::now();
        match q.flush() {
            Ok(()) => log.flushes.push(FlushEv {
                submit: f0,
                done: Instant::now(),
            }),
            Err(e) => log.errors.push(format!("first flush: {}", errno_name(e))),
        }
        let mix = Mix {
            qd: 8,
            max_shift: 4,
            count: None,
            until: Some(Instant::now() + run_for),
            flush_every: 16,
            pace: Some(Duration::from_millis(8)),
        };
        random_writes(q, &mut model, &mut rng, &mix, &mut log);
        let verified = model.verify_device(q);
        (model, log, verified)
    });

    std::thread::sleep(Duration::from_secs(1));
    let t_kill = Instant::now();
    node.kill();
    // (time since the kill, peer_state) while the node is down.
    let mut polls: Vec<(Duration, String)> = Vec::new();
    while t_kill.elapsed() < Duration::from_secs(2) {
        let st = b.status_json();
        polls.push((t_kill.elapsed(), status_str(&st, "peer_state").to_string()));
        std::thread::sleep(Duration::from_millis(50));
    }
    let states: BTreeSet<&str> = polls.iter().map(|(_, s)| s.as_str()).collect();
    let detected = polls
        .iter()
        .find(|(_, s)| s != "connected")
        .map(|(t, _)| *t);
    eprintln!("the link loss showed in status {detected:?} after the kill");
    let t_restart = Instant::now();
    let mut node = s.node();
    let st = wait_status(&mut b, TIMEOUT, |v| {
        status_str(v, "peer_state") == "connected"
    })
    .unwrap_or_else(|v| panic!("not reconnected within {TIMEOUT:?}: {}", pretty(&v)));
    let t_connected = Instant::now();
    eprintln!(
        "kill at {:?}, restart at {:?}, connected at {:?}; states in the gap: {states:?}; \
         at reconnect: out_of_sync {} resyncing {}",
        t_kill - t0,
        t_restart - t0,
        t_connected - t0,
        st["out_of_sync_bytes"],
        st["resyncing"]
    );
    let (model, log, verified) = writer.join().expect("writer thread");
    let st = wait_in_sync(&mut b, SYNC_TIMEOUT);
    assert!(
        states.contains("disconnected"),
        "status never said disconnected while the node was down: {states:?}"
    );
    // The loss takes a moment to notice (the first poll may race with it), not more.
    let late: Vec<_> = polls
        .iter()
        .filter(|(t, s)| s == "connected" && *t > Duration::from_millis(500))
        .collect();
    assert!(
        late.is_empty(),
        "status still said connected more than 500 ms after the node was killed: {late:?}"
    );
    assert!(
        log.errors.is_empty(),
        "client requests failed: {:?}",
        log.errors
    );
    verified.unwrap_or_else(|e| panic!("read back through vhost-mirror: {e}"));
    let in_gap = log
        .writes
        .iter()
        .filter(|w| w.submit > t_kill + Duration::from_millis(200) && w.done < t_restart)
        .count();
    eprintln!(
        "{} writes, {} flushes, {in_gap} writes completed while the node was down, max latency {:?}",
        log.writes.len(),
        log.flushes.len(),
        log.max_latency
    );
    assert!(
        in_gap > 10,
        "the guest was stalled while the node was down ({in_gap} writes)"
    );
    assert_eq!(status_u64(&st, "errors"), 0, "{}", pretty(&st));

    // The regions the replica may lack: every write completed after the last flush that the
    // client saw complete before the kill was submitted, up to the moment the node was back.
    let window_start = log
        .flushes
        .iter()
        .filter(|f| f.done < t_kill)
        .map(|f| f.submit)
        .max()
        .expect("a flush completed before the kill");
    let mut regions = BTreeSet::new();
    for w in &log.writes {
        if w.done >= window_start && w.submit <= t_connected {
            regions.extend(regions_of(w.off, w.len));
        }
    }
    let bound = regions.len() as u64 * REGION;
    let resynced = status_u64(&st, "resync_total_bytes") - resync_before;
    eprintln!(
        "resync copied {} KiB; regions written from {:?} before the kill until reconnect: {} ({} KiB)",
        resynced / KIB,
        t_kill - window_start,
        regions.len(),
        bound / KIB
    );
    assert!(resynced > 0, "no resync after the gap: {}", pretty(&st));
    assert!(
        resynced <= bound,
        "resync copied {resynced} bytes, more than the {bound} bytes of the {} regions written \
         around the gap (a full resync would be {size})",
        regions.len()
    );

    stop_primary(&mut b);
    stop_node(&mut node);
    model
        .verify_file(&s.primary)
        .unwrap_or_else(|e| panic!("primary image: {e}"));
    assert_identical(&s.primary, &s.replica);
    eprintln!("total {:?}", t0.elapsed());
}

// ------------------------------------------------------------------------------------------------
// 3. Primary restarted while the peer is away
// ------------------------------------------------------------------------------------------------

/// 3. In sync; the node is killed; 10 regions are written; the bitmap (10 regions) survives a
///    restart of vhost-mirror; once the node is back exactly those 10 regions are copied.
#[test]
fn primary_restarted_while_peer_away() {
    let _wd = Watchdog::new(
        "primary_restarted_while_peer_away",
        Duration::from_secs(120),
    );
    let t0 = Instant::now();
    let size = 64 * MIB;
    let s = Pair::new("mirror-restart", size);
    let mut node = s.node();
    let mut b = s.mirror();
    wait_in_sync(&mut b, SYNC_TIMEOUT);

    node.kill();
    wait_status(&mut b, TIMEOUT, |v| {
        status_str(v, "peer_state") == "disconnected"
    })
    .unwrap_or_else(|v| panic!("peer not disconnected after the kill: {}", pretty(&v)));
    let st = b.status_json();
    let oos_after_kill = status_u64(&st, "out_of_sync_bytes");

    let seed = 0x3003;
    let offs: Vec<u64> = (0..10u64).map(|i| (3 + i * 97) * REGION).collect();
    {
        let mut c = Client::connect_with(b.socket(), &client_opts());
        let q = c.q();
        for &off in &offs {
            assert_eq!(
                q.write(off, &pattern(off, usz(REGION), seed)),
                Ok(()),
                "write {off:#x}"
            );
        }
        assert_eq!(q.flush(), Ok(()), "flush");
    }
    let st = b.status_json();
    let want = 10 * REGION;
    assert_eq!(
        oos_after_kill,
        0,
        "the kill alone made {oos_after_kill} bytes out of sync (nothing was written since the \
         replica acknowledged the initial sync); status after the writes:\n{}",
        pretty(&st)
    );
    assert_eq!(
        status_u64(&st, "out_of_sync_bytes"),
        want,
        "out of sync after writing 10 regions: {}",
        pretty(&st)
    );
    let generation = status_u64(&st, "generation");

    stop_primary(&mut b);
    let mut b = s.mirror();
    let st = b.status_json();
    assert_eq!(
        status_u64(&st, "out_of_sync_bytes"),
        want,
        "bitmap after restarting vhost-mirror: {}",
        pretty(&st)
    );
    assert_eq!(
        status_u64(&st, "generation"),
        generation,
        "generation after restart: {}",
        pretty(&st)
    );
    assert_ne!(
        status_str(&st, "peer_state"),
        "connected",
        "{}",
        pretty(&st)
    );

    let mut node = s.node();
    let st = wait_in_sync(&mut b, SYNC_TIMEOUT);
    assert_eq!(
        status_u64(&st, "resync_total_bytes"),
        want,
        "the resync after the restart copied another amount than the 10 regions: {}",
        pretty(&st)
    );
    {
        let mut c = Client::connect_with(b.socket(), &client_opts());
        for &off in &offs {
            let d = c.q().read(off, usz(REGION)).expect("read");
            check_pattern(&d, off, seed).unwrap_or_else(|e| panic!("read back: {e}"));
        }
    }
    stop_primary(&mut b);
    stop_node(&mut node);
    for &off in &offs {
        check_pattern(&read_file_range(&s.replica, off, usz(REGION)), off, seed)
            .unwrap_or_else(|e| panic!("replica image: {e}"));
    }
    assert_identical(&s.primary, &s.replica);
    eprintln!("total {:?}", t0.elapsed());
}

/// A partial resync sends only the blocks that differ.
/// (a) Writes made while the replica was away, by this vhost-mirror: exactly their blocks
///     travel, without comparing (4 KiB into each of 15 regions: 60 KiB, not 15 x 64 KiB).
/// (b) The same after a restart of vhost-mirror (which blocks changed is not known any more):
///     block hashes are compared, the 10 changed blocks travel (40 KiB), the 5 regions
///     rewritten with what both sides held travel not at all.
/// Both images are identical afterwards.
#[test]
fn a_partial_resync_sends_only_the_blocks_that_differ() {
    let _wd = Watchdog::new(
        "a_partial_resync_sends_only_the_blocks_that_differ",
        Duration::from_secs(180),
    );
    let size = 64 * MIB;
    let s = Pair::new("mirror-csums", size);
    let mut node = s.node();
    let mut b = s.mirror();
    wait_in_sync(&mut b, SYNC_TIMEOUT);
    let block = 4096u64;
    let regions = 15 * REGION;
    for (round, restart) in [(0u64, false), (1, true)] {
        node.kill();
        wait_status(&mut b, TIMEOUT, |v| {
            status_str(v, "peer_state") == "disconnected"
        })
        .unwrap_or_else(|v| panic!("peer not disconnected after the kill: {}", pretty(&v)));
        let seed = 0x5005 + round;
        let changed: Vec<u64> = (0..10u64)
            .map(|i| (3 + i * 97 + round) * REGION + 2 * block)
            .collect();
        let same: Vec<u64> = (0..5u64)
            .map(|i| (50 + i * 101 + round) * REGION + block)
            .collect();
        {
            let mut c = Client::connect_with(b.socket(), &client_opts());
            let q = c.q();
            for &off in &changed {
                assert_eq!(
                    q.write(off, &pattern(off, usz(block), seed)),
                    Ok(()),
                    "write {off:#x}"
                );
            }
            for &off in &same {
                assert_eq!(
                    q.write(off, &vec![0u8; usz(block)]),
                    Ok(()),
                    "write {off:#x}"
                );
            }
            assert_eq!(q.flush(), Ok(()), "flush");
        }
        let st = b.status_json();
        assert_eq!(
            status_u64(&st, "out_of_sync_bytes"),
            regions,
            "out of sync after writing into 15 regions: {}",
            pretty(&st)
        );
        if restart {
            stop_primary(&mut b);
            b = s.mirror();
        }
        let st = b.status_json();
        let sent0 = status_u64(&st, "resync_sent_bytes");
        let same0 = status_u64(&st, "resync_same_bytes");
        let total0 = status_u64(&st, "resync_total_bytes");
        node = s.node();
        let st = wait_in_sync(&mut b, SYNC_TIMEOUT);
        let sent = status_u64(&st, "resync_sent_bytes") - sent0;
        let same_bytes = status_u64(&st, "resync_same_bytes") - same0;
        let hashed = status_u64(&node.status_json(), "bytes_hashed");
        assert_eq!(
            status_u64(&st, "resync_total_bytes") - total0,
            regions,
            "round {round}: the resync covered another amount than the 15 regions: {}",
            pretty(&st)
        );
        if restart {
            assert_eq!(
                sent,
                10 * block,
                "round {round}: sent {sent} bytes: {}",
                pretty(&st)
            );
            assert_eq!(
                same_bytes,
                regions - 10 * block,
                "round {round}: bytes found equal by their hashes: {}",
                pretty(&st)
            );
            assert!(
                hashed >= regions,
                "round {round}: the replica hashed {hashed} bytes"
            );
        } else {
            assert_eq!(
                sent,
                15 * block,
                "round {round}: sent {sent} bytes: {}",
                pretty(&st)
            );
            assert_eq!(same_bytes, 0, "round {round}: {}", pretty(&st));
            assert_eq!(
                hashed, 0,
                "round {round}: known blocks were compared anyway"
            );
        }
        for &off in &changed {
            check_pattern(&read_file_range(&s.replica, off, usz(block)), off, seed)
                .unwrap_or_else(|e| panic!("round {round}: replica image: {e}"));
        }
    }
    stop_primary(&mut b);
    stop_node(&mut node);
    assert_identical(&s.primary, &s.replica);
}

/// `vhost-mirror verify` against `b`'s control socket: exit code and stdout.
fn run_verify(b: &Backend, extra: &[&str]) -> (Option<i32>, String) {
    let out = b.control_cmd("verify", extra, Duration::from_secs(60));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// Flips one byte of the replica's image behind access-node's back (as a failing disk would).
fn corrupt(replica: &Path, off: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(replica)
        .expect("open replica");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off).expect("read");
    b[0] ^= 0x5a;
    f.write_all_at(&b, off).expect("write");
}

/// Online verify: no false positive while 4k writes at QD16 hit the device (3 runs); blocks
/// corrupted behind the replica's back are found (exit 1), marked out of sync and resynced
/// (only those blocks travel; `--repair` waits for it); without a replica it cannot run
/// (exit 2); the last result is in status and survives a restart.
#[test]
fn verify_finds_corruption_without_false_positives() {
    let _wd = Watchdog::new(
        "verify_finds_corruption_without_false_positives",
        Duration::from_secs(240),
    );
    let size = 64 * MIB;
    let s = Pair::new("mirror-verify", size);
    let mut node = s.node();
    let mut b = s.mirror();
    wait_in_sync(&mut b, SYNC_TIMEOUT);

    // 1. Under load (4k random writes, QD32): identical every time. VERIFY_ROUNDS (default 3;
    //    `ci/verify-soak.sh --rounds N` runs more) verify runs.
    let rounds: u64 = std::env::var("VERIFY_ROUNDS")
        .ok()
        .map(|v| v.parse().expect("VERIFY_ROUNDS: a number"))
        .unwrap_or(3);
    let opts = ClientOpts {
        buf_per_queue: usz(32 * MAX_REQ),
        ..client_opts()
    };
    let mut load_writes = 0;
    for round in 0..rounds {
        let mut c = Client::connect_with(b.socket(), &opts);
        let (code, text) = std::thread::scope(|sc| {
            let v = sc.spawn(|| run_verify(&b, &["--json"]));
            let mut model = Model::new(size, 0x7000 + round * 1000);
            let mut rng = Rng::new(0x77 + round);
            let mut log = IoLog::default();
            while !v.is_finished() {
                let mix = Mix {
                    qd: 32,
                    max_shift: 0,
                    count: Some(2000),
                    until: None,
                    flush_every: 0,
                    pace: None,
                };
                random_writes(c.q(), &mut model, &mut rng, &mix, &mut log);
            }
            assert!(log.errors.is_empty(), "write errors: {:?}", log.errors);
            assert!(log.writes.len() >= 2000, "the load did not run");
            load_writes += log.writes.len();
            v.join().expect("verify thread")
        });
        assert_eq!(code, Some(0), "verify under load, round {round}: {text}");
        assert!(text.contains("\"differences\": 0"), "{text}");
    }
    eprintln!("{rounds} verify runs under {load_writes} writes at QD32: 0 differences");

    // 2. Two corrupted blocks: found, marked, resynced (only those blocks travel).
    let sent0 = status_u64(&b.status_json(), "resync_sent_bytes");
    let bad = [5 * MIB + 4096 + 17, 40 * MIB + 3];
    for &o in &bad {
        corrupt(&s.replica, o);
    }
    let (code, text) = run_verify(&b, &["--json"]);
    assert_eq!(code, Some(1), "verify after corrupting 2 blocks: {text}");
    let v: serde_json::Value = serde_json::from_str(text.trim()).expect("verify --json output");
    assert_eq!(v["different_bytes"], 2 * BLOCK, "{text}");
    assert_eq!(v["ranges"][0][0], bad[0] / BLOCK * BLOCK, "{text}");
    assert_eq!(v["ranges"][1][0], bad[1] / BLOCK * BLOCK, "{text}");
    let st = wait_in_sync(&mut b, SYNC_TIMEOUT);
    assert_eq!(
        st["verify_last"]["different_bytes"],
        2 * BLOCK,
        "{}",
        pretty(&st)
    );
    assert_eq!(
        status_u64(&st, "resync_sent_bytes") - sent0,
        2 * BLOCK,
        "the repair sent more than the 2 blocks: {}",
        pretty(&st)
    );
    for &o in &bad {
        let a = read_file_range(&s.primary, o / BLOCK * BLOCK, usz(BLOCK));
        let r = read_file_range(&s.replica, o / BLOCK * BLOCK, usz(BLOCK));
        assert!(a == r, "block at {o:#x} not repaired");
    }

    // 3. --repair returns once the resync is done; a second run finds nothing.
    corrupt(&s.replica, 33 * MIB + 100);
    let (code, text) = run_verify(&b, &["--repair", "--json"]);
    assert_eq!(
        code,
        Some(1),
        "verify --repair after corrupting 1 block: {text}"
    );
    let v: serde_json::Value = serde_json::from_str(text.trim()).expect("verify --json output");
    assert_eq!(v["repaired"], true, "{text}");
    let (code, text) = run_verify(&b, &[]);
    assert_eq!(code, Some(0), "verify after the repair: {text}");

    // Without a replica: could not run.
    stop_node(&mut node);
    wait_status(&mut b, TIMEOUT, |v| {
        status_str(v, "peer_state") != "connected"
    })
    .unwrap_or_else(|v| panic!("still connected: {}", pretty(&v)));
    let (code, text) = run_verify(&b, &[]);
    assert_eq!(code, Some(2), "verify without a replica: {text}");
    assert!(text.contains("not connected"), "{text}");
    let mut node = s.node();
    wait_in_sync(&mut b, SYNC_TIMEOUT);

    // 4. The last result survives a restart.
    stop_primary(&mut b);
    let b = s.mirror();
    let st = b.status_json();
    assert_eq!(st["verify_last"]["differences"], 0, "{}", pretty(&st));
    assert_eq!(st["verify_last"]["length"], size, "{}", pretty(&st));
    drop(b);
    stop_node(&mut node);
    assert_identical(&s.primary, &s.replica);
}

// ------------------------------------------------------------------------------------------------
// 4. Wrong secret, no secret, wrong size
// ------------------------------------------------------------------------------------------------

/// 4. (a) Different secrets: both sides say auth-failed, the replica image is not created.
///    (b) --peer without --secret-file: exit non-zero, naming --secret-file.
///    (c) A replica image of another size: both sides say refused with both sizes in the
///    reason; the replica file is untouched.
#[test]
fn wrong_secret_no_secret_wrong_size_refused() {
    let _wd = Watchdog::new(
        "wrong_secret_no_secret_wrong_size_refused",
        Duration::from_secs(120),
    );
    let t0 = Instant::now();
    let size = 64 * MIB;

    // (a) wrong secret.
    {
        let s = Pair::new("mirror-auth", size);
        let other = secret_file(s.dir.path(), "another secret, long enough\n");
        let mut node = AccessNode::spawn(
            s.dir.path(),
            &s.replica,
            s.port,
            &other,
            &AccessNodeOpts::default(),
        );
        let mut b = s.mirror();
        let st = wait_status(&mut b, TIMEOUT, |v| {
            status_str(v, "peer_state") == "auth-failed" && !status_str(v, "peer_reason").is_empty()
        })
        .unwrap_or_else(|v| panic!("(a) vhost-mirror status: {}", pretty(&v)));
        eprintln!("(a) vhost-mirror: {}", st["peer_reason"]);
        // The node counts failed handshakes apart from its peer state (anyone can connect).
        let ns = wait_node_status(&mut node, TIMEOUT, |v| {
            v["handshake_failures"].as_u64().unwrap_or(0) >= 1
        })
        .unwrap_or_else(|v| panic!("(a) access-node status: {}", pretty(&v)));
        eprintln!("(a) access-node: {}", ns["last_handshake_failure"]);
        assert!(
            status_str(&ns, "last_handshake_failure").contains("authentication failed"),
            "(a) access-node gives no reason: {}",
            pretty(&ns)
        );
        assert_eq!(
            status_str(&ns, "peer_state"),
            "disconnected",
            "{}",
            pretty(&ns)
        );
        // A few more attempts (backoff), then still nothing created, and the guest is served.
        let mut c = Client::connect(b.socket());
        c.q()
            .write(0, &pattern(0, 4096, 1))
            .expect("(a) write without a replica");
        std::thread::sleep(Duration::from_millis(3500));
        let st = b.status_json();
        assert_eq!(
            status_str(&st, "peer_state"),
            "auth-failed",
            "{}",
            pretty(&st)
        );
        assert!(
            !s.replica.exists(),
            "(a) replica image created despite the wrong secret"
        );
        let meta = PathBuf::from(format!("{}.meta", s.replica.display()));
        assert!(
            !meta.exists(),
            "(a) replica metadata created despite the wrong secret"
        );
        drop(c);
        stop_primary(&mut b);
        stop_node(&mut node);
    }

    // (b) --peer without --secret-file.
    {
        let s = Pair::new("mirror-nosecret", size);
        let out = run_with_timeout(
            Command::new(bin_path("vhost-mirror"))
                .arg("serve")
                .arg("--image")
                .arg(&s.primary)
                .arg("--socket")
                .arg(s.dir.path().join("v.sock"))
                .arg("--peer")
                .arg(format!("127.0.0.1:{}", s.port)),
            TIMEOUT,
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "(b) exit status {}", out.status);
        assert!(
            stderr.contains("--secret-file"),
            "(b) message does not name --secret-file: {stderr}"
        );
        assert!(
            !s.dir.path().join("v.sock").exists(),
            "(b) socket created anyway"
        );
        eprintln!("(b) {}", stderr.trim());
    }

    // (c) replica image of another size.
    {
        let s = Pair::new("mirror-size", size);
        let rsize = 32 * MIB;
        create_image(&s.replica, rsize);
        write_file_pattern(&s.replica, 0xC0C0);
        let mtime = std::fs::metadata(&s.replica)
            .expect("replica")
            .modified()
            .expect("mtime");
        let mut node = s.node();
        let mut b = s.mirror();
        let mentions_sizes = |r: &str| {
            (r.contains(&size.to_string()) || r.contains("64 MiB") || r.contains("64.0 MiB"))
                && (r.contains(&rsize.to_string())
                    || r.contains("32 MiB")
                    || r.contains("32.0 MiB"))
        };
        let st = wait_status(&mut b, TIMEOUT, |v| {
            status_str(v, "peer_state") == "refused"
        })
        .unwrap_or_else(|v| panic!("(c) vhost-mirror status: {}", pretty(&v)));
        let reason = status_str(&st, "peer_reason");
        eprintln!("(c) vhost-mirror: {reason}");
        assert!(
            mentions_sizes(reason),
            "(c) vhost-mirror's reason lacks the sizes: {}",
            pretty(&st)
        );
        let ns = wait_node_status(&mut node, TIMEOUT, |v| {
            status_str(v, "peer_state") == "refused"
        })
        .unwrap_or_else(|v| panic!("(c) access-node status: {}", pretty(&v)));
        let reason = status_str(&ns, "peer_reason");
        eprintln!("(c) access-node: {reason}");
        assert!(
            mentions_sizes(reason),
            "(c) access-node's reason lacks the sizes: {}",
            pretty(&ns)
        );
        std::thread::sleep(Duration::from_millis(500));
        stop_primary(&mut b);
        stop_node(&mut node);
        let m = std::fs::metadata(&s.replica).expect("replica");
        assert_eq!(m.len(), rsize, "(c) replica size changed");
        assert_eq!(
            m.modified().expect("mtime"),
            mtime,
            "(c) replica mtime changed"
        );
        let mut off = 0;
        while off < rsize {
            check_pattern(&read_file_range(&s.replica, off, usz(MIB)), off, 0xC0C0)
                .unwrap_or_else(|e| panic!("(c) replica content changed: {e}"));
            off += MIB;
        }
    }
    eprintln!("total {:?}", t0.elapsed());
}

// ------------------------------------------------------------------------------------------------
// 5. Garbage to every listener
// ------------------------------------------------------------------------------------------------

/// CRC32C (Castagnoli), bitwise: checked against a header made by `mirror_proto::frame`.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn encoded(f: &Frame<'_>) -> Vec<u8> {
    let mut v = Vec::new();
    frame::encode(1, f, &mut v);
    assert_eq!(
        crc32c(&v[..20]).to_le_bytes(),
        v[20..24],
        "test CRC32C disagrees with mirror_proto's header CRC"
    );
    v
}

/// A header (of a NoiseInit) with payload length `len`, version `version`, and a valid CRC.
fn header_with(len: u32, version: u8) -> Vec<u8> {
    let mut h = encoded(&Frame::NoiseInit { msg: [7; 56] });
    h.truncate(HEADER_LEN);
    h[4] = version;
    h[16..20].copy_from_slice(&len.to_le_bytes());
    let crc = crc32c(&h[..20]);
    h[20..24].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Reads until the peer closes (EOF or reset); panics if it is still open after `within`.
/// Returns what was received.
fn expect_closed(s: &mut TcpStream, what: &str, within: Duration) -> Vec<u8> {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = within.saturating_sub(start.elapsed());
        assert!(
            !left.is_zero(),
            "{what}: connection still open after {within:?}"
        );
        s.set_read_timeout(Some(left)).expect("timeout");
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                panic!("{what}: connection still open after {within:?}")
            }
            Err(e) => panic!("{what}: read: {e}"),
        }
    }
}

/// The first frame in `bytes`, as (kind name, refuse code/reason if a Refuse).
fn first_frame(bytes: &[u8]) -> Option<String> {
    match frame::decode(bytes) {
        Ok(Some(d)) => Some(match d.frame {
            Frame::Refuse { code, reason } => format!("Refuse({code:?}, {reason:?})"),
            f => f.name().to_string(),
        }),
        _ => None,
    }
}

/// Sends each kind of garbage to the node's port; each connection must be closed by the node
/// within a few seconds, and the node must keep running.
fn garbage_to_node(node: &mut AccessNode, attached: bool) {
    let mut junk = pattern(0, 1024, 0x6A);
    junk.truncate(1000);
    let hello = encoded(&Frame::NoiseInit { msg: [1; 56] });
    let mut bad_crc = hello.clone();
    bad_crc[21] ^= 0x55;
    let attach_first = {
        let mut h = encoded(&Frame::Goodbye);
        h[5] = 6; // kind Attach (PROTOCOL.md)
        let crc = crc32c(&h[..20]);
        h[20..24].copy_from_slice(&crc.to_le_bytes());
        h
    };
    let within = Duration::from_secs(3);
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("connect and close", vec![], true),
        ("random garbage", junk.clone(), false),
        (
            "truncated NoiseInit, then half-close",
            hello[..30].to_vec(),
            true,
        ),
        (
            "header announcing MAX_PAYLOAD+1 bytes",
            header_with(MAX_PAYLOAD as u32 + 1, frame::VERSION),
            false,
        ),
        (
            "header announcing 4 GiB",
            header_with(u32::MAX, frame::VERSION),
            false,
        ),
        ("header with a bad CRC", bad_crc, false),
        ("protocol version 3", header_with(48, 3), false),
        ("protocol version 1", header_with(32, 1), false),
        ("a NoiseInit of random bytes", hello.clone(), false),
        (
            "a Write frame before NoiseInit",
            {
                let mut v = Vec::new();
                frame::encode(
                    1,
                    &Frame::Write {
                        offset: 0,
                        resync: false,
                        data: &[0xEE; 4096],
                    },
                    &mut v,
                );
                v
            },
            false,
        ),
        ("an empty Attach before NoiseInit", attach_first, false),
    ];
    for (what, bytes, half_close) in cases {
        let what = format!(
            "{what} ({})",
            if attached {
                "primary attached"
            } else {
                "idle node"
            }
        );
        let mut s =
            TcpStream::connect(node.addr()).unwrap_or_else(|e| panic!("{what}: connect: {e}"));
        let _ = s.write_all(&bytes);
        if half_close || bytes.is_empty() {
            let _ = s.shutdown(Shutdown::Write);
        }
        let got = expect_closed(&mut s, &what, within);
        eprintln!(
            "{what}: closed; received {} bytes: {:?}",
            got.len(),
            first_frame(&got)
        );
        // Only a protocol 1 peer is told something (to upgrade, in protocol 1's format).
        if what.starts_with("protocol version 1") {
            assert!(got.len() > 24 && got[4] == 1, "{what}: {got:02x?}");
        } else {
            assert!(got.is_empty(), "{what}: answered {:?}", first_frame(&got));
        }
        node.assert_running();
    }
    // A well-formed NoiseInit made with another secret: closed without a word.
    {
        let what = format!(
            "NoiseInit with another secret ({})",
            if attached { "attached" } else { "idle" }
        );
        let mut s = TcpStream::connect(node.addr()).expect("connect");
        s.set_read_timeout(Some(within)).expect("timeout");
        let other = Secret::from_bytes(b"not the node's secret at all").expect("secret");
        let e = mirror_proto::secure::initiate(&mut s, &other)
            .err()
            .unwrap_or_else(|| panic!("{what}: the handshake succeeded"));
        eprintln!("{what}: {e}");
        // Nothing to test a guess of the secret against: not a byte back.
        let got = expect_closed(&mut s, &what, within);
        assert!(
            got.is_empty(),
            "{what}: the node answered {} bytes",
            got.len()
        );
        node.assert_running();
    }
}

/// Garbage to the control socket at `ctl`; `status()` must keep working.
fn garbage_to_control(ctl: &Path, what: &str, status: &mut dyn FnMut() -> serde_json::Value) {
    let mut junk = pattern(0, 1024, 0x77);
    junk[100] = b'\n';
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("connect and close", vec![]),
        ("binary garbage with a newline", junk),
        ("an unknown command", b"format-disk\n".to_vec()),
        ("100 KiB without a newline", vec![b'x'; 100 * 1024]),
        ("NUL bytes", vec![0; 64]),
    ];
    for (case, bytes) in cases {
        let mut s = UnixStream::connect(ctl)
            .unwrap_or_else(|e| panic!("{what} control, {case}: connect: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.set_write_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let _ = s.write_all(&bytes);
        let _ = s.shutdown(Shutdown::Write);
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply);
        let reply = String::from_utf8_lossy(&reply);
        eprintln!("{what} control, {case}: {}", reply.trim());
        let v = status();
        assert!(
            v.get("peer_state").is_some(),
            "{what} status after {case}: {v}"
        );
    }
    // An idle connection does not block status for long.
    let idle = UnixStream::connect(ctl).expect("connect");
    let t = Instant::now();
    let v = status();
    eprintln!(
        "{what} status with an idle control connection open took {:?}",
        t.elapsed()
    );
    assert!(v.get("peer_state").is_some(), "{v}");
    drop(idle);
}

/// 5. Garbage to the access node's TCP port (idle and with a primary attached), to both control
///    sockets and to vhost-mirror's vhost-user socket: every bad connection is dropped, nothing
///    else is disturbed, replication goes on.
#[test]
fn garbage_to_listeners() {
    let _wd = Watchdog::new("garbage_to_listeners", Duration::from_secs(120));
    let t0 = Instant::now();
    let size = 16 * MIB;
    let s = Pair::new("mirror-garbage", size);
    let mut node = s.node();

    // Idle node.
    garbage_to_node(&mut node, false);
    let ctl = node.control().to_path_buf();
    {
        let n = &node;
        garbage_to_control(&ctl, "access-node", &mut || n.status_json());
    }
    node.assert_running();

    // A real primary still attaches and syncs.
    let mut b = s.mirror();
    wait_in_sync(&mut b, SYNC_TIMEOUT);
    let downs = |b: &Backend| b.log().matches("replication link down").count();
    let downs_before = downs(&b);

    // Garbage while the primary is attached; the guest writes between the cases.
    let seed = 0x5005;
    let mut c = Client::connect_with(b.socket(), &client_opts());
    c.q().write_pattern(0, MIB, usz(MAX_REQ), 4, seed);
    let w0 = status_u64(&node.status_json(), "writes");
    garbage_to_node(&mut node, true);
    c.q().write_pattern(MIB, MIB, usz(MAX_REQ), 4, seed);
    let st = b.status_json();
    assert!(
        is_in_sync(&st),
        "after garbage to the node: {}",
        pretty(&st)
    );
    assert!(
        status_u64(&node.status_json(), "writes") > w0,
        "writes did not reach the replica after the garbage"
    );
    assert_eq!(
        downs(&b),
        downs_before,
        "the link went down during the garbage"
    );
    drop(c);

    // vhost-mirror's control socket.
    let vctl = b.control().expect("control").to_path_buf();
    {
        let bb = &b;
        garbage_to_control(&vctl, "vhost-mirror", &mut || bb.status_json());
    }

    // vhost-mirror's vhost-user socket (no client connected).
    let hdr = |req: u32, size: u32| -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&req.to_le_bytes());
        v.extend_from_slice(&1u32.to_le_bytes());
        v.extend_from_slice(&size.to_le_bytes());
        v
    };
    let mut junk = pattern(0, 1024, 0x6B);
    junk.truncate(1000);
    for (case, bytes) in [
        ("connect and close", vec![]),
        ("garbage", junk),
        ("half a header", vec![1, 0, 0]),
        ("payload size 0xffffffff", hdr(1, u32::MAX)),
        ("unknown request 9999", hdr(9999, 0)),
    ] {
        let mut u = UnixStream::connect(b.socket())
            .unwrap_or_else(|e| panic!("vhost-user, {case}: connect: {e}"));
        u.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        if !bytes.is_empty() {
            let _ = u.write_all(&bytes);
            let mut sink = [0u8; 256];
            let _ = u.read(&mut sink);
        }
        drop(u);
        std::thread::sleep(Duration::from_millis(20));
        b.assert_running();
        let v = b.status_json();
        assert_eq!(
            status_str(&v, "peer_state"),
            "connected",
            "after vhost-user {case}"
        );
    }
    let w1 = status_u64(&node.status_json(), "writes");
    let mut c = Client::connect_with(b.socket(), &client_opts());
    c.q().write_pattern(2 * MIB, 2 * MIB, usz(MAX_REQ), 4, seed);
    c.q()
        .verify_pattern(0, 4 * MIB, usz(MAX_REQ), 4, seed)
        .unwrap_or_else(|e| panic!("read back after the garbage: {e}"));
    c.q().flush().expect("flush");
    assert!(
        status_u64(&node.status_json(), "writes") > w1,
        "replication stopped"
    );
    let st = wait_in_sync(&mut b, TIMEOUT);
    assert_eq!(status_u64(&st, "errors"), 0, "{}", pretty(&st));
    assert_eq!(
        downs(&b),
        downs_before,
        "the link went down during the garbage"
    );
    drop(c);
    stop_primary(&mut b);
    stop_node(&mut node);
    assert_identical(&s.primary, &s.replica);
    eprintln!("total {:?}", t0.elapsed());
}

// ------------------------------------------------------------------------------------------------
// 6. Replica disk full, then space comes back
// ------------------------------------------------------------------------------------------------

/// 6. The replica's disk is "full" beyond 8 MiB (RLIMIT_FSIZE on the access node): the initial
///    full sync fails partway and the replica stays outdated, while the guest keeps writing
///    without a single error. Restarted without the limit, the node catches up and the images
///    end up identical.
#[test]
fn replica_disk_full_then_space_back() {
    let _wd = Watchdog::new(
        "replica_disk_full_then_space_back",
        Duration::from_secs(120),
    );
    let t0 = Instant::now();
    let size = 64 * MIB;
    let limit = 8 * MIB;
    let s = Pair::new("mirror-full", size);
    // Pre-created sparse: a limited process could not even extend the file to its size.
    create_image(&s.replica, size);
    let mut node = s.node_with(&AccessNodeOpts {
        fsize_limit: Some(limit),
        ..AccessNodeOpts::default()
    });
    let mut b = s.mirror();

    // The guest writes (and verifies) while the sync keeps failing.
    let mut c = Client::connect_with(b.socket(), &client_opts());
    let q = c.q();
    let mut model = Model::new(size, 0x6000);
    let mut rng = Rng::new(6);
    let mut log = IoLog::default();
    let mix = Mix {
        qd: 8,
        max_shift: 5,
        count: None,
        until: Some(Instant::now() + Duration::from_secs(3)),
        flush_every: 20,
        pace: Some(Duration::from_millis(2)),
    };
    let mut seen = BTreeSet::new();
    let mut in_sync_seen = false;
    let mut min_oos = u64::MAX;
    let tw = Instant::now();
    while tw.elapsed() < Duration::from_secs(4) {
        let one = Mix {
            until: Some(Instant::now() + Duration::from_millis(300)),
            ..mix
        };
        random_writes(q, &mut model, &mut rng, &one, &mut log);
        let st = b.status_json();
        seen.insert(format!(
            "{}/{}",
            status_str(&st, "peer_state"),
            status_str(&st, "peer_disk_state")
        ));
        in_sync_seen |= is_in_sync(&st);
        min_oos = min_oos.min(status_u64(&st, "out_of_sync_bytes"));
    }
    let st = b.status_json();
    let ns = node.status_json();
    eprintln!(
        "with a full replica: states seen {seen:?}, min out_of_sync {min_oos}; {} writes, max \
         latency {:?}; resync_total_bytes {}; node errors {}",
        log.writes.len(),
        log.max_latency,
        st["resync_total_bytes"],
        ns["errors"]
    );
    let attempts = b.log().matches("resync of").count();
    eprintln!("resync attempts started so far: {attempts}");
    if std::env::var_os("REPL_TEST_LOGS").is_some() {
        eprintln!("{}\n----\n{}", b.log(), node.log());
    }
    assert!(
        log.errors.is_empty(),
        "guest requests failed: {:?}",
        log.errors
    );
    assert_eq!(status_u64(&st, "errors"), 0, "{}", pretty(&st));
    assert!(
        !in_sync_seen,
        "reported in sync with a full replica: {seen:?}"
    );
    assert!(min_oos > 0, "nothing out of sync with a full replica");
    assert!(
        seen.iter().any(|s| s.ends_with("/outdated")),
        "the replica was never reported outdated: {seen:?}"
    );
    model
        .verify_device(q)
        .unwrap_or_else(|e| panic!("read back with a full replica: {e}"));
    node.assert_running();

    // Space comes back.
    stop_node(&mut node);
    let mut node = s.node();
    let st = wait_in_sync(&mut b, SYNC_TIMEOUT);
    eprintln!(
        "in sync after space came back; resync_total_bytes {}",
        st["resync_total_bytes"]
    );
    random_writes(
        q,
        &mut model,
        &mut rng,
        &Mix {
            count: Some(200),
            until: None,
            pace: None,
            ..mix
        },
        &mut log,
    );
    assert!(
        log.errors.is_empty(),
        "guest requests failed: {:?}",
        log.errors
    );
    q.flush().expect("flush");
    model
        .verify_device(q)
        .unwrap_or_else(|e| panic!("read back: {e}"));
    let st = b.status_json();
    assert!(is_in_sync(&st), "{}", pretty(&st));
    stop_primary(&mut b);
    drop(c);
    stop_node(&mut node);
    model
        .verify_file(&s.primary)
        .unwrap_or_else(|e| panic!("primary image: {e}"));
    assert_identical(&s.primary, &s.replica);
    eprintln!("total {:?}", t0.elapsed());
}

// ------------------------------------------------------------------------------------------------
// 8. A replica whose fdatasync fails (7, the VM on a mirrored pair, lives elsewhere)
// ------------------------------------------------------------------------------------------------

/// An LD_PRELOAD shim for the access node: `fdatasync`/`fsync` fail with EIO while the file
/// named by `$FAILSYNC_FLAG` exists.
const FAILSYNC_C: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>
static int should_fail(void) {
    const char *f = getenv("FAILSYNC_FLAG");
    return f && access(f, F_OK) == 0;
}
int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    if (should_fail()) { errno = EIO; return -1; }
    return real(fd);
}
int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    if (should_fail()) { errno = EIO; return -1; }
    return real(fd);
}
"#;

/// Builds the shim with `cc` (the linker cargo itself uses) into `dir`.
fn build_failsync_shim(dir: &Path) -> PathBuf {
    let src = dir.join("failsync.c");
    let so = dir.join("failsync.so");
    std::fs::write(&src, FAILSYNC_C).expect("write shim source");
    let out = run_with_timeout(
        Command::new("cc")
            .args(["-shared", "-fPIC", "-O2", "-o"])
            .arg(&so)
            .arg(&src)
            .arg("-ldl"),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "building the fdatasync shim with cc failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    so
}

/// 8. The replica's fdatasync fails (EIO, injected with an LD_PRELOAD shim) while the guest
///    writes and flushes: the guest is not failed (degrade), but the primary must not believe
///    the replica has the flushed data: what the failed flush covered is out of sync (and the
///    replica not up to date) until the replica can flush again; then it catches up.
#[test]
fn replica_flush_failure_marks_out_of_sync() {
    let _wd = Watchdog::new(
        "replica_flush_failure_marks_out_of_sync",
        Duration::from_secs(120),
    );
    let t0 = Instant::now();
    let size = 16 * MIB;
    let s = Pair::new("mirror-fsyncfail", size);
    let shim = build_failsync_shim(s.dir.path());
    let flag = s.dir.path().join("fail-fdatasync-now");
    let mut node = s.node_with(&AccessNodeOpts {
        env: vec![
            ("LD_PRELOAD".into(), shim.display().to_string()),
            ("FAILSYNC_FLAG".into(), flag.display().to_string()),
        ],
        ..AccessNodeOpts::default()
    });
    let mut b = s.mirror();
    wait_in_sync(&mut b, SYNC_TIMEOUT);
    let mut c = Client::connect_with(b.socket(), &client_opts());
    let q = c.q();
    q.flush().expect("flush while the replica is healthy");

    std::fs::write(&flag, "").expect("create the flag");
    let off = MIB;
    let seed = 0x7007;
    assert_eq!(
        q.write(off, &pattern(off, usz(REGION), seed)),
        Ok(()),
        "write"
    );
    assert_eq!(
        q.flush(),
        Ok(()),
        "guest flush (degrade: the guest is not failed)"
    );
    let ns = node.status_json();
    eprintln!(
        "access-node after the failed fdatasync: errors {}",
        ns["errors"]
    );
    let r = wait_status(&mut b, Duration::from_secs(3), |v| {
        !is_in_sync(v) && status_u64(v, "out_of_sync_bytes") >= REGION
    });
    let flag_removed = std::fs::remove_file(&flag);
    let st = r.unwrap_or_else(|v| {
        panic!(
            "the replica failed to fdatasync a flushed write (access-node errors: {}), yet \
             vhost-mirror still reports it in sync with nothing out of sync:\n{}",
            ns["errors"],
            pretty(&v)
        )
    });
    flag_removed.expect("remove the flag");
    eprintln!(
        "after the failed flush: peer_state {} peer_disk_state {} out_of_sync {}",
        st["peer_state"], st["peer_disk_state"], st["out_of_sync_bytes"]
    );

    // fdatasync works again: the replica catches up.
    let st = wait_in_sync(&mut b, SYNC_TIMEOUT);
    assert_eq!(status_u64(&st, "errors"), 0, "{}", pretty(&st));
    drop(c);
    stop_primary(&mut b);
    stop_node(&mut node);
    check_pattern(&read_file_range(&s.replica, off, usz(REGION)), off, seed)
        .unwrap_or_else(|e| panic!("replica image: {e}"));
    assert_identical(&s.primary, &s.replica);
    eprintln!("total {:?}", t0.elapsed());
}

// ------------------------------------------------------------------------------------------------
// 9. --on-peer-loss suspend
// ------------------------------------------------------------------------------------------------

/// 9. With `--on-peer-loss suspend`, a guest write waits while the replica is away and
///    completes once it is back (nothing is acknowledged that only one side has); the images
///    end up identical.
#[test]
fn suspend_mode_holds_writes_until_the_peer_returns() {
    let _w = Watchdog::new(
        "suspend_mode_holds_writes_until_the_peer_returns",
        4 * TIMEOUT,
    );
    let s = Pair::new("suspend", 16 * MIB);
    let mut node = s.node();
    let mut opts = mirror_opts(s.port, &s.secret);
    opts.extra_args
        .extend(["--on-peer-loss".to_string(), "suspend".to_string()]);
    let mut b = Backend::spawn(s.dir.path(), &s.primary, &opts);
    wait_in_sync(&mut b, SYNC_TIMEOUT);
    node.kill();
    wait_status(&mut b, SYNC_TIMEOUT, |v| {
        status_str(v, "peer_state") != "connected"
    })
    .unwrap_or_else(|v| panic!("primary did not notice the lost replica: {}", pretty(&v)));

    let socket = b.socket().to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    let writer = std::thread::spawn(move || {
        let mut c = Client::connect(&socket);
        let data = pattern(MIB, usz(64 * KIB), 9);
        let r = c.q().write(MIB, &data);
        let _ = tx.send((r, Instant::now()));
    });
    // While the replica is away the write must not complete.
    assert!(
        rx.recv_timeout(Duration::from_millis(1500)).is_err(),
        "a write completed while the replica was away in suspend mode"
    );
    let back = Instant::now();
    let mut node = s.node();
    let (r, done) = rx
        .recv_timeout(Duration::from_secs(8))
        .expect("the held write did not complete after the replica returned");
    writer.join().expect("writer thread");
    assert!(r.is_ok(), "held write failed: {r:?}");
    assert!(
        done >= back,
        "the write completed before the replica was back"
    );
    wait_in_sync(&mut b, SYNC_TIMEOUT);

    // The replica dies with writes in flight (QD 8) and comes back: every write completes OK.
    let socket = b.socket().to_path_buf();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let writer = std::thread::spawn(move || {
        let mut c = Client::connect_with(&socket, &client_opts());
        let mut seed = 100;
        loop {
            c.q()
                .write_pattern(4 * MIB, 4 * MIB, usz(64 * KIB), 8, seed);
            if stop2.load(std::sync::atomic::Ordering::Relaxed) {
                return seed;
            }
            seed += 1;
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    node.kill();
    std::thread::sleep(Duration::from_millis(800));
    let mut node = s.node();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let last = writer.join().expect("a write failed in suspend mode");
    wait_in_sync(&mut b, SYNC_TIMEOUT);
    stop_primary(&mut b);
    stop_node(&mut node);
    check_pattern(
        &read_file_range(&s.primary, 4 * MIB, usz(4 * MIB)),
        4 * MIB,
        last,
    )
    .unwrap_or_else(|e| panic!("primary image: {e}"));
    assert_identical(&s.primary, &s.replica);
}

// ------------------------------------------------------------------------------------------------
// 10. A local read error on the primary is served from the replica
// ------------------------------------------------------------------------------------------------

/// An LD_PRELOAD shim for vhost-mirror: `preadv` fails with EIO while the file named by
/// `$FAILREAD_FLAG` exists (a failing local disk).
const FAILREAD_C: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <sys/uio.h>
#include <unistd.h>
ssize_t preadv(int fd, const struct iovec *iov, int cnt, off_t off) {
    static ssize_t (*real)(int, const struct iovec *, int, off_t);
    if (!real) real = (ssize_t (*)(int, const struct iovec *, int, off_t))dlsym(RTLD_NEXT, "preadv");
    const char *f = getenv("FAILREAD_FLAG");
    if (f && access(f, F_OK) == 0) { errno = EIO; return -1; }
    return real(fd, iov, cnt, off);
}
ssize_t preadv64(int fd, const struct iovec *iov, int cnt, off_t off) {
    return preadv(fd, iov, cnt, off);
}
"#;

/// 10. The primary's local reads fail with EIO (injected with an LD_PRELOAD shim): a guest read
///     of data the replica has is served from the replica, byte-exact; without the replica it
///     fails with an I/O error instead of returning wrong data.
#[test]
fn local_read_error_served_by_the_replica() {
    let _wd = Watchdog::new("local_read_error_served_by_the_replica", 4 * TIMEOUT);
    let s = Pair::new("mirror-readfail", 16 * MIB);
    let src = s.dir.path().join("failread.c");
    let so = s.dir.path().join("failread.so");
    std::fs::write(&src, FAILREAD_C).expect("write shim source");
    let out = run_with_timeout(
        Command::new("cc")
            .args(["-shared", "-fPIC", "-O2", "-o"])
            .arg(&so)
            .arg(&src)
            .arg("-ldl"),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "building the preadv shim with cc failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let flag = s.dir.path().join("fail-reads-now");
    let mut node = s.node();
    let mut opts = mirror_opts(s.port, &s.secret);
    opts.env = vec![
        ("LD_PRELOAD".into(), so.display().to_string()),
        ("FAILREAD_FLAG".into(), flag.display().to_string()),
    ];
    let mut b = Backend::spawn(s.dir.path(), &s.primary, &opts);
    wait_in_sync(&mut b, SYNC_TIMEOUT);
    let mut c = Client::connect_with(b.socket(), &client_opts());
    let off = 2 * MIB;
    let seed = 0xbad_d15c;
    let data = pattern(off, usz(256 * KIB), seed);
    c.q().write(off, &data).expect("write");
    c.q().flush().expect("flush");

    std::fs::write(&flag, "").expect("create the flag");
    let got = c
        .q()
        .read(off, usz(256 * KIB))
        .expect("read served by the replica");
    check_pattern(&got, off, seed).unwrap_or_else(|e| panic!("data from the replica: {e}"));
    assert!(
        b.log().contains("served from the replica"),
        "the fallback was not logged:\n{}",
        b.log()
    );
    // Without the replica the read fails with an I/O error.
    stop_node(&mut node);
    wait_status(&mut b, SYNC_TIMEOUT, |v| {
        status_str(v, "peer_state") != "connected"
    })
    .unwrap_or_else(|v| panic!("primary did not notice the lost replica: {}", pretty(&v)));
    assert!(
        c.q().read(off, usz(4 * KIB)).is_err(),
        "a failing local read without a replica must fail"
    );
    std::fs::remove_file(&flag).expect("remove the flag");
    drop(c);
    stop_primary(&mut b);
}

// ------------------------------------------------------------------------------------------------
// A slow FLUSH delays only itself (issue 10)
// ------------------------------------------------------------------------------------------------

/// Writes submitted behind a FLUSH on the same queue complete while its fdatasyncs run (here
/// and on the replica: 64 MiB of dirty data make them slow, ~150 ms each), not after it: the
/// queue worker completes whatever is ready instead of sleeping on its oldest request. (The
/// writes go to an extent the activity log already holds: one that must first be made hot
/// commits the log with an fdatasync, which ext4's journal makes wait for the image's.)
#[test]
fn writes_behind_a_slow_flush_complete_before_it() {
    let _wd = Watchdog::new("writes_behind_a_slow_flush", Duration::from_secs(120));
    let s = Pair::new("behind_flush", 128 * MIB);
    let _node = s.node();
    let mut b = s.mirror();
    wait_in_sync(&mut b, SYNC_TIMEOUT);
    let mut c = Client::connect_with(b.socket(), &client_opts());
    let q = c.q();
    // Dirty data for the flush to write out, on both sides.
    q.write_pattern(0, 64 * MIB, usz(MAX_REQ), 8, 7);
    const WRITES: usize = 8;
    q.submit(Op::Flush, 0);
    for i in 1..=WRITES {
        q.submit(
            Op::Write {
                off: 60 * MIB + i as u64 * BLOCK,
                buf_off: i * usz(BLOCK),
                len: usz(BLOCK),
            },
            i,
        );
    }
    let mut order = Vec::new();
    let t = Instant::now();
    while order.len() < WRITES + 1 {
        for d in q.wait(1) {
            assert_eq!(d.result(), Ok(()), "request {}", d.user_data);
            eprintln!("{} done after {:?}", d.user_data, t.elapsed());
            order.push(d.user_data);
        }
    }
    let flush_at = order
        .iter()
        .position(|&u| u == 0)
        .expect("the flush completed");
    assert_eq!(
        flush_at, WRITES,
        "completion order {order:?}: writes behind the FLUSH waited for it"
    );
    stop_primary(&mut b);
}
