//! The encrypted link of protocol 2: a Noise handshake keyed from the shared secret, then every
//! byte of both directions in authenticated, numbered records. See PROTOCOL.md "Link security".
//!
//! Handshake: `Noise_NNpsk0_25519_AESGCM_SHA256`, the pre-shared key derived from the secret
//! ([`Secret::noise_psk`]). Both sides contribute a fresh X25519 key (forward secrecy: the
//! secret alone does not decrypt a recorded session); only a holder of the secret can produce
//! the primary's first message or read the replica's answer (mutual authentication; the
//! replica's proof is its ability to decrypt and answer, confirmed by the first record). The
//! two messages travel in clear inside ordinary frames (`NoiseInit`, `NoiseReply`), so a
//! protocol 1 peer sees a version it does not speak and says so.
//!
//! Records: `len: u16 big endian` then `len` bytes of AES-256-GCM output (at most 65535, with
//! a 16-byte tag). The nonce is the record's number in its direction, never sent: a record
//! dropped, replayed, reordered or injected fails to decrypt, and the connection ends.
//! Readers and writers are separate (one thread each), sharing the keys.

use std::io::{self, Read, Write};
use std::sync::Arc;

use snow::{HandshakeState, StatelessTransportState};
use thiserror::Error;

use crate::auth::Secret;
use crate::frame::{
    self, Frame, FrameError, HEADER_LEN, MAGIC, NOISE_INIT_LEN, NOISE_REPLY_LEN, VERSION,
};

/// The Noise protocol name.
pub const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_AESGCM_SHA256";
/// Bound into the handshake hash: both sides must agree on it.
const PROLOGUE: &[u8] = b"vhost-mirror protocol 2";
/// AEAD tag length.
pub const TAG_LEN: usize = 16;
/// Largest record on the wire (Noise's message limit).
pub const MAX_RECORD: usize = 65535;
/// Most plaintext bytes in one record.
pub const MAX_RECORD_PLAIN: usize = MAX_RECORD - TAG_LEN;
/// Record header: the ciphertext length.
const RECORD_HEADER: usize = 2;
/// Records encrypted into the output buffer before it is written (about 1 MiB).
const WRITE_RECORDS: usize = 16;

#[derive(Debug, Error)]
pub enum SecureError {
    #[error("link I/O failed during the handshake")]
    Io(#[source] io::Error),
    #[error(
        "the peer closed the connection during the handshake (it does not know this secret, \
         runs a vhost-mirror older than protocol {VERSION}, or turned the connection away: \
         its log says which)"
    )]
    Closed,
    #[error("a replayed handshake (its ephemeral key was seen before)")]
    Replayed,
    #[error(
        "the peer's clock ({theirs} s since 1970) is more than {MAX_CLOCK_SKEW_SECS} s from \
         ours ({ours} s): a replayed handshake, or a wrong clock on one host"
    )]
    Clock { theirs: u64, ours: u64 },
    #[error(
        "the peer speaks vhost-mirror protocol {0}; this node speaks protocol {VERSION} \
         (encrypted link): upgrade the peer"
    )]
    OldVersion(u8),
    #[error("not a vhost-mirror handshake")]
    Frame(#[source] FrameError),
    #[error("expected a {expected} handshake frame, got {got}")]
    Unexpected {
        expected: &'static str,
        got: &'static str,
    },
    #[error("authentication failed: the peer does not know the shared secret (or the handshake was tampered with)")]
    Auth,
    #[error("the Noise handshake failed")]
    Noise(#[source] snow::Error),
}

/// The session keys of one connection, shared by its reader and writer.
#[derive(Clone)]
pub struct Keys(Arc<StatelessTransportState>);

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

fn builder_state(secret: &Secret, initiator: bool) -> Result<HandshakeState, SecureError> {
    let params = NOISE_PARAMS
        .parse()
        .map_err(|e: snow::Error| SecureError::Noise(e))?;
    let psk = secret.noise_psk();
    let b = snow::Builder::new(params)
        .psk(0, &psk)
        .and_then(|b| b.prologue(PROLOGUE))
        .map_err(SecureError::Noise)?;
    if initiator {
        b.build_initiator()
    } else {
        b.build_responder()
    }
    .map_err(SecureError::Noise)
}

fn read_exact<S: Read>(s: &mut S, buf: &mut [u8]) -> Result<(), SecureError> {
    s.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => SecureError::Closed,
        _ => SecureError::Io(e),
    })
}

