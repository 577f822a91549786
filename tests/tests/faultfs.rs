//! faultfs tier: the power-loss layer loses exactly what a host with a volatile write cache
//! would lose, keeps what was fsynced, and injects errors as asked.
//!
//! Every test mounts its own faultfs in its own temp dir; the daemon is stopped and the mount
//! detached on drop, also when an assertion fails. Files are opened through the mount
//! (`fs.path()`); `fs.backing()` shows the durable state directly.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use vhost_mirror_tests::faultfs::{is_mounted, FaultFs};
use vhost_mirror_tests::{pattern, test_dir, wait_until, Watchdog, TIMEOUT};

const PAGE: usize = 4096;
const MIB: usize = 1024 * 1024;

/// Per-test resources; fields drop in order: the mount first, then the temp dir.
struct Fx {
    fs: FaultFs,
    _dir: tempfile::TempDir,
    _wd: Watchdog,
}

fn fixture(name: &str) -> Fx {
    let wd = Watchdog::new(name, Duration::from_secs(120));
    let dir = test_dir(name);
    let fs = FaultFs::mount(dir.path());
    Fx {
        fs,
        _dir: dir,
        _wd: wd,
    }
}

/// Offset-dependent test data at any byte offset and length (`pattern` needs 8-byte alignment).
fn pat(off: usize, len: usize, seed: u64) -> Vec<u8> {
    let start = off & !7;
    let end = (off + len + 7) & !7;
    pattern(start as u64, end - start, seed)[off - start..off - start + len].to_vec()
}

fn open_rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Creates `path` with `data` and fsyncs it (the durable starting point of a test).
fn create_synced(path: &Path, data: &[u8]) {
    let f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all_at(data, 0).expect("write");
    f.sync_all().expect("fsync");
}

fn read_all(f: &File) -> Vec<u8> {
    let len = f.metadata().expect("fstat").len() as usize;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, 0).expect("read");
    buf
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

