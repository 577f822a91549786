//! Local socket access (issue 9, item 4): the vhost-user socket and both control sockets are
//! created 0600 whatever the umask (0660 and the group's with `--socket-group`), and every
//! connection's peer credentials are checked (SO_PEERCRED), so another local user gets nothing
//! even through a socket file made world-writable.
//!
//! Needs root: the "other user" is `nobody` (65534), through `setpriv` for our CLIs and through
//! a thread with its own credentials (`on_thread_as`) for raw and libblkio connections. Every
//! process is killed on drop, also when an assertion fails.

use std::ffi::OsStr;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use vhost_mirror_tests::{
    bin_path, create_image, free_port, mode_of, on_thread_as, run_as, secret_file, set_mode,
    test_dir, wait_until, AccessNode, AccessNodeOpts, Backend, BackendKind, BackendOpts, Client,
    ClientOpts, Watchdog, NOBODY,
};

const MIB: u64 = 1 << 20;
/// A group nobody is not in (no name needed: `--socket-group` takes a number).
const GROUP: u32 = 47123;
/// The message both programs log for a refused connection.
const REFUSED: &str = "connection refused";

struct Fx {
    b: Backend,
    node: AccessNode,
    dir: tempfile::TempDir,
    _wd: Watchdog,
}

impl Fx {
    /// A vhost-mirror (vhost-user and control socket) and an access-node (control socket) in
    /// one test dir that other users may traverse (0755), so only the sockets' own modes and
    /// the credential check stand between them and the sockets.
    fn start(name: &str, umask: Option<libc::mode_t>, extra: &[&str]) -> Fx {
        let wd = Watchdog::new(name, Duration::from_secs(120));
        let dir = test_dir(name);
        set_mode(dir.path(), 0o755);
        let image = dir.path().join("disk.img");
        create_image(&image, 4 * MIB);
        let extra_args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let b = Backend::spawn(
            dir.path(),
            &image,
            &BackendOpts {
                kind: Some(BackendKind::VhostMirror),
                umask,
                extra_args: extra_args.clone(),
                ..BackendOpts::default()
            },
        );
        // A plain image: `promote --force` works on it (the node then exits).
        let replica = dir.path().join("replica.img");
        create_image(&replica, 4 * MIB);
        let secret = secret_file(dir.path(), "the sockets test secret");
        let node = AccessNode::spawn(
            dir.path(),
            &replica,
            free_port(),
            &secret,
            &AccessNodeOpts {
                umask,
                extra_args,
                ..AccessNodeOpts::default()
            },
        );
        Fx {
            b,
            node,
            dir,
            _wd: wd,
        }
    }

    fn control(&self) -> PathBuf {
        self.b
            .control()
            .expect("vhost-mirror has a control socket")
            .to_path_buf()
    }

    /// `vhost-mirror ARGS` as another user.
    fn vhost_mirror_as(&self, uid: u32, gid: u32, groups: &[u32], args: &[&OsStr]) -> Output {
        run_as(
            uid,
            gid,
            groups,
            &bin_path("vhost-mirror"),
            args,
            self.dir.path(),
        )
    }

    /// `access-node ARGS` as another user.
    fn access_node_as(&self, uid: u32, gid: u32, groups: &[u32], args: &[&OsStr]) -> Output {
        run_as(
            uid,
            gid,
            groups,
            &bin_path("access-node"),
            args,
            self.dir.path(),
        )
    }

    /// `status --control` of both programs as another user: (vhost-mirror's, access-node's).
    fn statuses_as(&self, uid: u32, gid: u32, groups: &[u32]) -> (Output, Output) {
        let ctl = self.control();
        let vm = self.vhost_mirror_as(
            uid,
            gid,
            groups,
            &["status".as_ref(), "--control".as_ref(), ctl.as_os_str()],
        );
        let an = self.access_node_as(
            uid,
            gid,
            groups,
            &[
                "status".as_ref(),
                "--control".as_ref(),
                self.node.control().as_os_str(),
            ],
        );
        (vm, an)
    }
}

fn show(o: &Output) -> String {
    format!(
        "exit {}, stdout: {}, stderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn refusal_lines(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains(REFUSED)).collect()
}

/// Connects as `uid`/`gid`/`groups`, sends a vhost-user GET_FEATURES and reads the answer: the
/// bytes received (a whole reply, or what came before the connection ended), or the error (a
/// connection left open without an answer times out).
fn get_features_as(uid: u32, gid: u32, groups: &[u32], sock: &Path) -> std::io::Result<Vec<u8>> {
    let sock = sock.to_path_buf();
    on_thread_as(uid, gid, groups, move || {
        let mut s = UnixStream::connect(&sock)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut hdr = Vec::new();
        hdr.extend_from_slice(&1u32.to_ne_bytes()); // VHOST_USER_GET_FEATURES
        hdr.extend_from_slice(&1u32.to_ne_bytes()); // version 1
        hdr.extend_from_slice(&0u32.to_ne_bytes()); // no payload
                                                    // The server may have closed already (EPIPE): what matters is what comes back.
        let _ = s.write_all(&hdr);
        // Up to one whole reply (header + u64), or the end of the stream.
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while got.len() < 12 + 8 {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
                Err(e) => return Err(e),
            }
        }
        Ok(got)
    })
}

