//! The Debian package (issue 13, item 6): `ci/deb.sh` builds it, `dpkg --root` installs it
//! into a scratch directory with a dpkg database of its own, and what it installed is run and
//! checked there: both binaries answer `--version` with the workspace's version; every man
//! page is found by `man` in the installed tree and renders without a warning; the bash
//! completion completes a subcommand, the zsh and fish ones are in place; the OCF agents are
//! executable and answer `meta-data` valid against the OCF DTD; the units pass
//! `systemd-analyze verify` at their installed place against the installed binaries. Before
//! that, `dpkg-deb --info` and `--contents` must show the expected control fields, files,
//! modes and owners; at the end the package is purged. The scratch directory is removed
//! whatever happens.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use vhost_mirror_tests::{run_with_timeout, test_dir};

const VERSION: &str = env!("CARGO_PKG_VERSION");
const PROGRAMS: [&str; 2] = ["vhost-mirror", "access-node"];
const MAN_PAGES: [&str; 9] = [
    "vhost-mirror",
    "vhost-mirror-serve",
    "vhost-mirror-status",
    "vhost-mirror-verify",
    "access-node",
    "access-node-serve",
    "access-node-status",
    "access-node-promote",
    "access-node-witness",
];
/// `ocf-shellfuncs`, which the agents source, comes from resource-agents (not this package).
const OCF_ROOT: &str = "/usr/lib/ocf";
const OCF_DTD: &str = "/usr/share/resource-agents/ra-api-1.dtd";
/// Generous: a release build from nothing on two busy vCPUs.
const BUILD_TIMEOUT: Duration = Duration::from_secs(3600);
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Runs `cmd`; panics with its output unless it exits 0.
fn run_ok(what: &str, cmd: &mut Command) -> Output {
    let out = run_with_timeout(cmd, TOOL_TIMEOUT);
    assert!(
        out.status.success(),
        "{what}: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every tool the test and ci/deb.sh use, with the package that brings it: a missing one
/// fails here, naming it, rather than halfway through.
fn require_tools() {
    let tools = [
        ("dpkg", "dpkg"),
        ("dpkg-deb", "dpkg"),
        ("dpkg-shlibdeps", "dpkg-dev"),
        ("dpkg-gencontrol", "dpkg-dev"),
        ("dpkg-architecture", "dpkg-dev"),
        ("strip", "binutils"),
        ("readelf", "binutils"),
        ("man", "man-db"),
        ("groff", "groff-base"),
        ("systemd-analyze", "systemd"),
        ("xmllint", "libxml2-utils"),
    ];
    let missing: Vec<String> = tools
        .iter()
        .filter(|(tool, _)| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|(tool, pkg)| format!("{tool} (package {pkg})"))
        .collect();
    assert!(
        missing.is_empty(),
        "missing: {}; bash ci/setup.sh installs them",
        missing.join(", ")
    );
    for (file, pkg) in [
        (
            format!("{OCF_ROOT}/lib/heartbeat/ocf-shellfuncs"),
            "resource-agents",
        ),
        (OCF_DTD.to_owned(), "resource-agents"),
    ] {
        assert!(
            Path::new(&file).is_file(),
            "{file} not found (package {pkg}; bash ci/setup.sh installs it)"
        );
    }
}

/// The fields of `dpkg-deb --info`'s control file (continuation lines dropped).
fn control_fields(info: &str) -> BTreeMap<String, String> {
    info.lines()
        .filter(|l| !l.starts_with("  "))
        .filter_map(|l| {
            let (k, v) = l.trim_start().split_once(':')?;
            Some((k.to_owned(), v.trim().to_owned()))
        })
        .collect()
}

/// `dpkg-deb --contents`: path (without the leading `.`) -> (mode string, owner/group).
fn contents(listing: &str) -> BTreeMap<String, (String, String)> {
    listing
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let path = f.get(5)?.strip_prefix('.')?.to_owned();
            Some((path, (f[0].to_owned(), f[1].to_owned())))
        })
        .collect()
}

