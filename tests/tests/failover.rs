//! Failover and failback, end to end (QEMU under TCG unless KVM works).
//!
//! Each round: the file-server VM runs on vhost-mirror mirrored to an access node; a client
//! uploads files durably in a loop and records every acknowledged upload's sha256; at a random
//! moment QEMU and vhost-mirror are killed with SIGKILL; `images/failover.sh` promotes the
//! replica and boots the standby VM from it; every acknowledged upload must read back
//! bit-identical. Then failback: the old image comes back as an access node, the resync must
//! copy no more than what changed since the promotion plus the old primary's hot extents, more
//! uploads succeed, the guest halts cleanly, and the two images are byte-identical. The first
//! round also does the planned switch back (promote the original host again, nothing to copy).
//!
//! Also here, without a VM: split brain is detected and refused, and resolved on request.
//!
//! Environment: `VHOST_MIRROR_FAILOVER_ROUNDS` (default 5), `VHOST_MIRROR_FAILOVER_SEED`,
//! `VHOST_MIRROR_KEEP_LOGS=1`, and those of `vm.rs`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::sleep;
use std::time::{Duration, Instant};

use mirror_proto::activity_log::EXTENT_SIZE;
use vhost_mirror_tests::libvirt;
use vhost_mirror_tests::vm::*;
use vhost_mirror_tests::{
    bin_path, free_port, is_in_sync, secret_file, status_u64, test_dir, wait_status, wait_until,
    AccessNode, AccessNodeOpts, Backend, BackendOpts, ChildGuard, Client, Watchdog,
};

const SYNC_TIMEOUT: Duration = Duration::from_secs(120);

/// A tiny deterministic generator (xorshift), so a failing round can be replayed by its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

fn mirror_status(control: &Path) -> serde_json::Value {
    mirror_proto::control::query_status(control)
        .unwrap_or_else(|e| panic!("status of {}: {e}", control.display()))
}

fn wait_mirror_in_sync(control: &Path, timeout: Duration) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(s) = mirror_proto::control::query_status(control) {
            if is_in_sync(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "replica not in sync within {timeout:?}: {s}"
            );
        } else {
            assert!(
                Instant::now() < deadline,
                "no status at {}",
                control.display()
            );
        }
        sleep(Duration::from_millis(100));
    }
}

struct Round {
    dir: PathBuf,
    guest: PathBuf,
    secret: PathBuf,
    rng: Rng,
    index: usize,
    /// The standby VM is the example libvirt domain (`failover.sh --libvirt XML`), not QEMU.
    libvirt: bool,
    /// Host A is not killed before this many uploads were acknowledged.
    min_acked: usize,
}

