//! The replica: the image file, its metadata (`IMG.meta`) and the read cache.
//!
//! Knows nothing about the network. Every operation checks its range against the image size;
//! the cache is invalidated before a change is acknowledged, so reads never see stale data.
//! Metadata changes (SyncStart, SyncDone, creation, promotion) are saved crash-safely before
//! they return. A promotion fences the replica: from then on it refuses every request and has
//! let go of the image.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::{debug, error, info, warn};
use mirror_proto::activity_log::{self, AlError};
use mirror_proto::auth::{self, AuthError};
use mirror_proto::bitmap::Bitmap;
use mirror_proto::bitmap_file::BitmapFile;
use mirror_proto::frame::{
    AckStatus, DiskState, NodeInfo, Role, MAX_HISTORY, MAX_HOT, NODE_FLAG_DISCARD_MY_DATA,
    NODE_FLAG_HASHES,
};
use mirror_proto::generation;
use mirror_proto::meta::{self, Meta, MetaError, META_FORMAT};
use mirror_proto::sys::AlignedBuf;
use thiserror::Error;

use crate::cache::ReadCache;
use crate::status::{Counters, Status};

#[derive(Debug, Error)]
pub enum ReplicaError {
    #[error("cannot open image {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("image {path} is not a regular file or block device")]
    NotAFile { path: PathBuf },
    #[error("image {path} is in use by another process (locked)")]
    Locked { path: PathBuf },
    #[error("cannot create image {path} of {size} bytes")]
    Create {
        path: PathBuf,
        size: u64,
        #[source]
        source: io::Error,
    },
    #[error("image {path} has {image} bytes but the primary's disk has {primary} bytes")]
    SizeMismatch {
        path: PathBuf,
        image: u64,
        primary: u64,
    },
    #[error("the primary reports a disk of 0 bytes")]
    EmptyPrimary,
    #[error("no image yet (no primary has attached)")]
    NoImage,
    #[error("I/O at offset {offset} length {len} is outside the image ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("{op} failed at offset {offset}")]
    Io {
        op: &'static str,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    ActivityLog(#[from] AlError),
    #[error(
        "{image} was a primary's image and its activity log cannot be read, so which extents \
         its last run may have left different from the peer is unknown: refusing to pair. To \
         have the primary copy the whole image over it (its own changes are lost), remove {meta} \
         and {al}"
    )]
    HotExtentsUnknown {
        image: PathBuf,
        meta: PathBuf,
        al: PathBuf,
        #[source]
        source: AlError,
    },
    #[error(
        "{image} belonged to a primary whose out-of-sync bitmap cannot be read or lists more \
         than 256 extents: which regions it wrote without its replica is unknown, so it is not \
         paired; to have it copied whole, remove {meta}"
    )]
    BitmapRegionsUnknown { image: PathBuf, meta: PathBuf },
    #[error("cannot create a node id")]
    NodeId(#[source] AuthError),
    #[error("cannot create a generation id")]
    Generation(#[source] AuthError),
    #[error("this node was promoted: it serves no primary any more")]
    Fenced,
    #[error("no image {path} to promote")]
    NothingToPromote { path: PathBuf },
    #[error("refusing to promote {path}: its data is {state}; --force promotes it anyway")]
    NotUpToDate { path: PathBuf, state: &'static str },
    #[error(
        "refusing to promote {path}: the witness recorded it outdated (its primary went on \
         acknowledging writes without it); --force promotes it anyway, without those writes"
    )]
    WitnessOutdated { path: PathBuf },
    #[error(
        "refusing to promote {path}: no consent from the witness at {addr} (it answered \
         {status:?}); --force promotes without it"
    )]
    WitnessFailed {
        path: PathBuf,
        addr: String,
        status: AckStatus,
    },
    #[error(
        "refusing to promote {path}: the witness at {addr} cannot be asked, and no promotion \
         goes without its consent; --force promotes without it"
    )]
    WitnessUnreachable {
        path: PathBuf,
        addr: String,
        #[source]
        source: mirror_proto::witness::AskError,
    },
}

/// `--witness ADDR`: the quorum witness whose consent a promotion needs (the pair's secret).
#[derive(Debug, Clone)]
pub struct WitnessCfg {
    pub addr: String,
    pub secret: mirror_proto::auth::Secret,
}

/// How long a promotion waits for the witness.
const WITNESS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl ReplicaError {
    /// How a failed request is answered.
    pub fn ack_status(&self) -> AckStatus {
        match self {
            ReplicaError::OutOfRange { .. } => AckStatus::OutOfRange,
            ReplicaError::Fenced => AckStatus::Fenced,
            ReplicaError::Io { source, .. } if is_no_space(source) => AckStatus::NoSpace,
            _ => AckStatus::IoError,
        }
    }
}

/// ENOSPC, a quota, or a file-size limit (EFBIG: RLIMIT_FSIZE, with SIGXFSZ ignored).
fn is_no_space(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSPC) | Some(libc::EFBIG) | Some(libc::EDQUOT)
    )
}

#[derive(Debug)]
struct Image {
    /// Shared with the session's flusher for the length of one `fdatasync` (no second
    /// descriptor: a `dup` can fail, a `close` can flush).
    file: Arc<File>,
    size: u64,
    /// Made on the first ReadHashes (`Replica::hash_reader`): read-only descriptors of their
    /// own (whose `close` flushes nothing), without this one's lock.
    reader: Option<Arc<HashReader>>,
    /// A [`HashReader`] could not be made: hashes are read under the replica's lock.
    no_reader: bool,
}

impl Image {
    fn new(file: File, size: u64) -> Image {
        Image {
            file: Arc::new(file),
            size,
            reader: None,
            no_reader: false,
        }
    }
}

/// Alignment of `O_DIRECT` reads (memory, offset, length): a page, a multiple of every
/// logical block size Linux supports below it.
const DIRECT_ALIGN: usize = mirror_proto::sys::PAGE_ALIGN;

/// The page cache keeps a file in folios of up to 2 MiB (x86-64, 4 KiB pages), and
/// `POSIX_FADV_DONTNEED` drops whole folios only.
const FOLIO_MAX: u64 = 2 << 20;

/// How a hash worker reads the image (session.rs, `hasher.rs`) without holding the replica's
/// lock, so the session applies the requests behind a ReadHashes meanwhile: open file
/// descriptions of its own, made by reopening the image through `/proc/self/fd` (the same
/// inode whatever happened to the path). They carry no `flock`, so one a worker still holds
/// does not keep the image locked once a promotion released it.
///
/// **What it reads is what the disk holds** (ARCHITECTURE.md, "Hashes are of the disk, not
/// of the page cache"): after a failed writeback Linux keeps the lost data in pages it marked
/// clean and serves it to buffered reads. The range is read with `O_DIRECT`, which reads the
/// disk after writing back the range's dirty pages (a failure of that writeback fails the
/// read; `fdatasync` still reports it, see `read`), and the range's clean pages are dropped
/// first, so that where a filesystem refuses or quietly declines `O_DIRECT` (tmpfs, an
/// unaligned tail, data journalling, ...) the buffered read comes from the disk too.
#[derive(Debug)]
pub struct HashReader {
    plain: File,
    /// None: the filesystem refused `O_DIRECT`.
    direct: Option<File>,
}

