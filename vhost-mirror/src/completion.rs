//! How a queue worker learns that a request it deferred has finished: an eventfd per queue,
//! registered in that queue's epoll loop beside the virtqueue's kick. The background parts of
//! a request (the replica's ack, delivered by the link's receiver; a FLUSH's fdatasync, by the
//! flusher) signal it, and the worker, back in `handle_event`, completes whatever is ready.
//! The worker never sleeps on one request while others, or new ones, could go ahead.
//!
//! A signal is a `write(2)`: only made when the worker asked for one (`arm`) since its last
//! wake-up, so a burst of acks costs one system call, not one each.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// One queue's completion event.
#[derive(Debug)]
pub struct QueueEvent {
    fd: EventFd,
    /// The worker went back to its event loop with deferred requests and wants a signal.
    armed: AtomicBool,
    /// Signals so far, armed or not: a worker spinning on its requests in flight
    /// (`--poll-inflight-us`) watches this instead of each of them.
    count: AtomicU64,
}

impl QueueEvent {
    pub fn new() -> io::Result<QueueEvent> {
        Ok(QueueEvent {
            fd: EventFd::new(EFD_NONBLOCK)?,
            armed: AtomicBool::new(false),
            count: AtomicU64::new(0),
        })
    }

    /// A deferred request finished (or part of it did): wakes the worker if it asked.
    pub fn signal(&self) {
        self.count.fetch_add(1, Ordering::Release);
        if self.armed.swap(false, Ordering::AcqRel) {
            // A full counter (never, at 2^64 - 1) or a closed fd: the worker still finds the
            // request ready on its next wake-up.
            let _ = self.fd.write(1);
        }
    }

    /// Wakes the worker whether or not it asked (shutdown: it must finish what it deferred).
    pub fn force_signal(&self) {
        self.armed.store(false, Ordering::SeqCst);
        let _ = self.fd.write(1);
    }

    /// The worker is about to go back to its event loop: the next `signal` wakes it. It must
    /// look at its deferred requests once more after this (one may have finished just before).
    pub fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    /// How many signals so far (whether or not armed): changes once a request that asked for
    /// one finished.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }

    /// Clears the eventfd (the worker woke up for it).
    pub fn consume(&self) {
        let _ = self.fd.read();
    }
}

#[cfg(test)]
impl QueueEvent {
    /// Waits at most `d` for a signal (tests).
    pub fn wait_signalled(&self, d: std::time::Duration) -> bool {
        let mut p = libc::pollfd {
            fd: self.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(d.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd, for the length of the call.
        unsafe { libc::poll(&mut p, 1, ms) == 1 }
    }
}

impl AsRawFd for QueueEvent {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(e: &QueueEvent) -> bool {
        e.wait_signalled(std::time::Duration::ZERO)
    }

    #[test]
    fn signals_only_when_armed_and_once_per_arming() {
        let e = QueueEvent::new().unwrap();
        e.signal();
        assert!(!readable(&e), "not armed: no system call, no wake-up");
        e.arm();
        e.signal();
        assert!(readable(&e));
        e.consume();
        assert!(!readable(&e));
        e.signal();
        assert!(!readable(&e), "one signal per arming");
    }
}
