//! Small helpers: errors with context, child processes that die with the benchmark, /proc
//! readings (CPU time, resident memory), a PRNG, bounded waits.

use std::fmt::Display;
use std::fs::File;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Every error of the benchmark is a message for the person running it.
pub type Result<T> = std::result::Result<T, String>;

/// `.ctx(|| "what was being done")` on a `Result` or `Option`.
pub trait Ctx<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: Display> Ctx<T> for std::result::Result<T, E> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| format!("{}: {e}", what()))
    }
}

impl<T> Ctx<T> for Option<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.ok_or_else(what)
    }
}

// ------------------------------------------------------------------------------------------------
// Child processes
// ------------------------------------------------------------------------------------------------

/// A child process that is SIGKILLed and reaped when dropped (unless it already exited), and that
/// dies with the spawning thread (`PR_SET_PDEATHSIG`) if the benchmark itself dies: spawn only
/// from the main thread.
pub struct ChildGuard {
    child: Child,
    name: String,
    log: Option<std::path::PathBuf>,
    status: Option<ExitStatus>,
}

impl ChildGuard {
    /// Spawns `cmd` with stdin from /dev/null and stdout+stderr appended to `log` (if given).
    pub fn spawn(name: &str, cmd: &mut Command, log: Option<&Path>) -> Result<ChildGuard> {
        cmd.stdin(Stdio::null());
        if let Some(log) = log {
            let mut f = File::options()
                .create(true)
                .append(true)
                .open(log)
                .ctx(|| format!("open log {}", log.display()))?;
            let _ = writeln!(f, "==== {cmd:?}");
            let f2 = f.try_clone().ctx(|| "dup log fd".to_string())?;
            cmd.stdout(f).stderr(f2);
        }
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
            .ctx(|| format!("cannot start {name} ({cmd:?})"))?;
        Ok(ChildGuard {
            child,
            name: name.to_string(),
            log: log.map(Path::to_path_buf),
            status: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of the child's log (for error messages).
    pub fn log_tail(&self) -> String {
        let Some(log) = &self.log else {
            return String::new();
        };
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(25);
        format!(
            "\n---- last lines of {} ----\n{}\n----",
            log.display(),
            lines[from..].join("\n")
        )
    }

    pub fn log_text(&self) -> String {
        self.log
            .as_ref()
            .and_then(|l| std::fs::read_to_string(l).ok())
            .unwrap_or_default()
    }

    /// The exit status if the child has exited (reaps it), `None` while it runs.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// An error naming the child and showing its log if it has exited.
    pub fn check_running(&mut self) -> Result<()> {
        match self.try_wait() {
            None => Ok(()),
            Some(st) => Err(format!(
                "{} (pid {}) exited unexpectedly ({st}){}",
                self.name,
                self.pid(),
                self.log_tail()
            )),
        }
    }

    fn signal(&mut self, sig: libc::c_int) {
        if self.try_wait().is_none() {
            if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
                // SAFETY: kill(2) has no memory-safety preconditions; the PID is our own unreaped
                // child, so it cannot have been reused by another process.
                unsafe { libc::kill(pid, sig) };
            }
        }
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

    /// SIGTERM, wait up to `timeout`, then SIGKILL. Returns whether it exited on SIGTERM.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        self.signal(libc::SIGTERM);
        if self.wait_timeout(timeout).is_some() {
            return true;
        }
        eprintln!(
            "bench: {} (pid {}) ignored SIGTERM for {timeout:?}; killing it",
            self.name,
            self.pid()
        );
        self.kill();
        false
    }

    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        if self.status.is_none() {
            self.status = self.child.wait().ok();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `cmd` to completion (output captured), killing it after `timeout`.
pub fn run_capture(
    name: &str,
    cmd: &mut Command,
    timeout: Duration,
) -> Result<(ExitStatus, String, String)> {
    use std::io::Read;
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut g = ChildGuard::spawn(name, cmd, None)?;
    let mut out = g
        .child
        .stdout
        .take()
        .ctx(|| "stdout not piped".to_string())?;
    let mut err = g
        .child
        .stderr
        .take()
        .ctx(|| "stderr not piped".to_string())?;
    let t_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let Some(st) = g.wait_timeout(timeout) else {
        g.kill();
        return Err(format!("{name} still running after {timeout:?}; killed"));
    };
    let out = t_out.join().unwrap_or_default();
    let err = t_err.join().unwrap_or_default();
    Ok((
        st,
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    ))
}

/// The first line of `prog --version`, or `None` if `prog` cannot be run.
pub fn version_of(prog: &str) -> Option<String> {
    let (st, out, _) = run_capture(
        prog,
        Command::new(prog).arg("--version"),
        Duration::from_secs(10),
    )
    .ok()?;
    st.success()
        .then(|| out.lines().next().unwrap_or("").trim().to_string())
}

/// Whether `prog` is an executable in `$PATH`.
pub fn in_path(prog: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| {
            std::fs::metadata(d.join(prog))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

// ------------------------------------------------------------------------------------------------
// /proc
// ------------------------------------------------------------------------------------------------

/// utime + stime of process `pid` (all its threads), in clock ticks.
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let s = std::fs::read_to_string(&path).ctx(|| format!("read {path}"))?;
    // The command name (field 2) may hold spaces and parentheses: fields start after the last ')'.
    let rest = s
        .rfind(')')
        .map(|i| &s[i + 1..])
        .ctx(|| format!("{path}: no ')'"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    let get = |i: usize| -> Result<u64> {
        f.get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .ctx(|| format!("{path}: field {} missing", i + 3))
    };
    Ok(get(11)? + get(12)?)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub fn clk_tck() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Resident memory of a process, from /proc/PID/status (KiB).
#[derive(Clone, Copy, Debug, Default)]
pub struct Mem {
    pub rss: u64,
    pub anon: u64,
    pub file: u64,
    pub shmem: u64,
}

impl Mem {
    /// Everything resident except shared-memory mappings (the guest's RAM, i.e. the I/O buffers
    /// the frontend handed over): the process's own memory.
    pub fn private(&self) -> u64 {
        self.rss.saturating_sub(self.shmem)
    }
}

pub fn mem(pid: u32) -> Result<Mem> {
    let path = format!("/proc/{pid}/status");
    let s = std::fs::read_to_string(&path).ctx(|| format!("read {path}"))?;
    let mut m = Mem::default();
    for line in s.lines() {
        let mut it = line.split_whitespace();
        let (Some(k), Some(v)) = (it.next(), it.next()) else {
            continue;
        };
        let v: u64 = v.parse().unwrap_or(0);
        match k {
            "VmRSS:" => m.rss = v,
            "RssAnon:" => m.anon = v,
            "RssFile:" => m.file = v,
            "RssShmem:" => m.shmem = v,
            _ => {}
        }
    }
    Ok(m)
}

// ------------------------------------------------------------------------------------------------
// Waiting, ports, files
// ------------------------------------------------------------------------------------------------

/// Polls `cond` every `every` until it returns `Ok(true)`; an `Err` ends the wait at once.
pub fn wait_for(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut cond: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if cond()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        std::thread::sleep(every);
    }
}

/// A currently free TCP port on 127.0.0.1 (bind it soon).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").ctx(|| "bind 127.0.0.1:0".to_string())?;
    Ok(l.local_addr().ctx(|| "local_addr".to_string())?.port())
}

/// fdatasync of the file at `path` (if it exists), so the next run starts without dirty pages.
pub fn datasync(path: &Path) {
    if let Ok(f) = File::open(path) {
        let _ = f.sync_data();
    }
}

/// Writes `size` bytes of pseudo-random data (no zero blocks) to a new file at `path`.
pub fn write_random_file(path: &Path, size: u64, seed: u64) -> Result<()> {
    let mut f = File::create(path).ctx(|| format!("create {}", path.display()))?;
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        rng.fill(&mut buf);
        let n = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
        f.write_all(&buf[..n])
            .ctx(|| format!("write {}", path.display()))?;
        left -= n as u64;
    }
    f.sync_all().ctx(|| format!("fsync {}", path.display()))
}

/// Creates (or truncates to) a sparse file of `size` bytes.
pub fn sparse_file(path: &Path, size: u64) -> Result<()> {
    let f = File::create(path).ctx(|| format!("create {}", path.display()))?;
    f.set_len(size)
        .ctx(|| format!("truncate {}", path.display()))
}

// ------------------------------------------------------------------------------------------------
// PRNG and statistics
// ------------------------------------------------------------------------------------------------

/// xorshift64* seeded through splitmix64: fast, good enough for offsets and payloads.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-enough in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&last[..n]);
    }
}

/// Median of `v` (mean of the middle two for even lengths); `None` if empty or any is NaN.
pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() || v.iter().any(|x| x.is_nan()) {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

/// The `q`-quantile (0..=1) of sorted values (nearest rank).
pub fn quantile_sorted(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    f64::from(sorted[rank.clamp(1, sorted.len()) - 1])
}
