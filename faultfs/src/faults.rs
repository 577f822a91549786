//! Injected I/O errors: the fail rules set over the control socket, how they are matched
//! against an operation on a path, and the operation counters reported by `stats`.

use std::fmt;

use crate::error::ControlError;

/// The kind of operation a rule applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOp {
    /// `read` requests.
    Read,
    /// `write` requests and data-changing `fallocate` (punch-hole, zero-range).
    Write,
    /// `fsync`/`fdatasync` of a file, and `fsync` of a directory.
    Fsync,
    /// All of the above.
    Any,
}

impl FaultOp {
    pub fn parse(s: &str) -> Result<FaultOp, ControlError> {
        match s {
            "read" => Ok(FaultOp::Read),
            "write" => Ok(FaultOp::Write),
            "fsync" => Ok(FaultOp::Fsync),
            "any" => Ok(FaultOp::Any),
            _ => Err(ControlError::BadOp(s.to_string())),
        }
    }

    fn covers(self, op: FaultOp) -> bool {
        self == FaultOp::Any || self == op
    }
}

impl fmt::Display for FaultOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FaultOp::Read => "read",
            FaultOp::Write => "write",
            FaultOp::Fsync => "fsync",
            FaultOp::Any => "any",
        })
    }
}

/// An error number that may be injected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultErrno {
    Eio,
    Enospc,
}

impl FaultErrno {
    pub fn parse(s: &str) -> Result<FaultErrno, ControlError> {
        match s {
            "EIO" => Ok(FaultErrno::Eio),
            "ENOSPC" => Ok(FaultErrno::Enospc),
            _ => Err(ControlError::BadErrno(s.to_string())),
        }
    }

    pub fn raw(self) -> i32 {
        match self {
            FaultErrno::Eio => libc::EIO,
            FaultErrno::Enospc => libc::ENOSPC,
        }
    }
}

impl fmt::Display for FaultErrno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FaultErrno::Eio => "EIO",
            FaultErrno::Enospc => "ENOSPC",
        })
    }
}

/// `fail <op> <name-substring> <errno> [count]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailRule {
    pub op: FaultOp,
    /// Matches files whose path relative to the mount contains this; a trailing `$` anchors
    /// it at the end of the path (`disk.img$` matches `disk.img`, not `disk.img.meta`).
    pub pattern: String,
    pub errno: FaultErrno,
    /// How many more times the rule fires; `None`: until cleared.
    pub remaining: Option<u32>,
}

/// Substring match, or suffix match for a pattern ending in `$`.
fn pattern_matches(pattern: &str, path: &str) -> bool {
    match pattern.strip_suffix('$') {
        Some(suffix) => path.ends_with(suffix),
        None => path.contains(pattern),
    }
}

/// The active rules and the operation counters.
#[derive(Debug, Default)]
pub struct Faults {
    rules: Vec<FailRule>,
    pub reads: u64,
    pub writes: u64,
    pub fsyncs: u64,
    pub dir_fsyncs: u64,
    pub injected: u64,
}

impl Faults {
    pub fn add(&mut self, rule: FailRule) {
        self.rules.push(rule);
    }

    pub fn clear(&mut self) {
        self.rules.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The errno to inject for `op` on the file at `path` (relative to the mount), if a rule
    /// matches. The first matching rule fires and uses up one of its count.
    pub fn check(&mut self, op: FaultOp, path: &str) -> Option<FaultErrno> {
        let i = self
            .rules
            .iter()
            .position(|r| r.op.covers(op) && pattern_matches(&r.pattern, path))?;
        let rule = &mut self.rules[i];
        let errno = rule.errno;
        if let Some(n) = rule.remaining.as_mut() {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.rules.remove(i);
            }
        }
        self.injected += 1;
        Some(errno)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counted_rule_fires_then_disappears() {
        let mut f = Faults::default();
        f.add(FailRule {
            op: FaultOp::Write,
            pattern: "img".into(),
            errno: FaultErrno::Enospc,
            remaining: Some(2),
        });
        assert_eq!(f.check(FaultOp::Read, "a/img"), None);
        assert_eq!(f.check(FaultOp::Write, "other"), None);
        assert_eq!(f.check(FaultOp::Write, "a/img"), Some(FaultErrno::Enospc));
        assert_eq!(
            f.check(FaultOp::Write, "img.meta"),
            Some(FaultErrno::Enospc)
        );
        assert_eq!(f.check(FaultOp::Write, "a/img"), None);
        assert_eq!(f.injected, 2);
        assert!(f.is_empty());
    }

    #[test]
    fn dollar_anchors_at_the_end() {
        let mut f = Faults::default();
        f.add(FailRule {
            op: FaultOp::Write,
            pattern: "disk.img$".into(),
            errno: FaultErrno::Eio,
            remaining: None,
        });
        assert_eq!(f.check(FaultOp::Write, "disk.img.meta"), None);
        assert_eq!(f.check(FaultOp::Write, "disk.img.meta.tmp"), None);
        assert_eq!(f.check(FaultOp::Write, "a/disk.img"), Some(FaultErrno::Eio));
    }

    #[test]
    fn any_covers_everything_until_cleared() {
        let mut f = Faults::default();
        f.add(FailRule {
            op: FaultOp::Any,
            pattern: String::new(),
            errno: FaultErrno::Eio,
            remaining: None,
        });
        for op in [FaultOp::Read, FaultOp::Write, FaultOp::Fsync] {
            assert_eq!(f.check(op, "x"), Some(FaultErrno::Eio));
        }
        f.clear();
        assert_eq!(f.check(FaultOp::Read, "x"), None);
    }
}
