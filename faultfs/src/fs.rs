//! The filesystem: the inode table over the backing directory, the FUSE request handlers
//! ([`FaultFs`]), and the operations of the control socket on the same state ([`State`]:
//! cut, sync, fail rules, stats).
//!
//! # Model
//! * Namespace and metadata operations (create, mkdir, rename, unlink, rmdir, chmod, utimes,
//!   truncate/extend via setattr, plain fallocate) are applied to the backing directory at once
//!   and are durable immediately: a cut never undoes them.
//! * File *data* (write, punch-hole, zero-range, and size growth by writes) goes into the file's
//!   [`FileCache`] and reaches the backing file only on fsync/fdatasync of that file, a write to
//!   a file opened `O_SYNC`/`O_DSYNC`, a `sync` command, or a clean exit. A `cut` drops it.
//! * The kernel must not cache anything that a cut would have to undo: every open is replied with
//!   `FOPEN_DIRECT_IO` (no page cache, so writes arrive here synchronously and reads come here),
//!   and entry/attribute TTLs are 0 (sizes are always asked for again).
//!
//! # Inodes
//! Each FUSE inode is a [`Node`] holding an `O_PATH` descriptor of the backing object; `*at()`
//! calls relative to it follow renames without tracking paths, and `/proc/self/fd/N` gives the
//! current path (for fail rules). Nodes are keyed by the backing (st_dev, st_ino), so two
//! names or two opens of one file share one node and one cache. A node lives while the kernel
//! holds lookups on it, while it is open, or while it has dirty data and still has a name (so
//! unsynced data survives the kernel forgetting the inode); the dirty data of a file whose last
//! name and last user are gone is dropped, as the kernel would.
//!
//! Locks (flock, POSIX) are not implemented here: the kernel then keeps them locally on its
//! inode, which is one per file, so they conflict between processes as on a local filesystem.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, TimeOrNow, WriteFlags,
};
use log::{debug, info, warn};
use nix::fcntl::{AtFlags, OFlag, AT_FDCWD};
use nix::sys::stat::{FchmodatFlags, FileStat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;

use crate::cache::FileCache;
use crate::error::FaultFsError;
use crate::faults::{FailRule, FaultOp, Faults};

/// Entry and attribute TTL: nothing is cached by the kernel, so a cut is seen at once.
const TTL: Duration = Duration::ZERO;
const ROOT: u64 = INodeNo::ROOT.0;

/// Identity of a backing object: (st_dev, st_ino).
type FileId = (u64, u64);
type FsResult<T> = Result<T, Errno>;

fn nix_errno(e: nix::errno::Errno) -> Errno {
    Errno::from_i32(e as i32)
}

fn io_errno(e: io::Error) -> Errno {
    Errno::from(e)
}

/// `/proc/self/fd/N`: the path through which an `O_PATH` descriptor can be reopened or
/// changed with path-based calls.
fn proc_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn kind_of(mode: u32) -> FileType {
    match SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFDIR => FileType::Directory,
        SFlag::S_IFLNK => FileType::Symlink,
        SFlag::S_IFIFO => FileType::NamedPipe,
        SFlag::S_IFSOCK => FileType::Socket,
        SFlag::S_IFCHR => FileType::CharDevice,
        SFlag::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn time(sec: i64, nsec: i64) -> SystemTime {
    match (u64::try_from(sec), u32::try_from(nsec)) {
        (Ok(s), Ok(n)) => UNIX_EPOCH + Duration::new(s, n),
        _ => UNIX_EPOCH,
    }
}

fn timespec(t: Option<TimeOrNow>) -> TimeSpec {
    match t {
        None => TimeSpec::UTIME_OMIT,
        Some(TimeOrNow::Now) => TimeSpec::UTIME_NOW,
        Some(TimeOrNow::SpecificTime(t)) => {
            TimeSpec::from_duration(t.duration_since(UNIX_EPOCH).unwrap_or_default())
        }
    }
}

fn to_off(n: u64) -> FsResult<i64> {
    i64::try_from(n).map_err(|_| Errno::EFBIG)
}

/// Opens the backing file for I/O (read-write, or read-only where that is all we may).
fn open_io(fd: &OwnedFd) -> Option<File> {
    let path = proc_path(fd);
    let open = |write: bool| {
        File::options()
            .read(true)
            .write(write)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
    };
    match open(true).or_else(|_| open(false)) {
        Ok(f) => Some(f),
        Err(e) => {
            warn!("cannot open backing file {}: {e}", path.display());
            None
        }
    }
}

/// One FUSE inode: a backing object and, for a regular file, its dirty data.
struct Node {
    id: FileId,
    /// `O_PATH` descriptor of the backing object.
    fd: OwnedFd,
    kind: FileType,
    /// Lookups the kernel holds (decremented by forget).
    lookups: u64,
    /// Open handles (decremented by release).
    opens: u64,
    /// Read-write descriptor for the data of a regular file.
    io: Option<File>,
    /// The volatile write-back cache (regular files only; empty otherwise).
    cache: FileCache,
}

impl Node {
    fn io(&self) -> FsResult<&File> {
        match self.kind {
            FileType::Directory => Err(Errno::EISDIR),
            FileType::RegularFile => self.io.as_ref().ok_or(Errno::EACCES),
            _ => Err(Errno::EINVAL),
        }
    }
}

/// A snapshot of one directory entry, taken at opendir.
struct DirEntry {
    ino: u64,
    kind: FileType,
    name: OsString,
}

/// Counters and the size of the dirty state, as reported by `stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub dirty_bytes: u64,
    pub dirty_files: u64,
    pub reads: u64,
    pub writes: u64,
    pub fsyncs: u64,
    pub dir_fsyncs: u64,
    pub injected: u64,
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "dirty_bytes={} dirty_files={} reads={} writes={} fsyncs={} dir_fsyncs={} injected={}",
            self.dirty_bytes,
            self.dirty_files,
            self.reads,
            self.writes,
            self.fsyncs,
            self.dir_fsyncs,
            self.injected
        )
    }
}

