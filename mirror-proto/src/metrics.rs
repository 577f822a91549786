//! Prometheus metrics, shared by both servers' `--metrics ADDR`: latency histograms cheap
//! enough for the write path, the text exposition format (version 0.0.4) and a small HTTP/1.0
//! endpoint that serves it. What each server exports is in its own `metrics.rs`.
//!
//! The endpoint is unauthenticated (anyone who reaches ADDR reads the counters, the states and
//! the image path; nothing of the data), so it gives little to whoever connects: one thread per
//! connection and at most [`MAX_CONNECTIONS`] at once (more are closed at once); at most
//! [`MAX_REQUEST`] bytes of request read into a fixed buffer, within an absolute deadline
//! ([`REQUEST_TIMEOUT`] from `accept`, however the bytes trickle); nothing allocated or logged
//! from what the client sent; `GET /metrics` (or `HEAD`) answered, anything else 404, 405 or
//! 400, then the connection closes. Failures to listen or accept are logged rate-limited.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use crate::sys::RefusalLog;

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Most connections served at once; more are closed as soon as they are accepted.
pub const MAX_CONNECTIONS: usize = 8;
/// Most bytes of a request read (request line and headers); a longer one gets 400.
pub const MAX_REQUEST: usize = 8 * 1024;
/// A request must be complete this long after `accept` (an absolute deadline, not per read).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// How often listening on ADDR is tried again after it failed (address in use, not there yet).
pub const BIND_RETRY: Duration = Duration::from_secs(5);

/// The values of both servers' `vhost_mirror_disk_state{state=...}`: the disk states of the
/// protocol and `failed` (the primary's local I/O error, until a restart).
pub const DISK_STATES: [&str; 4] = ["up-to-date", "inconsistent", "outdated", "failed"];

// ------------------------------------------------------------------------------------------------
// Histograms
// ------------------------------------------------------------------------------------------------

/// Upper bounds of the latency histograms' buckets (Prometheus's `le`), from 50 us to 10 s;
/// the last bucket, `+Inf`, takes everything above.
pub const BUCKETS_NS: [u64; 17] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];
/// [`BUCKETS_NS`] in seconds, as the `le` label writes them.
const BUCKETS_LE: [&str; 17] = [
    "0.00005", "0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05",
    "0.1", "0.25", "0.5", "1", "2.5", "5", "10",
];
/// Buckets of a histogram: the finite ones and `+Inf`.
pub const NUM_BUCKETS: usize = BUCKETS_NS.len() + 1;

/// A latency histogram updated on the I/O path: one relaxed increment of a bucket and one of
/// the sum per observation, no lock. Each bucket counts only its own observations (not
/// cumulative: [`HistogramSnapshot`] sums them), so the count is the sum of the buckets and
/// `+Inf` always equals it, however a scrape interleaves with writers.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; NUM_BUCKETS],
    sum_ns: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = BUCKETS_NS
            .iter()
            .position(|&b| ns <= b)
            .unwrap_or(BUCKETS_NS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut s = HistogramSnapshot::default();
        for (to, from) in s.buckets.iter_mut().zip(&self.buckets) {
            *to = from.load(Ordering::Relaxed);
        }
        s.sum_ns = self.sum_ns.load(Ordering::Relaxed);
        s
    }
}

/// A histogram's values at one moment: per-bucket (not cumulative) counts and the sum.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HistogramSnapshot {
    pub buckets: [u64; NUM_BUCKETS],
    pub sum_ns: u64,
}

impl HistogramSnapshot {
    /// Observations in all.
    pub fn count(&self) -> u64 {
        self.buckets.iter().fold(0u64, |a, b| a.wrapping_add(*b))
    }

    /// Adds `other` (e.g. another queue's histogram of the same thing).
    pub fn merge(&mut self, other: &HistogramSnapshot) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a = a.wrapping_add(*b);
        }
        self.sum_ns = self.sum_ns.wrapping_add(other.sum_ns);
    }
}

// ------------------------------------------------------------------------------------------------
// The text format
// ------------------------------------------------------------------------------------------------

/// A metric family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A document in the text exposition format, written one family at a time: each family gets
/// its `# HELP` and `# TYPE` lines, then its samples, each with the common labels (e.g. the
/// image) first. Names are the caller's constants (checked in debug builds); label values
/// and help texts are escaped.
#[derive(Debug)]
pub struct Exposition {
    out: String,
    /// The common labels, rendered (`image="..."`), without braces.
    common: String,
}