/// Reads one handshake frame of exactly `HEADER_LEN + N` bytes, of the kind `T` makes:
/// nothing else, and no more, is read before the peer has authenticated.
fn read_handshake_frame<S: Read, const N: usize>(
    s: &mut S,
    want: &'static str,
    take: impl Fn(Frame<'_>) -> Option<[u8; N]>,
) -> Result<[u8; N], SecureError> {
    let mut buf = vec![0u8; HEADER_LEN + N];
    read_exact(s, &mut buf[..HEADER_LEN])?;
    if buf[..4] == MAGIC && buf[4] < VERSION {
        return Err(SecureError::OldVersion(buf[4]));
    }
    match frame::frame_len(&buf[..HEADER_LEN]).map_err(SecureError::Frame)? {
        Some(n) if n == buf.len() => {}
        _ => {
            return Err(SecureError::Frame(FrameError::Malformed {
                kind: want,
                what: "not the size of that handshake message",
            }))
        }
    }
    read_exact(s, &mut buf[HEADER_LEN..])?;
    let d = frame::decode(&buf)
        .map_err(SecureError::Frame)?
        .ok_or(SecureError::Closed)?;
    let got = d.frame.name();
    take(d.frame).ok_or(SecureError::Unexpected {
        expected: want,
        got,
    })
}

fn send_frame<S: Write>(s: &mut S, f: &Frame<'_>) -> Result<(), SecureError> {
    let mut out = Vec::with_capacity(HEADER_LEN + NOISE_INIT_LEN);
    frame::encode(0, f, &mut out);
    s.write_all(&out)
        .and_then(|()| s.flush())
        .map_err(SecureError::Io)
}

/// Seconds since the Unix epoch (0 if the clock is before it).
fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The primary's side: sends NoiseInit (carrying its clock, encrypted), reads and checks
/// NoiseReply. The caller bounds the time it may take.
pub fn initiate<S: Read + Write>(s: &mut S, secret: &Secret) -> Result<Keys, SecureError> {
    let mut hs = builder_state(secret, true)?;
    let mut msg = [0u8; NOISE_INIT_LEN];
    let n = hs
        .write_message(&now_secs().to_le_bytes(), &mut msg)
        .map_err(SecureError::Noise)?;
    debug_assert_eq!(n, NOISE_INIT_LEN);
    send_frame(s, &Frame::NoiseInit { msg })?;
    let reply = read_handshake_frame(s, "NoiseReply", |f| match f {
        Frame::NoiseReply { msg } => Some(msg),
        _ => None,
    })?;
    let mut payload = [0u8; NOISE_REPLY_LEN];
    hs.read_message(&reply, &mut payload)
        .map_err(|_| SecureError::Auth)?;
    finish(hs)
}

/// How far a NoiseInit's clock may be from ours (either way) and still be accepted: the
/// replay cache must cover this long (the primary reconnects at most every 100 ms, in
/// practice every few seconds while it cannot attach).
pub const MAX_CLOCK_SKEW_SECS: u64 = 24 * 3600;
/// NoiseInits remembered (their ephemeral keys): 2 MiB.
pub const REPLAY_CACHE: usize = 65536;

/// The NoiseInits a replica accepted (by their ephemeral key), so that a captured one cannot
/// be replayed: a replay is refused before any key exchange. Only NoiseInits made with the
/// secret enter it, so no one without the secret can flush it.
#[derive(Debug, Default)]
pub struct ReplayGuard {
    inner: std::sync::Mutex<ReplayInner>,
}

#[derive(Debug, Default)]
struct ReplayInner {
    seen: std::collections::HashSet<[u8; 32]>,
    order: std::collections::VecDeque<[u8; 32]>,
}

impl ReplayGuard {
    fn lock(&self) -> std::sync::MutexGuard<'_, ReplayInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn seen(&self, e: &[u8; 32]) -> bool {
        self.lock().seen.contains(e)
    }

    /// Records `e`; false if it was already there (a replay racing the original).
    fn insert(&self, e: [u8; 32]) -> bool {
        let mut g = self.lock();
        if !g.seen.insert(e) {
            return false;
        }
        g.order.push_back(e);
        if g.order.len() > REPLAY_CACHE {
            if let Some(old) = g.order.pop_front() {
                g.seen.remove(&old);
            }
        }
        true
    }
}

