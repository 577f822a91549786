//! The `access-node` binary: command-line errors, a file-size limit answered with Ack NoSpace
//! (RLIMIT_FSIZE set only in the child), status through the CLI, SIGTERM, promotion (through a
//! running node and directly), the --on-primary-loss hook.

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

use mirror_proto::auth::Secret;
use mirror_proto::bitmap_file::BitmapFile;
use mirror_proto::conn::FrameReader;
use mirror_proto::frame::{
    self, AckStatus, DiskState, Frame, NodeInfo, Role, NODE_FLAG_DISCARD_MY_DATA,
};
use mirror_proto::meta::{self, Meta, META_FORMAT};
use mirror_proto::secure::{self, SecureReader, SecureWriter};

const BIN: &str = env!("CARGO_BIN_EXE_access-node");
const SECRET: &str = "s3cret s3cret s3cret";
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
        let secret = dir.path().join("secret");
        std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
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
        Self::start_args(d, fsize_limit, &[])
    }

    /// Same, with more arguments for serve.
    fn start_args(d: &Dir, fsize_limit: Option<u64>, extra: &[&str]) -> Self {
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--image", &d.s("r.img"), "--listen", "127.0.0.1:0"])
            .args(["--secret-file", &d.s("secret"), "--control", &d.s("ctl")])
            .args(extra)
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
    reader: FrameReader<SecureReader<TcpStream>>,
    writer: SecureWriter<TcpStream>,
    seq: u64,
    /// The replica's Attached.
    info: Option<NodeInfo>,
}

