//! The meta range's leader as the cluster's bookkeeper: the receiving end of every node's
//! heartbeat, and the allocator.
//!
//! Each node reports its replicas every heartbeat period (generation, leadership, size,
//! load, and the descriptor when the leader has not acknowledged it at that generation, so
//! a steady report costs tens of bytes per replica). The meta-range leader keeps liveness
//! and load in memory ([`MetaState`]), writes any descriptor it sees at a newer generation
//! into the meta range, and answers with the replicas the node must destroy (removed from
//! their range), the nodes that stopped reporting (so quiesced ranges they lead wake up and
//! elect) and the descriptors it lacks. What it decides from a report
//! is [`MetaState::take_report`], plain data in and out; only [`handle_heartbeat`] reads the
//! registry and proposes writes.
//!
//! A range's own replicas hold the authoritative descriptor, changed atomically with the
//! split or replica change in the range's log; the meta range's copy follows within one
//! heartbeat period, and clients correct a stale copy from the hints in server errors.
//!
//! This module does not send heartbeats or act on their answers (that is the node's side,
//! `node::heartbeat`), and it does not import `node`.

pub mod allocator;
pub mod tso;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use spheredb_client::proto::v1::{
    NodeHeartbeatRequest, NodeHeartbeatResponse, NodeInfo, RangeDescriptor, RemovedReplica,
    ReplicaReport,
};
use spheredb_client::ClientError;
use spheredb_raft::network::Replica;
use spheredb_raft::registry::{self, LivenessRecord};
use spheredb_raft::{Command, NodeId, RangeId, RangeRecord, RangeSpan, ReplicaId, WriteOp};
use spheredb_storage::Db;

use crate::descriptor::record_from_wire;
use crate::errors::{internal, write_error};

/// A node silent for this many heartbeat periods is unreachable: quiesced ranges it leads
/// are woken so they can elect another leader.
pub const UNREACHABLE_AFTER_HEARTBEATS: u64 = 5;
/// A replica missing from its range's descriptor this long is destroyed (the grace covers a
/// replica being added while the meta copy still shows the previous generation).
pub const REPLICA_GC_GRACE_MS: u64 = 3_000;
/// A frozen range not reported for this long is forgotten (it merged, or its report went
/// elsewhere).
pub const FROZEN_REPORT_TTL_MS: u64 = 10_000;
/// Longest the meta leader waits for its writes of descriptors to commit.
pub const META_WRITE_TIMEOUT_MS: u64 = 5_000;

/// Load of one range as its leader reported it.
#[derive(Debug, Clone, Default)]
pub struct RangeLoad {
    pub leader_node: Option<NodeId>,
    pub size_bytes: u64,
    pub qps: f64,
}

/// In-memory view of the meta-range leader; reset whenever leadership changes.
#[derive(Default)]
struct MetaInner {
    /// Term of the meta range in which this view was built.
    term: Option<u64>,
    /// When this node became meta leader: nodes get a full dead timeout from then.
    since: Option<Instant>,
    last_seen: HashMap<NodeId, Instant>,
    loads: HashMap<RangeId, RangeLoad>,
    gc_candidates: HashMap<(NodeId, RangeId), Instant>,
    /// Each range's span as last reported, and since when it has been that.
    spans: HashMap<RangeId, (Vec<u8>, Vec<u8>, Instant)>,
    /// Ranges whose leader reports them frozen for a merge: the range they merge into, and
    /// when that was last reported.
    frozen: HashMap<RangeId, (RangeId, Instant)>,
    /// Replicas (by node, with their replica id) that report themselves quarantined
    /// (damaged data), by range.
    quarantined: HashMap<RangeId, BTreeMap<NodeId, ReplicaId>>,
}

/// The meta-range leader's view of the cluster.
#[derive(Default)]
pub struct MetaState {
    inner: Mutex<MetaInner>,
    /// Ranges with an allocator action or a merge in flight.
    in_flight: Mutex<HashSet<RangeId>>,
    /// Splits, replica additions, removals and leader transfers done since start.
    pub counters: Mutex<BTreeMap<&'static str, u64>>,
}

impl MetaState {
    fn lock(&self) -> std::sync::MutexGuard<'_, MetaInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn in_flight(&self) -> std::sync::MutexGuard<'_, HashSet<RangeId>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ranges with an allocator action or a merge in flight.
    pub fn busy(&self) -> HashSet<RangeId> {
        self.in_flight().clone()
    }

