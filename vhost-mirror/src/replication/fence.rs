//! Who decides whether a write the replica lacks may be acknowledged: the fence, with
//! `--witness ADDR` (rules: `mirror_proto::witness`).
//!
//! **Invariant: with a witness, no write or flush the replica lacks is acknowledged until the
//! witness has durably recorded that replica outdated (so it is never promoted), or the
//! replica itself recorded that it is inconsistent (SyncStart, on a new link); once the
//! witness says the replica was promoted, nothing the replica lacks is acknowledged again.**
//!
//! Mechanism: the link's death sets the gate to `Pending` before any waiter learns of it
//! (`on_down` in `peer.rs`). A request that the replica lacks (its part failed or never went:
//! `Mirror::finish`) is held by its queue worker, like suspend mode's, once it holds no range
//! (`Mirror::hold`), until the gate says: `Attached` or `Outdated` (acknowledge), or
//! `Superseded` (fail it: IOERR). The fence thread asks the witness while the gate is
//! `Pending`, retrying until it answers; a link that comes back and gets its SyncStart
//! acknowledged opens the gate too (`attached`). After a resync the witness is told the replica
//! is in sync again (`Clear`).

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use log::{error, info, warn};
use mirror_proto::auth::Secret;
use mirror_proto::frame::{AckStatus, WitnessOp};
use mirror_proto::witness;

use super::Mirror;

/// How long one question to the witness may take.
const ASK_TIMEOUT: Duration = Duration::from_secs(3);
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Where writes the replica lacks stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// The replica is attached (in sync, or it recorded itself inconsistent): what it lacks
    /// is resynced, and it cannot be promoted meanwhile.
    Attached,
    /// The link is gone and the witness has not answered yet: hold.
    Pending,
    /// The witness recorded the replica (holding this generation) outdated: go on.
    Outdated(u64),
    /// The witness says the replica was promoted: acknowledge nothing it lacks, ever.
    Superseded,
}

impl Gate {
    pub fn as_str(self) -> &'static str {
        match self {
            Gate::Attached => "attached",
            Gate::Pending => "waiting-for-witness",
            Gate::Outdated(_) => "peer-outdated",
            Gate::Superseded => "superseded",
        }
    }
}

#[derive(Debug)]
struct State {
    gate: Gate,
    /// The generation the witness holds an outdated record of, for us.
    recorded: Option<u64>,
    /// A generation whose outdated record the witness should forget (the replica is in
    /// sync again).
    clear: Option<u64>,
}

pub struct Fence {
    addr: String,
    secret: Secret,
    state: Mutex<State>,
    changed: Condvar,
}

impl Fence {
    pub fn new(addr: String, secret: Secret) -> Fence {
        Fence {
            addr,
            secret,
            // Until a replica attaches, this process knows nothing about it.
            state: Mutex::new(State {
                gate: Gate::Pending,
                recorded: None,
                clear: None,
            }),
            changed: Condvar::new(),
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.lock());
        self.changed.notify_all();
    }

    pub fn gate(&self) -> Gate {
        self.lock().gate
    }

    /// The link died (called before any of its waiters learns of it).
    pub fn link_lost(&self) {
        self.set(|s| {
            if s.gate == Gate::Attached {
                s.gate = Gate::Pending;
            }
        });
    }

    /// A replica attached and holds nothing we acknowledged without it, or recorded itself
    /// inconsistent.
    pub fn attached(&self) {
        self.set(|s| {
            if s.gate != Gate::Superseded {
                s.gate = Gate::Attached;
            }
        });
    }

    /// A resync finished: the witness may forget the outdated record it keeps for us.
    pub fn in_sync(&self) {
        self.set(|s| {
            if let Some(g) = s.recorded.take() {
                s.clear = Some(g);
            }
        });
    }

    /// Blocks while the gate is `Pending`; whether a request the replica lacks may be
    /// acknowledged. `stopping`: give up (false) when the process stops.
    pub fn acknowledgeable(&self, stopping: &dyn Fn() -> bool) -> bool {
        let mut s = self.lock();
        loop {
            match s.gate {
                Gate::Attached | Gate::Outdated(_) => return true,
                Gate::Superseded => return false,
                Gate::Pending if stopping() => return false,
                Gate::Pending => {
                    s = self
                        .changed
                        .wait_timeout(s, Duration::from_millis(200))
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }

    /// Wakes the waiters (e.g. at shutdown).
    pub fn wake(&self) {
        self.changed.notify_all();
    }
}

/// The fence thread: asks the witness while the gate is `Pending`, and tells it of replicas
/// in sync again.
pub fn run(m: Arc<Mirror>, f: Arc<Fence>) {
    let mut retry = RETRY_MIN;
    let mut failures = 0u64;
    loop {
        if m.is_stopping() {
            return;
        }
        let (gate, clear) = {
            let s = f.lock();
            (s.gate, s.clear)
        };
        let (op, generation) = if gate == Gate::Pending {
            (WitnessOp::Outdate, m.replica_generation())
        } else if let Some(g) = clear {
            (WitnessOp::Clear, g)
        } else {
            let s = f.lock();
            if s.gate != Gate::Pending && s.clear.is_none() {
                let _ = f
                    .changed
                    .wait_timeout(s, Duration::from_millis(500))
                    .unwrap_or_else(|p| p.into_inner());
            }
            continue;
        };
        match witness::ask(&f.addr, &f.secret, op, generation, ASK_TIMEOUT) {
            Ok(answer) => {
                retry = RETRY_MIN;
                failures = 0;
                answered(&m, &f, op, generation, answer);
                if answer == AckStatus::IoError {
                    std::thread::sleep(RETRY_MAX);
                }
            }
            Err(e) => {
                failures += 1;
                // One line per failure at first, then one every ~30 attempts.
                if failures <= 3 || failures.is_multiple_of(30) {
                    warn!(
                        "witness {}: {} of generation {generation:016x}: {} (attempt {failures}; {})",
                        f.addr,
                        op.as_str(),
                        mirror_proto::sys::error_chain(&e),
                        if op == WitnessOp::Outdate {
                            "writes the replica lacks are held until it answers or the replica is back"
                        } else {
                            "retrying"
                        }
                    );
                }
                std::thread::sleep(retry);
                retry = (retry * 2).min(RETRY_MAX);
            }
        }
    }
}

fn answered(m: &Mirror, f: &Fence, op: WitnessOp, generation: u64, answer: AckStatus) {
    match (op, answer) {
        (WitnessOp::Outdate, AckStatus::Ok) => {
            let mut done = false;
            f.set(|s| {
                s.recorded = Some(generation);
                if s.gate == Gate::Pending {
                    s.gate = Gate::Outdated(generation);
                    done = true;
                }
            });
            if done {
                info!(
                    "witness {}: replica (generation {generation:016x}) recorded outdated; \
                     acknowledging writes without it",
                    f.addr
                );
                m.notify_changed();
            }
        }
        (WitnessOp::Outdate, AckStatus::Fenced) => {
            f.set(|s| s.gate = Gate::Superseded);
            error!(
                "witness {}: the replica (generation {generation:016x}) was promoted: this \
                 primary is superseded and acknowledges no further write",
                f.addr
            );
            m.notify_changed();
        }
        (WitnessOp::Clear, AckStatus::Ok) => {
            f.set(|s| {
                if s.clear == Some(generation) {
                    s.clear = None;
                }
            });
        }
        (_, other) => {
            warn!(
                "witness {}: {} of generation {generation:016x} answered {other:?}; asking again",
                f.addr,
                op.as_str()
            );
        }
    }
}
