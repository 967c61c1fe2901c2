//! The `churn` nemesis: range changes through the admin API while the workload runs, so
//! every read and write races splits, merges, leader transfers and replica moves (the
//! moments when routing caches go stale, spans change under a scan and snapshots install).
//!
//! Each action is one admin call (a move is an add then a remove) under
//! [`CHURN_ACTION_DEADLINE_MS`]. An action the cluster refuses (a merge of ranges that just
//! moved, a transfer to a lagging replica, a node that is down) is recorded as refused and is
//! not an error: the cluster is allowed to say no, it is not allowed to lose data.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::Rng;
use spheredb_client::proto::v1::{
    ChangeReplicasRequest, RangeDescriptor, RangeListResponse, TransferLeaderRequest,
};
use spheredb_client::{kv_key, Client, ClientOptions};

use super::workload::{WorkloadKind, SPHERE};

/// Longest one churn action may take, all its admin calls together.
pub const CHURN_ACTION_DEADLINE_MS: u64 = 15_000;
/// The workload's range count churn keeps above (merges stop) and below (splits stop).
pub const MIN_CHURN_RANGES: usize = 3;
pub const MAX_CHURN_RANGES: usize = 16;
/// Replicas per range in the tester's clusters (the engine's default).
const DEFAULT_REPLICATION_FACTOR: usize = 3;
/// Deadline of each admin call of an action.
const CHURN_CALL_DEADLINE_MS: u64 = 5_000;

/// What one churn action did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChurnRecord {
    /// `split`, `merge`, `transfer-leader` or `move-replica`.
    pub action: &'static str,
    /// Nodes the action involved, by name (`n2`).
    pub targets: Vec<String>,
    /// What was asked and how it ended.
    pub detail: String,
}

/// The workload's ranges (those starting inside its key span), in key order.
fn workload_ranges(list: &RangeListResponse, kind: WorkloadKind) -> Vec<RangeDescriptor> {
    let (start, end) = kind.key_span();
    let (start, end) = (kv_key(SPHERE, &start), kv_key(SPHERE, &end));
    let mut ranges: Vec<RangeDescriptor> = list
        .ranges
        .iter()
        .filter(|d| d.start_key >= start && d.start_key < end)
        .cloned()
        .collect();
    ranges.sort_by(|a, b| a.start_key.cmp(&b.start_key));
    ranges
}

fn node_name(id: u64) -> String {
    format!("n{id}")
}

/// Runs one random churn action against the cluster at `addrs`.
pub async fn churn_once(addrs: &[String], kind: WorkloadKind, rng: &mut StdRng) -> ChurnRecord {
    let choice: u32 = rng.random_range(0..4);
    let split_at = kind.split_point(rng);
    let pick: u64 = rng.random();
    let budget = Duration::from_millis(CHURN_ACTION_DEADLINE_MS);
    let action = async {
        let options = ClientOptions {
            call_deadline_ms: CHURN_CALL_DEADLINE_MS,
            ..ClientOptions::default()
        };
        let client = Client::connect(addrs, options)
            .await
            .map_err(|e| (None, format!("cannot connect: {e}")))?;
        let list = client
            .range_list()
            .await
            .map_err(|e| (None, format!("range list: {e}")))?;
        let ranges = workload_ranges(&list, kind);
        let action = steer(choice, ranges.len(), list.nodes.len());
        let record = match action {
            Action::Split => split(&client, &split_at).await,
            Action::Merge => merge(&client, &ranges, pick).await,
            Action::TransferLeader => transfer_leader(&client, &list, &ranges, pick).await,
            Action::MoveReplica => move_replica(&client, &list, &ranges, pick).await,
        };
        record.map_err(|e| (Some(action), e)).map(|r| (action, r))
    };
    match tokio::time::timeout(budget, action).await {
        Ok(Ok((action, mut record))) => {
            record.action = action.name();
            record
        }
        Ok(Err((action, refused))) => ChurnRecord {
            action: action.map_or("action", Action::name),
            targets: Vec::new(),
            detail: format!("refused: {refused}"),
        },
        Err(_) => ChurnRecord {
            action: "action",
            targets: Vec::new(),
            detail: format!("no answer within {CHURN_ACTION_DEADLINE_MS} ms"),
        },
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Split,
    Merge,
    TransferLeader,
    MoveReplica,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Split => "split",
            Action::Merge => "merge",
            Action::TransferLeader => "transfer-leader",
            Action::MoveReplica => "move-replica",
        }
    }
}

/// The action for a random `choice` (0..4), steered so that the workload keeps between
/// [`MIN_CHURN_RANGES`] and [`MAX_CHURN_RANGES`] ranges and moves happen only where a node
/// without a replica exists.
fn steer(choice: u32, ranges: usize, nodes: usize) -> Action {
    match choice {
        0 if ranges < MAX_CHURN_RANGES => Action::Split,
        0 | 1 if ranges > MIN_CHURN_RANGES => Action::Merge,
        0 | 1 => Action::Split,
        3 if nodes > DEFAULT_REPLICATION_FACTOR => Action::MoveReplica,
        _ => Action::TransferLeader,
    }
}

fn done(targets: Vec<String>, detail: String) -> Result<ChurnRecord, String> {
    Ok(ChurnRecord {
        action: "",
        targets,
        detail,
    })
}

async fn split(client: &Client, user_key: &[u8]) -> Result<ChurnRecord, String> {
    let resp = client
        .split(&kv_key(SPHERE, user_key))
        .await
        .map_err(|e| e.to_string())?;
    let ids = |d: &Option<RangeDescriptor>| d.as_ref().map_or(0, |d| d.range_id);
    done(
        Vec::new(),
        format!(
            "at {} into ranges {} and {}",
            String::from_utf8_lossy(user_key),
            ids(&resp.left),
            ids(&resp.right)
        ),
    )
}

