//! Merges: a range takes over its right neighbour, run by the meta-range leader.
//!
//! The steps, each safe to repeat and each checked against the ranges' own applied state:
//!
//! 1. **Colocate.** The right range's replicas move (add, then remove, one change at a time)
//!    onto exactly the nodes of the left range's voters, so every node that will hold the
//!    merged range already holds both halves' data.
//! 2. **Freeze** the right range (one Raft command): from then on it applies no write and
//!    serves no read, so its data is final. Clients see a retryable error.
//! 3. **Wait** until every replica of the right range has applied the freeze.
//! 4. **Merge** (one Raft command on the left range): its span widens over the right range,
//!    its generation moves past both. Each node then stops its right-hand replica, keeping
//!    the data, which the left range now owns. The meta range's copy is rewritten at once.
//!
//! A merge that cannot finish is undone only after an `AbortMerge` command moved the left
//! range to a new generation: a `Merge` still in flight then fails on every replica, so the
//! right range can be thawed without two ranges ever owning the same keys.
//!
//! [`merge_candidates`] picks pairs for automatic merges: small, cold neighbours whose
//! spans have not changed for a while.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use spheredb_client::proto::v1::{
    ChangeReplicasRequest, MergeStep, MergeStepRequest, MergeStepResponse, RangeStatus,
    StatusRequest,
};
use spheredb_client::ClientError;
use spheredb_raft::registry;
use spheredb_raft::{MergeFreeze, NodeId, RangeId, RangeRecord, WriteOp};
use tokio::sync::watch;

use crate::errors::internal;
use crate::meta::{write_meta, RangeLoad};
use crate::node::{wire_descriptor, NodeShared, META_RANGE_ID, PEER_CALL_TIMEOUT_MS};

/// Longest one merge may take, moving replicas included.
pub const MERGE_TIMEOUT_MS: u64 = 90_000;
/// Most steps (replica moves, freeze, merge, retries) one merge takes before giving up.
pub const MAX_MERGE_STEPS: usize = 24;
/// Longest the merge waits for every replica of the right range to apply the freeze before
/// it thaws the range again.
pub const FREEZE_CATCH_UP_TIMEOUT_MS: u64 = 10_000;
/// Pause between polls of a merge's progress.
const MERGE_POLL_MS: u64 = 100;
/// Longest one replica move of a merge may take (a snapshot included).
const MOVE_TIMEOUT_MS: u64 = 60_000;

/// Ranges one automatic-merge round asks to merge, at most.
pub const MAX_MERGES_PER_ROUND: usize = 1;
/// Automatic merges leave alone ranges with a replica on a node silent for this many node
/// heartbeat periods (long before the node counts as dead and its replicas are replaced).
pub const MERGE_NODE_SILENCE_HEARTBEATS: u64 = 3;
/// Period of the automatic-merge scan while it finds nothing to merge.
pub const MERGE_IDLE_SCAN_INTERVAL_MS: u64 = 10_000;

/// Marks ranges as busy in the allocator's in-flight set while a merge runs.
struct Busy<'a> {
    shared: &'a NodeShared,
    ranges: [RangeId; 2],
}

impl<'a> Busy<'a> {
    fn claim(shared: &'a NodeShared, ranges: [RangeId; 2]) -> Option<Busy<'a>> {
        shared
            .meta
            .claim(&ranges)
            .then_some(Busy { shared, ranges })
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.shared.meta.release(&self.ranges);
    }
}

/// A range as its leader last applied it.
#[derive(Debug, Clone)]
struct LiveRange {
    record: RangeRecord,
    frozen: Option<MergeFreeze>,
}

impl LiveRange {
    fn voter_nodes(&self) -> BTreeSet<NodeId> {
        self.record
            .replicas
            .iter()
            .filter(|r| r.voter)
            .map(|r| r.node_id)
            .collect()
    }

