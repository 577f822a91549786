//! The parsers of the files beside an image, through their file-based entry points (in a
//! directory on tmpfs when there is one): `meta::load` (`IMG.meta`),
//! `meta::BitmapFile::open_or_create` (`IMG.bitmap`), `activity_log::read` and
//! `activity_log::AlFile::open` (`IMG.al`).
//!
//! Properties:
//! - never a panic, on any file contents;
//! - metadata: what loads has this version's format and survives a save/load round trip;
//! - bitmap: a file that opens is exactly the header and the bitmap's words (a file of another
//!   length, truncated or extended, is an error), its set bits are what it says; a valid file
//!   with a damaged header is an error;
//! - activity log: at most `MAX_EXTENTS` extents; after fuzzer-chosen commits and damage
//!   (flips of at most 3 bits in one block, a cut anywhere, a block copied over another) the
//!   log reads back one of the sets that were committed (or the empty one), never a set that
//!   never was; undamaged, the last one.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use arbitrary::{Result, Unstructured};
use mirror_proto::activity_log::{self, AlFile, MAX_EXTENTS};
use mirror_proto::bitmap::REGION_SIZE;
use mirror_proto::bitmap_file::{bitmap_path, BitmapFile};
use mirror_proto::meta::{self, Meta, META_FORMAT};

const BLOCK: usize = 4096;

/// A directory for this process's files (tmpfs if there is one), and the image path in it.
fn image() -> &'static PathBuf {
    static IMG: OnceLock<PathBuf> = OnceLock::new();
    IMG.get_or_init(|| {
        let base = ["/dev/shm", "/tmp"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let base = base.join("vhost-mirror-fuzz");
        // The directories of processes that are gone.
        for e in std::fs::read_dir(&base).into_iter().flatten().flatten() {
            let pid = e.file_name().to_string_lossy().into_owned();
            if !Path::new("/proc").join(&pid).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let dir = base.join(std::process::id().to_string());
        std::fs::create_dir_all(&dir).expect("fuzz directory");
        dir.join("disk.img")
    })
}

pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let _ = match u.int_in_range(0..=4u8).unwrap_or(0) {
        0 => meta_file(&mut u),
        1 | 2 => bitmap_file(&mut u),
        _ => activity_log_file(&mut u),
    };
}

fn meta_file(u: &mut Unstructured<'_>) -> Result<()> {
    let img = image();
    let text = crate::rest(u);
    std::fs::write(meta::meta_path(img), text).expect("write meta");
    let Ok(Some(m)) = meta::load(img) else {
        return Ok(());
    };
    assert!(m.format <= META_FORMAT);
    // What `meta::save` writes loads back, and saving that again changes nothing.
    meta::save(img, &m).expect("save");
    let a: Meta = meta::load(img)
        .expect("saved metadata loads")
        .expect("present");
    assert_eq!(a.format, META_FORMAT);
    meta::save(img, &a).expect("save again");
    let b: Option<Meta> = meta::load(img).expect("saved again loads");
    assert_eq!(b, Some(a));
    Ok(())
}