impl Exposition {
    /// `common`: labels every sample carries, e.g. `[("image", "/var/lib/vm0.raw")]`.
    pub fn new(common: &[(&str, &str)]) -> Self {
        let mut c = String::new();
        for (k, v) in common {
            push_label(&mut c, k, v);
        }
        Exposition {
            out: String::with_capacity(8 * 1024),
            common: c,
        }
    }

    fn family(&mut self, name: &str, kind: Kind, help: &str) {
        debug_assert!(is_metric_name(name), "bad metric name {name:?}");
        self.out.push_str("# HELP ");
        self.out.push_str(name);
        self.out.push(' ');
        for c in help.chars() {
            match c {
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                c => self.out.push(c),
            }
        }
        self.out.push_str("\n# TYPE ");
        self.out.push_str(name);
        self.out.push(' ');
        self.out.push_str(kind.as_str());
        self.out.push('\n');
    }

    /// `name{common,labels} value`.
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: Value) {
        self.out.push_str(name);
        if !self.common.is_empty() || !labels.is_empty() {
            self.out.push('{');
            self.out.push_str(&self.common);
            for (k, v) in labels {
                push_label(&mut self.out, k, v);
            }
            self.out.push('}');
        }
        self.out.push(' ');
        match value {
            Value::Int(v) => {
                let _ = write!(self.out, "{v}");
            }
            Value::Float(v) => push_float(&mut self.out, v),
        }
        self.out.push('\n');
    }

    /// A counter with one sample.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.family(name, Kind::Counter, help);
        self.sample(name, &[], Value::Int(value));
    }

    /// A counter with one sample per value of `label` (e.g. `kind`).
    pub fn counters(&mut self, name: &str, help: &str, label: &str, values: &[(&str, u64)]) {
        self.family(name, Kind::Counter, help);
        for (v, n) in values {
            self.sample(name, &[(label, v)], Value::Int(*n));
        }
    }

    /// A gauge with one sample.
    pub fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.family(name, Kind::Gauge, help);
        self.sample(name, &[], Value::Float(value));
    }

    /// A gauge with one integer sample.
    pub fn gauge_int(&mut self, name: &str, help: &str, value: u64) {
        self.family(name, Kind::Gauge, help);
        self.sample(name, &[], Value::Int(value));
    }

    /// An enumeration as drbd-reactor writes one: a sample per state, 1 for the current one
    /// (if any) and 0 for the others.
    pub fn states(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        all: &[&str],
        current: Option<&str>,
    ) {
        self.family(name, Kind::Gauge, help);
        for s in all {
            let v = u64::from(Some(*s) == current);
            self.sample(name, &[(label, s)], Value::Int(v));
        }
    }

    /// An info metric: one sample of value 1 whose labels carry the information.
    pub fn info(&mut self, name: &str, help: &str, labels: &[(&str, &str)]) {
        self.family(name, Kind::Gauge, help);
        self.sample(name, labels, Value::Int(1));
    }

    /// A histogram in seconds: cumulative `_bucket`s up to `+Inf` (which equals `_count`),
    /// `_sum` and `_count`.
    pub fn histogram(&mut self, name: &str, help: &str, h: &HistogramSnapshot) {
        self.family(name, Kind::Histogram, help);
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0u64;
        for (i, n) in h.buckets.iter().enumerate() {
            cumulative = cumulative.wrapping_add(*n);
            let le = BUCKETS_LE.get(i).copied().unwrap_or("+Inf");
            self.sample(&bucket, &[("le", le)], Value::Int(cumulative));
        }
        self.sample(
            &format!("{name}_sum"),
            &[],
            Value::Float(h.sum_ns as f64 / 1e9),
        );
        self.sample(&format!("{name}_count"), &[], Value::Int(cumulative));
    }

    pub fn finish(self) -> String {
        self.out
    }
}

enum Value {
    Int(u64),
    Float(f64),
}

