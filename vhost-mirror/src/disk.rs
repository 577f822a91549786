//! The local disk engine: a raw image file accessed with positional, vectored syscalls.
//!
//! Knows nothing about virtio. Offsets and lengths arrive already validated against the
//! capacity (see `request.rs`); this file checks them again so that no caller can reach past
//! the end of the image.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use log::warn;
use thiserror::Error;

use crate::blk_config::SECTOR_SIZE;

#[derive(Debug, Error)]
pub enum DiskError {
    #[error("cannot open image {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("image {path} is not a regular file or block device")]
    NotAFile { path: PathBuf },
    #[error("image {path} is smaller than one sector ({size} bytes)")]
    TooSmall { path: PathBuf, size: u64 },
    #[error("image {path} is in use by another process (locked)")]
    Locked { path: PathBuf },
    #[error("I/O at offset {offset} length {len} is outside the image ({size} bytes)")]
    OutOfBounds { offset: u64, len: u64, size: u64 },
    #[error("image is read-only")]
    ReadOnly,
    #[error("{op} failed at offset {offset}")]
    Io {
        op: &'static str,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("the image failed earlier ({0}); no write or flush is accepted until vhost-mirror is restarted")]
    Failed(String),
}

/// A raw image, opened once and shared by all queue workers (positional I/O needs no lock).
///
/// A failed write, zeroing or fdatasync fails the image for good (until a restart): the
/// kernel reports a writeback error to one fdatasync only and then forgets it, so a later
/// "successful" fdatasync would claim durability for data that was lost. Every later write
/// and flush fails instead; the guest sees the error, status shows it, and the activity log
/// is kept (not cleared at shutdown), so a mirrored pair resyncs what may differ.
#[derive(Debug)]
pub struct RawImage {
    file: File,
    /// Usable size in bytes: the file size rounded down to whole sectors.
    size: u64,
    readonly: bool,
    failed: std::sync::OnceLock<String>,
    /// Write-type operations (writes, zeroings) that returned, successful or not: an
    /// fdatasync that began once this count reached N covers the first N (`flusher.rs`).
    modified: std::sync::atomic::AtomicU64,
    /// Held around each fdatasync and its outcome: the kernel reports a writeback error to
    /// one fdatasync of the file only, so two at once could see one fail and the other
    /// succeed before the first made the failure sticky.
    sync_lock: std::sync::Mutex<()>,
}

impl RawImage {
    /// Opens `path`, takes an exclusive lock on it (two servers must never share an image) and
    /// reads its size.
    pub fn open(path: &Path, readonly: bool) -> Result<Self, DiskError> {
        let open_err = |source| DiskError::Open {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!readonly)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        let raw_size = if meta.file_type().is_block_device() {
            block_device_size(&file).map_err(open_err)?
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(DiskError::NotAFile {
                path: path.to_owned(),
            });
        };
        let size = raw_size / SECTOR_SIZE * SECTOR_SIZE;
        if size == 0 {
            return Err(DiskError::TooSmall {
                path: path.to_owned(),
                size: raw_size,
            });
        }
        if size != raw_size {
            warn!(
                "image {}: size {raw_size} is not a multiple of {SECTOR_SIZE}; the last {} bytes are not served",
                path.display(),
                raw_size - size
            );
        }
        let lock = if readonly {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on a file descriptor we own; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), lock | libc::LOCK_NB) } != 0 {
            return Err(DiskError::Locked {
                path: path.to_owned(),
            });
        }
        Ok(RawImage {
            file,
            size,
            readonly,
            failed: std::sync::OnceLock::new(),
            modified: std::sync::atomic::AtomicU64::new(0),
            sync_lock: std::sync::Mutex::new(()),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(DiskError::OutOfBounds {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    fn check_writable(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        if self.readonly {
            return Err(DiskError::ReadOnly);
        }
        self.check_failed()?;
        self.check(offset, len)
    }

    fn check_failed(&self) -> Result<(), DiskError> {
        match self.failed.get() {
            Some(reason) => Err(DiskError::Failed(reason.clone())),
            None => Ok(()),
        }
    }

    /// How many write-type operations have returned so far (see `modified`). An fdatasync
    /// that starts after reading N here makes the data of the first N durable.
    pub fn modifications(&self) -> u64 {
        self.modified.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Counts a write-type operation that returned: its data (if it succeeded) is in the page
    /// cache, where the next fdatasync finds it.
    fn modified(&self) {
        self.modified
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Fails the image as a write-side error would (tests of what a failure does).
    #[cfg(test)]
    pub fn fail_for_test(&self, why: &str) {
        let _ = self.failed.set(why.to_string());
    }

    /// Why the image failed, if it did.
    pub fn failure(&self) -> Option<&str> {
        self.failed.get().map(String::as_str)
    }

    /// A write-side error fails the image (see the type's documentation): every fdatasync
    /// error, and write I/O errors (EIO). Others ("no space", a bad buffer) lose nothing: the
    /// write did not happen, the guest is told, and it may be retried.
    fn fail_on_error<T>(&self, r: Result<T, DiskError>) -> Result<T, DiskError> {
        if let Err(e) = &r {
            let sticky = match e {
                DiskError::Io { op, source, .. } => {
                    *op == "fdatasync" || source.raw_os_error() == Some(libc::EIO)
                }
                _ => false,
            };
            if sticky && self.failed.set(e.to_string()).is_ok() {
                log::error!(
                    "image failed: {}; every later write and flush fails",
                    mirror_proto::sys::error_chain(e)
                );
            }
        }
        r
    }

    /// Reads into guest buffers described by `iov`, all of it.
    ///
    /// # Safety
    /// Every iovec must describe memory that is valid for writes for its whole length.
    pub unsafe fn read_vectored(
        &self,
        iov: &mut [libc::iovec],
        offset: u64,
    ) -> Result<(), DiskError> {
        let len = iov.iter().map(|v| v.iov_len as u64).sum();
        self.check(offset, len)?;
        // SAFETY: the caller guarantees the iovecs; the range is inside the image.
        unsafe { rw_all(self.file.as_raw_fd(), iov, offset, false) }.map_err(|source| {
            DiskError::Io {
                op: "read",
                offset,
                source,
            }
        })
    }

    /// Writes guest buffers described by `iov`, all of it.
    ///
    /// # Safety
    /// Every iovec must describe memory that is valid for reads for its whole length.
    pub unsafe fn write_vectored(
        &self,
        iov: &mut [libc::iovec],
        offset: u64,
    ) -> Result<(), DiskError> {
        let len = iov.iter().map(|v| v.iov_len as u64).sum();
        self.check_writable(offset, len)?;
        // SAFETY: the caller guarantees the iovecs; the range is inside the image.
        let r = unsafe { rw_all(self.file.as_raw_fd(), iov, offset, true) }.map_err(|source| {
            DiskError::Io {
                op: "write",
                offset,
                source,
            }
        });
        self.modified();
        self.fail_on_error(r)
    }

    /// Writes a plain buffer (a mirrored write's data, copied once out of guest memory).
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        use std::os::unix::fs::FileExt;
        self.check_writable(offset, buf.len() as u64)?;
        let r = self
            .file
            .write_all_at(buf, offset)
            .map_err(|source| DiskError::Io {
                op: "write",
                offset,
                source,
            });
        self.modified();
        self.fail_on_error(r)
    }

    /// Reads into a plain buffer (resync).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        use std::os::unix::fs::FileExt;
        self.check(offset, buf.len() as u64)?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| DiskError::Io {
                op: "read",
                offset,
                source,
            })
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> Result<(), DiskError> {
        if self.readonly {
            return Ok(());
        }
        // One at a time (see `sync_lock`): the second sees the first's failure.
        let _one = self.sync_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.check_failed()?;
        let r = self.file.sync_data().map_err(|source| DiskError::Io {
            op: "fdatasync",
            offset: 0,
            source,
        });
        self.fail_on_error(r)
    }

    /// Deallocates a range; it reads back as zeros afterwards.
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.check_writable(offset, len)?;
        self.zero_range(offset, len, true)
    }

    /// Zeroes a range, deallocating it if `may_unmap`.
    pub fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), DiskError> {
        self.check_writable(offset, len)?;
        self.zero_range(offset, len, may_unmap)
    }

    fn zero_range(&self, offset: u64, len: u64, unmap: bool) -> Result<(), DiskError> {
        let r = mirror_proto::sys::zero_range(&self.file, offset, len, unmap).map_err(|source| {
            DiskError::Io {
                op: "zero range",
                offset,
                source,
            }
        });
        self.modified();
        self.fail_on_error(r)
    }
}

fn block_device_size(file: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = file;
    let size = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(size)
}

/// preadv/pwritev until every byte moved, resuming after short transfers.
///
/// # Safety
/// Every iovec must describe memory valid for the direction of the transfer.
unsafe fn rw_all(
    fd: i32,
    mut iov: &mut [libc::iovec],
    mut offset: u64,
    write: bool,
) -> io::Result<()> {
    const IOV_MAX: usize = 1024;
    while !iov.is_empty() {
        let cnt = iov.len().min(IOV_MAX);
        // SAFETY: iov points to `cnt` valid iovecs, whose memory the caller vouches for.
        let n = unsafe {
            if write {
                libc::pwritev(fd, iov.as_ptr(), cnt as i32, offset as i64)
            } else {
                libc::preadv(fd, iov.as_ptr(), cnt as i32, offset as i64)
            }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "image ended early",
            ));
        }
        let mut n = n as usize;
        offset += n as u64;
        // Skip fully transferred iovecs, trim a partially transferred one.
        while let Some(first) = iov.first_mut() {
            if n >= first.iov_len {
                n -= first.iov_len;
                iov = &mut iov[1..];
            } else {
                // SAFETY: advancing inside the same buffer by less than its length.
                first.iov_base = unsafe { (first.iov_base as *mut u8).add(n) } as *mut libc::c_void;
                first.iov_len -= n;
                break;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(size: u64) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.img");
        let f = File::create(&p).unwrap();
        f.set_len(size).unwrap();
        (dir, p)
    }

    #[test]
    fn vectored_round_trip() {
        let (_d, p) = image(1 << 20);
        let img = RawImage::open(&p, false).unwrap();
        let mut a = vec![1u8; 4096];
        let mut b = vec![2u8; 512];
        let mut iov = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            },
        ];
        // SAFETY: the iovecs point at live vectors.
        unsafe { img.write_vectored(&mut iov, 8192) }.unwrap();
        let mut back = vec![0u8; 4608];
        img.read_at(&mut back, 8192).unwrap();
        assert!(back[..4096].iter().all(|x| *x == 1));
        assert!(back[4096..].iter().all(|x| *x == 2));
    }

