//! The admin gRPC service: status, join, range list.

use openraft::async_runtime::WatchReceiver;
use std::sync::Arc;
use std::time::Duration;

use openraft::{Instant as _, ServerState};
use rocksdb::{Direction, IteratorMode, ReadOptions};
use spheredb_client::proto::v1::admin_server::Admin;
use spheredb_client::proto::v1::{
    JoinRequest, JoinResponse, NodeInfo, RangeListRequest, RangeListResponse, RangeStatus,
    ReplicaProgress, StatusRequest, StatusResponse,
};
use spheredb_client::ClientError;
use spheredb_raft::{registry, Command, CommandResponse};
use spheredb_storage::ColumnFamilyName;
use tonic::{Request, Response, Status};

use crate::errors::write_error;
use crate::node::NodeShared;

/// Largest join token accepted.
pub const MAX_JOIN_TOKEN_SIZE_BYTES: usize = 64;
/// Longest a join waits for its registration to commit.
pub const JOIN_COMMIT_TIMEOUT_MS: u64 = 5_000;

/// The admin service of a node.
pub struct AdminService {
    node: Arc<NodeShared>,
}

impl AdminService {
    /// A service over `node`.
    pub fn new(node: Arc<NodeShared>) -> Self {
        AdminService { node }
    }

    fn nodes(&self) -> Vec<NodeInfo> {
        let metrics = self.node.raft.metrics().borrow_watched().clone();
        let mut nodes: Vec<NodeInfo> = metrics
            .membership_config
            .membership()
            .nodes()
            .map(|(id, n)| NodeInfo {
                node_id: *id,
                addr: n.addr.clone(),
            })
            .collect();
        // Registered nodes not yet in the membership (joining) are listed too.
        if let Ok(registered) = registry::nodes(&self.node.db) {
            for r in registered {
                if !nodes.iter().any(|n| n.node_id == r.node_id) {
                    nodes.push(NodeInfo {
                        node_id: r.node_id,
                        addr: r.addr,
                    });
                }
            }
        }
        nodes.sort_by_key(|n| n.node_id);
        nodes
    }

    /// Key count and crc32 over every pair of the range, in key order.
    fn digest(&self) -> Result<(u64, u32), ClientError> {
        let db = &self.node.db;
        let iter = db.raw().iterator_cf_opt(
            db.cf(ColumnFamilyName::Data),
            ReadOptions::default(),
            IteratorMode::From(&[], Direction::Forward),
        );
        let mut hasher = crc32fast::Hasher::new();
        let mut count = 0u64;
        for item in iter {
            let (k, v) = item.map_err(|e| ClientError::Internal(e.to_string()))?;
            hasher.update(&(k.len() as u32).to_le_bytes());
            hasher.update(&k);
            hasher.update(&v);
            count += 1;
        }
        Ok((count, hasher.finalize()))
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let include_digest = request.into_inner().include_digest;
        let metrics = self.node.raft.metrics().borrow_watched().clone();
        let replicas = match (metrics.state, &metrics.replication) {
            (ServerState::Leader, Some(replication)) => {
                let heartbeat = metrics.heartbeat.clone().unwrap_or_default();
                replication
                    .iter()
                    .map(|(id, matched)| ReplicaProgress {
                        node_id: *id,
                        matched_index: matched.as_ref().map(|l| l.index),
                        last_ack_ms: if *id == self.node.node_id {
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
        let (key_count, data_crc32) = if include_digest {
            let (c, crc) = self.digest().map_err(|e| e.to_status())?;
            (Some(c), Some(crc))
        } else {
            (None, None)
        };
        let range = RangeStatus {
            descriptor: Some(self.node.descriptor()),
            leader_id: metrics.current_leader,
            term: metrics.current_term,
            applied_index: metrics.last_applied.as_ref().map(|l| l.index),
            last_log_index: metrics.last_log_index,
            snapshot_index: metrics.snapshot.as_ref().map(|l| l.index),
            replicas,
            key_count,
            data_crc32,
        };
        Ok(Response::new(StatusResponse {
            node_id: self.node.node_id,
            addr: self.node.addr.clone(),
            cluster_id: self.node.cluster_id,
            nodes: self.nodes(),
            ranges: vec![range],
            uptime_ms: self.node.started.elapsed().as_millis() as u64,
            version: env!("CARGO_PKG_VERSION").to_string(),
        }))
    }

    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
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
            let write = self.node.raft.client_write(Command::RegisterNode {
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
                    other => Err(ClientError::Internal(format!(
                        "unexpected response {other:?}"
                    ))),
                },
            }
        }
        .await;
        result.map(Response::new).map_err(|e| e.to_status())
    }

    async fn range_list(
        &self,
        _request: Request<RangeListRequest>,
    ) -> Result<Response<RangeListResponse>, Status> {
        let leader_id = self.node.raft.metrics().borrow_watched().current_leader;
        Ok(Response::new(RangeListResponse {
            ranges: vec![self.node.descriptor()],
            nodes: self.nodes(),
            leader_id,
        }))
    }
}