async fn merge(
    client: &Client,
    ranges: &[RangeDescriptor],
    pick: u64,
) -> Result<ChurnRecord, String> {
    // Any of the workload's ranges but the last has a right neighbour inside the span.
    if ranges.len() < 2 {
        return Err("fewer than two ranges to merge".into());
    }
    let left = &ranges[(pick % (ranges.len() as u64 - 1)) as usize];
    let merged = client
        .merge(left.range_id)
        .await
        .map_err(|e| format!("range {}: {e}", left.range_id))?;
    done(
        Vec::new(),
        format!(
            "range {} with its right neighbour, generation {}",
            left.range_id, merged.generation
        ),
    )
}

/// The address and current leader of a random range, with the range.
fn pick_range<'a>(
    list: &RangeListResponse,
    ranges: &'a [RangeDescriptor],
    pick: u64,
) -> Result<(&'a RangeDescriptor, u64, String), String> {
    let range = ranges
        .get((pick % ranges.len().max(1) as u64) as usize)
        .ok_or("no ranges")?;
    let leader = list
        .loads
        .iter()
        .find(|l| l.range_id == range.range_id)
        .and_then(|l| l.leader_node_id)
        .ok_or_else(|| format!("range {} has no known leader", range.range_id))?;
    let addr = list
        .nodes
        .iter()
        .find(|n| n.node_id == leader)
        .map(|n| n.addr.clone())
        .ok_or_else(|| format!("node {leader} has no known address"))?;
    Ok((range, leader, addr))
}

/// The voters of `range` other than its `leader`.
fn other_voters(range: &RangeDescriptor, leader: u64) -> Vec<u64> {
    range
        .voters
        .iter()
        .copied()
        .filter(|&v| v != leader)
        .collect()
}

/// An admin request under [`CHURN_CALL_DEADLINE_MS`].
fn with_deadline<T>(message: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.set_timeout(Duration::from_millis(CHURN_CALL_DEADLINE_MS));
    req
}

async fn transfer_leader(
    client: &Client,
    list: &RangeListResponse,
    ranges: &[RangeDescriptor],
    pick: u64,
) -> Result<ChurnRecord, String> {
    let (range, leader, addr) = pick_range(list, ranges, pick)?;
    let others = other_voters(range, leader);
    let to = *others
        .get((pick / 7 % others.len().max(1) as u64) as usize)
        .ok_or("no other voter")?;
    let mut admin = client.admin(&addr).map_err(|e| e.to_string())?;
    admin
        .transfer_leader(with_deadline(TransferLeaderRequest {
            range_id: range.range_id,
            to_node_id: to,
        }))
        .await
        .map_err(|s| format!("range {} to n{to}: {}", range.range_id, s.message()))?;
    done(
        vec![node_name(leader), node_name(to)],
        format!("range {} from n{leader} to n{to}", range.range_id),
    )
}

async fn move_replica(
    client: &Client,
    list: &RangeListResponse,
    ranges: &[RangeDescriptor],
    pick: u64,
) -> Result<ChurnRecord, String> {
    let (range, leader, addr) = pick_range(list, ranges, pick)?;
    let spare: Vec<u64> = list
        .nodes
        .iter()
        .map(|n| n.node_id)
        .filter(|id| !range.voters.contains(id) && !range.learners.contains(id))
        .collect();
    if spare.is_empty() {
        return Err(format!(
            "range {} has a replica on every node; nowhere to move one",
            range.range_id
        ));
    }
    let to = spare[(pick / 13 % spare.len() as u64) as usize];
    let others = other_voters(range, leader);
    if others.is_empty() {
        return Err(format!(
            "range {} has no voter but its leader",
            range.range_id
        ));
    }
    let from = others[(pick / 11 % others.len() as u64) as usize];
    let mut admin = client.admin(&addr).map_err(|e| e.to_string())?;
    let added = admin
        .change_replicas(with_deadline(ChangeReplicasRequest {
            range_id: range.range_id,
            add_node_id: Some(to),
            remove_node_id: None,
            expected_generation: range.generation,
        }))
        .await
        .map_err(|s| format!("range {}: add n{to}: {}", range.range_id, s.message()))?
        .into_inner()
        .descriptor
        .ok_or("the add answered without a descriptor")?;
    let remove = with_deadline(ChangeReplicasRequest {
        range_id: range.range_id,
        add_node_id: None,
        remove_node_id: Some(from),
        expected_generation: added.generation,
    });
    admin.change_replicas(remove).await.map_err(|s| {
        format!(
            "range {}: added n{to}, then removing n{from}: {}",
            range.range_id,
            s.message()
        )
    })?;
    done(
        vec![node_name(from), node_name(to)],
        format!("range {} from n{from} to n{to}", range.range_id),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn churn_keeps_the_range_count_in_its_band() {
        assert_eq!(steer(0, MAX_CHURN_RANGES, 3), Action::Merge);
        assert_eq!(steer(1, MIN_CHURN_RANGES, 3), Action::Split);
        assert_eq!(steer(0, MIN_CHURN_RANGES, 3), Action::Split);
        assert_eq!(steer(1, MIN_CHURN_RANGES + 1, 3), Action::Merge);
        assert_eq!(steer(3, 5, 3), Action::TransferLeader, "no spare node on 3");
        assert_eq!(steer(3, 5, 5), Action::MoveReplica);
        assert_eq!(steer(2, 5, 5), Action::TransferLeader);
    }
}
