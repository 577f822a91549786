//! The seed corpora (`corpus/<target>/`): valid frames and streams of them, metadata, bitmap and
//! activity-log files, control requests and status documents, a failover/failback history,
//! and for the structured targets inputs found by a short deterministic search. Written by
//! `cargo test --no-default-features -- --ignored write_seeds` (see `tests/corpus.rs`).

use std::collections::BTreeMap;

use mirror_proto::frame::{
    self, AckStatus, DiskState, Frame, NodeInfo, RefuseCode, Role, NODE_FLAG_DISCARD_MY_DATA,
};

/// (target, file name, bytes).
pub type Seed = (&'static str, String, Vec<u8>);

fn node(role: Role) -> NodeInfo {
    NodeInfo {
        node_id: 7,
        size: 1 << 30,
        role,
        disk_state: DiskState::UpToDate,
        generation: 0x6c0e_2d0f_3b1a_9e42,
        bitmap_generation: 5,
        history: vec![5, 4],
        flags: NODE_FLAG_DISCARD_MY_DATA,
        hot: vec![3, 9],
    }
}

fn frames() -> Vec<(&'static str, Vec<u8>)> {
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    let all: Vec<(&str, Frame<'_>)> = vec![
        ("noise_init", Frame::NoiseInit { msg: [1; 56] }),
        ("noise_reply", Frame::NoiseReply { msg: [2; 48] }),
        (
            "refuse",
            Frame::Refuse {
                code: RefuseCode::SplitBrain,
                reason: "split brain: both sides wrote",
            },
        ),
        ("attach", Frame::Attach(node(Role::Primary))),
        ("attached", Frame::Attached(node(Role::Secondary))),
        (
            "sync_start",
            Frame::SyncStart {
                full: true,
                bytes: 1 << 20,
            },
        ),
        ("sync_done", Frame::SyncDone { generation: 9 }),
        (
            "write",
            Frame::Write {
                offset: 4096,
                resync: true,
                data: &data,
            },
        ),
        (
            "discard",
            Frame::Discard {
                offset: 512,
                len: 1024,
            },
        ),
        (
            "write_zeroes",
            Frame::WriteZeroes {
                offset: 0,
                len: 65536,
                unmap: true,
            },
        ),
        ("flush", Frame::Flush),
        (
            "read",
            Frame::Read {
                offset: 8192,
                len: 4096,
            },
        ),
        ("read_data", Frame::ReadData { data: &data[..512] }),
        (
            "ack",
            Frame::Ack {
                status: AckStatus::NoSpace,
            },
        ),
        ("ping", Frame::Ping { nanos: 5 }),
        ("pong", Frame::Pong { nanos: 6 }),
        ("goodbye", Frame::Goodbye),
    ];
    all.into_iter()
        .enumerate()
        .map(|(i, (name, f))| {
            let mut b = Vec::new();
            frame::encode(i as u64 * 3 + 1, &f, &mut b);
            (name, b)
        })
        .collect()
}

/// A small deterministic generator for the searched seeds.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Events of `generation_decide`: (side B?, op, extra byte).
fn history(events: &[(bool, u8, Option<bool>)]) -> Vec<u8> {
    let mut b = Vec::new();
    for &(side, op, extra) in events {
        b.push(u8::from(side));
        b.push(op);
        if let Some(x) = extra {
            b.push(u8::from(x));
        }
    }
    b
}

pub fn all() -> Vec<Seed> {
    let mut out: Vec<Seed> = Vec::new();
    let frames = frames();
    // frame_decode: mode byte 0 (decode), then one frame.
    for (name, f) in &frames {
        let mut b = vec![0u8];
        b.extend_from_slice(f);
        out.push(("frame_decode", (*name).into(), b));
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for i in 0..4 {
        let mut b = vec![1u8];
        b.extend(rng.bytes(64 << i));
        out.push(("frame_decode", format!("built_{i}"), b));
    }
    // framed_reader: chunk count, chunk sizes, then a stream of every frame.
    let stream: Vec<u8> = frames.iter().flat_map(|(_, f)| f.clone()).collect();
    let mut b = vec![0u8];
    b.extend_from_slice(&stream);
    out.push(("framed_reader", "all_frames_whole".into(), b));
    let mut b = vec![3u8, 7, 0, 1, 0, 0, 16];
    b.extend_from_slice(&stream);
    out.push(("framed_reader", "all_frames_chunked".into(), b));
    let mut b = vec![1u8, 0, 2];
    b.extend_from_slice(&stream[..stream.len() - 5]);
    out.push(("framed_reader", "cut_stream".into(), b));
    // secure_records: garbage (mode 0) and round trips.
    out.push(("secure_records", "garbage".into(), {
        let mut b = vec![0u8, 0, 0];
        b.extend_from_slice(&stream[..200]);
        b
    }));
    for i in 0..6 {
        let mut b = vec![1 + i as u8];
        b.extend(rng.bytes(32 << i));
        out.push(("secure_records", format!("round_trip_{i}"), b));
    }
    // meta_parsers: metadata (0), bitmap (1: size, mode, damage parameters, bits), activity
    // log (3, raw 1).
    let meta = r#"{
  "format": 1,
  "node_id": 12345,
  "size": 1073741824,
  "role": "primary",
  "disk_state": "up-to-date",
  "generation": 7810512400331329090,
  "bitmap_generation": 5,
  "history": [5, 4, 3]
}
"#;
    let mut b = vec![0u8];
    b.extend_from_slice(meta.as_bytes());
    out.push(("meta_parsers", "meta".into(), b));
    for (name, mode) in [
        ("bitmap_valid", 1u8),
        ("bitmap_header", 2),
        ("bitmap_cut", 3),
    ] {
        let mut b = vec![1u8, 0, 100, 1, mode, 3, 9, 0, 20, 0];
        b.extend(rng.bytes(16));
        out.push(("meta_parsers", name.into(), b));
    }
    let mut al = Vec::new();
    for seq in 1..=3u64 {
        let mut block = vec![0u8; 4096];
        block[..8].copy_from_slice(b"VHMAL001");
        block[8..16].copy_from_slice(&seq.to_le_bytes());
        block[16..20].copy_from_slice(&2u32.to_le_bytes());
        block[20..28].copy_from_slice(&seq.to_le_bytes());
        block[28..36].copy_from_slice(&(seq + 10).to_le_bytes());
        let crc = crc32c(&block[..4092]);
        block[4092..].copy_from_slice(&crc.to_le_bytes());
        al.extend_from_slice(&block);
    }
    let mut b = vec![3u8, 1];
    b.extend_from_slice(&al);
    out.push(("meta_parsers", "activity_log".into(), b));
    for i in 0..3 {
        let mut b = vec![4u8, 0];
        b.extend(rng.bytes(64 << i));
        out.push(("meta_parsers", format!("activity_log_commits_{i}"), b));
    }
    // control_line: a request (mode 0, step, an empty reply document, the line), a status
    // document as JSON (mode 1), built documents (mode 2).
    for (name, line) in [
        ("status", &b"status\n"[..]),
        ("promote_force", b"promote force\n"),
        ("garbage", b"\x00\xffgarbage\r\n\x1b[2J"),
    ] {
        let mut b = vec![0u8, 7, 0];
        b.extend_from_slice(line);
        out.push(("control_line", name.into(), b));
    }
    let doc = r#"{"role":"primary","image":"/srv/vm/disk.raw","readonly":false,
"capacity_bytes":268435456,"disk_state":"up-to-date","generation":7810512400331329090,
"peer_generation":5,"peer_state":"refused","peer":"192.0.2.2:7800",
"peer_reason":"evil\u001b]0;pwned\u0007","out_of_sync_bytes":25165824,
"resync_done_bytes":12582912,"resyncing":true,"link_write_latency_us":95,
"bytes_sent":1288490188,"bytes_received":2202009,"num_queues":1,"queue_size":256,
"frontend_connected":true,"connections":1,"reads":1722,"writes":81,"flushes":40,
"discards":0,"write_zeroes":0,"bytes_read":25270681,"bytes_written":1677721,
"cache_hits":3,"cache_misses":4,"cache_bytes":4096,"cache_capacity_bytes":1048576,
"errors":0,"unsupported":0}"#;
    let mut b = vec![1u8];
    b.extend_from_slice(doc.as_bytes());
    out.push(("control_line", "status_document".into(), b));
    for i in 0..3 {
        let mut b = vec![2u8];
        b.extend(rng.bytes(64 << i));
        out.push(("control_line", format!("built_{i}"), b));
    }
    // generation_decide: ops 0 serve, 1 access-node (+discard), 2 stop, 3 attach, 4 write,
    // 5 resync done, 6 flush, 7 link fails, 8 replica write fails, 9 replica power loss,
    // 10 promote (+force), 11 delete metadata.
    let (a, bb) = (false, true);
    let failover = history(&[
        (a, 0, None),
        (bb, 1, Some(false)),
        (a, 3, None),
        (a, 5, None),
        (a, 4, None),
        (a, 6, None),
        (a, 2, None),
        (bb, 10, Some(false)),
        (bb, 0, None),
        (bb, 4, None),
        (a, 1, Some(false)),
        (bb, 3, None),
        (bb, 5, None),
        (bb, 4, None),
    ]);
    out.push(("generation_decide", "failover_failback".into(), failover));
    let split = history(&[
        (a, 0, None),
        (bb, 1, Some(false)),
        (a, 3, None),
        (a, 5, None),
        (a, 7, None),
        (a, 4, None),
        (bb, 10, Some(false)),
        (bb, 0, None),
        (bb, 4, None),
        (a, 2, None),
        (a, 1, Some(false)),
        (bb, 3, None),
        (a, 2, None),
        (a, 1, Some(true)),
        (bb, 3, None),
        (bb, 5, None),
    ]);
    out.push(("generation_decide", "split_brain_resolved".into(), split));
    for i in 0..3 {
        out.push((
            "generation_decide",
            format!("random_{i}"),
            rng.bytes(128 << i),
        ));
    }
    // virtio_request: inputs the parser accepts, one per request type, and some refusals,
    // from a short deterministic search.
    let mut found: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for t in 0..6u8 {
        for _ in 0..20_000 {
            let len = 32 + (rng.next() % 160) as usize;
            let mut b = rng.bytes(len);
            // Capacity 1 << 21, writable, request type t.
            (b[0], b[1], b[2]) = (4, 0, t);
            let o = crate::virtio_request::outcome(&b);
            let ok = o.starts_with("Ok_");
            found.entry(o).or_insert(b);
            if ok {
                break;
            }
        }
    }
    for (o, b) in found {
        out.push(("virtio_request", o, b));
    }
    // And one accepted request of each type, encoded by hand (the search rarely finds them).
    const R: u8 = 0;
    const W: u8 = 2; // VRING_DESC_F_WRITE
    let header = (0, 1, R); // DATA, 16 bytes
    let status = (6, 2, W); // 0x2_0000, 1 byte
    let data = |f| (3, 3, f); // 0x8000, 512 bytes
    let segment = (1, 1, R); // DATA + 16, 16 bytes
    for (name, t, segs, descs) in [
        ("accepted_in", 0u8, &[][..], &[header, data(W), status][..]),
        ("accepted_out", 1, &[], &[header, data(R), status]),
        ("accepted_flush", 2, &[], &[header, status]),
        ("accepted_get_id", 3, &[], &[header, data(W), status]),
        (
            "accepted_discard",
            4,
            &[(8u8, 8u16, 0u8)],
            &[header, segment, status],
        ),
        (
            "accepted_write_zeroes",
            5,
            &[(8, 8, 1)],
            &[header, segment, status],
        ),
    ] {
        let b = virtio(t, 3, segs, descs);
        let o = crate::virtio_request::outcome(&b);
        assert!(o.starts_with("Ok_"), "{name}: {o}");
        out.push(("virtio_request", name.into(), b));
    }
    out
}

