//! The virtio-blk request parser (`vhost_mirror::request::Request::parse`) on descriptor
//! chains the fuzzer builds in virtio-queue's mock split queue: addresses (inside, across and
//! outside two guest memory regions with a hole between them), lengths, flags (NEXT, WRITE,
//! INDIRECT, others), next indices, an indirect table, the request header (type, sector),
//! discard segments and the rest of guest memory; capacity and read-only also chosen.
//!
//! Properties of an accepted request:
//! - every data buffer and the status byte lie inside guest memory (device-writable ones
//!   writable), no data buffer is empty, their lengths add up to `data_len`;
//! - the type and sector are those of the first 16 device-readable bytes of the chain;
//! - IN/OUT: `data_len` a multiple of 512, the sector range inside the disk; FLUSH carries no
//!   data; DISCARD/WRITE_ZEROES: 1..=MAX_DISCARD_SEG segments of 16 bytes, each at most
//!   MAX_DISCARD_SECTORS and inside the disk, unmap only for WRITE_ZEROES;
//! - nothing that writes on a read-only disk; at most one data buffer per descriptor.
//!
//! A refused one: a status byte, if reported, is writable guest memory; the status to report
//! is IOERR or UNSUPP.

use std::cell::RefCell;

use arbitrary::{Result, Unstructured};
use vhost_mirror::blk_config::{MAX_DISCARD_SECTORS, MAX_DISCARD_SEG};
use vhost_mirror::request::{Request, RequestType};

/// The device's SEG_MAX x SIZE_MAX for a 256-entry queue.
const MAX_DATA: u64 = 254 << 20;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

const QUEUE_SIZE: u16 = 16;
/// Guest memory: two regions with a hole between them.
const REGIONS: [(u64, usize); 2] = [(0, 0x1_0000), (0x2_0000, 0x8000)];
/// Where the fuzzer's header, segments and other bytes go.
const DATA: u64 = 0x1000;
/// Where a fuzzer-built indirect table goes.
const TABLE: u64 = 0x4000;
/// Guest memory below this is all an execution writes (the queue, DATA + 0x500, the table).
const DIRTY: usize = 0x4100;
/// Interesting addresses for descriptors: the data, the table, region edges, the hole,
/// past the end.
const BASES: [u64; 10] = [
    DATA,
    DATA + 16,
    TABLE,
    0x8000,
    0xfe00,
    0x1_0000,
    0x2_0000,
    0x2_7e00,
    0x2_8000,
    0xffff_ffff_ffff_fe00,
];

thread_local! {
    static STATE: RefCell<Option<(GuestMemoryMmap, Request)>> = const { RefCell::new(None) };
}

pub fn run(data: &[u8]) {
    run_one(data);
}

fn run_one(data: &[u8]) -> String {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        let (mem, req) = s.get_or_insert_with(|| {
            let ranges: Vec<(GuestAddress, usize)> =
                REGIONS.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
            (
                GuestMemoryMmap::from_ranges(&ranges).expect("guest memory"),
                Request::default(),
            )
        });
        // Zero what an execution writes: the queue at 0, the request at DATA, the table at
        // TABLE (all below DIRTY).
        static ZEROS: [u8; DIRTY] = [0; DIRTY];
        mem.write_slice(&ZEROS, GuestAddress(0))
            .expect("zero guest memory");
        one(&mut Unstructured::new(data), mem, req).unwrap_or_else(|_| "short".into())
    })
}

/// What became of the input: `Ok_<type>`, `Err_<error>` or `short` (for the seed search).
pub fn outcome(data: &[u8]) -> String {
    run_one(data)
}

fn desc(u: &mut Unstructured<'_>, n: u16) -> Result<RawDescriptor> {
    let addr = match u.int_in_range(0..=3u8)? {
        0 => u.arbitrary()?,
        1 => *u.choose(&BASES)?,
        _ => u
            .choose(&BASES)?
            .wrapping_add(u64::from(u.int_in_range(0..=0x300u16)?)),
    };
    let len = match u.int_in_range(0..=5u8)? {
        0 => u.arbitrary()?,
        1 => 16,
        2 => 1,
        3 => 512 * u32::from(u.int_in_range(1..=8u8)?),
        _ => u32::from(u.int_in_range(0..=0x400u16)?),
    };
    let mut flags = u16::from(u.int_in_range(0..=7u8)?); // NEXT, WRITE, INDIRECT
    if u.ratio(1, 16)? {
        flags |= u.arbitrary::<u16>()?;
    }
    let next = u.int_in_range(0..=n + 2)?;
    // An indirect table of at most 64 entries: a `next` loop inside a larger one runs until
    // the table's length (thousands of descriptors), which makes executions slow and adds
    // nothing.
    let len = if flags & VRING_DESC_F_INDIRECT as u16 != 0 {
        len % (64 * 16 + 1)
    } else {
        len
    };
    Ok(RawDescriptor::from(Descriptor::new(addr, len, flags, next)))
}

