//! A running SphereDB node: storage, one Raft group per range replica, the gRPC server, and
//! the background loops that keep ranges placed (heartbeats to the meta range, the allocator
//! on the meta-range leader, splits, quiescence, replica creation and destruction).

pub mod disk;
pub mod health;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use openraft::async_runtime::WatchReceiver;
use openraft::{Config, SnapshotPolicy};
use rocksdb::WriteBatch;
use serde::{Deserialize, Serialize};
use spheredb_client::limits;
use spheredb_client::proto::raft::raft_transport_server::RaftTransportServer;
use spheredb_client::proto::v1::admin_client::AdminClient;
use spheredb_client::proto::v1::admin_server::AdminServer;
use spheredb_client::proto::v1::kv_server::KvServer;
use spheredb_client::proto::v1::{JoinRequest, NodeInfo, RangeDescriptor, Replica as WireReplica};
use spheredb_client::ClientError;
use spheredb_raft::group_commit::GroupCommit;
use spheredb_raft::layout::{state_key, StateTag, NODE_RECORDS};
use spheredb_raft::log_store::{
    destroy_replica, encode_record, local_ranges, read_state, write_state, LogStore,
};
use spheredb_raft::network::{
    PeerChannels, RaftService, Replica, ReplicaDirectory, ReplicaRequest, TransportFaults,
    MAX_PENDING_REPLICA_REQUESTS, MAX_RAFT_MESSAGE_SIZE_BYTES,
};
use spheredb_raft::registry::{self, NodeRecord, NodeState};
use spheredb_raft::state_machine::{
    stored_state, write_range_origin, RangeEvent, StateMachine, MAX_PENDING_RANGE_EVENTS,
};
use spheredb_raft::{
    Membership, NodeId, RaftHandle, RangeId, RangeRecord, RangeSpan, ReplicaId, ReplicaNode,
};
use spheredb_storage::{keys, ColumnFamilyName, Db, DbOptions};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use crate::config::NodeConfig;
use crate::meta::MetaState;
use crate::service::admin::AdminService;
use crate::service::kv::KvService;

/// The meta range: descriptors, node registry, liveness. Never splits, never quiesces.
pub const META_RANGE_ID: RangeId = 1;
/// The range a new cluster starts with for all user data.
pub const FIRST_USER_RANGE_ID: RangeId = 2;
/// How long a joining node keeps trying to reach the cluster.
pub const JOIN_DEADLINE_MS: u64 = 120_000;
/// Time allowed for one join attempt.
pub const JOIN_ATTEMPT_TIMEOUT_MS: u64 = 5_000;
/// Pause between join attempts.
pub const JOIN_RETRY_PAUSE_MS: u64 = 500;
/// Time allowed for one node-to-node admin call.
pub const PEER_CALL_TIMEOUT_MS: u64 = 5_000;
/// Most nodes a call to the meta-range leader tries before giving up.
pub const META_CALL_ATTEMPTS: usize = 6;

/// The meta range's span: every system key.
pub fn meta_span() -> (Vec<u8>, Vec<u8>) {
    (Vec::new(), vec![keys::SPHERE_PREFIX])
}

/// What a node remembers about itself across restarts.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct NodeIdentity {
    node_id: NodeId,
    cluster_id: u64,
    addr: String,
}

/// State shared by the services and loops of a node.
pub struct NodeShared {
    pub node_id: NodeId,
    pub cluster_id: u64,
    pub addr: String,
    pub db: Db,
    pub started: Instant,
    pub group_commit: GroupCommit,
    /// Refuses client writes while the disk is nearly full.
    pub disk: Arc<crate::node::disk::DiskGuard>,
    pub cfg: NodeConfig,
    pub replicas: Arc<ReplicaDirectory>,
    peers: PeerChannels,
    raft_config: Arc<Config>,
    events: mpsc::Sender<RangeEvent>,
    snapshot_dir: PathBuf,
    /// Addresses of the nodes this node knows, by id.
    known_nodes: RwLock<HashMap<NodeId, String>>,
    /// The node believed to lead the meta range.
    meta_leader: RwLock<Option<NodeId>>,
    admin_channels: Mutex<HashMap<String, Channel>>,
    /// Ranges with a replica change running on this node (as their leader).
    changing: Mutex<std::collections::HashSet<RangeId>>,
    /// The meta-range leader's view of the cluster (used only while this node leads it).
    pub meta: MetaState,
}

impl NodeShared {
    /// The local replica of `range_id`.
    pub fn replica(&self, range_id: RangeId) -> Option<Arc<Replica>> {
        self.replicas.get(range_id)
    }

    /// The local replica of the meta range.
    pub fn meta_replica(&self) -> Option<Arc<Replica>> {
        self.replica(META_RANGE_ID)
    }

    /// The descriptor of a local replica as it has applied it.
    pub fn record(&self, replica: &Replica) -> Option<RangeRecord> {
        replica.shared.record()
    }

    /// The descriptor of a local replica on the wire.
    pub fn descriptor(&self, replica: &Replica) -> Option<RangeDescriptor> {
        self.record(replica).map(|r| wire_descriptor(&r))
    }

