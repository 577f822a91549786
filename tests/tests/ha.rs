//! The Pacemaker integration's pieces that need no cluster (issue 11, item 2): the OCF
//! resource agent `ha/ocf/vhost-mirror` passes `ocf-tester` (package resource-agents), which
//! runs its actions in the order a cluster would (start, monitor, promote, demote, a second
//! start and stop, ...) against the real binaries and checks each exit code.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use vhost_mirror_tests::{
    bin_dir, bin_path, free_port, run_with_timeout, secret_file, test_dir, Watchdog,
};

/// Kills whatever the agent's pid files still name when dropped (the agent starts its daemons
/// in their own sessions: a failed run could leave them behind).
struct Daemons(PathBuf);

impl Drop for Daemons {
    fn drop(&mut self) {
        for f in ["disk.vhost-mirror.pid", "disk.access-node.pid"] {
            if let Some(pid) = std::fs::read_to_string(self.0.join(f))
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
                .filter(|p| *p > 1)
            {
                // SAFETY: kill(2) with a pid the agent recorded for a daemon it started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

fn agent() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("ha/ocf/vhost-mirror")
}

#[test]
fn the_ocf_agent_passes_ocf_tester() {
    let _wd = Watchdog::new("the_ocf_agent_passes_ocf_tester", Duration::from_secs(180));
    assert!(
        std::path::Path::new("/usr/sbin/ocf-tester").exists(),
        "ocf-tester not found: install resource-agents and libxml2-utils (bash ci/setup.sh)"
    );
    let dir = test_dir("ocf-agent");
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(16 << 20))
        .expect("create image");
    let secret = secret_file(dir.path(), "the ocf agent's secret 0123\n");
    // The first primary's image: promoted by hand once (the cluster bootstrap step).
    let out = run_with_timeout(
        Command::new(bin_path("access-node"))
            .arg("promote")
            .arg("--image")
            .arg(&image)
            .arg("--force"),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "bootstrap promote: {out:?}");
    let node = String::from_utf8(
        Command::new("uname")
            .arg("-n")
            .output()
            .expect("uname")
            .stdout,
    )
    .expect("utf-8");
    let run_dir = dir.path().join("run");
    let _daemons = Daemons(run_dir.clone());
    let out = run_with_timeout(
        Command::new("ocf-tester")
            .arg("-v")
            .arg("-n")
            .arg("disk")
            .arg("-o")
            .arg(format!("image={}", image.display()))
            .arg("-o")
            .arg(format!(
                "peers={}=127.0.0.1:{} other=127.0.0.1:{}",
                node.trim(),
                free_port(),
                free_port()
            ))
            .arg("-o")
            .arg(format!("secret_file={}", secret.display()))
            .arg("-o")
            .arg(format!("run_dir={}", run_dir.display()))
            .arg("-o")
            .arg(format!("bindir={}", bin_dir().display()))
            .arg(agent()),
        Duration::from_secs(150),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let log = std::fs::read_to_string(run_dir.join("disk.log")).unwrap_or_default();
    assert!(
        out.status.success() && text.contains("passed all tests"),
        "ocf-tester failed ({}):\n{text}\nagent's daemons' log:\n{log}",
        out.status
    );
    for action in [
        "promote",
        "demote",
        "promotion of promoted resource",
        "stopping a stopped",
    ] {
        assert!(
            text.contains(action),
            "ocf-tester did not test {action}:\n{text}"
        );
    }
    // Every daemon the agent started is gone (its last action was stop).
    for pid in ["disk.vhost-mirror.pid", "disk.access-node.pid"] {
        assert!(!run_dir.join(pid).exists(), "{pid} left behind");
    }
}
