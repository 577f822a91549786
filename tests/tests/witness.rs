//! The quorum witness (issue 11, item 1): a primary that loses its replica acknowledges nothing
//! the replica lacks until the witness recorded the replica outdated; a replica is promoted
//! only with the witness's consent; a primary that learns its replica was promoted
//! acknowledges no further write. Every link goes through a loopback proxy the test can cut
//! (primary -> replica, primary -> witness); the replica reaches the witness directly.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use vhost_mirror_tests::netfault::Proxy;
use vhost_mirror_tests::{
    bin_path, compare_files, free_port, pattern, read_file_range, run_with_timeout, status_str,
    wait_in_sync, wait_status, AccessNode, AccessNodeOpts, Backend, BackendKind, BackendOpts,
    Client, ClientOpts, Op, Pair, Watchdog, Witness, TIMEOUT,
};

const MIB: u64 = 1024 * 1024;
const BLOCK: usize = 4096;
const SYNC_TIMEOUT: Duration = Duration::from_secs(20);

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// A pair whose primary reaches the replica and the witness through proxies.
struct Setup {
    pair: Pair,
    witness: Witness,
    state_dir: std::path::PathBuf,
    to_replica: Proxy,
    to_witness: Proxy,
    node: AccessNode,
    primary: Backend,
    opts: BackendOpts,
}

impl Setup {
    fn new(name: &str) -> Setup {
        let pair = Pair::new(name, 16 * MIB);
        let state_dir = pair.dir.path().join("witness-state");
        std::fs::create_dir(&state_dir).expect("mkdir witness state");
        let witness = Witness::spawn(pair.dir.path(), &state_dir, free_port(), &pair.secret);
        let node = pair.node_with(&AccessNodeOpts {
            extra_args: vec!["--witness".into(), witness.addr()],
            ..AccessNodeOpts::default()
        });
        let to_replica = Proxy::start(None, loopback(0), loopback(pair.port));
        let to_witness = Proxy::start(
            None,
            loopback(0),
            witness.addr().parse().expect("witness address"),
        );
        let mut o = BackendOpts {
            kind: Some(BackendKind::VhostMirror),
            ..BackendOpts::mirrored(to_replica.addr().port(), &pair.secret)
        };
        o.extra_args
            .extend(["--witness".into(), to_witness.addr().to_string()]);
        let mut primary = Backend::spawn(pair.dir.path(), &pair.primary, &o);
        wait_in_sync(&mut primary, SYNC_TIMEOUT);
        Setup {
            opts: o,
            pair,
            witness,
            state_dir,
            to_replica,
            to_witness,
            node,
            primary,
        }
    }

    fn promote(&self) -> (bool, String) {
        promote(self.node.control())
    }
}

