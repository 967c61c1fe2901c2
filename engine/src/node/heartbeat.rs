//! This node's side of the heartbeat: every period it reports its replicas to the meta-range
//! leader and acts on the answer (destroys replicas removed from their range, stops merged
//! ones, wakes quiesced ranges whose leader went silent). What the meta leader decides from
//! a report lives in `crate::meta`; this module only carries it out on local replicas.

use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use spheredb_client::proto::v1::{NodeHeartbeatRequest, ReplicaReport};
use spheredb_raft::network::ReplicaDirectory;
use spheredb_raft::NodeId;
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
fn build_report(hb: &Heartbeat, interval: Duration) -> NodeHeartbeatRequest {
    let mut replicas = Vec::new();
    for r in hb.replicas.all() {
        let ops = r.ops.swap(0, std::sync::atomic::Ordering::Relaxed);
        r.set_qps(ops as f64 / interval.as_secs_f64().max(0.001));
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
        });
    }
    NodeHeartbeatRequest {
        node_id: hb.node_id,
        addr: hb.addr.clone(),
        replicas,
    }
}

/// Reports to the meta-range leader every heartbeat period and acts on its answer.
pub async fn heartbeat_loop(hb: Heartbeat, mut stop: watch::Receiver<bool>) {
    let interval = Duration::from_millis(hb.interval_ms);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let report = build_report(&hb, interval);
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
        hb.peers
            .learn_nodes(resp.nodes.iter().map(|n| (n.node_id, n.addr.clone())));
        for range_id in resp.destroy_ranges {
            if range_id == META_RANGE_ID && leading_meta(&hb.replicas).is_some() {
                continue;
            }
            if let Err(e) = hb.lifecycle.destroy_replica(range_id, false).await {
                tracing::warn!(range_id, "destroying removed replica: {e:#}");
            }
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
