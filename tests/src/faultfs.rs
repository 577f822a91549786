//! [`FaultFs`]: a running `faultfs` daemon (the power-loss layer) for durability tests.
//!
//! A test puts a host's files (image, `.meta`, `.bitmap`, `.al`, temp files) under
//! [`FaultFs::path`]; data written there stays in the daemon's memory until the file is fsynced.
//! [`FaultFs::cut`] is a power loss (all unsynced data is dropped), [`FaultFs::fail`] injects
//! EIO/ENOSPC into reads, writes or fsyncs of matching files. Namespace operations (create,
//! rename, unlink, truncate) are durable at once in faultfs's model.
//!
//! Layout, under the parent directory given to [`FaultFs::mount`]:
//! `faultfs-<n>/backing/` (the real files), `faultfs-<n>/mnt/` (the mount point),
//! `faultfs-<n>/control.sock`, `faultfs-<n>/faultfs.log`.
//!
//! Dropping a `FaultFs` (also when the test panics) stops the daemon (SIGTERM, then SIGKILL) and
//! detaches the mount if it is still there. Drop processes that use the mount first (declare
//! their guards after the `FaultFs`).

use std::ffi::CString;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use crate::{bin_path, unique_id, wait_until, ChildGuard, TIMEOUT};

/// The counters of `stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Dirty (not yet fsynced) data, in whole 4 KiB pages.
    pub dirty_bytes: u64,
    pub dirty_files: u64,
    /// FUSE read / write / fsync requests (fsyncs of directories counted apart).
    pub reads: u64,
    pub writes: u64,
    pub fsyncs: u64,
    pub dir_fsyncs: u64,
    /// Errors injected by fail rules.
    pub injected: u64,
}

impl FaultStats {
    /// Parses `dirty_bytes=N dirty_files=N ...` (unknown keys are ignored).
    pub fn parse(s: &str) -> FaultStats {
        let mut st = FaultStats::default();
        for kv in s.split_whitespace() {
            let Some((k, v)) = kv.split_once('=') else {
                continue;
            };
            let v: u64 = v
                .parse()
                .unwrap_or_else(|e| panic!("faultfs stats {kv:?}: {e}"));
            match k {
                "dirty_bytes" => st.dirty_bytes = v,
                "dirty_files" => st.dirty_files = v,
                "reads" => st.reads = v,
                "writes" => st.writes = v,
                "fsyncs" => st.fsyncs = v,
                "dir_fsyncs" => st.dir_fsyncs = v,
                "injected" => st.injected = v,
                _ => {}
            }
        }
        st
    }
}

/// A mounted faultfs with its daemon.
pub struct FaultFs {
    daemon: ChildGuard,
    backing: PathBuf,
    mount: PathBuf,
    control: PathBuf,
    log: PathBuf,
}