fn one(u: &mut Unstructured<'_>, mem: &GuestMemoryMmap, req: &mut Request) -> Result<String> {
    // Any capacity: `parse` checks that the end's byte offset fits (a capacity over
    // u64::MAX / 512 made `sector * 512` overflow before; `regressions/virtio_request/`).
    let capacity: u64 = match u.int_in_range(0..=4u8)? {
        0 => u.arbitrary()?,
        1 => 0,
        2 => 1024,
        3 => u64::MAX / 512,
        _ => 1 << 21,
    };
    let readonly: bool = u.arbitrary()?;
    // The request header and what follows it (segments, data), at DATA.
    let mut bytes = Vec::new();
    let t = match u.int_in_range(0..=7u8)? {
        0 => VIRTIO_BLK_T_IN,
        1 => VIRTIO_BLK_T_OUT,
        2 => VIRTIO_BLK_T_FLUSH,
        3 => VIRTIO_BLK_T_GET_ID,
        4 => VIRTIO_BLK_T_DISCARD,
        5 => VIRTIO_BLK_T_WRITE_ZEROES,
        _ => u.arbitrary()?,
    };
    let sector: u64 = match u.int_in_range(0..=2u8)? {
        0 => u.arbitrary()?,
        1 => capacity.wrapping_sub(u64::from(u.int_in_range(0..=16u8)?)),
        _ => u64::from(u.int_in_range(0..=64u8)?),
    };
    bytes.extend_from_slice(&t.to_le_bytes());
    bytes.extend_from_slice(&u.arbitrary::<u32>()?.to_le_bytes());
    bytes.extend_from_slice(&sector.to_le_bytes());
    for _ in 0..u.int_in_range(0..=3u8)? {
        let seg_sector: u64 = match u.int_in_range(0..=1u8)? {
            0 => u.arbitrary()?,
            _ => u64::from(u.int_in_range(0..=64u8)?),
        };
        bytes.extend_from_slice(&seg_sector.to_le_bytes());
        bytes.extend_from_slice(&u.int_in_range(0..=4096u32)?.to_le_bytes());
        bytes.extend_from_slice(&u.int_in_range(0..=2u32)?.to_le_bytes());
    }
    // Up to 1 KiB more (64 descriptors' worth, for chains through guest memory).
    let extra: &[u8] = u.arbitrary()?;
    bytes.extend_from_slice(&extra[..extra.len().min(0x400)]);
    mem.write_slice(&bytes, GuestAddress(DATA))
        .expect("write the request");
    // An indirect table at TABLE.
    let nt = u.int_in_range(0..=6u16)?;
    for i in 0..nt {
        let d = desc(u, nt)?;
        mem.write_obj(d, GuestAddress(TABLE + 16 * u64::from(i)))
            .expect("write the indirect table");
    }
    // The chain.
    let n = u.int_in_range(1..=8u16)?;
    let mut descs = (0..n)
        .map(|_| desc(u, n))
        .collect::<Result<Vec<RawDescriptor>>>()?;
    if nt > 0 && u.arbitrary()? {
        descs[0] = RawDescriptor::from(Descriptor::new(
            TABLE,
            16 * u32::from(nt),
            VRING_DESC_F_INDIRECT as u16,
            0,
        ));
    }
    if u.arbitrary()? {
        // A well-formed chain: each descriptor's NEXT points to the following one.
        for i in 0..descs.len() {
            let d = Descriptor::from(descs[i]);
            let mut flags = d.flags() & !(VRING_DESC_F_NEXT as u16);
            if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            descs[i] =
                RawDescriptor::from(Descriptor::new(d.addr().0, d.len(), flags, i as u16 + 1));
        }
    }
    let q = MockSplitQueue::new(mem, QUEUE_SIZE);
    let Ok(chain) = q.build_multiple_desc_chains(&descs) else {
        return Ok("no_chain".into());
    };
    // The chain as the device sees it (what virtio-queue's iterator yields).
    let walked: Vec<Descriptor> = chain.clone().collect();
    let r = req.parse(chain, capacity, readonly, MAX_DATA);
    check(mem, req, &r, &walked, capacity, readonly);
    Ok(match r {
        Ok(()) => format!("Ok_{:?}", req.kind()),
        Err(e) => format!(
            "Err_{}",
            format!("{e:?}").split(['(', ' ']).next().unwrap_or("")
        ),
    })
}

