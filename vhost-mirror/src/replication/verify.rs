//! Online verify: compares the image with the replica by block hashes while the guest runs,
//! without false positives.
//!
//! Each span (4 MiB) is taken in the ordering table first, as a write would be: every guest
//! write to it that was sent has been acknowledged (so the replica applied it), and none is in
//! flight until the span is given back. Then the replica is asked for its hashes (ReadHashes,
//! applied after every request sent before it) and the local span is read and hashed. Equal
//! hashes mean equal bytes at that moment; a difference is real. Differing blocks are marked
//! out of sync, which the connected link's manager resyncs at once like any marked region (the
//! primary's data wins; only the blocks that differ travel); `--repair` waits for that resync
//! to finish. The last result is kept in `IMG.verify` (JSON) across restarts.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{info, warn};
use mirror_proto::bitmap::REGION_SIZE;
use mirror_proto::blockhash::{self, HASH_BLOCK, MAX_HASH_SPAN};
use mirror_proto::frame::{AckStatus, Frame};
use serde_json::{json, Value};
use thiserror::Error;

use super::inflight::{Owner, Token};
use super::link::{Link, Reply};
use super::Mirror;
use crate::disk::DiskError;

/// The ordering table's owner for verify's spans.
pub const VERIFY: Owner = usize::MAX - 1;
/// Bytes compared per step (one ReadHashes).
const SPAN: u64 = MAX_HASH_SPAN as u64;
/// Threads reading and hashing this side's spans.
const LOCAL_WORKERS: usize = 2;
/// Spans held and asked of the replica at once, at most: the replica reads two at a time
/// (access-node's hash workers) while this side hashes a third.
const IN_FLIGHT: usize = 4;
/// Differing ranges listed in a result (all are counted and marked).
const MAX_LISTED: usize = 64;

#[derive(Debug, Error)]
pub enum VerifyError {
    #[error("no replica configured (--peer)")]
    NoPeer,
    #[error("the replica is not connected")]
    NotConnected,
    #[error("the replica is not in sync ({0} bytes out of sync): verify compares an in-sync pair")]
    NotInSync(u64),
    #[error("a verify is running already")]
    Running,
    #[error("the replica's access-node does not answer block hashes (upgrade it)")]
    NoHashes,
    #[error(
        "the range {offset}+{length} is not inside the {size}-byte image, or not 4 KiB aligned"
    )]
    BadRange { offset: u64, length: u64, size: u64 },
    #[error("the link to the replica went down during the verify")]
    LinkDown,
    #[error("the replica answered {0:?}")]
    Replica(AckStatus),
    #[error("the replica sent {got} bytes of hashes for {want}")]
    BadHashes { got: usize, want: usize },
    #[error("cannot read the local image")]
    Read(#[source] DiskError),
    #[error("cannot mark the differing blocks out of sync")]
    Mark(#[source] super::MirrorError),
    #[error("shutting down")]
    ShuttingDown,
    #[error("a thread hashing the local image failed (a bug: see the log)")]
    HashWorkerDied,
    #[error("cannot start a thread to hash the local image")]
    Thread(#[source] std::io::Error),
    #[error(
        "part of the range was marked out of sync during the verify (a write failed on one side)"
    )]
    MarkedMeanwhile,
}

/// What to verify.
#[derive(Debug, Clone, Copy)]
pub struct VerifyRequest {
    pub offset: u64,
    /// 0: to the end of the image.
    pub length: u64,
    /// Bytes per second (None: as fast as it goes).
    pub rate: Option<u64>,
    pub repair: bool,
}

impl VerifyRequest {
    /// Parses the control command's arguments: `key=value` words (`offset`, `length`,
    /// `rate_mib`, `repair=1`).
    pub fn parse(args: &str) -> Result<VerifyRequest, String> {
        let mut r = VerifyRequest {
            offset: 0,
            length: 0,
            rate: None,
            repair: false,
        };
        for w in args.split_whitespace() {
            let (k, v) = w
                .split_once('=')
                .ok_or_else(|| format!("argument {w:?} is not key=value"))?;
            let n: u64 = v
                .parse()
                .map_err(|_| format!("argument {k}: {v:?} is not a number"))?;
            match k {
                "offset" => r.offset = n,
                "length" => r.length = n,
                "rate_mib" if n > 0 => r.rate = Some(n.saturating_mul(1 << 20)),
                "rate_mib" => return Err("rate_mib must be at least 1".into()),
                "repair" => r.repair = n != 0,
                _ => return Err(format!("unknown argument {k:?}")),
            }
        }
        Ok(r)
    }
}

