//! `serve --config FILE` of both programs, `Type=notify` and the systemd units (issue 13,
//! item 3): a mirrored pair run from config files alone; command-line options overriding the
//! file; an unknown key, a bad value and a file that is not TOML refused with the file named;
//! READY=1 sent only once the sockets accept connections (STOPPING=1 on SIGTERM);
//! `systemd-analyze verify` of `systemd/*.service`.
//!
//! Every process is killed on drop, also when an assertion fails.

use std::fs::File;
use std::net::TcpStream;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use vhost_mirror_tests::{
    bin_path, create_image, free_port, is_in_sync, run_with_timeout, secret_file, status_str,
    status_u64, test_dir, wait_until, ChildGuard, Client, Watchdog, TIMEOUT,
};

const MIB: u64 = 1 << 20;

/// A `serve` of one of our programs, its output in a log file; killed on drop (its log
/// printed if the test panics).
struct Served {
    child: ChildGuard,
    log: PathBuf,
}

impl Served {
    /// Starts `bin serve ARGS...` (with `env`); waits for nothing.
    fn spawn(dir: &Path, bin: &str, args: &[&str], env: &[(&str, &str)]) -> Served {
        let log = dir.join(format!("{bin}-{}.log", vhost_mirror_tests::unique_id()));
        let logf = File::create(&log).expect("create log");
        let mut cmd = Command::new(bin_path(bin));
        cmd.arg("serve")
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup log fd"))
            .stderr(logf);
        Served {
            child: ChildGuard::spawn(bin, &mut cmd),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `path` exists; panics with the log if the process exits first.
    fn wait_for(&mut self, path: &Path) {
        let ok = wait_until(TIMEOUT, || path.exists() || !self.child.is_running());
        if let Some(st) = self.child.try_wait() {
            panic!(
                "{} exited ({st}) before creating {}; log:\n{}",
                self.child.name(),
                path.display(),
                self.log()
            );
        }
        assert!(ok, "{} not created within {TIMEOUT:?}", path.display());
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- log of {} ----\n{}---- end ----",
                self.child.name(),
                self.log()
            );
        }
    }
}

/// Writes `text` to `dir/name` (mode 0644, as root's files in /etc are) and returns its path.
fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    p
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// `BIN status --control CTL --json`, parsed.
fn status(bin: &str, control: &Path) -> serde_json::Value {
    let out = run_with_timeout(
        Command::new(bin_path(bin))
            .args(["status", "--json", "--control"])
            .arg(control),
        TIMEOUT,
    );
    assert!(
        out.status.success(),
        "{bin} status failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json is JSON")
}

#[test]
fn a_mirrored_pair_runs_from_config_files_alone() {
    let _wd = Watchdog::new("config pair", Duration::from_secs(120));
    let dir = test_dir("config-pair");
    let d = dir.path();
    let secret = secret_file(d, "config-files-secret-0123456789");
    let primary_img = d.join("primary.raw");
    create_image(&primary_img, 8 * MIB);
    let port = free_port();
    let (sock, ctl, node_ctl) = (d.join("vm.sock"), d.join("vm.ctl"), d.join("node.ctl"));

    let node_cfg = write_config(
        d,
        "replica.toml",
        &format!(
            "# the replica\nimage = \"{}\"\nlisten = \"127.0.0.1:{port}\"\n\
             secret-file = \"{}\"\ncontrol = \"{}\"\ncache-mb = 4\n",
            s(&d.join("replica.raw")),
            s(&secret),
            s(&node_ctl)
        ),
    );
    let mut node = Served::spawn(d, "access-node", &["--config", s(&node_cfg)], &[]);
    node.wait_for(&node_ctl);
    let v = status("access-node", &node_ctl);
    assert_eq!(status_u64(&v, "cache_capacity_bytes"), 4 * MIB, "{v}");

    let primary_cfg = write_config(
        d,
        "primary.toml",
        &format!(
            "image = \"{}\"\nsocket = \"{}\"\ncontrol = \"{}\"\nnum-queues = 2\n\
             queue-size = 128\npeer = \"127.0.0.1:{port}\"\nsecret-file = \"{}\"\n\
             on-peer-loss = \"degrade\"\nresync-rate = 100\n",
            s(&primary_img),
            s(&sock),
            s(&ctl),
            s(&secret)
        ),
    );
    let mut primary = Served::spawn(d, "vhost-mirror", &["--config", s(&primary_cfg)], &[]);
    primary.wait_for(&ctl);
    let mut last = serde_json::Value::Null;
    let synced = wait_until(Duration::from_secs(30), || {
        last = status("vhost-mirror", &ctl);
        is_in_sync(&last)
    });
    assert!(synced, "not in sync: {last}");
    assert_eq!(status_u64(&last, "num_queues"), 2, "{last}");
    assert_eq!(status_u64(&last, "queue_size"), 128, "{last}");
    assert_eq!(status_str(&last, "image"), s(&primary_img), "{last}");

    // A frontend gets the disk.
    let c = Client::connect(&sock);
    assert_eq!(c.capacity(), 8 * MIB);
    drop(c);

    assert!(primary.child.terminate(TIMEOUT).success());
    assert!(node.child.terminate(TIMEOUT).success());
}

