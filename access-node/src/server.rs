//! `access-node serve`: opens the replica, listens for the primary, runs one thread per
//! connection with at most one primary attached at a time, answers the control socket, and
//! shuts down cleanly on SIGTERM/SIGINT, or after a promotion (`promote` on the control
//! socket: fence the primary, promote the image, reply, exit 0).

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use log::{debug, error, info, warn};
use mirror_proto::auth::Secret;
use mirror_proto::control::{self, AfterReply, Handler};
use serde_json::{json, Value};
use thiserror::Error;

use crate::chain;
use crate::config::ServeConfig;
use crate::preauth::{Admission, RateLimitedLog, MAX_PREAUTH, REAP_INTERVAL};
use crate::replica::{Replica, ReplicaError, WitnessCfg};
use crate::session;
use crate::status::Status;
use crate::watchdog;

/// Most connection threads at once (a safety net: `preauth.rs` keeps the unauthenticated
/// ones to [`MAX_PREAUTH`]; an authenticated connection is attached or refused at once).
pub const MAX_CONNECTIONS: usize = 2 * MAX_PREAUTH + 16;

#[derive(Debug, Error)]
pub enum ServeError {
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("control socket")]
    Socket(#[from] mirror_proto::sys::SocketPathError),
    #[error("cannot start a thread")]
    Thread(#[source] io::Error),
    #[error("cannot set up signal handling")]
    Signals(#[source] io::Error),
}

/// Why the slot cannot be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimError {
    /// Another primary holds it.
    Busy(SocketAddr),
    /// This node was promoted: no primary any more.
    Fenced,
}

/// Locks a mutex, also after a panic in another thread (the data stays usable: every
/// operation on it is complete or returned an error).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug)]
struct Holder {
    peer: SocketAddr,
    /// A clone of the connection, to cut it off when the node is promoted.
    stream: TcpStream,
}

/// The one place a primary can be attached.
#[derive(Debug, Default)]
pub struct Slot {
    holder: Mutex<Option<Holder>>,
    /// Set by a promotion: the slot is never taken again.
    fenced: AtomicBool,
}

/// Holds the slot; releases it when dropped.
#[derive(Debug)]
pub struct SlotGuard<'a> {
    slot: &'a Slot,
}

impl Slot {
    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    /// Takes the slot for `peer` (`stream`: a clone of its connection), or says why not.
    pub fn try_claim(
        &self,
        peer: SocketAddr,
        stream: TcpStream,
    ) -> Result<SlotGuard<'_>, ClaimError> {
        let mut h = lock(&self.holder);
        // Checked under the lock: either `fence` sees this holder, or this sees the fence.
        if self.is_fenced() {
            return Err(ClaimError::Fenced);
        }
        match &*h {
            Some(other) => Err(ClaimError::Busy(other.peer)),
            None => {
                *h = Some(Holder { peer, stream });
                Ok(SlotGuard { slot: self })
            }
        }
    }

    /// Cuts off the primary holding the slot (its session ends at its next read); who it was.
    pub fn cut(&self) -> Option<SocketAddr> {
        let h = lock(&self.holder);
        let h = h.as_ref()?;
        if let Err(e) = h.stream.shutdown(Shutdown::Both) {
            debug!("cutting off {}: {e}", h.peer);
        }
        Some(h.peer)
    }

    /// Refuses every primary from now on and cuts off the one holding the slot (its session
    /// ends at its next read); returns who that was.
    pub fn fence(&self) -> Option<SocketAddr> {
        let h = lock(&self.holder);
        self.fenced.store(true, Ordering::Release);
        let h = h.as_ref()?;
        if let Err(e) = h.stream.shutdown(Shutdown::Both) {
            debug!("cutting off {}: {e}", h.peer);
        }
        Some(h.peer)
    }
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        *lock(&self.slot.holder) = None;
    }
}

