//! Validated configuration of `access-node serve`: the command line, merged with the
//! `--config` file, then checked.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::ArgMatches;
use mirror_proto::auth::{AuthError, Secret};
use mirror_proto::config_file::{self, ConfigFileError};
use mirror_proto::sys::{GroupError, SocketAccess};
use serde::Deserialize;
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
    #[error("--{0} is required (on the command line or in the --config file)")]
    Missing(&'static str),
    #[error(transparent)]
    File(#[from] ConfigFileError),
    #[error("with the options in {}", path.display())]
    WithFile {
        path: PathBuf,
        #[source]
        source: Box<ConfigError>,
    },
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
    #[error("--primary-timeout needs --on-primary-loss")]
    TimeoutWithoutCommand,
    #[error("--on-primary-loss needs a command")]
    EmptyCommand,
    #[error("--socket-group needs --control")]
    GroupWithoutControl,
    #[error("--socket-group")]
    SocketGroup(#[source] GroupError),
    #[error("--metrics {addr:?} is not an address like 127.0.0.1:9943")]
    Metrics {
        addr: String,
        #[source]
        source: std::net::AddrParseError,
    },
}

/// The `--config` file: every option of `serve` but `--config`, by its long name
/// (`systemd/example-replica.toml` lists them).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServeFile {
    pub image: Option<PathBuf>,
    pub listen: Option<String>,
    pub secret_file: Option<PathBuf>,
    pub control: Option<PathBuf>,
    pub socket_group: Option<String>,
    pub metrics: Option<String>,
    pub cache_mb: Option<u64>,
    pub discard_my_data: Option<bool>,
    pub on_primary_loss: Option<String>,
    pub primary_timeout: Option<u64>,
    pub witness: Option<String>,
}

/// Each option of `file` that the command line did not give (`on_command_line(id)`: clap's
/// id of the option, the field's name) replaces `a`'s value, a default or nothing.
pub fn merge(
    mut a: ServeArgs,
    file: ServeFile,
    on_command_line: impl Fn(&str) -> bool,
) -> ServeArgs {
    // Destructured: a new field of ServeFile that is not merged does not compile.
    let ServeFile {
        image,
        listen,
        secret_file,
        control,
        socket_group,
        metrics,
        cache_mb,
        discard_my_data,
        on_primary_loss,
        primary_timeout,
        witness,
    } = file;
    macro_rules! take {
        ($($field:ident),*) => {$(
            if let Some(v) = $field {
                if !on_command_line(stringify!($field)) {
                    a.$field = v.into();
                }
            }
        )*};
    }
    take!(
        image,
        listen,
        secret_file,
        control,
        socket_group,
        metrics,
        cache_mb,
        discard_my_data,
        on_primary_loss,
        primary_timeout,
        witness
    );
    a
}

/// `serve`'s configuration: the options of the command line (`a`, parsed from `m`), with,
/// under `--config FILE`, those of FILE that the command line left out; then validated.
pub fn load(a: ServeArgs, m: &ArgMatches) -> Result<ServeConfig, ConfigError> {
    let Some(path) = a.config.clone() else {
        return ServeConfig::try_from(a);
    };
    let file: ServeFile = config_file::load(&path)?;
    let a = merge(a, file, |id| {
        m.value_source(id) == Some(ValueSource::CommandLine)
    });
    ServeConfig::try_from(a).map_err(|e| ConfigError::WithFile {
        path,
        source: Box::new(e),
    })
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
    /// `--metrics ADDR`: where the Prometheus endpoint listens.
    pub metrics: Option<SocketAddr>,
}

impl TryFrom<ServeArgs> for ServeConfig {
    type Error = ConfigError;

    fn try_from(a: ServeArgs) -> Result<Self, Self::Error> {
        let image = a.image.ok_or(ConfigError::Missing("image"))?;
        let listen = a.listen.ok_or(ConfigError::Missing("listen"))?;
        let secret_file = a.secret_file.ok_or(ConfigError::Missing("secret-file"))?;
        let listen = listen
            .parse::<SocketAddr>()
            .map_err(|source| ConfigError::Listen {
                addr: listen.clone(),
                source,
            })?;
        let metrics = match a.metrics {
            Some(addr) => {
                Some(
                    addr.parse::<SocketAddr>()
                        .map_err(|source| ConfigError::Metrics {
                            addr: addr.clone(),
                            source,
                        })?,
                )
            }
            None => None,
        };
        if a.cache_mb > MAX_CACHE_MB {
            return Err(ConfigError::CacheSize(a.cache_mb));
        }
        if a.control.as_ref() == Some(&image) {
            return Err(ConfigError::SamePaths);
        }
        if a.socket_group.is_some() && a.control.is_none() {
            return Err(ConfigError::GroupWithoutControl);
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
            None if a.primary_timeout.is_some() => return Err(ConfigError::TimeoutWithoutCommand),
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
        let secret = Secret::load(&secret_file)?;
        let witness = a.witness.map(|addr| crate::replica::WitnessCfg {
            addr,
            secret: secret.clone(),
        });
        Ok(ServeConfig {
            image,
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
            metrics,
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
            config: None,
            image: Some(dir.join("a.img")),
            listen: Some("127.0.0.1:7800".into()),
            secret_file: Some(secret),
            control: None,
            socket_group: None,
            metrics: None,
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
            listen: Some("localhost".into()),
            ..args(d.path())
        };
        let e = ServeConfig::try_from(a).unwrap_err();
        assert!(e.to_string().contains("localhost"), "{e}");

        let a = ServeArgs {
            metrics: Some("[::1]:9943".into()),
            ..args(d.path())
        };
        let c = ServeConfig::try_from(a).unwrap();
        assert_eq!(c.metrics, Some("[::1]:9943".parse().unwrap()));
        let a = ServeArgs {
            metrics: Some("9943".into()),
            ..args(d.path())
        };
        let e = ServeConfig::try_from(a).unwrap_err();
        assert!(matches!(e, ConfigError::Metrics { .. }), "{e}");

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
            control: a.image.clone(),
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
            control: Some(d.path().join("ctl")),
            ..args(d.path())
        };
        assert_eq!(
            ServeConfig::try_from(a).unwrap().socket_access.group,
            Some(4242)
        );
        let a = ServeArgs {
            socket_group: Some("no-such-group-vhm".into()),
            control: Some(d.path().join("ctl")),
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
            secret_file: Some(d.path().join("nope")),
            ..args(d.path())
        };
        let e = ServeConfig::try_from(a).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");

        let empty = d.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        std::fs::set_permissions(&empty, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let a = ServeArgs {
            secret_file: Some(empty),
            ..args(d.path())
        };
        let e = ServeConfig::try_from(a).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
    }

    #[test]
    fn options_that_need_another() {
        let d = tempfile::tempdir().unwrap();
        let a = ServeArgs {
            socket_group: Some("4242".into()),
            ..args(d.path())
        };
        assert!(matches!(
            ServeConfig::try_from(a),
            Err(ConfigError::GroupWithoutControl)
        ));
        let a = ServeArgs {
            primary_timeout: Some(3),
            ..args(d.path())
        };
        assert!(matches!(
            ServeConfig::try_from(a),
            Err(ConfigError::TimeoutWithoutCommand)
        ));
        for (missing, a) in [
            (
                "image",
                ServeArgs {
                    image: None,
                    ..args(d.path())
                },
            ),
            (
                "listen",
                ServeArgs {
                    listen: None,
                    ..args(d.path())
                },
            ),
            (
                "secret-file",
                ServeArgs {
                    secret_file: None,
                    ..args(d.path())
                },
            ),
        ] {
            match ServeConfig::try_from(a) {
                Err(ConfigError::Missing(m)) => assert_eq!(m, missing),
                other => panic!("{missing}: {other:?}"),
            }
        }
    }

    /// `access-node serve ARGS...` parsed as main.rs does.
    fn parse(cli: &[&str]) -> (ServeArgs, ArgMatches) {
        use clap::{CommandFactory, FromArgMatches};
        let m = crate::args::Cli::command()
            .try_get_matches_from(["access-node", "serve"].iter().chain(cli))
            .unwrap();
        let sub = m.subcommand_matches("serve").unwrap().clone();
        (ServeArgs::from_arg_matches(&sub).unwrap(), sub)
    }

    fn on_cli(m: &ArgMatches) -> impl Fn(&str) -> bool + '_ {
        |id| m.value_source(id) == Some(ValueSource::CommandLine)
    }

    #[test]
    fn every_serve_option_is_a_file_key() {
        use clap::CommandFactory;
        let cmd = crate::args::Cli::command();
        let serve = cmd.find_subcommand("serve").unwrap();
        let mut n = 0;
        for arg in serve.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            let key = format!("{{\"{long}\": null}}");
            let parsed = serde_json::from_str::<ServeFile>(&key);
            if long == "config" || long == "help" {
                assert!(parsed.is_err(), "{long} must not be a file key");
            } else {
                assert!(
                    parsed.is_ok(),
                    "--{long} has no key in ServeFile: {parsed:?}"
                );
                n += 1;
            }
        }
        assert_eq!(n, 11);
    }

    #[test]
    fn command_line_beats_file_beats_defaults() {
        let file = ServeFile {
            image: Some("f.img".into()),
            listen: Some("0.0.0.0:7800".into()),
            control: Some("f.ctl".into()),
            cache_mb: Some(16),
            discard_my_data: Some(true),
            primary_timeout: Some(5),
            ..ServeFile::default()
        };
        // --cache-mb given with clap's default value still beats the file.
        let (a, m) = parse(&[
            "--listen",
            "127.0.0.1:7900",
            "--cache-mb",
            "64",
            "--socket-group",
            "kvm",
        ]);
        let a = merge(a, file, on_cli(&m));
        assert_eq!(a.image.as_deref(), Some("f.img".as_ref()));
        assert_eq!(a.listen.as_deref(), Some("127.0.0.1:7900"));
        assert_eq!(a.control.as_deref(), Some("f.ctl".as_ref()));
        assert_eq!(a.socket_group.as_deref(), Some("kvm"));
        assert_eq!((a.cache_mb, a.primary_timeout), (64, Some(5)));
        assert!(a.discard_my_data);
        assert_eq!(
            (a.secret_file, a.witness, a.on_primary_loss),
            (None, None, None)
        );
    }

    #[test]
    fn load_reads_the_file_and_names_it_in_errors() {
        let d = tempfile::tempdir().unwrap();
        let secret = args(d.path()).secret_file.unwrap();
        let write = |name: &str, text: &str| {
            let p = d.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let f = write(
            "ok.toml",
            &format!(
                "image = \"r.img\"\nlisten = \"127.0.0.1:7800\"\nsecret-file = \"{}\"\n\
                 on-primary-loss = \"true\"\nprimary-timeout = 4\ncache-mb = 0\n",
                secret.display()
            ),
        );
        let (a, m) = parse(&["--config", f.to_str().unwrap(), "--cache-mb", "8"]);
        let c = load(a, &m).unwrap();
        assert_eq!(c.image, PathBuf::from("r.img"));
        assert_eq!(c.cache_bytes, 8 << 20);
        assert_eq!(c.primary_loss.unwrap().timeout, Duration::from_secs(4));

        let bad = [
            ("unknown.toml", "imgae = \"a\"\n", "imgae"),
            ("value.toml", "cache-mb = -1\n", "cache-mb"),
            ("notoml.toml", "[[[\n", "notoml.toml"),
            // Valid TOML, refused by the validation: the message names the file too.
            ("listen.toml", "listen = \"localhost\"\n", "--listen"),
        ];
        for (name, text, needle) in bad {
            let p = write(name, text);
            let (a, m) = parse(&[
                "--config",
                p.to_str().unwrap(),
                "--image",
                "i",
                "--secret-file",
                secret.to_str().unwrap(),
            ]);
            let e = load(a, &m).unwrap_err();
            let msg = mirror_proto::sys::error_chain(&e);
            assert!(msg.contains(name) && msg.contains(needle), "{msg}");
        }
    }

    #[test]
    fn the_example_file_names_every_key() {
        // Every key, commented out or not, once uncommented.
        let text: String = include_str!("../../systemd/example-replica.toml")
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest) if rest.contains(" = ") && !rest.starts_with(' ') => rest,
                _ => l,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("example.toml");
        std::fs::write(&p, text).unwrap();
        let file: ServeFile = config_file::load(&p).unwrap();
        let all = format!("{file:?}");
        assert!(!all.contains("None"), "a key is missing: {all}");
        assert_eq!(all.matches("Some(").count(), 11, "{all}");
    }
}
