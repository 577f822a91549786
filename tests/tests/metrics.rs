//! Metrics tier (issue 13, item 4): `--metrics ADDR` on both servers of a mirrored pair,
//! scraped over HTTP while a client writes and flushes, every document parsed by a real
//! Prometheus text parser (the Python client library's, `prometheus_client`, which
//! `ci/setup.sh` installs; missing, the test fails and says so); then an endpoint that gets
//! garbage, a 64 KiB request line, floods of connections and a trickling client, and keeps
//! answering.
//!
//! Run: `cargo build --workspace && cargo test -p vhost-mirror-tests --test metrics`.
//! Every process is killed on drop, also when an assertion fails; loopback only.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use vhost_mirror_tests::{
    create_image, free_port, test_dir, wait_in_sync, wait_until, AccessNodeOpts, Backend,
    BackendKind, BackendOpts, Client, Pair, Watchdog, TIMEOUT,
};

const MIB: u64 = 1 << 20;

/// The parser: reads the exposition on stdin, prints its families as JSON (non-finite values
/// as strings). Exit 3: the library is missing.
const PARSER: &str = r#"
import json, math, sys
try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError as e:
    sys.stderr.write("the Python package prometheus-client is missing (bash ci/setup.sh installs it): %s\n" % e)
    sys.exit(3)
out = []
for f in text_string_to_metric_families(sys.stdin.read()):
    out.append({
        "name": f.name,
        "type": f.type,
        "help": f.documentation,
        "samples": [[s.name, s.labels, s.value if math.isfinite(s.value) else str(s.value)]
                    for s in f.samples],
    })
json.dump(out, sys.stdout)
"#;

/// One parsed family.
#[derive(Debug, Clone)]
struct Family {
    name: String,
    kind: String,
    help: String,
    samples: Vec<Sample>,
}

#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

impl Sample {
    /// `name{k="v",...}` with the labels in order: the series' identity.
    fn key(&self) -> String {
        let l: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect();
        format!("{}{{{}}}", self.name, l.join(","))
    }
}

/// Parses an exposition with prometheus_client (panics, with the text, if it cannot).
fn parse(text: &str) -> Vec<Family> {
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(PARSER)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("python3 (for prometheus_client's parser): {e}"));
    let mut stdin = child.stdin.take().expect("stdin");
    let input = text.to_owned();
    let feeder = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().expect("python3 output");
    feeder.join().expect("feeder").expect("write to the parser");
    assert!(
        out.status.code() != Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "prometheus_client could not parse the document ({}): {}\n---\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("parser JSON");
    v.as_array()
        .expect("a list of families")
        .iter()
        .map(|f| Family {
            name: f["name"].as_str().expect("name").to_owned(),
            kind: f["type"].as_str().expect("type").to_owned(),
            help: f["help"].as_str().expect("help").to_owned(),
            samples: f["samples"]
                .as_array()
                .expect("samples")
                .iter()
                .map(|s| Sample {
                    name: s[0].as_str().expect("sample name").to_owned(),
                    labels: s[1]
                        .as_object()
                        .expect("labels")
                        .iter()
                        .map(|(k, v)| (k.clone(), v.as_str().expect("label").to_owned()))
                        .collect(),
                    value: s[2]
                        .as_f64()
                        .unwrap_or_else(|| panic!("non-finite sample {s} in\n{text}")),
                })
                .collect(),
        })
        .collect()
}

/// One scrape: the raw text and the parsed families, checked for what every document must be.
#[derive(Debug, Clone)]
struct Scrape {
    text: String,
    families: Vec<Family>,
}

impl Scrape {
    /// The value of the series `name{labels}` (the `image` label not counted); panics if absent.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.find(name, labels)
            .unwrap_or_else(|| panic!("no {name}{labels:?} in\n{}", self.text))
    }

    fn find(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.families
            .iter()
            .flat_map(|f| &f.samples)
            .find(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
                    && s.labels.len() == labels.len() + 1
            })
            .map(|s| s.value)
    }

    /// Every series of a counter (`_total`) or a histogram, by its key.
    fn monotonic_series(&self) -> BTreeMap<String, f64> {
        self.families
            .iter()
            .filter(|f| f.kind == "counter" || f.kind == "histogram")
            .flat_map(|f| &f.samples)
            .map(|s| (s.key(), s.value))
            .collect()
    }
}

