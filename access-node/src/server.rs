//! `access-node serve`: opens the replica, listens for the primary, runs one thread per
//! connection with at most one primary attached at a time, answers the control socket, and
//! shuts down cleanly on SIGTERM/SIGINT.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use log::{error, info, warn};
use mirror_proto::auth::Secret;
use mirror_proto::control::{self, Handler};
use serde_json::json;
use thiserror::Error;

use crate::chain;
use crate::config::ServeConfig;
use crate::replica::{Replica, ReplicaError};
use crate::session;
use crate::status::Status;

/// Most connections (attached or still in their handshake) served at once; more are closed
/// right away, so a flood of connections cannot exhaust threads.
pub const MAX_CONNECTIONS: usize = 16;

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
    #[error("control socket {0} is in use by a running server")]
    SocketInUse(PathBuf),
    #[error("control socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("cannot prepare control socket path {path}")]
    SocketPath {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on control socket {path}")]
    ControlListen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start a thread")]
    Thread(#[source] io::Error),
    #[error("cannot set up signal handling")]
    Signals(#[source] io::Error),
}

/// Locks a mutex, also after a panic in another thread (the data stays usable: every
/// operation on it is complete or returned an error).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The one place a primary can be attached.
#[derive(Debug, Default)]
pub struct Slot {
    holder: Mutex<Option<SocketAddr>>,
}

/// Holds the slot; releases it when dropped.
#[derive(Debug)]
pub struct SlotGuard<'a> {
    slot: &'a Slot,
}

impl Slot {
    /// The attached primary, if any.
    pub fn holder(&self) -> Option<SocketAddr> {
        *lock(&self.holder)
    }

    /// Takes the slot for `peer`, or says who holds it.
    pub fn try_claim(&self, peer: SocketAddr) -> Result<SlotGuard<'_>, SocketAddr> {
        let mut h = lock(&self.holder);
        match *h {
            Some(other) => Err(other),
            None => {
                *h = Some(peer);
                Ok(SlotGuard { slot: self })
            }
        }
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
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    live: AtomicUsize,
}

/// A bound, not yet serving, server.
pub struct Server {
    listener: TcpListener,
    node: Arc<Node>,
    control: Option<PathBuf>,
}

impl Server {
    /// Opens (and locks) the replica, binds the TCP listener and the control socket.
    pub fn bind(config: ServeConfig) -> Result<Self, ServeError> {
        let status = Arc::new(Status::new(config.image.clone(), config.cache_bytes));
        let replica = Replica::open(&config.image, config.cache_bytes, status.clone())?;
        let listener = TcpListener::bind(config.listen).map_err(|source| ServeError::Listen {
            addr: config.listen,
            source,
        })?;
        let control_listener = match &config.control {
            Some(p) => {
                claim_socket_path(p)?;
                Some(
                    UnixListener::bind(p).map_err(|source| ServeError::ControlListen {
                        path: p.clone(),
                        source,
                    })?,
                )
            }
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
        }
        let node = Arc::new(Node {
            replica: Mutex::new(replica),
            status: status.clone(),
            secret: config.secret,
            slot: Slot::default(),
            handshake_timeout: config.handshake_timeout,
            idle_timeout: config.idle_timeout,
            live: AtomicUsize::new(0),
        });
        if let Some(l) = control_listener {
            let f: Handler = Arc::new(move |cmd| match cmd {
                "status" => status.to_json(),
                other => json!({ "error": format!("unknown command {other:?}") }),
            });
            control::spawn_server(l, f).map_err(ServeError::Thread)?;
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

    /// Accepts connections until the process exits.
    pub fn accept_loop(&self) {
        for conn in self.listener.incoming() {
            match conn {
                Ok(stream) => self.start_session(stream),
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    warn!("accepting a connection failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn start_session(&self, stream: TcpStream) {
        let peer = match stream.peer_addr() {
            Ok(p) => p,
            Err(e) => {
                warn!("connection without a peer address dropped: {e}");
                return;
            }
        };
        if self.node.live.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            self.node.live.fetch_sub(1, Ordering::AcqRel);
            warn!("connection from {peer} dropped: already {MAX_CONNECTIONS} connections");
            return;
        }
        let node = self.node.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("peer-{peer}"))
            .spawn(move || {
                session::serve(stream, peer, &node);
                node.live.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            self.node.live.fetch_sub(1, Ordering::AcqRel);
            error!("connection from {peer} dropped: cannot start a thread: {e}");
        }
    }
}

/// Runs the server until a signal stops the process.
pub fn run(config: ServeConfig) -> Result<(), ServeError> {
    ignore_sigxfsz();
    let server = Server::bind(config)?;
    spawn_signal_handler(server.node.clone(), server.control.clone())?;
    let addr = server.local_addr().map_err(|source| ServeError::Listen {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    info!("listening on {addr}");
    server.accept_loop();
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

/// Makes sure `path` can be bound: refuses a path a live server listens on or a non-socket,
/// removes a stale socket left by a crashed server. (Same rules as vhost-mirror's sockets.)
fn claim_socket_path(path: &Path) -> Result<(), ServeError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ServeError::SocketPath {
                path: path.to_owned(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ServeError::NotASocket(path.to_owned()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ServeError::SocketInUse(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            warn!("removing stale socket {}", path.display());
            std::fs::remove_file(path).map_err(|source| ServeError::SocketPath {
                path: path.to_owned(),
                source,
            })
        }
        Err(source) => Err(ServeError::SocketPath {
            path: path.to_owned(),
            source,
        }),
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
                // Holding the replica lock: no request is half applied, none starts.
                let replica = lock(&node.replica);
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