    /// Claims every range of `ranges` for one action, or none if one is already claimed.
    pub fn claim(&self, ranges: &[RangeId]) -> bool {
        let mut in_flight = self.in_flight();
        if ranges.iter().any(|r| in_flight.contains(r)) {
            return false;
        }
        in_flight.extend(ranges);
        true
    }

    /// Ends a [`MetaState::claim`].
    pub fn release(&self, ranges: &[RangeId]) {
        let mut in_flight = self.in_flight();
        for r in ranges {
            in_flight.remove(r);
        }
    }

    /// Resets the view if the meta range's term moved on since it was built.
    fn sync_term(&self, term: u64) {
        let mut inner = self.lock();
        if inner.term != Some(term) {
            *inner = MetaInner {
                term: Some(term),
                since: Some(Instant::now()),
                ..MetaInner::default()
            };
        }
    }

    /// Milliseconds since `node` last reported (or since this view began, if never).
    pub fn silence_ms(&self, node: NodeId) -> u64 {
        self.silence_ms_at(node, Instant::now())
    }

    /// [`MetaState::silence_ms`] as of `now`.
    fn silence_ms_at(&self, node: NodeId, now: Instant) -> u64 {
        let inner = self.lock();
        inner
            .last_seen
            .get(&node)
            .or(inner.since.as_ref())
            .map_or(0, |t| now.saturating_duration_since(*t).as_millis() as u64)
    }

    /// Of `nodes`, those silent for more than [`UNREACHABLE_AFTER_HEARTBEATS`] heartbeat
    /// periods of `interval_ms` as of `now`.
    fn unreachable_at(
        &self,
        nodes: impl IntoIterator<Item = NodeId>,
        interval_ms: u64,
        now: Instant,
    ) -> Vec<NodeId> {
        nodes
            .into_iter()
            .filter(|id| self.silence_ms_at(*id, now) > interval_ms * UNREACHABLE_AFTER_HEARTBEATS)
            .collect()
    }

    /// Load of every range that reported.
    pub fn loads(&self) -> HashMap<RangeId, RangeLoad> {
        self.lock().loads.clone()
    }

    /// Quarantined replicas of each range (node → replica id), as last reported.
    pub fn quarantined(&self) -> HashMap<RangeId, BTreeMap<NodeId, ReplicaId>> {
        self.lock().quarantined.clone()
    }

    /// How long `span`'s range has had this span (0 when first seen now). A new meta leader
    /// starts every range at zero.
    pub fn span_age_ms(&self, span: &RangeSpan) -> u64 {
        let inner = self.lock();
        match inner.spans.get(&span.range_id) {
            Some((start, end, since)) if *start == span.start_key && *end == span.end_key => {
                since.elapsed().as_millis() as u64
            }
            _ => 0,
        }
    }

    /// `(left, right)` of merges whose right range is frozen and no merge is running: a
    /// coordinator stopped half way, so the merge must be finished or undone.
    pub fn frozen_merges(&self) -> Vec<(RangeId, RangeId)> {
        self.frozen_merges_at(Instant::now())
    }

    /// [`MetaState::frozen_merges`] as of `now`.
    fn frozen_merges_at(&self, now: Instant) -> Vec<(RangeId, RangeId)> {
        let in_flight = self.busy();
        let mut inner = self.lock();
        // A frozen range that stopped reporting merged (or moved its leader away); its new
        // leader reports it again if not.
        inner.frozen.retain(|_, (_, seen)| {
            now.saturating_duration_since(*seen) < Duration::from_millis(FROZEN_REPORT_TTL_MS)
        });
        inner
            .frozen
            .iter()
            .filter(|(right, (left, _))| !in_flight.contains(right) && !in_flight.contains(left))
            .map(|(right, (left, _))| (*left, *right))
            .collect()
    }

    /// True while some range is reported frozen for a merge into `range_id`.
    pub fn merge_pending_into(&self, range_id: RangeId) -> bool {
        self.lock()
            .frozen
            .values()
            .any(|(into, _)| *into == range_id)
    }

    /// Forgets that `right` was reported frozen (it merged, or the merge was settled).
    pub fn forget_frozen(&self, right: RangeId) {
        self.lock().frozen.remove(&right);
    }

    /// Counts one action of `kind`.
    pub fn count(&self, kind: &'static str) {
        *self
            .counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(kind)
            .or_default() += 1;
    }
}

