//! The `access-node` binary: command-line errors, a file-size limit answered with Ack NoSpace
//! (RLIMIT_FSIZE set only in the child), status through the CLI, SIGTERM.

// Test code (like `allow-unwrap-in-tests` in clippy.toml, which covers only #[test] functions,
// not the helpers of an integration test): a panic is how a failure is reported.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mirror_proto::auth::{self, Secret};
use mirror_proto::conn::FrameReader;
use mirror_proto::frame::{self, AckStatus, DiskState, Frame, NodeInfo, Role};

const BIN: &str = env!("CARGO_BIN_EXE_access-node");
const SECRET: &str = "s3cret";
const MIB: u64 = 1 << 20;

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), format!("{SECRET}\n")).unwrap();
        Dir { dir }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn s(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }
}

/// A running `access-node serve`, SIGKILLed on drop if still running.
struct Serve {
    child: Child,
    addr: SocketAddr,
    lines: mpsc::Receiver<String>,
    log: Vec<String>,
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Serve {
    /// Starts serve on 127.0.0.1:0 and waits for "listening on ADDR".
    fn start(d: &Dir, fsize_limit: Option<u64>) -> Self {
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--image", &d.s("r.img"), "--listen", "127.0.0.1:0"])
            .args(["--secret-file", &d.s("secret"), "--control", &d.s("ctl")])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(limit) = fsize_limit {
            // SAFETY: the closure runs in the forked child before exec and only calls
            // setrlimit, which is async-signal-safe; it allocates nothing.
            unsafe {
                cmd.pre_exec(move || {
                    let r = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_FSIZE, &r) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().unwrap();
        let err = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let mut s = Serve {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            lines,
            log: Vec::new(),
        };
        let l = s.wait_line("listening on ");
        let addr = l.rsplit("listening on ").next().unwrap().trim();
        s.addr = addr.parse().unwrap();
        s
    }

    fn wait_line(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.log.push(l.clone());
                    if l.contains(needle) {
                        return l;
                    }
                }
                Err(_) => panic!("no log line with {needle:?}; log: {:#?}", self.log),
            }
        }
    }

    /// Log lines so far (after the process exited or a short wait).
    fn drain(&mut self) -> &[String] {
        while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.log.push(l);
        }
        &self.log
    }
}

/// Just enough of a primary for these tests.
struct Primary {
    stream: TcpStream,
    reader: FrameReader<TcpStream>,
    seq: u64,
}

impl Primary {
    fn attach(addr: SocketAddr, size: u64) -> Self {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut p = Primary {
            reader: FrameReader::new(stream.try_clone().unwrap()),
            stream,
            seq: 0,
        };
        let secret = Secret::from_bytes(SECRET.as_bytes()).unwrap();
        let pn = auth::nonce().unwrap();
        p.send(&Frame::Hello { nonce: pn });
        let (rn, mac) = match p.reader.read_frame().unwrap().frame {
            Frame::Challenge { nonce, mac } => (nonce, mac),
            f => panic!("{f:?}"),
        };
        assert!(secret.verify_replica(&pn, &rn, &mac));
        p.send(&Frame::Auth {
            mac: secret.primary_proof(&pn, &rn),
        });
        assert_eq!(p.reader.read_frame().unwrap().frame, Frame::AuthOk);
        p.send(&Frame::Attach(NodeInfo {
            node_id: 1,
            size,
            role: Role::Primary,
            disk_state: DiskState::UpToDate,
            generation: 5,
            bitmap_generation: 0,
            history: vec![],
            flags: 0,
            hot: vec![],
        }));
        match p.reader.read_frame().unwrap().frame {
            Frame::Attached(n) => assert_eq!(n.size, size),
            f => panic!("{f:?}"),
        }
        p
    }

    fn send(&mut self, f: &Frame<'_>) -> u64 {
        self.seq += 1;
        let mut b = Vec::new();
        frame::encode(self.seq, f, &mut b);
        self.stream.write_all(&b).unwrap();
        self.seq
    }

    fn ack(&mut self, f: &Frame<'_>) -> AckStatus {
        let seq = self.send(f);
        let d = self.reader.read_frame().unwrap();
        assert_eq!(d.seq, seq);
        match d.frame {
            Frame::Ack { status } => status,
            f => panic!("{f:?}"),
        }
    }

    fn write(&mut self, offset: u64, len: usize) -> AckStatus {
        self.ack(&Frame::Write {
            offset,
            resync: false,
            data: &vec![0x5a; len],
        })
    }
}