fn inside(mem: &GuestMemoryMmap, addr: GuestAddress, len: u64, access: Permissions) -> bool {
    len > 0 && mem.check_range(addr, len as usize, access)
}

fn check(
    mem: &GuestMemoryMmap,
    req: &Request,
    r: &std::result::Result<(), vhost_mirror::request::ParseError>,
    walked: &[Descriptor],
    capacity: u64,
    readonly: bool,
) {
    if let Some(s) = req.status {
        assert!(inside(mem, s, 1, Permissions::Write), "status at {s:?}");
    }
    if let Err(e) = r {
        let st = u32::from(e.status());
        assert!(
            st == VIRTIO_BLK_S_IOERR || st == VIRTIO_BLK_S_UNSUPP,
            "{e:?}"
        );
        return;
    }
    assert!(req.status.is_some(), "accepted without a status byte");
    let kind = req.kind.expect("accepted without a type");
    let write_only = |d: &Descriptor| d.flags() & VRING_DESC_F_WRITE as u16 != 0;
    // The header: the first 16 bytes of the device-readable descriptors.
    let mut header = Vec::new();
    for d in walked.iter().take_while(|d| !write_only(d)) {
        let mut b = vec![0u8; (d.len() as usize).min(16 - header.len())];
        mem.read_slice(&mut b, d.addr()).expect("header in memory");
        header.extend_from_slice(&b);
        if header.len() == 16 {
            break;
        }
    }
    assert_eq!(header.len(), 16);
    let t = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let want = match t {
        VIRTIO_BLK_T_IN => RequestType::In,
        VIRTIO_BLK_T_OUT => RequestType::Out,
        VIRTIO_BLK_T_FLUSH => RequestType::Flush,
        VIRTIO_BLK_T_GET_ID => RequestType::GetId,
        VIRTIO_BLK_T_DISCARD => RequestType::Discard,
        VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
        other => panic!("unknown type {other} accepted"),
    };
    assert_eq!(kind, want);
    let writes = matches!(
        kind,
        RequestType::Out | RequestType::Discard | RequestType::WriteZeroes
    );
    assert!(
        !(readonly && writes),
        "{kind:?} accepted on a read-only disk"
    );
    let access = if matches!(kind, RequestType::In | RequestType::GetId) {
        Permissions::Write
    } else {
        Permissions::Read
    };
    let mut total = 0u64;
    for s in &req.data {
        assert!(
            inside(mem, s.addr, u64::from(s.len), access),
            "buffer {s:?} outside guest memory"
        );
        total += u64::from(s.len);
    }
    assert_eq!(total, req.data_len);
    assert!(req.data.len() <= walked.len());
    match kind {
        RequestType::In | RequestType::Out => {
            assert_eq!(req.data_len % 512, 0);
            assert_eq!(req.offset, sector * 512);
            assert!(
                sector + req.data_len / 512 <= capacity,
                "past the disk's end"
            );
            assert!(req.ranges.is_empty());
        }
        RequestType::Flush => {
            assert_eq!(req.data_len, 0);
            assert!(req.data.is_empty() && req.ranges.is_empty());
        }
        RequestType::GetId => assert!(req.ranges.is_empty()),
        RequestType::Discard | RequestType::WriteZeroes => {
            let n = req.ranges.len();
            assert!(n >= 1 && n <= MAX_DISCARD_SEG as usize);
            assert_eq!(req.data_len, 16 * n as u64);
            for g in &req.ranges {
                assert_eq!(g.offset % 512, 0);
                assert_eq!(g.len % 512, 0);
                assert!(g.len <= u64::from(MAX_DISCARD_SECTORS) * 512);
                assert!(
                    g.offset / 512 + g.len / 512 <= capacity,
                    "{g:?} past the end"
                );
                assert!(!g.unmap || kind == RequestType::WriteZeroes);
            }
        }
    }
}
