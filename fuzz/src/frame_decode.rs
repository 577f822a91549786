//! `frame::decode` on arbitrary bytes, and `frame::encode` on fuzzer-built frames.
//!
//! Properties:
//! - never a panic; `Ok(None)` only when the header or the payload is incomplete;
//! - a decoded frame: `frame_len` says `consumed`, the bytes after it change nothing, and it
//!   re-encodes (`frame::encode`) to bytes that decode to the same frame, the same sequence
//!   number, with `consumed` the encoding's length; encoding it again gives the same bytes;
//! - (first byte odd) a frame built from the input within the protocol's limits (data up to
//!   64 KiB) encodes to
//!   bytes that decode to exactly that frame (a Refuse reason truncated to `MAX_REASON` on a
//!   character boundary).

use arbitrary::{Result, Unstructured};
use mirror_proto::frame::{
    self, AckStatus, DiskState, Frame, NodeInfo, RefuseCode, Role, HEADER_LEN, MAX_DATA,
    MAX_HISTORY, MAX_HOT, MAX_REASON, NOISE_INIT_LEN, NOISE_REPLY_LEN,
};

pub fn run(data: &[u8]) {
    match data.split_first() {
        Some((m, rest)) if m & 1 == 1 => {
            let mut u = Unstructured::new(rest);
            let mut scratch = Vec::new();
            if let Ok((seq, f)) = build(&mut u, &mut scratch) {
                encoded_frame_decodes_to_itself(seq, &f);
            }
        }
        Some((_, rest)) => decode_bytes(rest),
        None => decode_bytes(data),
    }
}

fn decode_bytes(data: &[u8]) {
    let d = match frame::decode(data) {
        Ok(Some(d)) => d,
        Ok(None) => {
            // Incomplete: a header not all there, or a payload not all there.
            match frame::frame_len(data) {
                Ok(None) => assert!(data.len() < HEADER_LEN),
                Ok(Some(n)) => assert!(n > data.len(), "complete frame of {n} reported short"),
                Err(e) => panic!("decode wants more, frame_len says {e}"),
            }
            return;
        }
        Err(_) => return,
    };
    assert!(d.consumed >= HEADER_LEN && d.consumed <= data.len());
    assert_eq!(frame::frame_len(data), Ok(Some(d.consumed)));
    // The frame is its own bytes: nothing after it matters.
    assert_eq!(frame::decode(&data[..d.consumed]), Ok(Some(d.clone())));
    let mut out = Vec::new();
    frame::encode(d.seq, &d.frame, &mut out);
    let again = frame::decode(&out)
        .unwrap_or_else(|e| panic!("re-encoded {:?} does not decode: {e}", d.frame))
        .unwrap_or_else(|| panic!("re-encoded {:?} is incomplete", d.frame));
    assert_eq!(again.frame, d.frame);
    assert_eq!(again.seq, d.seq);
    assert_eq!(again.consumed, out.len());
    let mut out2 = Vec::new();
    frame::encode(again.seq, &again.frame, &mut out2);
    assert_eq!(out, out2, "encoding is not stable");
    // Header fields other than the flags (which encode only keeps the known bits of) and the
    // checksum are the input's.
    assert_eq!(out[..6], data[..6]);
    assert_eq!(out[8..20], data[8..20]);
}

fn encoded_frame_decodes_to_itself(seq: u64, f: &Frame<'_>) {
    let mut out = vec![0xEE; 3];
    frame::encode(seq, f, &mut out);
    let d = frame::decode(&out[3..])
        .unwrap_or_else(|e| panic!("{f:?} encodes to an invalid frame: {e}"))
        .unwrap_or_else(|| panic!("{f:?} encodes to an incomplete frame"));
    assert_eq!(d.seq, seq);
    assert_eq!(d.consumed, out.len() - 3);
    match (f, &d.frame) {
        (
            Frame::Refuse { code, reason },
            Frame::Refuse {
                code: c2,
                reason: r2,
            },
        ) => {
            assert_eq!(code, c2);
            assert!(r2.len() <= MAX_REASON);
            assert!(reason.starts_with(r2));
            assert!(reason.len() <= MAX_REASON || r2.len() + 4 > MAX_REASON);
            if reason.len() <= MAX_REASON {
                assert_eq!(reason, r2);
            }
        }
        (f, g) => assert_eq!(f, g),
    }
}

