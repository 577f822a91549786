//! The real server, in process, on 127.0.0.1 and a temp dir, driven by a fake primary built on
//! mirror-proto's codec.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use mirror_proto::activity_log::{self, AlFile};
use mirror_proto::auth::Secret;
use mirror_proto::bitmap_file::BitmapFile;
use mirror_proto::conn::FrameReader;
use mirror_proto::frame::{
    self, AckStatus, DiskState, Frame, NodeInfo, RefuseCode, Role, MAGIC, MAX_DATA,
    NODE_FLAG_DISCARD_MY_DATA, NODE_FLAG_HASHES,
};
use mirror_proto::meta::{Meta, META_FORMAT};
use mirror_proto::secure::{self, SecureError, SecureReader, SecureWriter};
use mirror_proto::{control, meta};
use serde_json::Value;

use super::*;
use crate::config::{PrimaryLoss, ServeConfig};
use crate::replica::SyncHook;

const SECRET: &[u8] = b"correct horse battery staple";
const MIB: u64 = 1 << 20;

struct Fixture {
    dir: tempfile::TempDir,
    image: PathBuf,
    control: PathBuf,
    addr: SocketAddr,
    /// Gets a message when `Server::serve` returned (the process would exit 0 then).
    done: mpsc::Receiver<()>,
    node: Arc<Node>,
}

#[derive(Default)]
struct Opts {
    discard_my_data: bool,
    primary_loss: Option<PrimaryLoss>,
}

impl Fixture {
    fn start() -> Self {
        Self::start_with(|_| {})
    }

    /// Starts a server; `prepare` gets the image path before the server opens it.
    fn start_with(prepare: impl FnOnce(&Path)) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), prepare, Opts::default())
    }

    fn start_opts(opts: Opts) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), |_| {}, opts)
    }

    /// Starts a server on `dir/replica.img`, control socket `dir/ctl`.
    fn start_in(dir: tempfile::TempDir, prepare: impl FnOnce(&Path), opts: Opts) -> Self {
        let image = dir.path().join("replica.img");
        let control = dir.path().join("ctl");
        prepare(&image);
        let config = ServeConfig {
            image: image.clone(),
            listen: "127.0.0.1:0".parse().unwrap(),
            secret: Secret::from_bytes(SECRET).unwrap(),
            control: Some(control.clone()),
            socket_access: Default::default(),
            cache_bytes: MIB,
            handshake_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(1),
            discard_my_data: opts.discard_my_data,
            primary_loss: opts.primary_loss,
            witness: None,
            metrics: None,
        };
        let server = Server::bind(config).unwrap();
        let addr = server.local_addr().unwrap();
        let node = server.node.clone();
        let (tx, done) = mpsc::channel();
        std::thread::spawn(move || {
            server.serve().unwrap();
            let _ = tx.send(());
        });
        Fixture {
            dir,
            image,
            control,
            addr,
            done,
            node,
        }
    }

    /// Promotes through the control socket.
    fn promote(&self, command: &str) -> Result<Value, control::ControlError> {
        control::request(&self.control, command)
    }

    fn status(&self) -> Value {
        control::query_status(&self.control).unwrap()
    }

    /// Polls the status until `f` holds (the server updates it after the client sees a reply).
    fn wait_status(&self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let v = self.status();
            if f(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {v}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn primary(&self) -> Primary {
        Primary::connect(self.addr)
    }

    /// A primary through the whole handshake.
    fn attach(&self, size: u64) -> (Primary, NodeInfo) {
        let mut p = self.primary();
        let info = p.handshake(SECRET, size).unwrap();
        (p, info)
    }
}

/// A reply, copied out of the reader's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    Refuse(RefuseCode, String),
    Attached(NodeInfo),
    Ack(AckStatus),
    Data(Vec<u8>),
    Hashes(Vec<u8>),
    Pong(u64),
    Other(String),
}

struct Primary {
    stream: TcpStream,
    /// The encrypted link, once the Noise handshake is done.
    link: Option<(
        FrameReader<SecureReader<TcpStream>>,
        SecureWriter<TcpStream>,
    )>,
    seq: u64,
}

fn node(size: u64) -> NodeInfo {
    NodeInfo {
        node_id: 0x1111,
        size,
        role: Role::Primary,
        disk_state: DiskState::UpToDate,
        generation: 0xabc,
        bitmap_generation: 0,
        history: vec![],
        flags: 0,
        hot: vec![],
    }
}

