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
//! [`plan::merge_candidates`] picks pairs for automatic merges: small, cold neighbours whose
//! spans have not changed for a while.
//!
//! Every decision is a pure function in [`plan`]; the [`Coordinator`] here carries them out
//! through a [`MergeTransport`] (tonic in a cluster, an in-process simulation in the tests
//! below), and [`Merges`] adds what only the meta-range leader has: the meta range's copy of
//! the descriptors, its in-memory view, and the automatic-merge loop. This module does not
//! import `node`.

pub mod plan;
pub mod transport;

use std::sync::Arc;
use std::time::{Duration, Instant};

use spheredb_client::proto::v1::ChangeReplicasRequest;
use spheredb_client::ClientError;
use spheredb_raft::network::ReplicaDirectory;
use spheredb_raft::registry;
use spheredb_raft::{NodeId, RangeId, RangeRecord, WriteOp};
use spheredb_storage::Db;
use tokio::sync::watch;

use crate::descriptor::record_from_wire;
use crate::errors::internal;
use crate::meta::{write_meta, MetaState};
use crate::replica::leading_meta;
use plan::{
    abort_request, applied_this_freeze, freeze_request, merge_candidates, merge_request, next_step,
    orphan_freeze, pick_pair, thaw_request, LiveRange, MergeNext, MergePolicy, ReplicaMove,
};
pub use transport::{MergeTransport, TonicMergeTransport};

/// Longest one merge may take, moving replicas included.
pub const MERGE_TIMEOUT_MS: u64 = 90_000;
/// Most steps (replica moves, freeze, merge, retries) one merge takes before giving up.
pub const MAX_MERGE_STEPS: usize = 24;
/// Longest the merge waits for every replica of the right range to apply the freeze before
/// it thaws the range again.
pub const FREEZE_CATCH_UP_TIMEOUT_MS: u64 = 10_000;
/// Pause between polls of a merge's progress.
const MERGE_POLL_MS: u64 = 100;

/// Ranges one automatic-merge round asks to merge, at most.
pub const MAX_MERGES_PER_ROUND: usize = 1;
/// Automatic merges leave alone ranges with a replica on a node silent for this many node
/// heartbeat periods (long before the node counts as dead and its replicas are replaced).
pub const MERGE_NODE_SILENCE_HEARTBEATS: u64 = 3;
/// Period of the automatic-merge scan while it finds nothing to merge.
pub const MERGE_IDLE_SCAN_INTERVAL_MS: u64 = 10_000;

/// Marks ranges as busy in the allocator's in-flight set while a merge runs.
struct Busy<'a> {
    view: &'a MetaState,
    ranges: [RangeId; 2],
}

impl<'a> Busy<'a> {
    fn claim(view: &'a MetaState, ranges: [RangeId; 2]) -> Option<Busy<'a>> {
        view.claim(&ranges).then_some(Busy { view, ranges })
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.view.release(&self.ranges);
    }
}

/// Carries one merge's steps out: reads both ranges through the transport, asks [`plan`]
/// what to do, and sends it.
pub struct Coordinator<'a, T> {
    pub transport: &'a T,
    /// The meta leader's view: whether another merge into the right range is pending.
    pub view: &'a MetaState,
    /// How long the freeze may take to reach every replica of the right range.
    pub freeze_catch_up_ms: u64,
}

