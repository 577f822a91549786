//! `IMG.bitmap`: the out-of-sync bitmap of an image on disk ([`Bitmap`] is the one in memory),
//! updated in place on the data path.
//!
//! Format 2: 512-byte blocks, integers little-endian, each block ending in the CRC32C of its
//! first 508 bytes.
//!
//! ```text
//! block 0        "VHMBITMP" | version 2 (u32) | block size 512 (u32) | image size (u64)
//!                | region size (u64) | regions (u64) | data blocks B (u64) | zeros | CRC32C
//! block k        63 bitmap words (words 63(k-1) .. 63k-1; zeros past the last word)
//!   (k = 1..=B)  | k (u32) | CRC32C
//! ```
//!
//! The file is exactly (1 + B) * 512 bytes: created whole by an atomic replace
//! (`files::replace`), never resized.
//!
//! Crash argument: a mark or a clear rewrites whole data blocks, the words that changed and
//! their block's checksum in one `pwrite` of the block, then `fdatasync`s. A block is one
//! 512-byte sector at a 512-byte offset, and a disk writes a sector atomically, so after a
//! power loss every block holds its old or its new content, each with a valid checksum; the
//! header is never rewritten. So a power loss does not make a bad block. A bad one is damage
//! (the medium, a foreign write) and is read conservatively: every region it covers is set
//! (may differ), and the user of the file ([`BitmapFile::damaged`]) marks them durably, which
//! rewrites the block. A set bit only costs a resync of its region. A file that cannot be this
//! image's bitmap at all (magic, version, header checksum, image size, length: a file cut or
//! extended) is refused with [`MetaError::BadBitmap`], which says what to do.
//!
//! Format 1 (before checksums: a 32-byte header, then the words) is read if its length is
//! exact, and rewritten in format 2 at once.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use log::info;

use crate::bitmap::{Bitmap, REGION_SIZE};
use crate::files;
use crate::meta::MetaError;

const MAGIC: &[u8; 8] = b"VHMBITMP";
/// Version of the bitmap format written by this code.
pub const BITMAP_FORMAT: u32 = 2;
const FORMAT_V1: u32 = 1;
const V1_HEADER: usize = 32;
/// Bytes per block: one sector.
const BLOCK: usize = 512;
/// Bitmap words per data block.
const WORDS_PER_BLOCK: usize = 63;
const INDEX_AT: usize = WORDS_PER_BLOCK * 8;
const CRC_AT: usize = BLOCK - 4;

pub fn bitmap_path(image: &Path) -> PathBuf {
    files::with_suffix(image, ".bitmap")
}

/// The persistent out-of-sync bitmap of an image.
#[derive(Debug)]
pub struct BitmapFile {
    file: File,
    path: PathBuf,
    damaged: Vec<(u64, u64)>,
    /// Persists so far (each a write of blocks and an fdatasync), for the metrics.
    writes: AtomicU64,
}

/// Words of the bitmap of an image of `size` bytes.
fn word_count(size: u64) -> usize {
    size.div_ceil(REGION_SIZE).div_ceil(64) as usize
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn seal(b: &mut [u8; BLOCK]) {
    let crc = crc32c::crc32c(&b[..CRC_AT]);
    b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
}

fn sealed(b: &[u8]) -> bool {
    b.len() == BLOCK && u32_at(b, CRC_AT) == crc32c::crc32c(&b[..CRC_AT])
}

fn header(size: u64) -> [u8; BLOCK] {
    let words = word_count(size);
    let mut h = [0u8; BLOCK];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&BITMAP_FORMAT.to_le_bytes());
    h[12..16].copy_from_slice(&(BLOCK as u32).to_le_bytes());
    h[16..24].copy_from_slice(&size.to_le_bytes());
    h[24..32].copy_from_slice(&REGION_SIZE.to_le_bytes());
    h[32..40].copy_from_slice(&size.div_ceil(REGION_SIZE).to_le_bytes());
    h[40..48].copy_from_slice(&(words.div_ceil(WORDS_PER_BLOCK) as u64).to_le_bytes());
    seal(&mut h);
    h
}