    fn learner_nodes(&self) -> Vec<NodeId> {
        self.record
            .replicas
            .iter()
            .filter(|r| !r.voter)
            .map(|r| r.node_id)
            .collect()
    }
}

/// Merges range `left_id` with its right neighbour; returns the merged range. Runs on the
/// meta-range leader.
pub async fn merge_ranges(
    shared: &NodeShared,
    left_id: RangeId,
    expected_right: Option<RangeId>,
) -> Result<RangeRecord, ClientError> {
    if left_id == META_RANGE_ID {
        return Err(ClientError::InvalidArgument(
            "the meta range (range 1) holds system keys and does not merge".into(),
        ));
    }
    let records = registry::ranges(&shared.db).map_err(internal)?;
    let by_id = |id: RangeId| records.iter().find(|r| r.span.range_id == id).cloned();
    let Some(left) = by_id(left_id) else {
        if let Some(right) = expected_right.and_then(by_id) {
            thaw_orphan(shared, left_id, &right, &records).await?;
        }
        return Err(ClientError::InvalidArgument(format!(
            "range {left_id} does not exist"
        )));
    };
    let right = match expected_right {
        // By id: a range frozen into this one is settled even if this one changed shape.
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
    let right_id = right.span.range_id;
    let Some(_busy) = Busy::claim(shared, [left_id, right_id]) else {
        return Err(ClientError::Unavailable(format!(
            "range {left_id} or {right_id} has a replica move or merge running; retry shortly"
        )));
    };
    let deadline = Instant::now() + Duration::from_millis(MERGE_TIMEOUT_MS);
    let mut last = ClientError::Unavailable("merge made no attempt".into());
    for _ in 0..MAX_MERGE_STEPS {
        if Instant::now() >= deadline {
            break;
        }
        // A deposed meta leader stops coordinating: the new one takes over frozen ranges.
        if !shared.meta_replica().is_some_and(|m| m.raft.is_leader()) {
            return Err(ClientError::Unavailable(
                "this node no longer leads the meta range; retry".into(),
            ));
        }
        // The meta copy drops the right range once the merged descriptor is reported.
        if registry::range(&shared.db, right_id)
            .map_err(internal)?
            .is_none()
        {
            if let Some(merged) = registry::range(&shared.db, left_id).map_err(internal)? {
                shared.meta.forget_frozen(right_id);
                return Ok(merged);
            }
        }
        match merge_step(shared, &left, &right).await {
            Ok(Some(merged)) => {
                record_merge(shared, &merged, right_id).await?;
                shared.meta.forget_frozen(right_id);
                shared.meta.count("merges");
                tracing::info!(left = left_id, right = right_id, "merge done");
                return Ok(merged);
            }
            Ok(None) => continue,
            Err(e @ ClientError::InvalidArgument(_)) => return Err(e),
            Err(e) => {
                tracing::info!(left = left_id, right = right_id, "merge step failed: {e}");
                last = e;
                tokio::time::sleep(Duration::from_millis(MERGE_POLL_MS * 5)).await;
            }
        }
    }
    Err(ClientError::Unavailable(format!(
        "merge of range {left_id} and {right_id} did not finish; last error: {last}"
    )))
}

/// Takes the merge one step further from the ranges' current state. `Some` once merged.
async fn merge_step(
    shared: &NodeShared,
    left: &RangeRecord,
    right: &RangeRecord,
) -> Result<Option<RangeRecord>, ClientError> {
    let l = live_range(shared, left).await?;
    let r = live_range(shared, right).await?;
    let (left_id, right_id) = (left.span.range_id, right.span.range_id);
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
        if freeze.left_generation == left_generation && adjacent && colocated(&l, &r) {
            return finish(shared, &l, &r).await;
        }
        // Thawed, the next step reads the ranges again.
        return abandon(shared, &l, &r).await;
    }
    if l.record.span.end_key != right.span.start_key {
        return Err(ClientError::InvalidArgument(format!(
            "range {left_id} no longer ends where range {right_id} starts"
        )));
    }
    if shared.meta.merge_pending_into(right_id) {
        return Err(ClientError::Unavailable(format!(
            "a range is frozen for a merge into range {right_id}; that merge goes first"
        )));
    }
    if !colocated(&l, &r) {
        colocate_one(shared, &l, &r).await?;
        return Ok(None);
    }
    let freeze = MergeStepRequest {
        step: MergeStep::Freeze as i32,
        range_id: right_id,
        expected_generation: r.record.span.generation,
        into: left_id,
        left_generation,
        right: None,
    };
    call_step(shared, &r.record, freeze).await?;
    let r = LiveRange {
        frozen: Some(MergeFreeze {
            into: left_id,
            left_generation,
        }),
        ..r
    };
    finish(shared, &l, &r).await
}

/// With the right range frozen and colocated: waits for every replica to apply the freeze,
/// then merges. Thaws again if a replica does not catch up in time.
async fn finish(
    shared: &NodeShared,
    l: &LiveRange,
    r: &LiveRange,
) -> Result<Option<RangeRecord>, ClientError> {
    let (left_id, right_id) = (l.record.span.range_id, r.record.span.range_id);
    let left_generation = l.record.span.generation;
    if let Err(e) = wait_frozen_everywhere(shared, l, r).await {
        tracing::info!(
            left = left_id,
            right = right_id,
            "freeze did not reach every replica: {e}"
        );
        if let Some(merged) = abandon(shared, l, r).await? {
            return Ok(Some(merged));
        }
        return Err(e);
    }
    let merge = MergeStepRequest {
        step: MergeStep::Merge as i32,
        range_id: left_id,
        expected_generation: left_generation,
        into: 0,
        left_generation: 0,
        right: Some(wire_descriptor(&r.record)),
    };
    match call_step(shared, &l.record, merge).await {
        Ok(resp) => {
            let merged = resp
                .descriptor
                .map(|d| crate::meta::record_from_wire(&d, l.record.span.next_replica_id))
                .ok_or_else(|| internal("merge answered without a descriptor"))?;
            Ok(Some(merged))
        }
        // Rejected (the left range changed): undo and plan again.
        Err(ClientError::StaleGeneration { message, .. }) => {
            tracing::info!(
                left = left_id,
                right = right_id,
                "merge rejected: {message}"
            );
            abandon(shared, l, r).await
        }
        // Outcome unknown: the next step reads the ranges again and finishes or undoes it.
        Err(e) => Err(e),
    }
}

/// Undoes the right range's freeze: first makes its merge fail for good (or learns that it
/// happened: then the left range as it is now), then thaws exactly that freeze.
async fn abandon(
    shared: &NodeShared,
    l: &LiveRange,
    r: &LiveRange,
) -> Result<Option<RangeRecord>, ClientError> {
    let Some(freeze) = r.frozen else {
        return Ok(None);
    };
    let abort = MergeStepRequest {
        step: MergeStep::Abort as i32,
        range_id: l.record.span.range_id,
        expected_generation: 0,
        into: 0,
        left_generation: freeze.left_generation,
        right: Some(wire_descriptor(&r.record)),
    };
    let aborted = call_step(shared, &l.record, abort).await?;
    if aborted.merged {
        let now = aborted
            .descriptor
            .map(|d| crate::meta::record_from_wire(&d, l.record.span.next_replica_id))
            .ok_or_else(|| internal("abort answered without a descriptor"))?;
        return Ok(Some(now));
    }
    let thaw = MergeStepRequest {
        step: MergeStep::Thaw as i32,
        range_id: r.record.span.range_id,
        expected_generation: 0,
        into: freeze.into,
        left_generation: freeze.left_generation,
        right: None,
    };
    call_step(shared, &r.record, thaw).await?;
    tracing::info!(
        left = l.record.span.range_id,
        right = r.record.span.range_id,
        "merge abandoned; right range thawed"
    );
    Ok(None)
}

/// Thaws `right`, frozen into `left_id`, a range merged away since: `left_id`'s last state
/// was frozen, so it can never apply the merge. Unless a newer range covers `right`'s keys
/// (the left range did take it over before it went): then `right`'s replicas are collected
/// as merged away, and nothing is thawed.
async fn thaw_orphan(
    shared: &NodeShared,
    left_id: RangeId,
    right: &RangeRecord,
    records: &[RangeRecord],
) -> Result<(), ClientError> {
    let r = live_range(shared, right).await?;
    let Some(freeze) = r.frozen.filter(|f| f.into == left_id) else {
        return Ok(());
    };
    let taken_over = records.iter().any(|s| {
        s.span.range_id != right.span.range_id
            && s.span.generation > right.span.generation
            && s.span.overlaps(&right.span)
    });
    if taken_over {
        return Ok(());
    }
    tracing::warn!(
        left = left_id,
        right = right.span.range_id,
        "range frozen into a range merged away since; thawing it"
    );
    let thaw = MergeStepRequest {
        step: MergeStep::Thaw as i32,
        range_id: right.span.range_id,
        expected_generation: 0,
        into: freeze.into,
        left_generation: freeze.left_generation,
        right: None,
    };
    call_step(shared, &r.record, thaw).await.map(|_| ())
}

/// True when both ranges have voters on exactly the same nodes and no learners.
fn colocated(l: &LiveRange, r: &LiveRange) -> bool {
    l.voter_nodes() == r.voter_nodes()
        && l.learner_nodes().is_empty()
        && r.learner_nodes().is_empty()
}

/// One replica change bringing the ranges' replicas onto the same nodes.
async fn colocate_one(
    shared: &NodeShared,
    l: &LiveRange,
    r: &LiveRange,
) -> Result<(), ClientError> {
    let (want, have) = (l.voter_nodes(), r.voter_nodes());
    // Learners first: left over from an interrupted move, they would block every change.
    let (range, add, remove) = if let Some(&n) = l.learner_nodes().first() {
        (&l.record, None, Some(n))
    } else if let Some(&n) = r.learner_nodes().first() {
        (&r.record, None, Some(n))
    } else if let Some(&n) = want.difference(&have).next() {
        (&r.record, Some(n), None)
    } else if let Some(&n) = have.difference(&want).next() {
        (&r.record, None, Some(n))
    } else {
        return Ok(());
    };
    tracing::info!(
        range_id = range.span.range_id,
        add = ?add,
        remove = ?remove,
        "moving a replica for a merge"
    );
    let req = ChangeReplicasRequest {
        range_id: range.span.range_id,
        add_node_id: add,
        remove_node_id: remove,
        expected_generation: range.span.generation,
    };
    let candidates = leader_candidates(shared, range);
    shared
        .call_leader(
            candidates,
            MOVE_TIMEOUT_MS,
            |_| {},
            |mut admin| async move { admin.change_replicas(req).await },
        )
        .await?;
    Ok(())
}

/// Polls every node of the left range until its replica of the right range applied the
/// freeze, within [`FREEZE_CATCH_UP_TIMEOUT_MS`].
async fn wait_frozen_everywhere(
    shared: &NodeShared,
    l: &LiveRange,
    r: &LiveRange,
) -> Result<(), ClientError> {
    let (left_id, right_id) = (l.record.span.range_id, r.record.span.range_id);
    let left_generation = l.record.span.generation;
    let nodes = shared.known_nodes();
    let deadline = Instant::now() + Duration::from_millis(FREEZE_CATCH_UP_TIMEOUT_MS);
    let mut waiting: Vec<NodeId> = l.voter_nodes().into_iter().collect();
    while !waiting.is_empty() {
        let mut still = Vec::new();
        for node in waiting {
            let frozen = match node_range_status(shared, &nodes, node, right_id).await {
                Ok(Some(s)) => {
                    s.frozen_into == Some(left_id) && s.frozen_left_generation == left_generation
                }
                Ok(None) | Err(_) => false,
            };
            if !frozen {
                still.push(node);
            }
        }
        waiting = still;
        if waiting.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            return Err(ClientError::Unavailable(format!(
                "nodes {waiting:?} did not apply the freeze of range {right_id} in time"
            )));
        }
        tokio::time::sleep(Duration::from_millis(MERGE_POLL_MS)).await;
    }
    Ok(())
}

