//! Connections that have not authenticated yet, and the rules that keep them from locking a
//! real primary out: an absolute deadline for the whole handshake, at most
//! [`MAX_PREAUTH_PER_IP`] per source address and [`MAX_PREAUTH`] in all, and when a limit is
//! reached the *oldest* waiting connection makes room for the new one. A real primary's
//! handshake takes a round trip: its first message arrives with the connection. The listener
//! sets `TCP_DEFER_ACCEPT`, so a connection reaches `accept` once it has sent something, and
//! one whose whole NoiseInit is already there when accepted is "ready": it is never pushed out
//! (it is checked at once and either proves the secret or is closed within microseconds); nor
//! is one whose NoiseInit checked out (only the deadline still applies). So idle or slow
//! connections, however many and from wherever, cannot keep a primary out: they only push each
//! other out.

use std::collections::VecDeque;
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{debug, error, warn};
use mirror_proto::sys::RefusalLog;

use crate::server::lock;

/// Most unauthenticated connections at once.
pub const MAX_PREAUTH: usize = 64;
/// Most unauthenticated connections from one address.
pub const MAX_PREAUTH_PER_IP: usize = 16;
/// How often expired handshakes are cut off.
pub const REAP_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug)]
struct Waiting {
    id: u64,
    ip: IpAddr,
    since: Instant,
    /// Its whole NoiseInit had arrived when it was accepted, or its NoiseInit was made with
    /// the secret (or replayed): not evicted, only reaped.
    proven: bool,
    /// A clone of the connection, to cut it off (its thread then ends at its next read).
    stream: TcpStream,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    /// Oldest first.
    waiting: VecDeque<Waiting>,
}

/// The registry of unauthenticated connections.
#[derive(Debug, Default)]
pub struct PreAuth {
    inner: Mutex<Inner>,
}

/// Why a waiting connection was cut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evicted {
    /// Its address had [`MAX_PREAUTH_PER_IP`] waiting.
    SameAddress,
    /// [`MAX_PREAUTH`] were waiting.
    Full,
}

impl PreAuth {
    /// Registers a new connection (`stream`: a clone of it; `ready`: its whole first message is
    /// already received); returns its id and, if one had to make room, who was cut off and
    /// why.
    pub fn admit(
        &self,
        peer: SocketAddr,
        stream: TcpStream,
        ready: bool,
    ) -> (u64, Option<(SocketAddr, Evicted)>) {
        let mut g = lock(&self.inner);
        let ip = peer.ip();
        let evictable = |w: &Waiting| !w.proven;
        let same = g
            .waiting
            .iter()
            .filter(|w| w.ip == ip && evictable(w))
            .count();
        let victim = if same >= MAX_PREAUTH_PER_IP {
            g.waiting
                .iter()
                .position(|w| w.ip == ip && evictable(w))
                .map(|i| (i, Evicted::SameAddress))
        } else if g.waiting.iter().filter(|w| evictable(w)).count() >= MAX_PREAUTH {
            g.waiting
                .iter()
                .position(evictable)
                .map(|i| (i, Evicted::Full))
        } else {
            None
        };
        let evicted = victim.and_then(|(i, why)| {
            let w = g.waiting.remove(i)?;
            let addr = w.stream.peer_addr().ok();
            let _ = w.stream.shutdown(Shutdown::Both);
            addr.map(|a| (a, why))
        });
        g.next_id += 1;
        let id = g.next_id;
        g.waiting.push_back(Waiting {
            id,
            ip,
            since: Instant::now(),
            proven: ready,
            stream,
        });
        (id, evicted)
    }

    /// The connection's NoiseInit checked out: it is not pushed out to make room any more.
    pub fn proven(&self, id: u64) {
        let mut g = lock(&self.inner);
        if let Some(w) = g.waiting.iter_mut().find(|w| w.id == id) {
            w.proven = true;
        }
    }

