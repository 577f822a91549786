//! VM tier: a real QEMU guest whose root disk is served by `vhost-mirror serve`.
//!
//! The guest (images/build.sh --firmware) boots from its disk as a real VM does (SeaBIOS, GRUB,
//! then Linux from an ext4 partition, every read through vhost-mirror) and runs a busybox file
//! server on that ext4 root filesystem. The test
//! uploads files over HTTP (each one fdatasync'd + renamed + directory fsync'd in the guest),
//! reads them back, halts the guest cleanly, stops the backend, and then checks the image file
//! itself: `e2fsck -fn` must find a clean filesystem and `debugfs` must dump every uploaded
//! file byte-exact.
//!
//! `vm_fio_two_queues_verify` proves the fio harness (`FioVm`: direct kernel boot, kernel flag
//! `vmfio=`): a data disk on a plain `vhost-mirror serve`, fio's random writes on two queues read
//! back and verified in the guest.
//!
//! Processes, backend and temp dir come from the shared harness (`vhost_mirror_tests`): the
//! backend is `<target>/debug/vhost-mirror serve`, or qemu-storage-daemon with
//! `VHOST_MIRROR_TEST_BACKEND=qsd` (to check the test and the guest themselves).
//!
//! Environment:
//! - `VHOST_MIRROR_VM_GUEST_DIR`: where images/build.sh builds the guest (default
//!   `<target dir>/vm-guest`).
//! - `VHOST_MIRROR_VM_ACCEL`: passed to boot.sh `--accel` (default `auto`).
//! - `VHOST_MIRROR_KEEP_LOGS=1`: keep the test's temp dir (image, serial console, backend log).
//!   On failure the tails of the serial console, QEMU and backend logs are printed either way.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vhost_mirror_tests::vm::*;
use vhost_mirror_tests::{free_port, test_dir, Backend, BackendKind, BackendOpts, ChildGuard};

