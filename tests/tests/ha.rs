//! The Pacemaker integration's pieces that need no cluster (issue 11, item 2): the OCF
//! resource agents `ha/ocf/vhost-mirror` (the disk) and `ha/ocf/vm` (a QEMU command line) pass
//! `ocf-tester` (package resource-agents), which runs their actions in the order a cluster
//! would (start, monitor, promote, demote, a second start and stop, ...) against real processes
//! and checks each exit code.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use vhost_mirror_tests::{
    bin_dir, bin_path, free_port, run_with_timeout, secret_file, test_dir, Watchdog,
};

/// Kills whatever the agent's pid files still name when dropped (the agent starts its daemons
/// in their own sessions: a failed run could leave them behind).
struct Daemons(PathBuf, &'static [&'static str]);

impl Drop for Daemons {
    fn drop(&mut self) {
        for f in self.1 {
            if let Some(pid) = std::fs::read_to_string(self.0.join(f))
                .ok()
                .and_then(|p| p.split_whitespace().next()?.parse::<i32>().ok())
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

fn require_ocf_tester() {
    assert!(
        std::path::Path::new("/usr/sbin/ocf-tester").exists(),
        "ocf-tester not found: install resource-agents and libxml2-utils (bash ci/setup.sh)"
    );
}

#[test]
fn the_ocf_agent_passes_ocf_tester() {
    let _wd = Watchdog::new("the_ocf_agent_passes_ocf_tester", Duration::from_secs(180));
    require_ocf_tester();
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
    let _daemons = Daemons(
        run_dir.clone(),
        &["disk.vhost-mirror.pid", "disk.access-node.pid"],
    );
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

/// The VM agent (`ha/ocf/vm`, a plain QEMU command line; here a stand-in that runs until
/// killed): ocf-tester's sequence; start waits for the disk's socket; a command that exits at
/// once fails the start; stop ends the process.
#[test]
fn the_vm_agent_passes_ocf_tester() {
    let _wd = Watchdog::new("the_vm_agent_passes_ocf_tester", Duration::from_secs(120));
    require_ocf_tester();
    let dir = test_dir("ocf-vm");
    let run_dir = dir.path().join("run");
    let sock = dir.path().join("disk.sock");
    let vm_agent = agent().with_file_name("vm");
    let _daemons = Daemons(run_dir.clone(), &["vm.vm.pid"]);
    let run = |action: &str, command: &str| {
        run_with_timeout(
            Command::new(&vm_agent)
                .arg(action)
                .env("OCF_ROOT", "/usr/lib/ocf")
                .env("OCF_RESOURCE_INSTANCE", "vm")
                .env("OCF_RESKEY_command", command)
                .env("OCF_RESKEY_socket", &sock)
                .env("OCF_RESKEY_run_dir", &run_dir)
                .env("OCF_RESKEY_CRM_meta_timeout", "8000"),
            Duration::from_secs(30),
        )
    };
    // No socket yet: start waits for it, and gives up within its timeout.
    let t = std::time::Instant::now();
    let out = run("start", "sleep 600");
    assert_eq!(
        out.status.code(),
        Some(1),
        "start without a socket: {out:?}"
    );
    assert!(t.elapsed() >= Duration::from_secs(2), "start did not wait");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind socket");
    let out = run("start", "exit 3");
    assert_eq!(
        out.status.code(),
        Some(1),
        "a command that exits at once: {out:?}"
    );
    assert_eq!(run("monitor", "exit 3").status.code(), Some(7));

    let out = run_with_timeout(
        Command::new("ocf-tester")
            .arg("-v")
            .arg("-n")
            .arg("vm")
            .arg("-o")
            .arg("command=sleep 600")
            .arg("-o")
            .arg(format!("socket={}", sock.display()))
            .arg("-o")
            .arg(format!("run_dir={}", run_dir.display()))
            .arg("-o")
            .arg("stop_timeout=5")
            .arg(&vm_agent),
        Duration::from_secs(100),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("passed all tests"),
        "ocf-tester failed ({}):\n{text}",
        out.status
    );

    // Started, it runs and is monitored; stopped, the process is gone.
    assert_eq!(run("start", "sleep 600").status.code(), Some(0));
    let pid: i32 = std::fs::read_to_string(run_dir.join("vm.vm.pid"))
        .expect("pid file")
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("pid");
    assert_eq!(run("monitor", "sleep 600").status.code(), Some(0));
    assert_eq!(run("stop", "sleep 600").status.code(), Some(0));
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the VM process {pid} outlived stop"
    );
    assert_eq!(run("monitor", "sleep 600").status.code(), Some(7));
}

/// README "Running under Pacemaker": its `pcs` commands, run as written (through `pcs -f` on
/// an empty CIB file, with the two agents visible where Pacemaker looks for them, in a mount
/// namespace of the test's own), make a configuration Pacemaker accepts (`crm_verify`; fencing
/// switched off only for the check, a real cluster needs a fence device) with the promotable
/// clone, the VM, and the VM colocated with and ordered after the promotion.
#[test]
fn the_readme_pcs_commands_make_a_valid_configuration() {
    let _wd = Watchdog::new(
        "the_readme_pcs_commands_make_a_valid_configuration",
        Duration::from_secs(120),
    );
    for tool in [
        "/usr/sbin/pcs",
        "/usr/sbin/crm_verify",
        "/usr/sbin/cibadmin",
    ] {
        assert!(
            std::path::Path::new(tool).exists(),
            "{tool} not found: install pcs and pacemaker-cli-utils (bash ci/setup.sh)"
        );
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let section = readme
        .split("### Running under Pacemaker")
        .nth(1)
        .expect("README has a section \"Running under Pacemaker\"");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a sh block in that section");
    // The pcs commands with their continuation lines.
    let mut commands = Vec::new();
    let mut current = String::new();
    for line in block.lines() {
        if current.is_empty() && !line.starts_with("pcs ") {
            continue;
        }
        current.push_str(line);
        current.push('\n');
        if !line.ends_with('\\') {
            commands.push(std::mem::take(&mut current));
        }
    }
    assert!(
        commands.len() >= 4,
        "expected the pcs commands in README's block, found {commands:?}"
    );
    let dir = test_dir("pcs");
    let ocf = dir.path().join("ocf/vhost-mirror");
    std::fs::create_dir_all(&ocf).expect("mkdir");
    std::fs::copy(agent(), ocf.join("disk")).expect("copy disk agent");
    std::fs::copy(agent().with_file_name("vm"), ocf.join("vm")).expect("copy vm agent");
    let cib = dir.path().join("cib.xml");
    let out = run_with_timeout(
        Command::new("sh")
            .arg("-c")
            .arg(format!("cibadmin --empty > '{}'", cib.display())),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "cibadmin --empty: {out:?}");
    let script = format!(
        "set -e\nmount -t overlay overlay -o 'lowerdir={}:/usr/lib/ocf/resource.d' /usr/lib/ocf/resource.d\n\
         pcs() {{ command pcs -f '{}' \"$@\"; }}\n{}",
        dir.path().join("ocf").display(),
        cib.display(),
        commands.concat()
    );
    let out = run_with_timeout(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "bash", "-c"])
            .arg(&script),
        Duration::from_secs(90),
    );
    assert!(
        out.status.success(),
        "README's pcs commands failed:\n{script}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run_with_timeout(
        Command::new("sh").arg("-c").arg(format!(
            "pcs -f '{0}' property set stonith-enabled=false && crm_verify -V -x '{0}'",
            cib.display()
        )),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "crm_verify refuses the configuration: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let xml = std::fs::read_to_string(&cib).expect("read cib");
    for needle in [
        r#"type="disk""#,
        r#"type="vm""#,
        r#"name="promotable" value="true""#,
        r#"with-rsc-role="Promoted""#,
        r#"first-action="promote""#,
    ] {
        assert!(xml.contains(needle), "{needle} not in the CIB:\n{xml}");
    }
}