fn check_package_metadata(deb: &Path, arch: &str) {
    let info = stdout(&run_ok(
        "dpkg-deb --info",
        Command::new("dpkg-deb").arg("--info").arg(deb),
    ));
    let fields = control_fields(&info);
    let field = |k: &str| {
        fields
            .get(k)
            .unwrap_or_else(|| panic!("no {k} in the control file:\n{info}"))
            .as_str()
    };
    assert_eq!(field("Package"), "vhost-mirror");
    assert_eq!(field("Version"), format!("{VERSION}-1"));
    assert_eq!(field("Architecture"), arch);
    assert!(field("Maintainer").contains('<'), "{info}");
    assert!(field("Installed-Size").parse::<u64>().is_ok(), "{info}");
    // dpkg-shlibdeps' answer for a Rust binary: glibc and libgcc_s (the unwinder).
    let depends = field("Depends");
    assert!(depends.contains("libc6 (>= "), "Depends: {depends}");
    assert!(field("Recommends").contains("qemu-system"), "{info}");
    assert!(field("Suggests").contains("pacemaker"), "{info}");
    assert!(field("Description").starts_with("replicated VM disks"));
    // The control archive: control and md5sums; no maintainer scripts, no conffiles
    // (nothing is shipped in /etc but two empty directories). Its members are the lines
    // "SIZE bytes, N lines [*] NAME [interpreter]".
    let members: Vec<&str> = info
        .lines()
        .filter_map(|l| {
            let after = l.split_once(" lines ")?.1.trim_start();
            after.trim_start_matches('*').split_whitespace().next()
        })
        .collect();
    assert_eq!(members, ["control", "md5sums"], "{info}");

    let listing = stdout(&run_ok(
        "dpkg-deb --contents",
        Command::new("dpkg-deb").arg("--contents").arg(deb),
    ));
    let files = contents(&listing);
    let mut expected: Vec<(String, &str)> = vec![
        ("/usr/bin/vhost-mirror".into(), "-rwxr-xr-x"),
        ("/usr/bin/access-node".into(), "-rwxr-xr-x"),
        (
            "/lib/systemd/system/vhost-mirror@.service".into(),
            "-rw-r--r--",
        ),
        (
            "/lib/systemd/system/access-node@.service".into(),
            "-rw-r--r--",
        ),
        (
            "/usr/lib/ocf/resource.d/vhost-mirror/disk".into(),
            "-rwxr-xr-x",
        ),
        (
            "/usr/lib/ocf/resource.d/vhost-mirror/vm".into(),
            "-rwxr-xr-x",
        ),
        ("/etc/vhost-mirror/".into(), "drwxr-xr-x"),
        ("/etc/vhost-mirror/access-node/".into(), "drwxr-xr-x"),
    ];
    for page in MAN_PAGES {
        expected.push((format!("/usr/share/man/man1/{page}.1.gz"), "-rw-r--r--"));
    }
    for p in PROGRAMS {
        expected.push((
            format!("/usr/share/bash-completion/completions/{p}"),
            "-rw-r--r--",
        ));
        expected.push((
            format!("/usr/share/zsh/vendor-completions/_{p}"),
            "-rw-r--r--",
        ));
        expected.push((
            format!("/usr/share/fish/vendor_completions.d/{p}.fish"),
            "-rw-r--r--",
        ));
    }
    for doc in [
        "copyright",
        "changelog.gz",
        "changelog.Debian.gz",
        "README.md.gz",
        "rust-crates.txt",
        "examples/example-primary.toml",
        "examples/example-replica.toml",
    ] {
        expected.push((format!("/usr/share/doc/vhost-mirror/{doc}"), "-rw-r--r--"));
    }
    for (path, mode) in &expected {
        let (got, owner) = files
            .get(path)
            .unwrap_or_else(|| panic!("{path} not in the package:\n{listing}"));
        assert_eq!(got, mode, "{path}");
        assert_eq!(owner, "root/root", "{path}");
    }
    // Nothing else but the directories leading to those files (no test-cluster fence agent,
    // nothing in /usr/local).
    for (path, (mode, owner)) in &files {
        assert_eq!(owner, "root/root", "{path}");
        let known = expected.iter().any(|(p, _)| p == path)
            || (mode.starts_with('d') && expected.iter().any(|(p, _)| p.starts_with(path)));
        assert!(known, "unexpected {path} ({mode}) in the package");
    }
}

