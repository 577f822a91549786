//! Mutual challenge-response authentication over a shared secret (HMAC-SHA256).
//!
//! The primary sends a nonce (Hello); the replica answers with its own nonce and a proof
//! (Challenge); the primary checks the proof and sends its own (Auth); the replica checks it
//! (AuthOk or Refuse). The proofs are bound to both nonces and to the direction, so neither can
//! be replayed or reflected; the secret itself never crosses the wire.

use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;

type HmacSha256 = Hmac<Sha256>;

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
    #[error("cannot get random bytes for a nonce")]
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
    pub fn from_bytes(b: &[u8]) -> Result<Self, AuthError> {
        if b.is_empty() {
            return Err(AuthError::Empty(PathBuf::new()));
        }
        Ok(Secret(b.to_vec()))
    }

    /// Reads a secret file; trailing whitespace (a newline from `echo`) is not part of it.
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let raw = std::fs::read(path).map_err(|source| AuthError::Read {
            path: path.to_owned(),
            source,
        })?;
        let end = raw
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |i| i + 1);
        if end == 0 {
            return Err(AuthError::Empty(path.to_owned()));
        }
        Ok(Secret(raw[..end].to_vec()))
    }

    fn mac(&self, label: &[u8], a: &[u8; 32], b: &[u8; 32]) -> HmacSha256 {
        // HMAC accepts keys of any length; new_from_slice cannot fail for HMAC.
        let mut m = match HmacSha256::new_from_slice(&self.0) {
            Ok(m) => m,
            Err(_) => unreachable_hmac(),
        };
        m.update(label);
        m.update(a);
        m.update(b);
        m
    }

    /// The replica's proof: HMAC(secret, "vhost-mirror/1/replica" | primary nonce | replica nonce).
    pub fn replica_proof(&self, primary_nonce: &[u8; 32], replica_nonce: &[u8; 32]) -> [u8; 32] {
        self.mac(REPLICA, primary_nonce, replica_nonce)
            .finalize()
            .into_bytes()
            .into()
    }

    /// The primary's proof: HMAC(secret, "vhost-mirror/1/primary" | replica nonce | primary nonce).
    pub fn primary_proof(&self, primary_nonce: &[u8; 32], replica_nonce: &[u8; 32]) -> [u8; 32] {
        self.mac(PRIMARY, replica_nonce, primary_nonce)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Constant-time check of a replica's proof.
    pub fn verify_replica(&self, pn: &[u8; 32], rn: &[u8; 32], proof: &[u8; 32]) -> bool {
        self.mac(REPLICA, pn, rn).verify_slice(proof).is_ok()
    }

    /// Constant-time check of a primary's proof.
    pub fn verify_primary(&self, pn: &[u8; 32], rn: &[u8; 32], proof: &[u8; 32]) -> bool {
        self.mac(PRIMARY, rn, pn).verify_slice(proof).is_ok()
    }
}

const REPLICA: &[u8] = b"vhost-mirror/1/replica";
const PRIMARY: &[u8] = b"vhost-mirror/1/primary";

#[cold]
fn unreachable_hmac() -> ! {
    // Hmac::new_from_slice only fails for MACs with fixed key sizes, which HMAC is not.
    std::process::abort()
}

/// 32 random bytes.
pub fn nonce() -> Result<[u8; 32], AuthError> {
    let mut n = [0u8; 32];
    getrandom::getrandom(&mut n).map_err(AuthError::Random)?;
    Ok(n)
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

    #[test]
    fn proofs_verify_only_with_the_same_secret_and_nonces() {
        let s = Secret::from_bytes(b"hunter2").unwrap();
        let other = Secret::from_bytes(b"hunter3").unwrap();
        let (pn, rn) = (nonce().unwrap(), nonce().unwrap());
        let rp = s.replica_proof(&pn, &rn);
        assert!(s.verify_replica(&pn, &rn, &rp));
        assert!(!other.verify_replica(&pn, &rn, &rp));
        assert!(!s.verify_replica(&rn, &pn, &rp), "swapped nonces");
        // A replica proof cannot be reflected as a primary proof.
        assert!(!s.verify_primary(&pn, &rn, &rp));
        let pp = s.primary_proof(&pn, &rn);
        assert!(s.verify_primary(&pn, &rn, &pp));
        assert_ne!(pp, rp);
    }

    #[test]
    fn secret_file_trims_newline_and_refuses_empty() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s");
        std::fs::write(&p, "abc\n").unwrap();
        let a = Secret::load(&p).unwrap();
        let b = Secret::from_bytes(b"abc").unwrap();
        let (pn, rn) = ([1; 32], [2; 32]);
        assert_eq!(a.replica_proof(&pn, &rn), b.replica_proof(&pn, &rn));
        std::fs::write(&p, "\n \n").unwrap();
        assert!(matches!(Secret::load(&p), Err(AuthError::Empty(_))));
        assert!(Secret::load(&d.path().join("missing"))
            .unwrap_err()
            .to_string()
            .contains("missing"));
        assert!(!format!("{a:?}").contains("abc"));
    }
}
