//! Validated configuration of `vhost-mirror serve`.

use std::path::PathBuf;

use thiserror::Error;

use crate::args::ServeArgs;

/// Most queues we accept (vhost-user-backend maps queues to threads with a u64 mask).
pub const MAX_QUEUES: u16 = 64;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--num-queues must be between 1 and {MAX_QUEUES}, got {0}")]
    NumQueues(u16),
    #[error("--queue-size must be a power of two between 2 and 32768, got {0}")]
    QueueSize(u16),
    #[error("--socket and --control must be different paths")]
    SamePaths,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeConfig {
    pub image: PathBuf,
    pub socket: PathBuf,
    pub num_queues: u16,
    pub queue_size: u16,
    pub readonly: bool,
    pub control: Option<PathBuf>,
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
        Ok(ServeConfig {
            image: a.image,
            socket: a.socket,
            num_queues: a.num_queues,
            queue_size: a.queue_size,
            readonly: a.readonly,
            control: a.control,
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
            control: None,
        }
    }

    #[test]
    fn validates() {
        assert!(ServeConfig::try_from(args()).is_ok());
        let a = ServeArgs {
            num_queues: 0,
            ..args()
        };
        assert_eq!(ServeConfig::try_from(a), Err(ConfigError::NumQueues(0)));
        let a = ServeArgs {
            num_queues: 65,
            ..args()
        };
        assert_eq!(ServeConfig::try_from(a), Err(ConfigError::NumQueues(65)));
        let a = ServeArgs {
            queue_size: 100,
            ..args()
        };
        assert_eq!(ServeConfig::try_from(a), Err(ConfigError::QueueSize(100)));
        let a = ServeArgs {
            control: Some("s.sock".into()),
            ..args()
        };
        assert_eq!(ServeConfig::try_from(a), Err(ConfigError::SamePaths));
    }
}