    /// The node hosting replica `replica_id` of a local range, from its membership.
    pub fn replica_node(&self, replica: &Replica, replica_id: ReplicaId) -> Option<NodeInfo> {
        let metrics = replica.raft.metrics().borrow_watched().clone();
        metrics
            .membership_config
            .membership()
            .get_node(&replica_id)
            .map(|n| NodeInfo {
                node_id: n.node_id,
                addr: n.addr.clone(),
            })
    }

    /// The node leading a local range, when known.
    pub fn leader_node(&self, replica: &Replica) -> Option<NodeInfo> {
        let leader = replica.raft.metrics().borrow_watched().current_leader?;
        self.replica_node(replica, leader)
    }

    /// True when the local replica of `range_id` leads it.
    pub fn is_leader(&self, range_id: RangeId) -> bool {
        self.replica(range_id).is_some_and(|r| r.raft.is_leader())
    }

    /// Finds the local replica a request for `range_id` at `generation` touching `key` must go
    /// to, or the error that tells the client where to go instead.
    pub fn route(
        &self,
        range_id: RangeId,
        generation: u64,
        key: &[u8],
    ) -> Result<Arc<Replica>, ClientError> {
        let Some(replica) = self.replica(range_id) else {
            return Err(self.not_here(range_id, key));
        };
        let Some(desc) = self.descriptor(&replica) else {
            return Err(ClientError::RangeNotFound(format!(
                "range {range_id} is still being copied to this node; ask its leader"
            )));
        };
        if desc.generation != generation {
            return Err(ClientError::StaleGeneration {
                message: format!(
                    "range {range_id} is at generation {}, the request named {generation}",
                    desc.generation
                ),
                descriptors: self.hint_descriptors(&desc, key),
            });
        }
        if !keys::span_contains(&desc.start_key, &desc.end_key, key) {
            return Err(ClientError::KeyNotInRange {
                message: format!("key is outside range {range_id}"),
                descriptors: self.hint_descriptors(&desc, key),
            });
        }
        if let Some(frozen) = replica.shared.frozen() {
            return Err(ClientError::Unavailable(format!(
                "range {range_id} is being merged into range {}; retry shortly",
                frozen.into
            )));
        }
        // A leader wakes for the request. A follower stays as it is: it only answers
        // NotLeader, and waking its election timer while the leader sleeps would start an
        // election nobody needs.
        if replica.raft.is_leader() {
            replica.touch();
        }
        Ok(replica)
    }

    /// The error for a request naming a range this node has no replica of.
    fn not_here(&self, range_id: RangeId, key: &[u8]) -> ClientError {
        match self
            .replicas
            .covering(key)
            .and_then(|r| self.descriptor(&r))
        {
            Some(desc) => ClientError::KeyNotInRange {
                message: format!(
                    "range {range_id} has no replica on node {}; range {} holds the key",
                    self.node_id, desc.range_id
                ),
                descriptors: vec![desc],
            },
            None => ClientError::RangeNotFound(format!(
                "range {range_id} has no replica on node {}; reload the range map (Admin.RangeList)",
                self.node_id
            )),
        }
    }

    /// `desc`, plus the local range now holding `key` when that is another one.
    fn hint_descriptors(&self, desc: &RangeDescriptor, key: &[u8]) -> Vec<RangeDescriptor> {
        let mut out = vec![desc.clone()];
        if let Some(other) = self.replicas.covering(key) {
            if other.shared.range_id != desc.range_id {
                out.extend(self.descriptor(&other));
            }
        }
        out
    }

    /// Addresses of the nodes this node knows.
    pub fn known_nodes(&self) -> HashMap<NodeId, String> {
        self.known_nodes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records node addresses learnt from the meta range.
    pub fn learn_nodes(&self, nodes: impl IntoIterator<Item = (NodeId, String)>) {
        let mut known = self.known_nodes.write().unwrap_or_else(|p| p.into_inner());
        for (id, addr) in nodes {
            known.insert(id, addr);
        }
    }

    /// Claims `range_id` for one replica change; `None` while another change of the range
    /// runs here. The claim ends when the guard drops.
    pub fn claim_change(&self, range_id: RangeId) -> Option<ChangeGuard<'_>> {
        let claimed = self
            .changing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(range_id);
        // The guard is built only on success, and after the lock is released: dropping it
        // takes the lock.
        claimed.then(|| ChangeGuard {
            shared: self,
            range_id,
        })
    }

    /// The node's connections to its peers.
    pub fn peers(&self) -> &PeerChannels {
        &self.peers
    }

    /// The meta-range leader as this node knows it.
    pub fn meta_leader_hint(&self) -> Option<NodeInfo> {
        if let Some(r) = self.meta_replica() {
            if let Some(n) = self.leader_node(&r) {
                return Some(n);
            }
        }
        let id = (*self.meta_leader.read().unwrap_or_else(|p| p.into_inner()))?;
        let addr = self.known_nodes().get(&id)?.clone();
        Some(NodeInfo { node_id: id, addr })
    }

