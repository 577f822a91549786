//! The systems under test, each started as real processes serving a vhost-user-blk socket:
//! qemu-storage-daemon (default options, and at its best: io_uring and an iothread), vhost-mirror
//! alone, vhost-mirror + access-node (this build's, and
//! optionally a baseline build's), and qemu-storage-daemon with a write-blocking
//! `blockdev-mirror` to qemu-nbd (unix or TCP).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::util::{self, ChildGuard, Ctx, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum System {
    Qsd,
    /// qemu-storage-daemon at its best: `aio=io_uring` and the export on its own iothread.
    QsdBest,
    Local,
    Mirror,
    /// `Mirror` with the binaries of `--baseline-bin-dir` (another build, e.g. before a change).
    MirrorBase,
    QemuMirrorUnix,
    QemuMirrorTcp,
}

pub const ALL_SYSTEMS: &[System] = &[
    System::Qsd,
    System::QsdBest,
    System::Local,
    System::Mirror,
    System::MirrorBase,
    System::QemuMirrorUnix,
    System::QemuMirrorTcp,
];

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::Qsd => "qsd",
            System::QsdBest => "qsd-best",
            System::Local => "local",
            System::Mirror => "mirror",
            System::MirrorBase => "mirror-base",
            System::QemuMirrorUnix => "qemu-mirror-unix",
            System::QemuMirrorTcp => "qemu-mirror-tcp",
        }
    }

    /// What runs, for the Markdown legend.
    pub fn describe(self) -> &'static str {
        match self {
            System::Qsd => "qemu-storage-daemon, vhost-user-blk export of the raw image (file, cache.direct=off, default aio=threads)",
            System::QsdBest => "qemu-storage-daemon at its best: as qsd, but the file opened with aio=io_uring and the export on its own iothread (--object iothread, iothread= on the export)",
            System::Local => "vhost-mirror serve, no peer",
            System::Mirror => "vhost-mirror serve --peer 127.0.0.1 + access-node serve (loopback TCP), in sync",
            System::MirrorBase => "as mirror, with the vhost-mirror and access-node binaries of --baseline-bin-dir",
            System::QemuMirrorUnix => "qemu-storage-daemon + blockdev-mirror sync=full copy-mode=write-blocking (ready) to qemu-nbd over a unix socket",
            System::QemuMirrorTcp => "qemu-storage-daemon + blockdev-mirror sync=full copy-mode=write-blocking (ready) to qemu-nbd over loopback TCP",
        }
    }

    /// Parses one `--systems` item; `qemu-mirror` means both transports.
    pub fn parse_list(item: &str) -> Option<Vec<System>> {
        Some(match item {
            "qsd" => vec![System::Qsd],
            "qsd-best" => vec![System::QsdBest],
            "local" => vec![System::Local],
            "mirror" => vec![System::Mirror],
            "mirror-base" => vec![System::MirrorBase],
            "qemu-mirror" => vec![System::QemuMirrorUnix, System::QemuMirrorTcp],
            "qemu-mirror-unix" => vec![System::QemuMirrorUnix],
            "qemu-mirror-tcp" => vec![System::QemuMirrorTcp],
            _ => return None,
        })
    }

    pub fn needs_qemu(self) -> bool {
        matches!(
            self,
            System::Qsd | System::QsdBest | System::QemuMirrorUnix | System::QemuMirrorTcp
        )
    }

    /// vhost-mirror replicating to an access-node.
    pub fn is_mirror(self) -> bool {
        matches!(self, System::Mirror | System::MirrorBase)
    }

    pub fn is_qemu_mirror(self) -> bool {
        matches!(self, System::QemuMirrorUnix | System::QemuMirrorTcp)
    }
}

/// Where things live and how long to wait.
pub struct Env {
    /// vhost-mirror and access-node.
    pub bin_dir: PathBuf,
    /// vhost-mirror and access-node of the baseline build (system `mirror-base`).
    pub baseline_bin_dir: Option<PathBuf>,
    /// Images and logs.
    pub work: PathBuf,
    /// Sockets (a short path: unix socket paths are limited to 108 bytes).
    pub run: PathBuf,
    /// Bound on reaching "in sync" / "ready" (an initial copy of the whole image included).
    pub sync_timeout: Duration,
}