fn header_v1(size: u64) -> [u8; V1_HEADER] {
    let mut h = [0u8; V1_HEADER];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&FORMAT_V1.to_le_bytes());
    h[16..24].copy_from_slice(&size.to_le_bytes());
    h[24..32].copy_from_slice(&REGION_SIZE.to_le_bytes());
    h
}

/// Data block `k` (from 1) of a bitmap with `words`.
fn encode_block(k: usize, words: &[u64]) -> [u8; BLOCK] {
    let mut b = [0u8; BLOCK];
    let first = (k - 1) * WORDS_PER_BLOCK;
    for (i, w) in words.iter().skip(first).take(WORDS_PER_BLOCK).enumerate() {
        b[8 * i..8 * i + 8].copy_from_slice(&w.to_le_bytes());
    }
    b[INDEX_AT..CRC_AT].copy_from_slice(&(k as u32).to_le_bytes());
    seal(&mut b);
    b
}

/// Every data block of `bitmap`.
fn encode_data(bitmap: &Bitmap) -> Vec<u8> {
    let words = bitmap.words();
    let blocks = words.len().div_ceil(WORDS_PER_BLOCK);
    let mut out = Vec::with_capacity(blocks * BLOCK);
    for k in 1..=blocks {
        out.extend_from_slice(&encode_block(k, words));
    }
    out
}

/// The regions `(first, count)` data block `k` covers in a bitmap of `regions`.
fn block_regions(k: usize, regions: u64) -> (u64, u64) {
    let per = (WORDS_PER_BLOCK * 64) as u64;
    let first = (k as u64 - 1) * per;
    (first, (first + per).min(regions).saturating_sub(first))
}

/// A bitmap file read: its words (a damaged block's all set), the damaged blocks, its format.
#[derive(Debug)]
struct Parsed {
    words: Vec<u64>,
    damaged: Vec<usize>,
    format: u32,
}

/// Reads the bytes of a bitmap file for an image of `size` bytes; Err says why it is not one.
fn parse(raw: &[u8], size: u64) -> Result<Parsed, String> {
    let n = word_count(size);
    if raw.len() < 32 || &raw[..8] != MAGIC {
        return Err("not a bitmap file (no VHMBITMP header)".into());
    }
    let recorded = u64_at(raw, 16);
    let other_image = || format!("a bitmap for an image of {recorded} bytes, not {size}");
    match u32_at(raw, 8) {
        FORMAT_V1 => {
            if raw[..V1_HEADER] != header_v1(size) {
                return Err(if recorded != size {
                    other_image()
                } else {
                    "bad format 1 header".into()
                });
            }
            let want = V1_HEADER + 8 * n;
            if raw.len() != want {
                return Err(format!(
                    "{} bytes where this image's format 1 bitmap has {want}: cut or extended",
                    raw.len()
                ));
            }
            let words = raw[V1_HEADER..]
                .chunks_exact(8)
                .map(|c| u64_at(c, 0))
                .collect();
            Ok(Parsed {
                words,
                damaged: Vec::new(),
                format: FORMAT_V1,
            })
        }
        BITMAP_FORMAT => {
            if raw.len() < BLOCK || !sealed(&raw[..BLOCK]) {
                return Err("the header is damaged (checksum mismatch)".into());
            }
            if raw[..BLOCK] != header(size) {
                return Err(if recorded != size {
                    other_image()
                } else {
                    "the header does not describe this image's bitmap".into()
                });
            }
            let blocks = n.div_ceil(WORDS_PER_BLOCK);
            let want = (1 + blocks) * BLOCK;
            if raw.len() != want {
                return Err(format!(
                    "{} bytes where this image's bitmap has {want}: cut or extended",
                    raw.len()
                ));
            }
            let mut words = Vec::with_capacity(n);
            let mut damaged = Vec::new();
            for k in 1..=blocks {
                let b = &raw[k * BLOCK..(k + 1) * BLOCK];
                let ok = sealed(b) && u32_at(b, INDEX_AT) == k as u32;
                if !ok {
                    damaged.push(k);
                }
                let count = WORDS_PER_BLOCK.min(n - words.len());
                words.extend((0..count).map(|i| if ok { u64_at(b, 8 * i) } else { u64::MAX }));
            }
            Ok(Parsed {
                words,
                damaged,
                format: BITMAP_FORMAT,
            })
        }
        v => Err(format!(
            "format {v}; this program reads formats {FORMAT_V1} and {BITMAP_FORMAT}"
        )),
    }
}

