//! The network-fault harness (`vhost_mirror_tests::netfault`) proves that each fault really
//! acts: a TCP echo server in namespace B (a thread that entered B), clients in A, over the
//! pair's veth or through a [`Proxy`].
//!
//! Needs root, iproute2 and nftables (`ci/setup.sh`). Traffic stays inside the test's own
//! namespaces or on loopback. Run: `cargo test -p vhost-mirror-tests --test netfault`.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost_mirror_tests::netfault::{self, NetPair, Proxy};
use vhost_mirror_tests::{fill_pattern, pattern, wait_until, ChildGuard, Watchdog, TIMEOUT};

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

// ------------------------------------------------------------------------------------------------
// Echo server and client helpers
// ------------------------------------------------------------------------------------------------

/// Echoes every byte back on each connection; closes a connection after its EOF. Lives in a
/// namespace (or the root namespace), stops (bounded) when dropped.
struct EchoServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl EchoServer {
    fn start(ns: Option<&str>, bind: SocketAddr) -> EchoServer {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let st = stop.clone();
        let handle = netfault::spawn_in_netns(ns, "echo-listen", move || {
            let l = TcpListener::bind(bind).expect("bind echo server");
            l.set_nonblocking(true).expect("nonblocking listener");
            tx.send(l.local_addr().expect("local_addr"))
                .expect("report address");
            let mut conns = Vec::new();
            while !st.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((s, _)) => {
                        let st = st.clone();
                        conns.push(std::thread::spawn(move || echo_conn(s, &st)));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(e) => panic!("echo accept: {e}"),
                }
            }
            for c in conns {
                let _ = c.join();
            }
        });
        let addr = rx.recv_timeout(TIMEOUT).expect("echo server address");
        EchoServer {
            addr,
            stop,
            handle: Some(handle),
        }
    }
}

fn echo_conn(mut s: TcpStream, stop: &AtomicBool) {
    s.set_nonblocking(false).expect("blocking");
    s.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("read timeout");
    let mut buf = vec![0u8; 64 * KIB];
    while !stop.load(Ordering::SeqCst) {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A TCP connection from inside `ns` (None: root namespace).
fn connect(ns: Option<&str>, to: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    netfault::in_netns(ns, || {
        let s = TcpStream::connect_timeout(&to, timeout)?;
        s.set_nodelay(true)?;
        Ok(s)
    })
}

/// Sends `msg`, reads the echo (within `timeout`), returns the round-trip time.
fn round_trip(s: &mut TcpStream, msg: &[u8], timeout: Duration) -> io::Result<Duration> {
    s.set_read_timeout(Some(timeout))?;
    let t = Instant::now();
    s.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back)?;
    assert_eq!(back, msg, "echo differs");
    Ok(t.elapsed())
}

/// Sends `len` bytes of pattern data (from a second thread) and reads them all back, checking
/// every byte; returns the elapsed time.
fn echo_transfer(s: &TcpStream, len: usize, seed: u64, timeout: Duration) -> Duration {
    let mut w = s.try_clone().expect("clone stream");
    let mut r = s.try_clone().expect("clone stream");
    r.set_read_timeout(Some(timeout)).expect("read timeout");
    let t = Instant::now();
    let sender = std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * KIB];
        let mut off = 0;
        while off < len {
            let n = (len - off).min(buf.len());
            fill_pattern(&mut buf[..n], off as u64, seed);
            w.write_all(&buf[..n]).expect("send");
            off += n;
        }
    });
    let mut got = vec![0u8; len];
    r.read_exact(&mut got)
        .unwrap_or_else(|e| panic!("reading {len} echoed bytes back: {e}"));
    let el = t.elapsed();
    sender.join().expect("sender thread");
    assert!(got == pattern(0, len, seed), "echoed data differs");
    el
}

fn netns_list() -> String {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn any_addr(ip: Ipv4Addr) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), 0)
}

fn loopback_any() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0)
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

// ------------------------------------------------------------------------------------------------
// NetPair
// ------------------------------------------------------------------------------------------------

