//! `conn::FrameReader` over a stream that returns the input in fuzzer-chosen chunks (with
//! `Interrupted` errors and read timeouts, after which the caller reads again, as the link's
//! receiver does).
//!
//! Properties:
//! - the reader yields the same frames (sequence numbers, contents) as `frame::decode` over
//!   the whole buffer at once, then the same end: an error of the same kind for garbage,
//!   `Closed` at the end of the stream (also inside a frame);
//! - no panic, and no single allocation beyond `HEADER_LEN + MAX_PAYLOAD` (whatever a header
//!   announces).

use arbitrary::Unstructured;
use mirror_proto::conn::{ConnError, FrameReader};
use mirror_proto::frame::{self, FrameError, HEADER_LEN, MAX_PAYLOAD};

use crate::{largest_allocation, Chunked};

/// Frames as the whole-buffer decoder sees them: (seq, encoding) each, then how it ends.
fn reference(stream: &[u8]) -> (Vec<(u64, Vec<u8>)>, Option<FrameError>) {
    let mut frames = Vec::new();
    let mut at = 0;
    loop {
        match frame::decode(&stream[at..]) {
            Ok(Some(d)) => {
                let mut enc = Vec::new();
                frame::encode(d.seq, &d.frame, &mut enc);
                frames.push((d.seq, enc));
                at += d.consumed;
            }
            Ok(None) => return (frames, None),
            Err(e) => return (frames, Some(e)),
        }
    }
}

pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let n = u.int_in_range(0..=8u8).unwrap_or(0);
    let chunks: Vec<u16> = (0..n).map(|_| u.arbitrary().unwrap_or(4096)).collect();
    let stream = crate::rest(&mut u);
    let (want, end) = reference(stream);
    let mut reader = FrameReader::new(Chunked::new(stream, chunks));
    let ((), largest) = largest_allocation(|| {
        let mut got = 0;
        let mut timeouts = 0;
        loop {
            match reader.read_frame() {
                Ok(d) => {
                    let (seq, enc) = want
                        .get(got)
                        .unwrap_or_else(|| panic!("reader found an extra frame {:?}", d.frame));
                    assert_eq!(d.seq, *seq);
                    let mut mine = Vec::new();
                    frame::encode(d.seq, &d.frame, &mut mine);
                    assert_eq!(&mine, enc, "frame {got} differs");
                    got += 1;
                }
                Err(e) if e.is_timeout() => {
                    timeouts += 1;
                    assert!(timeouts < 64, "timeouts forever");
                }
                Err(e) => {
                    assert_eq!(got, want.len(), "reader stopped early: {e}");
                    match (&e, &end) {
                        (ConnError::Closed, None) => {}
                        // A bad magic is seen on the bytes at hand: fewer than the whole
                        // buffer may show.
                        (
                            ConnError::Frame(FrameError::BadMagic(_)),
                            Some(FrameError::BadMagic(_)),
                        ) => {}
                        (ConnError::Frame(a), Some(b)) => assert_eq!(a, b),
                        (e, want) => panic!("reader ended with {e:?}, decode with {want:?}"),
                    }
                    break;
                }
            }
        }
    });
    assert!(
        largest <= HEADER_LEN + MAX_PAYLOAD,
        "an allocation of {largest} bytes"
    );
}
