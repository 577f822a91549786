//! Durability regressions: one test per finding of issue 8, each named after what it
//! protects, each able to fail on the code before the fix (the finding says how it broke).
//!
//! The tests here need no power-loss layer: a scripted replica (`FakeReplica`, speaking the
//! real handshake with the shared secret) replaces `access-node` where the primary's reaction
//! to a replica's exact behaviour is what matters. The tests that need writes to be lost
//! (power loss, failing disks) are in `faults.rs`.
//!
//! Run: `cargo build --workspace && cargo test -p vhost-mirror-tests --test durability`.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mirror_proto::auth::Secret;
use mirror_proto::conn::{self, FrameReader};
use mirror_proto::frame::{AckStatus, DiskState, Frame, NodeInfo, Role};
use mirror_proto::secure::{self, SecureReader, SecureWriter};
use vhost_mirror_tests::{
    bin_path, compare_files, pattern, run_with_timeout, status_str, status_u64, wait_in_sync,
    wait_status, AccessNode, Backend, Client, Pair, Watchdog, REGION, TIMEOUT,
};

const MIB: u64 = 1024 * 1024;
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);

fn usz(x: u64) -> usize {
    usize::try_from(x).expect("usize")
}

fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

fn stop(b: &mut Backend) {
    let st = b.terminate(TIMEOUT);
    assert!(st.success(), "vhost-mirror exit {st}; log:\n{}", b.log());
}

fn stop_node(n: &mut AccessNode) {
    let st = n.terminate(TIMEOUT);
    assert!(st.success(), "access-node exit {st}; log:\n{}", n.log());
}

/// Writes one 64 KiB region of pattern `seed` at each offset, then flushes.
fn write_regions(b: &Backend, offs: &[u64], seed: u64) {
    let mut c = Client::connect(b.socket());
    let q = c.q();
    for &off in offs {
        assert_eq!(
            q.write(off, &pattern(off, usz(REGION), seed)),
            Ok(()),
            "write {off:#x}"
        );
    }
    assert_eq!(q.flush(), Ok(()), "flush");
}

