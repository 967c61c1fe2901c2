//! What this node's replica of a range tells about the range: its descriptor as applied and
//! the nodes of its members. Read-only views over a [`Replica`]; starting, stopping and
//! destroying replicas belongs to the `node` room, which this module must not import.

use std::sync::Arc;

use openraft::async_runtime::WatchReceiver;
use spheredb_client::proto::v1::{NodeInfo, RangeDescriptor};
use spheredb_raft::network::{Replica, ReplicaDirectory};
use spheredb_raft::ReplicaId;

use crate::descriptor::wire_descriptor;
use crate::ids::META_RANGE_ID;

/// The descriptor of a local replica on the wire, as it has applied it.
pub fn descriptor(replica: &Replica) -> Option<RangeDescriptor> {
    replica.shared.record().map(|r| wire_descriptor(&r))
}

/// The node hosting replica `replica_id` of a local range, from its membership.
pub fn member_node(replica: &Replica, replica_id: ReplicaId) -> Option<NodeInfo> {
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
pub fn leader_node(replica: &Replica) -> Option<NodeInfo> {
    let leader = replica.raft.metrics().borrow_watched().current_leader?;
    member_node(replica, leader)
}

/// The local replica of the meta range.
pub fn meta_replica(replicas: &ReplicaDirectory) -> Option<Arc<Replica>> {
    replicas.get(META_RANGE_ID)
}

/// The local replica of the meta range when it leads the range: the meta-range leader's
/// bookkeeping, allocator and merges run only there.
pub fn leading_meta(replicas: &ReplicaDirectory) -> Option<Arc<Replica>> {
    meta_replica(replicas).filter(|r| r.raft.is_leader())
}