    /// An admin stub for the node at `addr`.
    pub fn admin(&self, addr: &str) -> Result<AdminClient<Channel>, ClientError> {
        let mut channels = self
            .admin_channels
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let channel = match channels.get(addr) {
            Some(c) => c.clone(),
            None => {
                let c = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                    .map_err(|e| ClientError::InvalidArgument(format!("bad address {addr}: {e}")))?
                    .connect_timeout(Duration::from_millis(PEER_CALL_TIMEOUT_MS))
                    .tcp_nodelay(true)
                    .connect_lazy();
                channels.insert(addr.to_string(), c.clone());
                c
            }
        };
        Ok(AdminClient::new(channel)
            .max_decoding_message_size(limits::MAX_GRPC_MESSAGE_SIZE_BYTES)
            .max_encoding_message_size(limits::MAX_GRPC_MESSAGE_SIZE_BYTES))
    }

    /// Calls the meta-range leader, following `NotLeader` hints, trying at most
    /// [`META_CALL_ATTEMPTS`] nodes.
    pub async fn call_meta<T, F, Fut>(&self, call: F) -> Result<T, ClientError>
    where
        F: Fn(AdminClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut candidates: Vec<String> = Vec::new();
        if let Some(l) = self.meta_leader_hint() {
            candidates.push(l.addr);
        }
        let mut others: Vec<(NodeId, String)> = self.known_nodes().into_iter().collect();
        others.sort();
        candidates.extend(others.into_iter().map(|(_, a)| a));
        let note_leader = |l: &NodeInfo| {
            *self.meta_leader.write().unwrap_or_else(|p| p.into_inner()) = Some(l.node_id);
        };
        self.call_leader(candidates, PEER_CALL_TIMEOUT_MS, note_leader, call)
            .await
    }

    /// Calls the first of `candidates` (at most [`META_CALL_ATTEMPTS`] of them) that answers
    /// as a leader, each within `timeout_ms`, moving a `NotLeader` hint to the front.
    pub async fn call_leader<T, F, Fut>(
        &self,
        mut candidates: Vec<String>,
        timeout_ms: u64,
        on_hint: impl Fn(&NodeInfo),
        call: F,
    ) -> Result<T, ClientError>
    where
        F: Fn(AdminClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        candidates.dedup();
        let mut last = ClientError::Unavailable("no node of the range is known".into());
        let mut tried = 0;
        while let Some(addr) = (!candidates.is_empty()).then(|| candidates.remove(0)) {
            if tried == META_CALL_ATTEMPTS {
                break;
            }
            tried += 1;
            let result =
                tokio::time::timeout(Duration::from_millis(timeout_ms), call(self.admin(&addr)?))
                    .await;
            match result {
                Ok(Ok(resp)) => return Ok(resp.into_inner()),
                Ok(Err(status)) => {
                    let e = ClientError::from_status(&status);
                    if let ClientError::NotLeader { leader: Some(l) } = &e {
                        on_hint(l);
                        self.learn_nodes([(l.node_id, l.addr.clone())]);
                        if l.addr != addr {
                            candidates.retain(|c| c != &l.addr);
                            candidates.insert(0, l.addr.clone());
                        }
                    }
                    last = e;
                }
                Err(_) => last = ClientError::Unavailable(format!("{addr} did not answer")),
            }
        }
        Err(last)
    }

    /// Starts the Raft group of this node's replica `replica_id` of `range_id`, from whatever
    /// state it has on disk (none: an empty replica waiting for a snapshot).
    pub async fn start_replica(
        &self,
        range_id: RangeId,
        replica_id: ReplicaId,
    ) -> anyhow::Result<Arc<Replica>> {
        if let Some(existing) = self.replica(range_id) {
            return Ok(existing);
        }
        write_state(
            &self.db,
            range_id,
            StateTag::LocalReplica,
            &replica_id,
            false,
        )?;
        let log_store = LogStore::new(self.db.clone(), range_id, self.group_commit.clone());
        let (sm, shared) = StateMachine::open(
            self.db.clone(),
            range_id,
            replica_id,
            &self.snapshot_dir,
            self.replicas.spans().clone(),
            self.events.clone(),
        )?;
        let raft = RaftHandle::new(
            replica_id,
            self.raft_config.clone(),
            self.peers.factory(range_id),
            log_store,
            sm,
        )
        .await
        .map_err(|e| anyhow!("starting raft for range {range_id}: {e}"))?;
        let replica = Arc::new(Replica::new(raft, shared));
        replica.touch();
        if !self.replicas.insert(replica.clone()) {
            let _ = replica.raft.shutdown().await;
            return self
                .replica(range_id)
                .ok_or_else(|| anyhow!("range {range_id} vanished while starting"));
        }
        tracing::debug!(range_id, replica_id, "replica started");
        Ok(replica)
    }

