//! `vhost-mirror serve --metrics ADDR`: the primary's Prometheus metrics, named in the style
//! of drbd-reactor's exporter (`vhost_mirror_peer_outofsync_bytes` for DRBD's
//! `drbd_peerdevice_outofsync_bytes`), every sample labelled with the image. Rendered on
//! demand from the counters the I/O path keeps anyway (`stats.rs`, `Mirror::metrics`); the
//! HTTP endpoint and the text format are `mirror_proto::metrics`. The access node exports the
//! same names where they mean the same thing (`access-node/src/metrics.rs`).

use std::path::Path;

use mirror_proto::control::PeerState;
use mirror_proto::frame::DiskState;
use mirror_proto::metrics::{Exposition, DISK_STATES};

use crate::blk_config::SECTOR_SIZE;
use crate::device::Device;
use crate::replication::fence::Gate;
use crate::stats;

/// The whole document: the device and, when mirrored, the replication.
pub fn render(dev: &Device, image: &Path, frontend_connected: bool, connections: u64) -> String {
    let image = image.display().to_string();
    let mut e = Exposition::new(&[("image", &image)]);
    e.states(
        "vhost_mirror_role",
        "Role of this node for the image (vhost-mirror serves it: primary)",
        "role",
        &["primary", "secondary"],
        Some("primary"),
    );
    e.states(
        "vhost_mirror_disk_state",
        "State of the local disk (failed: a local I/O error, until a restart)",
        "state",
        &DISK_STATES,
        Some(if dev.disk.failure().is_some() {
            "failed"
        } else {
            "up-to-date"
        }),
    );
    e.gauge_int(
        "vhost_mirror_capacity_bytes",
        "Size of the device the guest sees",
        dev.model.capacity_sectors * SECTOR_SIZE,
    );
    e.gauge_int(
        "vhost_mirror_frontend_connected",
        "Whether a vhost-user frontend (QEMU) is connected",
        u64::from(frontend_connected),
    );
    e.counter(
        "vhost_mirror_frontend_connections_total",
        "vhost-user frontends accepted",
        connections,
    );
    let c = stats::snapshot(&dev.counters);
    e.counters(
        "vhost_mirror_requests_total",
        "Guest requests by kind",
        "kind",
        &[
            ("read", c.reads),
            ("write", c.writes),
            ("flush", c.flushes),
            ("discard", c.discards),
            ("write_zeroes", c.write_zeroes),
            ("get_id", c.get_ids),
        ],
    );
    e.counters(
        "vhost_mirror_bytes_total",
        "Guest bytes read and written",
        "kind",
        &[("read", c.bytes_read), ("written", c.bytes_written)],
    );
    e.counter(
        "vhost_mirror_errors_total",
        "Guest requests completed with an I/O error",
        c.errors,
    );
    e.counter(
        "vhost_mirror_unsupported_requests_total",
        "Guest requests completed as unsupported",
        c.unsupported,
    );
    let (inflight, local_write, flush) = stats::latencies(&dev.counters);
    e.gauge_int(
        "vhost_mirror_inflight_requests",
        "Guest requests waiting for the replica or an fdatasync",
        inflight,
    );
    e.histogram(
        "vhost_mirror_local_write_seconds",
        "Local pwritev of a guest write",
        &local_write,
    );
    e.histogram(
        "vhost_mirror_flush_seconds",
        "Guest FLUSH, from its arrival to its completion (durable on both sides)",
        &flush,
    );
    if let Some(m) = &dev.mirror {
        let r = m.metrics();
        e.states(
            "vhost_mirror_peer_state",
            "State of the replication link to the access node",
            "state",
            &PeerState::ALL.map(PeerState::as_str),
            Some(r.peer_state.as_str()),
        );
        e.states(
            "vhost_mirror_peer_disk_state",
            "State of the replica's disk, as last reported (none before the first report)",
            "state",
            &DISK_STATES,
            r.peer_disk.map(DiskState::as_str),
        );
        if let Some(g) = r.fence {
            e.states(
                "vhost_mirror_fence_state",
                "With a witness or fence-peer handler: whether writes the replica lacks may be \
                 acknowledged",
                "state",
                &Gate::ALL.map(Gate::as_str),
                Some(g.as_str()),
            );
        }
        e.info(
            "vhost_mirror_generation_info",
            "The data generation of this image",
            &[("generation", &format!("{:016x}", r.generation))],
        );
        e.gauge_int(
            "vhost_mirror_peer_outofsync_bytes",
            "Bytes the replica may lack, by the out-of-sync bitmap",
            r.out_of_sync,
        );
        e.gauge_int(
            "vhost_mirror_resync_active",
            "Whether a resync runs",
            u64::from(r.resyncing),
        );
        e.gauge_int(
            "vhost_mirror_resync_yielding",
            "Whether the running resync yields to guest writes (--resync-min-rate)",
            u64::from(r.resync_yielding),
        );
        e.counter(
            "vhost_mirror_resync_done_bytes_total",
            "Bytes of out-of-sync regions resynced (sent or found equal, then flushed)",
            r.resync_done,
        );
        e.counter(
            "vhost_mirror_resync_sent_bytes_total",
            "Resync bytes sent to the replica as data",
            r.resync_sent,
        );
        e.counter(
            "vhost_mirror_resync_same_bytes_total",
            "Resync bytes found equal on the replica by their block hashes (not sent)",
            r.resync_same,
        );
        e.gauge_int(
            "vhost_mirror_resync_rate_bytes_per_second",
            "Bytes of regions the running resync copies or compares per second (0: none runs)",
            r.resync_rate,
        );
        e.counter(
            "vhost_mirror_link_sent_bytes_total",
            "Bytes of frames sent on the replication link (before encryption)",
            r.link_sent,
        );
        e.counter(
            "vhost_mirror_link_received_bytes_total",
            "Bytes of frames received on the replication link (decrypted)",
            r.link_received,
        );
        e.histogram(
            "vhost_mirror_replica_ack_seconds",
            "Round trip of a guest write's data (a chunk of up to 1 MiB) to the replica's ack",
            &r.replica_ack,
        );
        e.counter(
            "vhost_mirror_activity_log_writes_total",
            "Activity-log transactions written (a 4 KiB write and an fdatasync each)",
            r.activity_log_writes,
        );
        e.counter(
            "vhost_mirror_bitmap_writes_total",
            "Writes of the out-of-sync bitmap file (changed blocks and an fdatasync each)",
            r.bitmap_writes,
        );
    }
    e.finish()
}
