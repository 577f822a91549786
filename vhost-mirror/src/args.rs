//! Command-line arguments (clap derive), turned into a validated configuration in `config.rs`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::replication::PeerLoss;

#[derive(Debug, Parser)]
#[command(
    name = "vhost-mirror",
    version,
    about = "vhost-user-blk backend serving a VM disk from a raw image"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once at start: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve IMG to QEMU over a vhost-user-blk socket.
    Serve(ServeArgs),
    /// Print the status of a running `serve` (through its --control socket).
    Status(StatusArgs),
    /// Compare the whole device (or a range) with the replica by block hashes while the guest
    /// runs. Exit status 0: identical; 1: differences found (marked out of sync); 2: could
    /// not run.
    Verify(VerifyArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Read the options from this TOML file too: one key per option, by its long name
    /// (`num-queues = 2`, `peer = "192.0.2.2:7800"`). Options given here override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Raw image file (or block device) to serve (required, here or in FILE).
    #[arg(long, value_name = "IMG")]
    pub image: Option<PathBuf>,
    /// vhost-user socket path QEMU connects to (created; must not be in use; required, here
    /// or in FILE).
    #[arg(long, value_name = "SOCK")]
    pub socket: Option<PathBuf>,
    /// Virtqueues offered to the frontend, at most 64. QEMU's vhost-user-blk-pci asks one per
    /// vCPU unless given num-queues=, and refuses to start if we offer fewer; the default covers
    /// VMs of up to 16 vCPUs. Each offered queue has a worker thread, idle until the frontend
    /// enables the queue; buffers and the queue's event are made only then.
    #[arg(long, default_value_t = crate::config::DEFAULT_NUM_QUEUES, value_name = "N")]
    pub num_queues: u16,
    /// Largest virtqueue size the frontend may use (a power of two).
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub queue_size: u16,
    /// Serve the image read-only (VIRTIO_BLK_F_RO).
    #[arg(long)]
    pub readonly: bool,
    /// After draining its ring with nothing in flight, a queue worker watches it this many
    /// microseconds for new requests before it sleeps (0: sleep at once; with requests in
    /// flight it sleeps at once, woken by their completion). Trades CPU for latency.
    #[arg(long, default_value_t = 32, value_name = "US")]
    pub poll_us: u64,
    /// With requests in flight (waiting for the replica or an fdatasync) and none ready, a
    /// queue worker watches them and its ring this many microseconds before it sleeps until
    /// their completion event (0: sleep at once). Trades CPU for latency: a replica's ack
    /// often comes within it, and is then taken without a wake-up.
    #[arg(long, default_value_t = 100, value_name = "US")]
    pub poll_inflight_us: u64,
    /// Unix socket for `vhost-mirror status`.
    #[arg(long, value_name = "CTL")]
    pub control: Option<PathBuf>,
    /// Let members of GROUP (a name or a number) use SOCK and CTL too: the sockets become mode
    /// 0660, owned by GROUP. Without it they are 0600: only root and this user.
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9942). Anyone who
    /// reaches ADDR can read them (no authentication): keep it on loopback or a management
    /// network.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Replicate synchronously to the access node at ADDR (host:port).
    #[arg(long, value_name = "ADDR")]
    pub peer: Option<String>,
    /// File holding the secret shared with the access node (required with --peer).
    #[arg(long, value_name = "F")]
    pub secret_file: Option<PathBuf>,
    /// While the peer is unreachable: keep running on the local disk and record changes
    /// (degrade), or hold guest writes until it is back (suspend).
    #[arg(long, value_enum, default_value = "degrade", value_name = "MODE")]
    pub on_peer_loss: PeerLoss,
    /// Limit resync traffic to this many MiB/s (default: unlimited).
    #[arg(long, value_name = "MiB/s")]
    pub resync_rate: Option<u64>,
    /// While the guest writes, the resync yields: one 64 KiB run at a time, at this many MiB/s
    /// (DRBD's c-min-rate); at full speed (or --resync-rate) once the guest is idle for 20 ms.
    #[arg(long, value_name = "MiB/s", default_value_t = 2)]
    pub resync_min_rate: u64,
    /// The quorum witness (`access-node witness`, started with the same secret). With it, a
    /// primary that loses its replica acknowledges nothing the replica lacks until the witness
    /// has recorded the replica outdated (it then cannot be promoted), holding guest I/O
    /// meanwhile; once the witness says the replica was promoted, it fails such writes.
    #[arg(long, value_name = "ADDR", conflicts_with = "fence_peer")]
    pub witness: Option<String>,
    /// Instead of a witness: DRBD's fence-peer handler. Run (`sh -c CMD`, env
    /// VHOST_MIRROR_PEER, VHOST_MIRROR_IMAGE, VHOST_MIRROR_GENERATIONS) when the replica is
    /// lost and a write it lacks waits; writes go on once it exits 3 (peer inconsistent), 4
    /// (peer outdated), 5 (peer unreachable, taken as dead) or 7 (peer fenced); 6 (peer is
    /// primary) makes this primary fail them; any other exit runs it again.
    #[arg(long, value_name = "CMD")]
    pub fence_peer: Option<String>,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The --control socket of a running `vhost-mirror serve --peer ...`.
    #[arg(long, value_name = "CTL")]
    pub control: PathBuf,
    /// First byte to compare (a multiple of 4096).
    #[arg(long, default_value_t = 0)]
    pub offset: u64,
    /// Bytes to compare (0: to the end of the device).
    #[arg(long, default_value_t = 0)]
    pub length: u64,
    /// At most this many MiB per second (default: as fast as it goes).
    #[arg(long, value_name = "MiB/s")]
    pub rate: Option<u64>,
    /// Return only once the blocks found different are resynced (they are in any case: the
    /// primary's data wins).
    #[arg(long)]
    pub repair: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The --control socket of a running `vhost-mirror serve`.
    #[arg(long, value_name = "CTL")]
    pub control: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}
