//! Shared by the QEMU tiers (`tests/tests/vm.rs`, `tests/tests/failover.rs`): the guest image,
//! booting it, a minimal HTTP client for its file server, failure reports, and guests that run
//! a fio job on a second (data) disk ([`FioVm`], [`boot_fio_guest`]).

use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::{bin_dir, Backend, ChildGuard};

pub const READY_MARKER: &str = "FILESERVER-READY";
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(120);
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// On failure (panic), prints where the logs are and their last lines.
pub struct FailureReport {
    pub logs: Vec<(&'static str, PathBuf)>,
    pub dir: PathBuf,
    pub kept: bool,
}

impl Drop for FailureReport {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        eprintln!(
            "==== test failed; temp dir {} ({})",
            self.dir.display(),
            if self.kept {
                "kept"
            } else {
                "deleted; set VHOST_MIRROR_KEEP_LOGS=1 to keep it"
            }
        );
        for (what, path) in &self.logs {
            eprintln!("==== {what}: {} (last 40 lines)", path.display());
            match fs::read(path) {
                Ok(bytes) => {
                    let text = String::from_utf8_lossy(&bytes);
                    let lines: Vec<&str> = text.lines().collect();
                    for line in &lines[lines.len().saturating_sub(40)..] {
                        eprintln!("  {line}");
                    }
                }
                Err(e) => eprintln!("  (cannot read: {e})"),
            }
        }
    }
}

pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .expect("tests crate has a parent dir")
        .to_path_buf()
}

pub fn guest_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("VHOST_MIRROR_VM_GUEST_DIR") {
        return PathBuf::from(p);
    }
    // <target>/debug -> <target>/vm-guest
    let bin = bin_dir();
    bin.parent().unwrap_or(&bin).join("vm-guest")
}

pub fn require_tool(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "VM test needs `{tool}` (Debian package {package}); run ci/setup.sh"
    );
}

pub fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn sha256_file(path: &Path) -> String {
    let out = run_ok(Command::new("sha256sum").arg(path), "sha256sum");
    out.split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_string()
}

pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("read /dev/urandom");
    buf
}

pub struct HttpReply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl HttpReply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Minimal HTTP/1.0 client: one request per connection, reads until the server closes.
pub fn http(port: u16, method: &str, path: &str, body: &[u8]) -> std::io::Result<HttpReply> {
    http_within(port, method, path, body, HTTP_TIMEOUT)
}

