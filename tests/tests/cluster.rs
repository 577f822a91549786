//! The cluster tier (issue 11, item 3): the OCF agent `ha/ocf/vhost-mirror` under a real
//! Corosync + Pacemaker cluster of three nodes, each in namespaces of its own
//! (`ha/testcluster/cluster.sh`), with fencing (`ha/testcluster/fence_testcluster`: the node's
//! network cut and every process of it killed, then started again).
//!
//! node1 and node2 hold the disk: `ocf:vhost-mirror:disk` as a promotable clone (promoted:
//! `vhost-mirror serve --peer`, unpromoted: `access-node serve`), their images, sockets and run
//! directories under the test's temp dir (per node, through rule-based instance attributes).
//! node3 is the third vote and runs the quorum witness (`access-node witness`).
//!
//! Scenario "the primary node dies during durable writes": a guest (libblkio, from the test
//! process: path-based unix sockets work across network namespaces) writes blocks, a FLUSH after
//! every few, to the promoted node's vhost-user socket; the promoted node is killed (cable
//! pulled, all its processes SIGKILLed); Pacemaker fences it and promotes the other node; every
//! write acknowledged before the kill must be read back there. The killed node comes back, is
//! resynced, and the next round kills the other one.
//!
//! Scenario "the primary is cut off from both other nodes": as above, but only its cable is
//! pulled; its processes run on (its vhost-mirror holds the writes the replica lacks: the
//! witness is out of its reach) until the others fence it. It comes back as the new primary's
//! replica and resyncs: its writes that were never acknowledged are overwritten, no split brain
//! (the next round starts only from a pair in sync).
//!
//! Rounds: `CLUSTER_ROUNDS` of each scenario (default 1; `ci/cluster.sh` runs more). Then a
//! planned switch-over and a cut of the replication link alone. A table of timings per round
//! is printed (times from the kill or the cut):
//!   detect   kill -> the cluster asks the power switch to fence the node (corosync noticed
//!            the lost token, the DC scheduled fencing)
//!   fenced   kill -> the fence action is done
//!   promoted kill -> the survivor's vhost-mirror answers on its control socket (the agent's
//!            promote: the witness asked, the replica promoted, vhost-mirror started)
//!   serving  kill -> a new client is connected to the survivor's vhost-user socket and read
//!            a block

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vhost_mirror_tests::vm::{
    boot_command, build_guest, check_uploads, enter_netns, first_answer_in, random_bytes,
    upload_within, Upload, GUEST_DISK,
};
use vhost_mirror_tests::{
    bin_dir, bin_path, classify_block, is_in_sync, pattern, run_with_timeout, secret_file,
    tempfile, test_dir, wait_until, ChildGuard, Client, ClientOpts, Op, Watchdog,
};

const SUBNET: &str = "10.77.0";
const NODE_PORT: u16 = 7800;
const WITNESS_PORT: u16 = 7900;
const IMAGE_SIZE: u64 = 64 << 20;
const BLOCK: usize = 4096;
/// A FLUSH after this many writes.
const WRITES_PER_FLUSH: u64 = 8;
/// How long the guest writes before the kill.
const WRITE_BEFORE_KILL: Duration = Duration::from_millis(1500);
/// How long the power switch takes to fence a node cut off from the others (longer than the
/// link's reply timeout, 10 s, so the cut-off primary notices it lost its replica first).
const ISOLATED_FOR: Duration = Duration::from_secs(16);
/// The resource's id (and so the agent's instance name: its files are RUN_DIR/vmdisk.*).
const RSC: &str = "vmdisk";
const DISK_NODES: [&str; 2] = ["node1", "node2"];
/// The VM resource's id.
const VM: &str = "vm";
/// The VM's file server, on the loopback of the node it runs on.
const VM_HTTP_PORT: u16 = 18080;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("ha/testcluster/cluster.sh")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn epoch_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// A running test cluster; `cluster.sh down` when dropped (also when the test panics). If the
/// test process is killed instead, the cluster's power switch notices (`TC_OWNER_PID`) and
/// takes the cluster down itself.
struct Cluster {
    dir: PathBuf,
}

impl Cluster {
    /// Adds `xml` to the CIB's `section` (through node3, never killed).
    fn cib_create(&self, section: &str, xml: &str) {
        self.exec_ok(
            "node3",
            &["cibadmin", "--create", "-o", section, "--xml-text", xml],
        );
    }

    /// `reboot`: whether fencing starts the node again at once (else the test does, `start`).
    fn up(dir: &Path, reboot: bool) -> Cluster {
        let c = Cluster {
            dir: dir.to_path_buf(),
        };
        let out = run_with_timeout(
            Command::new(script())
                .arg("up")
                .arg(dir)
                .env("TC_SUBNET", SUBNET)
                .env("TC_FENCE_REBOOT", if reboot { "restart" } else { "off" })
                .env("TC_OWNER_PID", std::process::id().to_string()),
            Duration::from_secs(30),
        );
        assert!(out.status.success(), "cluster.sh up: {}", text(&out));
        c
    }

    /// `cluster.sh exec DIR NODE ARGS..`, captured.
    fn exec(&self, node: &str, args: &[&str]) -> Output {
        run_with_timeout(
            Command::new(script())
                .arg("exec")
                .arg(&self.dir)
                .arg(node)
                .args(args),
            Duration::from_secs(30),
        )
    }

