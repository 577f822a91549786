//! The fuzz targets' bodies: each `fuzz_targets/NAME.rs` calls `NAME::run(data)`, and so does
//! `tests/corpus.rs`, which replays the committed corpora (`corpus/NAME/`) without libFuzzer.
//! Every target checks a property, not only "no panic"; a failed property panics (a crash for
//! libFuzzer, with the input saved under `artifacts/NAME/`).

pub mod control_line;
pub mod frame_decode;
pub mod framed_reader;
pub mod generation_decide;
pub mod meta_parsers;
pub mod secure_records;
pub mod seeds;
pub mod virtio_request;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The system allocator, recording the largest single allocation a thread makes while it is
/// watching (see [`largest_allocation`]): "no allocation beyond N" as a property.
struct Watching;

thread_local! {
    static WATCH: Cell<(bool, usize)> = const { Cell::new((false, 0)) };
}

fn note(size: usize) {
    // `try_with`: allocations during thread teardown find no thread-local any more.
    let _ = WATCH.try_with(|w| {
        let (on, max) = w.get();
        if on && size > max {
            w.set((on, size));
        }
    });
}

// SAFETY: every call is forwarded unchanged to `System`; `note` only reads and writes a
// thread-local `Cell` and never allocates.
unsafe impl GlobalAlloc for Watching {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract for `alloc` is passed on as it is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as for `alloc`.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: as for `alloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Watching = Watching;

/// Runs `f` and returns its result with the largest single allocation it made (on this
/// thread).
pub fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    WATCH.with(|w| w.set((true, 0)));
    let r = f();
    let (_, max) = WATCH.with(|w| w.replace((false, 0)));
    (r, max)
}

/// A reader over `data` that hands it out in the chunk sizes of `chunks` (cycled, for the first
/// 256 reads); a chunk of
/// 0 is an `Interrupted` error and one of 1 a `WouldBlock` (a read timeout), both of which the
/// code under test must survive (the link retries after a timeout).
pub struct Chunked<'a> {
    pub data: &'a [u8],
    pub at: usize,
    pub chunks: Vec<u16>,
    pub next: usize,
    /// How many `WouldBlock` errors were returned (the caller retries them).
    pub timeouts: usize,
}

impl<'a> Chunked<'a> {
    pub fn new(data: &'a [u8], chunks: Vec<u16>) -> Self {
        Chunked {
            data,
            at: 0,
            chunks,
            next: 0,
            timeouts: 0,
        }
    }
}

impl std::io::Read for Chunked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // Chunked for the first 256 reads (partial records and frames), whole after that (an
        // execution stays cheap).
        let c = if self.chunks.is_empty() || self.next >= 256 {
            usize::MAX
        } else {
            let c = self.chunks[self.next % self.chunks.len()];
            self.next += 1;
            usize::from(c)
        };
        match c {
            // At most a few errors per input, so that every input ends.
            0 if self.next < 64 => return Err(std::io::ErrorKind::Interrupted.into()),
            1 if self.next < 64 => {
                self.timeouts += 1;
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            _ => {}
        }
        let n = buf.len().min(c.max(1)).min(self.data.len() - self.at);
        buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// The bytes `u` has left (`Unstructured::take_rest` through a `&mut`).
pub fn rest<'a>(u: &mut arbitrary::Unstructured<'a>) -> &'a [u8] {
    let n = u.len();
    u.bytes(n).unwrap_or(&[])
}