impl HashReader {
    fn open(image: &File) -> io::Result<HashReader> {
        let path = format!("/proc/self/fd/{}", image.as_raw_fd());
        let plain = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)?;
        let direct = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_DIRECT)
            .open(&path);
        let direct = match direct {
            Ok(f) => Some(f),
            Err(e) => {
                debug!("no O_DIRECT for block hashes ({e}): read through the dropped page cache");
                None
            }
        };
        Ok(HashReader { plain, direct })
    }

    /// Whether reads go past the page cache (`O_DIRECT`).
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// Reads `offset..offset + len` as the disk holds it into `raw` (scratch space, grown as
    /// needed); the bytes read.
    ///
    /// Writeback errors: an `O_DIRECT` read first writes back the range's dirty pages
    /// (`filemap_write_and_wait_range`); if that fails, the read fails with the error and the
    /// primary sees a failed ReadHashes (the end of the link), never hashes. The read takes
    /// only the mapping's `AS_EIO` flag; `fdatasync` reports writeback errors through the
    /// mapping's `errseq_t` (`file_check_and_advance_wb_err`, Linux 4.13 on), sampled per open
    /// file description, which a read never advances: the image's next `fdatasync` still
    /// fails (tested: writeback.rs).
    pub fn read<'b>(
        &self,
        offset: u64,
        len: usize,
        raw: &'b mut AlignedBuf,
    ) -> Result<&'b [u8], ReplicaError> {
        let io_err = |op, source| ReplicaError::Io { op, offset, source };
        drop_clean_range(&self.plain, offset, len as u64)
            .map_err(|e| io_err("posix_fadvise(DONTNEED) before hashing", e))?;
        let buf = raw.get(len);
        let mut done = 0;
        if let Some(direct) = &self.direct {
            if offset.is_multiple_of(DIRECT_ALIGN as u64) {
                let n = len / DIRECT_ALIGN * DIRECT_ALIGN;
                match direct.read_exact_at(&mut buf[..n], offset) {
                    Ok(()) => done = n,
                    // Refused for this range (a logical block larger than a page): read
                    // through the page cache, dropped above.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                    Err(e) => return Err(io_err("read (O_DIRECT)", e)),
                }
            }
        }
        self.plain
            .read_exact_at(&mut buf[done..], offset + done as u64)
            .map_err(|e| io_err("read", e))?;
        Ok(buf)
    }
}

/// Drops the clean pages of `offset..offset + len` from the page cache, the range widened to
/// whole [`FOLIO_MAX`] blocks (a 4 KiB drop kept a lost block inside a larger clean folio on
/// ext4). Dirty pages stay (they are what the next `fdatasync` writes).
fn drop_clean_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let start = offset & !(FOLIO_MAX - 1);
    let end = offset.saturating_add(len).div_ceil(FOLIO_MAX) * FOLIO_MAX;
    let off = libc::off_t::try_from(start).unwrap_or(libc::off_t::MAX);
    let n = libc::off_t::try_from(end - start).unwrap_or(0);
    // SAFETY: posix_fadvise on a file descriptor we own; no memory is passed.
    let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), off, n, libc::POSIX_FADV_DONTNEED) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// The image, its metadata and the read cache. One primary at a time drives it.
#[derive(Debug)]
pub struct Replica {
    path: PathBuf,
    /// None until the first primary attaches (when the image did not exist at startup).
    image: Option<Image>,
    meta: Option<Meta>,
    cache: ReadCache,
    status: Arc<Status>,
    /// Promoted: every request is refused, the image is closed.
    fenced: bool,
    /// Announce NODE_FLAG_DISCARD_MY_DATA (until a resync finished).
    discard_my_data: bool,
    /// An `fdatasync` of the image failed: the kernel reports a writeback error once, to one
    /// caller, so every later flush, through any path, must fail too.
    writeback_failed: bool,
    /// Tests: runs before every `fdatasync` of the image (to hold it, or to fail it).
    #[cfg(test)]
    pub sync_hook: Option<SyncHook>,
}

#[cfg(test)]
#[derive(Clone)]
pub struct SyncHook(pub Arc<dyn Fn() -> io::Result<()> + Send + Sync>);

#[cfg(test)]
impl std::fmt::Debug for SyncHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SyncHook")
    }
}

/// An image's `fdatasync`, as every path does it (the flusher's, promote's, SyncDone's, the
/// final ones).
pub struct Syncer {
    file: Arc<File>,
    #[cfg(test)]
    hook: Option<SyncHook>,
}

impl Syncer {
    pub fn sync(&self) -> io::Result<()> {
        #[cfg(test)]
        if let Some(h) = &self.hook {
            (h.0)()?;
        }
        self.file.sync_data()
    }
}

/// What [`Replica::promote`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Promotion {
    pub previous_generation: u64,
    pub generation: u64,
    /// The metadata already said primary (and up to date): nothing was changed.
    pub already_primary: bool,
    /// The data was not up to date (`--force`).
    pub forced: bool,
    /// Promoted without a witness: nothing proved the old primary had stopped acknowledging
    /// writes (after an unclean loss of the primary, this image may lack some).
    pub unverified: bool,
}

