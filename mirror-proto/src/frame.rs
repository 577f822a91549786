//! The replication wire protocol: a pure codec (no I/O). See PROTOCOL.md.
//!
//! Every frame is a 24-byte header followed by `len` payload bytes:
//!
//! ```text
//! 0      4       5      6       8        16      20       24
//! | magic | ver  | kind | flags | seq    | len   | hcrc   | payload (len bytes) ...
//! ```
//! All integers are little endian. `hcrc` is CRC32C of the first 20 header bytes, so garbage is
//! recognised before a length is trusted; `len` is capped at [`MAX_PAYLOAD`]. Write and read
//! data carry their own CRC32C.

use thiserror::Error;

use crate::blockhash::{blocks_in, HASH_LEN, MAX_HASH_SPAN};

/// "VHMP" in ASCII.
pub const MAGIC: [u8; 4] = *b"VHMP";
/// Protocol 2: the Noise handshake (NoiseInit, NoiseReply) in clear, every later frame inside
/// the encrypted records of `secure.rs`. Protocol 1 (HMAC challenge, frames in clear) is refused.
pub const VERSION: u8 = 2;
/// Length of the first Noise handshake message (NNpsk0: an ephemeral key, the encrypted 8-byte
/// timestamp, an AEAD tag).
pub const NOISE_INIT_LEN: usize = 56;
/// Length of the second Noise handshake message (an ephemeral key and an AEAD tag).
pub const NOISE_REPLY_LEN: usize = 48;
pub const HEADER_LEN: usize = 24;
/// Largest data block one frame carries; larger writes are split by the sender.
pub const MAX_DATA: usize = 1 << 20;
/// Hard maximum payload size. A header announcing more is an error, not an allocation.
pub const MAX_PAYLOAD: usize = MAX_DATA + 256;
/// Most generations a node reports in its history.
pub const MAX_HISTORY: usize = 16;
/// Longest reason string in a Refuse frame.
pub const MAX_REASON: usize = 200;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("bad magic {0:02x?}: not a vhost-mirror peer")]
    BadMagic([u8; 4]),
    #[error("protocol version {0} is not supported (this side speaks {VERSION})")]
    BadVersion(u8),
    #[error("header checksum mismatch")]
    HeaderCrc,
    #[error("frame of {0} bytes is larger than the maximum {MAX_PAYLOAD}")]
    TooLarge(u32),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("malformed {kind} frame: {what}")]
    Malformed {
        kind: &'static str,
        what: &'static str,
    },
    #[error("data checksum mismatch in {0} frame")]
    DataCrc(&'static str),
}

/// Which side a node plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Primary,
    Secondary,
}

/// How much a node's disk can be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskState {
    /// Holds every write of its generation.
    UpToDate,
    /// A sync into it is unfinished: some regions are old, some new.
    Inconsistent,
    /// Consistent but behind the primary.
    Outdated,
}

impl DiskState {
    /// Every state (the metrics write one sample per state).
    pub const ALL: [DiskState; 3] = [
        DiskState::UpToDate,
        DiskState::Inconsistent,
        DiskState::Outdated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DiskState::UpToDate => "up-to-date",
            DiskState::Inconsistent => "inconsistent",
            DiskState::Outdated => "outdated",
        }
    }
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Secondary => "secondary",
        }
    }
}

/// Why a peer refuses a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseCode {
    AuthFailed,
    SizeMismatch,
    Busy,
    SplitBrain,
    Fenced,
    Protocol,
    Other,
}

impl RefuseCode {
    fn to_wire(self) -> u16 {
        match self {
            RefuseCode::AuthFailed => 1,
            RefuseCode::SizeMismatch => 2,
            RefuseCode::Busy => 3,
            RefuseCode::SplitBrain => 4,
            RefuseCode::Fenced => 5,
            RefuseCode::Protocol => 6,
            RefuseCode::Other => 7,
        }
    }
    fn from_wire(v: u16) -> Self {
        match v {
            1 => RefuseCode::AuthFailed,
            2 => RefuseCode::SizeMismatch,
            3 => RefuseCode::Busy,
            4 => RefuseCode::SplitBrain,
            5 => RefuseCode::Fenced,
            6 => RefuseCode::Protocol,
            _ => RefuseCode::Other,
        }
    }
}

/// Result of a request, carried by Ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckStatus {
    Ok,
    IoError,
    NoSpace,
    OutOfRange,
    /// The replica no longer accepts writes from this primary (promoted). From the witness:
    /// the replica this primary would outdate was promoted.
    Fenced,
    /// From the witness: this node was recorded outdated; it may not be promoted.
    Outdated,
}

