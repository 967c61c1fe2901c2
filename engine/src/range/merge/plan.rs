//! A merge's decisions, as pure functions over plain data: which neighbour to take over,
//! what to do next given both ranges as their leaders applied them, which replica to move
//! for colocation, whether an orphaned freeze may be thawed, the requests each step sends,
//! and which pairs automatic merging picks. Nothing here calls another node or reads a
//! disk; the coordinator in the parent module carries the decisions out.

use std::collections::{BTreeSet, HashMap, HashSet};

use spheredb_client::proto::v1::{MergeStep, MergeStepRequest};
use spheredb_client::ClientError;
use spheredb_raft::{MergeFreeze, NodeId, RangeId, RangeRecord};

use crate::descriptor::wire_descriptor;
use crate::ids::META_RANGE_ID;
use crate::meta::RangeLoad;

/// A range as its leader last applied it.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveRange {
    pub record: RangeRecord,
    pub frozen: Option<MergeFreeze>,
}

impl LiveRange {
    /// The nodes holding a voter of the range.
    pub fn voter_nodes(&self) -> BTreeSet<NodeId> {
        self.record
            .replicas
            .iter()
            .filter(|r| r.voter)
            .map(|r| r.node_id)
            .collect()
    }

    /// The nodes holding a learner of the range.
    pub fn learner_nodes(&self) -> Vec<NodeId> {
        self.record
            .replicas
            .iter()
            .filter(|r| !r.voter)
            .map(|r| r.node_id)
            .collect()
    }
}

/// One replica change of `range_id` bringing the two ranges onto the same nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaMove {
    pub range_id: RangeId,
    pub add: Option<NodeId>,
    pub remove: Option<NodeId>,
}

/// What a merge does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MergeNext {
    /// Move one replica; the step after reads both ranges again.
    Move(ReplicaMove),
    /// Freeze the right range for this merge, then finish.
    Freeze(MergeFreeze),
    /// The right range is frozen for this merge and everything still fits: wait until every
    /// replica applied the freeze, then merge.
    Finish,
    /// The right range is frozen for a merge that can no longer happen as planned: undo the
    /// freeze; the step after reads both ranges again.
    Abandon,
}

/// The range `left_id` takes over: `expected_right` by id when named (a range frozen into
/// `left_id` is settled even if `left_id` changed shape since), else its right neighbour.
/// `Ok(None)` when `left_id` no longer exists.
pub fn pick_pair(
    records: &[RangeRecord],
    left_id: RangeId,
    expected_right: Option<RangeId>,
) -> Result<Option<(RangeRecord, RangeRecord)>, ClientError> {
    if left_id == META_RANGE_ID {
        return Err(ClientError::InvalidArgument(
            "the meta range (range 1) holds system keys and does not merge".into(),
        ));
    }
    let by_id = |id: RangeId| records.iter().find(|r| r.span.range_id == id).cloned();
    let Some(left) = by_id(left_id) else {
        return Ok(None);
    };
    let right = match expected_right {
        Some(id) => by_id(id).ok_or_else(|| {
            ClientError::InvalidArgument(format!("range {id} does not exist (merged already?)"))
        })?,
        None => records
            .iter()
            .find(|r| !left.span.end_key.is_empty() && r.span.start_key == left.span.end_key)
            .cloned()
            .ok_or_else(|| {
                ClientError::InvalidArgument(format!(
                    "range {left_id} is the last range; there is nothing to merge it with"
                ))
            })?,
    };
    Ok(Some((left, right)))
}