/// Progress of the running verify, for status.
#[derive(Debug, Default)]
pub struct Progress {
    pub running: std::sync::atomic::AtomicBool,
    pub done: std::sync::atomic::AtomicU64,
    pub total: std::sync::atomic::AtomicU64,
}

/// Where the last result is kept.
pub fn result_path(image: &Path) -> PathBuf {
    mirror_proto::files::with_suffix(image, ".verify")
}

/// The last result kept beside the image (None if there is none or it is unreadable).
pub fn load_last(image: &Path) -> Option<Value> {
    let bytes = mirror_proto::files::read(&result_path(image)).ok()?;
    if bytes.len() > 64 * 1024 {
        return None;
    }
    serde_json::from_slice(&bytes).ok()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Runs a verify to its end; the result document (also kept as the last result).
pub fn run(m: &Arc<Mirror>, req: VerifyRequest) -> Result<Value, VerifyError> {
    if m.cfg.peer.is_none() {
        return Err(VerifyError::NoPeer);
    }
    if m.verify.running.swap(true, Ordering::AcqRel) {
        return Err(VerifyError::Running);
    }
    // Cleared however run_locked ends, a panic included: else every later verify is refused.
    struct Running<'a>(&'a std::sync::atomic::AtomicBool);
    impl Drop for Running<'_> {
        fn drop(&mut self) {
            self.0.store(false, Ordering::Release);
        }
    }
    let _running = Running(&m.verify.running);
    run_locked(m, req)
}

