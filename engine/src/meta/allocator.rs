//! The allocator, run by the meta-range leader: keeps every range at its replication factor
//! on live nodes, drains decommissioning and dead nodes, and spreads replicas and leaders.
//!
//! [`plan`] is a pure function from a cluster view to actions; the loop around it executes
//! them against range leaders (`Admin.ChangeReplicas`, `Admin.TransferLeader`), at most one
//! action per range at a time and [`MAX_CONCURRENT_ACTIONS`] in all. A replica moves as
//! add (learner, then voter) → remove, each its own membership change, so a range never
//! drops below its replication factor during a move.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use spheredb_client::proto::v1::{ChangeReplicasRequest, TransferLeaderRequest};
use spheredb_client::ClientError;
use spheredb_raft::network::ReplicaDirectory;
use spheredb_raft::registry::{self, LivenessRecord, NodeRecord, NodeState};
use spheredb_raft::{NodeId, RangeId, RangeRecord, WriteOp};
use spheredb_storage::Db;
use tokio::sync::watch;

use crate::errors::internal;
use crate::ids::META_RANGE_ID;
use crate::meta::{write_liveness, write_meta, MetaState};
use crate::peers::Peers;
use crate::replica::leading_meta;

/// Most allocator actions in flight at once.
pub const MAX_CONCURRENT_ACTIONS: usize = 8;
/// Most rebalancing moves (replicas or leaders) planned per round; repairs are not limited.
pub const MAX_REBALANCE_PER_ROUND: usize = 4;
/// How far above the mean a node's replica or leader count must be before the allocator
/// moves one away.
pub const REBALANCE_TOLERANCE: f64 = 0.1;
/// Longest one allocator action may take (a new replica's snapshot included).
pub const ACTION_TIMEOUT_MS: u64 = 60_000;

/// A node as the allocator sees it.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub node_id: NodeId,
    pub state: NodeState,
    /// Reported within the dead timeout.
    pub live: bool,
}

/// A range as the allocator sees it.
#[derive(Debug, Clone)]
pub struct RangeView {
    pub record: RangeRecord,
    pub leader_node: Option<NodeId>,
    /// Nodes whose replica of the range is quarantined (its data failed a checksum).
    pub quarantined: BTreeSet<NodeId>,
}

/// What the allocator asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    AddReplica {
        range_id: RangeId,
        generation: u64,
        node_id: NodeId,
    },
    RemoveReplica {
        range_id: RangeId,
        generation: u64,
        node_id: NodeId,
    },
    TransferLeader {
        range_id: RangeId,
        to_node: NodeId,
    },
}

impl Action {
    pub fn range_id(&self) -> RangeId {
        match self {
            Action::AddReplica { range_id, .. }
            | Action::RemoveReplica { range_id, .. }
            | Action::TransferLeader { range_id, .. } => *range_id,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Action::AddReplica { .. } => "replicas_added",
            Action::RemoveReplica { .. } => "replicas_removed",
            Action::TransferLeader { .. } => "leader_transfers",
        }
    }
}