fn status_json(ctl: &Path) -> serde_json::Value {
    let o = run(&["status", "--control", &ctl.display().to_string(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn file_size_limit_gives_no_space_and_the_node_survives() {
    let d = Dir::new();
    // The image exists already (creating it needs no limit); the limit is 1 MiB.
    std::fs::File::create(d.path("r.img"))
        .unwrap()
        .set_len(4 * MIB)
        .unwrap();
    let mut s = Serve::start(&d, Some(MIB));
    let mut p = Primary::attach(s.addr, 4 * MIB);
    assert_eq!(p.write(0, 4096), AckStatus::Ok);
    assert_eq!(p.write(2 * MIB, 4096), AckStatus::NoSpace);
    assert_eq!(p.write(MIB - 512, 4096), AckStatus::NoSpace);
    assert_eq!(p.write(3 * MIB, 512), AckStatus::NoSpace);
    assert_eq!(p.ack(&Frame::Flush), AckStatus::Ok);
    assert_eq!(p.write(4096, 4096), AckStatus::Ok);
    assert!(s.child.try_wait().unwrap().is_none(), "the node died");

    let v = status_json(&d.path("ctl"));
    assert_eq!(v["errors"], 3);
    assert_eq!(v["writes"], 5);
    assert_eq!(v["peer_state"], "connected");
    let o = run(&["status", "--control", &d.s("ctl")]);
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("secondary") && table.contains("connected"),
        "{table}"
    );

    // Logged once per connection, not per write.
    let log = s.drain().to_vec();
    let n = log.iter().filter(|l| l.contains("NoSpace")).count();
    assert_eq!(n, 1, "{log:#?}");

    // SIGTERM: flush, remove the control socket, exit 0.
    // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet.
    let r = unsafe { libc::kill(s.child.id() as i32, libc::SIGTERM) };
    assert_eq!(r, 0);
    let st = s.child.wait().unwrap();
    assert_eq!(st.code(), Some(0), "{:#?}", s.drain());
    assert!(!d.path("ctl").exists());
}

#[test]
fn serve_refuses_a_locked_image_a_used_port_and_a_used_control_socket() {
    let d = Dir::new();
    std::fs::File::create(d.path("r.img"))
        .unwrap()
        .set_len(MIB)
        .unwrap();
    let s = Serve::start(&d, None);
    let img = d.s("r.img");
    let secret = d.s("secret");

    let o = run(&[
        "serve",
        "--image",
        &img,
        "--listen",
        "127.0.0.1:0",
        "--secret-file",
        &secret,
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("locked") && e.contains("r.img"), "{e}");

    let other = d.s("other.img");
    let busy = s.addr.to_string();
    let o = run(&[
        "serve",
        "--image",
        &other,
        "--listen",
        &busy,
        "--secret-file",
        &secret,
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains(&busy) && e.contains("cannot listen"), "{e}");

    let ctl = d.s("ctl");
    let o = run(&[
        "serve",
        "--image",
        &other,
        "--listen",
        "127.0.0.1:0",
        "--secret-file",
        &secret,
        "--control",
        &ctl,
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("in use") && e.contains("ctl"), "{e}");
    drop(s);
}

#[test]
fn cli_errors_are_one_line_naming_the_problem() {
    let d = Dir::new();
    let img = d.s("r.img");
    let o = run(&["serve", "--image", &img, "--listen", "127.0.0.1:0"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--secret-file"), "{}", stderr(&o));

    let missing = d.s("no-such-secret");
    let o = run(&[
        "serve",
        "--image",
        &img,
        "--listen",
        "127.0.0.1:0",
        "--secret-file",
        &missing,
    ]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains(&missing), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");

    std::fs::write(d.path("empty"), "  \n").unwrap();
    let o = run(&[
        "serve",
        "--image",
        &img,
        "--listen",
        "127.0.0.1:0",
        "--secret-file",
        &d.s("empty"),
    ]);
    assert!(stderr(&o).contains("empty"), "{}", stderr(&o));

    let o = run(&[
        "serve",
        "--image",
        &img,
        "--listen",
        "nowhere",
        "--secret-file",
        &d.s("secret"),
    ]);
    assert!(stderr(&o).contains("nowhere"), "{}", stderr(&o));

    let o = run(&["status", "--control", &d.s("nope.sock")]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("nope.sock"), "{}", stderr(&o));
    // Nothing was created by the failed starts.
    assert!(!d.path("r.img").exists());
}

#[test]
fn port_zero_reports_the_real_port() {
    let d = Dir::new();
    let s = Serve::start(&d, None);
    assert_ne!(s.addr.port(), 0);
    // Nobody else can have it while the node listens.
    assert!(TcpListener::bind(s.addr).is_err());
    let v = status_json(&d.path("ctl"));
    assert_eq!(v["capacity_bytes"], 0);
    assert_eq!(v["peer_state"], "disconnected");
}
