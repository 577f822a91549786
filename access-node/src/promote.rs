//! `access-node promote`: makes the replica the new primary's image, either through the
//! running `serve` (`--control CTL`: it fences the attached primary, promotes, replies, exits)
//! or directly on an image no process holds (`--image IMG`). Returns only once the image is
//! safe to boot: promoted on disk and released by the access node.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mirror_proto::control::{self, ControlError};
use serde_json::Value;
use thiserror::Error;

use crate::args::PromoteArgs;
use crate::replica::{Promotion, Replica, ReplicaError, WitnessCfg};
use crate::status::Status;
use mirror_proto::auth::{AuthError, Secret};

/// How long the access node may take to promote (an fdatasync of the image) and answer.
const PROMOTE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the access node may take to let go of the image after answering.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum PromoteError {
    #[error("promote needs --control CTL or --image IMG")]
    NoTarget,
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("{0} is in use by a running access node: use promote --control CTL")]
    InUse(PathBuf),
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    #[error(transparent)]
    Secret(#[from] AuthError),
    #[error("control socket {path} answered without {key:?}: {reply}")]
    BadReply {
        path: PathBuf,
        key: &'static str,
        reply: String,
    },
    #[error(
        "promoted, but the access node did not release {path} within {} s: do not boot it yet",
        RELEASE_TIMEOUT.as_secs()
    )]
    NotReleased { path: PathBuf },
    #[error("promoted, but cannot check whether {path} is released")]
    Check {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Promotes; returns the line to print.
pub fn run(a: PromoteArgs) -> Result<String, PromoteError> {
    match (a.control, a.image) {
        (Some(ctl), _) => through_server(&ctl, a.force),
        (None, Some(img)) => {
            let witness = match (a.witness, a.secret_file) {
                (Some(addr), Some(f)) => Some(WitnessCfg {
                    addr,
                    secret: Secret::load(&f)?,
                }),
                _ => None,
            };
            offline(&img, a.force, witness.as_ref())
        }
        (None, None) => Err(PromoteError::NoTarget),
    }
}

fn through_server(ctl: &Path, force: bool) -> Result<String, PromoteError> {
    let command = if force { "promote force" } else { "promote" };
    let v = control::request_timeout(ctl, command, PROMOTE_TIMEOUT)?;
    let bad = |key| PromoteError::BadReply {
        path: ctl.to_owned(),
        key,
        reply: v.to_string(),
    };
    let image = PathBuf::from(
        v.get("image")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("image"))?,
    );
    let u = |key| v.get(key).and_then(Value::as_u64).ok_or_else(|| bad(key));
    let p = Promotion {
        previous_generation: u("previous_generation")?,
        generation: u("generation")?,
        already_primary: v
            .get("already_primary")
            .and_then(Value::as_bool)
            .ok_or_else(|| bad("already_primary"))?,
        forced: v.get("forced").and_then(Value::as_bool).unwrap_or(false),
        unverified: v
            .get("unverified")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    };
    wait_released(&image)?;
    Ok(describe(&image, &p, "old primary fenced; image released"))
}

fn offline(
    image: &Path,
    force: bool,
    witness: Option<&WitnessCfg>,
) -> Result<String, PromoteError> {
    let status = Arc::new(Status::new(image.to_owned(), 0));
    let mut replica = Replica::open(image, 0, status).map_err(|e| match e {
        ReplicaError::Locked { path } => PromoteError::InUse(path),
        e => e.into(),
    })?;
    let p = replica.promote_with(force, witness)?;
    Ok(describe(image, &p, "ready to serve"))
}

fn describe(image: &Path, p: &Promotion, tail: &str) -> String {
    if p.already_primary {
        format!(
            "already primary (generation {:016x}): {} unchanged; {tail}",
            p.generation,
            image.display()
        )
    } else {
        format!(
            "promoted {}: generation {:016x} -> {:016x}{}; {tail}",
            image.display(),
            p.previous_generation,
            p.generation,
            if p.forced {
                " (forced: its data was not up to date)"
            } else {
                ""
            }
        ) + &if p.unverified {
            format!("\nwarning: {}", crate::server::UNVERIFIED)
        } else {
            String::new()
        }
    }
}

/// Waits until no process holds the image's lock (the access node exited or let go of it).
fn wait_released(image: &Path) -> Result<(), PromoteError> {
    let deadline = Instant::now() + RELEASE_TIMEOUT;
    let err = |source| PromoteError::Check {
        path: image.to_owned(),
        source,
    };
    loop {
        let file = File::open(image).map_err(err)?;
        // SAFETY: flock on a file descriptor we own; no memory is passed. The lock goes away
        // with the descriptor when `file` is dropped.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::WouldBlock {
            return Err(err(e));
        }
        drop(file);
        if Instant::now() >= deadline {
            return Err(PromoteError::NotReleased {
                path: image.to_owned(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