impl AckStatus {
    fn to_wire(self) -> u8 {
        match self {
            AckStatus::Ok => 0,
            AckStatus::IoError => 1,
            AckStatus::NoSpace => 2,
            AckStatus::OutOfRange => 3,
            AckStatus::Fenced => 4,
            AckStatus::Outdated => 5,
        }
    }
    fn from_wire(v: u8) -> Self {
        match v {
            0 => AckStatus::Ok,
            2 => AckStatus::NoSpace,
            3 => AckStatus::OutOfRange,
            4 => AckStatus::Fenced,
            5 => AckStatus::Outdated,
            _ => AckStatus::IoError,
        }
    }
}

/// A node's identity and data state, exchanged when the link is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub node_id: u64,
    /// Image size in bytes (0: the replica has no image yet).
    pub size: u64,
    pub role: Role,
    pub disk_state: DiskState,
    /// Current generation identifier (0: none yet).
    pub generation: u64,
    /// Primary only: the generation the out-of-sync bitmap is relative to (0: none).
    pub bitmap_generation: u64,
    /// Earlier generations, newest first, at most [`MAX_HISTORY`].
    pub history: Vec<u64>,
    /// Bit 0: the sender's own changes may be discarded (split-brain resolution).
    pub flags: u32,
    /// Activity-log extents (of `activity_log::EXTENT_SIZE` bytes) the sender may have written
    /// without its peer (left hot by a crash), at most [`MAX_HOT`].
    pub hot: Vec<u64>,
}

/// Most hot extents a NodeInfo carries.
pub const MAX_HOT: usize = crate::activity_log::MAX_EXTENTS;

/// NodeInfo flag: the sender's data may be overwritten (it was started with
/// `--discard-my-data`).
pub const NODE_FLAG_DISCARD_MY_DATA: u32 = 1;

/// NodeInfo flag: the sender answers ReadHashes (an access node older than block hashes does
/// not; a primary then copies whole regions and cannot verify).
pub const NODE_FLAG_HASHES: u32 = 2;

/// One protocol message; `data` and `reason` borrow from the decoded buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Primary -> replica, in clear: the first Noise handshake message (see `secure.rs`).
    NoiseInit {
        msg: [u8; NOISE_INIT_LEN],
    },
    /// Replica -> primary, in clear: the second Noise handshake message.
    NoiseReply {
        msg: [u8; NOISE_REPLY_LEN],
    },
    /// Either side: connection refused, with a reason for the log and status.
    Refuse {
        code: RefuseCode,
        reason: &'a str,
    },
    /// Primary -> replica after authentication.
    Attach(NodeInfo),
    /// Replica -> primary: its state.
    Attached(NodeInfo),
    /// Primary -> replica: a resync of `bytes` is starting; the replica is inconsistent until
    /// SyncDone.
    SyncStart {
        full: bool,
        bytes: u64,
    },
    /// Primary -> replica: resync finished; the replica is up to date at `generation`.
    SyncDone {
        generation: u64,
    },
    Write {
        offset: u64,
        resync: bool,
        data: &'a [u8],
    },
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        unmap: bool,
    },
    /// Replica: make every acknowledged write durable, then ack.
    Flush,
    Read {
        offset: u64,
        len: u32,
    },
    ReadData {
        data: &'a [u8],
    },
    Ack {
        status: AckStatus,
    },
    Ping {
        nanos: u64,
    },
    Pong {
        nanos: u64,
    },
    /// Primary -> replica: clean shutdown, nothing in flight.
    Goodbye,
    /// Primary -> replica: the hashes of the blocks of `offset..offset + len` (see
    /// `blockhash.rs`), as the replica holds them once the requests before this one applied.
    ReadHashes {
        offset: u64,
        len: u32,
    },
    /// Replica -> primary: [`crate::blockhash::HASH_LEN`] bytes per block, in order.
    Hashes {
        hashes: &'a [u8],
    },
    /// Primary or replica -> quorum witness: one request about the replica holding
    /// `generation`, from the node `node` (its metadata's node id; see `witness.rs`);
    /// answered with an Ack.
    Witness {
        op: WitnessOp,
        generation: u64,
        node: u64,
    },
}

/// What a [`Frame::Witness`] asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WitnessOp {
    /// Primary: record the replica holding the generation outdated before this primary
    /// acknowledges a write it lacks. Ack Ok, or Fenced: that replica was promoted.
    Outdate,
    /// Replica: consent to promote this node, which holds the generation up to date. Ack Ok
    /// (recorded), or Outdated: a primary recorded it outdated.
    Promote,
    /// Primary: the replica that held the generation is in sync again; forget its record.
    Clear,
}

