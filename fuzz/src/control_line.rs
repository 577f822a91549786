//! The control protocol (`mirror_proto::control`): one request line through
//! `control::serve_request` (the socket server's body) with a trivial handler, and
//! `control::render_table` on fuzzer-built status documents.
//!
//! Properties:
//! - request: no panic; the handler is called once, with the first line of at most
//!   `MAX_REQUEST` bytes, invalid UTF-8 replaced and whitespace trimmed (so no newline, and no
//!   more than 3 x `MAX_REQUEST` bytes); no more than `MAX_REQUEST` bytes are read; the reply is
//!   exactly one line, the handler's JSON;
//! - table: no panic on any JSON document (any keys, any types, huge numbers); no control
//!   character in the output but the newline at the end of each row; every row is
//!   `name value`.

use std::io::{Cursor, Read};
use std::sync::{Arc, Mutex};

use arbitrary::{Result, Unstructured};
use mirror_proto::control::{self, AfterReply, Handler, MAX_REQUEST};
use serde_json::{Map, Value};

/// The keys `render_table` looks at, and a few it does not.
const KEYS: [&str; 35] = [
    "role",
    "image",
    "readonly",
    "capacity_bytes",
    "disk_state",
    "generation",
    "peer_generation",
    "peer_state",
    "peer",
    "peer_reason",
    "out_of_sync_bytes",
    "resync_done_bytes",
    "resyncing",
    "link_write_latency_us",
    "bytes_sent",
    "bytes_received",
    "num_queues",
    "queue_size",
    "queues_enabled",
    "frontend_connected",
    "connections",
    "reads",
    "writes",
    "flushes",
    "discards",
    "write_zeroes",
    "bytes_read",
    "bytes_written",
    "cache_hits",
    "cache_misses",
    "cache_bytes",
    "cache_capacity_bytes",
    "errors",
    "unsupported",
    "error",
];

pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let _ = match u.int_in_range(0..=3u8).unwrap_or(0) {
        0 => request(&mut u),
        1 => {
            // A document as JSON text (any shape).
            if let Ok(v) = serde_json::from_slice::<Value>(crate::rest(&mut u)) {
                table(&v);
            }
            Ok(())
        }
        _ => document(&mut u, 0).map(|v| table(&v)),
    };
}

/// A reader that hands out `data` a few bytes at a time and counts what it gave.
struct Counting<'a> {
    inner: Cursor<&'a [u8]>,
    step: usize,
}

impl Read for Counting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.step);
        self.inner.read(&mut buf[..n])
    }
}

fn request(u: &mut Unstructured<'_>) -> Result<()> {
    let step = usize::from(u.int_in_range(1..=255u8)?);
    let reply = document(u, 0)?;
    let input = crate::rest(u);
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let s = seen.clone();
    let r2 = reply.clone();
    let handler: Handler = Arc::new(move |cmd| {
        s.lock().expect("lock").push(cmd.to_owned());
        r2.clone()
    });
    let after_calls = Arc::new(Mutex::new(0));
    let a = after_calls.clone();
    let after: AfterReply = Arc::new(move |_, _| *a.lock().expect("lock") += 1);
    let mut reader = Counting {
        inner: Cursor::new(input),
        step,
    };
    let mut out = Vec::new();
    control::serve_request(&mut reader, &mut out, &handler, &after).expect("in memory");
    let consumed = reader.inner.position() as usize;
    assert!(consumed as u64 <= MAX_REQUEST, "read {consumed} bytes");
    let seen = seen.lock().expect("lock");
    assert_eq!(seen.len(), 1);
    assert_eq!(*after_calls.lock().expect("lock"), 1);
    let cmd = &seen[0];
    let limit = input.len().min(MAX_REQUEST as usize);
    let line_end = input[..limit]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(limit, |i| i + 1);
    assert_eq!(*cmd, String::from_utf8_lossy(&input[..line_end]).trim());
    assert!(!cmd.contains('\n'));
    assert!(cmd.len() <= 3 * MAX_REQUEST as usize);
    let text = std::str::from_utf8(&out).expect("UTF-8 reply");
    assert_eq!(text, format!("{reply}\n"));
    assert_eq!(text.matches('\n').count(), 1);
    serde_json::from_str::<Value>(text).expect("the reply is JSON");
    Ok(())
}

fn text(u: &mut Unstructured<'_>) -> Result<String> {
    Ok(match u.int_in_range(0..=2u8)? {
        // Any characters, control characters and escapes included.
        0 => u.arbitrary()?,
        1 => (0..u.int_in_range(0..=8u8)?)
            .map(|_| Ok(char::from(u.int_in_range(0..=0x9fu8)?)))
            .collect::<Result<String>>()?,
        _ => u
            .choose(&["primary", "connected", "up-to-date", "split-brain"])?
            .to_string(),
    })
}

fn document(u: &mut Unstructured<'_>, depth: u8) -> Result<Value> {
    let mut m = Map::new();
    for _ in 0..u.int_in_range(0..=12u8)? {
        let key = if u.ratio(7, 8)? {
            u.choose(&KEYS)?.to_string()
        } else {
            u.arbitrary()?
        };
        m.insert(key, value(u, depth)?);
    }
    Ok(Value::Object(m))
}

fn value(u: &mut Unstructured<'_>, depth: u8) -> Result<Value> {
    Ok(match u.int_in_range(0..=8u8)? {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => Value::from(u.arbitrary::<u64>()?),
        3 => Value::from(*u.choose(&[0, 1, u64::MAX, u64::MAX / 2, 1 << 40, 1023, 1024])?),
        4 => Value::from(u.arbitrary::<i64>()?),
        5 => Value::from(u.arbitrary::<f64>()?), // NaN and infinities become null
        6 | 7 => Value::String(text(u)?),
        _ if depth < 3 => {
            if u.arbitrary()? {
                document(u, depth + 1)?
            } else {
                Value::Array(
                    (0..u.int_in_range(0..=3u8)?)
                        .map(|_| value(u, depth + 1))
                        .collect::<Result<_>>()?,
                )
            }
        }
        _ => Value::Null,
    })
}

fn table(v: &Value) {
    let t = control::render_table(v);
    assert!(t.is_empty() || t.ends_with('\n'));
    for line in t.split_terminator('\n') {
        assert!(
            !line.chars().any(char::is_control),
            "control character in {line:?}"
        );
        assert!(
            line.len() >= 16 && line.as_bytes()[15] == b' ',
            "not a row: {line:?}"
        );
    }
}
