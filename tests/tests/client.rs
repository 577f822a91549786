//! Client tier: a libblkio (and a raw virtio-driver) client against `vhost-mirror serve`.
//!
//! Every test has its own temp dir and backend process; children are killed on drop, also when
//! an assertion fails. `VHOST_MIRROR_TEST_BACKEND=qsd` points the I/O tests at
//! qemu-storage-daemon instead (status/CLI checks are skipped there).

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vhost_mirror_tests::raw::{self, BlkFeatures, Features, RawClient};
use vhost_mirror_tests::{
    bin_path, check_file_pattern, check_pattern, check_zeros, classify_block, create_image,
    errno_name, pattern, read_file_range, run_with_timeout, test_dir, write_file_pattern, Backend,
    BackendKind, BackendOpts, Client, ClientOpts, Counters, Op, Watchdog, TIMEOUT,
};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
const EIO: i32 = -libc::EIO;
const ENOTSUP: i32 = -libc::ENOTSUP;

/// Per-test resources; fields drop in order: backend (killed) first, temp dir last.
struct Fx {
    b: Backend,
    image: PathBuf,
    dir: tempfile::TempDir,
    _wd: Watchdog,
}

fn fixture(name: &str, size: u64, opts: &BackendOpts, init_seed: Option<u64>) -> Fx {
    let wd = Watchdog::new(name, Duration::from_secs(120));
    let dir = test_dir(name);
    let image = dir.path().join("disk.img");
    create_image(&image, size);
    if let Some(seed) = init_seed {
        write_file_pattern(&image, seed);
    }
    let b = Backend::spawn(dir.path(), &image, opts);
    Fx {
        b,
        image,
        dir,
        _wd: wd,
    }
}

fn opts() -> BackendOpts {
    BackendOpts::default()
}

fn is_qsd() -> bool {
    BackendKind::from_env() == BackendKind::Qsd
}

fn err_name(r: Result<(), i32>) -> String {
    match r {
        Ok(()) => "success".into(),
        Err(e) => errno_name(e),
    }
}

fn usz(x: u64) -> usize {
    usize::try_from(x).expect("usize")
}

/// 1. Pattern write + read-back over the whole device with 4 KiB and with 1 MiB requests; after
///    SIGTERM (client still connected) the backend exits 0, removes its socket, and the image
///    file holds the data.
#[test]
fn pattern_whole_device_4k_and_1m() {
    let size = 32 * MIB;
    let mut fx = fixture("pattern", size, &opts(), None);
    let mut c = Client::connect(fx.b.socket());
    assert_eq!(c.capacity(), size, "capacity");
    let q = c.q();

    // 4 KiB requests, QD32 (8192 writes, then 8192 reads).
    q.write_pattern(0, size, 4096, 32, 0xA1);
    q.verify_pattern(0, size, 4096, 32, 0xA1)
        .unwrap_or_else(|e| panic!("4 KiB pass, read back with 4 KiB: {e}"));
    // Reading with a different request size must see the same data.
    q.verify_pattern(0, size, usz(MIB), 4, 0xA1)
        .unwrap_or_else(|e| panic!("4 KiB pass, read back with 1 MiB: {e}"));

    // 1 MiB requests, QD4.
    q.write_pattern(0, size, usz(MIB), 4, 0xB2);
    q.verify_pattern(0, size, usz(MIB), 4, 0xB2)
        .unwrap_or_else(|e| panic!("1 MiB pass, read back with 1 MiB: {e}"));
    q.verify_pattern(0, size, 4096, 32, 0xB2)
        .unwrap_or_else(|e| panic!("1 MiB pass, read back with 4 KiB: {e}"));
    // A few QD1 requests of odd (sector-multiple) sizes at odd sector offsets.
    for (off, len) in [(512, 512), (3 * 512, 7 * 512), (size - 3 * 512, 3 * 512)] {
        let got = q.read(off, len).expect("QD1 read");
        check_pattern(&got, off, 0xB2).unwrap_or_else(|e| panic!("QD1 read: {e}"));
    }
    q.flush().expect("flush");

    // SIGTERM with the client still connected (like a running VM).
    let st = fx.b.terminate(TIMEOUT);
    assert!(
        st.success(),
        "backend exit status after SIGTERM: {st}; log:\n{}",
        fx.b.log()
    );
    assert!(
        !fx.b.socket().exists(),
        "socket {} still exists after SIGTERM",
        fx.b.socket().display()
    );
    drop(c);
    check_file_pattern(&fx.image, 0xB2).unwrap_or_else(|e| panic!("image file after SIGTERM: {e}"));
}

/// 2. Flush succeeds and is counted.
#[test]
fn flush_succeeds_and_is_counted() {
    let mut fx = fixture("flush", 8 * MIB, &opts(), None);
    let mut c = Client::connect(fx.b.socket());
    let before = fx.b.counters();
    let q = c.q();
    q.write(0, &pattern(0, 64 * 1024, 7)).expect("write");
    q.flush().expect("flush");
    q.flush().expect("second flush");
    // Flush with writes in flight at the same time.
    q.buf()[..4096].copy_from_slice(&pattern(8192, 4096, 7));
    q.submit(
        Op::Write {
            off: 8192,
            buf_off: 0,
            len: 4096,
        },
        1,
    );
    q.submit(Op::Flush, 2);
    for d in q.wait_all() {
        assert_eq!(d.result(), Ok(()), "request {} failed", d.user_data);
    }
    fx.b.assert_running();
    if let (Some(b), Some(a)) = (before, fx.b.counters()) {
        assert!(
            a.flushes >= b.flushes + 3,
            "flushes counter: before {b:?}, after {a:?}"
        );
        assert!(
            a.writes >= b.writes + 2,
            "writes counter: before {b:?}, after {a:?}"
        );
    }
}

