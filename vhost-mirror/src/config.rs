//! Validated configuration of `vhost-mirror serve`: the command line, merged with the
//! `--config` file, then checked.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::ArgMatches;
use mirror_proto::auth::{AuthError, Secret};
use mirror_proto::config_file::{self, ConfigFileError};
use mirror_proto::sys::{GroupError, SocketAccess};
use serde::Deserialize;
use thiserror::Error;

use crate::args::ServeArgs;
use crate::replication::{MirrorConfig, PeerAddr, PeerLoss};

/// Most queues we accept (vhost-user-backend maps queues to threads with a u64 mask).
pub const MAX_QUEUES: u16 = 64;

/// Queues offered unless `--num-queues` says otherwise. QEMU's vhost-user-blk-pci without
/// `num-queues=` asks one queue per vCPU (up to 1024) and refuses to start when the backend
/// offers fewer ("The maximum number of queues supported by the backend is N"): the default
/// must cover the VMs people start without thinking about it. 16 does for VMs of up to 16
/// vCPUs; larger ones set `--num-queues` (up to [`MAX_QUEUES`]) or QEMU's `num-queues=`.
/// A fixed number rather than one taken from this host's CPUs: a VM must start on either node
/// of a pair, whatever each has, and a guest may have more vCPUs than its host has CPUs. An
/// offered queue the frontend never enables costs an idle thread (per connection) and a few
/// hundred bytes; its buffers and its eventfd are made only when it is enabled (`device.rs`).
pub const DEFAULT_NUM_QUEUES: u16 = 16;

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
    #[error("--peer needs --secret-file (the link is always authenticated)")]
    PeerWithoutSecret,
    #[error(
        "--secret-file, --on-peer-loss, --resync-rate, --witness and --fence-peer need --peer"
    )]
    SecretWithoutPeer,
    #[error("--witness and --fence-peer cannot be combined")]
    WitnessAndFencePeer,
    #[error("--readonly cannot be combined with --peer")]
    ReadonlyPeer,
    #[error("--resync-rate and --resync-min-rate must be at least 1 MiB/s")]
    ResyncRate,
    #[error("--poll-us must be at most 1000, got {0}")]
    PollUs(u64),
    #[error("--poll-inflight-us must be at most 10000, got {0}")]
    PollInflightUs(u64),
    #[error(transparent)]
    Secret(#[from] AuthError),
    #[error("--num-queues must be between 1 and {MAX_QUEUES}, got {0}")]
    NumQueues(u16),
    #[error("--queue-size must be a power of two between 2 and 32768, got {0}")]
    QueueSize(u16),
    #[error("--socket and --control must be different paths")]
    SamePaths,
    #[error("--socket-group")]
    SocketGroup(#[source] GroupError),
    #[error("--metrics {addr:?} is not an address like 127.0.0.1:9942")]
    Metrics {
        addr: String,
        #[source]
        source: std::net::AddrParseError,
    },
}

/// The `--config` file: every option of `serve` but `--config`, by its long name
/// (`systemd/example-primary.toml` lists them).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServeFile {
    pub image: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub num_queues: Option<u16>,
    pub queue_size: Option<u16>,
    pub readonly: Option<bool>,
    pub poll_us: Option<u64>,
    pub poll_inflight_us: Option<u64>,
    pub control: Option<PathBuf>,
    pub socket_group: Option<String>,
    pub metrics: Option<String>,
    pub peer: Option<String>,
    pub secret_file: Option<PathBuf>,
    pub on_peer_loss: Option<PeerLoss>,
    pub resync_rate: Option<u64>,
    pub resync_min_rate: Option<u64>,
    pub witness: Option<String>,
    pub fence_peer: Option<String>,
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
        socket,
        num_queues,
        queue_size,
        readonly,
        poll_us,
        poll_inflight_us,
        control,
        socket_group,
        metrics,
        peer,
        secret_file,
        on_peer_loss,
        resync_rate,
        resync_min_rate,
        witness,
        fence_peer,
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
        socket,
        num_queues,
        queue_size,
        readonly,
        poll_us,
        poll_inflight_us,
        control,
        socket_group,
        metrics,
        peer,
        secret_file,
        on_peer_loss,
        resync_rate,
        resync_min_rate,
        witness,
        fence_peer
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

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub image: PathBuf,
    pub socket: PathBuf,
    pub num_queues: u16,
    pub queue_size: u16,
    pub readonly: bool,
    pub control: Option<PathBuf>,
    /// Who may use the vhost-user and control sockets besides root and us.
    pub socket_access: SocketAccess,
    pub mirror: Option<MirrorConfig>,
    pub poll: std::time::Duration,
    pub poll_inflight: std::time::Duration,
    /// `--metrics ADDR`: where the Prometheus endpoint listens.
    pub metrics: Option<SocketAddr>,
}