fn fallocate(f: &File, mode: i32, off: usize, len: usize) -> io::Result<()> {
    // SAFETY: fallocate on a descriptor we own; no memory is passed.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn flock_nb(f: &File, op: i32) -> io::Result<()> {
    // SAFETY: flock on a descriptor we own; no memory is passed.
    if unsafe { libc::flock(f.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[test]
fn unsynced_write_is_lost_on_cut() {
    let fx = fixture("ffs-cut");
    let img = fx.fs.path().join("IMG");
    let old = pat(0, 4 * PAGE, 1);
    create_synced(&img, &old);

    let f = open_rw(&img);
    let new = pat(1000, 2 * PAGE, 2);
    f.write_all_at(&new, 1000).expect("write");
    // A write past the end extends the file, volatilely.
    f.write_all_at(b"tail", (4 * PAGE + 100) as u64)
        .expect("write past EOF");
    assert_eq!(f.metadata().expect("fstat").len(), (4 * PAGE + 104) as u64);
    let mut want = old.clone();
    want[1000..1000 + 2 * PAGE].copy_from_slice(&new);
    want.resize(4 * PAGE + 100, 0);
    want.extend_from_slice(b"tail");
    assert_eq!(read_all(&f), want, "reads see the unsynced writes");
    assert_eq!(
        fs::read(fx.fs.backing().join("IMG")).expect("read backing"),
        old,
        "nothing reaches the backing file before an fsync"
    );
    let st = fx.fs.stats();
    assert_eq!(st.dirty_files, 1, "{st:?}");
    assert_eq!(
        st.dirty_bytes,
        4 * PAGE as u64,
        "pages 0, 1, 2 and 4: {st:?}"
    );

    assert_eq!(fx.fs.cut(), 4 * PAGE as u64);
    // Through the same descriptor: old data, old size.
    assert_eq!(f.metadata().expect("fstat").len(), old.len() as u64);
    assert_eq!(read_all(&f), old);
    drop(f);
    // And across a reopen.
    assert_eq!(fs::read(&img).expect("reread"), old);
    assert_eq!(fx.fs.stats().dirty_bytes, 0);
}

#[test]
fn fdatasync_keeps_data_and_later_writes_are_lost() {
    let fx = fixture("ffs-fdatasync");
    let img = fx.fs.path().join("IMG");
    let old = pat(0, 4 * PAGE, 1);
    create_synced(&img, &old);

    let f = open_rw(&img);
    let kept = pat(PAGE, PAGE, 2);
    f.write_all_at(&kept, PAGE as u64).expect("write");
    let grown = pat(4 * PAGE, 100, 2);
    f.write_all_at(&grown, 4 * PAGE as u64)
        .expect("write past EOF");
    f.sync_data().expect("fdatasync");
    assert_eq!(fx.fs.stats().dirty_bytes, 0);
    // Written after the fdatasync: lost.
    f.write_all_at(&pat(3 * PAGE, PAGE, 3), 3 * PAGE as u64)
        .expect("write");

    let mut want = old.clone();
    want[PAGE..2 * PAGE].copy_from_slice(&kept);
    want.extend_from_slice(&grown);
    assert_eq!(
        fs::read(fx.fs.backing().join("IMG")).expect("read backing"),
        want,
        "the fdatasync wrote the data and the new size to the backing file"
    );
    assert_eq!(fx.fs.cut(), PAGE as u64);
    assert_eq!(read_all(&f), want);
    drop(f);
    assert_eq!(fs::read(&img).expect("reread"), want);

    // O_DSYNC writes are durable when they return.
    let g = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DSYNC)
        .open(fx.fs.path().join("dsync"))
        .expect("open O_DSYNC");
    g.write_all_at(b"durable", 0).expect("write");
    fx.fs.cut();
    assert_eq!(
        fs::read(fx.fs.path().join("dsync")).expect("read"),
        b"durable"
    );
}

#[test]
fn fsynced_temp_renamed_over_survives_cut() {
    let fx = fixture("ffs-rename-synced");
    let dir = fx.fs.path().join("host");
    fs::create_dir(&dir).expect("mkdir");
    let meta = dir.join("IMG.meta");
    create_synced(&meta, b"generation 1\n");

    let tmp = dir.join("IMG.meta.tmp");
    create_synced(&tmp, b"generation 2, a longer document\n");
    fs::rename(&tmp, &meta).expect("rename");
    File::open(&dir)
        .expect("open dir")
        .sync_all()
        .expect("fsync dir");
    assert_eq!(fx.fs.stats().dir_fsyncs, 1);

    assert_eq!(fx.fs.cut(), 0, "nothing was dirty");
    assert_eq!(
        fs::read(&meta).expect("read"),
        b"generation 2, a longer document\n"
    );
    assert!(!tmp.exists());
}

#[test]
fn unsynced_temp_renamed_over_is_empty_after_cut() {
    let fx = fixture("ffs-rename-unsynced");
    let meta = fx.fs.path().join("IMG.meta");
    create_synced(&meta, b"generation 1\n");

    // The classic bug: write a temp file, rename it over, no fsync of the temp file.
    let tmp = fx.fs.path().join("IMG.meta.tmp");
    fs::write(&tmp, b"generation 2\n").expect("write tmp");
    fs::rename(&tmp, &meta).expect("rename");
    assert_eq!(fs::read(&meta).expect("read"), b"generation 2\n");

    assert!(fx.fs.cut() > 0);
    // The rename is durable (namespace operations are, in the model), the data is not: the
    // old content is gone and the new file is empty.
    assert_eq!(
        fs::read(&meta).expect("read after cut"),
        b"",
        "renamed-over file lost its unsynced data"
    );
    assert!(!tmp.exists());
}

#[test]
fn dirty_data_of_a_deleted_file_is_discarded() {
    let fx = fixture("ffs-unlink");
    let img = fx.fs.path().join("IMG");
    fs::write(&img, vec![1u8; 3 * PAGE]).expect("write");
    assert_eq!(fx.fs.stats().dirty_files, 1);
    fs::remove_file(&img).expect("unlink");
    // The kernel sends the close's RELEASE asynchronously: until it arrives the file counts
    // as open (and keeps its data, below). Look for a moment.
    wait_until(Duration::from_secs(5), || fx.fs.stats().dirty_files == 0);
    let st = fx.fs.stats();
    assert_eq!((st.dirty_files, st.dirty_bytes), (0, 0), "{st:?}");

    // An open file keeps its data after the unlink, until it is closed.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&img)
        .expect("create");
    f.write_all_at(b"still readable", 0).expect("write");
    fs::remove_file(&img).expect("unlink");
    let mut b = [0u8; 14];
    f.read_exact_at(&mut b, 0).expect("read unlinked");
    assert_eq!(&b, b"still readable");
    drop(f);
    assert!(wait_until(TIMEOUT, || fx.fs.stats().dirty_files == 0));
}

#[test]
fn killed_daemon_leaves_no_mount() {
    let dir = test_dir("ffs-kill");
    let mut fs = FaultFs::mount(dir.path());
    fs::write(fs.path().join("IMG"), b"dirty").expect("write");
    fs.kill();
    assert!(!is_mounted(fs.path()), "the dead mount was detached");
    assert_eq!(
        fs::read(fs.backing().join("IMG")).expect("read backing"),
        b"",
        "a killed daemon writes nothing back"
    );
}

#[test]
fn vectored_io_and_reads_across_dirty_and_clean_pages() {
    let fx = fixture("ffs-vectored");
    let img = fx.fs.path().join("IMG");
    let old = pat(0, 8 * PAGE, 1);
    create_synced(&img, &old);
    let f = open_rw(&img);

    // pwritev of three unaligned buffers spanning pages 0..3.
    let bufs = [pat(4000, 100, 2), pat(4100, 5000, 3), pat(9100, 3000, 4)];
    let iov: Vec<libc::iovec> = bufs
        .iter()
        .map(|b| libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: the iovecs point into `bufs`, which outlive the call; pwritev only reads them.
    let n = unsafe { libc::pwritev(f.as_raw_fd(), iov.as_ptr(), iov.len() as i32, 4000) };
    assert_eq!(n, 8100, "pwritev: {}", io::Error::last_os_error());
    let mut want = old.clone();
    let mut at = 4000;
    for b in &bufs {
        want[at..at + b.len()].copy_from_slice(b);
        at += b.len();
    }

    // preadv of the whole file into buffers of odd sizes.
    let mut outs = [
        vec![0u8; 3000],
        vec![0u8; 10_000],
        vec![0u8; 8 * PAGE - 13_000],
    ];
    let iov: Vec<libc::iovec> = outs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: the iovecs point into `outs`, which outlive the call and are not otherwise
    // borrowed while preadv writes them.
    let n = unsafe { libc::preadv(f.as_raw_fd(), iov.as_ptr(), iov.len() as i32, 0) };
    assert_eq!(
        n,
        (8 * PAGE) as isize,
        "preadv: {}",
        io::Error::last_os_error()
    );
    assert_eq!(outs.concat(), want);

    // Reads that start in clean pages, cross dirty ones, and end in clean ones.
    for (off, len) in [
        (0, 8 * PAGE),
        (2 * PAGE - 10, 4 * PAGE),
        (3000, 1200),
        (12_000, 200),
    ] {
        let mut b = vec![0u8; len];
        f.read_exact_at(&mut b, off as u64).expect("read");
        assert_eq!(b, want[off..off + len], "read {off}+{len}");
    }
    // A read past the end is short.
    let mut b = vec![0u8; 2 * PAGE];
    assert_eq!(f.read_at(&mut b, (7 * PAGE) as u64).expect("read"), PAGE);

    f.sync_all().expect("fsync");
    fx.fs.cut();
    assert_eq!(read_all(&f), want);
}

#[test]
fn fallocate_punch_and_zero_range_are_volatile() {
    let fx = fixture("ffs-fallocate");
    let img = fx.fs.path().join("IMG");
    let old = pat(0, 16 * PAGE, 1);
    create_synced(&img, &old);
    let f = open_rw(&img);
    let keep = libc::FALLOC_FL_KEEP_SIZE;

    fallocate(&f, libc::FALLOC_FL_PUNCH_HOLE | keep, 1000, 5 * PAGE).expect("punch");
    fallocate(&f, libc::FALLOC_FL_ZERO_RANGE | keep, 10 * PAGE, 2 * PAGE).expect("zero");
    // A huge zero range that also extends the file: one zero run, no 1 GiB of pages.
    let huge = 1 << 30;
    fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, 14 * PAGE, huge).expect("zero+extend");
    assert_eq!(
        f.metadata().expect("fstat").len(),
        (14 * PAGE + huge) as u64
    );
    let mut want = old.clone();
    want[1000..1000 + 5 * PAGE].fill(0);
    want[10 * PAGE..12 * PAGE].fill(0);
    want[14 * PAGE..].fill(0);
    let mut b = vec![0u8; 16 * PAGE];
    f.read_exact_at(&mut b, 0).expect("read");
    assert_eq!(b, want);
    let mut far = vec![1u8; PAGE];
    f.read_exact_at(&mut far, (14 * PAGE + huge - PAGE) as u64)
        .expect("read far");
    assert!(far.iter().all(|&x| x == 0));

    assert!(fx.fs.cut() > huge as u64);
    assert_eq!(f.metadata().expect("fstat").len(), old.len() as u64);
    assert_eq!(read_all(&f), old, "punch and zero-range were not durable");

    // Once fsynced, zeroing is durable.
    fallocate(&f, libc::FALLOC_FL_PUNCH_HOLE | keep, 2 * PAGE, 3 * PAGE).expect("punch");
    f.sync_data().expect("fdatasync");
    fx.fs.cut();
    let mut want = old.clone();
    want[2 * PAGE..5 * PAGE].fill(0);
    assert_eq!(read_all(&f), want);
    assert_eq!(
        fs::read(fx.fs.backing().join("IMG")).expect("read backing"),
        want
    );
}

#[test]
fn truncate_and_namespace_operations_are_durable_at_once() {
    let fx = fixture("ffs-namespace");
    let root = fx.fs.path();
    fs::create_dir_all(root.join("a/b")).expect("mkdir -p");
    create_synced(&root.join("a/b/f1"), &pat(0, 4 * PAGE, 1));
    fs::write(root.join("a/f2"), b"x").expect("write f2");
    fs::create_dir(root.join("d")).expect("mkdir d");
    let mut names: Vec<String> = fs::read_dir(root.join("a"))
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["b", "f2"]);

    fs::rename(root.join("a/b"), root.join("a/c")).expect("rename dir");
    fs::remove_file(root.join("a/f2")).expect("unlink");
    fs::remove_dir(root.join("d")).expect("rmdir");
    let f1 = root.join("a/c/f1");
    let f = open_rw(&f1);
    f.set_len(PAGE as u64).expect("truncate");
    f.set_len(3 * PAGE as u64).expect("extend");

    let p = std::ffi::CString::new(root.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs reads a NUL-terminated path and fills in the struct we own.
    let r = unsafe { libc::statvfs(p.as_ptr(), &mut st) };
    assert_eq!(r, 0, "statvfs: {}", io::Error::last_os_error());
    assert!(st.f_blocks > 0 && st.f_bsize > 0);

    fx.fs.cut();
    assert!(!root.join("a/b").exists());
    assert!(!root.join("a/f2").exists());
    assert!(!root.join("d").exists());
    let mut want = pat(0, PAGE, 1);
    want.resize(3 * PAGE, 0);
    assert_eq!(
        read_all(&f),
        want,
        "the truncation and extension survive the cut"
    );
}

#[test]
fn injected_fsync_eio_drops_dirty_data_and_is_reported_once() {
    let fx = fixture("ffs-fsync-eio");
    let img = fx.fs.path().join("IMG");
    let old = pat(0, 2 * PAGE, 1);
    create_synced(&img, &old);
    let f = open_rw(&img);
    f.write_all_at(&pat(0, PAGE, 2), 0).expect("write");

    fx.fs.fail("fsync", "IMG", "EIO", Some(1));
    let e = f.sync_data().expect_err("injected fsync error");
    assert_eq!(errno(&e), libc::EIO, "{e}");
    // As on Linux after a writeback error: the dirty pages were dropped (marked clean) ...
    assert_eq!(
        read_all(&f),
        old,
        "the failed fsync dropped the unwritten data"
    );
    // ... and the next fsync "succeeds": code that retries fsync has lost data silently.
    f.sync_data().expect("second fsync succeeds");
    fx.fs.cut();
    assert_eq!(read_all(&f), old);
    let st = fx.fs.stats();
    assert_eq!(st.injected, 1, "{st:?}");
    assert!(st.fsyncs >= 3, "{st:?}");
}

#[test]
fn injected_write_enospc_and_read_eio_with_counts() {
    let fx = fixture("ffs-enospc");
    let root = fx.fs.path();
    fs::create_dir(root.join("host")).expect("mkdir");
    let img = root.join("host/IMG");
    let other = root.join("other.dat");
    create_synced(&img, &pat(0, PAGE, 1));
    create_synced(&other, &pat(0, PAGE, 1));
    let f = open_rw(&img);
    let g = open_rw(&other);

    fx.fs.fail("write", "host/IMG", "ENOSPC", Some(2));
    for _ in 0..2 {
        let e = f.write_at(b"x", 0).expect_err("injected ENOSPC");
        assert_eq!(errno(&e), libc::ENOSPC, "{e}");
    }
    g.write_all_at(b"other files are not affected", 0)
        .expect("write other");
    f.write_all_at(b"third write passes", 0).expect("write");

    fx.fs.fail("read", "IMG", "EIO", Some(1));
    let mut b = [0u8; 18];
    let e = f.read_exact_at(&mut b, 0).expect_err("injected EIO");
    assert_eq!(errno(&e), libc::EIO, "{e}");
    f.read_exact_at(&mut b, 0).expect("second read passes");
    assert_eq!(&b, b"third write passes");

    fx.fs.fail("any", ".dat", "EIO", None);
    for _ in 0..3 {
        assert!(g.read_at(&mut b, 0).is_err());
        assert!(g.write_at(b"y", 0).is_err());
        assert!(g.sync_all().is_err());
    }
    f.sync_all().expect("IMG is not matched by .dat");
    fx.fs.clear();
    g.read_exact_at(&mut b, 0).expect("read after clear");
    g.sync_all().expect("fsync after clear");
    assert_eq!(fx.fs.stats().injected, 2 + 1 + 9);

    // Protocol errors come back as "err ...".
    assert!(fx.fs.command("fail open x EIO").is_err());
    assert!(fx.fs.command("fail read x EPERM").is_err());
    assert!(fx.fs.command("bogus").is_err());
}

#[test]
fn flock_conflicts_and_processes_share_one_inode() {
    let fx = fixture("ffs-flock");
    let img = fx.fs.path().join("IMG");
    create_synced(&img, &[0u8; PAGE]);
    let a = open_rw(&img);
    let b = open_rw(&img);

    flock_nb(&a, libc::LOCK_EX).expect("first LOCK_EX");
    let e = flock_nb(&b, libc::LOCK_EX).expect_err("second open description conflicts");
    assert_eq!(errno(&e), libc::EWOULDBLOCK, "{e}");
    // Another process (flock(1) from util-linux) conflicts too.
    let st = Command::new("flock")
        .args(["-n", "-E", "75"])
        .arg(&img)
        .arg("true")
        .status()
        .expect("run flock(1)");
    assert_eq!(st.code(), Some(75), "flock -n in another process must fail");
    flock_nb(&a, libc::LOCK_UN).expect("unlock");
    flock_nb(&b, libc::LOCK_EX).expect("LOCK_EX after unlock");

    // Unsynced data written by this process is seen by another one (one inode, one cache).
    a.write_all_at(b"shared but not durable", 0).expect("write");
    let out = Command::new("head")
        .args(["-c", "22"])
        .arg(&img)
        .output()
        .expect("run head");
    assert_eq!(out.stdout, b"shared but not durable");
}

#[test]
fn clean_exit_writes_dirty_data_but_not_after_a_cut() {
    // A clean exit is not a power loss.
    let dir = test_dir("ffs-exit");
    let mut fs = FaultFs::mount(dir.path());
    let f = File::create(fs.path().join("IMG")).expect("create");
    f.write_all_at(b"written back at exit", 0).expect("write");
    drop(f);
    assert!(fs.stop().success(), "{}", fs.log());
    assert_eq!(
        fs::read(fs.backing().join("IMG")).expect("read backing"),
        b"written back at exit"
    );

    // After a cut, whatever is dirty at exit is dropped too.
    let mut fs = FaultFs::mount(dir.path());
    let f = File::create(fs.path().join("IMG")).expect("create");
    f.write_all_at(b"before", 0).expect("write");
    f.sync_all().expect("fsync");
    fs.cut();
    f.write_all_at(b"AFTER!", 0).expect("write");
    drop(f);
    assert!(fs.stop().success(), "{}", fs.log());
    assert_eq!(
        fs::read(fs.backing().join("IMG")).expect("read backing"),
        b"before"
    );
}

#[test]
fn large_file_with_scattered_writes_performs() {
    let fx = fixture("ffs-64m");
    let img = fx.fs.path().join("IMG");
    const SIZE: usize = 64 * MIB;
    let t0 = Instant::now();
    let f = File::create(&img).expect("create");
    let mut model = pat(0, SIZE, 1);
    for off in (0..SIZE).step_by(MIB) {
        f.write_all_at(&model[off..off + MIB], off as u64)
            .expect("fill");
    }
    f.sync_all().expect("fsync fill");
    let t_fill = t0.elapsed();

    // Scattered writes: 8192 aligned pages and 2048 unaligned 512-byte pieces.
    let t1 = Instant::now();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = |bound: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % bound as u64) as usize
    };
    for i in 0..10_240 {
        let (off, len) = if i % 5 == 4 {
            (next(SIZE - 512), 512)
        } else {
            (next(SIZE / PAGE) * PAGE, PAGE)
        };
        let data = pat(off, len, 2 + i as u64 % 3);
        f.write_all_at(&data, off as u64).expect("scattered write");
        model[off..off + len].copy_from_slice(&data);
    }
    let t_writes = t1.elapsed();
    let st = fx.fs.stats();
    assert!(st.dirty_bytes > 0 && st.dirty_files == 1, "{st:?}");

    let verify = |what: &str| {
        let r = File::open(&img).expect("open");
        let mut b = vec![0u8; MIB];
        for off in (0..SIZE).step_by(MIB) {
            r.read_exact_at(&mut b, off as u64).expect("read");
            assert!(
                b == model[off..off + MIB],
                "{what}: mismatch in MiB at {off:#x}"
            );
        }
    };
    let t2 = Instant::now();
    verify("dirty");
    let t_read = t2.elapsed();
    let t3 = Instant::now();
    f.sync_all().expect("fsync");
    let t_sync = t3.elapsed();
    assert_eq!(fx.fs.cut(), 0);
    verify("after fsync and cut");
    eprintln!(
        "64 MiB: fill+fsync {t_fill:?}, 10240 scattered writes {t_writes:?}, \
         read 64 MiB {t_read:?}, fsync {t_sync:?}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "too slow: {:?}",
        t0.elapsed()
    );
}
