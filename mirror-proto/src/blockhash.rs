//! Per-block hashes, for a resync that sends only the blocks that differ: BLAKE3 of each
//! 4 KiB block, truncated to 128 bits (a guest cannot craft two blocks that compare equal).

/// The unit a hash covers (the image's last block may be shorter).
pub const HASH_BLOCK: usize = 4096;
/// Bytes of one block's hash.
pub const HASH_LEN: usize = 16;
/// Most bytes one ReadHashes request covers (its answer: 1024 hashes, 16 KiB).
pub const MAX_HASH_SPAN: usize = 4 << 20;

/// Appends the hash of each [`HASH_BLOCK`] of `data` (the last one may be shorter) to `out`.
///
/// The hash of every block is `blake3::hash` of it, computed for [`BATCH`] whole blocks at a
/// time through BLAKE3's SIMD hashing of many inputs (`blake3::platform`): one 4 KiB block is
/// only 4 chunks, so `blake3::hash` of it fills 4 lanes (SSE4.1) where AVX2 has 8, and
/// compresses its 3 parent nodes one at a time. Here the chunks of a batch are hashed 8 (or
/// 16) at a time, level by level (the first chunks of every block, then the second ones, ...;
/// then every block's two parents; then every root). Tested equal to `blake3::hash`; about
/// 1.45x as fast per CPU second as `blake3::hash` of each block on this project's AVX2 test
/// machine. `blake3::platform` is the crate's unstable interface for benchmarks, hence the
/// pinned minor version (Cargo.toml) and the test against `blake3::hash`.
pub fn hash_blocks(data: &[u8], out: &mut Vec<u8>) {
    out.reserve(data.len().div_ceil(HASH_BLOCK) * HASH_LEN);
    let whole = data.len() / HASH_BLOCK * HASH_BLOCK;
    let platform = blake3::platform::Platform::detect();
    for batch in data[..whole].chunks(BATCH * HASH_BLOCK) {
        if hash_batch(platform, batch, out).is_none() {
            hash_blocks_one_by_one(batch, out);
        }
    }
    if whole < data.len() {
        out.extend_from_slice(&blake3::hash(&data[whole..]).as_bytes()[..HASH_LEN]);
    }
}

/// The reference: `blake3::hash` of each block, one at a time (tests and the speed probe).
pub fn hash_blocks_one_by_one(data: &[u8], out: &mut Vec<u8>) {
    out.reserve(data.len().div_ceil(HASH_BLOCK) * HASH_LEN);
    for b in data.chunks(HASH_BLOCK) {
        out.extend_from_slice(&blake3::hash(b).as_bytes()[..HASH_LEN]);
    }
}

/// Blocks hashed together by [`hash_blocks`].
const BATCH: usize = 16;
/// BLAKE3's chunk: the tree's leaves.
const CHUNK: usize = blake3::CHUNK_LEN;
const CHUNKS: usize = HASH_BLOCK / CHUNK;
/// A chaining value.
const CV: usize = blake3::OUT_LEN;
/// BLAKE3's IV (the SHA-256 one) and domain flags (the BLAKE3 paper, section 2.1; private in
/// the crate).
const IV: [u32; 8] = [
    0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19,
];
const CHUNK_START: u8 = 1 << 0;
const CHUNK_END: u8 = 1 << 1;
const PARENT: u8 = 1 << 2;
const ROOT: u8 = 1 << 3;
const _: () = assert!(CHUNKS == 4 && CV == 32 && blake3::BLOCK_LEN == 2 * CV);

