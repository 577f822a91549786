//! The activity log at run time: before a mirrored write touches the local image, the 4 MiB
//! extents it covers are recorded as hot (`mirror_proto::activity_log`). Only a write to an
//! extent that is not hot yet costs a transaction (one 4 KiB write + fdatasync); the set is
//! bounded and the least recently used idle extents leave it first.
//!
//! After a crash the extents listed may differ from the peer's copy: the next start (or the
//! peer that takes over) resyncs exactly those, never the whole disk.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use mirror_proto::activity_log::{AlError, AlFile, EXTENT_SIZE, MAX_EXTENTS};

/// Requests spanning more extents than this bypass the log (the caller marks them out of
/// sync instead).
pub const MAX_EXTENTS_PER_REQUEST: u64 = 16;

struct Entry {
    refs: u32,
    last_use: u64,
}

struct State {
    file: AlFile,
    hot: HashMap<u64, Entry>,
    tick: u64,
    scratch: Vec<u64>,
}

pub struct ActivityLog {
    state: Mutex<State>,
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
                }),
            },
            recovered,
        ))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the extents of a byte range hot (durably) and pins them until [`Self::end`].
    /// Returns false when the range is too large for the log (the caller must cover it some
    /// other way); nothing is pinned then.
    pub fn begin(&self, offset: u64, len: u64) -> Result<bool, AlError> {
        let Some((first, last)) = extents_of(offset, len) else {
            return Ok(true);
        };
        if last - first + 1 > MAX_EXTENTS_PER_REQUEST {
            return Ok(false);
        }
        let mut g = self.lock();
        let st = &mut *g;
        st.tick += 1;
        let tick = st.tick;
        let missing = (first..=last).any(|e| !st.hot.contains_key(&e));
        if missing {
            // Make room: drop the least recently used idle extents.
            let need = (first..=last).filter(|e| !st.hot.contains_key(e)).count();
            while st.hot.len() + need > MAX_EXTENTS {
                let victim = st
                    .hot
                    .iter()
                    .filter(|(e, en)| en.refs == 0 && !(first..=last).contains(*e))
                    .min_by_key(|(_, en)| en.last_use)
                    .map(|(e, _)| *e);
                match victim {
                    Some(v) => {
                        st.hot.remove(&v);
                    }
                    None => return Ok(false),
                }
            }
            for e in first..=last {
                st.hot.entry(e).or_insert(Entry {
                    refs: 0,
                    last_use: tick,
                });
            }
            st.scratch.clear();
            st.scratch.extend(st.hot.keys().copied());
            st.scratch.sort_unstable();
            if let Err(e) = st.file.commit(&st.scratch) {
                for e in first..=last {
                    if st.hot.get(&e).is_some_and(|en| en.refs == 0) {
                        st.hot.remove(&e);
                    }
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
        Ok(true)
    }

    /// Unpins the extents of a range pinned by a successful [`Self::begin`].
    pub fn end(&self, offset: u64, len: u64) {
        let Some((first, last)) = extents_of(offset, len) else {
            return;
        };
        if last - first + 1 > MAX_EXTENTS_PER_REQUEST {
            return;
        }
        let mut g = self.lock();
        for e in first..=last {
            if let Some(en) = g.hot.get_mut(&e) {
                en.refs = en.refs.saturating_sub(1);
            }
        }
    }

    /// Empties the log (clean shutdown: nothing in flight, the peer flushed).
    pub fn clear(&self) -> Result<(), AlError> {
        let mut g = self.lock();
        g.hot.retain(|_, en| en.refs > 0);
        let keep: Vec<u64> = g.hot.keys().copied().collect();
        g.file.commit(&keep)
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
        assert!(al.begin(EXTENT_SIZE - 512, 1024).unwrap()); // extents 0 and 1
        assert_eq!(al.hot(), vec![0, 1]);
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
        assert!(al.begin(0, 1).unwrap()); // pinned extent 0
        for e in 1..MAX_EXTENTS as u64 {
            assert!(al.begin(e * EXTENT_SIZE, 1).unwrap());
            al.end(e * EXTENT_SIZE, 1);
        }
        assert!(al.begin(5000 * EXTENT_SIZE, 1).unwrap());
        let hot = al.hot();
        assert_eq!(hot.len(), MAX_EXTENTS);
        assert!(hot.contains(&0), "pinned extent evicted");
        assert!(!hot.contains(&1), "oldest idle extent kept");
        // A huge range bypasses the log.
        assert!(!al.begin(0, 100 * EXTENT_SIZE).unwrap());
    }
}
