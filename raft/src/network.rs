//! Raft transport over tonic: one HTTP/2 connection per peer node shared by every range.
//!
//! Messages are openraft requests in postcard encoding, tagged with their range id and a
//! crc32 of the payload. Snapshots stream in checksummed chunks. [`TransportFaults`] drops
//! traffic to and from chosen peers, for partition tests.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::v2::RaftNetworkV2;
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::storage::Snapshot;
use openraft::OptionalSend;
use serde::de::DeserializeOwned;
use serde::Serialize;
use spheredb_client::proto::raft::raft_transport_client::RaftTransportClient;
use spheredb_client::proto::raft::raft_transport_server::RaftTransport;
use spheredb_client::proto::raft::{RaftMessage, SnapshotChunk};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};

use crate::snapshot::{header_of, SnapshotReceiver};
use crate::spans::SpanRegistry;
use crate::state_machine::ReplicaShared;
use crate::types::{
    NodeId, RaftHandle, RangeId, ReplicaId, ReplicaNode, SnapshotData, SnapshotMeta, TypeConfig,
    Vote,
};

/// Most claims one `CheckLeader` message carries; a node checking more sends several.
pub const MAX_LEADER_CLAIMS_PER_CHECK: usize = 10_000;
/// Longest a peer waits for one replica's vote while answering a `CheckLeader`.
pub const CLAIM_READ_TIMEOUT_MS: u64 = 200;

/// A leader's claim, in a batched leadership check, that replica `replica_id` of range
/// `range_id` on the asked node still holds `vote`, the leader's committed vote.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeaderClaim {
    pub range_id: RangeId,
    pub replica_id: ReplicaId,
    pub vote: Vote,
}

/// Whether replica `here`, holding `vote` in its Raft core, confirms `claim`: it is the
/// replica the leader addressed and its vote is exactly the leader's committed one. Votes only
/// grow, so the replica has granted no newer candidate anything: no leader of a later term
/// can have counted on it before the answer.
pub fn confirms_claim(claim: &LeaderClaim, here: ReplicaId, vote: &Vote) -> bool {
    here == claim.replica_id && claim.vote.is_committed() && *vote == claim.vote
}

/// Largest Raft message sent or accepted, in bytes. Bounds one AppendEntries batch.
pub const MAX_RAFT_MESSAGE_SIZE_BYTES: usize = 256 << 20;
/// Size of each snapshot chunk on the wire.
pub const SNAPSHOT_CHUNK_SIZE_BYTES: usize = 1 << 20;
/// Time allowed to open a peer connection.
pub const PEER_CONNECT_TIMEOUT_MS: u64 = 500;
/// Shortest deadline given to a Raft RPC. openraft asks for the heartbeat interval on
/// appends and heartbeats; on a busy node with many ranges an answer can take longer, and
/// cancelling it only makes the leader send it again (and lose its lease meanwhile).
pub const MIN_RAFT_RPC_TIMEOUT_MS: u64 = 1_000;

/// The deadline of a Raft RPC openraft gave `option`.
fn rpc_timeout(option: &RPCOption) -> Duration {
    option
        .hard_ttl()
        .max(Duration::from_millis(MIN_RAFT_RPC_TIMEOUT_MS))
}

fn encode<T: Serialize>(
    range_id: RangeId,
    from_node: NodeId,
    to_replica: ReplicaId,
    value: &T,
) -> Result<RaftMessage, String> {
    let payload = postcard::to_stdvec(value).map_err(|e| e.to_string())?;
    Ok(RaftMessage {
        range_id,
        crc32: crc32fast::hash(&payload),
        payload,
        from_node,
        to_replica,
    })
}

fn decode<T: DeserializeOwned>(msg: &RaftMessage) -> Result<T, String> {
    let actual = crc32fast::hash(&msg.payload);
    if actual != msg.crc32 {
        return Err(format!(
            "raft message checksum mismatch: carried {:#010x}, computed {actual:#010x}",
            msg.crc32
        ));
    }
    postcard::from_bytes(&msg.payload).map_err(|e| format!("undecodable raft message: {e}"))
}

