//! The ordering rule: two overlapping writes from different owners (queues, resync) are never
//! in flight at once. The second waits until the first has completed on both sides, so the
//! order the primary sends overlapping writes in is the order it applied them locally, and
//! the replica (which applies in arrival order) ends up with the same bytes.
//!
//! The lock here is held only to look at the short list of writes in flight, never during I/O.

use std::sync::{Condvar, Mutex, MutexGuard};

/// Who holds a range: a queue index, or [`RESYNC`].
pub type Owner = usize;
pub const RESYNC: Owner = usize::MAX;

#[derive(Debug)]
struct Entry {
    id: u64,
    owner: Owner,
    start: u64,
    end: u64,
}

#[derive(Debug, Default)]
pub struct Inflight {
    list: Mutex<(u64, Vec<Entry>)>,
    released: Condvar,
}

/// A held range; give it back with [`Inflight::release`].
#[derive(Debug, PartialEq, Eq)]
#[must_use]
pub struct Token(u64);

impl Inflight {
    fn lock(&self) -> MutexGuard<'_, (u64, Vec<Entry>)> {
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn conflicts(list: &[Entry], owner: Owner, start: u64, end: u64) -> bool {
        list.iter()
            .any(|e| e.owner != owner && e.start < end && start < e.end)
    }

    fn insert(g: &mut (u64, Vec<Entry>), owner: Owner, start: u64, end: u64) -> Token {
        g.0 += 1;
        let id = g.0;
        g.1.push(Entry {
            id,
            owner,
            start,
            end,
        });
        Token(id)
    }

    /// Takes `[start, end)` for `owner` if no other owner holds an overlapping range.
    pub fn try_acquire(&self, owner: Owner, start: u64, end: u64) -> Option<Token> {
        let mut g = self.lock();
        if Self::conflicts(&g.1, owner, start, end) {
            return None;
        }
        Some(Self::insert(&mut g, owner, start, end))
    }

    /// Takes `[start, end)`, waiting for overlapping ranges of other owners to be released.
    /// The caller must hold no range that another owner could be waiting for (release or
    /// complete its own first), or two owners could wait for each other.
    pub fn acquire(&self, owner: Owner, start: u64, end: u64) -> Token {
        let mut g = self.lock();
        while Self::conflicts(&g.1, owner, start, end) {
            g = self.released.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        Self::insert(&mut g, owner, start, end)
    }

    /// Like [`Inflight::acquire`], but gives up after `d` (None).
    pub fn acquire_timeout(
        &self,
        owner: Owner,
        start: u64,
        end: u64,
        d: std::time::Duration,
    ) -> Option<Token> {
        let deadline = std::time::Instant::now() + d;
        let mut g = self.lock();
        while Self::conflicts(&g.1, owner, start, end) {
            let left = deadline.checked_duration_since(std::time::Instant::now())?;
            g = self
                .released
                .wait_timeout(g, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        Some(Self::insert(&mut g, owner, start, end))
    }

    pub fn release(&self, token: Token) {
        let mut g = self.lock();
        g.1.retain(|e| e.id != token.0);
        drop(g);
        self.released.notify_all();
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.lock().1.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn overlap_between_owners_waits() {
        let f = Arc::new(Inflight::default());
        let t = f.try_acquire(0, 0, 100).unwrap();
        // The same owner may overlap itself (its requests are ordered already).
        let t2 = f.try_acquire(0, 50, 60).unwrap();
        assert!(f.try_acquire(1, 99, 200).is_none());
        let t3 = f.try_acquire(1, 100, 200).unwrap();
        let f2 = f.clone();
        let h = std::thread::spawn(move || {
            let t = f2.acquire(RESYNC, 0, 55);
            f2.release(t);
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!h.is_finished());
        f.release(t);
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            !h.is_finished(),
            "still blocked by the second range of owner 0"
        );
        f.release(t2);
        h.join().unwrap();
        f.release(t3);
        assert!(f.is_empty());
    }
}