/// Everything behind the one lock.
struct Inner {
    /// Canonical backing directory (to make paths relative for fail rules).
    root: PathBuf,
    nodes: HashMap<u64, Node>,
    ids: HashMap<FileId, u64>,
    next_ino: u64,
    dirs: HashMap<u64, Vec<DirEntry>>,
    next_fh: u64,
    faults: Faults,
    cut_issued: bool,
}

/// The shared state of the filesystem and the control socket.
pub struct State {
    inner: Mutex<Inner>,
}

impl State {
    /// Opens the backing directory as the root inode.
    pub fn open(backing: &Path) -> Result<State, FaultFsError> {
        let err = |source: io::Error| FaultFsError::Backing {
            path: backing.to_owned(),
            source,
        };
        let root = backing.canonicalize().map_err(err)?;
        let fd = nix::fcntl::open(
            &root,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| err(e.into()))?;
        let st = nix::sys::stat::fstat(&fd).map_err(|e| err(e.into()))?;
        let id = (st.st_dev, st.st_ino);
        let node = Node {
            id,
            fd,
            kind: FileType::Directory,
            lookups: 1,
            opens: 0,
            io: None,
            cache: FileCache::new(0),
        };
        Ok(State {
            inner: Mutex::new(Inner {
                root,
                nodes: HashMap::from([(ROOT, node)]),
                ids: HashMap::from([(id, ROOT)]),
                next_ino: ROOT + 1,
                dirs: HashMap::new(),
                next_fh: 1,
                faults: Faults::default(),
                cut_issued: false,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic in a handler leaves the tables consistent enough to keep serving.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Power cut: drops every file's dirty data. Returns the dropped bytes (whole pages).
    pub fn cut(&self) -> u64 {
        let mut inner = self.lock();
        inner.cut_issued = true;
        let (mut bytes, mut files) = (0, 0);
        for node in inner.nodes.values_mut() {
            if node.cache.is_dirty() {
                files += 1;
                bytes += node.cache.drop_all();
            }
        }
        inner.gc_all();
        info!("cut: dropped {bytes} dirty bytes of {files} files");
        bytes
    }

    /// Writes every file's dirty data to the backing files and fsyncs them. Returns the number
    /// of files written.
    pub fn sync(&self) -> io::Result<u64> {
        let n = self.lock().sync_all()?;
        info!("sync: wrote {n} files");
        Ok(n)
    }

    pub fn add_rule(&self, rule: FailRule) {
        info!(
            "fail rule: {} on *{}* -> {} ({})",
            rule.op,
            rule.pattern,
            rule.errno,
            rule.remaining
                .map_or_else(|| "until cleared".to_string(), |n| format!("{n} times"))
        );
        self.lock().faults.add(rule);
    }

    pub fn clear_rules(&self) {
        info!("fail rules cleared");
        self.lock().faults.clear();
    }

    pub fn stats(&self) -> Stats {
        let inner = self.lock();
        let mut s = Stats {
            reads: inner.faults.reads,
            writes: inner.faults.writes,
            fsyncs: inner.faults.fsyncs,
            dir_fsyncs: inner.faults.dir_fsyncs,
            injected: inner.faults.injected,
            ..Stats::default()
        };
        for node in inner.nodes.values().filter(|n| n.cache.is_dirty()) {
            s.dirty_files += 1;
            s.dirty_bytes += node.cache.dirty_bytes();
        }
        s
    }

    /// At a clean exit: a process exit is not a power loss, so dirty data is written out, unless
    /// a cut was issued (then the host is "off" and what is dirty now is dropped).
    pub fn shutdown(&self) -> io::Result<()> {
        let mut inner = self.lock();
        if inner.cut_issued {
            let bytes: u64 = inner.nodes.values_mut().map(|n| n.cache.drop_all()).sum();
            info!("exit after a cut: {bytes} dirty bytes dropped, not written");
            Ok(())
        } else {
            let n = inner.sync_all()?;
            info!("exit: dirty data of {n} files written");
            Ok(())
        }
    }
}

impl Inner {
    fn node(&self, ino: u64) -> FsResult<&Node> {
        self.nodes.get(&ino).ok_or(Errno::ENOENT)
    }

    fn node_mut(&mut self, ino: u64) -> FsResult<&mut Node> {
        self.nodes.get_mut(&ino).ok_or(Errno::ENOENT)
    }

    /// Registers the backing object open as `fd` (`O_PATH`): the node of the same file if there
    /// is one, else a new node. Counts one kernel lookup.
    fn insert(&mut self, fd: OwnedFd, io: Option<File>) -> FsResult<u64> {
        let st = nix::sys::stat::fstat(&fd).map_err(nix_errno)?;
        let id = (st.st_dev, st.st_ino);
        if let Some(&ino) = self.ids.get(&id) {
            let node = self.node_mut(ino)?;
            node.lookups += 1;
            if node.io.is_none() {
                node.io = io;
            }
            return Ok(ino);
        }
        let kind = kind_of(st.st_mode);
        let io = match kind {
            FileType::RegularFile => io.or_else(|| open_io(&fd)),
            _ => None,
        };
        let size = u64::try_from(st.st_size).unwrap_or(0);
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(
            ino,
            Node {
                id,
                fd,
                kind,
                lookups: 1,
                opens: 0,
                io,
                cache: FileCache::new(size),
            },
        );
        self.ids.insert(id, ino);
        Ok(ino)
    }

    /// Forgets a node nobody refers to any more, unless it holds dirty data of a file that
    /// still has a name (that data must survive until fsync, sync, cut or exit).
    fn gc(&mut self, ino: u64) {
        let Some(node) = self.nodes.get(&ino) else {
            return;
        };
        if ino == ROOT || node.lookups > 0 || node.opens > 0 {
            return;
        }
        if node.cache.is_dirty() {
            match nix::sys::stat::fstat(&node.fd) {
                Ok(st) if st.st_nlink > 0 => return,
                _ => debug!(
                    "dropping {} dirty bytes of a deleted file",
                    node.cache.dirty_bytes()
                ),
            }
        }
        if let Some(node) = self.nodes.remove(&ino) {
            self.ids.remove(&node.id);
        }
    }

    /// After an unlink or a rename over it: a file left with no name and no open handle can
    /// never be read again, so its dirty data goes now (the kernel may keep the inode cached,
    /// and so the node, for a while).
    fn discard_if_orphan(&mut self, ino: u64) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            let orphan =
                node.opens == 0 && nix::sys::stat::fstat(&node.fd).is_ok_and(|st| st.st_nlink == 0);
            if orphan && node.cache.is_dirty() {
                debug!(
                    "dropping {} dirty bytes of a deleted file",
                    node.cache.drop_all()
                );
            }
        }
        self.gc(ino);
    }

    fn gc_all(&mut self) {
        let inos: Vec<u64> = self.nodes.keys().copied().collect();
        for ino in inos {
            self.gc(ino);
        }
    }

    fn sync_all(&mut self) -> io::Result<u64> {
        let mut first_err = None;
        let mut n = 0;
        for node in self.nodes.values_mut() {
            if !node.cache.is_dirty() {
                continue;
            }
            let Some(io) = node.io.as_ref() else {
                continue;
            };
            match node.cache.flush(io).and_then(|()| io.sync_all()) {
                Ok(()) => n += 1,
                Err(e) => {
                    warn!("writing back dirty data: {e}");
                    first_err.get_or_insert(e);
                }
            }
        }
        self.gc_all();
        match first_err {
            Some(e) => Err(e),
            None => Ok(n),
        }
    }

    /// The node's current path relative to the mount ("" for the root).
    fn rel_path(&self, ino: u64) -> String {
        let Ok(node) = self.node(ino) else {
            return String::new();
        };
        match std::fs::read_link(proc_path(&node.fd)) {
            Ok(p) => p
                .strip_prefix(&self.root)
                .unwrap_or(&p)
                .to_string_lossy()
                .into_owned(),
            Err(_) => String::new(),
        }
    }

    /// Applies the fail rules to `op` on `ino`.
    fn check_fault(&mut self, op: FaultOp, ino: u64) -> FsResult<()> {
        if self.faults.is_empty() {
            return Ok(());
        }
        let path = self.rel_path(ino);
        match self.faults.check(op, &path) {
            Some(errno) => {
                info!("injecting {errno} into {op} of {path:?}");
                Err(Errno::from_i32(errno.raw()))
            }
            None => Ok(()),
        }
    }

    fn attr(&self, ino: u64) -> FsResult<FileAttr> {
        let node = self.node(ino)?;
        let st: FileStat = nix::sys::stat::fstat(&node.fd).map_err(nix_errno)?;
        let size = match node.kind {
            FileType::RegularFile => node.cache.size(),
            _ => u64::try_from(st.st_size).unwrap_or(0),
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: u64::try_from(st.st_blocks).unwrap_or(0),
            atime: time(st.st_atime, st.st_atime_nsec),
            mtime: time(st.st_mtime, st.st_mtime_nsec),
            ctime: time(st.st_ctime, st.st_ctime_nsec),
            crtime: UNIX_EPOCH,
            kind: node.kind,
            perm: (st.st_mode & 0o7777) as u16,
            nlink: u32::try_from(st.st_nlink).unwrap_or(u32::MAX),
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            blksize: 4096,
            flags: 0,
        })
    }

    // --- namespace ------------------------------------------------------------------------------

    /// Opens `name` in `parent` as `O_PATH` and registers it.
    fn lookup(&mut self, parent: u64, name: &OsStr) -> FsResult<FileAttr> {
        let fd = nix::fcntl::openat(
            &self.node(parent)?.fd,
            name,
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(nix_errno)?;
        let ino = self.insert(fd, None)?;
        self.attr(ino)
    }

    fn forget(&mut self, ino: u64, n: u64) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.lookups = node.lookups.saturating_sub(n);
        }
        self.gc(ino);
    }

    fn create(&mut self, parent: u64, name: &OsStr, mode: u32, flags: i32) -> FsResult<FileAttr> {
        let pfd = &self.node(parent)?.fd;
        let mut oflag = OFlag::O_CREAT | OFlag::O_RDWR | OFlag::O_CLOEXEC;
        oflag |= OFlag::from_bits_truncate(flags) & (OFlag::O_EXCL | OFlag::O_TRUNC);
        let file = File::from(
            nix::fcntl::openat(pfd, name, oflag, Mode::from_bits_truncate(mode & 0o7777))
                .map_err(nix_errno)?,
        );
        let fd = nix::fcntl::openat(
            pfd,
            name,
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(nix_errno)?;
        let st = nix::sys::stat::fstat(&fd).map_err(nix_errno)?;
        let existed = self.ids.contains_key(&(st.st_dev, st.st_ino));
        let ino = self.insert(fd, Some(file))?;
        let node = self.node_mut(ino)?;
        node.opens += 1;
        if existed && oflag.contains(OFlag::O_TRUNC) {
            node.cache.truncate(0);
        }
        self.attr(ino)
    }

    fn mknod(&mut self, parent: u64, name: &OsStr, mode: u32, rdev: u32) -> FsResult<FileAttr> {
        nix::sys::stat::mknodat(
            &self.node(parent)?.fd,
            name,
            SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()),
            Mode::from_bits_truncate(mode & 0o7777),
            u64::from(rdev),
        )
        .map_err(nix_errno)?;
        self.lookup(parent, name)
    }

    fn mkdir(&mut self, parent: u64, name: &OsStr, mode: u32) -> FsResult<FileAttr> {
        nix::sys::stat::mkdirat(
            &self.node(parent)?.fd,
            name,
            Mode::from_bits_truncate(mode & 0o7777),
        )
        .map_err(nix_errno)?;
        self.lookup(parent, name)
    }

    fn symlink(&mut self, parent: u64, name: &OsStr, target: &Path) -> FsResult<FileAttr> {
        nix::unistd::symlinkat(target, &self.node(parent)?.fd, name).map_err(nix_errno)?;
        self.lookup(parent, name)
    }

    fn readlink(&self, ino: u64) -> FsResult<OsString> {
        nix::fcntl::readlinkat(&self.node(ino)?.fd, "").map_err(nix_errno)
    }

    /// The node of the object `name` in `parent` names now, if we have one.
    fn node_at(&self, parent: u64, name: &OsStr) -> Option<u64> {
        let st = nix::sys::stat::fstatat(
            &self.node(parent).ok()?.fd,
            name,
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .ok()?;
        self.ids.get(&(st.st_dev, st.st_ino)).copied()
    }

    fn unlink(&mut self, parent: u64, name: &OsStr, dir: bool) -> FsResult<()> {
        let victim = self.node_at(parent, name);
        let flag = if dir {
            nix::unistd::UnlinkatFlags::RemoveDir
        } else {
            nix::unistd::UnlinkatFlags::NoRemoveDir
        };
        nix::unistd::unlinkat(&self.node(parent)?.fd, name, flag).map_err(nix_errno)?;
        if let Some(ino) = victim {
            self.discard_if_orphan(ino);
        }
        Ok(())
    }

    fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: RenameFlags,
    ) -> FsResult<()> {
        let victim = self.node_at(newparent, newname);
        nix::fcntl::renameat2(
            &self.node(parent)?.fd,
            name,
            &self.node(newparent)?.fd,
            newname,
            nix::fcntl::RenameFlags::from_bits_truncate(flags.bits()),
        )
        .map_err(nix_errno)?;
        if let Some(ino) = victim {
            self.discard_if_orphan(ino);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &mut self,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
    ) -> FsResult<FileAttr> {
        let node = self.node_mut(ino)?;
        if let Some(mode) = mode {
            nix::sys::stat::fchmodat(
                AT_FDCWD,
                &proc_path(&node.fd),
                Mode::from_bits_truncate(mode & 0o7777),
                FchmodatFlags::FollowSymlink,
            )
            .map_err(nix_errno)?;
        }
        if uid.is_some() || gid.is_some() {
            nix::unistd::fchownat(
                &node.fd,
                "",
                uid.map(nix::unistd::Uid::from_raw),
                gid.map(nix::unistd::Gid::from_raw),
                AtFlags::AT_EMPTY_PATH,
            )
            .map_err(nix_errno)?;
        }
        if let Some(size) = size {
            // A truncate/extend is metadata: durable at once in the model.
            node.io()?.set_len(size).map_err(io_errno)?;
            node.cache.truncate(size);
        }
        if atime.is_some() || mtime.is_some() {
            nix::sys::stat::utimensat(
                AT_FDCWD,
                &proc_path(&node.fd),
                &timespec(atime),
                &timespec(mtime),
                UtimensatFlags::FollowSymlink,
            )
            .map_err(nix_errno)?;
        }
        self.attr(ino)
    }

    // --- data -----------------------------------------------------------------------------------

    fn open(&mut self, ino: u64, flags: i32) -> FsResult<()> {
        let node = self.node_mut(ino)?;
        if flags & libc::O_TRUNC != 0 && node.kind == FileType::RegularFile {
            node.io()?.set_len(0).map_err(io_errno)?;
            node.cache.truncate(0);
        }
        node.opens += 1;
        Ok(())
    }

    fn release(&mut self, ino: u64) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.opens = node.opens.saturating_sub(1);
        }
        self.gc(ino);
    }

