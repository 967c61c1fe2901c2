//! A running SphereDB node: storage, one Raft group per range replica, the gRPC server, and
//! the background loops that keep ranges placed (heartbeats to the meta range, the allocator
//! on the meta-range leader, splits, quiescence, replica creation and destruction).
//!
//! This is where the rooms are wired: [`Node::start`] builds each part (the local replicas,
//! [`Peers`], the meta leader's [`MetaState`], the services and loops) and hands each only
//! what it needs. The dependency points one way: `node` imports the other rooms, and none of
//! them imports `node`.

pub mod health;
pub mod heartbeat;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
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
use spheredb_client::proto::v1::feed_server::FeedServer;
use spheredb_client::proto::v1::kv_server::KvServer;
use spheredb_client::proto::v1::txn_server::TxnServer;
use spheredb_client::proto::v1::{JoinRequest, ReplicaReport};
use spheredb_client::ClientError;
use spheredb_raft::group_commit::GroupCommit;
use spheredb_raft::layout::{state_key, StateTag, NODE_RECORDS};
use spheredb_raft::log_store::{
    destroy_replica, encode_record, local_ranges, raise_tombstone, read_state, tombstone,
    write_state, LogStore,
};
use spheredb_raft::network::{
    PeerChannels, RaftService, Replica, ReplicaDirectory, ReplicaRequest, TransportFaults,
    MAX_PENDING_REPLICA_REQUESTS, MAX_RAFT_MESSAGE_SIZE_BYTES,
};
use spheredb_raft::registry::{self, NodeRecord, NodeState};
use spheredb_raft::state_machine::{
    stored_state, write_range_origin, RangeEvent, ReplicaShared, StateMachine,
    MAX_PENDING_RANGE_EVENTS,
};
use spheredb_raft::{
    Membership, NodeId, RaftHandle, RangeId, RangeRecord, RangeSpan, ReplicaId, ReplicaNode,
};
use spheredb_storage::{keys, ColumnFamilyName, Db, DbOptions};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::NodeConfig;
use crate::descriptor::wire_descriptor;
use crate::disk::DiskGuard;
use crate::ids::{FIRST_USER_RANGE_ID, META_RANGE_ID};
use crate::meta::allocator::Allocator;
use crate::meta::tso::Tso;
use crate::meta::MetaState;
use crate::peers::{local_ip_of, Peers};
use crate::range::leadership::LeaderChecks;
use crate::range::merge::{AutoMerge, Merges, TonicMergeTransport};
use crate::range::split::{LoadSplitPolicy, SplitCheck};
use crate::range::timestamps::NodeTimestamps;
use crate::service::admin::{AdminParts, AdminService, ThisNode};
use crate::service::feed::FeedService;
use crate::service::kv::KvService;
use crate::service::txn::TxnService;
use heartbeat::{heartbeat_loop, Heartbeat};
/// How long a joining node keeps trying to reach the cluster.
pub const JOIN_DEADLINE_MS: u64 = 120_000;
/// Time allowed for one join attempt.
pub const JOIN_ATTEMPT_TIMEOUT_MS: u64 = 5_000;
/// Pause between join attempts.
pub const JOIN_RETRY_PAUSE_MS: u64 = 500;

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

/// This node's replicas through their lives: starting them (at start-up, for a split's right
/// half, for a peer's request), stopping merged ones, and destroying removed ones. The one
/// owner of the node's `ReplicaDirectory` entries; the other rooms only read them.
///
/// Invariant: at most one lifecycle step (start, stop, destroy, create for a peer) runs on a
/// range at a time, each holding the range's lock from its check to its change. Without it
/// a peer's message arriving while the replica was being destroyed (a peer yet to apply a
/// merge still sends them) started a new Raft group over the state being deleted.
pub struct LocalReplicas {
    node_id: NodeId,
    db: Db,
    group_commit: GroupCommit,
    replicas: Arc<ReplicaDirectory>,
    peers: PeerChannels,
    raft_config: Arc<Config>,
    events: mpsc::Sender<RangeEvent>,
    snapshot_dir: PathBuf,
    /// Replicas quarantined before the node started: opened (their span stays claimed) but
    /// without a Raft group, since starting one would re-apply or re-snapshot the damaged
    /// data and fail. Reported in heartbeats until the allocator replaces them.
    dormant: Mutex<HashMap<RangeId, (ReplicaId, Arc<ReplicaShared>)>>,
    /// The lifecycle lock of each range ever hosted here (see the invariant above). Entries
    /// are never removed, one small lock per range: removing one while a task waits on it
    /// would let a third task take a fresh lock beside it.
    range_locks: Mutex<HashMap<RangeId, Arc<tokio::sync::Mutex<()>>>>,
}

