//! `bench`: the performance benchmark of vhost-mirror (issue 5).
//!
//! Drives every system through libblkio's virtio-blk-vhost-user driver (what a guest's
//! virtio-blk driver does), interleaved (round → workload → system), and writes the medians,
//! the ratios and the targets as JSON and Markdown. See `bench --help`.

mod client;
mod report;
mod resync;
mod systems;
mod util;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{json, Value};

use client::{Client, Workload, WORKLOADS};
use systems::{Env, Instance, System, ALL_SYSTEMS};
use util::{ChildGuard, Ctx, Result};

#[derive(Debug, Parser)]
#[command(
    name = "bench",
    about = "Benchmark vhost-mirror against qemu-storage-daemon and QEMU's write-blocking \
             blockdev-mirror, through libblkio's virtio-blk-vhost-user driver"
)]
struct Args {
    /// Rounds (each runs every workload on every system); medians are over rounds.
    #[arg(long)]
    rounds: Option<usize>,
    /// Seconds measured per run (after a short warm-up).
    #[arg(long)]
    secs: Option<f64>,
    /// Image size in MiB (also the resync test's image).
    #[arg(long)]
    image_mb: Option<u64>,
    /// Output directory for bench.json and bench.md (default: <target dir>/bench).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Systems: qsd (qemu-storage-daemon, default options), qsd-best (qemu-storage-daemon with
    /// aio=io_uring and the export on an iothread), local, mirror, mirror-base (needs
    /// --baseline-bin-dir), qemu-mirror (= qemu-mirror-unix + qemu-mirror-tcp). Default: all but
    /// mirror-base.
    #[arg(long, value_delimiter = ',')]
    systems: Option<Vec<String>>,
    /// Workloads (default: all; see the list in --help of the output).
    #[arg(long, value_delimiter = ',')]
    workloads: Option<Vec<String>>,
    /// Quick run of every system and workload (~0.3 s each, small image): checks that
    /// everything works, not how fast.
    #[arg(long)]
    smoke: bool,
    /// Where vhost-mirror and access-node are (default: the directory of this executable).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// vhost-mirror and access-node of another build (e.g. the commit before a change): adds
    /// the system mirror-base (mirror with these binaries), measured interleaved with the
    /// others, and the ratios mirror/mirror-base (throughput per workload, resync).
    #[arg(long, value_name = "DIR")]
    baseline_bin_dir: Option<PathBuf>,
    /// Directory for images and logs (default: <out>/work; wiped at start, removed at the end).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Keep the work directory (logs) at the end.
    #[arg(long)]
    keep_work: bool,
    /// Seconds of load while sampling resident memory (default 600, --smoke 2).
    #[arg(long)]
    rss_secs: Option<f64>,
    /// Skip the resync / nbdcopy measurement.
    #[arg(long)]
    no_resync: bool,
    /// Skip the resident-memory measurement.
    #[arg(long)]
    no_rss: bool,
    /// Also profile vhost-mirror (and access-node) with `perf record -g` during each of
    /// --perf-workloads on mirror, mirror-base and local; top symbols go into the report.
    #[arg(long)]
    perf: bool,
    /// The workloads --perf profiles (default: each workload with a missed issue-10 target in
    /// this run, or randwrite-4k-qd32 if none missed).
    #[arg(long, value_delimiter = ',')]
    perf_workloads: Vec<String>,
    /// Loopback TCP round trips per RTT measurement.
    #[arg(long, default_value_t = 10_000)]
    rtt_count: usize,
}

/// Resolved configuration.
struct Config {
    smoke: bool,
    rounds: usize,
    secs: f64,
    warmup: f64,
    image_bytes: u64,
    systems: Vec<System>,
    workloads: Vec<&'static Workload>,
    out: PathBuf,
    rss_secs: f64,
    rss_segment: f64,
    resync: bool,
    rss: bool,
    perf: bool,
    perf_workloads: Vec<&'static Workload>,
    rtt_count: usize,
    resync_iterations: usize,
}

impl Config {
    /// The systems whose resync is measured: mirror, and mirror-base if it runs.
    fn resync_systems(&self) -> Vec<System> {
        [System::Mirror, System::MirrorBase]
            .into_iter()
            .filter(|&s| s == System::Mirror || self.systems.contains(&s))
            .collect()
    }
}

/// One run's numbers.
#[derive(Clone, Copy, Debug)]
pub struct RunStats {
    pub iops: f64,
    pub mib_s: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub cpu_s_per_gib: f64,
    pub flush_mean_us: Option<f64>,
    pub ops: u64,
    /// From vhost-mirror's status totals over the run (where a request's time goes): mean
    /// local fdatasync, replica write round trip, replica flush round trip, us.
    pub fdatasync_us: Option<f64>,
    pub link_write_us: Option<f64>,
    pub link_flush_us: Option<f64>,
}