#[test]
fn pair_lifecycle_threads_and_commands_in_namespaces() {
    let _wd = Watchdog::new("pair_lifecycle", Duration::from_secs(60));
    let (a, b);
    {
        let pair = NetPair::new();
        a = pair.ns_a().to_string();
        b = pair.ns_b().to_string();
        let list = netns_list();
        assert!(list.contains(&a) && list.contains(&b), "{list}");
        let (ida, idb) = (netfault::netns_id(&a), netfault::netns_id(&b));
        let root = netfault::current_netns_id();
        assert!(ida != idb && ida != root && idb != root);

        // A thread that entered A, and a thread *it* spawns, are both in A (namespaces are
        // inherited from the creating thread); this thread is untouched.
        let (in_a, in_child) = netfault::in_netns(Some(&a), || {
            let me = netfault::current_netns_id();
            let child = std::thread::spawn(netfault::current_netns_id)
                .join()
                .expect("child thread");
            (me, child)
        });
        assert_eq!((in_a, in_child), (ida, ida));
        assert_eq!(netfault::current_netns_id(), root);

        // `ip netns exec` execs the program itself: the guard's PID is the program, in B.
        let mut sleeper = ChildGuard::spawn("sleep", pair.command_in(&b, "sleep").arg("30"));
        let pid = sleeper.pid();
        assert!(
            wait_until(TIMEOUT, || std::fs::read_to_string(format!(
                "/proc/{pid}/comm"
            ))
            .is_ok_and(|c| c.trim() == "sleep")),
            "pid {pid} is not `sleep`"
        );
        let ns_of_child = std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .expect("stat child netns");
        assert_eq!(ns_of_child, idb);
        sleeper.kill();

        // Traffic flows A -> B over the veth.
        let echo = EchoServer::start(Some(&b), any_addr(pair.addr_b()));
        let mut c = connect(Some(&a), echo.addr, TIMEOUT).expect("connect A -> B");
        let rtt = round_trip(&mut c, b"hello over veth", TIMEOUT).expect("round trip");
        assert!(rtt < Duration::from_millis(200), "{rtt:?}");
        assert_eq!(
            c.local_addr().expect("local").ip(),
            IpAddr::V4(pair.addr_a())
        );
        // Drop order: connection, echo server, then the pair.
    }
    let list = netns_list();
    assert!(
        !list.contains(&a) && !list.contains(&b),
        "namespaces left behind: {list}"
    );
}

#[test]
fn blackhole_partitions_and_heal_restores() {
    let _wd = Watchdog::new("blackhole", Duration::from_secs(60));
    let pair = NetPair::new();
    let echo = EchoServer::start(Some(pair.ns_b()), any_addr(pair.addr_b()));
    let mut old = connect(Some(pair.ns_a()), echo.addr, TIMEOUT).expect("connect");
    round_trip(&mut old, b"before", TIMEOUT).expect("round trip before the partition");

    pair.blackhole();
    let t = Instant::now();
    let e = connect(Some(pair.ns_a()), echo.addr, Duration::from_millis(500))
        .expect_err("connect through a blackhole");
    assert!(
        is_timeout(&e),
        "connect failed with {e}, expected a timeout"
    );
    assert!(t.elapsed() >= Duration::from_millis(450));
    let e = round_trip(&mut old, b"during", Duration::from_millis(500))
        .expect_err("round trip through a blackhole");
    assert!(
        is_timeout(&e),
        "round trip failed with {e}, expected a timeout"
    );
    let dropped = pair.dropped_packets(pair.ns_a());
    assert!(
        dropped > 0,
        "no drops counted:\n{}",
        pair.ruleset(pair.ns_a())
    );

    pair.heal();
    assert_eq!(
        pair.dropped_packets(pair.ns_a()),
        0,
        "rules left after heal"
    );
    let mut new = connect(Some(pair.ns_a()), echo.addr, TIMEOUT).expect("connect after heal");
    round_trip(&mut new, b"after", TIMEOUT).expect("round trip after heal");
    // The old connection recovers by retransmission ("during" was sent into the blackhole).
    let mut back = [0u8; 6];
    old.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    old.read_exact(&mut back).expect("retransmitted echo");
    assert_eq!(&back, b"during");
}

