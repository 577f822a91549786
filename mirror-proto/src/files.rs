//! Opening and replacing the files kept beside an image (`IMG.meta`, `IMG.bitmap`, `IMG.al`)
//! without ever following a symbolic link, so that a link planted in the image's directory
//! cannot redirect a write (or feed a read) to another file.
//!
//! New content reaches a file through [`replace`]: the temp file `PATH.tmp` is created
//! exclusively (`O_CREAT | O_EXCL | O_NOFOLLOW`; a stale one is unlinked first, which removes
//! a link itself, never its target), written, fsynced, renamed over `PATH` (a rename replaces a
//! link, it does not follow it), and the directory is fsynced. A crash leaves the old or the
//! new file, never a mix. Existing files are opened with `O_NOFOLLOW` ([`open`], [`read`]);
//! a link there is an error ("a symbolic link: refused").

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// `path` with `suffix` appended to its last component (`IMG` + `.meta`).
pub fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// ELOOP from `O_NOFOLLOW` said plainly.
fn refuse_link(e: io::Error) -> io::Error {
    if e.raw_os_error() == Some(libc::ELOOP) {
        io::Error::new(
            e.kind(),
            "a symbolic link: refused (metadata files are never followed)",
        )
    } else {
        e
    }
}

/// Opens an existing file for reading (and writing if `write`), never through a symbolic link.
pub fn open(path: &Path, write: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(refuse_link)
}

/// Reads a whole file, never through a symbolic link.
pub fn read(path: &Path) -> io::Result<Vec<u8>> {
    let mut f = open(path, false)?;
    let mut data = Vec::new();
    f.read_to_end(&mut data)?;
    Ok(data)
}

/// Replaces `path` with `bytes` atomically (see the module documentation).
pub fn replace(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = with_suffix(path, ".tmp");
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(refuse_link)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(path)
}

fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn replace_never_writes_through_a_planted_temp_link() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("victim");
        std::fs::write(&target, "precious").unwrap();
        let path = d.path().join("IMG.meta");
        symlink(&target, with_suffix(&path, ".tmp")).unwrap();
        replace(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"precious");
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert!(!with_suffix(&path, ".tmp").exists());
        // A link in place of the file itself is replaced, not followed.
        std::fs::remove_file(&path).unwrap();
        symlink(&target, &path).unwrap();
        replace(&path, b"newer").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"precious");
        assert!(!std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn opening_a_link_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("victim");
        std::fs::write(&target, "precious").unwrap();
        let path = d.path().join("IMG.al");
        symlink(&target, &path).unwrap();
        let e = open(&path, true).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert!(read(&path).is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"precious");
    }
}