fn check_binaries(root: &Path) {
    for bin in PROGRAMS {
        let path = root.join("usr/bin").join(bin);
        let out = run_ok(
            &format!("{} --version", path.display()),
            Command::new(&path).arg("--version"),
        );
        assert_eq!(stdout(&out).trim(), format!("{bin} {VERSION}"));
        // Stripped: no symbol table and no DWARF (the release profile keeps line tables).
        // `.debug_gdb_scripts` stays: an allocated section rustc embeds in the program.
        let sections = stdout(&run_ok(
            "readelf -S",
            Command::new("readelf").arg("-SW").arg(&path),
        ));
        for section in [".symtab", ".debug_info", ".debug_line"] {
            assert!(
                !sections.contains(&format!(" {section} ")),
                "{bin} is not stripped ({section}):\n{sections}"
            );
        }
    }
}

fn check_man_pages(root: &Path) {
    let man_dir = root.join("usr/share/man");
    for page in MAN_PAGES {
        // Found by name in the installed tree, as `man PAGE` finds it once installed.
        let found = stdout(&run_ok(
            &format!("man -w {page}"),
            Command::new("man")
                .arg("-M")
                .arg(&man_dir)
                .args(["-w", page]),
        ));
        let file = man_dir.join(format!("man1/{page}.1.gz"));
        assert_eq!(found.trim(), s(&file), "man -w {page}");
        let out = run_ok(
            &format!("man -l {}", file.display()),
            Command::new("man")
                .args(["--warnings", "-P", "cat", "-l"])
                .arg(&file)
                .env("MANWIDTH", "80")
                .env("LC_ALL", "C.UTF-8")
                .env_remove("MANPAGER")
                .env_remove("PAGER"),
        );
        let text = stdout(&out);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.trim().is_empty(),
            "{page}: warnings while rendering:\n{stderr}"
        );
        for section in ["NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "SEE ALSO"] {
            assert!(
                text.lines().any(|l| l == section),
                "{page}: no {section} section:\n{text}"
            );
        }
        assert!(
            text.contains(&format!("vhost-mirror {VERSION}")),
            "{page}: no version in the footer:\n{text}"
        );
        // The synopsis names the program, and on a subcommand's page the subcommand.
        let (program, sub) = PROGRAMS
            .iter()
            .find_map(|p| Some((*p, page.strip_prefix(p)?)))
            .expect("every page is of a program");
        let invocation = match sub.strip_prefix('-') {
            Some(sub) => format!("{program} {sub}"),
            None => program.to_owned(),
        };
        // (Its first line; man justifies it, so spaces are collapsed.)
        let synopsis = text
            .split("SYNOPSIS\n")
            .nth(1)
            .and_then(|t| t.lines().next())
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        assert!(
            synopsis.starts_with(&format!("{invocation} [")),
            "{page}: synopsis {synopsis:?}, not of `{invocation}`"
        );
    }
    // Options with their value names and defaults.
    let serve = stdout(&run_ok(
        "man vhost-mirror-serve",
        Command::new("man")
            .args(["-P", "cat", "-l"])
            .arg(man_dir.join("man1/vhost-mirror-serve.1.gz"))
            .env("MANWIDTH", "80")
            .env("LC_ALL", "C.UTF-8"),
    ));
    assert!(
        serve
            .lines()
            .any(|l| l.trim() == "--num-queues <N> [default: 16]"),
        "{serve}"
    );
}