fn run_locked(m: &Arc<Mirror>, req: VerifyRequest) -> Result<Value, VerifyError> {
    let size = m.disk.size();
    let end = if req.length == 0 {
        size
    } else {
        req.offset.saturating_add(req.length)
    };
    let block = HASH_BLOCK as u64;
    if req.offset >= size && size > 0
        || end > size
        || !req.offset.is_multiple_of(block)
        || (!end.is_multiple_of(block) && end != size)
    {
        return Err(VerifyError::BadRange {
            offset: req.offset,
            length: req.length,
            size,
        });
    }
    let link = m.current_link().ok_or(VerifyError::NotConnected)?;
    if !link.is_alive() {
        return Err(VerifyError::NotConnected);
    }
    if !m.status_lock().peer_hashes {
        return Err(VerifyError::NoHashes);
    }
    let oos = m.sync_state().out_of_sync_bytes();
    if oos > 0 {
        return Err(VerifyError::NotInSync(oos));
    }
    let started = Instant::now();
    let started_at = now_secs();
    m.verify.total.store(end - req.offset, Ordering::Relaxed);
    m.verify.done.store(0, Ordering::Relaxed);
    info!(
        "verify of {}..{end} against {} starting{}",
        req.offset,
        m.peer_name(),
        if req.repair { " (repair)" } else { "" }
    );
    let mut diffs: Vec<(u64, u64)> = Vec::new();
    let mut diff_bytes = 0u64;
    let result = std::thread::scope(|scope| {
        let mut local = Local::start(m, scope)?;
        compare_spans(
            m,
            &link,
            req,
            end,
            started,
            &mut local,
            &mut diffs,
            &mut diff_bytes,
        )
    });
    // Marked out of sync (durably) before anyone hears of them, also when the run stops
    // early. As regions that may differ anywhere (`SyncState::mark`, not the write path's
    // `mark_known`): a difference behind a clear bit means the bit was wrong, and blocks of
    // the region outside a partial range were never compared, so the resync compares the
    // whole region by hash.
    for &(o, l) in &diffs {
        m.sync_state()
            .mark(o, l)
            .map_err(|e| VerifyError::Mark(super::MirrorError::Record(e)))?;
    }
    if let Err(e) = result {
        if !diffs.is_empty() {
            warn!(
                "verify stopped ({}); {diff_bytes} bytes found different before that are \
                 marked out of sync",
                mirror_proto::sys::error_chain(&e)
            );
        }
        return Err(e);
    }
    let secs = started.elapsed().as_secs_f64();
    let compared = end - req.offset;
    let repaired = if req.repair && !diffs.is_empty() {
        m.notify_changed();
        wait_repaired(m, &link)
    } else {
        diffs.is_empty()
    };
    let result = json!({
        "started": started_at,
        "finished": now_secs(),
        "secs": secs,
        "offset": req.offset,
        "length": compared,
        "bytes_compared": compared,
        "mib_per_sec": compared as f64 / secs.max(1e-9) / (1u64 << 20) as f64,
        "differences": diffs.len(),
        "different_bytes": diff_bytes,
        "ranges": diffs.iter().take(MAX_LISTED).map(|&(o, l)| json!([o, l])).collect::<Vec<_>>(),
        "ranges_listed_max": MAX_LISTED,
        "repair": req.repair,
        "repaired": repaired,
    });
    if diffs.is_empty() {
        info!(
            "verify finished: {compared} bytes identical on both sides ({:.0} MiB/s)",
            compared as f64 / secs.max(1e-9) / (1u64 << 20) as f64
        );
    } else {
        warn!(
            "verify finished: {diff_bytes} bytes in {} ranges differ on the replica (first at \
             offset {}); marked out of sync{}",
            diffs.len(),
            diffs[0].0,
            if repaired {
                " and resynced"
            } else {
                "; the resync copies them"
            }
        );
    }
    if let Err(e) =
        mirror_proto::files::replace(&result_path(&m.cfg.image), result.to_string().as_bytes())
    {
        warn!(
            "cannot keep the verify result in {}: {e}",
            result_path(&m.cfg.image).display()
        );
    }
    *m.verify_last.lock().unwrap_or_else(|p| p.into_inner()) = Some(result.clone());
    Ok(result)
}

/// Compares `req.offset..end` span by span, adding what differs to `diffs` (image offsets,
/// adjacent ones merged) and `diff_bytes`; every span it held is given back when it returns.
#[allow(clippy::too_many_arguments)]
fn compare_spans(
    m: &Mirror,
    link: &Arc<Link>,
    req: VerifyRequest,
    end: u64,
    started: Instant,
    local: &mut Local,
    diffs: &mut Vec<(u64, u64)>,
    diff_bytes: &mut u64,
) -> Result<(), VerifyError> {
    // IN_FLIGHT spans in flight: the replica reads and hashes the next ones while this side
    // reads and hashes its own (`Local`). Only the first is waited for; the others are taken
    // only if free (never wait while holding one).
    let mut pending: std::collections::VecDeque<Span> = std::collections::VecDeque::new();
    let mut next = req.offset;
    let result = 'run: loop {
        if m.stopping.load(Ordering::Relaxed) {
            break Err(VerifyError::ShuttingDown);
        }
        while pending.len() < IN_FLIGHT && next < end {
            let len = SPAN.min(end - next);
            match start_span(m, link, local, next, len, pending.is_empty()) {
                Ok(Some(sp)) => {
                    pending.push_back(sp);
                    next += len;
                }
                Ok(None) => break,
                Err(e) => break 'run Err(e),
            }
        }
        let Some(sp) = pending.pop_front() else {
            break Ok(());
        };
        let (at, len) = (sp.at, sp.len);
        let runs = match finish_span(m, sp, local) {
            Ok(runs) => runs,
            Err(e) => break Err(e),
        };
        for (o, l) in runs {
            *diff_bytes += l;
            match diffs.last_mut() {
                Some(d) if d.0 + d.1 == o => d.1 += l,
                _ => diffs.push((o, l)),
            }
        }
        let done = at + len;
        m.verify.done.fetch_add(len, Ordering::Relaxed);
        if let Some(rate) = req.rate {
            let due = Duration::from_secs_f64((done - req.offset) as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                // Nothing held while pausing: guest writes to the next span need not wait.
                // (Their local hashes, if still coming, are dropped: `Local::wait`.)
                for sp in pending.drain(..) {
                    next = next.min(sp.at);
                    m.release(sp.token);
                }
                std::thread::sleep(wait);
            }
        }
    };
    for sp in pending.drain(..) {
        m.release(sp.token);
    }
    result
}