/// Plans actions for `ranges` on `nodes`, skipping ranges in `busy`.
pub fn plan(
    nodes: &[NodeView],
    ranges: &[RangeView],
    replication_factor: usize,
    busy: &std::collections::HashSet<RangeId>,
) -> Vec<Action> {
    let usable = |id: NodeId| {
        nodes
            .iter()
            .any(|n| n.node_id == id && n.live && n.state == NodeState::Active)
    };
    let usable_count = nodes
        .iter()
        .filter(|n| n.live && n.state == NodeState::Active)
        .count();
    let want = replication_factor.min(usable_count).max(1);
    // Replica and leader counts per usable node, updated as actions are planned.
    let mut replica_count: BTreeMap<NodeId, usize> = nodes
        .iter()
        .filter(|n| usable(n.node_id))
        .map(|n| (n.node_id, 0))
        .collect();
    let mut leader_count = replica_count.clone();
    for r in ranges {
        for rep in &r.record.replicas {
            if let Some(c) = replica_count.get_mut(&rep.node_id) {
                *c += 1;
            }
        }
        if let Some(c) = r.leader_node.and_then(|l| leader_count.get_mut(&l)) {
            *c += 1;
        }
    }
    let mean = |counts: &BTreeMap<NodeId, usize>| {
        counts.values().sum::<usize>() as f64 / counts.len().max(1) as f64
    };
    let (mean_replicas, mean_leaders) = (mean(&replica_count), mean(&leader_count));
    let mut actions = Vec::new();
    let mut rebalances = 0usize;
    for r in ranges {
        let range_id = r.record.span.range_id;
        let Some(leader) = r.leader_node else {
            continue;
        };
        if busy.contains(&range_id) {
            continue;
        }
        let generation = r.record.span.generation;
        let voters: Vec<NodeId> = r
            .record
            .replicas
            .iter()
            .filter(|x| x.voter)
            .map(|x| x.node_id)
            .collect();
        let learners: Vec<NodeId> = r
            .record
            .replicas
            .iter()
            .filter(|x| !x.voter)
            .map(|x| x.node_id)
            .collect();
        // A quarantined replica counts as lost, like one on a dead node.
        let sound = |n: NodeId| usable(n) && !r.quarantined.contains(&n);
        let good: Vec<NodeId> = voters.iter().copied().filter(|n| sound(*n)).collect();
        let has = |n: NodeId| r.record.replicas.iter().any(|x| x.node_id == n);
        // The usable node without a replica of the range that holds the fewest replicas.
        let target = replica_count
            .iter()
            .filter(|(n, _)| !has(**n))
            .min_by_key(|(n, c)| (**c, **n))
            .map(|(n, c)| (*n, *c));

        // A learner left behind by an interrupted move: finish or undo it.
        if let Some(&l) = learners.first() {
            let action = if sound(l) && good.len() < want {
                Action::AddReplica {
                    range_id,
                    generation,
                    node_id: l,
                }
            } else {
                Action::RemoveReplica {
                    range_id,
                    generation,
                    node_id: l,
                }
            };
            actions.push(action);
            continue;
        }
        if good.len() < want {
            if let Some((node_id, _)) = target {
                *replica_count.entry(node_id).or_default() += 1;
                actions.push(Action::AddReplica {
                    range_id,
                    generation,
                    node_id,
                });
            } else if let Some(&q) = voters.iter().find(|n| r.quarantined.contains(n)) {
                // No node is free to take a new replica first (three nodes, three
                // replicas): remove the quarantined one, so that a fresh replica can come
                // back on its node. Never the last sound copy's peers: at least one sound
                // voter must remain.
                if !good.is_empty() && q != leader {
                    actions.push(Action::RemoveReplica {
                        range_id,
                        generation,
                        node_id: q,
                    });
                }
            }
            continue;
        }
        // Too many voters, or voters on dead or draining nodes: remove one, preferring an
        // unusable node, then the node with the most replicas.
        if voters.len() > want {
            let victim = voters
                .iter()
                .copied()
                .max_by_key(|n| (!sound(*n), replica_count.get(n).copied().unwrap_or(0), *n))
                .unwrap_or(leader);
            if victim == leader {
                if let Some(&to) = good
                    .iter()
                    .filter(|n| **n != leader)
                    .min_by_key(|n| leader_count.get(n).copied().unwrap_or(0))
                {
                    actions.push(Action::TransferLeader {
                        range_id,
                        to_node: to,
                    });
                }
            } else {
                if let Some(c) = replica_count.get_mut(&victim) {
                    *c = c.saturating_sub(1);
                }
                actions.push(Action::RemoveReplica {
                    range_id,
                    generation,
                    node_id: victim,
                });
            }
            continue;
        }
        if rebalances >= MAX_REBALANCE_PER_ROUND {
            continue;
        }
        // Replica balance: move one replica from the fullest node of the range to the
        // emptiest node without one, when that evens counts out by at least two.
        let fullest = voters
            .iter()
            .copied()
            .max_by_key(|n| (replica_count.get(n).copied().unwrap_or(0), *n));
        if let (Some(from), Some((to, to_count))) = (fullest, target) {
            let from_count = replica_count.get(&from).copied().unwrap_or(0);
            if worth_moving(from_count, to_count, mean_replicas) {
                *replica_count.entry(to).or_default() += 1;
                if let Some(c) = replica_count.get_mut(&from) {
                    *c = c.saturating_sub(1);
                }
                rebalances += 1;
                actions.push(Action::AddReplica {
                    range_id,
                    generation,
                    node_id: to,
                });
                continue;
            }
        }
        // Leader balance: hand leadership to the voter leading the fewest ranges when that
        // evens counts out by at least two. Not for the meta range: moving its leader resets
        // the allocator's view of the cluster for nothing.
        if range_id == META_RANGE_ID {
            continue;
        }
        let from_count = leader_count.get(&leader).copied().unwrap_or(0);
        if let Some((&to, &to_count)) = leader_count
            .iter()
            .filter(|(n, _)| good.contains(n) && **n != leader)
            .min_by_key(|(n, c)| (**c, **n))
        {
            if worth_moving(from_count, to_count, mean_leaders) {
                *leader_count.entry(to).or_default() += 1;
                if let Some(c) = leader_count.get_mut(&leader) {
                    *c = c.saturating_sub(1);
                }
                rebalances += 1;
                actions.push(Action::TransferLeader {
                    range_id,
                    to_node: to,
                });
            }
        }
    }
    actions
}

