//! access-node: the replica server of vhost-mirror. Keeps a standby copy of a VM disk, fed
//! synchronously over TCP by the primary's `vhost-mirror`.

mod cache;
mod config;
mod flusher;
mod hasher;
mod metrics;
mod preauth;
mod promote;
mod replica;
mod server;
mod session;
mod status;
mod watchdog;
mod witness;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use mirror_proto::control;

// The command line is in the library (lib.rs), for the packaging crate's man pages and
// completions; the modules here name it `crate::args`.
use access_node::args;
use args::{Cli, Command};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    // The matches too: `serve --config` asks them which options the command line gave.
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let result: Result<(), Box<dyn std::error::Error>> = match cli.command {
        Command::Serve(a) => matches
            .subcommand_matches("serve")
            .ok_or_else(|| "no serve options".into())
            .and_then(|m| config::load(a, m).map_err(Into::into))
            .and_then(|c| server::run(c).map_err(Into::into)),
        Command::Status(a) => control::print_status(&a.control, a.json).map_err(Into::into),
        Command::Promote(a) => promote::run(a)
            .map(|line| println!("{line}"))
            .map_err(Into::into),
        Command::Witness(a) => witness::run(a).map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("access-node: error: {}", chain(&*e));
            ExitCode::FAILURE
        }
    }
}

pub use mirror_proto::sys::error_chain as chain;
