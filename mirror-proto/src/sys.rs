//! Small operating-system helpers both programs need: claiming a unix socket path, zeroing a
//! file range, printing an error with its causes.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

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
    use std::os::unix::net::UnixListener;

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
