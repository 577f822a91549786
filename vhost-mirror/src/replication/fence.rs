//! Who decides whether a write the replica lacks may be acknowledged: the fence, with
//! `--witness ADDR` (rules: `mirror_proto::witness`).
//!
//! **Invariant: with a witness, no write or flush the replica lacks is acknowledged until the
//! witness has durably recorded that replica outdated (so it is never promoted), or the
//! replica itself recorded that it is inconsistent (SyncStart, on a new link); once the
//! witness says the replica was promoted, nothing the replica lacks is acknowledged again.**
//!
//! Mechanism: the link's death sets the gate to `Pending` before any waiter learns of it
//! (`on_down` in `peer.rs`). A request that the replica lacks (its part failed or never went,
//! or a later part of it could not be sent: `Mirror::finish`) is held by its queue worker,
//! like suspend mode's, once it holds no range (`Mirror::hold`), until the gate says:
//! `Attached` or `Outdated` (acknowledge), or `Superseded` (fail it: IOERR). The fence thread
//! asks the witness while the gate is `Pending` and a completion waits (a lost link with an
//! idle guest asks nothing), retrying until it answers, to outdate every
//! generation the replica may hold up to date (`Mirror::replica_generations`: the bitmap's
//! base, and ours, which a SyncDone the replica applied but we never heard answered would have
//! given it); only when all are recorded does the gate open. A link that comes back opens the
//! gate too (`attached`, only while that link is alive), after a SyncStart the replica
//! acknowledged (`peer.rs` always sends one while the gate is not `Attached`: the replica is
//! then inconsistent, durably, until the SyncDone that ends the resync). After that resync
//! the witness is told to forget what it recorded (`Clear`). A replica that says it was
//! promoted (Refuse or Ack `Fenced`) supersedes this primary as the witness would.

use std::collections::BTreeSet;
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
    /// The witness recorded the replica outdated (the generations: `State::recorded`): go on.
    Outdated,
    /// The witness says the replica was promoted: acknowledge nothing it lacks, ever.
    Superseded,
}

impl Gate {
    /// Every state (the metrics write one sample per state).
    pub const ALL: [Gate; 4] = [
        Gate::Attached,
        Gate::Pending,
        Gate::Outdated,
        Gate::Superseded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Gate::Attached => "attached",
            Gate::Pending => "waiting-for-witness",
            Gate::Outdated => "peer-outdated",
            Gate::Superseded => "superseded",
        }
    }
}

#[derive(Debug)]
struct State {
    gate: Gate,
    /// Generations the witness holds an outdated record of, for us.
    recorded: BTreeSet<u64>,
    /// Generations whose outdated records the witness should forget (the replica is in sync
    /// again).
    clear: BTreeSet<u64>,
    /// What `recorded` held when the replica attached: forgotten once its resync ends.
    attached_over: BTreeSet<u64>,
    /// Completions held on a `Pending` gate: the witness is asked only while some wait (an
    /// idle guest's lost link leaves no record to clear).
    waiting: usize,
}

/// Who is asked to outdate the replica.
pub enum Arbiter {
    /// `--witness ADDR` (the pair's secret).
    Witness { addr: String, secret: Secret },
    /// `--fence-peer CMD`: DRBD's fence-peer handler convention. Exit 3 (the peer is
    /// inconsistent), 4 (outdated), 5 (unreachable: taken as dead, as DRBD does) or 7 (fenced:
    /// STONITH) let writes go on; 6 (the peer is primary) supersedes this primary; anything
    /// else is asked again.
    Command(String),
}

/// How long a fence-peer handler may run before it is killed (and run again).
const HANDLER_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Fence {
    arbiter: Arbiter,
    /// For log lines: "witness ADDR" or "fence-peer handler".
    name: String,
    /// This node's id (its metadata's): the witness tells a promoted node from the others.
    node: u64,
    state: Mutex<State>,
    changed: Condvar,
}

impl Fence {
    pub fn new(arbiter: Arbiter, node: u64) -> Fence {
        Fence {
            name: match &arbiter {
                Arbiter::Witness { addr, .. } => format!("witness {addr}"),
                Arbiter::Command(_) => "fence-peer handler".to_owned(),
            },
            arbiter,
            node,
            // Until a replica attaches, this process knows nothing about it.
            state: Mutex::new(State {
                gate: Gate::Pending,
                recorded: BTreeSet::new(),
                clear: BTreeSet::new(),
                attached_over: BTreeSet::new(),
                waiting: 0,
            }),
            changed: Condvar::new(),
        }
    }

    /// The witness's address, if the arbiter is one.
    pub fn witness(&self) -> Option<&str> {
        match &self.arbiter {
            Arbiter::Witness { addr, .. } => Some(addr),
            Arbiter::Command(_) => None,
        }
    }

    /// The fence-peer command, if the arbiter is one.
    pub fn command(&self) -> Option<&str> {
        match &self.arbiter {
            Arbiter::Command(c) => Some(c),
            Arbiter::Witness { .. } => None,
        }
    }

