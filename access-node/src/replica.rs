//! The replica: the image file, its metadata (`IMG.meta`) and the read cache.
//!
//! Knows nothing about the network. Every operation checks its range against the image size;
//! the cache is invalidated before a change is acknowledged, so reads never see stale data.
//! Metadata changes (SyncStart, SyncDone, creation) are saved crash-safely before they return.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::{info, warn};
use mirror_proto::auth::{self, AuthError};
use mirror_proto::frame::{AckStatus, DiskState, NodeInfo, Role, MAX_HISTORY};
use mirror_proto::generation;
use mirror_proto::meta::{self, Meta, MetaError, META_FORMAT};
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
    #[error("cannot create a node id")]
    NodeId(#[source] AuthError),
}

impl ReplicaError {
    /// How a failed request is answered.
    pub fn ack_status(&self) -> AckStatus {
        match self {
            ReplicaError::OutOfRange { .. } => AckStatus::OutOfRange,
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
    file: File,
    size: u64,
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
}

impl Replica {
    /// Opens and locks the image if it exists and reads its metadata; a missing image is created
    /// when the first primary attaches.
    pub fn open(path: &Path, cache_bytes: u64, status: Arc<Status>) -> Result<Self, ReplicaError> {
        let image = open_existing(path)?;
        let meta = if image.is_some() {
            meta::load(path)?
        } else {
            None
        };
        let r = Replica {
            path: path.to_owned(),
            image,
            meta,
            cache: ReadCache::new(cache_bytes),
            status,
        };
        r.publish();
        Ok(r)
    }

    pub fn path(&self) -> &Path {
        &self.path
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

    /// This node's state, as sent in Attached.
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
            flags: 0,
            hot: Vec::new(),
        }
    }

    /// A primary with a disk of `size` bytes attaches: checks an existing image's size (without
    /// changing anything if it differs), or creates the image sparse; makes sure metadata exists.
    pub fn attach(&mut self, size: u64) -> Result<NodeInfo, ReplicaError> {
        if size == 0 {
            return Err(ReplicaError::EmptyPrimary);
        }
        if self.image.is_none() {
            // Someone may have put an image there since startup.
            self.image = open_existing(&self.path)?;
            if self.image.is_some() {
                self.meta = meta::load(&self.path)?;
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
        Ok(self.node_info())
    }

    fn image(&self) -> Result<&Image, ReplicaError> {
        self.image.as_ref().ok_or(ReplicaError::NoImage)
    }

    fn check(&self, offset: u64, len: u64) -> Result<&Image, ReplicaError> {
        check_range(self.image.as_ref(), offset, len)
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), ReplicaError> {
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
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.invalidate(offset, len);
        zero_range(&self.image()?.file, offset, len, unmap)
    }

    /// Makes every completed write durable (fdatasync).
    pub fn flush(&self) -> Result<(), ReplicaError> {
        match &self.image {
            Some(img) => img.file.sync_data().map_err(|source| ReplicaError::Io {
                op: "fdatasync",
                offset: 0,
                source,
            }),
            None => Ok(()),
        }
    }

    /// Reads through the cache.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ReplicaError> {
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

    /// A resync starts: the image is inconsistent until SyncDone.
    pub fn sync_start(&mut self) -> Result<(), ReplicaError> {
        self.update_meta(|m| m.disk_state = DiskState::Inconsistent)
    }

    /// A resync finished: every write of `generation` is in the image; make that durable, then
    /// record it.
    pub fn sync_done(&mut self, new_generation: u64) -> Result<(), ReplicaError> {
        self.flush()?;
        self.update_meta(|m| {
            if m.generation != new_generation {
                generation::push_history(&mut m.history, m.generation, MAX_HISTORY);
            }
            m.generation = new_generation;
            m.disk_state = DiskState::UpToDate;
        })
    }
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
    Ok(Some(Image { file, size }))
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
    Ok(Image { file, size })
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

/// Zeroes a range with fallocate (punching a hole if `unmap`), writing zeros where the
/// filesystem supports neither mode. Same approach as vhost-mirror's disk engine.
fn zero_range(file: &File, offset: u64, len: u64, unmap: bool) -> Result<(), ReplicaError> {
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    let zero = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
    let modes = if unmap { [punch, zero] } else { [zero, punch] };
    for mode in modes {
        // SAFETY: fallocate on our own descriptor; the caller checked the range.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if !matches!(
            e.raw_os_error(),
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
        ) {
            return Err(ReplicaError::Io {
                op: "fallocate",
                offset,
                source: e,
            });
        }
    }
    let zeros = vec![0u8; (1 << 20).min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], offset + done)
            .map_err(|source| ReplicaError::Io {
                op: "write",
                offset: offset + done,
                source,
            })?;
        done += n as u64;
    }
    Ok(())
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
}
