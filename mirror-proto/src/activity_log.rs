//! The activity log's on-disk form (`IMG.al`): which extents of the image may have writes in
//! flight. A primary adds an extent here, durably, before it writes there; after a crash the
//! extents listed may differ from the peer's copy and are resynced (never the whole disk).
//!
//! Format 2: 4 KiB blocks, integers little-endian, each block ending in the CRC32C of its first
//! 4092 bytes.
//!
//! ```text
//! block 0        "VHMALHDR" | version 2 (u32) | block size 4096 (u32) | slots 8 (u32)
//!                | max extents 256 (u32) | extent size (u64) | zeros | CRC32C
//! block 1 + s    a transaction whose sequence number is s modulo 8:
//!   (s = 0..8)   "VHMAL002" | sequence (u64) | n (u32) | n extents (u64 each) | zeros | CRC32C
//! ```
//!
//! The file is exactly 9 blocks, created whole by an atomic replace (`files::replace`) with
//! transactions 0..=7 all listing the same extents. Each transaction writes the complete set
//! of hot extents into the next slot and is fdatasynced; writes to its extents start only
//! after that. Loading takes the newest valid transaction.
//!
//! Crash argument: only the slot being written can be torn (a 4 KiB block is eight sectors; a
//! power loss may leave any mix of old and new ones), and that is the slot after the newest
//! complete transaction. Torn, it fails its checksum, and the newest complete transaction is
//! in force: it lists a superset of the extents with writes in flight (the torn one's new
//! extents had no write started yet; the extents it dropped are still listed). Every other
//! slot must hold exactly the transaction its distance from the newest says; anything else (a
//! wrong length or header, no valid transaction, a bad or out-of-order block elsewhere) is
//! damage no crash makes, [`AlError::Damaged`]: which extents were hot is unknown, so the
//! user treats every extent as hot (vhost-mirror) or refuses to pair (access-node). Limit:
//! damage to exactly the newest block looks like a torn write of it, and the transaction
//! before it is taken.
//!
//! Format 1 (before the header: the ring of 8 blocks alone, magic "VHMAL001", the first
//! transaction numbered 1, the file growing as slots are first written) is still read, by the
//! same rules; with no valid transaction it is empty only if no transaction was ever completed
//! (every block zeros or a torn first one). [`AlFile::open`] rewrites it in format 2.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use log::{info, warn};
use thiserror::Error;

use crate::files;

/// Bytes per activity-log extent.
pub const EXTENT_SIZE: u64 = 4 << 20;
/// Most extents hot at once (1 GiB of the image).
pub const MAX_EXTENTS: usize = 256;
/// Blocks in the ring.
pub const SLOTS: u64 = 8;
/// Version of the activity-log format written by this code.
pub const AL_FORMAT: u32 = 2;
const FORMAT_V1: u32 = 1;
const BLOCK: usize = 4096;
const HEADER_MAGIC: &[u8; 8] = b"VHMALHDR";
const TX_MAGIC: &[u8; 8] = b"VHMAL002";
const TX_MAGIC_V1: &[u8; 8] = b"VHMAL001";
const TX_HEADER: usize = 8 + 8 + 4;
const CRC_AT: usize = BLOCK - 4;
const FILE_LEN: usize = (1 + SLOTS as usize) * BLOCK;

#[derive(Debug, Error)]
pub enum AlError {
    #[error("activity log {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("activity log {path} is full ({MAX_EXTENTS} extents)")]
    Full { path: PathBuf },
    #[error("activity log {path} is damaged ({reason})")]
    Damaged { path: PathBuf, reason: String },
}

pub fn al_path(image: &Path) -> PathBuf {
    files::with_suffix(image, ".al")
}

/// The activity log file of an image.
#[derive(Debug)]
pub struct AlFile {
    file: File,
    path: PathBuf,
    seq: u64,
}

fn seal(b: &mut [u8; BLOCK]) {
    let crc = crc32c::crc32c(&b[..CRC_AT]);
    b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
}

fn sealed(b: &[u8]) -> bool {
    b.len() == BLOCK && b[CRC_AT..] == crc32c::crc32c(&b[..CRC_AT]).to_le_bytes()
}

