//! Metadata kept beside an image (`IMG.meta`, JSON). The image itself stays a plain raw file
//! any QEMU can boot; the out-of-sync bitmap is `bitmap_file.rs`, the activity log
//! `activity_log.rs`.
//!
//! Format 2 (written by this code) is pretty-printed JSON that carries a CRC32C of itself:
//!
//! ```text
//! {
//!   "format": 2,
//!   "crc32c": "1c291ca3",
//!   "disk_state": "up-to-date",
//!   "node_id": ..., "size": ..., "role": ..., "generation": ...,
//!   "bitmap_generation": ..., "history": [...]
//! }
//! ```
//!
//! The checksum covers every byte of the file (padding included), with its own eight hex
//! digits read as `00000000`; so a file cut short, extended, or with a flipped bit anywhere is
//! refused with [`MetaError::Damaged`] (or [`MetaError::Parse`]), never loaded as some other
//! state. `IMG.meta` is replaced atomically (`files::replace`: temp file, rename), so a crash
//! leaves the old or the new file. The one in-place update, [`save_in_place`] (a full disk),
//! changes the disk state and the checksum: both sit in the first lines, so the write is one
//! run of a few dozen bytes inside the first 512-byte sector, which a power loss leaves old or
//! new as a whole.
//!
//! Format 1 (before checksums: the same fields, no `crc32c`, `disk_state` after `role`) is
//! still read; [`load_upgrading`] rewrites it in format 2.

use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use log::{info, warn};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::files;
use crate::frame::{DiskState, Role};

/// Version of the metadata format written by this code.
pub const META_FORMAT: u32 = 2;
/// The format before checksums; still read.
pub const META_FORMAT_V1: u32 = 1;
const CRC_KEY: &[u8] = b"\"crc32c\"";
const CRC_PLACEHOLDER: &[u8; 8] = b"00000000";
/// What an operator can do about a metadata file that cannot be read.
const META_REMEDY: &str = "if it cannot be restored, remove it: the image then pairs afresh \
                           (its next pairing copies the whole image)";

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
    #[error("{path} is damaged (not valid metadata); {}", META_REMEDY)]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} is damaged ({reason}); {}", META_REMEDY)]
    Damaged { path: PathBuf, reason: String },
    #[error("{path} has format {found}; this version reads formats 1 and {META_FORMAT}")]
    Format { path: PathBuf, found: u32 },
    #[error(
        "{path} cannot be used ({reason}); remove it: the next start rebuilds it, with every \
         region out of sync if the metadata says any was"
    )]
    BadBitmap { path: PathBuf, reason: String },
}

/// The state recorded beside an image (and format 1's layout: a file with any other field,
/// a format 2 file whose format number was damaged, say, is refused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    /// The format of the file this was read from ([`save`] always writes [`META_FORMAT`]).
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

/// Format 2 on disk: the field order is the file's layout (see the module documentation).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OnDisk {
    format: u32,
    crc32c: String,
    disk_state: DiskState,
    node_id: u64,
    size: u64,
    role: Role,
    generation: u64,
    bitmap_generation: u64,
    history: Vec<u64>,
}

pub fn meta_path(image: &Path) -> PathBuf {
    files::with_suffix(image, ".meta")
}

/// The text of `meta` in format 2, checksum included.
fn render(meta: &Meta, path: &Path) -> Result<Vec<u8>, MetaError> {
    let mut text = render_unsealed(meta, path)?;
    seal(&mut text);
    Ok(text)
}

/// Format 2 with the checksum digits `00000000`.
fn render_unsealed(meta: &Meta, path: &Path) -> Result<Vec<u8>, MetaError> {
    let d = OnDisk {
        format: META_FORMAT,
        crc32c: String::from_utf8_lossy(CRC_PLACEHOLDER).into_owned(),
        disk_state: meta.disk_state,
        node_id: meta.node_id,
        size: meta.size,
        role: meta.role,
        generation: meta.generation,
        bitmap_generation: meta.bitmap_generation,
        history: meta.history.clone(),
    };
    to_text(&d, path)
}

/// Pretty JSON and a final newline.
fn to_text(value: &impl Serialize, path: &Path) -> Result<Vec<u8>, MetaError> {
    let mut text = serde_json::to_vec_pretty(value).map_err(|e| MetaError::Write {
        path: path.to_owned(),
        source: io::Error::other(e),
    })?;
    text.push(b'\n');
    Ok(text)
}