/// Whether moving one replica (or leader) from a node holding `from` to one holding `to`
/// is worth it: the counts differ by two or more and the source is above the mean by
/// [`REBALANCE_TOLERANCE`] (and the target below it), so a cluster that is nearly even
/// does not keep shuffling as new ranges appear.
fn worth_moving(from: usize, to: usize, mean: f64) -> bool {
    from >= to + 2 && from as f64 > mean * (1.0 + REBALANCE_TOLERANCE) && (to as f64) < mean
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Liveness of each registered node as the meta leader sees it now: this node is live, and
/// so is any node silent for less than `dead_after_ms` (`silence_ms` of a node). Returns the
/// allocator's view of the nodes and the liveness records that must change, those whose
/// stored record (`recorded`; a node without one counts as live) says otherwise.
pub fn node_liveness(
    nodes: &[NodeRecord],
    recorded: &HashMap<NodeId, LivenessRecord>,
    this_node: NodeId,
    silence_ms: &dyn Fn(NodeId) -> u64,
    dead_after_ms: u64,
    now_unix_ms: u64,
) -> (Vec<NodeView>, Vec<LivenessRecord>) {
    let mut views = Vec::new();
    let mut changes = Vec::new();
    for n in nodes {
        let live = n.node_id == this_node || silence_ms(n.node_id) < dead_after_ms;
        let was_live = recorded.get(&n.node_id).is_none_or(|l| l.live);
        if live != was_live {
            changes.push(LivenessRecord {
                node_id: n.node_id,
                live,
                since_unix_ms: now_unix_ms,
            });
        }
        views.push(NodeView {
            node_id: n.node_id,
            state: n.state,
            live,
        });
    }
    (views, changes)
}

/// What the allocator reads and calls: the meta range (through the local replicas and the
/// registry in `db`), the meta leader's view, and the range leaders it sends actions to.
pub struct Allocator {
    pub node_id: NodeId,
    pub db: Db,
    pub replicas: Arc<ReplicaDirectory>,
    pub view: Arc<MetaState>,
    pub peers: Arc<Peers>,
    pub replication_factor: usize,
    pub dead_node_timeout_ms: u64,
    pub interval_ms: u64,
}

/// Runs the allocator every heartbeat period while this node leads the meta range.
pub async fn allocator_loop(alloc: Arc<Allocator>, mut stop: watch::Receiver<bool>) {
    let interval = Duration::from_millis(alloc.interval_ms);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(interval) => {}
        }
        if let Err(e) = allocate_once(&alloc).await {
            tracing::debug!("allocator round: {e}");
        }
    }
}