impl RunStats {
    fn from_measure(m: &client::Measure) -> RunStats {
        let secs = m.secs.max(1e-9);
        let mean_ns = if m.lat_ns.is_empty() {
            f64::NAN
        } else {
            m.lat_ns.iter().map(|&x| f64::from(x)).sum::<f64>() / m.lat_ns.len() as f64
        };
        let gib = m.bytes as f64 / f64::from(1u32 << 30);
        RunStats {
            iops: m.ops as f64 / secs,
            mib_s: m.bytes as f64 / secs / f64::from(1u32 << 20),
            mean_us: mean_ns / 1000.0,
            p50_us: util::quantile_sorted(&m.lat_ns, 0.50) / 1000.0,
            p99_us: util::quantile_sorted(&m.lat_ns, 0.99) / 1000.0,
            cpu_s_per_gib: if gib > 0.0 {
                m.cpu_ticks as f64 / util::clk_tck() / gib
            } else {
                f64::NAN
            },
            flush_mean_us: (m.flushes > 0)
                .then(|| m.flush_lat_ns_sum as f64 / m.flushes as f64 / 1000.0),
            ops: m.ops,
            fdatasync_us: None,
            link_write_us: None,
            link_flush_us: None,
        }
    }

    /// Adds the means of vhost-mirror's status totals between `before` and `after`.
    fn with_breakdown(mut self, before: Option<[u64; 6]>, after: Option<[u64; 6]>) -> Self {
        if let (Some(b), Some(a)) = (before, after) {
            let mean = |i: usize| {
                let n = a[i].saturating_sub(b[i]);
                (n > 0).then(|| a[i + 1].saturating_sub(b[i + 1]) as f64 / n as f64 / 1000.0)
            };
            self.fdatasync_us = mean(0);
            self.link_write_us = mean(2);
            self.link_flush_us = mean(4);
        }
        self
    }

    fn median(v: &[RunStats]) -> Option<RunStats> {
        let med = |f: &dyn Fn(&RunStats) -> f64| util::median(&v.iter().map(f).collect::<Vec<_>>());
        let fl: Vec<f64> = v.iter().filter_map(|r| r.flush_mean_us).collect();
        Some(RunStats {
            iops: med(&|r| r.iops)?,
            mib_s: med(&|r| r.mib_s)?,
            mean_us: med(&|r| r.mean_us).unwrap_or(f64::NAN),
            p50_us: med(&|r| r.p50_us).unwrap_or(f64::NAN),
            p99_us: med(&|r| r.p99_us).unwrap_or(f64::NAN),
            cpu_s_per_gib: med(&|r| r.cpu_s_per_gib).unwrap_or(f64::NAN),
            flush_mean_us: util::median(&fl),
            ops: v.iter().map(|r| r.ops).sum(),
            fdatasync_us: util::median(
                &v.iter().filter_map(|r| r.fdatasync_us).collect::<Vec<_>>(),
            ),
            link_write_us: util::median(
                &v.iter().filter_map(|r| r.link_write_us).collect::<Vec<_>>(),
            ),
            link_flush_us: util::median(
                &v.iter().filter_map(|r| r.link_flush_us).collect::<Vec<_>>(),
            ),
        })
    }

    pub fn to_json(self) -> Value {
        json!({
            "iops": self.iops,
            "mib_s": self.mib_s,
            "lat_mean_us": self.mean_us,
            "lat_p50_us": self.p50_us,
            "lat_p99_us": self.p99_us,
            "cpu_s_per_gib": self.cpu_s_per_gib,
            "flush_mean_us": self.flush_mean_us,
            "ops": self.ops,
            "local_fdatasync_mean_us": self.fdatasync_us,
            "replica_write_rtt_mean_us": self.link_write_us,
            "replica_flush_rtt_mean_us": self.link_flush_us,
        })
    }
}

/// Everything measured, for the report.
pub struct Results {
    pub cells: BTreeMap<(usize, usize), Vec<RunStats>>,
    pub rtt_us: Vec<f64>,
    pub resync: Option<Value>,
    /// The resync of mirror-base, measured interleaved with `resync`.
    pub resync_base: Option<Value>,
    /// Guest write latency during a resync against idle.
    pub resync_latency: Option<Value>,
    pub nbdcopy: Option<Value>,
    /// nbdcopy of as many bytes as the image (the initial full sync's peer).
    pub nbdcopy_full: Option<Value>,
    pub rss: Option<Value>,
    pub perf: Option<Value>,
    pub started: String,
    pub wall_secs: f64,
}