impl WitnessOp {
    fn to_wire(self) -> u8 {
        match self {
            WitnessOp::Outdate => 1,
            WitnessOp::Promote => 2,
            WitnessOp::Clear => 3,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            WitnessOp::Outdate => "outdate",
            WitnessOp::Promote => "promote",
            WitnessOp::Clear => "clear",
        }
    }
}

mod kind {
    pub const NOISE_INIT: u8 = 1;
    pub const NOISE_REPLY: u8 = 2;
    // 3 and 4 were protocol 1's Auth and AuthOk.
    pub const REFUSE: u8 = 5;
    pub const ATTACH: u8 = 6;
    pub const ATTACHED: u8 = 7;
    pub const SYNC_START: u8 = 8;
    pub const SYNC_DONE: u8 = 9;
    pub const WRITE: u8 = 10;
    pub const DISCARD: u8 = 11;
    pub const WRITE_ZEROES: u8 = 12;
    pub const FLUSH: u8 = 13;
    pub const READ: u8 = 14;
    pub const READ_DATA: u8 = 15;
    pub const ACK: u8 = 16;
    pub const PING: u8 = 17;
    pub const PONG: u8 = 18;
    pub const GOODBYE: u8 = 19;
    pub const READ_HASHES: u8 = 20;
    pub const HASHES: u8 = 21;
    pub const WITNESS: u8 = 22;
}

const FLAG_RESYNC: u16 = 1;
const FLAG_FULL: u16 = 2;
const FLAG_UNMAP: u16 = 4;

impl Frame<'_> {
    pub fn name(&self) -> &'static str {
        kind_name(self.kind())
    }

    fn kind(&self) -> u8 {
        match self {
            Frame::NoiseInit { .. } => kind::NOISE_INIT,
            Frame::NoiseReply { .. } => kind::NOISE_REPLY,
            Frame::Refuse { .. } => kind::REFUSE,
            Frame::Attach(_) => kind::ATTACH,
            Frame::Attached(_) => kind::ATTACHED,
            Frame::SyncStart { .. } => kind::SYNC_START,
            Frame::SyncDone { .. } => kind::SYNC_DONE,
            Frame::Write { .. } => kind::WRITE,
            Frame::Discard { .. } => kind::DISCARD,
            Frame::WriteZeroes { .. } => kind::WRITE_ZEROES,
            Frame::Flush => kind::FLUSH,
            Frame::Read { .. } => kind::READ,
            Frame::ReadData { .. } => kind::READ_DATA,
            Frame::Ack { .. } => kind::ACK,
            Frame::Ping { .. } => kind::PING,
            Frame::Pong { .. } => kind::PONG,
            Frame::Goodbye => kind::GOODBYE,
            Frame::ReadHashes { .. } => kind::READ_HASHES,
            Frame::Hashes { .. } => kind::HASHES,
            Frame::Witness { .. } => kind::WITNESS,
        }
    }
}

fn kind_name(k: u8) -> &'static str {
    match k {
        kind::NOISE_INIT => "NoiseInit",
        kind::NOISE_REPLY => "NoiseReply",
        kind::REFUSE => "Refuse",
        kind::ATTACH => "Attach",
        kind::ATTACHED => "Attached",
        kind::SYNC_START => "SyncStart",
        kind::SYNC_DONE => "SyncDone",
        kind::WRITE => "Write",
        kind::DISCARD => "Discard",
        kind::WRITE_ZEROES => "WriteZeroes",
        kind::FLUSH => "Flush",
        kind::READ => "Read",
        kind::READ_DATA => "ReadData",
        kind::ACK => "Ack",
        kind::PING => "Ping",
        kind::PONG => "Pong",
        kind::GOODBYE => "Goodbye",
        kind::READ_HASHES => "ReadHashes",
        kind::HASHES => "Hashes",
        kind::WITNESS => "Witness",
        _ => "unknown",
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding

fn put_header(out: &mut Vec<u8>, kind: u8, flags: u16, seq: u64, len: usize) {
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(kind);
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&(len as u32).to_le_bytes());
    let crc = crc32c::crc32c(&out[start..start + 20]);
    out.extend_from_slice(&crc.to_le_bytes());
}

fn put_node(out: &mut Vec<u8>, n: &NodeInfo) {
    out.extend_from_slice(&n.node_id.to_le_bytes());
    out.extend_from_slice(&n.size.to_le_bytes());
    out.push(match n.role {
        Role::Primary => 1,
        Role::Secondary => 2,
    });
    out.push(match n.disk_state {
        DiskState::UpToDate => 1,
        DiskState::Inconsistent => 2,
        DiskState::Outdated => 3,
    });
    out.extend_from_slice(&n.flags.to_le_bytes());
    out.extend_from_slice(&n.generation.to_le_bytes());
    out.extend_from_slice(&n.bitmap_generation.to_le_bytes());
    let h = &n.history[..n.history.len().min(MAX_HISTORY)];
    out.extend_from_slice(&(h.len() as u16).to_le_bytes());
    for g in h {
        out.extend_from_slice(&g.to_le_bytes());
    }
    let hot = &n.hot[..n.hot.len().min(MAX_HOT)];
    out.extend_from_slice(&(hot.len() as u16).to_le_bytes());
    for e in hot {
        out.extend_from_slice(&e.to_le_bytes());
    }
}

