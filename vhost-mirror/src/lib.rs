//! vhost-mirror as a library: the modules of the `vhost-mirror` binary (`main.rs` only parses
//! the command line and dispatches). The library exists so that the request parser can be
//! driven in-process by the fuzz targets (`fuzz/`); nothing here is a stable API.

pub mod args;
pub mod blk_config;
mod completion;
pub mod config;
mod device;
mod disk;
mod executor;
mod flusher;
mod frontend;
mod inflight_shm;
mod metrics;
mod replication;
pub mod request;
pub mod server;
mod stats;