/// Peers whose traffic is dropped, in both directions. Empty in production.
#[derive(Debug, Default)]
pub struct TransportFaults {
    blocked: RwLock<HashSet<NodeId>>,
}

impl TransportFaults {
    /// Drops all traffic to and from `peers`.
    pub fn block(&self, peers: impl IntoIterator<Item = NodeId>) {
        self.blocked
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .extend(peers);
    }

    /// Restores traffic with every peer.
    pub fn heal(&self) {
        self.blocked
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// True when traffic with `peer` is dropped.
    pub fn is_blocked(&self, peer: NodeId) -> bool {
        self.blocked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&peer)
    }
}

/// The node's connections to its peers, one per address, shared by all ranges.
#[derive(Clone)]
pub struct PeerChannels {
    node_id: NodeId,
    /// Source address of outgoing connections: the node's advertised IP, so per-link network
    /// rules (firewalls, fault injection by address pairs) see who is talking.
    local_ip: Option<std::net::IpAddr>,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    faults: Arc<TransportFaults>,
}

impl PeerChannels {
    /// Connections of node `node_id`, made from `local_ip` when given.
    pub fn new(
        node_id: NodeId,
        local_ip: Option<std::net::IpAddr>,
        faults: Arc<TransportFaults>,
    ) -> Self {
        PeerChannels {
            node_id,
            local_ip,
            channels: Arc::new(Mutex::new(HashMap::new())),
            faults,
        }
    }

    /// Sends `claims` (at most [`MAX_LEADER_CLAIMS_PER_CHECK`]) to node `node_id` at `addr`;
    /// answers the indexes of the claims its replicas confirmed (see [`confirms_claim`]).
    pub async fn check_leader(
        &self,
        node_id: NodeId,
        addr: &str,
        claims: &[LeaderClaim],
        timeout: Duration,
    ) -> Result<Vec<usize>, String> {
        if self.faults.is_blocked(node_id) {
            return Err(format!("link to node {node_id} is cut"));
        }
        let msg = encode(0, self.node_id, 0, &claims)?;
        let mut client = self.client(addr)?;
        let mut request = Request::new(msg);
        request.set_timeout(timeout);
        let answer = client
            .check_leader(request)
            .await
            .map_err(|s| s.message().to_string())?;
        decode(&answer.into_inner())
    }

    fn client(&self, addr: &str) -> Result<RaftTransportClient<Channel>, String> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let channel = match channels.get(addr) {
            Some(ch) => ch.clone(),
            None => {
                // A lazy channel reconnects by itself; openraft's backoff paces the retries.
                let ch = Endpoint::from_shared(format!("http://{addr}"))
                    .map_err(|e| format!("bad peer address {addr:?}: {e}"))?
                    .connect_timeout(Duration::from_millis(PEER_CONNECT_TIMEOUT_MS))
                    .tcp_nodelay(true)
                    .local_address(self.local_ip)
                    .http2_keep_alive_interval(Duration::from_secs(5))
                    .keep_alive_timeout(Duration::from_secs(5))
                    .connect_lazy();
                channels.insert(addr.to_string(), ch.clone());
                ch
            }
        };
        Ok(RaftTransportClient::new(channel)
            .max_decoding_message_size(MAX_RAFT_MESSAGE_SIZE_BYTES)
            .max_encoding_message_size(MAX_RAFT_MESSAGE_SIZE_BYTES))
    }

    /// The network factory of range `range_id`.
    pub fn factory(&self, range_id: RangeId) -> NetworkFactory {
        NetworkFactory {
            peers: self.clone(),
            range_id,
        }
    }
}