/// Appends `frame` with sequence number `seq` to `out`.
pub fn encode(seq: u64, frame: &Frame<'_>, out: &mut Vec<u8>) {
    let k = frame.kind();
    let mut flags = 0u16;
    let start = out.len();
    // Header with a zero length, patched below once the payload is known.
    put_header(out, k, 0, seq, 0);
    match frame {
        Frame::NoiseInit { msg } => out.extend_from_slice(msg),
        Frame::NoiseReply { msg } => out.extend_from_slice(msg),
        Frame::Flush | Frame::Goodbye => {}
        Frame::Refuse { code, reason } => {
            out.extend_from_slice(&code.to_wire().to_le_bytes());
            let r = truncate_utf8(reason, MAX_REASON);
            out.extend_from_slice(r.as_bytes());
        }
        Frame::Attach(n) | Frame::Attached(n) => put_node(out, n),
        Frame::SyncStart { full, bytes } => {
            if *full {
                flags |= FLAG_FULL;
            }
            out.extend_from_slice(&bytes.to_le_bytes());
        }
        Frame::SyncDone { generation } => out.extend_from_slice(&generation.to_le_bytes()),
        Frame::Write {
            offset,
            resync,
            data,
        } => {
            if *resync {
                flags |= FLAG_RESYNC;
            }
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&crc32c::crc32c(data).to_le_bytes());
            out.extend_from_slice(data);
        }
        Frame::Discard { offset, len } => {
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
        }
        Frame::WriteZeroes { offset, len, unmap } => {
            if *unmap {
                flags |= FLAG_UNMAP;
            }
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
        }
        Frame::Read { offset, len } => {
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
        }
        Frame::ReadData { data } | Frame::Hashes { hashes: data } => {
            out.extend_from_slice(&crc32c::crc32c(data).to_le_bytes());
            out.extend_from_slice(data);
        }
        Frame::ReadHashes { offset, len } => {
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
        }
        Frame::Ack { status } => out.push(status.to_wire()),
        Frame::Witness {
            op,
            generation,
            node,
        } => {
            out.push(op.to_wire());
            out.extend_from_slice(&generation.to_le_bytes());
            out.extend_from_slice(&node.to_le_bytes());
        }
        Frame::Ping { nanos } | Frame::Pong { nanos } => {
            out.extend_from_slice(&nanos.to_le_bytes())
        }
    }
    patch_header(out, start, flags);
}

/// Fills in the flags, payload length and header checksum of the frame starting at `start`.
fn patch_header(out: &mut [u8], start: usize, flags: u16) {
    patch_header_len(out, start, flags, out.len() - start - HEADER_LEN);
}

/// Sets the flags and payload length of the header at `start` and its checksum.
fn patch_header_len(out: &mut [u8], start: usize, flags: u16, len: usize) {
    let len = len as u32;
    out[start + 6..start + 8].copy_from_slice(&flags.to_le_bytes());
    out[start + 16..start + 20].copy_from_slice(&len.to_le_bytes());
    let crc = crc32c::crc32c(&out[start..start + 20]);
    out[start + 20..start + 24].copy_from_slice(&crc.to_le_bytes());
}

/// A protocol 1 Refuse frame (code Protocol), the one thing this version says to a peer that
/// speaks protocol 1, so that its log shows why it cannot attach.
pub fn encode_v1_refuse(reason: &str, out: &mut Vec<u8>) {
    let start = out.len();
    put_header(out, kind::REFUSE, 0, 0, 0);
    out[start + 4] = 1;
    out.extend_from_slice(&RefuseCode::Protocol.to_wire().to_le_bytes());
    out.extend_from_slice(truncate_utf8(reason, MAX_REASON).as_bytes());
    patch_header(out, start, 0);
}

/// Starts a Write frame whose data the caller appends straight into `out` (one copy from the
/// source, e.g. guest memory); [`finish_write`] then fills in checksum and length.
pub fn begin_write(out: &mut Vec<u8>, seq: u64, offset: u64) -> usize {
    let start = out.len();
    put_header(out, kind::WRITE, 0, seq, 0);
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    start
}