    /// This node's replica id in `range_id` as stored, or from the stored membership.
    fn local_replica_id(&self, range_id: RangeId) -> anyhow::Result<Option<ReplicaId>> {
        if let Some(id) = read_state::<ReplicaId>(&self.db, range_id, StateTag::LocalReplica)? {
            return Ok(Some(id));
        }
        Ok(
            stored_state(&self.db, range_id)?.and_then(|(_, membership)| {
                membership
                    .nodes()
                    .find(|(_, n)| n.node_id == self.node_id)
                    .map(|(id, _)| *id)
            }),
        )
    }

    /// Stops and deletes this node's replica of `range_id` (the keys it owns too, unless
    /// `keep_data`), leaving a tombstone. Works from the on-disk state when the replica is not
    /// running (it failed to start, or was stopped), so no claim or state is left behind.
    pub async fn destroy_replica(&self, range_id: RangeId, keep_data: bool) -> anyhow::Result<()> {
        let replica_id = match self.take_down(range_id).await {
            Some(replica_id) => Some(replica_id),
            None => self.local_replica_id(range_id)?,
        };
        // What the replica owns, by the span registry: a merged-away replica owns nothing
        // (its keys are the left range's), and no other replica owns any of these keys, so
        // deleting them cannot touch another range's data. The claim is released only after
        // the deletion, so no snapshot install can take the span while it is being cleared.
        let data_span = self
            .replicas
            .spans()
            .owned(range_id)
            .filter(|_| !keep_data)
            .map(|s| (s.start, s.end));
        // The snapshot file first: one left behind by a crash between the two steps is
        // discarded anyway (it is newer than the applied state of any later replica of the
        // range), but there is no reason to leave it.
        let snap = spheredb_raft::state_machine::snapshot_file(&self.snapshot_dir, range_id);
        match std::fs::remove_file(&snap) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %snap.display(), "removing snapshot: {e}"),
        }
        if let Some(replica_id) = replica_id {
            destroy_replica(&self.db, range_id, replica_id, data_span)?;
        } else if let Some((start, end)) = data_span {
            let mut batch = WriteBatch::default();
            self.db
                .batch_delete_span(&mut batch, ColumnFamilyName::Data, &start, &end);
            self.db.write(batch, true)?;
        }
        self.replicas.spans().release(range_id);
        tracing::info!(range_id, ?replica_id, "replica destroyed");
        Ok(())
    }

    /// Stops this node's replica of `range_id` without touching its state or data, and gives
    /// up its claim on its keys. For a replica frozen into a range whose snapshot is about to
    /// install over those keys: its on-disk state stays, so should that snapshot be refused
    /// and the merge arrive through the log instead, the merge still finds the frozen right
    /// side it checks for (deleting it made that merge fail on this node for good). The
    /// stopped replica is collected like any merged one (`stop_merged_replicas`).
    pub async fn stop_replica(&self, range_id: RangeId) {
        if self.take_down(range_id).await.is_some() {
            self.replicas.spans().release(range_id);
        }
    }

    /// Removes the running replica of `range_id`, retires it and shuts its Raft group down;
    /// returns its replica id, or `None` when none was running. Retiring comes first: an
    /// apply or install openraft already queued may still run after shutdown, and from here
    /// on it writes nothing.
    async fn take_down(&self, range_id: RangeId) -> Option<ReplicaId> {
        let replica = self.replicas.remove(range_id)?;
        let replica_id = replica.raft.metrics().borrow_watched().id;
        replica.shared.retire();
        if let Err(e) = replica.raft.shutdown().await {
            tracing::warn!(range_id, "raft shutdown while taking the replica down: {e}");
        }
        Some(replica_id)
    }

    /// Acts on a request of the transport.
    async fn on_replica_request(&self, request: ReplicaRequest) -> anyhow::Result<()> {
        match request {
            ReplicaRequest::Create {
                range_id,
                replica_id,
            } => self.create_missing(range_id, replica_id).await,
            ReplicaRequest::Subsume { range_id, by } => {
                let frozen_into = self.replica(range_id).and_then(|r| r.shared.frozen());
                if frozen_into.is_some_and(|f| f.into == by) {
                    tracing::info!(
                        range_id,
                        by,
                        "replica subsumed by a merged range's snapshot"
                    );
                    // The snapshot about to install replaces the data.
                    self.stop_replica(range_id).await;
                }
                Ok(())
            }
        }
    }

    /// Stops replicas whose merge into a local replica has applied here (the node may have
    /// stopped between applying the merge and stopping them), keeping their data.
    pub async fn stop_merged_replicas(&self) -> anyhow::Result<()> {
        for r in self.replicas.all() {
            let Some(frozen) = r.shared.frozen() else {
                continue;
            };
            let range_id = r.shared.range_id;
            let merged = self
                .replica(frozen.into)
                .is_some_and(|left| left.shared.merged(range_id));
            if merged {
                tracing::info!(range_id, into = frozen.into, "stopping merged replica");
                self.destroy_replica(range_id, true).await?;
            }
        }
        Ok(())
    }

    /// Creates an empty replica a peer asked for, unless this node destroyed one with that id.
    /// A running replica with a lower id was removed from the range: a node gets a new
    /// replica id only when the range's committed membership has no replica on it (see
    /// `AdminService::change_replicas`), so the old one is destroyed first, whatever it
    /// believes (a removed replica that was cut off never learns of its removal).
    async fn create_missing(&self, range_id: RangeId, replica_id: ReplicaId) -> anyhow::Result<()> {
        let missing = (range_id, replica_id);
        if replica_id == 0 {
            return Ok(());
        }
        if let Some(existing) = self.replica(range_id) {
            let existing_id = existing.raft.metrics().borrow_watched().id;
            if existing_id >= replica_id {
                return Ok(());
            }
            tracing::info!(
                range_id,
                old = existing_id,
                new = replica_id,
                "replacing a removed replica with the one added since"
            );
            self.destroy_replica(range_id, false).await?;
        }
        let floor: ReplicaId = read_state(&self.db, range_id, StateTag::Tombstone)?.unwrap_or(0);
        if replica_id < floor {
            tracing::debug!(
                ?missing,
                floor,
                "ignoring a message for a destroyed replica"
            );
            return Ok(());
        }
        if let Some(existing) = self.local_replica_id(range_id)? {
            if existing != replica_id {
                tracing::warn!(?missing, existing, "replica id mismatch; not creating");
                return Ok(());
            }
        }
        tracing::info!(range_id, replica_id, "creating replica asked for by a peer");
        self.start_replica(range_id, replica_id).await.map(|_| ())
    }

    /// Starts the right half of a split applied here.
    async fn on_range_event(&self, event: RangeEvent) -> anyhow::Result<()> {
        match event {
            RangeEvent::Split {
                parent,
                child,
                child_here,
            } => {
                if !child_here {
                    if let Some(p) = self.replica(parent) {
                        p.raft
                            .trigger()
                            .snapshot()
                            .await
                            .map_err(|e| anyhow!("{e}"))?;
                    }
                    return Ok(());
                }
                let Some(replica_id) = self.local_replica_id(child)? else {
                    bail!(
                        "range {child} split from {parent} has no replica for node {}",
                        self.node_id
                    );
                };
                self.start_replica(child, replica_id).await?;
                // The parent's stored snapshot still carries its old, wider span; a new
                // replica sent that one would overlap the right half (and be refused). A fresh
                // snapshot carries the new span.
                if let Some(p) = self.replica(parent) {
                    if let Err(e) = p.raft.trigger().snapshot().await {
                        tracing::warn!(parent, "snapshot after split: {e}");
                    }
                }
                tracing::info!(parent, child, "range split");
                Ok(())
            }
            RangeEvent::Merged { left, right } => {
                // The data now belongs to the left range, or to a range split from it since
                // (which may not have started yet): only the right replica's state goes. A
                // fresh snapshot of the left range carries the wider span.
                self.destroy_replica(right, true).await?;
                if let Some(l) = self.replica(left) {
                    if let Err(e) = l.raft.trigger().snapshot().await {
                        tracing::warn!(left, "snapshot after merge: {e}");
                    }
                }
                Ok(())
            }
        }
    }
}