/// Everything the connection threads share.
#[derive(Debug)]
pub struct Node {
    pub replica: Mutex<Replica>,
    pub status: Arc<Status>,
    pub secret: Secret,
    pub slot: Slot,
    /// Absolute deadline for a connection to authenticate.
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    /// The connection cap and the unauthenticated connections (`preauth.rs`).
    pub admission: Admission,
    /// NoiseInits accepted so far (a captured one cannot be replayed).
    pub replays: mirror_proto::secure::ReplayGuard,
    /// Connections that failed to authenticate (anyone can cause these: rate-limited).
    pub handshake_log: RateLimitedLog,
    /// Set (and signalled) when the server should stop: after a promotion.
    stop: (Mutex<bool>, Condvar),
    /// Held by a session's flusher during an `fdatasync` and, if it fails, while the image is
    /// recorded outdated; a promotion takes it first (lock order: `flush_gate`, `replica`).
    pub flush_gate: Mutex<()>,
    /// `--witness`: whose consent a promotion needs.
    pub witness: Option<WitnessCfg>,
}

impl Node {
    /// Tells [`Server::serve`] to return.
    pub fn request_stop(&self) {
        *lock(&self.stop.0) = true;
        self.stop.1.notify_all();
    }

    fn wait_stop(&self) {
        let mut stopped = lock(&self.stop.0);
        while !*stopped {
            stopped = self
                .stop
                .1
                .wait(stopped)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Cuts off the attached primary if no whole frame came from it for the idle timeout
    /// (its session's reads may be kept busy by a record trickled a byte at a time, which a
    /// per-read timeout never sees).
    fn cut_idle_primary(&self) {
        if let Some(idle) = self.status.primary_idle() {
            // A request being applied, or a Flush's long fdatasync, is not idleness: the
            // replica lock (a request) or `flush_gate` (a Flush) is held during it.
            if idle > self.idle_timeout + REAP_INTERVAL
                && self.replica.try_lock().is_ok()
                && self.flush_gate.try_lock().is_ok()
            {
                if let Some(peer) = self.slot.cut() {
                    warn!(
                        "primary {peer}: no whole frame for {} s: cut off",
                        idle.as_secs()
                    );
                }
            }
        }
    }

    /// Promotes the replica (the `promote` control command): fences the attached primary and
    /// any later one, promotes the image and lets go of it. The caller stops the server once
    /// the reply is out.
    pub fn promote(&self, force: bool) -> Result<Value, ReplicaError> {
        // The replica lock waits for the request being applied; none starts while it is held.
        // A running flush first: its outcome (the image outdated if it failed) decides.
        let _gate = lock(&self.flush_gate);
        let mut replica = lock(&self.replica);
        let p = replica.promote_with(force, self.witness.as_ref())?;
        let cut = self.slot.fence();
        // The client waits for the lock on this path: make it independent of our directory.
        let path = replica.path();
        let image = std::fs::canonicalize(path)
            .unwrap_or_else(|_| path.to_owned())
            .display()
            .to_string();
        drop(replica);
        let cut = match cut {
            Some(peer) => format!("{peer} cut off"),
            None => "none attached".to_owned(),
        };
        if p.already_primary {
            info!(
                "promote: already primary (generation {:016x}); old primary fenced ({cut}); \
                 image {image} released",
                p.generation
            );
        } else {
            if p.forced {
                warn!("promoting {image} by force: its data was not up to date");
            }
            if p.unverified {
                warn!("{UNVERIFIED}");
            }
            info!(
                "promoted: generation {:016x} -> {:016x}; old primary fenced ({cut}); \
                 image {image} released",
                p.previous_generation, p.generation
            );
        }
        Ok(json!({
            "promoted": true,
            "generation": p.generation,
            "previous_generation": p.previous_generation,
            "already_primary": p.already_primary,
            "forced": p.forced,
            "unverified": p.unverified,
            "image": image,
        }))
    }
}

/// What a promotion without a witness says.
pub const UNVERIFIED: &str = "promoted without a witness: nothing proves the old primary \
    stopped acknowledging writes when it lost this replica; if it was not shut down cleanly, \
    writes it acknowledged since are not in this image";

/// A bound, not yet serving, server.
pub struct Server {
    listener: TcpListener,
    node: Arc<Node>,
    control: Option<PathBuf>,
}

impl Server {
    /// Opens (and locks) the replica, binds the TCP listener and the control socket, starts
    /// the --on-primary-loss watchdog.
    pub fn bind(config: ServeConfig) -> Result<Self, ServeError> {
        let status = Arc::new(Status::new(config.image.clone(), config.cache_bytes));
        let mut replica = Replica::open(&config.image, config.cache_bytes, status.clone())?;
        if config.discard_my_data {
            replica.set_discard_my_data(true);
            warn!(
                "--discard-my-data: this node's own changes may be overwritten by the primary \
                 (full sync) until a resync finishes"
            );
        }
        let listener = TcpListener::bind(config.listen).map_err(|source| ServeError::Listen {
            addr: config.listen,
            source,
        })?;
        defer_accept(&listener, config.handshake_timeout.as_secs());
        let control_listener = match &config.control {
            Some(p) => Some(mirror_proto::sys::listen_unix(p, &config.socket_access)?),
            None => None,
        };
        let info = replica.node_info();
        if info.size == 0 {
            info!(
                "replica image {} does not exist yet; it is created when a primary attaches",
                config.image.display()
            );
        } else {
            info!(
                "replica image {} ({} bytes, generation {:016x}, {})",
                config.image.display(),
                info.size,
                info.generation,
                info.disk_state.as_str()
            );
            match replica.hot_extents() {
                Ok(hot) if !hot.is_empty() => warn!(
                    "{} lists {} hot extent(s): this image belonged to a primary that stopped \
                     uncleanly; the next primary resyncs them",
                    mirror_proto::activity_log::al_path(&config.image).display(),
                    hot.len()
                ),
                Ok(_) => {}
                Err(e) => warn!("{}", chain(&e)),
            }
        }
        let node = Arc::new(Node {
            replica: Mutex::new(replica),
            status: status.clone(),
            secret: config.secret,
            slot: Slot::default(),
            handshake_timeout: config.handshake_timeout,
            idle_timeout: config.idle_timeout,
            admission: Admission::new(MAX_CONNECTIONS),
            replays: Default::default(),
            handshake_log: RateLimitedLog::new("handshakes"),
            stop: (Mutex::new(false), Condvar::new()),
            flush_gate: Mutex::new(()),
            witness: config.witness,
        });
        if let Some(addr) = config.metrics {
            let st = status.clone();
            let render: mirror_proto::metrics::Render =
                Arc::new(move || crate::metrics::render(&st));
            mirror_proto::metrics::spawn(addr, render).map_err(ServeError::Thread)?;
        }
        if let Some(l) = control_listener {
            let n = node.clone();
            let f: Handler = Arc::new(move |cmd| match cmd {
                "status" => status.to_json(),
                "promote" | "promote force" => {
                    n.promote(cmd == "promote force").unwrap_or_else(|e| {
                        let msg = chain(&e);
                        warn!("promote refused: {msg}");
                        json!({ "error": msg })
                    })
                }
                other => json!({ "error": format!("unknown command {other:?}") }),
            });
            let n = node.clone();
            // The process stops only once the client has its answer.
            let after: AfterReply = Arc::new(move |_, reply| {
                if reply.get("promoted").and_then(Value::as_bool) == Some(true) {
                    n.request_stop();
                }
            });
            control::spawn_server_then(l, config.socket_access, f, after)
                .map_err(ServeError::Thread)?;
        }
        if let Some(pl) = config.primary_loss {
            watchdog::spawn(node.clone(), pl, config.control.clone())
                .map_err(ServeError::Thread)?;
        }
        Ok(Server {
            listener,
            node,
            control: config.control,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until the node is promoted, then removes the control socket (the process exits
    /// on a signal).
    pub fn serve(self) -> Result<(), ServeError> {
        let node = self.node.clone();
        let control = self.control.clone();
        let n = node.clone();
        std::thread::Builder::new()
            .name("handshake-reaper".into())
            .spawn(move || loop {
                std::thread::sleep(REAP_INTERVAL);
                n.admission.preauth.reap(n.handshake_timeout);
                n.cut_idle_primary();
            })
            .map_err(ServeError::Thread)?;
        std::thread::Builder::new()
            .name("accept".into())
            .spawn(move || self.accept_loop())
            .map_err(ServeError::Thread)?;
        node.wait_stop();
        if let Some(p) = &control {
            if let Err(e) = std::fs::remove_file(p) {
                warn!("cannot remove {}: {e}", p.display());
            }
        }
        Ok(())
    }

    /// Accepts connections until the process exits.
    pub fn accept_loop(&self) {
        Admission::accept_loop(
            &self.node,
            |n| &n.admission,
            &self.listener,
            "peer",
            |n, stream, peer, id| session::serve(stream, peer, n, id),
        );
    }
}

/// `accept` returns a connection only once it has sent data (or after `secs`): idle
/// connections never take a thread (Linux `TCP_DEFER_ACCEPT`; best effort).
pub fn defer_accept(listener: &TcpListener, secs: u64) {
    use std::os::fd::AsRawFd;
    let v = libc::c_int::try_from(secs.max(1)).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt on a valid socket descriptor with a pointer to a c_int that lives for
    // the call and its exact size.
    let r = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        warn!(
            "cannot set TCP_DEFER_ACCEPT: {}",
            io::Error::last_os_error()
        );
    }
}

/// Runs the server until a signal stops the process, or a promotion (then returns Ok).
pub fn run(config: ServeConfig) -> Result<(), ServeError> {
    ignore_sigxfsz();
    let server = Server::bind(config)?;
    spawn_signal_handler(server.node.clone(), server.control.clone())?;
    let addr = server.local_addr().map_err(|source| ServeError::Listen {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    info!("listening on {addr}");
    // The listener and the control socket are bound: ready for a `Type=notify` unit.
    mirror_proto::notify::notify(&format!("READY=1\nSTATUS=replica listening on {addr}"));
    server.serve()?;
    mirror_proto::notify::notify("STOPPING=1");
    info!("stopped after the promotion");
    Ok(())
}

/// A write past a file-size limit (RLIMIT_FSIZE) then fails with EFBIG, answered as "no space",
/// instead of SIGXFSZ killing the process.
fn ignore_sigxfsz() {
    // SAFETY: installs SIG_IGN for SIGXFSZ before any other thread exists; no handler code runs.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

fn spawn_signal_handler(node: Arc<Node>, control: Option<PathBuf>) -> Result<(), ServeError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).map_err(ServeError::Signals)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                mirror_proto::notify::notify("STOPPING=1");
                // Holding the replica lock: no request is half applied, none starts (and the
                // flush gate first: a session's running flush ends, and its outcome counts).
                let _gate = lock(&node.flush_gate);
                let mut replica = lock(&node.replica);
                let code = match replica.flush() {
                    Ok(()) => 0,
                    Err(e) => {
                        error!("final fdatasync failed: {}", chain(&e));
                        1
                    }
                };
                if let Some(p) = &control {
                    if let Err(e) = std::fs::remove_file(p) {
                        warn!("cannot remove {}: {e}", p.display());
                    }
                }
                info!(
                    "signal {sig}: stopped; image {} flushed",
                    replica.path().display()
                );
                std::process::exit(code);
            }
        })
        .map(|_| ())
        .map_err(ServeError::Thread)
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
