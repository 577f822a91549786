//! Validated configuration of `access-node serve`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use mirror_proto::auth::{AuthError, Secret};
use mirror_proto::sys::{GroupError, SocketAccess};
use thiserror::Error;

use crate::args::ServeArgs;

/// How long a connecting peer may take for each handshake step.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// An attached primary that sends nothing (not even a Ping) for this long is dropped.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest accepted --cache-mb (1 TiB of cache is certainly a typo).
pub const MAX_CACHE_MB: u64 = 1 << 20;
/// --primary-timeout when --on-primary-loss is given without it.
pub const DEFAULT_PRIMARY_TIMEOUT: u64 = 10;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("--listen {addr:?} is not an address like 127.0.0.1:7800")]
    Listen {
        addr: String,
        #[source]
        source: std::net::AddrParseError,
    },
    #[error(transparent)]
    Secret(#[from] AuthError),
    #[error("--cache-mb must be at most {MAX_CACHE_MB}, got {0}")]
    CacheSize(u64),
    #[error("--control and --image must be different paths")]
    SamePaths,
    #[error("--primary-timeout must be at least 1 second")]
    PrimaryTimeout,
    #[error("--on-primary-loss needs a command")]
    EmptyCommand,
    #[error("--socket-group")]
    SocketGroup(#[source] GroupError),
}

/// `--on-primary-loss CMD --primary-timeout SECS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrimaryLoss {
    pub command: String,
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub image: PathBuf,
    pub listen: SocketAddr,
    pub secret: Secret,
    pub control: Option<PathBuf>,
    /// Who may use the control socket besides root and us.
    pub socket_access: SocketAccess,
    pub cache_bytes: u64,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub discard_my_data: bool,
    pub primary_loss: Option<PrimaryLoss>,
    pub witness: Option<crate::replica::WitnessCfg>,
}

impl TryFrom<ServeArgs> for ServeConfig {
    type Error = ConfigError;

    fn try_from(a: ServeArgs) -> Result<Self, Self::Error> {
        let listen = a
            .listen
            .parse::<SocketAddr>()
            .map_err(|source| ConfigError::Listen {
                addr: a.listen.clone(),
                source,
            })?;
        if a.cache_mb > MAX_CACHE_MB {
            return Err(ConfigError::CacheSize(a.cache_mb));
        }
        if a.control.as_ref() == Some(&a.image) {
            return Err(ConfigError::SamePaths);
        }
        let primary_loss = match a.on_primary_loss {
            Some(command) => {
                if command.trim().is_empty() {
                    return Err(ConfigError::EmptyCommand);
                }
                let secs = a.primary_timeout.unwrap_or(DEFAULT_PRIMARY_TIMEOUT);
                if secs == 0 {
                    return Err(ConfigError::PrimaryTimeout);
                }
                Some(PrimaryLoss {
                    command,
                    timeout: Duration::from_secs(secs),
                })
            }
            // clap refuses --primary-timeout without --on-primary-loss already.
            None => None,
        };
        let socket_access = SocketAccess {
            group: match &a.socket_group {
                Some(g) => {
                    Some(mirror_proto::sys::resolve_group(g).map_err(ConfigError::SocketGroup)?)
                }
                None => None,
            },
        };
        let secret = Secret::load(&a.secret_file)?;
        let witness = a.witness.map(|addr| crate::replica::WitnessCfg {
            addr,
            secret: secret.clone(),
        });
        Ok(ServeConfig {
            image: a.image,
            listen,
            secret,
            control: a.control,
            socket_access,
            cache_bytes: a.cache_mb << 20,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            discard_my_data: a.discard_my_data,
            primary_loss,
            witness,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dir: &std::path::Path) -> ServeArgs {
        let secret = dir.join("secret");
        std::fs::write(&secret, "s3cret s3cret s3cret\n").unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        ServeArgs {
            image: dir.join("a.img"),
            listen: "127.0.0.1:7800".into(),
            secret_file: secret,
            control: None,
            socket_group: None,
            cache_mb: 64,
            discard_my_data: false,
            on_primary_loss: None,
            primary_timeout: None,
            witness: None,
        }
    }

    #[test]
    fn validates() {
        let d = tempfile::tempdir().unwrap();
        let c = ServeConfig::try_from(args(d.path())).unwrap();
        assert_eq!(c.listen, "127.0.0.1:7800".parse().unwrap());
        assert_eq!(c.cache_bytes, 64 << 20);

        let a = ServeArgs {
            listen: "localhost".into(),
            ..args(d.path())
        };
        let e = ServeConfig::try_from(a).unwrap_err();
        assert!(e.to_string().contains("localhost"), "{e}");

        let a = ServeArgs {
            cache_mb: MAX_CACHE_MB + 1,
            ..args(d.path())
        };
        assert!(matches!(
            ServeConfig::try_from(a),
            Err(ConfigError::CacheSize(_))
        ));

        let a = args(d.path());
        let a = ServeArgs {
            control: Some(a.image.clone()),
            ..a
        };
        assert!(matches!(
            ServeConfig::try_from(a),
            Err(ConfigError::SamePaths)
        ));
    }

    #[test]
    fn socket_group_by_name_or_number() {
        let d = tempfile::tempdir().unwrap();
        let c = ServeConfig::try_from(args(d.path())).unwrap();
        assert_eq!(c.socket_access.group, None);
        let a = ServeArgs {
            socket_group: Some("4242".into()),
            ..args(d.path())
        };
        assert_eq!(
            ServeConfig::try_from(a).unwrap().socket_access.group,
            Some(4242)
        );
        let a = ServeArgs {
            socket_group: Some("no-such-group-vhm".into()),
            ..args(d.path())
        };
        assert!(matches!(
            ServeConfig::try_from(a),
            Err(ConfigError::SocketGroup(_))
        ));
    }

    #[test]
    fn primary_loss_hook() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(
            ServeConfig::try_from(args(d.path())).unwrap().primary_loss,
            None
        );
        let a = ServeArgs {
            on_primary_loss: Some("touch x".into()),
            ..args(d.path())
        };
        let c = ServeConfig::try_from(a).unwrap();
        assert_eq!(
            c.primary_loss,
            Some(PrimaryLoss {
                command: "touch x".into(),
                timeout: Duration::from_secs(DEFAULT_PRIMARY_TIMEOUT)
            })
        );
        let a = ServeArgs {
            on_primary_loss: Some("touch x".into()),
            primary_timeout: Some(0),
            ..args(d.path())
        };
        assert!(matches!(
            ServeConfig::try_from(a),
            Err(ConfigError::PrimaryTimeout)
        ));
        let a = ServeArgs {
            on_primary_loss: Some(" ".into()),
            ..args(d.path())
        };
        assert!(matches!(
            ServeConfig::try_from(a),
            Err(ConfigError::EmptyCommand)
        ));
    }

    #[test]
    fn missing_or_empty_secret_names_the_file() {
        let d = tempfile::tempdir().unwrap();
        let a = ServeArgs {
            secret_file: d.path().join("nope"),
            ..args(d.path())
        };
        let e = ServeConfig::try_from(a).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");

        let empty = d.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        std::fs::set_permissions(&empty, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let a = ServeArgs {
            secret_file: empty,
            ..args(d.path())
        };
        let e = ServeConfig::try_from(a).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
    }
}