#[test]
fn vm_file_server_roundtrip() {
    // Fail loudly (never skip) when the tools are missing.
    require_tool("qemu-system-x86_64", "qemu-system-x86");
    require_tool("debugfs", "e2fsprogs");
    require_tool("e2fsck", "e2fsprogs");
    require_tool("sha256sum", "coreutils");

    // 1. Guest (cached; build.sh is idempotent and fast when up to date).
    let gdir = build_guest();

    let keep =
        std::env::var_os("VHOST_MIRROR_KEEP_LOGS").is_some_and(|v| !v.is_empty() && v != "0");
    let tmp = test_dir("vm");
    let dir = tmp.path().to_path_buf();
    let image = dir.join("disk.raw");
    let serial = dir.join("serial.log");
    let qemu_log = dir.join("qemu.log");
    let tmp = if keep {
        let kept = tmp.keep();
        eprintln!("vm test: keeping {}", kept.display());
        None
    } else {
        Some(tmp)
    };
    // Declared after tmp and before the process guards: dropped after the processes are
    // killed and before the temp dir is removed.
    let _report = FailureReport {
        logs: vec![
            ("serial console", serial.clone()),
            ("boot.sh/QEMU output", qemu_log.clone()),
        ],
        dir: dir.clone(),
        kept: keep,
    };

    copy_guest_disk(&gdir, GUEST_DISK, &image);

    // 2. Backend, then the VM.
    let mut backend = Backend::spawn(
        &dir,
        &image,
        &BackendOpts {
            num_queues: Some(1),
            ..BackendOpts::default()
        },
    );
    eprintln!(
        "vm test: backend {:?} pid {} on {}",
        backend.kind(),
        backend.pid(),
        backend.socket().display()
    );
    let port = free_port();
    let qemu_out = fs::File::create(&qemu_log).expect("create qemu log");
    let qemu_err = qemu_out.try_clone().expect("clone log fd");
    let t_boot = Instant::now();
    let cmd = boot_command(&gdir, backend.socket(), port, &serial);
    let mut boot = Command::new(&cmd[0]);
    boot.args(&cmd[1..])
        .stdin(Stdio::null())
        .stdout(qemu_out)
        .stderr(qemu_err);
    // boot.sh execs QEMU, so this PID is QEMU's.
    let mut qemu = ChildGuard::spawn("qemu (images/boot.sh)", &mut boot);
    eprintln!(
        "vm test: QEMU pid {}, http port {port}, logs in {}",
        qemu.pid(),
        dir.display()
    );

    wait_for_ready(&serial, &mut qemu, &mut backend);
    eprintln!("vm test: boot took {:.1} s", t_boot.elapsed().as_secs_f64());

    // 3. Uploads.
    let mut text = Vec::new();
    for i in 0..200 {
        writeln!(
            text,
            "line {i}: the quick brown fox jumps over the lazy dog"
        )
        .expect("write");
    }
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("random-1m.bin", random_bytes(1 << 20)),
        ("random-3k.bin", random_bytes(3 * 1024)),
        ("odd-65549.bin", random_bytes(65_549)),
        ("random-2m.bin", random_bytes(2 << 20)),
        ("notes.txt", text),
        ("empty", Vec::new()),
    ];
    let orig_dir = dir.join("orig");
    fs::create_dir(&orig_dir).expect("mkdir orig");
    let mut expected: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for (name, data) in &files {
        let local = orig_dir.join(name);
        fs::write(&local, data).expect("write local copy");
        let sum = sha256_file(&local);
        let t = Instant::now();
        let reply = http(port, "POST", &format!("/cgi-bin/upload?name={name}"), data)
            .unwrap_or_else(|e| panic!("upload {name}: {e}"));
        assert_eq!(reply.status, 200, "upload {name}: {}", reply.text());
        assert_eq!(
            reply.text().trim(),
            format!("sha256={sum}"),
            "upload {name}: sha256 in reply"
        );
        eprintln!(
            "vm test: uploaded {name} ({} bytes) in {:.2} s",
            data.len(),
            t.elapsed().as_secs_f64()
        );
        expected.insert((*name).to_string(), (data.len(), sum));
    }

    // Bad names are rejected and store nothing.
    for bad in [".hidden", "a%2Fb", "..", "sp%20ace", ""] {
        let reply = http(
            port,
            "POST",
            &format!("/cgi-bin/upload?name={bad}"),
            b"nope",
        )
        .unwrap_or_else(|e| panic!("upload bad name {bad:?}: {e}"));
        assert_eq!(
            reply.status,
            400,
            "bad name {bad:?} must be rejected: {}",
            reply.text()
        );
    }

    // 4. Downloads: every file back, byte-exact.
    for (name, data) in &files {
        let reply = http(port, "GET", &format!("/files/{name}"), b"")
            .unwrap_or_else(|e| panic!("download {name}: {e}"));
        assert_eq!(reply.status, 200, "download {name}");
        assert!(
            reply.body == *data,
            "download {name}: {} bytes differ from the {} uploaded",
            reply.body.len(),
            data.len()
        );
    }

    // 5. Listing.
    let reply = http(port, "GET", "/cgi-bin/list", b"").expect("list");
    assert_eq!(reply.status, 200, "list");
    let listed: BTreeMap<String, (usize, String)> = reply
        .text()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 3, "listing line {l:?}");
            (
                f[0].to_string(),
                (f[1].parse().expect("size in listing"), f[2].to_string()),
            )
        })
        .collect();
    assert_eq!(listed, expected, "listing");

    // The guest's writes went through the backend (vhost-mirror's control socket only).
    if let Some(c) = backend.counters() {
        eprintln!("vm test: backend counters after uploads: {c:?}");
        let uploaded: usize = files.iter().map(|(_, d)| d.len()).sum();
        assert!(
            c.writes > 0 && c.bytes_written >= uploaded as u64,
            "backend saw {} bytes written, uploads were {uploaded} bytes: {c:?}",
            c.bytes_written
        );
    }

    // 6. Clean halt: QEMU exits by itself, then the backend stops on SIGTERM with status 0.
    let reply = http(port, "GET", "/cgi-bin/halt", b"").expect("halt");
    assert_eq!(reply.status, 200, "halt: {}", reply.text());
    let status = qemu
        .wait_timeout(EXIT_TIMEOUT)
        .unwrap_or_else(|| panic!("QEMU still running {EXIT_TIMEOUT:?} after halt"));
    assert!(status.success(), "QEMU exit status {status}");
    let console =
        String::from_utf8_lossy(&fs::read(&serial).expect("read serial log")).into_owned();
    assert!(
        console.contains("HALT: / is read-only"),
        "guest did not remount / read-only before power-off"
    );

    let status = backend.terminate(Duration::from_secs(30));
    assert_eq!(
        status.code(),
        Some(0),
        "backend exit status after SIGTERM: {status}"
    );

    // 7. The image file itself: clean ext4, every file byte-exact.
    run_ok(
        Command::new("e2fsck").arg("-fn").arg(root_fs(&image)),
        "e2fsck -fn on the image after halt",
    );
    let dump_dir = dir.join("dump");
    fs::create_dir(&dump_dir).expect("mkdir dump");
    for (name, data) in &files {
        let out = dump_dir.join(name);
        run_ok(
            Command::new("debugfs")
                .arg("-R")
                .arg(format!("dump /srv/files/{name} {}", out.display()))
                .arg(root_fs(&image)),
            "debugfs dump",
        );
        let got = fs::read(&out)
            .unwrap_or_else(|e| panic!("debugfs did not dump /srv/files/{name}: {e}"));
        assert!(
            got == *data,
            "{name} in the image: {} bytes differ from the {} uploaded",
            got.len(),
            data.len()
        );
    }
    eprintln!(
        "vm test: all {} files intact in {}",
        files.len(),
        image.display()
    );
    drop(_report);
    drop(tmp);
}