/// Where the eight hex digits of the checksum are: after `"crc32c"`, `:` and `"`.
fn crc_digits(text: &[u8]) -> Option<std::ops::Range<usize>> {
    let key = text.windows(CRC_KEY.len()).position(|w| w == CRC_KEY)? + CRC_KEY.len();
    let mut i = key;
    let skip_ws = |i: &mut usize| {
        while text.get(*i).is_some_and(u8::is_ascii_whitespace) {
            *i += 1;
        }
    };
    skip_ws(&mut i);
    (text.get(i) == Some(&b':')).then_some(())?;
    i += 1;
    skip_ws(&mut i);
    (text.get(i) == Some(&b'"')).then_some(())?;
    let digits = i + 1..i + 9;
    (text.get(digits.end) == Some(&b'"')).then_some(digits)
}

/// The checksum of a format 2 text: CRC32C of every byte, the digits read as `00000000`.
fn checksum(text: &[u8], digits: std::ops::Range<usize>) -> u32 {
    let crc = crc32c::crc32c(&text[..digits.start]);
    let crc = crc32c::crc32c_append(crc, CRC_PLACEHOLDER);
    crc32c::crc32c_append(crc, &text[digits.end..])
}

/// Writes the checksum of a format 2 text into it.
fn seal(text: &mut [u8]) {
    if let Some(d) = crc_digits(text) {
        let hex = format!("{:08x}", checksum(text, d.clone()));
        text[d].copy_from_slice(hex.as_bytes());
    }
}

/// Parses the bytes of a metadata file (`path` only names it in errors).
fn parse(path: &Path, text: &[u8]) -> Result<Meta, MetaError> {
    let perr = |source| MetaError::Parse {
        path: path.to_owned(),
        source,
    };
    #[derive(Deserialize)]
    struct Probe {
        format: u32,
    }
    let probe: Probe = serde_json::from_slice(text).map_err(perr)?;
    match probe.format {
        META_FORMAT_V1 => serde_json::from_slice(text).map_err(perr),
        META_FORMAT => {
            let d: OnDisk = serde_json::from_slice(text).map_err(perr)?;
            let damaged = |reason: String| MetaError::Damaged {
                path: path.to_owned(),
                reason,
            };
            let digits = crc_digits(text).ok_or_else(|| damaged("no checksum".into()))?;
            let actual = format!("{:08x}", checksum(text, digits.clone()));
            if text[digits] != *actual.as_bytes() || d.crc32c != actual {
                return Err(damaged(format!(
                    "checksum mismatch: recorded {}, content {actual}",
                    d.crc32c
                )));
            }
            Ok(Meta {
                format: META_FORMAT,
                node_id: d.node_id,
                size: d.size,
                role: d.role,
                disk_state: d.disk_state,
                generation: d.generation,
                bitmap_generation: d.bitmap_generation,
                history: d.history,
            })
        }
        found => Err(MetaError::Format {
            path: path.to_owned(),
            found,
        }),
    }
}

/// Reads `IMG.meta`; `Ok(None)` if there is none. A damaged file is an error.
pub fn load(image: &Path) -> Result<Option<Meta>, MetaError> {
    let path = meta_path(image);
    let text = match files::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(MetaError::Read { path, source }),
    };
    parse(&path, &text).map(Some)
}

/// [`load`], and a file in an older format is rewritten in [`META_FORMAT`] (logged). If that
/// rewrite fails (a full disk) the old file stays and is used: the next [`save`] writes the
/// new format anyway.
pub fn load_upgrading(image: &Path) -> Result<Option<Meta>, MetaError> {
    let Some(mut m) = load(image)? else {
        return Ok(None);
    };
    if m.format != META_FORMAT {
        let path = meta_path(image);
        match save(image, &m) {
            Ok(()) => {
                info!(
                    "{}: format {} rewritten in format {META_FORMAT} (with a checksum)",
                    path.display(),
                    m.format
                );
                m.format = META_FORMAT;
            }
            Err(e) => warn!(
                "{}: cannot rewrite format {} in format {META_FORMAT}, keeping it: {}",
                path.display(),
                m.format,
                crate::sys::error_chain(&e)
            ),
        }
    }
    Ok(Some(m))
}

/// Writes `IMG.meta` crash-safely, in [`META_FORMAT`] (whatever `meta.format` says).
pub fn save(image: &Path, meta: &Meta) -> Result<(), MetaError> {
    let path = meta_path(image);
    let text = render(meta, &path)?;
    files::replace(&path, &text).map_err(|source| MetaError::Write { path, source })
}

