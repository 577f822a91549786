//! Small operating-system helpers both programs need: claiming a unix socket path, creating
//! a unix socket only the right local users can reach and checking who connected to it
//! ([`SocketAccess`]), zeroing a file range, page-aligned read buffers, printing an error with
//! its causes.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::warn;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SocketPathError {
    #[error("socket path {0} is in use by a running server")]
    InUse(PathBuf),
    #[error("socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("cannot prepare socket path {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Makes sure `path` can be bound: refuses a path a live server listens on or a non-socket,
/// removes a stale socket left by a crashed server.
pub fn claim_socket_path(path: &Path) -> Result<(), SocketPathError> {
    let io_err = |source| SocketPathError::Io {
        path: path.to_owned(),
        source,
    };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(SocketPathError::NotASocket(path.to_owned()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(SocketPathError::InUse(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            warn!("removing stale socket {}", path.display());
            std::fs::remove_file(path).map_err(io_err)
        }
        Err(e) => Err(io_err(e)),
    }
}

/// Who may connect to a unix socket of ours: root, our own effective uid, and, with
/// `--socket-group`, the members of that group.
///
/// Two layers, both needed: the socket file's mode (0600, or 0660 owned by the group; see
/// [`listen_unix`]) keeps others from connecting at all, and [`SocketAccess::check_peer`]
/// checks every accepted connection against the credentials the kernel recorded when the peer
/// connected (SO_PEERCRED), so a socket file chmod'ed wider afterwards, or a descriptor handed
/// to another process, grants nothing.
///
/// Group membership is what the peer's credentials say at connect time: its effective gid, or
/// one of its supplementary groups (SO_PEERGROUPS, Linux 4.13; on older kernels only the
/// effective gid counts). The group database (/etc/group) is not consulted: a user added to the
/// group gets access with a new login, as with file permissions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SocketAccess {
    /// Members of this group may connect too.
    pub group: Option<libc::gid_t>,
}

/// The credentials of a connected peer, as the kernel recorded them when it connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCredentials {
    pub pid: libc::pid_t,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    /// Supplementary groups (empty where the kernel cannot tell).
    pub groups: Vec<libc::gid_t>,
}

/// Why a connection was refused.
#[derive(Debug, Error)]
pub enum Refused {
    #[error("pid {} uid {} gid {} is not allowed", .0.pid, .0.uid, .0.gid)]
    NotAllowed(PeerCredentials),
    #[error("cannot read the peer's credentials")]
    NoCredentials(#[source] io::Error),
}

impl SocketAccess {
    /// The socket file's mode: 0600, or 0660 with a group.
    pub fn mode(&self) -> u32 {
        if self.group.is_some() {
            0o660
        } else {
            0o600
        }
    }

    /// Whether `peer` may use the socket of a process running with effective uid `euid`.
    pub fn allows(&self, peer: &PeerCredentials, euid: libc::uid_t) -> bool {
        peer.uid == 0
            || peer.uid == euid
            || self
                .group
                .is_some_and(|g| peer.gid == g || peer.groups.contains(&g))
    }

    /// Who may connect, for messages: "root, uid 1000, group 5".
    pub fn describe(&self) -> String {
        let mut s = "root".to_owned();
        let euid = effective_uid();
        if euid != 0 {
            s.push_str(&format!(", uid {euid}"));
        }
        if let Some(g) = self.group {
            s.push_str(&format!(", group {g}"));
        }
        s
    }

    /// Checks the peer of a freshly accepted connection; the caller closes a refused one.
    pub fn check_peer(&self, sock: BorrowedFd<'_>) -> Result<PeerCredentials, Refused> {
        let peer = peer_credentials(sock).map_err(Refused::NoCredentials)?;
        if self.allows(&peer, effective_uid()) {
            Ok(peer)
        } else {
            Err(Refused::NotAllowed(peer))
        }
    }
}

pub(crate) fn effective_uid() -> libc::uid_t {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// SO_PEERGROUPS (`<asm-generic/socket.h>`, Linux 4.13), which the libc crate does not export.
#[cfg(not(target_arch = "sparc64"))]
const SO_PEERGROUPS: libc::c_int = 59;
#[cfg(target_arch = "sparc64")]
const SO_PEERGROUPS: libc::c_int = 0x3d;

/// The peer's credentials at connect time (SO_PEERCRED, SO_PEERGROUPS) of a connected unix
/// socket.
pub fn peer_credentials(sock: BorrowedFd<'_>) -> io::Result<PeerCredentials> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt(2) writes at most `len` bytes into `cred`, which is a ucred of that
    // size living on our stack; the descriptor is borrowed for the call.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    if len as usize != std::mem::size_of::<libc::ucred>() {
        return Err(io::Error::other("short SO_PEERCRED answer"));
    }
    Ok(PeerCredentials {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
        groups: peer_groups(sock)?,
    })
}

fn peer_groups(sock: BorrowedFd<'_>) -> io::Result<Vec<libc::gid_t>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: getsockopt(2) writes at most `len` bytes, the size of `groups`' buffer; the
        // descriptor is borrowed for the call.
        let r = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if r == 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // `len` now says how much room the list needs (at most NGROUPS_MAX = 65536).
            Some(libc::ERANGE) if n > groups.len() && n <= 65536 => groups.resize(n, 0),
            // A kernel older than 4.13 (or no credentials recorded): only the effective gid
            // can be checked.
            Some(libc::ENOPROTOOPT) | Some(libc::ENODATA) => return Ok(Vec::new()),
            _ => return Err(e),
        }
    }
}

