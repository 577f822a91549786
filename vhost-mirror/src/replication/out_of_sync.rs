//! What the replica may be missing: the persistent out-of-sync bitmap and the generation
//! bookkeeping that goes with it (`IMG.meta`, `IMG.bitmap`).
//!
//! Rule: the first time a region is marked while the bitmap is clear, the primary starts a new
//! generation and remembers the old one as the bitmap's base (the generation the replica has).
//! A mark is durable before the write it covers is issued.
//!
//! With a fence (`--witness` or `--fence-peer`), the first mark records only the base (our
//! generation, which the replica has); the new generation starts when the fence lets the first
//! write the replica lacks be acknowledged ([`SyncState::confirm_generation`]). Until then
//! what differs is writes nobody was told of: an isolated primary that never got the fence's
//! consent still says "at the replica's generation", so once the replica was promoted it
//! comes back as that node's replica and its unacknowledged writes are overwritten (its
//! activity log's hot extents and its bitmap's regions: `access-node`'s `Replica::hot_extents`)
//! instead of ending in a split brain.

use std::path::{Path, PathBuf};

use log::{info, warn};
use mirror_proto::auth::random_id;
use mirror_proto::bitmap::{Bitmap, REGION_SIZE};
use mirror_proto::bitmap_file::{self, BitmapFile};
use mirror_proto::frame::{DiskState, NodeInfo, Role};
use mirror_proto::generation::push_history;
use mirror_proto::meta::{self, Meta, MetaError, META_FORMAT};
use thiserror::Error;

pub const MAX_HISTORY: usize = 16;

#[derive(Debug, Error)]
pub enum SyncStateError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("cannot create an identifier")]
    Random(#[source] mirror_proto::auth::AuthError),
    #[error("{path} describes an image of {recorded} bytes, but the image has {actual} bytes")]
    SizeChanged {
        path: PathBuf,
        recorded: u64,
        actual: u64,
    },
    #[error(transparent)]
    ActivityLog(#[from] mirror_proto::activity_log::AlError),
    #[error("{0} is a secondary's image (run `access-node promote` first, or remove its .meta to start afresh)")]
    NotPrimary(PathBuf),
    #[error(
        "{path} is {state}: it was a primary that rejoined as a replica and its resync did not \
         finish, so it holds a mix of old and new data; let it finish as a replica, or run \
         `access-node promote --force` to serve it anyway"
    )]
    NotUpToDate { path: PathBuf, state: &'static str },
}

/// The primary's replication state for one image.
/// Most regions whose differing blocks are tracked (`SyncState::known`): 1 Mi regions, 64 GiB
/// of degraded writes, at most a few tens of MiB of memory; beyond, regions are compared by
/// their hashes instead.
const MAX_KNOWN: usize = 1 << 20;

#[derive(Debug)]
pub struct SyncState {
    image: PathBuf,
    size: u64,
    pub meta: Meta,
    pub bitmap: Bitmap,
    file: BitmapFile,
    scratch: Vec<usize>,
    /// A persist failed: the bitmap in memory has bits the file may lack. Every later mark
    /// writes the whole bitmap until one succeeds (a mark of bits already set in memory is
    /// not "nothing to do" then).
    unpersisted: bool,
    /// Every mark call is numbered (also one that changes no bit: a dying link re-marking a
    /// range already set). See [`SyncState::clear_unless_marked_since`].
    mark_seq: u64,
    /// While a resync runs: the marks made since its oldest unsettled batch began.
    watch: Option<MarkLog>,
    /// Regions marked, since their bit was last clear, only by this process's writes (a write
    /// the replica did not get: degraded, refused, unanswered), each with the 4 KiB blocks they
    /// touched: every difference in such a region is in those blocks, which the resync sends
    /// as data. A region marked any other way (hot activity-log extents after a crash, the
    /// replica's on a failback, a dying link's unflushed ranges) or set when this process
    /// started is absent: the resync compares its blocks by hash.
    known: std::collections::HashMap<u64, u16>,
    /// With a fence: marks record only the base; [`SyncState::confirm_generation`] starts the
    /// new generation (see the module's notes).
    deferred: bool,
}