    fn read(&mut self, ino: u64, off: u64, size: u32) -> FsResult<Vec<u8>> {
        self.faults.reads += 1;
        self.check_fault(FaultOp::Read, ino)?;
        let node = self.node(ino)?;
        node.cache
            .read(node.io()?, off, u64::from(size))
            .map_err(io_errno)
    }

    /// A write into the cache. On a file opened `O_SYNC`/`O_DSYNC` it is followed by an
    /// fdatasync here: the kernel sends no FSYNC for those writes on a direct-I/O file.
    fn write(&mut self, ino: u64, off: u64, data: &[u8], open_flags: i32) -> FsResult<u32> {
        self.faults.writes += 1;
        self.check_fault(FaultOp::Write, ino)?;
        let node = self.node_mut(ino)?;
        let Node { io, cache, .. } = node;
        let io = io.as_ref().ok_or(Errno::EACCES)?;
        cache.write(io, off, data).map_err(io_errno)?;
        if open_flags & libc::O_DSYNC != 0 {
            self.fsync(ino, open_flags & libc::O_SYNC != libc::O_SYNC)?;
        }
        u32::try_from(data.len()).map_err(|_| Errno::EINVAL)
    }

    fn fallocate(&mut self, ino: u64, off: u64, len: u64, mode: i32) -> FsResult<()> {
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        let punch = libc::FALLOC_FL_PUNCH_HOLE;
        let zero = libc::FALLOC_FL_ZERO_RANGE;
        if mode & !(keep | punch | zero) != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        let end = off.checked_add(len).ok_or(Errno::EFBIG)?;
        if mode & (punch | zero) == 0 {
            // Plain allocation changes no data, only space and maybe the size: metadata,
            // applied to the backing file at once.
            let node = self.node_mut(ino)?;
            let io = node.io()?;
            nix::fcntl::fallocate(
                io,
                nix::fcntl::FallocateFlags::from_bits_truncate(mode),
                to_off(off)?,
                to_off(len)?,
            )
            .map_err(nix_errno)?;
            let size = io.metadata().map_err(io_errno)?.len();
            node.cache.set_durable_size(size);
            return Ok(());
        }
        self.check_fault(FaultOp::Write, ino)?;
        let node = self.node_mut(ino)?;
        let Node { io, cache, .. } = node;
        let io = io.as_ref().ok_or(Errno::EACCES)?;
        if mode & zero != 0 && mode & keep == 0 {
            cache.extend(end);
        }
        cache.zero(io, off, len).map_err(io_errno)
    }