    /// The connection authenticated or ended: it no longer counts.
    pub fn done(&self, id: u64) {
        let mut g = lock(&self.inner);
        if let Some(i) = g.waiting.iter().position(|w| w.id == id) {
            g.waiting.remove(i);
        }
    }

    /// Cuts off every connection waiting longer than `deadline`; returns how many.
    pub fn reap(&self, deadline: Duration) -> usize {
        let mut g = lock(&self.inner);
        let mut n = 0;
        while g
            .waiting
            .front()
            .is_some_and(|w| w.since.elapsed() >= deadline)
        {
            if let Some(w) = g.waiting.pop_front() {
                debug!(
                    "handshake from {} took longer than {deadline:?}: cut off",
                    w.ip
                );
                let _ = w.stream.shutdown(Shutdown::Both);
                n += 1;
            }
        }
        n
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        lock(&self.inner).waiting.len()
    }
}

/// One WARN line per few seconds at most, for events anyone on the network can cause.
#[derive(Debug)]
pub struct RateLimitedLog(Mutex<RefusalLog>);

impl RateLimitedLog {
    pub fn new(what: &str) -> Self {
        RateLimitedLog(Mutex::new(RefusalLog::new(what)))
    }

    /// `Some(number left out since the last line)` if a line may be logged now.
    pub fn tick(&self) -> Option<u64> {
        lock(&self.0).tick(Instant::now())
    }
}

/// How a listener admits connections (access-node's and the witness's): at most `max` live
/// connections, each registered in the pre-authentication registry until it proves the
/// secret, each served on its own thread; what anyone can cause is logged rate-limited.
#[derive(Debug)]
pub struct Admission {
    pub preauth: PreAuth,
    live: AtomicUsize,
    max: usize,
    log: RateLimitedLog,
}

impl Admission {
    pub fn new(max: usize) -> Self {
        Admission {
            preauth: PreAuth::default(),
            live: AtomicUsize::new(0),
            max,
            log: RateLimitedLog::new("connections"),
        }
    }

