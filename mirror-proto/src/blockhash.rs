//! Per-block hashes, for a resync that sends only the blocks that differ: BLAKE3 of each
//! 4 KiB block, truncated to 128 bits (a guest cannot craft two blocks that compare equal).

/// The unit a hash covers (the image's last block may be shorter).
pub const HASH_BLOCK: usize = 4096;
/// Bytes of one block's hash.
pub const HASH_LEN: usize = 16;
/// Most bytes one ReadHashes request covers (its answer: 1024 hashes, 16 KiB).
pub const MAX_HASH_SPAN: usize = 4 << 20;

/// Appends the hash of each [`HASH_BLOCK`] of `data` (the last one may be shorter) to `out`.
pub fn hash_blocks(data: &[u8], out: &mut Vec<u8>) {
    out.reserve(data.len().div_ceil(HASH_BLOCK) * HASH_LEN);
    for b in data.chunks(HASH_BLOCK) {
        out.extend_from_slice(&blake3::hash(b).as_bytes()[..HASH_LEN]);
    }
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
    /// `cargo test --release -p mirror-proto blockhash::speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn hash_speed() {
        let data: Vec<u8> = (0..(64u32 << 20))
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let mut out = Vec::new();
        let t = std::time::Instant::now();
        for _ in 0..4 {
            out.clear();
            super::hash_blocks(&data, &mut out);
        }
        let s = t.elapsed().as_secs_f64();
        println!("blake3 per 4 KiB block: {:.0} MiB/s", 256.0 / s);
        let t = std::time::Instant::now();
        for _ in 0..4 {
            let _ = blake3::hash(&data);
        }
        println!(
            "blake3 one 64 MiB input: {:.0} MiB/s",
            256.0 / t.elapsed().as_secs_f64()
        );
    }
}