/// A claim on one range's replica changes; see [`NodeShared::claim_change`].
pub struct ChangeGuard<'a> {
    shared: &'a NodeShared,
    range_id: RangeId,
}

impl Drop for ChangeGuard<'_> {
    fn drop(&mut self) {
        self.shared
            .changing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.range_id);
    }
}

/// A range descriptor on the wire.
pub fn wire_descriptor(r: &RangeRecord) -> RangeDescriptor {
    RangeDescriptor {
        range_id: r.span.range_id,
        generation: r.span.generation,
        start_key: r.span.start_key.clone(),
        end_key: r.span.end_key.clone(),
        voters: r
            .replicas
            .iter()
            .filter(|x| x.voter)
            .map(|x| x.node_id)
            .collect(),
        learners: r
            .replicas
            .iter()
            .filter(|x| !x.voter)
            .map(|x| x.node_id)
            .collect(),
        replicas: r
            .replicas
            .iter()
            .map(|x| WireReplica {
                replica_id: x.replica_id,
                node_id: x.node_id,
                voter: x.voter,
            })
            .collect(),
    }
}

/// A running node.
pub struct Node {
    shared: Arc<NodeShared>,
    /// The first fatal condition the health check found (see [`crate::node::health`]).
    fatal: watch::Receiver<Option<String>>,
    faults: Arc<TransportFaults>,
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    server: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    loops: Vec<JoinHandle<()>>,
}

fn raft_config(cfg: &NodeConfig) -> anyhow::Result<Arc<Config>> {
    let config = Config {
        cluster_name: "spheredb".into(),
        heartbeat_interval: cfg.heartbeat_interval_ms,
        election_timeout_min: cfg.election_timeout_ms,
        election_timeout_max: cfg.election_timeout_ms * 2,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_log_threshold),
        max_in_snapshot_log_to_keep: cfg.log_kept_behind_snapshot,
        max_payload_entries: 256,
        install_snapshot_timeout: 60_000,
        ..Default::default()
    };
    Ok(Arc::new(
        config.validate().context("invalid raft configuration")?,
    ))
}

