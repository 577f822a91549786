//! `bench --smoke` runs every system and workload briefly and writes its tables: checks that the
//! JSON and Markdown files exist and hold a row for every workload and system (never a speed).
//! The baseline build (`--baseline-bin-dir`, system mirror-base) is this build again.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SYSTEMS: &[&str] = &[
    "qsd",
    "qsd-best",
    "local",
    "mirror",
    "mirror-base",
    "qemu-mirror-unix",
    "qemu-mirror-tcp",
];
const WORKLOADS: &[&str] = &[
    "randread-4k-qd1",
    "randread-4k-qd32",
    "randwrite-4k-qd1",
    "randwrite-4k-qd32",
    "randwrite-4k-qd32-flush32",
    "randwrite-4k-qd32-flush8",
    "writeflush-4k-qd1",
    "seqwrite-1m-qd4",
    "randwrite-4k-qd32-2q",
];

fn in_path(prog: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
}

/// The directory of the bench binary (`target/<profile>/`): vhost-mirror and access-node must
/// be there too.
fn bin_dir(bench: &Path) -> PathBuf {
    bench
        .parent()
        .expect("bench binary has a parent directory")
        .to_path_buf()
}

#[test]
fn smoke_run_writes_a_table_row_for_every_workload_and_system() {
    for prog in ["qemu-storage-daemon", "qemu-nbd"] {
        assert!(
            in_path(prog),
            "{prog} is not installed: the benchmark compares against QEMU. Install it with `bash \
             ci/setup.sh` (qemu-system-x86 + qemu-utils 10 from bookworm-backports)"
        );
    }
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_bench"));
    let dir = bin_dir(&bench);
    for b in ["vhost-mirror", "access-node"] {
        assert!(
            dir.join(b).is_file(),
            "{} is missing: build it first (`cargo build -p vhost-mirror -p access-node`, with \
             --release for a release test run)",
            dir.join(b).display()
        );
    }
    let out = tempfile::Builder::new()
        .prefix("bench-smoke-")
        .tempdir()
        .expect("temp dir");
    let t0 = Instant::now();
    // The bench's output goes to a file (shown on failure), not through the test harness.
    let log_path = out.path().join("bench-smoke.log");
    let log = std::fs::File::create(&log_path).expect("create log");
    let mut child = Command::new(&bench)
        .arg("--smoke")
        .arg("--baseline-bin-dir")
        .arg(&dir)
        .arg("--out")
        .arg(out.path())
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup log"))
        .stderr(log)
        .spawn()
        .expect("start bench --smoke");
    // The bench has its own watchdog; this one only guards against a hung test.
    let deadline = t0 + Duration::from_secs(240);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for bench") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "bench --smoke still running after 240 s; its output:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("bench --smoke took {:.1}s", t0.elapsed().as_secs_f64());
    let output = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        status.success(),
        "bench --smoke failed: {status}; its output:\n{output}"
    );
    eprintln!("{output}");

    let json_path = out.path().join("bench.json");
    let md_path = out.path().join("bench.md");
    let json_text = std::fs::read_to_string(&json_path)
        .unwrap_or_else(|e| panic!("{}: {e}", json_path.display()));
    let md =
        std::fs::read_to_string(&md_path).unwrap_or_else(|e| panic!("{}: {e}", md_path.display()));
    let v: serde_json::Value = serde_json::from_str(&json_text).expect("bench.json is JSON");

    // JSON: one result per (workload, system), each with a median.
    let results = v["results"].as_array().expect("results array");
    for w in WORKLOADS {
        for s in SYSTEMS {
            let r = results
                .iter()
                .find(|r| r["workload"] == *w && r["system"] == *s)
                .unwrap_or_else(|| panic!("bench.json has no result for {w} on {s}"));
            assert!(
                r["median"].is_object(),
                "bench.json: {w} on {s} has no median: {r}"
            );
            for k in ["iops", "mib_s", "lat_p50_us", "lat_p99_us", "cpu_s_per_gib"] {
                assert!(r["median"][k].is_number(), "{w} on {s}: {k} missing: {r}");
            }
        }
    }
    let ratios = v["ratios"].as_array().expect("ratios array");
    assert_eq!(ratios.len(), WORKLOADS.len(), "one ratio row per workload");
    for r in ratios {
        for k in [
            "mirror/mirror-base",
            "mirror/qemu-mirror",
            "mirror/local",
            "local/qsd",
            "local/qsd-best",
            "local/max(qsd,qsd-best)",
        ] {
            assert!(r[k].is_number(), "no {k} ratio: {r}");
        }
    }
    // The fsync workload: write+flush pairs, one flush per pair.
    let wf = results
        .iter()
        .find(|r| r["workload"] == "writeflush-4k-qd1" && r["system"] == "mirror")
        .expect("writeflush-4k-qd1 on mirror");
    assert!(
        wf["median"]["flush_mean_us"].is_number()
            && wf["median"]["lat_mean_us"].as_f64() >= wf["median"]["flush_mean_us"].as_f64(),
        "writeflush-4k-qd1: the pair's latency includes its flush: {wf}"
    );
    assert!(
        v["fsync_latency"]["mirror/local_mean"].is_number(),
        "fsync latency ratio missing: {}",
        v["fsync_latency"]
    );
    // Issue 10's ratios: every write workload against qemu-mirror, every workload against the
    // faster qsd, the fsync latency.
    let i10 = v["issue10_ratios"]
        .as_array()
        .expect("issue10_ratios array");
    let has = |ratio: &str, w: &str| {
        i10.iter()
            .any(|x| x["ratio"] == ratio && x["workload"] == w && x["value"].is_number())
    };
    for w in WORKLOADS {
        assert!(
            has("local/max(qsd, qsd-best)", w),
            "no local/max(qsd, qsd-best) for {w}"
        );
        if w.contains("write") {
            assert!(
                has("mirror/qemu-mirror", w),
                "no mirror/qemu-mirror for {w}"
            );
        }
    }
    for w in ["randwrite-4k-qd32", "seqwrite-1m-qd4"] {
        assert!(has("mirror/local", w), "no mirror/local for {w}");
    }
    assert!(
        has("fsync latency mirror/local (mean)", "writeflush-4k-qd1"),
        "no fsync latency ratio"
    );
    for r in [
        "resync / nbdcopy (same bytes)",
        "initial full sync / nbdcopy (same bytes)",
    ] {
        assert!(has(r, "-"), "no {r} in issue 10's ratios");
    }
    for r in [
        "vhost-mirror resident memory growth, MiB",
        "access-node resident memory growth, MiB",
    ] {
        assert!(has(r, "mixed"), "no {r} in issue 10's ratios");
    }
    assert!(
        v["targets"].as_array().is_some_and(|t| !t.is_empty()),
        "targets missing"
    );
    assert!(v["resync"].is_object(), "resync section missing");
    assert!(
        v["resync_baseline"].is_object(),
        "resync of mirror-base missing"
    );
    assert!(v["rss"].is_object(), "rss section missing");

    // Markdown: the throughput table has a column per system and a row per workload.
    let table: Vec<&str> = md
        .lines()
        .skip_while(|l| !l.starts_with("## Throughput"))
        .skip(1)
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .collect();
    assert!(!table.is_empty(), "bench.md has no throughput table:\n{md}");
    let header: Vec<&str> = table[0].split('|').map(str::trim).collect();
    for s in SYSTEMS {
        assert!(
            header.contains(s),
            "bench.md table header lacks {s}: {}",
            table[0]
        );
    }
    for w in WORKLOADS {
        let row = table
            .iter()
            .find(|l| l.split('|').nth(1).map(str::trim) == Some(*w))
            .unwrap_or_else(|| panic!("bench.md table has no row for {w}:\n{}", table.join("\n")));
        let cells = row.split('|').count();
        assert_eq!(
            cells,
            header.len(),
            "row for {w} has another number of cells than the header: {row}"
        );
    }
    assert!(md.contains("## Ratios"), "bench.md has no ratios table");
    assert!(
        md.contains("## Issue 10's ratios"),
        "bench.md has no table of issue 10's ratios"
    );
    assert!(
        md.contains("## Against the baseline build"),
        "bench.md has no mirror/mirror-base table"
    );
    assert!(
        md.contains("## Issue 5's targets"),
        "bench.md has no table of the first version's targets"
    );
    assert!(
        md.contains("## Where the time goes") && md.contains("| writeflush-4k-qd1 | mirror |"),
        "bench.md has no breakdown of the mirrored fsync's time"
    );
}