/// Claims `path` ([`claim_socket_path`]) and listens on it, the socket file created mode 0600
/// (0660 and owned by the group, with `access.group`) whatever the process umask.
pub fn listen_unix(path: &Path, access: &SocketAccess) -> Result<UnixListener, SocketPathError> {
    claim_socket_path(path)?;
    let listen_err = |source| SocketPathError::Listen {
        path: path.to_owned(),
        source,
    };
    let (addr, addr_len) = unix_addr(path).map_err(listen_err)?;
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(listen_err(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mode = access.mode();
    // Race-free without touching the umask (it is process-wide: another thread may create a
    // file meanwhile). The file gets its final mode and group before listen(2): until then
    // any connect(2) is refused (ECONNREFUSED) whatever the file's mode, so no client can slip
    // in through a wider mode. fchmod(2) before bind(2) also sets the mode bind creates the
    // file with (on Linux the socket inode's mode minus the umask), so the file never exists
    // with more than `mode`; the chmod after bind only restores bits a umask such as 077
    // removed. (Binding in a private directory and renaming into place would replace a socket
    // another server bound meanwhile; bind fails on an existing path instead.) The directory
    // must be trusted: whoever can write it can replace the socket anyway.
    // SAFETY: fchmod(2) on our own socket descriptor.
    if unsafe { libc::fchmod(sock.as_raw_fd(), mode as libc::mode_t) } != 0 {
        return Err(listen_err(io::Error::last_os_error()));
    }
    // SAFETY: `addr` is a valid sockaddr_un and `addr_len` its used length.
    let r = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            addr_len,
        )
    };
    if r != 0 {
        return Err(listen_err(io::Error::last_os_error()));
    }
    let finish = || -> io::Result<()> {
        if let Some(gid) = access.group {
            std::os::unix::fs::lchown(path, None, Some(gid))?;
        }
        let meta = std::fs::symlink_metadata(path)?;
        if !meta.file_type().is_socket() {
            return Err(io::Error::other("the socket file was replaced"));
        }
        if meta.permissions().mode() & 0o7777 != mode {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        }
        // SAFETY: listen(2) on our own bound socket.
        if unsafe { libc::listen(sock.as_raw_fd(), 128) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    if let Err(e) = finish() {
        let _ = std::fs::remove_file(path);
        return Err(listen_err(e));
    }
    Ok(UnixListener::from(sock))
}

fn unix_addr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    let mut addr = libc::sockaddr_un {
        sun_family: libc::AF_UNIX as libc::sa_family_t,
        sun_path: [0; 108],
    };
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.contains(&0) || bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a unix socket path must be 1 to 107 bytes without NUL",
        ));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

/// Logs refused connections: one WARN line per [`RefusalLog::INTERVAL`] at most (a local user
/// could flood the socket), with the number of refusals left out since the last line.
#[derive(Debug)]
pub struct RefusalLog {
    what: String,
    last: Option<Instant>,
    suppressed: u64,
}

impl RefusalLog {
    pub const INTERVAL: Duration = Duration::from_secs(5);

    /// `what` names the socket in the log line, e.g. "control socket /run/vm0.ctl".
    pub fn new(what: impl Into<String>) -> Self {
        RefusalLog {
            what: what.into(),
            last: None,
            suppressed: 0,
        }
    }

    /// Records a refused connection; logs it unless a line was logged less than
    /// [`Self::INTERVAL`] ago.
    pub fn refused(&mut self, why: &Refused, access: &SocketAccess) {
        if let Some(left_out) = self.tick(Instant::now()) {
            let more = if left_out > 0 {
                format!(" ({left_out} more refused since the last message)")
            } else {
                String::new()
            };
            warn!(
                "{}: connection refused: {} (allowed: {}){more}",
                self.what,
                error_chain(why),
                access.describe()
            );
        }
    }