async fn join_cluster(seeds: &[String], addr: &str, token: &[u8]) -> anyhow::Result<(NodeId, u64)> {
    let started = Instant::now();
    let mut targets: Vec<String> = seeds.to_vec();
    let mut attempt = 0usize;
    let mut last_error = String::from("no attempt made");
    while started.elapsed() < Duration::from_millis(JOIN_DEADLINE_MS) {
        let target = targets[attempt % targets.len()].clone();
        attempt += 1;
        let result = async {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{target}"))?
                .connect_timeout(Duration::from_millis(JOIN_ATTEMPT_TIMEOUT_MS))
                .connect()
                .await?;
            let mut req = tonic::Request::new(JoinRequest {
                addr: addr.to_string(),
                join_token: token.to_vec(),
            });
            req.set_timeout(Duration::from_millis(JOIN_ATTEMPT_TIMEOUT_MS));
            Ok::<_, anyhow::Error>(AdminClient::new(channel).join(req).await)
        }
        .await;
        match result {
            Ok(Ok(resp)) => {
                let resp = resp.into_inner();
                return Ok((resp.node_id, resp.cluster_id));
            }
            Ok(Err(status)) => match ClientError::from_status(&status) {
                ClientError::NotLeader { leader: Some(l) } => {
                    targets.insert(0, l.addr.clone());
                    attempt = 0;
                    last_error = format!("redirected to leader {}", l.addr);
                    continue;
                }
                e @ ClientError::InvalidArgument(_) => bail!("join refused by {target}: {e}"),
                e => last_error = format!("{target}: {e}"),
            },
            Err(e) => last_error = format!("{target}: {e:#}"),
        }
        tracing::info!(%last_error, "join attempt failed; retrying");
        tokio::time::sleep(Duration::from_millis(JOIN_RETRY_PAUSE_MS)).await;
    }
    bail!("could not join the cluster through {seeds:?} within {JOIN_DEADLINE_MS} ms: {last_error}")
}

/// Writes, in one synced batch, everything a new cluster starts from: this node's identity,
/// the meta records, and the origin state of the meta range and of the first user range,
/// both with this node as their only voter.
fn bootstrap(db: &Db, identity: &NodeIdentity) -> anyhow::Result<()> {
    let replica_id: ReplicaId = 1;
    let membership = Membership::new(
        vec![BTreeSet::from([replica_id])],
        BTreeMap::from([(
            replica_id,
            ReplicaNode {
                node_id: identity.node_id,
                addr: identity.addr.clone(),
            },
        )]),
    )
    .map_err(|e| anyhow!("bootstrap membership: {e}"))?;
    let (meta_start, meta_end) = meta_span();
    let spans = [
        RangeSpan {
            range_id: META_RANGE_ID,
            start_key: meta_start,
            end_key: meta_end.clone(),
            generation: 1,
            next_replica_id: replica_id + 1,
        },
        RangeSpan {
            range_id: FIRST_USER_RANGE_ID,
            start_key: meta_end,
            end_key: Vec::new(),
            generation: 1,
            next_replica_id: replica_id + 1,
        },
    ];
    let mut batch = WriteBatch::default();
    let state = db.cf(ColumnFamilyName::RaftState);
    batch.put_cf(
        state,
        state_key(NODE_RECORDS, StateTag::NodeIdentity),
        encode_record(identity)?,
    );
    let records: Vec<RangeRecord> = spans
        .iter()
        .map(|s| RangeRecord::new(s.clone(), &membership))
        .collect();
    registry::init_cluster(
        db,
        &mut batch,
        identity.cluster_id,
        &NodeRecord {
            node_id: identity.node_id,
            addr: identity.addr.clone(),
            state: NodeState::Active,
        },
        &records,
    )?;
    for span in &spans {
        write_range_origin(db, &mut batch, span, membership.clone())?;
        batch.put_cf(
            state,
            state_key(span.range_id, StateTag::LocalReplica),
            encode_record(&replica_id)?,
        );
    }
    db.write(batch, true)?;
    Ok(())
}

