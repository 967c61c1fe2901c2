//! The meta range's leader as the cluster's bookkeeper: the receiving end of every node's
//! heartbeat, and the allocator.
//!
//! Each node reports its replicas every heartbeat period (descriptor, leadership, size,
//! load). The meta-range leader keeps liveness and load in memory ([`MetaState`]), writes
//! any descriptor it sees at a newer generation into the meta range, and answers with the
//! replicas the node must destroy (removed from their range) and the nodes that stopped
//! reporting (so quiesced ranges they lead wake up and elect). What it decides from a report
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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use spheredb_client::proto::v1::{
    NodeHeartbeatRequest, NodeHeartbeatResponse, NodeInfo, RangeDescriptor, ReplicaReport,
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
    /// Ranges whose replica the reporting node must destroy.
    pub destroy: Vec<RangeId>,
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
        {
            let mut inner = self.lock();
            inner.last_seen.insert(req.node_id, now);
            let reported: HashSet<RangeId> = req.replicas.iter().map(|r| r.range_id).collect();
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
                let Some(d) = &report.descriptor else {
                    continue;
                };
                let newer = stored
                    .get(&d.range_id)
                    .is_none_or(|s| s.span.generation < d.generation);
                if !newer || upserts.iter().any(|u| u.span.range_id == d.range_id) {
                    continue;
                }
                let record = record_from_wire(d, report_next_replica_id(report, d));
                // A range merged away reports its old span until its replicas stop; the
                // merged range covering it at a higher generation wins.
                let superseded = stored.values().any(|s| {
                    s.span.range_id != d.range_id
                        && s.span.overlaps(&record.span)
                        && s.span.generation > d.generation
                });
                if !superseded {
                    upserts.push(record);
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
        }
    }
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
        destroy_ranges: outcome.destroy,
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
    destroy: &mut Vec<RangeId>,
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
        destroy.push(report.range_id);
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
        meta.client_write(Command::Write { ops }),
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