/// What the meta-range leader makes of one heartbeat.
#[derive(Debug, Default, PartialEq)]
pub struct HeartbeatOutcome {
    /// Descriptors newer than the meta range's copy, to write into it.
    pub upserts: Vec<RangeRecord>,
    /// Stored ranges a newer descriptor of `upserts` covers entirely: merged into it, so
    /// their descriptors go.
    pub merged_away: Vec<RangeId>,
    /// Replicas (range, replica id as reported) the reporting node must destroy.
    pub destroy: Vec<(RangeId, ReplicaId)>,
    /// Ranges reported without a descriptor that this leader lacks at the reported
    /// generation: the node's next report carries them.
    pub want_descriptors: Vec<RangeId>,
}

impl MetaState {
    /// Takes in one node's heartbeat at `now`, against `stored`, the meta range's copy of the
    /// descriptors: notes the node as heard from, tracks each replica's span, load and
    /// freeze, and decides which descriptors to write and which replicas the node destroys.
    pub fn take_report(
        &self,
        req: &NodeHeartbeatRequest,
        stored: &HashMap<RangeId, RangeRecord>,
        now: Instant,
    ) -> HeartbeatOutcome {
        let mut upserts: Vec<RangeRecord> = Vec::new();
        let mut destroy = Vec::new();
        let mut want_descriptors = Vec::new();
        {
            let mut inner = self.lock();
            inner.last_seen.insert(req.node_id, now);
            let reported: HashSet<RangeId> = req.replicas.iter().map(|r| r.range_id).collect();
            // A replica the node no longer reports (destroyed) is no longer quarantined.
            inner.quarantined.retain(|range_id, nodes| {
                if !reported.contains(range_id) {
                    nodes.remove(&req.node_id);
                }
                !nodes.is_empty()
            });
            for report in &req.replicas {
                let merged_away = merged_away(report, stored, &reported);
                let removed = merged_away || removed_from_range(report, stored);
                track_report(
                    &mut inner,
                    req.node_id,
                    report,
                    removed,
                    stored,
                    now,
                    &mut destroy,
                );
                let upserted = match &report.descriptor {
                    Some(d) => upsert(d, report, stored, &mut upserts),
                    None => false,
                };
                // Nodes leave out descriptors this leader acknowledged at their generation;
                // one it does not hold at that generation (a new leader, a write that did not
                // land, a range merged away, which is never stored) is asked for again, so a
                // replica of a merged-away range keeps showing its span until it is
                // collected.
                let behind = stored
                    .get(&report.range_id)
                    .is_none_or(|s| s.span.generation < report.generation);
                let unknown = !inner.spans.contains_key(&report.range_id);
                if report.generation > 0 && (behind || unknown) && !upserted {
                    want_descriptors.push(report.range_id);
                }
            }
        }
        let merged_away: Vec<RangeId> = stored
            .values()
            .filter(|s| {
                upserts.iter().any(|u| {
                    u.span.range_id != s.span.range_id
                        && u.span.generation > s.span.generation
                        && u.span.covers(&s.span)
                })
            })
            .map(|s| s.span.range_id)
            .collect();
        HeartbeatOutcome {
            upserts,
            merged_away,
            destroy,
            want_descriptors,
        }
    }
}

/// Adds `d` to `upserts` when it is newer than the meta copy and not superseded by a
/// merged range; returns whether it did.
fn upsert(
    d: &RangeDescriptor,
    report: &ReplicaReport,
    stored: &HashMap<RangeId, RangeRecord>,
    upserts: &mut Vec<RangeRecord>,
) -> bool {
    let newer = stored
        .get(&d.range_id)
        .is_none_or(|s| s.span.generation < d.generation);
    if !newer || upserts.iter().any(|u| u.span.range_id == d.range_id) {
        return false;
    }
    let record = record_from_wire(d, report_next_replica_id(report, d));
    // A range merged away reports its old span until its replicas stop; the merged range
    // covering it at a higher generation wins.
    let superseded = stored.values().any(|s| {
        s.span.range_id != d.range_id
            && s.span.overlaps(&record.span)
            && s.span.generation > d.generation
    });
    if superseded {
        return false;
    }
    upserts.push(record);
    true
}