impl Node {
    /// Opens the data directory, joins or bootstraps the cluster as needed, and starts serving.
    pub async fn start(cfg: NodeConfig) -> anyhow::Result<Node> {
        if cfg.replication_factor == 0 {
            bail!("--replication-factor must be at least 1");
        }
        let db = Db::open(&cfg.data_dir.join("db"), &DbOptions::default())
            .with_context(|| format!("opening the database under {}", cfg.data_dir.display()))?;
        let listener = tokio::net::TcpListener::bind(&cfg.listen)
            .await
            .with_context(|| {
                format!("binding {} (is another node using this port?)", cfg.listen)
            })?;
        let local_addr = listener.local_addr()?;

        let identity: Option<NodeIdentity> = read_state(&db, NODE_RECORDS, StateTag::NodeIdentity)?;
        let advertise = match (&cfg.advertise, &identity) {
            (Some(a), _) => a.clone(),
            (None, Some(id)) if cfg.listen == id.addr || local_addr.to_string() == id.addr => {
                id.addr.clone()
            }
            (None, _) if local_addr.ip().is_unspecified() => {
                bail!("--listen {} binds every interface; give --advertise HOST:PORT so peers can reach this node", cfg.listen)
            }
            (None, _) => local_addr.to_string(),
        };

        let identity = match identity {
            Some(id) => {
                if !cfg.join.is_empty() {
                    tracing::info!(
                        node_id = id.node_id,
                        "data directory already belongs to a cluster; ignoring --join"
                    );
                }
                id
            }
            None if cfg.join.is_empty() => {
                let id = NodeIdentity {
                    node_id: 1,
                    cluster_id: rand::random::<u64>() | 1,
                    addr: advertise.clone(),
                };
                bootstrap(&db, &id)?;
                tracing::info!(cluster_id = id.cluster_id, "bootstrapped a new cluster");
                id
            }
            None => {
                let token: Vec<u8> = match read_state(&db, NODE_RECORDS, StateTag::JoinToken)? {
                    Some(t) => t,
                    None => {
                        let t = rand::random::<[u8; 16]>().to_vec();
                        write_state(&db, NODE_RECORDS, StateTag::JoinToken, &t, true)?;
                        t
                    }
                };
                tracing::info!(seeds = ?cfg.join, "joining cluster");
                let (node_id, cluster_id) = join_cluster(&cfg.join, &advertise, &token).await?;
                let id = NodeIdentity {
                    node_id,
                    cluster_id,
                    addr: advertise.clone(),
                };
                write_state(&db, NODE_RECORDS, StateTag::NodeIdentity, &id, true)?;
                tracing::info!(node_id, "joined cluster");
                id
            }
        };
        let node_id = identity.node_id;
        let addr = advertise;

        let snapshot_dir = cfg.data_dir.join("snapshots");
        let leftovers = spheredb_raft::state_machine::remove_snapshot_temp_files(&snapshot_dir)
            .with_context(|| format!("cleaning {}", snapshot_dir.display()))?;
        if leftovers > 0 {
            tracing::info!(
                leftovers,
                "removed temporary snapshot files of an interrupted run"
            );
        }
        let group_commit = GroupCommit::start(Arc::new(db.clone()))?;
        let disk = Arc::new(crate::node::disk::DiskGuard::new(
            &cfg.data_dir,
            cfg.disk_reserve_bytes,
            cfg.ballast_size_bytes,
        ));
        let faults = Arc::new(TransportFaults::default());
        // Peer connections leave from the advertised IP (when it is a concrete address) so
        // per-link network rules can tell nodes apart on one host.
        let local_ip = addr
            .parse::<SocketAddr>()
            .ok()
            .map(|a| a.ip())
            .filter(|ip| !ip.is_unspecified());
        let peers = PeerChannels::new(node_id, local_ip, faults.clone());
        let (events_tx, events_rx) = mpsc::channel(MAX_PENDING_RANGE_EVENTS);
        let (requests_tx, requests_rx) = mpsc::channel(MAX_PENDING_REPLICA_REQUESTS);
        let replicas = Arc::new(ReplicaDirectory::new(requests_tx));
        let mut known = HashMap::from([(node_id, addr.clone())]);
        for (i, seed) in cfg.join.iter().enumerate() {
            // Placeholder ids above any real one until the meta range names them.
            known.insert(u64::MAX - i as u64, seed.clone());
        }

        let shared = Arc::new(NodeShared {
            node_id,
            cluster_id: identity.cluster_id,
            addr: addr.clone(),
            db: db.clone(),
            started: Instant::now(),
            group_commit,
            disk: disk.clone(),
            raft_config: raft_config(&cfg)?,
            cfg: cfg.clone(),
            replicas: replicas.clone(),
            peers,
            events: events_tx,
            snapshot_dir,
            known_nodes: RwLock::new(known),
            meta_leader: RwLock::new(None),
            admin_channels: Mutex::new(HashMap::new()),
            changing: Mutex::new(std::collections::HashSet::new()),
            meta: MetaState::default(),
        });

        let ranges = local_ranges(&db)?;
        for range_id in &ranges {
            match shared.local_replica_id(*range_id)? {
                Some(replica_id) => {
                    // One replica that cannot start (its span overlaps another's: a broken
                    // invariant, reported loudly) must not keep the node's other replicas
                    // down; the allocator replaces it like a missing one.
                    if let Err(e) = shared.start_replica(*range_id, replica_id).await {
                        tracing::error!(range_id, replica_id, "replica not started: {e:#}");
                    }
                }
                None => tracing::warn!(range_id, "range state without a replica id; skipped"),
            }
        }
        tracing::info!(node_id, replicas = ranges.len(), "replicas started");
        shared.stop_merged_replicas().await?;

        let (stop, stop_rx) = watch::channel(false);
        let server = {
            let mut stop_rx = stop_rx.clone();
            let kv = KvServer::new(KvService::new(shared.clone()))
                .max_decoding_message_size(limits::MAX_GRPC_MESSAGE_SIZE_BYTES)
                .max_encoding_message_size(limits::MAX_GRPC_MESSAGE_SIZE_BYTES);
            let admin = AdminServer::new(AdminService::new(shared.clone()))
                .max_decoding_message_size(limits::MAX_GRPC_MESSAGE_SIZE_BYTES)
                .max_encoding_message_size(limits::MAX_GRPC_MESSAGE_SIZE_BYTES);
            let raft_svc = RaftTransportServer::new(RaftService::new(
                replicas,
                faults.clone(),
                shared.snapshot_dir.clone(),
            ))
            .max_decoding_message_size(MAX_RAFT_MESSAGE_SIZE_BYTES)
            .max_encoding_message_size(MAX_RAFT_MESSAGE_SIZE_BYTES);
            // A custom incoming stream bypasses the builder's socket options: without
            // TCP_NODELAY here, small responses wait on delayed ACKs (~40 ms tail latency).
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            tokio::spawn(
                tonic::transport::Server::builder()
                    .tcp_nodelay(true)
                    .add_service(kv)
                    .add_service(admin)
                    .add_service(raft_svc)
                    .serve_with_incoming_shutdown(incoming, async move {
                        let _ = stop_rx.wait_for(|s| *s).await;
                    }),
            )
        };

        let (fatal_tx, fatal_rx) = watch::channel(None);
        let loops = vec![
            tokio::spawn(events_loop(shared.clone(), events_rx, stop_rx.clone())),
            tokio::spawn(requests_loop(shared.clone(), requests_rx, stop_rx.clone())),
            tokio::spawn(crate::meta::heartbeat_loop(shared.clone(), stop_rx.clone())),
            tokio::spawn(crate::meta::allocator::allocator_loop(
                shared.clone(),
                stop_rx.clone(),
            )),
            tokio::spawn(crate::range::split::split_loop(
                shared.clone(),
                stop_rx.clone(),
            )),
            tokio::spawn(crate::range::merge::merge_loop(
                shared.clone(),
                stop_rx.clone(),
            )),
            tokio::spawn(crate::node::health::health_loop(
                shared.replicas.clone(),
                shared.group_commit.clone(),
                fatal_tx,
                stop_rx.clone(),
            )),
            tokio::spawn(crate::node::disk::disk_loop(disk, stop_rx.clone())),
            tokio::spawn(crate::range::quiesce::quiesce_loop(shared.clone(), stop_rx)),
        ];
        tracing::info!(node_id, %addr, "node serving");
        Ok(Node {
            shared,
            fatal: fatal_rx,
            faults,
            local_addr,
            stop,
            server: Some(server),
            loops,
        })
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.shared.node_id
    }