    /// Accepts connections on `listener` until the process exits. Each one admitted is served
    /// by `serve(owner, stream, peer, preauth id)` on a thread named `PREFIX-PEER`; its
    /// registration and its place under the cap end with it.
    pub fn accept_loop<T: Send + Sync + 'static>(
        owner: &Arc<T>,
        admission: fn(&T) -> &Admission,
        listener: &TcpListener,
        prefix: &str,
        serve: fn(&T, TcpStream, SocketAddr, u64),
    ) {
        for conn in listener.incoming() {
            match conn {
                Ok(stream) => Self::start(owner, admission, stream, prefix, serve),
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    warn!("accepting a connection failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn start<T: Send + Sync + 'static>(
        owner: &Arc<T>,
        admission: fn(&T) -> &Admission,
        stream: TcpStream,
        prefix: &str,
        serve: fn(&T, TcpStream, SocketAddr, u64),
    ) {
        let a = admission(owner);
        let peer = match stream.peer_addr() {
            Ok(p) => p,
            Err(e) => {
                // E.g. reset right after the connect: anyone can do this, often.
                if a.log.tick().is_some() {
                    warn!("connection without a peer address dropped: {e}");
                }
                return;
            }
        };
        if a.live.fetch_add(1, Ordering::AcqRel) >= a.max {
            a.live.fetch_sub(1, Ordering::AcqRel);
            if a.log.tick().is_some() {
                warn!(
                    "connection from {peer} dropped: already {} connections",
                    a.max
                );
            }
            return;
        }
        let clone = match stream.try_clone() {
            Ok(c) => c,
            Err(e) => {
                a.live.fetch_sub(1, Ordering::AcqRel);
                if a.log.tick().is_some() {
                    warn!("connection from {peer} dropped: {e}");
                }
                return;
            }
        };
        let (id, evicted) = a.preauth.admit(peer, clone, first_message_arrived(&stream));
        if let Some((who, why)) = evicted {
            if let Some(more) = a.log.tick() {
                let why = match why {
                    Evicted::SameAddress => "too many unauthenticated connections from its address",
                    Evicted::Full => "too many unauthenticated connections",
                };
                warn!(
                    "unauthenticated connection from {who} cut off to make room: {why} \
                     ({more} more such events since the last message)"
                );
            }
        }
        let o = owner.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("{prefix}-{peer}"))
            .spawn(move || {
                serve(&o, stream, peer, id);
                let a = admission(&o);
                a.preauth.done(id);
                a.live.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            a.preauth.done(id);
            a.live.fetch_sub(1, Ordering::AcqRel);
            error!("connection from {peer} dropped: cannot start a thread: {e}");
        }
    }
}

/// Whether a whole NoiseInit frame is already received on `stream` (without reading it).
fn first_message_arrived(stream: &TcpStream) -> bool {
    const LEN: usize = mirror_proto::frame::HEADER_LEN + mirror_proto::frame::NOISE_INIT_LEN;
    let mut buf = [0u8; LEN];
    if stream.set_nonblocking(true).is_err() {
        return false;
    }
    let n = stream.peek(&mut buf).unwrap_or(0);
    stream.set_nonblocking(false).is_ok() && n == LEN
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A connected socket whose peer address is `127.0.0.1`; returns (server side, client).
    fn conn(l: &TcpListener) -> (TcpStream, TcpStream) {
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (s, c)
    }

    fn is_cut(client: &mut TcpStream) -> bool {
        use std::io::Read;
        client
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        matches!(client.read(&mut [0u8; 1]), Ok(0))
    }

    #[test]
    fn the_oldest_of_an_address_makes_room_and_expired_ones_are_cut() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = PreAuth::default();
        let mut clients = Vec::new();
        let admit = |p: &PreAuth| {
            let (s, c) = conn(&l);
            let (id, ev) = p.admit(s.peer_addr().unwrap(), s.try_clone().unwrap(), false);
            (id, ev.map(|e| e.1), s, c)
        };
        for i in 0..MAX_PREAUTH_PER_IP {
            let (_, ev, s, c) = admit(&p);
            assert_eq!(ev, None, "{i}");
            clients.push((s, c));
        }
        let (id, ev, _s, mut c) = admit(&p);
        assert_eq!(ev, Some(Evicted::SameAddress));
        assert!(is_cut(&mut clients[0].1), "the oldest was cut off");
        assert!(!is_cut(&mut clients[1].1), "the others wait on");
        assert_eq!(p.len(), MAX_PREAUTH_PER_IP);
        // A proven one is never the one to go: the next oldest goes instead.
        p.proven(clients_id_of(&p, 1));
        let (id2, ev, _s2, mut c2) = admit(&p);
        assert_eq!(ev, None, "a proven one does not count against the limit");
        let (id3, ev, _s3, mut c3) = admit(&p);
        assert_eq!(ev, Some(Evicted::SameAddress));
        assert!(!is_cut(&mut clients[1].1), "the proven one was cut off");
        assert!(is_cut(&mut clients[2].1), "the oldest unproven one stayed");
        for id in [id, id2, id3] {
            p.done(id);
        }
        assert!(!is_cut(&mut c) && !is_cut(&mut c2) && !is_cut(&mut c3));
        let left = p.len();
        assert_eq!(left, MAX_PREAUTH_PER_IP - 2);
        assert_eq!(p.reap(Duration::from_secs(60)), 0);
        assert_eq!(p.reap(Duration::ZERO), left);
        assert!(is_cut(&mut clients[1].1), "a proven one is still reaped");
        assert_eq!(p.len(), 0);
    }

    /// The id of the `n`th oldest waiting connection.
    fn clients_id_of(p: &PreAuth, n: usize) -> u64 {
        lock(&p.inner).waiting[n - 1].id
    }
}
