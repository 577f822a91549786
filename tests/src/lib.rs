//! Shared harness for the cross-binary integration tests of `vhost-mirror`.
//!
//! * [`bin_path`]: workspace binaries next to the test executable (`target/<profile>/`).
//! * [`ChildGuard`]: a child process that is SIGKILLed on drop (also when a test panics), and
//!   that dies with the spawning thread (`PR_SET_PDEATHSIG`) if the test process aborts.
//! * [`Backend`]: a running `vhost-mirror serve` (or, for debugging, `qemu-storage-daemon`, see
//!   [`BackendKind::from_env`]) on a unique socket in the test's temp dir.
//! * [`Client`] / [`ClientQueue`]: a vhost-user-blk client built on libblkio's Rust crate.
//! * [`raw::RawClient`]: a minimal client on `virtio-driver` that bypasses libblkio's own checks
//!   (e.g. it can send writes to a read-only device) and shows the negotiated feature bits.
//! * [`AccessNode`]: a running `access-node serve` (the replica) on a loopback port, with
//!   [`wait_in_sync`], [`secret_file`], [`compare_files`] for the replication tests.
//! * Data patterns: [`fill_pattern`] / [`check_pattern`] produce offset-dependent data, so a
//!   misplaced, torn or lost write shows up as a mismatch at a precise device offset.
//! * [`libvirt`]: a `qemu:///system` daemon for the libvirt tests, the example domain XML, domains.
//! * Other local users: [`on_thread_as`] runs code (e.g. a [`Client`]) with another uid, gid
//!   and groups; [`run_as`] runs one of our programs as another user (`setpriv`).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::mem::MaybeUninit;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub use blkio;
pub use serde_json;
pub use tempfile;

/// virtio-blk sector size: offsets and lengths of requests are in units of this.
pub const SECTOR: u64 = 512;
/// Default bound for anything that waits on another process (socket creation, exit, I/O).
pub const TIMEOUT: Duration = Duration::from_secs(10);

// ------------------------------------------------------------------------------------------------
// Binaries and processes
// ------------------------------------------------------------------------------------------------

/// The directory holding the workspace binaries: the parent of the directory of the running test
/// executable (`target/debug/deps/..` = `target/debug`), so `CARGO_TARGET_DIR` and the profile are
/// respected automatically.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe
        .parent()
        .expect("test executable has a parent directory");
    if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().expect("deps/ has a parent").to_path_buf()
    } else {
        deps.to_path_buf()
    }
}

/// Path of the workspace binary `name`; panics if it has not been built.
pub fn bin_path(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "binary {} not found: run `cargo build --workspace` first",
        p.display()
    );
    p
}

/// A child process that is killed (SIGKILL) and reaped when dropped, unless it already exited.
pub struct ChildGuard {
    child: Child,
    name: String,
    status: Option<ExitStatus>,
}

impl ChildGuard {
    /// Spawns `cmd`. The child gets `PR_SET_PDEATHSIG(SIGKILL)`, so it also dies if the *spawning
    /// thread* exits (a test that aborts, a watchdog): spawn from the thread that owns the guard.
    pub fn spawn(name: &str, cmd: &mut Command) -> ChildGuard {
        // SAFETY: the pre_exec closure only calls prctl(2), which is async-signal-safe, and does
        // not allocate or touch any state of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name} ({cmd:?}): {e}"));
        ChildGuard::new(name, child)
    }

    /// Wraps an already spawned child.
    pub fn new(name: &str, child: Child) -> ChildGuard {
        ChildGuard {
            child,
            name: name.to_string(),
            status: None,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The exit status if the child has exited (reaps it), `None` while it runs.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .unwrap_or_else(|e| panic!("waitpid({}): {e}", self.name));
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    /// Waits up to `timeout` for the child to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends `sig` to the child by PID (only while it has not been reaped).
    pub fn signal(&mut self, sig: libc::c_int) {
        if self.is_running() {
            let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
            // SAFETY: kill(2) has no memory-safety preconditions; the PID is our own unreaped
            // child, so it cannot have been reused by another process.
            let r = unsafe { libc::kill(pid, sig) };
            assert_eq!(
                r,
                0,
                "kill({pid}, {sig}): {}",
                std::io::Error::last_os_error()
            );
        }
    }

    /// SIGTERM, then wait up to `timeout`. Panics (after SIGKILL) if it did not exit in time.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        self.signal(libc::SIGTERM);
        match self.wait_timeout(timeout) {
            Some(s) => s,
            None => {
                self.kill();
                panic!("{} did not exit within {timeout:?} of SIGTERM", self.name);
            }
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> ExitStatus {
        self.signal(libc::SIGKILL);
        if self.status.is_none() {
            self.status = Some(
                self.child
                    .wait()
                    .unwrap_or_else(|e| panic!("wait({}): {e}", self.name)),
            );
        }
        self.status.expect("status set above")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.status.is_none() {
            let pid = self.child.id();
            if let Ok(None) = self.child.try_wait() {
                if let Ok(pid) = libc::pid_t::try_from(pid) {
                    // SAFETY: kill(2) on our own unreaped child; no memory-safety preconditions.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            let _ = self.child.wait();
        }
    }
}

/// Runs `cmd` to completion with captured stdout/stderr; panics (after killing it) if it runs
/// longer than `timeout`.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let desc = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut guard = ChildGuard::spawn(&desc, cmd);
    let mut out = guard.child_mut().stdout.take().expect("stdout piped");
    let mut err = guard.child_mut().stderr.take().expect("stderr piped");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let Some(status) = guard.wait_timeout(timeout) else {
        guard.kill();
        panic!("{desc} still running after {timeout:?}");
    };
    Output {
        status,
        stdout: t_out.join().expect("stdout reader"),
        stderr: t_err.join().expect("stderr reader"),
    }
}

/// Aborts the whole test process (killing all children through PDEATHSIG) if not dropped within
/// `timeout`: a guard against a hung backend blocking a test forever (e.g. in a vhost-user
/// handshake, which has no timeout of its own).
pub struct Watchdog {
    done: Option<mpsc::Sender<()>>,
}

impl Watchdog {
    pub fn new(what: &str, timeout: Duration) -> Watchdog {
        let (tx, rx) = mpsc::channel::<()>();
        let what = what.to_string();
        std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(timeout) {
                eprintln!(
                    "WATCHDOG: {what} still running after {timeout:?}; aborting the test process"
                );
                std::process::abort();
            }
        });
        Watchdog { done: Some(tx) }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(tx) = self.done.take() {
            let _ = tx.send(());
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Small helpers
// ------------------------------------------------------------------------------------------------

/// Polls `cond` every few ms until it holds (true) or `timeout` passes (false).
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until `path` exists.
pub fn wait_for_path(path: &Path, timeout: Duration) -> bool {
    wait_until(timeout, || path.exists())
}

/// A currently free TCP port on 127.0.0.1 (racy by nature: bind it soon).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// A fresh temporary directory for one test (removed when dropped).
pub fn test_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("vmt-{name}-"))
        .tempdir()
        .expect("create temp dir")
}

/// Creates (or truncates) a sparse file of `size` bytes.
pub fn create_image(path: &Path, size: u64) {
    let f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.set_len(size).expect("set_len");
}

/// Identity of the file at `path` (device, inode, ctime), if it exists: changes when the file
/// is replaced by a new one.
pub fn file_id(path: &Path) -> Option<(u64, u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino(), m.ctime(), m.ctime_nsec()))
}

/// Unique number for socket names etc. within this test process.
pub fn unique_id() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

// ------------------------------------------------------------------------------------------------
// Data patterns
// ------------------------------------------------------------------------------------------------

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The pattern word at device byte offset `off` (multiple of 8) for `seed`. Never all-zero
/// blocks in practice, and different for every offset and seed.
pub fn pattern_word(seed: u64, off: u64) -> u64 {
    splitmix64(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ off)
}

/// Fills `buf` with the pattern for device offset `dev_off` (both multiples of 8).
pub fn fill_pattern(buf: &mut [u8], dev_off: u64, seed: u64) {
    assert!(
        dev_off & 7 == 0 && buf.len() & 7 == 0,
        "pattern needs 8-byte alignment"
    );
    for (i, chunk) in buf.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&pattern_word(seed, dev_off + 8 * i as u64).to_le_bytes());
    }
}

