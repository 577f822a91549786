//! The control socket of both programs: requests over a unix socket, answered with one JSON
//! document.
//!
//! Protocol: the client sends one line (a command such as `status`), the server answers one
//! line of JSON and closes. The human-readable table is rendered on the client side from the
//! same JSON.
//!
//! Access: the socket is created by [`crate::sys::listen_unix`] (mode 0600, or 0660 with
//! `--socket-group`), and every connection's peer is checked ([`SocketAccess`]) before a byte
//! is read from it; a refused one is closed at once (one rate-limited WARN line).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use log::{debug, warn};
use serde_json::Value;
use thiserror::Error;

use crate::sys::{RefusalLog, SocketAccess};

#[derive(Debug, Error)]
pub enum ControlError {
    #[error("cannot connect to control socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("control socket {path}: request failed")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("control socket {path} sent an invalid reply")]
    BadReply {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("control socket {path}: {message}")]
    Refused { path: PathBuf, message: String },
}

/// The state of the replication link, as both programs' status documents report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    /// Trying to reach the peer (the primary, before the first attempt ended).
    Connecting,
    Connected,
    Disconnected,
    AuthFailed,
    Refused,
    /// Both sides wrote since they last agreed; nothing is overwritten.
    SplitBrain,
    /// The image of a pair served without its peer: every write is recorded out of sync.
    Standalone,
}

impl PeerState {
    /// Every state (the metrics write one sample per state).
    pub const ALL: [PeerState; 7] = [
        PeerState::Connecting,
        PeerState::Connected,
        PeerState::Disconnected,
        PeerState::AuthFailed,
        PeerState::Refused,
        PeerState::SplitBrain,
        PeerState::Standalone,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PeerState::Connecting => "connecting",
            PeerState::Connected => "connected",
            PeerState::Disconnected => "disconnected",
            PeerState::AuthFailed => "auth-failed",
            PeerState::Refused => "refused",
            PeerState::SplitBrain => "split-brain",
            PeerState::Standalone => "standalone",
        }
    }
}

/// Answers a command line (e.g. `status`) with a JSON document; unknown commands should answer
/// `{"error": ...}`.
pub type Handler = Arc<dyn Fn(&str) -> Value + Send + Sync>;

/// Runs after a reply was written (or writing it failed), with the command and the reply;
/// e.g. to stop the process once the client has its answer.
pub type AfterReply = Arc<dyn Fn(&str, &Value) + Send + Sync>;

/// Longest request line read (bytes, with its newline).
pub const MAX_REQUEST: u64 = 256;
/// How long [`request`] waits for a reply.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves status requests on `listener` until the process exits, to the peers `access`
/// allows.
pub fn spawn_server(
    listener: UnixListener,
    access: SocketAccess,
    handler: Handler,
) -> io::Result<()> {
    spawn_server_then(listener, access, handler, Arc::new(|_, _| {}))
}

/// Like [`spawn_server`]; `after` runs once each reply is out. Each connection is served by a
/// thread of its own.
pub fn spawn_server_then(
    listener: UnixListener,
    access: SocketAccess,
    handler: Handler,
    after: AfterReply,
) -> io::Result<()> {
    let name = match listener.local_addr() {
        Ok(a) => match a.as_pathname() {
            Some(p) => format!("control socket {}", p.display()),
            None => "control socket".to_owned(),
        },
        Err(_) => "control socket".to_owned(),
    };
    let mut refusals = RefusalLog::new(name);
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        // Before anything is read: a refused peer is closed at once.
                        if let Err(why) = access.check_peer(stream.as_fd()) {
                            refusals.refused(&why, &access);
                            continue;
                        }
                        // One thread per request: a silent client cannot delay the others.
                        let (h, a) = (handler.clone(), after.clone());
                        let spawned = std::thread::Builder::new()
                            .name("control-conn".into())
                            .spawn(move || {
                                if let Err(e) = handle(stream, &h, &a) {
                                    debug!("control connection: {e}");
                                }
                            });
                        if let Err(e) = spawned {
                            warn!("control socket: cannot start a thread: {e}");
                        }
                    }
                    Err(e) => {
                        warn!("control socket accept failed: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })
        .map(|_| ())
}

fn handle(stream: UnixStream, handler: &Handler, after: &AfterReply) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    serve_request(&stream, &stream, handler, after)
}

