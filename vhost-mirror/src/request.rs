//! Parsing and validation of virtio-blk requests.
//!
//! A descriptor chain from the guest becomes a [`Request`] here, or a [`ParseError`] that says
//! what was wrong with it. Nothing in this file does I/O on the image: `executor.rs` does that.
//! Every check that protects the image (sector range, direction of each buffer, sizes) happens
//! here, before any byte moves.

use std::ops::Deref;

use thiserror::Error;
use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use crate::blk_config::{MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, SECTOR_SIZE};

/// Size of `struct virtio_blk_outhdr`: type (u32), ioprio (u32), sector (u64).
pub const HEADER_LEN: usize = 16;
/// Size of one `struct virtio_blk_discard_write_zeroes` segment.
pub const DISCARD_SEGMENT_LEN: usize = 16;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("descriptor chain has no device-writable byte for the status")]
    NoStatus,
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    #[error("descriptor chain is longer than {0} descriptors")]
    TooManyDescriptors(usize),
    #[error("descriptor at {addr:#x}+{len} is outside guest memory")]
    BadAddress { addr: u64, len: u32 },
    #[error("request header is {0} bytes, needs {HEADER_LEN}")]
    ShortHeader(usize),
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("{0} refused: the device is read-only")]
    ReadOnly(&'static str),
    #[error("{kind} request must not carry {0} bytes of {1}", kind = .2)]
    UnexpectedData(u64, &'static str, &'static str),
    #[error("data length {0} is not a multiple of {SECTOR_SIZE}")]
    Unaligned(u64),
    #[error("sectors {sector}..+{sectors} are beyond the capacity of {capacity} sectors")]
    OutOfRange {
        sector: u64,
        sectors: u64,
        capacity: u64,
    },
    #[error("discard/write-zeroes payload of {0} bytes is not 1..={MAX_DISCARD_SEG} segments")]
    BadSegmentCount(u64),
    #[error("discard/write-zeroes segment has unsupported flags {0:#x}")]
    BadSegmentFlags(u32),
    #[error("discard/write-zeroes segment of {0} sectors is larger than {MAX_DISCARD_SECTORS}")]
    SegmentTooLarge(u32),
    #[error("request carries {0} bytes of data, more than the device's {1}")]
    TooMuchData(u64, u64),
}

impl ParseError {
    /// The virtio-blk status the guest receives for this error.
    pub fn status(&self) -> u8 {
        match self {
            ParseError::Unsupported(_)
            | ParseError::BadSegmentFlags(_)
            | ParseError::ReadOnly(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// What the guest asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
}

impl RequestType {
    fn from_wire(t: u32) -> Result<Self, ParseError> {
        Ok(match t {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => return Err(ParseError::Unsupported(other)),
        })
    }

    fn name(self) -> &'static str {
        match self {
            RequestType::In => "IN",
            RequestType::Out => "OUT",
            RequestType::Flush => "FLUSH",
            RequestType::GetId => "GET_ID",
            RequestType::Discard => "DISCARD",
            RequestType::WriteZeroes => "WRITE_ZEROES",
        }
    }
}

/// A contiguous piece of guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// One range of a DISCARD or WRITE_ZEROES request, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub offset: u64,
    pub len: u64,
    /// WRITE_ZEROES only: the guest allows the range to be deallocated.
    pub unmap: bool,
}

/// A validated request. Buffers are reused between requests of one queue (no allocation per
/// request once they have grown).
#[derive(Debug, Default)]
pub struct Request {
    pub kind: Option<RequestType>,
    /// Byte offset in the image (sector * 512).
    pub offset: u64,
    /// Guest buffers holding the data: device-readable for OUT, device-writable for IN/GET_ID.
    pub data: Vec<Segment>,
    /// Total length of `data`.
    pub data_len: u64,
    /// DISCARD / WRITE_ZEROES ranges.
    pub ranges: Vec<Range>,
    /// Where the status byte goes.
    pub status: Option<GuestAddress>,
    // Scratch space for the chain's descriptors.
    readable: Vec<Segment>,
    writable: Vec<Segment>,
}

impl Request {
    /// Bytes its buffers hold allocated (all start empty).
    #[cfg(test)]
    pub fn buffer_bytes(&self) -> usize {
        let seg = std::mem::size_of::<Segment>();
        (self.data.capacity() + self.readable.capacity() + self.writable.capacity()) * seg
            + self.ranges.capacity() * std::mem::size_of::<Range>()
    }

