//! vhost-mirror: a vhost-user-blk backend that serves a VM's disk from a raw image.

use std::process::ExitCode;

use clap::Parser;
use mirror_proto::control;
use mirror_proto::sys::error_chain as chain;
use vhost_mirror::args::{Cli, Command};
use vhost_mirror::config::ServeConfig;
use vhost_mirror::server;

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