/// 3. Discard and write-zeroes: the range reads back as zeros, neighbours keep their data.
#[test]
fn discard_and_write_zeroes() {
    let size = 16 * MIB;
    let mut fx = fixture("dwz", size, &opts(), None);
    let mut c = Client::connect(fx.b.socket());
    let dalign = u64::try_from(
        c.blkio()
            .get_i32("discard-alignment")
            .expect("discard-alignment"),
    )
    .expect("discard-alignment >= 0")
    .max(512);
    let max_discard = c
        .blkio()
        .get_u64("max-discard-len")
        .expect("max-discard-len");
    let max_wz = c
        .blkio()
        .get_u64("max-write-zeroes-len")
        .expect("max-write-zeroes-len");
    let seed = 0xD15C;
    let q = c.q();
    q.write_pattern(0, size, usz(MIB), 4, seed);
    let before = fx.b.counters();

    // Checks [off, off+len) is zero and `guard` bytes on each side still hold the pattern.
    let check = |q: &mut vhost_mirror_tests::ClientQueue, what: &str, off: u64, len: u64| {
        let guard = 4096;
        let data = q.read_range(off - guard, len + 2 * guard, usz(256 * KIB), 8);
        let g = usz(guard);
        let l = usz(len);
        check_pattern(&data[..g], off - guard, seed)
            .unwrap_or_else(|e| panic!("{what}: data before the range: {e}"));
        check_zeros(&data[g..g + l], off).unwrap_or_else(|e| panic!("{what}: {e}"));
        check_pattern(&data[g + l..], off + len, seed)
            .unwrap_or_else(|e| panic!("{what}: data after the range: {e}"));
    };

    // Discard a discard-aligned 256 KiB range.
    let off = MIB.next_multiple_of(dalign);
    let len = (256 * KIB).next_multiple_of(dalign);
    assert!(
        max_discard == 0 || len <= max_discard,
        "max-discard-len {max_discard}"
    );
    assert_eq!(q.discard(off, len), Ok(()), "discard {off:#x}+{len:#x}");
    check(q, "discard", off, len);

    // Write-zeroes (unmap allowed) on a sub-4 KiB, sector-aligned range inside a 4 KiB block.
    let off = 4 * MIB + 512;
    let len = 7 * 512;
    assert_eq!(
        q.write_zeroes(off, len, true),
        Ok(()),
        "write-zeroes {off:#x}+{len:#x}"
    );
    check(q, "write-zeroes (unmap, sub-4K)", off, len);

    // Write-zeroes without unmap, 1 MiB.
    let off = 6 * MIB;
    let len = MIB;
    assert!(
        max_wz == 0 || len <= max_wz,
        "max-write-zeroes-len {max_wz}"
    );
    assert_eq!(
        q.write_zeroes(off, len, false),
        Ok(()),
        "write-zeroes no-unmap"
    );
    check(q, "write-zeroes (no unmap)", off, len);

    // Write-zeroes with unmap, 512 KiB at an odd sector.
    let off = 9 * MIB + 3 * 512;
    let len = 512 * KIB;
    assert_eq!(q.write_zeroes(off, len, true), Ok(()), "write-zeroes unmap");
    check(q, "write-zeroes (unmap)", off, len);

    // The rest of the device is untouched.
    let zeroed = [
        (
            MIB.next_multiple_of(dalign),
            (256 * KIB).next_multiple_of(dalign),
        ),
        (4 * MIB + 512, 7 * 512),
        (6 * MIB, MIB),
        (9 * MIB + 3 * 512, 512 * KIB),
    ];
    let all = q.read_range(0, size, usz(MIB), 4);
    for blk in (0..size).step_by(512) {
        let b = &all[usz(blk)..usz(blk + 512)];
        if zeroed.iter().any(|&(o, l)| blk >= o && blk < o + l) {
            check_zeros(b, blk).unwrap_or_else(|e| panic!("whole-device scan: {e}"));
        } else {
            check_pattern(b, blk, seed).unwrap_or_else(|e| panic!("whole-device scan: {e}"));
        }
    }
    // Also in the image file itself.
    q.flush().expect("flush");
    check_zeros(&read_file_range(&fx.image, 6 * MIB, usz(MIB)), 6 * MIB)
        .unwrap_or_else(|e| panic!("image file after write-zeroes: {e}"));

    // At the very end of the device: the image file must not grow or shrink.
    assert_eq!(
        q.discard(size - 64 * KIB, 64 * KIB),
        Ok(()),
        "discard at the end"
    );
    assert_eq!(
        q.write_zeroes(size - 128 * KIB, 64 * KIB, true),
        Ok(()),
        "zeroes near the end"
    );
    check_zeros(
        &q.read_range(size - 128 * KIB, 128 * KIB, 4096, 8),
        size - 128 * KIB,
    )
    .unwrap_or_else(|e| panic!("end of device: {e}"));
    q.flush().expect("flush");
    assert_eq!(
        std::fs::metadata(&fx.image).expect("stat").len(),
        size,
        "image size changed"
    );
    // The whole device in one write-zeroes request (or max-write-zeroes-len pieces).
    let step = if max_wz == 0 { size } else { max_wz.min(size) };
    let mut off = 0;
    while off < size {
        let len = step.min(size - off);
        assert_eq!(
            q.write_zeroes(off, len, true),
            Ok(()),
            "write-zeroes {off:#x}+{len:#x}"
        );
        off += len;
    }
    check_zeros(&q.read_range(0, size, usz(MIB), 4), 0)
        .unwrap_or_else(|e| panic!("whole device: {e}"));
    assert_eq!(
        std::fs::metadata(&fx.image).expect("stat").len(),
        size,
        "image size changed"
    );

    fx.b.assert_running();
    if let (Some(b), Some(a)) = (before, fx.b.counters()) {
        assert!(
            a.discards > b.discards,
            "discards counter: before {b:?}, after {a:?}"
        );
        assert!(
            a.write_zeroes >= b.write_zeroes + 3,
            "write_zeroes counter: before {b:?}, after {a:?}"
        );
    }
}

/// 4. Read-only backend: the RO feature is offered (libblkio refuses to start a writable client),
///    reads work, writes/discard/write-zeroes sent anyway (raw client) fail, the image is
///    unchanged.
#[test]
fn readonly_backend() {
    let size = 8 * MIB;
    let seed = 0x50;
    let ro = BackendOpts {
        readonly: true,
        ..opts()
    };
    let mut fx = fixture("ro", size, &ro, Some(seed));

    // libblkio without read-only=true refuses a device that offers VIRTIO_BLK_F_RO.
    match Client::try_connect(fx.b.socket(), &ClientOpts::default()) {
        Ok(_) => panic!("libblkio started a writable client: VIRTIO_BLK_F_RO not offered"),
        Err(e) => assert_eq!(e.errno(), blkio::Errno::ROFS, "expected EROFS, got {e}"),
    }

    {
        let copts = ClientOpts {
            read_only: true,
            ..ClientOpts::default()
        };
        let mut c = Client::connect_with(fx.b.socket(), &copts);
        assert!(
            c.blkio().get_bool("read-only").expect("read-only"),
            "read-only property"
        );
        assert_eq!(c.capacity(), size);
        let q = c.q();
        q.verify_pattern(0, size, usz(256 * KIB), 8, seed)
            .unwrap_or_else(|e| panic!("read on read-only device: {e}"));
        // libblkio rejects these itself (EBADF) without sending them.
        assert!(
            q.write(0, &pattern(0, 4096, 1)).is_err(),
            "write via libblkio"
        );
        q.flush().expect("flush on a read-only device");
    }

    // The raw client sends the requests anyway: the backend must refuse them.
    let mut r = RawClient::connect(fx.b.socket(), raw::all_blk_features()).expect("raw connect");
    assert!(
        r.blk_features().contains(BlkFeatures::RO),
        "RO feature not negotiated"
    );
    let got = r.read(4096, 8192).expect("raw read");
    check_pattern(&got, 4096, seed).unwrap_or_else(|e| panic!("raw read: {e}"));
    let w = r.write(0, &pattern(0, 4096, 1));
    let d = r.discard(MIB, 64 * KIB);
    let z = r.write_zeroes(2 * MIB, 64 * KIB, false);
    let zu = r.write_zeroes(3 * MIB, 64 * KIB, true);
    for (what, res) in [
        ("write", w),
        ("discard", d),
        ("write-zeroes", z),
        ("write-zeroes unmap", zu),
    ] {
        if fx.b.kind() == BackendKind::VhostMirror {
            // Contract: a write on a read-only device gets VIRTIO_BLK_S_UNSUPP.
            assert_eq!(
                res,
                Err(ENOTSUP),
                "{what} on read-only device: expected UNSUPP, got {}",
                err_name(res)
            );
        } else {
            assert!(res.is_err(), "{what} on read-only device succeeded");
        }
    }
    eprintln!(
        "read-only: write -> {}, discard -> {}, write-zeroes -> {}",
        err_name(w),
        err_name(d),
        err_name(z)
    );
    // A read still works after the refused requests.
    check_pattern(&r.read(0, 4096).expect("read after refusals"), 0, seed)
        .unwrap_or_else(|e| panic!("read after refusals: {e}"));
    drop(r);

    fx.b.assert_running();
    if fx.b.kind() == BackendKind::VhostMirror {
        let s = fx.b.status_json();
        assert_eq!(
            s["readonly"],
            serde_json::Value::Bool(true),
            "status readonly: {s}"
        );
    }
    let st = fx.b.terminate(TIMEOUT);
    assert!(st.success(), "exit status {st}");
    check_file_pattern(&fx.image, seed).unwrap_or_else(|e| panic!("image changed: {e}"));
}

