//! libvirt: the example domain `images/vhost-mirror-vm.xml` (a `<disk type='vhostuser'>` with
//! reconnect, shared memfd guest RAM, firmware boot, domain type `qemu` = TCG) started with
//! `virsh create` on `qemu:///system` boots the file-server guest from a disk served by
//! `vhost-mirror serve --socket-group <QEMU's group>`; uploads are stored and read back, the
//! backend's counters show the guest's reads, writes and flushes; vhost-mirror is restarted and
//! QEMU reconnects by itself (the `<reconnect>` element), the next upload going through the new
//! process; the guest halts cleanly (the transient domain is gone), and the image is a clean
//! ext4 with the uploads in it.
//!
//! libvirtd (and virtlogd) are started by the test when `qemu:///system` does not answer (no
//! systemd here), and stopped again afterwards, also when an assertion fails
//! (`vhost_mirror_tests::libvirt::Libvirtd`). QEMU runs as libvirt's unprivileged user
//! (libvirt-qemu on Debian); nothing in /etc/libvirt is changed: the socket is opened to QEMU's
//! group by `--socket-group`, and the test's temp dir to the same group (mode 0710).
//!
//! Environment: `VHOST_MIRROR_KEEP_LOGS=1` keeps the temp dir and libvirt's QEMU log
//! (/var/log/libvirt/qemu/NAME.log); `VHOST_MIRROR_VM_GUEST_DIR` as in `vm.rs`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use vhost_mirror_tests::libvirt::{
    example_domain, open_dir_to_group, qemu_group, unique_name, Domain, Libvirtd,
};
use vhost_mirror_tests::vm::*;
use vhost_mirror_tests::{free_port, test_dir, wait_status, Backend, BackendKind, BackendOpts};