/// `access-node promote --control CTL`: whether it succeeded, and what it printed.
fn promote(ctl: &std::path::Path) -> (bool, String) {
    let out = run_with_timeout(
        Command::new(bin_path("access-node"))
            .arg("promote")
            .arg("--control")
            .arg(ctl),
        Duration::from_secs(30),
    );
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn client(b: &Backend) -> Client {
    Client::connect_with(
        b.socket(),
        &ClientOpts {
            buf_per_queue: 8 << 20,
            ..ClientOpts::default()
        },
    )
}

/// The link to the replica cut, the witness reachable: the primary goes on once the witness
/// recorded the replica outdated; the replica's promotion is refused (also after the witness
/// restarts); after the heal the pair resyncs by itself and the witness forgets the record.
#[test]
fn a_cut_replica_is_outdated_and_not_promoted() {
    let _wd = Watchdog::new(
        "a_cut_replica_is_outdated_and_not_promoted",
        Duration::from_secs(120),
    );
    let mut s = Setup::new("witness-outdate");
    let mut c = client(&s.primary);
    assert_eq!(c.q().write(0, &pattern(0, BLOCK, 1)), Ok(()));
    assert_eq!(c.q().flush(), Ok(()));

    s.to_replica.refuse(true);
    s.to_replica.cut();
    let t = Instant::now();
    assert_eq!(c.q().write(MIB, &pattern(MIB, BLOCK, 2)), Ok(()));
    assert_eq!(c.q().flush(), Ok(()));
    eprintln!(
        "first degraded write + flush acknowledged after {:?}",
        t.elapsed()
    );
    let st = s.primary.status_json();
    assert_eq!(
        status_str(&st, "fence_state"),
        "peer-outdated",
        "{}",
        pretty(&st)
    );
    let w = s.witness.status_json();
    let records = w["records"].as_array().expect("records");
    assert!(
        !records.is_empty() && records.iter().all(|r| r["state"] == "outdated"),
        "{}",
        pretty(&w)
    );

    // The witness keeps its word across a restart.
    s.witness.kill();
    s.witness = Witness::spawn(
        s.pair.dir.path(),
        &s.state_dir,
        s.witness
            .addr()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port"),
        &s.pair.secret,
    );
    let (ok, out) = s.promote();
    assert!(!ok, "an outdated replica was promoted: {out}");
    assert!(out.contains("witness recorded it outdated"), "{out}");
    s.node.assert_running();

    // Heal: the primary resyncs by itself; the witness forgets the record.
    s.to_replica.refuse(false);
    let st = wait_in_sync(&mut s.primary, SYNC_TIMEOUT);
    assert_eq!(
        status_str(&st, "fence_state"),
        "attached",
        "{}",
        pretty(&st)
    );
    let forgot = vhost_mirror_tests::wait_until(TIMEOUT, || {
        s.witness.status_json()["records"]
            .as_array()
            .is_some_and(|r| r.is_empty())
    });
    assert!(forgot, "{}", pretty(&s.witness.status_json()));
    drop(c);
    let _ = s.primary.terminate(TIMEOUT);
    let _ = s.node.terminate(TIMEOUT);
    assert_eq!(
        read_file_range(&s.pair.replica, MIB, BLOCK),
        pattern(MIB, BLOCK, 2),
        "the write made while the replica was away was not resynced"
    );
}

/// The primary cut off from both: it holds guest writes (nothing acknowledged); the replica is
/// promoted with the witness's consent; once the primary reaches the witness again it learns
/// it was superseded and fails the held write and every later one. Everything acknowledged
/// before the cut is on the promoted replica.
#[test]
fn an_isolated_primary_holds_writes_and_is_superseded() {
    let _wd = Watchdog::new(
        "an_isolated_primary_holds_writes_and_is_superseded",
        Duration::from_secs(120),
    );
    let mut s = Setup::new("witness-isolated");
    let mut c = client(&s.primary);
    assert_eq!(c.q().write(0, &pattern(0, BLOCK, 1)), Ok(()));
    assert_eq!(c.q().flush(), Ok(()));

    s.to_witness.refuse(true);
    s.to_replica.refuse(true);
    s.to_replica.cut();
    {
        let q = c.q();
        q.buf()[..BLOCK].copy_from_slice(&pattern(MIB, BLOCK, 2));
        q.submit(
            Op::Write {
                off: MIB,
                buf_off: 0,
                len: BLOCK,
            },
            7,
        );
        let early = q.kick();
        assert!(early.is_empty(), "completed at once: {early:?}");
    }
    let st = wait_status(&mut s.primary, TIMEOUT, |v| {
        status_str(v, "fence_state") == "waiting-for-witness"
    })
    .unwrap_or_else(|v| panic!("{}", pretty(&v)));
    eprintln!("{}", pretty(&st));
    std::thread::sleep(Duration::from_secs(2));
    let held = c.q().kick();
    assert!(
        held.is_empty(),
        "a write the replica lacks was completed with neither replica nor witness: {held:?}"
    );

    let (ok, out) = s.promote();
    assert!(ok, "promotion with the witness's consent failed: {out}");

    s.to_witness.refuse(false);
    let done = c.q().wait(1);
    assert_eq!(done.len(), 1);
    assert!(
        done[0].ret < 0,
        "the held write was acknowledged after the replica's promotion: {done:?}"
    );
    let st = wait_status(&mut s.primary, TIMEOUT, |v| {
        status_str(v, "fence_state") == "superseded"
    })
    .unwrap_or_else(|v| panic!("{}", pretty(&v)));
    assert!(
        c.q().write(2 * MIB, &pattern(2 * MIB, BLOCK, 3)).is_err(),
        "a superseded primary acknowledged a write: {}",
        pretty(&st)
    );
    // What was acknowledged before the cut is on the promoted image.
    assert_eq!(
        read_file_range(&s.pair.replica, 0, BLOCK),
        pattern(0, BLOCK, 1)
    );
    drop(c);
    let _ = s.primary.terminate(TIMEOUT);

    // The promoted image, served as the new primary with the witness and its peer (the old
    // primary) away: the witness lets it go on (it is the node promoted from that
    // generation), and its writes are acknowledged.
    let old_port = free_port();
    let mut o = BackendOpts {
        kind: Some(BackendKind::VhostMirror),
        ..BackendOpts::mirrored(old_port, &s.pair.secret)
    };
    o.extra_args.extend(["--witness".into(), s.witness.addr()]);
    let mut b = Backend::spawn(s.pair.dir.path(), &s.pair.replica, &o);
    let mut c = client(&b);
    assert_eq!(
        c.q().write(3 * MIB, &pattern(3 * MIB, BLOCK, 4)),
        Ok(()),
        "the promoted node's own writes: {}",
        pretty(&b.status_json())
    );
    let st = b.status_json();
    assert_eq!(
        status_str(&st, "fence_state"),
        "peer-outdated",
        "{}",
        pretty(&st)
    );

    // The old primary comes back as the new primary's replica (what the cluster does once it
    // fenced it). Its image holds a write it never acknowledged (the held one, at 1 MiB):
    // that is no split brain, it is discarded, and the pair resyncs by itself.
    s.node.terminate(TIMEOUT);
    let old = AccessNode::spawn(
        s.pair.dir.path(),
        &s.pair.primary,
        old_port,
        &s.pair.secret,
        &AccessNodeOpts {
            extra_args: vec!["--witness".into(), s.witness.addr()],
            ..AccessNodeOpts::default()
        },
    );
    wait_in_sync(&mut b, SYNC_TIMEOUT);
    assert_eq!(c.q().write(4 * MIB, &pattern(4 * MIB, BLOCK, 5)), Ok(()));
    assert_eq!(c.q().flush(), Ok(()));
    drop(c);
    let st = b.status_json();
    let _ = b.terminate(TIMEOUT);
    drop(old);
    if let Err(e) = compare_files(&s.pair.primary, &s.pair.replica) {
        panic!(
            "the old primary's image differs from the promoted one after the resync: {e}\n{}",
            pretty(&st)
        );
    }
    let r = std::fs::read(&s.pair.replica).expect("read promoted image");
    assert_eq!(&r[..BLOCK], &pattern(0, BLOCK, 1)[..]);
    assert_eq!(
        &r[3 * MIB as usize..3 * MIB as usize + BLOCK],
        &pattern(3 * MIB, BLOCK, 4)[..]
    );
    assert_ne!(
        &r[MIB as usize..MIB as usize + BLOCK],
        &pattern(MIB, BLOCK, 2)[..],
        "the write the old primary never acknowledged reached the new primary"
    );
}

/// A cut while the guest is idle, healed before it writes: nothing is recorded at the witness,
/// and the replica, in sync again, may be promoted.
#[test]
fn an_idle_cut_and_heal_leave_the_replica_promotable() {
    let _wd = Watchdog::new(
        "an_idle_cut_and_heal_leave_the_replica_promotable",
        Duration::from_secs(120),
    );
    let mut s = Setup::new("witness-idle");
    s.to_replica.refuse(true);
    s.to_replica.cut();
    wait_status(&mut s.primary, TIMEOUT, |v| {
        status_str(v, "peer_state") != "connected"
    })
    .unwrap_or_else(|v| panic!("{}", pretty(&v)));
    std::thread::sleep(Duration::from_millis(500));
    s.to_replica.refuse(false);
    wait_in_sync(&mut s.primary, SYNC_TIMEOUT);
    let w = s.witness.status_json();
    assert_eq!(
        w["records"].as_array().map(Vec::len),
        Some(0),
        "{}",
        pretty(&w)
    );
    let _ = s.primary.terminate(TIMEOUT);
    let (ok, out) = s.promote();
    assert!(ok, "an up-to-date replica was refused: {out}");
}

/// A write of several link frames (4 MiB) cut while its frames are on the way is held like
/// any other the replica lacks: not acknowledged while neither the replica nor the witness
/// answers. (A part that could not even be sent: the unit test
/// `a_write_whose_later_part_was_never_sent_is_held`.)
#[test]
fn a_large_write_cut_midway_is_held() {
    let _wd = Watchdog::new("a_large_write_cut_midway_is_held", Duration::from_secs(120));
    let mut s = Setup::new("witness-parts");
    s.to_witness.refuse(true);
    // Slow the link so that the cut lands while the write's frames are on the way.
    s.to_replica.set_delay(Duration::from_millis(50));
    let mut c = client(&s.primary);
    let before = s.to_replica.bytes_to_target();
    {
        let q = c.q();
        let data = vec![0x5au8; 4 * MIB as usize];
        q.buf()[..data.len()].copy_from_slice(&data);
        q.submit(
            Op::Write {
                off: 4 * MIB,
                buf_off: 0,
                len: data.len(),
            },
            9,
        );
        let _ = q.kick();
    }
    let went = vhost_mirror_tests::wait_until(TIMEOUT, || {
        s.to_replica.bytes_to_target() > before + MIB / 2
    });
    assert!(went, "the write's first part never reached the proxy");
    s.to_replica.refuse(true);
    s.to_replica.cut();
    std::thread::sleep(Duration::from_secs(2));
    let done = c.q().kick();
    assert!(
        done.iter().all(|d| d.ret < 0),
        "a write cut between its parts was acknowledged with neither replica nor witness: \
         {done:?}; {}",
        pretty(&s.primary.status_json())
    );
    s.to_witness.refuse(false);
    let done = if done.is_empty() { c.q().wait(1) } else { done };
    assert_eq!(done.len(), 1);
    drop(c);
    let _ = s.primary.terminate(TIMEOUT);
}

/// Garbage and strangers on the witness's port change nothing; a damaged state file keeps it
/// from starting (it would forget decisions) with a clear error.
#[test]
fn the_witness_survives_garbage_and_refuses_a_damaged_state_file() {
    let _wd = Watchdog::new(
        "the_witness_survives_garbage_and_refuses_a_damaged_state_file",
        Duration::from_secs(60),
    );
    let dir = vhost_mirror_tests::test_dir("witness-garbage");
    let secret = vhost_mirror_tests::secret_file(dir.path(), "the witness's secret 0123\n");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("mkdir");
    let mut w = Witness::spawn(dir.path(), &state, free_port(), &secret);
    for junk in [
        &b"GET / HTTP/1.0\r\n\r\n"[..],
        &[0u8; 64][..],
        &[0xffu8; 4096][..],
    ] {
        use std::io::Write;
        let mut t = std::net::TcpStream::connect(w.addr()).expect("connect");
        let _ = t.write_all(junk);
    }
    std::thread::sleep(Duration::from_millis(300));
    let st = w.status_json();
    assert_eq!(
        st["records"].as_array().map(Vec::len),
        Some(0),
        "{}",
        pretty(&st)
    );
    assert!(
        st["handshake_failures"].as_u64().unwrap_or(0) >= 1,
        "{}",
        pretty(&st)
    );
    w.kill();
    std::fs::write(state.join("witness.json"), b"{\"format\": 1, \"rec").expect("write");
    let mut w = Witness::start(dir.path(), &state, free_port(), &secret);
    let status = w
        .child()
        .wait_timeout(TIMEOUT)
        .expect("the witness did not exit");
    assert!(!status.success());
    assert!(w.log().contains("damaged"), "{}", w.log());
}

/// `--fence-peer CMD` instead of a witness (DRBD's handler convention): a write the replica
/// lacks waits while the handler fails (exit 1, run again), goes on once it exits 4 (peer
/// outdated); after a heal and a second cut, exit 6 (the peer is primary) fails it.
#[test]
fn the_fence_peer_handler_decides_like_drbds() {
    let _wd = Watchdog::new(
        "the_fence_peer_handler_decides_like_drbds",
        Duration::from_secs(120),
    );
    let pair = Pair::new("fence-peer", 16 * MIB);
    let dir = pair.dir.path();
    let code = dir.join("exit-code");
    let env_out = dir.join("handler-env");
    let runs = dir.join("runs");
    std::fs::write(&code, "1").expect("write");
    let script = dir.join("fence-peer.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho run >> {runs}\nenv | grep '^VHOST_MIRROR_' > {env}\nexit $(cat {code})\n",
            runs = runs.display(),
            env = env_out.display(),
            code = code.display()
        ),
    )
    .expect("write script");
    let mut node = pair.node();
    let to_replica = Proxy::start(None, loopback(0), loopback(pair.port));
    let mut o = BackendOpts {
        kind: Some(BackendKind::VhostMirror),
        ..BackendOpts::mirrored(to_replica.addr().port(), &pair.secret)
    };
    o.extra_args
        .extend(["--fence-peer".into(), format!("sh {}", script.display())]);
    let mut b = Backend::spawn(dir, &pair.primary, &o);
    wait_in_sync(&mut b, SYNC_TIMEOUT);
    let mut c = client(&b);

    let held_write = |c: &mut Client, off: u64, seed: u64| {
        let q = c.q();
        q.buf()[..BLOCK].copy_from_slice(&pattern(off, BLOCK, seed));
        q.submit(
            Op::Write {
                off,
                buf_off: 0,
                len: BLOCK,
            },
            1,
        );
        q.kick()
    };

    to_replica.refuse(true);
    to_replica.cut();
    assert!(held_write(&mut c, MIB, 1).is_empty());
    let ran = vhost_mirror_tests::wait_until(TIMEOUT, || {
        std::fs::read_to_string(&runs).is_ok_and(|r| r.lines().count() >= 2)
    });
    assert!(ran, "the handler was not run again after exiting 1");
    assert!(
        c.q().kick().is_empty(),
        "a write completed while the handler kept failing"
    );
    std::fs::write(&code, "4").expect("write");
    let done = c.q().wait(1);
    assert_eq!(done.len(), 1);
    assert_eq!(
        done[0].ret, 0,
        "exit 4 (peer outdated) should let the write go on"
    );
    let st = b.status_json();
    assert_eq!(
        status_str(&st, "fence_state"),
        "peer-outdated",
        "{}",
        pretty(&st)
    );
    let env = std::fs::read_to_string(&env_out).expect("handler env");
    assert!(
        env.contains("VHOST_MIRROR_GENERATIONS=") && env.contains("VHOST_MIRROR_PEER="),
        "{env}"
    );

    // Heal, then a second cut answered 6: the peer is primary, the write fails.
    to_replica.refuse(false);
    wait_in_sync(&mut b, SYNC_TIMEOUT);
    std::fs::write(&code, "6").expect("write");
    to_replica.refuse(true);
    to_replica.cut();
    let done = held_write(&mut c, 2 * MIB, 2);
    let done = if done.is_empty() { c.q().wait(1) } else { done };
    assert_eq!(done.len(), 1);
    assert!(
        done[0].ret < 0,
        "exit 6 (peer is primary) acknowledged: {done:?}"
    );
    let st = b.status_json();
    assert_eq!(
        status_str(&st, "fence_state"),
        "superseded",
        "{}",
        pretty(&st)
    );
    drop(c);
    let _ = b.terminate(TIMEOUT);
    let _ = node.terminate(TIMEOUT);
}