impl Round {
    fn run(mut self, switch_back: bool) -> (Duration, u64, u64, u64) {
        let dir = self.dir.clone();
        let (a_dir, b_dir) = (dir.join("hostA"), dir.join("hostB"));
        std::fs::create_dir_all(&a_dir).expect("mkdir");
        std::fs::create_dir_all(&b_dir).expect("mkdir");
        let img_a = a_dir.join("disk.raw");
        let img_b = b_dir.join("disk.raw");
        copy_guest_disk(&self.guest, GUEST_DISK, &img_a);
        let (port_a, port_b, http_port) = (free_port(), free_port(), free_port());
        let r = self.index;

        // 1. Mirrored pair, VM on host A.
        let mut node_b = AccessNode::spawn(
            &b_dir,
            &img_b,
            port_b,
            &self.secret,
            &AccessNodeOpts::default(),
        );
        let mut backend_a =
            Backend::spawn(&a_dir, &img_a, &BackendOpts::mirrored(port_b, &self.secret));
        wait_status(&mut backend_a, SYNC_TIMEOUT, is_in_sync)
            .unwrap_or_else(|s| panic!("round {r}: initial sync: {s}"));
        let serial_a = a_dir.join("serial.log");
        let cmd = boot_command(&self.guest, backend_a.socket(), http_port, &serial_a);
        let mut qemu_a = ChildGuard::spawn(
            "qemu on host A",
            Command::new(&cmd[0])
                .args(&cmd[1..])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        let boot = wait_http(http_port, &mut qemu_a, BOOT_TIMEOUT);
        eprintln!(
            "round {r}: VM up on host A after {:.1} s",
            boot.as_secs_f64()
        );

        // 2. Durable uploads in a loop until the crash.
        let acked = Arc::new(Mutex::new(Vec::<Upload>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let uploader = {
            let acked = acked.clone();
            let stop = stop.clone();
            let seed = self.rng.next();
            std::thread::spawn(move || {
                let mut rng = Rng(seed | 1);
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let len = rng.range(1, 200_000) as usize;
                    let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                    let name = format!("r{r}-{i}.bin");
                    match upload(http_port, &name, &data) {
                        Ok(()) => acked.lock().expect("lock").push(Upload { name, data }),
                        // After the crash uploads fail; before it they must not.
                        Err(e) if stop.load(Ordering::Relaxed) => {
                            eprintln!("round {r}: upload {name} cut by the crash: {e}");
                            break;
                        }
                        Err(e) => panic!("round {r}: upload {name} failed before the crash: {e}"),
                    }
                    i += 1;
                }
            })
        };
        let uploading = Instant::now();
        let delay = Duration::from_millis(self.rng.range(500, 4000));
        sleep(delay);
        // A round that must check uploads waits for a few (a loaded machine may take seconds
        // for the first).
        let enough = wait_until(Duration::from_secs(60), || {
            acked.lock().expect("lock").len() >= self.min_acked
        });
        assert!(
            enough,
            "round {r}: fewer than {} uploads acknowledged in 60 s",
            self.min_acked
        );
        // 3. Host A dies.
        stop.store(true, Ordering::Relaxed);
        sigkill(qemu_a.pid());
        sigkill(backend_a.pid());
        let t_kill = Instant::now();
        let _ = qemu_a.kill();
        let _ = backend_a.child().kill();
        uploader.join().expect("uploader thread panicked");
        let acked = acked.lock().expect("lock").clone();
        eprintln!(
            "round {r}: killed host A after {:.1} s, {} uploads acknowledged",
            uploading.elapsed().as_secs_f64(),
            acked.len()
        );

        // 4. Fail over to host B.
        let sock_b = b_dir.join("vm.sock");
        let ctl_b = b_dir.join("vm.ctl");
        let serial_b = b_dir.join("serial.log");
        let failover_log = std::fs::File::create(b_dir.join("failover.log")).expect("log");
        let mut cmd = Command::new("bash");
        cmd.arg(workspace_root().join("images/failover.sh"))
            .arg("--replica")
            .arg(&img_b)
            .arg("--access-control")
            .arg(node_b.control())
            .arg("--socket")
            .arg(&sock_b)
            .arg("--control")
            .arg(&ctl_b)
            .arg("--peer")
            .arg(format!("127.0.0.1:{port_a}"))
            .arg("--secret-file")
            .arg(&self.secret);
        // With libvirt: QEMU runs as libvirt's user, so the socket is opened to its group (and
        // the round's dir, see failover_to_a_libvirt_domain); the domain is destroyed if the
        // test fails (failover.sh, killed with its process group, cannot do it then).
        let mut _standby_domain = None;
        if self.libvirt {
            let name = libvirt::unique_name(&format!("failover-{r}"));
            let xml = b_dir.join("domain.xml");
            std::fs::write(
                &xml,
                libvirt::example_domain(&name, &sock_b, &serial_b, http_port),
            )
            .expect("write domain XML");
            _standby_domain = Some(libvirt::Domain::watch(&name));
            cmd.arg("--socket-group")
                .arg(libvirt::qemu_group())
                .arg("--libvirt")
                .arg(&xml);
        } else {
            cmd.arg("--")
                .args(boot_command(&self.guest, &sock_b, http_port, &serial_b));
        }
        let mut failover = GroupGuard::spawn(
            "images/failover.sh",
            cmd.env("VHOST_MIRROR", bin_path("vhost-mirror"))
                .env("ACCESS_NODE", bin_path("access-node"))
                .stdin(Stdio::null())
                .stdout(failover_log.try_clone().expect("clone"))
                .stderr(failover_log),
        );
        first_answer(http_port, BOOT_TIMEOUT, &mut || {
            assert!(failover.is_running(), "round {r}: failover.sh exited early");
        });
        let recovery = t_kill.elapsed();
        eprintln!(
            "round {r}: standby serving {:.2} s after SIGKILL",
            recovery.as_secs_f64()
        );
        let exit = node_b.child().wait_timeout(Duration::from_secs(10));
        assert!(
            exit.is_some_and(|s| s.success()),
            "round {r}: access node on B did not exit 0 after promote: {exit:?}"
        );
        check_uploads(http_port, &acked, &format!("round {r} after failover"));

        // 5. Failback: host A returns as the access node.
        let before = mirror_status(&ctl_b);
        let changed = status_u64(&before, "out_of_sync_bytes");
        let hot = mirror_proto::activity_log::read(&img_a).expect("read A's activity log");
        let hot_bytes = hot.len() as u64 * EXTENT_SIZE;
        let mut node_a = AccessNode::spawn(
            &a_dir,
            &img_a,
            port_a,
            &self.secret,
            &AccessNodeOpts::default(),
        );
        let after = wait_mirror_in_sync(&ctl_b, SYNC_TIMEOUT);
        let moved = status_u64(&after, "resync_total_bytes");
        let sent = status_u64(&after, "resync_sent_bytes");
        let same = status_u64(&after, "resync_same_bytes");
        let size = std::fs::metadata(&img_a).expect("stat").len();
        eprintln!(
            "round {r}: failback resync covered {moved} bytes, sent {sent} as data, {same} found \
             the same by block hashes (changed since promotion {changed}, hot extents {} = \
             {hot_bytes} bytes) of a {size}-byte image",
            hot.len()
        );
        assert!(
            moved <= changed + hot_bytes,
            "round {r}: resync moved {moved} bytes, more than changed {changed} + hot {hot_bytes}"
        );
        let mut more = Vec::new();
        for i in 0..3 {
            let data: Vec<u8> = (0..50_000).map(|_| self.rng.next() as u8).collect();
            let name = format!("r{r}-after-{i}.txt");
            upload(http_port, &name, &data).unwrap_or_else(|e| panic!("round {r}: {e}"));
            more.push(Upload { name, data });
        }
        check_uploads(http_port, &acked, &format!("round {r} after failback"));

        // 6. Clean halt on B; failover.sh stops vhost-mirror (flush + goodbye).
        let _ = http(http_port, "GET", "/cgi-bin/halt", b"");
        let st = failover.wait_timeout(EXIT_TIMEOUT);
        assert!(
            st.is_some_and(|s| s.success()),
            "round {r}: failover.sh exit {st:?}"
        );
        if !switch_back {
            let st = node_a.terminate(Duration::from_secs(30));
            assert!(st.success(), "round {r}: access node on A exit {st}");
            if let Some(off) = first_difference(&img_a, &img_b) {
                panic!("round {r}: images differ at offset {off}");
            }
            return (recovery, moved, changed + hot_bytes, acked.len() as u64);
        }

        // 7. Planned switch back to host A: promote A, B becomes the access node.
        let out = Command::new(bin_path("access-node"))
            .arg("promote")
            .arg("--control")
            .arg(node_a.control())
            .output()
            .expect("run promote");
        assert!(
            out.status.success(),
            "round {r}: promote A: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let exit = node_a.child().wait_timeout(Duration::from_secs(10));
        assert!(exit.is_some_and(|s| s.success()), "node A exit {exit:?}");
        let _node_b2 = AccessNode::spawn(
            &b_dir,
            &img_b,
            port_b,
            &self.secret,
            &AccessNodeOpts::default(),
        );
        let mut backend_a2 =
            Backend::spawn(&a_dir, &img_a, &BackendOpts::mirrored(port_b, &self.secret));
        let s = wait_status(&mut backend_a2, SYNC_TIMEOUT, is_in_sync)
            .unwrap_or_else(|s| panic!("round {r}: switch back sync: {s}"));
        assert_eq!(
            status_u64(&s, "resync_total_bytes"),
            0,
            "switch back must copy nothing: {s}"
        );
        let serial_a2 = a_dir.join("serial2.log");
        let cmd = boot_command(&self.guest, backend_a2.socket(), http_port, &serial_a2);
        let mut qemu_a2 = ChildGuard::spawn(
            "qemu on host A (switch back)",
            Command::new(&cmd[0])
                .args(&cmd[1..])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        wait_http(http_port, &mut qemu_a2, BOOT_TIMEOUT);
        check_uploads(http_port, &acked, "after switch back");
        check_uploads(http_port, &more, "after switch back");
        let _ = http(http_port, "GET", "/cgi-bin/halt", b"");
        let st = qemu_a2.wait_timeout(EXIT_TIMEOUT);
        assert!(st.is_some(), "QEMU did not halt");
        assert!(backend_a2.terminate(Duration::from_secs(30)).success());
        let mut node_b2 = _node_b2;
        assert!(node_b2.terminate(Duration::from_secs(30)).success());
        if let Some(off) = first_difference(&img_a, &img_b) {
            panic!("switch back: images differ at offset {off}");
        }
        eprintln!("round {r}: planned switch back done, images identical");
        (recovery, moved, changed + hot_bytes, acked.len() as u64)
    }
}

/// The rounds' random seed: `VHOST_MIRROR_FAILOVER_SEED` to replay one, else the clock.
fn seed_from_env() -> u64 {
    std::env::var("VHOST_MIRROR_FAILOVER_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
}

#[test]
fn failover_and_failback_rounds() {
    require_tool("debugfs", "e2fsprogs");
    let rounds: usize = std::env::var("VHOST_MIRROR_FAILOVER_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let seed = seed_from_env();
    eprintln!("failover test: {rounds} rounds, seed {seed} (VHOST_MIRROR_FAILOVER_SEED to replay)");
    let _watchdog = Watchdog::new("failover test", Duration::from_secs(150 * rounds as u64));
    let guest = build_guest();
    let mut rng = Rng(seed | 1);
    let mut recoveries = Vec::new();
    let mut total_acked = 0;
    for index in 0..rounds {
        let (recovery, acked) = run_round(&guest, &mut rng, index, false);
        recoveries.push(recovery);
        total_acked += acked;
    }
    recoveries.sort();
    let median = recoveries[recoveries.len() / 2];
    let worst = recoveries[recoveries.len() - 1];
    eprintln!(
        "failover test: {rounds} rounds, {total_acked} acknowledged uploads, 0 lost; recovery time \
         (SIGKILL to the standby's first answer) median {:.2} s, worst {:.2} s",
        median.as_secs_f64(),
        worst.as_secs_f64()
    );
}

/// One round in a temp dir of its own (kept with `VHOST_MIRROR_KEEP_LOGS`); round 0 of QEMU
/// standbys also switches back. Returns the recovery time and the number of acknowledged uploads.
fn run_round(guest: &Path, rng: &mut Rng, index: usize, libvirt: bool) -> (Duration, u64) {
    let tmp = test_dir("failover");
    let dir = tmp.path().to_path_buf();
    let keep = std::env::var_os("VHOST_MIRROR_KEEP_LOGS").is_some();
    let _report = FailureReport {
        logs: vec![
            ("host A serial console", dir.join("hostA/serial.log")),
            ("host B serial console", dir.join("hostB/serial.log")),
            ("failover.sh", dir.join("hostB/failover.log")),
            ("libvirtd (if started here)", dir.join("libvirtd.log")),
        ],
        dir: dir.clone(),
        kept: keep,
    };
    // QEMU under libvirt is not root: it must pass the round's dir to reach host B's socket.
    let _libvirtd = libvirt.then(|| {
        libvirt::open_dir_to_group(&dir, &libvirt::qemu_group());
        libvirt::Libvirtd::ensure(&dir)
    });
    let secret = secret_file(
        &dir,
        &format!("failover round {index} secret {}", rng.next()),
    );
    let round = Round {
        dir: dir.clone(),
        guest: guest.to_path_buf(),
        secret,
        rng: Rng(rng.next() | 1),
        index,
        libvirt,
        // The QEMU rounds kill at any moment, also before the first upload; the one libvirt
        // round has uploads to check.
        min_acked: if libvirt { 3 } else { 0 },
    };
    let (recovery, moved, bound, acked) = round.run(index == 0 && !libvirt);
    eprintln!(
        "round {index}: recovery {:.2} s, resync {moved} <= {bound} bytes, {acked} acknowledged uploads, 0 lost",
        recovery.as_secs_f64()
    );
    if keep {
        let _ = tmp.keep();
    }
    (recovery, acked)
}

/// One round whose standby VM is the example libvirt domain (images/vhost-mirror-vm.xml), started
/// by `images/failover.sh --socket-group GROUP --libvirt XML` on `qemu:///system` (libvirtd
/// started here if it does not answer): every acknowledged upload is there, the failback copies
/// only what changed, and failover.sh returns 0 once the domain halted.
#[test]
fn failover_to_a_libvirt_domain() {
    require_tool("debugfs", "e2fsprogs");
    let seed = seed_from_env();
    eprintln!("libvirt failover test: seed {seed} (VHOST_MIRROR_FAILOVER_SEED to replay)");
    let _watchdog = Watchdog::new("libvirt failover test", Duration::from_secs(600));
    let guest = build_guest();
    let (recovery, acked) = run_round(&guest, &mut Rng(seed | 1), 0, true);
    eprintln!(
        "libvirt failover test: {acked} acknowledged uploads, 0 lost; the domain served {:.2} s \
         after the SIGKILL",
        recovery.as_secs_f64()
    );
}

/// Both sides wrote on their own since they last agreed: the link refuses, both statuses say
/// split-brain with both generations, nothing is overwritten; `--discard-my-data` on the side
/// whose changes go resolves it with a full sync.
#[test]
fn split_brain_is_refused_then_resolved() {
    let _watchdog = Watchdog::new("split brain test", Duration::from_secs(120));
    let tmp = test_dir("split-brain");
    let dir = tmp.path();
    let secret = secret_file(dir, "split brain secret");
    let (img_a, img_b) = (dir.join("a.raw"), dir.join("b.raw"));
    vhost_mirror_tests::create_image(&img_a, 32 << 20);
    let (port_a, port_b) = (free_port(), free_port());

    // In sync first.
    let mut node_b = AccessNode::spawn(dir, &img_b, port_b, &secret, &AccessNodeOpts::default());
    let mut a = Backend::spawn(dir, &img_a, &BackendOpts::mirrored(port_b, &secret));
    wait_status(&mut a, SYNC_TIMEOUT, is_in_sync).unwrap_or_else(|s| panic!("sync: {s}"));
    // A loses its peer and keeps writing (degraded: a new generation on A).
    node_b.terminate(Duration::from_secs(30));
    {
        let mut c = Client::connect(a.socket());
        c.q().write(0, &vec![0xAA; 65536]).expect("write on A");
    }
    // B is promoted and written to as well (a second primary).
    let out = Command::new(bin_path("access-node"))
        .args(["promote", "--image"])
        .arg(&img_b)
        .output()
        .expect("promote");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut b = Backend::spawn(dir, &img_b, &BackendOpts::default());
    {
        let mut c = Client::connect(b.socket());
        c.q()
            .write(1 << 20, &vec![0xBB; 65536])
            .expect("write on B");
    }
    assert!(b.terminate(Duration::from_secs(30)).success());
    assert!(a.terminate(Duration::from_secs(30)).success());
    let sum_a = sha256_hex(&std::fs::read(&img_a).expect("read"));
    let sum_b = sha256_hex(&std::fs::read(&img_b).expect("read"));

    // B's image now serves as the access node for A: split brain.
    let mut node = AccessNode::spawn(dir, &img_b, port_b, &secret, &AccessNodeOpts::default());
    let mut a = Backend::spawn(dir, &img_a, &BackendOpts::mirrored(port_b, &secret));
    let s = wait_status(&mut a, SYNC_TIMEOUT, |s| {
        vhost_mirror_tests::status_str(s, "peer_state") == "split-brain"
    })
    .unwrap_or_else(|s| panic!("primary did not report split brain: {s}"));
    eprintln!("primary status: {s}");
    assert!(s["peer_generation"].as_u64().is_some() && s["generation"].as_u64().is_some());
    assert_ne!(s["peer_generation"], s["generation"]);
    let ns = vhost_mirror_tests::wait_node_status(&mut node, SYNC_TIMEOUT, |s| {
        vhost_mirror_tests::status_str(s, "peer_state") == "split-brain"
    })
    .unwrap_or_else(|s| panic!("access node did not report split brain: {s}"));
    eprintln!("access node status: {ns}");
    assert!(ns["peer_generation"].as_u64().is_some());
    sleep(Duration::from_secs(1));
    assert!(node.terminate(Duration::from_secs(30)).success());
    assert!(a.terminate(Duration::from_secs(30)).success());
    assert_eq!(
        sha256_hex(&std::fs::read(&img_a).expect("read")),
        sum_a,
        "A was changed"
    );
    assert_eq!(
        sha256_hex(&std::fs::read(&img_b).expect("read")),
        sum_b,
        "B was changed"
    );

    // Resolve: B's changes go.
    let _node = AccessNode::spawn(
        dir,
        &img_b,
        port_b,
        &secret,
        &AccessNodeOpts {
            extra_args: vec!["--discard-my-data".into()],
            ..AccessNodeOpts::default()
        },
    );
    let mut a = Backend::spawn(dir, &img_a, &BackendOpts::mirrored(port_b, &secret));
    wait_status(&mut a, SYNC_TIMEOUT, is_in_sync).unwrap_or_else(|s| panic!("resolve: {s}"));
    assert!(a.terminate(Duration::from_secs(30)).success());
    let mut node = _node;
    assert!(node.terminate(Duration::from_secs(30)).success());
    assert_eq!(
        first_difference(&img_a, &img_b),
        None,
        "images differ after resolution"
    );
    let _ = port_a;
}
