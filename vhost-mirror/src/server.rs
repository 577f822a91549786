//! `vhost-mirror serve`: owns the sockets, accepts one frontend (QEMU) at a time (through
//! `frontend.rs`, which checks who connects), survives its disconnects, and shuts down cleanly
//! on SIGTERM/SIGINT.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{error, info, warn};
use serde_json::json;
use thiserror::Error;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::blk_config::{DeviceModel, ID_BYTES, SECTOR_SIZE};
use crate::config::ServeConfig;
use crate::device::{BlkBackend, Device};
use crate::disk::{DiskError, RawImage};
use crate::flusher::Flusher;
use crate::frontend::{FrontendError, FrontendSocket};
use crate::replication::out_of_sync::SyncStateError;
use crate::replication::verify::{self, VerifyRequest};
use crate::replication::Mirror;
use crate::stats;
use mirror_proto::control::{self, Handler};
use mirror_proto::sys::error_chain as chain;

#[derive(Debug, Error)]
pub enum ServeError {
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Socket(#[from] mirror_proto::sys::SocketPathError),
    #[error(transparent)]
    Frontend(#[from] FrontendError),
    #[error("cannot set up signal handling")]
    Signals(#[source] io::Error),
    #[error("cannot start the vhost-user daemon: {0}")]
    Daemon(String),
    #[error("replication metadata")]
    Replication(#[from] SyncStateError),
    #[error("cannot start a thread")]
    Thread(#[source] io::Error),
}

/// The ID string GET_ID returns: stable for an image file (device and inode numbers).
fn device_id(image: &Path) -> [u8; ID_BYTES] {
    let mut id = [0u8; ID_BYTES];
    let text = match std::fs::metadata(image) {
        Ok(m) => format!("vhm-{:x}-{:x}", m.dev(), m.ino()),
        Err(_) => "vhost-mirror".to_owned(),
    };
    let n = text.len().min(ID_BYTES);
    id[..n].copy_from_slice(&text.as_bytes()[..n]);
    id
}

struct ServerState {
    dev: Arc<Device>,
    config: ServeConfig,
    connected: AtomicBool,
    connections: AtomicU64,
    started: Instant,
}

impl ServerState {
    /// `verify [offset=N] [length=N] [rate_mib=N] [repair=1]`: runs an online verify to its end
    /// (`replication/verify.rs`) and answers its result.
    fn verify(&self, args: &str) -> serde_json::Value {
        let Some(m) = &self.dev.mirror else {
            return json!({ "error": "no replica configured (--peer)" });
        };
        match VerifyRequest::parse(args) {
            Ok(req) => match verify::run(m, req) {
                Ok(v) => v,
                Err(e) => json!({ "error": chain(&e) }),
            },
            Err(e) => json!({ "error": e }),
        }
    }

    fn status(&self) -> serde_json::Value {
        let c = stats::snapshot(&self.dev.counters);
        let mut v = json!({
            "image": self.config.image.display().to_string(),
            "capacity_bytes": self.dev.model.capacity_sectors * SECTOR_SIZE,
            "num_queues": self.dev.model.num_queues,
            "queues_enabled": self.dev.queues_enabled(),
            "queue_size": self.dev.model.queue_size,
            "readonly": self.dev.model.readonly,
            "disk_error": self.dev.disk.failure(),
            "writeback": self.dev.writeback.load(Ordering::Relaxed),
            "frontend_connected": self.connected.load(Ordering::Relaxed),
            "connections": self.connections.load(Ordering::Relaxed),
            "uptime_secs": self.started.elapsed().as_secs(),
            "reads": c.reads,
            "writes": c.writes,
            "flushes": c.flushes,
            "discards": c.discards,
            "write_zeroes": c.write_zeroes,
            "get_ids": c.get_ids,
            "bytes_read": c.bytes_read,
            "bytes_written": c.bytes_written,
            "errors": c.errors,
            "unsupported": c.unsupported,
            // Totals (a client takes differences): where a flush's time goes.
            "local_fdatasyncs": self.dev.flusher.stats.count.load(Ordering::Relaxed),
            "local_fdatasync_ns": self.dev.flusher.stats.nanos.load(Ordering::Relaxed),
            // fdatasyncs started after a write, ahead of the FLUSH expected next, and FLUSHes
            // answered by an fdatasync already running when they came (flusher.rs).
            "local_fdatasyncs_early": self.dev.flusher.stats.early.load(Ordering::Relaxed),
            "flushes_joined": self.dev.flusher.stats.joined.load(Ordering::Relaxed),
        });
        if let (Some(m), Some(obj)) = (&self.dev.mirror, v.as_object_mut()) {
            if let serde_json::Value::Object(r) = m.status() {
                obj.extend(r);
            }
        }
        v
    }
}

/// Runs the server until a signal stops the process.
pub fn run(config: ServeConfig) -> Result<(), ServeError> {
    let disk = Arc::new(RawImage::open(&config.image, config.readonly)?);
    let model = DeviceModel {
        capacity_sectors: disk.size() / SECTOR_SIZE,
        num_queues: config.num_queues,
        queue_size: config.queue_size,
        readonly: config.readonly,
    };
    let mirror = match &config.mirror {
        Some(mc) => {
            if mc.peer.is_none() {
                warn!(
                    "{} belongs to a mirrored pair (it has replication metadata) and is served \
                     without --peer: every write is recorded out of sync and copied to the \
                     peer when it is served with --peer again",
                    config.image.display()
                );
            }
            Some(Mirror::new(mc.clone(), disk.clone())?)
        }
        None => None,
    };
    let flusher = Flusher::start(disk.clone()).map_err(ServeError::Thread)?;
    let mut device = Device::new(
        disk.clone(),
        model,
        device_id(&config.image),
        mirror.clone(),
        flusher,
    );
    device.poll = config.poll;
    device.poll_inflight = config.poll_inflight;
    let dev = Arc::new(device);

    let access = config.socket_access;
    let control_listener = match &config.control {
        Some(p) => Some(mirror_proto::sys::listen_unix(p, &access)?),
        None => None,
    };
    let mut frontends = FrontendSocket::bind(&config.socket, access)?;

    let state = Arc::new(ServerState {
        dev: dev.clone(),
        config: config.clone(),
        connected: AtomicBool::new(false),
        connections: AtomicU64::new(0),
        started: Instant::now(),
    });
    if let Some(l) = control_listener {
        let st = state.clone();
        let f: Handler = Arc::new(move |cmd| match cmd.split_once(' ').unwrap_or((cmd, "")) {
            ("status", "") => st.status(),
            ("verify", args) => st.verify(args),
            _ => json!({ "error": format!("unknown command {cmd:?}") }),
        });
        control::spawn_server(l, access, f).map_err(ServeError::Thread)?;
    }
    if let Some(addr) = config.metrics {
        let st = state.clone();
        let render: mirror_proto::metrics::Render = Arc::new(move || {
            crate::metrics::render(
                &st.dev,
                &st.config.image,
                st.connected.load(Ordering::Relaxed),
                st.connections.load(Ordering::Relaxed),
            )
        });
        mirror_proto::metrics::spawn(addr, render).map_err(ServeError::Thread)?;
    }
    spawn_signal_handler(state.clone())?;
    if let Some(m) = &mirror {
        m.spawn_manager().map_err(ServeError::Thread)?;
    }

    info!(
        "serving {} ({} bytes, {} queue(s) of {}, {}) on {}",
        config.image.display(),
        disk.size(),
        config.num_queues,
        config.queue_size,
        if config.readonly {
            "read-only"
        } else {
            "read-write"
        },
        config.socket.display()
    );
    // The sockets listen (a frontend that connects now is accepted below): ready for a
    // `Type=notify` unit.
    mirror_proto::notify::notify(&format!(
        "READY=1\nSTATUS=serving {} on {}",
        config.image.display(),
        config.socket.display()
    ));

    loop {
        // Only a frontend whose credentials pass gets here (frontend.rs).
        let (stream, peer) = match frontends.accept() {
            Ok(x) => x,
            Err(e) => {
                error!("accepting a frontend failed: {e}");
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        dev.frontend_gone.store(false, Ordering::SeqCst);
        let backend = BlkBackend::new(dev.clone(), mem.clone());
        // One worker thread per offered queue, each idle in its event loop until the frontend
        // enables its queue (device.rs).
        let mut daemon = VhostUserDaemon::new("vhost-mirror".into(), backend.clone(), mem)
            .map_err(|e| ServeError::Daemon(e.to_string()))?;
        // A queue's completion event joins its loop, beside its kick, once the queue is enabled.
        backend
            .set_event_loops(&daemon.get_epoll_handlers())
            .map_err(|e| ServeError::Daemon(format!("event loops: {e}")))?;
        drop(backend);
        // The daemon connects to the private hand-off socket; the relay joins it to `stream`.
        let relay = match frontends.attach(stream, dev.clone(), |path| {
            daemon.start_client(path).map_err(|e| e.to_string())
        }) {
            Ok(r) => r,
            Err(e) => {
                error!("attaching a frontend failed: {e}");
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        let n = state.connections.fetch_add(1, Ordering::Relaxed) + 1;
        state.connected.store(true, Ordering::Relaxed);
        info!(
            "frontend connected (connection {n}; pid {} uid {})",
            peer.pid, peer.uid
        );
        let used = || {
            format!(
                "{} of {} queue(s) used",
                dev.queues_used(),
                config.num_queues
            )
        };
        match daemon.wait() {
            Ok(()) => info!("frontend disconnected ({})", used()),
            Err(e) => info!("frontend disconnected ({}): {e}", used()),
        }
        relay.close();
        state.connected.store(false, Ordering::Relaxed);
        // The requests the workers deferred are finished (the guest is gone: only the
        // replica's part and the bookkeeping), then the workers are joined.
        dev.finish_all_deferred();
        drop(daemon);
        dev.frontend_left();
        if let Err(e) = disk.flush() {
            error!("flush after disconnect failed: {}", chain(&e));
        }
    }
}

fn spawn_signal_handler(state: Arc<ServerState>) -> Result<(), ServeError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).map_err(ServeError::Signals)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                info!("signal {sig}: finishing in-flight requests");
                mirror_proto::notify::notify("STOPPING=1");
                if let Some(m) = &state.dev.mirror {
                    m.begin_shutdown();
                }
                let guards = state.dev.quiesce();
                let code = match state.dev.disk.flush() {
                    Ok(()) => 0,
                    Err(e) => {
                        error!("final flush failed: {}", chain(&e));
                        1
                    }
                };
                if let Some(m) = &state.dev.mirror {
                    m.shutdown(code == 0);
                }
                for p in std::iter::once(&state.config.socket).chain(state.config.control.iter()) {
                    if let Err(e) = std::fs::remove_file(p) {
                        warn!("cannot remove {}: {e}", p.display());
                    }
                }
                info!("stopped; image {} flushed", state.config.image.display());
                drop(guards);
                std::process::exit(code);
            }
        })
        .map(|_| ())
        .map_err(ServeError::Signals)
}
