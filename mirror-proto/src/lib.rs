//! Shared by `vhost-mirror` and `access-node`: the replication wire protocol (a pure codec),
//! authentication, generation comparison, the out-of-sync bitmap, the metadata files, the
//! `--config` file, the service manager's notifications and the Prometheus metrics endpoint.

pub mod activity_log;
pub mod auth;
pub mod bitmap;
pub mod bitmap_file;
pub mod blockhash;
pub mod config_file;
pub mod conn;
pub mod control;
pub mod files;
pub mod frame;
pub mod generation;
pub mod meta;
pub mod metrics;
pub mod notify;
pub mod secure;
pub mod sys;
pub mod witness;
