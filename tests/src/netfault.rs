//! Network faults for the durability tier: a private two-namespace network ([`NetPair`]) with
//! packet loss, partitions and rate limits applied by the kernel (nftables, `tc tbf`), and a
//! user-space TCP [`Proxy`] for what this kernel cannot do (no `sch_netem`): delays, stalls,
//! cuts and refused connections.
//!
//! Everything here stays on loopback or inside network namespaces created by the test itself:
//! the veth addresses (`10.213.x.1/30` and `.2/30`) exist only inside a pair's two namespaces,
//! and a [`Proxy`] in the root namespace refuses any target that is not a loopback address.
//!
//! Requirements: root, `ip` and `tc` (iproute2), `nft` (package `nftables`, see `ci/setup.sh`).
//!
//! # Typical use
//! ```no_run
//! use vhost_mirror_tests::netfault::{NetPair, Proxy};
//! use vhost_mirror_tests::{bin_path, ChildGuard};
//! // Declare the pair FIRST: locals drop in reverse order, so the proxy and the children
//! // started in the namespaces are gone before the pair deletes the namespaces.
//! let pair = NetPair::new();
//! let mut node = pair.command_in(pair.ns_b(), bin_path("access-node"));
//! node.arg("serve").arg("--listen").arg(format!("{}:7000", pair.addr_b()));
//! let _node = ChildGuard::spawn("access-node", &mut node);
//! // vhost-mirror in A connects to the proxy on A's loopback, which forwards over the veth.
//! let proxy = Proxy::start(
//!     Some(pair.ns_a()),
//!     "127.0.0.1:0".parse().expect("addr"),
//!     (pair.addr_b(), 7000).into(),
//! );
//! let _mirror = ChildGuard::spawn(
//!     "vhost-mirror",
//!     pair.command_in(pair.ns_a(), bin_path("vhost-mirror"))
//!         .arg("serve")
//!         .arg("--peer")
//!         .arg(proxy.addr().to_string()),
//! );
//! pair.drop_percent(pair.ns_a(), 10);
//! proxy.set_delay(std::time::Duration::from_millis(5));
//! ```
//!
//! Unix sockets (vhost-user, control) are filesystem objects and work across namespaces; only
//! TCP/IP is separated.

use crate::ChildGuard;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A read or write that timed out or was interrupted: try again.
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Where `ip netns add` puts the namespace handles.
pub const NETNS_DIR: &str = "/var/run/netns";
/// Prefix of every namespace this module creates: `vmf-<pid>-<n>-a` / `-b`.
pub const NS_PREFIX: &str = "vmf-";
/// The veth end in namespace A.
pub const VETH_A: &str = "vmf-veth-a";
/// The veth end in namespace B.
pub const VETH_B: &str = "vmf-veth-b";
/// The nftables table holding this module's rules inside a namespace.
const NFT_TABLE: &str = "vmfault";
/// Bound for each `ip` / `tc` / `nft` invocation.
const CMD_TIMEOUT: Duration = Duration::from_secs(10);

// ------------------------------------------------------------------------------------------------
// Namespace helpers
// ------------------------------------------------------------------------------------------------

/// Moves the *calling thread* into the network namespace `ns` (a name under [`NETNS_DIR`]).
/// Other threads are not affected; threads created afterwards by this thread inherit it.
pub fn enter_netns(ns: &str) -> io::Result<()> {
    let f = File::open(Path::new(NETNS_DIR).join(ns))?;
    setns_fd(&f)
}

