//! Validated configuration of `vhost-mirror serve`.

use std::path::PathBuf;

use mirror_proto::auth::{AuthError, Secret};
use mirror_proto::sys::{GroupError, SocketAccess};
use thiserror::Error;

use crate::args::ServeArgs;
use crate::replication::{MirrorConfig, PeerAddr, PeerLoss};

/// Most queues we accept (vhost-user-backend maps queues to threads with a u64 mask).
pub const MAX_QUEUES: u16 = 64;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("--peer needs --secret-file (the link is always authenticated)")]
    PeerWithoutSecret,
    #[error(
        "--secret-file, --on-peer-loss, --resync-rate, --witness and --fence-peer need --peer"
    )]
    SecretWithoutPeer,
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
}

impl TryFrom<ServeArgs> for ServeConfig {
    type Error = ConfigError;

    fn try_from(a: ServeArgs) -> Result<Self, Self::Error> {
        if a.num_queues == 0 || a.num_queues > MAX_QUEUES {
            return Err(ConfigError::NumQueues(a.num_queues));
        }
        if a.queue_size < 2 || !a.queue_size.is_power_of_two() {
            return Err(ConfigError::QueueSize(a.queue_size));
        }
        if a.control.as_ref() == Some(&a.socket) {
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
        let mirror = match (a.peer, a.secret_file) {
            (Some(peer), Some(secret)) => {
                if a.readonly {
                    return Err(ConfigError::ReadonlyPeer);
                }
                if a.resync_rate == Some(0) || a.resync_min_rate == 0 {
                    return Err(ConfigError::ResyncRate);
                }
                Some(MirrorConfig {
                    image: a.image.clone(),
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
                    && std::fs::symlink_metadata(mirror_proto::meta::meta_path(&a.image)).is_ok();
                paired.then(|| MirrorConfig {
                    image: a.image.clone(),
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
            image: a.image,
            socket: a.socket,
            num_queues: a.num_queues,
            queue_size: a.queue_size,
            readonly: a.readonly,
            control: a.control,
            socket_access,
            mirror,
            poll: std::time::Duration::from_micros(a.poll_us),
            poll_inflight: std::time::Duration::from_micros(a.poll_inflight_us),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> ServeArgs {
        ServeArgs {
            image: "a.img".into(),
            socket: "s.sock".into(),
            num_queues: 1,
            queue_size: 256,
            readonly: false,
            poll_us: 32,
            poll_inflight_us: 100,
            control: None,
            socket_group: None,
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
            image: img.clone(),
            ..args()
        })
        .unwrap();
        assert!(c.mirror.unwrap().peer.is_none());
        let c = ServeConfig::try_from(ServeArgs {
            image: img,
            readonly: true,
            ..args()
        })
        .unwrap();
        assert!(c.mirror.is_none());
    }
}
