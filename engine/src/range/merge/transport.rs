//! The calls a merge makes to other nodes, behind [`MergeTransport`]: tonic to the range
//! leaders and nodes in a running cluster ([`TonicMergeTransport`]), or an in-process
//! simulation in the coordinator's tests. The transport carries requests and reads state;
//! it decides nothing about the merge.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use spheredb_client::proto::v1::{
    ChangeReplicasRequest, MergeStepRequest, MergeStepResponse, RangeStatus, StatusRequest,
};
use spheredb_client::ClientError;
use spheredb_raft::{MergeFreeze, NodeId, RangeId, RangeRecord};

use super::plan::LiveRange;
use crate::descriptor::record_from_wire;
use crate::errors::internal;
use crate::meta::MetaState;
use crate::peers::{Peers, PEER_CALL_TIMEOUT_MS};

/// Longest one replica move of a merge may take (a snapshot included).
const MOVE_TIMEOUT_MS: u64 = 60_000;

/// What a merge asks of other nodes.
pub trait MergeTransport: Send + Sync {
    /// The range of `record` as its leader applied it: descriptor and freeze.
    fn live_range(
        &self,
        record: &RangeRecord,
    ) -> impl Future<Output = Result<LiveRange, ClientError>> + Send;

    /// The freeze `node`'s replica of `range_id` applied; `None` when it is not frozen or the
    /// node has no replica of the range.
    fn applied_freeze(
        &self,
        node: NodeId,
        range_id: RangeId,
    ) -> impl Future<Output = Result<Option<MergeFreeze>, ClientError>> + Send;

    /// Sends a merge step to the leader of `record`'s range.
    fn merge_step(
        &self,
        record: &RangeRecord,
        req: MergeStepRequest,
    ) -> impl Future<Output = Result<MergeStepResponse, ClientError>> + Send;

    /// Sends one replica change to the leader of `record`'s range.
    fn change_replicas(
        &self,
        record: &RangeRecord,
        req: ChangeReplicasRequest,
    ) -> impl Future<Output = Result<(), ClientError>> + Send;
}

/// A merge's calls over tonic, to the nodes `peers` knows; the meta leader's `view` names
/// each range's last reported leader, tried first.
pub struct TonicMergeTransport {
    peers: Arc<Peers>,
    view: Arc<MetaState>,
}

impl TonicMergeTransport {
    pub fn new(peers: Arc<Peers>, view: Arc<MetaState>) -> Self {
        TonicMergeTransport { peers, view }
    }

    /// Addresses to try for `record`'s leader: the reported leader first, then its replicas.
    fn leader_candidates(&self, record: &RangeRecord) -> Vec<String> {
        let nodes = self.peers.known_nodes();
        let leader = self
            .view
            .loads()
            .get(&record.span.range_id)
            .and_then(|l| l.leader_node);
        leader
            .into_iter()
            .chain(record.replicas.iter().map(|r| r.node_id))
            .filter_map(|n| nodes.get(&n).cloned())
            .collect()
    }

    /// The status of `range_id` on `node`, if it has a replica.
    async fn node_range_status(
        &self,
        nodes: &HashMap<NodeId, String>,
        node: NodeId,
        range_id: RangeId,
    ) -> Result<Option<RangeStatus>, ClientError> {
        let addr = nodes
            .get(&node)
            .ok_or_else(|| ClientError::Unavailable(format!("address of node {node} not known")))?;
        let mut admin = self.peers.admin(addr)?;
        let status = tokio::time::timeout(
            Duration::from_millis(PEER_CALL_TIMEOUT_MS),
            admin.status(StatusRequest {
                include_digest: false,
            }),
        )
        .await
        .map_err(|_| ClientError::Unavailable(format!("node {node} did not answer")))?
        .map_err(|s| ClientError::from_status(&s))?
        .into_inner();
        Ok(status.ranges.into_iter().find(|s| {
            s.descriptor
                .as_ref()
                .is_some_and(|d| d.range_id == range_id)
        }))
    }
}

/// The freeze a range status reports.
fn status_freeze(s: &RangeStatus) -> Option<MergeFreeze> {
    s.frozen_into.map(|into| MergeFreeze {
        into,
        left_generation: s.frozen_left_generation,
    })
}

impl MergeTransport for TonicMergeTransport {
    async fn live_range(&self, record: &RangeRecord) -> Result<LiveRange, ClientError> {
        let nodes = self.peers.known_nodes();
        let mut last = ClientError::Unavailable(format!(
            "no leader of range {} answered",
            record.span.range_id
        ));
        for addr in self.leader_candidates(record) {
            let node = nodes.iter().find(|(_, a)| **a == addr).map(|(n, _)| *n);
            let Some(node) = node else { continue };
            match self
                .node_range_status(&nodes, node, record.span.range_id)
                .await
            {
                Ok(Some(s)) if s.role == "leader" => {
                    let frozen = status_freeze(&s);
                    let d = s
                        .descriptor
                        .ok_or_else(|| internal("range status without a descriptor"))?;
                    return Ok(LiveRange {
                        record: record_from_wire(&d, record.span.next_replica_id),
                        frozen,
                    });
                }
                Ok(_) => {}
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn applied_freeze(
        &self,
        node: NodeId,
        range_id: RangeId,
    ) -> Result<Option<MergeFreeze>, ClientError> {
        let nodes = self.peers.known_nodes();
        let status = self.node_range_status(&nodes, node, range_id).await?;
        Ok(status.as_ref().and_then(status_freeze))
    }

    async fn merge_step(
        &self,
        record: &RangeRecord,
        req: MergeStepRequest,
    ) -> Result<MergeStepResponse, ClientError> {
        self.peers
            .call_leader(
                self.leader_candidates(record),
                PEER_CALL_TIMEOUT_MS * 3,
                |_| {},
                |mut admin| {
                    let req = req.clone();
                    async move { admin.merge_step(req).await }
                },
            )
            .await
    }

    async fn change_replicas(
        &self,
        record: &RangeRecord,
        req: ChangeReplicasRequest,
    ) -> Result<(), ClientError> {
        self.peers
            .call_leader(
                self.leader_candidates(record),
                MOVE_TIMEOUT_MS,
                |_| {},
                |mut admin| async move { admin.change_replicas(req).await },
            )
            .await?;
        Ok(())
    }
}
