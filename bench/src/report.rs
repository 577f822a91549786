//! Medians, ratios and targets, rendered as JSON and Markdown.

use std::fmt::Write as _;

use serde_json::{json, Value};

use crate::client::{Op, Workload};
use crate::systems::{System, ALL_SYSTEMS};
use crate::{util, Results, RunStats};

pub struct Report {
    pub json: Value,
    pub markdown: String,
}

struct Target {
    name: String,
    value: String,
    /// `None`: could not be evaluated (a system or measurement was not run).
    met: Option<bool>,
}

/// The throughput ratios of one workload (`None`: a system did not run).
struct Ratios {
    local_qsd: Option<f64>,
    local_qsd_best: Option<f64>,
    /// local over the faster of qsd and qsd-best.
    local_best_qsd: Option<f64>,
    best_qsd: &'static str,
    /// mirror over the faster of qemu-mirror's transports.
    mirror_qm: Option<f64>,
    best_qm: &'static str,
    mirror_qmu: Option<f64>,
    mirror_qmt: Option<f64>,
    mirror_local: Option<f64>,
}

/// One of the ratios issue 10 sets a target for.
struct Issue10 {
    ratio: &'static str,
    workload: &'static str,
    value: f64,
    detail: String,
    target: &'static str,
    met: bool,
}

/// The faster of two systems' numbers, with its name.
fn faster(
    a: (Option<f64>, &'static str),
    b: (Option<f64>, &'static str),
) -> (Option<f64>, &'static str) {
    match (a.0, b.0) {
        (Some(x), Some(y)) if y > x => b,
        (Some(_), _) => a,
        (None, Some(_)) => b,
        (None, None) => (None, "-"),
    }
}

fn sys_index(s: System) -> usize {
    ALL_SYSTEMS.iter().position(|&x| x == s).unwrap_or(0)
}

fn fmt_rate(wl: &Workload, r: &RunStats) -> String {
    if wl.shows_bandwidth() {
        format!("{:.0} MiB/s", r.mib_s)
    } else if r.iops >= 10_000.0 {
        format!("{:.1}k IOPS", r.iops / 1000.0)
    } else {
        format!("{:.0} IOPS", r.iops)
    }
}

fn fmt_us(x: f64) -> String {
    if x.is_nan() {
        "-".into()
    } else if x >= 1000.0 {
        format!("{:.0}", x)
    } else {
        format!("{:.1}", x)
    }
}

/// A JSON list of rates, each rounded to a whole MiB/s (empty if it is not a list).
fn rounded_runs(v: &Value) -> Vec<f64> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|x| x.as_f64().unwrap_or(0.0).round())
                .collect()
        })
        .unwrap_or_default()
}

fn fmt_ratio(x: Option<f64>) -> String {
    x.map_or("-".into(), |v| format!("{v:.2}"))
}

/// When `target` x qemu-mirror is more than local (the same backend, no replica) did in the
/// same run, says so: the mirrored path does local's work and more, so such a target is out of
/// reach on this machine whatever the replication costs. `mirror_qm` = mirror/qemu-mirror,
/// `mirror_local` = mirror/local (throughput).
fn above_local(mirror_qm: f64, mirror_local: Option<f64>, target: f64) -> String {
    let Some(ml) = mirror_local.filter(|&ml| ml > 0.0 && mirror_qm > 0.0) else {
        return String::new();
    };
    // local / qemu-mirror
    let local_qm = mirror_qm / ml;
    if target <= local_qm {
        return String::new();
    }
    format!(
        "; {target}x qemu-mirror is {:.2}x local (no replica) in this run",
        target / local_qm
    )
}

fn mark(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "n/a",
    }
}