/// Completes a Write frame started with [`begin_write`] at `start`.
pub fn finish_write(out: &mut [u8], start: usize, resync: bool) {
    let data_at = start + HEADER_LEN + 12;
    let crc = crc32c::crc32c(&out[data_at..]);
    out[start + HEADER_LEN + 8..data_at].copy_from_slice(&crc.to_le_bytes());
    patch_header(out, start, if resync { FLAG_RESYNC } else { 0 });
}

/// The checksum a Write frame carries of its data (for [`encode_write_header`]).
pub fn data_crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// Appends everything of a Write frame but its data, which the caller sends right after it:
/// `data_len` bytes whose CRC32C is `data_crc`. With the data, the same bytes as [`encode`]
/// of `Frame::Write`, without copying the data.
pub fn encode_write_header(
    out: &mut Vec<u8>,
    seq: u64,
    offset: u64,
    data_len: usize,
    data_crc: u32,
    resync: bool,
) {
    let start = begin_write(out, seq, offset);
    let data_at = start + HEADER_LEN + 12;
    out[data_at - 4..data_at].copy_from_slice(&data_crc.to_le_bytes());
    let flags = if resync { FLAG_RESYNC } else { 0 };
    patch_header_len(out, start, flags, 12 + data_len);
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
// ---------------------------------------------------------------------------------------------
// Decoding

/// A frame decoded from the front of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded<'a> {
    pub seq: u64,
    pub frame: Frame<'a>,
    /// Bytes of the buffer this frame used.
    pub consumed: usize,
}

struct Header {
    kind: u8,
    flags: u16,
    seq: u64,
    len: usize,
}

fn parse_header(buf: &[u8]) -> Result<Option<Header>, FrameError> {
    if buf.len() < HEADER_LEN {
        // Reject garbage as early as possible: a wrong magic needs only 4 bytes.
        let n = buf.len().min(4);
        if buf[..n] != MAGIC[..n] {
            let mut m = [0u8; 4];
            m[..n].copy_from_slice(&buf[..n]);
            return Err(FrameError::BadMagic(m));
        }
        return Ok(None);
    }
    let magic = [buf[0], buf[1], buf[2], buf[3]];
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    let crc = u32::from_le_bytes([buf[20], buf[21], buf[22], buf[23]]);
    if crc != crc32c::crc32c(&buf[..20]) {
        return Err(FrameError::HeaderCrc);
    }
    if buf[4] != VERSION {
        return Err(FrameError::BadVersion(buf[4]));
    }
    let len = u32::from_le_bytes([buf[16], buf[17], buf[18], buf[19]]);
    if len as usize > MAX_PAYLOAD {
        return Err(FrameError::TooLarge(len));
    }
    Ok(Some(Header {
        kind: buf[5],
        flags: u16::from_le_bytes([buf[6], buf[7]]),
        seq: u64::from_le_bytes([
            buf[8], buf[9], buf[10], buf[11], buf[12], buf[13], buf[14], buf[15],
        ]),
        len: len as usize,
    }))
}

/// How many bytes the frame at the front of `buf` needs in total, once its header is there.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    Ok(parse_header(buf)?.map(|h| HEADER_LEN + h.len))
}

/// A cursor over a payload that fails with `Malformed` instead of panicking.
struct Cur<'a> {
    b: &'a [u8],
    kind: &'static str,
}

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.b.len() < n {
            return Err(FrameError::Malformed {
                kind: self.kind,
                what: "payload too short",
            });
        }
        let (a, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.b)
    }
    fn end(&self) -> Result<(), FrameError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Malformed {
                kind: self.kind,
                what: "trailing bytes",
            })
        }
    }
    fn bad(&self, what: &'static str) -> FrameError {
        FrameError::Malformed {
            kind: self.kind,
            what,
        }
    }
}

fn get_node(c: &mut Cur<'_>) -> Result<NodeInfo, FrameError> {
    let node_id = c.u64()?;
    let size = c.u64()?;
    let role = match c.u8()? {
        1 => Role::Primary,
        2 => Role::Secondary,
        _ => return Err(c.bad("unknown role")),
    };
    let disk_state = match c.u8()? {
        1 => DiskState::UpToDate,
        2 => DiskState::Inconsistent,
        3 => DiskState::Outdated,
        _ => return Err(c.bad("unknown disk state")),
    };
    let flags = c.u32()?;
    let generation = c.u64()?;
    let bitmap_generation = c.u64()?;
    let n = usize::from(c.u16()?);
    if n > MAX_HISTORY {
        return Err(c.bad("history too long"));
    }
    let mut history = Vec::with_capacity(n);
    for _ in 0..n {
        history.push(c.u64()?);
    }
    let n = usize::from(c.u16()?);
    if n > MAX_HOT {
        return Err(c.bad("too many hot extents"));
    }
    let mut hot = Vec::with_capacity(n);
    for _ in 0..n {
        hot.push(c.u64()?);
    }
    Ok(NodeInfo {
        node_id,
        size,
        role,
        disk_state,
        generation,
        bitmap_generation,
        history,
        flags,
        hot,
    })
}