/// Creates per-peer clients for one range.
pub struct NetworkFactory {
    peers: PeerChannels,
    range_id: RangeId,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: ReplicaId, node: &ReplicaNode) -> Self::Network {
        PeerClient {
            peers: self.peers.clone(),
            range_id: self.range_id,
            target,
            target_node: node.node_id,
            addr: node.addr.clone(),
        }
    }
}

/// The unary Raft calls.
#[derive(Clone, Copy)]
enum Rpc {
    Append,
    Vote,
    PreVote,
    TransferLeader,
}

/// Sends one range's Raft messages to one replica on a peer node.
pub struct PeerClient {
    peers: PeerChannels,
    range_id: RangeId,
    target: ReplicaId,
    target_node: NodeId,
    addr: String,
}

fn unreachable(msg: impl ToString) -> RPCError<TypeConfig> {
    RPCError::Unreachable(Unreachable::from_string(msg))
}

impl PeerClient {
    fn check_faults(&self) -> Result<(), RPCError<TypeConfig>> {
        if self.peers.faults.is_blocked(self.target_node) {
            return Err(unreachable(format!(
                "link to node {} is cut by fault injection",
                self.target_node
            )));
        }
        Ok(())
    }

    fn map_status(&self, status: Status) -> RPCError<TypeConfig> {
        match status.code() {
            tonic::Code::Unavailable => unreachable(format!(
                "node {} at {}: {}",
                self.target_node,
                self.addr,
                status.message()
            )),
            _ => RPCError::Network(NetworkError::from_string(format!(
                "node {} at {}: {}: {}",
                self.target_node,
                self.addr,
                status.code(),
                status.message()
            ))),
        }
    }

    async fn unary<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        req: &Req,
        option: &RPCOption,
        rpc: Rpc,
    ) -> Result<Resp, RPCError<TypeConfig>> {
        self.check_faults()?;
        let msg = encode(self.range_id, self.peers.node_id, self.target, req)
            .map_err(|e| RPCError::Network(NetworkError::from_string(e)))?;
        let mut client = self.peers.client(&self.addr).map_err(unreachable)?;
        let mut request = Request::new(msg);
        request.set_timeout(rpc_timeout(option));
        let reply = match rpc {
            Rpc::Append => client.append(request).await,
            Rpc::Vote => client.vote(request).await,
            Rpc::PreVote => client.pre_vote(request).await,
            Rpc::TransferLeader => client.transfer_leader(request).await,
        }
        .map_err(|s| self.map_status(s))?;
        decode(reply.get_ref()).map_err(|e| RPCError::Network(NetworkError::from_string(e)))
    }
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(&rpc, &option, Rpc::Append).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(&rpc, &option, Rpc::Vote).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(&rpc, &option, Rpc::PreVote).await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(&req, &option, Rpc::TransferLeader).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: openraft::alias::SnapshotOf<TypeConfig, SnapshotData>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        self.check_faults()?;
        let header = postcard::to_stdvec(&(&vote, &snapshot.meta))
            .map_err(|e| StreamingError::from(RPCError::Network(NetworkError::from_string(e))))?;
        let (range_id, from_node, to_replica) = (self.range_id, self.peers.node_id, self.target);
        let file = snapshot.snapshot;
        // Chunks are read from the file as the stream is polled, so one chunk at a time is in
        // memory whatever the snapshot's size. A read error ends the stream early; the
        // receiver refuses the truncated file and the send fails.
        let chunks = futures::stream::unfold(0u64, move |offset| {
            let file = file.clone();
            let header = if offset == 0 {
                header.clone()
            } else {
                Vec::new()
            };
            async move {
                if offset >= file.size_bytes() {
                    return None;
                }
                let read = tokio::task::spawn_blocking(move || {
                    file.read_chunk(offset, SNAPSHOT_CHUNK_SIZE_BYTES)
                })
                .await;
                let data = match read {
                    Ok(Ok(data)) if !data.is_empty() => data,
                    Ok(Ok(_)) => return None,
                    Ok(Err(e)) => {
                        tracing::error!(
                            range_id,
                            offset,
                            "cannot read the snapshot being sent: {e}"
                        );
                        return None;
                    }
                    Err(e) => {
                        tracing::error!(range_id, offset, "snapshot read task failed: {e}");
                        return None;
                    }
                };
                let next = offset + data.len() as u64;
                let chunk = SnapshotChunk {
                    range_id,
                    header,
                    crc32: crc32fast::hash(&data),
                    data,
                    from_node,
                    to_replica,
                };
                Some((chunk, next))
            }
        });
        let mut client = self.peers.client(&self.addr).map_err(unreachable)?;
        let mut request = Request::new(chunks);
        request.set_timeout(option.hard_ttl());
        tokio::pin!(cancel);
        let reply = tokio::select! {
            closed = &mut cancel => return Err(StreamingError::Closed(closed)),
            reply = client.snapshot(request) => reply.map_err(|s| self.map_status(s))?,
        };
        decode(reply.get_ref())
            .map_err(|e| StreamingError::from(RPCError::Network(NetworkError::from_string(e))))
    }
}