    fn exec_ok(&self, node: &str, args: &[&str]) -> String {
        let out = self.exec(node, args);
        assert!(
            out.status.success(),
            "on {node}: {args:?}: {}\n{}",
            out.status,
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `cluster.sh kill` (the node dies) or `cut` (it is cut off from the others).
    fn switch(&self, what: &str, node: &str) {
        let out = run_with_timeout(
            Command::new(script()).arg(what).arg(&self.dir).arg(node),
            Duration::from_secs(30),
        );
        assert!(
            out.status.success(),
            "cluster.sh {what} {node}: {}",
            text(&out)
        );
    }

    fn kill(&self, node: &str) {
        self.switch("kill", node);
    }

    fn cut(&self, node: &str) {
        self.switch("cut", node);
    }

    fn start(&self, node: &str) {
        self.switch("start", node);
    }

    /// The path of `node`'s network namespace (its VM's file server answers on its loopback).
    fn netns(&self, node: &str) -> PathBuf {
        let out = run_with_timeout(
            Command::new(script()).arg("netns").arg(&self.dir).arg(node),
            Duration::from_secs(10),
        );
        assert!(
            out.status.success(),
            "cluster.sh netns {node}: {}",
            text(&out)
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    }

    /// The node the clone is promoted on, as node3 (never killed) sees it.
    fn promoted(&self) -> Option<String> {
        let out = self.exec("node3", &["crm_resource", "--locate", "-r", RSC]);
        // "resource vmdisk is running on: node1 Promoted"
        String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
            l.strip_suffix(" Promoted")
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_string)
        })
    }

    /// `node`'s promotion score (the agent sets it from its disk state).
    fn score(&self, node: &str) -> Option<i64> {
        let attr = format!("master-{RSC}");
        let out = self.exec(
            "node3",
            &[
                "crm_attribute",
                "-G",
                "-q",
                "-l",
                "reboot",
                "-N",
                node,
                "-n",
                &attr,
            ],
        );
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    }

    /// The epoch time of the first power-switch journal line after `t0` with `action` ("request"
    /// or "done") on `node`.
    fn switch_time(&self, t0: f64, action: &str, node: &str) -> Option<f64> {
        let log = std::fs::read_to_string(self.dir.join("switch.log")).unwrap_or_default();
        log.lines().find_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let t: f64 = w.first()?.parse().ok()?;
            (t > t0
                && w.get(1) == Some(&action)
                && matches!(w.get(3), Some(&"reboot") | Some(&"off"))
                && w.get(4) == Some(&node))
            .then_some(t)
        })
    }

    fn diagnostics(&self) -> String {
        let mut s = String::new();
        let tail = |p: &Path, n: usize| {
            let t = std::fs::read_to_string(p).unwrap_or_default();
            let lines: Vec<&str> = t.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        };
        s += &format!(
            "--- switch.log\n{}\n",
            tail(&self.dir.join("switch.log"), 30)
        );
        let out = self.exec("node3", &["crm_mon", "-1", "-A"]);
        s += &format!("--- crm_mon (node3)\n{}\n", text(&out));
        s
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.diagnostics());
        }
        let out = Command::new(script())
            .arg("down")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            o => eprintln!("cluster.sh down {}: {o:?}", self.dir.display()),
        }
    }
}

/// The test's directory: removed at the end, kept (its path printed) when the test fails, for
/// the nodes' logs (CLUSTER/nodeI/log), the agent's (CLUSTER/nodeI/run/vmdisk.log) and the
/// power switch's journal (CLUSTER/switch.log).
struct TestDir(Option<tempfile::TempDir>);

impl TestDir {
    fn path(&self) -> &Path {
        self.0.as_ref().expect("until dropped").path()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            // CLUSTER_KEEP=1 keeps it after a pass too (the daemons' logs, to study timings).
            if std::thread::panicking()
                || std::env::var_os("CLUSTER_KEEP").is_some_and(|v| v == "1")
            {
                eprintln!("test directory kept: {}", d.keep().display());
            }
        }
    }
}

/// One disk node's files, seen at the same paths from the host and from every node: the image
/// under the test's dir, the sockets and the agent's run directory in the node's volatile
/// directory (CLUSTER/NODE/run, emptied by cluster.sh whenever the node starts, as /run is on
/// a reboot: the agent's pid files must not outlive the node's processes).
struct NodeFiles {
    image: PathBuf,
    socket: PathBuf,
    run_dir: PathBuf,
}

impl NodeFiles {
    fn new(root: &Path, cluster_dir: &Path, node: &str) -> NodeFiles {
        let d = root.join(node);
        std::fs::create_dir_all(&d).expect("mkdir node dir");
        let run_dir = cluster_dir.join(node).join("run");
        NodeFiles {
            image: d.join("disk.img"),
            socket: run_dir.join("disk.sock"),
            run_dir,
        }
    }
    fn vm_control(&self) -> PathBuf {
        self.run_dir.join(format!("{RSC}.vhost-mirror.ctl"))
    }
    /// The disk agent's log.
    fn log(&self) -> String {
        self.log_of(RSC)
    }
    /// The log of resource `rsc`'s agent on this node.
    fn log_of(&self, rsc: &str) -> String {
        std::fs::read_to_string(self.run_dir.join(format!("{rsc}.log"))).unwrap_or_default()
    }
}