fn main() {
    let args = Args::parse();
    match real_main(args) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("bench: error: {e}");
            std::process::exit(1);
        }
    }
}

fn default_bin_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().ctx(|| "current_exe".to_string())?;
    let dir = exe
        .parent()
        .ctx(|| format!("{} has no parent directory", exe.display()))?;
    // A test or bench harness binary lives in target/<profile>/deps.
    Ok(if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().unwrap_or(dir).to_path_buf()
    } else {
        dir.to_path_buf()
    })
}

fn resolve(args: &Args, bin_dir: &Path) -> Result<Config> {
    let smoke = args.smoke;
    let base = args.baseline_bin_dir.is_some();
    let mut systems: Vec<System> = match &args.systems {
        None => ALL_SYSTEMS
            .iter()
            .copied()
            .filter(|&s| s != System::MirrorBase)
            .collect(),
        Some(list) => {
            let mut v: Vec<System> = Vec::new();
            for item in list {
                let s = System::parse_list(item.trim()).ctx(|| {
                    format!(
                        "unknown system {item:?} (known: qsd, qsd-best, local, mirror, \
                         mirror-base, qemu-mirror, qemu-mirror-unix, qemu-mirror-tcp)"
                    )
                })?;
                for x in s {
                    if !v.contains(&x) {
                        v.push(x);
                    }
                }
            }
            v
        }
    };
    if systems.contains(&System::MirrorBase) && !base {
        return Err("system mirror-base needs --baseline-bin-dir".to_string());
    }
    if base && !systems.contains(&System::MirrorBase) {
        systems.push(System::MirrorBase);
    }
    // Keep the canonical order (table columns).
    let systems: Vec<System> = ALL_SYSTEMS
        .iter()
        .copied()
        .filter(|s| systems.contains(s))
        .collect();
    let workloads: Vec<&'static Workload> = match &args.workloads {
        None => WORKLOADS.iter().collect(),
        Some(list) => {
            for w in list {
                if client::workload(w.trim()).is_none() {
                    let names: Vec<&str> = WORKLOADS.iter().map(|w| w.name).collect();
                    return Err(format!(
                        "unknown workload {w:?} (known: {})",
                        names.join(", ")
                    ));
                }
            }
            WORKLOADS
                .iter()
                .filter(|w| list.iter().any(|x| x.trim() == w.name))
                .collect()
        }
    };
    if systems.is_empty() || workloads.is_empty() {
        return Err("nothing to run: empty --systems or --workloads".to_string());
    }
    let secs = args.secs.unwrap_or(if smoke { 0.3 } else { 3.0 });
    if !(secs > 0.0 && secs <= 3600.0) {
        return Err(format!("--secs {secs}: must be in (0, 3600]"));
    }
    let rounds = args.rounds.unwrap_or(if smoke { 1 } else { 3 });
    if rounds == 0 || rounds > 1000 {
        return Err(format!("--rounds {rounds}: must be 1..=1000"));
    }
    let image_mb = args.image_mb.unwrap_or(if smoke { 64 } else { 1024 });
    if !(8..=1 << 20).contains(&image_mb) {
        return Err(format!("--image-mb {image_mb}: must be at least 8"));
    }
    let out = match &args.out {
        Some(o) => o.clone(),
        None => bin_dir.parent().unwrap_or(bin_dir).join("bench"),
    };
    let rss_secs = args.rss_secs.unwrap_or(if smoke { 2.0 } else { 600.0 });
    Ok(Config {
        smoke,
        rounds,
        secs,
        warmup: (secs * 0.2).min(0.5),
        image_bytes: image_mb << 20,
        systems,
        workloads,
        out,
        rss_secs,
        rss_segment: if smoke { 0.5 } else { 5.0 },
        resync: !args.no_resync,
        rss: !args.no_rss,
        perf: args.perf,
        perf_workloads: args
            .perf_workloads
            .iter()
            .map(|w| client::workload(w).ctx(|| format!("--perf-workloads: no workload {w}")))
            .collect::<Result<_>>()?,
        rtt_count: if smoke {
            args.rtt_count.min(2000)
        } else {
            args.rtt_count
        }
        .max(10),
        resync_iterations: rounds,
    })
}

/// Aborts the whole process (children die through PDEATHSIG) if the benchmark runs far longer
/// than it should: everything stops by itself.
fn watchdog(limit: Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!("bench: WATCHDOG: still running after {limit:?}; aborting");
        std::process::abort();
    });
}

