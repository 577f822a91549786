//! The shared secret: loading it (length and file-mode checks) and deriving the link's Noise
//! pre-shared key from it; random identifiers. The handshake itself is `secure.rs`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;

type HmacSha256 = Hmac<Sha256>;

/// Shortest secret accepted. The link's key is derived from the secret alone, so whoever
/// watches one handshake can test guesses offline: the secret must not be guessable
/// (`head -c 32 /dev/urandom | base64` makes a good one).
pub const MIN_SECRET_LEN: usize = 16;

/// Longest secret file read (a secret is a line, not a document).
pub const MAX_SECRET_LEN: usize = 4096;

#[derive(Debug, Error)]
pub enum AuthError {
    #[error("cannot read secret file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("secret file {0} is empty")]
    Empty(PathBuf),
    #[error(
        "the secret in {path} is {len} bytes; at least {MIN_SECRET_LEN} are needed \
         (make one with: head -c 32 /dev/urandom | base64 >FILE)"
    )]
    TooShort { path: PathBuf, len: usize },
    #[error("secret file {path} is larger than {MAX_SECRET_LEN} bytes: not a secret file?")]
    TooLong { path: PathBuf },
    #[error(
        "secret file {path} can be read or written by group or others (mode {mode:04o}); \
         run: chmod 600 {path}"
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error("cannot get random bytes")]
    Random(#[source] getrandom::Error),
}

/// The shared secret. Its bytes are never logged (Debug hides them).
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

impl Secret {
    /// A secret from memory (tests, and the config file's inline form if there ever is one):
    /// the same length rule as a file.
    pub fn from_bytes(b: &[u8]) -> Result<Self, AuthError> {
        check_len(Path::new("(memory)"), b.len())?;
        Ok(Secret(b.to_vec()))
    }

    /// Reads a secret file; trailing whitespace (a newline from `echo`) is not part of it.
    /// Refuses a file that group or others can read or write, and a secret shorter than
    /// [`MIN_SECRET_LEN`].
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let read = |source| AuthError::Read {
            path: path.to_owned(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read)?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(AuthError::Exposed {
                path: path.to_owned(),
                mode,
            });
        }
        if meta.len() > MAX_SECRET_LEN as u64 {
            return Err(AuthError::TooLong {
                path: path.to_owned(),
            });
        }
        let raw = std::fs::read(path).map_err(read)?;
        if raw.len() > MAX_SECRET_LEN {
            return Err(AuthError::TooLong {
                path: path.to_owned(),
            });
        }
        let end = raw
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |i| i + 1);
        check_len(path, end)?;
        Ok(Secret(raw[..end].to_vec()))
    }

    /// The Noise pre-shared key for protocol `version`: HMAC-SHA256(secret, label). The
    /// label separates this key from any other use of the same secret.
    pub fn noise_psk(&self) -> [u8; 32] {
        // HMAC accepts keys of any length; new_from_slice cannot fail for HMAC.
        let mut m = match HmacSha256::new_from_slice(&self.0) {
            Ok(m) => m,
            Err(_) => unreachable_hmac(),
        };
        m.update(b"vhost-mirror/2/noise-psk");
        m.finalize().into_bytes().into()
    }
}

fn check_len(path: &Path, len: usize) -> Result<(), AuthError> {
    if len == 0 {
        return Err(AuthError::Empty(path.to_owned()));
    }
    if len < MIN_SECRET_LEN {
        return Err(AuthError::TooShort {
            path: path.to_owned(),
            len,
        });
    }
    Ok(())
}

#[cold]
fn unreachable_hmac() -> ! {
    // Hmac::new_from_slice only fails for MACs with fixed key sizes, which HMAC is not.
    std::process::abort()
}

/// A random non-zero 64-bit identifier (node ids, generations).
pub fn random_id() -> Result<u64, AuthError> {
    let mut b = [0u8; 8];
    loop {
        getrandom::getrandom(&mut b).map_err(AuthError::Random)?;
        let v = u64::from_le_bytes(b);
        if v != 0 {
            return Ok(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_secret(p: &Path, content: &str, mode: u32) {
        std::fs::write(p, content).unwrap();
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn psk_depends_on_every_byte_of_the_secret() {
        let s = Secret::from_bytes(b"0123456789abcdef").unwrap();
        let t = Secret::from_bytes(b"0123456789abcdeg").unwrap();
        assert_ne!(s.noise_psk(), t.noise_psk());
        assert_eq!(
            s.noise_psk(),
            Secret::from_bytes(b"0123456789abcdef").unwrap().noise_psk()
        );
    }

    #[test]
    fn secret_file_trims_newline_and_refuses_empty_short_and_exposed() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s");
        write_secret(&p, "0123456789abcdef\n", 0o600);
        let a = Secret::load(&p).unwrap();
        let b = Secret::from_bytes(b"0123456789abcdef").unwrap();
        assert_eq!(a.noise_psk(), b.noise_psk());
        assert!(!format!("{a:?}").contains("0123"));

        write_secret(&p, "\n \n", 0o600);
        assert!(matches!(Secret::load(&p), Err(AuthError::Empty(_))));
        write_secret(&p, "hunter2\n", 0o600);
        let e = Secret::load(&p).unwrap_err();
        assert!(matches!(e, AuthError::TooShort { len: 7, .. }), "{e}");
        assert!(Secret::from_bytes(b"hunter2").is_err());
        for mode in [0o644, 0o640, 0o604, 0o620, 0o602] {
            write_secret(&p, "0123456789abcdef\n", mode);
            let e = Secret::load(&p).unwrap_err();
            assert!(matches!(e, AuthError::Exposed { .. }), "{mode:o}: {e}");
            assert!(e.to_string().contains("chmod 600"), "{e}");
        }
        write_secret(&p, &"x".repeat(MAX_SECRET_LEN + 1), 0o400);
        assert!(matches!(Secret::load(&p), Err(AuthError::TooLong { .. })));
        assert!(Secret::load(&d.path().join("missing"))
            .unwrap_err()
            .to_string()
            .contains("missing"));
    }
}