/// The replica's side: reads NoiseInit (exactly its bytes), refuses a replay (an ephemeral key
/// seen before, or a clock more than [`MAX_CLOCK_SKEW_SECS`] from ours), checks it, answers
/// NoiseReply. A NoiseInit that checks out was made with the secret for this connection; the
/// peer still counts as authenticated only once its first record decrypts.
pub fn respond<S: Read + Write>(
    s: &mut S,
    secret: &Secret,
    replays: &ReplayGuard,
) -> Result<Keys, SecureError> {
    let init = read_handshake_frame(s, "NoiseInit", |f| match f {
        Frame::NoiseInit { msg } => Some(msg),
        _ => None,
    })?;
    let mut e = [0u8; 32];
    e.copy_from_slice(&init[..32]);
    // Before any key exchange: a replay costs a lookup.
    if replays.seen(&e) {
        return Err(SecureError::Replayed);
    }
    let mut hs = builder_state(secret, false)?;
    let mut payload = [0u8; NOISE_INIT_LEN];
    let n = hs
        .read_message(&init, &mut payload)
        .map_err(|_| SecureError::Auth)?;
    let mut clock = [0u8; 8];
    if n != clock.len() {
        return Err(SecureError::Auth);
    }
    clock.copy_from_slice(&payload[..8]);
    let theirs = u64::from_le_bytes(clock);
    let ours = now_secs();
    if theirs.abs_diff(ours) > MAX_CLOCK_SKEW_SECS {
        return Err(SecureError::Clock { theirs, ours });
    }
    if !replays.insert(e) {
        return Err(SecureError::Replayed);
    }
    let mut msg = [0u8; NOISE_REPLY_LEN];
    let n = hs
        .write_message(&[], &mut msg)
        .map_err(SecureError::Noise)?;
    debug_assert_eq!(n, NOISE_REPLY_LEN);
    send_frame(s, &Frame::NoiseReply { msg })?;
    finish(hs)
}

fn finish(hs: HandshakeState) -> Result<Keys, SecureError> {
    Ok(Keys(Arc::new(
        hs.into_stateless_transport_mode()
            .map_err(SecureError::Noise)?,
    )))
}

/// What the reader says about a record that fails to decrypt (an `InvalidData` I/O error).
#[derive(Debug, Error)]
#[error("a record from the peer failed authentication (tampered, replayed or injected data)")]
pub struct Tampered;

/// Encrypts everything written into records. After a failed write it refuses every later one
/// (a record cut in the middle cannot be continued).
pub struct SecureWriter<W> {
    inner: W,
    keys: Keys,
    nonce: u64,
    out: Vec<u8>,
    broken: bool,
}

impl<W> SecureWriter<W> {
    pub fn new(inner: W, keys: Keys) -> Self {
        SecureWriter {
            inner,
            keys,
            nonce: 0,
            out: Vec::new(),
            broken: false,
        }
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }
}

impl<W: Write> SecureWriter<W> {
    /// Encrypts `data` into as many records as it needs and writes them, up to
    /// [`WRITE_RECORDS`] records per write call (the output buffer stays that small).
    pub fn send(&mut self, data: &[u8]) -> io::Result<()> {
        self.send_parts(&[data])
    }

