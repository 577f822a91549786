//! `generation::decide` on the pairs of `NodeInfo` that two real nodes can reach: the input is a
//! history of up to 64 events on hosts A and B (start either program, stop or crash, connect,
//! guest writes, replica flushes, link failures, failed replica writes, a replica's power loss,
//! resync completion, promote with or without `--force`, `--discard-my-data`, deleting the
//! metadata), applied with the generation rules of the code this mirrors:
//! `vhost-mirror/src/replication/out_of_sync.rs` (`SyncState::open`, `mark_ranges`,
//! `mark_all`, `resync_finished`), `peer.rs` (`serve_link`: what each decision does) and
//! `access-node/src/replica.rs` (`attach`, `node_info`, `sync_start`, `sync_done`,
//! `mark_outdated`, `promote`). Beside the metadata the model keeps the ground truth: the set of
//! guest writes each image holds.
//!
//! After every event, for each side that could run as the primary (its metadata says primary)
//! against the other (as its access node would answer Attach now), and at every real connect:
//! - nothing older overwrites newer: if the primary's generation is in the replica's history,
//!   the decision is neither Full nor Partial (unless the replica runs `--discard-my-data`);
//! - ground truth: InSync only when both images hold the same writes; Full or Partial only
//!   when the replica holds no write the primary lacks (unless the operator gave its data up:
//!   `--discard-my-data`, or its metadata deleted);
//! - the two sides agree (both metadata say primary, neither discards): one says SplitBrain
//!   exactly when the other does; one says PeerNewer only if the other would copy (Partial or
//!   Full); InSync both ways when both are up to date; never both PeerNewer, never each
//!   copying over the other.

use std::collections::BTreeSet;

use arbitrary::{Result, Unstructured};
use mirror_proto::frame::{DiskState, NodeInfo, Role, MAX_HISTORY, NODE_FLAG_DISCARD_MY_DATA};
use mirror_proto::generation::{decide, push_history, SyncDecision};

const SIZE: u64 = 1 << 30;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Meta {
    role: Role,
    disk_state: DiskState,
    generation: u64,
    bitmap_generation: u64,
    history: Vec<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Off,
    /// vhost-mirror serving the image.
    Primary,
    /// access-node serving the image.
    Replica {
        discard: bool,
    },
}

#[derive(Debug, Clone)]
struct Node {
    meta: Option<Meta>,
    /// Guest writes the image holds.
    data: BTreeSet<u32>,
    /// Primary: the out-of-sync bitmap has bits set.
    dirty: bool,
    mode: Mode,
    /// The operator gave this image's data up (deleted its metadata) since it last changed.
    given_up: bool,
    /// Served by vhost-mirror while its metadata said primary but not up to date (the known
    /// finding below): its data and its generation no longer describe each other.
    tainted: bool,
}

#[derive(Debug)]
struct Link {
    primary: usize,
    /// A resync runs (the replica is inconsistent until it completes).
    syncing: bool,
    /// Writes the replica has not flushed yet.
    unflushed: BTreeSet<u32>,
}

struct World {
    nodes: [Node; 2],
    link: Option<Link>,
    next_generation: u64,
    next_write: u32,
    /// The events so far, for the panic message.
    log: Vec<String>,
}

impl World {
    fn fresh_generation(&mut self) -> u64 {
        self.next_generation += 1;
        self.next_generation
    }

    /// `SyncState::new_generation_for_bitmap`.
    fn new_generation_for_bitmap(&mut self, i: usize, base: u64) {
        let g = self.fresh_generation();
        let m = self.nodes[i].meta.as_mut().expect("a primary has metadata");
        push_history(&mut m.history, m.generation, MAX_HISTORY);
        m.generation = g;
        m.bitmap_generation = base;
    }

    /// `SyncState::mark_ranges` on the primary `i`: a first bit starts a new generation.
    fn mark(&mut self, i: usize) {
        self.nodes[i].dirty = true;
        let m = self.nodes[i].meta.as_ref().expect("a primary has metadata");
        if m.bitmap_generation == 0 {
            let g = m.generation;
            self.new_generation_for_bitmap(i, g);
        }
    }

    /// The link dies: the primary marks what the replica had not made durable
    /// (`Link::fail`).
    fn drop_link(&mut self) {
        if let Some(l) = self.link.take() {
            if !l.unflushed.is_empty() || l.syncing {
                self.mark(l.primary);
            }
        }
    }