/// One request of the protocol on any byte stream: reads one line (at most [`MAX_REQUEST`]
/// bytes, invalid UTF-8 replaced, surrounding whitespace trimmed), passes it to `handler`,
/// writes the reply as one line of JSON, then runs `after`. (The socket server's body; public
/// for the fuzz targets.)
pub fn serve_request(
    reader: impl Read,
    mut writer: impl Write,
    handler: &Handler,
    after: &AfterReply,
) -> io::Result<()> {
    let mut raw = Vec::new();
    BufReader::new(reader.take(MAX_REQUEST)).read_until(b'\n', &mut raw)?;
    let line = String::from_utf8_lossy(&raw);
    let command = line.trim();
    let reply = handler(command);
    let written = writer
        .write_all(reply.to_string().as_bytes())
        .and_then(|()| writer.write_all(b"\n"));
    after(command, &reply);
    written
}

/// Asks the server at `path` for its status document.
pub fn query_status(path: &Path) -> Result<Value, ControlError> {
    request(path, "status")
}

/// `status` of either program: the document as pretty JSON, or the table for people.
pub fn print_status(path: &Path, json: bool) -> Result<(), ControlError> {
    let v = query_status(path)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        print!("{}", render_table(&v));
    }
    Ok(())
}

/// Sends one command and returns the reply; a reply with an `error` key is an error.
pub fn request(path: &Path, command: &str) -> Result<Value, ControlError> {
    request_timeout(path, command, REQUEST_TIMEOUT)
}

/// [`request`] for a command that may take longer than [`REQUEST_TIMEOUT`] to answer.
pub fn request_timeout(
    path: &Path,
    command: &str,
    timeout: Duration,
) -> Result<Value, ControlError> {
    let mut s = UnixStream::connect(path).map_err(|source| ControlError::Connect {
        path: path.to_owned(),
        source,
    })?;
    let io_err = |source| ControlError::Io {
        path: path.to_owned(),
        source,
    };
    s.set_read_timeout(Some(timeout)).map_err(io_err)?;
    s.write_all(format!("{command}\n").as_bytes())
        .map_err(io_err)?;
    let mut buf = String::new();
    s.take(16 << 20).read_to_string(&mut buf).map_err(io_err)?;
    let v: Value = serde_json::from_str(buf.trim()).map_err(|source| ControlError::BadReply {
        path: path.to_owned(),
        source,
    })?;
    if let Some(msg) = v.get("error").and_then(Value::as_str) {
        return Err(ControlError::Refused {
            path: path.to_owned(),
            message: msg.to_owned(),
        });
    }
    Ok(v)
}