/// `vhost-mirror status --json` through a control socket, if it answers.
fn vm_status(ctl: &Path) -> Option<serde_json::Value> {
    if !ctl.exists() {
        return None;
    }
    let out = run_with_timeout(
        Command::new(bin_path("vhost-mirror"))
            .arg("status")
            .arg("--control")
            .arg(ctl)
            .arg("--json"),
        Duration::from_secs(10),
    );
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

fn addr(node_index: u32, port: u16) -> String {
    format!("{SUBNET}.{node_index}:{port}")
}

/// The clone, as `pcs resource create ... promotable` would make it (README, "Running under
/// Pacemaker"), with per-node image, socket and run directory (rules on #uname), and kept off
/// node3 (no probes there either).
fn configure(c: &Cluster, files: &HashMap<&str, NodeFiles>, secret: &Path) {
    let nv = |id: &str, name: &str, value: &str| nvpair(RSC, id, name, value);
    let mut per_node = String::new();
    for n in DISK_NODES {
        let f = &files[n];
        per_node += &node_attributes(
            RSC,
            n,
            &[
                ("image", "image", f.image.display().to_string()),
                ("socket", "socket", f.socket.display().to_string()),
                ("run", "run_dir", f.run_dir.display().to_string()),
            ],
        );
    }
    let peers = format!("node1={} node2={}", addr(1, NODE_PORT), addr(2, NODE_PORT));
    let clone = format!(
        r#"<clone id="{RSC}-clone">
<meta_attributes id="{RSC}-clone-meta">
<nvpair id="{RSC}-clone-promotable" name="promotable" value="true"/>
<nvpair id="{RSC}-clone-promoted-max" name="promoted-max" value="1"/>
<nvpair id="{RSC}-clone-promoted-node-max" name="promoted-node-max" value="1"/>
<nvpair id="{RSC}-clone-max" name="clone-max" value="2"/>
<nvpair id="{RSC}-clone-node-max" name="clone-node-max" value="1"/>
</meta_attributes>
<primitive id="{RSC}" class="ocf" provider="vhost-mirror" type="disk">
<instance_attributes id="{RSC}-ia">{}{}{}{}</instance_attributes>
{per_node}<operations>
<op id="{RSC}-monitor-promoted" name="monitor" interval="2s" role="Promoted" timeout="20s"/>
<op id="{RSC}-monitor-unpromoted" name="monitor" interval="3s" role="Unpromoted" timeout="20s"/>
</operations>
</primitive>
</clone>"#,
        nv("peers", "peers", &peers),
        nv("secret", "secret_file", &secret.display().to_string()),
        nv("witness", "witness", &addr(3, WITNESS_PORT)),
        nv("bindir", "bindir", &bin_dir().display().to_string()),
    );
    c.cib_create("resources", &clone);
    c.cib_create(
        "constraints",
        &format!(
            r#"<rsc_location id="{RSC}-not-on-node3" rsc="{RSC}-clone" node="node3" score="-INFINITY" resource-discovery="never"/>"#
        ),
    );
}

/// `<nvpair>` of resource `rsc` (its id prefixed with `rsc`).
fn nvpair(rsc: &str, id: &str, name: &str, value: &str) -> String {
    format!(r#"<nvpair id="{rsc}-{id}" name="{name}" value="{value}"/>"#)
}

/// Instance attributes of resource `rsc` that apply on `node` only (a rule on #uname), from
/// (id, name, value) triples.
fn node_attributes(rsc: &str, node: &str, pairs: &[(&str, &str, String)]) -> String {
    let pairs: String = pairs
        .iter()
        .map(|(id, name, value)| nvpair(rsc, &format!("{node}-{id}"), name, value))
        .collect();
    format!(
        r##"<instance_attributes id="{rsc}-{node}">
<rule id="{rsc}-{node}-rule" score="0"><expression id="{rsc}-{node}-expr" attribute="#uname" operation="eq" value="{node}"/></rule>
{pairs}</instance_attributes>
"##
    )
}

/// What the guest wrote: per block offset, its writes in order (seed, acknowledged).
#[derive(Default)]
struct Ledger {
    writes: HashMap<u64, Vec<(u64, bool)>>,
    acked: u64,
    flushed: u64,
    unacked: u64,
}

impl Ledger {
    /// Every block must hold its last acknowledged write, or a later one that was in flight
    /// when the primary died (never anything older, never zeros after an acknowledged write).
    fn verify(&self, c: &mut Client) -> Result<usize, String> {
        let mut offs: Vec<&u64> = self.writes.keys().collect();
        offs.sort();
        for &off in offs {
            let hist = &self.writes[&off];
            let last_acked = hist.iter().rposition(|&(_, a)| a);
            let allowed: Vec<u64> = match last_acked {
                Some(i) => hist[i..].iter().map(|&(s, _)| s).collect(),
                None => hist.iter().map(|&(s, _)| s).collect(),
            };
            let buf = c
                .q()
                .read(off, BLOCK)
                .map_err(|e| format!("read at {off}: {e}"))?;
            let ok = classify_block(&buf, off, &allowed).is_some()
                || (last_acked.is_none() && buf.iter().all(|&b| b == 0));
            if !ok {
                return Err(format!(
                    "block at {off}: none of the allowed writes {allowed:x?} (history {hist:x?})"
                ));
            }
        }
        Ok(self.writes.len())
    }
}

/// The guest: writes 4 KiB blocks one after the other from `start` (wrapping), a FLUSH after
/// every WRITES_PER_FLUSH, until a request fails or times out (the primary died) or `stop`.
fn guest(
    socket: PathBuf,
    round: u64,
    start: u64,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<AtomicBool>,
) {
    guest_within(socket, round, start, ledger, stop, Duration::from_secs(3));
}

/// [`guest`], giving up on a request only after `io_timeout`.
fn guest_within(
    socket: PathBuf,
    round: u64,
    start: u64,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<AtomicBool>,
    io_timeout: Duration,
) {
    let opts = ClientOpts {
        io_timeout,
        ..ClientOpts::default()
    };
    let mut c = Client::try_connect(&socket, &opts)
        .unwrap_or_else(|e| panic!("guest connecting to {}: {e}", socket.display()));
    let blocks = c.capacity() / BLOCK as u64;
    let mut pending_flush = Vec::new();
    for i in 0.. {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let off = ((start + i) % blocks) * BLOCK as u64;
        let seed = (round << 32) | i;
        c.q().buf()[..BLOCK].copy_from_slice(&pattern(off, BLOCK, seed));
        let r = c.q().try_run(Op::Write {
            off,
            buf_off: 0,
            len: BLOCK,
        });
        let acked = matches!(r, Ok(Ok(())));
        {
            let mut l = ledger.lock().expect("ledger");
            l.writes.entry(off).or_default().push((seed, acked));
            if acked {
                l.acked += 1;
            } else {
                l.unacked += 1;
            }
        }
        if !acked {
            return;
        }
        pending_flush.push(off);
        if (i + 1) % WRITES_PER_FLUSH == 0 {
            if !matches!(c.q().try_run(Op::Flush), Ok(Ok(()))) {
                return;
            }
            ledger.lock().expect("ledger").flushed += pending_flush.len() as u64;
            pending_flush.clear();
        }
    }
}

struct RoundTimes {
    fault: Fault,
    victim: String,
    survivor: String,
    detect: Option<f64>,
    fenced: Option<f64>,
    promoted: f64,
    serving: f64,
    acked: u64,
    flushed: u64,
}

fn fmt_s(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{v:.2}"))
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

/// How a round takes the primary away.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Cable pulled and every process SIGKILLed at once.
    Kill,
    /// Cable pulled only: the node runs on, cut off from both others, until it is fenced; the
    /// power switch takes [`ISOLATED_FOR`] to act, so the node finds its replica gone first
    /// (the link's 10 s reply timeout): its vhost-mirror marks the writes the replica lacks and
    /// holds them, asking a witness it cannot reach (or fails them, when its Pacemaker, without
    /// quorum, stops it).
    Isolate,
}

impl Fault {
    fn as_str(self) -> &'static str {
        match self {
            Fault::Kill => "killed",
            Fault::Isolate => "isolated",
        }
    }
}

/// One round: the guest writes with flushes to the promoted node, which is then killed or cut
/// off; the other node must be promoted without anyone acting and hold every acknowledged
/// write. The next round's `wait_settled` requires the lost node back as an in-sync replica
/// (no split brain).
fn fail_primary(
    cluster: &Cluster,
    files: &HashMap<&str, NodeFiles>,
    ledger: &Arc<Mutex<Ledger>>,
    round: u64,
    fault: Fault,
) -> RoundTimes {
    let blocks = IMAGE_SIZE / BLOCK as u64;
    let (primary, survivor) = wait_settled(cluster, files, Duration::from_secs(60));
    let (before_acked, before_flushed) = {
        let l = ledger.lock().expect("ledger");
        (l.acked, l.flushed)
    };
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (sock, l, s) = (
            files[primary.as_str()].socket.clone(),
            ledger.clone(),
            stop.clone(),
        );
        // Each round starts writing where the previous one would have got to, plus a gap.
        let start = (round - 1) * blocks / 8;
        std::thread::spawn(move || guest(sock, round, start, l, s))
    };
    std::thread::sleep(WRITE_BEFORE_KILL);
    assert!(
        !writer.is_finished(),
        "the guest stopped writing before the kill"
    );
    let t0 = epoch_now();
    let k0 = Instant::now();
    let delay = cluster.dir.join("ctl/fence.delay");
    match fault {
        Fault::Kill => cluster.kill(&primary),
        Fault::Isolate => {
            std::fs::write(&delay, format!("{}\n", ISOLATED_FOR.as_secs())).expect("fence delay");
            cluster.cut(&primary);
        }
    }
    let sf = &files[survivor.as_str()];
    wait_promoted(sf, &survivor, &format!("{primary} was {}", fault.as_str()));
    let promoted = k0.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&delay);
    let mut client = None;
    assert!(
        wait_until(Duration::from_secs(20), || {
            let opts = ClientOpts {
                connect_timeout: Duration::from_millis(100),
                ..ClientOpts::default()
            };
            let Ok(mut c) = Client::try_connect(&sf.socket, &opts) else {
                return false;
            };
            let ok = c.q().read(0, BLOCK).is_ok();
            client = ok.then_some(c);
            ok
        }),
        "{survivor}'s socket does not serve; agent log:\n{}",
        sf.log()
    );
    let serving = k0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("guest thread");
    let mut client = client.expect("connected");
    let checked = {
        let l = ledger.lock().expect("ledger");
        l.verify(&mut client).unwrap_or_else(|e| {
            panic!(
                "round {round}: an acknowledged write is missing on {survivor}: {e}\nagent log:\n{}",
                sf.log()
            )
        })
    };
    drop(client);
    let l = ledger.lock().expect("ledger");
    assert!(
        l.acked > before_acked + WRITES_PER_FLUSH,
        "round {round}: the guest wrote next to nothing ({} acknowledged)",
        l.acked - before_acked
    );
    eprintln!(
        "round {round}: {primary} {}, {survivor} serving after {serving:.2}s; {checked} blocks verified",
        fault.as_str()
    );
    RoundTimes {
        fault,
        victim: primary.clone(),
        survivor: survivor.clone(),
        detect: cluster.switch_time(t0, "request", &primary).map(|t| t - t0),
        fenced: cluster.switch_time(t0, "done", &primary).map(|t| t - t0),
        promoted,
        serving,
        acked: l.acked - before_acked,
        flushed: l.flushed - before_flushed,
    }
}