impl Primary {
    fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_nodelay(true).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        Primary {
            stream,
            link: None,
            seq: 0,
        }
    }

    /// Sends a frame (inside the encrypted link once there is one), returns its sequence
    /// number.
    fn send(&mut self, f: &Frame<'_>) -> u64 {
        self.seq += 1;
        let mut b = Vec::new();
        frame::encode(self.seq, f, &mut b);
        self.send_bytes(&b);
        self.seq
    }

    /// Sends bytes as the primary would (encrypted once the link is up).
    fn send_bytes(&mut self, b: &[u8]) {
        match &mut self.link {
            Some((_, w)) => w.send(b).unwrap(),
            None => self.stream.write_all(b).unwrap(),
        }
    }

    fn recv(&mut self) -> (u64, Reply) {
        let (reader, _) = self.link.as_mut().expect("a reply before the handshake");
        let d = reader.read_frame().unwrap();
        let r = match d.frame {
            Frame::Refuse { code, reason } => Reply::Refuse(code, reason.to_owned()),
            Frame::Attached(n) => Reply::Attached(n),
            Frame::Ack { status } => Reply::Ack(status),
            Frame::ReadData { data } => Reply::Data(data.to_vec()),
            Frame::Hashes { hashes } => Reply::Hashes(hashes.to_vec()),
            Frame::Pong { nanos } => Reply::Pong(nanos),
            f => Reply::Other(f.name().to_owned()),
        };
        (d.seq, r)
    }

    /// One request, one reply with the same sequence number.
    fn call(&mut self, f: &Frame<'_>) -> Reply {
        let seq = self.send(f);
        let (s, r) = self.recv();
        assert_eq!(s, seq, "reply to {f:?}");
        r
    }

    /// The Noise handshake.
    fn noise(&mut self, secret: &[u8]) -> Result<(), SecureError> {
        let secret = Secret::from_bytes(secret).unwrap();
        let keys = secure::initiate(&mut self.stream, &secret)?;
        let r = SecureReader::new(self.stream.try_clone().unwrap(), keys.clone());
        let w = SecureWriter::new(self.stream.try_clone().unwrap(), keys);
        self.link = Some((FrameReader::new(r), w));
        Ok(())
    }

    /// The primary's side of the handshake; Err: the replica refused (or closed: wrong
    /// secret).
    fn handshake(&mut self, secret: &[u8], size: u64) -> Result<NodeInfo, (RefuseCode, String)> {
        self.noise(secret)
            .map_err(|e| (RefuseCode::AuthFailed, e.to_string()))?;
        match self.call(&Frame::Attach(node(size))) {
            Reply::Attached(n) => Ok(n),
            Reply::Refuse(c, r) => Err((c, r)),
            r => panic!("{r:?}"),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Reply {
        self.call(&Frame::Write {
            offset,
            resync: false,
            data,
        })
    }

    fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
        match self.call(&Frame::Read { offset, len }) {
            Reply::Data(d) => d,
            r => panic!("{r:?}"),
        }
    }

    /// True if the replica closed the connection (EOF or reset) within the read timeout.
    fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 256];
        loop {
            match self.stream.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue, // e.g. a Refuse before the close
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn handshake_writes_flush_and_read_back() {
    let f = Fixture::start();
    assert_eq!(f.status()["capacity_bytes"], 0);
    let (mut p, info) = f.attach(8 * MIB);
    assert_eq!(info.size, 8 * MIB);
    assert_eq!(info.role, Role::Secondary);
    assert_eq!(info.disk_state, DiskState::Inconsistent);
    assert_eq!(info.generation, 0);
    assert_eq!(info.bitmap_generation, 0);
    assert_ne!(info.node_id, 0);
    assert_eq!(std::fs::metadata(&f.image).unwrap().len(), 8 * MIB);

    // Pipelined writes (one of MAX_DATA), answered in order with matching sequence numbers.
    let writes: Vec<(u64, Vec<u8>)> = vec![
        (0, pattern(1, 4096)),
        (MIB - 100, pattern(2, 300)),
        (3 * MIB, pattern(3, MAX_DATA)),
        (8 * MIB - 512, pattern(4, 512)),
    ];
    let seqs: Vec<u64> = writes
        .iter()
        .map(|(o, d)| {
            p.send(&Frame::Write {
                offset: *o,
                resync: false,
                data: d,
            })
        })
        .collect();
    let flush = p.send(&Frame::Flush);
    for s in seqs.iter().chain([&flush]) {
        assert_eq!(p.recv(), (*s, Reply::Ack(AckStatus::Ok)));
    }

    let file = std::fs::read(&f.image).unwrap();
    for (o, d) in &writes {
        assert_eq!(&file[*o as usize..*o as usize + d.len()], &d[..]);
        assert_eq!(p.read(*o, d.len() as u32), *d, "read at {o}");
    }
    // Read again: served from the cache now, still the same.
    assert_eq!(p.read(8 * MIB - 512, 512), writes[3].1);
    assert!(matches!(
        p.call(&Frame::Ping { nanos: 42 }),
        Reply::Pong(42)
    ));

    let v = f.status();
    assert_eq!(v["peer_state"], "connected");
    assert_eq!(v["peer"], p.stream.local_addr().unwrap().to_string());
    assert_eq!(v["role"], "secondary");
    assert_eq!(v["disk_state"], "inconsistent");
    assert_eq!(v["capacity_bytes"], 8 * MIB);
    assert_eq!(v["writes"], 4);
    assert_eq!(v["flushes"], 1);
    assert_eq!(v["reads"], 5);
    assert_eq!(v["bytes_written"], 4096 + 300 + MAX_DATA as u64 + 512);
    assert_eq!(v["errors"], 0);
    assert!(v["cache_hits"].as_u64().unwrap() >= 1, "{v}");
    assert!(v["cache_misses"].as_u64().unwrap() >= 1, "{v}");
    assert!(v["cache_bytes"].as_u64().unwrap() <= MIB);
    assert_eq!(v["cache_capacity_bytes"], MIB);
    assert!(v["bytes_received"].as_u64().unwrap() > MAX_DATA as u64);
    assert!(v["bytes_sent"].as_u64().unwrap() > MAX_DATA as u64);

    p.send(&Frame::Goodbye);
    assert!(p.is_closed());
    let v = f.wait_status("disconnected", |v| v["peer_state"] == "disconnected");
    assert_eq!(v["peer_reason"], Value::Null);
    assert_eq!(v["peer"], Value::Null);
    // The next primary finds the same replica.
    let (_p2, info2) = f.attach(8 * MIB);
    assert_eq!(info2.node_id, info.node_id);
}

#[test]
fn discard_and_write_zeroes_through_the_cache() {
    let f = Fixture::start();
    let (mut p, _) = f.attach(MIB);
    let data = pattern(9, 256 * 1024);
    assert_eq!(p.write(0, &data), Reply::Ack(AckStatus::Ok));
    assert_eq!(p.read(0, data.len() as u32), data); // now cached
    assert_eq!(
        p.call(&Frame::Discard {
            offset: 4096,
            len: 8192
        }),
        Reply::Ack(AckStatus::Ok)
    );
    assert_eq!(
        p.call(&Frame::WriteZeroes {
            offset: 100_000,
            len: 1000,
            unmap: false
        }),
        Reply::Ack(AckStatus::Ok)
    );
    let back = p.read(0, data.len() as u32);
    let mut want = data.clone();
    want[4096..12288].fill(0);
    want[100_000..101_000].fill(0);
    assert_eq!(back, want);
    assert_eq!(&std::fs::read(&f.image).unwrap()[..want.len()], &want[..]);
    let v = f.status();
    assert_eq!(
        (v["discards"].as_u64(), v["write_zeroes"].as_u64()),
        (Some(1), Some(1))
    );
}

#[test]
fn out_of_range_requests_are_acked_and_the_link_stays() {
    let f = Fixture::start();
    let (mut p, _) = f.attach(MIB);
    assert_eq!(p.write(MIB - 1, &[1, 2]), Reply::Ack(AckStatus::OutOfRange));
    assert_eq!(
        p.call(&Frame::Discard {
            offset: u64::MAX,
            len: 2
        }),
        Reply::Ack(AckStatus::OutOfRange)
    );
    assert_eq!(
        p.call(&Frame::Read {
            offset: MIB,
            len: 1
        }),
        Reply::Ack(AckStatus::OutOfRange)
    );
    assert_eq!(p.write(0, &[1, 2]), Reply::Ack(AckStatus::Ok));
    assert_eq!(f.status()["errors"], 3);
}

#[test]
fn wrong_secret_is_dropped_counted_and_kept_out_of_the_peer_state() {
    let f = Fixture::start();
    // The replica closes without a word after a first message made with another secret.
    let mut p = f.primary();
    let e = p.noise(b"the wrong secret, 16+ bytes").unwrap_err();
    assert!(matches!(e, SecureError::Closed | SecureError::Io(_)), "{e}");
    let v = f.wait_status("counted", |v| v["handshake_failures"] == 1);
    assert!(
        v["last_handshake_failure"]
            .as_str()
            .unwrap()
            .contains("authentication failed"),
        "{v}"
    );
    // Anyone can connect: that is not the state of the primary.
    assert_eq!(v["peer_state"], "disconnected", "{v}");
    // The right secret still works.
    let (_p, _) = f.attach(MIB);
    assert_eq!(f.status()["peer_state"], "connected");
}

#[test]
fn a_protocol_1_primary_is_told_to_upgrade() {
    let f = Fixture::start();
    let mut p = f.primary();
    // Protocol 1's Hello: header (version 1, kind 1, 32 bytes) and a nonce.
    let mut hello = Vec::new();
    frame::encode(0, &Frame::Flush, &mut hello);
    hello[4] = 1;
    hello[5] = 1;
    hello[16..20].copy_from_slice(&32u32.to_le_bytes());
    let crc = crc32c(&hello[..20]);
    hello[20..24].copy_from_slice(&crc.to_le_bytes());
    hello.extend_from_slice(&[9; 32]);
    p.stream.write_all(&hello).unwrap();
    let mut reply = Vec::new();
    let _ = p.stream.read_to_end(&mut reply);
    assert!(reply.len() > 26, "{reply:02x?}");
    assert_eq!(
        (&reply[..4], reply[4], reply[5]),
        (&MAGIC[..], 1, 5),
        "a v1 Refuse"
    );
    let reason = String::from_utf8_lossy(&reply[26..]);
    assert!(
        reason.contains("protocol 2") && reason.contains("upgrade"),
        "{reason}"
    );
}

#[test]
fn size_mismatch_is_refused_and_the_image_untouched() {
    let f = Fixture::start_with(|img| {
        std::fs::write(img, pattern(5, 65536)).unwrap();
        let old = SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(img)
            .unwrap()
            .set_modified(old)
            .unwrap();
    });
    let before = std::fs::metadata(&f.image).unwrap().modified().unwrap();
    assert_eq!(f.status()["capacity_bytes"], 65536);
    let mut p = f.primary();
    let (code, reason) = p.handshake(SECRET, MIB).unwrap_err();
    assert_eq!(code, RefuseCode::SizeMismatch);
    assert!(
        reason.contains("65536") && reason.contains(&MIB.to_string()),
        "{reason}"
    );
    assert!(reason.contains("replica.img"), "{reason}");
    assert!(p.is_closed());
    assert_eq!(std::fs::read(&f.image).unwrap(), pattern(5, 65536));
    assert_eq!(
        std::fs::metadata(&f.image).unwrap().modified().unwrap(),
        before
    );
    assert!(!meta::meta_path(&f.image).exists());
    let v = f.status();
    assert_eq!(v["peer_state"], "refused");
    assert!(v["peer_reason"].as_str().unwrap().contains("65536"));
    // The right size is accepted: existing content without metadata is unknown content.
    let (_p, info) = f.attach(65536);
    assert_eq!(
        (info.generation, info.disk_state),
        (0, DiskState::Inconsistent)
    );
    assert_eq!(std::fs::read(&f.image).unwrap(), pattern(5, 65536));
}

#[test]
fn second_primary_is_refused_busy() {
    let f = Fixture::start();
    let (mut a, _) = f.attach(MIB);
    let mut b = f.primary();
    let (code, reason) = b.handshake(SECRET, MIB).unwrap_err();
    assert_eq!(code, RefuseCode::Busy);
    assert!(reason.contains("busy"), "{reason}");
    // An unauthenticated peer does not learn who is attached.
    assert!(!reason.contains("127.0.0.1"), "{reason}");
    assert!(b.is_closed());
    // The attached one is unaffected.
    assert_eq!(a.write(0, &[1; 512]), Reply::Ack(AckStatus::Ok));
    assert_eq!(f.status()["peer_state"], "connected");
    // Once it leaves, another can attach.
    a.send(&Frame::Goodbye);
    assert!(a.is_closed());
    f.wait_status("slot free", |v| v["peer_state"] == "disconnected");
    let (mut c, _) = f.attach(MIB);
    assert_eq!(c.read(0, 512), vec![1; 512]);
}

/// Sends `bytes` on a fresh connection (after a Hello if `after_hello`), expects the server to
/// close it.
fn expect_dropped(f: &Fixture, bytes: &[u8], shutdown: bool) {
    let mut p = f.primary();
    p.stream.write_all(bytes).unwrap();
    if shutdown {
        p.stream.shutdown(Shutdown::Write).unwrap();
    }
    assert!(p.is_closed(), "connection not dropped after {bytes:02x?}");
}

fn oversized_header() -> Vec<u8> {
    let mut h = Vec::new();
    frame::encode(1, &Frame::Flush, &mut h);
    h[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    let crc = crc32c(&h[..20]);
    h[20..24].copy_from_slice(&crc.to_le_bytes());
    h
}

/// CRC32C (Castagnoli), bitwise: the test needs it only for a handful of header bytes.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for b in data {
        crc ^= u32::from(*b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn protocol_violations_drop_only_that_connection() {
    let f = Fixture::start();
    // Before the handshake.
    expect_dropped(&f, b"GET / HTTP/1.1\r\n\r\n", false);
    let mut bad_crc = Vec::new();
    frame::encode(1, &Frame::NoiseInit { msg: [0; 56] }, &mut bad_crc);
    bad_crc[10] ^= 1;
    expect_dropped(&f, &bad_crc, false);
    let mut truncated = Vec::new();
    frame::encode(1, &Frame::NoiseInit { msg: [0; 56] }, &mut truncated);
    truncated.truncate(30);
    expect_dropped(&f, &truncated, true);
    expect_dropped(&f, &MAGIC[..2], true);
    expect_dropped(&f, &oversized_header(), false);
    // A data frame where NoiseInit belongs: closed (nothing is said to an unauthenticated
    // peer).
    let mut flush = Vec::new();
    frame::encode(1, &Frame::Flush, &mut flush);
    expect_dropped(&f, &flush, false);
    // A frame in clear after the handshake.
    let mut p = f.primary();
    p.noise(SECRET).unwrap();
    p.stream.write_all(&flush).unwrap();
    p.stream.write_all(&[0; 70000]).unwrap();
    assert!(p.is_closed());

    // During the data phase, inside the encrypted link: garbage, a corrupted write, an
    // oversized length, a wrong kind.
    let mut corrupt = Vec::new();
    frame::encode(
        5,
        &Frame::Write {
            offset: 0,
            resync: false,
            data: &[7; 100],
        },
        &mut corrupt,
    );
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0xff;
    let mut attach_again = Vec::new();
    frame::encode(9, &Frame::Attach(node(MIB)), &mut attach_again);
    for bad in [
        b"\0\0garbage".to_vec(),
        corrupt,
        oversized_header(),
        attach_again,
    ] {
        let (mut p, _) = f.attach(MIB);
        assert_eq!(p.write(0, &[1; 16]), Reply::Ack(AckStatus::Ok));
        p.send_bytes(&bad);
        assert!(p.is_closed(), "not dropped after {:02x?}", &bad[..8]);
        let v = f.wait_status("dropped", |v| v["peer_state"] == "disconnected");
        assert!(v["peer_reason"].is_string(), "{v}");
    }
    // A truncated frame then EOF while attached.
    let (mut p, _) = f.attach(MIB);
    let mut w = Vec::new();
    frame::encode(
        3,
        &Frame::Write {
            offset: 0,
            resync: false,
            data: &[2; 1000],
        },
        &mut w,
    );
    p.send_bytes(&w[..500]);
    p.stream.shutdown(Shutdown::Write).unwrap();
    assert!(p.is_closed());
    f.wait_status("dropped", |v| v["peer_state"] == "disconnected");

    // The server still serves a proper primary, and none of the bad writes landed.
    let (mut p, _) = f.attach(MIB);
    assert_eq!(p.read(0, 16), vec![1; 16]);
}

/// Review finding: a record trickled a byte at a time kept the attached session (and the
/// slot) forever: each read got a byte before its timeout. The reaper cuts a primary that sent
/// no whole frame for the idle timeout (1 s here), and the slot is free again.
#[test]
fn a_trickling_primary_is_cut_off_and_the_slot_freed() {
    let f = Fixture::start();
    let (mut p, _) = f.attach(MIB);
    assert_eq!(p.write(0, &[1; 512]), Reply::Ack(AckStatus::Ok));
    p.stream.write_all(&[0xff, 0xff]).unwrap();
    let t0 = Instant::now();
    let mut s = p.stream.try_clone().unwrap();
    let trickle = std::thread::spawn(move || {
        while t0.elapsed() < Duration::from_secs(6) && s.write_all(&[0]).is_ok() {
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    f.wait_status("cut off", |v| v["peer_state"] == "disconnected");
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(4), "cut off after {took:?}");
    let (mut q, _) = f.attach(MIB);
    assert_eq!(q.read(0, 512), vec![1; 512]);
    let _ = trickle.join();
}

#[test]
fn silent_primary_is_dropped_after_the_idle_timeout() {
    let f = Fixture::start();
    let (mut p, _) = f.attach(MIB);
    // Pings keep it alive past the timeout (1 s in these tests).
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(p.call(&Frame::Ping { nanos: 1 }), Reply::Pong(1));
    }
    let v = f.wait_status("idle drop", |v| v["peer_state"] == "disconnected");
    assert!(
        v["peer_reason"]
            .as_str()
            .unwrap()
            .contains("nothing received"),
        "{v}"
    );
    assert!(p.is_closed());
    f.attach(MIB);

    // A client that connects and says nothing does not keep a primary out, and is dropped
    // after the handshake timeout (2 s in these tests).
    let mut silent = f.primary();
    let connected = Instant::now();
    let f2 = Fixture::start();
    let _silent2 = f2.primary();
    f2.attach(MIB);
    // TCP_DEFER_ACCEPT (2 s) hands the silent connection to the server only when the kernel
    // gives up waiting for data (its SYN-ACK retransmits: ~3 s), then the 2 s deadline cuts it:
    // about 5 s after connecting. One read times out after 5 s: look until 15 s have passed.
    let mut closed = silent.is_closed();
    while !closed && connected.elapsed() < Duration::from_secs(15) {
        closed = silent.is_closed();
    }
    assert!(
        closed,
        "a silent connection outlived the handshake deadline"
    );
}

#[test]
fn resync_updates_metadata_on_disk() {
    let f = Fixture::start();
    let (mut p, _) = f.attach(MIB);
    assert_eq!(
        p.call(&Frame::SyncStart {
            full: true,
            bytes: MIB
        }),
        Reply::Ack(AckStatus::Ok)
    );
    let m = meta::load(&f.image).unwrap().unwrap();
    assert_eq!(m.disk_state, DiskState::Inconsistent);
    let v = f.status();
    assert_eq!(v["resyncing"], true);
    assert_eq!(v["out_of_sync_bytes"], MIB);
    let chunk = pattern(3, 256 * 1024);
    for i in 0..3u64 {
        let r = p.call(&Frame::Write {
            offset: i * chunk.len() as u64,
            resync: true,
            data: &chunk,
        });
        assert_eq!(r, Reply::Ack(AckStatus::Ok));
    }
    let v = f.status();
    assert_eq!(v["resync_done_bytes"], 3 * 256 * 1024);
    assert_eq!(v["out_of_sync_bytes"], 256 * 1024);
    // A guest write in between does not count as resync progress.
    assert_eq!(p.write(0, &[1; 512]), Reply::Ack(AckStatus::Ok));
    assert_eq!(f.status()["resync_done_bytes"], 3 * 256 * 1024);
    assert_eq!(
        p.call(&Frame::SyncDone { generation: 0x77 }),
        Reply::Ack(AckStatus::Ok)
    );
    let m = meta::load(&f.image).unwrap().unwrap();
    assert_eq!((m.generation, m.disk_state), (0x77, DiskState::UpToDate));
    let text = std::fs::read_to_string(meta::meta_path(&f.image)).unwrap();
    assert!(text.contains("up-to-date"), "{text}");
    let v = f.status();
    assert_eq!(v["resyncing"], false);
    assert_eq!(v["out_of_sync_bytes"], 0);
    assert_eq!(v["disk_state"], "up-to-date");
    assert_eq!(v["generation"], 0x77);

    // A second resync moves the old generation into the history, seen by the next primary.
    p.call(&Frame::SyncStart {
        full: false,
        bytes: 0,
    });
    assert_eq!(f.status()["disk_state"], "inconsistent");
    p.call(&Frame::SyncDone { generation: 0x88 });
    p.send(&Frame::Goodbye);
    assert!(p.is_closed());
    f.wait_status("detached", |v| v["peer_state"] == "disconnected");
    let (_p, info) = f.attach(MIB);
    assert_eq!(info.generation, 0x88);
    assert_eq!(info.disk_state, DiskState::UpToDate);
    assert_eq!(info.history, vec![0x77]);
}

#[test]
fn primary_refusing_after_attach_is_shown() {
    let f = Fixture::start();
    let (mut p, _) = f.attach(MIB);
    p.send(&Frame::Refuse {
        code: RefuseCode::Other,
        reason: "the replica has newer data",
    });
    assert!(p.is_closed());
    let v = f.wait_status("refused", |v| v["peer_state"] == "refused");
    assert_eq!(v["peer_reason"], "the replica has newer data");
}

#[test]
fn split_brain_refusal_is_shown_with_both_generations() {
    let f = Fixture::start();
    assert_eq!(f.status()["peer_generation"], Value::Null);
    let (mut p, _) = f.attach(MIB);
    sync(&mut p, 0x55);
    p.send(&Frame::Refuse {
        code: RefuseCode::SplitBrain,
        reason: "split brain: both sides wrote since they last agreed",
    });
    assert!(p.is_closed());
    let v = f.wait_status("split-brain", |v| v["peer_state"] == "split-brain");
    assert_eq!(
        v["peer_reason"],
        "split brain: both sides wrote since they last agreed"
    );
    assert_eq!(v["generation"], 0x55);
    assert_eq!(v["peer_generation"], node(MIB).generation);
    let t = control::render_table(&v);
    assert!(
        t.contains("split-brain") && t.contains("peer generation 0000000000000abc"),
        "{t}"
    );
}

/// SyncStart, SyncDone(generation): the replica is up to date at `generation`.
fn sync(p: &mut Primary, generation: u64) {
    let r = p.call(&Frame::SyncStart {
        full: true,
        bytes: 0,
    });
    assert_eq!(r, Reply::Ack(AckStatus::Ok));
    assert_eq!(
        p.call(&Frame::SyncDone { generation }),
        Reply::Ack(AckStatus::Ok)
    );
}

/// Whether another process (or descriptor) could lock the image now.
fn unlocked(image: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(image).unwrap();
    // SAFETY: flock on a descriptor we own; the lock goes with it when `f` is dropped.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

fn meta_of(image: &Path) -> Meta {
    meta::load(image).unwrap().unwrap()
}

fn wait_done(f: &Fixture) {
    f.done
        .recv_timeout(Duration::from_secs(5))
        .expect("the server did not stop after the promotion");
}

/// An image of `size` bytes with metadata, a bitmap with bits set and an activity log listing
/// `hot`, as an old primary's image looks.
fn old_image(image: &Path, size: u64, m: &Meta, hot: &[u64]) {
    std::fs::File::create(image).unwrap().set_len(size).unwrap();
    meta::save(image, m).unwrap();
    let (bf, mut b) = BitmapFile::open_or_create(image, size).unwrap();
    b.set_all();
    bf.persist_all(&b).unwrap();
    if !hot.is_empty() {
        let (mut al, _) = AlFile::open(image).unwrap();
        al.commit(hot).unwrap();
    }
}

fn meta_with(role: Role, disk_state: DiskState, generation: u64) -> Meta {
    Meta {
        format: META_FORMAT,
        node_id: 0x99,
        size: MIB,
        role,
        disk_state,
        generation,
        bitmap_generation: 0,
        history: vec![0x11],
    }
}

#[test]
fn promote_refuses_an_inconsistent_replica_unless_forced() {
    let f = Fixture::start();
    let (mut p, info) = f.attach(MIB);
    assert_eq!(info.disk_state, DiskState::Inconsistent);
    let before = std::fs::read(meta::meta_path(&f.image)).unwrap();
    let e = f.promote("promote").unwrap_err().to_string();
    assert!(
        e.contains("inconsistent") && e.contains("--force") && !e.contains('\n'),
        "{e}"
    );
    // Nothing happened: the primary goes on, the metadata is the same.
    assert_eq!(p.write(0, &[3; 512]), Reply::Ack(AckStatus::Ok));
    assert_eq!(std::fs::read(meta::meta_path(&f.image)).unwrap(), before);
    assert_eq!(f.status()["peer_state"], "connected");
    assert!(f.done.try_recv().is_err());

    let v = f.promote("promote force").unwrap();
    assert_eq!(v["promoted"], true);
    assert_eq!(v["forced"], true);
    assert_eq!(v["previous_generation"], 0);
    assert!(p.is_closed());
    wait_done(&f);
    assert!(unlocked(&f.image));
    let m = meta_of(&f.image);
    assert_eq!((m.role, m.disk_state), (Role::Primary, DiskState::UpToDate));
    assert_eq!(Some(m.generation), v["generation"].as_u64());
    assert_ne!(m.generation, 0);
    // A forced image is no known generation plus a bitmap: every peer gets a full sync.
    assert_eq!(m.bitmap_generation, 0);
    assert!(m.history.is_empty());
    assert_eq!(&std::fs::read(&f.image).unwrap()[..512], &[3; 512]);
}

#[test]
fn promote_fences_the_primary_and_prepares_the_image_for_vhost_mirror() {
    // A replica that once was a primary: a stale bitmap full of bits and an old activity log.
    let old = meta_with(Role::Secondary, DiskState::UpToDate, 0x77);
    let f = Fixture::start_in(
        tempfile::tempdir().unwrap(),
        |img| old_image(img, MIB, &old, &[0]),
        Opts::default(),
    );
    let (mut p, _) = f.attach(MIB);
    sync(&mut p, 0x77);
    assert_eq!(p.write(4096, &[9; 4096]), Reply::Ack(AckStatus::Ok));
    // Pipelined behind the promotion: whatever is not applied before it never is.
    let v = f.promote("promote").unwrap();
    assert_eq!(v["promoted"], true);
    assert_eq!(v["already_primary"], false);
    assert_eq!(v["previous_generation"], 0x77);
    let new = v["generation"].as_u64().unwrap();
    assert_ne!(new, 0x77);
    assert!(v["image"].as_str().unwrap().ends_with("replica.img"), "{v}");
    // The primary is cut off, the server stops, the image is free.
    assert!(p.is_closed());
    wait_done(&f);
    assert!(!f.control.exists());
    assert!(unlocked(&f.image));
    let m = meta_of(&f.image);
    assert_eq!(m.role, Role::Primary);
    assert_eq!(m.disk_state, DiskState::UpToDate);
    assert_eq!(m.generation, new);
    assert_eq!(m.bitmap_generation, 0x77);
    assert_eq!(m.history, vec![0x77, 0x11]);
    assert_eq!(m.node_id, 0x99);
    let (_, b) = BitmapFile::open_or_create(&f.image, MIB).unwrap();
    assert!(b.is_clear());
    assert!(activity_log::read(&f.image).unwrap().is_empty());
    assert_eq!(&std::fs::read(&f.image).unwrap()[4096..8192], &[9; 4096]);
    // No primary gets in any more (until the process exits, which it would now).
    let mut q = f.primary();
    let (code, reason) = q.handshake(SECRET, MIB).unwrap_err();
    assert_eq!(code, RefuseCode::Fenced);
    assert!(reason.contains("promoted"), "{reason}");
    // (What status said last; the socket is gone.)
    let v = f.node.status.to_json();
    assert_eq!(v["role"], "primary");
    assert_eq!(v["generation"], new);

    // Promoting again (a new access node on the same image) changes nothing.
    let Fixture { dir, image, .. } = f;
    let before = std::fs::read(meta::meta_path(&image)).unwrap();
    let f = Fixture::start_in(dir, |_| {}, Opts::default());
    let v = f.promote("promote").unwrap();
    assert_eq!(v["already_primary"], true);
    assert_eq!(v["generation"], new);
    assert_eq!(v["previous_generation"], new);
    wait_done(&f);
    assert!(unlocked(&f.image));
    assert_eq!(std::fs::read(meta::meta_path(&f.image)).unwrap(), before);
}

#[test]
fn writes_after_the_promotion_are_refused() {
    // The replica alone, without cutting the connection: requests are answered Fenced.
    let f = Fixture::start();
    let (mut p, _) = f.attach(MIB);
    sync(&mut p, 0x10);
    let promoted = lock(&f.node.replica).promote(false).unwrap();
    assert_eq!(promoted.previous_generation, 0x10);
    assert_eq!(p.write(0, &[1; 512]), Reply::Ack(AckStatus::Fenced));
    assert_eq!(p.call(&Frame::Flush), Reply::Ack(AckStatus::Fenced));
    assert_eq!(
        p.call(&Frame::Read {
            offset: 0,
            len: 512
        }),
        Reply::Ack(AckStatus::Fenced)
    );
    assert_eq!(
        p.call(&Frame::SyncStart {
            full: true,
            bytes: 0
        }),
        Reply::Ack(AckStatus::Fenced)
    );
    assert_eq!(std::fs::read(&f.image).unwrap()[..512], [0; 512]);
    assert_eq!(meta_of(&f.image).generation, promoted.generation);
    assert!(unlocked(&f.image));
}

#[test]
fn attached_reports_hot_extents_and_discard_my_data_until_a_resync() {
    // The image of a primary that crashed: role primary, hot extents in its activity log.
    let old = meta_with(Role::Primary, DiskState::UpToDate, 0x42);
    let f = Fixture::start_in(
        tempfile::tempdir().unwrap(),
        |img| old_image(img, MIB, &old, &[0, 3]),
        Opts {
            discard_my_data: true,
            ..Opts::default()
        },
    );
    let (mut p, info) = f.attach(MIB);
    assert_eq!(info.hot, vec![0, 3]);
    assert_eq!(
        info.flags & NODE_FLAG_DISCARD_MY_DATA,
        NODE_FLAG_DISCARD_MY_DATA
    );
    assert_eq!((info.role, info.generation), (Role::Primary, 0x42));
    sync(&mut p, 0x43);
    let m = meta_of(&f.image);
    assert_eq!((m.role, m.generation), (Role::Secondary, 0x43));
    assert_eq!(m.disk_state, DiskState::UpToDate);
    assert_eq!(m.history, vec![0x42, 0x11]);
    assert!(activity_log::read(&f.image).unwrap().is_empty());
    assert_eq!(f.status()["role"], "secondary");
    p.send(&Frame::Goodbye);
    assert!(p.is_closed());
    f.wait_status("detached", |v| v["peer_state"] == "disconnected");
    // The next primary sees a plain secondary.
    let (_p, info) = f.attach(MIB);
    assert!(info.hot.is_empty());
    assert_eq!(info.flags, NODE_FLAG_HASHES, "no discard-my-data any more");
    assert_eq!((info.role, info.generation), (Role::Secondary, 0x43));
}

#[test]
fn a_normal_replica_reports_no_hot_extents_and_only_the_hashes_flag() {
    let f = Fixture::start();
    let (_p, info) = f.attach(MIB);
    assert!(info.hot.is_empty());
    assert_eq!(info.flags, NODE_FLAG_HASHES);
}

/// ReadHashes are read and hashed off the session's thread while it applies the requests
/// behind them: each is of the image once everything before it was applied, never with a
/// write sent after it (the session holds an overlapping write until the range was read),
/// and its Hashes may come after the replies to later requests.
#[test]
fn hashes_are_of_the_image_as_the_requests_before_them_left_it() {
    use mirror_proto::blockhash::hash_blocks;
    let f = Fixture::start();
    let size = 16 * MIB;
    let (mut p, _) = f.attach(size);
    let span = 4 * MIB as usize;
    let mut image = vec![0u8; size as usize];
    let mut asked = std::collections::HashMap::new();
    let mut acks = Vec::new();
    for round in 0..8u8 {
        let at = (u64::from(round) % 4) * 4 * MIB;
        // The span rewritten (the last write right before the ReadHashes), then asked for,
        // then overwritten at once by a write in the middle of it and one at its end.
        for piece in 0..(span / MAX_DATA) {
            let o = at as usize + piece * MAX_DATA;
            let d = pattern(round.wrapping_mul(7).wrapping_add(piece as u8), MAX_DATA);
            image[o..o + MAX_DATA].copy_from_slice(&d);
            acks.push(p.send(&Frame::Write {
                offset: o as u64,
                resync: false,
                data: &d,
            }));
        }
        let mut want = Vec::new();
        hash_blocks(&image[at as usize..at as usize + span], &mut want);
        let seq = p.send(&Frame::ReadHashes {
            offset: at,
            len: span as u32,
        });
        asked.insert(seq, want);
        for o in [at as usize + span / 2 - 100, at as usize + span - 4096] {
            let d = pattern(round.wrapping_add(100), 4096);
            image[o..o + 4096].copy_from_slice(&d);
            acks.push(p.send(&Frame::Write {
                offset: o as u64,
                resync: false,
                data: &d,
            }));
        }
    }
    let last = p.send(&Frame::ReadHashes {
        offset: 0,
        len: size as u32 / 4,
    });
    let mut want = Vec::new();
    hash_blocks(&image[..size as usize / 4], &mut want);
    asked.insert(last, want);
    let mut acked = std::collections::HashSet::new();
    while !asked.is_empty() || acked.len() < acks.len() {
        match p.recv() {
            (seq, Reply::Hashes(h)) => {
                let want = asked
                    .remove(&seq)
                    .expect("Hashes for a request that asked for none");
                assert!(h == want, "the hashes of request {seq} are not of the image as the requests before it left it");
            }
            (seq, Reply::Ack(AckStatus::Ok)) => {
                assert!(acks.contains(&seq) && acked.insert(seq), "ack {seq}");
            }
            r => panic!("{r:?}"),
        }
    }
    assert_eq!(f.status()["bytes_hashed"], 8 * span as u64 + size / 4);
}

/// Lines of a file (none if it does not exist).
fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|s| s.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

#[test]
fn on_primary_loss_runs_once_per_attach_after_the_primary_went_silent() {
    let out = tempfile::tempdir().unwrap();
    let log = out.path().join("fired");
    let command = format!(
        "echo \"$ACCESS_NODE_IMAGE|$ACCESS_NODE_CONTROL|$ACCESS_NODE_LAST_PRIMARY\" >> '{}'",
        log.display()
    );
    let f = Fixture::start_opts(Opts {
        primary_loss: Some(PrimaryLoss {
            command,
            timeout: Duration::from_secs(1),
        }),
        ..Opts::default()
    });
    assert_eq!(f.status()["last_primary_activity_secs_ago"], Value::Null);
    // No primary yet: nothing to lose.
    std::thread::sleep(Duration::from_millis(1300));
    assert!(lines(&log).is_empty());

    // Pings keep a primary alive.
    let (mut p, _) = f.attach(MIB);
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(p.call(&Frame::Ping { nanos: 1 }), Reply::Pong(1));
    }
    assert!(lines(&log).is_empty(), "fired while pings flowed");
    assert_eq!(f.status()["last_primary_activity_secs_ago"], 0);
    let me = p.stream.local_addr().unwrap();

    // Silent (then dropped by the idle timeout): the command runs, once.
    let deadline = Instant::now() + Duration::from_secs(5);
    while lines(&log).is_empty() {
        assert!(Instant::now() < deadline, "the command did not run");
        std::thread::sleep(Duration::from_millis(50));
    }
    let want = format!("{}|{}|{me}", f.image.display(), f.control.display());
    assert_eq!(lines(&log), vec![want.clone()]);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(lines(&log).len(), 1, "ran twice for one attach");
    assert!(
        f.status()["last_primary_activity_secs_ago"]
            .as_u64()
            .unwrap()
            >= 1
    );

    // A new attach re-arms it.
    let (p2, _) = f.attach(MIB);
    let me2 = p2.stream.local_addr().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while lines(&log).len() < 2 {
        assert!(Instant::now() < deadline, "not re-armed");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        lines(&log)[1].ends_with(&me2.to_string()),
        "{:?}",
        lines(&log)
    );
}

/// Holds the flusher's `fdatasync` until `release` gets the outcome to report.
fn hold_flushes(f: &Fixture) -> (mpsc::Receiver<()>, mpsc::Sender<std::io::Result<()>>) {
    let (started_tx, started) = mpsc::channel::<()>();
    let (release, outcome) = mpsc::channel::<std::io::Result<()>>();
    let started_tx = std::sync::Mutex::new(started_tx);
    let outcome = std::sync::Mutex::new(outcome);
    lock(&f.node.replica).sync_hook = Some(SyncHook(std::sync::Arc::new(move || {
        let _ = lock(&started_tx).send(());
        lock(&outcome)
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or(Ok(()))
    })));
    (started, release)
}

#[test]
fn writes_behind_a_flush_are_applied_and_acked_while_it_runs() {
    let f = Fixture::start();
    let (mut p, _) = f.attach(MIB);
    let (started, release) = hold_flushes(&f);
    let w1 = p.send(&Frame::Write {
        offset: 0,
        resync: false,
        data: &pattern(1, 4096),
    });
    let fl = p.send(&Frame::Flush);
    started
        .recv_timeout(Duration::from_secs(5))
        .expect("the flush started");
    let w2 = p.send(&Frame::Write {
        offset: 8192,
        resync: false,
        data: &pattern(2, 4096),
    });
    // The write before the flush is answered first; the one behind it while the flush runs.
    assert_eq!(p.recv(), (w1, Reply::Ack(AckStatus::Ok)));
    assert_eq!(p.recv(), (w2, Reply::Ack(AckStatus::Ok)));
    assert_eq!(p.read(8192, 4096), pattern(2, 4096));
    release.send(Ok(())).unwrap();
    assert_eq!(p.recv(), (fl, Reply::Ack(AckStatus::Ok)));
    // Flushes queued while one runs are answered by the next fdatasync, in order (one or two
    // fdatasyncs, depending on when the second arrives: both outcomes are ready).
    let (a, b) = (p.send(&Frame::Flush), p.send(&Frame::Flush));
    release.send(Ok(())).unwrap();
    release.send(Ok(())).unwrap();
    assert_eq!(p.recv(), (a, Reply::Ack(AckStatus::Ok)));
    assert_eq!(p.recv(), (b, Reply::Ack(AckStatus::Ok)));
    assert_eq!(f.status()["flushes"], 3);
}

#[test]
fn a_failed_flush_is_recorded_before_it_is_answered_and_no_sync_done_behind_it_counts() {
    let f = Fixture::start();
    let (mut p, _) = f.attach(MIB);
    sync(&mut p, 0x10);
    assert_eq!(meta_of(&f.image).disk_state, DiskState::UpToDate);
    let (started, release) = hold_flushes(&f);
    assert_eq!(p.write(0, &pattern(3, 4096)), Reply::Ack(AckStatus::Ok));
    let fl = p.send(&Frame::Flush);
    started.recv_timeout(Duration::from_secs(5)).unwrap();
    // A write behind the flush, applied while it runs.
    p.send(&Frame::Write {
        offset: 4096,
        resync: false,
        data: &pattern(5, 4096),
    });
    // A resync's end behind the flush, on the wire before it fails.
    let done = p.send(&Frame::SyncDone { generation: 0x11 });
    std::thread::sleep(Duration::from_millis(100));
    release
        .send(Err(std::io::Error::from_raw_os_error(libc::EIO)))
        .unwrap();
    let (s, r) = loop {
        let (s, r) = p.recv();
        if s == fl {
            break (s, r);
        }
    };
    assert_eq!((s, r), (fl, Reply::Ack(AckStatus::IoError)));
    // Recorded before the answer.
    assert_eq!(meta_of(&f.image).disk_state, DiskState::Outdated);
    // Until the session closes: the SyncDone gets no Ok.
    while let Ok(d) = p.link.as_mut().unwrap().0.read_frame() {
        assert!(
            d.seq != done
                || d.frame
                    == (Frame::Ack {
                        status: AckStatus::IoError
                    }),
            "SyncDone answered {:?}",
            d.frame
        );
    }
    // A SyncDone behind the failed flush is not applied: never up to date without what the
    // flush lost.
    let m = meta_of(&f.image);
    assert_eq!((m.disk_state, m.generation), (DiskState::Outdated, 0x10));
    assert!(f.status()["errors"].as_u64().unwrap() >= 1);
}

#[test]
fn a_promotion_waits_for_a_running_flush_and_its_outcome() {
    let f = Fixture::start();
    let (mut p, _) = f.attach(MIB);
    sync(&mut p, 0x10);
    let (started, release) = hold_flushes(&f);
    assert_eq!(p.write(0, &pattern(4, 4096)), Reply::Ack(AckStatus::Ok));
    p.send(&Frame::Flush);
    started.recv_timeout(Duration::from_secs(5)).unwrap();
    let node = f.node.clone();
    let promotion = std::thread::spawn(move || node.promote(false));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!promotion.is_finished(), "promote went ahead of the flush");
    release
        .send(Err(std::io::Error::from_raw_os_error(libc::EIO)))
        .unwrap();
    let r = promotion.join().unwrap();
    assert!(
        matches!(r, Err(ReplicaError::NotUpToDate { .. })),
        "an image whose flush failed was promoted: {r:?}"
    );
}

#[test]
fn a_writeback_error_reported_to_a_failed_promote_fails_the_next_flush() {
    let f = Fixture::start();
    let (mut p, _) = f.attach(MIB);
    sync(&mut p, 0x10);
    assert_eq!(p.write(0, &pattern(6, 4096)), Reply::Ack(AckStatus::Ok));
    // The kernel tells one fdatasync of the error, the promote's; the next one succeeds.
    let failed_once = std::sync::atomic::AtomicBool::new(false);
    lock(&f.node.replica).sync_hook = Some(SyncHook(std::sync::Arc::new(move || {
        if failed_once.swap(true, std::sync::atomic::Ordering::SeqCst) {
            Ok(())
        } else {
            Err(std::io::Error::from_raw_os_error(libc::EIO))
        }
    })));
    let r = f.node.promote(false);
    assert!(r.is_err(), "{r:?}");
    assert_eq!(meta_of(&f.image).disk_state, DiskState::Outdated);
    // The primary's write was lost with that writeback: its Flush must not say durable.
    assert_eq!(p.call(&Frame::Flush), Reply::Ack(AckStatus::IoError));
    assert!(p.is_closed());
    // The next primary attaches (and would resync the outdated image); flushes are real again.
    let (mut p2, info) = f.attach(MIB);
    assert_eq!(info.disk_state, DiskState::Outdated);
    assert_eq!(p2.call(&Frame::Flush), Reply::Ack(AckStatus::Ok));
}
