//! An LRU read cache of whole image blocks, kept coherent with writes by the caller
//! (`replica.rs` invalidates the blocks a write, discard or write-zeroes touches before it acks).
//!
//! Blocks are [`BLOCK_SIZE`] bytes, aligned to the block size; the last block of an image may be
//! short. The cache knows nothing about files: a miss loads the block through a callback.

use std::collections::{BTreeMap, HashMap};
use std::io;

/// Size of one cached block.
pub const BLOCK_SIZE: u64 = 64 * 1024;

/// Hits and misses of one read, in blocks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReadStats {
    pub hits: u64,
    pub misses: u64,
}

#[derive(Debug)]
struct Block {
    data: Vec<u8>,
    /// Tick of the last use; the key of this block in `ReadCache::order`.
    tick: u64,
}

/// The cache. Capacity 0 disables it: reads go straight to the loader.
#[derive(Debug)]
pub struct ReadCache {
    capacity: u64,
    used: u64,
    tick: u64,
    blocks: HashMap<u64, Block>,
    /// Last-use tick -> block index, oldest first.
    order: BTreeMap<u64, u64>,
}

impl ReadCache {
    pub fn new(capacity_bytes: u64) -> Self {
        ReadCache {
            capacity: capacity_bytes,
            used: 0,
            tick: 0,
            blocks: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    #[cfg(test)]
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes of data currently cached.
    pub fn bytes(&self) -> u64 {
        self.used
    }

    /// Fills `buf` with the image bytes at `offset`. `image_size` bounds the last block;
    /// `load(offset, buf)` reads exactly `buf.len()` bytes from the image. The caller has checked
    /// that the range lies inside the image.
    pub fn read(
        &mut self,
        offset: u64,
        buf: &mut [u8],
        image_size: u64,
        mut load: impl FnMut(u64, &mut [u8]) -> io::Result<()>,
    ) -> io::Result<ReadStats> {
        let mut stats = ReadStats::default();
        if self.capacity == 0 || buf.is_empty() {
            load(offset, buf)?;
            return Ok(stats);
        }
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let index = pos / BLOCK_SIZE;
            let start = index * BLOCK_SIZE;
            let in_block = (pos - start) as usize;
            let tick = self.next_tick();
            let data = if let Some(b) = self.blocks.get_mut(&index) {
                stats.hits += 1;
                self.order.remove(&b.tick);
                self.order.insert(tick, index);
                b.tick = tick;
                &b.data
            } else {
                stats.misses += 1;
                let len = BLOCK_SIZE.min(image_size.saturating_sub(start)) as usize;
                if len <= in_block {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "read past the end of the image",
                    ));
                }
                let mut data = vec![0u8; len];
                load(start, &mut data)?;
                self.insert(index, data, tick)
            };
            let n = (data.len() - in_block).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&data[in_block..in_block + n]);
            done += n;
        }
        Ok(stats)
    }

    /// Drops every cached block that overlaps `offset..offset + len`.
    pub fn invalidate(&mut self, offset: u64, len: u64) {
        if len == 0 || self.blocks.is_empty() {
            return;
        }
        let first = offset / BLOCK_SIZE;
        let last = offset.saturating_add(len - 1) / BLOCK_SIZE;
        if last - first >= self.blocks.len() as u64 {
            // A large range (a whole-disk discard): walk the cache, not the range.
            let doomed: Vec<u64> = self
                .blocks
                .keys()
                .copied()
                .filter(|i| (first..=last).contains(i))
                .collect();
            for i in doomed {
                self.remove(i);
            }
        } else {
            for i in first..=last {
                self.remove(i);
            }
        }
    }

    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    fn remove(&mut self, index: u64) {
        if let Some(b) = self.blocks.remove(&index) {
            self.order.remove(&b.tick);
            self.used -= b.data.len() as u64;
        }
    }

    fn insert(&mut self, index: u64, data: Vec<u8>, tick: u64) -> &Vec<u8> {
        let len = data.len() as u64;
        while self.used + len > self.capacity {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some(b) = self.blocks.remove(&oldest) {
                self.used -= b.data.len() as u64;
            }
        }
        self.used += len;
        self.order.insert(tick, index);
        &self
            .blocks
            .entry(index)
            .or_insert(Block { data, tick })
            .data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An in-memory image with a load counter.
    struct Mem {
        data: Vec<u8>,
        loads: usize,
    }

    impl Mem {
        fn new(size: usize) -> Self {
            Mem {
                data: (0..size).map(|i| (i * 7 + i / 65536) as u8).collect(),
                loads: 0,
            }
        }
        fn read(&mut self, c: &mut ReadCache, offset: u64, len: usize) -> (Vec<u8>, ReadStats) {
            let mut buf = vec![0u8; len];
            let size = self.data.len() as u64;
            let data = &self.data;
            let loads = &mut self.loads;
            let s = c
                .read(offset, &mut buf, size, |o, b| {
                    *loads += 1;
                    b.copy_from_slice(&data[o as usize..o as usize + b.len()]);
                    Ok(())
                })
                .unwrap();
            (buf, s)
        }
        fn write(&mut self, c: &mut ReadCache, offset: u64, bytes: &[u8]) {
            c.invalidate(offset, bytes.len() as u64);
            self.data[offset as usize..offset as usize + bytes.len()].copy_from_slice(bytes);
        }
    }

    const B: usize = BLOCK_SIZE as usize;

    #[test]
    fn reads_match_the_image_and_hit_the_second_time() {
        let mut m = Mem::new(4 * B + 1000);
        let mut c = ReadCache::new(16 * BLOCK_SIZE);
        for (off, len) in [
            (0, 10),
            (B - 5, 10),
            (100, 3 * B),
            (4 * B + 10, 990),
            (3, 4 * B),
        ] {
            let (got, _) = m.read(&mut c, off as u64, len);
            assert_eq!(got, m.data[off..off + len], "at {off}+{len}");
        }
        let (_, s) = m.read(&mut c, 0, 4 * B + 1000);
        assert_eq!(s, ReadStats { hits: 5, misses: 0 });
        // The short last block is cached at its real length.
        assert_eq!(c.bytes(), 4 * BLOCK_SIZE + 1000);
    }

    #[test]
    fn write_after_cached_read_returns_new_data() {
        let mut m = Mem::new(4 * B);
        let mut c = ReadCache::new(16 * BLOCK_SIZE);
        m.read(&mut c, 0, 4 * B);
        m.write(&mut c, B as u64 - 3, &[0xAB; 6]);
        let (got, s) = m.read(&mut c, 0, 4 * B);
        assert_eq!(got, m.data);
        assert_eq!(got[B - 3..B + 3], [0xAB; 6]);
        assert_eq!(s, ReadStats { hits: 2, misses: 2 });
    }

    #[test]
    fn discard_returns_zeros() {
        let mut m = Mem::new(8 * B);
        let mut c = ReadCache::new(16 * BLOCK_SIZE);
        m.read(&mut c, 0, 8 * B);
        // A discard of (almost) everything: exercises the walk-the-cache path.
        m.write(&mut c, 1, &vec![0; 8 * B - 2]);
        let (got, _) = m.read(&mut c, 0, 8 * B);
        assert!(got[1..8 * B - 1].iter().all(|b| *b == 0));
        assert_eq!(got, m.data);
        c.invalidate(u64::MAX - 1, 10); // no overflow
    }

    #[test]
    fn eviction_keeps_size_within_capacity_and_drops_least_recent() {
        let mut m = Mem::new(10 * B);
        let mut c = ReadCache::new(3 * BLOCK_SIZE);
        m.read(&mut c, 0, 1); // block 0
        m.read(&mut c, B as u64, 1); // block 1
        m.read(&mut c, 0, 1); // block 0 again: now block 1 is the oldest
        m.read(&mut c, 2 * B as u64, 1); // block 2
        m.read(&mut c, 3 * B as u64, 1); // block 3 evicts block 1
        assert!(c.bytes() <= c.capacity());
        let (_, s) = m.read(&mut c, 0, 1);
        assert_eq!(s.hits, 1, "block 0 was used recently");
        let (_, s) = m.read(&mut c, B as u64, 1);
        assert_eq!(s.misses, 1, "block 1 was evicted");
        // A read larger than the cache still returns the right bytes.
        let (got, _) = m.read(&mut c, 5, 8 * B);
        assert_eq!(got, m.data[5..5 + 8 * B]);
        assert!(c.bytes() <= c.capacity());
        assert_eq!(c.blocks.len(), c.order.len());
    }

    #[test]
    fn disabled_cache_reads_through() {
        let mut m = Mem::new(2 * B);
        let mut c = ReadCache::new(0);
        let (got, s) = m.read(&mut c, 7, B);
        assert_eq!(got, m.data[7..7 + B]);
        assert_eq!(s, ReadStats::default());
        assert_eq!(c.bytes(), 0);
        m.read(&mut c, 7, B);
        assert_eq!(m.loads, 2);
    }

    #[test]
    fn load_errors_are_returned_and_nothing_is_cached() {
        let mut c = ReadCache::new(4 * BLOCK_SIZE);
        let mut buf = [0u8; 10];
        let e = c
            .read(0, &mut buf, BLOCK_SIZE, |_, _| {
                Err(io::Error::other("boom"))
            })
            .unwrap_err();
        assert_eq!(e.to_string(), "boom");
        assert_eq!(c.bytes(), 0);
    }
}
