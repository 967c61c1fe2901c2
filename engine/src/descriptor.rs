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