impl Env {
    /// The program `name` (vhost-mirror, access-node) as system `s` runs it.
    pub fn bin(&self, s: System, name: &str) -> PathBuf {
        match (s, &self.baseline_bin_dir) {
            (System::MirrorBase, Some(d)) => d.join(name),
            _ => self.bin_dir.join(name),
        }
    }

    /// `work/<system>/`, created.
    pub fn sys_dir(&self, s: System) -> Result<PathBuf> {
        let d = self.work.join(s.name());
        std::fs::create_dir_all(&d).ctx(|| format!("create {}", d.display()))?;
        Ok(d)
    }

    pub fn image(&self, s: System) -> PathBuf {
        self.work.join(s.name()).join("disk.img")
    }

    /// The replica (mirror) or NBD target (qemu-mirror) image.
    pub fn second_image(&self, s: System) -> Option<PathBuf> {
        match s {
            System::Mirror | System::MirrorBase => {
                Some(self.work.join(s.name()).join("replica.img"))
            }
            System::QemuMirrorUnix | System::QemuMirrorTcp => {
                Some(self.work.join(s.name()).join("target.img"))
            }
            _ => None,
        }
    }

    pub fn secret(&self) -> PathBuf {
        self.work.join("secret")
    }
}

const START_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

// ------------------------------------------------------------------------------------------------
// Control socket and QMP clients
// ------------------------------------------------------------------------------------------------