fn setns_fd(f: &File) -> io::Result<()> {
    // SAFETY: setns(2) with a valid, open namespace file descriptor; it changes only the calling
    // thread's network namespace and touches no memory of ours.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Identity (inode) of the calling thread's network namespace.
pub fn current_netns_id() -> u64 {
    std::fs::metadata("/proc/thread-self/ns/net")
        .expect("stat /proc/thread-self/ns/net")
        .ino()
}

/// Identity (inode) of the named network namespace.
pub fn netns_id(ns: &str) -> u64 {
    std::fs::metadata(Path::new(NETNS_DIR).join(ns))
        .unwrap_or_else(|e| panic!("stat netns {ns}: {e}"))
        .ino()
}

/// Runs `f` on a fresh thread inside namespace `ns` (`None`: the root namespace) and returns its
/// result. Sockets created by `f` stay in that namespace and may be used from any thread, so
/// this is how a test gets e.g. a client `TcpStream` in namespace A.
pub fn in_netns<T: Send>(ns: Option<&str>, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            if let Some(ns) = ns {
                enter_netns(ns).unwrap_or_else(|e| panic!("setns into {ns}: {e}"));
            }
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Spawns a named thread that enters namespace `ns` (if any) and runs `f`: for servers that live
/// in a namespace for a while (an echo server in B). Threads it spawns inherit the namespace.
pub fn spawn_in_netns<T: Send + 'static>(
    ns: Option<&str>,
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let ns = ns.map(str::to_string);
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            if let Some(ns) = &ns {
                enter_netns(ns).unwrap_or_else(|e| panic!("setns into {ns}: {e}"));
            }
            f()
        })
        .expect("spawn thread")
}

/// Runs `cmd` with a timeout; never panics (usable from `Drop`).
fn try_run(cmd: &mut Command) -> Result<Output, String> {
    let desc = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().map_err(|e| format!("{desc}: {e}"))?;
    let mut guard = ChildGuard::new(&desc, child);
    let out = guard.child_mut().stdout.take();
    let err = guard.child_mut().stderr.take();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(mut o) = out {
            let _ = o.read_to_end(&mut v);
        }
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(mut e) = err {
            let _ = e.read_to_end(&mut v);
        }
        v
    });
    let Some(status) = guard.wait_timeout(CMD_TIMEOUT) else {
        guard.kill();
        return Err(format!("{desc}: still running after {CMD_TIMEOUT:?}"));
    };
    Ok(Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    })
}