/// A local read and hash of a held span.
struct LocalJob {
    id: u64,
    at: u64,
    len: u64,
}

type LocalResult = (u64, Result<Vec<u8>, VerifyError>);

/// This side's reads and hashes of the held spans, on [`LOCAL_WORKERS`] threads. Each span's
/// is asked for once it is held, and waited for before it is given back, so every read
/// happens while the span is held.
struct Local {
    jobs: mpsc::Sender<LocalJob>,
    results: mpsc::Receiver<LocalResult>,
    /// Results that came before they were waited for.
    early: std::collections::HashMap<u64, Result<Vec<u8>, VerifyError>>,
    next_id: u64,
}

impl Local {
    /// Starts the workers in `scope`; they end once the `Local` is dropped.
    fn start<'s>(
        m: &'s Mirror,
        scope: &'s std::thread::Scope<'s, '_>,
    ) -> Result<Local, VerifyError> {
        let (jobs, queue) = mpsc::channel::<LocalJob>();
        let (done, results) = mpsc::channel();
        let queue = Arc::new(Mutex::new(queue));
        for _ in 0..LOCAL_WORKERS {
            let (queue, done) = (queue.clone(), done.clone());
            std::thread::Builder::new()
                .name("verify-hash".into())
                .spawn_scoped(scope, move || {
                    contained(|| local_worker(m, &queue, &done));
                })
                .map_err(VerifyError::Thread)?;
        }
        Ok(Local {
            jobs,
            results,
            early: std::collections::HashMap::new(),
            next_id: 0,
        })
    }

    /// Asks for the hashes of `at..at + len` (held); the id to wait for.
    fn ask(&mut self, at: u64, len: u64) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        // (A send fails only if every worker ended; `wait` then says so.)
        let _ = self.jobs.send(LocalJob { id, at, len });
        id
    }

    /// The hashes asked for as `id`.
    fn wait(&mut self, id: u64) -> Result<Vec<u8>, VerifyError> {
        let results = &self.results;
        match take_in_order(&mut self.early, id, || results.recv().ok()) {
            Some(r) => r,
            // Every worker's sender is gone: they all ended, and only a panic ends one early.
            None => Err(VerifyError::HashWorkerDied),
        }
    }
}

/// The result for `id` among those `recv` delivers (in any order), keeping the ones that
/// come early in `early`. Ids are waited for in increasing order: results of smaller ids that
/// are not waited for (spans given back before they were compared) are dropped. None once
/// `recv` has nothing more.
fn take_in_order<T>(
    early: &mut std::collections::HashMap<u64, T>,
    id: u64,
    mut recv: impl FnMut() -> Option<(u64, T)>,
) -> Option<T> {
    early.retain(|&k, _| k >= id);
    if let Some(r) = early.remove(&id) {
        return Some(r);
    }
    loop {
        let (k, r) = recv()?;
        if k == id {
            return Some(r);
        }
        if k > id {
            early.insert(k, r);
        }
    }
}

/// Runs `f`, stopping a panic there: a scoped thread that panicked would make the whole scope
/// panic when it ends (and verify's results would be lost with it). The panic is printed by
/// the panic hook as usual; a worker's job is answered by its [`Answer`].
fn contained(f: impl FnOnce()) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
}