fn header() -> [u8; BLOCK] {
    let mut h = [0u8; BLOCK];
    h[..8].copy_from_slice(HEADER_MAGIC);
    h[8..12].copy_from_slice(&AL_FORMAT.to_le_bytes());
    h[12..16].copy_from_slice(&(BLOCK as u32).to_le_bytes());
    h[16..20].copy_from_slice(&(SLOTS as u32).to_le_bytes());
    h[20..24].copy_from_slice(&(MAX_EXTENTS as u32).to_le_bytes());
    h[24..32].copy_from_slice(&EXTENT_SIZE.to_le_bytes());
    seal(&mut h);
    h
}

fn encode(magic: &[u8; 8], seq: u64, extents: &[u64]) -> [u8; BLOCK] {
    let mut b = [0u8; BLOCK];
    b[..8].copy_from_slice(magic);
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    b[16..20].copy_from_slice(&(extents.len() as u32).to_le_bytes());
    for (i, e) in extents.iter().enumerate() {
        b[TX_HEADER + 8 * i..TX_HEADER + 8 * i + 8].copy_from_slice(&e.to_le_bytes());
    }
    seal(&mut b);
    b
}

fn decode(magic: &[u8; 8], b: &[u8]) -> Option<(u64, Vec<u64>)> {
    if !sealed(b) || &b[..8] != magic {
        return None;
    }
    let seq = u64::from_le_bytes(b[8..16].try_into().ok()?);
    let n = u32::from_le_bytes(b[16..20].try_into().ok()?) as usize;
    if n > MAX_EXTENTS {
        return None;
    }
    let ext = b[TX_HEADER..TX_HEADER + 8 * n]
        .chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_le_bytes(a)
        })
        .collect();
    Some((seq, ext))
}

/// A new log in format 2 whose transactions 0..=7 list `extents`.
fn fresh(extents: &[u64]) -> Vec<u8> {
    let mut out = header().to_vec();
    for s in 0..SLOTS {
        out.extend_from_slice(&encode(TX_MAGIC, s, extents));
    }
    out
}

/// What a log file says: its newest transaction and the file's format.
#[derive(Debug)]
struct Parsed {
    seq: u64,
    extents: Vec<u64>,
    format: u32,
}

/// Reads the bytes of a log file; Err says why they cannot be trusted.
fn parse(data: &[u8]) -> Result<Parsed, String> {
    if data.len() >= 8 && &data[..8] == HEADER_MAGIC {
        if data.len() != FILE_LEN {
            return Err(format!(
                "{} bytes where an activity log has {FILE_LEN}: cut or extended",
                data.len()
            ));
        }
        if data[..BLOCK] != header() {
            return Err("the header is damaged or of another format".into());
        }
        let slots: Vec<_> = data[BLOCK..].chunks(BLOCK).collect();
        let (seq, extents) =
            newest(&slots, TX_MAGIC, 0)?.ok_or_else(|| "no valid transaction".to_string())?;
        return Ok(Parsed {
            seq,
            extents,
            format: AL_FORMAT,
        });
    }
    // Format 1, or not a log at all.
    if !data.len().is_multiple_of(BLOCK) || data.len() > SLOTS as usize * BLOCK {
        return Err(format!(
            "{} bytes, no header: neither an activity log nor one of format 1",
            data.len()
        ));
    }
    let slots: Vec<_> = data.chunks(BLOCK).collect();
    // A block that is no transaction is zeros (a slot not written yet) or one torn while it
    // was written (then its first sector is old, zeros, or new, starting with the magic).
    let foreign = slots
        .iter()
        .any(|b| decode(TX_MAGIC_V1, b).is_none() && &b[..8] != TX_MAGIC_V1 && b[..8] != [0; 8]);
    if foreign {
        return Err("no header, and blocks that are no format 1 transaction".into());
    }
    let (seq, extents) = newest(&slots, TX_MAGIC_V1, 1)?.unwrap_or((0, Vec::new()));
    Ok(Parsed {
        seq,
        extents,
        format: FORMAT_V1,
    })
}

