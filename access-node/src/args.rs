//! Command-line arguments (clap derive), turned into a validated configuration in `config.rs`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "access-node",
    version,
    about = "Replica server of vhost-mirror: keeps a standby copy of a VM disk"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Keep a replica of a primary's disk in IMG, fed over TCP by `vhost-mirror`.
    Serve(ServeArgs),
    /// Print the status of a running `serve` (through its --control socket).
    Status(StatusArgs),
    // `Promote` (make this replica the primary after a failover) comes here.
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Replica image (raw). Created sparse at the primary's size if it does not exist.
    #[arg(long, value_name = "IMG")]
    pub image: PathBuf,
    /// TCP address the primary connects to, e.g. 127.0.0.1:7800 (port 0: any free port).
    #[arg(long, value_name = "ADDR")]
    pub listen: String,
    /// File holding the secret shared with the primary (trailing whitespace is ignored).
    #[arg(long, value_name = "F")]
    pub secret_file: PathBuf,
    /// Unix socket for `access-node status`.
    #[arg(long, value_name = "CTL")]
    pub control: Option<PathBuf>,
    /// Read cache size in MiB (0 disables the cache).
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub cache_mb: u64,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The --control socket of a running `access-node serve`.
    #[arg(long, value_name = "CTL")]
    pub control: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_requires_secret_file_and_defaults_cache() {
        let c = Cli::try_parse_from([
            "access-node",
            "serve",
            "--image",
            "a.img",
            "--listen",
            "127.0.0.1:7800",
            "--secret-file",
            "s",
        ])
        .unwrap();
        match c.command {
            Command::Serve(a) => {
                assert_eq!(a.cache_mb, 64);
                assert_eq!(a.control, None);
            }
            c => panic!("{c:?}"),
        }
        let e = Cli::try_parse_from([
            "access-node",
            "serve",
            "--image",
            "a.img",
            "--listen",
            "127.0.0.1:7800",
        ])
        .unwrap_err();
        assert!(e.to_string().contains("--secret-file"), "{e}");
    }

    #[test]
    fn status_takes_control_and_json() {
        let c = Cli::try_parse_from(["access-node", "status", "--control", "c", "--json"]).unwrap();
        assert!(matches!(
            c.command,
            Command::Status(StatusArgs { json: true, .. })
        ));
    }
}