impl Primary {
    fn attach(addr: SocketAddr, size: u64) -> Self {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let secret = Secret::from_bytes(SECRET.as_bytes()).unwrap();
        let keys = secure::initiate(&mut stream, &secret).unwrap();
        let mut p = Primary {
            reader: FrameReader::new(SecureReader::new(stream.try_clone().unwrap(), keys.clone())),
            writer: SecureWriter::new(stream.try_clone().unwrap(), keys),
            stream,
            seq: 0,
            info: None,
        };
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
            Frame::Attached(n) => {
                assert_eq!(n.size, size);
                p.info = Some(n);
            }
            f => panic!("{f:?}"),
        }
        p
    }

    /// SyncStart, SyncDone: the replica is up to date at `generation`.
    fn sync(&mut self, generation: u64) {
        let start = Frame::SyncStart {
            full: true,
            bytes: 0,
        };
        assert_eq!(self.ack(&start), AckStatus::Ok);
        assert_eq!(self.ack(&Frame::SyncDone { generation }), AckStatus::Ok);
    }

    /// True if the replica closed the connection within the read timeout.
    fn is_closed(&mut self) -> bool {
        use std::io::Read;
        let mut b = [0u8; 256];
        loop {
            match self.stream.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }

    fn send(&mut self, f: &Frame<'_>) -> u64 {
        self.seq += 1;
        let mut b = Vec::new();
        frame::encode(self.seq, f, &mut b);
        self.writer.write_all(&b).unwrap();
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
    p.sync(5);
    assert_eq!(p.write(0, 4096), AckStatus::Ok);
    // A write the replica cannot store: answered, recorded (outdated), and the session ends,
    // so nothing after it (a SyncDone) can make the image up to date without it.
    for off in [2 * MIB, MIB - 512, 3 * MIB] {
        assert_eq!(p.write(off, 4096), AckStatus::NoSpace);
        assert!(p.is_closed(), "the session went on after a lost write");
        assert!(s.child.try_wait().unwrap().is_none(), "the node died");
        // The primary closes its side (the node lingers until it does, then frees the slot).
        p.stream.shutdown(std::net::Shutdown::Both).unwrap();
        let t = Instant::now();
        while status_json(&d.path("ctl"))["peer_state"] == "connected" {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "the session never ended"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        p = Primary::attach(s.addr, 4 * MIB);
        assert_eq!(
            p.info.as_ref().map(|n| n.disk_state),
            Some(DiskState::Outdated),
            "the replica lost a write but does not say so"
        );
    }
    assert_eq!(p.ack(&Frame::Flush), AckStatus::Ok);
    assert_eq!(p.write(4096, 4096), AckStatus::Ok);

    let v = status_json(&d.path("ctl"));
    assert_eq!(v["errors"], 3);
    assert_eq!(v["writes"], 5);
    assert_eq!(v["peer_state"], "connected");
    assert_eq!(v["disk_state"], "outdated");
    let o = run(&["status", "--control", &d.s("ctl")]);
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("secondary") && table.contains("connected"),
        "{table}"
    );
    // A promotion now needs --force.
    let o = run(&["promote", "--control", &d.s("ctl")]);
    assert!(
        !o.status.success() && stderr(&o).contains("outdated"),
        "{}",
        stderr(&o)
    );

    // Logged once per connection, not per write.
    let log = s.drain().to_vec();
    let n = log.iter().filter(|l| l.contains("NoSpace")).count();
    assert_eq!(n, 3, "{log:#?}");

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

/// Whether the image could be locked now (no process holds it).
fn unlocked(image: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(image).unwrap();
    // SAFETY: flock on a descriptor we own; the lock goes with it when `f` is dropped.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A replica image of 1 MiB with metadata, plus a stale bitmap with every bit set and an
/// activity log with hot extents (as if it had been a primary once).
fn replica_image(d: &Dir, disk_state: DiskState, generation: u64) {
    let img = d.path("r.img");
    std::fs::File::create(&img).unwrap().set_len(MIB).unwrap();
    let m = Meta {
        format: META_FORMAT,
        node_id: 7,
        size: MIB,
        role: Role::Secondary,
        disk_state,
        generation,
        bitmap_generation: 0,
        history: vec![],
    };
    meta::save(&img, &m).unwrap();
    let (f, mut b) = BitmapFile::open_or_create(&img, MIB).unwrap();
    b.set_all();
    f.persist_all(&b).unwrap();
    let (mut al, _) = mirror_proto::activity_log::AlFile::open(&img).unwrap();
    al.commit(&[0]).unwrap();
}

fn check_promoted(img: &Path, previous: u64) -> Meta {
    let m = meta::load(img).unwrap().unwrap();
    assert_eq!((m.role, m.disk_state), (Role::Primary, DiskState::UpToDate));
    assert_ne!(m.generation, previous);
    assert_eq!(m.bitmap_generation, previous);
    assert_eq!(m.history, vec![previous]);
    let (_, b) = BitmapFile::open_or_create(img, MIB).unwrap();
    assert!(b.is_clear(), "the bitmap is not clear");
    assert!(mirror_proto::activity_log::read(img).unwrap().is_empty());
    m
}

#[test]
fn promote_image_directly_then_again() {
    let d = Dir::new();
    replica_image(&d, DiskState::UpToDate, 5);
    let o = run(&["promote", "--image", &d.s("r.img")]);
    assert!(o.status.success(), "{}", stderr(&o));
    let m = check_promoted(&d.path("r.img"), 5);
    let out = stdout(&o);
    assert!(
        out.contains("promoted") && out.contains(&format!("{:016x}", m.generation)),
        "{out}"
    );

    let before = std::fs::read(meta::meta_path(&d.path("r.img"))).unwrap();
    let o = run(&["promote", "--image", &d.s("r.img")]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("already primary"), "{}", stdout(&o));
    assert_eq!(
        std::fs::read(meta::meta_path(&d.path("r.img"))).unwrap(),
        before
    );

    let o = run(&["promote", "--image", &d.s("missing.img")]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("missing.img"), "{}", stderr(&o));
}

#[test]
fn promote_refuses_an_inconsistent_replica_unless_forced() {
    let d = Dir::new();
    replica_image(&d, DiskState::Inconsistent, 5);
    let before = std::fs::read(meta::meta_path(&d.path("r.img"))).unwrap();
    let o = run(&["promote", "--image", &d.s("r.img")]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("inconsistent") && e.contains("--force"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    assert_eq!(
        std::fs::read(meta::meta_path(&d.path("r.img"))).unwrap(),
        before
    );

    let o = run(&["promote", "--image", &d.s("r.img"), "--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("forced"), "{}", stdout(&o));
    let m = meta::load(&d.path("r.img")).unwrap().unwrap();
    assert_eq!((m.role, m.disk_state), (Role::Primary, DiskState::UpToDate));
    assert_eq!(m.bitmap_generation, 0);
}

#[test]
fn promote_through_the_running_node_fences_the_primary_and_releases_the_image() {
    let d = Dir::new();
    let mut s = Serve::start(&d, None);
    // A plain image held by a running node cannot be promoted behind its back.
    let o = run(&["promote", "--image", &d.s("r.img")]);
    assert!(!o.status.success());
    let mut p = Primary::attach(s.addr, MIB);
    let o = run(&["promote", "--image", &d.s("r.img")]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("in use by a running access node") && e.contains("--control"),
        "{e}"
    );
    // Not up to date yet (the initial sync did not finish).
    let o = run(&["promote", "--control", &d.s("ctl")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("inconsistent"), "{}", stderr(&o));
    assert_eq!(p.write(0, 4096), AckStatus::Ok);
    p.sync(9);

    let o = run(&["promote", "--control", &d.s("ctl")]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Safe to boot as soon as the command returned.
    assert!(unlocked(&d.path("r.img")));
    assert!(stdout(&o).contains("promoted"), "{}", stdout(&o));
    let m = meta::load(&d.path("r.img")).unwrap().unwrap();
    assert_eq!((m.role, m.bitmap_generation), (Role::Primary, 9));
    assert!(p.is_closed());
    let deadline = Instant::now() + Duration::from_secs(10);
    let st = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "serve did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(st.code(), Some(0), "{:#?}", s.drain());
    assert!(!d.path("ctl").exists());
    assert!(
        TcpStream::connect(s.addr).is_err(),
        "a primary can still connect"
    );
    let log = s.drain().join("\n");
    assert!(log.contains("promoted: generation"), "{log}");
    assert!(log.contains("old primary fenced"), "{log}");
    // The image is a primary's now.
    let o = run(&["promote", "--image", &d.s("r.img")]);
    assert!(stdout(&o).contains("already primary"), "{}", stdout(&o));
}

#[test]
fn discard_my_data_is_announced_and_warned_about() {
    let d = Dir::new();
    let s = Serve::start_args(&d, None, &["--discard-my-data"]);
    // Logged before "listening on".
    assert!(
        s.log
            .iter()
            .any(|l| l.contains("WARN") && l.contains("--discard-my-data")),
        "{:#?}",
        s.log
    );
    let p = Primary::attach(s.addr, MIB);
    let info = p.info.as_ref().unwrap();
    assert_eq!(
        info.flags & NODE_FLAG_DISCARD_MY_DATA,
        NODE_FLAG_DISCARD_MY_DATA
    );
}

#[test]
fn on_primary_loss_runs_the_command_when_the_primary_goes_silent() {
    let d = Dir::new();
    let o = run(&[
        "serve",
        "--image",
        &d.s("r.img"),
        "--listen",
        "127.0.0.1:0",
        "--secret-file",
        &d.s("secret"),
        "--primary-timeout",
        "1",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--on-primary-loss"), "{}", stderr(&o));

    let fired = d.path("fired");
    let cmd = format!("touch '{}'", fired.display());
    let mut s = Serve::start_args(
        &d,
        None,
        &["--on-primary-loss", &cmd, "--primary-timeout", "1"],
    );
    let mut p = Primary::attach(s.addr, MIB);
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(p.ack(&Frame::Flush), AckStatus::Ok);
    }
    assert!(!fired.exists(), "ran while the primary was talking");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !fired.exists() {
        assert!(Instant::now() < deadline, "the command did not run");
        std::thread::sleep(Duration::from_millis(50));
    }
    s.wait_line("primary silent for 1 s");
    s.wait_line("exited 0");
}