    /// Asks the arbiter about every generation: one answer each, or the first failure.
    fn ask(
        &self,
        m: &Mirror,
        op: WitnessOp,
        generations: &[u64],
    ) -> Result<Vec<AckStatus>, (u64, String)> {
        match &self.arbiter {
            Arbiter::Witness { addr, secret } => {
                let mut answers = Vec::new();
                for &g in generations {
                    match witness::ask(addr, secret, op, g, self.node, ASK_TIMEOUT) {
                        Ok(a) => answers.push(a),
                        Err(e) => return Err((g, mirror_proto::sys::error_chain(&e))),
                    }
                }
                Ok(answers)
            }
            Arbiter::Command(cmd) => {
                if op != WitnessOp::Outdate {
                    // A handler keeps no records: nothing to clear.
                    return Ok(vec![AckStatus::Ok; generations.len()]);
                }
                let first = generations.first().copied().unwrap_or(0);
                let code = run_handler(m, cmd, generations).map_err(|e| (first, e))?;
                match code {
                    3..=5 | 7 => {
                        info!("fence-peer handler exited {code}: the replica is outdated or gone");
                        Ok(vec![AckStatus::Ok; generations.len()])
                    }
                    6 => Ok(vec![AckStatus::Fenced]),
                    other => Err((first, format!("fence-peer handler exited {other}"))),
                }
            }
        }
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
    /// inconsistent. `alive` is asked under the fence's lock: a link that died already (its
    /// `link_lost` came or comes after) leaves the gate alone.
    pub fn attached(&self, alive: impl FnOnce() -> bool) {
        let mut s = self.lock();
        if s.gate != Gate::Superseded && alive() {
            s.gate = Gate::Attached;
            let r = std::mem::take(&mut s.recorded);
            s.attached_over.extend(r);
        }
        drop(s);
        self.changed.notify_all();
    }

    /// A replica is attaching: an `Outdated` gate stands only for the replica the witness
    /// recorded; another one (a full sync's, say) holds the gate until it is attached.
    pub fn attaching(&self, replica_generation: u64) {
        self.set(|s| {
            if matches!(s.gate, Gate::Outdated) && !s.recorded.contains(&replica_generation) {
                s.gate = Gate::Pending;
            }
        });
    }

    /// The replica said it was promoted: this primary is superseded.
    pub fn superseded(&self, why: &str) {
        let mut first = false;
        self.set(|s| {
            first = s.gate != Gate::Superseded;
            s.gate = Gate::Superseded;
        });
        if first {
            error!("{why}: this primary is superseded and acknowledges no further write the replica lacks");
        }
    }

    /// A resync finished (its SyncDone answered) on the link that is still attached: the
    /// witness may forget what was recorded before that link attached. (What a new loss
    /// recorded meanwhile stays: it stands for writes this replica lacks again.)
    pub fn in_sync(&self) {
        self.set(|s| {
            if s.gate == Gate::Attached {
                let r = std::mem::take(&mut s.attached_over);
                s.clear.extend(r);
            }
        });
    }

    /// Blocks while the gate is `Pending`; whether a request the replica lacks may be
    /// acknowledged. `stopping`: give up (false) when the process stops.
    pub fn acknowledgeable(&self, stopping: &dyn Fn() -> bool) -> bool {
        let mut s = self.lock();
        loop {
            match s.gate {
                Gate::Attached | Gate::Outdated => return true,
                Gate::Superseded => return false,
                Gate::Pending if stopping() => return false,
                Gate::Pending => {
                    s.waiting += 1;
                    // Wakes the fence thread.
                    self.changed.notify_all();
                    s = self
                        .changed
                        .wait_timeout(s, Duration::from_millis(200))
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                    s.waiting -= 1;
                }
            }
        }
    }

    /// Wakes the waiters (e.g. at shutdown).
    pub fn wake(&self) {
        self.changed.notify_all();
    }
}

/// The fence thread: asks the witness while the gate is `Pending` and a completion waits, and
/// tells it of replicas
/// in sync again.
pub fn run(m: Arc<Mirror>, f: Arc<Fence>) {
    let mut retry = RETRY_MIN;
    let mut failures = 0u64;
    loop {
        if m.is_stopping() {
            return;
        }
        // Decided, and what an Outdate names recorded, under one lock: a replica that came
        // back meanwhile is not outdated.
        let (outdate, clear) = {
            let mut s = f.lock();
            if s.gate == Gate::Pending && s.waiting > 0 {
                let gens = m.replica_generations();
                // Before asking: the witness may record it even if its answer never comes.
                // A Clear still queued for one of them must not undo this record.
                s.recorded.extend(&gens);
                for g in &gens {
                    s.clear.remove(g);
                }
                (Some(gens), None)
            } else {
                (None, s.clear.first().copied())
            }
        };
        let (op, generations) = if let Some(gens) = outdate {
            (WitnessOp::Outdate, gens)
        } else if let Some(g) = clear {
            (WitnessOp::Clear, vec![g])
        } else {
            let s = f.lock();
            if !(s.gate == Gate::Pending && s.waiting > 0) && s.clear.is_empty() {
                let _ = f
                    .changed
                    .wait_timeout(s, Duration::from_millis(500))
                    .unwrap_or_else(|p| p.into_inner());
            }
            continue;
        };
        match f.ask(&m, op, &generations) {
            Ok(answers) => {
                retry = RETRY_MIN;
                failures = 0;
                answered(&m, &f, op, &generations, &answers);
                if answers.contains(&AckStatus::IoError) {
                    std::thread::sleep(RETRY_MAX);
                }
            }
            Err((generation, e)) => {
                failures += 1;
                // One line per failure at first, then one every ~30 attempts.
                if failures <= 3 || failures.is_multiple_of(30) {
                    warn!(
                        "{}: {} of generation {generation:016x}: {e} (attempt {failures}; {})",
                        f.name,
                        op.as_str(),
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

fn answered(m: &Mirror, f: &Fence, op: WitnessOp, generations: &[u64], answers: &[AckStatus]) {
    let list = generations
        .iter()
        .map(|g| format!("{g:016x}"))
        .collect::<Vec<_>>()
        .join(", ");
    if answers.contains(&AckStatus::Fenced) {
        f.superseded(&format!(
            "{}: the replica (generation {list}) was promoted, or is primary",
            f.name
        ));
        m.notify_changed();
        return;
    }
    if answers.iter().any(|a| *a != AckStatus::Ok) {
        warn!(
            "{}: {} of generation {list} answered {answers:?}; asking again",
            f.name,
            op.as_str()
        );
        return;
    }
    match op {
        WitnessOp::Outdate => {
            // (A replica that came back meanwhile leaves the gate alone; the records go at the
            // end of its resync, `in_sync`.)
            let mut opened = false;
            f.set(|s| {
                if s.gate == Gate::Pending {
                    s.gate = Gate::Outdated;
                    opened = true;
                }
            });
            if opened {
                info!(
                    "{}: replica (generation {list}) outdated; acknowledging writes without it",
                    f.name
                );
                m.notify_changed();
            }
        }
        WitnessOp::Clear => f.set(|s| {
            for g in generations {
                s.clear.remove(g);
            }
        }),
        WitnessOp::Promote => {}
    }
}

/// Runs the fence-peer handler (`sh -c CMD`) with the pair's facts in its environment; its
/// exit code. Killed (and an error) after [`HANDLER_TIMEOUT`].
fn run_handler(m: &Mirror, cmd: &str, generations: &[u64]) -> Result<i32, String> {
    let list = generations
        .iter()
        .map(|g| format!("{g:016x}"))
        .collect::<Vec<_>>()
        .join(" ");
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("VHOST_MIRROR_PEER", m.peer_name())
        .env("VHOST_MIRROR_IMAGE", &m.cfg.image)
        .env("VHOST_MIRROR_GENERATIONS", list)
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run the fence-peer handler: {e}"))?;
    let deadline = std::time::Instant::now() + HANDLER_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => {
                return st
                    .code()
                    .ok_or_else(|| format!("fence-peer handler ended by {st}"))
            }
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "fence-peer handler still running after {} s: killed",
                    HANDLER_TIMEOUT.as_secs()
                ));
            }
            Err(e) => return Err(format!("waiting for the fence-peer handler: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[u64]) -> BTreeSet<u64> {
        v.iter().copied().collect()
    }

    /// Second review of the witness: a resync's end that comes after the link died again (a
    /// new loss already outdated the replica) must not clear the new records: the replica
    /// could then be promoted while this primary acknowledges writes it lacks.
    #[test]
    fn a_late_resync_end_never_clears_a_new_outage() {
        let f = Fence::new(Arbiter::Command("true".into()), 1);
        f.lock().recorded.extend([1, 2]);
        f.attached(|| true);
        f.link_lost();
        f.lock().recorded.extend([3, 4]);
        f.in_sync();
        assert!(
            f.lock().clear.is_empty(),
            "cleared while the gate is pending"
        );
        assert_eq!(f.lock().recorded, set(&[3, 4]));
        // Attached again, and this resync ends: everything recorded before it goes.
        f.attached(|| true);
        f.in_sync();
        assert_eq!(f.lock().clear, set(&[1, 2, 3, 4]));
        assert!(f.lock().recorded.is_empty());
    }

    /// An `Outdated` gate stands for the replica the witness recorded: another attaching
    /// replica (a full sync's) holds writes again until it is attached; a dead link never
    /// opens the gate.
    #[test]
    fn the_gate_opens_only_for_the_recorded_replica_or_a_live_link() {
        let f = Fence::new(Arbiter::Command("true".into()), 1);
        f.lock().recorded.extend([5, 6]);
        f.lock().gate = Gate::Outdated;
        f.attaching(6);
        assert_eq!(f.gate(), Gate::Outdated);
        f.attaching(9);
        assert_eq!(f.gate(), Gate::Pending);
        f.attached(|| false);
        assert_eq!(f.gate(), Gate::Pending);
        f.attached(|| true);
        assert_eq!(f.gate(), Gate::Attached);
        f.superseded("test");
        f.attached(|| true);
        assert_eq!(f.gate(), Gate::Superseded, "superseded is for good");
    }
}