#[test]
fn random_loss_drops_packets_and_costs_retransmissions() {
    let _wd = Watchdog::new("random_loss", Duration::from_secs(60));
    let pair = NetPair::new();
    let (a, b) = (pair.ns_a(), pair.ns_b());
    let echo = EchoServer::start(Some(b), any_addr(pair.addr_b()));
    let c = connect(Some(a), echo.addr, TIMEOUT).expect("connect");
    let clean = echo_transfer(&c, MIB, 1, TIMEOUT);
    let retrans0 = pair.tcp_retransmits(a) + pair.tcp_retransmits(b);

    pair.drop_percent(a, 30);
    // Let the loss act on a 1 MiB echo for up to 1.5 s, then remove it and let the transfer
    // finish (TCP's retransmission backoff grows fast at 30% loss: bounded this way).
    let c2 = c.try_clone().expect("clone stream");
    let transfer = std::thread::spawn(move || echo_transfer(&c2, MIB, 2, TIMEOUT));
    wait_until(Duration::from_millis(1500), || transfer.is_finished());
    let dropped = pair.dropped_packets(a);
    let retrans = pair.tcp_retransmits(a) + pair.tcp_retransmits(b) - retrans0;
    pair.drop_percent(a, 0);
    let lossy = transfer.join().expect("transfer under loss");
    eprintln!(
        "1 MiB echo: clean {clean:?}, 30% loss (removed after 1.5 s) {lossy:?}; \
         {dropped} packets dropped, {retrans} segments retransmitted"
    );
    assert!(dropped > 10, "few drops counted:\n{}", pair.ruleset(a));
    assert!(retrans > 0, "no retransmissions with 30% loss");
    assert!(
        lossy > clean * 5 && lossy > Duration::from_millis(100),
        "loss did not slow the transfer: {lossy:?} vs {clean:?}"
    );

    pair.drop_percent(a, 0);
    assert_eq!(pair.dropped_packets(a), 0);
    assert!(!pair.ruleset(a).contains("vmfault"), "{}", pair.ruleset(a));
    let clean2 = echo_transfer(&c, MIB, 3, TIMEOUT);
    assert!(
        clean2 < Duration::from_secs(1),
        "{clean2:?} after removing the loss"
    );
}

#[test]
fn rate_limit_slows_bulk_transfer() {
    let _wd = Watchdog::new("rate_limit", Duration::from_secs(60));
    let pair = NetPair::new();
    let (a, b) = (pair.ns_a(), pair.ns_b());
    let echo = EchoServer::start(Some(b), any_addr(pair.addr_b()));
    let c = connect(Some(a), echo.addr, TIMEOUT).expect("connect");

    // 8000 kbit/s = 1 MB/s leaving A: 2 MiB A -> B takes ~2.1 s.
    pair.rate_limit(a, 8000);
    let limited = echo_transfer(&c, 2 * MIB, 4, Duration::from_secs(20));
    pair.clear_rate(a);
    let free = echo_transfer(&c, 2 * MIB, 5, TIMEOUT);
    eprintln!("2 MiB echo: 8000 kbit/s {limited:?}, unlimited {free:?}");
    assert!(limited >= Duration::from_millis(1500), "{limited:?}");
    assert!(limited < Duration::from_secs(10), "{limited:?}");
    assert!(free < Duration::from_secs(1), "{free:?} after clear_rate");

    // heal() removes rate limits too.
    pair.rate_limit(b, 800);
    pair.heal();
    let healed = echo_transfer(&c, 2 * MIB, 6, TIMEOUT);
    assert!(healed < Duration::from_secs(1), "{healed:?} after heal");
}

// ------------------------------------------------------------------------------------------------
// Proxy
// ------------------------------------------------------------------------------------------------

