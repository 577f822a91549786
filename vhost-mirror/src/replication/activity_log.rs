//! The activity log at run time: before a mirrored write touches the local image, the 4 MiB
//! extents it covers are recorded as hot (`mirror_proto::activity_log`). Only a write to an
//! extent that is not hot yet costs a transaction (one 4 KiB write + fdatasync); the set is
//! bounded and the least recently used idle extents leave it first.
//!
//! After a crash the extents listed may differ from the peer's copy: the next start (or the
//! peer that takes over) resyncs exactly those, never the whole disk.
//!
//! Invariant: an extent leaves the log only when every write to it is durable on both sides.
//! A write that completed is in both page caches only; its extent stays until a *barrier*
//! (a local fdatasync and a replica Flush, both started after the write completed, or a
//! dead link whose marks cover the replica's part) has completed. Barriers are numbered by
//! epochs: [`ActivityLog::barrier_begin`] before the flushes, [`ActivityLog::barrier_done`]
//! after both succeeded. A guest FLUSH is such a barrier; when the log is full of extents
//! no barrier covers yet, the caller runs one ([`Begin::NeedBarrier`]).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use mirror_proto::activity_log::{AlError, AlFile, EXTENT_SIZE, MAX_EXTENTS};

/// Requests spanning more extents than this bypass the log (the caller marks them out of
/// sync instead).
pub const MAX_EXTENTS_PER_REQUEST: u64 = 16;

struct Entry {
    refs: u32,
    last_use: u64,
    /// The epoch in which the last write to this extent completed.
    dirty_epoch: u64,
}

struct State {
    file: AlFile,
    hot: HashMap<u64, Entry>,
    tick: u64,
    scratch: Vec<u64>,
    /// Writes completing now are stamped with this epoch; a barrier started now covers them.
    epoch: u64,
    /// Every write stamped with an epoch up to this one is durable on both sides.
    durable_epoch: u64,
}

/// What [`ActivityLog::begin`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Begin {
    /// The extents are hot (durably) and pinned until [`ActivityLog::end`].
    Pinned,
    /// The range spans too many extents for the log: nothing pinned, the caller must cover it
    /// some other way (the out-of-sync bitmap).
    TooLarge,
    /// No room: every idle extent holds writes no barrier has made durable yet. Run a barrier
    /// and call again.
    NeedBarrier,
    /// No room, and a barrier would not make any: every extent is pinned by a write in
    /// flight. Nothing is pinned; the caller covers the range some other way (the bitmap).
    Full,
}

pub struct ActivityLog {
    state: Mutex<State>,
    /// Transactions written (each a 4 KiB write and an fdatasync), for the metrics: read
    /// without the lock.
    writes: AtomicU64,
}

/// The extents `[first, last]` a byte range touches.
pub fn extents_of(offset: u64, len: u64) -> Option<(u64, u64)> {
    if len == 0 {
        return None;
    }
    Some((
        offset / EXTENT_SIZE,
        offset.saturating_add(len - 1) / EXTENT_SIZE,
    ))
}

