//! The admin gRPC service: status, join, the range map, splits, decommissioning, leadership
//! transfers, and the node-to-node calls of the meta range and the allocator.
//!
//! A front door: it checks requests, proposes commands on local replicas, and hands merges,
//! splits and heartbeats to `range` and `meta`. It owns the per-range claim that keeps one
//! replica change (or merge step) at a time. It does not import `node`.

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::{ChangeMembers, Instant as _, ServerState};
use spheredb_client::proto::v1::admin_server::Admin;
use spheredb_client::proto::v1::{
    AllocRangeIdsRequest, AllocRangeIdsResponse, ChangeReplicasRequest, ChangeReplicasResponse,
    DecommissionRequest, DecommissionResponse, JoinRequest, JoinResponse, MergeRequest,
    MergeResponse, MergeStep, MergeStepRequest, MergeStepResponse, NodeHeartbeatRequest,
    NodeHeartbeatResponse, NodeInfo, RangeListRequest, RangeListResponse, RangeLoad, RangeStatus,
    ReplicaProgress, SplitRequest, SplitResponse, StatusRequest, StatusResponse,
    TransferLeaderRequest, TransferLeaderResponse,
};
use spheredb_client::{limits, ClientError};
use spheredb_raft::group_commit::GroupCommit;
use spheredb_raft::network::{Replica, ReplicaDirectory};
use spheredb_raft::registry::{self, NodeRecord, NodeState};
use spheredb_raft::{
    Command, CommandResponse, MergeFreeze, NodeId, RangeId, RangeSpan, ReplicaNode, WriteOp,
};
use spheredb_storage::{keys, ColumnFamilyName, Db};
use tonic::{Request, Response, Status};

use crate::descriptor::{record_from_wire, wire_descriptor};
use crate::errors::{internal, not_leader_hint, write_error};
use crate::meta::{write_meta, MetaState};
use crate::peers::Peers;
use crate::range::merge::{Merges, TonicMergeTransport};
use crate::replica::{descriptor, leader_node, leading_meta, meta_replica};

/// Largest join token accepted.
pub const MAX_JOIN_TOKEN_SIZE_BYTES: usize = 64;
/// Longest a join waits for its registration to commit.
pub const JOIN_COMMIT_TIMEOUT_MS: u64 = 5_000;
/// Most range ids one call allocates.
pub const MAX_RANGE_IDS_PER_CALL: u64 = 1024;
/// Longest a new replica may take to catch up before it is promoted to voter.
pub const LEARNER_CATCH_UP_TIMEOUT_MS: u64 = 30_000;
/// Longest a membership change waits to commit.
pub const MEMBERSHIP_CHANGE_TIMEOUT_MS: u64 = 10_000;

/// Who this node is, as the status call reports it.
#[derive(Debug, Clone)]
pub struct ThisNode {
    pub node_id: NodeId,
    pub cluster_id: u64,
    pub addr: String,
    pub started: Instant,
}

/// What the admin service works with.
pub struct AdminParts {
    pub this_node: ThisNode,
    pub db: Db,
    pub replicas: Arc<ReplicaDirectory>,
    pub peers: Arc<Peers>,
    /// The meta leader's view (loads, counters), and where heartbeats are taken in.
    pub view: Arc<MetaState>,
    pub merges: Arc<Merges<TonicMergeTransport>>,
    pub replication_factor: usize,
    /// The node heartbeat period, for the meta leader's liveness answers.
    pub node_heartbeat_interval_ms: u64,
    /// The node's WAL group commit, whose fsync counts the status reports.
    pub group_commit: GroupCommit,
}

/// The admin service of a node.
pub struct AdminService {
    parts: AdminParts,
    /// Ranges with a replica change or merge step running on this node (as their leader).
    changing: Mutex<HashSet<RangeId>>,
}

/// A claim on one range's replica changes; see [`AdminService::claim_change`].
struct ChangeGuard<'a> {
    changing: &'a Mutex<HashSet<RangeId>>,
    range_id: RangeId,
}

impl Drop for ChangeGuard<'_> {
    fn drop(&mut self) {
        self.changing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.range_id);
    }
}

type Reply<T> = Result<Response<T>, Status>;

fn answer<T>(r: Result<T, ClientError>) -> Reply<T> {
    r.map(Response::new).map_err(|e| e.to_status())
}