#[test]
fn proxy_in_namespace_delays_both_directions_in_order() {
    let _wd = Watchdog::new("proxy_delay", Duration::from_secs(60));
    let pair = NetPair::new();
    let echo = EchoServer::start(Some(pair.ns_b()), any_addr(pair.addr_b()));
    // The proxy listens on A's loopback and forwards over the veth to B.
    let proxy = Proxy::start(Some(pair.ns_a()), loopback_any(), echo.addr);
    let mut c = connect(Some(pair.ns_a()), proxy.addr(), TIMEOUT).expect("connect proxy");

    let base = round_trip(&mut c, b"ping", TIMEOUT).expect("round trip");
    proxy.set_delay(Duration::from_millis(20));
    let mut delayed = Vec::new();
    for _ in 0..5 {
        delayed.push(round_trip(&mut c, b"ping", TIMEOUT).expect("delayed round trip"));
    }
    // Bulk data keeps its order and content under delay.
    let bulk = echo_transfer(&c, MIB, 7, TIMEOUT);
    proxy.set_delay(Duration::ZERO);
    let after = round_trip(&mut c, b"ping", TIMEOUT).expect("round trip");
    eprintln!("proxy rtt: {base:?}, with 20 ms delay {delayed:?}, 1 MiB {bulk:?}, after {after:?}");
    for d in &delayed {
        assert!(*d >= Duration::from_millis(40), "{d:?} with 2 x 20 ms");
        assert!(*d < Duration::from_millis(500), "{d:?} with 2 x 20 ms");
    }
    assert!(after < Duration::from_millis(40), "{after:?} after delay 0");
    let sent = (4 * 7 + MIB) as u64;
    // The counters follow each write's return, so they may trail the client by a moment.
    assert!(
        wait_until(TIMEOUT, || proxy.bytes_to_target() == sent
            && proxy.bytes_to_client() == sent),
        "forwarded {} / {} bytes, expected {sent} each way",
        proxy.bytes_to_target(),
        proxy.bytes_to_client()
    );
    assert_eq!(proxy.connections(), 1);
    assert_eq!(proxy.active(), 1);
    drop(c);
    assert!(
        wait_until(TIMEOUT, || proxy.active() == 0),
        "connection not closed"
    );
}

#[test]
fn proxy_stall_holds_bytes_until_released() {
    let _wd = Watchdog::new("proxy_stall", Duration::from_secs(60));
    // Root namespace, loopback only.
    let echo = EchoServer::start(None, loopback_any());
    let proxy = Proxy::start(None, loopback_any(), echo.addr);
    let mut c = connect(None, proxy.addr(), TIMEOUT).expect("connect proxy");
    round_trip(&mut c, b"warm-up", TIMEOUT).expect("round trip");

    proxy.stall(true);
    let len = 200 * KIB;
    let data = pattern(0, len, 9);
    c.write_all(&data).expect("send while stalled");
    c.set_read_timeout(Some(Duration::from_millis(400)))
        .expect("timeout");
    let mut one = [0u8; 1];
    let e = c.read(&mut one).expect_err("bytes arrived while stalled");
    assert!(is_timeout(&e), "{e}");
    assert_eq!(proxy.bytes_to_target(), 7, "forwarded while stalled");

    proxy.stall(false);
    c.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut back = vec![0u8; len];
    c.read_exact(&mut back).expect("bytes after the stall");
    assert!(back == data, "data differs after the stall");

    // Dropping a proxy with a stalled connection holding data is bounded.
    proxy.stall(true);
    c.write_all(&data).expect("send while stalled");
    let t = Instant::now();
    drop(proxy);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "proxy drop took {:?}",
        t.elapsed()
    );
    c.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    // The proxy reset the connection: the stalled bytes never arrive.
    let mut buf = [0u8; 16];
    match c.read(&mut buf) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        other => panic!("after dropping the proxy: {other:?}, expected a reset"),
    }
}

