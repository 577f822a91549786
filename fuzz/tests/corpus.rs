//! Replays the committed seed corpora (`corpus/<target>/`) and the inputs of fixed findings
//! (`regressions/<target>/`) through the fuzz targets' functions, without libFuzzer:
//! `cargo test --no-default-features` (the test command's fuzz tier).

use std::path::Path;

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 7] = [
    ("frame_decode", vhost_mirror_fuzz::frame_decode::run),
    ("framed_reader", vhost_mirror_fuzz::framed_reader::run),
    ("secure_records", vhost_mirror_fuzz::secure_records::run),
    ("virtio_request", vhost_mirror_fuzz::virtio_request::run),
    ("meta_parsers", vhost_mirror_fuzz::meta_parsers::run),
    ("control_line", vhost_mirror_fuzz::control_line::run),
    (
        "generation_decide",
        vhost_mirror_fuzz::generation_decide::run,
    ),
];

fn replay(dir: &str, required: bool) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    for (name, run) in TARGETS {
        let d = root.join(name);
        let Ok(entries) = std::fs::read_dir(&d) else {
            assert!(!required, "{} is missing", d.display());
            continue;
        };
        let mut files: Vec<_> = entries.map(|e| e.expect("dir entry").path()).collect();
        files.sort();
        assert!(!required || !files.is_empty(), "{} is empty", d.display());
        for f in files {
            let data = std::fs::read(&f).expect("read input");
            let r = std::panic::catch_unwind(|| run(&data));
            assert!(r.is_ok(), "{name}: {} fails", f.display());
        }
        eprintln!("{name}: {dir} replayed");
    }
}

#[test]
fn seed_corpora_pass() {
    replay("corpus", true);
}

#[test]
fn fixed_findings_stay_fixed() {
    replay("regressions", false);
}

/// Regenerates `corpus/` from `src/seeds.rs`:
/// `cargo test --no-default-features -- --ignored write_seeds`.
#[test]
#[ignore]
fn write_seeds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (name, _) in TARGETS {
        let _ = std::fs::remove_dir_all(root.join(name));
        std::fs::create_dir_all(root.join(name)).expect("corpus dir");
    }
    for (target, file, bytes) in vhost_mirror_fuzz::seeds::all() {
        std::fs::write(root.join(target).join(file), bytes).expect("write seed");
    }
}