/// The newest valid transaction of a ring of `slots` (missing ones: never written), checking
/// that every slot holds the one its distance from the newest says (or none: the slot after
/// the newest, torn while it was written; or a slot whose turn never came, when the first
/// transaction was numbered `first`). `Ok(None)`: no transaction at all.
fn newest(slots: &[&[u8]], magic: &[u8; 8], first: u64) -> Result<Option<(u64, Vec<u64>)>, String> {
    let ring: Vec<Option<(u64, Vec<u64>)>> = (0..SLOTS as usize)
        .map(|s| slots.get(s).and_then(|b| decode(magic, b)))
        .collect();
    let Some(n) = ring.iter().flatten().map(|(seq, _)| *seq).max() else {
        return Ok(None);
    };
    for (s, tx) in ring.iter().enumerate() {
        let behind = (n % SLOTS + SLOTS - s as u64) % SLOTS;
        let expected = n.checked_sub(behind).filter(|&e| e >= first);
        let fine = match (tx, expected) {
            (Some((seq, _)), Some(e)) => *seq == e,
            (Some(_), None) => false,
            (None, None) => true,
            (None, Some(_)) => behind == SLOTS - 1,
        };
        if !fine {
            return Err(format!(
                "transaction slot {s} is damaged or out of order (newest transaction {n})"
            ));
        }
    }
    let i = (n % SLOTS) as usize;
    Ok(ring[i].clone())
}

/// Reads the hot extents recorded for `image` (empty if there is no log).
pub fn read(image: &Path) -> Result<Vec<u64>, AlError> {
    let path = al_path(image);
    let data = match files::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(AlError::Io { path, source }),
    };
    match parse(&data) {
        Ok(p) => Ok(p.extents),
        Err(reason) => Err(AlError::Damaged { path, reason }),
    }
}

/// Replaces the log of `image` by an empty one, whatever it held (a damaged one, once its
/// extents are covered some other way).
pub fn reset(image: &Path) -> Result<(), AlError> {
    let path = al_path(image);
    files::replace(&path, &fresh(&[])).map_err(|source| AlError::Io { path, source })
}

impl AlFile {
    /// Opens (or creates) the log; returns it and the extents it lists. A damaged log is
    /// [`AlError::Damaged`] (left as it is); one of format 1 is rewritten in format 2.
    pub fn open(image: &Path) -> Result<(Self, Vec<u64>), AlError> {
        let path = al_path(image);
        let err = |source| AlError::Io {
            path: path.clone(),
            source,
        };
        let (seq, extents) = match files::read(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                files::replace(&path, &fresh(&[])).map_err(err)?;
                (SLOTS - 1, Vec::new())
            }
            Err(e) => return Err(err(e)),
            Ok(data) => {
                let p = parse(&data).map_err(|reason| AlError::Damaged {
                    path: path.clone(),
                    reason,
                })?;
                if p.format == AL_FORMAT {
                    (p.seq, p.extents)
                } else {
                    files::replace(&path, &fresh(&p.extents)).map_err(err)?;
                    info!(
                        "{}: format {} rewritten in format {AL_FORMAT} ({} hot extent(s) kept)",
                        path.display(),
                        p.format,
                        p.extents.len()
                    );
                    (SLOTS - 1, p.extents)
                }
            }
        };
        let file = files::open(&path, true).map_err(err)?;
        Ok((AlFile { file, path, seq }, extents))
    }

    /// Records `extents` as the hot set, durably.
    pub fn commit(&mut self, extents: &[u64]) -> Result<(), AlError> {
        if extents.len() > MAX_EXTENTS {
            return Err(AlError::Full {
                path: self.path.clone(),
            });
        }
        let seq = self.seq + 1;
        let block = encode(TX_MAGIC, seq, extents);
        let err = |source| AlError::Io {
            path: self.path.clone(),
            source,
        };
        self.file
            .write_all_at(&block, (1 + seq % SLOTS) * BLOCK as u64)
            .map_err(err)?;
        self.file.sync_data().map_err(err)?;
        self.seq = seq;
        Ok(())
    }
}

