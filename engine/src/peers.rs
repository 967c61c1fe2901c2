//! Calls from this node to other nodes' admin services: the addresses this node knows, one
//! lazily connected channel per address, and the meta-range leader as last heard of.
//!
//! This is the tonic side of node-to-node calls; it decides nothing about ranges. Raft's own
//! messages go through `spheredb_raft::network::PeerChannels`, not here.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use spheredb_client::limits;
use spheredb_client::proto::v1::admin_client::AdminClient;
use spheredb_client::proto::v1::NodeInfo;
use spheredb_client::ClientError;
use spheredb_raft::network::ReplicaDirectory;
use spheredb_raft::NodeId;
use tonic::transport::Channel;

use crate::replica::{leader_node, meta_replica};

/// Time allowed for one node-to-node admin call.
pub const PEER_CALL_TIMEOUT_MS: u64 = 5_000;
/// Most nodes a call to the meta-range leader tries before giving up.
pub const META_CALL_ATTEMPTS: usize = 6;

/// The other nodes as this node reaches them.
pub struct Peers {
    /// Local replicas: the meta range's, when this node holds one, knows its leader best.
    replicas: Arc<ReplicaDirectory>,
    /// Addresses of the nodes this node knows, by id.
    known_nodes: RwLock<HashMap<NodeId, String>>,
    /// The node believed to lead the meta range.
    meta_leader: RwLock<Option<NodeId>>,
    admin_channels: Mutex<HashMap<String, Channel>>,
    /// The address calls leave from (the node's advertised IP), so that per-link network
    /// rules cut node-to-node admin traffic as they cut Raft traffic.
    local_ip: Option<IpAddr>,
}

/// The IP a node's outgoing connections leave from: its advertised IP, when that is a
/// concrete address (several nodes on one host then stay distinguishable by source).
pub fn local_ip_of(advertised: &str) -> Option<IpAddr> {
    advertised
        .parse::<std::net::SocketAddr>()
        .ok()
        .map(|a| a.ip())
        .filter(|ip| !ip.is_unspecified())
}

impl Peers {
    /// Peers starting from `known` addresses, called from `local_ip`.
    pub fn new(
        replicas: Arc<ReplicaDirectory>,
        known: HashMap<NodeId, String>,
        local_ip: Option<IpAddr>,
    ) -> Peers {
        Peers {
            replicas,
            known_nodes: RwLock::new(known),
            meta_leader: RwLock::new(None),
            admin_channels: Mutex::new(HashMap::new()),
            local_ip,
        }
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

    /// The meta-range leader as this node knows it.
    pub fn meta_leader_hint(&self) -> Option<NodeInfo> {
        if let Some(r) = meta_replica(&self.replicas) {
            if let Some(n) = leader_node(&r) {
                return Some(n);
            }
        }
        let id = (*self.meta_leader.read().unwrap_or_else(|p| p.into_inner()))?;
        let addr = self.known_nodes().get(&id)?.clone();
        Some(NodeInfo { node_id: id, addr })
    }

    /// An admin stub for the node at `addr`.
    pub fn admin(&self, addr: &str) -> Result<AdminClient<Channel>, ClientError> {
        Ok(AdminClient::new(self.channel(addr)?)
            .max_decoding_message_size(limits::MAX_GRPC_MESSAGE_SIZE_BYTES)
            .max_encoding_message_size(limits::MAX_GRPC_MESSAGE_SIZE_BYTES))
    }

    /// The channel to the node at `addr` (connected on first use, then shared).
    pub fn channel(&self, addr: &str) -> Result<Channel, ClientError> {
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
                    .local_address(self.local_ip)
                    .connect_lazy();
                channels.insert(addr.to_string(), c.clone());
                c
            }
        };
        Ok(channel)
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_leave_from_the_advertised_ip_unless_it_is_a_wildcard() {
        assert_eq!(
            local_ip_of("127.0.0.3:7000"),
            Some("127.0.0.3".parse().unwrap())
        );
        assert_eq!(local_ip_of("0.0.0.0:7000"), None);
        assert_eq!(local_ip_of("[::]:7000"), None);
        assert_eq!(local_ip_of("node-3:7000"), None);
    }
}