/// Handles a node's heartbeat on the meta-range leader; `meta` is the local meta replica,
/// which leads the range, and `interval_ms` the node heartbeat period.
pub async fn handle_heartbeat(
    view: &MetaState,
    db: &Db,
    meta: &Replica,
    interval_ms: u64,
    req: NodeHeartbeatRequest,
) -> Result<NodeHeartbeatResponse, ClientError> {
    let term = meta.raft.metrics().borrow_watched().current_term;
    view.sync_term(term);
    let now = Instant::now();
    let stored: HashMap<RangeId, RangeRecord> = registry::ranges(db)
        .map_err(internal)?
        .into_iter()
        .map(|r| (r.span.range_id, r))
        .collect();
    let outcome = view.take_report(&req, &stored, now);
    if !outcome.upserts.is_empty() {
        write_descriptors(&meta.raft, outcome.upserts, outcome.merged_away).await?;
    }
    let nodes = registry::nodes(db).map_err(internal)?;
    let unreachable =
        view.unreachable_at(nodes.iter().map(|n| n.node_id), interval_ms, Instant::now());
    Ok(NodeHeartbeatResponse {
        destroy_replicas: outcome
            .destroy
            .into_iter()
            .map(|(range_id, replica_id)| RemovedReplica {
                range_id,
                replica_id,
            })
            .collect(),
        want_descriptors: outcome.want_descriptors,
        unreachable_nodes: unreachable,
        nodes: nodes
            .into_iter()
            .map(|n| NodeInfo {
                node_id: n.node_id,
                addr: n.addr,
            })
            .collect(),
    })
}

/// The next replica id a report implies: above every replica id it names.
fn report_next_replica_id(report: &ReplicaReport, d: &RangeDescriptor) -> ReplicaId {
    d.replicas
        .iter()
        .map(|r| r.replica_id + 1)
        .chain([report.replica_id + 1])
        .max()
        .unwrap_or(1)
}

/// True when the range's descriptor, at a newer generation, no longer lists the replica.
fn removed_from_range(report: &ReplicaReport, stored: &HashMap<RangeId, RangeRecord>) -> bool {
    stored.get(&report.range_id).is_some_and(|s| {
        s.span.generation > report.generation
            && report.replica_id < s.span.next_replica_id
            && !s.replicas.iter().any(|r| r.replica_id == report.replica_id)
    })
}

/// True for a replica of a range merged away (no descriptor; a range at a newer generation
/// covers its keys) that its node will not stop by itself: it is not frozen into a range
/// the node also holds (that replica stops when the node applies the merge).
fn merged_away(
    report: &ReplicaReport,
    stored: &HashMap<RangeId, RangeRecord>,
    reported: &HashSet<RangeId>,
) -> bool {
    let Some(d) = &report.descriptor else {
        return false;
    };
    if stored.contains_key(&report.range_id) {
        return false;
    }
    let span = record_from_wire(d, 0).span;
    let superseded = stored
        .values()
        .any(|s| s.span.generation > d.generation && s.span.overlaps(&span));
    superseded
        && report
            .frozen_into
            .is_none_or(|into| !reported.contains(&into))
}

/// Updates load and decides, with `removed` (the replica left its range), whether the
/// reporting node must destroy its replica.
fn track_report(
    inner: &mut MetaInner,
    node_id: NodeId,
    report: &ReplicaReport,
    removed: bool,
    stored: &HashMap<RangeId, RangeRecord>,
    now: Instant,
    destroy: &mut Vec<(RangeId, ReplicaId)>,
) {
    if let Some(d) = &report.descriptor {
        let same = inner
            .spans
            .get(&report.range_id)
            .is_some_and(|(s, e, _)| (s, e) == (&d.start_key, &d.end_key));
        if !same {
            inner.spans.insert(
                report.range_id,
                (d.start_key.clone(), d.end_key.clone(), now),
            );
        }
    }
    if report.quarantined {
        inner
            .quarantined
            .entry(report.range_id)
            .or_default()
            .insert(node_id, report.replica_id);
    } else if let Some(nodes) = inner.quarantined.get_mut(&report.range_id) {
        nodes.remove(&node_id);
        if nodes.is_empty() {
            inner.quarantined.remove(&report.range_id);
        }
    }
    if report.leader {
        match report.frozen_into {
            Some(into) => inner.frozen.insert(report.range_id, (into, now)),
            None => inner.frozen.remove(&report.range_id),
        };
        inner.loads.insert(
            report.range_id,
            RangeLoad {
                leader_node: Some(node_id),
                size_bytes: report.size_bytes,
                qps: report.qps,
            },
        );
    } else if let Some(load) = inner.loads.get_mut(&report.range_id) {
        // The node we took for the leader says it is not (any more).
        if load.leader_node == Some(node_id) {
            load.leader_node = None;
        }
    }
    let reported_generation = report.generation;
    let key = (node_id, report.range_id);
    if !removed {
        inner.gc_candidates.remove(&key);
        return;
    }
    let first = *inner.gc_candidates.entry(key).or_insert(now);
    if now.duration_since(first) >= Duration::from_millis(REPLICA_GC_GRACE_MS) {
        inner.gc_candidates.remove(&key);
        if let Some(s) = stored.get(&report.range_id) {
            tracing::info!(
                node_id,
                range_id = report.range_id,
                replica_id = report.replica_id,
                reported_generation,
                generation = s.span.generation,
                replicas = ?s.replicas,
                "replica no longer in its range; telling its node to destroy it"
            );
        } else {
            tracing::info!(
                node_id,
                range_id = report.range_id,
                reported_generation,
                "replica of a range merged away; telling its node to destroy it"
            );
        }
        destroy.push((report.range_id, report.replica_id));
    }
}

