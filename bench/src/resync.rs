//! Resync throughput (vhost-mirror + access-node after the replica was away while 10% of the
//! regions changed) against nbdcopy moving the same number of bytes on loopback, and resident
//! memory of both programs under a long mixed load.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::client::{self, Client};
use crate::systems::{self, control_status, is_in_sync, status_str, status_u64, Env, System};
use crate::util::{self, ChildGuard, Ctx, Mem, Result, Rng};

/// One out-of-sync bitmap region (resync copies whole regions).
pub const REGION: u64 = 64 * 1024;

/// A vhost-mirror + access-node pair whose access-node can be stopped and restarted, with its
/// resync measurements so far.
pub struct Pair {
    system: System,
    tag: &'static str,
    vm: ChildGuard,
    node: Option<ChildGuard>,
    socket: PathBuf,
    control: PathBuf,
    port: u16,
    replica: PathBuf,
    primary: PathBuf,
    size: u64,
    initial: Value,
    iters: Vec<Value>,
}

impl Pair {
    /// Starts system `s` (mirror or mirror-base) on a fresh image of `size` bytes and waits
    /// for (and times) the initial full sync.
    fn start(env: &Env, s: System, size: u64) -> Result<Pair> {
        let tag = if s == System::MirrorBase {
            "resync-base"
        } else {
            "resync"
        };
        let dir = env.work.join(tag);
        std::fs::create_dir_all(&dir).ctx(|| format!("create {}", dir.display()))?;
        let primary = dir.join("primary.img");
        let replica = dir.join("replica.img");
        let _ = std::fs::remove_file(&replica);
        util::write_random_file(&primary, size, 0x7e5c)?;
        // SAFETY: sync(2) has no preconditions.
        unsafe { libc::sync() };
        let port = util::free_port()?;
        let (node, _) = systems::spawn_access_node(env, s, tag, &replica, port)?;
        let (vm, socket, control) =
            systems::spawn_vhost_mirror(env, s, tag, &primary, 1, Some(port))?;
        let mut pair = Pair {
            system: s,
            tag,
            vm,
            node: Some(node),
            socket,
            control,
            port,
            replica,
            primary,
            size,
            initial: Value::Null,
            iters: Vec::new(),
        };
        let t0 = Instant::now();
        let st = pair.wait_status("the initial full sync", env.sync_timeout, is_in_sync)?;
        let secs = t0.elapsed().as_secs_f64();
        let bytes = status_u64(&st, "resync_total_bytes");
        eprintln!(
            "bench: resync ({}): initial full sync of {} MiB in {secs:.2}s",
            s.name(),
            bytes >> 20
        );
        pair.initial = json!({"bytes": bytes, "secs": secs, "mib_s": mib_s(bytes, secs)});
        Ok(pair)
    }

    fn start_node(&mut self, env: &Env) -> Result<()> {
        let (n, _) =
            systems::spawn_access_node(env, self.system, self.tag, &self.replica, self.port)?;
        self.node = Some(n);
        Ok(())
    }

    fn check(&mut self) -> Result<()> {
        self.vm.check_running()?;
        if let Some(n) = &mut self.node {
            n.check_running()?;
        }
        Ok(())
    }

    fn status(&mut self) -> Result<Value> {
        self.check()?;
        control_status(&self.control)
    }

