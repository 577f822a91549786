//! libvirt for the VM tests (`tests/tests/libvirt.rs`, `tests/tests/failover.rs`): a
//! `qemu:///system` daemon that answers, the example domain XML with a test's paths in it, and
//! transient domains that are destroyed when dropped.
//!
//! Neither the development machines nor CI run systemd as PID 1, so nothing socket-activates
//! libvirt there: [`Libvirtd::ensure`] starts Debian 12's monolithic `libvirtd` (and `virtlogd`,
//! which libvirtd needs for QEMU's output and console logs and which it does not start by itself
//! for `qemu:///system`) when `qemu:///system` does not answer, and stops what it started when
//! dropped, also when the test panics. A daemon that already answered is used and left alone.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::vm::{require_tool, workspace_root};
use crate::{run_with_timeout, unique_id, wait_until, ChildGuard};

/// The connection every test uses (also what `images/failover.sh --libvirt` uses by default).
pub const URI: &str = "qemu:///system";
/// The example domain (firmware boot of the file-server guest through a vhost-user disk).
pub const EXAMPLE_XML: &str = "images/vhost-mirror-vm.xml";
/// What the example says, and the tests replace.
pub const EXAMPLE_NAME: &str = "<name>vhost-mirror-vm</name>";
pub const EXAMPLE_SOCKET: &str = "path='/run/vhost-mirror/vm0.sock'";
pub const EXAMPLE_CONSOLE_LOG: &str = "file='/var/log/libvirt/qemu/vhost-mirror-vm-console.log'";
pub const EXAMPLE_HOSTFWD: &str = "hostfwd=tcp:127.0.0.1:8080-:80";

const VIRTLOGD_SOCKET: &str = "/run/libvirt/virtlogd-sock";
const QEMU_LOG_DIR: &str = "/var/log/libvirt/qemu";
const DAEMON_TIMEOUT: Duration = Duration::from_secs(30);
const VIRSH_TIMEOUT: Duration = Duration::from_secs(120);

/// One libvirt user at a time in a test process: a daemon this process started is stopped when
/// its guard drops, so a second test must not be using it then.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// `qemu:///system` answering for as long as this lives.
pub struct Libvirtd {
    // Dropped in this order: libvirtd before the virtlogd it logs through, then the lock.
    libvirtd: Option<ChildGuard>,
    virtlogd: Option<ChildGuard>,
    _lock: MutexGuard<'static, ()>,
}

/// `virsh -c qemu:///system ARGS` with a timeout, whatever its exit status.
pub fn virsh(args: &[&str]) -> std::process::Output {
    run_with_timeout(
        Command::new("virsh").arg("-c").arg(URI).args(args),
        VIRSH_TIMEOUT,
    )
}