#[test]
fn proxy_cut_resets_and_refuse_rejects() {
    let _wd = Watchdog::new("proxy_cut", Duration::from_secs(60));
    let pair = NetPair::new();
    let a = pair.ns_a();
    let echo = EchoServer::start(Some(pair.ns_b()), any_addr(pair.addr_b()));
    let proxy = Proxy::start(Some(a), loopback_any(), echo.addr);
    let mut c = connect(Some(a), proxy.addr(), TIMEOUT).expect("connect proxy");
    round_trip(&mut c, b"before cut", TIMEOUT).expect("round trip");

    proxy.cut();
    assert_eq!(proxy.active(), 0);
    c.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut buf = [0u8; 16];
    match c.read(&mut buf) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        other => panic!("after cut: {other:?}, expected a reset"),
    }

    // New connections work after a cut.
    let mut c2 = connect(Some(a), proxy.addr(), TIMEOUT).expect("connect after cut");
    round_trip(&mut c2, b"after cut", TIMEOUT).expect("round trip after cut");

    proxy.refuse(true);
    // The kernel completes the handshake, then the proxy resets the connection: depending on
    // timing, the RST is already there when connect() returns (ECONNRESET) or the first read
    // sees it.
    match connect(Some(a), proxy.addr(), TIMEOUT) {
        Ok(mut r) => {
            r.set_read_timeout(Some(TIMEOUT)).expect("timeout");
            match r.read(&mut buf) {
                Ok(0) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
                other => panic!("refused connection: {other:?}, expected EOF or reset"),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("connect while refusing: {e}, expected success or a reset"),
    }
    assert!(
        wait_until(TIMEOUT, || proxy.refused() == 1),
        "refused {}",
        proxy.refused()
    );
    // The existing connection is untouched by refuse().
    round_trip(&mut c2, b"still here", TIMEOUT).expect("existing connection while refusing");

    proxy.refuse(false);
    let mut c3 = connect(Some(a), proxy.addr(), TIMEOUT).expect("connect after refuse");
    round_trip(&mut c3, b"accepted again", TIMEOUT).expect("round trip after refuse");
    assert_eq!(proxy.connections(), 3);
}

#[test]
#[should_panic(expected = "may only forward to loopback")]
fn proxy_in_root_namespace_refuses_non_loopback_targets() {
    let _ = Proxy::start(
        None,
        loopback_any(),
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 213, 0, 2)), 9),
    );
}

#[test]
fn pair_drop_is_robust_against_stragglers_and_stale_namespaces_are_removed() {
    let _wd = Watchdog::new("pair_drop", Duration::from_secs(60));
    // Wrong order on purpose: the process in B outlives the pair. The names and the veth go
    // at once; the kernel frees namespace B when the process dies.
    let pair = NetPair::new();
    let (a, b) = (pair.ns_a().to_string(), pair.ns_b().to_string());
    let mut sleeper = ChildGuard::spawn("sleep", pair.command_in(&b, "sleep").arg("30"));
    let pid = sleeper.pid();
    assert!(wait_until(TIMEOUT, || {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep")
    }));
    let net_dev = || std::fs::read_to_string(format!("/proc/{pid}/net/dev")).expect("net/dev");
    assert!(net_dev().contains(netfault::VETH_B), "{}", net_dev());
    drop(pair);
    let list = netns_list();
    assert!(!list.contains(&a) && !list.contains(&b), "{list}");
    // The straggler's namespace no longer has the veth (only lo).
    // /proc/PID/net shows the network namespace of process PID.
    let links = net_dev();
    assert!(
        !links.contains(netfault::VETH_B),
        "veth still there: {links}"
    );
    sleeper.kill();

    // A namespace named after a process that cannot exist (pid above any pid_max) is stale.
    let stale = format!("{}4294967-0-a", netfault::NS_PREFIX);
    let out = Command::new("ip")
        .args(["netns", "add", &stale])
        .output()
        .expect("ip netns add");
    assert!(out.status.success(), "{out:?}");
    netfault::remove_stale_namespaces();
    let list = netns_list();
    assert!(!list.contains(&stale), "stale namespace kept: {list}");
}
