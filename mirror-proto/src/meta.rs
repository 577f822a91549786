//! Metadata kept beside an image (`IMG.meta`, JSON) and the persistent out-of-sync bitmap
//! (`IMG.bitmap`). The image itself stays a plain raw file any QEMU can boot.
//!
//! `IMG.meta` changes rarely (role, generation) and is replaced atomically: written to a temp
//! file, fsynced, renamed over the old one, directory fsynced. `IMG.bitmap` is updated in place
//! one 8-byte word at a time (a word never straddles a sector, so an update is atomic) and
//! fdatasynced before the write it covers is issued.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::bitmap::{Bitmap, REGION_SIZE};
use crate::frame::{DiskState, Role};

/// Version of the metadata format written by this code.
pub const META_FORMAT: u32 = 1;
const BITMAP_MAGIC: &[u8; 8] = b"VHMBITMP";
const BITMAP_HEADER: u64 = 32;

#[derive(Debug, Error)]
pub enum MetaError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not valid metadata")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} has format {found}; this version reads format {META_FORMAT}")]
    Format { path: PathBuf, found: u32 },
    #[error("{path} is not a bitmap for an image of {size} bytes")]
    BadBitmap { path: PathBuf, size: u64 },
}

/// The state recorded beside an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub format: u32,
    /// Random identity of the node that owns this image.
    pub node_id: u64,
    /// Image size in bytes when the metadata was written.
    pub size: u64,
    pub role: Role,
    pub disk_state: DiskState,
    pub generation: u64,
    /// Generation the out-of-sync bitmap is relative to (0: bitmap empty / none).
    pub bitmap_generation: u64,
    /// Earlier generations, newest first.
    pub history: Vec<u64>,
}

pub fn meta_path(image: &Path) -> PathBuf {
    with_suffix(image, ".meta")
}

pub fn bitmap_path(image: &Path) -> PathBuf {
    with_suffix(image, ".bitmap")
}

fn with_suffix(image: &Path, suffix: &str) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Reads `IMG.meta`; `Ok(None)` if there is none.
pub fn load(image: &Path) -> Result<Option<Meta>, MetaError> {
    let path = meta_path(image);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(MetaError::Read { path, source }),
    };
    #[derive(Deserialize)]
    struct Probe {
        format: u32,
    }
    let probe: Probe = serde_json::from_slice(&text).map_err(|source| MetaError::Parse {
        path: path.clone(),
        source,
    })?;
    if probe.format != META_FORMAT {
        return Err(MetaError::Format {
            path,
            found: probe.format,
        });
    }
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|source| MetaError::Parse { path, source })
}

/// Writes `IMG.meta` crash-safely.
pub fn save(image: &Path, meta: &Meta) -> Result<(), MetaError> {
    let path = meta_path(image);
    let mut text = serde_json::to_vec_pretty(meta).map_err(|source| MetaError::Parse {
        path: path.clone(),
        source,
    })?;
    text.push(b'\n');
    replace_file(&path, &text)
}

/// Writes `IMG.meta` over the existing file's bytes, without allocating: for a disk that is
/// full (the one moment a replica must record that it fell behind). Only when the new text is
/// not longer than the file (it is padded with spaces, which JSON ignores); the file is one
/// small block, written with one `pwrite` and made durable with `fdatasync`.
pub fn save_in_place(image: &Path, meta: &Meta) -> Result<(), MetaError> {
    use std::os::unix::fs::FileExt;
    let path = meta_path(image);
    let werr = |source| MetaError::Write {
        path: path.clone(),
        source,
    };
    let mut text = serde_json::to_vec_pretty(meta).map_err(|source| MetaError::Parse {
        path: path.clone(),
        source,
    })?;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(werr)?;
    let current = std::fs::read(&path).map_err(werr)?;
    // A change of one field's value (the disk state): pad the new value with spaces before
    // the next separator, so that one short run inside one sector changes and a torn write
    // cannot mix two texts.
    if let Some(first) = current.iter().zip(&text).position(|(a, b)| a != b) {
        let sep = |t: &[u8]| {
            t[first..]
                .iter()
                .position(|&c| c == b',' || c == b'\n')
                .map(|i| first + i)
        };
        if let (Some(eo), Some(en)) = (sep(&current), sep(&text)) {
            if en <= eo && current[eo..].trim_ascii_end() == text[en..].trim_ascii_end() {
                let mut patch = text[first..en].to_vec();
                patch.resize(eo - first, b' ');
                f.write_all_at(&patch, first as u64).map_err(werr)?;
                return f.sync_data().map_err(werr);
            }
        }
    }
    // Otherwise the whole text, padded at the end.
    let old = current.len();
    if text.len() + 1 > old {
        return Err(werr(io::Error::other(
            "the new metadata is longer than the file",
        )));
    }
    text.resize(old - 1, b' ');
    text.push(b'\n');
    f.write_all_at(&text, 0).map_err(werr)?;
    f.sync_data().map_err(werr)
}