    /// The request's type; only valid after a successful [`Request::parse`].
    pub fn kind(&self) -> RequestType {
        self.kind.unwrap_or(RequestType::Flush)
    }

    /// Whether this request changes the image or needs the replica (write-type or FLUSH).
    pub fn is_mirrored(&self) -> bool {
        matches!(
            self.kind,
            Some(
                RequestType::Out
                    | RequestType::Discard
                    | RequestType::WriteZeroes
                    | RequestType::Flush
            )
        )
    }

    /// The byte range a write-type request changes (None for other requests).
    pub fn write_range(&self) -> Option<(u64, u64)> {
        match self.kind? {
            RequestType::Out => Some((self.offset, self.data_len)),
            RequestType::Discard | RequestType::WriteZeroes => {
                self.ranges.first().map(|r| (r.offset, r.len))
            }
            _ => None,
        }
    }

    /// Parses `chain` into `self`. On error, `self.status` still says where the status byte
    /// goes (if the chain has one), so the caller can report the failure to the guest.
    /// `max_data`: most data bytes a request may carry (SEG_MAX x SIZE_MAX).
    pub fn parse<M>(
        &mut self,
        chain: DescriptorChain<M>,
        capacity_sectors: u64,
        readonly: bool,
        max_data: u64,
    ) -> Result<(), ParseError>
    where
        M: Deref + Clone,
        M::Target: GuestMemory,
    {
        let mem = chain.memory();
        self.parse_descs(chain.clone(), mem, capacity_sectors, readonly, max_data)
    }