/// Most replica requests (creations, subsumptions) queued for the node; more are dropped (the sender
/// retries).
pub const MAX_PENDING_REPLICA_REQUESTS: usize = 1024;

/// One range's replica on this node.
pub struct Replica {
    pub raft: RaftHandle,
    pub shared: Arc<ReplicaShared>,
    /// Requests served since the node last sampled the range's load.
    pub ops: AtomicU64,
    /// When a request or Raft message last touched the range, as ms since `epoch`.
    last_active_ms: AtomicU64,
    epoch: Instant,
    /// True while the range is quiesced: ticks (elections, heartbeats) paused.
    pub quiesced: AtomicBool,
    /// Size of the range's data when the node last measured it.
    pub size_bytes: AtomicU64,
    /// Requests per second over the last heartbeat period, as `f64` bits.
    qps_bits: AtomicU64,
    /// When this node last asked the range to hand leadership over, as ms since `epoch`
    /// (0: never).
    transfer_requested_ms: AtomicU64,
}

impl Replica {
    /// A replica running `raft`.
    pub fn new(raft: RaftHandle, shared: Arc<ReplicaShared>) -> Replica {
        Replica {
            raft,
            shared,
            ops: AtomicU64::new(0),
            last_active_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            quiesced: AtomicBool::new(false),
            size_bytes: AtomicU64::new(0),
            qps_bits: AtomicU64::new(0),
            transfer_requested_ms: AtomicU64::new(0),
        }
    }

    /// Notes that leadership transfer was just requested.
    pub fn note_transfer(&self) {
        self.transfer_requested_ms.store(
            self.epoch.elapsed().as_millis() as u64 + 1,
            Ordering::Relaxed,
        );
    }

    /// Milliseconds since leadership transfer was last requested, if ever.
    pub fn since_transfer_ms(&self) -> Option<u64> {
        match self.transfer_requested_ms.load(Ordering::Relaxed) {
            0 => None,
            at => Some((self.epoch.elapsed().as_millis() as u64).saturating_sub(at - 1)),
        }
    }

    /// Requests per second over the last heartbeat period.
    pub fn qps(&self) -> f64 {
        f64::from_bits(self.qps_bits.load(Ordering::Relaxed))
    }

    /// Records the load measured over the last heartbeat period.
    pub fn set_qps(&self, qps: f64) {
        self.qps_bits.store(qps.to_bits(), Ordering::Relaxed);
    }

    /// Records activity, and wakes the range if it is quiesced.
    pub fn touch(&self) {
        self.last_active_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        if self.quiesced.swap(false, Ordering::AcqRel) {
            self.raft.runtime_config().tick(true);
        }
    }

    /// Milliseconds since the range was last touched.
    pub fn idle_ms(&self) -> u64 {
        (self.epoch.elapsed().as_millis() as u64)
            .saturating_sub(self.last_active_ms.load(Ordering::Relaxed))
    }