pub fn build(
    systems: &[System],
    workloads: &[&'static Workload],
    res: &Results,
    config: Value,
    envinfo: Value,
) -> Report {
    let med = |wi: usize, s: System| -> Option<RunStats> {
        res.cells
            .get(&(wi, sys_index(s)))
            .and_then(|v| RunStats::median(v))
    };
    let thr = |wi: usize, s: System| med(wi, s).map(|r| r.mib_s);
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let wl_index = |name: &str| workloads.iter().position(|w| w.name == name);
    let rtt = util::median(&res.rtt_us);
    let has_base = systems.contains(&System::MirrorBase);
    // mirror/mirror-base throughput of each round (the systems ran next to each other).
    let round_ratios = |wi: usize| -> Vec<f64> {
        match (
            res.cells.get(&(wi, sys_index(System::Mirror))),
            res.cells.get(&(wi, sys_index(System::MirrorBase))),
        ) {
            (Some(m), Some(b)) => m
                .iter()
                .zip(b)
                .filter(|(_, b)| b.mib_s > 0.0)
                .map(|(m, b)| m.mib_s / b.mib_s)
                .collect(),
            _ => Vec::new(),
        }
    };

    // ---------------------------------------------------------------- results and ratios
    let mut results = Vec::new();
    for (wi, wl) in workloads.iter().enumerate() {
        for &s in systems {
            let rounds = res.cells.get(&(wi, sys_index(s)));
            results.push(json!({
                "workload": wl.name,
                "system": s.name(),
                "median": med(wi, s).map(RunStats::to_json),
                "rounds": rounds.map(|v| v.iter().map(|r| r.to_json()).collect::<Vec<_>>()),
            }));
        }
    }
    let mut ratios = Vec::new();
    let mut ratio_rows: Vec<(&'static str, Ratios)> = Vec::new();
    // Per workload: mirror/mirror-base, mirror-base/qemu-mirror (the faster), mirror/qemu-mirror.
    let mut base_rows = Vec::new();
    for (wi, wl) in workloads.iter().enumerate() {
        let qu = thr(wi, System::QemuMirrorUnix);
        let qt = thr(wi, System::QemuMirrorTcp);
        let (best, best_name) = faster((qu, "unix"), (qt, "tcp"));
        let (qsd, qsd_best) = (thr(wi, System::Qsd), thr(wi, System::QsdBest));
        let (best_qsd, best_qsd_name) = faster((qsd, "qsd"), (qsd_best, "qsd-best"));
        let mirror = thr(wi, System::Mirror);
        let local = thr(wi, System::Local);
        let r = Ratios {
            local_qsd: ratio(local, qsd),
            local_qsd_best: ratio(local, qsd_best),
            local_best_qsd: ratio(local, best_qsd),
            best_qsd: best_qsd_name,
            mirror_qm: ratio(mirror, best),
            best_qm: best_name,
            mirror_qmu: ratio(mirror, qu),
            mirror_qmt: ratio(mirror, qt),
            mirror_local: ratio(mirror, local),
        };
        let mut row = json!({
            "workload": wl.name,
            "local/qsd": r.local_qsd,
            "local/qsd-best": r.local_qsd_best,
            "local/max(qsd,qsd-best)": r.local_best_qsd,
            "qsd_faster_configuration": r.best_qsd,
            "mirror/qemu-mirror": r.mirror_qm,
            "qemu-mirror_faster_transport": r.best_qm,
            "mirror/qemu-mirror-unix": r.mirror_qmu,
            "mirror/qemu-mirror-tcp": r.mirror_qmt,
            "mirror/local": r.mirror_local,
        });
        if has_base {
            let b = thr(wi, System::MirrorBase);
            let rr = round_ratios(wi);
            let rb = (ratio(mirror, b), ratio(b, best));
            row["mirror/mirror-base"] = json!(rb.0);
            row["mirror/mirror-base_per_round"] = json!(rr);
            row["mirror-base/qemu-mirror"] = json!(rb.1);
            row["mirror-base/local"] = json!(ratio(b, thr(wi, System::Local)));
            base_rows.push((wi, rb, rr));
        }
        ratios.push(row);
        ratio_rows.push((wl.name, r));
    }

    // ---------------------------------------------------------------- targets
    let mut targets: Vec<Target> = Vec::new();
    for (name, r) in &ratio_rows {
        targets.push(Target {
            name: format!("local/qsd >= 1.0 on {name}"),
            value: fmt_ratio(r.local_qsd),
            met: r.local_qsd.map(|v| v >= 1.0),
        });
    }
    for (wname, min) in [("randwrite-4k-qd32", 1.5), ("seqwrite-1m-qd4", 1.2)] {
        let r = ratio_rows.iter().find(|x| x.0 == wname);
        let v = r.and_then(|x| x.1.mirror_qm);
        targets.push(Target {
            name: format!("mirror/qemu-mirror >= {min} on {wname}"),
            value: match r {
                Some(x) if v.is_some() => {
                    format!("{} (vs qemu-mirror-{})", fmt_ratio(v), x.1.best_qm)
                }
                _ => "-".into(),
            },
            met: v.map(|v| v >= min),
        });
    }
    {
        let v = ratio_rows
            .iter()
            .find(|x| x.0 == "randwrite-4k-qd32")
            .and_then(|x| x.1.mirror_local);
        targets.push(Target {
            name: "mirror/local >= 0.5 on randwrite-4k-qd32".into(),
            value: fmt_ratio(v),
            met: v.map(|v| v >= 0.5),
        });
    }
    let mut qd1 = Value::Null;
    {
        let wi = wl_index("randwrite-4k-qd1");
        let m = wi.and_then(|i| med(i, System::Mirror));
        let l = wi.and_then(|i| med(i, System::Local));
        match (m, l, rtt) {
            (Some(m), Some(l), Some(rtt)) => {
                let d = m.mean_us - l.mean_us;
                let d50 = m.p50_us - l.p50_us;
                qd1 = json!({
                    "mirror_mean_us": m.mean_us, "local_mean_us": l.mean_us, "diff_mean_us": d,
                    "mirror_p50_us": m.p50_us, "local_p50_us": l.p50_us, "diff_p50_us": d50,
                    "rtt_us": rtt, "two_rtt_us": 2.0 * rtt,
                });
                targets.push(Target {
                    name: "mirror QD1 write latency <= local QD1 + 2 RTT (means)".into(),
                    value: format!(
                        "+{:.1} us vs 2 RTT = {:.1} us (p50: +{:.1} us)",
                        d,
                        2.0 * rtt,
                        d50
                    ),
                    met: Some(d <= 2.0 * rtt),
                });
            }
            _ => targets.push(Target {
                name: "mirror QD1 write latency <= local QD1 + 2 RTT (means)".into(),
                value: "-".into(),
                met: None,
            }),
        }
    }
    // fsync latency: a 4k write then a flush at QD1, the pair's latency.
    let mut fsync = Value::Null;
    let fsync_medians = wl_index("writeflush-4k-qd1").map(|i| {
        (
            med(i, System::Mirror),
            med(i, System::Local),
            med(i, System::QemuMirrorUnix),
            med(i, System::QemuMirrorTcp),
        )
    });
    if let Some((m, l, qu, qt)) = &fsync_medians {
        let mean = |r: &Option<RunStats>| r.map(|r| r.mean_us);
        let p99 = |r: &Option<RunStats>| r.map(|r| r.p99_us);
        fsync = json!({
            "workload": "writeflush-4k-qd1",
            "mirror_mean_us": mean(m), "local_mean_us": mean(l),
            "mirror_p99_us": p99(m), "local_p99_us": p99(l),
            "qemu_mirror_unix_mean_us": mean(qu), "qemu_mirror_tcp_mean_us": mean(qt),
            "mirror/local_mean": ratio(mean(m), mean(l)),
            "mirror/local_p99": ratio(p99(m), p99(l)),
        });
    }

    // ---------------------------------------------------------------- issue 10's ratios
    let mut issue10: Vec<Issue10> = Vec::new();
    for (wl, (name, r)) in workloads.iter().zip(&ratio_rows) {
        if let (Op::Write, Some(v)) = (wl.op, r.mirror_qm) {
            issue10.push(Issue10 {
                ratio: "mirror/qemu-mirror",
                workload: name,
                value: v,
                detail: format!(
                    "vs qemu-mirror-{}{}",
                    r.best_qm,
                    above_local(v, r.mirror_local, 2.5)
                ),
                target: ">= 2.5",
                met: v >= 2.5,
            });
        }
    }
    for (name, r) in &ratio_rows {
        if let ("randwrite-4k-qd32" | "seqwrite-1m-qd4", Some(v)) = (*name, r.mirror_local) {
            issue10.push(Issue10 {
                ratio: "mirror/local",
                workload: name,
                value: v,
                detail: String::new(),
                target: ">= 0.6",
                met: v >= 0.6,
            });
        }
    }
    for (name, r) in &ratio_rows {
        if let Some(v) = r.local_best_qsd {
            issue10.push(Issue10 {
                ratio: "local/max(qsd, qsd-best)",
                workload: name,
                value: v,
                detail: format!("vs {}", r.best_qsd),
                target: ">= 1.3",
                met: v >= 1.3,
            });
        }
    }
    if let Some((Some(m), Some(l), _, _)) = &fsync_medians {
        if let Some(v) = ratio(Some(m.mean_us), Some(l.mean_us)) {
            issue10.push(Issue10 {
                ratio: "fsync latency mirror/local (mean)",
                workload: "writeflush-4k-qd1",
                value: v,
                detail: format!(
                    "write+flush {:.1} vs {:.1} us (p99 {} vs {} us)",
                    m.mean_us,
                    l.mean_us,
                    fmt_us(m.p99_us),
                    fmt_us(l.p99_us)
                ),
                target: "<= 1.5",
                met: v <= 1.5,
            });
        }
    }
    if let Some(d) = qd1.as_object() {
        let g = |k: &str| d.get(k).and_then(Value::as_f64);
        if let (Some(diff), Some(rtt)) = (g("diff_mean_us"), g("rtt_us")) {
            if rtt > 0.0 {
                let v = diff / rtt;
                issue10.push(Issue10 {
                    ratio: "QD1 write latency (mirror - local) / loopback RTT",
                    workload: "randwrite-4k-qd1",
                    value: v,
                    detail: format!("+{diff:.1} us, RTT {rtt:.1} us"),
                    target: "<= 1.5",
                    met: v <= 1.5,
                });
            }
        }
    }
    // Resync and initial sync against nbdcopy on the same bytes; memory flat under load.
    {
        let rate = |v: &Option<Value>, path: &[&str]| {
            let mut x = v.as_ref()?;
            for k in path {
                x = x.get(*k)?;
            }
            x.as_f64()
        };
        for (what, ours, theirs, detail) in [
            (
                "resync / nbdcopy (same bytes)",
                rate(&res.resync, &["median_mib_s"]),
                rate(&res.nbdcopy, &["median_mib_s"]),
                "changed regions",
            ),
            (
                "initial full sync / nbdcopy (same bytes)",
                rate(&res.resync, &["initial_full_sync", "mib_s"]),
                rate(&res.nbdcopy_full, &["median_mib_s"]),
                "whole image",
            ),
        ] {
            if let (Some(a), Some(b)) = (ours, theirs) {
                if b > 0.0 {
                    issue10.push(Issue10 {
                        ratio: what,
                        workload: "-",
                        value: a / b,
                        detail: format!("{detail}: {a:.0} vs {b:.0} MiB/s"),
                        target: ">= 1.0",
                        met: a / b >= 1.0,
                    });
                }
            }
        }
        if let Some(r) = &res.rss {
            for (who, key) in [
                ("vhost-mirror", "vhost_mirror"),
                ("access-node", "access_node"),
            ] {
                let p = &r[key];
                if let (Some(g), Some(flat)) = (p["growth_mib"].as_f64(), p["flat"].as_bool()) {
                    issue10.push(Issue10 {
                        ratio: if who == "vhost-mirror" {
                            "vhost-mirror resident memory growth, MiB"
                        } else {
                            "access-node resident memory growth, MiB"
                        },
                        workload: "mixed",
                        value: g,
                        detail: format!(
                            "{:.0} s of mixed load; own memory (VmRSS - RssShmem), peak of the \
                             last third vs the first ({:.1} vs {:.1} MiB)",
                            r["secs"].as_f64().unwrap_or(0.0),
                            p["max_private_last_third_mib"].as_f64().unwrap_or(f64::NAN),
                            p["max_private_first_third_mib"]
                                .as_f64()
                                .unwrap_or(f64::NAN)
                        ),
                        target: "flat (<= 4 MiB)",
                        met: flat,
                    });
                }
            }
        }
    }
    let resync_rate = res
        .resync
        .as_ref()
        .and_then(|r| r.get("median_mib_s"))
        .and_then(Value::as_f64);
    let nbd_rate = res
        .nbdcopy
        .as_ref()
        .and_then(|r| r.get("median_mib_s"))
        .and_then(Value::as_f64);
    {
        let r = ratio(resync_rate, nbd_rate);
        targets.push(Target {
            name: "resync >= 0.8 x nbdcopy".into(),
            value: match (resync_rate, nbd_rate) {
                (Some(a), Some(b)) => format!("{:.2} ({a:.0} vs {b:.0} MiB/s)", a / b),
                (Some(a), None) => format!(
                    "{a:.0} MiB/s; nbdcopy: {}",
                    res.nbdcopy
                        .as_ref()
                        .and_then(|n| n.get("reason"))
                        .and_then(Value::as_str)
                        .unwrap_or("not measured")
                ),
                _ => "-".into(),
            },
            met: r.map(|v| v >= 0.8),
        });
    }
    {
        let vm = res.rss.as_ref().and_then(|r| r.get("vhost_mirror"));
        let p = vm
            .and_then(|v| v.get("max_private_mib"))
            .and_then(Value::as_f64);
        let shm = vm
            .and_then(|v| v.get("max_rss_shmem_mib"))
            .and_then(Value::as_f64);
        let flat = vm.and_then(|v| v.get("flat")).and_then(Value::as_bool);
        let growth = vm.and_then(|v| v.get("growth_mib")).and_then(Value::as_f64);
        targets.push(Target {
            name: "vhost-mirror RSS <= 64 MiB + buffers".into(),
            value: match (p, shm) {
                (Some(p), Some(s)) => format!("{p:.1} MiB own + {s:.1} MiB guest buffers (shmem)"),
                _ => "-".into(),
            },
            met: p.map(|p| p <= 64.0),
        });
        targets.push(Target {
            name: "vhost-mirror RSS flat under load".into(),
            value: growth.map_or("-".into(), |g| {
                format!("last third vs first third peak: {g:+.1} MiB")
            }),
            met: flat,
        });
    }

    if let Some(l) = &res.resync_latency {
        let r = l["median_p99_ratio"].as_f64();
        targets.push(Target {
            name: "guest p99 write latency during resync <= 1.5x idle (issue 12)".into(),
            value: r.map_or(
                "- (no round where the resync lasted the window)".into(),
                |r| {
                    format!(
                        "{r:.2} ({:.0} vs {:.0} us; resync {:.0} MiB/s under the load)",
                        l["median_resync_p99_us"].as_f64().unwrap_or(f64::NAN),
                        l["median_idle_p99_us"].as_f64().unwrap_or(f64::NAN),
                        l["median_resync_mib_s_under_load"]
                            .as_f64()
                            .unwrap_or(f64::NAN)
                    )
                },
            ),
            met: r.map(|r| r <= 1.5),
        });
    }

    // ---------------------------------------------------------------- JSON
    let json = json!({
        "benchmark": "vhost-mirror issue 5",
        "started": res.started,
        "wall_secs": res.wall_secs,
        "config": config,
        "environment": envinfo,
        "systems": systems.iter().map(|s| json!({"name": s.name(), "description": s.describe()})).collect::<Vec<_>>(),
        "workloads": workloads.iter().map(|w| json!({
            "name": w.name, "op": if w.op == Op::Read {"read"} else {"write"}, "bs": w.bs,
            "qd": w.qd, "sequential": w.seq, "flush_every": w.flush_every, "fsync": w.fsync,
            "queues": w.queues,
            "unit": if w.shows_bandwidth() {"MiB/s"} else if w.fsync {"fsyncs/s"} else {"IOPS"},
        })).collect::<Vec<_>>(),
        "rtt_us": {"samples": res.rtt_us, "median": rtt},
        "results": results,
        "ratios": ratios,
        "qd1_write_latency": qd1,
        "fsync_latency": fsync,
        "issue10_ratios": issue10.iter().map(|i| json!({
            "ratio": i.ratio, "workload": i.workload, "value": i.value, "detail": i.detail,
            "target": i.target, "met": i.met,
        })).collect::<Vec<_>>(),
        "resync": res.resync,
        "resync_baseline": res.resync_base,
        "resync_latency": res.resync_latency,
        "nbdcopy": res.nbdcopy,
        "nbdcopy_full_image": res.nbdcopy_full,
        "rss": res.rss,
        "perf": res.perf,
        "targets": targets.iter().map(|t| json!({"target": t.name, "value": t.value, "met": t.met})).collect::<Vec<_>>(),
    });

    // ---------------------------------------------------------------- Markdown
    let mut md = String::new();
    let cfgv = &json["config"];
    let _ = writeln!(md, "# vhost-mirror benchmark\n");
    let _ = writeln!(
        md,
        "Mode **{}**: {} round(s) x {} s per run (after {} s warm-up), interleaved (round -> \
         workload -> system); {} MiB images in the page cache; medians over rounds. Client: \
         libblkio virtio-blk-vhost-user. Wall time {:.0} s.\n",
        cfgv["mode"].as_str().unwrap_or("?"),
        cfgv["rounds"],
        cfgv["secs_per_run"],
        cfgv["warmup_secs"],
        cfgv["image_mib"],
        res.wall_secs
    );
    let e = &json["environment"];
    let _ = writeln!(
        md,
        "Machine: {} CPUs ({}), kernel {}; {}; {}.\n",
        e["cpus"],
        e["cpu_model"].as_str().unwrap_or("?"),
        e["kernel"].as_str().unwrap_or("?"),
        e["qemu_storage_daemon"]
            .as_str()
            .unwrap_or("qemu-storage-daemon ?"),
        e["vhost_mirror"].as_str().unwrap_or("vhost-mirror ?"),
    );

    let header = |md: &mut String, first: &str| {
        let _ = write!(md, "| {first} |");
        for s in systems {
            let _ = write!(md, " {} |", s.name());
        }
        let _ = write!(md, "\n| --- |");
        for _ in systems {
            let _ = write!(md, " ---: |");
        }
        md.push('\n');
    };
    let _ = writeln!(
        md,
        "## Throughput and latency\n\nIOPS (4 KiB) or MiB/s (1 MiB), then p50 / p99 latency in us. \
         writeflush-4k-qd1 counts write+flush pairs (fsyncs) per second and their latency.\n"
    );
    header(&mut md, "workload");
    for (wi, wl) in workloads.iter().enumerate() {
        let _ = write!(md, "| {} |", wl.name);
        for &s in systems {
            match med(wi, s) {
                Some(r) => {
                    let _ = write!(
                        md,
                        " {} · {} / {} |",
                        fmt_rate(wl, &r),
                        fmt_us(r.p50_us),
                        fmt_us(r.p99_us)
                    );
                }
                None => md.push_str(" - |"),
            }
        }
        md.push('\n');
    }
    let _ = writeln!(md, "\n## Mean latency (us)\n");
    header(&mut md, "workload");
    for (wi, wl) in workloads.iter().enumerate() {
        let _ = write!(md, "| {} |", wl.name);
        for &s in systems {
            let cell = med(wi, s).map_or("-".into(), |r| {
                let mut c = fmt_us(r.mean_us);
                if let Some(f) = r.flush_mean_us {
                    let _ = write!(c, " (flush {})", fmt_us(f));
                }
                c
            });
            let _ = write!(md, " {cell} |");
        }
        md.push('\n');
    }
    let _ = writeln!(
        md,
        "\n## Where the time goes (vhost-mirror's status)\n\nMeans over each run from \
         vhost-mirror's status totals, medians over rounds, us: the client's request latency \
         (and its flushes), the local image's fdatasync (the flusher thread), the replica's \
         write and flush round trips (sent to acked, the replica's fdatasync included). A \
         mirrored flush completes when both its local fdatasync and its replica flush did; on \
         this machine both images share one disk.\n\n| workload | system | request | flush | \
         local fdatasync | replica write RTT | replica flush RTT |\n| --- | --- | ---: | ---: | \
         ---: | ---: | ---: |"
    );
    let opt_us = |x: Option<f64>| x.map_or("-".into(), fmt_us);
    for (wi, wl) in workloads.iter().enumerate() {
        if wl.op != Op::Write {
            continue;
        }
        for &s in systems {
            if !matches!(s, System::Local | System::Mirror | System::MirrorBase) {
                continue;
            }
            let Some(r) = med(wi, s) else { continue };
            if r.fdatasync_us.is_none() && r.link_write_us.is_none() {
                continue;
            }
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                wl.name,
                s.name(),
                fmt_us(r.mean_us),
                opt_us(r.flush_mean_us),
                opt_us(r.fdatasync_us),
                opt_us(r.link_write_us),
                opt_us(r.link_flush_us)
            );
        }
    }
    let _ = writeln!(
        md,
        "\n## CPU seconds per GiB moved\n\nutime+stime of the backend processes (mirror: \
         vhost-mirror + access-node; qemu-mirror: qemu-storage-daemon + qemu-nbd) per GiB read or \
         written by the client.\n"
    );
    header(&mut md, "workload");
    for (wi, wl) in workloads.iter().enumerate() {
        let _ = write!(md, "| {} |", wl.name);
        for &s in systems {
            let cell = med(wi, s).map_or("-".into(), |r| format!("{:.2}", r.cpu_s_per_gib));
            let _ = write!(md, " {cell} |");
        }
        md.push('\n');
    }
    let _ = writeln!(
        md,
        "\n## Ratios (median throughput)\n\nmax(qsd, qsd-best) = the faster of \
         qemu-storage-daemon's two configurations, qemu-mirror = the faster of its unix-socket and \
         loopback-TCP NBD targets, per workload.\n\n| workload | local/qsd | local/qsd-best | \
         local/max(qsd, qsd-best) | (faster) | mirror/qemu-mirror | (faster) | \
         mirror/qemu-mirror-unix | mirror/qemu-mirror-tcp | mirror/local |\n| --- | ---: | ---: \
         | ---: | --- | ---: | --- | ---: | ---: | ---: |"
    );
    for (name, r) in &ratio_rows {
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            fmt_ratio(r.local_qsd),
            fmt_ratio(r.local_qsd_best),
            fmt_ratio(r.local_best_qsd),
            r.best_qsd,
            fmt_ratio(r.mirror_qm),
            r.best_qm,
            fmt_ratio(r.mirror_qmu),
            fmt_ratio(r.mirror_qmt),
            fmt_ratio(r.mirror_local)
        );
    }
    let _ = writeln!(
        md,
        "\nLoopback TCP round trip (1 byte ping-pong, TCP_NODELAY, measured before every \
         workload of every round): median {} us of {:?}.",
        rtt.map_or("-".into(), |r| format!("{r:.1}")),
        res.rtt_us
            .iter()
            .map(|r| (r * 10.0).round() / 10.0)
            .collect::<Vec<_>>()
    );
    if let Some(d) = qd1.as_object() {
        let g = |k: &str| d.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
        let _ = writeln!(
            md,
            "QD1 4k write: mirror mean {:.1} us, local mean {:.1} us: replication adds {:.1} us \
             (p50: {:.1} us) against 2 RTT = {:.1} us.",
            g("mirror_mean_us"),
            g("local_mean_us"),
            g("diff_mean_us"),
            g("diff_p50_us"),
            g("two_rtt_us")
        );
    }
    if let Some(d) = fsync.as_object() {
        let g = |k: &str| d.get(k).and_then(Value::as_f64).map_or("-".into(), fmt_us);
        let _ = writeln!(
            md,
            "fsync (writeflush-4k-qd1: a 4k write, then a flush once it completed, at QD1): \
             mirror mean {} us (p99 {}), local mean {} us (p99 {}), qemu-mirror-unix mean {} us, \
             qemu-mirror-tcp mean {} us; mirror/local {} (mean), {} (p99).",
            g("mirror_mean_us"),
            g("mirror_p99_us"),
            g("local_mean_us"),
            g("local_p99_us"),
            g("qemu_mirror_unix_mean_us"),
            g("qemu_mirror_tcp_mean_us"),
            fmt_ratio(d.get("mirror/local_mean").and_then(Value::as_f64)),
            fmt_ratio(d.get("mirror/local_p99").and_then(Value::as_f64)),
        );
    }

    let _ = writeln!(
        md,
        "\n## Issue 10's ratios\n\nThe ratios issue 10 sets targets for, from this run \
         (throughput unless it says latency; a ratio whose systems did not run is left out).\n\n\
         | ratio | workload | value | | target | |\n| --- | --- | ---: | --- | --- | --- |"
    );
    for i in &issue10 {
        let _ = writeln!(
            md,
            "| {} | {} | {:.2} | {} | {} | {} |",
            i.ratio,
            i.workload,
            i.value,
            i.detail,
            i.target,
            mark(Some(i.met))
        );
    }
    if issue10.is_empty() {
        let _ = writeln!(
            md,
            "| (none: the systems they compare did not run) | | | | | |"
        );
    }

    if has_base {
        let _ = writeln!(
            md,
            "\n## Against the baseline build (mirror-base)\n\nmirror-base = mirror with the \
             vhost-mirror and access-node of {} ({}), run interleaved with the others. \
             mirror/mirror-base: median throughput of this build over the baseline's (< 1: this \
             build is slower), then the same ratio in each round; mean latency and CPU per GiB of \
             both; both against qemu-mirror (the faster transport).\n\n| workload | \
             mirror/mirror-base | per round | mean latency us (mirror / base) | CPU s/GiB (mirror \
             / base) | mirror/qemu-mirror | mirror-base/qemu-mirror |\n| --- | ---: | --- | ---: \
             | ---: | ---: | ---: |",
            cfgv["baseline_bin_dir"].as_str().unwrap_or("?"),
            e["vhost_mirror_baseline"].as_str().unwrap_or("version ?"),
        );
        for (wi, rb, rr) in &base_rows {
            let (m, b) = (med(*wi, System::Mirror), med(*wi, System::MirrorBase));
            let pair = |f: &dyn Fn(&RunStats) -> String| match (&m, &b) {
                (Some(m), Some(b)) => format!("{} / {}", f(m), f(b)),
                _ => "-".into(),
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                workloads[*wi].name,
                fmt_ratio(rb.0),
                rr.iter()
                    .map(|x| format!("{x:.2}"))
                    .collect::<Vec<_>>()
                    .join(" "),
                pair(&|r| fmt_us(r.mean_us)),
                pair(&|r| format!("{:.2}", r.cpu_s_per_gib)),
                fmt_ratio(ratio_rows.get(*wi).and_then(|x| x.1.mirror_qm)),
                fmt_ratio(rb.1),
            );
        }
    }

    if let Some(r) = &res.resync {
        let _ = writeln!(md, "\n## Resync\n");
        let _ = writeln!(
            md,
            "{} MiB image, {} of {} regions of 64 KiB ({} MiB, random data, random places) \
             written while access-node was stopped, then access-node restarted. {}\n",
            r["image_bytes"].as_u64().unwrap_or(0) >> 20,
            r["changed_regions"],
            r["regions"],
            (r["changed_regions"].as_u64().unwrap_or(0) * 65536) >> 20,
            r["measure"].as_str().unwrap_or("")
        );
        let _ = writeln!(md, "| run | resynced MiB | s (reconnect -> in sync) | MiB/s | vhost-mirror's log: MiB/s | s from restart |\n| ---: | ---: | ---: | ---: | ---: | ---: |");
        if let Some(its) = r["iterations"].as_array() {
            for (i, it) in its.iter().enumerate() {
                let _ = writeln!(
                    md,
                    "| {} | {:.1} | {:.3} | {:.0} | {} | {:.2} |",
                    i + 1,
                    it["resync_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
                    it["secs_reconnect_to_in_sync"].as_f64().unwrap_or(f64::NAN),
                    it["mib_s"].as_f64().unwrap_or(f64::NAN),
                    it["log_mib_s"]
                        .as_f64()
                        .map_or("-".into(), |v| format!("{v:.0}")),
                    it["secs_restart_to_in_sync"].as_f64().unwrap_or(f64::NAN),
                );
            }
        }
        let ini = &r["initial_full_sync"];
        let _ = writeln!(
            md,
            "\nMedian resync: {} MiB/s. (Initial full sync of the fresh replica: {} MiB in {:.2} s = {:.0} MiB/s.)",
            resync_rate.map_or("-".into(), |v| format!("{v:.0}")),
            ini["bytes"].as_u64().unwrap_or(0) >> 20,
            ini["secs"].as_f64().unwrap_or(f64::NAN),
            ini["mib_s"].as_f64().unwrap_or(f64::NAN)
        );
        if let Some(rb) = &res.resync_base {
            let rate = |v: &Value| v["median_mib_s"].as_f64();
            let initial = |v: &Value| v["initial_full_sync"]["mib_s"].as_f64();
            let _ = writeln!(
                md,
                "\nmirror-base (the baseline build, measured the same way, interleaved): runs {:?} \
                 MiB/s, median {} MiB/s; initial full sync {} MiB/s. mirror/mirror-base: resync \
                 {}, initial full sync {}.",
                rb["iterations"]
                    .as_array()
                    .map(|a| a
                        .iter()
                        .map(|x| x["mib_s"].as_f64().unwrap_or(0.0).round())
                        .collect::<Vec<_>>())
                    .unwrap_or_default(),
                rate(rb).map_or("-".into(), |v| format!("{v:.0}")),
                initial(rb).map_or("-".into(), |v| format!("{v:.0}")),
                fmt_ratio(ratio(rate(r), rate(rb))),
                fmt_ratio(ratio(initial(r), initial(rb))),
            );
        }
        if let Some(n) = &res.nbdcopy {
            if n["available"].as_bool() == Some(true) {
                let _ = writeln!(
                    md,
                    "\nnbdcopy ({}): {} MiB, runs {:?} MiB/s, median {} MiB/s. Method: {}",
                    n["version"].as_str().unwrap_or("?"),
                    n["bytes"].as_u64().unwrap_or(0) >> 20,
                    rounded_runs(&n["runs_mib_s"]),
                    nbd_rate.map_or("-".into(), |v| format!("{v:.0}")),
                    n["method"].as_str().unwrap_or("")
                );
                if let Some(f) = res.nbdcopy_full.as_ref().filter(|f| f["available"] == true) {
                    let _ = writeln!(
                        md,
                        "\nnbdcopy of as many bytes as the image (the initial full sync's peer, \
                         the same method): {} MiB, runs {:?} MiB/s, median {:.0} MiB/s.",
                        f["bytes"].as_u64().unwrap_or(0) >> 20,
                        rounded_runs(&f["runs_mib_s"]),
                        f["median_mib_s"].as_f64().unwrap_or(f64::NAN)
                    );
                }
            } else {
                let _ = writeln!(
                    md,
                    "\nnbdcopy not measured: {}",
                    n["reason"].as_str().unwrap_or("?")
                );
            }
        }
    }
    if let Some(l) = &res.resync_latency {
        let _ = writeln!(md, "\n## Guest write latency during a resync\n");
        let _ = writeln!(md, "{}\n", l["method"].as_str().unwrap_or(""));
        let _ = writeln!(md, "| round | idle p50 us | idle p99 us | resync p50 us | resync p99 us | p99 ratio | resync MiB/s under load | resync MiB/s after |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
        for (i, x) in l["rounds"].as_array().into_iter().flatten().enumerate() {
            let f = |k: &str| x[k].as_f64().map_or("-".into(), |v| format!("{v:.0}"));
            let _ = writeln!(
                md,
                "| {}{} | {} | {} | {} | {} | {:.2} | {} | {} |",
                i + 1,
                if x["resync_lasted_the_window"] == true {
                    ""
                } else {
                    " (resync ended early)"
                },
                f("idle_p50_us"),
                f("idle_p99_us"),
                f("resync_p50_us"),
                f("resync_p99_us"),
                x["p99_ratio"].as_f64().unwrap_or(f64::NAN),
                f("resync_mib_s_under_load"),
                f("resync_mib_s_after_load"),
            );
        }
    }
    if let Some(r) = &res.rss {
        let _ = writeln!(
            md,
            "\n## Resident memory\n\n{:.0} s of rotating load ({}), {} samples. \"own\" = VmRSS - \
             RssShmem; RssShmem is the guest memory (the client's I/O buffers) mapped into the \
             process.\n\n| process | idle VmRSS | max VmRSS | max RssShmem | max own | own: first third peak | own: last third peak | flat |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
            r["secs"].as_f64().unwrap_or(0.0),
            r["load"]
                .as_array()
                .map(|a| a
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default(),
            r["samples"]
        );
        for k in ["vhost_mirror", "access_node"] {
            let p = &r[k];
            let f = |x: &str| p[x].as_f64().map_or("-".into(), |v| format!("{v:.1} MiB"));
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                p["process"].as_str().unwrap_or(k),
                f("idle_vm_rss_mib"),
                f("max_vm_rss_mib"),
                f("max_rss_shmem_mib"),
                f("max_private_mib"),
                f("max_private_first_third_mib"),
                f("max_private_last_third_mib"),
                if p["flat"].as_bool() == Some(true) {
                    "yes"
                } else {
                    "no"
                }
            );
        }
    }

    let _ = writeln!(
        md,
        "\n## Issue 5's targets (the first version's, kept for comparison)\n\n| target | value | |\n| --- | --- | --- |"
    );
    for t in &targets {
        let _ = writeln!(md, "| {} | {} | {} |", t.name, t.value, mark(t.met));
    }
    let met = targets.iter().filter(|t| t.met == Some(true)).count();
    let missed = targets.iter().filter(|t| t.met == Some(false)).count();
    let _ = writeln!(
        md,
        "\n{met} met, {missed} missed, {} not evaluated.",
        targets.len() - met - missed
    );

    let perf_runs = res
        .perf
        .as_ref()
        .and_then(|p| p["runs"].as_array())
        .cloned()
        .unwrap_or_default();
    for p in &perf_runs {
        if let Some(sys) = p["systems"].as_object() {
            let _ = writeln!(
                md,
                "\n## Profile (perf record -g, {}, self time, top symbols)\n",
                p["workload"].as_str().unwrap_or("?")
            );
            for (s, v) in sys {
                for who in ["vhost-mirror", "access-node"] {
                    if let Some(top) = v[who]["top"].as_array() {
                        let _ = writeln!(
                            md,
                            "**{s} / {who}** ({:.0} IOPS while profiled):\n",
                            v["iops"].as_f64().unwrap_or(0.0)
                        );
                        for t in top.iter().take(12) {
                            let _ = writeln!(
                                md,
                                "- {:5.2}% `{}`",
                                t["pct"].as_f64().unwrap_or(0.0),
                                t["symbol"].as_str().unwrap_or("")
                            );
                        }
                        md.push('\n');
                    }
                }
            }
        }
    }

    let _ = writeln!(md, "\n## Systems\n");
    for s in systems {
        let _ = writeln!(md, "- **{}**: {}", s.name(), s.describe());
    }
    let _ = writeln!(md, "\n## Workloads\n");
    for w in workloads {
        let _ = writeln!(
            md,
            "- **{}**: {} {} KiB, {}, QD {} per queue, {} queue(s){}",
            w.name,
            if w.op == Op::Read { "read" } else { "write" },
            w.bs / 1024,
            if w.seq {
                "sequential"
            } else {
                "random offsets"
            },
            w.qd,
            w.queues,
            if w.fsync {
                format!(
                    ", a flush once {} write(s) completed and the next write once it completed \
                     (a guest's fsync): IOPS and latency are of these write(s)+flush",
                    w.flush_every
                )
            } else if w.flush_every > 0 {
                format!(", a flush after every {} writes", w.flush_every)
            } else {
                String::new()
            }
        );
    }
    Report { json, markdown: md }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_above_local_says_so() {
        // mirror 13.6k, local 25.6k, qemu-mirror 14.2k: 2.5 x 14.2k = 35.5k = 1.39 x local.
        let (m, l, q) = (13.6, 25.6, 14.2);
        let s = above_local(m / q, Some(m / l), 2.5);
        assert!(s.contains("1.39x local"), "{s}");
        // Local far ahead of 2.5 x qemu-mirror: nothing to say.
        assert_eq!(above_local(71.4 / 15.1, Some(71.4 / 170.7), 2.5), "");
        assert_eq!(above_local(1.0, None, 2.5), "");
    }
}