/// What a new user starts: a 4-vCPU VM with a plain `-device vhost-user-blk-pci,chardev=...`
/// (no num-queues: QEMU asks the backend for one queue per vCPU) on `vhost-mirror serve` with
/// no `--num-queues`. It boots (the firmware, then Linux, through the disk), its file server
/// stores a file and gives it back, and the backend shows the guest's 4 queues enabled of the
/// 16 it offers.
#[test]
fn vm_with_four_vcpus_boots_on_the_defaults() {
    require_tool("qemu-system-x86_64", "qemu-system-x86");
    if BackendKind::from_env() == BackendKind::Qsd {
        eprintln!("skipped: vhost-mirror's default queues (qemu-storage-daemon offers 1)");
        return;
    }
    let gdir = build_guest();
    let tmp = test_dir("vm-smp4");
    let dir = tmp.path().to_path_buf();
    let image = dir.join("disk.raw");
    let serial = dir.join("serial.log");
    let qemu_log = dir.join("qemu.log");
    let _report = FailureReport {
        logs: vec![
            ("serial console", serial.clone()),
            ("boot.sh/QEMU output", qemu_log.clone()),
        ],
        dir: dir.clone(),
        kept: false,
    };
    copy_guest_disk(&gdir, GUEST_DISK, &image);
    let mut backend = Backend::spawn(&dir, &image, &BackendOpts::default());
    let port = free_port();
    let qemu_out = fs::File::create(&qemu_log).expect("create qemu log");
    let qemu_err = qemu_out.try_clone().expect("clone log fd");
    let mut cmd = boot_command(&gdir, backend.socket(), port, &serial);
    cmd.extend(["--smp", "4", "--num-queues", "default"].map(String::from));
    let mut boot = Command::new(&cmd[0]);
    boot.args(&cmd[1..])
        .stdin(Stdio::null())
        .stdout(qemu_out)
        .stderr(qemu_err);
    let t_boot = Instant::now();
    let mut qemu = ChildGuard::spawn("qemu (images/boot.sh --smp 4)", &mut boot);
    wait_for_ready(&serial, &mut qemu, &mut backend);
    eprintln!(
        "vm smp4 test: boot took {:.1} s",
        t_boot.elapsed().as_secs_f64()
    );

    let file = Upload {
        name: "four-vcpus.bin".into(),
        data: random_bytes(300_001),
    };
    upload(port, &file.name, &file.data).unwrap_or_else(|e| panic!("upload: {e}"));
    check_uploads(port, std::slice::from_ref(&file), "4 vCPUs");

    let s = backend.status_json();
    eprintln!(
        "vm smp4 test: num_queues {} queues_enabled {}",
        s["num_queues"], s["queues_enabled"]
    );
    assert_eq!(s["num_queues"].as_u64(), Some(16), "queues offered: {s}");
    assert_eq!(s["queues_enabled"].as_u64(), Some(4), "queues enabled: {s}");

    let reply = http(port, "GET", "/cgi-bin/halt", b"").expect("halt");
    assert_eq!(reply.status, 200, "halt: {}", reply.text());
    let status = qemu
        .wait_timeout(EXIT_TIMEOUT)
        .unwrap_or_else(|| panic!("QEMU still running {EXIT_TIMEOUT:?} after halt"));
    assert!(status.success(), "QEMU exit status {status}");
    let status = backend.terminate(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "backend exit status: {status}");
    drop(_report);
    drop(tmp);
}