/// One request on a vhost-mirror / access-node control socket (`status` → one JSON line).
pub fn control_status(ctl: &Path) -> Result<Value> {
    let mut s = UnixStream::connect(ctl).ctx(|| format!("connect {}", ctl.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .ctx(|| "set_read_timeout".to_string())?;
    s.set_write_timeout(Some(Duration::from_secs(5)))
        .ctx(|| "set_write_timeout".to_string())?;
    s.write_all(b"status\n")
        .ctx(|| format!("write {}", ctl.display()))?;
    let mut out = String::new();
    s.take(1 << 20)
        .read_to_string(&mut out)
        .ctx(|| format!("read {}", ctl.display()))?;
    serde_json::from_str(out.trim()).ctx(|| format!("status from {}: {out:?}", ctl.display()))
}

pub fn status_str<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

pub fn status_u64(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// vhost-mirror says: peer connected, replica up to date, nothing out of sync, no resync.
pub fn is_in_sync(v: &Value) -> bool {
    status_str(v, "peer_state") == "connected"
        && status_str(v, "peer_disk_state") == "up-to-date"
        && v.get("out_of_sync_bytes").and_then(Value::as_u64) == Some(0)
        && v.get("resyncing").and_then(Value::as_bool) == Some(false)
}

/// A minimal QMP client (one command at a time, events skipped).
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    pub fn connect(path: &Path) -> Result<Qmp> {
        let s = UnixStream::connect(path).ctx(|| format!("connect QMP {}", path.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .ctx(|| "set_read_timeout".to_string())?;
        let writer = s.try_clone().ctx(|| "clone QMP socket".to_string())?;
        let mut q = Qmp {
            reader: BufReader::new(s),
            writer,
        };
        let greeting = q.read_msg()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("unexpected QMP greeting: {greeting}"));
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read_msg(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .ctx(|| "read from QMP".to_string())?;
        if n == 0 {
            return Err("QMP connection closed".to_string());
        }
        serde_json::from_str(&line).ctx(|| format!("QMP sent {line:?}"))
    }

    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value> {
        let msg = json!({"execute": cmd, "arguments": args});
        self.writer
            .write_all(format!("{msg}\n").as_bytes())
            .ctx(|| format!("QMP send {cmd}"))?;
        loop {
            let v = self.read_msg()?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(format!("QMP {cmd} {msg}: {e}"));
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Instances
// ------------------------------------------------------------------------------------------------

/// A running system. Processes are kept in stop order (frontend-facing one first).
pub struct Instance {
    pub system: System,
    pub socket: PathBuf,
    /// vhost-mirror's control socket (local, mirror).
    pub control: Option<PathBuf>,
    qmp: Option<Qmp>,
    procs: Vec<ChildGuard>,
    /// Image files to fdatasync between runs.
    pub files: Vec<PathBuf>,
}

impl Instance {
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(ChildGuard::pid).collect()
    }

    pub fn proc_pid(&self, name: &str) -> Option<u32> {
        self.procs
            .iter()
            .find(|p| p.name() == name)
            .map(ChildGuard::pid)
    }

    /// Sum of utime+stime ticks of all processes of this system.
    pub fn cpu_ticks(&self) -> Result<u64> {
        self.pids().into_iter().map(util::cpu_ticks).sum()
    }

    pub fn check_running(&mut self) -> Result<()> {
        for p in &mut self.procs {
            p.check_running()?;
        }
        if self.system == System::QsdBest {
            for p in &self.procs {
                if let Some(line) = io_uring_complaint(&p.log_text()) {
                    return Err(format!(
                        "qsd-best: {} cannot use io_uring on this machine, it said {line:?} (it \
                         falls back to its thread pool, and qsd-best would silently be qsd with \
                         an iothread); check /proc/sys/kernel/io_uring_disabled, the seccomp \
                         policy and RLIMIT_MEMLOCK, or leave qsd-best out of --systems",
                        p.name()
                    ));
                }
            }
        }
        Ok(())
    }

    /// Before a measurement: everything runs, the mirror is in sync / the mirror job ready.
    pub fn ensure_ready(&mut self, timeout: Duration) -> Result<()> {
        self.check_running()?;
        if let Some(ctl) = self.control.clone() {
            if self.system.is_mirror() {
                wait_in_sync(self, &ctl, timeout)?;
            }
        }
        if self.qmp.is_some() {
            self.wait_job_ready(timeout)?;
        }
        Ok(())
    }

    fn wait_job_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_running()?;
            let qmp = self.qmp.as_mut().ctx(|| "no QMP".to_string())?;
            let jobs = qmp.execute("query-block-jobs", json!({}))?;
            let job = jobs
                .as_array()
                .and_then(|a| {
                    a.iter()
                        .find(|j| j.get("device").and_then(Value::as_str) == Some("m0"))
                })
                .cloned()
                .ctx(|| format!("mirror job m0 is gone: query-block-jobs = {jobs}"))?;
            if job.get("ready").and_then(Value::as_bool) == Some(true) {
                return Ok(());
            }
            if let Some(st) = job.get("status").and_then(Value::as_str) {
                if matches!(st, "aborting" | "concluded" | "null") {
                    return Err(format!("mirror job m0 ended: {job}"));
                }
            }
            if Instant::now() >= deadline {
                return Err(format!("mirror job m0 not ready within {timeout:?}: {job}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// fdatasync the images (no dirty pages carried into the next system's run).
    pub fn sync_files(&self) {
        for f in &self.files {
            util::datasync(f);
        }
    }

    /// Stops the processes in order (SIGTERM, then SIGKILL after a while).
    pub fn stop(mut self) {
        if let Some(mut q) = self.qmp.take() {
            let _ = q.execute("quit", json!({}));
        }
        for p in &mut self.procs {
            p.terminate(STOP_TIMEOUT);
        }
    }
}

/// Waits until vhost-mirror says the replica is in sync.
pub fn wait_in_sync(inst: &mut Instance, ctl: &Path, timeout: Duration) -> Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        inst.check_running()?;
        let st = control_status(ctl)?;
        if is_in_sync(&st) {
            return Ok(st);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{}: replica not in sync within {timeout:?}; status: {st}",
                inst.system.name()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_path(p: &Path, child: &mut ChildGuard) -> Result<()> {
    util::wait_for(
        &format!("{} to create {}", child.name(), p.display()),
        START_TIMEOUT,
        Duration::from_millis(5),
        || {
            child.check_running()?;
            Ok(p.exists())
        },
    )
    .map_err(|e| format!("{e}{}", child.log_tail()))
}

fn remove_stale(p: &Path) {
    let _ = std::fs::remove_file(p);
}

/// `vhost-mirror serve` (system `s`'s binary) on `image`, replicating to 127.0.0.1:`peer` if
/// given.
pub fn spawn_vhost_mirror(
    env: &Env,
    s: System,
    tag: &str,
    image: &Path,
    nq: usize,
    peer: Option<u16>,
) -> Result<(ChildGuard, PathBuf, PathBuf)> {
    let socket = env.run.join(format!("{tag}.vhost.sock"));
    let control = env.run.join(format!("{tag}.ctl.sock"));
    remove_stale(&socket);
    remove_stale(&control);
    let mut cmd = Command::new(env.bin(s, "vhost-mirror"));
    cmd.arg("serve")
        .arg("--image")
        .arg(image)
        .arg("--socket")
        .arg(&socket)
        .arg("--control")
        .arg(&control)
        .arg("--num-queues")
        .arg(nq.to_string());
    if let Some(port) = peer {
        cmd.arg("--peer")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--secret-file")
            .arg(env.secret());
    }
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    let log = env.work.join(format!("{tag}.vhost-mirror.log"));
    let mut c = ChildGuard::spawn("vhost-mirror", &mut cmd, Some(&log))?;
    wait_path(&socket, &mut c)?;
    wait_path(&control, &mut c)?;
    Ok((c, socket, control))
}

/// `access-node serve` (system `s`'s binary) on 127.0.0.1:`port`, waiting until it listens.
pub fn spawn_access_node(
    env: &Env,
    s: System,
    tag: &str,
    image: &Path,
    port: u16,
) -> Result<(ChildGuard, PathBuf)> {
    let control = env.run.join(format!("{tag}.an-ctl.sock"));
    remove_stale(&control);
    let log = env.work.join(format!("{tag}.access-node.log"));
    let already = std::fs::read_to_string(&log).map_or(0, |s| s.len());
    let mut cmd = Command::new(env.bin(s, "access-node"));
    cmd.arg("serve")
        .arg("--image")
        .arg(image)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--secret-file")
        .arg(env.secret())
        .arg("--control")
        .arg(&control);
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    let mut c = ChildGuard::spawn("access-node", &mut cmd, Some(&log))?;
    util::wait_for(
        "access-node to listen",
        START_TIMEOUT,
        Duration::from_millis(5),
        || {
            c.check_running()?;
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            Ok(text
                .get(already..)
                .is_some_and(|t| t.contains("listening on"))
                && control.exists())
        },
    )
    .map_err(|e| format!("{e}{}", c.log_tail()))?;
    Ok((c, control))
}

/// qemu-nbd serving `image` on a unix socket or 127.0.0.1:port; returns the blockdev-add
/// `server` argument for it.
pub fn spawn_qemu_nbd(
    env: &Env,
    tag: &str,
    image: &Path,
    tcp: bool,
    read_only: bool,
) -> Result<(ChildGuard, Value)> {
    let log = env.work.join(format!("{tag}.qemu-nbd.log"));
    let mut cmd = Command::new("qemu-nbd");
    cmd.arg("--format=raw")
        .arg("--persistent")
        .arg("--shared=8")
        .arg("--cache=writeback")
        .arg("--aio=threads");
    if read_only {
        cmd.arg("--read-only");
    }
    let (server, wait): (Value, Box<dyn Fn() -> bool>) = if tcp {
        let port = util::free_port()?;
        cmd.arg("--bind=127.0.0.1").arg(format!("--port={port}"));
        (
            json!({"type": "inet", "host": "127.0.0.1", "port": port.to_string()}),
            Box::new(move || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()),
        )
    } else {
        let sock = env.run.join(format!("{tag}.nbd.sock"));
        remove_stale(&sock);
        cmd.arg(format!("--socket={}", sock.display()));
        let s2 = sock.clone();
        (
            json!({"type": "unix", "path": sock.display().to_string()}),
            Box::new(move || s2.exists()),
        )
    };
    cmd.arg(image);
    let mut c = ChildGuard::spawn("qemu-nbd", &mut cmd, Some(&log))?;
    util::wait_for(
        "qemu-nbd to listen",
        START_TIMEOUT,
        Duration::from_millis(5),
        || {
            c.check_running()?;
            Ok(wait())
        },
    )
    .map_err(|e| format!("{e}{}", c.log_tail()))?;
    Ok((c, server))
}

/// A line of qemu-storage-daemon's log (not the `==== command` line the benchmark writes) about
/// io_uring. QEMU opens `aio=io_uring` files without setting io_uring up; each thread's
/// AioContext sets it up at its first request (QEMU 8.2+; at open and on a move to an iothread
/// in 7.2), and where that fails it reports "Unable to use linux io_uring, falling back to
/// thread pool" on stderr and carries on with threads.
fn io_uring_complaint(log: &str) -> Option<&str> {
    log.lines()
        .filter(|l| !l.starts_with("==== "))
        .find(|l| l.contains("io_uring"))
}

/// qemu-storage-daemon exporting `image` over vhost-user-blk (and a QMP monitor if `qmp`);
/// `best`: the file with `aio=io_uring` and the export on its own iothread (else QEMU's
/// defaults: `aio=threads`, the export in the main loop).
fn spawn_qsd(
    env: &Env,
    tag: &str,
    image: &Path,
    nq: usize,
    qmp: Option<&Path>,
    best: bool,
) -> Result<(ChildGuard, PathBuf)> {
    let socket = env.run.join(format!("{tag}.vhost.sock"));
    remove_stale(&socket);
    let mut cmd = Command::new("qemu-storage-daemon");
    if best {
        cmd.arg("--object").arg("iothread,id=iot0");
    }
    cmd.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=file0,filename={},cache.direct=off{}",
            image.display(),
            if best { ",aio=io_uring" } else { "" }
        ))
        .arg("--blockdev")
        .arg("driver=raw,node-name=raw0,file=file0")
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=exp0,node-name=raw0,addr.type=unix,addr.path={},\
             writable=on,num-queues={nq}{}",
            socket.display(),
            if best { ",iothread=iot0" } else { "" }
        ));
    if let Some(q) = qmp {
        remove_stale(q);
        cmd.arg("--chardev")
            .arg(format!(
                "socket,id=qmp,path={},server=on,wait=off",
                q.display()
            ))
            .arg("--monitor")
            .arg("chardev=qmp");
    }
    let log = env.work.join(format!("{tag}.qemu-storage-daemon.log"));
    let mut c = ChildGuard::spawn("qemu-storage-daemon", &mut cmd, Some(&log))?;
    wait_path(&socket, &mut c).map_err(|e| {
        if best {
            format!("qsd-best (aio=io_uring, export on an iothread) did not start: {e}")
        } else {
            e
        }
    })?;
    if let Some(q) = qmp {
        wait_path(q, &mut c)?;
    }
    Ok((c, socket))
}

/// Starts `s` with `nq` queues on its image (created beforehand by `prepare_images`). Returns
/// once it is ready to be measured (in sync / mirror job ready).
pub fn start(env: &Env, s: System, nq: usize) -> Result<Instance> {
    let dir = env.sys_dir(s)?;
    let image = env.image(s);
    let tag = s.name();
    let mut inst = match s {
        System::Qsd | System::QsdBest => {
            let (c, socket) = spawn_qsd(env, tag, &image, nq, None, s == System::QsdBest)?;
            Instance {
                system: s,
                socket,
                control: None,
                qmp: None,
                procs: vec![c],
                files: vec![image],
            }
        }
        System::Local => {
            let (c, socket, control) = spawn_vhost_mirror(env, s, tag, &image, nq, None)?;
            Instance {
                system: s,
                socket,
                control: Some(control),
                qmp: None,
                procs: vec![c],
                files: vec![image],
            }
        }
        System::Mirror | System::MirrorBase => {
            let replica = dir.join("replica.img");
            let port = util::free_port()?;
            let (node, _) = spawn_access_node(env, s, tag, &replica, port)?;
            let (c, socket, control) = spawn_vhost_mirror(env, s, tag, &image, nq, Some(port))?;
            Instance {
                system: s,
                socket,
                control: Some(control),
                qmp: None,
                procs: vec![c, node],
                files: vec![image, replica],
            }
        }
        System::QemuMirrorUnix | System::QemuMirrorTcp => {
            let target = dir.join("target.img");
            let (nbd, server) =
                spawn_qemu_nbd(env, tag, &target, s == System::QemuMirrorTcp, false)?;
            let qmp_path = env.run.join(format!("{tag}.qmp.sock"));
            let (c, socket) = spawn_qsd(env, tag, &image, nq, Some(&qmp_path), false)?;
            let mut qmp = Qmp::connect(&qmp_path).map_err(|e| format!("{e}{}", c.log_tail()))?;
            qmp.execute(
                "blockdev-add",
                json!({"driver": "nbd", "node-name": "nbd0", "server": server}),
            )?;
            qmp.execute(
                "blockdev-mirror",
                json!({"job-id": "m0", "device": "raw0", "target": "nbd0",
                       "sync": "full", "copy-mode": "write-blocking"}),
            )?;
            Instance {
                system: s,
                socket,
                control: None,
                qmp: Some(qmp),
                procs: vec![c, nbd],
                files: vec![image, target],
            }
        }
    };
    let t0 = Instant::now();
    inst.ensure_ready(env.sync_timeout)?;
    let waited = t0.elapsed();
    if waited > Duration::from_millis(500) {
        eprintln!(
            "bench:   {} ready after {:.1}s (initial copy to the replica/target)",
            s.name(),
            waited.as_secs_f64()
        );
    }
    Ok(inst)
}

/// Creates the images: every system's disk gets the same random content (so reads hit real
/// data, and the initial copies move real data); replicas/targets start empty.
pub fn prepare_images(env: &Env, systems: &[System], size: u64) -> Result<()> {
    let base = env.work.join("base.img");
    util::write_random_file(&base, size, 0x1a9e)?;
    for &s in systems {
        env.sys_dir(s)?;
        std::fs::copy(&base, env.image(s))
            .ctx(|| format!("copy {} to {}", base.display(), env.image(s).display()))?;
        if s.is_qemu_mirror() {
            if let Some(t) = env.second_image(s) {
                util::sparse_file(&t, size)?;
            }
        }
    }
    std::fs::remove_file(&base).ctx(|| format!("remove {}", base.display()))?;
    // Write everything back now, not during the first measurements.
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_io_uring_fallback_in_the_log_is_found_and_the_command_line_is_not() {
        let ok = "==== \"qemu-storage-daemon\" \"--blockdev\" \"driver=file,aio=io_uring\"\n";
        assert_eq!(io_uring_complaint(ok), None);
        let bad = format!(
            "{ok}qemu-storage-daemon: Unable to use linux io_uring, falling back to thread pool: \
             failed to init linux io_uring ring: Operation not permitted\n"
        );
        assert!(io_uring_complaint(&bad).is_some_and(|l| l.contains("falling back")));
    }

    #[test]
    fn qsd_and_qsd_best_are_separate_names() {
        assert_eq!(System::parse_list("qsd"), Some(vec![System::Qsd]));
        assert_eq!(System::parse_list("qsd-best"), Some(vec![System::QsdBest]));
        for &s in ALL_SYSTEMS {
            assert_eq!(System::parse_list(s.name()), Some(vec![s]));
        }
    }
}