/// Marks made while a resync is copying: a region marked after its copy was read must not be
/// cleared by that copy.
#[derive(Debug, Default)]
struct MarkLog {
    marks: Vec<(u64, u64, u64)>,
    /// Too many marks to keep: no copy older than this mark may clear anything.
    overflow_seq: Option<u64>,
}

/// Most marks a resync remembers (24 bytes each); past that its pending batches clear
/// nothing (their regions are copied again).
const MAX_WATCHED_MARKS: usize = 65536;

impl SyncState {
    /// Loads (or creates) the metadata and bitmap beside `image`. `deferred`: with a fence,
    /// see the module's notes.
    pub fn open(image: &Path, size: u64, deferred: bool) -> Result<Self, SyncStateError> {
        let mut meta = match meta::load_upgrading(image)? {
            Some(m) => {
                if m.size != size {
                    return Err(SyncStateError::SizeChanged {
                        path: meta::meta_path(image),
                        recorded: m.size,
                        actual: size,
                    });
                }
                if m.role != Role::Primary {
                    return Err(SyncStateError::NotPrimary(image.to_owned()));
                }
                // Found by fuzzing generation::decide: a role-primary image that is not up to
                // date (a failback's resync cut short) was served, and writes made on it were
                // later overwritten by the other side's partial resync without a split brain.
                if m.disk_state != DiskState::UpToDate {
                    return Err(SyncStateError::NotUpToDate {
                        path: image.to_owned(),
                        state: m.disk_state.as_str(),
                    });
                }
                m
            }
            None => {
                let m = Meta {
                    format: META_FORMAT,
                    node_id: random_id().map_err(SyncStateError::Random)?,
                    size,
                    role: Role::Primary,
                    disk_state: DiskState::UpToDate,
                    generation: random_id().map_err(SyncStateError::Random)?,
                    bitmap_generation: 0,
                    history: Vec::new(),
                };
                meta::save(image, &m)?;
                info!(
                    "created {} (generation {:016x})",
                    meta::meta_path(image).display(),
                    m.generation
                );
                m
            }
        };
        let had_bitmap = std::fs::symlink_metadata(bitmap_file::bitmap_path(image)).is_ok();
        let (file, mut bitmap) = BitmapFile::open_or_create(image, size)?;
        let mut rewrite = false;
        if !had_bitmap && meta.bitmap_generation != 0 {
            warn!(
                "bitmap of {} is missing: every region is out of sync",
                image.display()
            );
            bitmap.set_all();
            rewrite = true;
        }
        if !file.damaged().is_empty() {
            // A damaged block's regions came back set: they may differ. Recorded like any
            // mark: with a base generation, durably (which rewrites the blocks).
            let regions: u64 = file.damaged().iter().map(|&(_, n)| n).sum();
            warn!(
                "{}: {} damaged block(s) (checksum mismatch): their {regions} region(s) are \
                 marked out of sync and will be copied again",
                file.path().display(),
                file.damaged().len()
            );
            rewrite = true;
        }
        if rewrite && meta.bitmap_generation == 0 && !bitmap.is_clear() {
            meta = based_on_ours(image, &meta, deferred)?;
        }
        if rewrite {
            file.persist_all(&bitmap)?;
        }
        Ok(SyncState {
            image: image.to_owned(),
            size,
            meta,
            bitmap,
            file,
            scratch: Vec::new(),
            unpersisted: false,
            mark_seq: 0,
            watch: None,
            known: std::collections::HashMap::new(),
            deferred,
        })
    }

