//! The file of `serve --config FILE` (both programs): TOML, one key per long option of `serve`
//! (`num-queues = 2`, `on-peer-loss = "suspend"`). Each program deserializes it into its own
//! struct (`deny_unknown_fields`: a misspelt key is an error naming it); this module reads it.
//!
//! The file may name commands the program runs (`fence-peer`, `on-primary-loss`), usually as
//! root, so it is read only if no one but its owner can change it and that owner is root or
//! the user the program runs as (like sshd's StrictModes). It is opened without blocking (a
//! FIFO or a device there is refused, not waited on), must be a regular file, and is read up
//! to [`MAX_CONFIG_BYTES`]. Paths in it are taken as given: no `~`, no variables, no globs
//! (relative ones are relative to the working directory, `/` under systemd).

use std::fs::OpenOptions;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use thiserror::Error;

/// Largest config file read (a real one is a few hundred bytes).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

#[derive(Debug, Error)]
pub enum ConfigFileError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("config file {0} is not a regular file")]
    NotAFile(PathBuf),
    #[error("config file {0} is larger than {MAX_CONFIG_BYTES} bytes")]
    TooLarge(PathBuf),
    #[error(
        "config file {path} can be changed by other users (mode {mode:04o}) and may name \
         commands this program runs: refused (chmod go-w)"
    )]
    Writable { path: PathBuf, mode: u32 },
    #[error("config file {path} is owned by uid {uid}, neither root nor this user: refused")]
    Owner { path: PathBuf, uid: u32 },
    #[error("config file {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
}

/// Reads the TOML file at `path` (with the checks of the module documentation) into `T`.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigFileError> {
    let bytes = read(path)?;
    toml::from_slice(&bytes).map_err(|source| ConfigFileError::Parse {
        path: path.to_owned(),
        source,
    })
}

/// The bytes of the config file at `path`, checked.
pub fn read(path: &Path) -> Result<Vec<u8>, ConfigFileError> {
    let io_err = |source| ConfigFileError::Read {
        path: path.to_owned(),
        source,
    };
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(io_err)?;
    let meta = f.metadata().map_err(io_err)?;
    if !meta.is_file() {
        return Err(ConfigFileError::NotAFile(path.to_owned()));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(ConfigFileError::Writable {
            path: path.to_owned(),
            mode,
        });
    }
    if meta.uid() != 0 && meta.uid() != crate::sys::effective_uid() {
        return Err(ConfigFileError::Owner {
            path: path.to_owned(),
            uid: meta.uid(),
        });
    }
    let mut bytes = Vec::new();
    f.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(ConfigFileError::TooLarge(path.to_owned()));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::os::unix::fs::PermissionsExt;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "kebab-case")]
    struct Opts {
        num_queues: Option<u16>,
        image: Option<PathBuf>,
    }

    fn write(dir: &Path, name: &str, text: &[u8], mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn reads_a_file_and_names_it_in_every_error() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "ok.toml",
            b"# comment\nnum-queues = 2\nimage = \"~/$HOME/a b.img\"\n",
            0o644,
        );
        assert_eq!(
            load::<Opts>(&p).unwrap(),
            Opts {
                num_queues: Some(2),
                // Taken as given: no expansion of any kind.
                image: Some("~/$HOME/a b.img".into()),
            }
        );
        let cases: [(&str, &[u8], &str); 4] = [
            (
                "unknown.toml",
                b"num-queues = 2\nbogus-key = 1\n",
                "bogus-key",
            ),
            ("badvalue.toml", b"num-queues = \"two\"\n", "num-queues"),
            ("range.toml", b"num-queues = 70000\n", "num-queues"),
            (
                "garbage.toml",
                b"this is not toml\n\x00\xff",
                "garbage.toml",
            ),
        ];
        for (name, text, needle) in cases {
            let p = write(d.path(), name, text, 0o600);
            let e = load::<Opts>(&p).unwrap_err();
            let msg = crate::sys::error_chain(&e);
            assert!(msg.contains(name), "{msg}");
            assert!(msg.contains(needle), "{msg}");
        }
        let e = load::<Opts>(&d.path().join("missing.toml")).unwrap_err();
        assert!(e.to_string().contains("missing.toml"), "{e}");
    }

    #[test]
    fn refuses_what_others_could_change_or_what_is_not_a_small_file() {
        let d = tempfile::tempdir().unwrap();
        for mode in [0o664, 0o646, 0o666] {
            let p = write(d.path(), "w.toml", b"num-queues = 1\n", mode);
            assert!(
                matches!(load::<Opts>(&p), Err(ConfigFileError::Writable { .. })),
                "{mode:o}"
            );
        }
        assert!(matches!(
            load::<Opts>(d.path()),
            Err(ConfigFileError::NotAFile(_))
        ));
        // A FIFO is refused without waiting for a writer.
        let fifo = d.path().join("fifo.toml");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo(3) with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(matches!(
            load::<Opts>(&fifo),
            Err(ConfigFileError::NotAFile(_))
        ));
        let big = vec![b'#'; MAX_CONFIG_BYTES as usize + 1];
        let p = write(d.path(), "big.toml", &big, 0o600);
        assert!(matches!(
            load::<Opts>(&p),
            Err(ConfigFileError::TooLarge(_))
        ));
        // Someone else's file (only root can make one here).
        if crate::sys::effective_uid() == 0 {
            let p = write(d.path(), "nobody.toml", b"num-queues = 1\n", 0o644);
            std::os::unix::fs::chown(&p, Some(65534), None).unwrap();
            assert!(matches!(
                load::<Opts>(&p),
                Err(ConfigFileError::Owner { uid: 65534, .. })
            ));
        }
    }
}
