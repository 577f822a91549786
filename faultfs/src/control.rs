//! The control socket: a unix socket with a line protocol. Each line is one command; each
//! command gets one reply line, `ok ...` or `err <message>`.
//!
//! | command | effect | reply |
//! | --- | --- | --- |
//! | `cut` | power loss: drop all dirty data of all files | `ok <bytes dropped>` |
//! | `fail <op> <substring> <errno> [count]` | inject `errno` into `op` (read, write, fsync, any) on files whose path relative to the mount contains `substring` (a trailing `$` anchors it at the end); `count` times, or until cleared | `ok` |
//! | `clear` | remove all fail rules | `ok` |
//! | `stats` | dirty state and counters | `ok dirty_bytes=.. dirty_files=.. reads=.. writes=.. fsyncs=.. dir_fsyncs=.. injected=..` |
//! | `sync` | write all dirty data to the backing files and fsync them | `ok <files written>` |

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::{debug, warn};

use crate::error::{ControlError, FaultFsError};
use crate::faults::{FailRule, FaultErrno, FaultOp};
use crate::fs::State;

/// A parsed command line.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Cut,
    Fail(FailRule),
    Clear,
    Stats,
    Sync,
}

const FAIL_USAGE: &str = "fail <read|write|fsync|any> <name-substring> <EIO|ENOSPC> [count]";

impl Command {
    pub fn parse(line: &str) -> Result<Command, ControlError> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some((&cmd, args)) = words.split_first() else {
            return Err(ControlError::Empty);
        };
        let no_args = |c: Command| {
            if args.is_empty() {
                Ok(c)
            } else {
                Err(ControlError::Usage(
                    "cut | clear | stats | sync take no arguments",
                ))
            }
        };
        match cmd {
            "cut" => no_args(Command::Cut),
            "clear" => no_args(Command::Clear),
            "stats" => no_args(Command::Stats),
            "sync" => no_args(Command::Sync),
            "fail" => {
                let (op, pattern, errno, count) = match args {
                    [op, pattern, errno] => (op, pattern, errno, None),
                    [op, pattern, errno, count] => (op, pattern, errno, Some(count)),
                    _ => return Err(ControlError::Usage(FAIL_USAGE)),
                };
                let remaining = match count {
                    None => None,
                    Some(c) => match c.parse::<u32>() {
                        Ok(n) if n > 0 => Some(n),
                        _ => return Err(ControlError::BadCount(c.to_string())),
                    },
                };
                Ok(Command::Fail(FailRule {
                    op: FaultOp::parse(op)?,
                    pattern: pattern.to_string(),
                    errno: FaultErrno::parse(errno)?,
                    remaining,
                }))
            }
            _ => Err(ControlError::Unknown(cmd.to_string())),
        }
    }
}

/// Runs one command line against the state; returns the reply line (without newline).
pub fn execute(state: &State, line: &str) -> String {
    let r = Command::parse(line).and_then(|cmd| match cmd {
        Command::Cut => Ok(format!("ok {}", state.cut())),
        Command::Fail(rule) => {
            state.add_rule(rule);
            Ok("ok".to_string())
        }
        Command::Clear => {
            state.clear_rules();
            Ok("ok".to_string())
        }
        Command::Stats => Ok(format!("ok {}", state.stats())),
        Command::Sync => state
            .sync()
            .map(|n| format!("ok {n}"))
            .map_err(|e| ControlError::Sync(e.to_string())),
    });
    r.unwrap_or_else(|e| format!("err {e}"))
}

/// The listening socket; its path is removed on drop.
pub struct ControlServer {
    path: PathBuf,
}

impl ControlServer {
    /// Binds `path` (replacing a stale socket) and serves it on a thread, one thread per client.
    pub fn spawn(path: &Path, state: Arc<State>) -> Result<ControlServer, FaultFsError> {
        let err = |source| FaultFsError::Control {
            path: path.to_owned(),
            source,
        };
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
            std::fs::remove_file(path).map_err(err)?;
        }
        let listener = UnixListener::bind(path).map_err(err)?;
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    match conn {
                        Ok(stream) => {
                            let state = state.clone();
                            let spawned = std::thread::Builder::new()
                                .name("control-client".into())
                                .spawn(move || serve(stream, &state));
                            if let Err(e) = spawned {
                                warn!("control: cannot spawn a client thread: {e}");
                            }
                        }
                        Err(e) => warn!("control: accept: {e}"),
                    }
                }
            })
            .map_err(FaultFsError::Thread)?;
        Ok(ControlServer {
            path: path.to_owned(),
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(stream: UnixStream, state: &State) {
    let mut out = match stream.try_clone() {
        Ok(s) => s,
        Err(e) => {
            warn!("control: {e}");
            return;
        }
    };
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else {
            return;
        };
        let reply = execute(state, &line);
        debug!("control: {line:?} -> {reply:?}");
        if writeln!(out, "{reply}").is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands() {
        assert_eq!(Command::parse("cut"), Ok(Command::Cut));
        assert_eq!(Command::parse("  stats "), Ok(Command::Stats));
        assert_eq!(
            Command::parse("fail fsync IMG.meta EIO 1"),
            Ok(Command::Fail(FailRule {
                op: FaultOp::Fsync,
                pattern: "IMG.meta".into(),
                errno: FaultErrno::Eio,
                remaining: Some(1),
            }))
        );
        assert_eq!(
            Command::parse("fail any img ENOSPC"),
            Ok(Command::Fail(FailRule {
                op: FaultOp::Any,
                pattern: "img".into(),
                errno: FaultErrno::Enospc,
                remaining: None,
            }))
        );
    }

    #[test]
    fn rejects_bad_commands() {
        assert_eq!(Command::parse(""), Err(ControlError::Empty));
        assert!(matches!(
            Command::parse("boom"),
            Err(ControlError::Unknown(_))
        ));
        assert!(matches!(
            Command::parse("cut now"),
            Err(ControlError::Usage(_))
        ));
        assert!(matches!(
            Command::parse("fail read x"),
            Err(ControlError::Usage(_))
        ));
        assert!(matches!(
            Command::parse("fail open x EIO"),
            Err(ControlError::BadOp(_))
        ));
        assert!(matches!(
            Command::parse("fail read x EPERM"),
            Err(ControlError::BadErrno(_))
        ));
        assert!(matches!(
            Command::parse("fail read x EIO 0"),
            Err(ControlError::BadCount(_))
        ));
    }
}