async fn allocate_once(alloc: &Arc<Allocator>) -> Result<(), ClientError> {
    let Some(meta) = leading_meta(&alloc.replicas) else {
        return Ok(());
    };
    let records = registry::ranges(&alloc.db).map_err(internal)?;
    let node_records = registry::nodes(&alloc.db).map_err(internal)?;
    let liveness: HashMap<NodeId, LivenessRecord> = registry::liveness(&alloc.db)
        .map_err(internal)?
        .into_iter()
        .map(|l| (l.node_id, l))
        .collect();
    let (nodes, changes) = node_liveness(
        &node_records,
        &liveness,
        alloc.node_id,
        &|n| alloc.view.silence_ms(n),
        alloc.dead_node_timeout_ms,
        unix_ms(),
    );
    for change in changes {
        tracing::info!(
            node_id = change.node_id,
            live = change.live,
            "node liveness changed"
        );
        write_liveness(&meta.raft, change).await?;
    }
    finish_decommissions(alloc.node_id, &meta.raft, &node_records, &records).await?;
    let loads = alloc.view.loads();
    let mut quarantined = alloc.view.quarantined();
    let ranges: Vec<RangeView> = records
        .into_iter()
        .map(|record| {
            let range_id = record.span.range_id;
            let leader_node = loads.get(&range_id).and_then(|l| l.leader_node);
            // Only the replica that reported itself quarantined: a fresh replica added back
            // on the same node (a new replica id) is sound.
            let quarantined = quarantined
                .remove(&range_id)
                .unwrap_or_default()
                .into_iter()
                .filter(|(node, replica)| {
                    record
                        .replica_on(*node)
                        .is_some_and(|r| r.replica_id == *replica)
                })
                .map(|(node, _)| node)
                .collect();
            RangeView {
                record,
                leader_node,
                quarantined,
            }
        })
        .collect();
    let busy = alloc.view.busy();
    let free_slots = MAX_CONCURRENT_ACTIONS.saturating_sub(busy.len());
    let actions = plan(&nodes, &ranges, alloc.replication_factor, &busy);
    for action in actions.into_iter().take(free_slots) {
        let Some(leader) = ranges
            .iter()
            .find(|r| r.record.span.range_id == action.range_id())
            .and_then(|r| r.leader_node)
        else {
            continue;
        };
        let Some(addr) = alloc.peers.known_nodes().get(&leader).cloned() else {
            continue;
        };
        // A merge may have claimed the range since `busy` was read: claim it or skip it.
        if !alloc.view.claim(&[action.range_id()]) {
            continue;
        }
        let alloc = alloc.clone();
        tokio::spawn(async move {
            let result = tokio::time::timeout(
                Duration::from_millis(ACTION_TIMEOUT_MS),
                execute(&alloc.peers, &addr, &action),
            )
            .await;
            match result {
                Ok(Ok(())) => {
                    tracing::info!(?action, "allocator action done");
                    alloc.view.count(action.kind());
                }
                Ok(Err(e)) => tracing::info!(?action, "allocator action failed: {e}"),
                Err(_) => tracing::warn!(?action, "allocator action timed out"),
            }
            alloc.view.release(&[action.range_id()]);
        });
    }
    Ok(())
}

/// Marks draining nodes that hold no replica any more as decommissioned.
async fn finish_decommissions(
    this_node: NodeId,
    meta: &spheredb_raft::RaftHandle,
    nodes: &[NodeRecord],
    records: &[RangeRecord],
) -> Result<(), ClientError> {
    for n in nodes
        .iter()
        .filter(|n| n.state == NodeState::Decommissioning)
    {
        if records.iter().any(|r| r.replica_on(n.node_id).is_some()) {
            continue;
        }
        let done = NodeRecord {
            state: NodeState::Decommissioned,
            ..n.clone()
        };
        let value = registry::encode(&done).map_err(internal)?;
        write_meta(
            meta,
            vec![WriteOp {
                key: registry::node_key(n.node_id),
                value: Some(value),
            }],
        )
        .await?;
        tracing::info!(node_id = n.node_id, by = this_node, "node decommissioned");
    }
    Ok(())
}