/// Decodes the frame at the front of `buf`. `Ok(None)`: more bytes are needed. An error means
/// the stream is not a valid vhost-mirror stream; the connection should be dropped.
pub fn decode(buf: &[u8]) -> Result<Option<Decoded<'_>>, FrameError> {
    let Some(h) = parse_header(buf)? else {
        return Ok(None);
    };
    let total = HEADER_LEN + h.len;
    if buf.len() < total {
        return Ok(None);
    }
    let name = kind_name(h.kind);
    let mut c = Cur {
        b: &buf[HEADER_LEN..total],
        kind: name,
    };
    let frame = match h.kind {
        kind::NOISE_INIT => Frame::NoiseInit { msg: c.array()? },
        kind::NOISE_REPLY => Frame::NoiseReply { msg: c.array()? },
        kind::REFUSE => {
            let code = RefuseCode::from_wire(c.u16()?);
            let r = c.rest();
            if r.len() > MAX_REASON {
                return Err(c.bad("reason too long"));
            }
            let reason = std::str::from_utf8(r).map_err(|_| c.bad("reason is not UTF-8"))?;
            Frame::Refuse { code, reason }
        }
        kind::ATTACH => Frame::Attach(get_node(&mut c)?),
        kind::ATTACHED => Frame::Attached(get_node(&mut c)?),
        kind::SYNC_START => Frame::SyncStart {
            full: h.flags & FLAG_FULL != 0,
            bytes: c.u64()?,
        },
        kind::SYNC_DONE => Frame::SyncDone {
            generation: c.u64()?,
        },
        kind::WRITE => {
            let offset = c.u64()?;
            let crc = c.u32()?;
            let data = c.rest();
            if data.len() > MAX_DATA {
                return Err(c.bad("data larger than MAX_DATA"));
            }
            if crc32c::crc32c(data) != crc {
                return Err(FrameError::DataCrc(name));
            }
            Frame::Write {
                offset,
                resync: h.flags & FLAG_RESYNC != 0,
                data,
            }
        }
        kind::DISCARD => Frame::Discard {
            offset: c.u64()?,
            len: c.u64()?,
        },
        kind::WRITE_ZEROES => Frame::WriteZeroes {
            offset: c.u64()?,
            len: c.u64()?,
            unmap: h.flags & FLAG_UNMAP != 0,
        },
        kind::FLUSH => Frame::Flush,
        kind::READ => {
            let offset = c.u64()?;
            let len = c.u32()?;
            if len as usize > MAX_DATA {
                return Err(c.bad("read larger than MAX_DATA"));
            }
            Frame::Read { offset, len }
        }
        kind::READ_DATA => {
            let crc = c.u32()?;
            let data = c.rest();
            if crc32c::crc32c(data) != crc {
                return Err(FrameError::DataCrc(name));
            }
            Frame::ReadData { data }
        }
        kind::ACK => Frame::Ack {
            status: AckStatus::from_wire(c.u8()?),
        },
        kind::PING => Frame::Ping { nanos: c.u64()? },
        kind::PONG => Frame::Pong { nanos: c.u64()? },
        kind::GOODBYE => Frame::Goodbye,
        kind::READ_HASHES => {
            let offset = c.u64()?;
            let len = c.u32()?;
            if len as usize > MAX_HASH_SPAN {
                return Err(c.bad("span larger than MAX_HASH_SPAN"));
            }
            Frame::ReadHashes { offset, len }
        }
        kind::HASHES => {
            let crc = c.u32()?;
            let hashes = c.rest();
            if !hashes.len().is_multiple_of(HASH_LEN)
                || hashes.len() > blocks_in(MAX_HASH_SPAN) * HASH_LEN
            {
                return Err(c.bad("not a whole number of hashes, or too many"));
            }
            if crc32c::crc32c(hashes) != crc {
                return Err(FrameError::DataCrc(name));
            }
            Frame::Hashes { hashes }
        }
        kind::WITNESS => {
            let op = match c.u8()? {
                1 => WitnessOp::Outdate,
                2 => WitnessOp::Promote,
                3 => WitnessOp::Clear,
                _ => return Err(c.bad("unknown witness request")),
            };
            Frame::Witness {
                op,
                generation: c.u64()?,
                node: c.u64()?,
            }
        }
        other => return Err(FrameError::UnknownKind(other)),
    };
    c.end()?;
    Ok(Some(Decoded {
        seq: h.seq,
        frame,
        consumed: total,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fixed part of an encoded NodeInfo.
    const NODE_FIXED: usize = 8 + 8 + 1 + 1 + 4 + 8 + 8 + 2;

    fn node() -> NodeInfo {
        NodeInfo {
            node_id: 7,
            size: 1 << 30,
            role: Role::Primary,
            disk_state: DiskState::UpToDate,
            generation: 0xdead_beef,
            bitmap_generation: 42,
            history: vec![1, 2, 3],
            flags: NODE_FLAG_DISCARD_MY_DATA,
            hot: vec![4, 9],
        }
    }

    fn all_frames(data: &[u8]) -> Vec<Frame<'_>> {
        vec![
            Frame::NoiseInit { msg: [1; 56] },
            Frame::NoiseReply { msg: [2; 48] },
            Frame::Refuse {
                code: RefuseCode::SizeMismatch,
                reason: "size 1 != 2",
            },
            Frame::Attach(node()),
            Frame::Attached(NodeInfo {
                role: Role::Secondary,
                disk_state: DiskState::Inconsistent,
                history: vec![],
                ..node()
            }),
            Frame::SyncStart {
                full: true,
                bytes: 123,
            },
            Frame::SyncDone { generation: 9 },
            Frame::Write {
                offset: 4096,
                resync: true,
                data,
            },
            Frame::Write {
                offset: 0,
                resync: false,
                data: &[],
            },
            Frame::Discard {
                offset: 512,
                len: 1024,
            },
            Frame::WriteZeroes {
                offset: 512,
                len: 1024,
                unmap: true,
            },
            Frame::Flush,
            Frame::Read {
                offset: 8192,
                len: 4096,
            },
            Frame::ReadData { data },
            Frame::Ack {
                status: AckStatus::NoSpace,
            },
            Frame::Ping { nanos: 5 },
            Frame::Pong { nanos: 6 },
            Frame::Goodbye,
            Frame::ReadHashes {
                offset: 1 << 20,
                len: MAX_HASH_SPAN as u32,
            },
            Frame::Hashes {
                hashes: &data[..HASH_LEN * 3],
            },
        ]
    }

    #[test]
    fn hash_frames_refuse_what_no_replica_sends() {
        let mut buf = Vec::new();
        encode(
            1,
            &Frame::ReadHashes {
                offset: 0,
                len: MAX_HASH_SPAN as u32 + 1,
            },
            &mut buf,
        );
        assert!(matches!(decode(&buf), Err(FrameError::Malformed { .. })));
        for n in [HASH_LEN + 1, (blocks_in(MAX_HASH_SPAN) + 1) * HASH_LEN] {
            let h = vec![1u8; n];
            buf.clear();
            encode(1, &Frame::Hashes { hashes: &h }, &mut buf);
            assert!(
                matches!(decode(&buf), Err(FrameError::Malformed { .. })),
                "{n} bytes of hashes"
            );
        }
    }

    #[test]
    fn every_frame_round_trips() {
        let data: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let frames = all_frames(&data);
        let mut buf = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            encode(i as u64 * 3, f, &mut buf);
        }
        let mut at = 0;
        for (i, f) in frames.iter().enumerate() {
            let d = decode(&buf[at..]).unwrap().unwrap();
            assert_eq!(&d.frame, f);
            assert_eq!(d.seq, i as u64 * 3);
            at += d.consumed;
        }
        assert_eq!(at, buf.len());
        assert_eq!(decode(&buf[at..]).unwrap(), None);
    }

    #[test]
    fn incomplete_input_asks_for_more() {
        let mut buf = Vec::new();
        encode(
            1,
            &Frame::Write {
                offset: 0,
                resync: false,
                data: &[9; 100],
            },
            &mut buf,
        );
        for cut in 0..buf.len() {
            assert_eq!(decode(&buf[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert_eq!(frame_len(&buf[..HEADER_LEN]).unwrap(), Some(buf.len()));
        assert!(decode(&buf).unwrap().is_some());
    }

    #[test]
    fn streamed_write_matches_encode() {
        let data = [7u8; 1000];
        let mut a = Vec::new();
        encode(
            5,
            &Frame::Write {
                offset: 77,
                resync: true,
                data: &data,
            },
            &mut a,
        );
        let mut b = vec![0xAA; 3];
        let start = begin_write(&mut b, 5, 77);
        b.extend_from_slice(&data);
        finish_write(&mut b, start, true);
        assert_eq!(&b[3..], &a[..]);
        // The header alone, the data sent after it: the same bytes.
        for resync in [true, false] {
            let mut c = vec![0xAA; 5];
            encode_write_header(&mut c, 5, 77, data.len(), crc32c::crc32c(&data), resync);
            c.extend_from_slice(&data);
            let mut e = Vec::new();
            encode(
                5,
                &Frame::Write {
                    offset: 77,
                    resync,
                    data: &data,
                },
                &mut e,
            );
            assert_eq!(&c[5..], &e[..]);
        }
    }

    #[test]
    fn garbage_is_rejected_early() {
        assert!(matches!(
            decode(b"GET / HTTP/1.1\r\n"),
            Err(FrameError::BadMagic(_))
        ));
        assert!(matches!(decode(b"X"), Err(FrameError::BadMagic(_))));
        assert_eq!(decode(b"VH").unwrap(), None);
        let mut junk = MAGIC.to_vec();
        junk.extend_from_slice(&[0u8; 30]);
        assert_eq!(decode(&junk), Err(FrameError::HeaderCrc));
    }

    fn header(kind: u8, flags: u16, len: u32) -> Vec<u8> {
        let mut h = Vec::new();
        put_header(&mut h, kind, flags, 0, len as usize);
        h
    }

    #[test]
    fn oversized_length_is_an_error_not_an_allocation() {
        let h = header(kind::WRITE, 0, u32::MAX);
        assert_eq!(decode(&h), Err(FrameError::TooLarge(u32::MAX)));
        assert_eq!(frame_len(&h), Err(FrameError::TooLarge(u32::MAX)));
        let h = header(kind::WRITE, 0, MAX_PAYLOAD as u32 + 1);
        assert!(matches!(decode(&h), Err(FrameError::TooLarge(_))));
    }

    #[test]
    fn wrong_version_and_unknown_kind() {
        let mut h = header(kind::FLUSH, 0, 0);
        h[4] = 9;
        let crc = crc32c::crc32c(&h[..20]);
        h[20..24].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode(&h), Err(FrameError::BadVersion(9)));
        let h = header(200, 0, 0);
        assert_eq!(decode(&h), Err(FrameError::UnknownKind(200)));
    }

    #[test]
    fn corrupted_data_is_detected() {
        let mut buf = Vec::new();
        encode(
            1,
            &Frame::Write {
                offset: 0,
                resync: false,
                data: &[1; 64],
            },
            &mut buf,
        );
        let last = buf.len() - 1;
        buf[last] ^= 0xff;
        assert_eq!(decode(&buf), Err(FrameError::DataCrc("Write")));
    }

    #[test]
    fn short_and_long_payloads_are_malformed() {
        // An Ack without its status byte.
        let h = header(kind::ACK, 0, 0);
        assert!(matches!(decode(&h), Err(FrameError::Malformed { .. })));
        // A Flush with a trailing byte.
        let mut h = header(kind::FLUSH, 0, 1);
        h.push(0);
        assert!(matches!(
            decode(&h),
            Err(FrameError::Malformed {
                what: "trailing bytes",
                ..
            })
        ));
        // A history longer than allowed.
        let mut body = Vec::new();
        put_node(&mut body, &node());
        let at = NODE_FIXED - 2;
        body[at..at + 2].copy_from_slice(&1000u16.to_le_bytes());
        let mut f = header(kind::ATTACH, 0, body.len() as u32);
        f.extend_from_slice(&body);
        assert!(matches!(decode(&f), Err(FrameError::Malformed { .. })));
        // Reason that is not UTF-8.
        let mut f = header(kind::REFUSE, 0, 4);
        f.extend_from_slice(&[1, 0, 0xff, 0xfe]);
        assert!(matches!(decode(&f), Err(FrameError::Malformed { .. })));
    }

    #[test]
    fn long_reason_is_truncated_on_a_char_boundary() {
        let reason = "é".repeat(150);
        let mut buf = Vec::new();
        encode(
            0,
            &Frame::Refuse {
                code: RefuseCode::Other,
                reason: &reason,
            },
            &mut buf,
        );
        match decode(&buf).unwrap().unwrap().frame {
            Frame::Refuse { reason, .. } => assert!(reason.len() <= MAX_REASON),
            f => panic!("{f:?}"),
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        // A small deterministic fuzz: every prefix of pseudo-random buffers, with and without a
        // valid header in front.
        let mut x = 0x1234_5678_9abc_def0u64;
        for _ in 0..2000 {
            let mut buf = Vec::new();
            let n = (x % 300) as usize;
            for _ in 0..n {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                buf.push(x as u8);
            }
            let _ = decode(&buf);
            let mut framed = header((x % 21) as u8, (x >> 8) as u16, buf.len() as u32);
            framed.extend_from_slice(&buf);
            let _ = decode(&framed);
        }
    }
}