impl TryFrom<ServeArgs> for ServeConfig {
    type Error = ConfigError;

    fn try_from(a: ServeArgs) -> Result<Self, Self::Error> {
        let image = a.image.ok_or(ConfigError::Missing("image"))?;
        let socket = a.socket.ok_or(ConfigError::Missing("socket"))?;
        if a.witness.is_some() && a.fence_peer.is_some() {
            return Err(ConfigError::WitnessAndFencePeer);
        }
        if a.num_queues == 0 || a.num_queues > MAX_QUEUES {
            return Err(ConfigError::NumQueues(a.num_queues));
        }
        if a.queue_size < 2 || !a.queue_size.is_power_of_two() {
            return Err(ConfigError::QueueSize(a.queue_size));
        }
        if a.control.as_ref() == Some(&socket) {
            return Err(ConfigError::SamePaths);
        }
        if a.poll_us > 1000 {
            return Err(ConfigError::PollUs(a.poll_us));
        }
        if a.poll_inflight_us > 10_000 {
            return Err(ConfigError::PollInflightUs(a.poll_inflight_us));
        }
        let socket_access = SocketAccess {
            group: match &a.socket_group {
                Some(g) => {
                    Some(mirror_proto::sys::resolve_group(g).map_err(ConfigError::SocketGroup)?)
                }
                None => None,
            },
        };
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
        let mirror = match (a.peer, a.secret_file) {
            (Some(peer), Some(secret)) => {
                if a.readonly {
                    return Err(ConfigError::ReadonlyPeer);
                }
                if a.resync_rate == Some(0) || a.resync_min_rate == 0 {
                    return Err(ConfigError::ResyncRate);
                }
                Some(MirrorConfig {
                    image: image.clone(),
                    peer: Some(PeerAddr {
                        addr: peer,
                        secret: Secret::load(&secret)?,
                    }),
                    on_peer_loss: a.on_peer_loss,
                    resync_rate: a.resync_rate.map(|r| r << 20),
                    resync_min_rate: a.resync_min_rate << 20,
                    witness: a.witness.clone(),
                    fence_peer: a.fence_peer.clone(),
                })
            }
            (Some(_), None) => return Err(ConfigError::PeerWithoutSecret),
            (None, Some(_)) => return Err(ConfigError::SecretWithoutPeer),
            (None, None) => {
                if a.resync_rate.is_some()
                    || a.on_peer_loss != PeerLoss::Degrade
                    || a.witness.is_some()
                    || a.fence_peer.is_some()
                {
                    return Err(ConfigError::SecretWithoutPeer);
                }
                // The image of a mirrored pair (it has replication metadata) served alone:
                // its writes are recorded out of sync, for the peer's return. (A symbolic link
                // there counts too: loading it is refused, rather than serving unrecorded.)
                let paired = !a.readonly
                    && std::fs::symlink_metadata(mirror_proto::meta::meta_path(&image)).is_ok();
                paired.then(|| MirrorConfig {
                    image: image.clone(),
                    peer: None,
                    on_peer_loss: PeerLoss::Degrade,
                    resync_rate: None,
                    resync_min_rate: crate::replication::DEFAULT_RESYNC_MIN_RATE,
                    witness: None,
                    fence_peer: None,
                })
            }
        };
        Ok(ServeConfig {
            image,
            socket,
            num_queues: a.num_queues,
            queue_size: a.queue_size,
            readonly: a.readonly,
            control: a.control,
            socket_access,
            mirror,
            poll: std::time::Duration::from_micros(a.poll_us),
            poll_inflight: std::time::Duration::from_micros(a.poll_inflight_us),
            metrics,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> ServeArgs {
        ServeArgs {
            config: None,
            image: Some("a.img".into()),
            socket: Some("s.sock".into()),
            num_queues: 1,
            queue_size: 256,
            readonly: false,
            poll_us: 32,
            poll_inflight_us: 100,
            control: None,
            socket_group: None,
            metrics: None,
            peer: None,
            secret_file: None,
            on_peer_loss: PeerLoss::Degrade,
            resync_rate: None,
            resync_min_rate: 2,
            witness: None,
            fence_peer: None,
        }
    }

    #[test]
    fn validates() {
        assert!(ServeConfig::try_from(args()).is_ok());
        let err = |a| ServeConfig::try_from(a).unwrap_err();
        assert!(matches!(
            err(ServeArgs {
                num_queues: 0,
                ..args()
            }),
            ConfigError::NumQueues(0)
        ));
        assert!(matches!(
            err(ServeArgs {
                num_queues: 65,
                ..args()
            }),
            ConfigError::NumQueues(65)
        ));
        assert!(matches!(
            err(ServeArgs {
                queue_size: 100,
                ..args()
            }),
            ConfigError::QueueSize(100)
        ));
        assert!(matches!(
            err(ServeArgs {
                control: Some("s.sock".into()),
                ..args()
            }),
            ConfigError::SamePaths
        ));
    }

    #[test]
    fn metrics_address() {
        assert_eq!(ServeConfig::try_from(args()).unwrap().metrics, None);
        let c = ServeConfig::try_from(ServeArgs {
            metrics: Some("127.0.0.1:9942".into()),
            ..args()
        })
        .unwrap();
        assert_eq!(c.metrics, Some("127.0.0.1:9942".parse().unwrap()));
        let e = ServeConfig::try_from(ServeArgs {
            metrics: Some("localhost:9942".into()),
            ..args()
        })
        .unwrap_err();
        assert!(matches!(e, ConfigError::Metrics { .. }), "{e}");
        assert!(e.to_string().contains("localhost:9942"), "{e}");
    }

    #[test]
    fn socket_group() {
        let c = ServeConfig::try_from(args()).unwrap();
        assert_eq!(c.socket_access, SocketAccess { group: None });
        let c = ServeConfig::try_from(ServeArgs {
            socket_group: Some("4242".into()),
            ..args()
        })
        .unwrap();
        assert_eq!(c.socket_access.group, Some(4242));
        let c = ServeConfig::try_from(ServeArgs {
            socket_group: Some("root".into()),
            ..args()
        })
        .unwrap();
        assert_eq!(c.socket_access.group, Some(0));
        let e = ServeConfig::try_from(ServeArgs {
            socket_group: Some("no-such-group-vhm".into()),
            ..args()
        })
        .unwrap_err();
        assert!(
            mirror_proto::sys::error_chain(&e).contains("no-such-group-vhm"),
            "{e}"
        );
    }

    #[test]
    fn replication_flags() {
        let err = |a| ServeConfig::try_from(a).unwrap_err();
        assert!(matches!(
            err(ServeArgs {
                peer: Some("127.0.0.1:1".into()),
                ..args()
            }),
            ConfigError::PeerWithoutSecret
        ));
        assert!(matches!(
            err(ServeArgs {
                secret_file: Some("s".into()),
                ..args()
            }),
            ConfigError::SecretWithoutPeer
        ));
        let e = err(ServeArgs {
            peer: Some("127.0.0.1:1".into()),
            secret_file: Some("/nonexistent/secret".into()),
            ..args()
        });
        assert!(format!("{e}: {:?}", e).contains("/nonexistent/secret"));
        let d = tempfile::tempdir().unwrap();
        let s = d.path().join("secret");
        std::fs::write(&s, "0123456789abcdef\n").unwrap();
        std::fs::set_permissions(&s, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let c = ServeConfig::try_from(ServeArgs {
            peer: Some("127.0.0.1:1".into()),
            secret_file: Some(s),
            resync_rate: Some(10),
            ..args()
        })
        .unwrap();
        assert_eq!(c.mirror.unwrap().resync_rate, Some(10 << 20));
        // The image of a pair, served alone, keeps its bookkeeping (standalone).
        let img = d.path().join("paired.img");
        std::fs::write(mirror_proto::meta::meta_path(&img), "{}").unwrap();
        let c = ServeConfig::try_from(ServeArgs {
            image: Some(img.clone()),
            ..args()
        })
        .unwrap();
        assert!(c.mirror.unwrap().peer.is_none());
        let c = ServeConfig::try_from(ServeArgs {
            image: Some(img),
            readonly: true,
            ..args()
        })
        .unwrap();
        assert!(c.mirror.is_none());
    }

    /// `vhost-mirror serve ARGS...` parsed as main.rs does.
    fn parse(cli: &[&str]) -> (ServeArgs, ArgMatches) {
        use clap::{CommandFactory, FromArgMatches};
        let m = crate::args::Cli::command()
            .try_get_matches_from(["vhost-mirror", "serve"].iter().chain(cli))
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
        assert_eq!(n, 17);
    }

    #[test]
    fn command_line_beats_file_beats_defaults() {
        let file = ServeFile {
            image: Some("f.img".into()),
            socket: Some("f.sock".into()),
            num_queues: Some(4),
            queue_size: Some(128),
            poll_us: Some(5),
            readonly: Some(true),
            socket_group: Some("kvm".into()),
            ..ServeFile::default()
        };
        // --poll-us given with clap's default value still beats the file.
        let (a, m) = parse(&["--socket", "c.sock", "--num-queues", "2", "--poll-us", "32"]);
        let a = merge(a, file, on_cli(&m));
        assert_eq!(a.image.as_deref(), Some("f.img".as_ref()));
        assert_eq!(a.socket.as_deref(), Some("c.sock".as_ref()));
        assert_eq!((a.num_queues, a.queue_size, a.poll_us), (2, 128, 32));
        assert!(a.readonly);
        assert_eq!(a.socket_group.as_deref(), Some("kvm"));
        // Neither gave these: clap's defaults.
        assert_eq!((a.poll_inflight_us, a.resync_min_rate), (100, 2));
        let (d, _) = parse(&[]);
        assert_eq!(d.num_queues, DEFAULT_NUM_QUEUES);
        assert_eq!(DEFAULT_NUM_QUEUES, 16);
        assert_eq!(a.on_peer_loss, PeerLoss::Degrade);
        assert_eq!(a.control, None);

        // A flag that is on the command line keeps its value; readonly = false in the file
        // does not undo --readonly.
        let (a, m) = parse(&["--readonly"]);
        let a = merge(
            a,
            ServeFile {
                readonly: Some(false),
                on_peer_loss: Some(PeerLoss::Suspend),
                ..ServeFile::default()
            },
            on_cli(&m),
        );
        assert!(a.readonly);
        assert_eq!(a.on_peer_loss, PeerLoss::Suspend);
    }

    #[test]
    fn required_options_from_either_place() {
        let (a, _) = parse(&[]);
        assert!(matches!(
            ServeConfig::try_from(a),
            Err(ConfigError::Missing("image"))
        ));
        let (a, m) = parse(&["--socket", "c.sock"]);
        let a = merge(
            a,
            ServeFile {
                image: Some("f.img".into()),
                ..ServeFile::default()
            },
            on_cli(&m),
        );
        let c = ServeConfig::try_from(a).unwrap();
        assert_eq!(c.image, PathBuf::from("f.img"));
        assert_eq!(c.socket, PathBuf::from("c.sock"));
    }

    #[test]
    fn load_reads_the_file_and_names_it_in_errors() {
        let d = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let p = d.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let f = write(
            "ok.toml",
            "image = \"f.img\"\nsocket = \"f.sock\"\nqueue-size = 64\non-peer-loss = \"degrade\"\n",
        );
        let f = f.to_str().unwrap();
        let (a, m) = parse(&["--config", f, "--queue-size", "32"]);
        let c = load(a, &m).unwrap();
        assert_eq!(c.image, PathBuf::from("f.img"));
        assert_eq!(c.queue_size, 32);

        let bad = [
            ("unknown.toml", "image = \"a\"\nsokcet = \"b\"\n", "sokcet"),
            ("value.toml", "on-peer-loss = \"panic\"\n", "panic"),
            ("notoml.toml", "<xml/>\n", "notoml.toml"),
            // Valid TOML, refused by the validation: the message names the file too.
            (
                "zero.toml",
                "image = \"a\"\nsocket = \"b\"\nnum-queues = 0\n",
                "--num-queues",
            ),
            (
                "both.toml",
                "image = \"a\"\nsocket = \"b\"\nwitness = \"w:1\"\n",
                "--fence-peer",
            ),
        ];
        for (name, text, needle) in bad {
            let p = write(name, text);
            let (a, m) = parse(&["--config", p.to_str().unwrap(), "--fence-peer", "true"]);
            let e = load(a, &m).unwrap_err();
            let msg = mirror_proto::sys::error_chain(&e);
            assert!(msg.contains(name) && msg.contains(needle), "{msg}");
        }
        let (a, m) = parse(&["--config", "/nonexistent/vm.toml"]);
        let e = load(a, &m).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/vm.toml"), "{e}");
    }

    #[test]
    fn the_example_file_names_every_key() {
        // Every key, commented out or not, once uncommented.
        let text: String = include_str!("../../systemd/example-primary.toml")
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
        assert_eq!(all.matches("Some(").count(), 17, "{all}");
    }
}