    /// [`Self::parse`] for the descriptors of a chain however they are walked (a request run
    /// again after a restart is walked from its head: `inflight::HeadChain`).
    pub fn parse_descs<G: GuestMemory + ?Sized>(
        &mut self,
        descs: impl Iterator<Item = Descriptor>,
        mem: &G,
        capacity_sectors: u64,
        readonly: bool,
        max_data: u64,
    ) -> Result<(), ParseError> {
        self.kind = None;
        self.offset = 0;
        self.data.clear();
        self.data_len = 0;
        self.ranges.clear();
        self.status = None;
        self.readable.clear();
        self.writable.clear();

        // 1. The chain's shape: readable descriptors first, then writable ones.
        let max = usize::from(u16::MAX);
        let mut first_err = None;
        for desc in descs {
            let desc: Descriptor = desc;
            let seg = Segment {
                addr: desc.addr(),
                len: desc.len(),
            };
            if self.readable.len() + self.writable.len() >= max {
                return Err(ParseError::TooManyDescriptors(max));
            }
            let access = if desc.is_write_only() {
                Permissions::Write
            } else {
                Permissions::Read
            };
            if seg.len > 0 && !mem.check_range(seg.addr, seg.len as usize, access) {
                first_err.get_or_insert(ParseError::BadAddress {
                    addr: seg.addr.0,
                    len: seg.len,
                });
            }
            if desc.is_write_only() {
                self.writable.push(seg);
            } else if !self.writable.is_empty() {
                first_err.get_or_insert(ParseError::ReadableAfterWritable);
                self.readable.push(seg);
            } else {
                self.readable.push(seg);
            }
        }

        // 2. The status byte: the last byte of the last writable descriptor.
        let Some(last) = self.writable.iter().rposition(|s| s.len > 0) else {
            return Err(ParseError::NoStatus);
        };
        self.writable.truncate(last + 1);
        let last = &mut self.writable[last];
        // A buffer that wraps around the address space has no last byte (and an unchecked
        // sum would wrap into guest memory, or panic in a debug build).
        let status = last.addr.checked_add(u64::from(last.len) - 1);
        let Some(status) = status.filter(|&s| mem.check_range(s, 1, Permissions::Write)) else {
            return Err(ParseError::BadAddress {
                addr: status.map_or(last.addr.0, |s| s.0),
                len: if status.is_some() { 1 } else { last.len },
            });
        };
        self.status = Some(status);
        last.len -= 1;
        if let Some(e) = first_err {
            return Err(e);
        }

        // 3. The header: the first 16 readable bytes.
        let mut header = [0u8; HEADER_LEN];
        let got = copy_from_segments(mem, &self.readable, &mut header)?;
        if got < HEADER_LEN {
            return Err(ParseError::ShortHeader(got));
        }
        let kind = RequestType::from_wire(u32::from_le_bytes([
            header[0], header[1], header[2], header[3],
        ]))?;
        let sector = u64::from_le_bytes([
            header[8], header[9], header[10], header[11], header[12], header[13], header[14],
            header[15],
        ]);
        let readable_data = skip_bytes(&mut self.readable, HEADER_LEN);
        let writable_data: u64 = self.writable.iter().map(|s| u64::from(s.len)).sum();
        self.kind = Some(kind);
        if readonly
            && matches!(
                kind,
                RequestType::Out | RequestType::Discard | RequestType::WriteZeroes
            )
        {
            return Err(ParseError::ReadOnly(kind.name()));
        }

        // 4. Data direction and size by type.
        let no_data = |len: u64, what, k: RequestType| {
            if len == 0 {
                Ok(())
            } else {
                Err(ParseError::UnexpectedData(len, what, k.name()))
            }
        };
        match kind {
            RequestType::In | RequestType::GetId => {
                no_data(readable_data, "device-readable data", kind)?;
                move_nonempty(&self.writable, &mut self.data);
                self.data_len = writable_data;
            }
            RequestType::Out | RequestType::Discard | RequestType::WriteZeroes => {
                no_data(writable_data, "device-writable data", kind)?;
                move_nonempty(&self.readable, &mut self.data);
                self.data_len = readable_data;
            }
            RequestType::Flush => {
                no_data(readable_data, "device-readable data", kind)?;
                no_data(writable_data, "device-writable data", kind)?;
            }
        }

        // 5. Size limit: no request over SEG_MAX x SIZE_MAX (the same guest memory may be
        // named by many descriptors: the sum is what counts). A single segment over SIZE_MAX
        // is tolerated (libblkio, for one, does not split buffers): it costs no memory here.
        if matches!(kind, RequestType::In | RequestType::Out) && self.data_len > max_data {
            return Err(ParseError::TooMuchData(self.data_len, max_data));
        }

        // 6. Ranges.
        match kind {
            RequestType::In | RequestType::Out => {
                if !self.data_len.is_multiple_of(SECTOR_SIZE) {
                    return Err(ParseError::Unaligned(self.data_len));
                }
                let sectors = self.data_len / SECTOR_SIZE;
                check_range(sector, sectors, capacity_sectors)?;
                self.offset = sector * SECTOR_SIZE;
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                let n = self.data_len / DISCARD_SEGMENT_LEN as u64;
                if !self.data_len.is_multiple_of(DISCARD_SEGMENT_LEN as u64)
                    || n == 0
                    || n > u64::from(MAX_DISCARD_SEG)
                {
                    return Err(ParseError::BadSegmentCount(self.data_len));
                }
                let allowed_flags = if kind == RequestType::WriteZeroes {
                    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                } else {
                    0
                };
                let mut raw = [0u8; DISCARD_SEGMENT_LEN];
                for i in 0..n as usize {
                    let segs = &self.data;
                    copy_from_segments_at(mem, segs, i * DISCARD_SEGMENT_LEN, &mut raw)?;
                    let sector = u64::from_le_bytes(raw[0..8].try_into().unwrap_or([0; 8]));
                    let num = u32::from_le_bytes(raw[8..12].try_into().unwrap_or([0; 4]));
                    let flags = u32::from_le_bytes(raw[12..16].try_into().unwrap_or([0; 4]));
                    if flags & !allowed_flags != 0 {
                        return Err(ParseError::BadSegmentFlags(flags));
                    }
                    if num > MAX_DISCARD_SECTORS {
                        return Err(ParseError::SegmentTooLarge(num));
                    }
                    check_range(sector, u64::from(num), capacity_sectors)?;
                    self.ranges.push(Range {
                        offset: sector * SECTOR_SIZE,
                        len: u64::from(num) * SECTOR_SIZE,
                        unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                    });
                }
            }
            RequestType::Flush | RequestType::GetId => {}
        }
        Ok(())
    }
}

fn check_range(sector: u64, sectors: u64, capacity: u64) -> Result<(), ParseError> {
    match sector.checked_add(sectors) {
        // The byte offsets must fit too (found by fuzzing with a capacity beyond 2^55 sectors,
        // which no real image has: `sector * 512` overflowed).
        Some(end) if end <= capacity && end.checked_mul(SECTOR_SIZE).is_some() => Ok(()),
        _ => Err(ParseError::OutOfRange {
            sector,
            sectors,
            capacity,
        }),
    }
}

fn move_nonempty(from: &[Segment], to: &mut Vec<Segment>) {
    to.extend(from.iter().filter(|s| s.len > 0));
}

/// Drops the first `n` bytes of `segs`; returns the bytes that remain.
fn skip_bytes(segs: &mut Vec<Segment>, mut n: usize) -> u64 {
    let mut out = 0;
    segs.retain_mut(|s| {
        let take = (s.len as usize).min(n);
        n -= take;
        s.addr = s.addr.unchecked_add(take as u64);
        s.len -= take as u32;
        out += u64::from(s.len);
        s.len > 0
    });
    out
}

fn copy_from_segments<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Segment],
    buf: &mut [u8],
) -> Result<usize, ParseError> {
    copy_from_segments_at(mem, segs, 0, buf)
}

