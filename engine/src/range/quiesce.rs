//! Quiescence: a range with no traffic stops ticking on all its replicas, so it sends no
//! heartbeats and runs no election timers, and a node can hold thousands of idle ranges.
//!
//! The leader of a range idle for `quiesce_after_ms`, with every replica caught up, asks each
//! follower to quiesce; a follower agrees only if it has the leader's vote and last log
//! index. Once all agree the leader stops ticking too. Any request or Raft message wakes a
//! replica (`Replica::touch`); a woken leader's next heartbeat wakes its followers. If the
//! leader's node stops reporting to the meta range, the followers are woken so they elect.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use spheredb_raft::network::{PeerChannels, Replica, ReplicaDirectory};
use tokio::sync::watch;

use crate::ids::META_RANGE_ID;

/// Period of the quiescence check.
pub const QUIESCE_CHECK_INTERVAL_MS: u64 = 500;
/// Time allowed for a follower to answer a quiesce request.
pub const QUIESCE_REQUEST_TIMEOUT_MS: u64 = 1_000;
/// A range is not quiesced this long after a leadership transfer was asked of it: openraft's
/// transferring leader stops heartbeating but still reports itself leader, and quiescing
/// the followers then would leave nobody to elect a new one if the transfer fails.
pub const NO_QUIESCE_AFTER_TRANSFER_MS: u64 = 10_000;

/// True when `replica` leads a settled range: one committed, non-joint membership and every
/// replica holding the whole log, applied.
fn settled(replica: &Replica) -> bool {
    let m = replica.raft.metrics().borrow_watched().clone();
    let last = m.last_log_index;
    let uniform = m.membership_config.membership().get_joint_config().len() == 1;
    let committed = m.membership_config.log_id() == m.committed_membership_config.log_id();
    let applied = m.last_applied.as_ref().map(|l| l.index) == last;
    let replicated = m.replication.as_ref().is_some_and(|r| {
        r.values()
            .all(|matched| matched.as_ref().map(|l| l.index) == last)
    });
    uniform && committed && applied && replicated
}

/// Quiesces ranges this node leads once idle for `after_ms` (0: never), asking followers
/// through the Raft transport's `peers`.
pub async fn quiesce_loop(
    replicas: Arc<ReplicaDirectory>,
    peers: PeerChannels,
    after_ms: u64,
    mut stop: watch::Receiver<bool>,
) {
    if after_ms == 0 {
        return;
    }
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(Duration::from_millis(QUIESCE_CHECK_INTERVAL_MS)) => {}
        }
        for replica in replicas.all() {
            if replica.shared.range_id == META_RANGE_ID
                || replica.quiesced.load(Ordering::Acquire)
                || replica.idle_ms() < after_ms
                || replica
                    .since_transfer_ms()
                    .is_some_and(|ms| ms < NO_QUIESCE_AFTER_TRANSFER_MS)
                || !replica.raft.is_leader()
            {
                continue;
            }
            if !settled(&replica) {
                tracing::debug!(
                    range_id = replica.shared.range_id,
                    "idle but not settled; not quiescing"
                );
                continue;
            }
            if quiesce_followers(&peers, &replica).await {
                replica.quiesce();
            }
        }
    }
}

/// Asks every other replica of the range to quiesce; true when all agreed.
async fn quiesce_followers(peers: &PeerChannels, replica: &Replica) -> bool {
    let m = replica.raft.metrics().borrow_watched().clone();
    let me = m.id;
    let timeout = Duration::from_millis(QUIESCE_REQUEST_TIMEOUT_MS);
    for (id, node) in m.membership_config.membership().nodes() {
        if *id == me {
            continue;
        }
        let asked = replica
            .ask_quiesce(peers, replica.shared.range_id, *id, node, timeout)
            .await;
        if let Err(e) = asked {
            tracing::debug!(
                range_id = replica.shared.range_id,
                replica_id = id,
                "follower did not quiesce: {e}"
            );
            return false;
        }
    }
    true
}