/// A planned switch-over (what `pcs resource move` does, with crm_resource): the guest writes
/// with flushes and stops; the promoted role moves to the other node; nothing is copied (the
/// demoted side stopped cleanly, both disks are the same), and every acknowledged write is
/// there. Returns the seconds until promoted there and in sync.
fn switch_over(
    cluster: &Cluster,
    files: &HashMap<&str, NodeFiles>,
    ledger: &Arc<Mutex<Ledger>>,
    seed: u64,
) -> f64 {
    let blocks = IMAGE_SIZE / BLOCK as u64;
    let (from, to) = wait_settled(cluster, files, Duration::from_secs(60));
    {
        let stop = Arc::new(AtomicBool::new(false));
        let (sock, l, st) = (
            files[from.as_str()].socket.clone(),
            ledger.clone(),
            stop.clone(),
        );
        let writer = std::thread::spawn(move || guest(sock, seed, blocks / 2, l, st));
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        writer.join().expect("guest thread");
    }
    let clone = format!("{RSC}-clone");
    let t_move = Instant::now();
    cluster.exec_ok(
        "node3",
        &[
            "crm_resource",
            "--move",
            "-r",
            &clone,
            "--promoted",
            "-N",
            &to,
        ],
    );
    let ok = wait_until(Duration::from_secs(60), || {
        std::thread::sleep(Duration::from_millis(500));
        cluster.promoted().as_deref() == Some(to.as_str())
            && vm_status(&files[to.as_str()].vm_control()).is_some_and(|v| is_in_sync(&v))
    });
    assert!(
        ok,
        "the promoted role did not move to {to}; agent log:\n{}",
        files[to.as_str()].log()
    );
    let moved_in = t_move.elapsed().as_secs_f64();
    let st = vm_status(&files[to.as_str()].vm_control()).expect("status");
    let copied = st["resync_sent_bytes"].as_u64();
    assert_eq!(
        (copied, st["resync_total_bytes"].as_u64()),
        (Some(0), Some(0)),
        "the planned switch-over to {to} copied data: {st}"
    );
    {
        let opts = ClientOpts {
            connect_timeout: Duration::from_secs(5),
            ..ClientOpts::default()
        };
        let mut c = Client::try_connect(&files[to.as_str()].socket, &opts)
            .unwrap_or_else(|e| panic!("connecting to {to} after the move: {e}"));
        let l = ledger.lock().expect("ledger");
        l.verify(&mut c)
            .unwrap_or_else(|e| panic!("after the switch-over to {to}: {e}"));
    }
    cluster.exec_ok("node3", &["crm_resource", "--clear", "-r", &clone]);
    eprintln!(
        "planned switch-over {from} -> {to}: {moved_in:.1}s until promoted and in sync, 0 bytes copied"
    );

    moved_in
}