/// Checks what holds for any document of ours: a type and help text for every family (no
/// "unknown" family: a sample outside its family would make one), every sample labelled with
/// `image`, state sets with exactly one current state (at most one for the peer's disk),
/// histograms with cumulative buckets whose `+Inf` equals `_count`.
fn check_document(s: &Scrape, image: &str) {
    for f in &s.families {
        assert!(
            matches!(f.kind.as_str(), "counter" | "gauge" | "histogram"),
            "family {} of type {}:\n{}",
            f.name,
            f.kind,
            s.text
        );
        assert!(!f.help.is_empty(), "family {} has no help", f.name);
        assert!(
            f.name.starts_with("vhost_mirror_"),
            "family {} outside the namespace",
            f.name
        );
        for x in &f.samples {
            assert_eq!(
                x.labels.get("image").map(String::as_str),
                Some(image),
                "{}",
                x.key()
            );
            if f.kind == "counter" {
                assert!(x.name.ends_with("_total"), "counter sample {}", x.name);
                assert!(x.value >= 0.0, "{}", x.key());
            }
        }
        if f.name.ends_with("_state") || f.name == "vhost_mirror_role" {
            let set: f64 = f.samples.iter().map(|x| x.value).sum();
            let ok = if f.name == "vhost_mirror_peer_disk_state" {
                set <= 1.0
            } else {
                set == 1.0
            };
            assert!(ok, "state set {} sums to {set}:\n{}", f.name, s.text);
            assert!(f.samples.iter().all(|x| x.value == 0.0 || x.value == 1.0));
        }
        if f.kind == "histogram" {
            let buckets: Vec<&Sample> = f
                .samples
                .iter()
                .filter(|x| x.name.ends_with("_bucket"))
                .collect();
            assert_eq!(buckets.len(), 18, "{}: buckets", f.name);
            let mut last_le = f64::NEG_INFINITY;
            let mut last = 0.0;
            for b in &buckets {
                let le: f64 = match b.labels["le"].as_str() {
                    "+Inf" => f64::INFINITY,
                    x => x.parse().expect("le"),
                };
                assert!(le > last_le, "{}: le not increasing", f.name);
                assert!(b.value >= last, "{}: buckets not cumulative", f.name);
                (last_le, last) = (le, b.value);
            }
            assert_eq!(last_le, f64::INFINITY, "{}: no +Inf bucket", f.name);
            let count = s.get(&format!("{}_count", f.name), &[]);
            assert_eq!(last, count, "{}: +Inf bucket is not _count", f.name);
            assert!(s.get(&format!("{}_sum", f.name), &[]) >= 0.0);
        }
    }
}

/// `GET /metrics` at `port`: the status line and the body (Err: no answer, with why).
fn http_get(port: u16, path: &str) -> Result<(String, String), String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n"
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| format!("read: {e}"))?;
    let raw = String::from_utf8(raw).map_err(|e| format!("not UTF-8: {e}"))?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no header end in {raw:?}"))?;
    let status = head.lines().next().unwrap_or_default().to_owned();
    if path == "/metrics" && status.contains(" 200 ") {
        assert!(
            head.contains("Content-Type: text/plain; version=0.0.4"),
            "content type: {head}"
        );
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .expect("Content-Length")
            .parse()
            .expect("length");
        assert_eq!(len, body.len(), "Content-Length");
    }
    Ok((status, body.to_owned()))
}