#[test]
fn command_line_options_override_the_file() {
    let _wd = Watchdog::new("config override", Duration::from_secs(60));
    let dir = test_dir("config-override");
    let d = dir.path();
    let img = d.join("disk.raw");
    create_image(&img, 4 * MIB);
    let (file_ctl, cli_ctl) = (d.join("file.ctl"), d.join("cli.ctl"));
    let cfg = write_config(
        d,
        "vm.toml",
        &format!(
            "image = \"{}\"\nsocket = \"{}\"\ncontrol = \"{}\"\nnum-queues = 2\nqueue-size = 64\n",
            s(&img),
            s(&d.join("vm.sock")),
            s(&file_ctl)
        ),
    );
    let mut b = Served::spawn(
        d,
        "vhost-mirror",
        &[
            "--num-queues",
            "3",
            "--config",
            s(&cfg),
            "--control",
            s(&cli_ctl),
        ],
        &[],
    );
    b.wait_for(&cli_ctl);
    let v = status("vhost-mirror", &cli_ctl);
    assert!(!file_ctl.exists(), "the file's control socket was made too");
    // From the command line, and from the file where the command line said nothing.
    assert_eq!(status_u64(&v, "num_queues"), 3, "{v}");
    assert_eq!(status_u64(&v, "queue_size"), 64, "{v}");
    assert!(b.child.terminate(TIMEOUT).success());

    // The same for access-node: --listen and --cache-mb here beat the file's.
    let secret = secret_file(d, "config-files-secret-0123456789");
    let node_ctl = d.join("node.ctl");
    let port = free_port();
    let cfg = write_config(
        d,
        "replica.toml",
        &format!(
            "image = \"{}\"\nlisten = \"127.0.0.1:1\"\nsecret-file = \"{}\"\n\
             control = \"{}\"\ncache-mb = 4\n",
            s(&d.join("replica.raw")),
            s(&secret),
            s(&node_ctl)
        ),
    );
    let listen = format!("127.0.0.1:{port}");
    let mut n = Served::spawn(
        d,
        "access-node",
        &["--config", s(&cfg), "--listen", &listen, "--cache-mb", "2"],
        &[],
    );
    n.wait_for(&node_ctl);
    let v = status("access-node", &node_ctl);
    assert_eq!(status_u64(&v, "cache_capacity_bytes"), 2 * MIB, "{v}");
    assert!(
        wait_until(TIMEOUT, || n
            .log()
            .contains(&format!("listening on {listen}"))),
        "{}",
        n.log()
    );
    assert!(n.child.terminate(TIMEOUT).success());
}