/// 5. Out-of-range requests fail with IOERR, nothing is written, and the backend keeps serving.
#[test]
fn out_of_range_requests_fail() {
    let size = 8 * MIB;
    let seed = 0x0F;
    let mut fx = fixture("oor", size, &opts(), Some(seed));
    let mut c = Client::connect(fx.b.socket());
    let cap = c.capacity();
    assert_eq!(cap, size);
    let before = fx.b.counters();
    let q = c.q();
    let new = pattern(cap - 4096, 8192, 0xBAD);
    let huge = u64::MAX / 512 * 512 - 4096; // offset + len would overflow u64 arithmetic
    let mut failed = 0u64;
    let mut expect_err = |what: &str, r: Result<(), i32>, strict_eio: bool| {
        match r {
            Ok(()) => panic!("{what}: succeeded, expected IOERR"),
            Err(e) if strict_eio => {
                assert_eq!(e, EIO, "{what}: expected EIO, got {}", errno_name(e))
            }
            Err(_) => {}
        }
        failed += 1;
    };
    expect_err("read at capacity", q.read(cap, 4096).map(|_| ()), true);
    expect_err(
        "read straddling the end",
        q.read(cap - 4096, 8192).map(|_| ()),
        true,
    );
    expect_err("read far beyond", q.read(cap * 4, 512).map(|_| ()), true);
    expect_err("read at huge offset", q.read(huge, 4096).map(|_| ()), true);
    expect_err("write at capacity", q.write(cap, &new[..4096]), true);
    expect_err("write straddling the end", q.write(cap - 4096, &new), true);
    expect_err("write at huge offset", q.write(huge, &new[..4096]), true);
    expect_err(
        "discard straddling the end",
        q.discard(cap - 4096, 8192),
        false,
    );
    expect_err(
        "write-zeroes straddling the end",
        q.write_zeroes(cap - 4096, 8192, false),
        false,
    );
    expect_err(
        "write-zeroes beyond",
        q.write_zeroes(cap, 4096, true),
        false,
    );
    // Data length not a multiple of 512 (a malformed request, in range).
    expect_err("write of 100 bytes", q.write(8192, &new[..100]), true);
    expect_err("write of 4196 bytes", q.write(8192, &new[..4196]), true);
    expect_err("read of 100 bytes", q.read(8192, 100).map(|_| ()), true);
    // A mix in one batch: the failures must not disturb the good requests around them.
    q.buf()[..4096].copy_from_slice(&pattern(0, 4096, 0x600D));
    q.submit(
        Op::Write {
            off: 0,
            buf_off: 0,
            len: 4096,
        },
        1,
    );
    q.submit(
        Op::Read {
            off: cap,
            buf_off: 8192,
            len: 4096,
        },
        2,
    );
    q.submit(
        Op::Read {
            off: 4096,
            buf_off: 16384,
            len: 4096,
        },
        3,
    );
    let mut res: Vec<_> = q
        .wait_all()
        .into_iter()
        .map(|d| (d.user_data, d.ret))
        .collect();
    res.sort();
    assert_eq!(res[0], (1, 0), "good write in a batch with a bad read");
    assert_ne!(res[1].1, 0, "bad read in a batch succeeded");
    assert_eq!(res[2], (3, 0), "good read in a batch with a bad read");
    failed += 1;
    check_pattern(&q.buf()[16384..20480], 4096, seed).unwrap_or_else(|e| panic!("batch read: {e}"));

    // Still serving; the straddling write/zeroes did not touch the last in-range block.
    fx.b.assert_running();
    let last = q.read(cap - 4096, 4096).expect("read of the last block");
    check_pattern(&last, cap - 4096, seed)
        .unwrap_or_else(|e| panic!("last in-range block modified by a rejected request: {e}"));
    check_pattern(&q.read(0, 4096).expect("read block 0"), 0, 0x600D)
        .unwrap_or_else(|e| panic!("block 0: {e}"));
    check_pattern(&q.read(8192, 8192).expect("read blocks 2-3"), 8192, seed)
        .unwrap_or_else(|e| panic!("malformed write modified data: {e}"));
    q.write(cap - 4096, &pattern(cap - 4096, 4096, 3))
        .expect("valid write of the last block");
    check_pattern(&q.read(cap - 4096, 4096).expect("read"), cap - 4096, 3)
        .unwrap_or_else(|e| panic!("last block: {e}"));
    if let (Some(b), Some(a)) = (before, fx.b.counters()) {
        assert!(
            a.errors >= b.errors + failed,
            "errors counter: {failed} failed requests, before {b:?}, after {a:?}"
        );
    }
}

/// 6. A client that disconnects with writes in flight: the next client sees every 4 KiB block
///    entirely old or entirely new, and I/O works normally.
#[test]
fn disconnect_mid_io_then_reconnect() {
    let size = 16 * MIB;
    let old = 0x01D;
    let mut fx = fixture("disconnect", size, &opts(), Some(old));
    let mut seeds = vec![old];
    let req = 256 * KIB;
    for round in 0..6u64 {
        let seed = 0x1000 + round;
        seeds.push(seed);
        let copts = ClientOpts {
            buf_per_queue: usz(32 * req),
            ..ClientOpts::default()
        };
        let mut c = Client::connect_with(fx.b.socket(), &copts);
        let q = c.q();
        for i in 0..32u64 {
            let off = (i * 512 * KIB + round * 64 * KIB) % (size - req);
            let bo = usz(i * req);
            q.buf()[bo..bo + usz(req)].copy_from_slice(&pattern(off, usz(req), seed));
            q.submit(
                Op::Write {
                    off,
                    buf_off: bo,
                    len: usz(req),
                },
                usz(i),
            );
        }
        let done = q.kick();
        if round % 2 == 1 {
            std::thread::sleep(Duration::from_micros(200 * round));
        }
        eprintln!(
            "round {round}: {} of 32 writes completed before disconnect",
            done.len()
        );
        drop(c); // disconnect without waiting
        fx.b.assert_running();
    }

    let mut c = Client::connect(fx.b.socket());
    let q = c.q();
    let all = q.read_range(0, size, usz(MIB), 4);
    let mut counts = vec![0usize; seeds.len()];
    for blk in (0..size).step_by(4096) {
        let b = &all[usz(blk)..usz(blk + 4096)];
        match classify_block(b, blk, &seeds) {
            Some(s) => counts[seeds.iter().position(|&x| x == s).expect("seed")] += 1,
            None => panic!(
                "torn/garbage 4 KiB block at {blk:#x}: neither old nor any written content ({})",
                check_pattern(b, blk, old).expect_err("not old")
            ),
        }
    }
    eprintln!("blocks per seed (old first): {counts:?}");
    // Normal I/O on the new connection.
    q.write_pattern(0, 2 * MIB, 4096, 32, 0x77);
    q.verify_pattern(0, 2 * MIB, 4096, 32, 0x77)
        .unwrap_or_else(|e| panic!("I/O after reconnect: {e}"));
    fx.b.assert_running();
}