    /// Sends the concatenation of `parts`, each sealed into records straight from where it
    /// lies (a large write's data is never copied into one plaintext buffer first). A record
    /// never spans two parts, so a short part costs a record of its own: the reader sees one
    /// stream of bytes either way. Empty parts are skipped (an empty record would read as the
    /// end of the stream).
    pub fn send_parts(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        if self.broken {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "an earlier write on this link failed",
            ));
        }
        let mut at = 0;
        let mut records = 0;
        for chunk in parts.iter().flat_map(|p| p.chunks(MAX_RECORD_PLAIN)) {
            let end = at + RECORD_HEADER + chunk.len() + TAG_LEN;
            // Grown once to its largest, never shrunk: every byte sent is written just below.
            if self.out.len() < end {
                self.out.resize(end, 0);
            }
            let n = self
                .keys
                .0
                .write_message(self.nonce, chunk, &mut self.out[at + RECORD_HEADER..end])
                .map_err(io::Error::other)?;
            debug_assert_eq!(n, chunk.len() + TAG_LEN);
            self.nonce += 1;
            self.out[at..at + RECORD_HEADER].copy_from_slice(&(n as u16).to_be_bytes());
            at = end;
            records += 1;
            if records == WRITE_RECORDS {
                self.write_out(at)?;
                (at, records) = (0, 0);
            }
        }
        if at > 0 {
            self.write_out(at)?;
        }
        Ok(())
    }

    fn write_out(&mut self, n: usize) -> io::Result<()> {
        if let Err(e) = self.inner.write_all(&self.out[..n]) {
            self.broken = true;
            return Err(e);
        }
        Ok(())
    }
}

