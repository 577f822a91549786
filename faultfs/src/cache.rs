//! The volatile write-back cache of one regular file: the part of the model that a power cut
//! loses.
//!
//! A [`FileCache`] holds what was written through the mount but not yet made durable by an
//! fsync of that file:
//! * dirty data pages (page index -> 4 KiB of content), created by writes;
//! * dirty zero runs (start page .. end page), created by fallocate punch-hole/zero-range, so that
//!   zeroing a large range costs one map entry and no page allocation;
//! * the file size as seen through the mount, which writes (and zero-range without KEEP_SIZE)
//!   past the end extend volatilely.
//!
//! Everything else comes from the backing file, which always holds the durable state. Reads
//! merge the two; [`FileCache::flush`] writes the dirty state to the backing file (the caller then
//! fsyncs it); [`FileCache::drop_all`] forgets it (a power cut, or a failed fsync).
//!
//! Invariants:
//! * data pages and zero runs are disjoint; zero runs are disjoint and never adjacent;
//! * `durable_size <= size`, and no page lies wholly at or beyond `size`;
//! * bytes of the last data page beyond `size` are zero (so extending the file shows zeros).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, IoSlice};
use std::os::unix::fs::FileExt;

use nix::fcntl::FallocateFlags;

/// The page size of the model (the granularity of what a cut drops).
pub const PAGE: u64 = 4096;
const PAGE_USIZE: usize = PAGE as usize;
/// At most this many iovecs per `pwritev` (the Linux IOV_MAX).
const IOV_MAX: usize = 1024;

type Page = Box<[u8; PAGE_USIZE]>;

static ZERO_PAGE: [u8; PAGE_USIZE] = [0; PAGE_USIZE];

fn zero_page() -> Page {
    Box::new([0; PAGE_USIZE])
}

/// The dirty (not yet fsynced) state of one regular file.
#[derive(Debug)]
pub struct FileCache {
    /// The size seen through the mount.
    size: u64,
    /// The size of the backing file: what the size goes back to after a cut.
    durable_size: u64,
    /// Dirty data pages by page index.
    pages: BTreeMap<u64, Page>,
    /// Dirty zero runs: start page -> end page (exclusive).
    zeros: BTreeMap<u64, u64>,
}

impl FileCache {
    /// A clean cache over a backing file of `size` bytes.
    pub fn new(size: u64) -> FileCache {
        FileCache {
            size,
            durable_size: size,
            pages: BTreeMap::new(),
            zeros: BTreeMap::new(),
        }
    }

    /// The file size as seen through the mount.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of dirty pages (data pages plus pages in zero runs).
    pub fn dirty_pages(&self) -> u64 {
        self.pages.len() as u64 + self.zeros.iter().map(|(s, e)| e - s).sum::<u64>()
    }