    /// fsync/fdatasync of a file: writes its dirty data to the backing file and syncs that. An
    /// injected error models a failed writeback as Linux handles it: the dirty pages are
    /// dropped (marked clean) and the error is reported once, so the next fsync succeeds.
    fn fsync(&mut self, ino: u64, datasync: bool) -> FsResult<()> {
        self.faults.fsyncs += 1;
        if let Err(e) = self.check_fault(FaultOp::Fsync, ino) {
            let dropped = self.node_mut(ino)?.cache.drop_all();
            info!("failed fsync dropped {dropped} dirty bytes");
            return Err(e);
        }
        let node = self.node_mut(ino)?;
        if !node.cache.is_dirty() {
            return Ok(());
        }
        let Node { io, cache, .. } = node;
        let io = io.as_ref().ok_or(Errno::EACCES)?;
        cache.flush(io).map_err(io_errno)?;
        if datasync {
            io.sync_data().map_err(io_errno)
        } else {
            io.sync_all().map_err(io_errno)
        }
    }

    /// Directory entries are durable at once in the model; only the fail rules apply.
    fn fsyncdir(&mut self, ino: u64) -> FsResult<()> {
        self.faults.dir_fsyncs += 1;
        self.check_fault(FaultOp::Fsync, ino)
    }