/// Clears the activity log of `image` (after its hot extents were resynced, or when they no
/// longer matter); a damaged one is replaced by an empty one.
pub fn clear(image: &Path) -> Result<(), AlError> {
    match std::fs::symlink_metadata(al_path(image)) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        _ => {}
    }
    match AlFile::open(image) {
        Ok((mut f, _)) => f.commit(&[]),
        Err(AlError::Damaged { path, reason }) => {
            warn!(
                "activity log {} is damaged ({reason}): replaced by an empty one",
                path.display()
            );
            reset(image)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn damaged(img: &Path, bytes: &[u8], what: &str) {
        std::fs::write(al_path(img), bytes).unwrap();
        match read(img) {
            Err(e @ AlError::Damaged { .. }) => {
                assert!(e.to_string().contains("disk.img.al"), "{what}: {e}")
            }
            other => panic!("{what}: {other:?}"),
        }
        assert!(
            matches!(AlFile::open(img), Err(AlError::Damaged { .. })),
            "{what}"
        );
        assert_eq!(
            std::fs::read(al_path(img)).unwrap(),
            bytes,
            "{what}: changed"
        );
    }

    /// A format 1 log as the code before the header wrote it after `commits`.
    fn v1_log(commits: &[Vec<u64>]) -> Vec<u8> {
        let mut data = Vec::new();
        for (i, ext) in commits.iter().enumerate() {
            let seq = i as u64 + 1;
            let at = (seq % SLOTS) as usize * BLOCK;
            if data.len() < at + BLOCK {
                data.resize(at + BLOCK, 0);
            }
            data[at..at + BLOCK].copy_from_slice(&encode(TX_MAGIC_V1, seq, ext));
        }
        data
    }

    #[test]
    fn latest_transaction_wins_and_a_torn_newest_is_ignored() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        assert!(read(&img).unwrap().is_empty());
        let (mut al, ext) = AlFile::open(&img).unwrap();
        assert!(ext.is_empty());
        assert_eq!(
            std::fs::metadata(al_path(&img)).unwrap().len(),
            FILE_LEN as u64
        );
        assert!(read(&img).unwrap().is_empty());
        for i in 0..20u64 {
            al.commit(&[i, i + 1]).unwrap();
        }
        assert_eq!(read(&img).unwrap(), vec![19, 20]);
        // Tear the newest block (any of its sectors): the one before it is in force.
        let p = al_path(&img);
        let good = std::fs::read(&p).unwrap();
        let newest = (1 + (SLOTS - 1 + 20) % SLOTS) as usize * BLOCK;
        for sector in 0..8 {
            let mut data = good.clone();
            data[newest + 512 * sector + 100] ^= 0xff;
            std::fs::write(&p, &data).unwrap();
            assert_eq!(read(&img).unwrap(), vec![18, 19], "sector {sector}");
        }
        let (mut al, ext) = AlFile::open(&img).unwrap();
        assert_eq!(ext, vec![18, 19]);
        al.commit(&[7]).unwrap();
        assert_eq!(read(&img).unwrap(), vec![7]);
        clear(&img).unwrap();
        assert!(read(&img).unwrap().is_empty());
        let too_many: Vec<u64> = (0..MAX_EXTENTS as u64 + 1).collect();
        assert!(matches!(al.commit(&too_many), Err(AlError::Full { .. })));
    }

    /// A damaged log never reads as "no hot extents".
    #[test]
    fn a_damaged_log_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        let (mut al, _) = AlFile::open(&img).unwrap();
        for i in 0..11u64 {
            al.commit(&[i]).unwrap();
        }
        let good = std::fs::read(al_path(&img)).unwrap();
        assert_eq!(read(&img).unwrap(), vec![10]);
        // Newest: transaction 18 in slot 2 (file block 3); the next to be written is slot 3.
        let block = |s: usize| (1 + s) * BLOCK..(2 + s) * BLOCK;
        let flip = |at: usize| {
            let mut b = good.clone();
            b[at] ^= 0x40;
            b
        };
        damaged(&img, &vec![0x5a; FILE_LEN], "garbage");
        damaged(&img, &vec![0; FILE_LEN], "zeros");
        damaged(&img, &good[..FILE_LEN - 1], "cut by a byte");
        damaged(&img, &good[..FILE_LEN - BLOCK], "cut by a block");
        damaged(&img, &[&good[..], &[0u8; BLOCK][..]].concat(), "extended");
        damaged(&img, &flip(20), "header");
        damaged(&img, &flip(block(5).start + 30), "an older slot");
        let mut two = flip(block(3).start + 30);
        two[block(2).start + 30] ^= 1;
        damaged(&img, &two, "the newest and the one after it");
        let mut all = good.clone();
        for s in 0..SLOTS as usize {
            all[block(s).start + 9] ^= 1;
        }
        damaged(&img, &all, "every transaction");
        let mut swapped = good.clone();
        swapped[block(4)].copy_from_slice(&good[block(5)]);
        swapped[block(5)].copy_from_slice(&good[block(4)]);
        damaged(&img, &swapped, "slots swapped");
        // The slot after the newest may be torn (a crash while writing it): not damage.
        std::fs::write(al_path(&img), flip(block(3).start + 30)).unwrap();
        assert_eq!(read(&img).unwrap(), vec![10]);
        // A damaged log is replaced by clear, and reset.
        std::fs::write(al_path(&img), b"garbage").unwrap();
        clear(&img).unwrap();
        assert!(read(&img).unwrap().is_empty());
        std::fs::write(al_path(&img), b"garbage").unwrap();
        reset(&img).unwrap();
        assert_eq!(AlFile::open(&img).unwrap().1, Vec::<u64>::new());
    }

    #[test]
    fn format_1_is_read_and_upgraded() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        // A few commits (the file still growing), then many (the ring wrapped).
        for n in [1usize, 3, 12] {
            let commits: Vec<Vec<u64>> = (0..n as u64).map(|i| vec![i, 100 + i]).collect();
            let v1 = v1_log(&commits);
            std::fs::write(al_path(&img), &v1).unwrap();
            assert_eq!(read(&img).unwrap(), commits[n - 1], "{n} commits");
            // The newest torn: the one before (or none, for the very first).
            let mut torn = v1.clone();
            torn[(n % SLOTS as usize) * BLOCK + 700] ^= 1;
            std::fs::write(al_path(&img), &torn).unwrap();
            let want = if n == 1 {
                vec![]
            } else {
                commits[n - 2].clone()
            };
            assert_eq!(read(&img).unwrap(), want, "{n} commits, torn");
            // Upgraded on open, extents kept.
            std::fs::write(al_path(&img), &v1).unwrap();
            let (mut al, ext) = AlFile::open(&img).unwrap();
            assert_eq!(ext, commits[n - 1]);
            assert_eq!(&std::fs::read(al_path(&img)).unwrap()[..8], HEADER_MAGIC);
            assert_eq!(read(&img).unwrap(), commits[n - 1]);
            al.commit(&[9]).unwrap();
            assert_eq!(read(&img).unwrap(), vec![9]);
        }
        // Never committed (created, no write yet), or the first commit torn: empty. (An empty
        // file is read so: format 1 left one whenever no write came before a crash.)
        std::fs::write(al_path(&img), b"").unwrap();
        assert!(read(&img).unwrap().is_empty());
        let mut first_torn = vec![0u8; 2 * BLOCK];
        first_torn[BLOCK + 2048..BLOCK + 2060].fill(7);
        std::fs::write(al_path(&img), &first_torn).unwrap();
        assert!(read(&img).unwrap().is_empty());
        // Garbage in format 1's place is damage.
        damaged(&img, &[0x5a; 2 * BLOCK], "format 1 garbage");
        damaged(&img, &[0x5a; 100], "short garbage");
        let mut v1 = v1_log(&[vec![1], vec![2], vec![3]]);
        v1[BLOCK + 8] ^= 1; // transaction 1 damaged, 2 and 3 fine
        damaged(&img, &v1, "format 1 older slot");
    }

    #[test]
    fn a_symlinked_log_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        let victim = d.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink(&victim, al_path(&img)).unwrap();
        assert!(matches!(AlFile::open(&img), Err(AlError::Io { .. })));
        assert!(matches!(read(&img), Err(AlError::Io { .. })));
        assert!(clear(&img).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }
}