/// Replaces `path` with `bytes` atomically: temp file, fsync, rename, fsync of the directory.
pub fn replace_file(path: &Path, bytes: &[u8]) -> Result<(), MetaError> {
    let werr = |source| MetaError::Write {
        path: path.to_owned(),
        source,
    };
    let tmp = with_suffix(path, ".tmp");
    {
        let mut f = File::create(&tmp).map_err(werr)?;
        f.write_all(bytes).map_err(werr)?;
        f.sync_all().map_err(werr)?;
    }
    std::fs::rename(&tmp, path).map_err(werr)?;
    sync_dir(path).map_err(werr)
}

fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// The persistent out-of-sync bitmap of an image.
#[derive(Debug)]
pub struct BitmapFile {
    file: File,
    path: PathBuf,
}

impl BitmapFile {
    /// Opens `IMG.bitmap`, or creates an all-clear one; returns the file and its bitmap.
    pub fn open_or_create(image: &Path, size: u64) -> Result<(Self, Bitmap), MetaError> {
        let path = bitmap_path(image);
        if !path.exists() {
            let b = Bitmap::new(size);
            let mut bytes = header(size);
            for w in b.words() {
                bytes.extend_from_slice(&w.to_le_bytes());
            }
            replace_file(&path, &bytes)?;
        }
        let rerr = |source| MetaError::Read {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(rerr)?;
        let raw = std::fs::read(&path).map_err(rerr)?;
        let bad = || MetaError::BadBitmap {
            path: path.clone(),
            size,
        };
        // Exactly the header and the words: a file cut inside its last word is damaged, not
        // a word whose missing bytes are clear.
        let words = size.div_ceil(REGION_SIZE).div_ceil(64);
        if raw.len() as u64 != BITMAP_HEADER + 8 * words || raw[..32] != header(size)[..] {
            return Err(bad());
        }
        let words: Vec<u64> = raw[BITMAP_HEADER as usize..]
            .chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                u64::from_le_bytes(a)
            })
            .collect();
        let bitmap = Bitmap::from_words(size, words).ok_or_else(bad)?;
        Ok((BitmapFile { file, path }, bitmap))
    }

    /// Writes the given words of `bitmap` and makes them durable.
    pub fn persist_words(&self, bitmap: &Bitmap, words: &[usize]) -> Result<(), MetaError> {
        if words.is_empty() {
            return Ok(());
        }
        let werr = |source| MetaError::Write {
            path: self.path.clone(),
            source,
        };
        for &w in words {
            let v = bitmap.words().get(w).copied().unwrap_or(0);
            self.file
                .write_all_at(&v.to_le_bytes(), BITMAP_HEADER + 8 * w as u64)
                .map_err(werr)?;
        }
        self.file.sync_data().map_err(werr)
    }

    /// Writes the whole bitmap and makes it durable.
    pub fn persist_all(&self, bitmap: &Bitmap) -> Result<(), MetaError> {
        let mut bytes = Vec::with_capacity(bitmap.words().len() * 8);
        for w in bitmap.words() {
            bytes.extend_from_slice(&w.to_le_bytes());
        }
        let werr = |source| MetaError::Write {
            path: self.path.clone(),
            source,
        };
        self.file
            .write_all_at(&bytes, BITMAP_HEADER)
            .map_err(werr)?;
        self.file.sync_data().map_err(werr)
    }
}