/// Writes `IMG.meta` over the existing file's bytes, allocating no disk space: for a disk that is
/// full (the one moment a replica must record that it fell behind). Only when the new text is
/// not longer than the file: it is padded with spaces (which JSON ignores) right after the
/// changed value. Only the bytes that differ are written, with one `pwrite`, made durable with
/// `fdatasync`; for a change of the disk state that is the state and the checksum, one short
/// run inside the first sector, so a torn write cannot mix two texts. A file still in format 1
/// is patched in format 1.
pub fn save_in_place(image: &Path, meta: &Meta) -> Result<(), MetaError> {
    let path = meta_path(image);
    let werr = |source| MetaError::Write {
        path: path.clone(),
        source,
    };
    let f = files::open(&path, true).map_err(werr)?;
    let current = files::read(&path).map_err(werr)?;
    let v1 = parse(&path, &current).is_ok_and(|m| m.format == META_FORMAT_V1);
    let new_text = if v1 {
        let m = Meta {
            format: META_FORMAT_V1,
            ..meta.clone()
        };
        to_text(&m, &path)?
    } else {
        render_unsealed(meta, &path)?
    };
    // Compare with the current text's checksum digits read as the placeholder, so the padding
    // goes after the changed value, not after the checksum.
    let mut base = current.clone();
    if let Some(d) = crc_digits(&base).filter(|_| !v1) {
        base[d].copy_from_slice(CRC_PLACEHOLDER);
    }
    let Some(mut full) = pad_to(&base, &new_text) else {
        return Err(werr(io::Error::other(
            "the new metadata is longer than the file",
        )));
    };
    if !v1 {
        seal(&mut full);
    }
    // Never write something that does not read back as `meta`.
    let same = |m: Meta| {
        Meta {
            format: meta.format,
            ..m
        } == *meta
    };
    if !parse(&path, &full).is_ok_and(same) {
        return Err(werr(io::Error::other("cannot patch the metadata in place")));
    }
    let first = current.iter().zip(&full).position(|(a, b)| a != b);
    if let Some(first) = first {
        let last = current
            .iter()
            .zip(&full)
            .rposition(|(a, b)| a != b)
            .unwrap_or(first);
        f.write_all_at(&full[first..=last], first as u64)
            .map_err(werr)?;
    }
    f.sync_data().map_err(werr)
}

