//! vhost-mirror: a vhost-user-blk backend that serves a VM's disk from a raw image.

mod args;
mod blk_config;
mod config;
mod device;
mod disk;
mod executor;
mod flusher;
mod frontend;
mod replication;
mod request;
mod server;
mod stats;

use std::process::ExitCode;

use clap::Parser;
use mirror_proto::control;

use crate::args::{Cli, Command};
use crate::config::ServeConfig;
use mirror_proto::sys::error_chain as chain;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result: Result<(), Box<dyn std::error::Error>> = match cli.command {
        Command::Serve(a) => ServeConfig::try_from(a)
            .map_err(Into::into)
            .and_then(|c| server::run(c).map_err(Into::into)),
        Command::Status(a) => control::print_status(&a.control, a.json).map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost-mirror: error: {}", chain(&*e));
            ExitCode::FAILURE
        }
    }
}