/// Writes newer descriptors into the meta range. A split's parent and child may overlap
/// here for a moment (the child reported first); routing prefers the range with the later
/// start, which is the child, and the parent's next report narrows it.
async fn write_descriptors(
    meta: &spheredb_raft::RaftHandle,
    upserts: Vec<RangeRecord>,
    merged_away: Vec<RangeId>,
) -> Result<(), ClientError> {
    let mut ops: Vec<WriteOp> = merged_away
        .iter()
        .map(|id| WriteOp {
            key: registry::range_key(*id),
            value: None,
        })
        .collect();
    for u in &upserts {
        ops.push(WriteOp {
            key: registry::range_key(u.span.range_id),
            value: Some(registry::encode(u).map_err(internal)?),
        });
    }
    write_meta(meta, ops).await?;
    tracing::debug!(count = upserts.len(), "meta descriptors updated");
    Ok(())
}

/// Proposes `ops` on the meta range.
pub async fn write_meta(
    meta: &spheredb_raft::RaftHandle,
    ops: Vec<WriteOp>,
) -> Result<(), ClientError> {
    match tokio::time::timeout(
        Duration::from_millis(META_WRITE_TIMEOUT_MS),
        meta.client_write(Command::Write {
            ops,
            commit_ts: None,
        }),
    )
    .await
    {
        Err(_) => Err(ClientError::Unavailable(
            "meta write did not commit in time".into(),
        )),
        Ok(Err(e)) => Err(write_error(e)),
        Ok(Ok(_)) => Ok(()),
    }
}