#[test]
fn bad_config_files_are_refused_naming_the_file() {
    let dir = test_dir("config-bad");
    let d = dir.path();
    let cases = [
        // (file name, content, what the message must also name)
        (
            "unknown-key.toml",
            "image = \"a.raw\"\nsockett = \"b.sock\"\n",
            "sockett",
        ),
        ("bad-value.toml", "num-queues = \"many\"\n", "num-queues"),
        ("bad-value2.toml", "cache-mb = true\n", "cache-mb"),
        (
            "not-toml.toml",
            "--image a.raw --socket b.sock\n",
            "not-toml.toml",
        ),
        ("binary.toml", "\u{0}\u{1}\u{2}\u{7f}", "binary.toml"),
    ];
    for bin in ["vhost-mirror", "access-node"] {
        for (name, text, needle) in cases {
            let p = write_config(d, name, text);
            let out = run_with_timeout(
                Command::new(bin_path(bin))
                    .args(["serve", "--config"])
                    .arg(&p),
                TIMEOUT,
            );
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{bin} {name}: exit 0; {err}");
            assert_eq!(out.status.code(), Some(1), "{bin} {name}: {err}");
            assert!(
                err.contains(s(&p)),
                "{bin} {name}: the file is not named: {err}"
            );
            assert!(
                err.contains(needle),
                "{bin} {name}: {needle} not named: {err}"
            );
            assert!(!err.contains("panicked"), "{bin} {name}: {err}");
        }
        // A file others may write is refused too (it may name a command run as root).
        let p = write_config(d, "writable.toml", "");
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o666))
            .expect("chmod");
        let out = run_with_timeout(
            Command::new(bin_path(bin))
                .args(["serve", "--config"])
                .arg(&p),
            TIMEOUT,
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(s(&p)), "{bin}: {err}");
        assert!(err.contains("other users"), "{bin}: {err}");
        // Required options from neither place.
        let p = write_config(d, "empty.toml", "# nothing\n");
        let out = run_with_timeout(
            Command::new(bin_path(bin))
                .args(["serve", "--config"])
                .arg(&p),
            TIMEOUT,
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bin}: {err}");
        assert!(err.contains("--image is required"), "{bin}: {err}");
    }
}

/// Receives one datagram from the notification socket, or None after `timeout`.
fn recv_notification(sock: &UnixDatagram, timeout: Duration) -> Option<String> {
    sock.set_read_timeout(Some(timeout)).expect("set timeout");
    let mut buf = [0u8; 4096];
    match sock.recv(&mut buf) {
        Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Err(e)
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut =>
        {
            None
        }
        Err(e) => panic!("recv on the notification socket: {e}"),
    }
}

/// Waits for READY=1 from `served`; panics with its log if it does not come.
fn expect_ready(served: &mut Served, sock: &UnixDatagram) -> String {
    let msg = recv_notification(sock, TIMEOUT).unwrap_or_else(|| {
        panic!(
            "no notification within {TIMEOUT:?} (running: {}); log:\n{}",
            served.child.is_running(),
            served.log()
        )
    });
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg:?}");
    msg
}

/// SIGTERM: STOPPING=1 arrives, and the process exits 0.
fn expect_stopping(served: &mut Served, sock: &UnixDatagram) {
    served.child.signal(libc::SIGTERM);
    let msg = recv_notification(sock, TIMEOUT).expect("STOPPING=1 after SIGTERM");
    assert_eq!(msg, "STOPPING=1");
    let st = served
        .child
        .wait_timeout(TIMEOUT)
        .expect("exit after SIGTERM");
    assert!(st.success(), "{st}");
}