/// Runs `cmd`; `Err` (with stderr) unless it exits 0. Never panics.
fn run_ok(cmd: &mut Command) -> Result<String, String> {
    let desc = format!("{cmd:?}");
    let out = try_run(cmd)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{desc}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs `program args...`, panicking with its stderr on failure.
fn must(program: &str, args: &[&str]) -> String {
    run_ok(Command::new(program).args(args)).unwrap_or_else(|e| panic!("{e}"))
}

/// Deletes namespaces named `vmf-<pid>-...` whose process no longer exists (left behind by a
/// test process that was SIGKILLed or aborted, so its `Drop`s never ran).
pub fn remove_stale_namespaces() {
    let Ok(list) = run_ok(Command::new("ip").args(["netns", "list"])) else {
        return;
    };
    for line in list.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            if let Err(e) = run_ok(Command::new("ip").args(["netns", "del", name])) {
                eprintln!("netfault: removing stale namespace {name}: {e}");
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// NetPair
// ------------------------------------------------------------------------------------------------

/// Faults currently applied inside one namespace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Faults {
    /// Random loss (percent) on input and output of the veth.
    drop_pct: u8,
    /// Drop everything on the veth.
    blackhole: bool,
    /// `tbf` on the veth's egress, in kbit/s.
    rate_kbit: Option<u64>,
}

/// Two network namespaces `A` and `B` joined by a veth pair (`10.213.n.1/30` in A,
/// `10.213.n.2/30` in B), loopback up in both.
///
/// **Drop order.** `Drop` deletes the veth and both namespaces. A namespace only really goes
/// away when nothing uses it any more, so processes (`ChildGuard`s of [`NetPair::command_in`]
/// commands), [`Proxy`]s and server threads living in it must be gone first: declare the
/// `NetPair` *before* them in the test (Rust drops locals in reverse order). `Drop` is robust
/// anyway: it deletes the veth explicitly (the link is down at once even if a straggler still
/// holds a namespace), then the names, ignoring errors; a namespace held by a straggler is freed
/// by the kernel when the straggler exits. Namespaces left by a killed test process are removed
/// by the next `NetPair::new` (see [`remove_stale_namespaces`]).
pub struct NetPair {
    ns: [String; 2],
    addr: [Ipv4Addr; 2],
    faults: Mutex<[Faults; 2]>,
}

impl NetPair {
    /// Creates the namespaces, the veth pair and the addresses; waits until the link is up.
    /// Panics (after cleaning up what was created) on any failure.
    pub fn new() -> NetPair {
        static STALE: Once = Once::new();
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        STALE.call_once(remove_stale_namespaces);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // The addresses exist only inside this pair's namespaces, so they cannot clash with
        // anything else; the counter only makes them easy to tell apart in logs.
        let third = u8::try_from(n % 256).expect("n % 256 fits u8");
        let pair = NetPair {
            ns: [
                format!("{NS_PREFIX}{pid}-{n}-a"),
                format!("{NS_PREFIX}{pid}-{n}-b"),
            ],
            addr: [
                Ipv4Addr::new(10, 213, third, 1),
                Ipv4Addr::new(10, 213, third, 2),
            ],
            faults: Mutex::new([Faults::default(); 2]),
        };
        // From here on, a panic drops `pair`, which removes whatever was created.
        let (a, b) = (pair.ns[0].as_str(), pair.ns[1].as_str());
        must("ip", &["netns", "add", a]);
        must("ip", &["netns", "add", b]);
        // Both ends are created directly inside their namespaces, so the fixed interface names
        // never meet in the root namespace.
        must(
            "ip",
            &[
                "link", "add", VETH_A, "netns", a, "type", "veth", "peer", "name", VETH_B, "netns",
                b,
            ],
        );
        for (i, (ns, dev)) in [(a, VETH_A), (b, VETH_B)].into_iter().enumerate() {
            let cidr = format!("{}/30", pair.addr[i]);
            must("ip", &["-n", ns, "addr", "add", &cidr, "dev", dev]);
            must("ip", &["-n", ns, "link", "set", "lo", "up"]);
            // No GSO: TCP hands the veth wire-size packets (by default it passes ~64 KB
            // segments straight through, so nftables would drop and tbf would meter 40
            // packets' worth at once, and a "30% loss" would not mean what it says).
            must(
                "ip",
                &["-n", ns, "link", "set", "dev", dev, "gso_max_segs", "1"],
            );
            must("ip", &["-n", ns, "link", "set", dev, "up"]);
        }
        for (ns, dev) in [(a, VETH_A), (b, VETH_B)] {
            let up = crate::wait_until(CMD_TIMEOUT, || {
                run_ok(Command::new("ip").args(["-n", ns, "-o", "link", "show", "dev", dev]))
                    .is_ok_and(|s| s.contains("LOWER_UP") && s.contains(",UP"))
            });
            assert!(up, "{dev} in {ns} not up within {CMD_TIMEOUT:?}");
        }
        pair
    }

    pub fn ns_a(&self) -> &str {
        &self.ns[0]
    }

    pub fn ns_b(&self) -> &str {
        &self.ns[1]
    }

    /// The veth address in A.
    pub fn addr_a(&self) -> Ipv4Addr {
        self.addr[0]
    }

    /// The veth address in B.
    pub fn addr_b(&self) -> Ipv4Addr {
        self.addr[1]
    }

    /// The veth device name inside `ns` (one of this pair's namespaces).
    pub fn dev(&self, ns: &str) -> &'static str {
        [VETH_A, VETH_B][self.index(ns)]
    }

    fn index(&self, ns: &str) -> usize {
        self.ns
            .iter()
            .position(|n| n == ns)
            .unwrap_or_else(|| panic!("{ns} is not a namespace of this pair ({:?})", self.ns))
    }

    /// `ip netns exec NS program`: add arguments, environment, stdio as usual and spawn it with
    /// [`ChildGuard::spawn`]. `ip netns exec` `exec`s the program (no fork), so the guard's PID
    /// (and `PR_SET_PDEATHSIG`) is the program's own.
    pub fn command_in(&self, ns: &str, program: impl AsRef<OsStr>) -> Command {
        let ns = &self.ns[self.index(ns)];
        let mut cmd = Command::new("ip");
        cmd.arg("netns").arg("exec").arg(ns).arg(program);
        cmd
    }

    fn faults(&self) -> MutexGuard<'_, [Faults; 2]> {
        self.faults.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Random loss of `pct` percent of the packets entering and of those leaving the veth in
    /// `ns` (nftables `numgen random mod 100 < pct drop`); 0 removes it.
    pub fn drop_percent(&self, ns: &str, pct: u8) {
        assert!(pct <= 100, "drop_percent({pct})");
        let i = self.index(ns);
        let mut f = self.faults();
        f[i].drop_pct = pct;
        self.apply_nft(i, f[i]);
    }

    /// A full partition: every packet on the veth is dropped, both directions, in both
    /// namespaces (TCP sees silence: no RST, no ICMP).
    pub fn blackhole(&self) {
        let mut f = self.faults();
        for (i, fi) in f.iter_mut().enumerate() {
            fi.blackhole = true;
            self.apply_nft(i, *fi);
        }
    }

    /// Removes every fault in both namespaces: the blackhole, random loss and rate limits.
    pub fn heal(&self) {
        let mut f = self.faults();
        for i in 0..2 {
            if f[i].rate_kbit.is_some() {
                self.tc_del(i);
            }
            f[i] = Faults::default();
            self.apply_nft(i, f[i]);
        }
    }

    /// Limits what leaves `ns` over the veth to `kbit` kbit/s (`tc qdisc replace ... tbf`): for
    /// A→B traffic, limit in A. Excess packets queue (up to ~1 s worth), then are dropped.
    pub fn rate_limit(&self, ns: &str, kbit: u64) {
        assert!(kbit > 0, "rate_limit(0): use blackhole()");
        let i = self.index(ns);
        // Bucket: 10 ms worth of traffic, but at least a few full-size packets.
        let burst = (kbit * 1000 / 8 / 100).max(4 * 1514);
        must(
            "tc",
            &[
                "-n",
                &self.ns[i],
                "qdisc",
                "replace",
                "dev",
                self.dev(&self.ns[i]),
                "root",
                "tbf",
                "rate",
                &format!("{kbit}kbit"),
                "burst",
                &burst.to_string(),
                "latency",
                "1s",
            ],
        );
        self.faults()[i].rate_kbit = Some(kbit);
    }

    /// Removes the rate limit of `ns` (no-op if there is none).
    pub fn clear_rate(&self, ns: &str) {
        let i = self.index(ns);
        let mut f = self.faults();
        if f[i].rate_kbit.take().is_some() {
            self.tc_del(i);
        }
    }

    fn tc_del(&self, i: usize) {
        let ns = &self.ns[i];
        must(
            "tc",
            &["-n", ns, "qdisc", "del", "dev", self.dev(ns), "root"],
        );
    }

    /// Replaces this module's nftables table in namespace `i` with one matching `f`, in one
    /// transaction (one `nft` invocation). Rule counters restart at 0.
    fn apply_nft(&self, i: usize, f: Faults) {
        let dev = self.dev(&self.ns[i]);
        // "table" first, so "delete table" works whether or not it exists.
        let mut script = format!("table inet {NFT_TABLE}; delete table inet {NFT_TABLE}; ");
        if f.blackhole || f.drop_pct > 0 {
            let mut rules = [String::new(), String::new()];
            for (r, dir) in rules.iter_mut().zip(["iifname", "oifname"]) {
                if f.blackhole {
                    r.push_str(&format!("{dir} \"{dev}\" counter drop; "));
                }
                if f.drop_pct > 0 {
                    r.push_str(&format!(
                        "{dir} \"{dev}\" numgen random mod 100 < {} counter drop; ",
                        f.drop_pct
                    ));
                }
            }
            script.push_str(&format!(
                "table inet {NFT_TABLE} {{ \
                 chain input {{ type filter hook input priority -100; policy accept; {}}}; \
                 chain output {{ type filter hook output priority -100; policy accept; {}}}; \
                 }}",
                rules[0], rules[1]
            ));
        }
        let mut cmd = self.command_in(&self.ns[i], "nft");
        cmd.arg(&script);
        run_ok(&mut cmd).unwrap_or_else(|e| {
            panic!("{e}\n(`nft` comes with the Debian package nftables: run ci/setup.sh)")
        });
    }

    /// Packets dropped by this module's nftables rules in `ns` since its faults last changed.
    pub fn dropped_packets(&self, ns: &str) -> u64 {
        let mut cmd = self.command_in(ns, "nft");
        cmd.args(["-j", "list", "table", "inet", NFT_TABLE]);
        let Ok(json) = run_ok(&mut cmd) else {
            return 0; // no table: no fault, nothing dropped
        };
        let v: serde_json::Value =
            serde_json::from_str(&json).unwrap_or_else(|e| panic!("nft -j output: {e}: {json}"));
        let mut total = 0;
        for item in v["nftables"].as_array().into_iter().flatten() {
            for expr in item["rule"]["expr"].as_array().into_iter().flatten() {
                total += expr["counter"]["packets"].as_u64().unwrap_or(0);
            }
        }
        total
    }

    /// `nft list ruleset` inside `ns` (for failure messages).
    pub fn ruleset(&self, ns: &str) -> String {
        let mut cmd = self.command_in(ns, "nft");
        cmd.args(["list", "ruleset"]);
        run_ok(&mut cmd).unwrap_or_else(|e| e)
    }

    /// TCP segments retransmitted by sockets in `ns` so far (`RetransSegs` of
    /// `/proc/net/snmp`, read by a thread inside the namespace).
    pub fn tcp_retransmits(&self, ns: &str) -> u64 {
        let ns = &self.ns[self.index(ns)];
        let snmp = in_netns(Some(ns), || {
            std::fs::read_to_string("/proc/thread-self/net/snmp").expect("read net/snmp")
        });
        let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
        let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else {
            panic!("no Tcp lines in /proc/net/snmp:\n{snmp}");
        };
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == "RetransSegs")
            .and_then(|(_, v)| v.parse().ok())
            .expect("RetransSegs in /proc/net/snmp")
    }
}