fn local_worker(
    m: &Mirror,
    queue: &Mutex<mpsc::Receiver<LocalJob>>,
    done: &mpsc::Sender<LocalResult>,
) {
    // Page-aligned: the copy out of the page cache into it costs a fifth (`AlignedBuf`).
    let mut buf = mirror_proto::sys::AlignedBuf::default();
    loop {
        let job = match queue.lock().unwrap_or_else(PoisonError::into_inner).recv() {
            Ok(j) => j,
            Err(_) => return,
        };
        // A panic below still answers the job, or `Local::wait` would wait for it forever
        // while verify holds its spans (and the guest's writes to them wait too).
        let mut answer = Answer {
            id: job.id,
            done,
            sent: false,
        };
        let data = buf.get(job.len as usize);
        let r = m
            .disk
            .read_at(data, job.at)
            .map(|()| {
                let mut h = Vec::new();
                blockhash::hash_blocks(data, &mut h);
                h
            })
            .map_err(VerifyError::Read);
        if !answer.send(r) {
            return;
        }
    }
}

/// A local job's answer, sent once: with the result, or (dropped unsent, in a panic) with
/// [`VerifyError::HashWorkerDied`].
struct Answer<'a> {
    id: u64,
    done: &'a mpsc::Sender<LocalResult>,
    sent: bool,
}

impl Answer<'_> {
    /// Whether the waiting side still listens.
    fn send(&mut self, r: Result<Vec<u8>, VerifyError>) -> bool {
        self.sent = true;
        self.done.send((self.id, r)).is_ok()
    }
}

impl Drop for Answer<'_> {
    fn drop(&mut self) {
        if !self.sent {
            log::error!("verify: a local hash worker panicked (job {})", self.id);
            let _ = self.done.send((self.id, Err(VerifyError::HashWorkerDied)));
        }
    }
}