/// Scrapes `port` and parses the document (panics unless a 200 comes within a few tries).
fn scrape(port: u16, image: &str) -> Scrape {
    let mut last = String::new();
    for _ in 0..20 {
        match http_get(port, "/metrics") {
            Ok((status, body)) if status == "HTTP/1.0 200 OK" => {
                let s = Scrape {
                    families: parse(&body),
                    text: body,
                };
                check_document(&s, image);
                return s;
            }
            Ok((status, _)) => last = status,
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("no metrics from port {port}: {last}");
}

/// Waits until the endpoint at `port` answers (it starts with the server).
fn wait_metrics(port: u16) {
    assert!(
        wait_until(TIMEOUT, || http_get(port, "/metrics").is_ok()),
        "no metrics endpoint on port {port}"
    );
}

/// Counters and histogram series never go down from one scrape to the next.
fn assert_monotonic(before: &Scrape, after: &Scrape, who: &str) {
    let a = after.monotonic_series();
    for (k, v) in before.monotonic_series() {
        let w = a
            .get(&k)
            .unwrap_or_else(|| panic!("{who}: series {k} disappeared"));
        assert!(*w >= v, "{who}: {k} went from {v} to {w}");
    }
}

/// A client writing (4 KiB to 256 KiB, all over the device) and flushing every 8 writes until
/// told to stop; counts what it did.
struct Load {
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    flushes: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(socket: &std::path::Path, size: u64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let flushes = Arc::new(AtomicU64::new(0));
        let (s, w, f) = (stop.clone(), writes.clone(), flushes.clone());
        let socket = socket.to_owned();
        let thread = std::thread::spawn(move || {
            let mut c = Client::connect(&socket);
            let q = c.q();
            let data = vec![0x5au8; 256 << 10];
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let len = 4096usize << (x % 7);
                let off = (x >> 8) % ((size - len as u64) / 4096) * 4096;
                assert_eq!(q.write(off, &data[..len]), Ok(()), "write at {off}");
                let n = w.fetch_add(1, Ordering::Relaxed) + 1;
                if n % 8 == 0 {
                    assert_eq!(q.flush(), Ok(()), "flush");
                    f.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Load {
            stop,
            writes,
            flushes,
            thread: Some(thread),
        }
    }

    /// Stops the client and waits for it; (writes, flushes).
    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("load thread");
        }
        (
            self.writes.load(Ordering::Relaxed),
            self.flushes.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The pair's metrics under load: both documents parse, counters only grow, writes and
/// flushes are counted on both sides, histogram counts match the requests they time, and
/// once the load stops and the pair is in sync both say so.
#[test]
fn a_mirrored_pair_exports_its_metrics_under_load() {
    let _w = Watchdog::new("metrics of a mirrored pair", Duration::from_secs(180));
    let size = 64 * MIB;
    let p = Pair::new("metrics-pair", size);
    let (mp, mn) = (free_port(), free_port());
    let mut node = p.node_with(&AccessNodeOpts {
        extra_args: vec!["--metrics".into(), format!("127.0.0.1:{mn}")],
        ..AccessNodeOpts::default()
    });
    let mut opts = BackendOpts::mirrored(p.port, &p.secret);
    opts.kind = Some(BackendKind::VhostMirror);
    opts.extra_args
        .extend(["--metrics".to_owned(), format!("127.0.0.1:{mp}")]);
    let mut b = Backend::spawn(p.dir.path(), &p.primary, &opts);
    let (pimg, rimg) = (
        p.primary.display().to_string(),
        p.replica.display().to_string(),
    );
    wait_metrics(mp);
    wait_metrics(mn);
    wait_in_sync(&mut b, Duration::from_secs(30));

    let synced = scrape(mp, &pimg);
    // The initial full sync: every byte resynced, sent as data.
    assert_eq!(
        synced.get("vhost_mirror_resync_done_bytes_total", &[]),
        size as f64
    );
    assert!(synced.get("vhost_mirror_resync_sent_bytes_total", &[]) > 0.0);
    assert!(synced.get("vhost_mirror_bitmap_writes_total", &[]) >= 1.0);
    assert_eq!(
        synced.get("vhost_mirror_resync_rate_bytes_per_second", &[]),
        0.0,
        "no resync runs"
    );

    let load = Load::start(b.socket(), size);
    assert!(
        wait_until(TIMEOUT, || load.writes.load(Ordering::Relaxed) > 0),
        "the client wrote nothing"
    );
    let mut primary = Vec::new();
    let mut replica = Vec::new();
    for i in 0..6 {
        std::thread::sleep(Duration::from_millis(400));
        primary.push(scrape(mp, &pimg));
        replica.push(scrape(mn, &rimg));
        if i > 0 {
            assert_monotonic(&primary[i - 1], &primary[i], "primary");
            assert_monotonic(&replica[i - 1], &replica[i], "replica");
        }
    }
    let (writes, flushes) = load.finish();
    eprintln!("load: {writes} writes, {flushes} flushes");
    b.assert_running();
    node.assert_running();
    let w = |s: &Scrape| s.get("vhost_mirror_requests_total", &[("kind", "write")]);
    let fl = |s: &Scrape| s.get("vhost_mirror_requests_total", &[("kind", "flush")]);
    let (p0, pn) = (&primary[0], &primary[primary.len() - 1]);
    let (r0, rn) = (&replica[0], &replica[replica.len() - 1]);
    assert!(w(pn) > w(p0), "primary writes did not grow under load");
    assert!(w(rn) > w(r0), "replica writes did not grow under load");
    assert!(fl(pn) > fl(p0), "primary flushes did not grow under load");
    assert!(fl(rn) > fl(r0), "replica flushes did not grow under load");
    for (name, s) in [("primary", pn), ("replica", rn)] {
        assert!(
            s.get("vhost_mirror_link_received_bytes_total", &[]) > 0.0
                && s.get("vhost_mirror_link_sent_bytes_total", &[]) > 0.0,
            "{name}: no link bytes"
        );
        assert!(
            s.get("vhost_mirror_bytes_total", &[("kind", "written")]) > 0.0,
            "{name}"
        );
    }
    assert!(
        primary
            .iter()
            .any(|s| s.get("vhost_mirror_replica_ack_seconds_count", &[]) > 0.0),
        "no replica ack timed"
    );
    assert_eq!(p0.get("vhost_mirror_frontend_connected", &[]), 1.0);

    // Quiet and in sync: both sides say so, and every histogram counts what it times.
    wait_in_sync(&mut b, Duration::from_secs(30));
    let ps = scrape(mp, &pimg);
    let rs = scrape(mn, &rimg);
    assert_monotonic(pn, &ps, "primary");
    assert_monotonic(rn, &rs, "replica");
    let (pw, pf) = (w(&ps), fl(&ps));
    assert_eq!(pw, writes as f64, "primary write count vs the client's");
    assert_eq!(pf, flushes as f64, "primary flush count vs the client's");
    assert_eq!(ps.get("vhost_mirror_local_write_seconds_count", &[]), pw);
    assert_eq!(ps.get("vhost_mirror_flush_seconds_count", &[]), pf);
    // Every write is one chunk of at most 1 MiB: one ack each.
    assert_eq!(ps.get("vhost_mirror_replica_ack_seconds_count", &[]), pw);
    assert_eq!(ps.get("vhost_mirror_inflight_requests", &[]), 0.0);
    assert_eq!(ps.get("vhost_mirror_errors_total", &[]), 0.0);
    assert!(ps.get("vhost_mirror_activity_log_writes_total", &[]) >= 1.0);
    // The replica applied the guest's writes after the initial sync's (counted too).
    let rw = w(&rs);
    assert_eq!(rs.get("vhost_mirror_local_write_seconds_count", &[]), rw);
    assert!(
        rw >= pw,
        "replica applied {rw} writes, the primary sent {pw}"
    );
    let rf = rs.get("vhost_mirror_flush_seconds_count", &[]);
    assert!(
        rf >= 1.0 && rf <= fl(&rs),
        "replica fdatasyncs {rf} for {} flushes",
        fl(&rs)
    );
    assert_eq!(rs.get("vhost_mirror_errors_total", &[]), 0.0);
    for (s, role) in [(&ps, "primary"), (&rs, "secondary")] {
        assert_eq!(s.get("vhost_mirror_role", &[("role", role)]), 1.0);
        assert_eq!(
            s.get("vhost_mirror_peer_state", &[("state", "connected")]),
            1.0
        );
        assert_eq!(
            s.get("vhost_mirror_disk_state", &[("state", "up-to-date")]),
            1.0
        );
        assert_eq!(s.get("vhost_mirror_peer_outofsync_bytes", &[]), 0.0);
        assert_eq!(s.get("vhost_mirror_resync_active", &[]), 0.0);
        assert_eq!(s.get("vhost_mirror_capacity_bytes", &[]), size as f64);
    }
    assert_eq!(
        ps.get("vhost_mirror_peer_disk_state", &[("state", "up-to-date")]),
        1.0
    );
    assert_eq!(ps.get("vhost_mirror_frontend_connections_total", &[]), 1.0);
    // Both hold the same generation once in sync.
    let generation = |s: &Scrape| {
        s.families
            .iter()
            .find(|f| f.name == "vhost_mirror_generation_info")
            .and_then(|f| f.samples.first())
            .map(|x| x.labels["generation"].clone())
            .expect("generation_info")
    };
    assert_eq!(generation(&ps), generation(&rs));
    // Another path is not found, on both.
    for port in [mp, mn] {
        let (status, _) = http_get(port, "/").expect("404 answer");
        assert_eq!(status, "HTTP/1.0 404 Not Found");
    }
}

/// Whether the server closed `s` (EOF or reset) within `wait`.
fn closed_by_server(mut s: &TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).expect("timeout");
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// Sends `bytes` on a new connection, then reads the answer: its first line, or why none.
fn send_raw(port: u16, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    if let Err(e) = s.write_all(bytes) {
        return format!("write: {e}");
    }
    let mut raw = Vec::new();
    match s.read_to_end(&mut raw) {
        Ok(_) => String::from_utf8_lossy(&raw)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned(),
        Err(e) => format!("read: {e}"),
    }
}

/// What an attacker can send the unauthenticated endpoint: garbage, a 64 KiB request line,
/// 20 connections at once (answered or closed, never more than 8 held), a client that
/// trickles its request; after each the endpoint still answers a scrape.
#[test]
fn the_endpoint_survives_garbage_and_floods() {
    let _w = Watchdog::new("metrics endpoint abuse", Duration::from_secs(120));
    let dir = test_dir("metrics-abuse");
    let image = dir.path().join("disk.img");
    create_image(&image, 8 * MIB);
    let port = free_port();
    let mut b = Backend::spawn(
        dir.path(),
        &image,
        &BackendOpts {
            kind: Some(BackendKind::VhostMirror),
            extra_args: vec!["--metrics".into(), format!("127.0.0.1:{port}")],
            ..BackendOpts::default()
        },
    );
    let img = image.display().to_string();
    wait_metrics(port);
    let first = scrape(port, &img);
    // Not mirrored: no replication families.
    assert!(first
        .find("vhost_mirror_peer_outofsync_bytes", &[])
        .is_none());

    let answers: [(&[u8], &str); 5] = [
        (b"GET /nope HTTP/1.0\r\n\r\n", "HTTP/1.0 404 Not Found"),
        (
            b"POST /metrics HTTP/1.0\r\n\r\n",
            "HTTP/1.0 405 Method Not Allowed",
        ),
        (
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
            "HTTP/1.0 400 Bad Request",
        ),
        (
            b"GET /metrics HTTP/1.0 x\r\n\r\n",
            "HTTP/1.0 400 Bad Request",
        ),
        (b"\0\0\0\0\n\n", "HTTP/1.0 400 Bad Request"),
    ];
    for (req, want) in answers {
        assert_eq!(
            send_raw(port, req),
            want,
            "{:?}",
            String::from_utf8_lossy(req)
        );
        scrape(port, &img);
    }
    // A 64 KiB request line: 400, or a reset (the rest of it unread); then it answers.
    let mut long = b"GET /".to_vec();
    long.resize(64 << 10, b'a');
    long.extend_from_slice(b" HTTP/1.0\r\n\r\n");
    let r = send_raw(port, &long);
    assert!(
        r == "HTTP/1.0 400 Bad Request" || r.starts_with("read:") || r.starts_with("write:"),
        "{r}"
    );
    scrape(port, &img);
    // Garbage without an end, then the client goes away.
    {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.write_all(&[0xffu8; 3000]).expect("write");
    }
    scrape(port, &img);

    // 20 scrapes at once: each is answered or closed at once, none hangs.
    let barrier = Arc::new(Barrier::new(20));
    let threads: Vec<_> = (0..20)
        .map(|_| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let t = Instant::now();
                let r = http_get(port, "/metrics");
                (r.map(|(status, _)| status), t.elapsed())
            })
        })
        .collect();
    let mut served = 0;
    for t in threads {
        let (r, took) = t.join().expect("scraper");
        assert!(took < Duration::from_secs(3), "a scrape took {took:?}");
        if r.is_ok_and(|s| s == "HTTP/1.0 200 OK") {
            served += 1;
        }
    }
    assert!(served >= 1, "none of 20 simultaneous scrapes was served");
    eprintln!("{served} of 20 simultaneous scrapes served");
    scrape(port, &img);

    // 20 silent connections: 8 are held (until the request deadline), 12 closed at once.
    std::thread::sleep(Duration::from_millis(300));
    let idle: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let closed = idle
        .iter()
        .filter(|s| closed_by_server(s, Duration::from_millis(50)))
        .count();
    assert_eq!(closed, 12, "connections closed at once of 20 silent ones");
    drop(idle);
    // The slots come free when those clients go: it answers at once.
    let t = Instant::now();
    scrape(port, &img);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

    // A client trickling its request a byte at a time is cut off at the deadline (3 s).
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let t = Instant::now();
    let mut cut = false;
    while t.elapsed() < Duration::from_secs(8) {
        if s.write_all(b"G").is_err() || closed_by_server(&s, Duration::from_millis(200)) {
            cut = true;
            break;
        }
    }
    assert!(cut, "a trickling client was never cut off");
    assert!(
        t.elapsed() >= Duration::from_secs(2) && t.elapsed() < Duration::from_secs(6),
        "cut off after {:?}",
        t.elapsed()
    );
    let last = scrape(port, &img);
    assert_monotonic(&first, &last, "endpoint");
    b.assert_running();
}