/// Appends the hashes of the whole blocks of `batch` (at most [`BATCH`]). A 4-chunk input's
/// tree: root = parent(parent(c0, c1), parent(c2, c3)), chunk i with counter i. None (and
/// nothing appended) only if a slice were not of the length it is built with.
fn hash_batch(platform: blake3::platform::Platform, batch: &[u8], out: &mut Vec<u8>) -> Option<()> {
    use blake3::IncrementCounter::No;
    const NODE: usize = blake3::BLOCK_LEN;
    let n = batch.len() / HASH_BLOCK;
    if n > BATCH || n * HASH_BLOCK != batch.len() {
        return None;
    }
    // Per block: its 4 chunk CVs in order (the inputs of its two parent nodes), then its 2
    // parent CVs (the root's input).
    let mut chunk_cvs = [0u8; BATCH * CHUNKS * CV];
    let mut parent_cvs = [0u8; BATCH * 2 * CV];
    let mut roots = [0u8; BATCH * CV];
    let mut cvs = [0u8; BATCH * CV];
    let (empty, node) = ([0u8; CHUNK], [0u8; NODE]);
    for c in 0..CHUNKS {
        let mut inputs: [&[u8; CHUNK]; BATCH] = [&empty; BATCH];
        for (b, input) in inputs.iter_mut().take(n).enumerate() {
            let at = b * HASH_BLOCK + c * CHUNK;
            *input = batch.get(at..at + CHUNK)?.try_into().ok()?;
        }
        platform.hash_many(
            &inputs[..n],
            &IV,
            c as u64,
            No,
            0,
            CHUNK_START,
            CHUNK_END,
            &mut cvs[..n * CV],
        );
        for b in 0..n {
            let to = (b * CHUNKS + c) * CV;
            chunk_cvs[to..to + CV].copy_from_slice(&cvs[b * CV..(b + 1) * CV]);
        }
    }
    let mut parents: [&[u8; NODE]; 2 * BATCH] = [&node; 2 * BATCH];
    for (p, input) in parents.iter_mut().take(2 * n).enumerate() {
        *input = chunk_cvs.get(p * NODE..(p + 1) * NODE)?.try_into().ok()?;
    }
    platform.hash_many(
        &parents[..2 * n],
        &IV,
        0,
        No,
        PARENT,
        0,
        0,
        &mut parent_cvs[..2 * n * CV],
    );
    let mut tops: [&[u8; NODE]; BATCH] = [&node; BATCH];
    for (b, input) in tops.iter_mut().take(n).enumerate() {
        *input = parent_cvs.get(b * NODE..(b + 1) * NODE)?.try_into().ok()?;
    }
    platform.hash_many(
        &tops[..n],
        &IV,
        0,
        No,
        PARENT | ROOT,
        0,
        0,
        &mut roots[..n * CV],
    );
    for r in roots[..n * CV].chunks_exact(CV) {
        out.extend_from_slice(&r[..HASH_LEN]);
    }
    Some(())
}

/// How many hashes a span of `len` bytes has.
pub fn blocks_in(len: usize) -> usize {
    len.div_ceil(HASH_BLOCK)
}