/// (a) Started under umask 000, every socket is 0600 (and root's).
#[test]
fn sockets_are_0600_under_umask_000() {
    let mut fx = Fx::start("sock-umask", Some(0), &[]);
    for p in [
        fx.b.socket().to_path_buf(),
        fx.control(),
        fx.node.control().to_path_buf(),
    ] {
        let m = std::fs::symlink_metadata(&p).expect("stat socket");
        assert!(
            std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()),
            "{} is not a socket",
            p.display()
        );
        assert_eq!(
            mode_of(&p),
            0o600,
            "{} under umask 000: mode {:o}",
            p.display(),
            mode_of(&p)
        );
    }
    // And they work for us.
    let mut c = Client::connect(fx.b.socket());
    c.q().write_pattern(0, MIB, 4096, 8, 0xA1);
    c.q()
        .verify_pattern(0, MIB, 4096, 8, 0xA1)
        .unwrap_or_else(|e| panic!("I/O through the 0600 socket: {e}"));
    assert_eq!(fx.b.status_json()["frontend_connected"], true);
    fx.node.status_json();
    fx.b.assert_running();
    fx.node.assert_running();
}

/// (b) Another user cannot use a control socket, even one chmod'ed 0666: `promote --force` and
/// `status` are refused by the credential check, the node stays unpromoted, and a refusal is
/// logged. (Before the check existed, the file mode was all that protected the sockets.)
#[test]
fn other_users_cannot_use_the_control_sockets() {
    let mut fx = Fx::start("sock-ctl-nobody", None, &[]);
    let ctl = fx.control();
    set_mode(&ctl, 0o666);
    set_mode(fx.node.control(), 0o666);

    let o = fx.access_node_as(
        NOBODY,
        NOBODY,
        &[],
        &[
            "promote".as_ref(),
            "--control".as_ref(),
            fx.node.control().as_os_str(),
            "--force".as_ref(),
        ],
    );
    assert!(
        !o.status.success(),
        "promote --force as nobody succeeded: {}",
        show(&o)
    );
    // Give a (wrongly) accepted promotion time to show.
    std::thread::sleep(Duration::from_millis(300));
    fx.node.assert_running();
    let st = fx.node.status_json();
    assert_eq!(
        st["role"], "secondary",
        "the node changed role after nobody's promote: {st}"
    );
    let log = fx.node.log();
    assert!(
        !log.contains("promoted") && !log.contains("promoting"),
        "the node logged a promotion:\n{log}"
    );

    let (vm, an) = fx.statuses_as(NOBODY, NOBODY, &[]);
    assert!(
        !vm.status.success(),
        "vhost-mirror status as nobody: {}",
        show(&vm)
    );
    assert!(
        !an.status.success(),
        "access-node status as nobody: {}",
        show(&an)
    );
    assert!(
        vm.stdout.is_empty() && an.stdout.is_empty(),
        "a status reached nobody"
    );

    for (what, log) in [("vhost-mirror", fx.b.log()), ("access-node", fx.node.log())] {
        let lines = refusal_lines(&log);
        assert!(
            !lines.is_empty() && lines[0].contains("uid 65534"),
            "{what} logged no refusal of uid 65534:\n{log}"
        );
    }

    // The same command works for root: the refusal was about who asked.
    let o = vhost_mirror_tests::run_with_timeout(
        std::process::Command::new(bin_path("access-node"))
            .arg("promote")
            .arg("--control")
            .arg(fx.node.control())
            .arg("--force"),
        vhost_mirror_tests::TIMEOUT,
    );
    assert!(o.status.success(), "promote --force as root: {}", show(&o));
    let st = fx
        .node
        .child()
        .wait_timeout(vhost_mirror_tests::TIMEOUT)
        .expect("the node exits after its promotion");
    assert!(st.success(), "node exit after promotion: {st}");
    fx.b.assert_running();
}

