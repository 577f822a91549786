//! The activity log's on-disk form (`IMG.al`): which extents of the image may have writes in
//! flight. A primary adds an extent here, durably, before it writes there; after a crash the
//! extents listed may differ from the peer's copy and are resynced (never the whole disk).
//!
//! The file is a ring of [`SLOTS`] blocks of 4 KiB. Each transaction writes the complete set of
//! hot extents into the next block with a sequence number and a CRC; loading takes the valid
//! block with the highest sequence number. A torn write leaves the previous block in force,
//! which lists a superset of what was in flight (writes start only after their transaction is
//! durable).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Bytes per activity-log extent.
pub const EXTENT_SIZE: u64 = 4 << 20;
/// Most extents hot at once (1 GiB of the image).
pub const MAX_EXTENTS: usize = 256;
/// Blocks in the ring.
pub const SLOTS: u64 = 8;
const BLOCK: usize = 4096;
const MAGIC: &[u8; 8] = b"VHMAL001";
const HEADER: usize = 8 + 8 + 4;

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
}

pub fn al_path(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(".al");
    PathBuf::from(s)
}

/// The activity log file of an image.
#[derive(Debug)]
pub struct AlFile {
    file: File,
    path: PathBuf,
    seq: u64,
}

fn encode(seq: u64, extents: &[u64]) -> [u8; BLOCK] {
    let mut b = [0u8; BLOCK];
    b[..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    b[16..20].copy_from_slice(&(extents.len() as u32).to_le_bytes());
    for (i, e) in extents.iter().enumerate() {
        b[HEADER + 8 * i..HEADER + 8 * i + 8].copy_from_slice(&e.to_le_bytes());
    }
    let crc = crc32c::crc32c(&b[..BLOCK - 4]);
    b[BLOCK - 4..].copy_from_slice(&crc.to_le_bytes());
    b
}

fn decode(b: &[u8]) -> Option<(u64, Vec<u64>)> {
    if b.len() != BLOCK || &b[..8] != MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes([b[BLOCK - 4], b[BLOCK - 3], b[BLOCK - 2], b[BLOCK - 1]]);
    if crc != crc32c::crc32c(&b[..BLOCK - 4]) {
        return None;
    }
    let seq = u64::from_le_bytes(b[8..16].try_into().ok()?);
    let n = u32::from_le_bytes(b[16..20].try_into().ok()?) as usize;
    if n > MAX_EXTENTS {
        return None;
    }
    let ext = (0..n)
        .map(|i| {
            u64::from_le_bytes(
                b[HEADER + 8 * i..HEADER + 8 * i + 8]
                    .try_into()
                    .unwrap_or([0; 8]),
            )
        })
        .collect();
    Some((seq, ext))
}

/// Reads the hot extents recorded for `image` (empty if there is no log).
pub fn read(image: &Path) -> Result<Vec<u64>, AlError> {
    let path = al_path(image);
    let data = match std::fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(AlError::Io { path, source }),
    };
    Ok(latest(&data).map(|(_, e)| e).unwrap_or_default())
}

fn latest(data: &[u8]) -> Option<(u64, Vec<u64>)> {
    data.chunks(BLOCK)
        .filter_map(decode)
        .max_by_key(|(seq, _)| *seq)
}

impl AlFile {
    /// Opens (or creates) the log; returns it and the extents it lists.
    pub fn open(image: &Path) -> Result<(Self, Vec<u64>), AlError> {
        let path = al_path(image);
        let err = |source| AlError::Io {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(err)?;
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut &file, &mut data).map_err(err)?;
        let (seq, extents) = latest(&data).unwrap_or((0, Vec::new()));
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
        let block = encode(seq, extents);
        let err = |source| AlError::Io {
            path: self.path.clone(),
            source,
        };
        self.file
            .write_all_at(&block, (seq % SLOTS) * BLOCK as u64)
            .map_err(err)?;
        self.file.sync_data().map_err(err)?;
        self.seq = seq;
        Ok(())
    }
}

/// Clears the activity log of `image` (after its hot extents were resynced).
pub fn clear(image: &Path) -> Result<(), AlError> {
    if !al_path(image).exists() {
        return Ok(());
    }
    let (mut f, _) = AlFile::open(image)?;
    f.commit(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latest_transaction_wins_and_torn_blocks_are_ignored() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        assert!(read(&img).unwrap().is_empty());
        let (mut al, ext) = AlFile::open(&img).unwrap();
        assert!(ext.is_empty());
        for i in 0..20u64 {
            al.commit(&[i, i + 1]).unwrap();
        }
        assert_eq!(read(&img).unwrap(), vec![19, 20]);
        // Tear the newest block: the one before it is in force.
        let p = al_path(&img);
        let mut data = std::fs::read(&p).unwrap();
        let at = (20 % SLOTS) as usize * BLOCK + 100;
        data[at] ^= 0xff;
        std::fs::write(&p, &data).unwrap();
        assert_eq!(read(&img).unwrap(), vec![18, 19]);
        let (mut al, ext) = AlFile::open(&img).unwrap();
        assert_eq!(ext, vec![18, 19]);
        al.commit(&[7]).unwrap();
        assert_eq!(read(&img).unwrap(), vec![7]);
        clear(&img).unwrap();
        assert!(read(&img).unwrap().is_empty());
        let too_many: Vec<u64> = (0..MAX_EXTENTS as u64 + 1).collect();
        assert!(matches!(al.commit(&too_many), Err(AlError::Full { .. })));
    }
}