/// The status of `range_id` on `node`, if it has a replica.
async fn node_range_status(
    shared: &NodeShared,
    nodes: &HashMap<NodeId, String>,
    node: NodeId,
    range_id: RangeId,
) -> Result<Option<RangeStatus>, ClientError> {
    let addr = nodes
        .get(&node)
        .ok_or_else(|| ClientError::Unavailable(format!("address of node {node} not known")))?;
    let mut admin = shared.admin(addr)?;
    let status = tokio::time::timeout(
        Duration::from_millis(PEER_CALL_TIMEOUT_MS),
        admin.status(StatusRequest {
            include_digest: false,
        }),
    )
    .await
    .map_err(|_| ClientError::Unavailable(format!("node {node} did not answer")))?
    .map_err(|s| ClientError::from_status(&s))?
    .into_inner();
    Ok(status.ranges.into_iter().find(|s| {
        s.descriptor
            .as_ref()
            .is_some_and(|d| d.range_id == range_id)
    }))
}

/// Addresses to try for `record`'s leader: the reported leader first, then its replicas.
fn leader_candidates(shared: &NodeShared, record: &RangeRecord) -> Vec<String> {
    let nodes = shared.known_nodes();
    let leader = shared
        .meta
        .loads()
        .get(&record.span.range_id)
        .and_then(|l| l.leader_node);
    leader
        .into_iter()
        .chain(record.replicas.iter().map(|r| r.node_id))
        .filter_map(|n| nodes.get(&n).cloned())
        .collect()
}