async fn execute(peers: &Peers, leader_addr: &str, action: &Action) -> Result<(), ClientError> {
    let mut admin = peers.admin(leader_addr)?;
    let result = match action {
        Action::AddReplica {
            range_id,
            generation,
            node_id,
        } => admin
            .change_replicas(ChangeReplicasRequest {
                range_id: *range_id,
                add_node_id: Some(*node_id),
                remove_node_id: None,
                expected_generation: *generation,
            })
            .await
            .map(|_| ()),
        Action::RemoveReplica {
            range_id,
            generation,
            node_id,
        } => admin
            .change_replicas(ChangeReplicasRequest {
                range_id: *range_id,
                add_node_id: None,
                remove_node_id: Some(*node_id),
                expected_generation: *generation,
            })
            .await
            .map(|_| ()),
        Action::TransferLeader { range_id, to_node } => admin
            .transfer_leader(TransferLeaderRequest {
                range_id: *range_id,
                to_node_id: *to_node,
            })
            .await
            .map(|_| ()),
    };
    result.map_err(|s| ClientError::from_status(&s))
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::collections::HashSet;

    fn node(id: NodeId) -> NodeView {
        NodeView {
            node_id: id,
            state: NodeState::Active,
            live: true,
        }
    }

    fn range(id: RangeId, on: &[NodeId], leader: NodeId) -> RangeView {
        RangeView {
            record: crate::descriptor::test_record(id, &[id as u8], &[id as u8 + 1], 1, on),
            leader_node: Some(leader),
            quarantined: BTreeSet::new(),
        }
    }

    #[test]
    fn a_quarantined_replica_is_replaced_on_a_free_node_else_removed_to_come_back_fresh() {
        let with_quarantined = |on: &[NodeId], q: NodeId| {
            let mut r = range(2, on, 1);
            r.quarantined.insert(q);
            r
        };
        let none = HashSet::new();
        let add = |node_id| Action::AddReplica {
            range_id: 2,
            generation: 1,
            node_id,
        };
        let remove = |node_id| Action::RemoveReplica {
            range_id: 2,
            generation: 1,
            node_id,
        };
        // A free node: a new replica there first, then the quarantined one goes.
        let four = [node(1), node(2), node(3), node(4)];
        assert_eq!(
            plan(&four, &[with_quarantined(&[1, 2, 3], 3)], 3, &none),
            vec![add(4)]
        );
        assert_eq!(
            plan(&four, &[with_quarantined(&[1, 2, 3, 4], 3)], 3, &none),
            vec![remove(3)]
        );
        // Three nodes, three replicas: it goes first, then a fresh replica returns to its
        // node (a new replica id; the node replaces the old replica).
        let three = [node(1), node(2), node(3)];
        assert_eq!(
            plan(&three, &[with_quarantined(&[1, 2, 3], 3)], 3, &none),
            vec![remove(3)]
        );
        assert_eq!(
            plan(&three, &[range(2, &[1, 2], 1)], 3, &none),
            vec![add(3)]
        );
        // Not while it still counts as the leader (its group stopped; a sound replica takes
        // over and reports first), and never the only copy.
        assert!(plan(&three, &[with_quarantined(&[1, 2, 3], 1)], 3, &none).is_empty());
        assert!(plan(&[node(1)], &[with_quarantined(&[1], 1)], 1, &none).is_empty());
    }

    #[test]
    fn under_replicated_ranges_gain_a_replica_on_the_emptiest_node() {
        let nodes = [node(1), node(2), node(3)];
        let ranges = [range(2, &[1], 1), range(3, &[1, 2], 1)];
        let actions = plan(&nodes, &ranges, 3, &HashSet::new());
        assert_eq!(
            actions,
            vec![
                Action::AddReplica {
                    range_id: 2,
                    generation: 1,
                    node_id: 3
                },
                Action::AddReplica {
                    range_id: 3,
                    generation: 1,
                    node_id: 3
                },
            ]
        );
    }

    #[test]
    fn a_dead_nodes_replica_is_replaced_then_removed() {
        let mut nodes = vec![node(1), node(2), node(3), node(4)];
        nodes[2].live = false;
        let before = [range(2, &[1, 2, 3], 1)];
        assert_eq!(
            plan(&nodes, &before, 3, &HashSet::new()),
            vec![Action::AddReplica {
                range_id: 2,
                generation: 1,
                node_id: 4
            }]
        );
        let after = [range(2, &[1, 2, 3, 4], 1)];
        assert_eq!(
            plan(&nodes, &after, 3, &HashSet::new()),
            vec![Action::RemoveReplica {
                range_id: 2,
                generation: 1,
                node_id: 3
            }]
        );
    }

    #[test]
    fn a_draining_leader_hands_over_before_its_replica_goes() {
        let mut nodes = vec![node(1), node(2), node(3), node(4)];
        nodes[0].state = NodeState::Decommissioning;
        let ranges = [range(2, &[1, 2, 3, 4], 1)];
        assert_eq!(
            plan(&nodes, &ranges, 3, &HashSet::new()),
            vec![Action::TransferLeader {
                range_id: 2,
                to_node: 2
            }]
        );
    }

    #[test]
    fn replicas_spread_to_a_new_node() {
        let nodes = [node(1), node(2), node(3), node(4)];
        let ranges: Vec<RangeView> = (2..8).map(|id| range(id, &[1, 2, 3], 1 + id % 3)).collect();
        let actions = plan(&nodes, &ranges, 3, &HashSet::new());
        let adds = actions
            .iter()
            .filter(|a| matches!(a, Action::AddReplica { node_id: 4, .. }))
            .count();
        assert!((1..=MAX_REBALANCE_PER_ROUND).contains(&adds), "{actions:?}");
        // Balanced placement plans nothing.
        let balanced: Vec<RangeView> = vec![
            range(2, &[1, 2, 3], 1),
            range(3, &[2, 3, 4], 2),
            range(4, &[3, 4, 1], 3),
            range(5, &[4, 1, 2], 4),
        ];
        assert!(plan(&nodes, &balanced, 3, &HashSet::new()).is_empty());
    }

    #[test]
    fn busy_ranges_are_left_alone() {
        let nodes = [node(1), node(2), node(3)];
        let ranges = [range(2, &[1], 1)];
        assert!(plan(&nodes, &ranges, 3, &HashSet::from([2])).is_empty());
    }

    #[test]
    fn silent_nodes_turn_dead_and_back_and_only_changes_are_recorded() {
        let record = |id: NodeId| NodeRecord {
            node_id: id,
            addr: format!("n{id}:1"),
            state: NodeState::Active,
        };
        let nodes = [record(1), record(2), record(3)];
        let dead_after_ms = 1_000;
        // Node 1 is this node, silent to itself; node 2 reports; node 3 went quiet and was
        // already recorded dead.
        let silence = |n: NodeId| match n {
            2 => 10,
            _ => 5_000,
        };
        let recorded = HashMap::from([(
            3,
            LivenessRecord {
                node_id: 3,
                live: false,
                since_unix_ms: 1,
            },
        )]);
        let (views, changes) = node_liveness(&nodes, &recorded, 1, &silence, dead_after_ms, 42);
        let live: Vec<bool> = views.iter().map(|v| v.live).collect();
        assert_eq!(live, [true, true, false]);
        assert!(changes.is_empty(), "{changes:?}");
        // Node 2 goes quiet and node 3 comes back: both changes are recorded, at `now`.
        let silence = |n: NodeId| if n == 2 { 5_000 } else { 10 };
        let (_, changes) = node_liveness(&nodes, &recorded, 1, &silence, dead_after_ms, 42);
        let changed: Vec<(NodeId, bool, u64)> = changes
            .iter()
            .map(|c| (c.node_id, c.live, c.since_unix_ms))
            .collect();
        assert_eq!(changed, [(2, false, 42), (3, true, 42)]);
    }
}