impl Default for NetPair {
    fn default() -> Self {
        NetPair::new()
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        // Deleting one end deletes the pair, even if a straggler keeps namespace A alive.
        let _ = run_ok(Command::new("ip").args(["-n", &self.ns[0], "link", "del", VETH_A]));
        for ns in &self.ns {
            if Path::new(NETNS_DIR).join(ns).exists() {
                if let Err(e) = run_ok(Command::new("ip").args(["netns", "del", ns])) {
                    eprintln!("netfault: {e}");
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Proxy
// ------------------------------------------------------------------------------------------------

/// How often blocked proxy threads look at their flags.
const TICK: Duration = Duration::from_millis(50);
/// Largest chunk read and forwarded at once.
const CHUNK: usize = 64 * 1024;
/// Chunks queued per direction (read but not yet forwarded) before the reader stops reading.
const QUEUE_CHUNKS: usize = 64;
/// How long the proxy keeps trying to reach the target for one accepted connection.
const CONNECT_BUDGET: Duration = Duration::from_secs(10);
/// One connect attempt (short, so a stop or cut is noticed soon).
const CONNECT_ATTEMPT: Duration = Duration::from_millis(250);

/// A user-space TCP proxy, running as threads of the test process: `listen` → `target`, with a
/// one-way delay, stalls, cuts and refusals (what `netem` would do, which this kernel lacks).
///
/// Each accepted connection gets its own connection to the target (the client's connect
/// succeeds before the target is reached; if the target cannot be reached within 10 s the
/// client's connection is reset). Per direction, a reader thread stamps each chunk with its due
/// time (now + delay) and a writer thread forwards chunks in order once due and not stalled.
/// EOF is forwarded as a half-close; a reset or error on one side resets both.
///
/// Every thread blocks at most ~50 ms at a time, so `Drop` (which resets every connection,
/// stops listening and joins all threads) is bounded.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    listener: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Shared {
    delay_us: AtomicU64,
    stalled: AtomicBool,
    refusing: AtomicBool,
    stop: AtomicBool,
    to_target: AtomicU64,
    to_client: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    conns: Mutex<Vec<Arc<Conn>>>,
}

impl Shared {
    fn conns(&self) -> MutexGuard<'_, Vec<Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn delay(&self) -> Duration {
        Duration::from_micros(self.delay_us.load(Ordering::Relaxed))
    }
}

/// One proxied connection: its sockets (for aborting it from outside) and its abort flag.
struct Conn {
    abort: AtomicBool,
    sockets: Mutex<Vec<TcpStream>>,
}

impl Conn {
    /// Resets the connection: SO_LINGER 0 on both sockets (the last close sends RST) and
    /// `shutdown(Read)` to wake blocked readers (this sends nothing on the wire).
    fn abort(&self) {
        self.abort.store(true, Ordering::SeqCst);
        for s in self
            .sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            set_linger0(s);
            let _ = s.shutdown(Shutdown::Read);
        }
    }

    fn aborted(&self) -> bool {
        self.abort.load(Ordering::SeqCst)
    }
}

/// SO_LINGER {on, 0}: close() then resets the connection instead of a FIN.
fn set_linger0(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::linger>()).expect("socklen_t");
    // SAFETY: setsockopt(2) on a socket we own, with a pointer to a properly initialised
    // `linger` and its exact size; the kernel only reads it.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::addr_of!(l).cast(),
            len,
        );
    }
}