fn promote_image(image: &Path) {
    let out = run_with_timeout(
        Command::new(bin_path("access-node"))
            .args(["promote", "--image"])
            .arg(image),
        TIMEOUT,
    );
    assert!(
        out.status.success(),
        "promote --image failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ------------------------------------------------------------------------------------------------
// Finding 1: an image served without --peer left no trace
// ------------------------------------------------------------------------------------------------

/// 1a. A pair in sync; the primary's image is served alone for a while and written (and
///     flushed); served with --peer again, the writes made alone reach the replica. Before the
///     fix: InSync, nothing copied, the images differ in every region written alone.
#[test]
fn image_served_alone_keeps_its_out_of_sync_bits() {
    let _wd = Watchdog::new("image_served_alone", Duration::from_secs(120));
    let p = Pair::new("dur-alone", 32 * MIB);
    let mut node = p.node_on(&p.replica);
    let mut b = p.serve(&p.primary, true);
    wait_in_sync(&mut b, SYNC_TIMEOUT);
    stop(&mut b);

    let mut alone = p.serve(&p.primary, false);
    let st = alone.status_json();
    assert_eq!(
        status_str(&st, "peer_state"),
        "standalone",
        "an image of a pair served alone: {}",
        pretty(&st)
    );
    let offs: Vec<u64> = (0..6u64).map(|i| (5 + i * 37) * REGION).collect();
    write_regions(&alone, &offs, 0xa1);
    let st = alone.status_json();
    assert_eq!(
        status_u64(&st, "out_of_sync_bytes"),
        offs.len() as u64 * REGION,
        "writes made alone must be recorded: {}",
        pretty(&st)
    );
    stop(&mut alone);

    let mut b = p.serve(&p.primary, true);
    let st = wait_in_sync(&mut b, SYNC_TIMEOUT);
    assert_eq!(
        status_u64(&st, "resync_total_bytes"),
        offs.len() as u64 * REGION,
        "{}",
        pretty(&st)
    );
    stop(&mut b);
    stop_node(&mut node);
    compare_files(&p.primary, &p.replica).unwrap_or_else(|e| panic!("images differ: {e}"));
}

/// 1b. After a failover (the replica promoted) the promoted image is served alone and
///     written; the old primary comes back as the access node: the writes made alone are
///     copied to it. Before the fix: Partial with an empty bitmap, nothing copied, SyncDone
///     recorded the old primary up to date, and a later failback lost every one of them.
#[test]
fn promoted_image_served_alone_resyncs_the_old_primary() {
    let _wd = Watchdog::new("promoted_alone", Duration::from_secs(120));
    let p = Pair::new("dur-promoted-alone", 32 * MIB);
    let mut node = p.node_on(&p.replica);
    let mut b = p.serve(&p.primary, true);
    wait_in_sync(&mut b, SYNC_TIMEOUT);
    // Host A dies (cleanly enough: the point is what happens on B).
    stop(&mut b);
    stop_node(&mut node);
    promote_image(&p.replica);

    let mut alone = p.serve(&p.replica, false);
    let offs: Vec<u64> = (0..5u64).map(|i| (3 + i * 41) * REGION).collect();
    write_regions(&alone, &offs, 0xb2);
    stop(&mut alone);

    // Failback: A is the access node now, B serves with --peer A.
    let mut old = p.node_on(&p.primary);
    let mut b = p.serve(&p.replica, true);
    let st = wait_in_sync(&mut b, SYNC_TIMEOUT);
    assert!(
        status_u64(&st, "resync_total_bytes") >= offs.len() as u64 * REGION,
        "the writes made alone were not copied: {}",
        pretty(&st)
    );
    stop(&mut b);
    stop_node(&mut old);
    compare_files(&p.replica, &p.primary).unwrap_or_else(|e| panic!("images differ: {e}"));
}

// ------------------------------------------------------------------------------------------------
// A scripted replica
// ------------------------------------------------------------------------------------------------

/// What the scripted replica saw of one connection's data phase, in arrival order.
#[derive(Debug, Default, Clone)]
struct Seen {
    frames: Vec<String>,
}

/// Accepts connections on `listener` (one at a time, until `stop`), authenticates, attaches at
/// the primary's bitmap generation (so the primary decides on a partial resync), and hands every
/// data-phase frame to `script`, which returns the reply (None: close the connection).
fn fake_replica(
    listener: TcpListener,
    secret: Secret,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Seen>>>,
    script: impl Fn(usize, &Frame<'_>, &Seen) -> Option<Option<Frame<'static>>> + Send + 'static,
) -> std::thread::JoinHandle<()> {
    listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        let mut conn_no = 0usize;
        while !stop.load(Ordering::Relaxed) {
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut s = Seen::default();
            serve_fake(&stream, &secret, conn_no, &mut s, &script);
            seen.lock().expect("seen").push(s);
            conn_no += 1;
        }
    })
}

fn serve_fake(
    stream: &TcpStream,
    secret: &Secret,
    conn_no: usize,
    seen: &mut Seen,
    script: &impl Fn(usize, &Frame<'_>, &Seen) -> Option<Option<Frame<'static>>>,
) {
    let mut s = stream;
    let Ok(keys) = secure::respond(&mut s, secret, &Default::default()) else {
        return;
    };
    let mut w = SecureWriter::new(stream, keys.clone());
    let mut r = FrameReader::new(SecureReader::new(stream, keys));
    let Ok(d) = r.read_frame() else { return };
    let Frame::Attach(primary) = d.frame else {
        return;
    };
    let info = NodeInfo {
        node_id: 77,
        size: primary.size,
        role: Role::Secondary,
        disk_state: DiskState::UpToDate,
        generation: primary.bitmap_generation,
        bitmap_generation: 0,
        history: Vec::new(),
        flags: 0,
        hot: Vec::new(),
    };
    if conn::send(&mut w, 0, &Frame::Attached(info)).is_err() {
        return;
    }
    loop {
        let Ok(d) = r.read_frame() else { return };
        let name = match &d.frame {
            Frame::Write { resync: true, .. } => "ResyncWrite".to_owned(),
            f => f.name().to_owned(),
        };
        if name == "Ping" {
            if let Frame::Ping { nanos } = d.frame {
                let _ = conn::send(&mut w, d.seq, &Frame::Pong { nanos });
            }
            continue;
        }
        // This replica does not announce block hashes (flags 0, like an access-node from
        // before them): a primary must not ask. If one does, it is recorded (and answered with
        // hashes no block has, so the test goes on to find it).
        if let Frame::ReadHashes { len, .. } = d.frame {
            seen.frames.push("ReadHashes".to_owned());
            let n = mirror_proto::blockhash::blocks_in(len as usize);
            let hashes = vec![0xa5u8; n * mirror_proto::blockhash::HASH_LEN];
            if conn::send(&mut w, d.seq, &Frame::Hashes { hashes: &hashes }).is_err() {
                return;
            }
            continue;
        }
        let reply = script(conn_no, &d.frame, seen);
        seen.frames.push(name);
        match reply {
            None => return,
            Some(None) => {}
            Some(Some(f)) => {
                if conn::send(&mut w, d.seq, &f).is_err() {
                    return;
                }
            }
        }
    }
}

fn ack() -> Option<Option<Frame<'static>>> {
    Some(Some(Frame::Ack {
        status: AckStatus::Ok,
    }))
}

// ------------------------------------------------------------------------------------------------
// Finding 2: resync cleared bits for data only in the replica's page cache
// ------------------------------------------------------------------------------------------------

/// 2. Twenty separate regions are out of sync; a replica acknowledges SyncStart and four resync
///    writes (its page cache) and then dies before any Flush. Every one of the twenty regions
///    must still be out of sync. Before the fix, the acknowledged regions were cleared (16 of
///    20 rounds lost bits), and the returning replica was declared up to date without them.
#[test]
fn resync_clears_bits_only_after_the_replica_flushed() {
    let _wd = Watchdog::new("resync_flush_before_clear", Duration::from_secs(120));
    let p = Pair::new("dur-resync-clear", 32 * MIB);
    let mut node = p.node_on(&p.replica);
    let mut b = p.serve(&p.primary, true);
    wait_in_sync(&mut b, SYNC_TIMEOUT);
    node.kill();
    drop(node);
    wait_status(&mut b, TIMEOUT, |v| {
        status_str(v, "peer_state") != "connected"
    })
    .unwrap_or_else(|v| panic!("still connected: {}", pretty(&v)));
    let offs: Vec<u64> = (0..20u64).map(|i| (2 + i * 7) * REGION).collect();
    write_regions(&b, &offs, 0xc3);
    let want = offs.len() as u64 * REGION;
    assert_eq!(status_u64(&b.status_json(), "out_of_sync_bytes"), want);

    let listener = TcpListener::bind(("127.0.0.1", p.port)).expect("bind the fake replica");
    let secret = Secret::load(&p.secret).expect("secret");
    let quit = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let fake = fake_replica(listener, secret, quit.clone(), seen.clone(), |_, f, s| {
        let writes = s.frames.iter().filter(|n| *n == "ResyncWrite").count();
        match f {
            Frame::SyncStart { .. } => ack(),
            Frame::Write { resync: true, .. } if writes < 4 => ack(),
            // The fifth frame after SyncStart: the replica's host dies.
            _ => None,
        }
    });
    // Let it connect, resync into the dying replica, and fail a few times.
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && seen.lock().expect("seen").len() < 2 {
        std::thread::sleep(Duration::from_millis(50));
    }
    quit.store(true, Ordering::Relaxed);
    fake.join().expect("fake replica thread");
    let conns = seen.lock().expect("seen").clone();
    assert!(
        !conns
            .iter()
            .any(|c| c.frames.iter().any(|n| n == "ReadHashes")),
        "a replica that does not announce block hashes was asked for them: {conns:?}"
    );
    assert!(
        conns
            .iter()
            .any(|c| c.frames.iter().filter(|n| *n == "ResyncWrite").count() >= 4),
        "the primary never resynced into the fake replica: {conns:?}\nlog:\n{}",
        b.log()
    );
    let st = b.status_json();
    assert_eq!(
        status_u64(&st, "out_of_sync_bytes"),
        want,
        "regions whose resync the replica never made durable were cleared: {}",
        pretty(&st)
    );
    // And the real replica, back, gets all of them.
    let mut node = p.node_on(&p.replica);
    wait_in_sync(&mut b, SYNC_TIMEOUT);
    stop(&mut b);
    stop_node(&mut node);
    compare_files(&p.primary, &p.replica).unwrap_or_else(|e| panic!("images differ: {e}"));
}

// ------------------------------------------------------------------------------------------------
// Finding 5: SyncStart was sent after the link was published
// ------------------------------------------------------------------------------------------------

/// 5. While the guest writes without pause, a replica that needs a resync attaches, again
///    and again. No guest write may reach it before SyncStart (which makes it inconsistent, durably,
///    so that a replica holding some of the new generation's writes but not the resync is never
///    promoted as up to date). Before the fix the link was published first.
#[test]
fn no_guest_write_reaches_a_replica_before_sync_start() {
    let _wd = Watchdog::new("sync_start_first", Duration::from_secs(120));
    let p = Pair::new("dur-sync-start", 32 * MIB);
    let mut b = p.serve(&p.primary, true);
    // Something out of sync (the replica never attached): every attach needs a resync.
    write_regions(&b, &[0], 0xd4);

    let listener = TcpListener::bind(("127.0.0.1", p.port)).expect("bind the fake replica");
    let secret = Secret::load(&p.secret).expect("secret");
    let quit = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let fake = fake_replica(listener, secret, quit.clone(), seen.clone(), |_, f, s| {
        match f {
            Frame::SyncStart { .. } => {
                // A slow metadata write: guest writes meanwhile must wait or be marked.
                std::thread::sleep(Duration::from_millis(30));
                ack()
            }
            // After a few frames, this replica dies; the next attach starts over.
            _ if s.frames.len() > 6 => None,
            _ => ack(),
        }
    });
    let writing = Arc::new(AtomicBool::new(true));
    let w = writing.clone();
    let sock = b.socket().to_path_buf();
    let writer = std::thread::spawn(move || {
        let mut c = Client::connect(&sock);
        let q = c.q();
        let data = pattern(8 * REGION, 4096, 0xd5);
        let mut n = 0u64;
        while w.load(Ordering::Relaxed) {
            if q.write(8 * REGION + (n % 16) * 4096, &data).is_err() {
                break;
            }
            n += 1;
        }
        n
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && seen.lock().expect("seen").len() < 10 {
        std::thread::sleep(Duration::from_millis(20));
    }
    writing.store(false, Ordering::Relaxed);
    let writes = writer.join().expect("writer");
    quit.store(true, Ordering::Relaxed);
    fake.join().expect("fake replica");
    let conns = seen.lock().expect("seen").clone();
    assert!(
        conns.len() >= 5,
        "too few attaches: {conns:?}\nlog:\n{}",
        b.log()
    );
    assert!(writes > 100, "the guest wrote only {writes} times");
    for (i, c) in conns.iter().enumerate() {
        if let Some(first) = c.frames.first() {
            assert_eq!(
                first, "SyncStart",
                "attach {i}: the replica got {first} before SyncStart: {:?}",
                c.frames
            );
        }
    }
    stop(&mut b);
}

// ------------------------------------------------------------------------------------------------
// Finding 7: guest memory was read twice (once for the replica, once for the local write)
// ------------------------------------------------------------------------------------------------

/// A raw pointer into the client's I/O buffer, for a thread that plays a guest changing its
/// buffer while the device reads it.
struct BufPtr(*mut u8);
// SAFETY: the pointer targets the client's shared I/O buffer, which outlives the mutating
// thread (joined before the client is dropped); only that thread writes through it, with
// volatile writes, and this process never reads it while the device may be reading it.
unsafe impl Send for BufPtr {}

/// 7. A guest rewrites its buffer without pause while its writes are in flight (allowed: the
///    content of such a write is undefined, but both copies must get the same undefined
///    content). After the pair is in sync, the images must be identical. Before the fix the
///    replica's copy and the local `pwritev` read guest memory at different moments.
#[test]
fn guest_changing_its_buffer_cannot_make_the_images_differ() {
    let _wd = Watchdog::new("buffer_read_once", Duration::from_secs(120));
    let p = Pair::new("dur-read-once", 32 * MIB);
    let mut node = p.node_on(&p.replica);
    let mut b = p.serve(&p.primary, true);
    wait_in_sync(&mut b, SYNC_TIMEOUT);
    {
        let mut c = Client::connect(b.socket());
        let q = c.q();
        let ptr = BufPtr(q.buf().as_mut_ptr());
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let mutator = std::thread::spawn(move || {
            let p = ptr;
            let mut x = 1u64;
            while !st.load(Ordering::Relaxed) {
                for i in 0..4096 / 8 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    // SAFETY: i * 8 + 8 <= 4096, inside the client's buffer (see BufPtr).
                    unsafe { std::ptr::write_volatile(p.0.add(i * 8).cast::<u64>(), x) };
                }
            }
        });
        for i in 0..3000u64 {
            let off = (i % 64) * 4096;
            q.submit(
                vhost_mirror_tests::Op::Write {
                    off,
                    buf_off: 0,
                    len: 4096,
                },
                0,
            );
            let done = q.wait(1);
            assert!(done.iter().all(|d| d.ret == 0), "write {i} failed");
        }
        stop.store(true, Ordering::Relaxed);
        mutator.join().expect("mutator");
    }
    wait_in_sync(&mut b, SYNC_TIMEOUT);
    stop(&mut b);
    stop_node(&mut node);
    compare_files(&p.primary, &p.replica)
        .unwrap_or_else(|e| panic!("the two images got different bytes: {e}"));
}

// ------------------------------------------------------------------------------------------------
// Issue 9, item 6: damaged metadata files are a clear error or read conservatively, never a
// state. Each test damages a file the way the code before the fix misread, in a way that does
// not depend on the file's format, and each fails on that code (it loaded the damage as state
// and reported the pair in sync over differing data, or started where it must refuse).
// ------------------------------------------------------------------------------------------------

fn with_suffix(image: &Path, suffix: &str) -> PathBuf {
    PathBuf::from(format!("{}{suffix}", image.display()))
}

/// Writes 64 KiB of pattern `seed` at each offset of an image file, bypassing every server:
/// writes that reached only this image before a crash.
fn write_behind_their_back(image: &Path, offs: &[u64], seed: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(image)
        .expect("open image");
    for &off in offs {
        f.write_all_at(&pattern(off, usz(REGION), seed), off)
            .expect("write image");
    }
    f.sync_all().expect("fsync image");
}

/// A pair in sync, then both stopped cleanly.
fn pair_in_sync(name: &str, size: u64) -> Pair {
    let p = Pair::new(name, size);
    let mut node = p.node_on(&p.replica);
    let mut b = p.serve(&p.primary, true);
    wait_in_sync(&mut b, SYNC_TIMEOUT);
    stop(&mut b);
    stop_node(&mut node);
    p
}

/// Serves the pair until in sync, stops both sides and checks that the images are identical;
/// the stopped primary (for its log).
fn resync_and_compare(p: &Pair) -> Backend {
    let mut node = p.node_on(&p.replica);
    let mut b = p.serve(&p.primary, true);
    let st = wait_in_sync(&mut b, SYNC_TIMEOUT);
    stop(&mut b);
    stop_node(&mut node);
    compare_files(&p.primary, &p.replica)
        .unwrap_or_else(|e| panic!("in sync over differing data: {e}\n{}", pretty(&st)));
    b
}

/// A primary started on `image` with --peer that must refuse to start: its stderr.
fn refused_start(p: &Pair, image: &Path) -> String {
    let out = run_with_timeout(
        Command::new(bin_path("vhost-mirror"))
            .arg("serve")
            .arg("--image")
            .arg(image)
            .arg("--socket")
            .arg(p.dir.path().join("refused.sock"))
            .arg("--peer")
            .arg(format!("127.0.0.1:{}", p.port))
            .arg("--secret-file")
            .arg(&p.secret),
        TIMEOUT,
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "exit status {}: {stderr}",
        out.status
    );
    stderr
}

/// 9.6a. A crash left writes on the primary in extents its activity log listed, and the log
///       is garbage: every region is copied (the log cannot say which extents were hot).
///       Before the fix the garbage read as "no hot extents": in sync, the images differ.
#[test]
fn garbage_activity_log_resyncs_the_whole_image() {
    let _wd = Watchdog::new("garbage_al", Duration::from_secs(120));
    let p = pair_in_sync("dur-al-garbage", 32 * MIB);
    let offs: Vec<u64> = (0..5u64).map(|i| (7 + i * 89) * REGION).collect();
    write_behind_their_back(&p.primary, &offs, 0xa16);
    std::fs::write(with_suffix(&p.primary, ".al"), vec![0x5a; 8192]).expect("write .al");

    let b = resync_and_compare(&p);
    assert!(
        b.log().contains("primary.img.al is damaged"),
        "no WARN naming the log:\n{}",
        b.log()
    );
}

/// 9.6b. Writes made while the replica was away are recorded in the bitmap, then bitmap blocks
///       are damaged (zeroed, length kept): their regions are copied. Before the fix the file
///       had no checksums: the zeros were the state, those writes were never copied.
#[test]
fn damaged_bitmap_blocks_are_resynced() {
    let _wd = Watchdog::new("damaged_bitmap", Duration::from_secs(180));
    // Big enough that the regions written are past byte 512 of the bitmap in either format.
    let p = pair_in_sync("dur-bitmap-blocks", 256 * MIB);
    let mut alone = p.serve(&p.primary, false);
    let offs: Vec<u64> = (0..6u64).map(|i| (4040 + i * 9) * REGION).collect();
    write_regions(&alone, &offs, 0xb17);
    stop(&mut alone);
    let bitmap = with_suffix(&p.primary, ".bitmap");
    let mut raw = std::fs::read(&bitmap).expect("read bitmap");
    assert!(raw.len() > 512, "bitmap of {} bytes", raw.len());
    raw[512..].fill(0);
    std::fs::write(&bitmap, &raw).expect("write bitmap");

    let b = resync_and_compare(&p);
    assert!(
        b.log().contains("primary.img.bitmap") && b.log().contains("damaged block"),
        "no WARN naming the bitmap:\n{}",
        b.log()
    );
}

/// 9.6c. A bitmap cut mid-word: vhost-mirror refuses to start, naming the file and what to
///       do; done (the file removed), every region is copied. Before the fix the cut was
///       zero-padded and loaded: the bits of the last word's cut bytes were lost.
#[test]
fn bitmap_cut_mid_word_is_refused_until_removed() {
    let _wd = Watchdog::new("bitmap_cut", Duration::from_secs(120));
    let p = pair_in_sync("dur-bitmap-cut", 32 * MIB);
    let mut alone = p.serve(&p.primary, false);
    // The last regions: the last word's high bits, whatever the format.
    let offs: Vec<u64> = (0..4u64).map(|i| (500 + i * 3) * REGION).collect();
    write_regions(&alone, &offs, 0xc18);
    stop(&mut alone);
    let bitmap = with_suffix(&p.primary, ".bitmap");
    let raw = std::fs::read(&bitmap).expect("read bitmap");
    std::fs::write(&bitmap, &raw[..raw.len() - 5]).expect("cut bitmap");

    let mut node = p.node_on(&p.replica);
    let stderr = refused_start(&p, &p.primary);
    assert!(
        stderr.contains("primary.img.bitmap") && stderr.contains("remove it"),
        "the refusal does not name the file and the remedy: {stderr}"
    );
    eprintln!("refused: {}", stderr.trim());

    std::fs::remove_file(&bitmap).expect("remove bitmap");
    let mut b = p.serve(&p.primary, true);
    let st = wait_in_sync(&mut b, SYNC_TIMEOUT);
    assert_eq!(
        status_u64(&st, "resync_total_bytes"),
        32 * MIB,
        "{}",
        pretty(&st)
    );
    stop(&mut b);
    stop_node(&mut node);
    compare_files(&p.primary, &p.replica).unwrap_or_else(|e| panic!("images differ: {e}"));
}

/// 9.6d. A bit flipped in the replica's metadata (a digit of its generation): access-node
///       refuses to start and `promote --image` refuses, naming the file; done (the file
///       removed), the replica pairs as unknown content and gets a full copy. Before the fix
///       the flipped digit was loaded as the generation.
#[test]
fn damaged_replica_metadata_is_refused_until_removed() {
    let _wd = Watchdog::new("damaged_meta", Duration::from_secs(120));
    let p = pair_in_sync("dur-meta", 32 * MIB);
    let meta = with_suffix(&p.replica, ".meta");
    let mut text = std::fs::read(&meta).expect("read meta");
    let key = b"\"generation\": ";
    let at = text
        .windows(key.len())
        .position(|w| w == key)
        .expect("a generation in the metadata")
        + key.len();
    text[at + 3] ^= 0x01; // a digit stays a digit
    std::fs::write(&meta, &text).expect("write meta");

    let out = run_with_timeout(
        Command::new(bin_path("access-node"))
            .arg("serve")
            .arg("--image")
            .arg(&p.replica)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", p.port))
            .arg("--secret-file")
            .arg(&p.secret),
        TIMEOUT,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "exit status {}: {stderr}",
        out.status
    );
    assert!(
        stderr.contains("replica.img.meta is damaged") && stderr.contains("remove it"),
        "the refusal does not name the file and the remedy: {stderr}"
    );
    eprintln!("refused: {}", stderr.trim());
    let out = run_with_timeout(
        Command::new(bin_path("access-node"))
            .args(["promote", "--image"])
            .arg(&p.replica),
        TIMEOUT,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("replica.img.meta is damaged"),
        "promote --image on damaged metadata: {} {stderr}",
        out.status
    );
    assert_eq!(std::fs::read(&meta).expect("read meta"), text, "changed");

    std::fs::remove_file(&meta).expect("remove meta");
    let mut node = p.node_on(&p.replica);
    let mut b = p.serve(&p.primary, true);
    let st = wait_in_sync(&mut b, SYNC_TIMEOUT);
    assert_eq!(
        status_u64(&st, "resync_total_bytes"),
        32 * MIB,
        "{}",
        pretty(&st)
    );
    stop(&mut b);
    stop_node(&mut node);
    compare_files(&p.primary, &p.replica).unwrap_or_else(|e| panic!("images differ: {e}"));
}