impl LocalReplicas {
    /// Reports of the dormant (quarantined) replicas, for the heartbeat.
    pub fn dormant_reports(&self) -> Vec<ReplicaReport> {
        let dormant = self.dormant.lock().unwrap_or_else(|p| p.into_inner());
        dormant
            .iter()
            .map(|(range_id, (replica_id, shared))| {
                let descriptor = shared.record().map(|r| wire_descriptor(&r));
                ReplicaReport {
                    range_id: *range_id,
                    replica_id: *replica_id,
                    generation: descriptor.as_ref().map_or(0, |d| d.generation),
                    descriptor,
                    quarantined: true,
                    ..Default::default()
                }
            })
            .collect()
    }

    /// The local replica of `range_id`.
    pub fn replica(&self, range_id: RangeId) -> Option<Arc<Replica>> {
        self.replicas.get(range_id)
    }

    /// The lifecycle lock of `range_id`.
    fn range_lock(&self, range_id: RangeId) -> Arc<tokio::sync::Mutex<()>> {
        self.range_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(range_id)
            .or_default()
            .clone()
    }

    /// Waits for, and holds, the lifecycle lock of `range_id`.
    async fn lock_range(&self, range_id: RangeId) -> tokio::sync::OwnedMutexGuard<()> {
        self.range_lock(range_id).lock_owned().await
    }