    /// `Some(number left out since the last line)` if a line is due at `now`.
    pub fn tick(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.saturating_duration_since(t) < Self::INTERVAL => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[derive(Debug, Error)]
pub enum GroupError {
    #[error("no group named {0:?}")]
    Unknown(String),
    #[error("{0:?} is not a usable group id")]
    BadGid(String),
    #[error("cannot look up group {name:?}")]
    Lookup {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// A group given by name or number (`--socket-group`).
pub fn resolve_group(spec: &str) -> Result<libc::gid_t, GroupError> {
    if !spec.is_empty() && spec.bytes().all(|b| b.is_ascii_digit()) {
        // gid_t::MAX is (gid_t)-1, "no change" to chown(2).
        return match spec.parse::<libc::gid_t>() {
            Ok(g) if g != libc::gid_t::MAX => Ok(g),
            _ => Err(GroupError::BadGid(spec.to_owned())),
        };
    }
    let name = CString::new(spec).map_err(|_| GroupError::Unknown(spec.to_owned()))?;
    let mut buf: Vec<libc::c_char> = vec![0; 1024];
    loop {
        let mut grp = libc::group {
            gr_name: std::ptr::null_mut(),
            gr_passwd: std::ptr::null_mut(),
            gr_gid: 0,
            gr_mem: std::ptr::null_mut(),
        };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call: the NUL-terminated name, the group
        // struct and the buffer of `buf.len()` bytes its strings are stored in, and `found`.
        let r = unsafe {
            libc::getgrnam_r(
                name.as_ptr(),
                &mut grp,
                buf.as_mut_ptr(),
                buf.len(),
                &mut found,
            )
        };
        if r == libc::ERANGE && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if r != 0 {
            return Err(GroupError::Lookup {
                name: spec.to_owned(),
                source: io::Error::from_raw_os_error(r),
            });
        }
        if found.is_null() {
            return Err(GroupError::Unknown(spec.to_owned()));
        }
        return Ok(grp.gr_gid);
    }
}

/// Zeroes `len` bytes at `offset`: fallocate (punching a hole if `unmap`, else zeroing the
/// range), or writing zeros where the filesystem supports neither. The caller checks bounds.
pub fn zero_range(file: &File, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    let zero = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
    let modes = if unmap { [punch, zero] } else { [zero, punch] };
    for mode in modes {
        // SAFETY: fallocate on a descriptor the caller owns; no memory is passed.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if !matches!(
            e.raw_os_error(),
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
        ) {
            return Err(e);
        }
    }
    let zeros = vec![0u8; (1 << 20).min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// The alignment of [`AlignedBuf`]'s slices: a page.
pub const PAGE_ALIGN: usize = 4096;

/// A scratch buffer for reads from files whose slices start at a multiple of [`PAGE_ALIGN`]
/// in memory (an over-allocated `Vec` and an aligned part of it). `O_DIRECT` needs the
/// alignment; and the kernel's copy out of the page cache ran 5x slower into the 16-byte
/// aligned memory a large `Vec` gets from malloc than into a 32-byte (or better) aligned one
/// on this project's AMD EPYC test machine (0.6 against 0.12 CPU seconds per GiB).
#[derive(Debug, Default)]
pub struct AlignedBuf {
    raw: Vec<u8>,
}

impl AlignedBuf {
    /// `len` bytes starting at a multiple of [`PAGE_ALIGN`] (zeros, or what earlier users
    /// left).
    pub fn get(&mut self, len: usize) -> &mut [u8] {
        if self.raw.len() < len + PAGE_ALIGN {
            self.raw.resize(len + PAGE_ALIGN, 0);
        }
        let skip = self.raw.as_ptr().addr().wrapping_neg() % PAGE_ALIGN;
        &mut self.raw[skip..skip + len]
    }
}

/// An error with its sources, on one line (for logs and status).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffers_are_page_aligned_whatever_their_length() {
        let mut b = AlignedBuf::default();
        for len in [0, 1, 4096, 100_000, 4 << 20, 10] {
            let s = b.get(len);
            assert_eq!(s.len(), len);
            assert_eq!(s.as_ptr().addr() % PAGE_ALIGN, 0, "{len}");
        }
    }
    use std::os::fd::AsFd;

    #[test]
    fn socket_paths() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s");
        claim_socket_path(&p).unwrap();
        let l = UnixListener::bind(&p).unwrap();
        assert!(matches!(
            claim_socket_path(&p),
            Err(SocketPathError::InUse(_))
        ));
        drop(l); // the file stays: a stale socket
        claim_socket_path(&p).unwrap();
        assert!(!p.exists());
        std::fs::write(&p, "x").unwrap();
        assert!(matches!(
            claim_socket_path(&p),
            Err(SocketPathError::NotASocket(_))
        ));
    }

    #[test]
    fn listens_with_mode_0600_or_0660_and_the_group() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s");
        let l = listen_unix(&p, &SocketAccess::default()).unwrap();
        let m = std::fs::symlink_metadata(&p).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.permissions().mode() & 0o7777, 0o600);
        let _c = UnixStream::connect(&p).unwrap();
        let (s, _) = l.accept().unwrap();
        // A live server's path is refused.
        assert!(matches!(
            listen_unix(&p, &SocketAccess::default()),
            Err(SocketPathError::InUse(_))
        ));
        // Our own connection passes the credential check.
        let peer = SocketAccess::default().check_peer(s.as_fd()).unwrap();
        assert_eq!(peer.pid, std::process::id() as libc::pid_t);
        assert_eq!(peer.uid, effective_uid());

        // With a group (our own gid: always allowed to chown to) the file is 0660, that group.
        // SAFETY: getegid(2) has no preconditions.
        let gid = unsafe { libc::getegid() };
        let p2 = d.path().join("s2");
        let _l2 = listen_unix(&p2, &SocketAccess { group: Some(gid) }).unwrap();
        let m = std::fs::symlink_metadata(&p2).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, 0o660);
        assert_eq!(m.gid(), gid);