/// The pattern for `len` bytes at `dev_off`.
pub fn pattern(dev_off: u64, len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill_pattern(&mut v, dev_off, seed);
    v
}

/// Checks that `buf` holds the pattern for device offset `dev_off`; the error names the first
/// mismatching device offset and what was found there.
pub fn check_pattern(buf: &[u8], dev_off: u64, seed: u64) -> Result<(), String> {
    assert!(
        dev_off & 7 == 0 && buf.len() & 7 == 0,
        "pattern needs 8-byte alignment"
    );
    for (i, chunk) in buf.chunks_exact(8).enumerate() {
        let off = dev_off + 8 * i as u64;
        let want = pattern_word(seed, off);
        let got = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        if got != want {
            let block = (off / 4096) * 4096;
            let s = usize::try_from(block.saturating_sub(dev_off)).expect("usize");
            let e = (s + 4096).min(buf.len());
            let what = if buf[s..e].iter().all(|&b| b == 0) {
                "the 4 KiB block there is all zeros"
            } else {
                "the 4 KiB block there holds other data"
            };
            return Err(format!(
                "pattern(seed {seed:#x}) mismatch at device offset {off:#x} (sector {}): \
                 want {want:#018x}, got {got:#018x}; {what}",
                off / SECTOR
            ));
        }
    }
    Ok(())
}

/// Checks that `buf` is all zeros; the error names the first non-zero device offset.
pub fn check_zeros(buf: &[u8], dev_off: u64) -> Result<(), String> {
    match buf.iter().position(|&b| b != 0) {
        None => Ok(()),
        Some(i) => Err(format!(
            "expected zeros, got {:#04x} at device offset {:#x}",
            buf[i],
            dev_off + i as u64
        )),
    }
}

/// Which of `seeds` the 4 KiB-aligned block `buf` (at `dev_off`) entirely matches, if any.
pub fn classify_block(buf: &[u8], dev_off: u64, seeds: &[u64]) -> Option<u64> {
    seeds
        .iter()
        .copied()
        .find(|&s| check_pattern(buf, dev_off, s).is_ok())
}

/// Writes the pattern for `seed` over the whole file at `path` (bypassing any backend).
pub fn write_file_pattern(path: &Path, seed: u64) {
    let mut f = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let size = f.metadata().expect("metadata").len();
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(1 << 20);
        f.write_all(&pattern(off, usize::try_from(n).expect("usize"), seed))
            .expect("write image");
        off += n;
    }
    f.sync_all().expect("fsync image");
}

/// Reads `len` bytes at `off` from the file at `path`.
pub fn read_file_range(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.seek(SeekFrom::Start(off)).expect("seek");
    let mut v = vec![0u8; len];
    f.read_exact(&mut v).expect("read image");
    v
}

/// Checks the pattern for `seed` over the whole file at `path`.
pub fn check_file_pattern(path: &Path, seed: u64) -> Result<(), String> {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let size = f.metadata().expect("metadata").len();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < size {
        let n = usize::try_from((size - off).min(1 << 20)).expect("usize");
        f.read_exact(&mut buf[..n]).expect("read image");
        check_pattern(&buf[..n], off, seed)?;
        off += n as u64;
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Backend processes
// ------------------------------------------------------------------------------------------------

/// Which program serves the vhost-user-blk socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// `vhost-mirror serve` (the default).
    VhostMirror,
    /// `qemu-storage-daemon` with a vhost-user-blk export: a reference peer for debugging tests.
    Qsd,
}

impl BackendKind {
    /// `VHOST_MIRROR_TEST_BACKEND=qsd` selects qemu-storage-daemon; anything else (or unset)
    /// selects vhost-mirror.
    pub fn from_env() -> BackendKind {
        match std::env::var("VHOST_MIRROR_TEST_BACKEND").as_deref() {
            Ok("qsd") | Ok("qemu-storage-daemon") => BackendKind::Qsd,
            _ => BackendKind::VhostMirror,
        }
    }
}

/// Options for [`Backend::spawn`]. `None` means "don't pass the flag" (backend default).
#[derive(Clone, Debug, Default)]
pub struct BackendOpts {
    pub num_queues: Option<u16>,
    pub queue_size: Option<u16>,
    pub readonly: bool,
    /// Extra arguments appended to the command line (vhost-mirror only).
    pub extra_args: Vec<String>,
    /// Use this socket path instead of a fresh unique one in the test dir.
    pub socket: Option<PathBuf>,
    /// Use this control socket path instead of a fresh unique one (vhost-mirror only).
    pub control: Option<PathBuf>,
    /// Overrides [`BackendKind::from_env`].
    pub kind: Option<BackendKind>,
    /// Extra environment variables (vhost-mirror only; e.g. `LD_PRELOAD` for fault injection).
    pub env: Vec<(String, String)>,
    /// Run inside this network namespace (`ip netns exec NS`, which execs: the PID stays the
    /// program's own).
    pub netns: Option<String>,
    /// Start the program under this umask (e.g. 0 to check that the sockets are still 0600).
    pub umask: Option<libc::mode_t>,
}

/// Makes `cmd`'s child start under `umask`.
fn set_umask(cmd: &mut Command, umask: Option<libc::mode_t>) {
    if let Some(mask) = umask {
        // SAFETY: the closure only calls umask(2), which is async-signal-safe and cannot fail;
        // it runs in the child between fork and exec and touches nothing else.
        unsafe {
            cmd.pre_exec(move || {
                libc::umask(mask);
                Ok(())
            });
        }
    }
}

/// `program`, or `ip netns exec NS program` when a namespace is given.
pub fn command_in_netns(netns: Option<&str>, program: &Path) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// Per-request-type counters from `vhost-mirror status --json`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub errors: u64,
}

impl Counters {
    pub fn from_json(v: &serde_json::Value) -> Counters {
        let get = |k: &str| {
            v.get(k)
                .and_then(serde_json::Value::as_u64)
                .unwrap_or_else(|| panic!("status JSON lacks numeric {k:?}: {v}"))
        };
        Counters {
            reads: get("reads"),
            writes: get("writes"),
            flushes: get("flushes"),
            discards: get("discards"),
            write_zeroes: get("write_zeroes"),
            bytes_read: get("bytes_read"),
            bytes_written: get("bytes_written"),
            errors: get("errors"),
        }
    }
}

/// A running backend serving `image` on `socket`; killed when dropped. On a panicking test the
/// tail of its log is printed.
pub struct Backend {
    child: ChildGuard,
    kind: BackendKind,
    image: PathBuf,
    socket: PathBuf,
    control: Option<PathBuf>,
    log: PathBuf,
}

impl Backend {
    /// Starts a backend for `image` with socket, control socket and log file in `dir`, and waits
    /// for the socket(s) to appear. Panics (with the log) if it exits or times out first.
    pub fn spawn(dir: &Path, image: &Path, opts: &BackendOpts) -> Backend {
        let kind = opts.kind.unwrap_or_else(BackendKind::from_env);
        let id = unique_id();
        let socket = opts
            .socket
            .clone()
            .unwrap_or_else(|| dir.join(format!("vhost-{id}.sock")));
        let log = dir.join(format!("backend-{id}.log"));
        let logf = File::create(&log).expect("create backend log");
        let (mut cmd, control, name) = match kind {
            BackendKind::VhostMirror => {
                let control = opts
                    .control
                    .clone()
                    .unwrap_or_else(|| dir.join(format!("control-{id}.sock")));
                let mut cmd = command_in_netns(opts.netns.as_deref(), &bin_path("vhost-mirror"));
                cmd.arg("serve")
                    .arg("--image")
                    .arg(image)
                    .arg("--socket")
                    .arg(&socket)
                    .arg("--control")
                    .arg(&control);
                if let Some(n) = opts.num_queues {
                    cmd.arg("--num-queues").arg(n.to_string());
                }
                if let Some(n) = opts.queue_size {
                    cmd.arg("--queue-size").arg(n.to_string());
                }
                if opts.readonly {
                    cmd.arg("--readonly");
                }
                cmd.args(&opts.extra_args);
                cmd.envs(opts.env.iter().cloned());
                if std::env::var_os("RUST_LOG").is_none() {
                    cmd.env("RUST_LOG", "info");
                }
                (cmd, Some(control), "vhost-mirror")
            }
            BackendKind::Qsd => {
                let ro = if opts.readonly { "on" } else { "off" };
                let mut cmd = Command::new("qemu-storage-daemon");
                cmd.arg("--blockdev")
                    .arg(format!(
                        "driver=file,node-name=file0,filename={},read-only={ro},discard=unmap",
                        image.display()
                    ))
                    .arg("--blockdev")
                    .arg(format!(
                        "driver=raw,node-name=raw0,file=file0,read-only={ro},discard=unmap"
                    ))
                    .arg("--export")
                    .arg(format!(
                        "type=vhost-user-blk,id=exp0,node-name=raw0,addr.type=unix,\
                         addr.path={},writable={},num-queues={}",
                        socket.display(),
                        if opts.readonly { "off" } else { "on" },
                        opts.num_queues.unwrap_or(1)
                    ));
                (cmd, None, "qemu-storage-daemon")
            }
        };
        set_umask(&mut cmd, opts.umask);
        cmd.stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup log fd"))
            .stderr(logf);
        // A path that already exists (a stale socket being reused) counts as created once it is
        // a different file.
        let mut paths = vec![socket.clone()];
        paths.extend(control.clone());
        let old_ids: Vec<_> = paths.iter().map(|p| file_id(p)).collect();
        let mut b = Backend {
            child: ChildGuard::spawn(name, &mut cmd),
            kind,
            image: image.to_path_buf(),
            socket,
            control,
            log,
        };
        for (p, old) in paths.iter().zip(old_ids) {
            let ok = wait_until(TIMEOUT, || {
                let id = file_id(p);
                (id.is_some() && id != old) || !b.child.is_running()
            });
            if let Some(st) = b.child.try_wait() {
                panic!(
                    "{name} exited ({st}) before creating {}; log:\n{}",
                    p.display(),
                    b.log()
                );
            }
            assert!(
                ok,
                "{name} did not create {} within {TIMEOUT:?}",
                p.display()
            );
        }
        b
    }