fn real_main(args: Args) -> Result<()> {
    let t_start = Instant::now();
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => default_bin_dir()?,
    };
    let cfg = resolve(&args, &bin_dir)?;
    for b in ["vhost-mirror", "access-node"] {
        let p = bin_dir.join(b);
        if !p.is_file() {
            return Err(format!(
                "{} not found: build it next to the bench binary, e.g. `cargo build --release -p \
                 bench -p vhost-mirror -p access-node` (or pass --bin-dir)",
                p.display()
            ));
        }
        if let Some(d) = &args.baseline_bin_dir {
            let p = d.join(b);
            if !p.is_file() {
                return Err(format!(
                    "--baseline-bin-dir: {} not found (build the baseline with `cargo build \
                     --release -p vhost-mirror -p access-node` in its checkout)",
                    p.display()
                ));
            }
        }
    }
    let needs_qemu = cfg.systems.iter().any(|s| s.needs_qemu());
    for prog in ["qemu-storage-daemon", "qemu-nbd"] {
        if (needs_qemu || (prog == "qemu-nbd" && cfg.resync)) && !util::in_path(prog) {
            return Err(format!(
                "{prog} not found in PATH: install QEMU 10 (bash ci/setup.sh installs \
                 qemu-system-x86 and qemu-utils from bookworm-backports)"
            ));
        }
    }
    std::fs::create_dir_all(&cfg.out).ctx(|| format!("create {}", cfg.out.display()))?;
    let work = args
        .work_dir
        .clone()
        .unwrap_or_else(|| cfg.out.join("work"));
    prepare_work_dir(&work)?;
    let run_dir = std::env::temp_dir().join(format!("vmbench-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir).ctx(|| format!("create {}", run_dir.display()))?;
    let env = Env {
        bin_dir: bin_dir.clone(),
        baseline_bin_dir: args.baseline_bin_dir.clone(),
        work: work.clone(),
        run: run_dir.clone(),
        sync_timeout: Duration::from_secs(if cfg.smoke { 60 } else { 600 }),
    };

    // Watchdog: generous bound on the whole run.
    let runs = (cfg.rounds * cfg.workloads.len() * cfg.systems.len()) as f64;
    let est = runs * (cfg.secs + cfg.warmup + 2.0)
        + (cfg.rounds * 2 * cfg.systems.len()) as f64 * if cfg.smoke { 5.0 } else { 60.0 }
        + if cfg.rss { cfg.rss_secs * 1.5 } else { 0.0 }
        + if cfg.resync {
            (cfg.rounds as f64 * 60.0 + 120.0) * cfg.resync_systems().len() as f64
        } else {
            0.0
        }
        + if cfg.perf {
            60.0 * cfg.perf_workloads.len().max(cfg.workloads.len()) as f64
        } else {
            0.0
        };
    watchdog(Duration::from_secs_f64(if cfg.smoke {
        90.0_f64.max(est)
    } else {
        est * 2.0 + 600.0
    }));

    eprintln!(
        "bench: {} mode: {} round(s), {:.2}s per run (+{:.2}s warm-up), {} MiB images, systems \
         [{}], {} workload(s); out {}; work {}",
        if cfg.smoke { "smoke" } else { "full" },
        cfg.rounds,
        cfg.secs,
        cfg.warmup,
        cfg.image_bytes >> 20,
        cfg.systems
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(","),
        cfg.workloads.len(),
        cfg.out.display(),
        work.display()
    );

    let result = run_all(&cfg, &env);
    // Images are big: always remove them; logs stay on failure (or with --keep-work).
    remove_images(&work);
    let _ = std::fs::remove_dir_all(&run_dir);
    let results = match result {
        Ok(mut r) => {
            r.wall_secs = t_start.elapsed().as_secs_f64();
            r
        }
        Err(e) => {
            return Err(format!(
                "{e}\n(logs of the processes are in {})",
                work.display()
            ))
        }
    };
    if !args.keep_work {
        let _ = std::fs::remove_dir_all(&work);
    }

    let envinfo = environment_info(&env);
    let config_json = json!({
        "mode": if cfg.smoke { "smoke" } else { "full" },
        "rounds": cfg.rounds,
        "secs_per_run": cfg.secs,
        "warmup_secs": cfg.warmup,
        "image_mib": cfg.image_bytes >> 20,
        "systems": cfg.systems.iter().map(|s| s.name()).collect::<Vec<_>>(),
        "baseline_bin_dir": env.baseline_bin_dir.as_ref().map(|d| d.display().to_string()),
        "workloads": cfg.workloads.iter().map(|w| w.name).collect::<Vec<_>>(),
        "rss_secs": if cfg.rss { Some(cfg.rss_secs) } else { None },
        "rtt_count": cfg.rtt_count,
        "client": "libblkio (Rust crate blkio 0.5) driver virtio-blk-vhost-user, queue-size 128, \
                   one thread per queue, completions waited for on the eventfd",
    });
    let rep = report::build(&cfg.systems, &cfg.workloads, &results, config_json, envinfo);
    let json_path = cfg.out.join("bench.json");
    let md_path = cfg.out.join("bench.md");
    let json_text = serde_json::to_string_pretty(&rep.json).ctx(|| "serialize".to_string())?;
    std::fs::write(&json_path, json_text + "\n")
        .ctx(|| format!("write {}", json_path.display()))?;
    std::fs::write(&md_path, &rep.markdown).ctx(|| format!("write {}", md_path.display()))?;
    println!("{}", rep.markdown);
    println!(
        "bench: tables written to {} and {} ({:.0}s)",
        md_path.display(),
        json_path.display(),
        results.wall_secs
    );
    Ok(())
}

const WORK_MARKER: &str = ".vhost-mirror-bench-work";

/// Creates the work directory, or empties one this benchmark made before (never anything else).
fn prepare_work_dir(work: &Path) -> Result<()> {
    if work.exists() {
        let marked = work.join(WORK_MARKER).exists();
        let empty = std::fs::read_dir(work)
            .ctx(|| format!("read {}", work.display()))?
            .next()
            .is_none();
        if !marked && !empty {
            return Err(format!(
                "work directory {} exists and was not made by this benchmark; choose another \
                 --work-dir",
                work.display()
            ));
        }
        std::fs::remove_dir_all(work).ctx(|| format!("clear {}", work.display()))?;
    }
    std::fs::create_dir_all(work).ctx(|| format!("create {}", work.display()))?;
    std::fs::write(work.join(WORK_MARKER), b"").ctx(|| "write marker".to_string())
}

fn remove_images(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            remove_images(&p);
        } else if p.extension().is_some_and(|x| x == "img") {
            let _ = std::fs::remove_file(&p);
        }
    }
}