fn check_completions(root: &Path) {
    let share = root.join("usr/share");
    for bin in PROGRAMS {
        let bash = share.join("bash-completion/completions").join(bin);
        // Loaded as bash-completion loads it, then asked to complete `BIN s`: its function
        // must offer the subcommands starting with "s" (serve, status).
        let script = format!(
            r#"set -e
source "$1"
spec=$(complete -p {bin})
fn=${{spec#*-F }}; fn=${{fn%% *}}
COMP_WORDS=({bin} s); COMP_CWORD=1; COMP_LINE="{bin} s"; COMP_POINT=${{#COMP_LINE}}
"$fn" {bin} s {bin}
printf '%s\n' "${{COMPREPLY[@]}}""#
        );
        let out = run_ok(
            &format!("bash completion of {bin}"),
            Command::new("bash").args(["-c", &script, "bash", s(&bash)]),
        );
        let words: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
        for sub in ["serve", "status"] {
            assert!(
                words.iter().any(|w| w == sub),
                "bash completion of `{bin} s` lacks {sub}: {words:?}"
            );
        }
        let zsh =
            std::fs::read_to_string(share.join("zsh/vendor-completions").join(format!("_{bin}")))
                .unwrap_or_else(|e| panic!("zsh completion of {bin}: {e}"));
        assert!(zsh.starts_with(&format!("#compdef {bin}\n")), "{zsh}");
        let fish = std::fs::read_to_string(
            share
                .join("fish/vendor_completions.d")
                .join(format!("{bin}.fish")),
        )
        .unwrap_or_else(|e| panic!("fish completion of {bin}: {e}"));
        assert!(fish.contains(&format!("complete -c {bin} ")), "{fish}");
    }
}

fn check_ocf_agents(root: &Path) {
    for (agent, source) in [("disk", "ha/ocf/vhost-mirror"), ("vm", "ha/ocf/vm")] {
        let path = root.join("usr/lib/ocf/resource.d/vhost-mirror").join(agent);
        let meta = std::fs::metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(meta.permissions().mode() & 0o777, 0o755, "{agent}");
        assert_eq!(
            std::fs::read(&path).expect("read installed agent"),
            std::fs::read(repo().join(source)).expect("read agent source"),
            "{agent} differs from {source}"
        );
        let out = run_ok(
            &format!("ocf:vhost-mirror:{agent} meta-data"),
            Command::new(&path)
                .arg("meta-data")
                .env("OCF_ROOT", OCF_ROOT),
        );
        let xml = stdout(&out);
        assert!(
            xml.contains(&format!("<resource-agent name=\"{agent}\"")),
            "{agent} meta-data:\n{xml}"
        );
        let file = root.join(format!("{agent}-meta-data.xml"));
        std::fs::write(&file, &xml).expect("write meta-data");
        run_ok(
            &format!("xmllint --dtdvalid {OCF_DTD} ({agent}'s meta-data)"),
            Command::new("xmllint")
                .args(["--noout", "--dtdvalid", OCF_DTD])
                .arg(&file),
        );
        std::fs::remove_file(&file).expect("remove meta-data file");
    }
}

/// `systemd-analyze verify --root=ROOT` loads every unit from inside ROOT, systemd's own
/// targets and slices too: those are copied from this machine's systemd package into
/// ROOT/usr/lib/systemd/system (the package's units are in ROOT/lib/systemd/system).
fn check_units(root: &Path) {
    let dst = root.join("usr/lib/systemd/system");
    std::fs::create_dir_all(&dst).expect("create usr/lib/systemd/system");
    let mut copied = 0;
    for entry in std::fs::read_dir("/lib/systemd/system").expect("read /lib/systemd/system") {
        let path = entry.expect("dir entry").path();
        if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("target" | "slice")
        ) && path.is_file()
        {
            std::fs::copy(&path, dst.join(path.file_name().expect("file name")))
                .unwrap_or_else(|e| panic!("copy {}: {e}", path.display()));
            copied += 1;
        }
    }
    assert!(
        copied > 10,
        "only {copied} targets and slices in /lib/systemd/system"
    );
    let verify = |unit: &str| {
        run_with_timeout(
            Command::new("systemd-analyze")
                .arg("verify")
                .arg(format!("--root={}", s(root)))
                // Documentation=man:... would be looked up in this machine's man path;
                // check_man_pages found them in the installed tree.
                .arg("--man=no")
                .arg(format!("/lib/systemd/system/{unit}")),
            TOOL_TIMEOUT,
        )
    };
    for unit in ["vhost-mirror@.service", "access-node@.service"] {
        assert_eq!(
            std::fs::read(root.join("lib/systemd/system").join(unit)).expect("installed unit"),
            std::fs::read(repo().join("systemd").join(unit)).expect("unit source"),
            "{unit} differs from systemd/{unit}"
        );
        // Its Documentation= pages (`systemctl help`) are in the installed tree.
        let text = std::fs::read_to_string(root.join("lib/systemd/system").join(unit))
            .expect("read installed unit");
        let pages: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("Documentation=man:")?.strip_suffix("(1)"))
            .collect();
        assert!(!pages.is_empty(), "{unit} has no Documentation=man:...(1)");
        for page in pages {
            assert!(
                MAN_PAGES.contains(&page),
                "{unit}: Documentation=man:{page}(1) is not a page of the package"
            );
        }
        let out = verify(unit);
        let (so, se) = (stdout(&out), String::from_utf8_lossy(&out.stderr));
        // verify exits 0 on unknown keys and bad values too (it only warns): silence is the
        // pass.
        assert!(
            out.status.success() && so.trim().is_empty() && se.trim().is_empty(),
            "systemd-analyze verify --root {unit}: {}\nstdout:\n{so}\nstderr:\n{se}",
            out.status
        );
    }
    // The check is real: without the installed binary, verify fails on ExecStart.
    let bin = root.join("usr/bin/vhost-mirror");
    let aside = root.join("usr/bin/vhost-mirror.aside");
    std::fs::rename(&bin, &aside).expect("move the binary aside");
    let out = verify("vhost-mirror@.service");
    std::fs::rename(&aside, &bin).expect("put the binary back");
    let se = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && se.contains("/usr/bin/vhost-mirror"),
        "verify passed without /usr/bin/vhost-mirror: {}\n{se}",
        out.status
    );
}

fn check_docs(root: &Path) {
    let doc = root.join("usr/share/doc/vhost-mirror");
    let crates = std::fs::read_to_string(doc.join("rust-crates.txt")).expect("rust-crates.txt");
    for linked in ["vhost-user-backend v", "snow v", "clap v"] {
        assert!(
            crates.lines().any(|l| l.starts_with(linked)),
            "rust-crates.txt lacks {linked}:\n{crates}"
        );
    }
    // Only the packaging crate uses these: neither daemon links them.
    for not_linked in ["clap_mangen v", "clap_complete v", "roff v", "packaging v"] {
        assert!(
            !crates.lines().any(|l| l.starts_with(not_linked)),
            "rust-crates.txt lists {not_linked}:\n{crates}"
        );
    }
    assert!(
        !crates.contains("(/"),
        "a local path in rust-crates.txt:\n{crates}"
    );
    let copyright = std::fs::read_to_string(doc.join("copyright")).expect("copyright");
    assert!(copyright.contains("License: Apache-2.0 or BSD-3-Clause"));
    for example in ["example-primary.toml", "example-replica.toml"] {
        assert_eq!(
            std::fs::read(doc.join("examples").join(example)).expect("installed example"),
            std::fs::read(repo().join("systemd").join(example)).expect("example source"),
            "{example}"
        );
    }
}

#[test]
fn the_debian_package_builds_installs_and_runs() {
    require_tools();
    let dir = test_dir("package");
    let out_dir = dir.path().join("out");
    let arch = stdout(&run_ok(
        "dpkg --print-architecture",
        Command::new("dpkg").arg("--print-architecture"),
    ))
    .trim()
    .to_owned();

    let t = Instant::now();
    let mut deb_sh = Command::new("bash");
    deb_sh
        .arg(repo().join("ci/deb.sh"))
        .arg("--out")
        .arg(&out_dir);
    // Without what `cargo test` sets for this test process (CARGO_MANIFEST_DIR and the
    // like): ring's build script reruns when CARGO_MANIFEST_DIR changes, so ci/deb.sh's
    // cargo would rebuild the release binaries here and again when run from a shell.
    for (var, _) in std::env::vars_os() {
        let name = var.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_BIN_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
            ]
            .contains(&name.as_ref())
        {
            deb_sh.env_remove(&var);
        }
    }
    let out = run_with_timeout(&mut deb_sh, BUILD_TIMEOUT);
    assert!(
        out.status.success(),
        "ci/deb.sh: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        stdout(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    let build_secs = t.elapsed().as_secs_f64();
    let deb = out_dir.join(format!("vhost-mirror_{VERSION}-1_{arch}.deb"));
    assert!(
        deb.is_file(),
        "{} not built:\n{}",
        deb.display(),
        stdout(&out)
    );
    let t = Instant::now();

    check_package_metadata(&deb, &arch);

    // A scratch root with an empty dpkg database of its own (dpkg creates it). The package's
    // Depends (libc6, libgcc-s1) are installed on this machine, not in that database:
    // --force-depends lets dpkg configure it anyway (it says so on stderr). No maintainer
    // scripts run (the package has none), so nothing needs a chroot. As root; no
    // --force-not-root needed. --path-include: a minimized image's dpkg.cfg.d may exclude
    // /usr/share/man and /usr/share/doc; the installed tree must hold everything.
    let root = dir.path().join("root");
    std::fs::create_dir(&root).expect("create scratch root");
    run_ok(
        "dpkg --root -i",
        Command::new("dpkg")
            .arg(format!("--root={}", s(&root)))
            .args(["--force-depends", "--path-include=/*", "-i"])
            .arg(&deb),
    );
    let status = stdout(&run_ok(
        "dpkg -s",
        Command::new("dpkg")
            .arg(format!("--root={}", s(&root)))
            .args(["-s", "vhost-mirror"]),
    ));
    assert!(status.contains("Status: install ok installed"), "{status}");
    // Every installed file matches the package's md5sums.
    let verify = run_ok(
        "dpkg -V",
        Command::new("dpkg")
            .arg(format!("--root={}", s(&root)))
            .args(["-V", "vhost-mirror"]),
    );
    assert!(stdout(&verify).trim().is_empty(), "{}", stdout(&verify));

    check_binaries(&root);
    check_man_pages(&root);
    check_completions(&root);
    check_ocf_agents(&root);
    check_units(&root);
    check_docs(&root);

    run_ok(
        "dpkg --root --purge",
        Command::new("dpkg")
            .arg(format!("--root={}", s(&root)))
            .args(["--purge", "vhost-mirror"]),
    );
    for gone in [
        "usr/bin/vhost-mirror",
        "usr/share/man/man1/access-node.1.gz",
        "etc/vhost-mirror",
    ] {
        assert!(!root.join(gone).exists(), "{gone} left after purge");
    }
    println!(
        "package: {} built in {build_secs:.1} s, checked in {:.1} s",
        deb.file_name().and_then(|n| n.to_str()).unwrap_or("?"),
        t.elapsed().as_secs_f64()
    );
}