    fn wait_status(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.status()?;
            if pred(&st) {
                return Ok(st);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "timed out after {timeout:?} waiting for {what}; status: {st}"
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn vm_pid(&self) -> u32 {
        self.vm.pid()
    }

    pub fn node_pid(&self) -> Option<u32> {
        self.node.as_ref().map(ChildGuard::pid)
    }

    pub fn stop(mut self) {
        self.vm.terminate(Duration::from_secs(30));
        if let Some(mut n) = self.node.take() {
            n.terminate(Duration::from_secs(30));
        }
        let _ = std::fs::remove_file(&self.primary);
        let _ = std::fs::remove_file(&self.replica);
    }

    /// Measurement `it`: the replica stops, 10% of the regions (the same ones for every pair
    /// in measurement `it`) get random data, the replica comes back; times the resync.
    fn resync_once(&mut self, env: &Env, it: usize) -> Result<()> {
        let regions = self.size / REGION;
        let changed = (regions / 10).max(1);
        let name = self.system.name();
        // The guest flushes (a replica only counts as having what it flushed: ranges it has
        // not flushed yet are out of sync when it goes away), then the replica is stopped.
        {
            let mut c = Client::connect(&self.socket, 1, REGION as usize, Duration::from_secs(10))?;
            c.write_offsets(&[], REGION as usize, 1, 0)?;
        }
        let oos_flushed = status_u64(&self.status()?, "out_of_sync_bytes");
        // Stop the replica, and wait until the primary noticed.
        if let Some(mut n) = self.node.take() {
            n.terminate(Duration::from_secs(30));
        }
        let st = self.wait_status(
            "the primary to see the replica gone",
            Duration::from_secs(30),
            |v| status_str(v, "peer_state") != "connected",
        )?;
        let oos_stopped = status_u64(&st, "out_of_sync_bytes");
        if oos_flushed + oos_stopped > 0 {
            eprintln!(
                "bench: resync ({name}) {}: NOTE: {} MiB out of sync after the guest's flush, {} \
                 MiB after the replica stopped (before any write)",
                it + 1,
                oos_flushed >> 20,
                oos_stopped >> 20
            );
        }
        // 10% of the regions, chosen at random, get random data.
        let mut rng = Rng::new(0x1000 + it as u64);
        let mut idx: Vec<u64> = (0..regions).collect();
        for i in 0..changed as usize {
            let j = i + usize::try_from(rng.below(regions - i as u64)).unwrap_or(0);
            idx.swap(i, j);
        }
        let mut offs: Vec<u64> = idx[..changed as usize].iter().map(|r| r * REGION).collect();
        offs.sort_unstable();
        {
            let mut c = Client::connect(
                &self.socket,
                1,
                8 * REGION as usize,
                Duration::from_secs(10),
            )?;
            c.write_offsets(&offs, REGION as usize, 8, 0xd1ff + it as u64)?;
        }
        let st = self.status()?;
        let oos = status_u64(&st, "out_of_sync_bytes");
        let before = status_u64(&st, "resync_total_bytes");
        let log_before = self.vm.log_text().len();

        // Bring the replica back and watch the resync.
        let t_restart = Instant::now();
        self.start_node(env)?;
        let t_listening = Instant::now();
        let mut t_connected: Option<Instant> = None;
        let deadline = Instant::now() + env.sync_timeout;
        let st = loop {
            let st = self.status()?;
            let now = Instant::now();
            if t_connected.is_none()
                && (status_str(&st, "peer_state") == "connected"
                    || st.get("resyncing").and_then(Value::as_bool) == Some(true))
            {
                t_connected = Some(now);
            }
            if is_in_sync(&st) {
                break st;
            }
            if now >= deadline {
                return Err(format!(
                    "{name}: resync did not finish within {:?}; status: {st}",
                    env.sync_timeout
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let t_done = Instant::now();
        let bytes = status_u64(&st, "resync_total_bytes").saturating_sub(before);
        let t_conn = t_connected.unwrap_or(t_done);
        let secs = (t_done - t_conn).as_secs_f64();
        let log = self.vm.log_text();
        let logged = log.get(log_before..).and_then(parse_resync_log);
        eprintln!(
            "bench: resync ({name}) {}: {changed} regions ({} MiB) written, out of sync {} MiB; \
             resynced {} MiB in {secs:.3}s after reconnect ({:.0} MiB/s; {:.2}s after restart){}",
            it + 1,
            (changed * REGION) >> 20,
            oos >> 20,
            bytes >> 20,
            mib_s(bytes, secs),
            (t_done - t_restart).as_secs_f64(),
            logged.map_or(String::new(), |(b, s)| format!(
                "; vhost-mirror's log: {} MiB in {s:.3}s = {:.0} MiB/s",
                b >> 20,
                mib_s(b, s)
            ))
        );
        self.iters.push(json!({
            "changed_regions": changed,
            "changed_bytes": changed * REGION,
            "out_of_sync_bytes": oos,
            "out_of_sync_bytes_before_writes": oos_stopped,
            "resync_bytes": bytes,
            "secs_reconnect_to_in_sync": secs,
            "secs_restart_to_in_sync": (t_done - t_restart).as_secs_f64(),
            "secs_node_start": (t_listening - t_restart).as_secs_f64(),
            "mib_s": mib_s(bytes, secs),
            "log_bytes": logged.map(|l| l.0),
            "log_secs": logged.map(|l| l.1),
            "log_mib_s": logged.map(|(b, s)| mib_s(b, s)),
        }));
        Ok(())
    }

    /// One QD1 4k random-write run of `secs` on the guest's side: (p50 us, p99 us, IOPS).
    fn guest_latency(&mut self, secs: f64) -> Result<(f64, f64, f64)> {
        let wl = client::workload("randwrite-4k-qd1").ctx(|| "workload".to_string())?;
        let mut c = Client::connect(&self.socket, 1, wl.bs * wl.qd, Duration::from_secs(10))?;
        let m = c.run(
            wl,
            Duration::from_millis(100),
            Duration::from_secs_f64(secs),
            &|| Ok(0),
            &mut || {},
        )?;
        Ok((
            util::quantile_sorted(&m.lat_ns, 0.5) / 1000.0,
            util::quantile_sorted(&m.lat_ns, 0.99) / 1000.0,
            m.ops as f64 / m.secs,
        ))
    }

    /// Guest write latency during a resync against idle: each round measures QD1 4k random
    /// writes on the pair in sync, then replaces the replica by an empty one (a full sync of
    /// the whole image) and measures the same load while that resync runs, and the resync's
    /// rate meanwhile (`resync_sent_bytes`). A round counts only if the resync lasted the
    /// whole window.
    pub fn latency_during_resync(&mut self, env: &Env, secs: f64, rounds: usize) -> Result<Value> {
        let mut out = Vec::new();
        for r in 0..rounds {
            // Both measurements start with no dirty data queued for the disk (writeback of
            // the last resync would otherwise land on either).
            // SAFETY: sync(2) has no preconditions.
            unsafe { libc::sync() };
            let (i50, i99, iiops) = self.guest_latency(secs)?;
            if let Some(mut n) = self.node.take() {
                n.terminate(Duration::from_secs(30));
            }
            for suffix in ["", ".meta", ".bitmap", ".al", ".verify"] {
                let mut f = self.replica.clone().into_os_string();
                f.push(suffix);
                let _ = std::fs::remove_file(f);
            }
            self.wait_status(
                "the primary to see the replica gone",
                Duration::from_secs(30),
                |v| status_str(v, "peer_state") != "connected",
            )?;
            // SAFETY: as above.
            unsafe { libc::sync() };
            self.start_node(env)?;
            let st = self.wait_status("the resync to start", env.sync_timeout, |v| {
                v.get("resyncing").and_then(Value::as_bool) == Some(true)
            })?;
            let t0 = Instant::now();
            let sent0 = status_u64(&st, "resync_sent_bytes");
            let (d50, d99, diops) = self.guest_latency(secs)?;
            let st = self.status()?;
            let el = t0.elapsed().as_secs_f64();
            let sent = status_u64(&st, "resync_sent_bytes").saturating_sub(sent0);
            let whole = st.get("resyncing").and_then(Value::as_bool) == Some(true);
            let t1 = Instant::now();
            let left = status_u64(&st, "out_of_sync_bytes");
            self.wait_status("the resync to finish", env.sync_timeout, is_in_sync)?;
            let rest = t1.elapsed().as_secs_f64();
            eprintln!(
                "bench: guest QD1 4k writes {}: idle p50 {i50:.0} p99 {i99:.0} us ({iiops:.0} IOPS); \
                 during resync p50 {d50:.0} p99 {d99:.0} us ({diops:.0} IOPS), p99 ratio {:.2}; \
                 resync meanwhile {:.0} MiB/s, then alone {:.0} MiB/s{}",
                r + 1,
                d99 / i99,
                mib_s(sent, el),
                mib_s(left, rest),
                if whole { "" } else { " (NOTE: the resync ended within the window)" }
            );
            out.push(json!({
                "idle_p50_us": i50, "idle_p99_us": i99, "idle_iops": iiops,
                "resync_p50_us": d50, "resync_p99_us": d99, "resync_iops": diops,
                "p99_ratio": d99 / i99,
                "resync_mib_s_under_load": mib_s(sent, el),
                "resync_mib_s_after_load": mib_s(left, rest),
                "resync_lasted_the_window": whole,
            }));
        }
        let med = |k: &str| {
            let v: Vec<f64> = out
                .iter()
                .filter(|r| {
                    r.get("resync_lasted_the_window").and_then(Value::as_bool) == Some(true)
                })
                .filter_map(|r| r.get(k).and_then(Value::as_f64))
                .collect();
            util::median(&v)
        };
        Ok(json!({
            "rounds": out,
            "secs": secs,
            "median_p99_ratio": med("p99_ratio"),
            "median_idle_p99_us": med("idle_p99_us"),
            "median_resync_p99_us": med("resync_p99_us"),
            "median_resync_mib_s_under_load": med("resync_mib_s_under_load"),
            "median_resync_mib_s_after_load": med("resync_mib_s_after_load"),
            "method": "QD1 4k random writes (the bench client, one queue) for the window, idle \
                       (pair in sync), then while a full sync to an emptied replica runs; \
                       the resync's rate from resync_sent_bytes over the window, and from \
                       out_of_sync_bytes left over the time to finish alone",
        }))
    }

    /// The JSON section of this pair's measurements.
    fn summary(&self) -> Value {
        let regions = self.size / REGION;
        let rates: Vec<f64> = self
            .iters
            .iter()
            .filter_map(|v| v.get("mib_s").and_then(Value::as_f64))
            .collect();
        let log_rates: Vec<f64> = self
            .iters
            .iter()
            .filter_map(|v| v.get("log_mib_s").and_then(Value::as_f64))
            .collect();
        json!({
            "system": self.system.name(),
            "image_bytes": self.size,
            "region_bytes": REGION,
            "regions": regions,
            "changed_regions": (regions / 10).max(1),
            "initial_full_sync": self.initial,
            "iterations": self.iters,
            "median_mib_s": util::median(&rates),
            "median_log_mib_s": util::median(&log_rates),
            "measure": "bytes = the increase of resync_total_bytes; time = from the first status poll (1 ms \
                        interval) that shows the peer connected until the first that shows it in sync \
                        (excludes the primary's reconnect backoff and the node's start-up)",
        })
    }
}

/// Parses vhost-mirror's "resync finished: N bytes in X.XXs" log line (the last one in `log`).
fn parse_resync_log(log: &str) -> Option<(u64, f64)> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("resync finished: "))?;
    let rest = &line[line.find("resync finished: ")? + "resync finished: ".len()..];
    let mut it = rest.split_whitespace();
    let bytes: u64 = it.next()?.parse().ok()?;
    let _ = it.next(); // "bytes"
    let _ = it.next(); // "in"
    let secs: f64 = it.next()?.trim_end_matches(['s', ';', ',']).parse().ok()?;
    Some((bytes, secs))
}

fn mib_s(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 / secs / f64::from(1u32 << 20)
    } else {
        f64::NAN
    }
}

/// Resync after 10% of the regions changed while the replica was stopped, `iterations` times,
/// for each of `systems` (mirror and/or mirror-base, each its own pair on its own image of
/// `size` bytes; the iterations interleaved between the pairs). Returns one JSON section per
/// system, in order, and the first system's pair, running and in sync (the others are stopped).
pub fn measure(
    env: &Env,
    systems: &[System],
    size: u64,
    iterations: usize,
) -> Result<(Vec<Value>, Pair)> {
    let mut pairs = Vec::new();
    for &s in systems {
        pairs.push(Pair::start(env, s, size)?);
    }
    let n = pairs.len();
    for it in 0..iterations {
        for k in 0..n {
            pairs[(k + it) % n].resync_once(env, it)?;
        }
    }
    let out = pairs.iter().map(Pair::summary).collect();
    let mut rest = pairs.into_iter();
    let first = rest
        .next()
        .ctx(|| "resync: no system to measure".to_string())?;
    for p in rest {
        p.stop();
    }
    Ok((out, first))
}

/// nbdcopy of a file of `bytes` random bytes from a qemu-nbd export to a qemu-nbd export, both
/// on loopback TCP, `iterations` times. `None` (with the reason) if nbdcopy is not installed.
pub fn nbdcopy(env: &Env, bytes: u64, iterations: usize) -> Result<Value> {
    if !util::in_path("nbdcopy") {
        return Ok(
            json!({"available": false, "reason": "nbdcopy not found (apt-get install libnbd-bin)"}),
        );
    }
    let dir = env.work.join("nbdcopy");
    std::fs::create_dir_all(&dir).ctx(|| format!("create {}", dir.display()))?;
    let src = dir.join("src.img");
    let dst = dir.join("dst.img");
    util::write_random_file(&src, bytes, 0x0bdc)?;
    util::sparse_file(&dst, bytes)?;
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    let (mut s_nbd, s_srv) = systems::spawn_qemu_nbd(env, "nbdcopy-src", &src, true, true)?;
    let (mut d_nbd, d_srv) = systems::spawn_qemu_nbd(env, "nbdcopy-dst", &dst, true, false)?;
    let uri = |v: &Value| {
        format!(
            "nbd://127.0.0.1:{}",
            v.get("port").and_then(Value::as_str).unwrap_or("0")
        )
    };
    let (su, du) = (uri(&s_srv), uri(&d_srv));
    let version = util::version_of("nbdcopy");
    let mut runs = Vec::new();
    for i in 0..iterations.max(1) {
        let t0 = Instant::now();
        let (st, out, err) = util::run_capture(
            "nbdcopy",
            Command::new("nbdcopy").arg(&su).arg(&du),
            Duration::from_secs(300),
        )?;
        let secs = t0.elapsed().as_secs_f64();
        if !st.success() {
            return Err(format!("nbdcopy {su} {du} failed ({st}): {out}{err}"));
        }
        util::datasync(&dst);
        eprintln!(
            "bench: nbdcopy {}: {} MiB in {secs:.3}s = {:.0} MiB/s",
            i + 1,
            bytes >> 20,
            mib_s(bytes, secs)
        );
        runs.push(mib_s(bytes, secs));
    }
    s_nbd.terminate(Duration::from_secs(10));
    d_nbd.terminate(Duration::from_secs(10));
    let _ = std::fs::remove_file(&src);
    let _ = std::fs::remove_file(&dst);
    Ok(json!({
        "available": true,
        "version": version,
        "bytes": bytes,
        "runs_mib_s": runs,
        "median_mib_s": util::median(&runs),
        "method": "nbdcopy (default options: its own multi-connection/request parallelism) from a \
                   read-only qemu-nbd export of a file holding exactly the changed bytes (random data) \
                   to a qemu-nbd export of an empty file of that size, both over loopback TCP, \
                   page cache to page cache: the same number of bytes over the same kind of link as \
                   the resync, but contiguous (nbdcopy needs no bitmap and reads one sequential file), \
                   so it is the upper bound a resync could reach",
    }))
}

/// Resident memory of vhost-mirror and access-node sampled every ~100 ms during `secs` of a
/// rotating load (4k random writes QD32, 1M sequential writes QD4, 4k random reads QD32, 4k
/// random writes with flushes), in segments of `segment`.
pub fn rss(pair: &mut Pair, secs: f64, segment: f64) -> Result<Value> {
    let cycle = [
        "randwrite-4k-qd32",
        "seqwrite-1m-qd4",
        "randread-4k-qd32",
        "randwrite-4k-qd32-flush32",
    ];
    let vm_pid = pair.vm_pid();
    let node_pid = pair
        .node_pid()
        .ctx(|| "access-node is not running".to_string())?;
    let idle_vm = util::mem(vm_pid)?;
    let idle_node = util::mem(node_pid)?;
    let mut samples: Vec<(f64, Mem, Mem)> = Vec::new();
    let t0 = Instant::now();
    let mut i = 0usize;
    let mut ops = 0u64;
    let mut bytes = 0u64;
    while t0.elapsed().as_secs_f64() < secs {
        let wl = client::workload(cycle[i % cycle.len()]).ctx(|| "workload".to_string())?;
        i += 1;
        let left = (secs - t0.elapsed().as_secs_f64()).max(0.05);
        let seg = Duration::from_secs_f64(segment.min(left));
        let mut c = Client::connect(&pair.socket, 1, wl.bs * wl.qd, Duration::from_secs(10))?;
        let mut err: Option<String> = None;
        let m = c.run(
            wl,
            Duration::ZERO,
            seg,
            &|| util::cpu_ticks(vm_pid),
            &mut || match (util::mem(vm_pid), util::mem(node_pid)) {
                (Ok(a), Ok(b)) => samples.push((t0.elapsed().as_secs_f64(), a, b)),
                (Err(e), _) | (_, Err(e)) => {
                    err.get_or_insert(e);
                }
            },
        )?;
        if let Some(e) = err {
            return Err(e);
        }
        ops += m.ops;
        bytes += m.bytes;
        pair.check()?;
    }
    if samples.is_empty() {
        return Err("no memory samples".to_string());
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    let n = samples.len();
    let third = (n / 3).max(1);
    let first = &samples[..third];
    let last = &samples[n - third..];
    let max_of = |s: &[(f64, Mem, Mem)], f: &dyn Fn(&(f64, Mem, Mem)) -> u64| {
        s.iter().map(f).max().unwrap_or(0)
    };
    let vm_priv = |s: &(f64, Mem, Mem)| s.1.private();
    let node_priv = |s: &(f64, Mem, Mem)| s.2.private();
    let summary = |who: &str,
                   idle: Mem,
                   f: &dyn Fn(&(f64, Mem, Mem)) -> u64,
                   g: &dyn Fn(&(f64, Mem, Mem)) -> Mem| {
        let growth = max_of(last, f) as i64 - max_of(first, f) as i64;
        json!({
            "process": who,
            "idle_vm_rss_mib": mib(idle.rss),
            "max_vm_rss_mib": mib(samples.iter().map(|s| g(s).rss).max().unwrap_or(0)),
            "max_rss_shmem_mib": mib(samples.iter().map(|s| g(s).shmem).max().unwrap_or(0)),
            "max_private_mib": mib(max_of(&samples, f)),
            "max_private_first_third_mib": mib(max_of(first, f)),
            "max_private_last_third_mib": mib(max_of(last, f)),
            "growth_mib": growth as f64 / 1024.0,
            // Flat: the last third's peak within 4 MiB of the first third's.
            "flat": growth <= 4096,
        })
    };
    Ok(json!({
        "secs": secs,
        "segment_secs": segment,
        "samples": n,
        "load": cycle,
        "ops": ops,
        "bytes": bytes,
        "vhost_mirror": summary("vhost-mirror", idle_vm, &vm_priv, &|s| s.1),
        "access_node": summary("access-node", idle_node, &node_priv, &|s| s.2),
        "private_means": "VmRSS minus RssShmem: RssShmem is the guest memory (the client's I/O \
                          buffers, a memfd) mapped into the backend, i.e. the buffers",
        "series_mib": samples.iter().step_by((n / 60).max(1)).map(|s| json!([
            (s.0 * 10.0).round() / 10.0, mib(s.1.rss), mib(s.1.private()), mib(s.2.rss)
        ])).collect::<Vec<_>>(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_resync_log_line() {
        let log = "x\n[2025 INFO vhost_mirror] resync finished: 107347968 bytes in 0.21s (487 MiB/s); replica up to date at generation 00ff\n";
        assert_eq!(parse_resync_log(log), Some((107_347_968, 0.21)));
        assert_eq!(parse_resync_log("nothing"), None);
    }
}
