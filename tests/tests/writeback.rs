//! Writeback tier: a replica whose disk loses a write while the kernel's page cache keeps it.
//!
//! After a failed writeback, Linux reports the error to `fdatasync` once and keeps the lost
//! data in page-cache pages it marks clean, serving it to every later read. faultfs cannot
//! show that (its files are direct I/O), so here the replica's image is a loop block device
//! (`LoopDevice`, buffered: the block device's page cache sits above it) over a file on a
//! faultfs mount: `fail write` there makes the device's writeback fail.
//!
//! Every test has its own temp dir, faultfs mount, loop device (a device node in the temp dir
//! is the replica's image, so its `.meta`/`.bitmap` files land beside it), ports and
//! processes; all of them go away on drop, also when an assertion fails (processes first,
//! then the loop device, then the mount). Needs root and loop devices: without them the
//! tests fail, saying what is missing.
//!
//! Run: `cargo build --workspace && cargo test -p vhost-mirror-tests --test writeback`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use vhost_mirror_tests::faultfs::FaultFs;
use vhost_mirror_tests::loopdev::LoopDevice;
use vhost_mirror_tests::{
    check_pattern, compare_files, pattern, run_with_timeout, status_str, status_u64, wait_in_sync,
    wait_status, AccessNode, AccessNodeOpts, Backend, Client, Pair, Watchdog, REGION, TIMEOUT,
};

const MIB: u64 = 1024 * 1024;
const BLOCK: u64 = 4096;
/// The replica's disk (a file on the faultfs mount, under the loop device).
const DISK: &str = "replica-disk";
const SIZE: u64 = 16 * MIB;
const SYNC_TIMEOUT: Duration = Duration::from_secs(20);

fn usz(x: u64) -> usize {
    usize::try_from(x).expect("usize")
}

/// A pair whose replica image is a loop device over a faultfs file. Fields drop in order:
/// the loop device lets go of the faultfs file before faultfs stops, then the temp dir goes.
/// Declare the processes after it (they drop first).
struct Setup {
    _dev: LoopDevice,
    fs: FaultFs,
    pair: Pair,
}

impl Setup {
    fn new(name: &str) -> Setup {
        let pair = Pair::new(name, SIZE);
        let fs = FaultFs::mount(pair.dir.path());
        let disk = fs.path().join(DISK);
        let f = File::create(&disk).unwrap_or_else(|e| panic!("create {}: {e}", disk.display()));
        f.set_len(SIZE).expect("size the replica's disk");
        f.sync_all().expect("fsync the replica's disk");
        drop(f);
        let dev = LoopDevice::attach(&disk);
        dev.mknod(&pair.replica);
        Setup {
            _dev: dev,
            fs,
            pair,
        }
    }

    /// The replica's durable content: the disk file as faultfs holds it on its backing store.
    fn durable_disk(&self) -> PathBuf {
        self.fs.backing().join(DISK)
    }
}

/// Reads `len` bytes at `off` of the block device past its page cache (`O_DIRECT`): what
/// the disk holds.
fn read_direct(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} O_DIRECT: {e}", path.display()));
    let mut raw = vec![0u8; len + usz(BLOCK)];
    let skip = raw.as_ptr().align_offset(usz(BLOCK));
    let buf = &mut raw[skip..skip + len];
    f.read_exact_at(buf, off)
        .unwrap_or_else(|e| panic!("O_DIRECT read of {} at {off:#x}: {e}", path.display()));
    buf.to_vec()
}

/// Reads through the page cache.
fn read_cached(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, off)
        .unwrap_or_else(|e| panic!("read {} at {off:#x}: {e}", path.display()));
    buf
}

/// Writes `seed`'s pattern to one block through the guest, and flushes if `flush`.
fn guest_write(b: &Backend, off: u64, seed: u64, flush: bool) {
    let mut c = Client::connect(b.socket());
    let q = c.q();
    assert_eq!(
        q.write(off, &pattern(off, usz(BLOCK), seed)),
        Ok(()),
        "write {off:#x}"
    );
    if flush {
        assert_eq!(q.flush(), Ok(()), "flush");
        // A second FLUSH, no write since: not the fsync pattern (one write, one FLUSH), so
        // neither side starts an early fdatasync after the next write, which these tests
        // need acknowledged and not yet written back.
        assert_eq!(q.flush(), Ok(()), "flush");
    }
}

