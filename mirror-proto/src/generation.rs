//! Generation identifiers: at connect time, who has which data, and what must be copied.
//!
//! Each node records a current generation, the generations before it (history), and on the
//! primary the generation its out-of-sync bitmap is relative to. A primary starts a new
//! generation whenever it writes something its peer may not have (the first out-of-sync bit),
//! so two equal generations mean identical data (the patent's timestamp comparison).

use crate::frame::{DiskState, NodeInfo, Role, NODE_FLAG_DISCARD_MY_DATA};

/// What the primary must do with a replica that just attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncDecision {
    /// Same generation: identical data, nothing to copy.
    InSync,
    /// The replica is at the generation our bitmap starts from: copy the bitmap's regions.
    Partial,
    /// Everything must be copied (new, unknown or too old a replica).
    Full,
    /// Both sides wrote since they last agreed; nothing may be overwritten.
    SplitBrain,
    /// The replica has newer data than the primary; the primary must not overwrite it.
    PeerNewer,
}

/// Compares the primary's state with the replica's.
pub fn decide(primary: &NodeInfo, replica: &NodeInfo) -> SyncDecision {
    let r = replica.generation;
    if replica.size == 0 || r == 0 {
        return SyncDecision::Full;
    }
    if r == primary.generation && replica.disk_state == DiskState::UpToDate {
        return SyncDecision::InSync;
    }
    if primary.bitmap_generation != 0 && r == primary.bitmap_generation {
        return SyncDecision::Partial;
    }
    if primary.history.contains(&r) {
        // An older state of ours, but the bitmap does not reach back that far.
        return SyncDecision::Full;
    }
    let replica_discards = replica.flags & NODE_FLAG_DISCARD_MY_DATA != 0;
    if replica.history.contains(&primary.generation) {
        return if replica_discards {
            SyncDecision::Full
        } else {
            SyncDecision::PeerNewer
        };
    }
    // Unrelated histories. A replica that was never a primary holds nothing of its own: copy.
    // One that was a primary and wrote on its own is a split brain, unless its operator said
    // its data may go (`access-node serve --discard-my-data`).
    if replica.role == Role::Primary && !replica_discards {
        SyncDecision::SplitBrain
    } else {
        SyncDecision::Full
    }
}

/// Pushes `old` onto a history list, newest first, keeping at most `max` entries.
pub fn push_history(history: &mut Vec<u64>, old: u64, max: usize) {
    if old == 0 {
        return;
    }
    history.retain(|g| *g != old);
    history.insert(0, old);
    history.truncate(max);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(role: Role, generation: u64, bitmap_generation: u64, history: Vec<u64>) -> NodeInfo {
        NodeInfo {
            node_id: 1,
            size: 1 << 20,
            role,
            disk_state: DiskState::UpToDate,
            generation,
            bitmap_generation,
            history,
            flags: 0,
            hot: vec![],
        }
    }

    #[test]
    fn equal_generations_need_no_copy() {
        let p = node(Role::Primary, 5, 0, vec![4]);
        let r = node(Role::Secondary, 5, 0, vec![4]);
        assert_eq!(decide(&p, &r), SyncDecision::InSync);
    }

    #[test]
    fn inconsistent_replica_at_same_generation_is_not_in_sync() {
        let p = node(Role::Primary, 5, 5, vec![]);
        let r = NodeInfo {
            disk_state: DiskState::Inconsistent,
            ..node(Role::Secondary, 5, 0, vec![])
        };
        assert_eq!(decide(&p, &r), SyncDecision::Partial);
    }

    #[test]
    fn replica_at_bitmap_generation_gets_partial() {
        let p = node(Role::Primary, 6, 5, vec![5, 4]);
        let r = node(Role::Secondary, 5, 0, vec![4]);
        assert_eq!(decide(&p, &r), SyncDecision::Partial);
    }

    #[test]
    fn new_old_or_unknown_replicas_get_full() {
        let p = node(Role::Primary, 6, 5, vec![5, 4]);
        assert_eq!(
            decide(&p, &node(Role::Secondary, 0, 0, vec![])),
            SyncDecision::Full
        );
        assert_eq!(
            decide(&p, &node(Role::Secondary, 4, 0, vec![])),
            SyncDecision::Full
        );
        assert_eq!(
            decide(&p, &node(Role::Secondary, 99, 0, vec![98])),
            SyncDecision::Full
        );
        let empty = NodeInfo {
            size: 0,
            ..node(Role::Secondary, 6, 0, vec![])
        };
        assert_eq!(decide(&p, &empty), SyncDecision::Full);
    }

    #[test]
    fn newer_peer_is_not_overwritten() {
        let p = node(Role::Primary, 5, 0, vec![4]);
        let r = node(Role::Secondary, 7, 0, vec![6, 5]);
        assert_eq!(decide(&p, &r), SyncDecision::PeerNewer);
        let r = NodeInfo {
            flags: NODE_FLAG_DISCARD_MY_DATA,
            ..r
        };
        assert_eq!(decide(&p, &r), SyncDecision::Full);
    }

    #[test]
    fn both_promoted_is_split_brain_until_resolved() {
        // Both started from generation 5 and wrote on their own.
        let p = node(Role::Primary, 8, 5, vec![5]);
        let r = node(Role::Primary, 9, 5, vec![5]);
        assert_eq!(decide(&p, &r), SyncDecision::SplitBrain);
        let r2 = NodeInfo {
            flags: NODE_FLAG_DISCARD_MY_DATA,
            ..r.clone()
        };
        assert_eq!(decide(&p, &r2), SyncDecision::Full);
    }

    #[test]
    fn failback_to_the_crashed_old_primary_is_partial() {
        // The replica (generation 5) was promoted: generation 6, bitmap relative to 5.
        let p = node(Role::Primary, 6, 5, vec![5, 4]);
        // The old primary comes back as an access node, still at 5 and still "primary".
        let old = node(Role::Primary, 5, 0, vec![4]);
        assert_eq!(decide(&p, &old), SyncDecision::Partial);
        // Had it written on its own after the split (generation 7 from 5): split brain.
        let diverged = node(Role::Primary, 7, 5, vec![5, 4]);
        assert_eq!(decide(&p, &diverged), SyncDecision::SplitBrain);
    }

    #[test]
    fn history_is_bounded_and_deduplicated() {
        let mut h = vec![];
        for g in [1, 2, 3, 2, 0] {
            push_history(&mut h, g, 3);
        }
        assert_eq!(h, vec![2, 3, 1]);
        push_history(&mut h, 4, 3);
        assert_eq!(h, vec![4, 2, 3]);
    }
}