/// Reads `IMG.bitmap` without changing it: None if there is none. A damaged block's regions
/// come back set (they may differ); a file that is not this image's bitmap is
/// [`MetaError::BadBitmap`].
pub fn read(image: &Path, size: u64) -> Result<Option<Bitmap>, MetaError> {
    let path = bitmap_path(image);
    let raw = match files::read(&path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(MetaError::Read { path, source }),
        Ok(raw) => raw,
    };
    let bad = |reason| MetaError::BadBitmap {
        path: path.clone(),
        reason,
    };
    let p = parse(&raw, size).map_err(bad)?;
    Bitmap::from_words(size, p.words)
        .map(Some)
        .ok_or_else(|| bad("wrong number of words".into()))
}

impl BitmapFile {
    /// Opens `IMG.bitmap`, or creates an all-clear one; returns the file and its bitmap. A
    /// damaged block's regions are set in the bitmap returned (see [`Self::damaged`]); a file
    /// that is not this image's bitmap is [`MetaError::BadBitmap`]; a format 1 file is rewritten
    /// in format 2.
    pub fn open_or_create(image: &Path, size: u64) -> Result<(Self, Bitmap), MetaError> {
        let path = bitmap_path(image);
        let werr = |source| MetaError::Write {
            path: path.clone(),
            source,
        };
        let bad = |reason| MetaError::BadBitmap {
            path: path.clone(),
            reason,
        };
        let write_whole = |b: &Bitmap| {
            let mut bytes = header(size).to_vec();
            bytes.extend_from_slice(&encode_data(b));
            files::replace(&path, &bytes).map_err(werr)
        };
        let (bitmap, damaged) = match files::read(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let b = Bitmap::new(size);
                write_whole(&b)?;
                (b, Vec::new())
            }
            Err(source) => {
                return Err(MetaError::Read {
                    path: path.clone(),
                    source,
                })
            }
            Ok(raw) => {
                let p = parse(&raw, size).map_err(bad)?;
                let b = Bitmap::from_words(size, p.words)
                    .ok_or_else(|| bad("wrong number of words".into()))?;
                if p.format != BITMAP_FORMAT {
                    write_whole(&b)?;
                    info!(
                        "{}: format {} rewritten in format {BITMAP_FORMAT} (with checksums)",
                        path.display(),
                        p.format
                    );
                }
                let damaged = p
                    .damaged
                    .iter()
                    .map(|&k| block_regions(k, b.regions()))
                    .collect();
                (b, damaged)
            }
        };
        let file = files::open(&path, true).map_err(|source| MetaError::Read {
            path: path.clone(),
            source,
        })?;
        Ok((
            BitmapFile {
                file,
                path,
                damaged,
                writes: AtomicU64::new(0),
            },
            bitmap,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The regions `(first, count)` of each block found damaged when the file was opened: set
    /// in the bitmap returned, but not yet on disk (the caller marks them durably).
    pub fn damaged(&self) -> &[(u64, u64)] {
        &self.damaged
    }

    /// Persists made since the file was opened (tried: also failed ones).
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Writes the blocks holding the given words of `bitmap` and makes them durable.
    pub fn persist_words(&self, bitmap: &Bitmap, words: &[usize]) -> Result<(), MetaError> {
        if words.is_empty() {
            return Ok(());
        }
        self.writes.fetch_add(1, Ordering::Relaxed);
        let werr = |source| MetaError::Write {
            path: self.path.clone(),
            source,
        };
        let mut last = None;
        for &w in words {
            let k = w / WORDS_PER_BLOCK + 1;
            if last == Some(k) {
                continue;
            }
            last = Some(k);
            self.file
                .write_all_at(&encode_block(k, bitmap.words()), (k * BLOCK) as u64)
                .map_err(werr)?;
        }
        self.file.sync_data().map_err(werr)
    }

    /// Writes the whole bitmap and makes it durable.
    pub fn persist_all(&self, bitmap: &Bitmap) -> Result<(), MetaError> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        let werr = |source| MetaError::Write {
            path: self.path.clone(),
            source,
        };
        self.file
            .write_all_at(&encode_data(bitmap), BLOCK as u64)
            .map_err(werr)?;
        self.file.sync_data().map_err(werr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 200 regions: 4 words, one data block. `big`: 3 blocks and a short last one.
    const SIZE: u64 = 200 * REGION_SIZE;
    const BIG: u64 = (2 * 63 * 64 + 100) * REGION_SIZE;

    #[test]
    fn persists_are_counted() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        let (f, mut b) = BitmapFile::open_or_create(&img, SIZE).unwrap();
        assert_eq!(f.writes(), 0);
        f.persist_words(&b, &[]).unwrap();
        assert_eq!(f.writes(), 0, "nothing to write is no write");
        let mut changed = Vec::new();
        b.set_range(0, 1, &mut changed);
        f.persist_words(&b, &changed).unwrap();
        f.persist_all(&b).unwrap();
        assert_eq!(f.writes(), 2);
    }

    fn marked(img: &Path, size: u64, regions: &[u64]) -> Bitmap {
        let (f, mut b) = BitmapFile::open_or_create(img, size).unwrap();
        let mut changed = Vec::new();
        for &r in regions {
            b.set_range(r * REGION_SIZE, 1, &mut changed);
        }
        f.persist_words(&b, &changed).unwrap();
        b
    }

    fn reopen(img: &Path, size: u64) -> Result<(BitmapFile, Bitmap), MetaError> {
        BitmapFile::open_or_create(img, size)
    }

    fn bad(img: &Path, size: u64, what: &str) -> String {
        match reopen(img, size) {
            Err(e @ MetaError::BadBitmap { .. }) => {
                let s = e.to_string();
                assert!(s.contains("disk.img.bitmap"), "{what}: {s}");
                assert!(s.contains("remove it"), "{what}: {s}");
                s
            }
            other => panic!("{what}: {other:?}"),
        }
    }

    #[test]
    fn bitmap_persists_words() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        let b = marked(&img, BIG, &[5, 130, 63 * 64 + 1, 2 * 63 * 64 + 99]);
        assert_eq!(b.count(), 4);
        let len = std::fs::metadata(bitmap_path(&img)).unwrap().len();
        assert_eq!(len, 4 * BLOCK as u64);
        let (f, b2) = reopen(&img, BIG).unwrap();
        assert_eq!(b2, b);
        assert!(f.damaged().is_empty());
        // Cleared and written whole.
        let mut b3 = b2.clone();
        b3.clear_all();
        f.persist_all(&b3).unwrap();
        assert!(reopen(&img, BIG).unwrap().1.is_clear());
        // A bitmap for another size is refused.
        let e = bad(&img, BIG * 2, "other size");
        assert!(e.contains("an image of"), "{e}");
    }

    /// Every block is one sector: a mark writes whole blocks at block offsets.
    #[test]
    fn a_mark_rewrites_only_its_block() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        marked(&img, BIG, &[]);
        let before = std::fs::read(bitmap_path(&img)).unwrap();
        marked(&img, BIG, &[63 * 64 + 7]);
        let after = std::fs::read(bitmap_path(&img)).unwrap();
        let changed: Vec<usize> = (0..before.len())
            .filter(|&i| before[i] != after[i])
            .collect();
        assert!(changed.iter().all(|&i| i / BLOCK == 2), "{changed:?}");
    }

