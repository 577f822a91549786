//! `faultfs`: a FUSE filesystem that models a host's disk with a volatile write-back cache, for
//! durability fault-injection tests.
//!
//! `faultfs --backing DIR --mount MNT --control SOCK` mounts a passthrough of `DIR` on `MNT` and
//! runs in the foreground. Data written through the mount stays in memory until the file is
//! fsynced; the control socket `SOCK` can then cut the power (drop everything not fsynced) or
//! inject I/O errors (see `control.rs` for the protocol, `fs.rs` for the model).
//!
//! This file owns the command line, the mount/unmount lifecycle and the SIGTERM/SIGINT exit: the
//! filesystem is unmounted and, unless a cut was issued, dirty data is written to the backing
//! files (a clean process exit is not a power loss).

mod cache;
mod control;
mod error;
mod faults;
mod fs;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use clap::Parser;
use fuser::{Config, MountOption, Session};
use log::{error, info, warn};
use nix::sys::stat::Mode;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::control::ControlServer;
use crate::error::FaultFsError;
use crate::fs::{FaultFs, State};

/// How long to wait for the FUSE session to end after unmounting.
const UNMOUNT_WAIT: Duration = Duration::from_secs(2);

/// Mount a passthrough of a directory whose file data is lost on a simulated power cut unless
/// it was fsynced.
#[derive(Debug, Parser)]
#[command(name = "faultfs", version)]
struct Args {
    /// Directory holding the real (durable) files.
    #[arg(long, value_name = "DIR")]
    backing: PathBuf,
    /// Mount point (an existing directory).
    #[arg(long, value_name = "MNT")]
    mount: PathBuf,
    /// Path of the control socket (cut, fail, clear, stats, sync).
    #[arg(long, value_name = "SOCK")]
    control: PathBuf,
}

enum Event {
    Signal(i32),
    SessionEnded(std::io::Result<()>),
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            eprintln!("faultfs: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), FaultFsError> {
    // Modes arrive from the kernel already masked with the caller's umask.
    nix::sys::stat::umask(Mode::empty());
    let mut signals = Signals::new([SIGTERM, SIGINT]).map_err(FaultFsError::Signals)?;
    let state = Arc::new(State::open(&args.backing)?);

    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("faultfs".into()),
        MountOption::Subtype("faultfs".into()),
        // Permission checks by the kernel (no writeback_cache: the kernel must not buffer).
        MountOption::DefaultPermissions,
    ];
    // Mounts and completes the INIT handshake: the mount is live when this returns.
    let mut session =
        Session::new(FaultFs::new(state.clone()), &args.mount, &config).map_err(|source| {
            FaultFsError::Mount {
                path: args.mount.clone(),
                source,
            }
        })?;
    let mut unmounter = session.unmount_callable();
    // The socket appears only once the mount is live, so clients can wait for it.
    let control = ControlServer::spawn(&args.control, state.clone())?;
    info!(
        "{} mounted on {} (control {})",
        args.backing.display(),
        args.mount.display(),
        args.control.display()
    );

    let (tx, rx) = mpsc::channel();
    let session_tx = tx.clone();
    std::thread::Builder::new()
        .name("session".into())
        .spawn(move || {
            let _ = session_tx.send(Event::SessionEnded(session.run()));
        })
        .map_err(FaultFsError::Thread)?;
    let signals_handle = signals.handle();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if tx.send(Event::Signal(sig)).is_err() {
                    break;
                }
            }
        })
        .map_err(FaultFsError::Thread)?;

    match rx.recv() {
        Ok(Event::Signal(sig)) => {
            info!("signal {sig}: unmounting");
            if let Err(e) = unmounter.unmount() {
                // Busy (a file is still open): detach now; the session ends when we exit.
                warn!("unmount: {e}; detaching");
                if let Err(e) = nix::mount::umount2(&args.mount, nix::mount::MntFlags::MNT_DETACH) {
                    warn!("lazy unmount: {e}");
                }
            }
            loop {
                match rx.recv_timeout(UNMOUNT_WAIT) {
                    Ok(Event::SessionEnded(r)) => {
                        if let Err(e) = r {
                            warn!("session ended with: {e}");
                        }
                        break;
                    }
                    Ok(Event::Signal(_)) => {}
                    Err(_) => {
                        warn!("session still busy after unmount; exiting anyway");
                        break;
                    }
                }
            }
        }
        Ok(Event::SessionEnded(r)) => {
            info!("unmounted from outside");
            if let Err(e) = r {
                warn!("session ended with: {e}");
            }
        }
        Err(_) => {}
    }
    signals_handle.close();
    drop(control);
    state.shutdown().map_err(FaultFsError::FinalSync)
}