impl<W: Write> Write for SecureWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.send(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Decrypts records and hands out their plaintext. Reads from the stream as much as is there
/// (up to [`RAW_BUFFER`]) and hands out the plaintext of every complete record that fits the
/// caller's buffer in one call: one receive and one read for many small frames. A read that
/// fails (a timeout, say) keeps the partial record: nothing is lost if the caller reads again.
pub struct SecureReader<R> {
    inner: R,
    keys: Keys,
    nonce: u64,
    /// Received bytes not yet decrypted: `raw[raw_start..raw_end]`, records back to back.
    raw: Box<[u8]>,
    raw_start: usize,
    raw_end: usize,
    /// Plaintext of a record too large for the caller's buffer, not yet handed out.
    plain: Box<[u8]>,
    plain_start: usize,
    plain_end: usize,
    /// A record failed to decrypt: nothing more is read from this connection.
    failed: bool,
}

/// Bytes received from the stream at most in one read.
pub const RAW_BUFFER: usize = 256 * 1024;

impl<R> SecureReader<R> {
    pub fn new(inner: R, keys: Keys) -> Self {
        SecureReader {
            inner,
            keys,
            nonce: 0,
            raw: vec![0; RAW_BUFFER].into_boxed_slice(),
            raw_start: 0,
            raw_end: 0,
            plain: vec![0; MAX_RECORD].into_boxed_slice(),
            plain_start: 0,
            plain_end: 0,
            failed: false,
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// Whether plaintext can be read without touching the stream (decrypted bytes, or a
    /// complete record, are waiting).
    pub fn has_buffered(&self) -> bool {
        self.plain_start < self.plain_end || matches!(self.complete_record(), Ok(Some(_)))
    }

    /// The ciphertext length of the complete record at `raw_start`, if there is one. An empty
    /// record (it would read as the end of the stream) is never sent: refused.
    fn complete_record(&self) -> Result<Option<usize>, Tampered> {
        let avail = &self.raw[self.raw_start..self.raw_end];
        if avail.len() < RECORD_HEADER {
            return Ok(None);
        }
        let len = usize::from(u16::from_be_bytes([avail[0], avail[1]]));
        if len <= TAG_LEN {
            return Err(Tampered);
        }
        Ok((avail.len() >= RECORD_HEADER + len).then_some(len))
    }

    fn tampered(&mut self) -> io::Error {
        self.failed = true;
        io::Error::new(io::ErrorKind::InvalidData, Tampered)
    }
}

impl<R: Read> SecureReader<R> {
    /// Receives more bytes (one read). `Ok(false)`: the stream ended cleanly between records.
    fn receive(&mut self) -> io::Result<bool> {
        // Move a partial record to the front when it could not otherwise complete.
        if self.raw_start > 0 && self.raw_start + RECORD_HEADER + MAX_RECORD > self.raw.len() {
            self.raw.copy_within(self.raw_start..self.raw_end, 0);
            self.raw_end -= self.raw_start;
            self.raw_start = 0;
        }
        // A full buffer always holds a complete record (one fits after `raw_start`).
        debug_assert!(self.raw_end < self.raw.len());
        loop {
            match self.inner.read(&mut self.raw[self.raw_end..]) {
                Ok(0) if self.raw_start == self.raw_end => return Ok(false),
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    self.raw_end += n;
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Decrypts the complete record of ciphertext length `len` at `raw_start` into `into`
    /// (at least `len` bytes: smaller buffers make the crypto library allocate).
    fn decrypt(&mut self, len: usize, into: &mut [u8]) -> io::Result<usize> {
        let at = self.raw_start + RECORD_HEADER;
        let r = self
            .keys
            .0
            .read_message(self.nonce, &self.raw[at..at + len], into);
        let n = r.map_err(|_| self.tampered())?;
        self.nonce += 1;
        self.raw_start = at + len;
        if self.raw_start == self.raw_end {
            self.raw_start = 0;
            self.raw_end = 0;
        }
        Ok(n)
    }
}

impl<R: Read> Read for SecureReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.failed {
            return Err(io::Error::new(io::ErrorKind::InvalidData, Tampered));
        }
        if buf.is_empty() {
            return Ok(0);
        }
        if self.plain_start < self.plain_end {
            let n = buf.len().min(self.plain_end - self.plain_start);
            buf[..n].copy_from_slice(&self.plain[self.plain_start..self.plain_start + n]);
            self.plain_start += n;
            return Ok(n);
        }
        let mut done = 0;
        loop {
            let len = match self.complete_record() {
                Ok(Some(len)) => len,
                Err(Tampered) => {
                    let e = self.tampered();
                    return if done > 0 { Ok(done) } else { Err(e) };
                }
                Ok(None) => {
                    if done > 0 {
                        // Never block with plaintext in hand.
                        return Ok(done);
                    }
                    if !self.receive()? {
                        return Ok(0);
                    }
                    continue;
                }
            };
            if buf.len() - done >= len {
                // Straight into the caller's buffer: no second copy.
                match self.decrypt(len, &mut buf[done..]) {
                    Ok(n) => done += n,
                    // The plaintext of the records before it is handed out first.
                    Err(e) => return if done > 0 { Ok(done) } else { Err(e) },
                }
            } else if done > 0 {
                return Ok(done);
            } else {
                let mut plain = std::mem::take(&mut self.plain);
                let r = self.decrypt(len, &mut plain);
                self.plain = plain;
                self.plain_end = r?;
                let n = buf.len().min(self.plain_end);
                buf[..n].copy_from_slice(&self.plain[..n]);
                self.plain_start = n;
                return Ok(n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn secret(s: &str) -> Secret {
        Secret::from_bytes(s.as_bytes()).unwrap()
    }

    /// A handshake over a socket pair; returns (primary, replica) results.
    fn pair(
        ps: &str,
        rs: &str,
    ) -> (
        Result<Keys, SecureError>,
        Result<Keys, SecureError>,
        UnixStream,
        UnixStream,
    ) {
        let (mut a, b) = UnixStream::pair().unwrap();
        let (ps, rs) = (secret(ps), secret(rs));
        let mut b2 = b.try_clone().unwrap();
        let t = std::thread::spawn(move || {
            let r = respond(&mut b2, &rs, &ReplayGuard::default());
            if r.is_err() {
                // What a replica does with a failed handshake: close.
                let _ = b2.shutdown(std::net::Shutdown::Both);
            }
            r
        });
        let p = initiate(&mut a, &ps);
        let r = t.join().unwrap();
        (p, r, a, b)
    }

    const S: &str = "a shared secret of some length";

    #[test]
    fn records_round_trip_in_both_directions_and_sizes() {
        let (p, r, a, b) = pair(S, S);
        let (p, r) = (p.unwrap(), r.unwrap());
        let mut pw = SecureWriter::new(a.try_clone().unwrap(), p.clone());
        let mut rr = SecureReader::new(b.try_clone().unwrap(), r.clone());
        let mut rw = SecureWriter::new(b, r);
        let mut pr = SecureReader::new(a, p);
        let data: Vec<u8> = (0..(3 * MAX_RECORD_PLAIN + 17))
            .map(|i| (i * 7) as u8)
            .collect();
        for len in [1, 100, MAX_RECORD_PLAIN, MAX_RECORD_PLAIN + 1, data.len()] {
            let d = data[..len].to_vec();
            let t = std::thread::spawn(move || {
                pw.write_all(&d).unwrap();
                pw
            });
            // Small reads (copies out of the record buffer) and large ones (in place).
            let mut got = vec![0u8; len];
            let mut at = 0;
            let mut step = 1;
            while at < len {
                let n = rr.read(&mut got[at..(at + step).min(len)]).unwrap();
                assert!(n > 0);
                at += n;
                step = step * 3 + 1;
            }
            assert_eq!(got, data[..len]);
            pw = t.join().unwrap();
        }
        rw.write_all(b"the other way").unwrap();
        let mut got = [0u8; 13];
        pr.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"the other way");
        drop((pw, rw, pr));
        let mut rest = Vec::new();
        assert_eq!(rr.read_to_end(&mut rest).unwrap(), 0);
    }

    #[test]
    fn parts_arrive_as_one_stream_whatever_their_sizes() {
        let (p, r, a, b) = pair(S, S);
        let (p, r) = (p.unwrap(), r.unwrap());
        drop((a, b));
        let data: Vec<u8> = (0..(40 * MAX_RECORD_PLAIN + 99))
            .map(|i| (i * 13 + i / 251) as u8)
            .collect();
        // Cut points: empty parts, one-byte parts, parts of a record and a byte either side,
        // parts of more than WRITE_RECORDS records (several writes each).
        let cuts = [
            0,
            0,
            1,
            2,
            36,
            36,
            36 + MAX_RECORD_PLAIN - 1,
            36 + 2 * MAX_RECORD_PLAIN,
            36 + 2 * MAX_RECORD_PLAIN + 1,
            36 + 20 * MAX_RECORD_PLAIN,
            data.len(),
        ];
        let parts: Vec<&[u8]> = cuts.windows(2).map(|w| &data[w[0]..w[1]]).collect();
        let mut wire = Vec::new();
        let mut w = SecureWriter::new(&mut wire, p);
        w.send_parts(&parts).unwrap();
        w.send_parts(&[]).unwrap();
        w.send_parts(&[&data[..0]]).unwrap();
        w.send_parts(&[b"tail".as_slice(), b"!".as_slice()])
            .unwrap();
        drop(w);
        let mut rd = SecureReader::new(io::Cursor::new(wire), r);
        let mut got = Vec::new();
        rd.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), data.len() + 5);
        assert!(got[..data.len()] == data[..], "the parts' bytes, in order");
        assert_eq!(&got[data.len()..], b"tail!");
    }

    /// Counts the reads made on the stream under it.
    struct Counting<R> {
        inner: R,
        reads: usize,
    }

    impl<R: Read> Read for Counting<R> {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            self.reads += 1;
            self.inner.read(b)
        }
    }

    #[test]
    fn many_small_records_arrive_in_one_receive_and_one_read() {
        let (p, r, a, b) = pair(S, S);
        let (p, r) = (p.unwrap(), r.unwrap());
        // 100 records of 40 bytes (an ack each), as the replica sends them when coalesced.
        let mut wire = Vec::new();
        let mut w = SecureWriter::new(&mut wire, p);
        for i in 0..100u8 {
            w.send(&[i; 40]).unwrap();
        }
        drop((a, b));
        let mut rd = SecureReader::new(
            Counting {
                inner: io::Cursor::new(wire),
                reads: 0,
            },
            r,
        );
        assert!(!rd.has_buffered());
        let mut buf = vec![0u8; 256 * 1024];
        // A first small read receives everything, decrypts one record, keeps the rest.
        assert_eq!(rd.read(&mut buf[..40]).unwrap(), 40);
        assert_eq!(rd.get_ref().reads, 1);
        assert!(rd.has_buffered(), "complete records wait in the buffer");
        let n = rd.read(&mut buf).unwrap();
        assert_eq!(n, 99 * 40, "every complete record in one read");
        assert_eq!(rd.get_ref().reads, 1, "without touching the stream");
        assert!(
            (1..100u8).all(|i| buf[(usize::from(i) - 1) * 40..usize::from(i) * 40]
                .iter()
                .all(|&x| x == i))
        );
        assert!(!rd.has_buffered());
        assert_eq!(rd.read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn the_records_before_a_damaged_one_are_handed_out_first() {
        let (p, r, a, b) = pair(S, S);
        let (p, r) = (p.unwrap(), r.unwrap());
        let mut wire = Vec::new();
        let mut w = SecureWriter::new(&mut wire, p);
        for i in 0..3u8 {
            w.send(&[i; 100]).unwrap();
        }
        drop((a, b));
        // Flip a byte of the third record's ciphertext.
        let third = 2 * (RECORD_HEADER + 100 + TAG_LEN) + RECORD_HEADER + 5;
        wire[third] ^= 1;
        let mut rd = SecureReader::new(io::Cursor::new(wire), r);
        let mut buf = vec![0u8; 4096];
        assert_eq!(rd.read(&mut buf).unwrap(), 200);
        assert!(buf[..100].iter().all(|&x| x == 0) && buf[100..200].iter().all(|&x| x == 1));
        let e = rd.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(
            rd.read(&mut buf).is_err(),
            "nothing more after a failed record"
        );
    }

    #[test]
    fn wrong_secret_fails_on_both_sides() {
        let (p, r, _a, _b) = pair(S, "another secret, same length..");
        assert!(matches!(r, Err(SecureError::Auth)), "{r:?}");
        assert!(
            matches!(p, Err(SecureError::Closed) | Err(SecureError::Io(_))),
            "{p:?}"
        );
    }

    #[test]
    fn tampered_replayed_and_injected_records_are_refused() {
        // Capture what the primary sends.
        let (p, r, a, b) = pair(S, S);
        let (p, r) = (p.unwrap(), r.unwrap());
        let mut wire = Vec::new();
        let mut w = SecureWriter::new(&mut wire, p);
        w.write_all(b"first record").unwrap();
        w.write_all(b"second record").unwrap();
        drop(w);
        let first_len = RECORD_HEADER + 12 + TAG_LEN;
        let check = |bytes: Vec<u8>, what: &str| {
            let mut rd = SecureReader::new(io::Cursor::new(bytes), r.clone());
            let mut buf = vec![0u8; 1 << 16];
            let e = loop {
                match rd.read(&mut buf) {
                    Ok(0) => panic!("{what}: accepted"),
                    Ok(_) => continue,
                    Err(e) => break e,
                }
            };
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{what}: {e}");
        };
        let mut flipped = wire.clone();
        flipped[RECORD_HEADER + 3] ^= 1;
        check(flipped, "a flipped bit");
        // The second record first (reordered), the first twice (replayed).
        let mut reordered = wire[first_len..].to_vec();
        reordered.extend_from_slice(&wire[..first_len]);
        check(reordered, "reordered");
        let mut replayed = wire[..first_len].to_vec();
        replayed.extend_from_slice(&wire[..first_len]);
        check(replayed, "replayed");
        // A plaintext frame injected between records.
        let mut injected = wire[..first_len].to_vec();
        frame::encode(
            5,
            &Frame::Write {
                offset: 0,
                resync: false,
                data: b"attacker",
            },
            &mut injected,
        );
        // (Its first bytes read as a record length; more of the attacker's bytes follow.)
        injected.resize(injected.len() + MAX_RECORD + 2, 0x55);
        check(injected, "an injected frame");
        // A too-short record, an empty one (a tag only).
        check(vec![0, 3, 1, 2, 3], "a record shorter than its tag");
        check(vec![0, 16], "an empty record");
        // After a failure, nothing more comes out.
        let mut bad = wire.clone();
        bad[RECORD_HEADER] ^= 1;
        let mut rd = SecureReader::new(io::Cursor::new(bad), r.clone());
        let mut buf = [0u8; 4];
        assert!(rd.read(&mut buf).is_err());
        assert!(
            rd.read(&mut buf).is_err(),
            "a read after a failed record succeeded"
        );
        drop((a, b));
    }

    /// Review finding: a captured NoiseInit replayed on new connections got the replica's
    /// NoiseReply and a slot each time. A replay is refused before any key exchange.
    #[test]
    fn a_replayed_noise_init_is_refused() {
        let secret = secret(S);
        let guard = ReplayGuard::default();
        // The primary's first message, as a sniffer sees it.
        let mut wire = Vec::new();
        let _ = initiate(&mut Recorder(&mut wire), &secret);
        let first = wire[..HEADER_LEN + NOISE_INIT_LEN].to_vec();
        let mut s = io::Cursor::new(first.clone());
        assert!(respond(&mut ReadWrite(&mut s), &secret, &guard).is_ok());
        for _ in 0..3 {
            let mut s = io::Cursor::new(first.clone());
            let e = respond(&mut ReadWrite(&mut s), &secret, &guard).unwrap_err();
            assert!(matches!(e, SecureError::Replayed), "{e}");
        }
        // The cache is bounded.
        for i in 0..(REPLAY_CACHE + 10) as u64 {
            let mut e = [0u8; 32];
            e[..8].copy_from_slice(&i.to_le_bytes());
            guard.insert(e);
        }
        assert!(guard.lock().seen.len() <= REPLAY_CACHE);
    }

    /// A NoiseInit whose clock is far from ours (an old capture) is refused.
    #[test]
    fn a_noise_init_from_another_day_is_refused() {
        let secret = secret(S);
        let mut hs = builder_state(&secret, true).unwrap();
        let mut msg = [0u8; NOISE_INIT_LEN];
        let old = now_secs() - MAX_CLOCK_SKEW_SECS - 60;
        hs.write_message(&old.to_le_bytes(), &mut msg).unwrap();
        let mut bytes = Vec::new();
        frame::encode(0, &Frame::NoiseInit { msg }, &mut bytes);
        let mut s = io::Cursor::new(bytes);
        let e = respond(&mut ReadWrite(&mut s), &secret, &ReplayGuard::default()).unwrap_err();
        assert!(matches!(e, SecureError::Clock { .. }), "{e}");
    }

    /// Takes what is written; reads nothing (the handshake then ends with Closed).
    struct Recorder<'a>(&'a mut Vec<u8>);
    impl Read for Recorder<'_> {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Ok(0)
        }
    }
    impl Write for Recorder<'_> {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_protocol_1_peer_is_told_to_upgrade() {
        let mut v1 = Vec::new();
        frame::encode(0, &Frame::Flush, &mut v1);
        v1[4] = 1;
        let crc = crc32c::crc32c(&v1[..20]);
        v1[20..24].copy_from_slice(&crc.to_le_bytes());
        let mut s = io::Cursor::new(v1);
        let mut rw = ReadWrite(&mut s);
        let e = respond(&mut rw, &secret(S), &ReplayGuard::default()).unwrap_err();
        assert!(matches!(e, SecureError::OldVersion(1)), "{e}");
        assert!(e.to_string().contains("upgrade"), "{e}");
    }

    #[test]
    fn only_a_handshake_frame_of_the_exact_size_is_read() {
        // A frame announcing a large payload: refused after its 24-byte header.
        let mut big = Vec::new();
        frame::encode(
            0,
            &Frame::Write {
                offset: 0,
                resync: false,
                data: &[0; 1000],
            },
            &mut big,
        );
        let mut s = io::Cursor::new(big);
        let e = respond(&mut ReadWrite(&mut s), &secret(S), &ReplayGuard::default()).unwrap_err();
        assert!(matches!(e, SecureError::Frame(_)), "{e}");
        assert_eq!(s.position(), HEADER_LEN as u64);
    }

    /// A Cursor that also accepts (and drops) writes.
    struct ReadWrite<'a>(&'a mut io::Cursor<Vec<u8>>);
    impl Read for ReadWrite<'_> {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            self.0.read(b)
        }
    }
    impl Write for ReadWrite<'_> {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
}
