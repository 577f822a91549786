//! Blocking framed I/O over a byte stream (the TCP link): buffering only, no protocol logic.
//! Decoding is `frame.rs`; what the frames mean is up to each side.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use thiserror::Error;

use crate::frame::{self, Decoded, Frame, FrameError, HEADER_LEN, MAX_PAYLOAD};

#[derive(Debug, Error)]
pub enum ConnError {
    #[error("connection closed by peer")]
    Closed,
    #[error("link I/O failed")]
    Io(#[source] io::Error),
    #[error("invalid frame from peer")]
    Frame(#[source] FrameError),
    #[error("peer sent {0} where it was not expected")]
    Unexpected(&'static str),
}

impl ConnError {
    /// True for a read timeout (no frame within the socket's read timeout).
    pub fn is_timeout(&self) -> bool {
        matches!(self, ConnError::Io(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
    }
}

pub use crate::sys::error_chain;

/// Reads whole frames from a stream, with one buffer reused for every frame.
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            buf: vec![0; 256 * 1024],
            start: 0,
            end: 0,
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// Whether a complete frame is already buffered (reading it will not block).
    pub fn has_frame(&self) -> bool {
        let b = &self.buf[self.start..self.end];
        matches!(frame::frame_len(b), Ok(Some(n)) if b.len() >= n)
    }

    /// Reads the next frame. The frame borrows the reader's buffer until the next call.
    pub fn read_frame(&mut self) -> Result<Decoded<'_>, ConnError> {
        loop {
            let avail = &self.buf[self.start..self.end];
            match frame::frame_len(avail).map_err(ConnError::Frame)? {
                Some(n) if avail.len() >= n => break,
                need => {
                    let need = need.unwrap_or(HEADER_LEN);
                    debug_assert!(need <= HEADER_LEN + MAX_PAYLOAD);
                    // Make room: move the partial frame to the front, grow up to one frame.
                    if self.start > 0 {
                        self.buf.copy_within(self.start..self.end, 0);
                        self.end -= self.start;
                        self.start = 0;
                    }
                    if self.buf.len() < need {
                        self.buf.resize(need, 0);
                    }
                    let n = match self.inner.read(&mut self.buf[self.end..]) {
                        Ok(0) => return Err(ConnError::Closed),
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(ConnError::Io(e)),
                    };
                    self.end += n;
                }
            }
        }
        let d = frame::decode(&self.buf[self.start..self.end])
            .map_err(ConnError::Frame)?
            .ok_or(ConnError::Closed)?;
        self.start += d.consumed;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        Ok(d)
    }
}

/// Shuts a connection down unless disarmed (dropped) within `after`: an absolute deadline for
/// a phase whose reads each have their own timeout (bytes trickled one at a time would
/// otherwise keep it going for hours).
pub struct Deadline {
    done: Arc<(Mutex<bool>, Condvar)>,
}

impl Deadline {
    /// Arms the deadline for `stream` (a clone of the connection).
    pub fn arm(stream: TcpStream, after: Duration) -> io::Result<Deadline> {
        let done = Arc::new((Mutex::new(false), Condvar::new()));
        let d = done.clone();
        std::thread::Builder::new()
            .name("deadline".into())
            .spawn(move || {
                let (m, cv) = &*d;
                let g = m.lock().unwrap_or_else(|p| p.into_inner());
                let (g, _) = cv
                    .wait_timeout_while(g, after, |done| !*done)
                    .unwrap_or_else(|p| p.into_inner());
                if !*g {
                    let _ = stream.shutdown(Shutdown::Both);
                }
            })?;
        Ok(Deadline { done })
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        let (m, cv) = &*self.done;
        *m.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
    }
}

/// Encodes one frame and writes it (for the handshake; the data path batches its own buffer).
pub fn send<W: Write>(w: &mut W, seq: u64, f: &Frame<'_>) -> Result<(), ConnError> {
    let mut out = Vec::with_capacity(64);
    frame::encode(seq, f, &mut out);
    w.write_all(&out).map_err(ConnError::Io)?;
    w.flush().map_err(ConnError::Io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A reader that hands out at most `step` bytes per read, to exercise partial frames.
    struct Trickle {
        data: Cursor<Vec<u8>>,
        step: usize,
    }
    impl Read for Trickle {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            let n = b.len().min(self.step);
            self.data.read(&mut b[..n])
        }
    }

    #[test]
    fn frames_across_partial_reads_and_buffer_growth() {
        let big = vec![5u8; 600 * 1024];
        let mut bytes = Vec::new();
        frame::encode(1, &Frame::Ping { nanos: 1 }, &mut bytes);
        frame::encode(
            2,
            &Frame::Write {
                offset: 0,
                resync: false,
                data: &big,
            },
            &mut bytes,
        );
        frame::encode(3, &Frame::Flush, &mut bytes);
        for step in [1, 7, 4096, 1 << 20] {
            let mut r = FrameReader::new(Trickle {
                data: Cursor::new(bytes.clone()),
                step,
            });
            assert_eq!(r.read_frame().unwrap().seq, 1);
            match r.read_frame().unwrap().frame {
                Frame::Write { data, .. } => assert_eq!(data.len(), big.len()),
                f => panic!("{f:?}"),
            }
            assert_eq!(r.read_frame().unwrap().frame, Frame::Flush);
            assert!(matches!(r.read_frame(), Err(ConnError::Closed)));
        }
    }

    #[test]
    fn garbage_and_oversized_are_errors() {
        let mut r = FrameReader::new(Cursor::new(b"hello there, not a frame".to_vec()));
        assert!(matches!(
            r.read_frame(),
            Err(ConnError::Frame(FrameError::BadMagic(_)))
        ));
        let mut h = Vec::new();
        frame::encode(0, &Frame::Flush, &mut h);
        h[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        let crc = crc32c::crc32c(&h[..20]);
        h[20..24].copy_from_slice(&crc.to_le_bytes());
        let mut r = FrameReader::new(Cursor::new(h));
        assert!(matches!(
            r.read_frame(),
            Err(ConnError::Frame(FrameError::TooLarge(_)))
        ));
        // A truncated frame: the stream ends inside it.
        let mut b = Vec::new();
        frame::encode(0, &Frame::Ping { nanos: 3 }, &mut b);
        b.truncate(b.len() - 2);
        let mut r = FrameReader::new(Cursor::new(b));
        assert!(matches!(r.read_frame(), Err(ConnError::Closed)));
    }
}