    /// What node `i` says in Attach (as a primary) or Attached (as an access node; `attach`
    /// creates metadata for an image without).
    fn info(&self, i: usize, as_primary: bool) -> NodeInfo {
        let n = &self.nodes[i];
        let fresh = Meta {
            role: Role::Secondary,
            disk_state: DiskState::Inconsistent,
            generation: 0,
            bitmap_generation: 0,
            history: Vec::new(),
        };
        let m = n.meta.clone().unwrap_or(fresh);
        let discard = matches!(n.mode, Mode::Replica { discard: true });
        NodeInfo {
            node_id: i as u64 + 1,
            size: SIZE,
            role: if as_primary { Role::Primary } else { m.role },
            disk_state: m.disk_state,
            generation: m.generation,
            bitmap_generation: if as_primary { m.bitmap_generation } else { 0 },
            history: m.history,
            flags: if discard && !as_primary {
                NODE_FLAG_DISCARD_MY_DATA
            } else {
                0
            },
            hot: Vec::new(),
        }
    }

    fn fail(&self, what: String) -> ! {
        panic!(
            "{what}\nA: {:?}\nB: {:?}\nevents:\n  {}",
            self.nodes[0],
            self.nodes[1],
            self.log.join("\n  ")
        )
    }

    /// The properties for `p` as the primary and `r` as its replica, right now.
    fn check_pair(&self, p: usize, r: usize) -> SyncDecision {
        let (pi, ri) = (self.info(p, true), self.info(r, false));
        let d = decide(&pi, &ri);
        let (pn, rn) = (&self.nodes[p], &self.nodes[r]);
        let discards = ri.flags & NODE_FLAG_DISCARD_MY_DATA != 0;
        let copies = matches!(d, SyncDecision::Full | SyncDecision::Partial);
        let side = ["A", "B"];
        if copies && ri.history.contains(&pi.generation) && !discards {
            self.fail(format!(
                "older overwrites newer: {} (generation {}) -> {} (history {:?}): {d:?}",
                side[p], pi.generation, side[r], ri.history
            ));
        }
        if pn.tainted || rn.tainted {
            // The known finding: only the generation property is meaningful.
            return d;
        }
        if d == SyncDecision::InSync && pn.data != rn.data {
            self.fail(format!(
                "{} and {} are InSync with different data",
                side[p], side[r]
            ));
        }
        if copies && !rn.data.is_subset(&pn.data) && !discards && !rn.given_up {
            let lost: Vec<_> = rn.data.difference(&pn.data).collect();
            self.fail(format!(
                "{} -> {}: {d:?} would overwrite writes only {} has: {lost:?}",
                side[p], side[r], side[r]
            ));
        }
        d
    }

    /// Every property that the current state allows checking.
    fn check(&self) {
        let primary = |i: usize| {
            self.nodes[i]
                .meta
                .as_ref()
                .is_some_and(|m| m.role == Role::Primary)
        };
        let d: [Option<SyncDecision>; 2] =
            [0, 1].map(|p| primary(p).then(|| self.check_pair(p, 1 - p)));
        let (Some(ab), Some(ba)) = (d[0], d[1]) else {
            return;
        };
        // KNOWN FINDING (fuzz/README.md, "Findings"): an image whose metadata says primary but
        // not up to date (an old primary whose resync as a replica did not finish) is still
        // served by vhost-mirror, which then refuses its peer as a split brain while the peer
        // rightly resumes the resync. The agreement is checked between up-to-date primaries;
        // the other properties hold for every side whose metadata says primary.
        let up = |i: usize| {
            self.nodes[i]
                .meta
                .as_ref()
                .is_some_and(|m| m.disk_state == DiskState::UpToDate)
        };
        if !(up(0) && up(1)) || self.nodes[0].tainted || self.nodes[1].tainted {
            return;
        }
        let discards = |i: usize| matches!(self.nodes[i].mode, Mode::Replica { discard: true });
        if discards(0) || discards(1) {
            return;
        }
        use SyncDecision::*;
        let copies = |x| matches!(x, Full | Partial);
        let agree = match (ab, ba) {
            (SplitBrain, x) | (x, SplitBrain) => x == SplitBrain,
            (PeerNewer, x) | (x, PeerNewer) => copies(x),
            (InSync, InSync) => true,
            // Equal generations, both up to date: InSync both ways.
            (InSync, _) | (_, InSync) => false,
            (x, y) => !(copies(x) && copies(y)),
        };
        if !agree {
            self.fail(format!(
                "the sides disagree: A as primary says {ab:?}, B as primary says {ba:?}"
            ));
        }
    }