/// The next step of merging `l` with `r`, both as their leaders applied them. `planned` is
/// the right range as the merge was planned on (from the meta range), and
/// `merge_pending_into_right` whether some range is reported frozen for a merge into `r`.
/// An `InvalidArgument` error means the merge no longer applies; any other is worth a retry.
pub fn next_step(
    l: &LiveRange,
    r: &LiveRange,
    planned: &RangeRecord,
    merge_pending_into_right: bool,
) -> Result<MergeNext, ClientError> {
    let (left_id, right_id) = (l.record.span.range_id, r.record.span.range_id);
    let left_generation = l.record.span.generation;
    // A frozen right range is settled first, whatever the left range looks like now.
    if let Some(freeze) = r.frozen {
        if freeze.into != left_id {
            return Err(ClientError::Unavailable(format!(
                "range {right_id} is frozen for a merge into range {}",
                freeze.into
            )));
        }
        let adjacent = l.record.span.end_key == r.record.span.start_key;
        if freeze.left_generation == left_generation && adjacent && colocated(l, r) {
            return Ok(MergeNext::Finish);
        }
        return Ok(MergeNext::Abandon);
    }
    if l.record.span.end_key != planned.span.start_key {
        return Err(ClientError::InvalidArgument(format!(
            "range {left_id} no longer ends where range {right_id} starts"
        )));
    }
    if merge_pending_into_right {
        return Err(ClientError::Unavailable(format!(
            "a range is frozen for a merge into range {right_id}; that merge goes first"
        )));
    }
    Ok(match colocation_move(l, r) {
        Some(m) => MergeNext::Move(m),
        None => MergeNext::Freeze(MergeFreeze {
            into: left_id,
            left_generation,
        }),
    })
}

/// True when both ranges have voters on exactly the same nodes and no learners.
pub fn colocated(l: &LiveRange, r: &LiveRange) -> bool {
    l.voter_nodes() == r.voter_nodes()
        && l.learner_nodes().is_empty()
        && r.learner_nodes().is_empty()
}

/// One replica change bringing the ranges' replicas onto the same nodes; `None` once they
/// are colocated. The right range moves to the left one's voters.
pub fn colocation_move(l: &LiveRange, r: &LiveRange) -> Option<ReplicaMove> {
    let (want, have) = (l.voter_nodes(), r.voter_nodes());
    let (left_id, right_id) = (l.record.span.range_id, r.record.span.range_id);
    let remove = |range_id, node| ReplicaMove {
        range_id,
        add: None,
        remove: Some(node),
    };
    // Learners first: left over from an interrupted move, they would block every change.
    if let Some(&n) = l.learner_nodes().first() {
        Some(remove(left_id, n))
    } else if let Some(&n) = r.learner_nodes().first() {
        Some(remove(right_id, n))
    } else if let Some(&n) = want.difference(&have).next() {
        Some(ReplicaMove {
            range_id: right_id,
            add: Some(n),
            remove: None,
        })
    } else {
        have.difference(&want).next().map(|&n| remove(right_id, n))
    }
}

/// True when `node`'s replica of the right range applied exactly the freeze into `l`.
pub fn applied_this_freeze(applied: Option<MergeFreeze>, l: &LiveRange) -> bool {
    applied
        == Some(MergeFreeze {
            into: l.record.span.range_id,
            left_generation: l.record.span.generation,
        })
}

/// The freeze to undo on `right` (as its leader applied it), frozen into `left_id`, a range
/// that no longer exists: its last state was frozen, so it can never apply the merge. `None`
/// when `right` is not frozen into `left_id`, or when a newer range of `records` covers
/// `right`'s keys (the left range did take it over before it went, so `right`'s replicas are
/// collected as merged away and nothing may be thawed).
pub fn orphan_freeze(
    left_id: RangeId,
    right: &LiveRange,
    planned: &RangeRecord,
    records: &[RangeRecord],
) -> Option<MergeFreeze> {
    let freeze = right.frozen.filter(|f| f.into == left_id)?;
    let taken_over = records.iter().any(|s| {
        s.span.range_id != planned.span.range_id
            && s.span.generation > planned.span.generation
            && s.span.overlaps(&planned.span)
    });
    (!taken_over).then_some(freeze)
}