    #[test]
    fn bounds_are_enforced() {
        let (_d, p) = image(4096 + 100);
        let img = RawImage::open(&p, false).unwrap();
        assert_eq!(img.size(), 4096);
        assert!(matches!(
            img.write_at(&[0; 512], 4096),
            Err(DiskError::OutOfBounds { .. })
        ));
        assert!(matches!(
            img.discard(u64::MAX, 2),
            Err(DiskError::OutOfBounds { .. })
        ));
        img.write_at(&[0; 512], 3584).unwrap();
    }

    #[test]
    fn discard_and_zero() {
        let (_d, p) = image(1 << 20);
        let img = RawImage::open(&p, false).unwrap();
        img.write_at(&[7u8; 16384], 0).unwrap();
        img.discard(4096, 4096).unwrap();
        img.write_zeroes(8192, 512, false).unwrap();
        let mut back = vec![0u8; 16384];
        img.read_at(&mut back, 0).unwrap();
        assert!(back[..4096].iter().all(|x| *x == 7));
        assert!(back[4096..8704].iter().all(|x| *x == 0));
        assert!(back[8704..].iter().all(|x| *x == 7));
    }

    #[test]
    fn readonly_refuses_writes_and_second_writer_is_locked_out() {
        let (_d, p) = image(1 << 20);
        let ro = RawImage::open(&p, true).unwrap();
        assert!(matches!(
            ro.write_at(&[0; 512], 0),
            Err(DiskError::ReadOnly)
        ));
        drop(ro);
        let _rw = RawImage::open(&p, false).unwrap();
        assert!(matches!(
            RawImage::open(&p, false),
            Err(DiskError::Locked { .. })
        ));
    }

    #[test]
    fn empty_and_missing_images() {
        let (_d, p) = image(100);
        assert!(matches!(
            RawImage::open(&p, false),
            Err(DiskError::TooSmall { .. })
        ));
        let missing = p.with_file_name("nope.img");
        let e = RawImage::open(&missing, false).unwrap_err();
        assert!(e.to_string().contains("nope.img"));
    }
}