/// (b) Another user cannot attach as a vhost-user frontend, even through a socket chmod'ed
/// 0666: the connection is closed before any message is answered; libblkio cannot connect;
/// the refusals are logged at most once per interval, with a count; the device stays
/// available to its owner.
#[test]
fn other_users_cannot_attach_as_vhost_user_frontend() {
    let mut fx = Fx::start("sock-vu-nobody", None, &[]);
    let sock = fx.b.socket().to_path_buf();
    set_mode(&sock, 0o666);

    let got = get_features_as(NOBODY, NOBODY, &[], &sock);
    match &got {
        Ok(bytes) => assert!(
            bytes.is_empty(),
            "nobody got {} byte(s) of vhost-user reply: {bytes:02x?}",
            bytes.len()
        ),
        Err(e) => panic!("nobody's connection was not closed: {e}"),
    }
    // The same request as root is answered (the test's request is a valid one).
    let root = get_features_as(0, 0, &[], &sock).expect("root's GET_FEATURES");
    assert_eq!(root.len(), 12 + 8, "reply to root: {root:02x?}");

    let s = sock.clone();
    let blkio = on_thread_as(NOBODY, NOBODY, &[], move || {
        let opts = ClientOpts {
            connect_timeout: Duration::ZERO,
            ..ClientOpts::default()
        };
        Client::try_connect(&s, &opts).map(|c| c.capacity())
    });
    assert!(
        blkio.is_err(),
        "libblkio as nobody attached (capacity {:?})",
        blkio.ok()
    );
    let st = fx.b.status_json();
    assert_eq!(
        st["connections"], 1,
        "only root's GET_FEATURES connection was served: {st}"
    );

    // A flood: at most one line for the lot (one may fall due if the interval since the first
    // refusal has passed); after the interval the next line counts the ones left out.
    let before = refusal_lines(&fx.b.log()).len();
    assert!(before >= 1, "no refusal logged:\n{}", fx.b.log());
    for _ in 0..20 {
        let _ = get_features_as(NOBODY, NOBODY, &[], &sock);
    }
    std::thread::sleep(Duration::from_millis(200));
    let log = fx.b.log();
    let after_flood = refusal_lines(&log).len();
    assert!(
        after_flood <= before + 1,
        "20 refusals within the interval were logged one by one:\n{log}"
    );
    std::thread::sleep(mirror_interval());
    let _ = get_features_as(NOBODY, NOBODY, &[], &sock);
    let ok = wait_until(Duration::from_secs(5), || {
        refusal_lines(&fx.b.log()).len() == after_flood + 1
    });
    let log = fx.b.log();
    assert!(ok, "no refusal line after the interval:\n{log}");
    let last = *refusal_lines(&log).last().expect("a line");
    assert!(
        last.contains("more refused since the last message"),
        "the line after the flood does not count it: {last}"
    );

    // The owner still gets the device.
    let mut c = Client::connect(&sock);
    c.q().write_pattern(0, MIB, 4096, 8, 0xB2);
    c.q()
        .verify_pattern(0, MIB, 4096, 8, 0xB2)
        .unwrap_or_else(|e| panic!("root's I/O after the refusals: {e}"));
    fx.b.assert_running();
}

/// The interval of the refusal log (mirror_proto::sys::RefusalLog::INTERVAL) plus a margin.
fn mirror_interval() -> Duration {
    mirror_proto::sys::RefusalLog::INTERVAL + Duration::from_millis(300)
}

/// (c) With --socket-group, the sockets are 0660 and the group's (also under umask 077), and a
/// member of the group, by its gid or a supplementary group, can use them; others cannot.
#[test]
fn socket_group_members_may_use_the_sockets() {
    let group = GROUP.to_string();
    let mut fx = Fx::start("sock-group", Some(0o077), &["--socket-group", &group]);
    for p in [
        fx.b.socket().to_path_buf(),
        fx.control(),
        fx.node.control().to_path_buf(),
    ] {
        assert_eq!(mode_of(&p), 0o660, "{}", p.display());
        let gid = std::fs::symlink_metadata(&p).expect("stat").gid();
        assert_eq!(gid, GROUP, "group of {}", p.display());
    }

    // Members: by effective gid, and by a supplementary group.
    for (gid, groups) in [(GROUP, vec![]), (NOBODY, vec![NOBODY, GROUP])] {
        let (vm, an) = fx.statuses_as(NOBODY, gid, &groups);
        assert!(
            vm.status.success() && String::from_utf8_lossy(&vm.stdout).contains("frontend"),
            "vhost-mirror status as nobody gid {gid} groups {groups:?}: {}",
            show(&vm)
        );
        assert!(
            an.status.success() && String::from_utf8_lossy(&an.stdout).contains("role"),
            "access-node status as nobody gid {gid} groups {groups:?}: {}",
            show(&an)
        );
        let sock = fx.b.socket().to_path_buf();
        let seed = u64::from(gid);
        let io = on_thread_as(NOBODY, gid, &groups, move || {
            let mut c = Client::connect(&sock);
            c.q().write_pattern(0, MIB, 4096, 8, seed);
            c.q().verify_pattern(0, MIB, 4096, 8, seed)
        });
        io.unwrap_or_else(|e| panic!("I/O as nobody gid {gid} groups {groups:?}: {e}"));
    }

    // Not a member: refused.
    let (vm, an) = fx.statuses_as(NOBODY, NOBODY, &[]);
    assert!(!vm.status.success(), "non-member: {}", show(&vm));
    assert!(!an.status.success(), "non-member: {}", show(&an));
    let got = get_features_as(NOBODY, NOBODY, &[], fx.b.socket());
    assert!(
        got.as_ref().map_or(true, Vec::is_empty),
        "a non-member got a vhost-user reply: {got:?}"
    );
    fx.b.assert_running();
    fx.node.assert_running();
}