fn environment_info(env: &Env) -> Value {
    let first_line = |prog: &str, args: &[&str]| -> Option<String> {
        util::run_capture(prog, Command::new(prog).args(args), Duration::from_secs(10))
            .ok()
            .filter(|(st, _, _)| st.success())
            .map(|(_, out, _)| out.lines().next().unwrap_or("").trim().to_string())
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|x| x.trim().to_string())
    });
    json!({
        "kernel": first_line("uname", &["-r"]),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "cpu_model": cpu,
        "qemu_storage_daemon": util::version_of("qemu-storage-daemon"),
        "qemu_nbd": util::version_of("qemu-nbd"),
        "nbdcopy": util::version_of("nbdcopy"),
        "vhost_mirror": util::version_of(&env.bin(System::Mirror, "vhost-mirror").display().to_string()),
        "vhost_mirror_baseline": env.baseline_bin_dir.as_ref().and_then(|_| {
            util::version_of(&env.bin(System::MirrorBase, "vhost-mirror").display().to_string())
        }),
    })
}

/// Loopback TCP ping-pong: mean round-trip time in µs of `n` 1-byte round trips (TCP_NODELAY,
/// blocking reads on both sides, as the backends do).
fn tcp_rtt_us(n: usize) -> Result<f64> {
    let l = TcpListener::bind("127.0.0.1:0").ctx(|| "bind".to_string())?;
    let addr = l.local_addr().ctx(|| "local_addr".to_string())?;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = l.accept()?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut b = [0u8; 1];
        loop {
            if s.read(&mut b)? == 0 {
                return Ok(());
            }
            s.write_all(&b)?;
        }
    });
    let mut c = TcpStream::connect(addr).ctx(|| format!("connect {addr}"))?;
    c.set_nodelay(true).ctx(|| "nodelay".to_string())?;
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .ctx(|| "timeout".to_string())?;
    let mut b = [0u8; 1];
    let mut once = |c: &mut TcpStream| -> Result<()> {
        c.write_all(&b).ctx(|| "rtt write".to_string())?;
        c.read_exact(&mut b).ctx(|| "rtt read".to_string())?;
        b[0] = b[0].wrapping_add(1);
        Ok(())
    };
    for _ in 0..(n / 10).max(10) {
        once(&mut c)?;
    }
    let t0 = Instant::now();
    for _ in 0..n {
        once(&mut c)?;
    }
    let us = t0.elapsed().as_secs_f64() * 1e6 / n as f64;
    drop(c);
    let _ = server.join();
    Ok(us)
}