    /// A completion the replica lacks is about to be acknowledged (with a fence: `Mirror::hold`;
    /// without, at start): if the bitmap's base is still our generation (the marks were
    /// deferred), starts our own generation now, durably. Whether one started.
    pub fn confirm_generation(&mut self) -> Result<bool, SyncStateError> {
        if self.meta.bitmap_generation != 0 && self.meta.bitmap_generation == self.meta.generation {
            self.new_generation_for_bitmap(self.meta.generation)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Writes of the bitmap file so far (each blocks and an fdatasync), for the metrics.
    pub fn bitmap_writes(&self) -> u64 {
        self.file.writes()
    }

    pub fn out_of_sync_bytes(&self) -> u64 {
        self.bitmap.bytes(self.size)
    }

    /// Our side of the handshake.
    pub fn node_info(&self, flags: u32) -> NodeInfo {
        NodeInfo {
            node_id: self.meta.node_id,
            size: self.size,
            role: Role::Primary,
            disk_state: self.meta.disk_state,
            generation: self.meta.generation,
            bitmap_generation: self.meta.bitmap_generation,
            history: self.meta.history.clone(),
            flags,
            hot: Vec::new(),
        }
    }

    /// Marks a byte range out of sync, durably. Starts a new generation if the bitmap has no
    /// base generation yet (the replica had everything until now); after a promotion the base
    /// is the old primary's generation already.
    pub fn mark(&mut self, offset: u64, len: u64) -> Result<(), SyncStateError> {
        self.mark_ranges(&[(offset, len)])
    }

    /// Marks a byte range that a write changed here and not on the replica: as [`mark`],
    /// and its blocks are remembered (see `known`).
    ///
    /// [`mark`]: SyncState::mark
    pub fn mark_known(&mut self, offset: u64, len: u64) -> Result<(), SyncStateError> {
        if let Some((first, last)) = self.bitmap.regions_of(offset, len) {
            for r in first..=last {
                let mask = block_mask(r, offset, len);
                if !self.bitmap.is_set(r) {
                    if self.known.len() < MAX_KNOWN {
                        self.known.insert(r, mask);
                    }
                } else if let Some(m) = self.known.get_mut(&r) {
                    *m |= mask;
                }
            }
        }
        self.mark_inner(&[(offset, len)])
    }

    /// The parts (byte offset in the run, length) of the run of regions `first..first +
    /// count` (`run_len` bytes) that may differ, when every region of it is in `known`.
    pub fn known_parts(&self, first: u64, count: u64, run_len: u64) -> Option<Vec<(usize, usize)>> {
        let mut parts: Vec<(usize, usize)> = Vec::new();
        for r in first..first + count {
            let mask = *self.known.get(&r)?;
            for b in 0..16u64 {
                if mask & (1 << b) == 0 {
                    continue;
                }
                let at = (r - first) * REGION_SIZE + b * 4096;
                if at >= run_len {
                    break;
                }
                let n = 4096.min(run_len - at);
                match parts.last_mut() {
                    Some(p) if p.0 + p.1 == at as usize => p.1 += n as usize,
                    _ => parts.push((at as usize, n as usize)),
                }
            }
        }
        Some(parts)
    }

    /// Marks several byte ranges with one fdatasync. Ok only when every bit of them is in
    /// the file (also bits set in memory by an earlier mark whose persist failed).
    pub fn mark_ranges(&mut self, ranges: &[(u64, u64)]) -> Result<(), SyncStateError> {
        for &(o, l) in ranges {
            if let Some((first, last)) = self.bitmap.regions_of(o, l) {
                for r in first..=last {
                    self.known.remove(&r);
                }
            }
        }
        self.mark_inner(ranges)
    }

    fn mark_inner(&mut self, ranges: &[(u64, u64)]) -> Result<(), SyncStateError> {
        self.mark_seq += 1;
        if let Some(w) = &mut self.watch {
            if w.marks.len() + ranges.len() <= MAX_WATCHED_MARKS {
                w.marks
                    .extend(ranges.iter().map(|&(o, l)| (self.mark_seq, o, l)));
            } else {
                w.overflow_seq = Some(self.mark_seq);
            }
        }
        self.scratch.clear();
        for &(offset, len) in ranges {
            self.bitmap.set_range(offset, len, &mut self.scratch);
        }
        if self.scratch.is_empty() && !self.unpersisted {
            return Ok(());
        }
        if self.meta.bitmap_generation == 0 && !self.bitmap.is_clear() {
            if let Err(e) = self.base_on_ours() {
                self.unpersisted = true;
                return Err(e);
            }
        }
        let r = if self.unpersisted {
            self.file.persist_all(&self.bitmap)
        } else {
            self.file.persist_words(&self.bitmap, &self.scratch)
        };
        self.unpersisted = r.is_err();
        Ok(r?)
    }

    /// Marks everything out of sync relative to the replica's generation (full sync).
    pub fn mark_all(&mut self, replica_generation: u64) -> Result<(), SyncStateError> {
        self.known.clear();
        self.mark_seq += 1;
        if let Some(w) = &mut self.watch {
            w.overflow_seq = Some(self.mark_seq);
        }
        self.bitmap.set_all();
        if self.meta.bitmap_generation != replica_generation {
            self.new_generation_for_bitmap(replica_generation)?;
        }
        let r = self.file.persist_all(&self.bitmap);
        self.unpersisted = r.is_err();
        Ok(r?)
    }

    /// Memory follows only once the file is written: a failed save leaves the old generation
    /// (and no base) in both, so the next mark tries again, and fails until it works.
    fn new_generation_for_bitmap(&mut self, base: u64) -> Result<(), SyncStateError> {
        self.meta = new_generation_for_bitmap(&self.image, &self.meta, base)?;
        Ok(())
    }

    /// Bits the replica at our generation lacks (see [`based_on_ours`]); memory follows the
    /// file.
    fn base_on_ours(&mut self) -> Result<(), SyncStateError> {
        self.meta = based_on_ours(&self.image, &self.meta, self.deferred)?;
        Ok(())
    }

    /// A resync starts watching marks (see [`SyncState::clear_unless_marked_since`]).
    pub fn watch_marks(&mut self, on: bool) {
        self.watch = on.then(MarkLog::default);
    }

    /// The number of the last mark: a copy read after this sees every earlier mark's data.
    pub fn mark_seq(&self) -> u64 {
        self.mark_seq
    }

    /// A batch of copies, the first of them read after mark `since`, is durable on the
    /// replica: clears its regions, except those marked since (their new difference came after
    /// the copy was read: a write the replica failed, a local write that failed, a dying link's
    /// re-mark). Batches settle in order, so marks up to `since` are forgotten. Returns the
    /// bytes cleared.
    pub fn clear_unless_marked_since(&mut self, since: u64, runs: &[(u64, u64)]) -> u64 {
        let Some(w) = &mut self.watch else {
            return 0;
        };
        if w.overflow_seq.is_some_and(|s| s > since) {
            return 0;
        }
        w.marks.retain(|&(seq, _, _)| seq > since);
        let mut cleared = 0;
        for &(first, count) in runs {
            for r in first..first + count {
                let (start, len) = region_bytes(r, 1, self.size);
                let end = start + len;
                let touched = w
                    .marks
                    .iter()
                    .any(|&(_, o, l)| o < end && start < o.saturating_add(l.max(1)));
                if !touched && self.bitmap.clear(r) {
                    self.known.remove(&r);
                    cleared += len;
                }
            }
        }
        cleared
    }

    /// Clears the regions of a copied range (persisted lazily by [`SyncState::persist`]).
    #[cfg(test)]
    pub fn clear_regions(&mut self, first: u64, count: u64) {
        for r in first..first + count {
            self.bitmap.clear(r);
            self.known.remove(&r);
        }
    }

    pub fn persist(&mut self) -> Result<(), SyncStateError> {
        let r = self.file.persist_all(&self.bitmap);
        // Bits without the new generation they need (its save failed) are not recorded yet.
        self.unpersisted =
            r.is_err() || (self.meta.bitmap_generation == 0 && !self.bitmap.is_clear());
        Ok(r?)
    }

    /// The replica acknowledged SyncDone for `generation`: it holds everything of that
    /// generation. If the bitmap is clear it has no base any more; if bits were marked since
    /// the copy finished (a write the replica failed, say), they are relative to `generation`
    /// now, and a new generation starts so that the replica is never "in sync" over them.
    /// Starts a generation no witness record names, for the SyncDone that ends a resync (the
    /// bitmap keeps its base: until the SyncDone is answered, the replica holds the base, is
    /// inconsistent, or holds the new one). Returns it.
    pub fn fresh_generation(&mut self) -> Result<u64, SyncStateError> {
        let base = if self.meta.bitmap_generation != 0 {
            self.meta.bitmap_generation
        } else {
            self.meta.generation
        };
        self.meta = new_generation_for_bitmap(&self.image, &self.meta, base)?;
        Ok(self.meta.generation)
    }

    pub fn resync_finished(&mut self, generation: u64) -> Result<(), SyncStateError> {
        if self.bitmap.is_clear() {
            self.persist()?;
            if self.meta.bitmap_generation != 0 {
                let mut m = self.meta.clone();
                m.bitmap_generation = 0;
                meta::save(&self.image, &m)?;
                self.meta = m;
            }
        } else if self.meta.generation == generation {
            self.base_on_ours()?;
            self.persist()?;
        } else {
            // A new generation already started after SyncDone was sent; its base stays.
            self.persist()?;
        }
        Ok(())
    }
}

/// The 4 KiB blocks of region `r` that `offset..offset + len` touches, as bits.
fn block_mask(r: u64, offset: u64, len: u64) -> u16 {
    let start = r * REGION_SIZE;
    let from = offset.max(start) - start;
    let to = offset.saturating_add(len).min(start + REGION_SIZE) - start;
    let mut mask = 0u16;
    let mut b = from / 4096;
    while b * 4096 < to && b < 16 {
        mask |= 1 << b;
        b += 1;
    }
    mask
}

/// Saves `meta` for bits the replica, at our generation, lacks: with `deferred` (a fence) only
/// the base (our generation), the new generation waiting for [`SyncState::confirm_generation`];
/// without, a new generation at once. Returns it.
fn based_on_ours(image: &Path, meta: &Meta, deferred: bool) -> Result<Meta, SyncStateError> {
    if !deferred {
        return new_generation_for_bitmap(image, meta, meta.generation);
    }
    let mut m = meta.clone();
    m.bitmap_generation = m.generation;
    meta::save(image, &m)?;
    info!(
        "replica may lack writes since {:016x}; our next generation starts when one is \
         acknowledged without it",
        m.generation
    );
    Ok(m)
}

/// Saves `meta` with a new generation whose bitmap is relative to `base`; returns it.
fn new_generation_for_bitmap(image: &Path, meta: &Meta, base: u64) -> Result<Meta, SyncStateError> {
    let mut m = meta.clone();
    push_history(&mut m.history, m.generation, MAX_HISTORY);
    m.generation = random_id().map_err(SyncStateError::Random)?;
    m.bitmap_generation = base;
    meta::save(image, &m)?;
    info!(
        "new generation {:016x} (replica may lack writes since {:016x})",
        m.generation, base
    );
    Ok(m)
}

/// Byte range of regions `[first, first + count)`, clamped to the image.
pub fn region_bytes(first: u64, count: u64, size: u64) -> (u64, u64) {
    let start = first * REGION_SIZE;
    let end = ((first + count) * REGION_SIZE).min(size);
    (start, end.saturating_sub(start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_mark_starts_a_generation_and_survives_reopen() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        let size = 64 * REGION_SIZE;
        let mut s = SyncState::open(&img, size, false).unwrap();
        let g0 = s.meta.generation;
        s.mark(REGION_SIZE * 3, 10).unwrap();
        let g1 = s.meta.generation;
        assert_ne!(g0, g1);
        assert_eq!(s.meta.bitmap_generation, g0);
        assert_eq!(s.meta.history, vec![g0]);
        s.mark(REGION_SIZE * 5, 10).unwrap();
        assert_eq!(
            s.meta.generation, g1,
            "no new generation while the bitmap is dirty"
        );
        assert_eq!(s.out_of_sync_bytes(), 2 * REGION_SIZE);
        drop(s);
        let mut s = SyncState::open(&img, size, false).unwrap();
        assert_eq!(s.meta.generation, g1);
        assert_eq!(s.bitmap.count(), 2);
        s.clear_regions(3, 1);
        s.clear_regions(5, 1);
        let g = s.meta.generation;
        s.resync_finished(g).unwrap();
        drop(s);
        let s = SyncState::open(&img, size, false).unwrap();
        assert!(s.bitmap.is_clear());
        assert_eq!(s.meta.bitmap_generation, 0);
    }

    /// With a fence, marks record the base only; the generation starts at the confirmation
    /// (before the first write the replica lacks is acknowledged), and survives a reopen.
    #[test]
    fn a_fenced_primary_starts_its_generation_when_confirmed() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        let size = 64 * REGION_SIZE;
        let mut s = SyncState::open(&img, size, true).unwrap();
        let g0 = s.meta.generation;
        assert!(
            !s.confirm_generation().unwrap(),
            "nothing marked: no generation"
        );
        s.mark(REGION_SIZE * 3, 10).unwrap();
        assert_eq!((s.meta.generation, s.meta.bitmap_generation), (g0, g0));
        drop(s);
        let mut s = SyncState::open(&img, size, true).unwrap();
        assert_eq!((s.meta.generation, s.meta.bitmap_generation), (g0, g0));
        assert_eq!(s.bitmap.count(), 1);
        assert!(s.confirm_generation().unwrap());
        let g1 = s.meta.generation;
        assert_ne!(g1, g0);
        assert_eq!(
            (s.meta.bitmap_generation, s.meta.history.clone()),
            (g0, vec![g0])
        );
        assert!(!s.confirm_generation().unwrap(), "confirmed once");
        drop(s);
        let s = SyncState::open(&img, size, false).unwrap();
        assert_eq!((s.meta.generation, s.meta.bitmap_generation), (g1, g0));
    }

    /// Finding 7: bits marked after SyncDone was sent must not be left without a base
    /// generation (the replica, now at our generation, would be "in sync" over them).
    #[test]
    fn bits_left_after_sync_done_get_a_new_generation() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        let mut s = SyncState::open(&img, 64 * REGION_SIZE, false).unwrap();
        s.mark(0, 10).unwrap();
        let sent = s.meta.generation;
        // SyncDone(sent) is in flight; a write the replica failed is marked meanwhile.
        s.clear_regions(0, 1);
        s.mark(5 * REGION_SIZE, 10).unwrap();
        s.resync_finished(sent).unwrap();
        assert_ne!(s.meta.generation, sent, "same generation over a difference");
        assert_eq!(s.meta.bitmap_generation, sent);
        assert_eq!(s.bitmap.count(), 1);
        // Nothing marked: the base goes away.
        s.clear_regions(5, 1);
        let g = s.meta.generation;
        s.resync_finished(g).unwrap();
        assert_eq!(s.meta.bitmap_generation, 0);
        assert_eq!(s.meta.generation, g);
    }

    /// A failed persist leaves bits in memory only: the next mark of the same range must
    /// write them (not return Ok because nothing changed in memory).
    #[test]
    fn a_mark_after_a_failed_persist_writes_again() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        let mut s = SyncState::open(&img, 64 * REGION_SIZE, false).unwrap();
        s.mark(0, 10).unwrap();
        s.unpersisted = true;
        s.bitmap.set_range(7 * REGION_SIZE, 1, &mut Vec::new());
        s.mark(7 * REGION_SIZE, 1).unwrap();
        assert!(!s.unpersisted);
        drop(s);
        let s = SyncState::open(&img, 64 * REGION_SIZE, false).unwrap();
        assert!(
            s.bitmap.is_set(7),
            "the bit set before the failed persist was not written"
        );
    }