    fn step(&mut self, u: &mut Unstructured<'_>) -> Result<()> {
        let i = usize::from(u.arbitrary::<bool>()?);
        let j = 1 - i;
        let op = u.int_in_range(0..=12u8)?;
        let side = ["A", "B"][i];
        match op {
            // vhost-mirror serve: `SyncState::open` refuses a secondary's image, creates
            // metadata for an image without.
            0 if self.nodes[i].mode == Mode::Off => {
                match &self.nodes[i].meta {
                    Some(m) if m.role != Role::Primary => return Ok(()),
                    // Served although not up to date: the known finding.
                    Some(m) if m.disk_state != DiskState::UpToDate => self.nodes[i].tainted = true,
                    Some(_) => {}
                    None => {
                        let g = self.fresh_generation();
                        self.nodes[i].meta = Some(Meta {
                            role: Role::Primary,
                            disk_state: DiskState::UpToDate,
                            generation: g,
                            bitmap_generation: 0,
                            history: Vec::new(),
                        });
                        self.nodes[i].dirty = false;
                    }
                }
                self.nodes[i].mode = Mode::Primary;
                self.log.push(format!("{side}: vhost-mirror serve"));
            }
            // access-node serve [--discard-my-data].
            1 if self.nodes[i].mode == Mode::Off => {
                let discard = u.arbitrary()?;
                self.nodes[i].mode = Mode::Replica { discard };
                self.log.push(format!(
                    "{side}: access-node serve{}",
                    if discard { " --discard-my-data" } else { "" }
                ));
            }
            // Stop or crash (the model loses no data: power loss is the fault tier's).
            2 if self.nodes[i].mode != Mode::Off => {
                if self.link.is_some() {
                    self.drop_link();
                }
                self.nodes[i].mode = Mode::Off;
                self.log.push(format!("{side}: stopped"));
            }
            // The primary i attaches to j's access node (`serve_link`).
            3 if self.nodes[i].mode == Mode::Primary
                && matches!(self.nodes[j].mode, Mode::Replica { .. })
                && self.link.is_none() =>
            {
                if self.nodes[j].meta.is_none() {
                    // `Replica::attach`.
                    self.nodes[j].meta = Some(Meta {
                        role: Role::Secondary,
                        disk_state: DiskState::Inconsistent,
                        generation: 0,
                        bitmap_generation: 0,
                        history: Vec::new(),
                    });
                }
                let d = self.check_pair(i, j);
                self.log
                    .push(format!("{side}: attached to the other: {d:?}"));
                match d {
                    SyncDecision::SplitBrain | SyncDecision::PeerNewer => return Ok(()),
                    SyncDecision::Full => {
                        self.nodes[i].dirty = true;
                        let rg = self.info(j, false).generation;
                        let bmg = self.nodes[i]
                            .meta
                            .as_ref()
                            .map_or(0, |m| m.bitmap_generation);
                        if bmg != rg {
                            self.new_generation_for_bitmap(i, rg);
                        }
                    }
                    SyncDecision::InSync | SyncDecision::Partial => {}
                }
                let syncing = d != SyncDecision::InSync || self.nodes[i].dirty;
                if syncing {
                    // SyncStart: the replica is inconsistent; its own writes are given up
                    // (the decision allowed it).
                    let m = self.nodes[j].meta.as_mut().expect("attached");
                    m.disk_state = DiskState::Inconsistent;
                    let pd = self.nodes[i].data.clone();
                    self.nodes[j].data.retain(|w| pd.contains(w));
                }
                self.link = Some(Link {
                    primary: i,
                    syncing,
                    unflushed: BTreeSet::new(),
                });
            }
            // A guest write on the primary i.
            4 if self.nodes[i].mode == Mode::Primary => {
                self.next_write += 1;
                let w = self.next_write;
                self.nodes[i].data.insert(w);
                match &mut self.link {
                    Some(l) if l.primary == i => {
                        l.unflushed.insert(w);
                        self.nodes[j].data.insert(w);
                    }
                    _ => self.mark(i),
                }
                self.log.push(format!("{side}: write {w}"));
            }
            // The resync completes: SyncDone (`Replica::sync_done`, `resync_finished`).
            5 => {
                let Some(l) = self.link.as_mut().filter(|l| l.syncing) else {
                    return Ok(());
                };
                l.syncing = false;
                l.unflushed.clear(); // SyncDone follows the replica's fdatasync
                let (p, r) = (l.primary, 1 - l.primary);
                self.nodes[r].data = self.nodes[p].data.clone();
                self.nodes[r].given_up = false;
                self.nodes[r].tainted = false;
                let g = self.nodes[p].meta.as_ref().expect("primary").generation;
                let m = self.nodes[r].meta.as_mut().expect("attached");
                if m.generation != g {
                    push_history(&mut m.history, m.generation, MAX_HISTORY);
                }
                m.generation = g;
                m.disk_state = DiskState::UpToDate;
                m.role = Role::Secondary;
                m.bitmap_generation = 0;
                if let Mode::Replica { discard } = &mut self.nodes[r].mode {
                    *discard = false;
                }
                self.nodes[p].dirty = false;
                self.nodes[p]
                    .meta
                    .as_mut()
                    .expect("primary")
                    .bitmap_generation = 0;
                self.log.push("resync done".into());
            }
            // A replica Flush.
            6 => {
                if let Some(l) = &mut self.link {
                    l.unflushed.clear();
                    self.log.push("replica flushed".into());
                }
            }
            // The link fails (network).
            7 if self.link.is_some() => {
                self.drop_link();
                self.log.push("link failed".into());
            }
            // A write the replica fails: it records itself outdated, the link ends, the
            // primary marks the write.
            8 => {
                let Some(p) = self.link.as_ref().map(|l| l.primary) else {
                    return Ok(());
                };
                let r = 1 - p;
                self.next_write += 1;
                let w = self.next_write;
                self.nodes[p].data.insert(w);
                let m = self.nodes[r].meta.as_mut().expect("attached");
                if m.disk_state == DiskState::UpToDate {
                    m.disk_state = DiskState::Outdated;
                }
                self.drop_link();
                self.mark(p);
                self.log.push(format!("write {w} failed on the replica"));
            }
            // The replica's host loses power: it loses what it had not flushed.
            9 => {
                let Some(l) = &self.link else {
                    return Ok(());
                };
                let r = 1 - l.primary;
                let lost = l.unflushed.clone();
                self.nodes[r].data.retain(|w| !lost.contains(w));
                self.drop_link();
                self.nodes[r].mode = Mode::Off;
                self.log.push("replica power loss".into());
            }
            // access-node promote [--force] (offline, or through the running access node,
            // which fences its primary and lets the image go).
            10 if self.nodes[i].mode != Mode::Primary => {
                let force: bool = u.arbitrary()?;
                let up_to_date = self.nodes[i]
                    .meta
                    .as_ref()
                    .is_some_and(|m| m.disk_state == DiskState::UpToDate);
                if !up_to_date && !force {
                    return Ok(());
                }
                if self.link.is_some() {
                    self.drop_link();
                }
                self.nodes[i].mode = Mode::Off;
                self.log.push(format!(
                    "{side}: promote{}",
                    if force { " --force" } else { "" }
                ));
                if self.nodes[i]
                    .meta
                    .as_ref()
                    .is_some_and(|m| up_to_date && m.role == Role::Primary)
                {
                    return Ok(());
                }
                let g = self.fresh_generation();
                let n = &mut self.nodes[i];
                let mut m = n.meta.clone().unwrap_or(Meta {
                    role: Role::Secondary,
                    disk_state: DiskState::Inconsistent,
                    generation: 0,
                    bitmap_generation: 0,
                    history: Vec::new(),
                });
                let previous = m.generation;
                push_history(&mut m.history, previous, MAX_HISTORY);
                m.generation = g;
                m.bitmap_generation = if up_to_date { previous } else { 0 };
                m.role = Role::Primary;
                m.disk_state = DiskState::UpToDate;
                n.meta = Some(m);
                n.dirty = false;
            }
            // The operator deletes IMG.meta (ends the pairing; the image's data is given up
            // to the next pairing).
            11 if self.nodes[i].mode == Mode::Off => {
                self.nodes[i].meta = None;
                self.nodes[i].dirty = false;
                self.nodes[i].given_up = true;
                self.nodes[i].tainted = false;
                self.log.push(format!("{side}: metadata deleted"));
            }
            _ => return Ok(()),
        }
        self.check();
        Ok(())
    }
}

pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let node = || Node {
        meta: None,
        data: BTreeSet::new(),
        dirty: false,
        mode: Mode::Off,
        given_up: false,
        tainted: false,
    };
    let mut w = World {
        nodes: [node(), node()],
        link: None,
        next_generation: 0,
        next_write: 0,
        log: Vec::new(),
    };
    for _ in 0..64 {
        if u.is_empty() || w.step(&mut u).is_err() {
            break;
        }
    }
}
