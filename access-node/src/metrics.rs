//! `access-node serve --metrics ADDR`: the replica's Prometheus metrics. The names are the
//! primary's (`vhost-mirror/src/metrics.rs`) where they mean the same thing on this side, so
//! one dashboard shows both nodes of a pair; every sample is labelled with the image. Rendered
//! on demand from the status counters (`status.rs`); the endpoint and the text format are
//! `mirror_proto::metrics`.

use mirror_proto::control::PeerState;
use mirror_proto::frame::Role;
use mirror_proto::metrics::{Exposition, DISK_STATES};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::status::Status;

/// The whole document.
pub fn render(status: &Status) -> String {
    let image = status.image().display().to_string();
    let mut e = Exposition::new(&[("image", &image)]);
    let (role, disk_state, generation, capacity) = status.disk();
    e.states(
        "vhost_mirror_role",
        "Role of this node for the image (an access node keeps a replica: secondary, until \
         promoted)",
        "role",
        &[Role::Primary.as_str(), Role::Secondary.as_str()],
        Some(role.as_str()),
    );
    e.states(
        "vhost_mirror_disk_state",
        "State of the replica's disk",
        "state",
        &DISK_STATES,
        Some(disk_state.as_str()),
    );
    e.gauge_int(
        "vhost_mirror_capacity_bytes",
        "Size of the replica image (0 until a primary created it)",
        capacity,
    );
    e.info(
        "vhost_mirror_generation_info",
        "The data generation of this image",
        &[("generation", &format!("{generation:016x}"))],
    );
    e.states(
        "vhost_mirror_peer_state",
        "State of the link to the primary (connected while one is attached)",
        "state",
        &PeerState::ALL.map(PeerState::as_str),
        Some(status.peer_state().as_str()),
    );
    e.counter(
        "vhost_mirror_peer_attaches_total",
        "Primaries attached",
        status.attaches(),
    );
    if let Some(idle) = status.primary_idle() {
        e.gauge(
            "vhost_mirror_peer_idle_seconds",
            "Time since the last frame from a primary",
            idle.as_secs_f64(),
        );
    }
    e.counter(
        "vhost_mirror_handshake_failures_total",
        "Connections that did not authenticate",
        status.handshake_failures(),
    );
    let c = &status.counters;
    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
    e.gauge_int(
        "vhost_mirror_peer_outofsync_bytes",
        "Bytes the running resync still has to copy, as the primary announced them",
        l(&c.out_of_sync_bytes),
    );
    e.gauge_int(
        "vhost_mirror_resync_active",
        "Whether a resync runs",
        u64::from(c.resyncing.load(Ordering::Relaxed)),
    );
    e.counters(
        "vhost_mirror_requests_total",
        "Requests from the primary by kind (guest and resync)",
        "kind",
        &[
            ("read", l(&c.reads)),
            ("write", l(&c.writes)),
            ("flush", l(&c.flushes)),
            ("discard", l(&c.discards)),
            ("write_zeroes", l(&c.write_zeroes)),
        ],
    );
    e.counters(
        "vhost_mirror_bytes_total",
        "Bytes read for the primary and written (applied) to the replica",
        "kind",
        &[("read", l(&c.bytes_read)), ("written", l(&c.bytes_written))],
    );
    e.counter(
        "vhost_mirror_hashed_bytes_total",
        "Bytes of the image hashed for the primary (resync by checksum, verify)",
        l(&c.bytes_hashed),
    );
    e.counter(
        "vhost_mirror_errors_total",
        "Requests answered with an error",
        l(&c.errors),
    );
    e.counter(
        "vhost_mirror_link_sent_bytes_total",
        "Bytes sent to the primary (frames)",
        l(&c.bytes_sent),
    );
    e.counter(
        "vhost_mirror_link_received_bytes_total",
        "Bytes received from the primary (frames)",
        l(&c.bytes_received),
    );
    e.counter(
        "vhost_mirror_cache_hits_total",
        "Reads served from the read cache",
        l(&c.cache_hits),
    );
    e.counter(
        "vhost_mirror_cache_misses_total",
        "Reads the read cache could not serve",
        l(&c.cache_misses),
    );
    e.gauge_int(
        "vhost_mirror_cache_bytes",
        "Bytes held by the read cache",
        l(&c.cache_bytes),
    );
    e.histogram(
        "vhost_mirror_local_write_seconds",
        "Applying a Write to the replica image (its pwrite)",
        &c.local_write.snapshot(),
    );
    e.histogram(
        "vhost_mirror_flush_seconds",
        "An fdatasync of the replica image answering a batch of Flushes",
        &c.flush.snapshot(),
    );
    e.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::Counters;
    use mirror_proto::frame::DiskState;
    use std::time::Duration;

    #[test]
    fn the_document_follows_the_status() {
        let s = Status::new("/x/r\"1\".img".into(), 1 << 20);
        s.set_disk(Role::Secondary, DiskState::UpToDate, 0xabc, 4096);
        s.attached("127.0.0.1:5".parse().unwrap());
        Counters::add(&s.counters.writes, 3);
        s.counters.local_write.record(Duration::from_micros(20));
        s.counters.flush.record(Duration::from_millis(2));
        let t = render(&s);
        let img = "image=\"/x/r\\\"1\\\".img\"";
        for line in [
            format!("vhost_mirror_role{{{img},role=\"secondary\"}} 1"),
            format!("vhost_mirror_role{{{img},role=\"primary\"}} 0"),
            format!("vhost_mirror_disk_state{{{img},state=\"up-to-date\"}} 1"),
            format!("vhost_mirror_peer_state{{{img},state=\"connected\"}} 1"),
            format!("vhost_mirror_generation_info{{{img},generation=\"0000000000000abc\"}} 1"),
            format!("vhost_mirror_requests_total{{{img},kind=\"write\"}} 3"),
            format!("vhost_mirror_local_write_seconds_count{{{img}}} 1"),
            format!("vhost_mirror_flush_seconds_bucket{{{img},le=\"0.0025\"}} 1"),
            format!("vhost_mirror_peer_attaches_total{{{img}}} 1"),
        ] {
            assert!(t.contains(&format!("{line}\n")), "no {line:?} in\n{t}");
        }
        // Every family is announced once, before its samples.
        let types = t.lines().filter(|l| l.starts_with("# TYPE ")).count();
        let helps = t.lines().filter(|l| l.starts_with("# HELP ")).count();
        assert_eq!(types, helps);
        let mut names: Vec<&str> = t
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), types, "a family announced twice:\n{t}");
    }
}
