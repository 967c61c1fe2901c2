//! This node's side of the heartbeat: every period it reports its replicas to the meta-range
//! leader and acts on the answer (destroys replicas removed from their range, stops merged
//! ones, wakes quiesced ranges whose leader went silent). What the meta leader decides from
//! a report lives in `crate::meta`; this module only carries it out on local replicas.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use prost::Message;
use spheredb_client::limits::MAX_HEARTBEAT_DESCRIPTOR_BYTES;
use spheredb_client::proto::v1::{NodeHeartbeatRequest, ReplicaReport};
use spheredb_raft::network::ReplicaDirectory;
use spheredb_raft::{NodeId, RangeId};
use tokio::sync::watch;

use crate::ids::META_RANGE_ID;
use crate::node::LocalReplicas;
use crate::peers::Peers;
use crate::replica::{descriptor, leader_node, leading_meta};

/// What the heartbeat loop works with.
pub struct Heartbeat {
    pub node_id: NodeId,
    pub addr: String,
    pub interval_ms: u64,
    pub replicas: Arc<ReplicaDirectory>,
    pub lifecycle: Arc<LocalReplicas>,
    pub peers: Arc<Peers>,
}

/// This node's report of its replicas.
/// Loads are the operations counted since the last report, over `counted`.
fn build_report(hb: &Heartbeat, counted: Duration) -> NodeHeartbeatRequest {
    let mut replicas = Vec::new();
    for r in hb.replicas.all() {
        let ops = r.ops.swap(0, std::sync::atomic::Ordering::Relaxed);
        r.set_qps(ops as f64 / counted.as_secs_f64().max(0.001));
        let metrics = r.raft.metrics().borrow_watched().clone();
        let leader = r.raft.is_leader();
        let descriptor = descriptor(&r);
        let generation = descriptor.as_ref().map_or(0, |d| d.generation);
        replicas.push(ReplicaReport {
            range_id: r.shared.range_id,
            replica_id: metrics.id,
            descriptor,
            generation,
            leader,
            size_bytes: if leader {
                r.size_bytes.load(std::sync::atomic::Ordering::Relaxed)
            } else {
                0
            },
            qps: if leader { r.qps() } else { 0.0 },
            frozen_into: r.shared.frozen().map(|f| f.into),
            quarantined: r.shared.quarantined().is_some(),
        });
    }
    NodeHeartbeatRequest {
        node_id: hb.node_id,
        addr: hb.addr.clone(),
        replicas,
    }
}

/// Which descriptors a report carries. A descriptor changes only with its generation, so
/// one the meta leader acknowledged at the current generation is left out; the leader asks
/// for any it lacks (`want_descriptors`). At most [`MAX_HEARTBEAT_DESCRIPTOR_BYTES`] of
/// descriptors go in one report, so a node with many ranges (a restart, a new meta leader)
/// sends them over several heartbeats instead of one message too large to decode.
#[derive(Debug, Default)]
struct DescriptorDeltas {
    /// Generation of each range's descriptor in the last acknowledged report.
    acked: HashMap<RangeId, u64>,
    /// Descriptors the meta leader asked for.
    wanted: HashSet<RangeId>,
}

impl DescriptorDeltas {
    /// Strips the descriptors `report` need not carry; returns the `(range, generation)`
    /// pairs it still carries.
    fn select(&self, report: &mut NodeHeartbeatRequest) -> Vec<(RangeId, u64)> {
        let mut carried = Vec::new();
        let mut budget_bytes = MAX_HEARTBEAT_DESCRIPTOR_BYTES;
        for r in &mut report.replicas {
            let Some(d) = &r.descriptor else {
                continue;
            };
            let needed = self.wanted.contains(&r.range_id)
                || self.acked.get(&r.range_id) != Some(&r.generation);
            let size = d.encoded_len();
            if needed && size <= budget_bytes {
                budget_bytes -= size;
                carried.push((r.range_id, r.generation));
            } else {
                r.descriptor = None;
            }
        }
        carried
    }

    /// The report carrying `carried` was answered, asking for `want` next.
    fn acknowledged(&mut self, carried: Vec<(RangeId, u64)>, want: &[RangeId], local: &[RangeId]) {
        self.acked.extend(carried);
        let local: HashSet<&RangeId> = local.iter().collect();
        self.acked.retain(|range, _| local.contains(range));
        self.wanted = want.iter().copied().collect();
    }
}