    /// The lifecycle lock of `range_id`, if no other step holds it.
    fn try_lock_range(&self, range_id: RangeId) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        self.range_lock(range_id).try_lock_owned().ok()
    }

    /// Starts the Raft group of this node's replica `replica_id` of `range_id`, from whatever
    /// state it has on disk (none: an empty replica waiting for a snapshot).
    pub async fn start_replica(
        &self,
        range_id: RangeId,
        replica_id: ReplicaId,
    ) -> anyhow::Result<Arc<Replica>> {
        let _lifecycle = self.lock_range(range_id).await;
        self.start_locked(range_id, replica_id).await
    }

    /// [`Self::start_replica`], the range's lifecycle lock held.
    async fn start_locked(
        &self,
        range_id: RangeId,
        replica_id: ReplicaId,
    ) -> anyhow::Result<Arc<Replica>> {
        if let Some(existing) = self.replica(range_id) {
            return Ok(existing);
        }
        let opened = self.open_locked(range_id, replica_id)?;
        self.launch_locked(opened).await
    }

    /// Opens the state of this node's replica `replica_id` of `range_id` (redoing a snapshot
    /// install a crash interrupted) without starting its Raft group; the range's lifecycle
    /// lock held, or the node still starting.
    fn open_locked(&self, range_id: RangeId, replica_id: ReplicaId) -> anyhow::Result<Opened> {
        let floor = tombstone(&self.db, range_id)?;
        if replica_id < floor {
            bail!(
                "replica {replica_id} of range {range_id} was destroyed here (replicas below \
                 {floor} are); not starting it"
            );
        }
        write_state(
            &self.db,
            range_id,
            StateTag::LocalReplica,
            &replica_id,
            false,
        )?;
        let (sm, shared) = StateMachine::open(
            self.db.clone(),
            range_id,
            replica_id,
            &self.snapshot_dir,
            self.replicas.spans().clone(),
            self.events.clone(),
        )?;
        if let Some(reason) = shared.quarantined() {
            self.dormant
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(range_id, (replica_id, shared));
            bail!(
                "replica {replica_id} of range {range_id} is quarantined ({reason}); it stays \
                 stopped, and is reported for replacement"
            );
        }
        Ok(Opened {
            range_id,
            replica_id,
            sm,
            shared,
        })
    }

    /// Starts the Raft group of an opened replica (openraft first replays its committed
    /// entries) and adds it to the directory; the range's lifecycle lock held, or the node
    /// still starting.
    async fn launch_locked(&self, opened: Opened) -> anyhow::Result<Arc<Replica>> {
        let Opened {
            range_id,
            replica_id,
            sm,
            shared,
        } = opened;
        let log_store = LogStore::new(self.db.clone(), range_id, self.group_commit.clone());
        let raft = RaftHandle::new(
            replica_id,
            self.raft_config.clone(),
            self.peers.factory(range_id),
            log_store,
            sm,
        )
        .await
        .map_err(|e| anyhow!("starting raft for range {range_id}: {e}"))?;
        shared.mark_running();
        let replica = Arc::new(Replica::new(raft, shared));
        replica.touch();
        if let Some(pause_ms) = injected_start_pause_ms(range_id) {
            tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        }
        if !self.replicas.insert(replica.clone()) {
            // Only lifecycle steps, under this range's lock, insert into the directory.
            let _ = replica.raft.shutdown().await;
            bail!("range {range_id} has two replicas starting at once (a lifecycle bug)");
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
        let _lifecycle = self.lock_range(range_id).await;
        self.destroy_locked(range_id, keep_data).await
    }

    /// Destroys this node's replica of `range_id`, its data too, if it is still the replica
    /// `replica_id` the meta range found removed from the range (or an older one). A newer one
    /// was added back to the range after that finding, and stays.
    pub async fn destroy_removed_replica(
        &self,
        range_id: RangeId,
        replica_id: ReplicaId,
    ) -> anyhow::Result<()> {
        let _lifecycle = self.lock_range(range_id).await;
        let local = match self.replica(range_id) {
            Some(r) => Some(r.raft.metrics().borrow_watched().id),
            None => self.local_replica_id(range_id)?,
        };
        if local.is_some_and(|id| id > replica_id) {
            tracing::info!(
                range_id,
                removed = replica_id,
                local = ?local,
                "not destroying: this node's replica was added back since"
            );
            return Ok(());
        }
        self.destroy_locked(range_id, false).await
    }

    /// [`Self::destroy_replica`], the range's lifecycle lock held.
    async fn destroy_locked(&self, range_id: RangeId, keep_data: bool) -> anyhow::Result<()> {
        // The tombstone goes first. The range's lock keeps a peer's request out while this
        // runs, and the tombstone keeps it out afterwards (a peer that has not applied a
        // merge yet still sends messages for the merged-away range); should the node stop
        // before the state below is deleted, start-up finds the tombstone above the stored
        // replica id and finishes the destroy.
        let running_id = self
            .replica(range_id)
            .map(|r| r.raft.metrics().borrow_watched().id);
        let known_id = match running_id {
            Some(id) => Some(id),
            None => self.local_replica_id(range_id)?,
        };
        if let Some(id) = known_id {
            raise_tombstone(&self.db, range_id, id + 1)?;
        }
        self.dormant
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&range_id);
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
            self.db.batch_delete_range_data(&mut batch, &start, &end);
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
        let _lifecycle = self.lock_range(range_id).await;
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
        // Retiring waits for a write in progress, which may be a long snapshot install:
        // not on an async worker.
        let shared = replica.shared.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || shared.retire()).await {
            tracing::error!(range_id, "retiring the replica failed: {e}");
        }
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
        // A peer retries its messages: while another step holds the range (a long destroy or
        // install), drop this request rather than hold up the requests of every other range.
        let Some(_lifecycle) = self.try_lock_range(range_id) else {
            tracing::debug!(?missing, "range busy; a later message asks again");
            return Ok(());
        };
        let dormant = self
            .dormant
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&range_id)
            .map(|(id, _)| *id);
        if dormant.is_some_and(|id| id >= replica_id) {
            // Quarantined, waiting to be replaced: its peers' messages start nothing.
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
            self.destroy_locked(range_id, false).await?;
        }
        let floor: ReplicaId = tombstone(&self.db, range_id)?;
        if replica_id < floor {
            tracing::debug!(
                ?missing,
                floor,
                "ignoring a message for a destroyed replica"
            );
            return Ok(());
        }
        if let Some(existing) = self.local_replica_id(range_id)? {
            if existing > replica_id {
                tracing::warn!(?missing, existing, "replica id mismatch; not creating");
                return Ok(());
            }
            if existing < replica_id {
                // A replica that is not running (quarantined, or one that failed to start)
                // was removed from the range, and a new one added here since.
                tracing::info!(
                    range_id,
                    old = existing,
                    new = replica_id,
                    "replacing a stopped replica with the one added since"
                );
                self.destroy_locked(range_id, false).await?;
            }
        }
        tracing::info!(range_id, replica_id, "creating replica asked for by a peer");
        self.start_locked(range_id, replica_id).await.map(|_| ())
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