    /// Dirty bytes, counted in whole pages.
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_pages() * PAGE
    }

    /// Whether anything (data, zeroing, or a size extension) would be lost by a cut.
    pub fn is_dirty(&self) -> bool {
        !self.pages.is_empty() || !self.zeros.is_empty() || self.size != self.durable_size
    }

    /// Reads up to `len` bytes at `off` (short at the end of the file): the backing file with the
    /// dirty pages and zero runs laid over it.
    pub fn read(&self, backing: &File, off: u64, len: u64) -> io::Result<Vec<u8>> {
        if off >= self.size || len == 0 {
            return Ok(Vec::new());
        }
        let end = off.saturating_add(len).min(self.size);
        let mut buf = vec![0u8; to_usize(end - off)];
        // Bytes beyond the backing file's end stay zero (the volatile extension).
        read_full_at(backing, &mut buf, off)?;
        let first = off / PAGE;
        let last = (end - 1) / PAGE;
        for (&zs, &ze) in self.zeros.range(..=last).rev() {
            if ze <= first {
                break;
            }
            let (s, e) = ((zs * PAGE).max(off), (ze * PAGE).min(end));
            buf[to_usize(s - off)..to_usize(e - off)].fill(0);
        }
        for (&p, page) in self.pages.range(first..=last) {
            let ps = p * PAGE;
            let (s, e) = (ps.max(off), (ps + PAGE).min(end));
            buf[to_usize(s - off)..to_usize(e - off)]
                .copy_from_slice(&page[to_usize(s - ps)..to_usize(e - ps)]);
        }
        Ok(buf)
    }

    /// Writes `data` at `off` into the cache (read-modify-write of partial pages from the
    /// backing file); a write past the end extends the size.
    pub fn write(&mut self, backing: &File, off: u64, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let end = off
            .checked_add(data.len() as u64)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
        let mut p = off / PAGE;
        while p * PAGE < end {
            let ps = p * PAGE;
            let (s, e) = (ps.max(off), (ps + PAGE).min(end));
            let whole = s == ps && e == ps + PAGE;
            let page = self.page_mut(backing, p, whole)?;
            page[to_usize(s - ps)..to_usize(e - ps)]
                .copy_from_slice(&data[to_usize(s - off)..to_usize(e - off)]);
            p += 1;
        }
        self.size = self.size.max(end);
        Ok(())
    }

    /// Zeroes `[off, off + len)`, which the caller has clipped to the current size: whole pages
    /// become (part of) a zero run, partial pages at either end are written with zeros.
    pub fn zero(&mut self, backing: &File, off: u64, len: u64) -> io::Result<()> {
        let end = off.saturating_add(len).min(self.size);
        if off >= end {
            return Ok(());
        }
        let first_full = off.div_ceil(PAGE);
        let end_full = end / PAGE;
        if first_full >= end_full {
            // No whole page inside: one or two partial pages.
            return self.write_zeros(backing, off, end);
        }
        self.write_zeros(backing, off, first_full * PAGE)?;
        self.write_zeros(backing, end_full * PAGE, end)?;
        // Drop the data pages inside the run, then record the run.
        let mut inside = self.pages.split_off(&first_full);
        let mut after = inside.split_off(&end_full);
        self.pages.append(&mut after);
        drop(inside);
        self.insert_zero_run(first_full, end_full);
        Ok(())
    }

    /// Extends the size volatilely (zero-range without KEEP_SIZE): the new bytes read as zeros.
    pub fn extend(&mut self, new_size: u64) {
        self.size = self.size.max(new_size);
    }

    /// The backing file was truncated (or extended) to `new_size`, which is durable at once in
    /// the model: dirty state beyond it is dropped, and both sizes become `new_size`.
    pub fn truncate(&mut self, new_size: u64) {
        let keep = new_size.div_ceil(PAGE);
        drop(self.pages.split_off(&keep));
        self.remove_zero_pages(keep, u64::MAX);
        // The partial last page: zero what lies beyond the new end.
        let tail = to_usize(new_size % PAGE);
        if tail > 0 {
            if let Some(page) = self.pages.get_mut(&(new_size / PAGE)) {
                page[tail..].fill(0);
            }
        }
        self.size = new_size;
        self.durable_size = new_size;
    }

    /// The backing file's size changed outside of a truncate (a plain fallocate that allocated
    /// past its end): record the new durable size.
    pub fn set_durable_size(&mut self, durable: u64) {
        self.durable_size = durable;
        self.size = self.size.max(durable);
    }

    /// Forgets every dirty page and the volatile size: the file is what the backing file holds.
    /// Returns the dropped bytes (whole pages).
    pub fn drop_all(&mut self) -> u64 {
        let bytes = self.dirty_bytes();
        self.pages.clear();
        self.zeros.clear();
        self.size = self.durable_size;
        bytes
    }

    /// Writes the dirty state to the backing file: first the size, then the zero runs (punched),
    /// then the data pages (coalesced `pwritev`s). The cache is clean afterwards. The caller
    /// fsyncs the backing file. On error the cache keeps its dirty state.
    pub fn flush(&mut self, backing: &File) -> io::Result<()> {
        if !self.is_dirty() {
            return Ok(());
        }
        if self.size != self.durable_size {
            backing.set_len(self.size)?;
        }
        for (&zs, &ze) in &self.zeros {
            let (s, e) = (zs * PAGE, (ze * PAGE).min(self.size));
            if s < e {
                zero_backing(backing, s, e - s)?;
            }
        }
        // Runs of consecutive pages, each written with as few pwritev calls as possible.
        let mut run: Vec<&[u8]> = Vec::new();
        let mut run_start = 0;
        let mut next = None;
        for (&p, page) in &self.pages {
            let ps = p * PAGE;
            if ps >= self.size {
                break;
            }
            if next != Some(p) {
                write_all_vectored_at(backing, &run, run_start)?;
                run.clear();
                run_start = ps;
            }
            run.push(&page[..to_usize((self.size - ps).min(PAGE))]);
            next = Some(p + 1);
        }
        write_all_vectored_at(backing, &run, run_start)?;
        self.pages.clear();
        self.zeros.clear();
        self.durable_size = self.size;
        Ok(())
    }

    // --------------------------------------------------------------------------------------------

    /// The dirty page `p`, created if needed: from its zero run, as zeros if it is about to be
    /// overwritten whole, else from the backing file (zeros past the backing file's end).
    fn page_mut(&mut self, backing: &File, p: u64, whole: bool) -> io::Result<&mut Page> {
        if !self.pages.contains_key(&p) {
            let page = if self.zero_run_contains(p) {
                self.remove_zero_pages(p, p + 1);
                zero_page()
            } else if whole {
                zero_page()
            } else {
                let mut page = zero_page();
                read_full_at(backing, &mut page[..], p * PAGE)?;
                page
            };
            self.pages.insert(p, page);
        }
        self.pages
            .get_mut(&p)
            .ok_or_else(|| io::Error::other("page vanished"))
    }

    /// Writes zeros over `[s, e)`, which lies within one page or two adjacent partial pages.
    fn write_zeros(&mut self, backing: &File, mut s: u64, e: u64) -> io::Result<()> {
        while s < e {
            let n = (e - s).min(PAGE - s % PAGE);
            self.write(backing, s, &ZERO_PAGE[..to_usize(n)])?;
            s += n;
        }
        Ok(())
    }

    fn zero_run_contains(&self, p: u64) -> bool {
        self.zeros
            .range(..=p)
            .next_back()
            .is_some_and(|(_, &e)| e > p)
    }

    /// Removes pages `[a, b)` from the zero runs (splitting runs that stick out).
    fn remove_zero_pages(&mut self, a: u64, b: u64) {
        let hit: Vec<(u64, u64)> = self
            .zeros
            .range(..b)
            .rev()
            .take_while(|(_, &e)| e > a)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in hit {
            self.zeros.remove(&s);
            if s < a {
                self.zeros.insert(s, a);
            }
            if e > b {
                self.zeros.insert(b, e);
            }
        }
    }

    /// Adds the zero run `[a, b)`, merging it with runs it overlaps or touches.
    fn insert_zero_run(&mut self, a: u64, b: u64) {
        let (mut s, mut e) = (a, b);
        let hit: Vec<(u64, u64)> = self
            .zeros
            .range(..=b)
            .rev()
            .take_while(|(_, &re)| re >= a)
            .map(|(&rs, &re)| (rs, re))
            .collect();
        for (rs, re) in hit {
            self.zeros.remove(&rs);
            s = s.min(rs);
            e = e.max(re);
        }
        self.zeros.insert(s, e);
    }
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// `pread`s until `buf` is full or the end of the file; what is past the end stays untouched.
pub fn read_full_at(file: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Writes all of `bufs` contiguously at `off` with `pwritev` (handles short writes).
fn write_all_vectored_at(file: &File, bufs: &[&[u8]], mut off: u64) -> io::Result<()> {
    let (mut idx, mut skip) = (0, 0);
    while idx < bufs.len() {
        let iov: Vec<IoSlice<'_>> = bufs[idx..]
            .iter()
            .take(IOV_MAX)
            .enumerate()
            .map(|(i, b)| IoSlice::new(if i == 0 { &b[skip..] } else { b }))
            .collect();
        let off_t = i64::try_from(off).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        let mut n = match nix::sys::uio::pwritev(file, &iov, off_t) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        off += n as u64;
        while n > 0 {
            let left = bufs[idx].len() - skip;
            if n >= left {
                n -= left;
                idx += 1;
                skip = 0;
            } else {
                skip += n;
                n = 0;
            }
        }
    }
    Ok(())
}

/// Zeroes a range of the backing file: punch a hole, else zero-range, else write zeros.
fn zero_backing(file: &File, off: u64, len: u64) -> io::Result<()> {
    let keep = FallocateFlags::FALLOC_FL_KEEP_SIZE;
    let (o, l) = match (i64::try_from(off), i64::try_from(len)) {
        (Ok(o), Ok(l)) => (o, l),
        _ => return Err(io::Error::from_raw_os_error(libc::EFBIG)),
    };
    for mode in [
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | keep,
        FallocateFlags::FALLOC_FL_ZERO_RANGE | keep,
    ] {
        match nix::fcntl::fallocate(file, mode, o, l) {
            Ok(()) => return Ok(()),
            Err(nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::ENOSYS) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut done = 0;
    while done < len {
        let n = (len - done).min(PAGE);
        file.write_all_at(&ZERO_PAGE[..to_usize(n)], off + done)?;
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backing(content: &[u8]) -> (tempfile::NamedTempFile, File) {
        let t = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(t.path(), content).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(t.path())
            .unwrap();
        (t, f)
    }

    fn disk(f: &File) -> Vec<u8> {
        let len = f.metadata().unwrap().len();
        let mut b = vec![0; len as usize];
        read_full_at(f, &mut b, 0).unwrap();
        b
    }

    #[test]
    fn write_read_merge_and_drop() {
        let base: Vec<u8> = (0..3 * PAGE).map(|i| (i % 251) as u8).collect();
        let (_t, f) = backing(&base);
        let mut c = FileCache::new(base.len() as u64);
        c.write(&f, 100, &[1; 5000]).unwrap();
        let mut want = base.clone();
        want[100..5100].fill(1);
        assert_eq!(c.read(&f, 0, 1 << 20).unwrap(), want);
        assert_eq!(c.read(&f, 4000, 200).unwrap(), want[4000..4200]);
        assert_eq!(
            disk(&f),
            base,
            "nothing reaches the backing file before a flush"
        );
        assert_eq!(c.dirty_pages(), 2);
        assert_eq!(c.drop_all(), 2 * PAGE);
        assert_eq!(c.read(&f, 0, 1 << 20).unwrap(), base);
    }

    #[test]
    fn extension_is_volatile_until_flush() {
        let (_t, f) = backing(b"hello");
        let mut c = FileCache::new(5);
        c.write(&f, 10_000, b"x").unwrap();
        assert_eq!(c.size(), 10_001);
        let r = c.read(&f, 0, 20_000).unwrap();
        assert_eq!(r.len(), 10_001);
        assert_eq!(&r[..5], b"hello");
        assert!(r[5..10_000].iter().all(|&b| b == 0));
        c.drop_all();
        assert_eq!(c.size(), 5);
        c.write(&f, 10_000, b"x").unwrap();
        c.flush(&f).unwrap();
        assert!(!c.is_dirty());
        let d = disk(&f);
        assert_eq!(d.len(), 10_001);
        assert_eq!(d[10_000], b'x');
    }

    #[test]
    fn zero_runs_split_merge_and_flush() {
        let base = vec![7u8; 64 * PAGE as usize];
        let (_t, f) = backing(&base);
        let mut c = FileCache::new(base.len() as u64);
        // A large zero range costs one run, no pages.
        c.zero(&f, 10, 60 * PAGE).unwrap();
        assert_eq!(c.pages.len(), 2, "only the partial head and tail pages");
        assert_eq!(c.zeros.len(), 1);
        // A write inside the run splits it.
        c.write(&f, 5 * PAGE + 1, b"abc").unwrap();
        assert_eq!(c.zeros.len(), 2);
        let r = c.read(&f, 0, u64::MAX).unwrap();
        let mut want = base.clone();
        want[10..(60 * PAGE + 10) as usize].fill(0);
        want[(5 * PAGE + 1) as usize..(5 * PAGE + 4) as usize].copy_from_slice(b"abc");
        assert_eq!(r, want);
        // Zeroing over the split point merges the runs again.
        c.zero(&f, 5 * PAGE, PAGE).unwrap();
        assert_eq!(c.zeros.len(), 1);
        want[(5 * PAGE) as usize..(6 * PAGE) as usize].fill(0);
        c.flush(&f).unwrap();
        assert_eq!(disk(&f), want);
    }

    #[test]
    fn truncate_drops_beyond_and_clears_tail() {
        let (_t, f) = backing(&[]);
        let mut c = FileCache::new(0);
        c.write(&f, 0, &[9; 3 * PAGE as usize]).unwrap();
        f.set_len(100).unwrap();
        c.truncate(100);
        assert_eq!(c.dirty_pages(), 1);
        f.set_len(PAGE).unwrap();
        c.truncate(PAGE);
        let r = c.read(&f, 0, u64::MAX).unwrap();
        assert_eq!(r.len(), PAGE as usize);
        assert!(r[..100].iter().all(|&b| b == 9));
        assert!(
            r[100..].iter().all(|&b| b == 0),
            "tail beyond the truncation reads zeros"
        );
        // The truncation is durable: a cut leaves the new size with the old (zero) content.
        c.drop_all();
        assert_eq!(c.size(), PAGE);
        assert!(c.read(&f, 0, u64::MAX).unwrap().iter().all(|&b| b == 0));
    }

    #[test]
    fn flush_coalesces_and_clips_last_page() {
        let (_t, f) = backing(&[]);
        let mut c = FileCache::new(0);
        for p in [0u64, 1, 2, 5, 6] {
            c.write(&f, p * PAGE, &[p as u8 + 1; PAGE as usize])
                .unwrap();
        }
        c.write(&f, 7 * PAGE, b"end").unwrap();
        c.flush(&f).unwrap();
        let d = disk(&f);
        assert_eq!(d.len() as u64, 7 * PAGE + 3);
        assert_eq!(d[(5 * PAGE) as usize], 6);
        assert!(d[(3 * PAGE) as usize..(5 * PAGE) as usize]
            .iter()
            .all(|&b| b == 0));
        assert_eq!(&d[(7 * PAGE) as usize..], b"end");
    }
}