fn node(u: &mut Unstructured<'_>) -> Result<NodeInfo> {
    let nh = u.int_in_range(0..=MAX_HISTORY)?;
    let nx = u.int_in_range(0..=MAX_HOT.min(32))?;
    Ok(NodeInfo {
        node_id: u.arbitrary()?,
        size: u.arbitrary()?,
        role: if u.arbitrary()? {
            Role::Primary
        } else {
            Role::Secondary
        },
        disk_state: *u.choose(&[
            DiskState::UpToDate,
            DiskState::Inconsistent,
            DiskState::Outdated,
        ])?,
        generation: u.arbitrary()?,
        bitmap_generation: u.arbitrary()?,
        history: (0..nh).map(|_| u.arbitrary()).collect::<Result<_>>()?,
        flags: u.arbitrary()?,
        hot: (0..nx).map(|_| u.arbitrary()).collect::<Result<_>>()?,
    })
}

/// A frame within the protocol's limits (data of at most `MAX_DATA` bytes, which may be
/// repeated input to reach large sizes).
fn build<'a>(u: &mut Unstructured<'a>, scratch: &'a mut Vec<u8>) -> Result<(u64, Frame<'a>)> {
    let seq = u.arbitrary()?;
    let kind = u.int_in_range(0u8..=16)?;
    let f = match kind {
        0 => {
            let mut msg = [0u8; NOISE_INIT_LEN];
            u.fill_buffer(&mut msg)?;
            Frame::NoiseInit { msg }
        }
        1 => {
            let mut msg = [0u8; NOISE_REPLY_LEN];
            u.fill_buffer(&mut msg)?;
            Frame::NoiseReply { msg }
        }
        2 => Frame::Refuse {
            code: *u.choose(&[
                RefuseCode::AuthFailed,
                RefuseCode::SizeMismatch,
                RefuseCode::Busy,
                RefuseCode::SplitBrain,
                RefuseCode::Fenced,
                RefuseCode::Protocol,
                RefuseCode::Other,
            ])?,
            reason: u.arbitrary()?,
        },
        3 => Frame::Attach(node(u)?),
        4 => Frame::Attached(node(u)?),
        5 => Frame::SyncStart {
            full: u.arbitrary()?,
            bytes: u.arbitrary()?,
        },
        6 => Frame::SyncDone {
            generation: u.arbitrary()?,
        },
        7 | 8 => {
            let offset = u.arbitrary()?;
            let flag = u.arbitrary()?;
            // Sometimes larger than the input: its bytes repeated, up to 64 KiB (an
            // execution stays cheap; the MAX_DATA limit itself is a unit test's).
            let repeat = u.int_in_range(0u32..=7)?;
            let bytes: &'a [u8] = u.arbitrary()?;
            let data: &'a [u8] = if repeat == 7 && !bytes.is_empty() {
                let len = (usize::from(bytes[0]) << 8).min(MAX_DATA);
                // (`repeat`: a byte loop here would be instrumented, and slow.)
                *scratch = bytes.repeat(len / bytes.len() + 1);
                scratch.truncate(len);
                scratch.as_slice()
            } else {
                &bytes[..bytes.len().min(MAX_DATA)]
            };
            if kind == 7 {
                Frame::Write {
                    offset,
                    resync: flag,
                    data,
                }
            } else {
                Frame::ReadData { data }
            }
        }
        9 => Frame::Discard {
            offset: u.arbitrary()?,
            len: u.arbitrary()?,
        },
        10 => Frame::WriteZeroes {
            offset: u.arbitrary()?,
            len: u.arbitrary()?,
            unmap: u.arbitrary()?,
        },
        11 => Frame::Flush,
        12 => Frame::Read {
            offset: u.arbitrary()?,
            len: u.int_in_range(0..=MAX_DATA as u32)?,
        },
        13 => Frame::Ack {
            status: *u.choose(&[
                AckStatus::Ok,
                AckStatus::IoError,
                AckStatus::NoSpace,
                AckStatus::OutOfRange,
                AckStatus::Fenced,
            ])?,
        },
        14 => Frame::Ping {
            nanos: u.arbitrary()?,
        },
        15 => Frame::Pong {
            nanos: u.arbitrary()?,
        },
        _ => Frame::Goodbye,
    };
    Ok((seq, f))
}