/// Waits up to `timeout` for `fd` to become readable (true) or not (false).
fn poll_readable(fd: &impl AsRawFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: poll(2) on one valid pollfd that lives on our stack for the whole call.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    r > 0
}

impl Proxy {
    /// Starts a proxy listening on `listen` (port 0: any free port, see [`Proxy::addr`]) and
    /// forwarding to `target`, inside namespace `ns` (`None`: the root namespace, where the
    /// target must be a loopback address). Returns once the proxy listens.
    pub fn start(ns: Option<&str>, listen: SocketAddr, target: SocketAddr) -> Proxy {
        assert!(
            ns.is_some() || target.ip().is_loopback(),
            "a Proxy in the root namespace may only forward to loopback, not {target}"
        );
        let ns_file = ns.map(|ns| {
            Arc::new(
                File::open(Path::new(NETNS_DIR).join(ns))
                    .unwrap_or_else(|e| panic!("open netns {ns}: {e}")),
            )
        });
        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::channel::<io::Result<SocketAddr>>();
        let sh = shared.clone();
        let listener = std::thread::Builder::new()
            .name("proxy-listen".into())
            .spawn(move || {
                let setup = || -> io::Result<TcpListener> {
                    if let Some(f) = &ns_file {
                        setns_fd(f)?;
                    }
                    let l = TcpListener::bind(listen)?;
                    l.set_nonblocking(true)?;
                    Ok(l)
                };
                let l = match setup() {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let _ = tx.send(l.local_addr());
                listen_loop(&l, target, ns_file, &sh);
            })
            .expect("spawn proxy listener");
        let addr = match rx.recv_timeout(CMD_TIMEOUT) {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => panic!("proxy: listening on {listen} (netns {ns:?}): {e}"),
            Err(e) => panic!("proxy: listener did not start: {e}"),
        };
        Proxy {
            addr,
            shared,
            listener: Some(listener),
        }
    }

    /// The address the proxy listens on (inside its namespace).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// One-way delay added to every chunk forwarded from now on, in both directions (so a
    /// request/response round trip gains twice this). Order is preserved.
    pub fn set_delay(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.shared.delay_us.store(us, Ordering::Relaxed);
    }

    /// `true`: stop forwarding (connections stay open, bytes wait in the proxy, then in the
    /// kernel's buffers); `false`: forward everything that waited, in order.
    pub fn stall(&self, on: bool) {
        self.shared.stalled.store(on, Ordering::SeqCst);
    }

    /// Resets every current connection (RST to both the client and the target) and returns
    /// once their threads have ended (at most a few hundred ms). New connections are accepted.
    pub fn cut(&self) {
        let conns: Vec<Arc<Conn>> = self.shared.conns().clone();
        for c in &conns {
            c.abort();
        }
        let gone = crate::wait_until(CMD_TIMEOUT, || {
            let live = self.shared.conns();
            !conns.iter().any(|c| live.iter().any(|l| Arc::ptr_eq(c, l)))
        });
        assert!(
            gone,
            "proxy: cut connections still open after {CMD_TIMEOUT:?}"
        );
    }

    /// `true`: connections accepted from now on are reset at once (the client's connect
    /// succeeds, then it sees RST/EOF); existing ones are untouched.
    pub fn refuse(&self, on: bool) {
        self.shared.refusing.store(on, Ordering::SeqCst);
    }

    /// Bytes forwarded client → target.
    pub fn bytes_to_target(&self) -> u64 {
        self.shared.to_target.load(Ordering::Relaxed)
    }

    /// Bytes forwarded target → client.
    pub fn bytes_to_client(&self) -> u64 {
        self.shared.to_client.load(Ordering::Relaxed)
    }

    /// Connections accepted and forwarded (not counting refused ones).
    pub fn connections(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Connections reset at once because of [`Proxy::refuse`].
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::Relaxed)
    }