    pub fn kind(&self) -> BackendKind {
        self.kind
    }
    pub fn image(&self) -> &Path {
        &self.image
    }
    pub fn socket(&self) -> &Path {
        &self.socket
    }
    /// The control socket (vhost-mirror only).
    pub fn control(&self) -> Option<&Path> {
        self.control.as_deref()
    }
    pub fn log_path(&self) -> &Path {
        &self.log
    }
    /// Everything the backend wrote to stdout/stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }
    pub fn child(&mut self) -> &mut ChildGuard {
        &mut self.child
    }
    pub fn is_running(&mut self) -> bool {
        self.child.is_running()
    }
    /// Panics with the log if the backend has exited.
    pub fn assert_running(&mut self) {
        if let Some(st) = self.child.try_wait() {
            panic!("backend exited unexpectedly ({st}); log:\n{}", self.log());
        }
    }
    /// SIGTERM and wait (see [`ChildGuard::terminate`]).
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        self.child.terminate(timeout)
    }

    /// `vhost-mirror SUBCOMMAND --control CTL [extra args]` against this backend, whatever
    /// its exit status.
    pub fn control_cmd(&self, subcommand: &str, extra: &[&str], timeout: Duration) -> Output {
        let ctl = self.control.as_ref().unwrap_or_else(|| {
            panic!("{subcommand} needs vhost-mirror (no control socket with qemu-storage-daemon)")
        });
        run_with_timeout(
            Command::new(bin_path("vhost-mirror"))
                .arg(subcommand)
                .arg("--control")
                .arg(ctl)
                .args(extra),
            timeout,
        )
    }

    /// `vhost-mirror status --control CTL [extra args]`; panics unless it exits 0.
    pub fn status_cmd(&self, extra: &[&str]) -> String {
        let out = self.control_cmd("status", extra, TIMEOUT);
        assert!(
            out.status.success(),
            "vhost-mirror status {extra:?} failed ({}): stderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("status output is UTF-8")
    }

    /// `vhost-mirror status --control CTL --json`, parsed.
    pub fn status_json(&self) -> serde_json::Value {
        let s = self.status_cmd(&["--json"]);
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("status --json: {e}; output:\n{s}"))
    }

    /// The request counters, or `None` for a backend without a control socket (qsd).
    pub fn counters(&self) -> Option<Counters> {
        self.control
            .as_ref()
            .map(|_| Counters::from_json(&self.status_json()))
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "---- backend log {} (last {} lines) ----",
                self.log.display(),
                tail.len()
            );
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
            eprintln!("---- end of backend log ----");
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Replication: access-node, secrets, sync state, file comparison
// ------------------------------------------------------------------------------------------------

/// Size of one out-of-sync bitmap region (resync copies whole regions).
pub const REGION: u64 = 64 * 1024;

/// Writes a secret file (mode 0600) holding `content` and returns its path.
pub fn secret_file(dir: &Path, content: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(format!("secret-{}", unique_id()));
    std::fs::write(&p, content).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
    p
}

impl BackendOpts {
    /// Options for a replicating vhost-mirror: `--peer 127.0.0.1:PORT --secret-file F`.
    pub fn mirrored(port: u16, secret: &Path) -> BackendOpts {
        BackendOpts {
            extra_args: vec![
                "--peer".into(),
                format!("127.0.0.1:{port}"),
                "--secret-file".into(),
                secret.display().to_string(),
            ],
            ..BackendOpts::default()
        }
    }
}

/// Options for [`AccessNode::spawn`].
#[derive(Clone, Debug, Default)]
pub struct AccessNodeOpts {
    /// `--cache-mb N` (None: the node's default).
    pub cache_mb: Option<u64>,
    /// Run the node with `RLIMIT_FSIZE` set to this many bytes (a "full disk": writes beyond
    /// this file offset fail with EFBIG).
    pub fsize_limit: Option<u64>,
    /// Use this control socket path instead of a fresh unique one in the test dir.
    pub control: Option<PathBuf>,
    /// Extra arguments appended to the command line.
    pub extra_args: Vec<String>,
    /// Extra environment variables (e.g. `RUST_LOG`, `LD_PRELOAD` for fault injection).
    pub env: Vec<(String, String)>,
    /// Run inside this network namespace.
    pub netns: Option<String>,
    /// Listen on this address instead of 127.0.0.1 (the port stays `port`).
    pub listen_host: Option<String>,
    /// Start the node under this umask.
    pub umask: Option<libc::mode_t>,
}

/// A running `access-node serve` on 127.0.0.1:`port`, with a control socket and a log file in
/// the test dir; killed when dropped (the tail of its log is printed if the test panics).
pub struct AccessNode {
    child: ChildGuard,
    image: PathBuf,
    port: u16,
    control: PathBuf,
    log: PathBuf,
}