/// The fio harness (`FioVm`, kernel flag `vmfio=`): a 2-vCPU guest whose data disk (/dev/vdb,
/// 2 queues, chardev with `reconnect-ms`) is a plain `vhost-mirror serve`, the root disk on a
/// second backend. Two fio jobs, one pinned to each vCPU (so each submits on its own queue), 4k
/// random writes at iodepth 16 through libaio with O_DIRECT, each on its own 16 MiB, then read
/// back and checked (crc32c; fio warns that "multiple writers may overwrite blocks": they do
/// not, `offset_increment` gives each its own). fio exits 0 with no job error and every block verified, both
/// queues were enabled and completed requests, and the backend counted exactly the writes.
#[test]
fn vm_fio_two_queues_verify() {
    require_tool("qemu-system-x86_64", "qemu-system-x86");
    let t_test = Instant::now();
    let gdir = build_guest();
    let tmp = test_dir("vm-fio");
    let dir = tmp.path().to_path_buf();
    let _report = FailureReport {
        logs: vec![],
        dir: dir.clone(),
        kept: false,
    };
    let root_image = dir.join("root.raw");
    copy_guest_disk(&gdir, DIRECT_BOOT_DISK, &root_image);
    let data_image = dir.join("data.raw");
    vhost_mirror_tests::create_image(&data_image, 64 << 20);

    // The root disk is not under test: qemu-storage-daemon with VHOST_MIRROR_TEST_BACKEND=qsd.
    let mut root = Backend::spawn(
        &dir,
        &root_image,
        &BackendOpts {
            num_queues: Some(1),
            ..BackendOpts::default()
        },
    );
    let mut data = Backend::spawn(
        &dir,
        &data_image,
        &BackendOpts {
            num_queues: Some(2),
            kind: Some(BackendKind::VhostMirror),
            ..BackendOpts::default()
        },
    );

    const JOB_MIB: u64 = 16;
    let job = format!(
        "[global]\n\
         filename=/dev/vdb\n\
         ioengine=libaio\n\
         direct=1\n\
         bs=4k\n\
         rw=randwrite\n\
         iodepth=16\n\
         numjobs=2\n\
         size={JOB_MIB}M\n\
         offset_increment={JOB_MIB}M\n\
         cpus_allowed=0-1\n\
         cpus_allowed_policy=split\n\
         verify=crc32c\n\
         do_verify=1\n\
         [randwrite-verify]\n"
    );
    let mut opts = FioGuestOpts::new(&gdir, &dir, root.socket(), data.socket(), &job);
    opts.reconnect_ms = Some(500);
    let mut vm = FioVm::start(&opts);
    vm.wait_started(FIO_TIMEOUT);

    // While the guest runs: both queues of the data disk are enabled.
    let s = data.status_json();
    assert_eq!(
        s["num_queues"].as_u64(),
        Some(2),
        "data disk queues offered: {s}"
    );
    assert_eq!(
        s["queues_enabled"].as_u64(),
        Some(2),
        "data disk queues enabled: {s}"
    );

    let r = vm.finish(FIO_TIMEOUT, &mut || {
        root.assert_running();
        data.assert_running();
    });
    eprintln!("vm fio test: notes {:?}, interrupts {:?}", r.notes, r.irqs);
    assert_eq!(r.exit, 0, "fio exit status; output:\n{}", r.output);
    assert_eq!(r.job_errors(), Vec::<String>::new(), "fio job errors");
    let jobs = r.jobs();
    assert_eq!(jobs.len(), 2, "fio jobs");
    for j in jobs {
        // Everything written was read back: verify checked every block.
        FioResult::assert_wrote_and_verified(j, JOB_MIB << 20);
    }
    let queues = r.queue_irqs("vdb");
    assert_eq!(queues.len(), 2, "vdb's request queues: {:?}", r.irqs);
    for (q, n) in &queues {
        assert!(*n > 0, "vdb queue {q} completed nothing: {:?}", r.irqs);
    }

    let c = data.counters().expect("vhost-mirror has counters");
    eprintln!("vm fio test: data backend counters {c:?}");
    let total = 2 * (JOB_MIB << 20);
    assert_eq!(
        c.bytes_written, total,
        "bytes written to the data disk: {c:?}"
    );
    assert!(
        c.bytes_read >= total,
        "bytes read from the data disk: {c:?}"
    );
    assert_eq!(c.errors, 0, "data disk errors: {c:?}");

    assert_eq!(
        data.terminate(Duration::from_secs(30)).code(),
        Some(0),
        "data backend exit"
    );
    assert_eq!(
        root.terminate(Duration::from_secs(30)).code(),
        Some(0),
        "root backend exit"
    );
    eprintln!(
        "vm fio test: fio guest ran {:.1} s, whole test {:.1} s",
        r.elapsed.as_secs_f64(),
        t_test.elapsed().as_secs_f64()
    );
    drop(vm);
    drop(_report);
    drop(tmp);
}