/// Only the replication link is cut (corosync and the witness still see both nodes): the
/// primary goes on once the witness recorded the replica outdated; the replica is not promoted
/// (its promotion is refused); after the heal the pair resyncs by itself.
fn cut_link(
    cluster: &Cluster,
    files: &HashMap<&str, NodeFiles>,
    ledger: &Arc<Mutex<Ledger>>,
    seed: u64,
) {
    let blocks = IMAGE_SIZE / BLOCK as u64;
    let (p, r) = wait_settled(cluster, files, Duration::from_secs(60));
    let r_ip = format!("{SUBNET}.{}", &r[4..]);
    for cmd in [
        vec!["nft", "add", "table", "inet", "vmcut"],
        vec![
            "nft",
            "add",
            "chain",
            "inet",
            "vmcut",
            "out",
            "{ type filter hook output priority 0 ; }",
        ],
        vec![
            "nft", "add", "rule", "inet", "vmcut", "out", "ip", "daddr", &r_ip, "tcp", "dport",
            "7800", "drop",
        ],
    ] {
        cluster.exec_ok(&p, &cmd);
    }
    let (cut_at, unacked_at) = {
        let l = ledger.lock().expect("ledger");
        (l.acked, l.unacked)
    };
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (sock, l, st) = (
            files[p.as_str()].socket.clone(),
            ledger.clone(),
            stop.clone(),
        );
        // Writes wait while the primary finds the link dead (up to its 10 s reply timeout)
        // and the witness records the replica outdated.
        std::thread::spawn(move || {
            guest_within(sock, seed, blocks / 4, l, st, Duration::from_secs(40))
        })
    };
    let p_ctl = files[p.as_str()].vm_control();
    let outdated = wait_until(Duration::from_secs(40), || {
        std::thread::sleep(Duration::from_millis(200));
        vm_status(&p_ctl).is_some_and(|v| v["fence_state"] == "peer-outdated")
    });
    assert!(
        outdated,
        "{p} did not get its replica outdated: {:?}",
        vm_status(&p_ctl)
    );
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("guest thread");
    assert_eq!(
        ledger.lock().expect("ledger").unacked,
        unacked_at,
        "a guest write failed during the cut"
    );
    let during = ledger.lock().expect("ledger").acked - cut_at;
    assert!(during > 0, "no write was acknowledged during the cut");
    let r_ctl = files[r.as_str()]
        .run_dir
        .join(format!("{RSC}.access-node.ctl"));
    let out = run_with_timeout(
        Command::new(bin_path("access-node"))
            .arg("promote")
            .arg("--control")
            .arg(&r_ctl),
        Duration::from_secs(30),
    );
    assert!(
        !out.status.success() && text(&out).contains("witness recorded it outdated"),
        "the cut-off replica {r} was promoted, or refused for another reason: {}",
        text(&out)
    );
    cluster.exec_ok(&p, &["nft", "delete", "table", "inet", "vmcut"]);
    let (p2, _) = wait_settled(cluster, files, Duration::from_secs(90));
    assert_eq!(p2, p, "the role moved during the link cut");
    {
        let opts = ClientOpts {
            connect_timeout: Duration::from_secs(5),
            ..ClientOpts::default()
        };
        let mut c = Client::try_connect(&files[p.as_str()].socket, &opts)
            .unwrap_or_else(|e| panic!("connecting to {p} after the heal: {e}"));
        let l = ledger.lock().expect("ledger");
        l.verify(&mut c)
            .unwrap_or_else(|e| panic!("after the link cut and heal: {e}"));
    }
    eprintln!(
        "replication link {p} -> {r} cut: {during} writes acknowledged with the replica \
         outdated by the witness, its promotion refused, resynced after the heal"
    );
}

/// Waits (60 s at most) until `survivor`'s vhost-mirror answers on its control socket: it was
/// promoted after `what` happened to the other node (host-side polling, no cluster load).
fn wait_promoted(sf: &NodeFiles, survivor: &str, what: &str) {
    assert!(
        wait_until(Duration::from_secs(60), || {
            std::thread::sleep(Duration::from_millis(10));
            vm_status(&sf.vm_control()).is_some()
        }),
        "{survivor} not promoted within 60s after {what}; agent log:\n{}",
        sf.log()
    );
}

/// Waits until the clone is promoted on one node whose vhost-mirror is in sync with the other
/// node, and the other node has a promotion score (so it can take over): the steady state a
/// round starts from. Returns (promoted, other).
fn wait_settled(
    c: &Cluster,
    files: &HashMap<&str, NodeFiles>,
    timeout: Duration,
) -> (String, String) {
    let mut last = String::new();
    let mut found = None;
    let ok = wait_until(timeout, || {
        std::thread::sleep(Duration::from_millis(500)); // crm at 2 Hz at most
        let Some(p) = c.promoted() else {
            last = "not promoted anywhere".into();
            return false;
        };
        let Some(other) = DISK_NODES.iter().find(|n| **n != p) else {
            last = format!("promoted on {p}");
            return false;
        };
        let Some(st) = vm_status(&files[p.as_str()].vm_control()) else {
            last = format!("promoted on {p}, its vhost-mirror does not answer");
            return false;
        };
        if !is_in_sync(&st) {
            last = format!("promoted on {p}, not in sync: {st}");
            return false;
        }
        let score = c.score(other);
        if score.unwrap_or(0) < 100 {
            last = format!("promoted on {p}, in sync, {other}'s score {score:?}");
            return false;
        }
        found = Some((p, (*other).to_string()));
        true
    });
    assert!(ok, "cluster not settled within {timeout:?}: {last}");
    found.expect("set when settled")
}