/// `s` with every control character (terminal escapes, newlines) written as `\u{..}`: for
/// text that came from outside (a peer's Refuse reason, an error message) before it reaches a
/// log line or a terminal.
pub fn escape_controls(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

/// Bytes in a readable unit.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A text progress bar, e.g. `[#######.............] 35.0%`.
pub fn progress_bar(done: u64, total: u64, width: usize) -> String {
    let frac = if total == 0 {
        1.0
    } else {
        (done as f64 / total as f64).clamp(0.0, 1.0)
    };
    let filled = (frac * width as f64).round() as usize;
    format!(
        "[{}{}] {:.1}%",
        "#".repeat(filled),
        ".".repeat(width - filled),
        frac * 100.0
    )
}

/// Renders a status document (of either program) as a table for people. Rows appear only for
/// the keys the document has.
pub fn render_table(v: &Value) -> String {
    let has = |k: &str| v.get(k).is_some_and(|x| !x.is_null());
    let u = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    // Every string is printed with its control characters escaped: some come from peers.
    let s = |k: &str| escape_controls(v.get(k).and_then(Value::as_str).unwrap_or("?"));
    let b = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
    let mut out = String::new();
    let mut row = |k: &str, val: String| out.push_str(&format!("{k:<15} {val}\n"));
    if has("role") {
        row("role", s("role"));
    }
    row(
        "image",
        format!(
            "{}{}",
            s("image"),
            if has("readonly") {
                if b("readonly") {
                    " (read-only)"
                } else {
                    " (read-write)"
                }
            } else {
                ""
            }
        ),
    );
    row(
        "capacity",
        format!(
            "{} ({} sectors)",
            human_bytes(u("capacity_bytes")),
            u("capacity_bytes") / 512
        ),
    );
    if has("disk_state") {
        row("disk", s("disk_state"));
    }
    if has("generation") {
        row("generation", format!("{:016x}", u("generation")));
    }
    if has("peer_generation") {
        row("peer generation", format!("{:016x}", u("peer_generation")));
    }
    if has("peer_state") {
        let mut p = s("peer_state");
        if has("peer") {
            p = format!("{p} ({})", s("peer"));
        }
        row("peer", p);
        if has("peer_reason") {
            row("reason", s("peer_reason"));
        }
    }
    if has("out_of_sync_bytes") {
        let oos = u("out_of_sync_bytes");
        let done = u("resync_done_bytes");
        // Saturating: the document may come from anywhere (a debug build panicked on overflow).
        let total = done.saturating_add(oos);
        if b("resyncing") {
            row(
                "resync",
                format!(
                    "{} {} of {} copied",
                    progress_bar(done, total, 30),
                    human_bytes(done),
                    human_bytes(total)
                ),
            );
        }
        row("out of sync", human_bytes(oos));
    }
    if has("link_write_latency_us") {
        row(
            "link",
            format!(
                "write latency {} us (avg), sent {}, received {}",
                u("link_write_latency_us"),
                human_bytes(u("bytes_sent")),
                human_bytes(u("bytes_received"))
            ),
        );
    }
    if has("num_queues") {
        let mut q = format!("{} x {}", u("num_queues"), u("queue_size"));
        if has("queues_enabled") {
            q += &format!(", {} enabled", u("queues_enabled"));
        }
        row("queues", q);
    }
    if has("frontend_connected") {
        row(
            "frontend",
            format!(
                "{} ({} connection(s) so far)",
                if b("frontend_connected") {
                    "connected"
                } else {
                    "waiting"
                },
                u("connections")
            ),
        );
    }
    row(
        "requests",
        format!(
            "reads {}  writes {}  flushes {}  discards {}  write-zeroes {}",
            u("reads"),
            u("writes"),
            u("flushes"),
            u("discards"),
            u("write_zeroes")
        ),
    );
    row(
        "bytes",
        format!(
            "read {}  written {}",
            human_bytes(u("bytes_read")),
            human_bytes(u("bytes_written"))
        ),
    );
    if has("cache_hits") {
        row(
            "cache",
            format!(
                "{} hits, {} misses, {} of {}",
                u("cache_hits"),
                u("cache_misses"),
                human_bytes(u("cache_bytes")),
                human_bytes(u("cache_capacity_bytes"))
            ),
        );
    }
    row(
        "errors",
        format!(
            "{} (unsupported requests {})",
            u("errors"),
            u("unsupported")
        ),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_over_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ctl");
        let l = UnixListener::bind(&p).unwrap();
        let h: Handler = Arc::new(|cmd| match cmd {
            "status" => serde_json::json!({"image": "x", "reads": 3}),
            other => serde_json::json!({"error": format!("unknown command {other:?}")}),
        });
        spawn_server(l, SocketAccess::default(), h).unwrap();
        let v = query_status(&p).unwrap();
        assert_eq!(v["reads"], 3);
        // Garbage gets an error reply, and the server keeps serving.
        let mut s = UnixStream::connect(&p).unwrap();
        s.write_all(b"\x00\xffgarbage\n").unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        assert!(r.contains("error"));
        assert_eq!(query_status(&p).unwrap()["image"], "x");
    }

    #[test]
    fn table_shows_the_image() {
        let t =
            render_table(&serde_json::json!({"image": "/tmp/a.img", "capacity_bytes": 1048576u64}));
        assert!(t.contains("/tmp/a.img"));
        assert!(t.contains("1.0 MiB"));
        assert!(!t.contains("peer"));
        let t = render_table(&serde_json::json!({
            "role": "primary", "peer_state": "refused", "peer_reason": "size mismatch",
            "out_of_sync_bytes": 300u64, "resync_done_bytes": 100u64, "resyncing": true
        }));
        assert!(t.contains("refused"));
        assert!(t.contains("size mismatch"));
        assert!(t.contains("25.0%"), "{t}");
    }

    #[test]
    fn after_reply_runs_once_the_reply_is_out() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ctl");
        let l = UnixListener::bind(&p).unwrap();
        let h: Handler = Arc::new(|cmd| serde_json::json!({ "echo": cmd }));
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = std::sync::Mutex::new(tx);
        let after: AfterReply = Arc::new(move |cmd, reply| {
            let _ = tx
                .lock()
                .unwrap()
                .send((cmd.to_owned(), reply["echo"].clone()));
        });
        spawn_server_then(l, SocketAccess::default(), h, after).unwrap();
        let v = request_timeout(&p, "promote force", Duration::from_secs(1)).unwrap();
        assert_eq!(v["echo"], "promote force");
        let (cmd, echoed) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(
            (cmd.as_str(), echoed.as_str()),
            ("promote force", Some("promote force"))
        );
    }

    #[test]
    fn table_shows_queues_offered_and_enabled() {
        let t = render_table(&serde_json::json!({"num_queues": 16u64, "queue_size": 256u64}));
        assert!(t.contains("16 x 256\n"), "{t}");
        let t = render_table(&serde_json::json!({
            "num_queues": 16u64, "queue_size": 256u64, "queues_enabled": 4u64
        }));
        assert!(t.contains("16 x 256, 4 enabled\n"), "{t}");
    }

    #[test]
    fn table_shows_both_generations() {
        let t = render_table(&serde_json::json!({"generation": 10u64, "peer_generation": 11u64}));
        assert!(t.contains("generation      000000000000000a"), "{t}");
        assert!(t.contains("peer generation 000000000000000b"), "{t}");
        let t = render_table(&serde_json::json!({"generation": 10u64, "peer_generation": null}));
        assert!(!t.contains("peer generation"), "{t}");
    }

    #[test]
    fn control_characters_are_escaped_in_the_table() {
        assert_eq!(escape_controls("a\x1b[2Jb\nc"), "a\\u{1b}[2Jb\\u{a}c");
        let t = render_table(&serde_json::json!({
            "image": "x", "peer_state": "refused", "peer_reason": "evil\x1b]0;pwned\x07",
        }));
        assert!(!t.contains('\x1b') && !t.contains('\x07'), "{t:?}");
        assert!(t.contains("evil\\u{1b}]0;pwned\\u{7}"), "{t}");
    }

    #[test]
    fn huge_counters_do_not_overflow() {
        // Seen while writing fuzz/control_line: done + out of sync overflowed.
        let t = render_table(&serde_json::json!({
            "resyncing": true, "out_of_sync_bytes": u64::MAX, "resync_done_bytes": u64::MAX,
        }));
        assert!(t.contains("100.0%"), "{t}");
    }

    #[test]
    fn progress_bar_bounds() {
        assert_eq!(progress_bar(0, 0, 4), "[####] 100.0%");
        assert_eq!(progress_bar(1, 2, 4), "[##..] 50.0%");
        assert_eq!(progress_bar(5, 2, 4), "[####] 100.0%");
    }

    #[test]
    fn missing_socket_names_the_path() {
        let e = query_status(Path::new("/nonexistent/ctl")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/ctl"));
    }
}