/// [`http`], giving up on a read or write that waits longer than `timeout`.
pub fn http_within(
    port: u16,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> std::io::Result<HttpReply> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let head = format!(
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    s.flush()?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let _ = s.shutdown(Shutdown::Both);
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no header end in {} bytes", resp.len())))?;
    let head = String::from_utf8_lossy(&resp[..split]).into_owned();
    let status_line = head.lines().next().unwrap_or("");
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
    Ok(HttpReply {
        status,
        body: resp[split + 4..].to_vec(),
    })
}

/// One acknowledged upload.
#[derive(Clone)]
pub struct Upload {
    pub name: String,
    pub data: Vec<u8>,
}

/// Uploads `data` as `name`; Ok only when the guest acknowledged it with the right sha256.
pub fn upload(port: u16, name: &str, data: &[u8]) -> Result<(), String> {
    upload_within(port, name, data, HTTP_TIMEOUT)
}

/// [`upload`], giving up on a read or write that waits longer than `timeout`.
pub fn upload_within(port: u16, name: &str, data: &[u8], timeout: Duration) -> Result<(), String> {
    let sum = sha256_hex(data);
    let r = http_within(
        port,
        "POST",
        &format!("/cgi-bin/upload?name={name}"),
        data,
        timeout,
    )
    .map_err(|e| e.to_string())?;
    if r.status != 200 {
        return Err(format!("status {}: {}", r.status, r.text()));
    }
    if r.text().trim() != format!("sha256={sum}") {
        return Err(format!("guest stored other bytes: {}", r.text()));
    }
    Ok(())
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn check_uploads(port: u16, uploads: &[Upload], when: &str) {
    for u in uploads {
        // A reply that never came (the connection closed before any byte: seen once from a
        // guest that had just booted under TCG) is asked again, a few times; a reply is
        // judged as it is.
        let mut tries = 0;
        let r = loop {
            tries += 1;
            match http(port, "GET", &format!("/files/{}", u.name), b"") {
                Ok(r) => break r,
                Err(e) if tries < 5 => {
                    eprintln!("{when}: download {}: {e}; asking again", u.name);
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => panic!("{when}: download {} ({tries} tries): {e}", u.name),
            }
        };
        assert_eq!(
            r.status, 200,
            "{when}: acknowledged upload {} is missing",
            u.name
        );
        assert!(
            r.body == u.data,
            "{when}: acknowledged upload {} reads back different ({} bytes, expected {})",
            u.name,
            r.body.len(),
            u.data.len()
        );
    }
}

/// Waits for `marker` in the serial log while both processes stay alive.
pub fn wait_for_ready(serial: &Path, qemu: &mut ChildGuard, backend: &mut Backend) {
    wait_for_console(serial, &mut || {
        if let Some(status) = qemu.try_wait() {
            panic!("QEMU exited ({status}) before {READY_MARKER}");
        }
        backend.assert_running();
    });
}

/// Waits for [`READY_MARKER`] in the serial log; fails on the guest's failure markers, and
/// `check` runs between looks (to fail fast when a process died).
pub fn wait_for_console(serial: &Path, check: &mut dyn FnMut()) {
    let start = Instant::now();
    loop {
        let log = fs::read(serial).unwrap_or_default();
        let log = String::from_utf8_lossy(&log);
        if log.contains(READY_MARKER) {
            eprintln!(
                "vm test: file server ready after {:.1} s",
                start.elapsed().as_secs_f64()
            );
            return;
        }
        for marker in ["FILESERVER-FAILED", "INITRAMFS-FAILED", "Kernel panic"] {
            assert!(
                !log.contains(marker),
                "guest reported {marker:?} on its console"
            );
        }
        check();
        assert!(
            start.elapsed() < BOOT_TIMEOUT,
            "no {READY_MARKER} within {BOOT_TIMEOUT:?}"
        );
        sleep(Duration::from_millis(200));
    }
}

/// The guest disk the VM boots from through the firmware (SeaBIOS -> GRUB -> Linux), as a real
/// VM does: an MBR, GRUB, and the root filesystem in a partition starting at 1 MiB.
pub const GUEST_DISK: &str = "boot-disk.raw";

/// Copies the guest's disk `name` ([`GUEST_DISK`] or [`DIRECT_BOOT_DISK`]) from `guest`
/// ([`build_guest`]) to `to`, sparse; panics if `cp` fails.
pub fn copy_guest_disk(guest: &Path, name: &str, to: &Path) {
    run_ok(
        Command::new("cp")
            .arg("--sparse=always")
            .arg(guest.join(name))
            .arg(to),
        "copy the guest disk",
    );
}

/// The root filesystem inside a guest disk image, as e2fsprogs names it.
pub fn root_fs(image: &Path) -> String {
    format!("{}?offset=1048576", image.display())
}

/// Builds the guest (cached: build.sh is idempotent and fast when up to date) and returns its
/// directory.
pub fn build_guest() -> PathBuf {
    require_tool("qemu-system-x86_64", "qemu-system-x86");
    let gdir = guest_dir();
    let t = Instant::now();
    run_ok(
        Command::new("bash")
            .arg(workspace_root().join("images/build.sh"))
            .arg("--firmware")
            .arg(&gdir),
        "images/build.sh",
    );
    eprintln!(
        "guest in {} ({:.1} s)",
        gdir.display(),
        t.elapsed().as_secs_f64()
    );
    gdir
}

/// The `images/boot.sh` command booting the guest from its disk (firmware boot) on `socket`,
/// with the file server on 127.0.0.1:`port` and the console in `serial`.
pub fn boot_command(guest: &Path, socket: &Path, port: u16, serial: &Path) -> Vec<String> {
    let accel = std::env::var("VHOST_MIRROR_VM_ACCEL").unwrap_or_else(|_| "auto".into());
    vec![
        "bash".into(),
        workspace_root()
            .join("images/boot.sh")
            .display()
            .to_string(),
        "--firmware".into(),
        "--dir".into(),
        guest.display().to_string(),
        "--socket".into(),
        socket.display().to_string(),
        "--http-port".into(),
        port.to_string(),
        "--serial".into(),
        serial.display().to_string(),
        "--accel".into(),
        accel,
    ]
}

/// Waits until the guest's file server answers on `port`; panics if `proc` exits first.
pub fn wait_http(port: u16, proc: &mut ChildGuard, timeout: Duration) -> Duration {
    let start = Instant::now();
    let name = proc.name().to_owned();
    first_answer(port, timeout, &mut || {
        if let Some(status) = proc.try_wait() {
            panic!("{name} exited ({status}) before the file server answered");
        }
    });
    start.elapsed()
}

/// Probes the file server on `port` until one probe gets a 200, starting a new probe every
/// 100 ms, each on its own thread: QEMU's user-mode network accepts the host side at once, and
/// a probe sent before the guest listens hangs until its timeout, so one probe at a time would
/// add that wait to what is measured (it made recovery look 6 s longer than a boot). Each
/// probe ends by itself within 2 s; once httpd answers one, the list CGI is asked. `check`
/// runs between probes (to fail fast); panics after `timeout`.
pub fn first_answer(port: u16, timeout: Duration, check: &mut dyn FnMut()) {
    first_answer_in(None, port, "/cgi-bin/list", timeout, check);
}

/// [`first_answer`], each probe from inside the network namespace `netns` (a path such as
/// /run/netns/NAME) when given: the file server of a VM that runs in a cluster node's
/// namespace answers on that namespace's loopback. `ready` is the request that must get a 200
/// once httpd answers (the list CGI hashes every file: with many files, ask for one instead).
pub fn first_answer_in(
    netns: Option<&Path>,
    port: u16,
    ready: &'static str,
    timeout: Duration,
    check: &mut dyn FnMut(),
) {
    let start = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    // Stage 1: cheap probes (a path that does not exist: httpd answers 404 without running
    // anything), a new one every 100 ms, each given up after 2 s. Probes sent while the guest
    // has no network wait in QEMU's user-mode stack and reach the guest together when it comes
    // up: when each ran the list CGI, dozens of shell scripts under TCG delayed the first
    // answer by about 4 s.
    let get = |path: &'static str, limit: Duration| {
        let tx = tx.clone();
        let ns = netns.map(Path::to_path_buf);
        std::thread::spawn(move || {
            if let Some(ns) = &ns {
                if let Err(e) = enter_netns(ns) {
                    eprintln!("probe: {e}");
                    let _ = tx.send(None);
                    return;
                }
            }
            let _ = tx.send(
                http_within(port, "GET", path, b"", limit)
                    .ok()
                    .map(|r| r.status),
            );
        });
    };
    let mut listening = false;
    loop {
        if listening {
            // Stage 2: the file server itself, one request at a time.
            get(ready, Duration::from_secs(10));
            if rx.recv().ok().flatten() == Some(200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        } else {
            get("/probe-not-a-file", Duration::from_secs(2));
            let until = Instant::now() + Duration::from_millis(100);
            while let Ok(answer) = rx.recv_timeout(until.saturating_duration_since(Instant::now()))
            {
                listening |= answer.is_some();
            }
        }
        check();
        assert!(
            start.elapsed() < timeout,
            "file server on port {port} not up within {timeout:?}"
        );
    }
}

/// Moves the calling thread (only it) into the network namespace at `path` (/run/netns/NAME).
/// Use it on a thread of its own: the thread stays there.
pub fn enter_netns(path: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = fs::File::open(path)?;
    // SAFETY: setns(2) on a namespace file descriptor we hold open; it changes only the
    // calling thread's network namespace.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A process started in its own process group; the whole group is killed on drop (for
/// scripts such as images/failover.sh that start children of their own).
pub struct GroupGuard {
    child: Child,
    name: String,
}

impl GroupGuard {
    pub fn spawn(name: &str, cmd: &mut Command) -> GroupGuard {
        cmd.process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        GroupGuard {
            child,
            name: name.to_owned(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the leader to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if start.elapsed() >= timeout {
                return None;
            }
            sleep(Duration::from_millis(50));
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        let pgid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) on the process group we created; no memory is passed.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// Kills a process with SIGKILL by PID (one we started).
pub fn sigkill(pid: u32) {
    // SAFETY: kill(2) on a PID we started; no memory is passed.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
}

/// Compares two files; returns the first differing offset.
pub fn first_difference(a: &Path, b: &Path) -> Option<u64> {
    let mut fa = fs::File::open(a).expect("open a");
    let mut fb = fs::File::open(b).expect("open b");
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut off = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba);
        let nb = read_full(&mut fb, &mut bb);
        if na != nb || ba[..na] != bb[..nb] {
            let i = ba[..na.min(nb)]
                .iter()
                .zip(&bb[..na.min(nb)])
                .position(|(x, y)| x != y)
                .unwrap_or(na.min(nb));
            return Some(off + i as u64);
        }
        if na == 0 {
            return None;
        }
        off += na as u64;
    }
}

fn read_full(f: &mut fs::File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => panic!("read: {e}"),
        }
    }
    n
}

// ------------------------------------------------------------------------------------------------
// fio in the guest (kernel flag vmfio=, images/build.sh)
// ------------------------------------------------------------------------------------------------

/// The guest disk for direct kernel boot (`-kernel/-initrd`, root=/dev/vda): whole-disk ext4.
pub const DIRECT_BOOT_DISK: &str = "disk.raw";
/// Printed by the guest right before it starts fio.
pub const FIO_START_MARKER: &str = "VMFIO-START";
/// Bound for a whole fio guest run ([`boot_fio_guest`]): boot, the job, power-off.
pub const FIO_TIMEOUT: Duration = Duration::from_secs(300);

/// How to boot a fio guest ([`FioVm::start`], [`boot_fio_guest`]): direct kernel boot of
/// `guest`'s kernel, root disk `/dev/vda` on `root_socket` (a backend the caller started, serving
/// a copy of [`DIRECT_BOOT_DISK`]), data disk `/dev/vdb` on `data_socket`, and the kernel flag
/// `vmfio=<base64 of job>`: instead of the file server, the guest runs
/// `fio --output-format=json JOB`, prints the result on its console and powers off.
#[derive(Clone, Debug)]
pub struct FioGuestOpts {
    /// Guest directory ([`build_guest`]).
    pub guest: PathBuf,
    /// Where the console and QEMU logs go (`fio-serial-N.log`, `fio-qemu-N.log`).
    pub dir: PathBuf,
    pub root_socket: PathBuf,
    pub data_socket: PathBuf,
    /// The fio job file's text. With the rest of the kernel command line it must fit the
    /// kernel's 2047 bytes once base64-encoded (about 1.5 KB of job text).
    pub job: String,
    /// vCPUs (`--smp`); default 2, so that two jobs pinned with `cpus_allowed` submit on two
    /// queues.
    pub smp: u32,
    /// The data disk's `num-queues` (default 2); `None`: QEMU's default, one per vCPU.
    pub data_queues: Option<u16>,
    /// The data disk's chardev `reconnect-ms` (none by default): with it QEMU survives its
    /// backend going away and connects again every so many milliseconds.
    pub reconnect_ms: Option<u64>,
    /// Guest RAM (`--mem`, default 256M).
    pub mem: String,
}

impl FioGuestOpts {
    pub fn new(
        guest: &Path,
        dir: &Path,
        root_socket: &Path,
        data_socket: &Path,
        job: &str,
    ) -> FioGuestOpts {
        FioGuestOpts {
            guest: guest.to_path_buf(),
            dir: dir.to_path_buf(),
            root_socket: root_socket.to_path_buf(),
            data_socket: data_socket.to_path_buf(),
            job: job.to_owned(),
            smp: 2,
            data_queues: Some(2),
            reconnect_ms: None,
            mem: "256M".into(),
        }
    }
}

/// What a fio guest reported.
#[derive(Clone, Debug)]
pub struct FioResult {
    /// fio's exit status in the guest (`VMFIO-EXIT N`; 250-254: the guest could not start fio,
    /// see `notes`).
    pub exit: i32,
    /// fio's JSON document, or `None` if there was none to parse (then see `output`).
    pub json: Option<serde_json::Value>,
    /// Everything between `VMFIO-BEGIN` and `VMFIO-END` (warnings of fio's before the JSON).
    pub output: String,
    /// Lines fio printed before its JSON (e.g. "fio: multiple writers may overwrite ..."),
    /// and a `VMFIO-FAILED: ...` reason if the guest could not run fio.
    pub notes: Vec<String>,
    /// Completion interrupts per virtqueue after the job: (disk, queue, count), e.g.
    /// ("vdb", "req.1", 4120). Each queue has its own MSI-X vector.
    pub irqs: Vec<(String, String, u64)>,
    /// The serial console log.
    pub console: PathBuf,
    /// From QEMU's start to its exit.
    pub elapsed: Duration,
}

impl FioResult {
    /// The JSON document; panics with fio's output if there is none.
    pub fn json(&self) -> &serde_json::Value {
        self.json.as_ref().unwrap_or_else(|| {
            panic!(
                "fio printed no JSON (exit {}); its output:\n{}\nnotes: {:?}",
                self.exit, self.output, self.notes
            )
        })
    }

    /// The `jobs` array of the JSON document.
    pub fn jobs(&self) -> &[serde_json::Value] {
        self.json()["jobs"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_else(|| panic!("fio JSON has no jobs array: {}", self.json()))
    }

    /// "JOBNAME: error N" for every job whose `error` is not 0 (verify failures included: fio
    /// stops the job with EILSEQ, 84).
    pub fn job_errors(&self) -> Vec<String> {
        self.jobs()
            .iter()
            .filter(|j| j["error"].as_i64() != Some(0))
            .map(|j| format!("{}: error {}", j["jobname"], j["error"]))
            .collect()
    }

    /// Asserts that job `j` (one of [`Self::jobs`]) wrote `bytes` and, with `do_verify`, read
    /// every one of them back and checked it.
    pub fn assert_wrote_and_verified(j: &serde_json::Value, bytes: u64) {
        let name = &j["jobname"];
        assert_eq!(
            j["write"]["io_bytes"].as_u64(),
            Some(bytes),
            "bytes written by {name}: {j}"
        );
        assert_eq!(
            j["read"]["io_bytes"].as_u64(),
            Some(bytes),
            "bytes verified by {name}: {j}"
        );
    }

    /// Completion interrupts of `disk`'s request queues ("req.N"), by queue name.
    pub fn queue_irqs(&self, disk: &str) -> Vec<(String, u64)> {
        self.irqs
            .iter()
            .filter(|(d, q, _)| d == disk && q.starts_with("req."))
            .map(|(_, q, n)| (q.clone(), *n))
            .collect()
    }
}

/// Standard base64 (with `=` padding), the alphabet busybox `base64 -d` reads.
pub fn base64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let n = (b(0) << 16) | (b(1) << 8) | b(2);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ABC[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// What the guest's vmfio script printed ([`parse_fio_console`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FioConsole {
    /// `VMFIO-EXIT N`.
    pub exit: i32,
    /// The lines between `VMFIO-BEGIN` and `VMFIO-END`.
    pub output: String,
    /// fio's lines before its JSON document, and `VMFIO-FAILED: ...` lines.
    pub notes: Vec<String>,
    /// `VMFIO-IRQ DISK QUEUE N` lines.
    pub irqs: Vec<(String, String, u64)>,
}

/// Parses what the guest's vmfio script printed (`images/build.sh`): the block between
/// `VMFIO-BEGIN` and `VMFIO-END`, `VMFIO-EXIT N`, `VMFIO-IRQ DISK QUEUE N` and
/// `VMFIO-FAILED: ...`. `None` without a `VMFIO-EXIT` line.
pub fn parse_fio_console(console: &str) -> Option<FioConsole> {
    let mut exit = None;
    let mut output = Vec::new();
    let mut notes = Vec::new();
    let mut irqs = Vec::new();
    let mut inside = false;
    for line in console.lines() {
        let line = line.trim_end_matches('\r');
        if inside {
            if line.trim() == "VMFIO-END" {
                inside = false;
            } else {
                output.push(line);
            }
            continue;
        }
        let t = line.trim();
        if t == "VMFIO-BEGIN" {
            inside = true;
        } else if let Some(n) = t.strip_prefix("VMFIO-EXIT ") {
            exit = n.trim().parse().ok();
        } else if let Some(why) = t.strip_prefix("VMFIO-FAILED: ") {
            notes.push(format!("VMFIO-FAILED: {why}"));
        } else if let Some(rest) = t.strip_prefix("VMFIO-IRQ ") {
            let f: Vec<&str> = rest.split_whitespace().collect();
            if let [disk, queue, n] = f[..] {
                if let Ok(n) = n.parse() {
                    irqs.push((disk.to_owned(), queue.to_owned(), n));
                }
            }
        }
    }
    // fio's notes come before the document, which starts with a line "{".
    let start = output.iter().position(|l| l.starts_with('{'));
    notes.extend(
        output[..start.unwrap_or(output.len())]
            .iter()
            .filter(|l| !l.trim().is_empty())
            .map(|l| (*l).to_owned()),
    );
    Some(FioConsole {
        exit: exit?,
        output: output.join("\n"),
        notes,
        irqs,
    })
}

/// A QEMU guest running a fio job ([`FioGuestOpts`]); QEMU is killed when this is dropped, and
/// a panicking test gets the tails of the console and QEMU logs.
pub struct FioVm {
    qemu: ChildGuard,
    console: PathBuf,
    qemu_log: PathBuf,
    started: Instant,
}

impl FioVm {
    /// Starts QEMU (`images/boot.sh`, direct kernel boot, `VHOST_MIRROR_VM_ACCEL` or auto)
    /// and returns at once.
    pub fn start(opts: &FioGuestOpts) -> FioVm {
        require_tool("qemu-system-x86_64", "qemu-system-x86");
        let id = crate::unique_id();
        let console = opts.dir.join(format!("fio-serial-{id}.log"));
        let qemu_log = opts.dir.join(format!("fio-qemu-{id}.log"));
        let accel = std::env::var("VHOST_MIRROR_VM_ACCEL").unwrap_or_else(|_| "auto".into());
        let out = fs::File::create(&qemu_log).expect("create qemu log");
        let err = out.try_clone().expect("clone log fd");
        let mut cmd = Command::new("bash");
        cmd.arg(workspace_root().join("images/boot.sh"))
            .arg("--dir")
            .arg(&opts.guest)
            .arg("--socket")
            .arg(&opts.root_socket)
            .arg("--http-port")
            .arg(crate::free_port().to_string())
            .args(["--smp", &opts.smp.to_string(), "--mem", &opts.mem])
            .args(["--serial"])
            .arg(&console)
            .args(["--accel", &accel])
            .arg("--data-socket")
            .arg(&opts.data_socket)
            .args([
                "--data-queues",
                &opts
                    .data_queues
                    .map_or_else(|| "default".to_owned(), |n| n.to_string()),
            ])
            .arg("--extra-append")
            // quiet: under TCG every console character costs; errors still show.
            .arg(format!("quiet vmfio={}", base64(opts.job.as_bytes())));
        if let Some(ms) = opts.reconnect_ms {
            cmd.args(["--reconnect-ms", &ms.to_string()]);
        }
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        // boot.sh execs QEMU, so this PID is QEMU's.
        let qemu = ChildGuard::spawn("qemu (images/boot.sh, vmfio)", &mut cmd);
        eprintln!(
            "fio guest: QEMU pid {}, console {}",
            qemu.pid(),
            console.display()
        );
        FioVm {
            qemu,
            console,
            qemu_log,
            started: Instant::now(),
        }
    }

    pub fn qemu(&mut self) -> &mut ChildGuard {
        &mut self.qemu
    }

    pub fn console(&self) -> &Path {
        &self.console
    }

    pub fn qemu_log(&self) -> &Path {
        &self.qemu_log
    }

    /// The console so far.
    pub fn console_text(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.console).unwrap_or_default()).into_owned()
    }

    fn fail_on_guest_errors(&mut self, text: &str, waiting_for: &str) {
        for marker in ["VMFIO-FAILED", "INITRAMFS-FAILED", "Kernel panic"] {
            if let Some(i) = text.find(marker) {
                let line = text[i..].lines().next().unwrap_or(marker);
                panic!("guest: {line:?} while waiting for {waiting_for}");
            }
        }
    }

    /// Waits until the console shows `marker`, calling `check` between looks (e.g. to assert
    /// that a backend still runs); panics if QEMU exits, the guest reports a failure, or
    /// `timeout` passes. Returns the time since QEMU started.
    pub fn wait_for(
        &mut self,
        marker: &str,
        timeout: Duration,
        check: &mut dyn FnMut(),
    ) -> Duration {
        let start = Instant::now();
        loop {
            let text = self.console_text();
            if text.contains(marker) {
                return self.started.elapsed();
            }
            self.fail_on_guest_errors(&text, marker);
            if let Some(status) = self.qemu.try_wait() {
                panic!(
                    "QEMU exited ({status}) before {marker:?}; its output:\n{}",
                    fs::read_to_string(&self.qemu_log).unwrap_or_default()
                );
            }
            check();
            assert!(
                start.elapsed() < timeout,
                "no {marker:?} on the guest's console within {timeout:?}"
            );
            sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the guest is about to start fio (`VMFIO-START`): the root disk and the data
    /// disk are up, the job's devices exist. fio's first I/O follows within a second or so.
    pub fn wait_started(&mut self, timeout: Duration) -> Duration {
        let t = self.wait_for(FIO_START_MARKER, timeout, &mut || {});
        eprintln!(
            "fio guest: fio starting {:.1} s after QEMU",
            t.as_secs_f64()
        );
        t
    }

    /// Waits for the guest to power off (QEMU exits by itself, successfully) and returns what
    /// it reported; panics on a timeout (QEMU is then killed), a failed QEMU, or a console
    /// without `VMFIO-EXIT`. `check` runs between looks.
    pub fn finish(&mut self, timeout: Duration, check: &mut dyn FnMut()) -> FioResult {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.qemu.try_wait() {
                break s;
            }
            let text = self.console_text();
            if !text.contains("VMFIO-EXIT") {
                self.fail_on_guest_errors(&text, "fio's result");
            }
            check();
            if start.elapsed() >= timeout {
                self.qemu.kill();
                panic!("the fio guest did not power off within {timeout:?}");
            }
            sleep(Duration::from_millis(100));
        };
        let elapsed = self.started.elapsed();
        let text = self.console_text();
        assert!(
            status.success(),
            "QEMU exit status {status}; its output:\n{}",
            fs::read_to_string(&self.qemu_log).unwrap_or_default()
        );
        let FioConsole {
            exit,
            output,
            notes,
            irqs,
        } = parse_fio_console(&text)
            .unwrap_or_else(|| panic!("the guest powered off without VMFIO-EXIT"));
        let json = output
            .find("\n{")
            .map(|i| i + 1)
            .or_else(|| output.starts_with('{').then_some(0))
            .and_then(|i| serde_json::from_str(&output[i..]).ok());
        eprintln!(
            "fio guest: fio exit {exit}, QEMU exited {:.1} s after start",
            elapsed.as_secs_f64()
        );
        FioResult {
            exit,
            json,
            output,
            notes,
            irqs,
            console: self.console.clone(),
            elapsed,
        }
    }
}

impl Drop for FioVm {
    fn drop(&mut self) {
        // Killed first (ChildGuard would too), so the logs below are complete.
        self.qemu.kill();
        if !std::thread::panicking() {
            return;
        }
        for (what, path) in [("console", &self.console), ("QEMU output", &self.qemu_log)] {
            eprintln!("==== fio guest {what}: {} (last 40 lines)", path.display());
            let text = String::from_utf8_lossy(&fs::read(path).unwrap_or_default()).into_owned();
            let lines: Vec<&str> = text.lines().collect();
            for line in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("  {line}");
            }
        }
    }
}

/// Boots a fio guest ([`FioGuestOpts`]), waits for its result (within [`FIO_TIMEOUT`]) and
/// returns it; QEMU is killed if anything fails.
pub fn boot_fio_guest(opts: &FioGuestOpts) -> FioResult {
    let mut vm = FioVm::start(opts);
    vm.wait_started(FIO_TIMEOUT);
    let left = FIO_TIMEOUT.saturating_sub(vm.started.elapsed());
    vm.finish(left, &mut || {})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), enc);
        }
        assert_eq!(base64(&[0xfb, 0xff, 0xbf]), "+/+/");
    }

    #[test]
    fn parses_the_guest_console() {
        let console = "rcS: network up\r\nVMFIO-START\r\nVMFIO-BEGIN\r\nfio: a note\r\n{\r\n  \"jobs\" : []\r\n}\r\n\r\nVMFIO-END\r\nVMFIO-IRQ vdb config 0\r\nVMFIO-IRQ vdb req.0 12\r\nVMFIO-IRQ vdb req.1 7\r\nVMFIO-EXIT 0\r\n";
        let c = parse_fio_console(console).expect("parsed");
        assert_eq!(c.exit, 0);
        assert_eq!(c.notes, vec!["fio: a note".to_owned()]);
        assert_eq!(c.irqs.len(), 3);
        assert_eq!(c.irqs[2], ("vdb".into(), "req.1".into(), 7));
        assert!(c.output.contains("\"jobs\""));
        assert!(parse_fio_console("VMFIO-START\nVMFIO-BEGIN\n").is_none());
    }
}
