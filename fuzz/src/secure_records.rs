//! The encrypted record layer (`secure::SecureReader` / `SecureWriter`) with the keys of a real
//! handshake (`secure::initiate` / `respond` over a socket pair, once per process).
//!
//! Properties:
//! - (first byte 0) arbitrary bytes read as records: never a panic, never a byte of plaintext
//!   (nobody without the keys makes a record that decrypts), only errors or a clean end, no
//!   single allocation beyond one record;
//! - (otherwise) plaintext written through a `SecureWriter` in fuzzer-chosen pieces (some
//!   larger than a record) reads back identical through a `SecureReader`, with fuzzer-chosen
//!   read sizes and stream chunks, then a clean end; and if the fuzzer damages the wire (flips
//!   a byte, cuts, drops, repeats or inserts bytes), what is read is a prefix of the plaintext
//!   no longer than the records before the damage, and the read ends with an error (or a clean
//!   end, for a cut between two records).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::OnceLock;

use arbitrary::{Result, Unstructured};
use mirror_proto::auth::Secret;
use mirror_proto::secure::{self, Keys, SecureReader, SecureWriter, MAX_RECORD, MAX_RECORD_PLAIN};

use crate::{largest_allocation, Chunked};

/// (primary's keys, replica's keys) of a real handshake.
fn handshake() -> (Keys, Keys) {
    let secret = || Secret::from_bytes(b"fuzzing secret, 32 bytes long...").expect("secret");
    let (mut a, mut b) = UnixStream::pair().expect("socket pair");
    let t = std::thread::spawn(move || secure::respond(&mut b, &secret()).expect("respond"));
    let p = secure::initiate(&mut a, &secret()).expect("initiate");
    (p, t.join().expect("responder thread"))
}

/// The session of the round trips (its records are compared, so libFuzzer sees them).
fn keys() -> &'static (Keys, Keys) {
    static KEYS: OnceLock<(Keys, Keys)> = OnceLock::new();
    KEYS.get_or_init(handshake)
}

/// A session nothing is ever encrypted in, for the garbage: libFuzzer's comparison hooks
/// see the round trips' ciphertext and offered it as "garbage", which then decrypted under
/// the same keys (a harness error at 6.5M executions; a real session's keys are fresh).
fn garbage_keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| handshake().1)
}

pub fn run(data: &[u8]) {
    let (primary, replica) = keys();
    let mut u = Unstructured::new(data);
    let mode: u8 = u.arbitrary().unwrap_or(0);
    let n = u.int_in_range(0..=6u8).unwrap_or(0);
    let chunks: Vec<u16> = (0..n).map(|_| u.arbitrary().unwrap_or(4096)).collect();
    let reads: Vec<u32> = (0..u.int_in_range(1..=6u8).unwrap_or(1))
        .map(|_| u.int_in_range(1..=70_000).unwrap_or(1))
        .collect();
    if mode == 0 {
        let wire = crate::rest(&mut u);
        let (got, _) = read_all(wire, chunks, &reads, garbage_keys().clone());
        assert!(
            got.is_empty(),
            "{} bytes of plaintext from garbage",
            got.len()
        );
        return;
    }
    let Ok((plain, pieces)) = plaintext(&mut u) else {
        return;
    };
    // Write.
    let mut wire = Vec::new();
    let mut w = SecureWriter::new(&mut wire, primary.clone());
    let mut at = 0;
    for &p in &pieces {
        let p = p.min(plain.len() - at);
        if p == 0 {
            continue;
        }
        w.write_all(&plain[at..at + p]).expect("write to a Vec");
        at += p;
    }
    if at < plain.len() {
        w.write_all(&plain[at..]).expect("write to a Vec");
    }
    drop(w);
    // Record boundaries on the wire, and the plaintext before each.
    let mut bounds = vec![(0usize, 0usize)];
    let (mut off, mut plain_at) = (0usize, 0usize);
    while off < wire.len() {
        let len = usize::from(u16::from_be_bytes([wire[off], wire[off + 1]]));
        off += 2 + len;
        plain_at += len - secure::TAG_LEN;
        bounds.push((off, plain_at));
    }
    assert_eq!(plain_at, plain.len());
    let damage: u8 = u.arbitrary().unwrap_or(0);
    let pos = if wire.is_empty() {
        0
    } else {
        u.int_in_range(0..=wire.len() - 1).unwrap_or(0)
    };
    let original = wire.clone();
    let damaged_at = match damage % 8 {
        1 if !wire.is_empty() => {
            wire[pos] ^= u.int_in_range(1..=255u8).unwrap_or(1);
            Some(pos)
        }
        2 => {
            wire.truncate(pos);
            Some(pos)
        }
        3 if !wire.is_empty() => {
            let n = u.int_in_range(1..=wire.len() - pos).unwrap_or(1);
            wire.drain(pos..pos + n);
            Some(pos)
        }
        4 if !wire.is_empty() => {
            let n = u.int_in_range(1..=wire.len() - pos).unwrap_or(1);
            let copy = wire[pos..pos + n].to_vec();
            wire.splice(pos..pos, copy);
            Some(pos)
        }
        5 => {
            let junk: &[u8] = u.arbitrary().unwrap_or(&[0]);
            let junk = if junk.is_empty() { &[0u8][..] } else { junk };
            wire.splice(pos..pos, junk.iter().copied());
            Some(pos)
        }
        _ => None,
    };
    let (got, end) = read_all(&wire, chunks, &reads, replica.clone());
    match damaged_at {
        None => {
            assert!(end.is_none(), "undamaged records failed: {end:?}");
            assert!(got == plain, "round trip differs");
        }
        Some(_) => {
            // Only records that end before the damage may be read; the damage starts at
            // the first byte that differs (a repeated piece may begin like the original).
            let p = first_difference(&wire, &original);
            let allowed = bounds
                .iter()
                .filter(|(o, _)| *o <= p)
                .map(|(_, pl)| *pl)
                .max()
                .unwrap_or(0);
            assert!(
                got.len() <= allowed,
                "read {} bytes past the damage (damage {} at {p}, records end at {bounds:?}, \
                 wire {} bytes, was {})",
                got.len() - allowed,
                damage % 8,
                wire.len(),
                original.len()
            );
            assert!(
                got == plain[..got.len()],
                "damaged records read as other data"
            );
            if end.is_none() {
                // A clean end: only for a cut (the wire a prefix of the records) on a record
                // boundary.
                assert!(original.starts_with(&wire), "damage accepted");
                assert!(
                    bounds.iter().any(|(o, _)| *o == wire.len()),
                    "cut record accepted"
                );
            }
        }
    }
}