/// Copies up to `buf.len()` bytes starting `skip` bytes into `segs`; returns the bytes copied.
fn copy_from_segments_at<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Segment],
    mut skip: usize,
    buf: &mut [u8],
) -> Result<usize, ParseError> {
    let mut done = 0;
    for s in segs {
        if done == buf.len() {
            break;
        }
        let len = s.len as usize;
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = (len - skip).min(buf.len() - done);
        let addr = s.addr.unchecked_add(skip as u64);
        mem.read_slice(&mut buf[done..done + n], addr)
            .map_err(|_| ParseError::BadAddress {
                addr: addr.0,
                len: n as u32,
            })?;
        done += n;
        skip = 0;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blk_config::SIZE_MAX;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    const R: u16 = 0;
    const W: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
    const CAP: u64 = 1024; // sectors
    /// The device's SEG_MAX x SIZE_MAX in these tests.
    const MAX_DATA: u64 = 4 * SIZE_MAX as u64;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
    }

    fn header(mem: &GuestMemoryMmap, at: u64, t: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).unwrap();
    }

    fn d(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    /// Builds the chain in a mock queue and parses it.
    fn parse(mem: &GuestMemoryMmap, descs: &[RawDescriptor]) -> (Request, Result<(), ParseError>) {
        let q = MockSplitQueue::new(mem, 256);
        let chain = q.build_desc_chain(descs).unwrap();
        let mut req = Request::default();
        let r = req.parse(chain, CAP, false, MAX_DATA);
        (req, r)
    }

    /// Issue 9: "254 descriptors over the same 16 MiB parse as one 4 GiB OUT": more data than
    /// SEG_MAX x SIZE_MAX (however the segments overlap) is refused before anything is read or
    /// allocated.
    #[test]
    fn oversized_requests_are_refused() {
        let m = mem();
        header(&m, 0x10_0000, VIRTIO_BLK_T_OUT, 0);
        let (_, r) = parse(
            &m,
            &[
                d(0x10_0000, 16, R),
                d(0x20_0000, 4 * SIZE_MAX + 512, R),
                d(0x30_0000, 1, W),
            ],
        );
        assert_eq!(r, Err(ParseError::TooMuchData(MAX_DATA + 512, MAX_DATA)));
        assert_eq!(r.unwrap_err().status(), VIRTIO_BLK_S_IOERR as u8);
        // Five SIZE_MAX descriptors over the same memory: 5 MiB > 4 MiB.
        let mut descs = vec![d(0x10_0000, 16, R)];
        descs.extend((0..5).map(|_| d(0x20_0000, SIZE_MAX, R)));
        descs.push(d(0x30_0000, 1, W));
        let (_, r) = parse(&m, &descs);
        assert_eq!(
            r,
            Err(ParseError::TooMuchData(5 * u64::from(SIZE_MAX), MAX_DATA))
        );
        // Reads likewise.
        header(&m, 0x10_0000, VIRTIO_BLK_T_IN, 0);
        let mut descs = vec![d(0x10_0000, 16, R)];
        descs.extend((0..5).map(|_| d(0x20_0000, SIZE_MAX, W)));
        descs.push(d(0x30_0000, 1, W));
        let (_, r) = parse(&m, &descs);
        assert!(matches!(r, Err(ParseError::TooMuchData(..))), "{r:?}");
    }

    /// Fuzzing finding: with a capacity over 2^55 sectors a sector passed the range check
    /// and its byte offset overflowed.
    #[test]
    fn byte_offsets_never_overflow() {
        assert!(check_range(u64::MAX / 512 + 1, 0, u64::MAX).is_err());
        assert!(check_range(u64::MAX / 512 - 8, 8, u64::MAX).is_ok());
        assert!(check_range(u64::MAX / 512, 1, u64::MAX).is_err());
    }

    #[test]
    fn read_request() {
        let m = mem();
        header(&m, 0x10_0000, VIRTIO_BLK_T_IN, 8);
        let (req, r) = parse(
            &m,
            &[
                d(0x10_0000, 16, R),
                d(0x20_0000, 4096, W),
                d(0x30_0000, 1, W),
            ],
        );
        r.unwrap();
        assert_eq!(req.kind(), RequestType::In);
        assert_eq!(req.offset, 8 * 512);
        assert_eq!(req.data_len, 4096);
        assert_eq!(req.data.len(), 1);
        assert_eq!(req.status, Some(GuestAddress(0x30_0000)));
    }

    #[test]
    fn write_request_with_header_and_data_in_one_descriptor() {
        let m = mem();
        header(&m, 0x10_0000, VIRTIO_BLK_T_OUT, 0);
        let (req, r) = parse(&m, &[d(0x10_0000, 16 + 1024, R), d(0x30_0000, 1, W)]);
        r.unwrap();
        assert_eq!(req.kind(), RequestType::Out);
        assert_eq!(req.data_len, 1024);
        assert_eq!(req.data[0].addr, GuestAddress(0x10_0010));
    }

    #[test]
    fn status_shares_the_last_writable_descriptor() {
        let m = mem();
        header(&m, 0x10_0000, VIRTIO_BLK_T_IN, 0);
        let (req, r) = parse(&m, &[d(0x10_0000, 16, R), d(0x20_0000, 513, W)]);
        r.unwrap();
        assert_eq!(req.data_len, 512);
        assert_eq!(req.status, Some(GuestAddress(0x20_0200)));
    }

    #[test]
    fn flush_and_get_id() {
        let m = mem();
        header(&m, 0x10_0000, VIRTIO_BLK_T_FLUSH, 0);
        let (req, r) = parse(&m, &[d(0x10_0000, 16, R), d(0x30_0000, 1, W)]);
        r.unwrap();
        assert_eq!(req.kind(), RequestType::Flush);
        header(&m, 0x10_0000, VIRTIO_BLK_T_GET_ID, 0);
        let (req, r) = parse(
            &m,
            &[d(0x10_0000, 16, R), d(0x20_0000, 20, W), d(0x30_0000, 1, W)],
        );
        r.unwrap();
        assert_eq!(req.kind(), RequestType::GetId);
        assert_eq!(req.data_len, 20);
    }

    #[test]
    fn flush_with_data_is_refused() {
        let m = mem();
        header(&m, 0x10_0000, VIRTIO_BLK_T_FLUSH, 0);
        let (req, r) = parse(
            &m,
            &[
                d(0x10_0000, 16, R),
                d(0x20_0000, 512, W),
                d(0x30_0000, 1, W),
            ],
        );
        assert!(matches!(r, Err(ParseError::UnexpectedData(512, _, _))));
        assert_eq!(req.status, Some(GuestAddress(0x30_0000)));
    }

    #[test]
    fn writes_on_a_readonly_device_are_unsupported() {
        let m = mem();
        for t in [
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_DISCARD,
            VIRTIO_BLK_T_WRITE_ZEROES,
        ] {
            header(&m, 0x10_0000, t, 0);
            let q = MockSplitQueue::new(&m, 256);
            let chain = q
                .build_desc_chain(&[d(0x10_0000, 16, R), d(0x20_0000, 16, R), d(0x30_0000, 1, W)])
                .unwrap();
            let mut req = Request::default();
            let e = req.parse(chain, CAP, true, MAX_DATA).unwrap_err();
            assert!(matches!(e, ParseError::ReadOnly(_)), "{e:?}");
            assert_eq!(e.status(), VIRTIO_BLK_S_UNSUPP as u8);
        }
        header(&m, 0x10_0000, VIRTIO_BLK_T_IN, 0);
        let q = MockSplitQueue::new(&m, 256);
        let chain = q
            .build_desc_chain(&[
                d(0x10_0000, 16, R),
                d(0x20_0000, 512, W),
                d(0x30_0000, 1, W),
            ])
            .unwrap();
        Request::default()
            .parse(chain, CAP, true, MAX_DATA)
            .unwrap();
    }

    #[test]
    fn unknown_type_is_unsupported() {
        let m = mem();
        header(&m, 0x10_0000, 99, 0);
        let (req, r) = parse(&m, &[d(0x10_0000, 16, R), d(0x30_0000, 1, W)]);
        let e = r.unwrap_err();
        assert_eq!(e, ParseError::Unsupported(99));
        assert_eq!(e.status(), VIRTIO_BLK_S_UNSUPP as u8);
        assert!(req.status.is_some());
    }

    #[test]
    fn no_status_descriptor() {
        let m = mem();
        header(&m, 0x10_0000, VIRTIO_BLK_T_OUT, 0);
        let (req, r) = parse(&m, &[d(0x10_0000, 16, R), d(0x20_0000, 512, R)]);
        assert_eq!(r, Err(ParseError::NoStatus));
        assert_eq!(req.status, None);
        // A zero-length writable descriptor cannot hold a status either.
        let (_, r) = parse(&m, &[d(0x10_0000, 16, R), d(0x20_0000, 0, W)]);
        assert_eq!(r, Err(ParseError::NoStatus));
    }

    #[test]
    fn short_header() {
        let m = mem();
        let (_, r) = parse(&m, &[d(0x10_0000, 8, R), d(0x30_0000, 1, W)]);
        assert_eq!(r, Err(ParseError::ShortHeader(8)));
        let (_, r) = parse(&m, &[d(0x30_0000, 1, W)]);
        assert_eq!(r, Err(ParseError::ShortHeader(0)));
    }

    #[test]
    fn header_split_over_two_descriptors() {
        let m = mem();
        header(&m, 0x10_0000, VIRTIO_BLK_T_IN, 3);
        m.write_slice(&[0u8; 8], GuestAddress(0x11_0000)).unwrap();
        // Move the sector half of the header to another descriptor.
        let mut h = [0u8; 8];
        m.read_slice(&mut h, GuestAddress(0x10_0008)).unwrap();
        m.write_slice(&h, GuestAddress(0x11_0000)).unwrap();
        let (req, r) = parse(
            &m,
            &[
                d(0x10_0000, 8, R),
                d(0x11_0000, 8, R),
                d(0x20_0000, 512, W),
                d(0x30_0000, 1, W),
            ],
        );
        r.unwrap();
        assert_eq!(req.offset, 3 * 512);
    }

    #[test]
    fn readable_after_writable() {
        let m = mem();
        header(&m, 0x10_0000, VIRTIO_BLK_T_OUT, 0);
        let (req, r) = parse(
            &m,
            &[
                d(0x10_0000, 16, R),
                d(0x30_0000, 1, W),
                d(0x20_0000, 512, R),
            ],
        );
        assert_eq!(r, Err(ParseError::ReadableAfterWritable));
        assert!(req.status.is_some());
    }

    #[test]
    fn wrong_direction_for_data() {
        let m = mem();
        header(&m, 0x10_0000, VIRTIO_BLK_T_IN, 0);
        let (_, r) = parse(
            &m,
            &[
                d(0x10_0000, 16, R),
                d(0x20_0000, 512, R),
                d(0x30_0000, 1, W),
            ],
        );
        assert!(matches!(r, Err(ParseError::UnexpectedData(512, _, "IN"))));
        header(&m, 0x10_0000, VIRTIO_BLK_T_OUT, 0);
        let (_, r) = parse(
            &m,
            &[
                d(0x10_0000, 16, R),
                d(0x20_0000, 512, W),
                d(0x30_0000, 1, W),
            ],
        );
        assert!(matches!(r, Err(ParseError::UnexpectedData(512, _, "OUT"))));
    }

    #[test]
    fn unaligned_length() {
        let m = mem();
        header(&m, 0x10_0000, VIRTIO_BLK_T_IN, 0);
        let (_, r) = parse(
            &m,
            &[
                d(0x10_0000, 16, R),
                d(0x20_0000, 100, W),
                d(0x30_0000, 1, W),
            ],
        );
        assert_eq!(r, Err(ParseError::Unaligned(100)));
    }

    #[test]
    fn out_of_range_and_overflow() {
        let m = mem();
        for (sector, len) in [
            (CAP, 512u32),
            (CAP - 1, 1024),
            (u64::MAX, 512),
            (u64::MAX / 2, 512),
        ] {
            header(&m, 0x10_0000, VIRTIO_BLK_T_OUT, sector);
            let (_, r) = parse(
                &m,
                &[
                    d(0x10_0000, 16, R),
                    d(0x20_0000, len, R),
                    d(0x30_0000, 1, W),
                ],
            );
            assert!(
                matches!(r, Err(ParseError::OutOfRange { .. })),
                "{sector} {len}: {r:?}"
            );
        }
        // The last sector is fine.
        header(&m, 0x10_0000, VIRTIO_BLK_T_OUT, CAP - 1);
        let (_, r) = parse(
            &m,
            &[
                d(0x10_0000, 16, R),
                d(0x20_0000, 512, R),
                d(0x30_0000, 1, W),
            ],
        );
        r.unwrap();
    }

    #[test]
    fn buffer_outside_guest_memory() {
        let m = mem();
        header(&m, 0x10_0000, VIRTIO_BLK_T_IN, 0);
        let (req, r) = parse(
            &m,
            &[
                d(0x10_0000, 16, R),
                d(0xff_ff00, 512, W),
                d(0x30_0000, 1, W),
            ],
        );
        assert!(matches!(r, Err(ParseError::BadAddress { .. })));
        assert_eq!(req.status, Some(GuestAddress(0x30_0000)));
        let (req, r) = parse(&m, &[d(0x10_0000, 16, R), d(0x200_0000, 1, W)]);
        assert!(matches!(r, Err(ParseError::BadAddress { .. })));
        assert_eq!(req.status, None);
    }

    #[test]
    fn status_buffer_wrapping_around_the_address_space() {
        // Found by fuzz/virtio_request: the status byte's address was computed with an
        // unchecked sum (a panic in a debug build; in a release build an address that wraps
        // to the start of guest memory, where the IOERR status was then written).
        let m = mem();
        header(&m, 0x10_0000, VIRTIO_BLK_T_IN, 0);
        let (req, r) = parse(
            &m,
            &[d(0x10_0000, 16, R), d(0xffff_ffff_ffff_f000, 0x2000, W)],
        );
        assert_eq!(
            r,
            Err(ParseError::BadAddress {
                addr: 0xffff_ffff_ffff_f000,
                len: 0x2000
            })
        );
        assert_eq!(req.status, None);
    }

    fn discard_payload(m: &GuestMemoryMmap, at: u64, sector: u64, num: u32, flags: u32) {
        let mut p = [0u8; 16];
        p[0..8].copy_from_slice(&sector.to_le_bytes());
        p[8..12].copy_from_slice(&num.to_le_bytes());
        p[12..16].copy_from_slice(&flags.to_le_bytes());
        m.write_slice(&p, GuestAddress(at)).unwrap();
    }

    #[test]
    fn discard_and_write_zeroes() {
        let m = mem();
        header(&m, 0x10_0000, VIRTIO_BLK_T_DISCARD, 0);
        discard_payload(&m, 0x20_0000, 16, 8, 0);
        let chain = [d(0x10_0000, 16, R), d(0x20_0000, 16, R), d(0x30_0000, 1, W)];
        let (req, r) = parse(&m, &chain);
        r.unwrap();
        assert_eq!(
            req.ranges,
            vec![Range {
                offset: 16 * 512,
                len: 8 * 512,
                unmap: false
            }]
        );
        // DISCARD must not set the unmap flag.
        discard_payload(&m, 0x20_0000, 16, 8, 1);
        let (_, r) = parse(&m, &chain);
        assert_eq!(r, Err(ParseError::BadSegmentFlags(1)));
        // WRITE_ZEROES may.
        header(&m, 0x10_0000, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let (req, r) = parse(&m, &chain);
        r.unwrap();
        assert!(req.ranges[0].unmap);
        // Beyond the end.
        discard_payload(&m, 0x20_0000, CAP - 4, 8, 0);
        let (_, r) = parse(&m, &chain);
        assert!(matches!(r, Err(ParseError::OutOfRange { .. })));
        // Wrong payload sizes.
        let (_, r) = parse(
            &m,
            &[d(0x10_0000, 16, R), d(0x20_0000, 15, R), d(0x30_0000, 1, W)],
        );
        assert_eq!(r, Err(ParseError::BadSegmentCount(15)));
        let (_, r) = parse(
            &m,
            &[d(0x10_0000, 16, R), d(0x20_0000, 32, R), d(0x30_0000, 1, W)],
        );
        assert_eq!(r, Err(ParseError::BadSegmentCount(32)));
        let (_, r) = parse(&m, &[d(0x10_0000, 16, R), d(0x30_0000, 1, W)]);
        assert_eq!(r, Err(ParseError::BadSegmentCount(0)));
    }

    #[test]
    fn indirect_chain_is_followed() {
        let m = mem();
        header(&m, 0x10_0000, VIRTIO_BLK_T_IN, 2);
        let q = MockSplitQueue::new(&m, 16);
        // Indirect table at 0x40_0000 with three descriptors.
        let table = [
            SplitDescriptor::new(0x10_0000, 16, 1, 1),
            SplitDescriptor::new(0x20_0000, 1024, W | 1, 2),
            SplitDescriptor::new(0x30_0000, 1, W, 0),
        ];
        for (i, t) in table.iter().enumerate() {
            m.write_obj(*t, GuestAddress(0x40_0000 + 16 * i as u64))
                .unwrap();
        }
        let flag = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;
        let chain = q.build_desc_chain(&[d(0x40_0000, 48, flag)]).unwrap();
        let mut req = Request::default();
        req.parse(chain, CAP, false, MAX_DATA).unwrap();
        assert_eq!(req.kind(), RequestType::In);
        assert_eq!(req.data_len, 1024);
        assert_eq!(req.offset, 1024);
    }
}
