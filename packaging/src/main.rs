//! Generates what the Debian package ships beside the binaries (`ci/deb.sh`): a man page for
//! each command and subcommand of `vhost-mirror` and `access-node` (clap_mangen) and their
//! completions for bash, zsh and fish (clap_complete), from the clap definitions the binaries
//! parse (`vhost_mirror::args::Cli`, `access_node::args::Cli`), so that they cannot drift
//! apart. A crate of its own, so that neither daemon links clap_mangen or clap_complete.
//!
//! `packaging --out DIR` writes, under DIR (created if needed):
//! - `man1/PROGRAM.1` and `man1/PROGRAM-SUBCOMMAND.1` (uncompressed roff);
//! - `bash/PROGRAM`, `zsh/_PROGRAM`, `fish/PROGRAM.fish`: the names each shell's completion
//!   loader looks for, so that `ci/deb.sh` copies them as they are.

use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use clap_complete::Shell;
use clap_mangen::roff::{bold, italic, roman, Roff};
use clap_mangen::Man;
use thiserror::Error;

/// The package's name: the manual the pages belong to, and the directory of its documentation.
const PACKAGE: &str = "vhost-mirror";
/// Makes a program's clap definition (`Cli::command`).
type CommandFn = fn() -> clap::Command;
/// The programs of the package, with their clap definitions.
const PROGRAMS: [(&str, CommandFn); 2] = [
    ("vhost-mirror", vhost_mirror::args::Cli::command),
    ("access-node", access_node::args::Cli::command),
];

#[derive(Debug, Parser)]
#[command(
    name = "packaging",
    version,
    about = "Generate the man pages and shell completions of vhost-mirror and access-node"
)]
struct Cli {
    /// Directory to write man1/, bash/, zsh/ and fish/ into (created if needed).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

#[derive(Debug, Error)]
enum Error {
    #[error("cannot create {}: {source}", path.display())]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
}

fn create_dir(path: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(path).map_err(|source| Error::CreateDir {
        path: path.to_owned(),
        source,
    })
}

fn write(path: &Path, data: &[u8]) -> Result<(), Error> {
    std::fs::write(path, data).map_err(|source| Error::Write {
        path: path.to_owned(),
        source,
    })
}

/// The SEE ALSO section: `name(1)` for each of `pages`, and with `doc` where the README is.
fn see_also(pages: &[&str], doc: bool) -> Vec<u8> {
    let mut roff = Roff::default();
    roff.control("SH", ["SEE ALSO"]);
    let mut inlines = Vec::new();
    for (i, page) in pages.iter().enumerate() {
        if i > 0 {
            inlines.push(roman(", "));
        }
        inlines.push(bold(*page));
        inlines.push(roman("(1)"));
    }
    roff.text(inlines);
    if doc {
        roff.control("PP", []);
        roff.text([
            roman("The full documentation: "),
            italic(format!("/usr/share/doc/{PACKAGE}/README.md.gz")),
        ]);
    }
    // Without the apostrophe preamble `render` puts first: the page has it already, and
    // this text has no apostrophe.
    roff.to_roff().into_bytes()
}

/// Writes the man page of `cmd` (named `page`, e.g. `vhost-mirror-serve`) and of each of its
/// visible subcommands into `dir`; returns how many pages it wrote. The page's SEE ALSO names
/// the pages `see` (and with `doc` the README); a subcommand's page names its parent's.
fn man_pages(
    cmd: clap::Command,
    page: &str,
    see: &[&str],
    doc: bool,
    source: &str,
    dir: &Path,
) -> Result<usize, Error> {
    let subcommands: Vec<clap::Command> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .collect();
    let mut written = 0;
    for sub in &subcommands {
        let sub_page = format!("{page}-{}", sub.get_name());
        written += man_pages(sub.clone(), &sub_page, &[page], false, source, dir)?;
    }
    // Title and file name from `page`, so that they cannot differ.
    let man = Man::new(cmd)
        .title(page.to_uppercase())
        .source(source)
        .manual(PACKAGE);
    let mut text = Vec::new();
    let path = dir.join(format!("{page}.1"));
    man.render(&mut text).map_err(|source| Error::Write {
        path: path.clone(),
        source,
    })?;
    text.extend(see_also(see, doc));
    write(&path, &text)?;
    Ok(written + 1)
}

fn run(out: &Path) -> Result<(), Error> {
    let man_dir = out.join("man1");
    create_dir(&man_dir)?;
    for (name, command) in PROGRAMS {
        // `help` is a subcommand of clap's making: no page, no completion of its own. Built
        // here, so that each subcommand knows its full name (`vhost-mirror serve`) for its
        // page's NAME and SYNOPSIS.
        let mut cmd = command().disable_help_subcommand(true);
        cmd.build();
        let version = cmd.get_version().unwrap_or_default().to_owned();
        // A program's page names the other programs' (its subcommands' pages are in its
        // SUBCOMMANDS section already).
        let others: Vec<&str> = PROGRAMS
            .iter()
            .map(|(n, _)| *n)
            .filter(|n| n != &name)
            .collect();
        let pages = man_pages(
            cmd.clone(),
            name,
            &others,
            true,
            &format!("{PACKAGE} {version}"),
            &man_dir,
        )?;
        for (shell, subdir, file) in [
            (Shell::Bash, "bash", name.to_owned()),
            (Shell::Zsh, "zsh", format!("_{name}")),
            (Shell::Fish, "fish", format!("{name}.fish")),
        ] {
            let dir = out.join(subdir);
            create_dir(&dir)?;
            let mut text = Vec::new();
            clap_complete::generate(shell, &mut cmd.clone(), name, &mut text);
            write(&dir.join(file), &text)?;
        }
        println!("packaging: {name} {version}: {pages} man pages, completions for bash, zsh, fish");
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli.out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("packaging: error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_program_and_visible_subcommand_gets_a_page_and_completions() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        run(dir).unwrap();
        let mut pages: Vec<String> = std::fs::read_dir(dir.join("man1"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        pages.sort();
        assert_eq!(
            pages,
            [
                "access-node-promote.1",
                "access-node-serve.1",
                "access-node-status.1",
                "access-node-witness.1",
                "access-node.1",
                "vhost-mirror-serve.1",
                "vhost-mirror-status.1",
                "vhost-mirror-verify.1",
                "vhost-mirror.1",
            ]
        );
        let serve = std::fs::read_to_string(dir.join("man1/vhost-mirror-serve.1")).unwrap();
        assert!(serve.contains(".TH VHOST-MIRROR-SERVE 1"), "{serve}");
        assert!(serve.contains("\\-\\-num\\-queues"), "{serve}");
        assert!(serve.contains(".SH \"SEE ALSO\""), "{serve}");
        let top = std::fs::read_to_string(dir.join("man1/access-node.1")).unwrap();
        assert!(
            top.contains(&format!("{PACKAGE} {}", env!("CARGO_PKG_VERSION"))),
            "{top}"
        );
        for (shell_dir, file, marker) in [
            ("bash", "vhost-mirror", "complete -F"),
            ("zsh", "_access-node", "#compdef access-node"),
            ("fish", "access-node.fish", "complete -c access-node"),
        ] {
            let text = std::fs::read_to_string(dir.join(shell_dir).join(file)).unwrap();
            assert!(text.contains(marker), "{shell_dir}/{file}: {text}");
        }
    }
}
