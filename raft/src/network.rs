//! Raft transport over tonic: one HTTP/2 connection per peer node shared by every range.
//!
//! Messages are openraft requests in postcard encoding, tagged with their range id and a
//! crc32 of the payload. Snapshots stream in checksummed chunks. [`TransportFaults`] drops
//! traffic to and from chosen peers, for partition tests.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::v2::RaftNetworkV2;
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::storage::Snapshot;
use openraft::{BasicNode, OptionalSend};
use serde::de::DeserializeOwned;
use serde::Serialize;
use spheredb_client::proto::raft::raft_transport_client::RaftTransportClient;
use spheredb_client::proto::raft::raft_transport_server::RaftTransport;
use spheredb_client::proto::raft::{RaftMessage, SnapshotChunk};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};

use crate::types::{NodeId, RaftHandle, RangeId, SnapshotData, SnapshotMeta, TypeConfig, Vote};

/// Largest Raft message sent or accepted, in bytes. Bounds one AppendEntries batch.
pub const MAX_RAFT_MESSAGE_SIZE_BYTES: usize = 256 << 20;
/// Size of each snapshot chunk on the wire.
pub const SNAPSHOT_CHUNK_SIZE_BYTES: usize = 1 << 20;
/// Time allowed to open a peer connection.
pub const PEER_CONNECT_TIMEOUT_MS: u64 = 500;

fn encode<T: Serialize>(
    range_id: RangeId,
    from_node: NodeId,
    value: &T,
) -> Result<RaftMessage, String> {
    let payload = postcard::to_stdvec(value).map_err(|e| e.to_string())?;
    Ok(RaftMessage {
        range_id,
        crc32: crc32fast::hash(&payload),
        payload,
        from_node,
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

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        PeerClient {
            peers: self.peers.clone(),
            range_id: self.range_id,
            target,
            addr: node.addr.clone(),
        }
    }
}

/// Sends one range's Raft messages to one peer.
pub struct PeerClient {
    peers: PeerChannels,
    range_id: RangeId,
    target: NodeId,
    addr: String,
}

fn unreachable(msg: impl ToString) -> RPCError<TypeConfig> {
    RPCError::Unreachable(Unreachable::from_string(msg))
}

impl PeerClient {
    fn check_faults(&self) -> Result<(), RPCError<TypeConfig>> {
        if self.peers.faults.is_blocked(self.target) {
            return Err(unreachable(format!(
                "link to node {} is cut by fault injection",
                self.target
            )));
        }
        Ok(())
    }

    fn map_status(&self, status: Status) -> RPCError<TypeConfig> {
        match status.code() {
            tonic::Code::Unavailable => unreachable(format!(
                "node {} at {}: {}",
                self.target,
                self.addr,
                status.message()
            )),
            _ => RPCError::Network(NetworkError::from_string(format!(
                "node {} at {}: {}: {}",
                self.target,
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
        vote: bool,
    ) -> Result<Resp, RPCError<TypeConfig>> {
        self.check_faults()?;
        let msg = encode(self.range_id, self.peers.node_id, req)
            .map_err(|e| RPCError::Network(NetworkError::from_string(e)))?;
        let mut client = self.peers.client(&self.addr).map_err(unreachable)?;
        let mut request = Request::new(msg);
        request.set_timeout(option.hard_ttl());
        let reply = if vote {
            client.vote(request).await
        } else {
            client.append(request).await
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
        self.unary(&rpc, &option, false).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(&rpc, &option, true).await
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
        let (range_id, from_node) = (self.range_id, self.peers.node_id);
        let data = snapshot.snapshot;
        let mut chunks: Vec<SnapshotChunk> = data
            .chunks(SNAPSHOT_CHUNK_SIZE_BYTES)
            .map(|c| SnapshotChunk {
                range_id,
                header: Vec::new(),
                crc32: crc32fast::hash(c),
                data: c.to_vec(),
                from_node,
            })
            .collect();
        if chunks.is_empty() {
            chunks.push(SnapshotChunk {
                range_id,
                header: Vec::new(),
                crc32: crc32fast::hash(&[]),
                data: Vec::new(),
                from_node,
            });
        }
        chunks[0].header = header;
        let mut client = self.peers.client(&self.addr).map_err(unreachable)?;
        let mut request = Request::new(futures::stream::iter(chunks));
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

/// The node's Raft groups by range id.
pub type RangeRegistry = Arc<RwLock<HashMap<RangeId, RaftHandle>>>;

/// Receives Raft traffic for every range on this node.
pub struct RaftService {
    ranges: RangeRegistry,
    faults: Arc<TransportFaults>,
}

impl RaftService {
    /// A service dispatching to `ranges`.
    pub fn new(ranges: RangeRegistry, faults: Arc<TransportFaults>) -> Self {
        RaftService { ranges, faults }
    }

    fn raft(&self, range_id: RangeId, from_node: NodeId) -> Result<RaftHandle, Status> {
        if self.faults.is_blocked(from_node) {
            return Err(Status::unavailable(format!(
                "link from node {from_node} is cut by fault injection"
            )));
        }
        self.ranges
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&range_id)
            .cloned()
            .ok_or_else(|| {
                Status::not_found(format!("range {range_id} has no replica on this node"))
            })
    }
}

fn reply<T: Serialize>(range_id: RangeId, value: &T) -> Result<Response<RaftMessage>, Status> {
    encode(range_id, 0, value)
        .map(Response::new)
        .map_err(Status::internal)
}

#[tonic::async_trait]
impl RaftTransport for RaftService {
    async fn append(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let msg = request.into_inner();
        let raft = self.raft(msg.range_id, msg.from_node)?;
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
        let raft = self.raft(msg.range_id, msg.from_node)?;
        let req: VoteRequest<TypeConfig> = decode(&msg).map_err(Status::invalid_argument)?;
        let resp = raft
            .vote(req)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        reply(msg.range_id, &resp)
    }

    async fn snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftMessage>, Status> {
        let mut stream = request.into_inner();
        let mut header: Option<(Vote, SnapshotMeta)> = None;
        let mut data: Vec<u8> = Vec::new();
        let mut range: Option<(RangeId, NodeId)> = None;
        while let Some(chunk) = stream.message().await? {
            if crc32fast::hash(&chunk.data) != chunk.crc32 {
                return Err(Status::data_loss("snapshot chunk checksum mismatch"));
            }
            if data.len() + chunk.data.len() > crate::state_machine::MAX_SNAPSHOT_SIZE_BYTES {
                return Err(Status::resource_exhausted(format!(
                    "snapshot exceeds {} bytes",
                    crate::state_machine::MAX_SNAPSHOT_SIZE_BYTES
                )));
            }
            if header.is_none() {
                header =
                    Some(postcard::from_bytes(&chunk.header).map_err(|e| {
                        Status::invalid_argument(format!("bad snapshot header: {e}"))
                    })?);
                range = Some((chunk.range_id, chunk.from_node));
            }
            data.extend_from_slice(&chunk.data);
        }
        let (Some((vote, meta)), Some((range_id, from_node))) = (header, range) else {
            return Err(Status::invalid_argument("empty snapshot stream"));
        };
        let raft = self.raft(range_id, from_node)?;
        let resp = raft
            .install_full_snapshot(
                vote,
                Snapshot {
                    meta,
                    snapshot: data,
                },
            )
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        reply(range_id, &resp)
    }
}
