//! vhost-mirror: a vhost-user-blk backend that serves a VM's disk from a raw image.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use mirror_proto::control;
use mirror_proto::sys::error_chain as chain;
use std::time::Duration;

use vhost_mirror::args::{Cli, Command, VerifyArgs};
use vhost_mirror::config;
use vhost_mirror::server;

/// `vhost-mirror verify`: 0 identical, 1 differences found, 2 could not run.
fn verify(a: &VerifyArgs) -> ExitCode {
    let mut cmd = format!("verify offset={} length={}", a.offset, a.length);
    if let Some(r) = a.rate {
        cmd.push_str(&format!(" rate_mib={r}"));
    }
    if a.repair {
        cmd.push_str(" repair=1");
    }
    // A verify of a large device at a low rate takes long; the server answers when it ends.
    match control::request_timeout(&a.control, &cmd, Duration::from_secs(30 * 24 * 3600)) {
        Ok(v) => {
            let differences = v["differences"].as_u64().unwrap_or(0);
            if a.json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                println!(
                    "compared {} bytes at offset {} in {:.1} s ({:.0} MiB/s): {}",
                    v["bytes_compared"],
                    v["offset"],
                    v["secs"].as_f64().unwrap_or(0.0),
                    v["mib_per_sec"].as_f64().unwrap_or(0.0),
                    if differences == 0 {
                        "identical".to_owned()
                    } else {
                        format!(
                            "{} bytes in {differences} ranges differ (marked out of sync, {})",
                            v["different_bytes"],
                            if v["repaired"] == true {
                                "resynced"
                            } else {
                                "the resync copies them"
                            }
                        )
                    }
                );
                if let Some(r) = v["ranges"].as_array() {
                    for x in r {
                        println!("  differs: offset {} length {}", x[0], x[1]);
                    }
                }
            }
            if differences == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("vhost-mirror: verify could not run: {}", chain(&e));
            ExitCode::from(2)
        }
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    // The matches too: `serve --config` asks them which options the command line gave.
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let result: Result<(), Box<dyn std::error::Error>> = match cli.command {
        Command::Verify(a) => return verify(&a),
        Command::Serve(a) => matches
            .subcommand_matches("serve")
            .ok_or_else(|| "no serve options".into())
            .and_then(|m| config::load(a, m).map_err(Into::into))
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
