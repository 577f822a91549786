//! The vhost-user socket: frontends (QEMU) connect here, one at a time, and only those whose
//! credentials pass ([`SocketAccess`]: root, our own uid, `--socket-group`) reach the device.
//!
//! vhost-user-backend's `VhostUserDaemon` can accept a connection itself (`start`) or connect
//! to a path (`start_client`), but it cannot be handed a connection accepted elsewhere, and it
//! reads the first message as soon as it has accepted one. To check a frontend before it can
//! send a single message, this module accepts on the socket itself, checks the peer
//! (SO_PEERCRED) and closes a refused connection at once (one rate-limited WARN line), and
//! connects an admitted frontend to the daemon through a relay: the daemon `start_client`s to
//! a private hand-off socket, and two threads pass vhost-user messages, with the file
//! descriptors attached to them, between the frontend's connection and the daemon's, one whole
//! message at a time (so every descriptor stays with its message). Only the control plane
//! crosses the relay (features, memory table, vring setup, config space); guest I/O goes
//! through shared memory and eventfds, directly between QEMU and the queue workers.
//!
//! The hand-off socket is reachable by no path: it is bound in a fresh 0700 directory, kept
//! open as an `O_PATH` descriptor, and its file and directory are removed at once; the daemon
//! connects through `/proc/self/fd/N`. The connection accepted there must come from our own
//! process (SO_PEERCRED pid), else it is dropped.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use log::{debug, info};
use mirror_proto::sys::{self, PeerCredentials, RefusalLog, SocketAccess, SocketPathError};
use thiserror::Error;
use vhost::vhost_user::message::{MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::inflight_shm::{self as inflight, InflightHost};

/// A vhost-user message header: request, flags, payload size (u32 each, native byte order).
const HEADER_BYTES: usize = 12;

#[derive(Debug, Error)]
pub enum FrontendError {
    #[error(transparent)]
    Socket(#[from] SocketPathError),
    #[error("cannot set up the private hand-off socket of the vhost-user daemon")]
    Handoff(#[source] io::Error),
}

/// The listening vhost-user socket and the private hand-off socket behind it.
pub struct FrontendSocket {
    listener: UnixListener,
    access: SocketAccess,
    refusals: RefusalLog,
    handoff: UnixListener,
    /// `/proc/self/fd/N` of `_handoff_file`.
    handoff_path: String,
    /// Keeps the (unlinked) hand-off socket file reachable through `handoff_path`.
    _handoff_file: File,
}

impl FrontendSocket {
    /// Creates the vhost-user socket at `path` (mode 0600, or 0660 with a group; see
    /// [`sys::listen_unix`]) and the hand-off socket.
    pub fn bind(path: &Path, access: SocketAccess) -> Result<FrontendSocket, FrontendError> {
        let (handoff, handoff_file) = handoff_socket().map_err(FrontendError::Handoff)?;
        let handoff_path = format!("/proc/self/fd/{}", handoff_file.as_raw_fd());
        // Fail now, not at the first frontend, if the hand-off path does not work (no /proc).
        let probe = UnixStream::connect(&handoff_path).map_err(FrontendError::Handoff)?;
        accept_own(&handoff).map_err(FrontendError::Handoff)?;
        drop(probe);
        let listener = sys::listen_unix(path, &access)?;
        Ok(FrontendSocket {
            listener,
            access,
            refusals: RefusalLog::new(format!("vhost-user socket {}", path.display())),
            handoff,
            handoff_path,
            _handoff_file: handoff_file,
        })
    }

    /// Waits for a frontend that may use the device; a refused one is closed before anything
    /// is read from it.
    pub fn accept(&mut self) -> io::Result<(UnixStream, PeerCredentials)> {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(e) => return Err(e),
            };
            match self.access.check_peer(stream.as_fd()) {
                Ok(peer) => return Ok((stream, peer)),
                Err(why) => self.refusals.refused(&why, &self.access),
            }
        }
    }

    /// Connects the daemon to `frontend`: `start_client` (the daemon's
    /// `VhostUserDaemon::start_client`) is called with the hand-off path, the daemon's
    /// connection is taken there, and a relay runs between the two until either side closes.
    /// The relay answers the in-flight region's messages itself, for `host` (`inflight_shm.rs`).
    pub fn attach(
        &self,
        frontend: UnixStream,
        host: Arc<dyn InflightHost>,
        start_client: impl FnOnce(&str) -> Result<(), String>,
    ) -> io::Result<Relay> {
        // A connection left over by an attempt that failed half-way must not be taken for
        // this daemon's.
        self.drain_handoff()?;
        start_client(&self.handoff_path).map_err(io::Error::other)?;
        let daemon = accept_own(&self.handoff)?;
        // Both directions write to the frontend (the daemon's replies, ours): one at a time.
        let to_frontend = Arc::new(Mutex::new(frontend.try_clone()?));
        let threads = vec![
            spawn_pump(
                "vu-relay-in",
                frontend.try_clone()?,
                Arc::new(Mutex::new(daemon.try_clone()?)),
                Some((host, to_frontend.clone())),
            )?,
            spawn_pump("vu-relay-out", daemon.try_clone()?, to_frontend, None)?,
        ];
        Ok(Relay {
            frontend,
            daemon,
            threads,
        })
    }

    fn drain_handoff(&self) -> io::Result<()> {
        self.handoff.set_nonblocking(true)?;
        let drained = loop {
            match self.handoff.accept() {
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(e),
            }
        };
        self.handoff.set_nonblocking(false)?;
        drained
    }
}

/// A running relay between a frontend and the daemon.
pub struct Relay {
    frontend: UnixStream,
    daemon: UnixStream,
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Closes both connections and waits for the relay threads.
    pub fn close(self) {
        let _ = self.frontend.shutdown(Shutdown::Both);
        let _ = self.daemon.shutdown(Shutdown::Both);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Accepts on the hand-off socket until a connection from this process arrives.
fn accept_own(handoff: &UnixListener) -> io::Result<UnixStream> {
    let me = std::process::id() as libc::pid_t;
    loop {
        let (s, _) = match handoff.accept() {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        match sys::peer_credentials(s.as_fd()) {
            Ok(p) if p.pid == me => return Ok(s),
            Ok(p) => info!("hand-off socket: dropped a connection from pid {}", p.pid),
            Err(e) => info!("hand-off socket: dropped a connection: {e}"),
        }
    }
}

/// A listening socket in a fresh 0700 directory, and an `O_PATH` descriptor of its file; the
/// file and the directory are gone when this returns.
fn handoff_socket() -> io::Result<(UnixListener, File)> {
    let dir = private_dir()?;
    let path = dir.join("handoff");
    let made = sys::listen_unix(&path, &SocketAccess::default())
        .map_err(io::Error::other)
        .and_then(|l| {
            let f = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
                .open(&path)?;
            Ok((l, f))
        });
    let _ = std::fs::remove_file(&path);
    std::fs::remove_dir(&dir)?;
    made
}

/// mkdtemp(3) in the temporary directory: a new directory, mode 0700.
fn private_dir() -> io::Result<PathBuf> {
    let template = std::env::temp_dir().join("vhost-mirror-XXXXXX");
    let template = CString::new(template.into_os_string().into_vec())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in TMPDIR"))?;
    let mut buf = template.into_bytes_with_nul();
    // SAFETY: `buf` is a NUL-terminated template ending in XXXXXX that mkdtemp rewrites in
    // place, without changing its length.
    let r = unsafe { libc::mkdtemp(buf.as_mut_ptr().cast()) };
    if r.is_null() {
        return Err(io::Error::last_os_error());
    }
    buf.pop(); // the NUL
    Ok(PathBuf::from(std::ffi::OsString::from_vec(buf)))
}

/// The frontend's side of the in-direction: where in-flight messages are answered.
type Answering = (Arc<dyn InflightHost>, Arc<Mutex<UnixStream>>);

fn spawn_pump(
    name: &str,
    from: UnixStream,
    to: Arc<Mutex<UnixStream>>,
    answer: Option<Answering>,
) -> io::Result<JoinHandle<()>> {
    let what = name.to_owned();
    std::thread::Builder::new()
        .name(what.clone())
        .spawn(move || {
            if let Err(e) = pump(&from, &to, answer.as_ref()) {
                debug!("{what}: {e}");
            }
            // Either side gone: end both directions (the daemon sees EOF and stops).
            let _ = from.shutdown(Shutdown::Both);
            let _ = lock(&to).shutdown(Shutdown::Both);
        })
}

fn lock(s: &Mutex<UnixStream>) -> std::sync::MutexGuard<'_, UnixStream> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// Copies messages from `from` to `to` until `from` ends (Ok) or anything fails. With
/// `answer` (frontend to daemon), the in-flight region's messages are answered to the frontend
/// instead, and each queue's kick eventfd is signalled once after the daemon got it.
fn pump(from: &UnixStream, to: &Mutex<UnixStream>, answer: Option<&Answering>) -> io::Result<()> {
    while let Some(mut m) = read_message(from)? {
        let Some((host, frontend)) = answer else {
            write_message(&lock(to), &m)?;
            continue;
        };
        match inflight::intercept(&m.bytes, &mut m.fds, host.as_ref()) {
            inflight::Intercepted::Forward => {
                let kick = inflight::kick_fd_of(&m.bytes, &m.fds, host.as_ref());
                write_message(&lock(to), &m)?;
                if let Some(k) = kick {
                    if let Err(e) = inflight::kick(k) {
                        debug!("kicking a queue after SET_VRING_KICK: {e}");
                    }
                }
            }
            inflight::Intercepted::Reply(bytes, fds) => {
                if !bytes.is_empty() {
                    write_message(&lock(frontend), &Message { bytes, fds })?;
                }
            }
        }
    }
    Ok(())
}

/// One vhost-user message and the descriptors that came with it.
#[derive(Debug)]
struct Message {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

/// Reads one whole message; `None` at a clean end of the stream (between messages).
fn read_message(sock: &UnixStream) -> io::Result<Option<Message>> {
    let mut bytes = vec![0u8; HEADER_BYTES];
    let mut fds = Vec::new();
    let n = recv_some(sock, &mut bytes, &mut fds)?;
    if n == 0 {
        return Ok(None);
    }
    recv_exact(sock, &mut bytes[n..], &mut fds)?;
    let mut size = [0u8; 4];
    size.copy_from_slice(&bytes[8..12]);
    let size = u32::from_ne_bytes(size) as usize;
    if size > MAX_MSG_SIZE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("vhost-user message of {size} bytes (at most {MAX_MSG_SIZE})"),
        ));
    }
    bytes.resize(HEADER_BYTES + size, 0);
    recv_exact(sock, &mut bytes[HEADER_BYTES..], &mut fds)?;
    Ok(Some(Message { bytes, fds }))
}

fn recv_exact(sock: &UnixStream, mut buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<()> {
    while !buf.is_empty() {
        let n = recv_some(sock, buf, fds)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf = &mut buf[n..];
    }
    Ok(())
}

/// One recvmsg(2) into `buf`; descriptors that came with it are added to `fds`.
fn recv_some(sock: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut raw: [RawFd; MAX_ATTACHED_FD_ENTRIES] = [-1; MAX_ATTACHED_FD_ENTRIES];
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    let (n, nfds) = loop {
        // SAFETY: the iovec covers exactly `buf`, which is borrowed mutably for the call; any
        // bytes may be written there.
        match unsafe { sock.recv_with_fds(&mut iov, &mut raw) } {
            Ok(x) => break x,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(e.into()),
        }
    };
    for fd in &raw[..nfds] {
        // SAFETY: recvmsg(2) just created these descriptors for us; nothing else owns them.
        fds.push(unsafe { OwnedFd::from_raw_fd(*fd) });
    }
    if fds.len() > MAX_ATTACHED_FD_ENTRIES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "more file descriptors than a vhost-user message may carry",
        ));
    }
    Ok(n)
}