/// Reports to the meta-range leader every heartbeat period and acts on its answer.
pub async fn heartbeat_loop(hb: Heartbeat, mut stop: watch::Receiver<bool>) {
    let interval = Duration::from_millis(hb.interval_ms);
    let mut deltas = DescriptorDeltas::default();
    // Loads are counted over the time since the last report, not the nominal period: the
    // report and its answer take time too, most of all on a busy node.
    let mut last_report = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let counted = last_report.elapsed();
        last_report = std::time::Instant::now();
        let mut report = build_report(&hb, counted);
        report.replicas.extend(hb.lifecycle.dormant_reports());
        let carried = deltas.select(&mut report);
        let local: Vec<RangeId> = report.replicas.iter().map(|r| r.range_id).collect();
        let resp = hb
            .peers
            .call_meta(|mut admin| {
                let report = report.clone();
                async move { admin.node_heartbeat(report).await }
            })
            .await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("heartbeat to the meta range failed: {e}");
                continue;
            }
        };
        deltas.acknowledged(carried, &resp.want_descriptors, &local);
        hb.peers
            .learn_nodes(resp.nodes.iter().map(|n| (n.node_id, n.addr.clone())));
        for removed in resp.destroy_replicas {
            let range_id = removed.range_id;
            if range_id == META_RANGE_ID && leading_meta(&hb.replicas).is_some() {
                continue;
            }
            // Off this loop: a destroy waits for the range's lifecycle lock (and so for a
            // snapshot install in progress), and heartbeats must go on meanwhile. A destroy
            // asked for again while one runs finds nothing left to do.
            let lifecycle = hb.lifecycle.clone();
            tokio::spawn(async move {
                let destroyed = lifecycle
                    .destroy_removed_replica(range_id, removed.replica_id)
                    .await;
                if let Err(e) = destroyed {
                    tracing::warn!(range_id, "destroying removed replica: {e:#}");
                }
            });
        }
        if let Err(e) = hb.lifecycle.stop_merged_replicas().await {
            tracing::warn!("stopping merged replicas: {e:#}");
        }
        if !resp.unreachable_nodes.is_empty() {
            wake_ranges_led_by(&hb.replicas, &resp.unreachable_nodes);
        }
    }
}

/// Wakes quiesced ranges whose leader is on one of `nodes`, so they elect a new one.
fn wake_ranges_led_by(replicas: &ReplicaDirectory, nodes: &[NodeId]) {
    for r in replicas.all() {
        if !r.quiesced.load(std::sync::atomic::Ordering::Acquire) {
            continue;
        }
        if r.raft.is_leader() {
            continue;
        }
        let leader_node = leader_node(&r).map(|n| n.node_id);
        if leader_node.is_none_or(|n| nodes.contains(&n)) {
            tracing::info!(
                range_id = r.shared.range_id,
                ?leader_node,
                "waking range: its leader is unreachable"
            );
            r.touch();
        }
    }
}

#[cfg(test)]
mod tests {
    use spheredb_client::proto::v1::RangeDescriptor;

    use super::*;

    fn report(ranges: &[(RangeId, u64)], key_bytes: usize) -> NodeHeartbeatRequest {
        NodeHeartbeatRequest {
            node_id: 1,
            addr: "127.0.0.1:1".into(),
            replicas: ranges
                .iter()
                .map(|(range_id, generation)| ReplicaReport {
                    range_id: *range_id,
                    replica_id: 1,
                    descriptor: Some(RangeDescriptor {
                        range_id: *range_id,
                        generation: *generation,
                        start_key: vec![1; key_bytes],
                        end_key: vec![2; key_bytes],
                        ..Default::default()
                    }),
                    generation: *generation,
                    ..Default::default()
                })
                .collect(),
        }
    }

    fn carried_ids(report: &NodeHeartbeatRequest) -> Vec<RangeId> {
        report
            .replicas
            .iter()
            .filter(|r| r.descriptor.is_some())
            .map(|r| r.range_id)
            .collect()
    }

    #[test]
    fn a_descriptor_is_sent_until_acknowledged_at_its_generation_and_again_when_asked() {
        let mut deltas = DescriptorDeltas::default();
        let ranges = [(2, 1), (3, 4)];
        let mut first = report(&ranges, 8);
        let carried = deltas.select(&mut first);
        assert_eq!(carried_ids(&first), vec![2, 3]);
        // Unanswered (the call failed): the next report carries them again.
        let mut again = report(&ranges, 8);
        deltas.select(&mut again);
        assert_eq!(carried_ids(&again), vec![2, 3]);
        deltas.acknowledged(carried, &[], &[2, 3]);
        let mut steady = report(&ranges, 8);
        deltas.select(&mut steady);
        assert!(carried_ids(&steady).is_empty());
        // A new generation, and a descriptor the leader asks for, go out again.
        deltas.acknowledged(Vec::new(), &[2], &[2, 3]);
        let mut changed = report(&[(2, 1), (3, 5)], 8);
        deltas.select(&mut changed);
        assert_eq!(carried_ids(&changed), vec![2, 3]);
        // Every replica is still reported, with its generation.
        assert_eq!(changed.replicas.len(), 2);
        assert_eq!(changed.replicas[1].generation, 5);
    }

    #[test]
    fn descriptors_past_the_byte_budget_wait_for_the_next_report() {
        let mut deltas = DescriptorDeltas::default();
        // 4 KiB keys: about 8 KiB per descriptor, so 1,000 ranges need several reports.
        let ranges: Vec<(RangeId, u64)> = (1..=1_000).map(|id| (id, 1)).collect();
        let local: Vec<RangeId> = ranges.iter().map(|r| r.0).collect();
        let mut reports = 0;
        loop {
            let mut r = report(&ranges, 4 << 10);
            let carried = deltas.select(&mut r);
            let bytes: usize = r
                .replicas
                .iter()
                .filter_map(|x| x.descriptor.as_ref())
                .map(|d| d.encoded_len())
                .sum();
            assert!(bytes <= MAX_HEARTBEAT_DESCRIPTOR_BYTES);
            assert!(r.encoded_len() < 2 * MAX_HEARTBEAT_DESCRIPTOR_BYTES);
            if carried.is_empty() {
                break;
            }
            deltas.acknowledged(carried, &[], &local);
            reports += 1;
        }
        assert!(reports >= 8, "{reports} reports");
        assert_eq!(deltas.acked.len(), 1_000);
    }
}
