//! Range descriptors between their stored form ([`RangeRecord`]) and the wire
//! ([`RangeDescriptor`]). Pure conversions: this module reads no state and calls nobody.

use spheredb_client::proto::v1::{RangeDescriptor, Replica as WireReplica};
use spheredb_raft::{RangeRecord, RangeSpan, ReplicaId, ReplicaRecord};

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

/// A descriptor from the wire. The wire form does not carry the next replica id, so the
/// caller supplies it.
pub fn record_from_wire(d: &RangeDescriptor, next_replica_id: ReplicaId) -> RangeRecord {
    RangeRecord {
        span: RangeSpan {
            range_id: d.range_id,
            start_key: d.start_key.clone(),
            end_key: d.end_key.clone(),
            generation: d.generation,
            next_replica_id,
        },
        replicas: d
            .replicas
            .iter()
            .map(|r| ReplicaRecord {
                replica_id: r.replica_id,
                node_id: r.node_id,
                voter: r.voter,
            })
            .collect(),
    }
}

/// A descriptor of range `id` over `[start, end)` at `generation` with one voter on each of
/// `nodes` (replica ids 1, 2, ... in order), for tests.
#[cfg(test)]
pub(crate) fn test_record(
    id: spheredb_raft::RangeId,
    start: &[u8],
    end: &[u8],
    generation: u64,
    nodes: &[spheredb_raft::NodeId],
) -> RangeRecord {
    RangeRecord {
        span: spheredb_raft::RangeSpan {
            range_id: id,
            start_key: start.to_vec(),
            end_key: end.to_vec(),
            generation,
            next_replica_id: nodes.len() as u64 + 1,
        },
        replicas: nodes
            .iter()
            .enumerate()
            .map(|(i, n)| spheredb_raft::ReplicaRecord {
                replica_id: i as u64 + 1,
                node_id: *n,
                voter: true,
            })
            .collect(),
    }
}