impl<T: MergeTransport> Coordinator<'_, T> {
    /// Takes the merge one step further from the ranges' current state. `Some` once merged.
    pub async fn step(
        &self,
        left: &RangeRecord,
        right: &RangeRecord,
    ) -> Result<Option<RangeRecord>, ClientError> {
        let l = self.transport.live_range(left).await?;
        let r = self.transport.live_range(right).await?;
        let pending = self.view.merge_pending_into(right.span.range_id);
        match next_step(&l, &r, right, pending)? {
            MergeNext::Finish => self.finish(&l, &r).await,
            // Thawed, the next step reads the ranges again.
            MergeNext::Abandon => self.abandon(&l, &r).await,
            MergeNext::Move(m) => {
                self.move_replica(&l, &r, m).await?;
                Ok(None)
            }
            MergeNext::Freeze(freeze) => {
                self.transport
                    .merge_step(&r.record, freeze_request(&r, freeze))
                    .await?;
                let r = LiveRange {
                    frozen: Some(freeze),
                    ..r
                };
                self.finish(&l, &r).await
            }
        }
    }

    /// With the right range frozen and colocated: waits for every replica to apply the
    /// freeze, then merges. Thaws again if a replica does not catch up in time.
    async fn finish(
        &self,
        l: &LiveRange,
        r: &LiveRange,
    ) -> Result<Option<RangeRecord>, ClientError> {
        let (left_id, right_id) = (l.record.span.range_id, r.record.span.range_id);
        if let Err(e) = self.wait_frozen_everywhere(l, r).await {
            tracing::info!(
                left = left_id,
                right = right_id,
                "freeze did not reach every replica: {e}"
            );
            if let Some(merged) = self.abandon(l, r).await? {
                return Ok(Some(merged));
            }
            return Err(e);
        }
        match self
            .transport
            .merge_step(&l.record, merge_request(l, r))
            .await
        {
            Ok(resp) => {
                let merged = resp
                    .descriptor
                    .map(|d| record_from_wire(&d, l.record.span.next_replica_id))
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
                self.abandon(l, r).await
            }
            // Outcome unknown: the next step reads the ranges again and finishes or undoes it.
            Err(e) => Err(e),
        }
    }

    /// Undoes the right range's freeze: first makes its merge fail for good (or learns that
    /// it happened: then the left range as it is now), then thaws exactly that freeze.
    async fn abandon(
        &self,
        l: &LiveRange,
        r: &LiveRange,
    ) -> Result<Option<RangeRecord>, ClientError> {
        let Some(freeze) = r.frozen else {
            return Ok(None);
        };
        let aborted = self
            .transport
            .merge_step(&l.record, abort_request(l, r, freeze))
            .await?;
        if aborted.merged {
            let now = aborted
                .descriptor
                .map(|d| record_from_wire(&d, l.record.span.next_replica_id))
                .ok_or_else(|| internal("abort answered without a descriptor"))?;
            return Ok(Some(now));
        }
        self.transport
            .merge_step(&r.record, thaw_request(r.record.span.range_id, freeze))
            .await?;
        tracing::info!(
            left = l.record.span.range_id,
            right = r.record.span.range_id,
            "merge abandoned; right range thawed"
        );
        Ok(None)
    }

    /// Thaws `right`, frozen into `left_id`, a range merged away since, unless a newer range
    /// covers its keys (see [`orphan_freeze`]).
    async fn thaw_orphan(
        &self,
        left_id: RangeId,
        right: &RangeRecord,
        records: &[RangeRecord],
    ) -> Result<(), ClientError> {
        let r = self.transport.live_range(right).await?;
        let Some(freeze) = orphan_freeze(left_id, &r, right, records) else {
            return Ok(());
        };
        tracing::warn!(
            left = left_id,
            right = right.span.range_id,
            "range frozen into a range merged away since; thawing it"
        );
        self.transport
            .merge_step(&r.record, thaw_request(right.span.range_id, freeze))
            .await
            .map(|_| ())
    }

    /// Sends one colocating replica change to the leader of the range it changes.
    async fn move_replica(
        &self,
        l: &LiveRange,
        r: &LiveRange,
        m: ReplicaMove,
    ) -> Result<(), ClientError> {
        let range = if m.range_id == l.record.span.range_id {
            &l.record
        } else {
            &r.record
        };
        tracing::info!(
            range_id = range.span.range_id,
            add = ?m.add,
            remove = ?m.remove,
            "moving a replica for a merge"
        );
        let req = ChangeReplicasRequest {
            range_id: range.span.range_id,
            add_node_id: m.add,
            remove_node_id: m.remove,
            expected_generation: range.span.generation,
        };
        self.transport.change_replicas(range, req).await
    }

    /// Polls every node of the left range until its replica of the right range applied the
    /// freeze, within `freeze_catch_up_ms`.
    async fn wait_frozen_everywhere(
        &self,
        l: &LiveRange,
        r: &LiveRange,
    ) -> Result<(), ClientError> {
        let right_id = r.record.span.range_id;
        let deadline = Instant::now() + Duration::from_millis(self.freeze_catch_up_ms);
        let mut waiting: Vec<NodeId> = l.voter_nodes().into_iter().collect();
        while !waiting.is_empty() {
            let mut still = Vec::new();
            for node in waiting {
                let frozen = match self.transport.applied_freeze(node, right_id).await {
                    Ok(applied) => applied_this_freeze(applied, l),
                    Err(_) => false,
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
}

/// The settings of automatic merging and of its loop.
#[derive(Debug, Clone, Copy)]
pub struct AutoMerge {
    /// Ranges (and pairs) must be smaller than this to merge; 0 turns automatic merges off.
    pub size_bytes: u64,
    /// Ranges must serve fewer requests per second than this.
    pub qps: f64,
    /// Ranges must keep their span this long after a split or merge.
    pub after_split_ms: u64,
    /// The node heartbeat period: the loop's period, and the unit of node silence.
    pub heartbeat_interval_ms: u64,
}

/// The meta-range leader's merges: what they read (the meta range's descriptors in `db`,
/// the local meta replica, the leader's in-memory view) and the transport they call through.
pub struct Merges<T> {
    pub node_id: NodeId,
    pub db: Db,
    pub replicas: Arc<ReplicaDirectory>,
    pub view: Arc<MetaState>,
    pub transport: T,
    pub auto: AutoMerge,
}

impl<T: MergeTransport> Merges<T> {
    /// Merges range `left_id` with its right neighbour; returns the merged range. Runs on
    /// the meta-range leader.
    pub async fn merge_ranges(
        &self,
        left_id: RangeId,
        expected_right: Option<RangeId>,
    ) -> Result<RangeRecord, ClientError> {
        let coordinator = Coordinator {
            transport: &self.transport,
            view: &self.view,
            freeze_catch_up_ms: FREEZE_CATCH_UP_TIMEOUT_MS,
        };
        let records = registry::ranges(&self.db).map_err(internal)?;
        let Some((left, right)) = pick_pair(&records, left_id, expected_right)? else {
            let right = expected_right
                .and_then(|id| records.iter().find(|r| r.span.range_id == id).cloned());
            if let Some(right) = right {
                coordinator.thaw_orphan(left_id, &right, &records).await?;
            }
            return Err(ClientError::InvalidArgument(format!(
                "range {left_id} does not exist"
            )));
        };
        let right_id = right.span.range_id;
        let Some(_busy) = Busy::claim(&self.view, [left_id, right_id]) else {
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
            if leading_meta(&self.replicas).is_none() {
                return Err(ClientError::Unavailable(
                    "this node no longer leads the meta range; retry".into(),
                ));
            }
            // The meta copy drops the right range once the merged descriptor is reported.
            if registry::range(&self.db, right_id)
                .map_err(internal)?
                .is_none()
            {
                if let Some(merged) = registry::range(&self.db, left_id).map_err(internal)? {
                    self.view.forget_frozen(right_id);
                    return Ok(merged);
                }
            }
            match coordinator.step(&left, &right).await {
                Ok(Some(merged)) => {
                    self.record_merge(&merged, right_id).await?;
                    self.view.forget_frozen(right_id);
                    self.view.count("merges");
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

    /// Writes the merged descriptor into the meta range and drops the right range's.
    async fn record_merge(
        &self,
        merged: &RangeRecord,
        right_id: RangeId,
    ) -> Result<(), ClientError> {
        let meta = leading_meta(&self.replicas)
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

    /// The pairs automatic merging takes on now: at most [`MAX_MERGES_PER_ROUND`].
    fn auto_merge_candidates(&self) -> std::io::Result<Vec<(RangeId, RangeId)>> {
        let records = registry::ranges(&self.db)?;
        let busy = self.view.busy();
        let policy = MergePolicy {
            max_size_bytes: self.auto.size_bytes,
            max_qps: self.auto.qps,
            min_span_age_ms: self.auto.after_split_ms,
        };
        let age = |r: &RangeRecord| self.view.span_age_ms(&r.span);
        let silence_limit_ms = self.auto.heartbeat_interval_ms * MERGE_NODE_SILENCE_HEARTBEATS;
        let reachable =
            |node: NodeId| node == self.node_id || self.view.silence_ms(node) < silence_limit_ms;
        let mut pairs = merge_candidates(
            &records,
            &self.view.loads(),
            &age,
            &reachable,
            &busy,
            policy,
        );
        pairs.truncate(MAX_MERGES_PER_ROUND);
        Ok(pairs)
    }
}

/// Merges small cold neighbours while this node leads the meta range, and finishes or
/// undoes merges whose coordinator stopped (a frozen range serves nothing, so those are
/// looked at every heartbeat period). The range map is scanned for candidates every
/// heartbeat period while it yields some, else every [`MERGE_IDLE_SCAN_INTERVAL_MS`], so a
/// cluster of many idle ranges does not decode its whole range map every second.
pub async fn merge_loop<T: MergeTransport>(
    merges: Arc<Merges<T>>,
    mut stop: watch::Receiver<bool>,
) {
    let interval = Duration::from_millis(merges.auto.heartbeat_interval_ms);
    let idle_interval = Duration::from_millis(MERGE_IDLE_SCAN_INTERVAL_MS).max(interval);
    let mut next_scan = Instant::now();
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(interval) => {}
        }
        if leading_meta(&merges.replicas).is_none() {
            continue;
        }
        let mut pairs: Vec<(RangeId, RangeId)> = merges.view.frozen_merges();
        if merges.auto.size_bytes > 0 && Instant::now() >= next_scan {
            let candidates = match merges.auto_merge_candidates() {
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
            match merges.merge_ranges(left, Some(right)).await {
                Ok(_) => {}
                // The pair is gone (merged, or split since): nothing is left to settle.
                Err(ClientError::InvalidArgument(e)) => {
                    tracing::info!(left, right, "merge no longer applies: {e}");
                    merges.view.forget_frozen(right);
                }
                Err(e) => tracing::info!(left, right, "automatic merge: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashSet};
    use std::sync::Mutex;

    use spheredb_client::proto::v1::{MergeStep, MergeStepRequest, MergeStepResponse};
    use spheredb_raft::{MergeFreeze, ReplicaRecord};

    use super::*;
    use crate::descriptor::wire_descriptor;

    /// A range as its simulated leader applied it.
    struct SimRange {
        record: RangeRecord,
        frozen: Option<MergeFreeze>,
        /// `(right, left_generation)` of merges this range applied, as the state machine
        /// keeps them to answer a late `AbortMerge`.
        merges: Vec<(RangeId, u64)>,
    }

    #[derive(Default)]
    struct SimState {
        ranges: BTreeMap<RangeId, SimRange>,
        /// Nodes whose replicas never apply a freeze (cut off, or far behind).
        lagging: HashSet<NodeId>,
        /// Every call the coordinator made, in order.
        calls: Vec<String>,
    }

    /// A cluster's ranges in memory, answering a merge's calls as range leaders do: each
    /// merge step checks and changes the range as the state machine's command does.
    #[derive(Default)]
    struct SimCluster {
        state: Mutex<SimState>,
    }

    impl SimCluster {
        fn with(ranges: Vec<LiveRange>) -> SimCluster {
            let sim = SimCluster::default();
            {
                let mut st = sim.state.lock().unwrap();
                for r in ranges {
                    st.ranges.insert(
                        r.record.span.range_id,
                        SimRange {
                            record: r.record,
                            frozen: r.frozen,
                            merges: Vec::new(),
                        },
                    );
                }
            }
            sim
        }

        fn state(&self) -> std::sync::MutexGuard<'_, SimState> {
            self.state.lock().unwrap()
        }

        fn calls(&self) -> Vec<String> {
            self.state().calls.clone()
        }

        fn range(&self, id: RangeId) -> Option<LiveRange> {
            self.state().ranges.get(&id).map(|r| LiveRange {
                record: r.record.clone(),
                frozen: r.frozen,
            })
        }
    }

    fn stale(range: &SimRange) -> ClientError {
        ClientError::StaleGeneration {
            message: format!("range is at generation {}", range.record.span.generation),
            descriptors: vec![wire_descriptor(&range.record)],
        }
    }

    fn answer(range: &SimRange, merged: bool) -> MergeStepResponse {
        MergeStepResponse {
            descriptor: Some(wire_descriptor(&range.record)),
            merged,
        }
    }

    impl MergeTransport for SimCluster {
        async fn live_range(&self, record: &RangeRecord) -> Result<LiveRange, ClientError> {
            let id = record.span.range_id;
            self.range(id)
                .ok_or_else(|| ClientError::Unavailable(format!("no leader of range {id}")))
        }

        async fn applied_freeze(
            &self,
            node: NodeId,
            range_id: RangeId,
        ) -> Result<Option<MergeFreeze>, ClientError> {
            let st = self.state();
            if st.lagging.contains(&node) {
                return Ok(None);
            }
            Ok(st
                .ranges
                .get(&range_id)
                .filter(|r| r.record.replica_on(node).is_some())
                .and_then(|r| r.frozen))
        }

        async fn merge_step(
            &self,
            _record: &RangeRecord,
            req: MergeStepRequest,
        ) -> Result<MergeStepResponse, ClientError> {
            let mut st = self.state();
            let step = MergeStep::try_from(req.step).unwrap();
            st.calls.push(format!("{step:?} {}", req.range_id));
            let id = req.range_id;
            let Some(mut range) = st.ranges.remove(&id) else {
                return Err(ClientError::RangeNotFound(format!("range {id}")));
            };
            let result = match step {
                MergeStep::Freeze => {
                    let freeze = MergeFreeze {
                        into: req.into,
                        left_generation: req.left_generation,
                    };
                    match range.frozen {
                        Some(f) if f == freeze => Ok(answer(&range, false)),
                        Some(f) => Err(ClientError::Unavailable(format!("frozen into {}", f.into))),
                        None if range.record.span.generation != req.expected_generation => {
                            Err(stale(&range))
                        }
                        None => {
                            range.frozen = Some(freeze);
                            Ok(answer(&range, false))
                        }
                    }
                }
                MergeStep::Thaw => {
                    let freeze = MergeFreeze {
                        into: req.into,
                        left_generation: req.left_generation,
                    };
                    if range.frozen == Some(freeze) {
                        range.frozen = None;
                    }
                    Ok(answer(&range, false))
                }
                MergeStep::Merge => {
                    let right = req.right.clone().unwrap();
                    let held = st.ranges.get(&right.range_id).is_some_and(|r| {
                        r.frozen
                            == Some(MergeFreeze {
                                into: id,
                                left_generation: req.expected_generation,
                            })
                    });
                    if range.record.span.generation != req.expected_generation {
                        Err(stale(&range))
                    } else if range.record.span.end_key != right.start_key || !held {
                        Err(ClientError::Internal(
                            "merge without its frozen right side".into(),
                        ))
                    } else {
                        st.ranges.remove(&right.range_id);
                        let span = &mut range.record.span;
                        span.end_key = right.end_key.clone();
                        span.generation = span.generation.max(right.generation) + 1;
                        range.merges.push((right.range_id, req.expected_generation));
                        Ok(answer(&range, false))
                    }
                }
                MergeStep::Abort => {
                    let right = req.right.clone().unwrap().range_id;
                    if let Some(f) = range.frozen {
                        Err(ClientError::Unavailable(format!("frozen into {}", f.into)))
                    } else {
                        let merged = range.merges.contains(&(right, req.left_generation));
                        if !merged && range.record.span.generation == req.left_generation {
                            range.record.span.generation += 1;
                        }
                        Ok(answer(&range, merged))
                    }
                }
                MergeStep::Unspecified => Err(ClientError::InvalidArgument("no step".into())),
            };
            st.ranges.insert(id, range);
            result
        }

        async fn change_replicas(
            &self,
            _record: &RangeRecord,
            req: ChangeReplicasRequest,
        ) -> Result<(), ClientError> {
            let mut st = self.state();
            st.calls.push(format!(
                "ChangeReplicas {} add {:?} remove {:?}",
                req.range_id, req.add_node_id, req.remove_node_id
            ));
            let range = st.ranges.get_mut(&req.range_id).unwrap();
            if range.record.span.generation != req.expected_generation {
                return Err(stale(range));
            }
            let record = &mut range.record;
            if let Some(node) = req.add_node_id {
                record.replicas.push(ReplicaRecord {
                    replica_id: record.span.next_replica_id,
                    node_id: node,
                    voter: true,
                });
                record.span.next_replica_id += 1;
            }
            if let Some(node) = req.remove_node_id {
                record.replicas.retain(|r| r.node_id != node);
            }
            record.span.generation += 1;
            Ok(())
        }
    }

    fn range(id: RangeId, start: &[u8], end: &[u8], nodes: &[NodeId]) -> LiveRange {
        LiveRange {
            record: crate::descriptor::test_record(id, start, end, 5, nodes),
            frozen: None,
        }
    }

    fn frozen(mut r: LiveRange, into: RangeId, left_generation: u64) -> LiveRange {
        r.frozen = Some(MergeFreeze {
            into,
            left_generation,
        });
        r
    }

    /// Runs steps as `Merges::merge_ranges` does, until merged, an error, or the step limit.
    async fn run(
        sim: &SimCluster,
        view: &MetaState,
        left: &LiveRange,
        right: &LiveRange,
    ) -> Result<Option<RangeRecord>, ClientError> {
        let coordinator = Coordinator {
            transport: sim,
            view,
            freeze_catch_up_ms: 0,
        };
        for _ in 0..MAX_MERGE_STEPS {
            if let Some(merged) = coordinator.step(&left.record, &right.record).await? {
                return Ok(Some(merged));
            }
        }
        Ok(None)
    }

    #[tokio::test]
    async fn colocated_neighbours_freeze_then_merge_into_one_wider_range() {
        let (l, r) = (
            range(2, b"a", b"m", &[1, 2, 3]),
            range(3, b"m", b"", &[1, 2, 3]),
        );
        let sim = SimCluster::with(vec![l.clone(), r.clone()]);
        let merged = run(&sim, &MetaState::default(), &l, &r)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (
                merged.span.start_key.as_slice(),
                merged.span.end_key.as_slice()
            ),
            (&b"a"[..], &b""[..])
        );
        assert_eq!(merged.span.generation, 6);
        assert_eq!(sim.calls(), ["Freeze 3", "Merge 2"]);
        assert!(sim.range(3).is_none());
    }

    #[tokio::test]
    async fn right_replicas_move_onto_the_left_nodes_one_change_at_a_time_before_the_freeze() {
        let (l, r) = (
            range(2, b"a", b"m", &[1, 2, 3]),
            range(3, b"m", b"", &[1, 2, 4]),
        );
        let sim = SimCluster::with(vec![l.clone(), r.clone()]);
        let merged = run(&sim, &MetaState::default(), &l, &r).await.unwrap();
        assert!(merged.is_some());
        assert_eq!(
            sim.calls(),
            [
                "ChangeReplicas 3 add Some(3) remove None",
                "ChangeReplicas 3 add None remove Some(4)",
                "Freeze 3",
                "Merge 2",
            ]
        );
    }

    #[tokio::test]
    async fn a_freeze_a_replica_does_not_apply_in_time_is_aborted_then_thawed() {
        let (l, r) = (
            range(2, b"a", b"m", &[1, 2, 3]),
            range(3, b"m", b"", &[1, 2, 3]),
        );
        let sim = SimCluster::with(vec![l.clone(), r.clone()]);
        sim.state().lagging.insert(3);
        let coordinator = Coordinator {
            transport: &sim,
            view: &MetaState::default(),
            freeze_catch_up_ms: 0,
        };
        let err = coordinator
            .step(&l.record, &r.record)
            .await
            .expect_err("a replica never applied the freeze");
        assert!(matches!(err, ClientError::Unavailable(_)), "{err:?}");
        assert_eq!(sim.calls(), ["Freeze 3", "Abort 2", "Thaw 3"]);
        // The abort moved the left range on, so a `Merge` still in flight fails for good
        // before the right range serves again.
        assert_eq!(sim.range(2).unwrap().record.span.generation, 6);
        assert_eq!(sim.range(3).unwrap().frozen, None);
    }

    #[tokio::test]
    async fn a_new_coordinator_finishes_a_merge_whose_freeze_still_fits() {
        let l = range(2, b"a", b"m", &[1, 2, 3]);
        let r = frozen(range(3, b"m", b"", &[1, 2, 3]), 2, 5);
        let sim = SimCluster::with(vec![l.clone(), r.clone()]);
        let merged = run(&sim, &MetaState::default(), &l, &r).await.unwrap();
        assert!(merged.is_some());
        assert_eq!(sim.calls(), ["Merge 2"]);
    }

    #[tokio::test]
    async fn a_freeze_planned_on_an_older_left_generation_is_undone_and_the_merge_planned_again() {
        let l = range(2, b"a", b"m", &[1, 2, 3]);
        let r = frozen(range(3, b"m", b"", &[1, 2, 3]), 2, 4);
        let sim = SimCluster::with(vec![l.clone(), r.clone()]);
        let merged = run(&sim, &MetaState::default(), &l, &r).await.unwrap();
        assert!(merged.is_some());
        assert_eq!(
            sim.calls(),
            ["Abort 2", "Thaw 3", "Freeze 3", "Merge 2"],
            "the stale freeze goes before a new one"
        );
    }

    #[tokio::test]
    async fn an_abort_that_finds_the_merge_applied_reports_it_and_thaws_nothing() {
        // The left range applied the merge at generation 5 (now 6), but the right range's
        // leader has not stopped yet and still reports itself frozen.
        let mut l = range(2, b"a", b"", &[1, 2, 3]);
        l.record.span.generation = 6;
        let r = frozen(range(3, b"m", b"", &[1, 2, 3]), 2, 5);
        let sim = SimCluster::with(vec![l.clone(), r.clone()]);
        sim.state().ranges.get_mut(&2).unwrap().merges.push((3, 5));
        let coordinator = Coordinator {
            transport: &sim,
            view: &MetaState::default(),
            freeze_catch_up_ms: 0,
        };
        let merged = coordinator.step(&l.record, &r.record).await.unwrap();
        assert_eq!(merged.map(|m| m.span.generation), Some(6));
        assert_eq!(sim.calls(), ["Abort 2"]);
        assert_eq!(sim.range(3).unwrap().frozen.map(|f| f.into), Some(2));
    }

    #[tokio::test]
    async fn a_range_frozen_into_another_range_is_left_to_that_merge() {
        let l = range(2, b"a", b"m", &[1, 2, 3]);
        let r = frozen(range(3, b"m", b"", &[1, 2, 3]), 7, 1);
        let sim = SimCluster::with(vec![l.clone(), r.clone()]);
        let err = run(&sim, &MetaState::default(), &l, &r).await.unwrap_err();
        assert!(matches!(err, ClientError::Unavailable(_)), "{err:?}");
        assert!(sim.calls().is_empty());
    }

    #[tokio::test]
    async fn an_orphaned_freeze_is_thawed_unless_a_newer_range_took_the_keys_over() {
        let r = frozen(range(3, b"m", b"", &[1, 2, 3]), 2, 5);
        let sim = SimCluster::with(vec![r.clone()]);
        let view = MetaState::default();
        let coordinator = Coordinator {
            transport: &sim,
            view: &view,
            freeze_catch_up_ms: 0,
        };
        let mut newer = range(4, b"a", b"", &[1, 2, 3]).record;
        newer.span.generation = 9;
        coordinator
            .thaw_orphan(2, &r.record, &[r.record.clone(), newer])
            .await
            .unwrap();
        assert!(sim.calls().is_empty(), "range 4 owns the keys now");
        coordinator
            .thaw_orphan(2, &r.record, std::slice::from_ref(&r.record))
            .await
            .unwrap();
        assert_eq!(sim.calls(), ["Thaw 3"]);
        assert_eq!(sim.range(3).unwrap().frozen, None);
    }
}