    fn opendir(&mut self, ino: u64) -> FsResult<u64> {
        let node = self.node(ino)?;
        let mut dir = nix::dir::Dir::openat(
            &node.fd,
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(nix_errno)?;
        let mut entries = Vec::new();
        for e in dir.iter() {
            let e = e.map_err(nix_errno)?;
            let kind = match e.file_type() {
                Some(nix::dir::Type::Directory) => FileType::Directory,
                Some(nix::dir::Type::Symlink) => FileType::Symlink,
                Some(nix::dir::Type::Fifo) => FileType::NamedPipe,
                Some(nix::dir::Type::Socket) => FileType::Socket,
                Some(nix::dir::Type::CharacterDevice) => FileType::CharDevice,
                Some(nix::dir::Type::BlockDevice) => FileType::BlockDevice,
                _ => FileType::RegularFile,
            };
            entries.push(DirEntry {
                ino: e.ino(),
                kind,
                name: OsStr::from_bytes(e.file_name().to_bytes()).to_owned(),
            });
        }
        let fh = self.next_fh;
        self.next_fh += 1;
        self.dirs.insert(fh, entries);
        Ok(fh)
    }

    fn statfs(&self) -> FsResult<nix::sys::statvfs::Statvfs> {
        nix::sys::statvfs::fstatvfs(&self.node(ROOT)?.fd).map_err(nix_errno)
    }
}

/// The FUSE side: each handler locks the state, runs the operation, replies.
pub struct FaultFs {
    state: Arc<State>,
}

impl FaultFs {
    pub fn new(state: Arc<State>) -> FaultFs {
        FaultFs { state }
    }
}

/// The open reply: direct I/O, so the kernel never serves or holds data a cut must drop.
const OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_DIRECT_IO;

fn reply_entry(r: FsResult<FileAttr>, reply: ReplyEntry) {
    match r {
        Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
        Err(e) => reply.error(e),
    }
}

fn reply_empty(r: FsResult<()>, reply: ReplyEmpty) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

impl Filesystem for FaultFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        reply_entry(self.state.lock().lookup(parent.0, name), reply);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.state.lock().forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.state.lock().attr(ino.0) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let r = self
            .state
            .lock()
            .setattr(ino.0, mode, uid, gid, size, atime, mtime);
        match r {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.state.lock().readlink(ino.0) {
            Ok(target) => reply.data(target.as_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        reply_entry(self.state.lock().mknod(parent.0, name, mode, rdev), reply);
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply_entry(self.state.lock().mkdir(parent.0, name, mode), reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(self.state.lock().unlink(parent.0, name, false), reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(self.state.lock().unlink(parent.0, name, true), reply);
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        reply_entry(
            self.state.lock().symlink(parent.0, link_name, target),
            reply,
        );
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = self
            .state
            .lock()
            .rename(parent.0, name, newparent.0, newname, flags);
        reply_empty(r, reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.state.lock().open(ino.0, flags.0) {
            Ok(()) => reply.opened(FileHandle(0), OPEN_FLAGS),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.state.lock().read(ino.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.state.lock().write(ino.0, offset, data, flags.0) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) is not a durability point.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.state.lock().release(ino.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(self.state.lock().fsync(ino.0, datasync), reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.state.lock().opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let inner = self.state.lock();
        let Some(entries) = inner.dirs.get(&fh.0) else {
            reply.error(Errno::EBADF);
            return;
        };
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, e) in entries.iter().enumerate().skip(skip) {
            // The offset of an entry is that of the next one.
            if reply.add(INodeNo(e.ino), i as u64 + 1, e.kind, &e.name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.state.lock().dirs.remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(self.state.lock().fsyncdir(ino.0), reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.state.lock().statfs() {
            Ok(s) => reply.statfs(
                s.blocks(),
                s.blocks_free(),
                s.blocks_available(),
                s.files(),
                s.files_free(),
                s.block_size() as u32,
                s.name_max() as u32,
                s.fragment_size() as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    // Extended attributes are not supported. ENOSYS (without the default handlers' warning)
    // makes the kernel stop asking.
    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Permissions are checked by the kernel (default_permissions).
        reply.ok();
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self.state.lock().create(parent.0, name, mode, flags) {
            Ok(attr) => reply.created(&TTL, &attr, Generation(0), FileHandle(0), OPEN_FLAGS),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        reply_empty(
            self.state.lock().fallocate(ino.0, offset, length, mode),
            reply,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_from_mode() {
        assert_eq!(kind_of(libc::S_IFDIR | 0o755), FileType::Directory);
        assert_eq!(kind_of(libc::S_IFREG | 0o644), FileType::RegularFile);
        assert_eq!(kind_of(libc::S_IFLNK | 0o777), FileType::Symlink);
    }

    #[test]
    fn stats_line_format() {
        let s = Stats {
            dirty_bytes: 4096,
            dirty_files: 1,
            ..Stats::default()
        };
        assert_eq!(
            s.to_string(),
            "dirty_bytes=4096 dirty_files=1 reads=0 writes=0 fsyncs=0 dir_fsyncs=0 injected=0"
        );
    }
}