/// Issue 13 item 5, unmirrored: see [`restarts_under_load`].
#[test]
fn vm_backend_restarts_under_load_unmirrored() {
    restarts_under_load(false);
}

/// Issue 13 item 5, mirrored to an access-node: see [`restarts_under_load`].
#[test]
fn vm_backend_restarts_under_load_mirrored() {
    restarts_under_load(true);
}

/// vhost-mirror SIGKILLed and restarted (three times) and stopped with SIGTERM and restarted
/// (once, as an upgrade does) while the guest keeps 50 requests in flight on two queues: fio,
/// per vCPU a writer (4k random writes at iodepth 16, then every block read back and verified),
/// a reader (iodepth 8) and a flusher (a write and an fdatasync at a time), so that requests
/// complete out of order. QEMU reconnects by itself (`reconnect-ms`). The guest must see no I/O error and
/// every block must verify; mirrored, the replica must then be identical to the primary.
/// Without in-flight tracking (`inflight_shm.rs`) a killed process's requests completed out of
/// order make QEMU's rewind to the used index run some twice and lose others: the guest waits
/// for those forever (fio does not finish) or reads back stale blocks.
/// Prints the pause each restart caused: from the signal to the new process's first completed
/// request, and fio's longest completion latency.
fn restarts_under_load(mirrored: bool) {
    use vhost_mirror_tests::{
        create_image, secret_file, wait_in_sync, wait_until, AccessNode, AccessNodeOpts,
    };
    require_tool("qemu-system-x86_64", "qemu-system-x86");
    let gdir = build_guest();
    let name = if mirrored {
        "vm-restart-mirrored"
    } else {
        "vm-restart"
    };
    let tmp = test_dir(name);
    let dir = tmp.path().to_path_buf();
    let root_image = dir.join("root.raw");
    copy_guest_disk(&gdir, DIRECT_BOOT_DISK, &root_image);
    const JOB_MIB: u64 = 32;
    // The readers and flushers run this long (the writers, restarts included, take less).
    const AUX_S: u64 = 20;
    let size = (2 * JOB_MIB + 32) << 20;
    let data_image = dir.join("data.raw");
    create_image(&data_image, size);
    let mut root = Backend::spawn(
        &dir,
        &root_image,
        &BackendOpts {
            num_queues: Some(1),
            ..BackendOpts::default()
        },
    );
    let secret = secret_file(&dir, "restart-test-secret-0123456789abcdef");
    let replica_image = dir.join("replica.raw");
    let mut replica = mirrored.then(|| {
        create_image(&replica_image, size);
        AccessNode::spawn(
            &dir,
            &replica_image,
            free_port(),
            &secret,
            &AccessNodeOpts::default(),
        )
    });
    let mut opts = match &replica {
        Some(r) => BackendOpts::mirrored(r.port(), &secret),
        None => BackendOpts::default(),
    };
    opts.num_queues = Some(2);
    opts.kind = Some(BackendKind::VhostMirror);
    opts.socket = Some(dir.join("data.sock"));
    opts.control = Some(dir.join("data.ctl"));
    let mut data = Backend::spawn(&dir, &data_image, &opts);
    if mirrored {
        wait_in_sync(&mut data, Duration::from_secs(60));
    }

    // Per vCPU (so per queue): a writer whose every block is read back and verified, a
    // reader and a flusher beside it. Their requests complete out of order: mirrored, a read
    // does not wait for the writes ahead of it (they wait for the replica); both ways, writes
    // complete while a FLUSH's fdatasync runs. (fio quiesces a job before its own fdatasync, so
    // a writer with fdatasync= alone would complete in order.)
    let mut job = String::from("[global]\nfilename=/dev/vdb\nioengine=libaio\ndirect=1\nbs=4k\n");
    for cpu in 0..2u64 {
        job.push_str(&format!(
            "[w{cpu}]\nrw=randwrite\niodepth=16\nsize={JOB_MIB}M\noffset={}M\n\
             verify=crc32c\ndo_verify=1\ncpus_allowed={cpu}\n\
             [r{cpu}]\nrw=randread\niodepth=8\nsize=8M\noffset={}M\ntime_based=1\n\
             runtime={AUX_S}\ncpus_allowed={cpu}\n\
             [f{cpu}]\nrw=write\nfdatasync=1\nsize=1M\noffset={}M\ntime_based=1\n\
             runtime={AUX_S}\ncpus_allowed={cpu}\n",
            cpu * JOB_MIB,
            2 * JOB_MIB + cpu * 8,
            2 * JOB_MIB + 16 + cpu,
        ));
    }
    let mut fopts = FioGuestOpts::new(&gdir, &dir, root.socket(), data.socket(), &job);
    fopts.reconnect_ms = Some(100);
    let mut vm = FioVm::start(&fopts);
    vm.wait_started(FIO_TIMEOUT);
    // fio is writing once the first requests arrive.
    assert!(
        wait_until(Duration::from_secs(60), || data
            .counters()
            .is_some_and(|c| c.writes > 100)),
        "fio did not start writing"
    );

    let mut pauses = Vec::new();
    let mut logs = Vec::new();
    let ran_again = |l: &str| l.contains("left in flight by the last process run again");
    let mut plan = vec!["SIGKILL", "SIGTERM", "SIGKILL", "SIGKILL"];
    let planned = plan.len();
    let mut i = 0;
    while i < plan.len() {
        let sig = plan[i];
        std::thread::sleep(Duration::from_millis(1500));
        if i >= planned && vm.console_text().contains("VMFIO-END") {
            // An extra kill (below) found fio done: the assertion after the job says whether
            // any restart ran a request again.
            break;
        }
        assert!(
            !vm.console_text().contains("VMFIO-END"),
            "fio finished before restart {i}: make the job longer"
        );
        let t0 = Instant::now();
        match sig {
            "SIGKILL" => {
                data.child().kill();
            }
            _ => {
                let st = data.terminate(Duration::from_secs(30));
                assert!(st.success(), "vhost-mirror after SIGTERM: {st}");
            }
        }
        logs.push(data.log());
        data = Backend::spawn(&dir, &data_image, &opts);
        let resumed = wait_until(Duration::from_secs(60), || {
            data.counters().is_some_and(|c| c.writes + c.reads > 0)
        });
        assert!(
            resumed,
            "no request completed within 60 s of restart {i} ({sig})"
        );
        let pause = t0.elapsed();
        eprintln!(
            "restart {i} ({sig}): first request completed {:.0} ms after the signal",
            pause.as_secs_f64() * 1000.0
        );
        pauses.push((sig, pause));
        // Whether a kill leaves requests in flight is timing: when the planned ones left none
        // to run again (the new process says so once it took them), kill a few more times
        // while fio runs, so that the mechanism is tested, not skipped.
        if mirrored
            && i + 1 == plan.len()
            && plan.len() < planned + 6
            && !logs.iter().any(|l: &String| l.lines().any(ran_again))
            && !data.log().lines().any(ran_again)
        {
            plan.push("SIGKILL");
        }
        i += 1;
    }

    let r = vm.finish(FIO_TIMEOUT, &mut || {
        root.assert_running();
        data.assert_running();
    });
    logs.push(data.log());
    assert_eq!(r.exit, 0, "fio exit status; output:\n{}", r.output);
    assert_eq!(r.job_errors(), Vec::<String>::new(), "fio job errors");
    let jobs = r.jobs();
    assert_eq!(jobs.len(), 6, "fio jobs");
    let mut max_clat_ms = 0.0f64;
    for j in jobs {
        let name = j["jobname"].as_str().unwrap_or("?");
        if name.starts_with('w') {
            FioResult::assert_wrote_and_verified(j, JOB_MIB << 20);
        } else {
            let kind = if name.starts_with('r') {
                "read"
            } else {
                "write"
            };
            assert!(
                j[kind]["io_bytes"].as_u64().is_some_and(|b| b > 0),
                "{name} did no I/O"
            );
        }
        for kind in ["read", "write"] {
            let clat = j[kind]["clat_ns"]["max"].as_f64().unwrap_or(0.0) / 1e6;
            max_clat_ms = max_clat_ms.max(clat);
        }
    }
    let rerun: usize = logs
        .iter()
        .flat_map(|l| l.lines())
        .filter(|l| ran_again(l))
        .count();
    eprintln!(
        "restarts under load ({}): pauses {:?}; fio's longest completion {max_clat_ms:.0} ms; \
         {rerun} queue(s) ran requests again after a restart",
        if mirrored { "mirrored" } else { "unmirrored" },
        pauses
            .iter()
            .map(|(s, p)| format!("{s} {:.0} ms", p.as_secs_f64() * 1000.0))
            .collect::<Vec<_>>()
    );
    if mirrored {
        // Requests are in flight at every kill (each waits for the replica's ack): at least one
        // kill must have left some to run again, or the test did not test the mechanism.
        assert!(rerun > 0, "no restart ran a request again");
        wait_in_sync(&mut data, Duration::from_secs(120));
        assert!(data.terminate(Duration::from_secs(30)).success());
        if let Some(r) = replica.as_mut() {
            assert!(r.terminate(Duration::from_secs(30)).success());
        }
        assert_eq!(
            first_difference(&data_image, &replica_image),
            None,
            "primary and replica differ after the restarts"
        );
    }
}