fn run_all(cfg: &Config, env: &Env) -> Result<Results> {
    let started = format!("{:?}", std::time::SystemTime::now());
    let secret = env.secret();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(
            &secret,
            format!("the benchmark secret {}\n", std::process::id()),
        )
        .ctx(|| format!("write {}", secret.display()))?;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))
            .ctx(|| format!("chmod {}", secret.display()))?;
    }
    let t = Instant::now();
    systems::prepare_images(env, &cfg.systems, cfg.image_bytes)?;
    eprintln!(
        "bench: images ready ({} x {} MiB) in {:.1}s",
        cfg.systems.len(),
        cfg.image_bytes >> 20,
        t.elapsed().as_secs_f64()
    );

    let mut res = Results {
        cells: BTreeMap::new(),
        rtt_us: Vec::new(),
        resync: None,
        resync_base: None,
        resync_latency: None,
        nbdcopy: None,
        nbdcopy_full: None,
        rss: None,
        perf: None,
        started,
        wall_secs: 0.0,
    };
    // Workload groups by the number of queues the backend is started with.
    let mut groups: Vec<(usize, Vec<(usize, &'static Workload)>)> = Vec::new();
    for (wi, w) in cfg.workloads.iter().enumerate() {
        match groups.iter_mut().find(|g| g.0 == w.queues) {
            Some(g) => g.1.push((wi, w)),
            None => groups.push((w.queues, vec![(wi, w)])),
        }
    }
    let secs = Duration::from_secs_f64(cfg.secs);
    let warmup = Duration::from_secs_f64(cfg.warmup);
    for round in 0..cfg.rounds {
        eprintln!("bench: round {}/{}", round + 1, cfg.rounds);
        for (nq, wls) in &groups {
            let mut insts: Vec<Instance> = Vec::new();
            for &s in &cfg.systems {
                eprintln!("bench:   starting {} ({nq} queue(s))", s.name());
                insts.push(systems::start(env, s, *nq)?);
            }
            for &(wi, wl) in wls {
                // The loopback RTT moves with the machine's state (on a VM: whether a wakeup
                // crosses vCPUs), so it is sampled next to every workload, not once.
                let rtt = tcp_rtt_us(cfg.rtt_count)?;
                eprintln!("bench:   loopback TCP RTT {rtt:.1} us");
                res.rtt_us.push(rtt);
                let n = insts.len();
                for k in 0..n {
                    let si = (k + round + wi) % n;
                    let inst = &mut insts[si];
                    inst.ensure_ready(env.sync_timeout)?;
                    let before = status_totals(inst);
                    let m = measure_run(inst, wl, warmup, secs)?;
                    let st = RunStats::from_measure(&m).with_breakdown(before, status_totals(inst));
                    eprintln!(
                        "bench:   r{} {:<26} {:<17} {:>9.0} IOPS {:>8.1} MiB/s  mean {:>7.1} p50 \
                         {:>7.1} p99 {:>8.1} us  cpu {:>6.2} s/GiB{}",
                        round + 1,
                        wl.name,
                        inst.system.name(),
                        st.iops,
                        st.mib_s,
                        st.mean_us,
                        st.p50_us,
                        st.p99_us,
                        st.cpu_s_per_gib,
                        st.flush_mean_us
                            .map_or(String::new(), |f| format!("  flush {f:.0} us"))
                    );
                    let sys_idx = ALL_SYSTEMS
                        .iter()
                        .position(|&x| x == inst.system)
                        .unwrap_or(0);
                    res.cells.entry((wi, sys_idx)).or_default().push(st);
                    inst.sync_files();
                }
            }
            for inst in insts {
                inst.stop();
            }
        }
    }

    if cfg.perf {
        let wls = if cfg.perf_workloads.is_empty() {
            missed_workloads(cfg, &res)
        } else {
            cfg.perf_workloads.clone()
        };
        res.perf = Some(profile(cfg, env, &wls)?);
    }
    if cfg.resync || cfg.rss {
        // The memory measurement needs this build's pair; the resync runs both builds'.
        let resync_systems = if cfg.resync {
            cfg.resync_systems()
        } else {
            vec![System::Mirror]
        };
        let iterations = if cfg.resync { cfg.resync_iterations } else { 0 };
        let (rs, mut pair) = resync::measure(env, &resync_systems, cfg.image_bytes, iterations)?;
        if cfg.resync {
            let mut rs = rs.into_iter();
            let rs_main = rs.next().ctx(|| "resync: no result".to_string())?;
            let changed = rs_main
                .get("changed_regions")
                .and_then(Value::as_u64)
                .unwrap_or(0)
                * resync::REGION;
            res.resync = Some(rs_main);
            eprintln!("bench: guest write latency during a resync");
            res.resync_latency =
                Some(pair.latency_during_resync(env, cfg.secs.min(2.0), cfg.resync_iterations)?);
            res.resync_base = rs.next();
            res.nbdcopy = Some(resync::nbdcopy(env, changed, cfg.resync_iterations)?);
            res.nbdcopy_full = Some(resync::nbdcopy(
                env,
                cfg.image_bytes,
                cfg.resync_iterations.min(3),
            )?);
        }
        if cfg.rss {
            eprintln!("bench: resident memory under {:.0}s of load", cfg.rss_secs);
            res.rss = Some(resync::rss(&mut pair, cfg.rss_secs, cfg.rss_segment)?);
        }
        pair.stop();
    }
    Ok(res)
}

/// vhost-mirror's totals of local fdatasyncs, replica write acks and replica flush acks (each
/// a count, then nanoseconds), if it has a control socket and reports them.
fn status_totals(inst: &Instance) -> Option<[u64; 6]> {
    let v = systems::control_status(inst.control.as_ref()?).ok()?;
    v.get("local_fdatasyncs")?;
    Some(
        [
            "local_fdatasyncs",
            "local_fdatasync_ns",
            "link_write_acks",
            "link_write_ns",
            "link_flush_acks",
            "link_flush_ns",
        ]
        .map(|k| systems::status_u64(&v, k)),
    )
}

/// One measured run on a running system: connect, run, disconnect.
fn measure_run(
    inst: &mut Instance,
    wl: &Workload,
    warmup: Duration,
    secs: Duration,
) -> Result<client::Measure> {
    let mut c = Client::connect(
        &inst.socket,
        wl.queues,
        wl.bs * wl.qd,
        Duration::from_secs(10),
    )
    .map_err(|e| format!("{}: {e}", inst.system.name()))?;
    let m = c
        .run(wl, warmup, secs, &|| inst.cpu_ticks(), &mut || {})
        .map_err(|e| format!("{} {}: {e}", inst.system.name(), wl.name))?;
    drop(c);
    inst.check_running()?;
    Ok(m)
}

/// The workloads of this run with a missed issue-10 target (the report's own verdicts), in
/// the run's order; randwrite-4k-qd32 if none.
fn missed_workloads(cfg: &Config, res: &Results) -> Vec<&'static Workload> {
    let rep = report::build(&cfg.systems, &cfg.workloads, res, Value::Null, Value::Null);
    let missed: Vec<String> = rep.json["issue10_ratios"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|r| r["met"] == false)
                .filter_map(|r| r["workload"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let wls: Vec<&'static Workload> = cfg
        .workloads
        .iter()
        .copied()
        .filter(|w| missed.iter().any(|m| m == w.name))
        .collect();
    if wls.is_empty() {
        client::workload("randwrite-4k-qd32").into_iter().collect()
    } else {
        wls
    }
}

/// `perf record -g` of vhost-mirror (and access-node) during each of `--perf-workloads`, on
/// mirror, mirror-base and local; returns the top symbols.
fn profile(cfg: &Config, env: &Env, wls: &[&'static Workload]) -> Result<Value> {
    if !util::in_path("perf") {
        return Ok(json!({"available": false, "reason": "perf not found"}));
    }
    let secs = cfg.secs.max(if cfg.smoke { 0.5 } else { 5.0 });
    let mut runs = Vec::new();
    for &wl in wls {
        runs.push(profile_one(cfg, env, wl, secs)?);
    }
    Ok(json!({"available": true, "secs": secs, "runs": runs}))
}

/// The profile of one workload on each of mirror, mirror-base and local.
fn profile_one(cfg: &Config, env: &Env, wl: &'static Workload, secs: f64) -> Result<Value> {
    let mut out = serde_json::Map::new();
    for s in [System::Mirror, System::MirrorBase, System::Local] {
        if !cfg.systems.contains(&s) {
            continue;
        }
        let mut inst = systems::start(env, s, wl.queues)?;
        let mut perfs = Vec::new();
        for who in ["vhost-mirror", "access-node"] {
            let Some(pid) = inst.proc_pid(who) else {
                continue;
            };
            let data = cfg
                .out
                .join(format!("perf-{}-{}-{who}.data", wl.name, s.name()));
            // perf keeps the previous file as .old: start clean instead.
            let _ = std::fs::remove_file(&data);
            let _ = std::fs::remove_file(data.with_extension("data.old"));
            let log = env
                .work
                .join(format!("perf-{}-{}-{who}.log", wl.name, s.name()));
            let g = ChildGuard::spawn(
                "perf",
                Command::new("perf")
                    .arg("record")
                    .arg("-g")
                    .arg("-o")
                    .arg(&data)
                    .arg("-p")
                    .arg(pid.to_string())
                    .arg("--")
                    .arg("sleep")
                    .arg(format!("{:.1}", secs + 0.3)),
                Some(&log),
            )?;
            perfs.push((who, data, g));
        }
        std::thread::sleep(Duration::from_millis(300));
        inst.ensure_ready(env.sync_timeout)?;
        let m = measure_run(
            &mut inst,
            wl,
            Duration::from_millis(200),
            Duration::from_secs_f64(secs),
        )?;
        let st = RunStats::from_measure(&m);
        let mut sys_out = serde_json::Map::new();
        sys_out.insert("iops".into(), json!(st.iops));
        for (who, data, mut g) in perfs {
            if g.wait_timeout(Duration::from_secs(60)).is_none() {
                g.kill();
            }
            let (ok, outp, err) = util::run_capture(
                "perf report",
                Command::new("perf")
                    .arg("report")
                    .arg("-i")
                    .arg(&data)
                    .arg("--stdio")
                    .arg("--no-children")
                    .arg("--sort")
                    .arg("sym")
                    .arg("-g")
                    .arg("none")
                    .arg("--percent-limit")
                    .arg("0.5"),
                Duration::from_secs(120),
            )?;
            let txt = cfg
                .out
                .join(format!("perf-{}-{}-{who}.txt", wl.name, s.name()));
            let _ = std::fs::write(&txt, &outp);
            let top: Vec<Value> = outp
                .lines()
                .filter_map(|l| {
                    let t = l.trim();
                    let (pct, rest) = t.split_once('%')?;
                    let pct: f64 = pct.trim().parse().ok()?;
                    Some(json!({"pct": pct, "symbol": rest.trim()}))
                })
                .take(20)
                .collect();
            if !ok.success() || top.is_empty() {
                eprintln!("bench: perf report for {who} gave nothing: {err}");
            }
            sys_out.insert(
                who.to_string(),
                json!({"data": data.display().to_string(), "report": txt.display().to_string(), "top": top}),
            );
        }
        out.insert(s.name().to_string(), Value::Object(sys_out));
        inst.stop();
    }
    Ok(json!({"workload": wl.name, "systems": out}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn systems_of(args: &[&str]) -> Result<Vec<&'static str>> {
        let a = Args::try_parse_from(std::iter::once("bench").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        let cfg = resolve(&a, Path::new("/nonexistent/target/release"))?;
        Ok(cfg.systems.iter().map(|s| s.name()).collect())
    }

    #[test]
    fn qsd_keeps_its_meaning_and_qsd_best_runs_by_default() {
        assert_eq!(systems_of(&["--systems", "qsd"]).unwrap(), ["qsd"]);
        assert_eq!(
            systems_of(&["--systems", "qsd-best"]).unwrap(),
            ["qsd-best"]
        );
        assert_eq!(
            systems_of(&["--systems", "qsd-best,local,qsd"]).unwrap(),
            ["qsd", "qsd-best", "local"]
        );
        let all = systems_of(&[]).unwrap();
        assert!(all.contains(&"qsd") && all.contains(&"qsd-best"), "{all:?}");
    }

    #[test]
    fn mirror_base_runs_only_with_a_baseline_and_always_with_one() {
        assert!(!systems_of(&[]).unwrap().contains(&"mirror-base"));
        assert!(systems_of(&["--systems", "mirror,mirror-base"]).is_err());
        assert_eq!(
            systems_of(&[
                "--baseline-bin-dir",
                "/b",
                "--systems",
                "qemu-mirror,mirror-base,mirror"
            ])
            .unwrap(),
            [
                "mirror",
                "mirror-base",
                "qemu-mirror-unix",
                "qemu-mirror-tcp"
            ]
        );
        assert_eq!(
            systems_of(&["--baseline-bin-dir", "/b", "--systems", "mirror"]).unwrap(),
            ["mirror", "mirror-base"]
        );
        assert_eq!(
            systems_of(&["--baseline-bin-dir", "/b"]).unwrap().len(),
            ALL_SYSTEMS.len()
        );
    }
}