/// 6b. Many short connections in a row, each doing a verified write.
#[test]
fn reconnect_loop() {
    let size = 8 * MIB;
    let mut fx = fixture("reconnect", size, &opts(), None);
    for i in 0..15u64 {
        let mut c = Client::connect(fx.b.socket());
        let q = c.q();
        let off = i * 64 * KIB;
        q.write(off, &pattern(off, 4096, i)).expect("write");
        check_pattern(&q.read(off, 4096).expect("read"), off, i)
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
    }
    let mut c = Client::connect(fx.b.socket());
    let q = c.q();
    for i in 0..15u64 {
        let off = i * 64 * KIB;
        check_pattern(&q.read(off, 4096).expect("read"), off, i)
            .unwrap_or_else(|e| panic!("data of connection {i}: {e}"));
    }
    fx.b.assert_running();
}

/// 7. Two queues used concurrently from two threads on disjoint ranges.
#[test]
fn two_queues_concurrently() {
    let size = 32 * MIB;
    let o = BackendOpts {
        num_queues: Some(2),
        ..opts()
    };
    let mut fx = fixture("mq", size, &o, None);
    let copts = ClientOpts {
        num_queues: 2,
        ..ClientOpts::default()
    };
    let mut c = Client::connect_with(fx.b.socket(), &copts);
    assert_eq!(
        c.blkio().get_i32("max-queues").expect("max-queues"),
        2,
        "max-queues"
    );
    let half = size / 2;
    let sizes = [4096usize, 64 * 1024, 1 << 20, 8192];
    let before = fx.b.counters();
    let running = std::sync::atomic::AtomicUsize::new(2);
    let mut status_calls = 0;
    std::thread::scope(|s| {
        for q in c.queues_mut() {
            let running = &running;
            s.spawn(move || {
                let i = q.index() as u64;
                let start = i * half;
                for (iter, req) in sizes.into_iter().enumerate() {
                    let seed = 0x100 * (i + 1) + iter as u64;
                    q.write_pattern(start, half, req, 16, seed);
                    q.verify_pattern(start, half, req, 16, seed)
                        .unwrap_or_else(|e| panic!("queue {i}, {req}-byte requests: {e}"));
                }
                running.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
        // `status` keeps answering while both queues are busy.
        if fx.b.kind() == BackendKind::VhostMirror {
            while running.load(std::sync::atomic::Ordering::SeqCst) > 0 {
                let _ = fx.b.status_json();
                status_calls += 1;
            }
        }
    });
    // Cross-check from queue 0 only and from queue 1 only.
    for qi in 0..2 {
        let q = c.queue(qi);
        q.verify_pattern(0, half, usz(MIB), 4, 0x103)
            .unwrap_or_else(|e| panic!("first half via queue {qi}: {e}"));
        q.verify_pattern(half, half, usz(MIB), 4, 0x203)
            .unwrap_or_else(|e| panic!("second half via queue {qi}: {e}"));
    }
    fx.b.assert_running();
    if let (Some(b), Some(a)) = (before, fx.b.counters()) {
        // Exact totals: counters from two worker threads must not lose updates.
        let per_thread: u64 = sizes.iter().map(|&r| half.div_ceil(r as u64)).sum();
        let want = Counters {
            writes: b.writes + 2 * per_thread,
            bytes_written: b.bytes_written + 2 * 4 * half,
            reads: b.reads + 2 * per_thread + 4 * (half / MIB),
            bytes_read: b.bytes_read + 2 * 4 * half + 4 * half,
            ..b
        };
        assert_eq!(
            a, want,
            "counters after two-queue I/O ({status_calls} status calls during I/O)"
        );
        assert_eq!(fx.b.status_json()["num_queues"], 2);
    }
}

/// What a process holds, from /proc.
#[derive(Debug, Clone, Copy)]
struct Usage {
    threads: u64,
    rss_kib: u64,
    rss_anon_kib: u64,
    fds: u64,
}

/// [`usage`] once the thread count has held still for 200 ms (at most 5 s): threads serving
/// the fixture's readiness checks on the control socket may still be ending after start-up,
/// longer on a loaded machine (seen: two of them).
fn settled_usage(pid: u32) -> Usage {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = usage(pid);
    let mut still = 0;
    while still < 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        let u = usage(pid);
        still = if u.threads == last.threads {
            still + 1
        } else {
            0
        };
        last = u;
    }
    last
}

fn usage(pid: u32) -> Usage {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc fd")
        .count();
    Usage {
        threads: field("Threads:"),
        rss_kib: field("VmRSS:"),
        rss_anon_kib: field("RssAnon:"),
        fds: fds as u64,
    }
}

/// 7b. The default offers 16 queues (QEMU asks one per vCPU unless told); a frontend that uses
///     one costs, beyond `--num-queues 1`, the 15 idle worker threads vhost-user-backend makes
///     for the others (and their epoll fds), no buffers: status shows 1 of 16 enabled.
#[test]
fn offered_queues_idle_until_the_frontend_enables_them() {
    if is_qsd() {
        eprintln!("skipped: vhost-mirror's own queues");
        return;
    }
    let size = 16 * MIB;
    let run = |name: &str, o: &BackendOpts| {
        let mut fx = fixture(name, size, o, None);
        let waiting = settled_usage(fx.b.pid());
        let mut c = Client::connect(fx.b.socket());
        let q = c.q();
        q.write_pattern(0, size, 4096, 16, 0x51);
        q.verify_pattern(0, size, usz(MIB), 4, 0x51)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let s = fx.b.status_json();
        let used = settled_usage(fx.b.pid());
        fx.b.assert_running();
        drop(c);
        (waiting, used, s)
    };
    let (w1, u1, s1) = run(
        "q1",
        &BackendOpts {
            num_queues: Some(1),
            ..opts()
        },
    );
    let (w16, u16_, s16) = run("q16", &opts());
    eprintln!("--num-queues 1: waiting {w1:?}, one queue used {u1:?}");
    eprintln!("default (16):   waiting {w16:?}, one queue used {u16_:?}");
    eprintln!(
        "16 offered - 1 offered, one used: {} threads, {} fds, RSS {} KiB (anonymous {} KiB)",
        u16_.threads as i64 - u1.threads as i64,
        u16_.fds as i64 - u1.fds as i64,
        u16_.rss_kib as i64 - u1.rss_kib as i64,
        u16_.rss_anon_kib as i64 - u1.rss_anon_kib as i64
    );
    assert_eq!(
        (s1["num_queues"].as_u64(), s1["queues_enabled"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(
        (s16["num_queues"].as_u64(), s16["queues_enabled"].as_u64()),
        (Some(16), Some(1)),
        "{s16}"
    );
    // No frontend: no queue threads at all, whatever is offered. (Within one: a control
    // connection's thread may still be ending when the threads are counted; seen once.)
    assert!(
        w16.threads.abs_diff(w1.threads) <= 1,
        "waiting for a frontend: {} threads with 16 queues offered, {} with 1",
        w16.threads,
        w1.threads
    );
    // The library's threads: one per offered queue (within one, as above).
    assert!(
        (u16_.threads as i64 - u1.threads as i64 - 15).abs() <= 1,
        "threads: {} with 16 queues offered, {} with 1",
        u16_.threads,
        u1.threads
    );
    // Idle workers hold no buffers: each has its stack's touched pages and a malloc arena
    // (about 13 KiB in all on the development machine, a debug build).
    let extra_anon = u16_.rss_anon_kib.saturating_sub(u1.rss_anon_kib);
    assert!(
        extra_anon < 15 * 64,
        "15 idle queues cost {extra_anon} KiB of anonymous memory"
    );
}

/// 8. `status --json` has the documented keys and right values; counters count exactly; the
///    table form names the image.
#[test]
fn status_json_and_table() {
    if is_qsd() {
        eprintln!("skipped: status is a vhost-mirror feature");
        return;
    }
    let size = 8 * MIB;
    let o = BackendOpts {
        num_queues: Some(2),
        ..opts()
    };
    let fx = fixture("status", size, &o, None);
    let s = fx.b.status_json();
    assert!(s.is_object(), "status --json is not an object: {s}");
    assert!(
        s["image"].is_string(),
        "\"image\" missing or not a string: {s}"
    );
    assert!(
        s["readonly"].is_boolean(),
        "\"readonly\" missing or not a bool: {s}"
    );
    for k in [
        "capacity_bytes",
        "num_queues",
        "reads",
        "writes",
        "flushes",
        "discards",
        "write_zeroes",
        "bytes_read",
        "bytes_written",
        "errors",
    ] {
        assert!(s[k].is_u64(), "{k:?} missing or not a number: {s}");
    }
    let img = s["image"].as_str().expect("image");
    let canon = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    assert_eq!(canon(Path::new(img)), canon(&fx.image), "status image: {s}");
    assert_eq!(s["capacity_bytes"], size, "capacity_bytes: {s}");
    assert_eq!(s["num_queues"], 2, "num_queues: {s}");
    assert_eq!(s["readonly"], false, "readonly: {s}");

    // Exact counting of one 8 KiB write, one 4 KiB read, one flush, one failed read.
    let mut c = Client::connect(fx.b.socket());
    let b = Counters::from_json(&fx.b.status_json());
    let q = c.q();
    q.write(4096, &pattern(4096, 8192, 9)).expect("write");
    q.read(0, 4096).expect("read");
    q.flush().expect("flush");
    assert!(q.read(size, 512).is_err(), "out-of-range read");
    let a = Counters::from_json(&fx.b.status_json());
    let want = Counters {
        writes: b.writes + 1,
        bytes_written: b.bytes_written + 8192,
        flushes: b.flushes + 1,
        errors: b.errors + 1,
        ..b
    };
    // The failed read may or may not count in "reads"; everything else is exact.
    assert!(
        a.reads == b.reads + 1 || a.reads == b.reads + 2,
        "reads: {b:?} -> {a:?}"
    );
    assert_eq!(
        a.bytes_read,
        b.bytes_read + 4096,
        "bytes_read: {b:?} -> {a:?}"
    );
    assert_eq!(
        Counters {
            reads: b.reads,
            bytes_read: b.bytes_read,
            ..a
        },
        want,
        "counters"
    );

    let table = fx.b.status_cmd(&[]);
    let shown = table.contains(&fx.image.display().to_string())
        || table.contains(&canon(&fx.image).display().to_string());
    assert!(
        shown,
        "table form does not name the image {}:\n{table}",
        fx.image.display()
    );
}

/// 9. CLI errors: missing image, socket in use by a live listener, unknown flag, bad values.
#[test]
fn cli_errors() {
    if is_qsd() {
        eprintln!("skipped: vhost-mirror CLI");
        return;
    }
    let _wd = Watchdog::new("cli_errors", Duration::from_secs(60));
    let dir = test_dir("cli");
    let d = dir.path();
    let image = d.join("disk.img");
    create_image(&image, 4 * MIB);
    let serve = |img: &Path, sock: &Path, extra: &[&str]| {
        run_with_timeout(
            Command::new(bin_path("vhost-mirror"))
                .arg("serve")
                .arg("--image")
                .arg(img)
                .arg("--socket")
                .arg(sock)
                .args(extra),
            TIMEOUT,
        )
    };
    let one_line = |what: &str, stderr: &str| {
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(
            lines.len(),
            1,
            "{what}: expected one error line on stderr, got:\n{stderr}"
        );
    };

    // Missing image.
    let missing = d.join("no-such-image.img");
    let sock = d.join("a.sock");
    let out = serve(&missing, &sock, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "missing image: exit {}", out.status);
    assert!(
        err.contains("no-such-image.img"),
        "missing image: stderr does not name it:\n{err}"
    );
    one_line("missing image", &err);
    assert!(!sock.exists(), "missing image: socket left behind");

    // Socket path in use by a live listener: refuse, and leave the other listener alone.
    let busy = d.join("busy.sock");
    let listener = UnixListener::bind(&busy).expect("bind busy.sock");
    let out = serve(&image, &busy, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "socket in use: exit {}", out.status);
    let lc = err.to_lowercase();
    assert!(
        err.contains("busy.sock") || lc.contains("in use") || lc.contains("already"),
        "socket in use: unclear message:\n{err}"
    );
    one_line("socket in use", &err);
    assert!(
        busy.exists(),
        "socket in use: the other listener's socket file was removed"
    );
    listener.set_nonblocking(true).expect("nonblocking");
    let _conn = UnixStream::connect(&busy).expect("the other listener no longer reachable");
    assert!(
        wait_accept(&listener),
        "the other listener did not get our connection (socket was replaced)"
    );

    // Unknown flag; bad values.
    let sock = d.join("b.sock");
    for extra in [
        &["--no-such-flag"][..],
        &["--num-queues", "0"],
        &["--queue-size", "0"],
        &["--num-queues", "many"],
    ] {
        let out = serve(&image, &sock, extra);
        assert!(
            !out.status.success(),
            "serve {extra:?}: exit {} (stderr: {})",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.stderr.is_empty(), "serve {extra:?}: nothing on stderr");
        assert!(!sock.exists(), "serve {extra:?}: socket left behind");
    }
    let out = run_with_timeout(
        Command::new(bin_path("vhost-mirror")).arg("--no-such-flag"),
        TIMEOUT,
    );
    assert!(
        !out.status.success(),
        "vhost-mirror --no-such-flag: exit {}",
        out.status
    );

    // status against a control socket nobody listens on.
    let out = run_with_timeout(
        Command::new(bin_path("vhost-mirror"))
            .arg("status")
            .arg("--control")
            .arg(d.join("nobody.sock")),
        TIMEOUT,
    );
    assert!(
        !out.status.success(),
        "status without a server: exit {}",
        out.status
    );
}

fn wait_accept(l: &UnixListener) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if l.accept().is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// 10. Offered features and config space (raw client), and I/O with and without EVENT_IDX.
#[test]
fn features_and_config() {
    let size = 8 * MIB;
    let o = BackendOpts {
        num_queues: Some(2),
        ..opts()
    };
    let mut fx = fixture("features", size, &o, None);
    let want = BlkFeatures::SEG_MAX
        | BlkFeatures::BLK_SIZE
        | BlkFeatures::FLUSH
        | BlkFeatures::TOPOLOGY
        | BlkFeatures::MQ
        | BlkFeatures::DISCARD
        | BlkFeatures::WRITE_ZEROES
        | BlkFeatures::CONFIG_WCE;
    for event_idx in [false, true] {
        let extra = if event_idx {
            Features::RING_EVENT_IDX.bits()
        } else {
            0
        };
        let mut r = RawClient::connect(fx.b.socket(), raw::all_blk_features() | extra)
            .expect("raw connect");
        let f = r.blk_features();
        assert!(f.contains(want), "features {f:?} lack {:?}", want - f);
        assert!(
            !f.contains(BlkFeatures::RO),
            "RO offered without --readonly"
        );
        assert_eq!(
            r.features() & Features::RING_EVENT_IDX.bits() != 0,
            event_idx,
            "EVENT_IDX negotiation (requested: {event_idx})"
        );
        let cfg = r.config();
        let cap = u64::from(cfg.capacity);
        let nq = u16::from(cfg.num_queues);
        let seg = u32::from(cfg.seg_max);
        let bs = u32::from(cfg.blk_size);
        let mds = u32::from(cfg.max_discard_sectors);
        let mwz = u32::from(cfg.max_write_zeroes_sectors);
        assert_eq!(cap, size / 512, "config capacity (sectors)");
        assert_eq!(nq, 2, "config num_queues");
        assert!(seg >= 1, "config seg_max {seg}");
        assert!(bs >= 512 && bs.is_power_of_two(), "config blk_size {bs}");
        assert!(mds >= 1, "config max_discard_sectors {mds}");
        assert!(mwz >= 1, "config max_write_zeroes_sectors {mwz}");
        // I/O through this notification mode, sequentially enough to need many kicks/calls.
        for i in 0..64u64 {
            let off = i * 8192;
            r.write(off, &pattern(off, 8192, 0xE0 + u64::from(event_idx)))
                .expect("raw write");
        }
        for i in 0..64u64 {
            let off = i * 8192;
            let got = r.read(off, 8192).expect("raw read");
            check_pattern(&got, off, 0xE0 + u64::from(event_idx))
                .unwrap_or_else(|e| panic!("event_idx={event_idx}: {e}"));
        }
        r.flush().expect("raw flush");
    }
    fx.b.assert_running();
}

/// 11. SIGTERM while writes are in flight: exit 0, and every write that completed successfully
///     is in the image file; every 4 KiB block is old or new.
#[test]
fn sigterm_with_writes_in_flight() {
    sigterm_in_flight("sigterm", 128 * KIB);
}

/// The same with 512 KiB writes.
#[test]
fn sigterm_with_large_writes_in_flight() {
    sigterm_in_flight("sigterm-large", 512 * KIB);
}

fn sigterm_in_flight(name: &str, req: u64) {
    let size = 64 * req * 2;
    let old = 0x0D;
    let new = 0x4E;
    let mut fx = fixture(name, size, &opts(), Some(old));
    let copts = ClientOpts {
        buf_per_queue: usz(64 * req),
        queue_size: 256, // 64 requests x 3 descriptors all fit in the ring
        ..ClientOpts::default()
    };
    let mut c = Client::connect_with(fx.b.socket(), &copts);
    let q = c.q();
    let offs: Vec<u64> = (0..64u64).map(|i| i * 2 * req).collect();
    for (i, &off) in offs.iter().enumerate() {
        let bo = i * usz(req);
        q.buf()[bo..bo + usz(req)].copy_from_slice(&pattern(off, usz(req), new));
        q.submit(
            Op::Write {
                off,
                buf_off: bo,
                len: usz(req),
            },
            i,
        );
    }
    let mut done = q.kick();
    fx.b.child().signal(libc::SIGTERM);
    let st =
        fx.b.child()
            .wait_timeout(TIMEOUT)
            .unwrap_or_else(|| panic!("no exit within {TIMEOUT:?} of SIGTERM"));
    // Whatever the backend completed before exiting is in our used ring now.
    for _ in 0..3 {
        done.extend(q.kick());
    }
    assert!(st.success(), "exit status {st}; log:\n{}", fx.b.log());
    assert!(!fx.b.socket().exists(), "socket not removed");
    eprintln!("{} of {} writes completed", done.len(), offs.len());
    for d in &done {
        let off = offs[d.user_data];
        assert_eq!(
            d.result(),
            Ok(()),
            "write at {off:#x} failed during shutdown"
        );
        let data = read_file_range(&fx.image, off, usz(req));
        check_pattern(&data, off, new)
            .unwrap_or_else(|e| panic!("completed write at {off:#x} not in the image: {e}"));
    }
    drop(c);
    let all = read_file_range(&fx.image, 0, usz(size));
    for blk in (0..size).step_by(4096) {
        let b = &all[usz(blk)..usz(blk + 4096)];
        assert!(
            classify_block(b, blk, &[old, new]).is_some(),
            "torn/garbage 4 KiB block at {blk:#x} after SIGTERM"
        );
    }
}

/// 12. Scatter-gather requests whose segments are not sector-sized, not contiguous and at odd
///     addresses, and requests with as many segments as the device allows.
#[test]
fn scatter_gather_odd_segments() {
    let size = 8 * MIB;
    let old = 0x01;
    let mut fx = fixture("sg", size, &opts(), Some(old));
    let mut c = Client::connect(fx.b.socket());
    let max_segs = usz(
        u64::try_from(c.blkio().get_i32("max-segments").expect("max-segments"))
            .expect("max-segments >= 0"),
    );
    assert!(
        max_segs >= 2,
        "max-segments {max_segs}: no scatter-gather possible"
    );
    let q = c.q();

    // Lays `lens` out in the queue buffer with gaps, at odd addresses: (buf_off, len) list.
    let layout = |lens: &[usize], base: usize| -> Vec<(usize, usize)> {
        let mut at = base;
        lens.iter()
            .map(|&l| {
                let seg = (at, l);
                at += l + 4099; // gap, keeps the next segment misaligned
                seg
            })
            .collect()
    };
    let mut cases: Vec<Vec<usize>> = vec![
        vec![1, 511, 1024, 100, 1460, 500, 500, 4096], // 8 KiB in odd pieces
        vec![4096, 4096],
        vec![512 * 3 - 7, 7],
        vec![65536 - 1, 1, 65536],
    ];
    cases.push(vec![512; max_segs.min(100)]); // many sector-sized segments
    cases.push(vec![64 * 1024; max_segs.min(16)]); // many large segments
    let mut off = 512 * 3; // odd sector
    for (i, lens) in cases.iter().enumerate() {
        let lens: Vec<usize> = if lens.len() > max_segs {
            // Merge the tail so the request stays within max-segments.
            let mut l = lens[..max_segs - 1].to_vec();
            l.push(lens[max_segs - 1..].iter().sum());
            l
        } else {
            lens.clone()
        };
        let total: usize = lens.iter().sum();
        assert_eq!(total % 512, 0);
        let seed = 0x5600 + i as u64;
        let data = pattern(off, total, seed);
        let segs = layout(&lens, 3);
        let mut at = 0;
        for &(bo, l) in &segs {
            q.buf()[bo..bo + l].copy_from_slice(&data[at..at + l]);
            at += l;
        }
        assert_eq!(q.rwv(true, off, &segs), Ok(()), "writev case {i} {lens:?}");
        // Plain read back, with a sector of context on each side.
        let got = q.read(off - 512, total + 1024).expect("read");
        check_pattern(&got[..512], off - 512, old)
            .unwrap_or_else(|e| panic!("case {i}, before: {e}"));
        check_pattern(&got[512..512 + total], off, seed)
            .unwrap_or_else(|e| panic!("writev case {i} {lens:?}: {e}"));
        check_pattern(&got[512 + total..], off + total as u64, old)
            .unwrap_or_else(|e| panic!("case {i}, after: {e}"));
        // readv with the segment lengths reversed, at different odd addresses.
        let rlens: Vec<usize> = lens.iter().rev().copied().collect();
        let rsegs = layout(&rlens, 1);
        q.buf().fill(0xEE);
        assert_eq!(q.rwv(false, off, &rsegs), Ok(()), "readv case {i}");
        let mut gathered = Vec::with_capacity(total);
        for &(bo, l) in &rsegs {
            gathered.extend_from_slice(&q.buf()[bo..bo + l]);
        }
        check_pattern(&gathered, off, seed)
            .unwrap_or_else(|e| panic!("readv case {i} {rlens:?}: {e}"));
        // The gaps between read segments were not written to.
        let last = rsegs.last().map(|&(bo, l)| bo + l).expect("segments");
        let mut in_seg = vec![false; last];
        for &(bo, l) in &rsegs {
            in_seg[bo..bo + l].iter_mut().for_each(|x| *x = true);
        }
        let buf = q.buf();
        if let Some(p) = (0..last).find(|&p| !in_seg[p] && buf[p] != 0xEE) {
            panic!("readv case {i}: the device wrote outside the segments (buffer offset {p})");
        }
        off += total as u64 + 512 * 5;
        off = off.next_multiple_of(512);
    }
    fx.b.assert_running();
}

/// 13. An image whose size is not a multiple of 512: capacity rounds down, the tail is left alone.
#[test]
fn image_size_not_sector_multiple() {
    if is_qsd() {
        eprintln!("skipped: qemu-storage-daemon rounds the capacity up");
        return;
    }
    let size = 8 * MIB + 304;
    let seed = 0x0DD;
    let mut fx = fixture("oddsize", size, &opts(), Some(seed));
    let cap = size / 512 * 512;
    let mut c = Client::connect(fx.b.socket());
    assert_eq!(c.capacity(), cap, "capacity for a {size}-byte image");
    let q = c.q();
    check_pattern(
        &q.read(cap - 512, 512).expect("read last sector"),
        cap - 512,
        seed,
    )
    .unwrap_or_else(|e| panic!("last sector: {e}"));
    assert!(
        q.read(cap, 512).is_err(),
        "read of the partial sector at the end succeeded"
    );
    q.write(cap - 512, &pattern(cap - 512, 512, 7))
        .expect("write last sector");
    assert!(
        q.write(cap, &pattern(cap, 512, 7)).is_err(),
        "write of the partial sector succeeded"
    );
    q.flush().expect("flush");
    let st = fx.b.terminate(TIMEOUT);
    assert!(st.success(), "exit {st}");
    drop(c);
    let len = std::fs::metadata(&fx.image).expect("stat").len();
    assert_eq!(len, size, "image size changed");
    check_pattern(&read_file_range(&fx.image, cap - 512, 512), cap - 512, 7)
        .unwrap_or_else(|e| panic!("last sector in file: {e}"));
    check_pattern(&read_file_range(&fx.image, cap, usz(size - cap)), cap, seed)
        .unwrap_or_else(|e| panic!("tail after the last sector: {e}"));
}

/// 14. Queue count/size differ from one connection to the next; a queue larger than
///     `--queue-size` is refused without harming the backend; a full queue (QD = queue size).
#[test]
fn queue_config_changes_across_connections() {
    let size = 8 * MIB;
    let o = BackendOpts {
        num_queues: Some(2),
        queue_size: Some(256),
        ..opts()
    };
    let mut fx = fixture("qcfg", size, &o, None);
    let conn = |nq: usize, qs: i32| ClientOpts {
        num_queues: nq,
        queue_size: qs,
        ..ClientOpts::default()
    };
    {
        let mut c = Client::connect_with(fx.b.socket(), &conn(2, 256));
        // A 256-entry ring kept full (85 requests of 3 descriptors each).
        c.queue(1).write_pattern(0, 4 * MIB, 4096, 256, 0xA);
        c.queue(0)
            .verify_pattern(0, 4 * MIB, 4096, 256, 0xA)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    {
        let mut c = Client::connect_with(fx.b.socket(), &conn(1, 64));
        let q = c.q();
        q.verify_pattern(0, 4 * MIB, 64 * 1024, 64, 0xA)
            .unwrap_or_else(|e| panic!("{e}"));
        q.write_pattern(4 * MIB, 4 * MIB, 4096, 64, 0xB);
    }
    if fx.b.kind() == BackendKind::VhostMirror {
        let r = Client::try_connect(fx.b.socket(), &conn(1, 512));
        assert!(
            r.is_err(),
            "a 512-entry queue was accepted with --queue-size 256"
        );
        fx.b.assert_running();
    }
    {
        let mut c = Client::connect_with(fx.b.socket(), &conn(2, 128));
        c.queue(0)
            .verify_pattern(4 * MIB, 4 * MIB, 4096, 128, 0xB)
            .unwrap_or_else(|e| panic!("{e}"));
        c.queue(1)
            .verify_pattern(0, 4 * MIB, 4096, 128, 0xA)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    {
        // The smallest queue that fits one request (header + data + status descriptors).
        let mut c = Client::connect_with(fx.b.socket(), &conn(1, 4));
        c.q().write_pattern(0, 64 * 1024, 4096, 1, 0xC);
        c.q()
            .verify_pattern(0, 64 * 1024, 4096, 1, 0xC)
            .unwrap_or_else(|e| panic!("queue size 4: {e}"));
    }
    fx.b.assert_running();
}

/// 15. SIGINT is handled like SIGTERM.
#[test]
fn sigint_exits_cleanly() {
    let size = 4 * MIB;
    let mut fx = fixture("sigint", size, &opts(), None);
    let mut c = Client::connect(fx.b.socket());
    c.q().write_pattern(0, size, 64 * 1024, 8, 0x1E);
    fx.b.child().signal(libc::SIGINT);
    let st =
        fx.b.child()
            .wait_timeout(TIMEOUT)
            .unwrap_or_else(|| panic!("no exit after SIGINT"));
    assert!(
        st.success(),
        "exit status after SIGINT: {st}; log:\n{}",
        fx.b.log()
    );
    assert!(!fx.b.socket().exists(), "socket not removed after SIGINT");
    drop(c);
    check_file_pattern(&fx.image, 0x1E).unwrap_or_else(|e| panic!("image after SIGINT: {e}"));
}

/// 16. After a crash (SIGKILL) the socket files are stale; a new backend on the same paths must
///     start and serve the data (a stale socket is not "in use").
#[test]
fn restart_after_sigkill_on_stale_socket() {
    let size = 4 * MIB;
    let mut fx = fixture("stale", size, &opts(), None);
    {
        let mut c = Client::connect(fx.b.socket());
        c.q().write_pattern(0, size, 64 * 1024, 8, 0x5A);
        c.q().flush().expect("flush");
    }
    fx.b.child().kill();
    assert!(
        fx.b.socket().exists(),
        "(test premise) socket file gone after SIGKILL"
    );
    let o = BackendOpts {
        socket: Some(fx.b.socket().to_path_buf()),
        control: fx.b.control().map(Path::to_path_buf),
        ..opts()
    };
    let mut b2 = Backend::spawn(fx.dir.path(), &fx.image, &o);
    let mut c = Client::connect(b2.socket());
    c.q()
        .verify_pattern(0, size, 64 * 1024, 8, 0x5A)
        .unwrap_or_else(|e| panic!("data after restart: {e}"));
    b2.assert_running();
    if b2.kind() == BackendKind::VhostMirror {
        let s = b2.status_json();
        assert_eq!(
            s["capacity_bytes"], size,
            "status of the restarted backend: {s}"
        );
    }
}

/// 17. Memory regions added and removed while the device runs (ADD_MEM_REG / REM_MEM_REG).
#[test]
fn memory_regions_added_and_removed_at_runtime() {
    let size = 4 * MIB;
    let mut fx = fixture("memreg", size, &opts(), None);
    let mut c = Client::connect(fx.b.socket());
    for round in 0..3u64 {
        let len = 256 * 1024;
        let r = c.map_extra_region(len).expect("map extra region");
        let ptr = r.addr as *mut u8;
        let off = round * MIB;
        // SAFETY: the region is `len` bytes of mapped memory owned by the client, and no request
        // is in flight on it.
        let buf = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
        buf.copy_from_slice(&pattern(off, len, 0x3E0 + round));
        let q = c.q();
        // SAFETY: the region stays mapped and untouched until wait_all() returns.
        unsafe { q.submit_write_ptr(off, ptr, len, 1) };
        assert_eq!(
            q.wait_all()[0].result(),
            Ok(()),
            "write from extra region {round}"
        );
        // SAFETY: as above.
        let buf = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
        buf.fill(0);
        // SAFETY: as above.
        unsafe { q.submit_read_ptr(off, ptr, len, 2) };
        assert_eq!(
            q.wait_all()[0].result(),
            Ok(()),
            "read into extra region {round}"
        );
        // SAFETY: the read completed; nothing else accesses the region.
        let buf = unsafe { std::slice::from_raw_parts(ptr, len) };
        check_pattern(buf, off, 0x3E0 + round)
            .unwrap_or_else(|e| panic!("extra region {round}: {e}"));
        c.unmap_region(&r);
        // The original region still works after the table changed.
        c.q()
            .write_pattern(off + 512 * 1024, 64 * 1024, 4096, 8, 0x3F0 + round);
        c.q()
            .verify_pattern(off + 512 * 1024, 64 * 1024, 4096, 8, 0x3F0 + round)
            .unwrap_or_else(|e| panic!("main region after unmap {round}: {e}"));
        c.q()
            .verify_pattern(off, len as u64, 4096, 8, 0x3E0 + round)
            .unwrap_or_else(|e| panic!("data written from extra region {round}: {e}"));
    }
    fx.b.assert_running();
}

/// 18. Misbehaving clients (connect-and-close, garbage bytes, an absurd message size, a
///     handshake without queues) do not take the backend down; the next client is served.
#[test]
fn bad_clients_do_not_kill_backend() {
    use std::io::{Read, Write};
    let size = 4 * MIB;
    let mut fx = fixture("badclients", size, &opts(), None);
    {
        let mut c = Client::connect(fx.b.socket());
        c.q().write_pattern(0, size, 64 * 1024, 8, 0xBC);
    }
    let sock = fx.b.socket().to_path_buf();
    let hdr = |req: u32, size: u32| -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&req.to_le_bytes());
        v.extend_from_slice(&1u32.to_le_bytes()); // version 1
        v.extend_from_slice(&size.to_le_bytes());
        v
    };
    let mut garbage = pattern(0, 4096, 0x6A);
    garbage.truncate(1000);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("connect and close", vec![]),
        ("garbage bytes", garbage),
        ("half a header", vec![1, 0, 0]),
        ("GET_FEATURES then close", hdr(1, 0)),
        ("payload size 0xffffffff", hdr(1, u32::MAX)),
        ("unknown request 9999", hdr(9999, 0)),
        ("SET_MEM_TABLE without fds", {
            let mut v = hdr(5, 8 + 32);
            v.extend_from_slice(&1u32.to_le_bytes());
            v.extend_from_slice(&0u32.to_le_bytes());
            v.extend_from_slice(&[0u8; 32]);
            v
        }),
    ];
    for (what, bytes) in cases {
        let mut s = UnixStream::connect(&sock)
            .unwrap_or_else(|e| panic!("{what}: connect: {e} (backend stopped listening?)"));
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        if !bytes.is_empty() {
            let _ = s.write_all(&bytes);
            let mut sink = [0u8; 256];
            let _ = s.read(&mut sink);
        }
        drop(s);
        // Give the backend a moment to process the close, then it must still be up and serving.
        std::thread::sleep(Duration::from_millis(20));
        fx.b.assert_running();
        let mut c = Client::connect(&sock);
        check_pattern(
            &c.q()
                .read(0, 64 * 1024)
                .unwrap_or_else(|e| panic!("after {what}: read {e}")),
            0,
            0xBC,
        )
        .unwrap_or_else(|e| panic!("after {what}: {e}"));
    }
    // A full vhost-user handshake, then a disconnect before any queue is set up.
    {
        let mut b = blkio::Blkio::new("virtio-blk-vhost-user").expect("blkio");
        b.set_str("path", sock.to_str().expect("utf-8"))
            .expect("path");
        b.connect().expect("handshake");
        assert_eq!(b.get_u64("capacity").expect("capacity"), size);
    }
    let mut c = Client::connect(&sock);
    c.q()
        .verify_pattern(0, size, 64 * 1024, 8, 0xBC)
        .unwrap_or_else(|e| panic!("final client: {e}"));
    fx.b.assert_running();
}

/// 19. A second client connecting while one is active must not disturb the active one; once
///     the first leaves, the second is served (or was refused cleanly) and a new client works.
#[test]
fn second_client_while_one_is_active() {
    let size = 4 * MIB;
    let mut fx = fixture("second", size, &opts(), None);
    let mut c1 = Client::connect(fx.b.socket());
    c1.q().write_pattern(0, size, 64 * 1024, 8, 0x1);
    let sock = fx.b.socket().to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let opts = ClientOpts {
            connect_timeout: Duration::from_secs(0),
            ..ClientOpts::default()
        };
        let r = Client::try_connect(&sock, &opts).map(|mut c| {
            let ok = c.q().verify_pattern(0, 1 << 20, 4096, 8, 0x2);
            drop(c);
            ok
        });
        let _ = tx.send(r.map_err(|e| e.to_string()));
    });
    // The first client keeps working while the second one is pending.
    std::thread::sleep(Duration::from_millis(100));
    for round in 0..3 {
        c1.q()
            .verify_pattern(0, size, 64 * 1024, 8, 0x1)
            .unwrap_or_else(|e| {
                panic!("first client, round {round}, with a second client pending: {e}")
            });
    }
    c1.q().write_pattern(0, 1 << 20, 4096, 8, 0x2);
    c1.q().flush().expect("flush");
    drop(c1);
    match rx.recv_timeout(TIMEOUT) {
        Ok(Ok(Ok(()))) => eprintln!("second client was served after the first left"),
        Ok(Ok(Err(e))) => panic!("second client was served but saw wrong data: {e}"),
        Ok(Err(e)) => eprintln!("second client was refused: {e}"),
        Err(_) => {
            panic!("second client neither served nor refused {TIMEOUT:?} after the first left")
        }
    }
    fx.b.assert_running();
    let mut c3 = Client::connect(fx.b.socket());
    c3.q()
        .verify_pattern(0, 1 << 20, 4096, 8, 0x2)
        .unwrap_or_else(|e| panic!("third client: {e}"));
}