fn header(size: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(BITMAP_HEADER as usize);
    h.extend_from_slice(BITMAP_MAGIC);
    h.extend_from_slice(&META_FORMAT.to_le_bytes());
    h.extend_from_slice(&[0; 4]);
    h.extend_from_slice(&size.to_le_bytes());
    h.extend_from_slice(&REGION_SIZE.to_le_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Meta {
        Meta {
            format: META_FORMAT,
            node_id: 1,
            size: 1 << 20,
            role: Role::Primary,
            disk_state: DiskState::UpToDate,
            generation: 7,
            bitmap_generation: 0,
            history: vec![6],
        }
    }

    #[test]
    fn meta_round_trip_and_no_temp_left() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        assert_eq!(load(&img).unwrap(), None);
        save(&img, &meta()).unwrap();
        assert_eq!(load(&img).unwrap(), Some(meta()));
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        let text = std::fs::read_to_string(meta_path(&img)).unwrap();
        assert!(text.contains("\"role\": \"primary\""));
        assert!(text.contains("\"disk_state\": \"up-to-date\""));
    }

    #[test]
    fn save_in_place_pads_and_round_trips() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        save(&img, &meta()).unwrap();
        let before = std::fs::metadata(meta_path(&img)).unwrap().len();
        let outdated = Meta {
            disk_state: DiskState::Outdated,
            ..meta()
        };
        let old_text = std::fs::read(meta_path(&img)).unwrap();
        save_in_place(&img, &outdated).unwrap();
        assert_eq!(load(&img).unwrap(), Some(outdated));
        assert_eq!(std::fs::metadata(meta_path(&img)).unwrap().len(), before);
        // Only the value changed, in place: the bytes around it are the same.
        let new_text = std::fs::read(meta_path(&img)).unwrap();
        let changed: Vec<usize> = (0..old_text.len())
            .filter(|&i| old_text[i] != new_text[i])
            .collect();
        assert!(changed.len() <= 12, "{} bytes changed", changed.len());
        assert!(changed[changed.len() - 1] - changed[0] < 12);
        let longer = Meta {
            history: vec![1, 2, 3, 4, 5, 6],
            ..meta()
        };
        assert!(save_in_place(&img, &longer).is_err());
    }

    #[test]
    fn unknown_format_and_garbage_are_errors() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        std::fs::write(meta_path(&img), "{\"format\": 99}").unwrap();
        assert!(matches!(
            load(&img),
            Err(MetaError::Format { found: 99, .. })
        ));
        std::fs::write(meta_path(&img), "garbage").unwrap();
        assert!(matches!(load(&img), Err(MetaError::Parse { .. })));
    }

    #[test]
    fn bitmap_persists_words() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        let size = 200 * REGION_SIZE;
        let (f, mut b) = BitmapFile::open_or_create(&img, size).unwrap();
        assert!(b.is_clear());
        let mut changed = Vec::new();
        b.set_range(5 * REGION_SIZE, 1, &mut changed);
        b.set_range(130 * REGION_SIZE, 1, &mut changed);
        f.persist_words(&b, &changed).unwrap();
        drop(f);
        let (_f, b2) = BitmapFile::open_or_create(&img, size).unwrap();
        assert_eq!(b2, b);
        // A file cut inside its last word is refused (found by fuzz/meta_parsers: the
        // missing bytes read as clear bits, regions silently in sync).
        let p = bitmap_path(&img);
        let full = std::fs::read(&p).unwrap();
        for cut in [full.len() - 1, full.len() - 7, full.len() + 1] {
            let mut f = full.clone();
            f.resize(cut, 0xff);
            std::fs::write(&p, &f).unwrap();
            assert!(matches!(
                BitmapFile::open_or_create(&img, size),
                Err(MetaError::BadBitmap { .. })
            ));
        }
        std::fs::write(&p, &full).unwrap();
        // A bitmap for another size is refused.
        assert!(matches!(
            BitmapFile::open_or_create(&img, size * 2),
            Err(MetaError::BadBitmap { .. })
        ));
    }
}