    /// A damaged bitmap block (a crash cannot make one: a block is one sector) reads as all
    /// set: its regions are marked, under a new generation when the bitmap had no base, and
    /// written back. Before, the file had no checksums and the damage was the state.
    #[test]
    fn a_damaged_bitmap_block_is_marked_out_of_sync() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        let size = 5000 * REGION_SIZE; // 79 words: two blocks of 63
        let g0 = SyncState::open(&img, size, false).unwrap().meta.generation;
        let path = bitmap_file::bitmap_path(&img);
        let mut raw = std::fs::read(&path).unwrap();
        raw[2 * 512 + 40] ^= 0x04; // block 2: words 63.., regions 4032..4999
        std::fs::write(&path, &raw).unwrap();
        let s = SyncState::open(&img, size, false).unwrap();
        assert_eq!(s.bitmap.count(), 5000 - 4032);
        assert!(s.bitmap.is_set(4032) && s.bitmap.is_set(4999) && !s.bitmap.is_set(4031));
        assert_ne!(s.meta.generation, g0, "bits without a base generation");
        assert_eq!(s.meta.bitmap_generation, g0);
        let g1 = s.meta.generation;
        drop(s);
        // Written back: the next open finds the same bits and no damage.
        let s = SyncState::open(&img, size, false).unwrap();
        assert_eq!(s.bitmap.count(), 5000 - 4032);
        assert_eq!(s.meta.generation, g1);
    }

    /// A bitmap or metadata file that cannot be trusted at all stops the start, naming it.
    #[test]
    fn an_untrustworthy_bitmap_or_metadata_file_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        let size = 64 * REGION_SIZE;
        let mut s = SyncState::open(&img, size, false).unwrap();
        s.mark(REGION_SIZE * 60, 1).unwrap();
        drop(s);
        let bitmap = bitmap_file::bitmap_path(&img);
        let raw = std::fs::read(&bitmap).unwrap();
        std::fs::write(&bitmap, &raw[..raw.len() - 5]).unwrap();
        let e = SyncState::open(&img, size, false).unwrap_err().to_string();
        assert!(
            e.contains("disk.img.bitmap") && e.contains("remove it"),
            "{e}"
        );
        // Removed, as the message says: every region out of sync (the metadata has a base).
        std::fs::remove_file(&bitmap).unwrap();
        let s = SyncState::open(&img, size, false).unwrap();
        assert_eq!(s.out_of_sync_bytes(), size);
        drop(s);
        let meta_path = meta::meta_path(&img);
        let text = std::fs::read_to_string(&meta_path).unwrap();
        std::fs::write(&meta_path, text.replacen("\"role\"", "\"rolf\"", 1)).unwrap();
        let e = SyncState::open(&img, size, false).unwrap_err().to_string();
        assert!(e.contains("disk.img.meta is damaged"), "{e}");
    }

    /// Files written before checksums are read and rewritten in the new formats.
    #[test]
    fn format_1_files_are_upgraded() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        let size = 64 * REGION_SIZE;
        let m = Meta {
            format: 1,
            node_id: 3,
            size,
            role: Role::Primary,
            disk_state: DiskState::UpToDate,
            generation: 9,
            bitmap_generation: 8,
            history: vec![8],
        };
        std::fs::write(
            meta::meta_path(&img),
            serde_json::to_string_pretty(&m).unwrap(),
        )
        .unwrap();
        let mut v1 = b"VHMBITMP".to_vec();
        v1.extend_from_slice(&1u32.to_le_bytes());
        v1.extend_from_slice(&[0; 4]);
        v1.extend_from_slice(&size.to_le_bytes());
        v1.extend_from_slice(&REGION_SIZE.to_le_bytes());
        v1.extend_from_slice(&(1u64 << 33).to_le_bytes());
        std::fs::write(bitmap_file::bitmap_path(&img), &v1).unwrap();
        let s = SyncState::open(&img, size, false).unwrap();
        assert_eq!((s.meta.generation, s.meta.bitmap_generation), (9, 8));
        assert_eq!(s.meta.format, META_FORMAT);
        assert!(s.bitmap.is_set(33) && s.bitmap.count() == 1);
        drop(s);
        let text = std::fs::read_to_string(meta::meta_path(&img)).unwrap();
        assert!(text.contains("crc32c"), "{text}");
        assert_eq!(
            std::fs::metadata(bitmap_file::bitmap_path(&img))
                .unwrap()
                .len(),
            1024
        );
        let s = SyncState::open(&img, size, false).unwrap();
        assert!(s.bitmap.is_set(33) && s.bitmap.count() == 1);
    }

    /// Fuzzing finding (fuzz/findings/generation_decide): a primary's image whose metadata is
    /// not up to date (a failback's resync into it was cut short) must not be served.
    #[test]
    fn a_primary_image_that_is_not_up_to_date_is_refused() {
        for state in [DiskState::Inconsistent, DiskState::Outdated] {
            let d = tempfile::tempdir().unwrap();
            let img = d.path().join("disk.img");
            let s = SyncState::open(&img, 1 << 20, false).unwrap();
            let mut m = s.meta.clone();
            drop(s);
            m.disk_state = state;
            meta::save(&img, &m).unwrap();
            let e = SyncState::open(&img, 1 << 20, false).unwrap_err();
            assert!(
                matches!(e, SyncStateError::NotUpToDate { .. }),
                "{state:?}: {e}"
            );
            assert!(e.to_string().contains("promote --force"), "{e}");
        }
    }

    #[test]
    fn size_change_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        SyncState::open(&img, 1 << 20, false).unwrap();
        assert!(matches!(
            SyncState::open(&img, 2 << 20, false),
            Err(SyncStateError::SizeChanged { .. })
        ));
    }
}