impl Replica {
    /// Opens and locks the image if it exists and reads its metadata; a missing image is created
    /// when the first primary attaches.
    pub fn open(path: &Path, cache_bytes: u64, status: Arc<Status>) -> Result<Self, ReplicaError> {
        let image = open_existing(path)?;
        let meta = if image.is_some() {
            meta::load_upgrading(path)?
        } else {
            None
        };
        let r = Replica {
            path: path.to_owned(),
            image,
            meta,
            cache: ReadCache::new(cache_bytes),
            status,
            fenced: false,
            discard_my_data: false,
            writeback_failed: false,
            #[cfg(test)]
            sync_hook: None,
        };
        r.publish();
        Ok(r)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether Attached carries NODE_FLAG_DISCARD_MY_DATA (`serve --discard-my-data`).
    pub fn set_discard_my_data(&mut self, on: bool) {
        self.discard_my_data = on;
    }

    /// The data path after a promotion: refused.
    fn live(&self) -> Result<(), ReplicaError> {
        if self.fenced {
            Err(ReplicaError::Fenced)
        } else {
            Ok(())
        }
    }

    /// Promoted: no primary's request is served any more.
    pub fn is_fenced(&self) -> bool {
        self.fenced
    }

    /// The image's `fdatasync`, for the session's flusher thread (which holds `Node::flush_gate`
    /// meanwhile; the image is released only under it).
    pub fn syncer(&self) -> Result<Syncer, ReplicaError> {
        Ok(Syncer {
            file: self.image()?.file.clone(),
            #[cfg(test)]
            hook: self.sync_hook.clone(),
        })
    }

    /// Whether an `fdatasync` of the image ever failed.
    pub fn writeback_failed(&self) -> bool {
        self.writeback_failed
    }

    /// An `fdatasync` of the image failed (here or in the flusher): from now on every flush
    /// fails, and the image is recorded outdated (durably) before anyone hears of it.
    pub fn flush_failed(&mut self) -> Result<(), ReplicaError> {
        self.writeback_failed = true;
        self.mark_outdated()
    }

    /// Image size in bytes (0: no image yet).
    pub fn size(&self) -> u64 {
        self.image.as_ref().map_or(0, |i| i.size)
    }

    fn publish(&self) {
        let (role, state, generation) = match &self.meta {
            Some(m) => (m.role, m.disk_state, m.generation),
            None => (Role::Secondary, DiskState::Inconsistent, 0),
        };
        self.status.set_disk(role, state, generation, self.size());
    }

    /// This node's state, as sent in Attached (without the hot extents: see [`Self::attach`]).
    pub fn node_info(&self) -> NodeInfo {
        let m = self.meta.as_ref();
        NodeInfo {
            node_id: m.map_or(0, |m| m.node_id),
            size: self.size(),
            role: m.map_or(Role::Secondary, |m| m.role),
            disk_state: m.map_or(DiskState::Inconsistent, |m| m.disk_state),
            generation: m.map_or(0, |m| m.generation),
            bitmap_generation: 0,
            history: m.map_or_else(Vec::new, |m| m.history.clone()),
            flags: NODE_FLAG_HASHES
                | if self.discard_my_data {
                    NODE_FLAG_DISCARD_MY_DATA
                } else {
                    0
                },
            hot: Vec::new(),
        }
    }

    /// Extents the activity log beside the image lists (non-empty when the image belonged to a
    /// primary that stopped uncleanly). A damaged log of a primary's image is an error (which
    /// extents may differ is unknown: pairing would leave them different); a secondary's log
    /// means nothing (its data is its generation's, whatever ran before), so a damaged one is
    /// only reported.
    pub fn hot_extents(&self) -> Result<Vec<u64>, ReplicaError> {
        match activity_log::read(&self.path) {
            Err(e @ AlError::Damaged { .. })
                if self.meta.as_ref().is_some_and(|m| m.role == Role::Primary) =>
            {
                Err(ReplicaError::HotExtentsUnknown {
                    image: self.path.clone(),
                    meta: meta::meta_path(&self.path),
                    al: activity_log::al_path(&self.path),
                    source: e,
                })
            }
            Err(e @ AlError::Damaged { .. }) => {
                warn!("{} (not needed for a secondary's image)", crate::chain(&e));
                Ok(Vec::new())
            }
            r => Ok(r?),
        }
    }

    /// A primary with a disk of `size` bytes attaches: checks an existing image's size (without
    /// changing anything if it differs), or creates the image sparse; makes sure metadata exists.
    /// The answer lists the activity log's hot extents.
    pub fn attach(&mut self, size: u64) -> Result<NodeInfo, ReplicaError> {
        self.live()?;
        if size == 0 {
            return Err(ReplicaError::EmptyPrimary);
        }
        if self.writeback_failed {
            // A failed fdatasync in an earlier session: the image is recorded outdated (now,
            // if that failed then) and the new primary resyncs what it sent unflushed; the
            // kernel reported the error already, flushes from here on are real again.
            self.mark_outdated()?;
            self.writeback_failed = false;
        }
        if self.image.is_none() {
            // Someone may have put an image there since startup.
            self.image = open_existing(&self.path)?;
            if self.image.is_some() {
                self.meta = meta::load_upgrading(&self.path)?;
            }
        }
        match &mut self.image {
            Some(img) => {
                // The file may have been resized behind our back: ask again.
                img.size = file_size(&img.file).map_err(|source| ReplicaError::Open {
                    path: self.path.clone(),
                    source,
                })?;
                if img.size != size {
                    return Err(ReplicaError::SizeMismatch {
                        path: self.path.clone(),
                        image: img.size,
                        primary: size,
                    });
                }
                // Whatever filled the cache before (a resync, a copy), the primary's small
                // writes should find small folios (`drop_clean_cache`).
                drop_clean_cache(&img.file, &self.path);
            }
            None => {
                self.image = Some(create(&self.path, size)?);
                self.meta = None;
                info!(
                    "created image {} ({size} bytes, sparse)",
                    self.path.display()
                );
            }
        }
        let fresh = match &self.meta {
            None => Some(None),
            Some(m) if m.size != size => {
                warn!(
                    "{}: metadata is for {} bytes, the image has {size}: its content is unknown",
                    meta::meta_path(&self.path).display(),
                    m.size
                );
                Some(Some(m.node_id))
            }
            Some(_) => None,
        };
        if let Some(node_id) = fresh {
            let node_id = match node_id {
                Some(id) => id,
                None => auth::random_id().map_err(ReplicaError::NodeId)?,
            };
            let m = Meta {
                format: META_FORMAT,
                node_id,
                size,
                role: Role::Secondary,
                disk_state: DiskState::Inconsistent,
                generation: 0,
                bitmap_generation: 0,
                history: Vec::new(),
            };
            meta::save(&self.path, &m)?;
            self.meta = Some(m);
        }
        self.publish();
        let mut info = self.node_info();
        info.hot = self.hot_extents()?;
        if let Some((g, base)) = self.bitmap_base() {
            // A former primary's image with an out-of-sync bitmap: what it wrote without its
            // replica since `base` is in the bitmap's regions (besides the log's hot extents,
            // which a barrier over a dead link may have emptied). Held at its generation
            // (base == generation: vhost-mirror's out_of_sync.rs, deferred generations), none
            // of it was acknowledged, and a node promoted from `g` overwrites it.
            let listed = match self.bitmap_extents() {
                Some(extra) => {
                    info.hot.extend(extra);
                    info.hot.sort_unstable();
                    info.hot.dedup();
                    info.hot.len() <= MAX_HOT
                }
                None => false,
            };
            if !listed && g == base {
                warn!(
                    "{}: which regions this former primary wrote since generation {g:016x} \
                     (none acknowledged) cannot be listed: paired as a new image (a full copy)",
                    self.path.display()
                );
                info.hot.clear();
                info.generation = 0;
            } else if !listed {
                return Err(ReplicaError::BitmapRegionsUnknown {
                    image: self.path.clone(),
                    meta: meta::meta_path(&self.path),
                });
            }
        }
        Ok(info)
    }

    /// A primary's image with an out-of-sync bitmap: (its generation, the bitmap's base).
    fn bitmap_base(&self) -> Option<(u64, u64)> {
        self.meta
            .as_ref()
            .filter(|m| m.role == Role::Primary && m.bitmap_generation != 0)
            .map(|m| (m.generation, m.bitmap_generation))
    }

    /// The activity-log extents holding the out-of-sync bitmap's set regions; None if the
    /// bitmap is missing or is not this image's (anything may differ then).
    fn bitmap_extents(&self) -> Option<Vec<u64>> {
        let b = match mirror_proto::bitmap_file::read(&self.path, self.size()) {
            Ok(Some(b)) => b,
            Ok(None) => return None,
            Err(e) => {
                warn!("{}", crate::chain(&e));
                return None;
            }
        };
        let per_extent = activity_log::EXTENT_SIZE / mirror_proto::bitmap::REGION_SIZE;
        let mut out: Vec<u64> = Vec::new();
        let mut from = 0;
        while let Some((first, count)) = b.next_run(from, u64::MAX) {
            for e in first / per_extent..=(first + count - 1) / per_extent {
                if out.last() != Some(&e) {
                    out.push(e);
                }
            }
            if out.len() > MAX_HOT {
                break;
            }
            from = first + count;
        }
        Some(out)
    }

    fn image(&self) -> Result<&Image, ReplicaError> {
        self.image.as_ref().ok_or(ReplicaError::NoImage)
    }

    fn check(&self, offset: u64, len: u64) -> Result<&Image, ReplicaError> {
        check_range(self.image.as_ref(), offset, len)
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), ReplicaError> {
        self.live()?;
        self.check(offset, data.len() as u64)?;
        self.invalidate(offset, data.len() as u64);
        self.image()?
            .file
            .write_all_at(data, offset)
            .map_err(|source| ReplicaError::Io {
                op: "write",
                offset,
                source,
            })
    }

    /// Deallocates a range; it reads back as zeros.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<(), ReplicaError> {
        self.write_zeroes(offset, len, true)
    }