/// An input of `virtio_request` (in the order its `one` reads it) for capacity 1 << 21,
/// writable, request type `t` (index in its list) at sector `sector`, discard segments
/// (sector, sectors, flags), and a well-formed chain of descriptors (index in `BASES`, length
/// code 1 = 16 / 2 = 1 / 3 = 512 bytes, flags).
fn virtio(t: u8, sector: u8, segs: &[(u8, u16, u8)], descs: &[(u8, u8, u8)]) -> Vec<u8> {
    let mut b = vec![4, 0, t, 2, sector, 0, 0, 0, 0, segs.len() as u8];
    for &(s, n, f) in segs {
        b.extend([1, s]);
        b.extend(n.to_be_bytes());
        b.push(f);
    }
    // No indirect table, then the chain's length.
    b.extend([0, descs.len() as u8 - 1]);
    for &(base, len, flags) in descs {
        b.extend([1, base, len]);
        if len == 3 {
            b.push(0); // 512 x 1
        }
        // Flags, no extra flags, next index 0 (rewritten: well-formed).
        b.extend([flags, 1, 0]);
    }
    // Well-formed; then the length of the extra bytes, which is read from the end: none.
    b.extend([1, 0]);
    b
}

fn crc32c(b: &[u8]) -> u32 {
    // Bitwise CRC32C (Castagnoli), enough for three seed blocks.
    let mut crc = !0u32;
    for &x in b {
        crc ^= u32::from(x);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