    /// Connections currently open.
    pub fn active(&self) -> usize {
        self.shared.conns().len()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.listener.take() {
            if h.join().is_err() {
                eprintln!("proxy: listener thread panicked");
            }
        }
    }
}

fn listen_loop(l: &TcpListener, target: SocketAddr, ns: Option<Arc<File>>, sh: &Arc<Shared>) {
    let mut workers: Vec<JoinHandle<()>> = Vec::new();
    while !sh.stop.load(Ordering::SeqCst) {
        if poll_readable(l, TICK) {
            match l.accept() {
                Ok((s, _)) => {
                    if sh.refusing.load(Ordering::SeqCst) {
                        set_linger0(&s);
                        sh.refused.fetch_add(1, Ordering::Relaxed);
                        drop(s);
                    } else {
                        sh.accepted.fetch_add(1, Ordering::Relaxed);
                        let conn = Arc::new(Conn {
                            abort: AtomicBool::new(false),
                            sockets: Mutex::new(Vec::new()),
                        });
                        // Registered before the target is reached, so a cut() meanwhile
                        // covers it too.
                        sh.conns().push(conn.clone());
                        let (sh2, ns2) = (sh.clone(), ns.clone());
                        let h = std::thread::Builder::new().name("proxy-conn".into()).spawn(
                            move || {
                                conn_main(s, target, ns2.as_deref(), &conn, &sh2);
                                // Close the last descriptors (RST if aborted) before cut()
                                // can see the connection gone.
                                conn.sockets
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .clear();
                                sh2.conns().retain(|c| !Arc::ptr_eq(c, &conn));
                            },
                        );
                        match h {
                            Ok(h) => workers.push(h),
                            Err(e) => eprintln!("proxy: spawning a connection thread: {e}"),
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    eprintln!("proxy: accept: {e}");
                    std::thread::sleep(TICK);
                }
            }
        }
        workers.retain(|h| !h.is_finished());
    }
    for c in sh.conns().iter() {
        c.abort();
    }
    for h in workers {
        let _ = h.join();
    }
}

fn conn_main(client: TcpStream, target: SocketAddr, ns: Option<&File>, conn: &Conn, sh: &Shared) {
    let reset = |s: &TcpStream| set_linger0(s);
    // Threads inherit the creating thread's network namespace (the listener's), which the test
    // `threads_inherit_netns` checks; entering it again here costs one syscall and makes sure
    // the connection to the target never leaves the namespace.
    if let Some(f) = ns {
        if let Err(e) = setns_fd(f) {
            eprintln!("proxy: setns: {e}");
            reset(&client);
            return;
        }
    }
    if client.set_nonblocking(false).is_err() {
        reset(&client);
        return;
    }
    let _ = client.set_nodelay(true);
    if let Ok(c) = client.try_clone() {
        conn.sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(c);
    }
    let deadline = Instant::now() + CONNECT_BUDGET;
    let server = loop {
        if conn.aborted() || sh.stop.load(Ordering::SeqCst) {
            reset(&client);
            return;
        }
        match TcpStream::connect_timeout(&target, CONNECT_ATTEMPT) {
            Ok(s) => break s,
            Err(e) if e.kind() == io::ErrorKind::TimedOut && Instant::now() < deadline => {}
            Err(_) => {
                reset(&client);
                return;
            }
        }
    };
    let _ = server.set_nodelay(true);
    if let Ok(s) = server.try_clone() {
        conn.sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(s);
    }
    if conn.aborted() {
        reset(&client);
        reset(&server);
        return;
    }
    std::thread::scope(|s| {
        s.spawn(|| pump(&client, &server, &sh.to_target, conn, sh));
        s.spawn(|| pump(&server, &client, &sh.to_client, conn, sh));
    });
    if conn.aborted() {
        reset(&client);
        reset(&server);
    }
}

/// A chunk read from one side, due to be written to the other at `due`; `None` = EOF.
struct Chunk {
    due: Instant,
    data: Option<Vec<u8>>,
}

/// Forwards `src` → `dst` until EOF (forwarded as a half-close) or an abort.
fn pump(src: &TcpStream, dst: &TcpStream, counter: &AtomicU64, conn: &Conn, sh: &Shared) {
    let (tx, rx) = mpsc::sync_channel::<Chunk>(QUEUE_CHUNKS);
    std::thread::scope(|s| {
        s.spawn(move || reader(src, &tx, conn, sh));
        writer(dst, &rx, counter, conn, sh);
        // If the writer ended early (abort), dropping rx unblocks a reader stuck in send().
        drop(rx);
    });
}

fn reader(mut src: &TcpStream, tx: &mpsc::SyncSender<Chunk>, conn: &Conn, sh: &Shared) {
    if src.set_read_timeout(Some(TICK)).is_err() {
        conn.abort();
        return;
    }
    let mut buf = vec![0u8; CHUNK];
    loop {
        if conn.aborted() {
            return;
        }
        match src.read(&mut buf) {
            Ok(n) => {
                if conn.aborted() {
                    return;
                }
                let data = (n > 0).then(|| buf[..n].to_vec());
                let due = Instant::now() + sh.delay();
                if tx.send(Chunk { due, data }).is_err() || n == 0 {
                    return;
                }
            }
            Err(e) if is_transient(&e) => {}
            Err(_) => {
                // Reset by the peer (or worse): reset the other side too.
                conn.abort();
                return;
            }
        }
    }
}

fn writer(
    mut dst: &TcpStream,
    rx: &mpsc::Receiver<Chunk>,
    counter: &AtomicU64,
    conn: &Conn,
    sh: &Shared,
) {
    if dst.set_write_timeout(Some(TICK)).is_err() {
        conn.abort();
        return;
    }
    loop {
        let chunk = match rx.recv_timeout(TICK) {
            Ok(c) => c,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if conn.aborted() {
                    return;
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        // Wait until due and not stalled.
        loop {
            if conn.aborted() {
                return;
            }
            let now = Instant::now();
            if sh.stalled.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            } else if now < chunk.due {
                std::thread::sleep((chunk.due - now).min(Duration::from_millis(5)));
            } else {
                break;
            }
        }
        let Some(data) = chunk.data else {
            let _ = dst.shutdown(Shutdown::Write);
            return;
        };
        let mut off = 0;
        while off < data.len() {
            if conn.aborted() {
                return;
            }
            match dst.write(&data[off..]) {
                Ok(0) => {
                    conn.abort();
                    return;
                }
                Ok(n) => {
                    off += n;
                    counter.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if is_transient(&e) => {}
                Err(_) => {
                    conn.abort();
                    return;
                }
            }
        }
    }
}