/// Records a node's liveness change in the meta range.
pub async fn write_liveness(
    meta: &spheredb_raft::RaftHandle,
    record: LivenessRecord,
) -> Result<(), ClientError> {
    let value = registry::encode(&record).map_err(internal)?;
    write_meta(
        meta,
        vec![WriteOp {
            key: registry::liveness_key(record.node_id),
            value: Some(value),
        }],
    )
    .await
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::descriptor::wire_descriptor;

    fn record(
        id: RangeId,
        start: &[u8],
        end: &[u8],
        generation: u64,
        nodes: &[NodeId],
    ) -> RangeRecord {
        crate::descriptor::test_record(id, start, end, generation, nodes)
    }

    /// Node `node`'s report of its replica (replica id `node`) of `r`.
    fn report(node: NodeId, r: &RangeRecord, leader: bool) -> ReplicaReport {
        ReplicaReport {
            range_id: r.span.range_id,
            replica_id: node,
            descriptor: Some(wire_descriptor(r)),
            generation: r.span.generation,
            leader,
            size_bytes: if leader { 100 } else { 0 },
            qps: if leader { 2.0 } else { 0.0 },
            frozen_into: None,
            quarantined: false,
        }
    }

    fn heartbeat(node: NodeId, replicas: Vec<ReplicaReport>) -> NodeHeartbeatRequest {
        NodeHeartbeatRequest {
            node_id: node,
            addr: format!("n{node}:1"),
            replicas,
        }
    }

    fn stored(records: &[RangeRecord]) -> HashMap<RangeId, RangeRecord> {
        records
            .iter()
            .map(|r| (r.span.range_id, r.clone()))
            .collect()
    }

    #[test]
    fn only_descriptors_newer_than_the_meta_copy_are_written() {
        let view = MetaState::default();
        let old = record(2, b"a", b"", 3, &[1, 2, 3]);
        let split_left = record(2, b"a", b"m", 4, &[1, 2, 3]);
        let now = Instant::now();
        let same = view.take_report(
            &heartbeat(1, vec![report(1, &old, true)]),
            &stored(std::slice::from_ref(&old)),
            now,
        );
        assert!(same.upserts.is_empty(), "{same:?}");
        let newer = view.take_report(
            &heartbeat(1, vec![report(1, &split_left, true)]),
            &stored(std::slice::from_ref(&old)),
            now,
        );
        assert_eq!(newer.upserts, vec![split_left]);
        assert!(newer.merged_away.is_empty());
        let older = view.take_report(
            &heartbeat(2, vec![report(2, &old, false)]),
            &stored(&[record(2, b"a", b"m", 4, &[1, 2, 3])]),
            now,
        );
        assert!(older.upserts.is_empty(), "{older:?}");
    }

    #[test]
    fn a_report_without_a_descriptor_the_leader_lacks_asks_for_it() {
        let view = MetaState::default();
        let r = record(2, b"a", b"", 3, &[1, 2, 3]);
        let bare = |r: &RangeRecord| ReplicaReport {
            descriptor: None,
            ..report(1, r, true)
        };
        let now = Instant::now();
        let meta_copy = stored(std::slice::from_ref(&r));
        // A leader that never saw this range's descriptor (new, or after a failover) asks.
        let fresh = view.take_report(&heartbeat(1, vec![bare(&r)]), &meta_copy, now);
        assert_eq!(fresh.want_descriptors, vec![2]);
        // Once it has it at this generation, a bare report is enough.
        view.take_report(&heartbeat(1, vec![report(1, &r, true)]), &meta_copy, now);
        let steady = view.take_report(&heartbeat(1, vec![bare(&r)]), &meta_copy, now);
        assert!(steady.want_descriptors.is_empty(), "{steady:?}");
        // A generation above the meta copy (its write did not land) is asked for again.
        let newer = record(2, b"a", b"m", 4, &[1, 2, 3]);
        let behind = view.take_report(&heartbeat(1, vec![bare(&newer)]), &meta_copy, now);
        assert_eq!(behind.want_descriptors, vec![2]);
        // A replica waiting for its first snapshot has no descriptor to send.
        let empty = ReplicaReport {
            generation: 0,
            ..bare(&r)
        };
        let waiting = view.take_report(&heartbeat(1, vec![empty]), &stored(&[]), now);
        assert!(waiting.want_descriptors.is_empty());
    }

    #[test]
    fn a_quarantined_replica_is_tracked_until_its_node_stops_reporting_it() {
        let view = MetaState::default();
        let r = record(2, b"a", b"", 3, &[1, 2, 3]);
        let meta_copy = stored(std::slice::from_ref(&r));
        let now = Instant::now();
        let damaged = ReplicaReport {
            quarantined: true,
            ..report(3, &r, false)
        };
        view.take_report(&heartbeat(3, vec![damaged]), &meta_copy, now);
        view.take_report(&heartbeat(1, vec![report(1, &r, true)]), &meta_copy, now);
        assert_eq!(view.quarantined().get(&2), Some(&BTreeMap::from([(3, 3)])));
        // Destroyed (no longer reported) or sound again: no longer quarantined.
        view.take_report(&heartbeat(3, Vec::new()), &meta_copy, now);
        assert!(view.quarantined().is_empty());
    }

    #[test]
    fn a_merged_descriptor_replaces_the_ranges_it_covers() {
        let view = MetaState::default();
        let left = record(2, b"a", b"m", 5, &[1, 2, 3]);
        let right = record(3, b"m", b"", 5, &[1, 2, 3]);
        let merged = record(2, b"a", b"", 6, &[1, 2, 3]);
        let outcome = view.take_report(
            &heartbeat(1, vec![report(1, &merged, true)]),
            &stored(&[left, right]),
            Instant::now(),
        );
        assert_eq!(outcome.upserts, vec![merged]);
        assert_eq!(outcome.merged_away, vec![3]);
    }

    #[test]
    fn a_merged_away_range_reporting_its_old_span_does_not_overwrite_the_merged_one() {
        let view = MetaState::default();
        let merged = record(2, b"a", b"", 6, &[1, 2, 3]);
        // Range 3 merged into 2; its replica on node 1 still reports a (newer than nothing)
        // descriptor until it stops.
        let right = record(3, b"m", b"", 5, &[1, 2, 3]);
        let outcome = view.take_report(
            &heartbeat(1, vec![report(1, &right, true)]),
            &stored(&[merged]),
            Instant::now(),
        );
        assert!(outcome.upserts.is_empty(), "{outcome:?}");
    }

    #[test]
    fn a_replica_removed_from_its_range_is_destroyed_only_after_the_grace_period() {
        let view = MetaState::default();
        let before = record(2, b"a", b"", 5, &[1, 2, 3]);
        // Replica 3 (node 3) was removed at generation 6; ids up to 3 were handed out.
        let mut after = record(2, b"a", b"", 6, &[1, 2]);
        after.span.next_replica_id = 4;
        let stored = stored(&[after]);
        let t0 = Instant::now();
        let hb = heartbeat(3, vec![report(3, &before, false)]);
        assert!(view.take_report(&hb, &stored, t0).destroy.is_empty());
        let grace = Duration::from_millis(REPLICA_GC_GRACE_MS);
        let early = view.take_report(&hb, &stored, t0 + grace / 2);
        assert!(early.destroy.is_empty(), "within the grace period");
        let late = view.take_report(&hb, &stored, t0 + grace);
        assert_eq!(late.destroy, vec![(2, 3)]);
    }

    #[test]
    fn a_replica_still_in_its_range_is_never_destroyed() {
        let view = MetaState::default();
        let r = record(2, b"a", b"", 5, &[1, 2, 3]);
        let stored = stored(std::slice::from_ref(&r));
        let hb = heartbeat(3, vec![report(3, &r, false)]);
        let t0 = Instant::now();
        view.take_report(&hb, &stored, t0);
        let later = view.take_report(&hb, &stored, t0 + Duration::from_secs(60));
        assert!(later.destroy.is_empty());
    }

    #[test]
    fn a_replica_of_a_range_merged_away_is_destroyed_unless_its_node_applies_the_merge_itself() {
        let merged = record(2, b"a", b"", 6, &[1, 2, 3]);
        let right = record(3, b"m", b"", 5, &[1, 2, 3]);
        let stored = stored(&[merged]);
        let grace = Duration::from_millis(REPLICA_GC_GRACE_MS);
        let t0 = Instant::now();

        // Alone on its node: nothing there will stop it.
        let view = MetaState::default();
        let hb = heartbeat(3, vec![report(3, &right, false)]);
        let first = view.take_report(&hb, &stored, t0);
        // Its descriptor is never stored, so the leader keeps asking for it: reports that
        // leave it out would hide the merge and restart the grace period every other time.
        assert_eq!(first.want_descriptors, vec![3]);
        assert_eq!(
            view.take_report(&hb, &stored, t0 + grace).destroy,
            vec![(3, 3)]
        );

        // Frozen into range 2, which the node also holds: applying the merge stops it.
        let view = MetaState::default();
        let mut frozen = report(3, &right, false);
        frozen.frozen_into = Some(2);
        let hb = heartbeat(
            3,
            vec![
                report(3, &record(2, b"a", b"m", 5, &[1, 2, 3]), false),
                frozen,
            ],
        );
        view.take_report(&hb, &stored, t0);
        assert!(view
            .take_report(&hb, &stored, t0 + grace)
            .destroy
            .is_empty());
    }

    #[test]
    fn leader_reports_carry_load_and_a_follower_unsets_a_leader_it_no_longer_is() {
        let view = MetaState::default();
        let r = record(2, b"a", b"", 5, &[1, 2, 3]);
        let stored = stored(std::slice::from_ref(&r));
        let now = Instant::now();
        view.take_report(&heartbeat(1, vec![report(1, &r, true)]), &stored, now);
        let load = view.loads()[&2].clone();
        assert_eq!((load.leader_node, load.size_bytes), (Some(1), 100));
        // A follower's report does not move the leader...
        view.take_report(&heartbeat(2, vec![report(2, &r, false)]), &stored, now);
        assert_eq!(view.loads()[&2].leader_node, Some(1));
        // ...but the reported leader saying it is a follower does.
        view.take_report(&heartbeat(1, vec![report(1, &r, false)]), &stored, now);
        assert_eq!(view.loads()[&2].leader_node, None);
    }

    #[test]
    fn frozen_ranges_are_merges_to_settle_until_forgotten_busy_or_silent() {
        let view = MetaState::default();
        let r = record(3, b"m", b"", 5, &[1, 2, 3]);
        let mut rep = report(1, &r, true);
        rep.frozen_into = Some(2);
        let t0 = Instant::now();
        view.take_report(&heartbeat(1, vec![rep]), &stored(&[r]), t0);
        assert_eq!(view.frozen_merges_at(t0), vec![(2, 3)]);
        assert!(view.merge_pending_into(2));
        assert!(!view.merge_pending_into(3));
        // A merge running on either range settles it already.
        assert!(view.claim(&[2]));
        assert!(view.frozen_merges_at(t0).is_empty());
        view.release(&[2]);
        // Not reported for the TTL: it merged or its leader moved.
        let ttl = Duration::from_millis(FROZEN_REPORT_TTL_MS);
        assert!(view.frozen_merges_at(t0 + ttl).is_empty());
        assert!(!view.merge_pending_into(2));
    }

    #[test]
    fn a_thawed_range_is_no_longer_a_merge_to_settle() {
        let view = MetaState::default();
        let r = record(3, b"m", b"", 5, &[1, 2, 3]);
        let stored = stored(std::slice::from_ref(&r));
        let mut rep = report(1, &r, true);
        rep.frozen_into = Some(2);
        let t0 = Instant::now();
        view.take_report(&heartbeat(1, vec![rep]), &stored, t0);
        assert!(view.merge_pending_into(2));
        view.take_report(&heartbeat(1, vec![report(1, &r, true)]), &stored, t0);
        assert!(view.frozen_merges_at(t0).is_empty());
        assert!(!view.merge_pending_into(2));
    }

    #[test]
    fn nodes_silent_past_the_limit_are_unreachable_and_a_new_view_gives_everyone_a_fresh_start() {
        let view = MetaState::default();
        view.sync_term(7);
        let t0 = Instant::now();
        let r = record(2, b"a", b"", 5, &[1, 2]);
        view.take_report(&heartbeat(1, vec![report(1, &r, true)]), &stored(&[r]), t0);
        let interval_ms = 100;
        let limit = Duration::from_millis(interval_ms * UNREACHABLE_AFTER_HEARTBEATS);
        // Node 2 never reported: silent since the view began, like node 1 since its report.
        assert!(view.unreachable_at([1, 2], interval_ms, t0).is_empty());
        let later = t0 + limit + Duration::from_millis(50);
        assert_eq!(view.unreachable_at([1, 2], interval_ms, later), vec![1, 2]);
        // Same term: nothing resets. A new term: a new view, nobody heard of yet.
        view.sync_term(7);
        assert_eq!(view.silence_ms_at(1, t0), 0);
        view.sync_term(8);
        assert!(view.loads().is_empty());
        assert!(view
            .unreachable_at([1, 2], interval_ms, Instant::now())
            .is_empty());
    }

    #[test]
    fn a_span_ages_from_when_it_was_first_reported_and_restarts_when_it_changes() {
        let view = MetaState::default();
        let wide = record(2, b"a", b"", 5, &[1]);
        let narrow = record(2, b"a", b"m", 6, &[1]);
        let t0 = Instant::now() - Duration::from_secs(30);
        view.take_report(
            &heartbeat(1, vec![report(1, &wide, true)]),
            &stored(std::slice::from_ref(&wide)),
            t0,
        );
        assert!(view.span_age_ms(&wide.span) >= 30_000);
        assert_eq!(
            view.span_age_ms(&narrow.span),
            0,
            "another span is a new one"
        );
        let now = Instant::now();
        view.take_report(
            &heartbeat(1, vec![report(1, &narrow, true)]),
            &stored(&[wide]),
            now,
        );
        assert!(view.span_age_ms(&narrow.span) < 30_000);
    }

    #[test]
    fn claims_take_every_range_or_none() {
        let view = MetaState::default();
        assert!(view.claim(&[2, 3]));
        assert!(!view.claim(&[3, 4]), "3 is taken");
        assert!(view.claim(&[4]), "the failed claim took nothing");
        view.release(&[2, 3]);
        assert!(view.claim(&[3]));
        assert_eq!(view.busy(), HashSet::from([3, 4]));
    }

    #[test]
    fn a_reported_descriptor_hands_out_replica_ids_above_every_one_it_names() {
        let r = record(2, b"a", b"", 5, &[1, 2, 3]);
        let mut rep = report(7, &r, true);
        assert_eq!(
            report_next_replica_id(&rep, rep.descriptor.as_ref().unwrap()),
            8
        );
        rep.replica_id = 1;
        assert_eq!(
            report_next_replica_id(&rep, rep.descriptor.as_ref().unwrap()),
            4
        );
    }
}