fn bitmap_file(u: &mut Unstructured<'_>) -> Result<()> {
    let img = image();
    // Regions: up to 300 (5 words); the size may end inside a region.
    let size = u64::from(u.int_in_range(0..=300u16)?) * REGION_SIZE
        + u64::from(u.int_in_range(0..=3u8)?) * 512;
    let regions = size.div_ceil(REGION_SIZE);
    let words = regions.div_ceil(64) as usize;
    let valid = |bits: &[u8]| {
        let mut f = Vec::new();
        f.extend_from_slice(b"VHMBITMP");
        // Format 1 (what vhost-mirror wrote before checksummed blocks): read, then upgraded.
        f.extend_from_slice(&1u32.to_le_bytes());
        f.extend_from_slice(&[0; 4]);
        f.extend_from_slice(&size.to_le_bytes());
        f.extend_from_slice(&REGION_SIZE.to_le_bytes());
        f.extend(
            bits.iter()
                .copied()
                .chain(std::iter::repeat(0))
                .take(8 * words),
        );
        f
    };
    let mode = u.int_in_range(0..=4u8)?;
    let (at, xor) = (u.int_in_range(0..=31usize)?, u.int_in_range(1..=255u8)?);
    let (cut, fill) = (u.int_in_range(0..=8 * words + 48)?, u.arbitrary::<u8>()?);
    let rest = crate::rest(u);
    let good = valid(rest);
    let (file, damaged) = match mode {
        // Raw bytes.
        0 => (rest.to_vec(), None),
        // Valid.
        1 => (good, Some(false)),
        // A byte of the header changed.
        2 => {
            let mut f = good;
            f[at] ^= xor;
            (f, Some(true))
        }
        // Cut or extended.
        _ => {
            let mut f = good;
            if cut == f.len() {
                return Ok(());
            }
            f.resize(cut, fill);
            (f, Some(true))
        }
    };
    std::fs::write(bitmap_path(img), &file).expect("write bitmap");
    let r = BitmapFile::open_or_create(img, size);
    match (&r, damaged) {
        (Err(e), Some(false)) => panic!("a valid bitmap is refused: {e}"),
        (Ok(_), Some(true)) => panic!("a damaged bitmap ({} bytes) is accepted", file.len()),
        _ => {}
    }
    if let Ok((_, b)) = r {
        assert_eq!(
            file.len(),
            32 + 8 * words,
            "a bitmap file of the wrong length is accepted"
        );
        assert_eq!(b.regions(), regions);
        let mut set = 0u64;
        for r in 0..regions {
            let byte = file[32 + (r / 8) as usize];
            let on = byte & (1 << (r % 8)) != 0;
            assert_eq!(b.is_set(r), on, "region {r}");
            set += u64::from(on);
        }
        assert_eq!(b.count(), set);
        assert!(b.bytes(size) <= size);
    }
    Ok(())
}

fn activity_log_file(u: &mut Unstructured<'_>) -> Result<()> {
    let img = image();
    let path = activity_log::al_path(img);
    if u.arbitrary()? {
        // Raw bytes.
        let raw = crate::rest(u);
        std::fs::write(&path, raw).expect("write al");
        // Garbage is an error (format 2 files are checksummed), never a panic; what reads is
        // within the limits.
        if let Ok(ext) = activity_log::read(img) {
            assert!(ext.len() <= MAX_EXTENTS);
        }
        return Ok(());
    }
    let _ = std::fs::remove_file(&path);
    let (mut al, ext) = AlFile::open(img).expect("open al");
    assert!(ext.is_empty());
    let mut committed: Vec<Vec<u64>> = vec![Vec::new()];
    for _ in 0..u.int_in_range(0..=10u8)? {
        let n = match u.int_in_range(0..=9u8)? {
            9 => MAX_EXTENTS,
            n => usize::from(n),
        };
        let set = (0..n)
            .map(|_| u.arbitrary())
            .collect::<Result<Vec<u64>>>()?;
        al.commit(&set).expect("commit");
        committed.push(set);
    }
    drop(al);
    let mut raw = std::fs::read(&path).expect("read al");
    let damaged = match u.int_in_range(0..=3u8)? {
        0 => false,
        1 if !raw.is_empty() => {
            let block = u.int_in_range(0..=raw.len() / BLOCK - 1)?;
            for _ in 0..u.int_in_range(1..=3u8)? {
                let bit = u.int_in_range(0..=BLOCK * 8 - 1)?;
                raw[block * BLOCK + bit / 8] ^= 1 << (bit % 8);
            }
            true
        }
        2 => {
            let len = u.int_in_range(0..=raw.len())?;
            raw.truncate(len);
            true
        }
        _ if raw.len() >= 2 * BLOCK => {
            let blocks = raw.len() / BLOCK;
            let (from, to) = (
                u.int_in_range(0..=blocks - 1)?,
                u.int_in_range(0..=blocks - 1)?,
            );
            let b = raw[from * BLOCK..(from + 1) * BLOCK].to_vec();
            raw[to * BLOCK..(to + 1) * BLOCK].copy_from_slice(&b);
            true
        }
        _ => false,
    };
    std::fs::write(&path, &raw).expect("write al");
    let got = match activity_log::read(img) {
        Ok(g) => g,
        // A damaged log is an error (the callers then resync conservatively), never a silent
        // "no hot extents".
        Err(_) if damaged => return Ok(()),
        Err(e) => panic!("a log as written is refused: {e}"),
    };
    if damaged {
        assert!(
            committed.contains(&got),
            "the damaged log lists {} extents that were never committed together",
            got.len()
        );
    } else {
        assert_eq!(Some(&got), committed.last());
    }
    let (_, opened) = AlFile::open(img).expect("open al");
    assert_eq!(opened, got);
    Ok(())
}