#[test]
fn ready_is_sent_once_the_sockets_accept_connections() {
    let _wd = Watchdog::new("notify", Duration::from_secs(60));
    let dir = test_dir("config-notify");
    let d = dir.path();

    // vhost-mirror, to a notification socket at a path.
    let notify_path = d.join("notify");
    let notify = UnixDatagram::bind(&notify_path).expect("bind notification socket");
    let img = d.join("disk.raw");
    create_image(&img, 4 * MIB);
    let (sock, ctl) = (d.join("vm.sock"), d.join("vm.ctl"));
    let cfg = write_config(
        d,
        "vm.toml",
        &format!(
            "image = \"{}\"\nsocket = \"{}\"\ncontrol = \"{}\"\n",
            s(&img),
            s(&sock),
            s(&ctl)
        ),
    );
    let mut b = Served::spawn(
        d,
        "vhost-mirror",
        &["--config", s(&cfg)],
        &[("NOTIFY_SOCKET", s(&notify_path))],
    );
    let msg = expect_ready(&mut b, &notify);
    // Both sockets take connections the moment READY=1 is out.
    UnixStream::connect(&ctl).expect("control socket accepts when READY=1 arrives");
    UnixStream::connect(&sock).expect("vhost-user socket accepts when READY=1 arrives");
    assert!(
        msg.contains(&format!("STATUS=serving {}", s(&img))),
        "{msg:?}"
    );
    expect_stopping(&mut b, &notify);

    // access-node, to an abstract socket (`@name`, as systemd sets it).
    let name = format!("vhost-mirror-test-notify-{}", std::process::id());
    let addr = {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("name")
    };
    let notify = UnixDatagram::bind_addr(&addr).expect("bind abstract notification socket");
    let secret = secret_file(d, "config-files-secret-0123456789");
    let port = free_port();
    let node_ctl = d.join("node.ctl");
    let cfg = write_config(
        d,
        "replica.toml",
        &format!(
            "image = \"{}\"\nlisten = \"127.0.0.1:{port}\"\nsecret-file = \"{}\"\n\
             control = \"{}\"\n",
            s(&d.join("replica.raw")),
            s(&secret),
            s(&node_ctl)
        ),
    );
    let abstract_name = format!("@{name}");
    let mut n = Served::spawn(
        d,
        "access-node",
        &["--config", s(&cfg)],
        &[("NOTIFY_SOCKET", &abstract_name)],
    );
    expect_ready(&mut n, &notify);
    TcpStream::connect(("127.0.0.1", port)).expect("listener accepts when READY=1 arrives");
    UnixStream::connect(&node_ctl).expect("control socket accepts when READY=1 arrives");
    expect_stopping(&mut n, &notify);

    // Not ready when it cannot listen: the port is taken, nothing is sent, exit 1.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy_port = busy.local_addr().expect("addr").port();
    let mut n = Served::spawn(
        d,
        "access-node",
        &[
            "--config",
            s(&cfg),
            "--listen",
            &format!("127.0.0.1:{busy_port}"),
        ],
        &[("NOTIFY_SOCKET", &abstract_name)],
    );
    let st = n.child.wait_timeout(TIMEOUT).expect("exits");
    assert_eq!(st.code(), Some(1), "{}", n.log());
    assert_eq!(recv_notification(&notify, Duration::from_millis(200)), None);
}

/// The repository's `systemd/` directory.
fn systemd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("systemd")
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let analyze = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "systemd-analyze not found ({e}): install Debian's systemd package (ci/setup.sh)"
            )
        });
    assert!(analyze.status.success(), "systemd-analyze --version failed");
    let dir = test_dir("config-units");
    let mut verified = 0;
    for (unit, bin, config) in [
        (
            "vhost-mirror@.service",
            "vhost-mirror",
            "/etc/vhost-mirror/%i.toml",
        ),
        (
            "access-node@.service",
            "access-node",
            "/etc/vhost-mirror/access-node/%i.toml",
        ),
    ] {
        let text = std::fs::read_to_string(systemd_dir().join(unit))
            .unwrap_or_else(|e| panic!("read systemd/{unit}: {e}"));
        let exec = format!("ExecStart=/usr/bin/{bin} serve --config {config}\n");
        assert!(text.contains(&exec), "{unit} lacks {exec:?}");
        assert!(
            text.contains("\nType=notify\n"),
            "{unit} is not Type=notify"
        );
        // verify checks that ExecStart's program exists: the one just built stands in for
        // /usr/bin's.
        let local = text.replace(
            &format!("ExecStart=/usr/bin/{bin} "),
            &format!("ExecStart={} ", s(&bin_path(bin))),
        );
        let copy = dir.path().join(unit);
        std::fs::write(&copy, local).expect("write unit copy");
        // --man=no: the units' Documentation= man pages are the Debian package's (not
        // installed here; tests/tests/package.rs checks them in the installed tree).
        let out = run_with_timeout(
            Command::new("systemd-analyze")
                .args(["verify", "--man=no"])
                .arg(&copy),
            Duration::from_secs(60),
        );
        let (so, se) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        // verify exits 0 on unknown keys and bad values too (it only warns): silence is the
        // pass.
        assert!(
            out.status.success() && so.trim().is_empty() && se.trim().is_empty(),
            "systemd-analyze verify {unit}: {}\nstdout:\n{so}\nstderr:\n{se}",
            out.status
        );
        verified += 1;
    }
    assert_eq!(verified, 2);
}