/// Second review of the witness: outdated records a primary made before it restarted (it
/// forgot them) must not keep its replica from being promoted once a resync brought it up to
/// date again (that resync ends at a generation no record names).
#[test]
fn records_from_before_a_restart_do_not_block_a_promotion() {
    let _wd = Watchdog::new(
        "records_from_before_a_restart_do_not_block_a_promotion",
        Duration::from_secs(120),
    );
    let mut s = Setup::new("witness-restart");
    let mut c = client(&s.primary);
    s.to_replica.refuse(true);
    s.to_replica.cut();
    assert_eq!(c.q().write(MIB, &pattern(MIB, BLOCK, 2)), Ok(()));
    drop(c);
    let w = s.witness.status_json();
    assert!(
        !w["records"].as_array().is_some_and(|r| r.is_empty()),
        "{}",
        pretty(&w)
    );
    let _ = s.primary.terminate(TIMEOUT);
    s.to_replica.refuse(false);
    s.primary = Backend::spawn(s.pair.dir.path(), &s.pair.primary, &s.opts);
    wait_in_sync(&mut s.primary, SYNC_TIMEOUT);
    let _ = s.primary.terminate(TIMEOUT);
    let (ok, out) = s.promote();
    assert!(
        ok,
        "a replica brought up to date after the primary restarted was refused: {out}\nwitness: {}",
        pretty(&s.witness.status_json())
    );
    assert_eq!(
        read_file_range(&s.pair.replica, MIB, BLOCK),
        pattern(MIB, BLOCK, 2)
    );
}

/// A former primary whose replica was promoted in its absence (it died; the replica took
/// over) is not promoted again from its own stale image: its image still says primary, and
/// `promote` asks the witness about it too (found by the cluster tier).
#[test]
fn a_stale_former_primary_is_not_promoted_back() {
    let _wd = Watchdog::new(
        "a_stale_former_primary_is_not_promoted_back",
        Duration::from_secs(120),
    );
    let mut s = Setup::new("witness-former");
    let _ = s.primary.child().kill();
    let (ok, out) = s.promote();
    assert!(ok, "the replica's promotion: {out}");
    // The old primary's image, back as an access node (the cluster starts it unpromoted).
    let old = AccessNode::spawn(
        s.pair.dir.path(),
        &s.pair.primary,
        free_port(),
        &s.pair.secret,
        &AccessNodeOpts {
            extra_args: vec!["--witness".into(), s.witness.addr()],
            ..AccessNodeOpts::default()
        },
    );
    let (promoted, text) = promote(old.control());
    assert!(
        !promoted,
        "the stale former primary was promoted back: {text}"
    );
    assert!(text.contains("witness"), "{text}");
}