/// Appends `,key="value"` (no comma first if `out` is empty), the value escaped.
fn push_label(out: &mut String, key: &str, value: &str) {
    debug_assert!(is_label_name(key), "bad label name {key:?}");
    if !out.is_empty() && !out.ends_with('{') {
        out.push(',');
    }
    out.push_str(key);
    out.push_str("=\"");
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A float as the format spells it (`NaN`, `+Inf`, `-Inf`, or a plain decimal).
fn push_float(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else {
        let _ = write!(out, "{v}");
    }
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`
pub fn is_metric_name(s: &str) -> bool {
    let mut b = s.bytes();
    b.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_' || c == b':')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b':')
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`
pub fn is_label_name(s: &str) -> bool {
    let mut b = s.bytes();
    b.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

// ------------------------------------------------------------------------------------------------
// The HTTP endpoint
// ------------------------------------------------------------------------------------------------

/// Renders the whole document (called once per `GET /metrics`, on the connection's thread).
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// What a connection may take; [`Limits::default`] is the served one (tests shorten it).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: MAX_CONNECTIONS,
            timeout: REQUEST_TIMEOUT,
        }
    }
}

/// Serves `GET /metrics` on `addr` from a thread of its own, until the process exits. If `addr`
/// cannot be listened on now, says so (once) and tries again every [`BIND_RETRY`]: the server
/// it belongs to keeps serving meanwhile. Err only if the thread cannot be started.
pub fn spawn(addr: SocketAddr, render: Render) -> io::Result<()> {
    let first = match TcpListener::bind(addr) {
        Ok(l) => Some(l),
        Err(e) => {
            warn!(
                "metrics: cannot listen on {addr}: {e}; trying again every {} s (not logged again)",
                BIND_RETRY.as_secs()
            );
            None
        }
    };
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            let listener = match first {
                Some(l) => l,
                None => loop {
                    std::thread::sleep(BIND_RETRY);
                    if let Ok(l) = TcpListener::bind(addr) {
                        break l;
                    }
                },
            };
            serve(listener, render, Limits::default());
        })
        .map(|_| ())
}

/// Accepts connections on `listener` until the process exits; each served on a thread of its
/// own, at most `limits.max_connections` at once.
pub fn serve(listener: TcpListener, render: Render, limits: Limits) {
    match listener.local_addr() {
        Ok(a) => info!("metrics: serving http://{a}/metrics"),
        Err(e) => warn!("metrics: listening, address unknown: {e}"),
    }
    let live = Arc::new(AtomicUsize::new(0));
    let mut accept_log = RefusalLog::new("metrics endpoint");
    let mut busy_log = RefusalLog::new("metrics endpoint");
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                if let Some(more) = accept_log.tick(Instant::now()) {
                    warn!("metrics: accept failed: {e} ({more} more since the last message)");
                }
                // Out of descriptors, say: do not spin.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if live.fetch_add(1, Ordering::AcqRel) >= limits.max_connections {
            live.fetch_sub(1, Ordering::AcqRel);
            if let Some(more) = busy_log.tick(Instant::now()) {
                warn!(
                    "metrics: {} connections open: one more closed ({more} more since the last \
                     message)",
                    limits.max_connections
                );
            }
            drop(stream);
            continue;
        }
        let slot = Slot(live.clone());
        let render = render.clone();
        let spawned = std::thread::Builder::new()
            .name("metrics-conn".into())
            .stack_size(256 << 10)
            .spawn(move || {
                let _slot = slot;
                if let Err(e) = handle(stream, &render, limits.timeout) {
                    debug!("metrics connection: {e}");
                }
            });
        // On failure the closure (and its slot) was dropped: the count is right again.
        if let Err(e) = spawned {
            if let Some(more) = accept_log.tick(Instant::now()) {
                warn!("metrics: cannot start a thread: {e} ({more} more since the last message)");
            }
        }
    }
}

/// One connection's place in the count; given back when dropped.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a request asks for, as far as this endpoint cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// `GET /metrics` (`head`: without the body).
    Metrics {
        head: bool,
    },
    NotFound,
    MethodNotAllowed,
    BadRequest,
}