/// `virsh ARGS`; panics with its output unless it exits 0. Returns stdout.
pub fn virsh_ok(args: &[&str]) -> String {
    let out = virsh(args);
    assert!(
        out.status.success(),
        "virsh {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn answers() -> bool {
    run_with_timeout(
        Command::new("virsh").arg("-c").arg(URI).arg("uri"),
        Duration::from_secs(20),
    )
    .status
    .success()
}

impl Libvirtd {
    /// Makes `qemu:///system` answer, starting `virtlogd` and `libvirtd` (their output in
    /// `log_dir`) if needed. Fails loudly when libvirt is not installed.
    pub fn ensure(log_dir: &Path) -> Libvirtd {
        require_tool("virsh", "libvirt-clients");
        let libvirtd = daemon_path("libvirtd");
        let virtlogd = daemon_path("virtlogd");
        let lock = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        warn_if_kvm_hidden_from_qemu();
        let mut d = Libvirtd {
            libvirtd: None,
            virtlogd: None,
            _lock: lock,
        };
        if UnixStream::connect(VIRTLOGD_SOCKET).is_err() {
            d.virtlogd = Some(start(&virtlogd, &log_dir.join("virtlogd.log"), &|| {
                UnixStream::connect(VIRTLOGD_SOCKET).is_ok()
            }));
        }
        if answers() {
            eprintln!("libvirt: {URI} answers (a daemon this test did not start)");
        } else {
            d.libvirtd = Some(start(&libvirtd, &log_dir.join("libvirtd.log"), &answers));
        }
        d
    }

    /// Whether this guard started libvirtd (and stops it when dropped).
    pub fn started_here(&self) -> bool {
        self.libvirtd.is_some()
    }
}

/// A daemon of libvirt-daemon-system: in PATH, else in /usr/sbin (a PATH without the sbin
/// directories is common for scripts); fails loudly when it is not installed.
fn daemon_path(name: &str) -> PathBuf {
    let in_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    let path = in_path.unwrap_or_else(|| Path::new("/usr/sbin").join(name));
    assert!(
        path.is_file(),
        "the libvirt tests need `{name}` (Debian package libvirt-daemon-system); run ci/setup.sh"
    );
    path
}

/// Starts `program` in the foreground (so its PID is the one we stop) and waits until `ready`.
fn start(path: &Path, log: &Path, ready: &dyn Fn() -> bool) -> ChildGuard {
    let program = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    let program = program.as_str();
    let logf =
        std::fs::File::create(log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
    let t = Instant::now();
    let mut child = ChildGuard::spawn(
        program,
        Command::new(path)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup log fd"))
            .stderr(logf),
    );
    let ok = wait_until(DAEMON_TIMEOUT, || ready() || !child.is_running());
    if let Some(st) = child.try_wait() {
        panic!(
            "{program} exited ({st}) at start; its log {}:\n{}",
            log.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
    assert!(
        ok,
        "{program} (pid {}) did not answer within {DAEMON_TIMEOUT:?}; log {}",
        child.pid(),
        log.display()
    );
    eprintln!(
        "libvirt: started {program} (pid {}) in {:.1} s, log {}",
        child.pid(),
        t.elapsed().as_secs_f64(),
        log.display()
    );
    child
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        for (name, guard) in [
            ("libvirtd", self.libvirtd.take()),
            ("virtlogd", self.virtlogd.take()),
        ] {
            let Some(mut child) = guard else { continue };
            child.signal(libc::SIGTERM);
            match child.wait_timeout(DAEMON_TIMEOUT) {
                Some(st) => eprintln!("libvirt: stopped {name} ({st})"),
                None => {
                    eprintln!(
                        "libvirt: {name} still running {DAEMON_TIMEOUT:?} after SIGTERM; SIGKILL"
                    );
                    child.kill();
                }
            }
        }
    }
}

/// libvirt checks, before it uses its cache of a QEMU binary's capabilities, that KVM is as
/// usable by QEMU's user as it was when it probed; QEMU's user is not root (libvirt-qemu). Without
/// udev, /dev/kvm stays root's 0600 (udev makes it 0660 group kvm), the check fails every time and
/// libvirt probes QEMU again about a dozen times per `virsh create`: a minute here. ci/setup.sh
/// sets what udev would; this says why a test is slow when that was not done.
fn warn_if_kvm_hidden_from_qemu() {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::metadata("/dev/kvm") else {
        return;
    };
    if m.mode() & 0o060 != 0o060 {
        eprintln!(
            "libvirt: WARNING: /dev/kvm is mode {:o} (gid {}): libvirt will re-probe QEMU on every \
             domain start (about a minute each); ci/setup.sh makes it 0660 group kvm as udev does",
            m.mode() & 0o7777,
            m.gid()
        );
    }
}

/// The group QEMU runs as under libvirt (`group` in /etc/libvirt/qemu.conf; Debian's default
/// is libvirt-qemu, whose only member is QEMU's user libvirt-qemu).
pub fn qemu_group() -> String {
    let conf = std::fs::read_to_string("/etc/libvirt/qemu.conf").unwrap_or_default();
    for line in conf.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("group") {
            if let Some(value) = rest.trim_start().strip_prefix('=') {
                let v = value.trim().trim_matches('"');
                if !v.is_empty() {
                    return v.to_string();
                }
            }
        }
    }
    "libvirt-qemu".to_string()
}

/// Lets `group` (QEMU under libvirt) reach files in `dir` by name: group `group`, mode 0710. A
/// test's temp dir is root's 0700, which QEMU's user cannot pass to reach the vhost-user socket.
pub fn open_dir_to_group(dir: &Path, group: &str) {
    let out = run_with_timeout(
        Command::new("chgrp").arg(group).arg(dir),
        Duration::from_secs(10),
    );
    assert!(
        out.status.success(),
        "chgrp {group} {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o710))
        .unwrap_or_else(|e| panic!("chmod 0710 {}: {e}", dir.display()));
}

/// A unique domain name for this test process.
pub fn unique_name(what: &str) -> String {
    format!("vhost-mirror-{what}-{}-{}", std::process::id(), unique_id())
}

/// The example domain XML with `name`, the vhost-user `socket`, the `console` log and the
/// file server's host `port` put in. Panics if the example no longer says what is replaced.
pub fn example_domain(name: &str, socket: &Path, console: &Path, port: u16) -> String {
    let path = workspace_root().join(EXAMPLE_XML);
    let mut xml =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    for (from, to) in [
        (EXAMPLE_NAME, format!("<name>{name}</name>")),
        (EXAMPLE_SOCKET, format!("path='{}'", socket.display())),
        (EXAMPLE_CONSOLE_LOG, format!("file='{}'", console.display())),
        (EXAMPLE_HOSTFWD, format!("hostfwd=tcp:127.0.0.1:{port}-:80")),
    ] {
        assert_eq!(
            xml.matches(from).count(),
            1,
            "{EXAMPLE_XML} must contain {from:?} exactly once"
        );
        xml = xml.replace(from, &to);
    }
    xml
}

/// libvirt's log of a domain's QEMU (its command line and stderr).
pub fn qemu_log(name: &str) -> PathBuf {
    Path::new(QEMU_LOG_DIR).join(format!("{name}.log"))
}

/// Whether `name` is a running domain (a transient domain that stopped is gone).
pub fn is_running(name: &str) -> bool {
    let out = virsh(&["domstate", name]);
    out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "running"
}

/// A domain by name, destroyed when dropped (if it still runs), and its libvirt QEMU log removed
/// (it is printed first if the test panics). Declare it after the [`Libvirtd`] guard.
pub struct Domain {
    name: String,
    keep_log: bool,
}

impl Domain {
    /// `virsh create XML_FILE`: a transient domain, gone once it stops.
    pub fn create(xml_file: &Path, name: &str) -> Domain {
        let d = Domain::watch(name);
        let file = xml_file.display().to_string();
        virsh_ok(&["create", &file]);
        d
    }

    /// Takes charge of a domain someone else starts (e.g. `images/failover.sh --libvirt`).
    pub fn watch(name: &str) -> Domain {
        // A log left by an earlier run of the same name would be appended to.
        let _ = std::fs::remove_file(qemu_log(name));
        Domain {
            name: name.to_string(),
            keep_log: std::env::var_os("VHOST_MIRROR_KEEP_LOGS").is_some_and(|v| v != "0"),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn is_running(&self) -> bool {
        is_running(&self.name)
    }

    /// Waits until the domain no longer runs; false after `timeout`.
    pub fn wait_stopped(&self, timeout: Duration) -> bool {
        wait_until(timeout, || !self.is_running())
    }

    /// The PID of the domain's QEMU (libvirt's pid file), while it runs.
    pub fn qemu_pid(&self) -> Option<u32> {
        std::fs::read_to_string(format!("/run/libvirt/qemu/{}.pid", self.name))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        if self.is_running() {
            let out = virsh(&["destroy", &self.name]);
            eprintln!(
                "libvirt: destroyed domain {} ({}){}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let log = qemu_log(&self.name);
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("==== libvirt QEMU log {} (last 30 lines)", log.display());
            for l in &lines[lines.len().saturating_sub(30)..] {
                eprintln!("  {l}");
            }
        }
        if !self.keep_log {
            let _ = std::fs::remove_file(&log);
        }
    }
}
