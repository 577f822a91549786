//! What `access-node status` shows: the replica's state, the link to the primary and request
//! counters. Updated by the session and the replica, read by the control socket thread; no
//! lock is shared with the data path except a short one around the few non-numeric fields.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use mirror_proto::frame::{DiskState, Role};
use mirror_proto::metrics::Histogram;
use serde_json::{json, Value};

pub use mirror_proto::control::PeerState;

/// Request counters (one primary at a time, so plain atomics).
#[derive(Debug, Default)]
pub struct Counters {
    pub writes: AtomicU64,
    pub reads: AtomicU64,
    pub flushes: AtomicU64,
    /// `fdatasync`s started early, after a write and before a Flush asked (`flusher.rs`).
    pub early_flushes: AtomicU64,
    pub discards: AtomicU64,
    pub write_zeroes: AtomicU64,
    pub bytes_written: AtomicU64,
    pub bytes_read: AtomicU64,
    /// Bytes of the image hashed for the primary (checksum resync, verify).
    pub bytes_hashed: AtomicU64,
    /// Requests answered with anything but Ack Ok / ReadData.
    pub errors: AtomicU64,
    /// Total time spent applying Writes, for the average latency.
    pub write_nanos: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub cache_bytes: AtomicU64,
    pub out_of_sync_bytes: AtomicU64,
    pub resync_done_bytes: AtomicU64,
    pub resyncing: AtomicBool,
    /// Applying each Write (its `pwrite`), for the metrics.
    pub local_write: Histogram,
    /// Each `fdatasync` of the flusher, answering a batch of Flushes.
    pub flush: Histogram,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone)]
struct Disk {
    role: Role,
    disk_state: DiskState,
    generation: u64,
    capacity: u64,
}

#[derive(Debug, Clone)]
struct Peer {
    /// The attached primary, if any.
    attached: Option<SocketAddr>,
    /// Outcome of the most recent connection when none is attached.
    last: PeerState,
    reason: Option<String>,
    /// Generation in the Attach of the latest primary that got that far.
    generation: Option<u64>,
    /// The latest primary that attached.
    last_primary: Option<SocketAddr>,
    /// How the latest attached primary refused this node, if it did (a primary retries every
    /// few seconds: the same refusal is logged once).
    refusal: Option<(PeerState, String)>,
}

