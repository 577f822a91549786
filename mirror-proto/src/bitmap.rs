//! The out-of-sync bitmap: one bit per region of the image; a set bit means the replica may
//! differ from the primary there. Pure in-memory structure; `meta.rs` persists it.

/// Bytes covered by one bit. 64 KiB keeps the bitmap of a 1 TiB image at 2 MiB while a 4 KiB
/// guest write costs at most 64 KiB of resync.
pub const REGION_SIZE: u64 = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    regions: u64,
    set: u64,
}

impl Bitmap {
    /// An all-clear bitmap for an image of `size` bytes.
    pub fn new(size: u64) -> Self {
        let regions = size.div_ceil(REGION_SIZE);
        Bitmap {
            words: vec![0; regions.div_ceil(64) as usize],
            regions,
            set: 0,
        }
    }

    pub fn from_words(size: u64, words: Vec<u64>) -> Option<Self> {
        let mut b = Bitmap::new(size);
        if words.len() != b.words.len() {
            return None;
        }
        b.words = words;
        // Bits past the last region must be clear.
        if let Some(last) = b.words.last_mut() {
            let used = b.regions % 64;
            if used != 0 {
                *last &= (1u64 << used) - 1;
            }
        }
        b.set = b.words.iter().map(|w| u64::from(w.count_ones())).sum();
        Some(b)
    }

    pub fn words(&self) -> &[u64] {
        &self.words
    }

    pub fn regions(&self) -> u64 {
        self.regions
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.set
    }

    pub fn is_clear(&self) -> bool {
        self.set == 0
    }

    /// The regions `[first, last]` touched by a byte range (None for an empty range).
    pub fn regions_of(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        if len == 0 || self.regions == 0 {
            return None;
        }
        let first = offset / REGION_SIZE;
        let last = offset.saturating_add(len - 1) / REGION_SIZE;
        if first >= self.regions {
            return None;
        }
        Some((first, last.min(self.regions - 1)))
    }

    pub fn is_set(&self, region: u64) -> bool {
        region < self.regions && self.words[(region / 64) as usize] & (1 << (region % 64)) != 0
    }

    /// Sets the bits of the regions a byte range touches; returns the indices of the words that
    /// changed (for persisting), in order.
    pub fn set_range(&mut self, offset: u64, len: u64, changed: &mut Vec<usize>) {
        let Some((first, last)) = self.regions_of(offset, len) else {
            return;
        };
        for r in first..=last {
            let (w, bit) = ((r / 64) as usize, 1u64 << (r % 64));
            if self.words[w] & bit == 0 {
                self.words[w] |= bit;
                self.set += 1;
                if changed.last() != Some(&w) {
                    changed.push(w);
                }
            }
        }
    }

    /// Whether any region a byte range touches is set.
    pub fn any_in_range(&self, offset: u64, len: u64) -> bool {
        match self.regions_of(offset, len) {
            Some((first, last)) => (first..=last).any(|r| self.is_set(r)),
            None => false,
        }
    }

    /// Clears one region; returns whether it was set.
    pub fn clear(&mut self, region: u64) -> bool {
        if !self.is_set(region) {
            return false;
        }
        self.words[(region / 64) as usize] &= !(1u64 << (region % 64));
        self.set -= 1;
        true
    }

    pub fn set_all(&mut self) {
        let mut changed = Vec::new();
        self.set_range(0, self.regions * REGION_SIZE, &mut changed);
    }

    pub fn clear_all(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
        self.set = 0;
    }

    /// The first run of set regions at or after `from`, at most `max` regions long.
    pub fn next_run(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        let mut r = from;
        while r < self.regions {
            let w = self.words[(r / 64) as usize] >> (r % 64);
            if w == 0 {
                r = (r / 64 + 1) * 64;
                continue;
            }
            r += u64::from(w.trailing_zeros());
            if r >= self.regions {
                return None;
            }
            let start = r;
            while r < self.regions && r - start < max && self.is_set(r) {
                r += 1;
            }
            return Some((start, r - start));
        }
        None
    }

    /// Bytes of an image of `size` bytes covered by set bits (the last region may be short).
    pub fn bytes(&self, size: u64) -> u64 {
        let mut total = self.set * REGION_SIZE;
        if self.regions > 0 && self.is_set(self.regions - 1) {
            total -= self.regions * REGION_SIZE - size;
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_clear_count_and_runs() {
        let size = 100 * REGION_SIZE + 10;
        let mut b = Bitmap::new(size);
        assert_eq!(b.regions(), 101);
        let mut changed = Vec::new();
        b.set_range(REGION_SIZE - 1, 2, &mut changed); // straddles regions 0 and 1
        assert_eq!(b.count(), 2);
        assert_eq!(changed, vec![0]);
        changed.clear();
        b.set_range(REGION_SIZE, 10, &mut changed); // already set
        assert!(changed.is_empty());
        b.set_range(70 * REGION_SIZE, 3 * REGION_SIZE, &mut changed);
        assert_eq!(changed, vec![1]);
        assert_eq!(b.next_run(0, 100), Some((0, 2)));
        assert_eq!(b.next_run(2, 100), Some((70, 3)));
        assert_eq!(b.next_run(70, 2), Some((70, 2)));
        assert_eq!(b.next_run(73, 100), None);
        assert!(b.clear(0));
        assert!(!b.clear(0));
        assert_eq!(b.count(), 4);
        assert!(b.any_in_range(71 * REGION_SIZE, 1));
        assert!(!b.any_in_range(80 * REGION_SIZE, REGION_SIZE));
    }

    #[test]
    fn bytes_accounts_for_a_short_last_region() {
        let size = 2 * REGION_SIZE + 512;
        let mut b = Bitmap::new(size);
        b.set_all();
        assert_eq!(b.count(), 3);
        assert_eq!(b.bytes(size), size);
        b.clear_all();
        assert_eq!(b.bytes(size), 0);
    }

    #[test]
    fn ranges_past_the_end_are_clamped() {
        let mut b = Bitmap::new(4 * REGION_SIZE);
        let mut c = Vec::new();
        b.set_range(3 * REGION_SIZE, u64::MAX, &mut c);
        assert_eq!(b.count(), 1);
        b.set_range(10 * REGION_SIZE, 5, &mut c);
        assert_eq!(b.count(), 1);
        b.set_range(0, 0, &mut c);
        assert_eq!(b.count(), 1);
    }

    #[test]
    fn from_words_validates_and_masks() {
        let b = Bitmap::from_words(3 * REGION_SIZE, vec![u64::MAX]).unwrap();
        assert_eq!(b.count(), 3);
        assert!(Bitmap::from_words(3 * REGION_SIZE, vec![0, 0]).is_none());
    }
}