    /// Asks the follower replica `target` on `node` to quiesce: it stops ticking if it agrees
    /// with this leader's vote and last log index.
    pub async fn ask_quiesce(
        &self,
        peers: &PeerChannels,
        range_id: RangeId,
        target: ReplicaId,
        node: &ReplicaNode,
        timeout: Duration,
    ) -> Result<(), String> {
        if peers.faults.is_blocked(node.node_id) {
            return Err(format!("link to node {} is cut", node.node_id));
        }
        let metrics = self.raft.metrics().borrow_watched().clone();
        let msg = encode(
            range_id,
            peers.node_id,
            target,
            &(metrics.vote, metrics.last_log_index),
        )?;
        let mut client = peers.client(&node.addr)?;
        let mut request = Request::new(msg);
        request.set_timeout(timeout);
        client
            .quiesce(request)
            .await
            .map(|_| ())
            .map_err(|s| s.message().to_string())
    }

    /// Pauses ticks: no heartbeats, no elections, until [`Replica::touch`].
    pub fn quiesce(&self) {
        if !self.quiesced.swap(true, Ordering::AcqRel) {
            self.raft.runtime_config().tick(false);
        }
    }
}

/// What the transport asks of the node about its replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaRequest {
    /// A peer addressed replica `replica_id` of a range this node has no replica of.
    Create {
        range_id: RangeId,
        replica_id: ReplicaId,
    },
    /// A snapshot of range `by` arrived while this node's replica of `range_id`, frozen for
    /// a merge into `by`, still covers part of it: the merge happened, so stop that replica.
    Subsume { range_id: RangeId, by: RangeId },
}

/// The node's replicas by range id.
pub struct ReplicaDirectory {
    replicas: RwLock<HashMap<RangeId, Arc<Replica>>>,
    requests: tokio::sync::mpsc::Sender<ReplicaRequest>,
    /// Which replica owns which keys; see [`SpanRegistry`].
    spans: Arc<SpanRegistry>,
}

impl ReplicaDirectory {
    /// An empty directory; what the node must do about its replicas goes to `requests`.
    pub fn new(requests: tokio::sync::mpsc::Sender<ReplicaRequest>) -> ReplicaDirectory {
        ReplicaDirectory {
            replicas: RwLock::new(HashMap::new()),
            requests,
            spans: Arc::default(),
        }
    }

    /// The node's span registry, the one owner of which replica owns which keys.
    pub fn spans(&self) -> &Arc<SpanRegistry> {
        &self.spans
    }