/// The plaintext (sometimes large: the input repeated) and the sizes of the writes.
fn plaintext(u: &mut Unstructured<'_>) -> Result<(Vec<u8>, Vec<usize>)> {
    let n = u.int_in_range(0..=5u8)?;
    let pieces = (0..n)
        .map(|_| {
            Ok(match u.int_in_range(0..=3u8)? {
                0 => MAX_RECORD_PLAIN,
                1 => MAX_RECORD_PLAIN + 1,
                _ => usize::from(u.arbitrary::<u16>()?),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let big = u.int_in_range(0..=7u8)? == 7;
    let bytes: &[u8] = u.arbitrary()?;
    let plain = if big && !bytes.is_empty() {
        // Around one record's worth: one or two records.
        let len = MAX_RECORD_PLAIN - 128 + usize::from(bytes[0]);
        // (`repeat` copies in a few large pieces: a byte loop here would be instrumented.)
        let mut v = bytes.repeat(len / bytes.len() + 1);
        v.truncate(len);
        v
    } else {
        bytes.to_vec()
    };
    Ok((plain, pieces))
}

/// Reads everything with the given read sizes; returns the plaintext and the error that ended
/// it (None: a clean end). Timeouts are retried, as the link does.
fn read_all(
    wire: &[u8],
    chunks: Vec<u16>,
    reads: &[u32],
    keys: Keys,
) -> (Vec<u8>, Option<io::Error>) {
    let mut r = SecureReader::new(Chunked::new(wire, chunks), keys);
    let mut got = Vec::new();
    let mut buf = vec![0u8; 70_000];
    let (end, largest) = largest_allocation(|| {
        let mut i = 0;
        let mut timeouts = 0;
        loop {
            // The fuzzer's read sizes for 256 reads, then whole records (stays cheap).
            let want = if i < 256 {
                reads[i % reads.len()] as usize
            } else {
                buf.len()
            };
            i += 1;
            match r.read(&mut buf[..want]) {
                Ok(0) => return None,
                Ok(n) => {
                    assert!(n <= want);
                    got.extend_from_slice(&buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    timeouts += 1;
                    assert!(timeouts < 64);
                }
                Err(e) => return Some(e),
            }
        }
    });
    // `got` grows as it reads: not the reader's allocation.
    assert!(
        largest <= (got.capacity()).max(MAX_RECORD + 2),
        "an allocation of {largest} bytes"
    );
    (got, end)
}

/// The first index where `a` and `b` differ (or the shorter length), comparing 64 bytes at a
/// time (slice comparison is a `memcmp`, not an instrumented loop).
fn first_difference(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    let mut at = 0;
    while at + 64 <= n && a[at..at + 64] == b[at..at + 64] {
        at += 64;
    }
    while at < n && a[at] == b[at] {
        at += 1;
    }
    at
}