/// With the replica's disk failing writes, the block the guest just wrote at `off` is lost
/// there: its writeback fails (the kernel reports it to our `fdatasync`), and the page stays
/// in the cache, clean, holding `new` while the disk holds `old`. Checks each step of that.
fn lose_in_writeback(s: &Setup, off: u64, old: u64, new: u64) {
    let img = &s.pair.replica;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap_or_else(|e| panic!("open {}: {e}", img.display()));
    let e = f
        .sync_data()
        .expect_err("fdatasync of the replica's device succeeded while its writes fail");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "fdatasync: {e}");
    f.sync_data().expect(
        "a second fdatasync (the kernel reports a writeback error once; the page is clean)",
    );
    check_pattern(&read_cached(img, off, usz(BLOCK)), off, new)
        .unwrap_or_else(|e| panic!("the page cache does not hold the lost write: {e}"));
    check_pattern(&read_direct(img, off, usz(BLOCK)), off, old)
        .unwrap_or_else(|e| panic!("the replica's disk does not hold the old block: {e}"));
}

/// `vhost-mirror verify --json`: exit code and output.
fn run_verify(b: &Backend) -> (Option<i32>, String) {
    let out = b.control_cmd("verify", &["--json"], Duration::from_secs(30));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

fn stop_all(b: &mut Backend, node: &mut AccessNode) {
    let st = b.terminate(TIMEOUT);
    assert!(st.success(), "vhost-mirror exit {st}; log:\n{}", b.log());
    let st = node.terminate(TIMEOUT);
    assert!(st.success(), "access-node exit {st}; log:\n{}", node.log());
}

/// Verify compares what the replica's disk holds: a write whose writeback failed there, still
/// served by the kernel from a clean page, is a difference (found, marked, resynced), not a
/// match. Without the replica dropping the range's clean pages before it hashes, verify calls
/// the pair identical while the replica's disk lacks the block.
#[test]
fn verify_sees_a_write_lost_behind_a_clean_page() {
    let _wd = Watchdog::new(
        "verify_sees_a_write_lost_behind_a_clean_page",
        Duration::from_secs(60),
    );
    let s = Setup::new("wb-verify");
    let mut node = s.pair.node();
    let mut b = s.pair.mirror();
    wait_in_sync(&mut b, SYNC_TIMEOUT);

    let at = 5 * MIB + 3 * BLOCK;
    let (old, new) = (0x0d1d, 0x4e3);
    guest_write(&b, at, old, true);
    s.fs.fail("write", &format!("{DISK}$"), "EIO", None);
    guest_write(&b, at, new, false);
    lose_in_writeback(&s, at, old, new);
    s.fs.clear();

    let (code, text) = run_verify(&b);
    assert_eq!(
        code,
        Some(1),
        "verify must report the block at {at:#x}: the replica's disk lacks the write (its \
         writeback failed; the kernel serves it from a clean page): {text}"
    );
    let v: serde_json::Value = serde_json::from_str(text.trim()).expect("verify --json output");
    assert_eq!(v["different_bytes"], BLOCK, "{text}");
    assert_eq!(v["ranges"][0][0], at, "{text}");

    // The repair: the resync sends the block (the replica's next fdatasync reports the old
    // error, so it takes a failed Flush and a reconnect).
    wait_in_sync(&mut b, SYNC_TIMEOUT);
    stop_all(&mut b, &mut node);
    compare_files(&s.pair.primary, &s.durable_disk())
        .unwrap_or_else(|e| panic!("the replica's disk after the repair: {e}"));
}

/// A block written but not yet written back when verify asks for its hashes: the replica
/// reads with `O_DIRECT`, which first writes the range's dirty pages back, and here that
/// writeback fails. Verify must not call the block equal (the replica answers the ReadHashes
/// with an I/O error: the run stops, exit 2), and the read must not swallow the error: the
/// replica's next `fdatasync` still reports it (`fdatasync` reports writeback errors through
/// the mapping's errseq, sampled per open file, which a read does not advance), so the
/// replica records itself outdated and the pair resyncs the block.
#[test]
fn a_writeback_failed_by_verifys_read_is_still_reported_by_the_next_fdatasync() {
    let _wd = Watchdog::new(
        "a_writeback_failed_by_verifys_read_is_still_reported_by_the_next_fdatasync",
        Duration::from_secs(60),
    );
    let s = Setup::new("wb-direct");
    let mut node = s.pair.node();
    let mut b = s.pair.mirror();
    wait_in_sync(&mut b, SYNC_TIMEOUT);

    let at = 7 * MIB + 2 * BLOCK;
    let (old, new) = (0x1d1d, 0x2e2e);
    guest_write(&b, at, old, true);
    s.fs.fail("write", &format!("{DISK}$"), "EIO", None);
    // Acknowledged, in the replica's page cache, not flushed.
    guest_write(&b, at, new, false);
    assert!(
        !node.log().contains("fdatasync failed"),
        "an fdatasync failed before the verify:\n{}",
        node.log()
    );

    let (code, text) = run_verify(&b);
    assert_eq!(
        code,
        Some(2),
        "verify must stop: the replica's read of {at:#x} must fail (its writeback failed), \
         not hash the page cache: {text}"
    );
    let log = node.log();
    assert!(
        log.contains("read (O_DIRECT) failed"),
        "the replica's O_DIRECT read did not fail:\n{log}"
    );
    s.fs.clear();

    // The failure is not forgotten: the replica's next fdatasync (the resync's Flush after
    // the link dropped) reports it, and the pair ends in sync with the block on the disk.
    wait_in_sync(&mut b, SYNC_TIMEOUT);
    let log = node.log();
    assert!(
        log.contains("fdatasync failed"),
        "the replica's fdatasync never reported the writeback that failed under verify's \
         read:\n{log}"
    );
    stop_all(&mut b, &mut node);
    compare_files(&s.pair.primary, &s.durable_disk())
        .unwrap_or_else(|e| panic!("the replica's disk after the repair: {e}"));
}

/// The access node is killed after the failed writeback and restarted on the image (the
/// failure forgotten with the process, the page cache intact); the primary resyncs the dead
/// link's unflushed ranges by comparing block hashes: the lost block must be found different
/// and sent, the rest of its region found equal. Two drops of clean pages cover this today:
/// the replica's whole-file drop when a primary attaches, and the range's drop before it
/// hashes; the test fails only without both (the block is skipped and the pair says in sync).
#[test]
fn a_restarted_replica_resyncs_a_write_lost_behind_a_clean_page() {
    let _wd = Watchdog::new(
        "a_restarted_replica_resyncs_a_write_lost_behind_a_clean_page",
        Duration::from_secs(60),
    );
    let s = Setup::new("wb-restart");
    let mut node = s.pair.node();
    let mut b = s.pair.mirror();
    wait_in_sync(&mut b, SYNC_TIMEOUT);

    let at = 9 * MIB + 5 * BLOCK;
    let (old, new) = (0x01d, 0x2e3);
    guest_write(&b, at, old, true);
    s.fs.fail("write", &format!("{DISK}$"), "EIO", None);
    guest_write(&b, at, new, false);
    lose_in_writeback(&s, at, old, new);
    node.kill();
    let st = wait_status(&mut b, TIMEOUT, |v| {
        status_str(v, "peer_state") == "disconnected"
    })
    .unwrap_or_else(|v| panic!("peer not disconnected after the kill: {v}"));
    let (sent0, same0) = (
        status_u64(&st, "resync_sent_bytes"),
        status_u64(&st, "resync_same_bytes"),
    );
    s.fs.clear();

    let mut node = s.pair.node();
    let st = wait_in_sync(&mut b, SYNC_TIMEOUT);
    let sent = status_u64(&st, "resync_sent_bytes") - sent0;
    let same = status_u64(&st, "resync_same_bytes") - same0;
    assert_eq!(
        (sent, same),
        (BLOCK, REGION - BLOCK),
        "the resync of the lost block's region (bytes sent, bytes found equal): {st}"
    );
    stop_all(&mut b, &mut node);
    compare_files(&s.pair.primary, &s.durable_disk())
        .unwrap_or_else(|e| panic!("the replica's disk after the resync: {e}"));
}

/// An ext4 filesystem on a loop device, mounted on a directory of the test's; unmounted on
/// drop (before the loop device goes).
struct Ext4Mount {
    dir: PathBuf,
}

impl Ext4Mount {
    /// `mkfs.ext4` (no journal: a failed journal write cannot turn the filesystem read-only
    /// while the disk fails writes) and `mount` on `dir`. Panics, with the tools' output, if
    /// either is missing or fails.
    fn new(dev: &Path, dir: &Path) -> Ext4Mount {
        let out = run_with_timeout(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-b", "4096", "-O", "^has_journal"])
                .arg(dev),
            Duration::from_secs(30),
        );
        assert!(
            out.status.success(),
            "this test needs mkfs.ext4: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::create_dir(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let out = run_with_timeout(
            Command::new("mount")
                .args(["-t", "ext4", "-o", "errors=continue"])
                .arg(dev)
                .arg(dir),
            TIMEOUT,
        );
        assert!(
            out.status.success(),
            "mount {} on {}: {}: {}",
            dev.display(),
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ext4Mount {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for Ext4Mount {
    fn drop(&mut self) {
        let out = run_with_timeout(Command::new("umount").arg(&self.dir), TIMEOUT);
        if !out.status.success() {
            eprintln!(
                "umount {}: {}",
                self.dir.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// The replica's image is a file on ext4, whose page cache holds large folios: a 1 MiB write
/// lands in folios larger than a block. A write lost in its writeback inside such a folio
/// must be found by a verify of any range holding it. `POSIX_FADV_DONTNEED` drops only the
/// folios wholly inside its range, so a drop of exactly the hashed range leaves this one (and
/// its lost data) in place: a verify of the block alone calls it equal, while one of the
/// whole device (4 MiB spans) finds it.
#[test]
fn verify_of_a_range_sees_a_write_lost_inside_a_large_folio() {
    let _wd = Watchdog::new(
        "verify_of_a_range_sees_a_write_lost_inside_a_large_folio",
        Duration::from_secs(60),
    );
    let pair = Pair::new("wb-folio", SIZE);
    let fs = FaultFs::mount(pair.dir.path());
    let disk = fs.path().join(DISK);
    let f = File::create(&disk).unwrap_or_else(|e| panic!("create {}: {e}", disk.display()));
    f.set_len(4 * SIZE).expect("size the replica's disk");
    f.sync_all().expect("fsync the replica's disk");
    drop(f);
    let dev = LoopDevice::attach(&disk);
    let ext = Ext4Mount::new(dev.path(), &pair.dir.path().join("ext4"));
    let replica = ext.dir.join("replica.img");
    let mut node = AccessNode::spawn(
        pair.dir.path(),
        &replica,
        pair.port,
        &pair.secret,
        &AccessNodeOpts::default(),
    );
    let mut b = pair.mirror();
    wait_in_sync(&mut b, SYNC_TIMEOUT);

    let base = 4 * MIB;
    let at = base + 8 * BLOCK;
    let (old, new) = (0x0f01, 0x0f02);
    guest_write_len(&b, base, 2 * MIB, old, true);
    fs.fail("write", &format!("{DISK}$"), "EIO", None);
    guest_write_len(&b, base, MIB, new, false);
    {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&replica)
            .unwrap_or_else(|e| panic!("open {}: {e}", replica.display()));
        let e = f
            .sync_data()
            .expect_err("fdatasync of the replica's image succeeded while its disk fails writes");
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "fdatasync: {e}");
    }
    fs.clear();
    check_pattern(&read_cached(&replica, at, usz(BLOCK)), at, new)
        .unwrap_or_else(|e| panic!("the page cache does not hold the lost write: {e}"));
    check_pattern(&read_direct(&replica, at, usz(BLOCK)), at, old)
        .unwrap_or_else(|e| panic!("the replica's disk does not hold the old block: {e}"));

    let out = b.control_cmd(
        "verify",
        &[
            "--json",
            "--offset",
            &at.to_string(),
            "--length",
            &BLOCK.to_string(),
        ],
        Duration::from_secs(30),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "verify of the block at {at:#x} must report it: the replica's disk lacks the write \
         (the kernel serves it from a clean large folio): {text}"
    );
    wait_in_sync(&mut b, SYNC_TIMEOUT);
    stop_all(&mut b, &mut node);
    compare_files(&pair.primary, &replica)
        .unwrap_or_else(|e| panic!("the replica's image after the repair: {e}"));
}

/// Writes `seed`'s pattern to `len` bytes at `off` through the guest, and flushes if `flush`.
fn guest_write_len(b: &Backend, off: u64, len: u64, seed: u64, flush: bool) {
    let mut c = Client::connect(b.socket());
    let q = c.q();
    assert_eq!(
        q.write(off, &pattern(off, usz(len), seed)),
        Ok(()),
        "write {off:#x}+{len:#x}"
    );
    if flush {
        assert_eq!(q.flush(), Ok(()), "flush");
    }
}