/// The runs of blocks whose hashes differ between `a` and `b` (hash lists of one span of
/// `span_len` bytes), as (byte offset in the span, byte length), adjacent blocks merged.
/// Lists of different lengths are a caller's error: every block counts as different.
pub fn differing_runs(a: &[u8], b: &[u8], span_len: usize) -> Vec<(usize, usize)> {
    let n = blocks_in(span_len);
    if a.len() != n * HASH_LEN || b.len() != n * HASH_LEN {
        return if span_len == 0 {
            Vec::new()
        } else {
            vec![(0, span_len)]
        };
    }
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, (x, y)) in a.chunks(HASH_LEN).zip(b.chunks(HASH_LEN)).enumerate() {
        if x == y {
            continue;
        }
        let start = i * HASH_BLOCK;
        let len = HASH_BLOCK.min(span_len - start);
        match runs.last_mut() {
            Some(r) if r.0 + r.1 == start => r.1 += len,
            _ => runs.push((start, len)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_spans_have_no_runs_and_changed_blocks_are_found_merged() {
        let mut a = vec![7u8; 10 * HASH_BLOCK + 100];
        let mut ha = Vec::new();
        hash_blocks(&a, &mut ha);
        assert_eq!(ha.len(), 11 * HASH_LEN);
        assert!(differing_runs(&ha, &ha, a.len()).is_empty());
        a[HASH_BLOCK + 5] ^= 1; // block 1
        a[2 * HASH_BLOCK] ^= 1; // block 2
        a[7 * HASH_BLOCK + 4095] ^= 1; // block 7
        a[10 * HASH_BLOCK + 99] ^= 1; // the short last block
        let mut hb = Vec::new();
        hash_blocks(&a, &mut hb);
        assert_eq!(
            differing_runs(&ha, &hb, a.len()),
            vec![
                (HASH_BLOCK, 2 * HASH_BLOCK),
                (7 * HASH_BLOCK, HASH_BLOCK),
                (10 * HASH_BLOCK, 100)
            ]
        );
    }

    #[test]
    fn batched_hashes_are_blake3_of_each_block() {
        // Every batch size and position, whole and short last blocks, varied bytes.
        let data: Vec<u8> = (0..(70 * HASH_BLOCK as u32 + 777))
            .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
            .collect();
        let lens = (0..=40)
            .map(|b| b * HASH_BLOCK)
            .chain([1, 100, HASH_BLOCK - 1, HASH_BLOCK + 1, 17 * HASH_BLOCK + 5])
            .chain([data.len() - 777, data.len()]);
        for len in lens {
            for start in [0, HASH_BLOCK, 3] {
                let Some(d) = data.get(start..start + len) else {
                    continue;
                };
                let (mut fast, mut reference) = (Vec::new(), Vec::new());
                hash_blocks(d, &mut fast);
                hash_blocks_one_by_one(d, &mut reference);
                assert_eq!(fast, reference, "{len} bytes at {start}");
                assert_eq!(fast.len(), blocks_in(len) * HASH_LEN);
            }
        }
        // Appends: what was in `out` stays.
        let mut out = vec![1, 2, 3];
        hash_blocks(&data[..2 * HASH_BLOCK], &mut out);
        assert_eq!(&out[..3], &[1, 2, 3]);
        assert_eq!(
            &out[3..3 + HASH_LEN],
            &blake3::hash(&data[..HASH_BLOCK]).as_bytes()[..HASH_LEN]
        );
    }

    #[test]
    fn batched_hashes_are_blake3_of_each_block_on_every_simd_path() {
        // `hash_blocks` uses the detected platform; a CPU without AVX2 (or without any SIMD)
        // takes another path through `hash_many`: each one this CPU has, the portable one
        // always, against `blake3::hash`.
        use blake3::platform::Platform;
        let mut platforms = vec![Platform::portable(), Platform::detect()];
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        platforms.extend(
            [Platform::sse2(), Platform::sse41(), Platform::avx2()]
                .into_iter()
                .flatten(),
        );
        let data: Vec<u8> = (0..(BATCH * HASH_BLOCK) as u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
            .collect();
        for p in platforms {
            for n in 0..=BATCH {
                let batch = &data[..n * HASH_BLOCK];
                let (mut fast, mut reference) = (Vec::new(), Vec::new());
                assert!(hash_batch(p, batch, &mut fast).is_some(), "{p:?} {n}");
                hash_blocks_one_by_one(batch, &mut reference);
                assert_eq!(fast, reference, "{p:?}, {n} blocks");
            }
        }
    }

    #[test]
    fn a_list_of_the_wrong_length_makes_everything_differ() {
        let mut h = Vec::new();
        hash_blocks(&[0u8; 3 * HASH_BLOCK], &mut h);
        assert_eq!(
            differing_runs(&h, &h[..HASH_LEN], 3 * HASH_BLOCK),
            vec![(0, 3 * HASH_BLOCK)]
        );
        assert!(differing_runs(&[], &[], 0).is_empty());
    }
}

#[cfg(test)]
mod speed {
    /// This thread's CPU time (wall time is the other workers' too on a shared machine).
    fn cpu_secs() -> f64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec, which lives on this stack frame.
        let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        assert_eq!(r, 0, "clock_gettime");
        ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
    }

    /// MiB per second of wall and of CPU time that `f` hashes 256 MiB at.
    fn speed(f: impl Fn()) -> (f64, f64) {
        let (t, c) = (std::time::Instant::now(), cpu_secs());
        for _ in 0..4 {
            f();
        }
        (256.0 / t.elapsed().as_secs_f64(), 256.0 / (cpu_secs() - c))
    }

    /// `cargo test --release -p mirror-proto blockhash::speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn hash_speed() {
        let data: Vec<u8> = (0..(64u32 << 20))
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        println!("platform: {:?}", blake3::platform::Platform::detect());
        let out = std::cell::RefCell::new(Vec::new());
        for round in 0..3 {
            let (w, c) = speed(|| {
                let mut o = out.borrow_mut();
                o.clear();
                super::hash_blocks_one_by_one(&data, &mut o);
            });
            println!("{round}: blake3::hash per 4 KiB block: {w:.0} MiB/s ({c:.0} per CPU second)");
            let (w, c) = speed(|| {
                let mut o = out.borrow_mut();
                o.clear();
                super::hash_blocks(&data, &mut o);
            });
            println!("{round}: hash_blocks (batched):      {w:.0} MiB/s ({c:.0} per CPU second)");
        }
        let (w, c) = speed(|| {
            let _ = blake3::hash(&data);
        });
        println!("blake3 one 64 MiB input: {w:.0} MiB/s ({c:.0} per CPU second)");
    }
}