/// Sends the message with its descriptors attached to its first byte, as a frontend does.
fn write_message(sock: &UnixStream, m: &Message) -> io::Result<()> {
    let raw: Vec<RawFd> = m.fds.iter().map(AsRawFd::as_raw_fd).collect();
    let n = loop {
        match sock.send_with_fds(&[&m.bytes[..]], &raw) {
            Ok(n) => break n,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(e.into()),
        }
    };
    (&*sock).write_all(&m.bytes[n..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn header(req: u32, size: u32) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&req.to_ne_bytes());
        v.extend_from_slice(&1u32.to_ne_bytes());
        v.extend_from_slice(&size.to_ne_bytes());
        v
    }

    #[test]
    fn messages_keep_their_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        // Two messages back to back, the second one with a descriptor: read one at a time,
        // each gets exactly its own descriptors.
        let mut m1 = header(1, 8);
        m1.extend_from_slice(&7u64.to_ne_bytes());
        a.send_with_fds(&[&m1[..]], &[]).unwrap();
        let f = tempfile::tempfile().unwrap();
        let m2 = header(5, 0);
        a.send_with_fds(&[&m2[..]], &[f.as_raw_fd()]).unwrap();
        let r1 = read_message(&b).unwrap().unwrap();
        assert_eq!((r1.bytes, r1.fds.len()), (m1, 0));
        let r2 = read_message(&b).unwrap().unwrap();
        assert_eq!((r2.bytes.clone(), r2.fds.len()), (m2.clone(), 1));

        // Forwarded: the descriptor arrives with the message on the other side.
        let (c, d) = UnixStream::pair().unwrap();
        write_message(&c, &r2).unwrap();
        let back = read_message(&d).unwrap().unwrap();
        assert_eq!((back.bytes, back.fds.len()), (m2, 1));

        drop(a);
        assert!(read_message(&b).unwrap().is_none(), "clean end");
    }

    #[test]
    fn oversized_or_cut_messages_end_the_relay() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&header(1, u32::MAX)).unwrap();
        assert_eq!(
            read_message(&b).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&header(1, 8)[..7]).unwrap();
        drop(a);
        assert_eq!(
            read_message(&b).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[derive(Default)]
    struct TestHost(Mutex<Option<Arc<inflight::InflightRegion>>>);
    impl InflightHost for TestHost {
        fn set_region(&self, r: Option<Arc<inflight::InflightRegion>>) {
            *self.0.lock().unwrap() = r;
        }
        fn has_region(&self) -> bool {
            self.0.lock().unwrap().is_some()
        }
    }

    #[test]
    fn relays_both_ways_and_closes_both() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("vu.sock");
        let mut s = FrontendSocket::bind(&p, SocketAccess::default()).unwrap();
        let mut frontend = UnixStream::connect(&p).unwrap();
        let (accepted, peer) = s.accept().unwrap();
        assert_eq!(peer.pid, std::process::id() as libc::pid_t);
        // The daemon's side: what start_client does.
        let mut daemon = None;
        let host = Arc::new(TestHost::default());
        let relay = s
            .attach(accepted, host.clone(), |path| {
                daemon = Some(UnixStream::connect(path).map_err(|e| e.to_string())?);
                Ok(())
            })
            .unwrap();
        let mut daemon = daemon.unwrap();

        let req = header(1, 0);
        frontend.write_all(&req).unwrap();
        let mut got = vec![0u8; req.len()];
        daemon.read_exact(&mut got).unwrap();
        assert_eq!(got, req);
        let mut reply = header(1, 8);
        reply.extend_from_slice(&0x1234u64.to_ne_bytes());
        daemon.write_all(&reply).unwrap();
        let mut got = vec![0u8; reply.len()];
        frontend.read_exact(&mut got).unwrap();
        assert_eq!(got, reply);

        // GET_INFLIGHT_FD is answered by the relay, with a descriptor; the daemon never sees
        // it, and sees the next message.
        let mut get = header(inflight::GET_INFLIGHT_FD, 24);
        get.extend_from_slice(&[0u8; 16]);
        get.extend_from_slice(&1u16.to_ne_bytes());
        get.extend_from_slice(&64u16.to_ne_bytes());
        get.extend_from_slice(&[0u8; 4]);
        frontend.write_all(&get).unwrap();
        let m = read_message(&frontend).unwrap().unwrap();
        assert_eq!(&m.bytes[0..4], &inflight::GET_INFLIGHT_FD.to_ne_bytes());
        assert_eq!(m.bytes.len(), 12 + 24);
        assert_eq!(m.fds.len(), 1);
        assert!(host.has_region());
        frontend.write_all(&header(2, 0)).unwrap();
        let mut got = vec![0u8; 12];
        daemon.read_exact(&mut got).unwrap();
        assert_eq!(got, header(2, 0));

        // The frontend leaves: the daemon's side sees the end of the stream.
        drop(frontend);
        let mut rest = Vec::new();
        daemon.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        relay.close();
        // The hand-off path is not in the file system.
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }
}