/// Reads one request (at most [`MAX_REQUEST`] bytes, until `timeout` after the call) and
/// answers it.
fn handle(mut stream: TcpStream, render: &Render, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    stream.set_write_timeout(Some(timeout))?;
    let mut buf = [0u8; MAX_REQUEST];
    let mut n = 0;
    let route = loop {
        if let Some(end) = header_end(&buf[..n]) {
            break route_of(&buf[..end]);
        }
        if n == buf.len() {
            break Route::BadRequest;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf[n..]) {
            // Closed before the request was complete: nobody to answer.
            Ok(0) => return Ok(()),
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    };
    let (status, body) = match route {
        Route::Metrics { .. } => ("200 OK", render()),
        Route::NotFound => ("404 Not Found", "not found: try /metrics\n".to_owned()),
        Route::MethodNotAllowed => ("405 Method Not Allowed", "GET or HEAD only\n".to_owned()),
        Route::BadRequest => ("400 Bad Request", "bad request\n".to_owned()),
    };
    let allow = if route == Route::MethodNotAllowed {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    let head = format!(
        "HTTP/1.0 {status}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}\
         Connection: close\r\n\r\n",
        if matches!(route, Route::Metrics { .. }) {
            CONTENT_TYPE
        } else {
            "text/plain; charset=utf-8"
        },
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    if route != (Route::Metrics { head: true }) {
        stream.write_all(body.as_bytes())?;
    }
    stream.flush()?;
    let _ = stream.shutdown(Shutdown::Write);
    Ok(())
}

/// The length of the request line and headers up to their blank line, if it is in `buf`.
fn header_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The route of a complete request head (request line, headers, blank line): by its request
/// line `METHOD TARGET HTTP/1.x` alone.
fn route_of(head: &[u8]) -> Route {
    let line = head.split(|&c| c == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.split(|&c| c == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if method.is_empty() || target.is_empty() || !version.starts_with(b"HTTP/1.") {
        return Route::BadRequest;
    }
    if !target.starts_with(b"/") || target.iter().any(|c| c.is_ascii_control()) {
        return Route::BadRequest;
    }
    let head = match method {
        b"GET" => false,
        b"HEAD" => true,
        _ => return Route::MethodNotAllowed,
    };
    let path = target.split(|&c| c == b'?').next().unwrap_or_default();
    if path == b"/metrics" {
        Route::Metrics { head }
    } else {
        Route::NotFound
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut e = Exposition::new(&[("image", "/a \"b\"\\c\nd")]);
        e.counter("x_total", "back\\slash\nnew line \"quoted\"", 3);
        let t = e.finish();
        assert_eq!(
            t,
            "# HELP x_total back\\\\slash\\nnew line \"quoted\"\n\
             # TYPE x_total counter\n\
             x_total{image=\"/a \\\"b\\\"\\\\c\\nd\"} 3\n"
        );
    }

    #[test]
    fn samples_without_labels_have_no_braces() {
        let mut e = Exposition::new(&[]);
        e.gauge("g", "a gauge", 0.5);
        e.counters("r_total", "by kind", "kind", &[("read", 1), ("write", 2)]);
        let t = e.finish();
        assert!(t.contains("\ng 0.5\n"), "{t}");
        assert!(
            t.contains("r_total{kind=\"read\"} 1\nr_total{kind=\"write\"} 2\n"),
            "{t}"
        );
    }

    #[test]
    fn floats_are_spelled_as_the_format_wants() {
        let mut s = String::new();
        for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 1.5, 0.0, 1e-7] {
            push_float(&mut s, v);
            s.push(' ');
        }
        assert_eq!(s, "NaN +Inf -Inf 1.5 0 0.0000001 ");
    }

    #[test]
    fn states_mark_only_the_current_one() {
        let mut e = Exposition::new(&[("image", "i")]);
        e.states("s", "h", "state", &["a", "b", "c"], Some("b"));
        e.states("t", "h", "state", &["a"], None);
        let t = e.finish();
        assert!(t.contains("s{image=\"i\",state=\"a\"} 0\n"), "{t}");
        assert!(t.contains("s{image=\"i\",state=\"b\"} 1\n"), "{t}");
        assert!(t.contains("s{image=\"i\",state=\"c\"} 0\n"), "{t}");
        assert!(t.contains("t{image=\"i\",state=\"a\"} 0\n"), "{t}");
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_inf_equals_count() {
        let h = Histogram::default();
        let us = Duration::from_micros;
        // On a bound: that bucket (le is "less or equal").
        h.record(us(50));
        h.record(us(10));
        h.record(us(51));
        h.record(Duration::from_millis(3));
        h.record(Duration::from_secs(10));
        h.record(Duration::from_secs(11));
        h.record(Duration::MAX);
        let s = h.snapshot();
        assert_eq!(s.count(), 7);
        assert_eq!(s.buckets[0], 2);
        assert_eq!(s.buckets[1], 1);
        assert_eq!(s.buckets[BUCKETS_NS.len() - 1], 1);
        assert_eq!(s.buckets[BUCKETS_NS.len()], 2);
        let mut e = Exposition::new(&[("image", "i")]);
        e.histogram("lat_seconds", "latency", &s);
        let t = e.finish();
        let mut last = 0;
        let mut buckets = 0;
        for l in t.lines().filter(|l| l.starts_with("lat_seconds_bucket")) {
            let v: u64 = l.rsplit(' ').next().unwrap().parse().unwrap();
            assert!(v >= last, "not cumulative: {t}");
            last = v;
            buckets += 1;
        }
        assert_eq!(buckets, NUM_BUCKETS);
        assert!(
            t.contains("lat_seconds_bucket{image=\"i\",le=\"0.00005\"} 2\n"),
            "{t}"
        );
        assert!(
            t.contains("lat_seconds_bucket{image=\"i\",le=\"0.0001\"} 3\n"),
            "{t}"
        );
        assert!(
            t.contains("lat_seconds_bucket{image=\"i\",le=\"0.005\"} 4\n"),
            "{t}"
        );
        assert!(
            t.contains("lat_seconds_bucket{image=\"i\",le=\"10\"} 5\n"),
            "{t}"
        );
        assert!(
            t.contains("lat_seconds_bucket{image=\"i\",le=\"+Inf\"} 7\n"),
            "{t}"
        );
        assert!(t.contains("lat_seconds_count{image=\"i\"} 7\n"), "{t}");
        assert!(t.contains("# TYPE lat_seconds histogram\n"), "{t}");
        // The sum wraps rather than panics (Duration::MAX saturated to u64::MAX ns).
        assert!(t.contains("lat_seconds_sum{image=\"i\"} "), "{t}");
    }

    #[test]
    fn bucket_bounds_match_their_labels() {
        for (ns, le) in BUCKETS_NS.iter().zip(BUCKETS_LE) {
            let secs: f64 = le.parse().unwrap();
            assert!(((*ns as f64) / 1e9 - secs).abs() < 1e-12, "{ns} vs {le}");
        }
        assert!(BUCKETS_NS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn merged_snapshots_add_up() {
        let (a, b) = (Histogram::default(), Histogram::default());
        a.record(Duration::from_micros(1));
        b.record(Duration::from_micros(1));
        b.record(Duration::from_secs(1));
        let mut s = a.snapshot();
        s.merge(&b.snapshot());
        assert_eq!(s.count(), 3);
        assert_eq!(s.buckets[0], 2);
        assert_eq!(s.sum_ns, 1_000_002_000);
    }

    #[test]
    fn disk_states_cover_the_protocols() {
        for d in crate::frame::DiskState::ALL {
            assert!(DISK_STATES.contains(&d.as_str()), "{d:?}");
        }
    }

    #[test]
    fn names_are_checked() {
        assert!(is_metric_name("vhost_mirror_role"));
        assert!(is_metric_name("a:b_c9"));
        assert!(!is_metric_name("9a"));
        assert!(!is_metric_name("a-b"));
        assert!(!is_metric_name(""));
        assert!(is_label_name("le"));
        assert!(!is_label_name("a:b"));
    }

    #[test]
    fn requests_are_routed_by_their_request_line() {
        let r = |s: &str| route_of(s.as_bytes());
        assert_eq!(
            r("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics { head: false }
        );
        assert_eq!(
            r("GET /metrics?x=1 HTTP/1.0\n\n"),
            Route::Metrics { head: false }
        );
        assert_eq!(
            r("HEAD /metrics HTTP/1.0\r\n\r\n"),
            Route::Metrics { head: true }
        );
        assert_eq!(r("GET / HTTP/1.0\r\n\r\n"), Route::NotFound);
        assert_eq!(r("GET /metricsx HTTP/1.0\r\n\r\n"), Route::NotFound);
        assert_eq!(r("POST /metrics HTTP/1.0\r\n\r\n"), Route::MethodNotAllowed);
        assert_eq!(r("GET /metrics\r\n\r\n"), Route::BadRequest);
        assert_eq!(r("GET  /metrics HTTP/1.0\r\n\r\n"), Route::BadRequest);
        assert_eq!(r("GET /metrics HTTP/2\r\n\r\n"), Route::BadRequest);
        assert_eq!(r("GET metrics HTTP/1.0\r\n\r\n"), Route::BadRequest);
        assert_eq!(r("\u{0}\u{1}\u{2}\n\n"), Route::BadRequest);
        assert_eq!(route_of(&[0xff; 100]), Route::BadRequest);
        assert_eq!(header_end(b"GET / HTTP/1.0\r\n\r\nrest"), Some(18));
        assert_eq!(header_end(b"GET / HTTP/1.0\n\n"), Some(16));
        assert_eq!(header_end(b"GET / HTTP/1.0\r\n"), None);
    }

    /// A server on a free loopback port with short limits; its address.
    fn server(limits: Limits) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        let render: Render = Arc::new(|| {
            let mut e = Exposition::new(&[("image", "t")]);
            e.counter("t_total", "a counter", 1);
            e.finish()
        });
        std::thread::spawn(move || serve(l, render, limits));
        a
    }

    /// Sends `req` and reads the whole answer (an error, e.g. a reset, as its text).
    fn ask(a: SocketAddr, req: &[u8]) -> String {
        let mut s = TcpStream::connect(a).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        if let Err(e) = s.write_all(req) {
            return format!("write: {e}");
        }
        let mut out = Vec::new();
        match s.read_to_end(&mut out) {
            Ok(_) => String::from_utf8_lossy(&out).into_owned(),
            Err(e) => format!("read: {e}"),
        }
    }

    #[test]
    fn the_endpoint_answers_and_survives_garbage() {
        let a = server(Limits {
            max_connections: 4,
            timeout: Duration::from_millis(500),
        });
        let ok = ask(a, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.0 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains(&format!("Content-Type: {CONTENT_TYPE}\r\n")),
            "{ok}"
        );
        assert!(ok.ends_with("t_total{image=\"t\"} 1\n"), "{ok}");
        let head = ask(a, b"HEAD /metrics HTTP/1.0\r\n\r\n");
        assert!(
            head.starts_with("HTTP/1.0 200 OK\r\n") && head.ends_with("\r\n\r\n"),
            "{head}"
        );
        assert!(ask(a, b"GET /nope HTTP/1.0\r\n\r\n").starts_with("HTTP/1.0 404 "));
        let post = ask(a, b"PUT /metrics HTTP/1.0\r\n\r\n");
        assert!(
            post.starts_with("HTTP/1.0 405 ") && post.contains("Allow: GET, HEAD"),
            "{post}"
        );
        assert!(ask(a, b"\x16\x03\x01garbage\r\n\r\n").starts_with("HTTP/1.0 400 "));
        // A request line longer than the buffer: 400 (or a reset, the rest being unread).
        let mut long = b"GET /".to_vec();
        long.resize(64 << 10, b'a');
        let r = ask(a, &long);
        assert!(
            r.starts_with("HTTP/1.0 400 ") || r.contains("reset") || r.contains("pipe"),
            "{r}"
        );
        // Silent clients hold every slot (once the threads of the requests above are gone):
        // one more is closed at once; once the deadline cut them off, the endpoint answers
        // again.
        std::thread::sleep(Duration::from_millis(200));
        let idle: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(a).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(100));
        let r = ask(a, b"GET /metrics HTTP/1.0\r\n\r\n");
        assert!(
            !r.starts_with("HTTP/1.0 200"),
            "a fifth connection was served: {r}"
        );
        std::thread::sleep(Duration::from_millis(700));
        for mut s in idle {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut b = [0u8; 16];
            assert!(
                matches!(s.read(&mut b), Ok(0) | Err(_)),
                "idle connection kept"
            );
        }
        let ok = ask(a, b"GET /metrics HTTP/1.0\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.0 200 OK\r\n"), "{ok}");
    }

    #[test]
    fn a_trickling_client_is_cut_off_at_the_deadline() {
        let a = server(Limits {
            max_connections: 2,
            timeout: Duration::from_millis(300),
        });
        let mut s = TcpStream::connect(a).unwrap();
        let t0 = Instant::now();
        let mut cut = false;
        for _ in 0..50 {
            if s.write_all(b"G").is_err() {
                cut = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut b = [0u8; 16];
        cut = cut || matches!(s.read(&mut b), Ok(0) | Err(_));
        assert!(cut, "a client sending a byte every 50 ms was never cut off");
        assert!(t0.elapsed() < Duration::from_secs(4));
    }
}