    /// The address the node serves on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address peers and clients use.
    pub fn addr(&self) -> &str {
        &self.shared.addr
    }

    /// The Raft group of this node's replica of `range_id`.
    pub fn raft(&self, range_id: RangeId) -> Option<RaftHandle> {
        self.shared.replica(range_id).map(|r| r.raft.clone())
    }

    /// The node's database.
    pub fn db(&self) -> &Db {
        &self.shared.db
    }

    /// Transport fault injection (partition tests).
    pub fn faults(&self) -> &Arc<TransportFaults> {
        &self.faults
    }

    /// Waits until the node finds a fatal condition (a failed fsync, a Raft group stopped by
    /// an error) and returns it. The process must then exit: see [`crate::node::health`].
    pub async fn failed(&self) -> String {
        let mut fatal = self.fatal.clone();
        let reason = match fatal.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone(),
            // The health check ended without a verdict: the node is shutting down.
            Err(_) => None,
        };
        match reason {
            Some(reason) => reason,
            None => std::future::pending().await,
        }
    }

    /// Stops serving, stops Raft, and syncs the WAL.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        for l in self.loops.drain(..) {
            l.abort();
            let _ = l.await;
        }
        if let Some(s) = self.server.take() {
            match s.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("server ended with an error: {e}"),
                Err(e) => tracing::warn!("server task failed: {e}"),
            }
        }
        for replica in self.shared.replicas.all() {
            self.shared.replicas.remove(replica.shared.range_id);
            if let Err(e) = replica.raft.shutdown().await {
                tracing::warn!("raft shutdown: {e}");
            }
        }
        self.shared.group_commit.shutdown();
        self.shared.db.sync_wal()?;
        Ok(())
    }
}

/// Starts the right halves of splits as the state machines apply them.
async fn events_loop(
    shared: Arc<NodeShared>,
    mut events: mpsc::Receiver<RangeEvent>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let event = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            e = events.recv() => match e { Some(e) => e, None => return },
        };
        if let Err(e) = shared.on_range_event(event.clone()).await {
            tracing::error!(?event, "handling range event: {e:#}");
        }
    }
}

/// Creates replicas that peers address but this node does not have yet, and stops replicas
/// that merged ranges' snapshots subsume.
async fn requests_loop(
    shared: Arc<NodeShared>,
    mut requests: mpsc::Receiver<ReplicaRequest>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let m = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            m = requests.recv() => match m { Some(m) => m, None => return },
        };
        if let Err(e) = shared.on_replica_request(m).await {
            tracing::warn!(request = ?m, "replica request: {e:#}");
        }
    }
}