/// The range as its leader applied it: descriptor and freeze.
async fn live_range(shared: &NodeShared, record: &RangeRecord) -> Result<LiveRange, ClientError> {
    let nodes = shared.known_nodes();
    let mut last = ClientError::Unavailable(format!(
        "no leader of range {} answered",
        record.span.range_id
    ));
    for addr in leader_candidates(shared, record) {
        let node = nodes.iter().find(|(_, a)| **a == addr).map(|(n, _)| *n);
        let Some(node) = node else { continue };
        match node_range_status(shared, &nodes, node, record.span.range_id).await {
            Ok(Some(s)) if s.role == "leader" => {
                let d = s
                    .descriptor
                    .ok_or_else(|| internal("range status without a descriptor"))?;
                return Ok(LiveRange {
                    record: crate::meta::record_from_wire(&d, record.span.next_replica_id),
                    frozen: s.frozen_into.map(|into| MergeFreeze {
                        into,
                        left_generation: s.frozen_left_generation,
                    }),
                });
            }
            Ok(_) => {}
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Sends a merge step to `record`'s leader.
async fn call_step(
    shared: &NodeShared,
    record: &RangeRecord,
    req: MergeStepRequest,
) -> Result<MergeStepResponse, ClientError> {
    shared
        .call_leader(
            leader_candidates(shared, record),
            PEER_CALL_TIMEOUT_MS * 3,
            |_| {},
            |mut admin| {
                let req = req.clone();
                async move { admin.merge_step(req).await }
            },
        )
        .await
}

/// Writes the merged descriptor into the meta range and drops the right range's.
async fn record_merge(
    shared: &NodeShared,
    merged: &RangeRecord,
    right_id: RangeId,
) -> Result<(), ClientError> {
    let meta = shared
        .meta_replica()
        .filter(|r| r.raft.is_leader())
        .ok_or_else(|| ClientError::Unavailable("lost the meta range's leadership".into()))?;
    let value = registry::encode(merged).map_err(internal)?;
    write_meta(
        &meta.raft,
        vec![
            WriteOp {
                key: registry::range_key(merged.span.range_id),
                value: Some(value),
            },
            WriteOp {
                key: registry::range_key(right_id),
                value: None,
            },
        ],
    )
    .await
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

/// Merges small cold neighbours while this node leads the meta range, and finishes or
/// undoes merges whose coordinator stopped (a frozen range serves nothing, so those are
/// looked at every heartbeat period). The range map is scanned for candidates every
/// heartbeat period while it yields some, else every [`MERGE_IDLE_SCAN_INTERVAL_MS`], so a
/// cluster of many idle ranges does not decode its whole range map every second.
pub async fn merge_loop(shared: Arc<NodeShared>, mut stop: watch::Receiver<bool>) {
    let interval = Duration::from_millis(shared.cfg.node_heartbeat_interval_ms);
    let idle_interval = Duration::from_millis(MERGE_IDLE_SCAN_INTERVAL_MS).max(interval);
    let mut next_scan = Instant::now();
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(interval) => {}
        }
        if !shared.meta_replica().is_some_and(|r| r.raft.is_leader()) {
            continue;
        }
        let mut pairs: Vec<(RangeId, RangeId)> = shared.meta.frozen_merges();
        if shared.cfg.range_merge_size_bytes > 0 && Instant::now() >= next_scan {
            let candidates = match auto_merge_candidates(&shared) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("reading ranges for merges: {e}");
                    Vec::new()
                }
            };
            next_scan = Instant::now()
                + if candidates.is_empty() {
                    idle_interval
                } else {
                    interval
                };
            pairs.extend(candidates);
        }
        pairs.dedup();
        for (left, right) in pairs {
            match merge_ranges(&shared, left, Some(right)).await {
                Ok(_) => {}
                // The pair is gone (merged, or split since): nothing is left to settle.
                Err(ClientError::InvalidArgument(e)) => {
                    tracing::info!(left, right, "merge no longer applies: {e}");
                    shared.meta.forget_frozen(right);
                }
                Err(e) => tracing::info!(left, right, "automatic merge: {e}"),
            }
        }
    }
}