        let long = d.path().join("x".repeat(120));
        assert!(matches!(
            listen_unix(&long, &SocketAccess::default()),
            Err(SocketPathError::Listen { .. })
        ));
    }

    #[test]
    fn who_is_allowed() {
        let me = 1000;
        let peer = |uid, gid, groups: &[libc::gid_t]| PeerCredentials {
            pid: 1,
            uid,
            gid,
            groups: groups.to_vec(),
        };
        let owner = SocketAccess::default();
        assert!(owner.allows(&peer(0, 0, &[]), me));
        assert!(owner.allows(&peer(me, 100, &[]), me));
        assert!(!owner.allows(&peer(65534, 65534, &[]), me));
        // The group alone means nothing without --socket-group.
        assert!(!owner.allows(&peer(65534, 5, &[5]), me));
        let group = SocketAccess { group: Some(5) };
        assert_eq!((owner.mode(), group.mode()), (0o600, 0o660));
        assert!(group.allows(&peer(65534, 5, &[]), me));
        assert!(group.allows(&peer(65534, 65534, &[7, 5]), me));
        assert!(!group.allows(&peer(65534, 65534, &[7]), me));
        assert!(group.describe().ends_with(", group 5"));
    }

    #[test]
    fn refusals_are_logged_at_most_once_per_interval() {
        let mut log = RefusalLog::new("test socket");
        let t0 = Instant::now();
        assert_eq!(log.tick(t0), Some(0));
        assert_eq!(log.tick(t0 + Duration::from_millis(10)), None);
        assert_eq!(log.tick(t0 + Duration::from_secs(4)), None);
        assert_eq!(log.tick(t0 + RefusalLog::INTERVAL), Some(2));
        assert_eq!(log.tick(t0 + RefusalLog::INTERVAL * 3), Some(0));
    }

    #[test]
    fn groups_by_number_and_name() {
        assert_eq!(resolve_group("0").unwrap(), 0);
        assert_eq!(resolve_group("4242").unwrap(), 4242);
        assert!(matches!(
            resolve_group("4294967295"),
            Err(GroupError::BadGid(_))
        ));
        assert!(matches!(
            resolve_group("99999999999"),
            Err(GroupError::BadGid(_))
        ));
        assert_eq!(resolve_group("root").unwrap(), 0);
        assert!(matches!(
            resolve_group("no-such-group-vhm"),
            Err(GroupError::Unknown(_))
        ));
        assert!(matches!(resolve_group(""), Err(GroupError::Unknown(_))));
    }

    #[test]
    fn zeroes_with_and_without_unmap() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, vec![7u8; 16384]).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        zero_range(&f, 4096, 4096, true).unwrap();
        zero_range(&f, 10000, 100, false).unwrap();
        let b = std::fs::read(&p).unwrap();
        assert_eq!(b.len(), 16384);
        assert!(b[..4096].iter().all(|x| *x == 7));
        assert!(b[4096..8192].iter().all(|x| *x == 0));
        assert!(b[8192..10000].iter().all(|x| *x == 7));
        assert!(b[10000..10100].iter().all(|x| *x == 0));
        assert!(b[10100..].iter().all(|x| *x == 7));
    }

    #[test]
    fn chain_joins_sources() {
        let e = SocketPathError::Io {
            path: "/x".into(),
            source: io::Error::other("boom"),
        };
        assert_eq!(error_chain(&e), "cannot prepare socket path /x: boom");
    }
}