/// The failpoint `replica-start-pause` (off unless configured, as `return(RANGE:MS)`):
/// milliseconds a replica of range RANGE waits between opening its state and joining the
/// directory, the window in which an unguarded destroy deleted the state of a replica about
/// to run. Tests use it to prove the range's lifecycle lock closes that window.
fn injected_start_pause_ms(range_id: RangeId) -> Option<u64> {
    fail::fail_point!("replica-start-pause", |arg: Option<String>| {
        let arg = arg.unwrap_or_default();
        let (range, ms) = arg.split_once(':')?;
        (range.parse::<RangeId>().ok()? == range_id)
            .then(|| ms.parse().ok())
            .flatten()
    });
    let _ = range_id;
    None
}

/// A replica whose state is open and whose Raft group is not started yet.
struct Opened {
    range_id: RangeId,
    replica_id: ReplicaId,
    sm: StateMachine,
    shared: Arc<ReplicaShared>,
}

/// A running node.
pub struct Node {
    node_id: NodeId,
    addr: String,
    db: Db,
    group_commit: GroupCommit,
    replicas: Arc<ReplicaDirectory>,
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
                .local_address(local_ip_of(addr))
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
        // A new cluster has nothing to collect and no commit yet.
        write_range_origin(
            db,
            &mut batch,
            span,
            membership.clone(),
            spheredb_raft::RangeTimes::default(),
        )?;
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
        if !(0.0..=1.0).contains(&cfg.range_split_min_node_cpu_fraction) {
            bail!(
                "--range-split-min-node-cpu-fraction must be between 0.0 and 1.0, not {}",
                cfg.range_split_min_node_cpu_fraction
            );
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
        let disk = Arc::new(DiskGuard::new(
            &cfg.data_dir,
            cfg.disk_reserve_bytes,
            cfg.ballast_size_bytes,
        ));
        let faults = Arc::new(TransportFaults::default());
        // Every node-to-node connection (Raft, admin, meta, allocator, merges, joins) leaves
        // from the advertised IP (when it is a concrete address), so per-link network rules
        // can tell nodes apart on one host and a partition cuts all of them.
        let local_ip = local_ip_of(&addr);
        let raft_peers = PeerChannels::new(node_id, local_ip, faults.clone());
        let (events_tx, events_rx) = mpsc::channel(MAX_PENDING_RANGE_EVENTS);
        let (requests_tx, requests_rx) = mpsc::channel(MAX_PENDING_REPLICA_REQUESTS);
        let replicas = Arc::new(ReplicaDirectory::new(requests_tx));
        let mut known = HashMap::from([(node_id, addr.clone())]);
        for (i, seed) in cfg.join.iter().enumerate() {
            // Placeholder ids above any real one until the meta range names them.
            known.insert(u64::MAX - i as u64, seed.clone());
        }
        let peers = Arc::new(Peers::new(replicas.clone(), known, local_ip));
        let view = Arc::new(MetaState::default());

        let started = Instant::now();
        let lifecycle = Arc::new(LocalReplicas {
            node_id,
            db: db.clone(),
            group_commit: group_commit.clone(),
            replicas: replicas.clone(),
            peers: raft_peers.clone(),
            raft_config: raft_config(&cfg)?,
            events: events_tx,
            snapshot_dir: snapshot_dir.clone(),
            dormant: Mutex::default(),
            range_locks: Mutex::default(),
        });

        let ranges = local_ranges(&db)?;
        // Two phases: every replica's state is opened first (redoing snapshot installs a
        // crash interrupted), then the Raft groups start. Starting a group replays its
        // committed entries, and a merge among them waits until the right range's
        // interrupted install is redone, which only opening that range does.
        let mut opened = Vec::new();
        for range_id in &ranges {
            match lifecycle.local_replica_id(*range_id)? {
                Some(replica_id) if tombstone(&db, *range_id)? > replica_id => {
                    // Its destroy wrote the tombstone and stopped before deleting the state:
                    // finish it. Not started, the replica claims no keys, so its data stays:
                    // a merged-away replica's keys are the left range's; a removed one's stay
                    // unclaimed and unserved (a replica that claims their span later clears
                    // it when its snapshot installs).
                    tracing::info!(range_id, replica_id, "finishing an interrupted destroy");
                    if let Err(e) = lifecycle.destroy_replica(*range_id, true).await {
                        tracing::error!(range_id, "finishing an interrupted destroy: {e:#}");
                    }
                }
                // One replica that cannot open (its span overlaps another's: a broken
                // invariant, reported loudly) must not keep the node's other replicas
                // down; the allocator replaces it like a missing one.
                Some(replica_id) => match lifecycle.open_locked(*range_id, replica_id) {
                    Ok(o) => opened.push(o),
                    Err(e) => {
                        tracing::error!(range_id, replica_id, "replica not started: {e:#}")
                    }
                },
                None => tracing::warn!(range_id, "range state without a replica id; skipped"),
            }
        }
        for o in opened {
            let (range_id, replica_id) = (o.range_id, o.replica_id);
            if let Err(e) = lifecycle.launch_locked(o).await {
                tracing::error!(range_id, replica_id, "replica not started: {e:#}");
            }
        }
        tracing::info!(node_id, replicas = ranges.len(), "replicas started");
        lifecycle.stop_merged_replicas().await?;

        let merges = Arc::new(Merges {
            node_id,
            db: db.clone(),
            replicas: replicas.clone(),
            view: view.clone(),
            transport: TonicMergeTransport::new(peers.clone(), view.clone()),
            auto: AutoMerge {
                size_bytes: cfg.range_merge_size_bytes,
                qps: cfg.range_merge_qps,
                after_split_ms: cfg.range_merge_after_split_ms,
                heartbeat_interval_ms: cfg.node_heartbeat_interval_ms,
            },
        });
        let (stop, stop_rx) = watch::channel(false);
        let tso = Arc::new(Tso::new(cfg.tso_reserve_window_ms));
        let timestamps = Arc::new(NodeTimestamps::new(
            replicas.clone(),
            peers.clone(),
            tso.clone(),
            Duration::from_millis(cfg.commit_ts_staleness_ms),
        ));
        let server = {
            let mut stop_rx = stop_rx.clone();
            let kv_service = Arc::new(KvService::new(
                node_id,
                db.clone(),
                replicas.clone(),
                disk.clone(),
                timestamps.clone(),
            ));
            let kv = KvServer::from_arc(kv_service.clone())
                .max_decoding_message_size(limits::MAX_GRPC_MESSAGE_SIZE_BYTES)
                .max_encoding_message_size(limits::MAX_GRPC_MESSAGE_SIZE_BYTES);
            let admin = AdminServer::new(AdminService::new(AdminParts {
                this_node: ThisNode {
                    node_id,
                    cluster_id: identity.cluster_id,
                    addr: addr.clone(),
                    started,
                },
                db: db.clone(),
                replicas: replicas.clone(),
                peers: peers.clone(),
                view: view.clone(),
                merges: merges.clone(),
                replication_factor: cfg.replication_factor,
                node_heartbeat_interval_ms: cfg.node_heartbeat_interval_ms,
                group_commit: group_commit.clone(),
            }))
            .max_decoding_message_size(limits::MAX_GRPC_MESSAGE_SIZE_BYTES)
            .max_encoding_message_size(limits::MAX_GRPC_MESSAGE_SIZE_BYTES);
            let feed = FeedServer::new(FeedService::new(
                kv_service.clone(),
                db.clone(),
                timestamps.clone(),
                Arc::new(LeaderChecks::start(raft_peers.clone())),
                cfg.feed_slow_consumer_timeout_ms,
            ))
            .max_decoding_message_size(limits::MAX_GRPC_MESSAGE_SIZE_BYTES)
            .max_encoding_message_size(limits::MAX_GRPC_MESSAGE_SIZE_BYTES);
            let txn = TxnServer::new(TxnService::new(
                kv_service,
                replicas.clone(),
                peers.clone(),
                tso,
                timestamps.clone(),
            ))
            .max_decoding_message_size(limits::MAX_GRPC_MESSAGE_SIZE_BYTES)
            .max_encoding_message_size(limits::MAX_GRPC_MESSAGE_SIZE_BYTES);
            let raft_svc = RaftTransportServer::new(RaftService::new(
                replicas.clone(),
                faults.clone(),
                snapshot_dir.clone(),
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
                    .add_service(txn)
                    .add_service(feed)
                    .add_service(raft_svc)
                    .serve_with_incoming_shutdown(incoming, async move {
                        let _ = stop_rx.wait_for(|s| *s).await;
                    }),
            )
        };

        let heartbeat = Heartbeat {
            node_id,
            addr: addr.clone(),
            interval_ms: cfg.node_heartbeat_interval_ms,
            replicas: replicas.clone(),
            lifecycle: lifecycle.clone(),
            peers: peers.clone(),
        };
        let allocator = Arc::new(Allocator {
            node_id,
            db: db.clone(),
            replicas: replicas.clone(),
            view: view.clone(),
            peers: peers.clone(),
            replication_factor: cfg.replication_factor,
            dead_node_timeout_ms: cfg.dead_node_timeout_ms,
            interval_ms: cfg.node_heartbeat_interval_ms,
        });
        let split_check = SplitCheck {
            db: db.clone(),
            replicas: replicas.clone(),
            peers: peers.clone(),
            counters: view.clone(),
            split_size_bytes: cfg.range_split_size_bytes,
            load: LoadSplitPolicy {
                split_qps: cfg.range_split_qps,
                sustain_ms: cfg.range_split_sustain_ms,
                min_node_cpu_fraction: cfg.range_split_min_node_cpu_fraction,
            },
        };
        let (fatal_tx, fatal_rx) = watch::channel(None);
        let loops = vec![
            tokio::spawn(events_loop(lifecycle.clone(), events_rx, stop_rx.clone())),
            tokio::spawn(requests_loop(
                lifecycle.clone(),
                requests_rx,
                stop_rx.clone(),
            )),
            tokio::spawn(heartbeat_loop(heartbeat, stop_rx.clone())),
            tokio::spawn(crate::meta::allocator::allocator_loop(
                allocator,
                stop_rx.clone(),
            )),
            tokio::spawn(crate::range::split::split_loop(
                split_check,
                stop_rx.clone(),
            )),
            tokio::spawn(crate::range::merge::merge_loop(merges, stop_rx.clone())),
            tokio::spawn(crate::node::health::health_loop(
                replicas.clone(),
                group_commit.clone(),
                fatal_tx,
                stop_rx.clone(),
            )),
            tokio::spawn(crate::disk::disk_loop(disk, stop_rx.clone())),
            tokio::spawn(crate::range::gc::gc_loop(
                crate::range::gc::Gc {
                    db: db.clone(),
                    replicas: replicas.clone(),
                    timestamps,
                    ttl_ms: cfg.gc_ttl_ms,
                    interval_ms: cfg.gc_interval_ms,
                },
                stop_rx.clone(),
            )),
            tokio::spawn(crate::range::quiesce::quiesce_loop(
                replicas.clone(),
                raft_peers,
                cfg.quiesce_after_ms,
                stop_rx,
            )),
        ];
        tracing::info!(node_id, %addr, "node serving");
        Ok(Node {
            node_id,
            addr,
            db,
            group_commit,
            replicas,
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
        self.node_id
    }

    /// The address the node serves on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address peers and clients use.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The Raft group of this node's replica of `range_id`.
    pub fn raft(&self, range_id: RangeId) -> Option<RaftHandle> {
        self.replicas.get(range_id).map(|r| r.raft.clone())
    }

    /// The node's database.
    pub fn db(&self) -> &Db {
        &self.db
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
        for replica in self.replicas.all() {
            self.replicas.remove(replica.shared.range_id);
            if let Err(e) = replica.raft.shutdown().await {
                tracing::warn!("raft shutdown: {e}");
            }
        }
        self.group_commit.shutdown();
        self.db.sync_wal()?;
        Ok(())
    }
}

/// Starts the right halves of splits as the state machines apply them.
async fn events_loop(
    lifecycle: Arc<LocalReplicas>,
    mut events: mpsc::Receiver<RangeEvent>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let event = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            e = events.recv() => match e { Some(e) => e, None => return },
        };
        if let Err(e) = lifecycle.on_range_event(event.clone()).await {
            tracing::error!(?event, "handling range event: {e:#}");
        }
    }
}

/// Creates replicas that peers address but this node does not have yet, and stops replicas
/// that merged ranges' snapshots subsume.
async fn requests_loop(
    lifecycle: Arc<LocalReplicas>,
    mut requests: mpsc::Receiver<ReplicaRequest>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let m = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            m = requests.recv() => match m { Some(m) => m, None => return },
        };
        if let Err(e) = lifecycle.on_replica_request(m).await {
            tracing::warn!(request = ?m, "replica request: {e:#}");
        }
    }
}