impl ActivityLog {
    /// Opens the log; returns it and the extents left hot by the previous run (a crash).
    pub fn open(image: &Path) -> Result<(Self, Vec<u64>), AlError> {
        let (file, recovered) = AlFile::open(image)?;
        Ok((
            ActivityLog {
                state: Mutex::new(State {
                    file,
                    hot: HashMap::new(),
                    tick: 0,
                    scratch: Vec::new(),
                    epoch: 1,
                    durable_epoch: 0,
                }),
                writes: AtomicU64::new(0),
            },
            recovered,
        ))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the extents of a byte range hot (durably) and pins them until [`Self::end`].
    pub fn begin(&self, offset: u64, len: u64) -> Result<Begin, AlError> {
        let Some((first, last)) = extents_of(offset, len) else {
            return Ok(Begin::Pinned);
        };
        if last - first + 1 > MAX_EXTENTS_PER_REQUEST {
            return Ok(Begin::TooLarge);
        }
        let mut g = self.lock();
        let st = &mut *g;
        st.tick += 1;
        let tick = st.tick;
        let missing = (first..=last).any(|e| !st.hot.contains_key(&e));
        if missing {
            // Make room: drop the least recently used idle extents whose writes are durable
            // on both sides.
            let need = (first..=last).filter(|e| !st.hot.contains_key(e)).count();
            let durable = st.durable_epoch;
            while st.hot.len() + need > MAX_EXTENTS {
                let victim = st
                    .hot
                    .iter()
                    .filter(|(e, en)| {
                        en.refs == 0 && en.dirty_epoch <= durable && !(first..=last).contains(*e)
                    })
                    .min_by_key(|(_, en)| en.last_use)
                    .map(|(e, _)| *e);
                match victim {
                    Some(v) => {
                        st.hot.remove(&v);
                    }
                    None => {
                        // Idle extents a barrier would free, or none at all (every one is
                        // pinned by a write in flight: a barrier frees nothing).
                        let barrier_helps = st.hot.iter().any(|(e, en)| {
                            en.refs == 0 && en.dirty_epoch > durable && !(first..=last).contains(e)
                        });
                        return Ok(if barrier_helps {
                            Begin::NeedBarrier
                        } else {
                            Begin::Full
                        });
                    }
                }
            }
            let inserted: Vec<u64> = (first..=last).filter(|e| !st.hot.contains_key(e)).collect();
            for &e in &inserted {
                st.hot.insert(
                    e,
                    Entry {
                        refs: 0,
                        last_use: tick,
                        dirty_epoch: 0,
                    },
                );
            }
            st.scratch.clear();
            st.scratch.extend(st.hot.keys().copied());
            st.scratch.sort_unstable();
            self.writes.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = st.file.commit(&st.scratch) {
                // Only what this call added: extents hot before may hold writes a crash must
                // resync.
                for e in &inserted {
                    st.hot.remove(e);
                }
                return Err(e);
            }
        }
        for e in first..=last {
            if let Some(en) = st.hot.get_mut(&e) {
                en.refs += 1;
                en.last_use = tick;
            }
        }
        Ok(Begin::Pinned)
    }

    /// Unpins the extents of a range pinned by [`Self::begin`]; the write to them has
    /// completed (or failed) on both sides, and a later barrier makes it durable.
    pub fn end(&self, offset: u64, len: u64) {
        let Some((first, last)) = extents_of(offset, len) else {
            return;
        };
        if last - first + 1 > MAX_EXTENTS_PER_REQUEST {
            return;
        }
        let mut g = self.lock();
        let epoch = g.epoch;
        for e in first..=last {
            if let Some(en) = g.hot.get_mut(&e) {
                en.refs = en.refs.saturating_sub(1);
                en.dirty_epoch = epoch;
            }
        }
    }

    /// A barrier starts (before its fdatasync and replica Flush are issued): returns its
    /// epoch; it covers every write that completed before this call.
    pub fn barrier_begin(&self) -> u64 {
        let mut g = self.lock();
        let b = g.epoch;
        g.epoch += 1;
        b
    }

    /// The barrier of epoch `b` completed on both sides.
    pub fn barrier_done(&self, b: u64) {
        let mut g = self.lock();
        g.durable_epoch = g.durable_epoch.max(b);
    }

    /// Empties the log (clean shutdown: nothing in flight, the peer flushed).
    pub fn clear(&self) -> Result<(), AlError> {
        let mut g = self.lock();
        g.hot.retain(|_, en| en.refs > 0);
        let keep: Vec<u64> = g.hot.keys().copied().collect();
        self.writes.fetch_add(1, Ordering::Relaxed);
        g.file.commit(&keep)
    }

    /// Transactions written (tried: also failed ones) since the log was opened.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    fn hot(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.lock().hot.keys().copied().collect();
        v.sort_unstable();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_extents_survive_a_crash_and_idle_ones_are_evicted() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        let (al, rec) = ActivityLog::open(&img).unwrap();
        assert!(rec.is_empty());
        assert_eq!(al.begin(EXTENT_SIZE - 512, 1024).unwrap(), Begin::Pinned); // extents 0 and 1
        assert_eq!(al.hot(), vec![0, 1]);
        // One transaction for both extents; none for a write to an extent already hot.
        assert_eq!(al.writes(), 1);
        assert_eq!(al.begin(EXTENT_SIZE - 512, 512).unwrap(), Begin::Pinned);
        al.end(EXTENT_SIZE - 512, 512);
        assert_eq!(al.writes(), 1);
        al.end(EXTENT_SIZE - 512, 1024);
        // "Crash": reopen without clearing.
        drop(al);
        let (al, rec) = ActivityLog::open(&img).unwrap();
        assert_eq!(rec, vec![0, 1]);
        al.clear().unwrap();
        drop(al);
        let (al, rec) = ActivityLog::open(&img).unwrap();
        assert!(rec.is_empty());
        // Fill the log; the oldest idle extent makes room; pinned ones stay.
        assert_eq!(al.begin(0, 1).unwrap(), Begin::Pinned); // pinned extent 0
        for e in 1..MAX_EXTENTS as u64 {
            assert_eq!(al.begin(e * EXTENT_SIZE, 1).unwrap(), Begin::Pinned);
            al.end(e * EXTENT_SIZE, 1);
        }
        // Full of completed writes no barrier covers: nothing may leave yet.
        assert_eq!(al.begin(5000 * EXTENT_SIZE, 1).unwrap(), Begin::NeedBarrier);
        let b = al.barrier_begin();
        al.barrier_done(b);
        assert_eq!(al.begin(5000 * EXTENT_SIZE, 1).unwrap(), Begin::Pinned);
        let hot = al.hot();
        assert_eq!(hot.len(), MAX_EXTENTS);
        assert!(hot.contains(&0), "pinned extent evicted");
        assert!(!hot.contains(&1), "oldest idle extent kept");
        // A write completing after the barrier began is not covered by it.
        let b = al.barrier_begin();
        al.end(5000 * EXTENT_SIZE, 1);
        al.barrier_done(b);
        for e in 6000..6000 + MAX_EXTENTS as u64 - 2 {
            assert_eq!(al.begin(e * EXTENT_SIZE, 1).unwrap(), Begin::Pinned);
            al.end(e * EXTENT_SIZE, 1);
        }
        assert!(
            al.hot().contains(&5000),
            "extent evicted before its write was durable"
        );
        // A huge range bypasses the log.
        assert_eq!(al.begin(0, 100 * EXTENT_SIZE).unwrap(), Begin::TooLarge);
    }
}