/// Waits until the link's manager resynced what verify marked (nothing out of sync, no resync
/// running), as long as the link lives: whether it did.
fn wait_repaired(m: &Mirror, link: &Link) -> bool {
    loop {
        if !link.is_alive() || m.stopping.load(Ordering::Relaxed) {
            return false;
        }
        let clear = m.sync_state().bitmap.is_clear();
        if clear && !m.status_lock().resyncing {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Takes the span in the ordering table (waiting for guest writes to it to complete), as long
/// as the link verify started on lives.
fn reserve(m: &Mirror, link: &Arc<Link>, at: u64, len: u64) -> Result<Token, VerifyError> {
    let t = m
        .reserve_while_alive(VERIFY, link, at, len)
        .ok_or(VerifyError::LinkDown)?;
    if !link.is_alive() || !m.current_link().is_some_and(|l| Arc::ptr_eq(&l, link)) {
        m.release(t);
        return Err(VerifyError::LinkDown);
    }
    Ok(t)
}

/// A span held in the ordering table whose hashes were asked of the replica.
struct Span {
    at: u64,
    len: u64,
    token: Token,
    theirs: Arc<super::link::Waiter>,
    /// Its local hashes' id (`Local`).
    mine: u64,
}

/// Takes a span in the ordering table (waiting for it if `wait`; else None if it is taken)
/// and asks the replica for its hashes.
fn start_span(
    m: &Mirror,
    link: &Arc<Link>,
    local: &mut Local,
    at: u64,
    len: u64,
    wait: bool,
) -> Result<Option<Span>, VerifyError> {
    let token = if wait {
        reserve(m, link, at, len)?
    } else {
        match m.try_reserve(VERIFY, at, len) {
            Some(t) => t,
            None => return Ok(None),
        }
    };
    // A region marked out of sync meanwhile (a write that failed on one side) differs for a
    // known reason, and the link that failed it is gone: the comparison stops.
    let marked = {
        let s = m.sync_state();
        s.bitmap
            .next_run(at / REGION_SIZE, 1)
            .is_some_and(|(r, _)| r * REGION_SIZE < at + len)
    };
    if marked {
        m.release(token);
        return Err(VerifyError::MarkedMeanwhile);
    }
    match link.send(Frame::ReadHashes {
        offset: at,
        len: len as u32,
    }) {
        Ok(theirs) => Ok(Some(Span {
            at,
            len,
            token,
            theirs,
            mine: local.ask(at, len),
        })),
        Err(_) => {
            m.release(token);
            Err(VerifyError::LinkDown)
        }
    }
}

/// Waits for both sides' hashes of the span, compares them, gives the span back; the
/// differing ranges (image offsets).
fn finish_span(m: &Mirror, sp: Span, local: &mut Local) -> Result<Vec<(u64, u64)>, VerifyError> {
    let r = (|| {
        let mine = local.wait(sp.mine)?;
        let theirs = match sp.theirs.wait() {
            Ok(Reply::Data(d)) => d,
            Ok(Reply::Ack(s)) => return Err(VerifyError::Replica(s)),
            Err(_) => return Err(VerifyError::LinkDown),
        };
        if theirs.len() != mine.len() {
            return Err(VerifyError::BadHashes {
                got: theirs.len(),
                want: mine.len(),
            });
        }
        Ok(blockhash::differing_runs(&mine, &theirs, sp.len as usize)
            .into_iter()
            .map(|(o, l)| (sp.at + o as u64, l as u64))
            .collect())
    })();
    m.release(sp.token);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_whose_worker_panics_is_answered_with_an_error() {
        let (done, results) = mpsc::channel::<LocalResult>();
        // As in `Local`: a scoped worker that panics holding a job, another sender alive (so
        // `recv` alone would block for good). The scope must end normally.
        std::thread::scope(|scope| {
            let d = &done;
            std::thread::Builder::new()
                .spawn_scoped(scope, move || {
                    contained(|| {
                        let _answer = Answer {
                            id: 7,
                            done: d,
                            sent: false,
                        };
                        panic!("a bug in hashing");
                    })
                })
                .expect("spawn");
        });
        let mut early = std::collections::HashMap::new();
        let got = take_in_order(&mut early, 7, || {
            results.recv_timeout(Duration::from_secs(10)).ok()
        });
        assert!(
            matches!(got, Some(Err(VerifyError::HashWorkerDied))),
            "{got:?}"
        );
        // A job answered normally sends nothing more when its answer is dropped.
        {
            let mut a = Answer {
                id: 8,
                done: &done,
                sent: false,
            };
            assert!(a.send(Ok(vec![1])));
        }
        assert!(matches!(results.recv(), Ok((8, Ok(_)))));
        assert!(results.try_recv().is_err());
    }

    #[test]
    fn local_results_are_taken_in_order_whatever_order_they_come_in() {
        let mut early = std::collections::HashMap::new();
        // 1 and 2 come before 0; 0 is taken, 1 and 2 wait.
        let mut arrivals = vec![(2u64, "two"), (1, "one"), (0, "zero")].into_iter();
        assert_eq!(
            take_in_order(&mut early, 0, || arrivals.next()),
            Some("zero")
        );
        assert_eq!(early.len(), 2);
        assert_eq!(take_in_order(&mut early, 1, || None), Some("one"));
        assert_eq!(take_in_order(&mut early, 2, || None), Some("two"));
        // 3 and 4 were given back uncompared: their results are dropped on the way to 5.
        let mut arrivals = vec![(4u64, "four"), (3, "three"), (5, "five")].into_iter();
        assert_eq!(
            take_in_order(&mut early, 5, || arrivals.next()),
            Some("five")
        );
        assert!(early.is_empty());
        // A late result of a dropped id is not kept either; nothing more: None.
        let mut arrivals = vec![(4u64, "four")].into_iter();
        assert_eq!(take_in_order(&mut early, 6, || arrivals.next()), None);
        assert!(early.is_empty());
    }

    #[test]
    fn arguments_parse_and_bad_ones_are_refused() {
        let r = VerifyRequest::parse("offset=4096 length=8192 rate_mib=10 repair=1").unwrap();
        assert_eq!(
            (r.offset, r.length, r.rate, r.repair),
            (4096, 8192, Some(10 << 20), true)
        );
        let r = VerifyRequest::parse("").unwrap();
        assert_eq!((r.offset, r.length, r.rate, r.repair), (0, 0, None, false));
        for bad in ["offset", "offset=x", "speed=1", "rate_mib=0", "length=-1"] {
            assert!(VerifyRequest::parse(bad).is_err(), "{bad}");
        }
    }
}