/// A cluster with the disk configured and settled (promoted on one node, in sync with the
/// other), the witness running on node3. Fields drop in order: the witness, the cluster
/// (`cluster.sh down`), then the test's directory.
struct Env {
    _witness: ChildGuard,
    cluster: Cluster,
    files: HashMap<&'static str, NodeFiles>,
    _secret: PathBuf,
    _dir: TestDir,
}

impl Env {
    /// `first_image` creates node1's image (the first primary's); node2's is created by its
    /// access node at the first contact, and fully synced.
    /// `reboot`: fencing starts a node again at once (see [`Cluster::up`]).
    fn start(name: &str, reboot: bool, first_image: impl FnOnce(&Path)) -> Env {
        for tool in [
            "/usr/sbin/corosync",
            "/usr/sbin/pacemakerd",
            "/usr/sbin/cibadmin",
        ] {
            assert!(
                Path::new(tool).exists(),
                "{tool} not found: install corosync, pacemaker, pacemaker-cli-utils (bash ci/setup.sh)"
            );
        }
        let dir = TestDir(Some(test_dir(name)));
        let root = dir.path().to_path_buf();
        let secret = secret_file(&root, "the cluster tier's pair secret 0123\n");
        let cluster_dir = root.join("cluster");
        let files: HashMap<&str, NodeFiles> = DISK_NODES
            .iter()
            .map(|n| (*n, NodeFiles::new(&root, &cluster_dir, n)))
            .collect();
        // The first primary's image, promoted by hand once (README: the bootstrap of a new
        // pair).
        first_image(&files["node1"].image);
        let out = run_with_timeout(
            Command::new(bin_path("access-node"))
                .arg("promote")
                .arg("--image")
                .arg(&files["node1"].image)
                .arg("--force"),
            Duration::from_secs(30),
        );
        assert!(out.status.success(), "bootstrap promote: {}", text(&out));

        let t_up = Instant::now();
        let cluster = Cluster::up(&cluster_dir, reboot);
        // The witness, a plain process on node3 (killed with the node by `down`).
        let witness_state = root.join("witness");
        std::fs::create_dir(&witness_state).expect("mkdir witness state");
        let witness_log = std::fs::File::create(root.join("witness.log")).expect("witness log");
        let witness = ChildGuard::spawn(
            "access-node witness (node3)",
            Command::new(script())
                .arg("exec")
                .arg(&cluster.dir)
                .arg("node3")
                .arg(bin_path("access-node"))
                .arg("witness")
                .arg("--listen")
                .arg(addr(3, WITNESS_PORT))
                .arg("--secret-file")
                .arg(&secret)
                .arg("--state-dir")
                .arg(&witness_state)
                .arg("--control")
                .arg(root.join("witness.ctl"))
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(witness_log.try_clone().expect("dup"))
                .stderr(witness_log),
        );
        // Configure once all three nodes are members with quorum.
        let mut mon = String::new();
        assert!(
            wait_until(Duration::from_secs(60), || {
                std::thread::sleep(Duration::from_millis(500));
                mon = text(&cluster.exec("node3", &["crm_mon", "-1"]));
                mon.contains("partition with quorum")
                    && mon.contains("Online: [ node1 node2 node3 ]")
            }),
            "the cluster did not form: {mon}"
        );
        let t_formed = t_up.elapsed();
        configure(&cluster, &files, &secret);
        let (primary, _) = wait_settled(&cluster, &files, Duration::from_secs(90));
        eprintln!(
            "cluster formed in {:.1}s, {primary} promoted and in sync {:.1}s after `up`",
            t_formed.as_secs_f64(),
            t_up.elapsed().as_secs_f64()
        );
        Env {
            _witness: witness,
            cluster,
            files,
            _secret: secret,
            _dir: dir,
        }
    }
}