    /// A damaged data block (a flipped bit, zeros, another block's content): its regions
    /// read as set, the others as they were; the damage is reported.
    #[test]
    fn a_damaged_block_reads_as_all_set() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        let b = marked(&img, BIG, &[5, 63 * 64 + 1]);
        let good = std::fs::read(bitmap_path(&img)).unwrap();
        let block2 = 2 * BLOCK..3 * BLOCK;
        let mut flipped = good.clone();
        flipped[2 * BLOCK + 3] ^= 0x10; // a bit of a clear word in block 2
        let mut zeroed = good.clone();
        zeroed[block2.clone()].fill(0);
        let mut moved = good.clone();
        moved.copy_within(BLOCK..2 * BLOCK, 2 * BLOCK); // block 1's content in block 2's place
        for (what, bytes) in [("flipped", flipped), ("zeroed", zeroed), ("moved", moved)] {
            std::fs::write(bitmap_path(&img), &bytes).unwrap();
            let (f, got) = reopen(&img, BIG).unwrap();
            assert_eq!(f.damaged(), &[(63 * 64, 63 * 64)], "{what}");
            for r in 0..got.regions() {
                let want = b.is_set(r) || (63 * 64..2 * 63 * 64).contains(&r);
                assert_eq!(got.is_set(r), want, "{what}: region {r}");
            }
        }
        // The last, short block: only its own regions.
        let mut last = good.clone();
        last[3 * BLOCK + 100] ^= 1;
        std::fs::write(bitmap_path(&img), &last).unwrap();
        let (f, got) = reopen(&img, BIG).unwrap();
        assert_eq!(f.damaged(), &[(2 * 63 * 64, 100)]);
        assert_eq!(got.count(), 2 + 100);
    }

    #[test]
    fn a_file_that_is_not_this_bitmap_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        marked(&img, BIG, &[5]);
        let good = std::fs::read(bitmap_path(&img)).unwrap();
        let mut header_flip = good.clone();
        header_flip[20] ^= 1;
        let mut version = good.clone();
        version[8] = 3;
        let mut magic = good.clone();
        magic[0] = b'X';
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", Vec::new()),
            ("garbage", vec![0x5a; good.len()]),
            ("zeros", vec![0; good.len()]),
            ("cut mid-word", good[..good.len() - 5].to_vec()),
            ("cut a block", good[..good.len() - BLOCK].to_vec()),
            ("extended", [&good[..], &[0u8; BLOCK][..]].concat()),
            ("header bit flipped", header_flip),
            ("unknown version", version),
            ("wrong magic", magic),
        ];
        for (what, bytes) in cases {
            std::fs::write(bitmap_path(&img), &bytes).unwrap();
            bad(&img, BIG, what);
        }
    }

    /// Format 1 (a 32-byte header and the words) is read and rewritten in format 2; one cut
    /// mid-word (which the code before checksums zero-padded) is refused.
    #[test]
    fn format_1_is_read_and_upgraded_unless_cut() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        let mut v1 = header_v1(SIZE).to_vec();
        for w in [1u64 << 5, 0, 1 << 2, 0] {
            v1.extend_from_slice(&w.to_le_bytes());
        }
        std::fs::write(bitmap_path(&img), &v1[..v1.len() - 3]).unwrap();
        let e = bad(&img, SIZE, "format 1 cut");
        assert!(e.contains("cut or extended"), "{e}");
        std::fs::write(bitmap_path(&img), &v1).unwrap();
        let (_, b) = reopen(&img, SIZE).unwrap();
        assert_eq!(b.count(), 2);
        assert!(b.is_set(5) && b.is_set(130));
        let upgraded = std::fs::read(bitmap_path(&img)).unwrap();
        assert_eq!(upgraded.len(), 2 * BLOCK);
        assert_eq!(u32_at(&upgraded, 8), BITMAP_FORMAT);
        assert_eq!(reopen(&img, SIZE).unwrap().1, b);
        // Format 1 of another size is refused.
        std::fs::write(bitmap_path(&img), &v1).unwrap();
        bad(&img, SIZE * 2, "format 1 other size");
    }

    #[test]
    fn a_symlinked_bitmap_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        let other = d.path().join("other.img");
        marked(&other, SIZE, &[]);
        let victim = bitmap_path(&other);
        let before = std::fs::read(&victim).unwrap();
        std::os::unix::fs::symlink(&victim, bitmap_path(&img)).unwrap();
        assert!(matches!(reopen(&img, SIZE), Err(MetaError::Read { .. })));
        assert_eq!(std::fs::read(&victim).unwrap(), before);
    }
}