#[cfg(all(test, feature = "failpoints"))]
mod tests {
    use super::*;

    /// A range no other test of this crate uses, so the process-wide failpoint touches
    /// nothing else.
    const RANGE: RangeId = 999;

    fn local_replicas(dir: &std::path::Path) -> Arc<LocalReplicas> {
        let db = Db::open(&dir.join("db"), &DbOptions::default()).unwrap();
        let group_commit = GroupCommit::start(Arc::new(db.clone())).unwrap();
        let (requests, _) = mpsc::channel(MAX_PENDING_REPLICA_REQUESTS);
        let (events, _) = mpsc::channel(MAX_PENDING_RANGE_EVENTS);
        let raft_config = Arc::new(Config::default().validate().unwrap());
        Arc::new(LocalReplicas {
            node_id: 1,
            db,
            group_commit,
            replicas: Arc::new(ReplicaDirectory::new(requests)),
            peers: PeerChannels::new(1, None, Arc::default()),
            raft_config,
            events,
            snapshot_dir: dir.join("snapshots"),
            dormant: Mutex::default(),
            range_locks: Mutex::default(),
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replica_a_peer_asked_for_does_not_outlive_a_destroy_that_began_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let lifecycle = local_replicas(dir.path());
        // A peer's message asks for replica 1 of the range; it pauses between opening its
        // state and joining the directory, and the range's destroy begins in that pause.
        fail::cfg("replica-start-pause", &format!("return({RANGE}:500)")).unwrap();
        let creating = tokio::spawn({
            let lifecycle = lifecycle.clone();
            async move { lifecycle.create_missing(RANGE, 1).await }
        });
        // It holds the range once it has stored its replica id (bounded: 10 s).
        for _ in 0..2_000 {
            if lifecycle.local_replica_id(RANGE).unwrap().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(lifecycle.local_replica_id(RANGE).unwrap().is_some());
        lifecycle.destroy_replica(RANGE, false).await.unwrap();
        creating.await.unwrap().unwrap();
        fail::remove("replica-start-pause");

        assert!(
            lifecycle.replica(RANGE).is_none(),
            "a replica runs over the state its range's destroy deleted"
        );
        assert_eq!(lifecycle.local_replica_id(RANGE).unwrap(), None);
        assert_eq!(tombstone(&lifecycle.db, RANGE).unwrap(), 2);
        // And the destroyed replica's peers start nothing again.
        lifecycle.create_missing(RANGE, 1).await.unwrap();
        assert!(lifecycle.replica(RANGE).is_none());
    }
}