/// Rounds of each scenario: `CLUSTER_ROUNDS`, default 1.
fn cluster_rounds() -> u64 {
    std::env::var("CLUSTER_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

#[test]
fn the_primary_node_dies_during_durable_writes() {
    let rounds = cluster_rounds();
    let _wd = Watchdog::new(
        "the_primary_node_dies_during_durable_writes",
        Duration::from_secs(90 + 150 * rounds),
    );
    let env = Env::start("cluster", true, |image| {
        std::fs::File::create(image)
            .and_then(|f| f.set_len(IMAGE_SIZE))
            .expect("create image");
    });
    let (cluster, files) = (&env.cluster, &env.files);
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut times = Vec::new();
    let mut round = 0;
    for fault in [Fault::Kill, Fault::Isolate] {
        for _ in 0..rounds {
            round += 1;
            times.push(fail_primary(cluster, files, &ledger, round, fault));
        }
    }
    // The killed node came back (fencing restarts it): the survivor keeps the role, resyncs it.
    let (p, _) = wait_settled(cluster, files, Duration::from_secs(60));
    assert_eq!(
        p,
        times.last().expect("one round at least").survivor,
        "the promoted role moved back to the node that was killed"
    );

    let mut moves = Vec::new();
    for _ in 0..rounds {
        round += 1;
        moves.push(switch_over(cluster, files, &ledger, round));
        round += 1;
        cut_link(cluster, files, &ledger, round);
    }
    println!(
        "round  fault     lost   promoted  acked  flushed  detect(s)  fenced(s)  promoted(s)  serving(s)"
    );
    for (i, t) in times.iter().enumerate() {
        println!(
            "{:>5}  {:<8}  {:>5}  {:>8}  {:>5}  {:>7}  {:>9}  {:>9}  {:>11.2}  {:>10.2}",
            i + 1,
            t.fault.as_str(),
            t.victim,
            t.survivor,
            t.acked,
            t.flushed,
            fmt_s(t.detect),
            fmt_s(t.fenced),
            t.promoted,
            t.serving
        );
    }
    println!(
        "planned switch-over: {} rounds, 0 bytes copied, median {} s until promoted and in sync; \
         replication link cut: {} rounds, the replica outdated and not promoted, resynced",
        moves.len(),
        fmt_s(median(moves.clone())),
        rounds
    );
    for fault in [Fault::Kill, Fault::Isolate] {
        let of = |f: &dyn Fn(&RoundTimes) -> Option<f64>| {
            fmt_s(median(
                times
                    .iter()
                    .filter(|t| t.fault == fault)
                    .filter_map(f)
                    .collect(),
            ))
        };
        println!(
            "median {:<8}                          {:>9}  {:>9}  {:>11}  {:>10}",
            fault.as_str(),
            of(&|t| t.detect),
            of(&|t| t.fenced),
            of(&|t| Some(t.promoted)),
            of(&|t| Some(t.serving)),
        );
    }
}

/// The file-server VM as a cluster resource (`ocf:vhost-mirror:vm`, images/boot.sh's QEMU
/// command line, firmware boot, TCG), colocated with the disk's promoted instance and started
/// after its promotion, with per-node socket and run directory (rules on #uname).
fn configure_vm(c: &Cluster, files: &HashMap<&str, NodeFiles>, guest: &Path) {
    let mut per_node = String::new();
    for n in DISK_NODES {
        let f = &files[n];
        let cmd = boot_command(
            guest,
            &f.socket,
            VM_HTTP_PORT,
            &f.run_dir.join("vm-serial.log"),
        )
        .iter()
        .map(|w| format!("'{w}'"))
        .collect::<Vec<_>>()
        .join(" ");
        per_node += &node_attributes(
            VM,
            n,
            &[
                ("command", "command", cmd.replace('\'', "&apos;")),
                ("socket", "socket", f.socket.display().to_string()),
                ("run", "run_dir", f.run_dir.display().to_string()),
            ],
        );
    }
    let vm = format!(
        r#"<primitive id="{VM}" class="ocf" provider="vhost-mirror" type="vm">
<meta_attributes id="{VM}-meta"><nvpair id="{VM}-target-role" name="target-role" value="Stopped"/></meta_attributes>
<instance_attributes id="{VM}-ia">{}</instance_attributes>
{per_node}<operations>
<op id="{VM}-start" name="start" interval="0s" timeout="90s"/>
<op id="{VM}-stop" name="stop" interval="0s" timeout="30s"/>
<op id="{VM}-monitor" name="monitor" interval="2s" timeout="10s"/>
</operations>
</primitive>"#,
        nvpair(VM, "stop-timeout", "stop_timeout", "10"),
    );
    c.cib_create("resources", &vm);
    for constraint in [
        format!(
            r#"<rsc_location id="{VM}-not-on-node3" rsc="{VM}" node="node3" score="-INFINITY" resource-discovery="never"/>"#
        ),
        format!(
            r#"<rsc_colocation id="{VM}-with-disk" rsc="{VM}" with-rsc="{RSC}-clone" with-rsc-role="Promoted" score="INFINITY"/>"#
        ),
        format!(
            r#"<rsc_order id="{VM}-after-disk" first="{RSC}-clone" first-action="promote" then="{VM}" then-action="start" kind="Mandatory"/>"#
        ),
    ] {
        c.cib_create("constraints", &constraint);
    }
    // Created stopped: started only once the constraints keep it off node3.
    c.exec_ok(
        "node3",
        &[
            "crm_resource",
            "-r",
            VM,
            "--meta",
            "-p",
            "target-role",
            "-v",
            "Started",
        ],
    );
}

/// Runs `f` on a thread inside the network namespace `ns`.
fn in_netns<T: Send + 'static>(ns: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = ns.to_path_buf();
    std::thread::spawn(move || {
        enter_netns(&ns).unwrap_or_else(|e| panic!("entering {}: {e}", ns.display()));
        f()
    })
    .join()
    .expect("thread in the node's namespace")
}

struct VmRound {
    victim: String,
    survivor: String,
    uploads: usize,
    detect: Option<f64>,
    fenced: Option<f64>,
    promoted: f64,
    vm_started: Option<f64>,
    answering: f64,
}

/// Scenario "the primary node dies during durable uploads", with the VM under the cluster: the
/// file server runs in a VM on the promoted node; a client uploads files (each one durable in
/// the guest: fdatasync, rename, directory fsync) until the node is killed; without anyone
/// acting, the cluster fences it, promotes the other node and boots the VM there; every
/// acknowledged upload must read back identical. Measured from the kill: the fence request
/// (detect), the fence done, the promoted disk serving, the file server answering.
#[test]
fn the_file_server_vm_fails_over_under_the_cluster() {
    let rounds = cluster_rounds();
    let _wd = Watchdog::new(
        "the_file_server_vm_fails_over_under_the_cluster",
        Duration::from_secs(300 + 120 * rounds),
    );
    let guest = build_guest();
    let disk = guest.join(GUEST_DISK);
    // Fencing only powers a node off: a node that dies stays down while the other boots the
    // VM (a real one takes minutes to come back), and the test starts it again afterwards.
    let env = Env::start("cluster-vm", false, |image| {
        let out = run_with_timeout(
            Command::new("cp")
                .arg("--sparse=always")
                .arg(&disk)
                .arg(image),
            Duration::from_secs(60),
        );
        assert!(out.status.success(), "copy the guest disk: {}", text(&out));
    });
    let (cluster, files) = (&env.cluster, &env.files);
    configure_vm(cluster, files, &guest);
    let acked: Arc<Mutex<Vec<Upload>>> = Arc::default();
    let mut times = Vec::new();
    for round in 1..=rounds {
        let (primary, survivor) = wait_settled(cluster, files, Duration::from_secs(120));
        let ns = cluster.netns(&primary);
        let vm_log = |n: &str| files[n].log_of(VM);
        first_answer_in(
            Some(&ns),
            VM_HTTP_PORT,
            "/cgi-bin/list",
            Duration::from_secs(120),
            &mut || {},
        );
        let stop = Arc::new(AtomicBool::new(false));
        let before = acked.lock().expect("uploads").len();
        let uploader = {
            let (ns, acked, stop) = (ns.clone(), acked.clone(), stop.clone());
            std::thread::spawn(move || {
                enter_netns(&ns).expect("enter the primary's namespace");
                for i in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let name = format!("r{round}-{i}");
                    let data = random_bytes(4096 + (i % 16) * 4096);
                    match upload_within(VM_HTTP_PORT, &name, &data, Duration::from_secs(10)) {
                        Ok(()) => acked.lock().expect("uploads").push(Upload { name, data }),
                        Err(_) => return,
                    }
                }
            })
        };
        // A few uploads acknowledged, and more on the way: then the kill.
        let t_up = Instant::now();
        let going = wait_until(Duration::from_secs(60), || {
            std::thread::sleep(Duration::from_millis(50));
            uploader.is_finished() || acked.lock().expect("uploads").len() >= before + 4
        });
        assert!(
            going && !uploader.is_finished(),
            "round {round}: uploads stopped or stalled before the kill; VM log:\n{}",
            vm_log(&primary)
        );
        eprintln!(
            "round {round}: 4 uploads acknowledged in {:.1}s",
            t_up.elapsed().as_secs_f64()
        );
        let t0 = epoch_now();
        let k0 = Instant::now();
        cluster.kill(&primary);
        let sf = &files[survivor.as_str()];
        wait_promoted(sf, &survivor, &format!("{primary} was killed"));
        let promoted = k0.elapsed().as_secs_f64();
        // The boot's phases, from its console (polled; for the table).
        let phases = {
            let serial = sf.run_dir.join("vm-serial.log");
            let done = Arc::new(AtomicBool::new(false));
            let d = done.clone();
            let th = std::thread::spawn(move || {
                let marks = [
                    "GRUB: booting",
                    "GRUB: initrd loaded",
                    "rcS: network up",
                    "FILESERVER-READY",
                ];
                let mut at: Vec<Option<f64>> = vec![None; marks.len()];
                while !d.load(Ordering::Relaxed) {
                    let log = std::fs::read_to_string(&serial).unwrap_or_default();
                    for (i, m) in marks.iter().enumerate() {
                        if at[i].is_none() && log.contains(m) {
                            at[i] = Some(k0.elapsed().as_secs_f64());
                        }
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                at
            });
            (done, th)
        };
        let ns_s = cluster.netns(&survivor);
        first_answer_in(
            Some(&ns_s),
            VM_HTTP_PORT,
            // A file uploaded in the first round: the list CGI hashes every file, and the
            // files pile up round after round.
            "/files/r1-0",
            Duration::from_secs(90),
            &mut || {},
        );
        let answering = k0.elapsed().as_secs_f64();
        phases.0.store(true, Ordering::Relaxed);
        let phases = phases.1.join().expect("console poller");
        eprintln!(
            "round {round}: console: GRUB {}, initrd loaded {}, network up {}, file server ready {} (s after the kill)",
            fmt_s(phases[0]),
            fmt_s(phases[1]),
            fmt_s(phases[2]),
            fmt_s(phases[3])
        );
        // When the agent started the VM there (its log: "--- start at EPOCH ...").
        let vm_started = vm_log(&survivor)
            .lines()
            .rev()
            .filter_map(|l| {
                l.strip_prefix("--- start at ")?
                    .split(' ')
                    .next()?
                    .parse::<f64>()
                    .ok()
            })
            .find(|t| *t > t0)
            .map(|t| t - t0);
        stop.store(true, Ordering::Relaxed);
        uploader.join().expect("uploader");
        let all = acked.lock().expect("uploads").clone();
        let uploads = all.len() - before;
        assert!(
            uploads > 0,
            "round {round}: nothing was uploaded before the kill"
        );
        let when = format!("round {round}, after the failover to {survivor}");
        in_netns(&ns_s, move || check_uploads(VM_HTTP_PORT, &all, &when));
        // The dead node comes back (as after a repair) and is resynced before the next round.
        cluster.start(&primary);
        eprintln!(
            "round {round}: killed {primary}; file server answering on {survivor} after \
             {answering:.2}s; {uploads} acknowledged uploads this round, all present"
        );
        times.push(VmRound {
            victim: primary.clone(),
            survivor,
            uploads,
            detect: cluster.switch_time(t0, "request", &primary).map(|t| t - t0),
            fenced: cluster.switch_time(t0, "done", &primary).map(|t| t - t0),
            promoted,
            vm_started,
            answering,
        });
    }
    // The killed node came back and was resynced.
    wait_settled(cluster, files, Duration::from_secs(120));
    println!(
        "round  killed  promoted  uploads  detect(s)  fenced(s)  promoted(s)  vm started(s)  answering(s)"
    );
    for (i, t) in times.iter().enumerate() {
        println!(
            "{:>5}  {:>6}  {:>8}  {:>7}  {:>9}  {:>9}  {:>11.2}  {:>13}  {:>12.2}",
            i + 1,
            t.victim,
            t.survivor,
            t.uploads,
            fmt_s(t.detect),
            fmt_s(t.fenced),
            t.promoted,
            fmt_s(t.vm_started),
            t.answering
        );
    }
    println!(
        "median                           {:>9}  {:>9}  {:>11}  {:>13}  {:>12}",
        fmt_s(median(times.iter().filter_map(|t| t.detect).collect())),
        fmt_s(median(times.iter().filter_map(|t| t.fenced).collect())),
        fmt_s(median(times.iter().map(|t| t.promoted).collect())),
        fmt_s(median(times.iter().filter_map(|t| t.vm_started).collect())),
        fmt_s(median(times.iter().map(|t| t.answering).collect())),
    );
    drop(env);
}