/// The pairs automatic merging takes on now: at most [`MAX_MERGES_PER_ROUND`].
fn auto_merge_candidates(shared: &NodeShared) -> std::io::Result<Vec<(RangeId, RangeId)>> {
    let records = registry::ranges(&shared.db)?;
    let busy = shared.meta.busy();
    let policy = MergePolicy {
        max_size_bytes: shared.cfg.range_merge_size_bytes,
        max_qps: shared.cfg.range_merge_qps,
        min_span_age_ms: shared.cfg.range_merge_after_split_ms,
    };
    let age = |r: &RangeRecord| shared.meta.span_age_ms(&r.span);
    let silence_limit_ms = shared.cfg.node_heartbeat_interval_ms * MERGE_NODE_SILENCE_HEARTBEATS;
    let reachable =
        |node: NodeId| node == shared.node_id || shared.meta.silence_ms(node) < silence_limit_ms;
    let mut pairs = merge_candidates(
        &records,
        &shared.meta.loads(),
        &age,
        &reachable,
        &busy,
        policy,
    );
    pairs.truncate(MAX_MERGES_PER_ROUND);
    Ok(pairs)
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

    #[test]
    fn small_cold_neighbours_merge_smallest_pair_first() {
        let loads = HashMap::from([
            (1, load(10, 0.0)),
            (2, load(400, 0.0)),
            (3, load(300, 0.0)),
            (4, load(100, 0.0)),
            (5, load(100, 0.0)),
        ]);
        let picked = merge_candidates(
            &ranges(),
            &loads,
            &|_| 10_000,
            &|_| true,
            &HashSet::new(),
            POLICY,
        );
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
        let picked = merge_candidates(
            &ranges(),
            &loads,
            &|_| 10_000,
            &|_| true,
            &HashSet::new(),
            POLICY,
        );
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
        let all = merge_candidates(
            &ranges(),
            &loads,
            &|_| 10_000,
            &|_| true,
            &HashSet::new(),
            POLICY,
        );
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
}