    /// Zeroes a range, deallocating it if `unmap`.
    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), ReplicaError> {
        self.live()?;
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.invalidate(offset, len);
        zero_range(&self.image()?.file, offset, len, unmap)
    }

    /// Makes every completed write durable (fdatasync). A failure is sticky and recorded
    /// (`flush_failed`): a writeback error is reported only once.
    pub fn flush(&mut self) -> Result<(), ReplicaError> {
        let r = match &self.image {
            Some(_) if self.writeback_failed => Err(io::Error::other(
                "an earlier fdatasync of this image failed: its data may be incomplete",
            )),
            Some(_) => self.syncer().map_or(Ok(()), |s| s.sync()),
            None => Ok(()),
        };
        r.map_err(|source| {
            if let Err(me) = self.flush_failed() {
                error!(
                    "{}: cannot record that the image is outdated after a failed fdatasync: {}",
                    self.path.display(),
                    crate::chain(&me)
                );
            }
            ReplicaError::Io {
                op: "fdatasync",
                offset: 0,
                source,
            }
        })
    }

    /// Reads through the cache.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ReplicaError> {
        self.live()?;
        // Borrows only the image field, so the cache stays available.
        let img = check_range(self.image.as_ref(), offset, buf.len() as u64)?;
        let (file, size) = (&img.file, img.size);
        let stats = self
            .cache
            .read(offset, buf, size, |o, b| file.read_exact_at(b, o))
            .map_err(|source| ReplicaError::Io {
                op: "read",
                offset,
                source,
            })?;
        let c = &self.status.counters;
        Counters::add(&c.cache_hits, stats.hits);
        Counters::add(&c.cache_misses, stats.misses);
        c.cache_bytes
            .store(self.cache.bytes(), std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Appends the block hashes (`mirror_proto::blockhash`) of `offset..offset + len` as the
    /// image holds them, read past the read cache (which it would only flush out); `buf` is
    /// scratch space.
    ///
    /// The range's clean pages are dropped from the kernel's page cache first, so the hashes
    /// are of what the disk holds: after a failed writeback, Linux keeps serving the lost
    /// data from pages it marked clean, and hashes of those would call a block equal that the
    /// disk lacks (a resync would skip it, and a verify pass it). Dirty pages stay (they are
    /// what the next `fdatasync` writes; if that fails, the Flush fails and nothing is
    /// cleared). The way used where no [`HashReader`] can be made (it holds the replica's
    /// lock throughout).
    pub fn hashes(
        &mut self,
        offset: u64,
        len: usize,
        buf: &mut AlignedBuf,
        out: &mut Vec<u8>,
    ) -> Result<(), ReplicaError> {
        self.live()?;
        let img = check_range(self.image.as_ref(), offset, len as u64)?;
        let buf = buf.get(len);
        drop_clean_range(&img.file, offset, len as u64).map_err(|source| ReplicaError::Io {
            op: "posix_fadvise(DONTNEED) before hashing",
            offset,
            source,
        })?;
        img.file
            .read_exact_at(buf, offset)
            .map_err(|source| ReplicaError::Io {
                op: "read",
                offset,
                source,
            })?;
        mirror_proto::blockhash::hash_blocks(buf, out);
        Ok(())
    }

    /// The image's [`HashReader`] if `offset..offset + len` lies inside it (made on first
    /// use); None if none can be made (no `/proc`): then [`Replica::hashes`] reads under the
    /// replica's lock.
    pub fn hash_reader(
        &mut self,
        offset: u64,
        len: u64,
    ) -> Result<Option<Arc<HashReader>>, ReplicaError> {
        self.live()?;
        check_range(self.image.as_ref(), offset, len)?;
        let Some(img) = self.image.as_mut() else {
            return Err(ReplicaError::NoImage);
        };
        if img.reader.is_none() && !img.no_reader {
            match HashReader::open(&img.file) {
                Ok(r) => {
                    info!(
                        "{}: block hashes read {}",
                        self.path.display(),
                        if r.is_direct() {
                            "with O_DIRECT"
                        } else {
                            "through the page cache (O_DIRECT refused), its clean pages dropped"
                        }
                    );
                    img.reader = Some(Arc::new(r));
                }
                Err(e) => {
                    warn!(
                        "{}: cannot reopen the image through /proc/self/fd ({e}): block hashes \
                         are read while the session waits",
                        self.path.display()
                    );
                    img.no_reader = true;
                }
            }
        }
        Ok(img.reader.clone())
    }

    fn invalidate(&mut self, offset: u64, len: u64) {
        self.cache.invalidate(offset, len);
        self.status
            .counters
            .cache_bytes
            .store(self.cache.bytes(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Replaces the metadata durably; memory follows only once the file is written.
    fn update_meta(&mut self, f: impl FnOnce(&mut Meta)) -> Result<(), ReplicaError> {
        let mut m = self.meta.clone().ok_or(ReplicaError::NoImage)?;
        f(&mut m);
        meta::save(&self.path, &m)?;
        self.meta = Some(m);
        self.publish();
        Ok(())
    }

    /// A request failed (no space, an I/O error): this image now lacks a write the primary
    /// made, so it records itself outdated, durably, before the failure is answered; a
    /// later promotion refuses it without `--force`. On a full disk the metadata is written
    /// in place. If even that fails, the state is outdated in memory (status, promote through
    /// the control socket) and the error is returned: the caller must not answer the request
    /// (the primary then marks it when the connection drops).
    pub fn mark_outdated(&mut self) -> Result<(), ReplicaError> {
        let Some(m) = self.meta.as_ref().filter(|_| !self.fenced) else {
            // No metadata (nothing to protect), or promoted meanwhile: not a replica any more.
            return Ok(());
        };
        if m.disk_state != DiskState::UpToDate {
            // Inconsistent (a resync runs) or outdated already: not promotable either way.
            return Ok(());
        }
        let mut m = m.clone();
        m.disk_state = DiskState::Outdated;
        let saved = meta::save(&self.path, &m).or_else(|e| {
            warn!(
                "{}: {}; writing it in place",
                meta::meta_path(&self.path).display(),
                crate::chain(&e)
            );
            meta::save_in_place(&self.path, &m)
        });
        self.meta = Some(m);
        self.publish();
        saved.map_err(ReplicaError::Meta)
    }

    /// A resync starts: the image is inconsistent until SyncDone.
    pub fn sync_start(&mut self) -> Result<(), ReplicaError> {
        self.live()?;
        self.update_meta(|m| m.disk_state = DiskState::Inconsistent)
    }

    /// A resync finished: every write of `generation` is in the image; make that durable, then
    /// record it. The node is a secondary from now on (also a former primary: its data is the
    /// primary's now), so its activity log and `--discard-my-data` no longer mean anything.
    pub fn sync_done(&mut self, new_generation: u64) -> Result<(), ReplicaError> {
        self.live()?;
        self.flush()?;
        let was_primary = self.meta.as_ref().is_some_and(|m| m.role == Role::Primary);
        self.update_meta(|m| {
            if m.generation != new_generation {
                generation::push_history(&mut m.history, m.generation, MAX_HISTORY);
            }
            m.generation = new_generation;
            m.disk_state = DiskState::UpToDate;
            m.role = Role::Secondary;
            m.bitmap_generation = 0;
        })?;
        if was_primary {
            info!(
                "{} was a primary's image: it is a secondary now",
                self.path.display()
            );
        }
        // After the metadata: a crash in between leaves hot extents that only get copied again.
        activity_log::clear(&self.path)?;
        if std::mem::take(&mut self.discard_my_data) {
            info!("--discard-my-data served its purpose: later attaches keep this node's data");
        }
        // The resync's writes are durable (clean): their large folios go.
        if let Some(img) = &self.image {
            drop_clean_cache(&img.file, &self.path);
        }
        Ok(())
    }

    /// Makes this replica the primary's image: refuses unless its data is up to date (or
    /// `force`); makes the image durable; writes a clear bitmap and an empty activity log for
    /// `vhost-mirror`; then records, durably, a new generation whose bitmap is relative to the
    /// old one (so the old primary, back at that generation, gets a partial resync), role
    /// primary. An image already recorded as an up-to-date primary is left as it is. Either
    /// way the replica is fenced and lets go of the image (the file lock is released). On an
    /// error the metadata is unchanged and the replica goes on serving.
    /// Promotes with the witness's consent (when there is a witness): the witness records the
    /// promotion of the generation this replica holds up to date before anything changes
    /// here; it refuses a replica a primary recorded outdated. `force` promotes also without
    /// the consent (logged). Without a witness, nothing proves that the old primary stopped
    /// acknowledging writes when the link went: [`Promotion::unverified`] says so.
    pub fn promote_with(
        &mut self,
        force: bool,
        witness: Option<&WitnessCfg>,
    ) -> Result<Promotion, ReplicaError> {
        self.live()?;
        // An up-to-date secondary asks about its generation (also one promoted by force
        // whatever its state: the witness then supersedes its old primary too); one that
        // will be refused as not up to date must not be recorded. An image that is primary
        // already (a former primary, back after a failover elsewhere) asks about its base and
        // its generation: a node promoted from its base since means this image lacks that
        // node's writes.
        let asks: Vec<u64> = match self.meta.as_ref() {
            Some(m)
                if m.role == Role::Secondary && (force || m.disk_state == DiskState::UpToDate) =>
            {
                vec![m.generation]
            }
            Some(m) if m.role == Role::Primary => {
                let mut v = Vec::new();
                if m.bitmap_generation != 0 && m.bitmap_generation != m.generation {
                    v.push(m.bitmap_generation);
                }
                v.push(m.generation);
                v
            }
            _ => Vec::new(),
        };
        let node = self.meta.as_ref().map_or(0, |m| m.node_id);
        if let Some(w) = witness {
            for &g in &asks {
                let refused = match mirror_proto::witness::ask(
                    &w.addr,
                    &w.secret,
                    mirror_proto::frame::WitnessOp::Promote,
                    g,
                    node,
                    WITNESS_TIMEOUT,
                ) {
                    Ok(AckStatus::Ok) => None,
                    Ok(AckStatus::Outdated) => Some(ReplicaError::WitnessOutdated {
                        path: self.path.clone(),
                    }),
                    Ok(status) => Some(ReplicaError::WitnessFailed {
                        path: self.path.clone(),
                        addr: w.addr.clone(),
                        status,
                    }),
                    Err(source) => Some(ReplicaError::WitnessUnreachable {
                        path: self.path.clone(),
                        addr: w.addr.clone(),
                        source,
                    }),
                };
                match refused {
                    None => info!(
                        "the witness at {} consents: generation {g:016x} promoted (recorded)",
                        w.addr
                    ),
                    Some(e) if !force => return Err(e),
                    Some(e) => {
                        warn!("promoting by force: {}", crate::chain(&e));
                        break;
                    }
                }
            }
        }
        let mut p = self.promote(force).inspect_err(|e| {
            if witness.is_some() && !asks.is_empty() {
                warn!(
                    "the witness recorded this promotion, but it failed here ({}): the old \
                     primary will be refused; retry the promotion (the witness consents again)",
                    crate::chain(e)
                );
            }
        })?;
        p.unverified = witness.is_none() && !p.already_primary;
        Ok(p)
    }

    pub fn promote(&mut self, force: bool) -> Result<Promotion, ReplicaError> {
        self.live()?;
        let Some(img) = &self.image else {
            return Err(ReplicaError::NothingToPromote {
                path: self.path.clone(),
            });
        };
        let size = file_size(&img.file).map_err(|source| ReplicaError::Open {
            path: self.path.clone(),
            source,
        })?;
        let (up_to_date, state) = match &self.meta {
            None => (false, "of unknown content (no metadata)"),
            Some(m) if m.size != size => (false, "of unknown content (metadata for another size)"),
            Some(m) => match m.disk_state {
                DiskState::UpToDate => (true, "up to date"),
                DiskState::Inconsistent => (false, "inconsistent (a sync did not finish)"),
                DiskState::Outdated => (false, "outdated"),
            },
        };
        if !up_to_date && !force {
            return Err(ReplicaError::NotUpToDate {
                path: self.path.clone(),
                state,
            });
        }
        self.flush()?;
        let old = self.meta.clone();
        if let Some(m) = old
            .as_ref()
            .filter(|m| up_to_date && m.role == Role::Primary)
        {
            let g = m.generation;
            self.release();
            return Ok(Promotion {
                previous_generation: g,
                generation: g,
                already_primary: true,
                forced: false,
                unverified: false,
            });
        }
        let previous = old.as_ref().map_or(0, |m| m.generation);
        let mut m = match old {
            Some(m) => m,
            None => Meta {
                format: META_FORMAT,
                node_id: auth::random_id().map_err(ReplicaError::NodeId)?,
                size,
                role: Role::Secondary,
                disk_state: DiskState::Inconsistent,
                generation: 0,
                bitmap_generation: 0,
                history: Vec::new(),
            },
        };
        // Meaningless while the metadata says secondary: a crash before it is saved leaves
        // nothing wrong.
        write_clear_bitmap(&self.path, size)?;
        activity_log::clear(&self.path)?;
        generation::push_history(&mut m.history, previous, MAX_HISTORY);
        m.generation = auth::random_id().map_err(ReplicaError::Generation)?;
        // Only data that is exactly the old generation's may claim "the old generation plus
        // what the bitmap lists"; a forced image is a mix, so any peer gets a full sync.
        m.bitmap_generation = if up_to_date { previous } else { 0 };
        m.role = Role::Primary;
        m.disk_state = DiskState::UpToDate;
        m.size = size;
        meta::save(&self.path, &m)?;
        let generation = m.generation;
        self.meta = Some(m);
        self.release();
        Ok(Promotion {
            previous_generation: previous,
            generation,
            already_primary: false,
            forced: !up_to_date,
            unverified: false,
        })
    }

    /// Fences the replica and closes the image (which releases its lock).
    fn release(&mut self) {
        self.fenced = true;
        self.publish();
        self.image = None;
        self.cache = ReadCache::new(0);
        self.status
            .counters
            .cache_bytes
            .store(0, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Makes `IMG.bitmap` an all-clear bitmap for `size` bytes; one for another size is replaced.
fn write_clear_bitmap(image: &Path, size: u64) -> Result<(), MetaError> {
    let file = match BitmapFile::open_or_create(image, size) {
        Ok((f, _)) => f,
        Err(MetaError::BadBitmap { path, .. }) => {
            warn!("replacing {}: it is not for this image", path.display());
            std::fs::remove_file(&path).map_err(|source| MetaError::Write { path, source })?;
            BitmapFile::open_or_create(image, size)?.0
        }
        Err(e) => return Err(e),
    };
    file.persist_all(&Bitmap::new(size))
}

/// The image, if `offset..offset + len` lies inside it.
fn check_range(image: Option<&Image>, offset: u64, len: u64) -> Result<&Image, ReplicaError> {
    let img = image.ok_or(ReplicaError::NoImage)?;
    match offset.checked_add(len) {
        Some(end) if end <= img.size => Ok(img),
        _ => Err(ReplicaError::OutOfRange {
            offset,
            len,
            size: img.size,
        }),
    }
}

/// Opens and locks `path` read-write; `Ok(None)` if it does not exist.
fn open_existing(path: &Path) -> Result<Option<Image>, ReplicaError> {
    let open_err = |source| ReplicaError::Open {
        path: path.to_owned(),
        source,
    };
    let file = match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(open_err(e)),
    };
    let ft = file.metadata().map_err(open_err)?.file_type();
    if !ft.is_file() && !ft.is_block_device() {
        return Err(ReplicaError::NotAFile {
            path: path.to_owned(),
        });
    }
    lock(&file, path)?;
    let size = file_size(&file).map_err(open_err)?;
    Ok(Some(Image::new(file, size)))
}

/// Creates a sparse image of `size` bytes; nothing is left behind if that fails.
fn create(path: &Path, size: u64) -> Result<Image, ReplicaError> {
    let create_err = |source| ReplicaError::Create {
        path: path.to_owned(),
        size,
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(create_err)?;
    let r = lock(&file, path).and_then(|()| file.set_len(size).map_err(create_err));
    if let Err(e) = r {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(Image::new(file, size))
}

/// Drops the image's clean pages from the page cache (advisory: a failure is only logged).
/// The kernel caches a file in folios as large as the writes or reads that filled it (up to
/// 2 MiB with ext4 on 6.x kernels), and a 4 KiB write into a large folio walks all of its
/// buffer heads: after a resync's 1 MiB writes, the guest's 4 KiB writes cost the replica
/// 45-50 us each instead of 6-7 (measured here). Nothing reads the replica's cache in normal
/// operation, so it is dropped once the resync's writes are durable.
fn drop_clean_cache(file: &File, path: &Path) {
    // SAFETY: posix_fadvise on a file descriptor we own; no memory is passed.
    let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if r != 0 {
        debug!(
            "{}: posix_fadvise(DONTNEED): {}",
            path.display(),
            io::Error::from_raw_os_error(r)
        );
    }
}

/// An exclusive lock: two servers must never share an image.
fn lock(file: &File, path: &Path) -> Result<(), ReplicaError> {
    // SAFETY: flock on a file descriptor we own; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::WouldBlock {
        Err(ReplicaError::Locked {
            path: path.to_owned(),
        })
    } else {
        Err(ReplicaError::Open {
            path: path.to_owned(),
            source: e,
        })
    }
}

fn file_size(file: &File) -> io::Result<u64> {
    let m = file.metadata()?;
    if m.file_type().is_block_device() {
        use std::io::{Seek, SeekFrom};
        let mut f = file;
        f.seek(SeekFrom::End(0))
    } else {
        Ok(m.len())
    }
}

/// Zeroes a range (fallocate, or zeros written where the filesystem cannot).
fn zero_range(file: &File, offset: u64, len: u64, unmap: bool) -> Result<(), ReplicaError> {
    mirror_proto::sys::zero_range(file, offset, len, unmap).map_err(|source| ReplicaError::Io {
        op: "zero range",
        offset,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn replica(dir: &Path, cache: u64) -> Replica {
        let status = Arc::new(Status::new(dir.join("r.img"), cache));
        Replica::open(&dir.join("r.img"), cache, status).unwrap()
    }

    #[test]
    fn missing_image_is_created_sparse_with_fresh_metadata() {
        let d = tempfile::tempdir().unwrap();
        let mut r = replica(d.path(), 1 << 20);
        assert_eq!(r.size(), 0);
        assert!(matches!(r.write(0, &[1]), Err(ReplicaError::NoImage)));
        let info = r.attach(8 << 20).unwrap();
        assert_eq!(info.size, 8 << 20);
        assert_eq!(info.generation, 0);
        assert_eq!(info.disk_state, DiskState::Inconsistent);
        assert_eq!(info.role, Role::Secondary);
        assert_ne!(info.node_id, 0);
        let md = std::fs::metadata(d.path().join("r.img")).unwrap();
        assert_eq!(md.len(), 8 << 20);
        assert!(md.blocks() * 512 < md.len(), "sparse");
        let m = meta::load(&d.path().join("r.img")).unwrap().unwrap();
        assert_eq!(m.node_id, info.node_id);
        // Attaching again keeps the identity.
        assert_eq!(r.attach(8 << 20).unwrap().node_id, info.node_id);
    }

    #[test]
    fn size_mismatch_leaves_the_image_alone() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("r.img");
        std::fs::write(&p, vec![5u8; 4096]).unwrap();
        let mut r = replica(d.path(), 0);
        let e = r.attach(8192).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("4096") && msg.contains("8192") && msg.contains("r.img"),
            "{msg}"
        );
        assert_eq!(std::fs::read(&p).unwrap(), vec![5u8; 4096]);
        assert!(!meta::meta_path(&p).exists());
        assert!(matches!(r.attach(0), Err(ReplicaError::EmptyPrimary)));
    }

    #[test]
    fn existing_image_without_metadata_is_unknown_content() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("r.img");
        std::fs::write(&p, vec![5u8; 4096]).unwrap();
        let mut r = replica(d.path(), 0);
        let info = r.attach(4096).unwrap();
        assert_eq!(info.generation, 0);
        assert_eq!(info.disk_state, DiskState::Inconsistent);
        assert!(meta::meta_path(&p).exists());
        assert_eq!(std::fs::read(&p).unwrap(), vec![5u8; 4096]);
    }

    /// A former primary's image reports its bitmap's regions as hot extents beside its log's,
    /// so a node promoted from its generation overwrites them. Without a readable bitmap: held
    /// at its generation (the bitmap's base is its own generation: nothing was acknowledged
    /// without its replica), it pairs as a new image (generation 0: a full copy); otherwise it
    /// is not paired (which regions differ is unknown, and some may hold acknowledged writes).
    #[test]
    fn a_held_former_primary_reports_its_bitmap_regions() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("r.img");
        let size = 64 << 20;
        std::fs::File::create(&p).unwrap().set_len(size).unwrap();
        let m = Meta {
            format: META_FORMAT,
            node_id: 5,
            size,
            role: Role::Primary,
            disk_state: DiskState::UpToDate,
            generation: 77,
            bitmap_generation: 77,
            history: vec![],
        };
        meta::save(&p, &m).unwrap();
        let (f, mut b) = BitmapFile::open_or_create(&p, size).unwrap();
        let mut changed = Vec::new();
        // Regions in extents 2 and 9 (4 MiB each), one run across extents 5 and 6.
        b.set_range(9 << 20, 4096, &mut changed);
        b.set_range((40 << 20) + 8192, 4096, &mut changed);
        b.set_range((24 << 20) - 65536, 131072, &mut changed);
        f.persist_all(&b).unwrap();
        drop(f);
        let mut al = activity_log::AlFile::open(&p).unwrap().0;
        al.commit(&[2, 12]).unwrap();
        drop(al);
        let mut r = replica(d.path(), 0);
        let info = r.attach(size).unwrap();
        assert_eq!(info.generation, 77);
        assert_eq!(info.hot, vec![2, 5, 6, 10, 12]);
        drop(r);

        std::fs::remove_file(mirror_proto::bitmap_file::bitmap_path(&p)).unwrap();
        let mut r = replica(d.path(), 0);
        let info = r.attach(size).unwrap();
        assert_eq!((info.generation, info.hot.len()), (0, 0));
        drop(r);

        meta::save(
            &p,
            &Meta {
                bitmap_generation: 76,
                ..m
            },
        )
        .unwrap();
        let mut r = replica(d.path(), 0);
        let e = r.attach(size).unwrap_err();
        assert!(
            matches!(e, ReplicaError::BitmapRegionsUnknown { .. }),
            "{e}"
        );
        assert!(e.to_string().contains("r.img.meta"), "{e}");
    }

    /// A damaged activity log of a primary's image (a failback: which extents its crash left
    /// different is unknown) refuses the attach, naming the files; a secondary's is only
    /// reported. Before, a damaged log read as "no hot extents" and the old primary's
    /// differing extents were never copied.
    #[test]
    fn a_primary_image_with_a_damaged_activity_log_is_not_paired() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("r.img");
        std::fs::write(&p, vec![0u8; 8192]).unwrap();
        let m = Meta {
            format: META_FORMAT,
            node_id: 5,
            size: 8192,
            role: Role::Primary,
            disk_state: DiskState::UpToDate,
            generation: 77,
            bitmap_generation: 0,
            history: vec![],
        };
        meta::save(&p, &m).unwrap();
        std::fs::write(activity_log::al_path(&p), vec![0x5a; 4096]).unwrap();
        let mut r = replica(d.path(), 0);
        let e = r.attach(8192).unwrap_err();
        assert!(matches!(e, ReplicaError::HotExtentsUnknown { .. }), "{e}");
        let msg = crate::chain(&e);
        assert!(
            msg.contains("r.img.meta") && msg.contains("r.img.al is damaged"),
            "{msg}"
        );
        drop(r);
        // A secondary's: reported, not needed.
        meta::save(
            &p,
            &Meta {
                role: Role::Secondary,
                ..m.clone()
            },
        )
        .unwrap();
        let mut r = replica(d.path(), 0);
        assert!(r.attach(8192).unwrap().hot.is_empty());
        drop(r);
        // The remedy the message names: the image pairs as unknown content (a full copy).
        meta::save(&p, &m).unwrap();
        std::fs::remove_file(meta::meta_path(&p)).unwrap();
        std::fs::remove_file(activity_log::al_path(&p)).unwrap();
        let mut r = replica(d.path(), 0);
        let info = r.attach(8192).unwrap();
        assert_eq!((info.generation, info.role), (0, Role::Secondary));
    }

    #[test]
    fn damaged_metadata_is_refused_and_format_1_upgraded() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("r.img");
        std::fs::write(&p, vec![0u8; 8192]).unwrap();
        let m = Meta {
            format: 1,
            node_id: 5,
            size: 8192,
            role: Role::Secondary,
            disk_state: DiskState::Outdated,
            generation: 77,
            bitmap_generation: 0,
            history: vec![76],
        };
        std::fs::write(meta::meta_path(&p), serde_json::to_vec(&m).unwrap()).unwrap();
        let r = replica(d.path(), 0);
        assert_eq!(r.node_info().disk_state, DiskState::Outdated);
        drop(r);
        let text = std::fs::read_to_string(meta::meta_path(&p)).unwrap();
        assert!(text.contains("crc32c"), "not upgraded: {text}");
        // One state for another, checksum unchanged: refused, never promotable.
        std::fs::write(
            meta::meta_path(&p),
            text.replace("\"outdated\"", "\"up-to-date\""),
        )
        .unwrap();
        let status = Arc::new(Status::new(p.clone(), 0));
        let e = Replica::open(&p, 0, status).unwrap_err();
        assert!(
            crate::chain(&e).contains("r.img.meta is damaged (checksum mismatch"),
            "{}",
            crate::chain(&e)
        );
    }

    #[test]
    fn second_opener_is_locked_out() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("r.img"), [0u8; 512]).unwrap();
        let _a = replica(d.path(), 0);
        let status = Arc::new(Status::new("x".into(), 0));
        let e = Replica::open(&d.path().join("r.img"), 0, status).unwrap_err();
        assert!(matches!(e, ReplicaError::Locked { .. }), "{e}");
    }

    #[test]
    fn writes_reads_discards_and_bounds() {
        let d = tempfile::tempdir().unwrap();
        let mut r = replica(d.path(), 1 << 20);
        r.attach(1 << 20).unwrap();
        let mut buf = vec![0u8; 16384];
        r.read(0, &mut buf).unwrap(); // cached zeros
        r.write(100, &[7u8; 16000]).unwrap();
        r.read(0, &mut buf).unwrap();
        assert!(buf[..100].iter().all(|b| *b == 0));
        assert!(buf[100..16100].iter().all(|b| *b == 7));
        r.discard(4096, 4096).unwrap();
        r.write_zeroes(8192, 512, false).unwrap();
        r.read(0, &mut buf).unwrap();
        assert!(buf[4096..8704].iter().all(|b| *b == 0));
        assert!(buf[8704..16100].iter().all(|b| *b == 7));
        // The file agrees with the cache.
        let f = std::fs::read(d.path().join("r.img")).unwrap();
        assert_eq!(&f[..16384], &buf[..]);
        for e in [
            r.write((1 << 20) - 1, &[0, 0]).unwrap_err(),
            r.read(u64::MAX, &mut [0]).unwrap_err(),
            r.discard(u64::MAX - 1, 4).unwrap_err(),
        ] {
            assert_eq!(e.ack_status(), AckStatus::OutOfRange, "{e}");
        }
        r.flush().unwrap();
    }

    #[test]
    fn sync_start_and_done_are_recorded_on_disk() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("r.img");
        let mut r = replica(d.path(), 0);
        r.attach(1 << 20).unwrap();
        r.sync_done(11).unwrap();
        r.sync_start().unwrap();
        assert_eq!(
            meta::load(&p).unwrap().unwrap().disk_state,
            DiskState::Inconsistent
        );
        r.sync_done(22).unwrap();
        let m = meta::load(&p).unwrap().unwrap();
        assert_eq!(m.generation, 22);
        assert_eq!(m.disk_state, DiskState::UpToDate);
        assert_eq!(m.history, vec![11]);
        // Reopening reports the recorded state.
        drop(r);
        let r = replica(d.path(), 0);
        let info = r.node_info();
        assert_eq!(
            (info.generation, info.disk_state),
            (22, DiskState::UpToDate)
        );
    }

    #[test]
    fn no_space_errors_map_to_no_space() {
        let e = ReplicaError::Io {
            op: "write",
            offset: 0,
            source: io::Error::from_raw_os_error(libc::EFBIG),
        };
        assert_eq!(e.ack_status(), AckStatus::NoSpace);
        let e = ReplicaError::Io {
            op: "write",
            offset: 0,
            source: io::Error::from_raw_os_error(libc::EIO),
        };
        assert_eq!(e.ack_status(), AckStatus::IoError);
    }

    /// Review: a former primary whose SyncDone(g2) reached its replica but whose answer it
    /// never got (link cut right then, with the witness) is at g2 with its bitmap's base g;
    /// its held writes since are in its bitmap only (a barrier over a dead link evicts their
    /// extents from the log). The replica promoted from g2 makes a partial resync of it, and
    /// its bitmap's regions are not among the hot extents: they stay different.
    #[test]
    fn review_a_former_primary_at_the_promoted_base_with_an_older_bitmap_base() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("r.img");
        let size = 64 << 20;
        std::fs::File::create(&p).unwrap().set_len(size).unwrap();
        let m = Meta {
            format: META_FORMAT,
            node_id: 5,
            size,
            role: Role::Primary,
            disk_state: DiskState::UpToDate,
            generation: 0x22,
            bitmap_generation: 0x11,
            history: vec![0x11],
        };
        meta::save(&p, &m).unwrap();
        let (f, mut b) = BitmapFile::open_or_create(&p, size).unwrap();
        let mut changed = Vec::new();
        b.set_range(9 << 20, 4096, &mut changed);
        f.persist_all(&b).unwrap();
        drop(f);
        let mut r = replica(d.path(), 0);
        let info = r.attach(size).unwrap();
        // The node promoted from 0x22.
        let promoted = NodeInfo {
            node_id: 6,
            size,
            role: Role::Primary,
            disk_state: DiskState::UpToDate,
            generation: 0x33,
            bitmap_generation: 0x22,
            history: vec![0x22, 0x11],
            flags: 0,
            hot: vec![],
        };
        assert_eq!(
            generation::decide(&promoted, &info),
            generation::SyncDecision::Partial
        );
        assert!(
            info.hot.contains(&2),
            "the region this image wrote (held, never acknowledged) is neither in the promoted \
             node's bitmap nor reported: it stays different after the resync ({:?})",
            info.hot
        );
    }
}