    /// The replica of `range_id`.
    pub fn get(&self, range_id: RangeId) -> Option<Arc<Replica>> {
        self.replicas
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&range_id)
            .cloned()
    }

    /// Adds a replica; returns false (and adds nothing) if the range already has one.
    pub fn insert(&self, replica: Arc<Replica>) -> bool {
        let mut map = self.replicas.write().unwrap_or_else(|p| p.into_inner());
        if map.contains_key(&replica.shared.range_id) {
            return false;
        }
        map.insert(replica.shared.range_id, replica);
        true
    }

    /// Removes the replica of `range_id`.
    pub fn remove(&self, range_id: RangeId) -> Option<Arc<Replica>> {
        self.replicas
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&range_id)
    }

    /// How many replicas the node has.
    pub fn count(&self) -> usize {
        self.replicas
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Every replica.
    pub fn all(&self) -> Vec<Arc<Replica>> {
        self.replicas
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The replica whose span holds `key`. Should two (a parent that has not applied its
    /// split yet, and the right half), the one starting later is the current one.
    pub fn covering(&self, key: &[u8]) -> Option<Arc<Replica>> {
        self.all()
            .into_iter()
            .filter_map(|r| r.shared.span().filter(|s| s.contains(key)).map(|s| (s, r)))
            .max_by(|(a, _), (b, _)| a.start_key.cmp(&b.start_key))
            .map(|(_, r)| r)
    }
}

/// Receives Raft traffic for every range on this node.
pub struct RaftService {
    replicas: Arc<ReplicaDirectory>,
    faults: Arc<TransportFaults>,
    /// Where received snapshots are written while they arrive.
    snapshot_dir: PathBuf,
    /// Permits for snapshots being received at once.
    receiving: Arc<tokio::sync::Semaphore>,
}

/// Most snapshots a node receives at once; more are refused and their senders retry.
pub const MAX_CONCURRENT_SNAPSHOT_RECEIVES: usize = 4;

impl RaftService {
    /// Refuses a message from `from_node` while fault injection cuts the link.
    fn check_link(&self, from_node: NodeId) -> Result<(), Status> {
        if self.faults.is_blocked(from_node) {
            return Err(Status::unavailable("link cut by fault injection"));
        }
        Ok(())
    }

    /// A service dispatching to `replicas`, receiving snapshots into `snapshot_dir`.
    pub fn new(
        replicas: Arc<ReplicaDirectory>,
        faults: Arc<TransportFaults>,
        snapshot_dir: PathBuf,
    ) -> Self {
        RaftService {
            replicas,
            faults,
            snapshot_dir,
            receiving: Arc::new(tokio::sync::Semaphore::new(
                MAX_CONCURRENT_SNAPSHOT_RECEIVES,
            )),
        }
    }

    fn raft(
        &self,
        range_id: RangeId,
        from_node: NodeId,
        to_replica: ReplicaId,
    ) -> Result<RaftHandle, Status> {
        if self.faults.is_blocked(from_node) {
            return Err(Status::unavailable(format!(
                "link from node {from_node} is cut by fault injection"
            )));
        }
        match self.replicas.get(range_id) {
            Some(r) => {
                let here = r.raft.metrics().borrow_watched().id;
                if here == to_replica || to_replica == 0 {
                    r.touch();
                    return Ok(r.raft.clone());
                }
                if here < to_replica {
                    // The replica here was removed from the range and a new one added on this
                    // node since; the old one must not answer for the new one (it would ack
                    // appends it was never meant to hold). The node replaces it.
                    let _ = self.replicas.requests.try_send(ReplicaRequest::Create {
                        range_id,
                        replica_id: to_replica,
                    });
                }
                Err(Status::unavailable(format!(
                    "range {range_id} has replica {here} on this node, not replica {to_replica}"
                )))
            }
            None => {
                // The node creates the replica in the background; the sender retries. A full
                // queue drops the request: the sender's next retry asks again.
                let _ = self.replicas.requests.try_send(ReplicaRequest::Create {
                    range_id,
                    replica_id: to_replica,
                });
                Err(Status::unavailable(format!(
                    "range {range_id} has no replica on this node yet"
                )))
            }
        }
    }
}

fn reply<T: Serialize>(range_id: RangeId, value: &T) -> Result<Response<RaftMessage>, Status> {
    encode(range_id, 0, 0, value)
        .map(Response::new)
        .map_err(Status::internal)
}

#[tonic::async_trait]
impl RaftTransport for RaftService {
    async fn append(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let msg = request.into_inner();
        let raft = self.raft(msg.range_id, msg.from_node, msg.to_replica)?;
        let req: AppendEntriesRequest<TypeConfig> =
            decode(&msg).map_err(Status::invalid_argument)?;
        let resp = raft
            .append_entries(req)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        reply(msg.range_id, &resp)
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let msg = request.into_inner();
        let raft = self.raft(msg.range_id, msg.from_node, msg.to_replica)?;
        let req: VoteRequest<TypeConfig> = decode(&msg).map_err(Status::invalid_argument)?;
        let resp = raft
            .vote(req)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        reply(msg.range_id, &resp)
    }

    async fn pre_vote(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let msg = request.into_inner();
        let raft = self.raft(msg.range_id, msg.from_node, msg.to_replica)?;
        let req: VoteRequest<TypeConfig> = decode(&msg).map_err(Status::invalid_argument)?;
        let resp = raft
            .pre_vote(req)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        reply(msg.range_id, &resp)
    }

    async fn transfer_leader(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let msg = request.into_inner();
        let raft = self.raft(msg.range_id, msg.from_node, msg.to_replica)?;
        let req: TransferLeaderRequest<TypeConfig> =
            decode(&msg).map_err(Status::invalid_argument)?;
        let resp = raft
            .handle_transfer_leader(req)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        reply(msg.range_id, &resp)
    }

    async fn quiesce(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let msg = request.into_inner();
        self.check_link(msg.from_node)?;
        let (vote, last_log_index): (Vote, Option<u64>) =
            decode(&msg).map_err(Status::invalid_argument)?;
        let replica = self
            .replicas
            .get(msg.range_id)
            .ok_or_else(|| Status::not_found(format!("range {} is not here", msg.range_id)))?;
        let metrics = replica.raft.metrics().borrow_watched().clone();
        if metrics.id != msg.to_replica {
            return Err(Status::not_found(format!(
                "range {} has replica {} on this node, not replica {}",
                msg.range_id, metrics.id, msg.to_replica
            )));
        }
        if metrics.vote != vote || metrics.last_log_index != last_log_index {
            return Err(Status::failed_precondition(
                "follower is not in step with the leader; not quiescing",
            ));
        }
        replica.quiesce();
        reply(msg.range_id, &())
    }

    async fn check_leader(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let msg = request.into_inner();
        self.check_link(msg.from_node)?;
        let claims: Vec<LeaderClaim> = decode(&msg).map_err(Status::invalid_argument)?;
        if claims.len() > MAX_LEADER_CLAIMS_PER_CHECK {
            return Err(Status::invalid_argument(format!(
                "{} leader claims in one check; at most {MAX_LEADER_CLAIMS_PER_CHECK}",
                claims.len()
            )));
        }
        // The vote is read from each replica's Raft core, in order with the votes it grants:
        // its metrics are published after the fact and may still show the leader's vote
        // when a newer one was granted. Nothing here touches the replicas: a quiesced range
        // stays quiesced.
        // A busy core does not hold up the answer: its claim goes unconfirmed.
        let read_timeout = Duration::from_millis(CLAIM_READ_TIMEOUT_MS);
        let checks = claims.iter().enumerate().map(|(index, claim)| async move {
            let replica = self.replicas.get(claim.range_id)?;
            let here = replica.raft.metrics().borrow_watched().id;
            let vote = replica.raft.with_raft_state(|s| *s.vote_ref());
            let vote = tokio::time::timeout(read_timeout, vote).await.ok()?.ok()?;
            confirms_claim(claim, here, &vote).then_some(index)
        });
        let confirmed: Vec<usize> = futures::future::join_all(checks)
            .await
            .into_iter()
            .flatten()
            .collect();
        reply(0, &confirmed)
    }

    async fn snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftMessage>, Status> {
        let mut stream = request.into_inner();
        // The first chunk names the range and carries the headers: the transfer's (vote,
        // meta) and, in its first bytes, the file's. Everything that can refuse the snapshot
        // is decided from them before any byte is written; the rest streams to a temporary
        // file, one chunk in memory at a time.
        let Some(first) = stream.message().await? else {
            return Err(Status::invalid_argument("empty snapshot stream"));
        };
        if crc32fast::hash(&first.data) != first.crc32 {
            return Err(Status::data_loss("snapshot chunk checksum mismatch"));
        }
        let (vote, meta): (Vote, SnapshotMeta) = postcard::from_bytes(&first.header)
            .map_err(|e| Status::invalid_argument(format!("bad snapshot header: {e}")))?;
        let range_id = first.range_id;
        // Only a replica hosted here receives.
        let raft = self.raft(range_id, first.from_node, first.to_replica)?;
        let header = header_of(&first.data).map_err(|e| Status::data_loss(e.to_string()))?;
        if header.meta.last_log_id != meta.last_log_id {
            return Err(Status::data_loss(format!(
                "snapshot file holds log id {:?}, its transfer names {:?}",
                header.meta.last_log_id, meta.last_log_id
            )));
        }
        // Installing clears the snapshot's span, so the span is reserved first: refused while
        // another range here claims part of it (a parent that has not applied its split yet,
        // a removed replica not yet destroyed, another install in flight, a merge of this
        // range being applied), and the sender retries. The reservation is the only way a
        // replica gains keys.
        let reservation = match &header.span {
            None => None,
            Some(_) if crate::state_machine::skip_span_reservation() => None,
            Some(span) => match self.replicas.spans().reserve(range_id, span) {
                Ok(r) => Some(r),
                Err(conflict) => {
                    let other = conflict.other;
                    // A replica frozen for a merge into this range that the snapshot's state
                    // says has happened: the node stops that replica and the sender's retry
                    // installs. (A span that merely covers it proves nothing: an old snapshot
                    // from before the right range split off covers it too.)
                    let subsumed = match self.replicas.get(other).and_then(|r| r.shared.frozen()) {
                        Some(f) if f.into == range_id && other != range_id => {
                            header.merged(other, f)
                        }
                        _ => false,
                    };
                    if subsumed {
                        let _ = self.replicas.requests.try_send(ReplicaRequest::Subsume {
                            range_id: other,
                            by: range_id,
                        });
                    }
                    return Err(Status::unavailable(format!("{conflict}; retry later")));
                }
            },
        };
        // A bounded number of transfers at once: each holds a temporary file as large as its
        // range until it is installed.
        let _receiving = self.receiving.clone().try_acquire_owned().map_err(|_| {
            Status::unavailable(format!(
                "{MAX_CONCURRENT_SNAPSHOT_RECEIVES} snapshots are being received; retry later"
            ))
        })?;
        let mut receiver = SnapshotReceiver::create(&self.snapshot_dir, range_id)
            .map_err(|e| Status::internal(format!("cannot receive a snapshot: {e}")))?;
        let mut chunk = first;
        loop {
            receiver.chunk(&chunk.data).map_err(|e| match e.kind() {
                std::io::ErrorKind::InvalidInput => Status::resource_exhausted(e.to_string()),
                _ => Status::internal(format!("cannot write a received snapshot: {e}")),
            })?;
            chunk = match stream.message().await? {
                Some(next) => next,
                None => break,
            };
            if crc32fast::hash(&chunk.data) != chunk.crc32 {
                return Err(Status::data_loss("snapshot chunk checksum mismatch"));
            }
        }
        // Syncing and verifying the whole file would stall an async worker; the blocking pool
        // does it.
        let file = tokio::task::spawn_blocking(move || receiver.finish())
            .await
            .map_err(|e| Status::internal(format!("snapshot verify task failed: {e}")))?
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::InvalidData => Status::data_loss(e.to_string()),
                _ => Status::internal(format!("cannot store a received snapshot: {e}")),
            })?;
        if file.header().span != header.span || file.meta().last_log_id != meta.last_log_id {
            return Err(Status::data_loss(
                "the received snapshot file does not match its own header",
            ));
        }
        // openraft installs on its own task and answers when done. The install runs in a task
        // that holds the reservation, so a caller that gives up (timeout, closed stream) does
        // not free the span while the install is still queued.
        let install = tokio::spawn(async move {
            let result = raft
                .install_full_snapshot(
                    vote,
                    Snapshot {
                        meta,
                        snapshot: file,
                    },
                )
                .await;
            drop(reservation);
            result
        });
        let resp = install
            .await
            .map_err(|e| Status::internal(format!("snapshot install task failed: {e}")))?
            .map_err(|e| Status::unavailable(e.to_string()))?;
        reply(range_id, &resp)
    }
}