impl AccessNode {
    /// Starts the node and waits until it listens (its log says "listening on", and the
    /// control socket exists). Panics with the log if it exits or times out first.
    pub fn spawn(
        dir: &Path,
        image: &Path,
        port: u16,
        secret: &Path,
        opts: &AccessNodeOpts,
    ) -> AccessNode {
        let id = unique_id();
        let control = opts
            .control
            .clone()
            .unwrap_or_else(|| dir.join(format!("an-control-{id}.sock")));
        let log = dir.join(format!("access-node-{id}.log"));
        let logf = File::create(&log).expect("create access-node log");
        let mut cmd = command_in_netns(opts.netns.as_deref(), &bin_path("access-node"));
        let host = opts.listen_host.as_deref().unwrap_or("127.0.0.1");
        cmd.arg("serve")
            .arg("--image")
            .arg(image)
            .arg("--listen")
            .arg(format!("{host}:{port}"))
            .arg("--secret-file")
            .arg(secret)
            .arg("--control")
            .arg(&control);
        if let Some(n) = opts.cache_mb {
            cmd.arg("--cache-mb").arg(n.to_string());
        }
        cmd.args(&opts.extra_args);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        cmd.envs(opts.env.iter().map(|(k, v)| (k, v)));
        if let Some(limit) = opts.fsize_limit {
            // SAFETY: the closure only calls setrlimit(2), which is async-signal-safe, on a
            // stack value; it runs in the child between fork and exec and touches nothing else.
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
        set_umask(&mut cmd, opts.umask);
        cmd.stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup log fd"))
            .stderr(logf);
        let old_ctl = file_id(&control);
        let mut n = AccessNode {
            child: ChildGuard::spawn("access-node", &mut cmd),
            image: image.to_path_buf(),
            port,
            control,
            log,
        };
        let ok = wait_until(TIMEOUT, || {
            let ctl = file_id(&n.control);
            (n.log().contains("listening on") && ctl.is_some() && ctl != old_ctl)
                || !n.child.is_running()
        });
        if let Some(st) = n.child.try_wait() {
            panic!(
                "access-node exited ({st}) before listening on port {port}; log:\n{}",
                n.log()
            );
        }
        assert!(
            ok,
            "access-node not listening on port {port} within {TIMEOUT:?}; log:\n{}",
            n.log()
        );
        n
    }

    pub fn image(&self) -> &Path {
        &self.image
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    /// "127.0.0.1:PORT".
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
    pub fn control(&self) -> &Path {
        &self.control
    }
    pub fn log_path(&self) -> &Path {
        &self.log
    }
    /// Everything the node wrote to stdout/stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }
    pub fn child(&mut self) -> &mut ChildGuard {
        &mut self.child
    }
    pub fn is_running(&mut self) -> bool {
        self.child.is_running()
    }
    /// Panics with the log if the node has exited.
    pub fn assert_running(&mut self) {
        if let Some(st) = self.child.try_wait() {
            panic!(
                "access-node exited unexpectedly ({st}); log:\n{}",
                self.log()
            );
        }
    }
    /// SIGTERM and wait (see [`ChildGuard::terminate`]).
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        self.child.terminate(timeout)
    }
    /// SIGKILL and reap.
    pub fn kill(&mut self) -> ExitStatus {
        self.child.kill()
    }

    /// `access-node status --control CTL [extra]`; panics unless it exits 0.
    pub fn status_cmd(&self, extra: &[&str]) -> String {
        let out = run_with_timeout(
            Command::new(bin_path("access-node"))
                .arg("status")
                .arg("--control")
                .arg(&self.control)
                .args(extra),
            TIMEOUT,
        );
        assert!(
            out.status.success(),
            "access-node status {extra:?} failed ({}): stderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("status output is UTF-8")
    }

    /// `access-node status --control CTL --json`, parsed.
    pub fn status_json(&self) -> serde_json::Value {
        let s = self.status_cmd(&["--json"]);
        serde_json::from_str(&s)
            .unwrap_or_else(|e| panic!("access-node status --json: {e}; output:\n{s}"))
    }
}

/// A running `access-node witness` on 127.0.0.1:`port` with its state in `state_dir`, a
/// control socket and a log file; killed when dropped (its log tail printed on a panic).
pub struct Witness {
    child: ChildGuard,
    port: u16,
    control: PathBuf,
    log: PathBuf,
}

impl Witness {
    /// Starts the witness and waits until it listens; panics with its log if it does not.
    pub fn spawn(dir: &Path, state_dir: &Path, port: u16, secret: &Path) -> Witness {
        let w = Witness::start(dir, state_dir, port, secret);
        let mut w = w;
        let ok = wait_until(TIMEOUT, || {
            (w.log().contains("witness listening on") && w.control.exists())
                || !w.child.is_running()
        });
        if let Some(st) = w.child.try_wait() {
            panic!("witness exited ({st}) before listening; log:\n{}", w.log());
        }
        assert!(
            ok,
            "witness not listening within {TIMEOUT:?}; log:\n{}",
            w.log()
        );
        w
    }

    /// Starts the witness without waiting (to see it refuse to start).
    pub fn start(dir: &Path, state_dir: &Path, port: u16, secret: &Path) -> Witness {
        let id = unique_id();
        let control = dir.join(format!("witness-control-{id}.sock"));
        let log = dir.join(format!("witness-{id}.log"));
        let logf = File::create(&log).expect("create witness log");
        let mut cmd = Command::new(bin_path("access-node"));
        cmd.arg("witness")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--secret-file")
            .arg(secret)
            .arg("--state-dir")
            .arg(state_dir)
            .arg("--control")
            .arg(&control);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        cmd.stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup log fd"))
            .stderr(logf);
        Witness {
            child: ChildGuard::spawn("access-node witness", &mut cmd),
            port,
            control,
            log,
        }
    }

    /// "127.0.0.1:PORT".
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    pub fn child(&mut self) -> &mut ChildGuard {
        &mut self.child
    }
    pub fn kill(&mut self) -> ExitStatus {
        self.child.kill()
    }

    /// `access-node status --control CTL --json` of the witness, parsed.
    pub fn status_json(&self) -> serde_json::Value {
        let out = run_with_timeout(
            Command::new(bin_path("access-node"))
                .arg("status")
                .arg("--control")
                .arg(&self.control)
                .arg("--json"),
            TIMEOUT,
        );
        assert!(
            out.status.success(),
            "witness status failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("witness status is JSON")
    }
}

impl Drop for Witness {
    fn drop(&mut self) {
        if std::thread::panicking() {
            print_log_tail("witness", &self.log);
        }
    }
}

impl Drop for AccessNode {
    fn drop(&mut self) {
        if std::thread::panicking() {
            print_log_tail("access-node", &self.log);
        }
    }
}

/// A mirrored pair's files in a test dir of its own: a sparse primary image of `size`, the
/// replica image's path beside it (access-node creates it), a secret and a free port for the
/// access node.
pub struct Pair {
    pub primary: PathBuf,
    pub replica: PathBuf,
    pub secret: PathBuf,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Pair {
    pub fn new(name: &str, size: u64) -> Pair {
        let dir = test_dir(name);
        let primary = dir.path().join("primary.img");
        create_image(&primary, size);
        let secret = secret_file(dir.path(), &format!("the secret of {name}\n"));
        Pair {
            replica: dir.path().join("replica.img"),
            primary,
            secret,
            port: free_port(),
            dir,
        }
    }

    /// access-node serving the replica image.
    pub fn node(&self) -> AccessNode {
        self.node_with(&AccessNodeOpts::default())
    }

    pub fn node_with(&self, o: &AccessNodeOpts) -> AccessNode {
        AccessNode::spawn(self.dir.path(), &self.replica, self.port, &self.secret, o)
    }

    /// access-node serving `image` (a failback: the old primary's image).
    pub fn node_on(&self, image: &Path) -> AccessNode {
        AccessNode::spawn(
            self.dir.path(),
            image,
            self.port,
            &self.secret,
            &AccessNodeOpts::default(),
        )
    }

    /// vhost-mirror serving `image`, mirrored to the access node if `peer`.
    pub fn serve(&self, image: &Path, peer: bool) -> Backend {
        let opts = if peer {
            BackendOpts::mirrored(self.port, &self.secret)
        } else {
            BackendOpts::default()
        };
        Backend::spawn(
            self.dir.path(),
            image,
            &BackendOpts {
                kind: Some(BackendKind::VhostMirror),
                ..opts
            },
        )
    }

    /// vhost-mirror serving the primary image, mirrored.
    pub fn mirror(&self) -> Backend {
        self.serve(&self.primary, true)
    }
}

fn print_log_tail(what: &str, log: &Path) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(40).collect();
    eprintln!(
        "---- {what} log {} (last {} lines) ----",
        log.display(),
        tail.len()
    );
    for l in tail.iter().rev() {
        eprintln!("{l}");
    }
    eprintln!("---- end of {what} log ----");
}

// ------------------------------------------------------------------------------------------------
// Other local users (the socket access tests; they need root)
// ------------------------------------------------------------------------------------------------

/// The unprivileged user (and its group) the access tests connect as: `nobody`.
pub const NOBODY: u32 = 65534;

/// Runs `f` on a new thread whose effective uid, effective gid and supplementary groups are
/// `uid`, `gid` and `groups`, and returns its result (a panic in `f` is passed on). Needs root.
///
/// Linux credentials belong to each thread: the raw setresuid/setresgid/setgroups system calls
/// change only the calling thread's (glibc's wrappers would change every thread of the test
/// process). So the rest of the test keeps running as root, and the thread's credentials end
/// with it. Going from euid 0 to another uid also clears the thread's effective capabilities:
/// file permissions apply to it like to any process of that user, and a unix socket it connects
/// records exactly these credentials for SO_PEERCRED / SO_PEERGROUPS.
pub fn on_thread_as<T: Send + 'static>(
    uid: u32,
    gid: u32,
    groups: &[u32],
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let groups = groups.to_vec();
    let t = std::thread::spawn(move || {
        let keep = libc::c_long::from(-1i32);
        // SAFETY: raw credential system calls with integer arguments and a pointer to a live
        // gid array of the given length; each result is checked.
        unsafe {
            assert_eq!(
                libc::syscall(
                    libc::SYS_setgroups,
                    groups.len() as libc::c_long,
                    groups.as_ptr()
                ),
                0,
                "setgroups: {} (the access tests need root)",
                std::io::Error::last_os_error()
            );
            assert_eq!(
                libc::syscall(libc::SYS_setresgid, keep, libc::c_long::from(gid), keep),
                0,
                "setresgid: {}",
                std::io::Error::last_os_error()
            );
            assert_eq!(
                libc::syscall(libc::SYS_setresuid, keep, libc::c_long::from(uid), keep),
                0,
                "setresuid: {}",
                std::io::Error::last_os_error()
            );
        }
        f()
    });
    t.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// Runs `program args` as uid `uid`, gid `gid` with exactly `groups` (`setpriv`), from a copy of
/// the program in `dir` (the build directory may not be reachable for that user), with
/// captured output. Needs root.
pub fn run_as(
    uid: u32,
    gid: u32,
    groups: &[u32],
    program: &Path,
    args: &[&std::ffi::OsStr],
    dir: &Path,
) -> Output {
    let name = program.file_name().expect("program has a file name");
    let copy = dir.join(name);
    if !copy.exists() && std::fs::hard_link(program, &copy).is_err() {
        std::fs::copy(program, &copy)
            .unwrap_or_else(|e| panic!("copy {} to {}: {e}", program.display(), copy.display()));
    }
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"));
    if groups.is_empty() {
        cmd.arg("--clear-groups");
    } else {
        let list: Vec<String> = groups.iter().map(u32::to_string).collect();
        cmd.arg(format!("--groups={}", list.join(",")));
    }
    cmd.arg("--").arg(&copy).args(args);
    run_with_timeout(&mut cmd, TIMEOUT)
}

/// chmod.
pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// The permission bits (and set-id/sticky bits) of `path` itself (not following a symlink).
pub fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// A string field of a status document ("" if missing or not a string).
pub fn status_str<'a>(v: &'a serde_json::Value, key: &str) -> &'a str {
    v.get(key).and_then(serde_json::Value::as_str).unwrap_or("")
}

/// A numeric field of a status document; panics (with the document) if missing.
pub fn status_u64(v: &serde_json::Value, key: &str) -> u64 {
    v.get(key)
        .and_then(serde_json::Value::as_u64)
        .unwrap_or_else(|| panic!("status lacks numeric {key:?}: {v}"))
}

/// Whether a vhost-mirror status document says the replica is in sync: peer connected, the
/// replica up to date, nothing out of sync, no resync running.
pub fn is_in_sync(v: &serde_json::Value) -> bool {
    status_str(v, "peer_state") == "connected"
        && status_str(v, "peer_disk_state") == "up-to-date"
        && v.get("out_of_sync_bytes")
            .and_then(serde_json::Value::as_u64)
            == Some(0)
        && v.get("resyncing").and_then(serde_json::Value::as_bool) == Some(false)
}

/// Polls `vhost-mirror status --json` until `pred` holds; `Ok(status)` then, `Err(last status)`
/// on timeout. Also fails early if the backend exits.
pub fn wait_status(
    b: &mut Backend,
    timeout: Duration,
    mut pred: impl FnMut(&serde_json::Value) -> bool,
) -> Result<serde_json::Value, serde_json::Value> {
    let deadline = Instant::now() + timeout;
    loop {
        b.assert_running();
        let s = b.status_json();
        if pred(&s) {
            return Ok(s);
        }
        if Instant::now() >= deadline {
            return Err(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `access-node status --json` until `pred` holds (see [`wait_status`]).
pub fn wait_node_status(
    n: &mut AccessNode,
    timeout: Duration,
    mut pred: impl FnMut(&serde_json::Value) -> bool,
) -> Result<serde_json::Value, serde_json::Value> {
    let deadline = Instant::now() + timeout;
    loop {
        n.assert_running();
        let s = n.status_json();
        if pred(&s) {
            return Ok(s);
        }
        if Instant::now() >= deadline {
            return Err(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until vhost-mirror reports the replica in sync ([`is_in_sync`]); returns that status.
/// Panics with the last status document (and the log tail, via [`Backend`]'s drop) on timeout.
pub fn wait_in_sync(b: &mut Backend, timeout: Duration) -> serde_json::Value {
    let start = Instant::now();
    match wait_status(b, timeout, is_in_sync) {
        Ok(s) => {
            eprintln!("in sync after {:?}", start.elapsed());
            s
        }
        Err(s) => panic!(
            "replica not in sync within {timeout:?}; last vhost-mirror status:\n{}",
            serde_json::to_string_pretty(&s).unwrap_or_default()
        ),
    }
}

/// Compares two files byte for byte (in 1 MiB chunks); the error names the sizes or the first
/// differing offset (and how many 64 KiB regions differ).
pub fn compare_files(a: &Path, b: &Path) -> Result<(), String> {
    let mut fa = File::open(a).map_err(|e| format!("open {}: {e}", a.display()))?;
    let mut fb = File::open(b).map_err(|e| format!("open {}: {e}", b.display()))?;
    let la = fa.metadata().map_err(|e| e.to_string())?.len();
    let lb = fb.metadata().map_err(|e| e.to_string())?.len();
    if la != lb {
        return Err(format!(
            "{} has {la} bytes, {} has {lb} bytes",
            a.display(),
            b.display()
        ));
    }
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut off = 0u64;
    let mut first: Option<u64> = None;
    let mut regions = 0u64;
    while off < la {
        let n = usize::try_from((la - off).min(1 << 20)).expect("usize");
        fa.read_exact(&mut ba[..n])
            .map_err(|e| format!("read {}: {e}", a.display()))?;
        fb.read_exact(&mut bb[..n])
            .map_err(|e| format!("read {}: {e}", b.display()))?;
        if ba[..n] != bb[..n] {
            let r = usize::try_from(REGION).expect("usize");
            for (i, (ca, cb)) in ba[..n].chunks(r).zip(bb[..n].chunks(r)).enumerate() {
                if ca != cb {
                    regions += 1;
                    if first.is_none() {
                        let j = ca
                            .iter()
                            .zip(cb)
                            .position(|(x, y)| x != y)
                            .expect("chunks differ");
                        first = Some(off + (i * r + j) as u64);
                    }
                }
            }
        }
        off += n as u64;
    }
    match first {
        None => Ok(()),
        Some(f) => {
            let fu = usize::try_from(f - f % 8).expect("usize");
            let word = |p: &Path| {
                read_file_range(p, fu as u64, 8)
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            };
            Err(format!(
                "{} and {} differ: first at offset {f:#x} (region {}), {regions} region(s) of \
                 64 KiB differ; bytes at {fu:#x}: {} vs {}",
                a.display(),
                b.display(),
                f / REGION,
                word(a),
                word(b)
            ))
        }
    }
}

// ------------------------------------------------------------------------------------------------
// blkio client
// ------------------------------------------------------------------------------------------------

/// Result of one request: `Err(-errno)` on failure. A device status of VIRTIO_BLK_S_IOERR shows
/// as `-EIO`, VIRTIO_BLK_S_UNSUPP as `-ENOTSUP`; libblkio's own checks give other errnos (e.g.
/// `-EBADF` for a write on a client opened read-only).
pub type IoResult = Result<(), i32>;

fn to_result(ret: i32) -> IoResult {
    if ret == 0 {
        Ok(())
    } else {
        Err(ret)
    }
}

/// Human-readable name of an `IoResult` error (`-5` → `EIO`).
pub fn errno_name(ret: i32) -> String {
    match -ret {
        libc::EIO => "EIO".into(),
        libc::ENOTSUP => "ENOTSUP".into(),
        libc::EBADF => "EBADF".into(),
        libc::EINVAL => "EINVAL".into(),
        libc::EPROTO => "EPROTO".into(),
        libc::EROFS => "EROFS".into(),
        e => format!("errno {e}"),
    }
}

/// Options for [`Client::connect_with`].
#[derive(Clone, Debug)]
pub struct ClientOpts {
    pub num_queues: usize,
    pub queue_size: i32,
    /// libblkio's "read-only" property; it must be set to start on a device that offers RO.
    pub read_only: bool,
    /// Size of each queue's I/O buffer (one mapped region holds all of them).
    pub buf_per_queue: usize,
    /// Bound on every wait for completions.
    pub io_timeout: Duration,
    /// Keep retrying the connection this long while the socket refuses/is missing (a backend may
    /// re-create its listener after a disconnect).
    pub connect_timeout: Duration,
}

impl Default for ClientOpts {
    fn default() -> Self {
        ClientOpts {
            num_queues: 1,
            queue_size: 128,
            read_only: false,
            buf_per_queue: 4 << 20,
            io_timeout: TIMEOUT,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// A connected and started libblkio `virtio-blk-vhost-user` instance with one mapped memory
/// region split into per-queue buffers. Dropping it disconnects (in-flight requests are
/// abandoned).
pub struct Client {
    // Field order matters: queues must be dropped before the Blkio instance.
    queues: Vec<ClientQueue>,
    blkio: blkio::Blkio,
    capacity: u64,
}

impl Client {
    /// Connects with default options; panics on failure.
    pub fn connect(socket: &Path) -> Client {
        Client::connect_with(socket, &ClientOpts::default())
    }

    /// Connects; panics on failure.
    pub fn connect_with(socket: &Path, opts: &ClientOpts) -> Client {
        Client::try_connect(socket, opts)
            .unwrap_or_else(|e| panic!("connecting to {}: {e} ({:?})", socket.display(), e.errno()))
    }

    /// Connects (retrying ECONNREFUSED/ENOENT up to `opts.connect_timeout`), starts `num_queues`
    /// queues and maps the I/O buffer region.
    pub fn try_connect(socket: &Path, opts: &ClientOpts) -> blkio::Result<Client> {
        let path = socket.to_str().expect("socket path is UTF-8");
        let deadline = Instant::now() + opts.connect_timeout;
        let mut b = loop {
            let mut b = blkio::Blkio::new("virtio-blk-vhost-user")?;
            b.set_str("path", path)?;
            b.set_bool("read-only", opts.read_only)?;
            match b.connect() {
                Ok(()) => break b,
                Err(e)
                    if (e.errno() == blkio::Errno::CONNREFUSED
                        || e.errno() == blkio::Errno::NOENT)
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        };
        let nq = i32::try_from(opts.num_queues).expect("num_queues fits i32");
        b.set_i32("num-queues", nq)?;
        b.set_i32("queue-size", opts.queue_size)?;
        let capacity = b.get_u64("capacity")?;
        let started = b.start()?;
        let page = 4096;
        let per_q = opts.buf_per_queue.div_ceil(page) * page;
        let region = b.alloc_mem_region(per_q * opts.num_queues.max(1))?;
        b.map_mem_region(&region)?;
        let qsize = usize::try_from(opts.queue_size).expect("queue_size > 0");
        let queues = started
            .queues
            .into_iter()
            .enumerate()
            .map(|(i, q)| ClientQueue {
                q,
                index: i,
                buf: (region.addr + i * per_q) as *mut u8,
                buf_len: per_q,
                in_flight: 0,
                timeout: opts.io_timeout,
                completions: (0..qsize.max(1)).map(|_| MaybeUninit::uninit()).collect(),
            })
            .collect();
        Ok(Client {
            queues,
            blkio: b,
            capacity,
        })
    }

    /// Device size in bytes (libblkio's "capacity").
    pub fn capacity(&self) -> u64 {
        self.capacity
    }
    pub fn blkio(&self) -> &blkio::Blkio {
        &self.blkio
    }
    pub fn blkio_mut(&mut self) -> &mut blkio::Blkio {
        &mut self.blkio
    }
    /// Queue 0.
    pub fn q(&mut self) -> &mut ClientQueue {
        &mut self.queues[0]
    }
    pub fn queue(&mut self, i: usize) -> &mut ClientQueue {
        &mut self.queues[i]
    }
    /// All queues, e.g. to hand one to each thread of a `std::thread::scope`.
    pub fn queues_mut(&mut self) -> &mut [ClientQueue] {
        &mut self.queues
    }

    /// Allocates and maps another memory region while the device runs (vhost-user
    /// ADD_MEM_REG). The memory stays valid until the client is dropped (also after
    /// [`Self::unmap_region`]).
    pub fn map_extra_region(&mut self, len: usize) -> blkio::Result<blkio::MemoryRegion> {
        let r = self.blkio.alloc_mem_region(len.div_ceil(4096) * 4096)?;
        self.blkio.map_mem_region(&r)?;
        Ok(r)
    }

    /// Unmaps a region (vhost-user REM_MEM_REG); the memory itself stays allocated.
    pub fn unmap_region(&mut self, r: &blkio::MemoryRegion) {
        self.blkio.unmap_mem_region(r);
    }
}

/// One request for [`ClientQueue::submit`]. `buf_off` is an offset in the queue's buffer.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    Read {
        off: u64,
        buf_off: usize,
        len: usize,
    },
    Write {
        off: u64,
        buf_off: usize,
        len: usize,
    },
    Flush,
    Discard {
        off: u64,
        len: u64,
    },
    WriteZeroes {
        off: u64,
        len: u64,
        unmap: bool,
    },
}

/// A completed request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Done {
    pub user_data: usize,
    pub ret: i32,
}

impl Done {
    pub fn result(&self) -> IoResult {
        to_result(self.ret)
    }
}

/// One queue of a [`Client`] with its own slice of the mapped buffer region.
pub struct ClientQueue {
    q: blkio::Blkioq,
    index: usize,
    buf: *mut u8,
    buf_len: usize,
    in_flight: usize,
    timeout: Duration,
    completions: Vec<MaybeUninit<blkio::Completion>>,
}

// SAFETY: `buf` points into a memory region owned by the `Blkio` instance that also owns this
// queue (through `Client`); the region is only accessed through `&mut ClientQueue`, and its slice
// belongs to this queue alone, so moving the queue to another thread cannot create aliasing.
unsafe impl Send for ClientQueue {}

impl ClientQueue {
    pub fn index(&self) -> usize {
        self.index
    }

    /// This queue's I/O buffer (in the mapped region).
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: buf..buf+buf_len lies inside a mapped region that lives as long as the Blkio
        // (which outlives this queue), and is only ever handed out through &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.buf, self.buf_len) }
    }

    pub fn buf_len(&self) -> usize {
        self.buf_len
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Queues a request (libblkio only notifies the device in `do_io`, i.e. in [`Self::kick`] or
    /// [`Self::wait`]).
    pub fn submit(&mut self, op: Op, user_data: usize) {
        let f = blkio::ReqFlags::empty();
        match op {
            Op::Read { off, buf_off, len } => {
                assert!(
                    buf_off + len <= self.buf_len,
                    "read beyond the queue buffer"
                );
                // buf_off is in bounds (checked above); the pointer stays inside the region.
                let p = self.buf.wrapping_add(buf_off);
                self.q.read(off, p, len, user_data, f);
            }
            Op::Write { off, buf_off, len } => {
                assert!(
                    buf_off + len <= self.buf_len,
                    "write beyond the queue buffer"
                );
                let p = self.buf.wrapping_add(buf_off);
                self.q.write(off, p, len, user_data, f);
            }
            Op::Flush => self.q.flush(user_data, f),
            Op::Discard { off, len } => self.q.discard(off, len, user_data, f),
            Op::WriteZeroes { off, len, unmap } => {
                let f = if unmap { f } else { blkio::ReqFlags::NO_UNMAP };
                self.q.write_zeroes(off, len, user_data, f)
            }
        }
        self.in_flight += 1;
    }

    fn do_io(&mut self, min: usize) -> Vec<Done> {
        match self.try_do_io(min) {
            Ok(d) => d,
            Err(e) if e.errno() == blkio::Errno::TIME => panic!(
                "queue {}: no completion within {:?} ({} requests in flight): backend hung?",
                self.index, self.timeout, self.in_flight
            ),
            Err(e) => panic!("queue {}: do_io: {e} ({:?})", self.index, e.errno()),
        }
    }

    fn try_do_io(&mut self, min: usize) -> blkio::Result<Vec<Done>> {
        let min = min.min(self.in_flight);
        let mut timeout = self.timeout;
        let n = self
            .q
            .do_io(&mut self.completions, min, Some(&mut timeout), None)?;
        let done: Vec<Done> = self.completions[..n]
            .iter()
            .map(|c| {
                // SAFETY: do_io() initialised the first n completions.
                let c = unsafe { c.assume_init_ref() };
                Done {
                    user_data: c.user_data,
                    ret: c.ret,
                }
            })
            .collect();
        self.in_flight -= n;
        Ok(done)
    }

    /// Notifies the device of queued requests and collects whatever completed, without waiting.
    pub fn kick(&mut self) -> Vec<Done> {
        self.do_io(0)
    }

    /// Waits for at least `min` completions (capped at the number in flight).
    pub fn wait(&mut self, min: usize) -> Vec<Done> {
        self.do_io(min)
    }

    /// Waits for all requests in flight.
    pub fn wait_all(&mut self) -> Vec<Done> {
        let mut all = Vec::new();
        while self.in_flight > 0 {
            all.extend(self.do_io(self.in_flight));
        }
        all
    }

    fn run1(&mut self, op: Op) -> IoResult {
        assert_eq!(
            self.in_flight, 0,
            "synchronous request with requests in flight"
        );
        self.submit(op, 0x5151);
        let d = self.wait_all();
        assert_eq!(d.len(), 1, "one completion expected: {d:?}");
        assert_eq!(
            d[0].user_data, 0x5151,
            "completion for a request never made"
        );
        d[0].result()
    }

    /// One synchronous request to a backend that may die under it: `Err` (no panic) if libblkio
    /// fails or nothing completes within the I/O timeout. After an `Err` the request may still be
    /// in flight: drop the client.
    pub fn try_run(&mut self, op: Op) -> blkio::Result<IoResult> {
        assert_eq!(
            self.in_flight, 0,
            "synchronous request with requests in flight"
        );
        self.submit(op, 0x5151);
        let mut d = Vec::new();
        while self.in_flight > 0 {
            d.extend(self.try_do_io(self.in_flight)?);
        }
        assert_eq!(d.len(), 1, "one completion expected: {d:?}");
        Ok(d[0].result())
    }

    /// Synchronous scatter-gather read/write: `segs` are `(buf_off, len)` pieces of the queue
    /// buffer, in device order (they need not be contiguous or sector-sized; only the total must
    /// be a multiple of 512 for a valid request).
    pub fn rwv(&mut self, write: bool, off: u64, segs: &[(usize, usize)]) -> IoResult {
        assert_eq!(
            self.in_flight, 0,
            "synchronous request with requests in flight"
        );
        let iov: Vec<libc::iovec> = segs
            .iter()
            .map(|&(bo, len)| {
                assert!(bo + len <= self.buf_len, "segment beyond the queue buffer");
                libc::iovec {
                    iov_base: self.buf.wrapping_add(bo).cast(),
                    iov_len: len,
                }
            })
            .collect();
        let n = u32::try_from(iov.len()).expect("iovcnt");
        let f = blkio::ReqFlags::empty();
        // `iov` stays alive until the request completed (wait_all below), which is as long as
        // libblkio may look at it.
        if write {
            self.q.writev(off, iov.as_ptr(), n, 0x5656, f);
        } else {
            self.q.readv(off, iov.as_ptr(), n, 0x5656, f);
        }
        self.in_flight += 1;
        let d = self.wait_all();
        drop(iov);
        assert_eq!(d.len(), 1, "one completion expected: {d:?}");
        d[0].result()
    }

    /// Queues a read into memory outside the queue buffer (e.g. another region mapped with
    /// [`Client::map_extra_region`]).
    ///
    /// # Safety
    /// `ptr..ptr+len` must be valid for writes, inside a mapped region, and not accessed until the
    /// request completed.
    pub unsafe fn submit_read_ptr(&mut self, off: u64, ptr: *mut u8, len: usize, user_data: usize) {
        self.q
            .read(off, ptr, len, user_data, blkio::ReqFlags::empty());
        self.in_flight += 1;
    }

    /// Queues a write from memory outside the queue buffer.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be valid for reads, inside a mapped region, and not modified until the
    /// request completed.
    pub unsafe fn submit_write_ptr(
        &mut self,
        off: u64,
        ptr: *const u8,
        len: usize,
        user_data: usize,
    ) {
        self.q
            .write(off, ptr, len, user_data, blkio::ReqFlags::empty());
        self.in_flight += 1;
    }

    /// Synchronous read of `len` bytes at `off` (through the start of the queue buffer).
    pub fn read(&mut self, off: u64, len: usize) -> Result<Vec<u8>, i32> {
        self.run1(Op::Read {
            off,
            buf_off: 0,
            len,
        })?;
        Ok(self.buf()[..len].to_vec())
    }

    /// Synchronous write of `data` at `off`.
    pub fn write(&mut self, off: u64, data: &[u8]) -> IoResult {
        self.buf()[..data.len()].copy_from_slice(data);
        self.run1(Op::Write {
            off,
            buf_off: 0,
            len: data.len(),
        })
    }

    pub fn flush(&mut self) -> IoResult {
        self.run1(Op::Flush)
    }

    pub fn discard(&mut self, off: u64, len: u64) -> IoResult {
        self.run1(Op::Discard { off, len })
    }

    pub fn write_zeroes(&mut self, off: u64, len: u64, unmap: bool) -> IoResult {
        self.run1(Op::WriteZeroes { off, len, unmap })
    }

    /// Runs `[start, start+len)` in `req`-sized requests with up to `qd` in flight. `prep(slot,
    /// off)` prepares a write's buffer; `check(slot, off, result)` sees each completion.
    #[allow(clippy::too_many_arguments)]
    fn pipeline(
        &mut self,
        start: u64,
        len: u64,
        req: usize,
        qd: usize,
        write: bool,
        mut prep: impl FnMut(&mut [u8], u64),
        mut check: impl FnMut(&[u8], u64, IoResult) -> Result<(), String>,
    ) -> Result<(), String> {
        assert!(
            req > 0 && req <= self.buf_len,
            "request size {req} vs buffer {}",
            self.buf_len
        );
        let qd = qd.clamp(1, self.buf_len / req).min(self.completions.len());
        let mut free: Vec<usize> = (0..qd).rev().collect();
        let mut slot_off = vec![0u64; qd];
        let end = start + len;
        let mut next = start;
        let mut first_err: Option<String> = None;
        loop {
            while next < end && first_err.is_none() {
                let Some(slot) = free.pop() else { break };
                let n = usize::try_from((end - next).min(req as u64)).expect("usize");
                let bo = slot * req;
                if write {
                    prep(&mut self.buf()[bo..bo + n], next);
                }
                slot_off[slot] = next;
                let op = if write {
                    Op::Write {
                        off: next,
                        buf_off: bo,
                        len: n,
                    }
                } else {
                    Op::Read {
                        off: next,
                        buf_off: bo,
                        len: n,
                    }
                };
                self.submit(op, slot);
                next += n as u64;
            }
            if self.in_flight == 0 {
                break;
            }
            for d in self.wait(1) {
                let slot = d.user_data;
                let off = slot_off[slot];
                let n = usize::try_from((end - off).min(req as u64)).expect("usize");
                let bo = slot * req;
                if let Err(e) = check(&self.buf()[bo..bo + n], off, d.result()) {
                    first_err.get_or_insert(e);
                }
                free.push(slot);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Writes the pattern for `seed` over `[start, start+len)`; panics on a failed request.
    pub fn write_pattern(&mut self, start: u64, len: u64, req: usize, qd: usize, seed: u64) {
        self.pipeline(
            start,
            len,
            req,
            qd,
            true,
            |b, off| fill_pattern(b, off, seed),
            |_, off, r| {
                r.map_err(|e| format!("write of {req} bytes at {off:#x} failed: {}", errno_name(e)))
            },
        )
        .unwrap_or_else(|e| panic!("queue {}: {e}", self.index));
    }

    /// Reads `[start, start+len)` and checks the pattern for `seed`; `Err` names the first bad
    /// offset (or failed request).
    pub fn verify_pattern(
        &mut self,
        start: u64,
        len: u64,
        req: usize,
        qd: usize,
        seed: u64,
    ) -> Result<(), String> {
        let mut first: Option<String> = None;
        self.pipeline(
            start,
            len,
            req,
            qd,
            false,
            |_, _| {},
            |b, off, r| {
                r.map_err(|e| {
                    format!("read of {req} bytes at {off:#x} failed: {}", errno_name(e))
                })?;
                check_pattern(b, off, seed)
            },
        )
        .or_else(|e| {
            first.get_or_insert(e);
            Ok::<(), String>(())
        })
        .expect("infallible");
        first.map_or(Ok(()), Err)
    }

    /// Reads `[start, start+len)` into a Vec (`req`-sized requests, `qd` in flight); panics on a
    /// failed request.
    pub fn read_range(&mut self, start: u64, len: u64, req: usize, qd: usize) -> Vec<u8> {
        let mut out = vec![0u8; usize::try_from(len).expect("usize")];
        self.pipeline(
            start,
            len,
            req,
            qd,
            false,
            |_, _| {},
            |b, off, r| {
                r.map_err(|e| format!("read at {off:#x} failed: {}", errno_name(e)))?;
                let s = usize::try_from(off - start).expect("usize");
                out[s..s + b.len()].copy_from_slice(b);
                Ok(())
            },
        )
        .unwrap_or_else(|e| panic!("queue {}: {e}", self.index));
        out
    }
}

// ------------------------------------------------------------------------------------------------
// Raw virtio-driver client
// ------------------------------------------------------------------------------------------------

/// A minimal synchronous vhost-user-blk client on `virtio-driver`, without libblkio's client-side
/// checks: it sends whatever it is asked to (writes to a read-only device, out-of-range requests)
/// and exposes the negotiated feature bits and the config space.
pub mod raw {
    use super::{to_result, IoResult, TIMEOUT};
    use std::path::Path;
    use std::time::Instant;
    use virtio_driver::{
        VhostUser, VirtioBlkConfig, VirtioBlkFeatureFlags, VirtioBlkQueue, VirtioBlkTransport,
        VirtioFeatureFlags,
    };

    pub use virtio_driver::{VirtioBlkFeatureFlags as BlkFeatures, VirtioFeatureFlags as Features};

    /// Every virtio-blk feature the raw client accepts (it asks for all of them).
    pub fn all_blk_features() -> u64 {
        VirtioBlkFeatureFlags::all().bits()
    }

    const MEM_LEN: usize = 4 << 20;

    pub struct RawClient {
        // Field order matters: the queue points into memory owned by the transport.
        queue: VirtioBlkQueue<'static, u64>,
        transport: Box<VirtioBlkTransport>,
        mem: *mut u8,
        memfd: std::os::fd::OwnedFd,
        next_id: u64,
    }

    impl RawClient {
        /// Connects with one queue, offering VERSION_1 + `extra_features` (e.g.
        /// [`all_blk_features`], plus `Features::RING_EVENT_IDX` if wanted).
        pub fn connect(socket: &Path, extra_features: u64) -> std::io::Result<RawClient> {
            let features = VirtioFeatureFlags::VERSION_1.bits() | extra_features;
            let path = socket.to_str().expect("socket path is UTF-8");
            let vu =
                VhostUser::<VirtioBlkConfig, virtio_driver::VirtioBlkReqBuf>::new(path, features)?;
            let mut transport: Box<VirtioBlkTransport> = Box::new(vu);
            let mut queues = VirtioBlkQueue::<'static, u64>::setup_queues(&mut *transport, 1, 64)?;
            let queue = queues.pop().expect("one queue");

            // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
            let fd = unsafe { libc::memfd_create(c"raw-client-buf".as_ptr(), libc::MFD_CLOEXEC) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: fd is a freshly created descriptor that nothing else owns.
            let memfd: std::os::fd::OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
            let len = libc::off_t::try_from(MEM_LEN).expect("off_t");
            // SAFETY: ftruncate on our own valid fd.
            if unsafe { libc::ftruncate(fd, len) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: a new shared mapping of our own memfd; the result is checked.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    MEM_LEN,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
            let mut c = RawClient {
                queue,
                transport,
                mem: p.cast::<u8>(),
                memfd,
                next_id: 1,
            };
            let fd = std::os::fd::AsRawFd::as_raw_fd(&c.memfd);
            c.transport.map_mem_region(p as usize, MEM_LEN, fd, 0)?;
            // The region goes to the backend in a message nobody answers, and a kick takes
            // another path (an eventfd): the first request could reach a queue worker before
            // the backend's message thread added the region ("descriptor ... outside guest
            // memory", seen once in a loaded run). A question the backend answers in order
            // after that message makes sure the region is there.
            c.transport.get_config()?;
            Ok(c)
        }

        /// Negotiated virtio feature bits.
        pub fn features(&self) -> u64 {
            self.transport.get_features()
        }

        pub fn blk_features(&self) -> VirtioBlkFeatureFlags {
            VirtioBlkFeatureFlags::from_bits_truncate(self.features())
        }

        pub fn config(&self) -> VirtioBlkConfig {
            self.transport.get_config().expect("get_config")
        }

        fn mem(&mut self) -> &mut [u8] {
            // SAFETY: mem is a live MAP_SHARED mapping of MEM_LEN bytes owned by self.
            unsafe { std::slice::from_raw_parts_mut(self.mem, MEM_LEN) }
        }

        fn run(
            &mut self,
            queue: impl FnOnce(&mut VirtioBlkQueue<'static, u64>, *mut u8, u64) -> std::io::Result<()>,
        ) -> IoResult {
            let id = self.next_id;
            self.next_id += 1;
            let mem = self.mem;
            queue(&mut self.queue, mem, id).expect("queueing the request");
            self.transport
                .get_submission_notifier(0)
                .notify()
                .expect("kick");
            let deadline = Instant::now() + TIMEOUT;
            loop {
                if let Some(c) = self.queue.completions().next() {
                    assert_eq!(c.context, id, "completion for another request");
                    return to_result(c.ret);
                }
                assert!(
                    Instant::now() < deadline,
                    "raw client: no completion within {TIMEOUT:?}"
                );
                std::thread::sleep(std::time::Duration::from_micros(50));
            }
        }

        pub fn read(&mut self, off: u64, len: usize) -> Result<Vec<u8>, i32> {
            assert!(len <= MEM_LEN);
            // SAFETY: mem..mem+len is inside our mapping, registered with the
            // backend, and not otherwise accessed until the request completes.
            self.run(|q, mem, id| unsafe { q.read_raw(off, mem, len, id) })?;
            Ok(self.mem()[..len].to_vec())
        }

        pub fn write(&mut self, off: u64, data: &[u8]) -> IoResult {
            assert!(data.len() <= MEM_LEN);
            self.mem()[..data.len()].copy_from_slice(data);
            let len = data.len();
            // SAFETY: as in read().
            self.run(|q, mem, id| unsafe { q.write_raw(off, mem, len, id) })
        }

        pub fn flush(&mut self) -> IoResult {
            self.run(|q, _, id| q.flush(id))
        }

        pub fn discard(&mut self, off: u64, len: u64) -> IoResult {
            self.run(|q, _, id| q.discard(off, len, id))
        }

        pub fn write_zeroes(&mut self, off: u64, len: u64, unmap: bool) -> IoResult {
            self.run(|q, _, id| q.write_zeroes(off, len, unmap, id))
        }
    }

    impl Drop for RawClient {
        fn drop(&mut self) {
            // The queue and transport fields are dropped after this; the backend has its own
            // mapping of the memfd, so unmapping ours first is harmless.
            // SAFETY: mem is our mapping of MEM_LEN bytes; nothing uses it after this point.
            unsafe { libc::munmap(self.mem.cast(), MEM_LEN) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_detects_changes() {
        let mut b = pattern(8192, 8192, 1);
        assert!(check_pattern(&b, 8192, 1).is_ok());
        assert!(check_pattern(&b, 8192, 2).is_err(), "other seed");
        assert!(
            check_pattern(&b, 8192 + 512, 1).is_err(),
            "misplaced by one sector"
        );
        b[5000] ^= 1;
        let e = check_pattern(&b, 8192, 1).expect_err("flipped bit");
        assert!(e.contains(&format!("{:#x}", 8192 + 5000 / 8 * 8)), "{e}");
        assert_eq!(
            classify_block(&pattern(4096, 4096, 7), 4096, &[3, 7]),
            Some(7)
        );
        let mut torn = pattern(4096, 4096, 3);
        torn[2048..].copy_from_slice(&pattern(4096 + 2048, 2048, 7));
        assert_eq!(classify_block(&torn, 4096, &[3, 7]), None);
        assert!(check_zeros(&[0u8; 64], 0).is_ok());
        assert!(check_zeros(&b, 0).is_err());
    }

    #[test]
    fn bin_dir_is_target_profile_dir() {
        let d = bin_dir();
        assert!(d.join("deps").is_dir(), "{} has no deps/", d.display());
    }
}

pub mod faultfs;
pub mod libvirt;
pub mod loopdev;
pub mod netfault;
pub mod vm;