#[derive(Debug)]
pub struct Status {
    image: PathBuf,
    cache_capacity: u64,
    pub counters: Counters,
    disk: Mutex<Disk>,
    peer: Mutex<Peer>,
    epoch: Instant,
    /// When a frame last came from an attached primary: nanoseconds since `epoch`, plus 1
    /// (0: never). Updated on the data path, hence an atomic.
    last_activity: AtomicU64,
    /// Primaries attached so far.
    attaches: AtomicU64,
    /// Connections that never authenticated, and the latest one's address and reason (kept
    /// apart from the peer state: anyone can connect).
    handshake_failures: AtomicU64,
    last_handshake_failure: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Status {
    pub fn new(image: PathBuf, cache_capacity: u64) -> Self {
        Status {
            image,
            cache_capacity,
            counters: Counters::default(),
            disk: Mutex::new(Disk {
                role: Role::Secondary,
                disk_state: DiskState::Inconsistent,
                generation: 0,
                capacity: 0,
            }),
            peer: Mutex::new(Peer {
                attached: None,
                last: PeerState::Disconnected,
                reason: None,
                generation: None,
                last_primary: None,
                refusal: None,
            }),
            epoch: Instant::now(),
            last_activity: AtomicU64::new(0),
            attaches: AtomicU64::new(0),
            handshake_failures: AtomicU64::new(0),
            last_handshake_failure: Mutex::new(None),
        }
    }

    /// Publishes the replica's recorded state.
    pub fn set_disk(&self, role: Role, disk_state: DiskState, generation: u64, capacity: u64) {
        *lock(&self.disk) = Disk {
            role,
            disk_state,
            generation,
            capacity,
        };
    }

    pub fn image(&self) -> &Path {
        &self.image
    }

    /// A primary attached. Resync figures of an earlier connection no longer mean anything:
    /// the new primary announces its own with SyncStart.
    pub fn attached(&self, peer: SocketAddr) {
        let mut p = lock(&self.peer);
        p.attached = Some(peer);
        p.last_primary = Some(peer);
        p.last = PeerState::Connected;
        p.reason = None;
        self.primary_activity();
        self.attaches.fetch_add(1, Ordering::AcqRel);
        let c = &self.counters;
        c.out_of_sync_bytes.store(0, Ordering::Relaxed);
        c.resync_done_bytes.store(0, Ordering::Relaxed);
        c.resyncing.store(false, Ordering::Relaxed);
    }

    /// The attached primary went away; `reason` is None for a clean detach.
    pub fn detached(&self, reason: Option<String>) {
        let mut p = lock(&self.peer);
        p.attached = None;
        p.last = PeerState::Disconnected;
        p.reason = reason;
        p.refusal = None;
        let c = &self.counters;
        c.resyncing.store(false, Ordering::Relaxed);
    }

    /// The attached primary refused this node (split brain, ...) and left. Returns false if
    /// the previous primary to attach had refused it in the same words.
    pub fn refused_by_primary(&self, state: PeerState, reason: String) -> bool {
        let mut p = lock(&self.peer);
        p.attached = None;
        p.last = state;
        p.reason = Some(reason.clone());
        let refusal = Some((state, reason));
        let new = p.refusal != refusal;
        p.refusal = refusal;
        self.counters.resyncing.store(false, Ordering::Relaxed);
        new
    }

    /// A connection attempt ended without attaching (wrong secret, refused, ...).
    pub fn attempt_failed(&self, state: PeerState, reason: String) {
        let mut p = lock(&self.peer);
        p.last = state;
        p.reason = Some(reason);
    }

    /// A connection did not authenticate (wrong secret, garbage, too slow, ...).
    pub fn handshake_failed(&self, what: String) {
        self.handshake_failures.fetch_add(1, Ordering::Relaxed);
        *lock(&self.last_handshake_failure) = Some(mirror_proto::control::escape_controls(&what));
    }

    /// A connecting primary announced its generation (in Attach).
    pub fn primary_generation(&self, generation: u64) {
        lock(&self.peer).generation = Some(generation);
    }

    /// A frame came from the attached primary.
    pub fn primary_activity(&self) {
        let n = self
            .epoch
            .elapsed()
            .as_nanos()
            .min(u128::from(u64::MAX - 1)) as u64;
        self.last_activity.store(n + 1, Ordering::Relaxed);
    }

    /// How long ago a frame came from a primary (None: no primary attached yet).
    pub fn primary_idle(&self) -> Option<Duration> {
        match self.last_activity.load(Ordering::Relaxed) {
            0 => None,
            n => Some(
                self.epoch
                    .elapsed()
                    .saturating_sub(Duration::from_nanos(n - 1)),
            ),
        }
    }

    /// Primaries attached so far.
    pub fn attaches(&self) -> u64 {
        self.attaches.load(Ordering::Acquire)
    }

    /// The latest primary that attached.
    pub fn last_primary(&self) -> Option<SocketAddr> {
        lock(&self.peer).last_primary
    }

    pub fn sync_started(&self, bytes: u64) {
        let c = &self.counters;
        c.out_of_sync_bytes.store(bytes, Ordering::Relaxed);
        c.resync_done_bytes.store(0, Ordering::Relaxed);
        c.resyncing.store(true, Ordering::Relaxed);
    }

    pub fn resync_progress(&self, bytes: u64) {
        let c = &self.counters;
        Counters::add(&c.resync_done_bytes, bytes);
        // Only this thread updates it; load + store is enough.
        let left = c.out_of_sync_bytes.load(Ordering::Relaxed);
        c.out_of_sync_bytes
            .store(left.saturating_sub(bytes), Ordering::Relaxed);
    }

    pub fn sync_done(&self) {
        let c = &self.counters;
        c.out_of_sync_bytes.store(0, Ordering::Relaxed);
        c.resyncing.store(false, Ordering::Relaxed);
    }

    /// The replica's role, disk state, generation and size, as last published.
    pub fn disk(&self) -> (Role, DiskState, u64, u64) {
        let d = lock(&self.disk);
        (d.role, d.disk_state, d.generation, d.capacity)
    }

    /// The link to the primary: connected while one is attached, else how the last
    /// connection ended.
    pub fn peer_state(&self) -> PeerState {
        let p = lock(&self.peer);
        match p.attached {
            Some(_) => PeerState::Connected,
            None => p.last,
        }
    }

    /// Connections that never authenticated.
    pub fn handshake_failures(&self) -> u64 {
        self.handshake_failures.load(Ordering::Relaxed)
    }

    /// The status document (JSON keys are a contract, see the README).
    pub fn to_json(&self) -> Value {
        let d = lock(&self.disk).clone();
        let p = lock(&self.peer).clone();
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (peer_state, peer_reason, peer) = match p.attached {
            Some(a) => (PeerState::Connected, None, Some(a.to_string())),
            None => (p.last, p.reason, None),
        };
        let writes = l(&c.writes);
        let latency_us = l(&c.write_nanos).checked_div(writes).unwrap_or(0) / 1000;
        json!({
            "role": d.role.as_str(),
            "disk_state": d.disk_state.as_str(),
            "peer_state": peer_state.as_str(),
            "peer_reason": peer_reason,
            "peer": peer,
            "out_of_sync_bytes": l(&c.out_of_sync_bytes),
            "resync_done_bytes": l(&c.resync_done_bytes),
            "resyncing": c.resyncing.load(Ordering::Relaxed),
            "generation": d.generation,
            "peer_generation": p.generation,
            "last_primary_activity_secs_ago": self.primary_idle().map(|d| d.as_secs()),
            "link_write_latency_us": latency_us,
            "bytes_sent": l(&c.bytes_sent),
            "bytes_received": l(&c.bytes_received),
            "image": self.image.display().to_string(),
            "capacity_bytes": d.capacity,
            "writes": writes,
            "reads": l(&c.reads),
            "flushes": l(&c.flushes),
            "early_fdatasyncs": l(&c.early_flushes),
            "discards": l(&c.discards),
            "write_zeroes": l(&c.write_zeroes),
            "bytes_written": l(&c.bytes_written),
            "bytes_read": l(&c.bytes_read),
            "bytes_hashed": l(&c.bytes_hashed),
            "errors": l(&c.errors),
            "cache_hits": l(&c.cache_hits),
            "cache_misses": l(&c.cache_misses),
            "cache_bytes": l(&c.cache_bytes),
            "cache_capacity_bytes": self.cache_capacity,
            "handshake_failures": self.handshake_failures.load(Ordering::Relaxed),
            "last_handshake_failure": lock(&self.last_handshake_failure).clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_has_every_contract_key() {
        let s = Status::new("/x/r.img".into(), 1 << 20);
        let v = s.to_json();
        for k in [
            "role",
            "disk_state",
            "peer_state",
            "peer_reason",
            "peer",
            "out_of_sync_bytes",
            "resync_done_bytes",
            "resyncing",
            "generation",
            "peer_generation",
            "last_primary_activity_secs_ago",
            "link_write_latency_us",
            "bytes_sent",
            "bytes_received",
            "image",
            "capacity_bytes",
            "writes",
            "reads",
            "flushes",
            "early_fdatasyncs",
            "discards",
            "write_zeroes",
            "bytes_written",
            "bytes_read",
            "bytes_hashed",
            "errors",
            "cache_hits",
            "cache_misses",
            "cache_bytes",
            "cache_capacity_bytes",
        ] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
        assert_eq!(v["role"], "secondary");
        assert_eq!(v["disk_state"], "inconsistent");
        assert_eq!(v["peer_state"], "disconnected");
        assert_eq!(v["peer"], Value::Null);
        assert_eq!(v["peer_reason"], Value::Null);
        assert_eq!(v["peer_generation"], Value::Null);
        assert_eq!(v["last_primary_activity_secs_ago"], Value::Null);
        assert_eq!(v["image"], "/x/r.img");
        assert_eq!(v["cache_capacity_bytes"], 1 << 20);
        // The table renderer understands it.
        let t = mirror_proto::control::render_table(&v);
        assert!(t.contains("secondary") && t.contains("disconnected"), "{t}");
    }

    #[test]
    fn peer_states() {
        let s = Status::new("i".into(), 0);
        let a: SocketAddr = "127.0.0.1:5".parse().unwrap();
        s.attempt_failed(PeerState::AuthFailed, "wrong secret".into());
        assert_eq!(s.to_json()["peer_state"], "auth-failed");
        assert_eq!(s.to_json()["peer_reason"], "wrong secret");
        s.attached(a);
        // A refused second primary does not hide the attached one.
        s.attempt_failed(PeerState::Refused, "busy".into());
        let v = s.to_json();
        assert_eq!(v["peer_state"], "connected");
        assert_eq!(v["peer"], "127.0.0.1:5");
        assert_eq!(v["peer_reason"], Value::Null);
        s.detached(None);
        let v = s.to_json();
        assert_eq!(v["peer_state"], "disconnected");
        assert_eq!(v["peer"], Value::Null);
        s.primary_generation(0xabc);
        s.attached(a);
        assert!(s.refused_by_primary(PeerState::SplitBrain, "both wrote".into()));
        s.attached(a);
        assert!(!s.refused_by_primary(PeerState::SplitBrain, "both wrote".into()));
        let v = s.to_json();
        assert_eq!(v["peer_state"], "split-brain");
        assert_eq!(v["peer_generation"], 0xabc);
        assert_eq!(s.last_primary(), Some(a));
        let t = mirror_proto::control::render_table(&v);
        assert!(
            t.contains("split-brain") && t.contains("peer generation"),
            "{t}"
        );
    }

    #[test]
    fn primary_activity_is_tracked_from_the_first_attach() {
        let s = Status::new("i".into(), 0);
        assert_eq!((s.primary_idle(), s.attaches()), (None, 0));
        s.attached("127.0.0.1:5".parse().unwrap());
        assert_eq!(s.attaches(), 1);
        assert!(s.primary_idle().unwrap() < Duration::from_secs(1));
        assert_eq!(s.to_json()["last_primary_activity_secs_ago"], 0);
        s.detached(None);
        assert!(
            s.primary_idle().is_some(),
            "still counts after the primary left"
        );
    }

    #[test]
    fn resync_progress_and_latency() {
        let s = Status::new("i".into(), 0);
        s.sync_started(1000);
        s.resync_progress(300);
        s.resync_progress(900);
        let v = s.to_json();
        assert_eq!(v["resync_done_bytes"], 1200);
        assert_eq!(v["out_of_sync_bytes"], 0);
        assert_eq!(v["resyncing"], true);
        s.sync_done();
        assert_eq!(s.to_json()["resyncing"], false);
        Counters::add(&s.counters.writes, 2);
        Counters::add(&s.counters.write_nanos, 10_000);
        assert_eq!(s.to_json()["link_write_latency_us"], 5);
        s.set_disk(Role::Secondary, DiskState::UpToDate, 77, 4096);
        let v = s.to_json();
        assert_eq!(v["disk_state"], "up-to-date");
        assert_eq!(v["generation"], 77);
        assert_eq!(v["capacity_bytes"], 4096);
    }
}