/// `new` padded with spaces to the length of `old`, the padding placed after the part that
/// differs from `old` (before the next `,` or newline, where JSON allows whitespace). None if
/// `new` is longer.
fn pad_to(old: &[u8], new: &[u8]) -> Option<Vec<u8>> {
    let pad = old.len().checked_sub(new.len())?;
    let prefix = old.iter().zip(new).take_while(|(a, b)| a == b).count();
    let max_suffix = new.len() - prefix;
    let suffix = old
        .iter()
        .rev()
        .zip(new.iter().rev())
        .take(max_suffix)
        .take_while(|(a, b)| a == b)
        .count();
    // The changed part of `new` ends at `new.len() - suffix`; pad at the next separator (the
    // text ends with a newline, so there is one).
    let from = (new.len() - suffix).min(new.len().saturating_sub(1));
    let at = new[from..]
        .iter()
        .position(|&c| c == b',' || c == b'\n')
        .map_or(new.len(), |i| from + i);
    let mut out = Vec::with_capacity(old.len());
    out.extend_from_slice(&new[..at]);
    out.resize(at + pad, b' ');
    out.extend_from_slice(&new[at..]);
    Some(out)
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

    /// The format 1 text of `m`, as the code before checksums wrote it.
    fn v1_text(m: &Meta) -> Vec<u8> {
        let mut t = serde_json::to_vec_pretty(&Meta {
            format: META_FORMAT_V1,
            ..m.clone()
        })
        .unwrap();
        t.push(b'\n');
        t
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
        assert!(
            text.starts_with("{\n  \"format\": 2,\n  \"crc32c\": \""),
            "{text}"
        );
    }

    #[test]
    fn save_in_place_pads_and_round_trips() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        // The longest history: the patch must still be inside the first sector.
        let long = Meta {
            history: (1..=16).map(|i| u64::MAX - i).collect(),
            generation: u64::MAX,
            node_id: u64::MAX,
            ..meta()
        };
        save(&img, &long).unwrap();
        let before = std::fs::metadata(meta_path(&img)).unwrap().len();
        assert!(before > 512, "a file of {before} bytes proves nothing");
        let mut state = long.clone();
        for next in [
            DiskState::Outdated,
            DiskState::UpToDate,
            DiskState::Outdated,
        ] {
            state.disk_state = next;
            let old_text = std::fs::read(meta_path(&img)).unwrap();
            save_in_place(&img, &state).unwrap();
            assert_eq!(load(&img).unwrap(), Some(state.clone()));
            assert_eq!(std::fs::metadata(meta_path(&img)).unwrap().len(), before);
            // Only the value and the checksum changed, in place: one short run in sector 0.
            let new_text = std::fs::read(meta_path(&img)).unwrap();
            let changed: Vec<usize> = (0..old_text.len())
                .filter(|&i| old_text[i] != new_text[i])
                .collect();
            let (first, last) = (changed[0], changed[changed.len() - 1]);
            assert!(last < 512, "bytes {first}..={last} changed");
            assert!(last - first < 64, "bytes {first}..={last} changed");
        }
        // Longer than the file: refused, nothing written.
        let longer = Meta {
            disk_state: DiskState::Inconsistent,
            ..long.clone()
        };
        assert!(save_in_place(&img, &longer).is_err());
        assert_eq!(load(&img).unwrap(), Some(state));
    }

    #[test]
    fn save_in_place_keeps_a_format_1_file_in_format_1() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        std::fs::write(meta_path(&img), v1_text(&meta())).unwrap();
        let outdated = Meta {
            disk_state: DiskState::Outdated,
            format: META_FORMAT_V1,
            ..meta()
        };
        save_in_place(&img, &outdated).unwrap();
        assert_eq!(load(&img).unwrap(), Some(outdated));
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
        for garbage in [&b"garbage"[..], b"", b"\0\0\0\0", b"{\"format\": 2}"] {
            std::fs::write(meta_path(&img), garbage).unwrap();
            let e = load(&img).unwrap_err();
            assert!(matches!(e, MetaError::Parse { .. }), "{e:?}");
            assert!(e.to_string().contains("disk.img.meta is damaged"), "{e}");
        }
    }

    /// Every way a saved file can be damaged is an error naming the file, never a state.
    #[test]
    fn damaged_metadata_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        save(&img, &meta()).unwrap();
        let good = std::fs::read(meta_path(&img)).unwrap();
        let check = |bytes: &[u8], what: &str| {
            std::fs::write(meta_path(&img), bytes).unwrap();
            match load(&img) {
                Err(
                    e @ (MetaError::Damaged { .. }
                    | MetaError::Parse { .. }
                    | MetaError::Format { .. }),
                ) => {
                    assert!(e.to_string().contains("disk.img.meta"), "{what}: {e}")
                }
                other => panic!("{what}: {other:?}"),
            }
        };
        // A flipped bit in every byte: a digit of a number, a letter of a state, the checksum.
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x01;
            // Whitespace that stays whitespace (' ' <-> '!' is not) is still caught by the CRC.
            check(&b, &format!("bit flipped at {i}"));
        }
        // Cut anywhere, also just before the last newline.
        for len in [0, 1, good.len() / 2, good.len() - 2, good.len() - 1] {
            check(&good[..len], &format!("cut to {len}"));
        }
        // Extended with whitespace (valid JSON, but not the bytes that were checksummed).
        check(&[&good[..], b"  \n"].concat(), "extended");
        // The state changed by hand, checksum not.
        let text = String::from_utf8(good.clone()).unwrap();
        check(
            text.replace("\"up-to-date\"", "\"outdated\"").as_bytes(),
            "edited",
        );
        // The format number damaged to the old format's (which has no checksum to check).
        check(
            text.replace("\"format\": 2", "\"format\": 1").as_bytes(),
            "format 1",
        );
        // The checksum removed.
        let no_crc: Vec<&str> = text.lines().filter(|l| !l.contains("crc32c")).collect();
        check(no_crc.join("\n").as_bytes(), "no checksum");
        // Back to the good bytes: fine again.
        std::fs::write(meta_path(&img), &good).unwrap();
        assert_eq!(load(&img).unwrap(), Some(meta()));
    }

    #[test]
    fn format_1_is_read_and_upgraded() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        std::fs::write(meta_path(&img), v1_text(&meta())).unwrap();
        let m = load(&img).unwrap().unwrap();
        assert_eq!(m.format, META_FORMAT_V1);
        assert_eq!(
            Meta {
                format: META_FORMAT,
                ..m
            },
            meta()
        );
        assert_eq!(load_upgrading(&img).unwrap(), Some(meta()));
        let text = std::fs::read_to_string(meta_path(&img)).unwrap();
        assert!(text.contains("\"crc32c\""), "{text}");
        assert_eq!(load(&img).unwrap(), Some(meta()));
    }

    #[test]
    fn a_symlinked_metadata_file_or_temp_path_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        let victim = d.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        // A planted temp link is removed, not written through.
        std::os::unix::fs::symlink(&victim, files::with_suffix(&meta_path(&img), ".tmp")).unwrap();
        save(&img, &meta()).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        // The metadata file itself a link: not read, not patched.
        std::fs::remove_file(meta_path(&img)).unwrap();
        let text = render(&meta(), &victim).unwrap();
        std::fs::write(&victim, &text).unwrap();
        std::os::unix::fs::symlink(&victim, meta_path(&img)).unwrap();
        assert!(matches!(load(&img), Err(MetaError::Read { .. })));
        let outdated = Meta {
            disk_state: DiskState::Outdated,
            ..meta()
        };
        assert!(save_in_place(&img, &outdated).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), text);
    }
}
