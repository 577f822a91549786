//! Command-line arguments (clap derive), turned into a validated configuration in `config.rs`.

use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand};

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
    /// Make this replica the primary after a failover: fence the old primary, start a new
    /// generation, and release the image for `vhost-mirror` to serve.
    Promote(PromoteArgs),
    /// Run the quorum witness: a third party, with no image, that records which side of a
    /// broken pair may go on (a primary outdating its replica, or a replica being promoted;
    /// never both). Used by `serve --witness` and `vhost-mirror serve --witness`.
    Witness(WitnessArgs),
}

#[derive(Debug, Args)]
pub struct WitnessArgs {
    /// TCP address both nodes reach, e.g. 192.0.2.3:7900.
    #[arg(long, value_name = "ADDR")]
    pub listen: String,
    /// File holding the secret shared with both nodes.
    #[arg(long, value_name = "F")]
    pub secret_file: PathBuf,
    /// Directory for the witness's decisions (`witness.json`); it must exist.
    #[arg(long, value_name = "DIR")]
    pub state_dir: PathBuf,
    /// Unix socket for `access-node status`.
    #[arg(long, value_name = "CTL")]
    pub control: Option<PathBuf>,
    /// Let members of GROUP use CTL too (mode 0660).
    #[arg(long, value_name = "GROUP", requires = "control")]
    pub socket_group: Option<String>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Read the options from this TOML file too: one key per option, by its long name
    /// (`listen = "0.0.0.0:7800"`, `cache-mb = 256`). Options given here override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Replica image (raw). Created sparse at the primary's size if it does not exist
    /// (required, here or in FILE).
    #[arg(long, value_name = "IMG")]
    pub image: Option<PathBuf>,
    /// TCP address the primary connects to, e.g. 127.0.0.1:7800 (port 0: any free port;
    /// required, here or in FILE).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// File holding the secret shared with the primary (trailing whitespace is ignored;
    /// required, here or in FILE).
    #[arg(long, value_name = "F")]
    pub secret_file: Option<PathBuf>,
    /// Unix socket for `access-node status` and `access-node promote`.
    #[arg(long, value_name = "CTL")]
    pub control: Option<PathBuf>,
    /// Let members of GROUP (a name or a number) use CTL too: the socket becomes mode 0660,
    /// owned by GROUP. Without it, 0600: only root and this user. Needs --control.
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9943). Anyone who
    /// reaches ADDR can read them (no authentication): keep it on loopback or a management
    /// network.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Read cache size in MiB (0 disables the cache).
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub cache_mb: u64,
    /// Split-brain resolution: this node's own changes may be overwritten by the primary
    /// (a full sync). Applies until one resync finishes.
    #[arg(long)]
    pub discard_my_data: bool,
    /// Run CMD (with `sh -c`) once when an attached primary has been silent for
    /// --primary-timeout seconds. Env: ACCESS_NODE_IMAGE, ACCESS_NODE_CONTROL,
    /// ACCESS_NODE_LAST_PRIMARY.
    #[arg(long, value_name = "CMD")]
    pub on_primary_loss: Option<String>,
    /// Seconds without a frame from the primary before --on-primary-loss runs (needs it)
    /// [default: 10].
    #[arg(long, value_name = "SECS")]
    pub primary_timeout: Option<u64>,
    /// The quorum witness (`access-node witness`, started with the same secret): a promotion
    /// needs its consent, which it gives only to a replica no primary recorded outdated.
    #[arg(long, value_name = "ADDR")]
    pub witness: Option<String>,
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

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("target").required(true).args(["control", "image"])))]
pub struct PromoteArgs {
    /// The --control socket of the running `access-node serve` of the replica.
    #[arg(long, value_name = "CTL")]
    pub control: Option<PathBuf>,
    /// The replica image, when no access node serves it.
    #[arg(long, value_name = "IMG")]
    pub image: Option<PathBuf>,
    /// Promote even a replica whose data is not up to date (e.g. initial sync unfinished),
    /// or one the witness refuses.
    #[arg(long)]
    pub force: bool,
    /// With --image: the quorum witness whose consent the promotion needs (with
    /// --secret-file, the pair's secret). (With --control, the server's own --witness.)
    #[arg(long, value_name = "ADDR", requires_all = ["image", "secret_file"])]
    pub witness: Option<String>,
    /// The pair's secret, for --witness.
    #[arg(long, value_name = "F", requires = "witness")]
    pub secret_file: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_defaults_cache() {
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
                assert_eq!(a.socket_group, None);
                assert!(!a.discard_my_data);
                assert_eq!((a.on_primary_loss, a.primary_timeout), (None, None));
            }
            c => panic!("{c:?}"),
        }
    }

    #[test]
    fn status_takes_control_and_json() {
        let c = Cli::try_parse_from(["access-node", "status", "--control", "c", "--json"]).unwrap();
        assert!(matches!(
            c.command,
            Command::Status(StatusArgs { json: true, .. })
        ));
    }

    #[test]
    fn primary_loss_options() {
        let c = Cli::try_parse_from([
            "access-node",
            "serve",
            "--on-primary-loss",
            "touch x",
            "--primary-timeout",
            "3",
            "--discard-my-data",
        ])
        .unwrap();
        match c.command {
            Command::Serve(a) => {
                assert_eq!(a.on_primary_loss.as_deref(), Some("touch x"));
                assert_eq!(a.primary_timeout, Some(3));
                assert!(a.discard_my_data);
            }
            c => panic!("{c:?}"),
        }
    }

    #[test]
    fn promote_takes_exactly_one_of_control_and_image() {
        let c = Cli::try_parse_from(["access-node", "promote", "--control", "c"]).unwrap();
        assert!(matches!(
            c.command,
            Command::Promote(PromoteArgs {
                control: Some(_),
                image: None,
                force: false,
                ..
            })
        ));
        let c = Cli::try_parse_from(["access-node", "promote", "--image", "i", "--force"]).unwrap();
        assert!(matches!(
            c.command,
            Command::Promote(PromoteArgs {
                image: Some(_),
                force: true,
                ..
            })
        ));
        assert!(Cli::try_parse_from(["access-node", "promote"]).is_err());
        assert!(
            Cli::try_parse_from(["access-node", "promote", "--control", "c", "--image", "i"])
                .is_err()
        );
    }
}