impl FaultFs {
    /// Starts `faultfs` over a fresh backing directory under `parent_dir` and waits until the
    /// mount is live and the control socket answers.
    pub fn mount(parent_dir: &Path) -> FaultFs {
        let root = parent_dir.join(format!("faultfs-{}", unique_id()));
        let backing = root.join("backing");
        let mount = root.join("mnt");
        for d in [&backing, &mount] {
            std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
        }
        let control = root.join("control.sock");
        let log = root.join("faultfs.log");
        let log_file = File::create(&log).expect("create faultfs.log");
        let mut cmd = Command::new(bin_path("faultfs"));
        cmd.arg("--backing")
            .arg(&backing)
            .arg("--mount")
            .arg(&mount)
            .arg("--control")
            .arg(&control)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("dup log fd"))
            .stderr(log_file);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let daemon = ChildGuard::spawn("faultfs", &mut cmd);
        let mut fs = FaultFs {
            daemon,
            backing,
            mount,
            control,
            log,
        };
        let ready = wait_until(TIMEOUT, || {
            !fs.daemon.is_running() || (fs.control.exists() && is_mounted(&fs.mount))
        });
        assert!(
            ready && fs.daemon.is_running(),
            "faultfs did not come up (exit: {:?}); log:\n{}",
            fs.daemon.try_wait(),
            fs.log()
        );
        fs
    }

    /// The mount point: put the files under test here.
    pub fn path(&self) -> &Path {
        &self.mount
    }

    /// The backing directory: the durable state (what a power cut leaves).
    pub fn backing(&self) -> &Path {
        &self.backing
    }

    pub fn pid(&self) -> u32 {
        self.daemon.pid()
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends one control command; `Ok(rest of the "ok" line)` or `Err(message of "err")`.
    pub fn command(&self, line: &str) -> Result<String, String> {
        let mut s = UnixStream::connect(&self.control)
            .unwrap_or_else(|e| panic!("connect {}: {e}", self.control.display()));
        s.set_read_timeout(Some(TIMEOUT)).expect("set_read_timeout");
        writeln!(s, "{line}").unwrap_or_else(|e| panic!("faultfs {line:?}: {e}"));
        let mut reply = String::new();
        BufReader::new(&s)
            .read_line(&mut reply)
            .unwrap_or_else(|e| panic!("faultfs {line:?}: {e}"));
        let reply = reply.trim_end();
        if reply == "ok" {
            Ok(String::new())
        } else if let Some(rest) = reply.strip_prefix("ok ") {
            Ok(rest.to_string())
        } else if let Some(e) = reply.strip_prefix("err ") {
            Err(e.to_string())
        } else {
            panic!("faultfs {line:?}: unexpected reply {reply:?}")
        }
    }

    fn ok(&self, line: &str) -> String {
        self.command(line)
            .unwrap_or_else(|e| panic!("faultfs {line:?}: {e}"))
    }

    /// Power loss: drops every write that was not fsynced. Returns the bytes dropped (pages).
    pub fn cut(&self) -> u64 {
        let r = self.ok("cut");
        r.parse()
            .unwrap_or_else(|e| panic!("faultfs cut reply {r:?}: {e}"))
    }

    /// Injects `errno` ("EIO" or "ENOSPC") into `op` ("read", "write", "fsync" or "any") on
    /// files whose path relative to the mount contains `substring` (no spaces; a trailing `$`
    /// anchors it at the end of the path, so `disk.img$` spares `disk.img.meta`); `count`
    /// times, or until [`FaultFs::clear`].
    pub fn fail(&self, op: &str, substring: &str, errno: &str, count: Option<u32>) {
        assert!(
            !substring.is_empty() && !substring.contains(char::is_whitespace),
            "fail substring must be one non-empty word: {substring:?}"
        );
        let line = match count {
            Some(n) => format!("fail {op} {substring} {errno} {n}"),
            None => format!("fail {op} {substring} {errno}"),
        };
        self.ok(&line);
    }

    /// Removes all fail rules.
    pub fn clear(&self) {
        self.ok("clear");
    }

    pub fn stats(&self) -> FaultStats {
        FaultStats::parse(&self.ok("stats"))
    }

    /// Writes all dirty data to the backing files and fsyncs them (like sync(1)).
    pub fn sync(&self) {
        self.ok("sync");
    }

    /// Clean stop (SIGTERM): unmounts and writes dirty data out unless a cut was issued.
    pub fn stop(&mut self) -> ExitStatus {
        let status = self.daemon.terminate(TIMEOUT);
        self.detach();
        status
    }

    /// SIGKILLs the daemon (it dies with whatever is dirty) and detaches the dead mount.
    pub fn kill(&mut self) -> ExitStatus {
        let status = self.daemon.kill();
        self.detach();
        status
    }

    /// Lazily unmounts the mount point if it is still mounted (the daemon is gone).
    fn detach(&self) {
        if is_mounted(&self.mount) {
            let c = CString::new(self.mount.as_os_str().as_bytes()).expect("no NUL in path");
            // SAFETY: umount2 reads a valid NUL-terminated path; no other memory is passed.
            let r = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            if r != 0 {
                eprintln!(
                    "umount2({}, MNT_DETACH): {}",
                    self.mount.display(),
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

impl Drop for FaultFs {
    fn drop(&mut self) {
        if self.daemon.is_running() {
            self.daemon.signal(libc::SIGTERM);
            if self.daemon.wait_timeout(TIMEOUT).is_none() {
                self.daemon.kill();
            }
        }
        self.detach();
    }
}

/// Whether a FUSE filesystem is mounted on `path` (per /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let want = path.to_string_lossy().replace(' ', "\\040");
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    info.lines().any(|line| {
        let mut halves = line.splitn(2, " - ");
        let (Some(pre), Some(post)) = (halves.next(), halves.next()) else {
            return false;
        };
        pre.split(' ').nth(4) == Some(want.as_str()) && post.starts_with("fuse")
    })
}