/// The `Freeze` step, sent to the right range's leader.
pub fn freeze_request(r: &LiveRange, freeze: MergeFreeze) -> MergeStepRequest {
    MergeStepRequest {
        step: MergeStep::Freeze as i32,
        range_id: r.record.span.range_id,
        expected_generation: r.record.span.generation,
        into: freeze.into,
        left_generation: freeze.left_generation,
        right: None,
    }
}

/// The `Merge` step, sent to the left range's leader.
pub fn merge_request(l: &LiveRange, r: &LiveRange) -> MergeStepRequest {
    MergeStepRequest {
        step: MergeStep::Merge as i32,
        range_id: l.record.span.range_id,
        expected_generation: l.record.span.generation,
        into: 0,
        left_generation: 0,
        right: Some(wire_descriptor(&r.record)),
    }
}

/// The `Abort` step for `freeze`, sent to the left range's leader: it moves the left range
/// to a new generation unless the merge already happened.
pub fn abort_request(l: &LiveRange, r: &LiveRange, freeze: MergeFreeze) -> MergeStepRequest {
    MergeStepRequest {
        step: MergeStep::Abort as i32,
        range_id: l.record.span.range_id,
        expected_generation: 0,
        into: 0,
        left_generation: freeze.left_generation,
        right: Some(wire_descriptor(&r.record)),
    }
}

/// The `Thaw` step for exactly `freeze`, sent to the right range's leader.
pub fn thaw_request(right_id: RangeId, freeze: MergeFreeze) -> MergeStepRequest {
    MergeStepRequest {
        step: MergeStep::Thaw as i32,
        range_id: right_id,
        expected_generation: 0,
        into: freeze.into,
        left_generation: freeze.left_generation,
        right: None,
    }
}

/// What automatic merging asks of a range and its right neighbour.
#[derive(Debug, Clone, Copy)]
pub struct MergePolicy {
    /// Each range, and the two together, must be smaller than this.
    pub max_size_bytes: u64,
    /// Each range must serve fewer requests per second than this.
    pub max_qps: f64,
    /// Each range's span must be unchanged for this long.
    pub min_span_age_ms: u64,
}