#[test]
fn libvirt_domain_boots_through_vhost_mirror() {
    require_tool("qemu-system-x86_64", "qemu-system-x86");
    require_tool("e2fsck", "e2fsprogs");
    require_tool("debugfs", "e2fsprogs");
    let gdir = build_guest();

    let keep =
        std::env::var_os("VHOST_MIRROR_KEEP_LOGS").is_some_and(|v| !v.is_empty() && v != "0");
    let tmp = test_dir("libvirt");
    let dir = tmp.path().to_path_buf();
    let image = dir.join("disk.raw");
    let console = dir.join("console.log");
    let tmp = if keep {
        eprintln!("libvirt test: keeping {}", dir.display());
        let _ = tmp.keep();
        None
    } else {
        Some(tmp)
    };
    let _report = FailureReport {
        logs: vec![
            ("serial console (virtlogd)", console.clone()),
            ("libvirtd (if started here)", dir.join("libvirtd.log")),
        ],
        dir: dir.clone(),
        kept: keep,
    };
    let group = qemu_group();
    open_dir_to_group(&dir, &group);

    let libvirt = Libvirtd::ensure(&dir);
    copy_guest_disk(&gdir, GUEST_DISK, &image);
    // vhost-mirror with its socket open to QEMU's group (libvirt runs QEMU as libvirt-qemu).
    let opts = BackendOpts {
        kind: Some(BackendKind::VhostMirror),
        extra_args: vec!["--socket-group".into(), group.clone()],
        ..BackendOpts::default()
    };
    let mut backend = Backend::spawn(&dir, &image, &opts);

    let port = free_port();
    let name = unique_name("libvirt-test");
    let xml = dir.join("domain.xml");
    std::fs::write(
        &xml,
        example_domain(&name, backend.socket(), &console, port),
    )
    .expect("write domain XML");
    let t_boot = Instant::now();
    let domain = Domain::create(&xml, &name);
    eprintln!(
        "libvirt test: domain {name} created in {:.1} s (QEMU pid {:?}, libvirtd started here: {})",
        t_boot.elapsed().as_secs_f64(),
        domain.qemu_pid(),
        libvirt.started_here()
    );
    wait_for_console(&console, &mut || {
        assert!(
            domain.is_running(),
            "domain {name} stopped before {READY_MARKER}"
        );
        backend.assert_running();
    });
    eprintln!(
        "libvirt test: boot took {:.1} s",
        t_boot.elapsed().as_secs_f64()
    );
    if let Some(pid) = domain.qemu_pid() {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap_or("");
        eprintln!("libvirt test: QEMU pid {pid} {uid}");
    }
    let booted = backend.counters().expect("vhost-mirror counters");
    assert!(
        booted.reads > 0 && booted.bytes_read > 0,
        "the firmware, GRUB and Linux read nothing through vhost-mirror: {booted:?}"
    );
    let s = backend.status_json();
    assert_eq!(s["frontend_connected"], true, "status: {s}");
    assert!(
        s["queues_enabled"].as_u64().is_some_and(|n| n >= 1),
        "status: {s}"
    );

    // Uploads through the guest's file server, then back.
    let uploads: Vec<Upload> = [
        ("libvirt-1m.bin", random_bytes(1 << 20)),
        ("libvirt-odd.bin", random_bytes(65_549)),
        (
            "libvirt-small.txt",
            b"stored through libvirt and vhost-mirror\n".to_vec(),
        ),
        ("libvirt-empty", Vec::new()),
    ]
    .into_iter()
    .map(|(name, data)| Upload {
        name: name.into(),
        data,
    })
    .collect();
    for u in &uploads {
        let t = Instant::now();
        upload(port, &u.name, &u.data).unwrap_or_else(|e| panic!("upload {}: {e}", u.name));
        eprintln!(
            "libvirt test: uploaded {} ({} bytes) in {:.2} s",
            u.name,
            u.data.len(),
            t.elapsed().as_secs_f64()
        );
    }
    check_uploads(port, &uploads, "libvirt domain");
    let after = backend.counters().expect("vhost-mirror counters");
    eprintln!("libvirt test: counters after boot {booted:?}, after uploads {after:?}");
    let uploaded: u64 = uploads.iter().map(|u| u.data.len() as u64).sum();
    assert!(
        after.writes > booted.writes && after.bytes_written - booted.bytes_written >= uploaded,
        "vhost-mirror saw {} bytes written for {uploaded} bytes uploaded: {after:?}",
        after.bytes_written - booted.bytes_written
    );
    assert!(
        after.flushes > booted.flushes,
        "durable uploads (fdatasync) sent no FLUSH: {after:?}"
    );
    assert_eq!(after.errors, 0, "{after:?}");

    // <reconnect enabled='yes' timeout='1'/>: vhost-mirror is restarted while the guest is idle
    // (SIGTERM: flushed, sockets removed; a new process on the same socket); QEMU reconnects by
    // itself within a second or so, and the guest's next upload goes through the new process.
    let status = backend.terminate(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "vhost-mirror exit status: {status}");
    let socket = backend.socket().to_path_buf();
    let control = backend.control().map(Path::to_path_buf);
    drop(backend);
    let t_restart = Instant::now();
    let mut backend = Backend::spawn(
        &dir,
        &image,
        &BackendOpts {
            socket: Some(socket),
            control,
            ..opts.clone()
        },
    );
    let s = wait_status(&mut backend, Duration::from_secs(30), |s| {
        s["frontend_connected"] == true
    })
    .unwrap_or_else(|s| panic!("QEMU did not reconnect to the restarted vhost-mirror: {s}"));
    eprintln!(
        "libvirt test: QEMU reconnected {:.1} s after vhost-mirror's restart",
        t_restart.elapsed().as_secs_f64()
    );
    assert!(domain.is_running(), "domain {name} stopped: {s}");
    let again = Upload {
        name: "after-reconnect.bin".into(),
        data: random_bytes(200_001),
    };
    upload(port, &again.name, &again.data)
        .unwrap_or_else(|e| panic!("upload after the reconnect: {e}"));
    let mut all = uploads.clone();
    all.push(again);
    check_uploads(port, &all, "after the reconnect");
    let c = backend.counters().expect("vhost-mirror counters");
    assert!(
        c.writes > 0 && c.bytes_written >= 200_001 && c.flushes > 0,
        "the restarted vhost-mirror saw no upload: {c:?}"
    );

    // Clean halt: the guest powers off, the transient domain is gone.
    let reply = http(port, "GET", "/cgi-bin/halt", b"").expect("halt");
    assert_eq!(reply.status, 200, "halt: {}", reply.text());
    assert!(
        domain.wait_stopped(EXIT_TIMEOUT),
        "domain {name} still running {EXIT_TIMEOUT:?} after halt"
    );
    let text =
        String::from_utf8_lossy(&std::fs::read(&console).expect("read console log")).into_owned();
    assert!(
        text.contains("HALT: / is read-only"),
        "guest did not remount / read-only before power-off"
    );
    let status = backend.terminate(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "vhost-mirror exit status: {status}");

    // The image itself.
    run_ok(
        Command::new("e2fsck").arg("-fn").arg(root_fs(&image)),
        "e2fsck -fn on the image after halt",
    );
    let out = dir.join("dumped.bin");
    run_ok(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!(
                "dump /srv/files/{} {}",
                uploads[0].name,
                out.display()
            ))
            .arg(root_fs(&image)),
        "debugfs dump",
    );
    assert!(
        std::fs::read(&out).expect("dumped file") == uploads[0].data,
        "{} in the image differs from the upload",
        uploads[0].name
    );
    eprintln!(
        "libvirt test: done in {:.1} s",
        t_boot.elapsed().as_secs_f64()
    );
    drop(domain);
    drop(libvirt);
    drop(_report);
    drop(tmp);
}