impl AdminService {
    /// This node's WAL fsyncs since it started and the log appends they made durable
    /// (`wal_synced_appends / wal_syncs` is the group commit's appends per fsync).
    fn wal_counters(&self) -> [(String, u64); 2] {
        let stats = self.parts.group_commit.stats();
        [
            ("wal_syncs".into(), stats.syncs.load(Ordering::Relaxed)),
            (
                "wal_synced_appends".into(),
                stats.completions.load(Ordering::Relaxed),
            ),
        ]
    }

    /// A service over `parts`.
    pub fn new(parts: AdminParts) -> Self {
        AdminService {
            parts,
            changing: Mutex::new(HashSet::new()),
        }
    }

    /// Claims `range_id` for one replica change; `None` while another change of the range
    /// runs here. The claim ends when the guard drops.
    fn claim_change(&self, range_id: RangeId) -> Option<ChangeGuard<'_>> {
        let claimed = self
            .changing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(range_id);
        // The guard is built only on success, and after the lock is released: dropping it
        // takes the lock.
        claimed.then(|| ChangeGuard {
            changing: &self.changing,
            range_id,
        })
    }

    /// Allocates a replica id for a new replica of `replica`'s range through its log, so an
    /// id is never handed out twice (see [`Command::AllocReplicaId`]).
    async fn alloc_replica_id(
        &self,
        replica: &Replica,
        expected_generation: u64,
    ) -> Result<u64, ClientError> {
        let write = replica.raft.client_write(Command::AllocReplicaId {
            expected_generation,
        });
        let resp = tokio::time::timeout(Duration::from_millis(MEMBERSHIP_CHANGE_TIMEOUT_MS), write)
            .await
            .map_err(|_| {
                ClientError::OutcomeUnknown("replica id allocation did not commit in time".into())
            })?
            .map_err(write_error)?;
        match resp.data {
            CommandResponse::ReplicaId { replica_id } => Ok(replica_id),
            CommandResponse::Rejected { reason } => Err(ClientError::StaleGeneration {
                message: reason,
                descriptors: descriptor(replica).into_iter().collect(),
            }),
            CommandResponse::Frozen { into } => Err(ClientError::Unavailable(format!(
                "range is frozen for a merge into range {into}"
            ))),
            CommandResponse::OutsideSpan { .. } => Err(ClientError::Unavailable(
                "the range's leader has no span yet (waiting for a snapshot); retry".into(),
            )),
            other => Err(internal(format!("unexpected response {other:?}"))),
        }
    }

    /// Every node this node knows, from the registry when it holds the meta range.
    fn nodes(&self) -> Vec<NodeInfo> {
        let mut nodes: Vec<NodeInfo> =
            match meta_replica(&self.parts.replicas).map(|_| registry::nodes(&self.parts.db)) {
                Some(Ok(registered)) => registered
                    .into_iter()
                    .map(|r| NodeInfo {
                        node_id: r.node_id,
                        addr: r.addr,
                    })
                    .collect(),
                _ => self
                    .parts
                    .peers
                    .known_nodes()
                    .into_iter()
                    .filter(|(id, _)| *id < u64::MAX / 2)
                    .map(|(node_id, addr)| NodeInfo { node_id, addr })
                    .collect(),
            };
        nodes.sort_by_key(|n| n.node_id);
        nodes
    }

    /// Record count and crc32 over every record of `span` in every data family, in order:
    /// replicas that applied the same log have the same digest.
    fn digest(&self, span: &RangeSpan) -> Result<(u64, u32), ClientError> {
        let mut hasher = crc32fast::Hasher::new();
        let mut count = 0u64;
        for cf in ColumnFamilyName::RANGE_DATA {
            hasher.update(cf.as_str().as_bytes());
            for item in self.parts.db.iter_span(cf, &span.start_key, &span.end_key) {
                let (k, v) = item.map_err(internal)?;
                hasher.update(&(k.len() as u32).to_le_bytes());
                hasher.update(&k);
                hasher.update(&v);
                count += 1;
            }
        }
        Ok((count, hasher.finalize()))
    }

    fn range_status(
        &self,
        replica: &Replica,
        include_digest: bool,
    ) -> Result<RangeStatus, ClientError> {
        let metrics = replica.raft.metrics().borrow_watched().clone();
        let node_of = |id: &u64| {
            metrics
                .membership_config
                .membership()
                .get_node(id)
                .map_or(0, |n: &ReplicaNode| n.node_id)
        };
        let leader = metrics.state == ServerState::Leader;
        let replicas = match (leader, &metrics.replication) {
            (true, Some(replication)) => {
                let heartbeat = metrics.heartbeat.clone().unwrap_or_default();
                replication
                    .iter()
                    .map(|(id, matched)| ReplicaProgress {
                        node_id: node_of(id),
                        matched_index: matched.as_ref().map(|l| l.index),
                        last_ack_ms: if *id == metrics.id {
                            Some(0)
                        } else {
                            heartbeat
                                .get(id)
                                .and_then(|t| t.as_ref())
                                .map(|t| (*t).into_inner().elapsed().as_millis() as u64)
                        },
                    })
                    .collect()
            }
            _ => Vec::new(),
        };
        let span = replica.shared.span();
        let (key_count, data_crc32) = match (&span, include_digest) {
            (Some(span), true) => {
                let (c, crc) = self.digest(span)?;
                (Some(c), Some(crc))
            }
            _ => (None, None),
        };
        Ok(RangeStatus {
            descriptor: descriptor(replica),
            leader_id: metrics.current_leader.as_ref().map(node_of),
            term: metrics.current_term,
            applied_index: metrics.last_applied.as_ref().map(|l| l.index),
            last_log_index: metrics.last_log_index,
            snapshot_index: metrics.snapshot.as_ref().map(|l| l.index),
            replicas,
            key_count,
            data_crc32,
            size_bytes: if leader {
                replica.size_bytes.load(Ordering::Relaxed)
            } else {
                0
            },
            qps: if leader { replica.qps() } else { 0.0 },
            quiesced: replica.quiesced.load(Ordering::Acquire),
            role: format!("{:?}", metrics.state).to_lowercase(),
            frozen_into: replica.shared.frozen().map(|f| f.into),
            frozen_left_generation: replica.shared.frozen().map_or(0, |f| f.left_generation),
            gc_horizon: replica.shared.gc_horizon(),
        })
    }

    /// The local replica of `range_id`, which must lead the range.
    fn leading(&self, range_id: u64) -> Result<Arc<Replica>, ClientError> {
        let replica = self.parts.replicas.get(range_id).ok_or_else(|| {
            ClientError::RangeNotFound(format!(
                "range {range_id} has no replica on node {}",
                self.parts.this_node.node_id
            ))
        })?;
        if !replica.raft.is_leader() {
            return Err(not_leader_hint(leader_node(&replica)));
        }
        replica.touch();
        Ok(replica)
    }

    /// The local meta replica, which must lead the meta range.
    fn meta_leading(&self) -> Result<Arc<Replica>, ClientError> {
        leading_meta(&self.parts.replicas)
            .ok_or_else(|| not_leader_hint(self.parts.peers.meta_leader_hint()))
    }

    async fn change_replicas_inner(
        &self,
        req: ChangeReplicasRequest,
    ) -> Result<ChangeReplicasResponse, ClientError> {
        let replica = self.leading(req.range_id)?;
        // One membership change at a time per range, whoever asks (two meta leaders in a
        // row may both have asked).
        let Some(_claim) = self.claim_change(req.range_id) else {
            return Err(ClientError::Unavailable(format!(
                "another replica change of range {} is running",
                req.range_id
            )));
        };
        if let Some(frozen) = replica.shared.frozen() {
            return Err(ClientError::Unavailable(format!(
                "range {} is frozen for a merge into range {}",
                req.range_id, frozen.into
            )));
        }
        let metrics = replica.raft.metrics().borrow_watched().clone();
        let Some(span) = replica.shared.span() else {
            return Err(ClientError::Unavailable(
                "range has no applied span yet".into(),
            ));
        };
        if span.generation != req.expected_generation {
            return Err(ClientError::StaleGeneration {
                message: format!(
                    "range {} is at generation {}",
                    req.range_id, span.generation
                ),
                descriptors: descriptor(&replica).into_iter().collect(),
            });
        }
        if metrics.membership_config.log_id() != metrics.committed_membership_config.log_id() {
            return Err(ClientError::Unavailable(format!(
                "a replica change is still in progress: membership {} (committed {}), last log {:?}, committed {:?}, replication {:?}, state {:?}",
                metrics.membership_config,
                metrics.committed_membership_config,
                metrics.last_log_index,
                metrics.local_committed,
                metrics.replication,
                metrics.state,
            )));
        }
        let membership = metrics.membership_config.membership().clone();
        let replica_of = |node: u64| {
            membership
                .nodes()
                .find(|(_, n)| n.node_id == node)
                .map(|(id, _)| *id)
        };
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let timed = |ms: u64| Duration::from_millis(ms);
        match (req.add_node_id, req.remove_node_id) {
            (Some(node), None) => {
                let rid = match replica_of(node) {
                    Some(rid) if voters.contains(&rid) => None,
                    Some(rid) => Some(rid),
                    None => {
                        let addr = self
                            .parts
                            .peers
                            .known_nodes()
                            .get(&node)
                            .cloned()
                            .ok_or_else(|| {
                                ClientError::Unavailable(format!(
                                    "address of node {node} not known yet"
                                ))
                            })?;
                        let rid = self
                            .alloc_replica_id(&replica, req.expected_generation)
                            .await?;
                        let add = replica.raft.add_learner(
                            rid,
                            ReplicaNode {
                                node_id: node,
                                addr,
                            },
                            true,
                        );
                        tokio::time::timeout(timed(LEARNER_CATCH_UP_TIMEOUT_MS), add)
                            .await
                            .map_err(|_| {
                                ClientError::Unavailable(
                                    "new replica did not catch up in time".into(),
                                )
                            })?
                            .map_err(write_error)?;
                        Some(rid)
                    }
                };
                if let Some(rid) = rid {
                    let change = replica.raft.change_membership(
                        ChangeMembers::AddVoterIds(BTreeSet::from([rid])),
                        false,
                    );
                    tokio::time::timeout(timed(MEMBERSHIP_CHANGE_TIMEOUT_MS), change)
                        .await
                        .map_err(|_| {
                            ClientError::OutcomeUnknown("promotion did not commit in time".into())
                        })?
                        .map_err(write_error)?;
                }
            }
            (None, Some(node)) => {
                let Some(rid) = replica_of(node) else {
                    return Ok(ChangeReplicasResponse {
                        descriptor: descriptor(&replica),
                    });
                };
                if rid == metrics.id {
                    // Never remove the leader under itself: hand over first.
                    if let Some(to) = voters.iter().find(|v| **v != rid) {
                        replica
                            .raft
                            .trigger()
                            .transfer_leader(*to)
                            .await
                            .map_err(internal)?;
                    }
                    return Err(ClientError::Unavailable(
                        "the leader's own replica: leadership is being transferred first".into(),
                    ));
                }
                let change = if voters.contains(&rid) {
                    replica.raft.change_membership(
                        ChangeMembers::RemoveVoters(BTreeSet::from([rid])),
                        false,
                    )
                } else {
                    replica
                        .raft
                        .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([rid])), false)
                };
                tokio::time::timeout(timed(MEMBERSHIP_CHANGE_TIMEOUT_MS), change)
                    .await
                    .map_err(|_| {
                        ClientError::OutcomeUnknown("removal did not commit in time".into())
                    })?
                    .map_err(write_error)?;
            }
            _ => {
                return Err(ClientError::InvalidArgument(
                    "set exactly one of add_node_id and remove_node_id".into(),
                ))
            }
        }
        Ok(ChangeReplicasResponse {
            descriptor: descriptor(&replica),
        })
    }

    /// Runs one step of a merge on this range's leader (see `crate::range::merge`).
    async fn merge_step_inner(
        &self,
        req: MergeStepRequest,
    ) -> Result<MergeStepResponse, ClientError> {
        let replica = self.leading(req.range_id)?;
        let right = || {
            req.right
                .as_ref()
                .map(|d| record_from_wire(d, 0).span)
                .ok_or_else(|| ClientError::InvalidArgument("the step needs `right`".into()))
        };
        let cmd = match MergeStep::try_from(req.step) {
            Ok(MergeStep::Freeze) => Command::Freeze {
                into: req.into,
                left_generation: req.left_generation,
                expected_generation: req.expected_generation,
            },
            Ok(MergeStep::Thaw) => Command::Thaw {
                freeze: MergeFreeze {
                    into: req.into,
                    left_generation: req.left_generation,
                },
            },
            Ok(MergeStep::Merge) => Command::Merge {
                right: right()?,
                expected_generation: req.expected_generation,
            },
            Ok(MergeStep::Abort) => Command::AbortMerge {
                right: right()?,
                left_generation: req.left_generation,
            },
            Ok(MergeStep::Unspecified) | Err(_) => {
                return Err(ClientError::InvalidArgument(format!(
                    "unknown merge step {}",
                    req.step
                )))
            }
        };
        // Not while a replica change of the range runs: a frozen range must keep the
        // replicas the merge was planned on.
        let Some(_claim) = self.claim_change(req.range_id) else {
            return Err(ClientError::Unavailable(format!(
                "a replica change of range {} is running",
                req.range_id
            )));
        };
        let write = replica.raft.client_write(cmd);
        let resp = tokio::time::timeout(Duration::from_millis(MEMBERSHIP_CHANGE_TIMEOUT_MS), write)
            .await
            .map_err(|_| ClientError::OutcomeUnknown("merge step did not commit in time".into()))?
            .map_err(write_error)?;
        let merged = match resp.data {
            CommandResponse::MergeAborted { merged, .. } => merged,
            CommandResponse::FreezeDone { .. }
            | CommandResponse::MergeDone { .. }
            | CommandResponse::Done => false,
            CommandResponse::Frozen { into } => {
                return Err(ClientError::Unavailable(format!(
                    "range {} is frozen for a merge into range {into}",
                    req.range_id
                )))
            }
            CommandResponse::Rejected { reason } => {
                return Err(ClientError::StaleGeneration {
                    message: reason,
                    descriptors: descriptor(&replica).into_iter().collect(),
                })
            }
            other => return Err(internal(format!("unexpected response {other:?}"))),
        };
        Ok(MergeStepResponse {
            descriptor: descriptor(&replica),
            merged,
        })
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn merge(&self, request: Request<MergeRequest>) -> Reply<MergeResponse> {
        let req = request.into_inner();
        let result = async {
            self.meta_leading()?;
            let merged = self
                .parts
                .merges
                .merge_ranges(req.left_range_id, req.expected_right_range_id)
                .await?;
            Ok(MergeResponse {
                merged: Some(wire_descriptor(&merged)),
            })
        }
        .await;
        answer(result)
    }

    async fn merge_step(&self, request: Request<MergeStepRequest>) -> Reply<MergeStepResponse> {
        answer(self.merge_step_inner(request.into_inner()).await)
    }

    async fn status(&self, request: Request<StatusRequest>) -> Reply<StatusResponse> {
        let include_digest = request.into_inner().include_digest;
        let result = (|| {
            let mut replicas = self.parts.replicas.all();
            replicas.sort_by_key(|r| r.shared.range_id);
            let ranges = replicas
                .iter()
                .map(|r| self.range_status(r, include_digest))
                .collect::<Result<Vec<_>, _>>()?;
            let counters = self
                .parts
                .view
                .counters
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .chain(self.wal_counters())
                .collect();
            Ok(StatusResponse {
                node_id: self.parts.this_node.node_id,
                addr: self.parts.this_node.addr.clone(),
                cluster_id: self.parts.this_node.cluster_id,
                nodes: self.nodes(),
                ranges,
                uptime_ms: self.parts.this_node.started.elapsed().as_millis() as u64,
                version: env!("CARGO_PKG_VERSION").to_string(),
                counters,
            })
        })();
        answer(result)
    }

    async fn join(&self, request: Request<JoinRequest>) -> Reply<JoinResponse> {
        let req = request.into_inner();
        let result = async {
            if req.addr.is_empty()
                || req.addr.parse::<std::net::SocketAddr>().is_err() && !req.addr.contains(':')
            {
                return Err(ClientError::InvalidArgument(format!(
                    "join address {:?} is not HOST:PORT",
                    req.addr
                )));
            }
            if req.join_token.is_empty() || req.join_token.len() > MAX_JOIN_TOKEN_SIZE_BYTES {
                return Err(ClientError::InvalidArgument(format!(
                    "join token must be 1..={MAX_JOIN_TOKEN_SIZE_BYTES} bytes"
                )));
            }
            let meta = self.meta_leading()?;
            let write = meta.raft.client_write(Command::RegisterNode {
                join_token: req.join_token,
                addr: req.addr,
            });
            match tokio::time::timeout(Duration::from_millis(JOIN_COMMIT_TIMEOUT_MS), write).await {
                Err(_) => Err(ClientError::Unavailable(
                    "join not committed in time; retry".into(),
                )),
                Ok(Err(e)) => Err(write_error(e)),
                Ok(Ok(resp)) => match resp.data {
                    CommandResponse::NodeRegistered {
                        node_id,
                        cluster_id,
                    } => Ok(JoinResponse {
                        node_id,
                        cluster_id,
                    }),
                    CommandResponse::Rejected { reason } => Err(ClientError::Unavailable(reason)),
                    other => Err(internal(format!("unexpected response {other:?}"))),
                },
            }
        }
        .await;
        answer(result)
    }

    async fn range_list(&self, request: Request<RangeListRequest>) -> Reply<RangeListResponse> {
        let req = request.into_inner();
        let result = (|| {
            let Some(meta) = meta_replica(&self.parts.replicas) else {
                return Err(not_leader_hint(self.parts.peers.meta_leader_hint()));
            };
            let limit = match req.limit {
                0 => limits::DEFAULT_RANGE_LIST_PAGE_RANGES,
                n => n.min(limits::MAX_RANGE_LIST_PAGE_RANGES),
            };
            let (records, more) = registry::ranges_page(
                &self.parts.db,
                req.after_range_id,
                limit as usize,
                limits::MAX_RANGE_LIST_RESPONSE_BYTES,
            )
            .map_err(internal)?;
            let loads = if meta.raft.is_leader() {
                let mut loads = self.parts.view.loads();
                records
                    .iter()
                    .filter_map(|r| {
                        let range_id = r.span.range_id;
                        loads.remove(&range_id).map(|l| RangeLoad {
                            range_id,
                            leader_node_id: l.leader_node,
                            size_bytes: l.size_bytes,
                            qps: l.qps,
                        })
                    })
                    .collect()
            } else {
                Vec::new()
            };
            Ok(RangeListResponse {
                ranges: records.iter().map(wire_descriptor).collect(),
                nodes: self.nodes(),
                leader_id: leader_node(&meta).map(|n| n.node_id),
                loads,
                more,
            })
        })();
        answer(result)
    }

    async fn split(&self, request: Request<SplitRequest>) -> Reply<SplitResponse> {
        let req = request.into_inner();
        let result = async {
            let replica = self.parts.replicas.covering(&req.split_key).ok_or_else(|| {
                ClientError::RangeNotFound(format!(
                    "no range holding the key has a replica on node {}; send the split to the range's leader",
                    self.parts.this_node.node_id
                ))
            })?;
            // Splitting where a range already starts is done already (a retried split).
            if let Some(record) = replica.shared.record() {
                if record.span.start_key.as_slice() == keys::row_prefix(&req.split_key) {
                    return Ok(SplitResponse {
                        left: None,
                        right: Some(wire_descriptor(&record)),
                    });
                }
            }
            let (left, right) = crate::range::split::split_range(&self.parts.peers, &self.parts.view, &replica, &req.split_key).await?;
            Ok(SplitResponse {
                left: Some(wire_descriptor(&left)),
                right: Some(wire_descriptor(&right)),
            })
        }
        .await;
        answer(result)
    }

    async fn decommission(
        &self,
        request: Request<DecommissionRequest>,
    ) -> Reply<DecommissionResponse> {
        let req = request.into_inner();
        let result = async {
            let meta = self.meta_leading()?;
            let nodes = registry::nodes(&self.parts.db).map_err(internal)?;
            let Some(node) = nodes.iter().find(|n| n.node_id == req.node_id) else {
                return Err(ClientError::InvalidArgument(format!("node {} is not registered", req.node_id)));
            };
            let active_others = nodes
                .iter()
                .filter(|n| n.node_id != req.node_id && n.state == NodeState::Active)
                .count();
            if node.state == NodeState::Active {
                if active_others < self.parts.replication_factor {
                    return Err(ClientError::InvalidArgument(format!(
                        "only {active_others} other active nodes: decommissioning node {} would leave ranges under the replication factor of {}",
                        req.node_id, self.parts.replication_factor
                    )));
                }
                let draining = NodeRecord { state: NodeState::Decommissioning, ..node.clone() };
                let value = registry::encode(&draining).map_err(internal)?;
                write_meta(&meta.raft, vec![WriteOp { key: registry::node_key(req.node_id), value: Some(value) }]).await?;
                tracing::info!(node_id = req.node_id, "decommissioning");
            }
            let replicas_left = registry::ranges(&self.parts.db)
                .map_err(internal)?
                .iter()
                .filter(|r| r.replica_on(req.node_id).is_some())
                .count() as u64;
            Ok(DecommissionResponse { replicas_left })
        }
        .await;
        answer(result)
    }

    async fn transfer_leader(
        &self,
        request: Request<TransferLeaderRequest>,
    ) -> Reply<TransferLeaderResponse> {
        let req = request.into_inner();
        let result = async {
            let replica = self.leading(req.range_id)?;
            let metrics = replica.raft.metrics().borrow_watched().clone();
            let target = metrics
                .membership_config
                .membership()
                .nodes()
                .find(|(_, n)| n.node_id == req.to_node_id)
                .map(|(id, _)| *id)
                .ok_or_else(|| {
                    ClientError::InvalidArgument(format!(
                        "node {} has no replica of range {}",
                        req.to_node_id, req.range_id
                    ))
                })?;
            if target != metrics.id {
                // A fresh entry first: it wakes quiesced followers and makes the target's
                // flushed log (which openraft checks before taking over) current.
                let nudge = replica.raft.client_write(Command::Write {
                    ops: Vec::new(),
                    commit_ts: None,
                });
                tokio::time::timeout(Duration::from_millis(MEMBERSHIP_CHANGE_TIMEOUT_MS), nudge)
                    .await
                    .map_err(|_| ClientError::Unavailable("range did not commit in time".into()))?
                    .map_err(write_error)?;
                let metrics = replica.raft.metrics().borrow_watched().clone();
                // Only to a replica holding the whole log: openraft's transfer stops the
                // leader from serving until the target wins, which a lagging one cannot.
                let last = metrics.last_log_index;
                let caught_up = metrics
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&target))
                    .is_some_and(|m| m.as_ref().map(|l| l.index) == last);
                if !caught_up {
                    return Err(ClientError::Unavailable(format!(
                        "node {} is not caught up with range {}; not transferring",
                        req.to_node_id, req.range_id
                    )));
                }
                replica.note_transfer();
                replica
                    .raft
                    .trigger()
                    .transfer_leader(target)
                    .await
                    .map_err(internal)?;
            }
            Ok(TransferLeaderResponse {})
        }
        .await;
        answer(result)
    }

    async fn change_replicas(
        &self,
        request: Request<ChangeReplicasRequest>,
    ) -> Reply<ChangeReplicasResponse> {
        answer(self.change_replicas_inner(request.into_inner()).await)
    }

    async fn node_heartbeat(
        &self,
        request: Request<NodeHeartbeatRequest>,
    ) -> Reply<NodeHeartbeatResponse> {
        let result = async {
            let meta = self.meta_leading()?;
            crate::meta::handle_heartbeat(
                &self.parts.view,
                &self.parts.db,
                &meta,
                self.parts.node_heartbeat_interval_ms,
                request.into_inner(),
            )
            .await
        }
        .await;
        answer(result)
    }

    async fn alloc_range_ids(
        &self,
        request: Request<AllocRangeIdsRequest>,
    ) -> Reply<AllocRangeIdsResponse> {
        let count = request.into_inner().count;
        let result = async {
            if count == 0 || count > MAX_RANGE_IDS_PER_CALL {
                return Err(ClientError::InvalidArgument(format!(
                    "count must be 1..={MAX_RANGE_IDS_PER_CALL}"
                )));
            }
            let meta = self.meta_leading()?;
            let write = meta.raft.client_write(Command::AllocRangeIds { count });
            match tokio::time::timeout(Duration::from_millis(JOIN_COMMIT_TIMEOUT_MS), write).await {
                Err(_) => Err(ClientError::OutcomeUnknown(
                    "allocation not committed in time".into(),
                )),
                Ok(Err(e)) => Err(write_error(e)),
                Ok(Ok(resp)) => match resp.data {
                    CommandResponse::RangeIds { first, .. } => Ok(AllocRangeIdsResponse { first }),
                    other => Err(internal(format!("unexpected response {other:?}"))),
                },
            }
        }
        .await;
        answer(result)
    }
}