/// `(left, right)` neighbour pairs to merge, best (smallest together) first. A range without
/// a load report, or in `busy`, is left alone; so is the meta range, and so is a range with a
/// replica on a node that `reachable` says is not reporting: a merge freezes the right range
/// until every node of the left one confirms, so with a node down it would only freeze the
/// pair (UNAVAILABLE for its keys) and undo it, again and again.
pub fn merge_candidates(
    records: &[RangeRecord],
    loads: &HashMap<RangeId, RangeLoad>,
    span_age_ms: &dyn Fn(&RangeRecord) -> u64,
    reachable: &dyn Fn(NodeId) -> bool,
    busy: &HashSet<RangeId>,
    policy: MergePolicy,
) -> Vec<(RangeId, RangeId)> {
    if policy.max_size_bytes == 0 {
        return Vec::new();
    }
    let mut sorted: Vec<&RangeRecord> = records.iter().collect();
    sorted.sort_by(|a, b| a.span.start_key.cmp(&b.span.start_key));
    let cold = |r: &RangeRecord| {
        let id = r.span.range_id;
        id != META_RANGE_ID
            && !busy.contains(&id)
            && span_age_ms(r) >= policy.min_span_age_ms
            && r.replicas.iter().all(|x| reachable(x.node_id))
            && loads
                .get(&id)
                .is_some_and(|l| l.size_bytes < policy.max_size_bytes && l.qps < policy.max_qps)
    };
    let mut pairs: Vec<(u64, RangeId, RangeId)> = sorted
        .windows(2)
        .filter(|w| w[0].span.end_key == w[1].span.start_key && !w[0].span.end_key.is_empty())
        .filter(|w| cold(w[0]) && cold(w[1]))
        .filter_map(|w| {
            let size = |r: &RangeRecord| loads.get(&r.span.range_id).map_or(0, |l| l.size_bytes);
            let total = size(w[0]) + size(w[1]);
            (total < policy.max_size_bytes).then_some((
                total,
                w[0].span.range_id,
                w[1].span.range_id,
            ))
        })
        .collect();
    pairs.sort();
    // A range takes part in one merge at a time.
    let mut taken = HashSet::new();
    let mut out = Vec::new();
    for (_, left, right) in pairs {
        if taken.contains(&left) || taken.contains(&right) {
            continue;
        }
        taken.extend([left, right]);
        out.push((left, right));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use spheredb_raft::{RangeSpan, ReplicaRecord};

    fn range(id: RangeId, start: &[u8], end: &[u8]) -> RangeRecord {
        RangeRecord {
            span: RangeSpan {
                range_id: id,
                start_key: start.to_vec(),
                end_key: end.to_vec(),
                generation: 1,
                next_replica_id: 4,
            },
            replicas: (1..=3)
                .map(|n| ReplicaRecord {
                    replica_id: n,
                    node_id: n,
                    voter: true,
                })
                .collect(),
        }
    }

    fn load(size_bytes: u64, qps: f64) -> RangeLoad {
        RangeLoad {
            leader_node: Some(1),
            size_bytes,
            qps,
        }
    }

    const POLICY: MergePolicy = MergePolicy {
        max_size_bytes: 1000,
        max_qps: 10.0,
        min_span_age_ms: 5_000,
    };

    fn ranges() -> Vec<RangeRecord> {
        vec![
            range(1, b"", b"\x01"),
            range(2, b"\x01", b"\x02a"),
            range(3, b"\x02a", b"\x02m"),
            range(4, b"\x02m", b"\x02t"),
            range(5, b"\x02t", b""),
        ]
    }

    /// The pairs picked among [`ranges`] with `loads`, every span old enough, every node
    /// live, nothing busy, under [`POLICY`].
    fn settled_pairs(loads: &HashMap<RangeId, RangeLoad>) -> Vec<(RangeId, RangeId)> {
        merge_candidates(
            &ranges(),
            loads,
            &|_| 10_000,
            &|_| true,
            &HashSet::new(),
            POLICY,
        )
    }

    #[test]
    fn small_cold_neighbours_merge_smallest_pair_first() {
        let loads = HashMap::from([
            (1, load(10, 0.0)),
            (2, load(400, 0.0)),
            (3, load(300, 0.0)),
            (4, load(100, 0.0)),
            (5, load(100, 0.0)),
        ]);
        let picked = settled_pairs(&loads);
        // 4+5 (200 bytes) first; 3 then pairs with 2 (700), since 4 is taken.
        assert_eq!(picked, vec![(4, 5), (2, 3)]);
    }

    #[test]
    fn hot_young_big_busy_and_meta_ranges_do_not_merge() {
        let loads = HashMap::from([
            (1, load(10, 0.0)),
            (2, load(10, 0.0)),
            (3, load(10, 50.0)),
            (4, load(600, 0.0)),
            (5, load(600, 0.0)),
        ]);
        // 1 is the meta range, 3 is hot, 4+5 are too big together.
        let picked = settled_pairs(&loads);
        assert!(picked.is_empty(), "{picked:?}");
        let loads = HashMap::from([(2, load(10, 0.0)), (3, load(10, 0.0)), (4, load(10, 0.0))]);
        let young = |r: &RangeRecord| if r.span.range_id == 3 { 100 } else { 10_000 };
        assert!(merge_candidates(
            &ranges(),
            &loads,
            &young,
            &|_| true,
            &HashSet::new(),
            POLICY
        )
        .is_empty());
        let busy = HashSet::from([3]);
        assert!(
            merge_candidates(&ranges(), &loads, &|_| 10_000, &|_| true, &busy, POLICY).is_empty()
        );
        let all = settled_pairs(&loads);
        assert_eq!(all, vec![(2, 3)]);
        let off = MergePolicy {
            max_size_bytes: 0,
            ..POLICY
        };
        assert!(merge_candidates(
            &ranges(),
            &loads,
            &|_| 10_000,
            &|_| true,
            &HashSet::new(),
            off
        )
        .is_empty());
    }

    #[test]
    fn pairs_with_a_replica_on_a_silent_node_do_not_merge() {
        let loads = HashMap::from([(2, load(10, 0.0)), (3, load(10, 0.0))]);
        let node_3_down = |n: NodeId| n != 3;
        let picked = merge_candidates(
            &ranges(),
            &loads,
            &|_| 10_000,
            &node_3_down,
            &HashSet::new(),
            POLICY,
        );
        assert!(picked.is_empty(), "{picked:?}");
    }

    fn live(id: RangeId, start: &[u8], end: &[u8], voters: &[NodeId]) -> LiveRange {
        let mut record = range(id, start, end);
        record.replicas = voters
            .iter()
            .map(|n| ReplicaRecord {
                replica_id: *n,
                node_id: *n,
                voter: true,
            })
            .collect();
        LiveRange {
            record,
            frozen: None,
        }
    }

    fn freeze(into: RangeId, left_generation: u64) -> Option<MergeFreeze> {
        Some(MergeFreeze {
            into,
            left_generation,
        })
    }

    #[test]
    fn colocated_unfrozen_neighbours_freeze_the_right_range_at_the_left_generation() {
        let (l, r) = (
            live(2, b"a", b"m", &[1, 2, 3]),
            live(3, b"m", b"", &[3, 2, 1]),
        );
        let next = next_step(&l, &r, &r.record, false).unwrap();
        assert_eq!(next, MergeNext::Freeze(freeze(2, 1).unwrap()));
    }

    #[test]
    fn replicas_move_learners_first_then_right_adds_before_removes() {
        let mut l = live(2, b"a", b"m", &[1, 2, 3]);
        let mut r = live(3, b"m", b"", &[1, 2, 4]);
        l.record.replicas[2].voter = false;
        let m = |range_id, add, remove| ReplicaMove {
            range_id,
            add,
            remove,
        };
        assert_eq!(colocation_move(&l, &r), Some(m(2, None, Some(3))));
        l.record.replicas[2].voter = true;
        r.record.replicas[0].voter = false;
        assert_eq!(colocation_move(&l, &r), Some(m(3, None, Some(1))));
        r.record.replicas[0].voter = true;
        assert_eq!(colocation_move(&l, &r), Some(m(3, Some(3), None)));
        let r = live(3, b"m", b"", &[1, 2, 3, 4]);
        assert_eq!(colocation_move(&l, &r), Some(m(3, None, Some(4))));
        let r = live(3, b"m", b"", &[1, 2, 3]);
        assert_eq!(colocation_move(&l, &r), None);
        assert!(colocated(&l, &r));
        assert_eq!(
            next_step(&l, &live(3, b"m", b"", &[1, 2, 4]), &r.record, false).unwrap(),
            MergeNext::Move(m(3, Some(3), None))
        );
    }

    #[test]
    fn a_frozen_right_range_is_finished_only_while_the_freeze_still_fits() {
        let l = live(2, b"a", b"m", &[1, 2, 3]);
        let mut r = live(3, b"m", b"", &[1, 2, 3]);
        r.frozen = freeze(2, 1);
        assert_eq!(
            next_step(&l, &r, &r.record, false).ok(),
            Some(MergeNext::Finish)
        );
        // Pending merges into the right range do not matter once it is frozen into ours.
        assert_eq!(
            next_step(&l, &r, &r.record, true).ok(),
            Some(MergeNext::Finish)
        );
        // The left range moved on since the freeze: the merge would be refused.
        r.frozen = freeze(2, 0);
        assert_eq!(
            next_step(&l, &r, &r.record, false).ok(),
            Some(MergeNext::Abandon)
        );
        // No longer colocated, or no longer adjacent: undo as well.
        r.frozen = freeze(2, 1);
        let moved = live(3, b"m", b"", &[1, 2, 4]);
        let moved = LiveRange {
            frozen: r.frozen,
            ..moved
        };
        assert_eq!(
            next_step(&l, &moved, &r.record, false).ok(),
            Some(MergeNext::Abandon)
        );
        let apart = LiveRange {
            frozen: r.frozen,
            ..live(3, b"n", b"", &[1, 2, 3])
        };
        assert_eq!(
            next_step(&l, &apart, &r.record, false).ok(),
            Some(MergeNext::Abandon)
        );
    }

    #[test]
    fn a_right_range_frozen_into_another_range_or_awaiting_a_merge_itself_is_retried_later() {
        let l = live(2, b"a", b"m", &[1, 2, 3]);
        let mut r = live(3, b"m", b"", &[1, 2, 3]);
        r.frozen = freeze(9, 1);
        assert!(matches!(
            next_step(&l, &r, &r.record, false),
            Err(ClientError::Unavailable(_))
        ));
        r.frozen = None;
        assert!(matches!(
            next_step(&l, &r, &r.record, true),
            Err(ClientError::Unavailable(_))
        ));
    }

    #[test]
    fn a_left_range_that_no_longer_ends_at_the_planned_right_range_does_not_merge() {
        let l = live(2, b"a", b"k", &[1, 2, 3]);
        let r = live(3, b"m", b"", &[1, 2, 3]);
        assert!(matches!(
            next_step(&l, &r, &r.record, false),
            Err(ClientError::InvalidArgument(_))
        ));
    }

    #[test]
    fn the_pair_is_the_named_right_range_or_else_the_right_neighbour() {
        let records = ranges();
        let (l, r) = pick_pair(&records, 3, None).unwrap().unwrap();
        assert_eq!((l.span.range_id, r.span.range_id), (3, 4));
        let (_, r) = pick_pair(&records, 3, Some(5)).unwrap().unwrap();
        assert_eq!(r.span.range_id, 5, "a named range is taken by id");
        assert!(pick_pair(&records, 9, None).unwrap().is_none());
        assert!(matches!(
            pick_pair(&records, 5, None),
            Err(ClientError::InvalidArgument(_))
        ));
        assert!(matches!(
            pick_pair(&records, 3, Some(9)),
            Err(ClientError::InvalidArgument(_))
        ));
        assert!(matches!(
            pick_pair(&records, META_RANGE_ID, None),
            Err(ClientError::InvalidArgument(_))
        ));
    }

    #[test]
    fn an_orphaned_freeze_is_thawed_only_when_no_newer_range_holds_its_keys() {
        let mut r = live(4, b"\x02m", b"\x02t", &[1, 2, 3]);
        r.frozen = freeze(3, 1);
        let records = ranges();
        assert_eq!(orphan_freeze(3, &r, &r.record, &records), freeze(3, 1));
        assert_eq!(
            orphan_freeze(7, &r, &r.record, &records),
            None,
            "frozen into 3"
        );
        let mut newer = records.clone();
        newer[2].span.end_key = b"\x02t".to_vec();
        newer[2].span.generation = 2;
        assert_eq!(orphan_freeze(3, &r, &r.record, &newer), None);
    }

    #[test]
    fn only_this_freeze_counts_as_applied() {
        let l = live(2, b"a", b"m", &[1]);
        assert!(applied_this_freeze(freeze(2, 1), &l));
        assert!(!applied_this_freeze(freeze(2, 0), &l));
        assert!(!applied_this_freeze(freeze(5, 1), &l));
        assert!(!applied_this_freeze(None, &l));
    }
}
